"""Annotation files (REFERENCE §5) → `Sample`s: every record format, .json and .jsonl.

Notable:
- One `Sample` type for every format: PixelRefer image records (`image`,
  `conversations`, `masks`), video records (`video` as a file, a frame folder
  or a list of frame files with `timestamps`; `masks` as `{frame: mask}` per
  object), VideoRefer `annotation` wrappers (`{frame: {"segmentation": rle}}`)
  and VideoRefer-Bench-Q records (`Question`, `options`, `Answer`, `type`),
  which become a user turn (question, options, instruction) and an answer.
- Parsing checks structure only and never opens media; masks stay raw specs
  until `Sample.load_media()` (sample.py) decodes them against the real
  image size.
- `.json` holds one list of records (index = list position); `.jsonl` one
  record per line (index = 0-based line number; blank lines are skipped).
- Every error names `file:index` and, where it applies, the object and frame.
  `read_annotations` collects every bad record, `load_annotations` raises
  listing them: a bad record is never replaced by another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pixelrefer.data import media
from pixelrefer.data.sample import REGION, Sample
from pixelrefer.errors import InputError

ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
BENCH_Q_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# Keys a record's fields are parsed from; everything else is kept in `Sample.meta`.
_PARSED_KEYS = {"id", "task", "conversations", "masks", "annotation", "image", "video", "timestamps", "fps",
                "height", "width"}


class Problem(NamedTuple):
    """One bad record: annotation file, record index (None for the whole file) and why."""

    file: str
    index: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{'-' if self.index is None else self.index}: {self.reason}"


# ----------------------------------------------------------------------------- parsing records


def parse_record(record, source: Path, index: int, media_root: Path) -> Sample:
    """Check one record's structure and resolve its paths; raises `InputError` naming `source:index`."""
    where = f"{source}:{index}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    conversation, task = _conversation(record, where)
    paths = _media(record, media_root, where)
    is_video = paths["video"] is not None or paths["frames"] is not None
    return Sample(
        source=source,
        index=index,
        id=str(record.get("id", f"{source.stem}-{index}")),
        conversation=conversation,
        masks=_masks(record, is_video, where),
        height=_optional_int(record, "height", where),
        width=_optional_int(record, "width", where),
        task=record.get("task", task),
        meta={k: v for k, v in record.items() if k not in _PARSED_KEYS},
        **paths,
    )


def _conversation(record: dict, where: str) -> tuple[list[dict[str, str]], str | None]:
    if "conversations" in record:
        return _turns(record["conversations"], where), None
    if "Question" in record:
        return _bench_q_turns(record, where), "multiple_choice"
    raise InputError(f"{where}: a record needs 'conversations' or a VideoRefer-Bench-Q 'Question'")


