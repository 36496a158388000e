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
# There are no kernels here. The code computes the tables and plots from numbers stated in the cells, and checks
# them against the models' configurations in `transformers`, so you can change an assumption and see what moves.
#
# **Learning objectives.** After this chapter you can
#
# - name the two places where an open LLM is sparse (the FFN and the token mixer) and the three ways attention is
#   made cheaper — *select*, *recur*, *mix* — plus MLA, which keeps full attention but shrinks the cache;
# - read a model's configuration for its total and active parameters, its layer mix and its cache per token;
# - estimate what attention and the KV cache cost at 128K and 1M tokens for each family, and say what such an
#   estimate leaves out;
# - tell a survey's claim from a fact checked against a checkpoint or a paper.
#
# **Prerequisites.** No earlier chapter. You should know what a decoder-only transformer layer does (attention,
# then an FFN, each with a norm and a residual), big-O notation, and enough Python to read NumPy. No GPU needed.
#
# **Time.** About 40 minutes for the core path, 30–45 more for the exercises.
#
# **Roadmap.**
#
# - §0.1 Two kinds of sparsity — experts and attention, one decoder layer with its two sparse slots.
# - §0.2 Who uses what — the production models and research methods, and where the survey and checkpoints disagree.
# - §0.3 The MoE table — how much of each model one token computes with.
# - §0.4 Four routes — hybrid, mostly linear, sparse selection, full attention; the hybrid layer stacks.
# - §0.5 What attention costs as the context grows — one cost model for all families.
# - §0.6 What the cache costs — bytes per token, constant states, and the released Kimi Linear layout.
# - §0.7 How to read this book — the arc of a chapter, CPU or GPU, the conventions.
# - Exercises — derive a model's parameter counts from its config, predict which hybrid caches less at 1M
#   tokens, extend the cost model to MoBA.
#
# :::{admonition} Where the numbers come from
# :class: note
# Numbers marked **[S]** come from the survey this book started from (see References). This book checks its facts
# against the models' configurations (`transformers`' configuration classes, the checkpoints' `config.json`) and
# papers; where a primary source exists it is named next to the number, and where the two disagree the text says
# so.
# :::

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
import numpy as np
import torch

from minisparse import viz
from minisparse.testing import attempt

# in Jupyter or Colab tables render as HTML; under `python chapters/00_map.py` they print as text
try:
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
        return [self.formats.get(c, "{}").format(row[c]) if row.get(c) is not None else "—"
                for c in self.columns]

    def __str__(self):
        cells = [self.columns] + [self._cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in cells]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])

    __repr__ = __str__  # the notebook's plain-text output, beside the HTML

    def _repr_html_(self):
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{x}</td>" for x in self._cells(r)) + "</tr>"
                       for r in self.rows)
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
# A sequence of $T$ tokens costs $O(T^2)$ time per layer, and decoding keeps a *KV cache* (every earlier token's keys
# and values, stored so that they are not recomputed) that grows as $O(T)$. The
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
# ### One layer, two slots
#
# Every model in this book is a stack of decoder layers of the same shape: a norm, a *token mixer* (the part that
# lets a token read other tokens), a residual add, a norm, an FFN, a residual add (each "+" in the picture adds the
# slot's input back to its output). The models differ in what they
# put in the two slots. The picture below shows the options and the chapter that builds each; the colours are the
# three families of token mixer — blue keeps full attention (MLA only makes its cache small), green *recurs* with
# a fixed-size state, orange *selects* a few earlier tokens.
#
# | ch. | mechanism | what it makes sparse or small | `minisparse.` | used by |
# |---|---|---|---|---|
# | 0 | The map | — | `overview` (this chapter's exercise checkers) | — |
# | 1 | Attention and its cost | the baseline: $O(T^2)$ time, $O(T)$ cache | `attention` | every model |
# | 2 | Mixture of Experts | the FFN: $k$ of $E$ experts per token | `moe` | all the models below |
# | 3 | Multi-head Latent Attention | the KV cache: one 512 + 64 latent per token and layer | `mla` | DeepSeek V3.2, GLM-5, Kimi K2.5, Kimi Linear |
# | 4 | Linear attention & Lightning Attention | attention becomes a fixed-size state with decay | `lightning` | MiniMax-M1 |
# | 5 | DeltaNet & Gated DeltaNet | the state is edited by the delta rule | `deltanet` | Qwen3-Next, Qwen3.5 |
# | 6 | Kimi Delta Attention (KDA) | the decay becomes channel-wise | `kda` | Kimi Linear |
# | 7 | NSA & MoBA | block selection: compress, select, slide | `nsa` | research (NSA, MoBA) |
# | 8 | DeepSeek Sparse Attention (DSA) | token selection by a lightning indexer | `dsa` | DeepSeek V3.2, GLM-5 |
# | 9 | Capstone | the models as tiny configs | `models` | all |

# %%
Box = viz.Box
FULL, RECUR, SELECT, GREY, MOE = "#dbe9f6", "#d9f0d3", "#fde2c8", "#eeeeee", "#eadcf2"
boxes = {
    "x": Box(0, 3, "hidden state\n$x_t$", w=1.5, h=0.8, color=GREY),
    "n1": Box(2.1, 3, "RMSNorm", w=1.3, h=0.6, color=GREY),
    "mix": Box(4.5, 3, "slot 1:\ntoken mixer", w=2.0, h=0.8, color=FULL),
    "add1": Box(6.6, 3, "+ $x_t$\n(residual)", w=1.2, h=0.7, color=GREY),
    "n2": Box(8.3, 3, "RMSNorm", w=1.3, h=0.6, color=GREY),
    "ffn": Box(10.5, 3, "slot 2:\nFFN", w=1.8, h=0.8, color=MOE),
    "add2": Box(12.4, 3, "+\n(residual)", w=1.1, h=0.7, color=GREY),
    "out": Box(14.0, 3, "next layer", w=1.5, h=0.8, color=GREY),
}
mixers = [("full softmax (GQA)", 1, FULL), ("MLA: latent cache", 3, FULL),
          ("lightning attention", 4, RECUR), ("Gated DeltaNet", 5, RECUR), ("KDA", 6, RECUR),
          ("NSA / MoBA: blocks", 7, SELECT), ("DSA: top-k tokens", 8, SELECT)]
for i, (name, chapter, color) in enumerate(mixers):
    boxes[f"m{i}"] = Box(4.5, 1.35 - 0.62 * i, f"{name} — ch. {chapter}", w=3.2, h=0.5, color=color)
boxes["f0"] = Box(10.5, 1.35, "dense SwiGLU FFN", w=3.3, h=0.5, color=GREY)
boxes["f1"] = Box(10.5, 0.73, "MoE: top-k of E experts — ch. 2", w=3.3, h=0.5, color=MOE)
flow = ["x", "n1", "mix", "add1", "n2", "ffn", "add2", "out"]
arrows = list(zip(flow, flow[1:])) + [("mix", "m0"), ("ffn", "f0")]
groups = [([f"m{i}" for i in range(len(mixers))], "slot 1, one of:"),
          (["f0", "f1"], "slot 2, one of:")]
viz.schematic(boxes, arrows, groups=groups, size=(11, 5.2),
              title="One decoder layer, two sparse slots, and the chapter that builds each option")
