# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -execution
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
# # Chapter 4 — Linear attention and Lightning Attention
#
# Softmax attention remembers everything: to produce token $t$ it reads the keys and values of all $t$ earlier
# tokens, so its cache and its cost per token grow with the context. *Linear attention* drops the softmax and, with
# it, that growth: the past is folded into one fixed-size matrix, the **state**, which every new token updates and
# reads. MiniMax's *Lightning Attention* is linear attention with a per-head exponential decay, computed block by
# block so that it runs at tensor-core speed; MiniMax-01 and MiniMax-M1 use it in seven of every eight layers.
#
# **You will learn to**
#
# - derive the parallel, recurrent and chunkwise forms of (decayed) linear attention and say what each costs;
# - compute MiniMax's per-head, per-layer decay rates and read a head's memory span off them;
# - write the chunkwise form — intra-chunk $(QK^\top \odot D)V$, inter-chunk through the state — in PyTorch and
#   as Triton kernels, checked against the recurrence;
# - build MiniMax's lightning layer, load it from `transformers` and decode token by token from its state;
# - weigh the hybrid (7 lightning : 1 softmax) against its cost and its limited recall.
#
# **Prerequisites**: chapter 1 (causal attention, the `[B, T, H, D]` layout, how a Triton program tiles a matrix);
# matrix products and geometric series. **Time**: about 1.5 hours for the core path, plus the exercises.
#
# **Roadmap**
#
# - 4.1 *Why*: one computation in three forms, and a state that does not grow; 4.2 *Decay*: MiniMax's slopes;
# - 4.3 *Naive*: the recurrence (the spec) and Lightning Attention's chunk form; 4.4 *Fast*: the chunk form in
#   Triton, kernel by kernel; 4.5 *The layer*, as MiniMax builds it;
# - 4.6 *Hybrids*: MiniMax-M1's 7 : 1 stack, its generation cost, and what a fixed state cannot recall;
# - 4.7 *See it*: where the chunks cut the decay matrix; 4.8 *Measure*: the H100 numbers; 4.9 *Exercises*; then
#   a summary, references and the optional engineering notes (backward and decoding kernels, launch plumbing).
#
# Layout `[B, T, H, D]` as everywhere in the book; a state is `[B, H, K, V]`. On a laptop CPU the chapter runs in
# a few minutes, the Triton kernels in the interpreter. **[S]** is the seed survey (see References); model shapes
# come from `transformers`' configuration classes and the MiniMax-01 and MiniMax-M1 reports.

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
import torch.nn.functional as F

from minisparse import bench, runtime, viz
from minisparse.testing import assert_close, make_bthd

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

# transformers is a test dependency: without it, the cells that compare against it skip
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: the checks against MiniMax's layer are skipped")

# %% [markdown]
# ## 4.1 Why: a state that does not grow
#
# Causal softmax attention for one head computes, for each query $q_t$ (a row vector of size $K$),
#
# $$
# o_t = \sum_{s \le t} \frac{\exp(q_t k_s^\top / \sqrt K)}{\sum_{s' \le t} \exp(q_t k_{s'}^\top/\sqrt K)}\, v_s .
# $$
#
# The softmax couples $q_t$ to every key separately, so all $t$ keys and values must be kept: the **KV cache**
# grows linearly with $T$ and the work for the whole sequence quadratically. Katharopoulos et al. (2020) replaced
# the exponential by a product of feature maps, $\phi(q)\phi(k)^\top$ with $\phi = \mathrm{elu} + 1 > 0$, and kept
# the normaliser:
#
# $$
# o_t = \frac{\phi(q_t) \sum_{s \le t} \phi(k_s)^\top v_s}{\phi(q_t) \sum_{s \le t} \phi(k_s)^\top} ,
# $$
#
# where both sums are running totals that no longer depend on the query. TransNormer (Qin et al., 2022) traced the
# unstable training of such models to that denominator, dropped it and normalised the layer's output instead (the
# RMSNorm of section 4.5). Without the normaliser, and with $\phi$ folded into the projections, the sum regroups into
# a plain matrix:
#
# $$
# o_t = \sum_{s \le t} (q_t k_s^\top)\, v_s
#     = q_t \underbrace{\sum_{s \le t} k_s^\top v_s}_{S_t \,\in\, \mathbb R^{K\times V}},
# \qquad S_t = S_{t-1} + k_t^\top v_t .
# $$
#
# Everything the past contributes is now in $S_t$, a $K \times V$ matrix whose size does not depend on $t$. The same
# numbers can be computed three ways:
#
# - **parallel**: $O = (QK^\top \odot M)\,V$ with the causal mask $M$ — like attention, $O(T^2)$ work, all tokens
#   at once (good for training, no state);
# - **recurrent**: $S_t = S_{t-1} + k_t^\top v_t$, $o_t = q_t S_t$ — $O(T)$ work, one token at a time (good for
#   decoding, but a sequential loop of tiny outer products that leaves tensor cores idle);
# - **chunkwise**: cut the sequence into chunks of $C$ tokens; inside a chunk use the parallel form, across chunks
#   carry the state. With head dimension $d$ that is $O(TCd + Td^2)$ work per head: $T/C$ quadratic blocks of
#   $O(C^2 d)$ each, plus $T/C$ state products of $O(C d^2)$ each — all matrix multiplies. This is the form every
#   fast linear-attention kernel uses, and the one this chapter builds.
#
# The three below are written for one head, without decay (section 4.2 adds it), and agree to rounding:

# %%
def parallel_form(q, k, v):
    """O = (Q Kᵀ ⊙ causal mask) V for one head: q, k [T, K], v [T, V] -> [T, V]."""
    T = q.shape[0]
    mask = torch.ones(T, T, dtype=q.dtype).tril()  # [T, T] s <= t
    return (q @ k.T * mask) @ v


def recurrent_form(q, k, v):
    """S_t = S_{t-1} + k_tᵀ v_t, o_t = q_t S_t, one token at a time."""
    S = torch.zeros(k.shape[1], v.shape[1], dtype=q.dtype)  # [K, V] the state
    out = []
    for t in range(q.shape[0]):
        S = S + k[t, :, None] * v[t, None, :]  # outer product k_tᵀ v_t
        out.append(q[t] @ S)  # [V]
    return torch.stack(out)


def chunkwise_form(q, k, v, C=16):
    """Parallel inside chunks of C tokens, the state across them."""
    S = torch.zeros(k.shape[1], v.shape[1], dtype=q.dtype)
    out = []
    for c0 in range(0, q.shape[0], C):
        qc, kc, vc = q[c0:c0 + C], k[c0:c0 + C], v[c0:c0 + C]  # [L, K], [L, K], [L, V]
        # earlier chunks through S, this chunk directly
        out.append(qc @ S + parallel_form(qc, kc, vc))
        S = S + kc.T @ vc  # fold the chunk into the state
    return torch.cat(out)


g = torch.Generator().manual_seed(0)
q1, k1, v1 = (torch.randn(100, 16, generator=g, dtype=torch.float64) / 4 for _ in range(3))
o_par, o_rec = parallel_form(q1, k1, v1), recurrent_form(q1, k1, v1)
o_chk = chunkwise_form(q1, k1, v1)
print(f"recurrent vs parallel: {(o_rec - o_par).abs().max():.1e}, chunkwise vs parallel: "
      f"{(o_chk - o_par).abs().max():.1e} (max abs difference, float64, T = 100, C = 16)")
assert torch.allclose(o_rec, o_par) and torch.allclose(o_chk, o_par)

# %% [markdown]
# Their costs, for one head with $K = V = d$ and the whole sequence of $T$ tokens (a multiply–add counts 2 FLOPs):
#
# | form | FLOPs | what it keeps for the next token |
# |---|---|---|
# | parallel | $\approx 2 T^2 d$ ($QK^\top$ and the product with $V$, causal half) | all keys and values: $2Td$ |
# | recurrent | $4 T d^2$ (update and read the state) | the state: $d^2$ |
# | chunkwise | $2TCd$ (intra, causal half) $+ \,4Td^2$ (inter and state updates) | the state: $d^2$ |
#
# The crossover is at $T \approx 2d$: beyond a few hundred tokens the linear forms win, and the gap grows with $T$.
# What they keep does not grow at all — the plot's right panel is the cache of one layer of MiniMax-M1's shape
# (64 heads of 128) against what its softmax layers keep.

# %%
#| export lightning.cost
import numpy as np

from minisparse import _checks


def lightning_flops(T, d_k, d_v, chunk=64, form="chunk"):
    """FLOPs of linear attention, one head, a whole sequence of T tokens (2 FLOPs a multiply-add).

    form: "parallel" (masked QKᵀ then ·V, causal half), "recurrent" (update + read a K×V state per
    token) or "chunk" (parallel inside chunks of `chunk` tokens, the state across them).
    """
    _checks.lengths("lightning_flops", "T", T)
    if form == "parallel":
        return T * T * (d_k + d_v)  # 2 · T²/2 · (K + V)
    if form == "recurrent":
        return 4 * T * d_k * d_v
    if form == "chunk":
        return T * chunk * (d_k + d_v) + 4 * T * d_k * d_v
    raise ValueError(f"lightning_flops: form must be 'parallel', 'recurrent' or 'chunk', got "
                     f"{form!r}")


def softmax_attention_flops(T, d_qk, d_v, heads=1):
    """FLOPs of causal softmax attention over T tokens: QKᵀ and PV on the causal half."""
    return heads * T * T * (d_qk + d_v)


# %%
from minisparse.lightning import lightning_flops

Ts = np.logspace(6, 17, 60, base=2)
d = 128
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for form, color in [("parallel", "tab:red"), ("recurrent", "tab:blue"), ("chunk", "tab:green")]:
    ax1.loglog(Ts, [lightning_flops(t, d, d, 64, form) for t in Ts], color=color, label=form,
               ls="--" if form == "recurrent" else "-")
ax1.set(xlabel="sequence length T", ylabel="FLOPs, one head, whole sequence",
        title="Three forms of one computation (d = 128, C = 64)")
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3, which="major")
# a softmax layer of M1: K and V of 8 KV heads × 128, bf16, per token
kv_per_token = 2 * 8 * 128 * 2
kv_bytes = kv_per_token * Ts
# a lightning layer of M1: 64 heads × 128 × 128 fp32 state
state_bytes = 64 * 128 * 128 * 4 * np.ones_like(Ts)
ax2.loglog(Ts, kv_bytes / 2**20, color="tab:red", label="softmax layer: KV cache (GQA, 8 KV heads)")
ax2.loglog(Ts, state_bytes / 2**20, color="tab:green",
           label="lightning layer: state (64 heads, fp32)")
ax2.set(xlabel="tokens in context", ylabel="MiB per sequence, one layer",
        title="What a layer keeps while decoding")
ax2.legend(fontsize=8)
ax2.grid(alpha=0.3, which="major")
fig.tight_layout()
plt.show()
cross = state_bytes[0] / kv_per_token  # 4,194,304 B / 4,096 B a token
print(f"the KV cache of one softmax layer outgrows a lightning layer's state "
      f"after {cross:,.0f} tokens")

# %% [markdown]
# *Assumptions: M1's shape from the MiniMax-01 report (64 query heads of 128; softmax layers with 8 KV heads; fp32
# states, bf16 KV cache). FLOPs count only the attention core, not the projections.*
#
# Two costs remain. Softmax attention's state is exact — it can look up any earlier token — while a $K \times V$
# matrix can only hold so much (section 4.6 measures how much). And plain linear attention, with $S_t = S_{t-1} +
# \dots$, never forgets: old tokens weigh as much as new ones and the state's norm grows without bound. The fix is
# a **decay**.

# %% [markdown]
# ## 4.2 Decay: MiniMax's slopes
#
# Lightning Attention multiplies the state by a constant $\lambda_h = e^{-s_h} < 1$ before adding each token, with a
# fixed rate $s_h > 0$ per head:
#
# $$
# \begin{aligned}
# S_t &= e^{-s_h}\, S_{t-1} + k_t^\top v_t, \qquad o_t = \sigma\, q_t S_t \\
# \Longleftrightarrow\quad o_t &= \sigma \sum_{s \le t} e^{-s_h (t-s)}\, (q_t k_s^\top)\, v_s ,
# \end{aligned}
# $$
#
# with a scale $\sigma$ (MiniMax uses $\sigma = 1$; the book's default is $K^{-1/2}$). A token $n$ steps back weighs
# $e^{-s_h n}$: the head's memory has a half-life of $\ln 2 / s_h$ tokens. In the book's log-space convention the
# gate is $g = -s_h \le 0$ at every step — the same recurrence as the *simple GLA* of fla (flash-linear-attention,
# the Triton library of linear attention kernels): gated linear attention with one scalar gate per head, here a
# constant one, which is how the tests check it. (fla's `lightning_attn` op is this recurrence too, but with TransNormer's rates
# $s_h = \tfrac{8}{H}(1 - \ell/L)\,h$, not MiniMax's.)
#
# MiniMax's rates are ALiBi's geometric slopes (Press et al., 2022) scaled down layer by layer. For $H$ heads, head
# $h = 0 \dots H-1$ of layer $\ell$ out of $L$:
#
# $$
# s_{h,\ell} = 2^{-8(h+1)/H} \cdot \Big(1 - \frac{\ell}{L - 1 + 10^{-5}} + 10^{-5}\Big).
# $$
#
# Head 0 forgets fastest ($s = 2^{-8/H}$, a half-life under a token for $H = 64$); the last head keeps a memory of
# about 180 tokens. Deeper layers forget more slowly: the formula's last layer ($\ell = L - 1$) would keep
# almost everything ($s \approx 10^{-5}$ times the head's rate), but in MiniMax-01 and M1 that layer is a softmax
# layer, and the last lightning layer (78 of 80) keeps about 1.3 % of the head's rate. The two $10^{-5}$ are part of
# the released code (either alone keeps the last layer's rate positive; the one in the denominator also avoids 0/0 for
# a single layer); we copy them so that the buffers match `transformers'` bit for bit (checked in the Engineering
# notes).

# %%
#| export lightning.naive
import numbers

import torch

from minisparse import _checks  # the book's shared argument checks


def minimax_slopes(num_heads, layer_idx, num_layers):
    """MiniMax's decay rates s_h > 0 of one lightning layer: [num_heads] float32.

    ALiBi's geometric slopes 2^(-8(h+1)/H), scaled by (1 - layer_idx / (num_layers - 1 + 1e-5) +
    1e-5), as MiniMax's released modeling code (and transformers' MiniMaxLightningAttention)
    computes its `slope_rate`.
    """
    _checks.positive_int("minimax_slopes", "num_heads", num_heads)
    _checks.positive_int("minimax_slopes", "num_layers", num_layers)
    layer_idx = _layer_index("minimax_slopes", layer_idx, num_layers)
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads) + 1)  # [H] float32: base^1 ... base^H
    return rate * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)


