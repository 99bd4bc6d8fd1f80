"""Eq. 9 / Eq. 10 FLOPs against hand-computed values."""

import pytest

from pixelrefer import PixelReferConfig
from pixelrefer.analysis.flops import TABLE5, layer_flops, llm_flops, table5_comparison


def test_layer_flops_by_hand():
    # n=10, d=8, d_kv=4, m=16: 2·10·64 + 2·10·8·4 + 2·100·8 + 3·10·8·16
    assert layer_flops(10, 8, 4, 16) == 1280 + 640 + 1600 + 3840


def test_vision_object_sums_every_layer():
    config = PixelReferConfig.from_preset("tiny")  # d=128, 4 heads → head 32, 2 kv heads → d_kv=64, m=384, 4 layers
    n = 32 + 100 + 5
    per_layer = 2 * n * 128**2 + 2 * n * 128 * 64 + 2 * n * n * 128 + 3 * n * 128 * 384
    assert llm_flops(config, 32, 100, text_tokens=5) == 4 * per_layer
    assert llm_flops(config, 32, 100, text_tokens=5, layers=1) == per_layer


def test_object_only_adds_infusion_in_vision_width():
    config = PixelReferConfig.from_preset("tiny", framework="object_only")  # vision width 64
    per_layer = 2 * 8 * 128**2 + 2 * 8 * 128 * 64 + 2 * 64 * 128 + 3 * 8 * 128 * 384
    infusion = 2 * (8 + 16) * 64**2 + 2 * (8 + 64) * 64**2
    assert llm_flops(config, 8, 0, local_tokens=16, global_tokens=64) == 4 * per_layer + infusion


def test_framework_mismatches_are_errors():
    with pytest.raises(ValueError, match="no vision tokens"):
        llm_flops(PixelReferConfig.from_preset("tiny", framework="object_only"), 8, 10)
    with pytest.raises(ValueError, match="only exist in Object-Only"):
        llm_flops(PixelReferConfig.from_preset("tiny"), 8, 10, local_tokens=4)


def test_table5_side_by_side_keeps_published_numbers_untouched():
    rows = table5_comparison()
    assert [r["paper_tflops"] for r in rows] == [row.flops_t for row in TABLE5]
    by_key = {(r["setting"], r["model"]): r for r in rows}
    for setting in ("image (DLC-Bench)", "video (HC-STVG)"):
        for size in ("2b", "7b"):
            assert by_key[(setting, f"{size}-lite")]["formula_tflops"] < by_key[(setting, size)]["formula_tflops"] / 10
    # 2B image, all 28 layers, n = 1440, d = 1536, d_kv = 256, m = 8960
    n = 1440
    expected = 28 * (2 * n * 1536**2 + 2 * n * 1536 * 256 + 2 * n * n * 1536 + 3 * n * 1536 * 8960) / 1e12
    assert by_key[("image (DLC-Bench)", "2b")]["formula_tflops"] == pytest.approx(expected, abs=1e-3)
