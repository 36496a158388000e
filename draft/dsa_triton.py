# ---
# jupytext:
#   formats: py:percent
# ---
# Draft of chapter 8's "Fast" section (the lead splices these cells into chapters/08_dsa.py). Every code cell is
# plain Python, so `import draft.dsa_triton` works from the repository root for development.

# %% [markdown]
# ## 8.x Fast: gathered keys, a group of heads a program, and a top-k that never sees `[T, T]`
#
# DSA has two kernels to write and one decision to make.
#
# 1. **Sparse attention over gathered tokens.** Each query token brings its own list of `topk` key positions,
#    shared by all of its heads. Chapter 7's selection kernel gathered *blocks* of 64 contiguous keys; here the
#    unit is a single token, so every key row is fetched through an index. What makes this cheap is the same idea
#    as chapter 7's: a program owns one query token and *all* the query heads that read one key head (MLA's latent
#    form has a single key head, so up to 128 heads), and it loads each gathered key row once for all of them.
#    The work per token is then `topk × (heads · (D + Dv))` multiply-adds and the bytes are `topk × D` per key
#    head — the row is fetched once, used by 64 heads.
# 2. **The lightning indexer's scores.** `I[t, s] = Σ_j w[t, j] · ReLU(scale · q_idx[t, j] · k_idx[s])` is a
#    matrix product of the `HI` indexer heads' queries against one shared key, a ReLU, and a weighted sum over the
#    heads. The kernel computes it tile by tile for a chunk of queries, so memory stays at `chunk × T` scores.
# 3. **The top-k.** We keep PyTorch's `torch.topk` on each chunk's scores (radix select on the GPU). Section 8.y
#    measures what it costs next to the scores; a fused running top-k of 2,048 entries would not fit on chip.
#
# A decoding step is the sparse attention with one query token: too few programs to fill a GPU (16 sequences ×
# 2 head blocks), so the kernel also splits the `topk` list into pieces, each program writes a partial softmax
# state, and a small kernel merges them — chapter 3's split-K (`mla_decode`), over 2,048 selected tokens instead
# of the whole cache.

# %% [markdown]
# ### Shapes, and the two forms of the keys
#
# `q [B, Tq, HQ, D]`, `k [B, Tk, H, D]`, `v [B, Tk, H, Dv]`, `indices [B, Tq, topk]`; query `i` sits at position
# `Tk − Tq + i` (prefill: `Tq = Tk`; a decoding step: `Tq = 1`). The GQA form has `HQ = G · H` with head dims up
# to 256. MLA's absorbed form (chapter 3) is the same call with `H = 1`, `D = 512 + 64` (the latent row and its
# rotary part) and `Dv = 512`: the value *is* the first 512 dims of the key row. Pass `v=None` for that: the kernel
# then reads the value from the key tile it already holds, and the key's gradient collects both roles.
#
# Key dims that are not a power of two (576, 192, 72) are split into a power-of-two head `BDA` and a tail `BDB`
# (512 + 64, 128 + 64, 64 + 16 padded from 8): two tensor-core products `q_a k_aᵀ + q_b k_bᵀ`, no padding of 576 to
# 1,024. Under the hood every tile is padded to a power of two ≥ 16 and masked.

# %%
#| export dsa.triton
import functools

import torch
import triton
import triton.language as tl

from minisparse import _checks, runtime

_INSTEAD = "minisparse.dsa.sparse_attention (the PyTorch version)"
_LOG2E = 1.4426950408889634


def _split_dim(D):
    """Key dim D -> (BDA, BDB): a power-of-two head tile (≥ 16) and a tail tile (0 when D fits the head)."""
    head = max(16, 1 << (D.bit_length() - 1))  # the largest power of two ≤ D, at least 16
    tail = D - head
    return head, (0 if tail <= 0 else max(16, triton.next_power_of_2(tail)))


def check_sparse_triton(op, q, k, v, indices, scale):
    """The checks of `sparse_attention_triton`; returns (v_is_k, scale). Shapes, dtypes, devices and kernel limits
    always; the index values (−1 or a past position, no repeats) when `_checks.checking_values` says so."""
    _checks.tensor(op, "q", q, "[B, Tq, HQ, D]")
    _checks.tensor(op, "k", k, "[B, Tk, H, D]")
    _checks.tensor(op, "v", v, "[B, Tk, H, Dv]", optional=True)
    _checks.tensor(op, "indices", indices, "[B, Tq, topk]", dtypes=(torch.int32, torch.int64))
    B, TQ, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{op}: k must be [B, Tk, H, D] with q's B = {B} and D = {D}, got {tuple(k.shape)}")
    if TK < TQ:
        raise ValueError(f"{op}: k must hold at least Tq = {TQ} tokens (the queries are the last Tq positions), "
                         f"got Tk = {TK}")
    _checks.divides(op, "H (k's heads)", H, "HQ (q's heads)", HQ)
    if v is not None:
        if tuple(v.shape[:3]) != (B, TK, H):
            raise ValueError(f"{op}: v must be [B, Tk, H, Dv] = ({B}, {TK}, {H}, Dv) like k, got {tuple(v.shape)}")
        _checks.same_dtype(op, q=q, k=k, v=v)
    else:
        _checks.same_dtype(op, q=q, k=k)
    if indices.shape[:2] != (B, TQ) or indices.shape[2] < 1:
        raise ValueError(f"{op}: indices must be [B, Tq, topk] = ({B}, {TQ}, topk ≥ 1), got {tuple(indices.shape)}")
    DV = v.shape[3] if v is not None else D
    limit = 1024 if H == 1 else 256  # MLA's latent rows (one key head) up to 1024 dims, GQA heads up to 256
    _checks.triton_inputs(op, q, k, v, indices, max_dims={"D": (D, limit), "Dv": (DV, limit)}, instead=_INSTEAD)
    if _checks.checking_values(False, q):
        check_index_values(op, indices, TK)
    return _checks.scale(op, scale, D)


