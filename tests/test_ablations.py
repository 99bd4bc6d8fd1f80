"""Ablation studies: variants are valid designs, runs are evaluated, resumable and refuse mixed recipes."""

import json
import math

import pytest
import torch

from pixelrefer import PixelReferConfig, PixelReferForConditionalGeneration, PixelReferProcessor
from pixelrefer.analysis import ablations
from pixelrefer.analysis.ablations import AblationSettings, STUDIES, Variant, run_study, study_table, study_variants
from pixelrefer.data import load_annotations
from pixelrefer.demo import shapesworld_scene


def test_studies_are_the_papers_tables():
    scaling = STUDIES["token_scaling"]
    assert sorted((v.framework, v.overrides["num_object_tokens"]) for v in scaling) == sorted(
        (f, n) for f in ("vision_object", "object_only") for n in (1, 8, 16, 32))
    assert [v.name for v in STUDIES["saot"]] == ["mask pooling", "w/o expansion", "w/o position emb.", "full"]
    assert STUDIES["saot"][1].overrides == {"context_padding_patches": 0}  # "expansion" is the context padding
    assert {v.framework for v in STUDIES["oci"]} == {"object_only"}
    oci = {v.name: (v.overrides.get("oci_use_local", True), v.overrides.get("oci_use_global", True)) for v in STUDIES["oci"]}
    assert oci == {"none": (False, False), "local only": (True, False), "global only": (False, True),
                   "local + global": (True, True)}
    slugs = [v.slug for variants in STUDIES.values() for v in variants]
    assert len(slugs) == len(set(slugs))


@pytest.mark.parametrize("variant", [v for vs in STUDIES.values() for v in vs], ids=lambda v: v.slug)
def test_every_variant_builds_and_runs(variant):
    torch.manual_seed(0)
    config = PixelReferConfig.from_preset("tiny", framework=variant.framework, **variant.overrides)
    for key, value in variant.overrides.items():
        assert getattr(config, key) == value
    model = PixelReferForConditionalGeneration(config).eval()
    processor = PixelReferProcessor.from_preset("tiny", framework=variant.framework, **variant.overrides)
    image, masks = shapesworld_scene(0)
    chosen = list(masks.values())[:2]
    turns = [{"role": "user", "content": "<image>\nCompare <region> and <region>."}, {"role": "assistant", "content": "red"}]
    batch = processor(text=[turns], images=[image], masks=[chosen])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    tokens = out.object_outputs.tokens
    expected = 1 if variant.overrides.get("object_tokenizer") == "mask_pooling" else config.num_object_tokens
    assert tokens.shape[:2] == (2, expected)


def test_study_variants_filters_and_rejects():
    assert {v.framework for v in study_variants("token_scaling", ["object_only"])} == {"object_only"}
    with pytest.raises(KeyError, match="unknown ablation study 'nope'"):
        study_variants("nope")
    with pytest.raises(ValueError, match="unknown framework"):
        study_variants("oci", ["lite"])
    assert [v.name for v in study_variants("token_scaling", ["vision_object"], ["n=1", "n=32"])] == ["n=1", "n=32"]
    with pytest.raises(ValueError, match="has no variant"):
        study_variants("saot", names=["n=4"])
    with pytest.raises(ValueError, match="steps must be at least 1"):
        AblationSettings(steps=0)


def test_ablate_command_rejects_unknown_settings(capsys):
    from pixelrefer.cli import main

    assert main(["ablate", "oci", "--set", "lr=3"]) == 2
    assert "KEY one of preset, steps" in capsys.readouterr().out


def test_category_queries_one_per_object(tmp_path):
    from pixelrefer.data import generate_shapesworld

    paths = generate_shapesworld(tmp_path, seed=3, num_images=10, num_videos=0)
    samples = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "category"]
    queries, references, sizes = ablations.category_queries(samples)
    assert len(queries) == sum(len(s.meta["objects"]) for s in samples) == len(references) == len(sizes)
    assert all(len(q.masks) == 1 and q.text[0]["content"].count("<region>") == 1 for q in queries)
    assert set(sizes) <= {"tiny", "small", "medium", "large"}


