"""Both frameworks end to end on the tiny preset: forward, backward, generate, save/load, batching."""

import numpy as np
import pytest
import torch

from pixelrefer import PixelReferConfig, PixelReferForConditionalGeneration
from tests.conftest import build

PROMPT = "What is the category of <region>?"


def image_inputs(processor, scene, answer=None):
    image, masks = scene
    text = [{"role": "user", "content": "Compare <region> and <region>."}]
    if answer:
        text.append({"role": "assistant", "content": answer})
    return processor(text=text, images=image, masks=[masks["square"], masks["speck"]])


def video_inputs(processor, video, answer=None):
    frames, masks = video
    text = [{"role": "user", "content": "What does <object0><region> do next to <object1><region>?"}]
    if answer:
        text.append({"role": "assistant", "content": answer})
    return processor(text=text, videos=frames, masks=[masks["disc"], masks["square"]])


@pytest.mark.parametrize("modality", ["image", "video"])
def test_forward_backward_reaches_every_trainable_parameter(tiny, scene, video, modality):
    model, processor = tiny
    model.train()
    inputs = (image_inputs if modality == "image" else video_inputs)(
        processor, scene if modality == "image" else video, answer="red square left of it"
    )
    model.zero_grad()
    out = model(**inputs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert not any(n.startswith("model.vision_model") for n in trainable), "vision encoder must be frozen"
    if modality == "image" and not model.config.is_lite:
        assert any(n.startswith("model.projector") for n in trainable)
    model.eval()


def test_object_tokens_land_in_region_slots(tiny, scene):
    model, processor = tiny
    inputs = image_inputs(processor, scene)
    captured = {}

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs)
    handle.remove()
    slots = inputs["input_ids"][0] == model.config.region_token_id
    objects = out.object_outputs
    torch.testing.assert_close(captured["embeds"][0][slots], objects.tokens.flatten(0, 1))


def test_slot_count_mismatch_is_a_clear_error(tiny, scene):
    model, processor = tiny
    inputs = dict(image_inputs(processor, scene))
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == model.config.region_token_id).nonzero()[0]] = processor.tokenizer.pad_token_id
    inputs["input_ids"] = ids
    with pytest.raises(ValueError, match="object tokens and <REGION> slots do not match"):
        model(**inputs)


def test_generate_returns_tokens(tiny, scene, video):
    model, processor = tiny
    for inputs in (image_inputs(processor, scene), video_inputs(processor, video)):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[0] == 1 and out.shape[1] > inputs["input_ids"].shape[1]


