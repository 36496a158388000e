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
# # Chapter 2 — Mixture of Experts
#
# Every model on the map of chapter 0 is a mixture of experts. Its feed-forward layers hold tens or hundreds of
# small expert networks, and a *router* picks a handful of them for each token. The model stores all the experts
# but computes with only a few, so it can be very large and still cheap per token.
#
# This chapter builds the whole mechanism: the routers of Mixtral, Qwen and DeepSeek-V3, two ways of keeping the
# experts evenly loaded, the sort that sends each token to its experts, and a grouped matrix multiply in Triton
# that runs every expert in a single kernel launch. It ends with an `MoE` layer that loads transformers'
# DeepSeek-V3 and Mixtral blocks and gives the same outputs.
#
# What you build here, and can import afterwards:
#
# | name | what it is |
# |---|---|
# | `route_topk_softmax`, `route_deepseek` | the two routers: softmax top-k (Mixtral, Qwen3) and DeepSeek-V3's sigmoid, group-limited, bias-steered one |
# | `load_balancing_loss`, `update_bias`, `capacity_mask` | balancing: the Switch/Mixtral auxiliary loss, DeepSeek's loss-free bias update, token dropping |
# | `permute`, `unpermute`, `moe_naive`, `grouped_mm_ref` | dispatch by sorting, and the per-expert loop that is the spec |
# | `moe_params`, `moe_flops_per_token`, `expert_intensity`, … | the cost model |
# | `tile_schedule`, `grouped_mm` | the Triton grouped GEMM, forward and backward (section 2.7) |
# | `MoE` | the layer: SwiGLU experts in transformers' layout, optional (gated) shared experts, `MoE.from_hf` |
#
# ```python
# from minisparse.moe import route_deepseek, grouped_mm, MoE
# ```
#
# Tokens are rows: a batch `[B, T, H]` is flattened to `[N, H]` with $N = BT$ before routing. On a laptop CPU the
# chapter runs at small "reading sizes" in under two minutes, with the Triton kernels in the interpreter; on a GPU
# the same cells use larger sizes.
#
# :::{admonition} Where the numbers come from
# :class: note
# Numbers marked **[S]** come from *the minisparse seed survey, Feb 2026* (see chapter 0). Model shapes come from
# `transformers`' configuration classes, whose defaults are the real checkpoints' shapes, and from the papers
# listed at the end.
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisparse import bench, runtime, viz
from minisparse.testing import ExerciseError, assert_close

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

try:  # transformers is a test dependency: the cells that compare against it skip, with a message, without it
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: the checks against its MoE blocks are skipped")

# %% [markdown]
# ## 2.1 Why: a bigger model for the same FLOPs
#
# The feed-forward network (FFN) of a modern transformer block is a SwiGLU: for a token $x \in \mathbb R^H$,
#
# $$
# \mathrm{FFN}(x) = W_{\mathrm{down}}\big(\operatorname{silu}(W_{\mathrm{gate}}\,x) \odot W_{\mathrm{up}}\,x\big),
# \qquad W_{\mathrm{gate}}, W_{\mathrm{up}} \in \mathbb R^{I \times H},\; W_{\mathrm{down}} \in \mathbb R^{H \times I}.
# $$
#
# It holds $3HI$ parameters and costs $6HI$ FLOPs a token (a multiply and an add per weight). A **mixture of
# experts** replaces it by $E$ such FFNs, usually narrower, and a router $W_r \in \mathbb R^{E \times H}$ that
# scores them. Each token runs through the $k$ best-scoring experts only, and their outputs are mixed with the
# router's weights $g_i(x)$:
#
# $$
# y = \sum_{i \in \operatorname{TopK}(W_r x,\, k)} g_i(x)\, \mathrm{FFN}_i(x) \;\;\big[+ \mathrm{FFN}_{\mathrm{shared}}(x)\big].
# $$
#
# So a layer has two sizes. Its **total** parameters, $3HI \cdot E$, must sit in memory; its **active**
# parameters, $3HI \cdot k$, are what one token computes with. A forward pass costs about 2 FLOPs per active
# parameter and token (Kaplan et al., 2020), so compute follows the active count while knowledge capacity follows
# the total. The ratio active / total is the *activation ratio*.
#
# The survey calls the trend an *activation race* [S]: Qwen3-235B-A22B computes with 9.36 % of its weights,
# Qwen3.5-397B-A17B and MiniMax M2.5 with about 4.3 %, and Kimi K2.5 with 32B of more than a trillion. A lower
# ratio gives more parameters per FLOP, and the survey notes what it asks in return: better routing and more care
# to keep training stable [S]. Both are the subject of this chapter.

# %%
# total / active parameters in billions, whole model. [S] = the minisparse seed survey, Feb 2026.
MODELS = [
    dict(model="Mixtral 8x7B", total=47, active=13, source="[S]; arXiv:2401.04088"),
    dict(model="Mixtral 8x22B", total=141, active=39, source="[S]"),
    dict(model="DBRX", total=132, active=36, source="[S]"),
    dict(model="Qwen3-30B-A3B", total=30, active=3, source="[S]"),
    dict(model="Qwen3-235B-A22B", total=235, active=22, source="[S]; arXiv:2505.09388"),
    dict(model="Qwen3-Next-80B-A3B", total=80, active=3, source="[S]"),
    dict(model="Qwen3.5-397B-A17B", total=397, active=17, source="[S]"),
    dict(model="MiniMax-M1", total=456, active=45.9, source="[S]; arXiv:2506.13585"),
    dict(model="MiniMax-M2.5", total=230, active=10, source="[S]"),
    dict(model="Mistral Large 3", total=675, active=41, source="[S]"),
    dict(model="DeepSeek V3 / V3.2", total=685, active=37, source="[S]; arXiv:2412.19437"),
    dict(model="Kimi K2 / K2.5", total=1000, active=32, source="[S] '1T+'; arXiv:2507.20534"),
]
DENSE = [dict(model="Llama 3.1 70B (dense)", total=70, active=70), dict(model="Llama 3.1 405B (dense)", total=405,
                                                                        active=405)]  # arXiv:2407.21783

fig, ax = plt.subplots(figsize=(7.5, 5))
totals = np.array([m["total"] for m in MODELS])
actives = np.array([m["active"] for m in MODELS])
ax.scatter(totals, 2 * actives, color="tab:blue", zorder=3, label="MoE [S]")
ax.scatter([m["total"] for m in DENSE], [2 * m["active"] for m in DENSE], color="black", marker="s", zorder=3,
           label="dense, for reference")
nudge = {"DBRX": (4, -9), "Mistral Large 3": (-20, 6), "DeepSeek V3 / V3.2": (-30, -11), "Mixtral 8x22B": (4, 2),
         "Kimi K2 / K2.5": (4, 2)}
for m in MODELS + DENSE:
    ax.annotate(m["model"], (m["total"], 2 * m["active"]), fontsize=7, xytext=nudge.get(m["model"], (4, -3)),
                textcoords="offset points")
p = np.array([20, 1500])
for ratio, ls in [(1.0, "-"), (0.1, "--"), (0.03, ":"), (0.01, "-.")]:
    ax.plot(p, 2 * ratio * p, color="grey", lw=0.8, ls=ls)
    ax.text(p[-1], 2 * ratio * p[-1], f" {ratio:.0%} active", fontsize=7, color="grey", va="center")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlim(20, 3000)
