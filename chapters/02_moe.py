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
# Every model on the map of chapter 0 is a mixture of experts (MoE). Its feed-forward layers hold from 8 (Mixtral)
# to hundreds (DeepSeek-V3: 256, Qwen3-Next: 512) of expert networks, and a *router* picks a handful of them for
# each token: the model stores all the experts but computes with only a few, so it can be very large and still cheap
# per token.
#
# **After this chapter you can**
#
# - write the routers of Mixtral and Qwen3 (softmax top-$k$) and of DeepSeek-V3 (sigmoid scores, expert groups, a selection bias) from their equations;
# - say why a router collapses onto a few experts, balance it with an auxiliary loss or DeepSeek's loss-free bias update, and predict what a capacity limit drops;
# - send tokens to their experts by sorting them, and combine the experts' outputs with the router's weights;
# - tell from FLOPs and bytes when an expert is memory-bound, and so why MoE inference batches hard;
# - read, and complete, a Triton grouped GEMM that runs every expert in one launch.
#
# **Prerequisites.** Chapter 0 (the models and their configurations) and chapter 1's Triton kernel (programs, tiles, masks, `tl.dot`). Math: matrix products, softmax and sigmoid, a little probability for the exercises.
#
# **Time.** About 90 minutes for the core path, sections 2.1–2.10, on a laptop CPU (the kernels run in Triton's interpreter at small sizes). The Engineering notes at the end are optional.
#
# **Roadmap.**
#
# | section | what it does |
# |---|---|
# | 2.1 Why | total vs active parameters: a bigger model for the same FLOPs |
# | 2.2 Routing | softmax top-$k$, DeepSeek-V3's router, shared experts |
# | 2.3 Balancing | collapse; the auxiliary loss and the bias update; capacity and dropped tokens |
# | 2.4 Dispatch | permute → one matmul per expert → unpermute: the spec every fast path matches |
# | 2.5 See it | an explorer: top-$k$, expert groups and the balancing bias |
# | 2.6 Cost model | FLOPs, bytes, and the batch an expert needs to be compute-bound |
# | 2.7 Fast | the tile schedule and the Triton grouped GEMM |
# | 2.8 The layer | `MoE` in transformers' parameter layout, with both backends |
# | 2.9 Measure | the H200 numbers against `torch._grouped_mm` |
# | 2.10 Exercises | predict, derive, debug, and a Triton tile |
#
# Tokens are rows: a batch `[B, T, H]` is flattened to `[N, H]`, $N = BT$. Here $H$ is the model's hidden size (in
# chapter 1 it counted heads) and $I$ an expert's intermediate width. Numbers marked **[S]** come from the survey
# this book started from (see the References); model shapes from `transformers`' configuration classes, whose
# defaults are the released checkpoints' shapes, and from the papers.

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
from tqdm.auto import tqdm

from minisparse import bench, runtime, viz
from minisparse.testing import assert_close

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

# %% [markdown]
# ## 2.1 Why: a bigger model for the same FLOPs
#
# The feed-forward network (FFN) of a modern transformer block is a SwiGLU: for a token $x \in \mathbb R^H$,
#
# $$
# \begin{aligned}
# \mathrm{FFN}(x) &= W_{\mathrm{down}}\big(\operatorname{silu}(W_{\mathrm{gate}}\,x) \odot W_{\mathrm{up}}\,x\big),\\
# W_{\mathrm{gate}}, W_{\mathrm{up}} &\in \mathbb R^{I \times H}, \qquad W_{\mathrm{down}} \in \mathbb R^{H \times I}.
# \end{aligned}
# $$
#
# It holds $3HI$ parameters and costs $6HI$ FLOPs a token (a multiply and an add per weight). A **mixture of
# experts** replaces it by $E$ such FFNs, usually narrower, and a router $W_r \in \mathbb R^{E \times H}$ that
# scores them. Each token runs through the $k$ best-scoring experts only, mixed with the router's weights $g_i(x)$:
#
# $$
# y = \sum_{i \in \operatorname{TopK}(W_r x,\, k)} g_i(x)\, \mathrm{FFN}_i(x)
# \;\;\big[+ \mathrm{FFN}_{\mathrm{shared}}(x)\big].
# $$
#
# So a layer has two sizes. Its **total** parameters, $3HI \cdot E$, must sit in memory; its **active**
# parameters, $3HI \cdot k$, are what one token computes with. A forward pass costs about 2 FLOPs per active
# parameter and token (Kaplan et al., 2020), so compute follows the active count while knowledge capacity follows
# the total. The survey calls the trend an *activation race* [S]: Qwen3-235B-A22B computes with 9.36 % of its
# weights, Qwen3.5-397B-A17B and MiniMax M2.5 with about 4.3 %, Kimi K2.5 with 32B of more than a trillion — and
# it notes the price: better routing and more care to keep training stable [S], the subject of this chapter.

# %%
# total / active parameters in billions, whole model, from [S]. DeepSeek-V3's 685B include its
# 14B multi-token prediction module; its paper counts 671B for the main model (the check below
# uses 671).
MODELS = {"Mixtral 8x7B": (47, 13), "Mixtral 8x22B": (141, 39), "DBRX": (132, 36),
          "Qwen3-30B-A3B": (30, 3), "Qwen3-235B-A22B": (235, 22), "Qwen3-Next-80B-A3B": (80, 3),
          "Qwen3.5-397B-A17B": (397, 17), "MiniMax-M1": (456, 45.9), "MiniMax-M2.5": (230, 10),
          "Mistral Large 3": (675, 41), "DeepSeek V3 / V3.2": (685, 37),
          "Kimi K2 / K2.5": (1000, 32)}  # Kimi: "1T+", drawn at 1000B
DENSE = {"Llama 3.1 70B (dense)": (70, 70), "Llama 3.1 405B (dense)": (405, 405)}  # 2407.21783
nudge = {"DBRX": (4, -9), "Mistral Large 3": (-20, 6), "DeepSeek V3 / V3.2": (-30, -11),
         "MiniMax-M1": (-55, 4),
         "Mixtral 8x22B": (4, 2), "Kimi K2 / K2.5": (4, 2)}

fig, ax = plt.subplots(figsize=(7.5, 5))
for models, style in [(MODELS, dict(color="tab:blue", label="MoE [S]")),
                      (DENSE, dict(color="black", marker="s", label="dense, for reference"))]:
    ax.scatter([t for t, _ in models.values()], [2 * a for _, a in models.values()], zorder=3,
               **style)
    for name, (t, a) in models.items():
        ax.annotate(name, (t, 2 * a), fontsize=7, xytext=nudge.get(name, (4, -3)),
                    textcoords="offset points")
p = np.array([20, 1500])
for ratio, ls in [(1.0, "-"), (0.1, "--"), (0.03, ":"), (0.01, "-.")]:
    ax.plot(p, 2 * ratio * p, color="grey", lw=0.8, ls=ls)
    ax.text(p[-1], 2 * ratio * p[-1], f" {ratio:.0%} active", fontsize=7, color="grey", va="center")
ax.set(xscale="log", yscale="log", xlim=(20, 3000),
       xlabel="total parameters (billions): what must sit in memory",
       ylabel="forward GFLOPs per token ≈ 2 × active parameters",
       title="Compute per token vs model size: MoE models sit far below the dense diagonal")
ax.legend(fontsize=8, loc="upper left")
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Total and active counts from [S]; dense Llama 3.1 from its paper. FLOPs per token counted as 2 × active
# parameters, which leaves out attention's context-dependent part (chapter 1).*
#
# A 1T-parameter model that computes like a 32B one: that is the deal. The catch is that the other 968B must still
# be stored, moved between GPUs and — section 2.6 — read from memory for every batch. The cost model's first
# function counts the expert parameters (the Engineering notes recompute three released models with it):

# %%
#| export moe.cost
import numpy as np


def moe_params(hidden, inter, num_experts, top_k, n_shared=0, shared_inter=None):
    """(total, active) parameters of one MoE layer's experts, SwiGLU (3 matrices of hidden × inter
    each).

    Shared experts (`n_shared` of width `shared_inter`, default `inter`) count in both. The router's
    `num_experts × hidden` weights are left out (DeepSeek-V3: 1.8M against 11.3B of experts a
    layer).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe_params: top_k must be in [1, num_experts = {num_experts}], got "
                         f"{top_k}")
    shared_inter = inter if shared_inter is None else shared_inter
    expert = 3 * hidden * inter  # W_gate, W_up: inter × hidden; W_down: hidden × inter
    shared = 3 * hidden * shared_inter * n_shared
    return expert * num_experts + shared, expert * top_k + shared


# %%
assert moe_params(4, 2, 8, 2) == (192, 48)
assert moe_params(4, 2, 8, 2, n_shared=1, shared_inter=6) == (264, 120)
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
# The renormalisation makes the kept weights sum to one (a flag, `norm_topk_prob`, in Qwen3); $g$ is then a softmax
# over the $k$ selected logits only. The router runs in fp32: a bf16 softmax over hundreds of experts loses the
# small probabilities that decide the $k$-th place. (Every op starts with one call that checks its arguments; the
# checks are in the Engineering notes.)

# %%
#| export moe.naive
import math

import torch
import torch.nn.functional as F

from minisparse import _checks  # the book's shared argument checks
from minisparse.moe.checks import (_check_expert_ids, _check_permute_args, _check_router_inputs,
                                   _check_unpermute_args, check_grouped_mm_args)


def route_topk_softmax(logits, top_k, renormalize=True):
    """Mixtral / Qwen3-MoE routing: softmax over all experts in fp32, keep the top_k.

    logits [N, E] float -> (weights [N, top_k] fp32, indices [N, top_k] int64), best expert first.
    renormalize=True rescales the kept probabilities to sum to 1 (Mixtral always does; Qwen3:
    norm_topk_prob).
    """
    # 1 <= top_k <= E, logits [N, E] without NaN and with a finite maximum in every row
    _check_router_inputs("route_topk_softmax", logits, top_k, softmax=True)
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
# 1. **Sigmoid affinities.** Each expert gets an independent score $s_i = \sigma(u_i) \in (0, 1)$ instead of a share of a softmax.
# 2. **Group-limited routing.** The $E = 256$ experts form $G = 8$ groups (`n_group`), one per node of the training cluster. A group's score is the sum of its two best experts' scores; only the best `topk_group` = 4 groups stay eligible, so a token's activations travel to at most 4 nodes.
# 3. **A bias that steers selection only.** A per-expert bias $b_i$ (the checkpoints' `e_score_correction_bias`) is added to the scores when *choosing* experts — groups and the top-$k$ — but the weights come from the unbiased scores. Section 2.3 shows how $b$ is learned without a loss.
#
# $$
# \begin{aligned}
# S &= \operatorname{TopK}\big(\{\, s_i + b_i : i \text{ in a kept group} \,\}, k\big),\\
# g_i &= \rho \cdot \frac{s_i}{\sum_{j \in S} s_j}\;\; (i \in S),
# \end{aligned}
# $$
#
# with $\rho$ the `routed_scaling_factor` (2.5 in DeepSeek-V3's configuration), which sets how much the routed
# experts' mixture weighs against the shared expert's output that is added to it.

# %%
#| export moe.naive
def route_deepseek(logits, bias, top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                   renormalize=True):
    """DeepSeek-V3 routing: sigmoid scores, a group-limited top-k chosen with a bias, unbiased
    weights.

    logits [N, E]; bias [E] or None (zeros) -> (weights [N, top_k] fp32, indices [N, top_k] int64).
    The E experts form n_group groups of E / n_group; a group's score is the sum of its top-2
    biased scores (in groups of one expert, its one score: the limit then keeps the topk_group
    best experts, and the top-k is the plain one) and only the best topk_group groups stay
    eligible. Weights: unbiased scores of the chosen experts, renormalised (renormalize=True),
    times routed_scaling_factor.
    """
    _check_router_inputs("route_deepseek", logits, top_k, bias, n_group, topk_group,
                         routed_scaling_factor)
    N, E = logits.shape
    per_group = E // n_group  # experts a group
    if bias is None:
        bias = logits.new_zeros(E, dtype=torch.float32)

    scores = torch.sigmoid(logits.float())  # [N, E] s_i, in (0, 1)
    choice = scores + bias.float()  # [N, E] s_i + b_i: used to choose, never to weight
    if n_group > 1:
        grouped = choice.view(N, n_group, per_group)  # [N, G, E/G]
        # [N, G] sum of the best two
        group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        kept = group_score.topk(topk_group, dim=-1).indices  # [N, topk_group]
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)  # [N, G]
        # [N, E]
        choice = choice.masked_fill(~group_ok.repeat_interleave(per_group, dim=1), float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices  # [N, k] S
    weights = scores.gather(1, indices)  # [N, k] unbiased s_i
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


# %% [markdown]
# ### Shared experts
#
# DeepSeekMoE (Dai et al., 2024) adds **shared experts** that every token uses, so that the routed ones need not
# each relearn common knowledge: DeepSeek-V3 has one shared and 256 routed experts. Qwen3-Next scales its shared
# expert by a learned per-token **sigmoid gate** $\sigma(w_s^\top x)$, so a token can turn it down:
#
# $$
# y = \sum_{i \in S} g_i\, \mathrm{FFN}_i(x) + \underbrace{\sigma(w_s^\top x)}_{\text{Qwen3-Next, Qwen3.5 only}}\,
# \mathrm{FFN}_{\mathrm{shared}}(x).
# $$
#
# (Qwen3's MoE models, 30B-A3B and 235B-A22B, have no shared expert.)
#
# The two routers on the same logits (`tests/test_moe.py` checks both against transformers' routers):

# %%
g = torch.Generator().manual_seed(0)
demo_logits = torch.randn(4, 8, generator=g)  # [N=4 tokens, E=8 experts]
w_soft, i_soft = route_topk_softmax(demo_logits, top_k=2)
w_ds, i_ds = route_deepseek(demo_logits, None, 2, n_group=4, topk_group=2,
                            routed_scaling_factor=2.5)
for t in range(4):
    print(f"token {t}: softmax top-2 → experts {i_soft[t].tolist()}, weights "
          f"{w_soft[t].numpy().round(3)}  |  deepseek → {i_ds[t].tolist()}, "
          f"{w_ds[t].numpy().round(3)}")


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
# \begin{aligned}
# \mathcal L_{\mathrm{aux}} &= \alpha \cdot E \sum_{i=1}^{E} f_i\, P_i ,\\
# f_i &= \frac{1}{N}\,\#\{t : i \in S_t\}, \qquad P_i = \frac{1}{N}\sum_t p_{t,i}.
# \end{aligned}
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
# raising underloaded experts and lowering overloaded ones. The bias only changes which experts are *chosen*, never
# the weights, and it has no gradient and adds no term to the loss, so nothing competes with the task's gradient.
# DeepSeek-V3 uses $\gamma = 0.001$, plus a tiny sequence-wise auxiliary loss as a safety net.

# %%
#| export moe.naive
def expert_counts(indices, num_experts, *, check_values=True):
    """Tokens routed to each expert: indices [N, k] int -> counts [E] int64, by scatter_add (no host
    sync, unlike bincount on a GPU). check_values=False skips the range check of indices (see the
    Engineering notes)."""
    _check_expert_ids("expert_counts", indices, num_experts, check_values)
    flat = indices.reshape(-1).long()  # [N*k]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)  # [E]
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(router_probs, indices, num_experts):
    """Switch / Mixtral auxiliary loss E · sum_i f_i P_i (multiply by your alpha).

    router_probs [N, E] (probabilities per token), indices [N, k] -> scalar. f_i = tokens routed to
    i / N (no gradient), P_i = mean probability of i. Equals k for perfectly uniform routing, up to
    E when collapsed (every f_i ≤ 1 and the P_i sum to 1: all tokens on the same k experts, which
    hold all the probability).
    """
    op = "load_balancing_loss"
    _checks.tensor(op, "router_probs", router_probs, "[N, E]", dtypes=_checks.FLOATS)
    N = router_probs.shape[0]
    _checks.shape(op, "router_probs", router_probs, (N, num_experts), "[N, E]", "E = num_experts")
    _check_expert_ids(op, indices, num_experts, check_values=True)
    _checks.shape(op, "indices", indices, (N, indices.shape[1]), "[N, k]", "router_probs' N")
    if N == 0:  # no token: nothing to balance (the mean of no probability would be NaN)
        return router_probs.float().sum() * 0.0
    f = expert_counts(indices, num_experts, check_values=False).float() / N  # [E] no gradient
    P = router_probs.float().mean(dim=0)  # [E] mean probability, carries the gradient
    return num_experts * (f * P).sum()


def update_bias(bias, tokens_per_expert, rate=1e-3):
    """Auxiliary-loss-free balancing: b_i + rate · sign(mean load − load_i), as a new tensor.

    bias [E], tokens_per_expert [E] (counts of this step) -> bias [E]. Underloaded experts go up,
    overloaded down, an expert exactly at the mean stays. rate: a finite number ≥ 0.
    """
    rate = _checks.positive_float("update_bias", "rate", rate, zero=True)
    _checks.tensor("update_bias", "bias", bias, "[E]", dtypes=_checks.FLOATS)
    _checks.tensor("update_bias", "tokens_per_expert", tokens_per_expert, "[E]")
    _checks.shape("update_bias", "tokens_per_expert", tokens_per_expert, bias.shape, "[E]",
                  "bias' E")
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)


# %% [markdown]
# ### A small training run
#
# Tokens come from 8 clusters, each with its own linear map from input to target, so experts that specialise on
# clusters would be ideal (with top-2, 16 expert slots for 8 clusters: each expert can serve two); a large offset
# common to all tokens makes a few experts win at first. We train the same tiny MoE (8 experts, top-2, DeepSeek's
# router) three times — no balancing, the auxiliary loss ($\alpha = 0.03$), the bias update ($\gamma = 0.01$) — on
# the same batches; a few seconds on a CPU.

# %%
D_TOY, E_TOY, K_TOY, I_TOY, N_TOY, CLUSTERS, STEPS = 16, 8, 2, 32, 256, 8, 300
gen = torch.Generator().manual_seed(0)
centers = torch.randn(CLUSTERS, D_TOY, generator=gen)  # [C, D] one centre per cluster
common = torch.randn(D_TOY, generator=gen)
common = 3 * common / common.norm()  # [D] an offset every token shares: a few experts win at first
maps = torch.randn(CLUSTERS, D_TOY, D_TOY, generator=gen) / D_TOY**0.5  # [C, D, D] targets' maps


def toy_batch(g, n=N_TOY):  # -> inputs [N, D], targets [N, D], clusters [N]
    c = torch.randint(0, CLUSTERS, (n,), generator=g)  # [N] cluster of each token
    x = common + centers[c] + 0.3 * torch.randn(n, D_TOY, generator=g)  # [N, D]
    return x, torch.einsum("nd,nde->ne", x, maps[c]), c


def train_toy(method, alpha=0.03, rate=0.01):
    """Train a fresh toy MoE, method "none" | "aux" | "bias" -> (params, load [STEPS, E], loss
    [STEPS])."""
    from minisparse.moe import (expert_counts, load_balancing_loss, moe_naive, route_deepseek,
                                update_bias)

    g = torch.Generator().manual_seed(1)
    p = dict(router=0.1 * torch.randn(E_TOY, D_TOY, generator=g),  # [E, D]
             gate_up=torch.randn(E_TOY, 2 * I_TOY, D_TOY, generator=g) / D_TOY**0.5,  # [E, 2I, D]
             down=torch.randn(E_TOY, D_TOY, I_TOY, generator=g) / I_TOY**0.5)  # [E, D, I]
    opt = torch.optim.Adam([t.requires_grad_() for t in p.values()], lr=3e-3)
    p["bias"] = torch.zeros(E_TOY)  # [E] selection bias: set by update_bias, no gradient
    data = torch.Generator().manual_seed(2)  # the same batches for every method
    loads, losses = [], []
    # Saturated sigmoids give denormal squares in Adam's state, ~50x slower on a CPU: flush them.
    torch.set_flush_denormal(True)
    for _ in tqdm(range(STEPS), desc=f"balancing: {method}", mininterval=0.5):
        x, y, _ = toy_batch(data)
        logits = x @ p["router"].T  # [N, E]
        weights, idx = route_deepseek(logits, p["bias"], K_TOY)  # [N, k] each
        loss = F.mse_loss(moe_naive(x, weights, idx, p["gate_up"], p["down"]), y)
        total = loss
        if method == "aux":  # on the normalised sigmoid scores, as DeepSeek-V3's sequence-wise loss
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)  # [N, E]
            total = loss + alpha * load_balancing_loss(probs, idx, E_TOY)
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
x_eval, y_eval, c_eval = toy_batch(torch.Generator().manual_seed(99), n=1024)  # for later checks


# %%
def max_violation(load):
    """DeepSeek's MaxVio: (largest load − mean load) / mean load; 0 is perfectly balanced.
    load [..., E]: each expert's share of the assignments (summing to 1 over E)."""
    return load.max(dim=-1).values * load.shape[-1] - 1


