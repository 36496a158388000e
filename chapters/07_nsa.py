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
# # Chapter 7 — Native Sparse Attention and MoBA
#
# OPENING

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

from minisparse import runtime, viz
from minisparse.attention import attention_ref
from minisparse.testing import assert_close, make_qkv

torch.manual_seed(0)
DEVICE = runtime.device()
DTYPE = runtime.default_dtype()

# %%
#| export nsa.naive
import math
import numbers

import torch
import torch.nn.functional as F

from minisparse import _checks
from minisparse.attention.naive import attention_ref


def check_nsa_qkv(op, q, k, v, fewer_queries=False):
    """q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv], one float dtype and device, H divides HQ
    (`fewer_queries`: q may have TQ <= T tokens, the last TQ positions). Returns (B, T, HQ, H, D, Dv)."""
    _checks.tensor(op, "q", q, "[B, T, HQ, D]")
    _checks.tensor(op, "k", k, "[B, T, H, D]")
    _checks.tensor(op, "v", v, "[B, T, H, Dv]")
    B, T, HQ, D = q.shape
    H = k.shape[2]
    if fewer_queries and k.shape[0] == B and k.shape[1] >= T:
        T = k.shape[1]  # decoding: q holds the last TQ positions
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"{op}: k must be [B, T, H, D] with q's B, T, D = {(B, T, D)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, Dv] with k's B, T, H = {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    _checks.divides(op, "H (k's heads)", H, "HQ (q's heads)", HQ)
    _checks.same_dtype(op, q=q, k=k, v=v)
    _checks.same_device(op, q=q, k=k, v=v)
    return B, T, HQ, H, D, v.shape[3]


def check_block_size(op, block_size, name="block_size"):
    """A block size is a power of two (the kernels tile a block with it)."""
    bs = _checks.positive_int(op, name, block_size)
    if bs & (bs - 1):
        raise ValueError(f"{op}: {name} must be a power of two, got {bs}")
    return bs


def check_block_indices(op, block_indices, B, T, HQ, H, block_size, naive, offset=0):
    """block_indices [B, T, H or HQ, S] integer: each entry -1 (padding) or a block whose first token is not in
    the query's future, `0 <= i` and `i * block_size <= t` (query t at position t + offset). Values are checked
    by the book's value-check rule."""
    _checks.tensor(op, "block_indices", block_indices, "[B, T, H, S]")
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: block_indices must be int32 or int64, got {block_indices.dtype}")
    if block_indices.shape[:2] != (B, T) or block_indices.shape[2] not in (H, HQ):
        raise ValueError(f"{op}: block_indices must be [B, T, H, S] = {(B, T, H)} + (S,) (or HQ = {HQ} heads, "
                         f"one selection per query head), got {tuple(block_indices.shape)}")
    if _checks.checking_values(naive, block_indices) and block_indices.numel():
        t = torch.arange(T, device=block_indices.device).view(1, T, 1, 1) + offset
        bad_low = block_indices < -1
        future = block_indices * block_size > t  # the block's first token comes after the query
        if bool(bad_low.any()):
            raise ValueError(f"{op}: block_indices must be >= -1 (-1 pads a row), got "
                             f"{int(block_indices.min())}")
        if bool(future.any()):
            b, tt, h, s = (int(i) for i in future.nonzero()[0])
            raise ValueError(f"{op}: block_indices[{b}, {tt}, {h}, {s}] = {int(block_indices[b, tt, h, s])} "
                             f"is out of range or in the future: query {tt} sees blocks 0..{(tt + offset) // block_size}")


def check_gate(op, name, g, B, T, HQ, like):
    """A branch gate g [B, T, HQ] (already in [0, 1]), or None to drop the branch."""
    if g is None:
        return
    _checks.per_head_token(op, name, g, (B, T, HQ), "[B, T, HQ]", "a gate per token and query head", like)

