"""Chapter 3 (minisparse.mla): the MLA layer vs transformers' DeepseekV3Attention, absorption, the latent cache,
the Triton decode kernel vs the naive absorbed attention, the KV-cache formula vs real tensors, bad input, checkers.

Oracles: transformers' `DeepseekV3Attention` (with `q_proj` or `q_a_proj`/`q_b_proj`, both RoPE layouts, YaRN),
its YaRN frequencies (`ROPE_INIT_FUNCTIONS["yarn"]`) and its `DynamicCache` tensors; `mla_decode_ref`, built on
chapter 1's `attention_ref` (itself tested against SDPA). On a CPU the kernel runs in Triton's interpreter in fp32
at small shapes; on a GPU the same tests run on CUDA, plus bf16/fp16 versions against an fp32 reference computed
from the same rounded inputs (relative RMS ≤ 5e-3).
"""
import math
import types

import numpy as np
import pytest
import torch

from minisparse.mla import (MLA, GQAConfig, MLACache, MLAConfig, absorb_output, absorb_query, attention_family,
                            check_cache_numbers, check_fixed_absorbed_attention, check_full_rope_queries,
                            check_score_tile, buggy_absorbed_attention,
                            combine_splits, expand_latent, kv_cache_bytes, kv_values_per_token, mla_attention_absorbed,
                            mla_decode, mla_decode_bytes, mla_decode_flops, mla_decode_ref, mla_decode_splitk,
                            make_mla_rope, mla_softmax_scale, split_kv_b, yarn_frequencies, yarn_mscale)
from minisparse.mla import triton as mla_triton
from minisparse.mla.exercises import _full_rope_scores  # the forbidden route: the S keys formed and dotted
from minisparse import runtime
from minisparse.attention import apply_rope
from minisparse.testing import TOLERANCES, ExerciseError, assert_close, with_constexprs

try:  # the layer's oracles; the kernel tests run without transformers (e.g. on a bare GPU machine)
    import transformers
    from transformers import DeepseekV3Config, DynamicCache, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds
    from transformers.models.llama import modeling_llama as hf_llama
except ImportError:
    transformers = None
HF = pytest.mark.skipif(transformers is None, reason="the oracles are transformers' DeepSeek-V3 / Llama modules")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels are tested on a GPU (the "
                                                                "interpreter's bf16 tl.dot is wrong)")
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, num_hidden_layers=1, attn_implementation="eager")
YARN_TOY = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                beta_slow=1, mscale=1.0, mscale_all_dim=0.5)
YARN_V3 = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
               beta_slow=1, mscale=1.0, mscale_all_dim=1.0)  # the released DeepSeek-V3 checkpoints' setting


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _hf_attention(seed=0, **overrides):
    cfg = DeepseekV3Config(**{**TINY, **overrides})
    torch.manual_seed(seed)
    hf = hf_ds.DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.15)
    return hf.to(DEV), hf_ds.DeepseekV3RotaryEmbedding(cfg).to(DEV)


def _hf_forward(hf, rotary, x, positions, cache=None):
    T = x.shape[1]
    causal = torch.full((T, T), float("-inf"), device=x.device).triu(1)[None, None]
    with torch.no_grad():
        return hf(x, rotary(x, positions[None]), causal, cache)[0]  # positional: past_key_values was renamed cache


# ------------------------------------------------------------------------------------ the layer vs transformers
@HF
@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("interleave", [True, False])
def test_mla_matches_transformers(q_lora_rank, interleave):
    hf, rotary = _hf_attention(q_lora_rank=q_lora_rank, rope_interleave=interleave)
    x = torch.randn(2, 13, 64, generator=_gen(1)).to(DEV)
    pos = torch.arange(13, device=DEV)
    ref = _hf_forward(hf, rotary, x, pos)
    ours = MLA.from_hf(hf, backend="naive")
    assert (ours.q_proj is None) == (q_lora_rank is not None)
    assert set(ours.state_dict()) == set(hf.state_dict())  # transformers' parameter names, nothing more
    with torch.no_grad():
        assert_close("expanded", ref, ours(x), 1e-5)
        assert_close("absorbed", ref, ours(x, absorb=True), 1e-5)
        ours.backend = "triton" if DEV == "cuda" or runtime.interpreting() else "naive"
        assert_close(f"absorbed ({ours.backend})", ref, ours(x, absorb=True), 1e-4)
        assert_close(f"expanded ({ours.backend}: flash_attention)", ref, ours(x), 1e-4)
    # the layouts matter: a layer with the other RoPE pairing gives different outputs
    wrong = MLA.from_hf(hf, backend="naive")
    wrong.rope.interleaved = not interleave
    with torch.no_grad():
        assert not torch.allclose(wrong(x), ref, atol=1e-4)


@HF
@pytest.mark.parametrize("rope, start", [(YARN_TOY, 200), (YARN_V3, 150_000)], ids=["yarn-toy", "yarn-deepseek-v3"])
def test_mla_matches_transformers_with_yarn(rope, start):
    hf, rotary = _hf_attention(q_lora_rank=24, rope_parameters=dict(rope), max_position_embeddings=4 * start)
    ours = MLA.from_hf(hf, backend="naive")
    assert math.isclose(ours.scaling, hf.scaling, rel_tol=1e-12)
    assert ours.scaling != (16 + 8) ** -0.5  # the mscale² really applies
    x = torch.randn(1, 9, 64, generator=_gen(2)).to(DEV)
    pos = torch.arange(start, start + 9, device=DEV)
    ref = _hf_forward(hf, rotary, x, pos)
    with torch.no_grad():
        assert_close("yarn expanded", ref, ours(x, positions=pos), 1e-5)
        assert_close("yarn absorbed", ref, ours(x, positions=pos, absorb=True), 1e-5)


@pytest.mark.parametrize("rope_scaling", [None, YARN_TOY, dict(YARN_V3, attention_factor=1.3)],
                         ids=["plain", "yarn-toy", "yarn-v3-attention-factor"])
def test_rope_scores_depend_on_the_offset_only_at_negative_positions_too(rope_scaling):
    """A common shift of every position leaves q·k unchanged — below 0 too, where RotaryEmbedding computes the
    angles instead of reading its table: YaRN's frequencies and attention_factor hold there as well."""
    rope = make_mla_rope(32, 10000.0, interleaved=True, rope_scaling=rope_scaling)
    assert type(rope).__name__ == ("RotaryEmbedding" if rope_scaling is None else "YarnRotaryEmbedding")
    q, k = (torch.randn(1, 40, 1, 32, generator=_gen(seed), dtype=torch.float64) for seed in (30, 31))
    pos = torch.arange(40) * 9

    def scores(p):
        return rope(q, p)[0, :, 0] @ rope(k, p)[0, :, 0].T  # [40, 40]

    base = scores(pos)
    for shift in (-200, -5, 250):
        assert_close(f"shift {shift}", base, scores(pos + shift), 1e-5)
    x = torch.randn(1, 1, 1, 32, dtype=torch.float64)  # and position -7 undoes the table's position 7
    back = rope(rope(x, torch.tensor([-7])), torch.tensor([7])) / rope.attention_factor ** 2
    assert_close("R_7 R_-7 x", x, back, 1e-6)


@HF
@pytest.mark.parametrize("dim, factor, original, truncate", [(8, 4.0, 64, True), (64, 40.0, 4096, True),
                                                             (32, 8.0, 2048, False), (16, 2.0, 100, True)])
