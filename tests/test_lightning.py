"""minisparse.lightning (chapter 4): the recurrence vs fla's naive simple-GLA, the block form vs the recurrence, the
Triton kernels vs the recurrence (forward, final state, gradients of q, k, v and initial_state), MiniMax's slopes and
layer vs transformers, decoding vs prefill, bad input, the exercise checkers.

On a CPU the kernels run in Triton's interpreter in fp32 on odd shapes (T = 1, 37, 100; K = 32, V = 48; slopes from
1e-4 to 8) with NaN-poisoned output buffers; on a GPU the same tests run on CUDA, plus bf16 versions against an fp32
reference from the same rounded inputs (fwd ≤ 5e-3, grads ≤ 8e-3 relative RMS).
"""
import contextlib
import math
import warnings

import numpy as np
import pytest
import torch

from minisparse import _checks, runtime
from minisparse.lightning import (LightningAttention, chunk_lightning_attn, decay_matrix,
                                  fused_recurrent_lightning_attn, generation_cost, lightning_flops, minimax_slopes,
                                  naive_chunk_lightning_attn, naive_recurrent_lightning_attn)
from minisparse.lightning.bugs import chunk_form_with_a_bug
from minisparse.lightning.exercises import (check_balanced_chunk, check_chunk_form_fix, check_output_tile_kernel,
                                            check_state_norm_prediction, load_chunk)
from minisparse.lightning.cost import DEEPSEEK_R1, MINIMAX_M1
from minisparse.lightning.naive import _naive_chunk
from minisparse.lightning.triton import _chunk
from minisparse.testing import ExerciseError, assert_close, assert_float64_matches_float32, gradcheck_float64

import triton  # noqa: E402  (after minisparse, which picks the interpreter on a CPU)
import triton.language as tl  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are tested on a GPU (the interpreter's "
                                                                "bf16 tl.dot is wrong)")
SLOPES3 = [1e-4, 0.3, 8.0]  # no decay to speak of, a middle head, e^-8 a step


def _inputs(B, T, H, K, V, *, seed=0, dtype=torch.float32, device=DEV, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g) / 3
    k = torch.randn(B, T, H, K, generator=g) / 3
    v = torch.randn(B, T, H, V, generator=g)
    h0 = 0.3 * torch.randn(B, H, K, V, generator=g) if state else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(h0)


def _slopes(H, device=DEV):
    return torch.tensor([SLOPES3[h % 3] for h in range(H)], device=device)


# ------------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("state", [False, True])
def test_naive_recurrent_matches_fla(state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla_naive = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v, h0 = _inputs(2, 45, 3, 32, 48, state=state, device="cpu")
    slope = _slopes(3, "cpu")
    g = (-slope).expand(2, 45, 3)  # [B, T, H] the log gate, the same every step
    o_ref, s_ref = fla_naive.naive_recurrent_simple_gla(q, k, v, g, scale=0.3, initial_state=h0,
                                                        output_final_state=True)
    o, s = naive_recurrent_lightning_attn(q, k, v, slope, scale=0.3, initial_state=h0, output_final_state=True)
    assert_close("o vs fla", o_ref, o, 1e-5)
    assert_close("final state vs fla", s_ref, s, 1e-5)
    assert naive_recurrent_lightning_attn(q, k, v, slope, initial_state=h0)[1] is None


@pytest.mark.parametrize("T,C", [(1, 64), (37, 16), (64, 64), (100, 64), (100, 256)])
def test_naive_chunk_matches_recurrent(T, C):
    q, k, v, h0 = _inputs(2, T, 3, 32, 48, device="cpu")
    slope = _slopes(3, "cpu")
    o_r, s_r = naive_recurrent_lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True)
    o_c, s_c = naive_chunk_lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True, chunk_size=C)
    assert_close("o", o_r, o_c, 1e-5)
    assert_close("final state", s_r, s_c, 1e-5)


def test_decay_matrix():
    D = decay_matrix(0.5, 4)
    assert torch.allclose(D, torch.tensor([[1, 0, 0, 0], [math.exp(-0.5), 1, 0, 0],
                                           [math.exp(-1), math.exp(-0.5), 1, 0],
                                           [math.exp(-1.5), math.exp(-1), math.exp(-0.5), 1]]))
    assert torch.isfinite(decay_matrix(50.0, 64)).all()


# ------------------------------------------------------------------------------------------ MiniMax's slopes
def _hf_lightning(heads, layers, idx, head_dim=8, hidden=None, block_size=16):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = MiniMaxConfig(hidden_size=hidden or heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                        num_hidden_layers=layers, block_size=block_size)
    return MiniMaxLightningAttention(cfg, idx)


@pytest.mark.parametrize("heads,layers,idx", [(8, 6, 0), (8, 6, 2), (8, 6, 5), (64, 80, 0), (64, 80, 79), (6, 1, 0),
                                              (7, 3, 1)])
