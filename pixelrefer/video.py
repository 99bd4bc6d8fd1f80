"""Video input: decoding files and frame folders lazily, uniform frame sampling, timestamps.

    reader = open_video("clip.mp4")          # headers and a frame index only
    clip = reader.sample(16)                 # 16 frames decoded, as a `SampledVideo`
    masks = clip.select(masks_by_frame)      # {source frame: mask} → {position in clip: mask}

Notable:
- `VideoReader` decodes only the frames asked for, so a long video never sits
  whole in memory. Video files go through PyAV (a dependency) or, when asked
  with `backend="decord"`, decord; frame folders and frame lists through PIL,
  one file per frame; frames already in memory are wrapped as they are.
- PyAV random access is exact for any video, variable frame rate included:
  opening a file demuxes its packets once (no decoding) to list every frame's
  presentation time and the keyframes; frame i is then found by seeking to the
  last keyframe at or before it and decoding forward. Sequential reads (SAM 2
  tracking) continue the running decoder instead of seeking again. A stream
  without packet timestamps falls back to decoding from the start.
- Timestamps are seconds from the first frame: from presentation times for
  PyAV and decord, `index / fps` (or the given list) for frame folders.
- Uniform sampling takes the centre of each of N equal segments of
  [0, T-1] (VideoLLaMA 2's `uniform` mode; the paper samples 16 frames, and 20
  for its efficiency table); a video of at most N frames keeps all of them.
- Every failure is an `InputError` naming the video and, where it applies,
  the frame index: missing or unreadable files, empty videos, indices out of
  range, frames that fail to decode.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelrefer.errors import InputError
from pixelrefer.processing import Video, to_rgb_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PAPER_NUM_FRAMES = 16  # frames per video in the paper's experiments (20 in Table 6)


@dataclass
class SampledVideo(Video):
    """Frames picked from a longer video: `indices[i]` is the source frame index of `frames[i]`."""

    indices: list[int] = field(default_factory=list)
    source: str = ""

    def select(self, masks: Sequence[Mapping[int, object]]) -> list[dict[int, object]]:
        """Per object {source frame index: mask} → {position among these frames: mask}.

        Masks are bool arrays or any spec the processor decodes (RLE, polygon).
        Frames that were not sampled are dropped, and so are empty arrays (an
        object that left the frame). The result is what `PixelReferProcessor`
        takes as video masks.
        """
        position = {index: i for i, index in enumerate(self.indices)}
        selected = []
        for k, per_frame in enumerate(masks):
            kept = {position[int(t)]: m for t, m in per_frame.items() if int(t) in position and np.any(m)}
            if not kept:
                raise InputError(f"video {self.source}, object {k}: "
                                 f"no mask on any of the sampled frames {self.indices}")
            selected.append(dict(sorted(kept.items())))
        return selected


def uniform_indices(num_total: int, num_frames: int = PAPER_NUM_FRAMES) -> list[int]:
    """Centres of `num_frames` equal segments of [0, num_total - 1]; every frame when there are no more than that."""
    if num_frames < 1:
        raise InputError(f"cannot sample {num_frames} frames: ask for at least one")
    if num_total <= num_frames:
        return list(range(num_total))
    segment = (num_total - 1) / num_frames
    return [int(np.floor(segment * (k + 0.5) + 0.5)) for k in range(num_frames)]


class VideoReader:
    """Random access to the frames of one video; subclasses decode. Frames are uint8 (H, W, 3) arrays.

    Attributes:
        source: the file, folder or description used in error messages.
        num_frames, fps, height, width: from the headers (or the first frame).
    """

    source: str
    num_frames: int
    fps: float
    height: int
    width: int

    def __init__(self, where: str | None = None):
        self._prefix = f"{where}: " if where else ""

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read([index])[0]

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the open file, if any."""

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The frames at `indices`, in the order given (repeats allowed); each distinct frame is decoded once."""
        wanted = sorted({self.check_index(i) for i in indices})
        decoded = dict(zip(wanted, self._decode(wanted)))
        return [decoded[int(i)] for i in indices]

    def timestamps(self, indices: Sequence[int]) -> list[float]:
        """Seconds from the first frame, for each of `indices`."""
        return [self._time(self.check_index(i)) for i in indices]

    def sample(self, num_frames: int = PAPER_NUM_FRAMES, indices: Sequence[int] | None = None) -> SampledVideo:
        """Decode `num_frames` uniformly sampled frames (or exactly `indices`) with their timestamps."""
        if indices is None:
            indices = uniform_indices(self.num_frames, num_frames)
        indices = [self.check_index(i) for i in indices]
        return SampledVideo(self.read(indices), timestamps=self.timestamps(indices), fps=self.fps,
                            indices=indices, source=self.source)

    def check_index(self, index: int) -> int:
        """`index` as an int; an `InputError` naming the video unless it is an integer in [0, num_frames)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise InputError(f"{self._prefix}frame index {index!r} of video {self.source} is not an integer")
        if not 0 <= index < self.num_frames:
            raise InputError(f"{self._prefix}frame index {index} is out of range "
                             f"(video {self.source} has {self.num_frames} frames)")
        return int(index)

    def _check_not_empty(self) -> None:
        if self.num_frames == 0:
            raise InputError(f"{self._prefix}video {self.source} has no frames")

    def _decode(self, indices: list[int]) -> list[np.ndarray]:
        raise NotImplementedError

    def _time(self, index: int) -> float:
        return index / self.fps


