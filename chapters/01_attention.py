# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,mystnb,-execution
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
# # Chapter 1 — Attention and its cost
#
# Every sparse mechanism in this book is measured against one baseline: dense softmax attention. This chapter
# builds that baseline and its bill — the FLOPs it spends, the bytes it moves, the memory its KV cache holds —
# and then the kernel that keeps the bill as low as it can go: flash attention, in Triton.
#
# **Learning objectives.** After this chapter you can
#
# - write softmax attention as a reference spec: causal and sliding-window masks, GQA, RoPE, a KV cache;
# - count its FLOPs, bytes and KV-cache size exactly, and say when it is compute-bound and when memory-bound;
# - compute a softmax one block of keys at a time (online softmax) and turn that into a tiled Triton kernel;
# - say which tiles a causal or sliding-window kernel skips, and why the backward recomputes instead of storing;
# - assemble the attention layer of current open models (GQA, q/k norm, Qwen3-Next's output gate).
#
# **Prerequisites.** Chapter 0 (the map of the book). Matrix products, the softmax and the chain rule; Python and
# PyTorch. No GPU and no Triton experience: on a CPU the kernels run in Triton's interpreter.
#
# **Time.** About 90 minutes for the core path (sections 1.1–1.7), plus an hour for the exercises. The
# *Engineering notes* at the end (checks, loop bounds, backward kernels, launch configurations, loaders) are optional.
#
# **Roadmap.**
#
# - 1.1 *Why*: attention's FLOPs grow as $T^2$ and its KV cache as $T$ — two pictures at real models' shapes.
# - 1.2 *Naive*: the equations as code — masks, softmax, GQA, RoPE, the KV cache.
# - 1.3 *See it*: masks, attention on a toy sentence, an explorer.
# - 1.4 *Cost model*: FLOPs, bytes and arithmetic intensity, for prefill and for decoding.
# - 1.5 *Fast*: online softmax, flash attention tile by tile, the Triton forward kernel, the backward in brief.
# - 1.6 *Layer*: the `Attention` module with its KV cache, checked against one-pass prefill.
# - 1.7 *Measure*: the kernels against SDPA and `flex_attention` on an H200.
# - 1.8 *Exercises*: merge softmax states, fix a decoding mask, size a hybrid cache, write a tile loop in Triton.
#
# What you build lands in `minisparse.attention`, so later chapters import it. Tensors are `[B, T, H, D]` (batch,
# time, heads, head dim), as in fla. On a CPU the chapter runs at small "reading sizes" in a few minutes.

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
import matplotlib.pyplot as plt
import torch

from minisparse import bench, runtime, viz
from minisparse.testing import assert_close, attempt, make_qkv

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

# %% [markdown]
# ## 1.1 Why: attention compares every token with every other
#
# For one head, query $q_t$ scores every key $k_s$ it may see, turns the scores into probabilities and averages
# the values with them:
#
# $$
# o_t = \sum_{s \le t} p_{ts}\, v_s, \qquad
# p_{ts} = \frac{\exp(q_t \cdot k_s / \sqrt{D})}{\sum_{s' \le t} \exp(q_t \cdot k_{s'} / \sqrt{D})} .
# $$
#
# With $T$ tokens that is $T(T+1)/2$ query–key pairs per head (causal), each costing a $D$-long dot product for
# the score and a $D$-long multiply-add for the value: the cost grows as $T^2$. Everything else in a block — the
# $q, k, v, o$ projections and the feed-forward network — touches each token on its own and grows as $T$; at some
# length the quadratic term takes over.
#
# The second bill comes at generation time. Token $t+1$ needs $k_s, v_s$ of every earlier token in every layer;
# they are kept rather than recomputed: the **KV cache**, $2 \times L \times H_{kv} \times D$ elements per token
# ($2$ for $K$ and $V$, $L$ layers, $H_{kv}$ key/value heads). Three designs trade quality for cache size:
# **MHA** (multi-head attention, one K/V head per query head, Vaswani et al.), **MQA** (multi-query attention:
# one K/V head shared by all query heads, Shazeer 2019) and **GQA** (grouped-query attention: $H_{kv}$ groups in
# between, Ainslie et al. 2023). The shapes below are those of real checkpoints (E.1 checks them against
# `transformers`' configuration classes, whose defaults are those models' shapes).

# %%
MODELS = {  # kv_layers = layers that keep a KV cache
    "Llama-2-7B (MHA)": dict(config="LlamaConfig", kv_layers=32, heads=32, kv_heads=32,
                             head_dim=128, window=None),
    "Mistral-7B (GQA 4:1)": dict(config="MistralConfig", kv_layers=32, heads=32, kv_heads=8,
                                 head_dim=128, window=4096),
    "Falcon-7B (MQA)": dict(config="FalconConfig", kv_layers=32, heads=71, kv_heads=1,
                            head_dim=64, window=None),
    "Qwen3-Next-80B-A3B (GQA 8:1)": dict(config="Qwen3NextConfig", kv_layers=12, heads=16,
                                         kv_heads=2, head_dim=256, window=None),
}
LLAMA = dict(hidden=4096, heads=32, head_dim=128, ffn=11008)  # Llama-2-7B's layer, for the FLOPs

# %% [markdown]
# Qwen3-Next keeps a KV cache in only 12 of its 48 layers (the other 36 are Gated DeltaNet layers, chapter 5);
# Mistral-7B v0.1's window caps its cache at 4096 tokens per layer (later versions attend to everything). Two pictures of one Llama-2-7B layer in bf16
# (back-of-envelope; section 1.4 makes it exact): FLOPs of one forward pass, and bytes — the weights, the
# $q, k, v, o$ activations, and the $T \times T$ score matrix *if* it were written to memory, as naive code does.

# %%
def finish(ax, ylabel, title, xlabel="sequence length T"):
    """Labels, a log2 token axis and a legend: the plots of this chapter against T."""
    ax.set(ylabel=ylabel, title=title)
    viz.tokens_axis(ax, xlabel)
    ax.legend(fontsize=7)


T_axis = [2**i for i in range(8, 18)]  # 256 … 131072 tokens
d, H, D, F = LLAMA["hidden"], LLAMA["heads"], LLAMA["head_dim"], LLAMA["ffn"]
attn = [2 * H * 2 * D * T * (T + 1) / 2 for T in T_axis]              # q·k and p·v, causal pairs
linear = [2 * T * d * (4 * H * D) + 2 * T * d * F * 3 for T in T_axis]  # projections + SwiGLU
cross = next(T for T in range(1, 10**6, 64)
             if 2 * H * D * T * (T + 1) >= 2 * T * d * (4 * H * D + 3 * F))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.loglog(T_axis, attn, "o-", label="attention core  (∝ T²)")
ax1.loglog(T_axis, linear, "s-", label="projections + FFN  (∝ T)")
ax1.axvline(cross, color="gray", ls=":")
ax1.text(cross * 1.1, min(linear), f"equal at T ≈ {cross / 1000:.0f}k", fontsize=8)
finish(ax1, "FLOPs per layer (forward)", "Llama-2-7B layer: FLOPs")
ax2.loglog(T_axis, [H * T * T * 2 for T in T_axis], "o-", label="T×T scores, if materialized")
ax2.loglog(T_axis, [T * 4 * H * D * 2 for T in T_axis], "s-", label="q, k, v, o activations")
ax2.loglog(T_axis, [(4 * d * H * D + 3 * d * F) * 2] * len(T_axis), "--", label="layer weights")
ax2.axhline(141e9, color="red", lw=0.8)
ax2.text(T_axis[0], 141e9 / 3, "H200 memory (141 GB)", fontsize=8, color="red", va="top")
finish(ax2, "bytes per layer (bf16)", "Llama-2-7B layer: bytes")
fig.tight_layout()
plt.show()
print(f"at T = 32k one layer's score matrix is {H * 32768**2 * 2 / 1e9:.0f} GB")

# %% [markdown]
# The FLOPs cross over at about fifty thousand tokens. The bytes are another story: a materialized score matrix
# outgrows the layer's weights at a couple of thousand tokens and would fill half an H200 at 32k — so section 1.5's
# flash attention keeps each tile of scores on chip and never stores the matrix. Now the cache:

# %%
def cache_bytes_per_token(m, dtype_bytes=2):
    return 2 * m["kv_layers"] * m["kv_heads"] * m["head_dim"] * dtype_bytes


fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw=dict(width_ratios=[1, 1.3]))
names = list(MODELS)
per_token = [cache_bytes_per_token(MODELS[n]) / 1024 for n in names]
ax1.barh(names, per_token, color=["C0", "C1", "C2", "C3"])
for y, kib in enumerate(per_token):
    ax1.text(kib, y, f" {kib:.0f} KiB", va="center", fontsize=8)
ax1.invert_yaxis()
ax1.set(xlabel="KV cache per token (KiB, bf16)", title="every generated token adds this",
        xlim=(0, max(per_token) * 1.3))
context = [2**i for i in range(10, 19)]  # 1k … 256k tokens
for i, n in enumerate(names):
    w = MODELS[n]["window"]
    gib = [cache_bytes_per_token(MODELS[n]) * min(T, w or T) / 2**30 for T in context]
    ax2.loglog(context, gib, "o-", color=f"C{i}", label=n + (f", window {w}" if w else ""))
ax2.axhline(141e9 / 2**30, color="red", lw=0.8)
ax2.text(context[0], 141e9 / 2**30 / 1.5, "H200 memory", fontsize=8, color="red", va="top")
finish(ax2, "KV cache (GiB, one sequence)", "the whole context", "context length (tokens)")
fig.tight_layout()
plt.show()

# %% [markdown]
# An MHA model the size of Llama-2-7B would need a whole H200 for the cache of one 256k-token sequence. GQA divides
# the cache by the group size, MQA by the number of heads; a window caps it; a hybrid such as Qwen3-Next removes it
# from most layers. Later chapters attack these numbers: MLA compresses the cache (chapter 3), linear attention
# replaces it with a fixed-size state (chapters 4–6), sparse attention reads only part of it (chapters 7–8).
#
# None of the models in the survey [S] drops softmax attention altogether. Qwen3-Next and Qwen3.5 keep it in one
# layer of four (the gated attention of section 1.6), Kimi Linear in one of four (as MLA), MiniMax-M1 in one of
# eight; DeepSeek-V3.2 and GLM-5 keep it in every layer but let each query read only selected tokens; MiniMax went
# back to full attention in every layer for M2. This chapter's dense layer is the reference for all of them.
#
# ## 1.2 Naive: attention as the equations say
#
# ### 1.2.1 Who may attend to whom
#
# A mask says which key positions each query may use. We place queries at the **end** of the keys: with $T_q$
# queries and $T_k \ge T_q$ keys, query $i$ sits at position $i + T_k - T_q$. That is the situation of decoding
# with a KV cache (the new tokens come after the cached ones); when $T_q = T_k$ it is the usual lower-triangular
# mask of `scaled_dot_product_attention(is_causal=True)`. With a sliding window of length $W$, the query at
# position $t$ sees the keys $t - W < s \le t$: itself and the $W - 1$ tokens before it (the sliding-window layers
# of Mistral 7B, Gemma 2/3 and gpt-oss; transformers' mask is the same). $W = 1$ sees only itself; $W \ge T$ is
# plain causal attention.

# %%
#| export attention.naive
import torch
import torch.nn as nn

from minisparse import _checks  # the book's shared argument checks


def attention_mask(Tq, Tk=None, causal=True, window=None, device=None):
    """Boolean mask [Tq, Tk], True where query i may attend to key s.

    Query i sits at position i + Tk - Tq (bottom-right aligned, as when decoding after a KV cache).
    causal: keys s <= position; window W (needs causal): keys position - W < s <= position.
    """
    Tk = Tq if Tk is None else Tk
    _check_window("attention_mask", causal, window)
    pos_q = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)  # [Tq, 1]  each query's position
    pos_k = torch.arange(Tk, device=device)[None, :]  # [1, Tk]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)  # [Tq, Tk]
    if causal:
        allowed &= pos_k <= pos_q
    if window is not None:
        allowed &= pos_k > pos_q - window
    return allowed


# %% [markdown]
# ### 1.2.2 Scores, softmax, output
#
# With the scale $\sigma$ (default $D^{-1/2}$) and the mask $M$:
#
# $$
# S = \sigma\, Q K^\top, \qquad P = \operatorname{softmax}_{\text{rows}}\bigl(S + \log M\bigr), \qquad O = P V ,
# $$
#
# where $\log M$ is $0$ where the mask allows and $-\infty$ elsewhere. With **GQA**, $H_q$ query heads share
# $H_{kv}$ key/value heads in groups of $G = H_q / H_{kv}$: query head $h$ reads K/V head $\lfloor h / G \rfloor$
# (the convention of transformers' `repeat_kv` and of SDPA's `enable_gqa`). The reference repeats K and V $G$ times;
# the kernel of section 1.5 will index the shared head instead. Every public op first checks its arguments
# (naming the argument, what was expected and what came); those checks are in the Engineering notes (E.2):

# %%
from minisparse.attention.naive import _check_rope_args, _check_window, check_attention_args

# %% [markdown]
# Then the probabilities $P$, in fp32 whatever the input dtype (a bf16 softmax over thousands of keys loses the
# small probabilities), and the output $O = PV$:

