"""Notebook results and the papermill runner.

Notebooks in `notebooks/` are committed without outputs and executed headlessly
by `run_notebooks`, which writes everything into a new run folder:

    runs/<UTC timestamp>-<preset>/
        <stem>.ipynb              executed copy (outputs live only here)
        <stem>.records.jsonl      what the notebook passed to `record`
        <stem>/                   the notebook's OUTPUT_DIR (figures)
        results.json              {stem: {name: value}}
        provenance.json           versions, device, git commit, parameters, times
        index.html                links to all of the above, with each status

Notable choices:

- `record(name, value)` appends one JSON line per call (flush + fsync), so the
  values a notebook recorded before it crashed survive. The file is named by
  the `PIXELREFER_RECORD_FILE` environment variable, which the runner sets for
  each kernel; without it (a notebook opened by hand) values go to the
  module-level `RECORDS` dict only.
- Non-finite floats (NaN, ±inf) are recorded as `null`, never rejected: the
  notebook keeps running, the JSON stays strict, and a CI assertion on the
  number fails loudly. The names are flagged (`"nonfinite": true` in the line,
  listed under `nonfinite` in provenance.json).
- Parameters come from `PRESETS[preset]`: a `common` layer, then a layer looked
  up by notebook stem, then `PRESET` and `OUTPUT_DIR`, then the caller's
  overrides. Names are UPPER_CASE, as in the notebooks' `parameters` cell.
- A failing notebook is marked failed and the others still run; the runner
  raises `NotebookRunError` at the end unless `keep_going=True`.
- Kernel: papermill's `kernel_name="python3"` resolves, inside a virtualenv,
  to the environment's own kernelspec, whose `python` jupyter_client replaces
  by `sys.executable`; so running from `.venv/bin/python` executes notebooks
  in the venv. `kernel_name=None` uses the notebook's own kernelspec. If a
  user-level `python3` kernelspec points at another interpreter, run
  `.venv/bin/python -m ipykernel install --user --name python3` once.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

RECORD_ENV = "PIXELREFER_RECORD_FILE"
REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
FIGURE_SUFFIXES = (".png", ".html", ".svg")

# Values recorded in this process (a notebook kernel, or a plain session).
RECORDS: dict[str, Any] = {}

# Ablation studies train one tiny model per variant: a few steps to exercise the path (smoke), a
# miniature that fits `make workbench`'s CPU budget (teaching), longer runs on a GPU (paper).
_SMOKE_STUDY = {"STEPS": 2, "BATCH_SIZE": 2, "DATASET_IMAGES": 12, "DATASET_VIDEOS": 2, "EVAL_RECORDS": 2,
                "LOSS_RECORDS": 3}
_TEACHING_STUDY = {"STEPS": 30, "BATCH_SIZE": 8, "DATASET_IMAGES": 200, "DATASET_VIDEOS": 20, "EVAL_RECORDS": 20,
                   "LOSS_RECORDS": 32}
_PAPER_STUDY = {"STEPS": 1500, "BATCH_SIZE": 32, "DATASET_IMAGES": 4000, "DATASET_VIDEOS": 400, "EVAL_RECORDS": 200,
                "LOSS_RECORDS": 256, "MIXED_PRECISION": "bf16"}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "common": {"DEVICE": "cpu", "SEED": 0},
        "01_train": {"STEPS": 3, "BATCH_SIZE": 4, "DATASET_IMAGES": 12, "DATASET_VIDEOS": 3, "NUM_PREDICTIONS": 2},
        "02_attention_maps": {"NUM_SAMPLES": 3},
        "03_token_similarity": {"NUM_RECORDS": 4},
        "04_efficiency": {"ITEMS": 2, "MAX_NEW_TOKENS": 4},
        "05_evaluation": {"DATASET_IMAGES": 10, "DATASET_VIDEOS": 4, "MAX_NEW_TOKENS": 8, "METEOR": False},
        "06_video": {"VIDEO_FRAMES": 8, "NUM_FRAMES": 4, "MAX_NEW_TOKENS": 8},
        "07_token_scaling": {"TOKEN_COUNTS": [1, 8, 32], **_SMOKE_STUDY},
        "08_ablations": dict(_SMOKE_STUDY),
    },
    "teaching": {
        "common": {"DEVICE": "cpu", "SEED": 0},
        "05_evaluation": {"LIMIT": 200},
        "06_video": {"VIDEO_FRAMES": 16, "NUM_FRAMES": 8},
        "07_token_scaling": {"TOKEN_COUNTS": [1, 8, 32], **_TEACHING_STUDY},
        "08_ablations": dict(_TEACHING_STUDY),
    },
    "paper": {
        "common": {"DEVICE": "cuda", "SEED": 0},
        "00_quickstart": {"MODEL": "2b", "DTYPE": "bfloat16"},
        "01_train": {"STEPS": 2000, "BATCH_SIZE": 32, "DATASET_IMAGES": 4000, "DATASET_VIDEOS": 800, "NUM_PREDICTIONS": 32,
                     "VISION_ENCODER": None, "VISION_PRETRAIN_STEPS": 1500},
        "02_attention_maps": {"MODEL": "2b", "DTYPE": "bfloat16", "NUM_SAMPLES": 24, "MAP_LAYERS": [0, 7, 14, 27]},
        "03_token_similarity": {"MODEL": "2b", "NUM_RECORDS": 24},
        "04_efficiency": {"MODELS": [["2b", "vision_object"], ["2b", "object_only"]], "DTYPE": "bfloat16", "ITEMS": 12},
        "05_evaluation": {"LIMIT": None, "BATCH_SIZE": 32},
        "06_video": {"MODEL": "2b", "DTYPE": "bfloat16", "VIDEO_FRAMES": 32, "NUM_FRAMES": 16},
        "07_token_scaling": dict(_PAPER_STUDY),
        "08_ablations": dict(_PAPER_STUDY),
    },
}


# --------------------------------------------------------------------- record


def record(name: str, value: Any) -> Any:
    """Record a result of the running notebook and return `value` unchanged.

    Args:
        name: key under which the value appears in results.json.
        value: numbers, strings, bools, None, lists/tuples/dicts of those, and
            numpy / torch scalars or arrays (converted with `.tolist()`).
    """
    nonfinite: list[bool] = []
    clean = _to_json(value, nonfinite, name)
    RECORDS[name] = clean
    path = os.environ.get(RECORD_ENV)
    if path:
        entry = {"name": name, "value": clean}
        if nonfinite:
            entry["nonfinite"] = True
        _append_line(Path(path), json.dumps(entry, allow_nan=False))
    return value


def read_records(path: str | os.PathLike) -> dict[str, Any]:
    """Read recorded values back.

    Args:
        path: a `.records.jsonl` file -> `{name: value}` (the last value of a
            name wins); an executed `<stem>.ipynb` in a run folder -> the same
            for its sibling records file; a run folder -> `{stem: {name: value}}`.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.records.jsonl"))
        return {f.name.removesuffix(".records.jsonl"): read_records(f) for f in files}
    if path.suffix == ".ipynb":
        path = path.with_name(path.stem + ".records.jsonl")
    return {entry["name"]: entry["value"] for entry in _read_lines(path)}


