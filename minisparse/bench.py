"""GPU timing and the benchmark results format shared by `bench/` and the chapters.

Hand-written infrastructure. A results file `bench/results/<name>.json` holds:

    {"name": ..., "date": "YYYY-MM-DD", "device": "NVIDIA H200", "torch": ..., "triton": ..., "cuda": ...,
     "config": {...fixed shapes...},
     "rows": [{"impl": "flash_attention", "pass": "fwd", "T": 8192, "ms": 1.02, "tflops": 539.1}, ...]}

Chapters plot these on a CPU, where nothing can be timed, and time live on a GPU.
"""
from __future__ import annotations

import datetime as _dt
import json
import pathlib
from typing import Callable, Iterable

import torch

__all__ = ["median_ms", "environment", "save_results", "load_results", "results_dir", "plot_results", "plot_passes"]


def median_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median time of `fn()` in milliseconds on the GPU (CUDA events, via `triton.testing.do_bench`).

    `warmup` and `rep` are in milliseconds, as do_bench takes them; `grad_to_none` lists tensors whose `.grad` is
    reset between calls (for forward+backward timings).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("median_ms times GPU work; on a CPU, plot the committed results with plot_results()")
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def environment() -> dict:
    """Device, library versions and today's date, recorded with every result."""
    import triton

    return {
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def results_dir() -> pathlib.Path:
    """`bench/results/` of the source tree (the chapters run from `chapters/`, the scripts from the root)."""
    here = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results"
    if here.is_dir():
        return here
    cwd = pathlib.Path.cwd()
    for base in (cwd, *cwd.parents):
        if (base / "bench" / "results").is_dir():
            return base / "bench" / "results"
    raise FileNotFoundError("bench/results/ not found: run from a clone of the minisparse repository")


def save_results(name: str, config: dict, rows: Iterable[dict], path: pathlib.Path | str | None = None) -> pathlib.Path:
    """Write `{environment, config, rows}` as JSON to `path` (default `bench/results/<name>.json`)."""
    rows = list(rows)
    for r in rows:
        missing = {"impl", "ms"} - set(r)
        if missing:
            raise ValueError(f"save_results: row {r} lacks {sorted(missing)}")
    doc = {"name": name, **environment(), "config": config, "rows": rows}
    path = pathlib.Path(path) if path is not None else results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_results(name: str) -> dict:
    """The committed results `bench/results/<name>.json`."""
    return json.loads((results_dir() / f"{name}.json").read_text())


def plot_results(doc: dict, *, x: str = "T", y: str = "ms", by: Iterable[str] = ("impl",), passes=None, ax=None,
                 logx: bool = True):
    """One line per (impl, pass) of `y` against `x`; the title names the device, versions and date."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    keys = tuple(by) + (("pass",) if any("pass" in r for r in doc["rows"]) else ())
    series: dict = {}
    for r in doc["rows"]:
        if passes is not None and r.get("pass") not in passes:
            continue
        if r.get(y) is None:
            continue
        label = " ".join(str(r[k]) for k in keys if k in r)
        series.setdefault(label, []).append((r[x], r[y]))
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if logx:
        from minisparse.viz import tokens_axis

        tokens_axis(ax, x)
    else:
        ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{doc['device']} · torch {doc['torch']} · triton {doc['triton']} · {doc['date']}", fontsize=9)
    return ax


def plot_passes(doc: dict, *, y: str | None = None, size=(6, 3.6), ncols: int = 3):
    """One panel per pass (fwd, fwd+bwd, decode at B=…, …) of a results document, `ncols` panels a row; `y` defaults
    to TFLOP/s when every row has it, else ms. Returns the Figure."""
    import matplotlib.pyplot as plt

    if y is None:
        y = "tflops" if all(r.get("tflops") is not None for r in doc["rows"]) else "ms"
    passes = sorted({r.get("pass") for r in doc["rows"]}, key=str)
    ncols = max(1, min(ncols, len(passes)))
    nrows = -(-len(passes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax, p in zip(axes.flat, passes):
        plot_results(doc, y=y, passes=[p], ax=ax)
        ax.set_ylabel({"tflops": "TFLOP/s", "ms": "median time (ms)", "gbps": "GB/s"}.get(y, y))
        ax.set_title(f"{doc['name']} · {p}\n" + ax.get_title(), fontsize=9)
    for ax in list(axes.flat)[len(passes):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