@pytest.mark.slow
def test_run_study_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    settings = AblationSettings(steps=2, batch_size=2, num_images=12, num_videos=2, eval_records=2, loss_records=3)
    seen = []
    results = run_study("oci", tmp_path, settings, callback=seen.append)
    assert [r.variant for r in results] == ["none", "local only", "global only", "local + global"] == [r.variant for r in seen]
    for result in results:
        m = result.metrics
        assert m["objects"] == m["small_objects"] + m["large_objects"] > 0
        assert 0.0 <= m["category_acc"] <= 1.0 and math.isfinite(m["heldout_loss"]) and m["heldout_loss"] > 0
        saved = json.loads((tmp_path / "oci" / Variant(result.variant, "object_only").slug / "result.json").read_text())
        assert saved["metrics"] == pytest.approx(m, nan_ok=True)
    trained = json.loads((tmp_path / "oci" / "lite-none" / "final" / "config.json").read_text())
    assert trained["oci_use_local"] is False and trained["oci_use_global"] is False
    rows = study_table(results)
    assert [r["variant"] for r in rows] == [r.variant for r in results] and "small_acc" in rows[0]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(ablations, "train", no_training)
    again = run_study("oci", tmp_path, settings)
    assert [r.metrics for r in again] == [r.metrics for r in results]
    with pytest.raises(ValueError, match="another recipe"):
        run_study("oci", tmp_path, AblationSettings(steps=3, batch_size=2, num_images=12, num_videos=2,
                                                    eval_records=2, loss_records=3))


def _result(variant, framework, acc, loss, small=None, large=None):
    metrics = dict(category_acc=acc, small_acc=acc if small is None else small, large_acc=acc if large is None else large,
                   heldout_loss=loss, objects=10, small_objects=5, large_objects=5)
    return ablations.VariantResult("study", variant, framework, {}, {}, metrics, 1.0, loss)


def test_token_scaling_findings_read_the_curves():
    lite = [_result(f"n={n}", "object_only", 0.1 * i, 3.0 - 0.5 * i) for i, n in enumerate((1, 8, 16, 32))]
    vo_plateau = [_result(f"n={n}", "vision_object", 0.5, loss) for n, loss in ((1, 2.0), (8, 1.0), (16, 0.98), (32, 0.97))]
    found = ablations.token_scaling_findings(lite + vo_plateau)
    assert found["lite_improves_steadily"] and found["vo_plateaus"] and found["F4"]
    assert found["vo_gain_1_to_8"] == pytest.approx(1.0) and found["vo_gain_8_to_32"] == pytest.approx(0.03)
    lite_dip = lite[:2] + [_result("n=16", "object_only", 0.2, 2.5)] + lite[3:]  # worse at 16 than at 8
    assert not ablations.token_scaling_findings(lite_dip + vo_plateau)["F4"]
    vo_steady = [_result(f"n={n}", "vision_object", 0.5, loss) for n, loss in ((1, 2.0), (8, 1.8), (32, 1.0))]
    assert not ablations.token_scaling_findings(lite + vo_steady)["vo_plateaus"]
    with pytest.raises(ValueError, match="n = 1, 8 and 32"):
        ablations.token_scaling_findings(lite)


def test_saot_and_oci_findings():
    full = _result("full", "vision_object", 0.8, 1.0, small=0.7, large=0.9)
    pooled = _result("mask pooling", "vision_object", 0.6, 1.2, small=0.4, large=0.8)
    found = ablations.saot_findings([pooled, full])
    assert found["gain_small"] == pytest.approx(0.3) and found["gain_large"] == pytest.approx(0.1) and found["F5"]
    even = _result("mask pooling", "vision_object", 0.6, 1.2, small=0.6, large=0.6)
    assert not ablations.saot_findings([even, _result("full", "vision_object", 0.7, 1.0, small=0.65, large=0.75)])["F5"]
    with pytest.raises(ValueError, match="mask pooling"):
        ablations.saot_findings([full])
    oci = [_result("none", "object_only", 0.5, 1.5), _result("local + global", "object_only", 0.4, 1.1),
           _result("global only", "object_only", 0.6, 1.2)]
    found = ablations.oci_findings(oci)
    assert found == {"best_by_loss": "local + global", "best_by_category_acc": "global only", "F6": True}
    assert not ablations.oci_findings(oci[:1] + oci[2:] + [_result("local + global", "object_only", 0.4, 1.3)])["F6"]


def test_variant_config_shares_a_frozen_vision_encoder(tmp_path):
    settings = AblationSettings(steps=5)
    vo = ablations.variant_config(STUDIES["saot"][0], settings, tmp_path / "train.json", tmp_path / "out")
    lite = ablations.variant_config(STUDIES["oci"][0], settings, tmp_path / "train.json", tmp_path / "out")
    assert (vo.vision_encoder_from, lite.vision_encoder_from) == ("shapes-tiny", "shapes-tiny-lite")
    assert vo.vision_pretrain_steps == 0 and vo.steps == 5 and vo.lr_vision_encoder is None
    assert vo.model_overrides["object_tokenizer"] == "mask_pooling"
    assert vo.model_overrides.get("freeze_vision_encoder", True) is True
    own = ablations.variant_config(STUDIES["saot"][0], AblationSettings(vision_encoder=None), tmp_path / "t.json",
                                   tmp_path / "o")
    assert own.vision_encoder_from is None and own.model_overrides["freeze_vision_encoder"] is False
    assert own.lr_vision_encoder == 3e-4
