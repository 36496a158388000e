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
# # Chapter 8 — DeepSeek Sparse Attention
#
# DeepSeek-V3.2 differs from DeepSeek-V3.1 in one place only: its attention. A small **lightning indexer** scores
# every past token for each query, the **top-k** tokens (k = 2,048) are kept, and chapter 3's MLA attends to those
# alone. GLM-5 took the same design. Chapter 7's NSA chose *blocks* from block summaries; DSA chooses single
# *tokens*, with a scorer of its own that is trained to imitate the dense attention it replaces. The attention
# proper falls from $O(T^2)$ to $O(T k)$; the indexer stays $O(T^2)$, only much cheaper — so where DSA pays off,
# and by how much, is a calculation this chapter makes you able to do.
#
# **You will learn to**
#
# - write the indexer's scores, the top-k selection and attention over selected tokens, in the usual
#   `[B, T, H, D]` form and in MLA's latent form, and check them against fla, transformers and the dense limit;
# - train an indexer by distillation (the V3.2 report's warm-up: KL from the dense attention to the indexer)
#   and watch the top-k capture more of the attention mass;
# - count what DSA costs against dense MLA in prefill and decoding, per token as a function of position, and
#   say why the number of attention heads decides whether it pays off;
# - build `DSAttention`, DSA on chapter 3's `MLA`, load DeepSeek-V3.2's attention from transformers, and decode
#   token by token with a cache.
#
# **Prerequisites**: chapter 1 (softmax attention, GQA), chapter 3 (MLA's latent cache and absorbed form),
# chapter 7 (NSA: the idea of choosing what to read); top-k from chapter 2. KL divergence (one line of it).
# **Time**: about 1.5 hours for the core path, plus the exercises.
#
# **Roadmap**
#
# - 8.1 *Why*: attention over 2,048 chosen tokens; 8.2 *Naive*: indexer, top-k, sparse attention, `dsa`;
# - 8.3 *See it*: the selected tokens beside NSA's blocks, the data flow; 8.4 *The layer*: `LightningIndexer`,
#   `DSAttention`, loaded from transformers, decoding with a cache;
# - 8.5 *Training the indexer*: warm-up by KL, recall of the attention mass against k, an explorer, sparse
#   training; 8.6 *Cost model*: prefill and decoding at DeepSeek-V3.2's shapes, FP8, the head count;
# - 8.7 *Fast*: gather instead of mask, top-k without the score matrix, the kernels; 8.8 *Measure*;
#   8.9 *Exercises*;
# - then a summary, references and the engineering notes (argument checks, transformers loaders, checkers).
#
# Layout `[B, T, H, D]` as everywhere. **[S]** is the seed survey (see References).

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

from minisparse import runtime, viz
from minisparse.attention import attention_ref
from minisparse.testing import assert_close, make_qkv

torch.manual_seed(0)
DEVICE = runtime.device()

# %% [markdown]
# ## 8.1 Why: attention over 2,048 chosen tokens
#
# Chapter 3 made MLA's cache small: 576 numbers a token. It did not make attention *shorter*: at position $t$ a
# query still scores all $t$ cached tokens, so a 128K-token prefill does $\sum_t t \approx T^2/2$ pair products
# per head, and every decoding step reads the whole cache. DSA keeps MLA and puts a cheap filter in front of it.
# For query token $t$ and an earlier token $s$ the **lightning indexer** computes an index score
#
# $$
# I_{t,s} = \sum_{j=1}^{H^I} w_{t,j}\, \operatorname{ReLU}\bigl(q^I_{t,j} \cdot k^I_s\bigr) ,
# $$
#
# with $H^I$ = 64 small heads of $d^I$ = 128 dimensions, query vectors $q^I_{t,j}$ and weights $w_{t,j}$ computed
# from token $t$, and **one** key $k^I_s$ a token shared by all indexer heads (MQA). Then
#
# $$
# S_t = \operatorname{top-}k_{\,s \le t}\, I_{t,s}, \qquad
# u_t = \operatorname{Attn}\bigl(h_t,\; \{ c_s : s \in S_t \}\bigr) ,
# $$
#
# attention over the $k$ selected cache entries $c_s$ only, the same set for all 128 query heads. Three choices
# make the indexer cheap: few heads, ReLU instead of a softmax (no normalisation over $s$, so scores can be
# computed block by block and compared), and FP8 arithmetic in production. It is still a pass over *every*
# past token for every query — $O(T^2)$ — but at $64 \times 128$ multiply-adds a pair against MLA's $128 \times
# 320$, a fifth of the dense work (section 8.6 makes this precise).
#
# Two differences from NSA (chapter 7) matter. NSA picks *blocks* from their summaries, so selection and
# attention share one mechanism; DSA's indexer is a separate, small network that picks *single tokens* and is
# trained to imitate the dense attention (section 8.5). And DSA was not trained sparse from scratch: DeepSeek
# started from V3.1's dense checkpoint, warmed the indexer up with the main model frozen, then trained everything
# sparse. The survey [S] puts it this way: DSA is V3.2's only architectural change over V3.1, brings attention
# from $O(L^2)$ to $O(Lk)$ and saves about 50 % of the compute at 128K; GLM-5 adopted it on top of MLA.

# %% [markdown]
# ## 8.2 Naive: indexer, top-k, sparse attention
#
# Every op of this section is plain PyTorch in fp32, the spec that tests and kernels are held to. The shapes:
#
# - indexer: `q_idx [B, Tq, HI, DI]`, `k_idx [B, Tk, DI]` (one key a token), `w_idx [B, Tq, HI]`;
# - selection: `indices [B, Tq, topk]` int64, one row a query shared by all heads, `-1` where a query has fewer
#   than `topk` past tokens;
# - attention: `q [B, Tq, HQ, D]`, `k [B, Tk, H, D]`, `v [B, Tk, H, Dv]`, H dividing HQ.
#
# Queries may be the **last** $T_q \le T_k$ positions: query $i$ sits at position $T_k - T_q + i$, so a
# decoding step is the same call with $T_q = 1$. MLA's latent form is not a separate case: it is MQA with
# $H = 1$, keys of 576 numbers (the 512-number latent $c_s$ and the 64-number rotary key) and values of 512,
# the first 512 numbers of the same key row — `k [B, Tk, 1, 576]`, `v = k[..., :512]` (a view, no copy).
# The argument checks (shapes, `topk`, indices in range and not in the future, no duplicates) live in
# `minisparse.dsa.checks`, listed in the engineering notes.

# %%
#| export dsa.naive
import importlib.util

import torch
import torch.nn.functional as F

from minisparse import _checks
from minisparse.dsa.checks import (check_attention_args, check_indexer_args, check_indices,
                                   check_topk)


def causal_mask(TQ, TK, device=None):
    """[TQ, TK] bool: query i (at position TK − TQ + i) may read key s <= its position."""
    return torch.ones(TQ, TK, dtype=torch.bool, device=device).tril(TK - TQ)


def indexer_scores(q_idx, k_idx, w_idx=None, scale=None):
    """The lightning indexer's scores, -inf above the diagonal (fp32):

        I[t, s] = Σ_j w[t, j] · ReLU(scale · q_idx[t, j] · k_idx[s])   for s <= t


    q_idx [B, TQ, HI, DI], k_idx [B, TK, DI] (one key a token, shared by the HI heads), w_idx
    [B, TQ, HI] (None: weights 1) -> I [B, TQ, TK]; query i sits at position TK − TQ + i.
    scale defaults to DI ** -0.5 (positive, so it never changes the ranking).
    """
    op = "indexer_scores"
    B, TQ, HI, DI, TK = check_indexer_args(op, q_idx, k_idx, w_idx)
    scale = _checks.scale(op, scale, DI)
    w = torch.ones(B, TQ, HI, device=q_idx.device) if w_idx is None else w_idx.float()
    dots = torch.einsum("bthd,bsd->bths", q_idx.float(), k_idx.float())  # [B, TQ, HI, TK]
    s = torch.einsum("bth,bths->bts", w, F.relu(scale * dots))  # [B, TQ, TK] weighted head sum
    return s.masked_fill(~causal_mask(TQ, TK, q_idx.device), float("-inf"))


def select_topk(scores, topk):
    """The `topk` highest-scoring keys of each query: indices [B, TQ, topk] int64, best first;
    -1 fills the slots of a query that sees fewer than `topk` keys (-inf scores are never kept).

    scores [B, TQ, TK] as from indexer_scores. Ties are broken by torch.topk (any order).
    """
    op = "select_topk"
    K = check_topk(op, topk)
    _checks.tensor(op, "scores", scores, "[B, TQ, TK]")
    _checks.value_range(op, "scores", scores)  # NaN would make the choice arbitrary
    best, idx = scores.topk(min(K, scores.shape[-1]), dim=-1)  # [B, TQ, min(K, TK)]
    idx = idx.masked_fill(best == float("-inf"), -1)  # future keys are not choices
    return F.pad(idx, (0, K - idx.shape[-1]), value=-1)  # [B, TQ, K]


def selection_mask(indices, TK):
    """indices [B, TQ, K] (-1 = nothing) -> bool [B, TQ, TK]: key s is among the query's choices."""
    B, TQ, _ = indices.shape
    onehot = torch.zeros(B, TQ, TK + 1, dtype=torch.bool, device=indices.device)
    onehot.scatter_(-1, indices.long().masked_fill(indices < 0, TK), True)  # -1 -> slot TK
    return onehot[..., :TK]

# %% [markdown]
# Attention over the selected tokens is softmax attention under a mask: key $s$ is read when it is among the
# query's indices (and, as a guard, not after the query). All heads share the selection; a GQA group of
# $G = H_Q / H$ query heads reads one key head. `backend` is the dispatch point for the kernels of section 8.7:
# `"auto"` runs them on a GPU (or on CPU under Triton's interpreter) once `minisparse.dsa.triton` exists, the
# PyTorch code below otherwise; `"naive"` always runs the PyTorch code.

