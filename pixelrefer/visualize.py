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


def plot_loss_histories(histories: dict[str, list[float]]) -> plt.Figure:
    """One panel per training stage (`training.loss_histories`): its loss at every step, and a 50-step mean."""
    if not histories:
        raise ValueError("no loss history to plot")
    columns = min(3, len(histories))
    rows = -(-len(histories) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for ax, (name, losses) in zip(axes.flat, histories.items()):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, lw=0.6, alpha=0.5)
        if len(losses) >= 50:
            ax.plot(steps[49:], np.convolve(losses, np.ones(50) / 50, mode="valid"), lw=1.2)
        ax.set_title("main stage" if name == "final" else name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
    for ax in list(axes.flat)[len(histories):]:
        ax.set_axis_off()
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


def plot_group_curves(curves, groups: tuple[str, ...] = ("object", "vision", "text"), per_token: bool = False) -> plt.Figure:
    """Fig. 3's summary: how much attention `curves.query` tokens pay each group, layer by layer."""
    values = curves.density if per_token else curves.mass
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name in groups:
        if name in values:
            ax.plot(curves.layers, values[name], marker="o", ms=3, label=name)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel(f"attention {'per key token' if per_token else 'mass'} from {curves.query} tokens")
    ax.set_yscale("log" if per_token else "linear")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_pooled_maps(pooled: dict[int, "np.ndarray"], spans, pool: int, title: str = "") -> plt.Figure:
    """Fig. 3 panels: head-averaged attention maps pooled by `pool`, token groups marked on both axes."""
    layers = sorted(pooled)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.3 * len(layers), 3.5), squeeze=False)
    colours = {"vision": "tab:blue", "object": "tab:red", "text": "tab:green", "answer": "tab:purple"}
    for ax, layer in zip(axes[0], layers):
        ax.imshow(np.asarray(pooled[layer]) ** 0.5, cmap="magma")  # square root: small masses stay visible
        for span in spans:
            if span.group in colours:
                ax.axvspan(span.start / pool - 0.5, span.end / pool - 0.5, ymin=0, ymax=0.02,
                           color=colours[span.group], lw=0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=4, frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def plot_similarity(before, after, title: str = "") -> plt.Figure:
    """Fig. 7: cosine similarity of an object's cells before aggregation and of its tokens after."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
    for ax, matrix, name in zip(axes, (before, after), ("cells before aggregation", "tokens after aggregation")):
        shown = ax.imshow(np.asarray(matrix), vmin=-1, vmax=1, cmap="coolwarm")
        off = np.asarray(matrix)[~np.eye(len(matrix), dtype=bool)]
        ax.set_title(f"{name}\nmean off-diagonal {off.mean():.2f}" if off.size else name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_token_cells(crops: list[ObjectCrop], cell_maps: list, patch: int, names: list[str]) -> plt.Figure:
    """Which object token each crop cell was merged into (cf. Fig. 11): one colour per token."""
    fig, axes = plt.subplots(1, len(crops), figsize=(3.2 * len(crops), 3.4), squeeze=False)
    palette = plt.get_cmap("tab20")
    for ax, crop, cells, name in zip(axes[0], crops, cell_maps, names):
        cells = np.asarray(cells)
        overlay = np.zeros(cells.shape + (4,))
        for token in np.unique(cells[cells >= 0]):
            overlay[cells == token] = (*palette(int(token) % 20)[:3], 0.55)
        ax.imshow(crop.pixels)
        ax.imshow(np.kron(overlay, np.ones((patch, patch, 1))), interpolation="nearest")
        ax.set_title(f"{name}: {len(np.unique(cells[cells >= 0]))} tokens", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_token_scaling(rows: list[dict]) -> plt.Figure:
    """Table 7 / Fig. 10 style: category accuracy and held-out loss against n, one line per framework."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for framework, label in (("vision_object", "Vision-Object"), ("object_only", "Object-Only")):
        points = sorted((int(r["variant"].split("=")[1]), r) for r in rows if r["framework"] == framework)
        if not points:
            continue
        ns = [n for n, _ in points]
        acc_ax.plot(ns, [100 * r["category_acc"] for _, r in points], marker="o", label=label)
        loss_ax.plot(ns, [r["heldout_loss"] for _, r in points], marker="o", label=label)
    for ax, title in ((acc_ax, "category exact match (%)"), (loss_ax, "held-out loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("object tokens n")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_ablation_bars(rows: list[dict], title: str = "") -> plt.Figure:
    """Fig. 12 style: per variant, category accuracy on small and on large regions, and the held-out loss."""
    names = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw=dict(width_ratios=[3, 2]))
    acc_ax.bar(x - 0.2, [100 * r["small_acc"] for r in rows], 0.4, label="small regions")
    acc_ax.bar(x + 0.2, [100 * r["large_acc"] for r in rows], 0.4, label="large regions")
    acc_ax.set_title("category exact match (%)")
    loss_ax.bar(x, [r["heldout_loss"] for r in rows], 0.6, color="gray")
    loss_ax.set_title("held-out loss (lower is better)")
    for ax in (acc_ax, loss_ax):
        ax.set_xticks(x, names, rotation=20, ha="right")
    acc_ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_video_regions(frames: list, masks: dict[str, dict[int, np.ndarray]], times: list[float] | None = None,
                       columns: int = 8, alpha: float = 0.5) -> plt.Figure:
    """Frames in a grid, each with the masks it has tinted (object k in colour k) and its time as title.

    `masks` maps an object's name to {frame position: bool mask}; the legend lists the names as `<objectK>`.
    """
    rows = -(-len(frames) // columns)
    fig, axes = plt.subplots(rows, min(columns, len(frames)), squeeze=False,
                             figsize=(1.9 * min(columns, len(frames)), 2.1 * rows))
    for t, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if t >= len(frames):
            continue
        tinted = np.asarray(frames[t], dtype=np.float32)
        for k, per_frame in enumerate(masks.values()):
            if t in per_frame:
                mask = np.asarray(per_frame[t], dtype=bool)
                tinted[mask] = (1 - alpha) * tinted[mask] + alpha * COLOURS[k % len(COLOURS)]
        ax.imshow(tinted.astype(np.uint8))
        ax.set_title(f"{times[t]:.2f} s" if times is not None else f"frame {t}", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k % len(COLOURS)] / 255) for k in range(len(masks))]
    fig.legend(handles, [f"<object{k}> {name}" for k, name in enumerate(masks)], loc="lower center",
               ncol=min(len(masks), 2), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(masks) - 1) // 2), 1, 1))
    return fig