ax.set_xlabel("total parameters (billions): what must sit in memory")
ax.set_ylabel("forward GFLOPs per token ≈ 2 × active parameters")
ax.set_title("Compute per token vs model size: MoE models sit far below the dense diagonal")
ax.legend(fontsize=8, loc="upper left")
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Source: total and active counts from the minisparse seed survey, Feb 2026 (Kimi "1T+" drawn at 1000B, so its
# point is an upper bound on the ratio); dense Llama 3.1 from its paper. FLOPs per token counted as 2 × active
# parameters, which leaves out attention's context-dependent part (chapter 1).*
#
# A 1T-parameter model that computes like a 32B one: that is the deal. The catch is that the other 968B must still
# be stored, moved between GPUs, and — as section 2.6 shows — read from memory for every batch, which is why MoE
# pays off only when many tokens are processed together.
#
# The expert parameters follow from a few numbers in each model's configuration. The cost model's first function
# counts them, and the check below recomputes three real models from `transformers`' configuration classes:

# %%
#| export moe.cost
import numpy as np


def moe_params(hidden, inter, num_experts, top_k, n_shared=0, shared_inter=None):
    """(total, active) parameters of one MoE layer's experts, SwiGLU (3 matrices of hidden × inter each).

    Shared experts (`n_shared` of width `shared_inter`, default `inter`) count in both. The router's
    `num_experts × hidden` weights are left out (DeepSeek-V3: 1.8M against 11.3B of experts a layer).
    """
    shared_inter = inter if shared_inter is None else shared_inter
    expert = 3 * hidden * inter  # W_gate, W_up: inter × hidden; W_down: hidden × inter
    shared = 3 * hidden * shared_inter * n_shared
    return expert * num_experts + shared, expert * top_k + shared


# %%
assert moe_params(4, 2, 8, 2) == (192, 48) and moe_params(4, 2, 8, 2, n_shared=1, shared_inter=6) == (264, 120)
if transformers is not None:
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3NextConfig

    rows = []
    ds = DeepseekV3Config()
    n_moe = ds.num_hidden_layers - ds.first_k_dense_replace  # the first 3 layers are dense
    t, a = moe_params(ds.hidden_size, ds.moe_intermediate_size, ds.n_routed_experts, ds.num_experts_per_tok,
                      ds.n_shared_experts)
    rows.append(("DeepSeek-V3", n_moe * t, n_moe * a, 671, 37))
    mx = MixtralConfig()
    t, a = moe_params(mx.hidden_size, mx.intermediate_size, mx.num_local_experts, mx.num_experts_per_tok)
    rows.append(("Mixtral 8x7B", mx.num_hidden_layers * t, mx.num_hidden_layers * a, 47, 13))
    qn = Qwen3NextConfig()
    t, a = moe_params(qn.hidden_size, qn.moe_intermediate_size, qn.num_experts, qn.num_experts_per_tok, 1,
                      qn.shared_expert_intermediate_size)
    rows.append(("Qwen3-Next-80B-A3B", qn.num_hidden_layers * t, qn.num_hidden_layers * a, 80, 3))
    for name, total, active, model_total, model_active in rows:
        print(f"{name:20s} experts: {total / 1e9:6.1f}B of {model_total}B total, {active / 1e9:5.2f}B of "
              f"{model_active}B active ({active / total:.2%} of the expert weights)")
        assert 0.85 < total / 1e9 / model_total < 1.0  # the experts are almost all of the model ...
        assert active / 1e9 < model_active  # ... but attention, embeddings and dense layers add to the active count
    assert (ds.n_routed_experts, ds.num_experts_per_tok, ds.n_group, ds.topk_group) == (256, 8, 8, 4)

# %% [markdown]
# In all three the experts are nearly all of the model's memory — and a minority of what a token computes with:
# attention, embeddings and (in DeepSeek-V3) three dense layers make up the rest of the active count. Qwen3-Next
# is the extreme: 512 experts, 10 of them per token, 2 % of its expert weights active.

# %% [markdown]
# ## 2.2 Routing, naively
#
# ### Softmax top-k (Mixtral, Qwen3-MoE)
#
# The router is one linear map to $E$ logits, $u = W_r x$. Mixtral turns them into probabilities over all experts
# and keeps the $k$ largest:
#
# $$
# p = \operatorname{softmax}(u), \qquad S = \operatorname{TopK}(p, k), \qquad
# g_i = \frac{p_i}{\sum_{j \in S} p_j}\;\; (i \in S).
# $$
#
# The renormalisation makes the kept weights sum to one; Qwen3 models make it a flag (`norm_topk_prob`). With it,
# $g$ equals a softmax over the $k$ selected logits only — the other experts' logits cancel. The router runs in
# fp32: a bf16 softmax over hundreds of experts loses the small probabilities that decide the $k$-th place.
#
# Every op of the chapter starts with one call that checks its arguments — shapes, dtypes, devices, the
# configuration, and values such as a NaN logit — and raises an error that names the argument, what was expected and
# what came. The helpers are built from the book's shared checks (`minisparse._checks`); the hidden cell below has
# them. Value checks follow the book's rule: on CPU tensors always; on CUDA tensors only after
# `minisparse.runtime.set_value_checks(True)`, because reading a reduction back to the host stalls the GPU.

# %% tags=["hide-input"]
#| export moe.naive
import math

import torch
import torch.nn.functional as F

from minisparse import _checks  # the book's shared argument checks

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # the PyTorch ops; the kernels: no fp64
_IDS = (torch.int32, torch.int64)


def check_routing_args(op, num_experts, top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0):
    """A router's configuration: top_k an int in [1, E]; n_group an int that divides E; topk_group an int in
    [1, n_group] whose groups hold at least top_k experts; routed_scaling_factor a positive number."""
    _checks.positive_int(op, "top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"{op}: top_k must be <= the number of experts E = {num_experts}, got {top_k}")
    _checks.positive_int(op, "n_group", n_group)
    _checks.divides(op, "n_group", n_group, "the number of experts E", num_experts)
    _checks.positive_int(op, "topk_group", topk_group)
    if topk_group > n_group:
        raise ValueError(f"{op}: topk_group must be <= n_group = {n_group} (the groups a token may use), "
                         f"got {topk_group}")
    per_group = num_experts // n_group
    if top_k > topk_group * per_group:
        raise ValueError(f"{op}: top_k = {top_k} experts cannot come from topk_group = {topk_group} groups of "
                         f"{per_group} experts: need top_k <= {topk_group * per_group}")
    _checks.positive_float(op, "routed_scaling_factor", routed_scaling_factor)


def _check_router_inputs(op, logits, top_k, bias=None, n_group=1, topk_group=1, routed_scaling_factor=1.0):
    """A router's inputs: logits [N, E] float, bias None or a float [E] on logits' device, and the configuration
    (check_routing_args). Values (CPU tensors always, CUDA tensors after runtime.set_value_checks(True)): no NaN in
    logits or bias — top-k ranks a NaN above every number, so one NaN bias would send every token to its expert."""
    _checks.tensor(op, "logits", logits, "[N, E]", dtypes=_FLOATS)
    E = logits.shape[1]
    check_routing_args(op, E, top_k, n_group, topk_group, routed_scaling_factor)
    if bias is not None:
        _checks.tensor(op, "bias", bias, "[E]", dtypes=_FLOATS)
        _checks.shape(op, "bias", bias, (E,), "[E]", "one per expert")
        _checks.same_device(op, logits=logits, bias=bias)
    if _checks.checking_values(False, logits):
        _checks.value_range(op, "logits", logits, why="a NaN logit gives its token NaN weights")
        _checks.value_range(op, "bias", bias, why="top-k would rank its expert first for every token")


def _check_expert_ids(op, indices, num_experts, check_values):
    """indices [N, k] int32/int64 expert ids, num_experts an int > 0; with check_values, under the value-check rule,
    every id in [0, E) (a read-back; on a GPU an id out of range otherwise trips a device-side assert)."""
    _checks.tensor(op, "indices", indices, "[N, k]", dtypes=_IDS)
    _checks.positive_int(op, "num_experts", num_experts)
    if check_values and _checks.checking_values(False, indices):
        _checks.value_range(op, "indices", indices, low=0, high=num_experts - 1,
                            why=f"expert ids for num_experts = {num_experts}")


def _check_permute_args(op, x, indices, num_experts, check_values):
    """x [N, H], indices [N, k] expert ids (see _check_expert_ids) with x's N, one device."""
    _checks.tensor(op, "x", x, "[N, H]")
    _check_expert_ids(op, indices, num_experts, check_values)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: indices must be [N, k] with x's N = {x.shape[0]} tokens, got {tuple(indices.shape)}")
    _checks.same_device(op, x=x, indices=indices)


def _check_unpermute_args(op, y_sorted, weights, order):
    """weights [N, k] float, y_sorted [N*k, H], order [N*k] int32/int64, one device."""
    _checks.tensor(op, "weights", weights, "[N, k]", dtypes=_FLOATS)
    _checks.tensor(op, "y_sorted", y_sorted, "[N*k, H]")
    _checks.tensor(op, "order", order, "[N*k]", dtypes=_IDS)
    rows = weights.shape[0] * weights.shape[1]
    if y_sorted.shape[0] != rows:
        raise ValueError(f"{op}: y_sorted must be [N*k, H] with N*k = {rows} (weights {tuple(weights.shape)}), got "
                         f"{tuple(y_sorted.shape)}")
    _checks.shape(op, "order", order, (rows,), "[N*k]", f"weights {tuple(weights.shape)}")
    _checks.same_device(op, y_sorted=y_sorted, weights=weights, order=order)


def check_grouped_mm_args(op, x, w, offsets, *, triton=False, check_values=True):
    """A grouped GEMM's inputs: x [M, K] and w [G, K, N] of one float dtype, offsets [G] int32 cumulative row ends
    (torch._grouped_mm's format), one device; for the Triton op (triton=True) fp32/fp16/bf16 only and what its
    kernels need (_checks.triton_inputs). Values — offsets non-decreasing from >= 0, the last equal to M — always for
    the PyTorch loop, under the value-check rule for the Triton op; check_values=False skips them (a read-back)."""
    dtypes = _checks.FLOATS if triton else _FLOATS
    _checks.tensor(op, "x", x, "[M, K]", dtypes=dtypes)
    _checks.tensor(op, "w", w, "[G, K, N]", dtypes=dtypes)
    _checks.tensor(op, "offsets", offsets, "[G]")
    if offsets.dtype != torch.int32:
        raise TypeError(f"{op}: offsets must be torch.int32 cumulative row ends (as torch._grouped_mm takes them), "
                        f"got {offsets.dtype}")
    if offsets.numel() != w.shape[0] or w.shape[0] == 0:
        raise ValueError(f"{op}: offsets needs one entry per expert, len(offsets) == w.shape[0] >= 1, got "
                         f"len(offsets) = {offsets.numel()} and w of shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x [M, K] and w [G, K, N] must share K, got x {tuple(x.shape)} and w {tuple(w.shape)}")
    _checks.same_dtype(op, dtypes, x=x, w=w)
    _checks.same_device(op, x=x, w=w, offsets=offsets)
    if triton:
        _checks.triton_inputs(op, x, w, offsets, instead="grouped_mm_ref (a loop of PyTorch matmuls)")
    if check_values and _checks.checking_values(not triton, x):
        ends = offsets.tolist()
        bad = [i for i in range(len(ends)) if ends[i] < (ends[i - 1] if i else 0)]
        if bad:
            raise ValueError(f"{op}: offsets must be non-decreasing cumulative row ends starting at >= 0, got "
                             f"{ends[:8]}{' …' if len(ends) > 8 else ''} (first decrease at index {bad[0]})")
        if ends[-1] != x.shape[0]:
            raise ValueError(f"{op}: the last offset must equal M = x.shape[0] = {x.shape[0]} (every row belongs "
                             f"to an expert), got {ends[-1]}")


# %%
#| export moe.naive
def route_topk_softmax(logits, top_k, renormalize=True):
    """Mixtral / Qwen3-MoE routing: softmax over all experts in fp32, keep the top_k.

    logits [N, E] float -> (weights [N, top_k] fp32, indices [N, top_k] int64), best expert first.
    renormalize=True rescales the kept probabilities to sum to 1 (Mixtral always does; Qwen3: norm_topk_prob).
    """
    _check_router_inputs("route_topk_softmax", logits, top_k)  # 1 <= top_k <= E, logits [N, E] without NaN
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E] p = softmax(u)
    weights, indices = probs.topk(top_k, dim=-1)  # [N, k] p_i for i in S, and S
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # g_i = p_i / sum_S p_j
    return weights, indices


# %% [markdown]
# ### DeepSeek-V3: sigmoid scores, expert groups and a bias for selection
#
# DeepSeek-V3 changes three things (DeepSeek-AI, 2024, §2.1.2):
#
# 1. **Sigmoid affinities.** Each expert gets an independent score $s_i = \sigma(u_i) \in (0, 1)$ instead of a
#    share of a softmax.
# 2. **Group-limited routing.** The $E = 256$ experts form $G = 8$ groups (`n_group`), one per node of the
#    training cluster. A group's score is the sum of its two best experts' scores; only the best `topk_group` = 4
#    groups stay eligible, so a token's activations travel to at most 4 nodes.
# 3. **A bias that steers selection only.** A per-expert bias $b_i$ (the `e_score_correction_bias` of the
#    checkpoints) is added to the scores when *choosing* experts — groups and the top-$k$ — but the weights are
#    taken from the unbiased scores. Section 2.3 shows how $b$ is learned without a loss.
#
# $$
# S = \operatorname{TopK}\big(\{\, s_i + b_i : i \text{ in a kept group} \,\}, k\big), \qquad
# g_i = \gamma \cdot \frac{s_i}{\sum_{j \in S} s_j}\;\; (i \in S),
# $$
#
# with $\gamma$ the `routed_scaling_factor` (2.5 in DeepSeek-V3's configuration), which sets how much the routed
# experts' mixture weighs against the shared expert's output that is added to it.

# %%
#| export moe.naive
def route_deepseek(logits, bias, top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0, renormalize=True):
    """DeepSeek-V3 routing: sigmoid scores, group-limited top-k chosen with a bias, weights from unbiased scores.

    logits [N, E]; bias [E] or None (zeros) -> (weights [N, top_k] fp32, indices [N, top_k] int64).
    The E experts form n_group groups of E / n_group; a group's score is the sum of its top-2 biased scores and
    only the best topk_group groups stay eligible. Weights: unbiased scores of the chosen experts, renormalised
    (renormalize=True), times routed_scaling_factor.
    """
    _check_router_inputs("route_deepseek", logits, top_k, bias, n_group, topk_group, routed_scaling_factor)
    N, E = logits.shape
    per_group = E // n_group  # experts a group
    if bias is None:
        bias = logits.new_zeros(E, dtype=torch.float32)

    scores = torch.sigmoid(logits.float())  # [N, E] s_i, in (0, 1)
    choice = scores + bias.float()  # [N, E] s_i + b_i: used to choose, never to weight
    if n_group > 1:
        grouped = choice.view(N, n_group, per_group)  # [N, G, E/G]
        group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [N, G] sum of the best two
        kept = group_score.topk(topk_group, dim=-1).indices  # [N, topk_group]
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)  # [N, G]
        choice = choice.masked_fill(~group_ok.repeat_interleave(per_group, dim=1), float("-inf"))  # [N, E]
    indices = choice.topk(top_k, dim=-1).indices  # [N, k] S
    weights = scores.gather(1, indices)  # [N, k] unbiased s_i
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


# %% [markdown]
# ### Shared experts
#
# DeepSeekMoE (Dai et al., 2024) splits experts finely and adds **shared experts** that every token uses,
# so that the routed ones need not each relearn common knowledge: DeepSeek-V3 has one shared and 256 routed
# experts. Qwen3-Next keeps one shared expert but scales its output by a learned per-token **sigmoid gate**,
# $\sigma(w_s^\top x)$, so a token can turn it down:
#
# $$
# y = \sum_{i \in S} g_i\, \mathrm{FFN}_i(x) + \underbrace{\sigma(w_s^\top x)}_{\text{Qwen3-Next only}}\,
# \mathrm{FFN}_{\mathrm{shared}}(x).
# $$
#
# A shared expert is an ordinary SwiGLU; the `MoE` layer of section 2.8 has both kinds. Here is what the two
# routers do with the same logits — and, checked below, that they do what transformers' routers do:

# %%
g = torch.Generator().manual_seed(0)
demo_logits = torch.randn(4, 8, generator=g)  # [N=4 tokens, E=8 experts]
w_soft, i_soft = route_topk_softmax(demo_logits, top_k=2)
w_ds, i_ds = route_deepseek(demo_logits, None, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
for t in range(4):
    print(f"token {t}: softmax top-2 → experts {i_soft[t].tolist()} weights {[round(v, 3) for v in w_soft[t].tolist()]}"
          f"   |   deepseek → experts {i_ds[t].tolist()} weights {[round(v, 3) for v in w_ds[t].tolist()]}")


# %%
def canonical(weights, indices):
    """Sort each token's (expert, weight) pairs by expert index, so routers that order slots differently compare."""
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


if transformers is not None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = DeepseekV3Config(hidden_size=64, n_routed_experts=32, num_experts_per_tok=6, n_group=8, topk_group=3,
                           routed_scaling_factor=2.5)
    hf_router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(hf_router.weight, std=0.3)
    hf_router.e_score_correction_bias.normal_(std=0.2, generator=g)
    x_demo = torch.randn(50, 64, generator=g)
    logits_hf, w_hf, i_hf = hf_router(x_demo)
    w_me, i_me = route_deepseek(logits_hf, hf_router.e_score_correction_bias, 6, 8, 3, 2.5)
    (w_hf, i_hf), (w_me, i_me) = canonical(w_hf, i_hf), canonical(w_me, i_me)
    assert torch.equal(i_hf, i_me)
    assert_close("deepseek weights", w_hf, w_me, tol=1e-6)

    mcfg = MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=2)
    hf_mix = MixtralTopKRouter(mcfg)
    torch.nn.init.normal_(hf_mix.weight, std=0.3)
    logits_hf, w_hf, i_hf = hf_mix(x_demo)
    w_me, i_me = route_topk_softmax(logits_hf, 2)
    assert torch.equal(i_hf, i_me)
    assert_close("mixtral weights", w_hf, w_me, tol=1e-6)
    print("route_deepseek == transformers' DeepseekV3TopkRouter (32 experts, 8 groups, bias); "
          "route_topk_softmax == MixtralTopKRouter")

# %% [markdown]
# ## 2.3 Balancing the load
#
# Routing is learned, and learning favours the rich: an expert that gets more tokens gets more gradient, becomes
# better, and attracts still more tokens. Left alone, a router can collapse onto a few experts while the others
# idle — wasted parameters, and on a cluster, one overloaded GPU that everyone waits for. Two remedies are in use.
#
# **An auxiliary loss** (Switch Transformer, Fedus et al., 2021; Mixtral). With $f_i$ the fraction of tokens sent
# to expert $i$ and $P_i$ the router's mean probability for it,
#
# $$
# \mathcal L_{\mathrm{aux}} = \alpha \cdot E \sum_{i=1}^{E} f_i\, P_i ,
# \qquad f_i = \frac{1}{N}\,\#\{t : i \in S_t\}, \qquad P_i = \frac{1}{N}\sum_t p_{t,i}.
# $$
#
# $f$ counts and has no gradient; $P$ does, and the product pushes probability away from the experts that are
# already busy. It is smallest (equal to $k$ with this normalisation, as transformers computes it) when the load
# is uniform. The price: a gradient that competes with the language-modelling loss, so $\alpha$ must stay small.
#
# **A bias, no loss** (Wang et al., 2024; DeepSeek-V3). Keep the bias $b$ of `route_deepseek`. After each step,
# count the tokens $c_i$ each expert received and nudge
#
# $$
# b_i \leftarrow b_i + \gamma \cdot \operatorname{sign}(\bar c - c_i),
# $$
#
# raising underloaded experts and lowering overloaded ones. The bias only changes which experts are *chosen*,
# never the weights, and it has no gradient, so the model's loss is untouched. DeepSeek-V3 uses
# $\gamma = 0.001$, plus a tiny sequence-wise auxiliary loss as a safety net.

# %%
#| export moe.naive
def expert_counts(indices, num_experts, *, check_values=True):
    """Tokens routed to each expert: indices [N, k] int -> counts [E] int64, by scatter_add (no host sync, unlike
    bincount on a GPU). check_values=False skips the range check of indices (see the hidden cell of section 2.2)."""
    _check_expert_ids("expert_counts", indices, num_experts, check_values)
    flat = indices.reshape(-1).long()  # [N*k]
    return torch.zeros(num_experts, dtype=torch.int64, device=indices.device).scatter_add_(0, flat,
                                                                                         torch.ones_like(flat))


def load_balancing_loss(router_probs, indices, num_experts):
    """Switch / Mixtral auxiliary loss E · sum_i f_i P_i (multiply by your alpha).

    router_probs [N, E] (probabilities per token), indices [N, k] -> scalar. f_i = tokens routed to i / N (no
    gradient), P_i = mean probability of i. Equals k for perfectly uniform routing, up to E · k when collapsed.
    """
    op = "load_balancing_loss"
    _checks.tensor(op, "router_probs", router_probs, "[N, E]", dtypes=_FLOATS)
    _checks.shape(op, "router_probs", router_probs, (router_probs.shape[0], num_experts), "[N, E]", "E = num_experts")
    _check_expert_ids(op, indices, num_experts, check_values=True)
    _checks.shape(op, "indices", indices, (router_probs.shape[0], indices.shape[1]), "[N, k]", "router_probs' N")
    N = router_probs.shape[0]
    f = expert_counts(indices, num_experts, check_values=False).float() / N  # [E] fraction of tokens, no gradient
    P = router_probs.float().mean(dim=0)  # [E] mean probability, carries the gradient
    return num_experts * (f * P).sum()


