"""Chapter 8's benchmark: DeepSeek sparse attention (lightning indexer + top-k + sparse MLA) against dense attention.

    PYTHONPATH=. python bench/dsa.py --out bench/results          # on a GPU machine, from the repository root
    python bench/dsa.py --out /tmp --smoke                         # on a CPU: checks that the script runs

DeepSeek-V3.2's attention shapes, B = 1, bf16: 128 query heads; MLA's absorbed (latent MQA) form for DSA — queries
and one key row of 512 + 64 dims a token, values = the 512 latent dims, softmax scale 192 ** -0.5; the indexer with
64 heads × 128 dims and top-k 2,048. Prefill forward at T = 8K, 16K, 32K, 64K (--long adds 128K):
  - "dense SDPA": causal attention of the same layer in the expanded form (q/k 192, v 128, 128 heads), PyTorch SDPA;
  - "DSA prefill": lightning_indexer (scores + top-k) then sparse_attention_triton, and each part on its own:
    "indexer scores" (the score kernel over every chunk, no top-k), "indexer + top-k", "sparse attention";
    "torch.topk, one chunk": the top-k of the widest chunk's [chunk, T] scores alone;
  - the same with an FP8 (e4m3) indexer on sm_89+ GPUs, and "fp8 overlap": the fraction of the bf16 indexer's
    selection that the FP8 one keeps (last 512 queries), in the column `overlap`.
Decoding step at 64K context, B = 16: "mla_decode" (chapter 3, the whole cache) vs "DSA decode step" (indexer over the
cache + top-k + sparse attention over 2,048 tokens) and "DSA decode attention" (the sparse attention alone); each
again as a CUDA graph (", CUDA graph": captured once and replayed, as serving engines run decoding, so the time is
the kernels' without the host work between them).
Inputs are random (a worst case for locality: real selections cluster). Each kernel runs the first configuration of
its runtime.LAUNCH_TABLE row that fits (--autotune: the fastest of the row). Short calls: medians by
minisparse.bench.median_ms; calls over 20 ms (dense attention at 64K takes about 0.3 s): the median of 3.
Writes DIR/dsa.json and prints a table and the ratios last. Targets, reported and not asserted: DSA prefill
≥ 2× dense at 64K and ≥ 3× at 128K; with the FP8 indexer ≥ 2.5× at 64K; the decoding step ≥ 5× mla_decode.
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench, runtime  # noqa: E402
from minisparse.mla import mla_decode  # noqa: E402

from minisparse.dsa.triton import (_chunk_rows, _score_chunk, _topk_chunk, lightning_indexer,  # noqa: E402
                                   selection_overlap, sparse_attention_triton)

B, HQ, DC, DR, HI, DI, TOPK = 1, 128, 512, 64, 64, 128, 2048
DENSE_QK, DENSE_V = 192, 128
SCALE = DENSE_QK ** -0.5  # MLA's softmax scale: (qk_nope + qk_rope) ** -0.5
DECODE = dict(B=16, T=65536)
TS, LONG = (8192, 16384, 32768, 65536), 131072
DEVICE, DTYPE = "cuda", torch.bfloat16
SMOKE = False  # --smoke: tiny fp32 shapes on a CPU in the interpreter: checks that the script runs


def timed(fn) -> float | None:
    try:
        fn()  # compile outside the timing
        if SMOKE:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        once = start.elapsed_time(end)
        if once < 20:
            return bench.median_ms(fn, warmup=25, rep=200)
        times = []
        for _ in range(3):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    except Exception as err:  # noqa: BLE001 - a failing impl is recorded, the others still run
        print(f"  failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return None


def make(*shape, g, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, generator=g, dtype=torch.float32) * scale).to(DTYPE)


def attend(q, kv, idx):
    """DSA's sparse attention in MLA's latent form: v = the key rows' first DC dims, a view."""
    return sparse_attention_triton(q, kv, kv[..., :DC], idx, SCALE)


def dense(q, k, v):
    """Causal SDPA in the expanded form; v padded to q's head dim where the backend wants equal dims."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=SCALE)
    except RuntimeError:
        vt = F.pad(vt, (0, q.shape[-1] - v.shape[-1]))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=SCALE)[..., :v.shape[-1]]


def dense_ms(T, g) -> float | None:
    """The dense baseline's time; its inputs (q/k 192, v 128, 128 heads: 8 GB at 64K) are freed on return."""
    q, k, v = make(B, T, HQ, DENSE_QK, g=g), make(B, T, HQ, DENSE_QK, g=g), make(B, T, HQ, DENSE_V, g=g)
    with torch.no_grad():
        return timed(lambda: dense(q, k, v))