def test_minimax_slopes_match_transformers(heads, layers, idx):
    hf = _hf_lightning(heads, layers, idx)
    ours = minimax_slopes(heads, idx, layers)
    assert ours.shape == (heads,) and ours.dtype == torch.float32
    assert torch.equal(hf.slope_rate.view(-1), ours)
    assert (ours > 0).all()


@pytest.mark.parametrize("args", [(0, 0, 4), (8, 4, 4), (8, -1, 4), (8, 0, 0), (2.0, 0, 4), (True, 0, 2),
                                  (8, 1.0, 4), (8, True, 4), (8, np.int64(4), 4)])
def test_minimax_slopes_bad_args(args):
    with pytest.raises(ValueError, match="minimax_slopes"):
        minimax_slopes(*args)


def test_layer_index_and_sizes_take_any_integer_type():
    """NumPy and torch integers (a config read from an array) are ints for layer_idx as for the sizes."""
    for idx in (np.int64(3), np.int32(3)):
        assert torch.equal(minimax_slopes(np.int64(8), idx, np.int64(6)), minimax_slopes(8, 3, 6))
    layer = LightningAttention(32, num_heads=np.int64(2), head_dim=16, layer_idx=np.int64(1), num_layers=3,
                               block_size=16)
    assert torch.equal(layer.slope_rate, minimax_slopes(2, 1, 3))


# --------------------------------------------------------------------------------------------- the kernels
def _check_kernel(B, T, H, K, V, *, state, final, dtype=torch.float32, seed=0, slope=None, tol=None,
                  reference_slope=None):
    q, k, v, h0 = _inputs(B, T, H, K, V, seed=seed, dtype=dtype, state=state)
    slope = _slopes(H) if slope is None else slope
    reference_slope = slope if reference_slope is None else reference_slope
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0) if x is not None]
    h0_leaf = leaves[3] if state else None
    o, s = chunk_lightning_attn(leaves[0], leaves[1], leaves[2], slope, initial_state=h0_leaf,
                                output_final_state=final)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert (s is not None) == final
    g = torch.Generator().manual_seed(seed + 100)
    do = torch.randn(o.shape, generator=g).to(o)
    ds = torch.randn(B, H, K, V, generator=g).to(DEV) if final else None
    torch.autograd.backward([o] + ([s] if final else []), [do] + ([ds] if final else []))
    # the fp32 reference from the same (rounded) inputs
    refs = [x.detach().float().requires_grad_() for x in (q, k, v, h0) if x is not None]
    o_r, s_r = naive_recurrent_lightning_attn(refs[0], refs[1], refs[2], reference_slope,
                                              initial_state=refs[3] if state else None, output_final_state=final)
    torch.autograd.backward([o_r] + ([s_r] if final else []), [do.float()] + ([ds] if final else []))
    ftol, gtol = tol or ((1e-4, 1e-4) if dtype == torch.float32 else (5e-3, 8e-3))
    assert_close("o", o_r, o, ftol)
    if final:
        assert_close("final_state", s_r, s, ftol)
    for name, a, r in zip(["dq", "dk", "dv", "dinitial_state"], leaves, refs):
        assert a.grad.dtype == a.dtype
        assert_close(name, r.grad, a.grad, gtol)


@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("state,final", [(False, False), (True, True)])
def test_kernel_matches_recurrence(poisoned, T, state, final):
    _check_kernel(2, T, 3, 32, 48, state=state, final=final)


def test_kernel_state_without_final(poisoned):
    _check_kernel(1, 70, 3, 48, 32, state=True, final=False, seed=3)
    _check_kernel(1, 70, 3, 16, 16, state=False, final=True, seed=4)


def test_kernel_small_tiles(poisoned):
    """Several state tiles a head (3 × 3 of 16 × 16), three K-blocks and V-tiles in the output kernel, several V-tiles
    in the gradient kernel, three chunks, forced through runtime.launch_config."""
    with contextlib.ExitStack() as forced:
        for kernel in ("lightning.fwd_states", "lightning.bwd_dstates", "lightning.fwd_output"):
            forced.enter_context(runtime.launch_config(kernel, BK=16, BV=16))
        forced.enter_context(runtime.launch_config("lightning.bwd_dqkv", BV=16))
        _check_kernel(1, 150, 3, 40, 48, state=True, final=True, seed=5)


def test_kernel_comparison_catches_a_wrong_decay():
    """The known-wrong variant: a kernel run with rates 1 % off must fail the comparison the tests above pass."""
    with pytest.raises(AssertionError):
        _check_kernel(1, 70, 3, 32, 48, state=True, final=True, seed=11, slope=_slopes(3) * 1.01,
                      reference_slope=_slopes(3))


@pytest.mark.parametrize("op", [chunk_lightning_attn, fused_recurrent_lightning_attn, naive_chunk_lightning_attn,
                                naive_recurrent_lightning_attn], ids=lambda f: f.__name__)
