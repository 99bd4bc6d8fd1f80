"""Reading the media an annotation record points at: images, frame lists, frame folders, video files.

Notable:
- Nothing is read when annotations are parsed; media are opened only when a
  sample is loaded (`Sample.load_media`) or validated (`pixelrefer data check`).
- `probe_*` functions read headers only (PIL's lazy open, PyAV's stream
  info): the validator checks sizes and frame ranges without decoding pixels.
- Video files go through `pixelrefer.video` (PyAV, imported only when a video
  file is met): only the requested frames are decoded, each found by seeking
  to its keyframe; their times come from the stream's average rate.
- Every failure is an `InputError` whose message starts with `where` (the
  record) and names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pixelrefer.errors import InputError
from pixelrefer.video import IMAGE_SUFFIXES, open_container, open_video, stream_fps


@dataclass
class MediaInfo:
    """What the validator needs to know about a record's media, read from headers."""

    height: int
    width: int
    num_frames: int | None = None  # None for a still image
    fps: float | None = None


def _require_file(path: Path, what: str, where: str) -> None:
    if not path.is_file():
        raise InputError(f"{where}: {what} {path} does not exist")


def read_image(path: Path, where: str) -> Image.Image:
    """The image at `path`, decoded to RGB and closed."""
    _require_file(path, "image file", where)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{where}: cannot read image {path}: {exc}") from exc


def probe_image(path: Path, where: str) -> MediaInfo:
    """Height and width from the image header (no pixel decoding)."""
    _require_file(path, "image file", where)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{where}: cannot read image {path}: {exc}") from exc
    return MediaInfo(height=height, width=width)


def frame_folder(path: Path, where: str) -> list[Path]:
    """Image files of a frame folder, sorted by name (zero-padded names sort in time order)."""
    if not path.is_dir():
        raise InputError(f"{where}: frame folder {path} does not exist")
    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise InputError(f"{where}: frame folder {path} holds no image files")
    return frames


def probe_frames(paths: list[Path], where: str) -> MediaInfo:
    """Check every frame file exists and all share one size; return that size and the count."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{where}: {len(missing)} of {len(paths)} frame files do not exist (first: {missing[0]})")
    sizes = {}
    for t, path in enumerate(paths):
        info = probe_image(path, f"{where}, frame {t}")
        sizes.setdefault((info.height, info.width), t)
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} from frame {t}" for (h, w), t in sizes.items())
        raise InputError(f"{where}: video frames differ in size ({listed})")
    (height, width), _ = next(iter(sizes.items()))
    return MediaInfo(height=height, width=width, num_frames=len(paths))


def probe_video_file(path: Path, where: str) -> MediaInfo:
    """Size, frame count and frame rate of a video file (counts packets when the header has no count)."""
    with open_container(path, where) as container:
        stream = container.streams.video[0]
        fps = stream_fps(stream, path, where)
        height, width = stream.codec_context.height, stream.codec_context.width
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    return MediaInfo(height=height, width=width, num_frames=count, fps=fps)


def read_video_frames(path: Path, indices: list[int], where: str) -> tuple[list[Image.Image], float]:
    """Decode the frames at `indices` of a video file, in index order; return them and the fps."""
    if not indices:
        raise InputError(f"{where}: no frame indices to read from video {path}")
    with open_video(path, where=where) as video:
        frames = video.read(sorted(set(indices)))
        return [Image.fromarray(f) for f in frames], video.fps
