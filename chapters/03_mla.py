# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-execution
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3 — Multi-head Latent Attention
#
# When a model generates text, every new token reads the keys and values of all the tokens before it, in every
# layer. That KV cache — not the weights, not the FLOPs — is what limits how long a context and how large a batch a
# GPU can serve. DeepSeek's **multi-head latent attention** (MLA) attacks it directly: instead of keys and values
# for every head, each token caches one small *latent* vector (512 numbers in DeepSeek-V3) plus one 64-dimensional
# rotary key shared by all heads, and the heads' keys and values are linear functions of it.
#
# MLA is the attention of DeepSeek-V2/V3/V3.2, of Kimi K2 and K2.5 (and the full-attention layers of Kimi Linear)
# and of GLM-5 [S], and the substrate that DeepSeek's sparse attention (chapter 8) selects from. This chapter builds
# it from the equations, shows why rotary embeddings force its peculiar "decoupled" design, folds the up-projections
# into the query and the output so that decoding never expands the cache (*absorption*), and writes the decode
# kernel that reads the latent cache once for all heads.
#
# What you build here, and can import afterwards:
#
# | name | what it is |
# |---|---|
# | `kv_cache_bytes`, `GQAConfig`, `MLAConfig`, `attention_family` | the KV-cache size of MHA / GQA / MQA / MLA models (ours or transformers' configs) |
# | `expand_latent`, `split_kv_b`, `absorb_query`, `absorb_output` | the latent → per-head keys/values, and the two absorbed products |
# | `mla_attention_absorbed`, `mla_decode_ref`, `mla_decode_splitk`, `combine_splits` | attention on the latent cache: the spec, and its split-K form in PyTorch |
# | `yarn_frequencies`, `yarn_mscale`, `YarnRotaryEmbedding`, `mla_softmax_scale` | DeepSeek-V3's long-context RoPE and softmax scale |
# | `MLA`, `MLACache` | the layer (transformers' parameter names, `MLA.from_hf`) and its latent cache |
# | `mla_decode_flops`, `mla_decode_bytes`, `mha_decode_bytes`, … | the cost model |
# | `mla_decode` | the Triton split-K decode kernel (section 3.7) |
#
# ```python
# from minisparse.mla import MLA, mla_decode, kv_cache_bytes
# ```
#
# Tensors are `[B, T, H, D]` as everywhere in the book; the latent cache is `[B, S, D]` (one "head"). On a laptop
# CPU the chapter runs at small sizes in under two minutes, the Triton kernel in the interpreter; on a GPU the same
# cells use larger sizes.
#
# :::{admonition} Where the numbers come from
# :class: note
# Model shapes come from `transformers`' configuration classes (their defaults are the real checkpoints' shapes);
# **[S]** marks facts from the minisparse seed survey, Feb 2026 (chapter 0); papers are listed at the end.
# :::

# %% tags=["hide-input"]
# Setup (the same in every chapter): on Colab, install minisparse from the book's branch, keeping Colab's torch;
# anywhere, print the versions and the device this chapter runs on.
import importlib.util, subprocess, sys

if importlib.util.find_spec("minisparse") is None:
    if "google.colab" not in sys.modules:
        raise ModuleNotFoundError("minisparse is not installed: from the repository root run `make lab`, "
                                  "or `pip install -e .` in this kernel's environment")
    # --no-deps: Colab already has torch, triton, numpy, matplotlib, ipywidgets and tqdm; never replace its torch.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "minisparse @ git+https://github.com/minisparse/minisparse@main"], check=True)
import minisparse

minisparse.runtime.print_environment()

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from minisparse import bench, runtime, viz
from minisparse.attention import apply_rope, attention_ref, attention_weights
from minisparse.testing import assert_close

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

try:  # transformers is a test dependency: the cells that compare against it skip, with a message, without it
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: the checks against its DeepSeek-V3 attention are skipped")


# %% [markdown]
# ## 3.1 Why: decoding reads the whole cache for every token
#
# Generating one token runs the model on one position. Its weights are read once for the whole batch, but its
# attention must read the keys and values of **every earlier token of every sequence**, in every layer. With $B$
# sequences of $T$ tokens and $b$ bytes a cached token, one decoding step reads
#
# $$
# \underbrace{P_{\text{active}}\cdot \text{bytes/param}}_{\text{weights, once}} \;+\;
# \underbrace{B \cdot T \cdot b}_{\text{the KV cache}}
# $$
#
# from memory, and does little arithmetic with it: decoding is memory-bound (chapter 1, section 4). The weights
# term is fixed, the cache term grows with the batch and the context — so the bytes a token leaves in the cache,
# $b$, decide how many sequences of what length fit on a GPU and how fast each step runs.
#
# For softmax attention (chapter 1) a token caches a key and a value per K/V head and layer:
# $b = 2\,L\,H_{kv}\,D \cdot$ bytes — MHA keeps one K/V head per query head, GQA a few groups, MQA one. MLA caches
# instead, per layer, a **latent** $c^{KV}_t$ of `kv_lora_rank` numbers and one rotary key $k^R_t$ of
# `qk_rope_head_dim` numbers shared by all heads: $b = L\,(d_c + d_R) \cdot$ bytes. For DeepSeek-V3,
# $d_c + d_R = 512 + 64 = 576$ values a token a layer, in 61 layers.
#
# `kv_cache_bytes(config, seq_len, dtype)` computes $B \cdot T \cdot b$ for any of the four families. It reads
# transformers' attribute names (`num_hidden_layers`, `num_key_value_heads`, `head_dim`, `kv_lora_rank`,
# `qk_rope_head_dim`, `layer_types` …), so it takes transformers' own configuration objects as well as the two small
# dataclasses below, which describe a hypothetical model without building one.

# %%
#| export mla.cost
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GQAConfig:
    """The cache shape of a softmax-attention model in transformers' attribute names: MHA when
    num_key_value_heads == num_attention_heads, MQA when it is 1, GQA in between. v_head_dim defaults to head_dim."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    v_head_dim: int | None = None


@dataclass(frozen=True)
class MLAConfig:
    """An MLA model's shapes in transformers' attribute names; the defaults are DeepSeek-V3's."""
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    hidden_size: int = 7168
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


def _heads(config):
    """(query heads, K/V heads) of a config, an MLA/Attention layer or one of the dataclasses above."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    if not heads:
        raise TypeError(f"kv_cache_bytes: {type(config).__name__} has no num_attention_heads (or num_heads)")
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return heads, 1  # Falcon-7B's flag for one K/V head
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    return heads, kv


def attention_family(config):
    """'MLA' (has kv_lora_rank), else 'MHA', 'GQA' or 'MQA' by the number of K/V heads."""
    if getattr(config, "kv_lora_rank", None):
        return "MLA"
    heads, kv = _heads(config)
    return "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"


def kv_values_per_token(config):
    """Numbers one token adds to the cache of one attention layer.

    MLA: kv_lora_rank + qk_rope_head_dim (the latent and the shared rotary key); MHA/GQA/MQA: H_kv · (D_k + D_v).
    """
    if attention_family(config) == "MLA":
        return config.kv_lora_rank + config.qk_rope_head_dim
    heads, kv = _heads(config)
    d_k = getattr(config, "head_dim", None) or config.hidden_size // heads
    d_v = getattr(config, "v_head_dim", None) or d_k
    return kv * (d_k + d_v)


def cached_tokens(config, seq_len):
    """Tokens each layer holds after seq_len tokens: all of them, none for a linear-attention layer, at most the
    window for a sliding-window layer (read from config.layer_types; a plain config has only full layers)."""
    layers = getattr(config, "num_hidden_layers", None) or 1  # a single layer (an MLA module) counts as one
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    window = getattr(config, "sliding_window", None)
    held = {"linear_attention": 0, "sliding_attention": min(seq_len, window) if window else seq_len}
    return [held.get(t, seq_len) for t in types]


def _dtype_bytes(dtype):
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    raise TypeError(f"kv_cache_bytes: dtype must be a torch.dtype or a number of bytes per element, got {dtype!r}")


def kv_cache_bytes(config, seq_len, dtype=torch.bfloat16, *, batch=1):
    """Bytes of the whole KV cache of `batch` sequences of `seq_len` tokens.

    config: GQAConfig / MLAConfig, a transformers config (LlamaConfig, MistralConfig, FalconConfig,
    DeepseekV3Config, KimiLinearConfig, … — layer_types respected) or an MLA layer (one layer).
    dtype: torch.dtype or bytes per element. MLA: layers · (kv_lora_rank + qk_rope_head_dim) a token;
    MHA/GQA/MQA: layers · 2 · H_kv · D a token.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"kv_cache_bytes: seq_len must be a non-negative int, got {seq_len!r}")
    return batch * kv_values_per_token(config) * sum(cached_tokens(config, seq_len)) * _dtype_bytes(dtype)


# %% [markdown]
# Real models first: the per-token cache of six checkpoints, read from transformers' configuration classes (the
# defaults are the released models' shapes; no download). GLM-5 is `GlmMoeDsaConfig`; Kimi Linear keeps MLA in 6
# of its 27 layers, the others are linear-attention layers with a fixed-size state (chapter 6).

# %%
REAL = {  # transformers config class -> label
    "LlamaConfig": "Llama-2-7B (MHA)", "MistralConfig": "Mistral-7B (GQA 4:1)", "FalconConfig": "Falcon-7B (MQA)",
    "DeepseekV3Config": "DeepSeek-V3 (MLA)", "GlmMoeDsaConfig": "GLM-5 (MLA + DSA)",
    "KimiLinearConfig": "Kimi Linear (MLA in 6/27 layers)",
}
real = {}
if transformers is not None:
    from minisparse.mla import attention_family, kv_cache_bytes

    for cls_name, label in REAL.items():
        cfg = getattr(transformers, cls_name, None)
        if cfg is None:
            print(f"transformers {transformers.__version__} has no {cls_name}: skipped")
            continue
        cfg = cfg()
        real[label] = (kv_cache_bytes(cfg, 1), attention_family(cfg), cfg.num_hidden_layers)
    ds = transformers.DeepseekV3Config()
    assert (ds.num_hidden_layers, ds.kv_lora_rank, ds.qk_rope_head_dim) == (61, 512, 64)
    assert real["DeepSeek-V3 (MLA)"][0] == 61 * 576 * 2  # 70,272 bytes a token in bf16
    for label, (b, family, layers) in real.items():
        print(f"{label:34s} {family}  {layers:3d} layers  {b / 1024:7.1f} KiB a token (bf16)")

# %% [markdown]
# DeepSeek-V3 is a 671B-parameter model, yet a token costs it less cache than it costs Mistral-7B, and about a
# seventh of Llama-2-7B. A fairer comparison keeps the model fixed: DeepSeek-V3's 61 layers and 128 heads, with its
# head sizes (keys of $128 + 64 = 192$, values of $128$), cached four ways:

# %%
from minisparse.mla import GQAConfig, MLAConfig, kv_cache_bytes

V3 = MLAConfig()  # DeepSeek-V3's shapes (the defaults)
FAMILIES = {
    "MHA: 128 K/V heads": GQAConfig(61, 128, 128, head_dim=192, v_head_dim=128),
    "GQA: 8 K/V heads": GQAConfig(61, 128, 8, head_dim=192, v_head_dim=128),
    "MQA: 1 K/V head": GQAConfig(61, 128, 1, head_dim=192, v_head_dim=128),
    "MLA: 512 + 64": V3,
}
CONTEXT = [2**i for i in range(10, 18)]  # 1k … 128k tokens
H200 = 141e9  # bytes of HBM on one H200

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 3.9), gridspec_kw=dict(width_ratios=[1, 1.35]))
per_token = {n: kv_cache_bytes(c, 1) for n, c in FAMILIES.items()}
ax1.barh(list(per_token), [b / 1024 for b in per_token.values()], color=["C0", "C1", "C2", "C3"])
for y, b in enumerate(per_token.values()):
    ax1.text(b / 1024, y, f" {b / 1024:,.0f} KiB", va="center", fontsize=8)
ax1.set_xscale("log")
ax1.invert_yaxis()
ax1.set(xlabel="KV cache a token, all 61 layers (KiB, bf16, log)", title="DeepSeek-V3's shapes, four caches")
ax1.set_xlim(10, 4e4)
for i, (name, cfg) in enumerate(FAMILIES.items()):
    ax2.loglog(CONTEXT, [kv_cache_bytes(cfg, T) / 1e9 for T in CONTEXT], "o-", color=f"C{i}", label=name)
ax2.axhline(H200 / 1e9, color="red", lw=0.8)
ax2.text(CONTEXT[0], H200 / 1e9 * 1.2, "one H200 (141 GB)", fontsize=8, color="red")
viz.tokens_axis(ax2)
ax2.set(ylabel="KV cache of one sequence (GB)", title="the cache of one sequence vs its length")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()
T128 = 128 * 1024
print(f"at 128k tokens: MHA {kv_cache_bytes(FAMILIES['MHA: 128 K/V heads'], T128) / 1e9:,.0f} GB, "
      f"MLA {kv_cache_bytes(V3, T128) / 1e9:.1f} GB per sequence "
      f"({per_token['MHA: 128 K/V heads'] / per_token['MLA: 512 + 64']:.0f}x less)")

# %% [markdown]
# With MHA's cache, one 128k-token sequence of this model would need 655 GB — more than four H200s, before a
# single weight is stored. MLA needs 9.2 GB, 71 times less, between GQA with 8 groups and MQA. The DeepSeek-V2
# paper states the same thing per layer: MLA caches $d_c + d_R = 4.5\,d_h$ numbers a token, the cache of GQA with
# only 2.25 groups of head size $d_h = 128$ (DeepSeek-AI, 2024a, Table 1) — while the paper reports quality *above*
# MHA's, which GQA and MQA do not reach.
#
# The decode step makes the same point in bytes per step. DeepSeek-V3 activates 37B parameters a token (stored in
# FP8, one byte each); with 64 sequences of 32k tokens each, one step reads:

# %%
B_DEC, T_DEC = 64, 32 * 1024
weights_bytes = 37e9  # active parameters in FP8
for name, cfg in FAMILIES.items():
    cache = kv_cache_bytes(cfg, T_DEC, batch=B_DEC)
    print(f"{name:20s} cache {cache / 1e9:9,.0f} GB   weights {weights_bytes / 1e9:.0f} GB   "
          f"cache share of the bytes read {cache / (cache + weights_bytes):6.1%}")

# %% [markdown]
# Even with MLA the cache is four fifths of what a step reads at this batch and length: at long context, decoding
# speed *is* cache-reading speed. That is why the decode kernel of section 3.7 is judged in GB/s of latent cache
# read, against the memory bandwidth.