def test_generate_with_cache_matches_full_forward(tiny, scene):
    model, processor = tiny
    inputs = image_inputs(processor, scene)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    ids = generated
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["input_ids"].shape[1]:])], dim=1)
    full = dict(inputs, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        logits = model(**full).logits
    start = inputs["input_ids"].shape[1]
    assert torch.equal(logits[0, start - 1 : -1].argmax(-1), ids[0, start:])


def test_save_and_load_round_trip_gives_identical_logits(tiny, scene, tmp_path):
    model, processor = tiny
    inputs = image_inputs(processor, scene)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = PixelReferForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(again.config, PixelReferConfig) and again.config.framework == model.config.framework
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_batched_equals_one_by_one(tiny, scene):
    model, processor = tiny
    image, masks = scene
    texts = [PROMPT, "Compare <region> and <region>."]
    sample_masks = [[masks["disc"]], [masks["square"], masks["speck"]]]
    batch = processor(text=texts, images=[image, image], masks=sample_masks)
    with torch.no_grad():
        batch_logits = model(**batch).logits
        for b in range(2):
            single = processor(text=texts[b], images=image, masks=sample_masks[b])
            logits = model(**single).logits[0]
            n = logits.shape[0]
            real = single["attention_mask"][0].bool()
            torch.testing.assert_close(batch_logits[b, -n:][real], logits[real], atol=2e-5, rtol=1e-4)


def test_eager_and_sdpa_agree(scene):
    outputs = []
    for implementation in ("eager", "sdpa"):
        model, processor = build("vision_object")
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(model(**image_inputs(processor, scene)).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=1e-4)


def test_lite_rejects_global_vision_tokens(scene):
    model, processor = build("object_only")
    _, vo_processor = build("vision_object")
    inputs = dict(image_inputs(processor, scene))
    vo = image_inputs(vo_processor, scene)
    inputs.update(pixel_values=vo["pixel_values"], image_grid_thw=vo["image_grid_thw"])
    with pytest.raises(ValueError, match="no global vision tokens"):
        model(**inputs)


def test_lite_objects_on_one_image_use_their_own_local_crops(scene):
    model, processor = build("object_only")
    inputs = image_inputs(processor, scene)
    with torch.no_grad():
        base = model(**inputs).object_outputs.tokens
        perturbed = dict(inputs)
        local = inputs["region_local_pixel_values"].clone()
        per_object = local.shape[0] // 2
        local[per_object:] += 1.0  # only the second object's local crop
        perturbed["region_local_pixel_values"] = local
        changed = model(**perturbed).object_outputs.tokens
    torch.testing.assert_close(changed[0], base[0])
    assert not torch.allclose(changed[1], base[1])


def test_mask_pooling_variant_runs(scene):
    model, processor = build("vision_object", object_tokenizer="mask_pooling")
    inputs = image_inputs(processor, scene, answer="red")
    assert (inputs["input_ids"] == model.config.region_token_id).sum() == 2
    out = model(**inputs)
    assert out.object_outputs.tokens.shape[:2] == (2, 1) and torch.isfinite(out.loss)


def test_processor_model_config_mismatch_is_detected(scene):
    model, _ = build("vision_object")
    _, other = build("vision_object", num_object_tokens=6)
    with pytest.raises(ValueError, match="disagree|do not match"):
        model(**image_inputs(other, scene))


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_position_init_std_sets_the_position_linear_only(framework, tmp_path):
    """The position Linear (Eq. 5) starts at `position_init_std`; every other Linear keeps HF's 0.02; a saved
    model loads its trained weights, not a fresh draw."""
    default, _ = build(framework)
    model, processor = build(framework, position_init_std=3.0)
    position = model.model.object_tokenizer.position_proj
    assert default.model.object_tokenizer.position_proj.weight.std() < 0.05
    assert 2.0 < position.weight.std() < 4.0 and not position.bias.any()
    assert model.model.object_tokenizer.mlp[0].weight.std() < 0.05
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = PixelReferForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.position_init_std == 3.0
    assert torch.equal(loaded.model.object_tokenizer.position_proj.weight, position.weight)


def test_position_init_std_must_be_positive():
    with pytest.raises(ValueError, match="position_init_std"):
        PixelReferConfig.from_preset("tiny", position_init_std=0.0)


@pytest.mark.parametrize("name, vision, llm", [("2b", 1152, 1536), ("7b", 1152, 3584)])
def test_published_shapes(name, vision, llm):
    config = PixelReferConfig.from_preset(name)
    assert config.vision_config.hidden_size == vision and config.vision_config.patch_size == 14
    assert config.text_config.hidden_size == llm and config.text_config.num_hidden_layers == 28
    assert config.num_object_tokens == 32 and config.patch_area == 196
    lite = PixelReferConfig.from_preset(name, framework="object_only")
    assert (config.downscale_threshold, lite.downscale_threshold) == (100, 50)
    assert (config.kmeans_iterations, lite.kmeans_iterations) == (5, 3)


def test_load_preset_warns_and_checkpoint_round_trips(tmp_path, scene):
    import pixelrefer

    with pytest.warns(UserWarning, match="random weights"):
        model, processor = pixelrefer.load("tiny", framework="object_only", num_object_tokens=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_processor = pixelrefer.load(tmp_path)
    image, masks = scene
    a = pixelrefer.ask(model, processor, PROMPT, image=image, masks=[masks["disc"]], max_new_tokens=3)
    b = pixelrefer.ask(again, again_processor, PROMPT, image=image, masks=[masks["disc"]], max_new_tokens=3)
    assert torch.equal(a.token_ids, b.token_ids) and again.config.is_lite
    with pytest.raises(ValueError, match="neither an embedded model"):
        pixelrefer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="apply to presets"):
        pixelrefer.load(tmp_path, framework="vision_object")


@pytest.mark.parametrize("framework, calls", [("vision_object", 2), ("object_only", 1)])
def test_vision_encoder_calls_per_forward(scene, framework, calls):
    """All crops (and Lite's local crops and global image) share one packed call; VO adds the global image's."""
    model, processor = build(framework)
    seen = []
    handle = model.model.vision_model.register_forward_hook(lambda m, a, k, out: seen.append(k["grid_thw"].shape[0]),
                                                            with_kwargs=True)
    with torch.no_grad():
        model(**image_inputs(processor, scene))
    handle.remove()
    assert len(seen) == calls
    packed = 2 if framework == "vision_object" else 2 + 2 + 1  # crops (+ local crops + one global image)
    assert packed in seen


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_published_2b_widths_run_forward_and_backward(scene, framework):
    """The real 2B widths (1152-wide SigLIP-NaViT, 1536-wide Qwen2.5) with one layer each and a small vocabulary."""
    model, processor = build(
        framework,
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=1),
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=1024),
        num_object_tokens=32,
        oci_num_heads=8,
    )
    model.train()
    out = model(**image_inputs(processor, scene, answer="red square"))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.object_outputs.tokens.shape == (2, 32, 1536)


