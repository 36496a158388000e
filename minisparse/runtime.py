"""Where the code runs and how its kernels launch: device, dtype, the Triton interpreter, reading sizes, the value-check
switch, and the one table of launch configurations every chapter's kernels use.

Hand-written infrastructure (no chapter teaches it). Importing `minisparse` imports this module first, so that on a
machine without a GPU the Triton kernels of the book run in Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch

__all__ = [
    "has_gpu", "device", "default_dtype", "interpreting", "reading_size", "arch",
    "checking_values", "set_value_checks",
    "LAUNCH_TABLE", "launch_configs", "launch", "launch_config", "set_autotune", "autotuning",
    "SharedMemoryError", "grads_by_autograd", "describe", "print_environment",
]


def has_gpu() -> bool:
    """True when PyTorch sees a CUDA (or ROCm) device."""
    return torch.cuda.is_available()


def _switch_on_interpreter() -> None:
    """Set TRITON_INTERPRET=1 on a machine without a GPU, unless the variable is set: an explicit choice wins.

    Triton reads the variable when it decorates a function with `@triton.jit`, its own library functions
    (`tl.sum`, `tl.max`, …) included, which it decorates when `triton` is imported. So the switch works only
    before the first `import triton`; after it, interpreted kernels would fail inside Triton with "Cannot call
    @triton.jit'd outside of the scope of a kernel". We raise instead, saying what to do.
    """
    if has_gpu() or "TRITON_INTERPRET" in os.environ:
        return
    if "triton" in sys.modules:
        raise ImportError(
            "minisparse: this machine has no GPU, so minisparse runs its Triton kernels in Triton's interpreter, "
            "which must be switched on before `import triton`, and triton is already imported. Import minisparse "
            "before triton (or before packages that import it, such as fla), or set the environment variable "
            "TRITON_INTERPRET=1 before starting Python (TRITON_INTERPRET=0 to use only the PyTorch ops).")
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


def arch(dev: torch.device | str) -> str:
    """The row of `LAUNCH_TABLE` a device reads: "interpreter" for CPU tensors, else "sm_90" (Hopper and newer),
    "sm_80" (Ampere, Ada) or "sm_75" (Turing: a Colab T4) by compute capability."""
    found = _arch_of.get(dev)
    if found is None:
        d = torch.device(dev)
        if d.type != "cuda":
            found = "interpreter"
        else:
            major, _ = torch.cuda.get_device_capability(d)
            found = "sm_90" if major >= 9 else "sm_80" if major >= 8 else "sm_75"
        _arch_of[dev] = found
    return found


_arch_of: dict = {}  # device -> arch(device): launches ask on every call


def sm_count(dev: torch.device | str) -> int:
    """The streaming multiprocessors of a CUDA device (what a split-K launcher fills); 4 for CPU tensors, so that the
    interpreter plans a few splits and tests walk the split paths."""
    found = _sms_of.get(dev)
    if found is None:
        d = torch.device(dev)
        found = torch.cuda.get_device_properties(d).multi_processor_count if d.type == "cuda" else 4
        _sms_of[dev] = found
    return found


_sms_of: dict = {}  # device -> sm_count(device)


# ------------------------------------------------------------------------------------------------- value checks
_value_checks = False


def checking_values(dev: torch.device | str) -> bool:
    """Whether a Triton op on `dev` checks the values of its inputs (gate ranges, NaN), not only shapes and dtypes.

    The rule: on CPU tensors (the interpreter), always — the check is cheap next to interpreted kernels; on CUDA
    tensors only after `set_value_checks(True)`, because reading a reduction back is a host sync, and never during
    CUDA graph capture. The `naive_*` ops check values always and do not ask.
    """
    if torch.device(dev).type != "cuda":
        return True
    return _value_checks and not torch.cuda.is_current_stream_capturing()


def set_value_checks(enabled: bool) -> bool:
    """Make the Triton ops on CUDA tensors check their inputs' values (off by default); return the previous setting.

    On, each call reduces its gates to their range and reads it back (one host sync) before launching its kernels:
    a positive log decay, β outside [0, 2] or a NaN then raises instead of computing a wrong answer. Use it while
    debugging a model; the `naive_*` ops and every op on CPU tensors check always.

    >>> previous = set_value_checks(True)
    >>> _ = set_value_checks(previous)
    """
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"set_value_checks: enabled must be True or False, got {enabled!r}")
    previous, _value_checks = _value_checks, enabled
    return previous


# ------------------------------------------------------------------------------------------------ launch table
def _cfg(num_warps: int = 4, num_stages: int = 2, **tiles) -> dict:
    return dict(tiles, num_warps=num_warps, num_stages=num_stages)


_ATTN_SMALL = [_cfg(4, 1, BLOCK_M=64, BLOCK_N=32), _cfg(4, 1, BLOCK_M=32, BLOCK_N=32), _cfg(4, 1, BLOCK_M=16, BLOCK_N=16)]

# kernel -> row -> launch configurations, best first. A row is an `arch(...)` name, optionally with ".fp32" for
# float32 inputs (whose operands take twice the shared memory). `launch` reads the row of the call's device, else the
# next older architecture's, tries the configurations in order and keeps the first that compiles within the GPU's
# shared memory. The first configuration of each sm_90 row is the fastest of the H200 or H100 sweeps in bench/notes/ at
# the benchmarks' sizes; the others are autotuning candidates and narrower tiles for GPUs with less shared memory a block
# (a T4 has 64 KiB, an A100 163 KiB, an H200 227 KiB). "interpreter" rows favour few, large programs: fast to
# interpret.
LAUNCH_TABLE: dict[str, dict[str, list[dict]]] = {
    # chapter 1, flash attention (BLOCK_M query rows, BLOCK_N key rows a tile); ".d256": head dims over 128
    "attention.fwd": {
        "interpreter": [_cfg(BLOCK_M=64, BLOCK_N=64)],
        "sm_90": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=64), *_ATTN_SMALL],
        "sm_90.fp32": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64), *_ATTN_SMALL],
        "sm_80": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64), *_ATTN_SMALL],
    },
    "attention.fwd.d256": {
        "interpreter": [_cfg(BLOCK_M=64, BLOCK_N=64)],
        "sm_90": [_cfg(8, 2, BLOCK_M=128, BLOCK_N=64), _cfg(4, 2, BLOCK_M=64, BLOCK_N=32), *_ATTN_SMALL],
        "sm_90.fp32": _ATTN_SMALL,
        "sm_80": _ATTN_SMALL,
    },
    "attention.dkdv": {  # BLOCK_N key rows a program owns, BLOCK_M query rows a loop step
        "interpreter": [_cfg(BLOCK_M=64, BLOCK_N=64)],
        "sm_90": [_cfg(4, 3, BLOCK_M=32, BLOCK_N=64), *_ATTN_SMALL],
        "sm_90.fp32": [_cfg(4, 2, BLOCK_M=32, BLOCK_N=64), *_ATTN_SMALL],
        "sm_80": [_cfg(4, 2, BLOCK_M=32, BLOCK_N=64), *_ATTN_SMALL],
    },
    "attention.dkdv.d256": {
        "interpreter": [_cfg(BLOCK_M=64, BLOCK_N=64)],
        "sm_90": [_cfg(8, 2, BLOCK_M=32, BLOCK_N=64), *_ATTN_SMALL],
        "sm_90.fp32": _ATTN_SMALL,
        "sm_80": _ATTN_SMALL,
    },
    "attention.dq": {
        "interpreter": [_cfg(BLOCK_M=64, BLOCK_N=64)],
        "sm_90": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=64), *_ATTN_SMALL],
        "sm_90.fp32": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64), *_ATTN_SMALL],
        "sm_80": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64), *_ATTN_SMALL],
    },
    "attention.dq.d256": {
        "interpreter": [_cfg(BLOCK_M=64, BLOCK_N=64)],
        "sm_90": [_cfg(8, 2, BLOCK_M=64, BLOCK_N=32), *_ATTN_SMALL],
        "sm_90.fp32": _ATTN_SMALL,
        "sm_80": _ATTN_SMALL,
    },
    "attention.delta": {"interpreter": [_cfg(BLOCK=64)], "sm_75": [_cfg(4, 3, BLOCK=64)]},
    # chapter 2, grouped GEMM. Forward: BLOCK_M rows of one expert (the host's tile schedule depends on it, so every
    # configuration of a row shares it); ".fp32" halves BLOCK_K, the dimension staged per pipeline step.
    "moe.grouped_mm": {
        "interpreter": [_cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)],
        "sm_90": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                  _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                  _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                  _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)],
        "sm_90.fp32": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
                       _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                       _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                       _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8)],
        "sm_80": [_cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                  _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
                  _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)],
        "sm_80.fp32": [_cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
                       _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=16, GROUP_M=8),
                       _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)],
        "sm_75": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                  _cfg(4, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                  _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
        "sm_75.fp32": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
                       _cfg(4, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
                       _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
    },
    "moe.grouped_mm_dw": {  # BLOCK_K × BLOCK_N tile of dW, BLOCK_M rows a step (halved for fp32)
        "interpreter": [_cfg(BLOCK_K=32, BLOCK_N=64, BLOCK_M=32)],
        "sm_90": [_cfg(8, 3, BLOCK_K=128, BLOCK_N=256, BLOCK_M=64), _cfg(8, 3, BLOCK_K=128, BLOCK_N=128, BLOCK_M=64),
                  _cfg(4, 4, BLOCK_K=128, BLOCK_N=128, BLOCK_M=32)],
        "sm_90.fp32": [_cfg(8, 3, BLOCK_K=128, BLOCK_N=128, BLOCK_M=32),
                       _cfg(8, 3, BLOCK_K=128, BLOCK_N=256, BLOCK_M=32),
                       _cfg(4, 4, BLOCK_K=128, BLOCK_N=128, BLOCK_M=16)],
        "sm_80": [_cfg(8, 3, BLOCK_K=128, BLOCK_N=128, BLOCK_M=32), _cfg(4, 4, BLOCK_K=64, BLOCK_N=128, BLOCK_M=32)],
        "sm_80.fp32": [_cfg(8, 3, BLOCK_K=128, BLOCK_N=128, BLOCK_M=16), _cfg(4, 4, BLOCK_K=64, BLOCK_N=128, BLOCK_M=16)],
        "sm_75": [_cfg(4, 2, BLOCK_K=64, BLOCK_N=64, BLOCK_M=32), _cfg(4, 2, BLOCK_K=64, BLOCK_N=128, BLOCK_M=32)],
        "sm_75.fp32": [_cfg(4, 2, BLOCK_K=64, BLOCK_N=64, BLOCK_M=16), _cfg(4, 2, BLOCK_K=64, BLOCK_N=128, BLOCK_M=16)],
    },
    # chapter 3, MLA decoding: BLOCK_H query rows (heads × tokens) and BLOCK_N cached tokens a tile, for a latent of
    # up to 512 (the launcher shortens BLOCK_N for larger ones)
    "mla.decode_split": {
        "interpreter": [_cfg(BLOCK_H=16, BLOCK_N=32)],
        "sm_90": [_cfg(8, 2, BLOCK_H=64, BLOCK_N=64), _cfg(8, 2, BLOCK_H=64, BLOCK_N=32),
                  _cfg(8, 2, BLOCK_H=32, BLOCK_N=64), _cfg(8, 3, BLOCK_H=64, BLOCK_N=32),
                  _cfg(4, 2, BLOCK_H=32, BLOCK_N=32),
                  # up to 16 query rows (16 heads, one token) try these first: a head block of 16 wastes no rows
                  _cfg(8, 2, BLOCK_H=16, BLOCK_N=128), _cfg(4, 2, BLOCK_H=16, BLOCK_N=64)],
        "sm_80": [_cfg(8, 1, BLOCK_H=32, BLOCK_N=32), _cfg(8, 2, BLOCK_H=32, BLOCK_N=32),
                  _cfg(4, 2, BLOCK_H=16, BLOCK_N=64), _cfg(8, 2, BLOCK_H=64, BLOCK_N=32)],
        "sm_90.fp32": [_cfg(4, 1, BLOCK_H=16, BLOCK_N=32)],
        "sm_80.fp32": [_cfg(4, 1, BLOCK_H=16, BLOCK_N=32)],
        "sm_75": [_cfg(4, 1, BLOCK_H=16, BLOCK_N=16), _cfg(4, 1, BLOCK_H=16, BLOCK_N=32)],
        "sm_75.fp32": [_cfg(4, 1, BLOCK_H=16, BLOCK_N=16)],
    },
    "mla.decode_combine": {"interpreter": [_cfg(BLOCK_H=16)], "sm_75": [_cfg(4, 3, BLOCK_H=16)]},
    # chapter 4, lightning attention, chunks of 64: state tiles BK × BV; the output kernel walks K in blocks of BK, the
    # gradient kernel holds all of K; both tile V by BV. H200 order from a sweep at B 2, T 8K, H 16, K = V = 128, bf16
    # (bench/notes/lightning.md, 2026-12-04).
    "lightning.fwd_states": {
        "interpreter": [_cfg(BK=64, BV=64)],
        "sm_90": [_cfg(4, 4, BK=64, BV=64), _cfg(2, 4, BK=32, BV=64), _cfg(4, 4, BK=32, BV=64),
                  _cfg(4, 3, BK=32, BV=64)],
        "sm_80": [_cfg(4, 2, BK=64, BV=64)],
        "sm_75": [_cfg(4, 1, BK=64, BV=32)],
    },
    "lightning.fwd_output": {
        "interpreter": [_cfg(BK=64, BV=64)],
        "sm_90": [_cfg(4, 2, BK=64, BV=128), _cfg(4, 3, BK=32, BV=128), _cfg(4, 2, BK=64, BV=64),
                  _cfg(8, 2, BK=64, BV=128)],
        "sm_80": [_cfg(4, 2, BK=128, BV=64)],
        "sm_75": [_cfg(4, 1, BK=128, BV=32)],
    },
    "lightning.bwd_dstates": {
        "interpreter": [_cfg(BK=64, BV=64)],
        "sm_90": [_cfg(4, 3, BK=32, BV=64), _cfg(2, 3, BK=64, BV=32), _cfg(2, 3, BK=64, BV=64)],
        "sm_80": [_cfg(4, 2, BK=64, BV=64)],
        "sm_75": [_cfg(4, 1, BK=64, BV=32)],
    },
    "lightning.bwd_dqkv": {  # ".k128": K over 64, where two [C, K] fp32 accumulators live through the V loop
        "interpreter": [_cfg(BV=64)],
        "sm_80": [_cfg(4, 2, BV=64)],
        "sm_75": [_cfg(4, 1, BV=32)],
    },
    "lightning.bwd_dqkv.k128": {
        "interpreter": [_cfg(BV=64)],
        "sm_90": [_cfg(4, 3, BV=64), _cfg(4, 2, BV=64), _cfg(8, 2, BV=64)],
        "sm_80": [_cfg(8, 2, BV=64)],
        "sm_75": [_cfg(8, 1, BV=32)],
    },
    "lightning.fused_recurrent": {"interpreter": [_cfg(BV=32)], "sm_75": [_cfg(4, 3, BV=32)]},
    # chapter 5, the gated delta rule, chunks of 64. BV: the value columns a program owns.
    "deltanet.fwd_wy": {  # BK = 32 column blocks of K inside; 2 warps: the solve's many small reductions
        "interpreter": [_cfg(BV=32)],
        "sm_80": [_cfg(2, 3, BV=32)],
        "sm_75": [_cfg(4, 3, BV=32)],
    },
    "deltanet.fwd_states": {  # the sequential scan: narrow V-tiles keep more programs busy
        "interpreter": [_cfg(1, 1, BV=32)],
        "sm_75": [_cfg(4, 4, BV=32), _cfg(4, 1, BV=16)],
        "sm_75.fp32": [_cfg(8, 1, BV=32), _cfg(4, 1, BV=16)],
    },
    "deltanet.fwd_states.recompute": {  # the backward's recomputation: 16-bit K, fp32 W and states
        "interpreter": [_cfg(1, 1, BV=32)],
        "sm_75": [_cfg(8, 3, BV=32), _cfg(4, 1, BV=16)],
        "sm_75.fp32": [_cfg(8, 1, BV=32), _cfg(4, 1, BV=16)],
    },
    "deltanet.fwd_output": {
        "interpreter": [_cfg(BV=128)],
        "sm_80": [_cfg(4, 2, BV=128), _cfg(4, 2, BV=64), _cfg(4, 2, BV=32), _cfg(4, 2, BV=16)],
        "sm_75": [_cfg(4, 2, BV=64), _cfg(4, 2, BV=32), _cfg(4, 2, BV=16)],
    },
    "deltanet.bwd_du_local": {
        "interpreter": [_cfg(BV=64)],
        "sm_75": [_cfg(4, 3, BV=64), _cfg(4, 3, BV=32), _cfg(4, 3, BV=16)],
    },
    "deltanet.bwd_states": {  # a T4 loads each operand right before its product: 24 against 72 KiB at K = 128
        "interpreter": [_cfg(BV=32)],
        "sm_80": [_cfg(8, 1, BV=32), _cfg(8, 1, BV=16)],
        "sm_75": [_cfg(8, 1, BV=32, LATE_LOADS=True), _cfg(8, 1, BV=16, LATE_LOADS=True)],
    },
    "deltanet.bwd_wy": {  # dV and A's terms: a chunk a program; BK: the K-blocks of K·S and of A's dK
        "interpreter": [_cfg(BK=32, BV=32)],
        "sm_90": [_cfg(4, 1, BK=64, BV=64), _cfg(4, 1, BK=64, BV=32), _cfg(4, 1, BK=32, BV=64)],
        "sm_75": [_cfg(8, 1, BK=32, BV=32), _cfg(8, 1, BK=32, BV=16)],
    },
    "deltanet.bwd_keys": {  # dq, dk: a block of BK key channels of a chunk a program
        "interpreter": [_cfg(BK=32, BV=32)],
        "sm_90": [_cfg(4, 2, BK=64, BV=16), _cfg(4, 1, BK=64, BV=32), _cfg(8, 2, BK=64, BV=32),
                  _cfg(4, 1, BK=32, BV=16)],
        "sm_75": [_cfg(8, 1, BK=32, BV=32), _cfg(8, 1, BK=32, BV=16), _cfg(8, 1, BK=16, BV=16)],
    },
    "deltanet.rows": {"interpreter": [_cfg(BR=16)], "sm_75": [_cfg(4, 3, BR=16)]},  # l2norm and dq/dk row kernels
    "deltanet.fused_recurrent": {"interpreter": [_cfg(BV=32)], "sm_75": [_cfg(4, 3, BV=32)]},
    # chapter 6, KDA, chunks of 64 with sub-chunks of 16. BV: the value columns a program owns. Order from sweeps at
    # B 2, T 8K, H 16, K = V = 128, bf16 on an H200 and H100s (bench/notes/kda.md); the scans multiply W and kd as
    # stored, in the inputs' 16-bit dtype; a T4 takes the narrower rows (bench/notes/t4.md).
    "kda.fwd_between": {  # the products between sub-chunks, a sub-chunk a program (4 warps: 0.256 ms, H100)
        "interpreter": [_cfg()],
        "sm_80": [_cfg(4, 1), _cfg(8, 1)],
        "sm_75": [_cfg(4, 1)],
    },
    "kda.fwd_products": {  # one sub-chunk's rows of A and P a program; 10 KiB at 4 warps (sm_90)
        "interpreter": [_cfg()],
        "sm_80": [_cfg(4, 1), _cfg(2, 1)],
        "sm_75": [_cfg(4, 1), _cfg(2, 1)],
    },
    "kda.fwd_wy": {  # 48 KiB, 255 registers at 2 warps without spills as launched (sm_90; bench/notes/kda.md)
        "interpreter": [_cfg(BV=64)],
        "sm_80": [_cfg(2, 1, BV=32), _cfg(4, 1, BV=32)],
        "sm_75": [_cfg(4, 1, BV=32), _cfg(4, 1, BV=16)],
    },
    "kda.fwd_states": {  # 106 KiB at 4 warps, 3 stages (pipelined), 86 registers (sm_90); 16 KiB (sm_75, fp16)
        "interpreter": [_cfg(1, 1, BV=64)],
        "sm_80": [_cfg(4, 3, BV=16), _cfg(8, 2, BV=32), _cfg(4, 1, BV=16)],
        "sm_75": [_cfg(8, 1, BV=32), _cfg(4, 1, BV=16)],
    },
    "kda.fwd_output": {  # 24 KiB at BV = 32, 1 stage
        "interpreter": [_cfg(BV=64)],
        "sm_80": [_cfg(4, 1, BV=32), _cfg(4, 2, BV=64)],
        "sm_75": [_cfg(4, 1, BV=32), _cfg(4, 1, BV=16)],
    },
    "kda.fused_recurrent": {"interpreter": [_cfg(BV=32)], "sm_75": [_cfg(4, 3, BV=32)]},
    "kda.bwd_du_local": {  # scale Pᵀ dO, a chunk a program: P fp32 once, dO and dU in V-tiles
        "interpreter": [_cfg(BV=64)],
        "sm_80": [_cfg(4, 2, BV=64), _cfg(4, 2, BV=32)],
        "sm_75": [_cfg(4, 1, BV=32), _cfg(4, 1, BV=16)],
    },
    "kda.bwd_states": {  # 108 KiB at 4 warps, 2 stages, BV = 16, 36 KiB at 1 stage, BV = 32 (sm_90); 16 KiB
        # at 4 warps, BV = 16 (sm_75, fp16)
        "interpreter": [_cfg(1, 1, BV=64)],  # 8 warps hit illegal memory accesses at K = 128 (H200, H100)
        "sm_80": [_cfg(4, 2, BV=16), _cfg(4, 1, BV=32), _cfg(4, 1, BV=16)],
        "sm_75": [_cfg(4, 1, BV=16)],
    },
    "kda.bwd_chunk": {  # 60 KiB at 8 warps, 1 stage, BV = 32 (sm_90); 32 KiB at BV = 16 (sm_75)
        "interpreter": [_cfg(BV=64)],
        "sm_80": [_cfg(8, 1, BV=32), _cfg(8, 1, BV=16)],
        "sm_75": [_cfg(8, 1, BV=16)],
    },
    "kda.bwd_products": {  # one sub-chunk's rows and block of 32 channels a program; 26 KiB
        "interpreter": [_cfg()],
        "sm_80": [_cfg(2, 1), _cfg(4, 1)],
        "sm_75": [_cfg(4, 1), _cfg(2, 1)],
    },
    "kda.suffix_sums": {"interpreter": [_cfg()], "sm_75": [_cfg(4, 2)]},
    "kda.gate_sums": {  # each sub-chunk's range sums, once, for a block of BK channels
        "interpreter": [_cfg(BK=32)],
        "sm_80": [_cfg(2, 1, BK=128), _cfg(4, 1, BK=128), _cfg(4, 1, BK=32)],
        "sm_75": [_cfg(4, 1, BK=32)],
    },
    # chapter 7, selected (block-sparse) attention, NSA's and MoBA's. BN: keys a tile (capped at the block
    # size); BR: query rows a step of the key-centric dK/dV kernel (BR / G tokens of a GQA group). At D = 128
    # in 16 bits, a T4 (64 KiB a block) fits BN = 32, one stage. sm_90: the forward's row swept at 64K (4 warps,
    # BN 64, 2 stages: 3 and 4 are slower; bench/notes/nsa.md); dQ at 2 or 3 stages is flat, dK/dV is not swept
    # yet. MoBA's backward has rows of its own, equal to NSA's for now, so that a sweep at its chunk sizes can set
    # them apart.
    "nsa.selection.fwd": {
        "interpreter": [_cfg(BN=64)],
        "sm_90": [_cfg(4, 2, BN=64), _cfg(4, 1, BN=32)],
        "sm_80": [_cfg(4, 2, BN=64), _cfg(4, 1, BN=32)],
        "sm_75": [_cfg(4, 1, BN=32), _cfg(4, 1, BN=16)],
    },
    **{f"{kind}.selection.dq": {
        "interpreter": [_cfg(BN=64)],
        "sm_90": [_cfg(4, 2, BN=64), _cfg(4, 1, BN=32)],
        "sm_80": [_cfg(4, 2, BN=64), _cfg(4, 1, BN=32)],
        "sm_75": [_cfg(4, 1, BN=32), _cfg(4, 1, BN=16)],
    } for kind in ("nsa", "moba")},
    # MoBA's forward: the gate (BM query tokens a program, BC chunk means a tile), the key-centric partial results
    # (NT tiles of BR (query, slot) pairs that chose one chunk, BN keys a tile) and the own-chunk attention + merge
    # (BM tokens). sm_90: the fastest of bench/notes/moba_sweep.py's at 32K (bench/notes/nsa.md)
    "moba.gate": {
        "interpreter": [_cfg(BM=16, BC=16)],
        "sm_80": [_cfg(4, 2, BM=64, BC=64), _cfg(4, 2, BM=32, BC=64)],
        "sm_75": [_cfg(4, 1, BM=32, BC=32)],
    },
    "moba.partial": {  # NT: tiles of BR pairs a program; BN ≥ the chunk keeps its k, v in registers
        "interpreter": [_cfg(BR=16, NT=2, BN=32)],
        "sm_90": [_cfg(4, 4, BR=64, NT=4, BN=128), _cfg(4, 2, BR=64, NT=4, BN=64), _cfg(8, 2, BR=64, NT=4, BN=128)],
        "sm_80": [_cfg(4, 3, BR=64, NT=4, BN=128), _cfg(4, 2, BR=64, NT=4, BN=64)],
        "sm_75": [_cfg(4, 1, BR=32, NT=4, BN=16), _cfg(4, 1, BR=32, NT=4, BN=32)],
    },
    "moba.merge": {
        "interpreter": [_cfg(BM=16, BN=32)],
        "sm_90": [_cfg(4, 3, BM=64, BN=64), _cfg(8, 2, BM=128, BN=64)],
        "sm_80": [_cfg(4, 2, BM=64, BN=64), _cfg(4, 1, BM=64, BN=32)],
        "sm_75": [_cfg(4, 1, BM=32, BN=16), _cfg(4, 1, BM=16, BN=32)],
    },
    "nsa.mean_pool": {  # BT tokens of a block a tile (capped at the block)
        "interpreter": [_cfg(BT=16)],
        "sm_80": [_cfg(4, 1, BT=32)],
    },
    "nsa.gated_sum": {  # BR rows (token, head) of the gated sum, forward and backward; its sweep is flat (± 1 %)
        "interpreter": [_cfg(BR=16)],
        "sm_80": [_cfg(8, 1, BR=32), _cfg(4, 1, BR=16)],
        "sm_75": [_cfg(4, 1, BR=16)],
    },
    # NSA's decoding step (one token, three kernels): BC summaries a tile of the compressed scores; BN keys a tile of
    # the selected blocks and the window (capped at the block size) and TOPN scores a load of the top-n ([RG heads,
    # BNA summaries], RG = TOPN // BNA, at least 1); then the merge. sm_90: kernels 2 and 3 launched
    # early (launch_pdl: programmatic dependent launch; each waits in the kernel for what it reads of the previous).
    "nsa.decode.scores": {
        "interpreter": [_cfg(BC=16)],
        "sm_80": [_cfg(4, 2, BC=64), _cfg(4, 1, BC=32)],
        "sm_75": [_cfg(4, 1, BC=32), _cfg(4, 1, BC=16)],
    },
    "nsa.decode.select": {
        "interpreter": [_cfg(BN=16, TOPN=8192)],
        "sm_90": [_cfg(8, 2, BN=64, TOPN=8192, launch_pdl=True), _cfg(8, 2, BN=64, TOPN=8192),
                  _cfg(4, 1, BN=32, TOPN=8192, launch_pdl=True)],
        "sm_80": [_cfg(8, 2, BN=64, TOPN=8192), _cfg(4, 1, BN=32, TOPN=8192)],
        "sm_75": [_cfg(4, 1, BN=32, TOPN=8192), _cfg(4, 1, BN=16, TOPN=8192)],
    },
    "nsa.decode.merge": {  # BGM heads of a group × BVM value dims a program, BP partial slots a load
        "interpreter": [_cfg(BP=4, BGM=2, BVM=16)],
        "sm_90": [_cfg(4, 2, BP=16, BGM=4, BVM=64, launch_pdl=True), _cfg(4, 2, BP=16, BGM=4, BVM=64)],
        "sm_80": [_cfg(4, 2, BP=16, BGM=4, BVM=64)],
        "sm_75": [_cfg(4, 1, BP=16, BGM=4, BVM=64)],
    },
    "nsa.select": {  # BT tokens a program of the fused top-n (BT·G rows), BC summaries a tile; sm_90: swept at 64K
        "interpreter": [_cfg(BT=4, BC=64)],
        "sm_90": [_cfg(4, 2, BT=4, BC=32), _cfg(4, 2, BT=4, BC=64), _cfg(4, 1, BT=8, BC=32)],
        "sm_80": [_cfg(4, 2, BT=4, BC=64), _cfg(4, 2, BT=2, BC=64), _cfg(4, 1, BT=1, BC=32)],
        "sm_75": [_cfg(4, 1, BT=1, BC=32), _cfg(4, 1, BT=1, BC=16)],
    },
    **{f"{kind}.selection.dkv": {
        "interpreter": [_cfg(BN=64, BR=64)],
        "sm_90": [_cfg(4, 2, BN=64, BR=64), _cfg(4, 1, BN=32, BR=32)],
        "sm_80": [_cfg(4, 2, BN=64, BR=64), _cfg(4, 1, BN=32, BR=32)],
        "sm_75": [_cfg(4, 1, BN=32, BR=32), _cfg(4, 1, BN=16, BR=16)],
    } for kind in ("nsa", "moba")},
    # chapter 8, DeepSeek sparse attention. BG: query heads a program (a head block of one key head's group, capped
    # at the padded group); BN: selected key slots a tile. ".d512": key rows over 256 dims (MLA's 512 + 64 latent),
    # whose sm_90 entry mirrors "mla.decode_split" (the same 64-head × 576-dim tiles). Shared memory as compiled on a
    # CPU (bench/notes/dsa.md): 217 KiB for the sm_90 .d512 forward, 132 KiB for its backward; a T4 cannot hold a
    # 576-dim tile (68 KiB at 16 × 16), so the latent form there raises and names the PyTorch version. sm_90:
    # the .d512 forward row swept on an H100 (bench/notes/dsa.md, 2026-12-05), the others unswept.
    "dsa.sparse.fwd": {
        "interpreter": [_cfg(BG=64, BN=64)],
        "sm_90": [_cfg(4, 2, BG=64, BN=64), _cfg(8, 2, BG=64, BN=64), _cfg(4, 2, BG=32, BN=64),
                  _cfg(4, 1, BG=16, BN=32)],
        "sm_80": [_cfg(4, 2, BG=64, BN=64), _cfg(4, 2, BG=32, BN=32), _cfg(4, 1, BG=16, BN=32)],
        "sm_75": [_cfg(4, 1, BG=16, BN=32), _cfg(4, 1, BG=16, BN=16)],
    },
    "dsa.sparse.fwd.d512": {
        "interpreter": [_cfg(BG=64, BN=32)],
        "sm_90": [_cfg(8, 2, BG=64, BN=64), _cfg(8, 2, BG=64, BN=32), _cfg(8, 1, BG=64, BN=32),
                  _cfg(4, 1, BG=32, BN=32), _cfg(4, 1, BG=16, BN=16)],
        "sm_80": [_cfg(8, 1, BG=64, BN=32), _cfg(4, 1, BG=32, BN=32), _cfg(4, 1, BG=16, BN=16)],
        "sm_75": [_cfg(4, 1, BG=16, BN=16)],
    },
    "dsa.sparse.bwd": {
        "interpreter": [_cfg(BG=64, BN=64)],
        "sm_90": [_cfg(8, 2, BG=64, BN=32), _cfg(4, 1, BG=32, BN=32), _cfg(4, 1, BG=16, BN=16)],
        "sm_80": [_cfg(4, 1, BG=32, BN=32), _cfg(4, 1, BG=16, BN=16)],
        "sm_75": [_cfg(4, 1, BG=16, BN=16)],
    },
    "dsa.sparse.bwd.d512": {
        "interpreter": [_cfg(BG=64, BN=32)],
        "sm_90": [_cfg(8, 1, BG=32, BN=32), _cfg(4, 1, BG=16, BN=32), _cfg(4, 1, BG=16, BN=16)],
        "sm_80": [_cfg(4, 1, BG=16, BN=32), _cfg(4, 1, BG=16, BN=16)],
        "sm_75": [_cfg(4, 1, BG=16, BN=16)],
    },
    "dsa.sparse.merge": {"interpreter": [_cfg(BR=16)], "sm_75": [_cfg(4, 2, BR=16)]},
    # the lightning indexer's scores: BT query tokens × all HI heads (BT·HI rows of one product), BN keys a tile
    "dsa.indexer": {
        "interpreter": [_cfg(BT=4, BN=64)],
        "sm_90": [_cfg(8, 3, BT=4, BN=64), _cfg(8, 3, BT=8, BN=64), _cfg(8, 3, BT=2, BN=128), _cfg(4, 3, BT=2, BN=64)],
        "sm_80": [_cfg(8, 2, BT=2, BN=64), _cfg(8, 2, BT=1, BN=64)],
        "sm_75": [_cfg(8, 1, BT=1, BN=32), _cfg(4, 1, BT=1, BN=16)],
    },
    # the same kernel while decoding: one query token a block, the keys split into ranges (bench/notes/dsa.md)
    "dsa.indexer.split": {
        "interpreter": [_cfg(BT=1, BN=64)],
        "sm_90": [_cfg(4, 3, BT=1, BN=64), _cfg(8, 3, BT=1, BN=64), _cfg(4, 4, BT=1, BN=128)],
        "sm_80": [_cfg(4, 2, BT=1, BN=64), _cfg(8, 2, BT=1, BN=64)],
        "sm_75": [_cfg(4, 1, BT=1, BN=32), _cfg(4, 1, BT=1, BN=16)],
    },
    "dsa.indexer.split.fp8": {  # FP8 (sm_89+): wider key tiles
        "interpreter": [_cfg(BT=1, BN=64)],
        "sm_90": [_cfg(4, 3, BT=1, BN=128), _cfg(4, 5, BT=1, BN=128), _cfg(4, 3, BT=1, BN=64)],
        "sm_80": [_cfg(4, 2, BT=1, BN=128), _cfg(4, 2, BT=1, BN=64)],
    },
}

_ARCH_ORDER = ("sm_90", "sm_80", "sm_75")
_forced: dict[str, dict] = {}  # kernel -> configuration, set by `launch_config`
_chosen: dict = {}  # (kernel, row, dtype, key) -> index into the row: the first configuration that fitted
_rows: dict = {}  # (kernel, device, dtype) -> its LAUNCH_TABLE row
_tuned: dict = {}  # (kernel, configurations) -> the triton.autotune wrapper of that kernel
_autotune = False


def launch_configs(kernel: str, dev: torch.device | str, dtype: torch.dtype,
                   prefer: Callable[[dict], bool] | None = None) -> list[dict]:
    """The launch configurations `kernel` would try on `dev` for inputs of `dtype`, best first (copies): the one
    `launch_config` forces, if any, else its `LAUNCH_TABLE` row, the entries `prefer` accepts first (as `launch`
    orders them). A launcher that plans on a tile size (a schedule built on the host) reads it here."""
    if kernel in _forced:
        return [dict(_forced[kernel])]
    return [dict(c) for _, c in _preferred_first(_row(kernel, dev, dtype), prefer)]


def _preferred_first(row: list[dict], prefer) -> list[tuple[int, dict]]:
    """(index, entry) of a row, the entries `prefer` accepts first, each group in the row's order."""
    indexed = list(enumerate(row))
    return indexed if prefer is None else sorted(indexed, key=lambda ic: not prefer(ic[1]))


