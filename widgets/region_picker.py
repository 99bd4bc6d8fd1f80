"""`RegionPicker`: brush, box or click objects on an image or a video frame; masks as arrays and COCO RLE.

Notable:
- All state (objects, masks, undo history) is plain Python; the canvas only
  reports mouse events to `mouse_down` / `mouse_move` / `mouse_up`. Every
  behaviour is therefore testable without a browser, and a papermill run
  builds a picker from given masks with no front-end at all.
- Drawing uses ipycanvas, whose JupyterLab extension ships inside the pip
  package (nothing to build, works offline). Layer 0 is the image tinted by
  the masks, sent as one `put_image_data` after each action; layer 1 holds
  points, boxes and the live stroke, as cheap vector commands while the
  mouse moves. The canvas has the image's size and is scaled by CSS:
  ipycanvas reports mouse positions in canvas (= image) pixels.
- A brush stroke paints every pixel whose centre is within the radius of the
  stroke's polyline; erase is the same with False.
- Points and boxes are prompts. With `refine` (e.g. a SAM 2 backend,
  `refine(image, points (P, 2) xy, labels (P,) 1/0, box or None) -> mask`)
  the object's mask becomes the refined mask after each prompt; without it a
  box fills its rectangle and a point paints (positive) or erases (negative)
  one brush disc. pixelrefer's SAM 2 `MaskPropagator` fits as
  `refine=lambda image, points, labels, box: propagator.propagate([image],
  [ObjectPrompt(0, points.tolist() or None, labels.tolist() or None, box)]).masks[0, 0]`,
  and `prompts()` gives its tracking prompts (`ObjectPrompt(**p)`) for a video.
- Undo restores a snapshot taken before each action (the last 50 are kept).
- Names are positional, `<object0>`, `<object1>`…, the order in which the
  masks fill a prompt's `<region>`s; each object also has a free-text label.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ipywidgets as w
import numpy as np
from ipycanvas import MultiCanvas, hold_canvas

from pixelrefer.data.mask_files import read_mask_file, write_mask_file
from pixelrefer.errors import InputError
from pixelrefer.processing import Video, to_rgb_array
from pixelrefer.regions import Box, decode_mask, mask_to_rle
from pixelrefer.visualize import COLOURS

Refine = Callable[[np.ndarray, np.ndarray, np.ndarray, "Box | None"], np.ndarray]
TOOLS = ("brush", "erase", "box", "point +", "point -")
TOOL_TIPS = ("paint the current object", "erase from the current object", "drag a box around the object",
             "a point on the object", "a point off the object")
HISTORY = 50
TINT = 0.45


@dataclass
class PickedObject:
    """One object of a picker: its mask and the prompts that made it."""

    label: str
    mask: np.ndarray  # (H, W) bool
    points: list[tuple[float, float, int]] = field(default_factory=list)  # (x, y, 1 positive | 0 negative)
    box: Box | None = None

    def copy(self) -> "PickedObject":
        return PickedObject(self.label, self.mask.copy(), list(self.points), self.box)


def paint_segment(mask: np.ndarray, start: tuple[float, float], end: tuple[float, float], radius: float,
                  value: bool = True) -> None:
    """Set every pixel of `mask` whose centre lies within `radius` of the segment start–end (x, y) to `value`."""
    height, width = mask.shape
    (x0, y0), (x1, y1) = start, end
    left, right = max(0, int(np.floor(min(x0, x1) - radius))), min(width, int(np.ceil(max(x0, x1) + radius)) + 1)
    top, bottom = max(0, int(np.floor(min(y0, y1) - radius))), min(height, int(np.ceil(max(y0, y1) + radius)) + 1)
    if left >= right or top >= bottom:
        return
    ys, xs = np.mgrid[top:bottom, left:right] + 0.5  # pixel centres, (h, w) each
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0, 1) if length2 > 0 else 0.0
    near = (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= radius * radius
    mask[top:bottom, left:right][near] = value


def _css(colour) -> str:
    r, g, b = (int(v) for v in colour)
    return f"rgb({r}, {g}, {b})"


class RegionPicker(w.VBox):
    """Objects drawn on an image: a brush, an eraser, boxes, positive and negative points.

    Args:
        image: the picture (array or PIL image), or one video frame.
        masks: objects to start with: a list of mask specs (arrays, COCO RLE, polygons, boxes), a
            {label: spec} dict, or a mask file path (see `pixelrefer.data.mask_files`). None or none: one
            empty object.
        refine: optional mask backend, called as `refine(image, points, labels, box)` after each point or box.
        brush_radius: brush and eraser radius in image pixels.
        display_width: width on screen in CSS pixels (default: the image scaled up to about 512).
        frame_index: the video frame shown, if it is one; `region_masks()` then returns {frame: mask}.
    """

    def __init__(self, image, masks=None, *, refine: Refine | None = None, brush_radius: int = 4,
                 display_width: int | None = None, frame_index: int | None = None):
        self.image = to_rgb_array(image, "RegionPicker image")
        self.height, self.width = self.image.shape[:2]
        self.refine = refine
        self.frame_index = frame_index
        self.objects: list[PickedObject] = []
        self.current = 0
        self._history: list[tuple[list[PickedObject], int]] = []
        self._drag: list[tuple[float, float]] | None = None
        self._syncing = False

        self._tool = w.ToggleButtons(options=TOOLS, value="brush", tooltips=TOOL_TIPS, style=dict(button_width="76px"))
        self._radius = w.IntSlider(value=brush_radius, min=1, max=max(8, min(self.height, self.width) // 4),
                                   description="brush")
        self._selector = w.Dropdown(description="object", layout=w.Layout(width="260px"))
        self._label = w.Text(placeholder="label of a new object", layout=w.Layout(width="180px"))
        add, remove, undo, clear = (w.Button(description=d, layout=w.Layout(width="auto"))
                                    for d in ("+ object", "remove", "undo", "clear"))
        add.on_click(lambda _: self.add_object(self._label.value))
        remove.on_click(lambda _: self.remove_object())
        undo.on_click(lambda _: self.undo())
        clear.on_click(lambda _: self.clear())
        self._selector.observe(self._on_select, "value")
        self._status = w.HTML()
        self._canvas = self._make_canvas(display_width or self.width * max(1, 512 // self.width))
        controls = [w.HBox([self._tool, self._radius]), w.HBox([self._selector, self._label, add, remove, undo, clear])]
        super().__init__(controls + [self._canvas, self._status])
        self.add_class("pixelrefer-region-picker")

        if masks is not None:
            self._append_masks(masks)
        if not self.objects:
            self.objects.append(PickedObject("", np.zeros((self.height, self.width), dtype=bool)))
        self.current = len(self.objects) - 1
        self._refresh()

    @classmethod
    def from_video(cls, video, frame_index: int = 0, masks=None, **kwargs) -> "RegionPicker":
        """A picker on frame `frame_index` of a `Video` (or a list of frames)."""
        frames = video.frames if isinstance(video, Video) else list(video)
        if not 0 <= frame_index < len(frames):
            raise InputError(f"frame index {frame_index} is out of range (video has {len(frames)} frames)")
        return cls(frames[frame_index], masks, frame_index=frame_index, **kwargs)

    # ------------------------------------------------------------------ objects
    @staticmethod
    def name(index: int) -> str:
        return f"<object{index}>"

    @property
    def tool(self) -> str:
        return self._tool.value

    @tool.setter
    def tool(self, value: str) -> None:
        if value not in TOOLS:
            raise InputError(f"unknown tool {value!r}; tools: {list(TOOLS)}")
        self._tool.value = value

    def add_object(self, label: str = "") -> int:
        """Add an empty object, select it, and return its index."""
        self._snapshot()
        self.objects.append(PickedObject(label, np.zeros((self.height, self.width), dtype=bool)))
        self.current = len(self.objects) - 1
        self._label.value = ""
        self._refresh()
        return self.current

    def remove_object(self, index: int | None = None) -> None:
        """Remove an object (default: the current one); later objects move up a name."""
        index = self.current if index is None else index
        if not 0 <= index < len(self.objects):
            raise InputError(f"no object {index}: the picker has {len(self.objects)}")
        self._snapshot()
        del self.objects[index]
        if not self.objects:
            self.objects.append(PickedObject("", np.zeros((self.height, self.width), dtype=bool)))
        self.current = min(self.current, len(self.objects) - 1)
        self._refresh()

    def select(self, index: int) -> None:
        if not 0 <= index < len(self.objects):
            raise InputError(f"no object {index}: the picker has {len(self.objects)}")
        self.current = index
        self._refresh()

    def load_masks(self, path: str | Path) -> list[int]:
        """Add every mask of a mask file as a new object (labelled by its name there); returns their indices."""
        self._snapshot()
        first = len(self.objects)
        self._append_masks(path)
        self.current = len(self.objects) - 1
        self._refresh()
        return list(range(first, len(self.objects)))

    def _append_masks(self, masks) -> None:
        if isinstance(masks, (str, Path)):
            masks = read_mask_file(masks, self.height, self.width)
        items = masks.items() if isinstance(masks, dict) else ((None, spec) for spec in masks)
        for label, spec in items:
            where = f"RegionPicker, object {len(self.objects)}" + (f" ({label!r})" if label else "")
            mask = decode_mask(spec, self.height, self.width, where=where)
            self.objects.append(PickedObject("" if label is None else str(label), mask))

    # ------------------------------------------------------------------ editing
    def mouse_down(self, x: float, y: float) -> None:
        """Start an action of the current tool at canvas pixel (x, y) (what the canvas calls)."""
        self._snapshot()
        if self.tool in ("brush", "erase"):
            self._drag = [(x, y)]
            paint_segment(self._object.mask, (x, y), (x, y), self._radius.value, self.tool == "brush")
            self._draw_stroke((x, y), (x, y))
        elif self.tool == "box":
            self._drag = [(x, y)]
        else:
            self._add_point(x, y, positive=self.tool == "point +")

    def mouse_move(self, x: float, y: float) -> None:
        if self._drag is None:
            return
        if self.tool == "box":
            with hold_canvas():
                self._draw_overlay(pending_box=self._box(self._drag[0], (x, y)))
            return
        paint_segment(self._object.mask, self._drag[-1], (x, y), self._radius.value, self.tool == "brush")
        self._draw_stroke(self._drag[-1], (x, y))
        self._drag.append((x, y))

    def mouse_up(self, x: float, y: float) -> None:
        if self._drag is None:
            return
        start, self._drag = self._drag[0], None
        if self.tool == "box":
            self._set_box(self._box(start, (x, y)))
        self._refresh()

    def undo(self) -> bool:
        """Restore the state before the last action; False when there is nothing to undo."""
        if not self._history:
            return False
        self.objects, self.current = self._history.pop()
        self._refresh()
        return True

    def clear(self) -> None:
        """Empty the current object: mask, points and box."""
        self._snapshot()
        obj = self._object
        obj.mask[:] = False
        obj.points.clear()
        obj.box = None
        self._refresh()

    @property
    def _object(self) -> PickedObject:
        return self.objects[self.current]

    def _snapshot(self) -> None:
        self._history = (self._history + [([o.copy() for o in self.objects], self.current)])[-HISTORY:]

    def _box(self, a: tuple[float, float], b: tuple[float, float]) -> Box:
        x0, x1 = sorted((a[0], b[0]))
        y0, y1 = sorted((a[1], b[1]))
        return (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))),
                min(self.width, int(np.ceil(x1))), min(self.height, int(np.ceil(y1))))

    def _set_box(self, box: Box) -> None:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:  # a click, not a drag
            self._history.pop()
            return
        self._object.box = box
        if self.refine is not None:
            self._apply_refine()
        else:
            self._object.mask[y0:y1, x0:x1] = True

    def _add_point(self, x: float, y: float, positive: bool) -> None:
        self._object.points.append((float(x), float(y), int(positive)))
        if self.refine is not None:
            self._apply_refine()
        else:
            paint_segment(self._object.mask, (x, y), (x, y), self._radius.value, positive)
        self._refresh()

    def _apply_refine(self) -> None:
        obj = self._object
        points = np.array([(x, y) for x, y, _ in obj.points], dtype=np.float32).reshape(-1, 2)
        labels = np.array([label for *_, label in obj.points], dtype=np.int64)
        mask = np.asarray(self.refine(self.image, points, labels, obj.box))
        if mask.shape != (self.height, self.width):
            raise InputError(f"refine returned a mask of shape {mask.shape} for {self.name(self.current)}; "
                             f"the image is {(self.height, self.width)}")
        obj.mask = mask.astype(bool) if mask.dtype == bool else mask > 0.5

    # ------------------------------------------------------------------ export
    @property
    def masks(self) -> dict[str, np.ndarray]:
        """{`<objectk>`: bool (H, W) mask}, copies, in object order."""
        return {self.name(k): obj.mask.copy() for k, obj in enumerate(self.objects)}

    @property
    def labels(self) -> dict[str, str]:
        return {self.name(k): obj.label for k, obj in enumerate(self.objects)}

    def rles(self) -> dict[str, dict]:
        """{`<objectk>`: COCO compressed RLE} (`counts` as str), in object order."""
        return {self.name(k): mask_to_rle(obj.mask) for k, obj in enumerate(self.objects)}

    def region_masks(self) -> list:
        """Masks in `<region>` order, as `pixelrefer.ask(masks=…)` takes them ({frame: mask} for a video frame)."""
        empty = [self.name(k) for k, obj in enumerate(self.objects) if not obj.mask.any()]
        if empty:
            raise InputError(f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: draw it or remove it")
        masks = [obj.mask.copy() for obj in self.objects]
        return masks if self.frame_index is None else [{self.frame_index: m} for m in masks]

    def prompts(self) -> list[dict]:
        """Per object, what made it, as keyword arguments of a mask tracker's prompt (pixelrefer's `ObjectPrompt`).

        {"frame", "points", "labels", "box"} for an object made of clicks or a box, {"frame", "mask"} for one
        that was drawn or given as a mask; `frame` is the picker's frame index (0 for an image).
        """
        frame = self.frame_index or 0
        prompts = []
        for k, obj in enumerate(self.objects):
            if obj.points or obj.box:
                points = [(x, y) for x, y, _ in obj.points] or None
                labels = [label for *_, label in obj.points] or None
                prompts.append(dict(frame=frame, points=points, labels=labels, box=obj.box))
            elif obj.mask.any():
                prompts.append(dict(frame=frame, mask=obj.mask.copy()))
            else:
                raise InputError(f"{self.name(k)} is empty: draw it or remove it")
        return prompts

    def save_masks(self, path: str | Path) -> Path:
        """Write the masks as JSON {label or `<objectk>`: RLE}; `load_masks` reads it back."""
        keys = [obj.label or self.name(k) for k, obj in enumerate(self.objects)]
        keys = [key if keys.count(key) == 1 else f"{key} {self.name(k)}" for k, key in enumerate(keys)]
        return write_mask_file(path, {key: obj.mask for key, obj in zip(keys, self.objects)})

    # ------------------------------------------------------------------ display
    def _make_canvas(self, display_width: int) -> MultiCanvas:
        display_height = round(display_width * self.height / self.width)
        canvas = MultiCanvas(2, width=self.width, height=self.height,
                             layout=w.Layout(width=f"{display_width}px", height=f"{display_height}px"))
        top = canvas[1]  # the top layer receives the mouse events
        top.on_mouse_down(self._reporting(self.mouse_down))
        top.on_mouse_move(self._reporting(self.mouse_move))
        top.on_mouse_up(self._reporting(self.mouse_up))
        top.on_mouse_out(self._reporting(self.mouse_up))
        return canvas

    def _reporting(self, handler):
        """A canvas callback that shows a rejected input (e.g. a bad refined mask) in the status line."""
        def call(x, y):
            try:
                handler(x, y)
            except InputError as error:
                self._drag = None
                self.undo()
                self._status.value += f"<br><b style='color:#c00'>{html.escape(str(error))}</b>"
        return call

    def _on_select(self, change) -> None:
        if not self._syncing and change.new is not None:
            self.select(change.new)

    def _refresh(self) -> None:
        """Redraw both layers and bring the controls and the status line in step with the state."""
        self._syncing = True
        self._selector.options = [(f"{self.name(k)} {o.label}".strip(), k) for k, o in enumerate(self.objects)]
        self._selector.value = self.current
        self._syncing = False
        tinted = self.image.astype(np.float32)
        for k, obj in enumerate(self.objects):
            tinted[obj.mask] = (1 - TINT) * tinted[obj.mask] + TINT * COLOURS[k % len(COLOURS)]
        with hold_canvas():
            self._canvas[0].put_image_data(tinted.round().astype(np.uint8), 0, 0)
            self._draw_overlay()
        rows = []
        for k, obj in enumerate(self.objects):
            mark = "▶ " if k == self.current else ""
            prompts = f", {len(obj.points)} points" if obj.points else ""
            prompts += f", box {obj.box}" if obj.box else ""
            name = html.escape(f"{self.name(k)} {obj.label}".strip())
            rows.append(f"<span style='color:{_css(COLOURS[k % len(COLOURS)])}'>■</span> {mark}{name}: "
                        f"{int(obj.mask.sum())} px{prompts}")
        refine = "refinement on" if self.refine is not None else "no refinement backend"
        self._status.value = " &nbsp;·&nbsp; ".join(rows) + f"<br><small>{refine}</small>"

    def _draw_overlay(self, pending_box: Box | None = None) -> None:
        """Boxes and points of every object (and a box being dragged) on the top layer; call under hold_canvas."""
        layer = self._canvas[1]
        dot = max(1.5, min(self.height, self.width) / 80)
        layer.clear()
        layer.line_width = max(1.0, dot / 2)
        for k, obj in enumerate(self.objects):
            colour = _css(COLOURS[k % len(COLOURS)])
            if obj.box:
                x0, y0, x1, y1 = obj.box
                layer.stroke_style = colour
                layer.stroke_rect(x0, y0, x1 - x0, y1 - y0)
            for x, y, positive in obj.points:
                layer.fill_style = colour if positive else "black"
                layer.fill_circle(x, y, dot)
                layer.stroke_style = "white"
                layer.stroke_circle(x, y, dot)
        if pending_box is not None:
            x0, y0, x1, y1 = pending_box
            layer.stroke_style = "white"
            layer.stroke_rect(x0, y0, x1 - x0, y1 - y0)

    def _draw_stroke(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        """Live feedback while the mouse moves; the tinted image is redrawn when the stroke ends."""
        layer = self._canvas[1]
        radius = self._radius.value
        colour = _css(COLOURS[self.current % len(COLOURS)]) if self.tool == "brush" else "rgb(255, 255, 255)"
        with hold_canvas():
            layer.global_alpha = 0.6
            layer.stroke_style = layer.fill_style = colour
            layer.line_width = 2 * radius
            layer.line_cap = "round"
            layer.stroke_line(*start, *end)
            layer.fill_circle(*end, radius)
            layer.global_alpha = 1.0
