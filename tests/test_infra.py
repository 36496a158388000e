"""The hand-written infrastructure: runtime, testing (assert_close, factories, the exercise checker), bench."""
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

import minisparse
from minisparse import _checks, bench, runtime
from minisparse.testing import (ExerciseError, TensorRule, as_number, assert_close, assert_float64_matches_float32,
                                check, gradcheck_float64, hf_torch_function, hf_torch_path, make_bthd,
                                make_log_gates, make_qkv, number_answer, rel_rms)


# --------------------------------------------------------------------------------------------------- runtime
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_runtime_on_cpu_picks_fp32_and_the_interpreter():
    assert runtime.device().type == "cpu"
    assert runtime.default_dtype() == torch.float32
    assert runtime.interpreting()
    assert runtime.reading_size(cpu=1, gpu=2) == 1
    assert "interpreter" in runtime.describe()


def test_interpreter_is_switched_on_before_triton_in_a_fresh_process():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); import minisparse, torch; "
            "print(os.environ.get('TRITON_INTERPRET'), torch.cuda.is_available())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == (["None", "True"] if out[1] == "True" else ["1", "False"])


def test_explicit_interpreter_choice_is_respected():
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = "import minisparse, os; print(os.environ['TRITON_INTERPRET'], minisparse.runtime.interpreting())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["0", "False"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_importing_triton_first_on_a_machine_without_a_gpu_raises_at_import_saying_what_to_do():
    """Triton decorates its own library functions when it is imported, so the interpreter cannot be switched on
    after it: before the fix every kernel then failed deep inside Triton while print_environment() said the
    interpreter was on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton, minisparse"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "Import minisparse before triton" in run.stderr, run.stderr[-1500:]
    # an explicit choice is respected, and minisparse first works
    ok = subprocess.run([sys.executable, "-c", "import minisparse, triton; from minisparse.attention import "
                         "flash_attention; import torch; q = torch.randn(1, 5, 1, 16); "
                         "print(flash_attention(q, q, q).shape)"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "torch.Size([1, 5, 1, 16])" in ok.stdout, ok.stderr[-1500:]
    explicit = dict(env, TRITON_INTERPRET="1")
    assert subprocess.run([sys.executable, "-c", code], env=explicit, capture_output=True).returncode == 0


def test_triton_op_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _checks.triton_inputs("my_op", torch.zeros(2))


def test_triton_op_rejects_mixed_devices_and_bf16_in_the_interpreter_and_oversized_heads():
    dev = "cpu" if runtime.interpreting() else "cuda"  # where Triton ops accept tensors on this machine
    meta = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        _checks.triton_inputs("my_op", torch.zeros(2, device=dev), meta)
    if runtime.interpreting():
        with pytest.raises(TypeError, match="bfloat16 under the Triton interpreter"):
            _checks.triton_inputs("my_op", torch.zeros(2, dtype=torch.bfloat16))
    else:
        with pytest.raises(RuntimeError, match="not in interpreter mode"):
            _checks.triton_inputs("my_op", torch.zeros(2))
    with pytest.raises(ValueError, match="K must be <= 128"):
        _checks.triton_inputs("my_op", torch.zeros(2, device=dev), max_dims={"K": (256, 128)})
    _checks.triton_inputs("my_op", torch.zeros(2, device=dev), max_dims={"K": (128, 128)})


def test_print_environment(capsys):
    runtime.print_environment()
    out = capsys.readouterr().out
    assert f"minisparse {minisparse.__version__}" in out and "device:" in out


# ------------------------------------------------------------------------------------------- assert_close
def test_assert_close_accepts_small_and_rejects_large_errors():
    ref = torch.randn(64, 64, dtype=torch.float64)
    assert assert_close("x", ref, ref * (1 + 1e-6), tol=1e-4) < 1e-5
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_close("x", ref, ref * 1.01, tol=1e-4)


def test_assert_close_catches_nan_inf_and_shape_mismatch():
    ref = torch.ones(4, 4)
    bad = ref.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close("x", ref, bad, tol=1.0)
    bad[1, 2] = float("inf")
    with pytest.raises(AssertionError, match="NaN or inf"):
        assert_close("x", ref, bad, tol=1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("x", ref, torch.ones(4, 5), tol=1.0)
    assert rel_rms(bad, ref) == math.inf


class _HalvedGradient(torch.autograd.Function):
    """y = x², whose backward returns half the true gradient: a wrong backward for gradcheck to find."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * x


def test_gradcheck_float64_passes_a_true_gradient_and_fails_a_wrong_one_or_fp32():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gradcheck_float64(lambda x: (x * x, (x.sum(), None)), [x])
    with pytest.raises(Exception, match="Jacobian mismatch"):
        gradcheck_float64(_HalvedGradient.apply, [x])
    with pytest.raises(AssertionError, match=r"dtypes are \['torch.float32', 'torch.float64'\], not float64 only"):
        gradcheck_float64(lambda x: (x * x, x.float()), [x])


def test_assert_float64_matches_float32_runs_both_and_compares_by_name():
    x, n = torch.randn(3, 4), torch.tensor([2])  # an integer input stays as it is

    def op(x, n):
        return x * n, (x.sum(-1), None)
    assert_float64_matches_float32(op, [x, n], ("scaled", "sums"), 1e-6)
    with pytest.raises(AssertionError, match="sums: torch.float32 from float64 inputs"):
        assert_float64_matches_float32(lambda x, n: (x * n, x.float().sum(-1)), [x, n], ("scaled", "sums"), 1e-6)
    with pytest.raises(AssertionError, match="scaled, fp64 vs fp32: relative RMS error"):
        assert_float64_matches_float32(lambda x, n: (x * n * (1 + (x.dtype == torch.float64) * 1e-3), x.sum(-1)),
                                       [x, n], ("scaled", "sums"), 1e-6)
    with pytest.raises(AssertionError, match=r"2 and 2 outputs for 1 names \('scaled',\)"):
        assert_float64_matches_float32(op, [x, n], ("scaled",), 1e-6)


def test_lengths_take_numbers_and_arrays_at_or_above_the_least():
    import numpy as np

    for ok in (0, 5, 7.5, np.arange(4), [1, 2], np.int64(3)):
        assert _checks.lengths("op", "T", ok) is ok
    assert _checks.lengths("op", "T", 1, least=1) == 1
    for bad in (-1, [3, -2], True, "8", float("inf"), float("nan"), [], None, [[1], [2, 3]]):
        with pytest.raises(ValueError, match=r"^op: T must be a number >= 0 or an array of them, got "):
            _checks.lengths("op", "T", bad)
    with pytest.raises(ValueError, match="T must be a number >= 1"):
        _checks.lengths("op", "T", 0, least=1)