# %%
#| export dsa.naive
def sparse_attention(q, k, v, indices, scale=None, backend="auto"):
    """Softmax attention of each query over its selected keys only; the selection is shared by all
    heads.

        o[t, h] = Σ_{s ∈ S_t} softmax_s(scale · q[t, h] · k[s, h // G]) · v[s, h // G]

    q [B, TQ, HQ, D], k [B, TK, H, D], v [B, TK, H, Dv] (H divides HQ, G = HQ / H), indices
    [B, TQ, K] int (-1 = padding; each entry a distinct key <= the query's position TK − TQ + i)
    -> o [B, TQ, HQ, Dv] in q's dtype; a query with no key gets 0. MLA's latent form: k [B, TK, 1,
    576], v = k[..., :512]. scale defaults to D ** -0.5 (MLA passes its own). With every past key
    selected (topk >= TK) it is causal attention.
    """
    op = "sparse_attention"
    B, TQ, TK, HQ, H, D, DV = check_attention_args(op, q, k, v)
    if _use_triton(op, backend, q):
        return _sparse_attention_triton(q, k, v, indices, scale)
    check_indices(op, indices, B, TQ, TK, naive=True)
    scale = _checks.scale(op, scale, D)
    keep = selection_mask(indices, TK) & causal_mask(TQ, TK, q.device)  # [B, TQ, TK]
    qg = q.float().view(B, TQ, H, HQ // H, D)  # [B, TQ, H, G, D]: a group reads one key head
    s = torch.einsum("bthgd,bshd->bthgs", qg, k.float()) * scale  # [B, TQ, H, G, TK]
    s = s.masked_fill(~keep[:, :, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing selected: 0
    o = torch.einsum("bthgs,bshe->bthge", p, v.float())  # [B, TQ, H, G, Dv]
    return o.reshape(B, TQ, HQ, DV).to(q.dtype)


def dsa(q, k, v, q_idx, k_idx, w_idx, topk=2048, scale=None, return_indices=False,
        backend="auto"):
    """DeepSeek Sparse Attention: the indexer's top-k keys, then sparse_attention over them.

    q, k, v as sparse_attention; q_idx [B, TQ, HI, DI], k_idx [B, TK, DI], w_idx [B, TQ, HI] (or
    None) as indexer_scores (its scale: DI ** -0.5). Returns o [B, TQ, HQ, Dv] (and indices [B, TQ,
    topk] int64, -1 padded, when return_indices). The selection is not differentiable: gradients
    reach q, k, v, never the indexer (section 8.5 trains it by its own loss).
    """
    K = check_topk("dsa", topk)
    with torch.no_grad():
        if _use_triton("dsa", backend, q_idx):
            from minisparse.dsa.triton import lightning_indexer
            if w_idx is None:  # the kernel takes explicit weights
                w_idx = q_idx.new_ones(q_idx.shape[:3], dtype=torch.float32)
            indices = lightning_indexer(q_idx, k_idx, w_idx, K)
        else:
            indices = select_topk(indexer_scores(q_idx, k_idx, w_idx), K)
    o = sparse_attention(q, k, v, indices, scale, backend)
    return (o, indices) if return_indices else o


def _use_triton(op, backend, x):
    """The dispatch rule: "naive" never; "triton" always (an error if the kernels are missing);
    "auto" when minisparse.dsa.triton exists and _checks.choose_backend picks Triton for x."""
    backend = _checks.backend(op, backend)
    if backend == "naive":
        return False
    have = importlib.util.find_spec("minisparse.dsa.triton") is not None
    if backend == "triton" and not have:
        raise RuntimeError(f"{op}: backend='triton' needs minisparse.dsa.triton, which this "
                           "installation lacks; use backend='naive'")
    return have and _checks.choose_backend(backend, x) == "triton"


def _sparse_attention_triton(q, k, v, indices, scale):
    """The kernels' entry point (section 8.7): same arguments and result as sparse_attention."""
    from minisparse.dsa.triton import sparse_attention_triton
    return sparse_attention_triton(q, k, v, indices, scale)

# %% [markdown]
# The limits first. With `topk` at least the number of keys every past token is selected and DSA *is* causal
# attention — chapter 1's `attention_ref` and PyTorch's SDPA; in the latent form too, where it must equal
# chapter 3's absorbed MLA. And the three ops agree with fla's reference functions (`naive_dsa_indexer` with
# ReLU, `naive_dsa`): the same selected sets (up to ties) and the same outputs.

# %%
B, T, HQ, H, D = 2, 45, 8, 2, 16
q, k, v = make_qkv(B, T, HQ, D, HKV=H, seed=1)
g = torch.Generator().manual_seed(2)
q_idx, k_idx = torch.randn(B, T, 4, 8, generator=g), torch.randn(B, T, 8, generator=g)
w_idx = torch.randn(B, T, 4, generator=g)

every = dsa(q, k, v, q_idx, k_idx, w_idx, topk=T, backend="naive")
sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      is_causal=True, enable_gqa=True).transpose(1, 2)
assert_close("topk >= T = attention_ref", attention_ref(q, k, v), every, 1e-5)
assert_close("topk >= T = SDPA", sdpa, every, 1e-5)

from minisparse.mla import mla_attention_absorbed  # chapter 3: MQA over the latent cache

q_lat, q_rope = torch.randn(1, 20, 4, 32, generator=g), torch.randn(1, 20, 4, 8, generator=g)
c_kv, k_rope = torch.randn(1, 20, 32, generator=g), torch.randn(1, 20, 8, generator=g)
kl = torch.cat([c_kv, k_rope], -1)[:, :, None]  # [1, 20, 1, 40]: the latent key row
all_idx = torch.arange(20).expand(1, 20, 20)  # every key; future ones are masked
assert_close("latent form = absorbed MLA",
             mla_attention_absorbed(q_lat, q_rope, c_kv, k_rope, 0.2),
             sparse_attention(torch.cat([q_lat, q_rope], -1), kl, kl[..., :32],
                              all_idx.where(all_idx <= torch.arange(20)[:, None], -1), 0.2,
                              backend="naive"), 1e-5)

# %% tags=["nbval-ignore-output"]
o, idx = dsa(q, k, v, q_idx, k_idx, w_idx, topk=8, return_indices=True, backend="naive")
print("query 44 reads", sorted(idx[0, 44].tolist()), "; query 3 reads", idx[0, 3].tolist())
try:
    import warnings

    with warnings.catch_warnings():  # fla warns that Triton has no GPU here, naming its own path
        warnings.simplefilter("ignore")
        from fla.ops.dsa.naive import naive_dsa, naive_dsa_indexer
except ImportError:
    print("fla-core is not installed: the comparison with its references is skipped")
else:
    theirs = naive_dsa_indexer(q_idx, k_idx, w_idx, 8, activation="relu")
    as_set = lambda x: x.masked_fill(x < 0, 10**6).sort(-1).values  # noqa: E731
    assert torch.equal(as_set(idx), as_set(theirs))
    assert_close("dsa vs fla naive_dsa", naive_dsa(q, k, v, q_idx, k_idx, w_idx, topk=8), o, 1e-5)

# %% [markdown]
# Query 3 sees four tokens and keeps them all; its other four slots are `-1`. Nothing else pads: from position 7
# on every query reads exactly 8 tokens, however long the sequence.
#
# ## 8.3 See it
#
# ### Which tokens a query reads
#
# Below, one sequence of $T = 128$ whose keys carry a few "hot" tokens that every query likes (as in chapter 7).
# Left, the causal mask dense attention reads; middle, DSA's selection at $k = 16$ tokens a query, by an indexer
# that sees the same keys; right, NSA's selection from chapter 7 with the same budget (blocks of 8, $n = 2$ free
# blocks beside the first, own and previous one, so 5 blocks = 40 tokens at most).

# %%
from minisparse.nsa import mean_pool, select_blocks, selection_mask as nsa_mask


def hot_sequence(T=128, HQ=4, D=16, hot=(20, 21, 60, 97), seed=0):
    """q, k [1, T, *, D] with a few hot keys: every query's dot product with them is large."""
    q, k, _ = make_qkv(1, T, HQ, D, HKV=1, seed=seed)
    lean = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    q = q + 0.6 * lean  # every query leans one way ...
    k[:, list(hot)] += 3.0 * lean  # ... and a few keys point there
    return q, k


q_hot, k_hot = hot_sequence()
T_hot = q_hot.shape[1]
# the indexer here: the 4 query heads as indexer heads, the one key head as the indexer key
dsa_idx = select_topk(indexer_scores(q_hot, k_hot[:, :, 0]), 16)  # [1, 128, 16]
nsa_idx = select_blocks(q_hot, mean_pool(k_hot, 8), block_counts=5, block_size=8)  # [1, T, 1, 5]
causal = causal_mask(T_hot, T_hot)
fig = viz.mask_panel({"dense: every past token": causal,
                      "DSA: top-16 tokens": selection_mask(dsa_idx, T_hot)[0] & causal,
                      "NSA: 5 blocks of 8": nsa_mask(nsa_idx, T_hot, 8)[0, :, 0]}, size=2.8,
                     suptitle="What each query reads (T = 128; rows: queries, columns: keys)")

# %% [markdown]
# DSA's choices are single columns: the hot tokens 20, 21, 60 and 97 for every query that can see them, and
# otherwise whatever the indexer ranks next — a scatter, with no block structure and no forced local window.
# NSA reads whole blocks, with the diagonal band of its own and previous block. The budget per row is fixed in
# both; DSA spends all of it on tokens the scorer chose, NSA spends part on locality it assumes.
#
# ### The data flow
#
# In DeepSeek-V3.2 the indexer reads the same inputs as MLA: its queries come from MLA's low-rank query latent
# ($W^{DQ} x$, normalised: `q_resid` in transformers), its key and weights from the token's hidden state. Its
# key cache (128 numbers a token, FP8 in production) sits beside MLA's latent cache (576 a token). The sparse
# attention runs in MLA's absorbed MQA form: all 128 heads share one gathered 576-number key row a token, of which
# the first 512 numbers are also the value.

# %%
B_ = viz.Box
boxes = {
    "x": B_(0, 1.6, "hidden x", note="[B,T,7168]"),
    "qlat": B_(2.4, 2.9, "q latent\nRMSNorm(W_DQ x)", w=1.9, note="[B,T,1536]"),
    "idx": B_(5.2, 2.9, "lightning indexer\n64 heads × 128, FP8", w=2.1),
    "top": B_(8.0, 2.9, "top-k\n(k = 2048)", note="indices [B,T,k]"),
    "ikc": B_(5.2, 1.6, "indexer key cache", w=1.8, note="128 a token"),
    "mla": B_(2.4, 0.4, "MLA projections\n(chapter 3)", w=1.9),
    "lat": B_(5.2, -0.6, "latent cache\nc | k_rope", w=1.8, note="576 a token"),
    "sp": B_(8.0, 0.7, "sparse MLA\n(MQA, 128 heads)", w=1.9, note="gathers k rows"),
    "out": B_(10.4, 0.7, "o_proj"),
}
arrows = [("x", "qlat"), ("qlat", "idx", "$q^I$, $w$"), ("x", "ikc", "$k^I$"), ("ikc", "idx"),
          ("idx", "top", "I[t, s]"), ("top", "sp"), ("x", "mla"), ("qlat", "mla"), ("mla", "lat"),
          ("lat", "sp"), ("mla", "sp", "q̃, q_rope"), ("sp", "out")]
fig = viz.schematic(boxes, arrows, groups=[(["idx", "top"], "Triton: lightning_indexer"),
                                           (["sp"], "Triton: sparse_attention")],
                    title="DSA on MLA: the indexer chooses, MLA attends to the chosen",
                    size=(11, 4.4))

# %% [markdown]
# ## 8.4 The layer
#
# `LightningIndexer` holds the indexer's four parameters under transformers' names: `wq_b` maps MLA's query latent
# to $H^I$ query heads, `wk` the hidden state to the one index key (then a LayerNorm, `k_norm`), `weights_proj`
# the hidden state to the $H^I$ weights (times $(H^I)^{-1/2}$). RoPE rotates the first `qk_rope_head_dim` numbers
# of each index query and key — in half-split layout for DeepSeek-V3.2, interleaved for GLM-5, which is the one
# difference between the two indexers. `forward` returns the selection and the scores (the scores are what the
# warm-up trains).
#
# `DSAttention` is chapter 3's `MLA` with an indexer: the same projections and latent cache, the indexer reading
# the query latent $\mathrm{RMSNorm}(W^{DQ} x)$ and $x$, and the attention run by `sparse_attention` in the
# absorbed (latent MQA) form. The indexer's inputs are **detached**: the V3.2 report trains the indexer by its own
# loss only, and the main model by the language-model loss only (and the top-k passes no gradient anyway). A
# `DSACache` adds the index keys (`index_head_dim` a token) beside MLA's 576-number latents.

# %%
#| export dsa.layer
import torch
from torch import nn

from minisparse import _checks
from minisparse.dsa.naive import causal_mask, indexer_scores, select_topk, sparse_attention
from minisparse.dsa.checks import check_topk
from minisparse.mla.layer import MLA
from minisparse.mla.naive import MLACache, absorb_output, absorb_query, make_mla_rope


class LightningIndexer(nn.Module):
    """The lightning indexer of DeepSeek-V3.2 / GLM-5 (transformers' DeepseekV32Indexer and
    GlmMoeDsaIndexer parameters: wq_b, wk, k_norm, weights_proj).

    forward(x [B, T, hidden], q_latent [B, T, q_lora_rank], position_embeddings=None,
    positions=None) -> (indices [B, T, topk] int64, -1 padded; scores [B, T, T] fp32, -inf above
    the diagonal). position_embeddings: transformers' (cos, sin) [B, T, rope_dim], or None for the
    layer's own RoPE at `positions` (default 0 .. T-1). rope_interleave: False for DeepSeek-V3.2
    (half-split pairs), True for GLM-5.
    """

    def __init__(self, hidden_size, q_lora_rank, n_heads=64, head_dim=128, rope_dim=64,
                 topk=2048, *, rope_theta=10000.0, rope_interleave=False, rope_scaling=None,
                 norm_eps=1e-6):
        super().__init__()
        op = "LightningIndexer"
        for name, val in (("hidden_size", hidden_size), ("q_lora_rank", q_lora_rank),
                          ("n_heads", n_heads), ("head_dim", head_dim), ("rope_dim", rope_dim)):
            _checks.positive_int(op, name, val)
        if rope_dim % 2 or rope_dim > head_dim:
            raise ValueError(f"{op}: rope_dim must be even and <= head_dim = {head_dim}, got "
                             f"{rope_dim}")
        self.hidden_size, self.n_heads, self.head_dim, self.rope_dim = (hidden_size, n_heads,
                                                                        head_dim, rope_dim)
        self.topk, self.rope_interleave = check_topk(op, topk), rope_interleave
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)  # q latent -> heads
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)  # x -> the one index key
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)  # x -> w[t, j]
        self.rope = make_mla_rope(rope_dim, rope_theta, rope_interleave, rope_scaling)
        self.softmax_scale = head_dim ** -0.5

    def project(self, x, q_latent, positions, position_embeddings=None):
        """-> q_idx [B, T, HI, DI], k_idx [B, T, DI] (rotated), w_idx [B, T, HI] fp32."""
        B, T, _ = x.shape
        dr = self.rope_dim
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)  # [B, T, HI, DI]
        k = self.k_norm(self.wk(x))[:, :, None]  # [B, T, 1, DI]
        if position_embeddings is None:
            q_rot, k_rot = self.rope(q[..., :dr], positions), self.rope(k[..., :dr], positions)
        else:
            q_rot, k_rot = (_rotate_hf(t[..., :dr], *position_embeddings, self.rope_interleave)
                            for t in (q, k))
        q = torch.cat([q_rot, q[..., dr:]], dim=-1)  # rotary part first, as transformers
        k = torch.cat([k_rot, k[..., dr:]], dim=-1)[:, :, 0]  # [B, T, DI]
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, T, HI]
        return q, k, w

    def forward(self, x, q_latent, position_embeddings=None, positions=None):
        _checks.layer_input("LightningIndexer", x, self, "[B, T, hidden]", self.hidden_size)
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        q, k, w = self.project(x, q_latent, positions, position_embeddings)
        scores = indexer_scores(q, k, w, self.softmax_scale)  # [B, T, T]
        return select_topk(scores.detach(), self.topk), scores

    @classmethod
    def from_hf(cls, module):
        """From transformers' DeepseekV32Indexer or GlmMoeDsaIndexer (minisparse.dsa.hf)."""
        from minisparse.dsa.hf import indexer_from_hf
        return indexer_from_hf(module, cls=cls)


