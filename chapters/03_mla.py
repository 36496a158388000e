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
# GPU can serve. DeepSeek's **multi-head latent attention** (MLA) attacks it directly: each token caches one small
# *latent* vector (512 numbers in DeepSeek-V3) plus one 64-dimensional rotary key shared by all heads, and the heads'
# keys and values are linear functions of it. MLA is the attention of DeepSeek-V2/V3/V3.2, of Kimi K2 and K2.5 (and
# of the full-attention layers of Kimi Linear) and of GLM-5 [S], and the substrate that DeepSeek's sparse attention
# (chapter 8) selects from.
#
# **Learning objectives.** After this chapter you can
#
# - compute the KV cache of an MHA, GQA, MQA or MLA model from its config, and say why DeepSeek-V3's is 57× smaller
#   than MHA's;
# - write MLA from its equations, and explain why rotary embeddings force a separate rotary key shared by all heads;
# - fold the up-projections into the query and the output (*absorption*), so that decoding attends on the latent
#   cache itself, and check that this is exact;
# - read and change a split-K flash-decoding Triton kernel in which all heads share each cached latent;
# - place absorbed decoding on the roofline: why 128 heads make it compute-bound and 16 heads memory-bound.
#
# **Prerequisites.** Chapter 1: softmax attention (`attention_ref`), rotary embeddings (`apply_rope`), the KV cache,
# why decoding is memory-bound, and the online softmax of the flash kernel. Math: matrix products and transposes,
# and that a rotation $R_p$ by position $p$ satisfies $R_t^\top R_s = R_{s-t}$.
#
# **Time.** About 90 minutes for the core path (sections 3.1–3.10); its cells run in about two minutes on a laptop
# CPU, the Triton kernels in the interpreter.
#
# **Roadmap.**
#
# - 3.1 *Why*: the KV cache of one token, in four attention families and six released models.
# - 3.2 *Naive*: MLA's equations as code, and why the rotary part has to be separate.
# - 3.3 *Absorbed decoding*: the data flow drawn, the two folds, the latent cache.
# - 3.4 *The layer*: `MLA` with transformers' parameter names, decoding from its own cache.
# - 3.5 *See it*: a content head and a position head; an explorer of cache size and rank.
# - 3.6 *Cost model*: the FLOPs and bytes of a decoding step, on the roofline.
# - 3.7 *Fast*: the split-K decode kernel, tile by tile; 3.8 the layer on it; 3.9 *Measure*: H200 results.
# - 3.10 *Exercises*: where absorption breaks, cache arithmetic, a bug, a Triton score tile.
# - *Engineering notes (optional)*: YaRN, loading transformers' weights, argument checks, tiles and splits.
#
# ```python
# from minisparse.mla import MLA, mla_decode, kv_cache_bytes
# ```
#
# Tensors are `[B, T, H, D]` as everywhere in the book; the latent cache is `[B, S, D]` (one "head"). Model shapes
# come from `transformers`' configuration classes (whose defaults are the released checkpoints' shapes); **[S]**
# marks facts from the survey this book starts from, papers are listed in the References.

# %% tags=["hide-input"]
# Setup (the same in every chapter): on Colab, install minisparse from the book's branch,
# keeping Colab's torch; anywhere, print the versions and the device this chapter runs on.
import importlib.util, subprocess, sys

if importlib.util.find_spec("minisparse") is None:
    if "google.colab" not in sys.modules:
        raise ModuleNotFoundError("minisparse is not installed: from the repository root run "
                                  "`make lab`, or `pip install -e .` in this kernel's environment")
    # --no-deps: Colab already has torch, triton, numpy, matplotlib, ipywidgets and tqdm;
    # never replace its torch.
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

# transformers is a test dependency: without it, the cells that compare against it skip
try:
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
# \underbrace{P_{\text{read}}\cdot \text{bytes/param}}_{\text{weights, once}} \;+\;
# \underbrace{B \cdot T \cdot b}_{\text{the KV cache}}
# $$
#
# from memory, and does little arithmetic with it: decoding is memory-bound (chapter 1, section 1.4). $P_\text{read}$
# is the parameters the batch's tokens use: a dense model's all, an MoE model's active ones for one token and up to
# every expert for a large batch (below). The weights term stops growing there; the cache term grows with the batch
# and the context — so the bytes a token leaves in the cache, $b$, decide how many sequences of what length fit on
# a GPU and how fast each step runs.
#
# For softmax attention (chapter 1) a token caches a key and a value per K/V head and layer,
# $b = 2\,L\,H_{kv}\,D \cdot$ bytes (MHA: one K/V head per query head, GQA a few groups, MQA one). MLA caches per
# layer a **latent** $c^{KV}_t$ of `kv_lora_rank` $= d_c$ numbers and one rotary key $k^R_t$ of `qk_rope_head_dim`
# $= d_R$ numbers shared by all heads: $b = L\,(d_c + d_R) \cdot$ bytes — for DeepSeek-V3, $512 + 64 = 576$ values
# a token a layer, in 61 layers.
#
# `kv_cache_bytes(config, seq_len, dtype)` computes $B \cdot T \cdot b$ for any of the four families (a
# sliding-window layer holds at most its window of the $T$ tokens, a linear-attention layer none). It reads
# transformers' attribute names, so it takes transformers' configuration objects as well as two small dataclasses:
# `GQAConfig(num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, v_head_dim=None)` and
# `MLAConfig(...)`, whose defaults are DeepSeek-V3's shapes (both, and how configs are read: engineering notes).

# %%
#| export mla.cost
from dataclasses import dataclass  # for GQAConfig and MLAConfig (engineering notes)

import torch

from minisparse import _checks


def kv_values_per_token(config):
    """Numbers one token adds to the cache of one attention layer.

    MLA: kv_lora_rank + qk_rope_head_dim (the latent and the shared rotary key); MHA/GQA/MQA:
    H_kv · (D_k + D_v).
    """
    if attention_family(config) == "MLA":
        return config.kv_lora_rank + config.qk_rope_head_dim
    heads, kv = _heads(config)
    d_k = getattr(config, "head_dim", None) or config.hidden_size // heads
    d_v = getattr(config, "v_head_dim", None) or d_k
    return kv * (d_k + d_v)


def kv_cache_bytes(config, seq_len, dtype=torch.bfloat16, *, batch=1):
    """Bytes of the whole KV cache of `batch` sequences of `seq_len` tokens.

    config: GQAConfig / MLAConfig, a transformers config (LlamaConfig, MistralConfig,
    FalconConfig, DeepseekV3Config, KimiLinearConfig, … — layer_types and sliding_window respected:
    `cached_tokens`) or an MLA layer (one layer).
    dtype: torch.dtype or bytes per element. MLA: layers · (kv_lora_rank +
    qk_rope_head_dim) a token; MHA/GQA/MQA: layers · 2 · H_kv · D a token.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"kv_cache_bytes: seq_len must be a non-negative int, got {seq_len!r}")
    _checks.positive_int("kv_cache_bytes", "batch", batch)
    tokens = sum(cached_tokens(config, seq_len))  # token-layers held
    return batch * kv_values_per_token(config) * tokens * _dtype_bytes(dtype)


# %% [markdown]
# Real models first: six checkpoints' cache per token, from transformers' configuration classes (no download). The
# default `KimiLinearConfig` keeps MLA in 6 of its 27 layers (the released checkpoint in 7, chapter 0); the others
# are linear attention with a fixed-size state (chapter 6).

# %%
from minisparse.mla import attention_family, kv_cache_bytes

REAL = {"LlamaConfig": "Llama-2-7B (MHA)", "MistralConfig": "Mistral-7B (GQA 4:1)",  # class: label
        "FalconConfig": "Falcon-7B (MQA)", "DeepseekV3Config": "DeepSeek-V3 (MLA)",
        "GlmMoeDsaConfig": "GLM-5 (MLA + DSA)",
        "KimiLinearConfig": "Kimi Linear (config: 6 MLA layers)"}
real = {}
if transformers is not None:
    for cls_name, label in REAL.items():
        cfg = getattr(transformers, cls_name, None)
        if cfg is None:
            print(f"transformers {transformers.__version__} has no {cls_name}: skipped")
            continue
        cfg = cfg()
        real[label] = b = kv_cache_bytes(cfg, 1)
        print(f"{label:34s} {attention_family(cfg)}  {cfg.num_hidden_layers:3d} layers  "
              f"{b / 1024:7.1f} KiB a token (bf16)")
    ds = transformers.DeepseekV3Config()
    assert (ds.num_hidden_layers, ds.kv_lora_rank, ds.qk_rope_head_dim) == (61, 512, 64)
    assert real["DeepSeek-V3 (MLA)"] == 61 * 576 * 2  # 70,272 bytes a token in bf16

# %% [markdown]
# DeepSeek-V3 is a 671B-parameter model, yet a token costs it less cache than it costs Mistral-7B, and about a
# seventh of Llama-2-7B. A fairer comparison keeps the model fixed: DeepSeek-V3's 61 layers and 128 heads, cached
# four ways. For MHA, GQA and MQA we take keys and values of $d_h = 128$, the convention of the DeepSeek-V2 paper's
# comparison (DeepSeek-AI, 2024a, Table 1): such a model would rotate its keys inside those 128 dimensions, so it
# has no extra rotary part.

# %%
from minisparse.mla import GQAConfig, MLAConfig, kv_cache_bytes

V3 = MLAConfig()  # DeepSeek-V3's shapes (the defaults)
FAMILIES = {
    "MHA: 128 K/V heads": GQAConfig(61, 128, 128, head_dim=128),
    "GQA: 8 K/V heads": GQAConfig(61, 128, 8, head_dim=128),
    "MQA: 1 K/V head": GQAConfig(61, 128, 1, head_dim=128),
    "MLA: 512 + 64": V3,
}
CONTEXT = [2**i for i in range(10, 18)]  # 1k … 128k tokens
H200 = 141e9  # bytes of HBM on one H200


def draw_caches(configs, title):
    """The cache of one sequence (GB, bf16) against the context, a line per config."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, cfg in configs.items():
        ax.loglog(CONTEXT, [kv_cache_bytes(cfg, T) / 1e9 for T in CONTEXT], "o-",
                  label=f"{name} ({kv_cache_bytes(cfg, 1) / 1024:,.0f} KiB a token)")
    ax.axhline(H200 / 1e9, color="red", lw=0.8, label="one H200 (141 GB)")
    viz.tokens_axis(ax)
    ax.set(ylabel="KV cache of one sequence (GB)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


draw_caches(FAMILIES, "DeepSeek-V3's layers and heads, four caches (bf16)")
T128 = 128 * 1024
mha, mla = kv_cache_bytes(FAMILIES["MHA: 128 K/V heads"], 1), kv_cache_bytes(V3, 1)
ratio_192 = kv_cache_bytes(GQAConfig(61, 128, 128, head_dim=192, v_head_dim=128), 1) / mla
print(f"at 128k tokens: MHA {mha * T128 / 1e9:,.0f} GB, MLA {mla * T128 / 1e9:.1f} GB per sequence:"
      f" {mha / mla:.1f}x less ({ratio_192:.1f}x counting 192-d keys)")
assert round(mha / mla) == 57 and round(ratio_192) == 71 and round(mha * T128 / 1e9) == 524
assert round(mla * T128 / 1e9, 1) == 9.2 and mla / (61 * 2 * 128 * 2) == 2.25  # GQA, 2.25 groups

# %% [markdown]
# With MHA's cache, one 128k-token sequence of this model would need 524 GB — nearly four H200s, before a single
# weight is stored. MLA needs 9.2 GB: **57 times less** ($2 \cdot 128 \cdot 128 / 576$), between GQA with 8 groups
# and MQA. This is the MHA baseline the book's cache ratios use (section 3.9's SDPA runs the expanded 192-number
# keys instead). Counting instead the keys an expanded MLA head really has,
# $128 + 64 = 192$ numbers, the MHA cache would be $128\,(192 + 128) / 576 = 71$ times MLA's; we keep the paper's
# convention because the 64 extra key dimensions exist only because of MLA's decoupled rotary part (section 3.2).
# Per layer MLA caches $d_c + d_R = 4.5\,d_h$ numbers a token, as much as GQA with 2.25 groups — while the paper
# reports quality *above* MHA's, which GQA and MQA do not reach.
#
# In bytes per decoding step: DeepSeek-V3 activates 37B parameters a token (FP8, one byte each), but a batch
# reads more weights than one token does: each token picks 8 of a layer's 256 routed experts, so 64 tokens reach
# $1 - (1 - 8/256)^{64} = 87\,\%$ of them (chapter 2's routing). With 64 sequences of 32k tokens, one step reads:

# %%
B_DEC, T_DEC = 64, 32 * 1024
routed = 58 * 256 * 3 * 7168 * 2048  # the routed experts' parameters: 58 MoE layers × 256 × SwiGLU
per_token_routed = routed * 8 / 256
reached = 1 - (1 - 8 / 256) ** B_DEC  # the share of routed experts the batch's tokens pick
weights_bytes = 37e9 - per_token_routed + reached * routed  # FP8: a byte a parameter
for name, cfg in FAMILIES.items():
    cache = kv_cache_bytes(cfg, T_DEC, batch=B_DEC)
    share = cache / (cache + weights_bytes)
    print(f"{name:20s} cache {cache / 1e9:9,.0f} GB   weights {weights_bytes / 1e9:.0f} GB   "
          f"cache share of the bytes read {share:6.1%}")
even = weights_bytes / (B_DEC * kv_cache_bytes(V3, 1))  # MLA's context where cache = weights
print(f"experts reached: {reached:.0%}; MLA's cache passes the weights from "
      f"{even / 1024:.0f}k tokens")
assert round(share, 1) == 0.2 and round(even / 1024) == 127  # MLA's (the last row)

# %% [markdown]
# With MHA's cache the cache is nearly everything a step reads (93.5 %); with MLA's, at this batch and length it is a
# fifth and the experts' weights the rest — until about 127k tokens, where the cache passes them. A model's serving setup
# (expert parallelism spreads the experts over GPUs, each with its own share of the batch's sequences) moves these
# numbers, but not the trend: at long context, decoding speed is cache-reading speed. That is why the decode kernel
# of section 3.7 is judged in GB/s of latent cache read, against the memory bandwidth.
#
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
# \begin{aligned}
# c^{KV}_t &= \operatorname{RMSNorm}\!\big(W^{DKV} h_t\big) \in \mathbb R^{d_c},\\
# k^C_{t,i} &= W^{UK}_i\, c^{KV}_t, \qquad v_{t,i} = W^{UV}_i\, c^{KV}_t ,
# \end{aligned}
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
# \begin{aligned}
# q^R_{t,i} &= \operatorname{RoPE}_t\big(W^{QR}_i\, c^Q_t\big),\\
# k^R_t &= \operatorname{RoPE}_t\big(W^{KR} h_t\big)
# \quad [\text{the last 64 rows of }\texttt{kv\_a\_proj\_with\_mqa}] .
# \end{aligned}
# $$
#
# **Attention** with queries and keys of $d_h + d_R = 192$ and values of $d_h$ = 128, then the output projection
# $W^O$ [`o_proj`]:
#
# $$
# \begin{aligned}
# q_{t,i} &= [q^C_{t,i};\, q^R_{t,i}], \quad k_{s,i} = [k^C_{s,i};\, k^R_s],\\
# o_{t,i} &= \sum_{s \le t} \operatorname{softmax}_s\!\Big(\frac{q_{t,i}^\top k_{s,i}}{\sqrt{d_h + d_R}}\Big)\,
# v_{s,i}, \qquad u_t = W^O [o_{t,1}; \dots; o_{t,n_h}] .
# \end{aligned}
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
import numbers

import torch

from minisparse import _checks
from minisparse.attention.naive import RotaryEmbedding, attention_ref, _cache_read, rope_frequencies


def split_kv_b(w_kv_b, num_heads, qk_nope_head_dim, v_head_dim):
    """Views of kv_b_proj.weight [H·(dn + dv), r] as W_uk [H, dn, r] and W_uv [H, dv, r] (each head:
    k_nope | v)."""
    if w_kv_b.dim() != 2 or w_kv_b.shape[0] != num_heads * (qk_nope_head_dim + v_head_dim):
        raise ValueError(f"split_kv_b: w_kv_b must be [H·(dn+dv), r] = [{num_heads}·"
                         f"({qk_nope_head_dim}+{v_head_dim}), r], got {tuple(w_kv_b.shape)}")
    w = w_kv_b.view(num_heads, qk_nope_head_dim + v_head_dim, w_kv_b.shape[1])  # [H, dn + dv, r]
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def expand_latent(c_kv, k_rope, w_kv_b, num_heads, qk_nope_head_dim, v_head_dim):
    """Per-head keys and values from the cache: k_i = [W_uk,i c ; k_rope], v_i = W_uv,i c.

    c_kv [B, S, r] (normalised latents), k_rope [B, S, dr] (rotated, shared by the heads),
    w_kv_b = kv_b_proj.weight [H·(dn+dv), r]  ->  k [B, S, H, dn + dr], v [B, S, H, dv].
    """
    B, S, _ = c_kv.shape
    w_uk, w_uv = split_kv_b(w_kv_b, num_heads, qk_nope_head_dim, v_head_dim)
    k_nope = torch.einsum("bsr,hdr->bshd", c_kv, w_uk)  # [B, S, H, dn]  k^C = W_uk c
    v = torch.einsum("bsr,hvr->bshv", c_kv, w_uv)  # [B, S, H, dv]  v = W_uv c
    k_rope = k_rope[:, :, None, :].expand(B, S, num_heads, k_rope.shape[-1])  # one for every head
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
# absorption was meant to avoid. Exercise 1 derives those queries; the engineering notes check numerically that
# $R_t^\top R_s W^{UK}$ depends on the offset alone but changes with every offset.
#
# DeepSeek's way out is the **decoupled** rotary key: keep the content part $k^C = W^{UK} c$ free of position —
# absorbable — and carry position in a separate 64-dimensional part, cached as it is and **shared by all heads**
# (like MQA's single key: 64 numbers a token rather than $64 n_h$); each head keeps its own rotary *query*. The
# score splits into a content term and a position term,
#
# $$
# q_{t,i}^\top k_{s,i} \;=\; \underbrace{q^{C\top}_{t,i}\, W^{UK}_i\, c^{KV}_s}_{\text{absorbable}}
# \;+\; \underbrace{q^{R\top}_{t,i}\, k^R_s}_{\text{MQA on a 64-d key}} ,
# $$
#
# and the scale stays $1/\sqrt{d_h + d_R} = 1/\sqrt{192}$ — the size of the expanded head, not of the latent.
#
# ## 3.3 Absorbed decoding
#
# The picture first. Above, MLA as section 3.2 wrote it: every step multiplies every cached latent by each head's
# $W^{UK}_i$ and $W^{UV}_i$ to rebuild that head's keys and values. Below, the same attention *absorbed*: $W^{UK}_i$
# moves onto the new token's query, $W^{UV}_i$ after the attention, and the heads attend on the cache as it is.

# %%
B_, C_, W_, A_, Box = "#dbe9f6", "#fde2c8", "#d9f0d3", "#e5dbf3", viz.Box  # q, cache, W, attn
boxes = {
    "e_c": Box(0, 4.2, "latent cache\n$c_s,\\ k^R_s$", color=C_, note="[S, 576]"),
    "e_uk": Box(2.3, 4.8, "$W^{UK}_i$", color=W_), "e_uv": Box(2.3, 3.6, "$W^{UV}_i$", color=W_),
    "e_k": Box(4.6, 4.8, "keys $k_{s,i}$", note="[S, H, 192]"),
    "e_v": Box(4.6, 3.6, "values $v_{s,i}$", note="[S, H, 128]"),
    "e_q": Box(6.9, 5.5, "query $q_{t,i}$\n[H, 192]", color=B_, h=0.8),
    "e_att": Box(6.9, 4.2, "attention\nper head", color=A_),
    "e_o": Box(9.2, 4.2, "$o_{t,i}$", note="[H, 128]"),
    "a_q": Box(0, 1.9, "$q^C_{t,i}$", color=B_, note="[H, 128]"),
    "a_uk": Box(2.3, 1.9, "$W^{UK\\top}_i$", color=W_),
    "a_ql": Box(4.6, 1.9, "$[\\tilde q_{t,i};\\ q^R_{t,i}]$", w=1.9, color=B_, note="[H, 512+64]"),
    "a_c": Box(4.6, 0.5, "latent cache\n$[c_s;\\ k^R_s]$", w=1.9, color=C_,
               note="[S, 576]: keys; $c_s$: values"),
    "a_att": Box(6.9, 1.2, "MQA: one key\nfor all heads", color=A_),
    "a_ol": Box(9.2, 1.2, "$\\tilde o_{t,i}$", note="[H, 512]"),
    "a_uv": Box(11.5, 1.2, "$W^{UV}_i$", color=W_),
    "a_o": Box(13.8, 1.2, "$o_{t,i}$", note="[H, 128]"),
}
arrows = [("e_c", "e_uk"), ("e_c", "e_uv"), ("e_uk", "e_k", "every token"), ("e_uv", "e_v"),
          ("e_k", "e_att"), ("e_v", "e_att"), ("e_q", "e_att"), ("e_att", "e_o"), ("a_q", "a_uk"),
          ("a_uk", "a_ql", "once"), ("a_ql", "a_att"), ("a_c", "a_att"), ("a_att", "a_ol"),
          ("a_ol", "a_uv"), ("a_uv", "a_o", "once")]
groups = [([n for n in boxes if n[0] == "e"], "expanded: per head, per cached token, every step"),
          ([n for n in boxes if n[0] == "a"], "absorbed: the folds act on the new token only")]
title = "MLA expanded vs absorbed: the same output; absorbed never forms a key or a value"
viz.schematic(boxes, arrows, groups=groups, size=(12, 5.6), title=title)
plt.show()

# %% [markdown]
# In equations: take the content term of the score and move $W^{UK}_i$ to the query side; do the same with
# $W^{UV}_i$ on the output side:
#
# $$
# \begin{aligned}
# q^{C\top}_{t,i} W^{UK}_i c_s &= \big(\underbrace{W^{UK\top}_i q^C_{t,i}}_{\tilde q_{t,i} \in \mathbb R^{d_c}}\big)^\top c_s ,\\
# o_{t,i} = \sum_s p_{ts,i}\, W^{UV}_i c_s &= W^{UV}_i \underbrace{\sum_s p_{ts,i}\, c_s}_{\tilde o_{t,i} \in \mathbb R^{d_c}} .
# \end{aligned}
# $$
#
# So each head's query becomes $[\tilde q_{t,i};\, q^R_{t,i}]$ of 512 + 64 numbers, scored against the *same* cached
# keys $[c_s;\, k^R_s]$ (576) by every head, which average the *same* cached values $c_s$ (512): multi-query
# attention run directly on the cache, then one small per-head product $W^{UV}_i \tilde o_{t,i}$. No key or value is
# ever expanded. As code (`attention_ref` of chapter 1 with one K/V head does the MQA):

# %%
#| export mla.naive
def absorb_query(q_nope, w_uk):
    """q̃ = W_ukᵀ q_nope per head: q_nope [B, T, H, dn], w_uk [H, dn, r] -> [B, T, H, r]."""
    return torch.einsum("bthd,hdr->bthr", q_nope, w_uk)


def absorb_output(o_latent, w_uv):
    """o = W_uv õ per head: o_latent [B, T, H, r], w_uv [H, dv, r] -> [B, T, H, dv]."""
    return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)