def test_hf_torch_function_finds_transformers_pytorch_code_under_its_decorators():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

    for name in ("torch_recurrent_gated_delta_rule", "torch_chunk_gated_delta_rule", "l2norm"):
        fn = hf_torch_function(getattr(qwen3_next, name))
        assert fn.__module__ == qwen3_next.__name__ and fn.__name__ == name
        assert not isinstance(fn, torch.nn.Module) and not hasattr(fn, "__wrapped__")
    for foreign in (torch.nn.functional.relu, torch.nn.ReLU(), None):  # not transformers' code: refused
        with pytest.raises(TypeError, match="no PyTorch function of transformers"):
            hf_torch_function(foreign)
    before = qwen3_next.torch_chunk_gated_delta_rule
    with hf_torch_path(qwen3_next, ["torch_chunk_gated_delta_rule"]):
        assert qwen3_next.torch_chunk_gated_delta_rule is hf_torch_function(before)
    assert qwen3_next.torch_chunk_gated_delta_rule is before  # restored


def test_factories_are_seeded_and_shaped():
    a, b = make_bthd(2, 5, 3, 7, seed=3), make_bthd(2, 5, 3, 7, seed=3)
    assert a.shape == (2, 5, 3, 7) and torch.equal(a, b) and not torch.equal(a, make_bthd(2, 5, 3, 7, seed=4))
    q, k, v = make_qkv(1, 9, 4, 16, HKV=2, Dv=8, Tk=11)
    assert q.shape == (1, 9, 4, 16) and k.shape == (1, 11, 2, 16) and v.shape == (1, 11, 2, 8)
    g = make_log_gates(2, 5, 3, low=-30)
    assert g.shape == (2, 5, 3) and (g <= 0).all() and g.min() >= -30
    assert make_log_gates(1, 2, 3, 4).shape == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        make_log_gates(1, 2, 3, low=0.0, high=1.0)


# ------------------------------------------------------------------------------------------- the checker
def _double(x):
    return 2 * x


def test_checker_prints_one_line_on_success(capsys):
    check("double", _double, _double, [(torch.arange(3.0),), (torch.ones(2, 2),)])
    assert capsys.readouterr().out == "✓ double: all 2 cases match\n"


@pytest.mark.parametrize("wrong, why", [
    (lambda x: 3 * x, "relative RMS error"),
    (lambda x: (2 * x)[:-1], "expected shape"),
    (lambda x: float((2 * x).sum()), "expected a tensor"),
])
def test_checker_rejects_wrong_answers(wrong, why):
    with pytest.raises(ExerciseError, match=why) as info:
        check("double", wrong, _double, [(torch.arange(3.0),)], hint="multiply by two")
    assert "Hint: multiply by two" in str(info.value)


def test_checker_reports_a_stub_as_not_attempted():
    def stub(x):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="not implemented yet"):
        check("double", stub, _double, [(torch.arange(3.0),)])


def test_checker_compares_numbers_sequences_and_integers():
    check("n", lambda a: a / 3, lambda a: a / 3, [(1.0,)])
    with pytest.raises(ExerciseError):
        check("n", lambda a: a / 3 + 1e-2, lambda a: a / 3, [(1.0,)])
    with pytest.raises(ExerciseError, match="entries differ"):
        check("i", lambda a: a + 1, lambda a: a, [(torch.arange(4),)])
    with pytest.raises(ExerciseError, match="item 1"):
        check("s", lambda a: (a, a), lambda a: (a, a + 1), [(torch.ones(2),)])


@pytest.mark.parametrize("answer, value", [
    (0.25, 0.25), (3, 3.0), (np.float32(0.25), 0.25), (np.int64(3), 3.0), (Fraction(1, 4), 0.25),
    (torch.tensor(0.25), 0.25), (torch.tensor([0.25], dtype=torch.float64), 0.25), (torch.tensor([[3]]), 3.0),
    (np.array(0.25), 0.25), (np.array([3]), 3.0),
    (True, None), (np.bool_(True), None), (torch.tensor(True), None), (torch.tensor([0.25, 0.5]), None),
    (torch.tensor(1j), None), ("0.25", None), (None, None), ([0.25], None),
], ids=repr)
def test_as_number_takes_one_real_number_however_it_was_computed(answer, value):
    assert as_number(answer) == value
    if value is None:
        with pytest.raises(ExerciseError, match="✗ q: the answer must be a number .*got"):
            number_answer("q", answer)
    else:
        assert number_answer("q", answer) == value and type(number_answer("q", answer)) is float


@pytest.mark.parametrize("wrap", [np.float32, torch.tensor, lambda v: torch.tensor([v]), Fraction, float],
                         ids=["np.float32", "0-d tensor", "one-element tensor", "Fraction", "float"])
def test_checker_takes_a_right_number_in_any_form_and_rejects_a_wrong_one(capsys, wrap):
    third = lambda a: a / 3  # noqa: E731
    check("n", lambda a: wrap(Fraction(1, 3) if wrap is Fraction else 1 / 3), third, [(1.0,)])
    assert capsys.readouterr().out == "✓ n: all 1 cases match\n"
    with pytest.raises(ExerciseError, match=r"expected 0.333333, got 0.343333"):
        check("n", lambda a: wrap(Fraction(103, 300) if wrap is Fraction else 1 / 3 + 1e-2), third, [(1.0,)])
    with pytest.raises(ExerciseError, match="expected a number"):
        check("n", lambda a: "1/3", third, [(1.0,)])


# ----------------------------------------------------------------------------------------------- bench
def test_bench_results_roundtrip_and_plot(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from minisparse import bench

    path = bench.save_results("demo", {"B": 2}, [{"impl": "a", "pass": "fwd", "T": 1024, "ms": 1.0},
                                                 {"impl": "a", "pass": "fwd", "T": 2048, "ms": 3.0}],
                              path=tmp_path / "demo.json")
    doc = json.loads(path.read_text())
    assert {"date", "device", "torch", "triton", "config", "rows"} <= set(doc)
    ax = bench.plot_results(doc)
    assert len(ax.lines) == 1
    with pytest.raises(ValueError, match="lacks"):
        bench.save_results("demo", {}, [{"impl": "a"}], path=tmp_path / "x.json")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="GPU"):
            bench.median_ms(lambda: None)


def test_bench_host_ms_times_each_call_after_the_warmup():
    import time

    calls = []

    def sleepy():
        calls.append(1)
        time.sleep(0.002)

    host, wall = bench.host_ms(sleepy, calls=10, warmup=3)
    assert len(calls) == 13  # the warm-up calls are not timed
    assert 2.0 <= host <= wall < 50.0  # ms a call: at least the sleep, and the wall time includes the host's


def test_bench_sweep_rows_times_each_forced_configuration_and_flags_a_different_result():
    row = "lightning.fwd_output"

    def run():  # a stand-in pass whose result depends on the configuration it launches with
        bv = runtime.launch_configs(row, "cpu", torch.float32)[0]["BV"]
        if bv == 16:
            raise RuntimeError("too large\ndetail")
        return torch.ones(4) * (1.0 if bv == 64 else 2.0), torch.ones(2)

    lines = []
    found = bench.sweep_rows({"fwd": run}, {row: ("fwd", [dict(BV=64), dict(BV=32), dict(BV=16)])},
                             timer=lambda fn: 0.5, out=lines.append)
    assert runtime.launch_configs(row, "cpu", torch.float32)[0]["BV"] == 64  # the table's, restored after the sweep
    assert [r["config"]["BV"] for r in found] == [64, 32, 16] and all(r["pass"] == "fwd" for r in found)
    assert found[0]["err"] == 0.0 and found[0]["ms"] == 0.5
    assert found[1]["err"] == pytest.approx(1.0)  # twice the table's output: relative RMS 1
    assert found[2]["err"] is None and found[2]["error"] == "RuntimeError: too large"
    assert len(lines) == 3 and "1.0e+00 from the table's result" in lines[1]
    with pytest.raises(KeyError, match="no sweep for"):
        bench.sweep_rows({"fwd": run}, {row: ("fwd", [])}, only=["lightning.fwd_states"])