def test_yarn_frequencies_match_transformers(dim, factor, original, truncate):
    cfg = DeepseekV3Config(**{**TINY, "qk_rope_head_dim": dim}, rope_parameters=dict(
        YARN_TOY, factor=factor, original_max_position_embeddings=original, truncate=truncate, mscale=0.8,
        mscale_all_dim=0.3))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    assert_close("yarn inverse frequencies", inv_freq, yarn_frequencies(dim, 10000.0, factor, original,
                                                                        truncate=truncate), 1e-6)
    assert math.isclose(attention_factor, yarn_mscale(factor, 0.8) / yarn_mscale(factor, 0.3), rel_tol=1e-12)
    assert yarn_mscale(1.0, 5.0) == 1.0 and mla_softmax_scale(192) == 192**-0.5


# ------------------------------------------------------------------------------------ absorption and the cache
def test_absorption_is_exact_for_random_latents():
    g = _gen(3)
    B, S, H, r, dn, dr, dv = 2, 11, 3, 40, 12, 8, 10
    c, kr = torch.randn(B, S, r, generator=g, dtype=torch.float64), torch.randn(B, S, dr, generator=g,
                                                                               dtype=torch.float64)
    qn, qr = (torch.randn(B, S, H, d, generator=g, dtype=torch.float64) for d in (dn, dr))
    w = torch.randn(H * (dn + dv), r, generator=g, dtype=torch.float64)
    k, v = expand_latent(c, kr, w, H, dn, dv)
    assert k.shape == (B, S, H, dn + dr) and v.shape == (B, S, H, dv)
    assert torch.equal(k[:, :, 0, dn:], k[:, :, 2, dn:])  # the rotary key is shared by all heads
    from minisparse.attention import attention_ref

    ref = attention_ref(torch.cat([qn, qr], -1), k, v, scale=0.3)
    w_uk, w_uv = split_kv_b(w, H, dn, dv)
    out = absorb_output(mla_attention_absorbed(absorb_query(qn, w_uk), qr, c, kr, 0.3), w_uv)
    assert_close("absorbed", ref, out, 1e-12)
    with pytest.raises(ValueError, match="mla_attention_absorbed: scale must be given"):  # not the latent's
        mla_attention_absorbed(absorb_query(qn, w_uk), qr, c, kr, None)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_token_by_token_absorbed_decoding_equals_prefill(backend):
    torch.manual_seed(4)
    layer = MLA(96, 3, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24,
                backend=backend).to(DEV)
    with torch.no_grad():
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 14, 96, generator=_gen(5)).to(DEV)
        full = layer(x)  # expanded, one pass
        cache = layer.new_cache(2, 14)
        steps = [layer(x[:, :5], cache, absorb=True), layer(x[:, 5:8], cache, absorb=True)]
        steps += [layer(x[:, t:t + 1], cache, absorb=True) for t in range(8, 14)]
        cache2 = layer.new_cache(2, 14)
        expanded_steps = [layer(x[:, :8], cache2), layer(x[:, 8:], cache2)]  # expanding from the latent cache
    assert_close("absorbed decoding", full, torch.cat(steps, 1), 1e-4)
    assert_close("expanded decoding", full, torch.cat(expanded_steps, 1), 1e-5)
    assert len(cache) == 14 and torch.allclose(cache.buffer, cache2.buffer, atol=1e-5)  # same latents


@pytest.mark.parametrize("cached", [False, True], ids=["prefill", "after-a-cache"])
def test_expanded_form_on_flash_attention_matches_pytorch_with_gradients(cached):
    """backend="triton" runs the expanded form (the one that trains) on chapter 1's flash_attention: the output and
    the gradients of the input and of every parameter equal the PyTorch path's (attention_ref), at odd sizes (head
    dims 12 + 6 and 10, 19 tokens: no tile is full; YaRN's softmax scale), also for queries after cached tokens
    (Tq < Tk)."""
    torch.manual_seed(6)
    dtype = torch.float32 if DEV == "cpu" else runtime.default_dtype()
    sizes = dict(q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
                 rope_scaling=YARN_TOY)  # YaRN: a softmax scale other than flash_attention's default
    naive = MLA(48, 3, backend="naive", **sizes)
    with torch.no_grad():
        for p in naive.parameters():
            torch.nn.init.normal_(p, std=0.2)
    naive = naive.to(DEV, dtype)
    layers = {"naive": naive, "triton": MLA(48, 3, backend="triton", **sizes).to(DEV, dtype)}
    layers["triton"].load_state_dict(naive.state_dict())
    x = torch.randn(2, 19, 48, generator=_gen(8)).to(DEV, dtype)
    dy = torch.randn(2, 12 if cached else 19, 48, generator=_gen(9)).to(DEV, dtype)
    out = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        if cached:  # 7 tokens cached without a gradient, then 12 queries over all 19 keys
            cache = layer.new_cache(2, 19)
            with torch.no_grad():
                layer(xi[:, :7], cache)
            y = layer(xi[:, 7:], cache)
        else:
            y = layer(xi)
        grads = torch.autograd.grad(y, [xi, *layer.parameters()], dy)
        out[name] = (y, *grads)
    tol = TOLERANCES[dtype]
    names = ["output", "d input"] + [f"d {n}" for n, _ in naive.named_parameters()]
    for name, ref, ours in zip(names, out["naive"], out["triton"]):
        assert_close(name, ref.float(), ours.float(), tol[name != "output"])


def test_auto_backend_runs_the_expanded_form_on_flash_attention_where_it_fits(monkeypatch):
    """backend="auto" takes chapter 1's kernel for the expanded form where the kernels run (CUDA, or fp32 on a CPU
    under the interpreter) and the head dims fit it (≤ 256), and attention_ref otherwise."""
    from minisparse.attention import triton as attention_triton

    calls = []
    flash = attention_triton.flash_attention
    monkeypatch.setattr(attention_triton, "flash_attention", lambda *a, **kw: calls.append(a[0].shape) or flash(*a, **kw))
    fits = MLA(32, 2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8).to(DEV)
    wide = MLA(32, 2, kv_lora_rank=8, qk_nope_head_dim=256, qk_rope_head_dim=4, v_head_dim=8).to(DEV)
    x = torch.randn(1, 5, 32, device=DEV)
    with torch.no_grad():
        fits(x)
        wide(x)
        wide.backend = "triton"  # asked for: the kernel's own error, not a silent fallback
        with pytest.raises(ValueError, match="q/k head dim must be <= 256"):
            wide(x)
        fits.double()(x.double())  # fp64, the oracles' dtype: PyTorch under "auto"
    assert calls == ([(1, 5, 2, 12)] if DEV == "cuda" or runtime.interpreting() else []) + [(1, 5, 2, 260)]


