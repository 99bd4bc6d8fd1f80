"""Hand-computed checks for pixelrefer.regions (mask decoding, Eq. 2, crop geometry, Eq. 4)."""

import math

import numpy as np
import pytest
import torch

from pixelrefer import regions
from pixelrefer.errors import InputError

OMEGA = 14 * 14


# ----------------------------------------------------------------------------- Eq. 2


@pytest.mark.parametrize(
    "area, threshold, max_scale, expected",
    [
        (10, 100, 8.0, 8.0),  # ceil(sqrt(627.2)) = 26, then capped
        (10, 100, 100.0, 26.0),  # uncapped: the release's value
        (OMEGA * 50, 100, 8.0, 1.0),  # between n·Ω and T·Ω
        (OMEGA * 32 - 1, 100, 8.0, 2.0),  # just under n·Ω: always at least 2x
        (OMEGA * 32, 100, 8.0, 1.0),  # exactly n·Ω
        (OMEGA * 100, 100, 8.0, 1.0),  # exactly T·Ω is not downscaled
        (OMEGA * 400, 100, 8.0, 0.5),
        (OMEGA * 400, 50, 8.0, math.sqrt(0.125)),
    ],
)
def test_scale_ratio_hand_values(area, threshold, max_scale, expected):
    assert regions.scale_ratio(area, OMEGA, 32, threshold, max_scale) == pytest.approx(expected, rel=1e-12)


def test_scale_ratio_upscale_matches_float_formula():
    for area in range(1, OMEGA * 32):
        expected = math.ceil(math.sqrt(OMEGA * 32 / area))
        assert regions.scale_ratio(area, OMEGA, 32, 100, 1e9) == expected, area


def test_scale_ratio_rejects_empty_area():
    with pytest.raises(ValueError, match="positive area"):
        regions.scale_ratio(0, OMEGA, 32, 100, 8.0)


# ----------------------------------------------------------------------------- crop geometry


def test_crop_size_hand_values():
    assert regions.crop_size(30, 45, 2.0, 14, 10**9) == (70, 98)  # ceil(60/14)=5, ceil(90/14)=7
    assert regions.crop_size(30, 45, 0.1, 14, 10**9) == (14, 14)  # at least one patch
    assert regions.crop_size(28, 28, 0.5, 14, 10**9) == (14, 14)  # exact multiple, no extra patch


def test_crop_size_pixel_cap():
    # 100 * 8 / 14 -> 58 cells = 812 px > 448; sqrt step gives 32 cells = 448.
    assert regions.crop_size(100, 100, 8.0, 14, 448 * 448) == (448, 448)
    # sqrt step stalls at 5 cells (70*0.9999/14 rounds up); must still drop a cell.
    assert regions.crop_size(70, 70, 1.0, 14, 70 * 70 - 1) == (56, 56)
    # A thin box keeps its one-patch side; the long side alone shrinks.
    assert regions.crop_size(1, 1000, 1.0, 14, OMEGA * 10) == (14, 140)
    h, w = regions.crop_size(50, 200, 8.0, 14, 448 * 448)
    assert h * w <= 448 * 448 and h % 14 == 0 and w % 14 == 0
    assert abs(w / h - 4.0) < 0.5
    assert all(isinstance(v, int) for v in (h, w))


def test_crop_size_rejects_budget_below_one_patch():
    with pytest.raises(ValueError, match="below one patch"):
        regions.crop_size(10, 10, 1.0, 14, 100)


def test_padded_box_clamps_to_image():
    assert regions.padded_box((40, 40, 50, 60), 10, 100, 100) == (30, 30, 60, 70)
    assert regions.padded_box((5, 3, 20, 40), 28, 50, 30) == (0, 0, 30, 50)


def test_mask_to_box_is_exclusive():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2, 3] = mask[5, 1] = True
    assert regions.mask_to_box(mask) == (1, 2, 4, 6)
    with pytest.raises(InputError, match="empty"):
        regions.mask_to_box(np.zeros((4, 4), dtype=bool))


# ----------------------------------------------------------------------------- Eq. 4


