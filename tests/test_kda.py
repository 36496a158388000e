"""minisparse.kda (chapter 6): the recurrence vs fla's naive_recurrent_kda and transformers' Kimi Linear recurrence,
the chunk form vs the recurrence (forward, final state, every gradient) and vs transformers' chunked function, the
reduction to Gated DeltaNet when g is constant over K, extreme gates against a known-wrong factorisation, one
bad-input table shared by the naive and the Triton ops, the layer vs transformers' KimiLinearDeltaAttention and
decoding vs prefill, the cost model, the Triton kernels vs the naive spec, and the exercise checkers.

Shapes are odd on purpose: T = 0, 1, 37, 100 (not multiples of the chunk), K ≠ V, grouped value heads (HV = 2H),
an initial state, gates from -1e-3 to -30 a token and valid extreme gates (-200 to -1e30). On a CPU the Triton
kernels run in the interpreter in fp32 with NaN-poisoned output buffers.
"""
import importlib.util
import pathlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minisparse  # noqa: F401  (sets up the runtime)
from minisparse import runtime
from minisparse.deltanet import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from minisparse.kda import naive_chunk_kda, naive_recurrent_kda
from minisparse.testing import (assert_close, assert_float64_matches_float32, gradcheck_float64, hf_torch_function,
                                hf_torch_path, make_log_gates)

ROOT = pathlib.Path(__file__).resolve().parents[1]

GATES = [(-1e-3, 0.0), (-2.0, 0.0), (-30.0, -5.0)]  # near no decay, mixed, e^-30 a token


def _inputs(B, T, H, HV, K, V, *, seed=0, gates=(-2.0, 0.0), state=True, normalise=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    if normalise:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = make_log_gates(B, T, HV, K, low=gates[0], high=gates[1], seed=seed + 1)
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = 0.5 * torch.randn(B, HV, K, V, generator=gen) if state else None
    return [x.to(device) if x is not None else None for x in (q, k, v, g, beta, h0)]


def _fla_naive():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("fla.ops.kda.naive")


def _hf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("transformers")
        from transformers.models.kimi_linear import modeling_kimi_linear
    return modeling_kimi_linear


def _grads(out, state, inputs, seed=7):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=gen).to(out.device)
    loss = (out.float() * do).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


# ------------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("HV", [2, 4])
def test_naive_recurrent_matches_fla(state, gates, HV):
    fla = _fla_naive()
    q, k, v, g, beta, h0 = _inputs(2, 37, 2, HV, 32, 48, gates=gates, state=state)
    o_ref, s_ref = fla.naive_recurrent_kda(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True)
    o, s = naive_recurrent_kda(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True)
    assert_close("o vs fla", o_ref, o, 1e-5)
    assert_close("final state vs fla", s_ref, s, 1e-5)
    assert naive_recurrent_kda(q, k, v, g, beta, initial_state=h0)[1] is None


def test_naive_recurrent_and_chunk_match_transformers():
    hf = _hf()
    q, k, v, g, beta, h0 = _inputs(2, 37, 3, 3, 32, 48, normalise=False)
    recurrent = hf_torch_function(hf.recurrent_kimi_delta_attention)
    chunked = hf_torch_function(hf.chunk_kimi_delta_attention)
    o_ref, s_ref = recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             use_qk_l2norm_in_kernel=True)
    o, s = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    assert_close("recurrent o vs transformers", o_ref, o, 1e-5)
    assert_close("recurrent state vs transformers", s_ref, s, 1e-5)
    o_ref, s_ref = chunked(q, k, v, g, beta, chunk_size=16, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True)
    o, s = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                           chunk_size=16)
    assert_close("chunk o vs transformers", o_ref, o, 1e-5)
    assert_close("chunk state vs transformers", s_ref, s, 1e-5)


@pytest.mark.parametrize("chunk", [False, True])
def test_gate_constant_over_k_is_gated_deltanet(chunk):
    q, k, v, _, beta, h0 = _inputs(2, 45, 2, 4, 16, 24)
    g = make_log_gates(2, 45, 4, low=-4.0, seed=9)
    g_kda = g[..., None].expand(-1, -1, -1, 16)
    if chunk:
        o, s = naive_chunk_kda(q, k, v, g_kda, beta, initial_state=h0, output_final_state=True, chunk_size=16)
        o_ref, s_ref = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    chunk_size=16)
    else:
        o, s = naive_recurrent_kda(q, k, v, g_kda, beta, initial_state=h0, output_final_state=True)
        o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o vs GDN", o_ref, o, 1e-5)
    assert_close("state vs GDN", s_ref, s, 1e-5)


# ------------------------------------------------------------------------------------------- the chunk form
@pytest.mark.parametrize("T,C", [(0, 64), (1, 64), (37, 16), (64, 64), (100, 32)])
@pytest.mark.parametrize("gates", GATES)
def test_chunk_matches_recurrent(T, C, gates):
    q, k, v, g, beta, h0 = _inputs(2, T, 2, 4, 32, 48, gates=gates)
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_c, s_c = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=C)
    assert o_c.shape == (2, T, 4, 48)
    if T:
        assert_close("o", o_r, o_c, 1e-5)
    assert_close("final state", s_r, s_c, 1e-5)


@pytest.mark.parametrize("op", [naive_recurrent_kda, naive_chunk_kda], ids=lambda f: f.__name__)
def test_naive_ops_of_an_empty_sequence_stay_in_the_autograd_graph(op):
    """T = 0 without an initial state: the empty output still depends on every input (as chunk_kda's does), so a
    backward through it runs and gives empty gradients instead of "element 0 of tensors does not require grad"."""
    inputs = _inputs(2, 0, 1, 2, 16, 24, state=False)[:5]
    for x in inputs:
        x.requires_grad_(True)
    for l2 in (False, True):
        o, _ = op(*inputs, use_qk_l2norm=l2)
        assert o.shape == (2, 0, 2, 24) and o.dtype == torch.float32
        grads = torch.autograd.grad(o.sum(), inputs)
        assert [d.shape for d in grads] == [x.shape for x in inputs]