def update_bias(bias, tokens_per_expert, rate=1e-3):
    """Auxiliary-loss-free balancing: b_i + rate · sign(mean load − load_i), as a new tensor.

    bias [E], tokens_per_expert [E] (counts of this step) -> bias [E]. Underloaded experts go up, overloaded down,
    an expert exactly at the mean stays.
    """
    _checks.tensor("update_bias", "bias", bias, "[E]", dtypes=_FLOATS)
    _checks.tensor("update_bias", "tokens_per_expert", tokens_per_expert, "[E]")
    _checks.shape("update_bias", "tokens_per_expert", tokens_per_expert, bias.shape, "[E]", "bias' E")
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)


# %% [markdown]
# ### A small training run
#
# A synthetic task where balancing matters. Tokens come from 8 clusters, and each cluster has its own linear map
# from input to target, so 8 experts that each learn one cluster would be ideal. Every token also carries a
# large common offset, so at initialisation the router sends most tokens to the same few experts. We train the
# same tiny MoE (8 experts, top-2, DeepSeek's sigmoid router) three times: with no balancing, with the auxiliary
# loss ($\alpha = 0.03$, on the normalised sigmoid scores as DeepSeek-V3's sequence-wise loss does), and with the
# bias update ($\gamma = 0.01$). Same seed, same batches; a few seconds on a CPU.

# %%
D_TOY, E_TOY, K_TOY, I_TOY, N_TOY, CLUSTERS, STEPS = 16, 8, 2, 32, 256, 8, 300
gen = torch.Generator().manual_seed(0)
centers = torch.randn(CLUSTERS, D_TOY, generator=gen)  # [C, D] one centre per cluster
common = torch.randn(D_TOY, generator=gen)
common = 3 * common / common.norm()  # [D] the offset every token shares: it makes a few experts win at first
maps = torch.randn(CLUSTERS, D_TOY, D_TOY, generator=gen) / D_TOY ** 0.5  # [C, D, D] each cluster's target map


def toy_batch(g, n=N_TOY):
    c = torch.randint(0, CLUSTERS, (n,), generator=g)  # [N] cluster of each token
    x = common + centers[c] + 0.3 * torch.randn(n, D_TOY, generator=g)  # [N, D]
    return x, torch.einsum("nd,nde->ne", x, maps[c]), c  # inputs, targets [N, D], clusters