# %%
#| export attention.naive
def _probabilities(q, k, causal, scale, window):
    B, Tq, HQ, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    k = k.repeat_interleave(HQ // HKV, dim=2)  # [B, Tk, HQ, D]  query head h reads K/V head h // G
    s = torch.einsum("bthd,bshd->bhts", q.to(acc), k.to(acc)) * scale  # [B, HQ, Tq, Tk]
    allowed = attention_mask(Tq, Tk, causal, window, device=q.device)  # [Tq, Tk]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1)  # [B, HQ, Tq, Tk]


def attention_weights(q, k, causal=True, scale=None, window=None):
    """Attention probabilities P [B, HQ, Tq, Tk] (fp32) of q [B,Tq,HQ,D] over k [B,Tk,HKV,D]."""
    scale = check_attention_args("attention_weights", q, k, None, causal, window, scale)
    return _probabilities(q, k, causal, scale, window)


def attention_ref(q, k, v, causal=True, scale=None, window=None):
    """Softmax attention, the spec every kernel is tested against.

    q [B, Tq, HQ, D], k [B, Tk, HKV, D], v [B, Tk, HKV, Dv] -> o [B, Tq, HQ, Dv] in q's dtype.
    GQA: HKV divides HQ. causal is bottom-right aligned (query i at position i + Tk - Tq).
    window W: keys position - W < s <= position. Softmax and accumulation in fp32.
    """
    scale = check_attention_args("attention_ref", q, k, v, causal, window, scale)
    HQ, HKV = q.shape[2], k.shape[2]
    p = _probabilities(q, k, causal, scale, window)  # [B, HQ, Tq, Tk]
    v = v.repeat_interleave(HQ // HKV, dim=2).to(p.dtype)  # [B, Tk, HQ, Dv]
    o = torch.einsum("bhts,bshd->bthd", p, v)  # [B, Tq, HQ, Dv]
    return o.to(q.dtype).contiguous()

# %% [markdown]
# Is it right? PyTorch's `scaled_dot_product_attention` (SDPA) is an independent implementation on `[B, H, T, D]`;
# `tests/test_attention.py` does the same for GQA, windows and $T_q < T_k$.

# %%
q, k, v = make_qkv(2, 37, 4, 16, HKV=2, dtype=torch.float64)
sdpa = torch.nn.functional.scaled_dot_product_attention(
    *(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True).transpose(1, 2)
err = assert_close("attention_ref", sdpa, attention_ref(q, k, v), 1e-12)
print(f"relative RMS error vs SDPA: {err:.1e}")

# %% [markdown]
# ### 1.2.3 Rotary position embeddings (RoPE)
#
# Attention as written is blind to order: permute the keys and values together and nothing changes. RoPE
# (Su et al., RoFormer) encodes position by *rotating* $q$ and $k$. Split a head's $D$ channels into $D/2$ pairs,
# and rotate pair $j$ of the vector at position $t$ by the angle $t\,\omega_j$, with frequencies
#
# $$
# \omega_j = \theta^{-2j/D}, \qquad j = 0, \dots, D/2 - 1 ,
# $$
#
# where the base $\theta$ is $10\,000$ by default (Llama 3, Mixtral and Qwen use $5 \cdot 10^5$ to $10^6$).
#
# In complex form, a pair is $z_j = x_a + i\,x_b$ and RoPE multiplies it by $e^{i t \omega_j}$. A rotation of $q$
# by $t\omega$ and of $k$ by $s\omega$ leaves their dot product depending on $t - s$ only:
#
# $$
# \operatorname{Re}\!\left[(z^q_j e^{i t \omega_j})\,\overline{(z^k_j e^{i s \omega_j})}\right]
# = \operatorname{Re}\!\left[z^q_j\, \overline{z^k_j}\, e^{i (t - s) \omega_j}\right],
# $$
#
# so scores see relative positions, while each key is rotated once, by its own position — which is why a KV cache
# can store keys *after* RoPE. Which channels form a pair is a convention, and checkpoints depend on it:
#
# - **interleaved**: pairs $(x_{2j}, x_{2j+1})$ — the RoFormer paper, GPT-J, Meta's original Llama code;
# - **half-split**: pairs $(x_j, x_{j + D/2})$ — GPT-NeoX, and transformers' `rotate_half` for Llama, Mistral,
#   Qwen. This is our default.

# %%
#| export attention.naive
def rope_frequencies(dim, theta=10000.0, dtype=torch.float32, device=None):
    """RoPE's angular frequencies omega_j = theta^(-2j/dim), j = 0 .. dim/2 - 1  ->  [dim/2]."""
    exponents = torch.arange(0, dim, 2, device=device).to(dtype) / dim  # [dim/2]  2j/dim
    return 1.0 / theta**exponents


def _rotate(x, cos, sin, interleaved):
    """Rotate the channel pairs of x [..., D] by angles whose cos/sin are [..., D/2]."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (x[2j], x[2j+1])
    else:
        x1, x2 = x.chunk(2, dim=-1)  # pairs (x[j], x[j + D/2])
    r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos  # (x1 + i x2) * e^{i angle}
    if interleaved:
        return torch.stack((r1, r2), dim=-1).flatten(-2)
    return torch.cat((r1, r2), dim=-1)


def apply_rope(x, positions, theta=10000.0, interleaved=False):
    """Rotary position embedding of x [B, T, H, D] at positions [T] or [B, T]; computed in fp32,
    returned in x's dtype.

    interleaved=False pairs channels (j, j + D/2) (GPT-NeoX, Llama in transformers);
    interleaved=True pairs (2j, 2j + 1) (RoFormer, GPT-J).
    """
    _check_rope_args("apply_rope", x, positions)
    _checks.positive_float("apply_rope", "theta", theta)
    acc = torch.promote_types(x.dtype, torch.float32)
    omega = rope_frequencies(x.shape[-1], theta, acc, x.device)  # [D/2]
    angles = positions.to(acc)[..., None] * omega  # [T, D/2] or [B, T, D/2]
    angles = angles.expand(x.shape[0], *angles.shape[-2:])[:, :, None, :]  # [B, T, 1, D/2]
    return _rotate(x.to(acc), angles.cos(), angles.sin(), interleaved).to(x.dtype)

# %% [markdown]
# A check of the claim: the scores depend on the offset only (`tests/test_attention.py` also checks both
# conventions against the complex formula, against transformers, and against each other up to a channel
# permutation).

# %%
x = torch.randn(1, 1, 1, 64, dtype=torch.float64).expand(1, 9, 1, 64)  # one vector, at 9 positions
qr, kr = apply_rope(x, torch.arange(9)), apply_rope(x, torch.arange(100, 109))
score = qr[0, :, 0] @ kr[0, :, 0].T  # [9, 9]: query at position t, key at position 100 + s
for off in range(-8, 9):  # every diagonal (a fixed offset t - s) is constant
    diag = score.diagonal(off)
    assert torch.allclose(diag, diag[0].expand_as(diag)), off
print("✓ RoPE scores depend on t - s only")

# %% [markdown]
# ### 1.2.4 The KV cache
#
# When decoding, each step brings $T_{new}$ tokens (one, or a chunk of a prompt). Their keys and values are
# computed once, rotated by RoPE at their positions, and written after the cached ones; the new queries attend to
# everything cached so far, bottom-right aligned. `KVCache` preallocates `[B, max_len, H_kv, D]`, so no step copies
# the past; `append(k, v)` writes the new tokens and returns all of them (code in E.3; section 1.6 uses it).
#
# ## 1.3 See it
#
# ### 1.3.1 Masks
#
# The four masks of this chapter on 16 tokens (blue = may attend). The third is a decoding step: 4 new queries
# after 12 cached tokens, bottom-right aligned. (E.1 draws which K/V head each query head reads under GQA.)

# %%
fig = viz.mask_panel({
    "causal": attention_mask(16, 16),
    "sliding window W = 4": attention_mask(16, 16, window=4),
    "decode: 4 queries, 16 keys": attention_mask(4, 16),
    "bidirectional (encoder)": attention_mask(16, 16, causal=False),
})
fig.axes[2].set_yticks(range(4), [f"{12 + i}" for i in range(4)])  # new queries: positions 12..15
plt.show()

# %% [markdown]
# ### 1.3.2 Attention on a toy sentence, explored
#
# No trained model is needed to see what content and position each contribute. Give each word a random embedding
# $e_w \in \mathbb{R}^{32}$ and build three heads by hand, with $q_t = k_t$:
#
# - **content**: $e_{w_t}$ — a word attends to the copies of itself seen so far;
# - **position**: the same vector $u$ everywhere, then RoPE — the score depends only on the distance and decays;
# - **content + RoPE**: $\mathrm{RoPE}_t(e_{w_t})$ — the same copies, now weighted by how far back they are.

# %%
words = "the cat sat on the mat and the dog sat on the cat while a cat sat".split()
vocab = sorted(set(words))
T_toy, D_toy = len(words), 32
emb = torch.randn(len(vocab), D_toy, generator=torch.Generator().manual_seed(3))  # [V, D]
content = 1.2 * emb[[vocab.index(w) for w in words]][None, :, None, :]  # [1, T, 1, D]
HEADS = {"content": content,
         "position (RoPE)": apply_rope(1.3 * torch.ones(1, T_toy, 1, D_toy), torch.arange(T_toy)),
         "content + RoPE": apply_rope(content, torch.arange(T_toy))}
toy = torch.cat(list(HEADS.values()), dim=2)  # [1, T, 3, D]: q = k for the three heads

# %% [markdown]
# Move the window: from $W = 17$ (the sentence's length, where the slider starts) up, the mask is plain causal. The
# content head splits each word's attention equally among its copies so far, itself included (the last "sat" gives
# a third to each of the three); the position head is a soft band along the diagonal; content + RoPE tilts the
# content head's choices towards nearby copies — itself first — though not strictly by distance (the last "the"
# gives its oldest copy more than the two nearer ones: RoPE's preference for nearby tokens holds on average, not
# pair by pair). As $W$ shrinks below the distance to a word's earlier copy, the content heads lose it. (Why RoPE prefers nearby tokens: E.3.)

# %% tags=["nbval-ignore-output"]
def draw(window=T_toy):
    P = attention_weights(toy, toy, window=window)[0]  # [3, T, T]
    fig = viz.panels({f"{name}, W = {window}": P[h] for h, name in enumerate(HEADS)}, size=3.6,
                     vmin=0, vmax=1)
    for ax in fig.axes[:3]:  # the heatmaps (the colour bars come after)
        ax.set_xticks(range(T_toy), words, rotation=90, fontsize=7)
        ax.set_yticks(range(T_toy), words, fontsize=7)
    fig.tight_layout()
    plt.show()


explorer = viz.explorer(draw, window=(1, 2 * T_toy - 1, 1))  # starts in the middle: W = T

# %% [markdown]
# ## 1.4 Cost model
#
# Now the exact counts. A mask allows some number of query–key pairs $N_{pairs}$; each costs $2D$ FLOPs for the
# score and $2D_v$ for the weighted value (a multiply and an add per channel), so one forward pass costs
#
# $$
# \text{FLOPs} = 2\,B\,H_q\,(D + D_v)\,N_{pairs}, \qquad
# N_{pairs} = \begin{cases} T_q T_k & \text{bidirectional} \\ \sum_{i} \min(p_i + 1, W) & \text{causal, window } W \end{cases}
# $$
#
# with $p_i = i + T_k - T_q$ the query's position ($W = \infty$ without a window). For $T_q = T_k = T$ causal
# attention has $T(T+1)/2$ pairs, about half of $T^2$; a window makes it about $T W$, linear in $T$. Softmax's
# exponentials are not matmul FLOPs; we leave them out, as the FlashAttention papers do. The backward pass has five
# matmuls against the forward's two: about $2.5\times$ the forward.
#
# Bytes: inputs and outputs must cross between GPU memory (HBM) and the chip at least once,
# $(T_q H_q D + T_k H_{kv}(D + D_v) + T_q H_q D_v)$ elements. A naive implementation also writes $S$, reads it for
# the softmax, writes $P$ and reads it for $PV$: four passes over $B H_q T_q T_k$ elements. Flash attention
# (section 1.5) reaches the lower bound.

# %%
#| export attention.cost
from minisparse import _checks


def _pairs_up_to(n, window):
    """Pairs of the first n positions, causal (+ window): sum_{p<n} min(p + 1, window)."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attended_pairs(Tq, Tk=None, causal=True, window=None):
    """How many (query, key) pairs the mask allows (queries at positions Tk - Tq .. Tk - 1)."""
    Tk = Tq if Tk is None else Tk
    _checks.positive_int("attended_pairs", "Tq", Tq, zero=True)
    _checks.positive_int("attended_pairs", "Tk", Tk, zero=True)
    if window is not None:
        _checks.positive_int("attended_pairs", "window", window)
    if not causal:
        if window is not None:
            raise ValueError(f"attended_pairs: window={window} requires causal=True")
        return Tq * Tk
    if Tq > Tk:
        raise ValueError(f"attended_pairs: causal needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    return _pairs_up_to(Tk, window) - _pairs_up_to(Tk - Tq, window)


def attention_flops(T, D, H, causal=True, window=None, *, Tk=None, Dv=None, B=1):
    """Forward matmul FLOPs of softmax attention: 2·B·H·(D + Dv) per allowed (query, key) pair;
    T = queries."""
    Dv = D if Dv is None else Dv
    return 2 * B * H * (D + Dv) * attended_pairs(T, Tk, causal, window)


def attention_bytes(T, D, H, HKV=None, *, Tk=None, Dv=None, B=1, dtype_bytes=2, materialize=True):
    """HBM bytes of one forward: read q, k, v and write o; plus, if materialize (naive attention),
    write S, read S, write P, read P — four passes over B·H·T·Tk scores. materialize=False: flash
    attention's lower bound.
    """
    HKV = H if HKV is None else HKV
    Tk = T if Tk is None else Tk
    Dv = D if Dv is None else Dv
    elements = B * (T * H * D + Tk * HKV * (D + Dv) + T * H * Dv)
    if materialize:
        elements += 4 * B * H * T * Tk
    return elements * dtype_bytes


# %% [markdown]
# The model agrees with section 1.1's back-of-envelope numbers, with the FlashAttention-2 paper's convention
# ($4 T^2 D H$ FLOPs for bidirectional attention, half of it causal), and with brute-force counting of the mask:

# %%
assert attended_pairs(5, 9, window=3) == int(attention_mask(5, 9, window=3).sum())
assert attended_pairs(7, 7, causal=False) == int(attention_mask(7, 7, causal=False).sum())
assert attention_flops(4096, 128, 32, causal=False) == 4 * 4096**2 * 128 * 32
assert abs(attention_flops(2**16, 128, 32) / (2 * 2**32 * 128 * 32) - 1) < 1e-4
assert [attention_flops(T, D, H) for T in T_axis] == attn  # section 1.1's curve
print("✓ cost model agrees with the mask, the back-of-envelope numbers and the FA2 convention")

# %% [markdown]
# At Llama-2-7B's shapes: a window of 4096 bends the FLOP curve back to linear. On the right, *arithmetic
# intensity* — FLOPs per byte moved. A kernel above the H200's ridge point (693 TFLOP/s ÷ 4.25 TB/s ≈ 163 FLOP/B,
# measured on our machine) is limited by compute, below it by memory bandwidth.

# %%
ridge = 693e12 / 4.25e12  # Llama-2-7B's d, H, D, F and T_axis from section 1.1
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for window, style in [(None, "o-"), (4096, "s-")]:
    ax1.loglog(T_axis, [attention_flops(T, D, H, window=window) for T in T_axis], style,
               label=f"window {window}" if window else "dense causal")
ax1.loglog(T_axis, linear, "--", label="projections + FFN")  # section 1.1's line (helpers: E.1)
finish(ax1, "FLOPs per layer (forward)", "FLOPs")
for materialize, label in [(True, "naive (scores in HBM)"), (False, "flash (IO lower bound)")]:
    ax2.loglog(T_axis, [attention_flops(T, D, H) / attention_bytes(T, D, H, materialize=materialize)
                        for T in T_axis], "o-", label=label)
ax2.axhline(ridge, color="red", lw=0.8)
ax2.text(T_axis[-1], ridge / 1.3, "H200 ridge point", color="red", fontsize=8, ha="right", va="top")
finish(ax2, "FLOPs / byte", "arithmetic intensity (prefill, bf16)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Naive attention's intensity levels off at $D/4 = 32$ FLOP/B (causal, bf16: $\approx 2 D T^2$ FLOPs per head
# against $4 \times 2\,T^2$ bytes of scores): memory-bound at every length, however fast the tensor cores.
# Flash attention's intensity grows with $T$ and passes the ridge point within the first thousand tokens.
#
# Decoding is different. One new query per sequence reads the whole cache: $4 H_q D T$ FLOPs against
# $2 H_{kv} D T$ bf16 elements, $4 H_{kv} D T$ bytes, so the intensity is $H_q / H_{kv}$ FLOP/B — the GQA group
# size, **whatever the kernel**. Decoding is memory-bound; GQA and MQA help twice, with a smaller cache and more
# work per byte read:

# %%
for name, m in MODELS.items():  # one new token after 32k cached ones
    shape = (1, m["head_dim"], m["heads"])
    intensity = attention_flops(*shape, Tk=32768) / attention_bytes(
        *shape, m["kv_heads"], Tk=32768, materialize=False)
    print(f"{name:30s} decode intensity {intensity:6.1f} FLOP/B   (ridge {ridge:.0f})")

# %% [markdown]
# ## 1.5 Fast: flash attention in Triton
#
# The naive reference writes the whole $T_q \times T_k$ score matrix to memory, reads it back for the softmax,
# writes the probabilities and reads them again for $PV$. Flash attention (Dao et al., 2022; FlashAttention-2,
# 2023) computes the same output **tile by tile**: a block of queries meets one block of keys at a time, the
# scores of that pair of blocks live in registers, and a small running state per query row carries the softmax
# from one key block to the next. Nothing of size $T^2$ reaches memory. The loop-bound arithmetic, the backward
# kernels and the launch plumbing are in the Engineering notes; on a CPU every kernel runs in Triton's interpreter.

# %% [markdown]
# ### 1.5.1 A Triton primer
#
# A Triton kernel is a Python function under `@triton.jit`, launched on a **grid** of *programs* (CUDA's thread
# blocks); each reads its index with `tl.program_id(axis)` and works on whole **blocks** of numbers at once —
# `tl.arange(0, BLOCK)` is a vector of `BLOCK` indices, and arithmetic on it is elementwise, as in NumPy. Block
# sizes are compile-time constants (`tl.constexpr`), powers of two. A tensor argument arrives as a pointer to its
# first element, `X + offsets` is a block of pointers, `tl.load` and `tl.store` read and write them, and a **mask**
# switches off the lanes that fall outside the tensor (the last block usually sticks out past the end).

# %%
import triton
import triton.language as tl

from minisparse.testing import TOLERANCES  # relative RMS error bounds: (forward, gradients)


@triton.jit
def add_kernel(X, Y, OUT, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # which block of the vector this program owns
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] element indices
    inside = offs < n  # [BLOCK] bool: the last block may stick out past the end
    x = tl.load(X + offs, mask=inside, other=0.0)
    y = tl.load(Y + offs, mask=inside, other=0.0)
    tl.store(OUT + offs, x + y, mask=inside)


x, y = torch.randn(1000, device=DEVICE), torch.randn(1000, device=DEVICE)
out = torch.empty_like(x)
add_kernel[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)  # grid: 4 programs of 256 lanes
assert torch.equal(out, x + y)
print("✓ vector add: 4 programs of 256 lanes cover 1000 elements")

# %% [markdown]
# Attention is made of matrix products. `tl.dot(a, b)` multiplies two tiles — $B_M \times B_K$ by $B_K \times B_N$,
# loaded through 2-D offsets such as `rows[:, None] * n_cols + ks[None, :]` (element $(r, c)$ of a row-major matrix
# with `n_cols` columns sits at `r * n_cols + c`) — on the tensor cores, accumulating in fp32 (E.4 builds a tiled
# matrix product). Program ids, blocks of offsets, masked loads and stores, `tl.dot` and a
# loop: that is all the Triton the attention kernels need. What remains is the algorithm.
#
# ### 1.5.2 Online softmax, on one row
#
# One query's scores $s_j$ and values $v_j$ give $o = \sum_j e^{s_j} v_j / \sum_j e^{s_j}$, computed stably by
# subtracting the row's maximum first. Flash attention sees the scores one **block** at a time, so it keeps a
# state per row — the running maximum $m$, sum $\ell$ and output $a$ (exercise 1 merges two such states):
#
# $$
# m' = \max\bigl(m,\ \max_{j \in \text{block}} s_j\bigr), \qquad
# \ell' = e^{m - m'}\,\ell + \sum_{j \in \text{block}} e^{s_j - m'}, \qquad
# a' = e^{m - m'}\,a + \sum_{j \in \text{block}} e^{s_j - m'}\, v_j .
# $$
#
# The factor $e^{m - m'} \le 1$ rescales what was summed under the old maximum. After the last block,
# $o = a / \ell$, and the **log-sum-exp** $L = m + \log \ell = \log \sum_j e^{s_j}$ is one number per row that
# recreates any probability later: $p_j = e^{s_j - L}$. The backward pass will rely on that.
#
# ### 1.5.3 Flash attention in plain PyTorch, tile by tile
#
# Now the update runs on whole tiles. Queries are cut into tiles of $B_M$ rows, keys and values into tiles of $B_N$
# rows. For each (batch, query head, query tile) — the triple one kernel program will own — we load the query tile
# once and stream over the key tiles, updating the state of all $B_M$ rows at once. GQA needs no copy of K and V:
# query head $h$ reads K/V head $\lfloor h / G \rfloor$. Tiles the mask empties are skipped; the others are masked
# with $-\infty$. The check compares $O$ with `attention_ref` and $L$ with `torch.logsumexp` of the masked scores.
#
# One detail differs from 1.5.2: the running maximum starts at a large *finite* negative number. With a window,
# the first key tile a row visits can be entirely masked for that row; from $-\infty$ the update would compute
# $e^{-\infty - (-\infty)}$ = NaN, from $-10^{30}$ it computes $e^{-\infty} = 0$ and $e^{0} = 1$: nothing changes.

# %%
def flash_attention_torch(q, k, v, causal=True, scale=None, window=None, block_m=32, block_n=32):
    """Flash attention's algorithm in PyTorch loops: o [B, Tq, HQ, Dv], lse [B, HQ, Tq] (base e)."""
    B, Tq, HQ, D = q.shape
    Tk, HKV, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D**-0.5 if scale is None else scale
    allowed = attention_mask(Tq, Tk, causal, window, device=q.device)  # [Tq, Tk], read tile by tile
    o = torch.empty(B, Tq, HQ, Dv, device=q.device)
    lse = torch.empty(B, HQ, Tq, device=q.device)
    for b in range(B):
        for h in range(HQ):
            h_kv = h // (HQ // HKV)  # GQA: the K/V head this query head reads
            for i0 in range(0, Tq, block_m):  # ── one kernel program from here ──
                q_tile = q[b, i0:i0 + block_m, h].float()  # [bm, D], loaded once
                rows = len(q_tile)
                m = torch.full((rows,), -1e30, device=q.device)  # finite start: see above
                l, acc = torch.zeros(rows, device=q.device), torch.zeros(rows, Dv, device=q.device)
                for j0 in range(0, Tk, block_n):
                    keep = allowed[i0:i0 + block_m, j0:j0 + block_n]  # [bm, bn]
                    if not keep.any():
                        continue  # a tile the mask empties: the kernel's loop bounds never reach it
                    k_tile = k[b, j0:j0 + block_n, h_kv].float()  # [bn, D]
                    v_tile = v[b, j0:j0 + block_n, h_kv].float()  # [bn, Dv]
                    s = (scale * q_tile @ k_tile.T).masked_fill(~keep, float("-inf"))  # [bm, bn]
                    m_new = torch.maximum(m, s.max(dim=1).values)  # [bm]
                    p = torch.exp(s - m_new[:, None])  # [bm, bn]
                    alpha = torch.exp(m - m_new)  # [bm]
                    l, acc, m = alpha * l + p.sum(dim=1), alpha[:, None] * acc + p @ v_tile, m_new
                o[b, i0:i0 + block_m, h] = acc / l[:, None]
                lse[b, h, i0:i0 + block_m] = m + torch.log(l)
    return o.to(q.dtype), lse


q, k, v = make_qkv(1, 100, 4, 32, HKV=2, Dv=24, device=DEVICE, dtype=torch.float32)
scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, dim=2)) / 32**0.5  # [B, H, T, T]
for causal, window in [(True, None), (True, 20), (False, None)]:
    o_tiles, lse = flash_attention_torch(q, k, v, causal=causal, window=window)
    err = assert_close("o", attention_ref(q, k, v, causal=causal, window=window), o_tiles, 1e-5)
    allowed = attention_mask(100, 100, causal, window, device=DEVICE)
    assert_close("L", scores.masked_fill(~allowed, float("-inf")).logsumexp(-1), lse, 1e-6)
    print(f"✓ tile by tile = attention_ref (causal={causal}, window={window}): error {err:.1e}")

# %% [markdown]
# What one program of the kernel does: its query tile is loaded once; the key and value tiles stream past it; each
# tile's scores exist only on chip, long enough to update the running state; after the last tile the state becomes
# the output tile and one log-sum-exp per row.

# %%
Box, grey = viz.Box, dict(h=0.9, color="#e8e8e8")  # grey: on chip, once per key tile
boxes = {
    "Q": Box(0, 1, "query tile $Q_i$\n$B_M \\times D$", w=2.2, h=0.9, note="loaded once"),
    "KV": Box(3.2, 3.5, "$K_j$: $B_N \\times D$, $V_j$: $B_N \\times D_v$\n"
              "streamed from memory,\none tile j = 0, 1, … at a time", w=3.6, h=1.1,
              color="#fde2c8"),
    "S": Box(3.2, 1, "scores $S_{ij} = \\sigma Q_i K_j^\\top$\n$B_M \\times B_N$", w=2.6, **grey),
    "P": Box(6.6, 1, "$m' = \\max(m, \\mathrm{rowmax}\\,S_{ij})$\n$P_{ij} = e^{S_{ij} - m'}$", w=3,
             **grey),
    "state": Box(10, 1, "running state per row\n$m$, $\\ell$ and acc $[B_M, D_v]$", w=3.0, h=0.9,
                 color="#d9f0d3", note="rescaled by $e^{m - m'}$, then + $P_{ij}$, + $P_{ij} V_j$"),
    "O": Box(14.4, 1, "output tile acc / $\\ell$\nLSE $= m + \\log \\ell$", w=2.6, h=0.9,
             note="written once"),
}
arrows = [("Q", "S"), ("KV", "S", "$K_j$"), ("S", "P"), ("P", "state", "$P_{ij}$"),
          ("KV", "state", "$V_j$"), ("state", "O", "after the last tile")]
viz.schematic(boxes, arrows, groups=[(["S", "P", "state"], "on chip")],
              title="One program of flash attention: query tile i against streamed key/value tiles",
              size=(13, 4.6))
plt.show()

# %% [markdown]
# ### 1.5.4 The forward kernel
#
# The kernel is the PyTorch loop above with the three outer loops turned into the launch grid: axis 0 numbers
# the query tiles, axis 1 the (batch, query head) pairs. What the PyTorch version did not have to think about:
#
# - **Head dims that are not powers of two.** Tile shapes must be powers of two, so a head dim of 80 becomes a
#   tile of 128 columns whose last 48 load as zeros (`DK_PAD`, `DV_PAD`): they add nothing to $QK^\top$, and the
#   output columns they produce are never stored.
# - **exp2.** GPUs compute $2^x$ natively; $e^x = 2^{x \log_2 e}$, so the kernel folds $\log_2 e$ into the scale
#   (`qk_scale` $= \sigma \log_2 e$) and works in base 2 throughout, the stored log-sum-exp too: $L_2 = m + \log_2 \ell$.
# - **Precision.** $Q$, $K$, $V$ and $P$ enter the tensor cores in the input's dtype (bf16 or fp16 on a GPU); the
#   scores, the state and the accumulator are fp32.
#
# Tiles are read and written by two helpers, `_load_tile` and `_store_tile`, which mask only where a tile sticks
# out past the sequence or the head dim (E.4).

# %%
#| export attention.triton
"""Flash attention in Triton: forward and backward kernels for `[B, T, H, D]` tensors (chapter 1).

Comments: B batch, Tq/Tk query/key lengths, HQ/HKV query/key-value heads (GROUP = HQ // HKV),
DK/DV head dims, BM/BN query/key tile heights. Launch configurations: `runtime.LAUNCH_TABLE`.
"""
import torch
import triton
import triton.language as tl
from minisparse import _checks, runtime
from minisparse.attention.naive import attention_ref, check_attention_args  # section 1.2

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels fold log2(e) into the scale

# %% [markdown]
# The loop body: one key tile updates the state of the program's query rows. It is 1.5.3's inner loop, in base 2.
# `MASKED` is a compile-time flag: the same function is compiled twice, once with the mask for the tiles on the
# diagonal or the window's edge, once without it for the tiles in between (1.5.5 says which are which).

# %%
#| export attention.triton
@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, k_stride, v_stride, rows, start, end, Tq, Tk,
               qk_scale, window, offs_n, offs_dk, offs_dv,
               DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key tiles start, start + BN, ... < end: acc [BM, DV_PAD] fp32
    unnormalised output, m_i [BM] running max, l_i [BM] running sum (base 2)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n  # [BN] key indices
        k = _load_tile(k_base, cols, k_stride, Tk, offs_dk, DK, MASKED)  # [BN, DK_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN] scores, base 2
        if MASKED:
            keep = _visible(rows[:, None], cols[None, :], Tq, Tk, window, CAUSAL, HAS_WINDOW)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        p = tl.math.exp2(s - m_new[:, None])  # [BM, BN] unnormalised probabilities
        alpha = tl.math.exp2(m_i - m_new)  # [BM] rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, cols, v_stride, Tk, offs_dv, DV, MASKED)  # [BN, DV_PAD]
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [BM, DV_PAD]
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i

# %% [markdown]
# The kernel around this loop, `_fwd_kernel` (E.4), computes base pointers for its (batch, head), loads its query
# tile once, asks `_key_range` (section 1.5.5) which key tiles to visit, runs `_fwd_tiles` three times — masked
# boundary tiles, unmasked interior tiles, masked boundary tiles — and stores $O = \mathrm{acc} / \ell$ and
# $L_2 = m + \log_2 \ell$. Exercise 4 asks you to write the loop body of a stripped-down version of it.

# %% [markdown]
# ### 1.5.5 Which tiles to visit: causal and sliding-window loop bounds
#
# A query tile covers the rows $i_0, \dots, i_1$, at positions $p = i + T_k - T_q$. Under the causal mask a row
# sees the keys $s \le p$, with a window of $W$ also only $s > p - W$. The keys that *some* row of the tile sees
# therefore form one range,
#
# $$
# p_0 - W + 1 \;\le\; s \;\le\; p_1, \qquad p_0 = i_0 + T_k - T_q,\quad p_1 = i_1 + T_k - T_q ,
# $$
#
# and the kernel loops only over the key tiles that meet it: `_key_range` returns its start `lo` (rounded down to
# a tile) and end `hi`. A key tile needs no mask when **every** row sees **every** key of it: those *interior*
# tiles, from `full_lo` to `full_hi`, take the unmasked loop; the *boundary* tiles at either end take the masked
# one. (`_key_range` and the mask `_visible` are integer arithmetic, in E.4, checked against `attention_mask`.)
# The picture classifies every (query tile, key tile) pair straight from the mask, for 64 × 64 tiles:

# %%
from matplotlib.colors import ListedColormap


def tile_classes(allowed, bm=64, bn=64):
    """[query tiles, key tiles]: 0 no visible pair (skip), 1 some (boundary), 2 all (interior)."""
    Tq, Tk = allowed.shape
    padded = torch.zeros(-(-Tq // bm) * bm, -(-Tk // bn) * bn)  # past the end: invisible
    padded[:Tq, :Tk] = allowed.float()
    seen = padded.unflatten(0, (-1, bm)).unflatten(2, (-1, bn)).mean(dim=(1, 3))  # visible fraction
    return (seen > 0).long() + (seen == 1).long()  # [tiles_q, tiles_k]


classes = {}
for title, Tq, W in [("causal", 512, None), ("window 160", 512, 160), ("Tq = 192 < Tk", 192, None)]:
    c = tile_classes(attention_mask(Tq, 512, window=W))
    classes[f"{title}\nvisits {(c > 0).float().mean():.0%} of the tiles"] = c
fig = viz.panels(classes, size=3.9, cmap=ListedColormap(["#eeeeee", "#f4a259", "#3d7ab8"]), vmin=0,
                 vmax=2, xlabel="key tile", ylabel="query tile")
for ax, cbar in zip(fig.axes[:3], fig.axes[3:]):  # the panels, then their colour bars
    ax.set_yticks(range(len(ax.images[0].get_array())))
    cbar.set_yticks([1 / 3, 1, 5 / 3], ["skipped", "boundary\n(masked)", "interior\n(no mask)"])
fig.tight_layout()
plt.show()

# %% [markdown]
# Causal attention visits a little over half of the tiles, and only the diagonal ones pay for a mask. With a
# window the work per query tile is constant — about $(W + B_M)/B_N$ key tiles, rounded up (4 for $W = 160$ with
# $64 \times 64$ tiles) — so the cost grows linearly with
# $T$: the sliding-window layers of Mistral, Gemma and gpt-oss are cheap for exactly this reason.

# %% [markdown]
# ### 1.5.6 The backward pass, and the finished op
#
# With $S = \sigma QK^\top$ (masked), $P = \operatorname{softmax}(S)$ and $O = PV$, the gradients for $dO$ are
#
# $$
# \begin{aligned}
# dV &= P^\top dO, \qquad dP = dO\, V^\top, \qquad dS = P \circ \bigl(dP - \delta \mathbf{1}^\top\bigr), \\
# dQ &= \sigma\, dS\, K, \qquad dK = \sigma\, dS^\top Q, \qquad \delta_i = \textstyle\sum_j P_{ij}\, dP_{ij}.
# \end{aligned}
# $$
#
# Two facts keep this cheap. First, $\delta_i = \sum_j P_{ij} (dO_i \cdot v_j) = dO_i \cdot O_i$: a dot product of
# two rows we already have. Second, $P$ need not be stored: the forward kept one number per row, the log-sum-exp
# $L$, and $P_{ij} = e^{s_{ij} - L_i}$ comes back exactly from a recomputed score. Recomputing costs FLOPs; storing
# $P$ would cost the $T^2$ memory traffic we set out to avoid.
#
# $dK$ and $dV$ sum over queries, $dQ$ over keys, so the backward uses three kernels and no atomic additions:
# $\delta$ per query tile; a **key-tile** program that holds $K_j, V_j$ and accumulates $dK_j, dV_j$ over the query
# tiles that see it (for all $G$ query heads of its GQA group); and a **query-tile** program, the forward's tiling,
# that accumulates $dQ_i$. Both recompute $S$ and $dP$: seven tile products per pair of tiles instead of five —
# the price of no atomics. The kernels, launch configurations and autograd wiring are in E.5–E.6; the result is:

# %%
from minisparse.attention.triton import flash_attention  # the op of the Engineering notes (E.6)

# %% [markdown]
# **Checks.** The op against `attention_ref` — forward and the three gradients — on shapes chosen to catch the usual
# mistakes: lengths that are not multiples of the tile, a head dim of 80 (padded to 128), $D_v \ne D_k$, GQA and
# MQA, a window, $T_q < T_k$, no mask. The reference runs in fp32 on the same inputs; the tolerance is the book's:
# relative RMS error $\le 10^{-4}$ in fp32, $5 \cdot 10^{-3}$ (forward) and $8 \cdot 10^{-3}$ (gradients) in
# 16-bit. `tests/test_flash_attention.py` sweeps many more shapes, with tiles forced small so that every loop runs.
# Last, a window at least as long as the sequence must give exactly causal attention: the baseline in the limit.
# `flash_attention` itself turns such a window off, so this check calls the kernel's launcher `_forward` (E.6)
# directly, with the window's loop bounds and mask switched on.

# %%
def check_flash(B, Tq, Tk, HQ, HKV, D, Dv, causal=True, window=None):
    """flash_attention's o, dq, dk, dv against attention_ref's, in fp32 on the same inputs."""
    q, k, v = make_qkv(B, Tq, HQ, D, HKV=HKV, Dv=Dv, Tk=Tk, dtype=DTYPE, device=DEVICE,
                       requires_grad=True)
    do = torch.randn(B, Tq, HQ, Dv, device=DEVICE, dtype=DTYPE)
    out = []
    for op, inputs in [(flash_attention, (q, k, v)),
                       (attention_ref, [x.detach().float().requires_grad_() for x in (q, k, v)])]:
        o = op(*inputs, causal=causal, window=window)
        out.append((o, *torch.autograd.grad(o, inputs, do.to(o.dtype))))
    errs = {n: assert_close(n, ref, ours, TOLERANCES[DTYPE][n != "o"])  # (forward, gradients)
            for n, ours, ref in zip(("o", "dq", "dk", "dv"), *out)}
    mask = ("causal" if causal else "full") + (f", window {window}" if window else "")
    print(f"✓ B={B} Tq={Tq} Tk={Tk} HQ={HQ} HKV={HKV} D={D} Dv={Dv} {mask:18s} "
          + "  ".join(f"{n} {e:.0e}" for n, e in errs.items()))


T_check = runtime.reading_size(cpu=100, gpu=1000)
check_flash(2, 37, 37, 2, 2, 64, 64)  # shorter than one tile
check_flash(1, T_check, T_check, 4, 2, 80, 80)  # head dim 80, GQA 4:2
check_flash(1, T_check, T_check, 4, 1, 32, 48, window=16)  # MQA, window, Dv != Dk
check_flash(1, 37, T_check, 2, 1, 32, 32)  # Tq < Tk: the last 37 positions
check_flash(1, 50, T_check, 2, 2, 32, 32, causal=False)  # no mask
from minisparse.attention.triton import _forward  # -> (o, lse); flash_attention drops a window >= T

q, k, v = make_qkv(1, 64, 2, 32, device=DEVICE, dtype=DTYPE)
causal = _forward(q, k, v, True, 32 ** -0.5, None)[0]
assert torch.equal(_forward(q, k, v, True, 32 ** -0.5, 64)[0], causal)
assert not torch.equal(_forward(q, k, v, True, 32 ** -0.5, 63)[0], causal)
print("✓ window = T gives exactly causal attention (and window = T − 1 does not)")

# %% [markdown]
# ## 1.6 Layer
#
# The `Attention` module puts the pieces together the way current open models do. For input
# $x \in \mathbb{R}^{T \times d}$, split into heads after each projection:
#
# $$
# \begin{aligned}
# q &= x W_q, \qquad k = x W_k, \qquad v = x W_v , \\
# q &\leftarrow \operatorname{RoPE}(\operatorname{RMSNorm}(q)), \qquad
#   k \leftarrow \operatorname{RoPE}(\operatorname{RMSNorm}(k)) , \\
# o &= \operatorname{attention}(q, k, v) \odot \operatorname{sigmoid}(x W_g) \quad (\text{the gate is optional}), \\
# y &= o\, W_o .
# \end{aligned}
# $$
#
# - **GQA** through fewer K/V heads; **RoPE** on all channels or on the first `rotary_dim` (Qwen3-Next rotates a
#   quarter of each head, GLM-4.5 half);
# - **q/k RMSNorm** per head (Qwen3, Qwen3-Next), $\hat{x}\,w$ with $\hat{x} = x / \operatorname{rms}(x)$, keeps the
#   attention logits from growing during training (Dehghani et al., 2023; the Qwen3 technical report); Qwen3-Next
#   stores $w$ as an offset from one, $\hat{x}\,(1 + w)$ (`zero_centered_norm=True`); `RMSNorm` is in E.7;
# - the **output gate** of Qwen3-Next's *gated attention* (Qiu et al., 2025): an elementwise sigmoid gate before
#   $W_o$, which the paper reports adds a non-linearity between $W_v$ and $W_o$ and removes the "attention sink" on
#   the first token. As in the checkpoint, `q_proj` has $2 H_q D$ outputs: each head's query, then its gate;
# - the **KV cache**: `forward(x, cache)` rotates the new keys at positions `len(cache) …`, appends, attends;
# - `backend=`: `"naive"` (`attention_ref`), `"triton"` (section 1.5), `"auto"` (the kernels where they run).
#
# Parameter names follow transformers (`q_proj`, …, `k_norm`), so `Attention.from_hf(module)` builds the layer
# from a transformers attention module and copies its weights (E.7 checks it against `Qwen3NextAttention`).

# %%
from minisparse.attention.layer import RMSNorm, _attention_args  # Engineering notes, E.7

# %% [markdown]
# The layer. Each step of `forward` is one line of the equations above; the shapes are in the comments.

# %%
#| export attention.layer
import torch
import torch.nn as nn

from minisparse import _checks
from minisparse.attention.naive import KVCache, RotaryEmbedding, attention_ref  # section 1.2
from minisparse.attention.triton import flash_attention  # section 1.5


class Attention(nn.Module):
    """Causal multi-head attention: GQA, RoPE, optional q/k RMSNorm and output gate, a KV cache.

    forward(x [B, T, hidden], cache=None, positions=None) -> [B, T, hidden]. With a cache (see
    new_cache) the T new tokens sit at positions len(cache) .. len(cache) + T - 1 and attend to
    everything cached before them.
    backend: "auto" (the Triton kernels where they run, else attention_ref), "naive" or "triton".
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, *, bias=False,
                 o_bias=None, gate=False, qk_norm=False, zero_centered_norm=False, norm_eps=1e-6,
                 rope_theta=10000.0, rotary_dim=None, interleaved_rope=False, window=None,
                 backend="auto"):
        super().__init__()
        num_kv_heads, head_dim, rotary_dim = _attention_args(
            hidden_size, num_heads, num_kv_heads, head_dim, rotary_dim, window, norm_eps,
            rope_theta, backend)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.gate, self.window, self.backend, self.rotary_dim = gate, window, backend, rotary_dim
        o_bias = bias if o_bias is None else o_bias
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * (2 if gate else 1), bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, norm_eps, zero_centered_norm) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, zero_centered_norm) if qk_norm else None
        self.rope = RotaryEmbedding(rotary_dim, rope_theta, interleaved_rope)

    def forward(self, x, cache=None, positions=None):
        _checks.layer_input("Attention", x, self, hidden=self.hidden_size)  # [B, T, hidden]
        B, T, _ = x.shape
        start = 0 if cache is None else len(cache)
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)  # [T]
        _checks.positions("Attention", positions, B, T, x.device)
        q, g = self._queries(x)  # [B, T, H, D], gate [B, T, H*D] or None
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, HKV, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, HKV, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, positions), self._rope(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)  # [B, start + T, HKV, D]
        o = self._attend(q, k, v).reshape(B, T, self.num_heads * self.head_dim)  # [B, T, H*D]
        if g is not None:
            o = o * torch.sigmoid(g)  # gated attention: elementwise, per channel of each head
        return self.o_proj(o)  # [B, T, hidden]

    def _queries(self, x):
        B, T, _ = x.shape
        if not self.gate:
            return self.q_proj(x).view(B, T, self.num_heads, self.head_dim), None
        H, D = self.num_heads, self.head_dim  # explicit sizes, not -1: T = 0 too
        qg = self.q_proj(x).view(B, T, H, 2 * D)  # each head: [query | gate], 2D channels
        q, g = qg.chunk(2, dim=-1)  # [B, T, H, D] each
        return q, g.reshape(B, T, H * D)

    def _rope(self, x, positions):
        if self.rotary_dim == self.head_dim:
            return self.rope(x, positions)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]  # partial RoPE
        return torch.cat((self.rope(rot, positions), rest), dim=-1)

    def _attend(self, q, k, v):
        fits = max(q.shape[-1], v.shape[-1]) <= 256  # the kernel's head dims; past them: naive
        if _checks.choose_backend(self.backend, q, fits=fits) == "triton":
            return flash_attention(q, k, v, causal=True, window=self.window)
        return attention_ref(q, k, v, causal=True, window=self.window)

    def new_cache(self, batch, max_len, *, dtype=None, device=None):
        """An empty KVCache for this layer (post-RoPE keys), in the layer's dtype and device."""
        w = self.k_proj.weight
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, dtype=dtype or w.dtype,
                       device=device or w.device)

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """Build from a transformers attention module, copying its weights (`attention_from_hf`)."""
        from minisparse.attention.hf import attention_from_hf  # the loader (Engineering notes, E.7)
        return attention_from_hf(cls, module, backend)

# %% [markdown]
# The test that matters for a cache: decoding (a prompt, a chunk, then token by token) must give the outputs of one
# pass over the whole sequence — with and without the gate, with GQA, q/k norm, partial RoPE and a window.

# %%
T_dec = runtime.reading_size(cpu=24, gpu=256)
for gate in (False, True):
    torch.manual_seed(1)
    layer = Attention(64, 4, 2, 16, gate=gate, qk_norm=True, rotary_dim=8, window=7).to(DEVICE)
    with torch.no_grad():
        for w in (layer.q_norm.weight, layer.k_norm.weight):
            w.normal_(mean=1.0, std=0.3)  # norms that do something
        x = torch.randn(2, T_dec, 64, device=DEVICE)
        full = layer(x)  # [B, T, hidden]  one pass
        cache = layer.new_cache(2, T_dec)
        steps = [layer(x[:, :5], cache), layer(x[:, 5:9], cache)]  # a prompt, then a chunk of 4
        steps += [layer(x[:, t:t + 1], cache) for t in range(9, T_dec)]  # then one token at a time
    err = assert_close(f"decode (gate={gate})", full, torch.cat(steps, dim=1), 1e-5)
    print(f"✓ gate={gate}: cached decoding equals the prefill, relative RMS error {err:.1e}")

# %% [markdown]
# ## 1.7 Measure
#
# `bench/attention.py` times `flash_attention` on an H200 against PyTorch's SDPA (the fused CUDA attention kernel
# SDPA picks on this GPU; the run does not record which of its backends that is) and, for a sliding window of 1024 keys, against `torch.compile`d `flex_attention`: B = 2,
# H = 16, D = 128, causal, bf16, T from 1k to 32k. On a CPU this section plots the committed results
# (`bench/results/attention.json`); the table gives the medians and our throughput as a fraction of the anchor's.

# %%
results = bench.load_results("attention")
bench.plot_passes(results, legend="figure")
plt.show()
ms = {(r["impl"], r["pass"], r["T"]): r["ms"] for r in results["rows"]}
tflops = {(r["impl"], r["pass"], r["T"]): r["tflops"] for r in results["rows"]}
ANCHORS = {"SDPA": ("flash_attention", "sdpa"),
           "flex": ("flash_attention (window 1024)", "flex_attention (window 1024)")}
ratio = {(a, p, T): ms[anchor, p, T] / ms[impl, p, T] for a, (ours, anchor) in ANCHORS.items()
         for impl, p, T in ms if impl == ours}  # > 1: ours is faster
print(f"{results['device']}, {results['date']}, torch {results['torch']}, "
      f"triton {results['triton']}")
print(f"{'T':>6}  {'anchor':7}{'fwd ms: ours / anchor':>23}{'ratio':>7}"
      f"{'fwd+bwd ms: ours / anchor':>28}{'ratio':>7}")
for a, (ours, anchor) in ANCHORS.items():
    for T in sorted(T for b, p, T in ratio if b == a and p == "fwd"):
        print(f"{T:6d}  {a:7}" + "".join(f"{ms[ours, p, T]:14.3f} / {ms[anchor, p, T]:6.3f}"
                                        f"{ratio[a, p, T]:7.2f}" for p in ("fwd", "fwd+bwd")))
Ts = sorted({T for *_, T in ratio})
long, short = [T for T in Ts if T >= 8192], [T for T in Ts if T < 8192]
assert all(0.83 <= ratio["SDPA", "fwd", T] < 0.85 for T in long)  # takeaway 1
assert all(0.74 <= ratio["SDPA", "fwd", T] < 0.77 for T in short)
assert all(440 < tflops["flash_attention", "fwd", T] < 490 for T in long)
assert all(530 < tflops["sdpa", "fwd", T] < 580 for T in long)
assert f'{ms["flash_attention", "fwd", 8192]:.2f} {ms["sdpa", "fwd", 8192]:.2f}' == "1.23 1.03"
assert all(0.73 <= ratio["SDPA", "fwd+bwd", T] < 0.76 for T in long)  # takeaway 2
assert all(0.66 <= ratio["SDPA", "fwd+bwd", T] < 0.73 for T in short)
host = results["host_overhead"]["issue_ms_per_fwd_bwd"]  # T = 1024, calls queued back to back
assert f'{host:.2f} {ms["flash_attention", "fwd+bwd", 1024]:.2f}' == "0.34 0.20"  # host > GPU
assert all(1.0 <= ratio["flex", "fwd", T] < 1.03 for T in (8192, 32768))  # takeaway 3
assert all(0.88 <= ratio["flex", "fwd+bwd", T] < 0.9 for T in (8192, 32768))
growth = {impl: ms[impl, "fwd", 32768] / ms[impl, "fwd", 8192] for impl, _ in ANCHORS.values()}
assert 3.8 < growth["flash_attention (window 1024)"] < 4.2 and growth["flash_attention"] > 14

# %% [markdown]
# **Takeaways** (H200, 2026-12-03):
#
# 1. **Forward: 0.83–0.84× of SDPA's throughput from T = 8k on** (at 8k, 1.23 ms against 1.03 ms; ≈ 445–490
#    TFLOP/s against ≈ 535–580), 0.74–0.76× below. What remains is the distance between this Triton kernel and the
#    vendor-tuned CUDA kernel SDPA dispatches to.
# 2. **Forward + backward: 0.73–0.75× of SDPA from T = 8k on, 0.67–0.72× below.** By design the dQ kernel
#    recomputes two of the products the dK/dV kernel already computed: seven tile products per pair of tiles
#    against five, the price of no atomic adds. At short lengths the host matters too: issuing one forward +
#    backward at T = 1k takes 0.34 ms of host time (four launches and autograd), more than the 0.20 ms the GPU
#    spends on it, so a loop of such calls waits on the host (the table times the GPU, with CUDA events).
# 3. **Sliding window: on par with `flex_attention`** (1.01–1.02× forward, 0.89–0.90× with the backward), linear in
#    $T$: 4× the tokens from 8k to 32k take 4× the time, against 15× for causal attention, because the loop bounds
#    of section 1.5.5 skip every key tile outside the window.
#
# `bench/notes/attention.md` records the runs and the tile sweep behind the launch configurations.

# %% [markdown]
# ## 1.8 Exercises
#
# Each exercise has a stub, a cell that checks it (one line when right, what differs when not; code in E.9), and a
# solution behind a dropdown.

# %%
from minisparse.attention.exercises import (check_decode_attention, check_flash_tile,
                                            check_kv_cache_bytes, check_online_softmax)

# %% [markdown]
# ### Exercise 1 (extend): merge two softmax states
#
# Section 1.5.2 folds one block of keys at a time into a running state. Split-K decoding kernels (flash-decoding)
# instead give *different programs* different halves of the keys and merge their states at the end. For a block
# of scores $s$ (rows = queries) and values $v$ the state is
#
# $$
# m = \max_j s_j, \qquad \ell = \sum_j e^{s_j - m}, \qquad a = \sum_j e^{s_j - m}\, v_j ,
# $$
#
# and the output is $a / \ell$ (`minisparse.attention.softmax_state(s, v)`). Write `merge_states`, which combines
# the states of two blocks into the state of both, without the scores (`m`, `l`: `[N]`; `a`: `[N, Dv]`). The checker
# accepts answers within $10^{-5}$, including the empty state ($m = -\infty$, $\ell = 0$, $a = 0$) and scores near
# 100 in fp32, where $e^{s}$ overflows.

# %%
def merge_states(m1, l1, a1, m2, l2, a2):
    # your code here: return m, l, a
    raise NotImplementedError


# %%
attempt(check_online_softmax, merge_states)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — each state was summed against its own maximum; moving both to the common maximum m
# multiplies each by exp(m_i - m) <= 1, which never overflows. Merging into the empty state (m =
# -inf) multiplies it by exp(-inf) = 0 and returns the other state unchanged.
def merge_states_solution(m1, l1, a1, m2, l2, a2):
    m = torch.maximum(m1, m2)  # [N] the new running max
    c1, c2 = torch.exp(m1 - m), torch.exp(m2 - m)  # [N] rescale factors, <= 1
    return m, c1 * l1 + c2 * l2, c1[:, None] * a1 + c2[:, None] * a2


check_online_softmax(merge_states_solution)

# %% [markdown]
# ### Exercise 2 (debug): a decoding step that only works on the prompt
#
# The function below attends the newest $T_q$ tokens to all $T_k$ tokens so far (the new ones last, as after
# `KVCache.append`). It agrees with `attention_ref` on a prompt ($T_q = T_k$) and is wrong on every decoding step
# after it. Fix it in place; the checker compares with `attention_ref` for several $(T_q, T_k)$ within $10^{-10}$.

# %%
def decode_attention(q, k, v):
    """q [Tq, D] the newest Tq tokens; k, v [Tk, D] all tokens so far, the new ones last."""
    Tq, Tk = q.shape[0], k.shape[0]
    s = q @ k.T / q.shape[-1] ** 0.5  # [Tq, Tk]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril()  # causal
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # [Tq, D]


# %%
attempt(check_decode_attention, decode_attention)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — `tril()` aligns the mask top-left: query i sees keys 0..i, right only when Tq == Tk.
# The new queries are the LAST Tq positions, so query i sits at position i + Tk - Tq and sees keys s
# <= i + Tk - Tq: the diagonal shifts right by Tk - Tq (bottom-right alignment, section 1.2.1). With
# one new token the bug lets it see only the first token of the context.
def decode_attention_solution(q, k, v):
    Tq, Tk = q.shape[0], k.shape[0]
    s = q @ k.T / q.shape[-1] ** 0.5  # [Tq, Tk]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)  # bottom-right causal
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # [Tq, D]


check_decode_attention(decode_attention_solution)

# %% [markdown]
# ### Exercise 3 (extend): the KV cache of a hybrid layer stack
#
# Section 1.1 sized the cache of models whose layers are all alike. Many are not: transformers' `config.layer_types`
# says which layers are `"full_attention"` (cache every token), `"sliding_attention"` (the last `window` tokens) and
# `"linear_attention"` (lightning, Gated DeltaNet, KDA, chapters 4–6: no K/V at all). `window` is the sliding layers'
# length; `window=None` means they keep every token. Write `kv_cache_bytes`, the bytes of the whole cache for a batch
# of sequences of `seq_len` tokens; the checker compares exact integers on layouts shaped like Llama-2 (MHA, and GQA
# with 8 K/V heads), Qwen3-Next, gpt-oss and Gemma 3 4B: five sliding layers with a 1024-token window
# for each full layer (the Gemma 3 technical report; the 4096 that transformers' `Gemma3TextConfig()` still
# defaults to is Gemma 2's).

# %%
def kv_cache_bytes(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2,
                   window=None):
    # your code here: return an int
    raise NotImplementedError


# %%
attempt(check_kv_cache_bytes, kv_cache_bytes)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — per layer, 2 (K and V) x batch x cached tokens x num_kv_heads x head_dim x bytes; a
# full layer caches seq_len tokens, a sliding one min(seq_len, window), a linear none. Qwen3-Next
# at 262,144 tokens: 12 full layers x 2 heads x 256 x 2 x 2 bytes x 262,144 = 6 GiB a sequence (24
# GiB if all 48 were full). Gemma 3 4B at 128k: its 29 sliding layers (1024 tokens each) hold under
# 5 % of the cache (tests/test_attention.py checks these figures).
def kv_cache_bytes_solution(layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2,
                            window=None):
    per_token = 2 * num_kv_heads * head_dim * dtype_bytes  # K and V of one token in one layer
    cached = {"full_attention": seq_len, "linear_attention": 0,
              "sliding_attention": seq_len if window is None else min(seq_len, window)}
    return sum(batch * cached[t] * per_token for t in layer_types)


check_kv_cache_bytes(kv_cache_bytes_solution)

# %% [markdown]
# ### Exercise 4 (Triton): the tile loop of flash attention
#
# The kernel below is a stripped-down flash attention for one head: `q, k, v, o` are `[T, D]` fp32, causal, one
# program per tile of `BM` queries, looping over every tile of `BN` keys (no loop bounds, no head-dim padding).
# Only the loop body is missing: mask the scores `s` (a key is visible when its index is at most the query's) and
# update the running max `m`, sum `l` and output `acc` as in section 1.5.3 (natural `tl.exp` is fine). The checker
# launches it (in the interpreter on a CPU) for lengths that are not multiples of the tile, head dims 16 and 32,
# and scores near 100 (where $e^{s}$ overflows fp32), compares with `attention_ref` and reports the first position
# that differs (element-wise, $|o - o_{\mathrm{ref}}| \le 10^{-4}\,(1 + |o_{\mathrm{ref}}|)$ on a CPU; $2 \cdot 10^{-2}$
# on a GPU, where `tl.dot` multiplies fp32 in tf32).

# %%
@triton.jit
def flash_tile_kernel(Q, K, V, O, T, scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Causal attention of one head; q, k, v, o [T, D] row-major fp32. Grid (cdiv(T, BM),)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] query indices
    dims = tl.arange(0, D)  # [D]
    q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=rows[:, None] < T, other=0.0)  # [BM, D]
    m = tl.full([BM], -1.0e30, tl.float32)  # running max (finite: see section 1.5.3)
    l = tl.zeros([BM], tl.float32)  # running sum
    acc = tl.zeros([BM, D], tl.float32)  # running output
    for start in range(0, T, BN):  # every key tile
        cols = start + tl.arange(0, BN)  # [BN] key indices
        k = tl.load(K + cols[:, None] * D + dims[None, :], mask=cols[:, None] < T, other=0.0)
        v = tl.load(V + cols[:, None] * D + dims[None, :], mask=cols[:, None] < T, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [BM, BN] scores
        # your code here: mask s, then update m, l and acc
        pass
    tl.store(O + rows[:, None] * D + dims[None, :], acc / l[:, None], mask=rows[:, None] < T)


# %%
attempt(check_flash_tile, flash_tile_kernel)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — section 1.5.3's update on a [BM, BN] tile. Masked scores become -inf, so their exp is
# 0; the finite start of m keeps NaN away. Keys past T need no mask of their own: for every stored
# row (< T) the causal mask already hides them.
@triton.jit
def flash_tile_kernel_solution(Q, K, V, O, T, scale, D: tl.constexpr, BM: tl.constexpr,
                               BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] query indices
    dims = tl.arange(0, D)  # [D]
    q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=rows[:, None] < T, other=0.0)  # [BM, D]
    m = tl.full([BM], -1.0e30, tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in range(0, T, BN):
        cols = start + tl.arange(0, BN)  # [BN] key indices
        k = tl.load(K + cols[:, None] * D + dims[None, :], mask=cols[:, None] < T, other=0.0)
        v = tl.load(V + cols[:, None] * D + dims[None, :], mask=cols[:, None] < T, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [BM, BN] scores
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))  # causal mask
        m_new = tl.maximum(m, tl.max(s, 1))  # [BM]
        alpha = tl.exp(m - m_new)  # [BM] rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])  # [BM, BN]
        l = alpha * l + tl.sum(p, 1)
        acc = alpha[:, None] * acc + tl.dot(p, v)  # [BM, D]
        m = m_new
    tl.store(O + rows[:, None] * D + dims[None, :], acc / l[:, None], mask=rows[:, None] < T)


check_flash_tile(flash_tile_kernel_solution)

# %% [markdown]
# ## Summary
#
# - Softmax attention costs $O(T^2)$ FLOPs, and $O(T^2)$ bytes if the scores are written out; the projections and
#   the FFN are linear in $T$, so attention's FLOPs take over only at long context (≈ 50k tokens for Llama-2-7B).
# - `attention_ref` is the spec: fp32 softmax, GQA by repeating K/V, masks aligned bottom-right so that decoding
#   after a cache is the same code, a sliding window $t - W < s \le t$.
# - RoPE rotates channel pairs by position so that scores depend on offsets; a checkpoint needs the pairing
#   (half-split or interleaved) it was trained with.
# - The KV cache costs $2 L H_{kv} D$ elements per token; GQA, MQA, windows and hybrid stacks shrink it. Decoding
#   is memory-bound, with an arithmetic intensity of about $H_q / H_{kv}$.
# - Flash attention keeps the scores on chip and carries an online-softmax state across key tiles: compute-bound
#   instead of memory-bound; on an H200, 0.83–0.84× of SDPA's forward throughput from T = 8k (0.74–0.76× below), on
#   par with windowed `flex_attention`.
# - The `Attention` layer adds q/k RMSNorm, partial RoPE and Qwen3-Next's output gate; `from_hf` loads weights.
#
# ## References
#
# - A. Vaswani et al., *Attention Is All You Need*, 2017. [arXiv:1706.03762](https://arxiv.org/abs/1706.03762)
# - N. Shazeer, *Fast Transformer Decoding: One Write-Head is All You Need* (MQA), 2019. [arXiv:1911.02150](https://arxiv.org/abs/1911.02150)
# - J. Ainslie et al., *GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints*, 2023. [arXiv:2305.13245](https://arxiv.org/abs/2305.13245)
# - J. Su et al., *RoFormer: Enhanced Transformer with Rotary Position Embedding*, 2021. [arXiv:2104.09864](https://arxiv.org/abs/2104.09864)
# - S. Black et al., *GPT-NeoX-20B* (the half-split rotary convention), 2022. [arXiv:2204.06745](https://arxiv.org/abs/2204.06745)
# - I. Beltagy et al., *Longformer* (sliding-window attention), 2020. [arXiv:2004.05150](https://arxiv.org/abs/2004.05150); A. Jiang et al., *Mistral 7B*, 2023. [arXiv:2310.06825](https://arxiv.org/abs/2310.06825)
# - M. Milakov, N. Gimelshein, *Online normalizer calculation for softmax*, 2018. [arXiv:1805.02867](https://arxiv.org/abs/1805.02867)
# - T. Dao et al., *FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness*, 2022. [arXiv:2205.14135](https://arxiv.org/abs/2205.14135)
# - T. Dao, *FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning*, 2023. [arXiv:2307.08691](https://arxiv.org/abs/2307.08691)
# - M. Dehghani et al., *Scaling Vision Transformers to 22 Billion Parameters* (q/k normalisation against growing attention logits), 2023. [arXiv:2302.05442](https://arxiv.org/abs/2302.05442)
# - Qwen Team, *Qwen3 Technical Report* (QK-Norm in every attention layer), 2025. [arXiv:2505.09388](https://arxiv.org/abs/2505.09388)
# - R. Pope et al., *Efficiently Scaling Transformer Inference* (KV-cache memory and decoding's arithmetic intensity), 2022. [arXiv:2211.05102](https://arxiv.org/abs/2211.05102)
# - Z. Qiu et al., *Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free*, 2025. [arXiv:2505.06708](https://arxiv.org/abs/2505.06708)
# - Qwen team, *Qwen3-Next-80B-A3B* model card, 2025. [huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct); its attention in transformers: [`modeling_qwen3_next.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_next/modeling_qwen3_next.py) (`Qwen3NextAttention`).
# - Gemma Team, *Gemma 3 Technical Report* (5 local layers with a 1024-token window per global layer), 2025. [arXiv:2503.19786](https://arxiv.org/abs/2503.19786)
# - T. Dao, D. Haziza, F. Massa, G. Sizov, *Flash-Decoding for long-context inference* (split-K merging of softmax states), PyTorch blog, 2023.
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix *The seed survey*. Its figures were checked against the models' configs and papers; where they disagree, the text says so.

# %% [markdown]
# ## Engineering notes (optional)
#
# What a practitioner needs and a first reading skips: the check of section 1.1's model table against
# transformers, the cost helpers and GQA's head grouping, RoPE's cached table, the integer arithmetic of the loop
# bounds, the three backward kernels, the op's launch configurations and input checks, `RMSNorm` and the loader of
# transformers' weights, live timing on a GPU, and the exercise checkers. Every cell here is part of the package or
# checks it.
#
# ### E.1 Section 1.1's numbers: the model table against transformers' configs, the cost helpers
#
# `transformers`' configuration classes default to the shapes of the models they are named after; the check
# reads the same numbers from them (no network: the defaults live in the code).

# %%
def kv_layout(cfg):
    """(layers with a KV cache, K/V heads, query heads, head dim) of a transformers config."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B: one K/V head for all query heads
    else:
        kv_heads = cfg.num_key_value_heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    kv_layers = sum(t != "linear_attention" for t in layer_types)
    return kv_layers, kv_heads, cfg.num_attention_heads, head_dim


try:
    import transformers
except ImportError:
    print("transformers is not installed: the table above is not checked against its configs")
else:
    for name, m in MODELS.items():
        cfg = getattr(transformers, m["config"])()
        assert kv_layout(cfg) == (m["kv_layers"], m["kv_heads"], m["heads"], m["head_dim"]), (
            name,
            kv_layout(cfg),
        )
    llama = transformers.LlamaConfig()
    assert (llama.hidden_size, llama.intermediate_size) == (LLAMA["hidden"], LLAMA["ffn"])
    print(
        f"✓ the shapes of {len(MODELS)} models match transformers {transformers.__version__}'s "
        f"config defaults"
    )

# %% [markdown]
# The cost model's helpers for the rest of a layer and for the cache (chapter 5 uses them for hybrid stacks),
# checked against section 1.1's back-of-envelope lines:

# %%
#| export attention.cost

def projection_flops(T, hidden, H, HKV, D, *, B=1):
    """FLOPs of the q, k, v, o projections of one attention layer: linear in T."""
    return 2 * B * T * hidden * (2 * H * D + 2 * HKV * D)


def ffn_flops(T, hidden, intermediate, *, B=1, gated=True):
    """FLOPs of a feed-forward block: 3 matrices for SwiGLU (gate, up, down), 2 for a plain MLP."""
    return 2 * B * T * hidden * intermediate * (3 if gated else 2)


def kv_cache_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes=2, v_head_dim=None):
    """KV-cache bytes a token adds: K and V in every layer that keeps a cache."""
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    return num_layers * num_kv_heads * (head_dim + v_head_dim) * dtype_bytes


# %%
assert [projection_flops(T, d, H, H, D) + ffn_flops(T, d, F) for T in T_axis] == linear
for name, m in MODELS.items():
    per_token = kv_cache_bytes_per_token(m["kv_layers"], m["kv_heads"], m["head_dim"])
    assert per_token == cache_bytes_per_token(m), name
print("✓ projection_flops + ffn_flops and kv_cache_bytes_per_token agree with section 1.1")

# %% [markdown]
# The head grouping behind the table's three designs: which K/V head each query head reads.

# %%
HQ = 8
viz.mask_panel({f"{name}: {HQ} query heads, {hkv} K/V":
                torch.arange(HQ)[:, None] // (HQ // hkv) == torch.arange(hkv)
                for name, hkv in [("MHA", 8), ("GQA", 2), ("MQA", 1)]},
               xlabel="K/V head", ylabel="query head", size=2.6)
for ax, hkv in zip(plt.gcf().axes, (8, 2, 1)):
    ax.set_xticks(range(hkv))
plt.show()

# %% [markdown]
# ### E.2 Argument checks
#
# The checks of section 1.2, built from `minisparse._checks`: each names the argument, what was expected and
# what came. `attention_ref`, `attention_weights`, `attention_mask`, `apply_rope` and the kernels' op call them.

# %%
#| export attention.naive
def check_attention_args(op, q, k, v=None, causal=True, window=None, scale=None):
    """Validate q [B, Tq, HQ, D], k [B, Tk, HKV, D], v [B, Tk, HKV, Dv] (None: no values), the mask
    and the scale; return the scale as a float (D ** -0.5 for None). Raises TypeError / ValueError
    naming the argument."""
    _checks.tensor(op, "q", q, "[B, Tq, HQ, D]", dtypes=_checks.FLOATS)
    _checks.tensor(op, "k", k, "[B, Tk, HKV, D]", dtypes=_checks.FLOATS)
    _checks.tensor(op, "v", v, "[B, Tk, HKV, Dv]", dtypes=_checks.FLOATS, optional=True)
    named = dict(q=q, k=k) if v is None else dict(q=q, k=k, v=v)
    _checks.same_dtype(op, _checks.FLOATS, **named)  # fp64 too
    _checks.same_device(op, **named)
    (B, Tq, HQ, D), (Tk, HKV) = q.shape, k.shape[1:3]
    _checks.shape(op, "k", k, (B, Tk, HKV, D), "[B, Tk, HKV, D]", "q's batch size and head dim")
    if v is not None:
        _checks.shape(
            op, "v", v, (B, Tk, HKV, v.shape[3]), "[B, Tk, HKV, Dv]", "k's batch, length and heads"
        )
    _checks.divides(op, "HKV (k's heads)", HKV, "HQ (q's heads, GQA groups)", HQ)
    _check_window(op, causal, window)
    if causal and Tq > Tk:
        raise ValueError(
            f"{op}: causal attention places the Tq queries at the end of the Tk keys, so it needs "
            f"Tq <= Tk, got Tq={Tq}, Tk={Tk}"
        )
    return _checks.scale(op, scale, D)


def _check_window(op, causal, window):
    if window is None:
        return
    _checks.positive_int(op, "window", window)
    if not causal:
        raise ValueError(
            f"{op}: window={window} needs causal=True (a sliding window looks back from each "
            "query, keys pos - window < s <= pos), got causal=False"
        )


def _check_rope_args(op, x, positions):
    if not isinstance(x, torch.Tensor) or not isinstance(positions, torch.Tensor):
        raise TypeError(f"{op}: x and positions must be torch.Tensors, got {type(x).__name__}, "
                        f"{type(positions).__name__}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"{op}: x must be [B, T, H, D] with an even D, got shape {tuple(x.shape)}")
    B, T = x.shape[:2]
    if tuple(positions.shape) not in ((T,), (B, T)):
        raise ValueError(
            f"{op}: positions must be [T]=[{T}] or [B, T]=[{B}, {T}], got {tuple(positions.shape)}"
        )

# %% [markdown]
# ### E.3 RoPE's cached table, the KV cache
#
# A layer calls RoPE twice per step with the same positions, so it keeps a table of $\cos$ and $\sin$ per
# position, grown on demand. The table is kept in fp32 even if the module is cast to bf16 (a bf16 angle table
# would blur positions above a few hundred). Positions below 0 have no row: their $\cos$ and $\sin$ are computed
# from the same `frequencies`, so a subclass that changes them (YaRN, chapter 3) holds there too.

# %%
#| export attention.naive
class RotaryEmbedding(nn.Module):
    """RoPE with cached cos/sin tables; forward(x [B,T,H,D], positions [T] or [B,T] int) equals
    apply_rope (tables in fp32, in fp64 for fp64 x). A subclass changes the frequencies
    (`frequencies`) and scales cos/sin by `attention_factor` (YaRN, chapter 3); both hold for
    every position, negative ones included."""

    attention_factor = 1.0  # cos and sin are multiplied by it

    def __init__(self, dim, theta=10000.0, interleaved=False, max_len=2048):
        super().__init__()
        if _checks.positive_int("RotaryEmbedding", "dim", dim) % 2:
            raise ValueError(f"RotaryEmbedding: dim must be even, got {dim}")
        _checks.positive_float("RotaryEmbedding", "theta", theta)
        _checks.positive_int("RotaryEmbedding", "max_len", max_len, zero=True)
        self.dim, self.theta, self.interleaved = dim, theta, interleaved
        self._build(max_len, None)

    def frequencies(self, dtype=torch.float32, device=None):
        """The angular frequency of each channel pair [dim/2]: theta^(-2j/dim)."""
        return rope_frequencies(self.dim, self.theta, dtype, device)

    def _cos_sin(self, positions, dtype=torch.float32):
        """cos and sin of positions [...] (int) times the frequencies, in dtype: [..., dim/2]
        each."""
        angles = positions.to(dtype)[..., None] * self.frequencies(dtype, positions.device)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def _build(self, n, device, dtype=torch.float32):
        cos, sin = self._cos_sin(torch.arange(n, device=device), dtype)  # [n, dim/2] each
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, positions):
        _check_rope_args("RotaryEmbedding", x, positions)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"RotaryEmbedding: x's last dim must be dim={self.dim}, got {x.shape[-1]}"
            )
        if positions.is_floating_point():
            raise TypeError(f"RotaryEmbedding: positions must be integers, got {positions.dtype}")
        low, high = (int(p) for p in torch.aminmax(positions)) if positions.numel() else (0, -1)
        acc = torch.promote_types(x.dtype, torch.float32)
        if low < 0:  # before the table's first row: the angles themselves (apply_rope's if plain)
            cos, sin = self._cos_sin(positions, acc)  # [T, dim/2] or [B, T, dim/2]
        else:
            need = high + 1
            stale = self.cos.dtype != acc or self.cos.device != x.device
            if need > len(self.cos) or stale:  # grow, or follow x: fp32 (fp64 for fp64), its device
                self._build(max(need, len(self.cos)), x.device, acc)
            cos, sin = self.cos[positions], self.sin[positions]  # [T, dim/2] or [B, T, dim/2]
        cos = cos.expand(x.shape[0], *cos.shape[-2:])[:, :, None, :]  # [B, T, 1, dim/2]
        sin = sin.expand(x.shape[0], *sin.shape[-2:])[:, :, None, :]
        return _rotate(x.to(acc), cos.to(acc), sin.to(acc), self.interleaved).to(x.dtype)

# %%
y, pos = torch.randn(2, 9, 3, 64), torch.arange(9)
assert torch.equal(RotaryEmbedding(64)(y, pos), apply_rope(y, pos))
assert torch.equal(RotaryEmbedding(64)(y, pos - 4), apply_rope(y, pos - 4))  # below 0 too
print("✓ RotaryEmbedding == apply_rope")

# %% [markdown]
# RoPE's preference for nearby tokens comes from its frequencies. For a vector whose channel pairs all have the same
# length (the position head's $u$), the score with itself $\Delta$ positions apart is proportional to $\sum_j
# \cos(\Delta\,\omega_j)$; for other vectors each term is weighted by its pair's squared length, so the decay holds
# on average. The fast pairs decorrelate at once, the slow ones stay aligned for long. A larger $\theta$ slows all
# of them down, which is how long-context models stretch RoPE:

# %%
dist = torch.arange(0, 32768)
fig, ax = plt.subplots(figsize=(7, 3))
for theta in (1e4, 5e5, 1e6):
    omega = rope_frequencies(128, theta, torch.float64)  # [64]
    ax.plot(dist, torch.cos(dist[:, None] * omega).mean(1), lw=0.8, label=f"θ = {theta:.0e}")
ax.set_xscale("symlog", linthresh=16)
ax.set(xlabel="distance Δ = t − s (tokens)", ylabel=r"mean $\cos(\Delta\,\omega_j)$",
       title="RoPE similarity vs distance (D = 128)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
#### The KV cache
#
# The preallocated cache of section 1.2.4; a silent cast or an overflow raises instead of corrupting it.

# %%
#| export attention.naive
def _cache_read(view):
    """What a cache's append returns: the view of its filled part, or a copy of it where autograd
    holds it (the buffer was written with tensors that need a gradient). A layer's backward may
    need that forward's keys after the next append has written into the buffer in place."""
    return view.clone() if view.requires_grad and torch.is_grad_enabled() else view


class KVCache:
    """Preallocated keys [B, max_len, HKV, D] and values [B, max_len, HKV, Dv]; `length` tokens are
    filled."""

    def __init__(self, batch, max_len, num_kv_heads, head_dim, v_head_dim=None, *,
                 dtype=torch.float32, device=None):
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        for name, n in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            _checks.positive_int("KVCache", name, n)
        self.k = torch.zeros(batch, max_len, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, max_len, num_kv_heads, v_head_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self):
        return self.k.shape[1]

    def __len__(self):
        return self.length

    def append(self, k, v):
        """Store k [B, t, HKV, D], v [B, t, HKV, Dv] after the cached tokens; return all of them
        [B, length, ...]."""
        B, _, HKV, D = self.k.shape
        t = k.shape[1] if k.dim() == 4 else -1
        if tuple(k.shape) != (B, t, HKV, D) or tuple(v.shape) != (B, t, HKV, self.v.shape[-1]):
            raise ValueError(
                f"KVCache.append: k must be [B={B}, t, HKV={HKV}, D={D}] and v [B, t, HKV, "
                f"Dv={self.v.shape[-1]}], got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.dtype != self.k.dtype or v.dtype != self.v.dtype:  # a cast would round fp32 keys
            raise TypeError(
                f"KVCache.append: the cache holds {self.k.dtype}, got k {k.dtype} and v {v.dtype} "
                "(make the cache with the layer's dtype)"
            )
        if self.length + t > self.max_len:
            raise ValueError(
                f"KVCache.append: {t} new tokens do not fit: {self.length} of "
                f"max_len={self.max_len} are used (make a larger cache)"
            )
        self.k[:, self.length:self.length + t] = k
        self.v[:, self.length:self.length + t] = v
        self.length += t
        return _cache_read(self.k[:, :self.length]), _cache_read(self.v[:, :self.length])

    def reset(self):
        self.length = 0

# %% [markdown]
# ### E.4 Tile helpers, loop bounds, a tiled matrix product
#
# First the primer's second kernel, a tiled matrix product: the pattern the attention kernels repeat. It computes $C = AB$ with $A$ of shape $M \times K$ and
# $B$ of shape $K \times N$. Program $(i, j)$ owns the output tile $C[iB_M : (i+1)B_M,\ jB_N : (j+1)B_N]$; it walks
# along $K$ in steps of $B_K$, loads a $B_M \times B_K$ tile of $A$ and a $B_K \times B_N$ tile of $B$, and adds
# their product with `tl.dot` — which the compiler maps to the GPU's tensor cores. Two-dimensional blocks come from
# broadcasting: `rows[:, None] * K + ks[None, :]` is the $B_M \times B_K$ block of element offsets of a row-major
# matrix. Masked lanes load `other=0.0`, and zeros add nothing to a dot product, so the edges need no other care.

# %%
@triton.jit
def matmul_kernel(
    A, B, C, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """C [M, N] = A [M, K] @ B [K, N], row-major. Grid (cdiv(M, BM), cdiv(N, BN)).

             K ->                  N ->
        +---------+         +----+----+----+
      M | A rows  |  @    K | .. | B  | .. |   program (i, j) adds A[i-rows, k-tile] @ B[k-tile, j]
        +---------+         +----+----+----+   for k-tile = 0, BK, 2BK, ... into its C tile
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        a = tl.load(
            A + rows[:, None] * K + ks[None, :],
            mask=(rows[:, None] < M) & (ks[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            B + ks[:, None] * N + cols[None, :],
            mask=(ks[:, None] < K) & (cols[None, :] < N),
            other=0.0,
        )
        acc += tl.dot(a, b)  # [BM, BK] @ [BK, BN], accumulated in fp32
    tl.store(
        C + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N)
    )


a, b = torch.randn(100, 70, device=DEVICE), torch.randn(70, 90, device=DEVICE)
c = torch.empty(100, 90, device=DEVICE)
matmul_kernel[(triton.cdiv(100, 32), triton.cdiv(90, 32))](
    a, b, c, 100, 90, 70, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32
)
# on a GPU, tl.dot multiplies fp32 inputs in tf32 unless told otherwise: hence the looser tolerance
# there
err = assert_close("matmul_kernel", a @ b, c, 1e-5 if DEVICE.type == "cpu" else 1e-2)
print(
    f"✓ tiled matmul, 100x70 @ 70x90 with 32-tiles and masked edges: relative RMS error {err:.1e}"
)

# %% [markdown]
# Then the attention kernels' helpers.
#
# Two helpers load and store a tile of rows. A tile in the middle of the sequence needs no row mask, and a
# power-of-two head dim needs no column mask; the helpers then emit plain loads, which the compiler can
# vectorise and pipeline best.

# %%
#| export attention.triton
@triton.jit
def _load_tile(
    base, rows, row_stride, n_rows, cols, N_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """Load the tile [len(rows), len(cols)] at base + rows * row_stride + cols; padding columns (>=
    N_COLS) and,
    when CHECK_ROWS, rows >= n_rows read as 0. Interior tiles of power-of-two width load without
    any mask."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    elif cols.shape[0] != N_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, rows, row_stride, n_rows, cols, N_COLS: tl.constexpr, value):
    """Store `value` [len(rows), len(cols)] in the pointer's dtype, skipping rows >= n_rows and
    padding columns."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N_COLS)
    tl.store(
        base + rows[:, None] * row_stride + cols[None, :],
        value.to(base.dtype.element_ty),
        mask=mask,
    )

# %% [markdown]
# The loop bounds of section 1.5.5 in integers. From `lo` (the start of the first key tile that meets the visible
# range, rounded down to a multiple of $B_N$) to `hi` $= p_1 + 1$, a key tile $[n, n + B_N)$ needs no mask when
# the first row sees its last key, $n + B_N - 1 \le p_0$, the last row still sees its first key, $n > p_1 - W$,
# and the tile lies inside the tensor, $n + B_N \le T_k$. One subtlety: Triton's `//` on integers truncates
# toward zero, like C, rather than flooring like Python; $p_0 - W + 1$ can be negative, so the code clamps at
# zero before dividing.

# %%
#| export attention.triton
@triton.jit
def _ordered(lo, full_lo, full_hi, hi):
    """Clamp so that lo <= full_lo <= full_hi <= hi: the three loops then never overlap or run
    backwards."""
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_range(start_m, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key rows [lo, hi) that the queries [start_m, start_m + BM) need; tiles starting in [full_lo,
    full_hi)
    are visible to every one of those queries and lie inside the tensor, so they need no mask."""
    keys_in_whole_tiles = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        first_pos = start_m + Tk - Tq  # position of the tile's first query
        last_pos = tl.minimum(start_m + BLOCK_M, Tq) - 1 + Tk - Tq  # ... and of its last real query
        hi = last_pos + 1  # keys s <= last_pos
        full_hi = tl.minimum(
            (first_pos + 1) // BLOCK_N * BLOCK_N, keys_in_whole_tiles
        )  # tile end <= first_pos + 1
        if HAS_WINDOW:  # keys s > pos - window; clamp before // (it truncates toward zero)
            lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
            full_lo = (tl.maximum(last_pos - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        else:
            lo = 0
            full_lo = 0
    else:
        lo = 0
        full_lo = 0
        full_hi = keys_in_whole_tiles
        hi = Tk
    return _ordered(lo, full_lo, full_hi, hi)


@triton.jit
def _visible(q_idx, k_idx, Tq, Tk, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs attend: a column of query indices against a row of key indices (or
    the
    transpose) broadcasts to the tile's mask. Only boundary tiles pay for it."""
    keep = (q_idx < Tq) & (k_idx < Tk)
    if CAUSAL:
        pos = q_idx + (Tk - Tq)
        keep = keep & (k_idx <= pos)
        if HAS_WINDOW:
            keep = keep & (k_idx > pos - window)
    return keep

# %% [markdown]
# A picture makes the bounds concrete. The small kernel below asks `_key_range` itself — the very code the
# forward kernel runs — for the bounds of every query tile, and colours each (query tile, key tile) pair:
# skipped, boundary (masked) or interior (no mask). Under the picture, a check that the bounds are right: every
# tile holding a visible pair is visited, no other tile is, and every interior tile is entirely visible.

# %%
@triton.jit
def key_ranges_kernel(OUT, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Program i writes (lo, full_lo, full_hi, hi) of query tile i to OUT[4i : 4i + 4]."""
    i = tl.program_id(0)
    lo, full_lo, full_hi, hi = _key_range(
        i * BLOCK_M, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW
    )
    tl.store(OUT + 4 * i, lo)
    tl.store(OUT + 4 * i + 1, full_lo)
    tl.store(OUT + 4 * i + 2, full_hi)
    tl.store(OUT + 4 * i + 3, hi)


def tile_kinds(Tq, Tk, block_m, block_n, causal=True, window=None):
    """[query tiles, key tiles] array: 0 skipped, 1 boundary (masked), 2 interior — as the kernel
    decides."""
    n_m, n_n = triton.cdiv(Tq, block_m), triton.cdiv(Tk, block_n)
    ranges = torch.zeros(n_m, 4, dtype=torch.int32, device=DEVICE)
    key_ranges_kernel[(n_m,)](
        ranges, Tq, Tk, window or 0, block_m, block_n, causal, window is not None
    )
    kinds = torch.zeros(n_m, n_n, dtype=torch.int64)
    for i, (lo, full_lo, full_hi, hi) in enumerate(ranges.tolist()):
        for n in range(lo, hi, block_n):
            kinds[i, n // block_n] = 2 if full_lo <= n < full_hi else 1
    return kinds


def check_tile_kinds(kinds, Tq, Tk, block_m, block_n, causal, window):
    allowed = attention_mask(Tq, Tk, causal, window)
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = allowed[i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
            assert (kinds[i, j] > 0) == bool(tile.any()), (
                f"tile ({i}, {j}): visited iff it holds a visible pair"
            )
            if kinds[i, j] == 2:
                assert tile.shape[1] == block_n and tile.all(), (
                    f"tile ({i}, {j}) is marked interior but is not"
                )


from matplotlib.colors import ListedColormap

setups = {
    "causal": (512, 512, True, None),
    "window W = 160": (512, 512, True, 160),
    "causal, Tq = 192 < Tk = 512": (192, 512, True, None),
    "not causal, Tq = 192": (192, 512, False, None),
}
fig, axes = plt.subplots(1, len(setups), figsize=(13, 3.6))
for ax, (title, (Tq, Tk, causal, window)) in zip(axes, setups.items()):
    kinds = tile_kinds(Tq, Tk, 64, 64, causal, window)
    check_tile_kinds(kinds, Tq, Tk, 64, 64, causal, window)
    ax.imshow(kinds, cmap=ListedColormap(["#eeeeee", "#f4a259", "#3d7ab8"]), vmin=0, vmax=2,
              extent=(0, Tk, Tq, 0), interpolation="nearest", aspect="auto")
    ax.imshow(attention_mask(Tq, Tk, causal, window).numpy(),
              cmap=ListedColormap(["none", "black"]), alpha=0.15, extent=(0, Tk, Tq, 0),
              interpolation="nearest", aspect="auto")  # the mask itself, faintly
    visited = (kinds > 0).float().mean().item()
    ax.set_title(f"{title}\nvisits {visited:.0%} of the tiles", fontsize=9)
    ax.set_xlabel("key position")
axes[0].set_ylabel("query index")
fig.legend(
    handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#eeeeee", "#f4a259", "#3d7ab8")],
    labels=["skipped", "boundary tile (masked)", "interior tile (no mask)"],
    loc="lower center",
    ncol=3,
    fontsize=8,
    frameon=False,
)
fig.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()
print(
    "✓ 64 x 64 tiles: every tile with a visible pair is visited, no other; interior tiles are "
    "fully visible"
)
# %% [markdown]
# The forward kernel of section 1.5.4. **Layout.** In a contiguous `[B, T, H, D]` tensor, element $(b, t, h, d)$
# sits at offset $((bT + t)H + h)D + d$: consecutive rows of one head are $H \cdot D$ elements apart. The kernel
# computes a base pointer per (batch, head) — in 64-bit, since $B \cdot T \cdot H \cdot D$ can pass $2^{31}$ — and adds
# row and column offsets to it. It finds its query tile and head, loads $Q$ once, runs the three loops, normalises, stores
# $O$ and $L_2$. Late query tiles have the most keys under a causal mask, so the kernel numbers the tiles from
# the end: the longest programs start first and the short ones fill the gaps at the end of the grid.

# %%
#| export attention.triton
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, Tq, Tk, HQ, HKV, qk_scale, window,
                DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """One program = BM queries of one (batch, query head). Grid (cdiv(Tq, BM), B * HQ).

                      key tiles of K/V head hq // GROUP (BN rows each) ->
                  lo        full_lo                     full_hi       hi
                  |  masked  |   interior: no mask needed  |  masked   |  (tiles outside [lo, hi):
                  +----+----+----+----+----+----+----+----+----+----+   skipped)
       Q tile  -> |    |    |    |    |    |    |    |    |    |    |  S = Q Kᵀ [BM, BN] a step,
       [BM, DK]   +----+----+----+----+----+----+----+----+----+----+  acc [BM, DV] += P V (fp32)
                   window's edge                        causal diagonal, end of keys

    Writes O [BM, DV] and LSE [BM] = m + log2(l), the base-2 log-sum-exp that the backward pass
    reuses.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:  # late query tiles have the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    hkv = hq // (HQ // HKV)  # GQA: the K/V head this query head reads

    # (b, t, h, d) sits at ((b*T + t)*H + h)*D + d: base pointers of this (batch, head), in 64-bit
    q_base = Q + (b.to(tl.int64) * Tq * HQ + hq) * DK
    k_base = K + (b.to(tl.int64) * Tk * HKV + hkv) * DK
    v_base = V + (b.to(tl.int64) * Tk * HKV + hkv) * DV
    o_base = O + (b.to(tl.int64) * Tq * HQ + hq) * DV

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # [BM] query indices
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)

    q = _load_tile(q_base, rows, HQ * DK, Tq, offs_dk, DK, True)  # [BM, DK_PAD], loaded once
    m_i = tl.full(
        [BLOCK_M], -1.0e30, tl.float32
    )  # finite: a fully masked first tile must not give NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(
        start_m, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW
    )
    k_stride = HKV * DK
    v_stride = HKV * DV
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, k_stride, v_stride, rows, lo,
                               full_lo, Tq, Tk, qk_scale, window, offs_n, offs_dk, offs_dv, DK, DV,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, k_stride, v_stride, rows, full_lo,
                               full_hi, Tq, Tk, qk_scale, window, offs_n, offs_dk, offs_dv, DK, DV,
                               BLOCK_N, False, CAUSAL, HAS_WINDOW, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, k_stride, v_stride, rows, full_hi,
                               hi, Tq, Tk, qk_scale, window, offs_n, offs_dk, offs_dv, DK, DV,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, PRECISION)

    # every real row saw at least its own key, so l_i > 0 there; rows past Tq are computed but never
    # stored
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_tile(o_base, rows, HQ * DV, Tq, offs_dv, DV, acc / l_safe[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + rows, m_i + tl.math.log2(l_safe), mask=rows < Tq)

# %% [markdown]
# With the helpers and the bounds defined, the forward kernel of section 1.5.4 can be launched by hand, the way
# the op of E.6 launches it: one program per query tile and (batch, head); `qk_scale` carries $\log_2 e$; head
# dim 40 is padded to tiles of 64 columns. Its output must match `attention_ref`, and its base-2 log-sum-exp
# must match section 1.5.3's natural one times $\log_2 e$.

# %%
B, T, HQ, HKV, D = 1, 100, 4, 2, 40
q, k, v = make_qkv(B, T, HQ, D, HKV=HKV, device=DEVICE, dtype=DTYPE)
o = torch.empty_like(q)
lse2 = torch.empty(B, HQ, T, device=DEVICE, dtype=torch.float32)
_fwd_kernel[(triton.cdiv(T, 32), B * HQ)](
    q,
    k,
    v,
    o,
    lse2,
    T,
    T,
    HQ,
    HKV,
    D**-0.5 * _LOG2E,
    16,  # window 16
    DK=D,
    DV=D,
    DK_PAD=64,
    DV_PAD=64,
    BLOCK_M=32,
    BLOCK_N=32,
    CAUSAL=True,
    HAS_WINDOW=True,
    PRECISION=None,
)
tol = TOLERANCES[DTYPE][0]
err = assert_close("forward kernel vs attention_ref", attention_ref(q, k, v, window=16), o, tol)
_, lse_torch = flash_attention_torch(q, k, v, window=16)
assert_close("base-2 log-sum-exp", lse_torch * _LOG2E, lse2, tol)
print(
    f"✓ the forward kernel (window 16, GQA 4:2, head dim 40) matches attention_ref: relative RMS "
    f"error {err:.1e}"
)

# %% [markdown]
# ### E.5 The backward kernels
#
# The three kernels of section 1.5.6. First $\delta = \operatorname{rowsum}(dO \circ O)$, one program per
# query tile:

# %%
#| export attention.triton
@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, Tq, HQ, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr
):
    """One program = BLOCK query rows of one (batch, query head). Grid (cdiv(Tq, BLOCK), B * HQ).

        O tile  [BLOCK, DV] --.
                               (multiply, sum over DV) --> delta [BLOCK]
        dO tile [BLOCK, DV] --'

    delta[b, h, i] = Σ_d dO[b, i, h, d] · O[b, i, h, d]  (= Σ_j P_ij dP_ij, the softmax backward's
    row sums).
    """
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    base = (b.to(tl.int64) * Tq * HQ + hq) * DV  # row 0 of this (batch, head) in O and dO
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] query indices
    offs_dv = tl.arange(0, DV_PAD)
    o = _load_tile(O + base, rows, HQ * DV, Tq, offs_dv, DV, True).to(tl.float32)  # [BLOCK, DV_PAD]
    do = _load_tile(DO + base, rows, HQ * DV, Tq, offs_dv, DV, True).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)

# %% [markdown]
# The dK/dV program needs the transpose of section 1.5.5's question: which query tiles see this key tile? Query $i$ sees key
# $s$ when $s \le i + T_k - T_q$ (and $s > i + T_k - T_q - W$), so the first query that sees the tile's first key
# is $n - (T_k - T_q)$, and with a window the last one that sees its last key is $n + B_N - 1 - (T_k - T_q) + W - 1$.
# The interior query tiles are those whose every row sees every key of the tile — and lie inside the tensor,
# since the interior loop loads query rows without a mask.

# %%
#| export attention.triton
@triton.jit
def _query_range(start_n, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query rows [lo, hi) that see some key of [start_n, start_n + BN); query tiles starting in
    [full_lo, full_hi) see all of those keys and lie inside the tensor. The transpose of
    `_key_range`."""
    queries_in_whole_tiles = (Tq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        shift = Tk - Tq  # query i sits at position i + shift
        last_key = tl.minimum(start_n + BLOCK_N, Tk) - 1
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M  # first query to see start_n
        full_lo = (
            (tl.maximum(last_key - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        )  # sees last_key too
        if HAS_WINDOW:
            hi = tl.minimum(
                last_key - shift + window, Tq
            )  # past the last query that still sees last_key
            full_hi = tl.minimum(tl.maximum(start_n - shift + window, 0) // BLOCK_M * BLOCK_M,
                                 queries_in_whole_tiles)  # tiles whose last row still sees start_n
        else:
            hi = Tq
            full_hi = queries_in_whole_tiles
    else:
        lo = 0
        full_lo = 0
        full_hi = queries_in_whole_tiles
        hi = Tq
    return _ordered(lo, full_lo, full_hi, hi)

# %% [markdown]
# The dK/dV loop works on **transposed** scores, $S^\top = K Q^\top$ of shape $B_N \times B_M$, so that
# $dV \mathrel{+}= P^\top dO$ and $dK \mathrel{+}= dS^\top Q$ come out as $B_N \times D$ products with no transpose
# of a result; $\delta$ and $L_2$ then broadcast along rows, `[None, :]`.

# %%
#| export attention.triton
@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_stride, do_stride, cols,
                start, end, Tq, Tk, qk_scale, window, offs_m, offs_dk, offs_dv,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contributions of the query tiles start, start + BM, ... < end (one query head) to
    dK, dV."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m  # [BM] query indices
        q = _load_tile(q_base, rows, q_stride, Tq, offs_dk, DK, MASKED)  # [BM, DK_PAD]
        do = _load_tile(do_base, rows, do_stride, Tq, offs_dv, DV, MASKED)  # [BM, DV_PAD]
        lse = tl.load(lse_base + rows, mask=rows < Tq, other=0.0)  # [BM] base-2 log-sum-exp
        delta = tl.load(delta_base + rows, mask=rows < Tq, other=0.0)  # [BM]
        s_t = (
            tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        )  # [BN, BM] = (Q Kᵀ)ᵀ, base 2
        p_t = tl.math.exp2(s_t - lse[None, :])  # [BN, BM] Pᵀ, recomputed
        if MASKED:
            keep = _visible(rows[None, :], cols[:, None], Tq, Tk, window, CAUSAL, HAS_WINDOW)
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # [BN, DV]  Pᵀ dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]  (dO Vᵀ)ᵀ
        ds_t = p_t * (dp_t - delta[None, :])  # [BN, BM]  dSᵀ (without σ)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # [BN, DK]  dSᵀ Q
    return dk, dv

# %%
#| export attention.triton
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, Tq, Tk, HQ, HKV, qk_scale, sm_scale,
                     window, DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr,
                     DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """One program = BN keys of one (batch, K/V head); it alone writes their dK, dV. Grid (cdiv(Tk,
    BN), B * HKV).

                       K, V tile [BN, D], loaded once
                              |
        query head g = 0   :  query tiles lo .. hi (BM rows each)  --.
        query head g = 1   :  query tiles lo .. hi                     +--> dK [BN, DK], dV [BN, DV]
        ...   the G = HQ / HKV query heads that share this K/V head  --'

    Per query tile: Pᵀ = exp2(K Qᵀ·qk_scale - L2), dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (V dOᵀ - delta),
    dK += dSᵀ Q.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    group = HQ // HKV

    kv_row0 = b.to(tl.int64) * Tk * HKV + hkv  # (b, 0, hkv) in rows of K, V, dK, dV
    k_base, dk_base = K + kv_row0 * DK, DK_OUT + kv_row0 * DK
    v_base, dv_base = V + kv_row0 * DV, DV_OUT + kv_row0 * DV
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # [BN] key indices
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = _load_tile(k_base, cols, HKV * DK, Tk, offs_dk, DK, True)  # [BN, DK_PAD]
    v = _load_tile(v_base, cols, HKV * DV, Tk, offs_dv, DV, True)  # [BN, DV_PAD]
    dk = tl.zeros([BLOCK_N, DK_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)

    lo, full_lo, full_hi, hi = _query_range(
        start_n, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW
    )
    for g in range(0, group):
        hq = hkv * group + g
        q_row0 = b.to(tl.int64) * Tq * HQ + hq  # (b, 0, hq) in rows of Q, dO
        q_base, do_base = Q + q_row0 * DK, DO + q_row0 * DV
        lse_base = LSE + (b.to(tl.int64) * HQ + hq) * Tq  # LSE and delta are [B, HQ, Tq]
        delta_base = DELTA + (b.to(tl.int64) * HQ + hq) * Tq
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, HQ * DK, HQ * DV,
                             cols, lo, full_lo, Tq, Tk, qk_scale, window, offs_m, offs_dk, offs_dv,
                             DK, DV, BLOCK_M, True, CAUSAL, HAS_WINDOW, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, HQ * DK, HQ * DV,
                             cols, full_lo, full_hi, Tq, Tk, qk_scale, window, offs_m, offs_dk,
                             offs_dv, DK, DV, BLOCK_M, False, CAUSAL, HAS_WINDOW, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, HQ * DK, HQ * DV,
                             cols, full_hi, hi, Tq, Tk, qk_scale, window, offs_m, offs_dk, offs_dv,
                             DK, DV, BLOCK_M, True, CAUSAL, HAS_WINDOW, PRECISION)

    # S = σ Q Kᵀ, so dK carries the factor σ; dV does not. Key tiles that no query sees store zeros.
    _store_tile(dk_base, cols, HKV * DK, Tk, offs_dk, DK, dk * sm_scale)
    _store_tile(dv_base, cols, HKV * DV, Tk, offs_dv, DV, dv)

# %% [markdown]
# The dQ kernel is the forward's tiling run once more, with the forward's loop bounds: load $Q$, $dO$, $L_2$ and
# $\delta$ of the query tile once, then for each key tile recompute $P$ and $dP$ and add $dS\,K$.

# %%
#| export attention.triton
@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, k_stride, v_stride, rows, start, end, Tq, Tk,
              qk_scale, window, offs_n, offs_dk, offs_dv,
              DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contributions of the key tiles start, start + BN, ... < end to dQ [BM, DK_PAD]."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n  # [BN] key indices
        k = _load_tile(k_base, cols, k_stride, Tk, offs_dk, DK, MASKED)  # [BN, DK_PAD]
        v = _load_tile(v_base, cols, v_stride, Tk, offs_dv, DV, MASKED)  # [BN, DV_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN] base 2
        p = tl.math.exp2(s - lse[:, None])  # [BM, BN] P, recomputed
        if MASKED:
            p = tl.where(
                _visible(rows[:, None], cols[None, :], Tq, Tk, window, CAUSAL, HAS_WINDOW), p, 0.0
            )
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]  dO Vᵀ
        ds = p * (dp - delta[:, None])  # [BM, BN]  dS (without σ)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # [BM, DK]  dS K
    return dq

# %%
#| export attention.triton
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ_OUT, Tq, Tk, HQ, HKV, qk_scale, sm_scale, window,
                   DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """One program = BM queries of one (batch, query head). Grid (cdiv(Tq, BM), B * HQ).

                      key tiles, with the forward's bounds (_key_range)
                  lo                                           hi
                  +------+------+------+------+------+------+
       Q, dO   -> | mask |          interior          | mask |   P = exp2(Q Kᵀ·qk_scale - L2)
       [BM, D]    +------+------+------+------+------+------+  dS = P∘(dO Vᵀ - delta), dQ += σ dS K
    """
    pid_m = tl.program_id(0)
    if CAUSAL:  # late query tiles have the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    hkv = hq // (HQ // HKV)

    q_base = Q + (b.to(tl.int64) * Tq * HQ + hq) * DK
    do_base = DO + (b.to(tl.int64) * Tq * HQ + hq) * DV
    k_base = K + (b.to(tl.int64) * Tk * HKV + hkv) * DK
    v_base = V + (b.to(tl.int64) * Tk * HKV + hkv) * DV

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_tile(q_base, rows, HQ * DK, Tq, offs_dk, DK, True)  # [BM, DK_PAD]
    do = _load_tile(do_base, rows, HQ * DV, Tq, offs_dv, DV, True)  # [BM, DV_PAD]
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, DK_PAD], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(
        start_m, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW
    )
    k_stride = HKV * DK
    v_stride = HKV * DV
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, k_stride, v_stride, rows, lo, full_lo, Tq,
                   Tk, qk_scale, window, offs_n, offs_dk, offs_dv, DK, DV, BLOCK_N, True, CAUSAL,
                   HAS_WINDOW, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, k_stride, v_stride, rows, full_lo,
                   full_hi, Tq, Tk, qk_scale, window, offs_n, offs_dk, offs_dv, DK, DV, BLOCK_N,
                   False, CAUSAL, HAS_WINDOW, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, k_stride, v_stride, rows, full_hi, hi, Tq,
                   Tk, qk_scale, window, offs_n, offs_dk, offs_dv, DK, DV, BLOCK_N, True, CAUSAL,
                   HAS_WINDOW, PRECISION)
    dq_base = DQ_OUT + (b.to(tl.int64) * Tq * HQ + hq) * DK
    _store_tile(dq_base, rows, HQ * DK, Tq, offs_dk, DK, dq * sm_scale)

# %% [markdown]
# ### E.6 The op: launch configurations, input checks, autograd
#
# **Launch configurations.** Bigger tiles reuse each load more, but every tile must fit in the multiprocessor's shared
# memory several times over (the compiler *pipelines* the loop: it loads tile $j+1$ while computing on tile $j$,
# `num_stages` deep) and its accumulators in registers. Every kernel of the book takes these settings from one table,
# `runtime.LAUNCH_TABLE`: for each kernel and GPU architecture it lists `BLOCK_M`, `BLOCK_N`, `num_warps` and
# `num_stages`, best first. The first entry of the Hopper row (`sm_90`) is the fastest of a sweep on an H200
# (`bench/attention.py --sweep`; `bench/notes/attention.md` has the numbers); the narrower entries after it are
# autotuning candidates and fallbacks; GPUs of other architectures read their own row (a T4, which has none, the sm_80
# row). Head dims over 128 read the rows named `….d256`, with narrower tiles. `runtime.launch` tries a row in order,
# keeps the first configuration that compiles within the GPU's shared memory (Triton raises `OutOfResources` before
# running one that does not) and remembers it for the next call. The interpreter's row is one large tile: it runs each
# tile operation as one numpy call, so fewer, bigger steps are faster. Tests force a configuration with
# `runtime.launch_config("attention.fwd", BLOCK_M=16, BLOCK_N=16)`; benchmarks can let Triton's autotuner pick from
# the row with `runtime.set_autotune(True)`.

# %%
for row, configs in runtime.LAUNCH_TABLE["attention.fwd"].items():
    print(f"attention.fwd  {row:12s}", "   ".join(
        f"{c['BLOCK_M']}x{c['BLOCK_N']}/{c['num_warps']}w/{c['num_stages']}s" for c in configs))
print("(BLOCK_M x BLOCK_N / warps / pipeline stages; the interpreter ignores warps and stages)")

# %% [markdown]
# **Input checks.** `flash_attention` accepts what `attention_ref` accepts, so it starts with section 1.2's
# `check_attention_args`; then it asks what the kernels need, with the book's shared checks: fp32, fp16 or bf16;
# CUDA tensors, or CPU tensors under the interpreter — in fp32 or fp16, since the interpreter's bf16 `tl.dot`
# gives wrong results; head dims that fit one on-chip tile (up to 256); row offsets that fit 32 bits. Each failure
# names the argument, what was expected and what came, and a Triton op called on CPU tensors without the
# interpreter says how to switch it on.

# %%
#| export attention.triton
_INSTEAD = "attention_ref (PyTorch), which has no limit on the head dims"


def _check_flash_args(q, k, v, causal, scale, window):
    """Validate flash_attention's arguments and return the scale as a float."""
    # the kernels' dtypes first, so that the error lists those (section 1.2 also allows fp64)
    if all(torch.is_tensor(x) and x.is_floating_point() for x in (q, k, v)):
        _checks.same_dtype("flash_attention", _checks.KERNEL_FLOATS, q=q, k=k, v=v)
    scale = check_attention_args("flash_attention", q, k, v, causal, window, scale)  # section 1.2
    (_, Tq, HQ, DK), (_, Tk, HKV, DV) = q.shape, v.shape
    _checks.triton_inputs("flash_attention", q, k, v,
                          max_dims={"q/k head dim": (DK, 256), "v head dim": (DV, 256)},
                          instead=_INSTEAD)
    if max(Tq * HQ, Tk * HKV) * max(DK, DV) >= 2**31:  # row offsets in a batch element: 32-bit
        raise ValueError(
            f"flash_attention: one batch element of q, k, v or o must hold fewer than 2**31 "
            f"values, got Tq * HQ * D = {Tq * HQ * max(DK, DV)}, "
            f"Tk * HKV * D = {Tk * HKV * max(DK, DV)}"
        )
    return scale

# %% [markdown]
# **Host side.** `_forward` allocates $O$ and $L_2$ and launches one kernel; `_backward` launches the three. Each
# launch names its row of the table; `grid(config)` turns the configuration's tile heights into the number of
# programs. The outputs are allocated with `torch.empty`, uninitialised: the kernels write every element (the
# tests' `poisoned` fixture fills every `torch.empty` with NaN to prove it). The `torch.autograd.Function` saves
# $Q$, $K$, $V$, $O$ and $L_2$ — linear in $T$ — for the backward pass. `flash_attention` checks its inputs, makes
# the tensors contiguous and applies it — or, when nothing needs a gradient, calls `_forward` directly: at short
# lengths the GPU finishes a kernel sooner than Python issues it, so every microsecond on the host is one the GPU
# waits (`bench/notes/attention.md` measures them).

# %%
#| export attention.triton
def _constexprs(q, v, causal, window):
    """The compile-time constants of a call: head dims and their power-of-two padding, mask flags,
    precision. One dict per combination, built once (callers must not modify it)."""
    key = (q.shape[-1], v.shape[-1], q.dtype, bool(causal), window is not None)
    meta = _CONSTEXPRS.get(key)
    if meta is None:
        DK, DV, dtype, causal, has_window = key
        meta = _CONSTEXPRS[key] = dict(
            DK=DK, DV=DV, DK_PAD=max(16, triton.next_power_of_2(DK)),
            DV_PAD=max(16, triton.next_power_of_2(DV)), CAUSAL=causal, HAS_WINDOW=has_window,
            # fp32 in means fp32 products, not tf32
            PRECISION="ieee" if dtype == torch.float32 else None)
    return meta


_CONSTEXPRS = {}  # (DK, DV, dtype, causal, windowed) -> _constexprs: every call asks


def _row(kernel, meta):
    """The LAUNCH_TABLE name of "fwd", "dkdv" or "dq" for this call: head dims over 128 take the
    ".d256" rows."""
    return f"attention.{kernel}" + (".d256" if max(meta["DK_PAD"], meta["DV_PAD"]) > 128 else "")


def _options(q, meta):
    """runtime.launch's keywords shared by the three tiled kernels: the chosen configuration is
    remembered per
    padded head dims (they set the shared memory a tile needs); the autotuner retunes per length
    and mask."""
    return dict(device=q.device, dtype=q.dtype, key=(meta["DK_PAD"], meta["DV_PAD"]),
                autotune_key=["Tq", "Tk", "DK_PAD", "DV_PAD", "CAUSAL", "HAS_WINDOW"],
                instead=_INSTEAD)


def _forward(q, k, v, causal, scale, window):
    """o [B, Tq, HQ, DV] and lse [B, HQ, Tq] (base 2) from q [B, Tq, HQ, DK], k [B, Tk, HKV, DK], v
    [B, Tk, HKV, DV]."""
    B, Tq, HQ, _ = q.shape
    Tk, HKV, DV = k.shape[1], k.shape[2], v.shape[-1]
    meta = _constexprs(q, v, causal, window)
    o = torch.empty(B, Tq, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, Tq, device=q.device, dtype=torch.float32)
    runtime.launch(
        _row("fwd", meta),
        _fwd_kernel,
        lambda c: (triton.cdiv(Tq, c["BLOCK_M"]), B * HQ),
        (q, k, v, o, lse, Tq, Tk, HQ, HKV, scale * _LOG2E, window or 0),
        meta,
        **_options(q, meta),
    )
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale, window):
    """dq [B, Tq, HQ, DK], dk [B, Tk, HKV, DK], dv [B, Tk, HKV, DV] from do [B, Tq, HQ, DV]."""
    B, Tq, HQ, _ = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    meta = _constexprs(q, v, causal, window)
    delta = torch.empty(B, HQ, Tq, device=q.device, dtype=torch.float32)
    runtime.launch(
        "attention.delta",
        _bwd_delta_kernel,
        lambda c: (triton.cdiv(Tq, c["BLOCK"]), B * HQ),
        (o, do, delta, Tq, HQ),
        dict(DV=meta["DV"], DV_PAD=meta["DV_PAD"]),
        device=q.device,
        dtype=q.dtype,
        instead=_INSTEAD,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (Tq, Tk, HQ, HKV, scale * _LOG2E, scale, window or 0)
    runtime.launch(
        _row("dkdv", meta),
        _bwd_dkdv_kernel,
        lambda c: (triton.cdiv(Tk, c["BLOCK_N"]), B * HKV),
        (q, k, v, do, lse, delta, dk, dv, *common),
        meta,
        **_options(q, meta),
    )
    runtime.launch(
        _row("dq", meta),
        _bwd_dq_kernel,
        lambda c: (triton.cdiv(Tq, c["BLOCK_M"]), B * HQ),
        (q, k, v, do, lse, delta, dq, *common),
        meta,
        **_options(q, meta),
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward saves q, k, v, o and the base-2 log-sum-exp; the backward
    recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window):
        o, lse = _forward(q, k, v, causal, scale, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.scale, ctx.window)
        return dq, dk, dv, None, None, None

# %%
#| export attention.triton
def flash_attention(q, k, v, causal=True, scale=None, window=None):
    """Softmax attention computed tile by tile in Triton (flash attention), with forward and
    backward kernels.

    Args:
        q: queries `[B, Tq, HQ, DK]`.
        k: keys `[B, Tk, HKV, DK]` with `HQ % HKV == 0` (GQA: query head h reads K/V head
            h // (HQ // HKV); K and V are never repeated in memory) and, when causal, `Tq <= Tk`.
        v: values `[B, Tk, HKV, DV]`; DV may differ from DK. Head dims up to 256, any size
            (padded inside).
        causal: query i attends to keys s <= i + Tk - Tq (bottom-right alignment: the queries
            are the last Tq positions, as when decoding after a KV cache; with Tq == Tk this is
            SDPA's `is_causal`).
        scale: multiplies q·k, a positive number; None means DK ** -0.5.
        window: sliding-window length W, a positive int (needs causal): the query at position p
            sees keys p - W < s <= p.

    q, k, v share a dtype and a device: float16, bfloat16 or float32 on CUDA; float32 or float16
    on CPU tensors, where the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which
    `import minisparse` sets on machines without a GPU) — bfloat16 there raises a TypeError,
    because the interpreter's bf16 `tl.dot` is wrong (triton 3.3–3.8): use float32 on CPU.
    Products accumulate in float32. Empty inputs (B, Tq or Tk = 0) go through `attention_ref`.

    Returns:
        o `[B, Tq, HQ, DV]` in q's dtype, differentiable with respect to q, k and v.
    """
    scale = _check_flash_args(q, k, v, causal, scale, window)
    if window is not None and window >= k.shape[1]:  # every key is inside it: plain causal (and no
        window = None  # 32-bit overflow of position + window in the kernels' loop bounds)
    if q.numel() == 0 or k.numel() == 0:  # nothing to attend: an empty grid cannot launch
        return attention_ref(q, k, v, causal=causal, scale=scale, window=window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, window)
    return _forward(q, k, v, causal, scale, window)[0]  # nothing to differentiate: no autograd node

# %% [markdown]
# ### E.7 The layer's argument checks and transformers' weights
#
# A Qwen3-Next-shaped layer, built on the `meta` device so that no memory is allocated: 16 query heads with their
# gates, 2 K/V heads of 256 channels, RoPE on 64 of them.

# %%
with torch.device("meta"):
    big = Attention(
        2048, 16, 2, 256, gate=True, qk_norm=True, zero_centered_norm=True, rotary_dim=64
    )
for name, p in big.named_parameters():
    print(f"{name:16s} {str(tuple(p.shape)):14s} {p.numel() / 1e6:6.2f} M")
print(f"{'total':16s} {'':14s} {sum(p.numel() for p in big.parameters()) / 1e6:6.2f} M")

# %% [markdown]
# The per-head RMSNorm of the q/k norm, in fp32, with Qwen3-Next's zero-centred weight as an option:

# %%
#| export attention.layer
class RMSNorm(nn.Module):
    """x / rms(x) times weight (1 + weight when zero_centered, as Qwen3-Next); computed in fp32."""

    def __init__(self, dim, eps=1e-6, zero_centered=False):
        super().__init__()
        _checks.positive_int("RMSNorm", "dim", dim)
        self.eps, self.zero_centered = _checks.positive_float("RMSNorm", "eps", eps), zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() + 1.0 if self.zero_centered else self.weight.float()
        return (y * w).to(x.dtype)


# %% [markdown]
# `Attention`'s constructor checks its arguments here, with the book's shared checks:

# %%
#| export attention.layer
def _attention_args(hidden_size, num_heads, num_kv_heads, head_dim, rotary_dim, window, norm_eps,
                    rope_theta, backend):
    """Check Attention's constructor arguments; return num_kv_heads, head_dim and rotary_dim with
    defaults filled."""
    op = "Attention"
    _checks.positive_int(op, "hidden_size", hidden_size)
    _checks.positive_int(op, "num_heads", num_heads)
    num_kv_heads = (
        num_heads
        if num_kv_heads is None
        else _checks.positive_int(op, "num_kv_heads", num_kv_heads)
    )
    _checks.divides(op, "num_kv_heads", num_kv_heads, "num_heads", num_heads)
    derived = head_dim is None
    if derived:  # the Llama convention: the heads split the hidden size
        _checks.divides(op, "num_heads (with head_dim=None)", num_heads, "hidden_size", hidden_size)
        head_dim = hidden_size // num_heads
    _checks.positive_int(op, "head_dim", head_dim)
    if rotary_dim is None and head_dim % 2:  # RoPE on the whole head, which must hold pairs
        source = f" (hidden_size {hidden_size} / num_heads {num_heads})" if derived else ""
        raise ValueError(f"{op}: head_dim must be even for RoPE on the whole head (it rotates "
                         f"pairs of channels), got {head_dim}{source}; or pass an even "
                         "rotary_dim < head_dim")
    rotary_dim = (
        head_dim if rotary_dim is None else _checks.positive_int(op, "rotary_dim", rotary_dim)
    )
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"{op}: rotary_dim must be even and <= head_dim = {head_dim}, got {rotary_dim}"
        )
    if window is not None:
        _checks.positive_int(op, "window", window)
    _checks.positive_float(op, "norm_eps", norm_eps)
    _checks.positive_float(op, "rope_theta", rope_theta)
    _checks.backend(op, backend)
    return num_kv_heads, head_dim, rotary_dim


# %% [markdown]
# `Attention.from_hf(module)` calls the loader below: it reads the module's shapes and settings — GQA, the q/k
# norm and whether it scales by $w$ or $1 + w$, partial RoPE, the gate folded into `q_proj`, a sliding window —
# builds the layer and copies the weights, whose names already match.

# %%
#| export attention.hf
import torch

from minisparse import _checks


def attention_from_hf(cls, module, backend="auto"):
    """A `cls` (Attention) with the shapes and weights of a transformers attention module (Llama,
    Mistral,
    Qwen2/3, Qwen3-Next …). Only plain RoPE is read; scaled variants raise NotImplementedError."""
    _checks.hf_module("Attention.from_hf", module, "a transformers softmax attention module "
                      "(LlamaAttention, Qwen3Attention, Qwen3NextAttention, MixtralAttention …)",
                      attrs=("head_dim", "q_proj", "k_proj", "v_proj", "o_proj"),
                      config_attrs=("hidden_size", "num_attention_heads", "num_key_value_heads"))
    cfg = module.config
    rope = getattr(cfg, "rope_parameters", None) or {
        "rope_theta": getattr(cfg, "rope_theta", 10000.0)
    }
    if "rope_theta" not in rope or rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"Attention.from_hf: only plain RoPE is implemented, got {rope}")
    H, D = cfg.num_attention_heads, module.head_dim
    qk_norm = getattr(module, "q_norm", None) is not None
    norm = module.q_norm if qk_norm else None
    layer = cls(cfg.hidden_size, H, cfg.num_key_value_heads, D, bias=module.q_proj.bias is not None,
                o_bias=module.o_proj.bias is not None, gate=module.q_proj.out_features == 2 * H * D,
                qk_norm=qk_norm, zero_centered_norm=qk_norm and _scales_by_one_plus_weight(norm),
                norm_eps=getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)),
                rope_theta=rope["rope_theta"],
                rotary_dim=int(D * rope.get("partial_rotary_factor", 1.0)),
                window=getattr(module, "sliding_window", getattr(cfg, "sliding_window", None)),
                backend=backend)
    w = module.q_proj.weight
    layer.load_state_dict(module.state_dict())
    return layer.to(device=w.device, dtype=w.dtype)


