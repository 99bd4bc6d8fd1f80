"""PixelReferProcessor: prompt expansion, labels, packing, video units and every input error."""

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrefer import InputError, PixelReferProcessor
from pixelrefer.processing import IGNORE_INDEX, patchify
from pixelrefer.regions import mask_to_rle
from tests.conftest import make_scene, tiny_overrides

PROMPT = "What is the category of <region>? Using only one word or phrase."


def processor(framework="vision_object", **overrides):
    return PixelReferProcessor.from_preset("tiny", framework=framework, **{**tiny_overrides(), **overrides})


def tokens(proc, ids):
    return proc.tokenizer.convert_ids_to_tokens(ids)


def test_region_expands_to_n_region_tokens_in_brackets(scene):
    image, masks = scene
    proc = processor()
    inputs = proc(text=PROMPT, images=image, masks=[masks["square"]])
    toks = tokens(proc, inputs["input_ids"][0].tolist())
    start = toks.index("<REGION>")
    assert toks[start - 1] == "[" and toks[start + 4] == "]"
    assert toks.count("<REGION>") == proc.config.num_object_tokens == 4
    assert toks[-2:] == ["<|im_start|>", "assistant"]  # the generation prompt


def test_vision_object_has_one_image_token_per_vision_token_and_lite_has_none(scene):
    image, masks = scene
    vo = processor("vision_object")(text=PROMPT, images=image, masks=[masks["disc"]])
    grid = vo["image_grid_thw"][0]
    assert (vo["input_ids"] == vo_image_id()).sum() == grid.prod() == vo["pixel_values"].shape[0]
    lite = processor("object_only")(text="<image>\n" + PROMPT, images=image, masks=[masks["disc"]])
    assert "pixel_values" not in lite and (lite["input_ids"] == vo_image_id()).sum() == 0
    side = 112 // 14
    assert lite["region_global_pixel_values"].shape == (side * side, 3 * 14 * 14)
    assert lite["region_local_pixel_values"].shape == ((56 // 14) ** 2, 3 * 14 * 14)


def vo_image_id():
    return processor().config.image_token_id


def test_labels_cover_only_assistant_content_and_im_end(scene):
    image, masks = scene
    proc = processor()
    conversation = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "red square"},
    ]
    inputs = proc(text=conversation, images=image, masks=[masks["square"]])
    supervised = inputs["labels"][0][inputs["labels"][0] != IGNORE_INDEX]
    assert tokens(proc, supervised.tolist()) == ["red", "square", "<|im_end|>"]
    assert tokens(proc, inputs["input_ids"][0, -3:].tolist()) == ["red", "square", "<|im_end|>"]


def test_release_conversation_format_is_accepted(scene):
    image, masks = scene
    proc = processor()
    release = [{"from": "human", "value": "<image>\n" + PROMPT}, {"from": "gpt", "value": "disc"}]
    inputs = proc(text=release, images=image, masks=[masks["disc"]])
    supervised = inputs["labels"][0][inputs["labels"][0] != IGNORE_INDEX]
    assert tokens(proc, supervised.tolist()) == ["disc", "<|im_end|>"]


def test_small_object_keeps_n_slots_with_empty_ones_masked(scene):
    image, masks = scene
    proc = processor(num_object_tokens=32)
    encoded = proc.encode(PROMPT, images=image, masks=[masks["speck"]])
    inputs, crop = encoded.inputs, encoded.crops[0][0]
    cells = int(crop.cell_mask.sum())
    assert 0 < cells < 32
    slots = inputs["input_ids"][0] == proc.config.region_token_id
    assert slots.sum() == 32
    assert inputs["attention_mask"][0][slots].sum() == cells
    assert inputs["region_token_valid"].sum() == cells


def test_release_variable_token_count_gives_fewer_slots(scene):
    image, masks = scene
    proc = processor(num_object_tokens=32, release_variable_token_count=True)
    encoded = proc.encode(PROMPT, images=image, masks=[masks["speck"]])
    cells = int(encoded.crops[0][0].cell_mask.sum())
    assert (encoded.inputs["input_ids"] == proc.config.region_token_id).sum() == cells