def _row(kernel: str, dev, dtype: torch.dtype) -> list[dict]:
    """The table row `kernel` reads on `dev` for `dtype` (not copied: callers must not modify it)."""
    found = _rows.get((kernel, dev, dtype))
    if found is not None:
        return found
    if kernel not in LAUNCH_TABLE:
        raise KeyError(f"runtime.launch: no launch configurations for {kernel!r}; LAUNCH_TABLE has "
                       f"{sorted(LAUNCH_TABLE)}")
    rows = LAUNCH_TABLE[kernel]
    row = arch(dev)
    i = _ARCH_ORDER.index(row) if row != "interpreter" else 0
    # the device's architecture, then older ones, then newer ones (nearest first)
    order = [row] if row == "interpreter" else [*_ARCH_ORDER[i:], *_ARCH_ORDER[:i][::-1]]
    for name in order:
        for key in ((f"{name}.fp32", name) if dtype == torch.float32 else (name,)):
            if key in rows:
                _rows[(kernel, dev, dtype)] = rows[key]
                return rows[key]
    raise KeyError(f"runtime.launch: LAUNCH_TABLE[{kernel!r}] has no row for {row} (rows: {sorted(rows)})")


@contextlib.contextmanager
def launch_config(kernel: str, **config):
    """Force one launch configuration of `kernel` inside a `with` block (tests of odd tiles, sweeps in bench/notes).

    >>> with launch_config("attention.fwd", BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1):
    ...     pass
    """
    if kernel not in LAUNCH_TABLE:
        raise KeyError(f"launch_config: no kernel {kernel!r} in LAUNCH_TABLE ({sorted(LAUNCH_TABLE)})")
    saved = _forced.get(kernel)
    _forced[kernel] = dict(config)
    try:
        yield
    finally:
        if saved is None:
            _forced.pop(kernel, None)
        else:
            _forced[kernel] = saved


