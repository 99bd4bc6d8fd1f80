"""`MaskPropagator`: SAM 2 turns a click, a box or a mask on one frame into masks on every tracked frame.

    propagator = MaskPropagator.from_pretrained("checkpoints/sam2.1-hiera-tiny")   # transformers folder
    result = propagator.propagate("clip.mp4", [ObjectPrompt(frame=0, points=[(120, 80)])], frames=clip.indices)
    masks = clip.select(result.per_object())       # ready for PixelReferProcessor

Notable:
- Two backends behind one interface: transformers' `Sam2VideoModel` (the
  default; a local folder written by `save_pretrained`) and the `sam2`
  package's `SAM2VideoPredictor` (a local `.pt` checkpoint and its yaml
  config). Nothing is downloaded; neither needs torchvision: frames are
  resized to the model's square input with torch (bilinear, antialiased) and
  normalised with ImageNet's mean and std, as both SAM 2 implementations do.
- Frames are decoded and preprocessed one at a time when the model asks for
  them (`VideoReader` underneath) and kept on the CPU; the tracking state is
  offloaded to the CPU too (`offload_state=True`). With `bounded_memory`, the
  per-frame memories a model can no longer attend to (further back than
  `num_maskmem` frames and than its object-pointer window) are dropped as
  tracking advances, so memory stays flat however long the video is; this
  changes no mask (tested against keeping everything).
- Objects are grouped by the frame of their prompt; each group is tracked
  forward from that frame to the last tracked frame, then backward to the
  first, and each direction starts from the prompt alone (the forward pass's
  memories are dropped before the backward pass).
- `frames` picks the source frames to track over (default: all); SAM 2 sees
  them as consecutive. Tracking the sampled frames only is what the paper
  does ("SAM 2 ... on sampled video frames", §4.3); `keep` returns a subset.
- Masks are the model's logits resized to the video size (bilinear) and
  thresholded at 0. Bad prompts raise `InputError` naming object and frame.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pixelrefer.errors import InputError
from pixelrefer.video import VideoReader, open_video

# ImageNet statistics: transformers' Sam2VideoVideoProcessor (IMAGENET_DEFAULT_MEAN/STD) and sam2's
# `load_video_frames` both normalise with them; a transformers checkpoint folder may state its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ObjectPrompt:
    """Where one object is on one frame: clicks (with an optional box), a box, or a mask.

    Attributes:
        frame: source frame index the prompt is drawn on.
        points: (x, y) pixel coordinates of clicks.
        labels: 1 (on the object) or 0 (background) per click; default all 1.
        box: (x0, y0, x1, y1) in pixels.
        mask: bool (H, W) mask; not combined with points or a box.
    """

    frame: int
    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    box: Sequence[float] | None = None
    mask: np.ndarray | None = None


@dataclass
class Propagation:
    """Masks of every object on every kept frame.

    Attributes:
        object_ids: one per row of `masks`.
        frame_indices: source frame index of each column of `masks`, ascending.
        masks: bool (N objects, T frames, H, W).
    """

    object_ids: list[int]
    frame_indices: list[int]
    masks: np.ndarray

    def per_object(self) -> list[dict[int, np.ndarray]]:
        """Per object {source frame index: mask}, frames where the mask is empty left out."""
        return [{t: m for t, m in zip(self.frame_indices, rows) if m.any()} for rows in self.masks]


class Sam2Backend(Protocol):
    """What `MaskPropagator` needs from a SAM 2 implementation (`TransformersSam2`, `PackageSam2`)."""

    image_size: int  # the square model input S
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame_dtype: torch.dtype
    window: int  # tracked frames behind the current one that the model can still attend to
    shows_progress: bool  # draws its own progress bar

    def new_state(self, frames: "ModelFrames", size: tuple[int, int]): ...

    def add_prompt(self, state, object_id: int, position: int, prompt: ObjectPrompt, size: tuple[int, int]): ...

    def run(self, state, start: int, reverse: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (position, mask logits (N, 1, h, w)) from `start` to the last (or, reversed, first) frame."""

    def memory(self, state) -> dict:
        """Per object {"cond_frame_outputs": {position: ...}, "non_cond_frame_outputs": {position: ...}}."""