def mla_attention_absorbed(q_latent, q_rope, c_kv, k_rope, scale, causal=True):
    """Attention on the latent cache: MQA with keys [c ; k_rope] (r + dr) and values c (r).

    q_latent [B, T, H, r], q_rope [B, T, H, dr], c_kv [B, S, r], k_rope [B, S, dr] -> o_latent
    [B, T, H, r]. The T queries sit at positions S - T .. S - 1 (bottom-right, as after a cache).
    scale: MLA's, (dn + dr) ** -0.5, always given (attention_ref's default would be the latent's).
    """
    if scale is None:
        raise ValueError("mla_attention_absorbed: scale must be given: MLA's is (qk_nope_head_dim "
                         "+ qk_rope_head_dim) ** -0.5, not the latent's (r + dr) ** -0.5")
    q = torch.cat([q_latent, q_rope], dim=-1)  # [B, T, H, r + dr]
    k = torch.cat([c_kv, k_rope], dim=-1)[:, :, None]  # [B, S, 1, r + dr] one key for all heads
    return attention_ref(q, k, c_kv[:, :, None], causal=causal, scale=scale)  # [B, T, H, r]


# %% [markdown]
# Do the two routes agree? Random latents and weights at DeepSeek-V3's head sizes (128 + 64, values 128, latent
# 512) but 4 heads: expand and attend, or absorb and attend on the latents.

# %%
from minisparse.mla import (absorb_output, absorb_query, expand_latent, mla_attention_absorbed,
                            split_kv_b)

g = torch.Generator().manual_seed(1)
B_, T_, H_, R_, DN_, DR_, DV_ = 2, 9, 4, 512, 128, 64, 128
c_kv, k_rope, q_nope, q_rope, w_kv_b = (
    torch.randn(*shape, generator=g, dtype=torch.float64)
    for shape in [(B_, T_, R_), (B_, T_, DR_), (B_, T_, H_, DN_), (B_, T_, H_, DR_),
                  (H_ * (DN_ + DV_), R_)])
w_kv_b /= R_**0.5
scale = (DN_ + DR_) ** -0.5

k, v = expand_latent(c_kv, k_rope, w_kv_b, H_, DN_, DV_)  # [B, T, H, 192], [B, T, H, 128]
expanded = attention_ref(torch.cat([q_nope, q_rope], -1), k, v, scale=scale)  # [B, T, H, 128]
w_uk, w_uv = split_kv_b(w_kv_b, H_, DN_, DV_)
absorbed = absorb_output(mla_attention_absorbed(absorb_query(q_nope, w_uk), q_rope, c_kv, k_rope,
                                                scale), w_uv)
err = assert_close("absorbed vs expanded", expanded, absorbed, 1e-12)
print(f"absorbed == expanded (fp64): relative RMS error {err:.1e}")

# %% [markdown]
# Equal to rounding. Absorption is an *algebraic* identity, not an approximation — the two routes differ only in
# where the multiplications happen: expanding costs $2 d_c n_h (d_h + d_v)$ FLOPs **per cached token per step**
# (section 3.6 counts it), absorbing costs $2 d_c n_h (d_h + d_v)$ per *new* token, once.
#
# **The latent cache.** `MLACache` stores, per token, the normalised latent and the rotated shared key side by side
# in one preallocated buffer `[B, max_len, d_c + d_R]` (like chapter 1's `KVCache`); `append(c_kv, k_rope)` writes
# the new tokens, and `latent` and `rope` are views of its two parts — what the decode kernel reads (code: notes).
#
# ## 3.4 The layer
#
# The layer is the equations of section 3.2 with transformers' parameter names and layouts, so that a
# `DeepseekV3Attention` state dict loads as it is. Two details of DeepSeek-V3's rotary part matter for that.
# DeepSeek trained with *interleaved* pairs $(x_{2j}, x_{2j+1})$ (chapter 1, section 1.2.3; `rope_interleave=True`);
# transformers writes the rotated pairs in half-split order, we keep the interleaved one — a channel permutation of
# both the rotary query and key, which leaves every dot product unchanged. And the released checkpoints stretch a
# 4k-token RoPE to 128k with YaRN (Peng et al., 2023), which slows the low-frequency pairs down and multiplies the
# softmax scale by $\mathrm{mscale}^2 \approx 1.87$: `make_mla_rope` and `mla_softmax_scale` give plain RoPE and
# $1/\sqrt{d_h + d_R}$ unless a YaRN setting is given (derived, and checked against transformers, in the notes).
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
# `absorb=False` it expands keys and values from the (cached) latents, as transformers does, and runs chapter 1's
# attention on them: `flash_attention` (forward and backward, so this is the path that trains) or `attention_ref`;
# with `absorb=True` it runs section 3.3's attention on the latents, in PyTorch or in section 3.7's kernel. The
# `backend` argument picks between them (section 3.8).

# %%
#| export mla.layer
import torch
import torch.nn as nn

from minisparse import _checks
from minisparse.attention.layer import RMSNorm
from minisparse.attention.naive import attention_ref
from minisparse.mla.naive import (MLACache, absorb_output, absorb_query, expand_latent,
                                  make_mla_rope, mla_attention_absorbed, mla_softmax_scale,
                                  split_kv_b)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), transformers' DeepseekV3Attention parameters.

    forward(x [B, T, hidden], cache=None, absorb=False, positions=None) -> [B, T, hidden]. With a
    cache (new_cache) the T new tokens sit at positions len(cache) .. len(cache) + T - 1 and
    attend to everything cached before them. absorb=False expands K/V from the latents;
    absorb=True attends on the latents (never expanding K/V); backend "auto" | "naive" | "triton"
    picks who runs each form: chapter 1's flash_attention (expanded) and mla_decode (absorbed), or
    PyTorch (attention_ref, mla_attention_absorbed); "auto" takes a kernel where it runs and
    can serve the call (section 3.8).
    """

    def __init__(self, hidden_size, num_heads, *, q_lora_rank=None, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, attention_bias=False,
                 norm_eps=1e-6, rope_theta=10000.0, rope_interleave=True, rope_scaling=None,
                 backend="auto"):
        super().__init__()
        _check_mla_args(hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
                        qk_rope_head_dim, v_head_dim, norm_eps, rope_theta)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.backend = _checks.backend("MLA", backend)
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.v_head_dim = v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * qk_head_dim, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim,
                                            bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias)
        self.rope = make_mla_rope(qk_rope_head_dim, rope_theta, rope_interleave, rope_scaling)
        self.scaling = mla_softmax_scale(qk_head_dim, rope_scaling)

    def project(self, x, positions):
        """x [B, T, hidden] -> q_nope [B,T,H,dn], q_rope [B,T,H,dr] (rotated), c_kv [B,T,r]
        (normalised), k_rope [B,T,dr] (rotated): everything the attention needs."""
        B, T, _ = x.shape
        H, dn, dr = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # W_uq RMSNorm(W_dq x)
        q_nope, q_rope = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)  # each head: nope | rope
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dr], dim=-1)  # [B,T,·]
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
        _checks.positions("MLA", positions, B, T, x.device)
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)  # [B, start + T, r], [B, start + T, dr]
        if absorb:
            o = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope)  # [B, T, H, dv]
        else:
            k, v = expand_latent(c_kv, k_rope, self.kv_b_proj.weight, self.num_heads,
                                 self.qk_nope_head_dim, self.v_head_dim)  # [B,S,H,dn+dr], ·,dv]
            o = self._attend_expanded(torch.cat([q_nope, q_rope], dim=-1), k, v)  # [B, T, H, dv]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))  # [B, T, hidden]

    def _attend_expanded(self, q, k, v):
        fits = max(q.shape[-1], v.shape[-1]) <= 256  # the kernel's head dims; past them: naive
        backend = _checks.choose_backend(_checks.backend("MLA", self.backend), q, fits=fits)
        if backend == "triton":  # lazy: the layer imports without kernels
            from minisparse.attention.triton import flash_attention
            return flash_attention(q, k, v, causal=True, scale=self.scaling)
        return attention_ref(q, k, v, causal=True, scale=self.scaling)

    def absorbed_weights(self):
        """(W_uk [H, dn, r], W_uv [H, dv, r]): views of kv_b_proj.weight."""
        return split_kv_b(self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim,
                          self.v_head_dim)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope):
        w_uk, w_uv = self.absorbed_weights()
        q_latent = absorb_query(q_nope, w_uk)  # [B, T, H, r]
        backend = _checks.choose_backend(_checks.backend("MLA", self.backend), q_latent)
        needs_grad = torch.is_grad_enabled() and (q_latent.requires_grad or c_kv.requires_grad)
        if self.backend == "auto" and needs_grad:
            backend = "naive"  # the kernel has no backward pass
        if backend == "triton":
            from minisparse.mla.triton import mla_decode  # lazy: the layer imports without kernels
            o_latent = mla_decode(q_latent, q_rope, c_kv, k_rope, self.scaling)  # [B, T, H, r]
        else:
            o_latent = mla_attention_absorbed(q_latent, q_rope, c_kv, k_rope, self.scaling)
        return absorb_output(o_latent, w_uv)  # [B, T, H, dv]

    def new_cache(self, batch, max_len, *, dtype=None, device=None):
        """An empty MLACache (r + dr a token), in the layer's dtype and device by default."""
        w = self.kv_b_proj.weight
        return MLACache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim,
                        dtype=dtype or w.dtype, device=device or w.device)

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """Build from transformers' DeepseekV3Attention, copying its weights (minisparse.mla.hf)."""
        from minisparse.mla.hf import mla_from_hf  # the loader, in the engineering notes
        return mla_from_hf(module, backend, cls=cls)


