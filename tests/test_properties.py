"""Property tests: every Triton op of chapters 1-5 against its naive spec, on shapes and dtypes hypothesis draws.

The parametrised tests of each chapter pin the shapes their authors thought of; here hypothesis draws them: sequence
lengths from 1 to 200 (not multiples of any tile), head dims from {16, 24, 32, 48, 64, 128} (24 and 48 are padded
inside the kernels), grouped heads (GQA for attention, HV ≠ H value heads for the delta rule), Tq ≤ Tk, windows,
ragged cache lengths, empty experts, initial states and the dtypes the device computes in. Each op is compared with
its spec computed in fp32 on the same (rounded) inputs, within `minisparse.testing.TOLERANCES`, forward for every op
and gradients for the differentiable ones, with kernel-allocated buffers NaN-poisoned (`poisoned`, conftest.py).

On a CPU the kernels run in Triton's interpreter: fp32 and fp16 (never bf16, whose interpreted `tl.dot` is wrong),
and the example budgets below keep the module to a few minutes there. Examples are derandomised, so CI draws the
same ones every run; a failure prints the drawn case, which reproduces it exactly.
"""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minisparse  # noqa: F401  (sets up the runtime: the Triton interpreter on a machine without a GPU)
from minisparse.attention import attention_ref, flash_attention
from minisparse.deltanet import (chunk_delta_rule, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                 naive_recurrent_delta_rule, naive_recurrent_gated_delta_rule)
from minisparse.lightning import (chunk_lightning_attn, fused_recurrent_lightning_attn,
                                  naive_recurrent_lightning_attn)
from minisparse.mla import mla_decode, mla_decode_ref
from minisparse.moe import grouped_mm
from minisparse.testing import TOLERANCES, assert_close, make_log_gates, seeded

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes fp32 and fp16 correctly, bf16 dots wrongly (the ops refuse bf16 there).
DTYPES = [torch.float32, torch.float16] if DEV == "cpu" else [torch.float16, torch.bfloat16]
DIMS = [16, 24, 32, 48, 64, 128]


def examples(max_examples: int) -> settings:
    """Hypothesis settings drawing `max_examples` cases: deterministic (derandomize, no example database) and
    without time limits (the interpreter is slow). `poisoned` is a function-scoped fixture shared by the examples of
    one test, which is what we want. The budgets are set per op to keep the module within ~3 minutes on a 2-core
    CPU: fewest examples for the delta rule, whose kernels are the slowest in the interpreter, most for attention,
    MoE and MLA."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])




# ----------------------------------------------------------------------------------------------- helpers
def _randn(seed: int, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Standard normal × scale, drawn in fp32 on the CPU from `seed` (same values on any device), then cast."""
    return (scale * torch.randn(*shape, generator=seeded(seed))).to(DEV, dtype)


def _fp32(*xs):
    """The spec's inputs: the op's (rounded) inputs in fp32."""
    return [None if x is None else x.float() for x in xs]


def _cotangent(seed: int, like: torch.Tensor) -> torch.Tensor:
    """fp32 weights for a scalar loss ⟨out, w⟩, rounded through `like`'s dtype so both sides see the same values."""
    return _randn(seed, *like.shape).to(like.dtype).float()


def _grads(fn, leaves, seed: int, **kw):
    """fn(*leaves, **kw) -> (outputs, gradients of Σ ⟨output_i, w_i⟩ with respect to each leaf that is not None).

    `fn` returns a tensor or a tuple of tensors/None; the weights w_i come from `seed`, so the op and its spec get
    the same loss."""
    xs = [None if x is None else x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*xs, **kw)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * _cotangent(seed + i, o)).sum() for i, o in enumerate(out) if o is not None)
    loss.backward()
    return out, [x.grad for x in xs if x is not None]