def test_position_grid_hand_values():
    box, H, W = (10, 20, 38, 76), 201, 101  # w_b = 28, h_b = 56
    grid = regions.position_grid(box, 4, 2, H, W)
    assert grid.shape == (4, 2, 2) and grid.dtype == np.float32
    np.testing.assert_allclose(grid[0, 0], [10 / 100, 20 / 200], rtol=1e-6)
    np.testing.assert_allclose(grid[3, 1], [(0.5 * 28 + 10) / 100, (0.75 * 56 + 20) / 200], rtol=1e-6)
    np.testing.assert_allclose(grid[2, 0], [0.1, (0.5 * 56 + 20) / 200], rtol=1e-6)


def test_position_grid_swapped_axes_hand_values():
    # Release quirk: its box is (top, left, bottom, right) = (20, 10, 75, 37), bottom/right
    # inclusive, read as (x0, y0, x1, y1): x0' = 20, y0' = 10, w_b' = 75 - 20 = 55, h_b' = 37 - 10 = 27.
    grid = regions.position_grid((10, 20, 38, 76), 4, 2, 201, 101, swapped_axes=True)
    np.testing.assert_allclose(grid[0, 0], [20 / 100, 10 / 200], rtol=1e-6)
    np.testing.assert_allclose(grid[3, 1], [(0.5 * 55 + 20) / 100, (0.75 * 27 + 10) / 200], rtol=1e-6)


def test_position_grid_single_pixel_image_is_finite():
    grid = regions.position_grid((0, 0, 1, 1), 1, 1, 1, 1)
    assert np.isfinite(grid).all() and (grid == 0).all()


# ----------------------------------------------------------------------------- patch-grid mask


def test_cell_coverage_matches_brute_force_on_non_integer_ratio():
    rng = np.random.default_rng(0)
    mask = rng.random((23, 37)) > 0.6
    gh, gw = 5, 7
    # Upsample by (gh, gw): every cell becomes an exact (23, 37) block to average.
    big = np.repeat(np.repeat(mask.astype(np.float64), gh, axis=0), gw, axis=1)
    reference = big.reshape(gh, 23, gw, 37).mean(axis=(1, 3))
    np.testing.assert_allclose(regions.cell_coverage(mask, gh, gw), reference, rtol=0, atol=1e-12)


def test_mask_to_cells_checkerboard_and_half():
    checker = (np.indices((28, 28)).sum(axis=0) % 2).astype(bool)
    np.testing.assert_allclose(regions.cell_coverage(checker, 2, 2), 0.5)
    assert regions.mask_to_cells(checker, 2, 2).all()  # exactly half counts as on

    half = np.zeros((28, 42), dtype=bool)
    half[:, :21] = True  # columns: cell 0 full, cell 1 half, cell 2 empty
    expected = np.array([[True, True, False], [True, True, False]])
    np.testing.assert_array_equal(regions.mask_to_cells(half, 2, 3), expected)


def test_mask_to_cells_keeps_thin_line():
    line = np.zeros((56, 56), dtype=bool)
    line[30, :] = True  # coverage 1/14 in every cell of grid row 2
    cells = regions.mask_to_cells(line, 4, 4)
    assert cells.sum() == 1 and cells[2].any()
    assert not regions.mask_to_cells(np.zeros((56, 56), dtype=bool), 4, 4).any()


# ----------------------------------------------------------------------------- decoding


