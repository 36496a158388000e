"""Chapter 4's benchmark: chunk_lightning_attn against fla's chunk_simple_gla (the same recurrence and cost), fla's
chunk_lightning_attn (TransNormer's rates, the same cost) and SDPA causal attention.

    PYTHONPATH=. python bench/lightning.py --out bench/results      # on a GPU machine, from the repository root

B = 2, H = 16, K = V = 128, bf16, T from 1K to 64K; forward, and forward + backward (o.backward(do)). MiniMax's
slopes of layer 0 of 2 (a fast set of heads); fla's chunk_simple_gla gets the same decay as g_gamma = -slope.
Medians by minisparse.bench.median_ms (CUDA events). Writes DIR/lightning.json (minisparse.bench format) and prints a
table last. Target, reported and not asserted: forward time ≤ 1.0× fla's chunk_simple_gla.
"""
from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench  # noqa: E402
from minisparse.lightning import chunk_lightning_attn, minimax_slopes  # noqa: E402
from minisparse.testing import rel_rms  # noqa: E402

B, H, D = 2, 16, 128
TS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEVICE, DTYPE = "cuda", torch.bfloat16
SMOKE = False  # --smoke: tiny shapes on a CPU in the interpreter, wall-clock timing: checks that the script runs


def timed(fn) -> float | None:
    return bench.timed(fn, smoke=SMOKE, warmup=10, rep=40)


def impls(slope):
    out = {"chunk_lightning_attn (minisparse)": lambda q, k, v: chunk_lightning_attn(q, k, v, slope)[0]}
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        g_gamma = -slope.float()
        out["fla chunk_simple_gla (g_gamma = -slope)"] = lambda q, k, v: chunk_simple_gla(q, k, v,
                                                                                           g_gamma=g_gamma)[0]
    except ImportError as err:
        print(f"  fla chunk_simple_gla unavailable: {err}")
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn as fla_lightning

        out["fla chunk_lightning_attn (TransNormer rates)"] = lambda q, k, v: fla_lightning(q, k, v, layer_idx=0,
                                                                                            num_layers=2)[0]
    except ImportError as err:
        print(f"  fla chunk_lightning_attn unavailable: {err}")
    out["SDPA causal"] = lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    return out


def rows_for(T: int, slope) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, generator=g, dtype=DTYPE) / 4 for _ in range(3))
    do = torch.randn(B, T, H, D, device=DEVICE, generator=g, dtype=DTYPE)
    lin_flops = B * H * (T * 64 * 2 * D + 4 * T * D * D)  # chunk form, C = 64 (minisparse.lightning.lightning_flops)
    rows = []
    fns = impls(slope)
    if "fla chunk_simple_gla (g_gamma = -slope)" in fns and T <= 8192:
        try:
            with torch.no_grad():
                err = rel_rms(fns["chunk_lightning_attn (minisparse)"](q, k, v).float(),
                              fns["fla chunk_simple_gla (g_gamma = -slope)"](q, k, v).float())
            print(f"  T={T}: minisparse vs fla chunk_simple_gla relative RMS {err:.2e}")
        except Exception as e:  # noqa: BLE001
            print(f"  T={T}: no comparison with fla ({type(e).__name__}: {str(e)[:100]})")
    for name, fn in fns.items():
        flops = B * H * T * T * 2 * D if name.startswith("SDPA") else lin_flops
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

        def fwd():
            with torch.no_grad():
                return fn(q, k, v)

        def fwd_bwd():
            fn(*leaves).backward(do)

        for p, f, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.0)):
            ms = timed(f) if not (SMOKE and name != "chunk_lightning_attn (minisparse)") else None
            rows.append(dict(impl=name, **{"pass": p}, T=T, B=B, H=H, D=D, ms=ms,
                             tflops=mult * flops / ms / 1e9 if ms else None))
            for x in leaves:
                x.grad = None
    return rows


def main(argv=None) -> int:
    ap = bench.script_parser("lightning", __doc__)
    ap.add_argument("--T", type=int, nargs="*", default=list(TS), help="sequence lengths")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE, DTYPE, B, H, D
    if args.smoke:
        SMOKE, DEVICE, DTYPE, B, H, D = True, "cpu", torch.float32, 1, 2, 32
        args.T = [70]
    if not bench.start_script("lightning", args.smoke):
        return 2
    slope = minimax_slopes(H, 0, 2).to(DEVICE)
    rows = []
    config = dict(dtype=str(DTYPE).replace("torch.", ""), B=B, H=H, K=D, V=D, T=args.T, chunk=64,
                  slopes="minimax_slopes(H, 0, 2)", scale="K ** -0.5",
                  note="fwd under no_grad; fwd+bwd = o.backward(do); tflops counts the chunk form (lightning) or "
                       "causal 2·T²·2D (SDPA) a head, ×3 for fwd+bwd")
    for T in args.T:  # saved after every length, so a run cut short still leaves its results
        print(f"T = {T}")
        rows += rows_for(T, slope)
        path = bench.save_results("lightning", config, rows, path=args.out / "lightning.json")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    print(f"{'impl':46s} {'pass':8s} {'T':>6s} {'ms':>9s} {'TFLOP/s':>8s}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        print(f"{r['impl']:46s} {r['pass']:8s} {r['T']:6d} {ms:>9s} {tf:>8s}")
    for p in ("fwd", "fwd+bwd"):
        for T in args.T:
            ours = next((r["ms"] for r in rows if r["impl"].endswith("(minisparse)") and r["pass"] == p
                         and r["T"] == T), None)
            ref = next((r["ms"] for r in rows if r["impl"].startswith("fla chunk_simple_gla") and r["pass"] == p
                        and r["T"] == T), None)
            if ours and ref:
                print(f"{p:8s} T={T:6d}: minisparse / fla chunk_simple_gla time = {ours / ref:.2f}x (target <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
