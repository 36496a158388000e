"""Argument checks shared by every op and layer of the book, so that a teaching cell validates its inputs in one line.

Hand-written infrastructure (no chapter teaches it). Each helper raises `TypeError` (wrong type or dtype) or
`ValueError` (wrong shape or value) with a message that names the op, the argument, what was expected and what
came; `RuntimeError` where the environment cannot run the op (CPU tensors without the interpreter, a gradient
through a forward-only kernel).

The value-check rule (README, Design notes): the `naive_*` ops and every op on CPU tensors check values (gate
ranges, NaN) eagerly; Triton ops on CUDA tensors do so only after `runtime.set_value_checks(True)`, because reading
a reduction back to the host is a sync. Shape, dtype, device and kernel-limit checks are always on. Layers do not
re-check values they built themselves.
"""
from __future__ import annotations

import math
import numbers

import torch

from minisparse import runtime

# The float dtypes the book's ops take: every PyTorch (naive) op takes float64 too, and computes in it (gradcheck,
# oracles); the Triton kernels take the first three only (`choose_backend` sends float64 to the naive path).
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FLOATS = (*KERNEL_FLOATS, torch.float64)
BACKENDS = ("auto", "naive", "triton")


def _shape(t) -> str:
    return str(tuple(t.shape))


# ------------------------------------------------------------------------------------------------- tensors
def tensor(op: str, name: str, t, layout: str | None = None, *, dtypes=None, optional: bool = False):
    """`t` is a tensor (or None when `optional`) of rank `layout.count(',') + 1` (e.g. "[B, T, H, K]") with a dtype in
    `dtypes`. Returns `t`."""
    if t is None and optional:
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{' ' + layout if layout else ''}"
                        f"{' or None' if optional else ''}, got {type(t).__name__}")
    if layout is not None and t.dim() != layout.count(",") + 1:
        raise ValueError(f"{op}: {name} must be {layout.count(',') + 1}-D {layout}, got shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {names}, got {t.dtype}{_kernel_note(dtypes, t.dtype)}")
    return t


def _kernel_note(dtypes, got) -> str:
    """Where a Triton op refuses a dtype the naive ops take (float64): say so, and where it runs."""
    if got == torch.float64 and all(d in dtypes for d in KERNEL_FLOATS):
        return " (the Triton kernels take no float64: use the naive PyTorch op, or backend='naive')"
    return ""


def shape(op: str, name: str, t: torch.Tensor, want: tuple, layout: str, meaning: str = "") -> None:
    """`t.shape == want`, else a ValueError that spells the layout with its numbers (and what it means)."""
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{op}: {name} must be {layout} = {tuple(want)}{' (' + meaning + ')' if meaning else ''}, "
                         f"got {_shape(t)}")


def same_dtype(op: str, dtypes=FLOATS, **named) -> torch.dtype:
    """The tensors in `named` share one dtype, among `dtypes` (a Triton op passes KERNEL_FLOATS); return it."""
    kinds = {t.dtype for t in named.values()}
    first = next(iter(named.values())).dtype
    if len(kinds) > 1 or first not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = ", ".join(f"{n} {t.dtype}" for n, t in named.items())
        note = _kernel_note(dtypes, first) if len(kinds) == 1 else ""
        raise TypeError(f"{op}: {', '.join(named)} must share one dtype among {allowed}, got {got}{note}")
    return first


def same_device(op: str, **named) -> torch.device:
    """The tensors in `named` (None skipped) live on one device; return it."""
    present = {n: t for n, t in named.items() if t is not None}
    if not present:
        raise ValueError(f"{op}: no tensors given")
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {got}")
    return next(iter(devices))