def _to_json(value: Any, nonfinite: list[bool], name: str) -> Any:
    """Convert `value` to plain JSON types; non-finite floats become None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        nonfinite.append(True)
        return None
    if isinstance(value, dict):
        return {str(k): _to_json(v, nonfinite, name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, nonfinite, name) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return _to_json(value.tolist(), nonfinite, name)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"record({name!r}): cannot store a {type(value).__name__} as JSON")


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# --------------------------------------------------------------------- runner


class NotebookRunError(RuntimeError):
    """Raised after a run in which at least one notebook failed."""

    def __init__(self, run_dir: Path, failed: list[str]):
        self.run_dir = run_dir
        self.failed = failed
        super().__init__(f"{len(failed)} notebook(s) failed: {', '.join(failed)} (run folder: {run_dir})")


@dataclass
class NotebookResult:
    """How one notebook of a run went."""

    stem: str
    parameters: dict[str, Any]
    status: str = "pending"  # "ok" | "failed"
    error: str | None = None
    started: str = ""
    seconds: float = 0.0
    nonfinite: list[str] = field(default_factory=list)


def preset_parameters(preset: str, stem: str) -> dict[str, Any]:
    """The preset's parameters for one notebook: `common`, then the stem's layer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    layers = PRESETS[preset]
    return {**layers.get("common", {}), **layers.get(stem, {}), "PRESET": preset}


