"""Benchmark runners: released formats, resumable sharded runs, model callables, ShapesWorld end to end."""

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pycocotools import mask as coco_mask

from pixelrefer.data import generate_shapesworld
from pixelrefer.errors import InputError
from pixelrefer.evaluation import PixelReferModel, load_model, load_queries, read_results, run_benchmark
from pixelrefer.evaluation.runners import main as eval_main
from tests.conftest import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small ShapesWorld (test split only) and its records."""
    folder = tmp_path_factory.mktemp("shapesworld")
    test = generate_shapesworld(folder, seed=3, num_images=3, num_videos=2, splits=(0.0, 0.0, 1.0))["test"]
    return folder, json.loads(test.read_text())


def write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def first_answer(record) -> str:
    return record["conversations"][1]["value"]


def frame_folder(record) -> str:
    return str(Path(record["video"][0]).parent)


def released_files(world, folder: Path) -> dict[str, Path]:
    """ShapesWorld rewritten in the released benchmarks' layouts (Osprey LVIS/PACO, VG, HC-STVG, VideoRefer)."""
    root, records = world
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    category = [dict(file_name=r["image"], height=r["height"], width=r["width"],
                     categories=[t["value"] for t in r["conversations"][1::2]],
                     annotations=[{"segmentation": m} for m in r["masks"]]) for r in by_task["category"]]
    vg = [dict(image=[r["image"]], height=r["height"], width=r["width"], caption=first_answer(r),
               boxes=[[int(v) for v in coco_mask.toBbox(dict(r["masks"][0], counts=r["masks"][0]["counts"].encode()))]])
          for r in by_task["short_caption"]]
    videos = by_task["video_caption"]
    key = lambda r: min(r["masks"][0], key=int)  # noqa: E731 — the first frame object 0 is seen in
    hc_stvg = [dict(video=frame_folder(r), frame_idx=key(r), mask=r["masks"][0][key(r)], caption=first_answer(r))
               for r in videos]
    bench_d = [dict(video=frame_folder(r), frame_idx=key(r), caption=first_answer(r),
                    annotation=[{t: {"segmentation": rle} for t, rle in r["masks"][0].items()}]) for r in videos]
    bench_q = [dict({k: v for k, v in r.items() if k not in ("video", "timestamps", "task", "id")},
                    video=frame_folder(r), frame_idx=min(r["annotation"][0], key=int))
               for r in by_task["multiple_choice"]]
    return {"lvis": write(folder / "lvis.json", category), "paco": write(folder / "paco.json", category),
            "vg": write(folder / "vg.json", vg), "hc-stvg": write(folder / "hc_stvg.json", hc_stvg),
            "videorefer-d": write(folder / "bench_d.json", bench_d),
            "videorefer-q": write(folder / "bench_q.json", bench_q)}


def fixed(inputs):
    """A plain callable standing in for a model: the same answer to everything."""
    return ["(A) circle"] * len(inputs)


def echo_length(inputs):
    """A deterministic fake whose answer depends on its input (prompt turns and masks)."""
    return [f"answer {len(text)} {len(masks)}" for text, image, video, masks in inputs]


# ----------------------------------------------------------------------------- queries


def test_shapesworld_multi_turn_records_give_one_teacher_forced_query_per_turn(world):
    root, records = world
    queries = load_queries("shapesworld", root)
    category = [q for q in queries if q.task == "category"]
    first = category[:3]
    assert [q.id for q in first] == [f"{records[0]['id']}#{n}" for n in range(3)]
    assert [len(q.prompt) for q in first] == [1, 3, 5]
    assert first[2].prompt[1]["content"] == records[0]["conversations"][1]["value"]  # earlier reference answers
    assert first[2].reference == records[0]["conversations"][5]["value"]
    text, image, video, masks = first[2].load()
    assert image is not None and video is None and len(masks) == 3
    assert {q.metric for q in queries} == {"category", "caption", "exact", "choice"}
    assert len({q.id for q in queries}) == len(queries)