def test_cache_holds_latent_and_rope_and_overflows():
    cache = MLACache(2, 5, 6, 4)
    c, kr = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    lat, rope = cache.append(c, kr)
    assert torch.equal(lat, c) and torch.equal(rope, kr) and lat.data_ptr() == cache.buffer.data_ptr()
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(torch.randn(2, 3, 6), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="kv_lora_rank=6"):
        cache.append(torch.randn(2, 1, 5), torch.randn(2, 1, 4))
    cache.reset()
    assert len(cache) == 0 and cache.latent.shape == (2, 0, 6)
    layer = MLA(32, 2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    cache = layer.new_cache(1, 4)
    layer(torch.randn(1, 4, 32), cache)
    with pytest.raises(ValueError, match="do not fit"):  # overflow past max_len through the layer
        layer(torch.randn(1, 1, 32), cache, absorb=True)



def test_cache_rejects_another_dtype():
    """A silent cast would round fp64 latents and overflow an fp16 cache (1e6 -> inf); KVCache raises the same way."""
    cache = MLACache(1, 4, 3, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"MLACache.append: c_kv and k_rope must be the cache's torch.float16, got "
                                        r"c_kv torch.float32 and k_rope torch.float32"):
        cache.append(torch.full((1, 1, 3), 1e6), torch.zeros(1, 1, 2))
    with pytest.raises(TypeError, match="got c_kv torch.float16 and k_rope torch.float64"):
        cache.append(torch.zeros(1, 1, 3, dtype=torch.float16), torch.zeros(1, 1, 2, dtype=torch.float64))
    assert len(cache) == 0 and not cache.buffer.any()  # nothing written
    layer = MLA(32, 2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    with pytest.raises(TypeError, match="make the cache with the layer's dtype"):
        layer(torch.randn(1, 2, 32), layer.new_cache(1, 4, dtype=torch.float64))

# ------------------------------------------------------------------------------------ the kernel vs the spec
DECODE_CASES = [  # B, T, H, Dc, Dr, S, lengths, kernel config (None = the default), split_len
    (3, 1, 3, 48, 16, 70, [70, 1, 33], dict(BLOCK_H=16, BLOCK_N=16), 32),  # ragged, 3 splits, partial tiles
    (2, 1, 5, 48, 16, 100, None, None, None),  # the default launch
    (2, 3, 5, 32, 8, 45, [45, 3], dict(BLOCK_H=16, BLOCK_N=16), 16),  # 3 queries a sequence (causal), Dr padded
    (2, 1, 20, 512, 64, 40, [40, 17], dict(BLOCK_H=16, BLOCK_N=16), 16),  # DeepSeek's latent, 2 head blocks
    (1, 2, 3, 512, 64, 5, None, None, None),  # DeepSeek's latent, tiny T
    (4, 1, 1, 16, 16, 37, [1, 2, 36, 37], dict(BLOCK_H=16, BLOCK_N=16), 64),  # one head, lengths 1 and 2
    (2, 1, 3, 48, 16, 70, [70, 50], dict(BLOCK_H=16, BLOCK_N=16), 24),  # splits that end inside a tile
]


def _decode_inputs(B, T, H, Dc, Dr, S, seed=7, dtype=torch.float32, device=DEV, score_scale=1.0):
    g = _gen(seed, device)
    f = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    return ((score_scale * f(B, T, H, Dc)).to(dtype), (score_scale * f(B, T, H, Dr)).to(dtype), f(B, S, Dc).to(dtype),
            f(B, S, Dr).to(dtype))


def _run(args, scale, lengths, config, split_len, out=None):
    """mla_decode with the launch table's tiles, or with `config` forced through runtime.launch_config and the
    split length forced to `split_len` (odd tiles and splits that the planner would not pick at these sizes)."""
    ql, qr, kv, kr = args
    if config is None and split_len is None:
        return mla_decode(ql, qr, kv, kr, scale, lengths, out=out)
    B, T, H, Dc = ql.shape
    out = torch.empty(B, T, H, Dc, dtype=ql.dtype, device=ql.device) if out is None else out
    with runtime.launch_config("mla.decode_split", **config):
        return mla_triton._launch(ql, qr, kv, kr, scale, lengths, out, kv.shape[1], split_len=split_len)


@pytest.mark.parametrize("B,T,H,Dc,Dr,S,lengths,config,split_len", DECODE_CASES)
def test_mla_decode_matches_reference(B, T, H, Dc, Dr, S, lengths, config, split_len):
    args = _decode_inputs(B, T, H, Dc, Dr, S)
    lens = None if lengths is None else torch.tensor(lengths, device=DEV)
    scale = (128 + Dr) ** -0.5
    out = _run(args, scale, lens, config, split_len)
    ref = mla_decode_ref(*args, scale, lens)
    assert_close("mla_decode", ref, out, TOLERANCES[torch.float32][0])
    if lens is not None:  # and against each sequence alone, cut to its length (an independent slicing)
        for b, n in enumerate(lengths):
            one = mla_attention_absorbed(args[0][b:b + 1], args[1][b:b + 1], args[2][b:b + 1, :n],
                                         args[3][b:b + 1, :n], scale)
            assert_close(f"sequence {b}", one[0], out[b], TOLERANCES[torch.float32][0])


def test_mla_decode_is_stable_for_large_scores():
    args = _decode_inputs(2, 1, 5, 48, 16, 80, score_scale=30.0)  # logits in the hundreds
    lens = torch.tensor([80, 23], device=DEV)
    out = _run(args, 0.5, lens, dict(BLOCK_H=16, BLOCK_N=16), 16)
    assert torch.isfinite(out).all()
    assert_close("large scores", mla_decode_ref(*args, 0.5, lens), out, TOLERANCES[torch.float32][0])


def test_mla_decode_reads_views_of_one_cache_buffer():
    cache = MLACache(2, 50, 48, 16, device=DEV)
    g = _gen(8, DEV)
    cache.append(torch.randn(2, 41, 48, generator=g, device=DEV), torch.randn(2, 41, 16, generator=g, device=DEV))
    ql, qr = torch.randn(2, 1, 3, 48, generator=g, device=DEV), torch.randn(2, 1, 3, 16, generator=g, device=DEV)
    out = mla_decode(ql, qr, cache.latent, cache.rope, 0.1)
    assert_close("strided cache", mla_decode_ref(ql, qr, cache.latent.contiguous(), cache.rope.contiguous(), 0.1), out,
                 TOLERANCES[torch.float32][0])


def test_mla_decode_writes_every_output_and_reads_only_written_partials(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mla_triton, "_empty", poisoned)
    args = _decode_inputs(3, 2, 5, 48, 16, 64)
    lens = torch.tensor([64, 2, 17], device=DEV)  # sequences 1 and 2 skip most splits: their slots stay NaN
    out = torch.full((3, 2, 5, 48), float("nan"), device=DEV)
    _run(args, 0.2, lens, dict(BLOCK_H=16, BLOCK_N=16), 16, out=out)
    assert torch.isfinite(out).all(), "an output element was never written, or a NaN partial slot was read"
    assert_close("poisoned", mla_decode_ref(*args, 0.2, lens), out, TOLERANCES[torch.float32][0])


@pytest.mark.parametrize("split_len", [8, 16, 100])
def test_splitk_in_pytorch_equals_reference(split_len):
    args = _decode_inputs(3, 2, 4, 24, 8, 50, device="cpu")
    lens = torch.tensor([50, 2, 31])
    assert_close("splitk", mla_decode_ref(*args, 0.3, lens), mla_decode_splitk(*args, 0.3, lens, split_len), 1e-5)


def test_split_planning():
    cpu, plan = torch.device("cpu"), mla_triton._plan_splits  # the CPU plans as if it had 4 SMs
    assert plan(64, 128, 2, 65536, cpu, 1152, 512) == (65536, 1)  # enough programs already: no split
    split_len, ns = plan(1, 128, 2, 65536, cpu, 1152, 512)
    assert ns == 2 and split_len == 32768  # 2 head blocks × 2 splits = the 4 SMs
    split_len, ns = plan(1, 16, 1, 300, cpu, 1152, 512)
    assert ns == 1 and split_len >= 300  # never a split shorter than 256 tokens
    split_len, ns = plan(1, 128, 1, 1000, cpu, 1152, 512)  # 256-token splits would give 3
    assert ns == 2 and split_len >= 8 * 128 * 512 // 1152  # the partial state must not outweigh the split
    assert all(plan(1, 8, 1, n, cpu, 1152, 512)[0] % 64 == 0 for n in (1, 63, 65, 1000, 4097))


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Dc,Dr,S,lengths", [(4, 1, 128, 512, 64, 3000, [3000, 1, 1777, 64]),
                                                   (2, 2, 5, 48, 16, 300, [300, 41]),
                                                   (1, 1, 16, 512, 64, 20000, None)])