def _rotate_hf(t, cos, sin, interleaved):
    """RoPE from transformers' (cos, sin) [B, T, dr] (each frequency twice) on t [B, T, H, dr]."""
    cos, sin = cos[:, :, None].to(t.dtype), sin[:, :, None].to(t.dtype)
    if interleaved:  # pairs (0, 1), (2, 3), …; the result in half-split layout, as transformers
        c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    a, b = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-b, a], dim=-1) * sin


class DSACache(MLACache):
    """MLA's latent cache plus the indexer's keys: index_keys [B, max_len, index_dim].
    append(c_kv, k_rope, k_idx [B, t, index_dim]) -> (latent, rope, index keys) so far."""

    def __init__(self, batch, max_len, kv_lora_rank, rope_dim, index_dim, *,
                 dtype=torch.float32, device=None):
        super().__init__(batch, max_len, kv_lora_rank, rope_dim, dtype=dtype, device=device)
        self.index_keys = torch.zeros(batch, max_len, index_dim, dtype=dtype, device=device)

    def append(self, c_kv, k_rope, k_idx):
        start = self.length
        if k_idx.shape != (*c_kv.shape[:2], self.index_keys.shape[-1]):
            raise ValueError(f"DSACache.append: k_idx must be [B, t, index_dim] = "
                             f"{(*c_kv.shape[:2], self.index_keys.shape[-1])}, got "
                             f"{tuple(k_idx.shape)}")
        latent, rope = super().append(c_kv, k_rope)
        self.index_keys[:, start:self.length] = k_idx
        return latent, rope, self.index_keys[:, :self.length]

# %%
#| export dsa.layer
class DSAttention(MLA):
    """DeepSeek Sparse Attention on MLA (transformers' DeepseekV32Attention parameters: MLA's plus
    `indexer.*`).

    forward(x [B, T, hidden], cache=None, positions=None, sparse=True, return_indices=False) ->
    [B, T, hidden] (and indices [B, T, topk], scores [B, T, S] with return_indices). Each query
    attends, in MLA's absorbed form, to the index_topk tokens its indexer ranks highest
    (sparse=False: to all, the dense layer); with a cache (new_cache) the T tokens follow the
    cached ones, so token-by-token decoding gives the prefill's outputs. The indexer's inputs are
    detached.
    """

    def __init__(self, hidden_size, num_heads, *, q_lora_rank, index_n_heads=64,
                 index_head_dim=128, index_topk=2048, indexer_rope_interleave=False, **mla_kwargs):
        _checks.positive_int("DSAttention", "q_lora_rank (the indexer reads the query latent)",
                             q_lora_rank)
        super().__init__(hidden_size, num_heads, q_lora_rank=q_lora_rank, **mla_kwargs)
        self.indexer = LightningIndexer(
            hidden_size, q_lora_rank, index_n_heads, index_head_dim, self.qk_rope_head_dim,
            index_topk, rope_theta=mla_kwargs.get("rope_theta", 10000.0),
            rope_interleave=indexer_rope_interleave, rope_scaling=mla_kwargs.get("rope_scaling"))

    def forward(self, x, cache=None, positions=None, sparse=True, return_indices=False):
        _checks.layer_input("DSAttention", x, self, "[B, T, hidden]", self.hidden_size)
        B, T, _ = x.shape
        start = 0 if cache is None else len(cache)
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)  # [T]
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)  # chapter 3
        q_latent = self.q_a_layernorm(self.q_a_proj(x))  # [B, T, q_lora_rank]
        q_idx, k_idx, w_idx = self.indexer.project(x.detach(), q_latent.detach(), positions)
        if cache is not None:  # [B, S, ·] with S = start + T
            c_kv, k_rope, k_idx = cache.append(c_kv, k_rope, k_idx)
        scores = indexer_scores(q_idx, k_idx, w_idx, self.indexer.softmax_scale)  # [B, T, S]
        indices = select_topk(scores.detach(), self.indexer.topk if sparse else c_kv.shape[1])
        w_uk, w_uv = self.absorbed_weights()
        q = torch.cat([absorb_query(q_nope, w_uk), q_rope], dim=-1)  # [B, T, H, r + dr]
        k = torch.cat([c_kv, k_rope], dim=-1)[:, :, None]  # [B, S, 1, r + dr]: one row a token
        o = sparse_attention(q, k, k[..., :self.kv_lora_rank], indices, self.scaling, self.backend)
        o = self.o_proj(absorb_output(o, w_uv).reshape(B, T, -1))  # [B, T, hidden]
        return (o, indices, scores) if return_indices else o

    def attention_probs(self, x):
        """The dense attention's probabilities [B, T, H, T] (fp32, causal): the warm-up's target."""
        T = x.shape[1]
        q_nope, q_rope, c_kv, k_rope = self.project(x, torch.arange(T, device=x.device))
        q = torch.cat([absorb_query(q_nope, self.absorbed_weights()[0]), q_rope], dim=-1)
        s = torch.einsum("bthd,bsd->bths", q.float(), torch.cat([c_kv, k_rope], -1).float())
        s = s * self.scaling  # [B, T, H, T]
        return torch.softmax(s.masked_fill(~causal_mask(T, T, x.device)[:, None], -torch.inf), -1)

    def new_cache(self, batch, max_len, *, dtype=None, device=None):
        """An empty DSACache: r + dr latent numbers and index_head_dim index-key numbers a token."""
        w = self.kv_b_proj.weight
        return DSACache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim,
                        self.indexer.head_dim, dtype=dtype or w.dtype, device=device or w.device)

    @classmethod
    def from_hf(cls, module, backend="auto"):
        """From transformers' DeepseekV32Attention, weights copied (minisparse.dsa.hf)."""
        from minisparse.dsa.hf import dsa_from_hf
        return dsa_from_hf(module, backend, cls=cls)

