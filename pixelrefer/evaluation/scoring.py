"""Result records → metrics: each task's answers go to its metric family.

Notable:
- A result record is one JSONL line of a run (`Query.result`): id, where,
  task, metric, question, prediction, reference (+ type, options for
  multiple choice). Scoring reads nothing else, so a results file can be
  re-scored later (`score_file`), e.g. once a judge is at hand.
- Families: `category` → SSim, SIoU; `caption` → BLEU@1–4, METEOR, ROUGE-L,
  CIDEr (SPICE None); `exact` → Accuracy; `choice` → accuracy per question
  type and Overall; `description` (VideoRefer-Bench-D) → the judge's SC, AD,
  TD, HD and Avg, or, without a judge, the caption metrics and a note.
- Records are grouped by task, so a file mixing tasks (ShapesWorld) gets
  metrics per task; CIDEr's document frequencies then come from that task's
  references only.
- Values are fractions (Bench-D: the judge's 0–5 scale); tables scale them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pixelrefer.evaluation.captions import caption_scores
from pixelrefer.evaluation.category import SentenceEmbedder, category_scores, exact_match
from pixelrefer.evaluation.choice import choice_scores, score_item
from pixelrefer.evaluation.judge import Judge, description_scores


@dataclass
class BenchmarkScores:
    """Metrics of one benchmark run.

    Attributes:
        per_task: {task: {metric: value}} in first-appearance order.
        counts: {task: number of scored answers}.
        metrics: the only task's metrics, or `{"task/metric": value}` when there are several.
        unparseable: multiple-choice answers with no usable letter (id, where, prediction, problem).
        notes: what could not be computed and why (Java, SPICE, judge).
    """

    benchmark: str
    count: int
    per_task: dict[str, dict[str, float | None]]
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    unparseable: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float | None]:
        if len(self.per_task) == 1:
            return dict(next(iter(self.per_task.values())))
        return {f"{task}/{name}": value for task, values in self.per_task.items() for name, value in values.items()}

    def as_dict(self) -> dict:
        return dict(benchmark=self.benchmark, count=self.count, metrics=self.metrics, per_task=self.per_task,
                    counts=self.counts, notes=self.notes, unparseable=self.unparseable)


def _group(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["task"], []).append(r)
    return groups


def _score_choice(records: list[dict], unparseable: list[dict]) -> dict[str, float]:
    items = [score_item(r["id"], r["prediction"], r["reference"], type=r.get("type", ""), options=r.get("options"),
                        where=f"{r.get('where', r['id'])} (query {r['id']})") for r in records]
    scores = choice_scores(items)
    by_id = {r["id"]: r for r in records}
    unparseable += [dict(id=i.id, where=by_id[i.id].get("where"), prediction=by_id[i.id]["prediction"],
                         problem=i.problem) for i in scores.unparseable]
    return scores.as_dict()


def _score_captions(records: list[dict], notes: list[str], use_java: bool | None, meteor: bool
                    ) -> dict[str, float | None]:
    scores = caption_scores([r["prediction"] for r in records], [r["reference"] for r in records],
                            use_java=use_java, meteor=meteor)
    notes += [n for n in scores.notes if n not in notes]
    return scores.as_dict()


def _score_family(family: str, records: list[dict], *, notes: list[str], unparseable: list[dict],
                  judge: Judge | None, embedder: SentenceEmbedder | None, use_java: bool | None, meteor: bool
                  ) -> dict:
    predictions, references = [r["prediction"] for r in records], [r["reference"] for r in records]
    if family == "category":
        return category_scores(predictions, references, embedder=embedder).as_dict()
    if family == "exact":
        return {"Accuracy": sum(map(exact_match, predictions, references)) / len(records)}
    if family == "choice":
        return _score_choice(records, unparseable)
    if family == "description":
        if judge is None:
            note = ("VideoRefer-Bench-D is scored by an LLM judge: none was given, so SC/AD/TD/HD are missing and "
                    "caption metrics are reported instead; re-score the results file with "
                    "`score_file(path, benchmark, judge=...)`")
            notes.append(note)
            return _score_captions(records, notes, use_java, meteor)
        scores = description_scores([r["id"] for r in records], predictions, references, judge)
        if scores.failed:
            notes.append(f"judge gave no usable score for {len(scores.failed)} description(s): {scores.failed[:10]}")
        return scores.as_dict()
    return _score_captions(records, notes, use_java, meteor)


def score_records(benchmark: str, records: list[dict], *, judge: Judge | None = None,
                  embedder: SentenceEmbedder | None = None, use_java: bool | None = None, meteor: bool = True
                  ) -> BenchmarkScores:
    """Score result records (one per answered query), per task.

    Args:
        judge: the LLM judge for VideoRefer-Bench-D (optional).
        embedder: sentence encoder for SSim (default: the bundled all-MiniLM-L6-v2).
        use_java: force (True) or forbid (False) Java for PTB tokenisation and METEOR; default: if on PATH.
        meteor: compute METEOR (its Java process takes 5-20 s to start, once per Python process).
    """
    notes: list[str] = []
    unparseable: list[dict] = []
    per_task, counts = {}, {}
    for task, group in _group(records).items():
        families = {r["metric"] for r in group}
        if len(families) > 1:
            raise ValueError(f"{benchmark}: task {task!r} mixes metric families {sorted(families)}")
        per_task[task] = _score_family(families.pop(), group, notes=notes, unparseable=unparseable, judge=judge,
                                       embedder=embedder, use_java=use_java, meteor=meteor)
        counts[task] = len(group)
    return BenchmarkScores(benchmark, len(records), per_task, counts, notes, unparseable)


def read_results(path: str | Path) -> list[dict]:
    """Every complete record of a results JSONL file (a torn last line, from a crash, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}:{number}: not a JSON result record") from None
    return records


def score_file(path: str | Path, benchmark: str, **kwargs) -> BenchmarkScores:
    """Score a results JSONL file written by `run_benchmark` (keyword arguments as `score_records`)."""
    return score_records(benchmark, read_results(path), **kwargs)