def test_mla_decode_low_precision_on_gpu(dtype, B, T, H, Dc, Dr, S, lengths):
    args = _decode_inputs(B, T, H, Dc, Dr, S, dtype=dtype)
    lens = None if lengths is None else torch.tensor(lengths, device=DEV)
    out = mla_decode(*args, 192**-0.5, lens)
    assert out.dtype == dtype
    ref = mla_decode_ref(*(a.float() for a in args), 192**-0.5, lens)  # fp32 from the same rounded inputs
    assert_close(f"mla_decode {dtype}", ref, out.float(), TOLERANCES[dtype][0])


@CUDA
@pytest.mark.parametrize("H", [16, 128])
def test_every_configuration_of_the_split_row_matches_the_reference_on_gpu(H):
    """Each configuration of this GPU's "mla.decode_split" row (the candidates the benchmarks autotune over), forced
    in turn with the splits planned for it, at DeepSeek's latent in bf16: a configuration that miscompiles must not
    sit in a row."""
    args = _decode_inputs(2, 1, H, 512, 64, 3000, dtype=torch.bfloat16)
    lens = torch.tensor([3000, 1777], device=DEV)
    ref = mla_decode_ref(*(a.float() for a in args), 192**-0.5, lens)
    for config in runtime.launch_configs("mla.decode_split", DEV, torch.bfloat16):
        out = _run(args, 192**-0.5, lens, config, None)
        assert_close(f"mla_decode {config}", ref, out.float(), TOLERANCES[torch.bfloat16][0])


@CUDA
def test_mla_decode_large_batch_offsets_on_gpu():
    """64-bit batch offsets: the last sequence starts past 2**31 elements of a strided view."""
    B, S = 9, 500_000  # sequence 8 starts at 8 × 500,000 × 576 = 2.3e9 > 2**31 elements
    buf = torch.empty(B, S, 576, dtype=torch.bfloat16, device=DEV)
    buf[-1, :100].normal_()
    buf[0, :100].normal_()
    ql = torch.randn(B, 1, 16, 512, device=DEV, dtype=torch.bfloat16)
    qr = torch.randn(B, 1, 16, 64, device=DEV, dtype=torch.bfloat16)
    lens = torch.full((B,), 100, device=DEV)
    out = mla_decode(ql, qr, buf[..., :512], buf[..., 512:], 0.07, lens)
    for b in (0, B - 1):
        ref = mla_decode_ref(ql[b:b + 1].float(), qr[b:b + 1].float(), buf[b:b + 1, :100, :512].float(),
                             buf[b:b + 1, :100, 512:].float(), 0.07)
        assert_close(f"sequence {b}", ref, out[b:b + 1].float(), 5e-3)


# ------------------------------------------------------------------------------------ the cache formula
@HF
def test_kv_cache_bytes_matches_real_cache_tensors():
    layer = MLA(64, 4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    for dtype in (torch.float32, torch.bfloat16):
        cache = layer.new_cache(3, 17, dtype=dtype)
        assert cache.buffer.nbytes == kv_cache_bytes(layer, 17, dtype, batch=3)
    # transformers' own caches after a forward pass: DeepSeek-V3 caches the latent, Llama K and V
    hf, rotary = _hf_attention()
    cache = DynamicCache(config=hf.config)
    _hf_forward(hf, rotary, torch.randn(2, 7, 64, device=DEV), torch.arange(7, device=DEV), cache)
    held = sum(t.nbytes for lyr in cache.layers for t in (lyr.keys, lyr.values))
    assert held == kv_cache_bytes(hf.config, 7, torch.float32, batch=2) == 2 * 7 * (32 + 8) * 4
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1, head_dim=16)
    llama = hf_llama.LlamaAttention(cfg, layer_idx=0).eval()
    cache = DynamicCache(config=cfg)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        llama(x, hf_llama.LlamaRotaryEmbedding(cfg)(x, torch.arange(5)[None]), None, cache)
    held = sum(t.nbytes for lyr in cache.layers for t in (lyr.keys, lyr.values))
    assert held == kv_cache_bytes(cfg, 5, torch.float32, batch=3) and attention_family(cfg) == "GQA"


@HF
def test_kv_cache_bytes_of_real_models():
    assert kv_cache_bytes(DeepseekV3Config(), 1) == 61 * 576 * 2 == kv_cache_bytes(MLAConfig(), 1)
    assert kv_cache_bytes(transformers.FalconConfig(), 10, 2) == 10 * 32 * 2 * 64 * 2  # MQA by the multi_query flag
    kimi = transformers.KimiLinearConfig()
    assert kv_cache_bytes(kimi, 100, 1) == 100 * 6 * 576  # 6 MLA layers of 27
    assert attention_family(kimi) == "MLA" and attention_family(transformers.LlamaConfig()) == "MHA"
    mha = GQAConfig(61, 128, 128, head_dim=192, v_head_dim=128)
    assert kv_values_per_token(mha) == 128 * 320 and attention_family(GQAConfig(2, 8, 1, 4)) == "MQA"
    assert round(kv_cache_bytes(mha, 1) / kv_cache_bytes(MLAConfig(), 1)) == 71
    window = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                   layer_types=["sliding_attention", "full_attention"], sliding_window=10)
    assert kv_cache_bytes(window, 100, 1) == (10 + 100) * 4 * 16
    assert mla_decode_bytes(4096, B=16) == 16 * 4096 * 576 * 2
    assert mla_decode_flops(10, 128) == 2 * 128 * 10 * (1024 + 64)
    with pytest.raises(TypeError, match="dtype"):
        kv_cache_bytes(MLAConfig(), 10, "bf16")
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(MLAConfig(), -1)


@HF
def test_kv_cache_bytes_caps_every_layer_at_a_model_wide_sliding_window():
    mistral = transformers.MistralConfig()  # no layer_types; a 4096-token window in all 32 layers (v0.1)
    assert mistral.sliding_window == 4096 and getattr(mistral, "layer_types", None) is None
    per_token = 32 * 2 * 8 * 128 * 2  # layers · K and V · K/V heads · head_dim · bf16
    assert kv_cache_bytes(mistral, 32768) == 4096 * per_token == 2**29  # 0.5 GiB, as chapter 1 says
    assert kv_cache_bytes(mistral, 1000) == 1000 * per_token  # below the window: every token
    assert kv_cache_bytes(transformers.MistralConfig(sliding_window=None), 32768) == 32768 * per_token
    # no window: unchanged
    assert kv_cache_bytes(transformers.LlamaConfig(), 32768) == 32768 * kv_cache_bytes(transformers.LlamaConfig(), 1)
    qwen2 = transformers.Qwen2Config()  # a sliding_window field, but use_sliding_window=False
    assert kv_cache_bytes(qwen2, 32768) == 32768 * kv_cache_bytes(qwen2, 1)
    plain = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8, sliding_window=10)
    assert kv_cache_bytes(types.SimpleNamespace(**plain), 100, 1) == 2 * 10 * 4 * 16
    off = types.SimpleNamespace(**plain, use_sliding_window=False)  # the switch, where a config has it
    assert kv_cache_bytes(off, 100, 1) == 2 * 100 * 4 * 16


# ------------------------------------------------------------------------------------ bad input
def _good_decode_args():
    ql, qr, kv, kr = _decode_inputs(2, 1, 3, 48, 16, 20)
    return dict(q_latent=ql, q_rope=qr, kv_cache=kv, rope_cache=kr, scale=0.1, lengths=None)


def _lengths(*values):
    return torch.tensor(values, device=DEV)