plt.show()

# %% [markdown]
# Read the picture as a menu. DeepSeek V3.2 puts DSA (on MLA) in slot 1 of every layer and MoE in slot 2 of all
# but its first three; Qwen3-Next puts Gated DeltaNet in slot 1 of three layers in every four, gated full
# attention in the fourth, and MoE in every slot 2; a dense model such as Llama puts full attention and a dense
# FFN in every layer. A model is a choice per slot per layer — §0.2 lists who chose what.

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
# - DSA is the *only* architectural change between DeepSeek V3.1 and V3.2 [S]. The survey credits it with "about
#   50 % less compute in 128K-context inference" [S] without saying what was measured: per token or per request,
#   attention or the whole model, FLOPs or serving cost. The DeepSeek-V3.2 report gives no single percentage. It
#   states that DSA cuts the main attention from $O(L^2)$ to $O(Lk)$ while its indexer stays $O(L^2)$ with a much
#   smaller constant, and its Figure 3 plots what a token costs against its position in the sequence, for
#   prefill and for decoding, estimated by benchmarking the deployed service on H800 GPUs at 2 USD per GPU-hour.
#   Read the 50 % as the survey's figure, not as a measured whole-model saving; §0.5 works out what this book's
#   FLOP model says.
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
# **MiniMax-M2.5.** The survey says M2.5 reintroduced lightning attention. The M2.5 checkpoint is published with M2's
# architecture (`model_type` `minimax_m2`), which `transformers` implements with softmax (GQA) attention in every
# layer. No released configuration shows the reintroduction; treat it as the survey's claim. Chapter 4 builds
# lightning attention from MiniMax-01/M1, whose hybrid layout is documented.
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
# total / active parameters in billions: [S], or the source named
MOE = [
    dict(model="DeepSeek V3 / V3.1 / V3.2", total=685, active=37,
         source="[S]; V3 card: 671B main + 14B MTP module"),
    dict(model="Mistral Large 3", total=675, active=41, source="[S]"),
    dict(model="Qwen3-235B-A22B", total=235, active=22,
         source="[S]; Qwen3 report (arXiv:2505.09388)"),
    dict(model="Kimi K2 / K2.5", total=1000, active=32,
         source="[S] '1T+'; Kimi K2 report (arXiv:2507.20534)"),
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
race = ("Qwen3.5", "MiniMax-M2.5", "Kimi K2", "Qwen3-235B")  # the survey's examples
colors = ["tab:orange" if m["model"].startswith(race) else "tab:blue" for m in MOE]
ax.barh(names, ratios, color=colors)
ax.invert_yaxis()
for y, r in enumerate(ratios):
    ax.text(r + 0.3, y, f"{r:.1f} %", va="center", fontsize=8)
ax.set_xlabel("activation ratio = active / total parameters (%)")
ax.set_title("How much of an MoE model one token uses\n"
             "(orange: the survey's 'activation race' examples)")
ax.set_xlim(0, max(ratios) * 1.15)
fig.tight_layout()
plt.show()

# %% [markdown]
# *Source: total and active counts from [S] (Kimi Linear from its paper); ratios
# computed here. "Kimi K2 / K2.5" uses 1000B for "1T+", so its true ratio is a little lower.*
#
# The survey calls this an *activation race* [S]: Qwen3-235B-A22B computes with 9.36 % of its weights, Qwen3.5 and
# MiniMax-M2.5 with about 4.3 %, Kimi K2.5 with less still. Sparser routing buys FLOPs per stored parameter, but
# asks more of the router — every expert must still get enough tokens to train, and chapter 2 shows how DeepSeek
# balances them with a per-expert bias instead of a large auxiliary loss (keeping only a tiny sequence-wise one).
# Note what the ratio leaves out: DeepSeek's 685B counts a 14B multi-token-prediction module that the V3 paper's
# 671B does not, which moves the ratio from 5.5 % to 5.4 %. (Exercise 1 derives the 671B and DeepSeek's 36.6B
# active, which the paper rounds to 37B, from the model's configuration.)
#
# A check that the survey's own percentages follow from its own counts:

# %%
ratio = {m["model"]: m["ratio"] for m in MOE}
assert f"{ratio['Qwen3-235B-A22B']:.2f}" == "9.36", ratio["Qwen3-235B-A22B"]  # survey: 9.36 %
assert f"{ratio['Qwen3.5-397B-A17B']:.1f}" == "4.3", ratio["Qwen3.5-397B-A17B"]  # survey: ~4.3 %
assert f"{ratio['MiniMax-M2.5']:.1f}" == "4.3", ratio["MiniMax-M2.5"]  # survey: ~4.3 %
# survey: Kimi K2.5 is sparser still — true even with the 1000B upper bound for "1T+"
assert ratio["Kimi K2 / K2.5"] < min(ratio["Qwen3.5-397B-A17B"], ratio["MiniMax-M2.5"])
race = ["Qwen3-235B-A22B", "Qwen3.5-397B-A17B", "MiniMax-M2.5", "Kimi K2 / K2.5"]
print("activation ratios agree with the survey:", ", ".join(f"{k} {ratio[k]:.2f} %" for k in race))

# %% [markdown]
# ## 0.4 Four routes
#
# A year ago the open question was "MoE or dense?"; MoE won, and the models now differ mainly in their attention
# [S]. The survey sorts them into four routes:
#
# | route | how | representative models [S] | what it buys | what it costs | chapters |
# |---|---|---|---|---|---|
# | hybrid linear / full | 3 linear layers (Gated DeltaNet, KDA) per full-attention layer | Qwen3.5, Kimi K2.5 [S] (the hybrid is Kimi Linear, §0.2) | ¾ of the layers keep a fixed-size state | the full layers stay $O(T^2)$: at long context the stack costs ¼ of full attention, never less | 4, 5, 6 |
# | (mostly) linear | lightning attention; M1 keeps 1 softmax layer in 8 | MiniMax-M1 (and M2.5 per the survey) | ⅞ of the layers linear | accuracy worries in reasoning and multi-turn tasks: M2 went back to full attention | 4 |
# | sparse selection | full-size cache, each query reads only its top-$k$ tokens | DeepSeek V3.2, GLM-5 | $O(T\cdot k)$ attention | the cache still grows with $T$ (MLA keeps it small); the indexer is still $O(T^2)$, with a small constant | 3, 7, 8 |
# | full attention | softmax in every layer (GQA or MLA) | MiniMax-M2 | the best-understood quality | $O(T^2)$ time, $O(T)$ cache | 1, 3 |
#
# No flagship in the survey is *purely* linear: even the "all-linear" route keeps some softmax layers. The hybrids
# of the first two routes are layer stacks, drawn below: eight consecutive layers of a 3 : 1 and a 7 : 1 model.
# (The released Kimi Linear is 3 : 1 with one more full layer at the top: 20 KDA and 7 MLA layers in 27, §0.6.)

# %%
boxes, arrows = {}, []
for i in range(8):
    full3, full7 = i % 4 == 3, i == 7
    boxes[f"a{i}"] = Box(1.25 * i, 1.5, "full" if full3 else "linear", w=1.05, h=0.55,
                         color=FULL if full3 else RECUR)
    boxes[f"b{i}"] = Box(1.25 * i, 0, "softmax" if full7 else "lightning", w=1.05, h=0.55,
                         color=FULL if full7 else RECUR)
    arrows += [(f"a{i}", f"a{i + 1}"), (f"b{i}", f"b{i + 1}")] if i < 7 else []
groups = [([f"a{i}" for i in range(8)],
           "3 : 1 — Qwen3-Next, Qwen3.5 (Gated DeltaNet + gated attention); "
           "Kimi Linear (KDA + MLA)"),
          ([f"b{i}" for i in range(8)], "7 : 1 — MiniMax-01 / M1 (lightning + softmax)")]
viz.schematic(boxes, arrows, groups=groups, size=(10, 3),
              title="Hybrid stacks: eight consecutive layers")
plt.show()

# %% [markdown]
# Each green layer keeps a state of fixed size whatever the context; each blue one keeps a cache that grows with
# it and does work that grows with its square. The next two sections put numbers on the "buys" and "costs"
# columns of the table.

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
# | DSA's lightning indexer | $c_{\mathrm{idx}} \cdot T(T+1)/2$, $c_{\mathrm{idx}} = 0.059$ | the indexer scores *every* pair: 64 heads × 128 dims × 2 = 16 384 FLOPs a pair, against 278 528 for MLA's attention in its absorbed form (128 heads × (576 + 512) × 2); FP8 makes the indexer cheaper still in time |
# | linear attention (recurrent) | $D \cdot T$ | per token the state update $S \mathrel{+}= k v^\top$ and readout $S^\top q$ cost $4D^2$ FLOPs $= D$ pairs; decay and the delta rule add a small constant factor we ignore |
# | $r\!:\!1$ hybrid | $\frac{1}{r+1}\,\mathrm{full} + \frac{r}{r+1}\,\mathrm{linear}$ | averaged over the layer stack, so still per layer |
#
# Projections, the FFN and memory traffic are left out: this is the part of the cost that depends on $T$.
#
# *MLA's absorbed form* (chapter 3) folds the key and value up-projections into the query and the output, so each
# head scores the cached 576-number latent directly and reads out 512 numbers: $2 \times (576 + 512)$ FLOPs a head
# and pair. The *expanded* form first rebuilds per-head keys (192 dims) and values (128): $2 \times (192 + 128)$.
# The DSA curves below count pairs of MLA's absorbed attention, not $4D$-FLOP pairs: read each curve as a fraction
# of its own family's full attention.

# %%
D = 128  # head dimension
K_TOPK = 2048  # DSA's top-k (DeepSeek V3.2's index_topk)
# indexer FLOPs per query-key pair / attention FLOPs per pair (DeepSeek V3.2, MLA absorbed form)
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
    """DSA = the lightning indexer over all pairs (cheap, but quadratic) + attention over top k."""
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
    print(f"T = {T:>8,}: relative to full attention — top-k {topk_cost(T) / f:.4f}, "
          f"DSA with indexer {dsa_cost(T) / f:.4f}, 3:1 {hybrid_cost(T, 3) / f:.4f}, "
          f"7:1 {hybrid_cost(T, 7) / f:.4f}, linear {linear_cost(T) / f:.6f}")

# %%
T = np.unique(np.logspace(7, 20, 200, base=2).astype(np.int64))  # 128 .. 1M tokens
fig, ax = plt.subplots(figsize=(7.5, 5))
ax.loglog(T, full_cost(T), label="full attention  $O(T^2)$", color="black", lw=2)
ax.loglog(T, hybrid_cost(T, 3), label="3:1 hybrid (Qwen3-Next, Qwen3.5, Kimi Linear)",
          color="tab:green")
ax.loglog(T, hybrid_cost(T, 7), label="7:1 hybrid (MiniMax-M1)", color="tab:olive")
ax.loglog(T, dsa_cost(T), label="DSA: indexer + top-k attention", color="tab:red", ls="--")
ax.loglog(T, topk_cost(T), label=f"top-k attention alone, k = {K_TOPK}  $O(Tk)$", color="tab:red")
ax.loglog(T, linear_cost(T), label="linear attention  $O(T)$", color="tab:blue")
for t, name in [(131072, "128K"), (1 << 20, "1M")]:
    ax.axvline(t, color="grey", ls=":", lw=1)
    ax.text(t, 0.03, name, ha="right", va="bottom", fontsize=8, color="grey", rotation=90,
            transform=ax.get_xaxis_transform())
ax.set_xlabel("context length T (tokens)")
ax.set_ylabel("attention cost per layer and head\n"
              "(query–key pairs of full attention; 1 pair = 4D FLOPs)")
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
#   attention. DSA's **indexer** still touches every pair, so its share grows with $T$: from about 69K tokens it
#   costs more than the attention it serves, which is why it has few heads, small dimensions and runs in FP8.
#   Together, at 128K, DSA's attention costs about a tenth of full attention in this model, both counted in MLA's
#   absorbed form. V3.1 prefills in MLA's expanded form (81 920 FLOPs a pair); against that, V3.2's indexer costs
#   0.2 of a pair and each selected key, read in the absorbed form, 3.4 pairs, so its prefill attention is about 0.3
#   of V3.1's (chapter 8, §8.6).
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
# At 128K, DSA's attention is ~3 % of full, its indexer costs more, and the sum is about a tenth.
T128 = 131072
assert 0.025 < topk_cost(T128) / full_cost(T128) < 0.035
assert C_IDX * full_cost(T128) > topk_cost(T128)
assert 0.08 < dsa_cost(T128) / full_cost(T128) < 0.10
# against V3.1's expanded-form prefill (81 920 FLOPs a pair): the indexer 0.2 a pair,
# a selected key 3.4 pairs (278 528 / 81 920)
prefill_vs_v31 = (0.2 * full_cost(T128) + 278_528 / 81_920 * topk_cost(T128)) / full_cost(T128)
assert 0.28 < prefill_vs_v31 < 0.33
# The length from which the indexer costs more than the top-k attention it serves.
T_grid = np.arange(K_TOPK, 1 << 17, 64)
T_idx = int(T_grid[np.argmax(C_IDX * full_cost(T_grid) > topk_cost(T_grid))])
assert 68_000 < T_idx < 70_000, T_idx
at_long = {r: hybrid_cost(T_long, r) / full_cost(T_long) for r in (3, 7)}
dsa_128k = dsa_cost(T128) / full_cost(T128)
print(f"linear overtakes full at T = {T_cross}; at 1M tokens 3:1 costs {at_long[3]:.4f} and 7:1 "
      f"{at_long[7]:.4f} of full; DSA at 128K costs {dsa_128k:.3f} of full; "
      f"its indexer outweighs its attention from T = {T_idx:,}")

# %% [markdown]
# ### From attention to a whole token
#
# How much of a *token's* cost is attention? In this book's FLOP model, decoding the token at position $t$ of
# DeepSeek-V3.1 costs about $2N_{\mathrm{act}}$ FLOPs for its weights (two per active parameter,
# $N_{\mathrm{act}} \approx 37$B) plus, in each of its $L = 61$ layers, attention over $t$ cached latents at
# $f_{\mathrm{attn}} = 128 \times (576 + 512) \times 2 = 278\,528$ FLOPs each (MLA's absorbed form, chapter 3).
# V3.2 replaces that term by the indexer over all $t$ tokens, $f_{\mathrm{idx}} = 64 \times 128 \times 2 = 16\,384$
# FLOPs each, plus attention over at most $k$:
#
# $$
# \begin{aligned}
# F_{3.1}(t) &= 2N_{\mathrm{act}} + L\, f_{\mathrm{attn}}\, t, \\
# F_{3.2}(t) &= 2N_{\mathrm{act}} + L\,\big(f_{\mathrm{idx}}\, t + f_{\mathrm{attn}} \min(t, k)\big).
# \end{aligned}
# $$

# %%
N_ACT, N_LAYERS = 37e9, 61  # DeepSeek-V3's active parameters (V3 paper) and layers
F_ATTN = 128 * (512 + 64 + 512) * 2  # FLOPs per cached token and layer: MLA, absorbed form
F_IDX = 64 * 128 * 2  # FLOPs per cached token and layer: the lightning indexer


def token_flops(t, dsa):
    """FLOPs to decode the token at position t: the weights, plus attention in every layer."""
    attention = F_IDX * t + F_ATTN * np.minimum(t, K_TOPK) if dsa else F_ATTN * t
    return 2 * N_ACT + N_LAYERS * attention


rows = [dict(position=t, v31=token_flops(t, False) / 1e9, v32=token_flops(t, True) / 1e9,
             attention_share=1 - 2 * N_ACT / token_flops(t, False),
             ratio=token_flops(t, True) / token_flops(t, False)) for t in [4096, 32768, 131072]]
show(Table(rows, ["position", "v31", "v32", "attention_share", "ratio"],
           {"position": "{:,}", "v31": "{:,.0f} GFLOP", "v32": "{:,.0f} GFLOP",
            "attention_share": "{:.0%} of V3.1's FLOPs", "ratio": "V3.2 = {:.2f} × V3.1"}))
assert 0.965 < rows[-1]["attention_share"] < 0.975 and 0.09 < rows[-1]["ratio"] < 0.12

# %% [markdown]
# At position 128K attention is 97 % of a V3.1 token's FLOPs, so in FLOPs DSA makes that token about ten times
# cheaper — not twice. A FLOP count is not a serving cost, though: decoding is limited by reading the cache and the
# weights from memory and by how many sequences share a batch, V3.1 prefills in MLA's expanded form (against which
# V3.2's prefill attention costs about 0.3 of V3.1's, not 0.1), and a request averages over all positions up to its
# length. The report's Figure 3 measures serving cost per token; which quantity the survey's "about 50 %" measures,
# it does not say.

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
# | MHA (multi-head attention) | $2 H D$ (a key and a value per head) | 32 768 | DeepSeek-V2 paper, table 1 |
# | GQA (grouped-query attention), 8 KV heads | $2 G D$ (groups of query heads share a key and value head) | 2 048 | [GQA](https://arxiv.org/abs/2305.13245) |
# | MQA (multi-query attention) | $2 D$ (one key and value head for all) | 256 | [MQA](https://arxiv.org/abs/1911.02150) |
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
N_FULL_HYBRID = sum((i + 1) % 4 == 0 for i in range(LAYERS))  # 3:1: every 4th layer full, 15 of 61

# elements per token per full-attention layer
PER_LAYER = {
    "MHA": 2 * HEADS * HEAD_DIM,
    "GQA (8 KV heads)": 2 * 8 * HEAD_DIM,
    "MQA": 2 * HEAD_DIM,
    "MLA": KV_LORA_RANK + ROPE_DIM,
}


def cache_bytes(family, T):
    """The whole model's cache for one sequence of T tokens: bytes a token * T + constant states."""
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
                     at_128k=cache_bytes(fam, 131072) / 2**30,
                     at_1m=cache_bytes(fam, 1 << 20) / 2**30))
