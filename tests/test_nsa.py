"""Chapter 7: NSA and MoBA — the naive ops against fla's references and an own MoBA reference, the limits, the
bad-input table (shared by the naive and Triton ops), the Triton kernels against the naive ops."""
import math

import pytest
import torch

import minisparse  # noqa: F401  before fla (see minisparse.runtime)
from minisparse import nsa as N
from minisparse.attention import attention_ref
from minisparse import runtime
from minisparse.testing import TOLERANCES, assert_close, make_qkv, with_constexprs


FLA_NAIVE = "fla.ops.nsa.naive"  # the references of conftest's fla_naive fixture


DEV = runtime.device()
DTYPES = [torch.float32] if DEV.type == "cpu" else [torch.bfloat16, torch.float16]


def gates(B, T, HQ, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, T, HQ, generator=g) for _ in range(3)]


# ------------------------------------------------------------------------------------------- naive vs fla
@pytest.mark.parametrize("T,HQ,H,bs", [(37, 4, 2, 8), (64, 2, 2, 16), (50, 16, 1, 16)])
def test_mean_pool_and_compressed_attention_match_fla(T, HQ, H, bs, fla_naive):
    q, k, v = make_qkv(2, T, HQ, 16, HKV=H, seed=1)
    kc, vc = N.mean_pool(k, bs), N.mean_pool(v, bs)
    assert kc.shape == (2, math.ceil(T / bs), H, 16)
    assert_close("last block", k[:, (kc.shape[1] - 1) * bs:].mean(1), kc[:, -1], 1e-6)
    want, _ = fla_naive.naive_nsa_compression(q, kc, vc, bs, 16 ** -0.5)
    assert_close("o_cmp", want, N.compressed_attention(q, kc, vc, bs), 1e-5)


@pytest.mark.parametrize("T,HQ,H,bs,S", [(37, 4, 2, 8, 3), (100, 8, 2, 8, 5), (64, 16, 1, 16, 16),
                                         (90, 2, 1, 8, 4)])
def test_select_blocks_matches_fla_topk(T, HQ, H, bs, S, fla_naive):
    q, k, _ = make_qkv(2, T, HQ, 16, HKV=H, seed=2)
    kc = N.mean_pool(k, bs)
    ours = N.select_blocks(q, kc, S, bs)
    theirs = fla_naive.naive_nsa_topk(q, kc, S, bs, 16 ** -0.5)
    assert ours.shape == theirs.shape == (2, T, H, S)
    srt = lambda x: x.masked_fill(x < 0, 10**6).sort(-1).values  # noqa: E731  sets, padding last
    assert torch.equal(srt(ours), srt(theirs))
    valid = ours[ours >= 0]
    assert torch.equal(ours, srt(ours).masked_fill(srt(ours) == 10**6, -1)) and valid.numel()


@pytest.mark.parametrize("T,HQ,H,bs,S", [(37, 4, 2, 8, 3), (70, 2, 1, 16, 3), (48, 16, 1, 8, 4)])
def test_selected_attention_matches_fla_selection(T, HQ, H, bs, S, fla_naive):
    q, k, v = make_qkv(1, T, HQ, 16, HKV=H, seed=3)
    idx = N.select_blocks(q, N.mean_pool(k, bs), S, bs)
    idx[:, ::5, :, -1] = -1  # padding in the middle of rows too
    assert_close("o_slc", fla_naive.naive_nsa_selection(q, k, v, idx, bs), N.selected_attention(q, k, v, idx, bs),
                 1e-5)


