"""Chapter 8: DeepSeek Sparse Attention — the naive ops against fla's references, SDPA and chapter 3's absorbed MLA,
the bad-input tables (shared by the naive ops and minisparse.dsa.triton), the layers against transformers'
DeepSeek-V3.2 / GLM-5 modules, decoding = prefill, the cost model, the exercise checkers; the Triton kernels (sparse
attention over gathered tokens, GQA and MLA's latent form, prefill and decoding, forward and every gradient; the
lightning indexer) against an own masked-softmax reference and fla's naive_dsa / naive_dsa_indexer.

On CPU the kernels run in Triton's interpreter in fp32 (tiny shapes); on CUDA the same tests run in bf16 and fp16.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import minisparse  # before fla (see minisparse.runtime)
from minisparse import dsa as D
from minisparse import runtime
from minisparse.attention import attention_ref
from minisparse.dsa import triton as DT
from minisparse.mla import mla_attention_absorbed
from minisparse.testing import TOLERANCES, ExerciseError, assert_close, make_qkv

DEV = runtime.device()
DTYPES = [torch.float32] if DEV.type == "cpu" else [torch.bfloat16, torch.float16]
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
FLA_NAIVE = "fla.ops.dsa.naive"  # the references of conftest's fla_naive fixture


@pytest.mark.parametrize("B,T,HI,DI,topk", [(2, 37, 4, 8, 8), (1, 64, 2, 16, 64), (2, 50, 8, 32, 5), (1, 9, 1, 8, 20)])
def test_select_topk_matches_fla_indexer(B, T, HI, DI, topk, fla_naive):
    q_idx, k_idx, w_idx = _indexer_inputs(B, T, T, HI, DI, seed=T)
    scores = D.indexer_scores(q_idx, k_idx, w_idx)
    ours = D.select_topk(scores, topk)
    theirs = fla_naive.naive_dsa_indexer(q_idx, k_idx, w_idx, topk, activation="relu")
    assert ours.shape == theirs.shape == (B, T, topk) and ours.dtype == torch.int64
    assert torch.equal(_chosen(scores, ours), _chosen(scores, theirs))
    assert torch.equal((ours < 0).sum(-1), (theirs < 0).sum(-1))  # the same padding


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,topk", [(37, 4, 2, 16, 16, 8), (50, 8, 1, 32, 16, 13), (20, 2, 2, 8, 24, 64)])
def test_dsa_matches_fla_naive_dsa(T, HQ, H, Dk, Dv, topk, fla_naive):
    q, k, v = make_qkv(2, T, HQ, Dk, HKV=H, Dv=Dv, seed=3)
    q_idx, k_idx, w_idx = _indexer_inputs(2, T, T, 4, 16, seed=4)
    o, idx = D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=topk, return_indices=True, backend="naive")
    want = fla_naive.naive_dsa(q, k, v, None, None, None, indices=idx)
    assert_close("dsa vs fla (same indices)", want, o, 1e-5)
    # fla's own indexer picks the same keys up to ties (ReLU makes exact zeros; ours gives a tie to the earlier key)
    theirs = fla_naive.naive_dsa_indexer(q_idx, k_idx, w_idx, topk=topk, activation="relu")
    scores = D.indexer_scores(q_idx, k_idx, w_idx)
    assert torch.equal(_chosen(scores, theirs), _chosen(scores, idx))


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
    ("future index", _with(indices=_idx(lambda i: i.__setitem__((0, 2, 0), 5))), ValueError,
     "in the future: query 2 sits at position 2"),
    ("index past TK", _with(indices=_idx(lambda i: i.__setitem__((0, 7, 0), 8))), ValueError, "out of range"),
    ("index below -1", _with(indices=_idx(lambda i: i.__setitem__((0, 7, 0), -2))), ValueError, "out of range"),
    ("repeated index", _with(indices=_idx(lambda i: i[0, 7].copy_(torch.tensor([3, 3, 1])))), ValueError, "twice"),
    ("float indices", _with(indices=lambda a: a["indices"].float()), TypeError, "int32"),
    ("indices of another length", _with(indices=lambda a: a["indices"][:, :5]), ValueError, "indices must be"),
    ("per-head indices", _with(indices=lambda a: a["indices"][:, :, None]), ValueError, "3-D"),
    ("HQ not a multiple of H", _with(q=lambda a: a["q"][:, :, :3]), ValueError, "must divide"),
    ("head dims differ", _with(k=lambda a: a["k"][..., :4]), ValueError, "k must be"),
    ("v with other heads", _with(v=lambda a: a["v"][:, :, :1]), ValueError, "v must be"),
    ("more queries than keys", _with(k=lambda a: a["k"][:, :5], v=lambda a: a["v"][:, :5]), ValueError, "TK >= TQ"),
    ("mixed dtypes", _with(v=lambda a: a["v"].double()), TypeError, "share one dtype"),
    ("k on another device", _with(k=lambda a: torch.empty(a["k"].shape, device="meta")), ValueError, "one device"),
    ("q 3-D", _with(q=lambda a: a["q"][0]), ValueError, "4-D"),
    ("latent query row of 512, key row of 576", lambda: dict(q=torch.randn(1, 4, 8, 512), k=torch.randn(1, 4, 1, 576),
                                                              v=torch.randn(1, 4, 1, 512),
                                                              indices=torch.zeros(1, 4, 1, dtype=torch.long)),
     ValueError, "k must be"),
]
OPS = ["naive", "triton"]


def _on(kind, args):
    """The Triton op's arguments on its device (a CPU one stays there: the interpreter)."""
    if kind == "naive":
        return args
    return {n: a.to(DEV) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for n, a in args.items()}


