"""Region geometry: mask decoding and Dynamic Object Processing (paper §4.2.1).

Pure numpy; turns one object mask into an `ObjectCrop`: the padded, rescaled
crop the vision encoder sees, its patch-grid mask and its Eq. 4 positions.

Notable design points:
- `decode_mask` accepts every mask form of the training data (array or
  tensor, COCO RLE compressed or not, polygons, boxes) and rejects bad input
  with an `InputError` naming the record (`where`), never a crash later on.
  Compressed RLE strings are checked in Python before pycocotools touches
  them, because its C decoder writes past the buffer on a bad count string.
- Eq. 2 uses exact integer arithmetic for the upscale branch, so a mask of
  exactly n·Ω pixels is never pushed to s = 2 by float noise. The scale is
  capped at `max_scale` and the crop at `max_crop_pixels` (the release has
  neither; a 10-pixel mask gave a ~1.5k px crop there).
- Boxes are (x0, y0, x1, y1) in pixels with x1, y1 exclusive everywhere.
- The mask is resized to the crop's patch grid by exact area averaging
  (separable interval-overlap matrices) and re-binarised at coverage >= 0.5;
  an object that would vanish keeps its best-covered cell.
- `position_grid(..., swapped_axes=True)` reproduces the release's axis mix-up
  for its checkpoints; the default is the paper's formula.
"""

import math
from dataclasses import dataclass

import numpy as np

from pixelrefer.errors import InputError

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive

# Float noise on an exact multiple (e.g. 28 * 0.5 / 14) must not add a patch.
_CEIL_TOL = 1e-9
# Coverage of exactly one half must survive float rounding in the matrix product.
_HALF_TOL = 1e-6


# ----------------------------------------------------------------------------- decoding


def decode_mask(spec, height: int, width: int, *, where: str = "mask") -> np.ndarray:
    """Decode any supported mask spec into a bool (height, width) array.

    Args:
        spec: a 2-D numpy array or torch tensor (bool/int/float; values > 0.5
            are foreground, so 0/1 and 0/255 masks both work), a COCO RLE dict
            (`counts` as str/bytes or a list of ints, `size` [h, w]), polygons
            `[[x0, y0, x1, y1, ...], ...]` or one flat list of >= 6 numbers, or a
            box: exactly 4 numbers `[x0, y0, x1, y1]` in pixels, x1/y1 exclusive.
        height, width: image size the mask must match.
        where: prefix of every error message, e.g. "sample 2, object 1".

    Raises:
        InputError: on a wrong size, NaN values, malformed spec, unknown type,
            or a mask without any foreground pixel.
    """
    if hasattr(spec, "detach") and hasattr(spec, "numpy"):  # torch tensor, without importing torch
        tensor = spec.detach().cpu()
        spec = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    if isinstance(spec, np.ndarray) and spec.ndim not in (1, 2):
        raise InputError(f"{where}: mask shape {tuple(spec.shape)} does not match image shape {(height, width)}")
    if isinstance(spec, np.ndarray) and spec.ndim == 2:
        mask = _from_array(spec, height, width, where)
    elif isinstance(spec, dict):
        mask = _from_rle(spec, height, width, where)
    elif isinstance(spec, (list, tuple, np.ndarray)) and _is_flat_numbers(spec) and len(spec) == 4:
        mask = _from_box(spec, height, width, where)
    elif isinstance(spec, (list, tuple, np.ndarray)) and len(spec) > 0:
        polygons = [list(spec)] if _is_flat_numbers(spec) else list(spec)
        mask = _from_polygons(polygons, height, width, where)
    else:
        raise InputError(f"{where}: unsupported mask spec of type {type(spec).__name__}")
    if not mask.any():
        raise InputError(f"{where}: mask is empty (no foreground pixel)")
    return mask


def _is_flat_numbers(seq) -> bool:
    if isinstance(seq, np.ndarray):
        return seq.ndim == 1 and seq.dtype.kind in "biuf"
    return all(isinstance(v, (int, float, np.integer, np.floating)) for v in seq)