# %% [markdown]
# ### Check: decoding from the latent cache
#
# The property the cache exists for: decoding a prompt, a chunk, then one token at a time with `absorb=True` —
# never expanding a key — gives the outputs of one expanded pass (DeepSeek-V3's head sizes, latent 512 + 64, 4 heads).

# %%
from minisparse.mla import MLA

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
# the formula is the tensor
assert cache.buffer.nbytes == kv_cache_bytes(layer, T_DEC, cache.buffer.dtype, batch=2)

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
# - **previous token**: no content query, a constant rotary query $16 \cdot R_{-1} u$ (scaled up so that the softmax
#   is sharp) — by section 3.2's identity the score is $16\, u^\top R_{s-t+1} u$, largest at $s = t - 1$;
# - **both**: half of each; and **random**: what an untrained head does.

# %%
words = "the cat sat on the mat and the dog sat by the cat so the mat was warm".split()
vocab = sorted(set(words))
g = torch.Generator().manual_seed(5)
emb = torch.randn(len(vocab), 16, generator=g) / 4  # [V, 16] word embeddings, norm ≈ 1
x_toy = torch.cat([emb[[vocab.index(w) for w in words]], torch.ones(len(words), 1),
                   torch.zeros(len(words), 3)], dim=1)[None]  # [1, T, 20]: embedding | 1 | padding
toy = MLA(20, 4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
          rope_theta=10.0)
u = torch.tensor([1.5, 0.0, 1.2, 0.0, 1.0, 0.0, 0.8, 0.0])  # the rotary key, unrotated; R_{-1} u:
u_prev = apply_rope(u.view(1, 1, 1, 8), torch.tensor([-1]), theta=10.0, interleaved=True).flatten()
with torch.no_grad():
    for p in toy.parameters():
        p.zero_()
    toy.kv_a_layernorm.weight.fill_(1.0)
    toy.kv_a_proj_with_mqa.weight[:16, :16] = torch.eye(16)  # latent = the word embedding
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
# [H, T, T]
probs = attention_weights(torch.cat([q_nope_t, q_rope_t], -1), k_t, scale=toy.scaling)[0]
fig = viz.panels(dict(zip(["content", "previous token", "both", "random"], probs)),
                 size=3.3, cmap="Blues", vmin=0, vmax=1, colorbar=True)
for ax in fig.axes[:4]:  # the four panels, not their colour bars
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
                  "softmax of the sum": probs[2]}, size=3.3, cmap="viridis", colorbar=True)
plt.show()
# constant per offset
assert torch.allclose(s_position.diagonal(-1)[:-1], s_position.diagonal(-1)[1:], atol=1e-5)

# %% [markdown]
# ### Cache size and rank: explore
#
# The knobs of MLA's cache are the latent rank $d_c$ and the rotary size $d_R$; the number of heads changes what the
# *other* families cache, not MLA's. Move them and compare with MHA, GQA-8 and MQA of the same heads (keys and
# values of 128, 61 layers, as in section 3.1). The title says which GQA an MLA cache equals in bytes.

