"""Checks shared by the tests, the chapters and the exercises.

Hand-written infrastructure. `assert_close` compares by relative RMS error, the measure DESIGN.md fixes for all
kernels (fwd ≤ 5e-3 and grads ≤ 8e-3 in bf16, ≤ 1e-4 in fp32). `check` is the exercise checker: one
deterministic line on success, a helpful `ExerciseError` on a wrong answer.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "TOLERANCES", "rel_rms", "assert_close", "seeded", "make_bthd", "make_qkv", "make_log_gates",
    "ExerciseError", "check", "attempt", "TensorRule", "as_number", "number_answer", "with_constexprs",
    "hf_torch_function", "hf_torch_path", "gradcheck_float64", "assert_float64_matches_float32", "loads_within",
]

# Relative-RMS tolerances by dtype of the computation under test: (forward, gradients).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 8e-3),
    torch.bfloat16: (5e-3, 8e-3),
}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero). NaN or inf anywhere gives inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.inf
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> float:
    """Raise AssertionError unless `out` matches `ref` in shape and within `tol` relative RMS error.

    NaN/inf in either tensor always fails. Returns the error so a test can print it.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise AssertionError(f"{name}: {bad} of {out.numel()} elements are NaN or inf")
    err = rel_rms(out, ref)
    if not err <= tol:
        diff = (out.detach().double() - ref.detach().double()).abs()
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > {tol:.0e} (largest difference "
                             f"{diff.max().item():.3e} at index {where})")
    return err


def gradcheck_float64(fn: Callable, leaves: Sequence[torch.Tensor]) -> None:
    """Assert that `fn(*leaves)` computes in float64 (every tensor it returns, in nested tuples too, is float64) and
    passes `torch.autograd.gradcheck` over `leaves`: float64 tensors that require grad. For the PyTorch references,
    whose gradients finite differences can check only in float64 (fp32 steps miss gradcheck's 1e-5)."""
    dtypes = {t.dtype for t in _tensors(fn(*leaves))}
    if dtypes != {torch.float64}:
        raise AssertionError(f"gradcheck_float64: the outputs' dtypes are {sorted(map(str, dtypes))}, not float64 only")
    if not torch.autograd.gradcheck(lambda *xs: tuple(_tensors(fn(*xs))), tuple(leaves)):
        raise AssertionError("gradcheck_float64: torch.autograd.gradcheck failed")