def init_toy_moe(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(router=(0.1 * torch.randn(E_TOY, D_TOY, generator=g)).requires_grad_(),  # [E, H]
                gate_up=(torch.randn(E_TOY, 2 * I_TOY, D_TOY, generator=g) / D_TOY ** 0.5).requires_grad_(),
                down=(torch.randn(E_TOY, D_TOY, I_TOY, generator=g) / I_TOY ** 0.5).requires_grad_(),
                bias=torch.zeros(E_TOY))  # [E] selection bias: learned by update_bias, no gradient


def train_toy(method, alpha=0.03, rate=0.01):
    """Train a fresh toy MoE; method 'none' | 'aux' | 'bias'. Returns (params, load per step [S, E], loss [S])."""
    from minisparse.moe import load_balancing_loss, moe_naive, route_deepseek, update_bias, expert_counts

    p = init_toy_moe()
    opt = torch.optim.Adam([p["router"], p["gate_up"], p["down"]], lr=3e-3)
    data = torch.Generator().manual_seed(2)  # the same batches for every method
    loads, losses = [], []
    # Saturated sigmoids give tiny gradients whose squares (in Adam's state) are denormal floats, which make CPU
    # arithmetic ~50x slower; flushing them to zero changes nothing visible here.
    torch.set_flush_denormal(True)
    for _ in tqdm(range(STEPS), desc=f"balancing: {method}", mininterval=0.5):
        x, y, _ = toy_batch(data)
        logits = x @ p["router"].T  # [N, E]
        weights, idx = route_deepseek(logits, p["bias"], K_TOY)  # [N, k] each
        out = moe_naive(x, weights, idx, p["gate_up"], p["down"])  # [N, D]
        loss = F.mse_loss(out, y)
        total = loss
        if method == "aux":
            scores = torch.sigmoid(logits)
            total = loss + alpha * load_balancing_loss(scores / scores.sum(-1, keepdim=True), idx, E_TOY)
        opt.zero_grad()
        total.backward()
        opt.step()
        counts = expert_counts(idx, E_TOY)
        if method == "bias":
            p["bias"] = update_bias(p["bias"], counts, rate)
        loads.append(counts.float() / counts.sum())
        losses.append(loss.item())
    torch.set_flush_denormal(False)
    return p, torch.stack(loads), torch.tensor(losses)


runs = {m: train_toy(m) for m in ("none", "aux", "bias")}


# %%
def max_violation(load):
    """DeepSeek's MaxVio: (largest load − mean load) / mean load; 0 is perfectly balanced."""
    return load.max(dim=-1).values * load.shape[-1] - 1


fig = viz.panels({f"{m}: expert load (share of tokens)": runs[m][1] for m in runs}, size=3.0, xlabel="expert",
                 ylabel="training step", vmin=0, vmax=0.4, cmap="magma")
plt.show()

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
smooth = lambda v: np.convolve(v.numpy(), np.ones(10) / 10, mode="valid")  # noqa: E731
for m, color in zip(runs, ["tab:red", "tab:orange", "tab:green"]):
    ax1.plot(smooth(max_violation(runs[m][1])), color=color, label=m)
    ax2.plot(smooth(runs[m][2]), color=color, label=m)
ax1.set(xlabel="training step", ylabel="MaxVio (0 = balanced)", title="load imbalance (10-step mean)")
ax2.set(xlabel="training step", ylabel="task loss (MSE)", yscale="log", title="what the model learns")
for ax in (ax1, ax2):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

final = {m: runs[m][1][-20:].mean(0) for m in runs}  # [E] mean load of the last 20 steps
for m in runs:
    print(f"{m:5s}: final load {[f'{v:.2f}' for v in final[m].tolist()]}  MaxVio {max_violation(final[m]):.2f}  "
          f"final loss {runs[m][2][-20:].mean():.4f}")
assert max_violation(final["none"]) > 1.0  # collapsed: one expert does 2-3x its share, some do nothing
assert (final["none"] < 0.01).sum() == 2 and 2.5 < final["none"].max() * E_TOY < 3.5
assert max_violation(final["aux"]) < 0.5 and max_violation(final["bias"]) < 0.1
assert runs["bias"][2][-20:].mean() <= runs["none"][2][-20:].mean()  # balancing did not cost accuracy here

# %% [markdown]
# Without balancing the router never recovers from its start: two experts fall idle and stay so, and one takes
# about three times its share. The auxiliary loss spreads the load within a hundred steps but keeps some
# imbalance, because it trades balance against the task loss through $\alpha$. The bias update reaches an almost
# perfect balance and, on this task, the lowest loss: it never pulls on the model's gradients. (On a task this
# small all three fit the data; what collapse costs at scale is idle experts and one overloaded GPU.)
#
# ### Capacity and token dropping
#
# Before dropless kernels, frameworks gave every expert a fixed buffer — its **capacity**
# $C = \lceil \mathrm{cf} \cdot N k / E \rceil$ rows, with a capacity factor cf around 1–2 (Switch, GShard) — so
# that expert computation had static shapes. Assignments beyond an expert's capacity are **dropped**: that token
# skips that expert (its residual connection carries it on). First choices are served before second choices.
# The grouped GEMM of section 2.7 needs no capacity at all — it is *dropless* (MegaBlocks, Gale et al., 2022) —
# but the cost of dropping shows how much balance matters:

# %%
#| export moe.naive
def capacity_mask(indices, num_experts, capacity_factor):
    """Which (token, slot) assignments fit when each expert holds ceil(cf · N · k / E) rows: bool [N, k].

    Priority: all first choices (slot 0) in token order, then all second choices, and so on (as GShard).
    """
    _check_expert_ids("capacity_mask", indices, num_experts, check_values=True)
    _checks.positive_float("capacity_mask", "capacity_factor (1.0 = exactly the mean load)", capacity_factor)
    N, k = indices.shape
    capacity = math.ceil(capacity_factor * N * k / num_experts)
    slot_major = indices.t().reshape(-1).long()  # [k*N] slot 0 of every token first
    one_hot = F.one_hot(slot_major, num_experts)  # [k*N, E]
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # [k*N] place in its expert's queue
    return (position < capacity).view(k, N).t()  # [N, k]


# %%
from minisparse.moe import capacity_mask, moe_naive, route_deepseek

x_eval, y_eval, c_eval = toy_batch(torch.Generator().manual_seed(99), n=1024)  # one fixed batch for sections 2.3–2.5
factors = [1.0, 1.25, 1.5, 2.0]
fig, ax = plt.subplots(figsize=(6, 3.4))
for m, color in zip(runs, ["tab:red", "tab:orange", "tab:green"]):
    p = runs[m][0]
    with torch.no_grad():
        w, idx = route_deepseek(x_eval @ p["router"].T, p["bias"], K_TOY)
        dropless = moe_naive(x_eval, w, idx, p["gate_up"], p["down"])
        dropped, errors = [], []
        for cf in factors:
            keep = capacity_mask(idx, E_TOY, cf)  # [N, k]
            out = moe_naive(x_eval, w * keep, idx, p["gate_up"], p["down"])  # a dropped slot contributes nothing
            dropped.append(1 - keep.float().mean().item())
            errors.append(((out - dropless).norm() / dropless.norm()).item())
    ax.plot(factors, [100 * d for d in dropped], marker="o", color=color, label=f"{m}")
    if m == "none":
        assert 0.25 < dropped[0] < 0.4 and dropped[-1] > 0.05  # a third at cf 1, still a tenth at cf 2
    else:
        assert dropped[0] < 0.1 and max(dropped[1:]) == 0
    print(f"{m:5s}: dropped {', '.join(f'{100 * d:.1f} %' for d in dropped)} of assignments at cf = {factors}; "
          f"output change vs dropless {', '.join(f'{e:.2f}' for e in errors)}")
ax.set(xlabel="capacity factor", ylabel="assignments dropped (%)", title="Token dropping on the same 1024 tokens")
ax.legend(title="trained with", fontsize=8)
ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# The collapsed router loses about a third of its assignments at capacity factor 1 and still a tenth at 2; the
# balanced ones lose a few percent at 1 and nothing from 1.25 on. Dropping is one more reason to balance, and the
# reason DeepSeek-V3 drops no tokens at all, in training or inference: with good balance and dropless kernels
# like the one in section 2.7, it has no need to.

# %% [markdown]
# ## 2.4 Dispatch: from tokens to experts and back
#
# The equation of section 2.1 reads "for each token, for each chosen expert". Computed that way, every token does
# $k$ small matrix–vector products: hopeless on a GPU. The spec below turns the loop around — **for each expert**,
# gather its tokens, run its FFN once on all of them, and add the weighted results back. It is the readable
# reference every faster version is tested against (transformers' eager experts loop the same way).

# %%
#| export moe.naive
def expert_ffn(x, gate_up, down):
    """One SwiGLU expert in transformers' layout: x [n, H], gate_up [2I, H], down [H, I] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each: W_gate x, W_up x
    return F.linear(F.silu(gate) * up, down)  # [n, H]


def moe_naive(x, weights, indices, gate_up_proj, down_proj):
    """The spec: y_t = sum_j weights[t, j] · FFN_{indices[t, j]}(x_t), one expert at a time.

    x [N, H]; weights, indices [N, k]; gate_up_proj [E, 2I, H]; down_proj [E, H, I] -> y [N, H] in x's dtype.
    """
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [N, H] accumulate in fp32
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(indices == e)  # [n_e] tokens routed to e, and in which of their k slots
        if token.numel() == 0:
            continue
        out = expert_ffn(x[token], gate_up_proj[e], down_proj[e])  # [n_e, H]
        y = y.index_add(0, token, out.float() * weights[token, slot, None].float())
    return y.to(x.dtype)


# %% [markdown]
# The loop still launches a few small matrix multiplies per expert, and the host must know how many tokens each
# expert got before it can launch them. A fast layer instead **sorts** the $N k$ (token, slot) pairs by expert
# once, so that each expert's rows are contiguous; then one kernel can multiply every expert's block of rows by
# that expert's weights. Sorting gives three things:
#
# - `x_sorted [N·k, H]`: row $i$ is the token of the $i$-th pair in expert order;
# - `offsets [E]` (int32): the cumulative row ends, expert $e$ owning rows `offsets[e-1]:offsets[e]` (empty
#   experts have equal ends) — the format `torch._grouped_mm` takes;
# - `order [N·k]`: where each sorted row came from, to undo the sort and combine the $k$ outputs with their weights.

# %%
#| export moe.naive
def permute(x, indices, num_experts, *, check_values=True):
    """Sort the (token, slot) pairs by expert: x [N, H], indices [N, k] ->
    (x_sorted [N*k, H], order [N*k] int64, offsets [E] int32).

    x_sorted[i] = x[order[i] // k]; expert e owns rows offsets[e-1]:offsets[e]. check_values=False skips the range
    check of indices, which reads them back to the host (the MoE layer, whose indices come from top-k, skips it).
    """
    _check_permute_args("permute", x, indices, num_experts, check_values)
    flat = indices.reshape(-1).long()  # [N*k] expert of each pair, token-major
    order = torch.argsort(flat, stable=True)  # [N*k] pairs sorted by expert, ties in token order
    x_sorted = x[order // indices.shape[1]]  # [N*k, H]
    offsets = expert_counts(indices, num_experts, check_values=False).cumsum(0).to(torch.int32)  # [E] row ends
    return x_sorted, order, offsets


def unpermute(y_sorted, weights, order):
    """Undo permute and combine: y[t] = sum_j weights[t, j] · y_sorted[row of pair (t, j)].

    y_sorted [N*k, H], weights [N, k], order [N*k] (from permute) -> y [N, H] in y_sorted's dtype.
    """
    _check_unpermute_args("unpermute", y_sorted, weights, order)
    N, k = weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)  # [N*k] row of each pair
    y = y_sorted[inverse].view(N, k, y_sorted.shape[-1])  # [N, k, H] back in (token, slot) order (N may be 0)
    return (y.float() * weights[..., None].float()).sum(dim=1).to(y_sorted.dtype)


def grouped_mm_ref(x, w, offsets):
    """The grouped GEMM as a loop (the spec of section 2.7): rows offsets[g-1]:offsets[g] of x times w[g].

    x [M, K] sorted by expert, w [G, K, N], offsets [G] int32 cumulative row ends -> [M, N].
    """
    check_grouped_mm_args("grouped_mm_ref", x, w, offsets)  # one dtype, K shared, offsets end at M
    ends = [int(e) for e in offsets.tolist()]
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


# %% [markdown]
# Put together, permute → one grouped multiply per projection → unpermute is the same computation as the loop.
# A tiny example first, then the check:

# %%
from minisparse.moe import grouped_mm_ref, permute, unpermute

tiny_idx = torch.tensor([[2, 0], [0, 1], [2, 1]])  # 3 tokens, top-2, 4 experts (expert 3 gets nobody)
tiny_x = torch.arange(3.0)[:, None].repeat(1, 2)  # token t's row is [t, t]
xs, order, offs = permute(tiny_x, tiny_idx, num_experts=4)
print("pairs (token, slot) in expert order:", [(int(o) // 2, int(o) % 2) for o in order])
print("sorted rows come from tokens:       ", xs[:, 0].long().tolist())
print("offsets (cumulative row ends):      ", offs.tolist(), "→ expert 3 is empty")

p = runs["bias"][0]
with torch.no_grad():
    w, idx = route_deepseek(x_eval @ p["router"].T, p["bias"], K_TOY)
    spec = moe_naive(x_eval, w, idx, p["gate_up"], p["down"])
    xs, order, offs = permute(x_eval, idx, E_TOY)  # [N*k, D]
    gate, up = grouped_mm_ref(xs, p["gate_up"].transpose(1, 2), offs).chunk(2, dim=-1)  # [N*k, I] each
    ys = grouped_mm_ref(F.silu(gate) * up, p["down"].transpose(1, 2), offs)  # [N*k, D]
    sorted_path = unpermute(ys, w, order)
assert_close("permute → grouped_mm_ref → unpermute vs moe_naive", spec, sorted_path, tol=1e-5)
print("the sorted path equals the per-expert loop")

# %% [markdown]
# Note `transpose(1, 2)`: transformers stores each expert's projection as `[out, in]` (as `nn.Linear` does), while
# a grouped GEMM multiplies `x [M, K]` by `w [G, K, N]`. The transposed *view* costs nothing; the kernel follows
# its strides.

# %% [markdown]
# ## 2.5 See it
#
# ### The routing map
#
# Each row is a token of the evaluation batch, sorted by the cluster it came from; each column an expert; the colour
# is the weight the router gives it (zero when not chosen). On the left, the router trained without balancing; on
# the right, the one trained with the bias update.

# %%
order_c = torch.argsort(c_eval[:256], stable=True)  # 256 tokens, grouped by cluster
maps_w = {}
for m in ("none", "bias"):
    p = runs[m][0]
    with torch.no_grad():
        w, idx = route_deepseek(x_eval[:256] @ p["router"].T, p["bias"], K_TOY)
    dense = torch.zeros(256, E_TOY).scatter_(1, idx, w)  # [N, E] weight of each chosen expert, 0 elsewhere
    maps_w[f"trained with: {m}"] = dense[order_c]
fig = viz.panels(maps_w, size=3.4, xlabel="expert", ylabel="token (sorted by cluster)", cmap="Blues", vmin=0,
                 vmax=1)
for ax in fig.axes:
    for b in torch.cumsum(torch.bincount(c_eval[:256], minlength=CLUSTERS), 0)[:-1]:
        ax.axhline(b - 0.5, color="tab:red", lw=0.5)
plt.show()

fig, ax = plt.subplots(figsize=(7, 2.8))
width = 0.27
for j, (m, color) in enumerate(zip(runs, ["tab:red", "tab:orange", "tab:green"])):
    ax.bar(np.arange(E_TOY) + (j - 1) * width, 100 * final[m], width, color=color, label=m)
ax.axhline(100 / E_TOY, color="black", ls=":", lw=1, label="uniform")
ax.set(xlabel="expert", ylabel="share of assignments (%)", title="Expert load at the end of training")
ax.legend(fontsize=8, ncol=4)
fig.tight_layout()
plt.show()

# %% [markdown]
# The red lines separate clusters. With balancing, each band of rows — one cluster — picks a consistent pair of
# experts, and the pairs differ from cluster to cluster: the experts have *specialised*. Without it, most clusters
# share the same few experts and two columns stay empty.
#
# ### Group-limited routing
#
# DeepSeek-V3's groups, drawn small: 32 experts in 8 groups of 4; each token keeps its 3 best groups (grey: the
# groups it may not use) and picks 6 experts among them (white dots). Red rings mark the token's top-6 over *all*
# experts, without the limit: random scores scatter a token's best experts over many groups, so here the limit
# changes the choice of almost every token. Training adapts the router to the limit; what it buys is that a
# token's activations travel to at most `topk_group` nodes.

# %%
g = torch.Generator().manual_seed(3)
G_E, G_G, G_TG, G_K = 32, 8, 3, 6
glogits = torch.randn(12, G_E, generator=g) + 1.5 * torch.randn(1, G_E, generator=g)  # [12 tokens, 32 experts]
_, gidx = route_deepseek(glogits, None, G_K, n_group=G_G, topk_group=G_TG)
_, free_idx = route_deepseek(glogits, None, G_K)  # the same router without groups
scores = torch.sigmoid(glogits)
group_score = scores.view(12, G_G, -1).topk(2, dim=-1).values.sum(-1)  # [12, 8]
kept = torch.zeros(12, G_G, dtype=torch.bool).scatter_(1, group_score.topk(G_TG, dim=-1).indices, True)
fig, ax = plt.subplots(figsize=(8, 3.6))
viz.heatmap(ax, scores, "sigmoid scores; grey = masked group, ● chosen, ○ top-6 without groups", xlabel="expert",
            ylabel="token", cmap="viridis", colorbar=True)
masked = (~kept).repeat_interleave(G_E // G_G, dim=1).float().numpy()  # [12, 32]
ax.imshow(np.ma.masked_where(masked == 0, masked), cmap="Greys", vmin=0, vmax=1.4, alpha=0.85, aspect="auto",
          interpolation="nearest")
for t in range(12):
    ax.scatter(gidx[t], [t] * G_K, s=22, color="white", edgecolor="black", lw=0.5)
    ax.scatter(free_idx[t], [t] * G_K, s=70, facecolor="none", edgecolor="tab:red", lw=1)
for b in range(1, G_G):
    ax.axvline(b * G_E // G_G - 0.5, color="white", lw=1)
fig.tight_layout()
plt.show()
differs = sum(set(gidx[t].tolist()) != set(free_idx[t].tolist()) for t in range(12))
print(f"the group limit changes at least one of the 6 experts for {differs} of these 12 tokens")

# %% [markdown]
# ### Explore
#
# A fixed batch of 48 tokens routed over 16 experts by `route_deepseek`; some experts are popular by construction.
# Move `top_k`, the number of groups and how many the token keeps, and a balancing bias — here one big step of the
# sign rule, `bias = strength · sign(mean load − load)` of the unbiased routing. Watch the load bars even out as
# the bias grows, while the weights (the colours) keep coming from the unbiased scores.

# %%
# NBVAL_IGNORE_OUTPUT
g = torch.Generator().manual_seed(5)
X_LOGITS = torch.randn(48, 16, generator=g) + torch.linspace(1.5, -1.5, 16)  # [48, 16] low experts are popular


def draw_routing(top_k=4, n_group=4, topk_group=2, bias_strength=0.0):
    from minisparse.moe import expert_counts, route_deepseek

    topk_group = min(topk_group, n_group)
    top_k = min(top_k, topk_group * (16 // n_group))  # a token cannot pick more experts than its groups hold
    _, idx0 = route_deepseek(X_LOGITS, None, top_k, n_group, topk_group)
    load0 = expert_counts(idx0, 16).float()
    bias = bias_strength * torch.sign(load0.mean() - load0)  # [16] one step of the sign rule
    w, idx = route_deepseek(X_LOGITS, bias, top_k, n_group, topk_group)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(width_ratios=[1.3, 1]))
    viz.heatmap(ax1, torch.zeros(48, 16).scatter_(1, idx, w), f"weights: top-{top_k}, {topk_group} of {n_group} "
                f"groups", xlabel="expert", ylabel="token", cmap="Blues", vmin=0, vmax=1, colorbar=True)
    for b in range(1, n_group):
        ax1.axvline(b * 16 // n_group - 0.5, color="tab:red", lw=0.8)
    ax2.bar(range(16), load0, color="lightgrey", label="no bias")
    ax2.bar(range(16), expert_counts(idx, 16), color="tab:green", width=0.5, label=f"bias {bias_strength:g}")
    ax2.axhline(48 * top_k / 16, color="black", ls=":", lw=1)
    ax2.set(xlabel="expert", ylabel="tokens", title=f"load; MaxVio {max_violation(expert_counts(idx, 16).float()):.2f}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


explorer = viz.explorer(draw_routing, top_k=(1, 8, 1), n_group=[1, 2, 4, 8], topk_group=(1, 8, 1),
                        bias_strength=(0.0, 1.0, 0.05))

# %% [markdown]
# ## 2.6 Cost model
#
# FLOPs per token are the easy part: 2 per active parameter, plus the router.

# %%
#| export moe.cost
def moe_flops_per_token(hidden, inter, num_experts, top_k, n_shared=0, shared_inter=None):
    """Forward FLOPs one token spends in one MoE layer: router + top_k routed + shared experts (2 per weight)."""
    _, active = moe_params(hidden, inter, num_experts, top_k, n_shared, shared_inter)
    return 2 * active + 2 * hidden * num_experts


def grouped_mm_flops(M, K, N):
    """FLOPs of a grouped GEMM over M rows in total: every row is multiplied by one K × N matrix."""
    return 2 * M * K * N


def grouped_mm_bytes(M, K, N, num_groups, bytes_per_element=2):
    """Bytes a grouped GEMM must move at least: x [M, K] and y [M, N] once, every group's w [K, N] once."""
    return bytes_per_element * (M * K + num_groups * K * N + M * N)


def expert_intensity(tokens_per_expert, hidden, inter, bytes_per_element=2):
    """FLOPs per byte of one SwiGLU expert that processes `tokens_per_expert` tokens in one batch.

    Its 3·hidden·inter weights are read once; each token's input and output (hidden each) once.
    """
    m = np.asarray(tokens_per_expert, dtype=float)
    flops = 6 * m * hidden * inter
    return flops / (bytes_per_element * (3 * hidden * inter + 2 * m * hidden))


# %% [markdown]
# The bytes are the interesting part. An expert's weights must be read from memory every time it runs, whatever
# the number of tokens it gets. With $m$ tokens per expert the arithmetic intensity is
#
# $$
# \frac{\text{FLOPs}}{\text{bytes}} = \frac{6\,m\,H I}{2\,(3HI + 2mH)} \approx m \quad (m \ll I),
# $$
#
# about **one FLOP per byte per token** — and a GPU needs far more to be busy: an H200 does 693 bf16 TFLOP/s
# against 4.25 TB/s of memory bandwidth (measured on the project's machine), a *ridge point* of 163 FLOP/byte.
# Below it the expert is memory-bound and its FLOPs are nearly free; above it, compute-bound. The number of tokens
# an expert sees is $m = N_{\mathrm{batch}} \cdot k / E$, so the sparser the model, the larger the batch it needs.

# %%
from minisparse.moe import expert_intensity, grouped_mm_bytes, grouped_mm_flops, moe_flops_per_token

RIDGE = 693e12 / 4.25e12  # H200, bf16 dense matmul vs HBM copy (DESIGN.md §7)
m = np.logspace(0, 4, 200)
fig, ax = plt.subplots(figsize=(7.5, 4.2))
for name, H, I in [("DeepSeek-V3 expert (H 7168, I 2048)", 7168, 2048), ("Qwen3-Next expert (H 2048, I 512)", 2048,
                                                                         512), ("Mixtral expert (H 4096, I 14336)",
                                                                                4096, 14336)]:
    ax.loglog(m, expert_intensity(m, H, I), label=name)
ax.axhline(RIDGE, color="tab:red", ls="--", lw=1)
ax.text(1.2, RIDGE * 1.15, f"H200 ridge ≈ {RIDGE:.0f} FLOP/byte: compute-bound above", color="tab:red", fontsize=8)
for tokens, label in [(64, "decode, 64 sequences"), (16384, "prefill / training, 16K tokens")]:
    m_ds = tokens * 8 / 256  # DeepSeek-V3: tokens per expert = batch · k / E
    ax.axvline(m_ds, color="grey", ls=":", lw=1)
    ax.text(m_ds * 1.08, 1.5, f"DeepSeek-V3,\n{label}:\n{m_ds:g} tokens/expert", fontsize=7, color="grey")
ax.set(xlabel="tokens per expert in one batch (m)", ylabel="arithmetic intensity (FLOP/byte)",
       title="A DeepSeek-V3 expert is memory-bound until it sees ~170 tokens at once")
ax.legend(fontsize=8, loc="upper left")
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Assumptions: bf16 weights and activations; one expert's SwiGLU with its weights read once and each token's
# input and output once (the $2I$-wide intermediate kept on chip, as a fused kernel would); H200 numbers
# measured on the project's machine.*
#
# Decoding 64 sequences at once gives each DeepSeek-V3 expert 2 tokens: it runs at about 2 FLOP/byte, 1 % of the
# GPU's compute — which is why MoE inference spreads experts over many GPUs (expert parallelism) and batches
# hard. A 16K-token training or prefill batch gives 512 tokens per expert, well past the ridge.
#
# The benchmark of section 2.9 is such a batch: 16K tokens × top-8 = 131,072 rows, 64 experts, the gate/up
# projection of a 2048-wide model. The checks below tie the formulas to numbers recorded elsewhere: the H200 timing
# of `torch._grouped_mm` at this shape in `bench/results/moe.json` (2026-11-28) and DeepSeek-V3's active parameters.

# %%
M_B, K_B, N_B, E_B = 131072, 2048, 2816, 64
fl = grouped_mm_flops(M_B, K_B, N_B)
by = grouped_mm_bytes(M_B, K_B, N_B, E_B)
TORCH_MS = 2.47  # torch._grouped_mm at this shape on the H200, bf16 (bench/results/moe.json, 2026-11-28)
tflops = fl / (TORCH_MS * 1e-3) / 1e12
print(f"benchmark shape: {fl / 1e12:.2f} TFLOP, {by / 1e9:.2f} GB moved, intensity {fl / by:.0f} FLOP/byte; "
      f"torch._grouped_mm's {TORCH_MS} ms is {tflops:.0f} TFLOP/s, {tflops / 693:.0%} of the bf16 matmul peak")
assert fl / by > RIDGE and 0.8 < tflops / 693 < 1  # compute-bound, and the measured time is close to the peak's
# DeepSeek-V3 per MoE layer: 9 experts (8 routed + 1 shared) of 3 · 7168 · 2048 weights, + the router
ds_flops = moe_flops_per_token(7168, 2048, 256, 8, n_shared=1)
assert ds_flops == 2 * 9 * 3 * 7168 * 2048 + 2 * 7168 * 256
m_ridge = next(x for x in range(1, 10_000) if expert_intensity(x, 7168, 2048) > RIDGE)
print(f"DeepSeek-V3 MoE layer: {ds_flops / 1e9:.2f} GFLOPs a token; its experts pass the ridge at "
      f"{m_ridge} tokens each, i.e. batches of {m_ridge * 256 // 8:,} tokens")
assert 160 < m_ridge < 190

# %% [markdown]
# ## 2.7 Fast: a grouped GEMM in Triton
#
# After `permute`, an MoE layer is two **grouped GEMMs** (gate/up, then down) with an activation between them:
# rows `offsets[g-1]:offsets[g]` of `x [M, K]` are multiplied by `w[g] [K, N]`. Three ways to compute it:
#
# - **A loop** over experts, one matmul each (`grouped_mm_ref`): $E$ launches, many of them small, and the host
#   must read the counts back from the GPU first — a synchronisation every layer.
# - **Padding** every expert to the same capacity and calling one batched matmul: one launch, but padded rows are
#   wasted work, and the capacity must be chosen (drop tokens or waste memory, section 2.3).
# - **One kernel over all experts**: the output is cut into tiles of `BLOCK_M` rows × `BLOCK_N` columns, and a
#   tile never straddles two experts, so each program multiplies rows of one expert by that expert's weights.
#   This is the approach of `torch._grouped_mm` and, in block-sparse form, of MegaBlocks; it is what we build.
#
# ### The tile schedule
#
# Expert $g$ has $n_g$ rows and needs $\lceil n_g / \mathrm{BLOCK\_M} \rceil$ row tiles; an empty expert needs
# none. Listing each tile's expert and first row gives the schedule. It is computed on the GPU with a handful of
# tensor operations — no host synchronisation: the launch uses the upper bound
# $\lceil M / \mathrm{BLOCK\_M} \rceil + G$ tiles (each expert wastes at most one partial tile), and the unused
# slots at the end are marked $-1$ so their programs exit at once.


# %%
#| export moe.triton
import torch
import triton
import triton.language as tl

from minisparse import runtime
from minisparse.moe.naive import check_grouped_mm_args


def tile_schedule(offsets, num_rows, block_m):
    """The row tiles of a grouped GEMM: slot s is rows tile_row[s] : tile_row[s] + block_m of expert tile_expert[s].

    offsets [G] int32 cumulative row ends, num_rows = M -> (tile_expert [S], tile_row [S]) int32, with
    S = ceil(M / block_m) + G slots. Tiles never straddle two experts (a tile's rows past its expert's end are
    masked); empty experts get no tile; unused trailing slots have tile_expert = -1. Tensor ops only: no host sync.
    """
    G = offsets.numel()
    ends = offsets.long()  # [G]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # [G] first row of each expert
    tiles = (ends - starts + block_m - 1) // block_m  # [G] row tiles of each expert, 0 when empty
    last = tiles.cumsum(0)  # [G] number of tiles of experts 0..g
    slot = torch.arange(triton.cdiv(num_rows, block_m) + G, device=offsets.device)  # [S] tile slots
    expert = torch.searchsorted(last, slot, right=True)  # [S] first expert whose tiles reach past the slot; G if none
    e = expert.clamp(max=G - 1)
    row = starts[e] + (slot - (last - tiles)[e]) * block_m  # [S] first row: expert start + its tiles before the slot
    return torch.where(expert < G, expert, -1).to(torch.int32), row.to(torch.int32)


# %% [markdown]
# Here is the schedule for six experts with 40, 0, 75, 13, 100 and 28 rows and `BLOCK_M` = 32 — next to what a
# plain matmul's tiling of the same 256 sorted rows would do:

# %%
from minisparse.moe import tile_schedule

counts_demo = [40, 0, 75, 13, 100, 28]
offs_demo = torch.tensor(counts_demo).cumsum(0).to(torch.int32)
texp, trow = tile_schedule(offs_demo, int(offs_demo[-1]), 32)
print("tile_expert:", texp.tolist())
print("tile_row:   ", trow.tolist())

colors = plt.cm.tab10(np.arange(len(counts_demo)))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
ends_demo = offs_demo.tolist()
starts_demo = [0] + ends_demo[:-1]
for ax in (ax1, ax2):
    for e, (s, n) in enumerate(zip(starts_demo, counts_demo)):
        if n:
            ax.axhspan(s, s + n, xmin=0, xmax=0.12, color=colors[e])
            ax.text(0.06, s + n / 2, f"expert {e}\n{n} rows", ha="center", va="center", fontsize=7,
                    transform=ax.get_yaxis_transform())
    ax.set_xlim(0, 1)
    ax.set_xticks([])
ax1.set_ylim(ends_demo[-1] + 12, 0)
ax1.set_ylabel("row of x (sorted by expert)")
for i, r in enumerate(range(0, ends_demo[-1], 32)):  # a plain matmul: a tile every 32 rows
    owners = {e for e, (s, n) in enumerate(zip(starts_demo, counts_demo)) if n and s < r + 32 and s + n > r}
    bad = len(owners) > 1
    ax1.add_patch(plt.Rectangle((0.2, r + 1), 0.7, 30, facecolor="mistyrose" if bad else "white",
                                edgecolor="tab:red" if bad else "black"))
    ax1.text(0.55, r + 16, f"tile {i}: experts {sorted(owners)}" + ("  ✗ straddles" if bad else ""), ha="center",
             va="center", fontsize=7)
ax1.set_title("plain tiling: tiles straddle experts")
for i, (e, r) in enumerate(zip(texp.tolist(), trow.tolist())):
    if e < 0:
        continue
    used = min(32, ends_demo[e] - r)
    x0 = 0.18 + 0.41 * (i % 2)  # alternate two lanes so that a partial tile's overhang stays visible
    ax2.add_patch(plt.Rectangle((x0, r + 0.5), 0.38, used - 1, facecolor=colors[e], alpha=0.45, edgecolor="black"))
    if used < 32:  # rows past the expert's end: computed, never stored
        ax2.add_patch(plt.Rectangle((x0, r + used), 0.38, 32 - used, facecolor="none", edgecolor="grey", ls=":",
                                    hatch="///"))
    ax2.text(x0 + 0.19, r + min(used, 32) / 2, f"tile {i}: e{e}\nrows {r}–{r + used - 1}", ha="center",
             va="center", fontsize=6.5)
ax2.set_title(f"tile_schedule: {int((texp >= 0).sum())} tiles, {int((texp < 0).sum())} unused slots")
fig.tight_layout()
plt.show()

# %% [markdown]
# Eleven tiles instead of eight, and the rows a partial tile computes past its expert's end (hatched; it overlaps
# the next expert's first tile, which computes those rows properly) are never stored. The overhead is at most one
# partial tile per expert: with 131,072 rows, 64 experts and `BLOCK_M` = 128, at most 64 tiles on top of 1,024,
# and about half that on average. Each tile gets the weights of the one expert that owns its rows — that is the
# whole trick.
#
# ### The forward kernel, tile by tile
#
# One program computes one `BLOCK_M × BLOCK_N` tile of `y`. It reads its (expert, first row) from the schedule,
# then walks along $K$ in steps of `BLOCK_K`, multiplying a `BLOCK_M × BLOCK_K` slab of `x` by a
# `BLOCK_K × BLOCK_N` slab of `w[g]` and accumulating in fp32 (`tl.dot` maps this onto tensor cores). Three details:
#
# - **Rows past the expert's end** are read (clamped to row $M - 1$ so nothing is out of bounds) but never stored.
#   Reading them costs nothing extra — the slab is loaded anyway — and saves a mask in the inner loop.
# - **Program order.** Programs run roughly in launch order. Consecutive programs take neighbouring column blocks of
#   a few row tiles (`GROUP_M` of them) so that those tiles' `x` slabs and `w[g]`'s columns are reused from L2
#   cache instead of re-read from memory.
# - **Strides, not layouts.** `x`, `w` and `y` are addressed through their strides, so `w` may be the transposed
#   view of transformers' `[E, out, in]` weights, and the backward pass can pass $w^\top$ without a copy.
#
# Names in the kernels: `*_ptr` is an argument's base pointer, `w_g` the base of expert $g$'s matrix (computed
# once), `*_ptrs` a block of pointers; `rows`, `cols` and `ks` index a tile; `acc` is the fp32 accumulator; `BM`,
# `BN`, `BK` in the shape comments abbreviate `BLOCK_M`, `BLOCK_N`, `BLOCK_K`.

# %%
#| export moe.triton
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, M, N, K, num_tiles,
                       stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym, stride_yn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr):
    """The grouped GEMM (forward, and dx on wᵀ): y[rows of g] = x[rows of g] @ w[g] for every expert g.

    Program: one BLOCK_M × BLOCK_N tile of y, rows tile_row[t] : + BLOCK_M of the tile schedule's slot t, column
    block pid_n. All its rows belong to expert g = tile_expert[t]; a slot with g = -1 is unused and returns at once.
    Grid: (num_tiles · ⌈N / BLOCK_N⌉,), in bands of GROUP_M slots: a band's programs cover its slots' column blocks
    one after another, so programs that run together share x's rows and w[g]'s columns in L2.
    Tiling: K in steps of BLOCK_K into an fp32 accumulator [BLOCK_M, BLOCK_N]:

                  K →                           N →                            N →
          ┌──────────────────┐          ┌──────────────────┐          ┌──────────────────┐
     row0 │░░ x[row0:+BM] ░░░│       K  │      ┊▓▓▓▓┊      │     row0 │      ┊▓▓▓▓┊      │ BLOCK_M rows,
          │ → step BLOCK_K → │  @    ↓  │ w[g] ┊▓▓▓▓┊      │   =      │  y   ┊▓▓▓▓┊      │ stored only up
          └──────────────────┘          │      ┊▓▓▓▓┊      │          └──────────────────┘ to offsets[g]
                                        └──────────────────┘
                                         pid_n * BLOCK_N

    Math: y[r, n] = Σ_k x[r, k] · w[g, k, n] for the tile's rows r < offsets[g]. Rows past the expert's end are read
    (clamped to row M - 1, so in bounds) and never stored.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # program order: bands of GROUP_M slots × all column blocks, a slot's column blocks spread over its band
    per_group = GROUP_M * num_pid_n
    first_tile = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    g = tl.load(tile_expert_ptr + tile)  # the tile's expert, -1 for an unused slot
    if g < 0:
        return
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(offsets_ptr + g)  # expert g owns rows [.., row_end)
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    rows_read = tl.minimum(rows, M - 1).to(tl.int64)  # rows past the end are read (in bounds), never stored
    x_ptrs = x_ptr + rows_read[:, None] * stride_xm + ks[None, :] * stride_xk  # [BM, BK]
    w_g = w_ptr + g.to(tl.int64) * stride_wg  # expert g's [K, N] matrix
    w_ptrs = w_g + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            if EVEN_N:
                b = tl.load(w_ptrs)
            else:
                b = tl.load(w_ptrs, mask=cols[None, :] < N, other=0.0)
        else:
            a = tl.load(x_ptrs, mask=ks[None, :] < K - k0, other=0.0)
            b = tl.load(w_ptrs, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)  # [BM, BN] += [BM, BK] @ [BK, BN], fp32
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    keep = (rows[:, None] < row_end) & (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=keep)


# %% [markdown]
# ### The backward pass: two more grouped GEMMs
#
# For $y_g = x_g w_g$ (the rows of expert $g$) and an upstream gradient $\partial y$:
#
# $$
# \partial x_g = \partial y_g\, w_g^\top, \qquad \partial w_g = x_g^\top\, \partial y_g .
# $$
#
# The first is the forward kernel again, with $w^\top$ (a strided view) and the same tile schedule. The second is
# different in shape: the rows — which expert owns them — are now the *reduction* dimension. Each program owns a
# `BLOCK_K × BLOCK_N` tile of one expert's $\partial w_g$ and loops over that expert's rows `BLOCK_M` at a time:
#
# ```
#   ∂w[g] tile (BLOCK_K × BLOCK_N)  =  Σ over row blocks r of expert g:   x[r, k-block]ᵀ  @  ∂y[r, n-block]
#                                                                       (BLOCK_K × BLOCK_M)  (BLOCK_M × BLOCK_N)
# ```
#
# Its grid is (tiles of the $K \times N$ matrix, $G$): all programs of one expert run together and share its rows in
# L2. An empty expert's loop runs zero times and stores zeros — its gradient — so nothing needs clearing first.
# Rows past the expert's end are masked to zero here: unlike the forward pass, they would otherwise be summed in.

# %%
#| export moe.triton
@triton.jit
def _grouped_mm_dw_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, N, K,
                          stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwg, stride_dwk, stride_dwn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """The grouped GEMM's weight gradient: dw[g] = x[rows of g]ᵀ @ dy[rows of g] for every expert g.

    Program: one BLOCK_K × BLOCK_N tile of dw[g]; it walks expert g's rows BLOCK_M at a time.
    Grid: (⌈K / BLOCK_K⌉ · ⌈N / BLOCK_N⌉, G): the programs of one expert run together and share its rows in L2.
    Tiling: a row block of x read transposed, [BLOCK_K, BLOCK_M], times the same row block of dy, [BLOCK_M, BLOCK_N],
    summed into an fp32 accumulator [BLOCK_K, BLOCK_N]:

             rows of g →                 N →                      N →
          ┌──────────────────┐   r  ┌──────────────────┐      ┌──────────────────┐
        K │░░ x[r0:+BM]ᵀ ░░░░│   ↓  │     ┊▓▓▓▓┊       │    K │     ┊▓▓▓▓┊       │ tile of dw[g],
          │ → step BLOCK_M → │  @   │ dy  ┊▓▓▓▓┊       │   =  │dw[g]┊▓▓▓▓┊       │ every row block
          └──────────────────┘      └──────────────────┘      └──────────────────┘ of expert g summed

    Math: dw[g, k, n] = Σ_{start <= r < end} x[r, k] · dy[r, n], with [start, end) = [offsets[g-1], offsets[g]).
    Rows past the expert's end are masked to zero (here they would be summed in); an empty expert's loop runs zero
    times and stores zeros, its gradient.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    ks = (pid // num_pid_n) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    cols = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    start = tl.load(offsets_ptr + g - 1, mask=g > 0, other=0)  # expert g owns rows [start, end)
    end = tl.load(offsets_ptr + g)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)  # [BM]
        in_g = rows < end
        rows64 = rows.to(tl.int64)
        xt = tl.load(x_ptr + rows64[None, :] * stride_xm + ks[:, None] * stride_xk,
                     mask=in_g[None, :] & (ks[:, None] < K), other=0.0)  # [BK, BM] = x[rows, ks]ᵀ
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=in_g[:, None] & (cols[None, :] < N), other=0.0)  # [BM, BN]
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)  # [BK, BN]

    dw_g = dw_ptr + g.to(tl.int64) * stride_dwg  # expert g's [K, N] gradient
    dw_ptrs = dw_g + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn  # [BK, BN]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