@pytest.mark.parametrize("gates", GATES)
def test_chunk_gradients_match_recurrent_including_final_state(gates):
    inputs = _inputs(1, 40, 2, 4, 16, 24, gates=gates, seed=4)
    for x in inputs:
        x.requires_grad_(True)
    o_r, s_r = naive_recurrent_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True)
    o_c, s_c = naive_chunk_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True,
                               chunk_size=16)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), _grads(o_r, s_r, inputs),
                          _grads(o_c, s_c, inputs)):
        assert_close(name, a, b, 1e-4)


def _factored_chunk(q, k, v, g, beta, C=16):
    """A known-wrong chunk form: the intra-chunk decay factored as e^{G_i} · e^{-G_j} (overflows for large |G|)."""
    B, T, H, K = q.shape
    out, S = [], torch.zeros(B, H, K, v.shape[-1])
    qf, kf, vf, gf = (x.transpose(1, 2).float() for x in (q, k, v, g))
    bf = beta.transpose(1, 2).float()
    for c0 in range(0, T, C):
        qc, kc, vc, gc, bc = (x[:, :, c0:c0 + C] for x in (qf, kf, vf, gf, bf))
        L = qc.shape[2]
        G = gc.cumsum(2)
        A = (bc[..., None] * ((kc * G.exp()) @ (kc * (-G).exp()).transpose(-1, -2))).tril(-1)
        P = ((qc * G.exp()) @ (kc * (-G).exp()).transpose(-1, -2)).tril()
        rhs = torch.cat([bc[..., None] * kc * G.exp(), bc[..., None] * vc], -1)
        WU = torch.linalg.solve_triangular(torch.eye(L) + A, rhs, upper=False, unitriangular=True)
        U = WU[..., K:] - WU[..., :K] @ S
        out.append(K ** -0.5 * ((qc * G.exp()) @ S + P @ U))
        S = G[:, :, -1, :, None].exp() * S + (kc * (G[:, :, -1:] - G).exp()).transpose(-1, -2) @ U
    return torch.cat(out, 2).transpose(1, 2)


@pytest.mark.parametrize("extreme", [-200.0, -1e4, -1e30])
def test_extreme_gates_stay_exact_where_the_factored_form_fails(extreme):
    q, k, v, g, beta, _ = _inputs(1, 48, 2, 2, 16, 16, gates=(-1.0, 0.0), state=False)
    g = g.clone()
    g[:, 5, :, :8] = extreme  # half the channels of one token: a hard reset there
    g[:, 20:23] = extreme  # every channel, three tokens
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, output_final_state=True)
    o_c, s_c = naive_chunk_kda(q, k, v, g, beta, output_final_state=True, chunk_size=16)
    assert_close("o", o_r, o_c, 1e-5)
    assert_close("final state", s_r, s_c, 1e-5)
    bad = _factored_chunk(q, k, v, g, beta)
    assert not torch.isfinite(bad).all() or (bad - o_r).norm() > 1e-2 * o_r.norm()


def test_gates_of_minus_thirty_a_token_with_long_chunks():
    """64 tokens at -30 a channel: e^{-G} would be e^{1920}; the segment sums stay exact."""
    q, k, v, g, beta, h0 = _inputs(1, 128, 1, 1, 16, 16, gates=(-30.0, -30.0))
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_c, s_c = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o", o_r, o_c, 1e-5)
    assert_close("final state", s_r, s_c, 1e-5)
    assert not torch.isfinite(_factored_chunk(q, k, v, g, beta, C=64)).all()


# ------------------------------------------------------------------------------------------------- bad input
B, T, H, HV, K, V = 1, 5, 2, 4, 16, 8


def _good():
    q, k, v, g, beta, h0 = _inputs(B, T, H, HV, K, V, gates=(-1.0, -0.1))
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)