# (what is wrong, the change to good arguments, exception, message): shared by the three decode ops
BAD_DECODE = [
    ("latent dim mismatch", lambda a: dict(kv_cache=a["kv_cache"][..., :40]), ValueError, r"kv_cache must be \[B, S, Dc\]"),
    ("rope dim mismatch", lambda a: dict(rope_cache=a["rope_cache"][..., :8]), ValueError,
     r"rope_cache must be \[B, S, Dr\]"),
    ("lengths beyond the cache", lambda a: dict(lengths=_lengths(20, 21)), ValueError, "lengths beyond the cache"),
    ("a length under T", lambda a: dict(q_latent=a["q_latent"][:, [0, 0]], q_rope=a["q_rope"][:, [0, 0]],
                                        lengths=_lengths(20, 1)), ValueError, r"lengths\[b\] >= T"),
    ("float lengths", lambda a: dict(lengths=torch.tensor([20.0, 3.0], device=DEV)), ValueError, "integer tensor"),
    ("bool lengths", lambda a: dict(lengths=torch.tensor([True, True], device=DEV)), ValueError, "integer tensor"),
    ("lengths of the wrong size", lambda a: dict(lengths=_lengths(20)), ValueError, r"integer tensor \[B=2\]"),
    ("lengths a list", lambda a: dict(lengths=[20, 20]), ValueError, "integer tensor"),
    ("cache of another batch", lambda a: dict(kv_cache=a["kv_cache"][:1], rope_cache=a["rope_cache"][:1]), ValueError,
     "kv_cache must be"),
    ("more queries than cached tokens", lambda a: dict(q_latent=a["q_latent"].expand(2, 30, 3, 48),
                                                       q_rope=a["q_rope"].expand(2, 30, 3, 16)), ValueError, "T <= S"),
    ("q_rope of other heads", lambda a: dict(q_rope=a["q_rope"][:, :, :2]), ValueError, r"q_rope must be \[B, T, H, Dr\]"),
    ("3-D q_latent", lambda a: dict(q_latent=a["q_latent"][:, 0]), ValueError, "4-D"),
    ("negative scale", lambda a: dict(scale=-1.0), ValueError, "scale must be a positive number"),
    ("no scale", lambda a: dict(scale=None), ValueError, "scale must be given"),
    ("mixed dtypes", lambda a: dict(q_rope=a["q_rope"].half()), TypeError, "share one dtype"),
    ("integer cache", lambda a: dict(kv_cache=a["kv_cache"].long()), TypeError, "share one dtype"),
    ("a list for a tensor", lambda a: dict(kv_cache=a["kv_cache"].tolist()), TypeError, "torch.Tensor"),
]
DECODE_OPS = {"mla_decode_ref": mla_decode_ref, "mla_decode_splitk": mla_decode_splitk, "mla_decode": mla_decode}


@pytest.mark.parametrize("op", list(DECODE_OPS))
@pytest.mark.parametrize("what, change, exc, match", BAD_DECODE, ids=[case[0] for case in BAD_DECODE])
def test_decode_ops_reject_bad_input(op, what, change, exc, match, value_checks):
    args = _good_decode_args()
    DECODE_OPS[op](**args)  # the good arguments pass ...
    args.update(change(args))
    with pytest.raises(exc, match=match):  # ... and each change alone is refused, naming what is wrong
        DECODE_OPS[op](**args)


BAD_KERNEL = [  # what only the Triton op refuses
    ("float64", lambda a: {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in a.items()}, TypeError,
     "float32, float16, bfloat16"),
    ("out of the wrong shape", lambda a: dict(out=torch.empty(2, 1, 3, 47, device=DEV)), ValueError, "out must be"),
    ("out of another dtype", lambda a: dict(out=torch.empty(2, 1, 3, 48, device=DEV, dtype=torch.float16)),
     ValueError, "out must be"),
    ("a gradient through the kernel", lambda a: dict(q_latent=a["q_latent"].clone().requires_grad_()), RuntimeError,
     "forward only.*torch.no_grad"),
    *([("bfloat16 in the interpreter", lambda a: {k: v.bfloat16() if isinstance(v, torch.Tensor) else v
                                                  for k, v in a.items()}, TypeError, "bfloat16 under the Triton")]
      if DEV == "cpu" else
      [("cache on another device", lambda a: dict(kv_cache=a["kv_cache"].cpu()), ValueError, "one device")]),
]


@pytest.mark.parametrize("what, change, exc, match", BAD_KERNEL, ids=[case[0] for case in BAD_KERNEL])
def test_mla_decode_rejects_what_the_kernel_cannot_run(what, change, exc, match):
    args = _good_decode_args()
    args.update(change(args))
    with pytest.raises(exc, match=match):
        mla_decode(**args)


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter switch matters on CPU tensors")
def test_mla_decode_on_cpu_without_the_interpreter_says_how_to_turn_it_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mla_decode(**_good_decode_args())


def test_mla_decode_reads_lengths_back_only_when_checking_values(monkeypatch):
    """The range check of lengths is a host read: on CUDA tensors it runs only after set_value_checks(True). With
    value checks off the kernel plans for all S slots instead of max(lengths)."""
    seen = []
    real = mla_triton._launch
    monkeypatch.setattr(mla_triton, "_launch", lambda *a, **k: (seen.append(a[7]), real(*a, **k))[1])
    args = _good_decode_args()
    args["lengths"] = _lengths(9, 7)
    mla_decode(**args)
    assert seen[-1] == (9 if DEV == "cpu" else 20)
    monkeypatch.setattr(runtime, "checking_values", lambda dev: False)  # the CUDA default, on any device
    args["lengths"] = _lengths(21, 7)  # out of range, and not read back: the planner sees S
    checked = []
    monkeypatch.setattr(mla_triton, "_launch", lambda *a, **k: checked.append(a[7]))
    mla_decode(**args)
    assert checked == [20]
    monkeypatch.setattr(runtime, "checking_values", lambda dev: True)  # set_value_checks(True), or a CPU tensor
    with pytest.raises(ValueError, match="lengths beyond the cache"):
        mla_decode(**args)


MLA_SIZES = dict(hidden_size=32, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
BAD_LAYER = [  # (what is wrong, constructor arguments changed, exception, message naming the argument)
    ("no heads", dict(num_heads=0), ValueError, "num_heads must be an int > 0, got 0"),
    ("negative kv_lora_rank", dict(kv_lora_rank=-4), ValueError, "kv_lora_rank must be an int > 0, got -4"),
    ("zero q_lora_rank", dict(q_lora_rank=0), ValueError, "q_lora_rank .*must be an int > 0, got 0"),
    ("fractional q_lora_rank", dict(q_lora_rank=2.5), ValueError, "q_lora_rank .*must be an int > 0, got 2.5"),
    ("zero qk_nope_head_dim", dict(qk_nope_head_dim=0), ValueError, "qk_nope_head_dim must be an int > 0"),
    ("negative qk_rope_head_dim", dict(qk_rope_head_dim=-2), ValueError, "qk_rope_head_dim must be an int > 0"),
    ("odd qk_rope_head_dim", dict(qk_rope_head_dim=3), ValueError, "qk_rope_head_dim must be even"),
    ("zero v_head_dim", dict(v_head_dim=0), ValueError, "v_head_dim must be an int > 0"),
    ("no hidden size", dict(hidden_size=0), ValueError, "hidden_size must be an int > 0"),
    ("heads as a bool", dict(num_heads=True), ValueError, "num_heads must be an int > 0"),
    ("zero norm_eps", dict(norm_eps=0.0), ValueError, "norm_eps must be a positive number"),
    ("negative rope_theta", dict(rope_theta=-1.0), ValueError, "rope_theta must be a positive number"),
    ("an unknown backend", dict(backend="flash"), ValueError, "backend must be 'auto', 'naive' or 'triton'"),
    ("YaRN factor 0", dict(rope_scaling=dict(rope_type="yarn", factor=0.0, original_max_position_embeddings=16)),
     ValueError, r"rope_scaling\['factor'\] must be a finite number > 0"),
    ("YaRN without a factor", dict(rope_scaling=dict(rope_type="yarn", original_max_position_embeddings=16)),
     ValueError, r"rope_scaling\['factor'\]"),
    ("YaRN without a context", dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), ValueError,
     r"rope_scaling\['original_max_position_embeddings'\]"),
]


