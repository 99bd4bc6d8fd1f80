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


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_widened_attention_leaves_the_outputs_and_the_generated_answers_unchanged(framework, shapes):
    from pixelrefer.inference import predict
    from pixelrefer.modeling.depth import widen_attention

    model, processor = build(framework)
    trained_a_little(model)
    text = model.config.text_config
    old, kv = text.num_attention_heads, text.num_key_value_heads
    assert kv < old, "the tiny preset's query heads share key/value heads"
    head_dim = text.hidden_size // old
    batch = batch_of(processor, shapes)
    attention = model.model.language_model.layers[0].self_attn
    k_before = attention.k_proj.weight.clone()
    with torch.no_grad():
        before = model(**batch).logits
    answers = [p.prediction for p in predict(model, processor, shapes[:2], max_new_tokens=5)]
    assert widen_attention(model, old + 2, seed=1) == [old, old + 1]
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (old + 2, old + 2, head_dim)
    attention = model.model.language_model.layers[0].self_attn
    assert attention.q_proj.weight.shape == attention.k_proj.weight.shape == ((old + 2) * head_dim, text.hidden_size)
    assert attention.o_proj.weight.shape == (text.hidden_size, (old + 2) * head_dim)
    group = old // kv
    for head in range(old):  # each old head's own key head is a copy of the one it shared
        shared = head // group
        assert torch.equal(attention.k_proj.weight[head * head_dim:(head + 1) * head_dim],
                           k_before[shared * head_dim:(shared + 1) * head_dim])
    assert not attention.o_proj.weight[:, old * head_dim:].any(), "the new heads start silent"
    assert attention.q_proj.weight[old * head_dim:].std() > 0 and attention.k_proj.weight[old * head_dim:].std() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    assert [p.prediction for p in predict(model, processor, shapes[:2], max_new_tokens=5)] == answers


def test_ungrouped_heads_only_and_bad_head_counts_are_named(shapes):
    from pixelrefer.modeling.depth import widen_attention

    model, processor = build("object_only")
    batch = batch_of(processor, shapes[:2])
    with torch.no_grad():
        before = model(**batch).logits
    heads = model.config.text_config.num_attention_heads
    assert widen_attention(model, heads) == [], "the key/value heads ungrouped, no query head added"
    assert model.config.text_config.num_key_value_heads == heads
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to widen"):
        widen_attention(model, heads)
    for count in (heads - 1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="attention heads must be an integer of at least"):
            widen_attention(model, count)


def test_a_media_stage_widens_attention_saves_it_and_a_rerun_loads_it(tmp_path, shapes):
    from pixelrefer.modeling import PixelReferForConditionalGeneration
    from pixelrefer.training import Trainer
    from tests.test_training import config, samples

    stages = [dict(steps=3, batch_size=2, lr=3e-3, attention_heads=6, shapesworld=dict(seed=4, num_images=2,
                                                                                      num_videos=1))]
    trainer = Trainer(config(tmp_path, "wide", steps=2, framework="object_only", media_stages=stages), samples())
    trainer.run()
    final = tmp_path / "wide" / "final"
    text = json.loads((final / "config.json").read_text())["text_config"]
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (6, 6)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    weight = model.model.language_model.layers[0].self_attn.o_proj.weight
    assert weight[:, 4 * text["head_dim"]:].any(), "the new heads trained"
    loaded = PixelReferForConditionalGeneration.from_pretrained(final).eval()
    batch = batch_of(trainer.processor, shapes[:1])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    again = Trainer(config(tmp_path, "wide", steps=2, framework="object_only", media_stages=stages), samples())
    assert again.media_stage(0) == [], "a finished stage is loaded with its heads"
    assert torch.equal(again.accelerator.unwrap_model(again.model).model.language_model.layers[0].self_attn
                       .o_proj.weight, weight)


def test_new_head_entries_mark_exactly_the_new_heads_rows_and_columns():
    from pixelrefer.modeling.depth import new_head_entries, widen_attention

    model, _ = build("object_only")
    text = model.config.text_config
    old = text.num_attention_heads
    with pytest.raises(ValueError, match="not query heads of a widened attention"):
        new_head_entries(model, [0])  # grouped key/value heads: not widened yet
    added = widen_attention(model, old + 2)
    entries = new_head_entries(model, added)
    head_dim = text.head_dim
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            mask = entries[getattr(attention, name).weight]
            assert mask[old * head_dim:].all() and not mask[: old * head_dim].any(), name
        mask = entries[attention.o_proj.weight]
        assert mask[:, old * head_dim:].all() and not mask[:, : old * head_dim].any()
    assert len(entries) == len(model.model.language_model.layers) * (4 + (attention.q_proj.bias is not None) * 3)
    with pytest.raises(ValueError, match="not query heads"):
        new_head_entries(model, [old + 2])