show(Table(rows, ["family", "per_token", "constant", "at_128k", "at_1m"],
           {"per_token": "{:,.1f} KiB/token", "constant": "{:,.0f} MiB", "at_128k": "{:,.2f} GiB",
            "at_1m": "{:,.1f} GiB"}))

# %%
COLORS = ["black", "tab:gray", "tab:brown", "tab:purple", "tab:green", "tab:blue"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.5))
per_token = [(cache_bytes(f, 1) - cache_bytes(f, 0)) / 1024 for f in FAMILIES]
bars = ax1.bar(range(len(FAMILIES)), [max(p, 1e-9) for p in per_token],
               color=COLORS)
ax1.set_yscale("log")
ax1.set_ylim(1, 1e4)
ax1.set_xticks(range(len(FAMILIES)), [f.replace(" (", "\n(") for f in FAMILIES], fontsize=8,
               rotation=30, ha="right")
for i, p in enumerate(per_token):
    ax1.text(i, max(p, 1) * 1.15, f"{p:,.1f}" if p else "0\n(+ state)", ha="center", fontsize=8)
ax1.set_ylabel("KiB per token of context (whole model)")
ax1.set_title("(a) cache growth per token")

Tc = np.logspace(10, 20, 100, base=2)  # 1K .. 1M tokens
for fam, color in zip(FAMILIES, COLORS):
    ax2.loglog(Tc, cache_bytes(fam, Tc) / 2**30, label=fam, color=color)
