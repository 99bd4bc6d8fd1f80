"""`Sample`: one parsed annotation record, and how it loads its media and decodes its masks.

Notable:
- A sample holds paths and raw mask specs only; `load_media()` reads the
  image or frames (PIL; video files through PyAV, only the frames the masks
  name) and decodes every mask against the real media size.
- `iter_masks` yields every (object, frame) mask or the error it raised, so
  the validator reports them all while `decode_masks` stops at the first.
- A record's `height`/`width` are checked against its media, never trusted
  over it; polygon and box points outside the image are rejected, not
  clipped (pycocotools would clip them silently).
- Every error names `file:index` and, where it applies, object and frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image

from pixelrefer import regions
from pixelrefer.data import media
from pixelrefer.errors import InputError
from pixelrefer.processing import Video

REGION = "<region>"


class SampleInputs(NamedTuple):
    """One sample as `PixelReferProcessor.encode(text, images=image, videos=video, masks=masks)` takes it."""

    text: list[dict[str, str]]
    image: Image.Image | None
    video: Video | None
    masks: list  # bool (H, W) per object; for a video {frame position: bool (H, W)} per object


@dataclass
class Sample:
    """One annotation record, parsed but with its media not yet read.

    Attributes:
        source: the annotation file.
        index: position of the record in it (0-based list index or line number).
        id: the record's `id`, else `{file stem}-{index}`.
        conversation: turns as {"role": user|assistant|system, "content": str}.
        image: resolved image path (image records).
        video: resolved video file or frame folder (video records given by one path).
        frames: resolved frame files (video records given as a list).
        timestamps: seconds per frame of `frames` (or of the folder), if the record gives them.
        fps: frame rate the record states, used for times when it gives no timestamps.
        masks: per object the raw spec (image) or {frame index: raw spec} (video).
        height, width: the size the record states, if any (checked against the media).
        task: the record's `task` (ShapesWorld) or "multiple_choice" for Bench-Q records.
        meta: every other key of the record (`type`, `options`, `Answer`, ...).
    """

    source: Path
    index: int
    id: str
    conversation: list[dict[str, str]]
    image: Path | None = None
    video: Path | None = None
    frames: list[Path] | None = None
    timestamps: list[float] | None = None
    fps: float | None = None
    masks: list = field(default_factory=list)
    height: int | None = None
    width: int | None = None
    task: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.index}"

    @property
    def is_video(self) -> bool:
        return self.video is not None or self.frames is not None

    @property
    def region_count(self) -> int:
        return sum(turn["content"].count(REGION) for turn in self.conversation if turn["role"] != "assistant")

    def check_regions(self) -> None:
        """Raise unless the user turns hold exactly one `<region>` per mask."""
        if self.region_count != len(self.masks):
            raise InputError(f"{self.where}: the conversation has {self.region_count} {REGION} "
                             f"but the record has {len(self.masks)} masks")

    def check_size(self, height: int, width: int) -> None:
        """Raise when the record's stated height/width disagree with its media."""
        stated = (self.height or height, self.width or width)
        if stated != (height, width):
            raise InputError(f"{self.where}: the record says {stated[0]}x{stated[1]} (height x width) "
                             f"but its media are {height}x{width}")

    def frame_paths(self) -> list[Path]:
        """Frame files of a frame-list or frame-folder video."""
        return self.frames if self.frames is not None else media.frame_folder(self.video, self.where)

    def is_video_file(self) -> bool:
        """A `video` path naming a file (a missing path counts as a file when it has a suffix)."""
        if self.video is None or self.video.is_dir():
            return False
        return self.video.is_file() or self.video.suffix != ""

    def probe(self) -> media.MediaInfo | None:
        """Size (and frame count) of the media from headers only; None for a text-only record."""
        if self.image is not None:
            return media.probe_image(self.image, self.where)
        if self.is_video_file():
            return media.probe_video_file(self.video, self.where)
        if self.is_video:
            return media.probe_frames(self.frame_paths(), self.where)
        return None

    def iter_masks(self, height: int, width: int, num_frames: int | None = None) -> Iterator[tuple]:
        """Yield (object, frame or None, decoded bool mask or the InputError it raised), every one."""
        for k, spec in enumerate(self.masks):
            per_frame = spec if self.is_video else {None: spec}
            for t, frame_spec in per_frame.items():
                where = f"{self.where}, object {k}" + ("" if t is None else f", frame {t}")
                try:
                    if t is not None and num_frames is not None and not 0 <= t < num_frames:
                        raise InputError(f"{where}: frame index {t} is out of range (video has {num_frames} frames)")
                    mask = decode_spec(frame_spec, height, width, where)
                except InputError as exc:
                    mask = exc
                yield k, t, mask

    def decode_masks(self, height: int, width: int, num_frames: int | None = None) -> list:
        """Bool masks per object ({frame: mask} for a video); raises on the first bad one."""
        decoded = [{} for _ in self.masks]
        for k, t, mask in self.iter_masks(height, width, num_frames):
            if isinstance(mask, InputError):
                raise mask
            decoded[k][t] = mask
        return [per_frame if self.is_video else per_frame[None] for per_frame in decoded]

    def load_media(self) -> SampleInputs:
        """Read the image or frames and decode every mask; raises `InputError` naming file and index."""
        self.check_regions()
        if self.image is not None:
            image = media.read_image(self.image, self.where)
            self.check_size(image.height, image.width)
            return SampleInputs(self.conversation, image, None, self.decode_masks(image.height, image.width))
        if self.is_video_file():
            return self._load_video_file()
        if self.is_video:
            return self._load_frames()
        if self.masks:
            raise InputError(f"{self.where}: the record has masks but no image or video")
        return SampleInputs(self.conversation, None, None, [])

    def _load_frames(self) -> SampleInputs:
        paths = self.frame_paths()
        frames = [media.read_image(p, f"{self.where}, frame {t}") for t, p in enumerate(paths)]
        if len({f.size for f in frames}) > 1:
            raise InputError(f"{self.where}: video frames differ in size: {sorted({f.size for f in frames})}")
        if self.timestamps is not None and len(self.timestamps) != len(frames):
            raise InputError(f"{self.where}: {len(self.timestamps)} timestamps for {len(frames)} frames")
        height, width = frames[0].height, frames[0].width
        self.check_size(height, width)
        video = Video(frames, timestamps=self.timestamps, fps=self.fps or 1.0)
        return SampleInputs(self.conversation, None, video, self.decode_masks(height, width, len(frames)))

    def _load_video_file(self) -> SampleInputs:
        # Only the frames the masks name are decoded (uniform sampling is the video module's job).
        indices = sorted({t for per_frame in self.masks for t in per_frame})
        if not indices:
            raise InputError(f"{self.where}: a video-file record needs masks naming the frames to read")
        frames, fps = media.read_video_frames(self.video, indices, self.where)
        height, width = frames[0].height, frames[0].width
        self.check_size(height, width)
        position = {t: i for i, t in enumerate(indices)}
        masks = [{position[t]: m for t, m in per_frame.items()} for per_frame in self.decode_masks(height, width)]
        video = Video(frames, timestamps=[t / fps for t in indices], fps=fps)
        return SampleInputs(self.conversation, None, video, masks)


def decode_spec(spec, height: int, width: int, where: str) -> np.ndarray:
    """`regions.decode_mask` after rejecting polygon or box points outside the image."""
    if isinstance(spec, (list, tuple)):
        flats = [spec] if all(isinstance(v, (int, float)) for v in spec) else spec
        for flat in flats:
            if isinstance(flat, (list, tuple)) and all(isinstance(v, (int, float)) for v in flat):
                for x, y in zip(flat[0::2], flat[1::2]):
                    finite = math.isfinite(x) and math.isfinite(y)  # NaN is decode_mask's to report
                    if finite and not (0 <= x <= width and 0 <= y <= height):
                        raise InputError(f"{where}: point (x={x}, y={y}) lies outside the image "
                                          f"(height {height}, width {width})")
    return regions.decode_mask(spec, height, width, where=where)
