"""Figures as PNG bytes, drawn with matplotlib's Agg backend (no display, no metadata stamp, so
the same data give the same bytes)."""

from __future__ import annotations

import io

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def histogram_png(
    name: str,
    edges: np.ndarray,
    counts: np.ndarray,
    kept: np.ndarray | None,
    cutoffs: list[tuple[str, float]],
) -> bytes:
    """A column's histogram (the subset's rows overlaid when given), each cut-off a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    ax.stairs(counts, edges, fill=True, color="#9db4d6", label="pool")
    if kept is not None:
        ax.stairs(kept, edges, fill=True, color="#2a8a3a", label="in the subset")
    for label, value in cutoffs:
        ax.axvline(value, color="#b03030", linestyle="--", linewidth=1.4)
        ax.annotate(
            label,
            (value, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
            color="#b03030",
        )
    ax.set_title(name)
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    if kept is not None:
        ax.legend(fontsize=7)
    return png_bytes(fig)