def test_nsa_matches_fla_naive_nsa_plus_the_window_branch(monkeypatch, fla_naive):
    B, T, HQ, H, bs, S, W = 1, 75, 16, 1, 16, 3, 20
    q, k, v = make_qkv(B, T, HQ, 16, HKV=H, seed=4)
    gc, gs, gw = gates(B, T, HQ)
    if q.device.type == "cpu":  # fla 0.6's mean pooling is a Triton kernel that finds no driver in the interpreter:
        # pool with ours (tested against the definition above), keep the rest of fla's naive_nsa
        monkeypatch.setattr(fla_naive, "mean_pooling", lambda x, bs, cu_seqlens=None: N.mean_pool(x, bs))
    want = fla_naive.naive_nsa(q, k, v, gc, gs, None, block_counts=S, block_size=bs, window_size=0)
    o, idx = N.nsa(q, k, v, gc, gs, None, block_counts=S, block_size=bs, window_size=0, return_block_indices=True)
    assert_close("nsa, window 0", want, o, 1e-5)
    o_w = N.nsa(q, k, v, gc, gs, gw, block_counts=S, block_size=bs, window_size=W)
    assert_close("window branch", want + gw[..., None] * attention_ref(q, k, v, window=W), o_w, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_pool_does_not_overflow_near_the_largest_float(dtype):
    """Values near fp32's (and bf16's) max: their fp32 block sum overflowed to inf; the mean is finite now, and for
    ordinary values bit for bit the plain fp32 sum divided by the count."""
    x = torch.full((1, 40, 2, 4), 3e38).to(dtype)  # blocks of 16, 16 and a partial 8
    x[:, :, 1] *= -1
    assert torch.equal(N.mean_pool(x, 16), x[:, :3])  # every token of a block is the same
    y = make_qkv(2, 75, 3, 8, seed=12)[0].to(dtype) * 1e30
    for bs in (1, 4, 16, 64):
        full = 75 // bs
        sums = torch.cat([y[:, :full * bs].unflatten(1, (full, bs)).sum(2, dtype=torch.float32),
                          y[:, full * bs:].sum(1, keepdim=True, dtype=torch.float32)], 1)[:, :-(-75 // bs)]
        counts = torch.tensor([bs] * full + [75 - full * bs])[:sums.shape[1]].view(1, -1, 1, 1)
        assert torch.equal(N.mean_pool(y, bs), (sums / counts).to(dtype)), bs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D,bs", [(2, 75, 3, 8, 16), (1, 130, 2, 24, 64), (1, 64, 1, 128, 64), (2, 0, 2, 8, 16)])
def test_pool_kernel_matches_mean_pool(poisoned, dtype, B, T, H, D, bs):
    """The pooling kernel of parallel_nsa without autograd against mean_pool in fp32: a partial last block, D not a
    power of two, two sequences, an empty one; and blocks near the largest float stay finite."""
    from minisparse.nsa.triton import _mean_pool

    x = make_qkv(B, T, H, D, seed=T + D)[0].to(DEV, dtype)
    got = _mean_pool(x, bs)
    assert got.dtype == dtype and got.shape == (B, -(-T // bs), H, D)
    assert_close(f"pool T{T} D{D}", N.mean_pool(x.float(), bs), got.float(), TOLERANCES[dtype][0])
    if dtype != torch.float16:
        big = torch.full((1, 40, 2, 4), 3e38, device=DEV).to(dtype)  # blocks of 16, 16 and a partial 8
        big[:, :, 1] *= -1
        assert_close("pool near the largest float", big[:, :3].float(), _mean_pool(big, 16).float(), 1e-6)


def test_compression_and_the_layers_take_an_empty_sequence():
    _, k, _ = make_qkv(2, 0, 2, 8, seed=6)
    k.requires_grad_()
    out = N.CompressKV(8, block_size=16, stride=8)(k)
    assert out.shape == (2, 0, 2, 8)
    out.sum().backward()  # still linked to x
    for kind in ("nsa", "moba"):
        layer = N.NativeSparseAttention(32, 4, 2, 8, block_size=16, block_counts=3, window_size=8, kind=kind)
        assert layer(torch.randn(1, 0, 32)).shape == (1, 0, 32)


def test_compress_kv_starts_as_mean_pooling_and_learns():
    _, k, _ = make_qkv(2, 40, 2, 8, seed=6)
    phi = N.CompressKV(8, block_size=8)
    assert_close("fresh φ", N.mean_pool(k, 8)[:, :5], phi(k), 1e-6)
    phi2 = N.CompressKV(8, block_size=16, stride=8)
    out = phi2(k)
    assert out.shape == (2, 5, 2, 8)
    assert_close("overlapping windows", k[:, 8:24].mean(1), out[:, 1], 1e-6)
    out.square().sum().backward()
    assert phi2.down.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stride must be <= block_size"):
        N.CompressKV(8, block_size=8, stride=16)


# ------------------------------------------------------------------------------------------- MoBA
def moba_reference(q, k, v, chunk, topk):
    """MoBA from its paper's definition, one query and one head at a time: gate scores ⟨q, mean(K_chunk)⟩ of
    the complete past chunks, top-(k−1) of them plus the own chunk, causal softmax over their tokens."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    o = torch.zeros(B, T, HQ, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            kh, vh = k[b, :, h // G].double(), v[b, :, h // G].double()
            for t in range(T):
                own = t // chunk
                past = [(float(q[b, t, h].double() @ kh[c * chunk:(c + 1) * chunk].mean(0)), c) for c in range(own)]
                chosen = {c for _, c in sorted(past, reverse=True)[:topk - 1]} | {own}
                keys = [s for s in range(t + 1) if s // chunk in chosen]
                w = torch.softmax((kh[keys] @ q[b, t, h].double()) * D ** -0.5, 0)
                o[b, t, h] = w @ vh[keys]
    return o


@pytest.mark.parametrize("T,HQ,H,chunk,topk", [(45, 2, 1, 8, 2), (64, 4, 2, 16, 3), (33, 3, 3, 4, 4)])
def test_moba_matches_its_definition(T, HQ, H, chunk, topk):
    q, k, v = make_qkv(1, T, HQ, 8, HKV=H, seed=7)
    assert_close("moba", moba_reference(q, k, v, chunk, topk), N.moba(q, k, v, chunk, topk).double(), 1e-5)


# ------------------------------------------------------------------------------------------- limits
def test_every_block_selected_is_causal_attention():
    T, bs = 53, 8
    q, k, v = make_qkv(2, T, 4, 16, HKV=2, seed=8)
    nb = math.ceil(T / bs)
    all_blocks = torch.arange(nb).view(1, 1, 1, nb).expand(2, T, 2, nb).clone()
    all_blocks[all_blocks * bs > torch.arange(T).view(1, T, 1, 1)] = -1
    want = attention_ref(q, k, v)
    assert_close("all blocks", want, N.selected_attention(q, k, v, all_blocks, bs), 1e-5)
    idx = N.select_blocks(q, N.mean_pool(k, bs), nb, bs)  # block_counts >= blocks: every visible block
    assert_close("select all", want, N.selected_attention(q, k, v, idx, bs), 1e-5)


def test_moba_with_topk_at_least_the_chunks_is_dense_causal():
    q, k, v = make_qkv(1, 50, 4, 8, HKV=1, seed=9)
    assert_close("moba dense", attention_ref(q, k, v), N.moba(q, k, v, 8, 7), 1e-5)


# ------------------------------------------------------------------------------------------- bad input
def _inputs(T=40, HQ=4, H=2, bs=16):
    q, k, v = make_qkv(1, T, HQ, 16, HKV=H, seed=11)
    idx = N.select_blocks(q, N.mean_pool(k, bs), 3, bs)
    return q, k, v, idx


@pytest.mark.parametrize("op", [N.nsa, N.parallel_nsa])
def test_block_indices_are_checked_without_the_selection_branch(op, value_checks):
    """With g_slc=None the selection branch does not read block_indices, but nsa returns them: out-of-range, future
    or float indices are refused as when the branch runs. Value checks on, so that the index values are also checked
    on CUDA tensors."""
    q, k, v, idx = (x.to(DEV) for x in _inputs(T=64))
    g = torch.rand(1, 64, 4, device=DEV)
    kw = dict(block_counts=3, block_size=16, window_size=0, return_block_indices=True)
    name = op.__name__
    for bad, exc, match in (
            (torch.full_like(idx, 9), ValueError, rf"{name}: block_indices\[0, 0, 0, 0\] = 9 is out "
                                                  r"of range or in the future: query 0 sees blocks 0..0"),
            (_future(idx), ValueError, rf"{name}: block_indices\[0, 3, 0, 0\] = 1"),
            (idx.float(), TypeError, rf"{name}: block_indices must be int32 or int64, got torch.float32"),
            (idx[:, :, :1].expand(1, 64, 3, 3), ValueError, rf"{name}: block_indices must be \[B, T, H, S\]")):
        with torch.no_grad(), pytest.raises(exc, match=match):
            op(q, k, v, g, None, None, block_indices=bad.to(DEV), **kw)
    value_checks(False)  # the valid ones under the default setting (off on CUDA tensors)
    with torch.no_grad():
        o, got = op(q, k, v, g, None, None, block_indices=idx, **kw)  # valid ones pass through
    assert got is idx and o.shape == (1, 64, 4, 16)

def _future(idx):
    idx = idx.clone()
    idx[0, 3, 0, 0] = 1  # query 3 cannot see block 1 (tokens 16..31)
    return idx


def _twice(idx):
    idx = idx.clone()
    idx[0, 35, 0, 1] = idx[0, 35, 0, 0]  # query 35 (blocks 0..2 visible) names its first block twice
    return idx


# (what is wrong, how to break the arguments of selected_attention(q, k, v, idx, block_size), error, message)
SELECTION_BAD_INPUT = [
    ("a block twice in a row", lambda q, k, v, i, bs: (q, k, v, _twice(i), bs), ValueError, "twice"),
    ("index in the future", lambda q, k, v, i, bs: (q, k, v, _future(i), bs), ValueError, "in the future"),
    ("index past the end", lambda q, k, v, i, bs: (q, k, v, i.masked_fill(i == 2, 9), bs), ValueError,
     "out of range"),
    ("index below -1", lambda q, k, v, i, bs: (q, k, v, i.masked_fill(i == 0, -2), bs), ValueError, ">= -1"),
    ("float indices", lambda q, k, v, i, bs: (q, k, v, i.float(), bs), TypeError, "int32 or int64"),
    ("indices of another length", lambda q, k, v, i, bs: (q, k, v, i[:, :5], bs), ValueError, r"\[B, T, H, S\]"),
    ("block size not a power of two", lambda q, k, v, i, bs: (q, k, v, i, 12), ValueError, "power of two"),
    ("HQ not a multiple of H", lambda q, k, v, i, bs: (q[:, :, :3], k, v, i, bs), ValueError, "must divide"),
    ("k of another length", lambda q, k, v, i, bs: (q, k[:, :7], v[:, :7], i, bs), ValueError, "TK >= TQ"),
    ("v of other heads", lambda q, k, v, i, bs: (q, k, v[:, :, :1], i, bs), ValueError, "k's B, TK, H"),
    ("mixed dtypes", lambda q, k, v, i, bs: (q, k.double(), v, i, bs), TypeError, "one dtype"),
]


@pytest.mark.parametrize("op", ["select_blocks", "compressed_scores", "compressed_attention"])
def test_a_negative_offset_is_refused(op):
    """offset is the first query's position: -1 would put query 0 before the sequence: an error that says
    so."""
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 2, 1, 16)
    args = {"select_blocks": (q, k, 3, 16), "compressed_scores": (q, k, 16),
            "compressed_attention": (q, k, k, 16)}[op]
    with pytest.raises(ValueError, match=rf"{op}: offset \(the first query's position\) must be an int >= 0, "
                                         "got -1"):
        getattr(N, op)(*args, offset=-1)
    getattr(N, op)(*args, offset=16)


@pytest.mark.parametrize("args,message", [
    ((32, 0, 1, 16), "num_heads must be an int > 0, got 0"), ((32, 2, 1, 0), "head_dim must be an int > 0, got 0"),
    ((32, 2, 1, 16.0), "head_dim must be an int > 0, got 16.0"), ((-1, 2, 1, 16), "hidden_size must be an int > 0"),
    ((32, 2, 1, 15), "head_dim must be even"), ((32, 3, 2, 16), "num_kv_heads = 2 must divide")])
def test_the_layer_refuses_bad_sizes(args, message):
    with pytest.raises(ValueError, match=f"NativeSparseAttention: {message}"):
        N.NativeSparseAttention(*args, block_size=16, block_counts=3, window_size=4)


@pytest.mark.parametrize("call,message", [
    (lambda: N.nsa_cost(0), "nsa_cost: T must be a number >= 1"),
    (lambda: N.nsa_cost(-5, "decoding"), "nsa_cost: T must be a number >= 1"),
    (lambda: N.keys_read(-5), "keys_read: context must be a number >= 0"),
    (lambda: N.keys_read([64, -1]), "keys_read: context must be a number >= 0")])
def test_the_cost_model_refuses_negative_lengths(call, message):
    with pytest.raises(ValueError, match=message):  # not negative costs, not a ZeroDivisionError
        call()


@pytest.mark.parametrize("args,kw,message", [
    ((2, 64), {}, r"pairs must be <= the free blocks \(\(T − avoid\) // block − 1 = -1\)"),
    ((2, 128), {}, "pairs must be <= the free blocks .* = 3"), ((2, 1024), dict(n_keys=2), "pairs .* n_keys = 2"),
    ((0, 256), {}, "batch must be an int > 0"), ((2, 256), dict(avoid=-1), "avoid must be an int >= 0")])
def test_needle_batch_refuses_what_it_cannot_plant(args, kw, message):
    from minisparse.nsa.needle import needle_batch

    with pytest.raises(ValueError, match=f"needle_batch: {message}"):
        needle_batch(*args, **kw)


def selection_ops():
    return {"naive": N.selected_attention, "triton": N.parallel_selected_attention}


@pytest.mark.parametrize("backend", ["naive", "triton"])
@pytest.mark.parametrize("what,make,error,message", SELECTION_BAD_INPUT, ids=[r[0] for r in SELECTION_BAD_INPUT])
def test_selection_bad_input(backend, what, make, error, message, value_checks):
    q, k, v, idx = _inputs()
    if backend == "triton":  # on the Triton op's device, with index values checked (on CUDA only when asked)
        q, k, v, idx = (x.to(DEV) for x in (q, k, v, idx))
    with pytest.raises(error, match=message):
        selection_ops()[backend](*make(q, k, v, idx, 16))


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v: N.nsa(q, k, v, None, None, None, block_size=8, window_size=-1), "window_size"),
    (lambda q, k, v: N.nsa(q, k, v, None, None, None, block_size=8, block_counts=2),
     "^nsa: block_counts must be >= 3"),
    (lambda q, k, v: N.CompressKV(8, block_size=8)(k[0]), r"CompressKV: x must be 4-D"),
    (lambda q, k, v: N.CompressKV(8, block_size=8)(k), "CompressKV: x must have the module's head_dim = 8"),
    (lambda q, k, v: N.nsa(q, k, v, q[:, :, :2, 0], None, None, block_size=8), r"g_cmp must be \[B, T, HQ\]"),
    (lambda q, k, v: N.moba(q, k, v, 6, 2), "chunk_size must be a power of two"),
    (lambda q, k, v: N.moba(q, k, v, 8, 0), "topk"),
    (lambda q, k, v: N.parallel_moba(q.to(DEV), k.to(DEV), v.to(DEV), 6, 2), "chunk_size must be a power of two"),
    (lambda q, k, v: N.parallel_moba(q.to(DEV), k.to(DEV), v.to(DEV), 16, 0), "topk"),
    (lambda q, k, v: N.parallel_moba(q.to(DEV), k.to(DEV), v.to(DEV), 8, 2), "chunk_size must be >= 16"),
    (lambda q, k, v: N.parallel_moba(q.to(DEV), k.to(DEV), v.to(DEV)[:, :-1], 16, 2), "v must be"),
    (lambda q, k, v: N.compressed_attention(q, N.mean_pool(k, 8), N.mean_pool(v, 4), 8), "v_cmp"),
    (lambda q, k, v: N.compressed_attention(q, N.mean_pool(k, 8)[..., :4], N.mean_pool(v, 8), 8),
     r"k_cmp must be \[B, N, H, D\] with q's B and D"),
    (lambda q, k, v: N.compressed_attention(q, N.mean_pool(k, 8), N.mean_pool(v, 8), 8, stride=0), "stride"),
    (lambda q, k, v: N.compressed_attention(q, N.mean_pool(k, 8), N.mean_pool(v, 8), 8, stride=16),
     "stride must be <= block_size"),
    (lambda q, k, v: N.compressed_attention(q.long(), N.mean_pool(k, 8), N.mean_pool(v, 8), 8), "floating"),
    (lambda q, k, v: N.select_blocks(q[0], N.mean_pool(k, 8), 3, 8), "q must be 4-D"),
    (lambda q, k, v: N.select_blocks(q, N.mean_pool(k, 8)[:, :2], 3, 8), "one summary a block of the 40 keys, 5 \\("),
    (lambda q, k, v: N.mean_pool(k.long(), 8), "floating"),
    (lambda q, k, v: N.moba_select(q[0], k, 8, 2), "q must be 4-D"),
    (lambda q, k, v: N.nsa(q, k, v, q[..., 0].abs() + 2, None, None, block_size=8), "g_cmp must be >= 0 and <= 1"),
    (lambda q, k, v: N.nsa(q, k, v, None, None, None, block_size=8, k_cmp=N.mean_pool(k, 8)[:, :3],
                           v_cmp=N.mean_pool(v, 8)[:, :3]), "one summary a block of the 40 keys, 5 \\("),
    (lambda q, k, v: N.nsa(q, k, v, None, None, None, block_size=8, k_cmp=N.mean_pool(k, 8),
                           v_cmp=N.mean_pool(v, 8)[..., :4]), "v_cmp must be"),

    (lambda q, k, v: N.NativeSparseAttention(32, 4, 2, 16, block_size=16)(torch.randn(1, 32, 16)),
     r"x must be \[B, T, hidden\] with hidden = 32"),
    (lambda q, k, v: N.NativeSparseAttention(32, 4, 2, 16, block_size=16)(torch.randn(1, 32, 32), last=100),
     "last must be <= T"),
    (lambda q, k, v: N.NativeSparseAttention(32, 4, 2, 16, window_size=-1), "window_size"),
    (lambda q, k, v: N.NativeSparseAttention(32, 4, 2, 16, block_counts=2), "block_counts must be >= 3"),
    (lambda q, k, v: N.NativeSparseAttention(32, 4, 2, 16, block_size=12), "power of two"),
    (lambda q, k, v: N.NativeSparseAttention(32, 4, 2, 16, block_size=8, backend="triton"),
     r"NativeSparseAttention: backend='triton' needs block_size >= 16 .* got 8 and 16"),
])
def test_nsa_and_moba_bad_input(call, message):
    q, k, v, _ = _inputs()
    with pytest.raises((ValueError, TypeError), match=message):
        call(q, k, v)


@pytest.mark.parametrize("what", ["gate outside [0, 1]", "NaN gate", "summaries of another D", "too few summaries",
                                  "summaries of another batch", "a block twice", "gate with other strides",
                                  "D over the kernel's tile"])
def test_parallel_nsa_bad_input(what, value_checks):
    """The Triton ops reject what nsa rejects (values checked on CUDA when asked, always on CPU tensors), instead of
    reading out of bounds or counting a block twice."""
    q, k, v, idx = (x.to(DEV) for x in _inputs(T=64))
    g = torch.rand(1, 64, 4, device=DEV)
    kc, vc = N.mean_pool(k, 16), N.mean_pool(v, 16)
    kw = dict(block_counts=3, block_size=16, window_size=16)
    calls = {
        "gate outside [0, 1]": (lambda: N.parallel_nsa(q, k, v, g + 1, g, g, **kw), "g_cmp must be >= 0 and <= 1"),
        "NaN gate": (lambda: N.parallel_nsa(q, k, v, g, g * float("nan"), g, **kw), "g_slc contains NaN"),
        "summaries of another D": (lambda: N.parallel_select_blocks(q, kc[..., :8].contiguous(), 3, 16), "k_cmp"),
        "too few summaries": (lambda: N.parallel_nsa(q, k, v, g, g, g, **kw, k_cmp=kc[:, :2], v_cmp=vc[:, :2]),
                              "one summary a block of the 64 keys, 4 \\("),
        "summaries of another batch": (lambda: N.parallel_select_blocks(q, kc.expand(2, -1, -1, -1), 3, 16),
                                       "q's B and D"),
        "a block twice": (lambda: N.parallel_nsa(q[:, -1:], k, v, g[:, -1:], g[:, -1:], g[:, -1:], **kw,
                                                 block_indices=torch.tensor([[[[0, 0, 3]] * 2]], device=DEV)),
                          "twice"),
        "gate with other strides": (lambda: N.GatedSumFunction.apply(0, q, q, q, g.transpose(1, 2).contiguous()
                                                                     .transpose(1, 2), g, g), "g_cmp must be"),
        "D over the kernel's tile": (lambda: N.parallel_nsa(*(x.repeat(1, 1, 1, 17) for x in (q, k, v)), g, g, g,
                                                            **kw), "D must be <= 256"),
    }
    call, message = calls[what]
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=message):
        call()


# ------------------------------------------------------------------------------------------- Triton vs naive


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def _against_naive(fast, naive, q, k, v, dtype, what):
    """fast(q, k, v) vs naive(q, k, v) in fp32 from the same (rounded) inputs: forward and every gradient."""
    fwd_tol, grad_tol = TOLERANCES[dtype]
    q, k, v = (x.to(DEV, dtype).detach().requires_grad_() for x in (q, k, v))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o, ref = fast(q, k, v), naive(q32, k32, v32)
    assert_close(f"{what}: o", ref, o.float(), fwd_tol)
    do = torch.randn(o.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    for n, want, got in zip("qkv", _grads(ref, (q32, k32, v32), do), _grads(o, (q, k, v), do.to(dtype))):
        assert_close(f"{what}: d{n}", want, got.float(), grad_tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,HQ,H,D,bs,S", [
    (45, 2, 2, 16, 16, 3),  # group 1, T not a multiple of the block
    (37, 4, 2, 24, 16, 4),  # group 2, D not a power of two
    (40, 16, 1, 16, 16, 3),  # group 16
    (70, 6, 2, 16, 32, 3),  # group 3 (padded to 16 rows), blocks of 32
])
def test_selection_kernel_matches_naive(poisoned, dtype, T, HQ, H, D, bs, S):
    q, k, v = make_qkv(1, T, HQ, D, HKV=H, seed=12, device=DEV)
    idx = N.select_blocks(q, N.mean_pool(k, bs), S, bs)
    idx[:, 1::4, :, -1] = -1  # padding inside rows
    _against_naive(lambda q, k, v: N.parallel_selected_attention(q, k, v, idx, bs),
                   lambda q, k, v: N.selected_attention(q, k, v, idx, bs), q, k, v, dtype, f"G={HQ // H}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_kernels_walk_several_key_tiles_a_block(poisoned, dtype):
    """Key tiles of 16 in blocks of 64 (the rows' BN is the block on every GPU): the forward's and dQ's one loop over
    the S · 4 tiles finds each tile's block and offset, and masks the tiles wholly after the query in its own block
    (T = 100: the second block is partial) and every tile of an empty slot."""
    q, k, v = make_qkv(1, 100, 4, 16, HKV=2, seed=31, device=DEV)
    idx = N.select_blocks(q, N.mean_pool(k, 64), 3, 64)  # slot 2 always empty: two blocks
    idx[:, 70::3, :, 0] = -1  # more padding, inside rows
    tiles = dict(BN=16, num_warps=4, num_stages=1)
    with runtime.launch_config("nsa.selection.fwd", **tiles), runtime.launch_config("nsa.selection.dq", **tiles):
        _against_naive(lambda q, k, v: N.parallel_selected_attention(q, k, v, idx, 64),
                       lambda q, k, v: N.selected_attention(q, k, v, idx, 64), q, k, v, dtype, "BN 16 < block 64")


def test_selection_kernel_disagrees_with_a_wrong_selection():
    """The comparison can fail: the kernel given one block fewer is not the naive op on the full selection."""
    q, k, v = make_qkv(1, 40, 2, 16, HKV=1, seed=13, device=DEV)
    idx = N.select_blocks(q, N.mean_pool(k, 16), 3, 16)
    fewer = idx.clone()
    fewer[:, :, :, 0] = -1  # drop block 0
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close("o", N.selected_attention(q, k, v, idx, 16),
                     N.parallel_selected_attention(q, k, v, fewer, 16), 1e-4)


def assert_same_choice(q, k, idx, chunk, topk):
    """idx is MoBA's choice for q against k, as `moba_select` makes it, up to scores that tie in their last bits:
    same format (ascending, the own chunk in, -1 padding last), as many chunks a row, and the chosen past chunks'
    scores equal to those of moba_select's choice."""
    TQ, T, HQ, H = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    ref = N.moba_select(q, k, chunk, topk)
    assert idx.shape == ref.shape and idx.dtype == torch.int64, (idx.shape, idx.dtype)
    assert torch.equal((idx >= 0).sum(-1), (ref >= 0).sum(-1)), "chunks a row"
    own = ((torch.arange(TQ, device=q.device) + T - TQ) // chunk).view(1, TQ, 1, 1)
    assert (idx == own).any(-1).all(), "the own chunk missing"
    last = idx.masked_fill(idx < 0, 1 << 40)
    assert torch.equal(last, last.sort(-1).values), "not ascending with the padding last"
    k_bar = N.mean_pool(k, chunk).float().repeat_interleave(HQ // H, dim=2)
    s = torch.einsum("bthd,bchd->bthc", q.float(), k_bar)
    chosen = lambda i: s.gather(-1, i.clamp(min=0)).masked_fill((i < 0) | (i == own), 0).sort(-1).values  # noqa: E731
    assert_close("the chosen chunks' scores", chosen(ref), chosen(idx), 1e-5)


MOBA_CASES = [  # T, HQ, H, D, chunk, topk
    (50, 2, 1, 16, 16, 2),  # group 2, T not a multiple of the chunk
    (40, 4, 4, 16, 16, 2),
    (150, 2, 2, 24, 16, 4),  # D not a power of two; chunk 0 chosen by many queries (several tiles)
    (70, 2, 1, 16, 32, 5),  # topk over the chunks there are: padding
    (100, 2, 1, 16, 16, 1),  # topk 1: the own chunk only
]


@pytest.mark.parametrize("T,HQ,H,D,chunk,topk", MOBA_CASES)
def test_moba_gate_makes_moba_selects_choice(T, HQ, H, D, chunk, topk):
    q, k, _ = (x.to(DEV, DTYPES[0]) for x in make_qkv(1, T, HQ, D, HKV=H, seed=14))
    assert_same_choice(q, k, N.moba_gate(q, k, chunk, topk), chunk, topk)
    TQ = 7  # the last 7 queries against all T keys
    assert_same_choice(q[:, -TQ:], k, N.moba_gate(q[:, -TQ:].contiguous(), k, chunk, topk), chunk, topk)


def test_moba_choice_check_rejects_another_choice():
    q, k, _ = make_qkv(1, 150, 2, 16, HKV=1, seed=14)
    with pytest.raises(AssertionError, match="scores"):  # the lowest scores instead of the highest
        assert_same_choice(q, k, N.moba_select(-q, k, 16, 4), 16, 4)
    right = N.moba_select(q, k, 16, 4)
    own = (torch.arange(150) // 16).view(1, 150, 1, 1)
    with pytest.raises(AssertionError, match="own chunk"):  # the next chunk, in the future, for the own
        assert_same_choice(q, k, torch.where(right == own, right + 1, right), 16, 4)
    with pytest.raises(AssertionError, match="ascending"):
        assert_same_choice(q, k, right.flip(-1), 16, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,HQ,H,D,chunk,topk", MOBA_CASES)
def test_moba_kernels_match_naive(poisoned, dtype, T, HQ, H, D, chunk, topk):
    q, k, v = make_qkv(1, T, HQ, D, HKV=H, seed=14, device=DEV)
    idx = N.moba_gate(q.to(dtype), k.to(dtype), chunk, topk)  # the choice the kernels make from these inputs
    _against_naive(lambda q, k, v: N.parallel_moba(q, k, v, chunk, topk),
                   lambda q, k, v: N.selected_attention(q, k, v, idx, chunk), q, k, v, dtype, "MoBA")
    o, got = N.parallel_moba(q.to(dtype), k.to(dtype), v.to(dtype), chunk, topk, return_block_indices=True)
    assert torch.equal(got, idx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moba_and_the_top_n_with_two_sequences(poisoned, dtype):
    q, k, v = make_qkv(2, 70, 4, 16, HKV=2, seed=20, device=DEV)
    idx = N.moba_gate(q.to(dtype), k.to(dtype), 16, 3)
    assert_same_choice(q.to(dtype), k.to(dtype), idx, 16, 3)
    _against_naive(lambda q, k, v: N.parallel_moba(q, k, v, 16, 3),
                   lambda q, k, v: N.selected_attention(q, k, v, idx, 16), q, k, v, dtype, "MoBA, B 2")
    kc = N.mean_pool(k, 16)
    assert torch.equal(N.select_blocks(q, kc, 3, 16), N.parallel_select_blocks(q, kc, 3, 16))


def test_moba_kernels_with_the_last_queries_and_forced_tiles(poisoned):
    """q holding the last TQ tokens (a decoding step when TQ = 1), and the smallest tiles: a chunk of 64 walked in
    key tiles of 16, its queries in tiles of 16 rows, and query blocks that straddle two chunks."""
    T, chunk, topk = 300, 64, 3
    q, k, v = (x.to(DEV, DTYPES[0]) for x in make_qkv(1, T, 4, 16, HKV=2, seed=16))
    full = N.moba(q, k, v, chunk, topk)
    tiles = dict(num_warps=4, num_stages=1)
    with runtime.launch_config("moba.partial", BR=16, NT=2, BN=16, **tiles), \
            runtime.launch_config("moba.merge", BM=16, BN=16, **tiles), \
            runtime.launch_config("moba.gate", BM=16, BC=16, **tiles):
        for TQ in (T, 37, 1):
            o, idx = N.parallel_moba(q[:, -TQ:], k, v, chunk, topk, return_block_indices=True)
            assert_same_choice(q[:, -TQ:], k, idx, chunk, topk)
            assert_close(f"TQ={TQ}", N.selected_attention(q, k, v, N.moba_select(q, k, chunk, topk), chunk)[:, -TQ:],
                         o, TOLERANCES[q.dtype][0])
    assert_close("moba", full[:, -1:], o, TOLERANCES[q.dtype][0])


def test_decoding_step_reads_only_the_selected_blocks(poisoned):
    """TQ < T: the queries are the last positions; one token decodes against the whole cache."""
    T, bs = 75, 16
    q, k, v = make_qkv(1, T, 4, 16, HKV=2, seed=15, device=DEV)
    idx = N.select_blocks(q, N.mean_pool(k, bs), 3, bs)
    full = N.selected_attention(q, k, v, idx, bs)
    for TQ in (1, 3):
        o = N.parallel_selected_attention(q[:, -TQ:], k, v, idx[:, -TQ:], bs)
        assert_close(f"decode TQ={TQ}", full[:, -TQ:], o, 1e-4)


@pytest.mark.parametrize("T", [15, 16, 63, 64, 65, 70])
def test_parallel_nsa_decoding_steps_match_the_last_rows_of_nsa(T):
    """TQ = 1 or 3 queries at the end of the keys, summaries passed in as a cache would hold them: the last rows of
    the full nsa, including a query before the first complete block (T = 15) and queries on a block's last token."""
    HQ, H, bs = 4, 2, 16
    q, k, v = make_qkv(1, T, HQ, 16, HKV=H, seed=T, device=DEV)
    gc, gs, gw = (g.to(DEV) for g in gates(1, T, HQ))
    kw = dict(block_counts=3, block_size=bs, window_size=20)
    full = N.nsa(q, k, v, gc, gs, gw, **kw)
    k_cmp, v_cmp = N.mean_pool(k, bs), N.mean_pool(v, bs)
    for TQ in (1, 3):
        last = [x[:, -TQ:] for x in (q, gc, gs, gw)]
        o = N.parallel_nsa(last[0], k, v, *last[1:], k_cmp=k_cmp, v_cmp=v_cmp, **kw)
        assert_close(f"T={T} TQ={TQ}", full[:, -TQ:], o, 1e-4)


def test_parallel_nsa_matches_nsa():
    B, T, HQ, H, bs = 1, 70, 4, 2, 16
    q, k, v = make_qkv(B, T, HQ, 16, HKV=H, seed=16, device=DEV)
    gc, gs, gw = (g.to(DEV) for g in gates(B, T, HQ))
    kw = dict(block_counts=3, block_size=bs, window_size=20)
    assert_close("parallel_nsa", N.nsa(q, k, v, gc, gs, gw, **kw), N.parallel_nsa(q, k, v, gc, gs, gw, **kw), 1e-4)


FUSED_CASES = [  # B, T, TQ, HQ, H, D, DV, block, S, window, gates (cmp, slc, swa), indices given
    (1, 70, 70, 4, 2, 16, 16, 16, 3, 20, (1, 1, 1), False),
    (2, 90, 37, 6, 2, 24, 20, 16, 3, 33, (1, 1, 1), False),  # the last 37 queries, group 3, D 24 / DV 20
    (2, 90, 90, 6, 2, 24, 20, 16, 3, 33, (1, 1, 1), True),  # indices given: the compressed branch by SDPA
    (1, 70, 70, 4, 2, 16, 16, 16, 3, 20, (0, 1, 1), False),
    (1, 70, 70, 4, 2, 16, 16, 16, 3, 0, (1, 1, 1), False),  # window 0
    (1, 70, 60, 4, 2, 16, 16, 16, 3, 20, (1, 1, 0), False),
    (1, 70, 70, 4, 2, 16, 16, 16, 3, 20, (0, 1, 0), False),  # the selection alone
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,TQ,HQ,H,D,DV,bs,S,W,on,given", FUSED_CASES)
def test_forward_without_autograd_sums_the_branches_in_the_selection_kernel(poisoned, dtype, B, T, TQ, HQ, H, D,
                                                                             DV, bs, S, W, on, given):
    """parallel_nsa without autograd (the gated sum in the selection kernel's epilogue, no gated-sum pass) against
    the last TQ rows of nsa in fp32 and against the same call with autograd (the gated-sum kernel): branches off,
    a window of 0, queries before the first summary (whose compressed term is dropped), indices given."""
    q, k, _ = make_qkv(B, T, HQ, D, HKV=H, seed=T + TQ)
    v = torch.randn(B, T, H, DV, generator=torch.Generator().manual_seed(TQ))
    gs = [g if o else None for g, o in zip(gates(B, T, HQ, seed=TQ), on)]
    q, k, v, *gs = (None if x is None else x.to(DEV, dtype) for x in (q, k, v, *gs))
    kw = dict(block_counts=S, block_size=bs, window_size=W)
    full, idx = N.nsa(*(None if x is None else x.float() for x in (q, k, v, *gs)), **kw, return_block_indices=True)
    last = [None if x is None else x[:, -TQ:] for x in (q, *gs)]
    given_idx = idx[:, -TQ:] if given else None
    o = N.parallel_nsa(last[0], k, v, *last[1:], **kw, block_indices=given_idx)
    assert o.dtype == dtype and o.shape == (B, TQ, HQ, DV)
    assert_close(f"fused B{B} T{T} TQ{TQ}", full[:, -TQ:], o.float(), TOLERANCES[dtype][0])
    general = N.parallel_nsa(last[0].detach().requires_grad_(), k, v, *last[1:], **kw, block_indices=given_idx)
    assert_close(f"fused vs the gated-sum kernel, B{B} T{T}", general.float(), o.float(), TOLERANCES[dtype][0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("on,first", [((1, 1, 1), 5), ((1, 0, 1), 0), ((0, 1, 0), 3), ((1, 0, 0), -4)])
def test_gated_sum_matches_pytorch(poisoned, dtype, on, first):
    """The gated sum's forward and backward kernels against the PyTorch sum in fp32: branches off, the compressed
    branch a transposed view (as SDPA returns it) and zero for the queries before `first`, DV 20, two sequences."""
    B, TQ, HQ, DV = 2, 11, 3, 20
    g = torch.Generator().manual_seed(first + 10)
    branches = [torch.randn(B, HQ, TQ, DV, generator=g).transpose(1, 2) if i == 0 else torch.randn(B, TQ, HQ, DV,
                generator=g) for i in range(3)]
    gates_ = [torch.rand(B, TQ, HQ, generator=g) for _ in range(3)]
    branches = [x.to(DEV, dtype).requires_grad_() if o else None for x, o in zip(branches, on)]
    gates_ = [x.to(DEV, dtype).requires_grad_() if o else None for x, o in zip(gates_, on)]
    seen = (torch.arange(TQ, device=DEV) >= first).view(1, TQ, 1, 1)
    want = sum((gx.float()[..., None] * ox.float() * (seen if i == 0 else 1)
                for i, (ox, gx) in enumerate(zip(branches, gates_)) if ox is not None))
    o = N.GatedSumFunction.apply(first, *branches, *gates_)
    assert o.dtype == dtype and o.shape == (B, TQ, HQ, DV)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert_close("gated sum", want, o.float(), fwd_tol)
    leaves = [x for x in (*branches, *gates_) if x is not None]
    do = torch.randn(o.shape, generator=torch.Generator(device=DEV).manual_seed(2), device=DEV)
    wants = torch.autograd.grad(want, leaves, do)
    for i, (w, got) in enumerate(zip(wants, torch.autograd.grad(o, leaves, do.to(dtype)))):
        assert_close(f"gradient {i}", w, got.float(), grad_tol)


def test_parallel_nsa_takes_gates_in_another_float_dtype():
    """Gates in a wider dtype than q (fp32 gates with bf16 q, as a model's fp32 gate MLP gives them; fp64 with
    fp32 on a CPU): the same output as nsa and gate gradients in the gates' dtype."""
    dtype, gate_dtype = (torch.float32, torch.float64) if DEV.type == "cpu" else (torch.bfloat16, torch.float32)
    q, k, v = (x.to(dtype) for x in make_qkv(1, 70, 4, 16, HKV=2, seed=21, device=DEV))
    gs = [g.to(DEV, gate_dtype).requires_grad_() for g in gates(1, 70, 4, seed=21)]
    kw = dict(block_counts=3, block_size=16, window_size=20)
    o = N.parallel_nsa(q, k, v, *gs, **kw)
    ref = N.nsa(q, k, v, *gs, **kw)
    assert o.dtype == dtype
    assert_close("o", ref.float(), o.float(), TOLERANCES[dtype][0])
    dg = torch.autograd.grad(o.float().sum(), gs)
    assert all(d.dtype == gate_dtype for d in dg)
    for i, (w, got) in enumerate(zip(torch.autograd.grad(ref.float().sum(), gs), dg)):
        assert_close(f"d gate {i}", w, got, TOLERANCES[dtype][1])


DECODE_CASES = [  # B, T, HQ, H, D, DV, block, S, window, gates (cmp, slc, swa), indices given
    (1, 70, 4, 2, 16, 16, 16, 3, 20, (1, 1, 1), False),
    (2, 200, 6, 2, 24, 20, 16, 5, 33, (1, 1, 1), False),  # group 3, D 24, DV 20, two sequences
    (1, 15, 4, 2, 16, 16, 16, 3, 20, (1, 1, 1), False),  # before the first complete block: no summary
    (1, 129, 4, 2, 16, 16, 16, 3, 20, (1, 1, 1), False),  # the token is the first key of its block
    (1, 64, 16, 1, 16, 16, 16, 3, 100, (1, 1, 1), False),  # group 16, a window longer than the keys
    (2, 300, 4, 2, 16, 16, 32, 4, 0, (0, 1, 1), False),  # blocks of 32, window 0
    (1, 2100, 4, 2, 16, 16, 16, 5, 70, (1, 1, 1), False),  # summaries in two pieces (kernel 1's NC = 2)
    (2, 2100, 2, 1, 16, 16, 16, 4, 70, (1, 0, 0), False),  # the compressed branch alone
    (2, 130, 6, 2, 16, 16, 16, 3, 20, (1, 1, 1), True),  # block_indices given: no top-n
    (1, 300, 4, 2, 16, 16, 16, 3, 50, (0, 0, 1), True),  # the window alone
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,HQ,H,D,DV,bs,S,W,on,given", DECODE_CASES)
def test_decoding_kernels_match_nsa(poisoned, dtype, B, T, HQ, H, D, DV, bs, S, W, on, given):
    """parallel_nsa's three decoding kernels (one token, no autograd) against the last row of nsa in fp32, and
    against the general path (the same call with q requiring a gradient): output and chosen blocks."""
    q, k, _ = make_qkv(B, T, HQ, D, HKV=H, seed=T + HQ)
    v = torch.randn(B, T, H, DV, generator=torch.Generator().manual_seed(T))
    gs = [g if o else None for g, o in zip(gates(B, T, HQ, seed=T), on)]
    q, k, v, *gs = (None if x is None else x.to(DEV, dtype) for x in (q, k, v, *gs))
    kw = dict(block_counts=S, block_size=bs, window_size=W)
    kc, vc = N.mean_pool(k, bs), N.mean_pool(v, bs)  # as a cache holds them, in the inputs' dtype
    full, idx = N.nsa(*(None if x is None else x.float() for x in (q, k, v, *gs)), **kw, k_cmp=kc.float(),
                      v_cmp=vc.float(), return_block_indices=True)
    last = [None if x is None else x[:, -1:] for x in (q, *gs)]
    given_idx = idx[:, -1:] if given else None
    o, got = N.parallel_nsa(*last[:1], k, v, *last[1:], **kw, k_cmp=kc, v_cmp=vc, block_indices=given_idx,
                            return_block_indices=True)
    assert o.dtype == dtype and o.shape == (B, 1, HQ, DV)
    assert_close(f"decode B{B} T{T}", full[:, -1:], o.float(), TOLERANCES[dtype][0])
    assert torch.equal(got, idx[:, -1:])
    general = N.parallel_nsa(last[0].detach().requires_grad_(), k, v, *last[1:], **kw, k_cmp=kc, v_cmp=vc,
                             block_indices=given_idx)
    assert_close(f"decode vs the general path, B{B} T{T}", general.float(), o.float(), TOLERANCES[dtype][0])


@pytest.mark.parametrize("BP,tile", [(1, 16), (2, 32)])
def test_decoding_kernels_in_small_pieces(poisoned, BP, tile):
    """The merge loading BP partial slots at a time (fewer than a branch has: chunks folded one into the next) and
    the top-n reading the scores tile // 16 heads at a time (fewer than the group's 3): two sequences, NC = 2."""
    B, T, HQ, H, bs = 2, 2100, 6, 2, 16
    q, k, v = make_qkv(B, T, HQ, 16, HKV=H, seed=7, device=DEV)
    gs = [g.to(DEV) for g in gates(B, T, HQ, seed=7)]
    kw = dict(block_counts=5, block_size=bs, window_size=70)
    want, idx = N.nsa(q, k, v, *gs, **kw, return_block_indices=True)
    with runtime.launch_config("nsa.decode.merge", BP=BP, BGM=2, BVM=16, num_warps=4, num_stages=1), \
            runtime.launch_config("nsa.decode.select", BN=16, TOPN=tile, num_warps=4, num_stages=1), torch.no_grad():
        got, got_idx = N.parallel_nsa(q[:, -1:], k, v, *(g[:, -1:] for g in gs), **kw, return_block_indices=True)
    assert torch.equal(got_idx, idx[:, -1:])
    assert_close(f"BP {BP}, tile {tile}", want[:, -1:], got, 1e-4)


def test_decoding_kernel_2_starts_early_only_after_kernel_1():
    """Kernel 2 reads q, k and v before it waits: launched early (programmatic dependent launch) only where the
    step's kernel 1 ran before it (itself launched normally); a configuration without the option keeps none."""
    from minisparse.nsa.triton import _early_after

    early = dict(BN=64, num_warps=8, num_stages=2, launch_pdl=True)
    assert _early_after(True, early) == early
    assert _early_after(False, early) == {**early, "launch_pdl": False}
    assert _early_after(False, dict(BN=16)) == dict(BN=16)


def test_decoding_step_with_other_slot_counts_branches_and_summaries(poisoned):
    """Indices given with more slots than block_counts (padded with -1, int32); the window without the selection
    and no indices asked for; summaries of the complete blocks only (N = T // block): each against nsa's last row."""
    T, HQ, H, bs = 230, 4, 2, 16
    q, k, v = make_qkv(2, T, HQ, 16, HKV=H, seed=31, device=DEV)
    gc, gs, gw = (g.to(DEV) for g in gates(2, T, HQ, seed=31))
    kw = dict(block_counts=4, block_size=bs, window_size=40)
    idx = N.select_blocks(q, N.mean_pool(k, bs), 4, bs)
    wide = torch.cat([idx, torch.full_like(idx, -1)], -1).int()  # 8 slots, the last four empty
    short = (N.mean_pool(k, bs)[:, :T // bs], N.mean_pool(v, bs)[:, :T // bs])
    for name, gates_, extra in (("8 slots given", (gc, gs, gw), dict(block_indices=wide)),
                                ("window alone", (None, None, gw), {}),
                                ("compressed + window", (gc, None, gw), {}),
                                ("complete blocks only", (gc, gs, gw), dict(k_cmp=short[0], v_cmp=short[1]))):
        want = N.nsa(q, k, v, *gates_, **kw, **extra)[:, -1:]
        last = {**extra, **({"block_indices": wide[:, -1:]} if "block_indices" in extra else {})}
        with torch.no_grad():
            got = N.parallel_nsa(q[:, -1:], k, v, *(None if g is None else g[:, -1:] for g in gates_), **kw, **last)
        assert_close(name, want, got, 1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v, kc, vc: N.parallel_nsa(q, k, v, None, None, None, k_cmp=kc[:, :, :1], v_cmp=vc), "k_cmp"),
    (lambda q, k, v, kc, vc: N.parallel_nsa(q, k, v, None, None, None, k_cmp=kc, v_cmp=vc[..., :8]), "v_cmp"),
    (lambda q, k, v, kc, vc: N.parallel_nsa(q, k, v, None, None, None, block_size=8), "block_size must be >= 16"),
    (lambda q, k, v, kc, vc: N.parallel_nsa(q, k, v, None, None, None, block_counts=2), "block_counts"),
    (lambda q, k, v, kc, vc: N.parallel_nsa(q, k, v, None, None, None, block_size=16,
                                            block_indices=torch.full((1, 1, 2, 3), 9)), "in the future"),
])
def test_decoding_step_bad_input(call, message):
    q, k, v = make_qkv(1, 70, 4, 16, HKV=2, seed=3, device=DEV)
    with pytest.raises((ValueError, TypeError), match=message):
        call(q[:, -1:], k, v, N.mean_pool(k, 16), N.mean_pool(v, 16))


def test_parallel_nsa_errors_name_parallel_nsa():
    """The selection's checks, run for parallel_nsa, say parallel_nsa: a block of 8 with the selected branch on
    (the same call without g_slc runs), block indices of the wrong rank."""
    q, k, v = make_qkv(1, 40, 4, 16, HKV=2, seed=5, device=DEV)
    g = torch.rand(1, 40, 4, device=DEV)
    with pytest.raises(ValueError, match=r"^parallel_nsa: block_size must be >= 16 where the selected branch runs"):
        N.parallel_nsa(q, k, v, g, g, g, block_size=8, block_counts=3, window_size=8)
    N.parallel_nsa(q, k, v, g, None, g, block_size=8, block_counts=3, window_size=8)
    with pytest.raises(ValueError, match=r"^parallel_nsa: "):
        N.parallel_nsa(q, k, v, g, g, g, block_size=16, block_counts=3, window_size=8,
                       block_indices=torch.zeros(1, 40, 3, dtype=torch.long, device=DEV))


# ------------------------------------------------------------------------------------------- float64 (gradcheck)
def _fp64_problem(T=13, TQ=13, seed=41):
    """A tiny odd problem in float64 on the CPU: q [1, TQ, 2, 3] (the last TQ of T positions), k [1, T, 1, 3],
    v [1, T, 1, 4] (one GQA group of 2), gates [1, TQ, 2] in [0.2, 0.8], and the selection of blocks of 2 with 4
    slots (block 0, the own and the previous one, and one picked by score), fixed, so that gradcheck's steps
    cannot change it. Every tensor but the indices a leaf."""
    q, k, v = make_qkv(1, T, 2, 3, HKV=1, Dv=4, dtype=torch.float64, seed=seed)
    q = q[:, T - TQ:].contiguous()
    gen = torch.Generator().manual_seed(seed + 3)
    gs = [0.2 + 0.6 * torch.rand(1, TQ, 2, generator=gen, dtype=torch.float64) for _ in range(3)]
    idx = N.select_blocks(q, N.mean_pool(k, 2), 4, 2, offset=T - TQ)  # [1, TQ, 1, 4]
    assert (idx >= 0).sum(-1).max() == 4  # a free slot is used: the selection is not all forced blocks
    return [x.requires_grad_() for x in (q, k, v, *gs)], idx


@pytest.mark.parametrize("TQ", [13, 4])
def test_nsa_passes_gradcheck_in_float64(TQ):
    """nsa takes float64 and computes in it (finite differences in fp32 would fail gradcheck's 1e-5): gradients of
    q, k, v (through the mean-pooled summaries too) and the three gates, the selection held fixed; TQ = 4: the
    queries are the last 4 of 13 positions."""
    leaves, idx = _fp64_problem(TQ=TQ)

    def fn(q, k, v, g_cmp, g_slc, g_swa):
        return N.nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts=4, block_size=2, window_size=3, block_indices=idx)

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves)


def test_branches_and_moba_pass_gradcheck_in_float64():
    """selected_attention (one selection a group, then one a query head), compressed_attention over leaf
    summaries, and moba (its gate's choice of 3 of 7 chunks does not change under gradcheck's steps)."""
    (q, k, v, *_), idx = _fp64_problem()
    assert torch.autograd.gradcheck(lambda q, k, v: N.selected_attention(q, k, v, idx, 2), (q, k, v))
    per_head = idx.expand(-1, -1, 2, -1).contiguous()  # [1, T, HQ, 4]
    assert torch.autograd.gradcheck(lambda q, k, v: N.selected_attention(q, k, v, per_head, 2), (q, k, v))
    k_cmp, v_cmp = (N.mean_pool(x.detach(), 2).requires_grad_() for x in (k, v))  # [1, 7, 1, ·]
    assert torch.autograd.gradcheck(lambda q, kc, vc: N.compressed_attention(q, kc, vc, 2), (q, k_cmp, v_cmp))
    assert torch.autograd.gradcheck(lambda q, k, v: N.moba(q, k, v, 2, 3), (q, k, v))


def test_nsa_and_moba_in_float64_agree_with_float32():
    q, k, v = make_qkv(2, 70, 4, 16, HKV=2, seed=42)
    gs = gates(2, 70, 4, seed=43)
    kw = dict(block_counts=3, block_size=16, window_size=20, return_block_indices=True)
    o32, idx32 = N.nsa(q, k, v, *gs, **kw)
    o64, idx64 = N.nsa(*(x.double() for x in (q, k, v, *gs)), **kw)
    assert o64.dtype == torch.float64 and torch.equal(idx32, idx64)
    assert_close("nsa, fp64 vs fp32", o64, o32.double(), 1e-5)
    o32, idx32 = N.moba(q, k, v, 8, 3, return_block_indices=True)
    o64, idx64 = N.moba(q.double(), k.double(), v.double(), 8, 3, return_block_indices=True)
    assert o64.dtype == torch.float64 and torch.equal(idx32, idx64)
    assert_close("moba, fp64 vs fp32", o64, o32.double(), 1e-5)


def test_kernels_refuse_float64():
    """The kernels take fp32, fp16 and bf16 only: float64 is a TypeError that says where it runs."""
    q, k, v, idx = (x.to(DEV) for x in _inputs())
    q, k, v = q.double(), k.double(), v.double()
    gs = [g.to(DEV) for g in gates(1, 40, 4)]
    share = r"q, k, v must share one dtype among float32, float16, bfloat16, got q torch.float64"
    where = r".*the Triton kernels take no float64: use the naive"
    for call, words in (
            (lambda: N.parallel_nsa(q, k, v, *gs, block_counts=3, block_size=16, window_size=8), share),
            (lambda: N.parallel_selected_attention(q, k, v, idx, 16), share),
            (lambda: N.parallel_moba(q, k, v, 16, 2), share),
            (lambda: N.moba_gate(q, k, 16, 2), share),
            (lambda: N.parallel_select_blocks(q, N.mean_pool(k, 16), 3, 16),
             r"parallel_select_blocks: q must be one of float32, float16, bfloat16, got torch.float64")):
        with pytest.raises(TypeError, match=words + where):
            call()


@pytest.mark.parametrize("backend", ["auto", "naive"])
@pytest.mark.parametrize("kind", ["nsa", "moba"])
def test_layer_runs_in_float64(kind, backend):
    """NativeSparseAttention.double() runs on the CPU ("auto" takes the PyTorch path for fp64), with the fp32
    layer's outputs and selection."""
    torch.manual_seed(0)
    layer = N.NativeSparseAttention(32, 4, 2, 16, kind=kind, block_size=16, block_counts=3, window_size=20,
                                    moba_topk=2, backend=backend)
    x = torch.randn(2, 45, 32)
    with torch.no_grad():
        y32, idx32 = layer(x, return_block_indices=True)
        y64, idx64 = layer.double()(x.double(), return_block_indices=True)
    assert y64.dtype == torch.float64 and torch.equal(idx32, idx64)
    assert_close("y, fp64 vs fp32", y64, y32.double(), 1e-4)


# ------------------------------------------------------------------------------------------- layer, needle task
@pytest.mark.parametrize("kind", ["nsa", "moba"])
def test_layer_backends_agree_and_last_tokens_equal_the_full_outputs(kind):
    torch.manual_seed(0)
    layer = N.NativeSparseAttention(32, 4, 2, 16, kind=kind, block_size=16, block_counts=3, window_size=20,
                                    moba_topk=2, backend="naive").to(DEV)
    x = torch.randn(2, 45, 32, device=DEV)
    o, idx = layer(x, return_block_indices=True)
    assert o.shape == x.shape and idx.shape == (2, 45, 2 if kind == "nsa" else 4, 3 if kind == "nsa" else 2)
    assert_close("last 3", o[:, -3:], layer(x, last=3), 1e-5)
    layer.backend = "triton"
    assert_close("triton layer", o, layer(x), 1e-4)


def test_auto_layer_takes_the_naive_path_where_the_kernels_do_not_fit():
    """Blocks of 8 tokens are below the kernels' tile: "auto" runs `nsa` instead of raising the Triton op's error."""
    torch.manual_seed(0)
    layer = N.NativeSparseAttention(32, 4, 2, 16, block_size=8, block_counts=3, window_size=8).to(DEV)
    x = torch.randn(1, 40, 32, device=DEV)
    out = layer(x)
    layer.backend = "naive"
    assert torch.equal(out, layer(x))


def test_needle_batch_plants_distinct_needles_outside_the_window_and_block_zero():
    g = torch.Generator().manual_seed(0)
    keys, values, where, answer = N.needle_batch(64, 128, avoid=32, block=16, generator=g)
    rows = torch.arange(64)
    assert torch.equal(keys[rows, where], keys[:, -1]) and torch.equal(values[rows, where], answer)
    assert (where >= 16).all() and (where < 128 - 32).all()
    assert ((keys < 16).sum(1) == 4 + 1).all()  # four needles and the question


# ------------------------------------------------------------------------------------------- exercise checkers
from minisparse.nsa import exercises as X  # noqa: E402
from minisparse.testing import ExerciseError  # noqa: E402


def test_unshared_reads_checker_accepts_the_count_and_rejects_wrong_ones(capsys):
    def count(T, G, l, d, lp, n, w, cap=True, shared_rest=True):
        cmp = (T - l) // d + 1 if T >= l else 0
        slc, swa = min(T, n * lp), min(T, w)
        many = min(T, G * slc) if cap else G * slc
        return cmp + many + swa if shared_rest else G * (cmp + slc + swa)

    X.check_unshared_reads(count)
    assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(ExerciseError):  # every branch per query head
        X.check_unshared_reads(lambda *a: count(*a, shared_rest=False))
    with pytest.raises(ExerciseError):  # G·n blocks not capped at T
        X.check_unshared_reads(lambda *a: count(*a, cap=False))
    with pytest.raises(ExerciseError):  # the shared count (G ignored)
        X.check_unshared_reads(lambda T, G, *r: count(T, 1, *r))
    with pytest.raises(ExerciseError):  # the summaries' count not floored
        X.check_unshared_reads(lambda T, G, l, d, *r: count(T, G, l, d, *r) + ((T - l) % d) / d)
    with pytest.raises(ExerciseError):  # no summary yet counted as a negative number (T < l)
        X.check_unshared_reads(lambda T, G, l, d, *r: count(T, G, l, d, *r) + min(0, (T - l) // d + 1))


def test_filled_slots_checker_rejects_wrong_counts_and_accepts_the_rule(capsys):
    def filled(T, S, bs, extra=1):
        return (torch.arange(T) // bs + extra).clamp(max=S)

    X.check_filled_slots(filled)
    assert capsys.readouterr().out.startswith("✓")
    for wrong in (lambda T, S, bs: (torch.arange(T) + 1) // bs,  # complete blocks only
                  lambda T, S, bs: ((torch.arange(T) + 1) // bs).clamp(max=S),  # the own block not forced
                  lambda T, S, bs: filled(T, S, bs, extra=0),  # the own block never counted
                  lambda T, S, bs: torch.arange(T) // bs + 1,  # not capped at S
                  lambda T, S, bs: torch.full((T,), S),  # always full
                  lambda T, S, bs: (torch.arange(T) / bs + 1).clamp(max=S)):  # not whole blocks
        with pytest.raises(ExerciseError):
            X.check_filled_slots(wrong)


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _scores(q_ptr, k_ptr, s_ptr, idx, t, T, scale, G, D, BS: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr,
            CAUSAL: tl.constexpr, COLUMN_MASK: tl.constexpr, GATHER_MASK: tl.constexpr = True):
    """The exercise's tile, right with all flags; without CAUSAL keys after the query are kept, without
    COLUMN_MASK the padded head dims are read from the next key's row, without GATHER_MASK every key of the block
    is read (a padding block's and those past T too) and only the scores are masked."""
    q = X.load_group_queries(q_ptr, G, D, BG, BD)
    rows, j, cols = tl.arange(0, BG), tl.arange(0, BS), tl.arange(0, BD)
    pos = idx * BS + j
    real = (pos >= 0) & (pos < T)  # block −1: negative positions (no scalar & tensor mask: triton 3.9)
    if CAUSAL:
        real = real & (pos <= t)
    mask = real[:, None] & (cols[None, :] < D) if COLUMN_MASK else real[:, None]
    if not GATHER_MASK:
        mask = cols[None, :] < D
    k = tl.load(k_ptr + pos[:, None] * D + cols[None, :], mask=mask, other=0.0)
    s = tl.where(real[None, :], tl.dot(q, tl.trans(k), input_precision="ieee") * scale, float("-inf"))
    tl.store(s_ptr + rows[:, None] * BS + j[None, :], s, mask=rows[:, None] < G)


@triton.jit
def _scores_nan(q_ptr, k_ptr, s_ptr, idx, t, T, scale, G, D,
                BS: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr):
    rows, j = tl.arange(0, BG), tl.arange(0, BS)
    pos = idx * BS + j
    real = (pos >= 0) & (pos <= t) & (pos < T)
    s = tl.where(real[None, :], tl.zeros((BG, BS), tl.float32) * float("nan"), float("-inf"))
    tl.store(s_ptr + rows[:, None] * BS + j[None, :], s, mask=rows[:, None] < G)


def test_block_scores_checker_rejects_wrong_kernels_and_accepts_the_right_one():
    with pytest.raises(ExerciseError, match="position"):
        X.check_block_scores_kernel(with_constexprs(_scores, CAUSAL=False, COLUMN_MASK=True))
    # the padded head dims of the last key read past T: NaN on a GPU, an address outside k in the interpreter
    with pytest.raises(ExerciseError, match="is NaN" if not runtime.interpreting() else
                       r"block scores \(G=1, D=24, t=44, block 2\): a load reads 8 elements outside q, k, "
                       r"e\.g\. element 1080 of k, which has 1080"):
        X.check_block_scores_kernel(with_constexprs(_scores, CAUSAL=True, COLUMN_MASK=False))
    with pytest.raises(ExerciseError, match="NaN"):
        X.check_block_scores_kernel(_scores_nan)
    X.check_block_scores_kernel(with_constexprs(_scores, CAUSAL=True, COLUMN_MASK=True))


def test_block_scores_checker_sees_an_unmasked_gather_in_the_interpreter():
    """Keys read but their scores overwritten: the outputs are right, the reads are not (past T, and a padding
    block's before k). Only the interpreter sees the addresses; afterwards its loads are unchecked again."""
    if not runtime.interpreting():
        pytest.skip("the addresses a kernel loads are seen in Triton's interpreter only")
    from triton.runtime.interpreter import interpreter_builder

    with pytest.raises(ExerciseError, match=r"block 2\): a load reads 72 elements outside q, k, e\.g\. element 1080 "
                                            r"of k, which has 1080\nHint: mask the gather"):
        X.check_block_scores_kernel(with_constexprs(_scores, CAUSAL=True, COLUMN_MASK=True, GATHER_MASK=False))
    assert "create_masked_load" not in vars(interpreter_builder)


def test_parallel_nsa_gradients_match_nsa_including_learned_summaries():
    """The compressed branch by SDPA (a block-causal mask, blind queries zeroed) against the naive einsum,
    with every gradient: q, k, v, the gates and the summaries (as CompressKV would give them)."""
    B, T, HQ, H, bs = 1, 53, 4, 2, 16
    q, k, v = make_qkv(B, T, HQ, 16, HKV=H, seed=17, device=DEV)
    gs = [g.to(DEV) for g in gates(B, T, HQ, seed=3)]
    kc, vc = N.mean_pool(k, bs) + 0.1, N.mean_pool(v, bs) - 0.1
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gs, kc, vc)]
    twins = [x.clone().requires_grad_() for x in (q, k, v, *gs, kc, vc)]
    kw = dict(block_counts=3, block_size=bs, window_size=20)
    o = N.parallel_nsa(*leaves[:6], k_cmp=leaves[6], v_cmp=leaves[7], **kw)
    ref = N.nsa(*twins[:6], k_cmp=twins[6], v_cmp=twins[7], **kw)
    assert_close("o", ref, o, 1e-4)
    do = torch.randn_like(o)
    for name, a, b in zip(["q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp"],
                          torch.autograd.grad(ref, twins, do), torch.autograd.grad(o, leaves, do)):
        assert_close(f"d{name}", a, b, 1e-4)


@pytest.mark.parametrize("T,HQ,H,S,TQ", [(75, 4, 2, 3, 75), (130, 16, 1, 5, 130), (50, 2, 2, 4, 50),
                                         (200, 6, 2, 16, 200), (150, 4, 2, 4, 1)])
def test_fused_top_n_selects_what_select_blocks_selects(poisoned, T, HQ, H, S, TQ):
    q, k, _ = make_qkv(1, T, HQ, 16, HKV=H, seed=18, device=DEV)
    kc = N.mean_pool(k, 16)
    want = N.select_blocks(q[:, T - TQ:], kc, S, 16, offset=T - TQ)
    assert torch.equal(want, N.parallel_select_blocks(q[:, T - TQ:], kc, S, 16, offset=T - TQ))


def test_the_selection_refuses_more_summaries_than_blocks():
    """Summaries with a stride below the block (CompressKV(stride=8) on blocks of 16) are not one a block: the
    top-n would take summary c for block c."""
    q, k, _ = make_qkv(1, 40, 4, 16, HKV=2, seed=3, device=DEV)
    too_many = N.mean_pool(k, 8)  # 5 summaries for 3 blocks of 16
    for op in (N.select_blocks, N.parallel_select_blocks):
        with pytest.raises(ValueError, match=r"one summary a block of the 40 keys, 2 to 3 .* got N = 5"):
            op(q, too_many, 4, 16)


@pytest.mark.parametrize("T", [40, 72, 150])
def test_the_own_block_is_selected_without_its_summary(poisoned, T):
    """Summaries of the complete blocks only (N = T // block, as a decoding cache holds them) select what the
    summaries of every block select: a partial block's summary is never seen, and a query's own block is forced
    whether or not it has one (T = 40, blocks of 16: query 39 reads its block 2). Naive, fused top-n, decoding."""
    q, k, v = make_qkv(1, T, 4, 16, HKV=2, seed=T, device=DEV)
    kc, vc = N.mean_pool(k, 16), N.mean_pool(v, 16)
    short = kc[:, :T // 16], vc[:, :T // 16]
    want = N.select_blocks(q, kc, 4, 16)
    assert (want[:, -1] == (T - 1) // 16).any(-1).all()  # the last query's own block
    assert torch.equal(want, N.select_blocks(q, short[0], 4, 16))
    assert torch.equal(want, N.parallel_select_blocks(q, short[0], 4, 16))
    gc, gs, gw = (g.to(DEV) for g in gates(1, T, 4, seed=T))
    kw = dict(block_counts=4, block_size=16, window_size=0)
    full = N.nsa(q, k, v, gc, gs, gw, **kw)
    assert_close("nsa", full, N.nsa(q, k, v, gc, gs, gw, k_cmp=short[0], v_cmp=short[1], **kw), 1e-6)
    with torch.no_grad():
        got = N.parallel_nsa(q[:, -1:], k, v, gc[:, -1:], gs[:, -1:], gw[:, -1:], k_cmp=short[0], v_cmp=short[1],
                             **kw)
    assert_close("decoding step", full[:, -1:], got, 1e-4)


@pytest.mark.parametrize("BT,BC", [(1, 16), (2, 32), (8, 16)])
def test_fused_top_n_with_forced_tiles(poisoned, BT, BC):
    """Programs of 1, 2 and 8 tokens (16 rows at least: G = 16 needs none added, G = 4 at BT 1 gets 4), summaries in
    tiles of 16 and 32, tokens of one program on both sides of a block's end."""
    for HQ, H in ((16, 1), (8, 2)):
        q, k, _ = make_qkv(1, 150, HQ, 16, HKV=H, seed=19, device=DEV)
        kc = N.mean_pool(k, 16)
        with runtime.launch_config("nsa.select", BT=BT, BC=BC, num_warps=4, num_stages=1):
            got = N.parallel_select_blocks(q, kc, 5, 16)
        assert torch.equal(N.select_blocks(q, kc, 5, 16), got), (HQ, H, BT, BC)


@pytest.mark.parametrize("BT,BC", [(1, 16), (2, 32), (4, 16)])
def test_top_n_pass_gives_the_compressed_branch(poisoned, BT, BC):
    """Without autograd parallel_nsa takes the compressed branch's output from the top-n's second pass: against
    compressed_attention (queries before the first complete block: 0), summaries over several tiles, DV ≠ D."""
    from minisparse.nsa.triton import _select_blocks

    for HQ, H in ((16, 1), (8, 2)):
        q, k, _ = make_qkv(1, 300, HQ, 16, HKV=H, seed=23, device=DEV)
        v = torch.randn(1, 300, H, 24, generator=torch.Generator().manual_seed(3)).to(DEV)
        kc, vc = N.mean_pool(k, 16), N.mean_pool(v, 16)
        with runtime.launch_config("nsa.select", BT=BT, BC=BC, num_warps=4, num_stages=1):
            idx, o_cmp = _select_blocks(q, kc, vc, 5, 16, None, 0)
        assert torch.equal(N.select_blocks(q, kc, 5, 16), idx)
        assert_close(f"o_cmp HQ={HQ} BT={BT}", N.compressed_attention(q, kc, vc, 16), o_cmp, 1e-4)


from minisparse.nsa.triton import _top_n_keys, _top_n_rounds  # noqa: E402


@triton.jit
def _row_top_n(s_ptr, picks_ptr, own, n_seen, S: tl.constexpr, BNA: tl.constexpr, SP: tl.constexpr,
               KEYS: tl.constexpr):
    """The decoding step's top-n of one row of block scores, as `_group_top_n` takes it: by one `tl.topk` of keys
    (KEYS) or by rounds of max."""
    o_a, o_s = tl.arange(0, BNA), tl.arange(0, SP)
    score, seen = tl.load(s_ptr + o_a), o_a < n_seen
    forced = (o_a == 0) | (o_a == own) | (o_a == own - 1)
    if KEYS:
        picks = _top_n_keys(score, seen, forced, o_a, o_s, S, BNA, SP)
    else:
        picks = _top_n_rounds(score, seen, forced, own, o_a, o_s, S)
    tl.store(picks_ptr + o_s, picks)


def _top_n_rule(score, own, n_seen, S, SP):
    """The picks in the order taken: 0, own − 1, own (a query in block 0 or 1 has fewer: −1), then the other blocks
    with a summary by score, ties to the lower block; −1 in the slots left."""
    forced = [0, own - 1, own] if own >= 2 else [0, own, -1] if own == 1 else [0, -1, -1]
    rest = sorted((c for c in range(n_seen) if c not in forced), key=lambda c: (-float(score[c]), c))
    picks = forced + rest[:S - 3]
    return picks + [-1] * (SP - len(picks))


def _rows(BNA):
    """Rows of block scores (≥ 0, as summed probabilities are) full of ties: few distinct values, exact zeros (a
    probability that underflows) under a few positive ones, all equal, all distinct."""
    g = torch.Generator().manual_seed(BNA)
    few = torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (BNA,), generator=g)]
    zeros = torch.zeros(BNA)
    zeros[torch.randperm(BNA, generator=g)[:5]] = torch.rand(5, generator=g) + 0.1
    return {"few values": few, "zeros and five": zeros, "all equal": torch.full((BNA,), 0.375),
            "distinct": torch.rand(BNA, generator=g)}


@pytest.mark.skipif(not hasattr(tl, "topk"), reason="this triton has no tl.topk")
@pytest.mark.parametrize("BNA,S", [(32, 16), (64, 16), (64, 5), (256, 9), (256, 3), (1024, 16)])
def test_top_n_by_keys_takes_what_the_rounds_take(BNA, S):
    """The decoding step's top-n by one `tl.topk` of (score bits, reversed block) keys, which `_group_top_n` takes
    where S ≤ 16 and 32 ≤ BNA ≤ 1,024, against the rounds of max and the rule, exactly and in the order taken: rows
    full of ties (to the lower block), an unseen tail holding high scores (never picked; the own block forced
    without a summary), fewer seen blocks than slots (−1), queries in blocks 0 and 1 (a forced block fewer), S below
    SP. Every seen block is at most the own block + 1, as in a decoding step."""
    SP = triton.next_power_of_2(S)
    for name, row in _rows(BNA).items():
        for own, n_seen in ((BNA - 1, BNA - 1), (BNA // 2 + 1, BNA // 2 + 1), (BNA // 2 + 1, BNA // 2 + 2),
                            (5, 6), (1, 2), (0, 1), (0, 0)):
            s = row.clone()
            s[n_seen:] = 9.0  # blocks without a summary: their scores never count
            want = _top_n_rule(s, own, n_seen, S, SP)
            for keys in (True, False):
                picks = torch.full((SP,), -2, dtype=torch.int64)  # a slot left unwritten fails
                _row_top_n[(1,)](s.to(DEV), picks := picks.to(DEV), own, n_seen, S, BNA, SP, keys)
                assert picks.tolist() == want, (name, own, n_seen, "keys" if keys else "rounds")


@pytest.mark.parametrize("summaries", ["all equal", "few above the rest"])
def test_decoding_top_n_by_keys_breaks_ties_to_the_lower_block(poisoned, summaries):
    """The decoding step where its top-n is one `tl.topk` (63 blocks: BNA = 64, S = 16), on summaries that tie
    blocks: all equal (every probability 1/62), or five far above the rest (whose probabilities underflow to exactly
    0); the own block and the last without a summary. The blocks of the rule, ties to the lower block, as the rounds
    of max take them (torch.topk, which select_blocks uses, breaks ties in no set order)."""
    T, HQ, H, D, bs, S = 1000, 4, 1, 16, 16, 16
    q, k, v = make_qkv(1, T, HQ, D, HKV=H, seed=41, device=DEV)
    q[:, -1] = 1.0  # the decoded token's heads agree: a summary far along (1, …, 1) is far above for each of them
    kc, vc = torch.zeros_like(N.mean_pool(k, bs)[:, :T // bs]), N.mean_pool(v, bs)[:, :T // bs]
    if summaries != "all equal":
        for r, c in enumerate((44, 5, 58, 17, 30)):
            kc[:, c] = 60.0 - r  # scores 240 − 4r: the other blocks' probabilities are 2^-300 and below, 0
    gs = gates(1, 1, HQ, seed=41)[1].to(DEV)
    with torch.no_grad():
        _, got = N.parallel_nsa(q[:, -1:], k, v, None, gs, None, k_cmp=kc, v_cmp=vc, block_counts=S, block_size=bs,
                                window_size=0, return_block_indices=True)
    p = N.compressed_scores(q[:, -1:], kc, bs, offset=T - 1)  # [1, 1, HQ, N]
    rule = _top_n_rule(p.sum(2)[0, 0].cpu(), (T - 1) // bs, T // bs, S, S)
    want = sorted(c for c in rule if c >= 0) + [-1] * rule.count(-1)
    assert got[0, 0, 0].tolist() == want
    if summaries != "all equal":
        assert want == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 30, 44, 58, 61, 62]
