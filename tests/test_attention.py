"""Chapter 1 (minisparse.attention): the reference, RoPE, the KV cache, the layer, the cost model, the exercises.

Oracles: PyTorch's scaled_dot_product_attention (and its `causal_lower_right` bias) for attention; a direct
complex-number formula and transformers' `apply_rotary_pos_emb` for RoPE; transformers' Llama / Qwen3 / Qwen3-Next
attention modules for the layer; brute-force mask counting for the cost model.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import minisparse.attention.layer as layer_module
from minisparse import runtime
from minisparse.attention import (
    Attention, KVCache, RotaryEmbedding, apply_rope, attended_pairs, attention_bytes, attention_flops,
    attention_mask, attention_ref, attention_weights, check_decode_attention, check_flash_tile,
    check_kv_cache_bytes, check_online_softmax, flash_attention, kv_cache_bytes_per_token, softmax_state,
)
from minisparse.testing import TOLERANCES, ExerciseError, assert_close, make_bthd, make_qkv


def sdpa(q, k, v, **kw):
    """SDPA on our [B, T, H, D] layout."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    return o.transpose(1, 2)


def window_mask(T, W):
    """Keys t - W < s <= t, built independently of attention_mask: lower triangle minus the band below it."""
    ones = torch.ones(T, T, dtype=torch.bool)
    return ones.tril() & ~ones.tril(-W)


# ------------------------------------------------------------------------------------------ attention_ref
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,H,D,Dv", [(2, 37, 3, 16, 16), (1, 64, 2, 48, 24), (1, 1, 1, 8, 8)])
def test_ref_matches_sdpa(dtype, causal, B, T, H, D, Dv):
    q, k, v = make_qkv(B, T, H, D, Dv=Dv, dtype=dtype, seed=1)
    tol = 1e-12 if dtype == torch.float64 else TOLERANCES[torch.float32][0]
    assert_close("attention_ref", sdpa(q, k, v, is_causal=causal), attention_ref(q, k, v, causal=causal), tol)


@pytest.mark.parametrize("HQ,HKV", [(4, 2), (6, 1), (8, 4)])
def test_ref_gqa_matches_sdpa(HQ, HKV):
    q, k, v = make_qkv(2, 29, HQ, 16, HKV=HKV, dtype=torch.float64, seed=2)
    out = attention_ref(q, k, v)
    assert_close("GQA vs enable_gqa", sdpa(q, k, v, is_causal=True, enable_gqa=True), out, 1e-12)
    G = HQ // HKV  # and against repeating K/V by hand
    assert_close("GQA vs repeat", sdpa(q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2), is_causal=True),
                 out, 1e-12)


@pytest.mark.parametrize("W", [1, 3, 16, 40])
def test_ref_window_matches_sdpa_with_explicit_mask(W):
    q, k, v = make_qkv(2, 33, 4, 16, HKV=2, dtype=torch.float64, seed=3)
    ref = sdpa(q, k, v, attn_mask=window_mask(33, W), enable_gqa=True)
    assert_close(f"window {W}", ref, attention_ref(q, k, v, window=W), 1e-12)


@pytest.mark.parametrize("Tq,Tk,W", [(1, 17, None), (5, 23, None), (7, 7, None), (4, 30, 6), (1, 40, 9)])
def test_ref_bottom_right_causal(Tq, Tk, W):
    q, k, v = make_qkv(2, Tq, 4, 16, HKV=2, Tk=Tk, dtype=torch.float64, seed=4)
    out = attention_ref(q, k, v, window=W)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)  # query i at position i + Tk - Tq
    if W is not None:
        allowed &= ~torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq - W)
    assert_close("explicit bottom-right mask", sdpa(q, k, v, attn_mask=allowed, enable_gqa=True), out, 1e-12)
    if W is None:  # PyTorch's own bottom-right causal bias
        from torch.nn.attention.bias import causal_lower_right

        G = 2
        ref = sdpa(q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2), attn_mask=causal_lower_right(Tq, Tk))
        assert_close("causal_lower_right", ref, out, 1e-12)