H200_GIB = 141e9 / 2**30  # one H200's memory, 141 GB
ax2.axhline(H200_GIB, color="tab:red", ls=":", lw=1)
ax2.text(Tc[0], H200_GIB * 1.15, "one H200: 141 GB", fontsize=8, color="tab:red")
ax2.set_xlabel("context length T (tokens)")
ax2.set_ylabel("cache for one sequence (GiB)")
ax2.set_title("(b) cache for one sequence, with constant states")
ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
ax2.grid(True, which="major", alpha=0.3)
fig.suptitle("KV cache at DeepSeek-V3's attention shape "
             "(61 layers, 128 heads × 128, bf16 cache, fp32 states)", fontsize=10)
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
#   about what GQA with 2.25 groups would — 57× less than MHA with the same 128 heads of 128-dimensional keys and
#   values, yet every head still gets its own keys and values after up-projection. Chapter 3 explains why this is
#   the fair baseline (DeepSeek-V2's), and what the ratio becomes if MLA's longer keys are counted instead.
# - The **3:1 hybrid** grows 4× more slowly than MLA because only 15 of its 61 layers keep a per-token cache, but it
#   starts from a constant of 46 × 8 MiB of states; it is the smaller cache only beyond about 7 000 tokens.
#   **Pure linear** is flat: 488 MiB at any length — which is exactly why its quality at long range is the open
#   question.
#
# ### The released Kimi Linear layout
#
# `transformers`' configuration classes default to the real checkpoints' shapes — with one exception that matters
# here. `KimiLinearConfig()` with no arguments places MLA in every fourth layer after layer 0: 6 MLA layers (1-based
# 5, 9, …, 25) and 21 KDA layers. The released checkpoint
# ([moonshotai/Kimi-Linear-48B-A3B-Instruct](https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct),
# `config.json`) lists its layers itself, 1-based, under `linear_attn_config`: MLA in layers 4, 8, 12, 16, 20, 24
# and 27 — seven of them, the last layer included — and KDA in the other 20. `transformers` reads that list when it
# loads the checkpoint, so a loaded model has the released layout; only the bare default differs. **This book uses
# the released layout**: `KIMI_LINEAR_RELEASED` below, passed to `KimiLinearConfig` as the checkpoint passes it.
#
# The check below recomputes the shapes from `transformers`' configuration classes and asserts the layouts and the
# two warnings of §0.2. It is skipped, with a message, where `transformers` is not installed (it is a test
# dependency of `minisparse`, not a runtime one).