def _layer_index(op, layer_idx, num_layers):
    """layer_idx as an int in [0, num_layers): any integer type (a NumPy int too), not a bool;
    raises ValueError naming `op`."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral) \
            or not 0 <= layer_idx < num_layers:
        raise ValueError(f"{op}: layer_idx must be an int in [0, num_layers) = "
                         f"[0, {num_layers}), got {layer_idx!r}")
    return int(layer_idx)


def decay_matrix(slope, length):
    """The decay mask of one head, [length, length] float32: D[i, j] = exp(-slope · (i - j)) for
    j <= i, else 0.

    The exponent is masked *before* exp, so no positive exponent is ever computed (slope ≥ 0).
    """
    slope = _checks.positive_float("decay_matrix", "slope", slope, zero=True)
    _checks.positive_int("decay_matrix", "length", length, zero=True)
    i = torch.arange(length, dtype=torch.float32)
    diff = i[:, None] - i[None, :]  # [L, L] i - j
    return torch.exp(torch.where(diff >= 0, -slope * diff, float("-inf")))


# %%
from minisparse.lightning import decay_matrix, minimax_slopes

H_M1, L_M1 = 64, 80  # MiniMax-01 / M1: 64 heads, 80 layers (MiniMax-01 report, Table 2)
# 78: the last lightning layer (every eighth layer is softmax: 7, 15, …, 79)
for layer in (0, 40, 78):
    s = minimax_slopes(H_M1, layer, L_M1)
    print(f"layer {layer:2d}: rates {s[0]:.3g} … {s[-1]:.2e}; "
          f"half-lives {math.log(2) / s[0]:.1f} … {math.log(2) / s[-1]:,.0f} tokens")

# %% [markdown]
# What the decay does to attention: with $q_t k_s^\top$ the raw scores, the output mixes the values with weights
# $e^{-s_h(t-s)}\, q_t k_s^\top$. Below, for 64 random tokens, the weights of four heads of MiniMax-M1's first
# layer, of a middle layer and of its last lightning layer (absolute value, each panel scaled to its maximum).
# The fast heads are near-diagonal — a local window of a few tokens — and the slow ones see the whole past.

# %%
T_PIC = 64
g = torch.Generator().manual_seed(1)
qp, kp = torch.randn(T_PIC, 16, generator=g), torch.randn(T_PIC, 16, generator=g)
scores = (qp @ kp.T).abs()  # [T, T] |q_t k_s|: random, the same for every panel
pics = {}
for layer in (0, 40, 78):
    s = minimax_slopes(H_M1, layer, L_M1)
    for h in (0, 8, 24, 63):
        w = scores * decay_matrix(s[h], T_PIC)
        pics[f"layer {layer}, head {h}: s = {s[h]:.2g}"] = w / w.max()
fig = viz.panels(pics, ncols=4, size=2.5, cmap="magma", vmin=0, vmax=1,
                 suptitle="Decay-weighted attention |q_t k_s| · exp(-s (t - s)), M1's heads")
plt.show()

# %% [markdown]
# Within one layer the heads span scales from one token to the whole window, a multi-resolution memory by
# construction; across layers the range slides towards long memory. The rates are fixed buffers, not parameters,
# and nothing depends on the input (chapters 5 and 6 make the decay depend on the token).

# %% [markdown]
# ## 4.3 Naive: the recurrence, and Lightning Attention's blocks
#
# The spec is the recurrence itself, with the book's conventions: `q, k [B, T, H, K]`, `v [B, T, H, V]` ($K \ne V$
# allowed), `slope [H]` of positive rates, an optional `initial_state [B, H, K, V]`; it returns `(o, final_state)`
# (the state only when asked for) and accumulates in fp32 (in fp64 for fp64 inputs, so that
# `torch.autograd.gradcheck` can check its gradients). Validation is one call, `_check_lightning` (Engineering
# notes), which also checks that every rate is positive and finite.

# %%
#| export lightning.naive
def naive_recurrent_lightning_attn(q, k, v, slope, scale=None, initial_state=None,
                                   output_final_state=False):
    """Lightning attention token by token: S_t = exp(-slope_h) S_{t-1} + k_tᵀ v_t, o_t = σ q_t S_t.

    q, k [B, T, H, K]; v [B, T, H, V]; slope [H] > 0; initial_state [B, H, K, V] or None ->
    (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None). Accumulates in float32
    (float64 inputs: in float64, the final state too).
    """
    scale = _check_lightning("naive_recurrent_lightning_attn", q, k, v, slope, scale, initial_state,
                             check_values=True)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    lam = torch.exp(-slope.to(acc))[None, :, None, None]  # [1, H, 1, 1] decay per step
    S = initial_state.to(acc).clone() if initial_state is not None else \
        q.new_zeros(B, H, K, V, dtype=acc)  # [B, H, K, V]
    qf, kf, vf = q.to(acc) * scale, k.to(acc), v.to(acc)
    o = torch.empty(B, T, H, V, dtype=acc, device=q.device)
    for t in range(T):
        # [B, H, K, V] decay, then add k_tᵀ v_t
        S = lam * S + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        o[:, t] = (qf[:, t, :, :, None] * S).sum(dim=2)  # [B, H, V] q_t S_t
    return o.to(q.dtype), (S if output_final_state else None)


# %% [markdown]
# Lightning Attention (Qin et al., 2024) computes the same thing in blocks of $C$ tokens so that the work becomes
# matrix multiplies. Take the block that starts after position $t_0$, with state $S = S_{t_0}$ coming in, and number
# its tokens $i = 0 \dots L-1$ ($L \le C$; the last block may be short). Unrolling the recurrence from $t_0$:
#
# $$
# \begin{aligned}
# o_i &= \sigma\Big(\underbrace{\lambda^{i+1}\, q_i S}_{\text{inter-block}}
#   + \underbrace{\textstyle\sum_{j \le i} \lambda^{i-j}\, (q_i k_j^\top)\, v_j}_{\text{intra-block}}\Big), \\
# S' &= \lambda^{L} S + \textstyle\sum_{j} \lambda^{L-1-j}\, k_j^\top v_j .
# \end{aligned}
# $$
#
# In matrices, with $Q, K_c, V_c$ the block's rows, $D_{ij} = \lambda^{i-j}$ ($j \le i$, else 0) the decay matrix,
# $a_i = \lambda^{i+1}$ the *query decay* and $b_j = \lambda^{L-1-j}$ the *key decay*:
#
# $$
# \begin{aligned}
# O_c &= \sigma\big(\operatorname{diag}(a)\, Q S + (Q K_c^\top \odot D)\, V_c\big), \\
# S' &= \lambda^{L} S + (\operatorname{diag}(b) K_c)^\top V_c .
# \end{aligned}
# $$
#
# The intra-block part is quadratic in $C$ only; the inter-block part is one $C \times K$ by $K \times V$ product;
# and the state moves on by one $K \times C$ by $C \times V$ product. Every power of $\lambda$ is non-negative —
# $i - j \ge 0$, $i + 1 > 0$, $L - 1 - j \ge 0$ — so every exponent of $e$ is $\le 0$ and no factor can overflow, even
# for a head fast enough that $\lambda^{L}$ underflows to zero (MiniMax's fastest head at its block of 256, or a rate
# of 8 as in the tests). (Forms that divide by $\lambda^{j}$ to factor $D$ into a product of two vectors do overflow; this one never
# does.) MiniMax's released code and `transformers` use exactly these three factors with $C = 256$. The picture:
# each chunk's outputs need only its own rows and the state entering it; the states form a chain.

# %% tags=["hide-input"]
Box, boxes, arrows, groups = viz.Box, {}, [], []
for n in range(2):  # two chunks, and the states that enter and leave them
    x = 4.8 * n
    boxes[f"S{n}"] = Box(x - 2.4, -1.5, f"$S_{n}$", w=0.8, color="#d9f0d3", note="[K, V]")
    boxes[f"in{n}"] = Box(x, 2.4, f"$Q_{n},\\ K_{n},\\ V_{n}$", w=2.0)
    boxes[f"inter{n}"] = Box(x - 1.0, 1.1, f"inter\n$\\mathrm{{diag}}(a)\\,Q_{n} S_{n}$", w=1.8,
                             h=0.8, color="#d9f0d3")
    boxes[f"intra{n}"] = Box(x + 1.0, 1.1, "intra\n$(Q K^\\top \\odot D)\\,V$", w=1.8, h=0.8)
    boxes[f"o{n}"] = Box(x, 0, f"$O_{n}$", w=0.8, color="#fde0c5", note="[C, V]")
    arrows += [(f"in{n}", f"intra{n}"), (f"in{n}", f"inter{n}"), (f"S{n}", f"inter{n}"),
               (f"intra{n}", f"o{n}"), (f"inter{n}", f"o{n}")]
    groups.append(([f"in{n}", f"intra{n}", f"inter{n}", f"o{n}"],
                   f"chunk {n} (chunks in parallel)"))
    update = f"$\\lambda^L S_{n} + (\\mathrm{{diag}}(b) K_{n})^\\top V_{n}$"
    arrows.append((f"S{n}", f"S{n + 1}", update))
boxes["S2"] = Box(7.2, -1.5, "$S_2$", w=0.8, color="#d9f0d3", note="[K, V]")
fig = viz.schematic(boxes, arrows, groups=groups, size=(10, 4.2),
                    title="The chunk form: outputs from a chunk's rows and the state entering it")
plt.show()

# %%
#| export lightning.naive
def naive_chunk_lightning_attn(q, k, v, slope, scale=None, initial_state=None,
                               output_final_state=False,
                               chunk_size=64):
    """Lightning attention by blocks: intra-block (Q Kᵀ ⊙ D) V + inter-block diag(a) Q S.

    Same arguments and result as naive_recurrent_lightning_attn; chunk_size C is the block length
    (any T works: the last block is shorter). Accumulates in float32 (float64 for float64 inputs).
    """
    return _naive_chunk(q, k, v, slope, scale, initial_state, output_final_state, chunk_size,
                        check_values=True)


def _naive_chunk(q, k, v, slope, scale, initial_state, output_final_state, chunk_size,
                 check_values):
    """naive_chunk_lightning_attn; check_values=False skips the slope's values (the layer's own)."""
    scale = _check_lightning("naive_chunk_lightning_attn", q, k, v, slope, scale, initial_state,
                             check_values)
    _checks.positive_int("naive_chunk_lightning_attn", "chunk_size", chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    s = slope.to(acc)[:, None, None]  # [H, 1, 1]
    S = initial_state.to(acc).clone() if initial_state is not None else \
        q.new_zeros(B, H, K, V, dtype=acc)  # [B, H, K, V]
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, ·]
    o = torch.empty(B, H, T, V, dtype=acc, device=q.device)
    for c0 in range(0, T, chunk_size):
        L = min(chunk_size, T - c0)
        qc, kc, vc = qf[:, :, c0:c0 + L], kf[:, :, c0:c0 + L], vf[:, :, c0:c0 + L]  # [B, H, L, ·]
        i = torch.arange(L, dtype=acc, device=q.device)
        diff = i[:, None] - i[None, :]  # [L, L]
        D = torch.exp(torch.where(diff >= 0, -s * diff, float("-inf")))  # [H, L, L] decay matrix
        a = torch.exp(-s * (i[:, None] + 1))  # [H, L, 1] query decay λ^(i+1)
        b = torch.exp(-s * (L - 1 - i[:, None]))  # [H, L, 1] key decay λ^(L-1-j)
        intra = ((qc @ kc.transpose(-1, -2)) * D) @ vc  # [B, H, L, V]
        inter = (qc * a) @ S  # [B, H, L, V]
        o[:, :, c0:c0 + L] = scale * (inter + intra)
        # [B, H, K, V] λ^L S + (diag(b) K)ᵀ V
        S = torch.exp(-s * L) * S + (kc * b).transpose(-1, -2) @ vc
    return o.transpose(1, 2).to(q.dtype), (S if output_final_state else None)


# %% [markdown]
# The two agree on an odd length with $K \ne V$, an initial state and MiniMax's slopes (and the recurrence agrees
# with fla's `naive_recurrent_simple_gla`, gate $g = -s_h$: Engineering notes):

# %%
from minisparse.lightning import naive_chunk_lightning_attn, naive_recurrent_lightning_attn

B0, T0, H0, K0, V0 = 2, 77, 4, 32, 48
q0, k0 = make_bthd(B0, T0, H0, K0, seed=1), make_bthd(B0, T0, H0, K0, seed=2)
v0 = make_bthd(B0, T0, H0, V0, seed=3)
h00 = torch.randn(B0, H0, K0, V0, generator=torch.Generator().manual_seed(4))
slope0 = minimax_slopes(H0, 1, 4)
o_rec0, s_rec0 = naive_recurrent_lightning_attn(q0, k0, v0, slope0, initial_state=h00,
                                                output_final_state=True)
for C in (16, 64, 100):
    o_chk0, s_chk0 = naive_chunk_lightning_attn(q0, k0, v0, slope0, initial_state=h00,
                                                output_final_state=True, chunk_size=C)
    assert_close(f"chunk (C={C}) vs recurrent: o", o_rec0, o_chk0, 1e-5)
    assert_close(f"chunk (C={C}) vs recurrent: final state", s_rec0, s_chk0, 1e-5)
print("naive_chunk_lightning_attn == naive_recurrent_lightning_attn for C = 16, 64, 100 "
      "(T = 77, K = 32, V = 48)")

# %% [markdown]
# ## 4.4 Fast: the chunkwise form in Triton
#
# The naive loop runs the chunks one after another, a dozen small PyTorch operations each. The Triton version
# splits the work by what depends on what, as in the picture: the **chunk states** $S_0, S_1, \dots$ depend on each
# other (a scan over chunks, one small matrix product a step: `_fwd_states_kernel`), while the **outputs** of a
# chunk need only its own rows and its entering state, so all chunks run in parallel (`_fwd_output_kernel`). The
# backward mirrors it (derived below; its kernels, the decoding kernel and the launch code: Engineering notes).
#
# ### The state kernel, tile by tile
#
# One program keeps a `BK × BV` tile of $S$ in fp32 registers and walks the chunks in order: it stores the tile as
# the state entering chunk $n$, loads that chunk's $K^\top$ `[BK, C]` and $V$ `[C, BV]` (rows past $T$ as zeros),
# and moves on with one `tl.dot`, $S \leftarrow \lambda^L S + (K^\top \operatorname{diag}(b))\,V$. Tiling the state
# gives $B \cdot H \cdot (K/B_K)(V/B_V)$ independent scans — 128 for the benchmark's $B = 2$, $H = 16$,
# $K = V = 128$ with 64 × 64 tiles. Each is a chain of dependent steps, so what speeds it up is loading the next
# chunk while this one multiplies (pipeline stages: 4 on the H200 make the scan twice as fast as 2), more than more
# programs. Chunk states are stored in the input dtype (as fla does), which halves their traffic in bf16; the
# running sum stays in fp32.

# %%
#| export lightning.triton
"""Lightning attention in Triton (chapter 4, section 4.4): the chunk scan, the chunk outputs, their
backward pass, and a recurrent kernel for decoding.

