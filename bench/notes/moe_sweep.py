"""Chapter 2's grouped GEMM kernels under every configuration of their LAUNCH_TABLE rows, one at a time, at
bench/moe.py's shape (16K tokens × top-8 = 131,072 rows over 64 experts, K = 2048, N = 2816, bf16, the same seeded
routing). What bench/notes/moe.md's tables came from.

    PYTHONPATH=. python bench/notes/moe_sweep.py [tokens ...]      # on a GPU, from the repository root
"""
import sys

import torch

from minisparse import bench, runtime
from minisparse.moe import grouped_mm, grouped_mm_flops
from minisparse.moe import triton as moe_triton

sys.path.insert(0, "bench")
from moe import E, K, N, TOP_K, routed_offsets  # noqa: E402  the benchmark's shape and routing


def timed(kernel, config, fn):
    try:
        with runtime.launch_config(kernel, **config):
            fn()
            torch.cuda.synchronize()
            return bench.median_ms(fn)
    except Exception as err:  # noqa: BLE001 - a configuration that does not fit: say so and go on
        return f"fails: {type(err).__name__}: {str(err)[:80]}"


def main(tokens):
    offs, _ = routed_offsets(tokens, TOP_K, E)
    M = tokens * TOP_K
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K ** 0.5).transpose(1, 2)
    dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
    dw = torch.empty_like(w)
    flops = grouped_mm_flops(M, K, N)
    passes = {"moe.grouped_mm": [("fwd", lambda: grouped_mm(x, w, offs)),
                                 ("bwd dX", lambda: grouped_mm(dy, w.transpose(1, 2), offs))],
              "moe.grouped_mm_dw": [("bwd dW", lambda: moe_triton._launch_dw(x, dy, offs, dw))]}
    print(f"{torch.cuda.get_device_name(0)} · torch {torch.__version__} · {tokens} tokens, M = {M}, K = {K}, N = {N}, "
          f"E = {E}, bf16")
    print("| kernel | # | BLOCK_M × BLOCK_N × BLOCK_K | GROUP_M | warps | stages | pass | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kernel, cases in passes.items():
        for i, c in enumerate(runtime.launch_configs(kernel, "cuda", torch.bfloat16)):
            tiles = f"{c['BLOCK_M']} × {c['BLOCK_N']} × {c['BLOCK_K']}"
            for name, fn in cases:
                ms = timed(kernel, c, fn)
                cell = f"{ms:.3f} | {flops / ms / 1e9:.0f}" if isinstance(ms, float) else f"{ms} |"
                print(f"| {kernel} | {i} | {tiles} | {c.get('GROUP_M', '')} | {c['num_warps']} | {c['num_stages']} "
                      f"| {name} | {cell} |")


if __name__ == "__main__":
    for t in [int(a) for a in sys.argv[1:]] or [16384]:
        main(t)