def check_index_values(op, indices, TK):
    """Every index is −1 (padding) or a position ≤ its query's (query i at Tk − Tq + i), none repeated in a row.
    A host sync: called only where value checks are on."""
    TQ = indices.shape[1]
    if indices.numel() == 0:
        return
    pos = torch.arange(TK - TQ, TK, device=indices.device).view(1, TQ, 1)
    bad = (indices < -1) | (indices > pos)
    if bool(bad.any()):
        b, t, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{op}: indices must be -1 (padding) or a key position <= the query's position "
                         f"(query {t} sits at {TK - TQ + t}), got indices[{b}, {t}, {j}] = {int(indices[b, t, j])}")
    srt = indices.sort(-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        b, t, _ = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"{op}: indices[{b}, {t}] selects a key twice (each valid index must appear once a row)")


# %% [markdown]
# ### The forward kernel, tile by tile
#
# ```
# program (t·B·H·NHB + b·H·NHB + h·NHB + hb, split)   one query token, BG heads of the G that read key head h
#   q_a [BG, BDA], q_b [BG, BDB]                  loaded once
#   for each BN-slot tile of the token's index list (slots split·L … (split+1)·L − 1):
#       idx [BN]            (−1, or a key after the query: masked)
#       k_a [BN, BDA], k_b [BN, BDB]              gathered rows: row idx[n] of key head h, once for BG heads
#       s = (q_a k_aᵀ + q_b k_bᵀ) · scale·log₂e   [BG, BN]
#       online softmax in base 2: m, l, acc [BG, BDV]; v = k_a when v is None, else gathered like k
#   one split:   o = acc / l,  lse = m + log₂ l   (base-2 log-sum-exp, kept for the backward)
#   several:     the partial (acc, m, l) of this split → a merge kernel
# ```
#
# `tl.dot` wants tiles of at least 16 rows: a group of G < 16 heads is padded to 16 rows and masked. The
# index row is read in tiles of `BN` slots; padding slots (−1) are masked in the key loads, so a padded tile
# loads nothing. All offsets that multiply a position by a row length are 64-bit: at 128K tokens × 128 heads ×
# 576 dims a query tensor has 9.7·10⁹ elements.