# %% [markdown]
# ## 3.2 Naive: attention through a low-rank latent
#
# ### The equations
#
# Write $h_t \in \mathbb R^{d}$ for the layer's input at position $t$, $n_h$ heads, head size $d_h$ (DeepSeek-V3:
# $d = 7168$, $n_h = 128$, $d_h = 128$). MLA (DeepSeek-AI, 2024a, §2.1) computes, in the names of the paper and —
# in brackets — of transformers' `DeepseekV3Attention`, whose parameter names our layer keeps:
#
# **Keys and values through a latent.** One down-projection compresses the token, an RMSNorm steadies it, and
# per-head up-projections expand it:
#
# $$
# c^{KV}_t = \operatorname{RMSNorm}\!\big(W^{DKV} h_t\big) \in \mathbb R^{d_c}, \qquad
# k^C_{t,i} = W^{UK}_i\, c^{KV}_t, \qquad v_{t,i} = W^{UV}_i\, c^{KV}_t ,
# $$
#
# with $d_c$ = `kv_lora_rank` = 512 $\ll n_h d_h$ = 16384. $W^{DKV}$ is the first 512 rows of `kv_a_proj_with_mqa`,
# the norm is `kv_a_layernorm`, and $[W^{UK}_i; W^{UV}_i]$ are head $i$'s rows of `kv_b_proj`. K and V share one
# latent: the compression is *joint*.
#
# **Queries through a latent too** (training memory, not the cache): $c^Q_t = \operatorname{RMSNorm}(W^{DQ} h_t)$ of
# `q_lora_rank` = 1536 [`q_a_proj`, `q_a_layernorm`], then $q^C_{t,i} = W^{UQ}_i c^Q_t$ [`q_b_proj`]. Smaller models
# (DeepSeek-V2-Lite, Kimi Linear) skip this and use one `q_proj`.
#
# **A decoupled rotary part.** Position enters through extra dimensions only: a rotary query per head and **one
# rotary key shared by all heads**, of $d_R$ = `qk_rope_head_dim` = 64:
#
# $$
# q^R_{t,i} = \operatorname{RoPE}_t\big(W^{QR}_i\, c^Q_t\big), \qquad k^R_t = \operatorname{RoPE}_t\big(W^{KR} h_t\big)
# \quad [\text{the last 64 rows of }\texttt{kv\_a\_proj\_with\_mqa}] .
# $$
#
# **Attention** with queries and keys of $d_h + d_R = 192$ and values of $d_h$ = 128, then the output projection
# $W^O$ [`o_proj`]:
#
# $$
# q_{t,i} = [q^C_{t,i};\, q^R_{t,i}], \quad k_{s,i} = [k^C_{s,i};\, k^R_s], \qquad
# o_{t,i} = \sum_{s \le t} \operatorname{softmax}_s\!\Big(\frac{q_{t,i}^\top k_{s,i}}{\sqrt{d_h + d_R}}\Big)\, v_{s,i},
# \qquad u_t = W^O [o_{t,1}; \dots; o_{t,n_h}] .
# $$
#
# The cache holds $c^{KV}_t$ and $k^R_t$: $d_c + d_R$ = 576 numbers a token. Everything per head is recomputed
# from them. Two layouts matter when loading a checkpoint: `q_b_proj`'s output is per head `[nope | rope]`
# ($d_h$ then $d_R$ numbers for head 0, then head 1, …), and `kv_b_proj`'s is per head `[k_nope | v]`.
#
# Here is the expansion — latent in, per-head keys and values out — as the code the layer will use:

# %%
#| export mla.naive
import math

import torch

from minisparse import _checks
from minisparse.attention.naive import RotaryEmbedding, attention_ref, rope_frequencies


def split_kv_b(w_kv_b, num_heads, qk_nope_head_dim, v_head_dim):
    """Views of kv_b_proj.weight [H·(dn + dv), r] as W_uk [H, dn, r] and W_uv [H, dv, r] (each head: k_nope | v)."""
    if w_kv_b.dim() != 2 or w_kv_b.shape[0] != num_heads * (qk_nope_head_dim + v_head_dim):
        raise ValueError(f"split_kv_b: w_kv_b must be [H·(dn+dv), r] = [{num_heads}·({qk_nope_head_dim}+"
                         f"{v_head_dim}), r], got {tuple(w_kv_b.shape)}")
    w = w_kv_b.view(num_heads, qk_nope_head_dim + v_head_dim, w_kv_b.shape[1])  # [H, dn + dv, r]
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def expand_latent(c_kv, k_rope, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim):
    """Per-head keys and values from the cache: k_i = [W_uk,i c ; k_rope], v_i = W_uv,i c.

    c_kv [B, S, r] (normalised latents), k_rope [B, S, dr] (rotated, shared by the heads), w_kv_b = kv_b_proj.weight
    [H·(dn+dv), r]  ->  k [B, S, H, dn + dr], v [B, S, H, dv].
    """
    B, S, _ = c_kv.shape
    w_uk, w_uv = split_kv_b(w_kv_b, num_heads, qk_nope_head_dim, v_head_dim)
    k_nope = torch.einsum("bsr,hdr->bshd", c_kv, w_uk)  # [B, S, H, dn]  k^C = W_uk c
    v = torch.einsum("bsr,hvr->bshv", c_kv, w_uv)  # [B, S, H, dv]  v = W_uv c
    k_rope = k_rope[:, :, None, :].expand(B, S, num_heads, k_rope.shape[-1])  # [B, S, H, dr] the same for every head
    return torch.cat([k_nope, k_rope], dim=-1), v


# %% [markdown]
# ### Why the rotary part has to be separate
#
# Section 3.3 will make MLA cheap at decoding time by moving $W^{UK}$ out of the keys and into the query:
# $q^\top (W^{UK} c_s) = (W^{UK\top} q)^\top c_s$, so a query can be scored against the cached latents directly. Now
# suppose RoPE were applied the usual way, to the whole key $k_s = R_s W^{UK} c_s$ (and $R_t$ to the query), where
# $R_p$ is the rotation by position $p$ of chapter 1. The score becomes
#
# $$
# (R_t q)^\top (R_s W^{UK} c_s) = q^\top \underbrace{R_t^\top R_s\, W^{UK}}_{=\;R_{s-t} W^{UK}}\, c_s .
# $$
#
# The matrix between the query and the latent depends on the offset $s - t$. To score one query against $T$ cached
# latents we would need $T$ different absorbed queries — as expensive as expanding the keys, which is exactly what
# absorption was meant to avoid. The check below builds $R_t^\top R_s W^{UK}$ from `apply_rope` and confirms it
# depends on the offset alone (relative position) but changes with every offset:

# %%
g = torch.Generator().manual_seed(0)
d_k, r_demo = 16, 32
W_uk_demo = torch.randn(d_k, r_demo, generator=g, dtype=torch.float64) / r_demo**0.5


def rope_matrix(pos, dim=d_k, theta=100.0):
    """R_pos as a matrix: apply_rope to the basis vectors e_0 … e_{dim-1}, all at position pos."""
    basis = torch.eye(dim, dtype=torch.float64)[None, :, None, :]  # [1, dim tokens, 1 head, dim]
    return apply_rope(basis, torch.full((dim,), pos), theta=theta)[0, :, 0].T  # column j = R_pos e_j


def folded(t, s):
    return rope_matrix(t).T @ rope_matrix(s) @ W_uk_demo  # [d_k, r]: what would sit between q and c_s


assert torch.allclose(folded(5, 2), folded(50, 47))  # same offset, same matrix: RoPE is relative ...
offsets = list(range(0, 65))
change = [(folded(100, 100 - o) - folded(100, 100)).norm() / folded(100, 100).norm() for o in offsets]
fig, ax = plt.subplots(figsize=(6.5, 2.8))
ax.plot(offsets, change, "o-", ms=3)
ax.set(xlabel="offset t − s (tokens)", ylabel="‖M(t−s) − M(0)‖ / ‖M(0)‖",
       title="the matrix RoPE would put between query and latent, by offset")
ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
print(f"... but it differs by {min(change[1:]):.0%} to {max(change):.0%} from offset 0 at every other offset")

# %% [markdown]
# DeepSeek's way out is the **decoupled** rotary key: keep the content part $k^C = W^{UK} c$ free of position —
# absorbable — and carry position in a separate 64-dimensional part that is cached as it is. Because that part has
# to be cached per token anyway, it is made **shared by all heads** (one $k^R_t$, like MQA's single key), so it costs
# 64 numbers a token rather than $64 n_h$. Each head still has its own rotary *query* $q^R_{t,i}$.
#
# The price is small: the score splits into a content term and a position term,
#
# $$
# q_{t,i}^\top k_{s,i} \;=\; \underbrace{q^{C\top}_{t,i}\, W^{UK}_i\, c^{KV}_s}_{\text{absorbable}}
# \;+\; \underbrace{q^{R\top}_{t,i}\, k^R_s}_{\text{MQA on a 64-d key}} ,
# $$
#
# and the scale stays $1/\sqrt{d_h + d_R} = 1/\sqrt{192}$ — the size of the expanded head, not of the latent.

# %% [markdown]
# ## 3.3 Absorbed decoding
#
# Take the content term and move $W^{UK}_i$ to the query side; do the same with $W^{UV}_i$ on the output side:
#
# $$
# q^C_{t,i}{}^\top W^{UK}_i c_s = \big(\underbrace{W^{UK\top}_i q^C_{t,i}}_{\tilde q_{t,i} \in \mathbb R^{d_c}}\big)^\top c_s ,
# \qquad
# o_{t,i} = \sum_s p_{ts,i}\, W^{UV}_i c_s = W^{UV}_i \underbrace{\sum_s p_{ts,i}\, c_s}_{\tilde o_{t,i} \in \mathbb R^{d_c}} .
# $$
#
# So each head's query becomes $[\tilde q_{t,i};\, q^R_{t,i}]$ of 512 + 64 numbers, every head scores it against the
# *same* cached keys $[c_s;\, k^R_s]$ (576), and averages the *same* cached values $c_s$ (512). That is multi-query
# attention with 576-dimensional keys and 512-dimensional values, run directly on the cache, followed by one small
# per-head matrix product $W^{UV}_i \tilde o_{t,i}$. No key or value is ever expanded.
#
# The two folds and the attention, as code (`attention_ref` of chapter 1 with one K/V head does the MQA):

# %%
#| export mla.naive
def absorb_query(q_nope, w_uk):
    """q̃ = W_ukᵀ q_nope per head: q_nope [B, T, H, dn], w_uk [H, dn, r] -> q_latent [B, T, H, r]."""
    return torch.einsum("bthd,hdr->bthr", q_nope, w_uk)


def absorb_output(o_latent, w_uv):
    """o = W_uv õ per head: o_latent [B, T, H, r], w_uv [H, dv, r] -> [B, T, H, dv]."""
    return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)


def mla_attention_absorbed(q_latent, q_rope, c_kv, k_rope, scale, causal=True):
    """Attention on the latent cache: MQA with keys [c ; k_rope] (r + dr) and values c (r).

    q_latent [B, T, H, r], q_rope [B, T, H, dr], c_kv [B, S, r], k_rope [B, S, dr] -> o_latent [B, T, H, r].
    The T queries sit at positions S - T .. S - 1 (bottom-right, as after a cache). scale: MLA's, (dn + dr) ** -0.5.
    """
    q = torch.cat([q_latent, q_rope], dim=-1)  # [B, T, H, r + dr]
    k = torch.cat([c_kv, k_rope], dim=-1)[:, :, None]  # [B, S, 1, r + dr] one key for all heads
    return attention_ref(q, k, c_kv[:, :, None], causal=causal, scale=scale)  # [B, T, H, r]


# %% [markdown]
# Do the two routes agree? Random latents and weights at DeepSeek-V3's head sizes (128 + 64, values 128, latent
# 512) but 4 heads: expand and attend, or absorb and attend on the latents.

# %%
from minisparse.mla import absorb_output, absorb_query, expand_latent, mla_attention_absorbed, split_kv_b

g = torch.Generator().manual_seed(1)
B_, T_, H_, R_, DN_, DR_, DV_ = 2, 9, 4, 512, 128, 64, 128
c_kv = torch.randn(B_, T_, R_, generator=g, dtype=torch.float64)
k_rope = torch.randn(B_, T_, DR_, generator=g, dtype=torch.float64)
q_nope = torch.randn(B_, T_, H_, DN_, generator=g, dtype=torch.float64)
q_rope = torch.randn(B_, T_, H_, DR_, generator=g, dtype=torch.float64)
w_kv_b = torch.randn(H_ * (DN_ + DV_), R_, generator=g, dtype=torch.float64) / R_**0.5
scale = (DN_ + DR_) ** -0.5

k, v = expand_latent(c_kv, k_rope, w_kv_b, H_, DN_, DV_)  # [B, T, H, 192], [B, T, H, 128]
expanded = attention_ref(torch.cat([q_nope, q_rope], -1), k, v, scale=scale)  # [B, T, H, 128]
w_uk, w_uv = split_kv_b(w_kv_b, H_, DN_, DV_)
absorbed = absorb_output(mla_attention_absorbed(absorb_query(q_nope, w_uk), q_rope, c_kv, k_rope, scale), w_uv)
err = assert_close("absorbed vs expanded", expanded, absorbed, 1e-12)
print(f"absorbed == expanded (fp64): relative RMS error {err:.1e}")

# %% [markdown]
# Equal to rounding. Absorption is an *algebraic* identity, not an approximation — the two routes differ only in
# where the multiplications happen: expanding costs $2 d_c n_h (d_h + d_v)$ FLOPs **per cached token per step**
# (section 3.6 counts it), absorbing costs $2 d_c n_h (d_h + d_v)$ per *new* token, once.
#
# ### The latent cache
#
# The cache stores, per token, the normalised latent and the rotated shared key side by side: one buffer
# `[B, max_len, d_c + d_R]`, preallocated like chapter 1's `KVCache`. `latent` and `rope` are views of its two
# parts — what the decode kernel reads.

# %%
#| export mla.naive
class MLACache:
    """The latent KV cache: one buffer [B, max_len, kv_lora_rank + rope_dim] of c_kv | k_rope; `length` filled.

    append(c_kv [B, t, r], k_rope [B, t, dr]) writes after the cached tokens and returns all of them as views
    (latent [B, length, r], rope [B, length, dr]) of the one buffer.
    """

    def __init__(self, batch, max_len, kv_lora_rank, rope_dim, *, dtype=torch.float32, device=None):
        self.buffer = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.length = 0

    @property
    def max_len(self):
        return self.buffer.shape[1]

    def __len__(self):
        return self.length

    @property
    def latent(self):  # [B, length, r]
        return self.buffer[:, :self.length, :self.kv_lora_rank]

    @property
    def rope(self):  # [B, length, dr]
        return self.buffer[:, :self.length, self.kv_lora_rank:]

    def append(self, c_kv, k_rope):
        B, r, dr = self.buffer.shape[0], self.kv_lora_rank, self.rope_dim
        t = c_kv.shape[1] if c_kv.dim() == 3 else -1
        if tuple(c_kv.shape) != (B, t, r) or tuple(k_rope.shape) != (B, t, dr):
            raise ValueError(f"MLACache.append: c_kv must be [B={B}, t, kv_lora_rank={r}] and k_rope [B, t, "
                             f"rope_dim={dr}], got c_kv {tuple(c_kv.shape)}, k_rope {tuple(k_rope.shape)}")
        if self.length + t > self.max_len:
            raise ValueError(f"MLACache.append: {t} new tokens do not fit: {self.length} of max_len={self.max_len} "
                             "are used (make a larger cache with new_cache(batch, max_len))")
        self.buffer[:, self.length:self.length + t, :r] = c_kv
        self.buffer[:, self.length:self.length + t, r:] = k_rope
        self.length += t
        return self.latent, self.rope

    def reset(self):
        self.length = 0

# %% [markdown]
# ## 3.4 The layer
#
# ### RoPE the DeepSeek-V3 way
#
# Two details of DeepSeek-V3's rotary part matter for loading its weights.
#
# **Channel order.** DeepSeek trained with *interleaved* pairs $(x_{2j}, x_{2j+1})$ (chapter 1, section 2.3), so
# its configuration sets `rope_interleave=True`. transformers rotates those pairs and writes the result in
# half-split order; we keep the interleaved order. The two differ by one channel permutation applied to both the
# rotary query and the rotary key, which leaves every dot product — and so the layer's output — unchanged.
#
# **Long context: YaRN.** The released checkpoints stretch a 4k-token RoPE to 128k with YaRN (Peng et al., 2023).
# Channel pairs that turn many times over the original context (high frequency, `beta_fast` = 32 turns or more)
# keep their frequency; pairs that turn less than `beta_slow` = 1 time are slowed down by the stretch `factor`
# (40); pairs in between get a linear mix. And because the stretched attention is flatter, the softmax is
# sharpened: transformers multiplies the scale by $\mathrm{mscale}^2$ with
# $\mathrm{mscale} = 0.1\,\texttt{mscale\_all\_dim} \cdot \ln(\texttt{factor}) + 1$, and the cos/sin tables by the
# ratio of two such terms (`attention_factor`, 1 for DeepSeek-V3 where `mscale` = `mscale_all_dim`).