# %% [markdown]
# ### Block sizes, launch and autograd
#
# Tile sizes trade on-chip memory against reuse. On an H100/H200 (227 KiB of shared memory a block) a 128 × 256 tile
# with `BLOCK_K` = 64 and 3 pipeline stages takes 144 KiB in bf16 — each stage holds a 128 × 64 slab of `x` and a
# 64 × 256 slab of `w` — while a Colab T4 has 64 KiB and gets 64 × 64 tiles; fp32 operands take twice the bytes, so
# their rows halve `BLOCK_K`. Both kernels read these settings from the book's one table, `runtime.LAUNCH_TABLE`:
# row `"moe.grouped_mm"` for the forward kernel (and $\partial x$, which is the same kernel), `"moe.grouped_mm_dw"`
# for the weight gradient, each per GPU architecture and best first. `runtime.launch` tries a row in order, keeps the
# first configuration that compiles within the GPU's shared memory and remembers it. Two points are particular to
# the grouped GEMM:
#
# - `BLOCK_M` is the tile schedule's tile height, and the host builds the schedule before the launch, so every
#   configuration of a row shares one `BLOCK_M`. The launcher reads it with `runtime.launch_configs`, which gives
#   the configuration a test forces with `runtime.launch_config("moe.grouped_mm", BLOCK_M=16, ...)`, else the row.
# - With `runtime.set_autotune(True)` — `bench/moe.py` turns it on — the first call for each $(N, K)$ times the
#   row's configurations and keeps the fastest; off, the default, the first that fits runs. `bench/notes/moe.md`
#   has the H200 timings behind the `sm_90` rows.
#
# The interpreter's row is one configuration of few, large programs: it pays per program, not per FLOP.