fig = viz.panels({f"{m}: expert load (share of N·k)": runs[m][1] for m in runs}, size=3.0,
                 xlabel="expert", ylabel="training step", vmin=0, vmax=0.4, cmap="magma",
                 colorbar=True)
plt.show()
final = {m: runs[m][1][-20:].mean(0) for m in runs}  # [E] mean load of the last 20 steps
for m in runs:
    print(f"{m:5s}: final load {final[m].numpy().round(2)}  MaxVio {max_violation(final[m]):.2f}  "
          f"final loss {runs[m][2][-20:].mean():.4f}")
assert max_violation(final["none"]) > 1.0  # collapsed: one expert does 2-3x its share
assert (final["none"] < 0.01).sum() == 2 and 2.5 < final["none"].max() * E_TOY < 3.5  # two idle
assert max_violation(final["aux"]) < 0.5 and max_violation(final["bias"]) < 0.1
assert runs["bias"][2][-20:].mean() <= runs["none"][2][-20:].mean()  # balance cost no accuracy here

# %% [markdown]
# Without balancing, two experts stay idle and one takes about three times its share. The auxiliary loss spreads the
# load but keeps some imbalance, trading balance against the task loss through $\alpha$. The bias update balances
# almost perfectly and, here, reaches the lowest loss: no balancing term competes with the task's gradient.
#
# ### Capacity and token dropping
#
# Before dropless kernels, frameworks gave every expert a fixed buffer — its **capacity**
# $C = \lceil \mathrm{cf} \cdot N k / E \rceil$ rows, a capacity factor cf of 1–2 (Switch, GShard) — so that
# expert computation had static shapes. Assignments beyond it are **dropped**: that token skips that expert (its
# residual connection carries it on); first choices are served first. The grouped GEMM of section 2.7 is
# *dropless* (MegaBlocks, Gale et al., 2022), and DeepSeek-V3 drops no tokens at all. Exercise 1 predicts what a
# capacity limit drops; the Engineering notes measure it on the routers trained above.

# %%
#| export moe.naive
def capacity_mask(indices, num_experts, capacity_factor):
    """Which (token, slot) assignments fit when each expert holds ceil(cf · N · k / E) rows: bool
    [N, k].

    Priority: all first choices (slot 0) in token order, then all second choices, and so on (as
    GShard).
    """
    _check_expert_ids("capacity_mask", indices, num_experts, check_values=True)
    _checks.positive_float("capacity_mask", "capacity_factor (1.0 = exactly the mean load)",
                           capacity_factor)
    N, k = indices.shape
    capacity = math.ceil(capacity_factor * N * k / num_experts)
    slot_major = indices.t().reshape(-1).long()  # [k*N] slot 0 of every token first
    one_hot = F.one_hot(slot_major, num_experts)  # [k*N, E]
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # [k*N] place in its expert's queue
    return (position < capacity).view(k, N).t()  # [N, k]


# %% [markdown]
# ## 2.4 Dispatch: from tokens to experts and back
#
# The equation of section 2.1 reads "for each token, for each chosen expert". Computed that way, every token does
# $k$ small matrix–vector products: hopeless on a GPU. A fast layer turns the loop around. It **sorts** the $N k$
# (token, slot) pairs by expert, so that each expert's rows are contiguous; runs every expert on its block of rows
# with two *grouped* matrix multiplies and the activation between them; and **unsorts**, adding up each token's $k$
# outputs with the router's weights:

# %%
B = viz.Box
fig = viz.schematic(
    {"x": B(0, 0, "tokens x", w=1.3, note="[N, H]"),
     "router": B(2.3, 1.5, "router\ntop-k", color="#fde2c8"),
     "permute": B(2.3, 0, "permute\n(sort by expert)", w=1.9,
                  note="x_sorted [N·k, H]\noffsets [E]"),
     "up": B(4.7, 0, "grouped GEMM\ngate_up_proj", w=1.9, color="#d9f0d3", note="[N·k, 2I]"),
     "act": B(6.8, 0, "silu(gate)·up", w=1.6, color="#d9f0d3", note="[N·k, I]"),
     "down": B(8.9, 0, "grouped GEMM\ndown_proj", w=1.9, color="#d9f0d3", note="y_sorted [N·k, H]"),
     "unpermute": B(11.3, 0, "unpermute\n× weights, Σ over k", w=2.1, note="y [N, H]"),
     "weights": B(11.3, 1.5, "weights", w=1.3, color="#fde2c8", note="[N, k]")},
    [("x", "router"), ("x", "permute"), ("router", "permute", "indices [N, k]"), ("permute", "up"),
     ("up", "act"), ("act", "down"), ("down", "unpermute"), ("router", "weights"),
     ("weights", "unpermute")],
    groups=[(["up", "act", "down"], "the experts: rows of expert e meet only expert e's weights")],
    title="An MoE layer's experts, computed in expert order", size=(11, 3.6))
plt.show()

# %% [markdown]
# First the spec, the readable way: **for each expert**, gather its tokens, run its FFN once on all of them, add
# the weighted results back. Every faster version is tested against it.

