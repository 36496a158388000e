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
# # Chapter 5 — DeltaNet and Gated DeltaNet
#
# Chapter 4 folded the past into a fixed-size state $S \in \mathbb R^{K\times V}$ and read it with $q_t S_t$. Its
# update only ever *adds*: $S_t = \lambda S_{t-1} + k_t^\top v_t$. Once a key has been written, the only way to get
# rid of its value is to forget everything at the same rate. The **delta rule** (DeltaNet) changes the update
# instead: before writing $v_t$ under key $k_t$, it reads what the state already returns for $k_t$ and writes only
# the *difference*. **Gated DeltaNet** (GDN) adds a data-dependent forget gate on top. GDN is the linear-attention
# layers of Qwen3-Next and Qwen3.5 [S], and the parent of chapter 6's Kimi Delta Attention.
#
# **Learning objectives.** After this chapter you can
# - explain the delta rule as one gradient step of online regression on the state, and why it can *overwrite*;
# - derive the chunkwise WY/UT form: one unit lower-triangular solve $(I + A)^{-1}$ per chunk turns a product of
#   Householder-like transitions into matrix products;
# - read a GDN head as an attention matrix; count a GDN layer's FLOPs and state in Qwen3-Next's 3:1 hybrid;
# - follow the Triton WY kernel tile by tile, its blocked triangular solve included;
# - build Qwen3-Next's `GatedDeltaNet` layer (projections, short convolutions, gates, gated RMSNorm).
#
# **Prerequisites.** Chapter 4 (linear attention, its chunkwise form and decay matrix, `lightning_flops`);
# chapter 1 for softmax attention's cost and the first Triton kernels. Math: matrix products, forward substitution
# for a triangular system, the gradient of a squared error.
#
# **Time.** About two hours for the core path (5.1–5.9); the Engineering notes at the end are optional.
#
# **Roadmap.** **5.1 Why** — linear attention only adds; the delta rule writes the error. **5.2 Naive** — the
# recurrence. **5.3 Chunkwise** — the UT transform and the WY representation, in PyTorch. **5.4 See it** — the
# attention matrix a head implies, an explorer. **5.5 Cost** — a GDN layer, and Qwen3-Next's 3:1
# stack. **5.6 Fast** — the Triton WY kernel and its blocked solve. **5.7 Layer** — `GatedDeltaNet`. **5.8 Measure**
# — GPU timings against fla and SDPA. **5.9 Exercises** — derive, debug, extend, Triton. **Engineering notes** —
# the other kernels, the backward, decoding, launch plumbing, gate numerics, precision, the transformers check.
#
# What you build is importable afterwards: `from minisparse.deltanet import naive_chunk_gated_delta_rule,
# chunk_gated_delta_rule, GatedDeltaNet` (and the cost model `gdn_flops`, `hybrid_costs`).
#
# Layout `[B, T, H, D]`; gates `g` and write strengths `beta` `[B, T, HV]`; a state `[B, HV, K, V]`; value heads may
# outnumber query/key heads (`HV % H == 0`, as in Qwen3-Next). On a CPU, Triton kernels run in the interpreter.

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
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from minisparse import bench, runtime, viz
from minisparse.testing import (assert_close, attempt, hf_torch_function, hf_torch_path, make_bthd,
                                make_log_gates)

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

try:  # fla-core: an independent reference for the recurrence (its naive_* functions run on CPU)
    with warnings.catch_warnings():  # fla-core 0.6.0 warns at import when Triton has no GPU
        warnings.filterwarnings("ignore", "Triton is not supported on current platform")
        from fla.ops.gated_delta_rule import naive as fla_naive
    fla_naive_recurrent_gdr = fla_naive.naive_recurrent_gated_delta_rule
except ImportError:
    fla_naive_recurrent_gdr = None
    print("fla-core is not installed: the check against fla's recurrence is skipped")
try:  # a test dependency: without it, the cells that compare against Qwen3-Next skip
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: the checks against Qwen3-Next's layer are skipped")

# %% [markdown]
# ## 5.1 Why: a memory that can overwrite
#
# Read chapter 4's state as a key–value memory. Writing the pair $(k, v)$ adds $k^\top v$; reading with a unit key
# $k$ returns $k S$. If the keys were orthonormal, reading $k_s$ would return exactly $v_s$. But a $K$-dimensional
# state holds at most $K$ orthogonal keys; after that, keys overlap, every read returns a blend, and writing a new
# value under an old key returns *old + new*, forever (or until the decay has erased both).
#
# DeltaNet (Schlag et al. 2021; Yang et al. 2024) treats the state as a linear map that should send $k_t \mapsto v_t$,
# and takes **one gradient step** on its squared error for the current pair:
#
# $$
# \begin{aligned}
# \mathcal L_t(S) &= \tfrac12 \lVert k_t S - v_t \rVert^2, \\
# S_t &= S_{t-1} - \beta_t \nabla \mathcal L_t(S_{t-1}) = S_{t-1} + \beta_t\, k_t^\top \big(v_t - k_t S_{t-1}\big).
# \end{aligned}
# $$
#
# (Row vectors as in chapter 4.) $k_t S_{t-1}$ is what the memory currently returns for $k_t$; the update writes only the error $v_t - k_t
# S_{t-1}$, scaled by a learning rate $\beta_t \in [0, 1]$ the model predicts per token. With $\lVert k_t\rVert = 1$
# and $\beta_t = 1$ the step is exact: afterwards $k_t S_t = v_t$, whatever was stored there before — an
# **overwrite**. Equivalently $S_t = (I - \beta_t k_t^\top k_t) S_{t-1} + \beta_t k_t^\top v_t$: the old state is
# multiplied by a generalised Householder matrix that erases (part of) the direction $k_t$ before writing.
#
# That is why keys are **L2-normalised**: for $\lVert k \rVert = 1$ the matrix $I - \beta k^\top k$ has eigenvalues
# $1$ and $1 - \beta$, so it never amplifies the state for $\beta \in [0, 2]$ (the step is stable); $\beta \in [0, 1]$
# is what models use, $\beta = 2$ is a reflection. The naive ops reject $\beta$ outside $[0, 2]$; the Triton ops check
# it on CPU tensors, and on CUDA after `runtime.set_value_checks(True)`.
#
# **Gated DeltaNet** (Yang, Kautz, Hatamizadeh 2024) multiplies the state by a data-dependent decay
# $\alpha_t = e^{g_t} \in (0, 1]$ first — Mamba2's gate: one scalar, data-dependent decay per head and token
# (its exact form in section 5.7) — so that a head can also clear its whole memory quickly
# when the context changes:
#
# $$
# S_t = \alpha_t \big(I - \beta_t k_t^\top k_t\big) S_{t-1} + \beta_t k_t^\top v_t, \qquad o_t = \sigma\, q_t S_t ,
# $$
#
# where $\sigma$ is the output scale ($K^{-1/2}$ by default, the `scale` argument below), not a sigmoid: this chapter
# writes the sigmoid out.
#
# The picture: $(k^\ast, v^\ast)$ is written at $t = 0$ into a $64 \times 64$ state, then 99 random pairs, then
# $k^\ast$ again with a *new* value $v^{\text{new}}$, then 99 more; after every token, how much of $v^\ast$ and of
# $v^{\text{new}}$ does reading with $k^\ast$ return ($\langle k^\ast S_t, v\rangle / \lVert v \rVert^2$)?

# %%
def memory_trace(rule, d=64, T=200, t_new=100, beta=0.9, g=-0.02, seed=0):
    """Write (k*, v*) at t = 0 and (k*, v_new) at t_new between random pairs; return the shares of
    v* and v_new that k* reads after each token, for rule in 'linear', 'delta', 'gated delta'."""
    gen = torch.Generator().manual_seed(seed)
    # [T, d] unit keys
    keys = F.normalize(torch.randn(T, d, generator=gen, dtype=torch.float64), dim=-1)
    vals = torch.randn(T, d, generator=gen, dtype=torch.float64)  # [T, d]
    keys[t_new] = keys[0]  # the same key again, with a new value
    S = torch.zeros(d, d, dtype=torch.float64)
    old, new = [], []
    for t in range(T):
        k, v = keys[t], vals[t]
        if rule == "linear":
            S = S + torch.outer(k, v)
        else:
            alpha = math.exp(g) if rule == "gated delta" else 1.0
            S = alpha * S
            S = S + beta * torch.outer(k, v - k @ S)  # the delta rule: write the error only
        read = keys[0] @ S  # [d] what the memory returns for k*
        old.append(float(read @ vals[0] / (vals[0] @ vals[0])))
        new.append(float(read @ vals[t_new] / (vals[t_new] @ vals[t_new])))
    return np.array(old), np.array(new)


fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
for ax, rule in zip(axes, ["linear", "delta", "gated delta"]):
    old, new = memory_trace(rule)
    ax.plot(old, label="v* (written at t = 0)", color="tab:blue")
    ax.plot(np.arange(100, 200), new[100:], label="v_new (same key, t = 100)", color="tab:red")
    ax.axvline(100, color="gray", lw=0.8, ls=":")
    ax.set(title={"linear": "linear attention: S += kᵀv", "delta": "DeltaNet (β = 0.9)",
                  "gated delta": "Gated DeltaNet (β = 0.9, g = -0.02)"}[rule], xlabel="token t")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("share of the value returned for k*")
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()
old_l, new_l = memory_trace("linear")
old_d, new_d = memory_trace("delta")
print(f"just after the rewrite, linear attention returns {old_l[100]:.2f} of v* and "
      f"{new_l[100]:.2f} of v_new; DeltaNet {old_d[100]:.2f} and {new_d[100]:.2f}")

# %% [markdown]
# Linear attention returns all of the old value *and* all of the new one after the rewrite. DeltaNet's read of
# $v^\ast$ fades as random keys, which overlap $k^\ast$ a little, partly overwrite its direction; at the rewrite it
# drops to almost nothing and the memory returns $0.9\,v^{\text{new}}$ ($\beta = 0.9$). The gate adds a fade at a
# rate the model controls token by token.

# %% [markdown]
# ## 5.2 Naive: the recurrence
#
# The spec, with fla's argument names in the book's order `q, k, v, g, beta`: `q, k [B, T, H, K]`,
# `v [B, T, HV, V]` (value head $h_v$ reads query/key head $\lfloor h_v / (HV/H) \rfloor$), `g [B, T, HV]` log decay
# $\le 0$, `beta [B, T, HV]` in $[0, 2]$, `scale` (default $K^{-1/2}$), `initial_state [B, HV, K, V]`; with
# `use_qk_l2norm=True` the op normalises $q$ and $k$ itself, else the caller must.
#
# Per token, in the order the equation reads: decay, read, write the error, read the output:
#
# $$
# S \leftarrow e^{g_t} S,\qquad u_t = \beta_t\,(v_t - k_t S),\qquad S \leftarrow S + k_t^\top u_t,
# \qquad o_t = \sigma\, q_t S .
# $$

# %%
#| export deltanet.naive
import torch

from minisparse import _checks


def l2norm(x, eps=1e-6):
    """x / sqrt(Σ x² + eps) over the last dimension, in float32 (as fla's and transformers'; float64
    stays float64), for any finite x: a row with entries over 1 is divided by its largest |x|
    first, so Σ x² cannot overflow (fla's gives 0 past |x| ≈ 1e19). eps > 0 (a zero row gives 0)."""
    _checks.positive_float("l2norm", "eps", eps)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.shape[-1] == 0:
        return x
    m = x.abs().amax(-1, keepdim=True).clamp_min(1.0)  # [..., 1]
    y = x / m
    return y * torch.rsqrt((y * y).sum(-1, keepdim=True) + eps / (m * m))


def _check_l2norm_range(op, q, k):
    """The kernels' l2norm sums q² and k² in float32 (as fla's): refuse rows it would overflow.
    A NaN count and a range a tensor, each read back (host syncs); call it where the value-check
    rule says so."""
    for name, x in (("q", q), ("k", k)):
        _checks.value_range(op, name, x, low=-2.0 ** 59, high=2.0 ** 59,
                            why="use_qk_l2norm: the kernels sum its squares in float32; l2norm "
                                "ignores a row's scale, so divide the inputs by a constant first")


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm=False):
    """Gated delta rule token by token: S ← exp(g_t) S; S ← S + k_tᵀ β_t (v_t − k_t S); o_t = scale
    · q_t S.

    q, k [B, T, H, K]; v [B, T, HV, V] (HV % H == 0); g [B, T, HV] log decay ≤ 0; beta [B, T, HV]
    in [0, 2]; initial_state [B, HV, K, V] or None -> (o [B, T, HV, V] in q's dtype,
    final_state [B, HV, K, V] float32 or None). Accumulates in float32 (float64 inputs: in float64,
    the final state too).
    """
    return _naive_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state,
                            use_qk_l2norm, check_values=True)


def _naive_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                     check_values, op="naive_recurrent_gated_delta_rule"):
    """naive_recurrent_gated_delta_rule; check_values=False skips g's and β's values."""
    scale = _check_delta(op, q, k, v, g, beta, scale, initial_state, check_values)  # shapes, values
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    qf, kf, vf, gf, bf = _prepare(q, k, v, g, beta, use_qk_l2norm)  # float32, q, k per value head
    S = qf.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(qf.dtype).clone()
    o = qf.new_empty(B, T, HV, V)
    for t in range(T):
        kt = kf[:, t]  # [B, HV, K]
        S = S * gf[:, t].exp()[:, :, None, None]  # decay: exp(g_t) S
        # [B, HV, V] v_t − k_t S: what the memory gets wrong
        err = vf[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        # write β_t · error under k_t
        S = S + kt[..., None] * (bf[:, t, :, None] * err)[:, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", qf[:, t] * scale, S)  # [B, HV, V]
    return o.to(q.dtype), (S if output_final_state else None)


def naive_recurrent_delta_rule(q, k, v, beta, scale=None, initial_state=None,
                               output_final_state=False, use_qk_l2norm=False):
    """DeltaNet token by token: naive_recurrent_gated_delta_rule with g = 0. Same shapes."""
    return _naive_recurrent(q, k, v, None, beta, scale, initial_state, output_final_state,
                            use_qk_l2norm, check_values=True, op="naive_recurrent_delta_rule")


# %% [markdown]
# The argument checks (`_check_delta`) and `_prepare` (float32 copies, $q$ and $k$ repeated to the value heads)
# are in the Engineering notes, with the checks of the recurrence against two independent references: fla's
# `naive_recurrent_gated_delta_rule` and transformers' Qwen3-Next recurrence.

# %% [markdown]
# ## 5.3 Chunkwise: the WY representation and the UT transform
#
# Chapter 4 chunked its recurrence because the transition was a *scalar* $\lambda$: unrolled over a chunk it gave
# powers of $\lambda$, a decay matrix, and two matrix products. Here the transition is a *matrix that depends on the
# data*: $S_t = M_t S_{t-1} + \beta_t k_t^\top v_t$ with $M_t = e^{g_t}(I - \beta_t k_t^\top k_t)$, a $K \times K$
# matrix multiplying the state from the left. Unrolled over a chunk it is a product of $L$ generalised Householder
# matrices — forming it explicitly costs a $K \times K$ matrix and $O(K^2)$ work per token, and a scan over those
# products is no faster than the recurrence.
#
# The way out (Yang et al. 2024, after Bischof & Van Loan's WY representation of Householder products): do not
# form the product, solve for what each token *writes*. Take a chunk of $L$ tokens entering with state $S$, let
# $G_i = \sum_{j \le i} g_j$ be the cumulative log decay inside the chunk (a *local* cumulative sum that restarts
# every chunk), and call $u_i = \beta_i (v_i - k_i \tilde S_{i})$ the value token $i$ actually writes ($\tilde S_i$ is
# the state after the decay of step $i$, before its write). Then, for token $i$ of the chunk,
#
# $$
# S_i = e^{G_i} S + \sum_{j \le i} e^{G_i - G_j}\, k_j^\top u_j ,
# \qquad
# u_i = \beta_i\Big(v_i - e^{G_i} k_i S - \sum_{j < i} e^{G_i - G_j} (k_i \cdot k_j)\, u_j\Big).
# $$
#
# The $u_i$ depend on the earlier $u_j$ of the chunk *linearly*. With the strictly lower-triangular
# $A_{ij} = \beta_i\, e^{G_i - G_j} (k_i \cdot k_j)$ for $j < i$, all of them at once solve a unit lower-triangular
# system (here $K$, $V$, $Q$ and $U$ also name the chunk's matrices whose rows are the $k_i$, $v_i$, $q_i$, $u_i$):
#
# $$
# \begin{aligned}
# (I + A)\, U &= \operatorname{diag}(\beta)\, V - \operatorname{diag}(\beta e^{G})\, K S ,\\
# U &= \underbrace{A_\text{inv}\operatorname{diag}(\beta) V}_{\tilde U}
#   - \underbrace{A_\text{inv} \operatorname{diag}(\beta e^G) K}_{W}\, S,
# \qquad A_\text{inv} = (I + A)^{-1}.
# \end{aligned}
# $$
#
# $A_\text{inv}$ (the inverse of $I + A$, not of $A$) is the **UT transform** of the chunk: it depends only on the
# chunk's keys, $\beta$ and gates — not on $S$ — so all chunks compute theirs in parallel (a triangular solve of
# $L \times L$, $L = 64$). $W$ and $\tilde U$ are the **WY representation**: without gates, the product of the
# chunk's Householder matrices is $I - K^\top W$. What remains is chapter 4's chunkwise form with $U$ in place of
# $V$ and the gate's $e^{G_i - G_j}$ in place of $\lambda^{i-j}$ ($\Gamma_{ij} = e^{G_i - G_j}$ for $j \le i$, else 0):
#
# $$
# \begin{aligned}
# O &= \sigma \cdot \big(\operatorname{diag}(e^{G}) Q S + (Q K^\top \odot \Gamma)\, U\big),\\
# S' &= e^{G_L} S + \big(\operatorname{diag}(e^{G_L - G}) K\big)^\top U .
# \end{aligned}
# $$
#
# Every exponent is $\le 0$ ($G$ decreases along the chunk), and above the diagonal it is masked to $-\infty$ *before*
# `exp`: a gate of $-30$ a token makes $e^{G}$ underflow to 0 within a chunk, never overflow. The only sequential
# part left across chunks is $U = \tilde U - WS$ and the state update, two matrix products per chunk. One more
# care: the PyTorch chunk code takes $G_i - G_j$ as the *sum* of the gates between the two tokens, $g_{j+1} + \dots +
# g_i$ (a cumulative sum down the columns of a masked $L \times L$ matrix), not as a difference of two float32
# cumulative sums, which loses digits when one gate is very negative; the kernels take differences of float64 sums,
# exact enough for the same inputs (Engineering notes). One chunk, in the three groups that
# section 5.6 turns into three Triton kernels:

# %%
B_ = viz.Box
GREEN, ORANGE = "#e2f0d9", "#fde2c8"
wy_boxes = {
    "in": B_(0.0, 1.4, "chunk n:\n$K, V, \\beta, g$", w=1.7),
    "A": B_(2.6, 1.4, "$A$ = strictly lower\n$\\mathrm{diag}(\\beta) KK^\\top \\odot \\Gamma$",
            w=2.3),
    "inv": B_(5.3, 1.4, "$A_{inv} = (I + A)^{-1}$\nUT transform", w=2.2, color=ORANGE),
    "wy": B_(8.0, 1.4, "$W,\\ \\tilde U$\nWY representation", w=2.2),
    "S": B_(5.3, -0.3, "state $S_n$\nentering chunk n", w=2.2, color=GREEN),
    "U": B_(8.0, -0.3, "$U = \\tilde U - W S_n$", w=2.2, color=GREEN),
    "next": B_(11.0, -0.3, "$S_{n+1} = e^{G_L} S_n$\n$+ (\\mathrm{diag}(e^{G_L - G})K)^\\top U$",
               w=2.8, color=GREEN, note="enters chunk n + 1"),
    "O": B_(11.0, 1.4,
            "$O = \\sigma \\cdot (\\mathrm{diag}(e^G) Q S_n$\n$+ (QK^\\top \\odot \\Gamma) U)$",
            w=2.8),
}
wy_arrows = [("in", "A"), ("A", "inv"), ("inv", "wy", "$\\times\\,\\beta e^G K,\\ \\beta V$"),
             ("wy", "U"), ("S", "U", "$W S_n$"), ("U", "next"), ("U", "O"), ("S", "O")]
wy_groups = [(["A", "inv", "wy"], "every chunk in parallel: no state"),
             (["O"], "every chunk in parallel"),
             (["S", "U", "next"], "a scan over chunks: the only sequential part")]
fig = viz.schematic(wy_boxes, wy_arrows, groups=wy_groups, size=(12, 4.2),
                    title="One chunk: UT, WY, the scan")
plt.show()

# %%
#| export deltanet.naive
def naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                 output_final_state=False, use_qk_l2norm=False, chunk_size=64):
    """Gated delta rule by chunks (the WY/UT form): same arguments and results as
    naive_recurrent_gated_delta_rule.

    Per chunk of L ≤ chunk_size tokens: G_i = g_1 + … + g_i, Γ_ij = exp(g_{j+1} + … + g_i) for j ≤ i
    (segment sums, never G_i − G_j); A = strictly lower (diag(β) K Kᵀ ⊙ Γ); a unit lower-triangular
    solve gives W = (I + A)⁻¹ diag(β e^G) K and Ũ = (I + A)⁻¹ diag(β) V; then U = Ũ − W S, O = scale
    (diag(e^G) Q S + (Q Kᵀ ⊙ Γ) U), S ← e^{G_L} S + (diag(Γ_L) K)ᵀ U. Differentiable by autograd.
    """
    return _naive_chunk(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                        chunk_size, check_values=True)


def _naive_chunk(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                 chunk_size, check_values, op="naive_chunk_gated_delta_rule"):
    """naive_chunk_gated_delta_rule; check_values=False skips g's and β's values (the layer's)."""
    scale = _check_delta(op, q, k, v, g, beta, scale, initial_state, check_values)
    _checks.positive_int(op, "chunk_size", chunk_size)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    qf, kf, vf, gf, bf = _prepare(q, k, v, g, beta, use_qk_l2norm)
    qf, kf, vf = (x.transpose(1, 2) for x in (qf, kf, vf))  # [B, HV, T, ·]
    gf, bf = gf.transpose(1, 2), bf.transpose(1, 2)  # [B, HV, T]
    S = qf.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(qf.dtype)
    o = qf.new_empty(B, HV, T, V)
    for c0 in range(0, T, chunk_size):
        L = min(chunk_size, T - c0)
        qc, kc, vc = qf[:, :, c0:c0 + L], kf[:, :, c0:c0 + L], vf[:, :, c0:c0 + L]  # [B, HV, L, ·]
        gc, bc = gf[:, :, c0:c0 + L], bf[:, :, c0:c0 + L]  # [B, HV, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # j <= i
        G = gc.cumsum(-1)  # [B, HV, L] G_i: log decay from the chunk's start through token i
        after = ~causal.T  # [L, L] i > j
        # [B, HV, L, L] D_ij = g_{j+1} + … + g_i, i ≥ j
        D = torch.where(after, gc[..., :, None], 0.0).cumsum(-2)
        # [B, HV, L, L] e^{G_i − G_j}, 0 above
        Gamma = torch.exp(torch.where(causal, D, float("-inf")))
        A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * Gamma).tril(-1)  # strictly lower
        eye = torch.eye(L, dtype=qf.dtype, device=q.device)
        # [B, HV, L, K + V]
        rhs = torch.cat([(bc * G.exp())[..., None] * kc, bc[..., None] * vc], dim=-1)
        # (I + A)⁻¹ rhs
        WU = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        W, U_tilde = WU[..., :K], WU[..., K:]  # [B, HV, L, K], [B, HV, L, V]
        U = U_tilde - W @ S  # [B, HV, L, V] what each token writes
        o[:, :, c0:c0 + L] = scale * ((qc * G.exp()[..., None]) @ S
                                      + ((qc @ kc.transpose(-1, -2)) * Gamma) @ U)
        # Γ_Lj
        S = G[..., -1, None, None].exp() * S + (kc * Gamma[..., -1, :, None]).transpose(-1, -2) @ U
    return o.transpose(1, 2).to(q.dtype), (S if output_final_state else None)


