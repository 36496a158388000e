"""Chapter 9: the models side by side — HybridConfig validation, decoding = prefill for every preset (and NSA), one
training step per preset, parameter counts against transformers' models built on the meta device, the cache
sizes, checkpoint resume, the training script (one process and two under torchrun/gloo), the exercise checkers."""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import minisparse  # noqa: F401  before anything that imports triton
import triton
import triton.language as tl
from minisparse import models as M
from minisparse import runtime
from minisparse.models import exercises as X
from minisparse.models import training as TR
from minisparse.testing import ExerciseError, assert_close

try:
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError:
    transformers = None
HF = pytest.mark.skipif(transformers is None, reason="the oracles are transformers' ForCausalLM models")
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bad, field, want", [
    (dict(pattern="GGGX"), "pattern", "unknown mixer letters"), (dict(pattern=""), "pattern", "non-empty"),
    (dict(pattern="GGGF", num_layers=6), "num_layers", "multiple of len"), (dict(num_heads=5), "num_heads", "divide"),
    (dict(num_kv_heads=3), "num_kv_heads", "divide num_heads"), (dict(hidden_size=0), "hidden_size", "int >= 1"),
    (dict(head_dim=0), "head_dim", "int >= 1 or None"), (dict(num_experts=-1), "num_experts", "int >= 0"),
    (dict(num_experts=4, top_k=5), "top_k", "<= num_experts"),
    (dict(num_experts=4, router="mixtral"), "router", "'softmax' or"),
    (dict(n_group=0), "n_group", "int >= 1"), (dict(num_experts=8, n_group=3), "n_group", "divide num_experts = 8"),
    (dict(num_experts=8, n_group=2, topk_group=3), "topk_group", "<= n_group = 2"),
    (dict(num_experts=8, n_group=4, top_k=3), "top_k", "topk_group x experts a group = 2"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor", "> 0"),
    (dict(shared_intermediate_size=-1), "shared_intermediate_size", "int >= 0"),
    (dict(rotary_dim=7), "rotary_dim", "even"), (dict(rotary_dim=18), "rotary_dim", "<= the head dim 16"),
    (dict(linear_num_heads=4, linear_num_k_heads=3), "linear_num_k_heads", "divide linear_num_heads"),
    (dict(conv_kernel_size=1), "conv_kernel_size", "int >= 2"),
    (dict(lightning_block_size=0), "lightning_block_size", "int >= 1"),
    (dict(nsa_block_size=12), "nsa_block_size", "power of two"), (dict(nsa_block_counts=2), "nsa_block_counts", ">= 3"),
    (dict(nsa_window=-1), "nsa_window", "int >= 0"),
    (dict(first_dense_layers=9), "first_dense_layers", "num_layers = 4"), (dict(backend="cuda"), "backend", "'auto'"),
    (dict(router="topk"), "router", "'softmax' or"), (dict(head_dim=7), "head_dim", "even"),
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim", "even"),
    (dict(num_experts=4, shared_expert_gate=True), "shared_expert_gate", "needs a shared expert"),
    (dict(indexer_loss_weight=float("nan")), "indexer_loss_weight", ">= 0"),
    (dict(indexer_loss_weight=-1.0), "indexer_loss_weight", ">= 0"),
    (dict(tie_embeddings="no"), "tie_embeddings", "True or False"),  # a string is not a bool
    (dict(attn_gate="yes"), "attn_gate", "True or False"), (dict(qk_norm=1), "qk_norm", "True or False"),
    (dict(zero_centered_norm=None), "zero_centered_norm", "True or False"),
    (dict(indexer_rope_interleave="false"), "indexer_rope_interleave", "True or False"),
    (dict(num_experts=4, shared_intermediate_size=8, shared_expert_gate=0), "shared_expert_gate", "True or False"),
    (dict(name=None), "name", "string"),
    (dict(pattern="D"), "q_lora_rank", "'D' layers"),  # DSA layers need their own query latent
    (dict(pattern="MD", num_layers=2), "q_lora_rank", "'D' layers"),
    (dict(pattern="N", num_layers=1, rotary_dim=8), "rotary_dim", "NSA rotates the whole head"),  # not ignored
    (dict(pattern="FN", num_layers=2, head_dim=15, rotary_dim=8), "rotary_dim", "with N layers"),
])
def test_bad_configs_name_the_field(bad, field, want):
    with pytest.raises(ValueError, match=rf"HybridConfig\.{field}:") as err:
        M.HybridConfig(**bad)
    assert want in str(err.value), str(err.value)  # and what was expected


def test_q_lora_rank_optional_for_mla_only():
    """MLA may project queries directly (q_lora_rank None); DSA's layer gets the config's query latent rank."""
    M.HybridConfig(pattern="M")
    model = M.HybridLM(M.HybridConfig(pattern="D", num_layers=1, q_lora_rank=24, kv_lora_rank=32))
    assert model.layers[0].mixer.layer.q_a_proj.out_features == 24


def test_dsa_training_with_caches_is_refused_clearly():
    """A training forward of a DSA layer computes its indexer's loss from the dense attention over the input
    alone, so with caches it is refused up front, naming the ways out; eval mode and indexer_loss_weight=0 still
    decode."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    model = M.HybridLM(M.deepseek_v32_like(backend="naive", num_layers=1, first_dense_layers=0))
    assert model.training
    with pytest.raises(ValueError, match=r"DSA layer in training mode .* \.eval\(\) .* indexer_loss_weight=0"):
        model(ids[:, :3], model.new_caches(2, 6))
    model(ids)  # without caches: the indexer's loss
    assert model.aux_loss is not None
    off = M.HybridLM(M.deepseek_v32_like(backend="naive", num_layers=1, first_dense_layers=0,
                                         indexer_loss_weight=0.0))
    caches = off.new_caches(2, 6)
    with torch.no_grad():
        steps = torch.cat([off(ids[:, :3], caches), off(ids[:, 3:], caches)], dim=1)
        assert_close("training mode, no indexer loss: cached = one pass", off(ids), steps, 1e-4)


def test_gated_attention_model_accepts_an_empty_input():
    """Qwen3-Next's preset (gated attention) on input_ids [1, 0]: an empty sequence through every layer."""
    model = M.HybridLM(M.qwen3_next_like(backend="naive"))
    assert model(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 256)


def test_model_validates_a_config_changed_after_creation():
    c = M.HybridConfig(pattern="F", num_layers=3)
    c.pattern = "FG"  # 3 layers no longer repeat the pattern
    with pytest.raises(ValueError, match=r"HybridConfig\.num_layers:"):
        M.HybridLM(c)