Names in the kernels: `*_ptr` is a tensor argument, `*_base` where this program's (batch, head)
slice of it starts (in a kernel of one chunk, where the chunk starts), `*_off` offsets within that
slice (or chunk) and `*_mask` which of them are in bounds. C is the chunk length, NT the number of
chunks, BK × BV a tile of a [K, V] state. Tensors are contiguous [B, T, H, ·], so token t of head h
is `H · (K or V)` elements after token t - 1; t · H · K passes 2^31 at long context (64 heads of
128 from token 262,144), so token offsets are computed in int64. Launch configurations come from
`runtime.LAUNCH_TABLE` ("lightning.*").
"""
import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime
from minisparse.lightning.naive import _check_lightning, _check_slope, _naive_chunk


@triton.jit
def _fwd_states_kernel(k_ptr, v_ptr, slope_ptr, h0_ptr, states_ptr, ht_ptr, T, H, K, V, NT,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                       STORE_HT: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk scan: the state entering every chunk, and the state after the last one.

    Program: one (batch b, head h) and one [BK, BV] tile of its [K, V] state.
    Grid (cdiv(K, BK) · cdiv(V, BV), B · H).
    Tiling: the tile of S stays in fp32 registers while the program walks the NT chunks in order;
    each step loads Kᵀ [BK, C] and V [C, BV] of one chunk (rows past T load as 0).
    Math, with λ = exp(-s_h) and L the chunk's length (the last chunk may be shorter):
        S = h0[b, h] if HAS_H0 else 0
        for n = 0 .. NT-1:  states[b, h, n] = S;   S ← λ^L S + Kᵀ diag(b) V
                            with b_j = λ^(L-1-j) (0 for j ≥ L)
        ht[b, h] = S if STORE_HT
    """
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    n_v = tl.cdiv(V, BV)
    ks = (i_kv // n_v) * BK + tl.arange(0, BK)  # [BK] this program's rows of the state
    vs = (i_kv % n_v) * BV + tl.arange(0, BV)  # [BV] and its columns
    rows = tl.arange(0, C)  # [C] positions within a chunk
    s = tl.load(slope_ptr + h).to(tl.float32)
    k_base = k_ptr + (b * T * H + h) * K  # token t of (b, h) at k_base + t * H * K
    v_base = v_ptr + (b * T * H + h) * V
    # chunk n's [K, V] state at states_base + n * K * V
    states_base = states_ptr + i_bh * NT * K * V
    kv_off = ks[:, None] * V + vs[None, :]  # [BK, BV] within one [K, V] state
    kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
    S = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0_ptr + i_bh * K * V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    for n in range(NT):
        tl.store(states_base + n * K * V + kv_off, S.to(states_ptr.dtype.element_ty), mask=kv_mask)
        t = (n * C + rows).to(tl.int64)  # [C] the chunk's positions; int64: t·H·K passes 2^31
        L = tl.minimum(T - n * C, C)  # its length
        kt = tl.load(k_base + t[None, :] * H * K + ks[:, None],
                     mask=(t[None, :] < T) & (ks[:, None] < K),
                     other=0.0)  # [BK, C] Kᵀ
        vb = tl.load(v_base + t[:, None] * H * V + vs[None, :],
                     mask=(t[:, None] < T) & (vs[None, :] < V),
                     other=0.0)  # [C, BV]
        key_decay = tl.exp(tl.where(rows < L, -s * (L - 1 - rows).to(tl.float32), float("-inf")))
        S = S * tl.exp(-s * L.to(tl.float32)) + tl.dot((kt * key_decay[None, :]).to(vb.dtype), vb,
                                                        input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht_ptr + i_bh * K * V + kv_off, S, mask=kv_mask)


# %% [markdown]
# ### The output kernel, tile by tile
#
# One program per (batch, head, chunk, `V`-tile) walks $K$ in blocks of `BK` columns: each step loads $Q, K$
# `[C, BK]` and the entering state's `[BK, BV]` tile and adds to two fp32 accumulators, the scores $QK^\top$
# `[C, C]` and $QS_n$ `[C, BV]` (a loop, so that Triton can load the next block while the tensor cores work on this
# one). Then it masks the scores by the decays, $QK^\top \odot D$ (the exponent masked above the diagonal before
# `exp`), and finishes $\operatorname{diag}(a)\,QS_n + (QK^\top \odot D)\,V$ with one more `tl.dot`.
#
# $K$ and $V$ need not be powers of two: tiles are padded, the padding loads as zeros and is never stored, so a
# 48-wide head costs a 64-wide tile; rows past $T$ load as zeros too and add nothing.

# %%
#| export lightning.triton
@triton.jit
def _fwd_output_kernel(q_ptr, k_ptr, v_ptr, slope_ptr, states_ptr, o_ptr, scale, T, H, K, V, NT,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       PRECISION: tl.constexpr):
    """The outputs of one chunk, for one tile of V.

    Program: one (batch b, head h, chunk n, V-tile). Grid (cdiv(V, BV), NT, B · H).
    Tiling: a loop over K in blocks of BK loads Q, K [C, BK] and the entering state's tile S_n [BK,
    BV] and accumulates Q Kᵀ [C, C] and Q S_n [C, BV] in fp32; then V [C, BV].
    Math, with λ = exp(-s_h), D_ij = λ^(i-j) for i ≥ j (0 above the diagonal) and a_i = λ^(i+1):
        O = scale · (diag(a) Q S_n + (Q Kᵀ ⊙ D) V)
    """
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    t = n * C + rows  # [C] the chunk's positions
    t0 = (n * C).to(tl.int64)  # its first, in int64: t·H·K passes 2^31 at long context
    vs = i_v * BV + tl.arange(0, BV)
    s = tl.load(slope_ptr + h).to(tl.float32)
    q_base = q_ptr + (b * T * H + h) * K + t0 * H * K  # row i of the chunk at q_base + i * H * K
    k_base = k_ptr + (b * T * H + h) * K + t0 * H * K
    v_base = v_ptr + (b * T * H + h) * V + t0 * H * V
    o_base = o_ptr + (b * T * H + h) * V + t0 * H * V
    state_base = states_ptr + (i_bh * NT + n) * K * V  # the state entering chunk n
    vo_off = rows[:, None] * H * V + vs[None, :]  # [C, BV]
    vo_mask = (t[:, None] < T) & (vs[None, :] < V)
    A = tl.zeros((C, C), dtype=tl.float32)  # Q Kᵀ
    o = tl.zeros((C, BV), dtype=tl.float32)  # Q S_n
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        qk_off = rows[:, None] * H * K + ks[None, :]  # [C, BK]
        qk_mask = (t[:, None] < T) & (ks[None, :] < K)
        q = tl.load(q_base + qk_off, mask=qk_mask, other=0.0)
        k = tl.load(k_base + qk_off, mask=qk_mask, other=0.0)
        S = tl.load(state_base + ks[:, None] * V + vs[None, :],
                    mask=(ks[:, None] < K) & (vs[None, :] < V),
                    other=0.0)  # [BK, BV]
        A = tl.dot(q, tl.trans(k), A, input_precision=PRECISION)
        o = tl.dot(q, S.to(q.dtype), o, input_precision=PRECISION)
    v = tl.load(v_base + vo_off, mask=vo_mask, other=0.0)  # [C, BV]
    diff = (rows[:, None] - rows[None, :]).to(tl.float32)  # [C, C] i - j
    D = tl.exp(tl.where(diff >= 0, -s * diff, float("-inf")))  # decay matrix, 0 above the diagonal
    query_decay = tl.exp(-s * (rows + 1).to(tl.float32))  # [C]
    o = tl.dot((A * D).to(v.dtype), v, o * query_decay[:, None], input_precision=PRECISION)
    tl.store(o_base + vo_off, (o * scale).to(o_ptr.dtype.element_ty), mask=vo_mask)


# %% [markdown]
# ### The backward pass
#
# Differentiate the block equations. Let $\partial S'_n$ be the gradient reaching the state that *leaves* chunk $n$
# (from all later outputs and from `final_state`). The state enters chunk $n$'s outputs through
# $\sigma\,\operatorname{diag}(a)\,QS$ and the next state through $\lambda^L S$, so the state gradients obey a
# **reverse** recurrence over chunks, the transpose of the forward one:
#
# $$
# \begin{aligned}
# \partial S'_{NT-1} &= \partial S_{\text{final}}, \\
# \partial S'_{n-1} &= \lambda^{L_n}\, \partial S'_n + \sigma\,(\operatorname{diag}(a)\, Q_n)^\top \partial O_n ,
# \end{aligned}
# $$
#
# and the gradient of `initial_state` is what the scan holds after chunk 0. With $\partial S'$ known for every
# chunk, the rest is local to the chunk. Writing $A = QK^\top \odot D$ and $\partial A = \partial O\, V^\top \odot D$:
#
# $$
# \begin{aligned}
# \partial Q &= \sigma\big(\operatorname{diag}(a)\, \partial O\, S^\top + \partial A\, K\big), \\
# \partial K &= \sigma\, \partial A^\top Q + \operatorname{diag}(b)\, V\, (\partial S')^\top, \\
# \partial V &= \sigma\, A^\top \partial O + \operatorname{diag}(b)\, K\, \partial S' .
# \end{aligned}
# $$
#
# So the backward is two kernels again: the state kernel run backwards, with $Q$ and $\partial O$ in the places of
# $K$ and $V$, and one parallel kernel per chunk for $\partial Q, \partial K, \partial V$ (Engineering notes).

# %% [markdown]
# ### Check it against the spec
#
# Output, final state and all four gradients against `naive_recurrent_lightning_attn` (autograd through the loop),
# with $T$ not a multiple of $C$ and $K \ne V$: fp32 in the interpreter on a CPU, bf16 on a GPU.

# %%
from minisparse.lightning import chunk_lightning_attn

Bc, Tc, Hc, Kc, Vc = 2, runtime.reading_size(cpu=100, gpu=1000), 4, 48, 40
fwd_tol, grad_tol = (1e-4, 1e-4) if DTYPE == torch.float32 else (5e-3, 8e-3)
qc, kc = (make_bthd(Bc, Tc, Hc, Kc, seed=s, device=DEVICE, dtype=DTYPE) / 3 for s in (10, 11))
vc = make_bthd(Bc, Tc, Hc, Vc, seed=12, device=DEVICE, dtype=DTYPE)
h0c = (0.1 * torch.randn(Bc, Hc, Kc, Vc, device=DEVICE)).to(DTYPE)
slope_c = torch.tensor([1e-4, 0.05, 0.5, 8.0], device=DEVICE)  # from no decay at all to e^-8 a step
leaves = [x.detach().clone().requires_grad_() for x in (qc, kc, vc, h0c)]
o_k, s_k = chunk_lightning_attn(*leaves[:3], slope_c, initial_state=leaves[3],
                                output_final_state=True)
do_c, ds_c = torch.randn_like(o_k), torch.randn_like(s_k)
torch.autograd.backward((o_k, s_k), (do_c, ds_c))
ref_leaves = [x.detach().double().requires_grad_() for x in (qc, kc, vc, h0c)]
o_r, s_r = naive_recurrent_lightning_attn(*[x.float() for x in ref_leaves[:3]], slope_c,
                                          initial_state=ref_leaves[3].float(),
                                          output_final_state=True)
torch.autograd.backward((o_r, s_r), (do_c.float(), ds_c.float()))
for name, out, ref, tol in [("o", o_k, o_r, fwd_tol), ("final_state", s_k, s_r, fwd_tol)] + [
        (f"d{n}", a.grad, r.grad, grad_tol) for n, a, r in zip(["q", "k", "v", "initial_state"],
                                                               leaves, ref_leaves)]:
    err = assert_close(f"chunk_lightning_attn {name}", ref, out, tol)
    print(f"{name:14s} relative RMS error {err:.1e}")
print(f"chunk_lightning_attn forward + backward match the recurrence "
      f"(T = {Tc}, K = {Kc}, V = {Vc}, {str(DTYPE).replace('torch.', '')})")

# %% [markdown]
# ## 4.5 The layer, as MiniMax builds it
#
# A MiniMax lightning layer (MiniMax-01 report, §2.2; `transformers`' `MiniMaxLightningAttention`) wraps the
# recurrence in four pieces:
#
# 1. one projection `qkv_proj` to $3 H d$ features, laid out head by head (`[q | k | v]` of head 0, then head 1, …),
#    and a **SiLU** on all of them — keys and queries become mostly non-negative features, which keeps
#    $q_t k_s^\top$ from cancelling;
# 2. the recurrence with MiniMax's slopes and **no scaling** ($\sigma = 1$), in blocks of 256 tokens;
# 3. an **RMSNorm** over the concatenated heads (`norm`, width $H d$) — linear attention has no softmax
#    denominator, so the output's magnitude is set by the norm instead (TransNormer's "NormAttention");
# 4. a **sigmoid output gate** computed from the layer's input, `sigmoid(output_gate(x)) ⊙ …`, then `out_proj`.
#
# `LightningAttention` uses the same parameter names, so `from_hf` copies the weights one to one. It returns
# `(y, state)`: pass `state` back in to continue a sequence, which is how decoding works — a prompt's final
# state, then one token at a time.

# %%
#| export lightning.layer
import torch
import torch.nn.functional as F
from torch import nn

from minisparse import _checks
from minisparse.lightning.naive import _layer_index, _naive_chunk, minimax_slopes
from minisparse.lightning.triton import _chunk, _fused_recurrent


# fp16 holds at most 65504, and without a softmax denominator the attention's output grows
# with |q|·|k|·|v| and with how far a head remembers: inputs ten times unit size already give
# outputs past it. The layer scales q and v by this power of two in fp16 (exact; the output by
# its square, the state by it) and normalises in float32 with eps scaled to match: the unscaled
# result, in range.
_FP16_SCALE = 2.0 ** -4


class LightningAttention(nn.Module):
    """MiniMax's lightning attention layer: SiLU(qkv_proj(x)) -> decayed linear attention (scale 1)
    -> RMSNorm -> sigmoid(output_gate(x)) ⊙ -> out_proj. Parameter names as transformers'
    MiniMaxLightningAttention.

    forward(hidden_states [B, T, hidden_size], state=None, use_cache=False, attention_mask=None) ->
    (y [B, T, hidden_size] in the layer's dtype, final state [B, H, d, d] float32 when use_cache or
    a state was given, else None). state: [B, H, d, d] from an earlier call; attention_mask: [B, T],
    0 for padding (with a state returned: left padding only, and no state given). backend:
    "triton" (chunk_lightning_attn; fused_recurrent_lightning_attn for ≤ 16 tokens from a state
    without gradients), "naive" (naive_chunk_lightning_attn with chunk_size=block_size), or "auto"
    (the default: Triton for CUDA tensors or under the interpreter, else naive — so the layer also
    runs on a GPU machine's CPU).
    """

    def __init__(self, hidden_size, num_heads, head_dim, layer_idx, num_layers, block_size=256,
                 eps=1e-6, backend="auto"):
        super().__init__()
        op = "LightningAttention"
        _check_layer_args(op, hidden_size, num_heads, head_dim, layer_idx, num_layers, block_size)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.layer_idx, self.num_layers, self.block_size = layer_idx, num_layers, block_size
        self.backend = _checks.backend(op, backend)
        self.qkv_proj = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=False)
        self.output_gate = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.norm = nn.RMSNorm(num_heads * head_dim, eps=_checks.positive_float(op, "eps", eps))
        # [H] constant rates, not trained: built here, so never value-checked again
        self.register_buffer("slope_rate", minimax_slopes(num_heads, layer_idx, num_layers))

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """Copy transformers' MiniMaxLightningAttention (weights, slopes, block size)."""
        from minisparse.lightning.hf import layer_from_hf
        return layer_from_hf(cls, module, backend)

    def _attend(self, q, k, v, state, want_state):
        """The recurrence with the layer's own slopes, scale 1 (private ops: no value check)."""
        slope = self.slope_rate.to(torch.promote_types(q.dtype, torch.float32))  # fp32 or fp64
        fits = max(q.shape[-1], v.shape[-1]) <= 128  # the kernels' K, V; "auto" is naive past them
        if _checks.choose_backend(self.backend, q, fits=fits) == "naive":
            return _naive_chunk(q, k, v, slope, 1.0, state, want_state, self.block_size,
                                check_values=False)
        if state is not None and q.shape[1] <= 16 and not torch.is_grad_enabled():
            return _fused_recurrent(q, k, v, slope, 1.0, state, want_state, check_values=False)
        return _chunk(q, k, v, slope, 1.0, state, want_state, check_values=False)

    def _attend_normed(self, q, k, v, state, want_state):
        """_attend, then RMSNorm over all heads together: ([B, T, H·d], state). In fp16, q and v (so
        o and the state) run scaled by _FP16_SCALE and the norm in float32, eps scaled to match."""
        B, T, H, d = q.shape
        if q.dtype != torch.float16:
            o, new_state = self._attend(q, k, v, state, want_state)
            return self.norm(o.reshape(B, T, H * d)), new_state
        s = _FP16_SCALE
        o, new_state = self._attend(q * s, k, v * s, None if state is None else state * s,
                                    want_state)
        o = F.rms_norm(o.reshape(B, T, H * d).float(), (H * d,), self.norm.weight.float(),
                       self.norm.eps * s**4).to(q.dtype)
        return o, None if new_state is None else new_state / s

    def forward(self, hidden_states, state=None, use_cache=False, attention_mask=None):
        op = "LightningAttention"
        _checks.layer_input(op, hidden_states, self, hidden=self.hidden_size)
        B, T, _ = hidden_states.shape
        H, d = self.num_heads, self.head_dim
        _checks.initial_state(op, state, (B, H, d, d), "[B, H, d, d]", like=hidden_states)
        _checks.attention_mask(op, attention_mask, B, T, state_in=state is not None,
                               state_out=use_cache or state is not None)
        qkv = F.silu(self.qkv_proj(hidden_states))  # [B, T, 3·H·d]
        if attention_mask is not None:  # padded tokens write nothing (they still decay the state)
            qkv = qkv * attention_mask[:, :, None].to(qkv.dtype)
        q, k, v = qkv.view(B, T, H, 3 * d).split(d, dim=-1)  # [B, T, H, d] each, head-major layout
        o, new_state = self._attend_normed(q, k, v, state, use_cache or state is not None)
        o = torch.sigmoid(self.output_gate(hidden_states)) * o  # output gate from the layer's input
        return self.out_proj(o), new_state


