"""Mask files: every format reads back the masks written, and bad files are rejected by name."""

import json

import numpy as np
import pytest
from PIL import Image

from pixelrefer import InputError
from pixelrefer.data.mask_files import read_mask_file, write_mask_file
from pixelrefer.regions import mask_to_rle

H, W = 24, 32


@pytest.fixture()
def two_masks():
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 12) ** 2 + (xx - 10) ** 2 < 25
    bar = (yy >= 3) & (yy < 6) & (xx >= 20)
    return {"disc": disc, "bar": bar}


@pytest.mark.parametrize("scale", [1, 255])
def test_png_is_one_mask_named_by_its_stem(tmp_path, two_masks, scale):
    Image.fromarray(two_masks["disc"].astype(np.uint8) * scale).save(tmp_path / "disc.png")
    masks = read_mask_file(tmp_path / "disc.png", H, W)
    assert list(masks) == ["disc"]
    np.testing.assert_array_equal(masks["disc"], two_masks["disc"])


def test_rgba_png_uses_colour_not_alpha(tmp_path, two_masks):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[two_masks["bar"], 1] = 200
    Image.fromarray(rgba).save(tmp_path / "bar.png")
    np.testing.assert_array_equal(read_mask_file(tmp_path / "bar.png", H, W)["bar"], two_masks["bar"])


def test_npy_single_and_stack_and_npz(tmp_path, two_masks):
    np.save(tmp_path / "one.npy", two_masks["disc"].astype(np.float32))
    np.save(tmp_path / "stack.npy", np.stack([two_masks["disc"], two_masks["bar"]]))
    np.savez(tmp_path / "named.npz", **two_masks)
    assert list(read_mask_file(tmp_path / "one.npy", H, W)) == ["one"]
    stack = read_mask_file(tmp_path / "stack.npy", H, W)
    assert list(stack) == ["stack[0]", "stack[1]"]
    np.testing.assert_array_equal(stack["stack[1]"], two_masks["bar"])
    named = read_mask_file(tmp_path / "named.npz", H, W)
    assert list(named) == ["disc", "bar"]
    np.testing.assert_array_equal(named["disc"], two_masks["disc"])


def test_json_forms(tmp_path, two_masks):
    rles = {name: mask_to_rle(mask) for name, mask in two_masks.items()}
    (tmp_path / "single.json").write_text(json.dumps(rles["disc"]))
    (tmp_path / "listed.json").write_text(json.dumps(list(rles.values())))
    (tmp_path / "box.json").write_text(json.dumps([20, 3, 32, 6]))  # a list of numbers is one mask
    single = read_mask_file(tmp_path / "single.json", H, W)
    np.testing.assert_array_equal(single["single"], two_masks["disc"])
    listed = read_mask_file(tmp_path / "listed.json", H, W)
    assert list(listed) == ["listed[0]", "listed[1]"]
    np.testing.assert_array_equal(read_mask_file(tmp_path / "box.json", H, W)["box"], two_masks["bar"])


def test_write_then_read_round_trips(tmp_path, two_masks):
    path = write_mask_file(tmp_path / "out" / "masks.json", two_masks)
    back = read_mask_file(path, H, W)
    assert list(back) == list(two_masks)
    for name in two_masks:
        np.testing.assert_array_equal(back[name], two_masks[name])


def test_bad_files_name_file_and_mask(tmp_path, two_masks):
    np.savez(tmp_path / "wrong.npz", good=two_masks["disc"], small=np.ones((5, 5), bool))
    with pytest.raises(InputError, match=r"wrong\.npz, mask 'small': mask shape \(5, 5\) does not match"):
        read_mask_file(tmp_path / "wrong.npz", H, W)
    with pytest.raises(InputError, match="does not exist"):
        read_mask_file(tmp_path / "missing.png", H, W)
    (tmp_path / "masks.txt").write_text("0 1")
    with pytest.raises(InputError, match="unknown suffix"):
        read_mask_file(tmp_path / "masks.txt", H, W)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="invalid JSON"):
        read_mask_file(tmp_path / "broken.json", H, W)
    (tmp_path / "fake.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        read_mask_file(tmp_path / "fake.png", H, W)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(InputError, match="empty"):
        read_mask_file(tmp_path / "blank.png", H, W)
    with pytest.raises(InputError, match=r"\['bar'\] are empty"):
        write_mask_file(tmp_path / "x.json", {"disc": two_masks["disc"], "bar": np.zeros((H, W), bool)})
