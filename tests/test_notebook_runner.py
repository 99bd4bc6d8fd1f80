"""The papermill runner and `record`, on two throwaway notebooks (one records, one raises)."""

import json
import math

import nbformat
import numpy as np
import pytest

from pixelrefer import notebook
from pixelrefer.cli import main
from pixelrefer.notebook import NotebookRunError, read_records, record, run_notebooks

PARAMETERS = 'DEVICE = "cpu"\nSEED = 0\nPRESET = ""\nOUTPUT_DIR = "."\nSCALE = 1.0'
RECORDS = """\
import os
from pixelrefer.notebook import record
open(os.path.join(OUTPUT_DIR, "curve.png"), "wb").write(b"not really a png")
record("x", 1.5 * SCALE)
record("preset", PRESET)
record("seed", SEED)
record("bad", float("nan"))
"""


def write_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebooks")
    write_notebook(folder / "01_records.ipynb", RECORDS)
    write_notebook(folder / "02_fails.ipynb", 'raise ValueError("boom")')
    return folder, {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def run(sources, tmp_path_factory):
    folder, _ = sources
    out = tmp_path_factory.mktemp("runs")
    return run_notebooks(None, "smoke", out, parameters={"SCALE": 1.0}, notebook_dir=folder, keep_going=True)


@pytest.mark.notebooks
def test_run_folder_and_results(run):
    assert run.name.endswith("-smoke") and run.parent.name.startswith("runs")
    results = json.loads((run / "results.json").read_text())
    assert results["01_records"] == {"x": 1.5, "preset": "smoke", "seed": 0, "bad": None}
    assert results["02_fails"] == {}
    assert read_records(run / "01_records.ipynb")["x"] == 1.5
    assert read_records(run)["01_records"]["x"] == 1.5


@pytest.mark.notebooks
def test_provenance(run):
    prov = json.loads((run / "provenance.json").read_text())
    for key in ("versions", "python", "platform", "device", "git_commit", "preset", "seeds", "started", "finished"):
        assert key in prov
    assert {"torch", "transformers", "pixelrefer", "papermill", "numpy"} <= set(prov["versions"])
    assert "cuda_available" in prov["device"]
    nb = prov["notebooks"]
    assert nb["01_records"]["status"] == "ok" and nb["01_records"]["nonfinite"] == ["bad"]
    assert nb["01_records"]["parameters"]["OUTPUT_DIR"] == str(run / "01_records")
    assert nb["02_fails"]["status"] == "failed" and "boom" in nb["02_fails"]["error"]
    assert prov["seeds"] == {"01_records": 0, "02_fails": 0}


@pytest.mark.notebooks
def test_index_links_notebooks_figures_and_status(run):
    index = (run / "index.html").read_text()
    assert 'href="01_records.ipynb"' in index and 'href="02_fails.ipynb"' in index
    assert 'href="01_records/curve.png"' in index
    assert 'href="results.json"' in index and 'href="provenance.json"' in index
    assert "ValueError: boom" in index and 'class="failed"' in index


@pytest.mark.notebooks
def test_executed_copies_in_run_folder_sources_unchanged(run, sources):
    folder, before = sources
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    executed = nbformat.read(run / "01_records.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["PRESET"] == "smoke"
    assert all(cell.execution_count for cell in executed.cells if cell.cell_type == "code")
    assert not list(folder.glob("*.jsonl")) and not list(folder.glob("01_records"))


@pytest.mark.notebooks
def test_failure_raises_naming_the_notebook(sources, tmp_path):
    folder, _ = sources
    with pytest.raises(NotebookRunError, match="02_fails") as info:
        run_notebooks(["02"], "smoke", tmp_path, notebook_dir=folder)
    assert info.value.failed == ["02_fails"]
    assert info.value.run_dir.parent == tmp_path and str(info.value.run_dir) in str(info.value)


@pytest.mark.notebooks
def test_cli_reports_failure(sources, tmp_path, capsys, monkeypatch):
    folder, _ = sources
    monkeypatch.chdir(tmp_path)  # a relative --out must still give kernels an absolute OUTPUT_DIR
    code = main(["notebooks", "run", "--preset", "smoke", "--out", "runs", "--notebook-dir", str(folder), "02"])
    line = capsys.readouterr().out.strip()
    assert code == 1 and "0/1 notebooks ok, failed: 02_fails" in line
    run_dir = next((tmp_path / "runs").iterdir())
    assert line.startswith(f"{run_dir}: ")
    params = json.loads((run_dir / "provenance.json").read_text())["notebooks"]["02_fails"]["parameters"]
    assert params["OUTPUT_DIR"] == str(run_dir / "02_fails")


def test_cli_usage_errors(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_unknown_notebook_name(sources, tmp_path):
    folder, _ = sources
    with pytest.raises(ValueError, match="no notebook matches"):
        run_notebooks(["99"], "smoke", tmp_path, notebook_dir=folder)
    assert not list(tmp_path.iterdir())


def test_record_outside_a_runner(monkeypatch, tmp_path):
    monkeypatch.delenv(notebook.RECORD_ENV, raising=False)
    value = np.float32(0.25)
    assert record("y", value) is value
    assert notebook.RECORDS["y"] == 0.25
    record("arr", np.arange(3))
    assert notebook.RECORDS["arr"] == [0, 1, 2]


def test_record_to_file_converts_and_flags_nonfinite(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "r.records.jsonl"
    monkeypatch.setenv(notebook.RECORD_ENV, str(path))
    record("t", torch.tensor([1.0, math.inf]))
    record("d", {"a": np.int64(3), "b": (1, 2)})
    record("t", torch.tensor(2.0))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"name": "t", "value": [1.0, None], "nonfinite": True}
    assert read_records(path) == {"t": 2.0, "d": {"a": 3, "b": [1, 2]}}
    with pytest.raises(TypeError, match="record\\('o'\\)"):
        record("o", object())