# %%
assert PER_LAYER["MLA"] == 576 and LAYERS * PER_LAYER["MLA"] * BYTES == 70_272  # bytes a token
assert PER_LAYER["MLA"] / (2 * HEAD_DIM) == 2.25  # what GQA with 2.25 groups caches (DeepSeek-V2)
assert round(PER_LAYER["MHA"] / PER_LAYER["MLA"]) == 57  # MHA: same 128 heads of 128 dims (ch. 3)
breakeven = STATE_BYTES / (PER_LAYER["MLA"] * BYTES)  # a linear layer's state / MLA bytes a token
assert 7_000 < breakeven < 7_500
assert cache_bytes("3:1 hybrid (MLA + linear)", 8_000) < cache_bytes("MLA", 8_000)

# Kimi-Linear-48B-A3B-Instruct's config.json: which layers are MLA ("full") and KDA, numbered from 1
KIMI_FULL = [4, 8, 12, 16, 20, 24, 27]
KIMI_LINEAR_RELEASED = dict(full_attn_layers=KIMI_FULL,
                            kda_layers=[i for i in range(1, 28) if i not in KIMI_FULL])

try:
    import transformers
    from transformers import (DeepseekV3Config, DeepseekV32Config, KimiLinearConfig, Kimi_K25Config,
                              MiniMaxM2Config, Qwen3NextConfig)
except ImportError:
    transformers = None
    print("transformers is missing or older than 5.6: skipping the checks against its model "
          "configurations")


def full_layers(config):
    """1-based indices of the full-attention layers of a hybrid's config."""
    return [i + 1 for i, kind in enumerate(config.layer_types) if kind == "full_attention"]


if transformers is not None:
    ds = DeepseekV3Config()
    assert (ds.num_hidden_layers, ds.num_attention_heads) == (LAYERS, HEADS)
    assert ds.v_head_dim == HEAD_DIM
    assert ds.kv_lora_rank + ds.qk_rope_head_dim == PER_LAYER["MLA"]
    ds32 = DeepseekV32Config()
    assert ds32.index_topk == K_TOPK and (ds32.index_n_heads, ds32.index_head_dim) == (64, 128)
    qn = Qwen3NextConfig()
    assert full_layers(qn) == list(range(4, 49, 4))  # 36 Gated DeltaNet : 12 gated attention
    kimi = KimiLinearConfig(linear_attn_config=KIMI_LINEAR_RELEASED)  # as the checkpoint builds it
    assert full_layers(kimi) == KIMI_FULL and kimi.layer_types.count("linear_attention") == 20
    assert full_layers(KimiLinearConfig()) == list(range(5, 26, 4))  # bare default: 6 MLA, 21 KDA
    # The two warnings of §0.2: Kimi K2.5 is DeepSeek-V3's text model (MLA, no KDA); M2 has no
    # linear layers.
    assert isinstance(Kimi_K25Config().text_config, DeepseekV3Config)
    assert "linear_attention" not in (getattr(MiniMaxM2Config(), "layer_types", None) or [])
    print(f"transformers {transformers.__version__}: DeepSeek-V3 shape, "
          f"DSA top-k {ds32.index_topk}; "
          f"full-attention layers of Qwen3-Next {full_layers(qn)}, of Kimi Linear as released "
          f"{full_layers(kimi)}; Kimi K2.5 text = DeepseekV3Config; MiniMax-M2 all softmax")
mla_bytes = LAYERS * PER_LAYER["MLA"] * BYTES
print(f"MLA: {mla_bytes:,} bytes a token; the 3:1 hybrid is smaller than MLA "
      f"beyond {breakeven:,.0f} tokens")

# %% [markdown]
# ## 0.7 How to read this book
#
# ### The arc of a chapter
#
# Every mechanism chapter walks the same steps, so you always know where you are:
#
# 0. **Opening** — learning objectives, prerequisites, a time estimate and a roadmap of the sections.
# 1. **Why** — the problem in one picture, and the models that use the mechanism.
# 2. **Naive** — the paper's equations beside PyTorch that implements them line by line; this is the *spec*.
# 3. **See it** — pictures of what the mechanism attends to or routes, a drawn schematic of the data flow, and an
#    explorer whose knobs (top-k, block size, window, decay) change the picture.
# 4. **Cost model** — FLOPs, bytes and cache as functions of $T$, against dense attention (the curves above, made
#    exact for each mechanism).
# 5. **Fast** — the algorithmic rewrite (chunkwise form, WY representation, absorption, block selection) in PyTorch,
#    then the Triton kernel, tile by tile, checked against the naive spec.
# 6. **Layer** — the `nn.Module` as the production model builds it, loading `transformers`' weights where
#    `transformers` has the layer.
# 7. **Measure** — live on a GPU; on a CPU, the committed H200 or H100 results (each names its GPU), with date and
#    versions.
# 8. **Exercises** — at least three that need understanding, not retyping: *derive* a quantity from the
#    equations, *predict* a number before the checker computes it, *debug* a planted bug, *extend* the mechanism;
#    in chapters 1–8 one of them is a small Triton kernel. Each has a stub, a checker that says what is wrong, and
#    a solution hidden under "Show the solution".
# 9. **Summary** and references.
# 10. **Engineering notes** (optional) — launch configurations, loaders, numerical details and performance
#    experiments: what a practitioner needs and a first reading can skip.
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
print(f"q {tuple(q.shape)} = [B, T, H, D]; g {tuple(g.shape)}, max g = {g.max():.3f} <= 0; "
      f"scale = {scale:.4f}")

# Why log space: the decay over the whole sequence underflows float32 as a product, not as a sum of
# logs.
decay = g[0, :, 0].exp()  # e^g in (0, 1]
as_product = torch.prod(decay)  # float32: T factors of e^-2.5 on average
as_log_sum = g[0, :, 0].sum()  # the same quantity, in log space
print(f"decay over {T_demo} steps: product {as_product.item():.1e}, "
      f"log-space sum {as_log_sum.item():.1f}")
assert ((decay > 0) & (decay <= 1)).all()
assert as_product == 0 and torch.isfinite(as_log_sum)  # the product underflowed; the sum did not

# Why tolerances depend on dtype: rounding to bf16 alone costs ~1e-3 relative RMS.
x = make_bthd(B, T_demo, H, Dh, seed=2)
err_bf16, err_fp16 = rel_rms(x.bfloat16().float(), x), rel_rms(x.half().float(), x)
print(f"relative RMS of rounding: bf16 {err_bf16:.1e}, fp16 {err_fp16:.1e}; "
      f"tolerances fp32 {TOLERANCES[torch.float32][0]:.0e}, "
      f"bf16 {TOLERANCES[torch.bfloat16][0]:.0e}")