def test_a_model_larger_than_its_device_is_refused_before_anything_is_allocated(monkeypatch):
    """A full-size preset built on a real device would be killed by the OS for memory: HybridLM raises a MemoryError
    that says how to build it (on meta) first. Here the device's memory is made small instead of the model large."""
    from minisparse.models import checks as model_checks

    monkeypatch.setattr(model_checks, "_device_memory", lambda device: 10_000)
    with pytest.raises(MemoryError, match=r"HybridLM: dense_baseline's 0\.0B parameters take 0 GB in torch\.float32, "
                                          r"more than the 0 GB of this cpu: build it under `with torch\.device"):
        M.HybridLM(M.dense_baseline(backend="naive"))
    with torch.device("meta"):  # the meta device holds no memory: any size builds
        assert sum(p.numel() for p in M.HybridLM(M.qwen3_next_like(scale="full")).parameters()) > 79e9
    monkeypatch.setattr(model_checks, "_device_memory", lambda device: None)  # unknown: no refusal
    M.HybridLM(M.dense_baseline(backend="naive"))


def _tiny_lm():
    return M.HybridLM(M.HybridConfig(vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1,
                                     backend="naive"))


@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.tensor([[1, 64, 2]])), r"input_ids must be >= 0 and <= 63"),
    (lambda m: m(torch.tensor([[1, -1, 2]])), r"input_ids must be >= 0 and <= 63"),
    (lambda m: m([[1, 2, 3]]), "int64 tensor, got list"),
    (lambda m: m.generate(torch.tensor([1, 2, 3]), 2), "2-D"),
    (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 2), "at least one token"),
    (lambda m: m.generate(torch.tensor([[1, 2, 3]]), -1), "max_new_tokens"),
    (lambda m: m.generate(torch.tensor([[1, 2, 3]]), 2.5), "max_new_tokens"),
    (lambda m: m.generate(torch.tensor([[1, 2, 3]]), 2, temperature=-1.0), "temperature"),
    (lambda m: M.decode_cost(M.HybridConfig(), -5), "context must be an int >= 0"),
    (lambda m: M.decode_cost(M.HybridConfig(), 10, dtype_bytes=-2), "dtype_bytes"),
    (lambda m: M.memory_per_sequence(M.HybridConfig(), -1), "context must be an int >= 0"),
    (lambda m: M.kv_cache_bytes_per_token(M.HybridConfig(), dtype="bf16"), "kv_cache_bytes_per_token: dtype must be"),
])
def test_model_and_costs_reject_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(_tiny_lm())


def test_cost_helpers_validate_a_config_changed_after_creation():
    c = M.HybridConfig()
    c.num_layers = -4
    for helper in (M.kv_cache_bytes_per_token, lambda c: M.decode_cost(c, 8), M.param_counts):
        with pytest.raises(ValueError, match=r"HybridConfig\.num_layers"):
            helper(c)

def test_presets_patterns_and_scales():
    assert "".join(M.qwen3_next_like("full").layer_kinds).count("F") == 12
    assert M.qwen3_next_like("full").rope_theta == 5e6  # Qwen3-Next-80B-A3B's config.json
    kimi = M.kimi_linear_like("full").layer_kinds
    assert len(kimi) == 27 and kimi.count("M") == 7 and kimi[26] == "M"
    assert M.minimax_m1_like("full").layer_kinds.count("F") == 10
    with pytest.raises(ValueError, match="scale"):
        M.mixtral_like("huge")


def _decode_vs_prefill(model, T=24, split=9):
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, T)
        steps = [model(ids[:, :split], caches)] + [model(ids[:, t:t + 1], caches) for t in range(split, T)]
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", list(M.PRESETS))
def test_decode_equals_prefill_every_preset(name):
    torch.manual_seed(0)
    model = M.HybridLM(M.PRESETS[name](backend="naive", num_layers=len(M.PRESETS[name]().pattern)
                                       if name != "dense_baseline" else 2, first_dense_layers=0)).eval()
    full, steps = _decode_vs_prefill(model)
    assert_close(name, full, steps, 1e-4)


def test_decode_equals_prefill_nsa_and_mla():
    torch.manual_seed(0)
    cfg = M.HybridConfig(pattern="NM", num_layers=2, nsa_block_size=4, nsa_block_counts=3, nsa_window=4,
                         backend="naive")
    full, steps = _decode_vs_prefill(M.HybridLM(cfg).eval(), T=20, split=5)
    assert_close("NSA + MLA", full, steps, 1e-4)


def _one_pass_and_cached_gradients(model, forward, x, split):
    """Gradients of a loss on the outputs of one pass over x, and of the same loss over a cached prefill of `split`
    tokens and one-token steps after it (forward(x_piece, caches))."""
    def grads(out):
        out.square().mean().backward()
        g = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return g

    want = grads(forward(x, None))
    caches = model.new_caches(x.shape[0], x.shape[1]) if hasattr(model, "new_caches") else model.new_cache(
        x.shape[0], x.shape[1])
    pieces = [x[:, :split]] + [x[:, t:t + 1] for t in range(split, x.shape[1])]
    got = grads(torch.cat([forward(piece, caches) for piece in pieces], dim=1))
    assert len(got) == len(want) > 0
    scale = max(w.norm() for w in want)
    for i, (w, g) in enumerate(zip(want, got)):
        if w.norm() < 1e-6 * scale:  # zero but for rounding (NSA's compressed-key bias: softmax ignores a shift)
            assert g.norm() < 1e-5 * scale, f"gradient {i} should be 0, is {g.norm():.2e}"
        else:
            assert_close(f"gradient {i}", w, g, 1e-4)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layer", ["Attention", "MLA", "DSAttention"])
def test_gradients_through_a_cached_prefill_and_decoding_equal_one_pass(layer, batch):
    """The attention caches are written in place; each append returns a copy of the filled part where autograd holds
    it, so a backward through a prefill and the steps after it gives one pass's gradients (with the buffer's view,
    the next append overwrote what the prefill saved: MLA's backward raised at batch 1)."""
    from minisparse.attention import Attention
    from minisparse.dsa import DSAttention
    from minisparse.mla import MLA

    torch.manual_seed(0)
    mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    model = {"Attention": lambda: Attention(64, 4, 2, backend="naive"),
             "MLA": lambda: MLA(64, 4, backend="naive", **mla),
             "DSAttention": lambda: DSAttention(64, 4, index_n_heads=2, index_head_dim=8, index_topk=3,
                                                backend="naive", **mla)}[layer]()
    _one_pass_and_cached_gradients(model, lambda x, cache: model(x, cache=cache), torch.randn(batch, 7, 64), 4)