BAD_INPUTS = [  # (id, change to the good arguments, exception, message fragment)
    ("g per head, not per channel", lambda a: dict(a, g=a["g"][..., 0]), ValueError, "one log decay per key channel"),
    ("g wrong K", lambda a: dict(a, g=a["g"][..., :8]), ValueError, "g must be [B, T, HV, K]"),
    ("g positive", lambda a: dict(a, g=a["g"].abs() + 0.1), ValueError, "g must be"),
    ("g NaN", lambda a: dict(a, g=a["g"].masked_fill(a["g"] < -0.5, float("nan"))), ValueError, "NaN"),
    ("g -inf", lambda a: dict(a, g=a["g"].masked_fill(a["g"] < -0.5, float("-inf"))), ValueError, "g must be"),
    ("beta above 2", lambda a: dict(a, beta=a["beta"] + 2.5), ValueError, "beta must be"),
    ("beta negative", lambda a: dict(a, beta=a["beta"] - 1.5), ValueError, "beta must be"),
    ("beta per channel", lambda a: dict(a, beta=a["g"]), ValueError, "beta must be 3-D"),
    ("heads mismatch", lambda a: dict(a, v=a["v"][:, :, :3]), ValueError, "HV a multiple of H"),
    ("k shape", lambda a: dict(a, k=a["k"][:, :, :1]), ValueError, "k must have q's shape"),
    ("state shape", lambda a: dict(a, initial_state=a["initial_state"][:, :2]), ValueError, "initial_state"),
    ("dtype mix", lambda a: dict(a, v=a["v"].double()), TypeError, "share one dtype"),
    ("q not a tensor", lambda a: dict(a, q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
]


def _ops():
    ops = [("naive_recurrent_kda", naive_recurrent_kda), ("naive_chunk_kda", naive_chunk_kda)]
    try:
        from minisparse.kda import chunk_kda, fused_recurrent_kda
        ops += [("chunk_kda", chunk_kda), ("fused_recurrent_kda", fused_recurrent_kda)]
    except ImportError:
        pass
    return ops


@pytest.mark.parametrize("op", _ops(), ids=lambda o: o[0])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
def test_bad_input_is_refused_with_a_clear_message(op, case, value_checks):
    """One table for the naive and the Triton ops; the Triton ops' value checks run on CPU tensors always and on
    CUDA tensors after runtime.set_value_checks(True), which the `value_checks` fixture sets."""
    name, fn = op
    _, change, exc, fragment = case
    args = change(_good())
    if not name.startswith("naive"):
        args = {n: x.to(_device()) if isinstance(x, torch.Tensor) else x for n, x in args.items()}
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        with torch.no_grad():
            fn(**args)
    assert name in str(info.value)


def test_huge_rows_with_l2norm_are_exact_in_the_naive_ops_and_refused_by_the_kernels(value_checks):
    """The kernels' l2norm sums squares in float32, which overflows past |q| ≈ 1e18: they refuse such rows (under
    the value-check rule); the naive ops normalise them exactly."""
    from minisparse.kda import chunk_kda, fused_recurrent_kda

    a = _good()
    ref = naive_recurrent_kda(**a, use_qk_l2norm=True)[0]
    assert_close("naive, q at 1e20", ref, naive_recurrent_kda(**dict(a, q=a["q"] * 1e20), use_qk_l2norm=True)[0],
                 1e-5)
    huge = {n: x.to(_device()) for n, x in dict(a, q=a["q"] * 1e20).items()}
    for fn in (chunk_kda, fused_recurrent_kda):
        with pytest.raises(ValueError, match=r"q must be >= -5.76461e\+17 and <= 5.76461e\+17 \(use_qk_l2norm"), \
                torch.no_grad():
            fn(**huge, use_qk_l2norm=True)


def test_value_checks_follow_the_rule(value_checks):
    """The Triton ops check g's and β's values on CPU tensors always, on CUDA tensors only after
    runtime.set_value_checks(True); unchecked, they compute what they are given. The naive ops always check."""
    from minisparse.kda import chunk_kda
    from minisparse.kda.naive import _naive_recurrent

    q, k, v, g, beta, h0 = _inputs(1, 70, 1, 2, 16, 16, device=_device())
    g_up = g.abs() * 0.01  # a slightly positive log decay: outside the model's range, still well defined
    value_checks(False)
    if _device() == "cpu":
        with pytest.raises(ValueError, match="g must be"):
            chunk_kda(q, k, v, g_up, beta)
    else:
        ref = _naive_recurrent(q, k, v, g_up, beta, None, h0, False, False, check_values=False)[0]
        assert_close("o with g > 0, value checks off", ref, chunk_kda(q, k, v, g_up, beta, initial_state=h0)[0],
                     1e-3)
    value_checks(True)
    with pytest.raises(ValueError, match="g must be"):
        chunk_kda(q, k, v, g_up, beta)
    value_checks(False)  # the naive ops check always
    with pytest.raises(ValueError, match="g must be"):
        naive_recurrent_kda(q, k, v, g_up, beta)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_layer_never_rechecks_its_own_gates(monkeypatch, backend, value_checks):
    """KimiDeltaAttention builds g ≤ 0 and β = σ(b) itself: prefill, a short continuation, single-token decoding
    and the backward never ask for a value check, even with value checks on (CUDA tensors then checked too)."""
    from minisparse import _checks
    from minisparse.kda import KimiDeltaAttention

    calls = []
    real = _checks.value_range
    monkeypatch.setattr(_checks, "value_range", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    dev = _device() if backend == "triton" else "cpu"
    layer = KimiDeltaAttention(32, 2, 16, backend=backend).to(dev)
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        _, st = layer(x[:, :30], use_cache=True)
        _, st = layer(x[:, 30:33], state=st)
        layer(x[:, 33:34], state=st)
    layer(x)[0].sum().backward()
    assert calls == [], calls


# ------------------------------------------------------------------------------------------- float64 (gradcheck)
def _fp64_leaves():
    """A tiny odd problem in float64, every input a leaf: q, k [1, 7, 1, 3], v [1, 7, 2, 4] (two value heads a key
    head), gates in [-1.5, -0.1] a channel and β in [0.2, 0.8] (away from the ends of their ranges, which
    gradcheck's steps of 1e-6 must not cross), an initial state [1, 2, 3, 4]."""
    q, k, v, g, _, h0 = _inputs(1, 7, 1, 2, 3, 4, seed=31, gates=(-1.5, -0.1), normalise=False)
    beta = 0.2 + 0.6 * torch.rand(1, 7, 2, generator=torch.Generator().manual_seed(32))
    return [x.double().requires_grad_() for x in (q, k, v, g, beta, h0)]


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("op", [naive_recurrent_kda, naive_chunk_kda], ids=lambda f: f.__name__)
def test_naive_ops_pass_gradcheck_in_float64(op, l2):
    """As the gated delta rule's (test_deltanet.py), with a gate a channel: every input's gradient through o and
    the final state, l2norm on and off, T = 7 in chunks of 3."""
    kw = dict(chunk_size=3) if op is naive_chunk_kda else {}
    gradcheck_float64(lambda *x: op(*x[:5], initial_state=x[5], output_final_state=True, use_qk_l2norm=l2, **kw),
                      _fp64_leaves())


@pytest.mark.parametrize("op", [naive_recurrent_kda, naive_chunk_kda], ids=lambda f: f.__name__)
def test_naive_ops_in_float64_agree_with_float32(op):
    assert_float64_matches_float32(
        lambda q, k, v, g, beta, h0: op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True),
        _inputs(2, 37, 2, 4, 16, 24, seed=33, gates=GATES[2]), ("o", "final state"), 1e-5)


def test_kernels_refuse_float64():
    """The kernels take fp32, fp16 and bf16 only: float64 is a TypeError that says where it runs."""
    from minisparse.kda import chunk_kda, fused_recurrent_kda

    q, k, v, g, beta, h0 = (x.to(_device(), torch.float64) for x in _inputs(1, 5, 2, 4, 16, 8))
    words = (r"q, k, v must share one dtype among float32, float16, bfloat16, got q torch.float64.*the Triton "
             r"kernels take no float64: use the naive")
    with pytest.raises(TypeError, match=words):
        chunk_kda(q, k, v, g, beta, initial_state=h0)
    with pytest.raises(TypeError, match=words), torch.no_grad():
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0)


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_layer_runs_in_float64(backend):
    """KimiDeltaAttention.double() runs on the CPU ("auto" takes the PyTorch path for fp64): the fp32 layer's
    output and both states, and, on the naive path, gradcheck's on the input."""
    from minisparse.kda import KimiDeltaAttention

    torch.manual_seed(0)
    layer = KimiDeltaAttention(32, 2, 16, chunk_size=8, backend=backend)
    with torch.no_grad():
        assert_float64_matches_float32(lambda x: layer.to(x.dtype)(x, use_cache=True), [torch.randn(2, 13, 32)],
                                       ("y", "convolution state", "state"), 1e-4)
    if backend == "naive":
        small = KimiDeltaAttention(8, 2, 4, chunk_size=4, backend="naive").double()
        gradcheck_float64(lambda x: small(x)[0], [torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)])


