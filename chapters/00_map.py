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
# # Chapter 0 — The map
#
# The open LLMs of 2025–26 are sparse in two places. Their feed-forward layers are *mixtures of experts*: each
# token runs through a few experts out of hundreds. And more and more of them are sparse in *attention*: a token
# no longer looks at every earlier token, or no longer keeps every earlier token around. This chapter is the map
# of that landscape — which model uses which mechanism, what each mechanism costs as the context grows, and in
# which chapter of this book you build it.
#
# There are no kernels here and nothing is exported to the package. The code in this chapter computes the tables
# and plots from numbers stated in the cells, so you can change an assumption and see what moves.
#
# :::{admonition} Where the numbers come from
# :class: note
# Numbers marked **[S]** come from *the minisparse seed survey, Feb 2026* — the survey of open sparse-architecture
# models (in Chinese, dated 25 February 2026) this project started from. Where a primary source exists — a paper on
# arXiv, a model card on Hugging Face, or a configuration class in `transformers` — it is named next to the number.
# Where the survey and a primary source disagree, the text says so. Full references are at the end.
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

try:  # inside Jupyter/Colab tables render as HTML; under plain `python chapters/00_map.py` they print as text
    from IPython import get_ipython
    from IPython.display import display

    IN_KERNEL = get_ipython() is not None
except ImportError:
    IN_KERNEL = False


class Table:
    """A list of dicts shown as a table: HTML in a notebook, aligned text anywhere else."""

    def __init__(self, rows, columns, formats=None):
        self.rows, self.columns, self.formats = rows, columns, formats or {}

    def _cells(self, row):
        return [self.formats.get(c, "{}").format(row[c]) if row.get(c) is not None else "—" for c in self.columns]

    def __str__(self):
        cells = [self.columns] + [self._cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in cells]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])

    def _repr_html_(self):
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{x}</td>" for x in self._cells(r)) + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def show(obj):
    display(obj) if IN_KERNEL else print(obj)


# %% [markdown]
# ## 0.1 Two kinds of sparsity
#
# **Sparse in the FFN: mixture of experts (MoE).** A dense transformer sends every token through one large
# feed-forward network. An MoE layer holds $E$ smaller expert FFNs and a *router* that scores them for each token
# and keeps the best $k$ (DeepSeek-V3 keeps 8 of 256 routed experts, plus one shared expert that every token uses):
#
# $$
# y = \sum_{i \in \operatorname{TopK}(r(x),\,k)} w_i(x)\, \mathrm{FFN}_i(x).
# $$
#
# Two numbers describe an MoE model: the **total** parameters (what must sit in memory) and the **active**
# parameters (what one token computes with). FLOPs per token follow the active count; memory follows the total.
# Their ratio, the *activation ratio*, is how sparse the model is.
#
# **Sparse in attention.** Causal softmax attention lets query $t$ read every earlier token $s \le t$:
#
# $$
# o_t = \sum_{s \le t} \frac{\exp(\mathrm{scale}\cdot q_t^\top k_s)}{\sum_{s' \le t} \exp(\mathrm{scale}\cdot q_t^\top k_{s'})}\, v_s,
# \qquad \mathrm{scale} = D^{-1/2}.
# $$
#
# A sequence of $T$ tokens costs $O(T^2)$ time per layer, and decoding keeps a KV cache that grows as $O(T)$. The
# models in this book cut that cost in three ways:
#
# 1. **Select.** Each query attends to a small set $\mathcal S_t$ of earlier tokens, $|\mathcal S_t| \le k$: the
#    top-$k$ tokens scored by a cheap *indexer* (DSA) or the top blocks of tokens (NSA, MoBA). Attention costs
#    $O(T\cdot k)$, plus whatever choosing $\mathcal S_t$ costs.
# 2. **Recur.** Replace the softmax by a form that folds the past into a fixed-size state
#    $S_t \in \mathbb R^{D_k \times D_v}$, e.g. $S_t = e^{g_t} S_{t-1} + k_t v_t^\top$ and $o_t = S_t^\top q_t$ with a
#    log-space gate $g_t \le 0$ (lightning attention; DeltaNet and KDA *edit* the state with the delta rule
#    instead of only adding to it). $O(T)$ time and $O(1)$ memory per layer.
# 3. **Mix.** Keep a few full-attention layers among many linear ones: 3 linear to 1 full (Qwen3-Next, Qwen3.5,
#    Kimi Linear) or 7 to 1 (MiniMax-M1).
#
# One mechanism in the book is not sparse at all: **multi-head latent attention (MLA)** keeps full attention but
# caches one small latent vector per token instead of per-head keys and values. It is here because DeepSeek's
# sparse attention (DSA) runs on top of MLA, and because Kimi's and GLM's models use it.
#
# ### What the book builds
#
# | ch. | mechanism | what it makes sparse or small | `minisparse.` | used by |
# |---|---|---|---|---|
# | 0 | The map | — | — | — |
# | 1 | Attention and its cost | the baseline: $O(T^2)$ time, $O(T)$ cache | `attention` | every model |
# | 2 | Mixture of Experts | the FFN: $k$ of $E$ experts per token | `moe` | all the models below |
# | 3 | Multi-head Latent Attention | the KV cache: one 512 + 64 latent per token and layer | `mla` | DeepSeek V3.2, GLM-5, Kimi K2.5, Kimi Linear |
# | 4 | Linear attention & Lightning Attention | attention becomes a fixed-size state with decay | `lightning` | MiniMax-M1 |
# | 5 | DeltaNet & Gated DeltaNet | the state is edited by the delta rule | `deltanet` | Qwen3-Next, Qwen3.5 |
# | 6 | Kimi Delta Attention (KDA) | the decay becomes channel-wise | `kda` | Kimi Linear |
# | 7 | NSA & MoBA | block selection: compress, select, slide | `nsa` | research (NSA, MoBA) |
# | 8 | DeepSeek Sparse Attention (DSA) | token selection by a lightning indexer | `dsa` | DeepSeek V3.2, GLM-5 |
# | 9 | Capstone | the models as tiny configs | `models` | all |