@pytest.mark.parametrize("name, framework", [("shapes-tiny", "vision_object"), ("shapes-tiny-lite", "object_only")])
def test_embedded_models_load_offline_and_describe_colours(name, framework):
    """The shipped checkpoints open with no network and name the colour of held-out objects.

    The vision encoder was pretrained in stage 0 and trained along after (README, "The embedded models").
    """
    import pixelrefer
    from pixelrefer.demo import shapesworld_scene

    model, processor = pixelrefer.load(name)
    assert model.config.framework == framework and not model.config.freeze_vision_encoder
    right = total = 0
    for seed in range(100, 106):
        image, masks = shapesworld_scene(seed)
        for label, mask in masks.items():
            size, colour, _ = label.split(" (")[0].split(" ")  # "<size> <colour> <category>[ (k)]"
            if size == "tiny":
                continue
            answer = pixelrefer.ask(model, processor, "Please describe <region> briefly.", image=image, masks=[mask],
                                    max_new_tokens=5)
            right += colour in answer.text.split()
            total += 1
    assert total >= 15 and right / total >= 0.8, f"{right}/{total} colours right"  # 22/22 at release


# Shape categories of every object in 20 unseen scenes (seeds 100-119), exact match; measured at release (README):
# shapes-tiny v18 76/82 (v17 75/82, v16 75/82, v15 72/82, v13 75/82, v11 69/82), shapes-tiny-lite v22 76/82 (v21 74/82,
# v20 72/82, v19 76/82, v14 70/82). The floor leaves room for numerics, not for a broken object path: chance is about
# 10 %, the models before stage 0 got 19 % and the ones before these 43-46/82.
CATEGORY_FLOORS = {"shapes-tiny": 0.85, "shapes-tiny-lite": 0.85}


def unseen_scene_answers(name: str, question: str, truth, max_new_tokens: int) -> tuple[int, int]:
    """(right, asked): `question` about every object of the unseen scenes 100-119, exact match against
    `truth(label, mask)`."""
    import pixelrefer
    from pixelrefer.demo import shapesworld_scene

    model, processor = pixelrefer.load(name)
    right = total = 0
    for seed in range(100, 120):
        image, masks = shapesworld_scene(seed)
        for label, mask in masks.items():
            answer = pixelrefer.ask(model, processor, question, image=image, masks=[mask],
                                    max_new_tokens=max_new_tokens)
            right += answer.text.strip() == truth(label, mask)
            total += 1
    return right, total