def _sparse_op(kind):
    if kind == "naive":
        return lambda q, k, v, indices: D.sparse_attention(q, k, v, indices, backend="naive")
    return lambda q, k, v, indices: D.sparse_attention(q, k, v, indices, backend="triton")


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("name,build,exc,match", BAD_ATTENTION, ids=[row[0] for row in BAD_ATTENTION])
def test_sparse_attention_rejects_bad_input(value_checks, kind, name, build, exc, match):
    with pytest.raises(exc, match=match) as err:
        _sparse_op(kind)(**_on(kind, build()))
    assert str(err.value).startswith("sparse_attention: ")  # the op called, not the kernel it dispatched to


BAD_INDEXER = [
    ("topk 0", dict(topk=0), ValueError, "topk"),
    ("topk float", dict(topk=2.0), ValueError, "topk"),
    ("k_idx of another dim", dict(k_idx=torch.randn(1, 8, 4)), ValueError, "k_idx must be"),
    ("k_idx per head", dict(k_idx=torch.randn(1, 8, 2, 8)), ValueError, "3-D"),
    ("k_idx shorter than q_idx", dict(k_idx=torch.randn(1, 5, 8)), ValueError, "TK >= TQ"),
    ("w_idx of other heads", dict(w_idx=torch.randn(1, 8, 3)), ValueError, "w_idx must be"),
    ("mixed dtypes", dict(k_idx=torch.randn(1, 8, 8).double()), TypeError, "share one dtype"),
    ("NaN weights", dict(w_idx=torch.full((1, 8, 2), math.nan)), ValueError, "NaN"),
]


def _indexer_op(kind):
    if kind == "naive":
        return lambda q_idx, k_idx, w_idx, topk: D.select_topk(D.indexer_scores(q_idx, k_idx, w_idx), topk)
    return DT.lightning_indexer


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("name,change,exc,match", BAD_INDEXER, ids=[row[0] for row in BAD_INDEXER])
def test_indexer_rejects_bad_input(value_checks, kind, name, change, exc, match):
    q_idx, k_idx, w_idx = _indexer_inputs(1, 8, 8, 2, 8)
    args = {**dict(q_idx=q_idx, k_idx=k_idx, w_idx=w_idx, topk=3), **change}
    with pytest.raises(exc, match=match):
        _indexer_op(kind)(**_on(kind, args))


FP8 = getattr(torch, "float8_e4m3fn", None)
KERNEL_ONLY = [  # what only a kernel needs: on-chip head dims, FP8 tensor cores, the interpreter's dtypes
    ("GQA head dim over 256", lambda: DT.sparse_attention_triton(
        *make_qkv(1, 4, 4, 272, HKV=2, device=DEV), torch.zeros(1, 4, 1, dtype=torch.long, device=DEV)),
     ValueError, "D must be <= 256"),
    ("indexer head dim over 256", lambda: DT.lightning_indexer(
        *_on("triton", dict(zip("qkw", _indexer_inputs(1, 4, 4, 2, 272)))).values(), 2), ValueError,
     "DI must be <= 256"),
]
if DEV.type == "cpu":
    KERNEL_ONLY += [
        ("bf16 in the interpreter", lambda: DT.sparse_attention_triton(
            *(t.bfloat16() for t in make_qkv(1, 4, 2, 16)), torch.zeros(1, 4, 1, dtype=torch.long)), TypeError,
         "interpreter"),
        ("fp8 on CPU", lambda: DT.lightning_indexer(torch.zeros(1, 6, 2, 16, dtype=FP8),
                                                   torch.zeros(1, 6, 16, dtype=FP8), torch.ones(1, 6, 2), 4),
         TypeError, "FP8 tensor cores"),
    ]


