"""`PixelReferProcessor`: prompts, images, videos and masks → model inputs.

Notable:
- Qwen2.5 chat format (REFERENCE §4): `<|im_start|>{role}\\n{content}<|im_end|>\\n`;
  only assistant content and its `<|im_end|>` are supervised.
- Each lower-case `<region>` in user text takes the next mask, in order, and
  becomes `[` + `<REGION>`×k + `]` (one unit per object, or per object-frame
  in a video; Lite writes `Time t:` before each video unit).
- Vision-Object prompts get `<image>` (or per-frame `<video>`) tokens, one per
  vision token (video tokens pruned by frame difference, as VideoLLaMA3
  does); Object-Only prompts carry no global vision tokens at all.
- Every object becomes an `ObjectCrop` (regions.py: Eq. 2 scaling, contextual
  padding, cell mask, Eq. 4 positions); all crops of a batch are packed
  NaViT-style, so the model encodes them in one vision-encoder call.
- An object with fewer foreground cells than n keeps n slots and the empty
  ones get attention_mask 0 (or, with `release_variable_token_count`, only
  as many slots as cells).
- `encode()` also returns where every token group sits (`TokenSpan`), which
  the attention analyses use instead of guessing from ids.
- `release_prompt_format` reproduces the release's prompts token for token
  (converted checkpoints set it): the text between two special-token runs is
  tokenized as one string (a BPE token may then span two groups; it counts
  for the group it starts in), user text is stripped around the modal tag,
  and a Lite video object is `[Time 0.0:<REGION>…,Time 0.5:<REGION>…]`.
- Bad input raises `InputError` naming the sample / object / frame.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

from pixelrefer import regions
from pixelrefer.config import PixelReferConfig
from pixelrefer.errors import InputError
from pixelrefer.tokenizer import build_tokenizer, is_word_level, tidy_spacing

REGION_PLACEHOLDER = "<region>"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # VideoLLaMA3's normalisation
IGNORE_INDEX = -100
_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class Video:
    """Decoded video frames (PIL images or (H, W, 3) arrays) with their times in seconds."""

    frames: list
    timestamps: list[float] | None = None
    fps: float = 1.0

    def times(self) -> list[float]:
        if self.timestamps is not None:
            if len(self.timestamps) != len(self.frames):
                raise InputError(f"video has {len(self.frames)} frames but {len(self.timestamps)} timestamps")
            return [float(t) for t in self.timestamps]
        return [i / self.fps for i in range(len(self.frames))]


@dataclass
class TokenSpan:
    """A run of tokens of one group in one sample: [start, end) in the padded batch."""

    group: str  # "system" | "template" | "text" | "vision" | "object" | "answer"
    start: int
    end: int
    object_index: int | None = None  # index of the object within its sample
    frame_index: int | None = None


@dataclass
class EncodedBatch:
    """Model inputs plus the bookkeeping the analyses need."""

    inputs: BatchFeature
    spans: list[list[TokenSpan]]  # per sample
    crops: list[list[regions.ObjectCrop]] = field(default_factory=list)  # per sample, per object unit


def to_rgb_array(image, where: str) -> np.ndarray:
    """PIL image or array (H, W), (H, W, 3|4), float in [0, 1] or integer → uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"{where}: image has zero size {image.size}")
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise InputError(f"{where}: expected a PIL image or an array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)  # CHW → HWC
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise InputError(f"{where}: image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{where}: image has zero size {image.shape[:2]}")
    if np.issubdtype(image.dtype, np.floating):
        if np.isnan(image).any():
            raise InputError(f"{where}: image has NaN pixels")
        scale = 255.0 if image.max() <= 1.0 else 1.0
        image = np.clip(image * scale, 0, 255).round().astype(np.uint8)
    image = image.astype(np.uint8, copy=False)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """VideoLLaMA3's resize rule: sides multiples of `factor`, area within [min, max] pixels."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(image: np.ndarray, patch: int, merge: int = 1) -> np.ndarray:
    """uint8 (H, W, 3) → normalised patches (H/p · W/p, 3·p·p), merge blocks contiguous (VideoLLaMA3 order)."""
    x = (image.astype(np.float32) / 255.0 - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    x = x.transpose(2, 0, 1)  # (3, H, W)
    c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, 3, p, p)
    return x.reshape(gh * gw, c * patch * patch)


def frame_difference_mask(pixels: np.ndarray, frames: int, merge: int, threshold: float) -> np.ndarray:
    """VideoLLaMA3's token pruning: keep a merged token only where it changed since the previous frame.

    pixels: (T·gh·gw, 3·p·p) normalised patches, merge blocks contiguous. Returns (T, gh·gw/m²) bool;
    the first frame is kept whole and every frame keeps at least one token.
    """
    tokens = pixels.reshape(frames, -1, merge * merge * pixels.shape[-1])  # (T, tokens, m²·3·p·p)
    change = np.abs(np.diff(tokens, axis=0)).mean(-1) * 255  # (T-1, tokens)
    keep = np.concatenate([np.ones_like(change[:1], dtype=bool), change > threshold])
    empty = ~keep.any(1)
    keep[empty, 0] = True
    return keep


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


class PixelReferProcessor:
    """Turns (prompt, image | video, masks) samples into `PixelReferForConditionalGeneration` inputs.

    Args:
        tokenizer: a tokenizer holding `<REGION>`, `<image>`, `<video>` and the chat tokens.
        config: the model's `PixelReferConfig` (framework, n, Eq. 2 constants, OCI sizes).
    """

    def __init__(self, tokenizer, config: PixelReferConfig):
        self.tokenizer = tokenizer
        self.config = config
        for name, token in (("region_token_id", "<REGION>"), ("image_token_id", "<image>"), ("video_token_id", "<video>")):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id != getattr(config, name):
                raise ValueError(f"tokenizer maps {token} to {token_id} but config.{name} is {getattr(config, name)}")

    @classmethod
    def from_preset(cls, name: str, **config_overrides) -> "PixelReferProcessor":
        """Processor for a preset; its tokenizer is the built-in word-level one (no download)."""
        return cls(build_tokenizer(), PixelReferConfig.from_preset(name, **config_overrides))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PixelReferProcessor":
        return cls(AutoTokenizer.from_pretrained(path), PixelReferConfig.from_pretrained(path))

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.config.save_pretrained(path)

    def __call__(self, text=None, images=None, videos=None, masks=None, return_tensors="pt", **kwargs) -> BatchFeature:
        return self.encode(text, images=images, videos=videos, masks=masks, **kwargs).inputs

    def decode(self, token_ids, **kwargs) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True, **kwargs).strip()
        return tidy_spacing(text) if is_word_level(self.tokenizer) else text

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    # ------------------------------------------------------------------ inputs
    def encode(self, text, images=None, videos=None, masks=None, add_generation_prompt: bool | None = None) -> EncodedBatch:
        """Like `__call__`, also returning token spans and object crops.

        `text` is a prompt string, a conversation (list of {"role", "content"}
        or {"from", "value"} turns) or a list of either (a batch). `images`,
        `videos` and `masks` follow: one image/video and one list of masks per
        sample (for a video, each mask is {frame_index: mask}).
        """
        batched = isinstance(text, (list, tuple)) and len(text) > 0 and not isinstance(text[0], dict)
        texts = list(text) if batched else [text]
        count = len(texts)
        images = self._per_sample(images, count, batched, "images")
        videos = self._per_sample(videos, count, batched, "videos")
        masks = self._per_sample(masks, count, batched, "masks")
        samples = [
            self._encode_sample(i, texts[i], images[i], videos[i], masks[i], add_generation_prompt) for i in range(count)
        ]
        return self._collate(samples)

    @staticmethod
    def _per_sample(value, count: int, batched: bool, name: str) -> list:
        if value is None:
            return [None] * count
        if not batched:
            return [value]
        if not isinstance(value, (list, tuple)) or len(value) != count:
            raise InputError(f"{name}: a batch of {count} prompts needs a list of {count} {name}")
        return list(value)

    def _turns(self, text, where: str) -> list[tuple[str, str]]:
        if isinstance(text, str):
            return [("user", text)]
        if not isinstance(text, (list, tuple)) or not text:
            raise InputError(f"{where}: text must be a string or a list of turns, got {type(text).__name__}")
        turns = []
        for j, turn in enumerate(text):
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if role not in _ROLES or not isinstance(content, str):
                raise InputError(f"{where}, turn {j}: needs a role in {sorted(_ROLES)} and string content")
            turns.append((_ROLES[role], content))
        return turns

    def _encode_sample(self, index, text, image, video, masks, add_generation_prompt):
        where = f"sample {index}"
        if image is not None and video is not None:
            raise InputError(f"{where}: give an image or a video, not both")
        turns = self._turns(text, where)
        frames, times = self._frames(image, video, where)
        masks = [] if masks is None else list(masks)
        n_regions = sum(content.count(REGION_PLACEHOLDER) for role, content in turns if role != "assistant")
        if n_regions != len(masks):
            raise InputError(f"{where}: prompt has {n_regions} {REGION_PLACEHOLDER} but {len(masks)} masks were given")
        if masks and frames is None:
            raise InputError(f"{where}: masks were given without an image or video")
        units = self._object_units(masks, frames, video is not None, where)
        if add_generation_prompt is None:
            add_generation_prompt = turns[-1][0] != "assistant"
        pieces = self._pieces(turns, frames, video is not None, units, add_generation_prompt)
        return self._tokenize(pieces, frames, times, video is not None, units)

    def _frames(self, image, video, where):
        """The sample's frames as uint8 arrays, and their times (None for an image)."""
        if image is not None:
            return [to_rgb_array(image, f"{where}, image")], None
        if video is None:
            return None, None
        if not isinstance(video, Video):
            video = Video(list(video))
        if not video.frames:
            raise InputError(f"{where}: video has no frames")
        frames = [to_rgb_array(f, f"{where}, frame {t}") for t, f in enumerate(video.frames)]
        if len({f.shape for f in frames}) > 1:
            raise InputError(f"{where}: video frames differ in size: {sorted({f.shape for f in frames})}")
        return frames, video.times()

    def _object_units(self, masks, frames, is_video, where):
        """One `ObjectCrop` per object (image) or per (object, frame) (video), in prompt order."""
        cfg = self.config
        units = []
        for k, spec in enumerate(masks):
            per_frame = spec if is_video else {0: spec}
            if is_video and (not isinstance(spec, dict) or not spec):
                raise InputError(f"{where}, object {k}: a video mask must be a non-empty {{frame_index: mask}} dict")
            crops = []
            for frame_index in sorted(per_frame, key=int):
                t = int(frame_index)
                if not 0 <= t < len(frames):
                    raise InputError(f"{where}, object {k}: frame index {t} is out of range (video has {len(frames)} frames)")
                image = frames[t]
                label = f"{where}, object {k}" + (f", frame {t}" if is_video else "")
                mask = regions.decode_mask(per_frame[frame_index], image.shape[0], image.shape[1], where=label)
                crop = regions.crop_object(
                    image,
                    mask,
                    patch=cfg.patch_size,
                    num_tokens=cfg.num_object_tokens,
                    downscale_threshold=cfg.downscale_threshold,
                    context_patches=cfg.context_padding_patches,
                    max_scale=cfg.max_scale,
                    max_crop_pixels=cfg.max_crop_pixels,
                    dynamic_scaling=cfg.use_dynamic_scaling,
                    swapped_axes=cfg.release_swapped_position_axes,
                )
                crops.append((t, crop))
            units.append(crops)
        return units

    def _valid_tokens(self, crop: regions.ObjectCrop) -> int:
        return min(int(crop.cell_mask.sum()), self.config.tokens_per_object)

    def _pieces(self, turns, frames, is_video, units, add_generation_prompt):
        """The sample as (group, text, object_index, frame_index) pieces, placeholders still compact."""
        cfg = self.config
        pieces = []
        object_iter = iter(range(len(units)))
        vision_done = frames is None or cfg.is_lite
        for role, content in turns:
            pieces.append(("template", f"<|im_start|>{role}\n", None, None))
            group = {"system": "system", "user": "text", "assistant": "answer"}[role]
            if role == "user" and not vision_done:
                content = content.replace("<image>", "").replace("<video>", "")
                pieces.append(("vision", None, None, None))
                vision_done = True
            elif cfg.is_lite:
                content = content.replace("<image>", "").replace("<video>", "")
            if role == "user" and cfg.release_prompt_format:
                content = content.strip()  # the release strips user text around the modal tag
            parts = re.split(f"({re.escape(REGION_PLACEHOLDER)})", content) if role != "assistant" else [content]
            for part in parts:
                if part == REGION_PLACEHOLDER:
                    pieces.append(("object", None, next(object_iter), None))
                elif part:
                    pieces.append((group, part, None, None))
            pieces.append(("answer" if role == "assistant" else "template", "<|im_end|>", None, None))
            pieces.append(("template", "\n", None, None))
        if add_generation_prompt:
            pieces.append(("template", "<|im_start|>assistant\n", None, None))
        return pieces

    def _tokenize(self, pieces, frames, times, is_video, units):
        cfg = self.config
        tok = self.tokenizer
        ids, labels, attention, spans = [], [], [], []

        pending = []  # (group, text, supervised): text waiting to be tokenized as one string

        def emit(group, token_ids, supervised=False, obj=None, frame=None, attend=None):
            start = len(ids)
            ids.extend(token_ids)
            labels.extend(token_ids if supervised else [IGNORE_INDEX] * len(token_ids))
            attention.extend(attend if attend is not None else [1] * len(token_ids))
            if token_ids:
                spans.append(TokenSpan(group, start, len(ids), obj, frame))

        def flush():
            for group, token_ids, supervised in self._merged_text_ids(pending):
                emit(group, token_ids, supervised)
            pending.clear()

        def add(group, token_ids, obj=None, frame=None, attend=None):
            flush()
            emit(group, token_ids, obj=obj, frame=frame, attend=attend)

        def add_text(group, text, supervised=False):
            if cfg.release_prompt_format:
                pending.append((group, text, supervised))
            else:
                emit(group, tok(text, add_special_tokens=False)["input_ids"], supervised)

        vision = self._vision_inputs(frames, is_video) if frames is not None and not cfg.is_lite else {}
        for group, text, obj, _ in pieces:
            if group == "vision":
                for t, count in enumerate(vision["tokens_per_frame"]):
                    if is_video:
                        add_text("template", f"Time {times[t]:.1f}s:")
                    token = cfg.video_token_id if is_video else cfg.image_token_id
                    add("vision", [token] * count, frame=t if is_video else None)
                    add_text("template", "," if is_video and t + 1 < len(vision["tokens_per_frame"]) else "\n")
            elif group == "object":
                for k, (t, crop) in enumerate(units[obj]):
                    before, after = self._unit_affixes(k, len(units[obj]), times[t] if is_video else None)
                    for affix in before:
                        add_text("template", affix)
                    valid = self._valid_tokens(crop)
                    slots = valid if cfg.release_variable_token_count else cfg.tokens_per_object
                    add("object", [cfg.region_token_id] * slots, obj=obj, frame=t if is_video else None,
                        attend=[1] * valid + [0] * (slots - valid))
                    for affix in after:
                        add_text("template", affix)
            else:
                add_text(group, text, supervised=group == "answer")
        flush()
        return dict(ids=ids, labels=labels, attention=attention, spans=spans, vision=vision, units=units, frames=frames,
                    is_video=is_video)

    def _unit_affixes(self, index: int, count: int, time: float | None) -> tuple[list[str], list[str]]:
        """Text before and after the `index`-th of an object's `count` units (time None for an image)."""
        if time is None or not self.config.is_lite:
            return ["["], ["]"]
        stamp = f"Time {time:.1f}:"
        if not self.config.release_prompt_format:
            return [stamp, "["], ["]"]
        # The release writes one bracket per object: [Time 0.0:<REGION>…,Time 0.5:<REGION>…].
        return [("[" if index == 0 else ",") + stamp], ["]"] if index == count - 1 else []

    def _merged_text_ids(self, pieces: list) -> list[tuple[str, list[int], bool]]:
        """Tokenize (group, text, supervised) pieces as ONE string, as the release does.

        Returns (group, token_ids, supervised) runs; a token belongs to the piece its first character is in.
        """
        if not pieces:
            return []
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("release_prompt_format needs a fast tokenizer (it maps tokens back to text offsets)")
        encoded = self.tokenizer("".join(p[1] for p in pieces), add_special_tokens=False, return_offsets_mapping=True)
        ends = np.cumsum([len(p[1]) for p in pieces])
        runs: list[tuple[str, list[int], bool]] = []
        previous = None
        for token_id, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            owner = min(int(np.searchsorted(ends, start, side="right")), len(pieces) - 1)
            if owner != previous:
                runs.append((pieces[owner][0], [], pieces[owner][2]))
                previous = owner
            runs[-1][1].append(token_id)
        return runs

    def _vision_inputs(self, frames, is_video) -> dict:
        """Vision-Object global inputs: an image at merge 1, or video frames at merge 2 (VideoLLaMA3)."""
        cfg = self.config
        merge = cfg.video_merge_size if is_video else 1
        height, width = smart_resize(
            frames[0].shape[0], frames[0].shape[1], cfg.patch_size * merge, cfg.image_min_pixels, cfg.image_max_pixels
        )
        pixels = np.concatenate([patchify(resize_image(f, height, width), cfg.patch_size, merge) for f in frames])
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        keep = np.ones((len(frames), gh * gw // merge**2), dtype=bool)
        if is_video and cfg.video_compression_threshold is not None:
            keep = frame_difference_mask(pixels, len(frames), merge, cfg.video_compression_threshold)
        return dict(
            pixel_values=pixels,
            grid_thw=[len(frames), gh, gw],
            merge_size=merge,
            keep=keep,
            tokens_per_frame=keep.sum(1).tolist(),
        )

    def _collate(self, samples) -> EncodedBatch:
        """Left-pad token rows and pack every sample's vision and region inputs in order."""
        cfg = self.config
        length = max(len(s["ids"]) for s in samples)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        spans = []
        for b, s in enumerate(samples):
            offset = length - len(s["ids"])
            input_ids[b, offset:] = torch.tensor(s["ids"], dtype=torch.long)
            labels[b, offset:] = torch.tensor(s["labels"], dtype=torch.long)
            attention_mask[b, offset:] = torch.tensor(s["attention"], dtype=torch.long)
            spans.append([TokenSpan(sp.group, sp.start + offset, sp.end + offset, sp.object_index, sp.frame_index)
                          for sp in s["spans"]])
        data = dict(input_ids=input_ids, attention_mask=attention_mask)
        if (labels != IGNORE_INDEX).any():
            data["labels"] = labels
        for key, is_video in (("", False), ("_videos", True)):
            vision = [s["vision"] for s in samples if s["vision"] and s["is_video"] == is_video]
            if vision:
                prefix = "video" if is_video else "image"
                data[f"pixel_values{key}"] = torch.from_numpy(np.concatenate([v["pixel_values"] for v in vision]))
                data[f"{prefix}_grid_thw"] = torch.tensor([v["grid_thw"] for v in vision], dtype=torch.long)
                data[f"{prefix}_merge_sizes"] = torch.tensor([v["merge_size"] for v in vision], dtype=torch.long)
                if is_video:
                    data["video_compression_mask"] = torch.from_numpy(np.concatenate([v["keep"].ravel() for v in vision]))
        data.update(self._region_inputs(samples))
        crops = [[crop for unit in s["units"] for _, crop in unit] for s in samples]
        return EncodedBatch(BatchFeature(data=data), spans, crops)

    def _region_inputs(self, samples) -> dict:
        """Packed crops of every (object, frame) unit of the batch, in placeholder order, and each unit's frame in its
        clip (`region_frame_index`, -1 for an image unit; read by the object time embedding)."""
        cfg = self.config
        patch = cfg.patch_size
        pixels, grids, cell_mask, positions, token_valid, frame_index = [], [], [], [], [], []
        local, global_pixels, global_index, global_rows = [], [], [], {}
        for b, s in enumerate(samples):
            for unit in s["units"]:
                for t, crop in unit:
                    gh, gw = crop.grid
                    pixels.append(patchify(crop.pixels, patch))
                    grids.append([1, gh, gw])
                    cell_mask.append(crop.cell_mask.reshape(-1))
                    positions.append(crop.positions.reshape(-1, 2))
                    valid = np.zeros(cfg.tokens_per_object, dtype=bool)
                    valid[: self._valid_tokens(crop)] = True
                    token_valid.append(valid)
                    frame_index.append(t if s["is_video"] else -1)
                    if cfg.is_lite:
                        frame = s["frames"][t]
                        local.append(patchify(regions.local_crop(frame, crop.box, cfg.oci_local_size), patch))
                        if (b, t) not in global_rows:  # each distinct image / frame encoded once
                            global_rows[(b, t)] = len(global_pixels)
                            size = cfg.oci_global_size
                            global_pixels.append(patchify(resize_image(frame, size, size), patch))
                        global_index.append(global_rows[(b, t)])
        if not pixels:
            return {}
        data = dict(
            region_pixel_values=torch.from_numpy(np.concatenate(pixels)),
            region_grid_thw=torch.tensor(grids, dtype=torch.long),
            region_cell_mask=torch.from_numpy(np.concatenate(cell_mask)),
            region_cell_positions=torch.from_numpy(np.concatenate(positions).astype(np.float32)),
            region_token_valid=torch.from_numpy(np.stack(token_valid)),
            region_frame_index=torch.tensor(frame_index, dtype=torch.long),
        )
        if cfg.is_lite:
            data.update(
                region_local_pixel_values=torch.from_numpy(np.concatenate(local)),
                region_global_pixel_values=torch.from_numpy(np.concatenate(global_pixels)),
                region_global_index=torch.tensor(global_index, dtype=torch.long),
            )
        return data
