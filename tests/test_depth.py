"""Decoder layers appended to a trained LLM: identity at the start, saved and loaded, trained by a media stage."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pixelrefer.modeling.depth import add_language_layers
from tests.conftest import FRAMEWORKS, build
from tests.test_time_embedding import batch_of, shapes  # noqa: F401 (a fixture)


def trained_a_little(model):
    """Give every weight a nudge, so an identity start is not an accident of a model at its init."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_added_layers_leave_the_outputs_and_the_generated_answers_unchanged(framework, shapes):
    from pixelrefer.inference import predict

    model, processor = build(framework)
    trained_a_little(model)
    batch = batch_of(processor, shapes)
    with torch.no_grad():
        before = model(**batch).logits
    answers = [p.prediction for p in predict(model, processor, shapes[:2], max_new_tokens=5)]
    text = model.config.text_config
    assert add_language_layers(model, 2, seed=1) == [2, 3]
    assert len(model.model.language_model.layers) == text.num_hidden_layers == 4
    assert text.layer_types == ["full_attention"] * 4
    layer = model.model.language_model.layers[3]
    assert layer.self_attn.layer_idx == 3
    assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    assert layer.self_attn.q_proj.weight.std() > 0 and torch.equal(layer.input_layernorm.weight,
                                                                  torch.ones_like(layer.input_layernorm.weight))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert [p.prediction for p in predict(model, processor, shapes[:2], max_new_tokens=5)] == answers


def test_the_same_seed_adds_the_same_layers_and_bad_counts_are_named():
    first, _ = build("object_only")
    second, _ = build("object_only")
    add_language_layers(first, 1, seed=3)
    add_language_layers(second, 1, seed=3)
    for (name, a), (_, b) in zip(first.model.language_model.layers[2].named_parameters(),
                                 second.model.language_model.layers[2].named_parameters()):
        assert torch.equal(a, b), name
    for count in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="number of language layers to add must be a positive integer"):
            add_language_layers(first, count)


def test_a_saved_deeper_model_loads_with_its_layers(tmp_path, shapes):
    from pixelrefer.modeling import PixelReferForConditionalGeneration

    model, processor = build("vision_object")
    add_language_layers(model, 2)
    with torch.no_grad():
        model.model.language_model.layers[3].mlp.down_proj.weight.normal_()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4
    loaded = PixelReferForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = batch_of(processor, shapes[:1])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_the_added_layers_train_on_cached_media(shapes):
    from pixelrefer.cached_media import cache_media, train_on_cached_media

    model, processor = build("object_only")
    add_language_layers(model, 1)
    records = cache_media(model, processor, shapes, progress=False)
    layer = model.model.language_model.layers[2]
    before = {name: p.clone() for name, p in layer.named_parameters()}
    train_on_cached_media(model, records, steps=3, lr=1e-3, batch_size=2)
    moved = {name for name, p in layer.named_parameters() if not torch.equal(p, before[name])}
    assert {"self_attn.o_proj.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight"} <= moved


def test_a_media_stage_adds_layers_saves_them_and_a_rerun_loads_them(tmp_path):
    from pixelrefer.training import MediaStage, Trainer
    from tests.test_training import config, samples

    stages = [dict(steps=3, batch_size=2, lr=3e-3, language_layers=2, shapesworld=dict(seed=4, num_images=2,
                                                                                     num_videos=1))]
    trainer = Trainer(config(tmp_path, "deep", steps=2, framework="object_only", media_stages=stages), samples())
    trainer.run()
    final = tmp_path / "deep" / "final"
    layers = json.loads((final / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert layers == len(trainer.accelerator.unwrap_model(trainer.model).model.language_model.layers)
    added = layers - 1
    weight = load_file(final / "model.safetensors")[f"model.language_model.layers.{added}.self_attn.o_proj.weight"]
    assert weight.any(), "the identity start trained"
    stage_file = tmp_path / "deep" / MediaStage.folder(0) / "language_model.safetensors"
    assert f"model.language_model.layers.{added}.self_attn.o_proj.weight" in load_file(stage_file)
    again = Trainer(config(tmp_path, "deep", steps=2, framework="object_only", media_stages=stages), samples())
    assert again.media_stage(0) == [], "a finished stage is loaded with its layers"
    model = again.accelerator.unwrap_model(again.model)
    assert torch.equal(model.model.language_model.layers[added].self_attn.o_proj.weight, weight)