def test_empty_sequence(op):
    """T = 0: an empty output, and the final state is the initial one."""
    q, k, v, h0 = _inputs(2, 0, 3, 16, 24)
    with torch.no_grad():
        o, s = op(q, k, v, _slopes(3), initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 3, 24) and torch.equal(s, h0.float())


@pytest.mark.parametrize("slope", [1e-4, 8.0, 30.0])
def test_kernel_extreme_slopes_stay_finite(poisoned, slope):
    _check_kernel(1, 130, 2, 16, 24, state=True, final=True, seed=6,
                  slope=torch.full((2,), slope, device=DEV))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("state", [False, True])
def test_fused_recurrent_matches_recurrence(poisoned, T, state):
    q, k, v, h0 = _inputs(2, T, 3, 32, 48, state=state, seed=7)
    slope = _slopes(3)
    with torch.no_grad():
        o, s = fused_recurrent_lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True)
    o_r, s_r = naive_recurrent_lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True)
    assert_close("o", o_r, o, 1e-4)
    assert_close("final_state", s_r, s, 1e-4)


def test_fused_recurrent_refuses_gradients():
    q, k, v, h0 = _inputs(1, 1, 2, 16, 16)
    with pytest.raises(RuntimeError, match="forward only"):
        fused_recurrent_lightning_attn(q.requires_grad_(), k, v, _slopes(2))


def test_kernels_refuse_a_slope_that_wants_a_gradient():
    """The kernels give the slope no gradient: a trainable slope is refused, not silently left untrained; the naive
    op trains it."""
    q, k, v, _ = _inputs(1, 5, 2, 16, 16)
    slope = _slopes(2).requires_grad_()
    for op in (chunk_lightning_attn, fused_recurrent_lightning_attn):
        with pytest.raises(RuntimeError, match=r"fixed rate .* pass slope\.detach\(\)"):
            op(q, k, v, slope)
    chunk_lightning_attn(q, k, v, slope.detach())
    with torch.no_grad():
        chunk_lightning_attn(q, k, v, slope)
    naive_chunk_lightning_attn(q, k, v, slope)[0].sum().backward()
    assert slope.grad is not None and slope.grad.abs().sum() > 0


