"""Benchmark files → `Query`s: one question to a model, with its media, masks and reference answer.

    load_queries("lvis", "lvis_val_1k_category.json", media_root="coco/")   category (SSim / SIoU)
    load_queries("paco", ...)                                                category, part-level prompt
    load_queries("vg", "vg_val_5000.json", ...)                              short captions
    load_queries("hc-stvg", "hc_stvg_val.json", ...)                         video captions
    load_queries("videorefer-d", "VideoRefer-Bench-D.json", ...)             judged video descriptions
    load_queries("videorefer-q", "VideoRefer-Bench-Q.json", ...)             multiple choice
    load_queries("shapesworld", "shapesworld/")                              every ShapesWorld task

Notable:
- Released layouts (read off the release's evaluation scripts): LVIS/PACO
  (Osprey) records hold `file_name`, `height`, `width`, `categories` and
  `annotations[k].segmentation` (COCO RLE or polygons), one query per
  object; VG records hold `image`, `caption` and `boxes` ([x, y, w, h]);
  HC-STVG and VideoRefer-Bench-D records hold `video`, `frame_idx`, the
  mask (`mask`, or `annotation` as [{frame: {"segmentation": rle}}]) and
  `caption`; all-frame files (the Lite variants) are PixelRefer training
  records. Each becomes a PixelRefer record and goes through
  `pixelrefer.data`'s own parser; Bench-Q and ShapesWorld files are read by
  `load_annotations` as they are.
- The question is the release's prompt for each benchmark (`Benchmark.prompt`)
  unless the record carries its own conversation; `prompt=` overrides it.
- VG regions are the record's box, as the release evaluates them (its mask
  decoding is disabled); the box is clamped to the image.
- Video masks that are empty on a frame are dropped (the release skips them);
  `key_frame_only=True` keeps one frame per object, the record's
  `frame_idx` where it has one (PixelRefer's single-frame "S" mode).
  Differs from the release: a video file is read at its annotated frames
  only (the release samples the whole video at 1 fps around them).
- A multi-turn record gives one query per answered user turn; the prompt is
  the conversation up to that turn with the reference answers of the
  earlier turns (teacher forcing, the context the model was trained on),
  and the masks its `<region>`s have used so far. Its id is `{id}#{n}`.
- Every bad record is reported at once, by file and record index; no record
  is skipped or replaced silently. Duplicate query ids are an error too,
  since results are resumed by id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pixelrefer.data import load_annotations
from pixelrefer.data.formats import parse_record, read_records
from pixelrefer.data.sample import REGION, Sample, SampleInputs
from pixelrefer.errors import InputError

# Which metric family scores a task; tasks not listed are scored as captions.
TASK_METRICS = {
    "category": "category", "part": "category",
    "short_caption": "caption", "detailed_caption": "caption", "video_caption": "caption",
    "relation": "exact", "comparison": "exact", "counting": "exact", "location": "exact", "video_location": "exact",
    "video_last_location": "exact", "video_short_answer": "exact",
    "multiple_choice": "choice", "image_choice": "choice", "video_description": "description",
}
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


@dataclass
class Query:
    """One question put to a model: the asked user turn of a sample, and the answer it is scored against."""

    id: str
    benchmark: str
    sample: Sample
    turn: int  # index of the asked user turn in `sample.conversation`
    reference: str

    @property
    def task(self) -> str:
        return self.sample.task or "caption"

    @property
    def metric(self) -> str:
        return TASK_METRICS.get(self.task, "caption")

    @property
    def where(self) -> str:
        return self.sample.where

    @property
    def prompt(self) -> list[dict[str, str]]:
        return self.sample.conversation[: self.turn + 1]

    @property
    def question(self) -> str:
        return self.prompt[-1]["content"]

    def load(self) -> SampleInputs:
        """The prompt, the media and the masks of the prompt's `<region>`s; errors name the query and record."""
        try:
            _, image, video, masks = self.sample.load_media()
        except InputError as exc:
            raise InputError(f"{self.benchmark} query {self.id!r}: {exc}") from None
        used = sum(t["content"].count(REGION) for t in self.prompt if t["role"] != "assistant")
        return SampleInputs(self.prompt, image, video, masks[:used])

    def result(self, prediction: str) -> dict:
        """The JSONL record of this query's answer."""
        meta = self.sample.meta
        record = dict(id=self.id, where=self.where, task=self.task, metric=self.metric,
                      question=self.question, prediction=prediction, reference=self.reference)
        if self.metric == "choice":
            record.update(type=meta.get("type", ""), options=meta.get("options"))
        return record


def queries_of(sample: Sample, benchmark: str) -> list[Query]:
    """One query per user turn that is followed by an answer."""
    turns = sample.conversation
    asked = [k for k in range(len(turns) - 1) if turns[k]["role"] == "user" and turns[k + 1]["role"] == "assistant"]
    if not asked:
        raise InputError(f"{sample.where}: the record has no answered question to score against")
    return [Query(sample.id if len(asked) == 1 else f"{sample.id}#{n}", benchmark, sample, k, turns[k + 1]["content"])
            for n, k in enumerate(asked)]