# %% [markdown]
# ## 0.2 Who uses what
#
# ### Production models
#
# | model | attention | layer mix | MoE total / active | context | sources |
# |---|---|---|---|---|---|
# | DeepSeek V3.2 (Dec 2025) | DSA on MLA: a lightning indexer scores earlier tokens, attention reads the top $k = 2048$ | DSA in every layer | 685B / ~37B | 128K | [S]; [paper](https://arxiv.org/abs/2512.02556); [model card](https://huggingface.co/deepseek-ai/DeepSeek-V3.2) |
# | GLM-5 (Feb 2026) | DSA + MLA on a conventional transformer | DSA in every layer | not in [S] | — | [S]; [paper](https://arxiv.org/abs/2602.15763); [model card](https://huggingface.co/zai-org/GLM-5) |
# | Qwen3-Next-80B-A3B | Gated DeltaNet + gated (softmax) attention | 3 : 1 | 80B / 3B | 262K native | [S]; [model card](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct); [Gated DeltaNet](https://arxiv.org/abs/2412.06464) |
# | Qwen3.5-397B-A17B | the same hybrid | 3 : 1 | 397B / 17B | 1M (API) | [S]; [model card](https://huggingface.co/Qwen/Qwen3.5-397B-A17B) |
# | Kimi Linear (48B-A3B) | KDA + MLA | 3 : 1 | 48B / 3B | tested to 1M | [paper](https://arxiv.org/abs/2510.26692); [model card](https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct) |
# | Kimi K2.5 | [S]: KDA + MLA 3 : 1 — but see the note below | — | 1T+ / 32B | — | [S]; [Kimi K2 report](https://arxiv.org/abs/2507.20534) |
# | MiniMax-M1 | Lightning Attention + softmax attention | 7 : 1 | 456B / 45.9B | 1M | [S]; [paper](https://arxiv.org/abs/2506.13585); [model card](https://huggingface.co/MiniMaxAI/MiniMax-M1-80k) |
# | MiniMax-M2 | back to full attention | — | — | — | [S] |
# | MiniMax-M2.5 | [S]: Lightning Attention reintroduced — but see the note below | — | ~230B / ~10B | 205K | [S]; [model card](https://huggingface.co/MiniMaxAI/MiniMax-M2.5) |
#
# A few facts from the survey that the chapters come back to:
#
# - DSA is the *only* architectural change between DeepSeek V3.1 and V3.2, and the survey credits it with about
#   half the compute at 128K context [S]. That figure is for the whole model, not attention alone — §0.5 shows why
#   the two differ.
# - DeepSeek's MLA and DSA spread beyond DeepSeek: GLM-5 adopts both, Kimi's models use MLA [S].
# - MiniMax-M1 interleaves one softmax block after every seven lightning blocks; generating 100K tokens takes about
#   25–30 % of DeepSeek-R1's compute [S] (25 % of the FLOPs in the M1 paper's abstract).
# - MiniMax's M2 dropped linear attention, the team citing accuracy problems in reasoning and multi-turn tasks [S].
#   Whether linear attention holds up in production is still contested; the survey reads M2.5 as bringing it back.
# - Gated DeltaNet and KDA layers are trained that way from the start — not an approximation applied at inference —
#   and they keep a fixed-size state instead of a growing cache [S].
#
# :::{admonition} Two rows where the survey and the checkpoints disagree
# :class: warning
# **Kimi K2.5.** The survey puts Kimi K2.5 with the KDA + MLA 3 : 1 hybrid. That hybrid is *Kimi Linear*, a 48B-total,
# 3B-active model ([arXiv:2510.26692](https://arxiv.org/abs/2510.26692)). Kimi K2.5 as `transformers` implements it
# (`Kimi_K25Config`) is a vision encoder on DeepSeek-V3's text model — MLA in every layer, no KDA — and the Kimi K2
# report describes the 1T-total, 32B-active MLA model it grows from. This book therefore teaches KDA from Kimi Linear
# and lists Kimi K2.5 under MLA + MoE.
#
# **MiniMax-M2.5.** The survey says M2.5 reintroduced lightning attention. The M2.5 checkpoint is published with
# M2's architecture (`model_type` `minimax_m2`), which `transformers` implements with softmax (GQA) attention in
# every layer. We could not confirm the reintroduction; treat it as the survey's claim. Chapter 4 builds lightning
# attention from MiniMax-01/M1, whose hybrid layout is documented.
#
# The check cell at the end of §0.6 asserts what `transformers` ships for both, so if a later release changes it,
# this chapter fails loudly rather than going stale.
# :::
#
# ### Research methods
#
# | method | from | what it does | sparse when | sources |
# |---|---|---|---|---|
# | NSA (Native Sparse Attention) | DeepSeek + Peking University; ACL 2025 best paper | three branches per query, mixed by learned gates: coarse *compressed* block summaries, fine *selected* top blocks, and a local *sliding window*; kernels shaped for GPU block loads; large speedups at 64K in decoding, forward and backward | trained natively, end to end | [S]; [arXiv:2502.11089](https://arxiv.org/abs/2502.11089) |
# | MoBA (Mixture of Block Attention) | Moonshot AI | MoE-style routing over blocks of keys: a query scores each block by its mean-pooled key and attends to its top blocks (and its own) | trained natively | [S]; [arXiv:2502.13189](https://arxiv.org/abs/2502.13189) |
# | SSA (Sparse Sparse Attention) | KCL + Tencent Youtu | trains sparse and full attention side by side and aligns their outputs; reports the paradox that natively sparse models end up with *less* concentrated attention than full-attention ones | trained natively | [S]; [arXiv:2511.20102](https://arxiv.org/abs/2511.20102) |
# | SpargeAttn / SageAttention | Tsinghua; ICML 2025 / ICLR 2025 | predict and skip near-zero blocks of the attention map (SpargeAttn) and quantise attention to 8 bits (SageAttention); plug into any model; 2.5–5× faster [S] | at inference only, training-free | [S]; [arXiv:2502.18137](https://arxiv.org/abs/2502.18137); [arXiv:2410.02367](https://arxiv.org/abs/2410.02367) |
#
# NSA is DSA's academic ancestor: DSA keeps NSA's idea of *learning* where to look, but selects single tokens with
# one light scorer instead of blocks through three branches. The last row is different in kind — it makes an
# existing model faster without retraining it, while everything else in this book is an architecture the model is
# trained with. This book builds NSA and MoBA (chapter 7) and DSA (chapter 8).

# %% [markdown]
# ## 0.3 The MoE table: how sparse are the experts?
#
# The activation ratio is active / total parameters. The survey's MoE tables give both counts; we compute the
# ratio rather than copy it. Where the survey writes "1T+" we use 1000B, so that ratio is an upper bound.

# %%
# total / active parameters in billions. [S] = the minisparse seed survey, Feb 2026; other sources as noted.
MOE = [
    dict(model="DeepSeek V3 / V3.1 / V3.2", total=685, active=37, source="[S]; V3 card: 671B main + 14B MTP module"),
    dict(model="Mistral Large 3", total=675, active=41, source="[S]"),
    dict(model="Qwen3-235B-A22B", total=235, active=22, source="[S]; Qwen3 report (arXiv:2505.09388)"),
    dict(model="Kimi K2 / K2.5", total=1000, active=32, source="[S] '1T+'; Kimi K2 report (arXiv:2507.20534)"),
    dict(model="DBRX", total=132, active=36, source="[S]"),
    dict(model="Mixtral 8x7B", total=47, active=13, source="[S]; Mixtral paper (arXiv:2401.04088)"),
    dict(model="Mixtral 8x22B", total=141, active=39, source="[S]"),
    dict(model="Qwen3-30B-A3B", total=30, active=3, source="[S]"),
    dict(model="Qwen3-Coder-Next", total=80, active=3, source="[S]"),
    dict(model="GLM-4.7-Flash", total=30, active=3, source="[S]"),
    dict(model="NVIDIA Nemotron (30B)", total=30, active=3.5, source="[S]"),
    dict(model="Qwen3-Next-80B-A3B", total=80, active=3, source="[S]"),
    dict(model="Qwen3.5-397B-A17B", total=397, active=17, source="[S]"),
    dict(model="Kimi Linear 48B-A3B", total=48, active=3, source="arXiv:2510.26692"),
    dict(model="MiniMax-M1", total=456, active=45.9, source="[S]; arXiv:2506.13585"),
    dict(model="MiniMax-M2.5", total=230, active=10, source="[S] (~230B / ~10B)"),
]
for m in MOE:
    m["ratio"] = 100 * m["active"] / m["total"]  # percent of the parameters one token computes with