def _scales_by_one_plus_weight(norm):
    """True when an RMSNorm computes x̂·(1 + w) (Qwen3-Next, Gemma), False for x̂·w (Llama, Qwen3):
    ask it."""
    with torch.no_grad():
        w = norm.weight.float()
        x = torch.full((1, w.numel()), 1e3, dtype=norm.weight.dtype, device=norm.weight.device)
        y = norm(x).float()
    return bool((y - (1 + w)).abs().max() < (y - w).abs().max())  # x = 1e3 everywhere has x̂ = 1

# %% [markdown]
# And the second oracle: transformers' own `Qwen3NextAttention` at a tiny configuration. `from_hf` reads its
# shapes (gate, zero-centred q/k norm, partial RoPE) and copies its weights; the outputs must agree.

# %%
try:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # fla, imported by transformers' Qwen3-Next, warns that there is no GPU
        from transformers import Qwen3NextConfig
        from transformers.models.qwen3_next import modeling_qwen3_next as hf_qwen3_next
except ImportError:
    print("transformers (with Qwen3-Next) is not installed: skipping the comparison")
else:
    cfg = Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          num_hidden_layers=4, attn_implementation="eager")
    torch.manual_seed(2)
    hf = hf_qwen3_next.Qwen3NextAttention(cfg, layer_idx=3).eval()
    with torch.no_grad():
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.2)
        ours = Attention.from_hf(hf)
        x = torch.randn(2, 19, 64)
        cos_sin = hf_qwen3_next.Qwen3NextRotaryEmbedding(cfg)(x, torch.arange(19)[None])
        causal = torch.full((19, 19), float("-inf")).triu(1)[
            None, None
        ]  # additive mask [1, 1, T, T]
        y_hf, _ = hf(x, cos_sin, causal)
    err = assert_close("Attention vs Qwen3NextAttention", y_hf, ours(x), 1e-5)
    print(f"✓ gate={ours.gate}, rotary_dim={ours.rotary_dim} of {ours.head_dim}: "
          f"matches transformers' Qwen3NextAttention, relative RMS error {err:.1e}")