def test_bench_timed_records_a_failure_as_none(capsys):
    calls = []
    assert isinstance(bench.timed(lambda: calls.append(1), smoke=True), float)
    assert len(calls) == 2  # once to compile, once timed

    def broken():
        raise RuntimeError("out of memory\nmore detail")

    assert bench.timed(broken, smoke=True) is None
    assert "failed: RuntimeError: out of memory" in capsys.readouterr().out
    assert bench.smoke_environment()["device"] == "cpu"


def test_attempt_prints_instead_of_raising(capsys):
    from minisparse.testing import attempt

    # None either way, so a checking cell shows the verdict line and no stray True/False under it
    assert attempt(check, "double", lambda x: 3 * x, _double, [(torch.ones(2),)]) is None
    assert "✗ double" in capsys.readouterr().out
    assert attempt(check, "double", _double, _double, [(torch.ones(2),)]) is None
    assert "✓ double" in capsys.readouterr().out
    with pytest.raises(ValueError):  # only a wrong answer is reported; a broken checker still raises
        attempt(lambda: (_ for _ in ()).throw(ValueError("bug in the checker")))

    def check_tile():  # what triton 3.9's interpreter raises for a scalar & tensor mask in a reader's kernel
        raise RuntimeError("InterpreterError: ValueError('mask has unsupported dtype')")

    assert attempt(check_tile) is None
    out = capsys.readouterr().out
    assert out.startswith("✗ check_tile: Triton's interpreter refused your kernel") and "tensors only" in out


def test_explorer_draws_once_without_a_kernel():
    from minisparse.viz import explorer

    seen = []
    assert explorer(lambda window, mode: seen.append((window, mode)), window=(1, 9, 2), mode=["a", "b"]) is None
    assert seen == [(5, "a")]
    with pytest.raises(ValueError):
        explorer(lambda: None)


def test_plot_passes_one_panel_per_pass():
    import matplotlib

    matplotlib.use("Agg")
    from minisparse.bench import plot_passes

    doc = {"name": "d", "device": "x", "torch": "t", "triton": "r", "date": "today", "rows": [
        {"impl": "a", "pass": "fwd", "T": 1, "ms": 1.0}, {"impl": "a", "pass": "fwd+bwd", "T": 1, "ms": 2.0}]}
    fig = plot_passes(doc)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["d · fwd", "d · fwd+bwd"]  # the machine once, not per panel
    assert "x" in fig._suptitle.get_text() and "today" in fig._suptitle.get_text()