MOE.sort(key=lambda m: m["ratio"], reverse=True)
show(Table(MOE, ["model", "total", "active", "ratio", "source"],
           {"total": "{:g}B", "active": "{:g}B", "ratio": "{:.2f} %"}))

# %%
fig, ax = plt.subplots(figsize=(7.5, 5))
names = [m["model"] for m in MOE]
ratios = [m["ratio"] for m in MOE]
colors = ["tab:orange" if m["model"].startswith(("Qwen3.5", "MiniMax-M2.5", "Kimi K2", "Qwen3-235B")) else "tab:blue"
          for m in MOE]
ax.barh(names, ratios, color=colors)
ax.invert_yaxis()
for y, r in enumerate(ratios):
    ax.text(r + 0.3, y, f"{r:.1f} %", va="center", fontsize=8)
ax.set_xlabel("activation ratio = active / total parameters (%)")
ax.set_title("How much of an MoE model one token uses\n(orange: the survey's 'activation race' examples)")
ax.set_xlim(0, max(ratios) * 1.15)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Source: total and active counts from the minisparse seed survey, Feb 2026 (Kimi Linear from its paper); ratios
# computed here. "Kimi K2 / K2.5" uses 1000B for "1T+", so its true ratio is a little lower.*
#
# The survey calls this an *activation race* [S]: Qwen3-235B-A22B computes with 9.36 % of its weights, Qwen3.5 and
# MiniMax-M2.5 with about 4.3 %, Kimi K2.5 with less still. Sparser routing buys FLOPs per stored parameter, but
# asks more of the router — every expert must still get enough tokens to train, and chapter 2 shows how DeepSeek
# balances them without an auxiliary loss. Note what the ratio leaves out: DeepSeek's 685B counts a 14B
# multi-token-prediction module that the V3 paper's 671B does not, which moves the ratio from 5.5 % to 5.4 %.
#
# A check that the survey's own percentages follow from its own counts:

# %%
ratio = {m["model"]: m["ratio"] for m in MOE}
assert f"{ratio['Qwen3-235B-A22B']:.2f}" == "9.36", ratio["Qwen3-235B-A22B"]  # survey: 9.36 %
assert f"{ratio['Qwen3.5-397B-A17B']:.1f}" == "4.3", ratio["Qwen3.5-397B-A17B"]  # survey: ~4.3 %
assert f"{ratio['MiniMax-M2.5']:.1f}" == "4.3", ratio["MiniMax-M2.5"]  # survey: ~4.3 %
# survey: Kimi K2.5 is sparser still — true even with the 1000B upper bound for "1T+"
assert ratio["Kimi K2 / K2.5"] < min(ratio["Qwen3.5-397B-A17B"], ratio["MiniMax-M2.5"])
print("activation ratios agree with the survey:",
      ", ".join(f"{k} {ratio[k]:.2f} %" for k in ["Qwen3-235B-A22B", "Qwen3.5-397B-A17B", "MiniMax-M2.5", "Kimi K2 / K2.5"]))

# %% [markdown]
# ## 0.4 Four routes
#
# A year ago the open question was "MoE or dense?"; MoE won, and the models now differ mainly in their attention
# [S]. The survey sorts them into four routes:
#
# | route | how | representative models [S] | what it buys | what it costs | chapters |
# |---|---|---|---|---|---|
# | hybrid linear / full | 3 linear layers (Gated DeltaNet, KDA) per full-attention layer | Qwen3.5, Kimi (Linear) | ¾ of the layers keep a fixed-size state | the full layers stay $O(T^2)$: at long context the stack costs ¼ of full attention, never less | 4, 5, 6 |
# | (mostly) linear | lightning attention; M1 keeps 1 softmax layer in 8 | MiniMax-M1 (and M2.5 per the survey) | ⅞ of the layers linear | accuracy worries in reasoning and multi-turn tasks: M2 went back to full attention | 4 |
# | sparse selection | full-size cache, each query reads only its top-$k$ tokens | DeepSeek V3.2, GLM-5 | $O(T\cdot k)$ attention | the cache still grows with $T$ (MLA keeps it small); the indexer is still $O(T^2)$, with a small constant | 3, 7, 8 |
# | full attention | softmax in every layer (GQA or MLA) | MiniMax-M2 | the best-understood quality | $O(T^2)$ time, $O(T)$ cache | 1, 3 |
#
# No flagship in the survey is *purely* linear: even the "all-linear" route keeps some softmax layers. The next two
# sections put numbers on the "buys" and "costs" columns.

# %% [markdown]
# ## 0.5 What attention costs as the context grows
#
# We count the attention cost of one layer for a sequence of $T$ tokens (prefill), per head, in a unit that makes
# the families comparable: **one query–key pair of full attention**, which costs $4D$ FLOPs ($2D$ for
# $q_t^\top k_s$ and $2D$ for adding $p_{ts} v_s$). With head dimension $D = 128$:
#
# | family | cost in pairs | assumption |
# |---|---|---|
# | full causal attention | $T(T+1)/2$ | every query reads every earlier token |
# | sparse selection (DSA's attention) | $\sum_{t=1}^{T} \min(t, k)$, $k = 2048$ | query $t$ reads at most $k$ tokens; $k$ = DSA's top-k (`index_topk` in `DeepseekV32Config`) |
# | DSA's lightning indexer | $c_{\mathrm{idx}} \cdot T(T+1)/2$, $c_{\mathrm{idx}} = 0.059$ | the indexer scores *every* pair: 64 heads × 128 dims = 16 384 FLOPs a pair, against 278 528 for MLA's attention in its absorbed form (128 heads × (576 + 512) × 2); FP8 makes the indexer cheaper still in time |
# | linear attention (recurrent) | $D \cdot T$ | per token the state update $S \mathrel{+}= k v^\top$ and readout $S^\top q$ cost $4D^2$ FLOPs $= D$ pairs; decay and the delta rule add a small constant factor we ignore |
# | $r\!:\!1$ hybrid | $\frac{1}{r+1}\,\mathrm{full} + \frac{r}{r+1}\,\mathrm{linear}$ | averaged over the layer stack, so still per layer |
#
# Projections, the FFN and memory traffic are left out: this is the part of the cost that depends on $T$.