def open_video(source, *, backend: str = "auto", fps: float | None = None, timestamps: Sequence[float] | None = None,
               where: str | None = None) -> VideoReader:
    """A `VideoReader` for a video file, a frame folder, a list of frame files, or frames already decoded.

    Args:
        source: path to a video file or to a folder of frame images; a list of image paths; a list of
            frames (PIL images or arrays) or a `processing.Video`.
        backend: for video files, "pyav", "decord" or "auto" (PyAV when importable, else decord).
        fps: frame rate of frame folders and frame lists (default 1.0); ignored for video files.
        timestamps: seconds per frame of a frame folder or list, overriding `fps`.
        where: prefix for error messages (e.g. the annotation record).
    """
    if isinstance(source, Video):
        return FrameReader(source.frames, source.times(), where=where)
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, Path)) for s in source):
            return FileFramesReader([Path(s) for s in source], fps, timestamps, where=where)
        return FrameReader(list(source), _times(len(source), fps, timestamps, where, "frame list"), where=where)
    path = Path(source)
    if path.is_dir():
        return FileFramesReader(frame_files(path, where), fps, timestamps, where=where, source=str(path))
    if not path.is_file():
        raise InputError(f"{where + ': ' if where else ''}video {path} does not exist")
    if backend == "auto":
        backend = "pyav" if _importable("av") or not _importable("decord") else "decord"
    if backend == "pyav":
        return PyAVReader(path, where=where)
    if backend == "decord":
        return DecordReader(path, where=where)
    raise ValueError(f"unknown video backend {backend!r}: use 'pyav', 'decord' or 'auto'")


def sample_video(source, num_frames: int = PAPER_NUM_FRAMES, **open_kwargs) -> SampledVideo:
    """Open `source`, decode `num_frames` uniformly sampled frames, close it."""
    with open_video(source, **open_kwargs) as reader:
        return reader.sample(num_frames)


def frame_files(folder: Path, where: str | None = None) -> list[Path]:
    """Image files of a frame folder, sorted by name (zero-padded names sort in time order)."""
    frames = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise InputError(f"{where + ': ' if where else ''}frame folder {folder} holds no image files")
    return frames


