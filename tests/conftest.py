"""Fixtures shared by the kernel tests."""
import pytest
import torch

import minisparse  # noqa: F401  before any test module imports fla (which imports triton): see minisparse.runtime
from minisparse import runtime
from minisparse.testing import assert_close


@pytest.fixture
def fla_naive(request):
    """fla's reference functions for the test file's mechanism (its module-level FLA_NAIVE, e.g. "fla.ops.nsa.naive"):
    a test that compares with them is skipped without fla; the file's other tests (the kernels against the naive
    ops) still run."""
    return pytest.importorskip(request.module.FLA_NAIVE)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel's launcher allocates with torch.empty / empty_like starts as NaN, so an element the
    kernel forgets to write shows up in the comparison (uninitialised memory is often zero, which can hide it)."""
    real_empty, real_like = torch.empty, torch.empty_like

    def nan_filled(make):
        def make_poisoned(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make_poisoned

    monkeypatch.setattr(torch, "empty", nan_filled(real_empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(real_like))


@pytest.fixture
def last_programs(monkeypatch):
    """Offsets at lengths no test can allocate: `last_programs(modules, launch)` calls `launch(tensor, kernel)` in
    Triton's interpreter with every `runtime.launch` reduced to the last program of its grid (the last chunk, head and
    tile), loads and stores recorded instead of performed, and every loop of more than 64 steps in `modules` (the
    kernels' modules) reduced to its first and last steps. `tensor(*shape, dtype=torch.float32)` is a tensor of any
    size made of one element, expanded (torch.empty and torch.empty_like make theirs so during the call);
    `kernel(fn, grid, *args, **constexprs)` launches a kernel directly, as the last program of `grid`. Fails if a
    launch recorded no load or store (the patches missed it) or an access falls outside the tensors (an int32 offset
    that wrapped: one past 2^31 elements wraps negative); returns the addresses, one array a load or store. Skips on
    a GPU."""
    from minisparse import runtime

    if not runtime.interpreting():
        pytest.skip("runs one program of a long launch in Triton's interpreter")
    import builtins

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    extents, grid, addresses, silent = [], {}, [], []  # extents: (first byte, one past the last) of each tensor

    def tensor(*shape, dtype=torch.float32, **_):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        one = torch.zeros(1, dtype=dtype)
        full = one.expand(*shape)
        extents.append((one.data_ptr(), one.data_ptr() + full.numel() * one.element_size()))
        return full

    def like(x, *, dtype=None, **_):
        return tensor(*x.shape, dtype=dtype or x.dtype)

    def record(ptrs, mask):
        addresses.append(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)])

    def load(ptrs, mask, other, *_):
        record(ptrs, mask)
        dtype = ptrs.get_element_ty()
        zeros = np.zeros(ptrs.data.shape, dtype=interpreter._get_np_dtype(dtype))
        return interpreter.TensorHandle(zeros if other is None else zeros + other.data, dtype)

    def store(ptrs, value, mask, *_):
        record(ptrs, mask)

    def last_program(axis):
        return interpreter.TensorHandle(np.array([grid["dims"][axis] - 1], dtype=np.int32), tl.int32)

    def ends(*args):  # a long loop (over chunks or tokens) runs its first and last steps
        steps = builtins.range(*args)
        return steps if len(steps) <= 64 else [steps[0], steps[-1]]

    real_launch = runtime.launch

    def one_program(name, fn, grid_of, *args, **kwargs):
        def single(config):
            grid["dims"] = grid_of(config)
            return (1,) * len(grid["dims"])
        before = len(addresses)
        config = real_launch(name, fn, single, *args, **kwargs)
        silent.extend([name] if len(addresses) == before else [])
        return config

    def kernel(fn, dims, *args, **constexprs):
        grid["dims"], before = tuple(dims), len(addresses)
        fn[(1,) * len(dims)](*args, **constexprs)
        silent.extend([fn.fn.__name__] if len(addresses) == before else [])

    def run(modules, launch):
        with monkeypatch.context() as m:
            m.setattr(builder, "create_masked_load", load)
            m.setattr(builder, "create_masked_store", store)
            m.setattr(builder, "create_get_program_id", last_program)
            m.setattr(runtime, "launch", one_program)
            for module in modules:
                m.setattr(module, "range", ends, raising=False)
            m.setattr(torch, "empty", tensor)
            m.setattr(torch, "empty_like", like)
            launch(tensor, kernel)
        low, high = np.uint64(min(a for a, _ in extents)), np.uint64(max(b for _, b in extents))
        outside = [a for a in addresses if a.size and (a.min() < low or a.max() >= high)]
        assert addresses and not silent, f"launches that recorded no load or store: {silent or 'all'}"
        assert not outside, (f"{len(outside)} of {len(addresses)} loads and stores reach outside the tensors (an "
                             f"int32 offset wrapped), e.g. {int(outside[0].min()) - int(low)} bytes from the lowest")
        return addresses

    return run


@pytest.fixture
def value_checks():
    """Value checks on for the test (on CUDA tensors too: CPU tensors always have them); the test may switch them
    with value_checks(False) / value_checks(True). The setting from before the test is restored afterwards."""
    previous = runtime.set_value_checks(True)
    yield runtime.set_value_checks
    runtime.set_value_checks(previous)


@pytest.fixture
def padding_rule(value_checks):
    """`padding_rule(layer, x, recurrent, tol)`: the checks of `_padding_rule` below, with value checks on."""
    return _padding_rule


def _padding_rule(layer, x, recurrent=lambda state: state, tol=1e-5):
    """A recurrent layer's padding mask: left padding (5 tokens) gives the unpadded prompt's state; right padding is
    allowed for outputs only (the real tokens' outputs unchanged) and refused with a returned state, as is any
    padding while continuing from a state. x [2, T, hidden] on the layer's device; `recurrent(state)` is the part of
    a returned state to compare (the recurrent state of a (conv, recurrent) pair). Value checks on (the
    `padding_rule` fixture turns them on), so that the refusals also run on CUDA tensors."""
    B, T = x.shape[:2]
    left = torch.ones(B, T, device=x.device)
    left[:, :5] = 0
    right = left.flip(-1)
    with torch.no_grad():
        _, padded = layer(x, use_cache=True, attention_mask=left)
        _, short = layer(x[:, 5:], use_cache=True)
        assert_close("left-padded state", recurrent(short), recurrent(padded), tol)
        y, _ = layer(x, attention_mask=right)  # right padding, outputs only: allowed
        assert_close("right-padded outputs", layer(x[:, :T - 5])[0], y[:, :T - 5], tol)
        with pytest.raises(ValueError, match="must pad on the left .* row 0 has padding after a token"):
            layer(x, use_cache=True, attention_mask=right)
        _, state = layer(x, use_cache=True)
        with pytest.raises(ValueError, match="continues from a state"):
            layer(x, state=state, attention_mask=left)
        layer(x, state=state, attention_mask=torch.ones(B, T, device=x.device))  # no padding: fine