# ------------------------------------------------------------------------------------------------- the layer
_TORCH_PATH = ["chunk_kimi_delta_attention", "recurrent_kimi_delta_attention", "causal_conv1d_fn",
               "causal_conv1d_update"]


def _tiny_hf(hidden=64, heads=2, head_dim=16, seed=0):
    hf = _hf()
    from transformers import KimiLinearConfig

    torch.manual_seed(seed)
    config = KimiLinearConfig(hidden_size=hidden, linear_num_heads=heads, linear_head_dim=head_dim,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              layer_types=["linear_attention", "full_attention"])
    module = hf.KimiLinearDeltaAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        module.forget_gate.dt_bias.uniform_(-2, 1)
        module.forget_gate.A_log.uniform_(-1, 1)
        module.o_norm.weight.uniform_(0.5, 1.5)
    return hf, module


@pytest.mark.parametrize("T", [1, 37, 70])
def test_layer_from_hf_matches_transformers(T):
    from minisparse.kda import KimiDeltaAttention

    hf, module = _tiny_hf()
    layer = KimiDeltaAttention.from_hf(module, backend="naive")
    x = torch.randn(2, T, 64)
    mask = torch.ones(2, T)
    mask[1, : T // 3] = 0  # left padding in the second sequence
    with torch.no_grad(), hf_torch_path(hf, _TORCH_PATH):
        y_hf = module(x)
        y_hf_masked = module(x, attention_mask=mask)
    with torch.no_grad():
        y, state = layer(x)
        y_masked, _ = layer(x, attention_mask=mask)
    assert state is None
    assert_close("y vs transformers", y_hf, y, 1e-5)
    assert_close("y (padding mask) vs transformers", y_hf_masked, y_masked, 1e-5)


def test_layer_decoding_equals_prefill_and_the_state_continues():
    from minisparse.kda import KimiDeltaAttention

    torch.manual_seed(1)
    layer = KimiDeltaAttention(48, 3, 16, backend="naive")
    x = torch.randn(2, 30, 48)
    with torch.no_grad():
        y_full, (conv, rec) = layer(x, use_cache=True)
        assert conv.shape == (2, 3 * 48, 3) and rec.shape == (2, 3, 16, 16) and rec.dtype == torch.float32
        y_a, state = layer(x[:, :11], use_cache=True)  # a prefill, then a continuation, then single tokens
        y_b, state = layer(x[:, 11:20], state=state)
        steps = [y_a, y_b]
        for t in range(20, 30):
            y_t, state = layer(x[:, t:t + 1], state=state)
            steps.append(y_t)
    assert_close("decode == prefill", y_full, torch.cat(steps, 1), 1e-5)
    assert_close("final state", rec, state[1], 1e-5)


def test_layer_padding_rule(padding_rule):
    from minisparse.kda import KimiDeltaAttention

    torch.manual_seed(2)
    padding_rule(KimiDeltaAttention(48, 3, 16, backend="naive"), torch.randn(2, 20, 48),
                 recurrent=lambda state: state[1])


def test_layer_gate_is_kimi_linears_and_gradients_flow():
    from minisparse.kda import KimiDeltaAttention

    hf, module = _tiny_hf()
    layer = KimiDeltaAttention.from_hf(module, backend="naive")
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        assert_close("gate", module.forget_gate(x), layer.gate(x), 1e-6)
    assert (layer.gate(x) <= 0).all()
    y, _ = layer(x)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_layer_rejects_bad_arguments():
    from minisparse.kda import KimiDeltaAttention

    with pytest.raises(ValueError, match="conv_kernel_size"):
        KimiDeltaAttention(32, 2, 16, conv_kernel_size=1)
    with pytest.raises(ValueError, match="backend"):
        KimiDeltaAttention(32, 2, 16, backend="cuda")
    layer = KimiDeltaAttention(32, 2, 16)
    with pytest.raises(ValueError, match="hidden = 32"):
        layer(torch.randn(1, 4, 16))
    with pytest.raises(TypeError, match="layer's parameters"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- the cost model
def test_cost_model_reproduces_the_memory_claim_and_bounds_decoding():
    pytest.importorskip("transformers")
    from transformers import KimiLinearConfig

    from minisparse.deltanet.cost import gdn_flops
    from minisparse.kda import kda_flops, kimi_linear_costs
    from minisparse.mla.cost import kv_cache_bytes
    from minisparse.overview import KIMI_LINEAR_FULL_LAYERS

    full = KIMI_LINEAR_FULL_LAYERS
    kimi = KimiLinearConfig(linear_attn_config=dict(full_attn_layers=full,
                                                    kda_layers=[i for i in range(1, 28) if i not in full]))
    assert kimi.layer_types.count("full_attention") == 7
    T = 2 ** 20
    hyb = kimi_linear_costs(kimi, T)
    mla = kimi_linear_costs(kimi, T, ["full_attention"] * 27)
    assert hyb["kv_bytes"] == kv_cache_bytes(kimi, T)  # chapter 3's cache count agrees
    assert hyb["state_bytes"] > 20 * 32 * 128 * 128 * 4  # states plus the short convolutions' last inputs
    assert 0.735 < 1 - hyb["memory"] / mla["memory"] < 0.745
    assert kda_flops(1000, 128, 128, 2) - gdn_flops(1000, 128, 128, 2) == 2 * 4 * 1000 * 128
    with pytest.raises(ValueError, match="kda_flops: T must be a number >= 0"):
        kda_flops(-100, 128, 128)
    one = hyb["tokens_per_s"] / mla["tokens_per_s"]
    many = (kimi_linear_costs(kimi, T, batch=4096)["tokens_per_s"]
            / kimi_linear_costs(kimi, T, ["full_attention"] * 27, batch=4096)["tokens_per_s"])
    assert 2.5 < one < many < 27 / 7
    with pytest.raises(ValueError, match="unknown layer types"):
        kimi_linear_costs(kimi, T, ["sliding_attention"])


# ------------------------------------------------------------------------------------------------- Triton
def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


TRITON_SHAPES = [  # (T, H, HV, K, V, gates): odd T, K and V in {16, 24, 32, 48, 64}, HV > H
    (1, 1, 1, 16, 16, (-2.0, 0.0)),
    (37, 1, 2, 24, 48, (-30.0, -5.0)),
    (70, 2, 4, 32, 16, (-1e-3, 0.0)),
    (64, 1, 1, 48, 32, (-2.0, 0.0)),
    (100, 1, 2, 64, 24, (-30.0, 0.0)),
]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "T{}-H{}-HV{}-K{}-V{}-g{}".format(*s[:5], s[5][0]))
def test_chunk_kda_forward_matches_the_recurrence(shape, poisoned):
    from minisparse.kda import chunk_kda

    T, H, HV, K, V, gates = shape
    q, k, v, g, beta, h0 = _inputs(2 if T < 50 else 1, T, H, HV, K, V, gates=gates, device=_device())
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    with torch.no_grad():
        o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        o_none, s_none = chunk_kda(q, k, v, g, beta)  # no initial state, no final state
    assert_close("o", o_r, o, 1e-4)
    assert_close("final state", s_r, s, 1e-4)
    assert s_none is None
    assert_close("o without h0", naive_recurrent_kda(q, k, v, g, beta)[0], o_none, 1e-4)


def test_chunk_kda_with_l2norm_and_scale_matches_transformers_style_use():
    from minisparse.kda import chunk_kda

    q, k, v, g, beta, h0 = _inputs(1, 45, 2, 2, 32, 32, normalise=False, device=_device())
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, scale=0.2, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm=True)
    with torch.no_grad():
        o, s = chunk_kda(q, k, v, g, beta, scale=0.2, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    assert_close("o", o_r, o, 1e-4)
    assert_close("final state", s_r, s, 1e-4)


@pytest.mark.parametrize("extreme", [-200.0, -1e30])
def test_chunk_kda_extreme_gates(extreme, poisoned):
    from minisparse.kda import chunk_kda

    q, k, v, g, beta, h0 = _inputs(1, 70, 1, 1, 16, 16, gates=(-1.0, 0.0), device=_device())
    g = g.clone()
    g[:, 5, :, :8] = extreme  # half the channels of one token
    g[:, 20:23] = extreme  # every channel, three tokens inside the first chunk's second sub-chunk
    g[:, 64] = extreme  # the first token of the second chunk
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    with torch.no_grad():
        o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o", o_r, o, 1e-4)
    assert_close("final state", s_r, s, 1e-4)


def test_chunk_kda_decays_are_range_sums(poisoned):
    """After a gate of -1000, G is about -1000 on every later token of the chunk: a decay taken as the difference of
    two cumulative sums then carries float32's 6e-5 (4e-5 relative RMS here, under the 1e-4 of the tests above); the
    kernels sum the gates of each range instead and stay at float32 rounding (2.5e-7)."""
    from minisparse.kda import chunk_kda

    q, k, v, g, beta, h0 = _inputs(1, 100, 1, 1, 16, 16, gates=(-1e-2, 0.0), device=_device())
    g = g.clone()
    g[:, 2] = -1000.0  # early in the first chunk
    g[:, 66] = -1000.0  # early in the second
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    with torch.no_grad():
        o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o", o_r, o, 5e-6)
    assert_close("final state", s_r, s, 5e-6)


GRAD_SHAPES = [  # (T, H, HV, K, V, gates, extreme gate or None)
    (37, 1, 2, 16, 24, (-2.0, 0.0), None),
    (100, 1, 2, 48, 24, (-2.0, 0.0), None),
    (130, 2, 2, 16, 32, (-30.0, 0.0), None),
    (70, 1, 1, 32, 16, (-1.0, 0.0), -1e30),
    (65, 1, 1, 16, 16, (-1e-3, 0.0), -200.0),
]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "T{}-H{}-HV{}-K{}-V{}".format(*s[:5]) + f"-x{s[6]}")
def test_chunk_kda_gradients_match_the_recurrence(shape, poisoned):
    """Every gradient (q, k through l2norm and summed over grouped value heads, v, g, β, h0, and through the final
    state) against autograd through the recurrence, on T not a multiple of the chunk and with extreme gates."""
    from minisparse.kda import chunk_kda

    T, H, HV, K, V, gates, extreme = shape
    inputs = _inputs(1, T, H, HV, K, V, gates=gates, normalise=False, device=_device())
    if extreme is not None:
        inputs[3][:, 5, :, :8] = extreme
        inputs[3][:, 20:23] = extreme
        inputs[3][:, 64] = extreme
    for x in inputs:
        x.requires_grad_(True)
    o_r, s_r = naive_recurrent_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True)
    o, s = chunk_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), _grads(o_r, s_r, inputs), _grads(o, s, inputs)):
        assert_close(name, a, b, 1e-4)