def _compare(names, ref, got, dtype, which: int):
    """assert_close on each pair with TOLERANCES[dtype][which] (0: forward, 1: gradients)."""
    for name, r, g in zip(names, ref, got):
        if r is None:
            assert g is None, f"{name}: expected None, got {type(g).__name__}"
            continue
        assert g is not None, f"{name}: missing"
        assert_close(f"{name} ({dtype})", r, g, TOLERANCES[dtype][which])


seeds = st.integers(0, 2**16)


# ---------------------------------------------------------------------------------------- 1. attention
@st.composite
def attention_cases(draw, max_tk: int):
    causal = draw(st.booleans())
    tk = draw(st.integers(1, max_tk))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), B=draw(st.integers(1, 2)), HKV=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 3)), DK=draw(st.sampled_from(DIMS)), DV=draw(st.sampled_from(DIMS)),
        Tq=draw(st.integers(1, tk)), Tk=tk, causal=causal,
        window=draw(st.none() | st.integers(1, tk + 4)) if causal else None,
        scale=draw(st.none() | st.sampled_from([0.05, 0.3, 1.0])), seed=draw(seeds))


def _attention_inputs(c):
    HQ = c["HKV"] * c["group"]
    q = _randn(c["seed"], c["B"], c["Tq"], HQ, c["DK"], dtype=c["dtype"])
    k = _randn(c["seed"] + 1, c["B"], c["Tk"], c["HKV"], c["DK"], dtype=c["dtype"])
    v = _randn(c["seed"] + 2, c["B"], c["Tk"], c["HKV"], c["DV"], dtype=c["dtype"])
    return (q, k, v), dict(causal=c["causal"], scale=c["scale"], window=c["window"])


@examples(40)
@given(c=attention_cases(max_tk=200))
def test_flash_attention_matches_attention_ref(poisoned, c):
    (q, k, v), kw = _attention_inputs(c)
    o = flash_attention(q, k, v, **kw)
    assert o.dtype == c["dtype"]
    _compare(["o"], [attention_ref(*_fp32(q, k, v), **kw)], [o], c["dtype"], 0)


@examples(20)
@given(c=attention_cases(max_tk=100))
def test_flash_attention_gradients_match_attention_ref(poisoned, c):
    (q, k, v), kw = _attention_inputs(c)
    out, grads = _grads(flash_attention, (q, k, v), c["seed"] + 3, **kw)
    ref_out, ref_grads = _grads(attention_ref, _fp32(q, k, v), c["seed"] + 3, **kw)
    assert all(g.dtype == c["dtype"] for g in grads)
    _compare(["o"], ref_out, out, c["dtype"], 0)
    _compare(["dq", "dk", "dv"], ref_grads, grads, c["dtype"], 1)


# ---------------------------------------------------------------------------------------------- 2. moe
@st.composite
def grouped_mm_cases(draw, max_rows: int):
    G = draw(st.integers(1, 6))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), K=draw(st.sampled_from(DIMS)), N=draw(st.sampled_from(DIMS)),
        counts=draw(st.lists(st.just(0) | st.integers(1, max_rows), min_size=G, max_size=G)),
        w_transposed=draw(st.booleans()), seed=draw(seeds))


def _grouped_mm_inputs(c):
    G, K, N = len(c["counts"]), c["K"], c["N"]
    x = _randn(c["seed"], sum(c["counts"]), K, dtype=c["dtype"])
    if c["w_transposed"]:  # transformers' [E, out, in] expert weights, viewed as [E, in, out]
        w = _randn(c["seed"] + 1, G, N, K, dtype=c["dtype"], scale=K ** -0.5).transpose(1, 2)
    else:
        w = _randn(c["seed"] + 1, G, K, N, dtype=c["dtype"], scale=K ** -0.5)
    offsets = torch.tensor(c["counts"], dtype=torch.int64).cumsum(0).to(DEV, torch.int32)
    return x, w, offsets


