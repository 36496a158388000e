"""Where chunk_kda's forward spends its time on a GPU, with the launch table's first configs and autotuned.

    PYTHONPATH=. python bench/notes/kda_profile.py          # on a CUDA machine; prints the tables

B 2, T 8192, H 16, K = V = 128, bf16 (bench/kda.py's first shape): a torch.profiler table of the CUDA kernels of
the forward, then the forward's median time with runtime.set_autotune(True) (every config of each kernel's
LAUNCH_TABLE row timed), so a config that is far from the best shows up as the gap between the two.
"""
from __future__ import annotations

import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import bench, runtime  # noqa: E402
from minisparse.kda import chunk_kda  # noqa: E402


def main():
    B, T, H, D = 2, 8192, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    gate = -torch.rand(B, T, H, D, device="cuda", generator=g)
    beta = torch.rand(B, T, H, device="cuda", generator=g)

    def fwd():
        with torch.no_grad():
            return chunk_kda(q, k, v, gate, beta, use_qk_l2norm=True)[0]

    print(f"table configs: fwd {bench.median_ms(fwd, warmup=10, rep=40):.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
    runtime.set_autotune(True)
    print(f"autotuned: fwd {bench.median_ms(fwd, warmup=10, rep=40):.3f} ms")


if __name__ == "__main__":
    main()