@pytest.mark.parametrize("T,K,V,HV", [(1, 16, 16, 1), (9, 48, 24, 2), (30, 64, 32, 4)])
def test_fused_recurrent_kda_matches_the_recurrence(T, K, V, HV, poisoned):
    from minisparse.kda import fused_recurrent_kda

    q, k, v, g, beta, h0 = _inputs(2, T, 1, HV, K, V, gates=(-30.0, 0.0), normalise=False, device=_device())
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    with torch.no_grad():
        o, s = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    assert_close("o", o_r, o, 1e-4)
    assert_close("final state", s_r, s, 1e-4)


def test_kernel_offsets_stay_64_bit_past_two_to_the_31_elements(last_programs):
    """At Kimi Linear's 32 heads of 128 channels, token t's rows start t · 4096 elements in, past 2^31 from token
    524,288 on: an offset computed in int32 there wraps negative. Every KDA kernel runs its last program of a
    700,001-token launch with its loads and stores recorded (conftest's `last_programs`): none may fall outside the
    tensors."""
    from minisparse.kda import chunk_bwd, chunk_fwd, fused_recurrent

    B, T, H, HV, K, V = 1, 700_001, 32, 32, 128, 128

    def launch(tensor, kernel):
        q, k, g = (tensor(B, T, H if i < 2 else HV, K) for i in range(3))
        v, do = tensor(B, T, HV, V), tensor(B, T, HV, V)
        beta, h0, dht = tensor(B, T, HV), tensor(B, HV, K, V), tensor(B, HV, K, V)
        _, _, saved = chunk_fwd._kda_forward(q, k, v, g, beta, 1.0, h0, True)
        chunk_bwd._kda_backward(q, k, v, g, beta, 1.0, saved, do, dht, True)
        kernel(fused_recurrent._kda_fused_recurrent_kernel, (V // 32, B * HV), q, k, v, g, beta, h0,
               tensor(B, T, HV, V), tensor(B, HV, K, V), 1.0, T, H, HV, K, V, BK=K, BV=32, HAS_H0=True,
               STORE_HT=True, L2NORM=True)

    last_programs((chunk_fwd, chunk_bwd, fused_recurrent), launch)


def test_triton_ops_refuse_gradients_in_decoding_and_heads_over_the_limit():
    from minisparse.kda import chunk_kda, fused_recurrent_kda

    q, k, v, g, beta, _ = _inputs(1, 3, 1, 1, 16, 16, device=_device())
    with pytest.raises(RuntimeError, match="forward only"):
        fused_recurrent_kda(q.requires_grad_(True), k, v, g, beta)
    q, k, v, g, beta, _ = _inputs(1, 3, 1, 1, 160, 16, device=_device())
    with pytest.raises(ValueError, match="K must be <= 128"):
        chunk_kda(q, k, v, g, beta)
    q, k, v, g, beta, _ = _inputs(1, 3, 1, 1, 16, 300, device=_device())
    with pytest.raises(ValueError, match="V must be <= 256"):
        with torch.no_grad():
            fused_recurrent_kda(q, k, v, g, beta)


def test_layer_triton_backend_equals_naive():
    from minisparse.kda import KimiDeltaAttention

    torch.manual_seed(2)
    layer = KimiDeltaAttention(32, 2, 16, backend="naive").to(_device())
    x = torch.randn(1, 40, 32, device=_device())
    with torch.no_grad():
        y_naive, s_naive = layer(x, use_cache=True)
        layer.backend = "triton"
        y_tri, s_tri = layer(x, use_cache=True)
        y_step, _ = layer(x[:, :1], state=s_tri)  # the fused recurrent kernel from a state
        layer.backend = "naive"
        y_step_naive, _ = layer(x[:, :1], state=s_naive)
    assert_close("y", y_naive, y_tri, 1e-4)
    assert_close("state", s_naive[1], s_tri[1], 1e-4)
    assert_close("decode step", y_step_naive, y_step, 1e-4)


def _in_16_bits_against_the_chunk_form(dtype, T, H, HV, K, V, gates, device):
    """chunk_kda on q, k, v in `dtype` (g, β, h0 fp32) against the fp32 chunk form on the same rounded inputs:
    output, final state and every gradient within the book's 16-bit bounds. Returns (low inputs, o_ref, s_ref)."""
    from minisparse.kda import chunk_kda
    from minisparse.testing import TOLERANCES

    base = _inputs(1, T, H, HV, K, V, gates=gates, normalise=False, device=device)
    low = [x.to(dtype) if i < 3 else x for i, x in enumerate(base)]
    ref = [x.float() for x in low]
    fwd_tol, grad_tol = TOLERANCES[dtype]
    for xs in (low, ref):
        for x in xs:
            x.requires_grad_(True)
    o_ref, s_ref = naive_chunk_kda(*ref[:5], initial_state=ref[5], output_final_state=True, use_qk_l2norm=True)
    o, s = chunk_kda(*low[:5], initial_state=low[5], output_final_state=True, use_qk_l2norm=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close("o", o_ref, o, fwd_tol)
    assert_close("final state", s_ref, s, fwd_tol)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), _grads(o_ref, s_ref, ref), _grads(o, s, low)):
        assert_close(name, a, b, grad_tol)
    return low, o_ref, s_ref