# %% [markdown]
# The same layer on either backend: `"naive"` runs `attention_ref`, `"triton"` section 1.5's kernels; the outputs
# must agree within the book's tolerance for the dtype. And a wrong argument or input says what to fix.

# %%
torch.manual_seed(3)
layer = Attention(64, 4, 2, 32, gate=True, backend="naive").to(device=DEVICE, dtype=DTYPE)
x = torch.randn(1, runtime.reading_size(cpu=20, gpu=1000), 64, device=DEVICE, dtype=DTYPE)
with torch.no_grad():
    ref = layer(x)
    layer.backend = "triton"
    fast = layer(x)
err = assert_close("backend='triton' vs 'naive'", ref, fast, TOLERANCES[DTYPE][0])
print(
    f"✓ backend='triton' equals backend='naive' in {str(DTYPE)[6:]}: relative RMS error {err:.1e}"
)
for wrong in (lambda: Attention(64, 4, 3), lambda: layer(x.double())):
    try:
        wrong()
    except (TypeError, ValueError) as e:
        print(f"{type(e).__name__}: {e}")

# %% [markdown]
# ### E.8 Timing on a GPU
#
# On a GPU the chapter also times a few sizes live (`minisparse.bench.median_ms`, CUDA events): the reference,
# which writes the scores to memory, against SDPA and, when present, our kernel.

