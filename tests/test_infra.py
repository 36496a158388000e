"""The hand-written infrastructure: runtime, testing (assert_close, factories, the exercise checker), bench."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import minisparse
from minisparse import runtime
from minisparse.testing import (ExerciseError, assert_close, check, make_bthd, make_log_gates, make_qkv, rel_rms)


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


def test_triton_op_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        runtime.check_triton_device("my_op", torch.zeros(2))


def test_triton_op_rejects_mixed_devices():
    meta = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        runtime.check_triton_device("my_op", torch.zeros(2), meta)


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


def test_attempt_prints_instead_of_raising(capsys):
    from minisparse.testing import attempt

    assert attempt(check, "double", lambda x: 3 * x, _double, [(torch.ones(2),)]) is False
    assert "✗ double" in capsys.readouterr().out
    assert attempt(check, "double", _double, _double, [(torch.ones(2),)]) is True


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
    assert len(plot_passes(doc).axes) == 2


def test_kernel_resources_compiles_for_hopper_without_a_gpu():
    """tools/kernel_resources.py reports shared memory, registers and spills of a real sm_90 compile, on a CPU."""
    import pathlib

    import triton

    if not (pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    root = pathlib.Path(__file__).resolve().parent.parent
    args = [sys.executable, str(root / "tools/kernel_resources.py"),
            "minisparse.deltanet.triton:_fused_recurrent_kernel", "BK=16", "BV=16", "HAS_H0=False", "STORE_HT=False", "L2NORM=False"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert "sm_90" in line and "KiB" in line and "registers" in line, line
    regs = int(line.split(" registers")[0].rsplit(" ", 1)[1])
    assert 0 < regs <= 255, line
    # a kernel wrapped by @triton.heuristics compiles too, and --dtype / --arch are honoured
    wrapped = subprocess.run(
        [sys.executable, str(root / "tools/kernel_resources.py"), "minisparse.moe.triton:_grouped_mm_kernel",
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


def test_kernel_resources_same_as_compares_ptx(tmp_path):
    """--same-as: a kernel refactored through a helper function compiles to the same PTX (exit 0); one whose
    arithmetic changed does not (exit 3, and the first differing line is shown)."""
    import pathlib

    import triton

    if not (pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    tool = pathlib.Path(__file__).resolve().parent.parent / "tools/kernel_resources.py"
    for name, body in (("inline", "x * 2.0"), ("helper", "_times(x, 2.0)"), ("changed", "x * 3.0")):
        (tmp_path / f"{name}.py").write_text(_SCALE_KERNEL.format(body=body))

    def compare(a, b):
        return subprocess.run([sys.executable, str(tool), f"{tmp_path / a}.py:scale_kernel", "B=64",
                               "--same-as", str(tmp_path / f"{b}.py")], capture_output=True, text=True, timeout=300)

    same = compare("helper", "inline")
    assert same.returncode == 0 and "PTX identical" in same.stdout, same.stdout + same.stderr[-2000:]
    changed = compare("changed", "inline")
    assert changed.returncode == 3 and "PTX differs" in changed.stdout, changed.stdout + changed.stderr[-2000:]


def test_check_values_later_starts_waits_and_raises_where_it_should(monkeypatch):
    """check_values_later: off, it starts nothing; on a CPU it starts the check and raises at once; on a CUDA device
    it starts the check and raises only when its function is called (after the op's kernels are queued)."""
    calls = []
    monkeypatch.setattr(runtime, "_beside_the_kernels", lambda start, device: start())  # its stream: the GPU test

    def start():
        calls.append("start")

        def verdict():
            calls.append("verdict")
            raise ValueError("out of range")
        return verdict

    previous = runtime.set_value_checks(False)
    try:
        runtime.check_values_later(start, torch.device("cpu"))()
        runtime.check_values_later(start, torch.device("cuda"))()
    finally:
        runtime.set_value_checks(previous)
    assert calls == []
    with pytest.raises(ValueError, match="out of range"):
        runtime.check_values_later(start, torch.device("cpu"))
    assert calls == ["start", "verdict"]
    later = runtime.check_values_later(start, torch.device("cuda"))  # needs no GPU: the device decides when
    assert calls == ["start", "verdict", "start"]
    with pytest.raises(ValueError, match="out of range"):
        later()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams")
def test_check_values_later_runs_beside_the_kernels_queued_after_it():
    """On a GPU the check waits for the work queued before it (which made the values) but not for the work queued
    after it (the op's kernels): its reduction and copy run on a stream of their own. Sleeps of 10⁹ clock cycles
    stand for both."""
    x = torch.tensor([1.0, 2.0], device="cuda")
    runtime.check_values_later(lambda: runtime.to_host_later(x), x.device)()  # warm the stream
    made, queued = torch.cuda.Event(), torch.cuda.Event()
    torch.cuda._sleep(10**9)
    y = x * 3  # the values to check, made after the first sleep
    made.record()
    wait = runtime.check_values_later(lambda: runtime.to_host_later(y.sum().reshape(1)), x.device)
    torch.cuda._sleep(10**9)  # the op's kernels
    queued.record()
    got = wait()
    assert made.query(), "the check did not wait for the work that made its values"
    assert not queued.query(), "the check waited for the kernels queued after it"
    assert got == [9.0]


def test_to_host_later_waits_for_the_copy_alone_and_only_when_asked():
    """to_host_later returns at once, even with the GPU busy (here sleeping 10⁹ clock cycles, 0.5-1 s), and its
    function waits for the copy alone: work queued after the copy is still running when the values arrive. On a CPU
    the values are read at once."""
    x = torch.tensor([1.5, -2.0, float("nan")], device=runtime.device())
    if x.is_cuda:
        runtime.to_host_later(x)()  # once first: the first pinned allocation of a process may synchronize
        before, after = torch.cuda.Event(), torch.cuda.Event()
        torch.cuda._sleep(10**9)
        before.record()
        values = runtime.to_host_later(x * 2)
        assert not before.query(), "to_host_later waited for the GPU when called"
        torch.cuda._sleep(10**9)
        after.record()
        got = values()
        assert before.query() and not after.query(), "its function waited for the work queued after the copy"
    else:
        got = runtime.to_host_later(x * 2)()
    assert got[:2] == [3.0, -4.0] and math.isnan(got[2])