# %%
def tiles(c):  # BLOCK_M×BLOCK_N×BLOCK_K, warps and pipeline stages of one configuration
    return "×".join(str(c[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f" {c['num_warps']}w{c['num_stages']}s"


print("BLOCK_M×BLOCK_N×BLOCK_K, warps (w) and stages (s) of each configuration, best first")
for kernel in ("moe.grouped_mm", "moe.grouped_mm_dw"):
    for row in ("sm_90", "sm_80", "sm_75"):  # and the interpreter's: 32×64×32 for both
        print(f"{kernel:18s} {row:11s}", ", ".join(tiles(c) for c in runtime.LAUNCH_TABLE[kernel][row]))

# %%
#| export moe.triton
_INSTEAD = "grouped_mm_ref (a loop of PyTorch matmuls)"


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 in: exact fp32 products; 16-bit inputs ignore it


def _block_m(device, dtype):
    """The forward's BLOCK_M for this device and dtype, read from the configurations `runtime.launch` will try: the
    one a test forces with `runtime.launch_config`, else the row (all of a row's configurations share it)."""
    return runtime.launch_configs("moe.grouped_mm", device, dtype)[0]["BLOCK_M"]


def _launch_fwd(x, w, offsets, y, schedule, block_m):
    """Write y [M, N] = grouped x [M, K] @ w [G, K, N] tile by tile over `schedule` = (tile_expert, tile_row) from
    tile_schedule(offsets, M, block_m). Returns the launch configuration (None when there is nothing to launch)."""
    M, K = x.shape
    N = w.shape[2]
    if M == 0 or N == 0:
        return None
    if K == 0:  # an empty sum
        y.zero_()
        return None
    tile_expert, tile_row = schedule
    num_tiles = tile_expert.numel()
    return runtime.launch(
        "moe.grouped_mm", _grouped_mm_kernel, lambda c: (num_tiles * triton.cdiv(N, c["BLOCK_N"]),),
        (x, w, y, offsets, tile_expert, tile_row, M, N, K, num_tiles, *x.stride(), *w.stride(), *y.stride()),
        dict(PRECISION=_precision(x.dtype)), device=x.device, dtype=x.dtype,
        fit=lambda c: {**c, "BLOCK_M": block_m},  # the tile height the schedule was built with
        autotune_key=["N", "K"], instead=_INSTEAD)


def _launch_dw(x, dy, offsets, dw):
    """Write dw [G, K, N] = per-expert x_gᵀ @ dy_g (zeros for empty experts). Returns the launch configuration."""
    K, N, G = x.shape[1], dy.shape[1], offsets.numel()
    if K == 0 or N == 0:
        return None
    return runtime.launch(
        "moe.grouped_mm_dw", _grouped_mm_dw_kernel,
        lambda c: (triton.cdiv(K, c["BLOCK_K"]) * triton.cdiv(N, c["BLOCK_N"]), G),
        (x, dy, dw, offsets, N, K, *x.stride(), *dy.stride(), *dw.stride()),
        dict(PRECISION=_precision(x.dtype)), device=x.device, dtype=x.dtype, autotune_key=["N", "K"],
        instead=_INSTEAD)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        block_m = _block_m(x.device, x.dtype)
        schedule = tile_schedule(offsets, x.shape[0], block_m)  # [S] expert and first row of each tile slot
        y = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)  # [M, N]
        _launch_fwd(x, w, offsets, y, schedule, block_m)
        ctx.schedule, ctx.block_m = schedule, block_m
        ctx.save_for_backward(x, w, offsets)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx_g = dy_g @ w_gᵀ: the forward kernel on a transposed view, same schedule
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _launch_fwd(dy, w.transpose(1, 2), offsets, dx, ctx.schedule, ctx.block_m)
        if ctx.needs_input_grad[1]:  # dw_g = x_gᵀ @ dy_g, laid out like w (e.g. a transposed [E, out, in] view)
            dw = torch.empty_like(w)
            _launch_dw(x, dy, offsets, dw)
        return dx, dw, None


def grouped_mm(x, w, offsets, *, check_values=True):
    """Grouped GEMM in Triton: y[offsets[g-1]:offsets[g]] = x[offsets[g-1]:offsets[g]] @ w[g], differentiable.

    x [M, K] rows sorted by expert; w [G, K, N] (any strides, e.g. `weight.transpose(1, 2)` of transformers'
    [E, out, in] experts); offsets [G] int32 cumulative row ends, offsets[-1] == M -> y [M, N] in x's dtype (fp32,
    fp16 or bf16). Same result as `torch._grouped_mm(x, w, offs=offsets)`. One launch over all experts, fp32
    accumulation; empty experts are fine. Backward: dx by the same kernel on w's transpose, dw by the grouped
    weight-gradient kernel. The offsets check reads offsets back to the host: on CPU tensors always, on CUDA
    tensors after `runtime.set_value_checks(True)`; check_values=False skips it (the MoE layer, which built them).
    """
    check_grouped_mm_args("grouped_mm", x, w, offsets, triton=True, check_values=check_values)
    return _GroupedMM.apply(x, w, offsets)


# %% [markdown]
# ### Check it against the loop and against PyTorch
#
# Forward and both gradients, against `grouped_mm_ref` (the loop) and against `torch._grouped_mm` where this
# PyTorch build runs it, with empty experts and row counts that are not multiples of the tile. On a CPU this runs
# in the interpreter at a small size, in fp32.

# %%
from minisparse.moe import grouped_mm

M_C, K_C, N_C = runtime.reading_size(cpu=(300, 64, 96), gpu=(8192, 1024, 1536))
counts_c = torch.tensor([0, 37, 0, 101, 5, 0, 80, 77]) * M_C // 300  # 8 experts, 3 of them empty
counts_c[-1] += M_C - counts_c.sum()
offs_c = counts_c.cumsum(0).to(torch.int32).to(DEVICE)
g = torch.Generator(device=DEVICE).manual_seed(0)
x_c = torch.randn(M_C, K_C, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
w_c = (torch.randn(8, K_C, N_C, generator=g, device=DEVICE) / K_C ** 0.5).to(DTYPE).requires_grad_()
dy_c = torch.randn(M_C, N_C, generator=g, device=DEVICE).to(DTYPE)

y_c = grouped_mm(x_c, w_c, offs_c)
dx_c, dw_c = torch.autograd.grad(y_c, (x_c, w_c), dy_c)
# reference: the loop, in fp32 from the same (rounded) inputs
xr, wr = x_c.detach().float().requires_grad_(), w_c.detach().float().requires_grad_()
y_r = grouped_mm_ref(xr, wr, offs_c)
dx_r, dw_r = torch.autograd.grad(y_r, (xr, wr), dy_c.float())
fwd_tol, grad_tol = {torch.float32: (1e-4, 1e-4)}.get(DTYPE, (5e-3, 8e-3))
for name, ref, out, tol in [("y", y_r, y_c, fwd_tol), ("dx", dx_r, dx_c, grad_tol), ("dw", dw_r, dw_c, grad_tol)]:
    print(f"{name}: relative RMS error vs the loop {assert_close(name, ref, out, tol):.1e}")
assert dw_c[counts_c == 0].abs().max() == 0  # empty experts: exactly zero gradient
try:
    y_t = torch._grouped_mm(x_c.detach(), w_c.detach(), offs=offs_c)
    print(f"y vs torch._grouped_mm: {assert_close('y vs torch', y_t.float(), y_c.float(), fwd_tol):.1e}")
except (RuntimeError, AttributeError) as err:  # older PyTorch, or a dtype/device it does not support
    print("torch._grouped_mm is not available here:", str(err).splitlines()[0][:100])

# %% [markdown]
# Bad input fails early and says what it wanted. Shapes, dtypes and devices are checked on every call; the offsets'
# values (non-decreasing, the last equal to $M$) on CPU tensors always and on CUDA tensors after
# `runtime.set_value_checks(True)`, since reading them back stalls the GPU — the cell turns it on, so that it prints
# the same on a GPU.

# %%
previous = runtime.set_value_checks(True)
try:
    for bad in [lambda: grouped_mm(x_c, w_c, offs_c.long()),  # int64 offsets
                lambda: grouped_mm(x_c, w_c, offs_c.flip(0)),  # not monotone
                lambda: grouped_mm(x_c, w_c, offs_c[:-1]),  # one offset short
                lambda: grouped_mm(x_c[:, :-1], w_c, offs_c)]:  # K mismatch
        try:
            bad()
        except (ValueError, TypeError) as err:
            print(f"{type(err).__name__}: {err}")
        else:
            raise AssertionError("bad input was accepted")
finally:
    runtime.set_value_checks(previous)

# %% [markdown]
# ## 2.8 The layer
#
# `MoE` puts the pieces together as the production models do. Its parameters use transformers' names and layouts,
# so a state dict moves between them unchanged:
#
# | parameter | shape | in |
# |---|---|---|
# | `gate.weight` | `[E, H]` | all |
# | `gate.e_score_correction_bias` (buffer) | `[E]` | `router="deepseek"` |
# | `experts.gate_up_proj` | `[E, 2I, H]`: $W_{\mathrm{gate}}$ stacked on $W_{\mathrm{up}}$, `[out, in]` | all |
# | `experts.down_proj` | `[E, H, I]` | all |
# | `shared_experts.{gate,up,down}_proj.weight` | a SwiGLU of width `shared_intermediate_size` | DeepSeek, Qwen3-Next (there `shared_expert`; `from_hf` renames it) |
# | `shared_expert_gate.weight` | `[1, H]`: the sigmoid gate | Qwen3-Next |
#
# The router computes its logits in fp32 whatever the layer's dtype (transformers does so for DeepSeek-V3; for
# Mixtral it computes them in the input dtype, which differs only in bf16 rounding). `backend="triton"` runs the
# experts with `permute` → `grouped_mm` → SwiGLU → `grouped_mm` → `unpermute`; `"naive"` runs `moe_naive`;
# `"auto"` (the default) picks Triton on a GPU, and on a CPU under the interpreter for fp32 and fp16, the loop
# otherwise — the rule of every layer in the book. The last routing is kept in `layer.last_routing` (logits,
# indices) for an auxiliary loss or the bias update.
#
# The constructor checks its arguments (sizes, the router kind, a group limit the router can meet) and `forward`
# its input: fp16 input to an fp32 layer says so, instead of failing inside a matmul. The routing the layer computes
# itself — top-k indices, offsets built from them — is not checked again on its way through the kernels.

# %%
#| export moe.layer
import torch
import torch.nn as nn
import torch.nn.functional as F

from minisparse import _checks
from minisparse.moe.naive import check_routing_args, moe_naive, permute, route_deepseek, route_topk_softmax, unpermute
from minisparse.moe.triton import grouped_mm

_ROUTERS = ("softmax", "deepseek")


def _check_moe_args(hidden_size, intermediate_size, num_experts, top_k, router, n_group, topk_group,
                    routed_scaling_factor, shared_intermediate_size, shared_expert_gate):
    """MoE's constructor arguments: sizes ints > 0 (the shared expert's >= 0, 0 meaning none), a known router kind,
    a routing the router can meet (check_routing_args), and a shared expert behind a shared_expert_gate."""
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts)):
        _checks.positive_int("MoE", name, value)
    _checks.one_of("MoE", "router", router, _ROUTERS)
    check_routing_args("MoE", num_experts, top_k, n_group, topk_group, routed_scaling_factor)
    _checks.positive_int("MoE", "shared_intermediate_size (0: no shared expert)", shared_intermediate_size, zero=True)
    if shared_expert_gate and not shared_intermediate_size:
        raise ValueError("MoE: shared_expert_gate=True needs a shared expert (shared_intermediate_size > 0)")


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN with transformers' names: down_proj(silu(gate_proj(x)) * up_proj(x)). The shared expert."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The gate: logits = x @ weightᵀ in fp32, then route_topk_softmax or route_deepseek (with its bias buffer)."""

    def __init__(self, hidden_size, num_experts, top_k, kind="softmax", n_group=1, topk_group=1,
                 routed_scaling_factor=1.0, renormalize=True):
        super().__init__()
        _checks.positive_int("Router", "hidden_size", hidden_size)
        _checks.positive_int("Router", "num_experts", num_experts)
        _checks.one_of("Router", "kind", kind, _ROUTERS)
        check_routing_args("Router", num_experts, top_k, n_group, topk_group, routed_scaling_factor)
        self.kind, self.top_k, self.renormalize = kind, top_k, renormalize
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group, topk_group, routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if kind == "deepseek":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def route(self, logits):
        if self.kind == "softmax":
            return route_topk_softmax(logits, self.top_k, self.renormalize)
        bias = getattr(self, "e_score_correction_bias", None)
        return route_deepseek(logits, bias, self.top_k, self.n_group, self.topk_group, self.routed_scaling_factor,
                              self.renormalize)

    def forward(self, x):  # x [N, H] -> logits [N, E] fp32, weights [N, k] fp32, indices [N, k]
        logits = F.linear(x.float(), self.weight.float())
        return (logits, *self.route(logits))


class Experts(nn.Module):
    """E SwiGLU experts as two 3-D tensors (transformers >= 5): gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, weights, indices, backend="naive"):  # x [N, H], weights/indices [N, k] -> [N, H]
        if backend == "naive":
            return moe_naive(x, weights, indices, self.gate_up_proj, self.down_proj)
        # indices come from the router's top-k and offsets from sorting them: no value check on the way
        x_sorted, order, offsets = permute(x, indices, self.gate_up_proj.shape[0], check_values=False)  # [N*k, H]
        h = grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offsets, check_values=False)  # [N*k, 2I]
        gate, up = h.chunk(2, dim=-1)  # [N*k, I] each
        y_sorted = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offsets,
                              check_values=False)  # [N*k, H]
        return unpermute(y_sorted, weights, order)  # [N, H]


# %%
#| export moe.layer
class MoE(nn.Module):
    """A mixture-of-experts FFN: router, E routed SwiGLU experts, optional (sigmoid-gated) shared expert.

    hidden_states [B, T, H] (or [N, H]) in the experts' dtype -> the same shape. router="softmax" (Mixtral, Qwen3)
    or "deepseek" (sigmoid, groups, bias); shared_intermediate_size > 0 adds a shared SwiGLU (DeepSeek:
    n_shared × moe_intermediate_size), and shared_expert_gate=True scales it by sigmoid(x · w_s) (Qwen3-Next).
    backend: "auto" | "naive" | "triton".
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, *, router="softmax", n_group=1,
                 topk_group=1, routed_scaling_factor=1.0, renormalize=True, shared_intermediate_size=0,
                 shared_expert_gate=False, backend="auto"):
        super().__init__()
        _check_moe_args(hidden_size, intermediate_size, num_experts, top_k, router, n_group, topk_group,
                        routed_scaling_factor, shared_intermediate_size, shared_expert_gate)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.backend = backend  # checked by the property below
        self.gate = Router(hidden_size, num_experts, top_k, router, n_group, topk_group, routed_scaling_factor,
                           renormalize)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_experts = SwiGLU(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.last_routing = None
        self.reset_parameters()

    @property
    def backend(self):
        """"auto" (Triton where it runs, else the loop), "naive" or "triton"; assigning checks the value."""
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = _checks.backend("MoE", value)

    def reset_parameters(self, std=0.02):
        """Normal(0, std) weights as transformers initialises them; zero bias."""
        for p in self.parameters():
            nn.init.normal_(p, std=std)
        if hasattr(self.gate, "e_score_correction_bias"):
            self.gate.e_score_correction_bias.zero_()

    def forward(self, hidden_states):
        layout = "[N, hidden]" if getattr(hidden_states, "ndim", None) == 2 else "[B, T, hidden]"
        _checks.layer_input("MoE", hidden_states, self.experts, layout, self.hidden_size)  # the experts' dtype
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, H]
        logits, weights, indices = self.gate(x)  # [N, E], [N, k], [N, k]
        self.last_routing = (logits, indices)
        y = self.experts(x, weights, indices, _checks.choose_backend(self.backend, x))  # [N, H]
        if self.shared_experts is not None:
            shared = self.shared_experts(x)  # [N, H]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared  # Qwen3-Next's gated shared expert
            y = y + shared
        return y.view(shape)

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """An MoE with the weights of transformers' DeepseekV3MoE, MixtralSparseMoeBlock or Qwen3NextSparseMoeBlock.

        Reads the routing configuration from module.gate and the sizes from module.experts' 3-D tensors. Mixtral's
        router jitter (training only) is not reproduced.
        """
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if gate is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            raise TypeError(f"MoE.from_hf: expected a transformers MoE block with .gate and 3-D .experts.gate_up_proj "
                            f"(DeepseekV3MoE, MixtralSparseMoeBlock, Qwen3NextSparseMoeBlock), got "
                            f"{type(module).__name__}")
        probe = torch.linspace(-4, 4, 17)
        if not torch.allclose(experts.act_fn(probe), F.silu(probe)):
            raise ValueError(f"MoE.from_hf: the experts' activation must be SiLU, got {experts.act_fn}")
        E, two_i, H = experts.gate_up_proj.shape
        if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3
            routing = dict(router="deepseek", n_group=gate.num_group, topk_group=gate.topk_group,
                           routed_scaling_factor=gate.routed_scaling_factor, renormalize=gate.norm_topk_prob)
        else:  # Mixtral always renormalises; Qwen3-Next has a flag
            routing = dict(router="softmax", renormalize=getattr(gate, "norm_topk_prob", True))
        shared = getattr(module, "shared_experts", None) or getattr(module, "shared_expert", None)
        layer = cls(H, two_i // 2, E, gate.top_k, **routing, backend=backend,
                    shared_intermediate_size=shared.gate_proj.out_features if shared is not None else 0,
                    shared_expert_gate=getattr(module, "shared_expert_gate", None) is not None)
        state = {k.replace("shared_expert.", "shared_experts."): v for k, v in module.state_dict().items()}
        layer.load_state_dict(state)
        layer.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
        layer.gate.float()  # the router stays in fp32, as DeepSeek-V3 keeps it
        return layer


