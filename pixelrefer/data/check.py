"""Validate annotation files: every bad record, with file, index and reason, in one pass.

Notable:
- Never stops at the first problem: every record is checked, and one record
  can report several independent problems (a missing image and a `<region>`
  count that disagrees with its masks).
- Media are probed from headers only (image size, frame count, fps); masks are
  fully decoded, which is cheap next to pixels, so an empty mask, a size
  mismatch or a point outside the image is caught here, not mid-training.
- The same per-sample checks back `RegionDataset(skip_bad=True)`: what this
  report flags is what the dataset skips.
- `pixelrefer data check FILE... [--media-root DIR]` prints the report and
  exits 1 on any problem, 0 otherwise; `pixelrefer data shapesworld OUT`
  writes the synthetic dataset.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pixelrefer.data.formats import Problem, read_annotations, strip_where
from pixelrefer.data.sample import Sample
from pixelrefer.errors import InputError


@dataclass
class CheckReport:
    """Problems found in one annotation file.

    Attributes:
        path: the annotation file.
        num_records: records in it (readable or not).
        problems: one (file, index, reason) per problem, in record order.
    """

    path: Path
    num_records: int
    problems: list[Problem]

    @property
    def count(self) -> int:
        """Number of problems."""
        return len(self.problems)

    @property
    def bad_records(self) -> int:
        return len({p.index for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: {self.num_records} records, no problems"
        lines = [str(p) for p in self.problems]
        lines.append(f"{self.path}: {self.count} problem(s) in {self.bad_records} of {self.num_records} records")
        return "\n".join(lines)


def sample_problems(sample: Sample) -> list[str]:
    """Every reason `sample` cannot be loaded, each without the leading `file:index`."""
    reasons = _collect(sample.check_regions)
    try:
        info = sample.probe()
    except InputError as exc:
        return [strip_where(r, sample.where) for r in [*reasons, str(exc)]]
    if info is None:
        if sample.masks:
            reasons.append(f"{sample.where}: the record has masks but no image or video")
        return [strip_where(r, sample.where) for r in reasons]
    reasons += _collect(sample.check_size, info.height, info.width)
    if sample.timestamps is not None and info.num_frames is not None and len(sample.timestamps) != info.num_frames:
        reasons.append(f"{len(sample.timestamps)} timestamps for {info.num_frames} frames")
    for _, _, mask in sample.iter_masks(info.height, info.width, info.num_frames):
        if isinstance(mask, InputError):
            reasons.append(str(mask))
    return [strip_where(r, sample.where) for r in reasons]


def _collect(check, *args) -> list[str]:
    try:
        check(*args)
    except InputError as exc:
        return [str(exc)]
    return []


def check_samples(samples: list[Sample]) -> list[Problem]:
    """A `Problem` for every problem of every sample."""
    return [Problem(str(s.source), s.index, reason) for s in samples for reason in sample_problems(s)]


def check_annotations(path: str | Path, media_root: str | Path | None = None) -> CheckReport:
    """Check every record of a .json / .jsonl file: structure, media, masks, regions, frames.

    Args:
        path: the annotation file.
        media_root: folder that media paths are relative to (default: the file's folder).
    """
    parsed = read_annotations(path, media_root)
    problems = parsed.problems + check_samples(parsed.samples)
    problems.sort(key=lambda p: -1 if p.index is None else p.index)  # stable: a record's problems stay in order
    return CheckReport(parsed.path, parsed.num_records, problems)


# ----------------------------------------------------------------------------- command line


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `pixelrefer data {check,shapesworld}` on the CLI's subcommands."""
    data = commands.add_parser("data", help="check annotation files, generate ShapesWorld")
    actions = data.add_subparsers(dest="action", parser_class=type(data))
    check = actions.add_parser("check", help="report every bad record of annotation files")
    check.add_argument("files", nargs="+", metavar="FILE", help=".json or .jsonl annotation files")
    check.add_argument("--media-root", default=None, help="folder media paths are relative to (default: the file's)")
    check.set_defaults(handler=run_check)
    world = actions.add_parser("shapesworld", help="generate the synthetic ShapesWorld dataset")
    world.add_argument("out", help="output folder")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--images", type=int, default=None, help="number of images (default: the generator's)")
    world.add_argument("--videos", type=int, default=None, help="number of videos (default: the generator's)")
    world.add_argument("--image-choice", action="store_true",
                       help="add lettered colour / shape questions on every image (VideoRefer-Bench-Q layout)")
    world.add_argument("--location", action="store_true",
                       help="add where-is questions on every image and video (answers: the 3x3 cell of each object)")
    world.add_argument("--last-location", action="store_true",
                       help="add where-is-it-last-seen questions on every video (the 3x3 cell of each object)")
    world.add_argument("--short-answers", action="store_true",
                       help="add the Relationship, Reasoning and Future questions of every video without options, "
                            "answered in one word")
    world.add_argument("--option-first", action="store_true",
                       help="write lettered answers option first: 'left of <object1> (B)' instead of '(B) left of ...'")
    world.add_argument("--speed-steps", action="store_true",
                       help="with --option-first, Reasoning answers state both objects' speeds first: '<object0> moves "
                            "at speed 3 and <object1> does not move: <object0> (B)'")
    world.add_argument("--answer-words", action="store_true",
                       help="with --option-first, answers whose option has a one-word answer write that word before "
                            "the letter: 'above (C)'")
    world.set_defaults(handler=run_shapesworld)
    data.set_defaults(handler=lambda args: _usage(data))


def run_check(args: argparse.Namespace) -> int:
    """Print a report per file; 1 if any file has a problem, else 0."""
    failed = False
    for path in args.files:
        report = check_annotations(path, args.media_root)
        print(report)
        failed |= not report.ok
    return 1 if failed else 0


def run_shapesworld(args: argparse.Namespace) -> int:
    from pixelrefer.data.shapesworld import generate_shapesworld

    sizes = {k: v for k, v in (("num_images", args.images), ("num_videos", args.videos)) if v is not None}
    for split, path in generate_shapesworld(args.out, seed=args.seed, image_choice=args.image_choice,
                                            location=args.location, last_location=args.last_location,
                                            short_answers=args.short_answers, option_first=args.option_first,
                                            speed_steps=args.speed_steps, answer_words=args.answer_words,
                                            **sizes).items():
        print(f"{split}: {path}")
    return 0


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2