class MaskPropagator:
    """SAM 2 video tracking behind one interface; build it with `from_pretrained`.

    Args:
        backend: a `Sam2Backend` (`TransformersSam2` or `PackageSam2`).
        progress: show a tqdm bar while tracking (the sam2 package always shows its own).
        bounded_memory: drop per-frame memories the model can no longer use (see the module notes).
    """

    def __init__(self, backend: Sam2Backend, *, progress: bool = True, bounded_memory: bool = True):
        self.backend = backend
        self.progress = progress
        self.bounded_memory = bounded_memory

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "transformers", config: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        offload_state: bool = True, **kwargs) -> "MaskPropagator":
        """Load SAM 2 from a local checkpoint.

        Args:
            path: transformers: a folder with `config.json` and weights; sam2: the `.pt` (or
                `.safetensors`) checkpoint.
            backend: "transformers" or "sam2".
            config: sam2 only: a yaml file, or the name of a config shipped with the package
                (e.g. "configs/sam2.1/sam2.1_hiera_t.yaml").
            device, dtype: where and in which precision the model runs (sam2 keeps float32 weights).
            offload_state: keep tracking memories on the CPU.
            **kwargs: `progress`, `bounded_memory`.
        """
        if backend == "transformers":
            return cls(TransformersSam2(path, device, dtype, offload_state), **kwargs)
        if backend == "sam2":
            if config is None:
                raise InputError(f"the sam2 backend needs the yaml config that goes with checkpoint {path}")
            return cls(PackageSam2(path, config, device, offload_state), **kwargs)
        raise ValueError(f"unknown SAM 2 backend {backend!r}: use 'transformers' or 'sam2'")

    def propagate(self, video, prompts, *, frames: Sequence[int] | None = None,
                  keep: Sequence[int] | None = None) -> Propagation:
        """Track every prompted object over `frames` of `video`; return the masks on `keep` (default: `frames`).

        Args:
            video: a `VideoReader`, or anything `open_video` takes (a path, frames in memory, a `Video`).
            prompts: `ObjectPrompt`s (object ids 0, 1, ...) or {object id: ObjectPrompt}.
            frames: source frame indices to track over, e.g. a `SampledVideo`'s `indices`.
        """
        if not isinstance(video, VideoReader):
            with open_video(video) as reader:
                return self.propagate(reader, prompts, frames=frames, keep=keep)
        prompts = _by_id(prompts)
        frames = _tracked(video, frames)
        keep = frames if keep is None else sorted({int(t) for t in keep})
        if not set(keep) <= set(frames):
            raise InputError(f"video {video.source}: frames {sorted(set(keep) - set(frames))} are kept but not tracked")
        ids = list(prompts)
        column = {t: j for j, t in enumerate(keep)}
        masks = np.zeros((len(ids), len(keep), video.height, video.width), dtype=bool)  # (N, T, H, W)
        for t, object_ids, frame_masks in self.iter_masks(video, prompts, frames=frames):
            if t in column:
                masks[[ids.index(i) for i in object_ids], column[t]] = frame_masks
        return Propagation(ids, keep, masks)

    @torch.inference_mode()
    def iter_masks(self, reader: VideoReader, prompts, *, frames: Sequence[int] | None = None) -> Iterator[tuple]:
        """Yield (source frame index, object ids, bool masks (N, H, W)) as tracking goes, in tracking order.

        Objects prompted on different frames are tracked in separate passes, so one frame can come up
        once per group of objects. Nothing but the current frame's masks is held.
        """
        prompts = _by_id(prompts)
        frames = _tracked(reader, frames)
        position = {t: i for i, t in enumerate(frames)}
        groups: dict[int, dict[int, ObjectPrompt]] = {}
        for object_id, prompt in prompts.items():
            _check_prompt(object_id, prompt, reader, position)
            groups.setdefault(position[prompt.frame], {})[object_id] = prompt
        size = (reader.height, reader.width)
        bar = tqdm(total=len(frames) * len(groups), desc="SAM 2 tracking", unit="frame",
                   disable=not self.progress or self.backend.shows_progress)
        with bar:
            for start, group in sorted(groups.items()):
                model_frames = ModelFrames(reader, frames, self.backend.image_size, self.backend.mean,
                                           self.backend.std, self.backend.frame_dtype)
                state = self.backend.new_state(model_frames, size)
                for object_id, prompt in group.items():
                    self.backend.add_prompt(state, object_id, start, prompt, size)
                for reverse in (False, True):
                    for p, logits in self.backend.run(state, start, reverse):
                        if self.bounded_memory:
                            forget_distant_frames(self.backend.memory(state), p, reverse, self.backend.window)
                        if reverse and p == start:
                            continue  # already yielded by the forward pass
                        bar.update()
                        yield frames[p], list(group), _to_masks(logits, size)
                    # differs from sam2's demo, whose backward pass also sees the forward pass's memories: here
                    # both directions start from the prompt alone, so dropping distant memories changes nothing.
                    _forget_tracked_frames(self.backend.memory(state))