@pytest.mark.parametrize("name", sorted(CATEGORY_FLOORS))
def test_embedded_models_name_shape_categories_of_unseen_objects(name):
    right, total = unseen_scene_answers(name, "What is the category of <region>? Using only one word or phrase.",
                                        lambda label, mask: label.split(" (")[0].split(" ")[2], max_new_tokens=4)
    assert total >= 60 and right / total >= CATEGORY_FLOORS[name], f"{name}: {right}/{total} categories right"


# Where each object of the same 20 unseen scenes is ("in the top left corner", "at the bottom", …: the 3×3 cell of its
# centroid, as ShapesWorld's location questions write it), exact match. Before the location stage the models named the
# cell of 12 % (Lite) and 7 % (Vision-Object) of held-out objects in their detailed captions, chance for the nine cells.
# Measured at release: shapes-tiny-lite v22 72/82 (v21 72/82, v20 70/82, v19 73/82), shapes-tiny v18 73/82 (v17 73/82,
# v16 72/82, v15 71/82).
LOCATION_FLOORS = {"shapes-tiny": 0.75, "shapes-tiny-lite": 0.75}


@pytest.mark.parametrize("name", sorted(LOCATION_FLOORS))
def test_embedded_models_say_where_unseen_objects_are(name):
    from pixelrefer.data.tasks import LOCATION_Q, position_phrase

    def cell(label, mask):
        ys, xs = np.nonzero(mask)
        return position_phrase(xs.mean(), ys.mean(), *mask.shape)

    right, total = unseen_scene_answers(name, LOCATION_Q, cell, max_new_tokens=6)
    assert total >= 60 and right / total >= LOCATION_FLOORS[name], f"{name}: {right}/{total} locations right"


# Video multiple choice in VideoRefer-Bench-Q's layout (Basic, Sequential, Relationship, Reasoning, Future) on 16 unseen
# videos (seed 321; 79 questions: one video has a single object, so no Relationship question), the option letter parsed
# as the release does, wherever it is; chance is 25 %; up to 24 new tokens, the benchmark's (a Reasoning answer that
# states both speeds first takes 16). Measured at release: shapes-tiny-lite v23, which writes the one word only the
# right option holds and then its letter, 64/79 (Basic 16/16, Sequential 13/16, Relationship 15/15, Reasoning 6/16,
# Future 14/16); v22, which writes the option and then its letter, 62/79 (Basic 16/16, Sequential 12/16, Relationship
# 11/15, Reasoning 10/16, Future 13/16), v21 53/79 (Basic 16/16, Sequential 13/16, Relationship 6/15, Reasoning 8/16,
# Future 10/16), v20 47/79 (Basic 16/16, Sequential 11/16, Relationship 5/15, Reasoning 10/16, Future 5/16), v19 48/79
# (Basic 16/16, Sequential 11/16, Relationship 4/15, Reasoning 10/16, Future 7/16), v18 and v17 35/79, v16 34/79 (Basic
# 14/16), v15 34/79, v14 33/79 (Basic 7/16, Sequential 11/16, Future 6/16; the model before its video stage: 39/79, yet
# 40.8 against 47.6 % on the 294 held-out questions of the README); shapes-tiny v18, which writes as Lite v23 does,
# 60/79 (Basic 16/16, Sequential 10/16, Relationship 15/15, Reasoning 3/16, Future 16/16); v17, started from Lite v22's
# weights, 61/79 (Basic 16/16, Sequential 12/16, Relationship 11/15, Reasoning 9/16, Future 13/16), v16 52/79
# (Sequential 8/16, Reasoning 2/16), v15 35/79, v13 31/79 (v12, before its video re-fit, 22/79; v11 27/79; before its
# first video stage 23/79). The floors leave room for numerics, not for a broken path.
MC_FLOORS = {"shapes-tiny": 0.7, "shapes-tiny-lite": 0.75}