def test_kernel_offsets_stay_64_bit_past_two_to_the_31_elements(last_programs):
    """At MiniMax-M1's 64 heads of 128 channels, token t's rows start t · 8192 elements in, past 2^31 from token
    262,144 on: an offset computed in int32 there wraps negative. Every Lightning kernel runs its last program of a
    400,001-token launch with its loads and stores recorded (conftest's `last_programs`): none may fall outside the
    tensors."""
    from minisparse.lightning import triton as kernels

    B, T, H, K, V = 1, 400_001, 64, 128, 128

    def launch(tensor, kernel):
        q, k, v, do = (tensor(B, T, H, D) for D in (K, K, V, V))
        slope, h0, dht = tensor(H), tensor(B, H, K, V), tensor(B, H, K, V)
        _, _, states = kernels._forward(q, k, v, slope, 1.0, h0, True)
        kernels._backward(q, k, v, slope, 1.0, states, do, dht, True)
        kernel(kernels._fused_recurrent_kernel, (V // 32, B * H), q, k, v, slope, h0, tensor(B, T, H, V),
               tensor(B, H, K, V), 1.0, T, H, K, V, BK=K, BV=32, HAS_H0=True, STORE_HT=True)

    last_programs((kernels,), launch)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,V", [(300, 64, 128), (1000, 128, 128), (77, 48, 32)])
def test_kernel_half_precision(T, K, V, dtype):
    _check_kernel(2, T, 4, K, V, state=True, final=True, dtype=dtype, seed=8)


@CUDA
def test_every_configuration_of_the_lightning_rows_matches_the_recurrence():
    """Each configuration a GPU's lightning.* row may fall back to (or autotune to), forced in turn, passes the bf16
    comparison with the fp32 recurrence: a configuration that miscompiles must not sit in a row."""
    for row in ("lightning.fwd_states", "lightning.fwd_output", "lightning.bwd_dstates", "lightning.bwd_dqkv",
                "lightning.bwd_dqkv.k128"):
        K = 64 if row == "lightning.bwd_dqkv" else 128  # the row the launcher picks for this K
        for config in runtime.launch_configs(row, DEV, torch.bfloat16):
            with runtime.launch_config(row, **config):
                _check_kernel(1, 200, 2, K, 128, state=True, final=True, dtype=torch.bfloat16, seed=12)


@CUDA
def test_fused_recurrent_bf16():
    q, k, v, h0 = _inputs(2, 2, 4, 128, 128, dtype=torch.bfloat16, seed=9)
    with torch.no_grad():
        o, s = fused_recurrent_lightning_attn(q, k, v, _slopes(4), initial_state=h0, output_final_state=True)
    o_r, s_r = naive_recurrent_lightning_attn(q.float(), k.float(), v.float(), _slopes(4), initial_state=h0.float(),
                                              output_final_state=True)
    assert_close("o", o_r, o, 5e-3)
    assert_close("final_state", s_r, s, 5e-3)


# --------------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_layer_from_hf_and_decoding(backend):
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    torch.manual_seed(0)
    dev = DEV if backend == "triton" else "cpu"  # Triton kernels need CUDA tensors (or the interpreter on CPU)
    tol = 1e-5 if dev == "cpu" else 2e-3  # on a GPU, fp32 dots in Triton and cuBLAS may use TF32
    hf = _hf_lightning(4, 4, 2, head_dim=16, hidden=48, block_size=32).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.15)
    hf = hf.to(dev)
    ours = LightningAttention.from_hf(hf, backend=backend).eval()
    assert ours.block_size == 32 and torch.equal(ours.slope_rate, hf.slope_rate.view(-1))
    x = torch.randn(2, 45, 48, generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        y_hf, s_hf = hf(x, None, None)
        y, s = ours(x, use_cache=True)
        assert_close("layer vs transformers", y_hf, y, tol)
        assert_close("state vs transformers", s_hf, s, tol)
        cache = MiniMaxCache()
        hf(x[:, :30], None, None, cache)  # positional: transformers renamed past_key_values to cache
        y_p, st = ours(x[:, :30], use_cache=True)
        outs = [y_p]
        for t in range(30, 45):
            y_t, st = ours(x[:, t:t + 1], state=st)
            outs.append(y_t)
            hf(x[:, t:t + 1], None, None, cache)
        assert_close("decode vs prefill", y_hf, torch.cat(outs, 1), tol)
        assert_close("decoded state vs transformers' cache", cache.get_linear_cache(2), st, tol)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_layer_in_fp16_stays_in_range(backend):
    """fp16 holds at most 65504 and the attention's output has no softmax denominator: inputs 10 and 30 times unit
    size overflowed it to NaN. The layer scales q and v by a power of two in fp16: finite, and fp32's result."""
    torch.manual_seed(0)
    dev = DEV if backend == "triton" else "cpu"
    layer = LightningAttention(128, 2, 64, layer_idx=0, num_layers=8, block_size=64, backend=backend).to(dev)
    half = LightningAttention(128, 2, 64, layer_idx=0, num_layers=8, block_size=64, backend=backend).to(dev)
    half.load_state_dict(layer.state_dict())
    half.half()
    for scale in (10.0, 30.0):
        x = torch.randn(1, 150, 128, device=dev) * scale
        with torch.no_grad():
            y, st = layer(x[:, :140], use_cache=True)
            yh, sth = half(x[:, :140].half(), use_cache=True)
            y2, _ = layer(x[:, 140:], state=st)  # decoding on from the state
            yh2, _ = half(x[:, 140:].half(), state=sth)
        assert torch.isfinite(yh).all() and torch.isfinite(yh2).all(), scale
        assert sth.dtype == torch.float32
        assert_close(f"fp16 output, x {scale:g}", y, yh.float(), 5e-3)
        assert_close(f"fp16 state, x {scale:g}", st, sth, 5e-3)
        assert_close(f"fp16 decoding on, x {scale:g}", y2, yh2.float(), 5e-3)


def test_layer_backward():
    torch.manual_seed(0)
    layer = LightningAttention(32, 2, 16, layer_idx=1, num_layers=3, block_size=16).to(DEV)
    x = torch.randn(2, 20, 32, device=DEV, requires_grad=True)
    y, st = layer(x)
    assert st is None
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.qkv_proj.weight.grad).all()
    with pytest.raises(ValueError, match="hidden = 32"):
        layer(torch.randn(2, 20, 31, device=DEV))


def test_layer_padding_rule(padding_rule):
    torch.manual_seed(0)
    layer = LightningAttention(32, 2, 16, layer_idx=1, num_layers=3, block_size=16).to(DEV)
    padding_rule(layer, torch.randn(2, 20, 32, device=DEV), tol=1e-4)


# ---------------------------------------------------------------------------------------------------- bad input
def _good(device=DEV):
    q, k, v, h0 = _inputs(1, 8, 2, 16, 24, device=device)
    return dict(q=q, k=k, v=v, slope=_slopes(2, device), initial_state=h0)


