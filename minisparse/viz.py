"""Pictures every chapter uses: attention heatmaps, mask panels, and explorers that also render statically.

Hand-written infrastructure. All functions take tensors or arrays of shape `[T, S]` (rows = queries,
columns = keys) and return the matplotlib Figure so that a chapter can save or adjust it.
"""
from __future__ import annotations

from typing import Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["to_numpy", "heatmap", "panels", "mask_panel", "tokens_axis", "explorer"]


def to_numpy(x) -> np.ndarray:
    """A float numpy array from a tensor (any device/dtype) or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def heatmap(ax, matrix, title: str = "", *, cmap: str = "viridis", xlabel: str = "key s", ylabel: str = "query t",
            vmin=None, vmax=None, colorbar: bool = False):
    """Draw a `[T, S]` matrix on `ax` (queries down, keys across) and return the image."""
    m = to_numpy(matrix)
    if m.ndim != 2:
        raise ValueError(f"heatmap: expected a 2-D [T, S] matrix, got shape {m.shape}")
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def panels(matrices: Mapping[str, object], *, ncols: int | None = None, size: float = 2.8, suptitle: str = "",
           **heatmap_kw):
    """Several `[T, S]` matrices side by side, one titled panel each; returns the Figure."""
    n = len(matrices)
    if n == 0:
        raise ValueError("panels: need at least one matrix")
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    for ax, (title, m) in zip(axes.flat, matrices.items()):
        heatmap(ax, m, title, **heatmap_kw)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def mask_panel(masks: Mapping[str, object], **kw):
    """Boolean masks (True = may attend) side by side in two colours."""
    return panels({k: to_numpy(v) > 0 for k, v in masks.items()}, cmap="Blues", vmin=0, vmax=1, **kw)


def tokens_axis(ax, label: str = "sequence length T"):
    """A log2 x axis labelled 256, 1k, 4k, … for plots against a number of tokens."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
    ax.set_xlabel(label)


def _initial(control):
    """The value a control starts at: a widget's `.value`, the middle of a `(min, max[, step])` tuple, the first
    of a list, or a plain value."""
    if hasattr(control, "value"):
        return control.value
    if isinstance(control, tuple) and 2 <= len(control) <= 3 and all(isinstance(c, (int, float)) for c in control):
        lo, hi = control[:2]
        step = control[2] if len(control) == 3 else (1 if isinstance(lo, int) and isinstance(hi, int) else None)
        mid = (lo + hi) / 2
        return type(lo)(lo + round((mid - lo) / step) * step) if step else mid
    if isinstance(control, (list, tuple)):
        return control[0]
    return control


def explorer(draw: Callable[..., object], **controls):
    """An ipywidgets explorer: `draw(**values)` redraws when a control changes.

    `controls` are ipywidgets (e.g. `IntSlider`) or `(min, max, step)` tuples / option lists as in
    `ipywidgets.interact`. The first picture is drawn at once, so the static book shows it; ipywidgets' saved state
    keeps the controls visible there. Where ipywidgets or IPython is missing (a plain `python chapter.py` run on a
    bare GPU machine) the picture is drawn once at the controls' initial values. Returns the widget, or None.
    """
    if not controls:
        raise ValueError("explorer: give at least one control, e.g. window=(1, 64, 1)")
    try:
        import ipywidgets as widgets
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        widgets = None
    if widgets is None or get_ipython() is None:
        draw(**{name: _initial(c) for name, c in controls.items()})
        return None
    ui = widgets.interactive(draw, **controls)
    display(ui)
    return ui