# %% [markdown]
# The check: build transformers' three MoE blocks at tiny sizes with random weights, load them with `from_hf`, and
# compare outputs. DeepSeek-V3's gets a random selection bias too, so that the bias path is exercised, and its
# shared expert; Qwen3-Next's has the sigmoid-gated one.

# %%
from minisparse.moe import MoE

if transformers is not None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    import warnings

    with warnings.catch_warnings():  # qwen3_next imports fla, which warns that its kernels need a GPU
        warnings.simplefilter("ignore")
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    def randomize(module, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            for name, b in module.named_buffers():
                if "bias" in name:
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
        return module.eval()

    blocks = {
        "DeepseekV3MoE": randomize(DeepseekV3MoE(DeepseekV3Config(
            hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, experts_implementation="eager")), 0),
        "MixtralSparseMoeBlock": randomize(MixtralSparseMoeBlock(MixtralConfig(
            hidden_size=64, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
            experts_implementation="eager")), 1),
        "Qwen3NextSparseMoeBlock": randomize(Qwen3NextSparseMoeBlock(Qwen3NextConfig(
            hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
            shared_expert_intermediate_size=48, experts_implementation="eager")), 2),
    }
    hs = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE)  # [B, T, H]
    for name, block in blocks.items():
        block.to(DEVICE)
        with torch.no_grad():
            ref = block(hs.clone())
            for backend in ("naive", "triton"):
                ours = MoE.from_hf(block, backend=backend)(hs)
                err = assert_close(f"{name} ({backend})", ref, ours, tol=1e-5)
                print(f"{name:24s} backend={backend:6s}: relative RMS error {err:.1e}")

# %% [markdown]
# And the two backends agree on gradients too — every parameter, through both grouped GEMMs, the permutation and
# the router:

# %%
layer = MoE(64, 48, 8, 2, router="deepseek", n_group=2, topk_group=1, shared_intermediate_size=32,
            shared_expert_gate=True).to(DEVICE)