# ----------------------------------------------------------------------------- released layouts → records


def _conversation(tag: str, question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{tag}\n{question}"}, {"from": "gpt", "value": answer}]


def _find_image(root: Path, name: str) -> str:
    """COCO images may sit in the root or in its train2017/val2017 folders: the first that exists."""
    for folder in ("", "train2017", "val2017"):
        if (root / folder / name).exists():
            return str(root / folder / name)
    return name


def _category_records(raw: dict, index: int, stem: str, root: Path, prompt: str) -> list[dict]:
    for key in ("file_name", "height", "width", "categories", "annotations"):
        if key not in raw:
            raise InputError(f"a category record needs 'file_name', 'height', 'width', 'categories' and "
                             f"'annotations'; '{key}' is missing")
    if len(raw["categories"]) != len(raw["annotations"]):
        raise InputError(f"{len(raw['categories'])} categories but {len(raw['annotations'])} annotations")
    image = _find_image(root, raw["file_name"])
    return [dict(id=f"{stem}-{index}-{k}", task="category", image=image, height=raw["height"], width=raw["width"],
                 conversations=_conversation("<image>", prompt, str(category)),
                 masks=[annotation.get("segmentation") if isinstance(annotation, dict) else None])
            for k, (category, annotation) in enumerate(zip(raw["categories"], raw["annotations"]))]


def _vg_records(raw: dict, index: int, stem: str, root: Path, prompt: str) -> list[dict]:
    for key in ("image", "height", "width", "caption"):
        if key not in raw:
            raise InputError(f"a VG record needs 'image', 'height', 'width', 'caption' and 'boxes'; '{key}' is missing")
    image = raw["image"][0] if isinstance(raw["image"], list) and raw["image"] else raw["image"]
    if raw.get("boxes"):
        x, y, w, h = (float(v) for v in raw["boxes"][0])
        region = [max(0.0, x), max(0.0, y), min(float(raw["width"]), x + w), min(float(raw["height"]), y + h)]
    elif raw.get("mask"):
        region = raw["mask"]
    else:
        raise InputError("a VG record needs 'boxes' ([[x, y, w, h]]) or a 'mask'")
    return [dict(id=str(raw.get("id", f"{stem}-{index}")), task="short_caption", image=image, height=raw["height"],
                 width=raw["width"], conversations=_conversation("<image>", prompt, str(raw["caption"])),
                 masks=[region])]


def _single_video(raw: dict) -> dict:
    """`video: ["clip.mp4"]` (the Lite files) is one video file, not a one-frame list."""
    video = raw.get("video")
    if isinstance(video, list) and len(video) == 1 and str(video[0]).lower().endswith(VIDEO_SUFFIXES):
        return {**raw, "video": video[0]}
    return raw


def _video_caption_records(task: str, mask_key: str) -> Callable:
    def convert(raw: dict, index: int, stem: str, root: Path, prompt: str) -> list[dict]:
        raw = _single_video(raw)
        if "conversations" in raw:  # an all-frame (Lite) file: already a PixelRefer record
            return [{"task": task, **raw, "id": str(raw.get("id", f"{stem}-{index}"))}]
        for key in ("video", "frame_idx", mask_key, "caption"):
            if key not in raw:
                raise InputError(f"a {task} record needs 'video', 'frame_idx', '{mask_key}' and 'caption' "
                                 f"(or a PixelRefer 'conversations' record); '{key}' is missing")
        masks = [{str(raw["frame_idx"]): raw["mask"]}] if mask_key == "mask" else raw["annotation"]
        count = len(masks) if isinstance(masks, list) else 1
        question = prompt.replace(REGION, " ".join([REGION] * count), 1)
        return [dict(id=str(raw.get("id", f"{stem}-{index}")), task=task, video=raw["video"],
                     frame_idx=raw["frame_idx"], conversations=_conversation("<video>", question, str(raw["caption"])),
                     masks=masks)]

    return convert


def _converted(convert: Callable) -> Callable:
    """A reader that turns every raw record of a file into PixelRefer records, then into `Sample`s."""

    def read(path: Path, root: Path, prompt: str) -> list[Sample]:
        records, problems = read_records(path)
        samples = []
        for index, raw in records:
            try:
                if not isinstance(raw, dict):
                    raise InputError(f"a record must be a JSON object, got {type(raw).__name__}")
                samples += [parse_record(r, path, index, root) for r in convert(raw, index, path.stem, root, prompt)]
            except InputError as exc:
                problems.append(f"{path}:{index}: {str(exc).removeprefix(f'{path}:{index}').lstrip(':, ')}")
        _raise_problems(path, problems)
        return samples

    return read


def _annotations(path: Path, root: Path, prompt: str) -> list[Sample]:
    if path.is_dir():
        path = path / "test.json"  # a ShapesWorld folder: its test split
    return load_annotations(path, root if root != path.parent else None)


def _raise_problems(path: Path, problems: list) -> None:
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InputError(f"{path}: {len(problems)} bad record(s):\n{listed}{more}")


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Benchmark:
    """A benchmark the runners know: how to read its file, what to ask, and where the paper reports it."""

    name: str
    title: str  # the paper's column group
    table: str  # "Table 1" … "Table 4", or "ShapesWorld"
    read: Callable[[Path, Path, str], list[Sample]]
    prompt: str = ""
    max_new_tokens: int = 64
    video: bool = False


LVIS_PROMPT = "What is the category of <region>? Using only one word or phrase."
PACO_PROMPT = ("What is the category of <region>? It maybe a subpart of an object. If it is a subpart, output in the "
               "format of 'category:subcategory', else just output the category.")
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("lvis", "LVIS", "Table 1", _converted(_category_records), LVIS_PROMPT, 16),
    Benchmark("paco", "PACO", "Table 1", _converted(_category_records), PACO_PROMPT, 16),
    Benchmark("vg", "VG", "Table 1", _converted(_vg_records), "Please describe <region> briefly.", 64),
    Benchmark("hc-stvg", "HC-STVG", "Table 4", _converted(_video_caption_records("video_caption", "mask")),
              "Please describe the object <region> in brief in the video.", 128, video=True),
    Benchmark("videorefer-d", "VideoRefer-Bench-D", "Table 2",
              _converted(_video_caption_records("video_description", "annotation")),
              "Please describe in detail the marked object <region> in the video.", 512, video=True),
    Benchmark("videorefer-q", "VideoRefer-Bench-Q", "Table 3", _annotations, max_new_tokens=16, video=True),
    Benchmark("shapesworld", "ShapesWorld", "ShapesWorld", _annotations, max_new_tokens=96),
)}
_ALIASES = {"videorefer-bench-d": "videorefer-d", "videorefer-bench-q": "videorefer-q", "hcstvg": "hc-stvg"}


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """A registered benchmark by name (case, `_` and the `-bench-` spelling do not matter)."""
    if isinstance(name, Benchmark):
        return name
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def _prune_video_masks(sample: Sample, key_frame_only: bool) -> Sample:
    """Drop empty per-frame masks; with `key_frame_only`, keep one frame per object (`frame_idx` if it has it)."""
    if not sample.is_video:
        return sample
    key = sample.meta.get("frame_idx")
    masks = []
    for k, per_frame in enumerate(sample.masks):
        kept = {t: spec for t, spec in per_frame.items() if not _empty_rle(spec)}
        if not kept:
            raise InputError(f"{sample.where}, object {k}: every frame's mask is empty")
        if key_frame_only:
            t = int(key) if key is not None and int(key) in kept else min(kept)
            kept = {t: kept[t]}
        masks.append(kept)
    return dataclasses.replace(sample, masks=masks)