def scores_only(q_idx, k_idx, w):
    """The indexer's score kernel over every chunk, without the top-k."""
    T = q_idx.shape[1]
    chunk = _chunk_rows(q_idx.shape[0], T, k_idx.shape[1])
    for c0 in range(0, T, chunk):
        if min(T, c0 + chunk) > TOPK:
            _score_chunk(q_idx, k_idx, w, c0, min(T, c0 + chunk), DI ** -0.5)


def fp8_ok() -> bool:
    return (not SMOKE and hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability() >= (8, 9))


def prefill_rows(T: int) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(T)
    rows = []
    cfg = dict(T=T, B=B, HQ=HQ)
    rows.append(dict(impl="dense SDPA (expanded, 128 heads)", **{"pass": "prefill fwd"}, **cfg, ms=dense_ms(T, g)))
    if DEVICE == "cuda":  # the dense inputs are gone: room for DSA's
        torch.cuda.empty_cache()
    # DSA, absorbed form
    q, kv = make(B, T, HQ, DC + DR, g=g, scale=0.5), make(B, T, 1, DC + DR, g=g, scale=0.5)
    q_idx, k_idx = make(B, T, HI, DI, g=g), make(B, T, DI, g=g)
    w = make(B, T, HI, g=g, scale=HI ** -0.5)
    with torch.no_grad():
        idx = lightning_indexer(q_idx, k_idx, w, TOPK)
        kinds = [("bf16", q_idx, k_idx)]
        if fp8_ok():
            kinds.append(("fp8", q_idx.to(torch.float8_e4m3fn), k_idx.to(torch.float8_e4m3fn)))
        for kind, qi, ki in kinds:
            tag = "" if kind == "bf16" else ", FP8 indexer"
            rows.append(dict(impl=f"indexer scores{tag}", **{"pass": "prefill fwd"}, **cfg,
                             ms=timed(lambda: scores_only(qi, ki, w))))
            rows.append(dict(impl=f"indexer + top-k{tag}", **{"pass": "prefill fwd"}, **cfg,
                             ms=timed(lambda: lightning_indexer(qi, ki, w, TOPK))))
            rows.append(dict(impl=f"DSA prefill{tag}", **{"pass": "prefill fwd"}, **cfg,
                             ms=timed(lambda: attend(q, kv, lightning_indexer(qi, ki, w, TOPK)))))
            if kind == "fp8":
                tail = min(T, 512)
                got = lightning_indexer(qi[:, -tail:], ki, w[:, -tail:], TOPK)
                rows.append(dict(impl="fp8 overlap", **{"pass": "prefill fwd"}, **cfg, ms=None,
                                 overlap=selection_overlap(got, idx[:, -tail:])))
                print(f"  FP8 indexer keeps {rows[-1]['overlap']:.4f} of the bf16 selection (last {tail} queries)")
        rows.append(dict(impl="sparse attention", **{"pass": "prefill fwd"}, **cfg,
                         ms=timed(lambda: attend(q, kv, idx))))
        c0 = max(0, (T - 1) // _chunk_rows(B, T, T) * _chunk_rows(B, T, T))  # the widest (last) chunk
        if T > TOPK:
            s = _score_chunk(q_idx, k_idx, w, c0, T, DI ** -0.5)
            rows.append(dict(impl="torch.topk, one chunk", **{"pass": "prefill fwd"}, **cfg, chunk=T - c0,
                             ms=timed(lambda: _topk_chunk(s, TOPK, c0))))
            del s
    return rows


def decode_rows() -> list[dict]:
    Bd, T = DECODE["B"], DECODE["T"]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    cfg = dict(T=T, B=Bd, HQ=HQ)
    q, kv = make(Bd, 1, HQ, DC + DR, g=g, scale=0.5), make(Bd, T, 1, DC + DR, g=g, scale=0.5)
    q_idx, k_idx = make(Bd, 1, HI, DI, g=g), make(Bd, T, DI, g=g)
    w = make(Bd, 1, HI, g=g, scale=HI ** -0.5)
    rows = []
    with torch.no_grad():
        idx = lightning_indexer(q_idx, k_idx, w, TOPK)
        latent, rope = kv[:, :, 0, :DC], kv[:, :, 0, DC:]  # the same cache, as chapter 3 reads it
        steps = {"mla_decode (full cache)": lambda: mla_decode(q[..., :DC], q[..., DC:], latent, rope, SCALE),
                 "DSA decode attention": lambda: attend(q, kv, idx),
                 "DSA decode indexer + top-k": lambda: lightning_indexer(q_idx, k_idx, w, TOPK),
                 "DSA decode step": lambda: attend(q, kv, lightning_indexer(q_idx, k_idx, w, TOPK))}
        if fp8_ok():
            qi, ki = q_idx.to(torch.float8_e4m3fn), k_idx.to(torch.float8_e4m3fn)
            steps["DSA decode step, FP8 indexer"] = lambda: attend(q, kv, lightning_indexer(qi, ki, w, TOPK))
        for name, step in steps.items():
            rows.append(dict(impl=name, **{"pass": "decode"}, **cfg, ms=timed(step)))
        if not SMOKE:  # as a serving engine runs a decoding step: one CUDA graph, no host work between kernels
            for name, step in steps.items():
                rows.append(dict(impl=f"{name}, CUDA graph", **{"pass": "decode"}, **cfg, ms=timed(bench.graphed(step))))
    return rows


def main(argv=None) -> int:
    ap = bench.script_parser("dsa", __doc__)
    ap.add_argument("--T", type=int, nargs="*", default=list(TS), help="prefill lengths")
    ap.add_argument("--long", action="store_true", help="add T = 128K")
    ap.add_argument("--autotune", action="store_true", help="time each kernel's launch-table row, keep the fastest")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE, DTYPE, HQ, DC, DR, HI, DI, TOPK
    if args.smoke:
        SMOKE, DEVICE, DTYPE = True, "cpu", torch.float32
        HQ, DC, DR, HI, DI, TOPK = 4, 32, 8, 2, 16, 24
        DECODE.update(B=2, T=96)
        args.T = [80]
    if not bench.start_script("dsa", args.smoke):
        return 2
    runtime.set_autotune(args.autotune and not args.smoke)
    if args.long and LONG not in args.T:
        args.T.append(LONG)
    config = dict(dtype=str(DTYPE).replace("torch.", ""), B=B, HQ=HQ, latent=DC, rope=DR, indexer_heads=HI,
                  indexer_dim=DI, topk=TOPK, dense_qk=DENSE_QK, dense_v=DENSE_V, T=args.T, decode=dict(DECODE),
                  note="forward only, under no_grad; random inputs; DSA = lightning_indexer + sparse_attention_triton "
                       "(latent form, v = kv[..., :512], a view); dense = causal SDPA in the expanded form")
    rows = []
    path = None
    for T in args.T:  # saved after every length, so a run cut short still leaves its results
        print(f"T = {T}")
        rows += prefill_rows(T)
        path = bench.save_results("dsa", config, rows, path=args.out / "dsa.json")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"decode, B = {DECODE['B']}, context {DECODE['T']}")
    rows += decode_rows()
    path = bench.save_results("dsa", config, rows, path=args.out / "dsa.json")
    print(f"\nwrote {path}")
    print(f"{'impl':36s} {'pass':12s} {'T':>7s} {'ms':>10s}")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        print(f"{r['impl']:36s} {r['pass']:12s} {r['T']:7d} {ms:>10s}")
    ms = {(r["impl"], r["T"]): r["ms"] for r in rows}
    for T in args.T:
        d = ms.get(("dense SDPA (expanded, 128 heads)", T))
        for ours in ("DSA prefill", "DSA prefill, FP8 indexer"):
            o = ms.get((ours, T))
            if d and o:
                parts = [f"{p} {ms[(p, T)]:.1f} ms" for p in ("indexer scores", "indexer + top-k", "sparse attention")
                         if ms.get((p, T))]
                print(f"prefill T={T:6d}: dense / {ours} = {d / o:.2f}x   ({', '.join(parts)})")
    if runtime.autotuning():  # the winners, for runtime.LAUNCH_TABLE
        for (_, kernel, *_), tuned in runtime._tuned.items():
            if kernel.startswith("dsa.") and tuned.best_config is not None:
                print(f"autotuned {kernel}: {tuned.best_config}")
    T = DECODE["T"]
    for graph in ("", ", CUDA graph"):
        ref = ms.get((f"mla_decode (full cache){graph}", T))
        for ours in ("DSA decode step", "DSA decode step, FP8 indexer", "DSA decode attention"):
            o = ms.get((ours + graph, T))
            if ref and o:
                print(f"decode B={DECODE['B']} T={T}: mla_decode / {ours}{graph} = {ref / o:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