# %%
#| export dsa.triton
@triton.jit
def sparse_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, acc_ptr, m_ptr, l_ptr,
                      B, TQ, TK, TOPK, SPLIT_LEN, ROWS, qk_scale,
                      HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BDA: tl.constexpr, BDB: tl.constexpr,
                      BDV: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                      V_IS_KA: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Sparse attention over gathered key rows, forward.

    Program (i_t·NBHG + i_b·H·NHB + i_h·NHB + i_hb, i_s), NHB = ⌈G / BG⌉ head blocks, NBHG = B·H·NHB; grid
    (TQ·NBHG, NS): the head blocks of one token run side by side and share its gathered rows in L2. Query token i_t (at position TK − TQ + i_t) and
    query heads i_h·G + i_hb·BG … + BG − 1 (the BG ≥ 16 rows of one head block, masked past G),
    over slots [i_s·SPLIT_LEN, (i_s + 1)·SPLIT_LEN) of the token's index row (TOPK slots, −1 = padding).

        q_a [BG, BDA], q_b [BG, BDB] (BDB = 0: no tail)
        for each tile of BN slots:    idx [BN] → k_a [BN, BDA], k_b [BN, BDB], v [BN, BDV] (v = k_a if V_IS_KA)
            s = (q_a k_aᵀ + q_b k_bᵀ)·qk_scale [BG, BN]   (qk_scale = scale·log₂e; −∞ at idx < 0, idx > pos)
            m' = max(m, rowmax s),  α = 2^(m − m'),  p = 2^(s − m')
            l = α l + rowsum p,  acc = α acc + p v
        SPLIT = False: o = acc / l [BG, DV], lse = m + log₂ l [BG] (0 and 0 for a query that saw no key)
        SPLIT = True:  acc, m, l to slot i_s of the partial buffers [NS, ROWS = B·TQ·HQ, …]
    Pointers unused by a variant are None: v_ptr when V_IS_KA, acc_ptr, m_ptr, l_ptr without SPLIT.
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
    b_qa = tl.load(q_ptr + row[:, None] * D + o_da[None, :], mask=m_g[:, None] & (o_da[None, :] < D), other=0.0)
    if BDB > 0:
        o_db = BDA + tl.arange(0, BDB)
        b_qb = tl.load(q_ptr + row[:, None] * D + o_db[None, :], mask=m_g[:, None] & (o_db[None, :] < D),
                       other=0.0)
    k_base = k_ptr + (i_b * TK * H + i_h) * D  # key head i_h of sequence i_b; token n's row at + n·H·D
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
        i_k = tl.load(idx_row + o_slot, mask=o_slot < end, other=-1).to(tl.int64)  # [BN] key positions
        m_n = (i_k >= 0) & (i_k <= pos)
        b_ka = tl.load(k_base + i_k[:, None] * (H * D) + o_da[None, :], mask=m_n[:, None] & (o_da[None, :] < D),
                       other=0.0)  # [BN, BDA]
        b_s = tl.dot(b_qa, tl.trans(b_ka), input_precision=PRECISION)  # [BG, BN]
        if BDB > 0:
            b_kb = tl.load(k_base + i_k[:, None] * (H * D) + o_db[None, :], mask=m_n[:, None] & (o_db[None, :] < D),
                           other=0.0)
            b_s = tl.dot(b_qb, tl.trans(b_kb), b_s, input_precision=PRECISION)
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mr = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # finite reference for rows that saw nothing yet
        b_p = tl.exp2(b_s - b_mr[:, None])  # [BG, BN]
        alpha = tl.exp2(b_m - b_mr)
        b_l = b_l * alpha + tl.sum(b_p, 1)
        if V_IS_KA:
            b_v = b_ka  # MLA: the value is the latent part of the key row (BDV = BDA = DV)
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
        tl.store(o_ptr + row[:, None] * DV + o_dv[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_o)
        tl.store(lse_ptr + row, tl.where(seen, b_m + tl.log2(tl.where(seen, b_l, 1.0)), 0.0), mask=m_g)


# %% [markdown]
# ### Decoding: split the index list, then merge
#
# With one query token a sequence, the grid above has `B · NHB` programs (16 × 2 for a B16 decoding step of MLA's
# 128 heads): an H200 has 132 SMs. So the launcher cuts each index row into `NS` splits of `L` slots — enough
# programs to cover the GPU about twice, none shorter than 256 slots — and each split writes its partial state
# `(acc, m, l)` in fp32. The merge kernel then combines them exactly as the online softmax combines tiles:
#
# ```
# program (row block r)                         BR rows (one (token, head) pair each)
#   for each split i:   m' = max(m, m_i)
#                       l = l·2^(m − m') + l_i·2^(m_i − m'),   o = o·2^(m − m') + acc_i·2^(m_i − m')
#   o / l → o [BR, DV],  m + log₂ l → lse [BR]
# ```
#
# A split whose slots were all padding has `m_i = −∞` and weighs nothing.

# %%
#| export dsa.triton
@triton.jit
def sparse_merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, lse_ptr, ROWS, NS,
                        DV: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr):
    """Merge NS partial softmax states of each row. Program i_r, grid (cdiv(ROWS, BR),): rows i_r·BR … + BR − 1 of
    the partial buffers acc [NS, ROWS, DV], m, l [NS, ROWS] (base 2) → o [ROWS, DV], lse [ROWS] (base 2)."""
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
        b_mn = tl.maximum(b_m, b_mi)
        b_mr = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        alpha, beta = tl.exp2(b_m - b_mr), tl.exp2(b_mi - b_mr)
        b_l = b_l * alpha + b_li * beta
        b_o = b_o * alpha[:, None] + b_ai * beta[:, None]
        b_m = b_mn
    seen = b_l > 0
    b_o = b_o / tl.where(seen, b_l, 1.0)[:, None]
    tl.store(o_ptr + o_r[:, None] * DV + o_dv[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_rd)
    tl.store(lse_ptr + o_r, tl.where(seen, b_m + tl.log2(tl.where(seen, b_l, 1.0)), 0.0), mask=m_r)


# %% [markdown]
# ### The backward kernel: dQ in registers, dK and dV by atomic adds
#
# The backward replays the forward's walk with `P` recomputed from the saved base-2 log-sum-exp. A program owns its
# token's `dq` (one owner: written once, no atomics). The key rows are the problem: a key row is selected by up to
# every later query — thousands of programs — and chapter 7's answer (a key-centric kernel walking the inverse of
# the selection) needs that inverse: a sort of `T × topk` entries (134 M at 64K), and then each entry re-reads a
# whole `[heads, D]` query tile for one key, which is memory-bound. Here each program adds its `[BN, D]`
# contributions into fp32 `dk`, `dv` buffers with atomic adds (`sem="relaxed"`: reductions, no ordering), after
# summing them over its BG heads — one atomic per element per (token, head block), 64× fewer than per head.
#
# ```
# program t·B·H·NHB + b·H·NHB + h·NHB + hb   q_a, q_b [BG, ·], dO [BG, BDV], lse, δ = rowsum(dO ⊙ O) [BG]
# for each tile of BN slots:                 idx → k_a, k_b, v (gathered)
#     p  = 2^(s − lse)                        [BG, BN]
#     dp = dO vᵀ,  ds = p ⊙ (dp − δ)          [BG, BN]
#     dq_a += ds k_a,  dq_b += ds k_b         (· scale at the end)
#     dk_a = dsᵀ q_a · scale, dk_b = dsᵀ q_b · scale, dv = pᵀ dO   [BN, ·] → atomic adds at rows idx
# ```
#
# With `v=None` (MLA) the value's gradient is added into the first `Dv` columns of `dk_a` before its atomic add.
# The order of atomic additions varies from run to run, so the key gradients are not bitwise reproducible.

# %%
#| export dsa.triton
@triton.jit
def sparse_bwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
                      B, TQ, TK, TOPK, scale, qk_scale,
                      HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BDA: tl.constexpr, BDB: tl.constexpr,
                      BDV: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                      V_IS_KA: tl.constexpr, PRECISION: tl.constexpr):
    """Sparse attention, backward: dq of BG heads of one token, its dk, dv contributions by fp32 atomic adds.

    Program i_t·NBHG + i_b·H·NHB + i_h·NHB + i_hb; grid (TQ·NBHG,) as the forward's. Per tile of BN slots,
    with p = 2^(s − lse) [BG, BN] and δ = rowsum(dO ⊙ O):
        dp = dO vᵀ,  ds = p ⊙ (dp − δ),  dq += ds k · scale,
        dk[idx] += dsᵀ q · scale [BN, D],  dv[idx] += pᵀ dO [BN, DV]   (dk, dv fp32 [B, TK, H, ·], atomic)
    V_IS_KA (v = k[..., :DV], MLA): v_ptr and dv_ptr are None; dv is added into dk's first DV columns.
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
    b_do = tl.load(do_ptr + row[:, None] * DV + o_dv[None, :], mask=m_g[:, None] & (o_dv[None, :] < DV), other=0.0)
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
        b_ka = tl.load(k_base + i_k[:, None] * (H * D) + o_da[None, :], mask=m_ka, other=0.0)  # [BN, BDA]
        b_s = tl.dot(b_qa, tl.trans(b_ka), input_precision=PRECISION)
        if BDB > 0:
            m_kb = m_n[:, None] & (o_db[None, :] < D)
            b_kb = tl.load(k_base + i_k[:, None] * (H * D) + o_db[None, :], mask=m_kb, other=0.0)
            b_s = tl.dot(b_qb, tl.trans(b_kb), b_s, input_precision=PRECISION)
        b_p = tl.where(m_n[None, :], tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)  # [BG, BN]
        if V_IS_KA:
            b_v = b_ka
        else:
            b_v = tl.load(v_base + i_k[:, None] * (H * DV) + o_dv[None, :],
                          mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)  # [BN, BDV]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BG, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dsl = b_ds.to(b_ka.dtype)
        b_dqa += tl.dot(b_dsl, b_ka, input_precision=PRECISION)
        b_dka = tl.dot(tl.trans(b_dsl), b_qa, input_precision=PRECISION) * scale  # [BN, BDA]
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)  # [BN, BDV]
        if V_IS_KA:
            b_dka += b_dv
        else:
            tl.atomic_add(dv_base + i_k[:, None] * (H * DV) + o_dv[None, :], b_dv,
                          mask=m_n[:, None] & (o_dv[None, :] < DV), sem="relaxed")
        tl.atomic_add(dk_base + i_k[:, None] * (H * D) + o_da[None, :], b_dka, mask=m_ka, sem="relaxed")
        if BDB > 0:
            b_dqb += tl.dot(b_dsl, b_kb, input_precision=PRECISION)
            b_dkb = tl.dot(tl.trans(b_dsl), b_qb, input_precision=PRECISION) * scale
            tl.atomic_add(dk_base + i_k[:, None] * (H * D) + o_db[None, :], b_dkb, mask=m_kb, sem="relaxed")
    tl.store(dq_ptr + row[:, None] * D + o_da[None, :], (b_dqa * scale).to(dq_ptr.dtype.element_ty), mask=m_qa)
    if BDB > 0:
        tl.store(dq_ptr + row[:, None] * D + o_db[None, :], (b_dqb * scale).to(dq_ptr.dtype.element_ty), mask=m_qb)


# %% [markdown]
# ### The launchers
#
# `_meta` turns a call's shapes into the kernels' compile-time constants; `_plan_splits` decides the decoding
# split (one split whenever the grid already covers the GPU twice, as in prefill); the autograd function saves
# `o` and the base-2 `lse` for the backward. The head block `BG` comes from the launch table (64 heads on an H200,
# 16 on a T4) capped at the padded group.

# %%
#| export dsa.triton
_MIN_SPLIT = 256  # index slots: the shortest split worth a program


def _meta(q, k, v, D, DV):
    BDA, BDB = _split_dim(D)
    return dict(HQ=q.shape[2], H=k.shape[2], G=q.shape[2] // k.shape[2], D=D, DV=DV, BDA=BDA, BDB=BDB,
                BDV=max(16, triton.next_power_of_2(DV)), V_IS_KA=v is None,
                PRECISION="ieee" if q.dtype == torch.float32 else None)  # fp32: exact products, not tf32


def _row(meta, kind):
    """The LAUNCH_TABLE row of a call: ".d512" for MLA-sized key rows (over 256 dims)."""
    return f"dsa.sparse.{kind}" + (".d512" if meta["BDA"] + meta["BDB"] > 256 else "")


def _fit_heads(G):
    """Cap the head block at the padded group: a group of 16 heads needs no 64-row tile."""
    return lambda c: {**c, "BG": min(c["BG"], max(16, triton.next_power_of_2(G)))}


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan_splits(programs, topk, device, num_splits=None):
    """(NS, split_len): splits of the index list so that about two programs run per SM (1 in prefill)."""
    if num_splits is None:
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
        num_splits = max(1, min(triton.cdiv(2 * sms, programs), topk // _MIN_SPLIT))
    split_len = triton.cdiv(topk, num_splits)
    return triton.cdiv(topk, split_len), split_len


def _value_dim(k, v):
    """Dv: v's last dim, or — v None, MLA's form — the power-of-two head of k's rows (512 of 576)."""
    return v.shape[3] if v is not None else min(k.shape[3], _split_dim(k.shape[3])[0])


def _sparse_forward(q, k, v, idx, scale, num_splits=None):
    B, TQ, HQ, D = q.shape
    TK, H, TOPK = k.shape[1], k.shape[2], idx.shape[2]
    DV = _value_dim(k, v)
    meta = _meta(q, k, v, D, DV)
    fit = _fit_heads(meta["G"])
    name = _row(meta, "fwd")
    BG = fit(runtime.launch_configs(name, q.device, q.dtype)[0])["BG"]  # the head block the launch tries first
    NS, split_len = _plan_splits(TQ * B * H * triton.cdiv(meta["G"], BG), TOPK, q.device, num_splits)
    ROWS = B * TQ * HQ
    o = torch.empty(B, TQ, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, TQ, HQ, device=q.device, dtype=torch.float32)
    if ROWS == 0:
        return o, lse
    if NS > 1:
        acc = torch.empty(NS, ROWS, DV, device=q.device, dtype=torch.float32)
        m, l_ = (torch.empty(NS, ROWS, device=q.device, dtype=torch.float32) for _ in range(2))
    else:
        acc = m = l_ = None
    runtime.launch(name, sparse_fwd_kernel, lambda c: (TQ * B * H * triton.cdiv(meta["G"], c["BG"]), NS),
                   (q, k, v, idx, o, lse, acc, m, l_, B, TQ, TK, TOPK, split_len, ROWS, scale * _LOG2E),
                   {**meta, "SPLIT": NS > 1}, device=q.device, dtype=q.dtype,
                   key=(meta["BDA"], meta["BDB"], meta["BDV"]), fit=fit,
                   autotune_key=["B", "TQ", "TOPK", "SPLIT_LEN"], instead=_INSTEAD)
    if NS > 1:
        runtime.launch("dsa.sparse.merge", sparse_merge_kernel, lambda c: (triton.cdiv(ROWS, c["BR"]),),
                       (acc, m, l_, o, lse, ROWS, NS), dict(DV=DV, BDV=meta["BDV"]), device=q.device,
                       dtype=q.dtype, key=(meta["BDV"],), instead=_INSTEAD)
    return o, lse


def _sparse_backward(do, q, k, v, idx, o, lse, scale):
    B, TQ, HQ, D = q.shape
    TK, H, TOPK = k.shape[1], k.shape[2], idx.shape[2]
    DV = _value_dim(k, v)
    meta = _meta(q, k, v, D, DV)
    fit = _fit_heads(meta["G"])
    name = _row(meta, "bwd")
    delta = (o.float() * do.float()).sum(-1)  # [B, TQ, HQ] δ = rowsum(dO ⊙ O)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)  # atomic targets: zeros, fp32
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32) if v is not None else None
    if dq.numel() == 0:
        return dq.zero_(), dk.to(k.dtype), (dv.to(v.dtype) if v is not None else None)
    runtime.launch(name, sparse_bwd_kernel, lambda c: (TQ * B * H * triton.cdiv(meta["G"], c["BG"]),),
                   (q, k, v, idx, do, lse, delta, dq, dk, dv, B, TQ, TK, TOPK, scale, scale * _LOG2E),
                   meta, device=q.device, dtype=q.dtype,
                   key=(meta["BDA"], meta["BDB"], meta["BDV"]), fit=fit, instead=_INSTEAD)
    return dq, dk.to(k.dtype), (dv.to(v.dtype) if v is not None else None)


