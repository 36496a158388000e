"""Chapter 5's forward kernels one at a time, under several launch configurations, and fla's kernels from a profile,
at one length (default 32K tokens; B2 H16 D128 bf16). The sweeps behind runtime.LAUNCH_TABLE's "deltanet.fwd_*" rows
and bench/notes/deltanet.md's per-kernel table.
On a GPU, with fla-core installed:   PYTHONPATH=. python bench/notes/deltanet_sweep.py [T ...]
"""
import itertools
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import minisparse.deltanet.chunk_fwd as dt
from minisparse import bench, runtime
from minisparse.deltanet import chunk_gated_delta_rule


def ms(fn):
    try:
        fn()
        torch.cuda.synchronize()
        return f"{bench.median_ms(fn, warmup=3, rep=20):.3f} ms"
    except Exception as e:  # a config that does not fit: say so and go on
        return f"fails: {type(e).__name__}: {str(e)[:80]}"


def kernel_times(fn, reps=5):
    """CUDA time per call of every kernel fn launches, from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / reps / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def main(T):
    B, H, D = 2, 16, 128
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(B, T, H, device="cuda")
    beta = torch.rand(B, T, H, device="cuda")
    NT = triton.cdiv(T, dt._C)
    # q and k as given (the kernels normalise them); W, U and the states in bf16, as the op stores them
    w, u, kr, _, states, _ = dt._wy_and_states(k, v, g, beta, None, False, l2=True, recompute=False)  # u holds U
    u_wy = torch.empty_like(u)
    for bk, warps, stages in [(32, 4, 3), (32, 1, 3)] + list(itertools.product((16, 32, 64), (2,), (2, 3, 4))):
        f = lambda: dt._fwd_wy_kernel[(NT, B * H)](k, v, g, beta, w, u_wy, kr, None, T, H, H, D, D, C=dt._C, BK=bk,
                                                   BV=bk, SPLIT=True, L2=True, STORE_AINV=False, PRECISION="tf32",
                                                   num_warps=warps, num_stages=stages)
        print(f"  wy      blocks {bk} warps {warps} stages {stages}: {ms(f)}")
    u_scan = torch.empty_like(u)  # the scan writes U over Ũ: each timed run starts from a fresh copy of Ũ
    for bv, warps, stages in ((32, 4, 3), (32, 4, 4), (32, 4, 5), (32, 8, 4), (64, 4, 4), (32, 2, 4)):
        f = lambda: (u_scan.copy_(u_wy), dt._fwd_states_kernel[(D // bv, B * H)](
            k, w, u_scan, g, kr, None, states, None, T, H, H, D, D, NT, C=dt._C, BK=D, BV=bv, HAS_H0=False,
            STORE_HT=False, L2=True, PRECISION="tf32", num_warps=warps, num_stages=stages))
        print(f"  scan    BV {bv} warps {warps} stages {stages}: {ms(f)} (with a copy of Ũ)")
    o = torch.empty_like(v)
    for bv, bk, warps, stages in list(itertools.product((128, 64), (64, 128), (4, 8), (2, 3))):
        f = lambda: dt._fwd_output_kernel[(D // bv, NT, B * H)](q, k, u, g, kr, states, o, D ** -0.5, T, H, H, D, D,
                                                                NT, C=dt._C, BK=bk, BV=bv, L2=True, PRECISION="tf32",
                                                                num_warps=warps, num_stages=stages)
        print(f"  output  BV {bv} BK {bk} warps {warps} stages {stages}: {ms(f)}")
    with torch.no_grad():
        fwd = lambda: chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
        print("  end to end:", ms(fwd))
        previous = runtime.set_value_checks(True)
        print("  end to end, runtime.set_value_checks(True):", ms(fwd))
        runtime.set_value_checks(previous)
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla
        except ImportError:
            print("  (fla-core not installed: no per-kernel reference)")
            return
        print("  fla end to end:", ms(lambda: fla(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)))
        for name, t in sorted(kernel_times(lambda: fla(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)).items(),
                              key=lambda kv: -kv[1]):
            print(f"  fla {name[:60]:60s} {t:.3f} ms")


if __name__ == "__main__":
    for T in sys.argv[1:] or ["32768"]:
        main(int(T))