# %% tags=["nbval-ignore-output"]
def draw_ranks(kv_lora_rank=512, qk_rope_head_dim=64, num_heads=128):
    mla = MLAConfig(61, num_heads, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
    groups = (kv_lora_rank + qk_rope_head_dim) / (2 * 128)
    draw_caches({"MHA": GQAConfig(61, num_heads, num_heads, 128),
                 "GQA-8": GQAConfig(61, num_heads, min(8, num_heads), 128),
                 "MQA": GQAConfig(61, num_heads, 1, 128),
                 f"MLA {kv_lora_rank}+{qk_rope_head_dim}": mla},
                f"MLA caches like GQA with {groups:.2f} groups")


explorer = viz.explorer(draw_ranks, kv_lora_rank=(64, 1024, 64), qk_rope_head_dim=[64, 32, 16, 128],
                        num_heads=(8, 128, 8))

# %% [markdown]
# ## 3.6 Cost model
#
# Per decoding step, per layer and sequence, with $T$ cached tokens and one new query (bf16: 2 bytes a number):
#
# | | FLOPs | bytes of cache read |
# |---|---|---|
# | MHA (the baseline of section 3.1) | $2 n_h T \cdot 2 d_h$ | $2\, n_h T \cdot 2 d_h$ |
# | MLA, expanding the latents each step | $2 T d_c n_h (d_h + d_v) + 2 n_h T (d_k + d_v)$ | $2\, T (d_c + d_R)$ |
# | MLA, absorbed | $2 n_h T (2 d_c + d_R)$ (+ $2 n_h d_c (d_h + d_v)$ for the two folds) | $2\, T (d_c + d_R)$ |
#
# with $d_k = d_h + d_R$ for MLA's expanded keys. Expanding every step reads little but multiplies every cached
# latent by `kv_b_proj` again: at DeepSeek-V3's sizes 33.6 MFLOPs *per cached token per layer*. Absorbing moves
# that product to the one new token. What remains is $2(2 d_c + d_R) = 2176$ FLOPs per head per cached token
# against 1152 bytes — an arithmetic intensity of about $1.9\, n_h$ FLOP/byte, because all heads share one cache,
# where MHA has 1. Each row of the table is a one-line function (`mla_decode_flops`, `mla_decode_bytes`,
# `mla_absorb_flops`, `mla_expand_flops`, `mha_decode_flops`, `mha_decode_bytes`; engineering notes).

# %%
from minisparse.mla import (mha_decode_bytes, mha_decode_flops, mla_absorb_flops, mla_decode_bytes,
                            mla_decode_flops, mla_expand_flops)

PEAK, BW = 693e12, 4.25e12  # H200, measured: bf16 dense matmul FLOP/s, HBM copy bytes/s
RIDGE = PEAK / BW
intensity, tp16 = (mla_decode_flops(1, h) / mla_decode_bytes(1) for h in (128, 16))
need = 0.6 * BW * intensity  # FLOP/s to read the cache at 60 % of the bandwidth, 128 heads
print(f"absorbed MLA, 128 heads: {intensity:.0f} FLOP/byte (H200 ridge {RIDGE:.0f}): compute-bound;"
      f" 16 heads (a tensor-parallel-8 shard): {tp16:.0f}: memory-bound; reading the cache at 60 %"
      f" of the bandwidth takes {need / 1e12:.0f} TFLOP/s = {need / PEAK:.0%} of the bf16 peak")
assert abs(intensity - 2 * 128 * 1088 / 1152) < 1e-9 and intensity > RIDGE
assert [round(x) for x in (intensity, RIDGE, need / 1e12, 100 * need / PEAK)] == [242, 163, 617, 89]
assert mla_expand_flops(1, 128) == 2 * 512 * 128 * 256  # 33.6 MFLOPs per cached token per layer

T_, B_C = np.array(CONTEXT), 64
rows = {  # name: (FLOPs, bytes of one step)
    "MHA (baseline)": (mha_decode_flops(T_, 128, k_dim=128, B=B_C),
                       mha_decode_bytes(T_, 128, k_dim=128, B=B_C)),
    "MLA, expand each step": (mla_expand_flops(T_, 128, B=B_C) + mha_decode_flops(T_, 128, B=B_C),
                              mla_decode_bytes(T_, B=B_C)),
    "MLA, absorbed (128 heads)": (mla_decode_flops(T_, 128, B=B_C) + mla_absorb_flops(128, B=B_C),
                                  mla_decode_bytes(T_, B=B_C)),
    "MLA, absorbed (16 heads)": (mla_decode_flops(T_, 16, B=B_C) + mla_absorb_flops(16, B=B_C),
                                 mla_decode_bytes(T_, B=B_C)),
}
mha_b, mla_b = rows["MHA (baseline)"][1][0], rows["MLA, absorbed (128 heads)"][1][0]
assert round(mha_b / mla_b) == 57  # the baseline ratio of section 3.1, in bytes read per step
fig, ax = plt.subplots(figsize=(7.5, 3.8))
for name, (fl, by) in rows.items():
    ax.loglog(T_, np.maximum(fl / PEAK, by / BW) * 1e3, "o-",  # the roofline time, ms
              label=f"{name}: {fl[0] / by[0]:.0f} FLOP/byte at 1k (the folds included)")
viz.tokens_axis(ax)
ax.legend(fontsize=7)
ax.set(ylabel="ms per layer (roofline bound)",
       title=f"one decoding step, one layer, batch {B_C} (H200 ridge: {RIDGE:.0f} FLOP/byte)")
fig.tight_layout()
plt.show()

# %% [markdown]
# *Assumptions: bf16; one new token per sequence; the roofline time is max(FLOPs / 693 TFLOP/s, bytes / 4.25 TB/s),
# the H200's measured peaks; weights and the $q$/$o$ projections are left out.*
#
# Expanding the latents every step (orange) is the worst of both worlds: a small cache read, but more time in
# FLOPs than MHA spends reading its huge cache. Absorbed with 128 heads (green), MLA reads 57 times fewer bytes than
# MHA and still lands at the compute roof: 242 FLOP/byte against a ridge of 163; sustaining 60 % of the bandwidth
# there means 617 TFLOP/s, 89 % of the matmul peak. (FlashMLA, hand-written CUDA for Hopper, reports up to
# 3000 GB/s memory-bound and 580–660 TFLOP/s compute-bound on an H800 SXM5.) Served tensor-parallel (16 heads a
# GPU), the same step is memory-bound and the cache read is the whole story.
#
# ## 3.7 Fast: a split-K decode kernel over the latent cache
#
# ### The work, and how to cut it
#
# One decoding step of absorbed MLA is, for each sequence $b$: $T_q$ new tokens (usually one) × $n_h$ heads = a few
# hundred query rows, all scoring the **same** `lengths[b]` cached keys $[c_s; k^R_s]$ and averaging the same values
# $c_s$. The kernel has two jobs: read each cached latent from memory **once for all heads**, and keep the GPU busy.
#
# - **All heads together.** A program takes a block of `BLOCK_H` query rows and loops over the cache in blocks of
#   `BLOCK_N` tokens, each used as keys and as values. With `BLOCK_H` = 64 and 128 heads, two programs share each
#   latent block (the second finds it in L2 cache).
# - **Split the keys.** That gives only $B \cdot n_h / \text{BLOCK\_H}$ programs — 2 for a single sequence, on a GPU
#   with 132 SMs. Flash-decoding (Dao et al., 2023) cuts the key range into `NS` splits as well: each program handles
#   one split of one head block of one sequence and writes a **partial softmax state** per row — the running max
#   $m$, the sum $\ell = \sum e^{s - m}$ and the unnormalised output $a = \sum e^{s - m} c_s$. A second, small kernel
#   merges the `NS` states of each row (the online-softmax merge of chapter 1, section 1.5.2) and divides.
# - **Ragged batches.** Sequence $b$ reads only its first `lengths[b]` tokens; splits past its end exit at once.
#
# How many splits, and a drawing of the grid over a ragged batch: engineering notes (*Tiles, splits and the launch*).
#
# ### The spec and the merge, in PyTorch
#
# The specification — `mla_attention_absorbed` on each sequence's first `lengths[b]` tokens — and the merge of
# partial states that the split needs. (The whole split modelled in PyTorch, `mla_decode_splitk`, and the argument
# check `check_mla_decode_args` are in the engineering notes.)

# %%
#| export mla.naive
def mla_decode_ref(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None):
    """The spec of mla_decode (same arguments): per sequence b, mla_attention_absorbed over its
    first lengths[b] cached tokens (all S when lengths is None) -> o_latent [B, T, H, Dc]; the T
    queries of b sit at positions lengths[b] - T .. lengths[b] - 1."""
    B, _, _, _, _, S = check_mla_decode_args("mla_decode_ref", q_latent, q_rope, kv_cache,
                                             rope_cache, scale, lengths)
    ends = [S] * B if lengths is None else [int(n) for n in lengths.tolist()]
    return torch.cat([mla_attention_absorbed(q_latent[b:b + 1], q_rope[b:b + 1],
                                             kv_cache[b:b + 1, :n], rope_cache[b:b + 1, :n], scale)
                      for b, n in enumerate(ends)])


def combine_splits(m, l, acc):
    """Merge partial softmax states along dim 0: m, l [NS, ...], acc [NS, ..., D] -> o [..., D].

    Split i holds m = max of its scores (-inf if it saw none), l = sum exp(s - m), acc = sum
    exp(s - m) v.
    """
    m_all = m.max(dim=0).values  # [...]
    w = torch.where(torch.isneginf(m), torch.zeros_like(m), torch.exp(m - m_all))  # empty: weight 0
    return (w[..., None] * acc).sum(dim=0) / (w * l).sum(dim=0)[..., None]


# %% [markdown]
# ### The kernels, tile by tile
#
# **Split kernel.** Program `(pid_h, split, b)` owns rows `pid_h·BLOCK_H …` of sequence `b` (row $= t\,n_h + h$ for query
# token $t$, head $h$) and cache tokens `[split·split_len, (split+1)·split_len)` below `lengths[b]`.
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
# has, merges their states with the same rescaling, divides by `ℓ` and writes the output (code: engineering notes).
#
# Addresses go through strides, so the cache may be two views of one `[B, S, Dc + Dr]` buffer (as `MLACache`
# stores it), and batch offsets are 64-bit: 64 sequences × 64k tokens × 576 values overflow 32 bits. Names in the
# kernels: `*_ptr` pointers (moved once to the program's sequence), `s_<tensor><dim>` strides, `*_ok` masks.

# %%
#| export mla.triton
import warnings

import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime
from minisparse.mla.naive import check_mla_decode_args, mla_decode_ref

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split_kernel(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, acc_ptr, m_ptr, l_ptr,
                             T, H, ROWS, NS, split_len, qk_scale,
                             s_qlb, s_qlt, s_qlh, s_qld, s_qrb, s_qrt, s_qrh, s_qrd,
                             s_kvb, s_kvn, s_kvd, s_krb, s_krn, s_krd,
                             DC: tl.constexpr, DR: tl.constexpr, BLOCK_DC: tl.constexpr,
                             BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Partial softmax states of BLOCK_H query rows of sequence b over one split of its latent
    cache: steps 1–3 of section 3.7, "The kernels, tile by tile".

    Program (pid_h, split, b), grid (cdiv(ROWS, BLOCK_H), NS, B). A row is one (query token t,
    head h) pair, row = t·H + h, ROWS = T·H; query t of sequence b sits at position lengths[b] −
    T + t. Tokens [split·split_len, (split + 1)·split_len), cut at lengths[b]. Writes acc
    [BLOCK_H, DC], m and ℓ [BLOCK_H] (fp32, base-2 logits: qk_scale = scale·log₂e) to slot
    (b, split) of the partial buffers [B, NS, ROWS, …]. DC, DR: zero-padded to BLOCK_DC, BLOCK_DR.
    """
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start = split * split_len
    if start >= length:  # past this sequence's end: the combine never reads this slot
        return
    b64 = b.to(tl.int64)
    ql_ptr, qr_ptr = ql_ptr + b64 * s_qlb, qr_ptr + b64 * s_qrb  # sequence b's queries ...
    kv_ptr, kr_ptr = kv_ptr + b64 * s_kvb, kr_ptr + b64 * s_krb  # ... and cache
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH] row = t·H + h
    row_ok = rows < ROWS
    t = rows // H
    h = rows % H
    last_key = length - T + t  # [BH] the position of each row's query: it sees keys 0 .. last_key
    last_row = tl.minimum(pid_h * BLOCK_H + BLOCK_H, ROWS) - 1
    end = tl.minimum(tl.minimum(start + split_len, length), length - T + last_row // H + 1)
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
                    mask=n_ok[:, None] & (dc[None, :] < DC), other=0.0)  # [BN, BDC] latents
        kr = tl.load(kr_ptr + n64[:, None] * s_krn + dr[None, :] * s_krd,
                     mask=n_ok[:, None] & (dr[None, :] < DR), other=0.0)  # [BN, BDR] rotary keys
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)  # [BH, BN] content term q̃·c
        s = tl.dot(qr, tl.trans(kr), s, input_precision=PRECISION)  # + position term qᴿ·kᴿ
        s = s * qk_scale  # base-2 logits
        s = tl.where(n_ok[None, :] & (n[None, :] <= last_key[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BH]
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite for rows that saw nothing
        alpha = tl.exp2(m_i - m_ref)  # rescales the old state (0 when it was empty)
        p = tl.exp2(s - m_ref[:, None])  # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new

    slot = (b64 * NS + split) * ROWS + rows  # [BH] row in the partial buffers [B, NS, ROWS, ...]
    dc_ok = dc[None, :] < DC
    tl.store(acc_ptr + slot[:, None] * DC + dc[None, :], acc, mask=row_ok[:, None] & dc_ok)
    tl.store(m_ptr + slot, m_i, mask=row_ok)
    tl.store(l_ptr + slot, l_i, mask=row_ok)


# %% [markdown]
# ### The op, checked against the spec
#
# `mla_decode(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None)` → `o_latent [B, T, H, Dc]` checks its
# arguments, plans the splits, launches the split kernel on a grid of (head blocks, splits, sequences) and the
# combine kernel on (head blocks, sequences), with tile sizes from the book's launch table
# (`runtime.LAUNCH_TABLE`, per GPU architecture; code and choices in the engineering notes).
#
# On a CPU it runs in the interpreter in fp32, at DeepSeek-V3's latent (512 + 64) with 20 heads — two head
# blocks, the second partial — and at a small odd latent (48 + 16) with 5 heads and two query tokens a
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
    ref = mla_decode_ref(ql.float(), qr.float(), kv.float(), kr.float(), sc, lens)  # same inputs
    err = assert_close(f"mla_decode {case}", ref, out.float(),
                       1e-4 if DTYPE == torch.float32 else 5e-3)
    print(f"B={B} T={T} H={H:3d} latent {DC}+{DR} S={S} lengths={case['lengths']}: relative RMS "
          f"error {err:.1e} ({str(DTYPE).replace('torch.', '')})")

# %% [markdown]
# ## 3.8 The layer on the kernel
#
# `MLA(..., backend=...)` decides who runs each form's attention: `"naive"` PyTorch, `"triton"` the kernels (on a
# CPU in the interpreter), and `"auto"`, the default, a kernel where it runs and can serve the call. The absorbed
# form's kernel is `mla_decode`, which has no backward pass: `"auto"` takes it when no gradient is needed. The
# expanded form, the one that trains, runs chapter 1's `flash_attention`, forward and backward (head dims up to 256:
# DeepSeek's 192 and 128 fit). The layer passes `MLACache`'s two views straight to `mla_decode`, without `lengths`,
# so a decoding step never waits for the host. The engineering notes check that decoding on the kernel gives the
# PyTorch path's outputs, and `tests/test_mla.py` that the expanded form's outputs and gradients are the same on
# either path.
#
# ## 3.9 Measure
#
# On the H200, `bench/mla.py` times `mla_decode` in bf16 at DeepSeek-V3's latent (512 + 64), with 128 heads and
# with 16 (one GPU's share under 8-way tensor parallelism), for batches of 1, 16 and 64 sequences and contexts of
# 4k, 16k and 64k tokens. It reports the cache read in GB/s against the measured HBM copy bandwidth (4.25 TB/s;
# 60 % of it is the kernel's aim), and times PyTorch's absorbed attention (`bmm`) and SDPA over the *expanded*
# cache of the same model (keys 192, values 128, 128 heads), where it fits. This cell plots `bench/results/mla.json`.

# %%
res = bench.load_results("mla")


def pick(impl, B, T, H=128):
    return next(r for r in res["rows"] if (r["impl"], r["B"], r["T"], r["H"]) == (impl, B, T, H))


fig, ax = plt.subplots(figsize=(8, 3.9))
ceiling, contexts = res["config"]["hbm_copy_gbps"], res["config"]["contexts"]
for H, style in ((128, "o-"), (16, "s--")):
    for i, B in enumerate(res["config"]["batches"]):
        ax.plot(contexts, [pick("mla_decode", B, T, H)["gbps"] for T in contexts], style,
                color=f"C{i}", label=f"B={B}, {H} heads")
ax.axhline(ceiling, color="red", lw=0.8, label="HBM copy ceiling")
ax.axhline(0.6 * ceiling, color="red", lw=0.8, ls=":", label="60 % of it")
viz.tokens_axis(ax)
ax.set(ylabel="GB/s of latent cache read",
       title=f"mla_decode, bf16 · {res['device']} · triton {res['triton']} · {res['date']}")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()
impls = ["mla_decode", "torch absorbed (bmm)", "SDPA, expanded MHA cache"]
print(f"ms per decoding step, one layer, 128 heads, {res['date']} (SDPA where its cache fits)")
print(f"{'B':>3} {'T':>6}" + "".join(f"{i:>26}" for i in impls))
for B, T in [(1, 4096), (1, 65536), (16, 4096), (16, 65536), (64, 65536)]:
    ms = [pick(i, B, T).get("ms") for i in impls]
    cols = [f"{m:26.3f}" if m else f"{'(does not fit)':>26}" for m in ms]
    print(f"{B:3d} {T:6d}" + "".join(cols))
best128 = max(r["gbps"] for r in res["rows"] if r["impl"] == "mla_decode" and r["H"] == 128)
top128 = max(r["tflops"] for r in res["rows"] if r["impl"] == "mla_decode" and r["H"] == 128)
assert round(best128 / 1e3, 1) == 1.1 and round(top128, -1) == 270
assert round(100 * best128 / ceiling) == 26
tp_best = pick("mla_decode", 64, 65536, 16)["gbps"]  # 16 heads, B = 64, T = 64k
assert round(tp_best / 1e3, 2) == 3.74 and round(100 * tp_best / ceiling) == 88
tall = [r["config"] for r in res["rows"] if r["impl"] == "mla_decode" and r["H"] == 16]  # 16 rows:
assert all((c["BLOCK_H"], c["BLOCK_N"], c["num_warps"]) == (16, 128, 8) for c in tall)  # 16x128 w8
tp16 = [round(pick(i, 16, 65536, 16)["ms"], 2) for i in impls[:2]]  # H16 B16 T64k: kernel, bmm
assert tp16 == [0.34, 0.75] and round(100 * pick("mla_decode", 16, 65536, 16)["hbm_fraction"]) == 83
assert [round(pick(i, 1, 65536)["ms"], 2) for i in impls[::2]] == [0.38, 1.99]
assert [round(pick(i, 16, 65536)["ms"], 2) for i in impls[:2]] == [1.10, 2.06]
assert [round(pick(i, 16, 16384)["ms"], 2) for i in impls[:2]] == [0.30, 0.50]
b1 = [round(pick(i, 1, T)["ms"], 2) for T in contexts for i in impls[:2]]  # B=1: kernel, bmm
assert b1 == [0.45, 0.14, 0.34, 0.11, 0.38, 0.18]  # bmm wins at every context: both are host-bound
read = [mla_decode_bytes(65536, B=1), mha_decode_bytes(65536, 128, B=1)]  # kernel vs SDPA
assert round(read[0] / 1e9, 2) == 0.08 and round(read[1] / 1e9, 1) == 5.4

# %% [markdown]
# **Takeaways** (H200, bf16, 2026-12-04):
#
# - **128 heads: compute-bound by intensity, and short of both roofs.** `mla_decode` reads the latent cache at up to
#   ≈ 1.1 TB/s, 26 % of the 4.25 TB/s copy ceiling, but every cached value serves all 128 heads (≈ 242 FLOP a byte)
#   and the kernel runs at ≈ 270 TFLOP/s, 39 % of the 693 a bf16 matmul reaches: reading at 60 % of the bandwidth
#   would take 89 % of it (section 3.6). With 16 heads (one GPU's share under 8-way tensor parallelism) the arithmetic is 8×
#   lighter and it reaches 3.74 TB/s, 88 % of the ceiling, at B = 64 and T = 64k (83 % at B = 16), in head blocks
#   as tall as the 16 query rows (16 × 128 tiles, 8 warps: the configuration the autotuner picks at every 16-head
#   shape).
# - **The memory win.** Against SDPA over the *expanded* cache of the same model (B = 1, T = 64k) it takes 0.38 ms
#   instead of 1.99 ms and reads 0.08 GB instead of 5.4 GB.
# - **Short calls are host-bound.** A call of `mla_decode` costs the host argument checks, the split plan and two
#   launches: ≈ 0.2–0.45 ms a call on the machine of this run, ≈ 0.05–0.18 ms for PyTorch's absorbed `bmm`. So at
#   batch 1 `bmm` is faster at every context (0.18 ms against 0.38 ms at 64k), and a call under ≈ 0.4 ms times the
#   host more than the kernel. With more work a call the kernel wins: 0.30 ms against 0.50 ms at B = 16, T = 16k
#   and 1.10 ms against 2.06 ms at T = 64k with 128 heads, 0.34 against 0.75 ms at B = 16, T = 64k with 16.
#
# ## 3.10 Exercises
#
# Each exercise has a stub to fill in, a cell that checks it, and a solution in a collapsed cell. The checker prints
# one line when your answer is right and says what differs when it is not (`attempt` prints that message instead of
# raising it; call the checker directly to get the exception).
#
# ### Exercise 1 (derive): where absorption breaks
#
# Suppose MLA rotated the *whole* key, $k_s = R_s W^{UK} c_s$, and the query, $R_t q$, as ordinary RoPE attention
# does (one head; `apply_rope` with its default half-split pairing). Absorbing $W^{UK}$ once into the query is then
# wrong. Derive what the query must be multiplied by instead, and write `my_full_rope_queries(q, c, w_uk, t, theta)`
# for a query `q [D]` at position `t` and the latents `c [S, r]` at positions $0 \dots S-1$ (`w_uk [D, r]`): it
# returns the **absorbed queries** `[S, r]`, row $s$ the vector $\tilde q_s \in \mathbb R^{r}$ with
# $\tilde q_s^\top c_s = (R_t q)^\top k_s$, the score. No key is formed: a row is built from `q` and `w_uk` alone
# (`c` gives only $S$). The checker compares your rows with the derivative of the rotated-key scores with respect to
# each $c_s$ — exactly $\tilde q_s$, since a score is linear in its latent — relative RMS ≤ 1e-6 (fp64); right
# scores computed through the keys do not pass. How many absorbed queries does one step need?

# %%
from minisparse.mla.exercises import (buggy_absorbed_attention, check_cache_numbers,
                                      check_fixed_absorbed_attention, check_full_rope_queries,
                                      check_score_tile, score_tile_loads, score_tile_store)
from minisparse.testing import attempt


def my_full_rope_queries(q, c, w_uk, t, theta):
    # your code here: return the absorbed queries [S, r], row s dotted with c[s] giving score s
    raise NotImplementedError


# %%
attempt(check_full_rope_queries, my_full_rope_queries)  # says what is wrong until the stub is done

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — (R_t q)ᵀ R_s W c = qᵀ R_{s-t} W c = (Wᵀ R_{t-s} q)ᵀ c, since R_pᵀ = R_{-p}: the
# absorbed query of cached token s is Wᵀ (q rotated by t - s). It depends on s, so one step needs S
# absorbed queries of 2·D·r FLOPs each — as much as expanding the S keys, which absorption avoids.
def full_rope_queries_solution(q, c, w_uk, t, theta):
    S = c.shape[0]  # c only gives the number of cached tokens
    q_rot = apply_rope(q.expand(S, -1)[None, :, None], t - torch.arange(S), theta)[0, :, 0]  # [S,D]
    return q_rot @ w_uk  # [S, r]: one absorbed query per cached token; score s = row s · c[s]


check_full_rope_queries(full_rope_queries_solution)

# %% [markdown]
# ### Exercise 2 (derive): the cache of a configuration
#
# From the formulas of section 3.1, by hand (a calculator is fine; `kv_cache_bytes` is not), return four numbers:
#
# 1. the bytes one token adds to the KV cache of a model with GLM-5's attention shapes — 78 MLA layers, 64 heads,
#    `kv_lora_rank` 512, `qk_rope_head_dim` 64, `qk_nope_head_dim` 192, `v_head_dim` 256 — stored in FP8;
# 2. the bytes of the cache of one 32k-token (32,768) sequence of a 48-layer hybrid in bf16 whose every fourth layer
#    is MLA with DeepSeek-V3's shapes and whose other layers are linear attention (they cache nothing);
# 3. DeepSeek-V3's MHA-to-MLA cache ratio with the book's baseline (128 heads, keys and values of 128);
# 4. the same ratio if the MHA keys had the 192 numbers an expanded MLA head has.
#
# Ratios within 0.5 %; byte counts exact.

# %%
def my_cache_numbers():
    # your code here: return (bytes_a_token, bytes_of_the_sequence, ratio_baseline, ratio_192)
    raise NotImplementedError


# %%
attempt(check_cache_numbers, my_cache_numbers)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — MLA caches d_c + d_R numbers a token and layer, whatever its heads and head sizes
# (GLM-5's 64 heads of 192 + 64 cache what V3's 128 do); MHA caches 2·n_h·d_h (every head's K, V).
def cache_numbers_solution():
    glm5 = 78 * (512 + 64) * 1  # 44,928 bytes a token
    hybrid = 32768 * (48 // 4) * (512 + 64) * 2  # only the 12 MLA layers cache
    return glm5, hybrid, 128 * (128 + 128) / 576, 128 * (192 + 128) / 576  # 56.9 and 71.1


check_cache_numbers(cache_numbers_solution)

# %% [markdown]
# ### Exercise 3 (debug): a plausible absorbed attention
#
# `buggy_absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, qk_nope_head_dim, v_head_dim)` below absorbs,
# attends on the latent cache and un-absorbs — and disagrees with the expanded attention of section 3.2 whenever
# the latent's size differs from `qk_nope_head_dim`. One line is wrong. Find it, and return the fixed function; the checker
# compares with `expand_latent` + `attention_ref` on shapes of its choosing (relative RMS ≤ 1e-5).

# %%
import inspect

print(inspect.getsource(buggy_absorbed_attention))


def my_fixed_absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, qk_nope_head_dim, v_head_dim):
    # your code here: a copy of the function above, with the bug fixed
    raise NotImplementedError


# %%
attempt(check_fixed_absorbed_attention, my_fixed_absorbed_attention)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — the scale. The absorbed query has r + dr numbers, but absorption does not change the
# scores, so their scale stays the expanded head's, (dn + dr) ** -0.5 (section 3.2), not
# (r + dr) ** -0.5.
def fixed_absorbed_attention_solution(q_nope, q_rope, c_kv, k_rope, w_kv_b, qk_nope_head_dim,
                                      v_head_dim):
    H, T, S = q_nope.shape[2], q_nope.shape[1], c_kv.shape[1]
    w = w_kv_b.view(H, qk_nope_head_dim + v_head_dim, -1)  # [H, dn + dv, r]
    w_uk, w_uv = w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]  # [H, dn, r], [H, dv, r]
    q = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_rope], -1)  # [B, T, H, r + dr]
    k = torch.cat([c_kv, k_rope], -1)  # [B, S, r + dr]
    scale = (qk_nope_head_dim + q_rope.shape[-1]) ** -0.5  # fixed: the expanded head's size
    s = torch.einsum("bthe,bse->bths", q, k) * scale  # [B, T, H, S]
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query t sits at position S - T + t
    p = s.masked_fill(~visible[None, :, None], float("-inf")).softmax(-1)
    return torch.einsum("bths,bsr,hvr->bthv", p, c_kv, w_uv)  # [B, T, H, dv]


check_fixed_absorbed_attention(fixed_absorbed_attention_solution)

# %% [markdown]
# ### Exercise 4 (Triton): the absorbed score tile
#
# The heart of section 3.7's split kernel, alone: one program scores all `H` heads of sequence `b` (one new token)
# against one block of `BLOCK_N` cache positions, $s_{h,n} = \text{scale}\,(\tilde q_h \cdot c_n + q^R_h \cdot
# k^R_n)$, and writes $-\infty$ at the positions $n \ge$ `lengths[b]` that the sequence does not have. The loads and
# the store are written (`score_tile_loads`, `score_tile_store` in `minisparse.mla.exercises`); fill in the gap
# between the marks (`tl.dot` and `tl.trans`, or broadcasting and `tl.sum`; `tl.where` for the mask). The checker
# launches your kernel on a ragged batch (cache of 37 slots, lengths 37, 5, 16 and 1), compares with the naive
# absorbed scores and checks that their softmax times `c` is `mla_decode_ref`'s output; it names the first entry
# that differs.

# %%
@triton.jit  # triton and tl were imported with the kernel of section 3.7
def my_score_tile_kernel(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, s_ptr, S, scale, H: tl.constexpr,
                         DC: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (blk, b), grid (cdiv(S, BLOCK_N), B): the scores [H, BLOCK_N] of sequence b at the
    cache positions n = blk·BLOCK_N + 0 … BLOCK_N - 1, written into scores [B, H, S] (fp32)."""
    # q̃ [H, DC], qᴿ [H, DR], c [BLOCK_N, DC], kᴿ [BLOCK_N, DR] (0 past S), n [BLOCK_N], lengths[b]
    ql, qr, c, kr, n, length = score_tile_loads(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, S, H, DC,
                                                DR, BLOCK_N)
    # ---- your code: s [H, BLOCK_N] = scale · (q̃ cᵀ + qᴿ kᴿᵀ), -inf where n >= length
    s = tl.zeros([H, BLOCK_N], tl.float32)
    # ---- end of your code
    score_tile_store(s_ptr, s, S, H, BLOCK_N)


# %%
attempt(check_score_tile, my_score_tile_kernel)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — one tile of c serves all H heads: the content term is [H, DC] @ [DC, BLOCK_N], the
# position term [H, DR] @ [DR, BLOCK_N]; the mask compares each position with the sequence's own
# length, not with S.
@triton.jit
def score_tile_solution(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, s_ptr, S, scale, H: tl.constexpr,
                        DC: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr):
    ql, qr, c, kr, n, length = score_tile_loads(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, S, H, DC,
                                                DR, BLOCK_N)
    s = (tl.dot(ql, tl.trans(c)) + tl.dot(qr, tl.trans(kr))) * scale  # [H, BN] content + position
    s = tl.where(n[None, :] < length, s, float("-inf"))  # the length mask
    score_tile_store(s_ptr, s, S, H, BLOCK_N)


check_score_tile(score_tile_solution)

# %% [markdown]
# ## Summary
#
# - Decoding reads the whole KV cache for every token, so its size per token — $2 L H_{kv} D$ for MHA/GQA/MQA —
#   bounds context length, batch and speed; `kv_cache_bytes` computes it for our configs and transformers'.
# - **MLA** caches one normalised latent $c^{KV}_t$ ($d_c$ = 512) and one rotary key $k^R_t$ ($d_R$ = 64) a token
#   and layer; each head's keys and values are linear maps of the latent. DeepSeek-V3's cache is 57× smaller than
#   MHA's with keys and values of 128 (71× counting 192-d keys), the size of GQA with 2.25 groups.
# - **Decoupled RoPE**: a rotation would sit between $W^{UK}$ and the latent and change with every offset, so
#   position lives in one rotary key shared by all heads and a rotary query per head; the scale stays
#   $1/\sqrt{d_h + d_R}$ (× YaRN's mscale² for the 128k checkpoints).
# - **Absorption** folds $W^{UK}$ into the query and $W^{UV}$ into the output: decoding becomes MQA with 576-d keys
#   and 512-d values over the latent cache, exactly equal to the expanded computation.
# - **Cost**: all heads share the cache, so absorbed decoding does ≈ $1.9\,n_h$ FLOPs per byte: compute-bound at 128
#   heads on an H200 (242 vs a ridge of 163), memory-bound when the heads are split over GPUs.
# - **Fast**: `mla_decode` is split-K flash-decoding: each program reads a latent tile once for all its heads, as
#   keys and values, and writes a partial softmax state; a combine kernel merges the states.
#
# Chapter 8 sparsifies exactly this layer: DeepSeek-V3.2's indexer picks 2048 of the cached latents per query, and
# the attention of this chapter runs on those only.
#
# ## References
#
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of
#   February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix
#   *The seed survey*. Its figures are checked against the models' configs and papers; where they disagree, the text
#   says so.
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
# ## Engineering notes (optional)
#
# What a practitioner needs and a first reading skips: YaRN, the config dataclasses and how configs are read, the
# cost functions, loading transformers' weights (and the check against transformers' attention), the latent cache's
# code, the argument checks, the split in PyTorch, the combine kernel, how `mla_decode` chooses its tiles and splits,
# a live timing, and the exercise checkers.
#
# ### YaRN: DeepSeek-V3's long-context RoPE
#
# Channel pairs that turn many times over the original context (high frequency, `beta_fast` = 32 turns or more)
# keep their frequency; pairs that turn less than `beta_slow` = 1 time are slowed down by the stretch `factor`
# (40); pairs in between get a linear mix. And because the stretched attention is flatter, the softmax is
# sharpened: transformers multiplies the scale by $\mathrm{mscale}^2$ with
# $\mathrm{mscale} = 0.1\,\texttt{mscale\_all\_dim} \cdot \ln(\texttt{factor}) + 1$, and the cos/sin tables by the
# ratio of two such terms (`attention_factor`, 1 for DeepSeek-V3 where `mscale` = `mscale_all_dim`).

# %%
#| export mla.naive
def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention-temperature term 0.1 · mscale · ln(factor) + 1 (1 when the context is not
    stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(dim, theta, factor, original_max_len, beta_fast=32.0, beta_slow=1.0,
                     truncate=True):
    """YaRN's RoPE frequencies [dim/2]: keep fast pairs, divide slow ones by `factor`, a linear ramp
    between.

    Pair j turns original_max_len · omega_j / (2 pi) times over the original context; the pairs
    that turn beta_fast and beta_slow times bound the ramp (rounded outwards when truncate, as
    transformers does).
    """
    omega = rope_frequencies(dim, theta)  # [dim/2] theta^(-2j/dim)

    # the (fractional) pair index j that turns `turns` times over the original context
    def pair_turning(turns):
        return dim * math.log(original_max_len / (2 * math.pi * turns)) / (2 * math.log(theta))

    lo, hi = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    # 0 keep .. 1 slow
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    return omega * (1 - ramp) + omega / factor * ramp


class YarnRotaryEmbedding(RotaryEmbedding):
    """Chapter 1's RotaryEmbedding with YaRN frequencies and cos/sin tables scaled by
    attention_factor."""

    # set after RotaryEmbedding.__init__, whose first _build uses the plain frequencies
    _yarn = None

    def __init__(self, dim, theta, factor, original_max_len, *, beta_fast=32.0, beta_slow=1.0,
                 truncate=True, attention_factor=1.0, interleaved=False, max_len=2048):
        _checks.positive_float("YarnRotaryEmbedding", "factor", factor)
        _checks.positive_int("YarnRotaryEmbedding", "original_max_len", original_max_len)
        super().__init__(dim, theta, interleaved, max_len)
        self._yarn = dict(factor=factor, original_max_len=original_max_len, beta_fast=beta_fast,
                          beta_slow=beta_slow, truncate=truncate)
        self.attention_factor = attention_factor
        self._build(max_len, None)

    def frequencies(self, dtype=torch.float32, device=None):
        """YaRN's frequencies [dim/2] (the plain ones until __init__ has set them): the tables and
        the positions before them (negative) both use these."""
        if self._yarn is None:
            return super().frequencies(dtype, device)
        return yarn_frequencies(self.dim, self.theta, **self._yarn).to(dtype=dtype, device=device)


def _rope_type(rope_scaling):
    return (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))


def mla_softmax_scale(qk_head_dim, rope_scaling=None):
    """MLA's softmax scale: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times yarn_mscale(factor,
    mscale_all_dim) ** 2 when rope_scaling is a YaRN setting with mscale_all_dim (DeepSeek-V3's
    checkpoints)."""
    scale = qk_head_dim**-0.5
    if _rope_type(rope_scaling) != "default" and rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
    return scale


def make_mla_rope(dim, theta=10000.0, interleaved=True, rope_scaling=None):
    """The layer's RotaryEmbedding: plain, or YaRN when rope_scaling = {"rope_type": "yarn",
    "factor": …, "original_max_position_embeddings": …, optional beta_fast, beta_slow, mscale,
    mscale_all_dim, attention_factor, truncate} (transformers' rope_parameters keys)."""
    kind = _rope_type(rope_scaling)
    if kind == "default":
        return RotaryEmbedding(dim, theta, interleaved)
    if kind != "yarn":
        raise NotImplementedError(f"MLA: rope type {kind!r} is not implemented (default and yarn "
                                  f"are)")
    s = rope_scaling
    for key in ("factor", "original_max_position_embeddings"):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:
            raise ValueError(f"MLA: rope_scaling[{key!r}] must be a finite number > 0 for YaRN, "
                             f"got {v!r}")
    factor = s["factor"]
    attention_factor = s.get("attention_factor")
    if attention_factor is None:  # as transformers infers it
        ms, ms_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all
                            else yarn_mscale(factor))
    return YarnRotaryEmbedding(dim, theta, factor, s["original_max_position_embeddings"],
                               beta_fast=s.get("beta_fast") or 32.0,
                               beta_slow=s.get("beta_slow") or 1.0,
                               truncate=s.get("truncate", True),
                               attention_factor=attention_factor, interleaved=interleaved)


# %%
from minisparse.mla import mla_softmax_scale, yarn_mscale

V3_YARN = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
               mscale_all_dim=1.0)
