"""Summary tables in the paper's layout (Tables 1–4), as data and as text.

Notable:
- Column names are the paper's: Table 1 `SSim SIoU` (LVIS, PACO), `METEOR
  CIDEr` (VG); Table 2 `Mode SC AD TD HD Avg` (VideoRefer-Bench-D); Table 3
  `BQ SQ RlQ RsQ FP Avg` (VideoRefer-Bench-Q); Table 4 `METEOR CIDEr BLEU@4
  ROUGE-L SPICE` (HC-STVG). ShapesWorld, which the paper does not have, gets
  one row per task.
- Values are in the paper's units: percentages (fractions × 100) with one
  decimal; Bench-D keeps the judge's 0–5 scale with two. A metric that could
  not be computed is None in the data and `-` in the text, as in the paper.
- `combine_tables` puts several runs (benchmarks or models) of the same
  paper table side by side, one row per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pixelrefer.evaluation.choice import QUESTION_TYPES
from pixelrefer.evaluation.scoring import BenchmarkScores

# benchmark → (paper table, group title, [(column, metric key)], scale)
LAYOUTS = {
    "lvis": ("Table 1", "LVIS", [("SSim", "SSim"), ("SIoU", "SIoU")], 100.0),
    "paco": ("Table 1", "PACO", [("SSim", "SSim"), ("SIoU", "SIoU")], 100.0),
    "vg": ("Table 1", "VG", [("METEOR", "METEOR"), ("CIDEr", "CIDEr")], 100.0),
    "videorefer-d": ("Table 2", "VideoRefer-Bench-D", [(k, k) for k in ("SC", "AD", "TD", "HD", "Avg")], 1.0),
    "videorefer-q": ("Table 3", "VideoRefer-Bench-Q",
                     list(zip(("BQ", "SQ", "RlQ", "RsQ", "FP"), QUESTION_TYPES)) + [("Avg", "Overall")], 100.0),
    "hc-stvg": ("Table 4", "HC-STVG", [(k, k) for k in ("METEOR", "CIDEr", "BLEU@4", "ROUGE-L", "SPICE")], 100.0),
}
SHAPESWORLD_COLUMNS = ("SSim", "SIoU", "BLEU@4", "METEOR", "ROUGE-L", "CIDEr", "Accuracy")


@dataclass
class SummaryTable:
    """A table: `columns` are (group, name) pairs; `rows` start with their label; None prints as `-`."""

    title: str
    label: str
    columns: list[tuple[str, str]]
    rows: list[list]
    decimals: int = 1
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(title=self.title, columns=[self.label] + [f"{g} {n}".strip() for g, n in self.columns],
                    rows=self.rows, notes=self.notes)

    def _cell(self, value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{self.decimals}f}"
        return str(value)

    def to_text(self) -> str:
        header = [self.label] + [name for _, name in self.columns]
        body = [[self._cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        line = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [self.title]
        groups = [g for g, _ in self.columns]
        if any(groups):
            lines.append(line([""] + [g if i == 0 or groups[i - 1] != g else "" for i, g in enumerate(groups)]))
        lines += [line(header), "-+-".join("-" * w for w in widths), *map(line, body)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = to_text


def _scaled(value, scale: float):
    return None if value is None or not math.isfinite(value) else float(value) * scale


def summary_table(scores: BenchmarkScores, model: str = "model", *, mode: str | None = None) -> SummaryTable:
    """The paper's table for one benchmark run (one row, labelled `model`).

    Args:
        mode: Table 2's `Mode` column, "S" (single-frame masks) or "M" (multi-frame).
    """
    if scores.benchmark not in LAYOUTS:
        return _per_task_table(scores, model)
    table, group, columns, scale = LAYOUTS[scores.benchmark]
    metrics = scores.metrics
    row = [model] + [_scaled(metrics.get(key), scale) for _, key in columns]
    cells = [(group, name) for name, _ in columns]
    if scores.benchmark == "videorefer-d":
        cells.insert(0, (group, "Mode"))
        row.insert(1, mode or "-")
    return SummaryTable(f"{table} · {group} (n = {scores.count})", "Method", cells, [row],
                        decimals=2 if scale == 1.0 else 1, notes=list(scores.notes))


def _per_task_table(scores: BenchmarkScores, model: str) -> SummaryTable:
    """One row per task; a multiple-choice task's Overall accuracy goes in the Accuracy column."""
    values = {task: {"Accuracy": m["Overall"], **m} if "Overall" in m else m for task, m in scores.per_task.items()}
    names = [c for c in SHAPESWORLD_COLUMNS if any(c in v for v in values.values())]
    rows = [[task, scores.counts[task]] + [_scaled(v.get(n), 100.0) for n in names] for task, v in values.items()]
    title = f"{scores.benchmark} per task · {model} (n = {scores.count})"
    return SummaryTable(title, "Task", [("", "N")] + [("", n) for n in names], rows, notes=list(scores.notes))


def combine_tables(tables: list[SummaryTable]) -> SummaryTable:
    """Runs of one paper table side by side: the union of their column groups, one row per model."""
    titles = {t.title.split(" · ")[0] for t in tables}
    if len(titles) != 1:
        raise ValueError(f"can only combine runs of one paper table, got {sorted(titles)}")
    columns: list[tuple[str, str]] = []
    for t in tables:
        columns += [c for c in t.columns if c not in columns]
    rows: dict[str, dict] = {}
    for t in tables:
        for row in t.rows:
            rows.setdefault(row[0], {}).update(zip(t.columns, row[1:]))
    merged = [[label] + [values.get(c) for c in columns] for label, values in rows.items()]
    notes = list(dict.fromkeys(n for t in tables for n in t.notes))
    return SummaryTable(titles.pop(), tables[0].label, columns, merged, tables[0].decimals, notes)
