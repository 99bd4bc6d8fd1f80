"""The released-checkpoint converter: a tiny checkpoint in the release's exact layout, converted and loaded.

The release folder is written from the release's own module structure (names, shapes and config keys of
`pixelrefer_qwen2` / `pixelreferlite_qwen2`), not from our model, with random values. Its tokenizer is a
small byte-level BPE (so merges such as "Ġ[" and "]?" exist, as in Qwen's) holding the release's added
tokens but not `<video>`, so token registration and the embedding growth are exercised.
"""

import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import pixelrefer
from pixelrefer import regions
from pixelrefer.convert import KEY_RULES, ConversionError, add_parser, convert_release
from pixelrefer.demo import demo_scene, demo_video

C, CI, VL = 64, 128, 2  # vision width, MLP width, layers
D, I, TL, HEADS, KV = 64, 128, 2, 4, 2  # LLM width, MLP width, layers, heads, kv heads
N = 4  # mask_num
MODEL_TYPES = {"vision_object": "pixelrefer_qwen2", "object_only": "pixelreferlite_qwen2"}
PROMPT = "What is the category of <region>? Using only one word or phrase."
_CORPUS = [
    "What is the category of [x]? Using only one word or phrase.",
    "Please describe the [x] in the image in detail. What does [x] do?",
    "Time 0.5s: Time 1.0: [Time 0.0:x,Time 0.5:x] Compare them.",
] * 50


# ----------------------------------------------------------------------------- a release folder


def release_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(["<image>", "<|stream_start|>", "<|stream_end|>"], special_tokens=True)
    tokenizer.add_tokens(["<REGION>"], special_tokens=True)
    return tokenizer


def release_shapes(lite: bool, vocab: int) -> dict[str, tuple]:
    """Names and shapes as the release's modules hold them (Qwen2ForCausalLM + DAMOVL encoder + region encoder)."""
    hd = D // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, D), "model.norm.weight": (D,), "lm_head.weight": (vocab, D)}
    for i in range(TL):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (D, D), p + "self_attn.q_proj.bias": (D,),
                       p + "self_attn.k_proj.weight": (KV * hd, D), p + "self_attn.k_proj.bias": (KV * hd,),
                       p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.v_proj.bias": (KV * hd,),
                       p + "self_attn.o_proj.weight": (D, D), p + "mlp.gate_proj.weight": (I, D),
                       p + "mlp.up_proj.weight": (I, D), p + "mlp.down_proj.weight": (D, I),
                       p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
    v = "model.vision_encoder.vision_encoder."
    shapes.update({v + "embeddings.patch_embedding.weight": (C, 3, 14, 14), v + "embeddings.patch_embedding.bias": (C,),
                   v + "post_layernorm.weight": (C,), v + "post_layernorm.bias": (C,)})
    for j in range(VL):
        p = f"{v}encoder.layers.{j}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({p + f"self_attn.{proj}.weight": (C, C), p + f"self_attn.{proj}.bias": (C,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({p + f"{norm}.weight": (C,), p + f"{norm}.bias": (C,)})
        shapes.update({p + "mlp.fc1.weight": (CI, C), p + "mlp.fc1.bias": (CI,),
                       p + "mlp.fc2.weight": (C, CI), p + "mlp.fc2.bias": (C,)})
    r = "model.region_encoder."
    shapes.update({"model.mm_projector.readout.0.weight": (D, C), "model.mm_projector.readout.0.bias": (D,),
                   "model.mm_projector.readout.2.weight": (D, D), "model.mm_projector.readout.2.bias": (D,),
                   r + "feat_linear.0.weight": (D, C), r + "feat_linear.0.bias": (D,),
                   r + "feat_linear.2.weight": (D, D), r + "feat_linear.2.bias": (D,),
                   r + "pos_linear.weight": (C, 2), r + "pos_linear.bias": (C,)})
    if lite:
        shapes.update({r + "mask_embedding.weight": (C, 1, 1, 1), r + "mask_embedding.bias": (C,)})
        for scope in ("local", "global"):
            shapes.update({r + f"fusion_attention_{scope}.in_proj_weight": (3 * C, C),
                           r + f"fusion_attention_{scope}.in_proj_bias": (3 * C,),
                           r + f"fusion_attention_{scope}.out_proj.weight": (C, C),
                           r + f"fusion_attention_{scope}.out_proj.bias": (C,),
                           r + f"ln_{scope}.weight": (C,), r + f"ln_{scope}.bias": (C,)})
    return shapes