assert abs(yarn_mscale(40.0, 1.0) ** 2 - 1.874) < 1e-3  # the temperature term section 3.4 quotes
print(f"DeepSeek-V3's softmax scale: 192 ** -0.5 = {192**-0.5:.4f}, with YaRN "
      f"{mla_softmax_scale(192, V3_YARN):.4f} (× {yarn_mscale(40.0, 1.0) ** 2:.3f})")

# %% [markdown]
# ### Reading a model's config
#
# `kv_cache_bytes` takes our two dataclasses, transformers' configs and MLA layers alike: it finds the head counts
# under their several names (and Falcon's MQA flag), the layers that hold a full, a windowed or no cache, and the
# bytes of a dtype.

# %%
#| export mla.cost
@dataclass(frozen=True)
class GQAConfig:
    """The cache shape of a softmax-attention model in transformers' attribute names: MHA when
    num_key_value_heads == num_attention_heads, MQA when it is 1, GQA in between. v_head_dim
    defaults to head_dim."""
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
    """(query heads, K/V heads) of a config, an MLA/Attention layer or one of the dataclasses above.
    """
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    if not heads:
        raise TypeError(f"kv_cache_bytes: {type(config).__name__} has no num_attention_heads (or "
                        f"num_heads)")
    falcon_new = getattr(config, "new_decoder_architecture", False)
    if getattr(config, "multi_query", False) and not falcon_new:
        return heads, 1  # Falcon-7B's flag for one K/V head
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    kv = kv or heads
    return heads, kv


def attention_family(config):
    """'MLA' (has kv_lora_rank), else 'MHA', 'GQA' or 'MQA' by the number of K/V heads."""
    if getattr(config, "kv_lora_rank", None):
        return "MLA"
    heads, kv = _heads(config)
    return "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"


def cached_tokens(config, seq_len):
    """Tokens each layer holds after seq_len tokens: all of them, none for a linear-attention layer,
    at most the window for a sliding-window layer. The kinds come from config.layer_types; a config
    without them has one kind throughout: sliding when it has a sliding_window (Mistral-7B v0.1's
    4096 caps every layer), full otherwise. use_sliding_window=False (Qwen2's switch) turns the
    window off."""
    # a single layer (an MLA module) counts as one
    layers = getattr(config, "num_hidden_layers", None) or 1
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    every = "sliding_attention" if window else "full_attention"  # a model-wide window, or none
    types = getattr(config, "layer_types", None) or [every] * layers
    held = {"linear_attention": 0, "sliding_attention": min(seq_len, window) if window else seq_len}
    return [held.get(t, seq_len) for t in types]


def _dtype_bytes(dtype):
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    raise TypeError(f"kv_cache_bytes: dtype must be a torch.dtype or a number of bytes per "
                    f"element, got {dtype!r}")


# %% [markdown]
# ### RoPE on the whole key, numerically
#
# Section 3.2's argument, checked: the matrix $R_t^\top R_s W^{UK}$ that RoPE would put between a query and a
# latent, built from `apply_rope`, is the same for equal offsets and different for every other offset.

# %%
g = torch.Generator().manual_seed(0)
d_k, r_demo = 16, 32
W_uk_demo = torch.randn(d_k, r_demo, generator=g, dtype=torch.float64) / r_demo**0.5


def rope_matrix(pos, dim=d_k, theta=100.0):
    """R_pos as a matrix: apply_rope to the basis vectors e_0 … e_{dim-1}, all at position pos."""
    basis = torch.eye(dim, dtype=torch.float64)[None, :, None, :]  # [1, dim tokens, 1 head, dim]
    # column j = R_pos e_j
    return apply_rope(basis, torch.full((dim,), pos), theta=theta)[0, :, 0].T


def folded(t, s):
    # [d_k, r]: what would sit between q and c_s
    return rope_matrix(t).T @ rope_matrix(s) @ W_uk_demo