@pytest.mark.parametrize("name,call,exc,match", KERNEL_ONLY, ids=[row[0] for row in KERNEL_ONLY])
def test_kernels_reject_what_only_a_kernel_cannot_do(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()



def _probs_and_indices():
    p = torch.softmax(torch.randn(1, 6, 2, 6), -1)  # [B, TQ, H, TK]
    return p, D.select_topk(torch.randn(1, 6, 6).tril().masked_fill(torch.ones(6, 6).triu(1).bool(), -math.inf), 2)


HELPERS_BAD = [  # the training and measuring helpers of sections 8.3 and 8.7
    ("kl: p_attn of rank 3", lambda p, i: D.indexer_kl_loss(p[:, :, 0], torch.zeros(1, 6, 6)), "p_attn must be 4-D"),
    ("kl: scores of another batch", lambda p, i: D.indexer_kl_loss(p, torch.zeros(2, 6, 6)), "scores must be"),
    ("kl: float indices", lambda p, i: D.indexer_kl_loss(p, torch.zeros(1, 6, 6), i.float()), "int32 or int64"),
    ("recall: index past the end", lambda p, i: D.attention_recall(p, i.masked_fill(i == 0, 100)), "out of range"),
    ("recall: p_attn of rank 3", lambda p, i: D.attention_recall(p[:, :, 0], i), "p_attn must be 4-D"),
    ("overlap: other rows", lambda p, i: D.selection_overlap(i, i[:, :3]), "share B, T"),
    ("overlap: below -1", lambda p, i: D.selection_overlap(i - 5, i), ">= -1"),
    ("scores: NaN weights", lambda p, i: D.indexer_scores(torch.randn(1, 6, 2, 4), torch.randn(1, 6, 4),
                                                          torch.full((1, 6, 2), math.nan)), "w_idx contains NaN"),
]


@pytest.mark.parametrize("name,call,match", HELPERS_BAD, ids=[row[0] for row in HELPERS_BAD])
def test_helpers_reject_bad_input(name, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(*_probs_and_indices())


def test_helpers_on_edge_input():
    """A query without attention mass recalls 0 (not NaN); tops of different k compare."""
    p, idx = _probs_and_indices()
    assert torch.equal(D.attention_recall(torch.zeros_like(p), idx), torch.zeros(1, 6))
    assert D.selection_overlap(idx, idx[..., :1]) == 1.0


def test_lightning_indexer_checks_its_query_latent():
    torch.manual_seed(0)
    layer = D.DSAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=2, backend="naive")
    x, ql = torch.randn(1, 5, 32), torch.randn(1, 5, 16)
    layer.indexer(x, ql)  # fine
    for bad, match in ((ql[0], "3-D"), (ql[:, :4], "q_latent must be"), (ql[..., :8], "q_latent must be"),
                       (ql.double(), "one dtype")):
        with pytest.raises((ValueError, TypeError), match=match):
            layer.indexer(x, bad)

def test_dsa_rejects_bad_topk_and_backend():
    a = _ok()
    q_idx, k_idx, w_idx = _indexer_inputs(1, 8, 8, 2, 8)
    with pytest.raises(ValueError, match="topk"):
        D.dsa(a["q"], a["k"], a["v"], q_idx, k_idx, w_idx, topk=-1)
    with pytest.raises(ValueError, match="backend"):
        D.sparse_attention(a["q"], a["k"], a["v"], a["indices"], backend="cuda")


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


def test_indexer_kl_loss_of_no_queries_is_zero_and_differentiable():
    scores = torch.zeros(2, 0, 5, requires_grad=True)
    loss = D.indexer_kl_loss(torch.zeros(2, 0, 3, 5), scores)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert scores.grad.shape == (2, 0, 5)


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
def test_from_hf_names_the_module_it_expects():
    """Each loader given another module fails at once, naming the module it expects: DSAttention.from_hf of
    DeepSeek-V3's MLA was an AttributeError ('DeepseekV3Config' object has no attribute 'index_n_heads'), the
    indexer's loader of the attention another ('... has no attribute k_norm'), and MLA.from_hf of V3.2's attention a
    state-dict error about unexpected indexer keys."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds
    from minisparse.mla import MLA

    v3 = hf_ds.DeepseekV3Attention(DeepseekV3Config(**{k: v for k, v in TINY.items() if not k.startswith("index")}), 0)
    v32 = hf_v32.DeepseekV32Attention(DeepseekV32Config(**TINY), 0)
    for load, module, match in (
            (D.DSAttention.from_hf, v3, r"DSAttention.from_hf: module must be transformers' DeepseekV32Attention "
                                        r"\(MLA with an indexer\), got DeepseekV3Attention \(it has no indexer, "
                                        r"config.index_n_heads"),
            (D.DSAttention.from_hf, v32.indexer, "got DeepseekV32Indexer \\(it has no scaling, kv_a_proj_with_mqa"),
            (D.LightningIndexer.from_hf, v32, r"LightningIndexer.from_hf: module must be transformers' "
                                              r"DeepseekV32Indexer or GlmMoeDsaIndexer, got DeepseekV32Attention "
                                              r"\(it has no wq_b, wk.weight, k_norm.eps, weights_proj\)"),
            (MLA.from_hf, v32, "MLA.from_hf: module must be transformers' DeepseekV3Attention \\(MLA\\), got "
                               "DeepseekV32Attention, which has an indexer: load it with DSAttention.from_hf")):
        with pytest.raises(TypeError, match=match):
            load(module)

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



@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_dsattention_accepts_zero_new_tokens(backend):
    """T = 0 gives an empty output (indices [B, 0, topk], scores [B, 0, S]), with or without a cache, and a gradient,
    as the book's other layers do; it was a reshape error (naive) and a division by zero in the Triton op's split
    plan (sparse_attention on zero queries)."""
    torch.manual_seed(0)
    layer = D.DSAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=2, backend=backend).to(DEV)
    x = torch.randn(2, 0, 32, device=DEV, requires_grad=True)
    y, idx, scores = layer(x, return_indices=True)
    assert y.shape == (2, 0, 32) and idx.shape == (2, 0, 2) and scores.shape == (2, 0, 0)
    y.sum().backward()
    assert x.grad.shape == (2, 0, 32)
    xs = torch.randn(2, 5, 32, device=DEV, generator=torch.Generator(DEV).manual_seed(6))
    with torch.no_grad():
        cache = layer.new_cache(2, 5)
        first = layer(xs[:, :3], cache)
        assert layer(xs[:, 3:3], cache).shape == (2, 0, 32) and len(cache) == 3
        rest = layer(xs[:, 3:], cache)
        assert_close("decoding after an empty step", layer(xs), torch.cat([first, rest], 1), 1e-4)
    q, k = torch.randn(1, 0, 4, 16, device=DEV), torch.randn(1, 5, 1, 16, device=DEV)  # no query over 5 keys
    none = torch.zeros(1, 0, 3, dtype=torch.long, device=DEV)
    assert D.sparse_attention(q, k, k, none, backend=backend).shape == (1, 0, 4, 16)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_dsattention_dense_accepts_zero_tokens(backend):
    """sparse=False (every key) on T = 0 with no cache gives an empty output, as sparse=True does: one slot a
    query, none of them filled."""
    torch.manual_seed(0)
    layer = D.DSAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=2, backend=backend).to(DEV)
    y, idx, scores = layer(torch.zeros(2, 0, 32, device=DEV), sparse=False, return_indices=True)
    assert y.shape == (2, 0, 32) and idx.shape == (2, 0, 1) and scores.shape == (2, 0, 0)
    xs = torch.randn(2, 5, 32, device=DEV, generator=torch.Generator(DEV).manual_seed(6))
    with torch.no_grad():  # and still every key after a cached prefix
        cache = layer.new_cache(2, 5)
        layer(xs[:, :3], cache, sparse=False)
        assert layer(xs[:, 3:3], cache, sparse=False).shape == (2, 0, 32)
        y, idx, _ = layer(xs[:, 3:], cache, sparse=False, return_indices=True)
        assert idx.shape == (2, 2, 5)


def test_dsacache_rejects_another_dtype():
    """Like MLACache and KVCache: a silent cast would round (or overflow) what is cached."""
    cache = D.DSACache(1, 4, 8, 4, 6)
    with pytest.raises(TypeError, match=r"DSACache.append: k_idx must be the cache's torch.float32, got torch.float64"):
        cache.append(torch.zeros(1, 1, 8), torch.zeros(1, 1, 4), torch.zeros(1, 1, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"DSACache.append: c_kv and k_rope must be the cache's torch.float32, got "
                                        r"c_kv torch.float16"):
        cache.append(torch.zeros(1, 1, 8, dtype=torch.float16), torch.zeros(1, 1, 4), torch.zeros(1, 1, 6))
    assert len(cache) == 0 and not cache.buffer.any() and not cache.index_keys.any()

# ------------------------------------------------------------------------------------------- float64 (gradcheck)
def _fp64_problem(TQ=7, TK=7, seed=51):
    """A tiny odd problem in float64 on the CPU: q [1, TQ, 2, 3] (the last TQ of TK positions), k [1, TK, 1, 3],
    v [1, TK, 1, 4] (one GQA group of 2), an indexer of 2 heads × 3 dims, and its top-3 selection, fixed, so that
    gradcheck's steps cannot change it. q, k, v and the indexer's inputs are leaves."""
    q, k, v = make_qkv(1, TK, 2, 3, HKV=1, Dv=4, dtype=torch.float64, seed=seed)
    q = q[:, TK - TQ:].contiguous()
    q_idx, k_idx, w_idx = (x.double() for x in _indexer_inputs(1, TQ, TK, 2, 3, seed=seed + 3))
    idx = D.select_topk(D.indexer_scores(q_idx, k_idx, w_idx), 3)  # [1, TQ, 3]
    return [x.requires_grad_() for x in (q, k, v, q_idx, k_idx, w_idx)], idx


@pytest.mark.parametrize("TQ", [7, 3])
def test_sparse_attention_and_dsa_pass_gradcheck_in_float64(TQ):
    """sparse_attention, gather_attention and dsa take float64 and compute in it (finite differences in fp32 would
    fail gradcheck's 1e-5), "auto" sending float64 to the PyTorch path: gradients of q, k, v over a fixed selection
    (dsa's own top-3 of the indexer, which gradcheck does not perturb); TQ = 3: the last 3 of 7 positions."""
    (q, k, v, q_idx, k_idx, w_idx), idx = _fp64_problem(TQ=TQ)
    assert D.sparse_attention(q, k, v, idx).dtype == torch.float64
    for op in (D.sparse_attention, D.gather_attention):
        assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, idx), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=3), (q, k, v))