def test_ref_scale_and_limits():
    q, k, v = make_qkv(1, 21, 4, 16, HKV=2, dtype=torch.float64, seed=5)
    assert_close("scale", sdpa(q, k, v, is_causal=True, scale=0.37, enable_gqa=True),
                 attention_ref(q, k, v, scale=0.37), 1e-12)
    # window >= T reduces to plain causal attention; window = 1 returns each token's own value
    torch.testing.assert_close(attention_ref(q, k, v, window=21), attention_ref(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(attention_ref(q, k, v, window=1), v.repeat_interleave(2, 2), rtol=1e-12, atol=1e-12)


def test_ref_gradients_match_sdpa():
    q, k, v = make_qkv(2, 19, 4, 16, HKV=2, dtype=torch.float64, seed=6, requires_grad=True)
    do = make_bthd(2, 19, 4, 16, dtype=torch.float64, seed=9)
    grads = torch.autograd.grad((attention_ref(q, k, v, window=5) * do).sum(), (q, k, v))
    ref = torch.autograd.grad((sdpa(q, k, v, attn_mask=window_mask(19, 5), enable_gqa=True) * do).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref):
        assert_close(f"d{name}", r, g, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ref_low_precision_keeps_dtype(dtype):
    q, k, v = make_qkv(1, 45, 4, 32, HKV=1, seed=7)
    out = attention_ref(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and out.is_contiguous()
    assert_close("low precision", attention_ref(q, k, v), out, TOLERANCES[dtype][0])


def test_attention_weights_are_masked_probabilities():
    q, k, _ = make_qkv(2, 6, 4, 8, HKV=2, Tk=10, seed=8)
    p = attention_weights(q, k, window=3)
    assert p.shape == (2, 4, 6, 10) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 6))
    assert (p[..., ~attention_mask(6, 10, window=3)] == 0).all()


def test_attention_mask_bottom_right_and_window():
    expected = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)  # positions 3, 4; window 4
    assert torch.equal(attention_mask(2, 5, window=4), expected)
    assert torch.equal(attention_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())
    assert attention_mask(3, 4, causal=False).all()


# --------------------------------------------------------------------------------------------------- RoPE
def rope_complex(x, positions, theta, interleaved):
    """RoPE by its definition: pair j as a complex number z_j, times exp(i * position * theta^(-2j/D))."""
    D = x.shape[-1]
    if interleaved:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    omega = theta ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)
    pos = positions.double() if positions.dim() == 2 else positions.double()[None]
    z = z * torch.polar(torch.ones_like(omega), pos[..., None] * omega)[:, :, None, :]  # [B, T, 1, D/2]
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_rope_matches_complex_formula(interleaved, batched_positions):
    x = make_bthd(2, 13, 3, 32, dtype=torch.float64, seed=10)
    shape = (2, 13) if batched_positions else (13,)
    positions = torch.randint(0, 5000, shape, generator=torch.Generator().manual_seed(0))
    for theta in (10000.0, 1e6):
        out = apply_rope(x, positions, theta=theta, interleaved=interleaved)
        assert_close("apply_rope", rope_complex(x, positions, theta, interleaved), out, 1e-12)


def test_rope_matches_transformers_rotate_half():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x = make_bthd(2, 11, 4, 16, seed=11)  # [B, T, H, D]
    positions = torch.arange(3, 14)
    omega = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    angles = torch.cat([positions[:, None] * omega] * 2, dim=-1)[None]  # [1, T, D], as transformers builds them
    q_hf, _ = llama.apply_rotary_pos_emb(x, x, angles.cos(), angles.sin(), unsqueeze_dim=2)
    assert_close("apply_rope vs transformers", q_hf, apply_rope(x, positions), 1e-6)


def test_rope_scores_depend_on_offset_only():
    q, k = make_bthd(1, 1, 1, 64, dtype=torch.float64, seed=12), make_bthd(1, 1, 1, 64, dtype=torch.float64, seed=13)
    for interleaved in (False, True):
        def score(t, s):
            return (apply_rope(q, torch.tensor([t]), interleaved=interleaved)
                    * apply_rope(k, torch.tensor([s]), interleaved=interleaved)).sum().item()
        assert score(10, 3) == pytest.approx(score(1007, 1000), rel=1e-9)
        assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


def test_rope_conventions_differ_by_a_channel_permutation():
    """Chapter 1, section 1.2.3: interleaved pairs (2j, 2j+1) and half-split pairs (j, j + D/2) are the same
    rotation with the channels reordered."""
    perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])  # interleaved -> half-split order
    y, pos = make_bthd(2, 9, 3, 64, dtype=torch.float64, seed=14), torch.arange(9)
    inter = apply_rope(y, pos, interleaved=True)
    assert_close("interleaved vs half-split", inter[..., perm], apply_rope(y[..., perm], pos), 1e-12)
    assert not torch.allclose(inter, apply_rope(y, pos))  # without the permutation they differ



def test_attention_layer_depends_on_relative_positions_only():
    """RoPE scores depend on i − j: shifting every position (below 0 too) changes no output."""
    layer = Attention(32, 4, 2, backend="naive")
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer(x)
        for shift in (-3, 5):
            assert_close(f"shift {shift}", base, layer(x, positions=torch.arange(8) + shift), 1e-5)