# same offset, same matrix: RoPE is relative ...
assert torch.allclose(folded(5, 2), folded(50, 47))
offsets = list(range(0, 65))
M0 = folded(100, 100)
change = [(folded(100, 100 - o) - M0).norm() / M0.norm() for o in offsets]
print(f"... but it differs by {min(change[1:]):.0%} to {max(change):.0%} from offset 0 at every "
      f"other offset")

# %% [markdown]
# ### The cost functions
#
# The table of section 3.6, row by row.

# %%
#| export mla.cost
def mla_decode_flops(T, num_heads, kv_lora_rank=512, rope_dim=64, *, B=1, q_tokens=1):
    """Matmul FLOPs of absorbed MLA attention: B·q_tokens·H query rows, each scoring T keys of r +
    dr and averaging T values of r: 2·B·q·H·T·(2r + dr). (The folds W_uk, W_uv are counted by
    mla_absorb_flops.)"""
    _checks.lengths("mla_decode_flops", "T", T)
    return 2 * B * q_tokens * num_heads * T * (2 * kv_lora_rank + rope_dim)


def mla_decode_bytes(T, kv_lora_rank=512, rope_dim=64, *, B=1, dtype_bytes=2):
    """Bytes of latent cache one decoding step reads: B·T·(r + dr)·bytes (read once for all heads).
    """
    _checks.lengths("mla_decode_bytes", "T", T)
    return B * T * (kv_lora_rank + rope_dim) * dtype_bytes


def mla_absorb_flops(num_heads, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128, *, B=1,
                     q_tokens=1):
    """FLOPs of the two folds for the new tokens: q̃ = W_ukᵀ q_nope and o = W_uv õ, per head."""
    return 2 * B * q_tokens * num_heads * kv_lora_rank * (qk_nope_head_dim + v_head_dim)


def mla_expand_flops(T, num_heads, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128, *, B=1):
    """FLOPs of expanding T cached latents into per-head keys and values (kv_b_proj): 2·B·T·r·H·(dn
    + dv)."""
    _checks.lengths("mla_expand_flops", "T", T)
    return 2 * B * T * kv_lora_rank * num_heads * (qk_nope_head_dim + v_head_dim)


def mha_decode_flops(T, num_heads, k_dim=192, v_dim=128, *, B=1, q_tokens=1):
    """Matmul FLOPs of softmax attention for B·q_tokens new queries over T cached keys:
    2·B·q·H·T·(dk + dv)."""
    _checks.lengths("mha_decode_flops", "T", T)
    return 2 * B * q_tokens * num_heads * T * (k_dim + v_dim)


def mha_decode_bytes(T, num_kv_heads, k_dim=192, v_dim=128, *, B=1, dtype_bytes=2):
    """Bytes of an expanded K/V cache one decoding step reads: B·T·H_kv·(dk + dv)·bytes."""
    _checks.lengths("mha_decode_bytes", "T", T)
    return B * T * num_kv_heads * (k_dim + v_dim) * dtype_bytes


# %% [markdown]
# ### Loading transformers' weights, and the check against them
#
# `MLA.from_hf(module)` reads the shapes, the RoPE convention, the YaRN setting and the norm's epsilon from a
# transformers `DeepseekV3Attention`, builds the layer, checks that both compute the same softmax scale and loads
# the state dict as it is: the parameter names are the same.

# %%
#| export mla.hf
import math

from minisparse import _checks
from minisparse.mla.naive import _rope_type

_MLA_MODULE = dict(attrs=("scaling", "kv_a_proj_with_mqa", "kv_a_layernorm.variance_epsilon",
                          "kv_b_proj.weight", "o_proj"),
                   config_attrs=("hidden_size", "num_attention_heads", "q_lora_rank",
                                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                 "v_head_dim"))


def mla_from_hf(module, backend="auto", *, cls=None):
    """An MLA layer (or `cls`, a subclass of it) from transformers' DeepseekV3Attention `module`:
    the same shapes, RoPE convention, YaRN setting and norm eps, its weights copied, on its
    device and in its dtype."""
    if cls is None:
        from minisparse.mla.layer import MLA

        cls = MLA
    _checks.hf_module("MLA.from_hf", module, "transformers' DeepseekV3Attention (MLA)",
                      **_MLA_MODULE)
    cfg = module.config
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    scaling = None
    if _rope_type(rope) != "default":
        scaling = dict(rope)
        # DeepSeek's configs may derive the stretch from the two lengths
        if scaling.get("factor") is None:
            original = scaling["original_max_position_embeddings"]
            scaling["factor"] = cfg.max_position_embeddings / original
    layer = cls(cfg.hidden_size, cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                attention_bias=module.kv_a_proj_with_mqa.bias is not None,
                norm_eps=module.kv_a_layernorm.variance_epsilon, rope_theta=theta,
                rope_interleave=bool(getattr(cfg, "rope_interleave", False)), rope_scaling=scaling,
                backend=backend)
    if getattr(module, "indexer", None) is not None and not hasattr(layer, "indexer"):
        raise TypeError(f"MLA.from_hf: module must be transformers' DeepseekV3Attention (MLA), got "
                        f"{type(module).__name__}, which has an indexer: load it with "
                        "DSAttention.from_hf (minisparse.dsa)")
    if not math.isclose(layer.scaling, module.scaling, rel_tol=1e-9):
        raise ValueError(f"MLA.from_hf: softmax scale {layer.scaling} differs from the module's "
                         f"{module.scaling}")
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
    "YaRN ×4, mscale 1 / mscale_all_dim 0.5": dict(
        q_lora_rank=24, rope_interleave=True, max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                             mscale=1.0, mscale_all_dim=0.5)),
}