def test_indexer_scores_and_its_loss_pass_gradcheck_in_float64():
    """indexer_scores (the -inf above the diagonal set to 0 for the finite differences) in q_idx, k_idx, w_idx,
    away from ReLU's kink; indexer_kl_loss in the scores, over all past keys and over a selection."""
    (*_, q_idx, k_idx, w_idx), idx = _fp64_problem(TQ=3)
    assert D.indexer_scores(q_idx, k_idx, w_idx).dtype == torch.float64

    def scores(q_idx, k_idx, w_idx):
        s = D.indexer_scores(q_idx, k_idx, w_idx)
        return torch.where(torch.isfinite(s), s, 0.0)

    assert torch.autograd.gradcheck(scores, (q_idx, k_idx, w_idx))
    p_attn = torch.softmax(torch.randn(1, 3, 2, 7, generator=_gen(55), dtype=torch.float64), -1)
    s = torch.randn(1, 3, 7, generator=_gen(56), dtype=torch.float64, requires_grad=True)
    for sel in (None, idx):
        assert D.indexer_kl_loss(p_attn, s, sel).dtype == torch.float64
        assert torch.autograd.gradcheck(lambda s: D.indexer_kl_loss(p_attn, s, sel), (s,))


def test_dsa_in_float64_agrees_with_float32():
    q, k, v = make_qkv(2, 45, 8, 16, HKV=2, seed=57)
    q_idx, k_idx, w_idx = _indexer_inputs(2, 45, 45, 4, 8, seed=58)
    o32, idx32 = D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=8, return_indices=True, backend="naive")
    o64, idx64 = D.dsa(*(x.double() for x in (q, k, v, q_idx, k_idx, w_idx)), topk=8, return_indices=True)
    assert o64.dtype == torch.float64 and torch.equal(idx32, idx64)
    assert_close("dsa, fp64 vs fp32", o64, o32.double(), 1e-5)
    s32, s64 = D.indexer_scores(q_idx, k_idx, w_idx), D.indexer_scores(q_idx.double(), k_idx.double(), w_idx.double())
    past = torch.isfinite(s32)
    assert torch.equal(past, torch.isfinite(s64))
    assert_close("indexer scores, fp64 vs fp32", s64[past], s32[past].double(), 1e-5)


