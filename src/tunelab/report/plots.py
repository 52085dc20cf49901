"""Report figures as PNG bytes, drawn by matplotlib's Agg backend (no display needed).

matplotlib is the ``[report]`` extra: it is imported on the first figure (:func:`pyplot`), so
importing this module needs nothing beyond the core install.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from tunelab.errors import require


def pyplot(verb: str = "tunelab report", extra: str = "report"):
    """``matplotlib.pyplot`` on the Agg backend, with CJK-capable fonts; a one-line error naming the extra
    (``verb`` needs matplotlib: ``pip install 'tunelab[extra]'``) when matplotlib is not installed."""
    matplotlib = require("matplotlib", extra=extra, verb=verb)
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra=extra, verb=verb, package="matplotlib")
    # CJK labels (class names, subjects) render with a CJK font when one is installed.
    plt.rcParams["font.sans-serif"] = ["DejaVu Sans", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "SimHei"]
    plt.rcParams["axes.unicode_minus"] = False
    return plt


def to_png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, ylabel: str,
           log_y: bool = False) -> bytes:
    """Lines over optimiser steps: ``{label: (steps, values)}``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) <= 20 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return to_png(fig)


def confusion(matrix: list[list[int]], rows: list[str], cols: list[str], *, title: str) -> bytes:
    """A heat map of counts, gold labels as rows, predictions as columns, every cell annotated."""
    plt = pyplot()
    m = np.asarray(matrix)
    size = max(3.5, 0.6 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size, max(3.0, 0.5 * len(rows) + 1.5)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > top / 2 else "black",
                    fontsize=8)
    return to_png(fig)


def bars(groups: dict[str, dict[str, float]], *, title: str, ylabel: str) -> bytes:
    """Grouped bars: ``{series: {category: value}}`` (e.g. per-class F1 of base and tuned)."""
    plt = pyplot()
    cats: list[str] = []
    for values in groups.values():
        cats += [c for c in values if c not in cats]
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(cats) * max(1, len(groups)) / 1.5), 3.4))
    for i, (name, values) in enumerate(groups.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [values.get(c, 0.0) for c in cats], width, label=name)
    ax.set_xticks(x, cats, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend()
    return to_png(fig)


def scatter(points: dict[str, tuple[float, float]], *, xlabel: str, ylabel: str, title: str) -> bytes:
    """Labelled points ``{label: (x, y)}`` with the axes through zero (e.g. task gain vs general loss)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=30)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return to_png(fig)