# %% [markdown]
# Decoding is the state passed back in: a prompt through the layer with `use_cache=True`, then one token at a
# time from the returned state, gives what running the whole sequence at once gives. (The Engineering notes check
# the layer against `transformers`' `MiniMaxLightningAttention`: outputs, decoding through its cache, and states.)

# %%
from minisparse.lightning import LightningAttention

torch.manual_seed(0)
layer = LightningAttention(64, num_heads=4, head_dim=16, layer_idx=1, num_layers=4, block_size=32)
x_l = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(5))  # [B, T, hidden]
with torch.no_grad():
    y_full, _ = layer(x_l)
    y_p, st = layer(x_l[:, :50], use_cache=True)  # prefill 50 tokens: st [B, H, d, d]
    outs = [y_p]
    for t in range(50, 70):  # then decode 20, one at a time
        y_t, st = layer(x_l[:, t:t + 1], state=st)
        outs.append(y_t)
assert_close("prefill + decode vs the full sequence", y_full, torch.cat(outs, 1), 1e-5)
print("LightningAttention: prefill 50 + decode 20 one at a time == the whole sequence at once")

# %% [markdown]
# ## 4.6 Hybrids and the controversy
#
# ### MiniMax-M1: seven lightning layers, then one softmax layer
#
# A model of only lightning layers would have a constant cost per generated token — and, as the last experiment of
# this section shows, a memory that cannot look up an arbitrary earlier token exactly. MiniMax-01 and MiniMax-M1
# therefore keep one softmax-attention layer (GQA, 8 KV heads) after every seven lightning layers; with 80 layers,
# 70 lightning and 10 softmax (MiniMax-01 report, §2). The softmax layers' KV cache and cost per token grow with the
# context, but only an eighth as much as in an all-softmax stack of the same shape.

# %% tags=["hide-input"]
kinds = ["lightning"] * 7 + ["softmax"]  # one block of MiniMax-M1's stack, repeated 10 times
boxes = {f"l{i}": viz.Box(1.3 * i, 0, "softmax\n(GQA)" if k == "softmax" else f"lightning\n{i + 1}",
                          w=1.1, h=0.8, color="#f6d5d5" if k == "softmax" else "#d9f0d3",
                          note="KV cache ∝ t" if k == "softmax" else "state 128×128 a head")
         for i, k in enumerate(kinds)}
fig = viz.schematic(boxes, [(f"l{i}", f"l{i + 1}") for i in range(7)], size=(10, 2.2),
                    groups=[(list(boxes), "× 10 = 80 layers (MiniMax-01 report, §2)")],
                    title="MiniMax-01 / M1: seven lightning layers, then one softmax layer")
plt.show()

# %% [markdown]
# The M1 report (MiniMax, 2025, Fig. 1 and §1) states the consequence for long reasoning traces: generating 100K
# tokens costs M1 about **25 %** of DeepSeek-R1's FLOPs (and under 50 % at 64K). The cost model below reproduces
# the order of that number from the two architectures' shapes. Per generated token at context length $t$ it counts:
#
# - $2 N_{\text{active}}$ FLOPs for everything that does not depend on $t$ (projections, experts, embeddings);
# - $2 H t (d_{qk} + d_v)$ per softmax layer (scores over $t$ keys, then the weighted sum of $t$ values);
# - $4 H d_k d_v$ per lightning layer (update and read the state), whatever $t$ is.

# %%
#| export lightning.cost
# Shapes: MiniMax-M1 from the MiniMax-01 / M1 reports (80 layers, 1 softmax in 8, 64 heads × 128,
# GQA with 8 KV heads, 45.9B active); DeepSeek-R1 = DeepSeek-V3's architecture (61 MLA layers, 128
# heads, q·k over 128 + 64 dims, v 128, a 512 + 64 latent cached per token, 37B active).
MINIMAX_M1 = dict(name="MiniMax-M1", active_params=45.9e9, softmax_layers=10, heads=64, d_qk=128,
                  d_v=128, kv_bytes_per_token=10 * 2 * 8 * 128 * 2, linear_layers=70,
                  linear_heads=64, d_k=128, d_v_lin=128, state_bytes=70 * 64 * 128 * 128 * 4)
DEEPSEEK_R1 = dict(name="DeepSeek-R1", active_params=37e9, softmax_layers=61, heads=128, d_qk=192,
                   d_v=128, kv_bytes_per_token=61 * (512 + 64) * 2, linear_layers=0,
                   linear_heads=0, d_k=0, d_v_lin=0, state_bytes=0)


def generation_cost(spec, n_tokens, prompt=0):
    """FLOPs to generate n_tokens after a prompt (summed over the generated tokens), and the cache
    at the end.

    spec: a dict like MINIMAX_M1. Returns (flops, cache_bytes) as float arrays shaped like n_tokens.
    Counts 2 · active parameters a token, 2 · heads · t · (d_qk + d_v) a softmax layer at context t,
    and 4 · heads · d_k · d_v a lightning layer; the prompt's own processing is not included.
    """
    n = np.asarray(n_tokens, dtype=float)
    ctx_sum = n * prompt + n * (n + 1) / 2  # Σ_{t = prompt+1}^{prompt+n} t
    s = spec
    flops = (2 * s["active_params"] * n
             + s["softmax_layers"] * 2 * s["heads"] * (s["d_qk"] + s["d_v"]) * ctx_sum
             + s["linear_layers"] * 4 * s["linear_heads"] * s["d_k"] * s["d_v_lin"] * n)
    cache = s["kv_bytes_per_token"] * (n + prompt) + s["state_bytes"]
    return flops, cache


# %%
from minisparse.lightning.cost import DEEPSEEK_R1, MINIMAX_M1, generation_cost

N_gen = np.logspace(3, np.log10(200_000), 80)
f_m1, _ = generation_cost(MINIMAX_M1, N_gen)
f_r1, _ = generation_cost(DEEPSEEK_R1, N_gen)
# R1's decoding kernels work on the 576/512-wide latent
absorbed = dict(DEEPSEEK_R1, d_qk=576, d_v=512)
f_r1a, _ = generation_cost(absorbed, N_gen)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.loglog(N_gen, f_r1, color="tab:red", label="DeepSeek-R1 (61 MLA layers)")
ax1.loglog(N_gen, f_m1, color="tab:green", label="MiniMax-M1 (70 lightning + 10 softmax)")
ax1.set(xlabel="generated tokens", ylabel="FLOPs to generate them", title="Generation cost")
ratio = f_m1 / f_r1
ax2.semilogx(N_gen, 100 * ratio, color="tab:green", label="MLA counted as 128 heads × (192 + 128)")
ax2.semilogx(N_gen, 100 * f_m1 / f_r1a, color="tab:green", ls=":",
             label="MLA in its absorbed form (576 + 512)")
for n_claim, pct in [(64_000, 50), (100_000, 25)]:
    ax2.scatter([n_claim], [pct], color="black", zorder=3, marker="x")
ax2.annotate("M1 report: < 50 % at 64K,\n≈ 25 % at 100K", (100_000, 25), xytext=(2e3, 20),
             fontsize=7,
             arrowprops=dict(arrowstyle="->", lw=0.6))
ax2.set(xlabel="generated tokens", ylabel="M1 FLOPs / R1 FLOPs (%)", title="M1 relative to R1",
        ylim=(0, 130))
for ax in (ax1, ax2):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="major")
fig.tight_layout()
plt.show()
at = {n: generation_cost(MINIMAX_M1, n)[0] / generation_cost(DEEPSEEK_R1, n)[0]
      for n in (64_000, 100_000)}
at_abs = generation_cost(MINIMAX_M1, 100_000)[0] / generation_cost(absorbed, 100_000)[0]
print(f"M1 / R1 FLOPs: {at[64_000]:.0%} at 64K, {at[100_000]:.0%} at 100K generated tokens "
      f"({at_abs:.0%} with R1's attention counted in its absorbed form); "
      "the report says < 50 % and ≈ 25 %")
assert at[64_000] < 0.5 and 0.2 < at[100_000] < 0.4 and at_abs < at[100_000]

# %% [markdown]
# *Assumptions: no prompt (a prompt adds context to every softmax layer, far more for R1's 61 MLA layers than for
# M1's 10, so it favours M1 further); every layer's
# attention counted on the causal context only; bf16 caches, fp32 lightning states; active parameter counts from
# the papers ([S] agrees); MoE routing overheads, memory traffic and kernel efficiency ignored — this is a count of
# arithmetic, as the report's figure is.* How DeepSeek's MLA is counted matters: as 128 ordinary heads with
# 192-wide scores, M1 spends about a third of R1's FLOPs at 100K; counted in the absorbed form R1's decoding
# kernels actually run, about an eighth. The report's 25 % lies between the two. Either way the ratio keeps
# falling with length — at 100K tokens R1's attention is already most of its work, while M1's is an eighth of the
# layers.
#
# ### M2 goes back to full attention — and M2.5?
#
# Cheap long generation was M1's selling point. Its successor MiniMax-M2 (Oct 2025) nonetheless uses softmax attention
# in **every** layer: the survey reports the team citing accuracy problems of the hybrid in reasoning and multi-turn
# tasks, which their cost advantage did not outweigh [S]. The survey then says MiniMax-M2.5 reintroduced lightning
# attention [S]; chapter 0 finds no sign of it: M2.5's released checkpoint has M2's architecture (`model_type`
# `minimax_m2`), softmax (GQA) attention in every layer in `transformers`. The lightning layer of this chapter is
# MiniMax-01/M1's.
#
# ### What a fixed-size state cannot recall
#
# The accuracy worry has a simple mechanical core. Store $N$ key–value pairs and ask for the value of one key.
# Softmax attention keeps every pair and picks the matching key out of all of them. A linear state folds them into
# $S = \sum_i k_i^\top v_i$, and reading it with $k_j$ gives $v_j \lVert k_j\rVert^2 + \sum_{i \ne j} (k_j k_i^\top)\, v_i$:
# the wanted value plus crosstalk from every other pair. For random keys in $d$ dimensions the crosstalk grows like
# $\sqrt{N/d}$, so a $d \times d$ state recalls reliably only about $d$ pairs — whatever the sequence length.
#
# The experiment: $N$ random unit key–value pairs ($d = 32$) written into the state of
# `naive_recurrent_lightning_attn` (almost no decay, or a middle MiniMax slope), or attended over by softmax
# (inverse temperature 8); each key is then queried, and the answer counts when the closest stored value is right.

# %%
def recall_accuracy(n_pairs, d=32, slope=1e-6, memory="linear", seed=0, beta=8.0):
    """Fraction of N stored key-value pairs recalled from their keys (nearest stored value)."""
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(n_pairs, d, generator=g), dim=-1)  # [N, d] unit vectors
    vals = F.normalize(torch.randn(n_pairs, d, generator=g), dim=-1)
    if memory == "linear":
        _, S = naive_recurrent_lightning_attn(keys[None, :, None], keys[None, :, None],
                                              vals[None, :, None], torch.tensor([slope]),
                                              scale=1.0, output_final_state=True)
        answers = keys @ S[0, 0]  # [N, d] read the state with every key
    else:
        # [N, d] attend over all stored pairs
        answers = torch.softmax(beta * keys @ keys.T, dim=-1) @ vals
    return (answers @ vals.T).argmax(-1).eq(torch.arange(n_pairs)).float().mean().item()


pairs = [4, 8, 16, 32, 64, 128, 256, 512]
# a middle head of a middle layer of M1: half-life ≈ 50 tokens
mid_slope = float(minimax_slopes(64, 40, 80)[40])
curves = {"softmax attention (cache grows: 2·N·d numbers)":
              [recall_accuracy(n, memory="softmax") for n in pairs],
          "linear state, no decay (d·d = 1024 numbers)": [recall_accuracy(n) for n in pairs],
          f"linear state, MiniMax decay s = {mid_slope:.3f}":
              [recall_accuracy(n, slope=mid_slope) for n in pairs]}
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for (label, acc), color in zip(curves.items(), ["tab:red", "tab:green", "tab:olive"]):
    ax.semilogx(pairs, acc, marker="o", color=color, label=label, base=2)
ax.axvline(32, color="grey", ls=":", lw=1)
ax.text(34, 0.05, "N = d", color="grey", fontsize=8)
ax.set(xlabel="stored key-value pairs N", ylabel="recalled correctly", ylim=(0, 1.05),
       title="Associative recall, head size d = 32")
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
for label, acc in curves.items():
    print(f"{label:48s} " + " ".join(f"{a:4.2f}" for a in acc))
lin, soft = curves["linear state, no decay (d·d = 1024 numbers)"], curves[
    "softmax attention (cache grows: 2·N·d numbers)"]
assert soft[pairs.index(256)] > 0.9 and lin[pairs.index(256)] < 0.5 and lin[0] == 1.0

# %% [markdown]
# Softmax attention recalls nearly every pair up to hundreds of them; the linear state is perfect for a few pairs,
# then loses them once $N$ passes $d$; the decayed state (a half-life of about 50 tokens) behaves much like it at
# these sizes: decay costs some recall near $N \approx d$ to $2d$ (it fades the older pairs too) and fades the
# crosstalk at large $N$, where it recalls a little more. That is the trade in one picture: a constant-size memory is cheap because it is lossy. Hybrids keep a few
# softmax layers to do the exact look-ups — the layers M2 decided to keep everywhere. Chapters 5 and 6 improve the
# state itself: the delta rule *overwrites* a key's old value instead of adding to it, so a key written again
# reads its newest value (where keys repeat or values change); with distinct random keys, as here, it recalls no
# more than the additive state.

# %% [markdown]
# ## 4.7 See it
#
# ### The decay matrix, and where the chunks cut it
#
# The explorer draws the full $T \times T$ decay-weighted mask $\lambda^{t-s}$ for 128 tokens and marks the
# chunks. The blocks on the diagonal are the intra-chunk part — computed directly as $(QK^\top \odot D)V$; everything
# below them reaches the output through the chunk states: off-diagonal block $(n, m)$ is the query decay
# $\lambda^{i+1}$ on the left, the key decay $\lambda^{L-1-j}$ on the right and $\lambda^{L(n-m-1)}$ for the
# chunks in between, a rank-one matrix of decays. Slide the decay rate and the chunk size:
# a fast head leaves almost nothing below the diagonal blocks (its state carries little), a slow head almost
# everything.