BAD = [
    ("zero slope", lambda a: a.update(slope=torch.tensor([0.1, 0.0], device=DEV)), ValueError, "> 0"),
    ("negative slope", lambda a: a.update(slope=torch.tensor([-0.1, 0.2], device=DEV)), ValueError, "> 0"),
    ("nan slope", lambda a: a.update(slope=torch.tensor([float("nan"), 0.2], device=DEV)), ValueError,
     "slope contains NaN"),
    ("inf slope", lambda a: a.update(slope=torch.tensor([float("inf"), 0.2], device=DEV)), ValueError, "finite"),
    ("slope per head wrong", lambda a: a.update(slope=torch.ones(3, device=DEV)), ValueError, r"slope must be \[H\]"),
    ("slope 2-D", lambda a: a.update(slope=torch.ones(2, 1, device=DEV)), ValueError, r"slope must be 1-D \[H\]"),
    ("int slope", lambda a: a.update(slope=torch.ones(2, dtype=torch.long, device=DEV)), TypeError,
     "slope must be a floating-point"),
    ("state shape", lambda a: a.update(initial_state=torch.zeros(1, 2, 24, 16, device=DEV)), ValueError,
     "initial_state must be"),
    ("int state", lambda a: a.update(initial_state=a["initial_state"].long()), TypeError, "initial_state must be"),
    ("q 3-D", lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    ("k shape", lambda a: a.update(k=a["k"][:, :4]), ValueError, "k must have q's shape"),
    ("v heads", lambda a: a.update(v=a["v"][:, :, :1]), ValueError, "v must be"),
    ("int q", lambda a: a.update(q=a["q"].long(), k=a["k"].long()), TypeError, "dtype"),
    ("mixed dtype", lambda a: a.update(v=a["v"].double()), TypeError, "dtype"),
    ("not a tensor", lambda a: a.update(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("bad scale", lambda a: a.update(scale=-1.0), ValueError, "scale"),
]
OPS = [naive_recurrent_lightning_attn, naive_chunk_lightning_attn, chunk_lightning_attn,
       fused_recurrent_lightning_attn]


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("desc,mutate,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(op, desc, mutate, exc, words, value_checks):
    """Every row raises in the naive and the Triton ops (value rows on CUDA with value checks on: off by default)."""
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=words):
        with torch.no_grad():
            op(**args)


def test_naive_chunk_size_is_checked():
    with pytest.raises(ValueError, match="chunk_size must be an int > 0"):
        naive_chunk_lightning_attn(**_good("cpu"), chunk_size=0)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_layer_does_not_recheck_its_slopes(monkeypatch, backend, value_checks):
    """LightningAttention built its slopes (constant, positive): prefill, decoding (the fused recurrent kernel) and
    training run without a value check, while the public ops, on the same values, do check."""
    def no_value_checks(*args, **kwargs):
        raise AssertionError("a value check ran")

    monkeypatch.setattr(_checks, "value_range", no_value_checks)  # checks on: CUDA tensors are checked too
    dev = DEV if backend == "triton" else "cpu"
    layer = LightningAttention(32, 2, 16, layer_idx=1, num_layers=3, block_size=16, backend=backend).to(dev)
    x = torch.randn(2, 20, 32, device=dev)
    with torch.no_grad():
        _, state = layer(x, use_cache=True)
        layer(x[:, :1], state=state)
    layer(x)[0].sum().backward()
    op = naive_chunk_lightning_attn if backend == "naive" else chunk_lightning_attn
    q = torch.randn(1, 4, 2, 16, device=dev)
    with pytest.raises(AssertionError, match="a value check ran"):
        op(q, q, q, layer.slope_rate)


def test_unchecked_path_computes_without_decay():
    """The path the layer takes skips the value check: slope = 0 (no decay) is then computed, by the kernels as by
    the PyTorch chunk form; shapes are still checked."""
    a = _good()
    q, k, v, h0, zero = a["q"], a["k"], a["v"], a["initial_state"], torch.zeros(2, device=DEV)
    with torch.no_grad():
        ref = _naive_chunk(q, k, v, zero, None, h0, False, 64, check_values=False)[0]
        got = _chunk(q, k, v, zero, None, h0, False, check_values=False)[0]
    assert_close("o with slope 0", ref, got, 1e-4 if DEV == "cpu" else 2e-3)
    with pytest.raises(ValueError, match=r"slope must be \[H\]"):
        _chunk(q, k, v, torch.zeros(3, device=DEV), None, h0, False, check_values=False)


LAYER_BAD = [
    (dict(hidden_size=0), "hidden_size must be an int > 0"),
    (dict(num_heads=-1), "num_heads must be an int > 0"),
    (dict(head_dim=16.0), "head_dim must be an int > 0"),
    (dict(num_layers=0), "num_layers must be an int > 0"),
    (dict(layer_idx=3), r"layer_idx must be an int in \[0, num_layers\)"),
    (dict(block_size=0), "block_size must be an int > 0"),
    (dict(eps=0.0), "eps must be a positive number"),
    (dict(backend="flash"), "backend must be 'auto', 'naive' or 'triton'"),
]


@pytest.mark.parametrize("change,words", LAYER_BAD, ids=[next(iter(c)) for c, _ in LAYER_BAD])
def test_layer_constructor_checks(change, words):
    kwargs = dict(hidden_size=32, num_heads=2, head_dim=16, layer_idx=1, num_layers=3, block_size=16)
    with pytest.raises(ValueError, match=f"LightningAttention: {words}"):
        LightningAttention(**{**kwargs, **change})


def test_layer_input_checks():
    layer = LightningAttention(32, 2, 16, layer_idx=1, num_layers=3)
    x = torch.randn(2, 5, 32)
    with pytest.raises(TypeError, match="x is torch.float16 but the layer's parameters are torch.float32"):
        layer(x.half())
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, d, d\] = \(2, 2, 16, 16\)"):
        layer(x, state=torch.zeros(2, 2, 16, 8))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \(2, 5\)"):
        layer(x, attention_mask=torch.ones(2, 4))
    y, state = layer(x[:, :0], use_cache=True)  # T = 0
    assert y.shape == (2, 0, 32) and torch.equal(state, torch.zeros(2, 2, 16, 16))


def test_kernel_head_dim_limit():
    q, k, v, _ = _inputs(1, 4, 1, 160, 16)
    with pytest.raises(ValueError, match="<= 128"):
        chunk_lightning_attn(q, k, v, _slopes(1))


def test_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    args = _good("cpu")
    for op in (chunk_lightning_attn, fused_recurrent_lightning_attn):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            with torch.no_grad():
                op(**args)


def test_bf16_on_cpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    args = {n: (t.bfloat16() if n in "qkv" else t) for n, t in _good("cpu").items()}
    with pytest.raises(TypeError, match="bfloat16"):
        chunk_lightning_attn(**args)


# ------------------------------------------------------------------------------------------- float64 (gradcheck)
NAIVE_OPS = [naive_recurrent_lightning_attn, naive_chunk_lightning_attn]


def _fp64_leaves():
    """A tiny odd problem in float64 on the CPU, every input a leaf: q, k [1, 7, 2, 3], v [1, 7, 2, 5], slopes of
    a middle and a fast head, an initial state [1, 2, 3, 5]."""
    q, k, v, h0 = _inputs(1, 7, 2, 3, 5, seed=11, dtype=torch.float64, device="cpu")
    slope = torch.tensor([0.3, 1.7], dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, slope, h0)]


@pytest.mark.parametrize("op", NAIVE_OPS, ids=lambda f: f.__name__)
def test_naive_ops_pass_gradcheck_in_float64(op):
    """The naive ops take float64 and compute in it (finite differences in fp32 would fail gradcheck's 1e-5):
    gradients of q, k, v, the slopes and the initial state, through o and the final state; blocks of 3 tokens in
    the chunk form, so that T = 7 ends with a short block."""
    kw = dict(chunk_size=3) if op is naive_chunk_lightning_attn else {}

    def fn(q, k, v, slope, h0):
        return op(q, k, v, slope, initial_state=h0, output_final_state=True, **kw)

    gradcheck_float64(fn, _fp64_leaves())


@pytest.mark.parametrize("op", NAIVE_OPS, ids=lambda f: f.__name__)
def test_naive_ops_in_float64_agree_with_float32(op):
    q, k, v, h0 = _inputs(2, 37, 3, 16, 24, seed=12, device="cpu")
    assert_float64_matches_float32(lambda q, k, v, slope, h0: op(q, k, v, slope, initial_state=h0,
                                                                 output_final_state=True),
                                   [q, k, v, _slopes(3, "cpu"), h0], ("o", "final state"), 1e-5)


@pytest.mark.parametrize("op", [chunk_lightning_attn, fused_recurrent_lightning_attn], ids=lambda f: f.__name__)
def test_kernels_refuse_float64(op):
    """The kernels take fp32, fp16 and bf16 only: float64 is a TypeError that says where it runs."""
    args = {n: t.double() for n, t in _good().items()}
    with pytest.raises(TypeError, match=r"q, k, v must share one dtype among float32, float16, bfloat16, got q "
                                        r"torch.float64.*the Triton kernels take no float64: use the naive"):
        with torch.no_grad():
            op(**args)


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_layer_runs_in_float64(backend):
    """LightningAttention.double() runs on the CPU ("auto" takes the PyTorch path for fp64): the fp32 layer's
    outputs and state, and, on the naive path, gradcheck's on the input."""
    torch.manual_seed(0)
    layer = LightningAttention(32, 2, 16, layer_idx=1, num_layers=3, block_size=8, backend=backend)
    with torch.no_grad():
        assert_float64_matches_float32(lambda x: layer.to(x.dtype)(x, use_cache=True), [torch.randn(2, 13, 32)],
                                       ("y", "state"), 1e-4)
    if backend == "naive":
        small = LightningAttention(8, 2, 4, layer_idx=1, num_layers=3, block_size=4, backend="naive").double()
        gradcheck_float64(lambda x: small(x)[0], [torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)])