x_l = torch.randn(3, 40, 64, device=DEVICE, requires_grad=True)
grads = {}
for backend in ("naive", "triton"):
    layer.backend = backend
    layer.zero_grad()
    x_l.grad = None
    layer(x_l).square().mean().backward()
    grads[backend] = {"x": x_l.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
for name in grads["naive"]:
    assert_close(f"d{name}", grads["naive"][name], grads["triton"][name], tol=1e-4)
print(f"triton and naive backends agree on {len(grads['naive'])} gradients")

# %% [markdown]
# ## 2.9 Measure
#
# On the H200, `bench/moe.py` times `grouped_mm` against `torch._grouped_mm` at the shape of section 2.6 — 16K
# tokens × top-8 = 131,072 rows routed unevenly over 64 experts, $K$ = 2048, $N$ = 2816, bf16 — forward and both
# backward products, and the whole `MoE` layer forward + backward with the Triton backend against the loop. It
# writes `bench/results/moe.json`, which this cell plots.

# %%
try:
    moe_results = bench.load_results("moe")
except FileNotFoundError:
    moe_results = None
if moe_results is None:
    print("H200 numbers for this chapter are pending. On a GPU machine, from the repository root, run\n"
          "    PYTHONPATH=. python bench/moe.py --out bench/results\n"
          "and commit bench/results/moe.json; this cell then plots it.")
else:
    rows = moe_results["rows"]
    top = max(r["T"] for r in rows if r["impl"].startswith(("grouped_mm", "torch")))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw=dict(width_ratios=[1.3, 1, 0.7]))
    passes = ["fwd", "bwd dX", "bwd dW"]
    for j, (impl, color) in enumerate([("grouped_mm (triton)", "tab:blue"), ("torch._grouped_mm", "tab:grey")]):
        vals = [next((r.get("tflops") or 0 for r in rows if r["impl"] == impl and r["pass"] == p and r["T"] == top), 0)
                for p in passes]
        ax1.bar(np.arange(3) + (j - 0.5) * 0.38, vals, 0.38, color=color, label=impl)
        for i, v in enumerate(vals):
            ax1.text(i + (j - 0.5) * 0.38, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(range(3), passes)
    cfg = moe_results["config"]
    ax1.set(ylabel="TFLOP/s", title=f"grouped GEMM: {top * cfg['top_k']:,} rows, K {cfg['K']}, N {cfg['N']}")
    ax1.legend(fontsize=7)
    bench.plot_results(dict(moe_results, rows=[r for r in rows if r["impl"] in ("grouped_mm (triton)",
                                                                              "torch._grouped_mm")]),
                       x="T", y="tflops", passes=["fwd"], ax=ax2)
    ax2.set(xlabel="tokens (× top-8 = rows)", ylabel="TFLOP/s", title="forward vs batch size")
    layer_rows = [r for r in rows if r["impl"].startswith("MoE layer") and r.get("ms")]
    ax3.bar(range(len(layer_rows)), [r["ms"] for r in layer_rows], color=["tab:blue", "tab:orange"][:len(layer_rows)])
    ax3.set_xticks(range(len(layer_rows)), [r["impl"].replace("MoE layer ", "") for r in layer_rows])
    ax3.set(ylabel="ms, forward + backward", title="MoE layer")
    fig.suptitle(f"{moe_results['device']} · torch {moe_results['torch']} · triton {moe_results['triton']} · "
                 f"{moe_results['date']}", fontsize=9)
    fig.tight_layout()
    plt.show()
    print("config:", {k: cfg[k] for k in ("dtype", "top_k", "experts", "K", "N", "tokens")})

# %% [markdown]
# On a GPU, the cell below also times the two at a smaller size live (it prints a note on a CPU, where the
# interpreter's timings would mean nothing).

# %%
if runtime.has_gpu() and not runtime.interpreting():
    M_L, K_L, N_L, E_L = 32768, 2048, 1408, 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cnt = torch.multinomial(torch.softmax(torch.randn(E_L, generator=g, device=DEVICE), 0), M_L, True, generator=g)
    offs_l = torch.bincount(cnt, minlength=E_L).cumsum(0).to(torch.int32)
    x_l = torch.randn(M_L, K_L, device=DEVICE, dtype=DTYPE)
    w_l = torch.randn(E_L, N_L, K_L, device=DEVICE, dtype=DTYPE).transpose(1, 2)  # transformers' layout, viewed
    flops = grouped_mm_flops(M_L, K_L, N_L)
    impls = {"grouped_mm (triton)": lambda: grouped_mm(x_l, w_l, offs_l),  # no host read on a GPU
             "torch._grouped_mm": lambda: torch._grouped_mm(x_l, w_l, offs=offs_l),
             "loop (grouped_mm_ref)": lambda: grouped_mm_ref(x_l, w_l, offs_l)}
    for name, fn in impls.items():
        try:
            ms = bench.median_ms(fn)
            print(f"{name:22s} {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s")
        except RuntimeError as err:
            print(f"{name:22s} failed: {str(err).splitlines()[0][:80]}")
else:
    print("No GPU here: nothing to time live (the plot above shows the committed H200 numbers, when there are some).")

# %% [markdown]
# ## 2.10 Exercises
#
# Each exercise has a stub to fill in, a cell that checks it, and a solution behind a dropdown. The checker prints
# one line when your answer is right and says what differs when it is not (`attempt` prints that message instead of
# raising it, so the chapter still runs top to bottom; call the checker directly to get the exception).

# %% tags=["hide-input"]
#| export moe.exercises
import torch

from minisparse.moe.naive import permute, route_topk_softmax, unpermute, update_bias
from minisparse.moe.triton import tile_schedule
from minisparse.testing import ExerciseError, check


def _slots_by_expert(result):
    """(weights, indices) with each token's slots sorted by expert id, so any order of the k slots is accepted."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and all(isinstance(t, torch.Tensor) for t in result)):
        return result
    weights, indices = result
    if weights.dim() != 2 or weights.shape != indices.shape:
        return result
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


def _router_cases():
    g = torch.Generator().manual_seed(21)
    return [(torch.randn(6, 8, generator=g), 2, True), (torch.randn(5, 8, generator=g), 2, False),
            (3 * torch.randn(7, 16, generator=g), 4, True), (torch.randn(4, 5, generator=g) + 100, 5, False),
            (torch.randn(3, 6, generator=g), 1, True), (torch.randn(4, 6, generator=g) - 100, 3, True)]


def check_route_topk_softmax(fn):
    """Check fn(logits, top_k, renormalize) -> (weights [N, k], indices [N, k]); the k slots may come in any order."""
    check("softmax top-k router", lambda *c: _slots_by_expert(fn(*c)),
          lambda *c: _slots_by_expert(route_topk_softmax(*c)), _router_cases(), tol=1e-5,
          hint="softmax over all E logits (in fp32, subtracting the max so that logits near ±100 do not overflow), "
               "then topk; divide the k kept probabilities by their sum only when renormalize=True")


def _bias_cases():
    g = torch.Generator().manual_seed(22)
    return [(torch.zeros(8), torch.tensor([40, 10, 10, 20, 20, 30, 0, 30]), 1e-3),
            (0.1 * torch.randn(6, generator=g), torch.tensor([5, 5, 5, 5, 5, 5]), 0.01),
            (torch.randn(16, generator=g), torch.randint(0, 100, (16,), generator=g), 0.05),
            (torch.zeros(4), torch.tensor([3.0, 1.0, 2.0, 2.0]), 0.5)]


def _without_side_effects(fn):
    """fn on copies of its tensor arguments; raise if it changed them (API.md: update_bias returns a new tensor)."""
    def run(*args):
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*copies)
        for a, c in zip(args, copies):
            if isinstance(a, torch.Tensor) and not torch.equal(a, c):
                raise ExerciseError("✗ bias update: your function changed its input in place; return a new tensor "
                                    "(e.g. bias + rate * ...), leaving bias and tokens_per_expert as they were")
        return out
    return run


def check_update_bias(fn):
    """Check fn(bias [E], tokens_per_expert [E], rate) -> the new bias [E], computed without changing the inputs."""
    check("bias update (sign rule)", _without_side_effects(fn), update_bias, _bias_cases(), tol=1e-6,
          hint="compare each expert's load with the mean load: below the mean -> bias + rate, above -> bias - rate, "
               "exactly at the mean -> unchanged (torch.sign gives 0)")


def _unpermute_cases():
    g = torch.Generator().manual_seed(23)
    cases = []
    for N, k, E, H in [(5, 2, 4, 3), (12, 3, 6, 8), (7, 1, 5, 4), (9, 4, 4, 2)]:
        x = torch.randn(N, H, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])  # [N, k] distinct experts
        weights = torch.rand(N, k, generator=g)
        x_sorted, order, _ = permute(x, idx, E)
        y_sorted = x_sorted * (1 + torch.arange(N * k, dtype=torch.float32)[:, None])  # row i scaled by i + 1
        cases.append((y_sorted, weights, order))
    return cases


def check_unpermute(fn):
    """Check fn(y_sorted [N*k, H], weights [N, k], order [N*k]) -> y [N, H]."""
    check("unpermute (combine)", fn, unpermute, _unpermute_cases(), tol=1e-5,
          hint="order[i] = token * k + slot is the pair that sorted row i belongs to: scatter row i to position "
               "order[i] of an [N*k, H] buffer (or gather with the inverse permutation), view it as [N, k, H], "
               "multiply by weights[..., None] and sum over k")


def _tiles(counts, block_m):
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert, row = tile_schedule(offsets, sum(counts), block_m)
    used = expert >= 0
    return list(zip(expert[used].tolist(), row[used].tolist()))


def check_tile_schedule(fn):
    """Check fn(counts: list of rows per expert, block_m) -> [(expert, first_row), ...] for every row tile, in order."""
    cases = [([40, 0, 75, 13, 100, 28], 32), ([64, 64], 32), ([0, 0, 5], 16), ([1, 2, 3, 4], 2), ([129], 64),
             ([7, 0, 0, 33, 0], 8), ([16, 17, 0, 15], 16)]
    check("tile schedule", fn, _tiles, cases,
          hint="expert e's rows start at sum(counts[:e]); it needs ceil(counts[e] / block_m) tiles starting at "
               "start, start + block_m, ...; an empty expert needs none, and a tile never runs into the next expert")


# %% [markdown]
# ### Exercise 1: the softmax top-k router
#
# Write Mixtral's router from the equations of section 2.2, without calling `route_topk_softmax`: softmax over all
# experts in fp32, the `top_k` largest probabilities and their experts, and — if `renormalize` — rescaled to sum to
# one. The checker accepts the $k$ slots in any order and includes logits near $\pm 100$.

# %%
from minisparse.moe.exercises import check_route_topk_softmax, check_tile_schedule, check_unpermute, check_update_bias
from minisparse.testing import attempt


def my_route_topk_softmax(logits, top_k, renormalize=True):
    # your code here: return weights [N, top_k], indices [N, top_k]
    raise NotImplementedError


# %%
attempt(check_route_topk_softmax, my_route_topk_softmax)  # prints what is wrong until the stub above is filled in

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_route_topk_softmax(logits, top_k, renormalize=True):
#     u = logits.float()
#     p = torch.exp(u - u.max(dim=-1, keepdim=True).values)  # [N, E] stable: the largest exponent is 0
#     p = p / p.sum(dim=-1, keepdim=True)                     # softmax over all experts
#     weights, indices = p.topk(top_k, dim=-1)                # [N, k]
#     if renormalize:
#         weights = weights / weights.sum(dim=-1, keepdim=True)
#     return weights, indices
# ```
# Subtracting the row maximum does not change a softmax but keeps `exp` finite. With renormalisation the result
# equals a softmax over the $k$ chosen logits, which is how some implementations compute it.
# :::

# %% tags=["hide-input"]
def route_topk_softmax_solution(logits, top_k, renormalize=True):
    u = logits.float()
    p = torch.exp(u - u.max(dim=-1, keepdim=True).values)  # [N, E] stable: the largest exponent is 0
    p = p / p.sum(dim=-1, keepdim=True)  # softmax over all experts
    weights, indices = p.topk(top_k, dim=-1)  # [N, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


check_route_topk_softmax(route_topk_softmax_solution)


# %% [markdown]
# ### Exercise 2: the bias update
#
# Write DeepSeek's auxiliary-loss-free update: given the bias `[E]`, the tokens each expert received this step
# `[E]` (integer or float counts) and the rate $\gamma$, return the new bias
# $b_i + \gamma\,\operatorname{sign}(\bar c - c_i)$.

# %%
def my_update_bias(bias, tokens_per_expert, rate=1e-3):
    # your code here: return the new bias [E]
    raise NotImplementedError


# %%
attempt(check_update_bias, my_update_bias)  # prints what is wrong until the stub above is filled in

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_update_bias(bias, tokens_per_expert, rate=1e-3):
#     load = tokens_per_expert.float()           # integer counts: the mean needs floats
#     return bias + rate * torch.sign(load.mean() - load)
# ```
# Only the sign of the imbalance matters, so one hot expert cannot push the biases around by its size: each step
# moves every bias by exactly $\gamma$ (or not at all). That makes $\gamma$ easy to choose and the update robust.
# :::

# %% tags=["hide-input"]
def update_bias_solution(bias, tokens_per_expert, rate=1e-3):
    load = tokens_per_expert.float()  # integer counts: the mean needs floats
    return bias + rate * torch.sign(load.mean() - load)


check_update_bias(update_bias_solution)


# %% [markdown]
# ### Exercise 3: combine the experts' outputs
#
# `permute` sorted the $N k$ (token, slot) pairs by expert; `order[i]` $= t\,k + j$ says that sorted row $i$ is slot
# $j$ of token $t$. Given the experts' outputs in sorted order, `y_sorted [N·k, H]`, and the router weights
# `[N, k]`, write `unpermute`: $y_t = \sum_j w_{t,j}\, y_{\text{sorted}}[\text{row of } (t, j)]$.

# %%
def my_unpermute(y_sorted, weights, order):
    # your code here: return y [N, H]
    raise NotImplementedError


# %%
attempt(check_unpermute, my_unpermute)  # prints what is wrong until the stub above is filled in

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_unpermute(y_sorted, weights, order):
#     N, k = weights.shape
#     pairs = torch.empty_like(y_sorted)
#     pairs[order] = y_sorted                       # [N*k, H] row t*k + j = output of slot j of token t
#     return (pairs.view(N, k, -1) * weights[..., None]).sum(dim=1)
# ```
# Scattering with `order` is the inverse of the gather `x[order // k]` that `permute` did. A common slip is
# `y_sorted[order]`, which applies the permutation a second time instead of undoing it.
# :::

# %% tags=["hide-input"]
def unpermute_solution(y_sorted, weights, order):
    N, k = weights.shape
    pairs = torch.empty_like(y_sorted)
    pairs[order] = y_sorted  # [N*k, H] row t*k + j = output of slot j of token t
    return (pairs.view(N, k, -1) * weights[..., None]).sum(dim=1)


check_unpermute(unpermute_solution)


# %% [markdown]
# ### Exercise 4: the tile schedule
#
# The heart of the grouped GEMM. Given the number of rows of each expert (a list of ints) and `block_m`, return
# the list of `(expert, first_row)` of every row tile, in order, such that a tile holds rows of one expert only and
# empty experts get no tile. (The chapter's `tile_schedule` does this with tensor operations on the GPU; a Python
# loop is fine here.)

# %%
def my_tile_schedule(counts, block_m):
    # your code here: return [(expert, first_row), ...]
    raise NotImplementedError


# %%
attempt(check_tile_schedule, my_tile_schedule)  # prints what is wrong until the stub above is filled in

# %% [markdown]
# :::{dropdown} Solution
# ```python
# def my_tile_schedule(counts, block_m):
#     tiles, start = [], 0
#     for expert, n in enumerate(counts):
#         tiles += [(expert, row) for row in range(start, start + n, block_m)]
#         start += n
#     return tiles
# ```
# `range(start, start + n, block_m)` is empty for an empty expert and ends its last tile inside the expert; the
# kernel masks the rows of that partial tile that lie past the expert's end.
# :::

# %% tags=["hide-input"]
def tile_schedule_solution(counts, block_m):
    tiles, start = [], 0
    for expert, n in enumerate(counts):
        tiles += [(expert, row) for row in range(start, start + n, block_m)]
        start += n
    return tiles


check_tile_schedule(tile_schedule_solution)

# %% [markdown]
# ## Summary
#
# - An MoE layer replaces one FFN by $E$ experts and a router that sends each token to $k$ of them: memory follows
#   the total parameters, compute the active ones. The 2026 flagships activate 3–10 % of their weights [S].
# - **Routing**: Mixtral/Qwen take a softmax top-$k$ (optionally renormalised); DeepSeek-V3 scores experts with
#   sigmoids, limits each token to the best `topk_group` of `n_group` expert groups, steers the choice with a bias
#   that never touches the weights, and scales the weights by `routed_scaling_factor`. Shared experts see every
#   token; Qwen3-Next gates its shared expert with a sigmoid.
# - **Balancing**: without it, a router collapses onto a few experts. The Switch/Mixtral auxiliary loss
#   $\alpha E \sum_i f_i P_i$ fixes most of it at the cost of a competing gradient; DeepSeek's sign-rule bias
#   update fixes it without touching the loss. Capacity limits drop tokens when the load is uneven; dropless
#   kernels don't.
# - **Dispatch**: sort the (token, slot) pairs by expert (`permute`), run each expert on a contiguous block of
#   rows, and scatter back with the weights (`unpermute`).
# - **Cost**: an expert's arithmetic intensity is about one FLOP per byte per token it processes; on an H200 an
#   expert needs ~170 tokens in a batch to be compute-bound, which is why MoE inference batches hard.
# - **Fast**: the grouped GEMM is one Triton launch over a tile schedule whose tiles never straddle experts;
#   its backward is the same kernel on $w^\top$ plus a grouped weight-gradient kernel that reduces over each
#   expert's rows.
# - **Layer**: `MoE` uses transformers' parameter layout and matches `DeepseekV3MoE`, `MixtralSparseMoeBlock` and
#   `Qwen3NextSparseMoeBlock` through `MoE.from_hf`.
#
# Next, chapter 3 turns from the FFN back to attention: DeepSeek's multi-head latent attention, which shrinks the
# KV cache to one small latent per token.
#
# ## References
#
# - **[S]** The minisparse seed survey, Feb 2026: *Open sparse-architecture models, a panorama (as of February
#   2026)*, in Chinese, dated 25 February 2026, in the project's shared notes.
# - N. Shazeer et al., *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer*, 2017.
#   [arXiv:1701.06538](https://arxiv.org/abs/1701.06538)
# - D. Lepikhin et al., *GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding*, 2020.
#   [arXiv:2006.16668](https://arxiv.org/abs/2006.16668)
# - W. Fedus, B. Zoph, N. Shazeer, *Switch Transformers: Scaling to Trillion Parameter Models with Simple and
#   Efficient Sparsity*, 2021. [arXiv:2101.03961](https://arxiv.org/abs/2101.03961)
# - A. Q. Jiang et al., *Mixtral of Experts*, 2024. [arXiv:2401.04088](https://arxiv.org/abs/2401.04088)
# - D. Dai et al., *DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models*,
#   2024. [arXiv:2401.06066](https://arxiv.org/abs/2401.06066)
# - L. Wang et al., *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*, 2024.
#   [arXiv:2408.15664](https://arxiv.org/abs/2408.15664)
# - DeepSeek-AI, *DeepSeek-V3 Technical Report*, 2024. [arXiv:2412.19437](https://arxiv.org/abs/2412.19437)
# - Qwen Team, *Qwen3 Technical Report*, 2025. [arXiv:2505.09388](https://arxiv.org/abs/2505.09388); model card
#   [Qwen/Qwen3-Next-80B-A3B-Instruct](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct)
# - Kimi Team, *Kimi K2: Open Agentic Intelligence*, 2025. [arXiv:2507.20534](https://arxiv.org/abs/2507.20534)
# - MiniMax, *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention*, 2025.
#   [arXiv:2506.13585](https://arxiv.org/abs/2506.13585)
# - Llama Team, *The Llama 3 Herd of Models*, 2024. [arXiv:2407.21783](https://arxiv.org/abs/2407.21783)
# - J. Kaplan et al., *Scaling Laws for Neural Language Models* (2 FLOPs per parameter and token), 2020.
#   [arXiv:2001.08361](https://arxiv.org/abs/2001.08361)
# - N. Shazeer, *GLU Variants Improve Transformer* (SwiGLU), 2020. [arXiv:2002.05202](https://arxiv.org/abs/2002.05202)
# - T. Gale et al., *MegaBlocks: Efficient Sparse Training with Mixture-of-Experts* (dropless MoE, grouped/block-
#   sparse kernels), 2022. [arXiv:2211.15841](https://arxiv.org/abs/2211.15841)
# - P. Tillet, H. T. Kung, D. Cox, *Triton: An Intermediate Language and Compiler for Tiled Neural Network
#   Computations*, MAPL 2019. [doi:10.1145/3315508.3329973](https://doi.org/10.1145/3315508.3329973)
# - `transformers` 5.x: `DeepseekV3TopkRouter`, `DeepseekV3MoE`, `MixtralTopKRouter`, `MixtralSparseMoeBlock`,
#   `Qwen3NextSparseMoeBlock` and Mixtral's `load_balancing_loss_func` (the oracles of the tests).