assert TOLERANCES[torch.float32][0] < err_bf16 < TOLERANCES[torch.bfloat16][0]

# %% [markdown]
# On a CPU, sixty-four steps of average decay $e^{-2.5}$ multiply to about $e^{-160}$ (on a GPU, 1,024 steps: about
# $e^{-2560}$), far below float32's smallest number (about $e^{-103}$), so the product is exactly zero and every
# ratio of two such products is lost. The log-space sum is an ordinary number, and $e^{G_t - G_s}$ for two
# cumulative sums is computed without trouble — which is why every gated op in this book takes `g`, not `exp(g)`.

# %% [markdown]
# ## Exercises
#
# Each exercise has a stub to fill in, a cell that checks it — `attempt(...)` prints what is wrong until the stub
# works — and a solution hidden under "Show the solution". The solution cell runs when the notebook runs top to
# bottom (that is how the book proves it passes); it defines its own function, so it never replaces yours. The
# checkers live in `minisparse.overview.exercises`, defined in the hidden cells below. Exercises 1 and 2 read
# `transformers`' configuration classes, as §0.6 does.

# %% tags=["hide-input"]
#| export overview.exercises
import numpy as np
import torch

from minisparse.testing import ExerciseError, as_number, check


def _transformers():
    """transformers, whose configuration classes these checkers read (a test dependency)."""
    try:
        import transformers
    except ImportError:
        transformers = None
    needed = ("KimiLinearConfig", "DeepseekV3ForCausalLM")
    if not all(hasattr(transformers, name) for name in needed):
        raise ExerciseError("✗ this checker reads transformers' model configurations "
                            "(KimiLinearConfig, DeepseekV3ForCausalLM): "
                            "`pip install -U 'transformers>=5.6,<6'`, then run the cell again")
    return transformers


def _counted_params(config):
    """(total, active) parameters of transformers' DeepseekV3ForCausalLM for `config`, counted.

    The model is built on the meta device (shapes, no memory), so 671B parameters count in a moment.
    Active = total minus, in every MoE layer, the routed experts a token is not sent to, and
    minus the input embedding unless it is tied to the output head (a token reads one row of it).
    """
    with torch.device("meta"):
        model = _transformers().DeepseekV3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    E, k = config.n_routed_experts, config.num_experts_per_tok
    unused = routed * (E - k) // E
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return float(total), float(total - unused - embedding)


def _param_configs():
    make = _transformers().DeepseekV3Config
    return [
        (make(),),  # DeepSeek-V3 itself
        (make(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
              moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
              n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
              first_k_dense_replace=1, q_lora_rank=None, n_group=1, topk_group=1),),
        (make(vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
              num_hidden_layers=6, num_attention_heads=8, n_routed_experts=32, n_shared_experts=1,
              num_experts_per_tok=4, first_k_dense_replace=2, q_lora_rank=256, kv_lora_rank=128,
              qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=96, n_group=4, topk_group=2,
              tie_word_embeddings=True),),
    ]


def check_param_counts(fn):
    """Check fn(config) -> (total, active) parameters of a DeepSeek-V3-style config, within 0.1 %,
    against transformers' model built from the same config."""
    check("parameters of a DeepSeek-V3-style model", fn, _counted_params, _param_configs(),
          tol=1e-3,
          hint="total = embeddings (twice unless tie_word_embeddings) + every layer's attention "
               "+ the dense FFNs of the first first_k_dense_replace layers + in every other layer "
               "a router (E × hidden), E routed and the shared experts (3 matrices each); active "
               "counts num_experts_per_tok routed experts per MoE layer instead of all E")


# %% [markdown]
# ### Exercise 1 (derive): DeepSeek-V3's 671B and 37B from its configuration
#
# The DeepSeek-V3 paper gives 671B parameters in total and 37B activated for each token. Derive both from
# `DeepseekV3Config()`: write `my_param_counts(config)` returning `(total, active)` for any DeepSeek-V3-style
# configuration. The model has
#
# - an embedding of `vocab_size × hidden_size`, and an output head as large again unless `tie_word_embeddings`;
# - in every layer, MLA: the query path `hidden → q_lora_rank → heads × (qk_nope_head_dim + qk_rope_head_dim)`
#   (one `hidden → heads × (…)` matrix when `q_lora_rank` is `None`), `kv_a_proj_with_mqa`
#   (`hidden → kv_lora_rank + qk_rope_head_dim`), `kv_b_proj` (`kv_lora_rank → heads × (qk_nope_head_dim +
#   v_head_dim)`) and `o_proj` (`heads × v_head_dim → hidden`);
# - an FFN: a dense SwiGLU of width `intermediate_size` (gate, up and down matrices) in the first
#   `first_k_dense_replace` layers; in every other layer a router (`n_routed_experts × hidden`),
#   `n_routed_experts` routed and `n_shared_experts` shared SwiGLU experts of width `moe_intermediate_size`.
#
# *Active* is what one token computes with: the output head in full, the input embedding not at all (a token reads
# one row of it; with `tie_word_embeddings` the one table is the head, and counts). This is DeepSeek's convention:
# its `README_WEIGHTS.md` lists 36.6B activated parameters "including 0.9B for the output Head", which the paper
# rounds to 37B. Norm weights are too small to matter. The checker builds
# `transformers`' `DeepseekV3ForCausalLM` from three configurations on PyTorch's meta device (shapes without
# memory), counts its parameters and accepts your counts within 0.1 %.

# %%
def my_param_counts(config):
    """(total, active) parameters of a DeepSeek-V3-style model."""
    # your code here
    raise NotImplementedError


# %%
attempt(check_param_counts, my_param_counts)  # prints what is wrong until the stub is filled in

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — count the matrices layer by layer; a token uses every one of them except the routed
# experts it is not sent to and the input embedding, so `active` swaps E routed experts a layer for
# num_experts_per_tok and leaves out the input table (unless it is the tied head).
def param_counts_solution(config):
    c, H, heads = config, config.hidden_size, config.num_attention_heads
    q_out = heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    q = H * q_out if c.q_lora_rank is None else H * c.q_lora_rank + c.q_lora_rank * q_out
    kv = H * (c.kv_lora_rank + c.qk_rope_head_dim)
    kv += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    attention = q + kv + heads * c.v_head_dim * H  # one layer's MLA
    expert = 3 * H * c.moe_intermediate_size  # one SwiGLU expert: gate, up, down
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    embeddings = c.vocab_size * H * (1 if c.tie_word_embeddings else 2)
    everyone = (embeddings + c.num_hidden_layers * attention
                + c.first_k_dense_replace * 3 * H * c.intermediate_size  # the dense FFNs
                + n_moe * (c.n_routed_experts * H + c.n_shared_experts * expert))  # routers, shared
    input_table = 0 if c.tie_word_embeddings else c.vocab_size * H
    return (everyone + n_moe * c.n_routed_experts * expert,
            everyone - input_table + n_moe * c.num_experts_per_tok * expert)