def test_caches_and_router_name_bad_sizes():
    """Cache constructors (chapters 1, 3, 8) and the router (chapter 2) say which size is wrong."""
    from minisparse.attention import KVCache
    from minisparse.dsa import DSACache
    from minisparse.mla import MLACache
    from minisparse.moe import Router

    for call, match in ((lambda: KVCache(-1, 8, 2, 4), "KVCache: batch"), (lambda: KVCache(1, 0, 2, 4), "max_len"),
                        (lambda: MLACache(2, -1, 16, 4), "MLACache: max_len"),
                        (lambda: DSACache(2, 8, 16, 4, -1), "DSACache: index_dim"),
                        (lambda: Router(32, 4, 2)(torch.randn(3, 16)), "hidden = 32"),
                        (lambda: Router(32, 4, 2)(torch.randn(2, 3, 32)), r"x must be 2-D \[N, hidden\]")):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("what, change, exc, match", BAD_LAYER, ids=[case[0] for case in BAD_LAYER])
def test_mla_constructor_names_the_bad_argument(what, change, exc, match):
    kw = {**MLA_SIZES, **change}
    with pytest.raises(exc, match=match):
        MLA(kw.pop("hidden_size"), kw.pop("num_heads"), **kw)


def _small_mla(**kw):
    return MLA(MLA_SIZES["hidden_size"], MLA_SIZES["num_heads"],
               **{k: v for k, v in MLA_SIZES.items() if k not in ("hidden_size", "num_heads")}, **kw).to(DEV)


BAD_FORWARD = [  # (what is wrong, the input, exception, message)
    ("another hidden size", lambda: torch.randn(1, 3, 31, device=DEV), ValueError, r"\[B, T, hidden\] with hidden = 32"),
    ("no batch dimension", lambda: torch.randn(3, 32, device=DEV), ValueError, "3-D"),
    ("fp16 input to an fp32 layer", lambda: torch.randn(1, 3, 32, device=DEV, dtype=torch.float16), TypeError,
     "x is torch.float16 but the layer's parameters are torch.float32"),
    ("a list", lambda: [[0.0] * 32], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("what, make, exc, match", BAD_FORWARD, ids=[case[0] for case in BAD_FORWARD])
def test_mla_forward_names_what_is_wrong_with_its_input(what, make, exc, match):
    with pytest.raises(exc, match=match):
        _small_mla()(make())


def test_mla_positions_are_checked_by_the_layer():
    """Positions of the wrong length or dtype: the layer's own name, not RotaryEmbedding's."""
    x = torch.randn(1, 3, 32, device=DEV)
    with pytest.raises(ValueError, match=r"^MLA: positions must be \[T\]=\[3\]"):
        _small_mla()(x, positions=torch.arange(4, device=DEV))
    with pytest.raises(TypeError, match="^MLA: positions must be integers"):
        _small_mla()(x, positions=torch.arange(3.0, device=DEV))


def test_mla_backend_is_checked_when_reassigned():
    layer = _small_mla()
    layer.backend = "ref"
    with pytest.raises(ValueError, match="backend must be 'auto', 'naive' or 'triton', got 'ref'"):
        layer(torch.randn(1, 3, 32, device=DEV), absorb=True)


@pytest.mark.parametrize("backend", ["naive", "triton"])
@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_mla_accepts_zero_new_tokens(backend, absorb):
    """T = 0 gives an empty output, with or without a cache, and leaves the cache as it was."""
    torch.manual_seed(10)
    layer = _small_mla(backend=backend)
    x = torch.randn(2, 5, 32, device=DEV)
    with torch.no_grad():
        assert layer(x[:, :0], absorb=absorb).shape == (2, 0, 32)
        cache = layer.new_cache(2, 5)
        first = layer(x[:, :3], cache, absorb=absorb)
        assert layer(x[:, 3:3], cache, absorb=absorb).shape == (2, 0, 32) and len(cache) == 3
        rest = layer(x[:, 3:], cache, absorb=absorb)
        assert_close("decoding after an empty step", layer(x), torch.cat([first, rest], 1), 1e-4)


def test_mla_auto_backend_uses_pytorch_when_gradients_are_needed():
    layer = _small_mla(backend="triton")
    with pytest.raises(RuntimeError, match="forward only"):  # an explicit backend="triton" does not fall back
        layer(torch.randn(1, 3, 32, device=DEV), absorb=True)
    layer.backend = "auto"  # ... "auto" uses PyTorch when gradients are needed, so training works everywhere
    layer(torch.randn(1, 3, 32, device=DEV), absorb=True).sum().backward()
    assert layer.kv_b_proj.weight.grad is not None


def test_mla_auto_backend_runs_fp64_naively():
    """backend="auto" falls back to PyTorch for fp64 on the absorbed path (the decoding kernel takes fp32/fp16/bf16
    only)."""
    absorb = True
    torch.manual_seed(27)
    auto = _small_mla().double()
    naive = _small_mla(backend="naive").double()
    naive.load_state_dict(auto.state_dict())
    x = torch.randn(2, 5, 32, dtype=torch.float64, device=DEV)
    with torch.no_grad():
        y = auto(x, absorb=absorb)
        assert y.dtype == torch.float64
        assert_close("fp64 auto", naive(x, absorb=absorb), y, 1e-10)


# ------------------------------------------------------------------------------------ the exercise checkers
def _rope_right(q, c, w_uk, t, theta):  # [S, r]: W_ukᵀ R_(t-s) q
    q_rot = apply_rope(q.expand(c.shape[0], -1)[None, :, None], t - torch.arange(c.shape[0]), theta)[0, :, 0]
    return q_rot @ w_uk


def _rope_absorbed_once(q, c, w_uk, t, theta):  # folds W_uk into the unrotated query: right at s = t only
    return (w_uk.T @ q).expand(c.shape[0], -1)


def test_absorbing_once_under_full_rope_is_exact_only_at_offset_zero():
    # exercise 1's point: with RoPE on the whole key, one absorbed query is right at s = t only, and the S queries
    # of the solution give the rotated keys' scores
    g = torch.Generator().manual_seed(2)
    q, c, w = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(16,), (12, 32), (16, 32)])
    scores = _full_rope_scores(q, c, w, 11, 100.0)
    assert_close("scores from the S absorbed queries", scores, (_rope_right(q, c, w, 11, 100.0) * c).sum(-1), 1e-12)
    wrong = (_rope_absorbed_once(q, c, w, 11, 100.0) * c).sum(-1) - scores
    assert wrong[11].abs() < 1e-9 < wrong[:11].abs().min()


def _rope_wrong_sign(q, c, w_uk, t, theta):  # rotates by s - t instead of t - s
    q_rot = apply_rope(q.expand(c.shape[0], -1)[None, :, None], torch.arange(c.shape[0]) - t, theta)[0, :, 0]
    return q_rot @ w_uk


def _rope_through_the_keys(q, c, w_uk, t, theta):  # right scores, found by forming the keys, spread along each c_s
    return _full_rope_scores(q, c, w_uk, t, theta)[:, None] * c / c.square().sum(-1, keepdim=True)