def naive_chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm=False, chunk_size=64):
    """DeltaNet by chunks: naive_chunk_gated_delta_rule with g = 0. Same shapes as
    naive_recurrent_delta_rule."""
    return _naive_chunk(q, k, v, None, beta, scale, initial_state, output_final_state,
                        use_qk_l2norm, chunk_size, check_values=True, op="naive_chunk_delta_rule")


# %% [markdown]
# The chunk form against the recurrence, on a length that is not a multiple of the chunk, $K \ne V$, grouped value
# heads, an initial state, and gates from near 0 to $-30$ a token:

# %%
from minisparse.deltanet import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

Bc, Tc, Hc, HVc, Kc, Vc = 2, 100, 2, 4, 32, 48
qc0 = F.normalize(make_bthd(Bc, Tc, Hc, Kc, seed=11), dim=-1)  # unit queries and keys
kc0 = F.normalize(make_bthd(Bc, Tc, Hc, Kc, seed=12), dim=-1)
vc0 = make_bthd(Bc, Tc, HVc, Vc, seed=13)
betac = torch.rand(Bc, Tc, HVc, generator=torch.Generator().manual_seed(14))
hc0 = torch.randn(Bc, HVc, Kc, Vc, generator=torch.Generator().manual_seed(15))
for low, high in [(-1e-3, 0.0), (-2.0, 0.0), (-30.0, -5.0)]:
    gc0 = make_log_gates(Bc, Tc, HVc, low=low, high=high, seed=16)
    o_r, s_r = naive_recurrent_gated_delta_rule(qc0, kc0, vc0, gc0, betac, initial_state=hc0,
                                                output_final_state=True)
    for C in (16, 64):
        o_c, s_c = naive_chunk_gated_delta_rule(qc0, kc0, vc0, gc0, betac, initial_state=hc0,
                                                output_final_state=True, chunk_size=C)
        e = assert_close(f"chunk (C={C}, g in [{low}, {high}]) vs recurrent: o", o_r, o_c, 1e-5)
        assert_close(f"chunk (C={C}, g in [{low}, {high}]) vs recurrent: state", s_r, s_c, 1e-5)
    print(f"g in [{low:g}, {high:g}]: chunk == recurrent (relative RMS {e:.1e} at C = 64)")

# %% [markdown]
# ## 5.4 See it
#
# ### The attention matrix a GDN head implies
#
# From a zero state the outputs are *linear in the values*: one chunk gives
# $O = \sigma (QK^\top \odot \Gamma)\, A_\text{inv} \operatorname{diag}(\beta)\, V$, so a head acts like attention with
# $P = \sigma\, (QK^\top \odot \Gamma)\,(I + A)^{-1} \operatorname{diag}(\beta)$: lower-triangular like causal
# attention, but with entries of both signs, since the delta rule *subtracts* what later keys overwrote. Linear
# attention is $P = QK^\top \odot M$, $M$ the causal mask (chapter 4). Below, 48 tokens whose keys repeat every 12 tokens (a word
# that keeps coming back with new values), and queries that look up the key seen 5 tokens earlier
# ($q_t \approx k_{t-5}$): the three heads' $P$, and a check that $PV$ is the recurrence's output.