def qkv(op: str, q, k, v, *, grouped_values: bool = False, dtypes=FLOATS) -> tuple[int, int, int, int, int, int]:
    """The linear-attention layout: q, k `[B, T, H, K]` (one shape), v `[B, T, HV, V]` with HV = H, or with
    `grouped_values` any multiple of H (GVA: value head i reads query/key head i // (HV // H)). The three share a
    float dtype among `dtypes` (a Triton op passes KERNEL_FLOATS) and a device. Returns (B, T, H, K, HV, V)."""
    tensor(op, "q", q, "[B, T, H, K]")
    tensor(op, "k", k, "[B, T, H, K]")
    tensor(op, "v", v, "[B, T, HV, V]" if grouped_values else "[B, T, H, V]")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape [B, T, H, K] = {_shape(q)}, got {_shape(k)}")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if v.shape[:2] != q.shape[:2] or (HV % H != 0 if grouped_values and H else HV != H):
        heads = f"HV a multiple of H = {H}" if grouped_values else f"H = {H}"
        raise ValueError(f"{op}: v must be {'[B, T, HV, V]' if grouped_values else '[B, T, H, V]'} with q's B, T = "
                         f"{(B, T)} and {heads}, got {_shape(v)}")
    same_dtype(op, dtypes, q=q, k=k, v=v)
    same_device(op, q=q, k=k, v=v)
    return B, T, H, K, HV, V


def last_queries_qkv(op: str, q, k, v, *, dtypes=FLOATS) -> tuple[int, int, int, int, int, int, int]:
    """The softmax-attention layout with the queries at the end: q `[B, TQ, HQ, D]`, k `[B, TK, H, D]`, v
    `[B, TK, H, Dv]`, TQ <= TK (query i sits at position TK - TQ + i: TQ = TK in a prefill, fewer when decoding)
    and H dividing HQ (GQA); one float dtype among `dtypes` (a Triton op passes KERNEL_FLOATS), one device.
    Returns (B, TQ, TK, HQ, H, D, Dv)."""
    tensor(op, "q", q, "[B, TQ, HQ, D]")
    tensor(op, "k", k, "[B, TK, H, D]")
    tensor(op, "v", v, "[B, TK, H, Dv]")
    B, TQ, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or TK < TQ:
        raise ValueError(f"{op}: k must be [B, TK, H, D] with q's B = {B}, D = {D} and TK >= TQ = {TQ} "
                         f"(queries are the last TQ positions), got {_shape(k)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must be [B, TK, H, Dv] with k's B, TK, H = {tuple(k.shape[:3])}, got {_shape(v)}")
    divides(op, "H (k's heads)", H, "HQ (q's heads)", HQ)
    same_dtype(op, dtypes, q=q, k=k, v=v)
    same_device(op, q=q, k=k, v=v)
    return B, TQ, TK, HQ, H, D, v.shape[3]


def per_head_token(op: str, name: str, t, want: tuple, layout: str, meaning: str, like: torch.Tensor) -> None:
    """A gate-like tensor: exactly `want`, floating point, on `like`'s device."""
    tensor(op, name, t, layout)
    shape(op, name, t, want, layout, meaning)
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} must be on q's device {like.device}, got {t.device}")


def initial_state(op: str, h0, want: tuple, layout: str = "[B, H, K, V]", like: torch.Tensor | None = None,
                  dtypes=FLOATS) -> None:
    """None, or a tensor of exactly `want`, of a dtype among `dtypes` (a Triton op passes KERNEL_FLOATS), on
    `like`'s device."""
    if h0 is None:
        return
    tensor(op, "initial_state", h0, layout, dtypes=dtypes, optional=True)
    shape(op, "initial_state", h0, want, layout)
    if like is not None and h0.device != like.device:
        raise ValueError(f"{op}: initial_state must be on q's device {like.device}, got {h0.device}")


