"""Where the host time of a short call goes: Python's profiler over calls whose GPU work is small.

    PYTHONPATH=. python bench/notes/host_profile.py          # on a CUDA machine (about 30 s)

Cases: `parallel_nsa` decoding one token against a 64K cache (bench/nsa.py's shapes, cached summaries), and chapter
1's `flash_attention` at B 2, T 1024, H 16, D 128 (bench/attention.py's shortest length), forward and forward +
backward. For each: the host time of a call (50 calls issued back to back, the clock read before the GPU is
synchronised) and the wall time (after it); where the two agree, the calls are bound by the host. Then cProfile's
functions by their own time over 20 calls, which says whether the host time is this package's Python (checks,
launch plumbing, small torch ops) or Triton's launcher.
"""
from __future__ import annotations

import cProfile
import io
import pathlib
import pstats
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import bench  # noqa: E402
from minisparse.attention import flash_attention  # noqa: E402
from minisparse.nsa import mean_pool, parallel_nsa  # noqa: E402


def report(name, fn, rows=25):
    host, wall = bench.host_ms(fn)
    print(f"== {name}: host {host:.3f} ms a call, wall {wall:.3f} ms a call", flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    print(out.getvalue())


def main():
    dev, bf16 = "cuda", torch.bfloat16
    T, HQ, H, D = 65536, 64, 4, 128
    q = torch.randn(1, T, HQ, D, device=dev, dtype=bf16)
    k, v = (torch.randn(1, T, H, D, device=dev, dtype=bf16) for _ in range(2))
    gates = [torch.rand(1, 1, HQ, device=dev, dtype=bf16) for _ in range(3)]
    k_cmp, v_cmp = mean_pool(k, 64), mean_pool(v, 64)
    with torch.no_grad():
        report("parallel_nsa, one token against 64K", lambda: parallel_nsa(
            q[:, -1:], k, v, *gates, block_counts=16, block_size=64, window_size=512, k_cmp=k_cmp, v_cmp=v_cmp))
    qa, ka, va = (torch.randn(2, 1024, 16, 128, device=dev, dtype=bf16) for _ in range(3))
    with torch.no_grad():
        report("flash_attention forward, T 1024", lambda: flash_attention(qa, ka, va, causal=True))
    qa.requires_grad_(True)
    do = torch.randn_like(qa)
    report("flash_attention forward + backward, T 1024", lambda: flash_attention(qa, ka, va, causal=True).backward(do))


if __name__ == "__main__":
    main()