# %%
#| export moe.naive
def expert_ffn(x, gate_up, down):
    """One SwiGLU expert, transformers' layout: x [n, H], gate_up [2I, H], down [H, I] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each: W_gate x, W_up x
    return F.linear(F.silu(gate) * up, down)  # [n, H]


def moe_naive(x, weights, indices, gate_up_proj, down_proj):
    """The spec: y_t = sum_j weights[t, j] · FFN_{indices[t, j]}(x_t), one expert at a time.

    x [N, H]; weights, indices [N, k]; gate_up_proj [E, 2I, H]; down_proj [E, H, I] -> y [N, H].
    """
    _check_permute_args("moe_naive", x, indices, gate_up_proj.shape[0], True)  # ids in [0, E)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [N, H] accumulate in fp32
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(indices == e)  # [n_e] tokens routed to e, and their slots
        if token.numel() == 0:
            continue
        out = expert_ffn(x[token], gate_up_proj[e], down_proj[e])  # [n_e, H]
        y = y.index_add(0, token, out.float() * weights[token, slot, None].float())
    return y.to(x.dtype)


# %% [markdown]
# The loop launches a few small matrix multiplies per expert, and the host must know how many tokens each expert
# got before it can launch them. Sorting the pairs by expert instead gives three things:
#
# - `x_sorted [N·k, H]`: row $i$ is the token of the $i$-th pair in expert order;
# - `offsets [E]` (int32): the cumulative row ends, expert $e$ owning rows `offsets[e-1]:offsets[e]`, with `offsets[-1]` read as 0 for the first expert (not Python's last element; an empty expert has equal ends) — the format `torch._grouped_mm` takes;
# - `order [N·k]`: where each sorted row came from, $t\,k + j$ for slot $j$ of token $t$, to undo the sort.

# %%
#| export moe.naive
def permute(x, indices, num_experts, *, check_values=True):
    """Sort the (token, slot) pairs by expert: x [N, H], indices [N, k] ->
    (x_sorted [N*k, H], order [N*k] int64, offsets [E] int32).

    x_sorted[i] = x[order[i] // k]; expert e owns rows offsets[e-1]:offsets[e]. check_values=False
    skips the range check of indices, a read-back to the host (the MoE layer's come from top-k).
    """
    _check_permute_args("permute", x, indices, num_experts, check_values)
    flat = indices.reshape(-1).long()  # [N*k] expert of each pair, token-major
    order = torch.argsort(flat, stable=True)  # [N*k] pairs sorted by expert, ties in token order
    x_sorted = x[order // indices.shape[1]]  # [N*k, H]
    counts = expert_counts(indices, num_experts, check_values=False)  # [E]
    return x_sorted, order, counts.cumsum(0).to(torch.int32)  # offsets [E]: row ends


def unpermute(y_sorted, weights, order):
    """Undo permute and combine: y[t] = sum_j weights[t, j] · y_sorted[row of pair (t, j)].

    y_sorted [N*k, H], weights [N, k], order [N*k] (from permute) -> y [N, H] in y_sorted's dtype.
    """
    _check_unpermute_args("unpermute", y_sorted, weights, order)
    N, k = weights.shape
    inverse = torch.empty_like(order)  # [N*k] the sorted row of each pair
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    y = y_sorted[inverse].view(N, k, y_sorted.shape[-1])  # [N, k, H] in (token, slot) order
    return (y.float() * weights[..., None].float()).sum(dim=1).to(y_sorted.dtype)


def grouped_mm_ref(x, w, offsets):
    """The grouped GEMM as a loop (section 2.7's spec): rows offsets[g-1]:offsets[g] of x times
    w[g].

    x [M, K] sorted by expert, w [G, K, N], offsets [G] int32 cumulative row ends -> [M, N].
    """
    check_grouped_mm_args("grouped_mm_ref", x, w, offsets)  # one dtype, K shared, offsets end at M
    ends = [int(e) for e in offsets.tolist()]
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


# %% [markdown]
# Put together, permute → a grouped multiply per projection → unpermute computes what the loop computes. Note
# `transpose(1, 2)`: transformers stores each expert's projection as `[out, in]` (as `nn.Linear` does), while a
# grouped GEMM multiplies `x [M, K]` by `w [G, K, N]`; the transposed *view* costs nothing.

# %%
from minisparse.moe import grouped_mm_ref, permute, unpermute

p = runs["bias"][0]
with torch.no_grad():
    w, idx = route_deepseek(x_eval @ p["router"].T, p["bias"], K_TOY)
    spec = moe_naive(x_eval, w, idx, p["gate_up"], p["down"])
    xs, order, offs = permute(x_eval, idx, E_TOY)  # [N*k, D]
    h = grouped_mm_ref(xs, p["gate_up"].transpose(1, 2), offs)  # [N*k, 2I]
    gate, up = h.chunk(2, dim=-1)  # [N*k, I] each
    ys = grouped_mm_ref(F.silu(gate) * up, p["down"].transpose(1, 2), offs)  # [N*k, D]
    sorted_path = unpermute(ys, w, order)
assert_close("permute → grouped_mm_ref → unpermute vs moe_naive", spec, sorted_path, tol=1e-5)
print("the sorted path equals the per-expert loop")

# %% [markdown]
# ## 2.5 See it
#
# 48 tokens routed over 16 experts by `route_deepseek`, the low-numbered experts popular by construction. Move
# `top_k`, the number of groups and how many a token keeps, and a balancing bias — one big step of the sign rule,
# `bias = strength · sign(mean load − load)`. A small step evens the bars out somewhat (with the default knobs
# MaxVio falls from 2.1 to 1.3 at strength 0.2); a larger one overshoots: from about 0.3 the popular experts get no
# tokens and the load piles onto the formerly idle ones. That is why DeepSeek-V3 takes many small steps ($\gamma$ =
# 0.001), each with fresh counts. The weights (the colours) keep coming from the unbiased scores. (The Engineering
# notes draw section 2.3's routing maps.)

# %% tags=["nbval-ignore-output"]
g = torch.Generator().manual_seed(5)
X_LOGITS = torch.randn(48, 16, generator=g) + torch.linspace(1.5, -1.5, 16)  # [48, 16]


def draw_routing(top_k=4, n_group=4, topk_group=2, bias_strength=0.0):
    from minisparse.moe import expert_counts, route_deepseek

    topk_group = min(topk_group, n_group)
    top_k = min(top_k, topk_group * (16 // n_group))  # no more experts than its groups hold
    _, idx0 = route_deepseek(X_LOGITS, None, top_k, n_group, topk_group)
    load0 = expert_counts(idx0, 16).float()
    bias = bias_strength * torch.sign(load0.mean() - load0)  # [16] one step of the sign rule
    w, idx = route_deepseek(X_LOGITS, bias, top_k, n_group, topk_group)
    load = expert_counts(idx, 16)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(width_ratios=[1.3, 1]))
    viz.heatmap(ax1, torch.zeros(48, 16).scatter_(1, idx, w),
                f"weights: top-{top_k}, {topk_group} of {n_group} groups", xlabel="expert",
                ylabel="token", cmap="Blues", vmin=0, vmax=1, colorbar=True)
    for b in range(1, n_group):
        ax1.axvline(b * 16 // n_group - 0.5, color="tab:red", lw=0.8)
    ax2.bar(range(16), load0, color="lightgrey", label="no bias")
    ax2.bar(range(16), load, color="tab:green", width=0.5, label=f"bias {bias_strength:g}")
    ax2.axhline(48 * top_k / 16, color="black", ls=":", lw=1)
    ax2.set(xlabel="expert", ylabel="tokens",
            title=f"load; MaxVio {max_violation(load.float() / load.sum()):.2f}")
    ax2.set_xticks(range(0, 16, 2))
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
    """Forward FLOPs a token spends in one MoE layer: router + top_k routed + shared experts."""
    _, active = moe_params(hidden, inter, num_experts, top_k, n_shared, shared_inter)
    return 2 * active + 2 * hidden * num_experts


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
# about **one FLOP per byte per token**, while an H200 does 693 bf16 TFLOP/s against 4.25 TB/s (both measured): a
# *ridge point* of 163 FLOP/byte, below which the expert is memory-bound. An expert sees
# $m = N_{\mathrm{batch}} \cdot k / E$ tokens, so the sparser the model, the larger the batch it needs.

# %%
from minisparse.moe import expert_intensity, moe_flops_per_token

RIDGE = 693e12 / 4.25e12  # H200: bf16 dense matmul FLOP/s over HBM bytes/s
m = np.logspace(0, 4, 200)
fig, ax = plt.subplots(figsize=(7.5, 4.2))
for name, H, I in [("DeepSeek-V3", 7168, 2048), ("Qwen3-Next", 2048, 512),
                   ("Mixtral", 4096, 14336)]:
    ax.loglog(m, expert_intensity(m, H, I), label=f"{name} expert (H {H}, I {I})")
ax.axhline(RIDGE, color="tab:red", ls="--", lw=1)
ax.text(1.2, RIDGE * 1.15, f"H200 ridge ≈ {RIDGE:.0f} FLOP/byte: compute-bound above",
        color="tab:red", fontsize=8)
for tokens, label in [(64, "decode, 64 sequences"), (16384, "prefill / training, 16K tokens")]:
    m_ds = tokens * 8 / 256  # DeepSeek-V3: tokens per expert = batch · k / E
    ax.axvline(m_ds, color="grey", ls=":", lw=1)
    ax.text(m_ds * 1.08, 1.5, f"DeepSeek-V3,\n{label}:\n{m_ds:g} tokens/expert", fontsize=7,
            color="grey")
ax.set(xlabel="tokens per expert in one batch (m)", ylabel="arithmetic intensity (FLOP/byte)",
       title="A DeepSeek-V3 expert is memory-bound until it sees ~170 tokens at once")
ax.legend(fontsize=8, loc="upper left")
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
plt.show()

# DeepSeek-V3, one MoE layer: 9 experts (8 routed, 1 shared) of 3 · 7168 · 2048 weights, + router
ds_flops = moe_flops_per_token(7168, 2048, 256, 8, n_shared=1)
assert ds_flops == 2 * 9 * 3 * 7168 * 2048 + 2 * 7168 * 256
m_ridge = next(x for x in range(1, 10_000) if expert_intensity(x, 7168, 2048) > RIDGE)
print(f"DeepSeek-V3 MoE layer: {ds_flops / 1e9:.2f} GFLOPs a token; its experts pass the ridge at "
      f"{m_ridge} tokens each, i.e. batches of {m_ridge * 256 // 8:,} tokens")
assert 160 < m_ridge < 190

# %% [markdown]
# *Assumptions: bf16 weights and activations; the expert's weights read once, each token's input and output once
# (the $2I$-wide intermediate kept on chip, as a fused kernel would).* Decoding 64 sequences at once gives each
# DeepSeek-V3 expert 2 tokens: about 2 FLOP/byte, 1 % of the GPU's compute — which is why MoE inference spreads
# experts over many GPUs (expert parallelism) and batches hard. A 16K-token training or prefill batch gives 512
# tokens per expert, well past the ridge.

# %% [markdown]
# ## 2.7 Fast: a grouped GEMM in Triton
#
# After `permute`, an MoE layer is two **grouped GEMMs** (gate/up, then down) with an activation between them:
# rows `offsets[g-1]:offsets[g]` of `x [M, K]` are multiplied by `w[g] [K, N]`. (In this section, as in grouped-GEMM
# code, $g$ indexes the experts and $N$ is the output width; elsewhere $N$ counts tokens and $G$ expert groups.)
# Three ways to compute it:
#
# - **A loop** over experts (`grouped_mm_ref`): $E$ launches, many small, after reading the counts back to the host.
# - **Padding** every expert to one capacity and one batched matmul: padded rows are wasted work (section 2.3).
# - **One kernel over all experts**: the output is cut into `BLOCK_M × BLOCK_N` tiles, and a tile never straddles two experts, so each program multiplies rows of one expert by that expert's weights — the approach of `torch._grouped_mm` and, in block-sparse form, of MegaBlocks. We build this one.
#
# ### The tile schedule
#
# Expert $g$ has $n_g$ rows and needs $\lceil n_g / \mathrm{BLOCK\_M} \rceil$ row tiles; an empty expert needs
# none. Listing each tile's expert and first row gives the schedule, computed on the GPU with a few tensor
# operations and no host synchronisation: the launch uses the upper bound $\lceil M / \mathrm{BLOCK\_M} \rceil + G$
# (each expert wastes at most one partial tile), and unused slots at the end are marked $-1$.

# %%
#| export moe.triton
import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime
from minisparse.moe.checks import check_grouped_mm_args


def tile_schedule(offsets, num_rows, block_m):
    """The row tiles of a grouped GEMM: slot s is rows tile_row[s] : + block_m of expert
    tile_expert[s].

    offsets [G] int32 cumulative row ends, num_rows = M -> (tile_expert [S], tile_row [S]) int32,
    with S = ceil(M / block_m) + G slots. Tiles never straddle two experts (a tile's rows past its
    expert's end are masked); an empty expert gets no tile; unused trailing slots have tile_expert =
    -1. Tensor ops only: no host sync.
    """
    block_m = _checks.positive_int("tile_schedule", "block_m", block_m)
    _checks.positive_int("tile_schedule", "num_rows", num_rows, zero=True)
    G = offsets.numel()
    ends = offsets.long()  # [G]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # [G] first row of each expert
    tiles = (ends - starts + block_m - 1) // block_m  # [G] row tiles of each expert, 0 when empty
    last = tiles.cumsum(0)  # [G] number of tiles of experts 0..g
    slot = torch.arange(triton.cdiv(num_rows, block_m) + G, device=offsets.device)  # [S] tile slots
    expert = torch.searchsorted(last, slot, right=True)  # [S] the slot's expert; G if none
    e = expert.clamp(max=G - 1)
    row = starts[e] + (slot - (last - tiles)[e]) * block_m  # [S] expert start + its earlier tiles
    return torch.where(expert < G, expert, -1).to(torch.int32), row.to(torch.int32)


# %%
from minisparse.moe import tile_schedule

counts_demo = [40, 0, 75, 13, 100, 28]  # rows of six experts, BLOCK_M = 32
offs_demo = torch.tensor(counts_demo).cumsum(0).to(torch.int32)
texp, trow = tile_schedule(offs_demo, int(offs_demo[-1]), 32)
print("tile_expert:", texp.tolist(), "\ntile_row:   ", trow.tolist())
ends_demo = offs_demo.tolist()
plain = [{e for e, end in enumerate(ends_demo) if counts_demo[e] and end - counts_demo[e] < r + 32
          and end > r} for r in range(0, ends_demo[-1], 32)]  # experts in each plain tile
straddle = sum(len(o) > 1 for o in plain)
print(f"a plain tiling: {len(plain)} tiles, {straddle} straddle two experts")
assert int((texp >= 0).sum()) == 11 and len(plain) == 8 and straddle == 3

# %% [markdown]
# Eleven tiles instead of a plain matmul's eight; three of a plain matmul's eight would straddle two experts. Rows a partial tile
# computes past its expert's end are never stored (the next expert's tile computes them; the Engineering notes draw
# the schedule): at most one partial tile per expert. Each tile gets the weights of the one expert that owns its
# rows — that is the whole trick.
#
# ### The forward kernel, tile by tile
#
# One program computes one `BLOCK_M × BLOCK_N` tile of `y`. It reads its (expert, first row) from the schedule,
# then walks along $K$ in steps of `BLOCK_K`, multiplying a `BLOCK_M × BLOCK_K` slab of `x` by a
# `BLOCK_K × BLOCK_N` slab of `w[g]` into an fp32 accumulator (`tl.dot` maps this onto tensor cores). Three details:
#
# - **Rows past the expert's end** are read but never stored: they are the next expert's rows (those at or past
#   row $M$ are clamped to row $M - 1$, so every load is in bounds), the slab is loaded anyway, and the inner loop
#   needs no row mask.
# - **Program order.** Consecutive programs take neighbouring column blocks of a few row tiles (`GROUP_M` of them), so that those tiles' `x` slabs and `w[g]`'s columns are reused from L2 cache.
# - **Strides, not layouts.** `w` may be the transposed view of transformers' `[E, out, in]` weights, and the backward pass passes $w^\top$ without a copy.
#
# Names: `*_ptr` is an argument's base pointer, `w_g` the base of expert $g$'s matrix, `*_ptrs` a block of
# pointers; `rows`, `cols`, `ks` index a tile; `acc` is the accumulator; `BM`, `BN`, `BK` abbreviate the block sizes.

# %%
#| export moe.triton
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
                    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, M, N, K,
                       num_tiles, stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym,
                       stride_yn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                       EVEN_N: tl.constexpr, PRECISION: tl.constexpr):
    """The grouped GEMM (forward, and dx on wᵀ): y[rows of g] = x[rows of g] @ w[g] for every g.

    Program: one BLOCK_M × BLOCK_N tile of y: rows tile_row[t] : + BLOCK_M of the schedule's slot t,
    column block pid_n. All its rows belong to expert g = tile_expert[t]; g = -1 returns at once.
    Grid: (num_tiles · ⌈N / BLOCK_N⌉,), in bands of GROUP_M slots: a band's programs cover its
    slots' column blocks one after another, so programs that run together share x's rows and w[g] in
    L2.
    Tiling: K in steps of BLOCK_K into an fp32 accumulator [BLOCK_M, BLOCK_N]:

                 K →                      N →                        N →
          ┌────────────────┐        ┌──────────────┐          ┌──────────────┐
     row0 │░ x[row0:+BM] ░░│     K  │    ┊▓▓▓┊     │     row0 │    ┊▓▓▓┊     │ BLOCK_M rows,
          │→ step BLOCK_K →│  @  ↓  │w[g]┊▓▓▓┊     │   =      │ y  ┊▓▓▓┊     │ stored only
          └────────────────┘        │    ┊▓▓▓┊     │          └──────────────┘ below offsets[g]
                                    └──────────────┘
                                    pid_n * BLOCK_N

    Math: y[r, n] = Σ_k x[r, k] · w[g, k, n] for the tile's rows r < offsets[g]. Rows past the
    expert's end are read (clamped to row M - 1, so in bounds) and never stored.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # program order: bands of GROUP_M slots × all column blocks
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
    rows_read = tl.minimum(rows, M - 1).to(tl.int64)  # rows past the end: read, never stored
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
        acc = tl.dot(a, b, acc, input_precision=PRECISION)  # [BM, BN] += [BM, BK] @ [BK, BN]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    keep = (rows[:, None] < row_end) & (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=keep)


# %% [markdown]
# ### Backward, and a check
#
# For $y_g = x_g w_g$ and an upstream gradient $\partial y$, the gradients are two more grouped products:
#
# $$
# \partial x_g = \partial y_g\, w_g^\top, \qquad \partial w_g = x_g^\top\, \partial y_g .
# $$
#
# The first is the forward kernel on the strided view $w^\top$, same schedule. In the second the rows are the
# *reduction* dimension: a program owns a tile of one expert's $\partial w_g$ and sums over that expert's rows
# (Engineering notes). `grouped_mm(x, w, offsets)` wraps the three launches in one autograd function. The check,
# with empty experts and row counts that are not multiples of the tile (in the interpreter on a CPU):

# %%
from minisparse.moe import grouped_mm

M_C, K_C, N_C = runtime.reading_size(cpu=(300, 64, 96), gpu=(8192, 1024, 1536))
counts_c = torch.tensor([0, 37, 0, 101, 5, 0, 80, 77]) * M_C // 300  # 8 experts, 3 of them empty
counts_c[-1] += M_C - counts_c.sum()
offs_c = counts_c.cumsum(0).to(torch.int32).to(DEVICE)
g = torch.Generator(device=DEVICE).manual_seed(0)
x_c = torch.randn(M_C, K_C, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
w_c = (torch.randn(8, K_C, N_C, generator=g, device=DEVICE) / K_C**0.5).to(DTYPE).requires_grad_()
dy_c = torch.randn(M_C, N_C, generator=g, device=DEVICE).to(DTYPE)

y_c = grouped_mm(x_c, w_c, offs_c)
dx_c, dw_c = torch.autograd.grad(y_c, (x_c, w_c), dy_c)
xr, wr = x_c.detach().float().requires_grad_(), w_c.detach().float().requires_grad_()
y_r = grouped_mm_ref(xr, wr, offs_c)  # the loop, in fp32 from the same (rounded) inputs
dx_r, dw_r = torch.autograd.grad(y_r, (xr, wr), dy_c.float())
fwd_tol, grad_tol = {torch.float32: (1e-4, 1e-4)}.get(DTYPE, (5e-3, 8e-3))
for name, ref, out, tol in [("y", y_r, y_c, fwd_tol), ("dx", dx_r, dx_c, grad_tol),
                            ("dw", dw_r, dw_c, grad_tol)]:
    print(f"{name}: relative RMS error vs the loop {assert_close(name, ref, out, tol):.1e}")
assert dw_c[counts_c == 0].abs().max() == 0  # empty experts: exactly zero gradient

# %% [markdown]
# ## 2.8 The layer
#
# `MoE` puts the pieces together as the production models do. Its parameters use transformers' names and layouts,
# so a DeepSeek-V3 or Mixtral state dict loads unchanged (Qwen3-Next's names its shared expert `shared_expert`:
# `MoE.from_hf` renames it):
#
# | parameter | shape | in |
# |---|---|---|
# | `gate.weight` | `[E, H]` | all |
# | `gate.e_score_correction_bias` (buffer) | `[E]` | `router="deepseek"` |
# | `experts.gate_up_proj` | `[E, 2I, H]`: $W_{\mathrm{gate}}$ stacked on $W_{\mathrm{up}}$, `[out, in]` | all |
# | `experts.down_proj` | `[E, H, I]` | all |
# | `shared_experts.{gate,up,down}_proj.weight` | a SwiGLU of width `shared_intermediate_size` | DeepSeek, Qwen3-Next (there `shared_expert`) |
# | `shared_expert_gate.weight` | `[1, H]`: the sigmoid gate | Qwen3-Next |
#
# `backend="triton"` runs the experts as in the picture of section 2.4, `"naive"` runs `moe_naive`, and `"auto"` (the
# default) picks Triton where it runs — the rule of every layer in the book. `layer.last_routing` keeps (logits,
# indices) for an auxiliary loss or the bias update. The gate (a `Router`: fp32 logits, then section 2.2's router)
# and the shared expert's SwiGLU are small modules shown in the Engineering notes, which also check that both
# backends give the same gradients and that `MoE.from_hf` reproduces transformers' DeepSeek-V3, Mixtral and
# Qwen3-Next blocks.

# %%
#| export moe.layer
import torch
import torch.nn as nn
import torch.nn.functional as F

from minisparse import _checks
from minisparse.moe.checks import _ROUTERS, _check_moe_args, check_routing_args
from minisparse.moe.naive import moe_naive, permute, route_deepseek, route_topk_softmax, unpermute
from minisparse.moe.triton import grouped_mm


class Experts(nn.Module):
    """E SwiGLU experts as two 3-D tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I], drawn
    from Normal(0, 0.02) as transformers initialises them."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        for name, n in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
            _checks.positive_int("Experts", name, n)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size,
                                                     hidden_size).normal_(std=0.02))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size).normal_(std=0.02))

    def forward(self, x, weights, indices, backend="naive"):  # x [N, H], weights/indices [N, k]
        _checks.one_of("Experts", "backend", backend, ("naive", "triton"))
        if backend == "naive":
            return moe_naive(x, weights, indices, self.gate_up_proj, self.down_proj)
        # indices come from the router's top-k, offsets from sorting them: no value checks
        E = self.gate_up_proj.shape[0]
        x_sorted, order, offsets = permute(x, indices, E, check_values=False)  # [N*k, H]
        h = grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offsets, check_values=False)
        gate, up = h.chunk(2, dim=-1)  # [N*k, I] each
        y_sorted = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offsets,
                              check_values=False)  # [N*k, H]
        return unpermute(y_sorted, weights, order)  # [N, H]


# %%
#| export moe.layer
class MoE(nn.Module):
    """A mixture-of-experts FFN: router, E routed SwiGLU experts, an optional (gated) shared expert.

    hidden_states [B, T, H] (or [N, H]) in the experts' dtype -> the same shape. router="softmax"
    (Mixtral, Qwen3) or "deepseek" (sigmoid, groups, bias); shared_intermediate_size > 0 adds a
    shared SwiGLU, and shared_expert_gate=True scales it by sigmoid(x · w_s) (Qwen3-Next). backend:
    "auto" | "naive" | "triton".
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, *, router="softmax",
                 n_group=1, topk_group=1, routed_scaling_factor=1.0, renormalize=True,
                 shared_intermediate_size=0, shared_expert_gate=False, backend="auto"):
        super().__init__()
        _check_moe_args(hidden_size, intermediate_size, num_experts, top_k, router, n_group,
                        topk_group, routed_scaling_factor, shared_intermediate_size,
                        shared_expert_gate)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.backend = backend  # checked by the property below
        self.gate = Router(hidden_size, num_experts, top_k, router, n_group, topk_group,
                           routed_scaling_factor, renormalize)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_experts = (SwiGLU(hidden_size, shared_intermediate_size)
                               if shared_intermediate_size else None)
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False)
                                   if shared_expert_gate else None)
        self.last_routing = None
        self.reset_parameters()

    @property
    def backend(self):
        """ "auto" (Triton where it runs, else the loop), "naive" or "triton"; checked when set."""
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
        _checks.layer_input("MoE", hidden_states, self.experts, layout, self.hidden_size)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, H]
        logits, weights, indices = self.gate(x)  # [N, E], [N, k], [N, k]
        self.last_routing = (logits, indices)
        y = self.experts(x, weights, indices, _checks.choose_backend(self.backend, x))  # [N, H]
        if self.shared_experts is not None:
            shared = self.shared_experts(x)  # [N, H]
            if self.shared_expert_gate is not None:  # Qwen3-Next's gated shared expert
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.view(shape)


# %% [markdown]
# ## 2.9 Measure
#
# On an H200, `bench/moe.py` times `grouped_mm` against `torch._grouped_mm` — 16K tokens × top-8 = 131,072 rows
# routed unevenly over 64 experts, $K$ = 2048, $N$ = 2816, bf16, forward and both backward products — and the
# `MoE` layer's forward + backward against the loop. Its committed results (`bench/results/moe.json`):

# %%
try:
    moe_results = bench.load_results("moe")
except FileNotFoundError:
    moe_results = None
if moe_results is None:
    print("No H200 results here: on a GPU, `PYTHONPATH=. python bench/moe.py --out bench/results`.")
else:
    rows, cfg, r = moe_results["rows"], moe_results["config"], moe_results
    top = max(row["T"] for row in rows if row["impl"] == "torch._grouped_mm")  # the largest batch
    at = {(row["impl"], row["pass"]): row for row in rows if row["T"] == top}
    print(f"{r['date']} · {r['device']} · torch {r['torch']} · triton {r['triton']} · "
          f"{top * cfg['top_k']:,} rows, K {cfg['K']}, N {cfg['N']}, {cfg['dtype']}")
    print(f"{'pass':8s} {'grouped_mm, ms':>15s} {'torch, ms':>10s} {'ratio':>6s} {'TFLOP/s':>8s}")
    ratio = {}
    for p in ("fwd", "bwd dX", "bwd dW"):
        ours, theirs = at[("grouped_mm (triton)", p)], at[("torch._grouped_mm", p)]
        ratio[p] = theirs["ms"] / ours["ms"]  # speed: above 1, ours is faster
        print(f"{p:8s} {ours['ms']:15.3f} {theirs['ms']:10.3f} {ratio[p]:6.2f} "
              f"{ours['tflops']:8.0f}")
    layer = {row["backend"]: row for row in rows if row["impl"].startswith("MoE layer")}
    print(f"MoE layer, forward + backward, {layer['triton']['T']:,} tokens: Triton "
          f"{layer['triton']['ms']:.1f} ms, loop {layer['naive']['ms']:.1f} ms")
    dw = cfg["launch_configs"][str(top)]["moe.grouped_mm_dw"]  # what the autotuner ran dW with
    print("dW ran with (autotuned): "
          + ", ".join(f"{k} {v}" for k, v in dw.items() if k != "num_ctas"))
    # the takeaways below
    assert [round(ratio[p], 2) for p in ("fwd", "bwd dX", "bwd dW")] == [0.87, 0.97, 0.77], ratio
    tile = (dw["BLOCK_M"], dw["BLOCK_K"], dw["BLOCK_N"], dw["num_warps"], dw["num_stages"])
    assert tile == (32, 128, 128, 4, 4), dw  # the sm_90 row's third entry, not its first
    assert round(at[("grouped_mm (triton)", "fwd")]["tflops"]) == 518
    assert 7.5 < layer["naive"]["ms"] / layer["triton"]["ms"] < 11

# %% [markdown]
# Three takeaways:
#
# - **Forward and $\partial x$ are close to PyTorch's**: 0.87× and 0.97× the speed of `torch._grouped_mm` (the
#   ratio column: below 1, ours is slower); the forward runs at 518 TFLOP/s, three quarters of the 693 TFLOP/s a
#   plain bf16 matmul reaches on this H200 (`bench/notes/roofline.md`; the data sheet says 989).
# - **The weight gradient is the slower pass**, 0.77× PyTorch's speed. The benchmark lets Triton's autotuner time
#   each kernel's candidate launch configurations (block sizes, warps and pipeline stages, listed per GPU in
#   `runtime.LAUNCH_TABLE`; see the Engineering notes) once, at 4K tokens, and keeps the winner for every size. For
#   $\partial W$ it kept one (32 rows a step, a 128 × 128 tile, 4 warps, 4 stages) that a separate forced sweep
#   (`bench/notes/moe.md`) timed 16 % slower at 16K than the default a model runs with (64 rows, a 128 × 256 tile,
#   8 warps, 3 stages).
# - **The layer**: sorting plus two grouped GEMMs run an `MoE` layer's forward and backward 8.6 times faster than the
#   per-expert loop of the spec (11.4 ms against 98.1 ms; 8,192 tokens, 64 experts, top-6).

# %% [markdown]
# ## 2.10 Exercises
#
# Each exercise has a stub, a cell that checks it (`attempt` prints what differs; call the checker itself to get
# the exception), and a solution behind a dropdown.
#
# ### Exercise 1 (predict): the dropped fraction at capacity 1.25
#
# A skewed top-2 router sends the $N k$ assignments to $E = 8$ experts in the shares
# $p = (0.30, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.05)$; each expert holds $C = \mathrm{cf} \cdot N k / E$ rows
# (section 2.3). **First write down** the fraction of assignments dropped at capacity factor 1.25; then write it as
# a function of the shares and cf. The checker routes 4,000 tokens with exactly these shares (and five other
# cases), runs `capacity_mask`, and accepts an answer within 0.005 of the fraction it measures.

# %%
from minisparse.moe.exercises import (SKEWED_SHARES, check_dropped_fraction, check_expected_groups,
                                      check_grouped_tile, check_unpermute)
from minisparse.testing import attempt


def my_dropped_fraction(shares, capacity_factor):
    # your code here: return the fraction (a float) of the N·k assignments that do not fit
    raise NotImplementedError


# %%
attempt(check_dropped_fraction, my_dropped_fraction)  # says what is wrong until the stub is filled

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — expert e gets p_e·N·k assignments and keeps at most cf·N·k/E, so it drops
# max(0, p_e − cf/E)·N·k; divided by N·k, N and k cancel. Serving first choices first changes who
# loses, not how many. Here 0.30 and 0.20 exceed 1.25/8 = 0.15625: 0.14375 + 0.04375 = 0.1875.
def dropped_fraction_solution(shares, capacity_factor):
    return sum(max(0.0, p - capacity_factor / len(shares)) for p in shares)


check_dropped_fraction(dropped_fraction_solution)
assert abs(dropped_fraction_solution(SKEWED_SHARES, 1.25) - 0.1875) < 1e-12


# %% [markdown]
# ### Exercise 2 (derive): how many groups a token reaches without the limit
#
# DeepSeek-V3 puts its $E = 256$ experts in $G = 8$ groups, one per node, and limits each token to 4 of them
# (section 2.2). Without the limit, how many groups would a token's $k = 8$ experts fall in? Assume i.i.d. scores,
# so that the top-$k$ set is a uniformly random set of $k$ experts, and derive the expected number of groups
# touched in closed form (hint: linearity of expectation, one group at a time). The checker measures it with
# `route_deepseek` on 20,000 tokens of random logits, five configurations, within four standard errors.

# %%
def my_expected_groups(num_experts, n_group, top_k):
    # your code here: return the expected number of distinct groups among the top_k experts
    raise NotImplementedError


# %%
attempt(check_expected_groups, my_expected_groups)  # says what is wrong until the stub is filled

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — a group of s = E/G experts is missed when all k chosen experts come from the other
# E − s: probability C(E−s, k) / C(E, k), k distinct experts drawn without replacement. By
# linearity of expectation, G · (1 − C(E−s, k) / C(E, k)) groups are touched: 5.29 of 8 for
# DeepSeek-V3, which the limit caps at 4. The with-replacement shortcut G · (1 − (1 − 1/G)^k) is
# close at E = 256 but not for small E (2.73 instead of 3.14 at E = 8, G = 4).
def expected_groups_solution(num_experts, n_group, top_k):
    s = num_experts // n_group
    return n_group * (1 - math.comb(num_experts - s, top_k) / math.comb(num_experts, top_k))


check_expected_groups(expected_groups_solution)
assert abs(expected_groups_solution(256, 8, 8) - 5.29) < 0.01
assert abs(expected_groups_solution(8, 4, 4) - 3.14) < 0.01 and abs(4 * (1 - 0.75**4) - 2.73) < 0.01


# %% [markdown]
# ### Exercise 3 (debug): this unpermute has a bug
#
# Below is a compact `unpermute`: weight every sorted row, then add it into its token's row. It is right whenever
# all the router's weights are equal (a top-1 router with renormalised weights, say) and wrong in general. Find the
# bug and return the fixed function; the checker compares it with `unpermute` on four batches, the first with
# equal weights.

# %%
def my_unpermute(y_sorted, weights, order):
    # this function has a bug: find it and fix it
    N, k = weights.shape
    weighted = y_sorted * weights.reshape(-1, 1)  # [N*k, H] each sorted row times its weight
    y = torch.zeros(N, y_sorted.shape[1], dtype=y_sorted.dtype)  # [N, H]
    return y.index_add(0, order // k, weighted)  # sorted row i belongs to token order[i] // k


# %%
attempt(check_unpermute, my_unpermute)  # says what is wrong until the function is fixed

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — y_sorted's rows are in expert order, weights.reshape(-1) in (token, slot) order: row i
# is pair order[i], so its weight is weights.reshape(-1)[order[i]]. The index_add was right. With
# equal weights the mix-up is invisible, which is why a top-1 renormalised router hides it.
def unpermute_fixed(y_sorted, weights, order):
    N, k = weights.shape
    weighted = y_sorted * weights.reshape(-1)[order, None]  # [N*k, H] the weight of pair order[i]
    y = torch.zeros(N, y_sorted.shape[1], dtype=y_sorted.dtype)
    return y.index_add(0, order // k, weighted)


check_unpermute(unpermute_fixed)


# %% [markdown]
# ### Exercise 4 (Triton): one tile of the grouped GEMM
#
# Complete the kernel: a program computes one `BLOCK_M × BLOCK_N` tile of `y = x[rows of g] @ w[g]` for the expert
# $g$ of one slot of section 2.7's tile schedule. Fill the gap after the prologue with
#
# 1. the loop over $K$ in steps of `BLOCK_K`: a `[BLOCK_M, BLOCK_K]` slab of `x` times a `[BLOCK_K, BLOCK_N]` slab of `w[g]` into `acc` with `tl.dot`, loads masked where $k \ge K$, $n \ge N$ or a row is past $M$;
# 2. the store of `acc` into `y`, masked to the columns below $N$ **and the rows that belong to expert $g$**.
#
# `x [M, K]`, `w [G, K, N]`, `y [M, N]` are contiguous fp32. The checker runs the kernel on the GPU if there is one,
# else in Triton's interpreter on the CPU, with 16 × 16 × 16 tiles on four ragged cases, two of them with empty
# experts, slots last expert first as a GPU may, `y` starting as NaN, and names the first entry that differs from
# `grouped_mm_ref` (each within $2 \cdot 10^{-3}$ absolute and relative on a CPU; $2 \cdot 10^{-2}$ on a GPU, where
# fp32 `tl.dot` may multiply in TF32).

# %%
import triton
import triton.language as tl


@triton.jit
def my_grouped_tile(x_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, M, N, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t, pid_n = tl.program_id(0), tl.program_id(1)  # a slot of the tile schedule, a column block
    g = tl.load(tile_expert_ptr + t)  # the slot's expert; -1: an unused slot
    if g < 0:
        return
    rows = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK_M)  # [BM] may run past expert g's rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    row_end = tl.load(offsets_ptr + g)  # expert g owns the rows below row_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    # your code here: the K loop into acc, then the masked store of acc into y
    pass


# %%
attempt(check_grouped_tile, my_grouped_tile)  # says what is wrong until the gap is filled

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — the loads put zeros where k >= K (and in rows past M, which the last tile may reach):
# they add nothing. The store keeps rows < row_end: a partial tile's last rows belong to the next
# expert, whose own tile computes them with its weights; stored here, they would overwrite that
# result whenever this tile runs later. input_precision="ieee": exact fp32 products on a GPU too.
@triton.jit
def grouped_tile_solution(x_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, M, N, K,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t, pid_n = tl.program_id(0), tl.program_id(1)
    g = tl.load(tile_expert_ptr + t)
    if g < 0:
        return
    rows = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    row_end = tl.load(offsets_ptr + g)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks  # [BK]
        a = tl.load(x_ptr + rows[:, None] * K + kk[None, :],
                    mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BM, BK]
        b = tl.load(w_ptr + g * K * N + kk[:, None] * N + cols[None, :],
                    mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)  # [BK, BN] of w[g]
        acc = tl.dot(a, b, acc, input_precision="ieee")  # [BM, BN] += [BM, BK] @ [BK, BN]
    keep = (rows[:, None] < row_end) & (cols[None, :] < N)  # expert g's rows, real columns
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=keep)


check_grouped_tile(grouped_tile_solution)

# %% [markdown]
# ## Summary
#
# - An MoE layer replaces one FFN by $E$ experts and a router that sends each token to $k$ of them: memory follows the total parameters, compute the active ones. The 2026 flagships activate 3–10 % of their weights [S].
# - **Routing**: Mixtral/Qwen take a softmax top-$k$ (optionally renormalised); DeepSeek-V3 scores experts with sigmoids, limits each token to the best `topk_group` of `n_group` expert groups, steers the choice with a bias that never touches the weights, and scales the weights by `routed_scaling_factor`. Shared experts see every token; Qwen3-Next gates its shared expert with a sigmoid.
# - **Balancing**: without it, a router collapses onto a few experts. The Switch/Mixtral auxiliary loss $\alpha E \sum_i f_i P_i$ fixes most of it at the cost of a competing gradient; DeepSeek's sign-rule bias update fixes it without touching the loss. Capacity limits drop tokens when the load is uneven; dropless kernels don't.
# - **Dispatch**: sort the (token, slot) pairs by expert (`permute`), run each expert on a contiguous block of rows, and scatter back with the weights (`unpermute`).
# - **Cost**: an expert's arithmetic intensity is about one FLOP per byte per token it processes; on an H200 an expert needs ~170 tokens of its own to be compute-bound — a batch of about 170·E/k tokens (≈ 5,500
#   for DeepSeek-V3) — which is why MoE inference batches hard.
# - **Fast**: the grouped GEMM is one Triton launch over a tile schedule whose tiles never straddle experts; its backward is the same kernel on $w^\top$ plus a grouped weight-gradient kernel that reduces over each expert's rows.
# - **Layer**: `MoE` uses transformers' parameter layout and matches `DeepseekV3MoE`, `MixtralSparseMoeBlock` and `Qwen3NextSparseMoeBlock` through `MoE.from_hf`.
#
# Next, chapter 3 turns from the FFN back to attention: DeepSeek's multi-head latent attention, which shrinks the
# KV cache to one small latent per token.
#
# ## References
#
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix *The seed survey*. Its figures were checked against the models' configs and papers; where they disagree, the text says so.
# - N. Shazeer et al., *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer*, 2017. [arXiv:1701.06538](https://arxiv.org/abs/1701.06538)
# - D. Lepikhin et al., *GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding*, 2020. [arXiv:2006.16668](https://arxiv.org/abs/2006.16668)
# - W. Fedus, B. Zoph, N. Shazeer, *Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity*, 2021. [arXiv:2101.03961](https://arxiv.org/abs/2101.03961)
# - A. Q. Jiang et al., *Mixtral of Experts*, 2024. [arXiv:2401.04088](https://arxiv.org/abs/2401.04088)
# - D. Dai et al., *DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models*, 2024. [arXiv:2401.06066](https://arxiv.org/abs/2401.06066)
# - L. Wang et al., *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*, 2024. [arXiv:2408.15664](https://arxiv.org/abs/2408.15664)
# - DeepSeek-AI, *DeepSeek-V3 Technical Report*, 2024. [arXiv:2412.19437](https://arxiv.org/abs/2412.19437)
# - Qwen Team, *Qwen3 Technical Report*, 2025. [arXiv:2505.09388](https://arxiv.org/abs/2505.09388); model card [Qwen/Qwen3-Next-80B-A3B-Instruct](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct)
# - Kimi Team, *Kimi K2: Open Agentic Intelligence*, 2025. [arXiv:2507.20534](https://arxiv.org/abs/2507.20534)
# - MiniMax, *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention*, 2025. [arXiv:2506.13585](https://arxiv.org/abs/2506.13585)
# - Llama Team, *The Llama 3 Herd of Models*, 2024. [arXiv:2407.21783](https://arxiv.org/abs/2407.21783)
# - J. Kaplan et al., *Scaling Laws for Neural Language Models* (2 FLOPs per parameter and token), 2020. [arXiv:2001.08361](https://arxiv.org/abs/2001.08361)
# - N. Shazeer, *GLU Variants Improve Transformer* (SwiGLU), 2020. [arXiv:2002.05202](https://arxiv.org/abs/2002.05202)
# - T. Gale et al., *MegaBlocks: Efficient Sparse Training with Mixture-of-Experts* (dropless MoE, grouped/block-sparse kernels), 2022. [arXiv:2211.15841](https://arxiv.org/abs/2211.15841)
# - P. Tillet, H. T. Kung, D. Cox, *Triton: An Intermediate Language and Compiler for Tiled Neural Network Computations*, MAPL 2019. [doi:10.1145/3315508.3329973](https://doi.org/10.1145/3315508.3329973)
# - `transformers` 5.x: `DeepseekV3TopkRouter`, `DeepseekV3MoE`, `MixtralTopKRouter`, `MixtralSparseMoeBlock`, `Qwen3NextSparseMoeBlock` and Mixtral's `load_balancing_loss_func` (the oracles of the tests).

# %% [markdown]
# ## Engineering notes (optional)
#
# What a practitioner needs and a first reading skips: the argument checks every op starts with; the
# weight-gradient kernel, block sizes and the launch; a check against `torch._grouped_mm` and bad input; the
# router and shared-expert modules, the backends' gradients and loading transformers' weights; three more
# pictures (group-limited routing, the routing maps, the tile schedule) and dropping on the trained routers;
# timing on a GPU; and the exercise checkers.
#
# ### Argument checks
#
# Every op of the chapter starts with one call that checks its arguments — shapes, dtypes, devices, the
# configuration, and values such as a NaN logit — and raises an error that names the argument, what was expected and
# what came. The helpers, in `minisparse.moe.checks`, are built from the book's shared checks (`minisparse._checks`).
# Value checks follow the book's rule: on CPU tensors always; on CUDA tensors only after
# `minisparse.runtime.set_value_checks(True)`, because reading a reduction back to the host stalls the GPU.

# %% tags=["hide-input"]
#| export moe.checks
import torch

from minisparse import _checks  # the book's shared argument checks

_IDS = (torch.int32, torch.int64)


def check_routing_args(op, num_experts, top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0):
    """A router's configuration: top_k an int in [1, E]; n_group an int that divides E; topk_group
    an int in [1, n_group] whose groups hold at least top_k experts; routed_scaling_factor a
    positive number."""
    _checks.positive_int(op, "top_k", top_k)
    if top_k > num_experts:
        raise ValueError(
            f"{op}: top_k must be <= the number of experts E = {num_experts}, got {top_k}"
        )
    _checks.positive_int(op, "n_group", n_group)
    _checks.divides(op, "n_group", n_group, "the number of experts E", num_experts)
    _checks.positive_int(op, "topk_group", topk_group)
    if topk_group > n_group:
        raise ValueError(
            f"{op}: topk_group must be <= n_group = {n_group} (the groups a token may use), "
            f"got {topk_group}"
        )
    per_group = num_experts // n_group
    if top_k > topk_group * per_group:
        raise ValueError(
            f"{op}: top_k = {top_k} experts cannot come from topk_group = {topk_group} groups of "
            f"{per_group} experts: need top_k <= {topk_group * per_group}"
        )
    _checks.positive_float(op, "routed_scaling_factor", routed_scaling_factor)


def _check_router_inputs(
    op, logits, top_k, bias=None, n_group=1, topk_group=1, routed_scaling_factor=1.0, *,
    softmax=False
):
    """A router's inputs: logits [N, E] float, bias None or a float [E] on logits' device, and the
    configuration (check_routing_args). Values (CPU tensors always, CUDA tensors after
    runtime.set_value_checks(True)): no NaN in logits or bias — top-k ranks a NaN above every
    number, so one NaN bias would send every token to its expert; with softmax, a finite maximum
    in every row of logits — a softmax over a row of -inf, or over a +inf, is NaN (-inf logits
    that mask some experts are fine; sigmoid scores need no such check)."""
    _checks.tensor(op, "logits", logits, "[N, E]", dtypes=_checks.FLOATS)
    E = logits.shape[1]
    check_routing_args(op, E, top_k, n_group, topk_group, routed_scaling_factor)
    if bias is not None:
        _checks.tensor(op, "bias", bias, "[E]", dtypes=_checks.FLOATS)
        _checks.shape(op, "bias", bias, (E,), "[E]", "one per expert")
        _checks.same_device(op, logits=logits, bias=bias)
    if _checks.checking_values(False, logits):
        _checks.value_range(op, "logits", logits, why="a NaN logit gives its token NaN weights")
        _checks.value_range(
            op, "bias", bias, why="top-k would rank its expert first for every token"
        )
        if softmax and logits.numel():
            row_max = logits.detach().float().amax(dim=-1)  # [N]
            bad = (~torch.isfinite(row_max)).nonzero().flatten()  # rows all -inf, or with a +inf
            if bad.numel():
                r = int(bad[0])
                raise ValueError(
                    f"{op}: logits must have a finite maximum in every row (softmax over a row of "
                    f"-inf, or over a +inf, is NaN), got {bad.numel()} of {logits.shape[0]} rows "
                    f"without one (first: row {r}, max {float(row_max[r])})"
                )


def _check_expert_ids(op, indices, num_experts, check_values):
    """indices [N, k] int32/int64 expert ids, num_experts an int > 0; with check_values, under the
    value-check rule, every id in [0, E) (a read-back; on a GPU an id out of range otherwise trips a
    device-side assert)."""
    _checks.tensor(op, "indices", indices, "[N, k]", dtypes=_IDS)
    _checks.positive_int(op, "num_experts", num_experts)
    if check_values and _checks.checking_values(False, indices):
        _checks.value_range(
            op,
            "indices",
            indices,
            low=0,
            high=num_experts - 1,
            why=f"expert ids for num_experts = {num_experts}",
        )


def _check_permute_args(op, x, indices, num_experts, check_values):
    """x [N, H], indices [N, k] expert ids (see _check_expert_ids) with x's N, one device."""
    _checks.tensor(op, "x", x, "[N, H]")
    _check_expert_ids(op, indices, num_experts, check_values)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: indices must be [N, k] with x's N = {x.shape[0]} tokens, got "
            f"{tuple(indices.shape)}"
        )
    _checks.same_device(op, x=x, indices=indices)


def _check_unpermute_args(op, y_sorted, weights, order):
    """weights [N, k] float, y_sorted [N*k, H], order [N*k] int32/int64, one device."""
    _checks.tensor(op, "weights", weights, "[N, k]", dtypes=_checks.FLOATS)
    _checks.tensor(op, "y_sorted", y_sorted, "[N*k, H]")
    _checks.tensor(op, "order", order, "[N*k]", dtypes=_IDS)
    rows = weights.shape[0] * weights.shape[1]
    if y_sorted.shape[0] != rows:
        raise ValueError(
            f"{op}: y_sorted must be [N*k, H] with N*k = {rows} (weights {tuple(weights.shape)}), "
            "got "
            f"{tuple(y_sorted.shape)}"
        )
    _checks.shape(op, "order", order, (rows,), "[N*k]", f"weights {tuple(weights.shape)}")
    _checks.same_device(op, y_sorted=y_sorted, weights=weights, order=order)


# %% tags=["hide-input"]
#| export moe.checks
def check_grouped_mm_args(op, x, w, offsets, *, triton=False, check_values=True):
    """A grouped GEMM's inputs: x [M, K] and w [G, K, N] of one float dtype, offsets [G] int32
    cumulative row ends (torch._grouped_mm's format), one device; for the Triton op (triton=True)
    fp32/fp16/bf16 only and what its kernels need (_checks.triton_inputs). Values — offsets
    non-decreasing from >= 0, the last equal to M — always for the PyTorch loop, under the
    value-check rule for the Triton op; check_values=False skips them (a read-back)."""
    dtypes = _checks.KERNEL_FLOATS if triton else _checks.FLOATS  # the PyTorch loop takes fp64 too
    _checks.tensor(op, "x", x, "[M, K]", dtypes=dtypes)
    _checks.tensor(op, "w", w, "[G, K, N]", dtypes=dtypes)
    _checks.tensor(op, "offsets", offsets, "[G]")
    if offsets.dtype != torch.int32:
        raise TypeError(
            f"{op}: offsets must be torch.int32 cumulative row ends (as torch._grouped_mm takes "
            "them), "
            f"got {offsets.dtype}"
        )
    if offsets.numel() != w.shape[0] or w.shape[0] == 0:
        raise ValueError(
            f"{op}: offsets needs one entry per expert, len(offsets) == w.shape[0] >= 1, got "
            f"len(offsets) = {offsets.numel()} and w of shape {tuple(w.shape)}"
        )
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"{op}: x [M, K] and w [G, K, N] must share K, got x {tuple(x.shape)} and w "
            f"{tuple(w.shape)}"
        )
    _checks.same_dtype(op, dtypes, x=x, w=w)
    _checks.same_device(op, x=x, w=w, offsets=offsets)
    if triton:
        _checks.triton_inputs(
            op, x, w, offsets, instead="grouped_mm_ref (a loop of PyTorch matmuls)"
        )
    if check_values and _checks.checking_values(not triton, x):
        ends = offsets.tolist()
        bad = [i for i in range(len(ends)) if ends[i] < (ends[i - 1] if i else 0)]
        if bad:
            raise ValueError(
                f"{op}: offsets must be non-decreasing cumulative row ends starting at >= 0, got "
                f"{ends[:8]}{' …' if len(ends) > 8 else ''} (first decrease at index {bad[0]})"
            )
        if ends[-1] != x.shape[0]:
            raise ValueError(
                f"{op}: the last offset must equal M = x.shape[0] = {x.shape[0]} (every row "
                "belongs "
                f"to an expert), got {ends[-1]}"
            )


_ROUTERS = ("softmax", "deepseek")


def _check_moe_args(
    hidden_size,
    intermediate_size,
    num_experts,
    top_k,
    router,
    n_group,
    topk_group,
    routed_scaling_factor,
    shared_intermediate_size,
    shared_expert_gate,
):
    """MoE's constructor arguments: sizes ints > 0 (the shared expert's >= 0, 0 meaning none), a
    known router kind, a routing the router can meet (check_routing_args), and a shared expert
    behind a shared_expert_gate."""
    for name, value in (
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_experts", num_experts),
    ):
        _checks.positive_int("MoE", name, value)
    _checks.one_of("MoE", "router", router, _ROUTERS)
    check_routing_args("MoE", num_experts, top_k, n_group, topk_group, routed_scaling_factor)
    _checks.positive_int(
        "MoE", "shared_intermediate_size (0: no shared expert)", shared_intermediate_size, zero=True
    )
    if shared_expert_gate and not shared_intermediate_size:
        raise ValueError(
            "MoE: shared_expert_gate=True needs a shared expert (shared_intermediate_size > 0)"
        )


# %% [markdown]
# ### The weight-gradient kernel
#
# Section 2.7's $\partial w_g = x_g^\top\, \partial y_g$: each program owns a `BLOCK_K × BLOCK_N` tile of one
# expert's $\partial w_g$ and loops over that expert's rows `BLOCK_M` at a time:
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
def _grouped_mm_dw_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_dwg,
    stride_dwk,
    stride_dwn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The grouped GEMM's weight gradient: dw[g] = x[rows of g]ᵀ @ dy[rows of g] for every expert g.

    Program: one BLOCK_K × BLOCK_N tile of dw[g]; it walks expert g's rows BLOCK_M at a time.
    Grid: (⌈K / BLOCK_K⌉ · ⌈N / BLOCK_N⌉, G): the programs of one expert run together and share its
    rows in L2.
    Tiling: a row block of x read transposed, [BLOCK_K, BLOCK_M], times the same row block of dy,
    [BLOCK_M, BLOCK_N], summed into an fp32 accumulator [BLOCK_K, BLOCK_N]:

            rows of g →            N →                  N →
          ┌────────────────┐   r  ┌──────────────┐      ┌──────────────┐
        K │░ x[r0:+BM]ᵀ ░░░│   ↓  │    ┊▓▓▓┊     │    K │    ┊▓▓▓┊     │ tile of dw[g],
          │→ step BLOCK_M →│  @   │ dy ┊▓▓▓┊     │   =  │dw  ┊▓▓▓┊     │ every row block
          └────────────────┘      └──────────────┘      └──────────────┘ of expert g summed

    Math: dw[g, k, n] = Σ_{start <= r < end} x[r, k] · dy[r, n], with [start, end) = [offsets[g-1],
    offsets[g]). Rows past the expert's end are masked to zero (here they would be summed in); an
    empty expert's loop runs zero times and stores zeros, its gradient.
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
        xt = tl.load(
            x_ptr + rows64[None, :] * stride_xm + ks[:, None] * stride_xk,
            mask=in_g[None, :] & (ks[:, None] < K),
            other=0.0,
        )  # [BK, BM] = x[rows, ks]ᵀ
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=in_g[:, None] & (cols[None, :] < N),
            other=0.0,
        )  # [BM, BN]
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)  # [BK, BN]

    dw_g = dw_ptr + g.to(tl.int64) * stride_dwg  # expert g's [K, N] gradient
    dw_ptrs = dw_g + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn  # [BK, BN]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


