"""Chapter 8's Triton kernels: sparse attention over gathered tokens (GQA and MLA's latent form, prefill and
decoding, forward and every gradient) against an own masked-softmax reference and fla's naive_dsa; the lightning
indexer against fla's naive_dsa_indexer; the bad-input table of both ops.

On CPU the kernels run in Triton's interpreter in fp32 (tiny shapes); on CUDA the same tests run in bf16 and fp16.
"""
import pytest
import torch

import minisparse  # noqa: F401  before fla (see minisparse.runtime)
from minisparse import runtime
from minisparse.testing import TOLERANCES, assert_close

from draft import dsa_triton as DT  # the lead moves these into minisparse.dsa.triton

fla_dsa = pytest.importorskip("fla.ops.dsa.naive")
DEV = runtime.device()
DTYPES = [torch.float32] if DEV.type == "cpu" else [torch.bfloat16, torch.float16]


@pytest.fixture
def poisoned(monkeypatch):
    """Buffers the launchers allocate with torch.empty start as NaN: an element a kernel forgets shows up."""
    real = torch.empty

    def nan_empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)


# ------------------------------------------------------------------------------------------- references
def masked_softmax_attention(q, k, v, idx, scale):
    """An own reference: dense scores, −∞ except at the selected positions, softmax, a query with no key → 0.
    q [B, TQ, HQ, D], k [B, TK, H, D], v [B, TK, H, DV], idx [B, TQ, topk] (−1 padded) → [B, TQ, HQ, DV]."""
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = HQ // H
    keep = torch.zeros(B, TQ, TK + 1, dtype=torch.bool, device=q.device)
    keep.scatter_(2, idx.long().masked_fill(idx < 0, TK), True)  # column TK absorbs the padding
    s = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(G, 2)) * scale
    s = s.masked_fill(~keep[:, None, :, :TK], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, v.repeat_interleave(G, 2))


def random_indices(B, TQ, TK, topk, seed=0, device=DEV):
    """Distinct past positions a query (query i at TK − TQ + i), −1 padded; every third row loses a slot too."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, TQ, topk), -1, dtype=torch.int64)
    for b in range(B):
        for t in range(TQ):
            pos = TK - TQ + t
            n = min(topk, pos + 1)
            idx[b, t, :n] = torch.randperm(pos + 1, generator=g)[:n]
            idx[b, t] = idx[b, t, torch.randperm(topk, generator=g)]  # padding anywhere in the row
    idx[:, ::3, 0] = -1
    return idx.to(device)


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def against_reference(q, k, v, idx, dtype, what, scale=None, num_splits=None, latent=False):
    """The kernel in `dtype` vs the fp32 reference on the same rounded inputs: forward and every gradient."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    leaves = [x.to(DEV, dtype).detach().requires_grad_() for x in ((q, k) if latent else (q, k, v))]
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    if latent:
        DV = DT._split_dim(D)[0]
        o = DT._sparse_attention(*leaves, None, idx, scale, num_splits)
        ref = masked_softmax_attention(*ref_leaves, ref_leaves[1][..., :DV], idx, scale)
    else:
        o = DT._sparse_attention(*leaves, idx, scale, num_splits)
        ref = masked_softmax_attention(*ref_leaves, idx, scale)
    assert_close(f"{what}: o", ref, o.float(), fwd_tol)
    do = torch.randn(o.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    for n, want, got in zip("qkv", _grads(ref, ref_leaves, do), _grads(o, leaves, do.to(dtype))):
        assert_close(f"{what}: d{n}", want, got.float(), grad_tol)
    return ref


def make(B, T, H, D, seed, device=DEV):
    return torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(seed)).to(device)