def _empty_rle(spec) -> bool:
    if not isinstance(spec, dict) or "counts" not in spec:
        return False
    if isinstance(spec["counts"], list):
        return sum(spec["counts"][1::2]) == 0
    from pycocotools import mask as coco_mask

    rle = dict(spec, counts=spec["counts"].encode() if isinstance(spec["counts"], str) else spec["counts"])
    return int(coco_mask.area(rle)) == 0


def load_queries(benchmark: str | Benchmark, path: str | Path, *, media_root: str | Path | None = None,
                 limit: int | None = None, prompt: str | None = None, key_frame_only: bool = False) -> list[Query]:
    """Every query of a benchmark file, in file order (the first `limit` when given).

    Args:
        media_root: folder that relative image / video paths start from (default: the file's folder).
        prompt: the question for records without their own (default: the release's, `Benchmark.prompt`).
        key_frame_only: one masked frame per video object (single-frame mode).
    """
    spec = get_benchmark(benchmark)
    if prompt is not None and REGION not in prompt:
        raise ValueError(f"{spec.name}: the prompt must say where the region goes with {REGION}, got {prompt!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{spec.name}: benchmark file {path} does not exist")
    default_root = path if path.is_dir() else path.parent
    root = Path(media_root) if media_root is not None else default_root
    samples = spec.read(path, root, prompt or spec.prompt)
    samples = [_prune_video_masks(s, key_frame_only) for s in samples]
    queries = [q for s in samples for q in queries_of(s, spec.name)]
    seen: dict[str, Query] = {}
    for q in queries:
        if q.id in seen:
            raise InputError(f"{spec.name}: query id {q.id!r} appears twice ({seen[q.id].where} and {q.where}); "
                             f"results are resumed by id, so ids must be unique")
        seen[q.id] = q
    return queries[:limit] if limit is not None else queries
