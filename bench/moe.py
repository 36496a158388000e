"""Chapter 2's benchmark: the Triton grouped GEMM against torch._grouped_mm, and the MoE layer against its loop.

    PYTHONPATH=. python bench/moe.py --out bench/results      # on a GPU machine, from the repository root

1. grouped GEMM, bf16: 16K tokens × top-8 = M = 131,072 rows routed unevenly (seeded) over E = 64 experts,
   K = 2048, N = 2816 (a 2048-wide model's gate/up projection); also 4K and 8K tokens. Forward with the weights
   in transformers' layout (a transposed view of [E, N, K]) and contiguous [E, K, N]; backward dX (= grouped_mm of
   dY and Wᵀ) and dW (the grouped weight-gradient kernel; torch: its 2-D × 2-D grouped form).
2. the MoE layer, forward + backward, bf16: 8K tokens, hidden 2048, 64 experts of width 1408, top-6, a shared
   expert of width 2816 (DeepSeek-V2-Lite's shape), Triton backend vs the per-expert loop.

Autotuning is on (runtime.set_autotune(True)): the first call of each kernel for an (N, K) times the configurations
of its runtime.LAUNCH_TABLE row and keeps the fastest; the JSON records the one each kernel ran with. Medians by
minisparse.bench.median_ms (CUDA events). Writes DIR/moe.json (minisparse.bench format) and prints a table. Target,
reported and not asserted: grouped_mm forward ≥ 0.8× torch._grouped_mm's speed.
"""
from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench, runtime  # noqa: E402
from minisparse.moe import MoE, grouped_mm, grouped_mm_flops, tile_schedule  # noqa: E402
from minisparse.moe import triton as moe_triton  # noqa: E402
from minisparse.testing import rel_rms  # noqa: E402

TOP_K, E, K, N = 8, 64, 2048, 2816
TOKENS = (4096, 8192, 16384)
LAYER = dict(tokens=8192, hidden=2048, inter=1408, experts=64, top_k=6, shared=2816)
DEVICE, DTYPE = "cuda", torch.bfloat16
SMOKE = False  # --smoke: tiny shapes on a CPU in the interpreter, wall-clock timing: checks that the script runs


