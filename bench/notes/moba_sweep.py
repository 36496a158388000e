"""MoBA's forward on a GPU, stage by stage, and each launch configuration of its three kernels forced in turn.

    PYTHONPATH=. python bench/notes/moba_sweep.py [--T 32768] [--sweep]     # on a CUDA machine

bench/nsa.py's MoBA shapes (B 1, HQ = H = 16, D 128, chunks of 128, top-16, bf16, random inputs). Prints the median
ms of: the gate (`moba_gate`), the inversion (`_moba_plan`), the forward given the indices (`_moba_forward`: the
inversion, the partial results and the merge), the whole `parallel_moba`, and SDPA's causal forward. With --sweep,
the forward given the indices once for each configuration of "moba.partial" and "moba.merge" (the other kernel at
its row's first), and the gate once for each of "moba.gate"; with --profile, parallel_moba's CUDA kernels by time.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import runtime  # noqa: E402
from minisparse.nsa import moba_gate, parallel_moba  # noqa: E402
from minisparse.nsa.triton import _moba_forward, _moba_plan  # noqa: E402

B, HQ, H, D, CHUNK, TOPK = 1, 16, 16, 128, 128, 16


def ms(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[32768])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernels of parallel_moba by time")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    for T in args.T:
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(B, T, n, D, device=dev, dtype=dt, generator=g) for n in (HQ, H, H))
        scale = D ** -0.5
        idx = moba_gate(q, k, CHUNK, TOPK)
        BR = runtime.launch_configs("moba.partial", q.device, dt)[0]["BR"]
        with torch.no_grad():
            stages = {
                "gate": lambda: moba_gate(q, k, CHUNK, TOPK),
                "plan": lambda: _moba_plan(idx, T, CHUNK, BR),
                "forward given idx": lambda: _moba_forward(q, k, v, idx, CHUNK, scale),
                "parallel_moba": lambda: parallel_moba(q, k, v, CHUNK, TOPK),
                "SDPA causal": lambda: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
            }
            times = {name: ms(fn) for name, fn in stages.items()}
        print(f"T = {T}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())
              + f"; SDPA / parallel_moba = {times['SDPA causal'] / times['parallel_moba']:.2f}x")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
                for _ in range(5):
                    parallel_moba(q, k, v, CHUNK, TOPK)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
        if not args.sweep:
            continue
        for kernel, fn in (("moba.partial", lambda: _moba_forward(q, k, v, idx, CHUNK, scale)),
                           ("moba.merge", lambda: _moba_forward(q, k, v, idx, CHUNK, scale)),
                           ("moba.gate", lambda: moba_gate(q, k, CHUNK, TOPK))):
            for config in runtime.launch_configs(kernel, q.device, dt) + EXTRA.get(kernel, []):
                with runtime.launch_config(kernel, **config), torch.no_grad():
                    try:
                        t = f"{ms(fn):.3f} ms"
                    except Exception as err:  # a configuration over the shared memory
                        t = f"failed ({type(err).__name__})"
                print(f"  {kernel} {config}: {t}")


def _c(w, s, **tiles):
    return dict(tiles, num_warps=w, num_stages=s)


EXTRA = {  # candidates beyond the table's rows
    "moba.partial": [_c(4, 3, BR=64, NT=4, BN=64), _c(4, 2, BR=32, NT=8, BN=64), _c(4, 3, BR=32, NT=8, BN=128),
                     _c(4, 2, BR=64, NT=8, BN=64), _c(4, 4, BR=64, NT=4, BN=128), _c(8, 3, BR=128, NT=2, BN=64)],
    "moba.merge": [_c(4, 3, BM=64, BN=64), _c(4, 2, BM=32, BN=64)],
    "moba.gate": [_c(8, 2, BM=128, BC=64), _c(4, 2, BM=64, BC=32)],
}

if __name__ == "__main__":
    main()
