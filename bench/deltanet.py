"""Chapter 5's benchmark: chunk_gated_delta_rule against fla's chunk_gated_delta_rule and SDPA causal attention.

    PYTHONPATH=. python bench/deltanet.py --out bench/results      # on a GPU machine, from the repository root
    python bench/deltanet.py --out /tmp --smoke                     # on a CPU: checks that the script runs

B = 2, H = HV = 16, K = V = 128, bf16, T from 1K to 64K by default; q and k L2-normalised inside (use_qk_l2norm),
beta uniform in [0, 1], gates g = -U(0, 1); forward, and forward + backward (o.backward(do)).
Rows: "minisparse, value checks off" is the op as it runs on CUDA by default (no value checks, as fla), forward and
forward + backward; "minisparse, value checks on" times its forward with runtime.set_value_checks(True), one
host sync a call. Each kernel runs the first configuration of its runtime.LAUNCH_TABLE row that fits (autotuning
stays off: the rows hold the measured best first).
Medians by minisparse.bench.median_ms (CUDA events). Writes DIR/deltanet.json (minisparse.bench format) and prints
a table last.
Target, reported and not asserted: forward time ≤ 1.0× fla's chunk_gated_delta_rule.
"""
from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench, runtime  # noqa: E402
from minisparse.deltanet import chunk_gated_delta_rule  # noqa: E402
from minisparse.testing import rel_rms  # noqa: E402

B, H, D = 2, 16, 128
TS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEVICE, DTYPE = "cuda", torch.bfloat16
SMOKE = False
OURS = "minisparse, value checks on"
UNCHECKED = "minisparse, value checks off"
FLA = "fla chunk_gated_delta_rule"


def timed(fn) -> float | None:
    return bench.timed(fn, smoke=SMOKE, warmup=10, rep=40)


def checked(fn):
    """fn with runtime.set_value_checks(True): the ranges of g, β, q and k read back to the host before launching."""
    def call(*args):
        previous = runtime.set_value_checks(True)
        try:
            return fn(*args)
        finally:
            runtime.set_value_checks(previous)
    return call


def impls():
    default = lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm=True)[0]  # noqa: E731
    out = {OURS: checked(default)}
    if not SMOKE:
        out[UNCHECKED] = default
    if not SMOKE:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr
            import fla.ops.common.chunk_o as fla_chunk_o

            if hasattr(fla_chunk_o, "TRITON_ABOVE_3_7_1") and not fla_chunk_o.TRITON_ABOVE_3_7_1:
                # fla refuses its gated backward on Hopper with triton 3.4 to 3.7.0 (its issue 640: wrong results);
                # lift the guard to time it anyway. Its gradients are timed here, never used.
                fla_chunk_o.TRITON_ABOVE_3_7_1 = True
                print("  fla: backward guard for triton < 3.7.1 lifted, for timing only")

            out[FLA] = lambda q, k, v, g, b: fla_gdr(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]
        except ImportError as err:
            print(f"  fla chunk_gated_delta_rule unavailable: {err}")
    out["SDPA causal"] = lambda q, k, v, g, b: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    return out


def rows_for(T: int) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, generator=gen, dtype=DTYPE) for _ in range(3))
    g = -torch.rand(B, T, H, device=DEVICE, generator=gen)  # float32 log decay in [-1, 0]
    beta = torch.rand(B, T, H, device=DEVICE, generator=gen)
    do = torch.randn(B, T, H, D, device=DEVICE, generator=gen, dtype=DTYPE)
    lin_flops = B * H * (T * 64 * 2 * D * 2 + 6 * T * D * D)  # rough: intra-chunk incl. UT, inter-chunk and states
    rows = []
    fns = impls()
    if FLA in fns and T <= 8192:
        try:
            with torch.no_grad():
                err = rel_rms(fns[OURS](q, k, v, g, beta).float(), fns[FLA](q, k, v, g, beta).float())
            print(f"  T={T}: minisparse vs fla relative RMS {err:.2e}")
        except Exception as e:  # noqa: BLE001
            print(f"  T={T}: no comparison with fla ({type(e).__name__}: {str(e)[:100]})")
    for name, fn in fns.items():
        flops = B * H * T * T * 2 * D if name.startswith("SDPA") else lin_flops
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]

        def fwd():
            with torch.no_grad():
                return fn(q, k, v, g, beta)

        def fwd_bwd():
            fn(*leaves).backward(do)

        for p, f, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.0)):
            if name == OURS and p != "fwd" and not SMOKE:
                continue  # the backward checks no values: the default row times it
            ms = timed(f) if not (SMOKE and name != OURS) else None
            rows.append(dict(impl=name, **{"pass": p}, T=T, B=B, H=H, D=D, ms=ms,
                             tflops=mult * flops / ms / 1e9 if ms else None))
            for x in leaves:
                x.grad = None
    return rows


def main(argv=None) -> int:
    ap = bench.script_parser("deltanet", __doc__)
    ap.add_argument("--T", type=int, nargs="*", default=list(TS), help="sequence lengths")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE, DTYPE, B, H, D
    if args.smoke:
        SMOKE, DEVICE, DTYPE, B, H, D = True, "cpu", torch.float32, 1, 2, 32
        args.T = [70]
    if not bench.start_script("deltanet", args.smoke):
        return 2
    rows = []
    config = dict(dtype=str(DTYPE).replace("torch.", ""), B=B, H=H, HV=H, K=D, V=D, T=args.T, chunk=64,
                  gates="-U(0, 1)", beta="U(0, 1)", scale="K ** -0.5",
                  l2norm="use_qk_l2norm (inside each op: ours as fp32 scalings inside its chunk kernels)",
                  note="fwd under no_grad; fwd+bwd = o.backward(do); tflops: a rough count of the chunk form, "
                       "or causal 2·T²·2D (SDPA) a head, ×3 for fwd+bwd")
    for T in args.T:  # saved after every length, so a run cut short still leaves its results
        print(f"T = {T}")
        rows += rows_for(T)
        path = bench.save_results("deltanet", config, rows, path=args.out / "deltanet.json")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    print(f"{'impl':40s} {'pass':8s} {'T':>6s} {'ms':>9s} {'TFLOP/s':>8s}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        print(f"{r['impl']:40s} {r['pass']:8s} {r['T']:6d} {ms:>9s} {tf:>8s}")
    for impl, p in ((UNCHECKED, "fwd"), (OURS, "fwd"), (UNCHECKED, "fwd+bwd")):
        for T in args.T:
            ours = next((r["ms"] for r in rows if r["impl"] == impl and r["pass"] == p and r["T"] == T), None)
            ref = next((r["ms"] for r in rows if r["impl"] == FLA and r["pass"] == p and r["T"] == T), None)
            if ours and ref:
                print(f"{p:8s} T={T:6d}: {impl} / fla time = {ours / ref:.2f}x (target <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