def test_kernels_refuse_float64():
    """The kernels take fp32, fp16 and bf16 (the indexer also FP8) only: float64 is a TypeError that says where it
    runs, under backend="triton" too."""
    q, k, v, idx = (x.to(DEV) for x in _ok().values())
    q, k, v = q.double(), k.double(), v.double()
    q_idx, k_idx, w_idx = (x.to(DEV, torch.float64) for x in _indexer_inputs(1, 8, 8, 2, 8))
    where = r".*the Triton kernels take no float64: use the naive"
    share = r"q, k, v must share one dtype among float32, float16, bfloat16, got q torch.float64" + where
    indexer = r"q_idx, k_idx must share one dtype among float32, float16, bfloat16.*got q_idx torch.float64" + where
    for call, words in ((lambda: DT.sparse_attention_triton(q, k, v, idx), share),
                        (lambda: D.sparse_attention(q, k, v, idx, backend="triton"), share),
                        (lambda: DT.lightning_indexer(q_idx, k_idx, w_idx, 3), indexer),
                        (lambda: D.dsa(q, k, v, q_idx, k_idx, w_idx, topk=3, backend="triton"), indexer)):
        with pytest.raises(TypeError, match=words):
            call()


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_dsattention_runs_in_float64(backend):
    """DSAttention.double() runs on the CPU ("auto" takes the PyTorch path for fp64), with the fp32 layer's
    outputs and selection, prefill and decoding through an fp64 cache."""
    torch.manual_seed(0)
    layer = D.DSAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=3, backend=backend)
    x = torch.randn(2, 11, 32, generator=_gen(59))
    with torch.no_grad():
        y32, idx32, _ = layer(x, return_indices=True)
        layer.double()
        y64, idx64, scores = layer(x.double(), return_indices=True)
        cache = layer.new_cache(2, 11)
        steps = [layer(x[:, :8].double(), cache)] + [layer(x[:, t:t + 1].double(), cache) for t in range(8, 11)]
    assert y64.dtype == scores.dtype == torch.float64 and torch.equal(idx32, idx64)
    assert_close("y, fp64 vs fp32", y64, y32.double(), 1e-4)
    assert_close("decoding vs prefill, fp64", y64, torch.cat(steps, 1), 1e-10)


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
    for bad in (-3, [5, -1]):  # no negative costs
        with pytest.raises(ValueError, match="dsa_cost: position must be a number >= 0"):
            D.dsa_cost(bad)


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
    with pytest.raises(ExerciseError, match="DI=64"):  # the indexer's key size taken as 128 whatever DI is
        D.check_break_even(lambda H, HI, DI, k, fp8: solution(H, HI, 128, k, fp8))
    with pytest.raises(ExerciseError, match="not implemented"):
        D.check_break_even(lambda *a: (_ for _ in ()).throw(NotImplementedError))


