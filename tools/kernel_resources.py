"""Compile one Triton kernel for a GPU architecture on a machine without a GPU, and report its resources.

    python tools/kernel_resources.py minisparse.deltanet.chunk_bwd:_bwd_keys_kernel C=64 BK=64 BV=16 \\
        PRECISION=tf32 --dtype bf16=q_ptr,k_ptr,do_ptr --warps 4 --stages 2

prints the shared memory the launch needs (Hopper allows 227 KiB a block), the registers per thread and the bytes
spilled to local memory, as ptxas reports them (sm_90a by default; --arch 75 for a Colab T4, which allows a block
64 KiB of shared memory), every pointer 16-byte aligned as the GPU runtime marks torch's allocations (--unaligned:
not). Why: a launch that asks for too much shared memory fails only on the GPU (`OutOfResources`), and spills are the
first suspect of a slow kernel — both can be checked here, on a CPU, before spending device time. Arguments
NAME=VALUE are the kernel's constexprs (ints, or strings such as PRECISION=tf32); pointer arguments are fp32 unless
--dtype says otherwise; the other runtime arguments are i32, except those named by --float (default: scale).
Compiling takes 10–60 s a kernel on this 2-core machine.

    python tools/kernel_resources.py minisparse.deltanet.chunk_fwd:_fwd_states_kernel ... --same-as /tmp/old.py

also compiles the kernel of the same name from another module or .py file (e.g. the file as it was, `git show
main:minisparse/deltanet/chunk_fwd.py > /tmp/old.py`) and says whether the two PTX texts are identical, source-line
and debug information aside; exit status 3 if not (errors exit 1 or 2, as Python and argparse do). Identical PTX
means a refactor (a helper function, renamed variables) cannot change what runs on the GPU, so a GPU-verified
kernel stays verified without device time. --ptx FILE writes the kernel's PTX. --maxnreg N caps the registers a
thread, as `maxnreg=N` in a launch configuration does: ptxas then spills what does not fit, and the report says how
much, so the trade between registers (how many programs share a multiprocessor) and spills can be read here.
--div16 T,HV,K,V marks integer arguments as multiples of 16, as triton specialises a launch whose integers are: without
it the loads of a tile whose offsets multiply such integers neither vectorise nor, on sm_80 and newer, pipeline, and
the report can be far from what runs (KDA's forward scan at the benchmark's shapes, 8 warps, 2 stages: 251 registers
and 24 KiB without, 100 registers and 80 KiB with).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, even where minisparse.runtime would pick the interpreter
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _constexpr(text: str):
    return int(text) if re.fullmatch(r"-?\d+", text) else {"True": True, "False": False, "None": None}.get(text, text)


def signature(fn, constexprs: dict, dtypes: dict, floats: set, pointers: set | None = None) -> dict:
    """Triton signature of `fn`: constexprs, pointers (fp32 or as `dtypes` says), floats, and i32 for the rest.

    Pointers are the parameters named in `pointers`, or by default those whose names end in `_ptr`."""
    params = inspect.signature(fn.fn).parameters
    is_ptr = (lambda n: n in pointers) if pointers else (lambda n: n.endswith("_ptr"))
    wanted = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    if set(constexprs) != wanted:
        raise SystemExit(f"{fn.fn.__name__}: give exactly its constexprs {sorted(wanted)} (those with a default "
                         f"may be left out); missing {sorted(wanted - set(constexprs))}, unknown "
                         f"{sorted(set(constexprs) - wanted)}")
    unknown = set(dtypes) - {n for n in params if is_ptr(n)}
    if unknown:
        raise SystemExit(f"{fn.fn.__name__}: --dtype names pointers it does not have: {sorted(unknown)}")
    sig = {}
    for name in params:
        if name in constexprs:
            sig[name] = "constexpr"
        elif is_ptr(name):
            sig[name] = "*" + dtypes.get(name, "fp32")
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def compile_for(fn, constexprs: dict, dtypes: dict, floats: set, warps: int, stages: int, arch: int,
                pointers: set | None = None, aligned: bool = True, maxnreg: int | None = None,
                div16: set | None = None):
    """The compiled kernel (triton's CompiledKernel) for compute capability `arch`, on a machine without a GPU.
    Constexprs left out of `constexprs` take their defaults, if they have one. aligned: every pointer 16-byte
    aligned, as the runtime specialises a launch on torch's allocations; without it loads are not vectorised and,
    on sm_80 and newer, not pipelined through cp.async (less shared memory, more registers than the GPU runs).
    maxnreg: cap the registers a thread (a launch option, as `maxnreg=` in a launch-table configuration).
    div16: integer arguments known to be multiples of 16, as triton specialises a launch whose integers are (T, K,
    V and the head counts at the benchmarks' shapes): it lets loads vectorise and, on sm_80 and newer, pipeline."""
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()
                if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}
    constexprs = {**{n: v for n, v in defaults.items() if n not in constexprs}, **constexprs}
    sig = signature(fn, constexprs, dtypes, floats, pointers)
    unknown = set(div16 or ()) - {n for n, t in sig.items() if t == "i32"}
    if unknown:
        raise SystemExit(f"{fn.fn.__name__}: --div16 names no integer argument of it: {sorted(unknown)}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if (t.startswith("*") and aligned) or n in (div16 or ())}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs or None)
    options = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True,  # as runtime.launch launches
                   **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptx_instructions(kernel) -> list[str]:
    """The kernel's PTX without what depends on source lines: .loc/.file directives, the labels that mark inlined
    calls ($L__tmpN), and the debug sections."""
    text = re.sub(r"\.section\s+\.debug.*", "", kernel.asm["ptx"], flags=re.S)
    drop = re.compile(r"\s*(\.loc\b.*|\.file\b.*|\$L__tmp\d+:)?")
    return [line for line in text.splitlines() if not drop.fullmatch(line)]


def resources(fn, constexprs: dict, dtypes: dict, floats: set, warps: int, stages: int, arch: int,
              pointers: set | None = None) -> dict:
    return kernel_resources(compile_for(fn, constexprs, dtypes, floats, warps, stages, arch, pointers), arch)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself runs for `arch` (triton 3.9 ships a newer one for sm_90 and up, whose PTX the
    older `bin/ptxas` refuses), else the wheel's `bin/ptxas`."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return str(pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")


def kernel_resources(kernel, arch: int) -> dict:
    """Shared memory (KiB) of a compiled kernel, and registers and spill bytes as ptxas reports them."""
    out = {"shared_kib": kernel.metadata.shared / 1024}
    ptxas = _ptxas(arch)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # the "a" (arch-specific) targets start at sm_90
        report = subprocess.run([str(ptxas), "-v", "--gpu-name", gpu, ptx.name, "-o", os.devnull],
                                capture_output=True, text=True).stderr
    for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads")):
        found = re.search(pattern, report)
        out[key] = int(found.group(1)) if found else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", help="module:name, e.g. minisparse.deltanet.chunk_fwd:_fwd_wy_kernel")
    ap.add_argument("constexprs", nargs="*", help="NAME=VALUE for each constexpr parameter")
    ap.add_argument("--dtype", action="append", default=[], help="DTYPE=ptr1,ptr2 (e.g. bf16=q_ptr,k_ptr)")
    ap.add_argument("--float", default="scale", help="comma-separated float arguments (default: scale)")
    ap.add_argument("--pointers", default="", help="comma-separated pointer arguments (default: names ending _ptr)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--maxnreg", type=int, help="cap the registers a thread, as a launch's maxnreg= does")
    ap.add_argument("--unaligned", action="store_true", help="pointers of unknown alignment (the GPU sees 16 bytes)")
    ap.add_argument("--div16", default="", help="comma-separated integer arguments that are multiples of 16, as the "
                    "launch specialises them (e.g. T,HV,K,V): loads vectorise and pipeline as on the GPU")
    ap.add_argument("--ptx", metavar="FILE", help="also write the kernel's PTX to FILE")
    ap.add_argument("--same-as", metavar="MODULE", help="also compile the kernel of that name from MODULE (a module "
                    "name or a .py file) and compare the PTX")
    args = ap.parse_args(argv)
    module, name = args.kernel.rsplit(":", 1)
    constexprs = {k: _constexpr(v) for k, v in (c.split("=", 1) for c in args.constexprs)}
    dtypes = {ptr: dt for spec in args.dtype for dt, ptrs in [spec.split("=", 1)] for ptr in ptrs.split(",")}
    options = (constexprs, dtypes, set(args.float.split(",")), args.warps, args.stages, args.arch,
               set(filter(None, args.pointers.split(","))) or None, not args.unaligned, args.maxnreg,
               set(filter(None, args.div16.split(","))))
    kernel = compile_for(_kernel(module, name), *options)
    r = kernel_resources(kernel, args.arch)
    print(f"{name} {constexprs} warps={args.warps} stages={args.stages}"
          f"{f' maxnreg={args.maxnreg}' if args.maxnreg else ''} sm_{args.arch}"
          f"{', unaligned' if args.unaligned else ''}{f', div16 {args.div16}' if args.div16 else ''}: shared "
          f"{r['shared_kib']:.1f} KiB, {r['registers']} registers, spills {r['spill_stores']} B stored / "
          f"{r['spill_loads']} B loaded")
    if args.ptx:
        pathlib.Path(args.ptx).write_text(kernel.asm["ptx"])
    if args.same_as:
        ours = ptx_instructions(kernel)
        theirs = ptx_instructions(compile_for(_kernel(args.same_as, name), *options))
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            print(f"PTX differs from {args.same_as}'s ({len(ours)} / {len(theirs)} lines); first difference at line "
                  f"{first + 1}:\n  {module}: {ours[first] if first < len(ours) else '(end)'}\n"
                  f"  {args.same_as}: {theirs[first] if first < len(theirs) else '(end)'}")
            return 3
        print(f"PTX identical to {args.same_as}'s ({len(ours)} lines)")
    return 0


def _kernel(module: str, name: str) -> JITFunction:
    """Kernel `name` of `module`: a module name, or the path of a .py file."""
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(pathlib.Path(module).stem, module)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    fn = getattr(loaded, name)
    while not isinstance(fn, JITFunction):  # @triton.heuristics / @triton.autotune wrap the kernel: compile the kernel
        fn = fn.fn
    return fn


if __name__ == "__main__":
    sys.exit(main())