class ModelFrames(Sequence):
    """The tracked frames as SAM 2's image encoder takes them, decoded and preprocessed on access.

    Item p is a (3, S, S) CPU tensor: frame `indices[p]` resized to S×S and normalised. Only the last
    frame asked for is kept, so memory does not grow with the video.
    """

    def __init__(self, reader: VideoReader, indices: list[int], size: int, mean, std, dtype: torch.dtype):
        self.reader, self.indices, self.size, self.dtype = reader, indices, size, dtype
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != position:
            self._cached = (position, self.preprocess(self.reader[self.indices[position]]))
        return self._cached[1]

    def preprocess(self, frame: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) → normalised (3, S, S)."""
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        # Bilinear as transformers' Sam2VideoVideoProcessor; differs from sam2's own loader (PIL's bicubic).
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return ((x[0] - self.mean) / self.std).to(self.dtype)


# ----------------------------------------------------------------------------- backends


class TransformersSam2:
    """transformers' `Sam2VideoModel` with a hand-built `Sam2VideoInferenceSession` (no processor: no torchvision)."""

    shows_progress = False

    def __init__(self, path, device, dtype, offload_state: bool):
        from transformers import Sam2VideoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise InputError(f"SAM 2 checkpoint folder {path} has no config.json (nothing is downloaded: "
                             "give a local folder written by Sam2VideoModel.save_pretrained)")
        self.model = Sam2VideoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.frame_dtype = torch.device(device), dtype
        self.state_device = torch.device("cpu") if offload_state else self.device
        self.image_size = int(self.model.config.image_size)
        self.mean, self.std = _preprocessor_stats(path)
        config = self.model.config
        self.window = max(config.num_maskmem, config.max_object_pointers_in_encoder)

    def new_state(self, frames: ModelFrames, size):
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        session = Sam2VideoInferenceSession(video_height=size[0], video_width=size[1], inference_device=self.device,
                                            inference_state_device=self.state_device, video_storage_device="cpu",
                                            dtype=self.frame_dtype)
        session.processed_frames = frames  # read as session.processed_frames[p] and len(): lazy frames fit
        return session

    def add_prompt(self, session, object_id: int, position: int, prompt: ObjectPrompt, size) -> None:
        index = session.obj_id_to_idx(object_id)
        if prompt.mask is not None:
            mask = torch.as_tensor(np.asarray(prompt.mask), dtype=torch.float32)[None, None]
            mask = F.interpolate(mask, size=(self.image_size, self.image_size), mode="bilinear",
                                 align_corners=False, antialias=True)
            session.add_mask_inputs(index, position, (mask >= 0.5).float())
        else:
            coords, labels = _points_and_labels(prompt)
            scale = torch.tensor([self.image_size / size[1], self.image_size / size[0]])
            session.add_point_inputs(index, position, {"point_coords": (coords * scale)[None, None],  # (1, 1, P, 2)
                                                       "point_labels": labels[None, None]})
        session.obj_with_new_inputs = [*session.obj_with_new_inputs, object_id]

    def run(self, session, start: int, reverse: bool):
        for output in self.model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
            yield output.frame_idx, output.pred_masks  # (N, 1, S/4, S/4) logits

    def memory(self, session) -> dict:
        return session.output_dict_per_obj