def test_chunk_kda_stores_what_it_multiplies_in_16_bits():
    """fp16 inputs (the interpreter has no bf16): U and the chunk states are kept in fp16, the numbers the scans
    multiply, while P, A and A_inv stay fp32 (bench/notes/kda.md records NaN in σPᵀdO from a 16-bit P on triton
    3.6); output, final state and every gradient within the 16-bit bounds of the fp32 chunk form."""
    from minisparse.kda import chunk_fwd

    x = [t.to(torch.float16) if i < 3 else t for i, t in enumerate(_inputs(1, 100, 1, 2, 32, 24, device=_device()))]
    with torch.no_grad():
        _, _, saved = chunk_fwd._kda_forward(*x[:5], 32 ** -0.5, x[5], True)
    kept = {name: saved[name].dtype for name in ("u", "states", "w", "p", "a", "ainv")}
    assert kept == dict(u=torch.float16, states=torch.float16, w=torch.float16, p=torch.float32,
                        a=torch.float32, ainv=torch.float32), kept
    _in_16_bits_against_the_chunk_form(torch.float16, 100, 1, 2, 32, 24, (-5.0, 0.0), _device())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit kernels are checked on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(300, 2, 4, 64, 128, (-2.0, 0.0)), (1000, 1, 1, 128, 128, (-30.0, 0.0))])
