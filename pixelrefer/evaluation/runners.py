"""Benchmark runner: queries → batched answers → resumable JSONL → metrics → the paper's table.

    model = load_model("shapes-tiny", max_new_tokens=64)        # or any (inputs) -> list[str] callable
    result = run_benchmark(model, "shapesworld", "data/shapesworld", out="runs/eval/results.jsonl")
    print(result.table)

Notable:
- One line per answered query is appended to the results JSONL and flushed
  and fsynced at once, so an interrupted run loses at most the batch in
  flight; a rerun skips every id already there (a torn last line is cut
  off first) and only answers the rest. Each line names its model, and a
  rerun with another model refuses to mix the two in one file.
- Sharding: under `torchrun`/`accelerate launch`, accelerate's
  `PartialState` gives the rank; process r answers queries r, r + W,
  r + 2W, … (index striding over the whole benchmark, so the split does not
  depend on what earlier runs finished) into its own shard file
  `<stem>.shard-r-of-W.jsonl`. After a barrier the main process merges the
  shards (and any left by an earlier interrupted run, whatever its process
  count) into the results file in benchmark order, atomically, and scores.
- Batches are consecutive pending queries of the same modality (image /
  video / text), so one processor call and one `generate` serve each batch.
- The summary (scores, the paper-layout table, notes, run facts) is written
  atomically to `<stem>.summary.json` next to the results.
- `add_parser(commands)` registers `pixelrefer eval`; `python -m
  pixelrefer.evaluation.runners eval …` runs the same command standalone.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pixelrefer.data.shapesworld import VERSION as SHAPESWORLD_VERSION
from pixelrefer.data.shapesworld import atomic_write, generate_shapesworld
from pixelrefer.errors import InputError
from pixelrefer.evaluation.benchmarks import BENCHMARKS, Query, get_benchmark, load_queries
from pixelrefer.evaluation.models import ModelFn, load_model
from pixelrefer.evaluation.scoring import BenchmarkScores, read_results, score_records
from pixelrefer.evaluation.tables import SummaryTable, summary_table


@dataclass
class BenchmarkResult:
    """A finished run. `scores`, `table` and `records` are None on processes other than the main one.

    Attributes:
        records: the result record of every query of the benchmark (as limited), in benchmark order.
        answered: queries this process answered in this run; resumed: queries found already answered.
    """

    benchmark: str
    model: str
    results_path: Path
    summary_path: Path | None
    scores: BenchmarkScores | None
    table: SummaryTable | None
    records: list[dict] | None
    answered: int
    resumed: int
    processes: int
    seconds: float


def process_state():
    """accelerate's `PartialState`; on the CPU (no CUDA, or ACCELERATE_USE_CPU=1) with gloo under torchrun."""
    import torch
    from accelerate import PartialState

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU itself.
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=flag or not torch.cuda.is_available())


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.shard-{rank}-of-{world}.jsonl")


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.stem}.shard-*-of-*.jsonl"))