def tiny_hf_attention(seed=0, **overrides):
    """transformers' DeepseekV3Attention at a tiny size with random weights (and its rotary
    embedding)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
              qk_nope_head_dim=16,
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
        print(f"✓ {name:44s} vs DeepseekV3Attention: expanded {e1:.1e}, absorbed {e2:.1e}  (scale "
              f"{ours.scaling:.4f})")

# %% [markdown]
# ### The latent cache's code

# %%
#| export mla.naive
class MLACache:
    """The latent KV cache: one buffer [B, max_len, kv_lora_rank + rope_dim] of c_kv | k_rope;
    `length` filled.

    append(c_kv [B, t, r], k_rope [B, t, dr]) writes after the cached tokens and returns all of
    them as views (latent [B, length, r], rope [B, length, dr]) of the one buffer; both in the
    cache's dtype (a cast would round fp32 latents, or overflow an fp16 cache, silently).
    """

    def __init__(self, batch, max_len, kv_lora_rank, rope_dim, *, dtype=torch.float32, device=None):
        for name, n in (("batch", batch), ("max_len", max_len), ("kv_lora_rank", kv_lora_rank),
                        ("rope_dim", rope_dim)):
            _checks.positive_int(type(self).__name__, name, n)
        self.buffer = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype,
                                  device=device)
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
            raise ValueError(f"MLACache.append: c_kv must be [B={B}, t, kv_lora_rank={r}] and "
                             f"k_rope [B, t, rope_dim={dr}], got c_kv {tuple(c_kv.shape)}, "
                             f"k_rope {tuple(k_rope.shape)}")
        if c_kv.dtype != self.buffer.dtype or k_rope.dtype != self.buffer.dtype:  # no silent cast
            raise TypeError(f"{type(self).__name__}.append: c_kv and k_rope must be the cache's "
                            f"{self.buffer.dtype}, got c_kv {c_kv.dtype} and k_rope "
                            f"{k_rope.dtype} (make the cache with the layer's dtype)")
        if self.length + t > self.max_len:
            raise ValueError(f"MLACache.append: {t} new tokens do not fit: {self.length} of "
                             f"max_len={self.max_len} "
                             "are used (make a larger cache with new_cache(batch, max_len))")
        self.buffer[:, self.length:self.length + t, :r] = c_kv
        self.buffer[:, self.length:self.length + t, r:] = k_rope
        self.length += t
        return _cache_read(self.latent), _cache_read(self.rope)

    def reset(self):
        self.length = 0

# %% [markdown]
# The parameter count of the real layer, built on the `meta` device (no memory), and where its parameters go:

# %%
with torch.device("meta"):
    big = MLA(7168, 128, q_lora_rank=1536)  # DeepSeek-V3's attention
for name, p in big.named_parameters():
    print(f"{name:28s} {str(tuple(p.shape)):16s} {p.numel() / 1e6:7.2f} M")
n_mla = sum(p.numel() for p in big.parameters())
# q, k, v, o of MHA at the same sizes, plus the rope parts
n_mha = 4 * 7168 * 128 * 128 + 2 * 7168 * 128 * 64
print(f"{'total':28s} {'':16s} {n_mla / 1e6:7.2f} M   (an MHA layer of the same head sizes: "
      f"~{n_mha / 1e6:.0f} M)")

# %% [markdown]
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
def _check_mla_args(hidden_size, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
                    qk_rope_head_dim,
                    v_head_dim, norm_eps, rope_theta):
    """MLA's constructor arguments: sizes are ints > 0 (q_lora_rank may be None: one q_proj),
    qk_rope_head_dim is even (RoPE rotates pairs), norm_eps and rope_theta positive numbers."""
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("kv_lora_rank", kv_lora_rank), ("qk_nope_head_dim", qk_nope_head_dim),
                        ("qk_rope_head_dim", qk_rope_head_dim), ("v_head_dim", v_head_dim)):
        _checks.positive_int("MLA", name, value)
    if q_lora_rank is not None:
        _checks.positive_int("MLA", "q_lora_rank (None for a single q_proj)", q_lora_rank)
    if qk_rope_head_dim % 2:
        raise ValueError(f"MLA: qk_rope_head_dim must be even (RoPE rotates pairs), got "
                         f"{qk_rope_head_dim}")
    _checks.positive_float("MLA", "norm_eps", norm_eps)
    _checks.positive_float("MLA", "rope_theta", rope_theta)


# %%
#| export mla.naive
def check_mla_decode_args(op, q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None, *,
                          check_values=True, dtypes=_checks.FLOATS):
    """The arguments of the decode ops (see mla_decode): ranks, shapes, one dtype among `dtypes`,
    one device, a positive scale, lengths None or an integer tensor [B]; with check_values also T
    <= lengths[b] <= S, which reads lengths back to the host. Raises TypeError/ValueError naming
    the argument; returns (B, T, H, Dc, Dr, S)."""
    _checks.tensor(op, "q_latent", q_latent, "[B, T, H, Dc]")
    _checks.tensor(op, "q_rope", q_rope, "[B, T, H, Dr]")
    _checks.tensor(op, "kv_cache", kv_cache, "[B, S, Dc]")
    _checks.tensor(op, "rope_cache", rope_cache, "[B, S, Dr]")
    _checks.same_dtype(op, dtypes, q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache,
                       rope_cache=rope_cache)
    _checks.same_device(op, q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache,
                        rope_cache=rope_cache,
                        lengths=lengths if isinstance(lengths, torch.Tensor) else None)
    B, T, H, Dc = q_latent.shape
    S, Dr = kv_cache.shape[1], q_rope.shape[-1]
    _checks.shape(op, "q_rope", q_rope, (B, T, H, Dr), "[B, T, H, Dr]", "q_latent's B, T, H")
    _checks.shape(op, "kv_cache", kv_cache, (B, S, Dc), "[B, S, Dc]", "q_latent's B and Dc")
    _checks.shape(op, "rope_cache", rope_cache, (B, S, Dr), "[B, S, Dr]",
                  "kv_cache's B and S, q_rope's Dr")
    if T > S:
        raise ValueError(f"{op}: the T={T} queries are the last T of the cached tokens, so T <= "
                         f"S, got S={S}")
    if scale is None:
        raise ValueError(f"{op}: scale must be given: MLA's is (qk_nope_head_dim + "
                         f"qk_rope_head_dim) ** -0.5, "
                         "not the latent's Dc ** -0.5")
    _checks.positive_float(op, "scale", scale)
    if lengths is not None:
        if (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,)
                or lengths.is_floating_point() or lengths.is_complex()
                or lengths.dtype == torch.bool):
            got = (f"{tuple(lengths.shape)} {lengths.dtype}" if isinstance(lengths, torch.Tensor)
                   else type(lengths).__name__)
            raise ValueError(f"{op}: lengths must be an integer tensor [B={B}] (cached tokens per "
                             f"sequence), got {got}")
        if check_values and B:
            lo, hi = (int(v) for v in torch.aminmax(lengths))
            if hi > S:
                raise ValueError(f"{op}: lengths beyond the cache: max(lengths) = {hi} > S = {S} "
                                 f"tokens in kv_cache")
            if lo < T:
                raise ValueError(f"{op}: every sequence needs lengths[b] >= T = {T} (its queries "
                                 f"are cached tokens), "
                                 f"got min(lengths) = {lo}")
    return B, T, H, Dc, Dr, S



# %% [markdown]
# Bad input fails before any kernel runs, and says what it wanted. Shapes, dtypes and devices are always checked;
# `lengths` beyond the cache is a check of *values*, which reads `lengths` back to the host: on CPU tensors it always
# runs, on a GPU after `runtime.set_value_checks(True)` (as here), so that a decoding step never waits for the host.

# %%
ql, qr = torch.randn(2, 1, 4, 32, device=DEVICE), torch.randn(2, 1, 4, 16, device=DEVICE)
kv, kr, sc = torch.randn(2, 40, 32, device=DEVICE), torch.randn(2, 40, 16, device=DEVICE), 0.1
too_long = torch.tensor([41, 3], device=DEVICE)
bad_calls = {
    "latent dim mismatch": lambda: mla_decode(ql, qr, kv[..., :-1], kr, sc),
    "rope dim mismatch": lambda: mla_decode(ql, qr, kv, kr[..., :8], sc),
    "lengths beyond the cache": lambda: mla_decode(ql, qr, kv, kr, sc, too_long),
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
_ = runtime.set_value_checks(previous)

# %% [markdown]
# ### The split, in PyTorch
#
# The kernel's arithmetic with every score computed at once (a model of the split, not of its memory use):
# partial states per split of `split_len` tokens, then `combine_splits`.

# %%
#| export mla.naive
def mla_decode_splitk(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None, split_len=64):
    """mla_decode_ref computed as the kernel does: keys cut into splits of split_len tokens, a
    partial softmax state (m, l, acc) per split and query row, then combine_splits. Same
    arguments; PyTorch, fp32."""
    B, T, H, Dc, _, S = check_mla_decode_args("mla_decode_splitk", q_latent, q_rope, kv_cache,
                                              rope_cache, scale,
                                              lengths)
    split_len = _checks.positive_int("mla_decode_splitk", "split_len", split_len)
    f = torch.float32
    s = (torch.einsum("bthr,bsr->bths", q_latent.to(f), kv_cache.to(f))
         + torch.einsum("bthd,bsd->bths", q_rope.to(f), rope_cache.to(f))) * scale  # [B, T, H, S]
    ends = torch.full((B,), S, device=s.device) if lengths is None else lengths.to(s.device)
    last = ends[:, None] - T + torch.arange(T, device=s.device)  # [B, T] position of each query
    # [B, T, S] causal, within the sequence
    visible = torch.arange(S, device=s.device) <= last[..., None]
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
# ragged: full, a single token, a length that is no multiple of anything
len_s = torch.tensor([300, 1, 137])
ref_s = mla_decode_ref(ql_s, qr_s, kv_s, kr_s, 0.2, len_s)
for split in (16, 64, 300, 512):
    out_s = mla_decode_splitk(ql_s, qr_s, kv_s, kr_s, 0.2, len_s, split)
    assert_close(f"split_len={split}", ref_s, out_s, 1e-5)
k_one = torch.cat([kv_s[1:2, :1], kr_s[1:2, :1]], -1)[:, :, None]  # sequence 1's only key
one = attention_ref(torch.cat([ql_s[1:2], qr_s[1:2]], -1), k_one, kv_s[1:2, :1, None], scale=0.2)
# 1 token: o = c_0
assert torch.allclose(ref_s[1], one[0]) and torch.allclose(ref_s[1, 0], kv_s[1, 0].expand(H_S, 48))
print("the split-K form equals the spec for 4 split lengths on a ragged batch (lengths 300, 1, "
      "137)")

# %% [markdown]
# ### The op's code

# %%
#| export mla.triton
def mla_decode(q_latent, q_rope, kv_cache, rope_cache, scale, lengths=None, *, out=None):
    """Absorbed MLA attention over the latent cache, in Triton: split-K flash-decoding, all heads of
    a token reading each cached latent once.

    q_latent   [B, T, H, Dc]  the queries folded into the latent space (q_nope · W_uk per head)
    q_rope     [B, T, H, Dr]  the rotary queries
    kv_cache   [B, S, Dc]     the cached latents c (keys and values); any strides (MLACache.latent)
    rope_cache [B, S, Dr]     the cached shared rotary keys; e.g. MLACache.rope
    scale      the softmax scale — MLA's (qk_nope + qk_rope) ** -0.5 (× YaRN's mscale²), not Dc's
    lengths    None (every sequence uses all S tokens) or an integer tensor [B] on q's device,
               T <= lengths[b] <= S
    out        None, or a tensor [B, T, H, Dc] in q's dtype and device to write into
    -> o_latent [B, T, H, Dc] in q's dtype: softmax(scale (q̃·c + qᴿ·kᴿ)) c, the T queries of
    sequence b at positions lengths[b] - T .. lengths[b] - 1 (causal among themselves); fp32
    accumulation.

    Inputs share one dtype: fp32, fp16 or bf16 on a GPU, fp32 or fp16 in the interpreter.
    Inference only: no backward. The range of `lengths` is checked on CPU tensors, and on CUDA
    tensors after `runtime.set_value_checks(True)` (it reads lengths back to the host). Where no
    launch configuration fits the GPU's shared memory (a T4 at Dc = 512), it warns and computes
    with mla_decode_ref instead.
    """
    B, T, H, DC, DR, S, max_len = _check_decode(q_latent, q_rope, kv_cache, rope_cache, scale,
                                                lengths, out)
    if out is None:
        out = torch.empty(B, T, H, DC, dtype=q_latent.dtype, device=q_latent.device)
    if B == 0 or T * H == 0:
        return out
    try:
        return _launch(q_latent, q_rope, kv_cache, rope_cache, float(scale), lengths, out, max_len)
    except runtime.SharedMemoryError as err:
        warnings.warn(f"mla_decode: no launch configuration fits this GPU's shared memory at "
                      f"Dc = {DC} ({err}); computing with PyTorch's absorbed attention "
                      "(mla_decode_ref) instead", stacklevel=2)
        ref = mla_decode_ref(q_latent.float(), q_rope.float(), kv_cache.float(),
                             rope_cache.float(), scale, lengths)
        return out.copy_(ref)

# %% [markdown]
# ### The layer on the kernel, checked
#
# Section 3.8's claim: a prompt of 4 tokens, then one token at a time, decoded with `backend="naive"` and with
# `backend="triton"`, gives the same outputs.

# %%
T_WIRE = runtime.reading_size(cpu=10, gpu=300)
torch.manual_seed(8)
wired = MLA(128, 4, q_lora_rank=48, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32).to(DEVICE, DTYPE)
x_w = torch.randn(2, T_WIRE, 128, device=DEVICE, dtype=DTYPE)
outs = {}
with torch.no_grad():
    for backend in ("naive", "triton"):
        wired.backend = backend
        cache = wired.new_cache(2, T_WIRE)
        # the prompt: 4 queries, causal among themselves
        first = wired(x_w[:, :4], cache, absorb=True)
        outs[backend] = torch.cat([first] + [wired(x_w[:, t:t + 1], cache,
                                                   absorb=True) for t in range(4, T_WIRE)], 1)
    wired.backend = "auto"
err = assert_close("backend='triton' vs 'naive'", outs["naive"].float(), outs["triton"].float(),
                   # 16-bit: both paths round at several places
                   1e-4 if DTYPE == torch.float32 else 1e-2)
print(f"✓ {T_WIRE} tokens decoded on mla_decode equal the PyTorch path: relative RMS error "
      f"{err:.1e}")

# %% [markdown]
# ### The combine kernel
#
# Section 3.7 describes it; here is its code.

# %%
#| export mla.triton
@triton.jit
def merge_partial(m_run, l_run, o, m_s, l_s, a_s):
    """Fold one partial softmax state (m_s, l_s [R], a_s [R, C]; base 2) into the running one
    (m_run, l_run, o): m' = max(m, m_s), ℓ = ℓ·2^(m − m') + ℓ_s·2^(m_s − m'), o = o·2^(m − m') +
    a_s·2^(m_s − m'). A row that saw no key on either side keeps m = −∞ and adds 0 (no −∞ − −∞).
    Returns (m', ℓ, o). Chapters 7 and 8 merge their partial results with it too."""
    m_new = tl.maximum(m_run, m_s)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_run - m_ref)
    beta = tl.exp2(m_s - m_ref)  # 0 for a part in which this row saw no key
    return m_new, l_run * alpha + l_s * beta, o * alpha[:, None] + a_s * beta[:, None]


@triton.jit
def _mla_decode_combine_kernel(acc_ptr, m_ptr, l_ptr, len_ptr, o_ptr, T, H, ROWS, NS, split_len,
                               s_ob, s_ot, s_oh, s_od,
                               DC: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr):
    """The output of BLOCK_H query rows of sequence b: the merge of the partial states its splits
    wrote.

    Program (pid, b), grid (cdiv(ROWS, BLOCK_H), B). It reads the slots (b, 0) … (b, used − 1) of
    the partial buffers, used = ceil(lengths[b] / split_len) — the splits that ran for sequence b
    — each an [BLOCK_H, DC] tile of acc and [BLOCK_H] of m and ℓ:

        m' = max(m, m_i);  ℓ = ℓ·2^(m − m') + ℓ_i·2^(m_i − m')
        o = o·2^(m − m') + acc_i·2^(m_i − m')

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
        a_s = tl.load(acc_ptr + slot[:, None] * DC + dc[None, :],
                      mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
        m_run, l_run, o = merge_partial(m_run, l_run, o, m_s, l_s, a_s)
    o = o / tl.where(l_run > 0, l_run, 1.0)[:, None]
    o_ptr += b64 * s_ob  # sequence b's output
    t = rows // H
    h = rows % H
    tl.store(o_ptr + t[:, None] * s_ot + h[:, None] * s_oh + dc[None, :] * s_od,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dc_ok[None, :])


# %% [markdown]
# ### Tiles, splits and the launch
#
# `mla_decode` launches both kernels through `minisparse.runtime.launch`, which reads the rows `"mla.decode_split"`
# and `"mla.decode_combine"` of `runtime.LAUNCH_TABLE` for the GPU's architecture and keeps the first configuration
# that compiles within its shared memory. The split kernel's rows are sized for a latent of 512; a larger one gets
# proportionally shorter token tiles (`fit`). On Hopper (227 KiB of shared memory a block) a program takes 64 heads:
# `q̃` is 64 KiB in bf16, a 64-token tile of `[c | kᴿ]` 72 KiB per pipeline stage (two stages), and the fp32
# accumulator `[64, 512]` is spread over 8 warps (128 registers a thread). Ampere gets 32 heads; a Colab T4 (64 KiB,
# fp16) 16 heads and 16-token tiles, one stage — and at Dc = 512 even those do not fit, so there `mla_decode` warns
# and computes with `mla_decode_ref`. fp32 inputs take twice the memory and get the small tiles. The interpreter gets
# one small configuration, 16 heads × 32 tokens.
#
# A head block taller than the query rows computes rows that are masked off: 16 heads decoding one token fill a
# quarter of a 64-high block. So the launch tries first the row's entries whose `BLOCK_H` is the number of query rows
# padded to a power of two (at least 16), in the row's order (`prefer`), then the rest; on the H200, 16 heads read
# the cache at 3.6 TB/s in 16-high blocks against 2.0 TB/s in 64-high ones (`bench/notes/mla.md`).
#
# The number of splits is planned on the host before the launch, from the batch, the number of head blocks
# `cdiv(T·H, BLOCK_H)` and the SM count (next paragraph), so it needs `BLOCK_H`: the plan takes it from the
# configuration the launch tries first — the one a test forces with `runtime.launch_config`, else the first
# preferred entry of the row (else its first). With `runtime.set_autotune(True)` (the benchmarks) the row's
# candidates are timed for each shape; a candidate keeps its own `BLOCK_H` only where it gives as many head blocks as
# the planned one (with 16 heads, 16, 32 and 64 all give one), else it takes the planned `BLOCK_H` — so every
# candidate runs with the plan made for it. The sweeps behind the table's rows are in `bench/notes/mla.md`.

# %% [markdown]
# **How many splits?** Enough that the programs fill the GPU about once — one per SM, so 64 sequences × 2 head blocks
# need no split at all on a 132-SM H200, while a single sequence gets up to ~66 (from about 30k tokens; fewer
# below, because of the floor that follows) — but never a split so short that its
# partial state costs more than it saves: each split writes, and the combine reads back, `rows × 512` fp32 numbers
# (256 KB for 128 heads, so 512 KB of traffic), which should not outweigh the split's own cache bytes (a cached
# token is 576 numbers, 1152 bytes in bf16: ≥ 455 tokens at 128 heads), and never fewer than 256 tokens.

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
            ax.add_patch(plt.Rectangle((start, b - 0.35), split_demo, 0.7, facecolor="none",
                                       edgecolor="grey",
                                       hatch="//", lw=0.5))
            continue
        ax.add_patch(plt.Rectangle((start, b - 0.35), end - start, 0.7, facecolor=f"C{i}",
                                   alpha=0.55,
                                   edgecolor="black"))
        for k0 in range(start + BN_demo, end, BN_demo):  # the BLOCK_N steps of the program's loop
            ax.plot([k0, k0], [b - 0.35, b + 0.35], color="white", lw=0.6)
        if end - start > 100:
            ax.text((start + end) / 2, b, f"split {i}\n(m, ℓ, acc)", ha="center", va="center",
                    fontsize=7)
    ax.plot([n, n], [b - 0.45, b + 0.45], color="tab:red", lw=1.5)
    ax.text(S_demo + 10, b, f"lengths[{b}] = {n}", va="center", fontsize=8)
ax.set_xlim(0, S_demo + 190)
ax.set_ylim(len(lens_demo) - 0.5, -0.5)
ax.set_yticks(range(len(lens_demo)), [f"sequence {b}" for b in range(len(lens_demo))])
ax.set_xlabel("cached token (white ticks: the BLOCK_N = 64 steps of each program's loop)")
ax.set_title("split-K over a ragged latent cache: grid = (head blocks, splits, batch); hatched = "
             "exits at once")
fig.tight_layout()
plt.show()

# %%
#| export mla.triton
_MIN_SPLIT = 256  # tokens: the shortest split worth a program


def _check_decode(q_latent, q_rope, kv_cache, rope_cache, scale, lengths, out):
    """Everything mla_decode checks before launching; returns (B, T, H, Dc, Dr, S, max_len), max_len
    the longest sequence when lengths were read back (value checks on), else S."""
    checking = _checks.checking_values(False, q_latent)
    B, T, H, DC, DR, S = check_mla_decode_args("mla_decode", q_latent, q_rope, kv_cache,
                                               rope_cache, scale, lengths,
                                               check_values=checking,
                                               dtypes=_checks.KERNEL_FLOATS)
    _checks.forward_only("mla_decode", q_latent, q_rope, kv_cache, rope_cache,
                         instead="mla_attention_absorbed (the MLA layer with absorb=False or "
                                 "backend='naive')")
    _checks.triton_inputs("mla_decode", q_latent, q_rope, kv_cache, rope_cache, lengths)
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, T, H, DC)
                            or out.dtype != q_latent.dtype or out.device != q_latent.device):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"mla_decode: out must be [B, T, H, Dc] = {(B, T, H, DC)} in q_latent's "
                         f"dtype and device, "
                         f"got {got}")
    max_len = int(lengths.max()) if lengths is not None and checking and B else S
    return B, T, H, DC, DR, S, max_len


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 exact; 16-bit inputs ignore it


def _plan_splits(B, rows, row_blocks, max_len, device, latent_bytes, dc, split_len=None):
    """(split_len, NS): enough splits to fill the GPU about once (a program per SM), none shorter
    than _MIN_SPLIT tokens or so short that its partial state (rows × dc fp32, written and read
    back) outweighs the cache it summarises (latent_bytes a token). split_len is a multiple of
    64, so every BLOCK_N of the table divides it."""
    if split_len is None:
        sms = runtime.sm_count(device)
        want = max(1, sms // max(1, B * row_blocks))  # splits per (sequence, head block)
        # 2 × rows × dc × 4 bytes <= split's cache bytes
        shortest = max(_MIN_SPLIT, 8 * rows * dc // latent_bytes)
        num_splits = max(1, min(want, max_len // shortest))
        split_len = triton.cdiv(triton.cdiv(max_len, num_splits), 64) * 64
    return split_len, max(1, triton.cdiv(max_len, split_len))


def _split_tiles(block_dc, rows=None, block_h=None):
    """`fit` for the split kernel's table entries: BLOCK_N shortened for latents over 512 (the rows
    are sized for 512), never under 16. With `rows` and `block_h` (autotuning), an entry whose
    BLOCK_H cuts the rows into another number of blocks than block_h does takes block_h instead:
    the splits were planned for cdiv(rows, block_h) blocks."""
    shrink = max(1, block_dc // 512)

    def fit(config):
        fitted = dict(config, BLOCK_N=max(16, config["BLOCK_N"] // shrink))
        if block_h is not None and (triton.cdiv(rows, fitted["BLOCK_H"])
                                    != triton.cdiv(rows, block_h)):
            fitted["BLOCK_H"] = block_h
        return fitted
    return fit


def _first_split_config(device, dtype, fit, prefer):
    """The split kernel's configuration the launch tries first: the one forced by
    runtime.launch_config, else the first of its LAUNCH_TABLE row that `prefer` accepts (else the
    row's first); after `fit`."""
    return fit(runtime.launch_configs("mla.decode_split", device, dtype, prefer)[0])


def _rows_tile(rows):
    """`prefer` for the split kernel: entries whose head block is as tall as the query rows (padded
    to a power of two, at least 16), so that a block computes no masked rows it could leave out."""
    tall = max(16, triton.next_power_of_2(rows))
    return lambda config: config["BLOCK_H"] == tall


def _launch(q_latent, q_rope, kv_cache, rope_cache, scale, lengths, out, max_len, split_len=None):
    """Plan the splits, run the split kernel, then the combine kernel into out [B, T, H, Dc]; return
    out. split_len (tests) replaces the planned split length."""
    B, T, H, DC = q_latent.shape
    DR = q_rope.shape[-1]
    ROWS = T * H
    BLOCK_DC, BLOCK_DR = max(16, triton.next_power_of_2(DC)), max(16, triton.next_power_of_2(DR))
    dev, dtype = q_latent.device, q_latent.dtype
    prefer = _rows_tile(ROWS)
    block_h = _first_split_config(dev, dtype, _split_tiles(BLOCK_DC), prefer)["BLOCK_H"]
    latent_bytes = (DC + DR) * kv_cache.element_size()
    split_len, NS = _plan_splits(B, ROWS, triton.cdiv(ROWS, block_h), max_len, dev, latent_bytes,
                                 DC, split_len)
    if lengths is None:
        lengths = torch.full((B,), kv_cache.shape[1], dtype=torch.int32, device=dev)
    lengths = lengths.to(dtype=torch.int32).contiguous()
    acc = _empty((B, NS, ROWS, DC), torch.float32, dev)  # partial states, fp32
    m = _empty((B, NS, ROWS), torch.float32, dev)
    l_ = _empty((B, NS, ROWS), torch.float32, dev)
    runtime.launch(
        "mla.decode_split", _mla_decode_split_kernel,
        lambda c: (triton.cdiv(ROWS, c["BLOCK_H"]), NS, B),
        (q_latent, q_rope, kv_cache, rope_cache, lengths, acc, m, l_, T, H, ROWS, NS, split_len,
         scale * _LOG2E,
         *q_latent.stride(), *q_rope.stride(), *kv_cache.stride(), *rope_cache.stride()),
        dict(DC=DC, DR=DR, BLOCK_DC=BLOCK_DC, BLOCK_DR=BLOCK_DR, PRECISION=_precision(dtype)),
        device=dev, dtype=dtype, key=(BLOCK_DC, BLOCK_DR, max(16, triton.next_power_of_2(ROWS))),
        fit=_split_tiles(BLOCK_DC, *((ROWS, block_h) if runtime.autotuning() else ())),
        autotune_key=["ROWS", "NS", "split_len", "DC", "DR"], prefer=prefer,
        instead="mla_decode_ref")
    runtime.launch(
        "mla.decode_combine", _mla_decode_combine_kernel,
        lambda c: (triton.cdiv(ROWS, c["BLOCK_H"]), B),
        (acc, m, l_, lengths, out, T, H, ROWS, NS, split_len, *out.stride()),
        dict(DC=DC, BLOCK_DC=BLOCK_DC),
        device=dev, dtype=dtype, key=(BLOCK_DC,), instead="mla_decode_ref")
    return out


# the partial buffers (a test fills them with NaN to prove they are written)
def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)