def attention_mask(op: str, mask, B: int, T: int, *, state_in: bool = False, state_out: bool = False) -> None:
    """None, or a layer's padding mask [B, T] (1 = token, 0 = padding). A recurrent layer that returns a state
    (`state_out`) passes every position through it, padding included: its state is the real tokens' only when the
    padding comes first (left padding) and starts from no state (`state_in` False). Otherwise the outputs of the real
    tokens are still right, so only then is the mask refused — a value check, run where `checking_values` says."""
    if mask is None:
        return
    tensor(op, "attention_mask", mask, "[B, T]")
    shape(op, "attention_mask", mask, (B, T), "[B, T]", "1 = token, 0 = padding")
    if not state_out or mask.numel() == 0 or not checking_values(False, mask):
        return
    token = mask.detach() != 0  # [B, T]
    if state_in and not bool(token.all()):
        raise ValueError(f"{op}: attention_mask pads a batch that continues from a state; padding would decay and "
                         "write the state it returns. Continue without padding, or call without use_cache")
    late = (token[:, :-1] & ~token[:, 1:]).any(-1)  # [B] a token followed by padding
    if bool(late.any()):
        raise ValueError(f"{op}: with a returned state, attention_mask must pad on the left (padding before the "
                         f"tokens), but row {int(late.nonzero()[0])} has padding after a token: the state would "
                         "have seen it. Pad on the left, or call without use_cache")


def conv_recurrent_state(op: str, state, conv_shape: tuple, rec_shape: tuple, like: torch.Tensor) -> tuple:
    """None, or the (conv_state [B, C, kernel − 1], recurrent_state [B, HV, K, V]) pair a layer with a short
    convolution returned; both parts, of these shapes, on `like`'s device. Returns (conv_state, recurrent_state),
    (None, None) for None."""
    if state is None:
        return None, None
    if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(torch.is_tensor(x) for x in state)):
        raise TypeError(f"{op}: state must be the (conv_state, recurrent_state) pair of tensors an earlier call "
                        f"returned, got {type(state).__name__}")
    conv, rec = state
    shape(op, "conv_state", conv, conv_shape, "[B, conv_dim, kernel − 1]")
    initial_state(op, rec, rec_shape, "[B, HV, K, V]", like=like)
    if conv.device != like.device:
        raise ValueError(f"{op}: conv_state must be on the input's device {like.device}, got {conv.device}")
    return conv, rec


def scale(op: str, value, head_dim: int) -> float:
    """The attention scale as a float: `head_dim ** -0.5` for None, else a positive finite number."""
    if value is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{op}: scale must be a positive number or None (head dim ** -0.5), got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------- values
def checking_values(naive: bool, *tensors: torch.Tensor) -> bool:
    """The value-check rule: always for a naive op; for a Triton op, on CPU tensors always, on CUDA tensors only
    after `runtime.set_value_checks(True)`."""
    if naive:
        return True
    present = [t for t in tensors if t is not None]
    return runtime.checking_values(present[0].device) if present else True


def value_range(op: str, name: str, t: torch.Tensor, *, low=None, high=None, low_open: bool = False,
                finite: bool = False, why: str = "") -> None:
    """Every value of `t` is a number within [low, high] (`low_open`: > low; `finite`: and not ±inf). One reduction
    and one host sync; call it only where `checking_values` says so."""
    if t is None or t.numel() == 0:
        return
    x = t.detach().float()
    nan = int(torch.isnan(x).sum())
    if nan:
        raise ValueError(f"{op}: {name} contains NaN ({nan} of {t.numel()} values){'; ' + why if why else ''}")
    lo, hi = (float(v) for v in torch.aminmax(x))
    if finite and not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{op}: {name} must be finite{' (' + why + ')' if why else ''}, got values in "
                         f"[{lo:.3g}, {hi:.3g}]")
    def is_below(v):
        return low is not None and (v <= low if low_open else v < low)

    def is_above(v):
        return high is not None and v > high

    if is_below(lo) or is_above(hi):
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        want = " and ".join(w for w in (lower, upper) if w)
        raise ValueError(f"{op}: {name} must be {want}{' (' + why + ')' if why else ''}, got values in "
                         f"[{_digits(lo, is_below)}, {_digits(hi, is_above)}]")


def _digits(v: float, wrong) -> str:
    """v to 3 significant digits, or to as many more as it takes for the shown number to be `wrong` where v is (a
    beta of 2.0001 against "<= 2" shows as 2.0001, not 2)."""
    for digits in range(3, 18):
        text = f"{v:.{digits}g}"
        if not wrong(v) or wrong(float(text)):
            return text
    return repr(v)