if transformers is not None:
    check_param_counts(param_counts_solution)
    ds_total, ds_active = param_counts_solution(DeepseekV3Config())
    ds_routed = (ds.num_hidden_layers - ds.first_k_dense_replace) * ds.n_routed_experts * 3 \
        * ds.hidden_size * ds.moe_intermediate_size
    print(f"DeepSeek-V3: {ds_total / 1e9:.1f}B total, {ds_active / 1e9:.1f}B active; "
          f"routed experts {ds_routed / 1e9:.0f}B of the total")
    assert round(ds_total / 1e9) == 671 and round(ds_active / 1e9, 1) == 36.6
    idle = ds_routed * (ds.n_routed_experts - ds.num_experts_per_tok) // ds.n_routed_experts
    assert round(ds_routed / 1e9) == 654 and round(idle / 1e9) == 633

# %% [markdown]
# The configuration gives 671.0B and 36.6B: DeepSeek's documented counts (the paper rounds the second to 37B), with
# the output head and the routers counted as active. Routed experts are 654B of the 671B, but a token is sent to 8
# of the 256 in each MoE layer, so 633B of the weights sit idle for any one token — memory follows the total, FLOPs
# the active count.

# %% tags=["hide-input"]
#| export overview.exercises
KIMI_LINEAR_FULL_LAYERS = [4, 8, 12, 16, 20, 24, 27]  # its MLA layers (config.json, from 1)


def _hybrid_cache_bytes(config, seq_len, cache_bytes=2, state_bytes=4):
    """One sequence's cache for a hybrid transformers config: per token, the full layers' K/V (GQA)
    or latent (MLA) in bf16; per linear layer, its recurrent state in fp32. Short-convolution caches
    are left out."""
    n_full = config.layer_types.count("full_attention")
    n_linear = config.layer_types.count("linear_attention")
    if getattr(config, "kv_lora_rank", None):  # Kimi Linear: MLA + KDA (K = V = linear_head_dim)
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
        state = config.linear_num_heads * config.linear_head_dim ** 2
    else:  # Qwen3-Next: gated GQA + Gated DeltaNet
        per_token = 2 * config.num_key_value_heads * config.head_dim
        state = (config.linear_num_value_heads * config.linear_key_head_dim
                 * config.linear_value_head_dim)
    return n_full * per_token * cache_bytes * seq_len + n_linear * state * state_bytes


def _kimi_linear_released():
    full = KIMI_LINEAR_FULL_LAYERS
    layout = dict(full_attn_layers=full, kda_layers=[i for i in range(1, 28) if i not in full])
    return _transformers().KimiLinearConfig(linear_attn_config=layout)


def check_cache_prediction(fn, seq_len=1 << 20, tol=0.1):
    """Check fn() -> (name of the hybrid with the smaller cache, cache(Kimi Linear) /
    cache(Qwen3-Next)) at `seq_len` tokens against the caches computed from transformers' configs;
    the ratio within `tol`."""
    kimi = _hybrid_cache_bytes(_kimi_linear_released(), seq_len)
    qwen = _hybrid_cache_bytes(_transformers().Qwen3NextConfig(), seq_len)
    truth = kimi / qwen
    try:
        got = fn()
    except NotImplementedError:
        raise ExerciseError("✗ cache prediction: not implemented yet — write down your prediction "
                            "and run the cell again") from None
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ExerciseError(f"✗ cache prediction: return (name, ratio), got {got!r}")
    name, ratio = got
    computed = (f"computed from the configs at {seq_len:,} tokens: "
                f"Kimi Linear {kimi / 2**30:.2f} GiB, Qwen3-Next {qwen / 2**30:.2f} GiB, "
                f"ratio {truth:.3f}")
    hint = ("\nHint: a full layer caches kv_lora_rank + qk_rope_head_dim numbers a token (MLA) or "
            "2 × num_key_value_heads × head_dim (GQA); count each model's full layers; at this "
            "length the linear layers' constant states are small beside the per-token cache")
    key = str(name).lower()
    if ("kimi" in key) == ("qwen" in key):
        raise ExerciseError("✗ cache prediction: name one model, 'Kimi Linear' or 'Qwen3-Next'; "
                            f"got {name!r}")
    if ("kimi" in key) != (kimi < qwen):
        raise ExerciseError(f"✗ cache prediction: {name} does not keep the smaller cache; "
                            f"{computed}" + hint)
    value = as_number(ratio)  # None for a non-number
    if value is None or not abs(value / truth - 1) <= tol:  # NaN fails too
        raise ExerciseError(f"✗ cache prediction: ratio {ratio!r} is not within {tol:.0%} of the "
                            f"computed one; {computed}" + hint)
    print(f"✓ cache prediction: {name} keeps the smaller cache; your ratio {value:.3f} is within "
          f"{tol:.0%} of the computed {truth:.3f}")


# %% [markdown]
# ### Exercise 2 (predict): which hybrid caches less at 1M tokens?
#
# Qwen3-Next-80B-A3B and Kimi Linear are both about 3 : 1 hybrids, and both aim at long contexts (262K native for
# Qwen3-Next, tested to 1M for Kimi Linear). Their attention, from their configurations:
#
# | | layers | full-attention layers cache, per token | linear layers keep, per layer |
# |---|---|---|---|
# | Qwen3-Next-80B-A3B | 48: 12 gated attention + 36 Gated DeltaNet | keys and values of 2 KV heads × 256 dims | 32 states of 128 × 128 |
# | Kimi Linear 48B-A3B (released) | 27: 7 MLA + 20 KDA | a 512-dim latent + a 64-dim key part (unrotated: Kimi Linear's MLA uses no RoPE) | 32 states of 128 × 128 |
#
# Before writing any code, predict: which of the two keeps the smaller cache for one sequence of $2^{20}$ tokens
# (cache in bf16, states in fp32), and what is the ratio cache(Kimi Linear) / cache(Qwen3-Next)? Return
# `("Kimi Linear" or "Qwen3-Next", ratio)`. The checker computes both caches from `transformers`' configurations
# (Kimi Linear with its released layout, §0.6) and accepts a ratio within 10 %.

# %%
def my_cache_prediction():
    """(the model with the smaller cache at 1M tokens, cache(Kimi Linear) / cache(Qwen3-Next))."""
    # your prediction here, e.g. return ("Qwen3-Next", 1.5)
    raise NotImplementedError


# %%
attempt(check_cache_prediction, my_cache_prediction)  # prints what is wrong until you predict

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — at 1M tokens the per-token cache dominates: the 36 or 20 linear states are 75 MB and
# 42 MB, against gigabytes of cache. Per token, Kimi Linear's 7 MLA layers keep 7 × 576 numbers,
# Qwen3-Next's 12 GQA layers 12 × 2 × 2 × 256: fewer full layers, and a latent smaller than even two
# KV heads of 256 dims.
def cache_prediction_solution():
    return "Kimi Linear", (7 * 576) / (12 * 2 * 2 * 256)


if transformers is not None:
    check_cache_prediction(cache_prediction_solution)
# The two caches at 2^20 tokens, for the text below: per-token cache (bf16) + fp32 linear states
kimi_gib = (7 * 576 * 2 * 2**20 + 20 * 32 * 128 * 128 * 4) / 2**30
qwen_gib = (12 * 2 * 2 * 256 * 2 * 2**20 + 36 * 32 * 128 * 128 * 4) / 2**30
assert round(kimi_gib, 1) == 7.9 and round(qwen_gib) == 24