def test_released_layouts_become_queries_with_the_release_prompts(world, tmp_path):
    files = released_files(world, tmp_path)
    root = world[0]
    lvis = load_queries("lvis", files["lvis"], media_root=root)
    assert lvis[0].prompt[0]["content"].endswith("What is the category of <region>? Using only one word or phrase.")
    assert [q.id for q in lvis[:2]] == ["lvis-0-0", "lvis-0-1"] and lvis[0].metric == "category"
    assert "subpart" in load_queries("paco", files["paco"], media_root=root)[0].question
    vg = load_queries("vg", files["vg"], media_root=root)
    _, _, _, masks = vg[0].load()
    x, y, w, h = json.loads(files["vg"].read_text())[0]["boxes"][0]
    assert masks[0].sum() == w * h and masks[0][y, x] and vg[0].metric == "caption"  # the box is the region
    hc = load_queries("hc-stvg", files["hc-stvg"], media_root=root)
    _, _, video, masks = hc[0].load()
    assert video is not None and len(masks[0]) == 1 and hc[0].task == "video_caption"
    bench_d = load_queries("videorefer-d", files["videorefer-d"], media_root=root)
    assert bench_d[0].metric == "description" and len(bench_d[0].sample.masks[0]) > 1
    single = load_queries("videorefer-d", files["videorefer-d"], media_root=root, key_frame_only=True)
    frame_idx = json.loads(files["videorefer-d"].read_text())[0]["frame_idx"]
    assert list(single[0].sample.masks[0]) == [int(frame_idx)]
    bench_q = load_queries("videorefer-q", files["videorefer-q"], media_root=root, limit=3)
    assert len(bench_q) == 3 and bench_q[0].metric == "choice" and "option's letter" in bench_q[0].question


def test_every_bad_record_is_reported_with_file_and_index(world, tmp_path):
    records = [dict(file_name="images/none.png", height=8, width=8, categories=["a"], annotations=[{}]),
               dict(file_name="x.png", height=8, width=8, categories=["a", "b"], annotations=[{"segmentation": [1]}]),
               dict(height=8, width=8, categories=[], annotations=[])]
    path = write(tmp_path / "bad_lvis.json", records)
    with pytest.raises(InputError) as caught:
        load_queries("lvis", path)
    message = str(caught.value)
    assert "3 bad record(s)" in message
    assert f"{path}:0" in message and f"{path}:1: 2 categories but 1 annotations" in message
    assert f"{path}:2" in message and "'file_name' is missing" in message
    with pytest.raises(ValueError, match="unknown benchmark 'coco'"):
        load_queries("coco", path)
    with pytest.raises(ValueError, match="must say where the region goes"):
        load_queries("lvis", path, prompt="What is this?")
    with pytest.raises(FileNotFoundError, match="vg: benchmark file"):
        load_queries("vg", tmp_path / "missing.json")


# ----------------------------------------------------------------------------- runs with model callables


@pytest.mark.parametrize("benchmark, columns", [
    ("lvis", ["SSim", "SIoU"]),
    ("vg", ["METEOR", "CIDEr"]),
    ("hc-stvg", ["METEOR", "CIDEr", "BLEU@4", "ROUGE-L", "SPICE"]),
    ("videorefer-d", ["Mode", "SC", "AD", "TD", "HD", "Avg"]),
    ("videorefer-q", ["BQ", "SQ", "RlQ", "RsQ", "FP", "Avg"]),
])
def test_a_plain_callable_runs_each_released_benchmark_into_the_papers_table(world, tmp_path, benchmark, columns):
    files = released_files(world, tmp_path)
    out = tmp_path / "results.jsonl"
    result = run_benchmark(fixed, benchmark, files[benchmark], media_root=world[0], out=out, batch_size=4,
                           meteor=False, progress=False, model_name="fixed")
    queries = load_queries(benchmark, files[benchmark], media_root=world[0])
    assert [r["id"] for r in read_results(out)] == [q.id for q in queries]
    assert result.answered == len(queries) and result.resumed == 0
    assert [name for _, name in result.table.columns] == columns
    assert result.table.rows[0][0] == "fixed" and "Method" in str(result.table)
    summary = json.loads(result.summary_path.read_text())
    assert summary["table"]["rows"] == json.loads(json.dumps(result.table.rows))
    if benchmark == "videorefer-q":  # every answer is "(A)": accuracy = share of questions whose answer is (A)
        references = [q.reference for q in queries]
        expected = sum(r.startswith("(A)") for r in references) / len(references)
        assert result.scores.metrics["Overall"] == pytest.approx(expected)
        assert result.table.rows[0][-1] == pytest.approx(100 * expected)
    if benchmark == "videorefer-d":  # no judge: caption metrics instead, and a note saying so
        assert result.table.rows[0][1:] == ["M", None, None, None, None, None]
        assert any("judge" in n for n in result.scores.notes) and "CIDEr" in result.scores.metrics


