"""ShapesWorld scenes: shapes with exact masks, in still images and in short videos where they move.

Notable:
- Shapes are rasterised by PIL in mode "1" (no anti-aliasing): a pixel is the
  shape's colour or it is not, so a mask is exactly the shape's pixels.
- Draw order is occlusion order: an object's mask is its visible pixels (its
  full shape minus every shape drawn after it), so the masks of a scene never
  overlap and painting the shapes in order reproduces them exactly.
- Placement is rejection-sampled: an occluded object keeps at least 70% of
  its area (60% per frame in videos), shapes of one colour never touch, and
  tiny objects (4–8 px, under one 14-px patch) and objects with parts are
  never occluded.
- Composite objects carry one visible mask per part: a house (roof, wall,
  door) and a flag (pole, cloth).
- In videos every object moves along one axis at a constant speed or stays
  still, may appear or disappear part-way, and stays inside the frame.
- All randomness comes from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "diamond")
TINY_CATEGORIES = ("circle", "square", "triangle", "diamond")
COMPOSITES = {"house": ("wall", "roof", "door"), "flag": ("pole", "cloth")}  # parts in draw order
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 50),
    "orange": (245, 140, 30), "purple": (150, 60, 210), "pink": (245, 130, 190), "cyan": (60, 210, 220),
    "white": (245, 245, 245), "gray": (140, 140, 140), "brown": (140, 90, 40),
}
SIZES = ("tiny", "small", "medium", "large")
BACKGROUNDS = ((16, 16, 20), (30, 30, 40), (20, 34, 26), (40, 24, 24), (26, 26, 26))
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
EVENTS = ("appears", "disappears")
_EXTENT = {"tiny": (4, 8), "small": (10, 18), "medium": (20, 30), "large": (32, 44)}  # pixels at a 128-px side
_ATTEMPTS = 40


@dataclass
class SceneObject:
    """One drawn object. `mask` and `part_masks` are the visible pixels; `shape` the full shape."""

    category: str
    colour: str
    size: str
    shape: np.ndarray  # bool (H, W)
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # full part shapes, draw order
    part_colours: dict[str, str] = field(default_factory=dict)
    mask: np.ndarray | None = None
    part_masks: dict[str, np.ndarray] = field(default_factory=dict)
    occluders: list[int] = field(default_factory=list)  # indices of the objects that hide some of it

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    @property
    def protected(self) -> bool:
        """Tiny objects and objects with parts must never be occluded."""
        return self.size == "tiny" or bool(self.parts)


@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    objects: list[SceneObject]  # in draw order


@dataclass
class Track:
    """One object of a video: its look, its motion and its visible mask on every frame it is seen."""

    category: str
    colour: str
    size: str
    motion: str  # a key of MOTIONS
    speed: int  # pixels per frame (0 when still)
    event: str | None  # None, "appears" or "disappears"
    shapes: dict[int, np.ndarray]  # frame → full shape on the frames it is present
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # frame → visible pixels

    def center(self, t: int) -> tuple[float, float]:
        ys, xs = np.nonzero(self.masks[t])
        return float(xs.mean()), float(ys.mean())


@dataclass
class VideoScene:
    frames: list[np.ndarray]  # uint8 (H, W, 3) each
    tracks: list[Track]  # in draw order
    fps: float

    @property
    def timestamps(self) -> list[float]:
        return [round(t / self.fps, 3) for t in range(len(self.frames))]


# ----------------------------------------------------------------------------- rasterising


def _canvas(height: int, width: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("1", (width, height))
    return image, ImageDraw.Draw(image)


def _polygon_points(cx: float, cy: float, radius: float, count: int, inner: float | None = None) -> list:
    """Regular polygon (or star, with `inner` radius) with a vertex pointing up."""
    steps = count * 2 if inner else count
    points = []
    for i in range(steps):
        r = inner if inner and i % 2 else radius
        angle = -math.pi / 2 + 2 * math.pi * i / steps
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def shape_mask(category: str, x0: int, y0: int, extent: int, height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask of a simple shape filling the extent×extent box at (x0, y0)."""
    image, draw = _canvas(height, width)
    x1, y1 = x0 + extent - 1, y0 + extent - 1
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (extent - 1) / 2
    if category == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif category == "square":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif category == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=1)
    elif category == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    elif category == "hexagon":
        draw.polygon(_polygon_points(cx, cy, r, 6), fill=1)
    elif category == "star":
        draw.polygon(_polygon_points(cx, cy, r, 5, inner=0.45 * r), fill=1)
    elif category == "ring":
        hole = max(2, round(extent * 0.25))
        draw.ellipse([x0, y0, x1, y1], fill=1)
        draw.ellipse([x0 + hole, y0 + hole, x1 - hole, y1 - hole], fill=0)
    elif category == "cross":
        arm = max(2, round(extent / 3))
        ax, ay = round(cx - arm / 2), round(cy - arm / 2)
        draw.rectangle([x0, ay, x1, ay + arm - 1], fill=1)
        draw.rectangle([ax, y0, ax + arm - 1, y1], fill=1)
    else:
        raise ValueError(f"unknown shape category {category!r}")
    return np.asarray(image, dtype=bool)