# %%
if runtime.has_gpu():
    impls = {
        "attention_ref": attention_ref,
        "SDPA": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2),
        "flash_attention": flash_attention,
    }
    for T in (1024, 2048, 4096):
        q, k, v = make_qkv(2, T, 16, 128, dtype=DTYPE, device=DEVICE)
        times = {name: bench.median_ms(lambda f=f: f(q, k, v)) for name, f in impls.items()}
        flops = attention_flops(T, 128, 16, B=2)
        print(f"T={T:5d}  " + "  ".join(f"{n} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)"
                                       for n, ms in times.items()))
else:
    print("No GPU here: nothing to time live (the plot above shows the committed H200 numbers).")

# %% [markdown]
# ### E.9 The exercise checkers
#
# Each checker runs the reader's answer and the chapter's spec on the same cases and raises `ExerciseError` at
# the first difference (`minisparse.testing.check` for functions; a direct launch for the Triton kernel, which
# has no row in the launch table). `tests/test_attention.py` feeds each one known-wrong answers.

# %%
#| export attention.exercises
import warnings

import torch
import triton

from minisparse import runtime
from minisparse.attention.naive import attention_ref
from minisparse.testing import ExerciseError, check


def _merge_softmax_states(m1, l1, a1, m2, l2, a2):
    m = torch.maximum(m1, m2)  # [N]
    c1, c2 = torch.exp(m1 - m), torch.exp(m2 - m)  # [N]
    return m, c1 * l1 + c2 * l2, c1[:, None] * a1 + c2[:, None] * a2


