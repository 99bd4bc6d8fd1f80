"""Attention capture: equal to statistics from eager attention maps, exact outputs, bounded memory."""

import pytest
import torch

from pixelrefer.analysis import GROUPS, capture_attention, token_groups
from tests.conftest import build


def encode(processor, scene, batch=False):
    image, masks = scene
    conv = [{"role": "user", "content": "What is <region> next to <region>?"},
            {"role": "assistant", "content": "a red square"}]
    if batch:
        short = [{"role": "user", "content": "What is <region>?"}, {"role": "assistant", "content": "disc"}]
        return processor.encode([conv, short], images=[image, image],
                                masks=[[masks["square"], masks["speck"]], [masks["disc"]]])
    return processor.encode(conv, images=image, masks=[masks["square"], masks["speck"]])


def eager_maps(model, inputs):
    """The LLM's attention maps from eager attention. Only the LLM switches: under transformers 5.25 the
    vision encoder's eager and SDPA outputs differ by float rounding (~1e-6), which Lite's object path and
    this random LLM grow to ~3e-4 in the logits, beyond the 1e-5 these tests hold the LLM's paths to."""
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        language_model.set_attn_implementation("sdpa")
    return out.logits, out.attentions  # per layer (B, H, L, L)


def group_mass_from_maps(maps, group_ids):
    onehot = torch.nn.functional.one_hot(group_ids.clamp(min=0), len(GROUPS)).float() * (group_ids >= 0)[..., None]
    return torch.einsum("bqg,bhqk,bkj->bhgj", onehot, maps.float(), onehot)


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
@pytest.mark.parametrize("batch", [False, True])
def test_capture_equals_eager_statistics_and_keeps_outputs_exact(scene, framework, batch):
    model, processor = build(framework)
    encoded = encode(processor, scene, batch)
    groups = token_groups(encoded)
    logits, maps = eager_maps(model, encoded.inputs)
    with torch.no_grad(), capture_attention(model, groups, pooled_layers=(0, 1), full_layers=(1,), pool=4,
                                            chunk_size=8) as capture:
        captured_logits = model(**encoded.inputs).logits
    assert model.config.text_config._attn_implementation == "sdpa", "implementation restored"
    real = encoded.inputs["attention_mask"].bool()
    torch.testing.assert_close(captured_logits[real], logits[real], atol=1e-5, rtol=1e-4)
    for layer, layer_maps in enumerate(maps):
        torch.testing.assert_close(capture.mass[layer], group_mass_from_maps(layer_maps, groups.group_ids),
                                   atol=1e-4, rtol=1e-4)
    queries = groups.group_ids >= 0
    torch.testing.assert_close(capture.full[1][queries[:, None, :].expand_as(capture.full[1][..., 0])],
                               maps[1].float()[queries[:, None, :].expand_as(maps[1][..., 0])], atol=1e-5, rtol=1e-4)
    rows = capture.mean_attention(0).sum(-1)  # every query group with queries: rows sum to 1
    present = capture.query_counts > 0
    torch.testing.assert_close(rows[present[:, None, :].expand_as(rows)],
                               torch.ones_like(rows[present[:, None, :].expand_as(rows)]), atol=1e-4, rtol=0)


def test_pooled_maps_are_average_pooled_eager_maps(scene):
    model, processor = build("vision_object")
    encoded = encode(processor, scene)
    _, maps = eager_maps(model, encoded.inputs)
    with torch.no_grad(), capture_attention(model, token_groups(encoded), pooled_layers=(1,), pool=4,
                                            chunk_size=16) as capture:
        model(**encoded.inputs)
    length = maps[1].shape[-1]
    padded = (length + 3) // 4 * 4
    ones = torch.nn.functional.pad(torch.ones(1, 1, length, length), (0, padded - length, 0, padded - length))
    summed = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(maps[1].float(), (0, padded - length, 0, padded - length)), 4)
    counts = torch.nn.functional.avg_pool2d(ones, 4)
    torch.testing.assert_close(capture.pooled[1], summed / counts, atol=1e-5, rtol=1e-4)


def test_object_mass_splits_object_mass_by_object(scene):
    model, processor = build("vision_object")
    encoded = encode(processor, scene)
    with torch.no_grad(), capture_attention(model, token_groups(encoded)) as capture:
        model(**encoded.inputs)
    obj = GROUPS.index("object")
    for layer in capture.mass:
        torch.testing.assert_close(capture.object_mass[layer].sum(-1), capture.mass[layer][..., obj])


def test_capture_memory_is_one_chunk_whatever_the_length(scene):
    model, processor = build("vision_object")
    image, masks = scene
    peaks = []
    for repeat in (1, 4):
        text = " ".join(["What is <region>?"] * repeat)
        encoded = processor.encode(text, images=image, masks=[masks["disc"]] * repeat)
        with torch.no_grad(), capture_attention(model, token_groups(encoded), chunk_size=16) as capture:
            model(**encoded.inputs)
        length = encoded.inputs["input_ids"].shape[1]
        heads = model.config.text_config.num_attention_heads
        assert capture.peak_chunk_elements == heads * 16 * length, "one (B, H, chunk, L) block at a time"
        peaks.append((length, capture.peak_chunk_elements))
    (l1, p1), (l2, p2) = peaks
    assert p2 / p1 == pytest.approx(l2 / l1), "grows linearly with length, not quadratically"


def test_token_groups_follow_processor_spans(scene):
    _, processor = build("object_only")
    encoded = encode(processor, scene)
    groups = token_groups(encoded)
    ids = encoded.inputs["input_ids"][0]
    region = processor.config.region_token_id
    real_slots = (ids == region) & encoded.inputs["attention_mask"][0].bool()
    assert (groups.group_ids[0][real_slots] == GROUPS.index("object")).all()
    assert "vision" not in {GROUPS[i] for i in groups.group_ids[0].tolist() if i >= 0}
    assert set(groups.object_ids[0][real_slots].tolist()) == {0, 1}
    labels = encoded.inputs["labels"][0]
    assert (groups.group_ids[0][labels != -100] == GROUPS.index("answer")).all()