# %%
D = 128  # head dimension
K_TOPK = 2048  # DSA's top-k (DeepSeek V3.2's index_topk)
# indexer FLOPs per query-key pair / main attention FLOPs per pair (DeepSeek V3.2 shapes, MLA absorbed form)
C_IDX = (64 * 128 * 2) / (128 * (512 + 64 + 512) * 2)


def full_cost(T):
    """Query-key pairs of causal full attention over T tokens: T(T+1)/2."""
    T = np.asarray(T, dtype=float)
    return T * (T + 1) / 2


def topk_cost(T, k=K_TOPK):
    """Pairs when query t reads min(t, k) tokens: sum over t of min(t, k)."""
    T = np.asarray(T, dtype=float)
    return np.where(T <= k, T * (T + 1) / 2, k * (k + 1) / 2 + (T - k) * k)


def dsa_cost(T, k=K_TOPK, c_idx=C_IDX):
    """DSA = the lightning indexer over all pairs (cheap, but quadratic) + attention over the top-k."""
    return c_idx * full_cost(T) + topk_cost(T, k)


def linear_cost(T, d=D):
    """Recurrent linear attention: about 4 d^2 FLOPs a token, i.e. d pairs of full attention."""
    return d * np.asarray(T, dtype=float)


def hybrid_cost(T, r, d=D):
    """An r:1 stack (r linear layers per full layer), cost averaged per layer."""
    return (full_cost(T) + r * linear_cost(T, d)) / (r + 1)


print(f"C_IDX = {C_IDX:.4f}")
for T in [4096, 131072, 1 << 20]:
    f = full_cost(T)
    print(f"T = {T:>8,}: relative to full attention — top-k {topk_cost(T) / f:.4f}, DSA with indexer "
          f"{dsa_cost(T) / f:.4f}, 3:1 {hybrid_cost(T, 3) / f:.4f}, 7:1 {hybrid_cost(T, 7) / f:.4f}, "
          f"linear {linear_cost(T) / f:.6f}")

# %%
T = np.unique(np.logspace(7, 20, 200, base=2).astype(np.int64))  # 128 .. 1M tokens
fig, ax = plt.subplots(figsize=(7.5, 5))
ax.loglog(T, full_cost(T), label="full attention  $O(T^2)$", color="black", lw=2)
ax.loglog(T, hybrid_cost(T, 3), label="3:1 hybrid (Qwen3-Next, Qwen3.5, Kimi Linear)", color="tab:green")
ax.loglog(T, hybrid_cost(T, 7), label="7:1 hybrid (MiniMax-M1)", color="tab:olive")
ax.loglog(T, dsa_cost(T), label="DSA: indexer + top-k attention", color="tab:red", ls="--")
ax.loglog(T, topk_cost(T), label=f"top-k attention alone, k = {K_TOPK}  $O(Tk)$", color="tab:red")
ax.loglog(T, linear_cost(T), label="linear attention  $O(T)$", color="tab:blue")
for t, name in [(131072, "128K"), (1 << 20, "1M")]:
    ax.axvline(t, color="grey", ls=":", lw=1)
    ax.text(t, 0.03, name, ha="right", va="bottom", fontsize=8, color="grey", rotation=90,
            transform=ax.get_xaxis_transform())
ax.set_xlabel("context length T (tokens)")
ax.set_ylabel("attention cost per layer and head\n(query–key pairs of full attention; 1 pair = 4D FLOPs)")
ax.set_title(f"Attention cost vs context (prefill, D = {D})")
ax.legend(fontsize=8, loc="upper left")
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Assumptions (stated in the cells above): prefill of $T$ tokens; per layer and per head; $D = 128$; $k = 2048$;
# the indexer constant $c_{\mathrm{idx}} = 0.059$ from DeepSeek V3.2's shapes in MLA's absorbed form (against MLA's
# non-absorbed form, 192 + 128 dims a head, it would be 0.2); linear attention counted in its recurrent form at
# $4D^2$ FLOPs a token. Constant factors such as softmax, decay and the chunked forms of chapters 4–6 shift lines up
# or down a little, not their slopes.*
#
# How to read it:
#
# - **Linear attention** pulls ahead of full attention past $T \approx 2D = 256$ tokens and the gap widens
#   linearly: at 1M tokens one linear layer does about 1/4000 of the work.
# - **Hybrids are still quadratic.** Their curves bend back up parallel to full attention: at long context a 3:1
#   stack costs ¼ and a 7:1 stack ⅛ of full attention, and no longer context improves on that. What they buy is a
#   constant factor in time — and, as §0.6 shows, most of the cache.
# - **Top-k attention** matches full attention until $T = k$ and then grows linearly: at 128K it is 3 % of full
#   attention. DSA's **indexer** still touches every pair, so its share grows with $T$: at 128K it already costs
#   more than the attention it serves (exercise 3 finds where they are equal). That is why it has few heads, small
#   dimensions and runs in FP8. The survey's "about half the compute at 128K" is for the whole model, which also pays for projections
#   and experts; attention alone falls to about a tenth here.
#
# The check below asserts these readings from the cost functions, so the prose cannot drift from the code.

# %%
# Where linear attention overtakes full attention: T(T+1)/2 = D*T  =>  T = 2D - 1.
T_grid = np.arange(1, 4 * D)
T_cross = int(T_grid[np.argmax(full_cost(T_grid) > linear_cost(T_grid))])
assert T_cross == 2 * D, T_cross
# Top-k attention equals full attention up to T = k, and is cheaper after.
assert topk_cost(K_TOPK) == full_cost(K_TOPK) and topk_cost(K_TOPK + 1) < full_cost(K_TOPK + 1)
# Hybrids tend to 1/(r+1) of full attention: within 0.1 % at 1M tokens.
T_long = 1 << 20
for r in (3, 7):
    assert abs(hybrid_cost(T_long, r) / full_cost(T_long) - 1 / (r + 1)) < 1e-3, r
# At 128K, DSA's attention is ~3 % of full, its indexer costs more than that, and the sum is about a tenth.
T128 = 131072
assert 0.025 < topk_cost(T128) / full_cost(T128) < 0.035
assert C_IDX * full_cost(T128) > topk_cost(T128)
assert 0.08 < dsa_cost(T128) / full_cost(T128) < 0.10
print(f"linear overtakes full at T = {T_cross}; at 1M tokens 3:1 costs "
      f"{hybrid_cost(T_long, 3) / full_cost(T_long):.4f} and 7:1 {hybrid_cost(T_long, 7) / full_cost(T_long):.4f} "
      f"of full; DSA at 128K costs {dsa_cost(T128) / full_cost(T128):.3f} of full")

