"""Where the code runs: device, dtype, the Triton interpreter, and reading sizes.

Hand-written infrastructure (no chapter teaches it). Importing `minisparse` imports this module first, so that
on a machine without a GPU the Triton kernels of the book run in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import os
import sys

import torch

__all__ = [
    "has_gpu", "device", "default_dtype", "interpreting", "reading_size", "check_triton_device", "launch",
    "checking_values", "set_value_checks", "to_host_later", "check_values_later", "describe", "print_environment",
]


def has_gpu() -> bool:
    """True when PyTorch sees a CUDA (or ROCm) device."""
    return torch.cuda.is_available()


def _switch_on_interpreter() -> None:
    # Triton reads TRITON_INTERPRET when kernels are decorated, so it must be set before any minisparse kernel
    # module is imported. We only set it on machines without a GPU and never override an explicit choice.
    if not has_gpu() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


_switch_on_interpreter()


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors, with numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device() -> torch.device:
    """The device the book computes on: the first GPU if there is one, else the CPU."""
    return torch.device("cuda") if has_gpu() else torch.device("cpu")


def default_dtype(dev: torch.device | str | None = None) -> torch.dtype:
    """bf16 where the GPU supports it (Ampere and newer), fp16 on older GPUs (a Colab T4), fp32 on CPU.

    fp32 on CPU because the interpreter's bf16 `tl.dot` gives wrong results and CPUs gain nothing from 16 bits.
    """
    dev = torch.device(dev) if dev is not None else device()
    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def reading_size(cpu, gpu):
    """Pick the size a chapter uses: small enough for the interpreter on CPU, realistic on a GPU.

    >>> T = reading_size(cpu=128, gpu=8192)
    """
    return gpu if has_gpu() and not interpreting() else cpu


def check_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when a Triton op gets tensors it cannot run on."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    (dev,) = devices
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{op}: got CPU tensors, but Triton is not in interpreter mode. Either move the tensors to a GPU "
            "(`.cuda()`), or set the environment variable TRITON_INTERPRET=1 before `import triton` "
            "(on a machine without a GPU, `import minisparse` does this for you)."
        )
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: Triton kernels run on CUDA tensors (or CPU under the interpreter), got {dev}")


_value_checks = True


def checking_values() -> bool:
    """Whether ops check the values of their inputs (ranges, NaN), not only shapes, dtypes and devices.

    A value check is one reduction and one host sync. Ops that queue their kernels before waiting for it
    (`to_host_later`) hide it; ops that wait first let the GPU idle while the CPU queues their kernels. Never during
    CUDA graph capture, where a host sync is not allowed.
    """
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return _value_checks and not capturing


def to_host_later(t: torch.Tensor):
    """Start copying a few numbers computed on the GPU to the host; return a function that waits for that copy alone
    and gives them as a list.

    What a value check needs: launch its reduction, call this, queue the op's kernels, then call the function. It
    waits until the GPU reaches the copy, not until it has run the kernels queued after it, so the wait overlaps
    the op's GPU work whenever that outlasts its CPU work (chapter 5, section 5.8, measures what that saves). On the
    CPU the values are read at once.
    """
    if t.device.type != "cuda":
        values = t.tolist()
        return lambda: values
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(t.device))

    def wait():
        copied.synchronize()
        return host.tolist()
    return wait


def check_values_later(start, device: torch.device):
    """A Triton op's value check, split around its kernels: `start()` launches the check's reduction (through
    `to_host_later`) and returns the function that waits for it and raises; call what this returns after queueing
    the kernels. With value checks off, nothing is started. On a CPU, where nothing runs ahead of the host (the
    interpreter), the check runs now, before the slow interpreted kernels, and what this returns does nothing. On a
    GPU the check runs on a stream of its own, beside the kernels (`_beside_the_kernels`)."""
    if not checking_values():
        return lambda: None
    if device.type != "cuda":
        start()()
        return lambda: None
    return _beside_the_kernels(start, device)


_side_streams: dict = {}


def _beside_the_kernels(start, device: torch.device):
    """Run `start()` on a second CUDA stream of `device` that first waits for the current stream's queued work (which
    produced the values to check). The check's reduction and copy then run next to the op's kernels, queued after
    it on the current stream, instead of ahead of them: on the current stream the GPU would wait for the copy
    (chapter 5, section 5.8). What `start()` returns waits for that copy, so the inputs it reads outlive it."""
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        return start()


def set_value_checks(enabled: bool) -> bool:
    """Turn value checks on (the default) or off for every op; return the previous setting.

    Off, out-of-range values (a positive log decay or β outside [0, 2] in chapter 5, a decay rate ≤ 0 in chapter 4,
    NaN) are no longer caught: the kernels compute what they are given. Shapes, dtypes, devices and kernel limits
    are always checked.

    >>> previous = set_value_checks(False)   # in a tuned training loop, after a first checked step
    >>> _ = set_value_checks(previous)
    """
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"set_value_checks: enabled must be True or False, got {enabled!r}")
    previous, _value_checks = _value_checks, enabled
    return previous


def launch(op: str, kernel, grid, args: tuple, constexprs: dict, configs: list[dict], instead: str) -> dict:
    """Launch a Triton kernel with the first of `configs` that fits this GPU's shared memory; return that config.

    `grid(config)` gives the grid; each config holds tile constexprs and num_warps / num_stages. List the config
    tuned on the H200 first and narrower ones after it, for GPUs with less shared memory a block (a T4 gives
    64 KiB, an H200 227 KiB): a launch that asks for too much raises OutOfResources before running, so the next one
    is tried. When none fits, raise a RuntimeError that names the kernel and says what to use `instead`.
    """
    from triton.runtime.errors import OutOfResources  # here: triton is imported after the interpreter is chosen

    last = None
    for cfg in configs:
        try:
            kernel[grid(cfg)](*args, **constexprs, **cfg)
            return cfg
        except OutOfResources as err:  # raised at launch, before the kernel runs: nothing was written
            last = err
    name = getattr(kernel, "__name__", "a kernel")
    raise RuntimeError(f"{op}: {name} needs more shared memory than this GPU gives a block ({last}), even with the "
                       f"narrowest tiles tried. Use smaller head dimensions, or {instead}") from last


def describe() -> str:
    """One line naming the device: 'NVIDIA T4' or 'CPU — Triton kernels run in the interpreter'."""
    if has_gpu():
        return torch.cuda.get_device_name(0)
    if interpreting():
        return "CPU — Triton kernels run in the interpreter"
    return "CPU — Triton kernels are unavailable (TRITON_INTERPRET is off)"


def print_environment() -> None:
    """Print the versions and the device a chapter runs on (the last line of every chapter's setup cell)."""
    import minisparse

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # macOS / Windows: the naive PyTorch code still runs
        triton_version = "not installed"
    print(f"python {sys.version.split()[0]} · torch {torch.__version__} · triton {triton_version} · "
          f"minisparse {minisparse.__version__}")
    print(f"device: {describe()} · dtype: {str(default_dtype()).replace('torch.', '')}")