def test_videorefer_d_is_scored_by_a_pluggable_judge(world, tmp_path):
    files = released_files(world, tmp_path)
    prompts = []

    def judge(prompt):
        prompts.append(prompt)
        return '{"Subject Correspondence": 4, "Appearance Description": 3, "Temporal Description": 2, ' \
               '"Hallucination Detection": 5}'

    result = run_benchmark(fixed, "videorefer-d", files["videorefer-d"], media_root=world[0], judge=judge,
                           key_frame_only=True, out=tmp_path / "d.jsonl", progress=False, model_name="fixed")
    assert len(prompts) == len(result.records) and "(A) circle" in prompts[0]
    assert result.table.rows == [["fixed", "S", 4.0, 3.0, 2.0, 5.0, 3.5]]
    assert "3.50" in str(result.table)


def test_tables_use_the_papers_units_and_runs_combine_side_by_side():
    from pixelrefer.evaluation import BenchmarkScores, combine_tables, summary_table

    lvis = BenchmarkScores("lvis", 10, {"category": {"SSim": 0.8934, "SIoU": 0.82}}, {"category": 10})
    paco = BenchmarkScores("paco", 10, {"category": {"SSim": 0.5, "SIoU": float("nan")}}, {"category": 10})
    first, second = summary_table(lvis, "A"), summary_table(paco, "A")
    assert first.rows == [["A", pytest.approx(89.34), pytest.approx(82.0)]] and "89.3" in str(first)
    combined = combine_tables([first, second, summary_table(lvis, "B")])
    assert combined.columns == [("LVIS", "SSim"), ("LVIS", "SIoU"), ("PACO", "SSim"), ("PACO", "SIoU")]
    assert [row[0] for row in combined.rows] == ["A", "B"] and combined.rows[1][3:] == [None, None]
    assert combined.rows[0][4] is None  # a NaN metric (no answers) is "-" like a missing one
    assert "LVIS" in str(combined).splitlines()[1] and "-" in str(combined).splitlines()[-1]
    with pytest.raises(ValueError, match="one paper table"):
        hc_stvg = BenchmarkScores("hc-stvg", 1, {"video_caption": {}}, {"video_caption": 1})
        combine_tables([first, summary_table(hc_stvg)])