# %% [markdown]
# ### Block sizes, launch and autograd
#
# Tile sizes trade on-chip memory against reuse. On an H100/H200 (227 KiB of shared memory a block) a 128 × 256 tile
# with `BLOCK_K` = 64 and 3 pipeline stages takes 144 KiB in bf16 — each stage holds a 128 × 64 slab of `x` and a 64
# × 256 slab of `w` — while a Colab T4 has 64 KiB and gets 64 × 64 tiles; fp32 operands take twice the bytes, so
# their rows halve `BLOCK_K` (forward) or `BLOCK_M` (weight gradient). Both kernels read these settings from the
# book's one table, `runtime.LAUNCH_TABLE`: row `"moe.grouped_mm"` for the forward kernel (and $\partial x$, which
# is the same kernel), `"moe.grouped_mm_dw"` for the weight gradient, each per GPU architecture and best first.
# `runtime.launch` tries a row in order, keeps the first configuration that compiles within the GPU's shared memory
# and remembers it. Two points are particular to the grouped GEMM:
#
# - `BLOCK_M` is the tile schedule's tile height, and the host builds the schedule before the launch, so every
#   configuration of a row shares one `BLOCK_M`. The launcher reads it with `runtime.launch_configs`, which gives
#   the configuration a test forces with `runtime.launch_config("moe.grouped_mm", BLOCK_M=16, ...)`, else the row.
# - With `runtime.set_autotune(True)` — `bench/moe.py` turns it on — the first call for each $(N, K)$ times the
#   row's configurations and keeps the fastest; off, the default, the first that fits runs. `bench/notes/moe.md`
#   has the H200 timings behind the `sm_90` rows.
#
# The interpreter's row is one small configuration (32 × 64 × 32 for both kernels): at reading sizes it launches a
# few dozen programs, and the interpreter's cost is per program, not per FLOP.