def composite_parts(category: str, x0: int, y0: int, extent: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Full part shapes of a composite object in the extent×extent box at (x0, y0), in draw order."""
    e, x1, y1 = extent, x0 + extent - 1, y0 + extent - 1
    boxes = {}
    if category == "house":
        eave = y0 + round(0.45 * e)
        cx = (x0 + x1) / 2
        boxes["wall"] = ("rectangle", [x0 + round(0.12 * e), eave, x1 - round(0.12 * e), y1])
        boxes["roof"] = ("polygon", [(x0, eave), (x1, eave), (cx, y0)])
        door = max(2, round(0.12 * e))
        boxes["door"] = ("rectangle", [round(cx) - door, y1 - round(0.3 * e), round(cx) + door - 1, y1])
    elif category == "flag":
        pole = max(2, round(0.1 * e))
        boxes["pole"] = ("rectangle", [x0, y0, x0 + pole - 1, y1])
        boxes["cloth"] = ("rectangle", [x0 + pole, y0, x1, y0 + round(0.55 * e)])
    else:
        raise ValueError(f"unknown composite category {category!r}")
    parts = {}
    for name, (kind, coords) in boxes.items():
        image, draw = _canvas(height, width)
        getattr(draw, kind)(coords, fill=1)
        parts[name] = np.asarray(image, dtype=bool)
    return parts


# ----------------------------------------------------------------------------- still scenes


def _extent(size: str, height: int, width: int, rng: np.random.Generator) -> int:
    lo, hi = _EXTENT[size]
    if size != "tiny":  # tiny stays under one patch whatever the image size; the others scale with it
        scale = min(height, width) / 128
        lo, hi = (max(_EXTENT["tiny"][1] + 1, round(v * scale)) for v in (lo, hi))
    return int(rng.integers(lo, hi + 1))


def _random_object(rng: np.random.Generator, height: int, width: int, composite: bool) -> SceneObject:
    if composite:
        category = str(rng.choice(list(COMPOSITES)))
        size = str(rng.choice(["medium", "large"]))
    else:
        size = str(rng.choice(SIZES, p=[0.25, 0.3, 0.3, 0.15]))
        category = str(rng.choice(TINY_CATEGORIES if size == "tiny" else CATEGORIES))
    colour = str(rng.choice(list(COLOURS)))
    extent = _extent(size, height, width, rng)
    x0, y0 = int(rng.integers(1, width - extent)), int(rng.integers(1, height - extent))
    if category not in COMPOSITES:
        return SceneObject(category, colour, size, shape_mask(category, x0, y0, extent, height, width))
    parts = composite_parts(category, x0, y0, extent, height, width)
    main = "wall" if category == "house" else "cloth"  # the part whose colour names the object
    others = iter(rng.choice([c for c in COLOURS if c != colour], size=len(parts) - 1, replace=False))
    part_colours = {name: colour if name == main else str(next(others)) for name in parts}
    return SceneObject(category, colour, size, np.logical_or.reduce(list(parts.values())), parts, part_colours)


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _fits(new_shape: np.ndarray, colour: str, placed: list[tuple], keep: float) -> bool:
    """Can a shape be drawn on top of `placed` (visible mask, full area, colour, protected) tuples?"""
    grown = None
    for visible, full_area, other_colour, protected in placed:
        hidden = int((visible & new_shape).sum())
        if hidden and (protected or visible.sum() - hidden < keep * full_area):
            return False
        if other_colour == colour:
            grown = _dilate(new_shape) if grown is None else grown
            if (grown & visible).any():
                return False
    return True


def sample_scene(rng: np.random.Generator, height: int = 128, width: int = 128,
                 num_objects: tuple[int, int] = (3, 6)) -> Scene:
    """A still scene of 3–6 objects (the first is a composite half of the time)."""
    objects: list[SceneObject] = []
    for i in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        composite = rng.random() < (0.5 if i == 0 else 0.1)
        for _ in range(_ATTEMPTS):
            obj = _random_object(rng, height, width, composite)
            placed = [(o.mask, int(o.shape.sum()), o.colour, o.protected) for o in objects]
            if _fits(obj.shape, obj.colour, placed, keep=0.7):
                for other in objects:
                    if (other.mask & obj.shape).any():
                        other.occluders.append(len(objects))
                    other.mask = other.mask & ~obj.shape
                obj.mask = obj.shape.copy()
                objects.append(obj)
                break
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(_render(objects, height, width, background), objects)


def _render(objects: list[SceneObject], height: int, width: int, background) -> np.ndarray:
    """Paint the objects in draw order and fill in the visible part masks."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = background
    for obj in objects:
        for name, part in obj.parts.items():
            image[part] = COLOURS[obj.part_colours[name]]
        if not obj.parts:
            image[obj.shape] = COLOURS[obj.colour]
    for obj in objects:
        later = np.zeros_like(obj.mask)
        for name in reversed(list(obj.parts)):
            obj.part_masks[name] = obj.parts[name] & obj.mask & ~later
            later |= obj.parts[name]
    return image


# ----------------------------------------------------------------------------- videos


def _motion_path(rng: np.random.Generator, extent: int, frames: int, height: int, width: int):
    """(x0, y0) top-left corner per frame for a random axis-aligned motion that stays inside the frame."""
    motion = str(rng.choice(list(MOTIONS)))
    dx, dy = MOTIONS[motion]
    speed = 0 if motion == "still" else int(rng.integers(2, 5))
    travel = speed * (frames - 1)
    span_x, span_y = width - extent - 2 - abs(dx) * travel, height - extent - 2 - abs(dy) * travel
    if min(span_x, span_y) < 1:
        return None
    x0 = 1 + int(rng.integers(0, span_x + 1)) + (travel if dx < 0 else 0)
    y0 = 1 + int(rng.integers(0, span_y + 1)) + (travel if dy < 0 else 0)
    return motion, speed, [(x0 + dx * speed * t, y0 + dy * speed * t) for t in range(frames)]


def _random_track(rng: np.random.Generator, frames: int, height: int, width: int, colours: list[str]):
    size = str(rng.choice(["tiny", "small", "medium"], p=[0.15, 0.5, 0.35]))
    category = str(rng.choice(TINY_CATEGORIES if size == "tiny" else CATEGORIES))
    extent = _extent(size, height, width, rng)
    path = _motion_path(rng, extent, frames, height, width)
    if path is None:
        return None
    motion, speed, corners = path
    event = [None, *EVENTS][int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
    first, last = 0, frames - 1
    if event == "appears":
        first = int(rng.integers(2, frames // 2 + 1))
    elif event == "disappears":
        last = int(rng.integers(frames // 2 - 1, frames - 2))
    shapes = {t: shape_mask(category, *corners[t], extent, height, width) for t in range(first, last + 1)}
    return Track(category, str(rng.choice(colours)), size, motion, speed, event, shapes)


def sample_video(rng: np.random.Generator, height: int = 128, width: int = 128, frames: int = 8,
                 fps: float = 2.0, num_tracks: tuple[int, int] = (2, 4)) -> VideoScene:
    """A video of 2–4 objects in distinct colours that move, stay, appear or disappear."""
    tracks: list[Track] = []
    for _ in range(int(rng.integers(num_tracks[0], num_tracks[1] + 1))):
        colours = [c for c in COLOURS if c not in {t.colour for t in tracks}]
        for _ in range(_ATTEMPTS):
            track = _random_track(rng, frames, height, width, colours)
            if track is not None and _track_fits(track, tracks):
                for other in tracks:
                    for t in other.masks.keys() & track.shapes.keys():
                        other.masks[t] = other.masks[t] & ~track.shapes[t]
                track.masks = {t: s.copy() for t, s in track.shapes.items()}
                tracks.append(track)
                break
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    rendered = []
    for t in range(frames):
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = background
        for track in tracks:
            if t in track.shapes:
                image[track.shapes[t]] = COLOURS[track.colour]
        rendered.append(image)
    return VideoScene(rendered, tracks, fps)


def _track_fits(track: Track, tracks: list[Track]) -> bool:
    for t, shape in track.shapes.items():
        placed = [(o.masks[t], int(o.shapes[t].sum()), o.colour, o.size == "tiny") for o in tracks if t in o.masks]
        if not _fits(shape, track.colour, placed, keep=0.6):
            return False
    return True
