"""Chapter 8: DeepSeek Sparse Attention — the naive ops against fla's references, SDPA and chapter 3's absorbed MLA,
the bad-input table (shared by the naive ops and, once it exists, minisparse.dsa.triton), the layers against
transformers' DeepSeek-V3.2 / GLM-5 modules, decoding = prefill, the cost model, the exercise checkers."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import minisparse  # noqa: F401  before fla (see minisparse.runtime)
from minisparse import dsa as D
from minisparse.attention import attention_ref
from minisparse.mla import mla_attention_absorbed
from minisparse.testing import ExerciseError, assert_close, make_qkv

HAVE_TRITON_OPS = importlib.util.find_spec("minisparse.dsa.triton") is not None
try:
    import transformers
    from transformers import DeepseekV32Config, GlmMoeDsaConfig
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf_glm
except ImportError:
    transformers = None
HF = pytest.mark.skipif(transformers is None, reason="the oracles are transformers' DeepSeek-V3.2 / GLM-5 modules")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _indexer_inputs(B, TQ, TK, HI, DI, seed=0):
    g = _gen(seed)
    q_idx = torch.randn(B, TK, HI, DI, generator=g)[:, TK - TQ:]
    return q_idx, torch.randn(B, TK, DI, generator=g), torch.randn(B, TQ, HI, generator=g)


def _chosen(scores, indices):
    """The scores of a selection, sorted (-inf for padding): equal for selections that differ only in ties."""
    idx = indices.long()
    return scores.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, -math.inf).sort(-1).values


# ------------------------------------------------------------------------------------------- naive vs fla
fla_naive = pytest.importorskip("fla.ops.dsa.naive")


@pytest.mark.parametrize("B,T,HI,DI,topk", [(2, 37, 4, 8, 8), (1, 64, 2, 16, 64), (2, 50, 8, 32, 5), (1, 9, 1, 8, 20)])
def test_select_topk_matches_fla_indexer(B, T, HI, DI, topk):
    q_idx, k_idx, w_idx = _indexer_inputs(B, T, T, HI, DI, seed=T)
    scores = D.indexer_scores(q_idx, k_idx, w_idx)
    ours = D.select_topk(scores, topk)
    theirs = fla_naive.naive_dsa_indexer(q_idx, k_idx, w_idx, topk, activation="relu")
    assert ours.shape == theirs.shape == (B, T, topk) and ours.dtype == torch.int64
    assert torch.equal(_chosen(scores, ours), _chosen(scores, theirs))
    assert torch.equal((ours < 0).sum(-1), (theirs < 0).sum(-1))  # the same padding


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,topk", [(37, 4, 2, 16, 16, 8), (50, 8, 1, 32, 16, 13), (20, 2, 2, 8, 24, 64)])
def test_dsa_matches_fla_naive_dsa(T, HQ, H, Dk, Dv, topk):
    q, k, v = make_qkv(2, T, HQ, Dk, HKV=H, Dv=Dv, seed=3)
    q_idx, k_idx, w_idx = _indexer_inputs(2, T, T, 4, 16, seed=4)
    o, idx = D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk, return_indices=True, backend="naive")
    want = fla_naive.naive_dsa(q, k, v, None, None, None, indices=idx)
    assert_close("dsa vs fla (same indices)", want, o, 1e-5)
    assert_close("dsa vs fla (its own indexer)", fla_naive.naive_dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk), o, 1e-5)


# ------------------------------------------------------------------------------------------- limits and forms
def test_topk_at_least_T_is_causal_attention_and_sdpa():
    q, k, v = make_qkv(2, 33, 6, 16, HKV=3, seed=5)
    q_idx, k_idx, w_idx = _indexer_inputs(2, 33, 33, 3, 8)
    o = D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=40, backend="naive")
    assert_close("attention_ref", attention_ref(q, k, v), o, 1e-5)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    assert_close("SDPA", sdpa, o, 1e-5)


def test_latent_form_is_absorbed_mla():
    g = _gen(6)
    ql, qr = torch.randn(2, 15, 4, 32, generator=g), torch.randn(2, 15, 4, 8, generator=g)
    c, kr = torch.randn(2, 15, 32, generator=g), torch.randn(2, 15, 8, generator=g)
    k = torch.cat([c, kr], -1)[:, :, None]
    every = D.select_topk(D.causal_mask(15, 15).float().log().expand(2, 15, 15), 15)
    o = D.sparse_attention(torch.cat([ql, qr], -1), k, k[..., :32], every, 0.3, backend="naive")
    assert_close("latent form", mla_attention_absorbed(ql, qr, c, kr, 0.3), o, 1e-5)
    assert_close("gather = mask", o, D.gather_attention(torch.cat([ql, qr], -1), k, k[..., :32], every, 0.3), 1e-6)


def test_queries_last_positions_equal_the_prefill_rows():
    """A decoding step (Tq = 1) and a chunk (Tq = 4) are the last rows of the prefill."""
    q, k, v = make_qkv(1, 30, 4, 16, HKV=2, seed=7)
    q_idx, k_idx, w_idx = _indexer_inputs(1, 30, 30, 4, 8, seed=8)
    full, idx = D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=6, return_indices=True, backend="naive")
    full_scores = D.indexer_scores(q_idx, k_idx, w_idx)
    for TQ in (1, 4):
        s = D.indexer_scores(q_idx[:, -TQ:], k_idx, w_idx[:, -TQ:])
        assert torch.equal(s, full_scores[:, -TQ:])
        o = D.sparse_attention(q[:, -TQ:], k, v, idx[:, -TQ:], backend="naive")
        assert_close(f"Tq = {TQ}", full[:, -TQ:], o, 1e-6)


def test_padding_is_honoured_and_a_query_with_nothing_gets_zero():
    q, k, v = make_qkv(1, 10, 2, 8, HKV=1, seed=9)
    idx = torch.full((1, 10, 3), -1)
    idx[0, 5] = torch.tensor([2, -1, 4])
    o = D.sparse_attention(q, k, v, idx, backend="naive")
    assert torch.equal(o[0, :5], torch.zeros_like(o[0, :5]))
    p = torch.softmax(torch.einsum("hd,sd->hs", q[0, 5], k[0, [2, 4], 0]) * 8 ** -0.5, -1)
    assert_close("two keys", torch.einsum("hs,sd->hd", p, v[0, [2, 4], 0]), o[0, 5], 1e-6)
    assert torch.equal(D.select_topk(torch.tensor([[[1.0, -math.inf, -math.inf]]]), 2), torch.tensor([[[0, -1]]]))


def test_gradients_match_dense_attention_when_everything_is_selected():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 12, 4, 8, HKV=2, seed=10))
    every = D.select_topk(D.causal_mask(12, 12).float().log().expand(1, 12, 12), 12)
    do = torch.randn(1, 12, 4, 8, generator=_gen(1))
    got = torch.autograd.grad((D.sparse_attention(q, k, v, every, backend="naive") * do).sum(), (q, k, v))
    want = torch.autograd.grad((attention_ref(q, k, v) * do).sum(), (q, k, v))
    for name, a, b in zip("qkv", want, got):
        assert_close(f"d{name}", a, b, 1e-5)


# ------------------------------------------------------------------------------------------- bad input
def _ok():
    q, k, v = make_qkv(1, 8, 4, 8, HKV=2, seed=0)
    idx = D.select_topk(D.indexer_scores(*_indexer_inputs(1, 8, 8, 2, 8)), 3)
    return dict(q=q, k=k, v=v, indices=idx)


def _with(**change):
    def build():
        a = _ok()
        for key, f in change.items():
            a[key] = f(a)
        return a
    return build


def _idx(fill):
    def f(a):
        idx = a["indices"].clone()
        fill(idx)
        return idx
    return f


BAD_ATTENTION = [
    ("future index", _with(indices=_idx(lambda i: i.__setitem__((0, 2, 0), 5))), ValueError, "in the future|<= the query"),
    ("index past TK", _with(indices=_idx(lambda i: i.__setitem__((0, 7, 0), 8))), ValueError, "out of range|<= the query"),
    ("index below -1", _with(indices=_idx(lambda i: i.__setitem__((0, 7, 0), -2))), ValueError, "out of range|padding"),
    ("repeated index", _with(indices=_idx(lambda i: i[0, 7].copy_(torch.tensor([3, 3, 1])))), ValueError, "twice"),
    ("float indices", _with(indices=lambda a: a["indices"].float()), TypeError, "int32"),
    ("indices of another length", _with(indices=lambda a: a["indices"][:, :5]), ValueError, "indices must be"),
    ("per-head indices", _with(indices=lambda a: a["indices"][:, :, None]), ValueError, "3-D"),
    ("HQ not a multiple of H", _with(q=lambda a: a["q"][:, :, :3]), ValueError, "must divide"),
    ("head dims differ", _with(k=lambda a: a["k"][..., :4]), ValueError, "k must be"),
    ("v with other heads", _with(v=lambda a: a["v"][:, :, :1]), ValueError, "v must be"),
    ("more queries than keys", _with(k=lambda a: a["k"][:, :5], v=lambda a: a["v"][:, :5]), ValueError, "TK >= TQ|at least Tq"),
    ("mixed dtypes", _with(v=lambda a: a["v"].double()), TypeError, "share one dtype"),
    ("latent query row of 512, key row of 576", lambda: dict(q=torch.randn(1, 4, 8, 512), k=torch.randn(1, 4, 1, 576),
                                                              v=torch.randn(1, 4, 1, 512),
                                                              indices=torch.zeros(1, 4, 1, dtype=torch.long)),
     ValueError, "k must be"),
]
OPS = ["naive"] + (["triton"] if HAVE_TRITON_OPS else [])


def _sparse_op(kind):
    if kind == "naive":
        return lambda q, k, v, indices: D.sparse_attention(q, k, v, indices, backend="naive")
    from minisparse.dsa.triton import sparse_attention_triton
    return sparse_attention_triton


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("name,build,exc,match", BAD_ATTENTION, ids=[row[0] for row in BAD_ATTENTION])
def test_sparse_attention_rejects_bad_input(kind, name, build, exc, match):
    with pytest.raises(exc, match=match):
        _sparse_op(kind)(**build())


BAD_INDEXER = [
    ("topk 0", dict(topk=0), ValueError, "topk"),
    ("topk float", dict(topk=2.0), ValueError, "topk"),
    ("k_idx of another dim", dict(k_idx=torch.randn(1, 8, 4)), ValueError, "k_idx must be"),
    ("k_idx per head", dict(k_idx=torch.randn(1, 8, 2, 8)), ValueError, "3-D"),
    ("k_idx shorter than q_idx", dict(k_idx=torch.randn(1, 5, 8)), ValueError, "TK >= TQ|Tk ≥ Tq"),
    ("w_idx of other heads", dict(w_idx=torch.randn(1, 8, 3)), ValueError, "w_idx must be"),
]


def _indexer_op(kind):
    if kind == "naive":
        return lambda q_idx, k_idx, w_idx, topk: D.select_topk(D.indexer_scores(q_idx, k_idx, w_idx), topk)
    from minisparse.dsa.triton import lightning_indexer
    return lightning_indexer


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("name,change,exc,match", BAD_INDEXER, ids=[row[0] for row in BAD_INDEXER])
def test_indexer_rejects_bad_input(kind, name, change, exc, match):
    q_idx, k_idx, w_idx = _indexer_inputs(1, 8, 8, 2, 8)
    args = {**dict(q_idx=q_idx, k_idx=k_idx, w_idx=w_idx, topk=3), **change}
    with pytest.raises(exc, match=match):
        _indexer_op(kind)(**args)


def test_dsa_rejects_bad_topk_and_backend():
    a = _ok()
    q_idx, k_idx, w_idx = _indexer_inputs(1, 8, 8, 2, 8)
    with pytest.raises(ValueError, match="topk"):
        D.dsa(a["q"], a["k"], a["v"], q_idx, k_idx, w_idx, topk=-1)
    with pytest.raises(ValueError, match="backend"):
        D.sparse_attention(a["q"], a["k"], a["v"], a["indices"], backend="cuda")
    if not HAVE_TRITON_OPS:
        with pytest.raises(RuntimeError, match="minisparse.dsa.triton"):
            D.sparse_attention(a["q"], a["k"], a["v"], a["indices"], backend="triton")


# ------------------------------------------------------------------------------------------- the indexer's loss
def test_indexer_kl_loss_is_zero_at_the_target_and_positive_elsewhere():
    q, k, _ = make_qkv(2, 16, 4, 8, seed=11)
    p = torch.softmax((torch.einsum("bthd,bshd->bths", q, k) * 8 ** -0.5).masked_fill(
        ~D.causal_mask(16, 16)[:, None], -math.inf), -1)  # [B, T, H, T]
    target = p.sum(2) / 4
    exact = target.log()  # softmax(log p) = p
    assert D.indexer_kl_loss(p, exact).abs() < 1e-5
    other = D.indexer_scores(*_indexer_inputs(2, 16, 16, 2, 8))
    assert D.indexer_kl_loss(p, other) > 0.05
    idx = D.select_topk(other, 4)  # the sparse phase: restricted to the selection, still 0 at the target
    assert D.indexer_kl_loss(p, exact, idx).abs() < 1e-5
    assert 0 < D.attention_recall(p, idx).mean() < 1
    assert torch.allclose(D.attention_recall(p, D.select_topk(exact, 16)), torch.ones(2, 16))


# ------------------------------------------------------------------------------------------- layers vs transformers
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, index_n_heads=16, index_head_dim=16,
            index_topk=6, num_hidden_layers=1, attn_implementation="eager")


def _init(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return module.eval()


def _causal(T):
    return torch.full((T, T), -math.inf).triu(1)[None]


@HF
@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_indexer_from_hf_gives_the_same_selection(family):
    if family == "deepseek_v32":
        cfg, mod = DeepseekV32Config(**TINY), hf_v32
        hf, rotary = _init(mod.DeepseekV32Indexer(cfg, 0), 1), mod.DeepseekV32RotaryEmbedding(cfg)
    else:
        cfg, mod = GlmMoeDsaConfig(**TINY), hf_glm
        hf, rotary = _init(mod.GlmMoeDsaIndexer(cfg, 0), 1), mod.GlmMoeDsaRotaryEmbedding(cfg)
    ours = D.LightningIndexer.from_hf(hf)
    assert ours.rope_interleave == (family == "glm_moe_dsa")
    g = _gen(2)
    x, q_lat = torch.randn(2, 13, 64, generator=g), torch.randn(2, 13, 24, generator=g)
    pe = rotary(x, torch.arange(13)[None])
    with torch.no_grad():
        theirs = hf(x, q_lat, pe, _causal(13), None).long()  # [B, T, topk], future slots for early queries
        idx, scores = ours(x, q_lat)
        idx_pe, scores_pe = ours(x, q_lat, position_embeddings=pe)
    assert_close("scores from (cos, sin)", scores.masked_fill(scores.isinf(), 0),
                 scores_pe.masked_fill(scores_pe.isinf(), 0), 1e-6)
    future = theirs > torch.arange(13)[None, :, None]
    assert torch.equal(_chosen(scores, idx), _chosen(scores, theirs.masked_fill(future, -1)))


@HF
@pytest.mark.parametrize("seed,T", [(0, 14), (1, 9), (2, 20)])
def test_dsattention_from_hf_gives_the_same_outputs(seed, T):
    cfg = DeepseekV32Config(**TINY)
    hf = _init(hf_v32.DeepseekV32Attention(cfg, 0), seed)
    rotary = hf_v32.DeepseekV32RotaryEmbedding(cfg)
    layer = D.DSAttention.from_hf(hf, backend="naive")
    x = torch.randn(2, T, 64, generator=_gen(seed + 10))
    with torch.no_grad():
        ref = hf(x, rotary(x, torch.arange(T)[None]), _causal(T)[:, None])[0]
        out = layer(x)
    assert_close("DSAttention vs DeepseekV32Attention", ref, out, 1e-5)


@HF
def test_token_by_token_decoding_equals_prefill():
    hf = _init(hf_v32.DeepseekV32Attention(DeepseekV32Config(**TINY), 0), 3)
    layer = D.DSAttention.from_hf(hf, backend="naive")
    x = torch.randn(1, 12, 64, generator=_gen(4))
    with torch.no_grad():
        full, idx, _ = layer(x, return_indices=True)
        cache = layer.new_cache(1, 12)
        first = layer(x[:, :5], cache)  # a prefill of 5, then one token at a time
        rest = [layer(x[:, t:t + 1], cache, return_indices=True) for t in range(5, 12)]
    steps = torch.cat([first] + [o for o, _, _ in rest], dim=1)
    assert_close("decode = prefill", full, steps, 1e-5)
    assert torch.equal(torch.cat([i for _, i, _ in rest], 1).sort(-1).values, idx[:, 5:].sort(-1).values)
    assert cache.index_keys.shape == (1, 12, 16) and len(cache) == 12


def test_dsattention_needs_a_query_latent_and_sparse_false_is_dense_mla():
    with pytest.raises(ValueError, match="q_lora_rank"):
        D.DSAttention(32, 2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=2)
    torch.manual_seed(0)
    layer = D.DSAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=2, backend="naive")
    x = torch.randn(1, 10, 32, generator=_gen(5))
    with torch.no_grad():
        dense = super(D.DSAttention, layer).forward(x)  # chapter 3's MLA, expanded form
        assert_close("sparse=False = MLA", dense, layer(x, sparse=False), 1e-5)
        assert (layer(x) - dense).abs().max() > 1e-3  # top-2 of 10 is not dense


# ------------------------------------------------------------------------------------------- cost model
def test_cost_model_numbers():
    if transformers is not None:
        assert D.dsa_shapes(DeepseekV32Config()) == D.V32
    at = D.dsa_cost(131071)
    assert at["dense"] == 2 * 128 * 131072 * 320 and at["sparse"] == 2 * 128 * 2048 * 1088
    assert abs(at["ratio"] - 0.253) < 0.001
    seq = torch.arange(131072).numpy()
    saved = 1 - D.model_prefill_flops(seq).sum() / D.model_prefill_flops(seq, dsa=False).sum()
    assert 0.54 < saved < 0.60  # the survey's "about 50 %"
    assert D.dsa_cost(131071, "decode", index_fp8=True)["indexer"] == 131072 * 132
    assert D.dsa_cost(100000, heads=16)["ratio"] > 1  # a bf16 indexer never pays off at 16 heads
    with pytest.raises(ValueError, match="mode"):
        D.dsa_cost(10, "training")


# ------------------------------------------------------------------------------------------- exercise checkers
def test_break_even_checker():
    def solution(H, HI, DI, k, fp8):
        idx = HI * DI / (2 if fp8 else 1)
        return math.inf if H * 320 <= idx else k * H * 1088 / (H * 320 - idx)

    D.check_break_even(solution)
    with pytest.raises(ExerciseError, match="expected"):  # forgets that FP8 halves the indexer
        D.check_break_even(lambda H, HI, DI, k, fp8: solution(H, HI, DI, k, False))
    with pytest.raises(ExerciseError, match="expected"):  # a negative c instead of "never"
        D.check_break_even(lambda H, HI, DI, k, fp8: k * H * 1088 / (H * 320 - HI * DI / (2 if fp8 else 1)))
    with pytest.raises(ExerciseError, match="not implemented"):
        D.check_break_even(lambda *a: (_ for _ in ()).throw(NotImplementedError))


def test_scores_fix_checker():
    D.check_scores_fix(D.indexer_scores)
    with pytest.raises(ExerciseError, match="case 2"):  # the planted bug: fine in prefill, wrong when decoding
        D.check_scores_fix(D.indexer_scores_with_a_bug)


def _score_tile_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def right(q_ptr, k_ptr, w_ptr, s_ptr, t, n0, TK, scale, HI, DI, BH: tl.constexpr, BD: tl.constexpr,
              BN: tl.constexpr):
        q, w = D.load_index_queries(q_ptr, w_ptr, HI, DI, BH, BD)
        n, d = n0 + tl.arange(0, BN), tl.arange(0, BD)
        real = (n <= t) & (n < TK)
        k = tl.load(k_ptr + n[:, None] * DI + d[None, :], mask=real[:, None] & (d[None, :] < DI), other=0.0)
        dots = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where(real, tl.sum(w[:, None] * tl.maximum(dots, 0.0), axis=0), float("-inf"))
        tl.store(s_ptr + tl.arange(0, BN), s)

    @triton.jit
    def no_relu(q_ptr, k_ptr, w_ptr, s_ptr, t, n0, TK, scale, HI, DI, BH: tl.constexpr, BD: tl.constexpr,
                BN: tl.constexpr):
        q, w = D.load_index_queries(q_ptr, w_ptr, HI, DI, BH, BD)
        n, d = n0 + tl.arange(0, BN), tl.arange(0, BD)
        real = (n <= t) & (n < TK)
        k = tl.load(k_ptr + n[:, None] * DI + d[None, :], mask=real[:, None] & (d[None, :] < DI), other=0.0)
        dots = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where(real, tl.sum(w[:, None] * dots, axis=0), float("-inf"))
        tl.store(s_ptr + tl.arange(0, BN), s)

    @triton.jit
    def strict_mask(q_ptr, k_ptr, w_ptr, s_ptr, t, n0, TK, scale, HI, DI, BH: tl.constexpr, BD: tl.constexpr,
                    BN: tl.constexpr):
        q, w = D.load_index_queries(q_ptr, w_ptr, HI, DI, BH, BD)
        n, d = n0 + tl.arange(0, BN), tl.arange(0, BD)
        real = (n < t) & (n < TK)  # off by one: the query's own key is hidden
        k = tl.load(k_ptr + n[:, None] * DI + d[None, :], mask=real[:, None] & (d[None, :] < DI), other=0.0)
        dots = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where(real, tl.sum(w[:, None] * tl.maximum(dots, 0.0), axis=0), float("-inf"))
        tl.store(s_ptr + tl.arange(0, BN), s)

    return right, no_relu, strict_mask


def test_index_score_tile_checker():
    right, no_relu, strict_mask = _score_tile_kernels()
    D.check_index_score_tile(right)
    with pytest.raises(ExerciseError, match="ReLU"):
        D.check_index_score_tile(no_relu)
    with pytest.raises(ExerciseError, match="key 37"):
        D.check_index_score_tile(strict_mask)