def test_mask_formats_give_identical_inputs(scene):
    image, masks = scene
    square = masks["square"]
    proc = processor()
    rows, cols = np.nonzero(square)
    box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
    reference = proc(text=PROMPT, images=image, masks=[square])
    for spec in (square.astype(np.float32), torch.from_numpy(square), mask_to_rle(square), box):
        other = proc(text=PROMPT, images=image, masks=[spec])
        torch.testing.assert_close(other["region_pixel_values"], reference["region_pixel_values"])
        assert torch.equal(other["region_cell_mask"], reference["region_cell_mask"])


def test_grayscale_rgba_and_pil_images_are_converted(scene):
    image, masks = scene
    proc = processor()
    reference = proc(text=PROMPT, images=image, masks=[masks["disc"]])
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    for variant in (Image.fromarray(image), rgba, image.astype(np.float32) / 255.0):
        out = proc(text=PROMPT, images=variant, masks=[masks["disc"]])
        torch.testing.assert_close(out["pixel_values"], reference["pixel_values"])
    gray = proc(text=PROMPT, images=image.mean(-1).astype(np.uint8), masks=[masks["disc"]])
    assert gray["pixel_values"].shape == reference["pixel_values"].shape


def test_batch_with_different_object_counts_is_left_padded_and_packed_in_order(scene):
    image, masks = scene
    proc = processor()
    two = "Compare <region> and <region>."
    batch = proc(text=[PROMPT, two], images=[image, image], masks=[[masks["disc"]], [masks["square"], masks["disc"]]])
    singles = [proc(text=PROMPT, images=image, masks=[masks["disc"]]),
               proc(text=two, images=image, masks=[masks["square"], masks["disc"]])]
    assert batch["region_grid_thw"].shape[0] == 3
    torch.testing.assert_close(
        batch["region_pixel_values"], torch.cat([s["region_pixel_values"] for s in singles])
    )
    length = batch["input_ids"].shape[1]
    for b, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][b, length - n:], single["input_ids"][0])
        assert batch["attention_mask"][b, : length - n].sum() == 0


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_video_units_per_object_and_frame(video, framework):
    frames, masks = video
    proc = processor(framework)
    prompt = "What does <object0><region> do?"
    encoded = proc.encode(prompt, videos=frames, masks=[masks["disc"]])
    inputs = encoded.inputs
    toks = tokens(proc, inputs["input_ids"][0].tolist())
    assert toks.count("<REGION>") == 3 * proc.config.num_object_tokens
    assert inputs["region_grid_thw"].shape[0] == 3
    text = " ".join(toks)
    if framework == "object_only":
        assert "Time 0 . 5 : [" in text and "<video>" not in toks
        assert inputs["region_global_index"].tolist() == [0, 1, 2]
    else:
        assert inputs["video_grid_thw"].tolist()[0][0] == 3
        assert toks.count("<video>") == inputs["video_compression_mask"].sum() <= inputs["video_grid_thw"][0].prod() // 4
        assert "Time 1 . 0 s :" in text


def test_lite_encodes_each_distinct_global_image_once(scene):
    image, masks = scene
    proc = processor("object_only")
    inputs = proc(text="<region> <region> <region>", images=image, masks=[masks["square"], masks["disc"], masks["speck"]])
    side = 112 // 14
    assert inputs["region_global_pixel_values"].shape[0] == side * side
    assert inputs["region_global_index"].tolist() == [0, 0, 0]