def assert_float64_matches_float32(fn: Callable, inputs: Sequence, names: Sequence[str], tol: float) -> None:
    """Run `fn` on `inputs` and on their float64 copies (each floating tensor `.double()`, the rest as given) and
    assert that the second run returns float64 tensors within `tol` relative RMS error of the first's. `fn` returns
    tensors (nested tuples allowed, None skipped), one a name of `names`, in order; a layer's `fn` converts a copy
    of the layer to its input's dtype."""
    def wide(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    narrow, doubled = _tensors(fn(*inputs)), _tensors(fn(*map(wide, inputs)))
    if len(narrow) != len(names) or len(doubled) != len(names):
        raise AssertionError(f"assert_float64_matches_float32: {len(narrow)} and {len(doubled)} outputs for "
                             f"{len(names)} names {tuple(names)}")
    for name, a, b in zip(names, narrow, doubled):
        if b.dtype != torch.float64:
            raise AssertionError(f"{name}: {b.dtype} from float64 inputs, not float64")
        assert_close(f"{name}, fp64 vs fp32", b, a.double(), tol)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of an op's or a layer's output, in order, from nested tuples and lists (None left out)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if out is None:
        return []
    raise TypeError(f"expected tensors in nested tuples, got {type(out).__name__}")


def hf_torch_function(fn: Callable) -> Callable:
    """transformers' own PyTorch implementation under the decorators that may send a call elsewhere.

    transformers decorates its linear-attention functions so that a call runs fla's Triton kernel when fla is
    installed and the inputs sit on a GPU, or a Hugging Face hub kernel; with the `kernels` package installed (a
    dependency since transformers 5.25) the decorated name is even an `nn.Module` whose `forward` calls the
    dispatcher. An oracle must be transformers' PyTorch code, whatever is installed and wherever the tensors live:
    this peels both layers off and raises TypeError unless what is left is a function defined in transformers.
    """
    f = fn
    if isinstance(f, torch.nn.Module):  # kernels' function-as-module: the dispatcher is `forward`'s `func`
        f = inspect.getclosurevars(type(f).forward).nonlocals.get("func")
    f = inspect.unwrap(f) if callable(f) else f
    if not (inspect.isfunction(f) and f.__module__.startswith("transformers.")):
        raise TypeError(f"hf_torch_function: found no PyTorch function of transformers under {fn!r} "
                        f"(got {f!r}); has transformers changed how it decorates this function?")
    return f


@contextlib.contextmanager
def hf_torch_path(module, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, the transformers `module`'s functions `names` are its own PyTorch ones.

    A transformers layer calls module-level names (`torch_chunk_gated_delta_rule`, `causal_conv1d_fn`, ...);
    this swaps each for `hf_torch_function(...)` of itself (names that are None, for an absent optional package,
    stay None) and restores them on exit, so that a layer-level check compares against transformers' PyTorch path.
    """
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, f in saved.items():
            if f is not None:
                setattr(module, n, hf_torch_function(f))
        yield
    finally:
        for n, f in saved.items():
            setattr(module, n, f)


def seeded(seed: int, dev: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `dev` seeded with `seed` (factories take one so that inputs are reproducible)."""
    return torch.Generator(device=dev).manual_seed(seed)


def make_bthd(B: int, T: int, H: int, D: int, *, dtype=torch.float32, device="cpu", seed: int = 0,
              requires_grad: bool = False) -> torch.Tensor:
    """A standard-normal `[B, T, H, D]` tensor, reproducible from `seed`, contiguous."""
    x = torch.randn(B, T, H, D, generator=seeded(seed, device), device=device, dtype=torch.float32)
    return x.to(dtype).requires_grad_(requires_grad)


def make_qkv(B: int, T: int, HQ: int, D: int, *, HKV: int | None = None, Dv: int | None = None, Tk: int | None = None,
             dtype=torch.float32, device="cpu", seed: int = 0, requires_grad: bool = False):
    """q `[B,T,HQ,D]`, k `[B,Tk,HKV,D]`, v `[B,Tk,HKV,Dv]` (defaults: HKV = HQ, Dv = D, Tk = T)."""
    HKV = HQ if HKV is None else HKV
    Dv = D if Dv is None else Dv
    Tk = T if Tk is None else Tk
    kw = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    return (make_bthd(B, T, HQ, D, seed=seed, **kw), make_bthd(B, Tk, HKV, D, seed=seed + 1, **kw),
            make_bthd(B, Tk, HKV, Dv, seed=seed + 2, **kw))


def make_log_gates(B: int, T: int, H: int, K: int | None = None, *, low: float = -5.0, high: float = 0.0,
                   dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    """Log-space decay gates `g ≤ 0`, uniform in [low, high]: shape `[B,T,H]`, or `[B,T,H,K]` if K is given.

    Use `low=-30` for extreme gates (decay ≈ 1e-13) and `high=-1e-6` for gates at the edge of no decay.
    """
    if not low <= high <= 0:
        raise ValueError(f"make_log_gates: need low ≤ high ≤ 0, got low={low}, high={high}")
    shape = (B, T, H) if K is None else (B, T, H, K)
    u = torch.rand(shape, generator=seeded(seed, device), device=device, dtype=torch.float32)
    return (low + (high - low) * u).to(dtype)


class ExerciseError(AssertionError):
    """Raised by an exercise checker on a wrong answer; the message says what differs and a hint."""


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {str(x.dtype).replace('torch.', '')}"
    return repr(x)


def as_number(x) -> float | None:
    """`x` as a Python float when it is one real number, however a reader computed it: a Python int, float or
    Fraction (any `numbers.Real`), a numpy scalar (np.float32, np.int64), or a one-element tensor or array (0-d or
    not); None otherwise. A bool is not a number here (True is no answer to "how many")."""
    if isinstance(x, torch.Tensor):
        real = x.dtype != torch.bool and not x.dtype.is_complex
        return float(x.detach().reshape(-1)[0].item()) if real and x.numel() == 1 else None
    if isinstance(x, np.ndarray):
        return float(x.reshape(-1)[0]) if x.dtype.kind in "iuf" and x.size == 1 else None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


_RETURN_A_NUMBER = "a number (an int or float, a numpy scalar or a one-element tensor)"


def number_answer(name: str, x, what: str = "the answer") -> float:
    """An exercise's numeric answer `x` as a float (see `as_number`); else an ExerciseError that asks for a number
    rather than calling the answer wrong."""
    value = as_number(x)
    if value is None:
        raise ExerciseError(f"✗ {name}: {what} must be {_RETURN_A_NUMBER}, got {_describe(x)}")
    return value


def _compare(got, expected, tol: float) -> str | None:
    """None when `got` matches `expected`, else a sentence saying how it differs."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {_describe(got)}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
        if expected.dtype == torch.bool or not expected.is_floating_point():
            wrong = (got != expected).sum().item()
            return None if wrong == 0 else f"{wrong} of {expected.numel()} entries differ"
        err = rel_rms(got.float(), expected.float())
        return None if err <= tol else f"relative RMS error {err:.2e} (tolerance {tol:.0e})"
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a sequence of {len(expected)} items, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            why = _compare(g, e, tol)
            if why:
                return f"item {i}: {why}"
        return None
    if isinstance(expected, float):
        value = as_number(got)
        if value is None:
            return f"expected {_RETURN_A_NUMBER}, got {_describe(got)}"
        ok = math.isclose(value, expected, rel_tol=tol, abs_tol=tol)
        return None if ok else f"expected {expected:.6g}, got {value:.6g}"
    return None if got == expected else f"expected {expected!r}, got {got!r}"


def check(name: str, answer: Callable, reference: Callable, cases: Sequence[tuple], *, tol: float = 1e-4,
          hint: str = "") -> None:
    """Exercise checker: call `answer(*case)` and `reference(*case)` on every case and compare.

    Prints exactly one line, `✓ <name>: all N cases match`, on success; raises `ExerciseError` naming the first
    failing case, how the result differs and the hint otherwise. A stub that raises NotImplementedError is
    reported as not attempted yet.
    """
    for i, case in enumerate(cases):
        expected = reference(*case)
        try:
            got = answer(*case)
        except NotImplementedError:
            raise ExerciseError(f"✗ {name}: not implemented yet — fill in the function and run the cell again") from None
        why = _compare(got, expected, tol)
        if why:
            args = ", ".join(_describe(a) for a in case)
            msg = f"✗ {name}: case {i + 1} of {len(cases)} ({args}): {why}"
            raise ExerciseError(msg + (f"\nHint: {hint}" if hint else ""))
    print(f"✓ {name}: all {len(cases)} cases match")


class _Bound:
    def __init__(self, kernel, constexprs):
        self.kernel, self.constexprs = kernel, constexprs

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel[grid](*args, **kw, **self.constexprs)


def with_constexprs(kernel, **constexprs):
    """`kernel` with some constexpr arguments fixed, launched as kernel[grid](...), the way a Triton exercise's
    checker launches the reader's kernel: one right kernel with flags gives a checker's test its known-wrong answers."""
    return _Bound(kernel, constexprs)


_LEAVE_TORCH = {torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.tolist}


class TensorRule(torch.overrides.TorchFunctionMode):
    """A context in which every tensor a torch function or method returns must pass `rule`: rule(tensor) -> None
    when it may exist, else the reason it may not. The first that fails raises `ExerciseError`
    (`✗ <name>: <function> made a tensor of shape (...): <reason>`). For checkers whose constraint a comparison of
    results cannot see: float32 only, a memory bound. Taking the numbers out of torch (`.numpy()`, `np.asarray`,
    `.tolist()`) is refused too, since the rule could not see what is computed there.
    """

    def __init__(self, name: str, rule: Callable[[torch.Tensor], str | None]):
        super().__init__()
        self.name, self.rule = name, rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _LEAVE_TORCH:  # numpy or Python numbers: computed where no rule can follow them
            raise ExerciseError(f"✗ {self.name}: {func.__name__} takes the numbers out of torch, where this check "
                                "cannot follow them: compute with torch operations")
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            why = self.rule(t) if isinstance(t, torch.Tensor) else None
            if why:
                raise ExerciseError(f"✗ {self.name}: {getattr(func, '__name__', func)} made a tensor of shape "
                                    f"{tuple(t.shape)}: {why}")
        return out


@contextlib.contextmanager
def loads_within(name: str, tensors: dict[str, torch.Tensor], hint: str) -> Iterator[None]:
    """A context in which every element a Triton kernel loads (where its mask is true) must lie inside one of
    `tensors` (name -> tensor, a view for part of a buffer), else `ExerciseError` (`✗ <name>: a load reads …`). For
    a Triton exercise's checker: a read outside the tensors is a bug that no comparison of outputs sees, since the
    kernel may overwrite what it read. Checked in Triton's interpreter only (it sees each load's addresses); on a
    GPU the context does nothing."""
    from minisparse import runtime

    if not runtime.interpreting():
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    spans = {n: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), t) for n, t in tensors.items()}
    real = builder.create_masked_load

    def checked_load(ptrs, mask, *rest):
        read = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64)
        inside = np.zeros(read.shape, dtype=bool)
        for low, high, _ in spans.values():
            inside |= (read >= low) & (read < high)
        if not inside.all():
            a = int(read[~inside][0])
            near = min(spans, key=lambda n: max(spans[n][0] - a, a - spans[n][1] + 1))
            low, _, t = spans[near]
            raise ExerciseError(f"✗ {name}: a load reads {int((~inside).sum())} elements outside "
                                f"{', '.join(spans)}, e.g. element {(a - low) // t.element_size()} of {near}, "
                                f"which has {t.numel()}\nHint: {hint}")
        return real(ptrs, mask, *rest)

    before = vars(builder).get("create_masked_load")  # a patch of the instance's, if any (else the class's)
    builder.create_masked_load = checked_load  # create_load calls it too, with an all-true mask
    try:
        yield
    except Exception as err:  # the interpreter wraps what a load raises in an InterpreterError
        if isinstance(err.__cause__, ExerciseError):
            raise err.__cause__ from None
        raise
    finally:
        if before is None:
            del builder.create_masked_load
        else:
            builder.create_masked_load = before


def attempt(checker: Callable, *args, **kwargs) -> None:
    """Run an exercise checker and print its verdict instead of raising: for the cell that checks a reader's
    stub, so the chapter still runs top to bottom (in Jupyter and as a plain script). Returns None, so the cell
    shows only the verdict (`✓ …` on success, the checker's `✗ …` message otherwise) and no stray value.
    """
    try:
        checker(*args, **kwargs)
    except ExerciseError as err:
        print(err)
    except Exception as err:  # a reader's kernel that the interpreter refuses for a reason of its own
        if "mask has unsupported dtype" not in str(err):
            raise
        print(f"✗ {getattr(checker, '__name__', 'checker')}: Triton's interpreter refused your kernel: {err}\n"
              "Hint: triton 3.9's interpreter rejects a load or store mask that combines a scalar condition with "
              "a tensor, such as (idx >= 0) & (pos <= t); write it with tensors only, e.g. (pos >= 0) & (pos <= t), "
              "or tl.where(idx >= 0, pos <= t, False)")
