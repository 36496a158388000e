"""GPU timing and the benchmark results format shared by `bench/` and the chapters.

Hand-written infrastructure. A results file `bench/results/<name>.json` holds:

    {"name": ..., "date": "YYYY-MM-DD", "device": "NVIDIA H200", "torch": ..., "triton": ..., "cuda": ...,
     "config": {...fixed shapes...},
     "rows": [{"impl": "flash_attention", "pass": "fwd", "T": 8192, "ms": 1.02, "tflops": 539.1}, ...]}

Chapters plot these on a CPU, where nothing can be timed, and time live on a GPU.

The roofline helpers at the end (`roofline_point`, `plot_roofline` and the `*_cost` counts of one call of each
benchmarked kernel) place a timing against the measured compute and memory ceilings of the GPU it ran on
(`CEILINGS`, `ceilings`; the book's Roofline page).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
from typing import Callable, Iterable

import torch

__all__ = ["host_ms", "median_ms", "timed", "graphed", "sweep_rows", "script_parser", "start_script", "environment",
           "smoke_environment", "save_results", "load_results",
           "results_dir", "plot_results", "plot_passes",
           "IMPL_COLORS", "impl_family", "impl_style", "config_table", "CEILINGS", "ceilings",
           "H200_MATMUL_TFLOPS", "H200_COPY_TBPS",
           "roofline_tflops", "roofline_point", "plot_roofline", "attention_fwd_cost", "grouped_mm_cost",
           "mla_decode_cost", "lightning_fwd_cost", "gdn_fwd_cost", "kda_fwd_cost", "nsa_fwd_cost",
           "dsa_sparse_fwd_cost"]


def median_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median time of `fn()` in milliseconds on the GPU (CUDA events, via `triton.testing.do_bench`).

    `warmup` and `rep` are in milliseconds, as do_bench takes them; `grad_to_none` lists tensors whose `.grad` is
    reset between calls (for forward+backward timings).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("median_ms times GPU work; on a CPU, plot the committed results with plot_results()")
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def host_ms(fn: Callable[[], object], *, calls: int = 50, warmup: int = 5) -> tuple[float, float]:
    """(host, wall) milliseconds a call of `fn()`, `calls` calls issued back to back: host is read before the GPU is
    synchronised (the time to issue the work), wall after it. Where the two agree, the calls are bound by the host,
    not by their kernels. On a CPU both are the call's wall-clock time."""
    import time

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    sync()
    return 1e3 * host / calls, 1e3 * (time.perf_counter() - start) / calls


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


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured in a CUDA graph, as a serving engine runs a decoding step (no host work between its kernels):
    three warm-up calls on a side stream first (compilation and autotuning happen there), then the capture. Returns
    the graph's replay, or a function that raises what the capture raised (so `timed` records the case as None)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as err:  # noqa: BLE001 - recorded by timed() as a failed case
        def fail(err=err):
            raise err
        return fail


