"""Chapter 7's benchmark: NSA (all three branches, selection included) and MoBA against dense SDPA and fla.

    PYTHONPATH=. python bench/nsa.py --out bench/results        # on a GPU machine, from the repository root

NSA: B = 1, HQ = 64, H = 4, D = 128, blocks of 64, 16 blocks, window 512, bf16, T from 8K to 64K: forward (under
no_grad), forward + backward (o.backward(do)) and one decoding step (the last token against a cache of T tokens,
from Python and again as a CUDA graph: ", CUDA graph", captured once and replayed as serving engines run decoding;
pass "decode, B 16": the same step for a batch of 16 sequences, where dense decoding is bound by reading the caches)
for minisparse's parallel_nsa, fla's parallel_nsa (carry fla-core) and SDPA (causal, GQA). MoBA: HQ = H = 16, chunks
of 128, top-16, gate included, against SDPA and against flex_attention with a BlockMask of MoBA's density and no
gate (each 128-query block of a head reads its own chunk causally and 15 earlier chunks drawn at random: what a
compiled block-sparse kernel reaches at this sparsity). Medians by minisparse.bench.median_ms. Writes DIR/nsa.json
and prints a table and the ratios last. Targets, reported and not asserted: NSA forward ≥ 3× SDPA at 32K and ≥ 4× at
64K, forward + backward ≥ 2.5× at 64K, decoding ≥ 5× at 64K; MoBA ≥ 5× SDPA at 32K.
"""
from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository, without installing it

from minisparse import bench  # noqa: E402
from minisparse.attention import flash_attention  # noqa: E402
from minisparse.nsa import mean_pool, parallel_moba, parallel_nsa  # noqa: E402

B, HQ, H, D, BS, S, W = 1, 64, 4, 128, 64, 16, 512
B_DECODE = 16  # the batched decoding step's sequences
MOBA = dict(HQ=16, H=16, chunk=128, topk=16)
TS = (8192, 16384, 32768, 65536)
DEVICE, DTYPE = "cuda", torch.bfloat16
FLEX_MOBA = "flex_attention block-sparse (MoBA density, no gate)"
SMOKE = False  # --smoke: tiny shapes on a CPU in the interpreter: checks that the script runs


def timed(fn) -> float | None:
    return bench.timed(fn, smoke=SMOKE, warmup=5, rep=20)


def sdpa(q, k, v, causal=True):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=True).transpose(1, 2)


