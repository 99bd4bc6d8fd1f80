"""ShapesWorld: a seeded, byte-reproducible synthetic region dataset in the PixelRefer JSON format.

Notable:
- Layout: `images/img_00000.png`, `videos/vid_00000/frame_00.png`...,
  `train.json`, `val.json`, `test.json` and `info.json` (parameters, counts).
- Byte-reproducible: item i draws from its own generator seeded with
  (seed, kind, i), so it is the same whatever the other counts; PNGs carry no
  timestamps; JSON has a fixed key order, one record per line. Every file is
  written atomically (temp file + `os.replace`).
- Records use the formats `formats.py` reads, with COCO compressed RLE masks:
  image records (`image`, `conversations`, `masks`), video caption records
  (a frame list with `timestamps`, `masks` as {frame: rle}) and multiple
  choice in VideoRefer-Bench-Q form (`Question`, `type`, `options`,
  `Answer`, `annotation` wrappers). `objects` describes each mask. With
  `image_choice=True` each image also gets lettered colour / shape questions
  in that layout (as conversation turns), with `location=True` each image
  and video a record of where its objects are (on a video's first frame), and
  with `last_location=True` each video a record of where they are last seen,
  and with `short_answers=True` its Relationship, Reasoning and Future
  questions again without options, answered in one word; with
  `option_first=True` lettered answers name the option before its letter
  ("left of <object1> (B)"); the other records stay the same.
- Splits: a seeded permutation, images and videos split separately (largest
  remainder), so every split with a non-zero fraction gets both.
- `shapesworld_vocabulary()` lists every word the generator and the chat
  template can emit, so `build_tokenizer(shapesworld_vocabulary())` never
  produces `<unk>` on ShapesWorld.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from pixelrefer.data import tasks
from pixelrefer.data.formats import BENCH_Q_INSTRUCTION
from pixelrefer.data.scenes import CATEGORIES, COLOURS, COMPOSITES, SIZES, sample_scene, sample_video
from pixelrefer.regions import mask_to_rle
from pixelrefer.tokenizer import build_tokenizer

SPLITS = ("train", "val", "test")
VERSION = 1
_IMAGE, _VIDEO, _SPLIT = 0, 1, 2  # generator stream ids
# Words the chat template and the processor add around the records' text.
_TEMPLATE_WORDS = "system user assistant Time s : , . [ ] 0 1 2 3 4 5 6 7 8 9"


def generate_shapesworld(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_images: int = 100,
    num_videos: int = 20,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    image_size: int | tuple[int, int] = 128,
    num_frames: int = 8,
    fps: float = 2.0,
    image_choice: bool = False,
    location: bool = False,
    last_location: bool = False,
    short_answers: bool = False,
    option_first: bool = False,
    speed_steps: bool = False,
    answer_words: bool = False,
) -> dict[str, Path]:
    """Write ShapesWorld to `out_dir`; return the annotation file of each split.

    Files of the same names are replaced; nothing else in `out_dir` is touched.

    Args:
        seed: everything follows from it; the same seed writes identical bytes.
        num_images, num_videos: still scenes and videos (each gives several records).
        splits: train / val / test fractions of the images and of the videos.
        image_size: side, or (height, width), of images and video frames (at least 64).
        num_frames, fps: video length (at least 6 frames) and frame rate (timestamps t / fps).
        image_choice: add an `image_choice` record per image (lettered colour / shape questions in
            VideoRefer-Bench-Q's layout); every other record stays the same.
        location: add a `location` record per image (where up to three objects are: "in the top left
            corner", "at the bottom", … by the 3×3 cell of the centroid) and a `video_location` record per
            video (where each object is when first seen); every other record stays the same.
        last_location: add a `video_last_location` record per video (where each object is when last seen,
            by the same cells); every other record stays the same.
        short_answers: add a `video_short_answer` record per Relationship, Reasoning and Future question (the
            question without options, "Using only one word or phrase.", answered with the word only the right
            option has: "left", "higher", "<object0>", "neither"…); every other record stays the same.
        option_first: lettered answers (video multiple choice, `image_choice`) name the option before its
            letter, "left of <object1> (B)" instead of "(B) left of <object1>"; the questions, and every other
            record, stay the same.
        speed_steps: with `option_first`, a Reasoning question's answer first states each object's speed in
            pixels a frame, "<object0> moves at speed 3 and <object1> does not move: <object0> (B)"; the
            questions, and every other record, stay the same.
        answer_words: with `option_first`, a video multiple-choice answer whose option has a one-word answer
            (Relationship, Reasoning, Future: `short_answers`' words) writes that word before its letter,
            "above (C)" instead of "above <object1> (C)"; the questions, and every other record, stay the same.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    _validate(num_images, num_videos, splits, height, width, num_frames, fps)
    for name, wanted in (("speed_steps", speed_steps), ("answer_words", answer_words)):
        if wanted and not option_first:
            raise ValueError(f"{name} needs option_first: what it writes comes before the answer's letter")
    out = Path(out_dir)
    records: dict[str, list[dict]] = {name: [] for name in SPLITS}
    image_split = _assign(num_images, splits, np.random.default_rng([seed, _SPLIT, _IMAGE]))
    video_split = _assign(num_videos, splits, np.random.default_rng([seed, _SPLIT, _VIDEO]))
    for i in range(num_images):
        rng = np.random.default_rng([seed, _IMAGE, i])
        records[image_split[i]] += _write_image(out, i, rng, height, width, image_choice, location, option_first)
    for i in range(num_videos):
        rng = np.random.default_rng([seed, _VIDEO, i])
        records[video_split[i]] += _write_video(out, i, rng, height, width, num_frames, fps, location,
                                              last_location, short_answers, option_first, speed_steps,
                                              answer_words)
    paths = {}
    for name in SPLITS:
        paths[name] = out / f"{name}.json"
        atomic_write(paths[name], _json_lines(records[name]).encode("utf-8"))
    info = dict(name="ShapesWorld", version=VERSION, seed=seed, num_images=num_images, num_videos=num_videos,
                height=height, width=width, num_frames=num_frames, fps=fps, image_choice=image_choice,
                location=location, last_location=last_location, short_answers=short_answers,
                option_first=option_first, speed_steps=speed_steps, answer_words=answer_words,
                splits={name: dict(images=image_split.count(name), videos=video_split.count(name),
                                   records=len(records[name])) for name in SPLITS})
    atomic_write(out / "info.json", (json.dumps(info, indent=1) + "\n").encode("utf-8"))
    return paths


def _validate(num_images, num_videos, splits, height, width, num_frames, fps) -> None:
    if num_images < 0 or num_videos < 0:
        raise ValueError(f"num_images and num_videos must be >= 0, got {num_images} and {num_videos}")
    if len(splits) != 3 or min(splits) < 0 or not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ValueError(f"splits must be three non-negative train/val/test fractions summing to 1, got {splits}")
    if min(height, width) < 64:
        raise ValueError(f"image_size must be at least 64 pixels a side, got {height}x{width}")
    if num_frames < 6 or fps <= 0:
        raise ValueError(f"videos need num_frames >= 6 and fps > 0, got {num_frames} and {fps}")


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Largest-remainder counts summing to n; a non-zero fraction gets at least one item when n allows."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        donor = max(range(len(counts)), key=lambda j: counts[j])
        if f > 0 and counts[i] == 0 and counts[donor] > 1:
            counts[i], counts[donor] = 1, counts[donor] - 1
    return counts


def _assign(n: int, fractions, rng: np.random.Generator) -> list[str]:
    """Split name of each of n items, by a seeded permutation."""
    names = [name for name, count in zip(SPLITS, split_counts(n, fractions)) for _ in range(count)]
    order = rng.permutation(n)
    assigned = [""] * n
    for name, item in zip(names, order):
        assigned[int(item)] = name
    return assigned


# ----------------------------------------------------------------------------- writing


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_lines(records: list[dict]) -> str:
    """A JSON list with one record per line: valid .json, readable and diffable."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def _conversation(turns: list[tuple[str, str]], media_tag: str) -> list[dict]:
    """Release-style turns; the first human turn starts with `<image>\\n` or `<video>\\n`."""
    out = []
    for role, text in turns:
        if role == "human" and not out:
            text = media_tag + text
        out.append({"from": role, "value": text})
    return out


def _write_image(out: Path, i: int, rng: np.random.Generator, height: int, width: int,
                 image_choice: bool, location: bool = False, option_first: bool = False) -> list[dict]:
    scene = sample_scene(rng, height, width)
    name = f"img_{i:05d}"
    relative = f"images/{name}.png"
    atomic_write(out / relative, _png(scene.image))
    return [
        {"id": f"{name}-{record.task}", "task": record.task, "image": relative, "height": height, "width": width,
         "conversations": _conversation(record.conversation, "<image>\n"),
         "masks": [mask_to_rle(m) for m in record.masks], "objects": record.objects}
        for record in tasks.image_tasks(scene, rng, image_choice, location, option_first)
    ]


def _write_video(out: Path, i: int, rng: np.random.Generator, height: int, width: int, frames: int,
                 fps: float, location: bool = False, last_location: bool = False,
                 short_answers: bool = False, option_first: bool = False,
                 speed_steps: bool = False, answer_words: bool = False) -> list[dict]:
    video = sample_video(rng, height, width, frames, fps)
    name = f"vid_{i:05d}"
    paths = [f"videos/{name}/frame_{t:02d}.png" for t in range(frames)]
    for path, frame in zip(paths, video.frames):
        atomic_write(out / path, _png(frame))
    media = {"video": paths, "timestamps": video.timestamps, "height": height, "width": width}
    records = []
    for record in tasks.video_tasks(video, rng, location, last_location, short_answers, option_first, speed_steps,
                                    answer_words):
        per_frame = [{str(t): mask_to_rle(m) for t, m in sorted(masks.items())} for masks in record.masks]
        if record.question is None:
            suffix = f"{record.task}-{record.name}" if record.name else record.task
            records.append({"id": f"{name}-{suffix}", "task": record.task, **media,
                            "conversations": _conversation(record.conversation, "<video>\n"),
                            "masks": per_frame, "objects": record.objects})
        else:
            q = record.question
            wrapped = [{t: {"segmentation": rle} for t, rle in masks.items()} for masks in per_frame]
            records.append({"id": f"{name}-mc-{q['type'].lower()}", "task": record.task, "type": q["type"], **media,
                            "Question": q["Question"], "options": q["options"], "Answer": q["Answer"],
                            "annotation": wrapped, "objects": record.objects})
    return records


# ----------------------------------------------------------------------------- vocabulary


def shapesworld_vocabulary() -> list[str]:
    """Every word ShapesWorld records and the chat template can produce, as the tokenizer splits them.

    Includes capitalised forms, option letters, digits and the instruction
    sentences; `<objectK>` and the special tokens come with `build_tokenizer`.
    """
    parts = [part for names in COMPOSITES.values() for part in names]
    pieces = [*tasks.TEMPLATES, *CATEGORIES, *COMPOSITES, *parts, *COLOURS, *SIZES, BENCH_Q_INSTRUCTION,
              _TEMPLATE_WORDS]
    splitter = build_tokenizer([]).backend_tokenizer.pre_tokenizer
    words: set[str] = set()
    for piece in pieces:
        text = re.sub(r"<[^<>\s]*>", " ", re.sub(r"\{[^{}]*\}", "0", piece))  # drop fields, then <tags>
        for word, _ in splitter.pre_tokenize_str(text):
            words.update((word, word.capitalize()))
    return sorted(words)