# %% [markdown]
# Against transformers, on a tiny DeepSeek-V3.2 configuration with random weights (transformers' module turns
# the indexer's choice into an additive mask over the dense, expanded attention; ours gathers in the latent
# form): the same selected sets, the same outputs. Then the cache: decoding the same sequence one token at a
# time, each step a `sparse_attention` call with $T_q = 1$, gives the prefill's outputs.

# %% tags=["nbval-ignore-output"]
try:
    from transformers import DeepseekV32Config
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32
except ImportError:
    hf_v32 = None
    print("transformers is not installed: the comparison with DeepSeek-V3.2's modules is skipped")
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            index_n_heads=16, index_head_dim=16, index_topk=6, num_hidden_layers=1,
            attn_implementation="eager")


def tiny_hf_attention(seed=0):
    """transformers' DeepseekV32Attention at TINY, random weights, and its rotary embedding."""
    cfg = DeepseekV32Config(**TINY)
    torch.manual_seed(seed)
    hf = hf_v32.DeepseekV32Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return hf, hf_v32.DeepseekV32RotaryEmbedding(cfg)


if hf_v32 is not None:
    hf, rotary = tiny_hf_attention()
    layer = DSAttention.from_hf(hf, backend="naive")
    x = torch.randn(2, 14, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.full((14, 14), -torch.inf).triu(1)[None, None]  # additive causal mask
    with torch.no_grad():
        ref = hf(x, rotary(x, torch.arange(14)[None]), mask)[0]
        out, idx, _ = layer(x, return_indices=True)
    assert_close("DSAttention vs DeepseekV32Attention", ref, out, 1e-5)
    print("query 13's tokens:", sorted(idx[0, 13].tolist()))

# %%
if hf_v32 is not None:
    with torch.no_grad():
        cache = layer.new_cache(2, 14)
        steps = torch.cat([layer(x[:, t:t + 1], cache) for t in range(14)], dim=1)  # T_q = 1
    assert_close("decode token by token = prefill", out, steps, 1e-5)
    print(f"cache: {len(cache)} tokens × ({layer.kv_lora_rank} + {layer.qk_rope_head_dim} latent"
          f" + {layer.indexer.head_dim} index-key numbers)")

# %% [markdown]
# ## 8.5 Training the indexer
#
# A fresh indexer chooses at random. DeepSeek did not train V3.2 sparse from scratch; it started from V3.1's
# dense checkpoint and taught the indexer to imitate the dense attention first. For query $t$ the target is the
# dense attention summed over the $H$ heads and renormalised, $p_{t,:} = \sum_h P^h_{t,:} / H$, and the loss is
#
# $$
# \mathcal L^I = \sum_t D_{\mathrm{KL}}\bigl(p_{t,:} \,\big\|\, \operatorname{softmax}(I_{t,:})\bigr) .
# $$
#
# - **Dense warm-up**: the main model frozen and attending densely, only the indexer trains (1,000 steps of
#   16 sequences of 128K tokens in the report, learning rate $10^{-3}$).
# - **Sparse training**: top-k selection switched on, everything trains; the indexer's loss is restricted to
#   its selected set $S_t$ (both distributions renormalised there), and the indexer's inputs are detached, so
#   the main model learns from the language-model loss alone (15,000 steps, k = 2,048).
#
# `indexer_kl_loss` is that loss (with `indices`: the sparse-phase form); `attention_recall` measures what the
# selection is for: the share of the dense attention's mass that falls on the selected tokens.

# %%
#| export dsa.naive
def indexer_kl_loss(p_attn, scores, indices=None):
    """The indexer's distillation loss: mean over queries of KL(p_t ‖ softmax(I_t)), p_t the dense
    attention summed over heads and renormalised (a target: no gradient).

    p_attn [B, TQ, H, TK] attention probabilities, scores [B, TQ, TK] (indexer_scores); with indices
    [B, TQ, K] (sparse training) both distributions are restricted to each query's selected keys.
    Returns a scalar fp32 tensor.
    """
    B, TQ, _, TK = p_attn.shape
    keep = causal_mask(TQ, TK, scores.device).expand(B, TQ, TK)  # [B, TQ, TK]
    if indices is not None:
        keep = keep & selection_mask(indices, TK)
    target = p_attn.detach().float().sum(2).masked_fill(~keep, 0.0)  # [B, TQ, TK]
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    log_q = torch.log_softmax(scores.float().masked_fill(~keep, float("-inf")), dim=-1)
    kl = torch.xlogy(target, target) - target * log_q.masked_fill(~keep, 0.0)  # 0 · log 0 = 0
    return kl.sum(-1).mean()


def attention_recall(p_attn, indices):
    """The share of the head-summed dense attention mass on the selected keys, per query [B, TQ].
    p_attn [B, TQ, H, TK], indices [B, TQ, K]."""
    p = p_attn.detach().float().sum(2)  # [B, TQ, TK]
    p = p / p.sum(-1, keepdim=True)
    return (p * selection_mask(indices, p.shape[-1])).sum(-1)

# %% [markdown]
# At reading size: one `DSAttention` layer (hidden 64, 4 heads, an indexer of 4 heads × 16, k = 8) over sequences
# of $T = 64$ tokens drawn from a vocabulary of 64 random embeddings. Its main weights are random but scaled up, so
# its dense attention is peaked, as a trained model's is; that attention is what the indexer must learn to
# predict. Recall is measured on held-out sequences, over queries that see more than 16 tokens (before that, top-8
# of few tokens is easy), against the best any selection of 8 could do — the top-8 of $p_t$ itself.

# %%
torch.manual_seed(0)
V_SIZE, T_TRAIN, HIDDEN = 64, 64, 64
student = DSAttention(HIDDEN, 4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16,
                      index_topk=8, backend="naive")
with torch.no_grad():  # a peaked dense attention, as a trained model's
    for name, p in student.named_parameters():
        if not name.startswith("indexer.") and p.dim() == 2:
            p.mul_(2.5)
vocab = torch.randn(V_SIZE, HIDDEN, generator=torch.Generator().manual_seed(0))


def token_batch(batch, generator):
    """[batch, T_TRAIN, HIDDEN]: sequences of random tokens' embeddings."""
    return vocab[torch.randint(0, V_SIZE, (batch, T_TRAIN), generator=generator)]


x_eval = token_batch(32, torch.Generator().manual_seed(99))
with torch.no_grad():
    p_eval = student.attention_probs(x_eval)  # [32, 64, 4, 64] the frozen dense attention
best8 = select_topk(p_eval.sum(2).masked_fill(~causal_mask(64, 64), -torch.inf), 8)


def recall_now(k=8):
    with torch.no_grad():
        student.indexer.topk = k
        _, idx, _ = student(x_eval, return_indices=True)
        student.indexer.topk = 8
    return attention_recall(p_eval, idx)[:, 16:].mean().item()


def warm_up(steps=300, lr=3e-3, log_every=50):
    """The dense warm-up: the main model frozen, the indexer trained on indexer_kl_loss."""
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("indexer."))
    opt = torch.optim.Adam(student.indexer.parameters(), lr=lr)
    gen, log = torch.Generator().manual_seed(1), []
    for step in range(steps + 1):
        x = token_batch(16, gen)
        with torch.no_grad():
            p = student.attention_probs(x)  # [16, T, H, T] the target's source
        _, _, scores = student(x, return_indices=True)
        loss = indexer_kl_loss(p, scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0:
            log.append((step, loss.item(), recall_now()))
    return log

# %% tags=["nbval-ignore-output"]
recall_before = {k: recall_now(k) for k in (1, 2, 4, 8, 16, 32)}
log = warm_up()
for step, loss, rec in log:
    print(f"step {step:3d}  KL {loss:.3f}  recall of the top-8: {rec:.2f}")
best = attention_recall(p_eval, best8)[:, 16:].mean().item()
print(f"the best any 8 tokens can hold: {best:.2f}")

# %%
assert log[-1][2] > 2 * log[0][2] and log[-1][2] > 0.8 * best, (log[0], log[-1], best)

# %% [markdown]
# The KL falls and the recall of the top-8 more than doubles, to about 90 % of what the best 8 tokens hold.
# Recall against $k$, before and after the warm-up, with the best possible: a selection of $k$ tokens is worth
# what it recalls, and the trained indexer reaches a given recall with far fewer tokens.

# %%
ks = [1, 2, 4, 8, 16, 32]
recall_after = {k: recall_now(k) for k in ks}
recall_best = {}
for k in ks:
    top = select_topk(p_eval.sum(2).masked_fill(~causal_mask(64, 64), -torch.inf), k)
    recall_best[k] = attention_recall(p_eval, top)[:, 16:].mean().item()
fig, ax = plt.subplots(figsize=(6.5, 3.2))
for name, rec, style in (("best k tokens (top-k of p)", recall_best, "k--"),
                         ("indexer after warm-up", recall_after, "C0-o"),
                         ("fresh indexer", recall_before, "C7-s")):
    ax.plot(ks, [rec[k] for k in ks], style, label=name, ms=4)
ax.set_xscale("log", base=2)
ax.set_xlabel("k (tokens a query keeps; queries see 17–64 tokens)")
ax.set_ylabel("recall of the attention mass")
ax.legend(fontsize=8)
ax.set_title("What the top-k holds of the dense attention")
plt.show()

# %% [markdown]
# ### Explorer
#
# Move $k$: the left panel is the dense attention (head-summed, one held-out sequence), the right one the tokens
# the warmed-up indexer keeps. Where the dense attention is dark the selection should be too. (In the built book
# the first picture shows; in Jupyter or Colab every change redraws.)

# %% tags=["nbval-ignore-output"]
def draw_selection(k=8):
    with torch.no_grad():
        student.indexer.topk = k
        _, idx, _ = student(x_eval[:1], return_indices=True)
        student.indexer.topk = 8
    rec = attention_recall(p_eval[:1], idx)[0, 16:].mean().item()
    p = p_eval[0].sum(1) / 4  # [T, T]
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.4))
    viz.heatmap(axes[0], p.masked_fill(~causal_mask(64, 64), float("nan")), "dense attention p",
                cmap="magma")
    viz.heatmap(axes[1], selection_mask(idx, 64)[0].float(), f"top-{k}: recall {rec:.2f}",
                cmap="Blues", vmin=0, vmax=1)
    fig.tight_layout()
    plt.show()


