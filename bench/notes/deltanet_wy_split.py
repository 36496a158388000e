"""Chapter 5's WY kernel with A_inv's products split in two bf16 halves (SPLIT, what the op uses for bf16) against
one TF32 product on fp32 copies (what it uses for fp16): time at 32K tokens, W and Ũ against an fp32 (ieee)
computation, NaN on extreme gates. Results in deltanet.md.
On a GPU:  PYTHONPATH=. python bench/notes/deltanet_wy_split.py
"""
import torch
import triton

import minisparse.deltanet.chunk_fwd as dt
from minisparse.deltanet.chunk_bwd import _l2norm_rows
from minisparse import bench
from minisparse.testing import rel_rms


def wy(k, v, g, beta, split, precision):
    """W and Ũ (no scan) of the WY kernel, fp32 buffers, blocks of 32 columns, 4 warps (the op launches 2 on sm_80
    and newer: runtime.LAUNCH_TABLE["deltanet.fwd_wy"])."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    w, u = torch.empty(B, T, H, K, device=k.device), torch.empty(B, T, H, V, device=k.device)
    launch = lambda: dt._fwd_wy_kernel[(triton.cdiv(T, dt._C), B * H)](
        k, v, g, beta, w, u, None, None, T, H, H, K, V, C=dt._C, BK=32, BV=32, SPLIT=split, L2=False,
        STORE_AINV=False, PRECISION=precision, num_warps=4)
    launch()
    return w, u, launch


def run(B, T, H, K, V, gates, timeit):
    k = _l2norm_rows(torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16))
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    g = torch.empty(B, T, H, device="cuda").uniform_(*gates)
    beta = torch.rand(B, T, H, device="cuda")
    w32, u32, _ = wy(k.float(), v.float(), g, beta, False, "ieee")
    for name, split in (("split A_inv (bf16 x2)", True), ("TF32", False)):
        w, u, launch = wy(k, v, g, beta, split, "tf32")
        ms = f"{bench.median_ms(launch, warmup=3, rep=20):.3f} ms" if timeit else ""
        print(f"  {name:18s} K={K} g in {gates}: {ms:9s} W {rel_rms(w, w32):.2e}  Ũ {rel_rms(u, u32):.2e}  "
              f"NaN {bool(w.isnan().any() or u.isnan().any())}")


if __name__ == "__main__":
    run(2, 32768, 16, 128, 128, (-1.0, 0.0), True)
    for K in (48, 128):
        for gates in ((-30.0, -5.0), (-1e-3, 0.0)):
            run(1, 1000, 4, K, 48, gates, False)