# %%
def tiles(c):  # BLOCK_M×BLOCK_N×BLOCK_K, warps and pipeline stages of one configuration
    return (
        "×".join(str(c[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        + f" {c['num_warps']}w{c['num_stages']}s"
    )


print("BLOCK_M×BLOCK_N×BLOCK_K, warps (w) and stages (s) of each configuration, best first")
for kernel in ("moe.grouped_mm", "moe.grouped_mm_dw"):
    for row in ("sm_90", "sm_80", "sm_75"):  # and the interpreter's: 32×64×32 for both
        print(
            f"{kernel:18s} {row:11s}",
            ", ".join(tiles(c) for c in runtime.LAUNCH_TABLE[kernel][row]),
        )

# %%
#| export moe.triton
_INSTEAD = "grouped_mm_ref (a loop of PyTorch matmuls)"


def _precision(dtype):
    # fp32 in: exact fp32 products; 16-bit inputs ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_m(device, dtype):
    """The forward's BLOCK_M for this device and dtype, read from the configurations
    `runtime.launch` will try: the one a test forces with `runtime.launch_config`, else the row (all
    of a row's configurations share it)."""
    return runtime.launch_configs("moe.grouped_mm", device, dtype)[0]["BLOCK_M"]


def _launch_fwd(x, w, offsets, y, schedule, block_m):
    """Write y [M, N] = grouped x [M, K] @ w [G, K, N] tile by tile over `schedule` = (tile_expert,
    tile_row) from tile_schedule(offsets, M, block_m). Returns the launch configuration (None when
    there is nothing to launch)."""
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
        "moe.grouped_mm",
        _grouped_mm_kernel,
        lambda c: (num_tiles * triton.cdiv(N, c["BLOCK_N"]),),
        (
            x,
            w,
            y,
            offsets,
            tile_expert,
            tile_row,
            M,
            N,
            K,
            num_tiles,
            *x.stride(),
            *w.stride(),
            *y.stride(),
        ),
        dict(PRECISION=_precision(x.dtype)),
        device=x.device,
        dtype=x.dtype,
        fit=lambda c: {**c, "BLOCK_M": block_m},  # the tile height the schedule was built with
        autotune_key=["N", "K"],
        instead=_INSTEAD,
    )


def _launch_dw(x, dy, offsets, dw):
    """Write dw [G, K, N] = per-expert x_gᵀ @ dy_g (zeros for empty experts). Returns the launch
    configuration."""
    K, N, G = x.shape[1], dy.shape[1], offsets.numel()
    if K == 0 or N == 0:
        return None
    return runtime.launch(
        "moe.grouped_mm_dw",
        _grouped_mm_dw_kernel,
        lambda c: (triton.cdiv(K, c["BLOCK_K"]) * triton.cdiv(N, c["BLOCK_N"]), G),
        (x, dy, dw, offsets, N, K, *x.stride(), *dy.stride(), *dw.stride()),
        dict(PRECISION=_precision(x.dtype)),
        device=x.device,
        dtype=x.dtype,
        autotune_key=["N", "K"],
        instead=_INSTEAD,
    )


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        block_m = _block_m(x.device, x.dtype)
        # [S] expert and first row of each tile slot
        schedule = tile_schedule(offsets, x.shape[0], block_m)
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
        # dx_g = dy_g @ w_gᵀ: the forward kernel on a transposed view, same schedule
        if ctx.needs_input_grad[0]:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _launch_fwd(dy, w.transpose(1, 2), offsets, dx, ctx.schedule, ctx.block_m)
        # dw_g = x_gᵀ @ dy_g, laid out like w (e.g. a transposed [E, out, in] view)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(w)
            _launch_dw(x, dy, offsets, dw)
        return dx, dw, None


def grouped_mm(x, w, offsets, *, check_values=True):
    """Grouped GEMM in Triton: y[offsets[g-1]:offsets[g]] = x[offsets[g-1]:offsets[g]] @ w[g],
    differentiable.

    x [M, K] rows sorted by expert; w [G, K, N] (any strides, e.g. `weight.transpose(1, 2)` of
    transformers' [E, out, in] experts); offsets [G] int32 cumulative row ends, offsets[-1] == M ->
    y [M, N] in x's dtype (fp32, fp16 or bf16). Same result as `torch._grouped_mm(x, w,
    offs=offsets)`. One launch over all experts, fp32 accumulation; empty experts are fine.
    Backward: dx by the same kernel on w's transpose, dw by the grouped weight-gradient kernel. The
    offsets check reads offsets back to the host: on CPU tensors always, on CUDA tensors after
    `runtime.set_value_checks(True)`; check_values=False skips it (the MoE layer, which built them).
    """
    check_grouped_mm_args("grouped_mm", x, w, offsets, triton=True, check_values=check_values)
    return _GroupedMM.apply(x, w, offsets.contiguous())  # kernels read offsets[g] at offsets + g


# %% [markdown]
# ### Against `torch._grouped_mm`
#
# Section 2.7's check, also against PyTorch's grouped GEMM where this build runs it:

# %%
try:
    y_t = torch._grouped_mm(x_c.detach(), w_c.detach(), offs=offs_c)
    err = assert_close("y vs torch", y_t.float(), y_c.float(), fwd_tol)
    print(f"y vs torch._grouped_mm: {err:.1e}")
except (RuntimeError, AttributeError) as err:  # an older PyTorch, or an unsupported dtype
    print("torch._grouped_mm is not available here:", str(err).splitlines()[0][:100])


# %% [markdown]
# ### Bad input
#
# Bad input fails early and says what it wanted. Shapes, dtypes and devices are checked on every call; the offsets'
# values (non-decreasing, the last equal to $M$) on CPU tensors always and on CUDA tensors after
# `runtime.set_value_checks(True)`, since reading them back stalls the GPU — the cell turns it on, so that it prints
# the same on a GPU.

# %%
previous = runtime.set_value_checks(True)
try:
    for bad in [
        lambda: grouped_mm(x_c, w_c, offs_c.long()),  # int64 offsets
        lambda: grouped_mm(x_c, w_c, offs_c.flip(0)),  # not monotone
        lambda: grouped_mm(x_c, w_c, offs_c[:-1]),  # one offset short
        lambda: grouped_mm(x_c[:, :-1], w_c, offs_c),
    ]:  # K mismatch
        try:
            bad()
        except (ValueError, TypeError) as err:
            print(f"{type(err).__name__}: {err}")
        else:
            raise AssertionError("bad input was accepted")
finally:
    runtime.set_value_checks(previous)


# %%
# transformers is a test dependency: the cells below that compare against it skip without it
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: the checks against its MoE blocks are skipped")

# %% [markdown]
# ### Real models' expert parameters
#
# `moe_params` on three released models' configurations (`transformers`' defaults):

# %%
if transformers is not None:
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3NextConfig

    rows = []
    ds = DeepseekV3Config()
    n_moe = ds.num_hidden_layers - ds.first_k_dense_replace  # the first 3 layers are dense
    t, a = moe_params(
        ds.hidden_size,
        ds.moe_intermediate_size,
        ds.n_routed_experts,
        ds.num_experts_per_tok,
        ds.n_shared_experts,
    )
    rows.append(("DeepSeek-V3", n_moe * t, n_moe * a, 671, 37))
    mx = MixtralConfig()
    t, a = moe_params(
        mx.hidden_size, mx.intermediate_size, mx.num_local_experts, mx.num_experts_per_tok
    )
    rows.append(("Mixtral 8x7B", mx.num_hidden_layers * t, mx.num_hidden_layers * a, 47, 13))
    qn = Qwen3NextConfig()
    t, a = moe_params(
        qn.hidden_size,
        qn.moe_intermediate_size,
        qn.num_experts,
        qn.num_experts_per_tok,
        1,
        qn.shared_expert_intermediate_size,
    )
    rows.append(("Qwen3-Next-80B-A3B", qn.num_hidden_layers * t, qn.num_hidden_layers * a, 80, 3))
    for name, total, active, model_total, model_active in rows:
        print(
            f"{name:20s} experts: {total / 1e9:6.1f}B of {model_total}B total, "
            f"{active / 1e9:5.2f}B of "
            f"{model_active}B active ({active / total:.2%} of the expert weights)"
        )
        assert 0.85 < total / 1e9 / model_total < 1.0  # the experts are almost all of the model ...
        # ... but attention, embeddings and dense layers add to the active count
        assert active / 1e9 < model_active
    assert (ds.n_routed_experts, ds.num_experts_per_tok, ds.n_group, ds.topk_group) == (
        256,
        8,
        8,
        4,
    )

# %% [markdown]
# In all three the experts are nearly all of the model's memory — and most, though not all, of what a token computes
# with:
# attention, embeddings and (in DeepSeek-V3) three dense layers make up the rest of the active count. Qwen3-Next
# is the extreme: 512 experts, 10 of them per token, 2 % of its expert weights active.

# %% [markdown]
# ### The router and the shared expert
#
# `MoE`'s two small modules: the gate, which computes the logits in fp32 and calls section 2.2's routers, and
# the dense SwiGLU of a shared expert, both with transformers' parameter names.

# %%
#| export moe.layer
class SwiGLU(nn.Module):
    """A dense SwiGLU FFN, transformers' names: down_proj(silu(gate_proj(x)) * up_proj(x)). The
    shared expert."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        _checks.positive_int("SwiGLU", "hidden_size", hidden_size)
        _checks.positive_int("SwiGLU", "intermediate_size", intermediate_size)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The gate: logits = x @ weightᵀ in fp32, then route_topk_softmax or route_deepseek (with its
    bias)."""

    def __init__(self, hidden_size, num_experts, top_k, kind="softmax", n_group=1, topk_group=1,
                 routed_scaling_factor=1.0, renormalize=True):
        super().__init__()
        _checks.positive_int("Router", "hidden_size", hidden_size)
        _checks.positive_int("Router", "num_experts", num_experts)
        _checks.one_of("Router", "kind", kind, _ROUTERS)
        check_routing_args("Router", num_experts, top_k, n_group, topk_group, routed_scaling_factor)
        self.kind, self.top_k, self.renormalize = kind, top_k, renormalize
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size).normal_(std=0.02))
        if kind == "deepseek":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def route(self, logits):
        if self.kind == "softmax":
            return route_topk_softmax(logits, self.top_k, self.renormalize)
        bias = getattr(self, "e_score_correction_bias", None)
        return route_deepseek(logits, bias, self.top_k, self.n_group, self.topk_group,
                              self.routed_scaling_factor, self.renormalize)

    def forward(self, x):  # x [N, H] -> logits [N, E] fp32, weights [N, k] fp32, indices [N, k]
        _checks.tensor("Router", "x", x, "[N, hidden]")
        if not x.is_floating_point():
            raise TypeError(f"Router: x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Router: x must be [N, hidden] with hidden = {self.weight.shape[1]} "
                             f"(one row a token), got {tuple(x.shape)}")
        logits = F.linear(x.float(), self.weight.float())
        return (logits, *self.route(logits))