# %% [markdown]
# The public op: one validation call, then the autograd function. `indices` get no gradient (a selection is not
# differentiable); the indexer learns from its own loss (section 8.x, the warm-up).

# %%
#| export dsa.triton
class SparseAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward saves q, k, v, the indices, o and the base-2 lse; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale, num_splits):
        o, lse = _sparse_forward(q, k, v, idx, scale, num_splits)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = _sparse_backward(do.contiguous(), q, k, v, idx, o, lse, ctx.scale)
        return dq, dk, dv, None, None, None


def sparse_attention_triton(q, k, v, indices, scale=None):
    """`sparse_attention` in Triton, forward and backward: attention of each query over its selected key tokens only,
    the selection shared by all heads.

    q        [B, Tq, HQ, D]   query i sits at position Tk − Tq + i (prefill: Tq = Tk; one decoding step: Tq = 1)
    k        [B, Tk, H, D]    HQ a multiple of H (GQA); MLA's absorbed form: H = 1, D = 512 + 64
    v        [B, Tk, H, Dv], or None: the value is the key row's first Dv dims, Dv = the largest power of two
             ≤ D (512 of MLA's 576: the latent; all of k when D is a power of two); k's gradient then holds both
    indices  [B, Tq, topk] int32/int64: key positions ≤ the query's, each at most once a row, −1 = padding (a
             query with fewer than topk past tokens); checked on CPU, on CUDA after runtime.set_value_checks(True)
    scale    softmax scale, default D ** -0.5 (MLA: pass (qk_nope + qk_rope) ** -0.5)
    -> o [B, Tq, HQ, Dv] in q's dtype; fp32 accumulation. A query whose slots are all −1 gets o = 0.

    Inputs share one dtype (fp32, fp16, bf16; fp32 or fp16 in the interpreter). Gradients for q, k and v; none for
    indices. Head dims up to 256 (GQA) or 1024 (H = 1).
    """
    return _sparse_attention(q, k, v, indices, scale)