def test_the_key_forming_answer_has_the_right_scores_but_fails():
    # what makes _rope_through_the_keys a known-wrong answer: its scores are right; only its rows give it away
    g = torch.Generator().manual_seed(3)
    q, c, w = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(16,), (9, 24), (16, 24)])
    rows = _rope_through_the_keys(q, c, w, 8, 100.0)
    assert_close("its scores", _full_rope_scores(q, c, w, 8, 100.0), (rows * c).sum(-1), 1e-12)
    with pytest.raises(ExerciseError, match="relative RMS error"):
        check_full_rope_queries(_rope_through_the_keys)
    with pytest.raises(ExerciseError, match=r"expected shape \(5, 12\), got \(5,\)"):  # the scores themselves
        check_full_rope_queries(_full_rope_scores)


def _numbers_right():
    return 78 * 576, 32768 * 12 * 576 * 2, 128 * 256 / 576, 128 * 320 / 576


def _numbers_no_rope():  # forgets the shared rotary key
    return 78 * 512, 32768 * 12 * 512 * 2, 128 * 256 / 512, 128 * 320 / 512


def _numbers_all_layers():  # counts the linear-attention layers as MLA
    return 78 * 576, 32768 * 48 * 576 * 2, 128 * 256 / 576, 128 * 320 / 576


def _numbers_192_baseline():  # the 192-d keys in the baseline
    return 78 * 576, 32768 * 12 * 576 * 2, 128 * 320 / 576, 128 * 320 / 576


def _attention_top_left_mask(q_nope, q_rope, c_kv, k_rope, w_kv_b, dn, dv):  # queries at 0 .. T-1
    H, T, S = q_nope.shape[2], q_nope.shape[1], c_kv.shape[1]
    w = w_kv_b.view(H, dn + dv, -1)
    q = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w[:, :dn]), q_rope], -1)
    s = torch.einsum("bthe,bse->bths", q, torch.cat([c_kv, k_rope], -1)) * (dn + q_rope.shape[-1]) ** -0.5
    p = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril()[None, :, None], float("-inf")).softmax(-1)
    return torch.einsum("bths,bsr,hvr->bthv", p, c_kv, w[:, dn:])


def _attention_right(q_nope, q_rope, c_kv, k_rope, w_kv_b, dn, dv):
    H = q_nope.shape[2]
    w_uk, w_uv = split_kv_b(w_kv_b, H, dn, dv)
    o = mla_attention_absorbed(absorb_query(q_nope, w_uk), q_rope, c_kv, k_rope, (dn + q_rope.shape[-1]) ** -0.5)
    return absorb_output(o, w_uv)


def _stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("checker, right, wrongs", [
    (check_full_rope_queries, _rope_right, [_rope_absorbed_once, _rope_wrong_sign, _rope_through_the_keys,
                                            _full_rope_scores]),
    (check_cache_numbers, _numbers_right, [_numbers_no_rope, _numbers_all_layers, _numbers_192_baseline]),
    (check_fixed_absorbed_attention, _attention_right, [buggy_absorbed_attention, _attention_top_left_mask]),
], ids=["full_rope_queries", "cache_numbers", "fixed_absorbed_attention"])
def test_checkers_accept_right_and_reject_wrong_answers(capsys, checker, right, wrongs):
    checker(right)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("✓")
    for wrong in wrongs:
        with pytest.raises(ExerciseError, match="✗"):
            checker(wrong)
    with pytest.raises(ExerciseError, match="not implemented"):
        checker(_stub)


@pytest.mark.parametrize("wrap", [np.float32, np.float64, torch.tensor, lambda v: torch.tensor([v], dtype=torch.float64)],
                         ids=["np.float32", "np.float64", "0-d tensor", "one-element tensor"])
def test_cache_numbers_takes_right_numbers_in_any_form(capsys, wrap):
    check_cache_numbers(lambda: tuple(map(wrap, _numbers_right())))
    assert capsys.readouterr().out.startswith("✓ cache numbers")
    for wrong in (_numbers_no_rope, _numbers_all_layers, _numbers_192_baseline):
        with pytest.raises(ExerciseError, match="which is not right"):
            check_cache_numbers(lambda: tuple(map(wrap, wrong())))  # noqa: B023
    with pytest.raises(ExerciseError, match="number 3 .*must be a number"):
        check_cache_numbers(lambda: (*_numbers_right()[:2], "0.44", 1.0))


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _tile_right(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, s_ptr, S, scale, H: tl.constexpr, DC: tl.constexpr,
                DR: tl.constexpr, BLOCK_N: tl.constexpr, MASK_SHIFT: tl.constexpr = 0, ROPE: tl.constexpr = 1):
    blk, b = tl.program_id(0), tl.program_id(1)
    h, dc, dr = tl.arange(0, H), tl.arange(0, DC), tl.arange(0, DR)
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cache = n < S
    ql = tl.load(ql_ptr + b * H * DC + h[:, None] * DC + dc[None, :])
    qr = tl.load(qr_ptr + b * H * DR + h[:, None] * DR + dr[None, :])
    c = tl.load(kv_ptr + b * S * DC + n[:, None] * DC + dc[None, :], mask=in_cache[:, None], other=0.0)
    kr = tl.load(kr_ptr + b * S * DR + n[:, None] * DR + dr[None, :], mask=in_cache[:, None], other=0.0)
    length = tl.load(len_ptr + b)
    s = tl.dot(ql, tl.trans(c))
    if ROPE:
        s += tl.dot(qr, tl.trans(kr))
    s = s * scale
    s = tl.where(n[None, :] < length + MASK_SHIFT, s, float("-inf"))
    tl.store(s_ptr + b * H * S + h[:, None] * S + n[None, :], s, mask=in_cache[None, :])


def test_score_tile_checker_accepts_the_solution_and_names_what_differs(capsys):
    check_score_tile(_tile_right)
    assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(ExerciseError, match="must be -inf"):
        check_score_tile(with_constexprs(_tile_right, MASK_SHIFT=1))  # off by one: position lengths[b] kept
    with pytest.raises(ExerciseError, match="must not be masked"):
        check_score_tile(with_constexprs(_tile_right, MASK_SHIFT=-1))
    with pytest.raises(ExerciseError, match="both terms"):
        check_score_tile(with_constexprs(_tile_right, ROPE=0))  # the content term only


def test_combine_splits_reference_handles_empty_splits():
    m = torch.tensor([[1.0, float("-inf")], [float("-inf"), 2.0], [0.5, 3.0]])
    l = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5]])
    acc = torch.randn(3, 2, 4, generator=_gen(9))
    acc[0, 1] = acc[1, 0] = 0
    out = combine_splits(m, l, acc)
    w0 = torch.exp(torch.tensor([1.0, 0.5]) - 1.0)
    assert_close("row 0", (w0[0] * acc[0, 0] + w0[1] * acc[2, 0]) / (w0[0] * 2 + w0[1] * 1), out[0], 1e-6)


@HF
def test_from_hf_rejects_rope_types_it_does_not_implement():
    hf, _ = _hf_attention(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))
    with pytest.raises(NotImplementedError, match="linear"):
        MLA.from_hf(hf)


@HF
def test_from_hf_names_the_module_it_expects():
    """Another attention module fails at once, naming DeepseekV3Attention (it was an AttributeError from inside the
    loader: 'LlamaConfig' object has no attribute 'q_lora_rank')."""
    llama = hf_llama.LlamaAttention(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2), 0)
    for module, what in ((llama, r"got LlamaAttention \(it has no kv_a_proj_with_mqa, "),
                         (torch.nn.Linear(4, 4), r"got Linear \(it has no scaling, "), (None, "got NoneType$")):
        with pytest.raises(TypeError, match=r"MLA.from_hf: module must be transformers' DeepseekV3Attention \(MLA\), "
                                            + what):
            MLA.from_hf(module)