def test_scores_by_chunks_checker(capsys):
    def by_chunks(q_idx, k_idx, w_idx, chunk, queries_last=True):
        B, TQ, TK = q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]
        out = torch.full((B, TQ, TK), float("-inf"))
        for c0 in range(0, TQ, chunk):
            c1 = min(c0 + chunk, TQ)
            end = TK - TQ + c1 if queries_last else c1  # the known-wrong: query i at position i
            out[:, c0:c1, :end] = D.indexer_scores(q_idx[:, c0:c1], k_idx[:, :end], w_idx[:, c0:c1])
        return out

    D.check_scores_by_chunks(by_chunks)
    assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(ExerciseError, match="case 1"):  # the planted bug: every chunk scored as the last
        D.check_scores_by_chunks(D.indexer_scores_by_chunks_with_a_bug)
    with pytest.raises(ExerciseError, match="more elements than"):  # right, but the whole [B, TQ, HI, TK] at once
        D.check_scores_by_chunks(lambda q, k, w, chunk: D.indexer_scores(q, k, w))
    with pytest.raises(ExerciseError, match="case 2"):  # right in a prefill, wrong when TQ < TK
        D.check_scores_by_chunks(lambda q, k, w, chunk: by_chunks(q, k, w, chunk, queries_last=False))


def _score_tile_kernels():
    """The exercise's tile, right with the default flags; each other kernel turns one flag (a known-wrong answer):
    no ReLU, the query's own key hidden (n < t), keys past TK scored 0 (their load masked, the score not), rows past
    TK read (the load unmasked there, the score masked)."""
    import triton
    import triton.language as tl

    from minisparse.testing import with_constexprs

    @triton.jit
    def tile(q_ptr, k_ptr, w_ptr, s_ptr, t, n0, TK, scale, HI, DI, BH: tl.constexpr, BD: tl.constexpr,
             BN: tl.constexpr, RELU: tl.constexpr = True, STRICT: tl.constexpr = False,
             SCORE_END: tl.constexpr = True, LOAD_END: tl.constexpr = True, LOAD_DI: tl.constexpr = True):
        q, w = D.load_index_queries(q_ptr, w_ptr, HI, DI, BH, BD)
        n, d = n0 + tl.arange(0, BN), tl.arange(0, BD)
        seen = (n < t) if STRICT else (n <= t)
        real = (seen & (n < TK)) if SCORE_END else seen
        rows = (n < TK) if LOAD_END else (n >= 0)
        cols = (d < DI) if LOAD_DI else (d >= 0)
        k = tl.load(k_ptr + n[:, None] * DI + d[None, :], mask=rows[:, None] & cols[None, :], other=0.0)
        dots = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        if RELU:
            dots = tl.maximum(dots, 0.0)
        s = tl.where(real, tl.sum(w[:, None] * dots, axis=0), float("-inf"))
        tl.store(s_ptr + tl.arange(0, BN), s)

    return (with_constexprs(tile), with_constexprs(tile, RELU=False), with_constexprs(tile, STRICT=True),
            with_constexprs(tile, SCORE_END=False), with_constexprs(tile, LOAD_END=False),
            with_constexprs(tile, LOAD_DI=False))


def test_index_score_tile_checker():
    right, no_relu, strict_mask, no_key_end, unmasked_load, no_dim_mask = _score_tile_kernels()
    D.check_index_score_tile(right)
    with pytest.raises(ExerciseError, match="ReLU"):
        D.check_index_score_tile(no_relu)
    with pytest.raises(ExerciseError, match="key 37"):
        D.check_index_score_tile(strict_mask)
    with pytest.raises(ExerciseError, match="past TK must be -inf"):
        D.check_index_score_tile(no_key_end)
    if runtime.interpreting():  # right scores from reads past k's end: only the interpreter sees the addresses
        with pytest.raises(ExerciseError, match=r"HI=4, DI=16, t=37, n0=32: a load reads 128 elements outside "
                                                r"q, k, w, e\.g\. element 640 of k, which has 640\nHint: mask"):
            D.check_index_score_tile(unmasked_load)
        with pytest.raises(ExerciseError, match=r"DI=24, t=19, n0=16: a load reads .* outside"):  # d < DI unmasked
            D.check_index_score_tile(no_dim_mask)


def test_index_score_tile_checker_launches_on_the_triton_device():
    """The checker's tensors live where Triton runs: the GPU when there is one (a CPU tensor cannot reach a CUDA
    kernel), else the CPU under the interpreter."""
    right = _score_tile_kernels()[0]
    seen = set()

    class Spy:  # records the devices of the tensors the checker launches the kernel with
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(a.device.type for a in args if isinstance(a, torch.Tensor))
                return right[grid](*args, **kwargs)
            return launch

    D.check_index_score_tile(Spy())
    assert seen == {DEV.type}