def test_gradients_through_cached_prefill_and_decoding_of_every_recurrent_layer_and_nsa():
    """The same for a model of lightning, Gated DeltaNet, KDA and NSA layers (states and NSA's inputs)."""
    torch.manual_seed(0)
    cfg = M.HybridConfig(pattern="LGKN", num_layers=4, backend="naive", nsa_block_size=4, nsa_window=4)
    model = M.HybridLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    _one_pass_and_cached_gradients(model, lambda x, caches: model(x, caches), ids, 5)


@pytest.mark.parametrize("pattern", ["LGKN", "GGGF"])
def test_state_caches_check_batch_and_max_len(pattern):
    """The recurrent layers' and NSA's caches hold their batch and max_len, as KVCache does: unchecked, a model of
    recurrent layers took another batch or more tokens silently, and in a hybrid the first layers' states advanced
    before the attention layer's cache refused the tokens."""
    torch.manual_seed(0)
    model = M.HybridLM(M.HybridConfig(vocab_size=32, hidden_size=32, num_layers=4, pattern=pattern, num_heads=2,
                                      num_kv_heads=1, linear_num_heads=2, intermediate_size=64, nsa_block_size=4,
                                      nsa_block_counts=3, nsa_window=4, backend="naive")).eval()
    caches = model.new_caches(2, 5)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"StateCache: 6 new tokens do not fit: 0 of max_len=5 are used"):
            model(torch.randint(0, 32, (2, 6)), caches)
        with pytest.raises(ValueError, match=r"StateCache: x must be \[B, t, d\] with the cache's B = 2, got \(3, 1, 32\)"):
            model(torch.randint(0, 32, (3, 1)), caches)
        assert [len(c) for c in caches] == [0] * 4  # no layer's state moved
        model(torch.randint(0, 32, (2, 5)), caches)
        with pytest.raises(ValueError, match="1 new tokens do not fit: 5 of max_len=5"):
            model(torch.randint(0, 32, (2, 1)), caches)
    assert [len(c) for c in caches] == [5] * 4
    with pytest.raises(ValueError, match="StateCache: max_len must be an int > 0, got 0"):
        M.StateCache(2, 0)


@pytest.mark.parametrize("pattern", ["F", "G", "GF"])
def test_generate_greedy_equals_uncached_argmax(pattern):
    torch.manual_seed(3)
    model = M.HybridLM(M.HybridConfig(vocab_size=32, hidden_size=32, num_layers=2, pattern=pattern, num_heads=2,
                                      num_kv_heads=1, linear_num_heads=2, intermediate_size=64,
                                      backend="naive")).eval()
    prompt = torch.randint(0, 32, (2, 7))
    assert torch.equal(model.generate(prompt, 6), _generate_without_caches(model, prompt, 6))


@pytest.mark.parametrize("name", list(M.PRESETS))
def test_one_training_step_every_preset(name):
    torch.manual_seed(0)
    preset = M.PRESETS[name]
    model = M.HybridLM(preset(backend="naive", num_layers=len(preset().pattern), first_dense_layers=0))
    before = [p.detach().clone() for p in model.parameters()]
    opt, hist = TR.train(model, lambda s: TR.mqar_batch(4, 4, generator=torch.Generator().manual_seed(s)), 1,
                         progress=False)
    assert len(hist["loss"]) == 1 and math.isfinite(hist["loss"][0])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if name in ("deepseek_v32_like", "glm5_like"):  # the indexer learns from its KL loss
        idx = [b.mixer.layer.indexer.wk.weight for b in model.layers]
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in idx)


HF_FAMILIES = ["DeepseekV3Config", "DeepseekV32Config", "GlmMoeDsaConfig", "Qwen3NextConfig", "KimiLinearConfig",
               "MiniMaxConfig", "MixtralConfig"]


@HF
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_param_counts_match_transformers_meta_models(name):
    cfg = getattr(transformers, name)()
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    counts = M.param_counts(cfg)
    assert counts["total"] == theirs
    assert counts["active"] < counts["total"]


@HF
def test_minimax_m1_full_preset_matches_transformers_at_its_shapes():
    c = M.minimax_m1_like("full")
    cfg = transformers.MiniMaxConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
        layer_types=["full_attention" if k == "F" else "linear_attention" for k in c.layer_kinds])
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert M.param_counts(c)["total"] == theirs == M.param_counts(cfg)["total"]


@HF
def test_config_from_hf_takes_the_rope_base():
    """Each family's RoPE base, from `rope_parameters` (or `rope_theta`); the default where a config has none."""
    assert M.config_from_hf(transformers.MixtralConfig()).rope_theta == 1e6
    qwen = transformers.Qwen3NextConfig()
    qwen.rope_parameters = {**qwen.rope_parameters, "rope_theta": 1e7}
    assert M.config_from_hf(qwen).rope_theta == 1e7
    assert M.config_from_hf(transformers.KimiLinearConfig()).rope_theta == M.HybridConfig.rope_theta


@HF
@pytest.mark.parametrize("family", ["DeepseekV3Config", "DeepseekV32Config", "GlmMoeDsaConfig", "KimiLinearConfig"])
def test_config_from_hf_of_an_mla_family_with_fewer_heads(family):
    """MLA has no key-value heads: transformers' num_key_value_heads (left at its default, 128 or 32) is ignored, so
    a config with 16 attention heads is read, and counts as transformers' model of it does."""
    cfg = getattr(transformers, family)(num_attention_heads=16, num_hidden_layers=4)
    ours = M.config_from_hf(cfg)
    assert ours.num_heads == ours.num_kv_heads == 16
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert M.param_counts(cfg)["total"] == theirs
    assert M.kv_cache_bytes_per_token(cfg) == M.kv_cache_bytes_per_token(ours)