def test_fresh_entries_move_at_their_own_rate_and_the_rest_as_before(shapes):
    """One AdamW step with fresh_lr = 10 × lr: the new heads' entries move ten times as far as in the same step
    without it, every other weight exactly as far."""
    from pixelrefer.cached_media import cache_media, train_on_cached_media
    from pixelrefer.modeling.depth import new_head_entries, widen_attention

    moved = []
    for fresh_lr in (None, 1e-2):
        model, processor = build("object_only")
        trained_a_little(model)
        added = widen_attention(model, model.config.text_config.num_attention_heads + 2, seed=1)
        with torch.no_grad():  # the new heads' o_proj columns off zero, so every new entry has a gradient
            for layer in model.model.language_model.layers:
                layer.self_attn.o_proj.weight[:, -2 * model.config.text_config.head_dim:].normal_(0, 0.02)
        records = cache_media(model, processor, shapes, progress=False)
        entries = new_head_entries(model, added)
        named = dict(model.named_parameters())
        start = {n: p.detach().clone() for n, p in named.items()}
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=2, warmup_ratio=0.0,
                              fresh=entries if fresh_lr else None, fresh_lr=fresh_lr)
        masks = {n: entries[p] for n, p in named.items() if p in entries}
        moved.append(({n: p.detach() - start[n] for n, p in named.items()}, masks))
    (plain, masks), (fast, _) = moved
    assert masks, "the widened projections are marked"
    for name, step in plain.items():
        mask = masks.get(name, torch.zeros_like(step, dtype=torch.bool))
        assert torch.equal(fast[name][~mask], step[~mask]), name
        if mask.any():
            assert step[mask].abs().max() > 0, name
            torch.testing.assert_close(fast[name][mask], 10 * step[mask], rtol=1e-4, atol=1e-7)


def test_fresh_lr_needs_the_entries_of_the_llm_and_a_stage_needs_something_added(shapes):
    from pixelrefer.cached_media import cache_media, train_on_cached_media
    from pixelrefer.training import MediaStage

    model, processor = build("object_only")
    records = cache_media(model, processor, shapes[:2], progress=False)
    with pytest.raises(ValueError, match="give them as fresh"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=2, fresh_lr=1e-2)
    outside = next(p for n, p in model.named_parameters() if "object_tokenizer" in n)
    with pytest.raises(ValueError, match="must be one of the LLM's"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=2, fresh_lr=1e-2,
                              fresh={outside: torch.ones_like(outside, dtype=torch.bool)})
    with pytest.raises(ValueError, match="fresh_lr must be a positive number"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=2, fresh_lr=-1.0, fresh={})
    with pytest.raises(ValueError, match=r"media_stages\[0\]: new_lr is the rate of what the stage adds"):
        MediaStage.parse(dict(steps=1, new_lr=1e-3), 0)
    with pytest.raises(ValueError, match=r"media_stages\[0\]: new_lr must be a positive number"):
        MediaStage.parse(dict(steps=1, new_lr=0, attention_heads=8), 0)


def test_a_media_stage_trains_added_layers_and_heads_at_new_lr(tmp_path):
    """Both additions in one stage: the widened new layers' projections are the ones given the rate (widening
    replaces them), and the new heads' output columns move further than at the LLM's rate."""
    from pixelrefer.training import Trainer
    from tests.test_training import config, samples

    norms = []
    for new_lr in (None, 3e-2):
        stage = dict(steps=3, batch_size=2, lr=3e-4, language_layers=1, attention_heads=6,
                     shapesworld=dict(seed=4, num_images=2, num_videos=1))
        if new_lr:
            stage["new_lr"] = new_lr
        trainer = Trainer(config(tmp_path, f"fast-{new_lr}", steps=2, framework="object_only", media_stages=[stage]),
                          samples())
        trainer.run()
        model = trainer.accelerator.unwrap_model(trainer.model)
        head_dim = model.config.text_config.head_dim
        layers = model.model.language_model.layers
        norms.append((float(layers[0].self_attn.o_proj.weight[:, 4 * head_dim:].detach().norm()),
                      float(layers[-1].mlp.down_proj.weight.detach().norm())))
    (slow_heads, slow_layer), (fast_heads, fast_layer) = norms
    assert fast_heads > 20 * slow_heads and fast_layer > 20 * slow_layer