def set_autotune(enabled: bool) -> bool:
    """Autotune every kernel whose table row has several configurations (off by default); return the previous setting.

    On, the first call of each kernel for a new problem size times the row's configurations (Triton's autotuner) and
    keeps the fastest; off, each kernel runs the row's first configuration that fits. The benchmarks in bench/
    turn it on; the tests and the chapters leave it off, so that their first calls are not timing runs.
    """
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: enabled must be True or False, got {enabled!r}")
    previous, _autotune = _autotune, enabled
    return previous


def autotuning() -> bool:
    """Whether `launch` autotunes (see `set_autotune`)."""
    return _autotune


def launch(kernel: str, fn, grid, args: tuple, constexprs: dict, *, device, dtype, key=(), fit=None,
           autotune_key: list[str] | None = None, prefer: Callable[[dict], bool] | None = None,
           instead: str = "the naive PyTorch version of this op") -> dict:
    """Launch the Triton kernel `fn` (named `kernel` in `LAUNCH_TABLE`) with its configuration for this call; return
    the configuration used.

    grid(config) -> the launch grid. `constexprs`: the call's compile-time constants beside the table's tiles.
    `fit(config) -> config` adapts a table entry to the call (e.g. caps a tile at the padded head dimension). The
    configuration is the one forced by `launch_config`, else — with autotuning on and `autotune_key` given — the
    fastest of the row, else the first of the row that compiles within this GPU's shared memory: a launch that asks
    for too much raises OutOfResources before it runs, so the next is tried, and the one that fits is remembered per
    (kernel, architecture, dtype, key) so later calls go straight to it — `key` must hold whatever `fit` depends on
    that changes which configurations fit (e.g. a padded head dimension). `prefer(entry) -> bool` moves the row's
    entries it accepts to the front (e.g. a tile as tall as this call's rows), each group in the row's order; `key`
    must then hold what `prefer` depends on too. When none fits, a RuntimeError names the kernel and says what to use
    `instead`.
    """
    fit = fit or _same
    forced = _forced.get(kernel)
    if forced is None and not _autotune:  # the common case: the configuration that fitted last time
        i = _chosen.get((kernel, arch(device), dtype, key))
        if i is not None:
            config = _interpretable(fit(dict(_row(kernel, device, dtype)[i])))
            try:
                fn[grid(config)](*args, **constexprs, **config, **_compile_options())
                return config
            except Exception as err:  # a larger problem of the same key no longer fits: try the row from the top
                if type(err).__name__ != "OutOfResources":
                    raise
    from triton.runtime.errors import OutOfResources  # here: triton is imported after the interpreter is chosen

    row = [forced] if forced is not None else _row(kernel, device, dtype)
    configs = []  # (index in the row, fitted configuration), duplicates after fitting dropped
    for i, c in _preferred_first(row, prefer if forced is None else None):
        fitted = _interpretable(fit(dict(c)))
        if all(fitted != f for _, f in configs):
            configs.append((i, fitted))

    if _autotune and autotune_key and forced is None and len(configs) > 1 and not interpreting():
        import triton

        tiles_key = (fn, kernel, arch(device), tuple(tuple(sorted(c.items())) for _, c in configs),
                     tuple(autotune_key))
        if tiles_key not in _tuned:
            candidates = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                        num_warps=c["num_warps"], num_stages=c["num_stages"]) for _, c in configs]
            _tuned[tiles_key] = triton.autotune(candidates, key=list(autotune_key))(fn)
        tuned = _tuned[tiles_key]
        try:
            tuned[grid](*args, **constexprs, **_compile_options())
        except OutOfResources as err:  # every candidate too large: the autotuner launched one anyway
            raise _too_large(kernel, err, instead) from err
        return dict(tuned.best_config.all_kwargs()) if tuned.best_config is not None else configs[0][1]

    last = None
    for i, config in configs:
        try:
            fn[grid(config)](*args, **constexprs, **config, **_compile_options())
        except OutOfResources as err:  # raised at launch, before the kernel runs: nothing was written
            last = err
            continue
        if forced is None:
            _chosen[(kernel, arch(device), dtype, key)] = i
        return config
    raise _too_large(kernel, last, instead) from last