def _from_array(arr: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    if arr.shape != (height, width):
        raise InputError(f"{where}: mask shape {tuple(arr.shape)} does not match image shape {(height, width)}")
    if arr.dtype == bool:
        return arr.copy()
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{where}: mask array has unsupported dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise InputError(f"{where}: mask contains NaN values")
    return arr > 0.5


def _from_rle(rle: dict, height: int, width: int, where: str) -> np.ndarray:
    from pycocotools import mask as coco_mask

    if "counts" not in rle or "size" not in rle:
        raise InputError(f"{where}: RLE dict needs 'counts' and 'size', got keys {list(rle)}")
    size = [int(v) for v in rle["size"]]
    if size != [height, width]:
        raise InputError(f"{where}: RLE size {size} does not match image shape {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = counts.encode() if isinstance(counts, str) else counts
        _check_counts(_parse_rle_string(counts, where), height * width, where)
        return coco_mask.decode({"counts": counts, "size": size}).astype(bool)
    if isinstance(counts, (list, tuple)) and all(isinstance(c, (int, np.integer)) for c in counts):
        _check_counts([int(c) for c in counts], height * width, where)
        compressed = coco_mask.frPyObjects({"counts": list(counts), "size": size}, height, width)
        return coco_mask.decode(compressed).astype(bool)
    raise InputError(f"{where}: RLE counts must be a string or a list of ints, got {type(counts).__name__}")


def _parse_rle_string(counts: bytes, where: str) -> list[int]:
    """Decode COCO's LEB128-like count string (mirror of pycocotools' rleFrString)."""
    values, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts) or not 48 <= counts[p] < 112:
                raise InputError(f"{where}: malformed compressed RLE string")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(values) > 2:  # counts after the third are stored as deltas
            x += values[-2]
        values.append(x)
    return values


def _check_counts(counts: list[int], total: int, where: str) -> None:
    if any(c < 0 for c in counts) or sum(counts) != total:
        raise InputError(f"{where}: RLE counts are negative or do not sum to height*width = {total}")


def _from_polygons(polygons: list, height: int, width: int, where: str) -> np.ndarray:
    from pycocotools import mask as coco_mask

    parts = []
    for k, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple, np.ndarray)) or not _is_flat_numbers(poly):
            raise InputError(f"{where}: polygon {k} is not a flat list of numbers")
        coords = np.asarray(poly, dtype=np.float64)
        if len(coords) < 6 or len(coords) % 2:
            raise InputError(f"{where}: polygon {k} needs an even count >= 6 of coordinates, got {len(coords)}")
        if not np.isfinite(coords).all():
            raise InputError(f"{where}: polygon {k} has NaN or infinite coordinates")
        parts.append(coords.tolist())
    rles = coco_mask.frPyObjects(parts, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def _from_box(box, height: int, width: int, where: str) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"{where}: box {list(box)} has NaN or infinite coordinates")
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"{where}: box {list(box)} is malformed (needs x0 < x1 and y0 < y1)")
    # Fractional boxes cover every pixel they touch.
    c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    c1, r1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    mask = np.zeros((height, width), dtype=bool)
    mask[r0:r1, c0:c1] = True  # empty slice when the box lies outside the image
    return mask


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a 2-D mask as COCO compressed RLE with `counts` as a utf-8 str."""
    from pycocotools import mask as coco_mask

    if mask.ndim != 2:
        raise InputError(f"mask_to_rle needs a 2-D mask, got shape {tuple(mask.shape)}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("utf-8"), "size": [int(v) for v in rle["size"]]}


# ----------------------------------------------------------------------------- Eq. 2 and crop geometry


def mask_to_box(mask: np.ndarray) -> Box:
    """Tight box (x0, y0, x1, y1) of the foreground pixels, x1/y1 exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise InputError("mask is empty (no foreground pixel)")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def scale_ratio(area: int, patch_area: int, num_tokens: int, downscale_threshold: int, max_scale: float) -> float:
    """Eq. 2 scale s for a mask of `area` pixels, as the release computes it.

    s = ceil(sqrt(Ω·n / |M|)), an integer >= 2 for every |M| < n·Ω; when that is
    1 and |M| > T·Ω, s = sqrt(T·Ω / |M|) < 1; the result is capped at max_scale.
    """
    if area <= 0:
        raise ValueError(f"scale_ratio needs a positive area, got {area}")
    budget = patch_area * num_tokens
    if area < budget:
        # Smallest integer s with s² >= budget / area, in exact integer arithmetic.
        scale = float(_ceil_sqrt(-(-budget // area)))
    elif area > downscale_threshold * patch_area:
        scale = math.sqrt(downscale_threshold * patch_area / area)
    else:
        scale = 1.0
    # differs from the release: no cap there (a 10-pixel mask gives a ~1.5k px crop).
    return min(scale, float(max_scale))


def _ceil_sqrt(m: int) -> int:
    return math.isqrt(m - 1) + 1 if m > 0 else 0


def padded_box(box: Box, pad: int, height: int, width: int) -> Box:
    """Grow an exclusive box by `pad` pixels per side, clamped to the image."""
    x0, y0, x1, y1 = box
    return max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)


def crop_size(box_h: int, box_w: int, scale: float, patch: int, max_pixels: int) -> tuple[int, int]:
    """Crop (height, width): box sides times `scale`, rounded up to whole patches.

    If the crop exceeds `max_pixels`, the scale shrinks (same for both sides)
    until it fits; every side stays at least one patch.
    """
    if max_pixels < patch * patch:
        raise ValueError(f"max_pixels {max_pixels} is below one patch ({patch}x{patch})")
    cells_h, cells_w = _cells(box_h, scale, patch), _cells(box_w, scale, patch)
    for _ in range(cells_h + cells_w):  # every step drops >= 1 cell, so this guard is never hit
        if cells_h * cells_w * patch * patch <= max_pixels:
            break
        shrink = scale * math.sqrt(max_pixels / (cells_h * cells_w * patch * patch))
        # Rounding up to whole patches can stall the sqrt step just above the
        # budget; shrink at least enough to drop one cell from one side.
        drop = max((c - 1) * patch / b for c, b in ((cells_h, box_h), (cells_w, box_w)) if c > 1)
        scale = min(shrink, drop)
        cells_h, cells_w = _cells(box_h, scale, patch), _cells(box_w, scale, patch)
    return cells_h * patch, cells_w * patch


def _cells(side: int, scale: float, patch: int) -> int:
    return max(1, math.ceil(side * scale / patch - _CEIL_TOL))


# ----------------------------------------------------------------------------- patch-grid mask and positions


def _overlap_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) fraction of each output cell covered by each input pixel."""
    step = n_in / n_out
    lo = np.arange(n_out)[:, None] * step
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + step, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return overlap / step


def cell_coverage(mask_crop: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Exact fraction of each (grid_h, grid_w) cell covered by the mask (area averaging)."""
    h, w = mask_crop.shape
    ry, rx = _overlap_matrix(grid_h, h), _overlap_matrix(grid_w, w)
    return ry @ mask_crop.astype(np.float64) @ rx.T  # (gh, h) @ (h, w) @ (w, gw)


def mask_to_cells(mask_crop: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Bool (grid_h, grid_w) cell mask: cells at least half covered by the mask."""
    coverage = cell_coverage(mask_crop, grid_h, grid_w)
    cells = coverage >= 0.5 - _HALF_TOL
    if not cells.any() and mask_crop.any():
        # differs from the release: thin objects vanished there; keep the best-covered cell.
        cells.flat[int(np.argmax(coverage))] = True
    return cells


def position_grid(
    box: Box, grid_h: int, grid_w: int, height: int, width: int, *, swapped_axes: bool = False
) -> np.ndarray:
    """Eq. 4 normalised image coordinates of each crop cell, float32 (gh, gw, 2) as (x, y).

    p_x(i, j) = ((j / gw) · w_b + x0) / (W - 1), p_y(i, j) = ((i / gh) · h_b + y0) / (H - 1),
    with box the padded crop box. `swapped_axes=True` gives the release's values:
    p_x(i, j) = ((j / gw) · (h_b - 1) + y0) / (W - 1), p_y(i, j) = ((i / gh) · (w_b - 1) + x0) / (H - 1).
    """
    x0, y0, x1, y1 = box
    w_b, h_b = x1 - x0, y1 - y0
    if swapped_axes:
        # differs from the paper: the release stores (top, left, bottom, right) with
        # bottom/right inclusive (y1 - 1, x1 - 1) and reads it as (x0, y0, x1, y1);
        # its checkpoints were trained on these values.
        x0, y0, w_b, h_b = y0, x0, h_b - 1, w_b - 1
    px = ((np.arange(grid_w) / grid_w) * w_b + x0) / max(1, width - 1)  # (gw,)
    py = ((np.arange(grid_h) / grid_h) * h_b + y0) / max(1, height - 1)  # (gh,)
    grid = np.empty((grid_h, grid_w, 2), dtype=np.float32)
    grid[..., 0] = px[None, :]
    grid[..., 1] = py[:, None]
    return grid


# ----------------------------------------------------------------------------- pixels and the full pipeline


def resize_crop(image: np.ndarray, box: Box, out_h: int, out_w: int) -> np.ndarray:
    """Crop (H, W, 3) uint8 to the exclusive box and resize to (out_h, out_w, 3).

    Bilinear when upscaling (or same size), box (area) filter when shrinking
    either side, so downscaled crops do not alias.
    """
    from PIL import Image

    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]):
        raise InputError(f"crop box {box} is empty or outside the image of shape {image.shape[:2]}")
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    shrinking = out_h < y1 - y0 or out_w < x1 - x0
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(crop).resize((out_w, out_h), resample), dtype=np.uint8)


@dataclass
class ObjectCrop:
    """One object after Dynamic Object Processing.

    Attributes:
        pixels: uint8 (h, w, 3) padded crop resized to whole patches.
        cell_mask: bool (gh, gw) patch cells that belong to the object.
        positions: float32 (gh, gw, 2) Eq. 4 (x, y) coordinates of each cell.
        box: padded crop box in original pixels (x0, y0, x1, y1), exclusive.
        mask_box: tight box of the mask, same convention.
        scale: Eq. 2 scale after the max_scale cap.
        area: foreground pixels of the full mask.
    """

    pixels: np.ndarray
    cell_mask: np.ndarray
    positions: np.ndarray
    box: Box
    mask_box: Box
    scale: float
    area: int

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of the crop."""
        return self.cell_mask.shape

    @property
    def applied_scale(self) -> float:
        """Scale actually applied: `scale` after rounding to whole patches and the crop-pixel budget."""
        x0, y0, x1, y1 = self.box
        h, w = self.pixels.shape[:2]
        return float(np.sqrt(h * w / ((y1 - y0) * (x1 - x0))))


def crop_object(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    patch: int,
    num_tokens: int,
    downscale_threshold: int,
    context_patches: int = 2,
    max_scale: float = 8.0,
    max_crop_pixels: int = 448 * 448,
    dynamic_scaling: bool = True,
    swapped_axes: bool = False,
) -> ObjectCrop:
    """Dynamic Object Processing for one mask: box, Eq. 2 scale, padded crop, cell mask, positions."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must be uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    if mask.dtype != bool or mask.shape != image.shape[:2]:
        raise InputError(f"mask must be bool {tuple(image.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    H, W = mask.shape
    mask_box = mask_to_box(mask)
    area = int(mask.sum())
    scale = scale_ratio(area, patch * patch, num_tokens, downscale_threshold, max_scale) if dynamic_scaling else 1.0
    box = padded_box(mask_box, context_patches * patch, H, W)
    x0, y0, x1, y1 = box
    out_h, out_w = crop_size(y1 - y0, x1 - x0, scale, patch, max_crop_pixels)
    grid_h, grid_w = out_h // patch, out_w // patch
    return ObjectCrop(
        pixels=resize_crop(image, box, out_h, out_w),
        cell_mask=mask_to_cells(mask[y0:y1, x0:x1], grid_h, grid_w),
        positions=position_grid(box, grid_h, grid_w, H, W, swapped_axes=swapped_axes),
        box=box,
        mask_box=mask_box,
        scale=scale,
        area=area,
    )


def local_crop(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The padded object crop resized to (size, size, 3), the local view of Object-Centric Infusion."""
    return resize_crop(image, box, size, size)