def _turns(raw, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns = []
    for j, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise InputError(f"{where}, turn {j}: a turn must be an object with 'from' and 'value'")
        role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in ROLES:
            raise InputError(f"{where}, turn {j}: role {role!r} is not one of human, gpt, system")
        if not isinstance(content, str):
            raise InputError(f"{where}, turn {j}: 'value' must be a string, got {type(content).__name__}")
        if ROLES[role] == "assistant" and REGION in content:
            raise InputError(f"{where}, turn {j}: an answer holds {REGION}; only human turns may")
        turns.append({"role": ROLES[role], "content": content})
    if not any(t["role"] == "user" for t in turns):
        raise InputError(f"{where}: the conversation has no human turn")
    return turns


def bench_q_prompt(question: str, options: list[str]) -> str:
    """The user turn of a VideoRefer-Bench-Q question: the question, one option per line, the instruction."""
    return "\n".join([question, *options, BENCH_Q_INSTRUCTION] if options else [question])


def _bench_q_turns(record: dict, where: str) -> list[dict[str, str]]:
    question, options, answer = record["Question"], record.get("options", []), record.get("Answer")
    if not isinstance(question, str):
        raise InputError(f"{where}: 'Question' must be a string")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise InputError(f"{where}: 'options' must be a list of strings like \"(A) ...\"")
    turns = [{"role": "user", "content": bench_q_prompt(question, options)}]
    if answer is not None:
        if not isinstance(answer, str):
            raise InputError(f"{where}: 'Answer' must be a string like \"(A) ...\"")
        turns.append({"role": "assistant", "content": answer})
    return turns


def _resolve(value, root: Path, what: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: {what} must be a path string, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else root / path


def _media(record: dict, root: Path, where: str) -> dict:
    paths = dict(image=None, video=None, frames=None, timestamps=None, fps=None)
    image, video = record.get("image"), record.get("video")
    if image is not None and video is not None:
        raise InputError(f"{where}: a record has an 'image' or a 'video', not both")
    if isinstance(image, list):
        if len(image) != 1:
            raise InputError(f"{where}: 'image' lists {len(image)} files; one image per record is supported")
        image = image[0]
    if image is not None:
        paths["image"] = _resolve(image, root, "'image'", where)
    elif isinstance(video, list):
        paths["frames"] = [_resolve(v, root, f"'video' frame {t}", where) for t, v in enumerate(video)]
        if not video:
            raise InputError(f"{where}: 'video' is an empty frame list")
    elif video is not None:
        paths["video"] = _resolve(video, root, "'video'", where)
    timestamps = record.get("timestamps")
    if timestamps is not None:
        if paths["video"] is not None and paths["video"].suffix.lower() not in ("", *media.IMAGE_SUFFIXES):
            raise InputError(f"{where}: 'timestamps' apply to frame lists and folders, not to a video file")
        if not isinstance(timestamps, list) or not all(isinstance(t, (int, float)) for t in timestamps):
            raise InputError(f"{where}: 'timestamps' must be a list of seconds")
        if paths["frames"] is not None and len(timestamps) != len(paths["frames"]):
            raise InputError(f"{where}: {len(timestamps)} timestamps for {len(paths['frames'])} frames")
        paths["timestamps"] = [float(t) for t in timestamps]
    if record.get("fps") is not None:
        paths["fps"] = float(record["fps"])
    return paths


def _unwrap(entry):
    """VideoRefer wraps each mask as {"segmentation": rle}."""
    return entry["segmentation"] if isinstance(entry, dict) and "segmentation" in entry else entry


def _masks(record: dict, is_video: bool, where: str) -> list:
    if "masks" in record and "annotation" in record:
        raise InputError(f"{where}: a record has 'masks' or 'annotation', not both")
    raw = record.get("masks", record.get("annotation"))
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InputError(f"{where}: 'masks' must be a list with one entry per object")
    return [(_frame_masks if is_video else _image_mask)(_unwrap(entry), f"{where}, object {k}")
            for k, entry in enumerate(raw)]


def _is_rle(spec) -> bool:
    return isinstance(spec, dict) and "counts" in spec


def _image_mask(spec, where: str):
    if _is_rle(spec) or (isinstance(spec, list) and spec):
        return spec
    raise InputError(f"{where}: a mask must be a polygon list or an RLE dict with 'counts' and 'size'")


def _frame_masks(spec, where: str) -> dict[int, object]:
    if not isinstance(spec, dict) or not spec or _is_rle(spec):
        raise InputError(f"{where}: a video mask must be a non-empty {{\"<frame_idx>\": segmentation}} dict")
    per_frame = {}
    for key, value in spec.items():
        try:
            t = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{where}: frame key {key!r} is not an integer") from None
        per_frame[t] = _image_mask(_unwrap(value), f"{where}, frame {t}")
    return dict(sorted(per_frame.items()))


def _optional_int(record: dict, key: str, where: str) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


# ----------------------------------------------------------------------------- files


@dataclass
class AnnotationFile:
    """Every record of one file: the ones that parsed, and a `Problem` for each that did not."""

    path: Path
    samples: list[Sample]
    problems: list[Problem]
    num_records: int


def read_records(path: Path) -> tuple[list[tuple[int, object]], list[Problem]]:
    """(index, raw record) pairs of a .json or .jsonl file, and a `Problem` per unreadable part."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(str(path), None, f"cannot read the file: {exc}")]
    if path.suffix == ".jsonl":
        return _jsonl_records(path, text)
    if path.suffix != ".json":
        return [], [Problem(str(path), None, f"unknown annotation format {path.suffix!r}: use .json or .jsonl")]
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [Problem(str(path), None, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")]
    if not isinstance(records, list):
        return [], [Problem(str(path), None, f"the top level must be a list of records, got {type(records).__name__}")]
    return list(enumerate(records)), []


def _jsonl_records(path: Path, text: str) -> tuple[list[tuple[int, object]], list[Problem]]:
    records, problems = [], []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            records.append((i, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), i, f"line {i + 1}: not valid JSON: {exc.msg} (column {exc.colno})"))
    return records, problems


def read_annotations(path: str | Path, media_root: str | Path | None = None) -> AnnotationFile:
    """Parse every record of `path`; media paths are relative to `media_root` (default: the file's folder)."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    records, problems = read_records(path)
    num_records = len(records) + sum(p.index is not None for p in problems)  # unreadable .jsonl lines count
    samples = []
    for index, record in records:
        try:
            samples.append(parse_record(record, path, index, root))
        except InputError as exc:
            problems.append(Problem(str(path), index, strip_where(str(exc), f"{path}:{index}")))
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    return AnnotationFile(path, samples, problems, num_records)


def load_annotations(path: str | Path, media_root: str | Path | None = None) -> list[Sample]:
    """Every record of a .json / .jsonl file as a `Sample`; raises `InputError` listing the bad ones."""
    parsed = read_annotations(path, media_root)
    if parsed.problems:
        listed = "\n".join(f"  {p}" for p in parsed.problems[:10])
        more = f"\n  ... and {len(parsed.problems) - 10} more" if len(parsed.problems) > 10 else ""
        raise InputError(f"{path}: {len(parsed.problems)} bad record(s) (`pixelrefer data check {path}` "
                         f"lists them all):\n{listed}{more}")
    return parsed.samples


def strip_where(message: str, where: str) -> str:
    """An error message without its leading `file:index` (the `Problem` carries those)."""
    return message[len(where):].lstrip(":, ") if message.startswith(where) else message
