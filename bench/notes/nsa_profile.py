"""Where parallel_nsa and parallel_moba spend their time on a GPU: a torch.profiler table per case.

    PYTHONPATH=. python bench/notes/nsa_profile.py          # on a CUDA machine; prints the tables

Cases at bench/nsa.py's shapes (B 1, HQ 64, H 4, D 128, blocks of 64, 16 blocks, window 512, bf16): the forward
at 8K and 64K, a decoding step against a 64K cache (cached summaries), and MoBA's forward at 16K (HQ = H = 16,
chunks of 128, top-16). Each table lists the CUDA kernels by total time and the host time of the call, so the
kernel that dominates, or host overhead, is visible.
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse.nsa import mean_pool, parallel_moba, parallel_nsa  # noqa: E402

B, HQ, H, D, BS, S, W = 1, 64, 4, 128, 64, 16, 512


def show(label, fn, reps=5):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e3  # launch cost without a sync
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"\n=== {label}: host {host:.3f} ms a call, wall {wall:.3f} ms a call")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    for T in (8192, 65536):
        q = torch.randn(B, T, HQ, D, device=dev, dtype=dt)
        k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt) for _ in range(2))
        gates = [torch.rand(B, T, HQ, device=dev, dtype=dt) for _ in range(3)]
        kw = dict(block_counts=S, block_size=BS, window_size=W)
        with torch.no_grad():
            show(f"parallel_nsa fwd T={T}", lambda: parallel_nsa(q, k, v, *gates, **kw))
            if T == 65536:
                kc, vc = mean_pool(k, BS), mean_pool(v, BS)
                last = [g[:, -1:] for g in gates]
                show("parallel_nsa decode, 64K cache",
                     lambda: parallel_nsa(q[:, -1:], k, v, *last, **kw, k_cmp=kc, v_cmp=vc), reps=20)
        torch.cuda.empty_cache()
    T = 16384
    q, k, v = (torch.randn(B, T, 16, D, device=dev, dtype=dt) for _ in range(3))
    with torch.no_grad():
        show("parallel_moba fwd T=16K", lambda: parallel_moba(q, k, v, 128, 16))


if __name__ == "__main__":
    main()