def release_config(framework: str, tokenizer, tie: bool) -> dict:
    return dict(
        architectures=["PixelreferliteQwen2ForCausalLM" if framework == "object_only"
                       else "PixelreferQwen2ForCausalLM"],
        model_type=MODEL_TYPES[framework], hidden_size=D, intermediate_size=I, num_hidden_layers=TL,
        num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=len(tokenizer), hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        tie_word_embeddings=tie, use_sliding_window=False, sliding_window=4096, max_window_layers=TL,
        attention_dropout=0.0, bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="bfloat16", mm_vision_encoder="DAMO-NLP-SG/VL3-SigLIP-NaViT", mm_hidden_size=C,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, spatial_merge_size=2, mm_max_length=64,
        use_token_compression=True, image_aspect_ratio="qwen2vl", mask_num=N,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        region_token_index=tokenizer.convert_tokens_to_ids("<REGION>"),
        vision_encoder_config=dict(hidden_size=C, intermediate_size=CI, num_hidden_layers=VL,
                                   num_attention_heads=4, patch_size=14, model_type="videollama3_vision_encoder"),
    )


def write_release(path, framework="object_only", layout="bin", tie=True, edit=None) -> dict[str, torch.Tensor]:
    """Write a tiny release folder; `edit(weights)` may corrupt the weights first. Returns the weights."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = release_tokenizer()
    tokenizer.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    shapes = release_shapes(framework == "object_only", len(tokenizer))
    weights = {k: torch.randn(s, generator=generator).to(torch.bfloat16) for k, s in shapes.items()}
    if tie:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    if edit is not None:
        edit(weights)
    (path / "config.json").write_text(json.dumps(release_config(framework, tokenizer, tie), indent=2))
    if layout == "bin":
        torch.save(weights, path / "pytorch_model.bin")
    else:  # sharded, the way the release's trainer saves with save_safetensors=False
        names = sorted(weights)
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for shard, keys in shards.items():
            torch.save({k: weights[k] for k in keys}, path / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weights


def our_name(release_name: str) -> str:
    for _, regex, template in KEY_RULES:
        if match := re.fullmatch(regex, release_name):
            return match.expand(template)
    raise KeyError(release_name)


@pytest.fixture(scope="module", params=["object_only", "vision_object"])
def converted(request, tmp_path_factory):
    framework = request.param
    root = tmp_path_factory.mktemp(framework)
    weights = write_release(root / "release", framework, layout="sharded" if framework == "object_only" else "bin")
    report = convert_release(root / "release", root / "converted")
    model, processor = pixelrefer.load(root / "converted")
    return framework, weights, report, model, processor


# ----------------------------------------------------------------------------- conversion


def test_every_release_tensor_lands_where_the_key_map_says(converted):
    framework, weights, report, model, _ = converted
    ours = model.state_dict()
    for name, tensor in weights.items():
        if "mask_embedding" in name:
            continue
        target = ours[our_name(name)]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = tensor.shape[0]
            torch.testing.assert_close(target[rows:], tensor.float().mean(0, keepdim=True).expand(1, -1),
                                       rtol=1e-2, atol=1e-2)  # the new <video> row: the mean row (bf16)
            target = target[:rows]
        assert torch.equal(target, tensor.float()), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    mapped = sum(report.mapped.values())
    assert mapped + len(report.unused) == len(weights)


def test_report_and_config_carry_the_release_settings(converted):
    framework, _, report, model, processor = converted
    lite = framework == "object_only"
    cfg = model.config
    assert cfg.framework == framework and processor.config.framework == framework
    expected = (N, 50, 3) if lite else (N, 100, 5)
    assert (cfg.num_object_tokens, cfg.downscale_threshold, cfg.kmeans_iterations) == expected
    assert cfg.release_swapped_position_axes and cfg.release_prompt_format
    assert cfg.release_variable_token_count is (not lite)
    assert (cfg.oci_local_size, cfg.oci_global_size, cfg.oci_num_heads) == (224, 336, 8)
    assert (cfg.video_merge_size, cfg.video_compression_threshold, cfg.image_max_pixels) == (2, 0.1, 64 * 196)
    assert report.added_tokens == ["<video>"]
    assert report.vocab_resize == (304, 305)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<video>") == cfg.video_token_id == 304
    assert tokenizer.convert_tokens_to_ids("<REGION>") == cfg.region_token_id
    expected_unused = ["model.region_encoder.mask_embedding.bias", "model.region_encoder.mask_embedding.weight"]
    assert [u for u in report.unused if u.startswith("model.")] == (expected_unused if lite else [])
    parts = dict(llm=2 + 12 * TL, vision_encoder=4 + 16 * VL, image_projector=4, object_tokenizer=6)
    assert report.mapped == (dict(parts, infusion=12) if lite else parts)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_forward_runs_on_images_and_videos(converted, kind):
    framework, _, _, model, processor = converted
    if kind == "image":
        image, masks = demo_scene()
        inputs = processor(text=PROMPT, images=image, masks=[masks["disc"]])
    else:
        video, masks = demo_video()
        inputs = processor(text="What does <object0><region> do?", videos=video, masks=[masks["disc"]])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    assert ("pixel_values" in inputs or "pixel_values_videos" in inputs) is (framework == "vision_object")


def test_prompts_match_the_release_string_token_for_token(converted):
    framework, _, _, _, processor = converted
    tok, cfg = processor.tokenizer, processor.config
    image, masks = demo_scene()
    if framework == "object_only":
        video, video_masks = demo_video()
        inputs = processor(text="<video>\nWhat does <object0><region> do?", videos=video, masks=[video_masks["disc"]])
        units = ",".join(f"Time {t}:" + "<REGION>" * N for t in ("0.0", "0.5", "1.0"))
        release = f"<|im_start|>user\nWhat does <object0>[{units}] do?<|im_end|>\n<|im_start|>assistant\n"
    else:
        inputs = processor(text="<image>\n" + PROMPT, images=image, masks=[masks["square"]])
        count = int(inputs["image_grid_thw"].prod())
        region = "[" + "<REGION>" * N + "]"
        release = (f"<|im_start|>user\n{'<image>' * count}\n{PROMPT.replace('<region>', region)}<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert inputs["input_ids"][0].tolist() == tok(release, add_special_tokens=False)["input_ids"]
    if framework == "vision_object":  # video frames: the release writes <image> tokens where we write <video>
        video, video_masks = demo_video()
        frames = processor(text="What does <object0><region> do?", videos=video, masks=[{1: video_masks["disc"][1]}])
        kept = frames["video_compression_mask"].view(3, -1).sum(1).tolist()
        times = ",".join(f"Time {t}s:" + "<image>" * k for t, k in zip(("0.0", "0.5", "1.0"), kept))
        question = f"What does <object0>[{'<REGION>' * N}] do?"
        release = f"<|im_start|>user\n{times}\n{question}<|im_end|>\n<|im_start|>assistant\n"
        ids = frames["input_ids"][0]
        ids = torch.where(ids == cfg.video_token_id, cfg.image_token_id, ids)
        assert ids.tolist() == tok(release, add_special_tokens=False)["input_ids"]
    piecewise = pixelrefer.PixelReferProcessor(tok, cfg.__class__(**{**cfg.to_dict(), "release_prompt_format": False}))
    assert piecewise(text=PROMPT, images=image, masks=[masks["square"]])["input_ids"].shape != inputs["input_ids"].shape


def test_labels_and_spans_survive_merged_tokenization(converted):
    _, _, _, _, processor = converted
    image, masks = demo_scene()
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "a green disc"}]
    encoded = processor.encode(conversation, images=image, masks=[masks["disc"]])
    labels = encoded.inputs["labels"][0]
    supervised = labels[labels != -100].tolist()
    assert processor.tokenizer.decode(supervised) == "a green disc<|im_end|>"
    objects = [s for s in encoded.spans[0] if s.group == "object"]
    ids = encoded.inputs["input_ids"][0]
    assert len(objects) == 1 and (ids[objects[0].start:objects[0].end] == processor.config.region_token_id).all()


def test_sharded_and_single_file_bin_and_safetensors_agree(tmp_path):
    write_release(tmp_path / "bin", layout="bin")
    write_release(tmp_path / "sharded", layout="sharded")
    weights = write_release(tmp_path / "st", layout="bin")
    (tmp_path / "st" / "pytorch_model.bin").unlink()
    from safetensors.torch import save_file
    save_file({k: v.clone() for k, v in weights.items()}, tmp_path / "st" / "model.safetensors")
    outputs = [convert_release(tmp_path / k, tmp_path / f"{k}-out") for k in ("bin", "sharded", "st")]
    states = [pixelrefer.load(tmp_path / f"{k}-out")[0].state_dict() for k in ("bin", "sharded", "st")]
    assert outputs[0].mapped == outputs[1].mapped == outputs[2].mapped
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]) and torch.equal(tensor, states[2][name]), name


def test_untied_release_keeps_its_head(tmp_path):
    weights = write_release(tmp_path / "release", tie=False)
    convert_release(tmp_path / "release", tmp_path / "out")
    model, _ = pixelrefer.load(tmp_path / "out")
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight[:304], weights["lm_head.weight"].float())


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "framework, edit, message",
    [
        ("object_only", lambda w: w.update({"model.region_encoder.extra_proj.weight": torch.zeros(2)}),
         r"match no rule.*model\.region_encoder\.extra_proj\.weight"),
        ("object_only", lambda w: w.pop("model.vision_encoder.vision_encoder.encoder.layers.1.mlp.fc2.bias"),
         r"without a source: model\.vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"),
        ("object_only", lambda w: w.update({"model.region_encoder.pos_linear.weight": torch.zeros(C, 3)}),
         r"shape mismatch: model\.region_encoder\.pos_linear\.weight \(64, 3\) -> "
         r"model\.object_tokenizer\.position_proj\.weight expects \(64, 2\)"),
        ("vision_object", lambda w: w.update({"model.region_encoder.ln_local.weight": torch.zeros(C)}),
         r"no place in our model: model\.region_encoder\.ln_local\.weight -> model\.infusion\.local_norm\.weight"),
    ],
    ids=["unmapped-extra", "missing", "shape-mismatch", "lite-tensor-in-pixelrefer"],
)
def test_bad_checkpoints_raise_naming_the_keys_and_write_nothing(tmp_path, framework, edit, message):
    write_release(tmp_path / "release", framework, edit=edit)
    with pytest.raises(ConversionError, match=message):
        convert_release(tmp_path / "release", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no dst, no temporary folder


class Payload:
    """Stands for arbitrary pickled code, which weights_only=True must refuse to run."""


def test_bin_with_pickled_objects_is_refused(tmp_path):
    write_release(tmp_path / "release")
    torch.save({"model.norm.weight": torch.zeros(D), "payload": Payload()}, tmp_path / "release" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        convert_release(tmp_path / "release", tmp_path / "out")


def test_unknown_model_type_and_non_empty_destination_are_rejected(tmp_path):
    write_release(tmp_path / "release")
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "videollama3_qwen2"}))
    with pytest.raises(ConversionError, match="videollama3_qwen2"):
        convert_release(tmp_path / "other", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_release(tmp_path / "release", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    convert_release(tmp_path / "release", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "keep.txt").exists()


# ----------------------------------------------------------------------------- command line


def test_cli_handler_prints_the_report_and_returns_exit_codes(tmp_path, capsys):
    write_release(tmp_path / "release")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", str(tmp_path / "release"), str(tmp_path / "out")])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "mapped " in out and "model.region_encoder.mask_embedding.weight" in out and str(tmp_path / "out") in out
    assert args.handler(args) == 1  # the destination now exists
    assert "not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- compatibility formulas


def release_position_grid(mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """The release's Eq. 4, written from its code: box (top, left, bottom, right), bottom/right inclusive,
    read as (x0, y0, x1, y1)."""
    H, W = mask.shape
    rows, cols = np.nonzero(mask)
    top, left = max(0, rows.min() - 28), max(0, cols.min() - 28)
    bottom, right = min(H - 1, rows.max() + 28), min(W - 1, cols.max() + 28)
    x = (np.arange(grid_w) / grid_w * (bottom - top) + top) / (W - 1)
    y = (np.arange(grid_h) / grid_h * (right - left) + left) / (H - 1)
    return np.stack(np.broadcast_arrays(x[None, :], y[:, None]), axis=-1)


@pytest.mark.parametrize("name", ["square", "disc", "speck"])
def test_swapped_position_grid_is_the_releases_formula(name):
    image, masks = demo_scene()
    crop = regions.crop_object(image, masks[name], patch=14, num_tokens=32, downscale_threshold=100,
                               swapped_axes=True)
    np.testing.assert_allclose(crop.positions, release_position_grid(masks[name], *crop.grid), rtol=1e-6)


def test_swapped_position_grid_hand_values():
    # A 3x5-pixel mask at rows 40..42, cols 60..64 of a 100x200 image; padded release box
    # (top, left, bottom, right) = (12, 32, 70, 92): x uses the rows, y the columns.
    mask = np.zeros((100, 200), bool)
    mask[40:43, 60:65] = True
    grid = regions.position_grid(regions.padded_box(regions.mask_to_box(mask), 28, 100, 200), 2, 4, 100, 200,
                                 swapped_axes=True)
    np.testing.assert_allclose(grid[0, 0], [12 / 199, 32 / 99], rtol=1e-6)
    np.testing.assert_allclose(grid[1, 3], [(0.75 * 58 + 12) / 199, (0.5 * 60 + 32) / 99], rtol=1e-6)


def test_lite_downscales_above_fifty_patches():
    area = 196 * 200  # 200 patches of foreground
    assert regions.scale_ratio(area, 196, 32, 50, 8.0) == pytest.approx(math.sqrt(50 / 200)) == pytest.approx(0.5)
    assert regions.scale_ratio(area, 196, 32, 100, 8.0) == pytest.approx(math.sqrt(0.5))
    assert regions.scale_ratio(196 * 75, 196, 32, 50, 8.0) == pytest.approx(math.sqrt(50 / 75))
    assert regions.scale_ratio(196 * 75, 196, 32, 100, 8.0) == 1.0


def test_converted_processors_apply_t_and_the_variable_token_count(converted):
    framework, _, _, _, processor = converted
    image = np.zeros((400, 400, 3), np.uint8)
    big = np.zeros((400, 400), bool)
    big[20:380, 20:380] = True  # 129600 px = 661 patches > T
    speck = np.zeros((400, 400), bool)
    speck[200, 200:204] = True
    encoded = processor.encode("<region> and <region>", images=image, masks=[big, speck])
    big_crop, speck_crop = encoded.crops[0]
    threshold = 50 if framework == "object_only" else 100
    assert big_crop.scale == pytest.approx(math.sqrt(threshold * 196 / 129600))
    cells = int(speck_crop.cell_mask.sum())
    assert 0 < cells < N
    slots = int((encoded.inputs["input_ids"] == processor.config.region_token_id).sum())
    assert slots == N + (cells if framework == "vision_object" else N)