def test_chunk_kda_in_16_bits_on_the_gpu(dtype, shape):
    """bf16 / fp16 inputs against the fp32 chunk form on the same (rounded) inputs: forward, final state and every
    gradient within the book's 16-bit bounds (5e-3 forward, 8e-3 gradients); the fused recurrent kernel too."""
    from minisparse.kda import fused_recurrent_kda
    from minisparse.testing import TOLERANCES

    low, o_ref, s_ref = _in_16_bits_against_the_chunk_form(dtype, *shape, "cuda")
    fwd_tol = TOLERANCES[dtype][0]
    with torch.no_grad():
        o1, s1 = fused_recurrent_kda(*[x.detach() for x in low[:5]], initial_state=low[5].detach(),
                                     output_final_state=True, use_qk_l2norm=True)
    assert_close("fused recurrent o", o_ref, o1, fwd_tol)
    assert_close("fused recurrent state", s_ref, s1, fwd_tol)


# ------------------------------------------------------------------------------------------------- exercises
def test_crossover_checker_accepts_the_solution_and_rejects_wrong_counts(capsys):
    from minisparse.kda.exercises import check_crossover
    from minisparse.testing import ExerciseError

    def solution(c):
        return c.linear_num_heads * c.linear_head_dim ** 2 * 4 / ((c.kv_lora_rank + c.qk_rope_head_dim) * 2)

    check_crossover(solution)
    assert "✓" in capsys.readouterr().out
    for wrong in (lambda c: solution(c) / 2,  # the states in bf16
                  lambda c: c.linear_num_heads * c.linear_head_dim ** 2 * 4 / (c.kv_lora_rank * 2),  # no rope key
                  lambda c: solution(c) / c.linear_num_heads,  # a cache per KDA head
                  lambda c: solution(c) / c.num_attention_heads,  # a latent per attention head
                  lambda c: c.linear_num_heads * c.linear_head_dim ** 2 * 4  # per-head keys and values cached
                  / (c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2),
                  # MLA's key head dim for KDA's
                  lambda c: c.linear_num_heads * c.qk_nope_head_dim ** 2 * 4 / ((c.kv_lora_rank + c.qk_rope_head_dim) * 2),
                  lambda c: solution(c) * c.qk_nope_head_dim / c.linear_head_dim):
        with pytest.raises(ExerciseError):
            check_crossover(wrong)


def test_crossover_checker_names_the_config_fields_when_the_answer_reads_another():
    from minisparse.kda.exercises import check_crossover
    from minisparse.testing import ExerciseError

    with pytest.raises(ExerciseError, match="AttributeError.*hidden_size.*only the fields num_attention_heads, "
                                            "qk_nope_head_dim.*linear_head_dim"):
        check_crossover(lambda c: c.hidden_size * 1.0)


def test_intra_products_checker_rejects_the_bug_float64_a_missing_diagonal_and_unsplit_sums(capsys):
    from minisparse.kda.exercises import _intra_reference, buggy_intra_products, check_intra_products
    from minisparse.testing import ExerciseError

    def range_sums(x, k, g):  # float32, each exponent a sum of the gates over its range
        L = x.shape[0]
        P = torch.zeros(L, L)
        for i in range(L):
            span = torch.cat([g[1:i + 1].flip(0).cumsum(0).flip(0), torch.zeros(1, g.shape[1])])
            P[i, :i + 1] = (x[i] * k[:i + 1] * span.exp()).sum(-1)
        return P

    check_intra_products(range_sums)
    assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(ExerciseError, match="relative RMS"):  # differences of float32 cumulative sums
        check_intra_products(buggy_intra_products)
    with pytest.raises(ExerciseError, match="float64"):  # exact, but not in float32
        check_intra_products(_intra_reference)
    with pytest.raises(ExerciseError):
        check_intra_products(lambda x, k, g: range_sums(x, k, g).tril(-1))

    def segment_sums32(x, k, g):  # section 6.2's [L, L, K] form, right in float32 but not split
        L = x.shape[0]
        after = ~torch.ones(L, L, dtype=torch.bool).tril().T
        D = torch.where(after[:, :, None], g[:, None, :], 0.0).cumsum(0)
        decay = torch.where(torch.ones(L, L, dtype=torch.bool).tril()[:, :, None], D, -torch.inf).exp()
        return torch.einsum("ic,jc,ijc->ij", x, k, decay)

    with pytest.raises(ExerciseError, match=r"shape \(32, 32, 16\): more than 8192 elements"):
        check_intra_products(segment_sums32)
    with pytest.raises(ExerciseError, match="case 6"):  # the strong gates clamped: many gates of −25 still add up
        check_intra_products(lambda x, k, g: buggy_intra_products(x, k, g.clamp(min=-30)))

    def numpy64(x, k, g):  # exact, in float64 where the float32 rule cannot see it
        xn, kn, G = x.numpy().astype("float64"), k.numpy().astype("float64"), g.numpy().astype("float64").cumsum(0)
        return torch.tensor([[float((xn[i] * kn[j] * np.exp(G[i] - G[j])).sum()) if j <= i else 0.0
                               for j in range(len(xn))] for i in range(len(xn))], dtype=torch.float32)

    with pytest.raises(ExerciseError, match="numpy takes the numbers out of torch"):
        check_intra_products(numpy64)


def test_fact_prediction_checker_rejects_off_by_one_and_retention():
    import math

    from minisparse.kda.exercises import check_fact_prediction
    from minisparse.testing import ExerciseError

    check_fact_prediction(lambda r, T: 1 - math.exp(-r * (T - 1)))
    for wrong in (lambda r, T: 1 - math.exp(-r * T), lambda r, T: math.exp(-r * (T - 1))):
        with pytest.raises(ExerciseError):
            check_fact_prediction(wrong)


def test_fact_prediction_checker_takes_any_number_and_refuses_other_types_clearly(capsys):
    """A right prediction as a NumPy scalar or a 0-d tensor passes; a list, a string or a tensor of several values
    is refused with a message about the type, not a claim that the prediction is wrong."""
    import math

    import numpy as np

    from minisparse.kda.exercises import check_fact_prediction
    from minisparse.testing import ExerciseError

    right = lambda r, T: 1 - math.exp(-r * (T - 1))  # noqa: E731
    for wrap in (np.float32, np.float64, torch.tensor, lambda x: torch.tensor(x, dtype=torch.float64)):
        check_fact_prediction(lambda r, T: wrap(right(r, T)))
        assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(ExerciseError, match="predicted"):  # a wrong NumPy number is still wrong
        check_fact_prediction(lambda r, T: np.float32(1 - math.exp(-r * T)))
    for other in (lambda r, T: [right(r, T)], lambda r, T: str(right(r, T)), lambda r, T: torch.full((2,), 0.5)):
        with pytest.raises(ExerciseError, match=r"fn\(rate, T\) must be a number"):
            check_fact_prediction(other)