# ------------------------------------------------------------------------------------------- kernels: references
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


def against_reference(q, k, v, idx, dtype, what, scale=None, num_splits=None, latent=False):
    """The kernel in `dtype` vs the fp32 reference on the same rounded inputs: forward and every gradient. latent:
    v is the view k[..., :DV] (DV = the key's power-of-two head), as MLA passes it."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    leaves = [x.to(DEV, dtype).detach().requires_grad_() for x in ((q, k) if latent else (q, k, v))]
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    if latent:
        DV = DT._split_dim(D)[0]
        o = DT._sparse_attention(*leaves, leaves[1][..., :DV], idx, scale, num_splits)
        ref = masked_softmax_attention(*ref_leaves, ref_leaves[1][..., :DV], idx, scale)
    else:
        o = DT._sparse_attention(*leaves, idx, scale, num_splits)
        ref = masked_softmax_attention(*ref_leaves, idx, scale)
    assert_close(f"{what}: o", ref, o.float(), fwd_tol)
    do = torch.randn(o.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    want = torch.autograd.grad(ref, ref_leaves, do)
    got = torch.autograd.grad(o, leaves, do.to(dtype))
    for n, a, b in zip("qkv", want, got):
        assert_close(f"{what}: d{n}", a, b.float(), grad_tol)
    return ref


def make(B, T, H, D, seed, device=DEV):
    return torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(seed)).to(device)


# ------------------------------------------------------------------------------------------- kernels: sparse attention
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
    """MLA's form scaled down: one key head of D = 72 = 64 + 8 dims, v = the view k[..., :64]."""
    q, k = make(B, TQ, HQ, 72, 5), make(B, TK, 1, 72, 6)
    idx = random_indices(B, TQ, TK, topk, seed=7).to(torch.int32)
    against_reference(q, k, None, idx, dtype, f"latent HQ={HQ} splits={num_splits}", scale=0.2,
                      num_splits=num_splits, latent=True)