def _kernel_resources_tool():
    """tools/kernel_resources.py; the test is skipped where the triton wheel ships no ptxas."""
    import pathlib

    import triton

    if not (pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    return pathlib.Path(__file__).resolve().parent.parent / "tools/kernel_resources.py"


def test_kernel_resources_compiles_for_hopper_without_a_gpu():
    """tools/kernel_resources.py reports shared memory, registers and spills of a real sm_90 compile, on a CPU."""
    tool = _kernel_resources_tool()
    args = [sys.executable, str(tool),
            "minisparse.deltanet.fused_recurrent:_fused_recurrent_kernel", "BK=16", "BV=16", "HAS_H0=False", "STORE_HT=False", "L2NORM=False"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert "sm_90" in line and "KiB" in line and "registers" in line, line
    regs = int(line.split(" registers")[0].rsplit(" ", 1)[1])
    assert 0 < regs <= 255, line
    # a kernel wrapped by @triton.heuristics compiles too, and --dtype / --arch are honoured
    wrapped = subprocess.run(
        [sys.executable, str(tool), "minisparse.moe.triton:_grouped_mm_kernel",
         "BLOCK_M=16", "BLOCK_N=16", "BLOCK_K=16", "GROUP_M=1", "EVEN_K=True", "EVEN_N=True", "PRECISION=ieee",
         "--dtype", "fp16=x_ptr,w_ptr,y_ptr", "--dtype", "i32=offsets_ptr,tile_expert_ptr,tile_row_ptr",
         "--arch", "75", "--stages", "1"], capture_output=True, text=True, timeout=300)
    assert wrapped.returncode == 0 and "sm_75" in wrapped.stdout, wrapped.stderr[-2000:]
    # a constexpr left out, or one the kernel does not have, is an error that names it
    for extra, name in ((args[3:-1], "L2NORM"), (args[3:] + ["NOPE=1"], "NOPE")):
        bad = subprocess.run(args[:3] + extra, capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and name in bad.stderr, bad.stderr[-500:]


_SCALE_KERNEL = """import triton
import triton.language as tl


@triton.jit
def _times(x, f):
    return x * f


@triton.jit
def scale_kernel(x_ptr, y_ptr, N, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    x = tl.load(x_ptr + i, mask=i < N)
    tl.store(y_ptr + i, {body}, mask=i < N)
"""


_ROWS_KERNEL = """import triton
import triton.language as tl


@triton.jit
def rows_kernel(x_ptr, y_ptr, S, B: tl.constexpr):
    r = tl.arange(0, B)
    off = r[:, None] * S + r[None, :]
    tl.store(y_ptr + off, tl.load(x_ptr + off))
"""


def test_kernel_resources_div16_specialises_integers_as_a_launch_does(tmp_path):
    """--div16 S marks the integer S a multiple of 16, as triton's launch specialises it: the loads of rows S apart
    vectorise (ld.global.v4 in the PTX), where without it they do not; a name that is no integer argument is an
    error that names it."""
    tool = _kernel_resources_tool()
    (tmp_path / "rows.py").write_text(_ROWS_KERNEL)

    def run(*extra):
        return subprocess.run([sys.executable, str(tool), f"{tmp_path / 'rows.py'}:rows_kernel", "B=64", "--ptx",
                               str(tmp_path / "rows.ptx"), *extra], capture_output=True, text=True, timeout=300)

    vectorised = []
    for extra in ((), ("--div16", "S")):
        out = run(*extra)
        assert out.returncode == 0, out.stderr[-2000:]
        vectorised.append("ld.global.v4" in (tmp_path / "rows.ptx").read_text())
    assert vectorised == [False, True]
    bad = run("--div16", "Q")
    assert bad.returncode != 0 and "Q" in bad.stderr, bad.stderr[-500:]


def test_kernel_resources_same_as_compares_ptx(tmp_path):
    """--same-as: a kernel refactored through a helper function compiles to the same PTX (exit 0); one whose
    arithmetic changed does not (exit 3, and the first differing line is shown)."""
    tool = _kernel_resources_tool()
    for name, body in (("inline", "x * 2.0"), ("helper", "_times(x, 2.0)"), ("changed", "x * 3.0")):
        (tmp_path / f"{name}.py").write_text(_SCALE_KERNEL.format(body=body))

    def compare(a, b):
        return subprocess.run([sys.executable, str(tool), f"{tmp_path / a}.py:scale_kernel", "B=64",
                               "--same-as", str(tmp_path / f"{b}.py")], capture_output=True, text=True, timeout=300)

    same = compare("helper", "inline")
    assert same.returncode == 0 and "PTX identical" in same.stdout, same.stdout + same.stderr[-2000:]
    changed = compare("changed", "inline")
    assert changed.returncode == 3 and "PTX differs" in changed.stdout, changed.stdout + changed.stderr[-2000:]
    # a constexpr with a default may be left out: a flag that picks a variant, off, leaves the old kernel's PTX
    flagged = _SCALE_KERNEL.format(body="_times(x, 3.0) if LATE else x * 2.0").replace(
        "B: tl.constexpr)", "B: tl.constexpr, LATE: tl.constexpr = False)")
    (tmp_path / "flagged.py").write_text(flagged)
    same = compare("flagged", "inline")
    assert same.returncode == 0 and "PTX identical" in same.stdout, same.stdout + same.stderr[-2000:]


def test_kernel_resources_compiles_pointers_aligned(tmp_path):
    """Pointers are 16-byte aligned, as the runtime marks torch's allocations: loads vectorised, unless --unaligned."""
    tool = _kernel_resources_tool()
    unmasked = _SCALE_KERNEL.format(body="x * 2.0").replace(", mask=i < N)", ")")
    (tmp_path / "unmasked.py").write_text(unmasked)
    for flag, vector in (([], True), (["--unaligned"], False)):
        ptx = tmp_path / f"ptx{len(flag)}"
        out = subprocess.run([sys.executable, str(tool), f"{tmp_path / 'unmasked'}.py:scale_kernel", "B=512", *flag,
                              "--ptx", str(ptx)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("ld.global.v4" in ptx.read_text()) == vector, flag


def test_kernel_resources_maxnreg_caps_registers():
    """--maxnreg N compiles as a launch's maxnreg=N does: at most N registers a thread, the rest spilled."""
    tool = _kernel_resources_tool()
    args = [sys.executable, str(tool), "minisparse.deltanet.fused_recurrent:_fused_recurrent_kernel", "BK=64",
            "BV=64", "HAS_H0=False", "STORE_HT=False", "L2NORM=False"]
    found = {}
    for cap in (None, 40):
        out = subprocess.run(args + (["--maxnreg", str(cap)] if cap else []), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        line = out.stdout.strip().splitlines()[-1]
        assert (f"maxnreg={cap}" in line) == (cap is not None), line
        regs = int(line.split(" registers")[0].rsplit(" ", 1)[1])
        spilled = int(line.split("spills ")[1].split(" B")[0])
        found[cap] = regs, spilled
    assert found[40][0] <= 40 < found[None][0], found
    assert found[40][1] > found[None][1], found


# --------------------------------------------------------------------------------------- the value-check rule
def test_value_checks_follow_one_rule(monkeypatch, value_checks):
    """naive ops: always. Triton ops on CPU tensors: always. On CUDA tensors: only after set_value_checks(True),
    and never during graph capture (the device type decides, so this runs without a GPU)."""
    cpu, cuda = torch.zeros(1), torch.zeros(1, device="meta")
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_90")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_like = type("T", (), {"device": torch.device("cuda")})()
    assert _checks.checking_values(True, cuda_like)
    assert _checks.checking_values(False, cpu)
    assert runtime.set_value_checks(False) is True  # returns the previous setting (on: the fixture's)
    assert not _checks.checking_values(False, cuda_like)  # off (the default) on CUDA: no host sync
    assert runtime.set_value_checks(True) is False
    assert _checks.checking_values(False, cuda_like)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _checks.checking_values(False, cuda_like)
    with pytest.raises(TypeError, match="True or False"):
        runtime.set_value_checks("yes")
    del cuda


@pytest.mark.parametrize("values, kw, message", [
    ([0.0, -1.0, float("nan")], dict(high=0.0), "contains NaN \\(1 of 3 values\\)"),
    ([0.5, -1.0], dict(high=0.0), "must be <= 0, got values in \\[-1, 0.5\\]"),
    ([0.0, 1.0], dict(low=0.0, low_open=True), "must be > 0"),
    ([-1.0, 3.0], dict(low=0.0, high=2.0), "must be >= 0 and <= 2"),
    ([float("-inf"), 0.0], dict(low=-math.inf, low_open=True, high=0.0), "must be > -inf"),
    # an extreme just past its bound shows the digits that put it there, the other extreme stays at 3 digits
    ([0.5, 2.0001], dict(low=0.0, high=2.0), "got values in \\[0.5, 2.0001\\]"),
    ([0.99999, 1.5], dict(low=1.0), "got values in \\[0.99999, 1.5\\]"),
    ([-1e-9, 1.0], dict(low=0.0), "got values in \\[-1e-09, 1\\]"),
    ([0.0, 1.0], dict(low=0.0, low_open=True), "got values in \\[0, 1\\]"),
    ([0.1234567, 2.0001], dict(high=2.0), "got values in \\[0.123, 2.0001\\]"),
])
def test_value_range_names_nan_and_the_range(values, kw, message):
    with pytest.raises(ValueError, match=message):
        _checks.value_range("op", "g", torch.tensor(values), **kw)


def test_value_checks_are_off_by_default():
    """A fresh process starts with value checks off (the fixture above turns them on inside a test)."""
    code = "from minisparse import runtime; print(runtime.set_value_checks(False))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_value_range_accepts_values_in_range_and_empty_tensors():
    _checks.value_range("op", "g", torch.tensor([-3.0, 0.0]), low=-math.inf, low_open=True, high=0.0)
    _checks.value_range("op", "g", torch.zeros(0), high=-1.0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: _checks.tensor("op", "q", [1.0], "[B, T, H, K]"), TypeError, "q must be a torch.Tensor"),
    (lambda: _checks.tensor("op", "q", torch.zeros(2, 3), "[B, T, H, K]"), ValueError, "4-D \\[B, T, H, K\\]"),
    (lambda: _checks.qkv("op", torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 3, 8),
                         grouped_values=True), ValueError, "HV a multiple of H = 2"),
    (lambda: _checks.qkv("op", torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 4, 8)),
     ValueError, "with q's B, T = \\(1, 4\\) and H = 2"),
    (lambda: _checks.qkv("op", torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8, dtype=torch.float16),
                         torch.zeros(1, 4, 2, 8)), TypeError, "share one dtype"),
    (lambda: _checks.scale("op", -1.0, 8), ValueError, "scale must be a positive number"),
    (lambda: _checks.scale("op", float("nan"), 8), ValueError, "scale must be a positive number"),
    (lambda: _checks.initial_state("op", torch.zeros(1, 2, 8), (1, 2, 8, 8)), ValueError, "4-D"),
    (lambda: _checks.initial_state("op", torch.zeros(1, 2, 8, 4), (1, 2, 8, 8)), ValueError,
     "initial_state must be \\[B, H, K, V\\] = \\(1, 2, 8, 8\\)"),
    (lambda: _checks.backend("op", "flash"), ValueError, "'auto', 'naive' or 'triton'"),
    (lambda: _checks.positive_int("op", "num_heads", 0), ValueError, "num_heads must be an int > 0, got 0"),
    (lambda: _checks.positive_int("op", "num_heads", True), ValueError, "num_heads must be an int > 0"),
    (lambda: _checks.positive_int("op", "rank", -1, zero=True), ValueError, "rank must be an int >= 0"),
    (lambda: _checks.divides("op", "num_kv_heads", 3, "num_heads", 8), ValueError, "= 3 must divide num_heads"),
    (lambda: _checks.forward_only("op", torch.zeros(1, requires_grad=True), instead="x"), RuntimeError,
     "forward only"),
    (lambda: _checks.layer_input("Layer", torch.zeros(2, 3, 4, dtype=torch.float16), torch.nn.Linear(4, 4)),
     TypeError, "x is torch.float16 but the layer's parameters are torch.float32"),
    (lambda: _checks.layer_input("Layer", torch.zeros(2, 3, 5), torch.nn.Linear(4, 4), hidden=4), ValueError,
     "hidden = 4"),
    (lambda: _checks.layer_input("Layer", torch.zeros(2, 3, 4, dtype=torch.long), torch.nn.Linear(4, 4)),
     TypeError, "x must be a floating-point tensor"),
    (lambda: _checks.attention_mask("Layer", torch.ones(2, 1), 2, 3), ValueError, r"attention_mask must be \[B, T\]"),
    (lambda: _checks.conv_recurrent_state("Layer", (torch.zeros(2, 4, 3), None), (2, 4, 3), (2, 1, 2, 2),
                                          torch.zeros(1)), TypeError, "pair of tensors"),
])
def test_shared_checks_name_the_argument_the_expectation_and_what_came(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("layer_name", ["GatedDeltaNet", "KimiDeltaAttention"])
def test_short_convolution_layers_check_their_state_and_mask(layer_name):
    """_checks.conv_recurrent_state and attention_mask in the two layers that carry (conv, recurrent) states: a
    state that is not the pair they returned, or a mask that does not name every token, is an error."""
    from minisparse.deltanet import GatedDeltaNet
    from minisparse.kda import KimiDeltaAttention

    torch.manual_seed(0)
    layer = GatedDeltaNet(32, 2, 4, 8, 8) if layer_name == "GatedDeltaNet" else KimiDeltaAttention(32, 2, 16)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        _, (conv, rec) = layer(x[:, :7], use_cache=True)
        for state, exc, match in (((conv, None), TypeError, "pair of tensors"), (rec, TypeError, "pair of tensors"),
                                  ((conv[:1], rec[:1]), ValueError, "conv_state must be"),
                                  ((conv[:, :, :2], rec), ValueError, "conv_state must be"),
                                  ((conv, rec[..., :4]), ValueError, "initial_state must be")):
            with pytest.raises(exc, match=match):  # a state that is not the one returned: no silent drop
                layer(x[:, 7:], state=state)
        for mask in (torch.ones(2, 1), torch.ones(8)):  # a mask must name every token
            with pytest.raises(ValueError, match="attention_mask must be"):
                layer(x, attention_mask=mask)


def test_choose_backend_resolves_auto_by_device_and_dtype():
    assert _checks.choose_backend("naive", torch.zeros(1)) == "naive"
    if runtime.interpreting():
        assert _checks.choose_backend("auto", torch.zeros(1)) == "triton"
        assert _checks.choose_backend("auto", torch.zeros(1, dtype=torch.bfloat16)) == "naive"
    for dtype in (torch.float64, torch.complex64, torch.int32):  # dtypes the kernels do not take: never Triton
        assert _checks.choose_backend("auto", torch.zeros(1, dtype=dtype)) == "naive"


# ------------------------------------------------------------------------------------------- the launch table
class _FakeKernel:
    """Stands for a @triton.jit function: records launches; raises OutOfResources for tiles wider than `fits`."""

    def __init__(self, fits):
        self.fits, self.launched = fits, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            from triton.runtime.errors import OutOfResources
            if kw.get("BV", 0) > self.fits:
                raise OutOfResources(kw["BV"] * 1024, self.fits * 1024, "shared memory")
            self.launched.append((grid, kw))
        return run


def test_launch_table_rows_follow_the_architecture(monkeypatch):
    monkeypatch.setattr(runtime, "_rows", {})  # rows are cached per device: the faked architectures must not stay
    cpu = torch.device("cpu")
    assert runtime.arch(cpu) == "interpreter"
    assert runtime.launch_configs("deltanet.fwd_output", cpu, torch.float32) == [
        dict(BV=128, num_warps=4, num_stages=2)]
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_90")  # no sm_90 row: the next older one, sm_80
    assert [c["BV"] for c in runtime.launch_configs("deltanet.fwd_output", "cuda", torch.bfloat16)] == [128, 64, 32, 16]
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_75")
    assert [c["BV"] for c in runtime.launch_configs("deltanet.fwd_output", "cuda", torch.float16)] == [64, 32, 16]
    assert runtime.launch_configs("attention.fwd", "cuda", torch.float16)[0]["BLOCK_M"] == 64  # sm_80's, newer
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_90")
    fp32 = runtime.launch_configs("mla.decode_split", "cuda", torch.float32)
    assert fp32 == [dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=1)]  # the .fp32 row before the plain one
    with pytest.raises(KeyError, match="no launch configurations for 'nope'"):
        runtime.launch_configs("nope", cpu, torch.float32)


def test_launch_tries_in_order_remembers_what_fits_and_can_be_forced(monkeypatch):
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_75")
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "_chosen", {})
    monkeypatch.setattr(runtime, "_rows", {})
    kernel = _FakeKernel(fits=32)
    grid = lambda c: (c["BV"],)  # noqa: E731
    used = runtime.launch("deltanet.fwd_output", kernel, grid, (), {"C": 64}, device="cuda", dtype=torch.float16)
    # on a GPU every launch asks for floating-point fusion, as the kernels were tested (triton 3.10 turns it off)
    assert used["BV"] == 32 and kernel.launched == [((32,), dict(C=64, BV=32, num_warps=4, num_stages=2,
                                                                 enable_fp_fusion=True))]
    kernel.fits = 10**6  # a later call goes straight to the remembered config, without retrying the wider one
    runtime.launch("deltanet.fwd_output", kernel, grid, (), {"C": 64}, device="cuda", dtype=torch.float16)
    assert kernel.launched[-1][0] == (32,) and kernel.launched[-1][1]["enable_fp_fusion"] is True
    capped = runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.float32,
                            fit=lambda c: dict(c, BV=min(c["BV"], 16)))
    assert capped["BV"] == 16
    with runtime.launch_config("deltanet.fwd_output", BV=8, num_warps=2, num_stages=1):
        assert runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda",
                              dtype=torch.float16)["BV"] == 8
    assert "deltanet.fwd_output" not in runtime._forced
    # the remembered configuration stops fitting (a larger problem under the same key): the row is tried again
    kernel.fits = 32
    wider = runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.float16,
                           fit=lambda c: dict(c, BV=2 * c["BV"]))
    assert wider["BV"] == 32 and runtime._chosen[("deltanet.fwd_output", "sm_75", torch.float16, ())] == 2
    kernel.fits = 4
    monkeypatch.setattr(runtime, "_chosen", {})
    with pytest.raises(runtime.SharedMemoryError, match="deltanet.fwd_output: the kernel needs more shared memory.*, "
                       "or X"):
        runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.float16, instead="X")
    with pytest.raises(KeyError, match="no kernel 'nope'"):
        with runtime.launch_config("nope", BV=1):
            pass
    monkeypatch.setattr(runtime, "interpreting", lambda: True)  # the interpreter takes no compiler options
    kernel.fits = 10**6
    runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.float16)
    assert set(kernel.launched[-1][1]) == {"BV"}


