"""Every notebook in notebooks/ runs headless under papermill (smoke preset); recorded numbers are checked."""

import json
import math
from pathlib import Path

import pytest

from pixelrefer.notebook import read_records, run_notebooks

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_notebooks(None, "smoke", out_root=tmp_path_factory.mktemp("runs"))


def test_every_notebook_is_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
        assert not dirty, f"{path.name}: cells {dirty} carry outputs"
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"


def test_smoke_run_writes_results_for_every_notebook(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert set(results) == {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert (smoke_run / "index.html").exists() and (smoke_run / "provenance.json").exists()


def test_quickstart_records(smoke_run):
    records = read_records(smoke_run / "00_quickstart.records.jsonl")
    assert records["logits_finite"] is True
    n = records["object_tokens_shape"][1]
    assert records["object_tokens_shape"][0] == 2
    groups = records["token_groups"]
    assert groups["object"] == 2 * n
    if records["framework"] == "vision_object":
        assert groups["vision"] > 0
    else:
        assert "vision" not in groups
    small, large = records["crop_scales"]  # REGIONS: a tiny diamond (32 px), then a large star (539 px)
    assert small > large >= 1.0, "Eq. 2 upscales the tiny object more than the large one"
    assert records["valid_tokens_per_object"][1] >= 1
    assert records["answer_tokens"] >= 1
    assert (smoke_run / "00_quickstart" / "crops.png").stat().st_size > 0
    assert records["picker_objects"] == 2 and records["picker_rle_roundtrip"] is True
    shares = records["explorer_answer_shares"]  # {layer: {group: share of an answer token's attention}}
    assert records["explorer_layers"] == len(shares) >= 1 and records["explorer_heads"] >= 1
    for layer_shares in shares.values():
        assert sum(layer_shares.values()) == pytest.approx(1.0, abs=1e-3) and layer_shares["object"] > 0
    assert records["similarity_objects"] == 2


def test_quickstart_takes_masks_as_parameters(tmp_path):
    """`-p MASKS [...]`: regions given as COCO RLE, not scene indices, reach the picker and the model."""
    from pixelrefer.demo import shapesworld_scene
    from pixelrefer.regions import mask_to_rle

    _, masks = shapesworld_scene(0)
    names = list(masks)
    rles = [mask_to_rle(masks[names[i]]) for i in (4, 2)]  # the large star first, then the tiny diamond
    run = run_notebooks(["00"], "smoke", out_root=tmp_path, parameters={"MASKS": rles})
    records = read_records(run / "00_quickstart.records.jsonl")
    assert records["picker_objects"] == 2 and records["picker_rle_roundtrip"] is True
    large, small = records["crop_scales"]
    assert small > large >= 1.0


def test_train_records(smoke_run):
    records = read_records(smoke_run / "01_train.records.jsonl")
    assert records["steps"] == 3 and records["skipped"] == 0
    assert records["vision_encoder_from"] == "shapes-tiny-lite"  # the notebook's default framework is Lite
    assert all(map(math.isfinite, (records["first_loss"], records["final_loss"])))
    assert len(records["predictions"]) == 2
    assert (smoke_run / "01_train" / "loss.png").stat().st_size > 0


def test_attention_maps_records(smoke_run):
    records = read_records(smoke_run / "02_attention_maps.records.jsonl")
    mass = records["answer_mass"]
    assert len(records["layers"]) == len(mass["object"]) and records["samples"] == 3
    for layer in range(len(records["layers"])):
        assert sum(values[layer] for values in mass.values()) == pytest.approx(1.0, abs=1e-3)
    if records["framework"] == "vision_object":
        assert isinstance(records["F1_object_mass_above_vision_every_layer"], bool)
        assert math.isfinite(records["F2_vision_mass_early_over_late"])
    assert (smoke_run / "02_attention_maps" / "attention_maps.png").stat().st_size > 0


def test_token_similarity_records(smoke_run):
    records = read_records(smoke_run / "03_token_similarity.records.jsonl")
    assert records["aggregated_objects"] > 0
    assert -1 <= records["mean_similarity_after"] <= 1 and -1 <= records["mean_similarity_before"] <= 1
    assert (smoke_run / "03_token_similarity" / "similarity.png").stat().st_size > 0


def test_efficiency_records(smoke_run):
    records = read_records(smoke_run / "04_efficiency.records.jsonl")
    assert len(records["table5"]) == 8
    assert 0 < records["F7_lite_over_vo_flops_measured"] < 1
    assert all(p["seconds_per_item"] > 0 for p in records["profiles"])


def test_video_records(smoke_run):
    from pixelrefer.video import uniform_indices

    records = read_records(smoke_run / "06_video.records.jsonl")
    assert records["video_frames"] == 8 and records["sampled_indices"] == uniform_indices(8, 4)
    assert records["timestamps"] == pytest.approx([t / 4 for t in records["sampled_indices"]])
    assert records["prompt"]["frame"] in records["sampled_indices"] and records["prompt"]["click"] is not None
    assert records["mask_source"] == "ground truth" and records["mask_iou"] == 1.0
    assert records["object_units"] == len(records["mask_positions"]) > 0
    groups = records["token_groups"]
    assert groups["object"] % records["object_units"] == 0, "every unit has the same n slots"
    assert (groups.get("vision", 0) > 0) == (records["framework"] == "vision_object")
    # One object's answer is recorded, not asserted: model quality has floors over many objects in
    # test_model.py and test_video_referring.py; here the answer only has to exist.
    assert isinstance(records["answer_names_colour"], bool) and records["answer"].strip()
    assert (smoke_run / "06_video" / "frames.png").stat().st_size > 0


def test_video_notebook_tracks_with_a_sam2_checkpoint(tmp_path):
    """`-p SAM2_CHECKPOINT=…`: the click goes through MaskPropagator (a tiny random transformers SAM 2)."""
    from tests.test_propagation import write_tiny_transformers_sam2

    checkpoint = write_tiny_transformers_sam2(tmp_path / "sam2", size=128)
    run = run_notebooks(["06"], "smoke", out_root=tmp_path / "runs", parameters={"SAM2_CHECKPOINT": str(checkpoint)})
    records = read_records(run / "06_video.records.jsonl")
    assert records["mask_source"] == "SAM 2 (transformers)" and 0 <= records["mask_iou"] <= 1
    assert records["object_units"] == len(records["mask_positions"]) > 0


def _check_rows(rows, expected):
    assert [(r["framework"], r["variant"]) for r in rows] == expected
    for row in rows:
        assert row["objects"] == row["small_objects"] + row["large_objects"] > 0
        assert 0 <= row["category_acc"] <= 1 and math.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0


def test_token_scaling_records(smoke_run):
    records = read_records(smoke_run / "07_token_scaling.records.jsonl")
    assert records["settings"]["steps"] == 2
    _check_rows(records["rows"], [(f, f"n={n}") for f in ("vision_object", "object_only") for n in (1, 8, 32)])
    findings = records["findings"]
    assert findings["lite_n"] == findings["vo_n"] == [1, 8, 32]
    assert isinstance(records["F4_lite_steady_vo_plateau"], bool)
    assert (smoke_run / "07_token_scaling" / "token_scaling.png").stat().st_size > 0


def test_ablation_records(smoke_run):
    records = read_records(smoke_run / "08_ablations.records.jsonl")
    _check_rows(records["saot_rows"], [("vision_object", v) for v in
                                       ("mask pooling", "w/o expansion", "w/o position emb.", "full")])
    _check_rows(records["oci_rows"], [("object_only", v) for v in ("none", "local only", "global only", "local + global")])
    assert isinstance(records["F5_saot_beats_mask_pooling_most_on_small"], bool)
    assert isinstance(records["F6_local_global_best"], bool)
    assert records["oci_findings"]["best_by_loss"] in {r["variant"] for r in records["oci_rows"]}
    for name in ("saot.png", "oci.png"):
        assert (smoke_run / "08_ablations" / name).stat().st_size > 0


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_analysis_notebooks_run_on_a_converted_release_checkpoint(tmp_path, framework):
    """`-p MODEL=/path/to/converted` across the suite: a release-layout checkpoint, converted, then analysed."""
    from pixelrefer.convert import convert_release
    from tests.test_convert import write_release

    write_release(tmp_path / "release", framework=framework)
    convert_release(tmp_path / "release", tmp_path / "converted")
    model = str(tmp_path / "converted")
    run = run_notebooks(["00", "02", "03", "04"], "smoke", out_root=tmp_path / "runs",
                        parameters={"MODEL": model, "MODELS": [[model, None]]})
    quickstart = read_records(run / "00_quickstart.records.jsonl")
    assert quickstart["framework"] == framework and quickstart["logits_finite"] is True
    attention = read_records(run / "02_attention_maps.records.jsonl")
    assert attention["framework"] == framework and attention["samples"] == 3
    assert read_records(run / "04_efficiency.records.jsonl")["profiles"][0]["framework"] == framework