# -------------------------------------------------------------------------------------------------- cost model
def test_cost_model():
    assert lightning_flops(1000, 64, 64, form="parallel") == 1000 * 1000 * 128
    assert lightning_flops(1000, 64, 64, form="recurrent") == 4 * 1000 * 64 * 64
    with pytest.raises(ValueError, match="form"):
        lightning_flops(10, 4, 4, form="quadratic")
    f_m1, _ = generation_cost(MINIMAX_M1, 100_000)
    f_r1, _ = generation_cost(DEEPSEEK_R1, 100_000)
    assert 0.2 < f_m1 / f_r1 < 0.4  # the M1 report: about 25 % at 100K generated tokens
    f1, c1 = generation_cost(MINIMAX_M1, 1)
    assert f1 == pytest.approx(2 * 45.9e9 + 10 * 2 * 64 * 256 + 70 * 4 * 64 * 128 * 128)
    assert c1 == 10 * 2 * 8 * 128 * 2 + 70 * 64 * 128 * 128 * 4


# -------------------------------------------------------------------------------------------- exercise checkers
def test_balanced_chunk_checker():
    check_balanced_chunk(lambda d_k, d_v: 4 * d_k * d_v / (d_k + d_v))
    for wrong in (lambda d_k, d_v: 2 * d_k * d_v / (d_k + d_v),  # the state read or its update forgotten
                  lambda d_k, d_v: 2 * d_k,  # right only when K = V
                  lambda d_k, d_v: math.sqrt(d_k * d_v)):
        with pytest.raises(ExerciseError):
            check_balanced_chunk(wrong)