def routed_offsets(tokens: int, top_k: int, experts: int, seed: int = 0):
    """Offsets of a realistic uneven routing: expert popularity softmax(N(0, 1)), k distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.softmax(torch.randn(experts, generator=g), 0)  # [E] a few experts 3-5x the median
    choice = torch.multinomial(popularity.expand(tokens, experts), top_k, replacement=False, generator=g)  # [T, k]
    counts = torch.bincount(choice.flatten(), minlength=experts)
    return counts.cumsum(0).to(torch.int32).to(DEVICE), counts


def timed(fn) -> float | None:
    return bench.timed(fn, smoke=SMOKE)


def gemm_rows(tokens: int) -> list[dict]:
    offs, counts = routed_offsets(tokens, TOP_K, E)
    M = tokens * TOP_K
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(M, K, device=DEVICE, generator=g, dtype=DTYPE)
    w_nk = torch.randn(E, N, K, device=DEVICE, generator=g, dtype=DTYPE) / K ** 0.5  # transformers' layout
    w_hf = w_nk.transpose(1, 2)  # [E, K, N] view
    w_kn = w_hf.contiguous()  # [E, K, N] contiguous
    dy = torch.randn(M, N, device=DEVICE, generator=g, dtype=DTYPE)
    dw = torch.empty_like(w_hf)
    flops = grouped_mm_flops(M, K, N)
    base = dict(T=tokens, M=M, K=K, N=N, E=E, rows_min=int(counts.min()), rows_max=int(counts.max()))

    # correctness at this shape, against torch
    try:
        err = rel_rms(grouped_mm(x, w_hf, offs).float(), torch._grouped_mm(x, w_hf, offs=offs).float())
        print(f"  T={tokens}: grouped_mm vs torch._grouped_mm relative RMS {err:.2e}")
    except Exception as e:  # noqa: BLE001
        print(f"  T={tokens}: no torch._grouped_mm comparison ({type(e).__name__}: {str(e)[:100]})")

    cases = [
        ("grouped_mm (triton)", "fwd", lambda: grouped_mm(x, w_hf, offs)),
        ("torch._grouped_mm", "fwd", lambda: torch._grouped_mm(x, w_hf, offs=offs)),
        ("grouped_mm (triton), w [E,K,N]", "fwd", lambda: grouped_mm(x, w_kn, offs)),
        ("torch._grouped_mm, w [E,K,N]", "fwd", lambda: torch._grouped_mm(x, w_kn, offs=offs)),
        ("grouped_mm (triton)", "bwd dX", lambda: grouped_mm(dy, w_hf.transpose(1, 2), offs)),
        ("torch._grouped_mm", "bwd dX", lambda: torch._grouped_mm(dy, w_hf.transpose(1, 2), offs=offs)),
        ("grouped_mm (triton)", "bwd dW", lambda: moe_triton._launch_dw(x, dy, offs, dw)),
        ("torch._grouped_mm", "bwd dW", lambda: torch._grouped_mm(x.t(), dy, offs=offs)),
    ]
    rows = []
    for impl, p, fn in cases:
        ms = timed(fn)
        rows.append(dict(impl=impl, **{"pass": p}, **base, ms=ms, tflops=flops / ms / 1e9 if ms else None))
    return rows, launch_configs(x, w_hf, dy, offs, dw)


def launch_configs(x, w, dy, offs, dw) -> dict:
    """The configuration each kernel runs with at this shape (autotuned: the fastest of its LAUNCH_TABLE row)."""
    y = torch.empty(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype)
    block_m = moe_triton._block_m(x.device, x.dtype)
    chosen = {"moe.grouped_mm": moe_triton._launch_fwd(x, w, offs, y, tile_schedule(offs, x.shape[0], block_m),
                                                        block_m),
              "moe.grouped_mm_dw": moe_triton._launch_dw(x, dy, offs, dw)}
    return {k: {n: v for n, v in (c or {}).items() if isinstance(v, (int, float, str))} for k, c in chosen.items()}


def layer_rows() -> list[dict]:
    c = LAYER
    torch.manual_seed(0)
    layer = MoE(c["hidden"], c["inter"], c["experts"], c["top_k"], shared_intermediate_size=c["shared"])
    layer = layer.to(DEVICE, DTYPE)
    layer.gate.float()
    x = torch.randn(c["tokens"], c["hidden"], device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    outs = {}
    rows = []
    for backend in ("triton", "naive"):
        layer.backend = backend
        with torch.no_grad():
            outs[backend] = layer(x).float()

        def step():
            layer(x).backward(dy)

        ms = timed(step)
        rows.append(dict(impl=f"MoE layer ({backend})", backend=backend, **{"pass": "fwd+bwd"}, T=c["tokens"],
                         hidden=c["hidden"], inter=c["inter"], experts=c["experts"], top_k=c["top_k"], ms=ms))
    print(f"  MoE layer: triton vs naive output relative RMS {rel_rms(outs['triton'], outs['naive']):.2e}")
    return rows


def main(argv=None) -> int:
    ap = bench.script_parser("moe", __doc__)
    ap.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS), help="token counts (× top-8 = rows)")
    args = ap.parse_args(argv)
    if args.smoke:
        global SMOKE, DEVICE, DTYPE, K, N
        SMOKE, DEVICE, DTYPE, K, N = True, "cpu", torch.float32, 64, 96
        LAYER.update(tokens=64, hidden=64, inter=32, experts=8, top_k=2, shared=48)
        args.tokens = [16]
    if not bench.start_script("moe", args.smoke):
        return 2
    runtime.set_autotune(True)  # the interpreter (--smoke) ignores it
    rows, tuned = [], {}
    for tokens in args.tokens:
        gemm, tuned[tokens] = gemm_rows(tokens)
        rows += gemm
    rows += layer_rows()
    config = dict(dtype=str(DTYPE).replace("torch.", ""), top_k=TOP_K, experts=E, K=K, N=N, tokens=args.tokens,
                  routing="softmax(N(0,1)) popularity, top-8 distinct experts a token, seed 0", layer=LAYER,
                  launch_configs=tuned,
                  note="grouped_mm timed without value checks (the default on CUDA: no host sync), as the MoE "
                       "layer calls it")
    path = bench.save_results("moe", config, rows, path=args.out / "moe.json")

    print(f"\nwrote {path}; launch configurations: {tuned}")
    print(f"{'impl':34s} {'pass':8s} {'tokens':>7s} {'ms':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "failed"
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        print(f"{r['impl']:34s} {r['pass']:8s} {r['T']:7d} {ms:>8s} {tf:>8s}")
    top = max(args.tokens)
    ours = next((r["ms"] for r in rows if r["impl"] == "grouped_mm (triton)" and r["pass"] == "fwd" and r["T"] == top),
                None)
    ref = next((r["ms"] for r in rows if r["impl"] == "torch._grouped_mm" and r["pass"] == "fwd" and r["T"] == top),
               None)
    if ours and ref:
        print(f"grouped_mm fwd at {top} tokens: {ref / ours:.2f}x torch._grouped_mm's speed (target >= 0.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