# %% tags=["nbval-ignore-output"]
def draw_decay(log10_slope=-1.5, chunk=32):
    s = 10 ** log10_slope
    T_e = 128
    D_full = decay_matrix(s, T_e)  # [T, T]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw=dict(width_ratios=[1, 1.2]))
    title = f"λ^(t-s), s = {s:.3g} (half-life {math.log(2) / s:.3g} tokens)"
    viz.heatmap(ax1, D_full, title, cmap="magma",
                vmin=0, vmax=1, colorbar=True)
    for c in range(chunk, T_e, chunk):
        ax1.axhline(c - 0.5, color="white", lw=0.6)
        ax1.axvline(c - 0.5, color="white", lw=0.6)
    intra = sum(D_full[c:c + chunk, c:c + chunk].sum() for c in range(0, T_e, chunk))
    ax2.bar(["intra-chunk\n(diagonal blocks)", "inter-chunk\n(through the state)"],
            [float(intra), float(D_full.sum() - intra)], color=["tab:blue", "tab:green"])
    ax2.set(ylabel="total decay weight", title=f"chunk = {chunk}: who carries the attention mass")
    fig.tight_layout()
    plt.show()


explorer = viz.explorer(draw_decay, log10_slope=(-4.0, 1.0, 0.25), chunk=[8, 16, 32, 64])

# %% [markdown]
# ## 4.8 Measure
#
# `bench/lightning.py` times `chunk_lightning_attn` on a GPU against fla's `chunk_simple_gla` (the same decay,
# `g_gamma = -slope`), fla's `chunk_lightning_attn` (TransNormer's rates) and SDPA causal attention at $B = 2$, $H = 16$,
# $K = V = 128$ in bf16; the cell plots `bench/results/lightning.json` and prints its table (ratio: our time over fla's).

# %%
res = bench.load_results("lightning")  # committed with the book
bench.plot_passes(res, y="ms", logy=True)
plt.show()
ms_at = {(r["impl"].split(" (")[0], r["pass"], r["T"]): r["ms"] for r in res["rows"]}
ours, fla, sdpa = "chunk_lightning_attn", "fla chunk_simple_gla", "SDPA causal"
Ts = res["config"]["T"]
ratio = {p: {T: ms_at[ours, p, T] / ms_at[fla, p, T] for T in Ts} for p in ("fwd", "fwd+bwd")}
print(f"{res['device']}, {res['config']['dtype']}, {res['date']}: ms, ours / fla = ratio")
print("     T | fwd: ours    fla ratio | fwd+bwd: ours    fla ratio | SDPA fwd")
for T in Ts:
    f, b = (f"{ms_at[ours, p, T]:.3f} {ms_at[fla, p, T]:6.3f} {ratio[p][T]:5.2f}"
            for p in ("fwd", "fwd+bwd"))
    print(f"{T:6d} | {f:>22s} | {b:>26s} | {ms_at[sdpa, 'fwd', T]:8.3f}")
r2 = {p: [round(ratio[p][T], 2) for T in Ts] for p in ratio}  # T = 1K, 2K, 4K, ..., 64K
assert max(r2["fwd"]) <= 1.0 and max(r2["fwd+bwd"]) <= 0.8, r2  # takeaway 1, at every length
long = [i for i, T in enumerate(Ts) if T >= 16384]
assert [(min(r2[p][i] for i in long), max(r2[p][i] for i in long)) for p in ("fwd", "fwd+bwd")] == [
    (0.97, 0.97), (0.67, 0.67)], r2
# takeaway 2: our 2K call is bound by the host (slower than the 4K one), and fla's shortest
assert ms_at[ours, "fwd", 2048] > ms_at[ours, "fwd", 4096]
assert ms_at[fla, "fwd", 2048] > ms_at[fla, "fwd", 4096]
assert all((ms_at[sdpa, "fwd", T] < ms_at[ours, "fwd", T]) == (T <= 2048) for T in Ts)  # takeaway 3
gap = {T: ms_at[sdpa, "fwd", T] / ms_at[ours, "fwd", T] for T in Ts}
assert (round(ms_at[ours, "fwd", 65536], 1), round(ms_at[sdpa, "fwd", 65536])) == (1.9, 56)
assert round(gap[65536]) == 29 and all(1.7 < gap[2 * T] / gap[T] < 2.3 for T in Ts[3:-1]), gap

# %% [markdown]
# **Takeaways** (H100, bf16, 2026-12-07; the table above):
# - **Faster than fla's `chunk_simple_gla` at every length, forward and backward.** From 16K tokens on, where the
#   GPU's work sets both times, the forward takes 0.97× its time and forward + backward 0.67×. (fla's
#   `chunk_lightning_attn`, plotted too, runs the same kernels with TransNormer's rates: within 1 % of it from 16K.)
# - **Short calls measure the host, not the kernels.** In this run our forward takes longer at 2K than at 4K, and
#   fla's longer at 2K than at 4K, 0.12–0.44 ms up to 4K: the time to issue the kernels from Python, which varies
#   from machine to machine and run to run (`bench/notes/lightning.md`). Read the ratios below 8K as launch
#   overheads.
# - **Ours and fla's grow linearly in $T$, SDPA quadratically**: SDPA's causal forward is faster only up to 2K
#   tokens; at 64K our forward takes 1.9 ms where SDPA takes 56 ms (29×), and from 8K the gap about doubles with
#   each doubling of $T$.

# %% [markdown]
# ## 4.9 Exercises
#
# Each has a stub, a cell that checks it (one line when right, what differs when not) and a hidden solution.

# %%
import triton
import triton.language as tl

from minisparse.lightning.exercises import (check_balanced_chunk, check_chunk_form_fix,
                                            check_output_tile_kernel, check_state_norm_prediction,
                                            load_chunk)
from minisparse.testing import attempt

# %% [markdown]
# ### Exercise 1 (derive): the chunk length that balances the work
#
# Part of the chunk form's work grows with $C$ (the intra-chunk products), part does not (reading the state,
# $\operatorname{diag}(a)QS$, and moving it on). Count both from section 4.3's block equations for key width $K$ and
# value width $V$ (2 FLOPs a multiply–add, the causal half of each $C \times C$ product) and derive the $C$ at
# which they are equal; the checker tries several $(K, V)$. Then evaluate it for MiniMax's heads ($K = V = 128$).

# %%
def my_balanced_chunk(d_k, d_v):
    # your code here: the chunk length C at which intra-chunk FLOPs == state FLOPs
    raise NotImplementedError


# %%
attempt(check_balanced_chunk, my_balanced_chunk)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — per chunk of C tokens: Q Kᵀ and (·)V on the causal half cost C²K + C²V FLOPs; Q S and
# the state update cost 2CKV each. Over T/C chunks: T·C·(K + V) against 4·T·K·V, equal at
# C = 4KV / (K + V), i.e. C = 2d when K = V = d. For MiniMax's d = 128 that is 256, the block size
# of MiniMax's own code: there the two halves of the work are equal. The book's kernels use C = 64,
# where the intra-chunk part is a fifth of the total.
def balanced_chunk_solution(d_k, d_v):
    return 4 * d_k * d_v / (d_k + d_v)


check_balanced_chunk(balanced_chunk_solution)
intra, total = 8192 * 64 * 256, lightning_flops(8192, 128, 128, 64, "chunk")
assert balanced_chunk_solution(128, 128) == 256 and intra / total == 0.2

# %% [markdown]
# ### Exercise 2 (predict): how big does the state get?
#
# Feed a state independent random unit keys and values ($d = 16$) for $T = 1024$ tokens, $S_t = \lambda S_{t-1} +
# k_t^\top v_t$. Before measuring, write down the Frobenius norm $\lVert S_T\rVert$ you expect without decay and
# with $s = 0.1$ and $s = 0.01$ ($\lambda = e^{-s}$): how do 1024 outer products of random directions add up? The
# checker measures the RMS norm over 64 random sequences and accepts each prediction within 10 %.

# %%
my_predictions = {"no decay": None, "s = 0.1": None, "s = 0.01": None}  # your numbers here

# %%
attempt(check_state_norm_prediction, my_predictions)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — S_T = Σ_t λ^(T-1-t) k_tᵀ v_t. Each outer product has norm ‖k‖‖v‖ = 1, and two of them
# are nearly orthogonal (their inner product (k_i·k_j)(v_i·v_j) has mean 0), so their squared norms
# add: ‖S_T‖² ≈ Σ_t λ^(2t). Without decay that is T: the norm grows like √T (32 here), not like T.
# With decay the sum is geometric: ‖S_T‖ → 1/√(1 - λ²) after ~1/(2s) tokens (2.35 for s = 0.1, 7.1
# for s = 0.01), not 1/(1 - λ) — the terms add in quadrature. A fast head's state stays small; a
# slow head's settles high; without decay it never settles.
def state_norm_solution(slope, T=1024):
    lam2 = math.exp(-2 * slope)
    return math.sqrt(T) if slope == 0 else math.sqrt((1 - lam2 ** T) / (1 - lam2))


cases = [("no decay", 0.0), ("s = 0.1", 0.1), ("s = 0.01", 0.01)]
check_state_norm_prediction({name: state_norm_solution(s) for name, s in cases})

# %% [markdown]
# ### Exercise 3 (debug): a chunk form with a wrong exponent
#
# `chunk_form_with_a_bug` computes one head's outputs and final state chunk by chunk from an entering state `S`
# (scale 1). One exponent in it is wrong: find it from the block equations (or by comparing with the recurrence)
# and return the fixed function. The checker runs it against the recurrence on odd lengths, with and without `S`.

# %%
#| export lightning.bugs
import math

import torch

from minisparse.lightning.naive import decay_matrix


def chunk_form_with_a_bug(q, k, v, S, slope, C=16):
    """One head, scale 1: q, k [T, K], v [T, V], entering state S [K, V] -> (o [T, V], S_T)."""
    lam = math.exp(-slope)
    out = []
    for c0 in range(0, q.shape[0], C):
        qc, kc, vc = q[c0:c0 + C], k[c0:c0 + C], v[c0:c0 + C]  # [L, K], [L, K], [L, V]
        L = qc.shape[0]
        i = torch.arange(L, dtype=q.dtype)  # [L] position in the chunk
        a = lam ** i  # [L] query decay
        b = lam ** (L - 1 - i)  # [L] key decay
        out.append((qc * a[:, None]) @ S + ((qc @ kc.T) * decay_matrix(slope, L)) @ vc)
        S = lam ** L * S + (kc * b[:, None]).T @ vc
    return torch.cat(out), S


# %%
def my_fixed_chunk_form(q, k, v, S, slope, C=16):
    # your code here: return (o [T, V], final state [K, V])
    raise NotImplementedError


# %%
attempt(check_chunk_form_fix, my_fixed_chunk_form)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — the query decay. The recurrence decays the state *before* adding token i's own kᵀv, so
# by the time row i of the chunk reads it, the entering state has decayed i + 1 times:
# a_i = λ^(i+1), not λ^i. The bug is invisible in a first chunk that starts from S = 0 (nothing to
# decay), so the checker starts from a nonzero S.
def fixed_chunk_form_solution(q, k, v, S, slope, C=16):
    lam, out = math.exp(-slope), []
    for c0 in range(0, q.shape[0], C):
        qc, kc, vc = q[c0:c0 + C], k[c0:c0 + C], v[c0:c0 + C]
        i = torch.arange(qc.shape[0], dtype=q.dtype)
        a, b = lam ** (i + 1), lam ** (len(i) - 1 - i)  # the fix: a_i = λ^(i+1)
        out.append((qc * a[:, None]) @ S + ((qc @ kc.T) * decay_matrix(slope, len(i))) @ vc)
        S = lam ** len(i) * S + (kc * b[:, None]).T @ vc
    return torch.cat(out), S


check_chunk_form_fix(fixed_chunk_form_solution)

# %% [markdown]
# ### Exercise 4 (Triton): the lightning output tile
#
# Complete the kernel: one program computes one chunk of one head, $O = \operatorname{diag}(a)\,QS +
# (QK^\top \odot D)\,V$ with $a_i = \lambda^{i+1}$, $D_{ij} = \lambda^{i-j}$ for $j \le i$ (scale 1). The loads
# (`load_chunk`, zero-padded to powers of two) and the store are written; fill in the marked gap, keeping every
# exponent $\le 0$. The checker launches it on odd shapes ($L = 5, 13, 33$; $K, V$ not powers of two; slopes
# $10^{-3}$ to 8) — in the interpreter on a CPU — against the recurrence, and says which element differs and why
# (in the interpreter an exponential that overflows fails it, even one masked afterwards).