class PackageSam2:
    """The `sam2` package's `SAM2VideoPredictor`, built from a yaml config without hydra's global search path."""

    shows_progress = True  # its propagate_in_video always draws a tqdm bar
    frame_dtype = torch.float32  # sam2 casts frames to float32 and runs reduced precision under autocast
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, checkpoint, config, device, offload_state: bool):
        self.predictor = _build_sam2_predictor(Path(checkpoint), config).to(device).eval()
        self.offload_state = offload_state
        self.image_size = int(self.predictor.image_size)
        p = self.predictor
        self.window = max(p.memory_temporal_stride_for_eval * (p.num_maskmem + 1), p.max_obj_ptrs_in_encoder)

    def new_state(self, frames: ModelFrames, size):
        from unittest import mock

        from sam2 import sam2_video_predictor

        # `init_state` reads frames only through `load_video_frames`; handing it our lazy frames keeps
        # every other part of the state exactly as sam2 builds it.
        with mock.patch.object(sam2_video_predictor, "load_video_frames", lambda **_: (frames, *size)):
            return self.predictor.init_state(video_path="", offload_video_to_cpu=True,
                                             offload_state_to_cpu=self.offload_state)

    def add_prompt(self, state, object_id: int, position: int, prompt: ObjectPrompt, size) -> None:
        if prompt.mask is not None:
            self.predictor.add_new_mask(state, position, object_id, torch.as_tensor(np.asarray(prompt.mask, bool)))
            return
        coords, labels = _points_and_labels(prompt, with_box=False)
        box = None if prompt.box is None else torch.tensor(prompt.box, dtype=torch.float32)
        self.predictor.add_new_points_or_box(state, position, object_id, points=coords if len(coords) else None,
                                             labels=labels if len(labels) else None, box=box)

    def run(self, state, start: int, reverse: bool):
        for position, _, masks in self.predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
            yield position, masks  # (N, 1, H, W) logits at the video size

    def memory(self, state) -> dict:
        return state["output_dict_per_obj"]


def _build_sam2_predictor(checkpoint: Path, config):
    """`SAM2VideoPredictor` from a yaml config and a checkpoint, with the video settings sam2's builder applies."""
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config_path = Path(config) if Path(config).is_file() else Path(sam2.__file__).parent / str(config)
    if not config_path.is_file():
        raise InputError(f"sam2 config {config} is neither a file nor a config shipped with the sam2 package")
    if not checkpoint.is_file():
        raise InputError(f"sam2 checkpoint {checkpoint} does not exist (nothing is downloaded)")
    cfg = OmegaConf.load(config_path)
    # The settings sam2's `build_sam2_video_predictor` adds (its `apply_postprocessing`); hole filling needs
    # sam2's compiled extension, so it is off where that was not built (a CPU install).
    video_settings = {
        "model._target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
        "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
        "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
        "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
        "model.binarize_mask_from_pts_for_mem_enc": True,
        "model.fill_hole_area": 8 if _importable("sam2._C") else 0,
    }
    for key, value in video_settings.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.resolve(cfg)
    predictor = instantiate(cfg.model, _recursive_=True)
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(checkpoint)
    else:  # sam2 releases .pt files holding {"model": state_dict}; weights_only refuses pickled code
        weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    try:
        predictor.load_state_dict(weights)
    except RuntimeError as exc:
        raise InputError(f"sam2 checkpoint {checkpoint} does not match config {config}: {exc}") from exc
    return predictor


# ----------------------------------------------------------------------------- helpers


def forget_distant_frames(memory: dict, position: int, reverse: bool, window: int) -> None:
    """Drop tracked (non-prompt) frame outputs `window` or more frames behind `position` in tracking order."""
    for per_object in memory.values():
        tracked = per_object["non_cond_frame_outputs"]
        for t in [t for t in tracked if (t - position if reverse else position - t) >= window]:
            del tracked[t]


def _forget_tracked_frames(memory: dict) -> None:
    for per_object in memory.values():
        per_object["non_cond_frame_outputs"].clear()


