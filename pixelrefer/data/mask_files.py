"""Mask files: read masks saved by a region picker or another tool, write them as COCO RLE JSON.

Formats, by suffix:
- an image (.png, .jpg, .bmp, .gif, .tif, .webp): one mask, foreground where
  the largest colour value is > 0 (alpha ignored), so 0/1 and 0/255 masks
  both work; named by the file's stem.
- .npy: an (H, W) array is one mask, an (N, H, W) stack is N masks
  (`stem[0]`, `stem[1]`, …); values > 0.5 are foreground.
- .npz: one mask per array, named by its key.
- .json: one mask spec (a COCO RLE dict, polygons, a box), a list of RLE
  dicts, or {name: spec}; `write_mask_file` writes the last form with RLEs.
  A list of lists is one mask (polygons, or a box), as in annotation files.

Every mask goes through `regions.decode_mask`, so a size that is not the
image's, or an empty mask, is an `InputError` naming the file and the mask.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelrefer.errors import InputError
from pixelrefer.regions import decode_mask, mask_to_rle

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_mask_file(path: str | Path, height: int, width: int) -> dict[str, np.ndarray]:
    """{name: bool (height, width) mask} for every mask in the file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mask file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        specs = {path.stem: _image_foreground(path)}
    elif suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        specs = {f"{path.stem}[{k}]": m for k, m in enumerate(array)} if array.ndim == 3 else {path.stem: array}
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            specs = {key: arrays[key] for key in arrays.files}
    elif suffix == ".json":
        specs = _json_specs(path)
    else:
        raise InputError(f"mask file {path}: unknown suffix {suffix!r} (image, .npy, .npz or .json)")
    if not specs:
        raise InputError(f"mask file {path} holds no mask")
    return {name: decode_mask(spec, height, width, where=f"mask file {path}, mask {name!r}")
            for name, spec in specs.items()}


def _image_foreground(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB") if image.mode not in ("1", "L", "I", "I;16", "F") else image)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"mask file {path}: not a readable image ({error})") from error
    return (pixels.max(-1) if pixels.ndim == 3 else pixels) > 0


def _json_specs(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"mask file {path}: invalid JSON ({error})") from error
    if isinstance(data, dict) and {"counts", "size"} <= set(data):
        return {path.stem: data}
    if isinstance(data, dict):
        return data
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return {f"{path.stem}[{k}]": spec for k, spec in enumerate(data)}
    return {path.stem: data}  # polygons or a box: one mask


def write_mask_file(path: str | Path, masks: dict[str, np.ndarray]) -> Path:
    """Write {name: (H, W) mask} as JSON {name: COCO RLE}, atomically; empty masks are refused."""
    path = Path(path)
    empty = [name for name, mask in masks.items() if not np.asarray(mask).any()]
    if empty:
        raise InputError(f"masks {empty} are empty: nothing to save for them")
    payload = {name: mask_to_rle(np.asarray(mask, dtype=bool)) for name, mask in masks.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".json", delete=False) as tmp:
        json.dump(payload, tmp)
    os.replace(tmp.name, path)
    return path