# ------------------------------------------------------------------------------------------- sparse attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,TQ,TK,HQ,H,D,DV,topk", [
    (1, 37, 37, 2, 2, 16, 16, 20),  # group 1, Tq and topk not multiples of a tile, padding in early rows
    (2, 45, 45, 4, 2, 24, 40, 16),  # group 2, odd head dims (24 = 16 + 8 split, Dv 40)
    (1, 40, 40, 16, 1, 32, 32, 70),  # group 16, topk > T: every past key
    (1, 5, 60, 3, 1, 8, 8, 12),  # group 3 (padded rows), D < 16, the last 5 queries of 60 keys
    (2, 1, 80, 4, 2, 16, 16, 33),  # a decoding step
])
def test_sparse_kernel_matches_reference(poisoned, dtype, B, TQ, TK, HQ, H, D, DV, topk):
    q, k, v = make(B, TQ, HQ, D, 1), make(B, TK, H, D, 2), make(B, TK, H, DV, 3)
    idx = random_indices(B, TQ, TK, topk, seed=4)
    against_reference(q, k, v, idx, dtype, f"G={HQ // H}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,TQ,TK,HQ,topk,num_splits", [
    (1, 33, 33, 16, 20, None),  # prefill, 16 heads of one latent key
    (2, 3, 50, 20, 21, 1),  # 20 heads padded to a 32-row tile
    (2, 1, 90, 16, 64, 3),  # a decoding step split in 3, merged
    (1, 2, 70, 4, 40, 4),  # 4 heads, splits of 10 slots
])
def test_latent_form_matches_reference(poisoned, dtype, B, TQ, TK, HQ, topk, num_splits):
    """MLA's form scaled down: one key head of D = 72 = 64 + 8 dims, v = its first 64 dims (v=None)."""
    q, k = make(B, TQ, HQ, 72, 5), make(B, TK, 1, 72, 6)
    idx = random_indices(B, TQ, TK, topk, seed=7).to(torch.int32)
    against_reference(q, k, None, idx, dtype, f"latent HQ={HQ} splits={num_splits}", scale=0.2,
                      num_splits=num_splits, latent=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_narrow_tiles_several_head_blocks(poisoned, dtype):
    """Forced 16-head × 16-slot tiles: 40 heads in three head blocks (the last one half empty), 37 slots in three
    tiles; GQA and the latent form, forward and backward."""
    idx = random_indices(1, 9, 9, 37, seed=23)
    q, k, v = make(1, 9, 40, 16, 24), make(1, 9, 1, 16, 25), make(1, 9, 1, 24, 26)
    ql, kl = make(1, 9, 40, 72, 27), make(1, 9, 1, 72, 28)
    tiles = dict(BG=16, BN=16, num_warps=4, num_stages=1)
    with runtime.launch_config("dsa.sparse.fwd", **tiles), runtime.launch_config("dsa.sparse.bwd", **tiles), \
            runtime.launch_config("dsa.sparse.fwd.d512", **tiles), runtime.launch_config("dsa.sparse.bwd.d512", **tiles):
        against_reference(q, k, v, idx, dtype, "GQA, 16-row tiles")
        against_reference(ql, kl, None, idx, dtype, "latent, 16-row tiles", scale=0.2, latent=True)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_gqa_split_equals_one_split(num_splits):
    q, k, v = make(2, 1, 8, 16, 8), make(2, 64, 2, 16, 9), make(2, 64, 2, 24, 10)
    idx = random_indices(2, 1, 64, 50, seed=11)
    one = DT._sparse_attention(q, k, v, idx, None, 1)
    assert_close("split", one, DT._sparse_attention(q, k, v, idx, None, num_splits), 1e-5)


def test_matches_fla_naive_dsa_with_given_indices():
    T, HQ, H, D = 41, 4, 2, 16
    q, k, v = make(1, T, HQ, D, 12), make(1, T, H, D, 13), make(1, T, H, D, 14)
    idx = random_indices(1, T, T, 9, seed=15)
    want = fla_dsa.naive_dsa(q.float(), k.float(), v.float(), None, None, indices=idx)
    assert_close("naive_dsa", want, DT.sparse_attention_triton(q, k, v, idx).float(), 1e-4)


def test_topk_at_least_T_is_causal_dense_attention():
    T, HQ, H, D = 30, 4, 1, 16
    q, k, v = make(1, T, HQ, D, 16), make(1, T, H, D, 17), make(1, T, H, D, 18)
    idx = torch.arange(T, device=DEV).expand(1, T, T)
    idx = torch.where(idx <= torch.arange(T, device=DEV)[:, None], idx, -1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert_close("dense", dense.float(), DT.sparse_attention_triton(q, k, v, idx).float(), 1e-4)


def test_a_dropped_index_is_caught():
    """The comparison can fail: the kernel given one selected key fewer is not the reference."""
    q, k, v = make(1, 20, 2, 16, 19), make(1, 20, 1, 16, 20), make(1, 20, 1, 16, 21)
    idx = random_indices(1, 20, 20, 8, seed=22)
    fewer = idx.clone()
    fewer[:, 10:, 1] = -1
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close("o", masked_softmax_attention(q, k, v, idx, 0.25),
                     DT.sparse_attention_triton(q, k, v, fewer, 0.25), 1e-4)


# ------------------------------------------------------------------------------------------- lightning indexer
def indexer_inputs(B, TQ, TK, HI, DI, seed, device=DEV):
    """Head 0 of every query and every key positive: each score has a positive term, so no ReLU ties at 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, TQ, HI, DI, generator=g)
    q[:, :, 0] = q[:, :, 0].abs()
    k = torch.randn(B, TK, DI, generator=g).abs()
    w = torch.rand(B, TQ, HI, generator=g) + 0.1
    return q.to(device), k.to(device), w.to(device)


def exact_scores(q, k, w, scale):
    """I [B, TQ, TK] in fp64 from the given inputs, −∞ after each query's position."""
    TQ, TK = q.shape[1], k.shape[1]
    x = torch.einsum("btjd,bsd->btjs", q.double(), k.double()) * scale
    score = (x.relu() * w.double()[..., None]).sum(2)
    pos = torch.arange(TK - TQ, TK, device=q.device)[:, None]
    return score.masked_fill(torch.arange(TK, device=q.device)[None, :] > pos, float("-inf"))


def assert_same_selection(got, want, score, tol):
    """Equal as sets of positions, or — where rounding reorders near-equal scores — equal as multisets of
    scores within tol; −1 padding in the same number."""
    assert got.shape == want.shape and got.dtype == torch.int64
    assert torch.equal((got < 0).sum(-1), (want < 0).sum(-1)), "different padding"
    srt = lambda x: x.masked_fill(x < 0, 10**9).sort(-1).values  # noqa: E731
    if torch.equal(srt(got), srt(want)):
        return
    pick = lambda i: score.gather(-1, i.clamp(min=0)).masked_fill(i < 0, 0).sort(-1).values  # noqa: E731
    gap = (pick(got) - pick(want)).abs().max().item()
    assert gap <= tol, f"selections differ beyond ties: score gap {gap:.3g} > {tol:.3g}"


@pytest.mark.parametrize("B,T,HI,DI,topk,chunk_budget", [
    (2, 70, 3, 24, 16, None),  # odd heads and dims, T not a multiple of a tile
    (1, 150, 4, 32, 40, 64 * 150),  # three chunks of 64 queries
    (1, 50, 2, 16, 64, None),  # topk > T: every past key, −1 after
])
def test_indexer_selects_what_naive_dsa_indexer_selects(monkeypatch, B, T, HI, DI, topk, chunk_budget):
    if chunk_budget is not None:
        monkeypatch.setattr(DT, "_SCORE_BUDGET", chunk_budget)
    dtype = torch.float32 if DEV.type == "cpu" else torch.bfloat16
    q, k, w = (x.to(dtype) for x in indexer_inputs(B, T, T, HI, DI, seed=30))
    got = DT.lightning_indexer(q, k, w, topk)
    want = fla_dsa.naive_dsa_indexer(q, k, w, topk, activation="relu")
    score = exact_scores(q, k, w, DI ** -0.5)
    assert_same_selection(got, want, score, 1e-9 if dtype == torch.float32 else 2e-2)


def test_indexer_decoding_rows_equal_the_prefill_rows():
    """Tq < Tk: the last queries against the whole key sequence select what the same queries select in prefill."""
    q, k, w = indexer_inputs(2, 90, 90, 4, 16, seed=31)
    full = DT.lightning_indexer(q, k, w, 24)
    srt = lambda x: x.masked_fill(x < 0, 10**9).sort(-1).values  # noqa: E731
    for TQ in (1, 3):
        part = DT.lightning_indexer(q[:, -TQ:], k, w[:, -TQ:], 24)
        assert torch.equal(srt(part), srt(full[:, -TQ:]))


@pytest.mark.parametrize("key_split", [64, 100])
def test_indexer_key_splits_write_every_score(poisoned, key_split):
    """The decoding layout: one query against 300 keys cut into ranges of key_split (a GPU plans them)."""
    q, k, w = indexer_inputs(2, 1, 300, 4, 16, seed=33)
    whole = DT._score_chunk(q, k, w, 0, 1, 0.25, key_split=300)
    split = DT._score_chunk(q, k, w, 0, 1, 0.25, key_split=key_split)
    assert not torch.isnan(split).any() and torch.equal(torch.isinf(whole), torch.isinf(split))
    assert_close("split", whole.nan_to_num(0, 0, 0), split.nan_to_num(0, 0, 0), 1e-6)
    assert_close("scores", exact_scores(q, k, w, 0.25).float(), split, 1e-5)


def test_indexer_scores_match_the_definition():
    q, k, w = indexer_inputs(1, 40, 40, 3, 20, seed=32)
    w = w - 0.6  # negative weights too
    got = DT._score_chunk(q, k, w, 8, 40, 0.3)  # queries 8 … 39
    want = exact_scores(q, k, w, 0.3)[:, 8:40]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close("scores", want.nan_to_num(0, 0, 0).float(), got.nan_to_num(0, 0, 0), 1e-5)


# ------------------------------------------------------------------------------------------- bad input
def _qkvi(**over):
    """A valid call's arguments (TQ = TK = 6, HQ = 4, H = 2, D = 16), with entries replaced by `over`."""
    args = dict(q=make(1, 6, 4, 16, 40), k=make(1, 6, 2, 16, 41), v=make(1, 6, 2, 16, 42),
                indices=random_indices(1, 6, 6, 3, seed=43))
    args.update(over)
    return args


SPARSE_BAD_INPUT = [
    ("index past the keys", lambda: _qkvi(indices=torch.tensor([[[0, 1, 9]] * 6], device=DEV)), ValueError,
     "key position <= the query's position"),
    ("future index", lambda: _qkvi(indices=torch.tensor([[[0, 1, -1]]] * 1, device=DEV).expand(1, 6, 3)
                                   .clone().index_fill_(1, torch.tensor([0], device=DEV), 1)),
     ValueError, "query 0 sits at 0"),
    ("index below -1", lambda: _qkvi(indices=torch.full((1, 6, 3), -2, device=DEV)), ValueError, "-1 \\(padding\\)"),
    ("repeated index", lambda: _qkvi(indices=torch.tensor([[[0, 0, -1]]] * 6, device=DEV).view(1, 6, 3)),
     ValueError, "twice"),
    ("float indices", lambda: _qkvi(indices=torch.zeros(1, 6, 3, device=DEV)), TypeError, "int32, int64"),
    ("indices of another length", lambda: _qkvi(indices=torch.zeros(1, 5, 3, dtype=torch.long, device=DEV)),
     ValueError, "indices must be \\[B, Tq, topk\\]"),
    ("heads do not divide", lambda: _qkvi(k=make(1, 6, 3, 16, 44), v=make(1, 6, 3, 16, 45)), ValueError,
     "H \\(k's heads\\) = 3 must divide HQ"),
    ("latent sizes differ", lambda: _qkvi(k=make(1, 6, 2, 24, 46)), ValueError, "D = 16"),
    ("v of other heads", lambda: _qkvi(v=make(1, 6, 1, 16, 47)), ValueError, "v must be \\[B, Tk, H, Dv\\]"),
    ("fewer keys than queries", lambda: _qkvi(k=make(1, 4, 2, 16, 48), v=make(1, 4, 2, 16, 49)), ValueError,
     "at least Tq"),
    ("mixed dtypes", lambda: _qkvi(k=make(1, 6, 2, 16, 50).double()), TypeError, "share one dtype"),
    ("k on another device", lambda: _qkvi(k=torch.empty(1, 6, 2, 16, device="meta")), ValueError, "one device"),
    ("q 3-D", lambda: _qkvi(q=make(1, 6, 4, 16, 51)[0]), ValueError, "4-D"),
]


@pytest.mark.parametrize("what,make_args,error,message", SPARSE_BAD_INPUT, ids=[r[0] for r in SPARSE_BAD_INPUT])
def test_sparse_attention_bad_input(what, make_args, error, message):
    args = make_args()
    previous = runtime.set_value_checks(True)  # index values are checked on CUDA only when asked
    try:
        with pytest.raises(error, match=message):
            DT.sparse_attention_triton(**args)
    finally:
        runtime.set_value_checks(previous)


def _indexer_args(**over):
    q, k, w = indexer_inputs(1, 6, 6, 2, 16, seed=60)
    args = dict(q_idx=q, k_idx=k, w_idx=w, topk=4)
    args.update(over)
    return args


INDEXER_BAD_INPUT = [
    ("topk 0", lambda: _indexer_args(topk=0), ValueError, "topk must be an int > 0"),
    ("k_idx of other dims", lambda: _indexer_args(k_idx=torch.randn(1, 6, 8, device=DEV)), ValueError, "DI = 16"),
    ("w_idx of other heads", lambda: _indexer_args(w_idx=torch.randn(1, 6, 3, device=DEV)), ValueError,
     "w_idx must be \\[B, Tq, HI\\]"),
    ("k_idx 4-D", lambda: _indexer_args(k_idx=torch.randn(1, 6, 1, 16, device=DEV)), ValueError, "3-D"),
    ("mixed dtypes", lambda: _indexer_args(k_idx=torch.randn(1, 6, 16, device=DEV).double()), TypeError,
     "share one dtype"),
    ("NaN weights", lambda: _indexer_args(w_idx=torch.full((1, 6, 2), float("nan"), device=DEV)), ValueError,
     "NaN"),
]
if DEV.type == "cpu":
    FP8 = torch.float8_e4m3fn
    INDEXER_BAD_INPUT.append(("fp8 on CPU", lambda: _indexer_args(
        q_idx=torch.zeros(1, 6, 2, 16, dtype=FP8), k_idx=torch.zeros(1, 6, 16, dtype=FP8)),
        TypeError, "FP8 tensor cores"))


@pytest.mark.parametrize("what,make_args,error,message", INDEXER_BAD_INPUT, ids=[r[0] for r in INDEXER_BAD_INPUT])
def test_indexer_bad_input(what, make_args, error, message):
    previous = runtime.set_value_checks(True)
    try:
        with pytest.raises(error, match=message):
            DT.lightning_indexer(**make_args())
    finally:
        runtime.set_value_checks(previous)


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores: sm_89 and newer")
def test_fp8_indexer_keeps_most_of_the_bf16_selection():
    q, k, w = indexer_inputs(1, 1024, 1024, 8, 64, seed=70)
    want = DT.lightning_indexer(q.bfloat16(), k.bfloat16(), w, 128)
    got = DT.lightning_indexer(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), w, 128)
    overlap = DT.selection_overlap(got, want)
    assert overlap > 0.7, overlap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the MLA-sized tiles")
def test_latent_576_on_gpu():
    """DeepSeek-V3.2's latent form at reading size: D = 576, Dv = 512, 128 heads, B2 decoding and short prefill."""
    for TQ, TK, topk in ((1, 700, 256), (64, 64, 40)):
        q, k = make(2, TQ, 128, 576, 80), make(2, TK, 1, 576, 81)
        idx = random_indices(2, TQ, TK, topk, seed=82)
        against_reference(q * 0.3, k * 0.3, None, idx, torch.bfloat16, f"576 TQ={TQ}", scale=192 ** -0.5,
                          latent=True)