# %%
def implied_attention(q, k, g, beta, scale=1.0):
    """P [T, T], o = P v for one head from a zero state: q, k [T, K] unit rows; g, beta [T]."""
    T = q.shape[0]
    G = g.cumsum(0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    Gamma = torch.exp(torch.where(causal, G[:, None] - G[None, :], float("-inf")))
    A = (beta[:, None] * (k @ k.T) * Gamma).tril(-1)
    A_inv = torch.linalg.solve_triangular(torch.eye(T) + A, torch.eye(T), upper=False,
                                          unitriangular=True)
    return scale * ((q @ k.T) * Gamma) @ A_inv * beta[None, :]


T_P, d_P = 48, 16
gen = torch.Generator().manual_seed(3)
base = F.normalize(torch.randn(12, d_P, generator=gen), dim=-1)
kP = base.repeat(4, 1)  # [48, 16] every key comes back every 12 tokens
# q_t ≈ k_{t-5}
qP = F.normalize(torch.roll(kP, 5, dims=0) + 0.1 * torch.randn(T_P, d_P, generator=gen), dim=-1)
betaP = torch.full((T_P,), 0.9)
gP = torch.full((T_P,), -0.1)
pics = {
    "linear attention": (qP @ kP.T).tril(),
    "DeltaNet (β = 0.9)": implied_attention(qP, kP, torch.zeros(T_P), betaP),
    "Gated DeltaNet (β = 0.9, g = -0.1)": implied_attention(qP, kP, gP, betaP),
}
vmax = max(float(p.abs().max()) for p in pics.values())
fig = viz.panels(pics, ncols=3, size=3.4, cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                 suptitle="Implied attention P (o = P v) of one head; keys repeat every 12 tokens, "
                          "q_t ≈ k_{t-5}", colorbar=True)
plt.show()
vP = torch.randn(T_P, 8, generator=gen)
o_check, _ = naive_recurrent_gated_delta_rule(qP[None, :, None], kP[None, :, None],
                                              vP[None, :, None], torch.full((1, T_P, 1), -0.1),
                                              betaP[None, :, None], scale=1.0)
assert_close("P v vs the recurrence", o_check[0, :, 0],
             pics["Gated DeltaNet (β = 0.9, g = -0.1)"] @ vP, 1e-5)
print("implied attention P @ v == naive_recurrent_gated_delta_rule (T = 48)")

# %% [markdown]
# Linear attention gives the same weight to every earlier occurrence of the key a query looks up: stripes at
# distances 5, 17, 29, 41. DeltaNet keeps the *latest* occurrence (distance 5) and leaves the earlier ones a small
# positive remainder: the latest write replaced most of their value. For orthogonal keys the remainder is a factor
# $1 - \beta = 0.1$ for each rewrite since; here it is more (0.1 to 0.45 of the latest's weight at distance 17),
# because 12 keys in 16 dimensions overlap. Its negative entries, off the stripes, correct for those overlaps. The
# gate fades the whole lower triangle with distance.

# %% [markdown]
# ### Explorer: β and the gate
#
# Move $\beta$ and the gate and watch the implied attention of the repeated keys. $\beta \to 0$ without a gate
# approaches scaled linear attention; $\beta = 1$ overwrites exactly; $\beta > 1$ over-corrects, alternating signs.

# %% tags=["nbval-ignore-output"]
def draw_delta(beta=0.9, log10_decay=-1.0):
    g = -(10 ** log10_decay)
    P = implied_attention(qP, kP, torch.full((T_P,), g), torch.full((T_P,), beta))
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    m = float(P.abs().max())
    viz.heatmap(ax, P, f"β = {beta:.2f}, g = {g:.3g} (half-life {math.log(2) / -g:.3g} tokens)",
                cmap="RdBu_r", vmin=-m, vmax=m, colorbar=True)
    fig.tight_layout()
    plt.show()


explorer = viz.explorer(draw_delta, beta=(0.05, 2.0, 0.05), log10_decay=(-4.0, 1.0, 0.25))

# %% [markdown]
# ## 5.5 Cost
#
# ### One GDN layer
#
# Per chunk of $C$ tokens and value head, the chunk form does chapter 4's work (causal $QK^\top$ and its product
# with the values inside the chunk, $C(K+V)$ FLOPs a token; reading and updating the $K \times V$ state, $4KV$) plus
# the UT transform: $A = KK^\top$ on the causal half ($CK$ a token), a unit triangular solve with $K + V$
# right-hand sides ($C(K+V)$ a token) and $U = \tilde U - WS$ ($2KV$ a token). Counting 2 FLOPs a multiply–add:
#
# $$
# F_\text{GDN}(T) = H_v\, T\,\bigl[\underbrace{C(K+V) + 4KV}_\text{chapter 4's chunk form}
#   + \underbrace{CK + C(K+V) + 2KV}_{\text{UT transform, } WS}\bigr].
# $$
#
# For $C = 64$, $K = V = 128$ that is 1.7× chapter 4's FLOPs a token — still linear in $T$. Decoding keeps a
# $K \times V$ state per value head (fp32 in fla's kernels and ours) and the short convolution's last
# $k_\text{conv} - 1$ inputs over the $2 H K + H_v V$ convolved channels (in the activation dtype):
#
# $$
# M_\text{GDN} = 4\, H_v K V + 2\,(k_\text{conv} - 1)(2HK + H_v V) \ \text{bytes, whatever } T .
# $$
#
# Below, `gdn_flops` reuses chapter 4's `lightning_flops` for the first bracket.

# %%
#| export deltanet.cost
from minisparse import _checks
from minisparse.attention.cost import attention_flops, kv_cache_bytes_per_token
from minisparse.lightning.cost import lightning_flops


def gdn_flops(T, d_k, d_v, value_heads=1, chunk=64):
    """Forward FLOPs of the chunkwise gated delta rule over T tokens (2 FLOPs a multiply-add), all
    value heads.

    Chapter 4's chunk form (intra-chunk causal QKᵀ and ·U, the state's read and update) plus the UT
    transform:
    causal KKᵀ (C·K a token), the triangular solve for K + V right-hand sides (C·(K + V)) and W·S
    (2·K·V).
    """
    _checks.lengths("gdn_flops", "T", T)
    extra = T * (chunk * d_k + chunk * (d_k + d_v) + 2 * d_k * d_v)
    return value_heads * (lightning_flops(T, d_k, d_v, chunk=chunk, form="chunk") + extra)


def gdn_state_bytes(key_heads, value_heads, d_k, d_v, conv_kernel=4, state_bytes=4, dtype_bytes=2):
    """Decoding memory of one GDN layer, independent of T: the K×V states (state_bytes each) and the
    short convolution's last conv_kernel - 1 inputs over the 2·H·K + Hv·V convolved channels
    (dtype_bytes each)."""
    return (value_heads * d_k * d_v * state_bytes
            + (conv_kernel - 1) * (2 * key_heads * d_k + value_heads * d_v) * dtype_bytes)

# %% [markdown]
# ### Qwen3-Next's hybrid: three GDN layers, then one gated attention layer
#
# Qwen3-Next-80B-A3B stacks 48 layers as 12 × (3 × (Gated DeltaNet → MoE), 1 × (Gated Attention → MoE)), and
# keeps its native context at 262,144 tokens: three linear layers to one softmax layer (its
# [model card](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct); the seed survey lists the same 3:1 layout
# for Qwen3.5 [S]). The softmax layers are chapter 1's `Attention` with its output gate (`gate=True`): 16 query heads, 2 K/V heads of 256 channels, RoPE
# on a quarter of them. We read all shapes from `transformers`' `Qwen3NextConfig()` defaults, whose layer and head
# shapes are this model's (its context length and RoPE base are not).

# %%
if transformers is not None:
    cfg = transformers.Qwen3NextConfig()
    pattern = "".join("A" if t == "full_attention" else "g" for t in cfg.layer_types)
    print(f"{cfg.num_hidden_layers} layers: {pattern}"
          "   (g = Gated DeltaNet, A = gated attention)")
    print(f"GDN: {cfg.linear_num_key_heads} q/k heads × {cfg.linear_key_head_dim}, "
          f"{cfg.linear_num_value_heads} value heads × {cfg.linear_value_head_dim}, "
          f"conv kernel {cfg.linear_conv_kernel_dim}")
else:
    cfg = None

# %% [markdown]
# For a layer pattern, the stack's token-mixing cost is a sum over layers: a softmax layer costs
# $2 H_q (D + D) \cdot \tfrac{T(T+1)}{2}$ FLOPs (chapter 1's `attention_flops`) and adds $2 H_{kv} \cdot 2D$ bytes of
# KV cache a token (`kv_cache_bytes_per_token`); a GDN layer costs $F_\text{GDN}(T)$ and holds $M_\text{GDN}$. So,
# with $n_A$ softmax and $n_G$ GDN layers,
#
# $$
# F_\text{stack}(T) = n_A F_\text{attn}(T) + n_G F_\text{GDN}(T), \qquad
# M_\text{stack}(T) = n_A \cdot 4 H_{kv} D \cdot T + n_G M_\text{GDN} .
# $$
#
# Assumptions: prefill of one sequence, forward only, token mixing only (projections, convolutions, norms and MoE
# grow linearly in both models); KV cache in bf16, GDN states in fp32; batch 1; the comparison model is the same
# stack with all 48 layers gated attention. `hybrid_costs(config, T)` sums it (code in the Engineering notes).

# %% [markdown]
# Prefill FLOPs from 1K to 256K tokens (262,144: Qwen3-Next's native context), and decoding memory at context $T$.

# %%
from minisparse.deltanet import hybrid_costs

if cfg is not None:
    Ts = [2 ** i for i in range(10, 19)]  # 1K … 262K
    full_types = ["full_attention"] * cfg.num_hidden_layers
    hyb = [hybrid_costs(cfg, T) for T in Ts]
    full = [hybrid_costs(cfg, T, layer_types=full_types) for T in Ts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.loglog(Ts, [c["flops"] for c in full], "o-", label="48 × gated attention")
    ax1.loglog(Ts, [c["flops"] for c in hyb], "s-", label="Qwen3-Next 3:1 (36 GDN + 12 attention)")
    ax1.loglog(Ts, [c["flops"] / 4 for c in full], "k:", lw=1, label="¼ of all-attention")
    ax1.set(xlabel="tokens T", ylabel="prefill FLOPs (token mixing, 48 layers)",
            title="Prefill cost of the layer stack")
    GiB = 2 ** 30
    ax2.loglog(Ts, [c["memory"] / GiB for c in full], "o-", label="48 × gated attention (KV cache)")
    ax2.loglog(Ts, [c["memory"] / GiB for c in hyb], "s-",
               label="3:1 hybrid (KV cache + GDN states)")
    ax2.axhline(hyb[0]["state_bytes"] / GiB, color="gray", ls="--", lw=1,
                label="GDN states alone (36 layers)")
    ax2.set(xlabel="context T", ylabel="GiB (batch 1)", title="Decoding memory at context T",
            ylim=(0.05, None))
    for ax in (ax1, ax2):
        ax.set_xticks(Ts, [f"{T // 1024}K" for T in Ts])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
    for T, h, f in zip(Ts[::4], hyb[::4], full[::4]):
        print(f"T = {T:7,d}  FLOPs hybrid/full = {h['flops'] / f['flops']:.3f}   "
              f"memory {h['memory'] / GiB:7.3f} GiB vs {f['memory'] / GiB:7.3f} GiB")

# %% [markdown]
# At 1K tokens the hybrid saves only about a third of the FLOPs; by 262K the 12 softmax layers are almost everything
# and the stack costs a quarter of the all-attention one. The hybrid keeps exactly a quarter of the KV cache plus a
# constant ~74 MiB of states (36 layers × 32 value heads × 128 × 128 in fp32, and the convolution's inputs): slightly
# *more* memory at 1K, 4× less at 262K (6.1 GiB instead of 24 GiB a sequence); the Engineering notes assert
# these numbers.

# %% [markdown]
# ## 5.6 Fast: the chunkwise form in Triton
#
# The chunk form of section 5.3 splits, by what depends on what, into the three groups of its picture, and so into
# three forward kernels (fla splits it along the same lines):
#
# 1. **`_fwd_wy_kernel`** — per chunk, all chunks in parallel: $A$, the UT transform $A_\text{inv} = (I + A)^{-1}$,
#    and the WY representation $W$, $\tilde U$. Nothing here depends on the state.
# 2. **`_fwd_states_kernel`** — the only sequential part, a scan over chunks per (batch, value head, tile of $V$):
#    store the entering state $S_n$, form $U = \tilde U - W S_n$, and move on to $S_{n+1}$.
# 3. **`_fwd_output_kernel`** — per chunk and tile of $V$, in parallel: chapter 4's output kernel with $U$ for $V$
#    and $\Gamma$ for the decay matrix.
#
# The scan, the output kernel, the backward (kernels 1 and 2 again, then four more), decoding and the host code are
# in the Engineering notes. This section reads the kernel that is new: the WY kernel, and inside it the triangular
# solve.
#
# **The triangular solve, by blocks.** Forward substitution computes $A_\text{inv}$ one row at a time: row $i$ is
# $e_i - A_{i,:}\,A_\text{inv}$, which needs only rows $< i$. Done on the whole $64 \times 64$ matrix that is 63
# dependent steps, row by row, no tensor cores. `_unit_lower_inverse` instead cuts $I + A$ into $16 \times 16$
# blocks, $I + A = (I + A_\text{diag}) + A_\text{off}$:
#
# - forward substitution runs inside the four diagonal blocks *at once* (the matrix reshaped to
#   `[4, 16, 16]`), 15 steps on small tiles: $E = (I + A_\text{diag})^{-1}$, block diagonal;
# - then $I + A = (I + A_\text{diag})(I + N)$ with $N = E A_\text{off}$, which is strictly *block*-lower, so
#   $N^4 = 0$ and the Neumann series stops: $(I + N)^{-1} = I - N + N^2 - N^3 = (I - N)(I + N^2)$. Hence
#
# $$ A_\text{inv} = (I + A)^{-1} = (I - N)(I + N^2)\, E , $$
#
# four $64 \times 64$ matrix products on tensor cores ($N$, $N^2$, $(I - N)(I + N^2)$, and the product with $E$). The
# series stops after four terms, so it is exact: no truncation, and no long alternating sum to lose precision in.
#
# ```
#  _fwd_wy_kernel, program (chunk n, b·H_V + h_v):     K and V walked in column blocks of 32
#      G  = cumsum(g) in float64; D = G_i − G_j        [C], [C, C]  _gate_sums, _pair_exponents
#      r  = 1 / sqrt(diag(K @ Kᵀ) + ε)                 [C]     use_qk_l2norm only: 1/‖k‖, stored for kernels 2, 3
#      A  = strictly lower(β[:, None] · (K @ Kᵀ ⊙ r rᵀ) ⊙ exp(D))  [C, C]  K @ Kᵀ by blocks
#      A_inv = (I − N)(I + N²) E                       [C, C]  _unit_lower_inverse
#      W  = (A_inv · (β e^G r)[None, :]) @ K           [C, BK] per column block (_split_dot), stored as it is done
#      Ũ  = (A_inv · β[None, :]) @ V                   [C, BV] the same
# ```
#
# Only $C \times C$ matrices stay in registers from start to end: the kernel walks $K$ and $V$ in blocks of 32
# columns and loads $K$'s blocks twice rather than keep them; the row scalings of $K$ and $V$ ride on $A_\text{inv}$'s
# columns, so that $K$ and $V$ enter the products as stored. Row $i$ of the chunk's keys is at `k_c + i·H·K`, where
# `k_c` points at the chunk's first row: an int64 offset, since $t \cdot H \cdot K$ passes $2^{31}$ elements at long
# context (Qwen3-Next's 32 value heads of 128 from token 524,288; its 16 key heads from 1,048,576), and the offsets
# within the chunk stay int32. Value head $h_v$ reads
# key head $h_v // (H_V/H)$ (`_heads`); a pointer the kernel does not use is `None`, with a compile-time flag (`L2`,
# `STORE_AINV`). The helpers (`_gate_sums`, `_split_dot`, …) are in the Engineering notes.

# %%
#| export deltanet.chunk_fwd
import torch
import triton
import triton.language as tl

from minisparse import runtime

_C = 64  # chunk length: [C, C] tensor-core tiles, and four 16-row blocks in the solve (N⁴ = 0)
_WY_COLUMNS = 32  # the WY kernel walks K and V in blocks of 32 columns: only [C, C] matrices stay


# %%
#| export deltanet.chunk_fwd
@triton.jit
def _unit_lower_inverse(A, C: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)⁻¹ for a strictly lower-triangular A [C, C], C ∈ {16, 32, 64}.

    Forward substitution inside the 16×16 diagonal blocks, all blocks at once (15 steps on
    [C/16, 16, 16]); then with E = (I + A_diag)⁻¹ and N = E A_off (strictly block-lower, so N⁴ = 0
    for ≤ 4 blocks): (I + A)⁻¹ = (I + N)⁻¹ E = (I − N)(I + N²) E, four tensor-core products.
    """
    NB: tl.constexpr = C // 16
    rows = tl.arange(0, C)
    same_block = (rows[:, None] // 16) == (rows[None, :] // 16)
    r16 = tl.arange(0, 16)
    bsel = tl.arange(0, NB)
    diag4 = (bsel[:, None, None, None] == bsel[None, None, :, None])  # [NB, 1, NB, 1]
    A4 = tl.reshape(A, (NB, 16, NB, 16))
    Ad = tl.sum(tl.where(diag4, A4, 0.0), axis=2)  # [NB, 16, 16] the diagonal blocks
    eye16 = tl.where(r16[:, None] == r16[None, :], 1.0, 0.0)  # [16, 16]
    E3 = tl.zeros((NB, 16, 16), dtype=tl.float32) + eye16[None, :, :]
    for i in range(1, 16):
        sel = r16[None, :, None] == i  # [1, 16, 1]
        a_i = tl.sum(tl.where(sel, Ad, 0.0), axis=1)  # [NB, 16] row i of every block
        # e_i − A[i] @ E
        e_i = tl.where(r16[None, :] == i, 1.0, 0.0) - tl.sum(a_i[:, :, None] * E3, axis=1)
        E3 = tl.where(sel, e_i[:, None, :], E3)
    E = tl.reshape(tl.where(diag4, E3[:, :, None, :], 0.0), (C, C))  # block diagonal [C, C]
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    N = tl.dot(E, tl.where(same_block, 0.0, A), input_precision=PRECISION)
    N2 = tl.dot(N, N, input_precision=PRECISION)
    return tl.dot(tl.dot(eye - N, eye + N2, input_precision=PRECISION), E,
                  input_precision=PRECISION)


# %%
#| export deltanet.chunk_fwd
@triton.jit
def _fwd_wy_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, kr_ptr, ainv_ptr, T, H, HV, K, V,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr,
                   L2: tl.constexpr, STORE_AINV: tl.constexpr, PRECISION: tl.constexpr):
    """The UT transform and the WY representation of one chunk.

    Program: one chunk n of one (batch b, value head hv). Grid (NT, B · HV).
    Tiling: K Kᵀ [C, C] accumulates over K's column blocks [C, BK]; then W and Ũ are computed and
    stored one column block at a time ([C, BK] of K, [C, BV] of V, loaded again): only [C, C]
    matrices stay in registers.
    Math (rows past T load as 0; Γ_ij = e^{G_i − G_j}, _gate_sums; L2: r = 1/‖k‖, else r = 1):
        A     = strictly lower(diag(β) K Kᵀ ⊙ Γ)         L2: K Kᵀ → diag(r) K Kᵀ diag(r)
        A_inv = (I + A)⁻¹                                _unit_lower_inverse
        W = (A_inv diag(β e^G r)) K,  Ũ = (A_inv diag(β)) V     (row scalings ride on A_inv)
    Stores W [B, T, HV, K], Ũ [B, T, HV, V]; r [B, T, HV] if L2; A_inv [B, T, HV, C] if STORE_AINV.
    """
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    t0 = (n * C).to(tl.int64)  # the chunk's first token, int64: t·H·K passes 2^31 at long context
    k_c = k_ptr + (b * T * H + h) * K + t0 * H * K  # the chunk's row i of keys at k_c + i·H·K
    v_c = v_ptr + (b * T * HV + hv) * V + t0 * HV * V  # of values at v_c + i·HV·V; Ũ likewise
    u_c = u_ptr + (b * T * HV + hv) * V + t0 * HV * V
    w_c = w_ptr + (b * T * HV + hv) * K + t0 * HV * K  # of W at w_c + i·HV·K
    gate_bh = b * T * HV + hv  # token t's g, β, r at gate_bh + t·HV
    rows = tl.arange(0, C)
    t = n * C + rows  # [C]
    tm = t < T
    g = tl.load(g_ptr + gate_bh + t * HV, mask=tm, other=0.0)  # [C], 0 past T
    beta = tl.load(beta_ptr + gate_bh + t * HV, mask=tm, other=0.0)  # [C], 0 past T
    G, G64, _, _ = _gate_sums(g, C)
    KKt = tl.zeros((C, C), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kb = tl.load(k_c + rows[:, None] * H * K + ks[None, :],
                     mask=tm[:, None] & (ks[None, :] < K), other=0.0)
        KKt = tl.dot(kb, tl.trans(kb), KKt, input_precision=PRECISION)  # [C, C]
    key_scale = beta * tl.exp(G)  # [C]: W = A_inv diag(β e^G) K
    # ‖k_i‖² is K Kᵀ's diagonal (exact 16-bit products summed in fp32); Kn Knᵀ = diag(r) K Kᵀ
    # diag(r)
    if L2:
        # [C], as l2norm
        r = tl.rsqrt(tl.sum(tl.where(rows[:, None] == rows[None, :], KKt, 0.0), axis=1) + 1e-6)
        KKt = KKt * r[:, None] * r[None, :]
        key_scale = key_scale * r
        tl.store(kr_ptr + gate_bh + t * HV, r, mask=tm)
    lower = rows[:, None] > rows[None, :]  # j < i
    A = tl.where(lower, KKt * beta[:, None] * tl.exp(tl.where(lower, _pair_exponents(G64),
                                                              float("-inf"))), 0.0)
    A_inv = _unit_lower_inverse(A, C, PRECISION)  # [C, C] float32
    # [C, C] each
    w_hi, w_lo = _split_hi_lo(A_inv * key_scale[None, :], k_ptr.dtype.element_ty, SPLIT)
    u_hi, u_lo = _split_hi_lo(A_inv * beta[None, :], v_ptr.dtype.element_ty, SPLIT)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        mask = tm[:, None] & (ks[None, :] < K)
        # [C, BK], loaded again
        kb = tl.load(k_c + rows[:, None] * H * K + ks[None, :], mask=mask, other=0.0)
        w = _split_dot(w_hi, w_lo, kb, SPLIT, PRECISION)  # [C, BK]
        tl.store(w_c + rows[:, None] * HV * K + ks[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=mask)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        off = rows[:, None] * HV * V + vs[None, :]
        mask = tm[:, None] & (vs[None, :] < V)
        vb = tl.load(v_c + off, mask=mask, other=0.0)  # [C, BV]
        tl.store(u_c + off, _split_dot(u_hi, u_lo, vb, SPLIT,
                                        PRECISION).to(u_ptr.dtype.element_ty), mask=mask)
    if STORE_AINV:  # the backward's recomputation keeps A_inv for dA = −A_invᵀ dA_inv A_invᵀ
        tl.store(ainv_ptr + (gate_bh + t[:, None] * HV) * C + rows[None, :], A_inv,
                 mask=tm[:, None])


# %% [markdown]
# ### Check it against the spec
#
# The op `chunk_gated_delta_rule` and the decoding kernel `fused_recurrent_gated_delta_rule` (notes), in the chapter's
# dtype (fp32 at $T = 100$ on a CPU; bf16 or fp16 at $T = 1000$ on a GPU, against the fp32 recurrence on the same
# rounded inputs), $T$ not a multiple of 64, $K = 32 \ne V = 48$, grouped value heads, an initial state, gates down to
# $-30$:

# %%
from minisparse.deltanet import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

Bt, Tt, Ht, HVt, Kt, Vt = 1, runtime.reading_size(cpu=100, gpu=1000), 2, 4, 32, 48
qt, kt = make_bthd(Bt, Tt, Ht, Kt, seed=21,
                   device=DEVICE), make_bthd(Bt, Tt, Ht, Kt, seed=22, device=DEVICE)
vt = make_bthd(Bt, Tt, HVt, Vt, seed=23, device=DEVICE)
betat = torch.rand(Bt, Tt, HVt, generator=torch.Generator().manual_seed(24)).to(DEVICE)
ht0 = torch.randn(Bt, HVt, Kt, Vt, generator=torch.Generator().manual_seed(25)).to(DEVICE)
for low, high in [(-1e-3, 0.0), (-30.0, -5.0)]:
    gt = make_log_gates(Bt, Tt, HVt, low=low, high=high, seed=26, device=DEVICE)
    args = (qt.to(DTYPE), kt.to(DTYPE), vt.to(DTYPE), gt, betat)
    # the reference in float32 on the same (rounded) inputs: a bf16 reference would add its own
    # rounding
    o_ref, s_ref = naive_recurrent_gated_delta_rule(*(x.float() for x in args[:3]), gt, betat,
                                                    initial_state=ht0, output_final_state=True,
                                                    use_qk_l2norm=True)
    o_tri, s_tri = chunk_gated_delta_rule(*args, initial_state=ht0, output_final_state=True,
                                          use_qk_l2norm=True)
    tol = 1e-4 if DTYPE == torch.float32 else 5e-3
    e = assert_close(f"chunk_gated_delta_rule (g in [{low}, {high}]): o", o_ref, o_tri, tol)
    assert_close("chunk_gated_delta_rule: final state", s_ref, s_tri, tol)
    with torch.no_grad():
        o_dec, s_dec = fused_recurrent_gated_delta_rule(*args, initial_state=ht0,
                                                        output_final_state=True, use_qk_l2norm=True)
    assert_close("fused_recurrent_gated_delta_rule: o", o_ref, o_dec, tol)
    assert_close("fused_recurrent_gated_delta_rule: final state", s_ref, s_dec, tol)
    print(
        f"g in [{low:g}, {high:g}]: Triton chunk and fused recurrent == the recurrence (chunk rel. "
        f"RMS {e:.1e})")

# %% [markdown]
# ## 5.7 The layer, as Qwen3-Next builds it
#
# Qwen3-Next's `Qwen3NextGatedDeltaNet` wraps the gated delta rule in a layer with:
#
# - **fused input projections**: `in_proj_qkvz` gives $q, k, v$ and an output gate $z$, `in_proj_ba` gives the logits
#   of $\beta$ and of the step size $a$ — laid out per *key head* group: for each of the $H_k$ key heads,
#   $[q \,|\, k \,|\, r\cdot v \,|\, r \cdot z]$ with $r = H_v / H_k$ value heads per key head;
# - a **short causal depthwise convolution** (kernel 4) over $q, k, v$ together, then SiLU — local mixing that the
#   delta rule alone does poorly; while decoding it keeps the last three inputs as a *conv state*;
# - **L2-normalised** $q, k$, scale $K^{-1/2}$;
# - $\beta = \operatorname{sigmoid}(b)$ and Mamba2's gate
#   $g = -e^{A_{\log}} \cdot \operatorname{softplus}(a + \text{dt\_bias})$ — a learned per-head rate $e^{A_{\log}}$
#   times a data-dependent step size;
# - a **gated RMSNorm** per value head, $\operatorname{RMSNorm}(o) \odot \operatorname{SiLU}(z)$, then `out_proj`.
#
# The `state` the layer takes and returns is the pair (conv state `[B, 2·H_k·K + H_v·V, kernel − 1]`, recurrent
# state `[B, H_v, K, V]` float32). In orange below, the delta-rule core of sections 5.2–5.6; in green, the gates:

# %%
gdn_boxes = {
    "x": B_(0.0, 0.0, "hidden states\n$x$ [B, T, d]", w=1.8),
    "qkvz": B_(2.7, 1.0, "in_proj_qkvz", w=1.9),
    "ba": B_(2.7, -1.0, "in_proj_ba", w=1.9),
    "conv": B_(5.4, 1.0, "short causal conv\n(kernel 4) + SiLU", w=2.2),
    "l2": B_(8.1, 1.0, "l2norm($q$, $k$)", w=1.9),
    "z": B_(6.6, 2.5, "output gate $z$", w=1.9),
    "gates": B_(5.4, -1.0,
                "$\\beta$ = sigmoid($b$), $g = -e^{A_{\\log}}$\n$\\cdot$ softplus($a$ + dt_bias)",
                w=3.0, color=GREEN),
    "core": B_(10.7, 0.0, "gated delta rule\n$S_t = e^{g_t}(I - \\beta_t k_t^\\top k_t) S_{t-1}$\n"
                          "$+\\ \\beta_t k_t^\\top v_t$", w=3.2, h=1.0, color=ORANGE),
    "norm": B_(13.9, 0.0, "gated RMSNorm\nRMSNorm($o$) $\\odot$ SiLU($z$)", w=2.6),
    "out": B_(16.3, 0.0, "out_proj", w=1.5),
}
gdn_arrows = [("x", "qkvz"), ("x", "ba"), ("qkvz", "conv", "$q, k, v$"), ("conv", "l2", "$q, k$"),
              ("l2", "core"), ("conv", "core", "$v$"), ("qkvz", "z"), ("z", "norm"),
              ("ba", "gates", "$b, a$"), ("gates", "core", "$g, \\beta$"), ("core", "norm", "$o$"),
              ("norm", "out")]
fig = viz.schematic(gdn_boxes, gdn_arrows, size=(14, 4.0),
                    title="Gated DeltaNet layer (Qwen3-Next)")
plt.show()

# %%
#| export deltanet.layer
import torch
import torch.nn.functional as F
from torch import nn

from minisparse import _checks
from minisparse.deltanet.chunk import _chunk
from minisparse.deltanet.fused_recurrent import _fused_recurrent
from minisparse.deltanet.naive import _naive_chunk, _naive_recurrent


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's Gated DeltaNet layer, parameter names as transformers' Qwen3NextGatedDeltaNet
    (the picture above).

    forward(hidden_states [B, T, hidden], state=None, use_cache=False, attention_mask=None) -> (y
    [B, T, hidden], new state or None). A state is (conv_state [B, conv_dim, kernel − 1],
    recurrent_state [B, HV, K, V] float32), returned when use_cache is True or a state was given.
    attention_mask [B, T]: 0 for padding (with a state returned: left padding only, and no state
    given).
    backend: "triton" (chunk; fused recurrent for ≤ 16 tokens from a state without gradients),
    "naive" (PyTorch chunk; the recurrence for single steps), or "auto" (Triton for CUDA tensors or
    under the interpreter). g ≤ 0 and β in [0, 1] hold by construction: no value checks.
    """

    def __init__(self, hidden_size, num_k_heads, num_v_heads, head_k_dim, head_v_dim,
                 conv_kernel_size=4, eps=1e-6, chunk_size=64, backend="auto"):
        super().__init__()
        # positive sizes, HV % H == 0, kernel ≥ 2 (Engineering notes)
        _check_layer_args(hidden_size, num_k_heads, num_v_heads, head_k_dim, head_v_dim,
                          conv_kernel_size, eps, chunk_size, backend)
        self.hidden_size, self.num_k_heads, self.num_v_heads = hidden_size, num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.conv_kernel_size = conv_kernel_size
        self.chunk_size, self.backend = chunk_size, backend
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim,
                                      bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel_size,
                                groups=self.conv_dim, bias=False, padding=conv_kernel_size - 1)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        # decay rates exp(A_log) in [1, 16]
        self.A_log = nn.Parameter(torch.empty(num_v_heads).uniform_(1, 16).log())
        self.norm = GatedRMSNorm(head_v_dim, eps=eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """Copy transformers' Qwen3NextGatedDeltaNet (weights, shapes) into a GatedDeltaNet."""
        return _from_hf(cls, module, backend)

    def _split(self, qkvz, ba):
        """The grouped layout -> q, k [B, T, Hk, K], v, z [B, T, Hv, V], b, a [B, T, Hv]."""
        B, T, _ = qkvz.shape
        Hk, dk, dv = self.num_k_heads, self.head_k_dim, self.head_v_dim
        r = self.num_v_heads // Hk  # value heads per key head
        qkvz = qkvz.view(B, T, Hk, 2 * dk + 2 * r * dv)  # per key head: [q | k | r·v | r·z]
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = ba.view(B, T, Hk, 2 * r).split([r, r], dim=-1)
        Hv = self.num_v_heads
        v, z = v.reshape(B, T, Hv, dv), z.reshape(B, T, Hv, dv)
        return q, k, v, z, b.reshape(B, T, Hv), a.reshape(B, T, Hv)

    def _conv(self, x, conv_state):
        """Causal depthwise conv + SiLU over x [B, C, T] after conv_state [B, C, W − 1] (or 0)."""
        W = self.conv_kernel_size
        if conv_state is None:
            prev = x.new_zeros(x.shape[0], x.shape[1], W - 1)
        else:
            prev = conv_state.to(x.dtype)
        xx = torch.cat([prev, x], dim=-1)  # [B, C, W − 1 + T]
        if x.shape[-1] == 0:  # T = 0: nothing to convolve, and the state carries over
            return x, xx
        y = F.conv1d(xx, self.conv1d.weight, groups=self.conv_dim)  # [B, C, T]
        return F.silu(y), xx[..., -(W - 1):]

    def _attend(self, q, k, v, g, beta, rec_state, want_state):
        """The gated delta rule on the layer's own q, k, v, g, β (no value checks)."""
        # scale K^-0.5, q and k normalised inside
        args = (q, k, v, g, beta, None, rec_state, want_state, True)
        fits = max(q.shape[-1], v.shape[-1]) <= 128  # the chunk kernels' K, V; past them: naive
        if _checks.choose_backend(self.backend, q, fits=fits) == "naive":
            # one decoding step: the recurrence is the cheaper form
            if rec_state is not None and q.shape[1] == 1:
                return _naive_recurrent(*args, check_values=False)
            return _naive_chunk(*args, self.chunk_size, check_values=False)
        if rec_state is not None and q.shape[1] <= 16 and not torch.is_grad_enabled():  # decoding
            return _fused_recurrent(*args, check_values=False)
        return _chunk(*args, check_values=False)

    def forward(self, hidden_states, state=None, use_cache=False, attention_mask=None):
        # [B, T, hidden]
        op = "GatedDeltaNet"
        _checks.layer_input(op, hidden_states, self, hidden=self.hidden_size)
        B, T, _ = hidden_states.shape
        _checks.attention_mask(op, attention_mask, B, T, state_in=state is not None,
                               state_out=use_cache or state is not None)
        conv_state, rec_state = _checks.conv_recurrent_state(
            op, state, (B, self.conv_dim, self.conv_kernel_size - 1),
            (B, self.num_v_heads, self.head_k_dim, self.head_v_dim), hidden_states)
        if attention_mask is not None:  # 0 = padding: padded tokens enter as zeros
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        q, k, v, z, b, a = self._split(self.in_proj_qkvz(hidden_states),
                                       self.in_proj_ba(hidden_states))
        mixed = torch.cat([q.reshape(B, T, self.key_dim), k.reshape(B, T, self.key_dim),
                           v.reshape(B, T, self.value_dim)], dim=-1)  # [B, T, conv_dim]
        mixed, new_conv = self._conv(mixed.transpose(1, 2), conv_state)
        q, k, v = mixed.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()  # [B, T, Hv]
        # [B, T, Hv] log decay ≤ 0
        acc = torch.promote_types(a.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias)
        want_state = use_cache or state is not None
        o, new_rec = self._attend(q, k, v, g, beta, rec_state, want_state)
        o = self.norm(o, z)  # [B, T, Hv, V] per value head
        y = self.out_proj(o.reshape(B, T, self.value_dim))
        return y, ((new_conv, new_rec) if want_state else None)


# %% [markdown]
# Decoding: a 60-token prompt with `use_cache=True`, then ten single tokens from the returned (conv, recurrent)
# state, equal the prefill of all 70 tokens. (The notes check the layer against transformers' with `from_hf`.)

# %%
from minisparse.deltanet import GatedDeltaNet

torch.manual_seed(0)
layer = GatedDeltaNet(64, 2, 4, 16, 24)  # hidden 64, 2 key heads × 16, 4 value heads × 24
x_dec = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    y_full, _ = layer(x_dec)
    y_pre, st = layer(x_dec[:, :60], use_cache=True)
    steps = [y_pre]
    for t in range(60, 70):
        y_t, st = layer(x_dec[:, t:t + 1], state=st)
        steps.append(y_t)
assert_close("decode (prompt 60 + 10 single steps) vs prefill", y_full, torch.cat(steps, dim=1),
             1e-5)
print("decoding with conv + recurrent state == prefill (60-token prompt, then 10 single tokens)")

# %% [markdown]
# ## 5.8 Measure
#
# **The design, and why.** Three forward kernels, so that only the scan is sequential; the solve by blocks, so that
# it runs on tensor cores; $W$, $\tilde U$, $U$ and the chunk states stored in the input dtype, as fla stores them
# (half the bytes in bf16), while the forward never rounds the normalised $q$, $k$ ($1/\lVert q\rVert$,
# $1/\lVert k\rVert$ are fp32 scalings inside the kernels; the backward's recomputation rounds them once); a backward that recomputes $W$, $U$ and the states in fp32.
#
# `bench/deltanet.py` times `chunk_gated_delta_rule` as it runs on CUDA by default (value checks off, as fla) against
# fla's `chunk_gated_delta_rule` (the kernels Qwen3-Next runs in `transformers` and vLLM) and SDPA causal attention,
# in bf16 at $B = 2$, 16 heads, $K = V = 128$; it also times our forward with `runtime.set_value_checks(True)`. The
# cell plots `bench/results/deltanet.json` and prints its table; a ratio is our time over fla's (below 1: ours is
# faster).

# %%
r = bench.load_results("deltanet")
fig = bench.plot_passes(r, y="ms")
for ax in fig.axes:
    ax.set_yscale("log")  # SDPA's quadratic time would flatten the linear-time lines otherwise
plt.show()
ms = {(row["impl"], row["pass"], row["T"]): row["ms"] for row in r["rows"]}
OURS, FLA, SDPA = "minisparse, value checks off", "fla chunk_gated_delta_rule", "SDPA causal"
CHECKED = "minisparse, value checks on"
Ts = r["config"]["T"]
ratio = {p: {T: ms[OURS, p, T] / ms[FLA, p, T] for T in Ts} for p in ("fwd", "fwd+bwd")}
checked = {T: ms[CHECKED, "fwd", T] / ms[FLA, "fwd", T] for T in Ts}
print(f"{r['device']}, {r['date']}, torch {r['torch']}, triton {r['triton']}; bf16, ms")
print(f"{'T':>6s} | {'fwd: ours':>9s} {'fla':>6s} {'ratio':>5s} {'SDPA':>6s} | "
      f"{'checks on':>9s} {'ratio':>5s} | {'fwd+bwd: ours':>13s} {'fla':>6s} {'ratio':>5s}")
for T in Ts:
    print(f"{T:6d} | {ms[OURS, 'fwd', T]:9.2f} {ms[FLA, 'fwd', T]:6.2f} {ratio['fwd'][T]:5.2f} "
          f"{ms[SDPA, 'fwd', T]:6.2f} | {ms[CHECKED, 'fwd', T]:9.2f} {checked[T]:5.2f} | "
          f"{ms[OURS, 'fwd+bwd', T]:13.2f} {ms[FLA, 'fwd+bwd', T]:6.2f} {ratio['fwd+bwd'][T]:5.2f}")
rounded = {p: [round(ratio[p][T], 2) for T in Ts] for p in ratio}
# takeaway 1: faster than fla at every length: 0.17-0.26x up to 4K, 0.65x at 8K, 0.93-0.94x from 16K
assert rounded["fwd"][:4] == [0.18, 0.17, 0.26, 0.65], rounded
assert min(rounded["fwd"][4:]) == 0.93 and max(rounded["fwd"][4:]) == 0.94, rounded
assert all(1.11 <= round(ms[FLA, "fwd", T], 2) <= 1.25 for T in Ts if T <= 4096)
long_checked = [round(checked[T], 2) for T in Ts if T >= 8192]
assert min(long_checked) == 0.98 and max(long_checked) == 1.22, long_checked
sync = [ms[CHECKED, "fwd", T] - ms[OURS, "fwd", T] for T in Ts]
assert round(min(sync), 2) == 0.24 and round(max(sync), 2) == 0.57, sync
# takeaway 2: forward + backward faster than fla up to 4K, 1.57x at 8K, 1.87-1.89x from 16K to 64K
assert rounded["fwd+bwd"][:4] == [0.34, 0.59, 0.78, 1.57], rounded
assert min(rounded["fwd+bwd"][4:]) == 1.87 and max(rounded["fwd+bwd"][4:]) == 1.89, rounded
# takeaway 3: SDPA's forward is faster up to 4K, slower from 8K; 12.2x ours at 64K
assert all((ms[SDPA, "fwd", T] < ms[OURS, "fwd", T]) == (T <= 4096) for T in Ts)
gap = {T: ms[SDPA, "fwd", T] / ms[OURS, "fwd", T] for T in Ts}
assert round(gap[65536], 1) == 12.2
assert all(1.7 < gap[2 * T] / gap[T] < 2.3 for T in Ts if T >= 8192 and 2 * T in gap), gap

# %% [markdown]
# Three takeaways (H100, bf16, 2026-12-05; the table above):
#
# 1. **The forward is faster than fla's at every length**: 0.93–0.94× fla's time from 16K to 64K tokens, 0.65× at
#    8K, and 0.17–0.26× up to 4K, where fla's time hardly moves (1.11–1.25 ms: launches and host work). With value
#    checks on, the range checks of g, β, q and k (host reads of a NaN count and a range each, before any kernel
#    is queued) add 0.24–0.57 ms: 0.98–1.22× fla's time from 8K.
# 2. **The backward is the weak half**: forward + backward takes 1.87–1.89× fla's time from 16K to 64K and 1.57× at
#    8K, but less than fla's up to 4K (0.34×, 0.59×, 0.78×), where launches dominate. Its work is split as fla
#    splits it (the engineering notes' backward pass: a WY kernel a chunk, a keys kernel a chunk and block of key
#    channels). Part of what remains is precision: the recomputed W, U, states, dU and dS enter the products in fp32
#    where fla rounds them to bf16. Rounding as fla does puts dg's error past the tests' 8e-3 bound, to save about a
#    quarter of the backward's time (`bench/notes/deltanet.md`). The rest is the reverse scan, the largest kernel
#    of the pass.
# 3. **The linear cost shows all the same**: SDPA's causal forward is faster up to 4K tokens and slower from 8K;
#    at 64K it takes 12.2× our forward's time, and from 8K the gap about doubles with each doubling of $T$.
#
# The per-kernel times and the launch sweeps behind `runtime.LAUNCH_TABLE`'s rows are in `bench/notes/deltanet.md`.

# %% [markdown]
# ## 5.9 Exercises
#
# Each exercise has a stub, a cell that checks it (`attempt` prints what differs; call the checker itself to get
# the exception), and a solution in a collapsed cell.
#
# ### Exercise 1 (derive): what one delta step leaves behind
#
# A state stores $v_i$ under orthonormal keys $k_i$: $S = \sum_i k_i^\top v_i$. One gated delta step writes
# $v^\text{new}$ under $k_j$ with strength $\beta$ and log gate $g$. Derive what the memory returns afterwards:
# $k_j$ reads $a\, v_j + b\, v^\text{new}$, any other $k_i$ reads $c\, v_i$; return $(a, b, c)$ as functions of
# $\beta$ and $g$. The checker measures them on the recurrence (to 1e-4). Which $\beta$ overwrites exactly, and what
# does $\beta = 2$ do to the old value?

# %%
from minisparse.deltanet.exercises import (check_chunk_transition, check_overwrite_coefficients,
                                           check_planted_bug_fixed, check_unit_lower_inverse_kernel)


def my_overwrite_coefficients(beta, g):
    # your code here: return (a, b, c), three floats
    raise NotImplementedError


# %%
# prints what is wrong until the stub is filled
attempt(check_overwrite_coefficients, my_overwrite_coefficients)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — decay first: S̃ = e^g S, so k_j S̃ = e^g v_j. The write adds k_jᵀ β (v_new − e^g v_j),
# which only k_j reads (k_i · k_j = 0 for i ≠ j). So k_j reads e^g v_j + β (v_new − e^g v_j) = (1 −
# β) e^g v_j + β v_new, and k_i reads e^g v_i. β = 1 overwrites exactly (a = 0, b = 1); β = 2
# reflects: the old value comes back negated.
def overwrite_coefficients_solution(beta, g):
    return (1 - beta) * math.exp(g), beta, math.exp(g)


check_overwrite_coefficients(overwrite_coefficients_solution)

# %% [markdown]
# ### Exercise 2 (debug): this chunk form has a bug
#
# This function computes what each token of a chunk writes, $U = \tilde U - W S$, for one head entering with state
# `S`, and has one planted error. The checker's five cases differ in the entering state and the gates (a zero `S`?
# no gates?); the case it names as failing, and which cases those are, is the clue. Fix it: the checker accepts a
# function that matches the recurrence to 1e-4 on all five.

# %%
def chunk_writes_with_a_bug(k, v, g, beta, S):
    """One chunk, one head: k [L, K] unit rows, v [L, V], g, beta [L], S [K, V] -> U [L, V]."""
    L = len(g)
    G = g.cumsum(0)  # [L] chunk-local cumulative log decay
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    Gamma = torch.exp(torch.where(causal, G[:, None] - G[None, :], float("-inf")))  # [L, L]
    A = (beta[:, None] * (k @ k.T) * Gamma).tril(-1)  # [L, L] strictly lower
    A_inv = torch.linalg.inv(torch.eye(L) + A)  # the UT transform
    W = A_inv @ (beta[:, None] * k)  # [L, K]
    return A_inv @ (beta[:, None] * v) - W @ S  # [L, V] U = Ũ − W S


# %%
attempt(check_planted_bug_fixed, chunk_writes_with_a_bug)  # the planted bug: which cases fail?

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — the cases with a zero entering state pass (W S = 0 whatever W is), and so do the cases
# without gates (e^G = 1): the error is in the term that multiplies S and should carry the gate.
# Token i reads the entering state decayed by e^{G_i}, so W = A_inv diag(β e^G) K, not A_inv diag(β)
# K.
def chunk_writes_fixed(k, v, g, beta, S):
    L = len(g)
    G = g.cumsum(0)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    Gamma = torch.exp(torch.where(causal, G[:, None] - G[None, :], float("-inf")))
    A = (beta[:, None] * (k @ k.T) * Gamma).tril(-1)
    A_inv = torch.linalg.inv(torch.eye(L) + A)
    W = A_inv @ ((beta * G.exp())[:, None] * k)  # the fix: the decay e^{G_i} of the entering state
    return A_inv @ (beta[:, None] * v) - W @ S


check_planted_bug_fixed(chunk_writes_fixed)

# %% [markdown]
# ### Exercise 3 (extend): a whole chunk's transition from its WY representation
#
# Without gates a chunk's product of Householder matrices is $I - K^\top W$ (section 5.3). Extend it to the gated
# rule: the state leaving a chunk is $S' = P S + (\text{terms without } S)$, $P = M_L \cdots M_1$,
# $M_t = e^{g_t}(I - \beta_t k_t^\top k_t)$. Write $P$ `[K, K]` from the chunk's keys, its WY rows $W$ (as section
# 5.3 computes them) and diagonal scalings of the gates. The checker hands you $W$ and compares $P$ with the product
# of the $M_t$ in float64 (to 1e-4); then it hands you a perturbed $W$ and expects your $P$ to follow it, as the
# formula does.

# %%
def my_chunk_transition(k, W, g):
    # k [L, K] unit rows, W [L, K] the chunk's WY rows, g [L] log gates -> P [K, K]
    # your code here
    raise NotImplementedError


# %%
attempt(check_chunk_transition, my_chunk_transition)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — substitute U = Ũ − W S into S' = e^{G_L} S + (diag(e^{G_L − G}) K)ᵀ U and keep what
# multiplies S: P = e^{G_L} I − Kᵀ diag(e^{G_L − G}) W, with W = (I + A)⁻¹ diag(β e^G) K. With g = 0
# it is I − KᵀW.
def chunk_transition_solution(k, W, g):
    G = g.cumsum(0)  # [L]
    eye = torch.eye(k.shape[1], dtype=k.dtype)
    return G[-1].exp() * eye - k.T @ ((G[-1] - G).exp()[:, None] * W)


check_chunk_transition(chunk_transition_solution)

# %% [markdown]
# ### Exercise 4 (Triton): the unit lower-triangular inverse, row by row
#
# The WY kernel's solve starts with forward substitution. Complete the loop body below so that the kernel writes
# $X = (I + A)^{-1}$ for a strictly lower-triangular $A$ of $L \times L$ (padded to the tile $C$). Row $i$ of $X$ is
# $e_i - A_{i,:} X$ and needs only rows $< i$, already final. Triton has no row indexing: select a row with
# `tl.where` on `rows == i` and a `tl.sum`, and write it back the same way. The checker runs the kernel (in the
# interpreter on a CPU) on chunks of 13, 16, 5 and 1 tokens against `torch.linalg.solve_triangular`.

# %%
@triton.jit
def my_unit_lower_inverse_kernel(a_ptr, x_ptr, L, C: tl.constexpr):
    """Program n: A = a[n] [L, L] strictly lower-triangular -> x[n] = (I + A)⁻¹; tiles C ≥ L."""
    n = tl.program_id(0)
    rows = tl.arange(0, C)
    inside = (rows[:, None] < L) & (rows[None, :] < L)
    offs = n * L * L + rows[:, None] * L + rows[None, :]
    A = tl.load(a_ptr + offs, mask=inside, other=0.0)  # [C, C], zero past L
    X = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)  # [C, C]: row 0 of (I + A)⁻¹ is e_0
    for i in range(1, C):
        # your code here: replace row i of X by e_i − A[i, :] @ X
        pass
    tl.store(x_ptr + offs, X, mask=inside)


# %%
# prints ✗ until you write the kernel
attempt(check_unit_lower_inverse_kernel, my_unit_lower_inverse_kernel)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — a_i is row i of A (zero from column i on, so the rows ≥ i of X, still identity rows, do
# not enter); e_i − a_i X is row i of the inverse; tl.where writes it into row i. C − 1 dependent
# steps of vector work: this is why the chapter's kernel runs it only inside 16 × 16 blocks and
# finishes with tensor-core products.
@triton.jit
def unit_lower_inverse_solution_kernel(a_ptr, x_ptr, L, C: tl.constexpr):
    n = tl.program_id(0)
    rows = tl.arange(0, C)
    inside = (rows[:, None] < L) & (rows[None, :] < L)
    offs = n * L * L + rows[:, None] * L + rows[None, :]
    A = tl.load(a_ptr + offs, mask=inside, other=0.0)
    X = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_i = tl.sum(tl.where(rows[:, None] == i, A, 0.0), axis=0)  # [C] row i of A
        x_i = tl.where(rows == i, 1.0, 0.0) - tl.sum(a_i[:, None] * X, axis=0)  # e_i − a_i X
        X = tl.where(rows[:, None] == i, x_i[None, :], X)
    tl.store(x_ptr + offs, X, mask=inside)


check_unit_lower_inverse_kernel(unit_lower_inverse_solution_kernel)

# %% [markdown]
# ## Summary
#
# - **The delta rule** replaces linear attention's "add $k^\top v$" by one step of online regression on the state,
#   $S \leftarrow S + \beta\, k^\top (v - kS)$: with unit keys and $\beta = 1$ it overwrites. **Gated DeltaNet**
#   adds Mamba2's data-dependent decay $e^{g_t}$.
# - **The chunkwise form**: the UT transform $(I + A)^{-1}$ of each chunk, a unit lower-triangular solve independent
#   of the state, gives the WY representation $W, \tilde U$; then $U = \tilde U - WS$ and chapter 4's chunk form
#   with $U$ for $V$ and $e^{G_i - G_j}$ for $\lambda^{i-j}$.
# - **Seen as attention**, the latest occurrence of a key wins and earlier ones keep a small remainder. **Cost**: linear
#   in $T$, a constant state; Qwen3-Next's 3:1 stack tends to a quarter of all-attention's FLOPs and KV cache.
# - **Triton**: the WY kernel solves by $16 \times 16$ blocks and $(I - N)(I + N^2) E$ on tensor cores; a scan over
#   chunks and a parallel output kernel finish the forward, a little faster than fla's on an H100 from 16K tokens
#   (much faster below); forward + backward takes about 1.9× fla's time there.
# - **The layer**: projections, short convolutions with a decoding state, $\beta = \operatorname{sigmoid}(b)$,
#   $g = -e^{A_{\log}}\operatorname{softplus}(a + \text{dt\_bias})$, gated RMSNorm; decoding equals prefill.
#
# Next, chapter 6 makes the gate a vector per key channel (Kimi Delta Attention).
#
# ## References
#
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of
#   February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix
#   *The seed survey*. Its figures were checked against the models' configs and papers; where they disagree, the text
#   says so.
# - S. Yang, B. Wang, Y. Zhang, Y. Shen, Y. Kim, *Parallelizing Linear Transformers with the Delta Rule over Sequence
#   Length* (DeltaNet's chunkwise WY/UT algorithm), NeurIPS 2024. [arXiv:2406.06484](https://arxiv.org/abs/2406.06484)
# - S. Yang, J. Kautz, A. Hatamizadeh, *Gated Delta Networks: Improving Mamba2 with Delta Rule*, ICLR 2025.
#   [arXiv:2412.06464](https://arxiv.org/abs/2412.06464)
# - I. Schlag, K. Irie, J. Schmidhuber, *Linear Transformers Are Secretly Fast Weight Programmers* (the delta rule in
#   linear attention), ICML 2021. [arXiv:2102.11174](https://arxiv.org/abs/2102.11174)
# - C. Bischof, C. Van Loan, *The WY Representation for Products of Householder Matrices*, SIAM J. Sci. Stat.
#   Comput. 8(1), 1987; T. Joffrain et al., *Accumulating Householder Transformations, Revisited* (the UT transform),
#   ACM TOMS 32(2), 2006.
# - T. Dao, A. Gu, *Transformers are SSMs* (Mamba2's gate), ICML 2024.
#   [arXiv:2405.21060](https://arxiv.org/abs/2405.21060)
# - Qwen Team, *Qwen3-Next* (model card and blog post, September 2025: hybrid of Gated DeltaNet and gated attention
#   layers, 3:1, 262,144 tokens native).
#   [Qwen/Qwen3-Next-80B-A3B-Instruct](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct); `transformers` 5.x:
#   `Qwen3NextGatedDeltaNet`, `torch_recurrent_gated_delta_rule` (the layer's and the recurrence's oracle);
#   `Qwen3NextConfig()` (the shapes of section 5.5).
# - `fla-core` 0.6 (flash-linear-attention): `naive_recurrent_gated_delta_rule` (the test oracle),
#   `chunk_gated_delta_rule`.

# %% [markdown]
# ## Engineering notes (optional)
#
# What a practitioner needs and a first reading skips: the kernels' helpers and the numerics of the gates, the
# precision of the products, the scan and the output kernel, the backward pass, decoding, the host code that
# launches everything, and the check of the layer against transformers. The measurements behind the launch
# configurations and the precision choices are in `bench/notes/deltanet.md`, by date.
#
# ### Helpers: tile widths, precision, and the gates' sums
#
# **Sums, not differences.** $G_i - G_j$ is the sum of the gates between the two tokens, $g_{j+1} + \dots + g_i$.
# The PyTorch chunk form of section 5.3 computes it that way: a cumulative sum down each column of the matrix that
# holds $g_i$ below the diagonal, $D_{ij} = g_{j+1} + \dots + g_i$, so $\Gamma = e^{D}$, and $G_L - G_j$ is the
# last row of $D$. Subtracting two float32 cumulative sums loses digits instead: one gate of $-10^5$ early in a
# chunk makes every later $G_i$ about $-10^5$, where float32 numbers lie $0.008$ apart, so a decay $e^{G_i - G_j}$
# between two later tokens comes out about 1 % off, and the output with it.
#
# The kernels get the same accuracy more cheaply than a $C \times C$ cumulative sum: `_gate_sums` adds the gates
# up in float64 (`tl.cumsum`), after clamping them at $-1000$, and `_pair_exponents` takes the differences
# $D_{ij} = G_i - G_j$ in float64 before rounding them to float32. With $|G| \le 64\,000$ those differences are the
# sums of the gates between two tokens to about $10^{-11}$; and the clamp changes no float32 result, since a gate
# below $-104$ already makes every decay it enters exactly 0. The gradient of $g$ needs the same care (the backward
# pass, below); `tests/test_deltanet.py` checks output and gradients down to gates of $-10^{30}$.

# %%
#| export deltanet.chunk_fwd
# the output kernel walks K in blocks of this many columns (Q, K and S_n tiles a step)
_OUTPUT_COLUMNS = 64
_INSTEAD = ("the PyTorch chunk form: naive_chunk_gated_delta_rule, "
            "or GatedDeltaNet(..., backend='naive')")


@triton.jit
def _heads(bh, H, HV):
    """Program index bh = b·HV + hv -> (batch b, value head hv, key head h): HV/H value heads share
    a key head."""
    b, hv = bh // HV, bh % HV
    return b, hv, hv // (HV // H)


def _pow2(n):
    """The width of a tile that holds n columns: the next power of two, at least 16 (tl.dot's
    smallest)."""
    return max(16, triton.next_power_of_2(n))


def _precision(dtype):
    """tl.dot's precision on fp32 operands: full fp32 for fp32 inputs, TF32 for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _options(x, v):
    """runtime.launch's keywords: the configuration that fits is remembered per dtype and padded K
    and V."""
    return dict(device=x.device, dtype=x.dtype, key=(_pow2(x.shape[-1]), _pow2(v.shape[-1])),
                instead=_INSTEAD)


def _v_tile(V):
    """runtime.launch's `fit` for kernels that tile V: a V-tile no wider than the padded V."""
    return lambda c: dict(c, BV=min(c["BV"], _pow2(V)))


@triton.jit
def _gate_sums(g, C: tl.constexpr):
    """A chunk's log gates g [C] (0 past T) -> (G, G64, to_end, G_L): G_i = g_0 + … + g_i in float32
    and float64, to_end_j = G_L − G_j (float32), the log decay from token j to the chunk's end, and
    G_L (float32).

    The sums run in float64 over the gates clamped at −1000, so that every difference of them (here
    and in _pair_exponents) is the sum of the gates between two tokens to about 1e-11 (|G| ≤ 64
    000). In float32 the differences would lose digits whenever G is large: one gate of −1e5 early
    in a chunk puts every later G near −1e5, where float32 numbers lie 0.008 apart. The clamp
    changes no float32 result: a gate below −104 already makes every decay it enters exactly 0 (and
    its gradient, a multiple of that decay, too).
    """
    G64 = tl.cumsum(tl.maximum(g, -1000.0).to(tl.float64), axis=0)
    # past T the gates are 0: G_{C-1} = G_L
    G_L = tl.sum(tl.where(tl.arange(0, C) == C - 1, G64, 0.0), axis=0)
    return G64.to(tl.float32), G64, (G_L - G64).to(tl.float32), G_L.to(tl.float32)


@triton.jit
def _pair_exponents(G64):
    """[C, C] float32: D_ij = G_i − G_j, the log decay from token j to token i (g_{j+1} + … + g_i
    for i ≥ j), taken from _gate_sums' float64 sums. Positive above the diagonal: mask it to −inf
    before exp."""
    return (G64[:, None] - G64[None, :]).to(tl.float32)


@triton.jit
def _state_halves(iv, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """A scan's [BK, BV] state tile (columns iv·BV …) as two halves of BK/2 rows (BK ≥ 32, so that
    each half is a tensor-core operand of ≥ 16 rows): each half's row indices, the tile's columns,
    and each half's mask and offsets within a [K, V] state."""
    k1 = tl.arange(0, BK // 2)  # rows of the first half; the second's are k1 + BK // 2
    k2 = k1 + BK // 2
    vs = iv * BV + tl.arange(0, BV)
    mask1, mask2 = (k1[:, None] < K) & (vs[None, :] < V), (k2[:, None] < K) & (vs[None, :] < V)
    return k1, k2, vs, mask1, mask2, k1[:, None] * V + vs[None, :], k2[:, None] * V + vs[None, :]


# %% [markdown]
# **Products that keep $K$ and $V$ as stored.** The WY kernel moves the row scalings of $K$ and $V$ onto
# $A_\text{inv}$'s columns. For bf16 inputs `_split_dot` then splits the scaled $A_\text{inv}$ into two bf16 halves,
# $A_\text{hi} + A_\text{lo}$, and runs two bf16 tensor-core products: as accurate as fp32 to about $2^{-16}$, and
# faster than one TF32 product on fp32 copies of $K$ and $V$. fp16 keeps TF32, because very negative gates push the
# scaled columns below fp16's range. Like every product of fp32 operands in these kernels, the solve's products
# run in TF32 when the inputs are bf16 or fp16 and in full fp32 when the inputs are fp32. The WY kernel's launch
# configurations (2 warps on Ampere and newer, 4 on a T4, whose fp32 products run on CUDA cores and need more
# registers) are in `runtime.LAUNCH_TABLE` under `"deltanet.fwd_wy"`; `tests/test_deltanet.py` checks the split
# products against fp32 (`test_split_products_are_fp32_accurate`).

# %%
#| export deltanet.chunk_fwd
@triton.jit
def _split_hi_lo(M, dtype: tl.constexpr, SPLIT: tl.constexpr):
    """M [C, C] float32 as the operands of `_split_dot`: (hi, lo) with hi = M rounded to `dtype` and
    lo the rest, also rounded, if SPLIT; else (M, M). Done once a chunk, before the column
    blocks."""
    if SPLIT:
        hi = M.to(dtype)
        return hi, (M - hi.to(tl.float32)).to(dtype)
    else:
        return M, M


@triton.jit
def _split_dot(hi, lo, x, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """M @ x [C, B] accumulated in fp32, for (hi, lo) = _split_hi_lo(M, x.dtype, SPLIT).

    SPLIT (x in bf16): two bf16 tensor-core products, hi @ x + lo @ x, accurate to about 2⁻¹⁶ of M
    with x entering exactly as stored. Not for fp16: with very negative gates the columns of A_inv
    diag(βe^G) fall below fp16's range. Otherwise one product on an fp32 copy of x (TF32 for 16-bit
    inputs, ieee for fp32).
    """
    if SPLIT:
        return tl.dot(lo, x, tl.dot(hi, x))
    else:
        return tl.dot(hi, x.to(tl.float32), input_precision=PRECISION)


# %% [markdown]
# ### The scan and the output kernel
#
# The scan: the only loop over chunks. A program owns one tile of $V$ columns of one head's state and walks the
# chunks in order; each step is two products on the sequential path ($W S$, then the state update
# $S_{n+1} = e^{G_L} S_n + (\operatorname{diag}(e^{G_L - G}) K)^\top U$), with the state in two halves of $K/2$ rows
# so that each product splits into two independent ones (fla's scan does the same).

# %%
#| export deltanet.chunk_fwd
@triton.jit
def _fwd_states_kernel(k_ptr, w_ptr, u_ptr, g_ptr, kr_ptr, h0_ptr, states_ptr, ht_ptr, T, H, HV, K,
                       V, NT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, L2: tl.constexpr,
                       PRECISION: tl.constexpr):
    """The scan over chunks: the state entering each chunk, U = Ũ − W S_n, and the final state.

    Program: one (batch b, value head hv) and one V-tile of its [K, V] state. Grid (cdiv(V, BV), B ·
    HV).
    Tiling: the state tile lives in fp32 registers as two halves of BK/2 rows, S = [S1; S2] (BK ≥
    32), so that each product is two smaller independent ones; a step loads W [C, BK/2] and Kᵀ
    [BK/2, C] per half and Ũ [C, BV].
    U is written over Ũ in u_ptr: each element is read, then overwritten, by the same program.
    Math, chunk by chunk (S = h0 if HAS_H0 else 0; L2: r = 1/‖k‖ from the WY kernel, else r = 1):
        states[n] = S;   U = Ũ − W S;   S ← e^{G_L} S + Kᵀ diag(e^{G_L − G} r) U     (G_L − G_j
            = Σ_{t > j} g_t)
    and ht = S after the last chunk if STORE_HT.
    """
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    k_bh = k_ptr + (b * T * H + h) * K  # token t's key row at k_bh + t·H·K
    w_bh = w_ptr + (b * T * HV + hv) * K  # token t's row of W at w_bh + t·HV·K
    u_bh = u_ptr + (b * T * HV + hv) * V  # token t's row of Ũ (then U) at u_bh + t·HV·V
    gate_bh = b * T * HV + hv  # token t's g and r at gate_bh + t·HV
    states_bh = states_ptr + bh * NT * K * V  # chunk n's [K, V] state at states_bh + n·K·V
    rows = tl.arange(0, C)
    # S = [S1; S2]
    k1, k2, vs, kv_mask1, kv_mask2, kv_off1, kv_off2 = _state_halves(iv, K, V, BK, BV)
    S1 = tl.zeros((BK // 2, BV), dtype=tl.float32)
    S2 = tl.zeros((BK // 2, BV), dtype=tl.float32)
    if HAS_H0:
        S1 = tl.load(h0_ptr + bh * K * V + kv_off1, mask=kv_mask1, other=0.0).to(tl.float32)
        S2 = tl.load(h0_ptr + bh * K * V + kv_off2, mask=kv_mask2, other=0.0).to(tl.float32)
    for n in range(NT):
        tl.store(states_bh + n * K * V + kv_off1, S1.to(states_ptr.dtype.element_ty), mask=kv_mask1)
        tl.store(states_bh + n * K * V + kv_off2, S2.to(states_ptr.dtype.element_ty), mask=kv_mask2)
        t = (n * C + rows).to(tl.int64)  # int64: t·HV·K passes 2^31 at long context
        tm = t < T
        w1 = tl.load(w_bh + t[:, None] * HV * K + k1[None, :], mask=tm[:, None] & (k1[None, :] < K),
                     other=0.0)
        w2 = tl.load(w_bh + t[:, None] * HV * K + k2[None, :], mask=tm[:, None] & (k2[None, :] < K),
                     other=0.0)
        WS = tl.dot(w2, S2.to(w2.dtype), tl.dot(w1, S1.to(w1.dtype), input_precision=PRECISION),
                    input_precision=PRECISION)  # [C, BV] W S, the halves' shares summed
        u_off = t[:, None] * HV * V + vs[None, :]
        u_mask = tm[:, None] & (vs[None, :] < V)
        u = tl.load(u_bh + u_off, mask=u_mask, other=0.0).to(tl.float32) - WS  # U = Ũ − W S
        tl.store(u_bh + u_off, u.to(u_ptr.dtype.element_ty), mask=u_mask)
        g = tl.load(g_ptr + gate_bh + t * HV, mask=tm, other=0.0)  # [C], 0 past T
        _, _, to_end, G_L = _gate_sums(g, C)
        key_decay = tl.where(tm, tl.exp(to_end), 0.0)  # [C] e^{G_L − G_j}
        if L2:  # Knᵀ = Kᵀ diag(r): r joins the decay on U's rows
            key_decay = key_decay * tl.load(kr_ptr + gate_bh + t * HV, mask=tm, other=0.0)
        u = (u * key_decay[:, None]).to(w1.dtype)  # the decay on U's C×BV rows, not on K's C×BK
        kT1 = tl.load(k_bh + t[None, :] * H * K + k1[:, None], mask=(k1[:, None] < K) & tm[None, :],
                      other=0.0)
        kT2 = tl.load(k_bh + t[None, :] * H * K + k2[:, None], mask=(k2[:, None] < K) & tm[None, :],
                      other=0.0)
        # decayed S accumulates
        S1 = tl.dot(kT1.to(w1.dtype), u, S1 * tl.exp(G_L), input_precision=PRECISION)
        S2 = tl.dot(kT2.to(w1.dtype), u, S2 * tl.exp(G_L), input_precision=PRECISION)  # the product
    if STORE_HT:
        tl.store(ht_ptr + bh * K * V + kv_off1, S1, mask=kv_mask1)
        tl.store(ht_ptr + bh * K * V + kv_off2, S2, mask=kv_mask2)


# %% [markdown]
# The output kernel is chapter 4's, with $U$ for $V$ and $\Gamma = e^D$ for the decay matrix; with `use_qk_l2norm` it
# scales $QK^\top$ and $QS_n$ by the rows' inverse norms instead of reading normalised copies of $q$ and $k$.
#
# **Storage, and where the normalisation goes.** The scan accumulates the state in fp32 registers whatever the input
# dtype and multiplies in the input dtype. The forward *stores* $W$, $\tilde U$, $U$ and the chunk states in the input
# dtype, as fla does: half the bytes of fp32 in bf16, and 16-bit tensor-core products in the output kernel, $(QK^\top
# \odot \Gamma)$ rounded to bf16 times $U$. That is accurate enough only because $q$ and $k$ are never rounded after
# they are normalised: with `use_qk_l2norm` the kernels take $q$ and $k$ as given and apply $1/\lVert q \rVert$ and
# $1/\lVert k \rVert$ as fp32 scalings of products of the unrounded rows (`bench/notes/deltanet.md` measures the
# trade). For $k$ this costs the WY kernel almost nothing: $\lVert k_i \rVert^2$ is the diagonal of the $K K^\top$ it
# computes anyway (products of 16-bit numbers are exact in fp32), so $K_n K_n^\top = \operatorname{diag}(r)\, K K^\top
# \operatorname{diag}(r)$ and $W = A_\text{inv} \operatorname{diag}(\beta e^G r) K$. The kernel stores $r$ for the
# scan, which scales $U$'s rows by it along with the decay, and for the output kernel, which scales $QK^\top$'s columns
# by it. $1/\lVert q \rVert$ the output kernel sums itself, in a loop over $Q$'s rows of its own (`_row_rnorm`; the
# second read of $Q$ mostly hits the L2 cache). Grouped value heads are addressing only: value head $h_v$ reads key
# head $h_v // (H_V/H)$. The backward's recomputation stores everything in fp32, $U$ included, for the gradients, and
# normalises $q$ and $k$ first in a row kernel (`_l2norm_rows_kernel`: in fp32, rounded back to the input dtype).
#

# %%
#| export deltanet.chunk_fwd
@triton.jit
def _row_rnorm(rows_ptr, row_mask, K, R: tl.constexpr, BK: tl.constexpr):
    """1/‖x‖ (as l2norm: rsqrt(Σx² + 1e-6), in fp32) of R rows, rows_ptr [R, 1] pointing at each
    row's start, read in blocks of BK. A loop of its own, not the output kernel's main loop: summed
    there, beside the products that use the same loads, triton 3.6 miscompiles these squares on
    sm_90 (V-tiles of 128; bench/notes/deltanet.md, 2026-11-29)."""
    sq = tl.zeros((R,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(rows_ptr + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K),
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    return tl.rsqrt(sq + 1e-6)


@triton.jit
def _fwd_output_kernel(q_ptr, k_ptr, u_ptr, g_ptr, kr_ptr, states_ptr, o_ptr, scale, T, H, HV, K, V,
                       NT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
                       PRECISION: tl.constexpr):
    """The outputs of one chunk, for one V-tile.

    Program: one (V-tile iv, chunk n, batch b, value head hv). Grid (cdiv(V, BV), NT, B · HV).
    Tiling: K is walked in blocks of BK: Q, K [C, BK] and the entering state's tile S_n [BK, BV] a
    step, with Q Kᵀ [C, C] and Q S_n [C, BV] accumulating in fp32; then U [C, BV] once.
    Math (L2: Q, K as given, r_q = 1/‖q‖ summed here, r_k = 1/‖k‖ from the WY kernel; else both 1):
        P = scale · (Q Kᵀ ⊙ Γ) ⊙ r_q r_kᵀ        rounded to U's dtype (|P| ≤ scale): 16-bit
            tensor cores for P U
        O = scale · diag(e^G r_q) Q S_n + P U
    """
    iv = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    t0 = (n * C).to(tl.int64)  # the chunk's first token, int64: t·H·K passes 2^31 at long context
    q_c = q_ptr + (b * T * H + h) * K + t0 * H * K  # the chunk's row i of q, k at q_c, k_c + i·H·K
    k_c = k_ptr + (b * T * H + h) * K + t0 * H * K
    u_c = u_ptr + (b * T * HV + hv) * V + t0 * HV * V  # of U and O at u_c, o_c + i·HV·V
    o_c = o_ptr + (b * T * HV + hv) * V + t0 * HV * V
    gate_bh = b * T * HV + hv  # token t's g and r_k at gate_bh + t·HV
    S_n = states_ptr + (bh * NT + n) * K * V  # the state entering chunk n, [K, V]
    rows = tl.arange(0, C)
    t = n * C + rows
    tm = t < T
    vs = iv * BV + tl.arange(0, BV)
    QKt = tl.zeros((C, C), dtype=tl.float32)
    o = tl.zeros((C, BV), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        qk_off = rows[:, None] * H * K + ks[None, :]
        qk_mask = tm[:, None] & (ks[None, :] < K)
        q = tl.load(q_c + qk_off, mask=qk_mask, other=0.0)  # [C, BK]
        k = tl.load(k_c + qk_off, mask=qk_mask, other=0.0)
        S = tl.load(S_n + ks[:, None] * V + vs[None, :], mask=(ks[:, None] < K) & (vs[None, :] < V),
                    other=0.0)  # [BK, BV], in q's dtype
        QKt = tl.dot(q, tl.trans(k), QKt, input_precision=PRECISION)
        o = tl.dot(q, S, o, input_precision=PRECISION)
    g = tl.load(g_ptr + gate_bh + t * HV, mask=tm, other=0.0)  # [C], 0 past T
    G, G64, _, _ = _gate_sums(g, C)
    causal = (rows[:, None] >= rows[None, :]) & tm[:, None]  # rows past T: keep their exponents out
    P = QKt * tl.exp(tl.where(causal, _pair_exponents(G64), float("-inf")))  # [C, C] Q Kᵀ ⊙ Γ
    row_scale = scale * tl.exp(G)  # [C]: scale diag(e^G) Q S_n
    if L2:  # Qn = diag(r_q) Q, Kn = diag(r_k) K
        # Q again, mostly from the L2 cache
        r_q = _row_rnorm(q_c + rows[:, None] * H * K, tm, K, C, BK)
        P = P * r_q[:, None] * tl.load(kr_ptr + gate_bh + t * HV, mask=tm, other=0.0)[None, :]
        row_scale = row_scale * r_q
    v_off = rows[:, None] * HV * V + vs[None, :]
    v_mask = tm[:, None] & (vs[None, :] < V)
    u = tl.load(u_c + v_off, mask=v_mask, other=0.0)  # [C, BV]
    o = tl.dot((P * scale).to(u.dtype), u, o * row_scale[:, None], input_precision=PRECISION)
    tl.store(o_c + v_off, o.to(o_ptr.dtype.element_ty), mask=v_mask)


# %% [markdown]
# **Precision against fla.** fla keeps $W$, $\tilde U$, $U$, $A_\text{inv}$ and the chunk states in bf16 and
# multiplies $(QK^\top \odot \Gamma)$ rounded to bf16 by $U$. These kernels store the same quantities in bf16 but
# $A_\text{inv}$, whose products run as two bf16 halves, and they never round the *normalised* $q$ and $k$. A model
# that replays every rounding of the kernels in PyTorch on a CPU (`bench/notes/deltanet_rounding_model.py`) says
# where the error of a state that forgets almost nothing comes from: rounding the normalised rows alone costs about
# 1e-3 of the 5e-3 bound, which is what pays for the 16-bit storage. The measured errors on the H200, against fla's
# (2026-11-29), are in `bench/notes/deltanet.md`. fla refuses its gated chunk backward on Hopper GPUs with Triton 3.4
# to 3.7.0 (its issue 640, a miscompilation); the benchmark lifts that check only to time fla, and never uses its
# gradients.

# %% [markdown]
# ### The backward pass
#
# The backward pass runs the same dependency structure in reverse. Write $dX$ for $\partial \mathcal L / \partial X$
# and $dS'$ for the gradient of the state *leaving* a chunk. Per chunk, from the forward equations:
#
# - **output**: $O = \sigma(\operatorname{diag}(e^G) Q S + (QK^\top \odot \Gamma) U)$ gives
#   $dQ = \sigma(\operatorname{diag}(e^G)\, dO\, S^\top + (dO\, U^\top \odot \Gamma) K)$,
#   $dK \mathrel{+}= \sigma (dO\, U^\top \odot \Gamma)^\top Q$, and
#   $dU \mathrel{+}= \sigma (QK^\top \odot \Gamma)^\top dO$;
# - **state update**: $S' = e^{G_L} S + (\operatorname{diag}(e^{G_L - G}) K)^\top U$ gives
#   $dU \mathrel{+}= \operatorname{diag}(e^{G_L - G}) K\, dS'$ and
#   $dK \mathrel{+}= \operatorname{diag}(e^{G_L - G})\, U\, dS'^\top$;
# - **the write** $U = \tilde U - W S$: $dW = -dU\, S^\top$, $d\tilde U = dU$, and the entering state collects
#   $dS = e^{G_L} dS' + \sigma (\operatorname{diag}(e^G) Q)^\top dO - W^\top dU$;
# - **the WY representation**:
#   $dA_\text{inv} = dW (\operatorname{diag}(\beta e^G) K)^\top + d\tilde U (\operatorname{diag}(\beta) V)^\top$, and
#   since $A_\text{inv} = (I + A)^{-1}$, $dA = -A_\text{inv}^\top\, dA_\text{inv}\, A_\text{inv}^\top$ (kept strictly
#   lower); $A_{ij} = \beta_i \Gamma_{ij}\, k_i \cdot k_j$ then hands out $d\beta$ and two more terms of $dK$. The
#   right-hand sides give the rest directly: $dV = \operatorname{diag}(\beta)\, A_\text{inv}^\top d\tilde U$, and
#   $A_\text{inv}^\top dW$ is the gradient of $\operatorname{diag}(\beta e^G) K$, which feeds $dK$, $d\beta$ and $dg$;
# - **gates**: every decay is $e$ to a sum of gates, and $dg_t$ collects, from each factor that contains $g_t$, the
#   factor times its gradient: $m_{ij} = \frac{\partial \mathcal L}{\partial \Gamma_{ij}} \Gamma_{ij}$ for
#   $j < t \le i$ (the pair factors $\Gamma_{ij} = e^{g_{j+1} + \dots + g_i}$), the terms with $e^{G_i}$ for
#   $t \le i$, those with $e^{G_L - G_j}$ for $t > j$, and the one with $e^{G_L}$ for every $t$ (`_gate_grad`).
#
# The last rule is where the chunk form can lose its accuracy. The same sums can be written as $dg = $ the reverse
# cumulative sum of $dG$ with $dG_i = \sum_j m_{ij} - \sum_j m_{ji} + \dots$, and autograd through $G_i - G_j$ or a
# kernel that follows it computes exactly that. But for a very negative $g_t$ the true $dg_t$ is tiny — every term
# carries $e^{g_t}$ — while the $dG_i$ it would be assembled from are of order one, and their difference keeps only
# rounding error: at $g_t \approx -100$ such a $dg$ is wrong in every digit while the forward is exact. Summing each
# term only into the gates it contains keeps $dg_t$ as accurate as its terms; `tests/test_deltanet.py` checks it, and
# the output, down to gates of $-10^{30}$, against a known-wrong variant that takes differences.
#
# Only the $dS$ recursion is sequential. The backward first reruns the forward's first two kernels, this time also
# storing $A_\text{inv}$: recomputing $W$, $U$ and the chunk states costs less memory than keeping them from the
# forward pass, where they would hold several times the activations until the backward runs. Then four new kernels
# run:
#
# 1. **`_bwd_du_local_kernel`** — every chunk in parallel: the part of $dU$ that needs no state,
#    $\sigma (QK^\top \odot \Gamma)^\top dO$, so that the sequential scan does not recompute $QK^\top$;
# 2. **`_bwd_states_kernel`** — a reverse scan over chunks per (batch, value head, tile of $V$): store $dS'$, add
#    $\operatorname{diag}(e^{G_L - G}) K\, dS'$ to the chunk's $dU$, and step $dS$ back (three products a chunk);
#    the last step is the initial state's gradient;
# 3. **`_bwd_wy_kernel`** — every chunk in parallel: what needs all of a chunk's channels at once, $dV$ and
#    everything that flows through $A$ (its terms of $dk$ stored for the next kernel, its shares of $d\beta$ and
#    $dg$);
# 4. **`_bwd_keys_kernel`** — every chunk and every block of `BK` key channels in parallel: the block's $dq$ and
#    $dk$, complete, and its shares of $d\beta$ and $dg$ (`_gate_grad` on the block's terms), which the launcher
#    adds up. `BK` comes from the launch table: 64 on Hopper (each block re-reads the chunk's $dO$, $U$ and $dU$,
#    so fewer blocks read less; the sm_90 row), 32 on older GPUs (the sm_75 row, which fits a T4's 64 KiB).
#
# With grouped value heads, each value head produces its own $dq$ and $dk$; the heads sharing a key head are summed
# afterwards. With `use_qk_l2norm` the backward normalises $Q$ and $K$ first, in a row kernel (`_l2norm_rows_kernel`;
# the forward's kernels normalise as they go instead), and finishes with the normalisation's own gradient,
# $dx = (dy - y\,\langle y, dy\rangle) / \lVert x\rVert$, in the kernel that also sums the grouped heads and writes
# $dq$, $dk$ in the input dtype.

# %%
#| export deltanet.chunk_bwd
import torch
import triton
import triton.language as tl

from minisparse import runtime
from minisparse.deltanet.chunk_fwd import (_C, _gate_sums, _heads, _options, _pair_exponents, _pow2,
                                           _precision, _state_halves, _v_tile, _wy_and_states)


@triton.jit
def _bwd_du_local_kernel(q_ptr, k_ptr, g_ptr, do_ptr, du_ptr, scale, T, H, HV, K, V,
                         C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         PRECISION: tl.constexpr):
    """The part of dU that needs no state, every chunk in parallel.

    Program: one chunk n of one (batch b, value head hv). Grid (NT, B · HV).
    Tiling: Q, K [C, BK] with all of K in one tile (BK = K padded); dO and dU walked in V-tiles [C,
    BV].
    Math: dU = scale (Q Kᵀ ⊙ Γ)ᵀ dO (fp32).
    """
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    t0 = (n * C).to(tl.int64)  # the chunk's first token, int64: t·H·K passes 2^31 at long context
    q_c = q_ptr + (b * T * H + h) * K + t0 * H * K  # the chunk's row i of q and k at + i·H·K
    k_c = k_ptr + (b * T * H + h) * K + t0 * H * K
    do_c = do_ptr + (b * T * HV + hv) * V + t0 * HV * V  # of dO and dU at + i·HV·V
    du_c = du_ptr + (b * T * HV + hv) * V + t0 * HV * V
    rows = tl.arange(0, C)
    t = n * C + rows
    tm = t < T
    ks = tl.arange(0, BK)
    qk_mask = tm[:, None] & (ks[None, :] < K)
    q = tl.load(q_c + rows[:, None] * H * K + ks[None, :], mask=qk_mask, other=0.0)  # [C, BK]
    k = tl.load(k_c + rows[:, None] * H * K + ks[None, :], mask=qk_mask, other=0.0)
    g = tl.load(g_ptr + b * T * HV + hv + t * HV, mask=tm, other=0.0)  # [C], 0 past T
    _, G64, _, _ = _gate_sums(g, C)
    causal = (rows[:, None] >= rows[None, :]) & tm[:, None]
    Gamma = tl.exp(tl.where(causal, _pair_exponents(G64), float("-inf")))  # [C, C]
    # [C, C] scale (Q Kᵀ ⊙ Γ)ᵀ
    PT = tl.trans(tl.dot(q, tl.trans(k), input_precision=PRECISION) * Gamma) * scale
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        off = rows[:, None] * HV * V + vs[None, :]
        mask = tm[:, None] & (vs[None, :] < V)
        do = tl.load(do_c + off, mask=mask, other=0.0).to(tl.float32)  # [C, BV]
        tl.store(du_c + off, tl.dot(PT, do, input_precision=PRECISION), mask=mask)

# %% [markdown]
# The reverse scan. Its step has two orders of loads with the same products: all operands first (the sm_80 row),
# or each right before its product (`LATE_LOADS`, a T4's rows, where shared memory is short).

# %%
#| export deltanet.chunk_bwd
@triton.jit
def _late_dstate_half(dS, decay, q_bh, w_bh, kh, t, tm, qs, do, du, H, HV, K,
                      PRECISION: tl.constexpr):
    """One half of the reverse scan's step, e^{G_L} dS + scale (diag(e^G) Q)ᵀ dO − Wᵀ dU, with each
    operand loaded right before its product: one [BK/2, C] fp32 tile waits in shared memory at a
    time."""
    m = (kh[:, None] < K) & tm[None, :]
    qT = tl.load(q_bh + t[None, :] * H * K + kh[:, None], mask=m, other=0.0).to(tl.float32) * qs
    dS = tl.dot(qT, do, dS * decay, input_precision=PRECISION)
    wT = tl.load(w_bh + t[None, :] * HV * K + kh[:, None], mask=m, other=0.0)
    return dS - tl.dot(wT, du, input_precision=PRECISION)


@triton.jit
def _bwd_states_kernel(q_ptr, k_ptr, w_ptr, g_ptr, do_ptr, dht_ptr, du_ptr, dstates_ptr, dh0_ptr,
                       scale, T, H, HV, K, V, NT, C: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                       PRECISION: tl.constexpr, LATE_LOADS: tl.constexpr = False):
    """The reverse scan: the gradient of the state leaving each chunk, the rest of dU, and d
    initial_state.

    Program: one (batch b, value head hv) and one V-tile of its [K, V] state gradient. Grid (cdiv(V,
    BV), B · HV).
    Tiling: dS lives in fp32 registers as two halves of BK/2 rows (BK ≥ 32), as the forward scan
    holds S; a step loads K [C, BK/2], Qᵀ and Wᵀ [BK/2, C] per half, and dO, dU [C, BV].
    Math, chunks n = NT−1 … 0 (dS = dht if HAS_DHT else 0; du holds scale (Q Kᵀ ⊙ Γ)ᵀ dO on entry,
    from _bwd_du_local_kernel, and is updated in place):
        dstates[n] = dS;   dU += diag(e^{G_L − G}) K dS;   dS ← e^{G_L} dS + scale (diag(e^G)
            Q)ᵀ dO − Wᵀ dU
    and dh0 = dS after chunk 0 if STORE_DH0.
    LATE_LOADS (a T4's launch-table rows): the same products in the same order, each operand loaded
    right before its product, so that shared memory holds one operand tile at a time (24 against 72
    KiB at K = 128 on sm_75, whose blocks get 64); elsewhere the loads come first, as measured.
    """
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    q_bh = q_ptr + (b * T * H + h) * K  # token t's rows of q and k at + t·H·K
    k_bh = k_ptr + (b * T * H + h) * K
    w_bh = w_ptr + (b * T * HV + hv) * K  # token t's row of W at + t·HV·K
    do_bh = do_ptr + (b * T * HV + hv) * V  # token t's rows of dO and dU at + t·HV·V
    du_bh = du_ptr + (b * T * HV + hv) * V
    dstates_bh = dstates_ptr + bh * NT * K * V  # chunk n's [K, V] at + n·K·V
    rows = tl.arange(0, C)
    # dS = [dS1; dS2]
    k1, k2, vs, kv_mask1, kv_mask2, kv_off1, kv_off2 = _state_halves(iv, K, V, BK, BV)
    dS1 = tl.zeros((BK // 2, BV), dtype=tl.float32)
    dS2 = tl.zeros((BK // 2, BV), dtype=tl.float32)
    if HAS_DHT:
        dS1 = tl.load(dht_ptr + bh * K * V + kv_off1, mask=kv_mask1, other=0.0).to(tl.float32)
        dS2 = tl.load(dht_ptr + bh * K * V + kv_off2, mask=kv_mask2, other=0.0).to(tl.float32)
    for i in range(NT):
        n = NT - 1 - i
        tl.store(dstates_bh + n * K * V + kv_off1, dS1, mask=kv_mask1)
        tl.store(dstates_bh + n * K * V + kv_off2, dS2, mask=kv_mask2)
        t = (n * C + rows).to(tl.int64)  # int64: t·H·K passes 2^31 at long context
        tm = t < T
        g = tl.load(g_ptr + b * T * HV + hv + t * HV, mask=tm, other=0.0)  # [C], 0 past T
        G, _, to_end, G_L = _gate_sums(g, C)
        key_decay = tl.where(tm, tl.exp(to_end), 0.0)  # [C] e^{G_L − G_j}
        m1, m2 = tm[:, None] & (k1[None, :] < K), tm[:, None] & (k2[None, :] < K)
        if LATE_LOADS:
            v_off = t[:, None] * HV * V + vs[None, :]
            v_mask = tm[:, None] & (vs[None, :] < V)
            qs = scale * tl.exp(G)[None, :]  # [1, C] scale e^{G_i}
            du = tl.load(du_bh + v_off, mask=v_mask, other=0.0)  # [C, BV] the local part
            kd1 = tl.load(k_bh + t[:, None] * H * K + k1[None, :], mask=m1,
                          other=0.0).to(tl.float32) * key_decay[:, None]
            du = tl.dot(kd1, dS1, du, input_precision=PRECISION)
            kd2 = tl.load(k_bh + t[:, None] * H * K + k2[None, :], mask=m2,
                          other=0.0).to(tl.float32) * key_decay[:, None]
            du = tl.dot(kd2, dS2, du, input_precision=PRECISION)
            tl.store(du_bh + v_off, du, mask=v_mask)
            do = tl.load(do_bh + v_off, mask=v_mask, other=0.0).to(tl.float32)  # [C, BV]
            dS1 = _late_dstate_half(dS1, tl.exp(G_L), q_bh, w_bh, k1, t, tm, qs, do, du, H, HV, K,
                                    PRECISION)
            dS2 = _late_dstate_half(dS2, tl.exp(G_L), q_bh, w_bh, k2, t, tm, qs, do, du, H, HV, K,
                                    PRECISION)
        else:
            kd1 = tl.load(k_bh + t[:, None] * H * K + k1[None, :], mask=m1,
                          other=0.0).to(tl.float32) * key_decay[:, None]
            kd2 = tl.load(k_bh + t[:, None] * H * K + k2[None, :], mask=m2,
                          other=0.0).to(tl.float32) * key_decay[:, None]
            v_off = t[:, None] * HV * V + vs[None, :]
            v_mask = tm[:, None] & (vs[None, :] < V)
            du = tl.load(du_bh + v_off, mask=v_mask, other=0.0)  # [C, BV] the local part
            du = tl.dot(kd2, dS2, tl.dot(kd1, dS1, du, input_precision=PRECISION),
                        input_precision=PRECISION)
            tl.store(du_bh + v_off, du, mask=v_mask)
            do = tl.load(do_bh + v_off, mask=v_mask, other=0.0).to(tl.float32)  # [C, BV]
            mT1, mT2 = (k1[:, None] < K) & tm[None, :], (k2[:, None] < K) & tm[None, :]
            qs = scale * tl.exp(G)[None, :]  # [1, C] scale e^{G_i}
            qT1 = tl.load(q_bh + t[None, :] * H * K + k1[:, None], mask=mT1,
                          other=0.0).to(tl.float32) * qs
            qT2 = tl.load(q_bh + t[None, :] * H * K + k2[:, None], mask=mT2,
                          other=0.0).to(tl.float32) * qs
            wT1 = tl.load(w_bh + t[None, :] * HV * K + k1[:, None], mask=mT1, other=0.0)
            wT2 = tl.load(w_bh + t[None, :] * HV * K + k2[:, None], mask=mT2, other=0.0)
            dS1 = tl.dot(qT1, do, dS1 * tl.exp(G_L),
                         input_precision=PRECISION) - tl.dot(wT1, du, input_precision=PRECISION)
            dS2 = tl.dot(qT2, do, dS2 * tl.exp(G_L),
                         input_precision=PRECISION) - tl.dot(wT2, du, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0_ptr + bh * K * V + kv_off1, dS1, mask=kv_mask1)
        tl.store(dh0_ptr + bh * K * V + kv_off2, dS2, mask=kv_mask2)


# %% [markdown]
# The summation rule for $dg$. It is linear in its terms, so a kernel may apply it to its share of them (one block of
# key channels) and the shares' results add up to $dg$:

# %%
#| export deltanet.chunk_bwd
@triton.jit
def _gate_grad(pairs, s, c, z, tm, C: tl.constexpr):
    """dg [C] of one chunk, each term summed into exactly the gates it contains:
        pairs [C, C]  m_ij = ∂L/∂Γ_ij · Γ_ij (j < i; 0 elsewhere), Γ_ij = e^{g_{j+1} + … + g_i}
            -> dg_t, j < t ≤ i
        s [C]         terms with a factor e^{G_i}, G_i = g_0 + … + g_i
            -> dg_t, t ≤ i
        c [C]         terms with a factor e^{G_L − G_j}
            -> dg_t, j < t
        z             the term with e^{G_L}
            -> every dg_t
    Every term that reaches dg_t carries e^{g_t}, so a very negative g_t gets a gradient as
        small, and as accurate,
    as its terms. (∂L/∂G followed by a reverse cumulative sum gives the same sums
        mathematically, but there dg_t comes
    out as a difference of O(1) numbers, wrong in every digit once e^{g_t} is below float32's
        rounding.)
    """
    rows = tl.arange(0, C)
    R = tl.cumsum(pairs, axis=0, reverse=True)  # [C, C] R_tj = Σ_{i ≥ t} m_ij
    # row t: Σ_{j < t} Σ_{i ≥ t} m_ij
    dg = tl.sum(tl.where(rows[None, :] < rows[:, None], R, 0.0), axis=1)
    dg += tl.cumsum(s, axis=0, reverse=True)  # Σ_{i ≥ t} s_i
    dg += tl.sum(tl.where(rows[:, None] < rows[None, :], c[:, None], 0.0), axis=0)  # Σ_{j < t} c_j
    return tl.where(tm, dg + z, 0.0)


# %% [markdown]
# `_bwd_wy_kernel` does what needs all of a chunk's channels at once: $dV$, and everything that flows through $A$.
# Its $dA_\text{inv}$ uses $dW = -dU\,S^\top$ to fold the two terms into one product over $V$:
# $dW (\operatorname{diag}(\beta e^G) K)^\top + d\tilde U (\operatorname{diag}(\beta) V)^\top
# = dU\, R^\top$ with $R = \operatorname{diag}(\beta)(V - \operatorname{diag}(e^G) K S)$, so it needs $K S$
# (a $C \times V$ product) but no $dW$. Then $dA$, and from it $A$'s terms of $dK$ (stored, for the keys kernel to
# add), of $d\beta$ and of $dg$.

# %%
#| export deltanet.chunk_bwd
@triton.jit
def _chunk_gates(g_ptr, beta_ptr, gate_bh, n, T, HV, C: tl.constexpr):
    """Chunk n's rows and gates: (rows, t, tm, β, G, G64, to_end, G_L), as _gate_sums gives
    them; g and β 0 past T."""
    rows = tl.arange(0, C)
    t = n * C + rows
    tm = t < T
    g = tl.load(g_ptr + gate_bh + t * HV, mask=tm, other=0.0)  # [C]
    beta = tl.load(beta_ptr + gate_bh + t * HV, mask=tm, other=0.0)
    G, G64, to_end, G_L = _gate_sums(g, C)
    return rows, t, tm, beta, G, G64, to_end, G_L


@triton.jit
def _bwd_wy_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, ainv_ptr, du_ptr, states_ptr, dv_ptr, dk_ptr,
                   dbeta_ptr, dg_ptr, T, H, HV, K, V, NT, C: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, PRECISION: tl.constexpr):
    """dV, and what flows through Ũ and A: dK's terms through A (stored in dk, per value head,
    fp32, for _bwd_keys_kernel to add to), and shares of dβ and dg (slot 0 of dbeta_ptr, dg_ptr).

    Program: one chunk n of one (batch b, value head hv). Grid (NT, B · HV).
    Tiling: A_inv, dA_inv, dA, K Kᵀ [C, C] in registers; V-tiles [C, BV] of V and dU with K-blocks
    [C, BK] and the state's [BK, BV] inside; then K-blocks [C, BK] again.
    Math (S_n: the state entering chunk n; A_ij = β_i Γ_ij k_i·k_j):
        R = diag(β) (V − diag(e^G) K S_n),  dA_inv = dU Rᵀ
        dV = diag(β) A_invᵀ dU,  dβ += Σ_v (A_invᵀ dU) ⊙ V
        dA = −A_invᵀ dA_inv A_invᵀ, strictly lower, ⊙ Γ   (∂L/∂A_ij · Γ_ij)
        dK = dKK K + dKKᵀ K with dKK = diag(β) dA;  m_ij = β_i dA_ij (k_i·k_j) -> dβ_i += Σ_j
            m_ij / β_i, dg (_gate_grad, pair terms only)
    """
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    t0 = (n * C).to(tl.int64)  # the chunk's first token, int64: t·H·K passes 2^31 at long context
    k_c = k_ptr + (b * T * H + h) * K + t0 * H * K  # the chunk's row i of k at + i·H·K
    vh = (b * T * HV + hv) * V + t0 * HV * V  # of v, dU, dV at + i·HV·V
    gate_bh = b * T * HV + hv  # token t's g, β, dβ, dg at + t·HV
    S_n = states_ptr + (bh * NT + n) * K * V
    rows, t, tm, beta, G, G64, _, _ = _chunk_gates(g_ptr, beta_ptr, gate_bh, n, T, HV, C)
    eG = tl.exp(G)
    A_inv = tl.load(ainv_ptr + (gate_bh + t[:, None] * HV) * C + rows[None, :], mask=tm[:, None],
                    other=0.0)
    dA_inv = tl.zeros((C, C), dtype=tl.float32)
    dbeta = tl.zeros((C,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        off = rows[:, None] * HV * V + vs[None, :]
        mask = tm[:, None] & (vs[None, :] < V)
        v = tl.load(v_ptr + vh + off, mask=mask, other=0.0).to(tl.float32)  # [C, BV]
        du = tl.load(du_ptr + vh + off, mask=mask, other=0.0)
        KS = tl.zeros((C, BV), dtype=tl.float32)  # K S_n, this V-tile
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = tm[:, None] & (ks[None, :] < K)
            k = tl.load(k_c + rows[:, None] * H * K + ks[None, :], mask=k_mask,
                        other=0.0).to(tl.float32)  # [C, BK]
            S = tl.load(S_n + ks[:, None] * V + vs[None, :],
                        mask=(ks[:, None] < K) & (vs[None, :] < V), other=0.0)  # [BK, BV]
            KS = tl.dot(k, S, KS, input_precision=PRECISION)
        R = (v - KS * eG[:, None]) * beta[:, None]
        dA_inv = tl.dot(du, tl.trans(R), dA_inv, input_precision=PRECISION)
        Adu = tl.dot(tl.trans(A_inv), du, input_precision=PRECISION)  # [C, BV] ∂/∂(diag(β) V)
        tl.store(dv_ptr + vh + off, Adu * beta[:, None], mask=mask)
        dbeta += tl.sum(Adu * v, axis=1)
    causal = (rows[:, None] >= rows[None, :]) & tm[:, None]
    Gamma = tl.exp(tl.where(causal, _pair_exponents(G64), float("-inf")))  # [C, C]
    dA = tl.dot(tl.dot(tl.trans(A_inv), dA_inv, input_precision=PRECISION), tl.trans(A_inv),
                input_precision=PRECISION)
    lower = rows[:, None] > rows[None, :]
    dA = tl.where(lower, -dA, 0.0) * Gamma  # ∂L/∂A_ij · Γ_ij
    dKK = dA * beta[:, None]  # ∂L/∂(k_i·k_j)
    KK = tl.zeros((C, C), dtype=tl.float32)  # K Kᵀ
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = tm[:, None] & (ks[None, :] < K)
        k = tl.load(k_c + rows[:, None] * H * K + ks[None, :], mask=k_mask,
                    other=0.0).to(tl.float32)  # [C, BK]
        KK = tl.dot(k, tl.trans(k), KK, input_precision=PRECISION)
        dk = tl.dot(tl.trans(dKK), k, tl.dot(dKK, k, input_precision=PRECISION),
                    input_precision=PRECISION)
        tl.store(dk_ptr + (gate_bh + t[:, None] * HV) * K + ks[None, :], dk, mask=k_mask)
    M = dA * KK  # ∂L/∂A_ij · A_ij / β_i
    dbeta += tl.sum(M, axis=1)
    dg = _gate_grad(M * beta[:, None], tl.zeros((C,), dtype=tl.float32),
                    tl.zeros((C,), dtype=tl.float32), 0.0, tm, C)
    tl.store(dbeta_ptr + gate_bh + t * HV, dbeta, mask=tm)
    tl.store(dg_ptr + gate_bh + t * HV, dg, mask=tm)


# %% [markdown]
# `_bwd_keys_kernel` does the rest, one block of `BK` key channels a program, so that no $C \times K$ accumulator has
# to stay in registers (three of them at $K = 128$ would spill) and a chunk's work spreads over $K / $`BK` programs.
# Each program walks the chunk's $V$ in tiles for $dO\,S^\top$, $U\,dS'^\top$, $dW$ and $dO\,U^\top$ (the last is the
# same for every block: each program recomputes it rather than reading it back), then adds the terms through the
# output and through $A_\text{inv}$ to what `_bwd_wy_kernel` stored in $dk$, and stores its block of $dq$ and $dk$
# complete, with its shares of $d\beta$ and $dg$.

# %%
#| export deltanet.chunk_bwd
@triton.jit
def _bwd_keys_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, ainv_ptr, u_ptr, states_ptr, dstates_ptr,
                     do_ptr, du_ptr, dq_ptr, dk_ptr, dbeta_ptr, dg_ptr, scale, T, H, HV, K, V, NT,
                     SLOT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     PRECISION: tl.constexpr):
    """dq and dk (per value head, fp32; dk adds to A's terms, stored by _bwd_wy_kernel) of one
    block of key channels, and that block's shares of dβ and dg (slot kb of dbeta_ptr and dg_ptr,
    slots SLOT = B·T·HV apart).

    Program: key channels kb·BK … of chunk n of one (batch b, value head hv). Grid (cdiv(K, BK),
    NT, B · HV).
    Tiling: Q, K, dQ, dK [C, BK]; V-tiles [C, BV] of dO, U, dU with the state's and its
    gradient's [BK, BV]; the [C, C] matrices (A_inv, dO Uᵀ, the gate terms m_ij) in registers.
    Math (chapter 5, Engineering notes, the backward pass; dS' = dstates[n], the gradient of the
    state leaving the chunk):
        dQ = scale (diag(e^G) dO S_nᵀ + (dO Uᵀ ⊙ Γ) K)
        dK += scale (dO Uᵀ ⊙ Γ)ᵀ Q + diag(e^{G_L − G}) U dS'ᵀ + diag(β e^G) A_invᵀ dW,
            dW = −dU S_nᵀ
    and the gate terms for _gate_grad: m_ij = dAqk_ij (q_i·k_j) of the output's Γ_ij, s_i
    (factors e^{G_i}), c_j (factors e^{G_L − G_j}), Σ S_n ⊙ dS' (the factor e^{G_L}), each over
    this block's channels only.
    """
    kb = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    t0 = (n * C).to(tl.int64)  # the chunk's first token, int64: t·H·K passes 2^31 at long context
    vh = (b * T * HV + hv) * V + t0 * HV * V  # the chunk's row i of U, dO, dU at + i·HV·V
    gate_bh = b * T * HV + hv  # token t's g, β at + t·HV
    S_n = states_ptr + (bh * NT + n) * K * V  # the state entering chunk n
    dS_n = dstates_ptr + (bh * NT + n) * K * V  # the gradient of the state leaving it
    rows, t, tm, beta, G, G64, to_end, G_L = _chunk_gates(g_ptr, beta_ptr, gate_bh, n, T, HV, C)
    eG = tl.exp(G)
    key_decay = tl.where(tm, tl.exp(to_end), 0.0)  # [C] e^{G_L − G_j}
    ks = kb * BK + tl.arange(0, BK)
    qk_off = (b * T * H + h) * K + t0 * H * K + rows[:, None] * H * K + ks[None, :]
    qk_mask = tm[:, None] & (ks[None, :] < K)
    q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)  # [C, BK]
    k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
    dOUt = tl.zeros((C, C), dtype=tl.float32)
    dq = tl.zeros((C, BK), dtype=tl.float32)  # dO S_nᵀ
    dk_state = tl.zeros((C, BK), dtype=tl.float32)  # U dS'ᵀ
    dw = tl.zeros((C, BK), dtype=tl.float32)  # −dU S_nᵀ
    SdS = tl.zeros((1,), dtype=tl.float32)  # Σ S_n ⊙ dS' over this block
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        off = vh + rows[:, None] * HV * V + vs[None, :]
        mask = tm[:, None] & (vs[None, :] < V)
        kv_off = ks[:, None] * V + vs[None, :]
        kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
        do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [C, BV]
        u = tl.load(u_ptr + off, mask=mask, other=0.0)
        du = tl.load(du_ptr + off, mask=mask, other=0.0)
        S = tl.load(S_n + kv_off, mask=kv_mask, other=0.0)  # [BK, BV]
        dS = tl.load(dS_n + kv_off, mask=kv_mask, other=0.0)
        dOUt = tl.dot(do, tl.trans(u), dOUt, input_precision=PRECISION)
        dq = tl.dot(do, tl.trans(S), dq, input_precision=PRECISION)
        dk_state = tl.dot(u, tl.trans(dS), dk_state, input_precision=PRECISION)
        dw = dw - tl.dot(du, tl.trans(S), input_precision=PRECISION)
        SdS += tl.sum(tl.sum(S * dS, axis=1), axis=0)
    # ∂L/∂(q_i·k_j): o_i = scale (e^{G_i} q_i S + Σ_j Γ_ij (q_i·k_j) u_j)
    causal = (rows[:, None] >= rows[None, :]) & tm[:, None]
    dAqk = dOUt * scale * tl.exp(tl.where(causal, _pair_exponents(G64), float("-inf")))
    dq = dq * (scale * eG)[:, None]
    s = tl.sum(dq * q, axis=1)  # q_i · ∂/∂q_i of e^{G_i} q_i S
    out_off = (b * T * HV + hv) * K + t0 * HV * K + rows[:, None] * HV * K + ks[None, :]
    tl.store(dq_ptr + out_off, tl.dot(dAqk, k, dq, input_precision=PRECISION), mask=qk_mask)
    pairs = dAqk * tl.dot(q, tl.trans(k), input_precision=PRECISION)
    # state update: S' = e^{G_L} S + Σ_j e^{G_L − G_j} k_jᵀ u_j
    dk_state = dk_state * key_decay[:, None]
    c = tl.sum(dk_state * k, axis=1)
    dk = tl.dot(tl.trans(dAqk), q, dk_state, input_precision=PRECISION)
    # W = A_inv diag(β e^G) K
    A_inv = tl.load(ainv_ptr + (gate_bh + t[:, None] * HV) * C + rows[None, :], mask=tm[:, None],
                    other=0.0)
    Adw = tl.dot(tl.trans(A_inv), dw, input_precision=PRECISION)  # ∂/∂(diag(β e^G) K)
    dk += Adw * (beta * eG)[:, None]
    kTdw = tl.sum(Adw * k, axis=1)
    s += kTdw * beta * eG  # W's e^{G_i}
    dk += tl.load(dk_ptr + out_off, mask=qk_mask, other=0.0)  # A's terms, from _bwd_wy_kernel
    tl.store(dk_ptr + out_off, dk, mask=qk_mask)
    # the diagonal's Γ_ii = 1 holds no gate: only j < i enters dg
    lower = rows[:, None] > rows[None, :]
    dg = _gate_grad(tl.where(lower, pairs, 0.0), s, c, tl.sum(SdS, axis=0) * tl.exp(G_L), tm, C)
    slot = kb.to(tl.int64) * SLOT + gate_bh + t * HV
    tl.store(dbeta_ptr + slot, kTdw * eG, mask=tm)
    tl.store(dg_ptr + slot, dg, mask=tm)


# %% [markdown]
# The two row kernels of the backward: `l2norm` of $q$ and $k$ before the recomputation, and, at the end, the sum
# over grouped value heads and the normalisation's gradient.

# %%
#| export deltanet.chunk_bwd
@triton.jit
def _l2norm_rows_kernel(x_ptr, y_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr):
    """y = l2norm(x) for rows of x [R, K], in fp32, rounded back to x's dtype (as `l2norm` and a
    cast would).

    Program: BR rows, all of K in one tile (BK = K padded). Grid (cdiv(R, BR),).
    Math: y = x · rsqrt(Σ x² + 1e-6).
    """
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    ks = tl.arange(0, BK)
    off, mask = rows[:, None] * K + ks[None, :], (rows[:, None] < R) & (ks[None, :] < K)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [BR, BK]
    y = x * tl.rsqrt(tl.sum(x * x, axis=1)[:, None] + 1e-6)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_grad_kernel(x_ptr, dy_ptr, dx_ptr, R, GROUP, K, BR: tl.constexpr, BK: tl.constexpr,
                    L2NORM: tl.constexpr):
    """dq or dk from the per-value-head gradients: summed over the GROUP = HV/H value heads that
    share key head h, then through l2norm if L2NORM.

    Program: BR rows r = (b·T + t)·H + h of x [R, K], all of K in one tile. Grid (cdiv(R, BR),).
    Math: dy = Σ_j dy[r·GROUP + j] (fp32);  L2NORM: dx = rstd (dy − y ⟨y, dy⟩), y = rstd x, rstd
        = rsqrt(Σ x² + 1e-6);
    stored in dx's dtype.
    """
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    ks = tl.arange(0, BK)
    mask = (rows[:, None] < R) & (ks[None, :] < K)
    dy = tl.zeros((BR, BK), dtype=tl.float32)
    for j in range(GROUP):
        dy += tl.load(dy_ptr + (rows[:, None] * GROUP + j) * K + ks[None, :], mask=mask, other=0.0)
    if L2NORM:
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)  # [BR]
        y = x * rstd[:, None]
        dy = rstd[:, None] * (dy - y * tl.sum(y * dy, axis=1)[:, None])
    tl.store(dx_ptr + rows[:, None] * K + ks[None, :], dy.to(dx_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# ### Decoding: one program per state tile, token by token
#
# For a handful of tokens from a state, the chunk machinery is overhead: `fused_recurrent_gated_delta_rule` keeps a
# `[K, BV]` tile of the state in registers and runs the recurrence of section 5.2 directly — decay, read
# $k_t S$ (a reduction over $K$), write, read the output — one token after another. Forward only.

# %%
#| export deltanet.fused_recurrent
import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime
from minisparse.deltanet.chunk import _check_kernel_inputs
from minisparse.deltanet.chunk_fwd import _heads, _options, _pow2, _v_tile


@triton.jit
def _fused_recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, o_ptr, ht_ptr, scale, T,
                            H, HV, K, V, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                            STORE_HT: tl.constexpr, L2NORM: tl.constexpr):
    """The gated delta rule token by token, for decoding.

    Program: one (batch b, value head hv) and one V-tile of its state. Grid (cdiv(V, BV), B · HV).
    Tiling: the state tile S [BK, BV] (all of K, padded) stays in fp32 registers for the whole
    sequence; a step loads one row of q, k [BK] and v [BV].
    Math, t = 0 … T−1 (S = h0 if HAS_H0 else 0; L2NORM: q_t, k_t normalised first):
        S ← e^{g_t} S;   S ← S + k_tᵀ β_t (v_t − k_t S);   o_t = scale · q_t S
    and ht = S if STORE_HT.
    """
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hv, h = _heads(bh, H, HV)
    q_bh = q_ptr + (b * T * H + h) * K  # token t's rows of q and k at + t·H·K
    k_bh = k_ptr + (b * T * H + h) * K
    v_bh = v_ptr + (b * T * HV + hv) * V  # token t's rows of v and o at + t·HV·V
    o_bh = o_ptr + (b * T * HV + hv) * V
    gate_bh = b * T * HV + hv  # token t's g and β at + t·HV
    ks, vs = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    km, vm = ks < K, vs < V
    kv_off = ks[:, None] * V + vs[None, :]
    S = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0_ptr + bh * K * V + kv_off, mask=km[:, None] & vm[None, :],
                    other=0.0).to(tl.float32)
    for i in range(T):
        t = tl.cast(i, tl.int64)  # int64: t·H·K passes 2^31 at long context
        q = tl.load(q_bh + t * H * K + ks, mask=km, other=0.0).to(tl.float32)  # [BK]
        k = tl.load(k_bh + t * H * K + ks, mask=km, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
        v = tl.load(v_bh + t * HV * V + vs, mask=vm, other=0.0).to(tl.float32)  # [BV]
        g = tl.load(g_ptr + gate_bh + t * HV).to(tl.float32)
        beta = tl.load(beta_ptr + gate_bh + t * HV).to(tl.float32)
        S = S * tl.exp(g)
        err = v - tl.sum(k[:, None] * S, axis=0)  # [BV] v_t − k_t S
        S = S + k[:, None] * (beta * err)[None, :]
        o = tl.sum(q[:, None] * S, axis=0) * scale  # [BV]
        tl.store(o_bh + t * HV * V + vs, o.to(o_ptr.dtype.element_ty), mask=vm)
    if STORE_HT:
        tl.store(ht_ptr + bh * K * V + kv_off, S, mask=km[:, None] & vm[None, :])


# %% [markdown]
# ### Launch and autograd
#
# Every launch goes through `runtime.launch` with its row of `runtime.LAUNCH_TABLE` (`"deltanet.fwd_wy"`,
# `"deltanet.fwd_states"`, …): the table lists configurations best first per GPU architecture, `launch` keeps the
# first that fits the GPU's shared memory (a Colab T4 gives a block 64 KiB, an H200 227 KiB), and `fit` caps a
# $V$-tile at the padded $V$. When none fits, the error names the kernel and points to
# `naive_chunk_gated_delta_rule`. A row may also choose a variant of the code: the backward's reverse scan at
# $K = 128$ needs 72 KiB of shared memory on a T4 by the compiler's count when it loads its four operand tiles
# first, as it does on Ampere and Hopper (the sm_80 row), and 24 KiB when each is loaded right before its product
# (`LATE_LOADS`, the T4's row). The two scans and the keys kernel are never autotuned: they update $U$, $dU$ and
# $dk$ in place, and the autotuner's repeated runs
# would apply the update twice.
#
# The forward's host side: kernels 1 and 2, which the backward reruns in fp32, then the output kernel.

# %%
#| export deltanet.chunk_fwd
def _wy_and_states(k, v, g, beta, h0, output_final_state, l2, recompute):
    """Kernels 1 and 2 -> (w, u, kr, ainv, states, ht): W; U (written over Ũ); kr = 1/‖k‖ [B, T, HV]
    if `l2` (k is then unnormalised), else None; A_inv's rows [B, T, HV, C] if `recompute`, else
    None; the chunk states [B, HV, NT, K, V]; the final state [B, HV, K, V] fp32 or None.

    The forward stores W, U and the states in the inputs' dtype (as fla does: half the bytes in 16
    bits); the backward's recomputation (`recompute`) stores them in fp32, with A_inv, for the
    gradients. The scans accumulate in fp32 and multiply in W's dtype.
    """
    B, T, H, K = k.shape
    HV, V = v.shape[2:]
    NT = triton.cdiv(T, _C)
    dev, prec = k.device, _precision(k.dtype)
    store = torch.float32 if recompute else k.dtype
    w = torch.empty(B, T, HV, K, device=dev, dtype=store)
    u = torch.empty(B, T, HV, V, device=dev, dtype=store)
    # per value head, as g is
    kr = torch.empty(B, T, HV, device=dev, dtype=torch.float32) if l2 else None
    ainv = torch.empty(B, T, HV, _C, device=dev, dtype=torch.float32) if recompute else None
    runtime.launch("deltanet.fwd_wy", _fwd_wy_kernel, lambda c: (NT, B * HV),
                   (k, v, g, beta, w, u, kr, ainv, T, H, HV, K, V),
                   dict(C=_C, BK=min(_pow2(K), _WY_COLUMNS), SPLIT=k.dtype == torch.bfloat16, L2=l2,
                        STORE_AINV=recompute, PRECISION=prec),
                   fit=_v_tile(V), autotune_key=["T", "K", "V"], **_options(k, v))
    states = torch.empty(B, HV, NT, K, V, device=dev, dtype=store)
    ht = torch.empty(B, HV, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    # never autotuned: the scan writes U over Ũ, and the autotuner's repeated runs would subtract W
    # S twice
    runtime.launch("deltanet.fwd_states.recompute" if recompute else "deltanet.fwd_states",
                   _fwd_states_kernel, lambda c: (triton.cdiv(V, c["BV"]), B * HV),
                   (k, w, u, g, kr, h0, states, ht, T, H, HV, K, V, NT),
                   dict(C=_C, BK=max(_pow2(K), 32), HAS_H0=h0 is not None, STORE_HT=ht is not None,
                        L2=l2, PRECISION=prec), fit=_v_tile(V), **_options(k, v))
    return w, u, kr, ainv, states, ht


def _chunk_forward(q, k, v, g, beta, scale, h0, output_final_state, l2):
    """The three forward kernels -> (o [B, T, HV, V] in q's dtype, final state fp32 or None). With
    `l2`, q and k are used as given and their normalisation is applied inside the kernels, as fp32
    scalings."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    NT = triton.cdiv(T, _C)
    w, u, kr, _, states, ht = _wy_and_states(k, v, g, beta, h0, output_final_state, l2,
                                             recompute=False)
    o = torch.empty(B, T, HV, V, device=q.device, dtype=q.dtype)
    runtime.launch("deltanet.fwd_output", _fwd_output_kernel,
                   lambda c: (triton.cdiv(V, c["BV"]), NT, B * HV),
                   (q, k, u, g, kr, states, o, scale, T, H, HV, K, V, NT),
                   dict(C=_C, BK=min(_pow2(K), _OUTPUT_COLUMNS), L2=l2,
                        PRECISION=_precision(q.dtype)), fit=_v_tile(V),
                   autotune_key=["T", "K", "V"], **_options(q, v))
    return o, ht


# %% [markdown]
# The backward's host side, then the op: its checks (shapes, dtypes, devices and the kernels' limits always; the
# values of $g$ and $\beta$ on CPU tensors, and on CUDA tensors after `runtime.set_value_checks(True)`, before any
# kernel is queued), and the autograd glue.

# %%
#| export deltanet.chunk_bwd
def _l2norm_rows(x):
    """l2norm(x) over the last dimension in x's dtype, in one kernel (PyTorch's l2norm takes
    several)."""
    y = torch.empty_like(x)
    R, K = x.numel() // x.shape[-1], x.shape[-1]
    runtime.launch("deltanet.rows", _l2norm_rows_kernel, lambda c: (triton.cdiv(R, c["BR"]),),
                   (x, y, R, K), dict(BK=_pow2(K)), **_options(x, x))
    return y


def _qk_grad(x, dy, l2):
    """x [B, T, H, K] (q or k as given), dy [B, T, HV, K] float32 (per value head) -> dx [B, T, H,
    K] in x's dtype."""
    dx = torch.empty_like(x)
    R, K = x.numel() // x.shape[-1], x.shape[-1]
    runtime.launch("deltanet.rows", _qk_grad_kernel, lambda c: (triton.cdiv(R, c["BR"]),),
                   (x, dy, dx, R, dy.shape[2] // x.shape[2], K), dict(BK=_pow2(K), L2NORM=l2),
                   **_options(x, x))
    return dx


def _k_and_v_tiles(K, V):
    """runtime.launch's `fit` for the kernels that tile K and V: tiles no wider than the padded
    dimensions."""
    return lambda c: dict(c, BK=min(c["BK"], _pow2(K)), BV=min(c["BV"], _pow2(V)))


def _chunk_backward(q, k, v, g, beta, scale, h0, do, dht, l2, need_dh0):
    """Gradients of q, k (in q's dtype, summed over grouped value heads), v, g, beta and h0
        (fp32; dh0 None unless
    `need_dh0`). Recomputes W, U and the chunk states in fp32 (cheaper in memory than keeping
        the forward's)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    NT = triton.cdiv(T, _C)
    dev, prec = q.device, _precision(q.dtype)
    q_raw, k_raw = q, k
    if l2:  # the backward's kernels take unit rows, in the input dtype
        q, k = _l2norm_rows(q), _l2norm_rows(k)
    w, u, _, ainv, states, _ = _wy_and_states(k, v, g, beta, h0, False, l2=False, recompute=True)
    du = torch.empty(B, T, HV, V, device=dev, dtype=torch.float32)
    dstates = torch.empty(B, HV, NT, K, V, device=dev, dtype=torch.float32)
    dh0 = torch.empty(B, HV, K, V, device=dev, dtype=torch.float32) if need_dh0 else None
    runtime.launch("deltanet.bwd_du_local", _bwd_du_local_kernel, lambda c: (NT, B * HV),
                   (q, k, g, do, du, scale, T, H, HV, K, V),
                   dict(C=_C, BK=_pow2(K), PRECISION=prec), fit=_v_tile(V),
                   autotune_key=["T", "K", "V"], **_options(q, v))
    # never autotuned: the reverse scan adds to dU in place
    runtime.launch("deltanet.bwd_states", _bwd_states_kernel,
                   lambda c: (triton.cdiv(V, c["BV"]), B * HV),
                   (q, k, w, g, do, dht, du, dstates, dh0, scale, T, H, HV, K, V, NT),
                   dict(C=_C, BK=max(_pow2(K), 32), HAS_DHT=dht is not None,
                        STORE_DH0=dh0 is not None, PRECISION=prec), fit=_v_tile(V),
                   **_options(q, v))
    dv = torch.empty(B, T, HV, V, device=dev, dtype=torch.float32)
    dq, dk = (torch.empty(B, T, HV, K, device=dev, dtype=torch.float32) for _ in range(2))
    # dβ's and dg's shares: slot 0 _bwd_wy_kernel's, then one a block of key channels (BK ≥ 16,
    # tl.dot's least)
    dbeta = torch.empty(1 + triton.cdiv(K, 16), B, T, HV, device=dev, dtype=torch.float32)
    dg = torch.empty_like(dbeta)
    runtime.launch("deltanet.bwd_wy", _bwd_wy_kernel, lambda c: (NT, B * HV),
                   (k, v, g, beta, ainv, du, states, dv, dk, dbeta, dg, T, H, HV, K, V, NT),
                   dict(C=_C, PRECISION=prec), fit=_k_and_v_tiles(K, V),
                   autotune_key=["T", "K", "V"], **_options(q, v))
    # never autotuned: it adds to dk in place
    keys = runtime.launch("deltanet.bwd_keys", _bwd_keys_kernel,
                          lambda c: (triton.cdiv(K, c["BK"]), NT, B * HV),
                          (q, k, g, beta, ainv, u, states, dstates, do, du, dq, dk, dbeta[1:],
                           dg[1:], scale, T, H, HV, K, V, NT, B * T * HV),
                          dict(C=_C, PRECISION=prec), fit=_k_and_v_tiles(K, V), **_options(q, v))
    nk = triton.cdiv(K, keys["BK"])
    dbeta, dg = dbeta[:1 + nk].sum(0), dg[:1 + nk].sum(0)
    return _qk_grad(q_raw, dq, l2), _qk_grad(k_raw, dk, l2), dv, dg, dbeta, dh0


# %%
#| export deltanet.chunk
import torch

from minisparse import _checks
from minisparse.deltanet.chunk_bwd import _chunk_backward
from minisparse.deltanet.chunk_fwd import _INSTEAD, _chunk_forward
from minisparse.deltanet.naive import _check_delta, _check_gate_and_beta, _check_l2norm_range


def _check_kernel_inputs(op, q, k, v, g, beta, scale, initial_state, check_values, max_dim, l2, *,
                         shapes=_check_delta, instead=_INSTEAD):
    """The arguments' checks by `shapes` (_check_delta here; chapter 6 passes _check_kda) with the
    kernels' dtypes (fp32, fp16, bf16: no fp64), then what the kernels need (CUDA tensors or the
    interpreter, no bf16 under the interpreter, K and V ≤ max_dim; `instead` names the PyTorch
    path), then g's and β's values (and with `l2`, q's and k's range) where `check_values` and the
    value-check rule ask for them (on CPU tensors always; on CUDA after
    runtime.set_value_checks(True)), before any kernel is queued.
    Returns the scale as a float."""
    scale = shapes(op, q, k, v, g, beta, scale, initial_state, check_values=False,
                   dtypes=_checks.KERNEL_FLOATS)
    _checks.triton_inputs(op, q, k, v, g, beta, initial_state, instead=instead,
                          max_dims={"K": (q.shape[-1], max_dim), "V": (v.shape[-1], max_dim)})
    if check_values and _checks.checking_values(False, q):
        _check_gate_and_beta(op, g, beta)
        if l2:
            _check_l2norm_range(op, q, k)
    return scale


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Autograd glue: the forward saves its inputs only (the backward recomputes W, U and the chunk
    states in fp32, which costs less memory than keeping them), the backward runs six chunk
    kernels (the forward's first two again, then four new ones) and the row kernels (l2norm of q
    and k with use_qk_l2norm; dq and dk at the end)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, output_final_state, l2):
        gf, bf = g.float().contiguous(), beta.float().contiguous()
        h0f = h0.float().contiguous() if h0 is not None else None
        ctx.save_for_backward(q, k, v, gf, bf, h0f)
        ctx.scale, ctx.l2 = scale, l2
        ctx.dtypes = [x.dtype if x is not None else None for x in (q, k, v, g, beta, h0)]
        return _chunk_forward(q, k, v, gf, bf, scale, h0f, output_final_state, l2)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        grads = _chunk_backward(q, k, v, g, beta, ctx.scale, h0, do.contiguous(),
                                dht.float().contiguous() if dht is not None else None, ctx.l2,
                                need_dh0)
        grads = [d.to(dt) if d is not None else None for d, dt in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                           output_final_state=False, use_qk_l2norm=False):
    """The gated delta rule by chunks of 64 in Triton (WY/UT form), forward and backward.

    q, k [B, T, H, K]; v [B, T, HV, V] (HV % H == 0; K, V ≤ 128; any T); float32, float16 or
    bfloat16 (not bfloat16 under the interpreter). g [B, T, HV] log decay, finite and ≤ 0; beta [B,
    T, HV] in [0, 2] (any float dtype). scale: a float, default K ** -0.5. initial_state [B, HV, K,
    V] or None. use_qk_l2norm: normalise q and k inside (as fp32 scalings). Returns (o [B, T, HV, V]
    in q's dtype, final_state [B, HV, K, V] float32, or None unless output_final_state).
    Differentiable in q, k, v, g, beta and initial_state.
    """
    return _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                  check_values=True)


def _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, check_values,
           op="chunk_gated_delta_rule"):
    """chunk_gated_delta_rule (g None: no decay); check_values=False skips the value checks
    (GatedDeltaNet's)."""
    scale = _check_kernel_inputs(op, q, k, v, g, beta, scale, initial_state, check_values,
                                 max_dim=128, l2=use_qk_l2norm)
    if g is None:
        g = torch.zeros_like(beta, dtype=torch.float32)
    return _ChunkGatedDeltaRule.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, beta,
                                      initial_state, scale, bool(output_final_state),
                                      bool(use_qk_l2norm))


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False):
    """DeltaNet by chunks in Triton: chunk_gated_delta_rule with g = 0. Same shapes, without g."""
    return _chunk(q, k, v, None, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                  check_values=True, op="chunk_delta_rule")


# %% [markdown]
# And the decoding op, on the same checks.

# %%
#| export deltanet.fused_recurrent
def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm=False):
    """The gated delta rule token by token in Triton, for decoding a few tokens from a state.
    Forward only.

    Same arguments and result as chunk_gated_delta_rule, with K, V ≤ 256. Its cost grows with T
    sequentially: use it for T = 1 (or a handful of tokens), chunk_gated_delta_rule for prompts and
    training. Raises if gradients are required.
    """
    return _fused_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state,
                            use_qk_l2norm, check_values=True)


def _fused_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                     check_values):
    """fused_recurrent_gated_delta_rule; check_values=False skips the value checks
    (GatedDeltaNet's own)."""
    op = "fused_recurrent_gated_delta_rule"
    scale = _check_kernel_inputs(op, q, k, v, g, beta, scale, initial_state, check_values,
                                 max_dim=256, l2=use_qk_l2norm)
    _checks.forward_only(op, q, k, v, g, beta, initial_state, instead="chunk_gated_delta_rule")
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o = torch.empty(B, T, HV, V, dtype=q.dtype, device=q.device)
    ht = torch.empty(B, HV, K, V, dtype=torch.float32,
                     device=q.device) if output_final_state else None
    runtime.launch("deltanet.fused_recurrent", _fused_recurrent_kernel,
                   lambda c: (triton.cdiv(V, c["BV"]), B * HV),
                   (q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                    beta.float().contiguous(), h0, o, ht, scale, T, H, HV, K, V),
                   dict(BK=_pow2(K), HAS_H0=h0 is not None, STORE_HT=ht is not None,
                        L2NORM=bool(use_qk_l2norm)), fit=_v_tile(V), autotune_key=["T", "K", "V"],
                   **_options(q, v))
    return o, ht


# %% [markdown]
# ### Checks of the Triton backward and of the naive recurrence against transformers
#
# And the backward pass: the gradients of all six inputs through the Triton kernels against autograd through the
# recurrence, for $\langle o, dO\rangle + \langle S_T, dS_T\rangle$ with random $dO$, $dS_T$.

# %%
gen = torch.Generator().manual_seed(27)
gt = make_log_gates(Bt, Tt, HVt, low=-2.0, high=0.0, seed=28, device=DEVICE)
dot_ = torch.randn(Bt, Tt, HVt, Vt, generator=gen).to(DEVICE)
dst_ = torch.randn(Bt, HVt, Kt, Vt, generator=gen).to(DEVICE)
grads = {}
for name, fn in [("recurrence", naive_recurrent_gated_delta_rule),
                 ("Triton", chunk_gated_delta_rule)]:
    leaves = [x.detach().clone().requires_grad_(True) for x in (qt, kt, vt, gt, betat, ht0)]
    o_, s_ = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, use_qk_l2norm=True)
    ((o_ * dot_).sum() + (s_ * dst_).sum()).backward()
    grads[name] = [x.grad for x in leaves]
# on a GPU the recurrence's own fp32 matmuls may run in TF32
tol = 1e-4 if DEVICE == "cpu" else 2e-3
for n, r, t in zip(["q", "k", "v", "g", "beta", "initial_state"], grads["recurrence"],
                   grads["Triton"]):
    print(f"d{n:<13s} relative RMS {assert_close('d' + n, r, t, tol):.1e}")

# %% [markdown]
# The recurrence against fla's `naive_recurrent_gated_delta_rule` (note its order `q, k, v, beta, g`; it has no
# grouped heads):

# %%
from minisparse.deltanet import naive_recurrent_delta_rule, naive_recurrent_gated_delta_rule

B0, T0, H0, K0, V0 = 2, 45, 3, 32, 48
q0, k0 = make_bthd(B0, T0, H0, K0, seed=1), make_bthd(B0, T0, H0, K0, seed=2)
v0 = make_bthd(B0, T0, H0, V0, seed=3)
q0n, k0n = F.normalize(q0, dim=-1), F.normalize(k0, dim=-1)  # the caller normalises
g0 = make_log_gates(B0, T0, H0, low=-1.0, seed=4)
beta0 = torch.rand(B0, T0, H0, generator=torch.Generator().manual_seed(5))
h00 = torch.randn(B0, H0, K0, V0, generator=torch.Generator().manual_seed(6))
o_rec0, s_rec0 = naive_recurrent_gated_delta_rule(q0n, k0n, v0, g0, beta0, initial_state=h00,
                                                  output_final_state=True)
if fla_naive_recurrent_gdr is not None:
    o_fla, s_fla = fla_naive_recurrent_gdr(q0n, k0n, v0, beta0, g0, initial_state=h00,
                                           output_final_state=True)
    assert_close("vs fla naive_recurrent_gated_delta_rule: o", o_fla, o_rec0, 1e-5)
    assert_close("vs fla naive_recurrent_gated_delta_rule: state", s_fla, s_rec0, 1e-5)
    print("naive_recurrent_gated_delta_rule == fla's (T = 45, K = 32, V = 48)")

# %% [markdown]
# The recurrence against transformers' `torch_recurrent_gated_delta_rule` from Qwen3-Next (order `q, k, v, g, beta`;
# it always scales by $K^{-1/2}$, normalises with `use_qk_l2norm_in_kernel` and repeats the query/key heads for
# grouped value heads). transformers decorates it so that a call may run fla's Triton kernel or a hub kernel
# instead; `minisparse.testing.hf_torch_function` digs out the PyTorch function itself.

# %%
if transformers is not None:
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

    hf_rec = hf_torch_function(qwen3_next.torch_recurrent_gated_delta_rule)
    v0g = make_bthd(B0, T0, 2 * H0, V0, seed=7)  # grouped value heads: HV = 2 H
    g0g, beta0g = make_log_gates(B0, T0, 2 * H0, low=-1.0, seed=8), torch.rand(B0, T0, 2 * H0)
    # q, k repeated per value head: older transformers releases (5.17) take equal head counts only
    o_hf, s_hf = hf_rec(q0.repeat_interleave(2, 2), k0.repeat_interleave(2, 2), v0g, g0g, beta0g,
                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_me, s_me = naive_recurrent_gated_delta_rule(q0, k0, v0g, g0g, beta0g, output_final_state=True,
                                                  use_qk_l2norm=True)
    assert_close("vs transformers torch_recurrent_gated_delta_rule: o", o_hf, o_me, 1e-5)
    assert_close("vs transformers torch_recurrent_gated_delta_rule: state", s_hf, s_me, 1e-5)
    print(
        "naive_recurrent_gated_delta_rule == transformers' torch_recurrent_gated_delta_rule (HV = "
        "2H, l2norm inside)")

# %% [markdown]
# ### The hybrid stack's numbers, asserted
#
# The numbers section 5.5 states: a quarter of the KV cache exactly, states independent of $T$, the FLOP ratio
# falling toward ¼ from above.

# %%
if cfg is not None:
    T_max = 262_144
    h, f = hybrid_costs(cfg, T_max), hybrid_costs(cfg, T_max, layer_types=full_types)
    assert (h["full_attention_layers"], h["linear_attention_layers"]) == (12, 36)
    # exactly a quarter, in integers
    assert 4 * h["kv_bytes"] == f["kv_bytes"] and f["state_bytes"] == 0
    states_36 = 36 * (32 * 128 * 128 * 4 + 3 * 8192 * 2)  # 36 layers: states + conv inputs
    assert h["state_bytes"] == hybrid_costs(cfg, 1)["state_bytes"] == states_36
    assert h["memory"] == f["memory"] // 4 + h["state_bytes"]
    ratios = [hybrid_costs(cfg, T)["flops"] / hybrid_costs(cfg, T, layer_types=full_types)["flops"]
              for T in (2 ** 10, 2 ** 14, 2 ** 18, 2 ** 24)]
    assert all(a > b > 0.25 for a,
               b in zip(ratios, ratios[1:])) and ratios[-1] - 0.25 < 1e-4, ratios
    print(f"262K: hybrid KV = all-attention KV / 4 = {h['kv_bytes'] / GiB:.1f} GiB, "
          f"+ {h['state_bytes'] / 2**20:.1f} MiB "
          f"of states; FLOP ratio {ratios[0]:.3f} (1K) → {ratios[2]:.4f} (262K) "
          f"→ {ratios[3]:.5f} (16M) → 1/4")

# %% [markdown]
# ### The state's norm over time
#
# Without the delta rule the state's norm grows like $\sqrt t$ for random pairs; with it, the state solves a regression
# that never needs more than $\lVert v \rVert$ per key direction, and its norm saturates; the gate lowers the plateau.

# %%
T_S, d_S = runtime.reading_size(cpu=1024, gpu=4096), 32
gen = torch.Generator().manual_seed(0)
kS = F.normalize(torch.randn(T_S, d_S, generator=gen), dim=-1)  # [T, d] random unit keys
vS = torch.randn(T_S, d_S, generator=gen)  # [T, d]
fig, ax = plt.subplots(figsize=(7, 3.4))
for label, beta_s, g_s in [("linear attention", None, 0.0), ("DeltaNet (β = 0.5)", 0.5, 0.0),
                           ("Gated DeltaNet (β = 0.5, g = -0.02)", 0.5, -0.02)]:
    S, norms = torch.zeros(d_S, d_S), []
    for t in range(T_S):
        # linear attention never reads
        read = 0.0 if beta_s is None else kS[t] @ (math.exp(g_s) * S)
        S = math.exp(g_s) * S + (beta_s or 1.0) * torch.outer(kS[t], vS[t] - read)
        norms.append(float(S.norm()))
    ax.plot(norms, label=label)
ax.set(xlabel="token t", ylabel="‖S_t‖ (Frobenius)", yscale="log",
       title=f"State norm over time (K = V = {d_S}, random unit keys)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ### The gated RMSNorm
#
# Qwen3-Next's `RMSNormGated`: normalise first, then gate with $\operatorname{SiLU}(z)$.

# %%
#| export deltanet.layer
class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dimension, then ⊙ SiLU(z) (Qwen3-Next's RMSNormGated: norm first, then
    gate)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(_checks.positive_int("GatedRMSNorm", "dim", dim)))
        self.eps = _checks.positive_float("GatedRMSNorm", "eps", eps)

    def forward(self, x, z):
        dtype = x.dtype
        xf = x.to(torch.promote_types(dtype, torch.float32))  # fp32 (fp64 stays fp64)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(dtype) * F.silu(z.to(xf.dtype))).to(dtype)


# %% [markdown]
# ### Argument checks of the delta-rule ops, and the hybrid stack's cost model

# %%
#| export deltanet.naive
def _check_gate_and_beta(op, g, beta):
    """The values: g finite and ≤ 0, β in [0, 2], NaN reported as NaN. One reduction and a host sync
    a tensor."""
    if g is not None:
        _checks.value_range(op, "g", g, low=float("-inf"), low_open=True, high=0.0,
                            why="a finite log decay: exp(g) in (0, 1]")
    _checks.value_range(op, "beta", beta, low=0.0, high=2.0,
                        why="I - beta k kᵀ must not amplify the state for unit keys; models use "
                            "sigmoid outputs")


def _check_delta(op, q, k, v, g, beta, scale, initial_state, check_values, dtypes=_checks.FLOATS):
    """Validate what every delta-rule op takes (g may be None: no decay); return the scale as a
    float (K ** -0.5 for None). `check_values`: also check the values of g and β now (the naive ops
    always do; the Triton ops follow the value-check rule, runtime.checking_values; a layer skips
    what it built itself). `dtypes`: q, k, v's and the state's (the naive ops take float64 too; the
    kernels pass _checks.KERNEL_FLOATS)."""
    B, T, H, K, HV, V = _checks.qkv(op, q, k, v, grouped_values=True, dtypes=dtypes)
    if g is not None:
        _checks.per_head_token(op, "g", g, (B, T, HV), "[B, T, HV]", "one per token and value head",
                               like=q)
    _checks.per_head_token(op, "beta", beta, (B, T, HV), "[B, T, HV]",
                           "one per token and value head", like=q)
    _checks.initial_state(op, initial_state, (B, HV, K, V), like=q, dtypes=dtypes)
    if check_values:
        _check_gate_and_beta(op, g, beta)
    return _checks.scale(op, scale, K)


def _prepare(q, k, v, g, beta, use_qk_l2norm):
    """float32 copies (float64 for float64 q), q and k repeated to the HV value heads, optionally
    L2-normalised; g None -> zeros."""
    HV = v.shape[2]
    rep = HV // q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    q, k = q.to(acc), k.to(acc)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if rep > 1:  # grouped value heads: value head hv reads query/key head hv // rep
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)  # [B, T, HV, K]
    g = torch.zeros_like(beta, dtype=acc) if g is None else g.to(acc)
    return q, k, v.to(acc), g, beta.to(acc)


# %%
#| export deltanet.cost
def layer_pattern(config):
    """The list of 'linear_attention' / 'full_attention' of a Qwen3-Next-style config: its
    layer_types, or else every full_attention_interval-th layer is softmax attention."""
    types = getattr(config, "layer_types", None)
    if types is None:
        every = config.full_attention_interval
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                 for i in range(config.num_hidden_layers)]
    return list(types)


def hybrid_costs(config, T, layer_types=None, chunk=64, dtype_bytes=2, state_bytes=4):
    """Token-mixing prefill FLOPs of the whole stack over T tokens and its decoding memory at
    context T.

    config: a Qwen3NextConfig (or anything with its fields). layer_types overrides the config's
    pattern (e.g.
    ['full_attention'] * 48 for the all-attention model). Returns a dict: flops, kv_bytes (softmax
    layers' K and V), state_bytes (GDN states + conv states, constant in T), memory = kv_bytes +
    state_bytes, and the layer counts.
    """
    types = layer_pattern(config) if layer_types is None else list(layer_types)
    bad = set(types) - {"full_attention", "linear_attention"}
    if bad:
        raise ValueError(f"hybrid_costs: unknown layer types {sorted(bad)}")
    n_attn, n_gdn = types.count("full_attention"), types.count("linear_attention")
    c = config
    attn = attention_flops(T, c.head_dim, c.num_attention_heads, causal=True)
    gdn = gdn_flops(T, c.linear_key_head_dim, c.linear_value_head_dim, c.linear_num_value_heads,
                    chunk=chunk)
    kv = kv_cache_bytes_per_token(n_attn, c.num_key_value_heads, c.head_dim, dtype_bytes) * T
    states = n_gdn * gdn_state_bytes(c.linear_num_key_heads, c.linear_num_value_heads,
                                     c.linear_key_head_dim, c.linear_value_head_dim,
                                     c.linear_conv_kernel_dim, state_bytes, dtype_bytes)
    return dict(flops=n_attn * attn + n_gdn * gdn, kv_bytes=kv, state_bytes=states,
                memory=kv + states, full_attention_layers=n_attn, linear_attention_layers=n_gdn)


# %% [markdown]
# ### The layer against transformers
#
# `GatedDeltaNet.from_hf` copies the weights; the parameter names are transformers'.

# %%
#| export deltanet.layer
def _check_layer_args(hidden_size, num_k_heads, num_v_heads, head_k_dim, head_v_dim,
                      conv_kernel_size, eps, chunk_size, backend):
    """GatedDeltaNet's constructor arguments: positive sizes, value heads a multiple of key heads, a
    kernel ≥ 2."""
    op = "GatedDeltaNet"
    for name, value in (("hidden_size", hidden_size), ("num_k_heads", num_k_heads),
                        ("num_v_heads", num_v_heads), ("head_k_dim", head_k_dim),
                        ("head_v_dim", head_v_dim), ("chunk_size", chunk_size)):
        _checks.positive_int(op, name, value)
    _checks.divides(op, "num_k_heads", num_k_heads, "num_v_heads", num_v_heads)
    if _checks.positive_int(op, "conv_kernel_size", conv_kernel_size) < 2:
        raise ValueError(f"{op}: conv_kernel_size must be an int >= 2 "
                         "(a causal convolution over past tokens), "
                         f"got {conv_kernel_size}")
    _checks.positive_float(op, "eps", eps)
    _checks.backend(op, backend)


def _from_hf(cls, module, backend="auto"):
    """GatedDeltaNet.from_hf: copy transformers' Qwen3NextGatedDeltaNet (weights and shapes) into a
    GatedDeltaNet."""
    _checks.hf_module("GatedDeltaNet.from_hf", module, "transformers' Qwen3NextGatedDeltaNet",
                      attrs=("activation", "hidden_size", "num_k_heads", "num_v_heads",
                             "head_k_dim", "head_v_dim", "conv_kernel_size", "layer_norm_epsilon",
                             "in_proj_qkvz", "in_proj_ba", "conv1d", "out_proj", "norm.weight",
                             "dt_bias", "A_log"))
    if module.activation not in ("silu", "swish"):
        raise ValueError(
            "GatedDeltaNet.from_hf: only SiLU convolutions are supported, got "
            f"{module.activation!r}")
    layer = cls(module.hidden_size, module.num_k_heads, module.num_v_heads, module.head_k_dim,
                module.head_v_dim, module.conv_kernel_size, module.layer_norm_epsilon,
                backend=backend)
    w = module.in_proj_qkvz.weight
    layer = layer.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for name in ("in_proj_qkvz", "in_proj_ba", "conv1d", "out_proj", "norm"):
            getattr(layer, name).weight.copy_(getattr(module, name).weight)
        layer.dt_bias.copy_(module.dt_bias)
        layer.A_log.copy_(module.A_log)
    return layer


# %% [markdown]
# `GatedDeltaNet.from_hf` against transformers' `Qwen3NextGatedDeltaNet` at a tiny configuration with grouped value
# heads. Transformers' functions would use fla's Triton kernels when fla is importable and the inputs sit on a GPU;
# `hf_torch_path` hands the module its own PyTorch functions for the duration of the check, then restores them.

# %%
if transformers is not None:
    from transformers import Qwen3NextConfig

    cfg = Qwen3NextConfig(hidden_size=64, linear_num_key_heads=2, linear_num_value_heads=4,
                          linear_key_head_dim=16, linear_value_head_dim=24,
                          linear_conv_kernel_dim=4, num_hidden_layers=1,
                          layer_types=["linear_attention"])
    torch.manual_seed(0)
    hf_layer = qwen3_next.Qwen3NextGatedDeltaNet(cfg, layer_idx=0).eval()
    with torch.no_grad():
        hf_layer.norm.weight.uniform_(0.5, 1.5)
        hf_layer.dt_bias.uniform_(-1, 1)
    names = ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
             "causal_conv1d_update"]
    with hf_torch_path(qwen3_next, names):
        x_hf = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y_hf = hf_layer(x_hf)
    ours = GatedDeltaNet.from_hf(hf_layer)
    with torch.no_grad():
        y_ours, _ = ours(x_hf)
    assert_close("GatedDeltaNet.from_hf vs Qwen3NextGatedDeltaNet", y_hf, y_ours, 1e-5)
    print(
        "GatedDeltaNet.from_hf == transformers' Qwen3NextGatedDeltaNet "
        "(T = 70, Hk = 2, Hv = 4, K = 16, V = 24)")

# %% [markdown]
# ### The exercises' checkers
#
# Each checker measures the answer against the chapter's spec (the recurrence, an explicit product, PyTorch's
# triangular solve) on several cases and says what differs.

# %% tags=["hide-input"]
#| export deltanet.exercises
import math

import torch

from minisparse import runtime
from minisparse.deltanet.naive import naive_recurrent_gated_delta_rule
from minisparse.testing import ExerciseError, check


def _orthonormal_keys(K, gen):
    """K orthonormal rows [K, K] (float64): Q of a random matrix's QR."""
    return torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=torch.float64))[0].T


def _measured_coefficients(beta, g, K=8, V=6, j=3, seed=61):
    """(a, b, c) measured from one step of naive_recurrent_gated_delta_rule on S = Σ k_iᵀ v_i,
    orthonormal k_i."""
    gen = torch.Generator().manual_seed(seed)
    keys = _orthonormal_keys(K, gen)  # [K, K]
    vals, v_new = torch.randn(K, V, generator=gen,
                              dtype=torch.float64), torch.randn(V, generator=gen,
                                                                dtype=torch.float64)
    S = keys.T @ vals  # [K, V] Σ_i k_iᵀ v_i
    one = lambda x: x.float()[None, None, None]  # noqa: E731  [1, 1, 1, ·]: one token, one head
    _, S1 = naive_recurrent_gated_delta_rule(one(keys[j]), one(keys[j]), one(v_new),
                                             torch.tensor([[[g]]]), torch.tensor([[[beta]]]),
                                             initial_state=S.float()[None, None],
                                             output_final_state=True)
    reads = keys @ S1[0, 0].double()  # [K, V] what each key reads now
    ab = torch.linalg.lstsq(torch.stack([vals[j], v_new], 1), reads[j][:, None]).solution[:, 0]
    i = (j + 1) % K
    c = float(reads[i] @ vals[i] / (vals[i] @ vals[i]))
    return float(ab[0]), float(ab[1]), c


def check_overwrite_coefficients(fn):
    """Check fn(beta, g) -> (a, b, c): after one gated delta step writing v_new under k_j, k_j reads
    a·v_j + b·v_new and every other orthonormal key k_i reads c·v_i. Measured on the recurrence."""
    cases = [(1.0, 0.0), (0.5, -0.3), (0.9, -2.0), (0.0, -0.1), (2.0, 0.0), (0.3, -1e-3)]
    check("what one delta step leaves behind", fn, _measured_coefficients, cases, tol=1e-4,
          hint="decay first, then read what the decayed state returns for k_j; the write adds "
               "k_jᵀ β (v_new − that read), and k_i · k_j = 0 for i ≠ j")


def _recurrent_writes(k, v, g, beta, S):
    """u_i = β_i (v_i − k_i S̃_i), S̃_i the state after token i's decay: the recurrence, token by
    token."""
    S, U = S.double(), []
    for t in range(len(g)):
        S = math.exp(float(g[t])) * S
        u = float(beta[t]) * (v[t].double() - k[t].double() @ S)  # [V]
        S = S + torch.outer(k[t].double(), u)
        U.append(u)
    return torch.stack(U).float()


def check_planted_bug_fixed(fn):
    """Check fn(k [L, K] unit rows, v [L, V], g [L], beta [L], S [K, V]) -> U [L, V], what each
    token of a chunk writes, against the recurrence: zero and non-zero entering states, with and
    without gates."""
    gen = torch.Generator().manual_seed(62)
    cases = []
    for L, low, state in [(16, -1.0, 0.0), (12, 0.0, 1.0), (16, -1.0, 1.0), (7, -3.0, 2.0),
                          (1, -0.5, 1.0)]:
        k = torch.nn.functional.normalize(torch.randn(L, 12, generator=gen), dim=-1)
        cases.append((k, torch.randn(L, 10, generator=gen), low * torch.rand(L, generator=gen),
                      torch.rand(L, generator=gen), state * torch.randn(12, 10, generator=gen)))
    check("what a chunk writes, fixed", fn, _recurrent_writes, cases, tol=1e-4,
          hint="case 1 has a zero entering state S, case 2 no gates (g = 0); the error is in a "
               "term that " "only matters when S is not zero and the gates are not 0")


# %%
#| export deltanet.exercises
def _explicit_transition(k, beta, g):
    L, K = k.shape
    P = torch.eye(K, dtype=torch.float64)
    for t in range(L):
        kt = k[t].double()
        P = math.exp(float(g[t])) * (torch.eye(K,
                                               dtype=torch.float64) - float(beta[t]) * torch.outer(
            kt, kt)) @ P
    return P


def _wy_rows(k, beta, g):
    """W = (I + A)⁻¹ diag(β e^G) K of one chunk (section 5.3), float64."""
    G = g.cumsum(0)
    decay = torch.exp((G[:, None] - G[None, :]).tril())  # e^{G_i − G_j}, j ≤ i
    A = (beta[:, None] * (k @ k.T) * decay).tril(-1)
    eye = torch.eye(len(g), dtype=k.dtype)
    return torch.linalg.solve_triangular(eye + A, (beta * G.exp())[:, None] * k, upper=False)


def _closed_form(k, W, g):
    G = g.cumsum(0)
    eye = torch.eye(k.shape[1], dtype=k.dtype)
    return G[-1].exp() * eye - k.T @ ((G[-1] - G).exp()[:, None] * W)


def check_chunk_transition(fn):
    """Check fn(k [L, K] unit rows, W [L, K] the chunk's WY rows, g [L]) -> P [K, K]: against the
    product M_L ⋯ M_1, M_t = e^{g_t}(I − β_t k_tᵀ k_t), with the true W; then, with a perturbed W,
    against the closed form, which a P that does not read W cannot follow."""
    gen = torch.Generator().manual_seed(63)
    cases, perturbed, product = [], [], {}
    for L, K, low, beta_max in [(1, 4, -0.5, 1.0), (5, 8, 0.0, 1.0), (16, 16, -0.3, 1.0),
                                (33, 8, -0.1, 1.0), (12, 6, -0.2, 2.0)]:
        k = torch.nn.functional.normalize(torch.randn(L, K, generator=gen, dtype=torch.float64),
                                          dim=-1)
        beta = beta_max * torch.rand(L, generator=gen, dtype=torch.float64)
        g = low * torch.rand(L, generator=gen, dtype=torch.float64)
        W = _wy_rows(k, beta, g)
        cases.append((k, W, g))
        product[id(W)] = _explicit_transition(k, beta, g)  # M_L ⋯ M_1, from β
        perturbed.append((k, W + 0.1 * torch.randn(L, K, generator=gen, dtype=torch.float64), g))
    hint = ("substitute U = Ũ − W S into the state update of section 5.3 and keep the terms that "
            "multiply S; key j is decayed by e^{G_L − G_j} to the chunk's end")
    check("a chunk's transition from its WY representation", fn,
          lambda k, W, g: product[id(W)], cases, tol=1e-4, hint=hint)
    check("the transition follows W", fn, _closed_form, perturbed, tol=1e-4,
          hint="with a perturbed W the product of the M_t no longer holds, and P must be built "
               "from W: " + hint)


def check_unit_lower_inverse_kernel(kernel):
    """Launch kernel[(N,)](a, x, L, C=C) on N chunks of strictly lower-triangular A [N, L, L]
    (float32, on the book's device: the interpreter on a CPU) and compare x with (I + A)⁻¹; name the
    first entry that differs."""
    dev, name = runtime.device(), "unit lower-triangular inverse (Triton)"
    gen = torch.Generator().manual_seed(64)
    cases = [(3, 13, 16), (2, 16, 16), (2, 5, 8), (1, 1, 16)]  # (chunks N, tokens L, tile C)
    for case, (N, L, C) in enumerate(cases, 1):
        k = torch.nn.functional.normalize(torch.randn(N, L, 8, generator=gen), dim=-1)
        beta, decay = torch.rand(N, L, 1, generator=gen), torch.rand(N, L, L, generator=gen)
        # [N, L, L] as a chunk's A
        a = (beta * (k @ k.transpose(1, 2)) * decay).tril(-1).contiguous()
        eye = torch.eye(L).expand(N, L, L)
        want = torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True)
        x = torch.full((N, L, L), float("nan"), device=dev)
        try:
            kernel[(N,)](a.to(dev), x, L, C=C)
        # a compile or run error of the reader's kernel: say which, not a traceback
        except Exception as err:
            raise ExerciseError(f"✗ {name}: case {case} of {len(cases)} (N={N}, L={L}, C={C}) "
                                f"raised {type(err).__name__}: {err}") from None
        got = x.cpu()
        bad = ~torch.isclose(got, want, rtol=1e-4, atol=1e-5)
        if bad.any():
            n, i, j = (int(t) for t in bad.nonzero()[0])
            rows_ok = "" if i == 0 else "; row 0 of that chunk matches" if i == 1 else (
                f"; rows 0–{i - 1} of that chunk match")
            raise ExerciseError(
                f"✗ {name}: case {case} of {len(cases)} (N={N}, L={L}, C={C}): chunk {n}, "
                f"row {i}, column {j}: got {float(got[n, i, j]):.6g}, "
                f"expected {float(want[n, i, j]):.6g}{rows_ok}\n"
                "Hint: row i of (I + A)⁻¹ is e_i − A[i, :] @ X, from the rows < i of X; "
                "select row i of A with tl.where(rows[:, None] == i, A, 0.0) summed over "
                "axis 0, and write row i back the same way")
    print(f"✓ {name}: all {len(cases)} cases match")