def softmax_state(s, v):
    """(m, l, acc) of scores s [N, n] over values v [n, Dv]: row max, sum of exp(s - m), exp(s - m)
    @ v."""
    m = s.max(dim=-1).values  # [N]
    p = torch.exp(s - m[:, None])  # [N, n]
    return m, p.sum(dim=-1), p @ v  # [N], [N], [N, Dv]


def _online_softmax_cases():
    g = torch.Generator().manual_seed(11)
    cases = []
    for N, n1, n2, Dv, shift in [(4, 3, 5, 8, 0.0), (6, 16, 16, 4, 100.0), (5, 1, 7, 3, -60.0),
                                 (3, 8, 2, 5, 20.0)]:
        s = torch.randn(N, n1 + n2, generator=g) * 3 + shift  # [N, n1 + n2] scores, fp32
        s[: N // 2, n1:] += 6.0  # some rows have their max in the second block, some in the first
        v = torch.randn(n1 + n2, Dv, generator=g)
        cases.append(softmax_state(s[:, :n1], v[:n1]) + softmax_state(s[:, n1:], v[n1:]))
    m2, l2, a2 = cases[0][3:]
    empty = (torch.full_like(m2, float("-inf")), torch.zeros_like(l2), torch.zeros_like(a2))
    cases.append(empty + (m2, l2, a2))  # the kernel's first step: merging into the empty state
    return cases


def check_online_softmax(merge):
    """Exercise 1: merge(m1, l1, a1, m2, l2, a2) -> (m, l, a), the state of two blocks of keys
    together."""
    check(
        "online softmax merge",
        merge,
        _merge_softmax_states,
        _online_softmax_cases(),
        tol=1e-5,
        hint="rescale each state to the new max m = max(m1, m2): l = exp(m1 - m) l1 + exp(m2 - "
             "m) l2, "
        "the same for a; never exponentiate a score or a max on its own (exp(100) overflows fp32)",
    )


def _decode_reference(q, k, v):
    return attention_ref(q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0]  # [Tq, D]


def check_decode_attention(decode):
    """Exercise 2: decode(q [Tq, D], k [Tk, D], v [Tk, D]) -> [Tq, D], the newest Tq queries over
    Tk keys."""
    g = torch.Generator().manual_seed(5)
    cases = [tuple(torch.randn(n, D, generator=g, dtype=torch.float64) for n in (Tq, Tk, Tk))
             for Tq, Tk, D in [(6, 6, 8), (1, 9, 8), (3, 10, 4), (5, 7, 16)]]
    check(
        "decode attention",
        decode,
        _decode_reference,
        cases,
        tol=1e-10,
        hint="where do the Tq new queries sit among the Tk positions, and which keys may the first "
             "of them see? Compare your mask with the one for Tq = Tk",
    )


def _kv_cache_bytes(
    layer_types, num_kv_heads, head_dim, seq_len, batch=1, dtype_bytes=2, window=None
):
    held = {"full_attention": seq_len, "linear_attention": 0,
            "sliding_attention": seq_len if window is None else min(seq_len, window)}
    return sum(2 * batch * held[t] * num_kv_heads * head_dim * dtype_bytes for t in layer_types)


def check_kv_cache_bytes(kv_cache_bytes):
    """Exercise 3: kv_cache_bytes(layer_types, num_kv_heads, head_dim, seq_len, batch, dtype_bytes,
    window)."""
    qwen3_next = (
        ["linear_attention"] * 3 + ["full_attention"]
    ) * 12  # 48 layers, 12 with a KV cache
    gpt_oss = ["sliding_attention", "full_attention"] * 18  # 36 layers, window 128
    gemma3_4b = (["sliding_attention"] * 5 + ["full_attention"]) * 5 + [
        "sliding_attention"
    ] * 4  # window 1024
    llama2 = ["full_attention"] * 32
    cases = [(llama2, 32, 128, 4096, 1, 2, None), (llama2, 8, 128, 1000, 4, 2, None),
             (qwen3_next, 2, 256, 262144, 1, 2, None), (gpt_oss, 8, 64, 131072, 2, 2, 128),
             (gemma3_4b, 4, 256, 131072, 1, 2, 1024), (gemma3_4b, 4, 256, 1000, 3, 1, 1024),
             (gemma3_4b, 4, 256, 2048, 1, 2, None)]
    check(
        "KV-cache bytes",
        kv_cache_bytes,
        _kv_cache_bytes,
        cases,
        hint="per layer: 2 (K and V) x batch x cached tokens x num_kv_heads x head_dim x "
             "dtype_bytes; a full layer caches seq_len tokens, a sliding one min(seq_len, window) "
             "(seq_len when window is None), "
             "a linear one none",
    )

# %%
#| export attention.exercises
def check_flash_tile(kernel, block=16):
    """Exercise 4: launch kernel[(cdiv(T, block),)](q, k, v, o, T, scale, D=D, BM=block, BN=block)
    on q, k, v [T, D] fp32 and compare o with causal attention_ref; report the first position that
    differs."""
    device = runtime.device()
    tol = 1e-4 if device.type == "cpu" else 2e-2  # on a GPU, tl.dot on fp32 multiplies in tf32
    g = torch.Generator().manual_seed(7)
    for T, D, large in [(37, 16, False), (16, 16, False), (50, 32, False), (5, 16, False),
                        (29, 16, True)]:
        q = 1.5 * torch.randn(T, D, generator=g)  # [T, D] sharper scores: the running max moves
        k, v = torch.randn(2, T, D, generator=g)  # [T, D] each
        if large:  # every score about 100 (exact in tf32 too): plain exp(s) overflows fp32
            q[:, 0], k[:, 0] = 100.0, 4.0
        q, k, v = q.to(device), k.to(device), v.to(device)
        o = torch.full_like(q, float("nan"))  # a row the kernel forgets to write stays NaN
        with warnings.catch_warnings():  # numpy's warning on 0 / 0 in the interpreter: see below
            warnings.simplefilter("ignore", RuntimeWarning)
            kernel[(triton.cdiv(T, block),)](q, k, v, o, T, D**-0.5, D=D, BM=block, BN=block)
        expected = _decode_reference(q, k, v)  # [T, D]
        bad = ~((o - expected).abs() <= tol * (1 + expected.abs()))  # NaN counts as wrong
        if bad.any():
            r, c = (int(i) for i in bad.nonzero()[0])
            if large:
                why = ("every score is near 100 here, where exp(s) overflows: subtract the running "
                       "max")
            elif o.isnan().all():
                why = "every output is NaN (0 / 0): the loop body has not updated m, l and acc yet"
            elif r < block:
                why = "rows of the first tile differ: check the mask (row r sees keys 0 .. r)"
            else:
                why = "later rows differ: rescale l and acc by exp(m - m_new) when m grows"
            got = float(o[r, c])
            raise ExerciseError(
                f"✗ flash tile: T={T}, D={D}: row {r}, column {c}: got {got:.5g}, expected "
                f"{float(expected[r, c]):.5g} ({int(bad.any(1).sum())} of {T} rows differ)"
                f"\nHint: {why}"
            )
    print("✓ flash tile: all 5 cases match causal attention_ref")