# %%
#| export mla.naive
def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention-temperature term 0.1 · mscale · ln(factor) + 1 (1 when the context is not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(dim, theta, factor, original_max_len, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN's RoPE frequencies [dim/2]: keep fast pairs, divide slow ones by `factor`, a linear ramp between.

    Pair j turns original_max_len · omega_j / (2 pi) times over the original context; the pairs that turn
    beta_fast and beta_slow times bound the ramp (rounded outwards when truncate, as transformers does).
    """
    omega = rope_frequencies(dim, theta)  # [dim/2] theta^(-2j/dim)

    def pair_turning(turns):  # the (fractional) pair index j that turns `turns` times over the original context
        return dim * math.log(original_max_len / (2 * math.pi * turns)) / (2 * math.log(theta))

    lo, hi = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)  # 0 keep .. 1 slow
    return omega * (1 - ramp) + omega / factor * ramp


class YarnRotaryEmbedding(RotaryEmbedding):
    """Chapter 1's RotaryEmbedding with YaRN frequencies and cos/sin tables scaled by attention_factor."""

    _yarn = None  # set after RotaryEmbedding.__init__, whose first _build uses the plain frequencies

    def __init__(self, dim, theta, factor, original_max_len, *, beta_fast=32.0, beta_slow=1.0, truncate=True,
                 attention_factor=1.0, interleaved=False, max_len=2048):
        super().__init__(dim, theta, interleaved, max_len)
        self._yarn = dict(factor=factor, original_max_len=original_max_len, beta_fast=beta_fast,
                          beta_slow=beta_slow, truncate=truncate)
        self.attention_factor = attention_factor
        self._build(max_len, None)

    def _build(self, n, device):
        if self._yarn is None:
            return super()._build(n, device)
        omega = yarn_frequencies(self.dim, self.theta, **self._yarn).to(device)  # [dim/2]
        angles = torch.arange(n, device=device).float()[:, None] * omega  # [n, dim/2]
        self.register_buffer("cos", angles.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * self.attention_factor, persistent=False)


def _rope_type(rope_scaling):
    return (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))


def mla_softmax_scale(qk_head_dim, rope_scaling=None):
    """MLA's softmax scale: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times yarn_mscale(factor,
    mscale_all_dim) ** 2 when rope_scaling is a YaRN setting with mscale_all_dim (DeepSeek-V3's checkpoints)."""
    scale = qk_head_dim**-0.5
    if _rope_type(rope_scaling) != "default" and rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
    return scale


def make_mla_rope(dim, theta=10000.0, interleaved=True, rope_scaling=None):
    """The layer's RotaryEmbedding: plain, or YaRN when rope_scaling = {"rope_type": "yarn", "factor": …,
    "original_max_position_embeddings": …, optional beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor,
    truncate} (transformers' rope_parameters keys)."""
    kind = _rope_type(rope_scaling)
    if kind == "default":
        return RotaryEmbedding(dim, theta, interleaved)
    if kind != "yarn":
        raise NotImplementedError(f"MLA: rope type {kind!r} is not implemented (default and yarn are)")
    s = rope_scaling
    factor = s["factor"]
    attention_factor = s.get("attention_factor")
    if attention_factor is None:  # as transformers infers it
        ms, ms_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all
                            else yarn_mscale(factor))
    return YarnRotaryEmbedding(dim, theta, factor, s["original_max_position_embeddings"],
                               beta_fast=s.get("beta_fast") or 32.0, beta_slow=s.get("beta_slow") or 1.0,
                               truncate=s.get("truncate", True), attention_factor=attention_factor,
                               interleaved=interleaved)


# %% [markdown]
# ### `MLA`
#
# The layer is the equations of section 3.2 with transformers' parameter names and layouts, so that a
# `DeepseekV3Attention` state dict loads as it is:
#
# | parameter | shape | |
# |---|---|---|
# | `q_a_proj`, `q_a_layernorm`, `q_b_proj` | $d \to$ 1536, norm, $1536 \to n_h (d_h + d_R)$ | query latent (`q_lora_rank` set) |
# | `q_proj` | $d \to n_h (d_h + d_R)$ | instead, when `q_lora_rank is None` |
# | `kv_a_proj_with_mqa`, `kv_a_layernorm` | $d \to d_c + d_R$, norm on the first $d_c$ | the cached part |
# | `kv_b_proj` | $d_c \to n_h (d_h + d_v)$ | $[W^{UK}_i; W^{UV}_i]$ per head |
# | `o_proj` | $n_h d_v \to d$ | |
#
# `forward(x, cache=None, absorb=False)` is causal over `x` plus whatever `cache` holds, and appends to it. With
# `absorb=False` it expands keys and values from the (cached) latents and runs chapter 1's `attention_ref`, as
# transformers does; with `absorb=True` it runs section 3.3's attention on the latents. `backend` picks how the
# absorbed attention runs: `"naive"` (PyTorch), `"triton"` (section 3.7's kernel, on a CPU in the interpreter) or
# `"auto"` (the kernel on a GPU or under the interpreter, PyTorch otherwise — and whenever gradients are needed: the
# kernel decodes, it has no backward pass). The constructor's and `forward`'s argument checks are one call each
# (`_check_mla_args`, `_checks.layer_input`; the engineering notes at the end of the chapter list them).

# %%
#| export mla.layer
import math

import torch
import torch.nn as nn

from minisparse import _checks
from minisparse.attention.layer import RMSNorm
from minisparse.attention.naive import attention_ref
from minisparse.mla.naive import (MLACache, _rope_type, absorb_output, absorb_query, expand_latent, make_mla_rope,
                                  mla_attention_absorbed, mla_softmax_scale, split_kv_b)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) with transformers' DeepseekV3Attention parameter names.

    forward(x [B, T, hidden], cache=None, absorb=False, positions=None) -> [B, T, hidden]. With a cache (new_cache)
    the T new tokens sit at positions len(cache) .. len(cache) + T - 1 and attend to everything cached before them.
    absorb=False expands K/V from the latents; absorb=True attends on the latents (never expanding K/V);
    backend "auto" | "naive" | "triton" picks how the absorbed attention runs.
    """

    def __init__(self, hidden_size, num_heads, *, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, attention_bias=False, norm_eps=1e-6, rope_theta=10000.0,
                 rope_interleave=True, rope_scaling=None, backend="auto"):
        super().__init__()
        _check_mla_args(hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
                        v_head_dim, norm_eps, rope_theta)
        self.hidden_size, self.num_heads, self.backend = hidden_size, num_heads, _checks.backend("MLA", backend)
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * qk_head_dim, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias)
        self.rope = make_mla_rope(qk_rope_head_dim, rope_theta, rope_interleave, rope_scaling)
        self.scaling = mla_softmax_scale(qk_head_dim, rope_scaling)

    def project(self, x, positions):
        """x [B, T, hidden] -> q_nope [B,T,H,dn], q_rope [B,T,H,dr] (rotated), c_kv [B,T,r] (normalised),
        k_rope [B,T,dr] (rotated): everything the attention needs, before any cache."""
        B, T, _ = x.shape
        H, dn, dr = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # W_uq RMSNorm(W_dq x)
        q_nope, q_rope = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)  # each head: [nope | rope]
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dr], dim=-1)  # [B,T,r], [B,T,dr]
        c_kv = self.kv_a_layernorm(c_kv)
        q_rope = self.rope(q_rope, positions)  # every head's rotary query
        k_rope = self.rope(k_rope[:, :, None, :], positions)[:, :, 0]  # the one rotary key a token
        return q_nope, q_rope, c_kv, k_rope

    def forward(self, x, cache=None, absorb=False, positions=None):
        _checks.layer_input("MLA", x, self, "[B, T, hidden]", self.hidden_size)
        B, T, _ = x.shape
        start = 0 if cache is None else len(cache)
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)  # [T]
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)  # [B, start + T, r], [B, start + T, dr]
        if absorb:
            o = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope)  # [B, T, H, dv]
        else:
            k, v = expand_latent(c_kv, k_rope, self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim,
                                 self.v_head_dim)  # [B, S, H, dn + dr], [B, S, H, dv]
            o = attention_ref(torch.cat([q_nope, q_rope], dim=-1), k, v, causal=True, scale=self.scaling)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))  # [B, T, hidden]

    def absorbed_weights(self):
        """(W_uk [H, dn, r], W_uv [H, dv, r]): views of kv_b_proj.weight."""
        return split_kv_b(self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim, self.v_head_dim)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope):
        w_uk, w_uv = self.absorbed_weights()
        q_latent = absorb_query(q_nope, w_uk)  # [B, T, H, r]
        backend = _checks.choose_backend(_checks.backend("MLA", self.backend), q_latent)  # backend may be reassigned
        if self.backend == "auto" and torch.is_grad_enabled() and (q_latent.requires_grad or c_kv.requires_grad):
            backend = "naive"  # the kernel has no backward pass
        if backend == "triton":
            from minisparse.mla.triton import mla_decode  # lazy: the layer imports without the kernels

            o_latent = mla_decode(q_latent, q_rope, c_kv, k_rope, self.scaling)  # [B, T, H, r]
        else:
            o_latent = mla_attention_absorbed(q_latent, q_rope, c_kv, k_rope, self.scaling)  # [B, T, H, r]
        return absorb_output(o_latent, w_uv)  # [B, T, H, dv]

    def new_cache(self, batch, max_len, *, dtype=None, device=None):
        """An empty MLACache (kv_lora_rank + qk_rope_head_dim a token) in the layer's dtype and device by default."""
        w = self.kv_b_proj.weight
        return MLACache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype=dtype or w.dtype,
                        device=device or w.device)

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """Build from transformers' DeepseekV3Attention (same shapes, RoPE convention, YaRN, eps), copying weights."""
        cfg = module.config
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        scaling = None
        if _rope_type(rope) != "default":
            scaling = dict(rope)
            if scaling.get("factor") is None:  # DeepSeek's configs may derive the stretch from the two lengths
                scaling["factor"] = cfg.max_position_embeddings / scaling["original_max_position_embeddings"]
        layer = cls(cfg.hidden_size, cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                    kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                    qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                    attention_bias=module.kv_a_proj_with_mqa.bias is not None,
                    norm_eps=module.kv_a_layernorm.variance_epsilon, rope_theta=theta,
                    rope_interleave=bool(getattr(cfg, "rope_interleave", False)), rope_scaling=scaling,
                    backend=backend)
        if not math.isclose(layer.scaling, module.scaling, rel_tol=1e-9):
            raise ValueError(f"MLA.from_hf: softmax scale {layer.scaling} differs from the module's {module.scaling}")
        layer.load_state_dict(module.state_dict())
        w = module.kv_b_proj.weight
        return layer.to(device=w.device, dtype=w.dtype)

# %% [markdown]
# ### Check: the same outputs as transformers
#
# transformers' `DeepseekV3Attention` at tiny sizes, random weights, eager attention and an explicit causal mask:
# with a query latent (`q_lora_rank` set) and without, with interleaved and half-split RoPE, and with a YaRN
# configuration whose `mscale` and `mscale_all_dim` differ, so that both YaRN factors are exercised — at positions
# 200 and beyond, past the "original" context of 64.

# %%
from minisparse.mla import MLA

HF_CASES = {
    "q_lora_rank=24, interleaved RoPE": dict(q_lora_rank=24, rope_interleave=True),
    "q_proj (q_lora_rank=None), half-split RoPE": dict(q_lora_rank=None, rope_interleave=False),
    "YaRN ×4, mscale 1 / mscale_all_dim 0.5": dict(q_lora_rank=24, rope_interleave=True, max_position_embeddings=256,
                                                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                                       factor=4.0, original_max_position_embeddings=64,
                                                                       beta_fast=32, beta_slow=1, mscale=1.0,
                                                                       mscale_all_dim=0.5)),
}


