"""Static figures (matplotlib) for notebooks: regions on an image, object crops with their cell grids.

Figures are returned, never shown, so notebooks decide; `save_figure` writes
a PNG atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from pixelrefer.regions import ObjectCrop

COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)])


def show_regions(image: np.ndarray, masks: dict[str, np.ndarray], alpha: float = 0.5) -> plt.Figure:
    """The image with each named mask tinted in its own colour and labelled at its centre."""
    fig, ax = plt.subplots(figsize=(5, 5 * image.shape[0] / image.shape[1]))
    tinted = image.astype(np.float32)
    for k, (name, mask) in enumerate(masks.items()):
        colour = COLOURS[k % len(COLOURS)]
        tinted[mask] = (1 - alpha) * tinted[mask] + alpha * colour
        rows, cols = np.nonzero(mask)
        ax.text(cols.mean(), rows.mean(), f"<object{k}> {name}", color="white", fontsize=8, ha="center",
                bbox=dict(facecolor=colour / 255, alpha=0.8, pad=1, edgecolor="none"))
    ax.imshow(tinted.astype(np.uint8))
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def show_crops(crops: list[ObjectCrop], names: list[str], patch: int) -> plt.Figure:
    """Each object's scaled crop with its patch grid; foreground cells (those that become tokens) outlined."""
    fig, axes = plt.subplots(1, len(crops), figsize=(3.2 * len(crops), 3.4), squeeze=False)
    for ax, crop, name in zip(axes[0], crops, names):
        gh, gw = crop.grid
        ax.imshow(crop.pixels)
        for i, j in zip(*np.nonzero(crop.cell_mask)):
            ax.add_patch(plt.Rectangle((j * patch - 0.5, i * patch - 0.5), patch, patch, fill=False, lw=1.2,
                                       edgecolor="yellow"))
        ax.set_xticks(np.arange(0, gw * patch, patch) - 0.5, labels=[])
        ax.set_yticks(np.arange(0, gh * patch, patch) - 0.5, labels=[])
        ax.grid(True, color="white", lw=0.3, alpha=0.6)
        ax.set_title(f"{name}: {crop.area} px, s={crop.scale:.2f} (applied {crop.applied_scale:.2f})\n{gh}×{gw} cells, {int(crop.cell_mask.sum())} on",
                     fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as PNG to `path` atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=dpi, bbox_inches="tight")
    os.replace(tmp.name, path)
    plt.close(fig)
    return path