def _norm(slope, T=1024):
    lam2 = math.exp(-2 * slope)
    return math.sqrt(T) if slope == 0 else math.sqrt((1 - lam2 ** T) / (1 - lam2))


def test_state_norm_checker():
    right = {"no decay": _norm(0), "s = 0.1": _norm(0.1), "s = 0.01": _norm(0.01)}
    check_state_norm_prediction(right)
    for name, wrong in [("no decay", 1024.0),  # linear growth: the outer products do not align
                        ("s = 0.1", 1 / (1 - math.exp(-0.1))),  # 1/(1-λ): adding norms, not squares
                        ("s = 0.01", 1.0), ("no decay", None)]:
        with pytest.raises(ExerciseError):
            check_state_norm_prediction(dict(right, **{name: wrong}))
    with pytest.raises(ExerciseError, match="must be a number"):
        check_state_norm_prediction([32.0, 2.35, 7.1])
    check_state_norm_prediction({n: torch.tensor(p) for n, p in right.items()})  # any number, a tensor too


def _chunk_form(q, k, v, S, slope, C=16, query_shift=1, state_len=None):
    """The chunk form with the right exponents (query_shift=1, state decayed by λ^L); the knobs plant bugs."""
    lam, out = math.exp(-slope), []
    for c0 in range(0, q.shape[0], C):
        qc, kc, vc = q[c0:c0 + C], k[c0:c0 + C], v[c0:c0 + C]
        L = qc.shape[0]
        i = torch.arange(L, dtype=q.dtype)
        out.append((qc * (lam ** (i + query_shift))[:, None]) @ S + ((qc @ kc.T) * decay_matrix(slope, L)) @ vc)
        S = lam ** (state_len or L) * S + (kc * (lam ** (L - 1 - i))[:, None]).T @ vc
    return torch.cat(out), S


def _unwritten_rows(q, k, v, S, slope, C=16):
    """Right final state, but the last output row of every chunk never written (NaN, as torch.empty may hold)."""
    o, St = _chunk_form(q, k, v, S, slope, C)
    o = o.clone()
    o[C - 1::C] = float("nan")
    return o, St


def test_chunk_form_checker():
    check_chunk_form_fix(_chunk_form)
    for wrong in (chunk_form_with_a_bug,  # the planted bug: query decay λ^i
                  lambda q, k, v, S, slope, C=16: _chunk_form(q, k, v, S, slope, C, state_len=C),  # λ^C, short chunk
                  lambda q, k, v, S, slope, C=16: _chunk_form(q, k, v, S, slope, C, query_shift=2),
                  _unwritten_rows,
                  lambda q, k, v, S, slope, C=16: (_chunk_form(q, k, v, S, slope, C)[0],
                                                   _chunk_form(q, k, v, S, slope, C)[1][None])):  # [1, K, V]
        with pytest.raises(ExerciseError):
            check_chunk_form_fix(wrong)


