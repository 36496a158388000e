"""Where DSA's decoding step spends its time on a GPU: the host's time a step, then the CUDA kernels.

    PYTHONPATH=. python bench/notes/dsa_profile.py          # on a CUDA machine (sm_89+ for the FP8 step)

bench/dsa.py's decoding shapes (B 16, 64K cached tokens, 128 heads, latent 512 + 64, indexer 64 × 128, top-k
2,048), bf16 and FP8 index keys: the wall time a step when 50 steps are launched back to back (before and after
the final synchronisation: equal times mean the host, not the GPU, sets the pace), then a torch.profiler table of
the kernels of 10 steps.
"""
from __future__ import annotations

import importlib.util
import pathlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_dsa", ROOT / "bench" / "dsa.py")
D = importlib.util.module_from_spec(spec)
spec.loader.exec_module(D)  # bench/dsa.py's shapes and helpers (it puts the repository on sys.path)


def main():
    B, T = D.DECODE["B"], D.DECODE["T"]
    g = torch.Generator(device="cuda").manual_seed(1)
    q, kv = D.make(B, 1, D.HQ, D.DC + D.DR, g=g, scale=0.5), D.make(B, T, 1, D.DC + D.DR, g=g, scale=0.5)
    q_idx, k_idx = D.make(B, 1, D.HI, D.DI, g=g), D.make(B, T, D.DI, g=g)
    w = D.make(B, 1, D.HI, g=g, scale=D.HI ** -0.5)
    keys = {"bf16": (q_idx, k_idx)}
    if D.fp8_ok():
        keys["fp8"] = (q_idx.to(torch.float8_e4m3fn), k_idx.to(torch.float8_e4m3fn))
    for name, (qi, ki) in keys.items():
        def step(qi=qi, ki=ki):
            return D.attend(q, kv, D.lightning_indexer(qi, ki, w, D.TOPK))

        with torch.no_grad():
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                step()
            host = (time.perf_counter() - t0) / 50 * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 50 * 1e3
            print(f"{name}: host {host:.3f} ms a step (launching), wall {wall:.3f} ms a step (back to back)")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