# %% [markdown]
# Kimi Linear keeps a third of Qwen3-Next's cache: 7.9 GiB against 24 GiB for a million tokens. Two choices
# compound — fewer full layers (7 of 27 against 12 of 48) and MLA's 576 numbers a token against 1 024 for two
# 256-dimensional KV heads. The linear layers, the part the two models are named for, hardly matter at this
# length.

# %% tags=["hide-input"]
#| export overview.exercises
MOBA_GATE_PAIRS = 0.5  # a gate score q·k̄ is 2D FLOPs: half a query-key pair of full attention


def _moba_pairs(seq_len, block, top_k):
    """MoBA's prefill cost in pairs of full attention, from the keys each query reads."""
    total = 0.0
    for t in range(seq_len):  # the query's position, from 0
        own = t // block  # its own block, read causally: keys own*block .. t
        earlier = list(range(own))  # the complete earlier blocks: the gate's candidates
        chosen = earlier[len(earlier) - min(top_k - 1, len(earlier)):]  # which: count is the same
        keys = np.zeros(seq_len, dtype=bool)
        for b in chosen:
            keys[b * block:(b + 1) * block] = True
        keys[own * block:t + 1] = True
        total += keys.sum() + MOBA_GATE_PAIRS * len(earlier)
    return total


def check_moba_cost(fn):
    """Check fn(seq_len, block, top_k) -> float, MoBA's prefill cost in pairs of full attention,
    against a query-by-query count, on odd lengths and in the limits (top_k covering every block;
    blocks of one token)."""
    cases = [(1, 4, 2), (10, 4, 2), (13, 4, 2), (257, 16, 3), (1000, 64, 4), (1000, 64, 100),
             (777, 1, 5), (3001, 100, 3), (2048, 512, 1)]
    check("MoBA's cost in pairs", fn, _moba_pairs, cases, tol=1e-9,
          hint="count one query t at a time: how many keys of its own block come up to t, how "
               "many complete blocks lie before it, and how many of those can it read (fewer than "
               "top_k - 1 early on)? The gate's scores count too, for every earlier block")


# %% [markdown]
# ### Exercise 3 (extend): add MoBA to the cost model
#
# MoBA (chapter 7) splits the keys into blocks of `block` tokens. A query always reads its own block, causally (the
# keys up to itself), and, of the complete earlier blocks, the `top_k − 1` that a gate scores highest. The gate
# scores every complete earlier block by the query's dot product with the block's mean key: $2D$ FLOPs, half a
# pair of full attention. Extend §0.5's cost model: write `my_moba_cost(seq_len, block, top_k)`, the prefill cost
# of one layer in pairs of full attention, as a float (pooling the keys is $O(T)$; leave it out).
#
# Two limits tell you whether it is right before the checker does: when `top_k` covers every block, MoBA reads
# what full attention reads, $T(T+1)/2$ pairs, plus its gate; with `top_k = 1` a query reads its own block only.
# The checker compares with a query-by-query count of the keys each query reads.

# %%
def my_moba_cost(seq_len, block, top_k):
    """MoBA's prefill cost of one layer, in query-key pairs of full attention (a float)."""
    # your code here
    raise NotImplementedError


# %%
attempt(check_moba_cost, my_moba_cost)  # prints what is wrong until the stub is filled in

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — query t (from 0) sits in block t // block: it reads the (t mod block) + 1 keys of that
# block up to itself, min(top_k - 1, t // block) whole earlier blocks, and scores all t // block
# earlier blocks at ½ pair each.
def moba_cost_solution(seq_len, block, top_k):
    t = np.arange(seq_len)
    earlier = t // block
    keys = t % block + 1 + np.minimum(top_k - 1, earlier) * block
    return float(keys.sum() + 0.5 * earlier.sum())


check_moba_cost(moba_cost_solution)
# top_k covering every block: full attention plus the gate
assert moba_cost_solution(4096, 64, 64) == full_cost(4096) + 0.5 * 64 * np.arange(64).sum()
moba_128k = moba_cost_solution(T128, 512, 4) / full_cost(T128)  # 2048 keys a query, as DSA's top-k
print(f"at 128K with 2048 keys a query: MoBA (blocks of 512, top 4) {moba_128k:.3f} of full "
      f"attention, DSA {dsa_128k:.3f}")
assert 0.025 < moba_128k < 0.03

# %% [markdown]
# With the same budget of 2048 keys a query, MoBA's gate scores 512 times fewer candidates than DSA's indexer, so
# at 128K MoBA costs under 3 % of full attention and DSA about 9 %. What DSA buys with the difference is resolution:
# it picks single tokens where MoBA picks blocks of 512. Chapters 7 and 8 build both and show what each attends to.

# %% [markdown]
# ## Summary
#
# - Open LLMs are sparse in two places: **experts** (in the 2025–26 flagships a token computes with 3–10 % of the
#   weights) and **attention** (a token reads a few earlier tokens, a fixed-size state, or both).
# - Attention sparsity comes in three forms: **select** (DSA, NSA, MoBA: $O(T\cdot k)$), **recur** (lightning,
#   Gated DeltaNet, KDA: $O(T)$ time, constant state), and **mix** (3:1 and 7:1 hybrids). MLA is not sparse but
#   shrinks the cache, and DSA builds on it.
# - The 2025–26 models split into four routes: hybrid linear/full (Qwen3.5, Kimi Linear), mostly linear
#   (MiniMax-M1), sparse selection (DeepSeek V3.2, GLM-5) and full attention (MiniMax-M2).
# - Hybrids stay quadratic: at long context a 3:1 stack costs ¼ of full attention, a 7:1 stack ⅛. Their bigger win
#   is the cache. DSA's attention is linear in $T$ past $k$, but its indexer is not; at 128K indexer and attention
#   together cost about a tenth of full attention in this book's FLOP model with MLA's absorbed form, about 0.3
#   against V3.1's expanded-form prefill. The survey's "about 50 %" for DSA is its own figure, with no statement of
#   what it measures.
# - Per token of context, MHA at DeepSeek-V3's shape caches 3.8 MiB, MLA 69 KiB (57× less), a 3:1 MLA hybrid
#   17 KiB plus constant states that pay off after about 7 000 tokens.
# - Check claims against checkpoints: two of the survey's rows (Kimi K2.5's KDA, M2.5's lightning attention) do
#   not match what `transformers` ships, and `KimiLinearConfig()`'s bare default is not the released layer
#   layout (7 MLA layers at 4, 8, …, 24, 27), which this book uses.
#
# Next, chapter 1 builds the baseline every other chapter is measured against: softmax attention, its KV cache,
# and flash attention in Triton.
#
# ## References
#
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix *The seed survey*. The chapters check its figures against the models' configs and papers and say so where they disagree.
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
# - Moonshot AI. `config.json` of
#   [moonshotai/Kimi-Linear-48B-A3B-Instruct](https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct)
#   (`linear_attn_config`: the released layer layout of §0.6).
# - `transformers` 5.x configuration classes `DeepseekV3Config`, `DeepseekV32Config`, `Qwen3NextConfig`,
#   `KimiLinearConfig`, `Kimi_K25Config`, `MiniMaxM2Config` (the checks of §0.6), and `DeepseekV3ForCausalLM`
#   (the parameter count of exercise 1).