# %% [markdown]
# ### Naive and Triton backends, gradients
#
# The two backends agree on the output's gradients with respect to the input and every parameter — through both
# grouped GEMMs, the permutation and the router:

# %%
from minisparse.moe import MoE

layer = MoE(64, 48, 8, 2, router="deepseek", n_group=2, topk_group=1, shared_intermediate_size=32,
            shared_expert_gate=True).to(DEVICE)
x_l = torch.randn(3, 40, 64, device=DEVICE, requires_grad=True)
grads = {}
for backend in ("naive", "triton"):
    layer.backend = backend
    layer.zero_grad()
    x_l.grad = None
    layer(x_l).square().mean().backward()
    grads[backend] = {"x": x_l.grad.clone(),
                      **{n: p.grad.clone() for n, p in layer.named_parameters()}}
for name in grads["naive"]:
    assert_close(f"d{name}", grads["naive"][name], grads["triton"][name], tol=1e-4)
print(f"triton and naive backends agree on {len(grads['naive'])} gradients")

# %% [markdown]
# ### Loading transformers' weights
#
# `MoE.from_hf(module)` builds an `MoE` with the shapes, routing settings and weights of transformers'
# `DeepseekV3MoE`, `MixtralSparseMoeBlock` or `Qwen3NextSparseMoeBlock`. It is a classmethod of `MoE`, attached
# here with the loaders.