@HF
def test_config_from_hf_of_a_model_asks_for_its_config():
    """A model (not its config) is a TypeError saying what to pass, from config_from_hf and from the helpers that
    accept a transformers config."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers.MixtralConfig(num_hidden_layers=1))
    with pytest.raises(TypeError, match=r"config_from_hf: hf must be a transformers config of a supported family "
                                        r"\(deepseek_v3, .*mixtral\), got MixtralForCausalLM; pass the model's .config"):
        M.config_from_hf(model)
    with pytest.raises(TypeError, match="param_counts: config must be a HybridConfig or a transformers config, got "
                                        "MixtralForCausalLM; pass the model's .config"):
        M.param_counts(model)
    with pytest.raises(TypeError, match="kv_cache_bytes_per_token: config must be .*got object$"):
        M.kv_cache_bytes_per_token(object())

@HF
def test_mixtral_8x7b_active_parameters():
    """Mistral's figures for Mixtral 8x7B, 46.7B parameters of which 12.9B a token uses (the paper rounds them to
    47B and 13B), from transformers' MixtralConfig defaults (its shapes) and from our full preset: within 0.05B,
    half the last digit published."""
    for counts in (M.param_counts(transformers.MixtralConfig()), M.param_counts(M.mixtral_like("full"))):
        assert abs(counts["total"] / 1e9 - 46.7) < 0.05 and abs(counts["active"] / 1e9 - 12.9) < 0.05, counts


def test_survey_figures_and_their_conventions():
    v32 = M.param_counts(M.deepseek_v32_like("full"))
    assert abs(v32["total"] / 1e9 - 671.9) < 0.1  # + the 14B MTP module = 685B
    assert abs((v32["active"] - 129280 * 7168) / 1e9 - 37.5) < 0.1  # 37B without the input table
    m1 = M.param_counts(M.minimax_m1_like("full"))
    assert abs(m1["total"] / 1e9 - 456.1) < 0.1
    assert abs((m1["active"] - 2 * 200064 * 6144) / 1e9 - 45.9) < 0.05  # 45.9B without embedding and head
    q = M.param_counts(M.qwen3_next_like("full"))
    assert 79e9 < q["total"] < 81e9 and 3e9 < q["active"] - 2 * 151936 * 2048 < 3.5e9
    k = M.param_counts(M.kimi_linear_like("full"))
    assert 48e9 < k["total"] < 50e9 and 2.5e9 < k["active"] - 2 * 163840 * 2304 < 3.5e9


def test_unsupported_family_lists_the_supported():
    class Llama:
        model_type = "llama"
    with pytest.raises(ValueError, match="not supported.*deepseek_v32.*mixtral"):
        M.param_counts(Llama())
    with pytest.raises(TypeError):
        M.kv_cache_bytes_per_token(object())


def test_kv_cache_bytes():
    v32 = M.kv_cache_bytes_per_token(M.deepseek_v32_like("full"))
    assert v32 == {"per_token": 61 * (512 + 64 + 128) * 2, "per_sequence": 0}
    mix = M.kv_cache_bytes_per_token(M.mixtral_like("full"), torch.float32)
    assert mix["per_token"] == 32 * 2 * 8 * 128 * 4
    q = M.kv_cache_bytes_per_token(M.qwen3_next_like("full"))
    state = 36 * (32 * 128 * 128 * 4 + (2 * 16 * 128 + 32 * 128) * 3 * 2)
    assert q == {"per_token": 12 * 2 * 2 * 256 * 2, "per_sequence": state}
    c = M.HybridConfig(pattern="KL", num_layers=2)
    got = M.kv_cache_bytes_per_token(c)
    assert got["per_token"] == 0 and got["per_sequence"] == 2 * 4 * 16 * 16 * 4 + 3 * 4 * 16 * 3 * 2


@HF
def test_kv_cache_bytes_from_transformers_config_equal_the_converted():
    cfg = transformers.Qwen3NextConfig()
    assert M.kv_cache_bytes_per_token(cfg) == M.kv_cache_bytes_per_token(M.config_from_hf(cfg))


def test_mqar_batch_layout():
    ids, tg = TR.mqar_batch(3, 5, num_queries=4, vocab=64, generator=torch.Generator().manual_seed(0))
    assert ids.shape == tg.shape == (3, 18)
    keys, vals = ids[:, :10:2], ids[:, 1:10:2]
    assert (keys < 32).all() and (vals >= 32).all()
    for b in range(3):
        lookup = dict(zip(keys[b].tolist(), vals[b].tolist()))
        assert len(lookup) == 5
        for j in range(10, 18, 2):
            assert tg[b, j] == lookup[ids[b, j].item()] == ids[b, j + 1]
    assert (tg[:, :10] == TR.IGNORE).all() and (tg[:, 11::2] == TR.IGNORE).all()


@pytest.mark.parametrize("num_pairs,match", [(0, "int > 0"), (2.5, "int > 0"), (33, r"\[1, vocab/2 = 32\]")])
def test_mqar_batch_rejects_a_bad_num_pairs(num_pairs, match):
    with pytest.raises(ValueError, match=match):  # a float count is refused by name, not by a slice
        TR.mqar_batch(2, num_pairs, vocab=64)


@pytest.mark.parametrize("batch", [-1, 0, 2.0])
def test_mqar_batch_rejects_a_bad_batch(batch):
    with pytest.raises(ValueError, match="mqar_batch: batch must be an int > 0"):  # -1: a negative dimension
        TR.mqar_batch(batch, 4, vocab=64)


@pytest.mark.parametrize("num_queries", [-1, 0, 1.5, True])
def test_mqar_batch_rejects_a_bad_num_queries(num_queries):
    with pytest.raises(ValueError, match="mqar_batch: num_queries .* must be an int > 0"):  # -1: a negative dimension
        TR.mqar_batch(2, 4, num_queries, vocab=64)


class _RecallWithin(torch.nn.Module):
    """An MQAR 'model' that answers a query right exactly when its key (among the first `pairs`) lies at most
    `reach` tokens back."""

    def __init__(self, reach, pairs, vocab=64):
        super().__init__()
        self.reach, self.pairs, self.w = reach, pairs, torch.nn.Parameter(torch.zeros(1))
        self.config = M.HybridConfig(vocab_size=vocab)

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t, token in enumerate(row):
                seen = [s for s in range(0, min(t - 1, 2 * self.pairs), 2) if row[s] == token and t - s <= self.reach]
                logits[b, t, row[seen[-1] + 1] if seen else 0] = 1
        return logits


def test_lm_loss_is_the_mean_over_targets_and_zero_without_any():
    """lm_loss = PyTorch's mean cross-entropy over the positions with a target; with none, 0 and a zero gradient
    (PyTorch's mean over no position is NaN, which a training step would spread into every weight)."""
    torch.manual_seed(0)
    model = M.HybridLM(M.HybridConfig(pattern="F", num_layers=1, vocab_size=32, hidden_size=16, backend="naive"))
    ids, targets = TR.mqar_batch(2, 3, vocab=32, generator=torch.Generator().manual_seed(1))
    total, lm = TR.lm_loss(model, ids, targets)
    want = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=TR.IGNORE)
    assert torch.allclose(lm, want.detach(), rtol=1e-6)
    total, lm = TR.lm_loss(model, ids, torch.full_like(targets, TR.IGNORE))
    total.backward()
    assert lm.item() == 0 and all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters()
                                  if p.grad is not None)


