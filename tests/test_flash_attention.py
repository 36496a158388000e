"""Tests of the flash attention Triton kernels (forward and the three gradients).

On a machine without a GPU the kernels run in Triton's interpreter (float32, CPU); with CUDA the same cases
run on the GPU in bfloat16, float16 and float32. Every test runs with the `poisoned` fixture (tests/conftest.py):
the op's outputs start as NaN, so an element a kernel forgets to write shows up as a NaN. Tests that need small
or unequal tiles force them with `runtime.launch_config`.
"""

import contextlib
import random

import pytest
import torch

import minisparse.attention.triton as fa  # `import minisparse` switches on the interpreter without a GPU
from minisparse import runtime
from minisparse.attention import attention_ref
from minisparse.testing import assert_close, make_qkv

flash_attention = fa.flash_attention
pytestmark = pytest.mark.usefixtures("poisoned")

INTERPRET = runtime.interpreting()
if INTERPRET:
    SETTINGS = [("cpu", torch.float32)]
else:
    SETTINGS = [("cuda", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.float32)]
SETTING_IDS = [f"{d}-{str(t).removeprefix('torch.')}" for d, t in SETTINGS]
# relative RMS error bounds: (forward, gradients)
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-3, 8e-3), torch.float16: (5e-3, 8e-3)}


# ----------------------------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------------------------
def visible_mask(Tq, Tk, causal, window, device=None):
    """[Tq, Tk] bool: query i (at position i + Tk - Tq) sees key s."""
    pos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    s = torch.arange(Tk, device=device)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        keep &= s <= pos
    if window is not None:
        keep &= s > pos - window
    return keep