@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_equals_apply_rope(interleaved):
    rope = RotaryEmbedding(32, theta=5e5, interleaved=interleaved, max_len=8)  # positions beyond 8 grow the table
    x = make_bthd(2, 9, 3, 32, seed=14)
    for positions in (torch.arange(9), torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1)),
                      torch.arange(9) - 5):  # before the table's first row: a table lookup would wrap around
        assert_close("RotaryEmbedding", apply_rope(x, positions, 5e5, interleaved), rope(x, positions), 1e-6)
    rope = rope.to(torch.bfloat16)  # the cos/sin table must stay fp32
    xb = x.to(torch.bfloat16)
    out = rope(xb, torch.arange(9) + 4000)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rope(xb, torch.arange(9) + 4000, 5e5, interleaved), rtol=0, atol=0)
    x64, far = x.double(), torch.tensor([5, 70000, 500000, 3, 4, 5, 6, 7, 8])  # fp64: fp64 tables, fp32 again after
    for module in (rope, rope.double()):
        torch.testing.assert_close(module(x64, far), apply_rope(x64, far, 5e5, interleaved), rtol=1e-12, atol=1e-12)
    assert_close("fp32 after fp64", apply_rope(x, far, 5e5, interleaved), rope(x, far), 1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda: apply_rope(torch.randn(1, 2, 1, 4), torch.arange(2), theta=-1.0), "apply_rope: theta must be a positive"),
    (lambda: RotaryEmbedding(4, theta=0), "RotaryEmbedding: theta must be a positive"),
    (lambda: RotaryEmbedding(0), "RotaryEmbedding: dim must be an int > 0"),
    (lambda: RotaryEmbedding(4, max_len=-5), "RotaryEmbedding: max_len must be an int >= 0")])
def test_rope_refuses_what_gives_nan(call, message):
    with pytest.raises(ValueError, match=message):  # not NaN, not a bare torch error
        call()


# ---------------------------------------------------------------------------------------------- KV cache
def test_kv_cache_appends_and_overflows():
    cache = KVCache(2, 5, 2, 4)
    k, v = make_bthd(2, 3, 2, 4, seed=15), make_bthd(2, 3, 2, 4, seed=16)
    k_all, v_all = cache.append(k, v)
    assert len(cache) == 3 and torch.equal(k_all, k) and torch.equal(v_all, v)
    k_all, _ = cache.append(k[:, :2], v[:, :2])
    assert len(cache) == 5 and torch.equal(k_all[:, 3:], k[:, :2])
    with pytest.raises(ValueError, match="max_len=5"):
        cache.append(k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="KVCache.append"):
        KVCache(2, 5, 2, 4).append(make_bthd(2, 1, 1, 4), make_bthd(2, 1, 1, 4))


# -------------------------------------------------------------------------------------------------- layer
LAYER_VARIANTS = [
    dict(),
    dict(gate=True),
    dict(gate=True, qk_norm=True, zero_centered_norm=True, rotary_dim=8),
    dict(qk_norm=True, window=5, interleaved_rope=True),
    dict(gate=True, window=3, bias=True),
]


@pytest.mark.parametrize("kw", LAYER_VARIANTS, ids=lambda kw: ",".join(kw) or "plain")
def test_layer_decode_equals_prefill(kw):
    torch.manual_seed(0)
    layer = Attention(48, 6, 2, 16, **kw)
    with torch.no_grad():
        for p in layer.parameters():  # norms and biases that are not the identity / zero
            p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(2, 17, 48)
        full = layer(x)
        cache = layer.new_cache(2, 20)
        steps = [layer(x[:, :4], cache), layer(x[:, 4:7], cache)] + [layer(x[:, t:t + 1], cache) for t in range(7, 17)]
    assert len(cache) == 17
    assert_close("decode vs prefill", full, torch.cat(steps, dim=1), 1e-5)


def _hf_attention(kind):
    """A tiny transformers attention module with random weights, its rotary embedding, and its module."""
    warnings.filterwarnings("ignore", message=".*Triton is not supported.*")  # fla warns on CPU
    transformers = pytest.importorskip("transformers")
    if kind == "llama":
        from transformers.models.llama import modeling_llama as m

        cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
        cls, rope_cls = m.LlamaAttention, m.LlamaRotaryEmbedding
    elif kind == "qwen3":
        from transformers.models.qwen3 import modeling_qwen3 as m

        cfg = transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
        cls, rope_cls = m.Qwen3Attention, m.Qwen3RotaryEmbedding
    else:
        from transformers.models.qwen3_next import modeling_qwen3_next as m

        cfg = transformers.Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                           num_hidden_layers=4)
        cls, rope_cls = m.Qwen3NextAttention, m.Qwen3NextRotaryEmbedding
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    hf = cls(cfg, layer_idx=3).eval()
    with torch.no_grad():
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return hf, rope_cls(cfg)


def _hf_forward(hf, rope, x):
    T = x.shape[1]
    position_embeddings = rope(x, torch.arange(T)[None])
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]  # additive mask [1, 1, T, T]
    return hf(x, position_embeddings, causal)[0]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_next"])
