"""notebooks/05_evaluation.ipynb runs headless with the smoke preset and records the ShapesWorld metrics."""

import json
import math

import pytest

from pixelrefer.notebook import read_records, run_notebooks

pytestmark = pytest.mark.notebooks


def test_evaluation_notebook_records_the_summary(tmp_path):
    run_dir = run_notebooks(["05_evaluation"], "smoke", out_root=tmp_path)
    records = read_records(run_dir / "05_evaluation.records.jsonl")
    assert records["benchmark"] == "shapesworld" and records["count"] == records["answered"] > 0
    assert sum(records["counts"].values()) == records["count"]
    assert {"category", "short_caption", "video_caption", "multiple_choice"} <= set(records["per_task"])
    for task, values in records["per_task"].items():
        assert any(v is not None and math.isfinite(v) for v in values.values()), task
    assert records["table"]["columns"][0] == "Task" and len(records["table"]["rows"]) == len(records["per_task"])
    assert json.loads((run_dir / "results.json").read_text())["05_evaluation"]["count"] == records["count"]
    assert (run_dir / "05_evaluation" / "results.jsonl").exists()