# ------------------------------------------------------------------------------------------------- Triton ops
def triton_inputs(op: str, *tensors, max_dims: dict | None = None, instead: str = "") -> None:
    """What every Triton op needs of its inputs: one device; CUDA, or CPU under the interpreter; no bfloat16 under
    the interpreter (its bf16 `tl.dot` is wrong: triton 3.3–3.8); head dims within the kernel's on-chip tiles
    (`max_dims`, e.g. {"K": (K, 128), "V": (V, 128)})."""
    present = [t for t in tensors if t is not None]
    if not present:
        return
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = present[0].device
    if dev.type == "cpu" and not runtime.interpreting():
        raise RuntimeError(
            f"{op}: got CPU tensors, but Triton is not in interpreter mode. Either move the tensors to a GPU "
            "(`.cuda()`), or set the environment variable TRITON_INTERPRET=1 before `import triton` "
            "(on a machine without a GPU, `import minisparse` does this for you).")
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: Triton kernels run on CUDA tensors (or CPU under the interpreter), got {dev}")
    if dev.type == "cpu" and any(t.dtype == torch.bfloat16 for t in present):
        raise TypeError(f"{op}: bfloat16 under the Triton interpreter gives wrong results (an interpreter bug); "
                        "use float32 on CPU, bfloat16 on a GPU")
    for name, (got, limit) in (max_dims or {}).items():
        if got > limit:
            raise ValueError(f"{op}: {name} must be <= {limit} (the kernel holds it in one on-chip tile), got {got}"
                             f"{'; use ' + instead if instead else ''}")


def forward_only(op: str, *tensors, instead: str) -> None:
    """A decoding kernel has no backward: raise if autograd would need one."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} is forward only (a decoding kernel): call it under torch.no_grad(), or use "
                           f"{instead}, which has a backward pass")


# ------------------------------------------------------------------------------------------------- layers
def backend(op: str, value) -> str:
    """A layer's `backend=` argument: "auto", "naive" or "triton"."""
    if value not in BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto', 'naive' or 'triton', got {value!r}")
    return value


def choose_backend(value: str, x: torch.Tensor, *, fits: bool = True) -> str:
    """Resolve "auto": the Triton kernels for the dtypes they take (`KERNEL_FLOATS`) on CUDA tensors, or on CPU
    tensors under the interpreter (fp32/fp16 only: its bf16 products are wrong); the naive PyTorch path otherwise
    (fp64, the oracle's and gradcheck's dtype, always runs naive). `fits`: whether the call's shapes are within the
    kernels' limits (a layer's head dims); False sends "auto" to the naive path, which has no limit. An explicit
    "triton" stays "triton" (its op then says which limit is passed)."""
    if value != "auto":
        return value
    usable = fits and x.dtype in KERNEL_FLOATS and (
        x.is_cuda or (runtime.interpreting() and x.device.type == "cpu" and x.dtype != torch.bfloat16))
    return "triton" if usable and _has_triton() else "naive"


def _has_triton() -> bool:
    """Whether triton is installed (it is not on macOS or Windows, where the naive ops still run)."""
    global _triton_found
    if _triton_found is None:
        import importlib.util
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


_triton_found = None