# %% [markdown]
# ## 0.6 What the cache costs
#
# Decoding keeps, for every layer, what later tokens will need: keys and values for softmax attention, one latent
# per token for MLA, a fixed-size state for linear attention. We compare the families at one model shape —
# **DeepSeek-V3's attention: 61 layers, 128 heads of dimension 128, cache in bf16 (2 bytes)** — changing only the
# attention:
#
# | family | elements cached per token and layer | at this shape | source of the formula |
# |---|---|---|---|
# | MHA | $2 H D$ (a key and a value per head) | 32 768 | DeepSeek-V2 paper, table 1 |
# | GQA, 8 KV heads | $2 G D$ | 2 048 | [GQA](https://arxiv.org/abs/2305.13245) |
# | MQA | $2 D$ | 256 | [MQA](https://arxiv.org/abs/1911.02150) |
# | MLA | $d_c + d_r = 512 + 64$ (latent + shared RoPE key) | 576 | [DeepSeek-V2](https://arxiv.org/abs/2405.04434), [V3](https://arxiv.org/abs/2412.19437) |
# | 3:1 hybrid | MLA in every 4th layer (15 of 61), a state in the others | 576 in 15 layers | Qwen3-Next's layout, Kimi Linear's MLA |
# | pure linear | nothing per token: a $D_k \times D_v$ state per head | 0 | |
#
# A linear layer's state here is 128 heads × 128 × 128 in fp32 (4 bytes, as fla returns it), 8 MiB a layer whatever
# the context. Short-convolution caches (3 tokens a channel) are too small to show.

# %%
BYTES = 2  # bf16 cache
LAYERS, HEADS, HEAD_DIM = 61, 128, 128  # DeepSeek-V3's attention shape
KV_LORA_RANK, ROPE_DIM = 512, 64  # MLA latent and decoupled RoPE key
STATE_BYTES = HEADS * HEAD_DIM * HEAD_DIM * 4  # one linear layer's fp32 state: 8 MiB
N_FULL_HYBRID = sum((i + 1) % 4 == 0 for i in range(LAYERS))  # 3:1 => every 4th layer is full: 15 of 61

# elements per token per full-attention layer
PER_LAYER = {
    "MHA": 2 * HEADS * HEAD_DIM,
    "GQA (8 KV heads)": 2 * 8 * HEAD_DIM,
    "MQA": 2 * HEAD_DIM,
    "MLA": KV_LORA_RANK + ROPE_DIM,
}


def cache_bytes(family, T):
    """Whole-model cache for one sequence of T tokens: (per-token bytes) * T + constant state bytes."""
    T = np.asarray(T, dtype=float)
    if family in PER_LAYER:
        return PER_LAYER[family] * LAYERS * BYTES * T
    if family == "3:1 hybrid (MLA + linear)":
        return PER_LAYER["MLA"] * N_FULL_HYBRID * BYTES * T + (LAYERS - N_FULL_HYBRID) * STATE_BYTES
    if family == "pure linear":
        return LAYERS * STATE_BYTES + 0 * T
    raise ValueError(f"unknown family {family!r}")


FAMILIES = list(PER_LAYER) + ["3:1 hybrid (MLA + linear)", "pure linear"]
rows = []
for fam in FAMILIES:
    per_token = cache_bytes(fam, 1) - cache_bytes(fam, 0)
    rows.append(dict(family=fam, per_token=per_token / 1024, constant=cache_bytes(fam, 0) / 2**20,
                     at_128k=cache_bytes(fam, 131072) / 2**30, at_1m=cache_bytes(fam, 1 << 20) / 2**30))
show(Table(rows, ["family", "per_token", "constant", "at_128k", "at_1m"],
           {"per_token": "{:,.1f} KiB/token", "constant": "{:,.0f} MiB", "at_128k": "{:,.2f} GiB",
            "at_1m": "{:,.1f} GiB"}))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
per_token = [(cache_bytes(f, 1) - cache_bytes(f, 0)) / 1024 for f in FAMILIES]
bars = ax1.bar(range(len(FAMILIES)), [max(p, 1e-9) for p in per_token],
               color=["black", "tab:gray", "tab:brown", "tab:purple", "tab:green", "tab:blue"])
ax1.set_yscale("log")
ax1.set_ylim(1, 1e4)
ax1.set_xticks(range(len(FAMILIES)), [f.replace(" (", "\n(") for f in FAMILIES], fontsize=8, rotation=30, ha="right")
for i, p in enumerate(per_token):
    ax1.text(i, max(p, 1) * 1.15, f"{p:,.1f}" if p else "0\n(+ state)", ha="center", fontsize=8)
ax1.set_ylabel("KiB per token of context (whole model)")
ax1.set_title("(a) cache growth per token")

Tc = np.logspace(10, 20, 100, base=2)  # 1K .. 1M tokens
for fam, color in zip(FAMILIES, ["black", "tab:gray", "tab:brown", "tab:purple", "tab:green", "tab:blue"]):
    ax2.loglog(Tc, cache_bytes(fam, Tc) / 2**30, label=fam, color=color)