def reference_attention(q, k, v, causal=True, scale=None, window=None):
    """Plain softmax attention with an explicit mask; q [B,Tq,HQ,DK], k [B,Tk,HKV,DK], v [B,Tk,HKV,DV]."""
    B, Tq, HQ, DK = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    scale = DK**-0.5 if scale is None else scale
    k = k.repeat_interleave(HQ // HKV, dim=2)  # [B, Tk, HQ, DK]
    v = v.repeat_interleave(HQ // HKV, dim=2)  # [B, Tk, HQ, DV]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [B, HQ, Tq, Tk]
    scores = scores.masked_fill(~visible_mask(Tq, Tk, causal, window, q.device), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)  # [B, Tq, HQ, DV]


def rel_rms(actual, expected):
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def make_inputs(B, Tq, Tk, HQ, HKV, DK, DV, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(B, Tq, HQ, DK), (B, Tk, HKV, DK), (B, Tk, HKV, DV), (B, Tq, HQ, DV)]
    q, k, v, do = (torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)
    return q, k, v, do


def run_both(q, k, v, do, causal, scale=None, window=None):
    """Kernel outputs and gradients, and the reference's computed in higher precision from the same inputs."""
    ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    o = flash_attention(qa, ka, va, causal=causal, scale=scale, window=window)
    grads = torch.autograd.grad(o, (qa, ka, va), do)
    qr, kr, vr = (x.to(ref_dtype).requires_grad_() for x in (q, k, v))
    o_ref = reference_attention(qr, kr, vr, causal=causal, scale=scale, window=window)
    grads_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.to(ref_dtype))
    return (o, *grads), (o_ref, *grads_ref)


def check_against_reference(got, want, dtype):
    fwd_tol, grad_tol = TOLERANCE[dtype]
    for name, a, b, tol in zip(("o", "dq", "dk", "dv"), got, want, (fwd_tol, grad_tol, grad_tol, grad_tol)):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert not torch.isnan(a).any(), f"{name}: NaN (an element the kernel never wrote?)"
        err = rel_rms(a, b)
        assert err <= tol, f"{name}: relative RMS error {err:.2e} > {tol:.0e}"


@contextlib.contextmanager
def forced_tiles(fwd, dkdv, dq):
    """Force (BLOCK_M, BLOCK_N) of the three tiled kernels (rows "attention.fwd", ".dkdv", ".dq"; head dims <= 128),
    with 4 warps and one stage so that small tiles compile on any GPU."""
    with contextlib.ExitStack() as stack:
        for kernel, (block_m, block_n) in (("attention.fwd", fwd), ("attention.dkdv", dkdv), ("attention.dq", dq)):
            stack.enter_context(runtime.launch_config(kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                                                      num_stages=1))
        yield


# ----------------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------------
#        B,  Tq,  Tk, HQ, HKV, DK, DV, causal, window
CASES = [
    (2, 37, 37, 2, 2, 64, 64, True, None),  # T not a multiple of the tile; two batches
    (1, 100, 100, 4, 2, 80, 80, True, None),  # head dim 80 padded to 128; GQA 4:2
    (1, 129, 129, 4, 1, 32, 32, True, None),  # MQA (one K/V head), T = 2 tiles + 1
    (1, 129, 129, 2, 1, 32, 64, False, None),  # non-causal, DV != DK
    (1, 100, 100, 4, 2, 64, 64, True, 16),  # sliding window
    (1, 37, 100, 2, 2, 48, 48, True, None),  # Tq < Tk (queries are the last 37 positions)
    (1, 20, 129, 4, 2, 32, 48, True, 16),  # Tq < Tk with a window, DV != DK
    (1, 37, 100, 2, 1, 32, 32, False, None),  # Tq < Tk, non-causal
    (1, 1, 37, 2, 1, 64, 64, True, None),  # one query (decoding)
]
GPU_CASES = [  # realistic tiles on the GPU only: too slow for the interpreter
    (2, 1000, 1000, 8, 2, 128, 128, True, None),
    (1, 1000, 1000, 4, 4, 128, 128, True, 256),
    (1, 500, 1000, 4, 1, 64, 64, True, None),
    (1, 700, 700, 2, 2, 96, 96, False, None),
    (1, 300, 300, 2, 1, 256, 256, True, None),
    (1, 300, 300, 2, 2, 48, 192, True, 100),
]


def case_id(case):
    B, Tq, Tk, HQ, HKV, DK, DV, causal, window = case
    mask = ("causal" if causal else "full") + (f"-w{window}" if window else "")
    return f"B{B}-T{Tq}x{Tk}-H{HQ}:{HKV}-D{DK}:{DV}-{mask}"


# fp32 on the GPU runs the big GPU cases too slowly to compile (exact fp32 products are unrolled FMAs): 16-bit only
REFERENCE_RUNS = [(case, device, dtype) for device, dtype in SETTINGS
                  for case in CASES + ([] if INTERPRET or dtype == torch.float32 else GPU_CASES)]


@pytest.mark.parametrize("case,device,dtype", REFERENCE_RUNS,
                         ids=[f"{case_id(c)}-{d}-{str(t).removeprefix('torch.')}" for c, d, t in REFERENCE_RUNS])
def test_matches_reference(case, device, dtype):
    B, Tq, Tk, HQ, HKV, DK, DV, causal, window = case
    q, k, v, do = make_inputs(B, Tq, Tk, HQ, HKV, DK, DV, device, dtype)
    got, want = run_both(q, k, v, do, causal, window=window)
    check_against_reference(got, want, dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", [c for c in CASES if c[1] == c[2]], ids=case_id)
def test_matches_sdpa(case, device, dtype):
    """An independent oracle: PyTorch's scaled_dot_product_attention on [B, H, T, D] (Tq == Tk only)."""
    B, T, _, HQ, HKV, DK, DV, causal, window = case
    q, k, v, _ = make_inputs(B, T, T, HQ, HKV, DK, DV, device, dtype, seed=1)
    o = flash_attention(q, k, v, causal=causal, window=window)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    qh, kh, vh = (x.to(ref_dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    kh, vh = kh.repeat_interleave(HQ // HKV, 1), vh.repeat_interleave(HQ // HKV, 1)
    if window is None:
        o_ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    else:
        mask = visible_mask(T, T, causal, window, q.device)
        o_ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    err = rel_rms(o, o_ref.transpose(1, 2))
    assert err <= TOLERANCE[dtype][0], f"relative RMS error vs SDPA {err:.2e}"


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", [
    (1, 100, 100, 2, 1, 32, 32, True, 40),  # window spans several 16-tiles: masked, interior, masked loops
    (1, 70, 100, 2, 2, 32, 16, True, 33),
    (1, 100, 100, 2, 1, 32, 32, True, None),
    (1, 50, 90, 4, 2, 16, 32, False, None),
], ids=case_id)
def test_small_tiles(case, device, dtype):
    """16 x 16 tiles make every loop (boundary before, interior, boundary after) run at small T."""
    B, Tq, Tk, HQ, HKV, DK, DV, causal, window = case
    q, k, v, do = make_inputs(B, Tq, Tk, HQ, HKV, DK, DV, device, dtype, seed=2)
    with forced_tiles((16, 16), (16, 16), (16, 16)):
        got, want = run_both(q, k, v, do, causal, window=window)
    check_against_reference(got, want, dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_tiles(seed, device, dtype):
    """Random lengths, heads, windows and (unequal) tile sizes: the loop bounds must hold for all of them."""
    rnd = random.Random(seed)
    Tk = rnd.randint(2, 90)
    Tq = rnd.randint(1, Tk)
    HKV = rnd.choice([1, 2])
    HQ = HKV * rnd.choice([1, 2])
    DK, DV = rnd.choice([16, 24, 32]), rnd.choice([16, 40])
    causal = seed % 4 != 3
    window = rnd.choice([None, 3, 17, 40]) if causal else None
    q, k, v, do = make_inputs(1, Tq, Tk, HQ, HKV, DK, DV, device, dtype, seed=seed)
    fwd, dkdv, dq = ((rnd.choice([16, 32]), rnd.choice([16, 32])) for _ in range(3))
    with forced_tiles(fwd, dkdv, dq):
        got, want = run_both(q, k, v, do, causal, window=window)
    check_against_reference(got, want, dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
def test_single_token(device, dtype):
    """Tq = Tk = 1: the output is v; only dv is non-zero."""
    q, k, v, do = make_inputs(2, 1, 1, 2, 1, 32, 32, device, dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    torch.testing.assert_close(o, v.expand(2, 1, 2, 32))
    torch.testing.assert_close(dv, do.sum(2, keepdim=True))
    assert dq.abs().max() < 1e-3 and dk.abs().max() < 1e-3


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
def test_a_call_without_gradients_builds_no_graph_and_gives_the_same_output(device, dtype):
    """Nothing to differentiate (no_grad, or no input that requires a gradient): the kernel runs without an autograd
    node — less host time — and gives the same output, bit for bit; one input that needs a gradient gets the node."""
    q, k, v, _ = make_inputs(1, 37, 37, 4, 2, 32, 24, device, dtype, seed=5)
    plain = flash_attention(q, k, v)
    assert plain.grad_fn is None
    with torch.no_grad():
        assert torch.equal(flash_attention(q, k, v.clone().requires_grad_()), plain)
    for i in range(3):
        args = [x.clone().requires_grad_(j == i) for j, x in enumerate((q, k, v))]
        o = flash_attention(*args)
        assert type(o.grad_fn).__name__ == "FlashAttentionFunctionBackward" and torch.equal(o, plain)


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
def test_window_reduces_to_causal(device, dtype):
    """A window at least as long as the keys changes nothing, output and gradients, up to the largest int32 window
    (2**31 - 1: a key's position plus the window would wrap in 32 bits)."""
    q, k, v, do = make_inputs(1, 37, 37, 2, 1, 32, 32, device, dtype, seed=3)
    plain, _ = run_both(q, k, v, do, causal=True)
    for window in (37, 1000, 2**31 - 1):
        got, _ = run_both(q, k, v, do, causal=True, window=window)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"window {window}: {name}")


@pytest.mark.parametrize("device,dtype", SETTINGS, ids=SETTING_IDS)
def test_scale_and_layout(device, dtype):
    """A custom scale, and non-contiguous inputs (a [B, H, T, D] tensor transposed to [B, T, H, D])."""
    q, k, v, do = make_inputs(1, 37, 37, 2, 2, 32, 32, device, dtype, seed=4)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    got, want = run_both(q, k, v, do, causal=True, scale=0.3)
    check_against_reference(got, want, dtype)


# ----------------------------------------------------------------------------------------------------------------
# The launch path: one row of runtime.LAUNCH_TABLE a kernel, forced configurations really used
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Record (table row, configuration used) of every runtime.launch the op makes."""
    calls, real = [], runtime.launch

    def recording(kernel, *args, **kwargs):
        config = real(kernel, *args, **kwargs)
        calls.append((kernel, config))
        return config

    monkeypatch.setattr(runtime, "launch", recording)
    return calls


@pytest.mark.parametrize("DK,DV,suffix", [(64, 64, ""), (40, 128, ""), (32, 160, ".d256"), (256, 64, ".d256")])
def test_launch_rows(launches, DK, DV, suffix):
    """Forward and backward launch through runtime.launch, on the ".d256" rows when a padded head dim exceeds 128."""
    q, k, v, do = make_inputs(1, 20, 20, 2, 1, DK, DV, SETTINGS[0][0], SETTINGS[0][1])
    q.requires_grad_()
    flash_attention(q, k, v).backward(do)
    assert [kernel for kernel, _ in launches] == [f"attention.fwd{suffix}", "attention.delta",
                                                  f"attention.dkdv{suffix}", f"attention.dq{suffix}"]


def test_launch_config_forces_tiles(launches):
    q, k, v, do = make_inputs(1, 40, 40, 2, 1, 32, 32, SETTINGS[0][0], SETTINGS[0][1])
    q.requires_grad_()
    with forced_tiles((16, 32), (32, 16), (16, 16)):
        flash_attention(q, k, v).backward(do)
    used = {kernel: (c["BLOCK_M"], c["BLOCK_N"]) for kernel, c in launches if kernel != "attention.delta"}
    assert used == {"attention.fwd": (16, 32), "attention.dkdv": (32, 16), "attention.dq": (16, 16)}


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: the kernel's own limits (tests/test_attention.py shares the reference's table with the kernel)
# ----------------------------------------------------------------------------------------------------------------
def _good(device, dtype=torch.float32):
    q, k, v, _ = make_inputs(1, 8, 8, 4, 2, 32, 32, device, dtype)
    return dict(q=q, k=k, v=v)


BAD_INPUTS = [
    # (description, mutate(args), exception, regex the message must match)
    ("q/k head dim > 256", lambda a: a.update(q=a["q"].new_zeros(1, 8, 4, 320), k=a["k"].new_zeros(1, 8, 2, 320)),
     ValueError, "q/k head dim must be <= 256 .*, got 320; use attention_ref"),
    ("v head dim > 256", lambda a: a.update(v=a["v"].new_zeros(1, 8, 2, 264)), ValueError,
     "v head dim must be <= 256 .*, got 264"),
    ("float64", lambda a: a.update(**{n: t.double() for n, t in a.items()}), TypeError,
     "q, k, v must share one dtype among float32, float16, bfloat16, got q torch.float64"),
    ("scale a tensor", lambda a: a.update(scale=torch.tensor(0.5)), ValueError, "scale must be a positive number"),
]


@pytest.mark.parametrize("desc,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise(desc, mutate, exc, match):
    args = _good(SETTINGS[0][0])
    mutate(args)
    with pytest.raises(exc, match=match):
        flash_attention(**args)


def test_mixed_devices_raise():
    if INTERPRET:
        pytest.skip("needs a second device")
    args = _good("cpu")
    with pytest.raises(ValueError, match="one device"):
        flash_attention(args["q"].cuda(), args["k"], args["v"])


def test_cpu_without_interpreter_says_how(monkeypatch):
    """Compiled Triton cannot run on CPU tensors: the error tells the reader what to do."""
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="set the environment variable TRITON_INTERPRET=1 before `import triton`"):
        flash_attention(**_good("cpu"))


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's bf16 dot is what this guards against")
def test_bf16_in_the_interpreter_raises():
    """The interpreter's bf16 tl.dot gives wrong results (triton 3.3-3.8): bf16 CPU tensors are refused, as by
    every Triton op of the book, with a message that says to use float32."""
    with pytest.raises(TypeError, match="bfloat16 under the Triton interpreter .* use float32 on CPU"):
        flash_attention(**_good("cpu", torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------------
# Loop bounds, checked exhaustively against the mask
# ----------------------------------------------------------------------------------------------------------------
import triton  # noqa: E402  (after the interpreter switch above)
import triton.language as tl  # noqa: E402


@triton.jit
def _store4(ptr, a, b, c, d):
    tl.store(ptr, a)
    tl.store(ptr + 1, b)
    tl.store(ptr + 2, c)
    tl.store(ptr + 3, d)


@triton.jit
def _bounds_kernel(KEY_RANGES, QUERY_RANGES, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Program i writes the (lo, full_lo, full_hi, hi) of query tile i and of key tile i."""
    i = tl.program_id(0)
    if i * BLOCK_M < Tq:
        lo, full_lo, full_hi, hi = fa._key_range(i * BLOCK_M, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        _store4(KEY_RANGES + 4 * i, lo, full_lo, full_hi, hi)
    if i * BLOCK_N < Tk:
        lo, full_lo, full_hi, hi = fa._query_range(i * BLOCK_N, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL,
                                                   HAS_WINDOW)
        _store4(QUERY_RANGES + 4 * i, lo, full_lo, full_hi, hi)


def check_ranges(ranges, mask, tile, other_tile):
    """ranges[i] = (lo, full_lo, full_hi, hi) for rows [i*tile, (i+1)*tile) of `mask` (visible pairs, rows x cols):
    visit exactly the column tiles holding a visible pair; tiles in [full_lo, full_hi) are entirely visible
    (and entirely inside the tensor)."""
    n_rows, n_cols = mask.shape
    for i, (lo, full_lo, full_hi, hi) in enumerate(ranges.tolist()):
        assert lo <= full_lo <= full_hi <= hi, f"tile {i}: bounds out of order {lo, full_lo, full_hi, hi}"
        assert lo % other_tile == 0 and (full_lo % other_tile == 0 or full_lo == hi), f"tile {i}: unaligned"
        rows = mask[i * tile:(i + 1) * tile]
        needed = [j for j in range(0, n_cols, other_tile) if rows[:, j:j + other_tile].any()]
        visited = list(range(lo, hi, other_tile))
        assert visited == needed, f"tile {i}: visits column tiles {visited}, needs {needed}"
        for j in range(full_lo, full_hi, other_tile):
            block = rows[:, j:j + other_tile]
            # rows past the end belong to no one; columns past the end would be read unmasked
            assert block.shape[1] == other_tile and block.all(), f"tile {i}: column tile {j} is not interior"


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 1), (True, 2), (True, 15),
                                           (True, 16), (True, 17), (True, 40), (True, 100)])
def test_loop_bounds(causal, window, block_m, block_n):
    """Each program visits exactly the tiles with a visible (query, key) pair, and unmasks only full tiles."""
    if window is not None and not INTERPRET and block_n == 32:
        pytest.skip("one tile shape suffices on the GPU")
    device = SETTINGS[0][0]
    lengths = [1, 15, 16, 17, 33, 50, 64, 70]
    for Tk in lengths:
        for Tq in [t for t in lengths if t <= Tk]:
            n = max(triton.cdiv(Tq, block_m), triton.cdiv(Tk, block_n))
            key_ranges = torch.full((n, 4), -1, dtype=torch.int32, device=device)
            query_ranges = torch.full((n, 4), -1, dtype=torch.int32, device=device)
            _bounds_kernel[(n,)](key_ranges, query_ranges, Tq, Tk, window or 0, block_m, block_n, causal,
                                 window is not None)
            mask = visible_mask(Tq, Tk, causal, window)  # [Tq, Tk]
            check_ranges(key_ranges[:triton.cdiv(Tq, block_m)].cpu(), mask, block_m, block_n)
            check_ranges(query_ranges[:triton.cdiv(Tk, block_n)].cpu(), mask.T, block_n, block_m)


# ----------------------------------------------------------------------------------------------------------------
# Inputs the reference accepts, so the kernel must too (found in review)
# ----------------------------------------------------------------------------------------------------------------
DEV = "cpu" if INTERPRET else "cuda"


def test_non_causal_with_more_queries_than_keys():
    q, k, v = make_qkv(1, 9, 2, 16, Tk=5, device=DEV)
    assert_close("o", attention_ref(q, k, v, causal=False), flash_attention(q, k, v, causal=False), 1e-4)


@pytest.mark.parametrize("B, Tq, Tk", [(0, 5, 5), (1, 0, 6), (1, 4, 0)])
def test_empty_inputs_keep_the_graph(B, Tq, Tk):
    q, k, v = make_qkv(B, Tq, 2, 16, Tk=Tk, device=DEV, requires_grad=True)
    o = flash_attention(q, k, v, causal=False)
    assert o.shape == (B, Tq, 2, 16) and o.requires_grad
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------------------------------------------
# The checks above can fail: known-wrong variants
# ----------------------------------------------------------------------------------------------------------------
def test_check_ranges_rejects_wrong_bounds():
    """Bounds that skip a needed key tile, visit an empty one, or unmask a boundary tile are caught."""
    Tq = Tk = 40
    window, device = 10, SETTINGS[0][0]
    right = torch.full((3, 4), -1, dtype=torch.int32, device=device)  # (lo, full_lo, full_hi, hi) of 3 query tiles
    _bounds_kernel[(3,)](right, torch.empty_like(right), Tq, Tk, window, 16, 16, True, True)
    right = right.cpu()
    mask = visible_mask(Tq, Tk, True, window)
    check_ranges(right, mask, 16, 16)
    assert right[0].tolist() == [0, 16, 16, 16] and right[1, 0] == 0  # tile 0: one masked key tile; tile 1 from 0
    skips, visits_empty, unmasks = right.clone(), right.clone(), right.clone()
    skips[1, 0] = 16  # query tile 1 (positions 16..31) sees keys from 7: it must visit key tile 0
    visits_empty[0, 3] = 32  # query tile 0 sees no key of tile 1
    unmasks[0, 1] = 0  # key tile 0 is query tile 0's diagonal: it needs the mask
    for wrong in (skips, visits_empty, unmasks):
        with pytest.raises(AssertionError):
            check_ranges(wrong, mask, 16, 16)


def test_reference_check_rejects_a_wrong_kernel():
    """check_against_reference fails on an unwritten (NaN) element and on a gradient off by the scale."""
    q, k, v, do = make_inputs(1, 20, 20, 2, 1, 16, 16, SETTINGS[0][0], SETTINGS[0][1])
    got, want = run_both(q, k, v, do, causal=True)
    check_against_reference(got, want, q.dtype)
    unwritten = got[0].clone()
    unwritten[0, 7, 1, 3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        check_against_reference((unwritten, *got[1:]), want, q.dtype)
    with pytest.raises(AssertionError, match="dk: relative RMS error"):
        check_against_reference((got[0], got[1], got[2] * 1.25, got[3]), want, q.dtype)