def test_layer_matches_transformers(kind):
    hf, rope = _hf_attention(kind)
    ours = Attention.from_hf(hf)
    expected = {"llama": (False, False, False, 16), "qwen3": (False, True, False, 16),
                "qwen3_next": (True, True, True, 8)}[kind]  # gate, q/k norm, zero-centred norm, rotary dim
    assert (ours.gate, ours.q_norm is not None, bool(ours.q_norm and ours.q_norm.zero_centered),
            ours.rotary_dim) == expected
    x = torch.randn(2, 23, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_hf, y = _hf_forward(hf, rope, x), ours(x)
    assert_close(f"Attention vs transformers {kind}", y_hf, y, 1e-5)
    if kind == "qwen3_next":  # the comparison is sensitive: the same layer without its gate is far off
        ours.gate = False
        ours.q_proj = torch.nn.Linear(64, 128, bias=False)
        with torch.no_grad():
            ours.q_proj.weight.copy_(hf.q_proj.weight.view(4, 64, 64)[:, :32].reshape(128, 64))
            with pytest.raises(AssertionError):
                assert_close("without gate", y_hf, ours(x), 1e-2)



def test_from_hf_names_the_module_it_expects():
    """Another transformers module fails at once, naming what was expected (it was an AttributeError from inside the
    loader: 'DeepseekV3Attention' object has no attribute 'head_dim')."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    hf, _ = _hf_attention("llama")
    mla = ds.DeepseekV3Attention(DeepseekV3Config(hidden_size=64, num_attention_heads=4, q_lora_rank=16,
                                                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                  v_head_dim=8, num_hidden_layers=1), 0)
    for module, what in ((mla, r"got DeepseekV3Attention \(it has no head_dim, q_proj, k_proj, v_proj\)"),
                         (hf.q_proj, r"got Linear \(it has no head_dim"), ("attention", "got str$")):
        with pytest.raises(TypeError, match=r"Attention.from_hf: module must be a transformers softmax attention "
                                            r"module \(LlamaAttention, .*" + what):
            Attention.from_hf(module)

# ---------------------------------------------------------------------------------------------- bad input
# One table for the reference and the kernel: flash_attention accepts what attention_ref accepts and rejects the
# rest with the same message (tests/test_flash_attention.py has the kernel's own limits).
DEV = runtime.device()


def _good_args():
    q, k, v = make_qkv(1, 8, 4, 16, HKV=2, device=DEV)
    return dict(q=q, k=k, v=v)


BAD_ARGS = [
    # (description, mutate(args), exception, regex the message must match)
    ("q not a tensor", lambda a: a.update(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("k a numpy array", lambda a: a.update(k=a["k"].cpu().numpy()), TypeError, "k must be a torch.Tensor"),
    ("q 3-D", lambda a: a.update(q=a["q"][0]), ValueError, r"q must be 4-D \[B, Tq, HQ, D\], got shape \(8, 4, 16\)"),
    ("int k", lambda a: a.update(k=a["k"].int()), TypeError, "k must be one of .*, got torch.int32"),
    ("mixed dtypes", lambda a: a.update(k=a["k"].half()), TypeError, "must share one dtype"),
    ("head dims differ", lambda a: a.update(k=make_bthd(1, 8, 2, 32, device=DEV)), ValueError,
     r"k must be \[B, Tk, HKV, D\] = \(1, 8, 2, 16\) \(q's batch size and head dim\), got \(1, 8, 2, 32\)"),
    ("batch differs", lambda a: a.update(k=make_bthd(2, 8, 2, 16, device=DEV), v=make_bthd(2, 8, 2, 16, device=DEV)),
     ValueError, "q's batch size"),
    ("v shorter than k", lambda a: a.update(v=a["v"][:, :7]), ValueError,
     r"v must be \[B, Tk, HKV, Dv\] = \(1, 8, 2, 16\) \(k's batch, length and heads\)"),
    ("v heads differ", lambda a: a.update(v=make_bthd(1, 8, 1, 16, device=DEV)), ValueError, "k's batch, length and heads"),
    ("heads do not divide", lambda a: a.update(k=make_bthd(1, 8, 3, 16, device=DEV), v=make_bthd(1, 8, 3, 16, device=DEV)),
     ValueError, r"HKV \(k's heads\) = 3 must divide HQ \(q's heads, GQA groups\) = 4"),
    ("Tq > Tk", lambda a: a.update(k=a["k"][:, :5], v=a["v"][:, :5]), ValueError, "Tq <= Tk, got Tq=8, Tk=5"),
    ("window 0", lambda a: a.update(window=0), ValueError, "window must be an int > 0, got 0"),
    ("window float", lambda a: a.update(window=2.5), ValueError, "window must be an int > 0, got 2.5"),
    ("window bool", lambda a: a.update(window=True), ValueError, "window must be an int > 0, got True"),
    ("window without causal", lambda a: a.update(window=4, causal=False), ValueError, "window=4 needs causal=True"),
    ("negative scale", lambda a: a.update(scale=-0.5), ValueError, "scale must be a positive number or None"),
    ("scale a string", lambda a: a.update(scale="0.5"), ValueError, "scale must be a positive number or None"),
    ("nan scale", lambda a: a.update(scale=float("nan")), ValueError, "scale must be a positive number or None"),
]


@pytest.mark.parametrize("op", [attention_ref, flash_attention], ids=lambda f: f.__name__)
@pytest.mark.parametrize("desc,mutate,exc,match", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_args_raise(op, desc, mutate, exc, match):
    args = _good_args()
    mutate(args)
    with pytest.raises(exc, match=match) as info:
        op(**args)
    assert str(info.value).startswith(f"{op.__name__}: "), "the message names the op"


BAD_CALLS = [
    # (description, call, exception, regex) for RoPE, the KV cache and attention_weights
    ("rope odd D", lambda: apply_rope(make_bthd(1, 4, 1, 7), torch.arange(4)), ValueError, "even D"),
    ("rope positions length", lambda: apply_rope(make_bthd(1, 8, 2, 16), torch.arange(5)), ValueError,
     "positions must be"),
    ("rope float positions", lambda: RotaryEmbedding(16)(make_bthd(1, 8, 2, 16), torch.arange(8.0)), TypeError,
     "integers"),
    ("cache heads", lambda: KVCache(2, 5, 2, 4).append(make_bthd(2, 1, 1, 4), make_bthd(2, 1, 1, 4)), ValueError,
     "KVCache.append"),
    ("weights heads do not divide", lambda: attention_weights(make_bthd(1, 8, 4, 16), make_bthd(1, 8, 3, 16)),
     ValueError, "attention_weights: HKV"),
    # a layer's positions: its own name, not RotaryEmbedding's (which it calls)
    ("layer positions length", lambda: Attention(16, 2)(torch.randn(1, 3, 16), positions=torch.arange(4)),
     ValueError, r"^Attention: positions must be \[T\]=\[3\] or \[B, T\]=\[1, 3\], got \(4,\)"),
    ("layer float positions", lambda: Attention(16, 2)(torch.randn(1, 3, 16), positions=torch.arange(3.0)),
     TypeError, "^Attention: positions must be integers"),
    ("layer positions a list", lambda: Attention(16, 2)(torch.randn(1, 3, 16), positions=[0, 1, 2]),
     TypeError, "^Attention: positions must be a torch.Tensor"),
]


@pytest.mark.parametrize("desc,call,exc,match", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_calls_raise(desc, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------- layer arguments and input
LAYER = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
BAD_LAYER_ARGS = [
    # (description, changed constructor arguments, exception, regex)
    ("hidden_size 0", dict(hidden_size=0), ValueError, "hidden_size must be an int > 0, got 0"),
    ("num_heads float", dict(num_heads=4.0), ValueError, "num_heads must be an int > 0, got 4.0"),
    ("num_kv_heads 0", dict(num_kv_heads=0), ValueError, "num_kv_heads must be an int > 0, got 0"),
    ("num_kv_heads does not divide", dict(num_kv_heads=3), ValueError, "num_kv_heads = 3 must divide num_heads = 4"),
    ("heads do not split hidden", dict(hidden_size=30, head_dim=None), ValueError,
     r"num_heads \(with head_dim=None\) = 4 must divide hidden_size = 30"),
    ("head_dim negative", dict(head_dim=-16), ValueError, "head_dim must be an int > 0, got -16"),
    ("rotary_dim 0", dict(rotary_dim=0), ValueError, "rotary_dim must be an int > 0, got 0"),
    ("rotary_dim odd", dict(rotary_dim=7), ValueError, "rotary_dim must be even and <= head_dim = 16, got 7"),
    ("rotary_dim > head_dim", dict(rotary_dim=32), ValueError, "<= head_dim = 16, got 32"),
    ("head_dim odd, no rotary_dim", dict(hidden_size=10, num_heads=2, num_kv_heads=None, head_dim=5), ValueError,
     r"Attention: head_dim must be even for RoPE on the whole head \(it rotates pairs of channels\), got 5; or"),
    ("derived head_dim odd, no rotary_dim", dict(hidden_size=10, num_heads=2, num_kv_heads=None, head_dim=None),
     ValueError, r"head_dim must be even .*got 5 \(hidden_size 10 / num_heads 2\)"),
    ("window 0", dict(window=0), ValueError, "Attention: window must be an int > 0, got 0"),
    ("norm_eps 0", dict(norm_eps=0.0), ValueError, "norm_eps must be a positive number, got 0.0"),
    ("rope_theta negative", dict(rope_theta=-1.0), ValueError, "rope_theta must be a positive number"),
    ("backend 'ref' (not a backend name)", dict(backend="ref"), ValueError,
     "backend must be 'auto', 'naive' or 'triton', got 'ref'"),
    ("backend 'flash' (not a backend name)", dict(backend="flash"), ValueError, "got 'flash'"),
]


@pytest.mark.parametrize("desc,changes,exc,match", BAD_LAYER_ARGS, ids=[b[0] for b in BAD_LAYER_ARGS])
def test_layer_rejects_bad_arguments(desc, changes, exc, match):
    with pytest.raises(exc, match=match):
        Attention(**{**LAYER, **changes})


BAD_LAYER_INPUTS = [
    ("not a tensor", lambda: [[0.0] * 64], TypeError, "x must be a torch.Tensor"),
    ("2-D", lambda: torch.randn(3, 64), ValueError, r"x must be 3-D \[B, T, hidden\]"),
    ("wrong hidden", lambda: torch.randn(1, 3, 16), ValueError, "hidden = 64, got"),
    ("fp16 into an fp32 layer", lambda: torch.randn(1, 3, 64).half(), TypeError,
     "x is torch.float16 but the layer's parameters are torch.float32"),
]


@pytest.mark.parametrize("desc,make,exc,match", BAD_LAYER_INPUTS, ids=[b[0] for b in BAD_LAYER_INPUTS])
def test_layer_rejects_bad_input(desc, make, exc, match):
    with pytest.raises(exc, match=match):
        Attention(**LAYER)(make())


def test_layer_cache_overflow_says_so():
    layer = Attention(32, 2, backend="naive")
    cache = layer.new_cache(1, 4)
    with torch.no_grad():
        layer(torch.randn(1, 3, 32), cache)
        with pytest.raises(ValueError, match="do not fit"):
            layer(torch.randn(1, 2, 32), cache)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_layer_accepts_zero_tokens(backend):
    """T = 0 (an empty prompt chunk) gives an empty output, with or without a cache, and a gradient."""
    layer = Attention(**LAYER, backend=backend).to(DEV)
    x = torch.randn(2, 0, 64, device=DEV, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 64)
    y.sum().backward()
    cache = layer.new_cache(2, 4)
    with torch.no_grad():
        assert layer(torch.randn(2, 0, 64, device=DEV), cache).shape == (2, 0, 64) and len(cache) == 0


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_gated_layer_accepts_zero_tokens(backend):
    """Gated attention (Qwen3-Next) on T = 0 too: the query/gate split names its sizes (a view with -1 cannot
    infer them from zero elements)."""
    layer = Attention(64, 4, 2, 16, gate=True, backend=backend).to(DEV)
    x = torch.randn(1, 0, 64, device=DEV, requires_grad=True)
    y = layer(x)
    assert y.shape == (1, 0, 64)
    y.sum().backward()
    assert x.grad.shape == (1, 0, 64)


@pytest.mark.parametrize("dtype,expected", [(torch.float32, "triton"), (torch.bfloat16, "naive"),
                                            (torch.float64, "naive")])
def test_layer_auto_backend(monkeypatch, dtype, expected):
    """backend="auto" runs the kernels where they run (CUDA; fp32 under the interpreter; never fp64, which they do
    not take) and attention_ref otherwise."""
    calls = []
    monkeypatch.setattr(layer_module, "flash_attention", lambda *a, **kw: calls.append("triton") or attention_ref(*a, **kw))
    monkeypatch.setattr(layer_module, "attention_ref", lambda *a, **kw: calls.append("naive") or attention_ref(*a, **kw))
    layer = Attention(**LAYER).to(dtype)
    assert layer.backend == "auto"
    with torch.no_grad():
        layer(torch.randn(1, 5, 64, dtype=dtype))
    if not runtime.interpreting():
        expected = "naive"  # CPU tensors without the interpreter: the kernels cannot run them
    assert calls == [expected]
    with torch.no_grad():  # and the layer on the device, where "auto" may choose otherwise
        y = layer.to(DEV)(torch.randn(1, 5, 64, dtype=dtype, device=DEV))
    assert y.dtype == dtype and (dtype != torch.float64 or calls[-1] == "naive")


@pytest.mark.parametrize("kw", LAYER_VARIANTS[1:], ids=lambda kw: ",".join(kw))
def test_layer_backends_agree(kw):
    """backend="triton" (section 1.5's kernels) equals backend="naive" (attention_ref), forward and gradients."""
    torch.manual_seed(4)
    naive = Attention(48, 6, 2, 16, backend="naive", **kw).to(DEV)
    triton_ = Attention(48, 6, 2, 16, backend="triton", **kw).to(DEV)
    triton_.load_state_dict(naive.state_dict())
    x = torch.randn(2, 21, 48, device=DEV, requires_grad=True)
    y_naive, y_triton = naive(x), triton_(x)
    assert_close("forward", y_naive, y_triton, 1e-5)
    (g_naive,), (g_triton,) = (torch.autograd.grad(y.square().sum(), x) for y in (y_naive, y_triton))
    assert_close("dx", g_naive, g_triton, 1e-5)


# ------------------------------------------------------------------------------------------------ cost model
def test_cost_model_counts():
    for Tq, Tk, causal, W in [(7, 7, True, None), (3, 11, True, None), (9, 9, True, 4), (2, 13, True, 5),
                              (6, 6, False, None), (1, 1, True, 1)]:
        assert attended_pairs(Tq, Tk, causal, W) == int(attention_mask(Tq, Tk, causal, W).sum()), (Tq, Tk, causal, W)
    assert attention_flops(1024, 64, 8, causal=False) == 4 * 1024**2 * 64 * 8  # FlashAttention-2's convention
    assert attention_flops(10, 16, 2, Dv=8, B=3) == 2 * 3 * 2 * (16 + 8) * 55
    # q, k, v, o once each; naive adds four passes over the scores
    assert attention_bytes(8, 16, 4, 2, materialize=False) == 2 * (8 * 4 * 16 * 2 + 8 * 2 * 16 * 2)
    assert attention_bytes(8, 16, 4, 2) - attention_bytes(8, 16, 4, 2, materialize=False) == 2 * 4 * 4 * 8 * 8
    assert kv_cache_bytes_per_token(32, 32, 128) == 512 * 1024  # Llama-2-7B in bf16
    with pytest.raises(ValueError):
        attended_pairs(4, 4, causal=False, window=2)


# -------------------------------------------------------------------------------------------------- exercises
def merge_right(m1, l1, a1, m2, l2, a2):
    m = torch.maximum(m1, m2)
    c1, c2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, c1 * l1 + c2 * l2, c1[:, None] * a1 + c2[:, None] * a2


def merge_no_rescale(m1, l1, a1, m2, l2, a2):
    return torch.maximum(m1, m2), l1 + l2, a1 + a2


def merge_unstable(m1, l1, a1, m2, l2, a2):  # exact in real numbers, overflows in fp32 for scores near 100
    m = torch.maximum(m1, m2)
    l = torch.exp(m1) * l1 + torch.exp(m2) * l2
    a = torch.exp(m1)[:, None] * a1 + torch.exp(m2)[:, None] * a2
    return m, l / torch.exp(m), a / torch.exp(m)[:, None]


def stub(*args):
    raise NotImplementedError


def test_softmax_state_merge_reference_is_exact():
    s, v = torch.randn(5, 12, dtype=torch.float64) * 4, torch.randn(12, 3, dtype=torch.float64)
    merged = merge_right(*softmax_state(s[:, :7], v[:7]), *softmax_state(s[:, 7:], v[7:]))
    for got, want in zip(merged, softmax_state(s, v)):
        torch.testing.assert_close(got, want)
    m, l, a = merged
    torch.testing.assert_close(a / l[:, None], torch.softmax(s, -1) @ v)


def test_check_online_softmax(capsys):
    check_online_softmax(merge_right)
    assert capsys.readouterr().out == "✓ online softmax merge: all 5 cases match\n"
    for wrong in (merge_no_rescale, merge_unstable):
        with pytest.raises(ExerciseError, match="online softmax merge: case"):
            check_online_softmax(wrong)
    with pytest.raises(ExerciseError, match="not implemented"):
        check_online_softmax(stub)


def decode_right(q, k, v):
    Tq, Tk = q.shape[0], k.shape[0]
    s = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def decode_top_left(q, k, v):  # the planted bug of exercise 2: the causal mask aligned top-left
    Tq, Tk = q.shape[0], k.shape[0]
    s = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def decode_off_by_one(q, k, v):  # hides the query's own key
    Tq, Tk = q.shape[0], k.shape[0]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq - 1)
    allowed[:, 0] = True  # keep every row non-empty
    s = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_check_decode_attention(capsys):
    check_decode_attention(decode_right)
    assert capsys.readouterr().out == "✓ decode attention: all 4 cases match\n"
    for wrong in (decode_top_left, decode_off_by_one):
        with pytest.raises(ExerciseError, match="decode attention: case"):
            check_decode_attention(wrong)
    with pytest.raises(ExerciseError, match="not implemented"):
        check_decode_attention(stub)


def kv_right(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2, window=None):
    sliding = seq_len if window is None else min(seq_len, window)
    tokens = [seq_len if t == "full_attention" else sliding if t == "sliding_attention" else 0 for t in layer_types]
    return sum(kv_cache_bytes_per_token(1, num_kv_heads, head_dim, dtype_bytes) * n * batch for n in tokens)


def kv_only_k(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2, window=None):
    return kv_right(layer_types, num_kv_heads, head_dim, seq_len, batch, dtype_bytes, window) // 2


def kv_ignores_window(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2, window=None):
    return kv_right(layer_types, num_kv_heads, head_dim, seq_len, batch, dtype_bytes, seq_len)


def kv_counts_linear_layers(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2, window=None):
    types = ["full_attention" if t == "linear_attention" else t for t in layer_types]
    return kv_right(types, num_kv_heads, head_dim, seq_len, batch, dtype_bytes, window)


def kv_no_window_no_cache(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2, window=None):
    return kv_right(layer_types, num_kv_heads, head_dim, seq_len, batch, dtype_bytes, window or 0)


def test_check_kv_cache_bytes(capsys):
    check_kv_cache_bytes(kv_right)
    assert capsys.readouterr().out == "✓ KV-cache bytes: all 7 cases match\n"
    for wrong in (kv_only_k, kv_ignores_window, kv_counts_linear_layers, kv_no_window_no_cache):
        with pytest.raises(ExerciseError, match="KV-cache bytes: case"):
            check_kv_cache_bytes(wrong)
    with pytest.raises(ExerciseError, match="not implemented"):
        check_kv_cache_bytes(stub)


def test_exercise3_figures():
    """The figures exercise 3's solution states: Qwen3-Next at 262,144 tokens, Gemma 3 4B at 128k."""
    qwen3_next = (["linear_attention"] * 3 + ["full_attention"]) * 12
    assert kv_right(qwen3_next, 2, 256, 262144) == 6 * 2**30
    assert kv_right(["full_attention"] * 48, 2, 256, 262144) == 24 * 2**30
    gemma3_4b = (["sliding_attention"] * 5 + ["full_attention"]) * 5 + ["sliding_attention"] * 4
    assert gemma3_4b.count("sliding_attention") == 29
    total = kv_right(gemma3_4b, 4, 256, 131072, window=1024)
    full_part = kv_right(["full_attention"] * 5, 4, 256, 131072)
    assert (total - full_part) / total < 0.05 and 2.5 * 2**30 <= total < 3 * 2**30


def _flash_tile(bug):
    """Exercise 4's kernel, right (bug=None) or with one planted bug; the checker must reject each bug."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(Q, K, V, O, T, scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BUG: tl.constexpr = 0):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        dims = tl.arange(0, D)
        q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=rows[:, None] < T, other=0.0)
        m = tl.full([BM], -1.0e30, tl.float32)
        l = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for start in range(0, T, BN):
            cols = start + tl.arange(0, BN)
            k = tl.load(K + cols[:, None] * D + dims[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(V + cols[:, None] * D + dims[None, :], mask=cols[:, None] < T, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            if BUG == 3:  # the stub: the loop body left empty
                pass
            elif BUG == 4:  # no running max: plain exp, exact until a score passes 88
                p = tl.exp(tl.where(cols[None, :] <= rows[:, None], s, float("-inf")))
                l = l + tl.sum(p, 1)
                acc = acc + tl.dot(p, v)
            else:
                if BUG == 1:  # off by one: a query does not see itself
                    s = tl.where(cols[None, :] < rows[:, None], s, float("-inf"))
                else:
                    s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = alpha * l + tl.sum(p, 1)
                if BUG == 2:  # forgets to rescale the accumulator when the max grows
                    acc = acc + tl.dot(p, v)
                else:
                    acc = alpha[:, None] * acc + tl.dot(p, v)
                m = m_new
        tl.store(O + rows[:, None] * D + dims[None, :], acc / l[:, None], mask=rows[:, None] < T)

    class Bound:  # kernel[grid](...) with the bug fixed in
        def __getitem__(self, grid):
            return lambda *args, **kw: kernel[grid](*args, **kw, BUG=bug)

    return Bound()


def test_check_flash_tile(capsys):
    check_flash_tile(_flash_tile(0))
    assert capsys.readouterr().out == "✓ flash tile: all 5 cases match causal attention_ref\n"
    for bug, T, why in [(1, 37, "check the mask"), (2, 37, "rescale l and acc"), (3, 37, "has not updated"),
                        (4, 29, "subtract the running max")]:
        with pytest.raises(ExerciseError, match=f"(?s)flash tile: T={T}, D=16: row .*{why}"):
            check_flash_tile(_flash_tile(bug))


def test_kv_cache_refuses_another_dtype():
    cache = KVCache(1, 8, 2, 16)
    k = make_bthd(1, 3, 2, 16)
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        cache.append(k.half(), k.half())
    cache.append(k, k)
    assert len(cache) == 3