def positive_int(op: str, name: str, value, *, zero: bool = False) -> int:
    """An int > 0 (>= 0 with `zero`); bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if zero else 1):
        raise ValueError(f"{op}: {name} must be an int {'>= 0' if zero else '> 0'}, got {value!r}")
    return int(value)


def positive_float(op: str, name: str, value, *, zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with `zero`); a one-element tensor counts as its number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not (ok and (value >= 0 if zero else value > 0)):
        raise ValueError(f"{op}: {name} must be a {'finite number >= 0' if zero else 'positive number'}, "
                         f"got {value!r}")
    return float(value)


def lengths(op: str, name: str, value, *, least: int = 0):
    """A cost model's length (a context, a position, a sequence length): a finite real number >= `least`, or an
    array (numpy, or anything np.asarray takes) of them; bools are not lengths. Returns `value` unchanged."""
    import numpy as np

    try:
        a = np.asarray(value)
    except Exception:  # a ragged list and the like
        a = np.asarray(None)
    if a.dtype == bool or a.dtype.kind not in "iuf" or a.size == 0 or not (np.isfinite(a).all() and (a >= least).all()):
        raise ValueError(f"{op}: {name} must be a number >= {least} or an array of them, got {value!r}")
    return value


def positions(op: str, positions, B: int, T: int, device) -> None:
    """A layer's `positions`: an integer tensor [T] or [B, T] on the input's device (RoPE's positions of its T
    tokens)."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{op}: positions must be a torch.Tensor [T] or [B, T], got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"{op}: positions must be integers, got {positions.dtype}")
    if tuple(positions.shape) not in ((T,), (B, T)):
        raise ValueError(f"{op}: positions must be [T]=[{T}] or [B, T]=[{B}, {T}], got {tuple(positions.shape)}")
    if positions.device != torch.device(device):
        raise ValueError(f"{op}: positions must be on the input's device {device}, got {positions.device}")


def one_of(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def divides(op: str, name: str, value: int, other_name: str, other: int) -> None:
    """`value` divides `other` (e.g. key heads into query heads)."""
    if value == 0 or other % value != 0:
        raise ValueError(f"{op}: {name} = {value} must divide {other_name} = {other}")


_ABSENT = object()


def _attribute(obj, path: str):
    """obj.a.b for path "a.b", or _ABSENT where a link is missing (obj.a None: obj.a.b is missing)."""
    for name in path.split("."):
        obj = getattr(obj, name, _ABSENT)
        if obj is _ABSENT:
            return _ABSENT
    return obj


def hf_module(op: str, module, expected: str, attrs=(), config_attrs=()) -> None:
    """A `from_hf` argument: a torch.nn.Module with every attribute in `attrs` (dotted paths, e.g. "k_norm.eps"; None
    counts as missing: DeepseekV3Attention's q_proj is None when it has q_a_proj) and a `config` with every one in
    `config_attrs` (None allowed: q_lora_rank=None is a setting); else a TypeError that names the transformers
    module(s) `expected` and what the given one lacks — not an AttributeError from deep inside the loader."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{op}: module must be {expected}, got {type(module).__name__}")
    missing = [a for a in attrs if _attribute(module, a) is _ABSENT or _attribute(module, a) is None]
    if config_attrs:
        missing += [a for a in ("config", *(f"config.{c}" for c in config_attrs))
                    if _attribute(module, a) is _ABSENT]
    if missing:
        raise TypeError(f"{op}: module must be {expected}, got {type(module).__name__} (it has no "
                        f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''})")


def layer_input(op: str, x, module: torch.nn.Module, layout: str = "[B, T, hidden]", hidden: int | None = None,
                name: str = "x"):
    """A layer's input: a float tensor of rank `layout` whose last dim is `hidden` and whose dtype and device are the
    layer's parameters' (PyTorch's own message, "expected m1 and m2 to have the same dtype", names neither)."""
    tensor(op, name, x, layout)
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor (hidden states), got {x.dtype}")
    if hidden is not None and x.shape[-1] != hidden:
        raise ValueError(f"{op}: {name} must be {layout} with hidden = {hidden}, got {_shape(x)}")
    p = next(module.parameters(), None)
    if p is not None and x.dtype != p.dtype:
        raise TypeError(f"{op}: {name} is {x.dtype} but the layer's parameters are {p.dtype}: convert one of them, "
                        f"e.g. layer.to({str(x.dtype)}) or {name}.to({str(p.dtype)})")
    if p is not None and x.device != p.device:
        raise ValueError(f"{op}: {name} is on {x.device} but the layer's parameters are on {p.device}: move one of "
                         "them")
    return x