def _sparse_attention(q, k, v, indices, scale=None, num_splits=None):
    """sparse_attention_triton with the decoding split forced (tests): num_splits None = planned."""
    scale = check_sparse_triton("sparse_attention_triton", q, k, v, indices, scale)
    q, k, idx = q.contiguous(), k.contiguous(), indices.contiguous()
    v = v.contiguous() if v is not None else None
    return SparseAttentionFunction.apply(q, k, v, idx, scale, num_splits)


# %% [markdown]
# ### The lightning indexer's score kernel, tile by tile
#
# The indexer has `HI` heads of `DI` dims and one key per token, shared by the heads (MQA). For `BT` query tokens,
# stack their `HI` head rows into one `[BT·HI, DI]` matrix: one tensor-core product against a key tile gives every
# head's dot product with every key, and the rest is element-wise. The ReLU and the weighted head sum come after
# the product; since `scale > 0`, `ReLU(scale·x) = scale·ReLU(x)` and the scale folds into the weights.
#
# ```
# program (query block m, key split s, b)       BT query tokens, keys [s·KS, (s+1)·KS)
#   q [BT·HI → BT·BHI, BDI]                      row (t, j): token t's head j (padded heads masked)
#   w [BT·BHI] = w_idx · scale
#   for each BN-key tile up to the last query's position (later tiles: −∞, no product):
#       x = q kᵀ                                 [BT·BHI, BN]   the only tensor-core work
#       I = Σ_j w[t, j] · ReLU(x)                reshape [BT, BHI, BN], sum over heads → [BT, BN]
#       −∞ where key > the query's position;  store the tile of the chunk's score rows
# ```
#
# The program keeps its query rows on chip and streams the keys, as flash attention does: each key tile read once
# serves `BT · HI` rows (256 at BT = 4, HI = 64). The scores of a *chunk* of queries land in a `[chunk, W]` fp32
# buffer (W: the keys the chunk's last query can see), then `torch.topk` picks each row's `topk` largest. The chunk
# is sized so that the buffer stays near 1 GiB: 4,096 queries at 64K, all of them at 8K. A decoding step (one
# query against a long cache) splits the keys instead (`KS`), so that 16 sequences still fill the GPU.
#
# **FP8.** On GPUs with FP8 tensor cores (sm_89 and newer) `q_idx` and `k_idx` may come as `torch.float8_e4m3fn`:
# the same kernel then runs its product in FP8 (twice the tensor-core rate of bf16, half the bytes), accumulating in
# fp32; the ReLU, the weights and the head sum stay fp32. Production DeepSeek-V3.2 stores the indexer's keys this
# way; the benchmark measures how much of the bf16 top-k it keeps.