@pytest.fixture(scope="module")
def unseen_video_choices(tmp_path_factory):
    from pixelrefer.data import generate_shapesworld, load_annotations

    root = tmp_path_factory.mktemp("mc")
    paths = generate_shapesworld(root, seed=321, num_images=0, num_videos=16, splits=(1.0, 0.0, 0.0))
    return [s for s in load_annotations(paths["train"], root) if s.task == "multiple_choice"]


@pytest.mark.parametrize("name", sorted(MC_FLOORS))
def test_embedded_models_answer_video_multiple_choice(name, unseen_video_choices):
    import pixelrefer
    from pixelrefer.data.sample import SampleInputs
    from pixelrefer.evaluation.choice import choice_scores, score_item
    from pixelrefer.evaluation.models import PixelReferModel

    model, processor = pixelrefer.load(name)
    answer = PixelReferModel(model, processor, max_new_tokens=24)
    queries = []
    for sample in unseen_video_choices:
        text, image, video, masks = sample.load_media()
        queries.append(SampleInputs(text[:1], image, video, masks))
    predictions = answer(queries)
    items = [score_item(s.id, p, s.meta["Answer"], type=s.meta["type"], options=s.meta["options"])
             for s, p in zip(unseen_video_choices, predictions)]
    scores = choice_scores(items)
    assert scores.count == 79 and set(scores.per_type) == {"Basic", "Sequential", "Relationship", "Reasoning",
                                                            "Future"}
    assert scores.overall >= MC_FLOORS[name], f"{name}: video multiple choice {scores.as_dict()}"


# The same 16 unseen videos' Relationship, Reasoning and Future questions asked without options and answered in one
# word (`short_answers=True`: "left", "higher", "<object1>", "neither"…), exact match. Measured at release:
# shapes-tiny v18, v17 and v16 39/47 (Relationship 15/15, Future 16/16, Reasoning 8/16); shapes-tiny-lite v22 35/47 (Relationship
# 14/15, Future 15/16, Reasoning 6/16), v21 37/47 (Relationship 15/15, Future 15/16, Reasoning 7/16), v20 37/47
# (Relationship 15/15, Future 16/16, Reasoning 6/16) while it wrote the right letter for 5/15 and 5/16 of the
# lettered Relationship and Future questions (v21: 6/15, 10/16); v19, never trained on them, 0/47, and so
# shapes-tiny v15.
SHORT_ANSWER_FLOOR = 0.8  # Relationship and Future together


@pytest.mark.parametrize("name", ["shapes-tiny", "shapes-tiny-lite"])
def test_embedded_models_answer_unseen_video_questions_in_one_word(name, tmp_path):
    import pixelrefer
    from pixelrefer.data import generate_shapesworld, load_annotations
    from pixelrefer.data.sample import SampleInputs
    from pixelrefer.evaluation.models import PixelReferModel

    paths = generate_shapesworld(tmp_path, seed=321, num_images=0, num_videos=16, splits=(1.0, 0.0, 0.0),
                                 short_answers=True)
    short = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "video_short_answer"]
    model, processor = pixelrefer.load(name)
    answer = PixelReferModel(model, processor, max_new_tokens=4)
    queries = []
    for sample in short:
        text, image, video, masks = sample.load_media()
        queries.append(SampleInputs(text[:1], image, video, masks))
    right = {}
    for sample, prediction in zip(short, answer(queries)):
        kind = sample.id.rsplit("-", 1)[1]
        right.setdefault(kind, []).append(prediction.strip() == sample.conversation[1]["content"])
    assert len(short) == 47 and set(right) == {"relationship", "reasoning", "future"}
    located = right["relationship"] + right["future"]
    assert sum(located) / len(located) >= SHORT_ANSWER_FLOOR, {k: f"{sum(v)}/{len(v)}" for k, v in right.items()}