def test_launch_tries_the_preferred_entries_first_in_the_rows_order(monkeypatch):
    """`prefer` moves the entries it accepts to the front (each group keeps the row's order), for launch and
    launch_configs alike; what fits is remembered per key; a forced configuration ignores it."""
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_80")
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "_chosen", {})
    monkeypatch.setattr(runtime, "_rows", {})
    kernel = _FakeKernel(fits=10**6)
    grid = lambda c: (c["BV"],)  # noqa: E731
    narrow = lambda c: c["BV"] <= 32  # noqa: E731
    configs = runtime.launch_configs("deltanet.fwd_output", "cuda", torch.bfloat16, narrow)
    assert [c["BV"] for c in configs] == [32, 16, 128, 64]  # the row is 128, 64, 32, 16
    used = runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.bfloat16,
                          key=("narrow",), prefer=narrow)
    assert used["BV"] == 32 and runtime._chosen[("deltanet.fwd_output", "sm_80", torch.bfloat16, ("narrow",))] == 2
    kernel.fits = 16  # the preferred entry no longer fits: the next preferred one, before the rest of the row
    monkeypatch.setattr(runtime, "_chosen", {})
    assert runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.bfloat16,
                          prefer=narrow)["BV"] == 16
    kernel.fits = 10**6
    assert runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.bfloat16,
                          key=("any",))["BV"] == 128  # no preference: the row's order
    with runtime.launch_config("deltanet.fwd_output", BV=64, num_warps=4, num_stages=2):
        assert runtime.launch_configs("deltanet.fwd_output", "cuda", torch.bfloat16, narrow)[0]["BV"] == 64
        assert runtime.launch("deltanet.fwd_output", kernel, grid, (), {}, device="cuda", dtype=torch.bfloat16,
                              prefer=narrow)["BV"] == 64


