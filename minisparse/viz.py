"""Pictures every chapter uses: attention heatmaps, mask panels, and explorers that also render statically.

Hand-written infrastructure. All functions take tensors or arrays of shape `[T, S]` (rows = queries,
columns = keys) and return the matplotlib Figure so that a chapter can save or adjust it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["to_numpy", "heatmap", "panels", "mask_panel", "tokens_axis", "explorer", "show_markdown", "Box", "schematic"]


def to_numpy(x) -> np.ndarray:
    """A float numpy array from a tensor (any device/dtype) or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def heatmap(ax, matrix, title: str = "", *, cmap: str = "viridis", xlabel: str = "key s", ylabel: str = "query t",
            vmin=None, vmax=None, colorbar: bool = True):
    """Draw a `[T, S]` matrix on `ax` (queries down, keys across) and return the image.

    A colour bar beside the axes says what the colours mean (`colorbar=False` leaves it out: two-colour masks).
    """
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
    """Several `[T, S]` matrices side by side, one titled panel each; returns the Figure.

    `heatmap_kw` go to every `heatmap` (cmap, vmin, vmax, xlabel, ylabel, colorbar — a colour bar per panel unless
    `colorbar=False`).
    """
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
    """Boolean masks (True = may attend, dark) side by side in two colours; no colour bar unless `colorbar=True`."""
    kw.setdefault("colorbar", False)
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
    `ipywidgets.interact`. The first picture is drawn at once and saved with the notebook's widget state, so the
    built book shows it and the controls, offline too (the book serves the widget manager from book/_static); there
    a control moves but redraws nothing, since no kernel runs: in Jupyter or Colab every change redraws. Where
    ipywidgets or IPython is missing (a plain `python chapter.py` run on a bare GPU machine) the picture is drawn
    once at the controls' initial values. Returns the widget, or None.
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


def show_markdown(text: str) -> None:
    """Show a Markdown table or paragraph: rendered in Jupyter, Colab and the built book; printed as text where
    IPython is missing or no kernel runs (a plain `python chapter.py`)."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


@dataclass
class Box:
    """One block of a schematic: a labelled rectangle centred at `(x, y)` in data units.

    `label` may hold several lines (`"\\n"`) and mathtext (`"$W_{UK}$"`); `note` is a smaller line under the box
    (a shape such as `"[B, T, H, D]"`); `color` is any matplotlib colour (a light fill reads best).
    """
    x: float
    y: float
    label: str
    w: float = 1.6
    h: float = 0.7
    color: str = "#dbe9f6"
    note: str = ""


def schematic(boxes: Mapping[str, Box], arrows: Sequence[tuple] = (), *, title: str = "", size=(9, 3.2),
              groups: Sequence[tuple] = ()):
    """Draw a data-flow picture: named boxes, arrows between them, dashed groups around some; returns the Figure.

    `arrows` are `(src, dst)` or `(src, dst, label)`: an arrow from the edge of box `src` to the edge of box `dst`.
    `groups` are `(names, label)`: a dashed rectangle around the named boxes, labelled at its top-left (a kernel, a
    chunk, a layer). Coordinates are free: the axes fit the boxes, so a chapter lays out its flow on any grid.
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    unknown = {n for a in arrows for n in a[:2]} - set(boxes)
    unknown |= {n for names, _ in groups for n in names} - set(boxes)
    if unknown:
        raise ValueError(f"schematic: arrows or groups name boxes that do not exist: {sorted(unknown)}")
    fig, ax = plt.subplots(figsize=size)
    patches = {}
    for name, b in boxes.items():
        patch = FancyBboxPatch((b.x - b.w / 2, b.y - b.h / 2), b.w, b.h, boxstyle="round,pad=0.02,rounding_size=0.08",
                               facecolor=b.color, edgecolor="#333333", linewidth=1.0, zorder=2)
        ax.add_patch(patch)
        patches[name] = patch
        ax.text(b.x, b.y, b.label, ha="center", va="center", fontsize=9, zorder=3)
        if b.note:
            ax.text(b.x, b.y - b.h / 2 - 0.08, b.note, ha="center", va="top", fontsize=7.5, color="#555555", zorder=3)
    for names, label in groups:
        xs = [boxes[n].x - boxes[n].w / 2 for n in names] + [boxes[n].x + boxes[n].w / 2 for n in names]
        ys = [boxes[n].y - boxes[n].h / 2 for n in names] + [boxes[n].y + boxes[n].h / 2 for n in names]
        x0, x1, y0, y1 = min(xs) - 0.2, max(xs) + 0.2, min(ys) - 0.35, max(ys) + 0.3
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linestyle="--", edgecolor="#888888",
                               linewidth=1.0, zorder=1))
        ax.text(x0 + 0.05, y1 + 0.04, label, ha="left", va="bottom", fontsize=8, color="#555555")
    for arrow in arrows:
        src, dst = arrow[:2]
        a, b = boxes[src], boxes[dst]
        ax.add_patch(FancyArrowPatch((a.x, a.y), (b.x, b.y), patchA=patches[src], patchB=patches[dst],
                                     arrowstyle="-|>", mutation_scale=12, linewidth=1.0, color="#333333", zorder=1))
        if len(arrow) > 2 and arrow[2]:
            ax.text((a.x + b.x) / 2, (a.y + b.y) / 2 + 0.08, arrow[2], ha="center", va="bottom", fontsize=7.5,
                    color="#333333", zorder=3, bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
    xs = [v for b in boxes.values() for v in (b.x - b.w / 2, b.x + b.w / 2)]
    ys = [v for b in boxes.values() for v in (b.y - b.h / 2 - (0.3 if b.note else 0), b.y + b.h / 2)]
    pad = 0.5 if groups else 0.25
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