# %%
@triton.jit
def my_output_tile_kernel(q_ptr, k_ptr, v_ptr, s_ptr, o_ptr, slope, L, K, V,
                          BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    # q, k [BL, BK], v [BL, BV], S [BK, BV]: masked loads, zeros past L, K and V
    q, k, v, S = load_chunk(q_ptr, k_ptr, v_ptr, s_ptr, L, K, V, BL, BK, BV)
    rows, vs = tl.arange(0, BL), tl.arange(0, BV)  # [BL] row i of the chunk, [BV] columns of V
    # ---- your code: o [BL, BV] = diag(a) Q S + (Q Kᵀ ⊙ D) V ----
    o = tl.zeros((BL, BV), dtype=tl.float32)
    # ---- end of your code ----
    o_mask = (rows[:, None] < L) & (vs[None, :] < V)
    tl.store(o_ptr + rows[:, None] * V + vs[None, :], o, mask=o_mask)


# %%
attempt(check_output_tile_kernel, my_output_tile_kernel)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — the gap is a few lines. The exponent of D is masked to -inf above the diagonal *before*
# exp (exp of +slope·(j - i) would overflow for a fast head); the query decay has i + 1; "ieee"
# keeps fp32 products exact on a GPU (the interpreter ignores it). Padded rows and columns load as
# zeros, so they add nothing, and the store's mask drops them.
@triton.jit
def output_tile_kernel_solution(q_ptr, k_ptr, v_ptr, s_ptr, o_ptr, slope, L, K, V,
                                BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    q, k, v, S = load_chunk(q_ptr, k_ptr, v_ptr, s_ptr, L, K, V, BL, BK, BV)
    rows, vs = tl.arange(0, BL), tl.arange(0, BV)
    diff = (rows[:, None] - rows[None, :]).to(tl.float32)  # [BL, BL] i - j
    D = tl.exp(tl.where(diff >= 0, -slope * diff, float("-inf")))  # 0 above the diagonal
    a = tl.exp(-slope * (rows + 1).to(tl.float32))  # [BL] query decay λ^(i+1)
    o = tl.dot(q, S, input_precision="ieee") * a[:, None]  # inter-chunk
    A = tl.dot(q, tl.trans(k), input_precision="ieee") * D  # [BL, BL] intra-chunk scores
    o = tl.dot(A, v, o, input_precision="ieee")  # + (Q Kᵀ ⊙ D) V
    o_mask = (rows[:, None] < L) & (vs[None, :] < V)
    tl.store(o_ptr + rows[:, None] * V + vs[None, :], o, mask=o_mask)


check_output_tile_kernel(output_tile_kernel_solution)

# %% [markdown]
# ## Summary
#
# - **Linear attention** drops the softmax (and, since TransNormer, its normaliser) so that
#   $\sum_s (q_t k_s^\top) v_s = q_t S_t$: the past becomes a $K \times V$ state of constant size. The same numbers
#   come from three forms — parallel ($O(T^2 d)$), recurrent ($O(Td^2)$, sequential) and chunkwise ($O(TCd + Td^2)$:
#   matrix multiplies inside chunks, the state across them).
# - **Lightning Attention** adds a fixed per-head decay, $S_t = e^{-s_h} S_{t-1} + k_t^\top v_t$, with MiniMax's
#   ALiBi-like rates scaled down layer by layer (`minimax_slopes`): each layer mixes short and long memories, with
#   half-lives from under a token to about 180 tokens in M1's first layer, and from 60 to about 14,000 in its last
#   lightning layer.
# - **Chunkwise with decay**: intra-chunk $(QK^\top \odot D)V$, inter-chunk $\operatorname{diag}(a)QS$, state update
#   $\lambda^L S + (\operatorname{diag}(b)K)^\top V$ — every exponent $\le 0$, so nothing overflows.
# - **Triton**: a scan kernel writes the chunk states, a parallel kernel the outputs; the backward is a reverse
#   scan and one parallel kernel. A fused recurrent kernel decodes token by token (forward only).
# - **The layer** (`LightningAttention`): SiLU on $q, k, v$, no scaling, RMSNorm, a sigmoid output gate — equal to
#   `transformers`' `MiniMaxLightningAttention`, and decoding from a state equals the prefill.
# - **Hybrids**: MiniMax-M1 keeps one softmax layer in eight; a FLOP count puts it at a third to an eighth of
#   DeepSeek-R1's generation cost at 100K tokens (the report: 25 %). A fixed state recalls only about $d$ arbitrary
#   pairs; MiniMax-M2 went back to full attention (M2.5's released architecture too).
#
# Next, chapter 5 replaces the additive update by the **delta rule**, which lets the state overwrite what it holds
# (DeltaNet, Gated DeltaNet), and chunks it with the same idea.
#
# ## References
#
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of
#   February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix
#   *The seed survey*. Its figures are checked against the models' configs and papers; where they disagree, the text
#   says so.
# - A. Katharopoulos, A. Vyas, N. Pappas, F. Fleuret, *Transformers are RNNs: Fast Autoregressive Transformers with
#   Linear Attention* (feature maps, with the normaliser), ICML 2020. [arXiv:2006.16236](https://arxiv.org/abs/2006.16236)
# - Y. Sun et al., *Retentive Network: A Successor to Transformer for Large Language Models* (RetNet: decayed linear
#   attention and its parallel, recurrent and chunkwise forms), 2023. [arXiv:2307.08621](https://arxiv.org/abs/2307.08621)
# - Z. Qin et al., *Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
#   Models*, 2024. [arXiv:2401.04658](https://arxiv.org/abs/2401.04658)
# - Z. Qin et al., *The Devil in Linear Transformer* (TransNormer: the normaliser dropped, NormAttention), 2022.
#   [arXiv:2210.10340](https://arxiv.org/abs/2210.10340)
# - MiniMax, *MiniMax-01: Scaling Foundation Models with Lightning Attention* (§2: the 7 : 1 hybrid, 80 layers), 2025.
#   [arXiv:2501.08313](https://arxiv.org/abs/2501.08313)
# - MiniMax, *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention*, 2025.
#   [arXiv:2506.13585](https://arxiv.org/abs/2506.13585)
# - O. Press, N. A. Smith, M. Lewis, *Train Short, Test Long: Attention with Linear Biases Enables Input Length
#   Extrapolation* (ALiBi's slopes), ICLR 2022. [arXiv:2108.12409](https://arxiv.org/abs/2108.12409)
# - DeepSeek-AI, *DeepSeek-V3 Technical Report*, 2024 (R1's architecture). [arXiv:2412.19437](https://arxiv.org/abs/2412.19437)
# - S. Yang, B. Wang, Y. Zhang, Y. Shen, Y. Kim, *Gated Linear Attention Transformers with Hardware-Efficient
#   Training*, 2023 (the chunkwise kernels fla builds on). [arXiv:2312.06635](https://arxiv.org/abs/2312.06635);
#   `fla-core` 0.6: `naive_recurrent_simple_gla`, `chunk_simple_gla` (the test oracle and benchmark anchor).
# - `transformers` 5.x: `MiniMaxLightningAttention`, `MiniMaxCache`, `MiniMaxConfig` (the layer's oracle).

# %% [markdown]
# ## Engineering notes (optional)
#
# What a practitioner needs and a first reading skips: the check of MiniMax's slopes against `transformers`, the
# backward kernels, the decoding kernel, how the kernels are launched and wrapped for autograd, a live timing on a
# GPU, and the exercise checkers.
#
# ### Argument checks
#
# What every lightning op validates, from `minisparse._checks`: shapes and dtypes of `q, k, v`, one rate a head,
# the initial state's shape, the scale; and, for the naive ops always (the Triton ops by the value-check rule of
# `runtime.checking_values`), that every rate is positive and finite.

# %%
#| export lightning.naive
def _check_slope(op, slope):
    """slope > 0 and finite (a NaN is reported as NaN): one reduction and a host sync."""
    _checks.value_range(op, "slope", slope, low=0, low_open=True, finite=True,
                        why="decay rates: exp(-slope) < 1 each step")


def _check_lightning(op, q, k, v, slope, scale, initial_state, check_values,
                     dtypes=_checks.FLOATS):
    """Validate what every lightning op takes; return the scale as a float (K ** -0.5 for None).
    `check_values`: also check the slope's values now (the naive ops always do; see
    runtime.checking_values for the Triton ops). `dtypes`: q, k, v's and the state's (the naive
    ops take float64 too; the kernels pass _checks.KERNEL_FLOATS)."""
    B, _, H, K, _, V = _checks.qkv(op, q, k, v, dtypes=dtypes)
    _checks.per_head_token(op, "slope", slope, (H,), "[H]", "one decay rate a head", like=q)
    _checks.initial_state(op, initial_state, (B, H, K, V), like=q, dtypes=dtypes)
    if check_values:
        _check_slope(op, slope)
    return _checks.scale(op, scale, K)


# %% [markdown]
# The layer's constructor checks its sizes the same way (`_check_layer_args`, called by
# `LightningAttention.__init__`).

# %%
#| export lightning.layer
def _check_layer_args(op, hidden_size, num_heads, head_dim, layer_idx, num_layers, block_size):
    """Positive int sizes, and 0 <= layer_idx < num_layers; raises ValueError naming `op`."""
    for name, value in [("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("head_dim", head_dim), ("num_layers", num_layers),
                        ("block_size", block_size)]:
        _checks.positive_int(op, name, value)
    _layer_index(op, layer_idx, num_layers)


# %% [markdown]
# ### The recurrence against fla
#
# An independent reference for the spec: fla's `naive_recurrent_simple_gla` with the gate $g = -s_h$ at every step
# (the same recurrence), on section 4.3's inputs.

# %%
import warnings

try:  # fla-core: an independent reference for the recurrence (its naive_* functions run on CPU)
    # fla-core 0.6.0 warns at import, from its own file, when Triton has no GPU
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Triton is not supported on current platform",
                                UserWarning)
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
except ImportError:
    naive_recurrent_simple_gla = None
    print("fla-core is not installed: "
          "the check against fla's naive_recurrent_simple_gla is skipped")

if naive_recurrent_simple_gla is not None:  # section 4.3's q0, k0, v0, h00
    gate = (-slope0).expand(B0, T0, H0)  # [B, T, H] log decay, the same every step
    o_fla, s_fla = naive_recurrent_simple_gla(q0, k0, v0, gate, scale=K0 ** -0.5, initial_state=h00,
                                              output_final_state=True)
    assert_close("recurrent vs fla naive_recurrent_simple_gla: o", o_fla, o_rec0, 1e-5)
    assert_close("recurrent vs fla naive_recurrent_simple_gla: state", s_fla, s_rec0, 1e-5)
    print("naive_recurrent_lightning_attn == fla's naive_recurrent_simple_gla(g = -slope)")


# %% [markdown]
# ### MiniMax's slopes, bit for bit
#
# `minimax_slopes` against the `slope_rate` buffer of `transformers`' `MiniMaxLightningAttention`, for several head
# and layer counts (the two $10^{-5}$ of section 4.2 included).

# %%
if transformers is not None:
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    for heads, layers, idx in [(8, 6, 0), (8, 6, 3), (8, 6, 5), (64, 80, 17), (5, 1, 0)]:
        cfg = MiniMaxConfig(hidden_size=heads * 8, num_attention_heads=heads, head_dim=8,
                            num_hidden_layers=layers, block_size=16)
        hf = MiniMaxLightningAttention(cfg, idx)
        ours = minimax_slopes(heads, idx, layers)
        assert torch.equal(hf.slope_rate.view(-1), ours), (heads, layers, idx)
    print("minimax_slopes == transformers' MiniMaxLightningAttention.slope_rate "
          "(bit for bit, 5 configurations)")


# %% [markdown]
# ### Loading `transformers`' layer
#
# `LightningAttention.from_hf` copies a `MiniMaxLightningAttention`: the shapes, the layer index, the block size
# and the norm's epsilon from the module, then the four weights and the slope buffer one to one (the parameter
# names are the same).

# %%
#| export lightning.hf
import torch

from minisparse import _checks


def layer_from_hf(cls, module, backend="auto"):
    """A `cls` (LightningAttention) with the weights, slopes and block size of transformers'
    MiniMaxLightningAttention `module`, on its device and in its dtype."""
    _checks.hf_module("LightningAttention.from_hf", module,
                      "transformers' MiniMaxLightningAttention",
                      attrs=("num_attention_heads", "head_dim", "layer_idx", "num_hidden_layers",
                             "block_size", "qkv_proj", "output_gate", "out_proj", "norm.weight",
                             "slope_rate"))
    H, d = module.num_attention_heads, module.head_dim
    layer = cls(module.qkv_proj.in_features, H, d, module.layer_idx, module.num_hidden_layers,
                block_size=module.block_size, eps=module.norm.variance_epsilon, backend=backend)
    w = module.qkv_proj.weight
    layer = layer.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for name in ("qkv_proj", "output_gate", "out_proj", "norm"):
            getattr(layer, name).weight.copy_(getattr(module, name).weight)
        layer.slope_rate.copy_(module.slope_rate.reshape(-1))
    return layer


# %% [markdown]
# Against `transformers`: a tiny MiniMax configuration, random weights, the same input; then decoding — a prompt
# through the layer with a cache, then tokens one at a time from the cached state — must equal running the whole
# sequence at once. `transformers` takes its state through a `MiniMaxCache` (its `linear_cache` per layer), which
# we read back to compare states too.

# %%
from minisparse.lightning import LightningAttention

if transformers is not None:
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxCache, MiniMaxLightningAttention

    cfg = MiniMaxConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=4,
                        block_size=32)
    torch.manual_seed(0)
    hf_layer = MiniMaxLightningAttention(cfg, layer_idx=1).eval()
    for p in hf_layer.parameters():
        torch.nn.init.normal_(p, std=0.15)
    ours = LightningAttention.from_hf(hf_layer).eval()
    x_l = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_hf, _ = hf_layer(x_l, position_embeddings=None, attention_mask=None)
        y_ours, _ = ours(x_l)
        assert_close("LightningAttention vs MiniMaxLightningAttention", y_hf, y_ours, 1e-5)
        # prefill 50 tokens, then decode 20 one at a time (cache passed positionally)
        cache = MiniMaxCache()
        outs_hf = [hf_layer(x_l[:, :50], None, None, cache)[0]]
        outs_hf += [hf_layer(x_l[:, t:t + 1], None, None, cache)[0] for t in range(50, 70)]
        y_p, st = ours(x_l[:, :50], use_cache=True)
        outs = [y_p]
        for t in range(50, 70):
            y_t, st = ours(x_l[:, t:t + 1], state=st)
            outs.append(y_t)
        assert_close("decode (transformers' cache) vs full", y_hf, torch.cat(outs_hf, 1), 1e-5)
        assert_close("decode (our state) vs full", y_hf, torch.cat(outs, 1), 1e-5)
        assert_close("our state vs transformers' linear cache", cache.get_linear_cache(1), st, 1e-5)
    print("LightningAttention.from_hf == transformers' MiniMaxLightningAttention; prefill + 20 "
          "decode steps == the full sequence, and the states agree")


# %% [markdown]
# ### The backward kernels
#
# The equations are in section 4.4: a reverse scan over chunks for the state gradients, then one program per chunk
# for $\partial Q, \partial K, \partial V$, looping over $V$ in tiles and storing each $\partial V$ tile as it goes.

# %%
#| export lightning.triton
@triton.jit
def _bwd_dstates_kernel(q_ptr, do_ptr, slope_ptr, dht_ptr, dstates_ptr, dh0_ptr, scale, T, H, K, V,
                        NT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PRECISION: tl.constexpr):
    """The reverse chunk scan: the gradient of the state leaving every chunk, and of initial_state.

    Program: one (batch b, head h) and one [BK, BV] tile of ∂S.
    Grid (cdiv(K, BK) · cdiv(V, BV), B · H).
    Tiling: the tile of ∂S stays in fp32 registers while the program walks the chunks from the last
    to the first; each step loads Qᵀ [BK, C] and ∂O [C, BV] of one chunk (rows past T load as 0).
    Math, with λ = exp(-s_h), L the chunk's length and a_i = λ^(i+1):
        ∂S = ∂ht[b, h] if HAS_DHT else 0
        for n = NT-1 .. 0:  dstates[b, h, n] = ∂S;   ∂S ← λ^L ∂S + scale · Qᵀ diag(a) ∂O
        dh0[b, h] = ∂S if STORE_DH0
    """
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    n_v = tl.cdiv(V, BV)
    ks = (i_kv // n_v) * BK + tl.arange(0, BK)
    vs = (i_kv % n_v) * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    s = tl.load(slope_ptr + h).to(tl.float32)
    q_base = q_ptr + (b * T * H + h) * K
    do_base = do_ptr + (b * T * H + h) * V
    dstates_base = dstates_ptr + i_bh * NT * K * V
    kv_off = ks[:, None] * V + vs[None, :]
    kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
    dS = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_DHT:
        dS = tl.load(dht_ptr + i_bh * K * V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    query_decay = tl.exp(-s * (rows + 1).to(tl.float32))  # [C]
    for i in range(NT):
        n = NT - 1 - i
        tl.store(dstates_base + n * K * V + kv_off, dS.to(dstates_ptr.dtype.element_ty),
                 mask=kv_mask)
        t = (n * C + rows).to(tl.int64)  # int64: t·H·K passes 2^31 at long context
        L = tl.minimum(T - n * C, C)
        qt = tl.load(q_base + t[None, :] * H * K + ks[:, None],
                     mask=(t[None, :] < T) & (ks[:, None] < K),
                     other=0.0)  # [BK, C] Qᵀ
        do = tl.load(do_base + t[:, None] * H * V + vs[None, :],
                     mask=(t[:, None] < T) & (vs[None, :] < V),
                     other=0.0)  # [C, BV]
        qt_a = (qt * query_decay[None, :]).to(do.dtype)  # [BK, C] Qᵀ diag(a)
        dS = dS * tl.exp(-s * L.to(tl.float32)) + scale * tl.dot(qt_a, do,
                                                                   input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0_ptr + i_bh * K * V + kv_off, dS, mask=kv_mask)


# %%
#| export lightning.triton
@triton.jit
def _bwd_dqkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, slope_ptr, states_ptr, dstates_ptr, dq_ptr,
                     dk_ptr, dv_ptr, scale, T, H, K, V, NT, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, NV: tl.constexpr, PRECISION: tl.constexpr):
    """∂q, ∂k and ∂v of one chunk.

    Program: one (batch b, head h, chunk n). Grid (NT, B · H).
    Tiling: Q, K [C, BK] with all of K in one tile; a loop over the NV tiles of V loads V, ∂O [C,
    BV] and the tiles [BK, BV] of S_n (entering the chunk) and ∂S'_n (leaving it), accumulates ∂O Vᵀ
    [C, C], ∂O S_nᵀ and V ∂S'_nᵀ [C, BK] in fp32, and stores that tile of ∂V.
    Math, with A = scale · (Q Kᵀ ⊙ D), ∂A = scale · (∂O Vᵀ ⊙ D), a_i = λ^(i+1), b_j = λ^(L-1-j):
        ∂Q = scale · diag(a) ∂O S_nᵀ + ∂A K,   ∂K = ∂Aᵀ Q + diag(b) V ∂S'_nᵀ,
        ∂V = Aᵀ ∂O + diag(b) K ∂S'_n
    """
    n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    t = n * C + rows
    t0 = (n * C).to(tl.int64)  # the chunk's first token, in int64: t·H·K passes 2^31
    L = tl.minimum(T - n * C, C)
    ks = tl.arange(0, BK)
    s = tl.load(slope_ptr + h).to(tl.float32)
    qk_base = (b * T * H + h) * K + t0 * H * K  # where chunk n of (b, h) starts in q, k, dq, dk
    vo_base = (b * T * H + h) * V + t0 * H * V  # and in v, do, dv
    state_base = (i_bh * NT + n) * K * V  # chunk n's [K, V] tile in states and dstates
    qk_off = rows[:, None] * H * K + ks[None, :]  # [C, BK]
    qk_mask = (t[:, None] < T) & (ks[None, :] < K)
    q = tl.load(q_ptr + qk_base + qk_off, mask=qk_mask, other=0.0)
    k = tl.load(k_ptr + qk_base + qk_off, mask=qk_mask, other=0.0)
    diff = (rows[:, None] - rows[None, :]).to(tl.float32)
    D = tl.exp(tl.where(diff >= 0, -s * diff, float("-inf")))  # [C, C]
    A = tl.dot(q, tl.trans(k), input_precision=PRECISION) * D * scale  # [C, C] scale · (Q Kᵀ ⊙ D)
    query_decay = tl.exp(-s * (rows + 1).to(tl.float32))
    key_decay = tl.exp(tl.where(rows < L, -s * (L - 1 - rows).to(tl.float32), float("-inf")))
    dA = tl.zeros((C, C), dtype=tl.float32)  # ∂O Vᵀ
    dq = tl.zeros((C, BK), dtype=tl.float32)  # ∂O S_nᵀ
    dk = tl.zeros((C, BK), dtype=tl.float32)  # V ∂S'_nᵀ
    for i_v in range(NV):
        vs = i_v * BV + tl.arange(0, BV)
        vo_off = rows[:, None] * H * V + vs[None, :]  # [C, BV]
        vo_mask = (t[:, None] < T) & (vs[None, :] < V)
        kv_off = ks[:, None] * V + vs[None, :]  # [BK, BV]
        kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
        v = tl.load(v_ptr + vo_base + vo_off, mask=vo_mask, other=0.0)
        do = tl.load(do_ptr + vo_base + vo_off, mask=vo_mask, other=0.0)
        S = tl.load(states_ptr + state_base + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        dS = tl.load(dstates_ptr + state_base + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        dA = tl.dot(do, tl.trans(v), dA, input_precision=PRECISION)
        dq = tl.dot(do, tl.trans(S), dq, input_precision=PRECISION)
        dk = tl.dot(v, tl.trans(dS), dk, input_precision=PRECISION)
        dv = tl.dot(tl.trans(A).to(do.dtype), do, input_precision=PRECISION)  # Aᵀ ∂O
        dv += tl.dot(k, dS, input_precision=PRECISION) * key_decay[:, None]  # + diag(b) K ∂S'
        tl.store(dv_ptr + vo_base + vo_off, dv.to(dv_ptr.dtype.element_ty), mask=vo_mask)
    dA = (dA * D * scale).to(q.dtype)  # scale · (∂O Vᵀ ⊙ D)
    dq = dq * (query_decay * scale)[:, None]
    dq = tl.dot(dA, k, dq, input_precision=PRECISION)
    dk = dk * key_decay[:, None]
    dk = tl.dot(tl.trans(dA), q, dk, input_precision=PRECISION)
    tl.store(dq_ptr + qk_base + qk_off, dq.to(dq_ptr.dtype.element_ty), mask=qk_mask)
    tl.store(dk_ptr + qk_base + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=qk_mask)


# %% [markdown]
# ### Decoding: one program per state tile, token by token
#
# Generating text feeds one token at a time. A chunk kernel would pad that token to a 64-row chunk; the recurrent
# form is the natural fit: read the state once, update it, read it out, write it back —
#
# ```
#  program (b, h, V-tile iv):     S [BK, BV] fp32 from initial_state (all of K in one tile)
#  for each of the T (few) tokens:
#      S ← exp(-s) · S + kᵀ v       an outer product: k [BK, 1] * v [1, BV]
#      o = σ · Σ_k q_k S[k, :]      a reduction over K, no tensor cores needed
#  store S → final_state
# ```
#
# Decoding is memory-bound: each call (one token when decoding) reads and writes the $K \times V$ state once,
# $2 \cdot 4KV$ bytes a head in fp32, and does $4KV$ FLOPs — half a FLOP a byte, far below any GPU's ridge. `fused_recurrent_lightning_attn` is
# **forward only** (it raises if asked for gradients): training uses the chunk kernel.

# %%
#| export lightning.triton
@triton.jit
def _fused_recurrent_kernel(q_ptr, k_ptr, v_ptr, slope_ptr, h0_ptr, o_ptr, ht_ptr, scale, T, H, K,
                            V, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                            STORE_HT: tl.constexpr):
    """The recurrence token by token, for decoding.

    Program: one (batch b, head h, V-tile). Grid (cdiv(V, BV), B · H).
    Tiling: the state's [BK, BV] tile (all of K, padded to a power of two) stays in fp32 registers
    through the T tokens; each step loads one token's q, k [BK] and v [BV]. No tl.dot: an outer
    product and a reduction over K.
    Math, with λ = exp(-s_h):
        S = h0[b, h] if HAS_H0 else 0
        for t = 0 .. T-1:  S ← λ S + k_tᵀ v_t,   o_t = scale · q_t S
        ht[b, h] = S if STORE_HT
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = i_bh // H, i_bh % H
    ks = tl.arange(0, BK)
    vs = i_v * BV + tl.arange(0, BV)
    q_base = q_ptr + (b * T * H + h) * K  # token t of (b, h) at q_base + t * H * K
    k_base = k_ptr + (b * T * H + h) * K
    v_base = v_ptr + (b * T * H + h) * V
    o_base = o_ptr + (b * T * H + h) * V
    kv_off = ks[:, None] * V + vs[None, :]
    kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
    lam = tl.exp(-tl.load(slope_ptr + h).to(tl.float32))
    S = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0_ptr + i_bh * K * V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    for i in range(T):
        t = tl.cast(i, tl.int64)  # int64: t·H·K passes 2^31 at long context
        q = tl.load(q_base + t * H * K + ks, mask=ks < K, other=0.0).to(tl.float32)  # [BK]
        k = tl.load(k_base + t * H * K + ks, mask=ks < K, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * H * V + vs, mask=vs < V, other=0.0).to(tl.float32)  # [BV]
        S = S * lam + k[:, None] * v[None, :]
        o = tl.sum(S * q[:, None], axis=0) * scale  # [BV]
        tl.store(o_base + t * H * V + vs, o.to(o_ptr.dtype.element_ty), mask=vs < V)
    if STORE_HT:
        tl.store(ht_ptr + i_bh * K * V + kv_off, S, mask=kv_mask)


# %% [markdown]
# ### Launch and autograd
#
# The chunk length is $C = 64$ on every device: it belongs to the algorithm, not to the launch — $C \times C$ score
# tiles are tensor-core sized, and the intra-chunk work ($TC(K+V)$ FLOPs) stays below the state work ($4TKV$) for
# heads wider than 32. Tile sizes, warps and pipeline stages are launch settings, read from the book's one table,
# `runtime.LAUNCH_TABLE`: each launch names its row (`"lightning.fwd_states"`, `"lightning.fwd_output"`, …), and
# `runtime.launch` takes the first configuration of the row that fits the GPU, capped at the padded $K$ and $V$ (a
# 48-wide head gets a 64-wide tile). The scan kernels use state tiles, the output kernel walks $K$ in blocks, and the
# gradient kernel holds all of $K$ and tiles $V$: it keeps two $C \times K$ fp32 accumulators alive through its loop
# over $V$, so heads wider than 64 read their own row, `"lightning.bwd_dqkv.k128"` (4 warps and 3 stages on Hopper, 8
# warps on Ampere and the T4). A GPU with 64 KiB of shared memory a block (a Colab T4) cannot hold that kernel at
# $K = 128$ with any $V$-tile (104 KiB at $V$-tiles of 32, 92 at 16): there `runtime.launch` raises
# `runtime.SharedMemoryError`, and the backward computes the gradients by autograd through the PyTorch chunk form
# instead, with a warning (`runtime.grads_by_autograd`; `bench/notes/lightning.md` has the numbers). Tests force odd
# tiles with `runtime.launch_config("lightning.fwd_states", BK=16, BV=16)`.

# %%
for name in ("lightning.fwd_states", "lightning.fwd_output", "lightning.bwd_dstates",
             "lightning.bwd_dqkv", "lightning.bwd_dqkv.k128", "lightning.fused_recurrent"):
    print(f"{name:25s} on this machine:", runtime.launch_configs(name, DEVICE, DTYPE)[0])

# %%
#| export lightning.triton
_CHUNK = 64  # C, the chunk length of the algorithm (section 4.3): the same on every device
_MAX_DIM = 128  # K lives in one on-chip tile in the gradient kernel; V is capped alike
_INSTEAD = ("the PyTorch chunk form: naive_chunk_lightning_attn, or "
            "LightningAttention(..., backend='naive')")


def _pow2(n):
    """The width of a tile for n columns: the next power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(n))


def _precision(dtype):
    # fp32 exact (no TF32 rounding); ignored for 16-bit
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_kernel_inputs(op, q, k, v, slope, scale, initial_state, check_values):
    """_check_lightning's checks with the kernels' dtypes (fp32, fp16, bf16: no fp64), then what
    the kernels need (CUDA tensors or the interpreter, no bf16 under the interpreter, K and V <=
    128), then the slope's values where `check_values` and
    the value-check rule ask for them (runtime.checking_values). Returns the scale as a float."""
    scale = _check_lightning(op, q, k, v, slope, scale, initial_state, check_values=False,
                             dtypes=_checks.KERNEL_FLOATS)
    _checks.triton_inputs(op, q, k, v, slope, initial_state, instead=_INSTEAD,
                          max_dims={"K": (q.shape[-1], _MAX_DIM), "V": (v.shape[-1], _MAX_DIM)})
    if torch.is_grad_enabled() and slope.requires_grad:  # else it would silently get no gradient
        raise RuntimeError(f"{op}: the kernels take slope as a fixed rate (no gradient), but it "
                           "requires grad; pass slope.detach(), or train the rates with "
                           "naive_chunk_lightning_attn")
    if check_values and _checks.checking_values(False, q):
        _check_slope(op, slope)
    return scale


def _state_tiles(K, V):
    """runtime.launch's `fit` for the scan kernels: a [BK, BV] tile within the padded state."""
    return lambda c: dict(c, BK=min(c["BK"], _pow2(K)), BV=min(c["BV"], _pow2(V)))


def _v_tiles(V, loop=False):
    """`fit` for the kernels that tile V alone: BV no wider than the padded V; with `loop`, also NV,
    the number of V-tiles the gradient kernel loops over."""
    def fit(c):
        bv = min(c["BV"], _pow2(V))
        return dict(c, BV=bv, NV=triton.cdiv(V, bv)) if loop else dict(c, BV=bv)
    return fit


def _options(q, v):
    """runtime.launch's keywords: the configuration that fits is remembered per padded K and V (they
    set the shared memory a tile needs); with autotuning on, Triton's autotuner retunes per length
    and head dims."""
    return dict(device=q.device, dtype=q.dtype, key=(_pow2(q.shape[-1]), _pow2(v.shape[-1])),
                autotune_key=["T", "K", "V"], instead=_INSTEAD)


def _forward(q, k, v, slope, scale, h0, output_final_state):
    """o [B, T, H, V] in q's dtype, the final state [B, H, K, V] fp32 (or None), and the chunk
    states [B, H, NT, K, V] in q's dtype, which the backward reads."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, _CHUNK)
    prec = _precision(q.dtype)
    states = torch.empty(B, H, NT, K, V, dtype=q.dtype, device=q.device)
    ht = None
    if output_final_state:
        ht = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    runtime.launch("lightning.fwd_states", _fwd_states_kernel,
                   lambda c: (triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]), B * H),
                   (k, v, slope, h0, states, ht, T, H, K, V, NT),
                   dict(C=_CHUNK, HAS_H0=h0 is not None, STORE_HT=ht is not None, PRECISION=prec),
                   fit=_state_tiles(K, V), **_options(q, v))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    runtime.launch("lightning.fwd_output", _fwd_output_kernel,
                   lambda c: (triton.cdiv(V, c["BV"]), NT, B * H),
                   (q, k, v, slope, states, o, scale, T, H, K, V, NT),
                   dict(C=_CHUNK, PRECISION=prec), fit=_state_tiles(K, V), **_options(q, v))
    return o, ht, states


def _backward(q, k, v, slope, scale, states, do, dht, need_dh0):
    """dq, dk, dv (their inputs' dtypes) and d initial_state [B, H, K, V] fp32 (None unless
    `need_dh0`), from do [B, T, H, V] in q's dtype and d final_state (fp32 or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = states.shape[2]
    prec = _precision(q.dtype)
    dstates = torch.empty_like(states)
    dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device) if need_dh0 else None
    runtime.launch("lightning.bwd_dstates", _bwd_dstates_kernel,
                   lambda c: (triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]), B * H),
                   (q, do, slope, dht, dstates, dh0, scale, T, H, K, V, NT),
                   dict(C=_CHUNK, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
                        PRECISION=prec),
                   fit=_state_tiles(K, V), **_options(q, v))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    runtime.launch("lightning.bwd_dqkv" + (".k128" if K > 64 else ""), _bwd_dqkv_kernel,
                   lambda c: (NT, B * H),
                   (q, k, v, do, slope, states, dstates, dq, dk, dv, scale, T, H, K, V, NT),
                   dict(C=_CHUNK, BK=_pow2(K), PRECISION=prec), fit=_v_tiles(V, loop=True),
                   **_options(q, v))
    return dq, dk, dv, dh0