class SharedMemoryError(RuntimeError):
    """What `launch` raises when no configuration of a kernel's row fits the GPU's shared memory (a T4 gives a block
    64 KiB). An op with a PyTorch form to fall back to catches it and warns (`grads_by_autograd` for a backward);
    elsewhere it reaches the user, naming the kernel and what to use instead."""


def _too_large(kernel: str, err, instead: str) -> SharedMemoryError:
    return SharedMemoryError(f"{kernel}: the kernel needs more shared memory than this GPU gives a block ({err}), "
                             f"even with the narrowest tiles of runtime.LAUNCH_TABLE. Use smaller head dimensions, "
                             f"or {instead}")


def grads_by_autograd(op: str, forward, inputs: list, grad_outputs: list, note: str = "") -> list:
    """The gradients a Triton op's backward returns when its kernels do not fit the GPU (`SharedMemoryError`):
    autograd through `forward(*leaves)`, a PyTorch form of the op, recomputed in fp32. `inputs`: the op's tensors
    (None where absent), each floating one a leaf; `grad_outputs`: the gradients of forward's outputs (None: that
    output is not used). Warns (once per call site) that it is slower, adding `note` (e.g. the memory the PyTorch
    form keeps for autograd). Returns one gradient per input (None where absent)."""
    import warnings

    warnings.warn(f"{op}: the backward kernels need more shared memory than this GPU gives a block; computing the "
                  f"gradients with its PyTorch form instead (slower{'; ' + note if note else ''})", RuntimeWarning,
                  stacklevel=3)
    leaves = [x.detach().float().requires_grad_() if x is not None else None for x in inputs]
    with torch.enable_grad():
        outs = forward(*leaves)
        used = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
        wanted = [x for x in leaves if x is not None]
        got = iter(torch.autograd.grad([o for o, _ in used], wanted, [g.float() for _, g in used],
                                       allow_unused=True))
    grads = [next(got) if x is not None else None for x in leaves]
    return [torch.zeros_like(x) if x is not None and d is None else d for x, d in zip(leaves, grads)]


def _same(config: dict) -> dict:
    return config


def _compile_options() -> dict:
    """The compiler options every kernel of the package is launched with on a GPU: floating-point fusion (a * b + c
    as one FMA) on, as the kernels were tested and timed. Triton 3.9 warns that its default turns it off in 3.10; the
    interpreter takes no options."""
    return {} if interpreting() else {"enable_fp_fusion": True}


def _interpretable(config: dict) -> dict:
    """The interpreter takes no warps or stages."""
    if interpreting():
        config.pop("num_warps", None)
        config.pop("num_stages", None)
    return config


# ------------------------------------------------------------------------------------------------- reporting
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