def _per_group_matmul(x, w, offsets):
    """The grouped GEMM as one matmul per group: rows offsets[g-1]:offsets[g] of x times w[g]."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[a:b] @ w[g] for g, (a, b) in enumerate(zip(starts, ends))] + [x.new_zeros(0, w.shape[2])])


@examples(40)
@given(c=grouped_mm_cases(max_rows=60))
def test_grouped_mm_matches_per_group_matmul(poisoned, c):
    x, w, offsets = _grouped_mm_inputs(c)
    y = grouped_mm(x, w, offsets)
    assert y.dtype == c["dtype"]
    _compare(["y"], [_per_group_matmul(*_fp32(x, w), offsets)], [y], c["dtype"], 0)


@examples(20)
@given(c=grouped_mm_cases(max_rows=40))
def test_grouped_mm_gradients_match_per_group_matmul(poisoned, c):
    x, w, offsets = _grouped_mm_inputs(c)
    out, grads = _grads(lambda x, w: grouped_mm(x, w, offsets), (x, w), c["seed"] + 2)
    ref_out, ref_grads = _grads(lambda x, w: _per_group_matmul(x, w, offsets), _fp32(x, w), c["seed"] + 2)
    _compare(["y"], ref_out, out, c["dtype"], 0)
    _compare(["dx", "dw"], ref_grads, grads, c["dtype"], 1)


# ---------------------------------------------------------------------------------------------- 3. mla
@st.composite
def mla_cases(draw):
    B, T, S = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(4, 200))
    ragged = draw(st.booleans())
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), B=B, T=T, H=draw(st.integers(1, 8)), Dc=draw(st.sampled_from(DIMS)),
        Dr=draw(st.sampled_from([16, 32, 64])), S=S,
        lengths=draw(st.lists(st.integers(T, S), min_size=B, max_size=B)) if ragged else None,
        scale=draw(st.sampled_from([0.05, 0.1, 0.3])), seed=draw(seeds))


@examples(40)
@given(c=mla_cases())
def test_mla_decode_matches_mla_decode_ref(poisoned, c):
    B, T, H, S, dtype, seed = c["B"], c["T"], c["H"], c["S"], c["dtype"], c["seed"]
    q_latent = _randn(seed, B, T, H, c["Dc"], dtype=dtype)
    q_rope = _randn(seed + 1, B, T, H, c["Dr"], dtype=dtype)
    kv_cache = _randn(seed + 2, B, S, c["Dc"], dtype=dtype)
    rope_cache = _randn(seed + 3, B, S, c["Dr"], dtype=dtype)
    lengths = None if c["lengths"] is None else torch.tensor(c["lengths"], device=DEV)
    with torch.no_grad():
        o = mla_decode(q_latent, q_rope, kv_cache, rope_cache, c["scale"], lengths)
        ref = mla_decode_ref(*_fp32(q_latent, q_rope, kv_cache, rope_cache), c["scale"], lengths)
    assert o.dtype == dtype
    _compare(["o_latent"], [ref], [o], dtype, 0)


# ----------------------------------------------------------------------------------------- 4. lightning
@st.composite
def lightning_cases(draw, max_t: int):
    H = draw(st.integers(1, 3))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), B=draw(st.integers(1, 2)), T=draw(st.integers(1, max_t)), H=H,
        K=draw(st.sampled_from(DIMS)), V=draw(st.sampled_from(DIMS)),
        # decay rates from 1e-3 (almost no decay) to 2 (e^-2 a token), log-uniform like MiniMax's per-head slopes
        log10_slope=draw(st.lists(st.floats(-3.0, 0.3), min_size=H, max_size=H)),
        scale=draw(st.none() | st.sampled_from([0.1, 1.0])), initial_state=draw(st.booleans()),
        output_final_state=draw(st.booleans()), seed=draw(seeds))


def _lightning_inputs(c):
    B, T, H, K, V, dtype, seed = c["B"], c["T"], c["H"], c["K"], c["V"], c["dtype"], c["seed"]
    q = _randn(seed, B, T, H, K, dtype=dtype)
    k = _randn(seed + 1, B, T, H, K, dtype=dtype)
    v = _randn(seed + 2, B, T, H, V, dtype=dtype)
    h0 = _randn(seed + 3, B, H, K, V, scale=0.5) if c["initial_state"] else None
    slope = (10 ** torch.tensor(c["log10_slope"], dtype=torch.float32)).to(DEV)
    return (q, k, v, h0), slope, dict(scale=c["scale"], output_final_state=c["output_final_state"])


def _lightning(fn, slope):
    """fn with the slopes bound (they are fixed rates, not leaves) and the initial state as a positional leaf."""
    return lambda q, k, v, h0, **kw: fn(q, k, v, slope, initial_state=h0, **kw)


@examples(30)
@given(c=lightning_cases(max_t=200))
def test_chunk_lightning_attn_matches_naive_recurrent(poisoned, c):
    xs, slope, kw = _lightning_inputs(c)
    o, s = _lightning(chunk_lightning_attn, slope)(*xs, **kw)
    ref = _lightning(naive_recurrent_lightning_attn, slope)(*_fp32(*xs), **kw)
    assert o.dtype == c["dtype"]
    _compare(["o", "final state"], ref, (o, s), c["dtype"], 0)


@examples(15)
@given(c=lightning_cases(max_t=100))
def test_fused_recurrent_lightning_attn_matches_naive_recurrent(poisoned, c):
    xs, slope, kw = _lightning_inputs(c)
    with torch.no_grad():
        o, s = _lightning(fused_recurrent_lightning_attn, slope)(*xs, **kw)
        ref = _lightning(naive_recurrent_lightning_attn, slope)(*_fp32(*xs), **kw)
    assert o.dtype == c["dtype"]
    _compare(["o", "final state"], ref, (o, s), c["dtype"], 0)


@examples(15)
@given(c=lightning_cases(max_t=150))
def test_chunk_lightning_attn_gradients_match_naive_recurrent(poisoned, c):
    xs, slope, kw = _lightning_inputs(c)
    out, grads = _grads(_lightning(chunk_lightning_attn, slope), xs, c["seed"] + 4, **kw)
    ref_out, ref_grads = _grads(_lightning(naive_recurrent_lightning_attn, slope), _fp32(*xs), c["seed"] + 4, **kw)
    _compare(["o", "final state"], ref_out, out, c["dtype"], 0)
    _compare(["dq", "dk", "dv", "dh0"], ref_grads, grads, c["dtype"], 1)


# ------------------------------------------------------------------------------------------ 5. deltanet
@st.composite
def delta_rule_cases(draw, max_t: int):
    H = draw(st.integers(1, 2))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), B=draw(st.integers(1, 2)), T=draw(st.integers(1, max_t)), H=H,
        HV=H * draw(st.integers(1, 3)), K=draw(st.sampled_from(DIMS)), V=draw(st.sampled_from(DIMS)),
        use_qk_l2norm=draw(st.booleans()), initial_state=draw(st.booleans()),
        output_final_state=draw(st.booleans()), seed=draw(seeds))


def _delta_rule_inputs(c):
    """q, k, v, g ∈ [-5, 0], β ∈ [0, 1], h0. Without the in-kernel l2norm, q and k come unit-norm (the delta rule
    is a contraction only for ‖k‖ = 1 and β ≤ 2); with it, any norm."""
    B, T, H, HV, K, V, dtype, seed = (c[n] for n in ("B", "T", "H", "HV", "K", "V", "dtype", "seed"))
    q, k = _randn(seed, B, T, H, K), _randn(seed + 1, B, T, H, K)
    if not c["use_qk_l2norm"]:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = _randn(seed + 2, B, T, HV, V, dtype=dtype)
    g = make_log_gates(B, T, HV, low=-5.0, high=0.0, seed=seed + 3).to(DEV)
    beta = torch.rand(B, T, HV, generator=seeded(seed + 4)).to(DEV)
    h0 = _randn(seed + 5, B, HV, K, V, scale=0.5) if c["initial_state"] else None
    kw = dict(use_qk_l2norm=c["use_qk_l2norm"], output_final_state=c["output_final_state"])
    return (q.to(dtype), k.to(dtype), v, g, beta, h0), kw


def _gated(fn):
    return lambda q, k, v, g, beta, h0, **kw: fn(q, k, v, g, beta, initial_state=h0, **kw)


def _ungated(fn):
    return lambda q, k, v, beta, h0, **kw: fn(q, k, v, beta, initial_state=h0, **kw)


@examples(12)
@given(c=delta_rule_cases(max_t=200))
def test_chunk_gated_delta_rule_matches_naive_recurrent(poisoned, c):
    xs, kw = _delta_rule_inputs(c)
    o, s = _gated(chunk_gated_delta_rule)(*xs, **kw)
    ref = _gated(naive_recurrent_gated_delta_rule)(*_fp32(*xs), **kw)
    assert o.dtype == c["dtype"]
    _compare(["o", "final state"], ref, (o, s), c["dtype"], 0)


@examples(12)
@given(c=delta_rule_cases(max_t=200))
def test_chunk_delta_rule_matches_naive_recurrent(poisoned, c):
    (q, k, v, _, beta, h0), kw = _delta_rule_inputs(c)
    o, s = _ungated(chunk_delta_rule)(q, k, v, beta, h0, **kw)
    ref = _ungated(naive_recurrent_delta_rule)(*_fp32(q, k, v, beta, h0), **kw)
    assert o.dtype == c["dtype"]
    _compare(["o", "final state"], ref, (o, s), c["dtype"], 0)


@examples(8)
@given(c=delta_rule_cases(max_t=64))
def test_fused_recurrent_gated_delta_rule_matches_naive_recurrent(poisoned, c):
    xs, kw = _delta_rule_inputs(c)
    with torch.no_grad():
        o, s = _gated(fused_recurrent_gated_delta_rule)(*xs, **kw)
        ref = _gated(naive_recurrent_gated_delta_rule)(*_fp32(*xs), **kw)
    assert o.dtype == c["dtype"]
    _compare(["o", "final state"], ref, (o, s), c["dtype"], 0)


@examples(6)
@given(c=delta_rule_cases(max_t=130))
def test_chunk_gated_delta_rule_gradients_match_naive_recurrent(poisoned, c):
    xs, kw = _delta_rule_inputs(c)
    out, grads = _grads(_gated(chunk_gated_delta_rule), xs, c["seed"] + 6, **kw)
    ref_out, ref_grads = _grads(_gated(naive_recurrent_gated_delta_rule), _fp32(*xs), c["seed"] + 6, **kw)
    _compare(["o", "final state"], ref_out, out, c["dtype"], 0)
    names = ["dq", "dk", "dv", "dg", "dbeta", "dh0"][:len(ref_grads)]
    _compare(names, ref_grads, grads, c["dtype"], 1)


@examples(6)
@given(c=delta_rule_cases(max_t=130))
def test_chunk_delta_rule_gradients_match_naive_recurrent(poisoned, c):
    (q, k, v, _, beta, h0), kw = _delta_rule_inputs(c)
    out, grads = _grads(_ungated(chunk_delta_rule), (q, k, v, beta, h0), c["seed"] + 6, **kw)
    ref_out, ref_grads = _grads(_ungated(naive_recurrent_delta_rule), _fp32(q, k, v, beta, h0), c["seed"] + 6,
                                **kw)
    _compare(["o", "final state"], ref_out, out, c["dtype"], 0)
    names = ["dq", "dk", "dv", "dbeta", "dh0"][:len(ref_grads)]
    _compare(names, ref_grads, grads, c["dtype"], 1)
