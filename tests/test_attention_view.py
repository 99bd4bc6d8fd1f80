"""Per-key attention capture and `attention_view`: equal to eager maps, consistent with the group statistics."""

from functools import lru_cache

import numpy as np
import pytest
import torch

from pixelrefer import InputError
from pixelrefer.analysis import GROUPS, capture_attention, token_groups
from pixelrefer.analysis.attention_view import attention_view, image_grid_attention, object_token_attention
from pixelrefer.demo import demo_scene
from pixelrefer.processing import patchify, resize_image
from tests.conftest import build
from tests.test_attention_capture import eager_maps, encode


@lru_cache(maxsize=None)
def captured(framework, batch=False):
    """(model, processor, encoded, capture) of the demo scene, captured once per module run."""
    model, processor = build(framework)
    encoded = encode(processor, demo_scene(), batch)
    with torch.no_grad(), capture_attention(model, token_groups(encoded), pooled_layers=(1,), key_layers=(0, 1),
                                            pool=4, chunk_size=8) as capture:
        model(**encoded.inputs)
    return model, processor, encoded, capture


@pytest.mark.parametrize("batch", [False, True])
def test_key_mass_equals_eager_maps_summed_over_query_groups(batch):
    model, _, encoded, capture = captured("vision_object", batch)
    _, maps = eager_maps(model, encoded.inputs)
    group_ids = token_groups(encoded).group_ids
    onehot = torch.nn.functional.one_hot(group_ids.clamp(min=0), len(GROUPS)).float() * (group_ids >= 0)[..., None]
    for layer in (0, 1):
        expected = torch.einsum("bqg,bhqk->bhgk", onehot, maps[layer].float())
        torch.testing.assert_close(capture.key_mass[layer], expected, atol=1e-4, rtol=1e-4)
    assert set(capture.key_mass) == {0, 1}
    per_token = capture.key_attention(1, "answer")  # (B, H, L): each answer token's attention sums to 1
    torch.testing.assert_close(per_token.sum(-1), torch.ones_like(per_token.sum(-1)), atol=1e-4, rtol=0)


def test_key_attention_needs_key_layers(scene):
    model, processor = build("vision_object")
    encoded = encode(processor, scene)
    with torch.no_grad(), capture_attention(model, token_groups(encoded)) as capture:
        model(**encoded.inputs)
    with pytest.raises(KeyError, match="key_layers"):
        capture.key_attention(0)
    with pytest.raises(InputError, match="key_layers"):
        attention_view(capture, encoded, 0)


def test_view_is_consistent_with_the_group_statistics():
    _, _, encoded, capture = captured("vision_object")
    view = attention_view(capture, encoded, 1)
    assert view.groups == [g for g in GROUPS if g != "system"]  # no system turn in the prompt
    torch.testing.assert_close(view.matrix.sum(-1), torch.ones(len(view.groups)), atol=1e-4, rtol=0)
    assert view.to_groups["vision"] == pytest.approx(float(view.image_grid.sum()), abs=1e-5)
    assert view.to_groups["object"] == pytest.approx(sum(float(v.sum()) for v in view.objects), abs=1e-5)
    answer, objects = GROUPS.index("answer"), capture.object_mass[1][0].mean(0)  # (G, O) heads averaged
    per_object = objects[answer] / capture.query_counts[0, answer]
    torch.testing.assert_close(torch.stack([v.sum() for v in view.objects]), per_object, atol=1e-5, rtol=1e-4)
    assert [len(v) for v in view.objects] == [int(c.cell_mask.sum().clip(max=4)) for c in encoded.crops[0]]
    assert view.pooled.shape == capture.pooled[1][0, 0].shape
    assert attention_view(capture, encoded, 0).pooled is None, "layer 0's map was not kept"


def test_heads_average_to_the_mean_view():
    _, _, encoded, capture = captured("vision_object")
    heads = [attention_view(capture, encoded, 1, head=h) for h in range(capture.mass[1].shape[1])]
    mean = attention_view(capture, encoded, 1)
    torch.testing.assert_close(torch.stack([v.keys for v in heads]).mean(0), mean.keys)
    torch.testing.assert_close(torch.stack([v.pooled for v in heads]).mean(0), mean.pooled)
    assert not torch.allclose(heads[0].keys, heads[1].keys), "heads differ"


def test_second_sample_of_a_batch_uses_its_own_grid_and_objects():
    _, _, encoded, capture = captured("vision_object", batch=True)
    view = attention_view(capture, encoded, 0, sample=1)
    grid = encoded.inputs["image_grid_thw"][1, 1:].tolist()
    assert list(view.image_grid.shape) == grid and len(view.objects) == 1
    assert view.to_groups["vision"] == pytest.approx(float(view.image_grid.sum()), abs=1e-5)


def test_vision_tokens_are_the_image_grid_in_row_major_order(scene):
    _, processor = build("vision_object")
    image, masks = scene
    encoded = processor.encode("What is <region>?", images=image, masks=[masks["disc"]])
    _, grid_h, grid_w = encoded.inputs["image_grid_thw"][0].tolist()
    patch = processor.config.patch_size
    resized = resize_image(image, grid_h * patch, grid_w * patch)
    values = torch.arange(encoded.inputs["input_ids"].shape[1], dtype=torch.float32)
    grid = image_grid_attention(encoded, values)
    start = int(grid[0, 0])
    pixels = encoded.inputs["pixel_values"].numpy()
    for row, col in ((0, 0), (2, 5), (grid_h - 1, grid_w - 1)):
        token = int(grid[row, col]) - start  # the vision token placed at (row, col)
        cell = resized[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]
        np.testing.assert_allclose(pixels[token], patchify(cell, patch)[0])


def test_object_only_has_no_image_grid():
    _, _, encoded, capture = captured("object_only")
    view = attention_view(capture, encoded, 0)
    assert view.image_grid is None and "vision" not in view.groups
    assert len(view.objects) == 2


def test_video_and_bad_arguments_are_input_errors(video):
    _, processor = build("vision_object")
    frames, masks = video
    encoded = processor.encode("What is <region>?", videos=frames, masks=[masks["disc"]])
    values = torch.zeros(encoded.inputs["input_ids"].shape[1])
    with pytest.raises(InputError, match="video"):
        image_grid_attention(encoded, values)
    assert len(object_token_attention(encoded, values)[0]) > 0
    _, _, encoded, capture = captured("vision_object")
    with pytest.raises(InputError, match=r"layer 7 was not captured; captured layers: \[0, 1\]"):
        attention_view(capture, encoded, 7)
    with pytest.raises(InputError, match="head 9 is out of range"):
        attention_view(capture, encoded, 0, head=9)
    with pytest.raises(InputError, match="'reply' is not one of"):
        attention_view(capture, encoded, 0, query="reply")
    with pytest.raises(InputError, match="no 'system' tokens"):
        attention_view(capture, encoded, 0, query="system")
