"""Matplotlib drawing of what the widgets show, and figures as PNG bytes for `ipywidgets.Image`.

The numbers come from `pixelrefer.analysis` (an `AttentionView`); these
functions only lay them out. Figures are closed once rendered, so a
notebook's inline backend never shows them a second time.
"""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np

from pixelrefer.analysis.attention_view import AttentionView
from pixelrefer.visualize import COLOURS

SPAN_COLOURS = {"vision": "tab:blue", "object": "tab:red", "text": "tab:green", "answer": "tab:purple"}


def figure_png(fig: plt.Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_attention_view(view: AttentionView, image: np.ndarray | None = None, spans=(), pool: int = 8,
                        object_names: list[str] | None = None) -> plt.Figure:
    """Four panels of one layer: group matrix, pooled map (Fig. 3), query attention on the image grid and on objects."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), gridspec_kw=dict(width_ratios=[1, 1, 1, 1.3]))
    _group_matrix(axes[0], view)
    _pooled_map(axes[1], view, spans, pool)
    _image_grid(axes[2], view, image)
    _object_bars(axes[3], view, object_names)
    heads = "mean over heads" if view.head is None else f"head {view.head}"
    fig.suptitle(f"layer {view.layer} · {heads} · attention of {view.query} tokens", fontsize=11)
    fig.tight_layout()
    return fig


def _group_matrix(ax, view: AttentionView) -> None:
    matrix = view.matrix.numpy()
    ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ticks = range(len(view.groups))
    ax.set_xticks(ticks, view.groups, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, view.groups, fontsize=8)
    ax.set_xlabel("key group", fontsize=8)
    ax.set_ylabel("query group", fontsize=8)
    ax.set_title("group → group (rows sum to 1)", fontsize=9)


def _pooled_map(ax, view: AttentionView, spans, pool: int) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if view.pooled is None:
        ax.text(0.5, 0.5, "pooled map not captured\n(pooled_layers)", ha="center", va="center", fontsize=9)
        return
    ax.imshow(view.pooled.numpy() ** 0.5, cmap="magma")  # square root: small masses stay visible
    for span in spans:
        if span.group in SPAN_COLOURS:
            ax.axvspan(span.start / pool - 0.5, span.end / pool - 0.5, ymin=0, ymax=0.03,
                       color=SPAN_COLOURS[span.group], lw=0)
    ax.set_title(f"attention map, pooled ×{pool} (√ scale)", fontsize=9)


def _image_grid(ax, view: AttentionView, image: np.ndarray | None) -> None:
    ax.set_axis_off()
    if view.image_grid is None:
        ax.text(0.5, 0.5, "no global vision tokens\n(Object-Only prompt)", ha="center", va="center", fontsize=9,
                transform=ax.transAxes)
        return
    grid = view.image_grid.numpy()
    height, width = image.shape[:2] if image is not None else grid.shape
    if image is not None:
        ax.imshow(image)
    shown = ax.imshow(grid, cmap="magma", alpha=0.65 if image is not None else 1.0, extent=(0, width, height, 0),
                      interpolation="nearest")
    ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(f"{view.query} → image grid ({view.to_groups.get('vision', 0):.2f} in all)", fontsize=9)


def _object_bars(ax, view: AttentionView, object_names: list[str] | None) -> None:
    start = 0
    for k, values in enumerate(view.objects):
        x = np.arange(start, start + len(values))
        name = object_names[k] if object_names and k < len(object_names) else f"<object{k}>"
        ax.bar(x, values.numpy(), color=COLOURS[k % len(COLOURS)] / 255, label=f"{name}: {float(values.sum()):.2f}")
        start += len(values) + 1
    ax.set_xticks([])
    ax.set_xlabel("object tokens (attended slots)", fontsize=8)
    ax.set_title(f"{view.query} → each object's tokens", fontsize=9)
    if view.objects:
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