def test_kda_step_kernel_checker_rejects_a_scalar_decay_and_a_late_decay():
    import triton
    import triton.language as tl

    from minisparse.kda.exercises import check_kda_step_kernel
    from minisparse.testing import ExerciseError

    def make(variant):
        @triton.jit
        def kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, o_ptr, scale, K, V, BK: tl.constexpr,
                   BV: tl.constexpr, VARIANT: tl.constexpr):
            hv = tl.program_id(0)
            ks, vs = tl.arange(0, BK), tl.arange(0, BV)
            km, vm = ks < K, vs < V
            q = tl.load(q_ptr + hv * K + ks, mask=km, other=0.0)
            k = tl.load(k_ptr + hv * K + ks, mask=km, other=0.0)
            g = tl.load(g_ptr + hv * K + ks, mask=km, other=0.0)
            v = tl.load(v_ptr + hv * V + vs, mask=vm, other=0.0)
            beta = tl.load(beta_ptr + hv)
            s_off, s_mask = hv * K * V + ks[:, None] * V + vs[None, :], km[:, None] & vm[None, :]
            S = tl.load(s_ptr + s_off, mask=s_mask, other=0.0)
            if VARIANT == 0:  # right
                S = S * tl.exp(g)[:, None]
                S = S + k[:, None] * (beta * (v - tl.sum(k[:, None] * S, axis=0)))[None, :]
            elif VARIANT == 1:  # one decay for the whole head (GDN's)
                S = S * tl.exp(tl.sum(g, axis=0) / K)
                S = S + k[:, None] * (beta * (v - tl.sum(k[:, None] * S, axis=0)))[None, :]
            else:  # write first, decay after
                S = S + k[:, None] * (beta * (v - tl.sum(k[:, None] * S, axis=0)))[None, :]
                S = S * tl.exp(g)[:, None]
            o = tl.sum(q[:, None] * S, axis=0) * scale
            tl.store(s_ptr + s_off, S, mask=s_mask)
            tl.store(o_ptr + hv * V + vs, o, mask=vm)

        class Bound:  # kernel[grid](...) with VARIANT fixed
            def __getitem__(self, grid):
                return lambda *a, **kw: kernel[grid](*a, VARIANT=variant, **kw)
        return Bound()

    check_kda_step_kernel(make(0))
    for variant in (1, 2):
        with pytest.raises(ExerciseError, match="KDA step kernel"):
            check_kda_step_kernel(make(variant))


def test_chunk_kda_backward_falls_back_to_pytorch_where_the_kernels_do_not_fit(monkeypatch):
    """On a GPU with too little shared memory (a T4) runtime.launch raises; the backward then recomputes the
    gradients with the PyTorch chunk form, with a warning, instead of failing."""
    from minisparse.kda import chunk, chunk_kda

    def too_large(*args, **kwargs):
        raise runtime.SharedMemoryError("kda.bwd_states: the kernel needs more shared memory than this GPU gives a "
                                        "block")

    monkeypatch.setattr(chunk, "_kda_backward", too_large)
    inputs = _inputs(1, 40, 1, 2, 16, 16, normalise=False, device=_device())
    for x in inputs:
        x.requires_grad_(True)
    o_r, s_r = naive_recurrent_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True)
    o, s = chunk_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True)
    with pytest.warns(RuntimeWarning, match=r"chunk_kda: .*its PyTorch form .*\[64, 64, K\] tensors, about 1 MiB"):
        grads = _grads(o, s, inputs)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), _grads(o_r, s_r, inputs), grads):
        assert_close(name, a, b, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the launch table's GPU rows run on a GPU")
def test_every_configuration_of_the_kda_rows_computes_the_same_result():
    """Each configuration a GPU's kda.* row may fall back to, and each of the T4's row (sm_75: they run on any newer
    GPU), forced in turn, gives the table's first configuration's output and gradients (a configuration that
    miscompiles — 8 warps in the reverse scan hit illegal memory accesses at K = 128 on the H200 and the H100 — must
    not sit in a row)."""
    from minisparse.kda import chunk_kda

    inputs = _inputs(1, 200, 2, 4, 128, 128, device="cuda")
    low = [x.to(torch.bfloat16) if i < 3 else x for i, x in enumerate(inputs)]
    for x in low:
        x.requires_grad_(True)

    def run():
        o, s = chunk_kda(*low[:5], initial_state=low[5], output_final_state=True, use_qk_l2norm=True)
        return (o, s, *_grads(o, s, low))

    reference = run()
    rows = [r for r in runtime.LAUNCH_TABLE if r.startswith("kda.") and r != "kda.fused_recurrent"]
    for row in rows:
        ours = runtime.launch_configs(row, "cuda", torch.bfloat16)
        t4 = [c for c in runtime.LAUNCH_TABLE[row].get("sm_75", []) if c not in ours]
        for config in ours[1:] + t4:
            with runtime.launch_config(row, **config):
                got = run()
            torch.cuda.synchronize()
            for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dh0"), reference, got):
                assert_close(f"{row} {config} {name}", a, b, 1e-3)


def test_the_ablation_script_still_finds_every_part_it_removes():
    """bench/notes/kda_ablate.py removes parts of the kernels by text substitution: each text must still be in the
    exported kernels, or the script would time the unchanged kernel under a part's name."""
    spec = importlib.util.spec_from_file_location("kda_ablate", ROOT / "bench/notes/kda_ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    fwd, bwd = ablate.FWD.read_text(), ablate.BWD.read_text()
    for part in ablate.PARTS:
        f, b = ablate.sources(part, fwd, bwd)
        assert (f, b) != (fwd, bwd), part
    with pytest.raises(SystemExit, match="fwd-walk"):
        ablate.sources("fwd-walk", fwd.replace("for d in range(1, BC):", "for d in range(1, BC, 1):"), bwd)
