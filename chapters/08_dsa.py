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
# DeepSeek-V3.2 differs from DeepSeek-V3.1-Terminus, its starting point, in one place only: its attention. A small
# **lightning indexer** scores every past token for each query, the **top-k** tokens (k = 2,048) are kept, and
# chapter 3's MLA attends to those alone. GLM-5 uses the same design. Chapter 7's NSA chooses *blocks* from block
# summaries; DSA chooses single
# *tokens*, with a scorer of its own that is trained to imitate the dense attention it replaces. The attention
# proper falls from $O(T^2)$ to $O(T k)$; the indexer stays $O(T^2)$, only much cheaper — so where DSA pays off,
# and by how much, is a calculation this chapter makes you able to do.
#
# **You will learn to**
#
# - write the indexer's scores, the top-k selection and attention over selected tokens, in the `[B, T, H, D]`
#   form and in MLA's latent form, and check them against the dense limit;
# - train an indexer by distillation (KL from the dense attention) and watch the top-k capture more of the
#   attention mass;
# - count what DSA costs against dense MLA in prefill and decoding, say why the number of attention heads decides
#   whether it pays off, and read a GPU measurement against that count;
# - build `DSAttention`, DSA on chapter 3's `MLA` (loadable from transformers' DeepSeek-V3.2), and decode token
#   by token with a cache.
#
# **Prerequisites**: chapter 1 (softmax attention, GQA), chapter 3 (MLA's latent cache and absorbed form),
# chapter 7 (NSA: the idea of choosing what to read); top-k from chapter 2. KL divergence (one line of it).
# **Time**: about 1.5 hours for the core path, plus the exercises.
#
# **Roadmap**: 8.1 *Why*; 8.2 *Naive*: indexer, top-k, sparse attention; 8.3 *See it*: DSA's tokens beside NSA's
# blocks, the data flow; 8.4 *The layer*: `LightningIndexer`, `DSAttention`, decoding with a cache; 8.5 *Training
# the indexer*: warm-up by KL, recall against k, an explorer; 8.6 *Cost model*: prefill and decoding at V3.2's
# shapes, the head count; 8.7 *Fast*: gather instead of mask, the kernels; 8.8 *Measure* (H100); 8.9 *Exercises*;
# then the engineering notes (checks, kernels and launchers, sparse training, FP8, the fla and transformers oracles).
# The layer and its training come before the cost model here, not after as in chapters 5–7: whether k selected
# tokens are enough (section 8.5's recall) comes before what they save.
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
# from token $t$ (the weights may be negative, so a score may be too), and **one** key $k^I_s$ a token shared by all
# indexer heads (MQA). Then
#
# $$
# S_t = \operatorname{top-}k_{\,s \le t}\, I_{t,s}, \qquad
# u_t = \operatorname{Attn}\bigl(h_t,\; \{ c_s : s \in S_t \}\bigr) ,
# $$
#
# where $h_t$ is token $t$'s hidden state: attention over the $k$ selected cache entries $c_s$ only, the same set
# for all 128 query heads. The indexer is
# cheap thanks to few heads, ReLU instead of a softmax (no normalisation over $s$: scores can be computed block by block
# and compared) and FP8 arithmetic. It still visits *every* past token for every query — $O(T^2)$ — but at
# $64 \times 128$ multiply-adds a pair against MLA's $128 \times (192 + 128)$ in its expanded form, a fifth of the
# dense work (section 8.6).
#
# Unlike NSA (chapter 7), which picks *blocks* from their summaries, DSA's indexer is a separate small network that
# picks *single tokens*, trained to imitate the dense attention (section 8.5). The survey [S]: DSA is V3.2's only
# architectural change over V3.1, brings attention from $O(L^2)$ to $O(Lk)$ and saves about 50 % of the compute
# at 128K; GLM-5 adopted it on top of MLA.
#
# The problem and the answer in one picture: the attention work of one token of a prefill, at V3.2's shapes, for
# dense MLA and for DSA (section 8.6 builds this cost model; here, its answer). Dense work grows with every past
# token. Once a token sees more than the 2,048 keys DSA keeps, DSA's work grows at a fifth of dense's slope (the
# indexer still scores every token) on top of a constant for the kept ones; before that its sparse attention grows
# too, faster than dense (the latent form's 576 + 512 = 1,088 multiply-adds a head per key, scores over the whole
# latent row and its first 512 numbers as the value, against dense's 192 + 128 = 320), so a single token of
# DSA costs more than dense below about 8.7K keys (section 8.6).

# %%
from minisparse.dsa import dsa_cost  # section 8.6

pos = np.arange(0, 131072, 1024)
cost = dsa_cost(pos, "prefill")
fig, ax = plt.subplots(figsize=(6.6, 3.0))
ax.plot(pos, cost["dense"] / 1e6, "C7", label="dense MLA: attends to every past token")
ax.plot(pos, cost["dsa"] / 1e6, "C0", label="DSA: indexer over every token + attention over 2,048")
ax.set(xlabel="token position t", ylabel="MFLOP, one layer",
       title="The attention work of one token")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 8.2 Naive: indexer, top-k, sparse attention
#
# Every op of this section is plain PyTorch in fp32, the spec that tests and kernels are held to. The shapes:
# indexer `q_idx [B, Tq, HI, DI]`, `k_idx [B, Tk, DI]` (one key a token), `w_idx [B, Tq, HI]`; selection
# `indices [B, Tq, topk]` int64, one row a query shared by all heads, `-1` where a query has fewer than `topk`
# past tokens; attention `q [B, Tq, HQ, D]`, `k [B, Tk, H, D]`, `v [B, Tk, H, Dv]`, H dividing HQ.
#
# Queries may be the **last** $T_q \le T_k$ positions: query $i$ sits at position $T_k - T_q + i$, so a
# decoding step is the same call with $T_q = 1$. MLA's latent form is not a separate case: it is MQA with
# $H = 1$, keys of 576 numbers (the 512-number latent $c_s$ and the 64-number rotary key) and values of 512,
# the first 512 numbers of the same key row — `k [B, Tk, 1, 576]`, `v = k[..., :512]` (a view, no copy).
# The argument checks live in `minisparse.dsa.checks` (engineering notes).

# %%
#| export dsa.naive
import torch
import torch.nn.functional as F

from minisparse.dsa.checks import (_check_attention_probs, _check_indexer_scores, _check_scores,
                                   _check_sparse_args, _use_triton, check_topk)


def causal_mask(TQ, TK, device=None):
    """[TQ, TK] bool: query i (at position TK − TQ + i) may read key s <= its position."""
    return torch.ones(TQ, TK, dtype=torch.bool, device=device).tril(TK - TQ)