# %%
#| export lightning.triton
class _ChunkLightning(torch.autograd.Function):
    """Autograd glue: the forward saves q, k, v, the slopes and the chunk states; the backward runs
    the two gradient kernels."""

    @staticmethod
    def forward(ctx, q, k, v, slope, scale, h0, output_final_state):
        o, ht, states = _forward(q, k, v, slope, scale, h0, output_final_state)
        ctx.save_for_backward(q, k, v, slope, h0, states)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, slope, h0, states = ctx.saved_tensors
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        try:
            dq, dk, dv, dh0 = _backward(q, k, v, slope, ctx.scale, states,
                                        do.to(q.dtype).contiguous(),
                                        dht.float().contiguous() if dht is not None else None,
                                        need_dh0)
        except runtime.SharedMemoryError:  # a GPU whose shared memory the kernels outgrow (a T4)
            def chunk_form(q, k, v, h0):
                return _naive_chunk(q, k, v, slope, ctx.scale, h0, dht is not None, _CHUNK,
                                    check_values=False)
            dq, dk, dv, dh0 = runtime.grads_by_autograd("chunk_lightning_attn", chunk_form,
                                                        [q, k, v, h0], [do, dht])
            dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        dh0 = dh0.to(h0.dtype) if need_dh0 else None
        return dq, dk, dv, None, None, dh0, None