def _no_config_fits(*args, **kwargs):
    """What runtime.launch raises when no configuration of the row fits the GPU's shared memory (a T4 at Dc = 512)."""
    raise runtime.SharedMemoryError("mla.decode_split: the kernel needs more shared memory than this GPU gives a "
                                    "block")


def test_mla_decode_falls_back_to_pytorch_when_no_configuration_fits(monkeypatch):
    """mla_decode warns and answers with mla_decode_ref (into `out` when given) instead of failing."""
    monkeypatch.setattr(runtime, "launch", _no_config_fits)
    ql, qr, kv, kr = _decode_inputs(2, 1, 4, 64, 16, 40)[:4]
    lens = torch.tensor([40, 17], device=DEV)
    out = torch.full((2, 1, 4, 64), float("nan"), device=DEV)
    with pytest.warns(UserWarning, match="shared memory.*mla_decode_ref"):
        got = mla_decode(ql, qr, kv, kr, 0.1, lens, out=out)
    assert got is out
    assert_close("fallback", mla_decode_ref(ql, qr, kv, kr, 0.1, lens), out, 1e-6)


def test_mla_decode_does_not_hide_other_launch_errors(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(runtime, "launch", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        mla_decode(**_good_decode_args())


# ------------------------------------------------------------------------------------ the launch
class _RecordedLaunches:
    """runtime.launch, recording each call's kernel name, fit and autotune key before launching."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, kernel, fn, grid, args, constexprs, **kw):
        self.calls.append(dict(kernel=kernel, fit=kw.get("fit"), autotune_key=kw.get("autotune_key"),
                               prefer=kw.get("prefer"), key=kw.get("key")))
        return self.real(kernel, fn, grid, args, constexprs, **kw)


def test_mla_decode_launches_both_kernels_through_the_launch_table(monkeypatch):
    launches = _RecordedLaunches(runtime.launch)
    monkeypatch.setattr(runtime, "launch", launches)
    args = _good_decode_args()
    assert_close("launch", mla_decode_ref(**args), mla_decode(**args), TOLERANCES[torch.float32][0])
    assert [c["kernel"] for c in launches.calls] == ["mla.decode_split", "mla.decode_combine"]
    assert launches.calls[0]["autotune_key"] == ["ROWS", "NS", "split_len", "DC", "DR"]  # tuned per shape
    # 3 query rows prefer head blocks of 16, and the remembered choice is kept per padded row count
    prefer = launches.calls[0]["prefer"]
    assert prefer(dict(BLOCK_H=16)) and not prefer(dict(BLOCK_H=32)) and launches.calls[0]["key"][-1] == 16


@pytest.mark.parametrize("rows,block_h", [(1, 16), (16, 16), (20, 32), (40, 64), (128, 64)])
def test_the_split_plan_prefers_a_head_block_as_tall_as_the_query_rows(monkeypatch, rows, block_h):
    """On the H200's row: 16 rows (16 heads, one token) get a block of 16, not the row's first 64; 20 rows one of
    32; rows past the tallest block keep the row's first. The plan and the launch read the same order."""
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_90")
    monkeypatch.setattr(runtime, "_rows", {})
    first = mla_triton._first_split_config("cuda", torch.bfloat16, mla_triton._split_tiles(512),
                                           mla_triton._rows_tile(rows))
    assert first["BLOCK_H"] == block_h
    if rows <= 16:
        assert first == dict(BLOCK_H=16, BLOCK_N=128, num_warps=8, num_stages=2)  # 3.6 TB/s at 16 heads


def test_split_tiles_shorten_token_tiles_for_large_latents():
    entry = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2)
    assert mla_triton._split_tiles(512)(entry) == entry  # the rows are sized for a latent of 512 ...
    assert mla_triton._split_tiles(64)(entry) == entry
    assert mla_triton._split_tiles(1024)(entry)["BLOCK_N"] == 32  # ... twice the latent, half the tokens a tile
    assert mla_triton._split_tiles(4096)(dict(entry, BLOCK_N=32))["BLOCK_N"] == 16  # never under 16
    assert mla_triton._split_tiles(512, rows=128, block_h=32)(entry)["BLOCK_H"] == 32  # 2 head blocks -> 4
    assert mla_triton._split_tiles(512, rows=16, block_h=32)(entry)["BLOCK_H"] == 64  # 1 head block either way


def test_mla_decode_at_a_latent_over_512_matches_the_reference():
    args = _decode_inputs(2, 1, 3, 1000, 16, 40)
    lens = torch.tensor([40, 9], device=DEV)
    assert_close("Dc = 1000", mla_decode_ref(*args, 0.05, lens), mla_decode(*args, 0.05, lens),
                 TOLERANCES[torch.float32][0])


@pytest.mark.parametrize("block_h", [16, 32])
def test_split_plan_uses_the_forced_block_h(monkeypatch, block_h):
    """The host plans the splits for the BLOCK_H the kernel launches with: a forced configuration's."""
    planned = []
    real = mla_triton._plan_splits
    monkeypatch.setattr(mla_triton, "_plan_splits", lambda *a, **k: (planned.append(a[2]), real(*a, **k))[1])
    args = _decode_inputs(1, 1, 40, 48, 16, 30)
    with runtime.launch_config("mla.decode_split", BLOCK_H=block_h, BLOCK_N=16, num_warps=4, num_stages=1):
        out = mla_decode(*args, 0.1)
    assert planned == [math.ceil(40 / block_h)]  # head blocks of the forced BLOCK_H
    assert_close("forced", mla_decode_ref(*args, 0.1), out, TOLERANCES[torch.float32][0])


@pytest.mark.parametrize("H", [3, 40])
def test_autotuning_keeps_the_head_blocks_the_splits_were_planned_for(monkeypatch, H):
    """With autotuning on, every candidate launches with as many head blocks as the splits were planned for: its own
    BLOCK_H where that gives the same count, else the planned BLOCK_H. Off, the row's entries keep their own, so a GPU
    with less shared memory can fall back to narrower ones. Checked on the sm_90 row (entries of BLOCK_H 64, 32 and
    16) with a forced BLOCK_H of 64: 3 heads make one block either way, 40 heads one block of 64, two of 32 or three
    of 16."""
    launches = _RecordedLaunches(runtime.launch)
    monkeypatch.setattr(runtime, "launch", launches)
    row = runtime.LAUNCH_TABLE["mla.decode_split"]["sm_90"]
    assert {c["BLOCK_H"] for c in row} == {16, 32, 64}
    args = _good_decode_args()
    args["q_latent"], args["q_rope"] = args["q_latent"][:, :, [0] * H], args["q_rope"][:, :, [0] * H]
    previous = runtime.set_autotune(True)
    try:  # the interpreter never autotunes, but the fit handed to runtime.launch is the one a GPU uses
        with runtime.launch_config("mla.decode_split", BLOCK_H=64, BLOCK_N=16):
            mla_decode(**args)
    finally:
        runtime.set_autotune(previous)
    tuned = [launches.calls[0]["fit"](c)["BLOCK_H"] for c in row]
    assert tuned == ([c["BLOCK_H"] for c in row] if H == 3 else [64] * len(row))
    assert {math.ceil(H / b) for b in tuned} == {math.ceil(H / 64)}
    mla_decode(**args)
    assert [launches.calls[-2]["fit"](c)["BLOCK_H"] for c in row] == [c["BLOCK_H"] for c in row]
