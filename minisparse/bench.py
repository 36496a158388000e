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

__all__ = ["median_ms", "timed", "environment", "smoke_environment", "save_results", "load_results", "results_dir", "plot_results", "plot_passes",
           "IMPL_COLORS", "impl_family", "impl_style", "config_table"]


def median_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median time of `fn()` in milliseconds on the GPU (CUDA events, via `triton.testing.do_bench`).

    `warmup` and `rep` are in milliseconds, as do_bench takes them; `grad_to_none` lists tensors whose `.grad` is
    reset between calls (for forward+backward timings).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("median_ms times GPU work; on a CPU, plot the committed results with plot_results()")
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def timed(fn: Callable[[], object], *, smoke: bool = False, warmup: int = 25, rep: int = 100) -> float | None:
    """A benchmark script's timing of one case: `fn()` once to compile (and autotune) outside the timing, then
    `median_ms` on a GPU, or one wall-clock call with `smoke` (a CPU run that checks the script). A failure
    (out of memory, an unsupported shape in an anchor library) is printed and gives None, so the other cases still
    run and the results file records the gap."""
    import time

    try:
        fn()
        if smoke:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        torch.cuda.synchronize()
        return median_ms(fn, warmup=warmup, rep=rep)
    except Exception as err:  # noqa: BLE001 - a failing case is recorded as None
        print(f"  failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


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


def smoke_environment() -> dict:
    """What `environment()` records for a --smoke run on a CPU (nothing is timed there)."""
    return dict(date="smoke", device="cpu", torch=torch.__version__, triton="-", cuda=None)


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


def save_results(name: str, config: dict, rows: Iterable[dict], path: pathlib.Path | str | None = None,
                 env: dict | None = None) -> pathlib.Path:
    """Write `{environment, config, rows}` as JSON to `path` (default `bench/results/<name>.json`). `env` is the
    environment recorded: this machine's (`environment()`) unless the rows were measured elsewhere (a merge)."""
    rows = list(rows)
    for r in rows:
        missing = {"impl", "ms"} - set(r)
        if missing:
            raise ValueError(f"save_results: row {r} lacks {sorted(missing)}")
    doc = {"name": name, **(environment() if env is None else env), "config": config, "rows": rows}
    path = pathlib.Path(path) if path is not None else results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_results(name: str) -> dict:
    """The committed results `bench/results/<name>.json`."""
    return json.loads((results_dir() / f"{name}.json").read_text())


# One colour per implementation family in every benchmark plot of the book (chapters and the Performance page):
# ours is always blue, fla orange, SDPA grey, flex_attention green, plain PyTorch purple, the naive spec brown.
IMPL_COLORS = {
    "minisparse": "#1f77b4",
    "fla": "#ff7f0e",
    "SDPA": "#4d4d4d",
    "flex_attention": "#2ca02c",
    "torch": "#9467bd",
    "naive": "#8c564b",
}
_MARKERS = {"minisparse": "o", "fla": "D", "SDPA": "s", "flex_attention": "^", "torch": "v", "naive": "x"}
# A second implementation of one family in the same plot (a variant: a window, another weight layout, checks off,
# another fla op) keeps the family's colour and is drawn dashed with an open marker.
_VARIANTS = ("window", "w [E,K,N]", "value checks off", "simple_gla")


def impl_family(impl: str) -> str:
    """The family of an `impl` name of bench/results/*.json: "SDPA", "flex_attention", "fla", "naive", "torch"
    (eager PyTorch, `torch._grouped_mm`, bmm) or "minisparse" (this book's kernels: anything else)."""
    low = impl.lower()
    if "sdpa" in low:
        return "SDPA"
    if "flex_attention" in low:
        return "flex_attention"
    if low == "fla" or low.startswith("fla ") or low.startswith("fla."):
        return "fla"
    if "naive" in low:
        return "naive"
    if low.startswith("torch"):
        return "torch"
    return "minisparse"


def impl_style(impl: str) -> dict:
    """Matplotlib keywords (color, marker, linestyle, markerfacecolor) for one implementation: its family's colour
    (`IMPL_COLORS`), so that an implementation looks the same in every plot."""
    family = impl_family(impl)
    color = IMPL_COLORS[family]
    variant = any(v in impl for v in _VARIANTS)
    return {"color": color, "marker": _MARKERS[family], "linestyle": "--" if variant else "-",
            "markerfacecolor": "white" if variant else color}


_LINESTYLES = ("-", "--", ":", "-.")


def _matches(row: dict, where: dict | None) -> bool:
    return not where or all(row.get(k) == v for k, v in where.items())


def plot_results(doc: dict, *, x: str = "T", y: str = "ms", by: Iterable[str] = ("impl",), passes=None, ax=None,
                 logx: bool = True, logy: bool = False, where: dict | None = None, style_by: str | None = None,
                 legend: bool = True):
    """One line per (impl, pass) of `y` against `x`; the title names the device, versions and date.

    Each implementation keeps its colour (`impl_style`). `logy` puts `y` on a log scale (so that a kernel 50× faster
    than SDPA is not squashed under it); `where` keeps the rows whose keys equal the given values
    (`where={"H": 128}`); `style_by` names a row key (e.g. "B") whose values get one line style each and join the
    label (by default the pass does, when one axes shows several passes). `legend=False` leaves the legend to the caller (a figure legend shared by several panels).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    rows = [r for r in doc["rows"] if _matches(r, where)]
    keys = tuple(by) + (("pass",) if passes is None and len({r.get("pass") for r in rows}) > 1 else ())
    if style_by is None and "pass" in keys:
        style_key = "pass"  # one axes, several passes: each pass its own line style, each impl its colour
    else:
        style_key = style_by
    values = {r.get(style_key) for r in rows} if style_key else set()
    try:
        values = sorted(values)
    except TypeError:
        values = sorted(values, key=str)
    dashes = {v: _LINESTYLES[i % len(_LINESTYLES)] for i, v in enumerate(values)}
    series: dict = {}
    for r in rows:
        if passes is not None and r.get("pass") not in passes:
            continue
        if r.get(y) is None:
            continue
        label = " ".join(str(r[k]) for k in keys if k in r)
        if style_by:
            label += f", {style_by}={r.get(style_by)}"
        series.setdefault(label, (r, []))[1].append((r[x], r[y]))
    for label, (first, pts) in series.items():
        pts.sort()
        style = impl_style(str(first.get("impl", label)))
        if style_key:
            style["linestyle"] = dashes[first.get(style_key)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    if logx:
        from minisparse.viz import tokens_axis

        tokens_axis(ax, x)
    else:
        ax.set_xlabel(x)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(y)
    ax.grid(alpha=0.3, which="both" if logy else "major")
    if legend:
        ax.legend(fontsize=8)
    ax.set_title(f"{doc['device']} · torch {doc['torch']} · triton {doc['triton']} · {doc['date']}", fontsize=9)
    return ax


def plot_passes(doc: dict, *, y: str | None = None, size=(6, 3.6), ncols: int = 3, passes=None, logy: bool = False,
                where: dict | None = None, legend: str = "axes"):
    """One panel per pass (fwd, fwd+bwd, decode at B=…, …) of a results document, `ncols` panels a row; `y` defaults
    to TFLOP/s when every row has it, else ms. Returns the Figure.

    `passes` picks and orders the panels (default: every pass, sorted); `logy` and `where` go to `plot_results`.
    `legend="figure"` draws one legend for all panels under them (legible when the panels are small) instead of
    one legend a panel.
    """
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if _matches(r, where)]
    if y is None:
        y = "tflops" if all(r.get("tflops") is not None for r in rows) else "ms"
    if passes is None:
        passes = sorted({r.get("pass") for r in rows}, key=str)
    ncols = max(1, min(ncols, len(passes)))
    nrows = -(-len(passes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax, p in zip(axes.flat, passes):
        plot_results(doc, y=y, passes=[p], ax=ax, logy=logy, where=where, legend=legend != "figure")
        ax.set_ylabel({"tflops": "TFLOP/s", "ms": "median time (ms)", "gbps": "GB/s"}.get(y, y))
        ax.set_title(f"{doc['name']} · {p}\n" + ax.get_title(), fontsize=9)
    for ax in list(axes.flat)[len(passes):]:
        ax.axis("off")
    if legend == "figure":
        handles = {}
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, h)
        longest = max((len(label) for label in handles), default=1)
        fits = int(fig.get_figwidth() // (0.075 * longest + 0.6))  # 10-point characters ≈ 0.075 in, handle 0.6 in
        ncol = max(1, min(3, len(handles), fits))
        legend_in = 0.22 * -(-len(handles) // ncol) + 0.12  # inches: a 10-point row of entries each, a margin
        fig.set_figheight(fig.get_figheight() + legend_in)  # the legend gets its own room under the panels
        fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=10, frameon=False)
    else:
        fig.tight_layout()
    return fig


def config_table(doc: dict, keys: Iterable[str] | None = None) -> str:
    """A results document's fixed configuration as a two-column Markdown table (setting, value), with the device,
    versions and date first; `keys` picks and orders the settings shown (default: all)."""
    def fmt(v) -> str:
        if isinstance(v, dict):
            return "; ".join(f"{k}: {fmt(x)}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ", ".join(fmt(x) for x in v)
        return str(v).replace("|", "\\|")

    config = doc.get("config", {})
    keys = list(config) if keys is None else [k for k in keys if k in config]
    lines = ["| setting | value |", "|---|---|",
             f"| measured | {doc.get('device', '?')}, torch {doc.get('torch', '?')}, triton {doc.get('triton', '?')}, "
             f"CUDA {doc.get('cuda', '?')}, {doc.get('date', '?')} |"]
    lines += [f"| {k} | {fmt(config[k])} |" for k in keys]
    return "\n".join(lines)