def write_video(path: str | Path, frames: Sequence, fps: float = 2.0, codec: str = "libx264",
                quality: int = 0) -> Path:
    """Encode frames (uint8 (H, W, 3) arrays or PIL images) into a video file with PyAV.

    `quality` is x264's constant rate factor (0: lossless luma, the default, so colours survive; 23: x264's
    default); ignored by other codecs. Even sizes are required by 4:2:0 codecs.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [to_rgb_array(f, f"frame {t}") for t, f in enumerate(frames)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=_fraction(fps))
        stream.height, stream.width = arrays[0].shape[:2]
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(quality)}
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


# ----------------------------------------------------------------------------- readers


class FrameReader(VideoReader):
    """Frames already in memory (PIL images or arrays), checked and converted one at a time when read."""

    def __init__(self, frames: list, times: list[float], where: str | None = None, source: str = "frames in memory"):
        super().__init__(where)
        self.source, self._frames, self._times = source, frames, times
        self.num_frames = len(frames)
        self._check_not_empty()
        self.height, self.width = self._load(0).shape[:2]
        span = times[-1] - times[0]
        self.fps = (len(times) - 1) / span if span > 0 else 1.0

    def _decode(self, indices):
        frames = [self._load(i) for i in indices]
        for i, frame in zip(indices, frames):
            if frame.shape[:2] != (self.height, self.width):
                raise InputError(f"{self._prefix}frame {i} of {self.source} is {frame.shape[0]}x{frame.shape[1]}, "
                                 f"frame 0 is {self.height}x{self.width}")
        return frames

    def _load(self, index: int) -> np.ndarray:
        return to_rgb_array(self._frames[index], f"{self._prefix}frame {index}")

    def _time(self, index):
        return self._times[index]


class FileFramesReader(FrameReader):
    """A frame folder or a list of image files: each frame is read from its file when asked for."""

    def __init__(self, paths: list[Path], fps: float | None, timestamps, where: str | None = None,
                 source: str | None = None):
        prefix = f"{where}: " if where else ""
        if not paths:
            raise InputError(f"{prefix}the frame list is empty")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{prefix}{len(missing)} of {len(paths)} frame files do not exist (first: {missing[0]})")
        source = source or f"{paths[0].parent} ({len(paths)} frame files)"
        super().__init__(paths, _times(len(paths), fps, timestamps, where, source), where=where, source=source)
        self.fps = fps or self.fps

    def _load(self, index):
        path = self._frames[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{self._prefix}cannot read frame {index} ({path}): {exc}") from exc


class PyAVReader(VideoReader):
    """A video file decoded with PyAV; frame i found through the packet index (see the module notes)."""

    def __init__(self, path: Path, where: str | None = None):
        super().__init__(where)
        self.source, self._where = str(path), where
        self._container = open_container(path, where)
        self._stream = stream = self._container.streams.video[0]
        self.height, self.width = stream.codec_context.height, stream.codec_context.width
        packets = [(p.pts, p.is_keyframe) for p in self._container.demux(stream) if p.size]
        self.num_frames = len(packets)
        self._check_not_empty()
        has_pts = all(pts is not None for pts, _ in packets)
        self._pts = sorted(pts for pts, _ in packets) if has_pts else None
        self._row = {pts: i for i, pts in enumerate(self._pts)} if has_pts else None
        self._keyframes = sorted(pts for pts, key in packets if key) if has_pts else None
        self.fps = stream_fps(stream, path, where)
        self._decoder, self._position = None, -1

    def close(self):
        self._container.close()

    def _decode(self, indices):
        return [self._frame(i) for i in indices]

    def _time(self, index):
        if self._pts is None:
            return index / self.fps
        return float((self._pts[index] - self._pts[0]) * self._stream.time_base)

    def _frame(self, index: int) -> np.ndarray:
        import av

        if self._decoder is None or index <= self._position or self._keyframe_row(index) > self._position + 1:
            self._seek(index)
        try:
            for row, frame in self._decoder:
                self._position = row
                if row == index:
                    return frame.to_ndarray(format="rgb24")
                if row > index:
                    break
        except av.FFmpegError as exc:
            self._decoder = None
            raise InputError(f"{self._prefix}cannot decode frame {index} of video {self.source}: {exc}") from exc
        self._decoder = None
        raise InputError(f"{self._prefix}frame {index} of video {self.source} could not be decoded "
                         f"(the stream ended at frame {self._position})")

    def _keyframe_row(self, index: int) -> int:
        if self._pts is None:
            return 0
        pts = self._pts[index]
        keyframe = self._keyframes[max(bisect.bisect_right(self._keyframes, pts) - 1, 0)]
        return self._row[keyframe]

    def _seek(self, index: int) -> None:
        """Restart decoding at the last keyframe at or before frame `index` (the start without timestamps)."""
        if self._pts is None:  # such streams (raw H.264, say) cannot seek either: reopen the file
            self._container.close()
            self._container = open_container(Path(self.source), self._where)
            self._stream = self._container.streams.video[0]
            self._decoder = enumerate(self._container.decode(self._stream))
        else:
            keyframe = self._pts[self._keyframe_row(index)]
            self._container.seek(keyframe, stream=self._stream, backward=True, any_frame=False)
            frames = self._container.decode(self._stream)
            self._decoder = ((self._row[f.pts], f) for f in frames if f.pts in self._row)
        self._position = -1


class DecordReader(VideoReader):
    """A video file decoded with decord (optional: `pip install decord`)."""

    def __init__(self, path: Path, where: str | None = None):
        super().__init__(where)
        self.source = str(path)
        try:
            import decord
        except ImportError as exc:
            raise InputError(f"{self._prefix}reading {path} with decord needs `pip install decord`") from exc
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        except decord.DECORDError as exc:
            raise InputError(f"{self._prefix}cannot open video {path}: {exc}") from exc
        self.num_frames = len(self._reader)
        self._check_not_empty()
        self.height, self.width = self._reader[0].shape[:2]
        self.fps = float(self._reader.get_avg_fps())
        self._start = float(self._reader.get_frame_timestamp(0)[0])

    def close(self):
        self._reader = None

    def _decode(self, indices):
        return list(self._reader.get_batch(indices).asnumpy())

    def _time(self, index):
        return round(float(self._reader.get_frame_timestamp(index)[0]) - self._start, 6)  # decord keeps float32


# ----------------------------------------------------------------------------- helpers


def open_container(path: Path, where: str | None):
    """An open PyAV container holding a video stream; `InputError` naming the file otherwise."""
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise InputError(f"{prefix}video file {path} does not exist")
    try:
        import av
    except ImportError as exc:
        raise InputError(f"{prefix}reading video file {path} needs PyAV (pip install av)") from exc
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise InputError(f"{prefix}cannot open video {path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"{prefix}{path} has no video stream")
    return container


def stream_fps(stream, path: Path, where: str | None) -> float:
    """The stream's average (else guessed) frame rate; an `InputError` when it has none."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
        raise InputError(f"{where + ': ' if where else ''}video {path} has no frame rate to compute timestamps from")
    return float(rate)


def _times(count: int, fps: float | None, timestamps, where: str | None, name: str) -> list[float]:
    if timestamps is None:
        return [t / (fps or 1.0) for t in range(count)]
    if len(timestamps) != count:
        raise InputError(f"{where + ': ' if where else ''}{name}: {len(timestamps)} timestamps for {count} frames")
    return [float(t) for t in timestamps]


def _fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