def test_an_interrupted_run_resumes_where_it_stopped(world, tmp_path):
    root = world[0]
    full = run_benchmark(echo_length, "shapesworld", root, out=tmp_path / "full.jsonl", batch_size=4, meteor=False,
                         progress=False)
    assert full.model == "echo_length" and {r["model"] for r in full.records} == {"echo_length"}
    calls = []

    def crashes_on_third_batch(inputs):
        calls.append(len(inputs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return echo_length(inputs)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(crashes_on_third_batch, "shapesworld", root, out=out, batch_size=4, progress=False,
                      model_name="echo_length")
    written = read_results(out)
    assert len(written) == sum(calls[:2])
    with open(out, "a") as f:
        f.write('{"id": "torn')  # a line cut off mid-write
    resumed = run_benchmark(echo_length, "shapesworld", root, out=out, batch_size=4, meteor=False, progress=False)
    assert resumed.resumed == len(written) and resumed.answered == len(full.records) - len(written)
    assert read_results(out) == full.records
    assert resumed.scores.per_task == full.scores.per_task
    again = run_benchmark(echo_length, "shapesworld", root, out=out, meteor=False, progress=False)
    assert again.answered == 0 and again.records == full.records  # nothing left to ask
    with pytest.raises(ValueError, match="holds answers of model 'echo_length', not 'fixed'"):
        run_benchmark(fixed, "shapesworld", root, out=out, progress=False)


def test_a_wrong_number_of_answers_is_an_error(world, tmp_path):
    with pytest.raises(ValueError, match="returned 1 answers for a batch of 4"):
        run_benchmark(lambda inputs: ["x"], "shapesworld", world[0], out=tmp_path / "r.jsonl", batch_size=4,
                      progress=False)


def test_the_adapter_answers_a_batch_as_it_answers_each_query_alone(world):
    model, processor = build("vision_object")
    adapter = PixelReferModel(model, processor, max_new_tokens=6)
    queries = load_queries("shapesworld", world[0])
    picked = [q.load() for q in queries[:3] + [q for q in queries if q.sample.is_video][:2]]
    batched = adapter(picked)
    assert batched == [adapter([item])[0] for item in picked]
    assert all(isinstance(a, str) for a in batched)


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_answer_losses_are_each_answers_summed_loss_after_the_query(world, framework):
    """One batch of answers of different lengths gives, per answer, its loss alone times its label count."""
    model, processor = build(framework)
    adapter = PixelReferModel(model, processor)
    query = next(q for q in load_queries("shapesworld", world[0]) if q.sample.is_video).load()
    answers = ["(A) red", "(B) it moves left and then disappears"]
    batched = adapter.answer_losses(query, answers)
    for answer, loss in zip(answers, batched):
        text, image, video, masks = query
        batch = processor(text=[list(text) + [{"role": "assistant", "content": answer}]], images=[image],
                          videos=[video], masks=[list(masks)])
        with torch.no_grad():
            mean = model(**batch).loss
        assert loss == pytest.approx(float(mean) * int((batch["labels"][:, 1:] != -100).sum()), rel=1e-4)
    assert adapter.answer_losses(query, []) == []


def test_shapesworld_end_to_end_with_the_tiny_model(world, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weight preset warns that its answers are meaningless
        model = load_model("auto", max_new_tokens=12)
    result = run_benchmark(model, "shapesworld", world[0], out=tmp_path / "r.jsonl", limit=24, batch_size=8,
                           meteor=False, progress=False)
    assert len(result.records) == 24 and result.answered == 24
    assert sum(result.scores.counts.values()) == 24
    for task, values in result.scores.per_task.items():
        finite = [v for k, v in values.items() if v is not None]
        assert finite and all(math.isfinite(v) for v in finite), task
    assert result.table.label == "Task" and len(result.table.rows) == len(result.scores.per_task)


@pytest.mark.filterwarnings("ignore:preset .tiny. has random weights")
def test_the_eval_command(world, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    code = eval_main(["eval", "--model", "tiny", "--benchmark", "shapesworld", "--data", str(world[0]), "--limit", "6",
                      "--out", str(out), "--max-new-tokens", "4", "--no-meteor"])
    printed = capsys.readouterr().out
    assert code == 0 and "shapesworld per task" in printed and str(out) in printed
    assert len(read_results(out)) == 6 and out.with_name("cli.summary.json").exists()
    assert eval_main(["eval", "--benchmark", "lvis", "--out", str(out)]) == 2
    assert "lvis: give the benchmark file" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = ["eval", "--model", "tiny", "--benchmark", "shapesworld", "--data", str(world[0]), "--limit", "14",
            "--max-new-tokens", "4", "--batch-size", "3", "--no-meteor"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "pixelrefer.evaluation.runners", *args,
               "--out", str(tmp_path / "two.jsonl")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("two.shard-*")), "shards are merged and removed"
    assert json.loads((tmp_path / "two.summary.json").read_text())["processes"] == 2
    one = subprocess.run([sys.executable, "-m", "pixelrefer.evaluation.runners", *args,
                          "--out", str(tmp_path / "one.jsonl")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert read_results(tmp_path / "two.jsonl") == read_results(tmp_path / "one.jsonl")


def test_shapesworld_test_split_defaults_to_the_shipped_models_data(tmp_path, monkeypatch):
    """The held-out split must be the one the embedded models were trained beside (counts change the split)."""
    from pixelrefer.evaluation import runners
    from pixelrefer.training import TRAIN_PRESETS

    asked = {}

    def fake_generate(folder, **kwargs):
        asked.update(kwargs)
        return {"test": tmp_path / "test.json"}

    monkeypatch.setattr(runners, "generate_shapesworld", fake_generate)
    runners.shapesworld_test_split(tmp_path)
    assert asked == TRAIN_PRESETS["shapes-tiny"]["shapesworld"]
    runners.shapesworld_test_split(tmp_path, num_images=10)
    assert asked["num_images"] == 10 and asked["seed"] == TRAIN_PRESETS["shapes-tiny"]["shapesworld"]["seed"]


def test_shapesworld_test_split_is_reused_only_at_the_same_parameters_and_version(tmp_path, monkeypatch):
    from pixelrefer.data.shapesworld import VERSION
    from pixelrefer.evaluation import runners

    calls = []
    monkeypatch.setattr(runners, "generate_shapesworld", lambda folder, **kw: calls.append(kw) or {"test": "new"})
    wanted = dict(seed=3, num_images=10, num_videos=2, image_choice=False)
    (tmp_path / "test.json").write_text("[]")
    info = tmp_path / "info.json"
    info.write_text(json.dumps(dict(wanted, version=VERSION)))
    assert runners.shapesworld_test_split(tmp_path, **wanted) == tmp_path / "test.json" and not calls
    info.write_text(json.dumps(dict(wanted, version=VERSION - 1)))
    assert runners.shapesworld_test_split(tmp_path, **wanted) == "new" and calls == [wanted], "an older version"
    info.write_text(json.dumps(dict(wanted, version=VERSION, num_videos=3)))
    assert runners.shapesworld_test_split(tmp_path, **wanted) == "new" and len(calls) == 2


def test_benchmark_split_options_name_the_split(tmp_path):
    import argparse

    from pixelrefer.evaluation.runners import add_split_arguments, split_from_arguments

    parser = argparse.ArgumentParser()
    add_split_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.data, defaults.num_images, defaults.num_videos, defaults.image_choice, defaults.location,
            defaults.last_location, defaults.short_answers) == ("runs/eval-shapesworld", None, None, False, False,
                                                                False, False)
    args = parser.parse_args(["--data", str(tmp_path), "--num-images", "3", "--num-videos", "2", "--image-choice",
                              "--location", "--last-location", "--short-answers"])
    test_file = split_from_arguments(args)
    info = json.loads((tmp_path / "info.json").read_text())
    assert test_file == tmp_path / "test.json"
    assert (info["num_images"], info["num_videos"], info["image_choice"], info["location"],
            info["last_location"], info["short_answers"]) == (3, 2, True, True, True, True)
    assert "location" in {record["task"] for record in json.loads(test_file.read_text())}
    assert "video_last_location" in {record["task"] for split in ("train", "val", "test")
                                     for record in json.loads((tmp_path / f"{split}.json").read_text())}


def test_probe_parser_gives_the_shared_probe_options_and_takes_a_scripts_own():
    from pixelrefer.evaluation.runners import probe_parser

    parser = probe_parser("a probe", model="shapes-tiny", train_records=300)
    parser.add_argument("--ridge", type=float, default=1.0)
    defaults = parser.parse_args([])
    assert (defaults.model, defaults.train_records, defaults.threads, defaults.ridge, defaults.last_location) == (
        "shapes-tiny", 300, None, 1.0, False)
    args = parser.parse_args(["--model", "m", "--train-records", "8", "--threads", "1", "--location"])
    assert (args.model, args.train_records, args.threads, args.location) == ("m", 8, 1, True)