H200_GIB = 141e9 / 2**30  # one H200's memory, 141 GB
ax2.axhline(H200_GIB, color="tab:red", ls=":", lw=1)
ax2.text(Tc[0], H200_GIB * 1.15, "one H200: 141 GB", fontsize=8, color="tab:red")
ax2.set_xlabel("context length T (tokens)")
ax2.set_ylabel("cache for one sequence (GiB)")
ax2.set_title("(b) cache for one sequence, with constant states")
ax2.legend(fontsize=7, loc="lower right")
ax2.grid(True, which="major", alpha=0.3)
fig.suptitle("KV cache at DeepSeek-V3's attention shape (61 layers, 128 heads × 128, bf16 cache, fp32 states)",
             fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Assumptions: 61 layers, 128 heads, head dimension 128; caches in bf16; linear states 128 × 128 × 128 per layer
# in fp32; the 3:1 hybrid puts MLA in layers 4, 8, …, 60 (15 of 61) and linear attention elsewhere. Only the
# attention differs between the bars; real models also differ in depth and width.*
#
# What the figure says:
#
# - **MHA** at this shape needs 3.8 MiB per token: one 128K-token conversation would fill about four H200s with
#   cache alone. This is the cache the rest of the book is working to avoid.
# - **GQA and MQA** share keys and values between heads; **MLA** caches one 576-element latent per token and layer,
#   about what GQA with 2.25 groups would — 57× less than MHA at this shape, yet every head still gets its own
#   keys and values after up-projection (chapter 3).
# - The **3:1 hybrid** grows 4× more slowly than MLA because only 15 of its 61 layers keep a per-token cache, but it
#   starts from a constant of 46 × 8 MiB of states; it is the smaller cache only beyond about 7 000 tokens.
#   **Pure linear** is flat: 488 MiB at any length — which is exactly why its quality at long range is the open
#   question.
#
# The check below recomputes the shape from `transformers`' configuration classes — whose defaults describe the
# real checkpoints — and asserts the layouts and the two warnings of §0.2. It is skipped, with a message, where
# `transformers` is not installed (it is a test dependency of `minisparse`, not a runtime one).

# %%
assert PER_LAYER["MLA"] == 576 and LAYERS * PER_LAYER["MLA"] * BYTES == 70_272  # bytes per token, whole model
assert PER_LAYER["MLA"] / (2 * HEAD_DIM) == 2.25  # MLA caches what GQA with 2.25 groups would (DeepSeek-V2)
breakeven = STATE_BYTES / (PER_LAYER["MLA"] * BYTES)  # per linear layer: state bytes / MLA bytes per token
assert 7_000 < breakeven < 7_500 and cache_bytes("3:1 hybrid (MLA + linear)", 8_000) < cache_bytes("MLA", 8_000)

try:
    import transformers
    from transformers import (DeepseekV3Config, DeepseekV32Config, KimiLinearConfig, Kimi_K25Config,
                              MiniMaxM2Config, Qwen3NextConfig)
except ImportError:
    transformers = None
    print("transformers is not installed: skipping the checks against its model configurations")

if transformers is not None:
    ds = DeepseekV3Config()
    assert (ds.num_hidden_layers, ds.num_attention_heads, ds.v_head_dim) == (LAYERS, HEADS, HEAD_DIM)
    assert ds.kv_lora_rank + ds.qk_rope_head_dim == PER_LAYER["MLA"]
    ds32 = DeepseekV32Config()
    assert ds32.index_topk == K_TOPK and (ds32.index_n_heads, ds32.index_head_dim) == (64, 128)

    def linear_to_full(layer_types):
        return layer_types.count("linear_attention") / layer_types.count("full_attention")

    qn = Qwen3NextConfig()
    assert linear_to_full(qn.layer_types) == 3  # 36 Gated DeltaNet : 12 gated attention
    kl = KimiLinearConfig()
    assert linear_to_full(kl.layer_types) >= 3  # KDA : MLA = 21 : 6 in the default 27 layers (MLA in 5, 9, ..., 25)
    # The two warnings of §0.2: Kimi K2.5 is DeepSeek-V3's text model (MLA, no KDA); MiniMax-M2 has no linear layers.
    assert isinstance(Kimi_K25Config().text_config, DeepseekV3Config)
    assert "linear_attention" not in (getattr(MiniMaxM2Config(), "layer_types", None) or [])
    print(f"transformers {transformers.__version__}: DeepSeek-V3 shape, DSA top-k {ds32.index_topk}, "
          f"Qwen3-Next {qn.layer_types.count('linear_attention')}:{qn.layer_types.count('full_attention')}, "
          f"Kimi Linear {kl.layer_types.count('linear_attention')}:{kl.layer_types.count('full_attention')}; "
          "Kimi K2.5 text = DeepseekV3Config; MiniMax-M2 all softmax")
print(f"MLA: {LAYERS * PER_LAYER['MLA'] * BYTES:,} bytes a token; hybrid smaller than MLA beyond {breakeven:,.0f} tokens")

# %% [markdown]
# ## 0.7 How to read this book
#
# ### The arc of a chapter
#
# Every mechanism chapter walks the same nine steps, so you always know where you are:
#
# 1. **Why** — the problem in one picture, and the models that use the mechanism.
# 2. **Naive** — the paper's equations beside PyTorch that implements them line by line; this is the *spec*.
# 3. **See it** — pictures of what the mechanism attends to or routes, with an explorer whose knobs (top-k, block
#    size, window, decay) change the picture.
# 4. **Cost model** — FLOPs, bytes and cache as functions of $T$, against dense attention (the curves above, made
#    exact for each mechanism).
# 5. **Fast** — the algorithmic rewrite (chunkwise form, WY representation, absorption, block selection) in PyTorch,
#    then the Triton kernel, tile by tile, checked against the naive spec.
# 6. **Layer** — the `nn.Module` as the production model builds it, loading `transformers`' weights where
#    `transformers` has the layer.
# 7. **Measure** — live on a GPU; on a CPU, the committed H200 results, with date and versions.
# 8. **Exercises** — at least three, each with a stub, a checker and a solution.
# 9. **Summary** and references.
#
# ### CPU, Colab or a big GPU
#
# | where | Triton kernels | dtype | sizes |
# |---|---|---|---|
# | laptop CPU | run in Triton's *interpreter* on CPU tensors (`import minisparse` turns it on) — correct but slow | fp32 (the interpreter's bf16 matmul is wrong) | small "reading sizes" |
# | Colab T4 (free tier) | compiled | fp16 (a T4 has no bf16) | realistic, 64 KB shared memory a block |
# | A100 / H100 / H200 | compiled | bf16 | realistic; the benchmarks |
#
# `minisparse.runtime` makes these choices, so one notebook serves all three. Chapters that need a size ask for
# one with `runtime.reading_size(cpu=..., gpu=...)`.
#
# ### Conventions
#
# - Tensors are laid out `[B, T, H, D]` — batch, time, heads, head dimension — as in fla; grouped-query attention
#   uses fewer key/value heads than query heads.
# - `scale` defaults to $D^{-1/2}$.
# - Gates live in **log space**: $g \le 0$, and the decay applied to a state is $e^{g}$. The decay over a span is
#   then $e^{\sum g}$ — sums, not long products that underflow.
# - Ops with a recurrent state return `(o, final_state)`; `final_state` is `None` unless you pass
#   `output_final_state=True`.
# - Results are compared by **relative RMS error** $\lVert o - o_{\mathrm{ref}}\rVert / \lVert o_{\mathrm{ref}}\rVert$:
#   at most $10^{-4}$ in fp32, $5\cdot10^{-3}$ forward and $8\cdot10^{-3}$ for gradients in bf16/fp16.
#
# The cell below shows the conventions on real tensors, and why two of them are what they are.

# %%
from minisparse import runtime
from minisparse.testing import TOLERANCES, make_bthd, make_log_gates, rel_rms

B, T_demo, H, Dh = 2, runtime.reading_size(cpu=64, gpu=1024), 4, 32
q = make_bthd(B, T_demo, H, Dh, seed=0)  # [B, T, H, D]
g = make_log_gates(B, T_demo, H, seed=1)  # [B, T, H], log-space gates in [-5, 0]
scale = Dh**-0.5
print(f"device {runtime.describe()}, dtype {runtime.default_dtype()}, T = {T_demo}")
print(f"q {tuple(q.shape)} = [B, T, H, D]; g {tuple(g.shape)}, max g = {g.max():.3f} <= 0; scale = {scale:.4f}")

# Why log space: the decay over the whole sequence underflows float32 as a product, not as a sum of logs.
decay = g[0, :, 0].exp()  # e^g in (0, 1]
as_product = torch.prod(decay)  # float32: T factors of e^-2.5 on average
as_log_sum = g[0, :, 0].sum()  # the same quantity, in log space
print(f"decay over {T_demo} steps: product {as_product.item():.1e}, log-space sum {as_log_sum.item():.1f}")
assert ((decay > 0) & (decay <= 1)).all()
assert as_product == 0 and torch.isfinite(as_log_sum)  # the product underflowed; the sum did not

# Why tolerances depend on dtype: rounding to bf16 alone costs ~1e-3 relative RMS.
x = make_bthd(B, T_demo, H, Dh, seed=2)
err_bf16, err_fp16 = rel_rms(x.bfloat16().float(), x), rel_rms(x.half().float(), x)
print(f"relative RMS of rounding: bf16 {err_bf16:.1e}, fp16 {err_fp16:.1e}; "
      f"tolerances fp32 {TOLERANCES[torch.float32][0]:.0e}, bf16 {TOLERANCES[torch.bfloat16][0]:.0e}")
assert TOLERANCES[torch.float32][0] < err_bf16 < TOLERANCES[torch.bfloat16][0]

# %% [markdown]
# Sixty-four steps of average decay $e^{-2.5}$ multiply to about $e^{-160}$, far below float32's smallest number
# (about $e^{-103}$), so the product is exactly zero and every ratio of two such products is lost. The log-space
# sum is an ordinary number, and $e^{G_t - G_s}$ for two cumulative sums is computed without trouble — which is why
# every gated op in this book takes `g`, not `exp(g)`.

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to fill in, a hidden solution (in the book, click to show it; skip it when you run the
# notebook, or it replaces your attempt), and a checker that compares your function with a reference on several
# cases. The checker prints one line on success and raises with a hint otherwise.
#
# **Exercise 1 — where do 671 billion parameters live?** An MoE model's routed experts are most of its weight.
# Write `moe_ffn_params(hidden, inter, n_routed, top_k, n_shared, n_moe_layers)` returning `(total, active)`: the
# parameters of all experts in all MoE layers, and those one token uses. Each expert is a SwiGLU FFN with three
# `hidden × inter` matrices (gate, up, down); a token uses its `top_k` routed experts and all shared ones.
# Then compare with DeepSeek-V3 (hidden 7168, expert width 2048, 256 routed + 1 shared, top-8, 58 MoE layers).

# %%
def moe_ffn_params(hidden, inter, n_routed, top_k, n_shared, n_moe_layers):
    """(total, active) parameters of the expert FFNs of an MoE model."""
    raise NotImplementedError  # your code here


# %% tags=["hide-input"]
# Solution (hidden in the book): three hidden×inter matrices an expert.
def moe_ffn_params(hidden, inter, n_routed, top_k, n_shared, n_moe_layers):
    """(total, active) parameters of the expert FFNs of an MoE model."""
    per_expert = 3 * hidden * inter
    return (n_moe_layers * (n_routed + n_shared) * per_expert, n_moe_layers * (top_k + n_shared) * per_expert)


# %% tags=["hide-input"]
from minisparse.testing import ExerciseError, check


def _moe_reference(hidden, inter, n_routed, top_k, n_shared, n_moe_layers):
    gate = up = down = hidden * inter
    layer_total = (gate + up + down) * (n_routed + n_shared)
    layer_active = (gate + up + down) * (top_k + n_shared)
    return (layer_total * n_moe_layers, layer_active * n_moe_layers)


check("moe_ffn_params", moe_ffn_params, _moe_reference,
      [(7168, 2048, 256, 8, 1, 58), (4096, 14336, 8, 2, 0, 32), (64, 32, 16, 4, 2, 3)],
      hint="an expert has three hidden×inter matrices; shared experts count in both totals")
total, active = moe_ffn_params(7168, 2048, 256, 8, 1, 58)
print(f"DeepSeek-V3 experts: {total / 1e9:.0f}B of 671B total, {active / 1e9:.1f}B of 37B active")

# %% [markdown]
# The experts hold 656B of DeepSeek-V3's 671B parameters, but only 23B of its 37B active ones: attention, the three
# dense layers and the embeddings make up the rest of what a token computes with.
#
# A checker that cannot fail would prove nothing, so here is this one rejecting a classic mistake — forgetting
# the shared expert:

# %% tags=["hide-input"]
def _forgot_shared(hidden, inter, n_routed, top_k, n_shared, n_moe_layers):
    return moe_ffn_params(hidden, inter, n_routed, top_k, 0, n_moe_layers)


try:
    check("moe_ffn_params", _forgot_shared, _moe_reference, [(7168, 2048, 256, 8, 1, 58)])
except ExerciseError as e:
    print("rejected as it should be:", str(e).splitlines()[0])
else:
    raise AssertionError("the checker accepted a wrong answer")

# %% [markdown]
# **Exercise 2 — when does a hybrid's cache win?** A linear layer keeps a constant state of `state_bytes`; a
# full-attention layer caches `kv_bytes_per_token` for every token. Write `breakeven_tokens(state_bytes,
# kv_bytes_per_token)`: the smallest context length $T$ at which one full-attention layer's cache is *larger* than
# one linear layer's state. (Why does the answer not depend on how many layers the model has, or on the 3:1
# ratio?)

# %%
def breakeven_tokens(state_bytes, kv_bytes_per_token):
    """Smallest integer T with T * kv_bytes_per_token > state_bytes."""
    raise NotImplementedError  # your code here


# %% tags=["hide-input"]
# Solution (hidden in the book): strictly larger, so floor(...) + 1.
def breakeven_tokens(state_bytes, kv_bytes_per_token):
    """Smallest integer T with T * kv_bytes_per_token > state_bytes."""
    return state_bytes // kv_bytes_per_token + 1


# %% tags=["hide-input"]
def _breakeven_reference(state_bytes, kv_bytes_per_token):
    T = 1
    while T * kv_bytes_per_token <= state_bytes:
        T *= 2
    lo, hi = T // 2, T  # lo*kv <= state < hi*kv (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mid * kv_bytes_per_token <= state_bytes else (lo, mid)
    return hi


check("breakeven_tokens", breakeven_tokens, _breakeven_reference,
      [(STATE_BYTES, PER_LAYER["MLA"] * BYTES), (STATE_BYTES, PER_LAYER["MHA"] * BYTES), (1000, 10), (999, 10),
       (32 * 128 * 128 * 4, 2 * 2 * 256 * BYTES)],
      hint="'larger', not 'at least as large': when T * kv equals the state exactly, you need one more token")
print(f"MLA vs an 8 MiB state: {breakeven_tokens(STATE_BYTES, PER_LAYER['MLA'] * BYTES):,} tokens; "
      f"MHA vs the same state: {breakeven_tokens(STATE_BYTES, PER_LAYER['MHA'] * BYTES):,} tokens")

# %% [markdown]
# Against MLA's tiny cache a linear layer needs over 7 000 tokens to pay off in memory; against MHA, 129 tokens.
# That is one reason Kimi Linear pairs KDA with MLA rather than MHA, and why hybrids matter most at long context.
#
# **Exercise 3 — the cost of DSA.** Using the cost model of §0.5, write `dsa_fraction(T, k, c_idx)`: DSA's cost
# (indexer over all causal pairs plus attention over at most `k` tokens a query) as a fraction of full causal
# attention's $T(T+1)/2$ pairs. Then find where the indexer's share is half of DSA's cost at $k = 2048$,
# $c_{\mathrm{idx}} = 0.059$.

# %%
def dsa_fraction(T, k, c_idx):
    """(c_idx * full pairs + sum_t min(t, k)) / full pairs, for an integer T >= 1."""
    raise NotImplementedError  # your code here


# %% tags=["hide-input"]
# Solution (hidden in the book): closed form of sum_t min(t, k).
def dsa_fraction(T, k, c_idx):
    """(c_idx * full pairs + sum_t min(t, k)) / full pairs, for an integer T >= 1."""
    full = T * (T + 1) / 2
    selected = full if T <= k else k * (k + 1) / 2 + (T - k) * k
    return (c_idx * full + selected) / full


# %% tags=["hide-input"]
def _dsa_reference(T, k, c_idx):
    t = torch.arange(1, T + 1, dtype=torch.float64)
    return float((c_idx * t.sum() + torch.clamp(t, max=k).sum()) / t.sum())


check("dsa_fraction", dsa_fraction, _dsa_reference,
      [(1, 2048, C_IDX), (2048, 2048, C_IDX), (2049, 2048, C_IDX), (131072, 2048, C_IDX), (5000, 64, 0.2)],
      tol=1e-9, hint="for t <= k a query reads all t earlier tokens; after that exactly k")
T_half = next(T for T in range(K_TOPK, 1 << 20, 256)
              if C_IDX * full_cost(T) >= topk_cost(T))  # indexer >= attention, i.e. >= half of DSA
print(f"at 128K DSA costs {dsa_fraction(131072, K_TOPK, C_IDX):.3f} of full attention; "
      f"the indexer is half of DSA's cost from about T = {T_half:,}")

# %% [markdown]
# ## Summary
#
# - Open LLMs are sparse in two places: **experts** (in the 2025–26 flagships a token computes with 3–10 % of the
#   weights) and **attention** (a token reads a few earlier tokens, a fixed-size state, or both).
# - Attention sparsity comes in three forms: **select** (DSA, NSA, MoBA: $O(T\cdot k)$), **recur** (lightning,
#   Gated DeltaNet, KDA: $O(T)$ time, constant state), and **mix** (3:1 and 7:1 hybrids). MLA is not sparse but
#   shrinks the cache, and DSA builds on it.
# - The 2026 flagships split into four routes: hybrid linear/full (Qwen3.5, Kimi Linear), mostly linear
#   (MiniMax-M1), sparse selection (DeepSeek V3.2, GLM-5) and full attention (MiniMax-M2).
# - Hybrids stay quadratic: at long context a 3:1 stack costs ¼ of full attention, a 7:1 stack ⅛. Their bigger win
#   is the cache. DSA's attention is linear in $T$ past $k$, but its indexer is not.
# - Per token of context, MHA at DeepSeek-V3's shape caches 3.8 MiB, MLA 69 KiB, a 3:1 MLA hybrid 17 KiB plus
#   constant states that pay off after about 7 000 tokens.
# - Check claims against checkpoints: two of the survey's rows (Kimi K2.5's KDA, M2.5's lightning attention) do
#   not match what `transformers` ships.
#
# Next, chapter 1 builds the baseline every other chapter is measured against: softmax attention, its KV cache,
# and flash attention in Triton.
#
# ## References
#
# - **[S]** The minisparse seed survey, Feb 2026: *Open sparse-architecture models, a panorama (as of February
#   2026)*, in Chinese, dated 25 February 2026, in the project's shared notes.
# - DeepSeek-AI. *DeepSeek-V3.2: Pushing the Frontier of Open Large Language Models*, 2025.
#   [arXiv:2512.02556](https://arxiv.org/abs/2512.02556); model card
#   [deepseek-ai/DeepSeek-V3.2](https://huggingface.co/deepseek-ai/DeepSeek-V3.2).
# - DeepSeek-AI. *DeepSeek-V3 Technical Report*, 2024. [arXiv:2412.19437](https://arxiv.org/abs/2412.19437).
# - DeepSeek-AI. *DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model* (MLA), 2024.
#   [arXiv:2405.04434](https://arxiv.org/abs/2405.04434).
# - GLM-5 Team. *GLM-5: from Vibe Coding to Agentic Engineering*, 2026.
#   [arXiv:2602.15763](https://arxiv.org/abs/2602.15763); model card [zai-org/GLM-5](https://huggingface.co/zai-org/GLM-5).
# - Qwen Team. *Qwen3 Technical Report*, 2025. [arXiv:2505.09388](https://arxiv.org/abs/2505.09388); model cards
#   [Qwen3-Next-80B-A3B-Instruct](https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct),
#   [Qwen3.5-397B-A17B](https://huggingface.co/Qwen/Qwen3.5-397B-A17B).
# - Yang, Kautz and Hatamizadeh. *Gated Delta Networks: Improving Mamba2 with Delta Rule*, ICLR 2025.
#   [arXiv:2412.06464](https://arxiv.org/abs/2412.06464).
# - Kimi Team. *Kimi Linear: An Expressive, Efficient Attention Architecture*, 2025.
#   [arXiv:2510.26692](https://arxiv.org/abs/2510.26692); model card
#   [moonshotai/Kimi-Linear-48B-A3B-Instruct](https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct).
# - Kimi Team. *Kimi K2: Open Agentic Intelligence*, 2025. [arXiv:2507.20534](https://arxiv.org/abs/2507.20534).
# - MiniMax. *MiniMax-01: Scaling Foundation Models with Lightning Attention*, 2025.
#   [arXiv:2501.08313](https://arxiv.org/abs/2501.08313).
# - MiniMax. *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention*, 2025.
#   [arXiv:2506.13585](https://arxiv.org/abs/2506.13585); model cards
#   [MiniMax-M1-80k](https://huggingface.co/MiniMaxAI/MiniMax-M1-80k),
#   [MiniMax-M2.5](https://huggingface.co/MiniMaxAI/MiniMax-M2.5).
# - Yuan et al. *Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention*, ACL 2025.
#   [arXiv:2502.11089](https://arxiv.org/abs/2502.11089).
# - Lu et al. *MoBA: Mixture of Block Attention for Long-Context LLMs*, 2025.
#   [arXiv:2502.13189](https://arxiv.org/abs/2502.13189).
# - Shen et al. *SSA: Sparse Sparse Attention by Aligning Full and Sparse Attention Outputs in Feature Space*, 2025.
#   [arXiv:2511.20102](https://arxiv.org/abs/2511.20102).
# - Zhang et al. *SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference*, ICML 2025.
#   [arXiv:2502.18137](https://arxiv.org/abs/2502.18137).
# - Zhang et al. *SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference Acceleration*, ICLR 2025.
#   [arXiv:2410.02367](https://arxiv.org/abs/2410.02367).
# - Jiang et al. *Mixtral of Experts*, 2024. [arXiv:2401.04088](https://arxiv.org/abs/2401.04088).
# - Shazeer. *Fast Transformer Decoding: One Write-Head is All You Need* (MQA), 2019.
#   [arXiv:1911.02150](https://arxiv.org/abs/1911.02150).
# - Ainslie et al. *GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints*, 2023.
#   [arXiv:2305.13245](https://arxiv.org/abs/2305.13245).
# - `transformers` 5.x configuration classes `DeepseekV3Config`, `DeepseekV32Config`, `Qwen3NextConfig`,
#   `KimiLinearConfig`, `Kimi_K25Config`, `MiniMaxM2Config` (the checks of §0.6).