def test_decode_mask_arrays_and_tensors():
    floats = np.array([[0.2, 0.6], [0.5, 0.51]])
    expected = np.array([[False, True], [False, True]])  # threshold is strictly > 0.5
    np.testing.assert_array_equal(regions.decode_mask(floats, 2, 2), expected)
    np.testing.assert_array_equal(regions.decode_mask((floats * 255).astype(np.uint8) // 128 * 255, 2, 2), expected)
    np.testing.assert_array_equal(regions.decode_mask(torch.tensor(floats, dtype=torch.bfloat16), 2, 2), expected)
    np.testing.assert_array_equal(regions.decode_mask(torch.tensor(expected), 2, 2), expected)
    out = regions.decode_mask(expected, 2, 2)
    assert out.dtype == bool and out is not expected


def test_decode_mask_rle_compressed_and_uncompressed():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 17)) > 0.5
    rle = regions.mask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [13, 17]
    np.testing.assert_array_equal(regions.decode_mask(rle, 13, 17), mask)
    as_bytes = {"counts": rle["counts"].encode(), "size": rle["size"]}
    np.testing.assert_array_equal(regions.decode_mask(as_bytes, 13, 17), mask)

    # Uncompressed counts run down columns (Fortran order): 2 off, 3 on, 5 off.
    uncompressed = {"counts": [2, 3, 5], "size": [2, 5]}
    expected = np.array([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(regions.decode_mask(uncompressed, 2, 5), expected)


def test_decode_mask_polygon_and_box():
    expected = np.zeros((3, 5), dtype=bool)
    expected[0:2, 0:4] = True
    np.testing.assert_array_equal(regions.decode_mask([[0, 0, 4, 0, 4, 2, 0, 2]], 3, 5), expected)
    np.testing.assert_array_equal(regions.decode_mask([0, 0, 4, 0, 4, 2, 0, 2], 3, 5), expected)

    box = np.zeros((6, 6), dtype=bool)
    box[1:4, 1:3] = True
    np.testing.assert_array_equal(regions.decode_mask([1, 1, 3, 4], 6, 6), box)
    np.testing.assert_array_equal(regions.decode_mask((1.0, 1.0, 3.0, 4.0), 6, 6), box)
    np.testing.assert_array_equal(regions.decode_mask(np.array([1, 1, 3, 4]), 6, 6), box)
    clipped = regions.decode_mask([-5, -5, 2, 2], 6, 6)
    assert clipped.sum() == 4 and clipped[:2, :2].all()


@pytest.mark.parametrize(
    "spec, problem",
    [
        (np.ones((2, 4)), r"\(2, 4\).*\(3, 4\)"),
        (np.ones((3, 4, 1)), r"\(3, 4, 1\).*\(3, 4\)"),
        ({"counts": [12], "size": [4, 3]}, r"RLE size \[4, 3\].*\[3, 4\]"),
        (np.zeros((3, 4)), "empty"),
        ([10, 10, 20, 20], "empty"),  # box outside the image
        (np.full((3, 4), np.nan), "NaN"),
        ([[0, 0, 2, 0, float("nan"), 2]], "NaN"),
        ([0, 0, float("nan"), 2], "NaN"),
        ("abc", "unsupported mask spec of type str"),
        (None, "unsupported mask spec of type NoneType"),
        ([], "unsupported"),
        ([[0, 0, 1, 1, 2]], "even count >= 6"),
        ([0, 0, 1, 1, 2], "even count >= 6"),
        ([[0, 0, 1, 1], [0, 0, 1, 1, 2, 2]], "polygon 0 needs an even count"),
        ([["a", "b"]], "not a flat list"),
        ([3, 0, 1, 2], "malformed"),  # x1 <= x0
        ({"counts": [5, 5], "size": [3, 4]}, "do not sum"),
        ({"counts": [-1, 13], "size": [3, 4]}, "negative"),
        ({"counts": "~~~", "size": [3, 4]}, "malformed compressed RLE"),
        ({"counts": 3.5, "size": [3, 4]}, "string or a list of ints"),
        ({"size": [3, 4]}, "needs 'counts' and 'size'"),
    ],
)
def test_decode_mask_errors_name_where_and_problem(spec, problem):
    with pytest.raises(InputError, match=r"^sample 2, object 1: .*" + problem):
        regions.decode_mask(spec, 3, 4, where="sample 2, object 1")


def test_decode_mask_rejects_rle_string_with_wrong_total():
    rle = regions.mask_to_rle(np.eye(2, dtype=bool))  # counts sum to 4
    with pytest.raises(InputError, match="do not sum to height\\*width = 6"):
        regions.decode_mask({"counts": rle["counts"], "size": [2, 3]}, 2, 3)


# ----------------------------------------------------------------------------- pixels and pipeline


def test_resize_crop_bilinear_up_and_area_down():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[2:6, 3:7] = 90
    up = regions.resize_crop(image, (3, 2, 7, 6), 28, 28)
    assert up.shape == (28, 28, 3) and up.dtype == np.uint8 and (up == 90).all()

    checker = np.zeros((4, 4, 3), dtype=np.uint8)
    checker[(np.indices((4, 4)).sum(axis=0) % 2).astype(bool)] = 200
    down = regions.resize_crop(checker, (0, 0, 4, 4), 2, 2)
    assert (down == 100).all()  # area averaging of each 2x2 block
    with pytest.raises(InputError, match="outside the image"):
        regions.resize_crop(image, (5, 5, 5, 8), 14, 14)


def test_local_crop_shape():
    image = np.random.default_rng(2).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    assert regions.local_crop(image, (10, 5, 40, 45), 224).shape == (224, 224, 3)


def _image(h=200, w=300):
    return np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_crop_object_tiny_object_is_upscaled_within_budget():
    image, mask = _image(), np.zeros((200, 300), dtype=bool)
    mask[100, 150:155] = True  # 5 pixels
    crop = regions.crop_object(image, mask, patch=14, num_tokens=32, downscale_threshold=100)
    assert crop.area == 5 and crop.scale == 8.0  # ceil(sqrt(6272 / 5)) = 36, capped
    assert crop.mask_box == (150, 100, 155, 101)
    assert crop.box == (122, 72, 183, 129)  # 28 px of context on every side
    h, w, _ = crop.pixels.shape
    assert h % 14 == 0 and w % 14 == 0 and h * w <= 448 * 448
    assert h > crop.box[3] - crop.box[1] and w > crop.box[2] - crop.box[0]  # upscaled
    assert crop.grid == (h // 14, w // 14) == crop.cell_mask.shape == crop.positions.shape[:2]
    assert crop.cell_mask.sum() >= 1
    assert crop.positions.min() >= 0 and crop.positions.max() <= 1
    np.testing.assert_allclose(crop.positions[0, 0], [122 / 299, 72 / 199], rtol=1e-6)


def test_crop_object_large_object_is_downscaled():
    image, mask = _image(), np.zeros((200, 300), dtype=bool)
    mask[20:170, 30:280] = True  # 37500 px > T·Ω = 19600
    crop = regions.crop_object(image, mask, patch=14, num_tokens=32, downscale_threshold=100)
    assert crop.scale == pytest.approx(math.sqrt(19600 / 37500))
    assert crop.box == (2, 0, 300, 198)
    assert crop.pixels.shape[:2] == regions.crop_size(198, 298, crop.scale, 14, 448 * 448)
    assert crop.cell_mask.sum() >= 1 and crop.cell_mask.mean() > 0.5
    assert crop.positions.min() >= 0 and crop.positions.max() <= 1

    fixed = regions.crop_object(image, mask, patch=14, num_tokens=32, downscale_threshold=100, dynamic_scaling=False)
    assert fixed.scale == 1.0 and fixed.pixels.shape[:2] == (210, 308)


def test_crop_object_rejects_bad_inputs():
    image, mask = _image(20, 30), np.zeros((20, 30), dtype=bool)
    mask[5, 5] = True
    kwargs = dict(patch=14, num_tokens=32, downscale_threshold=100)
    with pytest.raises(InputError, match="uint8"):
        regions.crop_object(image.astype(np.float32), mask, **kwargs)
    with pytest.raises(InputError, match="mask must be bool"):
        regions.crop_object(image, mask[:10], **kwargs)
    with pytest.raises(InputError, match="mask must be bool"):
        regions.crop_object(image, mask.astype(np.uint8), **kwargs)


def test_applied_scale_reports_the_crop_budget():
    image = np.zeros((96, 128, 3), np.uint8)
    mask = np.zeros((96, 128), bool)
    mask[85, 20:23] = True
    crop = regions.crop_object(image, mask, patch=14, num_tokens=32, downscale_threshold=100, max_crop_pixels=112 * 112)
    assert crop.scale == 8.0
    assert crop.pixels.shape[0] * crop.pixels.shape[1] <= 112 * 112
    assert 1.0 < crop.applied_scale < 4.0