def test_a_value_view_of_the_key_is_read_from_the_key_tile(monkeypatch):
    """v = k[..., :64] runs the kernel's value-from-key mode; a copy, a view wider than the key's power-of-two head,
    or a detached view or one made under no_grad (whose gradient must not reach k) runs the gathered-value mode —
    all with the same results."""
    seen = []
    real = DT._sparse_forward  # (q, k, v, ...): v None = read from the key tile; with or without autograd
    monkeypatch.setattr(DT, "_sparse_forward", lambda *a: seen.append(a[2] is None) or real(*a))
    q, k = make(1, 9, 4, 72, 30), make(1, 9, 1, 72, 31).requires_grad_()
    idx = random_indices(1, 9, 9, 5, seed=32)
    with torch.no_grad():
        quiet = k[..., :64]  # a view of k made without autograd: no gradient of its own
    for v in (k[..., :64], k[..., :64].detach().clone(), k[..., :70], k.detach()[..., :64], quiet):
        o = DT.sparse_attention_triton(q, k, v, idx, 0.2)
        ref = masked_softmax_attention(q, k, v, idx, 0.2)
        assert_close("o", ref, o, 1e-5)
        do = torch.randn(o.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
        assert_close("dk", torch.autograd.grad(ref, k, do)[0], torch.autograd.grad(o, k, do)[0], 1e-5)
    assert seen == [True, False, False, False, False]
    with torch.no_grad():  # no gradient wanted: a detached view is read from the key too
        DT.sparse_attention_triton(q, k.detach(), k.detach()[..., :64], idx, 0.2)
    assert seen[-1] is True


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_slot_gives_zero_as_the_naive_op(dtype):
    """indices [B, TQ, 0] (topk 0: no key for any query): o = 0 and zero gradients, as sparse_attention's naive
    path gives, in both forms (gathered values, and the value read from the key)."""
    q, k, v = (make(1, 5, h, d, seed).to(dtype).requires_grad_() for h, d, seed in ((4, 32, 40), (2, 32, 41),
                                                                                    (2, 16, 42)))
    idx = torch.empty(1, 5, 0, dtype=torch.long, device=DEV)
    for value in (v, k[..., :16]):
        o = D.sparse_attention(q, k, value, idx, backend="triton")
        assert o.shape == (1, 5, 4, 16) and not o.any()
        assert torch.equal(o, D.sparse_attention(q, k, value, idx, backend="naive"))
        grads = torch.autograd.grad(o.float().sum(), (q, k, v) if value is v else (q, k))
        assert all(not g.any() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_narrow_tiles_several_head_blocks(poisoned, dtype):
    """Forced 16-head × 16-slot tiles: 40 heads in three head blocks (the last one half empty), 37 slots in three
    tiles; GQA and the latent form, forward and backward."""
    idx = random_indices(1, 9, 9, 37, seed=23)
    q, k, v = make(1, 9, 40, 16, 24), make(1, 9, 1, 16, 25), make(1, 9, 1, 24, 26)
    ql, kl = make(1, 9, 40, 72, 27), make(1, 9, 1, 72, 28)
    tiles = dict(BG=16, BN=16, num_warps=4, num_stages=1)
    with runtime.launch_config("dsa.sparse.fwd", **tiles), runtime.launch_config("dsa.sparse.bwd", **tiles), \
            runtime.launch_config("dsa.sparse.fwd.d512", **tiles), \
            runtime.launch_config("dsa.sparse.bwd.d512", **tiles):
        against_reference(q, k, v, idx, dtype, "GQA, 16-row tiles")
        against_reference(ql, kl, None, idx, dtype, "latent, 16-row tiles", scale=0.2, latent=True)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_gqa_split_equals_one_split(num_splits):
    q, k, v = make(2, 1, 8, 16, 8), make(2, 64, 2, 16, 9), make(2, 64, 2, 24, 10)
    idx = random_indices(2, 1, 64, 50, seed=11)
    one = DT._sparse_attention(q, k, v, idx, None, 1)
    assert_close("split", one, DT._sparse_attention(q, k, v, idx, None, num_splits), 1e-5)


def test_kernel_matches_fla_naive_dsa_with_given_indices(fla_naive):
    T, HQ, H, D = 41, 4, 2, 16
    q, k, v = make(1, T, HQ, D, 12), make(1, T, H, D, 13), make(1, T, H, D, 14)
    idx = random_indices(1, T, T, 9, seed=15)
    want = fla_naive.naive_dsa(q.float(), k.float(), v.float(), None, None, indices=idx)
    assert_close("naive_dsa", want, DT.sparse_attention_triton(q, k, v, idx).float(), 1e-4)


def test_kernel_with_topk_at_least_T_is_causal_dense_attention():
    T, HQ, H, D = 30, 4, 1, 16
    q, k, v = make(1, T, HQ, D, 16), make(1, T, H, D, 17), make(1, T, H, D, 18)
    idx = torch.arange(T, device=DEV).expand(1, T, T)
    idx = torch.where(idx <= torch.arange(T, device=DEV)[:, None], idx, -1)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
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


def test_auto_backend_runs_the_kernel_where_choose_backend_says_so(monkeypatch):
    calls = []
    real = DT._sparse_attention  # what sparse_attention dispatches to (errors under its own name)
    monkeypatch.setattr(DT, "_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make(1, 6, 2, 16, 40), make(1, 6, 1, 16, 41), make(1, 6, 1, 16, 42)
    idx = random_indices(1, 6, 6, 3, seed=43)
    o = D.sparse_attention(q, k, v, idx)
    assert len(calls) == (minisparse._checks.choose_backend("auto", q) == "triton")
    assert_close("auto", D.sparse_attention(q, k, v, idx, backend="naive"), o, 1e-5)


# ------------------------------------------------------------------------------------------- kernels: the indexer
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
def test_indexer_selects_what_naive_dsa_indexer_selects(monkeypatch, fla_naive, B, T, HI, DI, topk, chunk_budget):
    if chunk_budget is not None:
        monkeypatch.setattr(DT, "_SCORE_BUDGET", chunk_budget)
    dtype = torch.float32 if DEV.type == "cpu" else torch.bfloat16
    q, k, w = (x.to(dtype) for x in indexer_inputs(B, T, T, HI, DI, seed=30))
    got = DT.lightning_indexer(q, k, w, topk)
    want = fla_naive.naive_dsa_indexer(q, k, w, topk, activation="relu")
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


@pytest.mark.parametrize("sms", [1, 78, 132])
def test_indexer_key_ranges_fill_one_wave(sms):
    """The decoding plan: B query blocks × the key ranges fit in one wave of two programs an SM (16 sequences on an
    H200's 132 SMs: 16 ranges, not 17 — 272 programs would leave 8 for a second wave), ranges of 64·n keys."""
    assert DT._key_range(65536, 16, 132) == 4096
    for W in (1000, 4097, 65536, 131072 + 5):
        for blocks in (1, 3, 16, 64, 2 * sms, 4 * sms):
            KS = DT._key_range(W, blocks, sms)
            ranges = -(-W // KS)
            assert KS % 64 == 0 and KS * ranges >= W and (ranges == 1 or KS >= 1024)
            assert blocks * ranges <= max(blocks, 2 * sms), (W, blocks, KS)


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


# ------------------------------------------------------------------------------------------- kernels: GPU only
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


def test_select_topk_gives_ties_to_the_earlier_key():
    scores = torch.tensor([[[0.0, 0.0, 1.0, 0.0, -torch.inf]]])  # ReLU zeros tie; key 4 is in the future
    assert D.select_topk(scores, 3).tolist() == [[[2, 0, 1]]]
    assert D.select_topk(scores, 6).tolist() == [[[2, 0, 1, 3, -1, -1]]]