viz.explorer(draw_selection, k=(1, 32, 1))

# %% [markdown]
# ### Sparse training
#
# Then the report switches selection on and trains everything. This toy has no language model to train, so the
# main model's task here is to reproduce the dense layer it started as (a frozen copy is the teacher, the loss
# the relative squared error of the outputs), while the indexer keeps its KL loss, now restricted to its
# selection. The sparse layer's error against the dense one falls: the main model adapts to reading 8 tokens.

# %%
import copy

teacher = copy.deepcopy(student).requires_grad_(False)


def sparse_error(x):
    with torch.no_grad():
        want = teacher(x, sparse=False)
        return ((student(x) - want).norm() / want.norm()).item()


def sparse_training(steps=100, lr=1e-3):
    student.requires_grad_(True)
    main = [p for n, p in student.named_parameters() if not n.startswith("indexer.")]
    opts = [torch.optim.Adam(main, lr=lr), torch.optim.Adam(student.indexer.parameters(), lr=lr)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = token_batch(16, gen)
        with torch.no_grad():
            want = teacher(x, sparse=False)  # [16, T, hidden]
        o, idx, scores = student(x, return_indices=True)  # sparse: top-8
        main_loss = (o - want).pow(2).mean() / want.pow(2).mean()
        index_loss = indexer_kl_loss(student.attention_probs(x), scores, idx)
        for opt in opts:
            opt.zero_grad()
        (main_loss + index_loss).backward()  # the indexer's inputs are detached in the layer
        for opt in opts:
            opt.step()

# %% tags=["nbval-ignore-output"]
before = sparse_error(x_eval)
sparse_training()
after = sparse_error(x_eval)
print(f"sparse layer vs dense, relative error: {before:.2f} before, {after:.2f} after")

# %%
assert after < 0.85 * before, (before, after)

# %% [markdown]
# ## 8.6 Cost model
#
# Count per token, as a function of its position: a token at position $t$ sees $c = t + 1$ keys. One layer's
# attention core, at DeepSeek-V3.2's shapes (`DeepseekV32Config()`: 128 heads, latent 512 + 64, q/k 192 and v 128
# in the expanded form, indexer 64 heads × 128, k = 2,048):
#
# - **dense** (V3.1), prefill in MLA's expanded form, as DeepSeek prefills: $2 H c\,(d_{qk} + d_v)$ FLOPs,
#   chapter 3's `mha_decode_flops`; decoding reads the latent cache, $c\,(d_c + d_R)$ numbers, `mla_decode_bytes`;
# - **indexer**: $2 H^I d^I c$ FLOPs; reading $c$ index keys of $d^I$ numbers when decoding (FP8: 1 byte each
#   plus a 4-byte scale a token);
# - **selection**: one comparison a score ($c$ operations); when decoding, the fp32 score row written and read;
# - **sparse attention** in the latent MQA form over $\min(c, k)$ keys: $2 H \min(c,k)\,(2 d_c + d_R)$ FLOPs
#   (`mla_decode_flops`), $\min(c, k)$ latent rows read when decoding.
#
# Not counted: the projections (the same for dense and DSA, plus the indexer's, which are $O(1)$ a token), the
# softmax's exponentials, and whether a kernel reaches the arithmetic or bandwidth peak. FP8 doubles the
# indexer's tensor-core rate: with `index_fp8` its FLOPs count half (bf16-equivalent).

# %%
#| export dsa.cost
import numpy as np

from minisparse.mla.cost import mha_decode_flops, mla_decode_bytes, mla_decode_flops

V32 = dict(heads=128, index_heads=64, index_dim=128, topk=2048, kv_lora_rank=512, rope_dim=64,
           qk_head_dim=192, v_head_dim=128)  # DeepseekV32Config()'s attention


def dsa_shapes(config):
    """dsa_cost's shape arguments from a transformers DeepseekV32Config or GlmMoeDsaConfig."""
    return dict(heads=config.num_attention_heads, index_heads=config.index_n_heads,
                index_dim=config.index_head_dim, topk=config.index_topk,
                kv_lora_rank=config.kv_lora_rank, rope_dim=config.qk_rope_head_dim,
                qk_head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim,
                v_head_dim=config.v_head_dim)


def dsa_cost(position, mode="prefill", *, index_fp8=False, heads=128, index_heads=64,
             index_dim=128, topk=2048, kv_lora_rank=512, rope_dim=64, qk_head_dim=192,
             v_head_dim=128):
    """One layer's attention core for the token at `position` (0-based, int or array; it sees
    c = position + 1 keys), DSA against dense MLA.

    "prefill": FLOPs. dense 2·H·c·(dqk + dv) (expanded form); indexer 2·HI·DI·c (halved
    with index_fp8: FP8 runs at twice bf16's rate); select c; sparse 2·H·min(c, k)·(2r + dr)
    (latent MQA form). "decode": bytes read. dense c·(r + dr)·2; indexer c·DI·2 (FP8:
    c·(DI + 4), with the scale); select 8·c (fp32 scores written and read); sparse
    min(c, k)·(r + dr)·2.
    Returns {"indexer", "select", "sparse", "dsa", "dense", "ratio": dsa / dense,
    "share": indexer / dsa}.
    """
    c = np.asarray(position, dtype=np.float64) + 1
    kept = np.minimum(c, topk)
    if mode == "prefill":
        dense = mha_decode_flops(c, heads, qk_head_dim, v_head_dim)
        indexer = 2 * index_heads * index_dim * c / (2 if index_fp8 else 1)
        select = c
        sparse = mla_decode_flops(kept, heads, kv_lora_rank, rope_dim)
    elif mode == "decode":
        dense = mla_decode_bytes(c, kv_lora_rank, rope_dim, dtype_bytes=2)
        indexer = c * (index_dim + 4 if index_fp8 else 2 * index_dim)
        select = 8 * c
        sparse = mla_decode_bytes(kept, kv_lora_rank, rope_dim, dtype_bytes=2)
    else:
        raise ValueError(f"dsa_cost: mode must be 'prefill' or 'decode', got {mode!r}")
    total = indexer + select + sparse
    return {"indexer": indexer, "select": select, "sparse": sparse, "dsa": total, "dense": dense,
            "ratio": total / dense, "share": indexer / total}


def model_prefill_flops(position, *, layers=61, other_flops=2 * 37e9, dsa=True, **shapes):
    """FLOPs of the whole model for the token at `position`: `other_flops` (the position-
    independent work, 2 × the activated parameters: DeepSeek-V3's 37B) + layers × the attention
    core of dsa_cost (DSA's or dense)."""
    cost = dsa_cost(position, "prefill", **shapes)
    return other_flops + layers * cost["dsa" if dsa else "dense"]

# %% [markdown]
# The report plots the price of a million tokens against their position in the sequence, prefill and decoding,
# for V3.1 and V3.2 on H800s. Its curves have a shape the model explains: dense grows linearly with position;
# DSA grows far more slowly — its indexer is linear too, with a fifth of the slope, and its attention stops
# growing at $k$. Below, the model's version: whole-model FLOPs per token in prefill (other layers included,
# as the price includes them), and the bytes one layer's attention reads per decoded token.

# %%
try:
    from transformers import DeepseekV32Config
except ImportError:
    print("transformers is not installed: using the shapes DeepseekV32Config() has")
else:
    assert dsa_shapes(DeepseekV32Config()) == V32
pos = np.arange(0, 131072, 512)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(pos, model_prefill_flops(pos, dsa=False) / 1e9, "C7", label="dense MLA (V3.1)")
axes[0].plot(pos, model_prefill_flops(pos) / 1e9, "C0", label="DSA, bf16 indexer")
axes[0].plot(pos, model_prefill_flops(pos, index_fp8=True) / 1e9, "C0--", label="DSA, FP8 indexer")
axes[0].set_ylabel("GFLOP per token, whole model")
axes[0].set_title("Prefill")
for fp8, style in ((False, "C0"), (True, "C0--")):
    axes[1].plot(pos, dsa_cost(pos, "decode", index_fp8=fp8)["dsa"] / 1e6, style,
                 label=f"DSA, {'FP8' if fp8 else 'bf16'} index keys")
axes[1].plot(pos, dsa_cost(pos, "decode")["dense"] / 1e6, "C7", label="dense MLA (V3.1)")
axes[1].set_ylabel("MB read per token, one layer")
axes[1].set_title("Decoding")
for ax in axes:
    ax.set_xlabel("token position")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
at = {"prefill, the token at 128K": model_prefill_flops(131071) / model_prefill_flops(131071,
                                                                                      dsa=False),
      "prefill, a 128K sequence": model_prefill_flops(np.arange(131072)).sum()
      / model_prefill_flops(np.arange(131072), dsa=False).sum(),
      "decoding at 128K, attention bytes": dsa_cost(131071, "decode")["ratio"],
      "decoding at 128K, FP8 index keys": dsa_cost(131071, "decode", index_fp8=True)["ratio"]}
for name, r in at.items():
    print(f"{name}: DSA costs {r:.0%} of dense ({1 - r:.0%} saved)")
assert 0.40 < at["prefill, a 128K sequence"] < 0.46
assert 0.12 < at["decoding at 128K, attention bytes"] < 0.25

# %% [markdown]
# So "about 50 % less compute at 128K" [S] is the size the model gives for a whole 128K prefill (57 % saved over
# the sequence, 67 % for its last token): the attention core drops to a quarter or a fifth, and the rest of the
# model, the same for both, dilutes the saving. Decoding saves more, because it is bandwidth-bound and the
# indexer reads 128 bytes a token where dense MLA reads 1,152: at 128K a decoding step reads about a seventh
# (bf16 index keys: a quarter) of what dense MLA reads from the attention cache.
#
# **FP8** buys the indexer two things: half the bytes of its key cache (128 + 4 against 256 a token) and twice the
# tensor-core rate. Its scores only rank tokens, so rounding matters only where it flips a choice at the top-k
# boundary, between candidates that hold about equal attention mass. Below, section 8.5's indexer with its
# queries and keys rounded to e4m3 (one scale a row, as FP8 kernels quantise): most choices survive, and the
# attention mass the selection recalls barely moves.

# %%
def to_fp8(x):
    """x rounded to float8 e4m3, one scale a row (the last dim), back in fp32."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448  # 448: e4m3's largest number
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


with torch.no_grad():
    q_lat = student.q_a_layernorm(student.q_a_proj(x_eval))
    qi, ki, wi = student.indexer.project(x_eval, q_lat, torch.arange(64))
    sel32 = select_topk(indexer_scores(qi, ki, wi), 8)
    sel8 = select_topk(indexer_scores(to_fp8(qi), to_fp8(ki), wi), 8)
same = (selection_mask(sel32, 64) & selection_mask(sel8, 64)).sum(-1)[:, 16:].float().mean() / 8
rec32, rec8 = (attention_recall(p_eval, i)[:, 16:].mean().item() for i in (sel32, sel8))
print(f"top-8 chosen alike: {same:.1%}; recall {rec32:.3f} (fp32) vs {rec8:.3f} (FP8)")
assert same > 0.85 and abs(rec32 - rec8) < 0.01

# %% [markdown]
# ### Why the head count matters
#
# Per (query, key) pair the indexer does $H^I d^I = 64 \times 128 = 8192$ multiply-adds. Dense attention in the
# expanded form does $H (d_{qk} + d_v) = 320 H$: 40,960 for V3.2's 128 heads — five times the indexer — but only
# 5,120 for a 16-head layer, *less* than the indexer. The indexer is quadratic like dense attention, so with
# 16 heads DSA can never win on arithmetic in prefill: it replaces one quadratic term with a larger one. The plot: DSA's cost relative to
# dense, per token, against position, and the indexer's share of DSA's cost.

# %%
pos = 2 ** np.arange(9, 18) - 1  # 512 … 128K
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for heads, colour in ((128, "C0"), (16, "C3")):
    for fp8, style in ((False, "-"), (True, "--")):
        cost = dsa_cost(pos, heads=heads, index_fp8=fp8)
        label = f"{heads} heads, {'FP8' if fp8 else 'bf16'} indexer"
        axes[0].plot(pos + 1, cost["ratio"], style, color=colour, marker="o", ms=3, label=label)
        axes[1].plot(pos + 1, cost["share"], style, color=colour, marker="o", ms=3, label=label)
axes[0].axhline(1, color="k", lw=0.8)
axes[0].set_ylabel("DSA / dense, prefill FLOPs a token")
axes[0].set_yscale("log", base=2)
axes[1].set_ylabel("indexer's share of DSA")
for ax in axes:
    viz.tokens_axis(ax, "keys the token sees")
    ax.legend(fontsize=7.5)
fig.tight_layout()
plt.show()

c_all = np.arange(0, 262144)
even = {}
for heads in (128, 16):
    for fp8 in (False, True):
        cheaper = dsa_cost(c_all, heads=heads, index_fp8=fp8)["ratio"] < 1
        even[heads, fp8] = int(np.argmax(cheaper)) + 1 if cheaper.any() else None
print({f"{h} heads, {'FP8' if f else 'bf16'}": v for (h, f), v in even.items()})
assert abs(even[128, False] / 8704 - 1) < 0.01 and abs(even[16, True] / 34816 - 1) < 0.01
assert even[16, False] is None and 0.75 < dsa_cost(131071)["share"] < 0.82

# %% [markdown]
# With 128 heads DSA's prefill is cheaper from about 8.7K tokens of context (7.7K with FP8), and at 128K a
# token costs a quarter of dense (bf16 indexer) or less; the indexer's share of DSA's cost rises with $T$ to
# about 80 %, because the sparse attention stops growing at $k$. With 16 heads, a bf16 indexer never breaks
# even and an FP8 one only from about 35K tokens. GLM-5's attention (64 heads of 256 + 256, indexer 32 × 128)
# sits comfortably on the winning side: its indexer is an eighth of its dense attention.
#
# ## 8.7 Fast: the lightning indexer and sparse MLA in Triton
#
# ### Gather instead of mask
#
# The naive `sparse_attention` builds a `[Tq, Tk]` mask and scores every key, the selected ones and the rest:
# dense work, sparse result. A kernel must do the opposite — touch only the $k$ selected rows. In PyTorch that
# is a **gather**: take each query's $k$ key rows (`[B, Tq, k, H, D]`), score them, softmax over the $k$ slots
# (padding slots masked), and average the gathered values. Work and memory are $O(T_q k)$ instead of
# $O(T_q T_k)$; in the latent form the $H_Q$ heads of a query share its gathered 576-number rows, so one row
# loaded serves 128 heads — the same group-sharing argument as NSA's kernel (chapter 7), taken to its end.

# %%
#| export dsa.naive
def gather_attention(q, k, v, indices, scale=None):
    """sparse_attention by gathering the selected rows: O(TQ·K) work and memory, no [TQ, TK] mask
    (the kernels' formulation). Same arguments and result as sparse_attention."""
    op = "gather_attention"
    B, TQ, TK, HQ, H, D, DV = check_attention_args(op, q, k, v)
    check_indices(op, indices, B, TQ, TK, naive=True)
    scale = _checks.scale(op, scale, D)
    K = indices.shape[-1]
    rows = indices.long().clamp(min=0)  # padding reads row 0, then is masked
    b = torch.arange(B, device=q.device)[:, None, None]  # [B, 1, 1]
    k_sel, v_sel = k[b, rows].float(), v[b, rows].float()  # [B, TQ, K, H, D], [B, TQ, K, H, Dv]
    qg = q.float().view(B, TQ, H, HQ // H, D)  # [B, TQ, H, G, D]
    s = torch.einsum("bthgd,btkhd->bthgk", qg, k_sel) * scale  # [B, TQ, H, G, K]
    s = s.masked_fill((indices < 0).view(B, TQ, 1, 1, K), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bthgk,btkhe->bthge", p, v_sel)  # [B, TQ, H, G, Dv]
    return o.reshape(B, TQ, HQ, DV).to(q.dtype)

# %% [markdown]
# ### Top-k without the score matrix
#
# The indexer's top-k can avoid its `[Tq, Tk]` score matrix the same way: walk the keys in blocks, score a block,
# and merge it into a running top-k of each query (candidates so far ∪ this block, keep the best $k$). Memory is
# $O(T_q (k + \text{block}))$, and the result is the same set.

# %%
def blockwise_topk(q_idx, k_idx, w_idx, topk, block=16):
    """select_topk(indexer_scores(...)) without the [TQ, TK] matrix: a running top-k over
    blocks of keys."""
    B, TQ, _, _ = q_idx.shape
    TK = k_idx.shape[1]
    best = torch.full((B, TQ, topk), -torch.inf)  # running scores
    idx = torch.full((B, TQ, topk), -1)  # running indices
    for n0 in range(0, TK, block):
        n = torch.arange(n0, min(n0 + block, TK))  # this block's keys
        s = indexer_scores(q_idx, k_idx, w_idx)[..., n]  # in a kernel: only this block is computed
        both, cand = torch.cat([best, s], -1), torch.cat([idx, n.expand(B, TQ, -1)], -1)
        best, pick = both.topk(topk, dim=-1)
        idx = cand.gather(-1, pick).masked_fill(best == -torch.inf, -1)
    return idx


def chosen_scores(scores, indices):
    """The scores of a selection, sorted: equal for two selections that differ only in ties."""
    s = scores.gather(-1, indices.clamp(min=0)).masked_fill(indices < 0, -torch.inf)
    return s.sort(-1).values


q, k, v = make_qkv(2, 45, 8, 16, HKV=2, seed=1)  # section 8.2's example
scores8 = indexer_scores(q_idx, k_idx, w_idx)  # [2, 45, 45]
idx8 = select_topk(scores8, 8)
assert torch.equal(chosen_scores(scores8, blockwise_topk(q_idx, k_idx, w_idx, 8)),
                   chosen_scores(scores8, idx8))  # ReLU makes ties at 0 common: compare scores
assert_close("gather = mask", sparse_attention(q, k, v, idx8, backend="naive"),
             gather_attention(q, k, v, idx8), 1e-6)

# %% [markdown]
# ### The kernels
#
# *(The kernel cells — `lightning_indexer` and `sparse_attention_triton`, forward and backward — go here.)*

# %% [markdown]
# ## 8.8 Measure
#
# `bench/dsa.py` times, at DeepSeek-V3.2's attention shapes (128 query heads, latent 512 + 64, indexer 64 × 128,
# k = 2,048, batch 1), the DSA prefill forward (indexer, top-k and sparse attention) against dense causal
# attention of the same layer (SDPA, expanded form), with a bf16 and an FP8 indexer, and a decoding step at 64K
# against chapter 3's `mla_decode`. This cell plots `bench/results/dsa.json` once the H200 run has committed it;
# until then section 8.6's model is the number to beat.

# %% tags=["nbval-ignore-output"]
from minisparse import bench

try:
    res = bench.load_results("dsa")
except (FileNotFoundError, OSError, ValueError):
    res = None
    print("bench/results/dsa.json is not committed yet: its numbers come from the H200 run of "
          "bench/dsa.py (see bench/README.md)")
if res is not None:
    fig = bench.plot_passes(res, y="ms", logy=True)
    plt.show()

# %% [markdown]
# ## 8.9 Exercises
#
# Each has a stub, a cell that checks it (one line when right, what differs when not) and a hidden solution.

# %%
import triton
import triton.language as tl

from minisparse.dsa.exercises import (check_break_even, check_index_score_tile,
                                      check_scores_fix, indexer_scores_with_a_bug,
                                      load_index_queries)
from minisparse.testing import attempt

# %% [markdown]
# ### Exercise 1 (derive): where DSA breaks even
#
# In prefill, the token that sees $c \ge k$ keys costs dense MLA $c \cdot H \cdot 320$ multiply-adds (expanded form,
# $d_{qk} + d_v = 192 + 128$) and DSA $c \cdot H^I d^I$ for the indexer (half that with an FP8 indexer, counted at
# twice the rate) plus $k \cdot H \cdot 1088$ for the sparse attention (latent form, $2 \cdot 512 + 64$). Write the
# number of keys $c$ at which the two are equal, as a float, or `math.inf` when DSA never gets cheaper. The checker
# tries 128 and 16 heads, bf16 and FP8 indexers, and two other shapes; compare your answers with section 8.6's
# plot.

# %%
def my_break_even(H, HI, DI, k, fp8):
    # your code here: the c where c·H·320 = c·HI·DI (/2 with fp8) + k·H·1088, or math.inf
    raise NotImplementedError


# %%
attempt(check_break_even, my_break_even)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — both sides grow with c, dense by H·320 a key, DSA by the indexer's HI·DI (or half);
# DSA also pays a constant k·H·1088 for its sparse attention once c ≥ k. So DSA wins after
# c* = k·H·1088 / (H·320 − HI·DI'), and never when the indexer's slope is not below dense's. With
# 128 heads: 2048·128·1088 / (40960 − 8192) = 8704 keys; with 16 heads and FP8: 34,816; with 16
# heads and bf16 the indexer's 8192 exceeds dense's 5120 — never.
def break_even_solution(H, HI, DI, k, fp8):
    indexer = HI * DI / (2 if fp8 else 1)
    if H * 320 <= indexer:
        return math.inf
    return k * H * 1088 / (H * 320 - indexer)


check_break_even(break_even_solution)

# %% [markdown]
# ### Exercise 2 (debug): an indexer that fails when decoding
#
# `indexer_scores_with_a_bug` computes the same scores as `indexer_scores` — and gives the same selection in a
# prefill — but a decoding step with it (one query, $T_k$ keys) selects nothing but the first key. Find the
# line (compare the two on `q_idx[:, -1:]` against all keys) and return the fixed function; the checker
# compares it with `indexer_scores` on a prefill, a single decoding step and a chunk of 4 queries.

# %%
def my_fixed_scores(q_idx, k_idx, w_idx, scale=None):
    # your code here: indexer_scores_with_a_bug with the bug fixed
    raise NotImplementedError


# %%
attempt(check_scores_fix, my_fixed_scores)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — the causal mask assumed that query i sits at position i (triu(1)). When the TQ
# queries are the last TQ of TK positions, query i sits at TK − TQ + i, so the keys after it are
# those with s > TK − TQ + i: triu(TK − TQ + 1). With TQ = 1 the buggy mask hid every key but 0.
def fixed_scores_solution(q_idx, k_idx, w_idx, scale=None):
    TQ, TK = q_idx.shape[1], k_idx.shape[1]
    scale = q_idx.shape[-1] ** -0.5 if scale is None else scale
    dots = torch.einsum("bthd,bsd->bths", q_idx.float(), k_idx.float())  # [B, TQ, HI, TK]
    s = torch.einsum("bth,bths->bts", w_idx.float(), torch.relu(scale * dots))
    future = torch.ones(TQ, TK, dtype=torch.bool).triu(TK - TQ + 1)
    return s.masked_fill(future, float("-inf"))


check_scores_fix(fixed_scores_solution)

# %% [markdown]
# ### Exercise 3 (Triton): the indexer's score tile
#
# The inner step of a lightning-indexer kernel: for one query at position `t`, score a tile of `BN` keys
# starting at `n0`, $s_n = \sum_j w_j \operatorname{ReLU}(\text{scale} \cdot q_j \cdot k_n)$, `[BN]`. Keys after the
# query ($n > t$) and past the end ($n \ge T_K$) must score `-inf`. The `HI` query heads (padded to `BH`) and
# their weights are loaded for you; `k` is `[T_K, DI]` row-major. The checker launches your kernel on 1, 3, 4
# and 5 heads, DI = 8, 16, 24 and 32, a tile that straddles the query and one that runs past $T_K$, and says
# which score differs.

# %%
@triton.jit
def my_index_score_kernel(q_ptr, k_ptr, w_ptr, s_ptr, t, n0, TK, scale, HI, DI,
                          BH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    q, w = load_index_queries(q_ptr, w_ptr, HI, DI, BH, BD)  # [BH, BD], [BH] (0 past HI)
    n, d = n0 + tl.arange(0, BN), tl.arange(0, BD)  # key positions, dims
    # ---- your code: s [BN] = Σ_j w_j ReLU(scale · q_j · k_n), -inf where n > t or n >= TK ----
    s = tl.zeros([BN], dtype=tl.float32)
    # ---- end of your code ----
    tl.store(s_ptr + tl.arange(0, BN), s)


# %%
attempt(check_index_score_tile, my_index_score_kernel)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — one masked load of the key tile, the HI dot products by broadcasting ([BH, 1, BD] ×
# [1, BN, BD], summed over BD), ReLU, then the weighted sum over heads (padded heads have w = 0).
# Masked loads read zeros, whose score is 0, not -inf: the -inf comes from tl.where afterwards. A
# kernel runs this tile over all the keys a query sees; the top-k follows (section 8.7).
@triton.jit
def index_score_kernel_solution(q_ptr, k_ptr, w_ptr, s_ptr, t, n0, TK, scale, HI, DI,
                                BH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    q, w = load_index_queries(q_ptr, w_ptr, HI, DI, BH, BD)
    n, d = n0 + tl.arange(0, BN), tl.arange(0, BD)
    real = (n <= t) & (n < TK)
    k = tl.load(k_ptr + n[:, None] * DI + d[None, :], mask=real[:, None] & (d[None, :] < DI),
                other=0.0)  # [BN, BD]
    dots = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BH, BN]
    s = tl.sum(w[:, None] * tl.maximum(dots, 0.0), axis=0)  # [BN]
    s = tl.where(real, s, float("-inf"))
    tl.store(s_ptr + tl.arange(0, BN), s)


check_index_score_tile(index_score_kernel_solution)

# %% [markdown]
# ## Summary
#
# - **DSA** = a lightning indexer, $I_{t,s} = \sum_j w_{t,j} \operatorname{ReLU}(q^I_{t,j} \cdot k^I_s)$, a top-k
#   over its scores, and attention over the $k$ chosen tokens only, one choice shared by all heads. With
#   $k \ge T$ it is causal attention; a decoding step is the same op with one query.
# - **On MLA** it runs in the latent MQA form: one 576-number row a token (512 + 64), whose first 512 numbers are
#   also the value, read once for all 128 heads — the reason DSA and MLA fit together.
# - **Training**: the indexer learns by distillation, KL from the dense attention's head-summed distribution,
#   first with the main model frozen (a warm-up), then with sparse attention switched on and everything trained;
#   its inputs are detached, so the two losses do not mix. At reading size the top-8 recall more than doubled.
# - **Cost**: the indexer is still $O(T^2)$, at $64 \times 128$ multiply-adds a pair against dense MLA's
#   $128 \times 320$. At V3.2's shapes a 128K prefill costs about 43 % of dense over the whole model (the
#   survey's "about 50 % less"), a decoding step reads a seventh of the attention bytes; DSA breaks even from
#   about 8.7K tokens with 128 heads and never, in bf16, with 16 — the head count decides.
#
# Next, chapter 9 assembles the book's layers into whole models: DeepSeek-V3.2 and GLM-5 among them.
#
# ## References
#
# - **[S]** *开源稀疏架构模型全景（截至 2026 年 2 月）* ("Open sparse-architecture models: the whole picture, as of
#   February 2026"), a survey in Chinese, February 2026, the starting point of this book; reproduced in the appendix
#   *The seed survey*. Its figures were checked against the models' configs and papers; where they disagree, the text
#   says so.
# - DeepSeek-AI, *DeepSeek-V3.2: Pushing the Frontier of Open Large Language Models*, 2025 (DSA, the indexer's
#   warm-up and sparse training, the cost-per-token curves). [arXiv:2512.02556](https://arxiv.org/abs/2512.02556)
# - DeepSeek-AI, *DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek Sparse Attention*, 2025 (the
#   first release of DSA).
# - J. Yuan et al., *Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention*, ACL 2025
#   (chapter 7; DSA's academic root). [arXiv:2502.11089](https://arxiv.org/abs/2502.11089)
# - Zhipu AI, GLM-5 (DSA on MLA; transformers' `GlmMoeDsa` modules).
# - `fla-core` 0.6 (flash-linear-attention): `naive_dsa_indexer`, `naive_dsa` (this chapter's oracles);
#   transformers 5: `DeepseekV32Indexer`, `DeepseekV32Attention`, `GlmMoeDsaIndexer`.

# %% [markdown]
# ## Engineering notes (optional)
#
# ### Bad input
#
# The naive ops and the kernels share one set of argument checks, `minisparse.dsa.checks`, built from the book's
# shared checks (`minisparse._checks`); tests/test_dsa.py runs one table of bad inputs against both. Rejected:
# `topk` ≤ 0 or not an int; indices that are not integers, of the wrong shape, below −1, at or past $T_k$, in
# the query's future (after position $T_k - T_q + i$) or repeated within a row; q, k, v of different ranks,
# batches, head dims or dtypes (in the latent form: a query row that is not the key row's 576), $T_q > T_k$,
# H not dividing HQ, v with other heads than k; indexer inputs whose batch, length, heads or head dim disagree. Padding
# (−1) is honoured everywhere. Index values are checked on CPU tensors always, on CUDA tensors by the kernels
# only after `minisparse.runtime.set_value_checks(True)` (a check is a host sync).

# %% tags=["hide-input"]
#| export dsa.checks
import torch

from minisparse import _checks


def check_topk(op, topk):
    """topk is an int > 0 (the number of keys a query keeps)."""
    return _checks.positive_int(op, "topk", topk)


def check_indexer_args(op, q_idx, k_idx, w_idx):
    """q_idx [B, TQ, HI, DI], k_idx [B, TK, DI] with TQ <= TK, w_idx [B, TQ, HI] or None; floats on
    one device. Returns (B, TQ, HI, DI, TK)."""
    _checks.tensor(op, "q_idx", q_idx, "[B, TQ, HI, DI]", dtypes=_checks.FLOATS)
    _checks.tensor(op, "k_idx", k_idx, "[B, TK, DI]", dtypes=_checks.FLOATS)
    B, TQ, HI, DI = q_idx.shape
    if k_idx.shape[0] != B or k_idx.shape[2] != DI or k_idx.shape[1] < TQ:
        raise ValueError(f"{op}: k_idx must be [B, TK, DI] with q_idx's B = {B}, DI = {DI} and "
                         f"TK >= TQ = {TQ} (one index key a token), got {tuple(k_idx.shape)}")
    if w_idx is not None:
        _checks.per_head_token(op, "w_idx", w_idx, (B, TQ, HI), "[B, TQ, HI]",
                               "one weight a query token and indexer head", q_idx)
    _checks.same_device(op, q_idx=q_idx, k_idx=k_idx)
    return B, TQ, HI, DI, k_idx.shape[1]


def check_attention_args(op, q, k, v):
    """q [B, TQ, HQ, D], k [B, TK, H, D], v [B, TK, H, Dv] with TQ <= TK and H dividing HQ (MLA's
    latent form: H = 1, D = 576, Dv = 512); one float dtype, one device. Returns (B, TQ, TK,
    HQ, H, D, Dv)."""
    _checks.tensor(op, "q", q, "[B, TQ, HQ, D]")
    _checks.tensor(op, "k", k, "[B, TK, H, D]")
    _checks.tensor(op, "v", v, "[B, TK, H, Dv]")
    B, TQ, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or TK < TQ:
        raise ValueError(f"{op}: k must be [B, TK, H, D] with q's B = {B}, D = {D} and TK >= TQ = "
                         f"{TQ} (queries are the last TQ positions), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must be [B, TK, H, Dv] with k's B, TK, H = "
                         f"{tuple(k.shape[:3])}, got {tuple(v.shape)}")
    _checks.divides(op, "H (k's heads)", H, "HQ (q's heads)", HQ)
    _checks.same_dtype(op, q=q, k=k, v=v)
    _checks.same_device(op, q=q, k=k, v=v)
    return B, TQ, TK, HQ, H, D, v.shape[3]


def check_indices(op, indices, B, TQ, TK, naive):
    """indices [B, TQ, K] int32/int64 on the queries' device: each entry -1 (padding) or a distinct
    key 0 <= s <= TK − TQ + i (query i's position). Values are checked by the book's value-check
    rule (always in the naive ops)."""
    _checks.tensor(op, "indices", indices, "[B, TQ, K]")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: indices must be int32 or int64, got {indices.dtype}")
    if indices.shape[:2] != (B, TQ):
        raise ValueError(f"{op}: indices must be [B, TQ, K] with B, TQ = {(B, TQ)} (one row a "
                         f"query, shared by all heads), got {tuple(indices.shape)}")
    if not (_checks.checking_values(naive, indices) and indices.numel()):
        return
    pos = torch.arange(TQ, device=indices.device)[None, :, None] + TK - TQ  # [1, TQ, 1]
    bad = (indices < -1) | (indices > pos)
    if bool(bad.any()):
        b, i, j = (int(n) for n in bad.nonzero()[0])
        got = int(indices[b, i, j])
        raise ValueError(f"{op}: indices[{b}, {i}, {j}] = {got} is out of range or in the future: "
                         f"query {i} sits at position {TK - TQ + i} of {TK} keys and may read "
                         f"0..{TK - TQ + i} (or -1 = padding)")
    srt = indices.sort(dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        b, i, j = (int(n) for n in dup.nonzero()[0])
        raise ValueError(f"{op}: indices[{b}, {i}] selects key {int(srt[b, i, j])} twice: a "
                         "selection is a set (pad with -1 instead)")

# %% [markdown]
# ### Loading transformers' modules
#
# `indexer_from_hf` reads the indexer's shapes from its config and its RoPE layout from its class (GLM-5's
# indexer rotates interleaved pairs, DeepSeek-V3.2's half-split ones); `dsa_from_hf` reuses chapter 3's MLA loader
# and adds the indexer. DeepSeek-V3.2's MLA always rotates interleaved pairs, whatever the config's
# `rope_interleave` says (the V3.2 config has no such field).

# %% tags=["hide-input"]
#| export dsa.hf
from minisparse.mla.hf import mla_from_hf
from minisparse.mla.naive import _rope_type


def _rope_settings(cfg):
    """(theta, rope_scaling or None) of a transformers DeepSeek-style config."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if _rope_type(rope) == "default":
        return theta, None
    if rope.get("factor") is None:
        rope["factor"] = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
    return theta, rope


def indexer_from_hf(module, *, cls=None):
    """A LightningIndexer (or `cls`) from transformers' DeepseekV32Indexer / GlmMoeDsaIndexer, its
    weights copied, on its device and in its dtype."""
    if cls is None:
        from minisparse.dsa.layer import LightningIndexer as cls
    cfg = module.config
    theta, scaling = _rope_settings(cfg)
    layer = cls(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim,
                cfg.qk_rope_head_dim, cfg.index_topk, rope_theta=theta,
                rope_interleave=type(module).__name__.startswith("GlmMoeDsa"),
                rope_scaling=scaling, norm_eps=module.k_norm.eps)
    layer.load_state_dict(module.state_dict())
    w = module.wk.weight
    return layer.to(device=w.device, dtype=w.dtype)


def dsa_from_hf(module, backend="auto", *, cls=None):
    """A DSAttention (or `cls`) from transformers' DeepseekV32Attention: chapter 3's MLA loader plus
    the indexer's shapes; its weights copied (the indexer's under `indexer.`)."""
    if cls is None:
        from minisparse.dsa.layer import DSAttention as cls
    cfg = module.config

    def build(*args, **kw):
        kw["rope_interleave"] = True  # V3.2's MLA rotates interleaved pairs, always
        return cls(*args, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
                   index_topk=cfg.index_topk,
                   indexer_rope_interleave=type(module).__name__.startswith("GlmMoeDsa"), **kw)

    return mla_from_hf(module, backend, cls=build)

# %% [markdown]
# ### The exercise checkers
#
# Each checker compares a reader's answer with an independent computation (a closed form, `indexer_scores`) on
# several cases and says which case differs; tests/test_dsa.py feeds each one a known-wrong answer.

# %% tags=["hide-input"]
#| export dsa.exercises
import math

import torch
import triton
import triton.language as tl

from minisparse.dsa.naive import indexer_scores
from minisparse.testing import ExerciseError, check


def _break_even(H, HI, DI, k, fp8):
    indexer = HI * DI / (2 if fp8 else 1)
    return math.inf if H * 320 <= indexer else k * H * 1088 / (H * 320 - indexer)


def check_break_even(fn):
    """Exercise 1: the c where DSA's prefill multiply-adds equal dense MLA's (math.inf: never)."""
    cases = [(128, 64, 128, 2048, False), (128, 64, 128, 2048, True), (16, 64, 128, 2048, False),
             (16, 64, 128, 2048, True), (32, 64, 128, 2048, True), (64, 32, 128, 1024, False)]
    for H, HI, DI, k, fp8 in cases:
        want = _break_even(H, HI, DI, k, fp8)
        try:
            got = fn(H, HI, DI, k, fp8)
        except NotImplementedError:
            raise ExerciseError("✗ break-even: not implemented yet — fill in the function "
                                "and run the cell again") from None
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise ExerciseError(f"✗ break-even: expected a number, got {got!r}") from None
        same = got == want if math.isinf(want) else math.isclose(got, want, rel_tol=1e-6)
        if not same:
            raise ExerciseError(
                f"✗ break-even: H={H}, HI={HI}, DI={DI}, k={k}, fp8={fp8}: expected {want:.6g}, "
                f"got {got:.6g}\nHint: equate the two costs for c ≥ k; the constant is the "
                "sparse attention's k·H·1088, and when the indexer's slope is not below dense's, "
                "DSA never catches up")
    print(f"✓ break-even: all {len(cases)} cases match")


def indexer_scores_with_a_bug(q_idx, k_idx, w_idx, scale=None):
    """indexer_scores with a planted bug (exercise 2)."""
    TQ, TK = q_idx.shape[1], k_idx.shape[1]
    scale = q_idx.shape[-1] ** -0.5 if scale is None else scale
    dots = torch.einsum("bthd,bsd->bths", q_idx.float(), k_idx.float())  # [B, TQ, HI, TK]
    s = torch.einsum("bth,bths->bts", w_idx.float(), torch.relu(scale * dots))
    future = torch.ones(TQ, TK, dtype=torch.bool).triu(1)
    return s.masked_fill(future, float("-inf"))


def _split_inf(fn):
    """(where -inf, the finite scores): a comparison that -inf cannot poison."""
    def run(*args):
        s = fn(*args)
        return (s == float("-inf"), s.masked_fill(s == float("-inf"), 0.0))
    return run


def check_scores_fix(fn):
    """Exercise 2: the fixed function equals indexer_scores on a prefill and on decoding steps."""
    g = torch.Generator().manual_seed(8)
    cases = []
    for TQ, TK in ((9, 9), (1, 13), (4, 10)):
        q_idx = torch.randn(2, TK, 3, 8, generator=g)[:, TK - TQ:]
        k_idx, w_idx = torch.randn(2, TK, 8, generator=g), torch.randn(2, TQ, 3, generator=g)
        cases.append((q_idx, k_idx, w_idx))
    check("indexer scores, queries last", _split_inf(fn), _split_inf(indexer_scores), cases,
          tol=1e-5, hint="query i of TQ sits at position TK − TQ + i: which keys are after it?")


@triton.jit
def load_index_queries(q_ptr, w_ptr, HI, DI, BH: tl.constexpr, BD: tl.constexpr):
    """The HI index queries [HI, DI] (row-major) and weights [HI] of one token, zero-padded to
    [BH, BD] and [BH]."""
    h, d = tl.arange(0, BH), tl.arange(0, BD)
    q = tl.load(q_ptr + h[:, None] * DI + d[None, :], mask=(h[:, None] < HI) & (d[None, :] < DI),
                other=0.0)
    w = tl.load(w_ptr + h, mask=h < HI, other=0.0)
    return q, w


def check_index_score_tile(kernel):
    """Exercise 3: launch `kernel` for one query and one key tile; compare with indexer_scores."""
    g = torch.Generator().manual_seed(11)
    for HI, DI, TK, t, n0, BN in ((4, 16, 40, 37, 32, 16), (3, 24, 20, 10, 0, 16),
                                  (1, 8, 70, 69, 64, 8), (5, 32, 33, 20, 16, 32)):
        q, k = torch.randn(HI, DI, generator=g), torch.randn(TK, DI, generator=g)
        w, scale = torch.randn(HI, generator=g), DI ** -0.5
        ref = torch.full((BN,), float("-inf"))
        seen = indexer_scores(q[None, None], k[None, :t + 1], w[None, None], scale)[0, 0]  # [t+1]
        for j in range(BN):
            if n0 + j <= t:
                ref[j] = seen[n0 + j]
        got = torch.full((BN,), float("nan"))
        kernel[(1,)](q, k, w, got, t, n0, TK, scale, HI, DI,
                     BH=triton.next_power_of_2(HI), BD=triton.next_power_of_2(DI), BN=BN)
        for j in range(BN):
            bad = not (bool(torch.isinf(ref[j])) and got[j] == ref[j]) and not (
                bool(torch.isfinite(ref[j])) and abs(float(got[j] - ref[j])) <= 1e-4 *
                (1 + abs(float(ref[j]))))
            if bad:
                why = ("keys after the query or past TK must be -inf" if torch.isinf(ref[j])
                       else "Σ_j w_j ReLU(scale · q_j · k_n)")
                raise ExerciseError(f"✗ index score tile: HI={HI}, DI={DI}, t={t}, n0={n0}: key "
                                    f"{n0 + j}: got {float(got[j]):.5g}, expected "
                                    f"{float(ref[j]):.5g} ({why})")
    print("✓ index score tile: all 4 launches match")