def _cut_torn_tail(path: Path) -> None:
    """Drop an incomplete last line (a write interrupted mid-line) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _modality(query: Query) -> str:
    sample = query.sample
    return "video" if sample.is_video else "image" if sample.image is not None else "text"


def _batches(queries: list[Query], size: int) -> list[list[Query]]:
    batches: list[list[Query]] = []
    for q in queries:
        if batches and len(batches[-1]) < size and _modality(batches[-1][-1]) == _modality(q):
            batches[-1].append(q)
        else:
            batches.append([q])
    return batches


def _answer(model: ModelFn, name: str, queries: list[Query], path: Path, batch_size: int, bar) -> int:
    """Answer `queries` in batches, appending one fsynced line per answer to `path`."""
    _cut_torn_tail(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for batch in _batches(queries, batch_size):
            answers = model([q.load() for q in batch])
            if not isinstance(answers, (list, tuple)) or len(answers) != len(batch):
                got = len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__
                raise ValueError(f"the model returned {got} answers for a batch of {len(batch)} queries "
                                 f"({batch[0].id} …)")
            for q, answer in zip(batch, answers):
                if not isinstance(answer, str):
                    raise ValueError(f"the model answered query {q.id} with a {type(answer).__name__}, not a str")
                f.write(json.dumps({**q.result(answer), "model": name}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(batch))
    return len(queries)


def _merge(out: Path, queries: list[Query]) -> dict[str, dict]:
    """Fold shard files into `out` (benchmark order first, then records of other ids); return records by id."""
    by_id: dict[str, dict] = {}
    shards = _shard_files(out)
    for path in [out, *shards]:
        for record in read_results(path):
            by_id.setdefault(record["id"], record)
    order = [q.id for q in queries if q.id in by_id]
    order += [i for i in by_id if i not in set(order)]
    text = "".join(json.dumps(by_id[i], ensure_ascii=False) + "\n" for i in order)
    atomic_write(out, text.encode("utf-8"))
    for path in shards:
        path.unlink()
    return by_id


def run_benchmark(model: ModelFn, benchmark: str, data: str | Path, *, out: str | Path,
                  media_root: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
                  prompt: str | None = None, key_frame_only: bool = False, judge=None, embedder=None,
                  use_java: bool | None = None, meteor: bool = True, model_name: str | None = None,
                  progress: bool = True) -> BenchmarkResult:
    """Answer every query of a benchmark file with `model`, resuming from `out`, and score the answers.

    Args:
        model: `(list of SampleInputs) -> list[str]`, e.g. `load_model(...)` or any plain callable.
        benchmark: a name of `BENCHMARKS` (`lvis`, `paco`, `vg`, `hc-stvg`, `videorefer-d`, `videorefer-q`,
            `shapesworld`).
        data: the benchmark's annotation file (a ShapesWorld folder means its test.json).
        out: the results JSONL (created, or resumed when it exists).
        media_root, limit, prompt, key_frame_only: as `load_queries`.
        batch_size: queries per model call.
        judge, embedder, use_java, meteor: as `score_records`.
        model_name: row label of the table (default: the model's `name` attribute).
        progress: show a tqdm bar (main process only).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    spec = get_benchmark(benchmark)
    queries = load_queries(spec, data, media_root=media_root, limit=limit, prompt=prompt,
                           key_frame_only=key_frame_only)
    state = process_state()
    rank, world = state.process_index, state.num_processes
    out = Path(out)
    name = model_name or getattr(model, "name", None) or getattr(model, "__name__", type(model).__name__)
    existing = [r for path in [out, *_shard_files(out)] for r in read_results(path)]
    others = sorted({r.get("model") for r in existing} - {name}, key=str)
    if others:
        raise ValueError(f"{out} holds answers of model {others[0]!r}, not {name!r}: resuming would mix two models; "
                         f"write to another file (or pass model_name= for a renamed model)")
    done = {r["id"] for r in existing}
    assigned = queries[rank::world]
    pending = [q for q in assigned if q.id not in done]
    with tqdm(total=len(assigned), initial=len(assigned) - len(pending), desc=spec.name, unit="query",
              disable=not (progress and state.is_main_process)) as bar:
        answered = _answer(model, name, pending, out if world == 1 else shard_path(out, rank, world), batch_size, bar)
    state.wait_for_everyone()
    facts = dict(benchmark=spec.name, model=name, results_path=out, answered=answered,
                 resumed=len(assigned) - len(pending), processes=world)
    if not state.is_main_process:
        return BenchmarkResult(**facts, summary_path=None, scores=None, table=None, records=None,
                               seconds=time.perf_counter() - start)
    by_id = _merge(out, queries)
    records = [by_id[q.id] for q in queries]
    scores = score_records(spec.name, records, judge=judge, embedder=embedder, use_java=use_java, meteor=meteor)
    table = summary_table(scores, name, mode="S" if key_frame_only else "M")
    summary = out.with_name(f"{out.stem}.summary.json")
    seconds = time.perf_counter() - start
    payload = dict(benchmark=spec.name, model=name, data=str(data), results=str(out), processes=world,
                   answered=answered, seconds=round(seconds, 3), scores=scores.as_dict(), table=table.as_dict())
    atomic_write(summary, (json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n").encode("utf-8"))
    return BenchmarkResult(**facts, summary_path=summary, scores=scores, table=table, records=records,
                           seconds=seconds)


def _finite(value):
    """NaN / inf (a metric over no answers) become null, so the summary stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def shapesworld_test_split(folder: str | Path, *, seed: int | None = None, num_images: int | None = None,
                           num_videos: int | None = None, image_choice: bool | None = None,
                           location: bool | None = None, last_location: bool | None = None,
                           short_answers: bool | None = None) -> Path:
    """The ShapesWorld test split in `folder`, generated unless a split of the same parameters is there.

    Parameters left as None are those the shipped `shapes-tiny` models were trained with
    (`TRAIN_PRESETS["shapes-tiny"]["shapesworld"]`), so their test split is held out. The split depends on
    the counts: another `num_images` with the same seed reassigns images, and trained-on ones can land in test.
    """
    from pixelrefer.training import TRAIN_PRESETS

    folder = Path(folder)
    info = folder / "info.json"
    given = dict(seed=seed, num_images=num_images, num_videos=num_videos, image_choice=image_choice,
                 location=location, last_location=last_location, short_answers=short_answers)
    wanted = dict(TRAIN_PRESETS["shapes-tiny"]["shapesworld"], **{k: v for k, v in given.items() if v is not None})
    if info.exists() and (folder / "test.json").exists():
        existing = json.loads(info.read_text())
        defaults = {k: p.default for k, p in inspect.signature(generate_shapesworld).parameters.items()}
        if existing.get("version") == SHAPESWORLD_VERSION and all(
                existing.get(k, defaults.get(k)) == v for k, v in wanted.items()):
            return folder / "test.json"
    return generate_shapesworld(folder, **wanted)["test"]


def add_split_arguments(parser) -> None:
    """The options a benchmark script takes to pick its ShapesWorld test split (`split_from_arguments`)."""
    parser.add_argument("--data", default="runs/eval-shapesworld", help="folder for the generated splits")
    parser.add_argument("--num-images", type=int, default=None, help="the split of another image count")
    parser.add_argument("--num-videos", type=int, default=None, help="the split of another video count")
    parser.add_argument("--image-choice", action="store_true", help="a split with image multiple choice")
    parser.add_argument("--location", action="store_true",
                        help="a split with location questions (where each object is; the other records unchanged)")
    parser.add_argument("--last-location", action="store_true",
                        help="a split with where each video object is last seen (the other records unchanged)")
    parser.add_argument("--short-answers", action="store_true",
                        help="a split with one-word answers to the video questions (the other records unchanged)")


def split_from_arguments(args) -> Path:
    """The test split `add_split_arguments`' options name (generated if missing, see `shapesworld_test_split`)."""
    return shapesworld_test_split(args.data, num_images=args.num_images, num_videos=args.num_videos,
                                  image_choice=args.image_choice or None, location=args.location or None,
                                  last_location=args.last_location or None,
                                  short_answers=args.short_answers or None)


def probe_parser(description: str, *, model: str, train_records: int):
    """The options every probe benchmark takes: `--model`, the split (`add_split_arguments`), how many train records
    fit the probe, and `--threads`; a script adds its own."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=model)
    add_split_arguments(parser)
    parser.add_argument("--train-records", type=int, default=train_records, help="train records the probe is fitted on")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def model_and_task_records(args, task: str) -> tuple:
    """What a probe benchmark reads: `--threads` applied, the `--model` loaded, and `split_task_records`."""
    import torch

    import pixelrefer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = pixelrefer.load(args.model)
    return model, processor, split_task_records(args, task)


def split_task_records(args, task: str, splits: tuple[str, ...] = ("train", "test")) -> dict[str, list]:
    """The records of one `task` in each of `splits` of the split `add_split_arguments`' options name."""
    from pixelrefer.data import load_annotations

    root = split_from_arguments(args).parent
    return {split: [s for s in load_annotations(root / f"{split}.json", root) if s.task == task] for split in splits}


def benchmark_data(benchmark: str, data: str | Path | None, folder: str | Path, **shapesworld) -> Path:
    """`data` when given; else, for ShapesWorld only, its test split generated in `folder` (see above)."""
    spec = get_benchmark(benchmark)
    if data is not None:
        return Path(data)
    if spec.name != "shapesworld":
        raise ValueError(f"{spec.name}: give the benchmark file (only ShapesWorld can be generated)")
    return shapesworld_test_split(folder, **shapesworld)


# ----------------------------------------------------------------------------- command line


def add_parser(commands) -> None:
    """`pixelrefer eval --model M --benchmark B --data PATH [--media-root DIR] [--limit N] [--out FILE] …`."""
    parser = commands.add_parser("eval", help="run a benchmark and print the paper-layout summary table")
    parser.add_argument("--model", default="auto",
                        help="embedded model, preset or checkpoint folder (auto: shapes-tiny if shipped, else tiny)")
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--data", help="benchmark file (shapesworld: a folder or file; default: generate the "
                                       "test split next to --out)")
    parser.add_argument("--media-root", help="folder that image / video paths start from (default: the file's)")
    parser.add_argument("--limit", type=int, help="only the first N queries")
    parser.add_argument("--out", help="results JSONL, resumed if it exists (default: <benchmark>-results.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="default: the benchmark's")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1 … (auto: this process's accelerator device, cuda:<local rank> "
                             "under torchrun)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of random-weight presets")
    parser.add_argument("--key-frame-only", action="store_true", help="one masked frame per video object (mode S)")
    parser.add_argument("--prompt", help="question for records without their own (default: the release's)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java start-up takes 5-20 s)")
    parser.set_defaults(handler=_eval_command)


def _eval_command(args) -> int:
    spec = get_benchmark(args.benchmark)
    out = Path(args.out or f"{spec.name}-results.jsonl")
    try:
        data = benchmark_data(spec.name, args.data, out.parent / "shapesworld")
        device = str(process_state().device) if args.device == "auto" else args.device
        model = load_model(args.model, device=device, seed=args.seed,
                           max_new_tokens=args.max_new_tokens or spec.max_new_tokens)
        result = run_benchmark(model, spec.name, data, out=out, media_root=args.media_root, limit=args.limit,
                               batch_size=args.batch_size, prompt=args.prompt, key_frame_only=args.key_frame_only,
                               meteor=not args.no_meteor)
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"pixelrefer eval: error: {exc}", file=sys.stderr)
        return 2
    if result.table is not None:
        print(result.table)
        print(f"results: {result.results_path} ({result.answered} answered now, {result.resumed} resumed)\n"
              f"summary: {result.summary_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelrefer.evaluation.runners")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