def tiny_hf_attention(seed=0, **overrides):
    """transformers' DeepseekV3Attention at a tiny size with random weights (and its rotary embedding)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, num_hidden_layers=1, attn_implementation="eager")
    cfg = DeepseekV3Config(**{**kw, **overrides})
    torch.manual_seed(seed)
    hf = hf_ds.DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.15)
    return hf, hf_ds.DeepseekV3RotaryEmbedding(cfg)


def hf_forward(hf, rotary, x, positions):
    T = x.shape[1]
    cos_sin = rotary(x, positions[None])
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]  # additive mask [1, 1, T, T]
    return hf(x, cos_sin, causal)[0]


if transformers is not None:
    x_hf = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(3))
    for name, over in HF_CASES.items():
        hf, rotary = tiny_hf_attention(**over)
        ours = MLA.from_hf(hf)
        pos = torch.arange(13) + (200 if "YaRN" in name else 0)
        with torch.no_grad():
            y_hf = hf_forward(hf, rotary, x_hf, pos)
            y_exp, y_abs = ours(x_hf, positions=pos), ours(x_hf, positions=pos, absorb=True)
        e1 = assert_close(f"{name}: expanded", y_hf, y_exp, 1e-5)
        e2 = assert_close(f"{name}: absorbed", y_hf, y_abs, 1e-5)
        print(f"✓ {name:44s} vs DeepseekV3Attention: expanded {e1:.1e}, absorbed {e2:.1e}  (scale {ours.scaling:.4f})")

# %% [markdown]
# The parameter count of the real layer, built on the `meta` device (no memory), and where its parameters go:

# %%
with torch.device("meta"):
    big = MLA(7168, 128, q_lora_rank=1536)  # DeepSeek-V3's attention
for name, p in big.named_parameters():
    print(f"{name:28s} {str(tuple(p.shape)):16s} {p.numel() / 1e6:7.2f} M")
n_mla = sum(p.numel() for p in big.parameters())
n_mha = 4 * 7168 * 128 * 128 + 2 * 7168 * 128 * 64  # q, k, v, o of MHA at the same sizes, plus the rope parts
print(f"{'total':28s} {'':16s} {n_mla / 1e6:7.2f} M   (an MHA layer of the same head sizes: ~{n_mha / 1e6:.0f} M)")

# %% [markdown]
# ### Check: decoding from the latent cache
#
# The property the cache exists for: a prompt, then a chunk, then one token at a time, with `absorb=True` — never
# expanding a key — must give the outputs of one expanded pass over the whole sequence. Here with DeepSeek-V3's
# head sizes (latent 512 + 64) but 4 heads.

# %%
T_DEC = runtime.reading_size(cpu=20, gpu=200)
torch.manual_seed(4)
layer = MLA(256, 4, q_lora_rank=64).to(DEVICE)
with torch.no_grad():
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.06)
    x_dec = torch.randn(2, T_DEC, 256, device=DEVICE)
    full = layer(x_dec)  # expanded, one pass
    cache = layer.new_cache(2, T_DEC)
    steps = [layer(x_dec[:, :6], cache, absorb=True), layer(x_dec[:, 6:9], cache, absorb=True)]
    steps += [layer(x_dec[:, t:t + 1], cache, absorb=True) for t in range(9, T_DEC)]
err = assert_close("absorbed decoding vs expanded prefill", full, torch.cat(steps, dim=1), 1e-5)
print(f"✓ {T_DEC} tokens decoded from a {tuple(cache.buffer.shape)} latent cache "
      f"({cache.buffer.nbytes:,} bytes) equal the prefill: relative RMS error {err:.1e}")
assert cache.buffer.nbytes == kv_cache_bytes(layer, T_DEC, cache.buffer.dtype, batch=2)  # the formula is the tensor

# %% [markdown]
# ## 3.5 See it
#
# ### What the heads attend to
#
# A trained checkpoint is out of reach here (no downloads), but the two terms of an MLA score are easy to see in a
# layer whose weights we set by hand. Each word of a toy sentence gets a random 16-dimensional embedding, plus one
# constant channel. The latent is the word's embedding ($W^{DKV}$ copies it), and the shared rotary key is the
# *same* vector $u$ for every token, rotated by its position — so it carries position only. Four heads:
#
# - **content**: the query is the word's embedding, the rotary query is zero — a token looks for earlier copies of
#   itself through $\tilde q^\top c_s$;
# - **previous token**: no content query, a constant rotary query $R_{-1} u$ — by section 3.2's identity the score
#   is $u^\top R_{s-t+1} u$, largest at $s = t - 1$;
# - **both**: half of each;
# - **random**: what an untrained head does.

# %%
words = "the cat sat on the mat and the dog sat by the cat so the mat was warm".split()
vocab = sorted(set(words))
g = torch.Generator().manual_seed(5)
emb = torch.randn(len(vocab), 16, generator=g) / 4  # [V, 16] word embeddings, norm ≈ 1
x_toy = torch.cat([emb[[vocab.index(w) for w in words]], torch.ones(len(words), 1),
                   torch.zeros(len(words), 3)], dim=1)[None]  # [1, T, 20]: embedding | 1 | padding
toy = MLA(20, 4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_theta=10.0)
u = torch.tensor([1.5, 0.0, 1.2, 0.0, 1.0, 0.0, 0.8, 0.0])  # the shared rotary key, unrotated: a pair a frequency
u_prev = apply_rope(u.view(1, 1, 1, 8), torch.tensor([-1]), theta=10.0, interleaved=True).flatten()  # R_{-1} u
with torch.no_grad():
    for p in toy.parameters():
        p.zero_()
    toy.kv_a_layernorm.weight.fill_(1.0)
    toy.kv_a_proj_with_mqa.weight[:16, :16] = torch.eye(16)  # latent = the word embedding (then RMS-normalised)
    toy.kv_a_proj_with_mqa.weight[16:, 16] = u  # rotary key = u from the constant channel
    toy.kv_b_proj.weight.copy_(torch.eye(32).repeat(4, 1)[:, :16])  # every head: W_uk = I, W_uv = I
    q_w = toy.q_proj.weight.view(4, 24, 20)  # per head: 16 nope rows | 8 rope rows
    content, position = 8 * torch.eye(16, 20), 16 * u_prev[:, None] * torch.eye(20)[16]
    q_w[0, :16], q_w[1, 16:] = content, position
    q_w[2, :16], q_w[2, 16:] = content / 2, position / 2
    q_w[3] = torch.randn(24, 20, generator=g)

positions = torch.arange(len(words))
q_nope_t, q_rope_t, c_t, kr_t = toy.project(x_toy, positions)
k_t, _ = expand_latent(c_t, kr_t, toy.kv_b_proj.weight, 4, 16, 16)
probs = attention_weights(torch.cat([q_nope_t, q_rope_t], -1), k_t, scale=toy.scaling)[0]  # [H, T, T]
fig = viz.panels({name: probs[h] for h, name in enumerate(["content", "previous token", "both", "random"])},
                 size=3.3, cmap="Blues", vmin=0, vmax=1)
for ax in fig.axes:
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=6)
    ax.set_yticks(range(len(words)), words, fontsize=6)
plt.show()

# %% [markdown]
# The content head puts its weight on earlier copies of the same word ("the", "cat", "sat", "mat") and on the token
# itself; the previous-token head is a clean sub-diagonal, built from nothing but the shared 8-number rotary key.
# The third head mixes the two. Below, its two score terms side by side — the content term $\tilde q^\top c_s$ (it
# does not depend on where the tokens are) and the position term $q^{R\top} k^R_s$ (it depends on $t - s$ only, so it
# is constant along diagonals) — and the probabilities they make together:

# %%
w_uk_t, _ = toy.absorbed_weights()
s_content = torch.einsum("tr,sr->ts", absorb_query(q_nope_t, w_uk_t)[0, :, 2], c_t[0]) * toy.scaling
s_position = torch.einsum("td,sd->ts", q_rope_t[0, :, 2], kr_t[0]) * toy.scaling
causal = torch.ones(len(words), len(words), dtype=torch.bool).tril()
fig = viz.panels({"content term q̃·c (scaled)": s_content.masked_fill(~causal, float("nan")),
                  "position term qᴿ·kᴿ (scaled)": s_position.masked_fill(~causal, float("nan")),
                  "softmax of the sum": probs[2]}, size=3.3, cmap="viridis")
plt.show()
assert torch.allclose(s_position.diagonal(-1)[:-1], s_position.diagonal(-1)[1:], atol=1e-5)  # constant per offset

# %% [markdown]
# ### Cache size and rank: explore
#
# The knobs of MLA's cache are the latent rank $d_c$ and the rotary size $d_R$; the number of heads changes what the
# *other* families cache, not MLA's. Move them and compare with MHA, GQA-8 and MQA of the same heads (keys of
# $128 + d_R$, values of 128, 61 layers as DeepSeek-V3). The title says which GQA an MLA cache equals in bytes. The
# right panel is decoding's arithmetic intensity (section 3.6): absorbed MLA does $\approx 2 n_h$ FLOPs per byte of
# cache, so more heads make it compute-bound.

# %%
# NBVAL_IGNORE_OUTPUT
def draw_ranks(kv_lora_rank=512, qk_rope_head_dim=64, num_heads=128):
    from minisparse.mla import GQAConfig, MLAConfig, kv_cache_bytes, mla_decode_bytes, mla_decode_flops

    dk = 128 + qk_rope_head_dim
    fams = {"MHA": GQAConfig(61, num_heads, num_heads, dk, 128), "GQA-8": GQAConfig(61, num_heads, min(8, num_heads),
                                                                                    dk, 128),
            "MQA": GQAConfig(61, num_heads, 1, dk, 128),
            f"MLA {kv_lora_rank}+{qk_rope_head_dim}": MLAConfig(61, num_heads, kv_lora_rank=kv_lora_rank,
                                                                qk_rope_head_dim=qk_rope_head_dim)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, (name, cfg) in enumerate(fams.items()):
        ax1.loglog(CONTEXT, [kv_cache_bytes(cfg, T) / 1e9 for T in CONTEXT], "o-", color=f"C{i}", label=name)
    ax1.axhline(H200 / 1e9, color="red", lw=0.8)
    viz.tokens_axis(ax1)
    groups = (kv_lora_rank + qk_rope_head_dim) / (2 * dk)
    ax1.set(ylabel="cache of one sequence (GB)", title=f"MLA caches like GQA with {groups:.2f} groups")
    ax1.legend(fontsize=8)
    heads = np.arange(1, 129)
    mla_i = [mla_decode_flops(1, h, kv_lora_rank, qk_rope_head_dim) / mla_decode_bytes(1, kv_lora_rank,
                                                                                       qk_rope_head_dim)
             for h in heads]
    ax2.plot(heads, mla_i, label="MLA absorbed")
    ax2.axhline(1.0, color="C0", ls="--", label="MHA (any heads)")
    ax2.axhline(693 / 4.25, color="red", lw=0.8, label="H200 ridge (163)")
    ax2.axvline(num_heads, color="grey", ls=":")
    ax2.set(xlabel="query heads reading one latent cache", ylabel="FLOP per byte of cache", yscale="log",
            title="decoding's arithmetic intensity")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


explorer = viz.explorer(draw_ranks, kv_lora_rank=(64, 1024, 64), qk_rope_head_dim=[64, 32, 16, 128],
                        num_heads=(8, 128, 8))

# %% [markdown]
# ## 3.6 Cost model
#
# Per decoding step, per layer and sequence, with $T$ cached tokens and one new query (bf16: 2 bytes a number):
#
# | | FLOPs | bytes of cache read |
# |---|---|---|
# | MHA over an expanded cache | $2 n_h T (d_k + d_v)$ | $2\, n_h T (d_k + d_v)$ |
# | MLA, expanding the latents each step | $2 T d_c n_h (d_h + d_v) + 2 n_h T (d_k + d_v)$ | $2\, T (d_c + d_R)$ |
# | MLA, absorbed | $2 n_h T (2 d_c + d_R)$ (+ $2 n_h d_c (d_h + d_v)$ for the two folds) | $2\, T (d_c + d_R)$ |
#
# with $d_k = d_h + d_R$. Expanding every step reads little but multiplies every cached latent by `kv_b_proj` again:
# at DeepSeek-V3's sizes that is 16.8 MFLOPs *per cached token per layer*. Absorbing moves that product to the one
# new token. What remains is $2(2 d_c + d_R) = 2176$ FLOPs per head per cached token against 1152 bytes — an
# arithmetic intensity of about $1.9\, n_h$ FLOP/byte, because all heads share one cache, where MHA has 1.

# %%
#| export mla.cost
def mla_decode_flops(T, num_heads, kv_lora_rank=512, rope_dim=64, *, B=1, q_tokens=1):
    """Matmul FLOPs of absorbed MLA attention: B·q_tokens·H query rows, each scoring T keys of r + dr and averaging
    T values of r: 2·B·q·H·T·(2r + dr). (The folds W_uk, W_uv are counted by mla_absorb_flops.)"""
    return 2 * B * q_tokens * num_heads * T * (2 * kv_lora_rank + rope_dim)


def mla_decode_bytes(T, kv_lora_rank=512, rope_dim=64, *, B=1, dtype_bytes=2):
    """Bytes of latent cache one decoding step reads: B·T·(r + dr)·bytes (read once for all heads)."""
    return B * T * (kv_lora_rank + rope_dim) * dtype_bytes


def mla_absorb_flops(num_heads, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128, *, B=1, q_tokens=1):
    """FLOPs of the two folds for the new tokens: q̃ = W_ukᵀ q_nope and o = W_uv õ, per head."""
    return 2 * B * q_tokens * num_heads * kv_lora_rank * (qk_nope_head_dim + v_head_dim)


def mla_expand_flops(T, num_heads, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128, *, B=1):
    """FLOPs of expanding T cached latents into per-head keys and values (kv_b_proj): 2·B·T·r·H·(dn + dv)."""
    return 2 * B * T * kv_lora_rank * num_heads * (qk_nope_head_dim + v_head_dim)


def mha_decode_flops(T, num_heads, k_dim=192, v_dim=128, *, B=1, q_tokens=1):
    """Matmul FLOPs of softmax attention for B·q_tokens new queries over T cached keys: 2·B·q·H·T·(dk + dv)."""
    return 2 * B * q_tokens * num_heads * T * (k_dim + v_dim)


def mha_decode_bytes(T, num_kv_heads, k_dim=192, v_dim=128, *, B=1, dtype_bytes=2):
    """Bytes of an expanded K/V cache one decoding step reads: B·T·H_kv·(dk + dv)·bytes."""
    return B * T * num_kv_heads * (k_dim + v_dim) * dtype_bytes


# %%
from minisparse.mla import (mha_decode_bytes, mha_decode_flops, mla_absorb_flops, mla_decode_bytes, mla_decode_flops,
                            mla_expand_flops)

PEAK, BW = 693e12, 4.25e12  # H200: bf16 dense matmul FLOP/s and HBM copy bytes/s, measured (DESIGN §7)
RIDGE = PEAK / BW
intensity = mla_decode_flops(1, 128) / mla_decode_bytes(1)
print(f"absorbed MLA, 128 heads: {intensity:.0f} FLOP/byte (H200 ridge {RIDGE:.0f}): compute-bound; "
      f"16 heads (a tensor-parallel-8 shard): {mla_decode_flops(1, 16) / mla_decode_bytes(1):.0f}: memory-bound")
assert abs(intensity - 2 * 128 * 1088 / 1152) < 1e-9 and intensity > RIDGE
assert mla_expand_flops(1, 128) == 2 * 512 * 128 * 256  # 16.8 MFLOPs per cached token per layer
assert (512 + 64) / (2 * 128) == 2.25  # DeepSeek-V2 Table 1: MLA's cache equals GQA with 2.25 groups
need = 0.6 * BW / mla_decode_bytes(1) * mla_decode_flops(1, 128)
print(f"reading the latent cache at 60 % of the bandwidth with 128 heads takes {need / 1e12:.0f} TFLOP/s "
      f"= {need / PEAK:.0%} of the bf16 peak")

T_axis = np.array([2**i for i in range(10, 18)])
B_COST = 64
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 3.8))
rows = {
    "MHA, expanded cache": (mha_decode_flops(T_axis, 128, B=B_COST), mha_decode_bytes(T_axis, 128, B=B_COST)),
    "MLA, expand each step": (mla_expand_flops(T_axis, 128, B=B_COST) + mha_decode_flops(T_axis, 128, B=B_COST),
                              mla_decode_bytes(T_axis, B=B_COST)),
    "MLA, absorbed (128 heads)": (mla_decode_flops(T_axis, 128, B=B_COST) + mla_absorb_flops(128, B=B_COST),
                                  mla_decode_bytes(T_axis, B=B_COST)),
    "MLA, absorbed (16 heads)": (mla_decode_flops(T_axis, 16, B=B_COST) + mla_absorb_flops(16, B=B_COST),
                                 mla_decode_bytes(T_axis, B=B_COST)),
}
for i, (name, (fl, by)) in enumerate(rows.items()):
    t_ms = np.maximum(fl / PEAK, by / BW) * 1e3
    ax1.loglog(T_axis, t_ms, "o-", color=f"C{i}", label=name)
    ax2.semilogx(T_axis, fl / by, "o-", color=f"C{i}", label=name)
ax2.axhline(RIDGE, color="red", lw=0.8)
ax2.text(T_axis[0], RIDGE / 1.9, "H200 ridge: compute-bound above", color="red", fontsize=8)
ax2.set_yscale("log")
for ax in (ax1, ax2):
    viz.tokens_axis(ax)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
ax1.set(ylabel="ms per layer (roofline bound)", title=f"one decoding step, one layer, batch {B_COST}")
ax2.set(ylabel="FLOP / byte", title="arithmetic intensity")
fig.tight_layout()
plt.show()

# %% [markdown]
# *Assumptions: bf16; one new token per sequence; the roofline time is max(FLOPs / 693 TFLOP/s, bytes / 4.25 TB/s),
# the H200's measured peaks; weights and the $q$/$o$ projections are left out.*
#
# Expanding the latents every step (orange) is the worst of both worlds: it reads the small cache but spends
# 16.8 MFLOPs per cached token — far more time than MHA spends reading its huge cache. Absorbed with 128 heads
# (green), MLA reads 71 times fewer bytes than MHA and still lands at the compute roof: 242 FLOP/byte against a
# ridge of 163. Sustaining 60 % of the bandwidth there means 617 TFLOP/s, 89 % of the matmul peak. For scale: the
# FlashMLA repository, hand-written CUDA for Hopper, reports up to 3000 GB/s when its decoding is memory-bound and
# 580–660 TFLOP/s when it is compute-bound, on an H800 SXM5. Served tensor-parallel (16 heads a GPU), the same step
# is memory-bound and the cache read is the whole story.

# %% [markdown]
# ## 3.7 Fast: a split-K decode kernel over the latent cache
#
# ### The work, and how to cut it
#
# One decoding step of absorbed MLA is, for each sequence $b$: $T_q$ new tokens (usually one) × $n_h$ heads = a few
# hundred query rows, all scoring the **same** `lengths[b]` cached keys $[c_s; k^R_s]$ and averaging the same values
# $c_s$. The kernel has two jobs: read each cached latent from memory **once for all heads**, and keep the whole GPU
# busy while doing it.
#
# - **All heads together.** A program takes a block of `BLOCK_H` query rows (heads of one token) and loops over the
#   cache in blocks of `BLOCK_N` tokens. Each latent block is loaded once and used twice: as keys,
#   `scores = q̃ @ cᵀ + qᴿ @ kᴿᵀ` (`[BLOCK_H, BLOCK_N]`), and as values, `acc += p @ c` (`[BLOCK_H, 512]`). With
#   `BLOCK_H` = 64 and 128 heads, two programs share each latent block (the second finds it in L2 cache).
# - **Split the keys.** That gives only $B \cdot n_h / \text{BLOCK\_H}$ programs — 2 for a single sequence, on a GPU
#   with 132 SMs. Flash-decoding (Dao et al., 2023) cuts the key range into `NS` splits as well: each program handles
#   one split of one head block of one sequence and writes a **partial softmax state** per row — the running max
#   $m$, the sum $\ell = \sum e^{s - m}$ and the unnormalised output $a = \sum e^{s - m} c_s$. A second, small kernel
#   merges the `NS` states of each row (chapter 1's exercise 1, repeated) and divides.
# - **Ragged batches.** Sequence $b$ reads only its first `lengths[b]` tokens; splits past its end exit at once and
#   are never merged.
#
# How many splits? Enough that the programs fill the GPU about once — one per SM, so 64 sequences × 2 head blocks
# need no split at all on a 132-SM H200, while a single sequence gets ~66 — but never a split so short that its
# partial state costs more than it saves: each split writes, and the combine reads back, `rows × 512` fp32 numbers
# (256 KB for 128 heads), which should not outweigh the split's own cache bytes (≥ 910 tokens at 128 heads in
# bf16), and never fewer than 256 tokens.
#
# ### The spec and the split, in PyTorch
#
# First the specification of what the kernel computes — `mla_attention_absorbed` on each sequence's first
# `lengths[b]` tokens. Then the same computation cut into splits, in PyTorch: partial states per split, then the
# merge. (It computes every score at once, so it is a model of the kernel's arithmetic, not of its memory use.) The
# three decode ops check their arguments with one call, `check_mla_decode_args` (in the engineering notes at the
# end of the chapter).

# %%
#| export mla.naive
def mla_decode_ref(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None):
    """The spec of mla_decode: per sequence b, mla_attention_absorbed over its first lengths[b] cached tokens.

    q_latent [B, T, H, Dc], q_rope [B, T, H, Dr], kv_cache [B, S, Dc], rope_cache [B, S, Dr], lengths [B] or None
    (all S) -> o_latent [B, T, H, Dc]; the T queries of b sit at positions lengths[b] - T .. lengths[b] - 1.
    """
    B, _, _, _, _, S = check_mla_decode_args("mla_decode_ref", q_latent, q_rope, kv_cache, rope_cache, scale, lengths)
    ends = [S] * B if lengths is None else [int(n) for n in lengths.tolist()]
    return torch.cat([mla_attention_absorbed(q_latent[b:b + 1], q_rope[b:b + 1], kv_cache[b:b + 1, :n],
                                             rope_cache[b:b + 1, :n], scale) for b, n in enumerate(ends)])


def combine_splits(m, l, acc):
    """Merge partial softmax states along dim 0: m, l [NS, ...], acc [NS, ..., D] -> o [..., D].

    Split i holds m = max of its scores (-inf if it saw none), l = sum exp(s - m), acc = sum exp(s - m) v.
    """
    m_all = m.max(dim=0).values  # [...]
    w = torch.where(torch.isneginf(m), torch.zeros_like(m), torch.exp(m - m_all))  # [NS, ...] empty splits weigh 0
    return (w[..., None] * acc).sum(dim=0) / (w * l).sum(dim=0)[..., None]


def mla_decode_splitk(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None, split_len=64):
    """mla_decode_ref computed as the kernel does: keys cut into splits of split_len tokens, a partial softmax
    state (m, l, acc) per split and query row, then combine_splits. Same arguments; PyTorch, fp32."""
    B, T, H, Dc, _, S = check_mla_decode_args("mla_decode_splitk", q_latent, q_rope, kv_cache, rope_cache, scale,
                                              lengths)
    f = torch.float32
    s = (torch.einsum("bthr,bsr->bths", q_latent.to(f), kv_cache.to(f))
         + torch.einsum("bthd,bsd->bths", q_rope.to(f), rope_cache.to(f))) * scale  # [B, T, H, S]
    ends = torch.full((B,), S, device=s.device) if lengths is None else lengths.to(s.device)
    last = ends[:, None] - T + torch.arange(T, device=s.device)  # [B, T] position of each query
    visible = torch.arange(S, device=s.device) <= last[..., None]  # [B, T, S] causal, within the sequence
    s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
    ns = -(-S // split_len)  # number of splits
    pad = ns * split_len - S
    s = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(B, T, H, ns, split_len)
    v = torch.nn.functional.pad(kv_cache.to(f), (0, 0, 0, pad)).view(B, ns, split_len, Dc)
    m = s.max(dim=-1).values  # [B, T, H, NS]
    p = torch.where(torch.isneginf(m)[..., None], torch.zeros_like(s), torch.exp(s - m[..., None]))
    acc = torch.einsum("bthnk,bnkr->nbthr", p, v)  # [NS, B, T, H, Dc]
    o = combine_splits(m.movedim(-1, 0), p.sum(dim=-1).movedim(-1, 0), acc)
    return o.to(q_latent.dtype)


# %%
from minisparse.mla import mla_decode_ref, mla_decode_splitk

g = torch.Generator().manual_seed(6)
B_S, S_S, H_S = 3, 300, 5
ql_s, qr_s = torch.randn(B_S, 1, H_S, 48, generator=g), torch.randn(B_S, 1, H_S, 16, generator=g)
kv_s, kr_s = torch.randn(B_S, S_S, 48, generator=g), torch.randn(B_S, S_S, 16, generator=g)
len_s = torch.tensor([300, 1, 137])  # ragged: full, a single token, a length that is no multiple of anything
ref_s = mla_decode_ref(ql_s, qr_s, kv_s, kr_s, 0.2, len_s)
for split in (16, 64, 300, 512):
    assert_close(f"split_len={split}", ref_s, mla_decode_splitk(ql_s, qr_s, kv_s, kr_s, 0.2, len_s, split), 1e-5)
one = attention_ref(torch.cat([ql_s[1:2], qr_s[1:2]], -1), torch.cat([kv_s[1:2, :1], kr_s[1:2, :1]], -1)[:, :, None],
                    kv_s[1:2, :1, None], scale=0.2)
assert torch.allclose(ref_s[1], one[0]) and torch.allclose(ref_s[1, 0], kv_s[1, 0].expand(H_S, 48))  # 1 token: o = c_0
print("the split-K form equals the spec for 4 split lengths on a ragged batch (lengths 300, 1, 137)")

# %% [markdown]
# ### The split, drawn
#
# Three sequences of a ragged batch over a cache of 1024 slots, cut into splits of 256 tokens. Each coloured
# segment is the work of one split program *per head block* (with 128 heads and `BLOCK_H` = 64 there are two, each
# covering 64 heads; they read the same latents). Hatched: splits that start past the sequence's end and exit at
# once. The combine kernel then merges, for each (sequence, head), the partial states of the coloured segments of
# its row.

# %%
lens_demo, S_demo, split_demo, BN_demo = [1000, 300, 620], 1024, 256, 64
fig, ax = plt.subplots(figsize=(10, 2.9))
for b, n in enumerate(lens_demo):
    for i in range(S_demo // split_demo):
        start, end = i * split_demo, min((i + 1) * split_demo, n)
        if start >= n:
            ax.add_patch(plt.Rectangle((start, b - 0.35), split_demo, 0.7, facecolor="none", edgecolor="grey",
                                       hatch="//", lw=0.5))
            continue
        ax.add_patch(plt.Rectangle((start, b - 0.35), end - start, 0.7, facecolor=f"C{i}", alpha=0.55,
                                   edgecolor="black"))
        for k0 in range(start + BN_demo, end, BN_demo):  # the BLOCK_N steps of the program's loop
            ax.plot([k0, k0], [b - 0.35, b + 0.35], color="white", lw=0.6)
        if end - start > 100:
            ax.text((start + end) / 2, b, f"split {i}\n(m, ℓ, acc)", ha="center", va="center", fontsize=7)
    ax.plot([n, n], [b - 0.45, b + 0.45], color="tab:red", lw=1.5)
    ax.text(S_demo + 10, b, f"lengths[{b}] = {n}", va="center", fontsize=8)
ax.set_xlim(0, S_demo + 190)
ax.set_ylim(len(lens_demo) - 0.5, -0.5)
ax.set_yticks(range(len(lens_demo)), [f"sequence {b}" for b in range(len(lens_demo))])
ax.set_xlabel("cached token (white ticks: the BLOCK_N = 64 steps of each program's loop)")
ax.set_title("split-K over a ragged latent cache: grid = (head blocks, splits, batch); hatched = exits at once")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The kernels, tile by tile
#
# **Split kernel.** Program `(pid_h, split, b)` owns query rows `pid_h·BLOCK_H …` of sequence `b` — a row is one
# (query token, head) pair, row $= t\,n_h + h$ — and cache tokens `[split·split_len, (split+1)·split_len)`, cut
# at `lengths[b]`.
#
# 1. Load its rows' absorbed queries, `q̃` `[BLOCK_H, Dc]` and `qᴿ` `[BLOCK_H, Dr]`, once. (Dimensions that are not
#    powers of two — a latent of 48 — are padded with zeros to the next one; zeros add nothing to a dot product.)
# 2. For each block of `BLOCK_N` tokens: load the latents `c` `[BLOCK_N, Dc]` and rotary keys `kᴿ`
#    `[BLOCK_N, Dr]`; `s = (q̃ @ cᵀ + qᴿ @ kᴿᵀ) · scale · log₂e`; mask tokens past the split, past `lengths[b]`,
#    and — when $T_q > 1$ — past each row's own position; then the online softmax in base 2:
#    `m' = max(m, rowmax s)`, `p = 2^(s − m')`, `ℓ = ℓ·2^(m − m') + Σp`, `acc = acc·2^(m − m') + p @ c`. The same
#    `c` tile serves as keys and as values: that is the one read per latent.
# 3. Store `acc` `[BLOCK_H, Dc]`, `m` and `ℓ` for its rows into fp32 partial buffers `[B, NS, rows, …]`.
#
# A row that sees no key in a split keeps $m = -\infty$; the code computes `2^(m − m')` against a finite
# stand-in so that it never evaluates $-\infty - (-\infty)$, and the combine gives such a split zero weight.
#
# **Combine kernel.** Program `(row block, b)` walks the `ceil(lengths[b] / split_len)` splits that sequence `b`
# actually has, merges their states with the same rescaling, divides by `ℓ` and writes the output in the input
# dtype.
#
# Addresses go through strides, so the cache may be two views of one `[B, S, Dc + Dr]` buffer (as `MLACache`
# stores it), and batch offsets are 64-bit: 64 sequences × 64k tokens × 576 values overflow 32 bits. Names in the
# kernels: `*_ptr` pointers (moved once to the program's sequence), `s_<tensor><dim>` strides, `*_ok` masks.

# %%
#| export mla.triton
import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from minisparse import _checks, runtime
from minisparse.mla.naive import check_mla_decode_args, mla_decode_ref

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split_kernel(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, acc_ptr, m_ptr, l_ptr,
                             T, H, ROWS, NS, split_len, qk_scale,
                             s_qlb, s_qlt, s_qlh, s_qld, s_qrb, s_qrt, s_qrh, s_qrd,
                             s_kvb, s_kvn, s_kvd, s_krb, s_krn, s_krd,
                             DC: tl.constexpr, DR: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_DR: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Partial softmax states of BLOCK_H query rows of sequence b over one split of its latent cache.

    Program (pid_h, split, b), grid (cdiv(ROWS, BLOCK_H), NS, B). A row is one (query token t, head h) pair,
    row = t·H + h, ROWS = T·H; query t of sequence b sits at position lengths[b] − T + t and sees the keys up to it.
    The program owns rows pid_h·BLOCK_H … + BLOCK_H and the tokens [split·split_len, (split + 1)·split_len) cut at
    lengths[b]; a split that starts past lengths[b] exits at once.

                    cache tokens of sequence b  →                (lengths[b] of S used)
                ┌──────────────┬──────────────┬──────────────┬───────┐┄┄┄┄┄┄┄┐
       rows     │   split 0    │   split 1    │   split 2    │ sp. 3 │ past  │
       (t, h)   │▓▓▓▓│▓▓▓▓│▓▓▓▓│              │              │       │ the   │
       BLOCK_H  │BLOCK_N tiles │              │              │       │ end   │
                └──────────────┴──────────────┴──────────────┴───────┘┄┄┄┄┄┄┄┘
       q̃ [BLOCK_H, DC] and qᴿ [BLOCK_H, DR] are loaded once; each tile [c | kᴿ] [BLOCK_N, DC + DR] is loaded once
       and used twice: as keys (scores) and, c alone, as values.

    Math, per tile, in base 2 (qk_scale = scale·log₂e):
        s   = (q̃ cᵀ + qᴿ kᴿᵀ)·qk_scale, −∞ past the split, past lengths[b] and past the row's own position
        m'  = max(m, rowmax s);  p = 2^(s − m');  ℓ = ℓ·2^(m − m') + Σ p;  acc = acc·2^(m − m') + p c
    Writes acc [BLOCK_H, DC], m and ℓ [BLOCK_H] (fp32) to slot (b, split) of the partial buffers [B, NS, ROWS, …].
    DC, DR are padded to the powers of two BLOCK_DC, BLOCK_DR with zeros, which add nothing to a dot product.
    """
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start = split * split_len
    if start >= length:  # past this sequence's end: the combine never reads this slot
        return
    b64 = b.to(tl.int64)
    ql_ptr += b64 * s_qlb  # sequence b's queries and cache
    qr_ptr += b64 * s_qrb
    kv_ptr += b64 * s_kvb
    kr_ptr += b64 * s_krb
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH] row = t·H + h
    row_ok = rows < ROWS
    t = rows // H
    h = rows % H
    last_key = length - T + t  # [BH] the position of each row's query: it sees keys 0 .. last_key
    last_row = tl.minimum(pid_h * BLOCK_H + BLOCK_H, ROWS) - 1
    end = tl.minimum(tl.minimum(start + split_len, length), length - T + last_row // H + 1)  # no row sees beyond
    dc = tl.arange(0, BLOCK_DC)
    dr = tl.arange(0, BLOCK_DR)
    ql = tl.load(ql_ptr + t[:, None] * s_qlt + h[:, None] * s_qlh + dc[None, :] * s_qld,
                 mask=row_ok[:, None] & (dc[None, :] < DC), other=0.0)  # [BH, BDC] q̃
    qr = tl.load(qr_ptr + t[:, None] * s_qrt + h[:, None] * s_qrh + dr[None, :] * s_qrd,
                 mask=row_ok[:, None] & (dr[None, :] < DR), other=0.0)  # [BH, BDR] qᴿ

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DC], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [BN] token positions
        n_ok = n < end
        n64 = n.to(tl.int64)
        c = tl.load(kv_ptr + n64[:, None] * s_kvn + dc[None, :] * s_kvd,
                    mask=n_ok[:, None] & (dc[None, :] < DC), other=0.0)  # [BN, BDC] latents: keys and values
        kr = tl.load(kr_ptr + n64[:, None] * s_krn + dr[None, :] * s_krd,
                     mask=n_ok[:, None] & (dr[None, :] < DR), other=0.0)  # [BN, BDR] shared rotary keys
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)  # [BH, BN] content term q̃·c
        s = tl.dot(qr, tl.trans(kr), s, input_precision=PRECISION)  # + position term qᴿ·kᴿ
        s = s * qk_scale  # base-2 logits
        s = tl.where(n_ok[None, :] & (n[None, :] <= last_key[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BH]
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a finite stand-in for rows that saw nothing yet
        alpha = tl.exp2(m_i - m_ref)  # rescales the old state (0 when it was empty)
        p = tl.exp2(s - m_ref[:, None])  # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)  # [BH, BDC]
        m_i = m_new

    slot = (b64 * NS + split) * ROWS + rows  # [BH] row in the partial buffers [B, NS, ROWS, ...]
    tl.store(acc_ptr + slot[:, None] * DC + dc[None, :], acc, mask=row_ok[:, None] & (dc[None, :] < DC))
    tl.store(m_ptr + slot, m_i, mask=row_ok)
    tl.store(l_ptr + slot, l_i, mask=row_ok)


# %%
#| export mla.triton
@triton.jit
def _mla_decode_combine_kernel(acc_ptr, m_ptr, l_ptr, len_ptr, o_ptr, T, H, ROWS, NS, split_len,
                               s_ob, s_ot, s_oh, s_od,
                               DC: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr):
    """The output of BLOCK_H query rows of sequence b: the merge of the partial states its splits wrote.

    Program (pid, b), grid (cdiv(ROWS, BLOCK_H), B). It reads the slots (b, 0) … (b, used − 1) of the partial
    buffers, used = ceil(lengths[b] / split_len) — the splits that ran for sequence b — each an
    [BLOCK_H, DC] tile of acc and [BLOCK_H] of m and ℓ:

        m' = max(m, m_i);  ℓ = ℓ·2^(m − m') + ℓ_i·2^(m_i − m');  o = o·2^(m − m') + acc_i·2^(m_i − m')

    then writes o / ℓ in o's dtype. A split in which a row saw no key has m_i = −∞ and weighs 0.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < ROWS
    dc = tl.arange(0, BLOCK_DC)
    dc_ok = dc < DC
    length = tl.load(len_ptr + b)
    used = (length + split_len - 1) // split_len  # splits that hold a part of sequence b
    b64 = b.to(tl.int64)
    m_run = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_H], tl.float32)
    o = tl.zeros([BLOCK_H, BLOCK_DC], tl.float32)
    for i in range(0, used):
        slot = (b64 * NS + i) * ROWS + rows
        m_s = tl.load(m_ptr + slot, mask=row_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + slot, mask=row_ok, other=0.0)
        a_s = tl.load(acc_ptr + slot[:, None] * DC + dc[None, :], mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)
        beta = tl.exp2(m_s - m_ref)  # 0 for a split in which this row saw no key
        l_run = l_run * alpha + l_s * beta
        o = o * alpha[:, None] + a_s * beta[:, None]
        m_run = m_new
    o = o / tl.where(l_run > 0, l_run, 1.0)[:, None]
    o_ptr += b64 * s_ob  # sequence b's output
    t = rows // H
    h = rows % H
    tl.store(o_ptr + t[:, None] * s_ot + h[:, None] * s_oh + dc[None, :] * s_od,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dc_ok[None, :])


# %% [markdown]
# ### The op
#
# `mla_decode` checks its arguments (one call), plans the splits, launches the split kernel on a grid of
# (head blocks, splits, sequences) and the combine kernel on (head blocks, sequences). The tile sizes come from the
# book's launch table, `minisparse.runtime.LAUNCH_TABLE` (rows `"mla.decode_split"` and `"mla.decode_combine"`, per
# GPU architecture); the engineering notes at the end of the chapter say how they were chosen and how the launch
# works.

# %%
#| export mla.triton
def mla_decode(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None, *, out=None):
    """Absorbed MLA attention over the latent cache, in Triton: split-K flash-decoding, all heads of a token
    reading each cached latent once.

    q_latent   [B, T, H, Dc]  the queries folded into the latent space (q_nope · W_uk per head)
    q_rope     [B, T, H, Dr]  the rotary queries
    kv_cache   [B, S, Dc]     the cached latents c (keys and values); any strides, e.g. MLACache.latent
    rope_cache [B, S, Dr]     the cached shared rotary keys; e.g. MLACache.rope
    scale      the softmax scale — MLA's (qk_nope + qk_rope) ** -0.5 (× YaRN's mscale²), not Dc's
    lengths    None (every sequence uses all S tokens) or an integer tensor [B] on q's device, T <= lengths[b] <= S
    out        None, or a tensor [B, T, H, Dc] in q's dtype and device to write into
    -> o_latent [B, T, H, Dc] in q's dtype: softmax(scale (q̃·c + qᴿ·kᴿ)) c, the T queries of sequence b at positions
    lengths[b] - T .. lengths[b] - 1 (causal among themselves); fp32 accumulation.

    Inputs share one dtype: fp32, fp16 or bf16 on a GPU, fp32 or fp16 in the interpreter. Inference only: no
    backward. The range of `lengths` is checked on CPU tensors, and on CUDA tensors after
    `runtime.set_value_checks(True)` (it reads lengths back to the host). Where no launch configuration fits the
    GPU's shared memory (a T4 at Dc = 512), it warns and computes with mla_decode_ref instead.
    """
    B, T, H, DC, DR, S, max_len = _check_decode(q_latent, q_rope, kv_cache, rope_cache, scale, lengths, out)
    if out is None:
        out = torch.empty(B, T, H, DC, dtype=q_latent.dtype, device=q_latent.device)
    if B == 0 or T * H == 0:
        return out
    try:
        return _launch(q_latent, q_rope, kv_cache, rope_cache, float(scale), lengths, out, max_len)
    except RuntimeError as err:
        if not isinstance(err.__cause__, OutOfResources):
            raise
        warnings.warn(f"mla_decode: no launch configuration fits this GPU's shared memory at Dc = {DC} ({err}); "
                      "computing with PyTorch's absorbed attention (mla_decode_ref) instead", stacklevel=2)
        ref = mla_decode_ref(q_latent.float(), q_rope.float(), kv_cache.float(), rope_cache.float(), scale, lengths)
        return out.copy_(ref)

# %% [markdown]
# ### Check it against the spec
#
# On a CPU this runs in the interpreter in fp32, at DeepSeek-V3's latent (512 + 64) with 20 heads — two head
# blocks, the second partial — and again at a small odd latent (48 + 16) with 5 heads and two query tokens a
# sequence (the causal case), on ragged lengths that are no multiple of the tile. On a GPU: 128 heads, thousands
# of tokens, in bf16 against an fp32 reference from the same rounded inputs.

# %%
from minisparse.mla import mla_decode

CASES = runtime.reading_size(
    cpu=[dict(B=3, T=1, H=20, DC=512, DR=64, S=150, lengths=[150, 37, 1]),
         dict(B=2, T=2, H=5, DC=48, DR=16, S=90, lengths=[90, 41])],
    gpu=[dict(B=4, T=1, H=128, DC=512, DR=64, S=8192, lengths=[8192, 5000, 1, 777]),
         dict(B=2, T=2, H=5, DC=48, DR=16, S=900, lengths=[900, 41])])
for case in CASES:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    B, T, H, DC, DR, S = (case[k] for k in ("B", "T", "H", "DC", "DR", "S"))
    make = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE).to(DTYPE)  # noqa: E731
    ql, qr, kv, kr = make(B, T, H, DC), make(B, T, H, DR), make(B, S, DC), make(B, S, DR)
    lens = torch.tensor(case["lengths"], device=DEVICE)
    sc = (128 + DR) ** -0.5
    out = mla_decode(ql, qr, kv, kr, sc, lens)
    ref = mla_decode_ref(ql.float(), qr.float(), kv.float(), kr.float(), sc, lens)  # fp32 from the same inputs
    tol = 1e-4 if DTYPE == torch.float32 else 5e-3
    err = assert_close(f"mla_decode {case}", ref, out.float(), tol)
    print(f"B={B} T={T} H={H:3d} latent {DC}+{DR} S={S} lengths={case['lengths']}: relative RMS error {err:.1e} "
          f"({str(DTYPE).replace('torch.', '')})")

# %% [markdown]
# Bad input fails before any kernel runs, and says what it wanted. Shapes, dtypes and devices are always checked;
# `lengths` beyond the cache is a check of *values*, which reads `lengths` back to the host: on CPU tensors it always
# runs, on a GPU after `runtime.set_value_checks(True)` (as here), so that a decoding step never waits for the host.

# %%
bad_calls = {
    "latent dim mismatch": lambda: mla_decode(ql, qr, kv[..., :-1], kr, sc),
    "rope dim mismatch": lambda: mla_decode(ql, qr, kv, kr[..., :8], sc),
    "lengths beyond the cache": lambda: mla_decode(ql, qr, kv, kr, sc, torch.tensor([S + 1] * B, device=DEVICE)),
    "mixed dtypes": lambda: mla_decode(ql, qr.double(), kv, kr, sc),
}
previous = runtime.set_value_checks(True)
for what, call in bad_calls.items():
    try:
        call()
    except (ValueError, TypeError) as err:
        print(f"{what:26s} → {type(err).__name__}: {err}")
    else:
        raise AssertionError(f"{what}: accepted")
runtime.set_value_checks(previous)

# %% [markdown]
# ## 3.8 The layer on the kernel
#
# `MLA(..., backend=...)` decides who runs the absorbed attention: `"naive"` always uses PyTorch, `"triton"` always
# uses `mla_decode` (on a CPU in the interpreter, fp32), and `"auto"` — the default — uses the kernel where it
# runs (CUDA tensors, or fp32/fp16 CPU tensors under the interpreter) when no gradient is needed, PyTorch otherwise.
# The layer passes `MLACache`'s two views straight to the kernel, without `lengths`, so a decoding step has no value
# to check and never waits for the host. Token-by-token decoding on the kernel must give the same outputs as the
# PyTorch path:

# %%
T_WIRE = runtime.reading_size(cpu=10, gpu=300)
torch.manual_seed(8)
wired = MLA(128, 4, q_lora_rank=48, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32).to(
    DEVICE, DTYPE)
x_w = torch.randn(2, T_WIRE, 128, device=DEVICE, dtype=DTYPE)
outs = {}
with torch.no_grad():
    for backend in ("naive", "triton"):
        wired.backend = backend
        cache = wired.new_cache(2, T_WIRE)
        first = wired(x_w[:, :4], cache, absorb=True)  # the prompt: 4 queries, causal among themselves
        outs[backend] = torch.cat([first] + [wired(x_w[:, t:t + 1], cache, absorb=True) for t in range(4, T_WIRE)], 1)
    wired.backend = "auto"
err = assert_close("backend='triton' vs 'naive'", outs["naive"].float(), outs["triton"].float(),
                   1e-4 if DTYPE == torch.float32 else 1e-2)  # 16-bit: both paths round at several places
print(f"✓ {T_WIRE} tokens decoded on mla_decode equal the PyTorch path: relative RMS error {err:.1e}")

# %% [markdown]
# ## 3.9 Measure
#
# On the H200, `bench/mla.py` times `mla_decode` in bf16 at DeepSeek-V3's latent (512 + 64) and 128 heads, for
# batches of 1, 16 and 64 sequences and contexts of 4k, 16k and 64k tokens. It reports the cache read in GB/s
# against the measured HBM copy bandwidth (4.25 TB/s; the issue's target is 60 % of it) and in TFLOP/s, and times
# PyTorch's SDPA decoding over the *expanded* MHA cache of the same model (keys 192, values 128, 128 heads) where
# that cache fits — the memory win in milliseconds and in bytes. It writes `bench/results/mla.json`, which this
# cell plots.

# %%
try:
    mla_results = bench.load_results("mla")
except FileNotFoundError:
    mla_results = None
if mla_results is None:
    print("H200 numbers for this chapter are pending. On a GPU machine, from the repository root, run\n"
          "    PYTHONPATH=. python bench/mla.py --out bench/results\n"
          "and commit bench/results/mla.json; this cell then plots it.")
else:
    rows = mla_results["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.9))
    batches = sorted({r["B"] for r in rows if r["impl"] == "mla_decode"})
    for H, style in ((128, "o-"), (16, "s--")):
        for i, B in enumerate(batches):
            pts = sorted((r["T"], r["gbps"]) for r in rows if r["impl"] == "mla_decode" and r["B"] == B
                         and r.get("H") == H and r.get("gbps"))
            if pts:
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"B={B}, {H} heads")
    ceiling = mla_results["config"].get("hbm_copy_gbps", 4250)
    ax1.axhline(ceiling, color="red", lw=0.8, label="HBM copy ceiling")
    ax1.axhline(0.6 * ceiling, color="red", lw=0.8, ls=":", label="60 % target")
    viz.tokens_axis(ax1)
    ax1.set(ylabel="GB/s of latent cache read", title=f"mla_decode, {mla_results['config'].get('dtype', '')}")
    ax1.legend(fontsize=7, ncol=2)
    pairs = [(r, next((s for s in rows if s["impl"] == "SDPA, expanded MHA cache" and s["B"] == r["B"]
                       and s["T"] == r["T"] and s.get("ms")), None))
             for r in rows if r["impl"] == "mla_decode" and r.get("H") == 128]
    pairs = [(r, s) for r, s in pairs if s is not None]
    labels = [f"B={r['B']}\nT={r['T'] // 1024}k" if r["T"] >= 1024 else f"B={r['B']}\nT={r['T']}" for r, _ in pairs]
    xs = np.arange(len(pairs))
    ax2.bar(xs - 0.2, [r["ms"] for r, _ in pairs], 0.4, label="mla_decode (latent cache)")
    ax2.bar(xs + 0.2, [s["ms"] for _, s in pairs], 0.4, label="SDPA (expanded MHA cache)")
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set(ylabel="ms per decoding step (one layer)", yscale="log", title="the memory win")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{mla_results['device']} · torch {mla_results['torch']} · triton {mla_results['triton']} · "
                 f"{mla_results['date']}", fontsize=9)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# **Reading the plot** (H200, bf16, 2026-11-28). With DeepSeek-V3's 128 heads, `mla_decode` reads the latent
# cache at up to ≈ 1.1 TB/s — 26 % of the 4.25 TB/s copy ceiling, short of the 60 % target — but there it is not
# memory-bound: every cached value is used by all 128 heads, ≈ 242 FLOP a byte, and the kernel runs at
# ≈ 270 TFLOP/s. With 16 heads (one GPU's share under 8-way tensor parallelism) the arithmetic is 8× lighter and
# the kernel reaches 2.24 TB/s, 53 % of the ceiling, at B = 64 and T = 64k. Against decoding over the *expanded*
# cache with SDPA (B = 16, T = 4k) it takes 0.11 ms instead of 1.35 ms and reads 0.08 GB instead of 5.4 GB — the
# point of MLA. At batch 1 the split-K grid is too small to fill the GPU and PyTorch's absorbed `bmm` path is faster
# (0.05–0.15 ms against 0.16–0.25 ms); from batch 16 on the kernel wins (e.g. 1.10 ms against 2.07 ms at B = 16,
# T = 64k).

# %% [markdown]
# On a GPU the cell below also times one size live (a note on a CPU, where the interpreter's timings mean nothing):

# %%
if runtime.has_gpu() and not runtime.interpreting():
    B_L, T_L, H_L = 16, 8192, 128
    g = torch.Generator(device=DEVICE).manual_seed(0)
    buf = torch.randn(B_L, T_L, 576, generator=g, device=DEVICE).to(DTYPE)  # one [c | kᴿ] buffer, as MLACache
    ql = torch.randn(B_L, 1, H_L, 512, generator=g, device=DEVICE).to(DTYPE)
    qr = torch.randn(B_L, 1, H_L, 64, generator=g, device=DEVICE).to(DTYPE)
    mla_decode(ql, qr, buf[..., :512], buf[..., 512:], 192**-0.5)  # compile first
    ms = bench.median_ms(lambda: mla_decode(ql, qr, buf[..., :512], buf[..., 512:], 192**-0.5))
    gb = mla_decode_bytes(T_L, B=B_L) / 1e9
    print(f"mla_decode B={B_L} T={T_L} H={H_L}: {ms:.3f} ms, {gb / ms * 1e3:.0f} GB/s of cache read, "
          f"{mla_decode_flops(T_L, H_L, B=B_L) / ms / 1e9:.0f} TFLOP/s")
else:
    print("No GPU here: nothing to time live (the plot above shows the committed H200 numbers, when there are some).")

# %% [markdown]
# ## 3.10 Exercises
#
# Each exercise has a stub to fill in, a cell that checks it, and a solution behind a dropdown. The checker prints
# one line when your answer is right and says what differs when it is not (`attempt` prints that message instead of
# raising it, so the chapter still runs top to bottom; call the checker directly to get the exception).

# %% tags=["hide-input"]
#| export mla.exercises
import types

import torch

from minisparse.attention.naive import apply_rope
from minisparse.mla.cost import kv_cache_bytes
from minisparse.mla.naive import absorb_query, combine_splits, split_kv_b
from minisparse.testing import check


def _absorbed_query(q_nope, w_kv_b, qk_nope_head_dim, v_head_dim):
    return absorb_query(q_nope, split_kv_b(w_kv_b, q_nope.shape[2], qk_nope_head_dim, v_head_dim)[0])


def check_absorbed_query(fn):
    """Check fn(q_nope [B, T, H, dn], w_kv_b [H·(dn+dv), r], qk_nope_head_dim, v_head_dim) -> q_latent [B, T, H, r]."""
    g = torch.Generator().manual_seed(31)
    cases = [(torch.randn(B, T, H, dn, generator=g), torch.randn(H * (dn + dv), r, generator=g), dn, dv)
             for B, T, H, dn, dv, r in [(1, 1, 2, 4, 4, 6), (2, 3, 4, 8, 6, 16), (1, 5, 3, 16, 8, 12),
                                        (2, 1, 8, 4, 12, 32)]]
    check("absorbed query", fn, _absorbed_query, cases, tol=1e-5,
          hint="kv_b_proj.weight is [H·(dn+dv), r]: view it as [H, dn+dv, r] and keep each head's first dn rows "
               "(W_uk, [H, dn, r]); then q̃[b,t,h] = q_nope[b,t,h] @ W_uk[h], e.g. einsum('bthd,hdr->bthr')")


def _cache_configs():
    ns = types.SimpleNamespace
    return [
        (ns(num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128), 4096, 1, 2),  # DeepSeek-V3
        (ns(num_hidden_layers=78, num_attention_heads=64, kv_lora_rank=512, qk_rope_head_dim=64,
            qk_nope_head_dim=192, v_head_dim=256), 1000, 3, 1),  # GLM-5's shapes, FP8
        (ns(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128), 32768, 2, 2),  # GQA
        (ns(num_hidden_layers=32, num_attention_heads=71, num_key_value_heads=1, head_dim=64), 2048, 1, 2),  # MQA
        (ns(num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, head_dim=192, v_head_dim=128),
         100, 5, 4),  # MHA with keys longer than values
        (ns(num_hidden_layers=8, num_attention_heads=32, kv_lora_rank=512, qk_rope_head_dim=64,
            layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]),
         131072, 1, 2),  # Kimi-Linear-like: MLA in 2 of 8 layers
    ]


def check_cache_bytes(fn):
    """Check fn(config, seq_len, batch, dtype_bytes) -> int, the whole KV cache of a config (MHA/GQA/MQA/MLA)."""
    check("KV-cache bytes of a config", fn, lambda cfg, T, B, nbytes: kv_cache_bytes(cfg, T, nbytes, batch=B),
          _cache_configs(),
          hint="MLA (the config has kv_lora_rank): kv_lora_rank + qk_rope_head_dim numbers a token and layer; "
               "otherwise num_key_value_heads × (head_dim + v_head_dim, default head_dim); layers in layer_types "
               "marked 'linear_attention' cache nothing; multiply by tokens, batch and bytes per number")


def _split_query(q_states, num_heads, qk_nope_head_dim, qk_rope_head_dim, positions, theta):
    B, T, _ = q_states.shape
    q_nope, q_rope = q_states.view(B, T, num_heads, -1).split([qk_nope_head_dim, qk_rope_head_dim], dim=-1)
    return q_nope, apply_rope(q_rope, positions, theta, interleaved=True)


def check_split_query(fn):
    """Check fn(q_states [B, T, H·(dn+dr)], H, dn, dr, positions [T], theta) -> (q_nope [B,T,H,dn], q_rope
    [B,T,H,dr] rotated with interleaved pairs)."""
    g = torch.Generator().manual_seed(32)
    cases = [(torch.randn(B, T, H * (dn + dr), generator=g), H, dn, dr, torch.arange(T) + p0, theta)
             for B, T, H, dn, dr, p0, theta in [(1, 4, 2, 4, 4, 0, 10000.0), (2, 5, 3, 8, 4, 7, 10000.0),
                                                (1, 3, 4, 6, 8, 100, 50.0), (2, 6, 2, 16, 8, 0, 1e6)]]
    check("split the query into its no-RoPE and RoPE parts", fn, _split_query, cases, tol=1e-5,
          hint="q_b_proj's output is per head [nope | rope]: view it as [B, T, H, dn + dr] *before* splitting (a split "
               "of the flat vector takes other heads' numbers), then rotate only the rope part: "
               "apply_rope(q_rope, positions, theta, interleaved=True)")


def _combine_cases():
    g = torch.Generator().manual_seed(33)
    cases = []
    for N, D, sizes, shift in [(3, 4, [5, 7], 0.0), (4, 6, [3, 3, 3, 3], 200.0), (2, 5, [8, 0, 4], -50.0),
                               (5, 3, [1, 6, 0, 2, 9], 30.0)]:
        states = []
        for n in sizes:
            s = torch.randn(N, n, generator=g) * 4 + shift + 10 * torch.randn(1, 1, generator=g)  # splits differ
            v = torch.randn(n, D, generator=g)
            if n == 0:  # a split past this sequence's end
                states.append((torch.full((N,), float("-inf")), torch.zeros(N), torch.zeros(N, D)))
                continue
            m = s.max(dim=-1).values
            p = torch.exp(s - m[:, None])
            states.append((m, p.sum(-1), p @ v))
        cases.append(tuple(torch.stack(x) for x in zip(*states)))  # m [NS, N], l [NS, N], acc [NS, N, D]
    return cases


def check_combine_splits(fn):
    """Check fn(m [NS, N], l [NS, N], acc [NS, N, D]) -> o [N, D], the attention output from per-split states."""
    check("combine the splits", fn, combine_splits, _combine_cases(), tol=1e-5,
          hint="rescale every split to the largest max: w_i = exp(m_i - max_j m_j) (0 for an empty split, m_i = "
               "-inf); o = sum_i w_i acc_i / sum_i w_i l_i. Never exponentiate a max on its own: scores near 200 "
               "overflow fp32")


# %% [markdown]
# ### Exercise 1: the absorbed query
#
# Fold $W^{UK}$ into the query: given the no-RoPE queries `q_nope [B, T, H, dn]` and `kv_b_proj.weight`
# `[H·(dn + dv), r]` (per head: the `dn` rows of $W^{UK}_i$, then the `dv` rows of $W^{UV}_i$), return
# $\tilde q_{t,i} = W^{UK\top}_i q^C_{t,i}$, `[B, T, H, r]`, so that $\tilde q \cdot c_s$ equals the content score.

# %%
from minisparse.mla.exercises import check_absorbed_query, check_cache_bytes, check_combine_splits, check_split_query
from minisparse.testing import attempt


def my_absorbed_query(q_nope, w_kv_b, qk_nope_head_dim, v_head_dim):
    # your code here: return q_latent [B, T, H, r]
    raise NotImplementedError


# %%
attempt(check_absorbed_query, my_absorbed_query)  # prints what is wrong until the stub above is filled in

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_absorbed_query(q_nope, w_kv_b, qk_nope_head_dim, v_head_dim):
#     H = q_nope.shape[2]
#     w = w_kv_b.view(H, qk_nope_head_dim + v_head_dim, -1)  # [H, dn + dv, r] per head: W_uk rows, then W_uv
#     w_uk = w[:, :qk_nope_head_dim]                           # [H, dn, r]
#     return torch.einsum("bthd,hdr->bthr", q_nope, w_uk)      # q̃ = W_ukᵀ q_nope, per head
# ```
# $q^\top (W c) = (W^\top q)^\top c$ for every head separately: the fold costs $2\, d_h d_c$ FLOPs per head and new
# token, once, instead of $2\, d_h d_c$ per head for *every cached token* when the keys are expanded.
# :::

# %% tags=["hide-input"]
def absorbed_query_solution(q_nope, w_kv_b, qk_nope_head_dim, v_head_dim):
    H = q_nope.shape[2]
    w = w_kv_b.view(H, qk_nope_head_dim + v_head_dim, -1)  # [H, dn + dv, r] per head: W_uk rows, then W_uv
    w_uk = w[:, :qk_nope_head_dim]  # [H, dn, r]
    return torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # q̃ = W_ukᵀ q_nope, per head


check_absorbed_query(absorbed_query_solution)


# %% [markdown]
# ### Exercise 2: the cache of a configuration
#
# Write the KV-cache size of any of the four families from a transformers-style config object (attributes as in
# section 3.1; `v_head_dim` may be missing, `layer_types` may mark linear-attention layers that cache nothing):
# bytes for `batch` sequences of `seq_len` tokens at `dtype_bytes` bytes a number. The checker tries DeepSeek-V3,
# GLM-5's shapes in FP8, a GQA, an MQA, an MHA with keys longer than values and a Kimi-Linear-like hybrid.

# %%
def my_cache_bytes(config, seq_len, batch, dtype_bytes):
    # your code here: return an int
    raise NotImplementedError


# %%
attempt(check_cache_bytes, my_cache_bytes)

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_cache_bytes(config, seq_len, batch, dtype_bytes):
#     if getattr(config, "kv_lora_rank", None):               # MLA: the latent and the shared rotary key
#         per_layer = config.kv_lora_rank + config.qk_rope_head_dim
#     else:                                                   # MHA / GQA / MQA: K and V of each K/V head
#         d_v = getattr(config, "v_head_dim", None) or config.head_dim
#         per_layer = config.num_key_value_heads * (config.head_dim + d_v)
#     types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
#     layers = sum(t != "linear_attention" for t in types)
#     return batch * seq_len * layers * per_layer * dtype_bytes
# ```
# MLA's per-layer cost does not depend on the number of heads at all — GLM-5's 64 heads and DeepSeek-V3's 128 cache
# the same 576 numbers a token and layer — while every other family's grows with its K/V heads.
# :::

# %% tags=["hide-input"]
def cache_bytes_solution(config, seq_len, batch, dtype_bytes):
    if getattr(config, "kv_lora_rank", None):  # MLA: the latent and the shared rotary key
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:  # MHA / GQA / MQA: K and V of each K/V head
        d_v = getattr(config, "v_head_dim", None) or config.head_dim
        per_layer = config.num_key_value_heads * (config.head_dim + d_v)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    layers = sum(t != "linear_attention" for t in types)
    return batch * seq_len * layers * per_layer * dtype_bytes


check_cache_bytes(cache_bytes_solution)


# %% [markdown]
# ### Exercise 3: split the RoPE and no-RoPE parts of the query
#
# `q_b_proj` (or `q_proj`) returns `q_states [B, T, H·(dn + dr)]`. Return `q_nope [B, T, H, dn]` as it is and
# `q_rope [B, T, H, dr]` rotated by RoPE at `positions` with base `theta`, in DeepSeek's interleaved convention
# (chapter 1's `apply_rope` is allowed).

# %%
def my_split_query(q_states, num_heads, qk_nope_head_dim, qk_rope_head_dim, positions, theta):
    # your code here: return q_nope, q_rope
    raise NotImplementedError


# %%
attempt(check_split_query, my_split_query)

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_split_query(q_states, num_heads, qk_nope_head_dim, qk_rope_head_dim, positions, theta):
#     B, T, _ = q_states.shape
#     q = q_states.view(B, T, num_heads, qk_nope_head_dim + qk_rope_head_dim)  # heads first ...
#     q_nope, q_rope = q.split([qk_nope_head_dim, qk_rope_head_dim], dim=-1)   # ... then each head's two parts
#     return q_nope, apply_rope(q_rope, positions, theta, interleaved=True)
# ```
# Splitting the flat `[H·(dn + dr)]` vector at `H·dn` looks plausible and gives tensors of the right shapes — and
# mixes the heads' parts. Shapes alone would not catch it; the numbers do.
# :::

# %% tags=["hide-input"]
def split_query_solution(q_states, num_heads, qk_nope_head_dim, qk_rope_head_dim, positions, theta):
    B, T, _ = q_states.shape
    q = q_states.view(B, T, num_heads, qk_nope_head_dim + qk_rope_head_dim)  # heads first ...
    q_nope, q_rope = q.split([qk_nope_head_dim, qk_rope_head_dim], dim=-1)  # ... then each head's two parts
    return q_nope, apply_rope(q_rope, positions, theta, interleaved=True)


check_split_query(split_query_solution)


# %% [markdown]
# ### Exercise 4: combine the splits
#
# The combine kernel of section 3.7, in PyTorch: given the states of `NS` splits for `N` query rows — `m [NS, N]`
# (the max score a split saw, $-\infty$ if it saw none), `l [NS, N]` ($\sum e^{s - m}$) and `acc [NS, N, D]`
# ($\sum e^{s - m} v$) — return the attention output `[N, D]`. The checker has splits whose scores sit near 200 and
# near −50, and empty splits.

# %%
def my_combine_splits(m, l, acc):
    # your code here: return o [N, D]
    raise NotImplementedError


# %%
attempt(check_combine_splits, my_combine_splits)

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_combine_splits(m, l, acc):
#     m_all = m.max(dim=0).values                                # [N] the overall max of each row
#     w = torch.exp(m - m_all)                                   # [NS, N] ≤ 1; exp(-inf) = 0 for empty splits
#     return (w[..., None] * acc).sum(0) / (w * l).sum(0)[..., None]
# ```
# Each split's numbers were computed against its own max; multiplying by $e^{m_i - m}$ moves them to the common
# one, and the division by the merged $\ell$ is done once, at the end. (A row whose splits were *all* empty would
# give $-\infty - (-\infty)$ here; the kernel never has one, because every query sees at least its own token.)
# :::

# %% tags=["hide-input"]
def combine_splits_solution(m, l, acc):
    m_all = m.max(dim=0).values  # [N] the overall max of each row
    w = torch.exp(m - m_all)  # [NS, N] ≤ 1; exp(-inf) = 0 for empty splits
    return (w[..., None] * acc).sum(0) / (w * l).sum(0)[..., None]


check_combine_splits(combine_splits_solution)

# %% [markdown]
# ## Summary
#
# - At decoding time every token reads the whole KV cache, so its size per token — $2 L H_{kv} D$ for
#   MHA/GQA/MQA — bounds context length, batch size and speed. `kv_cache_bytes` computes it for our configs and
#   transformers'.
# - **MLA** caches one normalised latent $c^{KV}_t$ ($d_c$ = 512) and one rotary key $k^R_t$ ($d_R$ = 64) a token
#   and layer; each head's keys and values are linear maps of the latent (`kv_b_proj`). DeepSeek-V3's cache is 71×
#   smaller than MHA's at the same head sizes, the size of GQA with 2.25 groups.
# - **Decoupled RoPE**: a rotation between query and key would sit between $W^{UK}$ and the latent and change with
#   every offset, so position lives in separate dimensions — one rotary key shared by all heads, a rotary query per
#   head; the scale stays $1/\sqrt{d_h + d_R}$ (× YaRN's mscale² for the 128k checkpoints).
# - **Absorption** folds $W^{UK}$ into the query and $W^{UV}$ into the output: decoding becomes MQA with 576-d keys
#   and 512-d values over the latent cache, exactly equal to the expanded computation. `MLA(…)(x, cache,
#   absorb=True)` decodes token by token to the prefill's outputs, and `MLA.from_hf` matches transformers'
#   `DeepseekV3Attention` (query latent or not, both RoPE layouts, YaRN).
# - **Cost**: all heads share the cache, so absorbed decoding does ≈ $1.9\,n_h$ FLOPs per byte: compute-bound at 128
#   heads on an H200 (242 vs a ridge of 163), memory-bound when the heads are split over GPUs.
# - **Fast**: `mla_decode` is a split-K flash-decoding kernel: programs of (head block, split, sequence) read each
#   latent tile once for all their heads, use it as keys and values, write partial softmax states, and a combine
#   kernel merges them; ragged batches skip what they do not have.
#
# Chapter 8 sparsifies exactly this layer: DeepSeek-V3.2's indexer picks 2048 of the cached latents per query, and
# the attention of this chapter runs on those only.
#
# ## References
#
# - **[S]** The minisparse seed survey, Feb 2026: *Open sparse-architecture models, a panorama (as of February
#   2026)*, in Chinese, in the project's shared notes (MLA in Kimi K2.5 and GLM-5; DSA on MLA).
# - DeepSeek-AI, *DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model* (MLA, §2.1;
#   Table 1's cache comparison), 2024a. [arXiv:2405.04434](https://arxiv.org/abs/2405.04434)
# - DeepSeek-AI, *DeepSeek-V3 Technical Report*, 2024b. [arXiv:2412.19437](https://arxiv.org/abs/2412.19437)
# - T. Dao, D. Haziza, F. Massa, G. Sizov, *Flash-Decoding for long-context inference*, 2023.
#   [crfm.stanford.edu/2023/10/12/flashdecoding.html](https://crfm.stanford.edu/2023/10/12/flashdecoding.html)
# - DeepSeek-AI, *FlashMLA*, efficient MLA decoding kernels for Hopper GPUs, 2025.
#   [github.com/deepseek-ai/FlashMLA](https://github.com/deepseek-ai/FlashMLA)
# - B. Peng, J. Quesnelle, H. Fan, E. Shippole, *YaRN: Efficient Context Window Extension of Large Language
#   Models*, 2023. [arXiv:2309.00071](https://arxiv.org/abs/2309.00071)
# - J. Su et al., *RoFormer: Enhanced Transformer with Rotary Position Embedding*, 2021.
#   [arXiv:2104.09864](https://arxiv.org/abs/2104.09864)
# - N. Shazeer, *Fast Transformer Decoding: One Write-Head is All You Need* (MQA), 2019.
#   [arXiv:1911.02150](https://arxiv.org/abs/1911.02150)
# - J. Ainslie et al., *GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints*, 2023.
#   [arXiv:2305.13245](https://arxiv.org/abs/2305.13245)
# - Kimi Team, *Kimi K2: Open Agentic Intelligence*, 2025. [arXiv:2507.20534](https://arxiv.org/abs/2507.20534);
#   *Kimi Linear: An Expressive, Efficient Attention Architecture*, 2025.
#   [arXiv:2510.26692](https://arxiv.org/abs/2510.26692)
# - `transformers` 5.x: `DeepseekV3Attention`, `DeepseekV3RotaryEmbedding` and the YaRN parameters in
#   `modeling_rope_utils` (the oracles of the tests); `GlmMoeDsaConfig`, `KimiLinearConfig` (model shapes).

# %% [markdown]
# ## Engineering notes
#
# What a practitioner needs and a first reading skips: the argument checks of the layer and of the decode ops, and
# how `mla_decode` chooses its tiles and splits.
#
# ### Argument checks
#
# The layer checks its sizes when it is built, so that `MLA(32, 0)` or a negative `kv_lora_rank` fail there, naming
# the argument, and not at the first forward inside a matrix product. `forward` checks its input with the book's
# shared `_checks.layer_input` (rank, hidden size, and the layer's dtype and device: fp16 input to an fp32 layer
# says so). The decode ops (`mla_decode_ref`, `mla_decode_splitk`, `mla_decode`) share `check_mla_decode_args`.
# Checks of shapes, dtypes and devices always run; the check that `T <= lengths[b] <= S` reads `lengths` back to
# the host, so the kernel makes it on CPU tensors, and on CUDA tensors only after `runtime.set_value_checks(True)`
# (the book's rule for value checks: a host sync stalls the GPU's queue).

# %%
#| export mla.layer
def _check_mla_args(hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
                    v_head_dim, norm_eps, rope_theta):
    """MLA's constructor arguments: sizes are ints > 0 (q_lora_rank may be None: one q_proj), qk_rope_head_dim is
    even (RoPE rotates pairs), norm_eps and rope_theta positive numbers."""
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim),
                        ("v_head_dim", v_head_dim)):
        _checks.positive_int("MLA", name, value)
    if q_lora_rank is not None:
        _checks.positive_int("MLA", "q_lora_rank (None for a single q_proj)", q_lora_rank)
    if qk_rope_head_dim % 2:
        raise ValueError(f"MLA: qk_rope_head_dim must be even (RoPE rotates pairs), got {qk_rope_head_dim}")
    _checks.positive_float("MLA", "norm_eps", norm_eps)
    _checks.positive_float("MLA", "rope_theta", rope_theta)


# %%
#| export mla.naive
def check_mla_decode_args(op, q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None, *, check_values=True,
                          dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    """The arguments of the decode ops (see mla_decode): ranks, shapes, one dtype among `dtypes`, one device, a
    positive scale, lengths None or an integer tensor [B]; with check_values also T <= lengths[b] <= S, which reads
    lengths back to the host. Raises TypeError/ValueError naming the argument; returns (B, T, H, Dc, Dr, S)."""
    _checks.tensor(op, "q_latent", q_latent, "[B, T, H, Dc]")
    _checks.tensor(op, "q_rope", q_rope, "[B, T, H, Dr]")
    _checks.tensor(op, "kv_cache", kv_cache, "[B, S, Dc]")
    _checks.tensor(op, "rope_cache", rope_cache, "[B, S, Dr]")
    _checks.same_dtype(op, dtypes, q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache, rope_cache=rope_cache)
    _checks.same_device(op, q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache, rope_cache=rope_cache,
                        lengths=lengths if isinstance(lengths, torch.Tensor) else None)
    B, T, H, Dc = q_latent.shape
    S, Dr = kv_cache.shape[1], q_rope.shape[-1]
    _checks.shape(op, "q_rope", q_rope, (B, T, H, Dr), "[B, T, H, Dr]", "q_latent's B, T, H")
    _checks.shape(op, "kv_cache", kv_cache, (B, S, Dc), "[B, S, Dc]", "q_latent's B and Dc")
    _checks.shape(op, "rope_cache", rope_cache, (B, S, Dr), "[B, S, Dr]", "kv_cache's B and S, q_rope's Dr")
    if T > S:
        raise ValueError(f"{op}: the T={T} queries are the last T of the cached tokens, so T <= S, got S={S}")
    if scale is None:
        raise ValueError(f"{op}: scale must be given: MLA's is (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, "
                         "not the latent's Dc ** -0.5")
    _checks.positive_float(op, "scale", scale)
    if lengths is not None:
        if (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,) or lengths.is_floating_point()
                or lengths.is_complex() or lengths.dtype == torch.bool):
            got = (f"{tuple(lengths.shape)} {lengths.dtype}" if isinstance(lengths, torch.Tensor)
                   else type(lengths).__name__)
            raise ValueError(f"{op}: lengths must be an integer tensor [B={B}] (cached tokens per sequence), got {got}")
        if check_values and B:
            lo, hi = (int(v) for v in torch.aminmax(lengths))
            if hi > S:
                raise ValueError(f"{op}: lengths beyond the cache: max(lengths) = {hi} > S = {S} tokens in kv_cache")
            if lo < T:
                raise ValueError(f"{op}: every sequence needs lengths[b] >= T = {T} (its queries are cached tokens), "
                                 f"got min(lengths) = {lo}")
    return B, T, H, Dc, Dr, S


# %% [markdown]
# ### Tiles, splits and the launch
#
# `mla_decode` launches both kernels through `minisparse.runtime.launch`, which reads the rows
# `"mla.decode_split"` and `"mla.decode_combine"` of `runtime.LAUNCH_TABLE` for the GPU's architecture and keeps the
# first configuration that compiles within its shared memory. The split kernel's rows are sized for a latent of
# 512; a larger one gets proportionally shorter token tiles (`fit`). On Hopper (227 KiB of shared memory a block) a
# program takes 64 heads: `q̃` is 64 KiB in bf16, a 32-token tile of `[c | kᴿ]` 36 KiB per pipeline stage, and the
# fp32 accumulator `[64, 512]` is spread over 8 warps (128 registers a thread). Ampere gets 32 heads; a Colab T4
# (64 KiB, fp16) 16 heads and 16-token tiles, one stage — and at Dc = 512 even those do not fit, so there
# `mla_decode` warns and computes with `mla_decode_ref`. fp32 inputs take twice the memory and get the small tiles.
# The interpreter gets one configuration of few, large programs (fast to interpret).
#
# The number of splits is planned on the host before the launch, from the batch, the number of head blocks
# `cdiv(T·H, BLOCK_H)` and the SM count (section 3.7), so it needs `BLOCK_H`: the plan takes it from the
# configuration the launch tries first — the one a test forces with `runtime.launch_config`, else the first of the
# row. With `runtime.set_autotune(True)` (the benchmarks) the row's candidates are timed for each shape; a candidate
# keeps its own `BLOCK_H` only where it gives as many head blocks as the planned one (with 16 heads, 32 and 64 both
# give one), else it takes the planned `BLOCK_H` — so every candidate runs with the plan made for it. The sweeps
# behind the table's rows are in `bench/notes/mla.md`.

# %%
#| export mla.triton
_MIN_SPLIT = 256  # tokens: the shortest split worth a program


def _check_decode(q_latent, q_rope, kv_cache, rope_cache, scale, lengths, out):
    """Everything mla_decode checks before launching; returns (B, T, H, Dc, Dr, S, max_len), max_len the longest
    sequence when lengths were read back (value checks on), else S."""
    checking = _checks.checking_values(False, q_latent)
    B, T, H, DC, DR, S = check_mla_decode_args("mla_decode", q_latent, q_rope, kv_cache, rope_cache, scale, lengths,
                                               check_values=checking, dtypes=_checks.FLOATS)
    _checks.forward_only("mla_decode", q_latent, q_rope, kv_cache, rope_cache,
                         instead="mla_attention_absorbed (the MLA layer with absorb=False or backend='naive')")
    _checks.triton_inputs("mla_decode", q_latent, q_rope, kv_cache, rope_cache, lengths)
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, T, H, DC)
                            or out.dtype != q_latent.dtype or out.device != q_latent.device):
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"mla_decode: out must be [B, T, H, Dc] = {(B, T, H, DC)} in q_latent's dtype and device, "
                         f"got {got}")
    max_len = int(lengths.max()) if lengths is not None and checking and B else S
    return B, T, H, DC, DR, S, max_len


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 exact; 16-bit inputs ignore it


def _plan_splits(B, rows, row_blocks, max_len, device, latent_bytes, dc, split_len=None):
    """(split_len, NS): enough splits to fill the GPU about once (a program per SM), none shorter than _MIN_SPLIT
    tokens or so short that its partial state (rows × dc fp32, written and read back) outweighs the cache it
    summarises (latent_bytes a token). split_len is a multiple of 64, so every BLOCK_N of the table divides it."""
    if split_len is None:
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
        want = max(1, sms // max(1, B * row_blocks))  # splits per (sequence, head block)
        shortest = max(_MIN_SPLIT, 8 * rows * dc // latent_bytes)  # 2 × rows × dc × 4 bytes <= split's cache bytes
        num_splits = max(1, min(want, max_len // shortest))
        split_len = triton.cdiv(triton.cdiv(max_len, num_splits), 64) * 64
    return split_len, max(1, triton.cdiv(max_len, split_len))


def _split_tiles(block_dc, rows=None, block_h=None):
    """`fit` for the split kernel's table entries: BLOCK_N shortened for latents over 512 (the rows are sized for
    512), never under 16. With `rows` and `block_h` (autotuning), an entry whose BLOCK_H cuts the rows into another
    number of blocks than block_h does takes block_h instead: the splits were planned for cdiv(rows, block_h) blocks."""
    shrink = max(1, block_dc // 512)

    def fit(config):
        fitted = dict(config, BLOCK_N=max(16, config["BLOCK_N"] // shrink))
        if block_h is not None and triton.cdiv(rows, fitted["BLOCK_H"]) != triton.cdiv(rows, block_h):
            fitted["BLOCK_H"] = block_h
        return fitted
    return fit


def _first_split_config(device, dtype, fit):
    """The split kernel's configuration the launch tries first: the one forced by runtime.launch_config, else the
    first of its LAUNCH_TABLE row; after `fit`."""
    return fit(runtime.launch_configs("mla.decode_split", device, dtype)[0])


def _launch(q_latent, q_rope, kv_cache, rope_cache, scale, lengths, out, max_len, split_len=None):
    """Plan the splits, run the split kernel, then the combine kernel into out [B, T, H, Dc]; return out.
    split_len (tests) replaces the planned split length."""
    B, T, H, DC = q_latent.shape
    DR = q_rope.shape[-1]
    ROWS = T * H
    BLOCK_DC, BLOCK_DR = max(16, triton.next_power_of_2(DC)), max(16, triton.next_power_of_2(DR))
    dev, dtype = q_latent.device, q_latent.dtype
    block_h = _first_split_config(dev, dtype, _split_tiles(BLOCK_DC))["BLOCK_H"]
    latent_bytes = (DC + DR) * kv_cache.element_size()
    split_len, NS = _plan_splits(B, ROWS, triton.cdiv(ROWS, block_h), max_len, dev, latent_bytes, DC, split_len)
    if lengths is None:
        lengths = torch.full((B,), kv_cache.shape[1], dtype=torch.int32, device=dev)
    lengths = lengths.to(dtype=torch.int32).contiguous()
    acc = _empty((B, NS, ROWS, DC), torch.float32, dev)  # partial states, fp32
    m = _empty((B, NS, ROWS), torch.float32, dev)
    l_ = _empty((B, NS, ROWS), torch.float32, dev)
    runtime.launch(
        "mla.decode_split", _mla_decode_split_kernel, lambda c: (triton.cdiv(ROWS, c["BLOCK_H"]), NS, B),
        (q_latent, q_rope, kv_cache, rope_cache, lengths, acc, m, l_, T, H, ROWS, NS, split_len, scale * _LOG2E,
         *q_latent.stride(), *q_rope.stride(), *kv_cache.stride(), *rope_cache.stride()),
        dict(DC=DC, DR=DR, BLOCK_DC=BLOCK_DC, BLOCK_DR=BLOCK_DR, PRECISION=_precision(dtype)),
        device=dev, dtype=dtype, key=(BLOCK_DC, BLOCK_DR),
        fit=_split_tiles(BLOCK_DC, *((ROWS, block_h) if runtime.autotuning() else ())),
        autotune_key=["ROWS", "NS", "split_len", "DC", "DR"], instead="mla_decode_ref")
    runtime.launch(
        "mla.decode_combine", _mla_decode_combine_kernel, lambda c: (triton.cdiv(ROWS, c["BLOCK_H"]), B),
        (acc, m, l_, lengths, out, T, H, ROWS, NS, split_len, *out.stride()), dict(DC=DC, BLOCK_DC=BLOCK_DC),
        device=dev, dtype=dtype, key=(BLOCK_DC,), instead="mla_decode_ref")
    return out


def _empty(shape, dtype, device):  # the partial buffers (a test fills them with NaN to prove they are written)
    return torch.empty(shape, dtype=dtype, device=device)