def test_patchify_merge_order_matches_block_layout():
    image = np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3)
    flat = patchify(image, 7, merge=1)
    blocks = patchify(image, 7, merge=2)
    # block-major: the second patch of a 2x2 block is the first row's second patch
    torch.testing.assert_close(torch.from_numpy(blocks[1]), torch.from_numpy(flat[1]))
    torch.testing.assert_close(torch.from_numpy(blocks[2]), torch.from_numpy(flat[4]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(masks=[np.zeros((96, 128), bool)]), "sample 0, object 0"),
        (dict(masks=[np.ones((10, 10), bool)]), "sample 0, object 0"),
        (dict(masks=[]), "1 <region> but 0 masks"),
        (dict(images=np.full((96, 128, 3), np.nan, np.float32)), "NaN"),
        (dict(images=np.zeros((0, 128, 3), np.uint8)), "zero size"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_culprit(scene, kwargs, message):
    image, masks = scene
    call = dict(text=PROMPT, images=image, masks=[masks["disc"]])
    call.update(kwargs)
    with pytest.raises(InputError, match=message):
        processor()(**call)


def test_video_frame_out_of_range_names_object_and_frame(video):
    frames, masks = video
    with pytest.raises(InputError, match=r"object 0: frame index 7 is out of range"):
        processor()(text="<region>", videos=frames, masks=[{7: masks["disc"][0]}])


def test_empty_video_mask_names_the_frame(video):
    frames, masks = video
    bad = dict(masks["disc"])
    bad[1] = np.zeros_like(bad[1])
    with pytest.raises(InputError, match=r"sample 0, object 0, frame 1"):
        processor()(text="<region>", videos=frames, masks=[bad])


def test_masks_without_image_are_rejected():
    with pytest.raises(InputError, match="without an image"):
        processor()(text=PROMPT, masks=[np.ones((4, 4), bool)])


def test_processor_save_and_load_round_trip(tmp_path, scene):
    image, masks = scene
    proc = processor("object_only")
    proc.save_pretrained(tmp_path)
    again = PixelReferProcessor.from_pretrained(tmp_path)
    a = proc(text=PROMPT, images=image, masks=[masks["disc"]])
    b = again(text=PROMPT, images=image, masks=[masks["disc"]])
    assert again.config.framework == "object_only"
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_text_only_prompt_has_no_region_inputs():
    inputs = processor()(text="Hello")
    assert set(inputs) == {"input_ids", "attention_mask"}


def test_make_scene_is_deterministic():
    a, _ = make_scene(seed=3)
    b, _ = make_scene(seed=3)
    assert np.array_equal(a, b)


def test_video_tokens_are_pruned_where_frames_do_not_change(video):
    frames, masks = video
    static = type(frames)([frames.frames[0]] * 3, timestamps=[0.0, 0.5, 1.0])
    proc = processor()
    full = proc(text="<region>", videos=static, masks=[{0: masks["square"][0]}])
    per_frame = int(full["video_grid_thw"][0].prod()) // 4 // 3
    keep = full["video_compression_mask"].view(3, per_frame)
    assert keep[0].all() and keep[1:].sum(1).tolist() == [1, 1], "unchanged frames keep one token"
    assert (full["input_ids"] == proc.config.video_token_id).sum() == per_frame + 2
    moving = proc(text="<region>", videos=frames, masks=[masks["disc"]])
    moved = moving["video_compression_mask"].view(3, per_frame)
    assert 1 < moved[1].sum() < per_frame, "only the blocks the disc and noise touched are kept"
    unpruned = processor(video_compression_threshold=None)(text="<region>", videos=static, masks=[{0: masks["square"][0]}])
    assert unpruned["video_compression_mask"].all()


def test_decode_closes_up_brackets_of_the_word_level_tokenizer():
    """Answers read as the data writes them: option letters "(C)", not the decoder's "( C )"."""
    from pixelrefer.tokenizer import tidy_spacing

    processor = PixelReferProcessor.from_preset("tiny")
    ids = processor.tokenizer("(C) brown, left of <object1>.", add_special_tokens=False)["input_ids"]
    assert processor.decode(ids) == "(C) brown, left of <object1>."
    assert tidy_spacing("( B ) to the left ( of )") == "(B) to the left (of)"