# %%
#| export nsa.naive
def mean_pool(x, block_size):
    """The simplest compression φ: each block of `block_size` tokens becomes the mean of its tokens.

    x [B, T, H, D] -> [B, ceil(T / block_size), H, D]; a partial last block is the mean of the tokens it has.
    """
    _checks.tensor("mean_pool", "x", x, "[B, T, H, D]")
    bs = check_block_size("mean_pool", block_size)
    B, T, H, D = x.shape
    NB = -(-T // bs)  # ceil(T / bs) blocks
    padded = F.pad(x.float(), (0, 0, 0, 0, 0, NB * bs - T))  # [B, NB·bs, H, D] zeros past T
    sums = padded.view(B, NB, bs, H, D).sum(2)  # [B, NB, H, D]
    counts = (T - torch.arange(NB, device=x.device) * bs).clamp(max=bs)  # [NB] tokens in each block
    return (sums / counts.view(1, NB, 1, 1)).to(x.dtype)


class CompressKV(torch.nn.Module):
    """The paper's learnable compression φ (NSA, eq. 7): block i covers tokens [i·stride, i·stride + block_size);
    its summary is an MLP of the block's tokens plus a learned intra-block position embedding.

    φ(x) = mean(x_block) + W₂ GELU(W₁ flatten(x_block + pos)), with W₂ = 0 at initialisation, so a fresh
    module equals `mean_pool` (stride = block_size) and training moves it from there. One module a K or V
    stream, shared by the heads. x [B, T, H, D] -> [B, ceil(T / stride), H, D]; windows that run past T are
    zero-padded (a query never sees them: a summary becomes visible once its last token is in the past).
    """

    def __init__(self, head_dim, block_size=64, stride=None, hidden=None):
        super().__init__()
        self.block_size = check_block_size("CompressKV", block_size)
        self.stride = check_block_size("CompressKV", stride or block_size, "stride")
        if self.stride > self.block_size:
            raise ValueError(f"CompressKV: stride must be <= block_size = {block_size}, got {self.stride}")
        hidden = hidden or 2 * head_dim
        self.pos = torch.nn.Parameter(torch.zeros(self.block_size, head_dim))  # [l, D] intra-block position
        self.up = torch.nn.Linear(self.block_size * head_dim, hidden)  # W₁
        self.down = torch.nn.Linear(hidden, head_dim)  # W₂, zero at first
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)

    def forward(self, x):
        B, T, H, D = x.shape
        l, d = self.block_size, self.stride
        N = -(-T // d)  # summaries, one every `stride` tokens
        x = F.pad(x, (0, 0, 0, 0, 0, (N - 1) * d + l - T))  # [B, (N-1)·d + l, H, D]
        blocks = x.unfold(1, l, d).permute(0, 1, 2, 4, 3)  # [B, N, H, l, D]
        mlp = self.down(F.gelu(self.up((blocks + self.pos).flatten(-2))))  # [B, N, H, D]
        return blocks.mean(-2) + mlp

# %%
#| export nsa.naive
def compressed_scores(q, k_cmp, block_size, scale=None, stride=None, offset=0):
    """Compressed attention probabilities p_cmp [B, T, HQ, N] (fp32): query t sees summary c once the summary's
    last token is in the past, c·stride + block_size − 1 ≤ t; a query that sees none gets a row of zeros.

    q [B, T, HQ, D], k_cmp [B, N, H, D] (H divides HQ); query i sits at position t = i + offset (decoding:
    q holds the last tokens only).
    """
    B, T, HQ, D = q.shape
    N, H = k_cmp.shape[1], k_cmp.shape[2]
    scale = _checks.scale("compressed_attention", scale, D)
    stride = block_size if stride is None else stride
    k_rep = k_cmp.float().repeat_interleave(HQ // H, dim=2)  # [B, N, HQ, D]
    s = torch.einsum("bthd,bchd->bthc", q.float(), k_rep) * scale  # [B, T, HQ, N]
    last = torch.arange(N, device=q.device) * stride + block_size - 1  # [N] last token of summary c
    seen = last[None, :] <= torch.arange(T, device=q.device)[:, None] + offset  # [T, N]
    s = s.masked_fill(~seen[None, :, None, :], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with nothing visible: 0


def compressed_attention(q, k_cmp, v_cmp, block_size, scale=None, stride=None, offset=0):
    """Branch 1, o_cmp = Σ_c p_cmp[t, c] · v_cmp[c]: attention over the block summaries.

    q [B, T, HQ, D], k_cmp [B, N, H, D], v_cmp [B, N, H, Dv] -> [B, T, HQ, Dv] in q's dtype (fp32 inside).
    """
    op = "compressed_attention"
    _checks.tensor(op, "k_cmp", k_cmp, "[B, N, H, D]")
    _checks.tensor(op, "v_cmp", v_cmp, "[B, N, H, Dv]")
    check_block_size(op, block_size)
    if k_cmp.shape[:3] != v_cmp.shape[:3]:
        raise ValueError(f"{op}: v_cmp must be [B, N, H, Dv] with k_cmp's B, N, H = "
                         f"{tuple(k_cmp.shape[:3])}, got {tuple(v_cmp.shape)}")
    p = compressed_scores(q, k_cmp, block_size, scale, stride, offset)  # [B, T, HQ, N]
    v_rep = v_cmp.float().repeat_interleave(q.shape[2] // k_cmp.shape[2], dim=2)  # [B, N, HQ, Dv]
    return torch.einsum("bthc,bchd->bthd", p, v_rep).to(q.dtype)

# %%
#| export nsa.naive
def select_blocks(q, k_cmp, block_counts=16, block_size=64, scale=None, offset=0):
    """The top-n selection: blocks ranked by p_cmp summed over each GQA group (one choice a group, so a kernel
    loads a block once for all its heads); block 0 and the query's own and previous blocks always kept.

    q [B, T, HQ, D], k_cmp [B, N, H, D] (mean-pooled, one summary a block) -> block_indices [B, T, H, S]
    int64, S = block_counts: the chosen blocks in increasing order, then -1 for causally invisible or surplus
    slots. Query i sits at position i + offset.
    """
    op = "select_blocks"
    S = _checks.positive_int(op, "block_counts", block_counts)
    if S < 3:
        raise ValueError(f"{op}: block_counts must be >= 3 (block 0, the own block and the previous one are "
                         f"always kept), got {S}")
    check_block_size(op, block_size)
    B, T, HQ, _ = q.shape
    N, H = k_cmp.shape[1], k_cmp.shape[2]
    p = compressed_scores(q, k_cmp, block_size, scale, offset=offset)  # [B, T, HQ, N]
    score = p.view(B, T, H, HQ // H, N).sum(3)  # [B, T, H, N] the group's importance of each block
    t = torch.arange(T, device=q.device)[:, None] + offset  # [T, 1] positions
    c = torch.arange(N, device=q.device)[None, :]  # [1, N]
    own = t // block_size
    forced = (c == 0) | (c == own) | (c == own - 1)  # [T, N] always selected
    seen = (c + 1) * block_size - 1 <= t  # [T, N] complete blocks in the past
    score = score.masked_fill(~seen[None, :, None], float("-inf"))
    score = score.masked_fill(forced[None, :, None], float("inf"))
    top_score, top = score.topk(min(S, N), dim=-1)  # [B, T, H, min(S, N)]
    top = top.masked_fill(top_score == float("-inf"), N).sort(dim=-1).values  # invisible: N, sorts last
    top = top.masked_fill(top == N, -1)
    return F.pad(top, (0, S - top.shape[-1]), value=-1)  # [B, T, H, S]

# %%
#| export nsa.naive
def selection_mask(block_indices, T, block_size):
    """Which keys each query may read: token s of block i when i is in the query's row of `block_indices`
    and s <= t. block_indices [B, TQ, Hs, S] (the last TQ of T positions) -> mask [B, TQ, Hs, T] bool
    (padding -1 selects nothing)."""
    B, TQ, Hs, S = block_indices.shape
    N = -(-T // block_size)
    onehot = torch.zeros(B, TQ, Hs, N + 1, dtype=torch.bool, device=block_indices.device)
    onehot.scatter_(-1, block_indices.long().masked_fill(block_indices < 0, N), True)  # -1 -> slot N
    keys = onehot[..., :N].repeat_interleave(block_size, dim=-1)[..., :T]  # [B, TQ, Hs, T]
    causal = torch.ones(TQ, T, dtype=torch.bool, device=block_indices.device).tril(T - TQ)  # s <= t
    return keys & causal[None, :, None, :]


def selected_attention(q, k, v, block_indices, block_size=64, scale=None):
    """Branch 2: softmax attention restricted to the tokens of the selected blocks (and s <= t).

    q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv], block_indices [B, T, H, S] (one selection a GQA group;
    [B, T, HQ, S]: one a query head) -> o [B, T, HQ, Dv] in q's dtype; a query with no key gets 0.
    q may hold only the last TQ < T tokens (decoding), block_indices then [B, TQ, *, S].
    """
    op = "selected_attention"
    B, T, HQ, H, D, Dv = check_nsa_qkv(op, q, k, v, fewer_queries=True)
    check_block_size(op, block_size)
    check_block_indices(op, block_indices, B, q.shape[1], HQ, H, block_size, naive=True, offset=T - q.shape[1])
    scale = _checks.scale(op, scale, D)
    mask = selection_mask(block_indices, T, block_size)  # [B, T, Hs, T]
    mask = mask.repeat_interleave(HQ // mask.shape[2], dim=2)  # [B, TQ, HQ, T]
    k_rep, v_rep = (x.float().repeat_interleave(HQ // H, dim=2) for x in (k, v))  # [B, T, HQ, *]
    s = torch.einsum("bthd,bshd->bths", q.float(), k_rep) * scale  # [B, T, HQ, T]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bths,bshd->bthd", p, v_rep).to(q.dtype)

# %%
#| export nsa.naive
def nsa(q, k, v, g_cmp, g_slc, g_swa, *, block_counts=16, block_size=64, window_size=512, scale=None,
        block_indices=None, return_block_indices=False, k_cmp=None, v_cmp=None):
    """Native Sparse Attention: o = g_cmp ⊙ o_cmp + g_slc ⊙ o_slc + g_swa ⊙ o_swa (NSA, eq. 5).

    q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv]; g_* [B, T, HQ] gates already in [0, 1] (None drops that
    branch); k_cmp, v_cmp [B, N, H, *] block summaries (default: `mean_pool` of k and v); block_indices
    [B, T, H, S] overrides the selection; `window_size=0` drops the window branch. q and the gates may hold
    only the last TQ < T tokens (decoding). Returns o [B, TQ, HQ, Dv] (and block_indices [B, TQ, H, S] when
    `return_block_indices`).
    """
    op = "nsa"
    B, T, HQ, H, D, Dv = check_nsa_qkv(op, q, k, v, fewer_queries=True)
    TQ = q.shape[1]
    check_block_size(op, block_size)
    W = _checks.positive_int(op, "window_size", window_size, zero=True)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_gate(op, name, g, B, TQ, HQ, q)
    k_cmp = mean_pool(k, block_size) if k_cmp is None else k_cmp  # [B, N, H, D]
    v_cmp = mean_pool(v, block_size) if v_cmp is None else v_cmp  # [B, N, H, Dv]
    if block_indices is None:
        block_indices = select_blocks(q, k_cmp, block_counts, block_size, scale, T - TQ)  # [B, TQ, H, S]
    o = torch.zeros(B, TQ, HQ, Dv, dtype=torch.float32, device=q.device)
    if g_cmp is not None:
        o_cmp = compressed_attention(q, k_cmp, v_cmp, block_size, scale, offset=T - TQ)  # [B, TQ, HQ, Dv]
        o += g_cmp[..., None] * o_cmp.float()
    if g_slc is not None:
        o += g_slc[..., None] * selected_attention(q, k, v, block_indices, block_size, scale).float()
    if g_swa is not None and W > 0:
        o += g_swa[..., None] * attention_ref(q, k, v, causal=True, scale=scale, window=W).float()
    o = o.to(q.dtype)
    return (o, block_indices) if return_block_indices else o

# %%
#| export nsa.naive
def moba_select(q, k, chunk_size, topk):  # q may hold the last TQ <= T tokens only
    """MoBA's gate: query t of head h scores each complete past chunk by q_t · mean(k_chunk), keeps the best
    `topk − 1` of them and always its own chunk (counted in `topk`).

    q [B, T, HQ, D], k [B, T, H, D] -> block_indices [B, T, HQ, topk] int64, increasing, -1 padded.
    """
    op = "moba"
    check_block_size(op, chunk_size, "chunk_size")
    K = _checks.positive_int(op, "topk", topk)
    B, T, HQ, D = q.shape
    H = k.shape[2]
    k_bar = mean_pool(k, chunk_size).float().repeat_interleave(HQ // H, dim=2)  # [B, N, HQ, D]
    N = k_bar.shape[1]
    s = torch.einsum("bthd,bchd->bthc", q.float(), k_bar)  # [B, T, HQ, N] the gate's scores
    own = (torch.arange(T, device=q.device)[:, None] + k.shape[1] - T) // chunk_size  # [T, 1]
    c = torch.arange(N, device=q.device)[None, :]  # [1, N]
    s = s.masked_fill((c > own)[None, :, None], float("-inf"))  # future chunks
    s = s.masked_fill((c == own)[None, :, None], float("inf"))  # the own chunk, always
    top_score, top = s.topk(min(K, N), dim=-1)  # [B, T, HQ, min(K, N)]
    top = top.masked_fill(top_score == float("-inf"), N).sort(dim=-1).values
    return F.pad(top.masked_fill(top == N, -1), (0, K - top.shape[-1]), value=-1)


def moba(q, k, v, chunk_size, topk, scale=None, return_block_indices=False):
    """MoBA: each query head attends causally over the union of the `topk` chunks its gate picks.

    q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv] -> o [B, T, HQ, Dv] (and block_indices [B, T, HQ, topk]).
    With topk >= the number of chunks it is causal dense attention.
    """
    check_nsa_qkv("moba", q, k, v, fewer_queries=True)
    idx = moba_select(q, k, chunk_size, topk)  # [B, T, HQ, topk]
    o = selected_attention(q, k, v, idx, chunk_size, scale)
    return (o, idx) if return_block_indices else o

# %%
#| export nsa.triton
import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime
from minisparse.nsa.naive import check_block_indices, check_block_size, check_nsa_qkv

_INSTEAD = "minisparse.nsa.selected_attention (the PyTorch version)"


@triton.jit
def selection_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, TQ, TK, scale,
                         HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
                         S: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                         BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Selected attention, forward. Program (i_t, i_b·HS + i_hs): query token i_t and the G query heads that
    share selection head i_hs; they read K/V head i_h = i_hs // (HS // H).

        q tile [BG, BD]  (the G heads, padded to BG ≥ 16 rows)
        for each of the S selected blocks (−1: skipped):      block i: keys i·BS … i·BS + BS − 1
            for each BN-key tile of the block:                 k tile [BN, BD], v tile [BN, BDV]
                s = q kᵀ · scale   [BG, BN]  (keys after the query masked)
                online softmax: m, l, acc ← acc · e^(m_old − m) + e^(s − m) v
        o = acc / l [BG, DV],  lse = m + log l [BG]

    Each selected block is loaded once for the whole group: the kernel's reads are S·BS keys a token a K/V
    head, whatever G is.
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hs = i_bh // HS, i_bh % HS
    i_h = i_hs // (HS // H)
    pos = i_t + TK - TQ  # the query's position among the keys
    o_g, o_d, o_dv, o_n = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BN)
    m_g = o_g < G
    row = (i_b * TQ + i_t) * HQ + i_hs * G + o_g  # [BG] rows of q, o, lse
    b_q = tl.load(q_ptr + row[:, None] * D + o_d[None, :], mask=m_g[:, None] & (o_d[None, :] < D), other=0.0)
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BDV], tl.float32)
    for i_s in range(S):
        i_blk = tl.load(idx_ptr + ((i_b * TQ + i_t) * HS + i_hs) * S + i_s)
        if i_blk >= 0:
            for i_n in range(0, BS, BN):
                if i_blk * BS + i_n <= pos:  # a tile wholly after the query adds nothing
                    o_s = i_blk * BS + i_n + o_n  # [BN] key positions
                    m_s = o_s <= pos
                    kv_row = (i_b * TK + o_s) * H + i_h  # [BN]
                    b_k = tl.load(k_ptr + kv_row[None, :] * D + o_d[:, None],
                                  mask=m_s[None, :] & (o_d[:, None] < D), other=0.0)  # [BD, BN]
                    b_v = tl.load(v_ptr + kv_row[:, None] * DV + o_dv[None, :],
                                  mask=m_s[:, None] & (o_dv[None, :] < DV), other=0.0)  # [BN, BDV]
                    b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * scale  # [BG, BN]
                    b_s = tl.where(m_s[None, :], b_s, float("-inf"))
                    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
                    b_p = tl.exp(b_s - b_mn[:, None])  # [BG, BN]
                    alpha = tl.exp(b_m - b_mn)
                    b_l = b_l * alpha + tl.sum(b_p, 1)
                    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
                    b_m = b_mn
    seen = b_l > 0  # a query with no key: o = 0
    b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    tl.store(o_ptr + row[:, None] * DV + o_dv[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_g[:, None] & (o_dv[None, :] < DV))
    tl.store(lse_ptr + row, tl.where(seen, b_m + tl.log(tl.where(seen, b_l, 1.0)), 0.0), mask=m_g)

# %%
#| export nsa.triton
@triton.jit
def selection_dq_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, TQ, TK, scale,
                        HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, G: tl.constexpr,
                        S: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Selected attention, dQ. The forward's program and loop; per tile, with P recomputed from the lse,

        dP = dO vᵀ [BG, BN],  dS = P ⊙ (dP − δ),  dq += dS k · scale   (δ = rowsum(dO ⊙ O)).
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hs = i_bh // HS, i_bh % HS
    i_h = i_hs // (HS // H)
    pos = i_t + TK - TQ
    o_g, o_d, o_dv, o_n = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BN)
    m_g = o_g < G
    row = (i_b * TQ + i_t) * HQ + i_hs * G + o_g  # [BG]
    b_q = tl.load(q_ptr + row[:, None] * D + o_d[None, :], mask=m_g[:, None] & (o_d[None, :] < D), other=0.0)
    b_do = tl.load(do_ptr + row[:, None] * DV + o_dv[None, :], mask=m_g[:, None] & (o_dv[None, :] < DV),
                   other=0.0)
    b_lse = tl.load(lse_ptr + row, mask=m_g, other=0.0)
    b_delta = tl.load(delta_ptr + row, mask=m_g, other=0.0)
    b_dq = tl.zeros([BG, BD], tl.float32)
    for i_s in range(S):
        i_blk = tl.load(idx_ptr + ((i_b * TQ + i_t) * HS + i_hs) * S + i_s)
        if i_blk >= 0:
            for i_n in range(0, BS, BN):
                if i_blk * BS + i_n <= pos:
                    o_s = i_blk * BS + i_n + o_n
                    m_s = o_s <= pos
                    kv_row = (i_b * TK + o_s) * H + i_h
                    b_k = tl.load(k_ptr + kv_row[:, None] * D + o_d[None, :],
                                  mask=m_s[:, None] & (o_d[None, :] < D), other=0.0)  # [BN, BD]
                    b_v = tl.load(v_ptr + kv_row[None, :] * DV + o_dv[:, None],
                                  mask=m_s[None, :] & (o_dv[:, None] < DV), other=0.0)  # [BDV, BN]
                    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [BG, BN]
                    b_p = tl.where(m_s[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
                    b_dp = tl.dot(b_do, b_v, input_precision=PRECISION)  # [BG, BN]
                    b_ds = b_p * (b_dp - b_delta[:, None])
                    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(dq_ptr + row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m_g[:, None] & (o_d[None, :] < D))

# %%
#| export nsa.triton
@triton.jit
def selection_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, offsets_ptr, entries_ptr,
                         dk_ptr, dv_ptr, TQ, TK, NB, scale,
                         HQ: tl.constexpr, H: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
                         BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BG: tl.constexpr,
                         BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Selected attention, dK and dV, key-centric: program (i_n, i_b·H + i_h) owns BN keys of one block of
    K/V head i_h and walks the list of (query token, selection head) pairs that selected that block — the
    inverse of block_indices, built on the host by one sort (`_inverse_index`). BR/BG entries a step, each
    the BG query heads of one pair, stacked into BR rows:

        k, v tiles [BN, BD], [BN, BDV] (loaded once)
        for each BR-row step of the list:  q [BR, BD], dO [BR, BDV], lse, δ [BR]
            P = exp(q kᵀ · scale − lse),  dv += Pᵀ dO,  dS = P ⊙ (dO vᵀ − δ),  dk += dSᵀ q · scale

    No atomics: every dk, dv row has one owner.
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_blk = (i_n * BN) // BS
    o_d, o_dv, o_r = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BR)
    o_s = i_n * BN + tl.arange(0, BN)  # [BN] key positions
    m_s = o_s < TK
    kv_row = (i_b * TK + o_s) * H + i_h
    b_k = tl.load(k_ptr + kv_row[:, None] * D + o_d[None, :], mask=m_s[:, None] & (o_d[None, :] < D), other=0.0)
    b_v = tl.load(v_ptr + kv_row[:, None] * DV + o_dv[None, :], mask=m_s[:, None] & (o_dv[None, :] < DV),
                  other=0.0)
    b_dk = tl.zeros([BN, BD], tl.float32)
    b_dv = tl.zeros([BN, BDV], tl.float32)
    start = tl.load(offsets_ptr + i_bh * NB + i_blk)
    end = tl.load(offsets_ptr + i_bh * NB + i_blk + 1)
    for i in range(start, end, BR // BG):
        o_e = i + o_r // BG  # [BR] list entry of each row
        g = o_r % BG  # [BR] query head within the group
        m_r = (o_e < end) & (g < G)
        e = tl.load(entries_ptr + o_e, mask=m_r, other=0)  # t · R + selection head within the K/V head
        t = e // R
        row = (i_b * TQ + t) * HQ + (i_h * R + e % R) * G + g  # [BR] rows of q, dO, lse, δ
        b_q = tl.load(q_ptr + row[:, None] * D + o_d[None, :], mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)
        b_do = tl.load(do_ptr + row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & (o_dv[None, :] < DV),
                       other=0.0)
        b_lse = tl.load(lse_ptr + row, mask=m_r, other=0.0)
        b_delta = tl.load(delta_ptr + row, mask=m_r, other=0.0)
        m = m_r[:, None] & (o_s[None, :] <= (t + TK - TQ)[:, None])  # [BR, BN] causal
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [BR, BN]
        b_p = tl.where(m, tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dv += tl.dot(tl.trans(b_p).to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BR, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(dk_ptr + kv_row[:, None] * D + o_d[None, :], (b_dk * scale).to(dk_ptr.dtype.element_ty),
             mask=m_s[:, None] & (o_d[None, :] < D))
    tl.store(dv_ptr + kv_row[:, None] * DV + o_dv[None, :], b_dv.to(dv_ptr.dtype.element_ty),
             mask=m_s[:, None] & (o_dv[None, :] < DV))

# %%
#| export nsa.triton
def _meta(q, v, H, HS, S, block_size):
    """The compile-time constants of a call."""
    HQ, D, DV = q.shape[2], q.shape[3], v.shape[3]
    G = HQ // HS
    return dict(HQ=HQ, H=H, HS=HS, G=G, S=S, BS=block_size, D=D, DV=DV, BG=max(16, triton.next_power_of_2(G)),
                BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(DV)),
                PRECISION="ieee" if q.dtype == torch.float32 else None)  # fp32 in: fp32 products, not tf32


def _fit_keys(block_size):
    """Cap the key tile at the block: a tile never straddles two blocks."""
    return lambda c: {**c, "BN": min(c["BN"], block_size)}


def _selection_forward(q, k, v, idx, block_size, scale, row):
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    HS, S = idx.shape[2], idx.shape[3]
    meta = _meta(q, v, H, HS, S, block_size)
    o = torch.empty(B, TQ, HQ, v.shape[3], device=q.device, dtype=q.dtype)
    lse = torch.empty(B, TQ, HQ, device=q.device, dtype=torch.float32)
    runtime.launch(row + ".fwd", selection_fwd_kernel, lambda c: (TQ, B * HS),
                   (q, k, v, idx, o, lse, TQ, TK, scale), meta, device=q.device, dtype=q.dtype,
                   key=(meta["BD"], meta["BDV"], block_size), fit=_fit_keys(block_size), instead=_INSTEAD)
    return o, lse


def _inverse_index(idx, H, NB):
    """For each (batch, K/V head, block): the (query token, selection head) pairs that selected it, as one
    sorted list `entries` (t · R + r, R = selection heads a K/V head) and `offsets` [B·H·NB + 1] into it.
    One sort on the device, no host sync."""
    B, TQ, HS, S = idx.shape
    R = HS // H
    b = torch.arange(B, device=idx.device).view(B, 1, 1, 1)
    t = torch.arange(TQ, device=idx.device).view(1, TQ, 1, 1)
    hs = torch.arange(HS, device=idx.device).view(1, 1, HS, 1)
    key = ((b * H + hs // R) * NB + idx.long()).masked_fill(idx < 0, B * H * NB)  # padding sorts last
    key, order = key.flatten().sort(stable=True)
    entries = (t * R + hs % R).expand(B, TQ, HS, S).flatten()[order].to(torch.int32)
    counts = torch.bincount(key, minlength=B * H * NB + 1)[: B * H * NB]
    offsets = torch.zeros(B * H * NB + 1, dtype=torch.int32, device=idx.device)
    offsets[1:] = counts.cumsum(0)
    return offsets, entries


def _selection_backward(do, q, k, v, idx, o, lse, block_size, scale, row):
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    HS, S = idx.shape[2], idx.shape[3]
    meta = _meta(q, v, H, HS, S, block_size)
    delta = (o.float() * do.float()).sum(-1)  # [B, TQ, HQ] δ = rowsum(dO ⊙ O)
    dq = torch.empty_like(q)
    common = dict(device=q.device, dtype=q.dtype, key=(meta["BD"], meta["BDV"], block_size),
                  fit=_fit_keys(block_size), instead=_INSTEAD)
    runtime.launch(row + ".dq", selection_dq_kernel, lambda c: (TQ, B * HS),
                   (q, k, v, idx, do, lse, delta, dq, TQ, TK, scale), meta, **common)
    NB = triton.cdiv(TK, block_size)
    offsets, entries = _inverse_index(idx, H, NB)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kv_meta = {n: meta[n] for n in ("HQ", "H", "G", "BS", "D", "DV", "BD", "BDV", "PRECISION")}
    kv_meta.update(R=HS // H, BG=triton.next_power_of_2(meta["G"]))
    runtime.launch(row + ".dkv", selection_dkv_kernel, lambda c: (triton.cdiv(TK, c["BN"]), B * H),
                   (q, k, v, do, lse, delta, offsets, entries, dk, dv, TQ, TK, NB, scale),
                   kv_meta, **{**common, "fit": lambda c: {**_fit_keys(block_size)(c),
                                                            "BR": max(c["BR"], kv_meta["BG"])}})
    return dq, dk, dv

# %%
#| export nsa.triton
class SelectedAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward saves q, k, v, the indices, o and lse; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, idx, block_size, scale, row):
        o, lse = _selection_forward(q, k, v, idx, block_size, scale, row)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.block_size, ctx.scale, ctx.row = block_size, scale, row
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = _selection_backward(do.contiguous(), q, k, v, idx, o, lse, ctx.block_size, ctx.scale,
                                         ctx.row)
        return dq, dk, dv, None, None, None, None


def parallel_selected_attention(q, k, v, block_indices, block_size=64, scale=None):
    """`selected_attention` in Triton, forward and backward, any GQA group size HQ / H ≥ 1.

    q [B, TQ, HQ, D], k [B, T, H, D], v [B, T, H, DV] (TQ ≤ T: the queries are the last TQ positions, so
    TQ = 1 decodes one token); block_indices [B, TQ, H, S] (one selection a group) or [B, TQ, HQ, S] (one a
    query head), int32/int64, -1 padded, each row's blocks distinct. Returns o [B, TQ, HQ, DV] in q's dtype.
    """
    return _selected(q, k, v, block_indices, block_size, scale, "nsa.selection")


def _selected(q, k, v, block_indices, block_size, scale, row):
    op = "parallel_selected_attention" if row == "nsa.selection" else "parallel_moba"
    B, T, HQ, H, D, DV = check_nsa_qkv(op, q, k, v, fewer_queries=True)
    TQ = q.shape[1]
    bs = check_block_size(op, block_size)
    if bs < 16:
        raise ValueError(f"{op}: block_size must be >= 16 (a tensor-core tile), got {bs}")
    _checks.triton_inputs(op, q, k, v, block_indices, max_dims={"D": (D, 256), "DV": (DV, 256)},
                          instead=_INSTEAD)
    check_block_indices(op, block_indices, B, TQ, HQ, H, bs, naive=False, offset=T - TQ)
    scale = _checks.scale(op, scale, D)
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous()
    return SelectedAttentionFunction.apply(q, k, v, idx, bs, scale, row)
# %%
#| export nsa.triton
from minisparse.attention.triton import flash_attention
from minisparse.nsa.naive import check_gate, compressed_attention, mean_pool, moba_select, select_blocks


def parallel_moba(q, k, v, chunk_size, topk, scale=None, return_block_indices=False):
    """`moba` with the attention in Triton (forward and backward): the gate (`moba_select`, PyTorch) picks
    each query head's chunks, then the selection kernels run with one selection a query head.

    q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, DV] -> o [B, T, HQ, DV] (and block_indices [B, T, HQ, topk]).
    """
    check_nsa_qkv("parallel_moba", q, k, v, fewer_queries=True)
    idx = moba_select(q.detach(), k.detach(), chunk_size, topk)  # [B, T, HQ, topk]
    o = _selected(q, k, v, idx, chunk_size, scale, "moba.selection")
    return (o, idx) if return_block_indices else o


def parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, *, block_counts=16, block_size=64, window_size=512, scale=None,
                 block_indices=None, return_block_indices=False, k_cmp=None, v_cmp=None):
    """`nsa` with the selection branch in Triton and the window branch by chapter 1's `flash_attention`; the
    compressed branch and the selection stay in PyTorch (T / block_size summaries a query). Same arguments
    and results as `nsa`.
    """
    op = "parallel_nsa"
    B, T, HQ, H, D, DV = check_nsa_qkv(op, q, k, v, fewer_queries=True)
    TQ = q.shape[1]
    W = _checks.positive_int(op, "window_size", window_size, zero=True)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_gate(op, name, g, B, TQ, HQ, q)
    k_cmp = mean_pool(k, block_size) if k_cmp is None else k_cmp  # [B, N, H, D]
    v_cmp = mean_pool(v, block_size) if v_cmp is None else v_cmp
    if block_indices is None:
        block_indices = select_blocks(q.detach(), k_cmp.detach(), block_counts, block_size, scale, T - TQ)
    o = torch.zeros(B, TQ, HQ, DV, dtype=torch.float32, device=q.device)
    if g_cmp is not None:
        o_cmp = compressed_attention(q, k_cmp, v_cmp, block_size, scale, offset=T - TQ)
        o = o + g_cmp[..., None] * o_cmp.float()
    if g_slc is not None:
        o = o + g_slc[..., None] * _selected(q, k, v, block_indices, block_size, scale, "nsa.selection").float()
    if g_swa is not None and W > 0:
        o = o + g_swa[..., None] * flash_attention(q, k, v, causal=True, scale=scale, window=W).float()
    o = o.to(q.dtype)
    return (o, block_indices) if return_block_indices else o
# %%
#| export nsa.layer
import torch
from torch import nn

from minisparse import _checks
from minisparse.attention.naive import apply_rope
from minisparse.nsa.naive import CompressKV, moba, nsa


class NativeSparseAttention(nn.Module):
    """An NSA attention layer (or MoBA, `kind="moba"`): projections, RoPE, a sigmoid gate MLP, GQA.

    x [B, T, hidden] -> [B, T, hidden]. q: `num_heads` heads, k and v: `num_kv_heads` heads of `head_dim`
    (one block selection a group of num_heads / num_kv_heads query heads). `compress="mlp"` learns φ
    (`CompressKV`, starting as mean pooling), `"mean"` pools. `backend`: "naive", "triton" or "auto" (Triton on
    CUDA tensors or CPU under the interpreter). With `return_block_indices` forward also returns the selection.
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, *, kind="nsa", block_size=64,
                 block_counts=16, window_size=512, compress="mlp", moba_topk=3, rope_theta=10000.0,
                 backend="auto"):
        super().__init__()
        op = "NativeSparseAttention"
        _checks.one_of(op, "kind", kind, ("nsa", "moba"))
        _checks.one_of(op, "compress", compress, ("mlp", "mean"))
        _checks.divides(op, "num_kv_heads", num_kv_heads, "num_heads", num_heads)
        self.kind, self.backend = kind, _checks.backend(op, backend)
        self.HQ, self.H, self.D = num_heads, num_kv_heads, head_dim
        self.block_size, self.block_counts, self.window_size = block_size, block_counts, window_size
        self.moba_topk, self.rope_theta = moba_topk, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if kind == "nsa":
            self.g_proj = nn.Linear(hidden_size, 3 * num_heads)  # the gate MLP: one gate a branch and head
            self.k_cmp = CompressKV(head_dim, block_size) if compress == "mlp" else None
            self.v_cmp = CompressKV(head_dim, block_size) if compress == "mlp" else None

    def forward(self, x, return_block_indices=False, last=None):
        """x [B, T, hidden] -> [B, T, hidden]; `last=n`: the outputs of the last n tokens only, [B, n, hidden]
        (all T keys, n queries: a cheap loss on the final token, or a decoding step)."""
        _checks.layer_input("NativeSparseAttention", x, self)
        B, T, _ = x.shape
        TQ = T if last is None else _checks.positive_int("NativeSparseAttention", "last", last)
        pos = torch.arange(T, device=x.device)
        q = self.q_proj(x[:, T - TQ:]).view(B, TQ, self.HQ, self.D)
        q = apply_rope(q, pos[T - TQ:], self.rope_theta)  # [B, TQ, HQ, D]
        k = apply_rope(self.k_proj(x).view(B, T, self.H, self.D), pos, self.rope_theta)  # [B, T, H, D]
        v = self.v_proj(x).view(B, T, self.H, self.D)  # [B, T, H, D]
        fast = _checks.choose_backend(self.backend, x) == "triton"
        if self.kind == "moba":
            from minisparse.nsa.triton import parallel_moba
            o, idx = (parallel_moba if fast else moba)(q, k, v, self.block_size, self.moba_topk,
                                                        return_block_indices=True)
        else:
            from minisparse.nsa.triton import parallel_nsa
            g = torch.sigmoid(self.g_proj(x[:, T - TQ:])).view(B, TQ, self.HQ, 3)  # [B, TQ, HQ, 3] in (0, 1)
            cmp = {} if self.k_cmp is None else dict(k_cmp=self.k_cmp(k), v_cmp=self.v_cmp(v))
            o, idx = (parallel_nsa if fast else nsa)(
                q, k, v, g[..., 0], g[..., 1], g[..., 2], block_counts=self.block_counts,
                block_size=self.block_size, window_size=self.window_size, return_block_indices=True, **cmp)
        o = self.o_proj(o.reshape(B, TQ, self.HQ * self.D))
        return (o, idx) if return_block_indices else o
# %%
#| export nsa.needle
import torch
from torch import nn

from minisparse.nsa.layer import NativeSparseAttention


def needle_batch(batch, T, n_keys=16, n_values=16, *, pairs=4, avoid=64, block=16, generator=None,
                 device="cpu"):
    """A synthetic retrieval task. The context is filler — key `n_keys` ("blank") with random values —
    with `pairs` needles planted in distinct blocks of `block` tokens: (key, value) pairs with distinct keys.
    The last token asks for one of the keys (its value blank); the answer is that needle's
    value. Needles sit in blocks 1 … outside the last `avoid` tokens, so neither block 0 nor a window of
    `avoid` tokens holds them.

    Returns keys [batch, T], values [batch, T], the asked needle's position [batch] and the answer [batch].
    """
    g = generator
    keys = torch.full((batch, T), n_keys)  # [batch, T] blank
    values = torch.full((batch, T), n_values)  # [batch, T] blank
    blocks = torch.rand(batch, (T - avoid) // block - 1, generator=g).argsort(-1)[:, :pairs] + 1  # distinct
    where = blocks * block + torch.randint(block, (batch, pairs), generator=g)  # [batch, pairs] positions
    asked = torch.rand(batch, n_keys, generator=g).argsort(-1)[:, :pairs]  # [batch, pairs] distinct keys
    rows = torch.arange(batch)[:, None]
    keys[rows, where] = asked
    values[rows, where] = torch.randint(n_values, (batch, pairs), generator=g)
    keys[:, -1] = asked[:, 0]  # the question: the first needle's key, value blank
    where = where[:, 0]
    return (keys.to(device), values.to(device), where.to(device),
            values[torch.arange(batch), where].to(device))


class NeedleModel(nn.Module):
    """Embeddings of key and value, one NSA (or MoBA) layer with a residual, a readout of the last token."""

    def __init__(self, n_keys=16, n_values=16, hidden=64, heads=4, kv_heads=1, **attention):
        super().__init__()
        self.key_emb = nn.Embedding(n_keys + 1, hidden)  # + blank
        self.value_emb = nn.Embedding(n_values + 1, hidden)
        self.attn = NativeSparseAttention(hidden, heads, kv_heads, hidden // heads, **attention)
        self.readout = nn.Linear(hidden, n_values)

    def forward(self, keys, values):
        x = self.key_emb(keys) + self.value_emb(values)  # [B, T, hidden]
        o, idx = self.attn(x, return_block_indices=True, last=1)  # the last token's output only
        return self.readout(x[:, -1] + o[:, 0]), idx  # [B, n_values] logits, [B, 1, H, S] selection


def train_needle(model, steps=300, batch=32, T=256, lr=3e-3, seed=0, avoid=64, log_every=50, pairs=4):
    """Train on fresh needle batches with Adam; returns [(step, loss, accuracy, found)] every `log_every`
    steps, `found` = fraction of last tokens whose selection holds the needle's block (NSA only)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log = []
    for step in range(1, steps + 1):
        keys, values, where, answer = needle_batch(batch, T, pairs=pairs, avoid=avoid,
                                                   block=model.attn.block_size, generator=g)
        logits, idx = model(keys, values)
        loss = nn.functional.cross_entropy(logits, answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == 1:
            acc = (logits.argmax(-1) == answer).float().mean().item()
            block = (where // model.attn.block_size)[:, None, None]  # [B, 1, 1]
            found = (idx[:, -1] == block).any(-1).float().mean().item()
            log.append((step, loss.item(), acc, found))
    return log