# %% [markdown]
# ### A live timing
#
# On a GPU the cell below times one size (on a CPU it prints a note: the interpreter's timings mean nothing).

# %%
if runtime.has_gpu() and not runtime.interpreting():
    B_L, T_L, H_L = 16, 8192, 128
    g = torch.Generator(device=DEVICE).manual_seed(0)
    # one [c | kᴿ] buffer, as MLACache
    buf = torch.randn(B_L, T_L, 576, generator=g, device=DEVICE).to(DTYPE)
    ql = torch.randn(B_L, 1, H_L, 512, generator=g, device=DEVICE).to(DTYPE)
    qr = torch.randn(B_L, 1, H_L, 64, generator=g, device=DEVICE).to(DTYPE)
    mla_decode(ql, qr, buf[..., :512], buf[..., 512:], 192**-0.5)  # compile first
    ms = bench.median_ms(lambda: mla_decode(ql, qr, buf[..., :512], buf[..., 512:], 192**-0.5))
    gb = mla_decode_bytes(T_L, B=B_L) / 1e9
    print(f"mla_decode B={B_L} T={T_L} H={H_L}: {ms:.3f} ms, {gb / ms * 1e3:.0f} GB/s of cache "
          f"read, "
          f"{mla_decode_flops(T_L, H_L, B=B_L) / ms / 1e9:.0f} TFLOP/s")
else:
    print("No GPU here: nothing to time live (section 3.9 plots the committed H200 numbers).")


# %% [markdown]
# ### The exercise checkers
#
# The checkers of section 3.10, each built on `minisparse.testing.check` or raising `ExerciseError` with the first
# thing that differs. `tests/test_mla.py` feeds each a known-wrong answer.

# %% tags=["hide-input"]
#| export mla.exercises
import math
import types

import torch

import triton
import triton.language as tl

from minisparse.attention.naive import apply_rope, attention_ref
from minisparse.mla.cost import kv_cache_bytes
from minisparse.mla.naive import expand_latent, mla_decode_ref
from minisparse.testing import ExerciseError, check, number_answer


def _full_rope_scores(q, c, w_uk, t, theta):  # the keys rotated and dotted: (R_t q) · (R_s W c_s)
    k = apply_rope((c @ w_uk.T)[None, :, None], torch.arange(c.shape[0]), theta)[0, :, 0]  # [S, D]
    return k @ apply_rope(q.view(1, 1, 1, -1), torch.tensor([t]), theta)[0, 0, 0]  # [S]


def _full_rope_queries(q, c, w_uk, t, theta):
    """The absorbed queries [S, r]: score s is linear in c_s alone, so its gradient with respect to
    c_s, taken through the rotated keys, is the vector that c_s is dotted with."""
    c = c.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (queries,) = torch.autograd.grad(_full_rope_scores(q, c, w_uk, t, theta).sum(), c)
    return queries  # [S, r]


def check_full_rope_queries(fn):
    """Check fn(q [D], c [S, r], w_uk [D, r], t, theta) -> the absorbed queries [S, r] of RoPE on
    the whole key (row s · c_s = score s). Comparing the rows, not the scores, is what rules out the
    keys: scores found through them, spread over c as rows, differ from the queries."""
    g = torch.Generator().manual_seed(41)
    cases = [(torch.randn(D, generator=g, dtype=torch.float64),
              torch.randn(S, r, generator=g, dtype=torch.float64),
              torch.randn(D, r, generator=g, dtype=torch.float64), t, theta)
             for D, r, S, t, theta in [(8, 12, 5, 4, 10.0), (16, 32, 9, 8, 100.0),
                                       (16, 24, 7, 20, 50.0)]]
    check("absorbed queries with RoPE on the whole key", fn, _full_rope_queries, cases,
          tol=1e-6, hint="(R_t q)ᵀ R_s W c = qᵀ R_tᵀ R_s W c, and R_tᵀ R_s = R_(s-t) = R_(t-s)ᵀ: "
          "rotate q by t - s for cached token s (apply_rope with positions t - arange(S)), then "
          "multiply by W: row s is Wᵀ R_(t-s) q, built without c")


def _cache_numbers():
    ns = types.SimpleNamespace
    glm5 = ns(num_hidden_layers=78, num_attention_heads=64, kv_lora_rank=512, qk_rope_head_dim=64)
    hybrid = ns(num_hidden_layers=48, num_attention_heads=128, kv_lora_rank=512,
                qk_rope_head_dim=64,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 12)
    mha = {dk: kv_cache_bytes(ns(num_hidden_layers=1, num_attention_heads=128,
                                 num_key_value_heads=128,
                                 head_dim=dk, v_head_dim=128), 1, 1) for dk in (128, 192)}
    mla = kv_cache_bytes(ns(num_hidden_layers=1, num_attention_heads=128, kv_lora_rank=512,
                            qk_rope_head_dim=64), 1, 1)
    return kv_cache_bytes(glm5, 1, 1), kv_cache_bytes(hybrid, 32768,
                                                      2), mha[128] / mla, mha[192] / mla


def check_cache_numbers(fn):
    """Check fn() -> (GLM-5 bytes a token in FP8, bytes of the hybrid's 32k sequence, MHA/MLA ratio
    with 128-d keys, the ratio with 192-d keys)."""
    what = ["1 (GLM-5's bytes a token)", "2 (the hybrid's sequence)", "3 (the baseline ratio)",
            "4 (the ratio with 192-d keys)"]
    hints = ["MLA caches kv_lora_rank + qk_rope_head_dim numbers a token and layer, for all "
             "heads together",
             "only the MLA layers cache: one in four of 48; tokens × layers × 576 numbers × 2 "
             "bytes",
             "MHA caches a key and a value of 128 numbers for each of 128 heads; MLA 512 + 64",
             "MHA's keys now have 128 + 64 numbers, its values still 128"]
    try:
        got = fn()
    except NotImplementedError:
        raise ExerciseError("✗ cache numbers: not implemented yet — fill in the function and run "
                            "the cell "
                            "again") from None
    if not isinstance(got, (tuple, list)) or len(got) != 4:
        raise ExerciseError(f"✗ cache numbers: expected a tuple of four numbers, got {got!r}")
    for i, (g, want) in enumerate(zip(got, _cache_numbers())):
        g = number_answer("cache numbers", g, f"number {what[i]}")
        ok = g == want if i < 2 else math.isclose(g, want, rel_tol=5e-3)
        if not ok:
            raise ExerciseError(f"✗ cache numbers: number {what[i]} is {g:.6g}, which is not "
                                "right.\n"
                                f"Hint: {hints[i]}")
    print("✓ cache numbers: all 4 match")


def buggy_absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, qk_nope_head_dim, v_head_dim):
    """Absorbed MLA attention: q_nope [B, T, H, dn], q_rope [B, T, H, dr], c_kv [B, S, r], k_rope
    [B, S, dr], w_kv_b [H·(dn + dv), r] -> [B, T, H, dv]; queries at positions S - T .. S - 1."""
    H, T, S = q_nope.shape[2], q_nope.shape[1], c_kv.shape[1]
    w = w_kv_b.view(H, qk_nope_head_dim + v_head_dim, -1)  # [H, dn + dv, r]
    w_uk, w_uv = w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]  # [H, dn, r], [H, dv, r]
    q = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_rope], -1)  # [B, T, H, r + dr]
    k = torch.cat([c_kv, k_rope], -1)  # [B, S, r + dr]
    scale = q.shape[-1] ** -0.5  # 1 / sqrt(the size of a query)
    s = torch.einsum("bthe,bse->bths", q, k) * scale  # [B, T, H, S]
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query t sits at position S - T + t
    p = s.masked_fill(~visible[None, :, None], float("-inf")).softmax(-1)
    return torch.einsum("bths,bsr,hvr->bthv", p, c_kv, w_uv)  # [B, T, H, dv]


def _expanded_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, dn, dv):
    # [B, S, H, dn + dr], [B, S, H, dv]
    k, v = expand_latent(c_kv, k_rope, w_kv_b, q_nope.shape[2], dn, dv)
    q = torch.cat([q_nope, q_rope], -1)  # [B, T, H, dn + dr]
    return attention_ref(q, k, v, causal=True, scale=(dn + q_rope.shape[-1]) ** -0.5)


def check_fixed_absorbed_attention(fn):
    """Check fn (the arguments of buggy_absorbed_attention) against the expanded attention."""
    g = torch.Generator().manual_seed(43)
    cases = []
    for B, T, S, H, dn, dr, dv, r in [(1, 1, 6, 2, 8, 4, 8, 32), (2, 3, 9, 3, 16, 8, 12, 48),
                                      (1, 4, 4, 4, 32, 16, 16, 24)]:
        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)
        cases.append((rnd(B, T, H, dn) * 2, rnd(B, T, H, dr) * 2, rnd(B, S, r), rnd(B, S, dr),
                      rnd(H * (dn + dv), r) / 2, dn, dv))
    check("the fixed absorbed attention", fn, _expanded_attention, cases, tol=1e-5,
          hint="absorption moves W_uk and W_uv but changes no score: which number in the "
               "function depends on the latent's size r, where the expanded attention's does not?")


# %% tags=["hide-input"]
#| export mla.exercises
@triton.jit
def score_tile_loads(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, S, H: tl.constexpr, DC: tl.constexpr,
                     DR: tl.constexpr, BLOCK_N: tl.constexpr):
    """Exercise 4's loads for program (blk, b) over contiguous q_latent [B, H, DC],
    q_rope [B, H, DR], kv_cache [B, S, DC], rope_cache [B, S, DR]: (q̃ [H, DC], qᴿ [H, DR],
    c [BLOCK_N, DC], kᴿ [BLOCK_N, DR] with zero rows past S, the positions n [BLOCK_N],
    lengths[b])."""
    blk, b = tl.program_id(0), tl.program_id(1)
    h, dc, dr = tl.arange(0, H), tl.arange(0, DC), tl.arange(0, DR)
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] the cache positions of this block
    in_cache = n[:, None] < S
    ql = tl.load(ql_ptr + b * H * DC + h[:, None] * DC + dc[None, :])
    qr = tl.load(qr_ptr + b * H * DR + h[:, None] * DR + dr[None, :])
    c = tl.load(kv_ptr + b * S * DC + n[:, None] * DC + dc[None, :], mask=in_cache, other=0.0)
    kr = tl.load(kr_ptr + b * S * DR + n[:, None] * DR + dr[None, :], mask=in_cache, other=0.0)
    return ql, qr, c, kr, n, tl.load(len_ptr + b)


@triton.jit
def score_tile_store(s_ptr, s, S, H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Exercise 4's store: s [H, BLOCK_N] of program (blk, b) into scores [B, H, S], columns < S."""
    blk, b = tl.program_id(0), tl.program_id(1)
    h, n = tl.arange(0, H), blk * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(s_ptr + b * H * S + h[:, None] * S + n[None, :], s, mask=n[None, :] < S)


def _naive_scores(ql, qr, kv, kr, lengths, scale):  # [B, H, S], -inf past each sequence's length
    s = (torch.einsum("bhd,bsd->bhs", ql, kv) + torch.einsum("bhd,bsd->bhs", qr, kr)) * scale
    past = torch.arange(kv.shape[1], device=kv.device)[None, :] >= lengths[:, None]  # [B, S]
    return s.masked_fill(past[:, None], float("-inf"))


def check_score_tile(kernel):
    """Launch kernel[(cdiv(S, BLOCK_N), B)] (the signature of my_score_tile_kernel) on a ragged
    batch and compare with the naive absorbed decode's scores, then softmax(scores) @ c with
    mla_decode_ref."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, DC, DR, S, BLOCK_N, scale = 4, 16, 32, 16, 37, 16, 0.3
    g = torch.Generator(device=dev).manual_seed(44)
    ql, qr = (torch.randn(B, H, d, generator=g, device=dev) for d in (DC, DR))
    kv, kr = (torch.randn(B, S, d, generator=g, device=dev) for d in (DC, DR))
    lengths = torch.tensor([37, 5, 16, 1], dtype=torch.int32, device=dev)
    out = torch.full((B, H, S), float("nan"), device=dev)
    kernel[(-(-S // BLOCK_N), B)](ql, qr, kv, kr, lengths, out, S, scale, H=H, DC=DC, DR=DR,
                                  BLOCK_N=BLOCK_N)
    ref = _naive_scores(ql, qr, kv, kr, lengths, scale)
    tol = 1e-4 if dev == "cpu" else 2e-2  # a GPU's fp32 tl.dot rounds its inputs to tf32
    finite = torch.isfinite(out) & torch.isfinite(ref)
    same = (out == ref) | (finite & ((out - ref).abs() <= tol * (1 + ref.abs())))
    if not bool(same.all()):
        b, h, n = (int(i) for i in (~same).nonzero()[0])
        got, want, length = out[b, h, n].item(), ref[b, h, n].item(), int(lengths[b])
        if want == float("-inf"):
            why = "positions at or past lengths[b] must be -inf (the length mask)"
        elif got == float("-inf"):
            why = f"position {n} < lengths[b] = {length} is in the sequence: it must not be masked"
        elif math.isnan(got):
            why = "never written"
        else:
            why = "the score is scale · (q̃·c + qᴿ·kᴿ): both terms, and the scale"
        raise ExerciseError(f"✗ score tile: sequence {b} (lengths[b] = {length}), head {h}, cache "
                            f"position {n}: "
                            f"got {got:.4g}, expected {want:.4g}; {why}")
    o = torch.einsum("bhs,bsd->bhd", out.softmax(-1), kv)  # the absorbed decode's latent output
    o_ref = mla_decode_ref(ql[:, None], qr[:, None], kv, kr, scale, lengths.long())[:, 0]
    if (o - o_ref).abs().max() > 10 * tol:
        raise ExerciseError("✗ score tile: the scores match but their softmax does not give "
                            "mla_decode_ref's output")
    print(f"✓ score tile: {B} sequences of lengths {lengths.tolist()} (cache of {S}), {H} heads: "
          f"the scores and "
          "the decode's output match")
