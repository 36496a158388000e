"""Chapter 6's benchmark: chunk_kda against fla's chunk_kda, and the accuracy of both against the fp32 recurrence.

    PYTHONPATH=. python bench/kda.py --out bench/results      # on a GPU machine, from the repository root
    python bench/kda.py --out /tmp --smoke                     # on a CPU: checks that the script runs

B = 2, H = HV = 16, K = V = 128, bf16, T = 8K by default, and B = 1 at T = 8K, 16K, 32K, 64K (--long); q and k
L2-normalised inside (use_qk_l2norm), beta uniform in [0, 1], gates g = -U(0, 1) per channel; forward, and forward +
backward (o.backward(do)). "minisparse, value checks off" is the op as it runs on CUDA by default (as fla: no host
sync). Each kernel runs the first configuration of its runtime.LAUNCH_TABLE row that fits. Accuracy: the relative
RMS error of each bf16 output against naive_recurrent_kda in fp32 on the same inputs, at the first length (rows with
pass "accuracy", in the column rel_rms). Medians by minisparse.bench.median_ms (CUDA events). Writes DIR/kda.json
(minisparse.bench format) and prints a table last.
Targets, reported and not asserted: forward ≤ 1.0× fla's time and forward + backward ≤ 1.0× fla's time.
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench  # noqa: E402
from minisparse.kda import chunk_kda, naive_recurrent_kda  # noqa: E402
from minisparse.testing import rel_rms  # noqa: E402

H, D = 16, 128
RUNS = [(2, 8192)]
LONG = [(1, 8192), (1, 16384), (1, 32768), (1, 65536)]
DEVICE, DTYPE = "cuda", torch.bfloat16
SMOKE = False
OURS = "minisparse, value checks off"
FLA = "fla chunk_kda"


def timed(fn) -> float | None:
    return bench.timed(fn, smoke=SMOKE, warmup=10, rep=40)


def impls():
    out = {OURS: lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, use_qk_l2norm=True)[0]}
    if not SMOKE:
        try:
            from fla.ops.kda import chunk_kda as fla_kda

            out[FLA] = lambda q, k, v, g, b: fla_kda(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]
        except ImportError as err:
            print(f"  fla chunk_kda unavailable: {err}")
    return out


def inputs(B, T):
    gen = torch.Generator(device=DEVICE).manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, generator=gen, dtype=DTYPE) for _ in range(3))
    g = -torch.rand(B, T, H, D, device=DEVICE, generator=gen)  # float32 log decay per channel in [-1, 0]
    beta = torch.rand(B, T, H, device=DEVICE, generator=gen)
    do = torch.randn(B, T, H, D, device=DEVICE, generator=gen, dtype=DTYPE)
    return q, k, v, g, beta, do


def accuracy_rows(B, T) -> list[dict]:
    q, k, v, g, beta, _ = inputs(B, T)
    with torch.no_grad():
        ref = naive_recurrent_kda(q.float(), k.float(), v.float(), g, beta, use_qk_l2norm=True)[0]
        rows = []
        for name, fn in impls().items():
            try:
                err = rel_rms(fn(q, k, v, g, beta).float(), ref)
            except Exception as e:  # noqa: BLE001
                print(f"  {name}: no accuracy ({type(e).__name__}: {str(e)[:100]})")
                err = None
            print(f"  B={B} T={T}: {name} vs the fp32 recurrence, relative RMS {err}")
            rows.append(dict(impl=name, **{"pass": "accuracy"}, B=B, T=T, H=H, D=D, ms=None, rel_rms=err))
    return rows


def rows_for(B, T) -> list[dict]:
    q, k, v, g, beta, do = inputs(B, T)
    rows = []
    for name, fn in impls().items():
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]

        def fwd():
            with torch.no_grad():
                return fn(q, k, v, g, beta)

        def fwd_bwd():
            fn(*leaves).backward(do)

        for p, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            t0 = time.perf_counter()
            ms = timed(f)
            print(f"  {name:30s} {p:8s} {ms} ms  ({time.perf_counter() - t0:.0f} s with compiling)")
            rows.append(dict(impl=name, **{"pass": p}, B=B, T=T, H=H, D=D, ms=ms))
            for x in leaves:
                x.grad = None
    return rows


def main(argv=None) -> int:
    ap = bench.script_parser("kda", __doc__)
    ap.add_argument("--long", action="store_true", help="also B = 1 at 8K … 64K")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE, DTYPE, H, D
    runs = RUNS + (LONG if args.long else [])
    if args.smoke:
        SMOKE, DEVICE, DTYPE, H, D = True, "cpu", torch.float32, 2, 32
        runs = [(1, 70)]
    if not bench.start_script("kda", args.smoke):
        return 2
    config = dict(dtype=str(DTYPE).replace("torch.", ""), runs=runs, H=H, HV=H, K=D, V=D, chunk=64,
                  gates="-U(0, 1) per channel", beta="U(0, 1)", scale="K ** -0.5", l2norm="use_qk_l2norm",
                  note="fwd under no_grad; fwd+bwd = o.backward(do); accuracy: relative RMS against "
                       "naive_recurrent_kda in fp32 at the first run's shape")
    rows = accuracy_rows(*runs[0])
    for B, T in runs:  # saved after every run, so a run cut short still leaves its results
        print(f"B = {B}, T = {T}")
        rows += rows_for(B, T)
        path = bench.save_results("kda", config, rows, path=args.out / "kda.json")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    print(f"{'impl':32s} {'pass':9s} {'B':>2s} {'T':>6s} {'ms':>9s} {'rel RMS':>9s}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        err = f"{r['rel_rms']:.2e}" if r.get("rel_rms") is not None else ""
        print(f"{r['impl']:32s} {r['pass']:9s} {r['B']:2d} {r['T']:6d} {ms:>9s} {err:>9s}")
    for p in ("fwd", "fwd+bwd"):
        for B, T in runs:
            ours, ref = (next((r["ms"] for r in rows if r["impl"] == n and r["pass"] == p and r["B"] == B
                               and r["T"] == T), None) for n in (OURS, FLA))
            if ours and ref:
                print(f"{p:8s} B={B} T={T:6d}: minisparse / fla time = {ours / ref:.2f}x (target <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