def test_mqar_answers_distances_and_recall():
    right, distance = TR.mqar_answers(_RecallWithin(10**9, 5), 5, vocab=64, batch=6)
    assert right.shape == distance.shape == (30,) and right.all()
    ids, _ = TR.mqar_batch(6, 5, vocab=64, generator=torch.Generator().manual_seed(0))  # the same batch
    want = [t - row.index(row[t]) for row in ids.tolist() for t in range(10, 20, 2)]
    assert distance.tolist() == want and min(want) >= 2 and max(want) <= 18
    right, distance = TR.mqar_answers(_RecallWithin(9, 5), 5, vocab=64, batch=6)
    assert torch.equal(right, distance <= 9) and 0 < right.sum() < 30
    assert TR.recall_accuracy(_RecallWithin(9, 5), 5, vocab=64, batch=6) == right.float().mean().item()
    for mode in (True, False):  # the model leaves in the mode it came in (eval: a DSA model decodes only so)
        model = _RecallWithin(9, 5).train(mode)
        TR.recall_accuracy(model, 5, vocab=64, batch=2)
        assert model.training is mode


def test_stdlib_corpus_and_batches():
    data = TR.stdlib_bytes(20_000)
    assert data.dtype == torch.uint8 and len(data) == 20_000
    ids, tg = TR.lm_batch(data, 2, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids[:, 1:], tg[:, :-1])


def test_lm_batch_samples_every_window_and_checks_the_length():
    """Every window can be drawn, the last one too, and data of seq_len + 1 tokens (one window) gives that window;
    shorter data is refused with a clear error."""
    data = torch.arange(6, dtype=torch.uint8)
    ids, tg = TR.lm_batch(data, 3, 5)  # the only window
    assert ids.tolist() == [[0, 1, 2, 3, 4]] * 3 and tg.tolist() == [[1, 2, 3, 4, 5]] * 3
    ids, _ = TR.lm_batch(torch.arange(10, dtype=torch.uint8), 400, 5, generator=torch.Generator().manual_seed(0))
    assert sorted(set(ids[:, 0].tolist())) == [0, 1, 2, 3, 4]  # every start, the last (4) too
    with pytest.raises(ValueError, match=r"lm_batch: data must hold at least seq_len \+ 1 = 7 tokens .* got 6"):
        TR.lm_batch(data, 2, 6)
    for bad in (dict(batch=0), dict(seq_len=0)):
        with pytest.raises(ValueError, match=f"lm_batch: {next(iter(bad))} must be an int > 0"):
            TR.lm_batch(data, **{"batch": 2, "seq_len": 3, **bad})


def test_checkpoint_resume_continues_the_loss_curve(tmp_path):
    def batches(step):
        return TR.mqar_batch(4, 3, vocab=32, generator=torch.Generator().manual_seed(step))

    cfg = M.HybridConfig(vocab_size=32, pattern="GF", num_layers=2, backend="naive")
    torch.manual_seed(0)
    straight = M.HybridLM(cfg)
    _, full = TR.train(straight, batches, 6, progress=False)
    torch.manual_seed(0)
    first = M.HybridLM(cfg)
    opt, hist = TR.train(first, batches, 3, progress=False)
    TR.save_checkpoint(tmp_path / "c.pt", first, opt, 3, hist)
    torch.manual_seed(5)
    resumed = M.HybridLM(cfg)
    opt2, step, hist2 = TR.load_checkpoint(tmp_path / "c.pt", resumed)
    _, hist2 = TR.train(resumed, batches, 6, optimizer=opt2, start_step=step, history=hist2, progress=False)
    assert step == 3 and len(hist2["loss"]) == 6
    assert max(abs(a - b) for a, b in zip(hist2["loss"], full["loss"])) < 1e-5


def _script_env():
    # CPU processes (gloo) even on a GPU machine: the two-process tests must not ask for a second GPU
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_training_script_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "capstone.py"), "--smoke", "--out", str(tmp_path),
                    "--presets", "dense_baseline,minimax_m1_like", "--ckpt", str(tmp_path / "ck")],
                   check=True, env=_script_env(), capture_output=True, timeout=300)
    import json
    doc = json.loads((tmp_path / "capstone.json").read_text())
    tasks = {(r["impl"], r["task"]) for r in doc["rows"]}
    assert ("minimax_m1_like", "decode") in tasks and ("dense_baseline", "lm") in tasks
    mqar = [r for r in doc["rows"] if r["task"] == "mqar"]
    assert mqar and all(len(r["loss"]) >= 1 and all(x > 0 for x in r["loss"]) for r in mqar)  # a learning curve
    assert (tmp_path / "ck" / "dense_baseline-lm.pt").exists()