# %%
#| export dsa.triton
@triton.jit
def indexer_score_kernel(q_ptr, k_ptr, w_ptr, s_ptr, TQ, TK, C0, CQ, W, KS, scale,
                         HI: tl.constexpr, DI: tl.constexpr, BHI: tl.constexpr, BDI: tl.constexpr,
                         BT: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """Lightning-indexer scores of a chunk of queries: I[t, s] = Σ_j w[t, j]·ReLU(scale·q[t, j]·k[s]), s ≤ pos(t).

    Program (i_m, i_s, i_b); grid (cdiv(CQ, BT), cdiv(W, KS), B). Queries C0 + i_m·BT … + BT − 1 (of TQ, query t at
    position TK − TQ + t) and keys [i_s·KS, min((i_s + 1)·KS, W)). q [B, TQ, HI, DI], k [B, TK, DI], w [B, TQ, HI];
    writes rows t − C0 of the chunk's scores s [B, CQ, W] (fp32; −∞ after the query's position).

        q [BT·BHI, BDI] (row r: token r // BHI, head r % BHI),  w·scale [BT·BHI]
        per key tile [BN, BDI] up to the block's last position:  x = q kᵀ [BT·BHI, BN];  I = Σ_heads w·ReLU(x)
        → [BT, BN];  the tiles after it: −∞
    """
    i_m, i_s, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
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
        b_k = tl.load(k_base + o_n[:, None] * DI + o_d[None, :], mask=(o_n[:, None] < n_stop) & (o_d[None, :] < DI),
                      other=0.0)  # [BN, BDI]
        b_x = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BT·BHI, BN]
        b_x = tl.maximum(b_x, 0.0) * b_w[:, None]
        b_i = tl.sum(tl.reshape(b_x, (BT, BHI, BN)), 1)  # [BT, BN]
        b_i = tl.where(o_n[None, :] <= pos[:, None], b_i, float("-inf"))
        tl.store(s_rows[:, None] + o_n[None, :], b_i, mask=m_t[:, None] & (o_n[None, :] < n_end))
    n_mid = tl.where(n_stop > n_start, n_start + (n_stop - n_start + BN - 1) // BN * BN, n_start)
    for n0 in range(n_mid, n_end, BN):  # the rest of the range: −∞
        o_n = n0 + tl.arange(0, BN)
        tl.store(s_rows[:, None] + o_n[None, :], tl.full([BT, BN], float("-inf"), tl.float32),
                 mask=m_t[:, None] & (o_n[None, :] < n_end))


# %% [markdown]
# ### The indexer's launcher: chunks of queries, then `torch.topk`
#
# `_score_chunk` runs the kernel for queries `[c0, c1)`; `_topk_chunk` keeps each row's `topk` largest (rows that
# can see at most `topk` keys keep all of them, without a top-k). `−∞` entries — keys in a query's future — come
# back as `−1`, the padding of a query with fewer than `topk` past tokens. The returned indices are in no
# particular order (`sorted=False` spares a sort of every row); the set is what the attention uses.

# %%
#| export dsa.triton
_SCORE_BUDGET = 1 << 28  # fp32 scores a chunk: 1 GiB


def check_indexer_triton(op, q_idx, k_idx, w_idx, topk, scale):
    """The checks of `lightning_indexer`; returns (topk, scale)."""
    _checks.tensor(op, "q_idx", q_idx, "[B, Tq, HI, DI]")
    _checks.tensor(op, "k_idx", k_idx, "[B, Tk, DI]")
    _checks.tensor(op, "w_idx", w_idx, "[B, Tq, HI]", dtypes=_checks.FLOATS)
    topk = _checks.positive_int(op, "topk", topk)
    B, TQ, HI, DI = q_idx.shape
    if k_idx.shape[0] != B or k_idx.shape[2] != DI or k_idx.shape[1] < TQ:
        raise ValueError(f"{op}: k_idx must be [B, Tk, DI] with q_idx's B = {B}, DI = {DI} and Tk ≥ Tq = {TQ}, "
                         f"got {tuple(k_idx.shape)}")
    _checks.shape(op, "w_idx", w_idx, (B, TQ, HI), "[B, Tq, HI]", "one weight a query token and indexer head")
    fp8 = getattr(torch, "float8_e4m3fn", None)
    _checks.same_dtype(op, (*_checks.FLOATS, fp8) if fp8 else _checks.FLOATS, q_idx=q_idx, k_idx=k_idx)
    if q_idx.dtype == fp8:
        cc = torch.cuda.get_device_capability(q_idx.device) if q_idx.is_cuda else None
        if cc is None or cc < (8, 9):
            raise TypeError(f"{op}: float8_e4m3fn q_idx/k_idx need a GPU with FP8 tensor cores (sm_89 or newer), "
                            f"got {q_idx.device}{'' if cc is None else f' (sm_{cc[0]}{cc[1]})'}")
    _checks.triton_inputs(op, q_idx, k_idx, w_idx, max_dims={"DI": (DI, 256), "HI": (HI, 128)},
                          instead="minisparse.dsa.indexer_scores + select_topk")
    if _checks.checking_values(False, q_idx):
        _checks.value_range(op, "w_idx", w_idx, finite=True)
    return topk, _checks.scale(op, scale, DI)


def _chunk_rows(B, TQ, TK):
    """Queries a chunk: as many as keep B × chunk × TK fp32 scores within _SCORE_BUDGET (multiples of 64)."""
    return max(64, min(TQ, _SCORE_BUDGET // max(1, B * TK)) // 64 * 64)


def _score_chunk(q_idx, k_idx, w_idx, c0, c1, scale, key_split=None):
    """Scores [B, c1 − c0, W] fp32 of queries c0 … c1 − 1 against the W keys the last of them sees; key_split
    (tests) replaces the planned keys a program."""
    B, TQ, HI, DI = q_idx.shape
    TK = k_idx.shape[1]
    CQ, W = c1 - c0, c1 + TK - TQ
    scores = torch.empty(B, CQ, W, device=q_idx.device, dtype=torch.float32)
    fp8 = q_idx.element_size() == 1  # FP8 products take K ≥ 32
    meta = dict(HI=HI, DI=DI, BHI=triton.next_power_of_2(HI), BDI=max(32 if fp8 else 16, triton.next_power_of_2(DI)),
                PRECISION="ieee" if q_idx.dtype == torch.float32 else None)
    cfg = runtime.launch_configs("dsa.indexer", q_idx.device, q_idx.dtype)[0]

    def fit(c):  # at least 16 rows for tl.dot, at most the chunk's queries
        bt = min(c["BT"], triton.next_power_of_2(CQ))
        return {**c, "BT": max(bt, triton.cdiv(16, meta["BHI"]))}

    blocks = B * triton.cdiv(CQ, fit(cfg)["BT"])
    KS = W if key_split is None else key_split
    if q_idx.is_cuda and key_split is None:  # few query blocks (decoding): split the keys too, two programs an SM
        want = triton.cdiv(2 * _sm_count(q_idx.device.index or 0), blocks)
        KS = triton.cdiv(triton.cdiv(W, max(1, min(want, W // 1024))), 64) * 64
    runtime.launch("dsa.indexer", indexer_score_kernel,
                   lambda c: (triton.cdiv(CQ, c["BT"]), triton.cdiv(W, KS), B),
                   (q_idx, k_idx, w_idx, scores, TQ, TK, c0, CQ, W, KS, scale), meta,
                   device=q_idx.device, dtype=q_idx.dtype, key=(meta["BHI"], meta["BDI"]), fit=fit,
                   autotune_key=["TQ", "CQ"], instead="minisparse.dsa.indexer_scores + select_topk")
    return scores


def _topk_chunk(scores, topk, first_pos):
    """Indices [B, CQ, min(topk, W)] of each row's largest scores, −1 for −∞ (future) entries."""
    B, CQ, W = scores.shape
    if W <= topk:  # every visible key is kept: no top-k
        n = torch.arange(W, device=scores.device)
        pos = first_pos + torch.arange(CQ, device=scores.device)[:, None]
        return torch.where(n <= pos, n, -1).expand(B, CQ, W)
    values, ids = torch.topk(scores, topk, dim=-1, sorted=False)
    return ids.masked_fill_(values == float("-inf"), -1)


def lightning_indexer(q_idx, k_idx, w_idx, topk, scale=None):
    """The lightning indexer and its top-k in Triton, without the [T, T] score matrix.

    q_idx [B, Tq, HI, DI]  indexer queries (fp32, fp16, bf16; or float8_e4m3fn on sm_89+ GPUs, with k_idx)
    k_idx [B, Tk, DI]      one indexer key a token, shared by the heads; query i sits at position Tk − Tq + i
    w_idx [B, Tq, HI]      per-head weights
    topk  keys kept a query;  scale  default DI ** -0.5
    -> indices [B, Tq, topk] int64: the keys s ≤ pos(t) with the topk largest I[t, s] = Σ_j w[t, j] ·
       ReLU(scale · q_idx[t, j] · k_idx[s]) (fla's naive_dsa_indexer(..., activation='relu') up to ties), in no
       particular order; −1 pads a query with fewer than topk past tokens.

    Scores are computed a chunk of queries at a time into a [B, chunk, Tk] fp32 buffer of about 1 GiB.
    """
    op = "lightning_indexer"
    topk, scale = check_indexer_triton(op, q_idx, k_idx, w_idx, topk, scale)
    q_idx, k_idx, w_idx = (x.detach().contiguous() for x in (q_idx, k_idx, w_idx))
    B, TQ, _, _ = q_idx.shape
    TK = k_idx.shape[1]
    out = torch.full((B, TQ, topk), -1, device=q_idx.device, dtype=torch.int64)
    if out.numel() == 0:
        return out
    chunk = _chunk_rows(B, TQ, TK)
    for c0 in range(0, TQ, chunk):
        c1 = min(TQ, c0 + chunk)
        W = c1 + TK - TQ
        if W <= topk:  # the chunk's queries keep every past key: no scores needed
            out[:, c0:c1, :W] = _topk_chunk(torch.empty(B, c1 - c0, W, device=q_idx.device), topk, c0 + TK - TQ)
            continue
        ids = _topk_chunk(_score_chunk(q_idx, k_idx, w_idx, c0, c1, scale), topk, c0 + TK - TQ)
        out[:, c0:c1, :ids.shape[2]] = ids
    return out


def selection_overlap(a, b):
    """The mean fraction of b's selected positions (≥ 0) that a selects too, over rows: a top-k's agreement with
    another (FP8 vs bf16 indexer). a, b [B, T, topk] int64, −1 padded."""
    B, T, K = b.shape
    n = int(max(a.max(), b.max())) + 2
    hit = torch.zeros(B, T, n, dtype=torch.bool, device=a.device)
    hit.scatter_(2, a.clamp(min=-1) + 1, True)  # column 0 absorbs the padding
    shared = hit.gather(2, b + 1) & (b >= 0)
    return float((shared.sum(-1) / (b >= 0).sum(-1).clamp(min=1)).mean())
