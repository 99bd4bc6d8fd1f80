"""Inference profiling: token counts from spans, per-item timing, FLOPs of the measured counts."""

import pytest

from pixelrefer.analysis.flops import llm_flops
from pixelrefer.analysis.profiling import profile_inference, token_counts
from tests.conftest import build


def items(scene, count=3):
    image, masks = scene
    return [("What is <region>?", image, None, [masks["disc"]])] * count


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_profile_counts_tokens_and_times_items(scene, framework):
    model, processor = build(framework)
    encoded = processor.encode("What is <region>?", images=scene[0], masks=[scene[1]["disc"]])
    counts = token_counts(encoded)
    assert counts["object"] == int(encoded.inputs["region_token_valid"].sum())
    assert (counts["vision"] > 0) == (framework == "vision_object")
    profile = profile_inference(model, processor, items(scene), max_new_tokens=2)
    assert profile.items == 2 and profile.seconds_per_item > 0 and profile.peak_memory_gb > 0
    assert profile.memory_kind == "process_peak_rss"
    expected = llm_flops(model.config, counts["object"], counts["vision"], counts["text"]) / 1e12
    assert profile.llm_tflops == pytest.approx(expected)


def test_profile_needs_items_beyond_warmup(scene):
    model, processor = build("object_only")
    with pytest.raises(ValueError, match="warm-up"):
        profile_inference(model, processor, items(scene, 1))