# %%
#| export moe.layer
def _moe_from_hf(cls, module, backend="auto"):
    """An MoE with the weights of transformers' DeepseekV3MoE, MixtralSparseMoeBlock or
    Qwen3NextSparseMoeBlock.

    Reads the routing configuration from module.gate and the sizes from module.experts' 3-D tensors.
    Mixtral's router jitter (training only) is not reproduced.
    """
    op = "MoE.from_hf"
    expected = ("a transformers MoE block with 3-D expert tensors (DeepseekV3MoE, "
                "MixtralSparseMoeBlock, Qwen3NextSparseMoeBlock)")
    _checks.hf_module(op, module, expected, attrs=("gate.weight", "gate.top_k", "experts.act_fn",
                                                   "experts.gate_up_proj", "experts.down_proj"))
    gate, experts = module.gate, module.experts
    if not (isinstance(experts.gate_up_proj, torch.Tensor) and experts.gate_up_proj.dim() == 3):
        raise TypeError(f"{op}: module must be {expected}, got {type(module).__name__} (its "
                        "experts.gate_up_proj is not one [E, 2I, H] tensor)")
    if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3's router reads four more settings
        _checks.hf_module(op, module, expected, attrs=tuple(
            f"gate.{a}" for a in ("num_group", "topk_group", "routed_scaling_factor",
                                  "norm_topk_prob")))
    probe = torch.linspace(-4, 4, 17)
    if not torch.allclose(experts.act_fn(probe), F.silu(probe)):
        raise ValueError(f"MoE.from_hf: the experts' activation must be SiLU, got {experts.act_fn}")
    E, two_i, H = experts.gate_up_proj.shape
    if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3
        routing = dict(
            router="deepseek",
            n_group=gate.num_group,
            topk_group=gate.topk_group,
            routed_scaling_factor=gate.routed_scaling_factor,
            renormalize=gate.norm_topk_prob,
        )
    else:  # Mixtral always renormalises; Qwen3-Next has a flag
        routing = dict(router="softmax", renormalize=getattr(gate, "norm_topk_prob", True))
    shared = getattr(module, "shared_experts", None) or getattr(module, "shared_expert", None)
    layer = cls(
        H,
        two_i // 2,
        E,
        gate.top_k,
        **routing,
        backend=backend,
        shared_intermediate_size=shared.gate_proj.out_features if shared is not None else 0,
        shared_expert_gate=getattr(module, "shared_expert_gate", None) is not None,
    )
    state = {
        k.replace("shared_expert.", "shared_experts."): v for k, v in module.state_dict().items()
    }
    layer.load_state_dict(state)
    layer.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
    layer.gate.float()  # the router stays in fp32, as DeepSeek-V3 keeps it
    return layer


MoE.from_hf = classmethod(_moe_from_hf)


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

    # qwen3_next imports fla, which warns that its kernels need a GPU
    with warnings.catch_warnings():
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
        "DeepseekV3MoE": randomize(
            DeepseekV3MoE(
                DeepseekV3Config(
                    hidden_size=64,
                    moe_intermediate_size=32,
                    n_routed_experts=16,
                    num_experts_per_tok=4,
                    n_group=4,
                    topk_group=2,
                    n_shared_experts=2,
                    routed_scaling_factor=2.5,
                    experts_implementation="eager",
                )
            ),
            0,
        ),
        "MixtralSparseMoeBlock": randomize(
            MixtralSparseMoeBlock(
                MixtralConfig(
                    hidden_size=64,
                    intermediate_size=48,
                    num_local_experts=8,
                    num_experts_per_tok=2,
                    experts_implementation="eager",
                )
            ),
            1,
        ),
        "Qwen3NextSparseMoeBlock": randomize(
            Qwen3NextSparseMoeBlock(
                Qwen3NextConfig(
                    hidden_size=64,
                    moe_intermediate_size=32,
                    num_experts=16,
                    num_experts_per_tok=4,
                    shared_expert_intermediate_size=48,
                    experts_implementation="eager",
                )
            ),
            2,
        ),
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
# ### Group-limited routing, drawn
#
# DeepSeek-V3's groups, drawn small: 32 experts in 8 groups of 4; each token keeps its 3 best groups (grey: the
# groups it may not use) and picks 6 experts among them (white dots). Red rings mark the token's top-6 over *all*
# experts, without the limit: random scores scatter a token's best experts over many groups, so here the limit
# changes the choice of every one of these 12 tokens. Training adapts the router to the limit; what it buys is that a
# token's activations travel to at most `topk_group` nodes.