def test_autotune_hands_the_fitted_row_to_tritons_autotuner_and_names_the_kernel_when_nothing_fits(monkeypatch):
    """With autotuning on, the row's fitted configurations become triton.Configs of one autotuner per kernel (keyed by
    the function too: two kernels share the "deltanet.rows" name); when every candidate is too large the error is the
    launch's own RuntimeError, which callers (mla_decode's T4 fallback) catch."""
    import triton
    from triton.runtime.errors import OutOfResources

    made = []

    class FakeTuner:
        def __init__(self, configs, key, fn):
            self.configs, self.key, self.fn, self.best_config = configs, key, fn, configs[1]
            made.append(self)

        def __getitem__(self, grid):
            def run(*args, **kw):
                if self.fn == "too large":
                    raise OutOfResources(1, 0, "shared memory")
                self.grid = grid({"BV": 64})
            return run

    monkeypatch.setattr(triton, "autotune", lambda configs, key: (lambda fn: FakeTuner(configs, key, fn)))
    monkeypatch.setattr(runtime, "arch", lambda dev: "sm_90")
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "_rows", {})
    monkeypatch.setattr(runtime, "_tuned", {})
    previous = runtime.set_autotune(True)
    try:
        kw = dict(device="cuda", dtype=torch.bfloat16, autotune_key=["T"], fit=lambda c: dict(c, BV=min(c["BV"], 64)))
        used = runtime.launch("deltanet.fwd_output", "kernel a", lambda c: (c["BV"],), (), {}, **kw)
        tuner = made[0]
        assert [c.kwargs["BV"] for c in tuner.configs] == [64, 32, 16]  # 128 capped to 64, duplicates dropped
        assert tuner.key == ["T"] and tuner.grid == (64,) and used["BV"] == 32
        runtime.launch("deltanet.fwd_output", "kernel b", lambda c: (1,), (), {}, **kw)
        assert len(made) == 2 and made[1].fn == "kernel b"
        with pytest.raises(RuntimeError, match="deltanet.fwd_output: the kernel needs more shared memory"):
            runtime.launch("deltanet.fwd_output", "too large", lambda c: (1,), (), {}, **kw)
    finally:
        runtime.set_autotune(previous)


def test_autotune_switch():
    assert runtime.autotuning() is False
    previous = runtime.set_autotune(True)
    try:
        assert runtime.autotuning()
    finally:
        runtime.set_autotune(previous)
    with pytest.raises(TypeError):
        runtime.set_autotune(1)


def test_every_launch_in_the_package_names_a_row_of_the_table():
    """A kernel launched outside runtime.launch, or under a name the table lacks, fails here. Exercise checkers
    (`exercises.py`) launch the reader's own kernel, which has no row, so they are exempt."""
    import ast
    import pathlib
    root = pathlib.Path(minisparse.__file__).parent
    names = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            if getattr(node.func, "attr", None) == "launch" and node.args and isinstance(node.args[0], ast.Constant):
                names.append(node.args[0].value)
            called = node.func.value if isinstance(node.func, ast.Subscript) else None
            if isinstance(called, ast.Name) and "kernel" in called.id and path.name not in ("runtime.py", "exercises.py"):
                raise AssertionError(f"{path.name}:{node.lineno}: {called.id} launched as kernel[grid](...), "
                                     "not through runtime.launch")
    assert names, "no runtime.launch calls found"
    missing = sorted(set(names) - set(runtime.LAUNCH_TABLE))
    assert not missing, f"launched kernels without a LAUNCH_TABLE row: {missing}"


def test_schematic_draws_boxes_arrows_groups_and_rejects_unknown_names():
    import matplotlib
    matplotlib.use("Agg")
    from minisparse.viz import Box, schematic

    boxes = {"a": Box(0, 0, "a"), "b": Box(2, 0, "b", note="[T, D]")}
    fig = schematic(boxes, [("a", "b", "x")], groups=[(["a", "b"], "kernel")], title="t")
    ax = fig.axes[0]
    assert len(ax.patches) == 4  # two boxes, one group, one arrow
    assert {t.get_text() for t in ax.texts} >= {"a", "b", "[T, D]", "x", "kernel"}
    with pytest.raises(ValueError, match="do not exist"):
        schematic(boxes, [("a", "c")])
    with pytest.raises(ValueError, match="do not exist"):
        schematic(boxes, groups=[(["z"], "g")])