def _to_masks(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, 1, h, w) logits → bool (N, H, W) at the video size.

    One bilinear resize; transformers' `post_process_masks` goes through S×S first (the same up to rounding).
    """
    logits = logits.float()
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return (logits[:, 0] > 0).cpu().numpy()


def _tracked(reader: VideoReader, frames: Sequence[int] | None) -> list[int]:
    """Sorted distinct source frame indices to track over (all frames by default), each checked."""
    frames = range(reader.num_frames) if frames is None else frames
    tracked = sorted({reader.check_index(t) for t in frames})
    if not tracked:
        raise InputError(f"video {reader.source}: no frames to track")
    return tracked


def _by_id(prompts) -> dict[int, ObjectPrompt]:
    if isinstance(prompts, ObjectPrompt):
        prompts = [prompts]
    prompts = dict(prompts) if isinstance(prompts, Mapping) else dict(enumerate(prompts))
    if not prompts:
        raise InputError("no object prompts: give at least one ObjectPrompt (points, a box or a mask)")
    return prompts


def _check_prompt(object_id: int, prompt: ObjectPrompt, reader: VideoReader, position: dict[int, int]) -> None:
    where = f"video {reader.source}, object {object_id}, frame {prompt.frame}"
    if not isinstance(prompt, ObjectPrompt):
        raise InputError(f"video {reader.source}, object {object_id}: "
                         f"expected an ObjectPrompt, got {type(prompt).__name__}")
    if prompt.frame not in position:
        raise InputError(f"{where}: the prompt's frame is not among the tracked frames")
    if prompt.points is None and prompt.box is None and prompt.mask is None:
        raise InputError(f"{where}: the prompt has no points, box or mask")
    height, width = reader.height, reader.width
    if prompt.mask is not None:
        mask = np.asarray(prompt.mask)
        if prompt.points is not None or prompt.box is not None:
            raise InputError(f"{where}: give a mask or points/box, not both")
        if mask.shape != (height, width):
            raise InputError(f"{where}: mask is {mask.shape}, the video is {height}x{width}")
        if not mask.any():
            raise InputError(f"{where}: mask is empty")
    if prompt.points is not None:
        points = np.asarray(prompt.points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
            raise InputError(f"{where}: points must be a non-empty list of (x, y), got shape {points.shape}")
        _check_inside(points, height, width, where)
        labels = np.ones(len(points)) if prompt.labels is None else np.asarray(prompt.labels)
        if labels.shape != (len(points),) or not np.isin(labels, (0, 1)).all():
            raise InputError(f"{where}: labels must be one 0 or 1 per point, got {prompt.labels}")
    if prompt.box is not None:
        box = np.asarray(prompt.box, dtype=np.float64)
        if box.shape != (4,) or not (box[0] < box[2] and box[1] < box[3]):
            raise InputError(f"{where}: box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {prompt.box}")
        _check_inside(box.reshape(2, 2), height, width, where)


def _check_inside(points: np.ndarray, height: int, width: int, where: str) -> None:
    outside = ~np.isfinite(points).all(1) | (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (
        points[:, 1] > height)
    if outside.any():
        x, y = points[outside][0]
        raise InputError(f"{where}: point (x={x}, y={y}) lies outside the frame (height {height}, width {width})")


def _points_and_labels(prompt: ObjectPrompt, with_box: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks as (P, 2) float and (P,) int32; a box becomes two leading points labelled 2 and 3 (SAM's convention)."""
    coords = torch.tensor(np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)) if prompt.points is not None \
        else torch.zeros(0, 2)
    labels = torch.ones(len(coords), dtype=torch.int32) if prompt.labels is None \
        else torch.tensor(np.asarray(prompt.labels), dtype=torch.int32)
    if with_box and prompt.box is not None:
        coords = torch.cat([torch.tensor(prompt.box, dtype=torch.float32).view(2, 2), coords])
        labels = torch.cat([torch.tensor([2, 3], dtype=torch.int32), labels])
    return coords, labels


def _preprocessor_stats(path: Path) -> tuple[tuple, tuple]:
    """image_mean / image_std from a checkpoint folder's preprocessor config, else ImageNet's."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            stats = json.loads((path / name).read_text())
            if "image_mean" in stats and "image_std" in stats:
                return tuple(stats["image_mean"]), tuple(stats["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
