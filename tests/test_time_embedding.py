"""The object time embedding (the paper's timestamp embeddings of video object tokens, off by default)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pixelrefer.modeling.time_embedding import FrameTimeEmbedding
from tests.conftest import FRAMEWORKS, build


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pixelrefer.data import generate_shapesworld, load_annotations

    root = tmp_path_factory.mktemp("sw-time")
    paths = generate_shapesworld(root, seed=3, num_images=2, num_videos=1)
    records = load_annotations(paths["train"], root)
    return [r for r in records if r.is_video][:2] + [r for r in records if not r.is_video][:2]


def batch_of(processor, samples):
    text, images, videos, masks = (list(column) for column in zip(*(s.load_media() for s in samples)))
    return processor(text=text, images=images, videos=videos, masks=masks)


def test_the_embedding_starts_at_zero_and_at_a_chosen_norm():
    embedding = FrameTimeEmbedding(16, num_frames=8)
    frames = torch.tensor([0, 3, 7, -1, 9])
    assert torch.equal(embedding(frames), torch.zeros(5, 16))
    features = embedding.features(torch.arange(8))
    assert features.shape == (8, 9) and torch.equal(features[:, 0], torch.arange(8) / 7)
    assert len({tuple(row.tolist()) for row in features}) == 8, "every frame has its own features"
    embedding.start_at_norm(5.0, seed=2)
    vectors = embedding(torch.arange(8))
    torch.testing.assert_close(vectors.norm(dim=-1).mean(), torch.tensor(5.0))
    assert torch.equal(embedding(torch.tensor([-1, 2]))[0], torch.zeros(16)), "an image unit gets nothing"
    again = FrameTimeEmbedding(16, num_frames=8)
    again.start_at_norm(5.0, seed=2)
    assert torch.equal(again.proj.weight, embedding.proj.weight)
    with pytest.raises(ValueError, match="norm must be positive"):
        embedding.start_at_norm(0.0)
    with pytest.raises(ValueError, match="num_frames must be at least 2"):
        FrameTimeEmbedding(16, num_frames=1)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_video_units_get_their_frame_vector_and_image_units_nothing(framework, shapes):
    plain, processor = build(framework)
    timed, _ = build(framework, object_time_embedding=True)
    missing, unexpected = timed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["model.object_tokenizer.time_embedding.proj.weight"] and not unexpected
    text, images, videos, masks = (list(column) for column in zip(*(s.load_media() for s in shapes)))
    encoded = processor.encode(text, images, videos, masks)
    batch = encoded.inputs
    frames = batch["region_frame_index"]
    # the processor's frame of every unit: the frame of its <REGION> span, -1 for image units
    spans = [s for row in encoded.spans for s in row if s.group == "object"]
    assert frames.tolist() == [-1 if s.frame_index is None else s.frame_index for s in spans]
    assert (frames >= 1).any() and (frames == -1).any()
    with torch.no_grad():
        assert torch.equal(timed(**batch).logits, plain(**batch).logits), "a zero embedding changes nothing"
        timed.model.object_tokenizer.time_embedding.start_at_norm(3.0)
        region = {k: v for k, v in batch.items() if k.startswith("region_")}
        base = plain.model.get_object_features(**region)
        tokens = timed.model.get_object_features(**region).tokens
        added = timed.model.object_tokenizer.time_embedding(frames)[:, None, :] * base.valid[..., None]
        torch.testing.assert_close(tokens, base.tokens + added, rtol=0, atol=1e-6)
        assert torch.equal(tokens[frames == -1], base.tokens[frames == -1])
        assert not torch.equal(timed(**batch).logits, plain(**batch).logits)
        del region["region_frame_index"]
        with pytest.raises(ValueError, match="needs region_frame_index"):
            timed.model.get_object_features(**region)


def test_a_saved_model_keeps_its_time_embedding(tmp_path, shapes):
    from pixelrefer.modeling import PixelReferForConditionalGeneration

    model, processor = build("object_only", object_time_embedding=True, object_time_frames=6)
    model.model.object_tokenizer.time_embedding.start_at_norm(2.0)
    model.save_pretrained(tmp_path)
    loaded = PixelReferForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.model.object_tokenizer.time_embedding.num_frames == 6
    batch = batch_of(processor, shapes[:1])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="object_time_frames must be at least 2"):
        build("object_only", object_time_frames=1)


def test_cached_records_carry_the_frames_and_the_stage_trains_the_embedding(shapes):
    from pixelrefer.cached_media import OBJECT_TIME, cache_media, cached_loss, collate_cached, train_on_cached_media

    model, processor = build("object_only", object_time_embedding=True)
    model.model.object_tokenizer.time_embedding.start_at_norm(3.0)
    records = cache_media(model, processor, shapes, progress=False, objects=True)
    pad = model.config.text_config.pad_token_id
    with torch.no_grad():
        for sample, record in zip(shapes, records):
            assert record.object_frames.shape == record.objects.shape[:1]
            full = model(**batch_of(processor, [sample])).loss
            assert torch.equal(cached_loss(model, collate_cached([record], pad)), full), sample.where
    before = model.model.object_tokenizer.time_embedding.proj.weight.clone()
    train_on_cached_media(model, records, steps=3, lr=1e-3, batch_size=2, object_mlp_lr=1e-3)
    assert not torch.equal(before, model.model.object_tokenizer.time_embedding.proj.weight)
    assert OBJECT_TIME == "model.object_tokenizer.time_embedding."


def test_a_media_stage_switches_the_time_embedding_on(tmp_path):
    from pixelrefer.cached_media import OBJECT_TIME
    from pixelrefer.training import MediaStage, Trainer
    from tests.test_training import config, samples

    stages = [dict(steps=3, batch_size=2, lr=3e-3, object_mlp_lr=3e-3, object_time_embedding=4.0,
                   shapesworld=dict(seed=4, num_images=2, num_videos=1))]
    trainer = Trainer(config(tmp_path, "time", steps=2, framework="object_only", media_stages=stages), samples())
    trainer.run()
    final = tmp_path / "time" / "final"
    assert json.loads((final / "config.json").read_text())["object_time_embedding"] is True
    weight = load_file(final / "model.safetensors")[f"{OBJECT_TIME}proj.weight"]
    started = FrameTimeEmbedding(weight.shape[0])
    started.start_at_norm(4.0, seed=0)
    assert not torch.equal(weight, started.proj.weight), "it trained from its start"
    assert f"{OBJECT_TIME}proj.weight" in load_file(tmp_path / "time" / MediaStage.folder(0) / "language_model.safetensors")
    again = Trainer(config(tmp_path, "time", steps=2, framework="object_only", media_stages=stages), samples())
    assert again.media_stage(0) == [], "a finished stage is loaded with its time embedding"
    model = again.accelerator.unwrap_model(again.model)
    assert torch.equal(model.model.object_tokenizer.time_embedding.proj.weight, weight)
    with pytest.raises(ValueError, match=r"media_stages\[0\].object_time_embedding switches .* has one already"):
        again.media_stage(0)