def sweep_rows(passes: dict[str, Callable[[], object]], sweep: dict[str, tuple[str, list[dict]]], *,
               only: Iterable[str] | None = None, timer: Callable[[Callable[[], object]], float] | None = None,
               out: Callable[[str], None] = print) -> list[dict]:
    """Force every configuration of some `runtime.LAUNCH_TABLE` rows, one at a time, and time the pass each belongs
    to: the measurements behind a row's order (bench/notes).

    `passes` maps a pass's name to a function that runs it and returns its result (a tensor or a tuple of them);
    `sweep` maps a row to (the pass it is timed in, its configurations); `only` keeps the rows named. Each forced
    configuration's result is compared with what the table's configurations compute (relative RMS), so one
    that computes something else shows an error far above rounding instead of only a time. A configuration that
    fails (too large, a compiler error) is reported and the sweep goes on. Returns one dict a configuration:
    row, config, pass, ms and err (None where it failed, with `error` saying why); `out` prints each as it comes.
    """
    from minisparse import runtime
    from minisparse.testing import rel_rms

    timer = timer or (lambda fn: median_ms(fn, warmup=3, rep=10))
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    wanted = set(sweep) if only is None else set(only)
    unknown = wanted - set(sweep)
    if unknown:
        raise KeyError(f"sweep_rows: no sweep for {sorted(unknown)}; rows: {sorted(sweep)}")
    reference = {name: as_tuple(fn()) for name, fn in passes.items()}
    found = []
    for row, (name, configs) in sweep.items():
        if row not in wanted:
            continue
        for config in configs:
            rec = dict(row=row, config=config, **{"pass": name}, ms=None, err=None)
            try:
                with runtime.launch_config(row, **config):
                    rec["ms"] = timer(passes[name])
                    got = as_tuple(passes[name]())
                rec["err"] = max(rel_rms(a, b) for a, b in zip(got, reference[name]))
                out(f"{row} {config}: {name} {rec['ms']:.3f} ms, {rec['err']:.1e} from the table's result")
            except Exception as err:  # noqa: BLE001 - a configuration that does not fit says so
                rec["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
                out(f"{row} {config}: {rec['error']}")
            found.append(rec)
    return found


_smoke_run = False  # set by start_script(name, smoke=True): results files then record a smoke run


def script_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A bench/ script's command line, its docstring's first line as description: --out (the directory for
    <name>.json) and --smoke (tiny fp32 shapes on a CPU: checks the script, times nothing). Add the script's own
    options to it."""
    ap = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True, help=f"directory for {name}.json")
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on a CPU: check the script, time nothing")
    return ap


def start_script(name: str, smoke: bool) -> bool:
    """The start every bench/ script shares, after it has set its shapes: with `smoke`, the results files written
    from now on record a smoke run (`smoke_environment`); without, a CUDA GPU is required — False, with a line on
    stderr, when there is none; else the device is printed. True: go on."""
    global _smoke_run
    if smoke:
        _smoke_run = True
        return True
    if not torch.cuda.is_available():
        import sys

        print(f"bench/{name}.py times GPU kernels: run it on a machine with a CUDA GPU (or --smoke on a CPU)",
              file=sys.stderr)
        return False
    print(f"device {torch.cuda.get_device_name(0)} · torch {torch.__version__}")
    return True


def environment() -> dict:
    """Device, library versions and today's date, recorded with every result (`smoke_environment()` after
    `start_script(..., smoke=True)`)."""
    if _smoke_run:
        return smoke_environment()
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
# another fla op, a CUDA graph's replay) keeps the family's colour and is drawn dashed with an open marker.
_VARIANTS = ("window", "w [E,K,N]", "value checks on", "TransNormer", "CUDA graph")


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
    machine = ""
    for ax, p in zip(axes.flat, passes):
        plot_results(doc, y=y, passes=[p], ax=ax, logy=logy, where=where, legend=legend != "figure")
        ax.set_ylabel({"tflops": "TFLOP/s", "ms": "median time (ms)", "gbps": "GB/s"}.get(y, y))
        machine = ax.get_title()  # the device, versions and date: once, above the panels
        ax.set_title(f"{doc['name']} · {p}", fontsize=9)
    for ax in list(axes.flat)[len(passes):]:
        ax.axis("off")
    fig.suptitle(machine, fontsize=9)
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


# ---------------------------------------------------------------------------------------------------------------
# Roofline: the GPU's two ceilings, and the FLOPs and bytes of one call of each benchmarked kernel.
#
# Every `*_cost` function returns {"flops": ..., "bytes": ...} for one call at the given shapes:
#   flops  the useful FLOPs (2 a multiply-add), only the products the mask or the selection keeps, as the
#          chapter's cost model counts them (the chapter's function is called, never restated);
#   bytes  the least traffic the call must make: every input read once, every output written once, nothing
#          intermediate (no scores, no chunk states). A kernel's real traffic is at least this much.

# The two ceilings of each GPU that committed results come from, measured on it by bench/notes/ceilings.py (the runs
# in bench/notes/roofline.md): the device's name as torch reports it (a results file's "device") -> (bf16 dense
# matmul TFLOP/s, HBM-to-HBM copy TB/s, read plus write).
CEILINGS: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (693.0, 4.25),  # 2026-12-02 (mla.json records the copy bandwidth too)
    "NVIDIA H100 80GB HBM3": (776.0, 3.03),  # 2026-12-05, bench/notes/ceilings.py
}
H200_MATMUL_TFLOPS, H200_COPY_TBPS = CEILINGS["NVIDIA H200"]  # the defaults of the functions below


def ceilings(device: str) -> tuple[float, float]:
    """(bf16 matmul TFLOP/s, HBM copy TB/s) measured on `device`, a results file's "device". A GPU not in
    `CEILINGS` raises LookupError naming the script that measures it."""
    if device not in CEILINGS:
        raise LookupError(f"no measured ceilings for {device!r} (known: {', '.join(CEILINGS)}): run "
                          "bench/notes/ceilings.py on that GPU and add its line to minisparse.bench.CEILINGS")
    return CEILINGS[device]


def roofline_tflops(intensity, peak_tflops: float = H200_MATMUL_TFLOPS, copy_tbps: float = H200_COPY_TBPS):
    """The roofline at `intensity` FLOP/byte (a number or an array), in TFLOP/s: min(peak, intensity × bandwidth).
    The two ceilings meet at the ridge point, peak / bandwidth FLOP/byte (163 on the H200)."""
    import numpy as np

    return np.minimum(peak_tflops, np.asarray(intensity, dtype=float) * copy_tbps)


def roofline_point(flops: float, nbytes: float, ms: float, peak_tflops: float = H200_MATMUL_TFLOPS,
                   copy_tbps: float = H200_COPY_TBPS) -> dict:
    """Where one call of `flops` FLOPs moving `nbytes` bytes in `ms` milliseconds sits on the roofline.

    Returns {flops, bytes, ms, intensity (FLOP/byte), tflops, tbps (achieved), bound, fraction}: `bound` is
    "compute" when the intensity is at or past the ridge point (peak / bandwidth), else "memory", and `fraction` is
    the share of that binding ceiling reached (TFLOP/s over the peak, or TB/s over the bandwidth)."""
    seconds = ms * 1e-3
    tflops, tbps = flops / seconds / 1e12, nbytes / seconds / 1e12
    intensity = flops / nbytes
    compute = intensity >= peak_tflops / copy_tbps
    return dict(flops=flops, bytes=nbytes, ms=ms, intensity=intensity, tflops=tflops, tbps=tbps,
                bound="compute" if compute else "memory",
                fraction=tflops / peak_tflops if compute else tbps / copy_tbps)


def attention_fwd_cost(B: int, T: int, H: int, D: int, *, HKV: int | None = None, Dv: int | None = None,
                       window: int | None = None, dtype_bytes: int = 2) -> dict:
    """Causal softmax attention, forward (chapter 1): 2·B·H·(D + Dv) FLOPs a visible (query, key) pair (QKᵀ and
    PV; T(T+1)/2 pairs, fewer with a `window`); bytes: q [B, T, H, D], k [B, T, HKV, D], v [B, T, HKV, Dv] read
    and o [B, T, H, Dv] written (flash attention's lower bound)."""
    from minisparse.attention.cost import attention_bytes, attention_flops

    return dict(flops=attention_flops(T, D, H, window=window, Dv=Dv, B=B),
                bytes=attention_bytes(T, D, H, HKV, Dv=Dv, B=B, dtype_bytes=dtype_bytes, materialize=False))


def grouped_mm_cost(M: int, K: int, N: int, E: int, dtype_bytes: int = 2) -> dict:
    """A grouped GEMM (chapter 2): M routed rows in total, each times its expert's K × N matrix, 2·M·K·N FLOPs;
    bytes: x [M, K] and the E weights [K, N] read, y [M, N] written. The backward's dX (M·N in, M·K out) and dW
    (x and dY in, E·K·N out) products have the same counts."""
    from minisparse.moe.cost import grouped_mm_bytes, grouped_mm_flops

    return dict(flops=grouped_mm_flops(M, K, N), bytes=grouped_mm_bytes(M, K, N, E, dtype_bytes))


def mla_decode_cost(B: int, T: int, H: int, kv_lora_rank: int = 512, rope_dim: int = 64,
                    dtype_bytes: int = 2) -> dict:
    """One absorbed MLA decoding step (chapter 3): B·H query rows each score T cached keys of r + dr and average T
    values of r, 2·B·H·T·(2r + dr) FLOPs; bytes: the latent cache [B, T, r + dr] (once for all heads) and the
    queries [B, H, r + dr] read, the outputs [B, H, r] written."""
    from minisparse.mla.cost import mla_decode_bytes, mla_decode_flops

    r, dr = kv_lora_rank, rope_dim
    return dict(flops=mla_decode_flops(T, H, r, dr, B=B),
                bytes=mla_decode_bytes(T, r, dr, B=B, dtype_bytes=dtype_bytes) + B * H * (2 * r + dr) * dtype_bytes)


def lightning_fwd_cost(B: int, T: int, H: int, K: int, V: int, chunk: int = 64, dtype_bytes: int = 2) -> dict:
    """Chunked lightning attention, forward (chapter 4): the chunk form's FLOPs a head (causal QKᵀ and ·V inside
    each chunk, the state's read and update); bytes: q, k [B, T, H, K] and v [B, T, H, V] read, o written (the
    per-head decay rates are left out: H numbers)."""
    from minisparse.lightning.cost import lightning_flops

    return dict(flops=B * H * lightning_flops(T, K, V, chunk=chunk, form="chunk"),
                bytes=B * T * H * (2 * K + 2 * V) * dtype_bytes)


def gdn_fwd_cost(B: int, T: int, H: int, K: int, V: int, *, HV: int | None = None, chunk: int = 64,
                 dtype_bytes: int = 2, gate_bytes: int = 4) -> dict:
    """The chunked gated delta rule, forward (chapter 5): lightning's chunk form plus the UT transform, per value
    head; bytes: q, k [B, T, H, K], v [B, T, HV, V] read, o [B, T, HV, V] written, and the gate and beta
    [B, T, HV] read (`gate_bytes` each: the benchmarks pass them in fp32)."""
    from minisparse.deltanet.cost import gdn_flops

    HV = H if HV is None else HV
    return dict(flops=B * gdn_flops(T, K, V, HV, chunk=chunk),
                bytes=B * T * ((2 * H * K + 2 * HV * V) * dtype_bytes + 2 * HV * gate_bytes))


def kda_fwd_cost(B: int, T: int, H: int, K: int, V: int, chunk: int = 64, dtype_bytes: int = 2,
                 gate_bytes: int = 4) -> dict:
    """Chunked Kimi Delta Attention, forward (chapter 6): the gated delta rule's FLOPs plus the per-channel decay's
    scalings; bytes: q, k [B, T, H, K], v [B, T, H, V] read, o written, and the per-channel gate [B, T, H, K] and
    beta [B, T, H] read (`gate_bytes` each)."""
    from minisparse.kda.cost import kda_flops

    return dict(flops=B * kda_flops(T, K, V, H, chunk=chunk),
                bytes=B * T * H * ((2 * K + 2 * V) * dtype_bytes + (K + 1) * gate_bytes))


def nsa_fwd_cost(B: int, T: int, HQ: int, H: int, D: int, *, block_size: int = 64, block_counts: int = 16,
                 window_size: int = 512, dtype_bytes: int = 2) -> dict:
    """Native sparse attention, forward (chapter 7): 4·D FLOPs a (query head, key read) pair over its three
    branches (compressed summaries of `block_size`, `block_counts` selected blocks, the last `window_size`
    tokens); bytes: q [B, T, HQ, D], k and v [B, T, H, D] and the three branch gates [B, T, HQ] read, o
    [B, T, HQ, D] written."""
    from minisparse.nsa.cost import nsa_cost

    cost = nsa_cost(T, "prefill", head_dim=D, q_heads=HQ, kv_heads=H, block_size=block_size,
                    block_counts=block_counts, window_size=window_size)
    return dict(flops=B * int(cost["nsa"]), bytes=B * T * (2 * HQ * D + 2 * H * D + 3 * HQ) * dtype_bytes)


def dsa_sparse_fwd_cost(B: int, T: int, HQ: int, *, kv_lora_rank: int = 512, rope_dim: int = 64, topk: int = 2048,
                        dtype_bytes: int = 2, index_bytes: int = 8) -> dict:
    """DSA's sparse attention in MLA's latent form, forward over a prefill of T tokens (chapter 8): each query row
    of each of the HQ heads attends to min(t + 1, topk) selected keys, 2·(2r + dr) FLOPs a pair (as MLA's absorbed
    decoding); bytes: q [B, T, HQ, r + dr], the one key row a token [B, T, r + dr] (its first r dims are the value)
    and the indices [B, T, topk] (`index_bytes` each) read, o [B, T, HQ, r] written."""
    from minisparse.attention.cost import attended_pairs
    from minisparse.mla.cost import mla_decode_flops

    r, dr = kv_lora_rank, rope_dim
    pairs = attended_pairs(T, window=topk)  # Σ_t min(t + 1, topk)
    return dict(flops=mla_decode_flops(pairs, HQ, r, dr, B=B),
                bytes=B * T * ((HQ * (2 * r + dr) + r + dr) * dtype_bytes + topk * index_bytes))


def plot_roofline(points: Iterable[dict], *, ax=None, peak_tflops: float = H200_MATMUL_TFLOPS,
                  copy_tbps: float = H200_COPY_TBPS, xlim=None, ylim=None):
    """A log-log roofline: achieved TFLOP/s against arithmetic intensity (FLOP/byte), under the memory ceiling
    (intensity × bandwidth) and the compute ceiling (the peak), one marker per point.

    points: dicts with "impl" (which gives the marker its colour and shape, `impl_style`), "intensity" and
    "tflops" (as `roofline_point` returns them). Anchors are drawn larger and under the book's kernels, so that
    two points at one place both show. The x limits default to whole decades around the points. The legend has
    one entry per implementation family. Returns the axes; the caller labels the points."""
    import math

    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    points = list(points)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    if xlim is None:
        xs = [p["intensity"] for p in points] or [peak_tflops / copy_tbps]
        xlim = (10 ** math.floor(math.log10(min(xs) / 2)), 10 ** math.ceil(math.log10(max(xs) * 2)))
    if ylim is None:
        ys = [p["tflops"] for p in points] or [peak_tflops]
        ylim = (min(ys) / 2, peak_tflops * 2)
    x = np.geomspace(*xlim, 200)
    ax.plot(x, roofline_tflops(x, peak_tflops, copy_tbps), color="black", lw=1.2, zorder=1)
    ridge = peak_tflops / copy_tbps
    ax.axvline(ridge, color="black", lw=0.6, ls=":", zorder=1)
    ax.text(xlim[1] / 1.15, peak_tflops * 1.08, f"bf16 matmul: {peak_tflops:g} TFLOP/s", ha="right", va="bottom",
            fontsize=9)
    ax.text(ridge * 1.08, ylim[0] * 1.1, f"ridge point: {ridge:.0f} FLOP/byte", ha="left", va="bottom", fontsize=9)
    x_text = xlim[0] * 1.15  # left of the memory ceiling, a factor 6 below where the text's height meets it
    ax.text(x_text, x_text * copy_tbps * 6, f"HBM copy:\n{copy_tbps:g} TB/s", ha="left", va="center", fontsize=9)
    families = {}
    # anchors first and larger, the book's kernels on top: a kernel level with its anchor still shows both
    for p in sorted(points, key=lambda p: impl_family(p["impl"]) == "minisparse"):
        family = impl_family(p["impl"])
        ours = family == "minisparse"
        style = impl_style(p["impl"])
        ax.plot([p["intensity"]], [p["tflops"]], linestyle="none", marker=style["marker"], color=style["color"],
                markersize=7 if ours else 9, zorder=4 if ours else 3)
        families.setdefault(family, style)
    names = {"minisparse": "this book", "torch": "PyTorch"}
    ordered = sorted(families.items(), key=lambda fs: fs[0] != "minisparse")  # the book first
    handles = [plt.Line2D([], [], linestyle="none", marker=s["marker"], color=s["color"], markersize=7,
                          label=names.get(f, f)) for f, s in ordered]
    ax.set(xscale="log", yscale="log", xlim=xlim, ylim=ylim, ylabel="achieved TFLOP/s",
           xlabel="arithmetic intensity: FLOPs per byte of minimum traffic")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1e4 else f"{v:,g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, loc="lower right", fontsize=9)
    return ax