@pytest.mark.parametrize("impl, family", [
    ("flash_attention", "minisparse"), ("grouped_mm (triton)", "minisparse"), ("chunk_lightning_attn", "minisparse"),
    ("mla_decode", "minisparse"), ("minisparse, value checks off", "minisparse"),
    ("fla chunk_gated_delta_rule", "fla"), ("fla chunk_simple_gla", "fla"), ("sdpa", "SDPA"),
    ("SDPA causal", "SDPA"), ("flex_attention (window 1024)", "flex_attention"), ("torch._grouped_mm", "torch"),
    ("torch absorbed (bmm)", "torch"), ("MoE layer (naive)", "naive"),
    ("flashy kernel", "minisparse"),  # "fla" only as a word of its own names fla
])
def test_impl_family_names_each_implementation_of_the_committed_results(impl, family):
    assert bench.impl_family(impl) == family
    style = bench.impl_style(impl)
    assert style["color"] == bench.IMPL_COLORS[family]


def test_every_committed_result_has_one_colour_per_family_and_variants_dashed():
    for path in sorted(bench.results_dir().glob("*.json")):
        doc = json.loads(path.read_text())
        for impl in {r["impl"] for r in doc["rows"]}:
            assert bench.impl_family(impl) in bench.IMPL_COLORS, (path.name, impl)
    assert bench.impl_style("flash_attention (window 1024)")["linestyle"] == "--"
    assert bench.impl_style("flash_attention")["linestyle"] == "-"