@triton.jit
def _tile(q_ptr, k_ptr, v_ptr, s_ptr, o_ptr, slope, L, K, V, BL: tl.constexpr, BK: tl.constexpr,
          BV: tl.constexpr, SHIFT: tl.constexpr, CAUSAL: tl.constexpr, INTER: tl.constexpr, STORE_ALL: tl.constexpr,
          LATE_MASK: tl.constexpr = False, FACTORED: tl.constexpr = False, WHERE_LATE: tl.constexpr = False):
    """Exercise 4's output tile; the flags plant the bugs a reader might write."""
    q, k, v, S = load_chunk(q_ptr, k_ptr, v_ptr, s_ptr, L, K, V, BL, BK, BV)
    rows, vs = tl.arange(0, BL), tl.arange(0, BV)
    diff = (rows[:, None] - rows[None, :]).to(tl.float32)
    if LATE_MASK:  # exp of a positive exponent above the diagonal, masked afterwards
        D = tl.exp(-slope * diff) * (diff >= 0).to(tl.float32)
    elif WHERE_LATE:  # the same, masked by a where: right values, an overflow on the way
        D = tl.where(diff >= 0, tl.exp(-slope * diff), 0.0)
    elif FACTORED:  # λ^i · λ^(−j): one exponent is positive
        r = rows.to(tl.float32)
        D = tl.exp(-slope * r)[:, None] * tl.exp(slope * r)[None, :] * (diff >= 0).to(tl.float32)
    elif CAUSAL:
        D = tl.exp(tl.where(diff >= 0, -slope * diff, float("-inf")))
    else:
        D = tl.exp(-slope * tl.abs(diff))
    o = tl.dot(tl.dot(q, tl.trans(k), input_precision="ieee") * D, v, input_precision="ieee")
    if INTER:
        o += tl.dot(q, S, input_precision="ieee") * tl.exp(-slope * (rows + SHIFT).to(tl.float32))[:, None]
    o_mask = (rows[:, None] < L) & (vs[None, :] < V) if STORE_ALL else (rows[:, None] < L - 1) & (vs[None, :] < V)
    tl.store(o_ptr + rows[:, None] * V + vs[None, :], o, mask=o_mask)


class _Launcher:
    """kernel[grid](...) with fixed planted-bug flags: what check_output_tile_kernel launches."""

    def __init__(self, **flags):
        self.flags = dict(dict(SHIFT=1, CAUSAL=True, INTER=True, STORE_ALL=True), **flags)

    def __getitem__(self, grid):
        return lambda *args, **kw: _tile[grid](*args, **kw, **self.flags)


def test_output_tile_checker():
    check_output_tile_kernel(_Launcher())
    for flags, words in [(dict(SHIFT=0), "exponent i"), (dict(CAUSAL=False), "above the diagonal"),
                         (dict(INTER=False), "inter-chunk term"), (dict(STORE_ALL=False), "NaN"),
                         (dict(LATE_MASK=True), "shape 6 of 6.*(NaN|overflow)"),
                         (dict(FACTORED=True), "shape 6 of 6.*(NaN|overflow)")]:
        with pytest.raises(ExerciseError, match=words):
            check_output_tile_kernel(_Launcher(**flags))
    if runtime.interpreting():  # a GPU computes the overflow and drops it: only the interpreter sees it
        with pytest.raises(ExerciseError, match="shape 6 of 6.*overflowed"):
            check_output_tile_kernel(_Launcher(WHERE_LATE=True))


def test_chunk_backward_falls_back_to_pytorch_where_the_kernels_do_not_fit(monkeypatch):
    """On a GPU with too little shared memory (a T4 at K = 128) runtime.launch raises SharedMemoryError; the backward
    then computes the gradients by autograd through the PyTorch chunk form, with a warning, instead of failing."""
    import minisparse.lightning.triton as lt

    def too_large(*args, **kwargs):
        raise runtime.SharedMemoryError("lightning.bwd_dqkv.k128: the kernel needs more shared memory than this GPU "
                                        "gives a block")

    monkeypatch.setattr(lt, "_backward", too_large)
    q, k, v, h0 = (x.requires_grad_() for x in _inputs(1, 70, 2, 16, 24, seed=3))
    slope = _slopes(2)
    seeds = (torch.randn(1, 70, 2, 24, device=DEV), torch.randn(1, 2, 16, 24, device=DEV))

    def grads(fn):
        o, ht = fn(q, k, v, slope, initial_state=h0, output_final_state=True)
        return torch.autograd.grad((o, ht), (q, k, v, h0), seeds)

    want = grads(naive_recurrent_lightning_attn)
    with pytest.warns(RuntimeWarning, match="chunk_lightning_attn: .*its PyTorch form"):
        got = grads(chunk_lightning_attn)
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), want, got):
        assert_close(name, a, b, 1e-5)
    with pytest.raises(RuntimeError, match="other failure"):  # only the shared-memory error falls back
        monkeypatch.setattr(lt, "_backward", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("other failure")))
        grads(chunk_lightning_attn)


def test_from_hf_of_another_module_says_what_it_needs():
    """A module that is not transformers' MiniMaxLightningAttention: a TypeError naming it, not an AttributeError."""
    with pytest.raises(TypeError, match=r"LightningAttention.from_hf: module must be transformers' MiniMaxLightningAttention, got Linear"):
        LightningAttention.from_hf(torch.nn.Linear(4, 4))