def moba_flex(q, k, v, g):
    """flex_attention over q, k, v [B, T, HQ, D] (HQ = H) with a BlockMask of MoBA's density and no gate: each
    query block of MOBA["chunk"] tokens of each head reads its own chunk causally and topk − 1 earlier chunks drawn at
    random (generator g). Compiled on a GPU, eager in a smoke run. Returns the call to time."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    hq, cs, topk = MOBA["HQ"], MOBA["chunk"], MOBA["topk"]
    T = q.shape[1]
    assert T % cs == 0, f"the BlockMask below takes whole chunks: T = {T}, chunk {cs}"
    n = T // cs
    past = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # [n, n] chunk j before chunk i
    scores = torch.rand(hq, n, n, device=q.device, generator=g).masked_fill(~past, -1.0)
    chosen = torch.zeros(hq, n, n, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, scores.topk(min(topk - 1, n), dim=-1).indices, True)
    own = torch.eye(n, dtype=torch.bool, device=q.device)  # [n, n] each query chunk's own
    chosen = (chosen & past) | own  # [hq, n, n], own chunk included

    def mask_mod(b, h, q_idx, kv_idx):  # the whole mask; the compiled kernel applies it in partial blocks only
        return (q_idx >= kv_idx) & chosen[h, q_idx // cs, kv_idx // cs]

    # the BlockMask from its block lists, not create_block_mask (which evaluates mask_mod at every (query, key)
    # pair: 128 GiB at 32K): per query chunk, the own chunk is a partial block, the chosen earlier ones full
    full = chosen & ~own
    full_num = full.sum(-1).to(torch.int32)[None]  # [1, hq, n]
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]  # chosen first
    own_num = torch.ones(1, hq, n, dtype=torch.int32, device=q.device)
    own_idx = own.argsort(dim=-1, descending=True, stable=True).to(torch.int32).expand(1, hq, n, n).contiguous()
    mask = BlockMask.from_kv_blocks(own_num, own_idx, full_num, full_idx, BLOCK_SIZE=cs, mask_mod=mask_mod)
    fn = flex_attention if SMOKE else torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return lambda: fn(qt, kt, vt, block_mask=mask)


def nsa_impls(gates, summaries):
    kw = dict(block_counts=S, block_size=BS, window_size=W)

    def ours(q, k, v, n):
        # decoding reads the cached block summaries (a cache of T / BS entries), as a server keeps them
        cached = dict(zip(("k_cmp", "v_cmp"), summaries)) if n < k.shape[1] else {}
        return parallel_nsa(q, k, v, *(g[:, -n:] for g in gates), **kw, **cached)

    out = {"parallel_nsa (minisparse)": ours,
           "SDPA causal": lambda q, k, v, n: sdpa(q, k, v, causal=n == k.shape[1])}
    try:
        from fla.ops.nsa import parallel_nsa as fla_nsa

        def fla(q, k, v, n):  # fla's window branch needs flash-attn: the window by chapter 1's kernel
            g_cmp, g_slc, g_swa = (g[:, -n:] for g in gates)
            o = fla_nsa(q, k, v, g_cmp, g_slc, None, block_counts=S, block_size=BS, window_size=0)
            return o + g_swa[..., None] * flash_attention(q, k, v, causal=True, window=W)

        out["fla parallel_nsa + window"] = fla
    except ImportError as err:
        print(f"  fla parallel_nsa unavailable: {err}")
    return out


def rows_for(T: int) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(T)
    make = lambda *s: torch.randn(*s, device=DEVICE, generator=g, dtype=DTYPE)  # noqa: E731
    q, k, v = make(B, T, HQ, D), make(B, T, H, D), make(B, T, H, D)
    gates = [torch.rand(B, T, HQ, device=DEVICE, generator=g, dtype=DTYPE) for _ in range(3)]
    do = make(B, T, HQ, D)
    summaries = (mean_pool(k, BS), mean_pool(v, BS))
    rows = []
    for name, fn in nsa_impls(gates, summaries).items():
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

        def fwd():
            with torch.no_grad():
                return fn(q, k, v, T)

        def fwd_bwd():
            fn(*leaves, T).backward(do)

        def decode():
            with torch.no_grad():
                return fn(q[:, -1:], k, v, 1)

        for p, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("decode", decode)):
            rows.append(dict(impl=name, **{"pass": p}, T=T, B=B, HQ=HQ, H=H, D=D, ms=timed(f)))
            for x in leaves:
                x.grad = None
        if not SMOKE:  # as a serving engine runs a decoding step: one CUDA graph, no host work between kernels
            rows.append(dict(impl=f"{name}, CUDA graph", **{"pass": "decode"}, T=T, B=B, HQ=HQ, H=H, D=D,
                             ms=timed(bench.graphed(decode))))
    rows += batched_decode_rows(T, g)
    hq, h = MOBA["HQ"], MOBA["H"]
    q, k, v = make(B, T, hq, D), make(B, T, h, D), make(B, T, h, D)
    for name, fn in (("parallel_moba (minisparse)", lambda: parallel_moba(q, k, v, MOBA["chunk"], MOBA["topk"])),
                     ("SDPA causal (MoBA shapes)", lambda: sdpa(q, k, v)),
                     (FLEX_MOBA, moba_flex(q, k, v, g))):
        with torch.no_grad():
            rows.append(dict(impl=name, **{"pass": "moba fwd"}, T=T, B=B, HQ=hq, H=h, D=D, ms=timed(fn)))
    return rows


def batched_decode_rows(T: int, g) -> list[dict]:
    """One decoding step of B_DECODE sequences against T cached tokens each: ours and SDPA's, from Python and as a
    CUDA graph (only the last token's query is made: a [B_DECODE, T, HQ, D] query would not fit at 64K)."""
    make = lambda *s: torch.randn(*s, device=DEVICE, generator=g, dtype=DTYPE)  # noqa: E731
    q, k, v = make(B_DECODE, 1, HQ, D), make(B_DECODE, T, H, D), make(B_DECODE, T, H, D)
    gates = [torch.rand(B_DECODE, 1, HQ, device=DEVICE, generator=g, dtype=DTYPE) for _ in range(3)]
    impls = nsa_impls(gates, (mean_pool(k, BS), mean_pool(v, BS)))
    rows = []
    for name in ("parallel_nsa (minisparse)", "SDPA causal"):
        def decode(fn=impls[name]):
            with torch.no_grad():
                return fn(q, k, v, 1)

        for label, f in ((name, decode), (f"{name}, CUDA graph", None if SMOKE else bench.graphed(decode))):
            if f is not None:
                rows.append(dict(impl=label, **{"pass": f"decode, B {B_DECODE}"}, T=T, B=B_DECODE, HQ=HQ, H=H, D=D,
                                 ms=timed(f)))
    return rows


def main(argv=None) -> int:
    ap = bench.script_parser("nsa", __doc__)
    ap.add_argument("--T", type=int, nargs="*", default=list(TS), help="sequence lengths")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE, DTYPE, B, HQ, H, D, BS, S, W, B_DECODE
    if args.smoke:
        SMOKE, DEVICE, DTYPE, B, HQ, H, D, BS, S, W = True, "cpu", torch.float32, 1, 4, 2, 16, 16, 3, 32
        B_DECODE = 2
        MOBA.update(HQ=2, H=2, chunk=16, topk=2)
        args.T = [80]
    if not bench.start_script("nsa", args.smoke):
        return 2
    config = dict(dtype=str(DTYPE).replace("torch.", ""), B=B, B_decode=B_DECODE, HQ=HQ, H=H, D=D, block_size=BS,
                  block_counts=S, window_size=W, T=args.T, moba=dict(MOBA),
                  note="fwd under no_grad; fwd+bwd = o.backward(do); decode = the last token against T cached "
                       "tokens (minisparse: with the cached block summaries, fla: as its API takes it); "
                       "', CUDA graph': the decoding step captured once and replayed; moba fwd includes the gate")
    rows = []
    for T in args.T:  # saved after every length, so a run cut short still leaves its results
        print(f"T = {T}")
        rows += rows_for(T)
        path = bench.save_results("nsa", config, rows, path=args.out / "nsa.json")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    print(f"{'impl':42s} {'pass':12s} {'T':>6s} {'ms':>9s}")
    for r in rows:
        print(f"{r['impl']:42s} {r['pass']:12s} {r['T']:6d} {r['ms'] if r['ms'] is None else round(r['ms'], 3)!s:>9s}")
    ms = {(r["impl"], r["pass"], r["T"]): r["ms"] for r in rows}
    for p, ref, ours in (("fwd", "SDPA causal", "parallel_nsa (minisparse)"),
                         ("fwd+bwd", "SDPA causal", "parallel_nsa (minisparse)"),
                         ("decode", "SDPA causal", "parallel_nsa (minisparse)"),
                         ("decode", "SDPA causal, CUDA graph", "parallel_nsa (minisparse), CUDA graph"),
                         (f"decode, B {B_DECODE}", "SDPA causal", "parallel_nsa (minisparse)"),
                         (f"decode, B {B_DECODE}", "SDPA causal, CUDA graph", "parallel_nsa (minisparse), CUDA graph"),
                         ("moba fwd", "SDPA causal (MoBA shapes)", "parallel_moba (minisparse)"),
                         ("moba fwd", "SDPA causal (MoBA shapes)", FLEX_MOBA)):
        for T in args.T:
            a, b = ms.get((ref, p, T)), ms.get((ours, p, T))
            if a and b:
                print(f"{p:12s} T={T:6d}: {ref} / {ours} = {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
