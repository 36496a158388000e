"""The two ceilings of the roofline on the GPU this runs on: a bf16 dense matmul's TFLOP/s and an HBM-to-HBM
copy's TB/s (bytes read plus bytes written, over the time).

    PYTHONPATH=. python bench/notes/ceilings.py      # on a CUDA machine, about 20 s

Prints the line to add to `minisparse.bench.CEILINGS` (the best of a few square matmuls, the best of two copy
sizes; medians of `triton.testing.do_bench`). The Roofline page places each results file against the ceilings of
the device it names.
"""
from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from minisparse import bench  # noqa: E402


def matmul_tflops(n: int) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (bench.median_ms(lambda: a @ b) * 1e9)


def copy_tbps(nbytes: int) -> float:
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench.median_ms(lambda: dst.copy_(src)) * 1e9)


def main():
    name = torch.cuda.get_device_name()
    mm = {n: matmul_tflops(n) for n in (4096, 8192, 16384)}
    cp = {g: copy_tbps(g << 30) for g in (1, 4)}
    print(name, "bf16 matmul TFLOP/s:", {n: round(v) for n, v in mm.items()})
    print(name, "copy TB/s:", {f"{g} GiB": round(v, 2) for g, v in cp.items()})
    print(f'    "{name}": ({max(mm.values()):.0f}.0, {max(cp.values()):.2f}),')


if __name__ == "__main__":
    main()