def chunk_lightning_attn(q, k, v, slope, scale=None, initial_state=None, output_final_state=False):
    """Lightning attention in Triton, chunkwise (C = 64), differentiable in q, k, v, initial_state.

    q, k [B, T, H, K]; v [B, T, H, V] (K, V <= 128, any size); all three float32, float16 or
    bfloat16 (not bfloat16 under the interpreter). slope [H] float, > 0 (fixed rates: no gradient).
    scale: a float, default K ** -0.5. initial_state [B, H, K, V] float or None.
    Returns (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32, or None unless
    output_final_state).
    S_t = exp(-slope_h) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t.
    """
    return _chunk(q, k, v, slope, scale, initial_state, output_final_state, check_values=True)


def _chunk(q, k, v, slope, scale, initial_state, output_final_state, check_values):
    """chunk_lightning_attn; check_values=False skips the slope's values (the layer's own)."""
    scale = _check_kernel_inputs("chunk_lightning_attn", q, k, v, slope, scale, initial_state,
                                 check_values)
    h0 = initial_state.contiguous() if initial_state is not None else None
    return _ChunkLightning.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                 slope.detach().float().contiguous(),
                                 scale, h0, bool(output_final_state))


def fused_recurrent_lightning_attn(q, k, v, slope, scale=None, initial_state=None,
                                   output_final_state=False):
    """Lightning attention token by token in Triton, for decoding from a state. Forward only.

    Same arguments and result as chunk_lightning_attn. Its cost grows with T sequentially: use it
    for T = 1 (or a handful of tokens), chunk_lightning_attn for prompts and training. Raises if
    gradients are required.
    """
    return _fused_recurrent(q, k, v, slope, scale, initial_state, output_final_state,
                            check_values=True)


def _fused_recurrent(q, k, v, slope, scale, initial_state, output_final_state, check_values):
    """fused_recurrent_lightning_attn; check_values=False skips the slope's values (the layer's)."""
    op = "fused_recurrent_lightning_attn"
    scale = _check_kernel_inputs(op, q, k, v, slope, scale, initial_state, check_values)
    _checks.forward_only(op, q, k, v, initial_state, instead="chunk_lightning_attn")
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = initial_state.contiguous() if initial_state is not None else None
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    ht = None
    if output_final_state:
        ht = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    runtime.launch("lightning.fused_recurrent", _fused_recurrent_kernel,
                   lambda c: (triton.cdiv(V, c["BV"]), B * H),
                   (q.contiguous(), k.contiguous(), v.contiguous(),
                    slope.detach().float().contiguous(), h0, o, ht,
                    scale, T, H, K, V),
                   dict(BK=_pow2(K), HAS_H0=h0 is not None, STORE_HT=ht is not None),
                   fit=_v_tiles(V), **_options(q, v))
    return o, ht


# %% [markdown]
# ### The decoding kernel against the recurrence
#
# One token from the final state of section 4.4's check equals the next step of the recurrence.

# %%
from minisparse.lightning import fused_recurrent_lightning_attn
# decoding: one token from the final state equals the next step of the recurrence
with torch.no_grad():
    q1_, k1_, v1_ = (x[:, :1] for x in (qc, kc, vc))
    o_dec, s_dec = fused_recurrent_lightning_attn(q1_, k1_, v1_, slope_c,
                                                  initial_state=s_k.detach(),
                                                  output_final_state=True)
    o_dr, s_dr = naive_recurrent_lightning_attn(q1_, k1_, v1_, slope_c, initial_state=s_k.detach(),
                                                output_final_state=True)
    assert_close("fused_recurrent o", o_dr, o_dec, fwd_tol)
    assert_close("fused_recurrent state", s_dr, s_dec, fwd_tol)
print("fused_recurrent_lightning_attn: one decoding step from the final state == the recurrence")

# %% [markdown]
# ### A live timing
#
# On a GPU, the cell below times the kernel at $T = 8192$ (it prints a note on a CPU, where the interpreter's
# timings would mean nothing).

# %%
if runtime.has_gpu() and not runtime.interpreting():
    Bm, Tm, Hm, Dm = 2, 8192, 16, 128
    qm, km, vm = (torch.randn(Bm, Tm, Hm, Dm, device=DEVICE, dtype=DTYPE) / 4 for _ in range(3))
    sm = minimax_slopes(Hm, 0, 2).to(DEVICE)
    ms = bench.median_ms(lambda: chunk_lightning_attn(qm, km, vm, sm))
    sd = bench.median_ms(lambda: F.scaled_dot_product_attention(qm.transpose(1, 2),
                                                                km.transpose(1, 2),
                                                                vm.transpose(1, 2), is_causal=True))
    print(f"chunk_lightning_attn fwd {ms:.3f} ms, SDPA causal fwd {sd:.3f} ms (B2 T8192 H16 D128)")
else:
    print("No GPU here: nothing to time live (section 4.8 shows the committed H100 numbers).")

# %% [markdown]
# ### The exercise checkers
#
# `minisparse.lightning.exercises`: each checker compares an answer with an independent computation — the
# recurrence, a measurement, a closed form — and says what differs. The Triton checker launches the reader's
# kernel directly (it has no row in the launch table), in the interpreter on CPU tensors.

# %% tags=["hide-input"]
#| export lightning.exercises
import math

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minisparse import runtime
from minisparse.lightning.naive import naive_recurrent_lightning_attn
from minisparse.testing import ExerciseError, check, number_answer, rel_rms


def check_balanced_chunk(fn):
    """Exercise 1: fn(d_k, d_v) -> the chunk length where intra-chunk FLOPs equal state FLOPs."""
    check("balanced chunk length", lambda a, b: float(fn(a, b)), lambda a, b: 4 * a * b / (a + b),
          [(128, 128), (64, 64), (128, 256), (192, 128), (16, 48)], tol=1e-6,
          hint="count one chunk of C tokens: the products inside it (Q Kᵀ, then with V, on the "
               "causal half) grow as C², reading and moving the state grows as C; where do the two "
               "parts cost the same?")


def measured_state_norm(slope, T=1024, d=16, n_seq=64, seed=0):
    """RMS over n_seq sequences of ‖S_T‖ (Frobenius), S_t = exp(-slope) S_{t-1} + k_tᵀ v_t,
    with k_t, v_t random unit vectors."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(n_seq, T, d, generator=g, dtype=torch.float64), dim=-1)  # [N, T, d]
    v = F.normalize(torch.randn(n_seq, T, d, generator=g, dtype=torch.float64), dim=-1)
    w = torch.exp(-slope * (T - 1 - torch.arange(T, dtype=torch.float64)))  # [T] token t's weight
    S = torch.einsum("t,ntk,ntv->nkv", w, k, v)  # [N, d, d]
    return S.pow(2).sum(dim=(1, 2)).mean().sqrt().item()


def check_state_norm_prediction(predictions, tol=0.1):
    """Exercise 2: predictions {"no decay", "s = 0.1", "s = 0.01"} -> numbers, each within tol
    of the measurement."""
    slopes = {"no decay": 0.0, "s = 0.1": 0.1, "s = 0.01": 0.01}
    measured = {name: measured_state_norm(s) for name, s in slopes.items()}
    for name, m in measured.items():
        p = number_answer("state norm", predictions.get(name) if isinstance(predictions, dict)
                          else None, f"the prediction for {name!r}")
        if not abs(p - m) <= tol * m:
            raise ExerciseError(
                f"✗ state norm, {name}: you predicted {p:.4g}, the measurement is {m:.4g} (RMS "
                "over 64 random sequences of 1024 tokens, d = 16)\nHint: independent random outer "
                "products are nearly orthogonal, so their squared norms add (a random walk), and "
                "decay weights them geometrically")
    print("✓ state norm: all 3 predictions within 10 % of the measurement ("
          + ", ".join(f"{n}: {m:.3g}" for n, m in measured.items()) + ")")


def _recurrence(q, k, v, S, slope):
    """One head, scale 1, through the book's spec: (o [T, V], final state [K, V])."""
    o, St = naive_recurrent_lightning_attn(q[None, :, None], k[None, :, None], v[None, :, None],
                                           torch.tensor([float(slope)]), scale=1.0,
                                           initial_state=S[None, None], output_final_state=True)
    return o[0, :, 0], St[0, 0]


def _case(T, K, V, slope, state, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(T, K, generator=g) / 2, torch.randn(T, K, generator=g) / 2
    v = torch.randn(T, V, generator=g)
    S = torch.randn(K, V, generator=g) if state else torch.zeros(K, V)
    return q, k, v, S, slope


def check_chunk_form_fix(fn):
    """Exercise 3: fn(q, k, v, S, slope, C=16) -> (o, final state), the recurrence from S."""
    cases = [_case(40, 8, 6, 0.3, True, 1), _case(37, 5, 9, 2.0, True, 2),
             _case(50, 6, 6, 1e-3, False, 3), _case(16, 4, 4, 0.7, True, 4)]
    for n, (q, k, v, S, slope) in enumerate(cases):
        try:
            o, St = fn(q, k, v, S.clone(), slope)
        except NotImplementedError:
            raise ExerciseError("✗ chunk form: not implemented yet — fill in the function and run "
                                "the cell again") from None
        o_ref, S_ref = _recurrence(q, k, v, S, slope)
        where = f"case {n + 1} of {len(cases)} (T = {q.shape[0]}, slope = {slope}, C = 16)"
        for name, got, want in (("outputs", o, o_ref), ("final state", St, S_ref)):
            if tuple(got.shape) != tuple(want.shape):
                raise ExerciseError(f"✗ chunk form, {where}: {name}: shape {tuple(got.shape)}, "
                                    f"expected {tuple(want.shape)}")
        # written so that NaN (a row never written) counts as a difference
        bad = (~((o - o_ref).abs() <= 1e-4 * (1 + o_ref.abs()))).any(dim=1).nonzero()  # [rows, 1]
        if len(bad):
            r = int(bad[0])
            got, exp = ([round(x, 4) for x in t[r, :3].tolist()] for t in (o, o_ref))
            raise ExerciseError(f"✗ chunk form, {where}: row {r} (chunk {r // 16}, position "
                                f"{r % 16} in it) differs: got {got}, expected {exp} (first 3 "
                                "columns)\nHint: which term of row i uses the state that "
                                "entered the chunk, and how many decays has it seen by token i?")
        if not rel_rms(St, S_ref) <= 1e-5:
            raise ExerciseError(f"✗ chunk form, {where}: the outputs match but the final state "
                                f"does not (relative RMS {rel_rms(St, S_ref):.1e}): the last chunk "
                                "has L ≤ C tokens")
    print(f"✓ chunk form: all {len(cases)} cases match the recurrence (outputs and final state)")



# %% tags=["hide-input"]
#| export lightning.exercises
@triton.jit
def load_chunk(q_ptr, k_ptr, v_ptr, s_ptr, L, K, V,
               BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Exercise 4's loads: q, k [BL, BK], v [BL, BV], S [BK, BV] from row-major tensors, zeros
    past L, K and V."""
    rows, ks, vs = tl.arange(0, BL), tl.arange(0, BK), tl.arange(0, BV)
    qk_mask = (rows[:, None] < L) & (ks[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * K + ks[None, :], mask=qk_mask, other=0.0)
    k = tl.load(k_ptr + rows[:, None] * K + ks[None, :], mask=qk_mask, other=0.0)
    v_mask = (rows[:, None] < L) & (vs[None, :] < V)
    v = tl.load(v_ptr + rows[:, None] * V + vs[None, :], mask=v_mask, other=0.0)
    s_mask = (ks[:, None] < K) & (vs[None, :] < V)
    S = tl.load(s_ptr + ks[:, None] * V + vs[None, :], mask=s_mask, other=0.0)
    return q, k, v, S


def _tile_suspects(q, k, v, S, slope):
    """Plausible wrong output tiles, to name what a wrong kernel computed."""
    L = q.shape[0]
    i = torch.arange(L, dtype=torch.float32)
    D = torch.exp(-slope * (i[:, None] - i[None, :]).clamp(min=0)) * (i[:, None] >= i[None, :])
    a = torch.exp(-slope * (i + 1))[:, None]
    intra = (q @ k.T * D) @ v
    return {"the kernel wrote zeros: fill in the gap": torch.zeros_like(intra),
            "the query decay has exponent i, not i + 1": (q * a / math.exp(-slope)) @ S + intra,
            "the inter-chunk term diag(a) Q S is missing": intra,
            "the intra-chunk term (Q Kᵀ ⊙ D) V is missing": (q * a) @ S,
            "D is not zero above the diagonal (the future leaks in)":
                (q * a) @ S + (q @ k.T * torch.exp(-slope * (i[:, None] - i[None, :]).abs())) @ v}


def _overflow_in(err):
    """Whether numpy's overflow error is err or any exception that led to it."""
    while err is not None:
        if isinstance(err, FloatingPointError):
            return True
        err = err.__cause__ or err.__context__
    return False


def check_output_tile_kernel(kernel):
    """Exercise 4: launch kernel[(1,)](q, k, v, S, o, slope, L, K, V, BL=, BK=, BV=) on odd
    shapes and compare o with the recurrence run from S (the interpreter on CPU, or the GPU). In
    the interpreter an exponential that overflows fails the check, even where its value is masked
    afterwards."""
    dev = "cuda" if runtime.has_gpu() and not runtime.interpreting() else "cpu"
    tol = 1e-4 if dev == "cpu" else 2e-3  # a GPU's fp32 tl.dot may round through TF32 unless "ieee"
    shapes = [(5, 3, 7, 0.3), (16, 16, 16, 1e-3), (13, 20, 9, 2.0), (1, 4, 4, 0.5),
              (33, 8, 24, 0.05), (33, 8, 16, 8.0)]  # the last: e^{8·32} overflows fp32
    for n, (L, K, V, slope) in enumerate(shapes):
        q, k, v, S, _ = _case(L, K, V, slope, True, 10 + n)
        ref = _recurrence(q, k, v, S, slope)[0]
        o = torch.full((L, V), float("nan"), device=dev)
        pad = lambda x: max(16, triton.next_power_of_2(x))  # noqa: E731  (tl.dot needs ≥ 16)
        where = f"shape {n + 1} of {len(shapes)} (L = {L}, K = {K}, V = {V}, slope = {slope})"
        try:
            with np.errstate(over="raise"):  # the interpreter computes in numpy: an overflow raises
                kernel[(1,)](q.to(dev), k.to(dev), v.to(dev), S.to(dev), o, slope, L, K, V,
                             BL=pad(L), BK=pad(K), BV=pad(V))
        except Exception as err:  # noqa: BLE001 - only an overflow is the reader's to fix here
            if not _overflow_in(err):
                raise
            raise ExerciseError(f"✗ output tile, {where}: an exponential overflowed — a positive "
                                "exponent (above the diagonal?) taken before the mask; keep every "
                                "exponent ≤ 0: mask it to -inf first, then exp") from None
        o = o.cpu()
        if torch.isnan(o).any():
            r, c = (int(x) for x in torch.isnan(o).nonzero()[0])
            raise ExerciseError(f"✗ output tile, {where}: row {r}, column {c} is NaN — never "
                                "stored, or a NaN computed (exp of a huge exponent times 0?); "
                                "store every row < L, column < V")
        if rel_rms(o, ref) > tol:
            r, c = (int(x) for x in ((o - ref).abs() > tol * (1 + ref.abs())).nonzero()[0])
            suspects = _tile_suspects(q, k, v, S, slope).items()
            why = next((w for w, alt in suspects if torch.allclose(o, alt, rtol=1e-3, atol=1e-5)),
                       "compare with the block equations of section 4.3")
            raise ExerciseError(f"✗ output tile, {where}: row {r}, column {c}: got {o[r, c]:.5g}, "
                                f"expected {ref[r, c]:.5g} (relative RMS {rel_rms(o, ref):.1e})."
                                f"\nLikely: {why}")
    print(f"✓ output tile: all {len(shapes)} shapes match the recurrence")