def test_training_script_tasks_and_merge(tmp_path):
    """Speed measured apart from the learning curves, then the two parts merged into one capstone.json."""
    script = [sys.executable, str(ROOT / "bench" / "capstone.py"), "--smoke", "--presets", "dense_baseline"]
    for task in ("mqar", "speed"):
        subprocess.run(script + ["--tasks", task, "--out", str(tmp_path / task)], check=True, env=_script_env(),
                       capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(ROOT / "bench" / "capstone.py"), "--merge", str(tmp_path / "mqar" /
                    "capstone.json"), str(tmp_path / "speed" / "capstone.json"), "--out", str(tmp_path)],
                   check=True, env=_script_env(), capture_output=True, timeout=300)
    import json
    doc = json.loads((tmp_path / "capstone.json").read_text())
    assert [r["task"] for r in doc["rows"]] == ["mqar"] * 3 + ["train_speed", "decode"]
    assert [part["tasks"] for part in doc["config"]["parts"]] == [["mqar"], ["speed"]]
    assert doc["rows"][3]["tokens_per_s"] > 0
    assert all(sum(b[3] for b in r["by_distance"]) == 8 * r["num_pairs"] for r in doc["rows"][:3])  # every query
    rerun = json.loads((tmp_path / "mqar" / "capstone.json").read_text())  # MQAR measured again, with new recall
    for r in rerun["rows"]:
        r["recall"] = -1.0
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    subprocess.run([sys.executable, str(ROOT / "bench" / "capstone.py"), "--merge", str(tmp_path / "capstone.json"),
                    str(tmp_path / "rerun.json"), "--out", str(tmp_path / "again")], check=True, env=_script_env(),
                   capture_output=True, timeout=300)
    again = json.loads((tmp_path / "again" / "capstone.json").read_text())
    assert sorted(r["task"] for r in again["rows"]) == ["decode"] + ["mqar"] * 3 + ["train_speed"]  # replaced
    assert [r["recall"] for r in again["rows"] if r["task"] == "mqar"] == [-1.0] * 3
    assert [part["tasks"] for part in again["config"]["parts"]] == [["speed"], ["mqar"]]
    assert all(part["date"] == rerun["date"] for part in again["config"]["parts"])  # when each was measured
    shared = {k: v for k, v in again["config"].items() if k != "parts"}  # only what every part ran with
    assert shared["hidden"] and all(part[k] == v for part in again["config"]["parts"] for k, v in shared.items())
    speed, other = tmp_path / "speed" / "capstone.json", tmp_path / "other.json"
    speed.write_text(speed.read_text().replace('"device": "cpu"', '"device": "NVIDIA H200"'))
    merge = [sys.executable, str(ROOT / "bench" / "capstone.py"), "--merge", str(speed)]
    subprocess.run(merge + ["--out", str(tmp_path)], check=True, env=_script_env(), capture_output=True, timeout=300)
    assert json.loads((tmp_path / "capstone.json").read_text())["device"] == "NVIDIA H200"  # where it was measured
    other.write_text(speed.read_text().replace('"NVIDIA H200"', '"Tesla T4"'))
    mixed = subprocess.run(merge + [str(other), "--out", str(tmp_path / "m")], env=_script_env(),
                           capture_output=True, text=True, timeout=300)
    assert mixed.returncode != 0 and "merge only results of one machine" in mixed.stderr
    bad = subprocess.run(script + ["--tasks", "mqar,sped"], env=_script_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "unknown ['sped']" in bad.stderr
    bad = subprocess.run(script[:2] + ["--pairs", "4,64", "--mqar-vocab", "64"], env=_script_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "must hold 2 x the most pairs (128)" in bad.stderr


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="a resettable peak RSS is Linux's")
def test_capstone_cpu_peak_memory_restarts_at_each_task():
    """On a CPU the speed rows' peak_mb is the peak resident set since the task began, not since the process
    started: a 400 MB tensor freed before the reset does not show in the next task's peak."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("capstone", ROOT / "bench" / "capstone.py")
    capstone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capstone)
    cpu = torch.device("cpu")
    capstone.reset_peak(cpu)
    base = capstone.peak_mb(cpu)
    big = torch.ones(100_000_000)  # 400 MB, written
    first = capstone.peak_mb(cpu)
    del big  # a block this large goes back to the system
    capstone.reset_peak(cpu)
    small = torch.ones(10_000_000)  # 40 MB
    second = capstone.peak_mb(cpu)
    del small
    assert first - base > 350 and second < first - 300, (base, first, second)


def _torchrun(port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_training_script_two_cpu_processes(tmp_path, parallel):
    """The script runs under torchrun; what DDP and FSDP2 compute is checked by the data_parallel test below."""
    flags = ["--fsdp", "--presets", "mixtral_like", "--ckpt", str(tmp_path / "ck")] if parallel == "fsdp" else [
        "--presets", "dense_baseline"]  # FSDP2: unrouted experts, checkpoints gathered from both ranks
    out = subprocess.run(_torchrun(29533 if parallel == "ddp" else 29534) + [
        str(ROOT / "bench" / "capstone.py"), "--smoke", "--out", str(tmp_path)] + flags,
        env=_script_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    doc = json.loads((tmp_path / "capstone.json").read_text())
    assert doc["config"]["world"] == 2 and doc["config"]["parallel"] == parallel
    assert {r["task"] for r in doc["rows"]} == {"mqar", "lm", "train_speed", "decode"}
    if parallel == "fsdp":
        state = torch.load(tmp_path / "ck" / "mixtral_like-lm.pt", weights_only=True)
        c = M.PRESETS["mixtral_like"]()  # the full tensors, gathered from the two shards
        assert state["step"] == 3 and state["model"]["embed_tokens.weight"].shape == (c.vocab_size, c.hidden_size)


DP_CONFIG = dict(vocab_size=32, pattern="GF", num_layers=2, num_experts=4, top_k=2, backend="naive")
DP_WORKER = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from minisparse import models as M
from minisparse.models import training as TR
dist.init_process_group("gloo")
rank, out, cfg, parallel = dist.get_rank(), sys.argv[1], M.HybridConfig(**json.loads(sys.argv[2])), sys.argv[3]
def half(step):  # this rank's half of the global batch of 4
    ids, tg = TR.mqar_batch(4, 3, vocab=32, generator=torch.Generator().manual_seed(step))
    return ids[2 * rank:2 * rank + 2], tg[2 * rank:2 * rank + 2]
def full(p):  # a parameter whole: FSDP2 gathers its shards
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()
torch.manual_seed(0)
model = TR.data_parallel(M.HybridLM(cfg), parallel)
params = list(model.parameters())
assert all(isinstance(p, DTensor) for p in params) == (parallel == "fsdp")
local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
opt, first = TR.train(model, half, 2, progress=False)
TR.save_checkpoint(out + "/c.pt", model, opt, 2, first)
torch.manual_seed(5)  # other weights: the checkpoint must overwrite them
resumed = TR.data_parallel(M.HybridLM(cfg), parallel)
opt, step, _ = TR.load_checkpoint(out + "/c.pt", resumed)
_, rest = TR.train(resumed, half, 4, optimizer=opt, start_step=step, progress=False)
json.dump(dict(loss=first["loss"] + rest["loss"], local=local, total=sum(p.numel() for p in params),
               weights=[full(p).double().sum().item() for p in resumed.parameters()]),
          open(f"{out}/rank{rank}.json", "w"))
"""


@pytest.mark.parametrize("parallel, port", [("ddp", 29536), ("fsdp", 29535)])
def test_data_parallel_two_cpu_processes_equal_one_process_and_resume(tmp_path, parallel, port):
    """DDP and FSDP2 on two gloo ranks, each on half the batch, train as one process on the whole batch (the
    mean of the ranks' losses = its loss; the ranks' weights stay equal though their batches differ), and a
    checkpoint (FSDP2's gathered from the shards) resumes it. FSDP2 holds half the parameters a rank."""
    import json
    (tmp_path / "worker.py").write_text(DP_WORKER)
    out = subprocess.run(_torchrun(port) + [str(tmp_path / "worker.py"), str(tmp_path), json.dumps(DP_CONFIG),
                                            parallel], env=_script_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if parallel == "fsdp":
        assert sum(r["local"] for r in ranks) == ranks[0]["total"] and ranks[0]["local"] < ranks[0]["total"]
    else:  # replicas
        assert ranks[0]["local"] == ranks[1]["local"] == ranks[0]["total"]
    assert ranks[0]["weights"] == ranks[1]["weights"]

    def whole(step):
        return TR.mqar_batch(4, 3, vocab=32, generator=torch.Generator().manual_seed(step))

    torch.manual_seed(0)
    _, one = TR.train(M.HybridLM(M.HybridConfig(**DP_CONFIG)), whole, 4, progress=False)
    two = [(a + b) / 2 for a, b in zip(ranks[0]["loss"], ranks[1]["loss"])]
    assert len(two) == 4 and max(abs(a - b) for a, b in zip(two, one["loss"])) < 1e-5, (two, one["loss"])


def test_check_full_layers():
    X.check_full_layers(lambda c, T, b: _full_layers(c, T, b))
    wrong = {"forgets V: counts K only": dict(kv=1), "forgets the convolution state": dict(conv=False),
             "adds full layers instead of replacing Gated DeltaNet ones": dict(replaces=False),
             "never answers -1": dict(floor=0), "never caps at the model's layers": dict(cap=False)}
    for why, kw in wrong.items():
        with pytest.raises(ExerciseError):
            X.check_full_layers(lambda c, T, b: _full_layers(c, T, b, **kw))
            pytest.fail(f"the checker accepted a wrong answer that {why}")
    with pytest.raises(ExerciseError):
        X.check_full_layers(lambda c, T, b: (_ for _ in ()).throw(NotImplementedError))


def _full_layers(c, T, budget, kv=2, conv=True, replaces=True, floor=-1, cap=True):
    """The answer to exercise 1 by a loop over n; the keywords make it wrong in one way each."""
    H, d = c.linear_num_heads, c.linear_head_dim
    gdn = (M.kv_cache_bytes_per_token(c.replace(pattern="G"))["per_sequence"] // c.num_layers if conv
           else 4 * H * d * d)  # one layer's fp32 state (+ its bf16 convolution state)
    best = floor
    for n in range(c.num_layers + 1 if cap else 10 * c.num_layers):  # uncapped: n from the budget alone
        mem = n * kv * c.num_kv_heads * c.head_dim * 2 * T + (c.num_layers - (n if replaces else 0)) * gdn
        if mem <= budget:
            best = n
    return best


def test_check_crossover(monkeypatch):
    def line(x, T1, T2):  # bytes(T) = intercept + slope · T between two contexts
        b1, b2 = M.decode_cost(x, T1)["bytes"], M.decode_cost(x, T2)["bytes"]
        return b1 - (b2 - b1) / (T2 - T1) * T1, (b2 - b1) / (T2 - T1)

    def from_lines(a, b, T1, T2):
        if M.decode_cost(a, 0)["bytes"] >= M.decode_cost(b, 0)["bytes"]:
            return 0.0
        (ia, sa), (ib, sb) = line(a, T1, T2), line(b, T1, T2)
        return float(math.ceil((ib - ia) / (sa - sb))) if sa > sb else math.inf

    X.check_crossover(lambda a, b: from_lines(a, b, 2**20, 2**21))  # past DSA's kink at k = 2048
    X.check_crossover(lambda a, b: torch.tensor(from_lines(a, b, 2**20, 2**21), dtype=torch.float64))  # any number
    with pytest.raises(ExerciseError, match=r"fn\(a, b\) must be a number"):
        X.check_crossover(lambda a, b: str(from_lines(a, b, 2**20, 2**21)))
    with pytest.raises(ExerciseError):  # lines through T = 0 and 1 miss DSA's kink
        X.check_crossover(lambda a, b: from_lines(a, b, 0, 1))
    def without_states(a, b):  # the recurrent states left out of a step's bytes
        def cost(x, T):
            return {"bytes": M.decode_cost(x, T)["bytes"] - M.kv_cache_bytes_per_token(x)["per_sequence"]}
        with monkeypatch.context() as patch:
            patch.setattr(X, "decode_cost", cost)
            return X._crossover(a, b)

    with pytest.raises(ExerciseError):
        X.check_crossover(without_states)
    with pytest.raises(ExerciseError):  # the cache alone, without the weights
        X.check_crossover(lambda a, b: 0.0 if M.kv_cache_bytes_per_token(a)["per_token"] >=
                          M.kv_cache_bytes_per_token(b)["per_token"] else math.inf)


@torch.no_grad()
def _generate_without_caches(model, ids, n):
    for _ in range(n):  # the right tokens, the whole sequence again at every step
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


@torch.no_grad()
def _prefill(pieces, caches_of=lambda model, caches: caches):
    """A prefill that feeds the pieces pieces(T, chunk) -> [(start, stop), ...] into caches_of(...)."""
    def fn(model, ids, chunk, caches):
        for a, b in pieces(ids.shape[1], chunk):
            logits = model(ids[:, a:b], caches_of(model, caches))[:, -1]
        return logits
    return fn


def _in_chunks(T, chunk):
    return [(a, min(T, a + chunk)) for a in range(0, T, chunk)]


def test_check_prefill_fix():
    X.check_prefill_fix(_prefill(_in_chunks))
    wrong = {
        "feeds boundary tokens twice (the planted bug)": (X.prefill_with_a_bug, "logits differ"),
        "skips the token after the first piece": (
            _prefill(lambda T, c: [(0, c), (c + 1, T)] if c < T else [(0, T)]), "logits differ"),
        "makes new caches for every piece": (_prefill(_in_chunks, lambda m, c: m.new_caches(2, 13)), "logits differ"),
        "runs the prompt without caches": (lambda m, ids, c, caches: m(ids)[:, -1], "tokens decoded"),
        "feeds the whole prompt in one call": (_prefill(lambda T, c: [(0, T)]), r"pieces of \[7\]"),
        "feeds one token a call": (_prefill(lambda T, c: [(a, a + 1) for a in range(T)]), "pieces of"),
        "returns every position's logits": (lambda m, ids, c, caches: m(ids, caches), "logits differ"),
    }
    for why, (fn, message) in wrong.items():
        with pytest.raises(ExerciseError, match=message):
            X.check_prefill_fix(fn)
            pytest.fail(f"the checker accepted a wrong answer that {why}")


@triton.jit
def _add_rmsnorm_kernel(x_ptr, y_ptr, w_ptr, r_ptr, n_ptr, d, eps, BD: tl.constexpr, OVER_D: tl.constexpr,
                        WITH_EPS: tl.constexpr, STORE_R: tl.constexpr, FROM_X: tl.constexpr,
                        EPS_OUTSIDE: tl.constexpr, GUARD: tl.constexpr, MASKED_STORES: tl.constexpr,
                        MASKED_LOADS: tl.constexpr):
    """add + RMSNorm, right with every flag True except FROM_X, wrong in the way a flag says."""
    row, cols = tl.program_id(0), tl.arange(0, BD)
    mask = cols < d
    read = mask if MASKED_LOADS else cols < BD  # unmasked: the last row's loads run past x's and y's end
    x = tl.load(x_ptr + row * d + cols, mask=read, other=0.0)
    r = x + tl.load(y_ptr + row * d + cols, mask=read, other=0.0)
    stored = mask if MASKED_STORES else cols < BD  # unmasked: the tile's padding is written too
    if STORE_R:
        tl.store(r_ptr + row * d + cols, r, mask=stored)
    v = x if FROM_X else r
    ms = tl.sum(v * v, 0) / (d if OVER_D else BD)
    rms = tl.sqrt(ms) + eps if EPS_OUTSIDE else (tl.sqrt(ms + eps) if WITH_EPS else tl.sqrt(ms))
    if GUARD:  # no eps, a zero row kept finite by hand
        rms = tl.where(rms > 0, rms, 1.0)
    tl.store(n_ptr + row * d + cols, v / rms * tl.load(w_ptr + cols, mask=read, other=0.0), mask=stored)


class _AddRmsnorm:
    """What the checker launches (kernel[grid](...)): _add_rmsnorm_kernel with these flags."""

    def __init__(self, over_d=True, with_eps=True, store_r=True, from_x=False, eps_outside=False, guard=False,
                 masked_stores=True, masked_loads=True):
        self.flags = dict(OVER_D=over_d, WITH_EPS=with_eps, STORE_R=store_r, FROM_X=from_x,
                          EPS_OUTSIDE=eps_outside, GUARD=guard, MASKED_STORES=masked_stores,
                          MASKED_LOADS=masked_loads)

    def __getitem__(self, grid):
        return lambda *args: _add_rmsnorm_kernel[grid](*args, **self.flags)


class _Stub:
    """A launch that stores nothing, as the exercise's stub (`pass`) does."""

    def __getitem__(self, grid):
        return lambda *args: None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the kernel without eps: 0 / 0
def test_check_add_rmsnorm_kernel():
    X.check_add_rmsnorm_kernel(_AddRmsnorm())
    wrong = {"the mean over the padded tile": (_AddRmsnorm(over_d=False), r"d = 48\): n\["),
             "no eps: the zero row is NaN": (_AddRmsnorm(with_eps=False), r"n\[1, 0\] = nan"),
             "r not stored": (_AddRmsnorm(store_r=False), r"r\[0, 0\] = 7, expected"),
             "x normalised instead of x + y": (_AddRmsnorm(from_x=True), r"n\[0"),
             "eps outside the root": (_AddRmsnorm(eps_outside=True), r"n\[3"),
             "no eps, the zero row guarded": (_AddRmsnorm(with_eps=False, guard=True), r"n\[3"),
             "unmasked stores": (_AddRmsnorm(masked_stores=False), r"a store past the row"),
             "nothing stored (the stub)": (_Stub(), r"not implemented yet")}
    if runtime.interpreting():  # only the interpreter sees a load's addresses
        wrong["unmasked loads"] = (_AddRmsnorm(masked_loads=False), r"d = 48\): a load reads .* outside")
    for why, (kernel, message) in wrong.items():
        with pytest.raises(ExerciseError, match=message):
            X.check_add_rmsnorm_kernel(kernel)
            pytest.fail(f"the checker accepted a kernel with {why}")


@pytest.mark.parametrize("preset", list(M.PRESETS))
def test_every_preset_runs_in_float64_on_the_naive_path(preset):
    """`.double()` on the PyTorch paths: fp64 logits (every mixer computes in fp64, for gradcheck-grade oracles),
    equal to the fp32 model's with the same weights."""
    torch.manual_seed(0)
    model = M.HybridLM(M.PRESETS[preset](backend="naive"))
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        single = model(ids)
        double = model.double()(ids)
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    assert_close(f"{preset}: fp64 logits against fp32", double, single.double(), 1e-4)


# ------------------------------------------------------------------------------------ "auto" past the kernels
def _wide_layers():
    """Each mixer with head dims past its Triton kernels' (256 for attention, MLA and NSA, 128 for the chunk
    kernels of lightning, Gated DeltaNet and KDA)."""
    from minisparse.attention import Attention
    from minisparse.deltanet import GatedDeltaNet
    from minisparse.kda import KimiDeltaAttention
    from minisparse.lightning import LightningAttention
    from minisparse.mla import MLA
    from minisparse.nsa import NativeSparseAttention

    return {"F": lambda: Attention(32, 2, 1, head_dim=264), "M": lambda: MLA(32, 2, kv_lora_rank=16,
                                                                             qk_nope_head_dim=200),
            "L": lambda: LightningAttention(32, 1, 136, 0, 2), "G": lambda: GatedDeltaNet(32, 1, 1, 136, 136),
            "K": lambda: KimiDeltaAttention(32, 1, 136),
            "N": lambda: NativeSparseAttention(32, 2, 1, 264, block_size=16, block_counts=3, window_size=4)}


@pytest.mark.parametrize("letter", list("FMLGKN"))
def test_auto_takes_the_naive_path_past_the_kernels_head_dims(letter):
    """backend="auto" (the default) runs a layer whose head dims no kernel takes on the PyTorch path, as "naive"
    does, instead of raising the kernel's limit; an explicit "triton" still raises it."""
    torch.manual_seed(0)
    layer, x = _wide_layers()[letter](), torch.randn(1, 5, 32)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    with torch.no_grad():
        auto = first(layer(x))
        layer.backend = "naive"
        assert torch.equal(auto, first(layer(x)))
        if letter != "N" and runtime.interpreting():  # NSA refuses backend="triton" at construction
            layer.backend = "triton"
            with pytest.raises(ValueError, match="must be <= (128|256)"):
                layer(x)