def indexer_scores(q_idx, k_idx, w_idx=None, scale=None):
    """The lightning indexer's scores, -inf above the diagonal (fp32; fp64 for fp64 q_idx):

        I[t, s] = Σ_j w[t, j] · ReLU(scale · q_idx[t, j] · k_idx[s])   for s <= t

    q_idx [B, TQ, HI, DI], k_idx [B, TK, DI] (one key a token, shared by the HI heads), w_idx
    [B, TQ, HI] (None: weights 1) -> I [B, TQ, TK]; query i sits at position TK − TQ + i.
    scale defaults to DI ** -0.5 (positive, so it never changes the ranking).
    """
    B, TQ, HI, DI, TK, scale = _check_indexer_scores("indexer_scores", q_idx, k_idx, w_idx, scale)
    acc = torch.promote_types(q_idx.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    w = torch.ones(B, TQ, HI, dtype=acc, device=q_idx.device) if w_idx is None else w_idx.to(acc)
    dots = torch.einsum("bthd,bsd->bths", q_idx.to(acc), k_idx.to(acc))  # [B, TQ, HI, TK]
    s = torch.einsum("bth,bths->bts", w, F.relu(scale * dots))  # [B, TQ, TK] weighted head sum
    return s.masked_fill(~causal_mask(TQ, TK, q_idx.device), float("-inf"))


def select_topk(scores, topk):
    """The `topk` highest-scoring keys of each query: indices [B, TQ, topk] int64, best first;
    -1 fills the slots of a query that sees fewer than `topk` keys (-inf scores are never kept).

    scores [B, TQ, TK] as from indexer_scores. Equal scores (ReLU makes exact zeros common) go
    to the earlier key, so a query chooses the same keys in prefill and in token-by-token
    decoding.
    """
    K = _check_scores("select_topk", scores, topk)
    best, idx = scores.sort(dim=-1, descending=True, stable=True)  # stable: ties in key order
    best, idx = best[..., :K], idx[..., :K]  # [B, TQ, min(K, TK)]
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
# $G = H_Q / H$ query heads reads one key head. `backend` is the dispatch point for the kernels of section 8.7,
# the book's one rule: `"auto"` runs them on CUDA tensors (or on CPU tensors under Triton's interpreter, fp32 and
# fp16), the PyTorch code below otherwise; `"naive"` always runs the PyTorch code, `"triton"` always the kernels.

# %%
#| export dsa.naive
def sparse_attention(q, k, v, indices, scale=None, backend="auto"):
    """Softmax attention of each query over its selected keys only; the selection is shared by all
    heads.

        o[t, h] = Σ_{s ∈ S_t} softmax_s(scale · q[t, h] · k[s, h // G]) · v[s, h // G]

    q [B, TQ, HQ, D], k [B, TK, H, D], v [B, TK, H, Dv] (H divides HQ, G = HQ / H), indices
    [B, TQ, K] int (-1 = padding; each entry a distinct key <= the query's position TK − TQ + i)
    -> o [B, TQ, HQ, Dv] in q's dtype (fp32 inside; fp64 inputs run here, in fp64, as the kernels
    take none); a query with no key gets 0. MLA's latent form: k [B, TK, 1, 576], v = k[...,
    :512]. scale defaults to D ** -0.5 (MLA passes its own). With every past key selected (topk >=
    TK) it is causal attention.
    """
    if _use_triton("sparse_attention", backend, q):  # the kernels of section 8.7 (and their checks)
        from minisparse.dsa.triton import _sparse_attention
        return _sparse_attention(q, k, v, indices, scale, op="sparse_attention")
    B, TQ, TK, HQ, H, D, DV, scale = _check_sparse_args("sparse_attention", q, k, v, indices, scale)
    keep = selection_mask(indices, TK) & causal_mask(TQ, TK, q.device)  # [B, TQ, TK]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    qg = q.to(acc).view(B, TQ, H, HQ // H, D)  # [B, TQ, H, G, D]: a group reads one key head
    s = torch.einsum("bthgd,bshd->bthgs", qg, k.to(acc)) * scale  # [B, TQ, H, G, TK]
    s = s.masked_fill(~keep[:, :, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing selected: 0
    o = torch.einsum("bthgs,bshe->bthge", p, v.to(acc))  # [B, TQ, H, G, Dv]
    return o.reshape(B, TQ, HQ, DV).to(q.dtype)


def dsa(q, k, v, q_idx, k_idx, w_idx, topk=2048, scale=None, return_indices=False,
        backend="auto"):
    """DeepSeek Sparse Attention: the indexer's top-k keys, then sparse_attention over them.

    q, k, v as sparse_attention; q_idx [B, TQ, HI, DI], k_idx [B, TK, DI], w_idx [B, TQ, HI] (or
    None) as indexer_scores (its scale: DI ** -0.5). Returns o [B, TQ, HQ, Dv] (and indices [B, TQ,
    topk] int64, -1 padded, when return_indices). The selection is not differentiable: gradients
    reach q, k, v, never the indexer (section 8.5 trains it by its own loss). Keys of equal score
    (ReLU makes exact zeros common) are a tie: the naive path keeps the earliest, the Triton
    indexer any of them, so the two paths may keep different keys and give different outputs.
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

# %% [markdown]
# The limits first. With `topk` at least the number of keys every past token is selected and DSA *is* causal
# attention — chapter 1's `attention_ref` and PyTorch's SDPA. (The engineering notes check the latent form
# against chapter 3's absorbed MLA, the ops against fla's reference functions and the layer against
# transformers' DeepSeek-V3.2 modules.) Then a selection of 8 tokens a query.

# %% tags=["nbval-ignore-output"]
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

o, idx = dsa(q, k, v, q_idx, k_idx, w_idx, topk=8, return_indices=True, backend="naive")
print("query 44 reads", sorted(idx[0, 44].tolist()),
      "; query 3 reads", sorted(idx[0, 3].tolist(), key=lambda s: (s < 0, s)))

# %% [markdown]
# Query 3 sees four tokens and keeps them all; its other four slots are `-1`. From position 7 on every query reads
# exactly 8 tokens, however long the sequence.
#
# ## 8.3 See it
#
# ### Which tokens a query reads
#
# One sequence of $T = 128$ whose keys carry a few "hot" tokens that every query likes (as in chapter 7). Left,
# what dense attention reads; middle, DSA's selection at $k = 16$ tokens a query; right, NSA's selection from
# chapter 7 (blocks of 8: 2 free ones beside the first, own and previous block, 40 tokens at most).

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
# both (here 16 tokens against NSA's 40); DSA spends all of it on tokens the scorer chose, NSA spends part on
# locality it assumes.
#
# ### The data flow
#
# In DeepSeek-V3.2 the indexer reads MLA's inputs: its queries come from MLA's normalised query latent
# (`q_resid` in transformers), its key and weights from the hidden state. Its key cache (128 numbers a token, FP8
# in production) sits beside MLA's latent cache (576 a token). The sparse attention runs in MLA's absorbed MQA
# form: all 128 heads share one gathered 576-number row a token, whose first 512 numbers are also the value.

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
arrows = [("x", "qlat"), ("qlat", "idx", "$q^I$"), ("x", "idx"), ("x", "ikc", "$k^I$"),
          ("ikc", "idx"),
          ("idx", "top", "I[t, s]"), ("top", "sp"), ("x", "mla"), ("qlat", "mla"), ("mla", "lat"),
          ("lat", "sp"), ("mla", "sp", "q̃, q_rope"), ("sp", "out")]
fig = viz.schematic(boxes, arrows,
                    groups=[(["idx", "top"], "Triton in dsa(), PyTorch in the layer"),
                            (["sp"], "Triton: sparse_attention")],
                    title="DSA on MLA: the indexer chooses, MLA attends to the chosen",
                    size=(11, 4.4))

# %% [markdown]
# ## 8.4 The layer
#
# `LightningIndexer` holds the indexer's four parameters under transformers' names: `wq_b` maps MLA's query latent
# to $H^I$ query heads, `wk` the hidden state to the one index key (then a LayerNorm, `k_norm`), `weights_proj`
# the hidden state to the $H^I$ weights (times $(H^I)^{-1/2}$). RoPE rotates the first `qk_rope_head_dim` numbers
# of each index query and key (half-split for DeepSeek-V3.2, interleaved for GLM-5: the one difference). `forward`
# returns the selection and the scores, which the warm-up trains.
#
# `DSAttention` is chapter 3's `MLA` with an indexer: the same projections and latent cache, the indexer reading
# the query latent $\mathrm{RMSNorm}(W^{DQ} x)$ and $x$, and the attention run by `sparse_attention` in the
# absorbed (latent MQA) form. The indexer's inputs are **detached**: the V3.2 report trains the indexer by its own
# loss only and the main model by the language-model loss only. Its cache (`DSACache`, in the engineering notes)
# adds the index keys (`index_head_dim` a token) beside MLA's 576-number latents. The layer scores its indexer in
# PyTorch (`indexer_scores`, then `select_topk`): an fp32 $[B, T, S]$ score matrix, through a per-head
# $[B, T, H^I, S]$ intermediate that a long prefill cannot afford (16 GiB at 8K tokens with 64 index heads); the
# warm-up's loss needs the scores, so the layer keeps them. Section 8.7's `lightning_indexer` chooses without either;
# the functional `dsa` uses it on a GPU.

# %%
#| export dsa.layer
import torch
from torch import nn

from minisparse import _checks
from minisparse.dsa.naive import causal_mask, indexer_scores, select_topk, sparse_attention
from minisparse.dsa.checks import _check_indexer_config, _check_indexer_input
from minisparse.mla.layer import MLA
from minisparse.attention.naive import _cache_read
from minisparse.mla.naive import MLACache, absorb_output, absorb_query, make_mla_rope


class LightningIndexer(nn.Module):
    """The lightning indexer of DeepSeek-V3.2 / GLM-5 (transformers' parameters: wq_b, wk, k_norm,
    weights_proj). forward(x [B, T, hidden], q_latent [B, T, q_lora_rank], position_embeddings=None
    (transformers' (cos, sin), or the own RoPE at `positions`, default 0 .. T-1)) -> (indices
    [B, T, topk] int64, -1 padded; scores [B, T, T] fp32, -inf above the diagonal).
    rope_interleave: False for DeepSeek-V3.2 (half-split pairs), True for GLM-5."""

    def __init__(self, hidden_size, q_lora_rank, n_heads=64, head_dim=128, rope_dim=64,
                 topk=2048, *, rope_theta=10000.0, rope_interleave=False, rope_scaling=None,
                 norm_eps=1e-6):
        super().__init__()
        self.topk = _check_indexer_config("LightningIndexer", hidden_size, q_lora_rank, n_heads,
                                          head_dim, rope_dim, topk)
        self.hidden_size, self.n_heads, self.head_dim = hidden_size, n_heads, head_dim
        self.rope_dim, self.rope_interleave = rope_dim, rope_interleave
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)  # q latent -> heads
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)  # x -> the one index key
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)  # x -> w[t, j]
        self.rope = make_mla_rope(rope_dim, rope_theta, rope_interleave, rope_scaling)
        self.softmax_scale = head_dim ** -0.5

    def project(self, x, q_latent, positions, position_embeddings=None):
        """-> q_idx [B, T, HI, DI], k_idx [B, T, DI] (rotated), w_idx [B, T, HI] fp32 (fp64 in an
        fp64 layer)."""
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
        w = self.weights_proj(x)  # [B, T, HI]
        w = w.to(torch.promote_types(w.dtype, torch.float32)) * self.n_heads ** -0.5
        return q, k, w

    def forward(self, x, q_latent, position_embeddings=None, positions=None):
        _check_indexer_input("LightningIndexer", self, x, q_latent)
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

# %%
#| export dsa.layer
class DSAttention(MLA):
    """DeepSeek Sparse Attention on MLA (transformers' DeepseekV32Attention parameters: MLA's plus
    `indexer.*`). forward(x [B, T, hidden], cache=None, positions=None, sparse=True,
    return_indices=False) -> [B, T, hidden] (and indices [B, T, topk], scores [B, T, S]). Each
    query attends, in MLA's absorbed form, to the index_topk tokens its indexer ranks highest
    (sparse=False: to all); with a cache (new_cache) the T tokens follow the cached ones, so
    token-by-token decoding gives the prefill's outputs. The indexer's inputs are detached, so the
    output's loss never reaches `indexer.*`: train the indexer with indexer_kl_loss against
    attention_probs (return_indices=True gives its indices and scores), as HybridLM's aux_loss
    does."""

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
        topk = self.indexer.topk if sparse else max(1, c_kv.shape[1])  # every key; S = 0 too
        indices = select_topk(scores.detach(), topk)  # [B, T, topk]
        w_uk, w_uv = self.absorbed_weights()
        q = torch.cat([absorb_query(q_nope, w_uk), q_rope], dim=-1)  # [B, T, H, r + dr]
        k = torch.cat([c_kv, k_rope], dim=-1)[:, :, None]  # [B, S, 1, r + dr]: one row a token
        o = sparse_attention(q, k, k[..., :self.kv_lora_rank], indices, self.scaling, self.backend)
        o = absorb_output(o, w_uv).reshape(B, T, self.num_heads * self.v_head_dim)  # T = 0 too
        o = self.o_proj(o)  # [B, T, hidden]
        return (o, indices, scores) if return_indices else o

    def attention_probs(self, x):
        """The dense attention's probabilities [B, T, H, T] (fp32, fp64 in an fp64 layer; causal):
        the warm-up's target."""
        T = x.shape[1]
        q_nope, q_rope, c_kv, k_rope = self.project(x, torch.arange(T, device=x.device))
        q = torch.cat([absorb_query(q_nope, self.absorbed_weights()[0]), q_rope], dim=-1)
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        s = torch.einsum("bthd,bsd->bths", q.to(acc), torch.cat([c_kv, k_rope], -1).to(acc))
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
# The cache, on a small layer with random weights (4 heads, latent 32 + 8, indexer 16 heads × 16, k = 6): decoding
# one token at a time, each step a `sparse_attention` call with $T_q = 1$ over the cache so far, gives the
# prefill's outputs. (The engineering notes load DeepSeek-V3.2's attention from transformers and compare.)

# %%
from minisparse.dsa.layer import DSACache  # new_cache's class; its code is in the engineering notes

torch.manual_seed(0)
layer = DSAttention(64, 4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=12, index_n_heads=16, index_head_dim=16,
                    index_topk=6, backend="naive")
with torch.no_grad():
    for p in layer.parameters():
        p.normal_(std=0.2)
    x = torch.randn(2, 14, 64, generator=torch.Generator().manual_seed(3))
    out = layer(x)  # the prefill: 14 queries at once
    cache = layer.new_cache(2, 14)
    steps = torch.cat([layer(x[:, t:t + 1], cache) for t in range(14)], dim=1)  # T_q = 1
assert_close("decode token by token = prefill", out, steps, 1e-5)
print(f"cache: {len(cache)} tokens × ({layer.kv_lora_rank} + {layer.qk_rope_head_dim} latent"
      f" + {layer.indexer.head_dim} index-key numbers)")

# %% [markdown]
# ## 8.5 Training the indexer
#
# A fresh indexer chooses at random. DeepSeek started V3.2 from V3.1-Terminus's dense checkpoint and taught the
# indexer to imitate the dense attention first. For query $t$ the target is the
# dense attention summed over the $H$ heads and renormalised, $p_{t,:} = \sum_h P^h_{t,:} / H$ ($P^h$: head $h$'s
# softmax attention probabilities), and the loss is
#
# $$
# \mathcal L^I = \frac{1}{T}\sum_t D_{\mathrm{KL}}\bigl(p_{t,:} \,\big\|\, \operatorname{softmax}(I_{t,:})\bigr)
# $$
#
# averaged over the $T$ queries (the report sums over them, which only rescales the learning rate). Two phases:
#
# - **Dense warm-up**: the main model frozen and attending densely, only the indexer trains (1,000 steps of
#   16 sequences of 128K tokens in the report, learning rate $10^{-3}$).
# - **Sparse training**: top-k selection switched on, everything trains; the indexer's loss is restricted to
#   its selected set $S_t$ (both distributions renormalised there), and the indexer's inputs are detached, so
#   the main model learns from the language-model loss alone (15,000 steps, k = 2,048; the engineering notes run
#   this phase at reading size).
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
    Returns a scalar fp32 tensor (fp64 for fp64 scores; 0 for no queries).
    """
    B, TQ, TK = _check_attention_probs("indexer_kl_loss", p_attn, indices, scores)
    keep = causal_mask(TQ, TK, scores.device).expand(B, TQ, TK)  # [B, TQ, TK]
    if indices is not None:
        keep = keep & selection_mask(indices, TK)
    acc = torch.promote_types(scores.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    target = p_attn.detach().to(acc).sum(2).masked_fill(~keep, 0.0)  # [B, TQ, TK]
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)  # [B, TQ, TK], rows sum to 1
    log_q = torch.log_softmax(scores.to(acc).masked_fill(~keep, float("-inf")), -1)  # [B, TQ, TK]
    # xlogy: 0 · log 0 = 0 where the target is 0
    kl = torch.xlogy(target, target) - target * log_q.masked_fill(~keep, 0.0)  # [B, TQ, TK]
    return kl.sum() / max(B * TQ, 1)  # the mean over queries; 0, not NaN, when there are none


def attention_recall(p_attn, indices):
    """The share of the head-summed dense attention mass on the selected keys, per query [B, TQ].
    p_attn [B, TQ, H, TK], indices [B, TQ, K]; a query without mass recalls 0."""
    _check_attention_probs("attention_recall", p_attn, indices)
    p = p_attn.detach().float().sum(2)  # [B, TQ, TK]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return (p * selection_mask(indices, p.shape[-1])).sum(-1)

# %% [markdown]
# At reading size: one `DSAttention` layer (hidden 64, 4 heads, an indexer of 4 heads × 16, k = 8) over sequences of
# $T = 64$ tokens from a vocabulary of 64 random embeddings. Its main weights are random but scaled up, so that its
# dense attention is concentrated on a few tokens, though less than a trained model's: the best 8 tokens hold 60 %
# of it. What matters below is how close the indexer gets to that best, not the absolute recall (with $k$ = 2,048 of
# 128K, a real model's best $k$ holds far more). Recall is measured on held-out sequences for queries that see more
# than 16 tokens, against the best any 8 tokens could do (the top-8 of $p_t$ itself).

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


def best_recall(k):
    """What the best k tokens can hold: the top-k of the dense attention itself."""
    top = select_topk(p_eval.sum(2).masked_fill(~causal_mask(64, 64), -torch.inf), k)
    return attention_recall(p_eval, top)[:, 16:].mean().item()


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
        _, _, scores = student(x, return_indices=True)  # the indexer's scores; the output is unused
        loss = indexer_kl_loss(p, scores)
        if step % log_every == 0:  # before this step's update: step 0 is the fresh indexer
            log.append((step, loss.item(), recall_now()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return log

# %% tags=["nbval-ignore-output"]
ks = [1, 2, 4, 8, 16, 32]
recall_before = {k: recall_now(k) for k in ks}
log = warm_up()
for step, loss, rec in log:
    print(f"step {step:3d}  KL {loss:.3f}  recall of the top-8: {rec:.2f}")
best = best_recall(8)
print(f"the best any 8 tokens can hold: {best:.2f}")
assert log[-1][2] > 2 * log[0][2] and log[-1][2] > 0.8 * best, (log[0], log[-1], best)

# %% [markdown]
# The KL falls and the recall of the top-8 more than doubles, to about 90 % of what the best 8 tokens hold. Against
# $k$, before and after the warm-up: the trained indexer reaches a given recall with far fewer tokens.

# %%
recall_after, recall_best = ({k: f(k) for k in ks} for f in (recall_now, best_recall))
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
# Move $k$: left, the dense attention (head-summed, one held-out sequence); right, the tokens the warmed-up
# indexer keeps. Where the dense attention is bright the selection should be too (the colour scale stops at the
# 99th percentile, so that the few strongest weights do not blacken the rest). (The built book shows the first
# picture; in Jupyter or Colab every change redraws.)

# %% tags=["nbval-ignore-output"]
import copy

warmed = copy.deepcopy(student).requires_grad_(False)  # as warmed up (the notes train on)


def draw_selection(k=8):
    with torch.no_grad():
        warmed.indexer.topk = k
        _, idx, _ = warmed(x_eval[:1], return_indices=True)
    rec = attention_recall(p_eval[:1], idx)[0, 16:].mean().item()
    p = p_eval[0].sum(1) / 4  # [T, T]
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.4))
    viz.heatmap(axes[0], p.masked_fill(~causal_mask(64, 64), float("nan")), "dense attention p",
                cmap="magma", vmin=0, vmax=float(p.quantile(0.99)))
    viz.heatmap(axes[1], selection_mask(idx, 64)[0].float(), f"top-{k}: recall {rec:.2f}",
                cmap="Blues", vmin=0, vmax=1)
    fig.tight_layout()
    plt.show()


explorer = viz.explorer(draw_selection, k=(1, 32, 1))

# %% [markdown]
# ## 8.6 Cost model
#
# Count per token: a token at position $t$ sees $c = t + 1$ keys. One layer's attention core, at DeepSeek-V3.2's
# shapes: $H = 128$ heads; the latent $d_c = 512$ and RoPE $d_R = 64$ key dims; $d_{qk} = 192$ and $d_v = 128$ in
# the expanded form; an indexer of $H^I = 64$ heads × $d^I = 128$; $k = 2{,}048$ (here $c$ counts keys; section
# 8.1's $c_s$ is a cache entry):
#
# - **dense** (V3.1), prefill in MLA's expanded form, as DeepSeek prefills: $2 H c\,(d_{qk} + d_v)$ FLOPs
#   (`mha_decode_flops`); decoding reads the latent cache, $c\,(d_c + d_R)$ numbers (`mla_decode_bytes`);
# - **indexer**: $2 H^I d^I c$ FLOPs; decoding reads $c$ index keys of $d^I$ numbers (FP8: a byte each plus a
#   4-byte scale a token);
# - **selection**: one comparison a score; when decoding, the fp32 score row written and read;
# - **sparse attention** in the latent MQA form over $\min(c, k)$ keys: $2 H \min(c,k)\,(2 d_c + d_R)$ FLOPs
#   (`mla_decode_flops`), $\min(c, k)$ latent rows read when decoding.
#
# DeepSeek runs DSA in MLA's latent (MQA) form, as this model and section 8.7's kernels do; only for short
# prefills does the V3.2-Exp report switch to a masked MHA: the expanded form over all $c$ keys with the unselected
# ones masked, which at $c \le k$ (every key kept) costs $320H$ multiply-adds a key pair where the latent form costs
# $1088H$. The break-even points below hold for the latent form.
#
# Not counted: the projections (the same for both, plus the indexer's $O(1)$ a token), the exponentials, and
# whether a kernel reaches the arithmetic or bandwidth peak. With `index_fp8` the indexer's FLOPs count half
# (FP8 runs at twice bf16's tensor-core rate). The selection's one comparison a score makes it look free; section
# 8.8 measures otherwise (on an H100 at 64K `torch.topk` adds 24 ms to the indexer's 73).

# %%
#| export dsa.cost
import numpy as np

from minisparse import _checks
from minisparse.mla.cost import mha_decode_flops, mla_decode_bytes, mla_decode_flops


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
    c = np.asarray(_checks.lengths("dsa_cost", "position", position), dtype=np.float64) + 1
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
pos = np.arange(0, 131072, 512)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(pos, model_prefill_flops(pos, dsa=False) / 1e9, "C7", label="dense MLA (V3.1)")
axes[1].plot(pos, dsa_cost(pos, "decode")["dense"] / 1e6, "C7", label="dense MLA (V3.1)")
for fp8, style in ((False, "C0"), (True, "C0--")):
    label = f"DSA, {'FP8' if fp8 else 'bf16'} indexer"
    axes[0].plot(pos, model_prefill_flops(pos, index_fp8=fp8) / 1e9, style, label=label)
    axes[1].plot(pos, dsa_cost(pos, "decode", index_fp8=fp8)["dsa"] / 1e6, style, label=label)
for ax, what in zip(axes, ("Prefill: GFLOP a token, model", "Decoding: MB read a token, layer")):
    ax.set(xlabel="token position", title=what)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
seq, fl = np.arange(131072), model_prefill_flops
at = {"prefill, the token at 128K": fl(seq[-1]) / fl(seq[-1], dsa=False),
      "prefill, a 128K sequence": fl(seq).sum() / fl(seq, dsa=False).sum(),
      "decoding at 128K, attention bytes": dsa_cost(131071, "decode")["ratio"],
      "decoding at 128K, FP8 index keys": dsa_cost(131071, "decode", index_fp8=True)["ratio"]}
for name, r in at.items():
    print(f"{name}: DSA costs {r:.0%} of dense ({1 - r:.0%} saved)")

# %% [markdown]
# So "about 50 % less compute at 128K" [S] is the size the model gives for a whole 128K prefill (57 % saved over the
# sequence, 67 % for its last token, bf16 indexer): the attention core drops to about 30 % over the sequence (a
# fifth with an FP8 indexer) and a quarter for the last token (0.15 with FP8), and the rest of the model dilutes the
# saving. Decoding
# saves more: it is bandwidth-bound, and the FP8 indexer reads 132 bytes a token where dense MLA reads 1,152, so at
# 128K a step reads about a seventh (bf16 index keys: a quarter) of dense's.
#
# **FP8** halves the indexer's key cache and doubles its tensor-core rate. Its scores only rank tokens, so
# rounding matters only where it flips a choice at the top-k boundary, between candidates of about equal attention
# mass; the engineering notes round section 8.5's indexer to e4m3: most choices and the recalled mass survive.

# %% [markdown]
# ### Why the head count matters
#
# Per (query, key) pair the indexer does $H^I d^I = 64 \times 128 = 8192$ multiply-adds. Dense attention in the
# expanded form does $H (d_{qk} + d_v) = 320 H$: 40,960 for V3.2's 128 heads — five times the indexer — but only
# 5,120 for a 16-head layer, *less* than the indexer. The indexer is quadratic like dense attention, so with
# 16 heads and a bf16 indexer DSA can never win on arithmetic in prefill: it replaces one quadratic term with a
# larger one (an FP8 indexer, at twice the rate, breaks even from about 35K keys). The plot: DSA's cost relative to
# dense, per token, against the keys it sees (solid: the ratio; dotted: the indexer's share of DSA's cost).

# %%
pos = 2 ** np.arange(9, 18) - 1  # 512 … 128K
fig, ax = plt.subplots(figsize=(7, 3.4))
for heads, colour in ((128, "C0"), (16, "C3")):
    for fp8, style in ((False, "-"), (True, "--")):
        cost = dsa_cost(pos, heads=heads, index_fp8=fp8)
        ax.plot(pos + 1, cost["ratio"], style, color=colour, marker="o", ms=3,
                label=f"{heads} heads, {'FP8' if fp8 else 'bf16'} indexer")
        if not fp8:
            ax.plot(pos + 1, cost["share"], ":", color=colour,
                    label=f"{heads} heads: the indexer's share of DSA")
ax.axhline(1, color="k", lw=0.8)
ax.set_ylabel("DSA / dense FLOPs a token;\ndotted: indexer / DSA")
ax.set_yscale("log", base=2)
viz.tokens_axis(ax, "keys the token sees")
ax.legend(fontsize=7.5, ncol=2)
plt.show()

# %% [markdown]
# With 128 heads a token of DSA's prefill is cheaper than dense from about 8.7K keys (7.7K with FP8); summed over a
# whole prefill, which pays for its early tokens too, DSA breaks even at about 16.3K tokens (14.4K with FP8). The
# indexer's share of DSA's cost rises to about 80 % at 128K, because the sparse attention stops growing at $k$. With
# 16 heads a bf16 indexer never breaks even and an FP8 one only from about 35K keys. GLM-5's attention (64 heads of
# 256 + 256, indexer 32 × 128) sits comfortably on the winning side: its indexer is an eighth of its dense
# attention. The engineering notes compute and check these numbers.
#
# ## 8.7 Fast: the lightning indexer and sparse MLA in Triton
#
# ### Gather instead of mask
#
# The naive `sparse_attention` builds a `[Tq, Tk]` mask and scores every key, the selected ones and the rest:
# dense work, sparse result. A kernel must do the opposite — touch only the $k$ selected rows: a **gather** of
# each query's $k$ key rows (`[B, Tq, k, H, D]`), scored, softmaxed over the $k$ slots (padding masked), and the
# gathered values averaged. Work and memory are $O(T_q k)$ instead of $O(T_q T_k)$; in the latent form the $H_Q$
# heads of a query share its gathered 576-number rows, so one row loaded serves a block of heads (64 on sm_90: two
# blocks a token, the second finding the rows in L2).

# %%
#| export dsa.naive
def gather_attention(q, k, v, indices, scale=None):
    """sparse_attention by gathering the selected rows: O(TQ·K) work and memory, no [TQ, TK] mask
    (the kernels' formulation). Same arguments and result as sparse_attention."""
    B, TQ, TK, HQ, H, D, DV, scale = _check_sparse_args("gather_attention", q, k, v, indices, scale)
    K = indices.shape[-1]
    rows = indices.long().clamp(min=0)  # [B, TQ, K]: padding reads row 0, then is masked
    b = torch.arange(B, device=q.device)[:, None, None]  # [B, 1, 1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    k_sel, v_sel = k[b, rows].to(acc), v[b, rows].to(acc)  # [B, TQ, K, H, D], [B, TQ, K, H, Dv]
    qg = q.to(acc).view(B, TQ, H, HQ // H, D)  # [B, TQ, H, G, D]
    s = torch.einsum("bthgd,btkhd->bthgk", qg, k_sel) * scale  # [B, TQ, H, G, K]
    s = s.masked_fill((indices < 0).view(B, TQ, 1, 1, K), float("-inf"))  # [B, TQ, H, G, K]
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # [B, TQ, H, G, K]
    o = torch.einsum("bthgk,btkhe->bthge", p, v_sel)  # [B, TQ, H, G, Dv]
    return o.reshape(B, TQ, HQ, DV).to(q.dtype)

# %%
def chosen_scores(scores, indices):
    """The scores of a selection, sorted: equal for two selections that differ only in ties."""
    s = scores.gather(-1, indices.clamp(min=0)).masked_fill(indices < 0, -torch.inf)
    return s.sort(-1).values


q, k, v = make_qkv(2, 45, 8, 16, HKV=2, seed=1)  # section 8.2's example
scores8 = indexer_scores(q_idx, k_idx, w_idx)  # [2, 45, 45]
idx8 = select_topk(scores8, 8)
_ = assert_close("gather = mask", sparse_attention(q, k, v, idx8, backend="naive"),
             gather_attention(q, k, v, idx8), 1e-6)

# %% [markdown]
# ### The kernels
#
# **Sparse attention over gathered tokens.** Each query token brings its own `topk` key positions, shared by all its
# heads; every key row is fetched through an index (chapter 7 gathered blocks of 64 contiguous keys). What makes it
# cheap is chapter 7's idea: a program owns one query token and a block of `BG` query heads that read one key head (in
# MLA's latent form a single key head: 64 of its 128 heads on sm_90, two programs a token side by side), and loads each
# gathered row once for its block. A decoding step (one query token) has too few such programs to fill a GPU, so the
# kernel also splits the `topk` list into pieces whose partial softmax states a small kernel merges — chapter 3's
# split-K over 2,048 selected tokens instead of the whole cache. **The indexer's scores** are computed tile by tile for
# a chunk of queries, so memory stays at `chunk × T`; **the top-k** is PyTorch's `torch.topk` on each chunk (a fused
# running top-k of 2,048 entries a query would not fit on chip).
#
# MLA's absorbed form is the call with `H = 1`, `D = 512 + 64` and `v = k[..., :512]`, a view: the entry point sees
# that the value is the leading part of the key rows and reads it from the key tile it already holds. Key dims that
# are not a power of two (576, 192) are split into a power-of-two head `BDA` and a tail `BDB` (512 + 64, 128 + 64):
# two tensor-core products `q_a k_aᵀ + q_b k_bᵀ`, no padding of 576 to 1,024. Names follow fla: `o_` offsets, `m_`
# masks, `b_` on-chip blocks, `i_` program indices.

# %%
#| export dsa.triton
import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime
from minisparse.dsa.checks import check_indexer_args, check_indices, check_topk
from minisparse.mla.triton import merge_partial

# %% [markdown]
# ### The forward kernel
#
# A program holds the query rows of its head block, walks the token's index row a tile of `BN` slots at a time,
# gathers those key rows and runs flash attention's online softmax over them (in base 2: `exp2` with the scale
# folded into `log₂e`). `tl.dot` wants tiles of at least 16 rows, so a group of G < 16 heads is padded to 16 rows
# and masked. Padding slots (−1) and keys after the query are masked in the loads, so a tile of padding loads
# nothing. Offsets are 64-bit: at 128K tokens × 128 heads × 576 dims a query tensor has 9.7·10⁹ elements. With
# `SPLIT` the program covers one piece of the index row and writes its partial state for the merge kernel.

# %%
#| export dsa.triton
@triton.jit
def sparse_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, acc_ptr, m_ptr, l_ptr,
                      B, TQ, TK, TOPK, SPLIT_LEN, ROWS, qk_scale,
                      HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BDA: tl.constexpr, BDB: tl.constexpr,
                      BDV: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                      V_IS_KA: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Sparse attention over gathered key rows, forward. Grid (TQ·B·H·NHB, NS), NHB = ⌈G / BG⌉:
    program (i_t, i_b, i_h, i_hb; i_s) owns query token i_t of sequence i_b, the BG query heads
    i_h·G + i_hb·BG … of key head i_h (masked past G), and slots [i_s·SPLIT_LEN, …) of the
    token's index row; the head blocks of one token run side by side and share its rows in L2.

        for each tile of BN slots:   idx [BN] -> k_a, k_b, v gathered (v = k_a if V_IS_KA)
            s = (q_a k_aᵀ + q_b k_bᵀ)·qk_scale [BG, BN]   −∞ at idx < 0 and idx > position
            online softmax in base 2: m, l, acc
        SPLIT = False: o = acc / l, lse = m + log₂ l (0, 0 for a query with no key)
        SPLIT = True:  acc, m, l to piece i_s of the partial buffers [NS, ROWS = B·TQ·HQ, …]

    qk_scale = scale·log₂e. V_IS_KA (MLA): BDV = BDA, v_ptr None; acc/m/l_ptr None unless SPLIT.
    """
    NHB: tl.constexpr = (G + BG - 1) // BG  # head blocks a key head
    pid = tl.program_id(0).to(tl.int64)
    i_t, i_bhg = pid // (B * H * NHB), pid % (B * H * NHB)  # B·H·NHB programs a token
    i_s = tl.program_id(1)
    i_b, i_h, i_hb = i_bhg // (H * NHB), (i_bhg // NHB) % H, i_bhg % NHB
    pos = i_t + TK - TQ  # the query's position among the keys
    o_g = i_hb * BG + tl.arange(0, BG)  # [BG] heads within the group
    m_g = o_g < G
    row = (i_b * TQ + i_t) * HQ + i_h * G + o_g  # [BG] rows of q, o, lse ([B·TQ·HQ, …] views)
    o_da, o_dv, o_n = tl.arange(0, BDA), tl.arange(0, BDV), tl.arange(0, BN)
    b_qa = tl.load(q_ptr + row[:, None] * D + o_da[None, :],
                   mask=m_g[:, None] & (o_da[None, :] < D), other=0.0)
    if BDB > 0:
        o_db = BDA + tl.arange(0, BDB)
        b_qb = tl.load(q_ptr + row[:, None] * D + o_db[None, :],
                       mask=m_g[:, None] & (o_db[None, :] < D), other=0.0)
    k_base = k_ptr + (i_b * TK * H + i_h) * D  # key head i_h of sequence i_b; token n at + n·H·D
    if not V_IS_KA:
        v_base = v_ptr + (i_b * TK * H + i_h) * DV
    idx_row = idx_ptr + (i_b * TQ + i_t) * TOPK
    start = i_s * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, TOPK)

    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BDV], tl.float32)
    for n0 in range(start, end, BN):
        o_slot = n0 + o_n
        i_k = tl.load(idx_row + o_slot, mask=o_slot < end, other=-1).to(tl.int64)  # [BN] keys
        m_n = (i_k >= 0) & (i_k <= pos)
        b_ka = tl.load(k_base + i_k[:, None] * (H * D) + o_da[None, :],
                       mask=m_n[:, None] & (o_da[None, :] < D), other=0.0)  # [BN, BDA]
        b_s = tl.dot(b_qa, tl.trans(b_ka), input_precision=PRECISION)  # [BG, BN]
        if BDB > 0:
            b_kb = tl.load(k_base + i_k[:, None] * (H * D) + o_db[None, :],
                           mask=m_n[:, None] & (o_db[None, :] < D), other=0.0)
            b_s = tl.dot(b_qb, tl.trans(b_kb), b_s, input_precision=PRECISION)
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mr = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # finite for rows that saw nothing yet
        b_p = tl.exp2(b_s - b_mr[:, None])  # [BG, BN]
        alpha = tl.exp2(b_m - b_mr)
        b_l = b_l * alpha + tl.sum(b_p, 1)
        if V_IS_KA:
            b_v = b_ka  # MLA: the value is the latent part of the key row (BDV = BDA)
        else:
            b_v = tl.load(v_base + i_k[:, None] * (H * DV) + o_dv[None, :],
                          mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)  # [BN, BDV]
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_m = b_mn

    m_o = m_g[:, None] & (o_dv[None, :] < DV)
    if SPLIT:
        part = i_s.to(tl.int64) * ROWS + row  # [BG] rows of the partial buffers [NS, ROWS, …]
        tl.store(acc_ptr + part[:, None] * DV + o_dv[None, :], b_acc, mask=m_o)
        tl.store(m_ptr + part, b_m, mask=m_g)
        tl.store(l_ptr + part, b_l, mask=m_g)
    else:
        seen = b_l > 0  # a query whose slots were all padding: o = 0
        b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
        tl.store(o_ptr + row[:, None] * DV + o_dv[None, :], b_o.to(o_ptr.dtype.element_ty),
                 mask=m_o)
        b_lse = tl.where(seen, b_m + tl.log2(tl.where(seen, b_l, 1.0)), 0.0)
        tl.store(lse_ptr + row, b_lse, mask=m_g)

# %% [markdown]
# The backward replays this walk (its `dk`, `dv` by fp32 atomic adds); it, the merge kernel, the launchers and
# the public op `sparse_attention_triton` are in the engineering notes.
#
# ### The lightning indexer's score kernel
#
# The indexer has `HI` heads of `DI` dims and one key per token, shared by the heads (MQA). For `BT` query tokens,
# stack their `HI` head rows into one `[BT·HI, DI]` matrix: one tensor-core product against a key tile gives every
# head's dot product with every key, and the rest is element-wise. Since `scale > 0`, `ReLU(scale·x) =
# scale·ReLU(x)` and the scale folds into the weights. The program keeps its query rows on chip and streams the
# keys, as flash attention does; each key tile read once serves `BT · HI` rows (256 at BT = 4, HI = 64):
#
# ```
# q [BT·HI, DI]    the BT tokens' head rows (row r: token r // HI, head r % HI), loaded once
# w·scale [BT·HI]
# for each key tile k [BN, DI] up to the block's last query:
#     x = k qᵀ               [BN, BT·HI]   the only tensor-core work (keys as rows: the head sum stays in a warp)
#     I = Σ_heads w·ReLU(x)  [BN, BT]      a reshape to [BN, BT, HI] and a sum; −∞ after each query
# the tiles after the block's last query: −∞, no product
# ```
#
# A chunk of queries' scores land in a `[chunk, W]` fp32 buffer of about 1 GiB (W: the keys its last query sees;
# 4,096 queries at 64K), then `torch.topk(sorted=False)` keeps each row's `topk` largest, `−∞` (future) entries
# coming back as the padding `−1`. A decoding step splits the keys instead, so that 16 sequences fill the GPU.
# On sm_89 and newer `q_idx`, `k_idx` may be `float8_e4m3fn`: the product runs in FP8, the rest stays fp32. The
# kernel and its launcher `lightning_indexer` are in the engineering notes.

# %% [markdown]
# Against the naive ops on section 8.2's example (on a CPU in Triton's interpreter, fp32): the same selected sets
# (compared by their scores: ReLU makes ties at 0 common) and outputs; the latent form's gradients are in the notes.

# %%
from minisparse.dsa.triton import lightning_indexer, sparse_attention_triton

qi, ki, wi = (t.to(DEVICE) for t in (q_idx, k_idx, w_idx))
idx_k = lightning_indexer(qi, ki, wi, 8).cpu()
assert torch.equal(chosen_scores(scores8, idx_k), chosen_scores(scores8, idx8))
o_k = sparse_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), idx8.to(DEVICE))
_ = assert_close("kernel = naive", sparse_attention(q, k, v, idx8, backend="naive"), o_k.cpu(),
                 1e-5)

# %% [markdown]
# ## 8.8 Measure
#
# `bench/dsa.py` times one layer at DeepSeek-V3.2's shapes (bf16, forward only): a prefill of one sequence —
# indexer scores, + top-k, + sparse attention in the latent form — against dense causal SDPA of the same layer in
# the expanded form, with a bf16 and an FP8 indexer; and a decoding step of 16 sequences at 64K against chapter 3's
# `mla_decode` over the whole cache. The cell plots the committed run (`bench/results/dsa.json`) and
# tabulates it.

# %% tags=["nbval-ignore-output", "hide-input"]
from minisparse import bench

try:
    res = bench.load_results("dsa")
except (FileNotFoundError, OSError, ValueError):
    res = None
    print("bench/results/dsa.json is not committed: run bench/dsa.py on a GPU (bench/README.md)")
if res is not None:
    ms = {(r["impl"], r["pass"], r["T"]): r["ms"] for r in res["rows"] if r.get("ms")}
    keeps = {r["T"]: r["overlap"] for r in res["rows"] if r["impl"] == "fp8 overlap"}
    Ts, TD = res["config"]["T"], res["config"]["decode"]["T"]
    DENSE = "dense SDPA (expanded, 128 heads)"
    PREFILL = {DENSE: "-", "DSA prefill": "-", "DSA prefill, FP8 indexer": "--",
               "sparse attention": ":", "indexer + top-k": "-."}  # impl: line style
    STEP = ["mla_decode (full cache)", "DSA decode step", "DSA decode step, FP8 indexer",
            "DSA decode indexer + top-k", "DSA decode attention"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw=dict(width_ratios=[1.3, 1]))
    bench.plot_results(dict(res, rows=[r for r in res["rows"] if r["impl"] in PREFILL]),
                       passes=["prefill fwd"], ax=axes[0], logy=True, legend=False)
    for line in axes[0].get_lines():
        line.set_linestyle(PREFILL[line.get_label()])
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("prefill forward (ms)")
    GRAPH = ", CUDA graph"  # the same call captured once and replayed: no host work between kernels
    y = np.arange(len(STEP))[::-1]
    for dy, suffix, label in ((0.2, "", "called from Python"), (-0.2, GRAPH, "as a CUDA graph")):
        bars = axes[1].barh(y + dy, [ms[i + suffix, "decode", TD] for i in STEP], height=0.4,
                            label=label)
        axes[1].bar_label(bars, fmt=" %.3f", fontsize=7)
    axes[1].set_yticks(y, STEP, fontsize=8)
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].set_xlim(0, 1.3 * ms[STEP[0], "decode", TD])
    axes[1].set_xlabel(f"ms per decoding step (B {res['config']['decode']['B']}, {TD // 1024}K)")
    fig.tight_layout()
    plt.show()

    ratio = {(fp8, T): ms[DENSE, "prefill fwd", T] / ms["DSA prefill" + fp8, "prefill fwd", T]
             for fp8 in ("", ", FP8 indexer") for T in Ts}
    table = {f"{p.split(' (')[0]} (ms)": [f"{ms[p, 'prefill fwd', T]:.1f}" for T in Ts] for p in (
        DENSE, "DSA prefill", "indexer scores", "indexer scores, FP8 indexer", "indexer + top-k",
        "sparse attention")}
    table["dense / DSA"] = [f"{ratio['', T]:.2f}x" for T in Ts]
    table["dense / DSA, FP8 indexer"] = [f"{ratio[', FP8 indexer', T]:.2f}x" for T in Ts]
    table["FP8 top-k kept (of bf16)"] = [f"{keeps[T]:.1%}" for T in Ts]
    print(f"{res['device']}, {res['date']}, torch {res['torch']}, triton {res['triton']}, bf16")
    for name, cells in {"prefill, B 1": [f"{T // 1024}K" for T in Ts], **table}.items():
        print(f"{name:33s}" + "".join(f"{c:>9s}" for c in cells))
    dec = {i + g: ms[STEP[0] + g, "decode", TD] / ms[i + g, "decode", TD]
           for i in STEP[1:] for g in ("", GRAPH)}
    for g, how in (("", "from Python"), (GRAPH, "CUDA graphs")):
        print(f"decoding {TD // 1024}K, B 16, {how}: mla_decode / DSA step "
              f"{dec['DSA decode step' + g]:.2f}x, "
              f"FP8 step {dec['DSA decode step, FP8 indexer' + g]:.2f}x, "
              f"attention {dec['DSA decode attention' + g]:.1f}x")

# %% [markdown]
# What the run says (H100, 2026-12-05, torch 2.11, Triton 3.6, CUDA 13.0):
#
# - **Prefill: DSA passes dense attention only from 64K** — 0.25× at 8K, 0.73× at 32K, 1.26× at 64K, 1.85× at 128K
#   (1.39× and 2.16× with the FP8 indexer). *Arithmetic*: the latent form does $576 + 512$ multiply-adds a head per
#   selected key where dense's expanded form does $192 + 128$, so the sparse attention alone costs more than dense for a
#   token below 7K keys (with its indexer, below 8.7K); an 8K prefill of DSA does 1.7× dense's FLOPs, a 64K one 41 %.
#   *Rate*: SDPA runs at about 570 TFLOP/s, our indexer at 480 and the sparse attention at about 245 (of 989), and
#   the top-k adds 24 ms at 64K (indexer 73 ms, with top-k 97; sparse attention 150, the larger part; dense 308). At
#   SDPA's rate, DSA's prefill would be about 2× faster than dense at 64K (1.26× measured). At 128K the indexer
#   (274 ms) and its top-k (108 ms, reading every score) outweigh the sparse attention (303 ms), which grows only
#   linearly once $T$ passes $k$.
# - **FP8** makes the indexer 1.6× faster (73 → 45 ms at 64K), not the tensor cores' 2×, and the prefill about
#   10 % faster at 64K, 17 % at 128K; it keeps 95.5–97.8 % of the bf16 top-k (random inputs cast to e4m3 without the
#   per-row scales of real caches).
# - **Decoding** at 64K (16 sequences) as a CUDA graph, as serving engines run it: the FP8 step is 5.3× faster than
#   `mla_decode` over the whole cache (0.214 against 1.137 ms); bf16 index keys give 4.4×, the sparse attention alone
#   13×. Called from Python the step takes 0.45–0.57 ms (2.5× and 2.0×): the host's work outlasts the kernels, and how
#   long it takes depends on the machine's CPU (`bench/notes/dsa.md`). Section 8.6's byte count bounds the step at 3.8×
#   (bf16) and 6.5× (FP8) at HBM speed; the bf16 step beats its bound (4.4× against 3.8×) because `mla_decode` at 128
#   heads is compute-bound (chapter 3).
#
# The kernels are correct (their tests pass in bf16 and fp16 on the H200 and the H100); the prefill is slower than
# the model allows; the engineering notes check every number above.

# %% [markdown]
# ## 8.9 Exercises
#
# Each has a stub, a cell that checks it (one line when right, what differs when not) and a hidden solution.

# %%
import triton
import triton.language as tl

from minisparse.dsa.exercises import (check_break_even, check_index_score_tile,
                                      check_scores_by_chunks, indexer_scores_by_chunks_with_a_bug,
                                      load_index_queries)
from minisparse.testing import attempt

# %% [markdown]
# ### Exercise 1 (derive): where DSA breaks even
#
# In prefill, take the token that sees $c \ge k$ keys. Dense MLA (expanded form) spends $H (d_{qk} + d_v) =
# H \cdot 320$ multiply-adds on each key it sees; DSA's indexer spends $H^I d^I$ on each key it scores (half as
# much time with an FP8 indexer, which runs at twice the rate), and its sparse attention (latent form) $H \cdot
# 1088$ on each of the $k$ keys it keeps. Write the number of keys $c$ at which the two tokens cost the same, as a
# float, or `math.inf` when DSA never gets cheaper. The checker
# tries 128 and 16 heads, bf16 and FP8 indexers, and two other shapes (section 8.6's plot also counts the
# selection's comparison a key, so its numbers differ from this count: by one key with 128 heads, by 18 keys
# (0.05 %) with 16 heads and FP8).

# %%
def my_break_even(H, HI, DI, k, fp8):
    # your code here: the break-even number of keys c, or math.inf
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
# ### Exercise 2 (debug): scoring a chunk of queries at a time
#
# A long prefill cannot afford `indexer_scores`'s `[B, TQ, HI, TK]` intermediate (16 GiB at 8K tokens with 64 index
# heads, section 8.4), so section 8.7's indexer scores a chunk of queries at a time.
# `indexer_scores_by_chunks_with_a_bug` does the same with `indexer_scores` on each chunk: its last chunk comes out
# right, the others let queries read keys after them. Find why (compare it with `indexer_scores` on a 9-token prefill in chunks of 4), and write
# `my_scores_by_chunks(q_idx, k_idx, w_idx, chunk)`: `indexer_scores`' result, with no tensor larger than one
# chunk's `[B, chunk, HI, TK]` or the `[B, TQ, TK]` result — the checker enforces that bound, on four shapes,
# three of them with the queries the last of a longer cache ($T_Q < T_K$).

# %%
def my_scores_by_chunks(q_idx, k_idx, w_idx, chunk):
    # your code here: the scores of indexer_scores, `chunk` queries at a time
    raise NotImplementedError


# %%
attempt(check_scores_by_chunks, my_scores_by_chunks)

# %% tags=["hide-input"] mystnb={"code_prompt_show": "Show the solution", "code_prompt_hide": "Hide the solution"}
# Solution — indexer_scores places the queries it gets at the last positions of the keys it
# gets (query i at TK − TQ + i). A chunk that is not the last is not there: its queries come
# earlier. Give each chunk the keys up to its own last query, k_idx[:, :TK − TQ + c1]: its queries
# are then the last of those, at the right positions, and every key after them is in the future
# for the whole chunk.
def scores_by_chunks_solution(q_idx, k_idx, w_idx, chunk):
    B, TQ, TK = q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]
    out = torch.full((B, TQ, TK), float("-inf"))
    for c0 in range(0, TQ, chunk):
        c1 = min(c0 + chunk, TQ)
        end = TK - TQ + c1  # the keys up to the chunk's last query
        out[:, c0:c1, :end] = indexer_scores(q_idx[:, c0:c1], k_idx[:, :end], w_idx[:, c0:c1])
    return out


check_scores_by_chunks(scores_by_chunks_solution)

# %% [markdown]
# ### Exercise 3 (Triton): the indexer's score tile
#
# The inner step of a lightning-indexer kernel: for one query at position `t`, score a tile of `BN` keys
# starting at `n0`, $s_n = \sum_j w_j \operatorname{ReLU}(\text{scale} \cdot q_j \cdot k_n)$, `[BN]`. Keys after the
# query ($n > t$) and past the end ($n \ge T_K$) must score `-inf`, and the key load itself must be masked at
# $n \ge T_K$: a read past the end of `k` is a bug even where its score is then overwritten, and no comparison of
# outputs can see it (the checker watches the addresses your loads read when the kernel runs in Triton's
# interpreter). The `HI` query heads (padded to `BH`) and their weights are loaded for you; `k` is
# `[T_K, DI]` row-major. The checker launches your kernel (on the GPU if there is one, else in the interpreter) on
# 1 to 5 heads, DI = 8 to 32, a tile that straddles the query and one that runs past $T_K$, and says which score
# differs.

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
attempt(check_index_score_tile, my_index_score_kernel)  # prints ✗ until you write the kernel

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
#   over its scores, and attention over the $k$ chosen tokens only, one choice shared by all heads; with $k \ge T$
#   it is causal attention. On MLA it runs in the latent MQA form: one 576-number row a token, whose first 512
#   numbers are also the value, gathered once for each block of 64 heads.
# - **Training**: the indexer learns by distillation, KL from the dense attention's head-summed distribution,
#   first with the main model frozen, then with sparse attention switched on; its inputs are detached, so the two
#   losses do not mix. At reading size the top-8 recall more than doubles.
# - **Cost**: the indexer is still $O(T^2)$, at $64 \times 128$ multiply-adds a pair against dense MLA's $128 \times
#   320$. At V3.2's shapes a 128K prefill costs about 43 % of dense over the whole model, a decoding step reads a
#   seventh of the attention bytes with FP8 index keys (a quarter in bf16); a token of DSA is cheaper than dense
#   from about 8.7K keys with 128 heads (a whole prefill from about 16.3K tokens) and never, in bf16, with 16 —
#   the head count decides (prefill with a bf16 indexer; an FP8 indexer, counted as half its FLOPs: break-even at
#   7.7K keys with 128 heads, 35K with 16).
# - **Fast and measured**: the kernels gather the selected rows for a block of heads at once and score the indexer with
#   one product of all its heads against a key tile, with no `[T, T]` matrix. On an H200 and an H100 they are
#   correct; DSA's prefill passes dense SDPA only from 64K (1.26× there, 1.85× at 128K; 1.39× and 2.16× with the FP8
#   indexer), and a decoding step replayed as a CUDA graph is 5.3× faster than `mla_decode` with the FP8 indexer
#   (4.4× in bf16).
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
# shared checks (`minisparse._checks`); tests/test_dsa.py runs one table of bad inputs against both. Rejected: `topk`
# ≤ 0 or not an int; indices that are not integers, of the wrong shape, below −1, at or past $T_k$, in the query's
# future (after position $T_k - T_q + i$) or repeated within a row; q, k, v of different ranks, batches, head dims or
# dtypes (in the latent form: a query row that is not the key row's 576), $T_q > T_k$, H not dividing HQ, v with other
# heads than k; indexer inputs whose batch, length, heads, head dim or dtype disagree. Padding (−1) is honoured
# everywhere. The kernels add their own limits (next section). Index values are checked on CPU tensors always, on CUDA
# tensors by the kernels only after `minisparse.runtime.set_value_checks(True)` (a check is a host sync). The
# module also holds the naive ops' one-call checks (`_check_indexer_scores`, `_check_scores`, `_check_sparse_args`,
# `_check_attention_probs`), `LightningIndexer`'s size and input checks, and the `backend=` rule (`_use_triton`).

# %% tags=["hide-input"]
#| export dsa.checks
import torch

from minisparse import _checks


def check_topk(op, topk):
    """topk is an int > 0 (the number of keys a query keeps)."""
    return _checks.positive_int(op, "topk", topk)


def check_indexer_args(op, q_idx, k_idx, w_idx, dtypes=_checks.FLOATS):
    """q_idx [B, TQ, HI, DI], k_idx [B, TK, DI] with TQ <= TK, of one dtype among `dtypes` (fp64
    too; the kernel takes _checks.KERNEL_FLOATS and FP8), w_idx [B, TQ, HI] float or None; one
    device. Returns (B, TQ, HI, DI, TK)."""
    _checks.tensor(op, "q_idx", q_idx, "[B, TQ, HI, DI]")
    _checks.tensor(op, "k_idx", k_idx, "[B, TK, DI]")
    B, TQ, HI, DI = q_idx.shape
    if k_idx.shape[0] != B or k_idx.shape[2] != DI or k_idx.shape[1] < TQ:
        raise ValueError(f"{op}: k_idx must be [B, TK, DI] with q_idx's B = {B}, DI = {DI} and "
                         f"TK >= TQ = {TQ} (one index key a token), got {tuple(k_idx.shape)}")
    if w_idx is not None:
        _checks.per_head_token(op, "w_idx", w_idx, (B, TQ, HI), "[B, TQ, HI]",
                               "one weight a query token and indexer head", q_idx)
    _checks.same_dtype(op, dtypes, q_idx=q_idx, k_idx=k_idx)
    _checks.same_device(op, q_idx=q_idx, k_idx=k_idx)
    return B, TQ, HI, DI, k_idx.shape[1]


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


def _check_indexer_scores(op, q_idx, k_idx, w_idx, scale):
    """indexer_scores' arguments: check_indexer_args, w_idx finite; returns (B, TQ, HI, DI, TK,
    scale), scale defaulting to DI ** -0.5."""
    B, TQ, HI, DI, TK = check_indexer_args(op, q_idx, k_idx, w_idx)
    _checks.value_range(op, "w_idx", w_idx, finite=True)
    return B, TQ, HI, DI, TK, _checks.scale(op, scale, DI)


def _check_sparse_args(op, q, k, v, indices, scale):
    """Sparse attention's arguments in PyTorch: q, k, v as _checks.last_queries_qkv, indices as
    check_indices (values always checked); returns (B, TQ, TK, HQ, H, D, DV, scale), scale
    defaulting to D ** -0.5."""
    B, TQ, TK, HQ, H, D, DV = _checks.last_queries_qkv(op, q, k, v)
    check_indices(op, indices, B, TQ, TK, naive=True)
    return B, TQ, TK, HQ, H, D, DV, _checks.scale(op, scale, D)


def _check_scores(op, scores, topk):
    """select_topk's arguments: topk an int > 0, scores [B, TQ, TK] without NaN (NaN would make
    the choice arbitrary). Returns topk."""
    K = check_topk(op, topk)
    _checks.tensor(op, "scores", scores, "[B, TQ, TK]")
    _checks.value_range(op, "scores", scores)
    return K


def _check_indexer_config(op, hidden_size, q_lora_rank, n_heads, head_dim, rope_dim, topk):
    """LightningIndexer's sizes: positive ints, rope_dim even and <= head_dim. Returns topk."""
    for name, val in (("hidden_size", hidden_size), ("q_lora_rank", q_lora_rank),
                      ("n_heads", n_heads), ("head_dim", head_dim), ("rope_dim", rope_dim)):
        _checks.positive_int(op, name, val)
    if rope_dim % 2 or rope_dim > head_dim:
        raise ValueError(f"{op}: rope_dim must be even and <= head_dim = {head_dim}, got "
                         f"{rope_dim}")
    return check_topk(op, topk)


def _check_indexer_input(op, layer, x, q_latent):
    """LightningIndexer.forward's inputs: x [B, T, hidden] as the layer wants, q_latent
    [B, T, q_lora_rank] of x's B, T and dtype."""
    _checks.layer_input(op, x, layer, "[B, T, hidden]", layer.hidden_size)
    _checks.tensor(op, "q_latent", q_latent, "[B, T, q_lora_rank]")
    _checks.shape(op, "q_latent", q_latent, (*x.shape[:2], layer.wq_b.in_features),
                  "[B, T, q_lora_rank]", "x's B, T and the query latent")
    _checks.same_dtype(op, x=x, q_latent=q_latent)


def _check_attention_probs(op, p_attn, indices, scores=None):
    """p_attn [B, TQ, H, TK] floating, indices None or [B, TQ, K] as check_indices wants, scores
    None or [B, TQ, TK] -> (B, TQ, TK)."""
    _checks.tensor(op, "p_attn", p_attn, "[B, TQ, H, TK]")
    if not p_attn.is_floating_point():
        raise TypeError(f"{op}: p_attn must be a floating-point tensor, got {p_attn.dtype}")
    B, TQ, _, TK = p_attn.shape
    if indices is not None:
        check_indices(op, indices, B, TQ, TK, naive=True)
    if scores is not None:
        _checks.tensor(op, "scores", scores, "[B, TQ, TK]")
        _checks.shape(op, "scores", scores, (B, TQ, TK), "[B, TQ, TK]", "p_attn's B, TQ, TK")
    return B, TQ, TK


def _use_triton(op, backend, x):
    """The book's backend= rule: run the kernels? "naive" never, "triton" always, "auto" on CUDA
    or in the interpreter. An x that is no tensor goes to the naive op, whose checks name it."""
    backend = _checks.backend(op, backend)
    return isinstance(x, torch.Tensor) and _checks.choose_backend(backend, x) == "triton"

# %% [markdown]
# ### The kernels' checks
#
# The kernels take the naive ops' checks (`minisparse.dsa.checks`) and add what only a kernel needs: CUDA or the
# interpreter, head dims within one on-chip tile, the scale, and for an FP8 indexer a GPU with FP8 tensor cores.

# %% tags=["hide-input"]
#| export dsa.triton
_INSTEAD = "minisparse.dsa.sparse_attention (the PyTorch version)"


def check_sparse_triton(op, q, k, v, indices, scale):
    """The checks of sparse_attention_triton; returns the scale. Shapes and devices as
    sparse_attention (_checks.last_queries_qkv, check_indices: the index values when
    _checks.checking_values says so), the kernels' dtypes (fp32, fp16, bf16: no fp64), then the
    kernels' limits."""
    B, TQ, TK, HQ, H, D, DV = _checks.last_queries_qkv(op, q, k, v, dtypes=_checks.KERNEL_FLOATS)
    check_indices(op, indices, B, TQ, TK, naive=False)
    limit = 1024 if H == 1 else 256  # MLA's latent rows (one key head) up to 1024 dims, GQA 256
    _checks.triton_inputs(op, q, k, v, indices, max_dims={"D": (D, limit), "Dv": (DV, limit)},
                          instead=_INSTEAD)
    return _checks.scale(op, scale, D)


_FP8 = getattr(torch, "float8_e4m3fn", None)


def check_indexer_triton(op, q_idx, k_idx, w_idx, topk, scale):
    """The checks of lightning_indexer; returns (topk, scale). Shapes and dtypes as
    indexer_scores (check_indexer_args; FP8 allowed on GPUs with FP8 tensor cores), w_idx
    required and finite, then the kernel's limits."""
    topk = check_topk(op, topk)
    _checks.tensor(op, "w_idx", w_idx, "[B, TQ, HI]")
    dtypes = (*_checks.KERNEL_FLOATS, _FP8) if _FP8 else _checks.KERNEL_FLOATS
    B, TQ, HI, DI, TK = check_indexer_args(op, q_idx, k_idx, w_idx, dtypes)
    if q_idx.dtype == _FP8:
        cc = torch.cuda.get_device_capability(q_idx.device) if q_idx.is_cuda else None
        if cc is None or cc < (8, 9):
            on = "" if cc is None else f" (sm_{cc[0]}{cc[1]})"
            raise TypeError(f"{op}: float8_e4m3fn q_idx/k_idx need a GPU with FP8 tensor cores "
                            f"(sm_89 or newer), got {q_idx.device}{on}")
    _checks.triton_inputs(op, q_idx, k_idx, w_idx, max_dims={"DI": (DI, 256), "HI": (HI, 128)},
                          instead="minisparse.dsa.indexer_scores + select_topk")
    if _checks.checking_values(False, q_idx):
        _checks.value_range(op, "w_idx", w_idx, finite=True)
    return topk, _checks.scale(op, scale, DI)

# %% [markdown]
# ### Decoding: the merge kernel
#
# With one query token a sequence, the forward grid has `B · NHB` programs (16 × 2 for a B16 decoding step of
# MLA's 128 heads), and an H200 has 132 SMs. So the launcher cuts each index row into `NS` pieces of `L` slots —
# enough programs to cover the GPU about twice, none shorter than 256 slots — and each piece writes its partial
# state `(acc, m, l)` in fp32. The merge kernel combines them exactly as the online softmax combines tiles; a piece
# whose slots were all padding has `m_i = −∞` and weighs nothing.

# %% tags=["hide-input"]
#| export dsa.triton
@triton.jit
def sparse_merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, lse_ptr, ROWS, NS,
                        DV: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr):
    """Merge NS partial softmax states of each row.

    Program i_r, grid (cdiv(ROWS, BR),): rows i_r·BR … + BR − 1 of the partial buffers
    acc [NS, ROWS, DV], m, l [NS, ROWS] (base 2) -> o [ROWS, DV], lse [ROWS] (base 2).

        for each piece i:  m' = max(m, m_i)
                           l = l·2^(m − m') + l_i·2^(m_i − m')
                           o = o·2^(m − m') + acc_i·2^(m_i − m')
        o / l -> o [BR, DV],  m + log₂ l -> lse [BR]   (0, 0 for a row that saw no key)
    """
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < ROWS
    o_dv = tl.arange(0, BDV)
    m_rd = m_r[:, None] & (o_dv[None, :] < DV)
    b_m = tl.full([BR], float("-inf"), tl.float32)
    b_l = tl.zeros([BR], tl.float32)
    b_o = tl.zeros([BR, BDV], tl.float32)
    for i in range(NS):
        part = i * ROWS + o_r
        b_mi = tl.load(m_ptr + part, mask=m_r, other=float("-inf"))
        b_li = tl.load(l_ptr + part, mask=m_r, other=0.0)
        b_ai = tl.load(acc_ptr + part[:, None] * DV + o_dv[None, :], mask=m_rd, other=0.0)
        b_m, b_l, b_o = merge_partial(b_m, b_l, b_o, b_mi, b_li, b_ai)  # chapter 3's merge
    seen = b_l > 0
    b_o = b_o / tl.where(seen, b_l, 1.0)[:, None]
    tl.store(o_ptr + o_r[:, None] * DV + o_dv[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_rd)
    tl.store(lse_ptr + o_r, tl.where(seen, b_m + tl.log2(tl.where(seen, b_l, 1.0)), 0.0),
             mask=m_r)

# %% [markdown]
# ### The backward kernel: dQ in registers, dK and dV by atomic adds
#
# The backward replays the forward's walk with `P` recomputed from the saved base-2 log-sum-exp. A program owns its
# token's `dq` (one owner: written once, no atomics). The key rows are the problem: a key row is selected by up to every
# later query — thousands of programs — and chapter 7's answer (a key-centric kernel walking the inverse of the
# selection) needs that inverse: a sort of `T × topk` entries (134 M at 64K), and then each entry re-reads a whole
# `[heads, D]` query tile for one key, which is memory-bound. Here each program adds its `[BN, D]` contributions into
# fp32 `dk`, `dv` buffers with atomic adds (`sem="relaxed"`: reductions, no ordering), after summing them over its BG
# heads — one atomic per element per (token, head block), BG× fewer than per head (32× for MLA's latent rows on sm_90).
# With the value read from the key (MLA) its gradient is added into the first `Dv` columns of `dk_a` before the atomic
# add. The order of atomic additions varies from run to run, so the key gradients are not bitwise reproducible.

# %% tags=["hide-input"]
#| export dsa.triton
@triton.jit
def sparse_bwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr,
                      dq_ptr, dk_ptr, dv_ptr, B, TQ, TK, TOPK, scale, qk_scale,
                      HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BDA: tl.constexpr, BDB: tl.constexpr,
                      BDV: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                      V_IS_KA: tl.constexpr, PRECISION: tl.constexpr):
    """Sparse attention, backward: dq of BG heads of one token, its dk, dv contributions by fp32
    atomic adds.

    Program i_t·NBHG + i_b·H·NHB + i_h·NHB + i_hb; grid (TQ·NBHG,), the forward's without splits.
        q_a, q_b [BG, ·], dO [BG, BDV], lse, δ = rowsum(dO ⊙ O) [BG]   loaded once
        for each tile of BN slots:     idx -> k_a, k_b, v (gathered)
            p  = 2^(s·qk_scale − lse) [BG, BN]
            dp = dO vᵀ,  ds = p ⊙ (dp − δ)
            dq += ds k                                       (· scale at the end)
            dk[idx] += dsᵀ q · scale [BN, D],  dv[idx] += pᵀ dO [BN, DV]   atomic, fp32
    V_IS_KA (v = k[..., :DV], MLA): v_ptr and dv_ptr are None; dv goes into dk's first columns.
    """
    NHB: tl.constexpr = (G + BG - 1) // BG
    pid = tl.program_id(0).to(tl.int64)
    i_t, i_bhg = pid // (B * H * NHB), pid % (B * H * NHB)
    i_b, i_h, i_hb = i_bhg // (H * NHB), (i_bhg // NHB) % H, i_bhg % NHB
    pos = i_t + TK - TQ
    o_g = i_hb * BG + tl.arange(0, BG)
    m_g = o_g < G
    row = (i_b * TQ + i_t) * HQ + i_h * G + o_g  # [BG]
    o_da, o_dv, o_n = tl.arange(0, BDA), tl.arange(0, BDV), tl.arange(0, BN)
    m_qa = m_g[:, None] & (o_da[None, :] < D)
    b_qa = tl.load(q_ptr + row[:, None] * D + o_da[None, :], mask=m_qa, other=0.0)
    b_dqa = tl.zeros([BG, BDA], tl.float32)
    if BDB > 0:
        o_db = BDA + tl.arange(0, BDB)
        m_qb = m_g[:, None] & (o_db[None, :] < D)
        b_qb = tl.load(q_ptr + row[:, None] * D + o_db[None, :], mask=m_qb, other=0.0)
        b_dqb = tl.zeros([BG, BDB], tl.float32)
    b_do = tl.load(do_ptr + row[:, None] * DV + o_dv[None, :],
                   mask=m_g[:, None] & (o_dv[None, :] < DV), other=0.0)
    b_lse = tl.load(lse_ptr + row, mask=m_g, other=0.0)
    b_delta = tl.load(delta_ptr + row, mask=m_g, other=0.0)
    k_base = k_ptr + (i_b * TK * H + i_h) * D
    dk_base = dk_ptr + (i_b * TK * H + i_h) * D  # dk: fp32, k's layout
    if not V_IS_KA:
        v_base = v_ptr + (i_b * TK * H + i_h) * DV
        dv_base = dv_ptr + (i_b * TK * H + i_h) * DV  # dv: fp32, v's layout
    idx_row = idx_ptr + (i_b * TQ + i_t) * TOPK
    for n0 in range(0, TOPK, BN):
        o_slot = n0 + o_n
        i_k = tl.load(idx_row + o_slot, mask=o_slot < TOPK, other=-1).to(tl.int64)
        m_n = (i_k >= 0) & (i_k <= pos)
        m_ka = m_n[:, None] & (o_da[None, :] < D)
        p_ka = i_k[:, None] * (H * D) + o_da[None, :]  # [BN, BDA] offsets of the gathered rows
        b_ka = tl.load(k_base + p_ka, mask=m_ka, other=0.0)
        b_s = tl.dot(b_qa, tl.trans(b_ka), input_precision=PRECISION)
        if BDB > 0:
            m_kb = m_n[:, None] & (o_db[None, :] < D)
            p_kb = i_k[:, None] * (H * D) + o_db[None, :]
            b_kb = tl.load(k_base + p_kb, mask=m_kb, other=0.0)
            b_s = tl.dot(b_qb, tl.trans(b_kb), b_s, input_precision=PRECISION)
        b_p = tl.where(m_n[None, :], tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)  # [BG, BN]
        m_v = m_n[:, None] & (o_dv[None, :] < DV)
        if V_IS_KA:
            b_v = b_ka
        else:
            b_v = tl.load(v_base + i_k[:, None] * (H * DV) + o_dv[None, :], mask=m_v, other=0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BG, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dsl = b_ds.to(b_ka.dtype)
        b_dqa += tl.dot(b_dsl, b_ka, input_precision=PRECISION)
        b_dka = tl.dot(tl.trans(b_dsl), b_qa, input_precision=PRECISION) * scale  # [BN, BDA]
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)  # [BN, BDV]
        if V_IS_KA:
            b_dka += b_dv
        else:
            tl.atomic_add(dv_base + i_k[:, None] * (H * DV) + o_dv[None, :], b_dv, mask=m_v,
                          sem="relaxed")
        tl.atomic_add(dk_base + p_ka, b_dka, mask=m_ka, sem="relaxed")
        if BDB > 0:
            b_dqb += tl.dot(b_dsl, b_kb, input_precision=PRECISION)
            b_dkb = tl.dot(tl.trans(b_dsl), b_qb, input_precision=PRECISION) * scale
            tl.atomic_add(dk_base + p_kb, b_dkb, mask=m_kb, sem="relaxed")
    b_dqa = (b_dqa * scale).to(dq_ptr.dtype.element_ty)
    tl.store(dq_ptr + row[:, None] * D + o_da[None, :], b_dqa, mask=m_qa)
    if BDB > 0:
        b_dqb = (b_dqb * scale).to(dq_ptr.dtype.element_ty)
        tl.store(dq_ptr + row[:, None] * D + o_db[None, :], b_dqb, mask=m_qb)

# %% [markdown]
# ### The attention launchers, the public op and the autograd function
#
# `sparse_attention_triton` is the public op: one validation call, then the autograd function; `indices` get no
# gradient (a selection is not differentiable; the indexer learns from its own loss, section 8.5). `_split_dim` cuts a
# key dim into the power-of-two head tile and the tail tile of section 8.7. `_meta` turns a call's shapes into the
# kernels' compile-time constants; `_plan_splits` decides the decoding split (one split whenever the grid already
# covers the GPU twice, as in prefill); the autograd function saves `o` and the base-2 `lse` for the backward. The
# head block `BG` comes from the launch table (64 heads on sm_90, H100 and H200; 16 on a T4) capped at the padded
# group.
# `_sparse_attention` is the entry behind `sparse_attention_triton`: `_value_in_key` recognises MLA's `v = k[...,
# :512]` (same storage and strides, fewer dims, and one tensor for autograd), and then passes `v = None`, which below
# means "the value is `k[..., :DV]`".

# %% tags=["hide-input"]
#| export dsa.triton
def sparse_attention_triton(q, k, v, indices, scale=None):
    """sparse_attention in Triton, forward and backward: attention of each query over its selected
    key tokens only, the selection shared by all heads.

    q        [B, Tq, HQ, D]   query i at position Tk − Tq + i (prefill: Tq = Tk; decoding: Tq = 1)
    k        [B, Tk, H, D]    H divides HQ (GQA); MLA's absorbed form: H = 1, D = 512 + 64
    v        [B, Tk, H, Dv]   MLA: the view k[..., :512], read from the key tile (k's gradient then
                              holds both roles)
    indices  [B, Tq, topk]    int32/int64 key positions <= the query's, each at most once a row,
                              −1 = padding; checked on CPU, on CUDA after
                              runtime.set_value_checks(True)
    scale    softmax scale, default D ** -0.5 (MLA: (qk_nope + qk_rope) ** -0.5)
    -> o [B, Tq, HQ, Dv] in q's dtype, fp32 accumulation; a query whose slots are all −1 gets 0.

    One dtype for all (fp32, fp16, bf16; fp32 or fp16 in the interpreter). Gradients for q, k and
    v; none for indices. Head dims up to 256 (GQA) or 1024 (H = 1).
    """
    return _sparse_attention(q, k, v, indices, scale)



def _split_dim(D):
    """Key dim D -> (BDA, BDB): a power-of-two head tile (>= 16) and a tail tile (0 when D fits
    the head)."""
    head = max(16, 1 << (D.bit_length() - 1))  # the largest power of two <= D, at least 16
    tail = D - head
    return head, (0 if tail <= 0 else max(16, triton.next_power_of_2(tail)))


_MIN_SPLIT = 256  # index slots: the shortest split worth a program
_LOG2E = 1.4426950408889634


def _meta(q, k, v, DV):
    D = q.shape[3]
    BDA, BDB = _split_dim(D)
    BDV = BDA if v is None else max(16, triton.next_power_of_2(DV))  # v from k: k_a's tile
    return dict(HQ=q.shape[2], H=k.shape[2], G=q.shape[2] // k.shape[2], D=D, DV=DV, BDA=BDA,
                BDB=BDB, BDV=BDV, V_IS_KA=v is None,
                PRECISION="ieee" if q.dtype == torch.float32 else None)  # fp32: exact, not tf32


def _row(meta, kind):
    """The LAUNCH_TABLE row of a call: ".d512" for MLA-sized key rows (over 256 dims)."""
    return f"dsa.sparse.{kind}" + (".d512" if meta["BDA"] + meta["BDB"] > 256 else "")


def _fit_heads(G):
    """Cap the head block at the padded group: a group of 16 heads needs no 64-row tile."""
    return lambda c: {**c, "BG": min(c["BG"], max(16, triton.next_power_of_2(G)))}


def _plan_splits(programs, topk, device, num_splits=None):
    """(NS, split_len): pieces of the index list so that about two programs run per SM (one
    piece in prefill)."""
    if num_splits is None:
        sms = runtime.sm_count(device)
        num_splits = max(1, min(triton.cdiv(2 * sms, programs), topk // _MIN_SPLIT))
    split_len = triton.cdiv(topk, num_splits)
    return triton.cdiv(topk, split_len), split_len

# %% tags=["hide-input"]
#| export dsa.triton
def _sparse_forward(q, k, v, idx, scale, DV, num_splits=None):
    """o [B, TQ, HQ, DV] in q's dtype and the base-2 lse [B, TQ, HQ] fp32."""
    B, TQ, HQ, D = q.shape
    TK, H, TOPK = k.shape[1], k.shape[2], idx.shape[2]
    meta = _meta(q, k, v, DV)
    fit = _fit_heads(meta["G"])
    name = _row(meta, "fwd")
    ROWS = B * TQ * HQ
    o = torch.empty(B, TQ, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, TQ, HQ, device=q.device, dtype=torch.float32)
    if ROWS == 0:  # no query (T = 0): nothing to plan or launch
        return o, lse
    BG = fit(runtime.launch_configs(name, q.device, q.dtype)[0])["BG"]  # the first one tried
    programs = TQ * B * H * triton.cdiv(meta["G"], BG)
    NS, split_len = _plan_splits(programs, TOPK, q.device, num_splits)
    acc = m = l_ = None
    if NS > 1:
        acc = torch.empty(NS, ROWS, DV, device=q.device, dtype=torch.float32)
        m, l_ = (torch.empty(NS, ROWS, device=q.device, dtype=torch.float32) for _ in range(2))
    runtime.launch(name, sparse_fwd_kernel,
                   lambda c: (TQ * B * H * triton.cdiv(meta["G"], c["BG"]), NS),
                   (q, k, v, idx, o, lse, acc, m, l_, B, TQ, TK, TOPK, split_len, ROWS,
                    scale * _LOG2E),
                   {**meta, "SPLIT": NS > 1}, device=q.device, dtype=q.dtype,
                   key=(meta["BDA"], meta["BDB"], meta["BDV"]), fit=fit,
                   autotune_key=["B", "TQ", "TOPK", "SPLIT_LEN"], instead=_INSTEAD)
    if NS > 1:
        runtime.launch("dsa.sparse.merge", sparse_merge_kernel,
                       lambda c: (triton.cdiv(ROWS, c["BR"]),), (acc, m, l_, o, lse, ROWS, NS),
                       dict(DV=DV, BDV=meta["BDV"]), device=q.device, dtype=q.dtype,
                       key=(meta["BDV"],), instead=_INSTEAD)
    return o, lse


def _sparse_backward(do, q, k, v, idx, o, lse, scale, DV):
    """(dq, dk, dv) in the inputs' dtypes; dv None when v is (the value read from k)."""
    B, TQ, HQ, D = q.shape
    TK, H, TOPK = k.shape[1], k.shape[2], idx.shape[2]
    meta = _meta(q, k, v, DV)
    fit = _fit_heads(meta["G"])
    delta = (o.float() * do.float()).sum(-1)  # [B, TQ, HQ] δ = rowsum(dO ⊙ O)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)  # atomic targets: fp32 zeros
    dv = None if v is None else torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if dq.numel():
        runtime.launch(_row(meta, "bwd"), sparse_bwd_kernel,
                       lambda c: (TQ * B * H * triton.cdiv(meta["G"], c["BG"]),),
                       (q, k, v, idx, do, lse, delta, dq, dk, dv, B, TQ, TK, TOPK, scale,
                        scale * _LOG2E), meta, device=q.device, dtype=q.dtype,
                       key=(meta["BDA"], meta["BDB"], meta["BDV"]), fit=fit, instead=_INSTEAD)
    return dq, dk.to(k.dtype), (None if v is None else dv.to(v.dtype))


def _sparse_attention(q, k, v, indices, scale=None, num_splits=None, op="sparse_attention_triton"):
    """sparse_attention_triton with the decoding split forced (tests): num_splits None = planned.
    `op`: the name its errors give (sparse_attention's when it dispatches here)."""
    scale = check_sparse_triton(op, q, k, v, indices, scale)
    DV = v.shape[3]
    if _value_in_key(k, v):
        v = None  # the kernel reads the value from the key tile
    else:
        v = v.contiguous()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v) if t is not None)
    if indices.shape[2] == 0:  # no slot: one padding slot, so every query gets 0 as in the naive op
        indices = indices.new_full((*indices.shape[:2], 1), -1)
    q, k, idx = q.contiguous(), k.contiguous(), indices.contiguous()
    if not grad:  # nothing to differentiate (decoding): no autograd node, less host time a call
        return _sparse_forward(q, k, v, idx, scale, DV, num_splits)[0]
    return SparseAttentionFunction.apply(q, k, v, idx, scale, num_splits, DV)


def _value_in_key(k, v):
    """v is the leading DV dims of k's rows (MLA's v = k[..., :512]), with DV within the key's
    power-of-two head tile, and autograd sees one tensor (both views of one base, or no gradient
    wanted): then the kernel may read v from the key tile."""
    same_rows = (v.data_ptr() == k.data_ptr() and v.stride() == k.stride()
                 and v.shape[3] < k.shape[3] and v.shape[3] <= _split_dim(k.shape[3])[0])
    if not same_rows:
        return False
    if not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
        return True
    # a view of k made under no_grad has no grad_fn: autograd does not see it as k, so neither may
    # the kernel (its share of the gradient must not reach k's)
    return (v.grad_fn is not None and v._base is not None
            and v._base is (k if k._base is None else k._base))


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward saves q, k, v, the indices, o and the base-2 lse; the backward
    recomputes P. v None: the value is k[..., :DV]."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale, num_splits, DV):
        o, lse = _sparse_forward(q, k, v, idx, scale, DV, num_splits)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.scale, ctx.DV = scale, DV
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = _sparse_backward(do.contiguous(), q, k, v, idx, o, lse, ctx.scale, ctx.DV)
        return dq, dk, dv, None, None, None, None

# %% [markdown]
# ### The lightning indexer: kernel and launcher
#
# Section 8.7's tile walk as a kernel: a program holds `BT` query tokens' head rows and walks the keys of its key
# range (`KS` keys: all of them in a prefill, a slice in a decoding step). The ReLU, the weights and the head sum
# are fp32 whatever the input dtype (FP8 included). The product is taken as $k\,q^\top$, keys as rows: the head
# sum is then a sum along each row, which a tensor-core tile keeps within one warp (a thread's own columns, then a
# shuffle among four lanes). Taken as $q\,k^\top$, a token's 64 head rows would span the tile's warps and every
# tile would sum them through shared memory, behind barriers.

# %% tags=["hide-input"]
#| export dsa.triton
@triton.jit
def indexer_score_kernel(q_ptr, k_ptr, w_ptr, s_ptr, TQ, TK, C0, CQ, W, KS, scale,
                         HI: tl.constexpr, DI: tl.constexpr, BHI: tl.constexpr, BDI: tl.constexpr,
                         BT: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """Lightning-indexer scores of a chunk of queries:
    I[t, s] = Σ_j w[t, j]·ReLU(scale·q[t, j]·k[s]) for s <= pos(t).

    Program (i_m, i_s, i_b); grid (cdiv(CQ, BT), cdiv(W, KS), B). Queries C0 + i_m·BT … + BT − 1
    of sequence i_b (of TQ; query t at position TK − TQ + t), keys [i_s·KS, min((i_s + 1)·KS, W)).
    q [B, TQ, HI, DI], k [B, TK, DI], w [B, TQ, HI]; writes rows t − C0 of the chunk's scores
    s [B, CQ, W] (fp32; −∞ after the query's position).

        q [BT·BHI, BDI]   row r: token r // BHI, head r % BHI (padded heads masked)
        w·scale [BT·BHI]
        for each key tile k [BN, BDI] up to the block's last position:
            x = k qᵀ [BN, BT·BHI]                       the only tensor-core work
            I = Σ_heads w·ReLU(x)  -> [BN, BT]          −∞ where key > the query's position
        the tiles after the block's last position: −∞, no product

    Keys are the product's rows so that the head sum runs along its columns: a thread holds
    several of a row's columns and a few lanes of one warp the rest, so the sum needs no shared
    memory or barrier (with queries as rows, the heads of a token span warps).
    """
    i_m, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_r = tl.arange(0, BT * BHI)
    r_t = C0 + i_m * BT + o_r // BHI  # [BT·BHI] query of each row
    r_j = o_r % BHI  # [BT·BHI] head of each row
    m_r = (r_t < C0 + CQ) & (r_j < HI)
    o_d = tl.arange(0, BDI)
    b_q = tl.load(q_ptr + ((i_b * TQ + r_t) * HI + r_j)[:, None] * DI + o_d[None, :],
                  mask=m_r[:, None] & (o_d[None, :] < DI), other=0.0)  # [BT·BHI, BDI]
    b_w = tl.load(w_ptr + (i_b * TQ + r_t) * HI + r_j, mask=m_r, other=0.0).to(tl.float32) * scale
    o_t = C0 + i_m * BT + tl.arange(0, BT)  # [BT] the block's queries
    m_t = o_t < C0 + CQ
    pos = o_t + TK - TQ  # [BT] their positions
    last = tl.max(tl.where(m_t, pos, 0), 0)  # the block's last visible key
    k_base = k_ptr + i_b * TK * DI
    s_rows = s_ptr + (i_b * CQ + o_t - C0) * W  # [BT] score rows of the chunk
    n_start, n_end = i_s * KS, tl.minimum((i_s + 1) * KS, W)
    n_stop = tl.minimum(n_end, last + 1)  # keys past the block's last query: no product
    for n0 in range(n_start, n_stop, BN):
        o_n = n0 + tl.arange(0, BN)
        b_k = tl.load(k_base + o_n[:, None] * DI + o_d[None, :],
                      mask=(o_n[:, None] < n_stop) & (o_d[None, :] < DI), other=0.0)  # [BN, BDI]
        b_x = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BN, BT·BHI]
        b_x = tl.maximum(b_x, 0.0) * b_w[None, :]
        b_i = tl.sum(tl.reshape(b_x, (BN, BT, BHI)), 2)  # [BN, BT]
        b_i = tl.where(o_n[:, None] <= pos[None, :], b_i, float("-inf"))
        tl.store(s_rows[None, :] + o_n[:, None], b_i, mask=m_t[None, :] & (o_n[:, None] < n_end))
    n_mid = tl.where(n_stop > n_start, n_start + (n_stop - n_start + BN - 1) // BN * BN, n_start)
    for n0 in range(n_mid, n_end, BN):  # the rest of the range: −∞
        o_n = n0 + tl.arange(0, BN)
        tl.store(s_rows[:, None] + o_n[None, :], tl.full([BT, BN], float("-inf"), tl.float32),
                 mask=m_t[:, None] & (o_n[None, :] < n_end))

# %% [markdown]
# `lightning_indexer` runs the kernel a chunk of queries at a time (`_score_chunk`) and keeps each row's `topk`
# largest (`_topk_chunk`; rows that see at most `topk` keys keep all of them, without a top-k). The indices are
# in no particular order (`sorted=False` spares a sort of every row): the set is what the attention uses.
# `selection_overlap` compares two selections (the FP8 indexer's against the bf16 one's, in the benchmark).

# %% tags=["hide-input"]
#| export dsa.triton
def lightning_indexer(q_idx, k_idx, w_idx, topk, scale=None):
    """The lightning indexer and its top-k in Triton, without the [T, T] score matrix.

    q_idx [B, Tq, HI, DI]  indexer queries (fp32, fp16, bf16; float8_e4m3fn on sm_89+, with k_idx)
    k_idx [B, Tk, DI]      one indexer key a token, shared by the heads; query i at Tk − Tq + i
    w_idx [B, Tq, HI]      per-head weights
    topk  keys kept a query;  scale  default DI ** -0.5
    -> indices [B, Tq, topk] int64: the keys s <= pos(t) with the topk largest
       I[t, s] = Σ_j w[t, j]·ReLU(scale·q_idx[t, j]·k_idx[s]) (select_topk(indexer_scores(...))
       up to ties), in no particular order; −1 pads a query with fewer than topk past tokens.

    Scores are computed a chunk of queries at a time into a [B, chunk, Tk] fp32 buffer of about
    1 GiB.
    """
    op = "lightning_indexer"
    topk, scale = check_indexer_triton(op, q_idx, k_idx, w_idx, topk, scale)
    q_idx, k_idx, w_idx = (x.detach().contiguous() for x in (q_idx, k_idx, w_idx))
    B, TQ, _, _ = q_idx.shape
    TK = k_idx.shape[1]
    chunk = _chunk_rows(B, TQ, TK)
    if B * TQ > 0 and chunk >= TQ and TK > topk:  # one chunk (decoding): its top-k is the answer
        return _topk_chunk(_score_chunk(q_idx, k_idx, w_idx, 0, TQ, scale), topk, TK - TQ)
    out = torch.full((B, TQ, topk), -1, device=q_idx.device, dtype=torch.int64)
    if out.numel() == 0:
        return out
    for c0 in range(0, TQ, chunk):
        c1 = min(TQ, c0 + chunk)
        W = c1 + TK - TQ
        if W <= topk:  # the chunk's queries keep every past key: no scores needed
            none = torch.empty(B, c1 - c0, W, device=q_idx.device)
            out[:, c0:c1, :W] = _topk_chunk(none, topk, c0 + TK - TQ)
            continue
        ids = _topk_chunk(_score_chunk(q_idx, k_idx, w_idx, c0, c1, scale), topk, c0 + TK - TQ)
        out[:, c0:c1, :ids.shape[2]] = ids
    return out


# %% tags=["hide-input"]
#| export dsa.triton
_SCORE_BUDGET = 1 << 28  # fp32 scores a chunk: 1 GiB


def _chunk_rows(B, TQ, TK):
    """Queries a chunk: as many as keep B × chunk × TK fp32 scores within _SCORE_BUDGET
    (multiples of 64)."""
    return max(64, min(TQ, _SCORE_BUDGET // max(1, B * TK)) // 64 * 64)


def _score_chunk(q_idx, k_idx, w_idx, c0, c1, scale, key_split=None):
    """Scores [B, c1 − c0, W] fp32 of queries c0 … c1 − 1 against the W keys the last of them
    sees; key_split (tests) replaces the planned keys a program."""
    B, TQ, HI, DI = q_idx.shape
    TK = k_idx.shape[1]
    CQ, W = c1 - c0, c1 + TK - TQ
    scores = torch.empty(B, CQ, W, device=q_idx.device, dtype=torch.float32)
    fp8 = q_idx.element_size() == 1  # FP8 products take K >= 32
    meta = dict(HI=HI, DI=DI, BHI=triton.next_power_of_2(HI),
                BDI=max(32 if fp8 else 16, triton.next_power_of_2(DI)),
                PRECISION="ieee" if q_idx.dtype == torch.float32 else None)
    split = "dsa.indexer.split.fp8" if fp8 else "dsa.indexer.split"  # the decoding tiles

    def fit(c):  # at least 16 rows for tl.dot, at most the chunk's queries
        bt = min(c["BT"], triton.next_power_of_2(CQ))
        return {**c, "BT": max(bt, triton.cdiv(16, meta["BHI"]))}

    KS = W if key_split is None else key_split
    if q_idx.is_cuda and key_split is None:  # few query blocks (decoding): split the keys too
        cfg = runtime.launch_configs(split, q_idx.device, q_idx.dtype)[0]
        blocks = B * triton.cdiv(CQ, fit(cfg)["BT"])
        KS = _key_range(W, blocks, runtime.sm_count(q_idx.device))
    runtime.launch("dsa.indexer" if KS >= W else split, indexer_score_kernel,
                   lambda c: (triton.cdiv(CQ, c["BT"]), triton.cdiv(W, KS), B),
                   (q_idx, k_idx, w_idx, scores, TQ, TK, c0, CQ, W, KS, scale), meta,
                   device=q_idx.device, dtype=q_idx.dtype, key=(meta["BHI"], meta["BDI"]),
                   fit=fit, autotune_key=["TQ", "CQ"],
                   instead="minisparse.dsa.indexer_scores + select_topk")
    return scores


def _key_range(W, blocks, sms):
    """Keys a program of the indexer when `blocks` query blocks leave SMs idle (decoding): the W
    keys cut into as many ranges (of 64·n keys, at least 1,024) as fill one wave of two programs
    an SM — a partial second wave would cost as much as the whole first one."""
    ranges = max(1, min(2 * sms // blocks, W // 1024))
    return triton.cdiv(triton.cdiv(W, ranges), 64) * 64


def _topk_chunk(scores, topk, first_pos):
    """Indices [B, CQ, min(topk, W)] of each row's largest scores, −1 for −∞ (future) entries."""
    B, CQ, W = scores.shape
    if W <= topk:  # every visible key is kept: no top-k
        n = torch.arange(W, device=scores.device)  # [W]
        pos = first_pos + torch.arange(CQ, device=scores.device)[:, None]  # [CQ, 1]
        return torch.where(n <= pos, n, -1).expand(B, CQ, W)  # [B, CQ, W]
    values, ids = torch.topk(scores, topk, dim=-1, sorted=False)  # [B, CQ, topk] each
    return ids.masked_fill_(values == float("-inf"), -1)  # [B, CQ, topk]


def selection_overlap(a, b):
    """The mean fraction of b's selected positions (>= 0) that a selects too, over rows: a top-k's
    agreement with another (FP8 vs bf16 indexer). a [B, T, Ka], b [B, T, Kb] integer, −1 padded."""
    for name, x in (("a", a), ("b", b)):
        _checks.tensor("selection_overlap", name, x, "[B, T, topk]",
                       dtypes=(torch.int32, torch.int64))
        if x.numel() and int(x.min()) < -1:
            raise ValueError(f"selection_overlap: {name} must be >= -1 (-1 pads a row), got "
                             f"{int(x.min())}")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"selection_overlap: a and b must share B, T, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    B, T, K = b.shape
    n = int(max(a.max(), b.max())) + 2
    hit = torch.zeros(B, T, n, dtype=torch.bool, device=a.device)
    hit.scatter_(2, a.clamp(min=-1) + 1, True)  # column 0 absorbs the padding
    shared = hit.gather(2, b + 1) & (b >= 0)
    return float((shared.sum(-1) / (b >= 0).sum(-1).clamp(min=1)).mean())

# %% [markdown]
# ### The decoding cache
#
# `DSACache` is chapter 3's `MLACache` (latent and rotary key, 576 numbers a token at V3.2's shapes) plus the
# indexer's keys (`index_head_dim` a token); `append` returns all three so far, which is all a decoding step reads.

# %% tags=["hide-input"]
#| export dsa.layer
class DSACache(MLACache):
    """MLA's latent cache plus the indexer's keys: index_keys [B, max_len, index_dim].
    append(c_kv, k_rope, k_idx [B, t, index_dim]) -> (latent, rope, index keys) so far."""

    def __init__(self, batch, max_len, kv_lora_rank, rope_dim, index_dim, *,
                 dtype=torch.float32, device=None):
        super().__init__(batch, max_len, kv_lora_rank, rope_dim, dtype=dtype, device=device)
        _checks.positive_int("DSACache", "index_dim", index_dim)
        self.index_keys = torch.zeros(batch, max_len, index_dim, dtype=dtype, device=device)

    def append(self, c_kv, k_rope, k_idx):
        start = self.length
        if k_idx.shape != (*c_kv.shape[:2], self.index_keys.shape[-1]):
            raise ValueError(f"DSACache.append: k_idx must be [B, t, index_dim] = "
                             f"{(*c_kv.shape[:2], self.index_keys.shape[-1])}, got "
                             f"{tuple(k_idx.shape)}")
        if k_idx.dtype != self.index_keys.dtype:  # no silent cast (MLACache checks c_kv, k_rope)
            raise TypeError(f"DSACache.append: k_idx must be the cache's {self.index_keys.dtype}, "
                            f"got {k_idx.dtype} (make the cache with the layer's dtype)")
        latent, rope = super().append(c_kv, k_rope)
        self.index_keys[:, start:self.length] = k_idx
        return latent, rope, _cache_read(self.index_keys[:, :self.length])

# %% [markdown]
# ### Loading transformers' modules
#
# `indexer_from_hf` reads the indexer's shapes from its config and its RoPE layout from its class (GLM-5's
# indexer rotates interleaved pairs, DeepSeek-V3.2's half-split ones); `dsa_from_hf` reuses chapter 3's MLA loader
# and adds the indexer. DeepSeek-V3.2's MLA always rotates interleaved pairs, whatever the config's
# `rope_interleave` says (the V3.2 config has no such field).

# %% tags=["hide-input"]
#| export dsa.hf
from minisparse import _checks
from minisparse.mla.hf import _MLA_MODULE, mla_from_hf
from minisparse.mla.naive import _rope_type

_INDEXER_CONFIG = ("hidden_size", "q_lora_rank", "index_n_heads", "index_head_dim",
                   "qk_rope_head_dim", "index_topk")


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
    _checks.hf_module("LightningIndexer.from_hf", module,
                      "transformers' DeepseekV32Indexer or GlmMoeDsaIndexer",
                      attrs=("wq_b", "wk.weight", "k_norm.eps", "weights_proj"),
                      config_attrs=_INDEXER_CONFIG)
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
    _checks.hf_module("DSAttention.from_hf", module,
                      "transformers' DeepseekV32Attention (MLA with an indexer)",
                      attrs=(*_MLA_MODULE["attrs"], "indexer"),
                      config_attrs=(*_MLA_MODULE["config_attrs"], *_INDEXER_CONFIG))
    cfg = module.config

    def build(*args, **kw):
        kw["rope_interleave"] = True  # V3.2's MLA rotates interleaved pairs, always
        return cls(*args, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
                   index_topk=cfg.index_topk,
                   indexer_rope_interleave=type(module).__name__.startswith("GlmMoeDsa"), **kw)

    return mla_from_hf(module, backend, cls=build)

# %% [markdown]
# `dsa_shapes` reads the cost model's shapes from a transformers config; `V32`, the shapes section 8.6 uses, are
# `DeepseekV32Config()`'s.

# %% tags=["hide-input"]
#| export dsa.cost
V32 = dict(heads=128, index_heads=64, index_dim=128, topk=2048, kv_lora_rank=512, rope_dim=64,
           qk_head_dim=192, v_head_dim=128)  # DeepseekV32Config()'s attention (dsa_shapes)


def dsa_shapes(config):
    """dsa_cost's shape arguments from a transformers DeepseekV32Config or GlmMoeDsaConfig."""
    return dict(heads=config.num_attention_heads, index_heads=config.index_n_heads,
                index_dim=config.index_head_dim, topk=config.index_topk,
                kv_lora_rank=config.kv_lora_rank, rope_dim=config.qk_rope_head_dim,
                qk_head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim,
                v_head_dim=config.v_head_dim)

# %%
try:
    from transformers import DeepseekV32Config
except ImportError:
    print("transformers is not installed: the check of V32 against DeepseekV32Config() is skipped")
else:
    assert dsa_shapes(DeepseekV32Config()) == V32

# %% [markdown]
# `_rotate_hf` applies transformers' `(cos, sin)` when `LightningIndexer.forward` is given them (GLM-5's indexer
# rotates interleaved pairs and returns them half-split, as transformers does).

# %% tags=["hide-input"]
#| export dsa.layer
def _rotate_hf(t, cos, sin, interleaved):
    """RoPE from transformers' (cos, sin) [B, T, dr] (each frequency twice) on t [B, T, H, dr]."""
    cos, sin = cos[:, :, None].to(t.dtype), sin[:, :, None].to(t.dtype)
    if interleaved:  # pairs (0, 1), (2, 3), …; the result in half-split layout, as transformers
        c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    a, b = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-b, a], dim=-1) * sin

# %% [markdown]
# ### The oracles: fla and transformers
#
# Section 8.2's example against fla's reference functions (`naive_dsa_indexer` with ReLU, `naive_dsa`): the same
# selected sets (up to ties) and the same outputs. Then a tiny DeepSeek-V3.2 configuration with random weights
# against transformers' `DeepseekV32Attention`, which turns the indexer's choice into an additive mask over the
# dense, expanded attention where ours gathers in the latent form: the same selected sets, the same outputs.

# %% tags=["nbval-ignore-output"]
o, idx = dsa(q, k, v, q_idx, k_idx, w_idx, topk=8, return_indices=True, backend="naive")
try:
    import warnings

    with warnings.catch_warnings():  # fla warns that Triton has no GPU here, naming its own path
        warnings.simplefilter("ignore")
        from fla.ops.dsa.naive import naive_dsa, naive_dsa_indexer
except ImportError:
    print("fla-core is not installed: the comparison with its references is skipped")
else:
    theirs = naive_dsa_indexer(q_idx, k_idx, w_idx, 8, activation="relu")
    scores = indexer_scores(q_idx, k_idx, w_idx)
    # the same keys up to ties (fla's topk breaks them its own way, ours by key order)
    assert torch.equal(chosen_scores(scores, idx), chosen_scores(scores, theirs))
    assert_close("dsa vs fla naive_dsa", naive_dsa(q, k, v, None, None, None, indices=idx), o, 1e-5)


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

# %% [markdown]
# ### The latent form: absorbed MLA, and through the kernels
#
# Section 8.2's dense limit in MLA's latent form: with every past key selected, `sparse_attention` over the
# latent key rows (`k [B, Tk, 1, r + dr]`, `v = k[..., :r]`) is chapter 3's absorbed MLA.

# %%
from minisparse.mla import mla_attention_absorbed  # chapter 3: MQA over the latent cache

g = torch.Generator().manual_seed(4)
q_lat, q_rope = torch.randn(1, 20, 4, 32, generator=g), torch.randn(1, 20, 4, 8, generator=g)
c_kv, k_rope = torch.randn(1, 20, 32, generator=g), torch.randn(1, 20, 8, generator=g)
kl = torch.cat([c_kv, k_rope], -1)[:, :, None]  # [1, 20, 1, 40]: the latent key row
all_idx = torch.arange(20).expand(1, 20, 20)  # every key; future ones are masked
_ = assert_close("latent form = absorbed MLA",
                 mla_attention_absorbed(q_lat, q_rope, c_kv, k_rope, 0.2),
                 sparse_attention(torch.cat([q_lat, q_rope], -1), kl, kl[..., :32],
                                  all_idx.where(all_idx <= torch.arange(20)[:, None], -1), 0.2,
                                  backend="naive"), 1e-5)

# %% [markdown]
# Through the public `sparse_attention`, a latent form with `v = k[..., :32]` a view (the kernel reads the value
# from the key tile and adds its gradient into the key's): output, `dq` and `dk` as the naive op's.

# %%
g = torch.Generator().manual_seed(5)  # a latent form: 4 heads, one key row of 32 + 8 a token
q_l, k_l = torch.randn(1, 20, 4, 40, generator=g), torch.randn(1, 20, 1, 40, generator=g)
sel = select_topk(indexer_scores(q_idx[:1, :20], k_idx[:1, :20], w_idx[:1, :20]), 6)
grads = []
for backend, dev in (("naive", "cpu"), ("triton", DEVICE)):
    ql_, kl_ = (t.detach().to(dev).requires_grad_() for t in (q_l, k_l))
    o_ = sparse_attention(ql_, kl_, kl_[..., :32], sel.to(dev), 0.2, backend=backend)
    grads.append([o_.cpu(), *(g.cpu() for g in torch.autograd.grad(o_.square().sum(), (ql_, kl_)))])
for name, a, b in zip(("o", "dq", "dk"), *grads):
    assert_close(f"latent form, {name}", a, b, 1e-4)


# %% [markdown]
# ### A running top-k
#
# The indexer's top-k could avoid its `[Tq, Tk]` score matrix altogether: walk the keys in blocks, score a block,
# and merge it into a running top-k of each query (candidates so far ∪ this block, keep the best $k$). Memory is
# $O(T_q (k + \text{block}))$ and the result is the same set. The kernels do not do this — 2,048 running
# candidates a query row do not fit on chip — but it is what a fused top-k would have to do.

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


assert torch.equal(chosen_scores(scores8, blockwise_topk(q_idx, k_idx, w_idx, 8)),
                   chosen_scores(scores8, idx8))  # ReLU makes ties at 0 common: compare scores

# %% [markdown]
# ### Sparse training at reading size
#
# The report's second phase switches selection on and trains everything. Section 8.5's toy has no language model
# to train, so the main model's task is to reproduce the dense layer it started as (a frozen copy is the teacher,
# the loss the relative squared error of the outputs), while the indexer keeps its KL loss, now restricted to its
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
# ### FP8 index scores at reading size
#
# Section 8.5's indexer (the teacher above: the model as the warm-up left it) with its queries and keys rounded to
# e4m3 (one scale a row, as FP8 kernels quantise): most of the top-8 choices survive, and the attention mass the
# selection recalls barely moves.

# %%
def to_fp8(x):
    """x rounded to float8 e4m3, one scale a row (the last dim), back in fp32."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448  # 448: e4m3's largest number
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


with torch.no_grad():
    q_lat = teacher.q_a_layernorm(teacher.q_a_proj(x_eval))
    qi, ki, wi = teacher.indexer.project(x_eval, q_lat, torch.arange(64))
    sel32 = select_topk(indexer_scores(qi, ki, wi), 8)
    sel8 = select_topk(indexer_scores(to_fp8(qi), to_fp8(ki), wi), 8)
same = (selection_mask(sel32, 64) & selection_mask(sel8, 64)).sum(-1)[:, 16:].float().mean() / 8
rec32, rec8 = (attention_recall(p_eval, i)[:, 16:].mean().item() for i in (sel32, sel8))
print(f"top-8 chosen alike: {same:.1%}; recall {rec32:.3f} (fp32) vs {rec8:.3f} (FP8)")
assert same > 0.85 and abs(rec32 - rec8) < 0.01

# %% [markdown]
# ### Section 8.6's numbers, checked
#
# The savings at 128K that section 8.6 prints, and its break-even points: the first position where a token of DSA
# costs less than dense (`dsa_cost`'s ratio below 1), per head count and indexer dtype, and the first length where a
# whole prefill does (the sums of the per-token costs up to it).

# %%
assert 0.40 < at["prefill, a 128K sequence"] < 0.46
assert 0.12 < at["decoding at 128K, attention bytes"] < 0.25
c_all = np.arange(0, 262144)
even = {}
for heads in (128, 16):
    for fp8 in (False, True):
        cheaper = dsa_cost(c_all, heads=heads, index_fp8=fp8)["ratio"] < 1
        even[heads, fp8] = int(np.argmax(cheaper)) + 1 if cheaper.any() else None
print({f"{h} heads, {'FP8' if f else 'bf16'}": v for (h, f), v in even.items()})
assert abs(even[128, False] / 8704 - 1) < 0.01 and abs(even[16, True] / 34816 - 1) < 0.01
assert round(even[128, True], -2) == 7700
assert even[16, False] is None and 0.75 < dsa_cost(131071)["share"] < 0.82
# a whole prefill of T tokens: the sums of the per-token costs up to T
whole = {}
for fp8 in (False, True):
    cost = dsa_cost(c_all, index_fp8=fp8)
    whole[fp8] = int(np.argmax(np.cumsum(cost["dsa"]) < np.cumsum(cost["dense"]))) + 1
print(f"a whole prefill breaks even at {whole[False]} tokens (FP8 indexer: {whole[True]})")
assert round(whole[False], -2) == 16300 and round(whole[True], -2) == 14400

# %% [markdown]
# ### Section 8.8's numbers, checked
#
# Every number the takeaways of section 8.8 state, from `bench/results/dsa.json` and section 8.6's model —
# among them the rates: each part's FLOPs (section 8.6) over its measured time at 64K.

# %%
if res is not None:
    T64 = 65536  # where the time goes: section 8.6's FLOPs of each part over its measured time
    cost = dsa_cost(np.arange(T64))  # per position; summed: the whole prefill
    rate = {part: cost[key].sum() / (ms[impl, "prefill fwd", T64] * 1e9) for part, key, impl in (
        ("dense SDPA", "dense", DENSE), ("indexer", "indexer", "indexer scores"),
        ("FP8 indexer", "indexer", "indexer scores, FP8 indexer"),
        ("sparse attention", "sparse", "sparse attention"))}
    print(", ".join(f"{p} {r:.0f}" for p, r in rate.items()),
          "TFLOP/s at 64K (peaks: bf16 989, FP8 1,979)")
    model = {T: (lambda c: c["dsa"].sum() / c["dense"].sum())(dsa_cost(np.arange(T)))
             for T in (8192, 65536)}  # DSA / dense FLOPs
    print(f"the model's DSA / dense FLOPs: {model[8192]:.2f} at 8K, {model[65536]:.2f} at 64K")
    T128 = 131072
    assert [round(ratio["", T], 2) for T in (8192, 32768, 65536, T128)] == [0.25, 0.73, 1.26, 1.85]
    assert [round(ratio[", FP8 indexer", T], 2) for T in (T64, T128)] == [1.39, 2.16]
    parts = ("indexer scores", "indexer scores, FP8 indexer", "indexer + top-k", "sparse attention",
             DENSE)
    assert [round(ms[i, "prefill fwd", T64]) for i in parts] == [73, 45, 97, 150, 308]
    assert [round(ms[i, "prefill fwd", T128]) for i in parts[:4]] == [274, 177, 383, 303]
    assert [round(ms[STEP[0] + g, "decode", TD], 3) for g in ("", GRAPH)] == [1.127, 1.137]
    assert [round(ms[i + GRAPH, "decode", TD], 3) for i in STEP[1:3]] == [0.259, 0.214]
    assert [round(dec[i + GRAPH], 1) for i in STEP[1:3]] == [4.4, 5.3]
    assert round(dec["DSA decode attention" + GRAPH]) == 13
    eager = [ms[i, "decode", TD] for i in STEP[1:3]]
    assert [round(min(eager), 2), round(max(eager), 2)] == [0.45, 0.57]  # ms
    assert [round(dec[i], 1) for i in STEP[1:3]] == [2.0, 2.5]
    assert [round(100 * f(keeps.values()), 1) for f in (min, max)] == [95.5, 97.8]
    assert 480 < rate["indexer"] < 500 and 560 < rate["dense SDPA"] < 580
    assert 240 < rate["sparse attention"] < 260 and 770 < rate["FP8 indexer"] < 790
    assert round(model[65536], 2) == 0.41 and round(model[8192], 1) == 1.7
    assert round(2048 * (2 * 512 + 64) / (192 + 128), -3) == 7000  # sparse alone = dense, per token
    topk_ms = ms["indexer + top-k", "prefill fwd", T64] - ms["indexer scores", "prefill fwd", T64]
    dense64 = ms[DENSE, "prefill fwd", T64]
    at_sdpa_rate = dense64 / (model[T64] * dense64 + topk_ms)  # DSA's FLOPs at SDPA's rate, + top-k
    topk128 = ms["indexer + top-k", "prefill fwd", T128] - ms["indexer scores", "prefill fwd", T128]
    assert round(topk_ms) == 24 and round(at_sdpa_rate, 1) == 2.0 and round(topk128) == 108
    fp8_gain = [ms["indexer scores", "prefill fwd", T64] / ms["indexer scores, FP8 indexer",
                "prefill fwd", T64], ratio[", FP8 indexer", T64] / ratio["", T64]]
    assert round(fp8_gain[0], 1) == 1.6 and 1.08 < fp8_gain[1] < 1.13
    assert round(ratio[", FP8 indexer", T128] / ratio["", T128], 2) == 1.17
    caps = [1 / dsa_cost(TD - 1, "decode", index_fp8=f)["ratio"] for f in (False, True)]
    assert [round(c, 1) for c in caps] == [3.8, 6.5]  # the decoding step's byte-count bound

# %% [markdown]
# ### The exercise checkers
#
# Each checker compares a reader's answer with an independent computation (a closed form, `indexer_scores`) on
# several cases and says which case differs; tests/test_dsa.py feeds each one a known-wrong answer. Exercise
# 2's also bounds the size of every tensor the answer makes (a `TorchFunctionMode`).

# %% tags=["hide-input"]
#| export dsa.exercises
import math

import torch
import triton
import triton.language as tl

from minisparse.dsa.naive import indexer_scores
from minisparse.testing import ExerciseError, TensorRule, check, loads_within


def _break_even(H, HI, DI, k, fp8):
    indexer = HI * DI / (2 if fp8 else 1)
    return math.inf if H * 320 <= indexer else k * H * 1088 / (H * 320 - indexer)


def check_break_even(fn):
    """Exercise 1: the c where DSA's prefill multiply-adds equal dense MLA's (math.inf: never)."""
    cases = [(128, 64, 128, 2048, False), (128, 64, 128, 2048, True), (16, 64, 128, 2048, False),
             (16, 64, 128, 2048, True), (32, 64, 128, 2048, True), (64, 32, 128, 1024, False),
             (64, 32, 64, 1024, True)]
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


# %% tags=["hide-input"]
#| export dsa.exercises
def indexer_scores_by_chunks_with_a_bug(q_idx, k_idx, w_idx, chunk):
    """indexer_scores `chunk` queries at a time, so that no [B, TQ, HI, TK] tensor is made
    (exercise 2) — with a planted bug."""
    TQ = q_idx.shape[1]
    return torch.cat([indexer_scores(q_idx[:, c0:c0 + chunk], k_idx, w_idx[:, c0:c0 + chunk])
                      for c0 in range(0, TQ, chunk)], dim=1)


def _split_inf(fn):
    """(where -inf, the finite scores): a comparison that -inf cannot poison."""
    def run(*args):
        s = fn(*args)
        return (s == float("-inf"), s.masked_fill(s == float("-inf"), 0.0))
    return run


def check_scores_by_chunks(fn):
    """Exercise 2: fn(q_idx, k_idx, w_idx, chunk) equals indexer_scores(q_idx, k_idx, w_idx) without
    any tensor larger than one chunk's [B, chunk, HI, TK] intermediate or the [B, TQ, TK] result."""
    g = torch.Generator().manual_seed(8)
    cases = []
    for TQ, TK, chunk in ((9, 9, 4), (5, 13, 2), (1, 7, 4), (12, 20, 5)):
        q_idx = torch.randn(2, TQ, 3, 8, generator=g)
        k_idx, w_idx = torch.randn(2, TK, 8, generator=g), torch.randn(2, TQ, 3, generator=g)
        cases.append((q_idx, k_idx, w_idx, chunk))

    def bounded(q_idx, k_idx, w_idx, chunk):
        (B, TQ, HI, _), TK = q_idx.shape, k_idx.shape[1]
        limit = max(B * chunk * HI * TK, B * TQ * TK, q_idx.numel(), k_idx.numel())  # < B·TQ·HI·TK
        too_big = (f"more elements than a chunk's [B, chunk, HI, TK], the result or an input "
                   f"({limit}): score one chunk of queries at a time")
        with TensorRule("indexer scores by chunks",
                        lambda t: too_big if t.numel() > limit else None):
            return fn(q_idx, k_idx, w_idx, chunk)

    check("indexer scores by chunks", _split_inf(bounded),
          _split_inf(lambda q, k, w, chunk: indexer_scores(q, k, w)), cases, tol=1e-5,
          hint="query i of the chunk starting at c0 sits at position TK − TQ + c0 + i; "
               "indexer_scores puts the queries it gets at the end of the keys it gets")


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
    """Exercise 3: launch `kernel` for one query and one key tile; compare with indexer_scores.
    The kernel runs where Triton does: on the GPU when there is one, else in the interpreter on
    CPU tensors."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    # the last launch: the keys end before the query (t ≥ TK), as in a split of the keys
    for HI, DI, TK, t, n0, BN in ((4, 16, 40, 37, 32, 16), (3, 24, 20, 10, 0, 16),
                                  (1, 8, 70, 69, 64, 8), (5, 32, 33, 20, 16, 32),
                                  (3, 24, 20, 19, 16, 16), (2, 16, 24, 30, 16, 16)):
        q, k = torch.randn(HI, DI, generator=g), torch.randn(TK, DI, generator=g)
        w, scale = torch.randn(HI, generator=g), DI ** -0.5
        ref = torch.full((BN,), float("-inf"))
        seen = indexer_scores(q[None, None], k[None, :t + 1], w[None, None], scale)[0, 0]
        for j in range(BN):
            if n0 + j <= t and n0 + j < TK:
                ref[j] = seen[n0 + j]
        got = torch.full((BN,), float("nan"), device=dev)  # anything the kernel leaves shows
        q_in, k_in, w_in = q.to(dev), k.to(dev), w.to(dev)
        with loads_within(f"index score tile: HI={HI}, DI={DI}, t={t}, n0={n0}",
                          {"q": q_in, "k": k_in, "w": w_in},
                          "mask the key load at n >= TK (and at d >= DI): a masked load reads "
                          "nothing there"):
            kernel[(1,)](q_in, k_in, w_in, got, t, n0, TK, scale, HI, DI,
                         BH=triton.next_power_of_2(HI), BD=triton.next_power_of_2(DI), BN=BN)
        got = got.cpu()
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
    print("✓ index score tile: all 5 launches match")