def find_notebooks(notebook_dir: Path, names: list[str] | None) -> list[Path]:
    """Notebooks in `notebook_dir`, sorted; `names` keeps those whose stem equals or starts with one."""
    paths = sorted(notebook_dir.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no notebooks in {notebook_dir}")
    if not names:
        return paths
    unknown = [n for n in names if not any(p.stem.startswith(n) for p in paths)]
    if unknown:
        raise ValueError(f"no notebook matches {unknown}; available: {[p.stem for p in paths]}")
    return [p for p in paths if any(p.stem.startswith(n) for n in names)]


def run_notebooks(
    names: list[str] | None,
    preset: str,
    out_root: str | os.PathLike = "runs",
    parameters: dict[str, Any] | None = None,
    kernel_name: str | None = "python3",
    *,
    notebook_dir: str | os.PathLike | None = None,
    keep_going: bool = False,
) -> Path:
    """Execute notebooks with papermill into a new run folder and return its path.

    Args:
        names: notebook stems or stem prefixes to run; None runs all of them.
        preset: a key of `PRESETS` (`smoke`, `teaching`, `paper`).
        out_root: where the run folder `<UTC timestamp>-<preset>/` is created.
        parameters: overrides applied to every notebook, after the preset.
        kernel_name: Jupyter kernel; None uses each notebook's kernelspec.
        notebook_dir: source folder (never written to); default `notebooks/`.
        keep_going: return normally even when a notebook failed.

    Raises:
        NotebookRunError: a notebook failed (after all ran), unless `keep_going`.
    """
    source = Path(notebook_dir) if notebook_dir is not None else NOTEBOOK_DIR
    paths = find_notebooks(source, names)
    started = _now()
    # Absolute, because kernels run with the notebook's folder as working directory.
    run_dir = _new_run_dir(Path(out_root).resolve(), started, preset)
    results = []
    for path in paths:
        params = {**preset_parameters(preset, path.stem), "OUTPUT_DIR": str(run_dir / path.stem), **(parameters or {})}
        results.append(_execute(path, run_dir, params, kernel_name))
    _write_summary(run_dir, results, preset, kernel_name, started, _now())
    failed = [r.stem for r in results if r.status != "ok"]
    if failed and not keep_going:
        raise NotebookRunError(run_dir, failed)
    return run_dir


def notebook_status(run_dir: str | os.PathLike) -> dict[str, str]:
    """`{stem: "ok" | "failed"}` of a finished run, read from its provenance.json."""
    provenance = json.loads((Path(run_dir) / "provenance.json").read_text())
    return {stem: nb["status"] for stem, nb in provenance["notebooks"].items()}


def _execute(path: Path, run_dir: Path, params: dict[str, Any], kernel_name: str | None) -> NotebookResult:
    """Run one notebook; failures are caught and returned, not raised."""
    import papermill as pm

    result = NotebookResult(path.stem, params, started=_now().isoformat())
    Path(params["OUTPUT_DIR"]).mkdir(parents=True, exist_ok=True)
    records = run_dir / f"{path.stem}.records.jsonl"
    records.touch()
    clock = datetime.now(timezone.utc)
    try:
        with _kernel_env(records):
            pm.execute_notebook(
                str(path),
                str(run_dir / path.name),
                parameters=params,
                kernel_name=kernel_name,
                cwd=str(path.parent),
                progress_bar=False,
                log_output=False,
                **_engine_options(),
            )
        result.status = "ok"
    except Exception as exc:  # noqa: BLE001 — any failure marks this notebook, the run goes on
        result.status, result.error = "failed", _error_message(exc)
    result.seconds = round((datetime.now(timezone.utc) - clock).total_seconds(), 3)
    result.nonfinite = sorted({e["name"] for e in _read_lines(records) if e.get("nonfinite")})
    return result


def _engine_options() -> dict[str, Any]:
    """Encrypt kernel traffic (CurveZMQ) where jupyter_client can provision keys.

    jupyter_client >= 8.10 does so for kernelspecs that declare support; without it
    ipykernel warns, on every start, that it runs over plain TCP.
    """
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if "transport_encryption" not in KernelManager.class_trait_names() or not zmq.has("curve"):
        return {}
    return {"config": Config({"KernelManager": {"transport_encryption": "auto"}})}


@contextmanager
def _kernel_env(records: Path) -> Iterator[None]:
    """Environment the kernel inherits: the records file, and this checkout on PYTHONPATH."""
    saved = {k: os.environ.get(k) for k in (RECORD_ENV, "PYTHONPATH")}
    os.environ[RECORD_ENV] = str(records.resolve())
    # The kernel must import the same pixelrefer as the runner, installed or not.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), saved["PYTHONPATH"]) if p)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _error_message(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # papermill's PapermillExecutionError carries the kernel's exception
        return f"{ename}: {evalue}"
    return f"{type(exc).__name__}: {exc}"


def _new_run_dir(out_root: Path, started: datetime, preset: str) -> Path:
    """Create `<out_root>/<UTC timestamp>-<preset>/`, suffixed `-2`, `-3`… on a clash."""
    out_root.mkdir(parents=True, exist_ok=True)
    base = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{preset}"
    for i in range(1, 1000):
        run_dir = out_root / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder {base} in {out_root}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -------------------------------------------------------------------- summary


def _write_summary(
    run_dir: Path, results: list[NotebookResult], preset: str, kernel_name: str | None, start: datetime, end: datetime
) -> None:
    merged = {r.stem: read_records(run_dir / f"{r.stem}.records.jsonl") for r in results}
    _write_atomic(run_dir / "results.json", json.dumps(merged, indent=2, allow_nan=False))
    provenance = _provenance(results, preset, kernel_name, start, end)
    _write_atomic(run_dir / "provenance.json", json.dumps(provenance, indent=2, default=str))
    _write_atomic(run_dir / "index.html", _index_html(run_dir, results, preset))


def _provenance(
    results: list[NotebookResult], preset: str, kernel_name: str | None, start: datetime, end: datetime
) -> dict[str, Any]:
    return {
        "preset": preset,
        "started": start.isoformat(),
        "finished": end.isoformat(),
        "versions": {pkg: _version(pkg) for pkg in ("pixelrefer", "torch", "transformers", "papermill", "numpy")},
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "device": _device_info(),
        "git_commit": _git_commit(),
        "kernel": {"name": kernel_name, "argv": _kernel_argv(kernel_name)},
        "seeds": {r.stem: r.parameters.get("SEED") for r in results},
        "notebooks": {
            r.stem: {
                "status": r.status,
                "error": r.error,
                "started": r.started,
                "seconds": r.seconds,
                "parameters": r.parameters,
                "nonfinite": r.nonfinite,
            }
            for r in results
        },
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _device_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": False}
    cuda = torch.cuda.is_available()
    return {"cuda_available": cuda, "cuda_device": torch.cuda.get_device_name(0) if cuda else None}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _kernel_argv(kernel_name: str | None) -> list[str] | None:
    if kernel_name is None:
        return None
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return KernelSpecManager().get_kernel_spec(kernel_name).argv
    except Exception:  # noqa: BLE001 — provenance is best effort; execution reports real errors
        return None


def _index_html(run_dir: Path, results: list[NotebookResult], preset: str) -> str:
    rows = "\n".join(_index_row(run_dir, r) for r in results)
    title = html.escape(f"pixelrefer run {run_dir.name}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 10px;text-align:left;vertical-align:top}}
.ok{{color:#080}} .failed{{color:#c00}}</style></head>
<body><h1>{title}</h1>
<p>Preset <b>{html.escape(preset)}</b> &middot; <a href="results.json">results.json</a>
&middot; <a href="provenance.json">provenance.json</a></p>
<table><tr><th>notebook</th><th>status</th><th>figures</th></tr>
{rows}
</table></body></html>
"""


def _index_row(run_dir: Path, r: NotebookResult) -> str:
    figures_dir = Path(r.parameters["OUTPUT_DIR"])
    figures = sorted(p for p in figures_dir.rglob("*") if p.suffix in FIGURE_SUFFIXES) if figures_dir.is_dir() else []
    links = " ".join(_link(_href(p, run_dir), p.name) for p in figures)
    status = r.status if r.error is None else f"{r.status}: {r.error}"
    return (
        f'<tr><td>{_link(f"{r.stem}.ipynb", r.stem)}</td>'
        f'<td class="{r.status}">{html.escape(status)}</td><td>{links}</td></tr>'
    )


def _href(path: Path, run_dir: Path) -> str:
    """Relative inside the run folder (so it can be moved), a file URI outside it."""
    path, run_dir = path.resolve(), run_dir.resolve()
    return path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else path.as_uri()


def _link(href: str, text: str) -> str:
    return f'<a href="{html.escape(href, quote=True)}">{html.escape(text)}</a>'


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and `os.replace`, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