# %%
g = torch.Generator().manual_seed(3)
G_E, G_G, G_TG, G_K = 32, 8, 3, 6
# [12 tokens, 32 experts]
glogits = torch.randn(12, G_E, generator=g) + 1.5 * torch.randn(1, G_E, generator=g)
_, gidx = route_deepseek(glogits, None, G_K, n_group=G_G, topk_group=G_TG)
_, free_idx = route_deepseek(glogits, None, G_K)  # the same router without groups
scores = torch.sigmoid(glogits)
group_score = scores.view(12, G_G, -1).topk(2, dim=-1).values.sum(-1)  # [12, 8]
kept = torch.zeros(12, G_G, dtype=torch.bool).scatter_(
    1, group_score.topk(G_TG, dim=-1).indices, True
)
fig, ax = plt.subplots(figsize=(8, 3.6))
viz.heatmap(
    ax,
    scores,
    "sigmoid scores; grey = masked group; white dots: chosen; red rings: top-6 without groups",
    xlabel="expert",
    ylabel="token",
    cmap="viridis",
    colorbar=True,
)
masked = (~kept).repeat_interleave(G_E // G_G, dim=1).float().numpy()  # [12, 32]
ax.imshow(
    np.ma.masked_where(masked == 0, masked),
    cmap="Greys",
    vmin=0,
    vmax=1.4,
    alpha=0.85,
    aspect="auto",
    interpolation="nearest",
)
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
# ### The tile schedule, drawn
#
# Section 2.7's schedule for experts of 40, 0, 75, 13, 100 and 28 rows, `BLOCK_M` = 32; hatched: rows a partial
# tile computes past its expert's end and never stores.

# %%
colors = plt.cm.tab10(np.arange(len(counts_demo)))
fig, ax = plt.subplots(figsize=(6, 4.2))
for i, (e, r) in enumerate(zip(texp.tolist(), trow.tolist())):
    if e < 0:
        continue
    used = min(32, ends_demo[e] - r)
    x0 = 0.03 + 0.32 * (i % 3)  # three lanes, so that a partial tile's overhang stays visible
    ax.add_patch(
        plt.Rectangle((x0, r + 0.5), 0.28, used - 1, facecolor=colors[e], alpha=0.45, edgecolor="k")
    )
    if used < 32:  # rows past the expert's end: computed, never stored
        ax.add_patch(
            plt.Rectangle((x0, r + used), 0.28, 32 - used, fill=False, ls=":", hatch="///")
        )
    ax.text(x0 + 0.14, r + 16, f"tile {i}: expert {e}\nrows {r}–{r + used - 1}", ha="center",
            va="center", fontsize=6.5, bbox=dict(fc="white", alpha=0.8, lw=0))
ax.set(
    xlim=(0, 1),
    ylim=(ends_demo[-1] + 12, 0),
    xticks=[],
    ylabel="row of x (sorted by expert)",
    title=f"tile_schedule: {int((texp >= 0).sum())} tiles, {int((texp < 0).sum())} unused slots",
)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The routing maps of the trained routers
#
# Each row is a token of the evaluation batch, sorted by its cluster; each column an expert; the colour is the
# router's weight (zero when not chosen). Left: the router trained without balancing; right: with the bias update.

# %%
order_c = torch.argsort(c_eval[:256], stable=True)  # 256 tokens, grouped by cluster
maps_w = {}
for m in ("none", "bias"):
    p = runs[m][0]
    with torch.no_grad():
        w, idx = route_deepseek(x_eval[:256] @ p["router"].T, p["bias"], K_TOY)
    dense = torch.zeros(256, E_TOY).scatter_(1, idx, w)  # [N, E] weight of each chosen expert
    maps_w[f"trained with: {m}"] = dense[order_c]
fig = viz.panels(maps_w, size=3.4, xlabel="expert", ylabel="token (sorted by cluster)",
                 cmap="Blues", vmin=0, vmax=1, colorbar=True)
for ax in fig.axes[:2]:
    for b in torch.cumsum(torch.bincount(c_eval[:256], minlength=CLUSTERS), 0)[:-1]:
        ax.axhline(b - 0.5, color="tab:red", lw=0.5)
plt.show()

# %% [markdown]
# The red lines separate clusters. Both routers send each cluster to a fixed pair of experts (a few tokens aside);
# what differs is how the pairs share the experts. Without balancing a few experts serve most clusters and two
# columns stay empty; with the bias update every expert serves about two clusters, though some clusters end up on
# the same pair.

# %% [markdown]
# ### Dropping on the trained routers
#
# Section 2.3's capacity limit applied to the three routers trained there, on the same 1,024 tokens:

# %%
from minisparse.moe import capacity_mask, moe_naive, route_deepseek

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
            # a dropped slot contributes nothing
            out = moe_naive(x_eval, w * keep, idx, p["gate_up"], p["down"])
            dropped.append(1 - keep.float().mean().item())
            errors.append(((out - dropless).norm() / dropless.norm()).item())
    ax.plot(factors, [100 * d for d in dropped], marker="o", color=color, label=f"{m}")
    if m == "none":
        # a third at cf 1, still a tenth at cf 2
        assert 0.25 < dropped[0] < 0.4 and dropped[-1] > 0.05
    else:
        assert dropped[0] < 0.1 and max(dropped[1:]) == 0
    print(
        f"{m:5s}: dropped {', '.join(f'{100 * d:.1f} %' for d in dropped)} of assignments at cf = "
        f"{factors}; "
        f"output change vs dropless {', '.join(f'{e:.2f}' for e in errors)}"
    )
ax.set(
    xlabel="capacity factor",
    ylabel="assignments dropped (%)",
    title="Token dropping on the same 1024 tokens",
)
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
# ### A grouped GEMM's FLOPs and bytes
#
# The cost of section 2.7's operation; section 2.9's shape (16K tokens × top-8 over 64 experts) is compute-bound:

# %%
#| export moe.cost
def grouped_mm_flops(M, K, N):
    """FLOPs of a grouped GEMM over M rows in total: every row times one K × N matrix."""
    return 2 * M * K * N


def grouped_mm_bytes(M, K, N, num_groups, bytes_per_element=2):
    """Bytes a grouped GEMM moves at least: x [M, K] and y [M, N] once, every w [K, N] once."""
    return bytes_per_element * (M * K + num_groups * K * N + M * N)


# %%
from minisparse.moe import grouped_mm_bytes, grouped_mm_flops

fl, by = grouped_mm_flops(131072, 2048, 2816), grouped_mm_bytes(131072, 2048, 2816, 64)
assert fl / by > RIDGE  # section 2.9's shape, 16K tokens × top-8 over 64 experts: compute-bound
print(f"{fl / by:.0f} FLOP/byte against the ridge's {RIDGE:.0f}: compute-bound")

# %% [markdown]
# ### Timing on a GPU
#
# On a GPU, the cell below times `grouped_mm`, `torch._grouped_mm` and the loop at a smaller size live (it prints a
# note on a CPU, where the interpreter's timings would mean nothing).

# %%
if runtime.has_gpu() and not runtime.interpreting():
    M_L, K_L, N_L, E_L = 32768, 2048, 1408, 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cnt = torch.multinomial(
        torch.softmax(torch.randn(E_L, generator=g, device=DEVICE), 0), M_L, True, generator=g
    )
    offs_l = torch.bincount(cnt, minlength=E_L).cumsum(0).to(torch.int32)
    x_l = torch.randn(M_L, K_L, device=DEVICE, dtype=DTYPE)
    # transformers' layout, viewed
    w_l = torch.randn(E_L, N_L, K_L, device=DEVICE, dtype=DTYPE).transpose(1, 2)
    flops = grouped_mm_flops(M_L, K_L, N_L)
    impls = {
        "grouped_mm (triton)": lambda: grouped_mm(x_l, w_l, offs_l),  # no host read on a GPU
        "torch._grouped_mm": lambda: torch._grouped_mm(x_l, w_l, offs=offs_l),
        "loop (grouped_mm_ref)": lambda: grouped_mm_ref(x_l, w_l, offs_l),
    }
    for name, fn in impls.items():
        try:
            ms = bench.median_ms(fn)
            print(f"{name:22s} {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s")
        except RuntimeError as err:
            print(f"{name:22s} failed: {str(err).splitlines()[0][:80]}")
else:
    print("No GPU here: nothing to time live (section 2.9 shows the committed H200 numbers).")

# %% [markdown]
# ### The exercise checkers
#
# The checkers of section 2.10, in `minisparse.moe.exercises`. Each measures or recomputes with the chapter's own
# functions (`capacity_mask`, `route_deepseek`, `unpermute`, `grouped_mm_ref`) and says what differs.

# %%
#| export moe.exercises
import math

import torch
import triton

from minisparse.moe.naive import capacity_mask, grouped_mm_ref, permute, route_deepseek, unpermute
from minisparse.moe.triton import tile_schedule
from minisparse.testing import ExerciseError, check, number_answer

# exercise 1's router: 8 experts, top-2
SKEWED_SHARES = (0.30, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.05)


def _routing_with_shares(shares, num_tokens=4000, top_k=2, seed=0):
    """indices [num_tokens, top_k] of distinct experts in which expert e gets round(shares[e] · N ·
    k) of the N·k assignments (each share at most 1 / top_k), tokens in a seeded random order."""
    total = num_tokens * top_k
    counts = [round(s * total) for s in shares]
    counts[-1] += total - sum(counts)
    # [N*k] sorted by expert
    flat = torch.repeat_interleave(torch.arange(len(shares)), torch.tensor(counts))
    # [N, k]: token t gets flat[t], flat[t + N], ... (distinct experts)
    slots = flat.view(top_k, num_tokens).t()
    return slots[torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))]


def _measured_dropped(shares, capacity_factor):
    keep = capacity_mask(_routing_with_shares(shares), len(shares), capacity_factor)  # [N, k]
    return 1.0 - keep.float().mean().item()


def check_dropped_fraction(fn):
    """Check fn(shares, capacity_factor) -> the fraction of assignments a capacity limit drops,
    against capacity_mask on 4,000 tokens routed top-2 with exactly those shares; within 0.005."""
    cases = [
        (SKEWED_SHARES, 1.25),
        (SKEWED_SHARES, 1.0),
        (SKEWED_SHARES, 2.0),
        ((0.125,) * 8, 1.0),
        ((0.5, 0.3, 0.2), 1.0),
        ((0.4, 0.4, 0.1, 0.1), 1.5),
    ]
    check(
        "dropped fraction",
        fn,
        _measured_dropped,
        cases,
        tol=0.005,
        hint="each expert keeps at most C = cf · N·k / E of its share · N·k assignments; what is "
             "left over is "
        "dropped, and the fraction is of all N·k assignments",
    )


def _measured_groups(num_experts, n_group, top_k, num_tokens=20000):
    """Mean number of distinct groups among a token's top_k experts, routed without a group limit on
    i.i.d. logits."""
    logits = torch.randn(
        num_tokens, num_experts, generator=torch.Generator().manual_seed(num_experts + top_k)
    )
    _, idx = route_deepseek(logits, None, top_k)  # [n, k] the top-k of i.i.d. scores
    group = idx // (num_experts // n_group)  # [n, k] group of each chosen expert
    touched = torch.zeros(num_tokens, n_group, dtype=torch.bool).scatter_(1, group, True)  # [n, G]
    return touched.sum(1).double()  # [n]


def check_expected_groups(fn):
    """Check fn(num_experts, n_group, top_k) -> the expected number of groups a token's top_k
    experts fall in without a group limit, against the mean over 20,000 tokens with i.i.d. scores
    (within 4 standard errors)."""
    cases = [(8, 4, 4), (32, 8, 6), (256, 8, 8), (64, 8, 1), (16, 2, 8)]
    for E, G, k in cases:
        try:
            got = fn(E, G, k)
        except NotImplementedError:
            raise ExerciseError(
                "✗ expected groups: not implemented yet — fill in the function and run the cell "
                "again"
            ) from None
        got = number_answer("expected groups", got, f"the answer at E = {E}, G = {G}, k = {k}")
        touched = _measured_groups(E, G, k)
        mean, se = touched.mean().item(), touched.std().item() / math.sqrt(touched.numel())
        if not abs(got - mean) <= 4 * se + 1e-3:
            raise ExerciseError(
                f"✗ expected groups: E = {E}, n_group = {G}, top_k = {k}: you say {got:.6g}, the "
                "routers measure "
                f"{mean:.3f} ± {se:.3f}\nHint: count, for one group, the chance that none of the k "
                "experts is in "
                "it; the k experts are k different experts, drawn without replacement"
            )
    mean = _measured_groups(256, 8, 8).mean().item()
    print(
        f"✓ expected groups: all {len(cases)} configurations match the measured means "
        f"(DeepSeek-V3's 256 experts, top-8, 8 groups: {mean:.2f} groups a token without the limit)"
    )


def _unpermute_cases():
    g = torch.Generator().manual_seed(23)
    cases = []
    for N, k, E, H, equal in [
        (6, 1, 4, 3, True),
        (5, 2, 4, 3, False),
        (12, 3, 6, 8, False),
        (9, 4, 4, 2, False),
    ]:
        x = torch.randn(N, H, generator=g)
        # [N, k] distinct experts
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
        # top-1 renormalised: all 1
        weights = torch.ones(N, k) if equal else torch.rand(N, k, generator=g)
        x_sorted, order, _ = permute(x, idx, E)
        # row i scaled by i + 1
        y_sorted = x_sorted * (1 + torch.arange(N * k, dtype=torch.float32)[:, None])
        cases.append((y_sorted, weights, order))
    return cases


def check_unpermute(fn):
    """Check fn(y_sorted [N*k, H], weights [N, k], order [N*k]) -> y [N, H] against unpermute."""
    check(
        "unpermute (combine)",
        fn,
        unpermute,
        _unpermute_cases(),
        tol=1e-5,
        hint="case 1 has equal weights and passes; what order are the rows of y_sorted in, and "
             "what order are "
        "the entries of weights.reshape(-1) in?",
    )


# %%
#| export moe.exercises
# exercise 4's tile (tl.dot needs 16 or more on a GPU)
_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def _tile_cases():
    """(rows per expert, K, N): ragged experts, empty ones, K and N not multiples of the tile."""
    return [([5, 0, 37, 1, 20], 40, 24), ([16, 16, 3], 16, 16), ([0, 23, 0], 9, 5), ([40], 33, 40)]


def check_grouped_tile(kernel):
    """Launch kernel[grid](x, w, y, tile_expert, tile_row, offsets, M, N, K, BLOCK_M=16, BLOCK_N=16,
    BLOCK_K=16) on the tile schedule (slots in reverse order, later experts first, as a GPU may run
    them), y starting as NaN; compare with grouped_mm_ref and say which row and column differ, and
    why it may."""
    # without a GPU the kernel runs in the interpreter; on one, fp32 tl.dot may run in TF32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 2e-2 if dev == "cuda" else 2e-3
    for i, (counts, K, N) in enumerate(_tile_cases()):
        g = torch.Generator().manual_seed(40 + i)
        M, G = sum(counts), len(counts)
        x = torch.randn(M, K, generator=g).to(dev)  # [M, K] rows sorted by expert
        w = torch.randn(G, K, N, generator=g).to(dev)  # [G, K, N]
        offsets = torch.tensor(counts).cumsum(0).to(torch.int32).to(dev)  # [G] cumulative row ends
        expert, row = tile_schedule(offsets, M, _TILE["BLOCK_M"])
        # the last expert's tiles run first
        expert, row = expert.flip(0).contiguous(), row.flip(0).contiguous()
        # y and a tile's rows of NaN after it: a store past y's last row or column lands there
        buf = torch.full((M * N + _TILE["BLOCK_M"] * N + _TILE["BLOCK_N"],), float("nan"),
                         device=dev)
        y = buf[:M * N].view(M, N)
        kernel[(expert.numel(), triton.cdiv(N, _TILE["BLOCK_N"]))](
            x, w, y, expert, row, offsets, M, N, K, **_TILE
        )
        if not torch.isnan(buf[M * N:]).all():
            raise ExerciseError(f"✗ grouped GEMM tile: case {i + 1} of 4: a store past the end of "
                                "y — rows ≥ M (mask the store to the expert's rows) or columns ≥ N "
                                "(mask it with cols < N)")
        ref = grouped_mm_ref(x, w, offsets)  # [M, N] the loop of per-expert matmuls
        bad = ~(torch.isclose(y, ref, rtol=tol, atol=tol))  # NaN never matches
        if not bad.any():
            continue
        case = f"case {i + 1} of 4 (rows per expert {counts}, K = {K}, N = {N})"
        if torch.isnan(y).all():
            raise ExerciseError(
                f"✗ grouped GEMM tile: {case}: nothing was written to y — fill in the gap (the K "
                "loop, then a masked tl.store)"
            )
        r, c = (int(v) for v in bad.nonzero()[0])
        owner = int(torch.searchsorted(offsets.cpu(), torch.tensor(r), right=True))
        where = f"row {r} (expert {owner}), column {c}"
        if torch.isnan(y[r, c]):
            raise ExerciseError(
                f"✗ grouped GEMM tile: {case}: {where} was never written; every row of an expert "
                "and every column up to N must be stored"
            )
        other = [
            e
            for e in range(G)
            if e != owner and torch.isclose(y[r, c], (x[r] @ w[e])[c], rtol=tol, atol=tol)
        ]
        why = (
            f"it holds x[{r}] @ w[{other[0]}]: a tile of expert {other[0]} stored rows past its "
            "expert's end "
            f"(offsets[{other[0]}] = {int(offsets[other[0]])}) — mask the store to the expert's "
            "rows"
            if other
            else f"if the error is a part of the sum, check the last step of the K loop (K = {K} "
                 "is "
            f"not a multiple of BLOCK_K = {_TILE['BLOCK_K']}): mask k >= K to zero"
        )
        raise ExerciseError(
            f"✗ grouped GEMM tile: {case}: {where}: got {float(y[r, c]):.4f}, expected "
            f"{float(ref[r, c]):.4f}\nHint: {why}"
        )
    print(
        "✓ grouped GEMM tile: all 4 cases match the per-expert matmuls (ragged and empty experts, "
        "tiles run "
        "last expert first)"
    )