def test_config_table_and_filtered_log_plot(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    rows = [{"impl": "ours", "pass": "fwd", "T": t, "H": h, "ms": t * h / 1e3} for t in (1, 2) for h in (1, 2)]
    doc = json.loads(bench.save_results("demo", {"B": 2, "tiles": {"fwd": [64, 32]}, "T": [1, 2]}, rows,
                                        path=tmp_path / "demo.json").read_text())
    table = bench.config_table(doc, keys=["tiles", "B", "missing"])
    lines = table.splitlines()
    assert lines[:2] == ["| setting | value |", "|---|---|"]
    assert any("tiles" in ln and "fwd: 64, 32" in ln for ln in lines)
    assert not any("missing" in ln for ln in lines)
    assert [ln.split("|")[1].strip() for ln in lines[2:]].index("tiles") < \
        [ln.split("|")[1].strip() for ln in lines[2:]].index("B")
    ax = bench.plot_results(doc, where={"H": 2}, logy=True)
    assert len(ax.lines) == 1 and ax.get_yscale() == "log"
    assert list(ax.lines[0].get_ydata()) == [0.002, 0.004]


def test_ceilings_are_known_per_device_and_an_unknown_gpu_names_the_script():
    assert bench.ceilings("NVIDIA H200") == (bench.H200_MATMUL_TFLOPS, bench.H200_COPY_TBPS) == (693.0, 4.25)
    with pytest.raises(LookupError, match=r"'NVIDIA T4'.*bench/notes/ceilings.py"):
        bench.ceilings("NVIDIA T4")
    assert all(isinstance(v, tuple) and len(v) == 2 and min(v) > 0 for v in bench.CEILINGS.values())


def test_roofline_point_names_the_binding_ceiling_and_the_share_reached():
    ridge = bench.H200_MATMUL_TFLOPS / bench.H200_COPY_TBPS  # ≈ 163 FLOP/byte
    p = bench.roofline_point(flops=2e12, nbytes=1e9, ms=10.0)  # 2,000 FLOP/B: past the ridge
    assert p["intensity"] == 2000 and p["bound"] == "compute"
    assert p["tflops"] == pytest.approx(200) and p["tbps"] == pytest.approx(0.1)
    assert p["fraction"] == pytest.approx(200 / 693)
    p = bench.roofline_point(flops=1e9, nbytes=1e9, ms=1.0)  # 1 FLOP/B: memory-bound, 1 TB/s of 4.25
    assert p["bound"] == "memory" and p["tbps"] == pytest.approx(1.0) and p["fraction"] == pytest.approx(1 / 4.25)
    assert bench.roofline_point(ridge * 1e9, 1e9, 1.0)["bound"] == "compute"
    assert list(bench.roofline_tflops([10, 1e4])) == pytest.approx([42.5, 693])


@pytest.mark.parametrize("cost, flops, nbytes", [
    # causal attention, T = 4: 10 visible pairs × 4·B·H·D = 80 FLOPs; q, k, v, o: 4 × 4·1·2 elements of 2 bytes
    (lambda: bench.attention_fwd_cost(1, 4, 1, 2), 80, 64),
    # window 2: pairs 1 + 2 + 2 + 2 = 7
    (lambda: bench.attention_fwd_cost(1, 4, 1, 2, window=2), 56, 64),
    # GQA, Dv ≠ D: 3 pairs × 2·4·(8 + 4); q 2·4·8 + k, v 2·1·(8 + 4) + o 2·4·4 = 120 elements
    (lambda: bench.attention_fwd_cost(1, 2, 4, 8, HKV=1, Dv=4), 288, 240),
    # grouped GEMM: 2·10·3·5; x 10·3 + w 2·3·5 + y 10·5 = 110 elements
    (lambda: bench.grouped_mm_cost(10, 3, 5, 2), 300, 220),
    # MLA decoding: 2·B·H·T·(2r + dr) = 2·2·4·3·18; cache 2·3·10 + q 2·4·10 + o 2·4·8 = 204 elements
    (lambda: bench.mla_decode_cost(2, 3, 4, kv_lora_rank=8, rope_dim=2), 864, 408),
    # lightning, chunk 2: a head T·C·(K + V) + 4·T·K·V = 128 + 512, two heads; q, k, v, o: 8·2·16 elements
    (lambda: bench.lightning_fwd_cost(1, 8, 2, 4, 4, chunk=2), 1280, 512),
    # gated delta rule: lightning's 640 + T·(C·K + C·(K + V) + 2·K·V) = 448; 8 tokens × (16 bf16 + 2 fp32)
    (lambda: bench.gdn_fwd_cost(1, 8, 1, 4, 4, chunk=2), 1088, 320),
    # KDA: the delta rule's 1088 + 4·T·K = 128; 8 tokens × (16 bf16 + (K + 1) fp32)
    (lambda: bench.kda_fwd_cost(1, 8, 1, 4, 4, chunk=2), 1216, 416),
    # NSA, T = 4, blocks of 2, 1 selected, window 1: keys read cmp 0+1+1+2, slc 1+2+2+2, swa 4 = 15, × 4·D·HQ;
    # q, o 2·2·2 + k, v 2·1·2 + gates 3·2 = 18 elements a token
    (lambda: bench.nsa_fwd_cost(1, 4, 2, 1, 2, block_size=2, block_counts=1, window_size=1), 240, 144),
    # DSA sparse attention, top-2 of T = 4: pairs 1 + 2 + 2 + 2 = 7 × 2·HQ·(2r + dr) = 40; a token: q, o
    # 2·(8 + 2) + the key row 6 elements of 2 bytes, 2 indices of 8 bytes
    (lambda: bench.dsa_sparse_fwd_cost(1, 4, 2, kv_lora_rank=4, rope_dim=2, topk=2), 280, 272),
])
def test_each_kernel_cost_counts_a_hand_computed_case(cost, flops, nbytes):
    assert cost() == {"flops": flops, "bytes": nbytes}


def test_dsa_sparse_cost_sums_the_chapters_per_position_model():
    import numpy as np

    from minisparse.dsa.cost import dsa_cost

    per_position = dsa_cost(np.arange(5000), "prefill", topk=2048)["sparse"].sum()
    assert bench.dsa_sparse_fwd_cost(1, 5000, 128, topk=2048)["flops"] == pytest.approx(per_position, rel=1e-12)


def test_plot_roofline_draws_both_ceilings_and_one_marker_a_point():
    import matplotlib
    matplotlib.use("Agg")
    points = [dict(impl="flash_attention", **bench.roofline_point(8e12, 1e9, 18.0)),
              dict(impl="sdpa", **bench.roofline_point(8e12, 1e9, 15.0)),
              dict(impl="fla chunk_simple_gla", **bench.roofline_point(1.7e11, 2.1e9, 1.5))]
    ax = bench.plot_roofline(points)
    roof, markers = ax.lines[0], ax.lines[2:]
    assert max(roof.get_ydata()) == pytest.approx(693) and len(markers) == 3
    assert markers[-1].get_color() == bench.IMPL_COLORS["minisparse"]  # the book's kernel drawn last, on top
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["this book", "SDPA", "fla"]
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_start_script_needs_a_gpu_unless_smoke(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_smoke_run", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.start_script("lightning", smoke=False) is False
    assert "bench/lightning.py times GPU kernels" in capsys.readouterr().err
    assert bench.environment()["date"] != "smoke"
    assert bench.start_script("lightning", smoke=True) is True
    assert bench.environment() == bench.smoke_environment()  # what save_results records from now on
    args = bench.script_parser("lightning", "Benchmark X.\nmore").parse_args(["--out", "d", "--smoke"])
    assert args.smoke and str(args.out) == "d"


_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("name", ["attention", "moe", "mla", "lightning", "deltanet", "kda", "nsa", "dsa"])
def test_benchmark_script_runs_in_smoke_mode(tmp_path, name):
    """Every chapter's benchmark runs end to end on the CPU with tiny fp32 shapes (`--smoke`) and writes its results
    file where it is told to, so a broken script shows here rather than on a GPU."""
    run = subprocess.run([sys.executable, os.path.join(_BENCH, f"{name}.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert doc["device"] == "cpu" and doc["date"] == "smoke" and doc["rows"], doc
    assert any(row.get("ms") for row in doc["rows"]), "a smoke run times (by the clock) at least our own rows"


def test_tensor_rule_names_the_first_tensor_that_breaks_it_and_lets_the_rest_through():
    no_float64 = TensorRule("in float32", lambda t: "float64" if t.dtype == torch.float64 else None)
    with no_float64:
        y = (torch.ones(3) * 2).sum()  # float32 throughout: allowed
    assert y.item() == 6.0
    with pytest.raises(ExerciseError, match=r"✗ in float32: .*made a tensor of shape \(3,\): float64"):
        with no_float64:
            torch.ones(3).double()
    small = TensorRule("small", lambda t: "too big" if t.numel() > 4 else None)
    with pytest.raises(ExerciseError, match="too big"):
        with small:
            torch.zeros(2, 3)
    torch.zeros(2, 3).double()  # outside the context nothing is checked


@pytest.mark.parametrize("call,message", [
    ("attention.cost:attended_pairs(-5)", "attended_pairs: Tq must be an int >= 0"),
    ("attention.cost:attention_flops(8, 64, 8, window=-2)", "attended_pairs: window must be an int > 0"),
    ("lightning.cost:lightning_flops(-5, 64, 64)", "lightning_flops: T must be a number >= 0"),
    ("deltanet.cost:gdn_flops(-5, 64, 64)", "gdn_flops: T must be a number >= 0"),
    ("moe.cost:moe_params(16, 32, 4, 8)", r"moe_params: top_k must be in \[1, num_experts = 4\]"),
    ("mla.cost:kv_cache_bytes(MLAConfig(), 10, batch=-2)", "kv_cache_bytes: batch must be an int > 0"),
    ("mla.cost:mla_decode_flops(-1, 128)", "mla_decode_flops: T must be a number >= 0"),
    ("mla.cost:mla_decode_bytes(float('nan'))", "mla_decode_bytes: T must be a number >= 0"),
    ("mla.cost:mla_expand_flops(-1, 128)", "mla_expand_flops: T must be a number >= 0"),
    ("mla.cost:mha_decode_flops([8, -1], 128)", "mha_decode_flops: T must be a number >= 0"),
    ("mla.cost:mha_decode_bytes(-8, 8)", "mha_decode_bytes: T must be a number >= 0")])
def test_chapters_cost_models_refuse_negative_sizes(call, message):
    """A negative size (or top_k above E) is an error, not a negative count."""
    import importlib

    module, expr = call.split(":")
    names = vars(importlib.import_module(f"minisparse.{module}"))
    with pytest.raises(ValueError, match=message):
        eval(expr, dict(names))


@pytest.mark.parametrize("call,message", [
    ("lightning:decay_matrix(-0.5, 4)", "decay_matrix: slope must be a finite number >= 0"),
    ("lightning:decay_matrix(float('nan'), 4)", "decay_matrix: slope must be a finite number >= 0"),
    ("lightning:decay_matrix(0.5, -1)", "decay_matrix: length must be an int >= 0"),
    ("deltanet:l2norm(torch.zeros(2, 4), eps=0.0)", "l2norm: eps must be a positive number"),
    ("moe:update_bias(torch.zeros(4), torch.ones(4), rate=float('nan'))",
     "update_bias: rate must be a finite number >= 0"),
    ("moe:update_bias(torch.zeros(4), torch.ones(4), rate=-1e-3)", "update_bias: rate must be a finite number >= 0"),
    ("moe:tile_schedule(torch.tensor([4], dtype=torch.int32), 4, 0)", "tile_schedule: block_m must be an int > 0"),
    ("mla:mla_decode_splitk(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 2), torch.ones(1, 3, 4), "
     "torch.ones(1, 3, 2), 0.5, split_len=0)", "mla_decode_splitk: split_len must be an int > 0")])
def test_small_arguments_are_checked_where_a_wrong_one_gave_nan_or_a_crash(call, message):
    """A negative decay slope (growth instead of decay), l2norm's eps of 0 (0/0 on a zero row), a NaN rate, a block
    or split of 0 rows (a ZeroDivisionError) are refused with the op's name."""
    import importlib

    module, expr = call.split(":")
    names = dict(vars(importlib.import_module(f"minisparse.{module}")), torch=torch)
    with pytest.raises(ValueError, match=message):
        eval(expr, names)


def test_load_balancing_loss_of_no_token_is_zero_with_zero_gradients():
    """An empty batch (N = 0, e.g. a rank that received no token) has nothing to balance: 0, not NaN."""
    from minisparse.moe import load_balancing_loss

    probs = torch.zeros(0, 4, requires_grad=True)
    loss = load_balancing_loss(probs, torch.zeros(0, 2, dtype=torch.long), 4)
    loss.backward()
    assert loss.item() == 0.0 and probs.grad.shape == (0, 4)
    probs = torch.full((3, 4), 0.25, requires_grad=True)  # uniform routing still gives k
    assert load_balancing_loss(probs, torch.tensor([[0, 1], [2, 3], [0, 2]]), 4).item() == pytest.approx(2.0, rel=0.2)
