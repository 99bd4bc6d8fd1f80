"""Frozen-media stage: cached object/vision tokens give the full model's loss, and only the LLM trains."""

import dataclasses

import numpy as np
import pytest
import torch

from pixelrefer import InputError
from pixelrefer.cached_media import (
    CachedRecord,
    cache_media,
    cached_loss,
    collate_cached,
    media_token_ids,
    train_on_cached_media,
    weighted_indices,
)
from tests.conftest import FRAMEWORKS, build


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pixelrefer.data import generate_shapesworld, load_annotations

    root = tmp_path_factory.mktemp("sw")
    paths = generate_shapesworld(root, seed=3, num_images=2, num_videos=1)
    records = load_annotations(paths["train"], root)
    videos = [r for r in records if r.is_video][:3]
    images = [r for r in records if not r.is_video][:3]
    assert len(videos) == 3 and len(images) == 3
    return videos + images


def full_batch(processor, samples):
    text, images, videos, masks = (list(column) for column in zip(*(s.load_media() for s in samples)))
    return processor(text=text, images=images, videos=videos, masks=masks)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cached_media_reproduce_the_full_forward_loss(framework, shapes):
    model, processor = build(framework)
    records = cache_media(model, processor, shapes, progress=False)
    assert [r.task for r in records] == [s.task for s in shapes]
    with torch.no_grad():
        for sample, record in zip(shapes, records):
            full = model(**full_batch(processor, [sample])).loss
            cached = cached_loss(model, collate_cached([record], model.config.text_config.pad_token_id))
            assert torch.equal(full, cached), sample.where
            slots = torch.isin(record.input_ids, torch.tensor(media_token_ids(model.config)))
            assert record.media.shape == (int(slots.sum()), model.config.text_config.hidden_size)
        # A padded batch of videos and images gives the processor's batched loss.
        batched = cached_loss(model, collate_cached(records, model.config.text_config.pad_token_id))
        torch.testing.assert_close(batched, model(**full_batch(processor, shapes)).loss, rtol=1e-5, atol=1e-5)
    if framework == "vision_object":
        video_slots = records[0].input_ids == model.config.video_token_id
        assert video_slots.any(), "Vision-Object caches the global video tokens too"


def test_only_the_llm_trains_and_the_global_rng_stays(shapes):
    model, processor = build("object_only")
    records = cache_media(model, processor, shapes, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    seen = []
    losses = train_on_cached_media(model, records, steps=40, lr=3e-3, batch_size=4, seed=1,
                                   callback=lambda step, loss: seen.append(step))
    assert torch.equal(torch.get_rng_state(), rng)
    assert seen == list(range(1, 41)) and len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed)
    again, _ = build("object_only")
    assert train_on_cached_media(again, records, steps=40, lr=3e-3, batch_size=4, seed=1) == losses


def assert_trains_the_llm_and(prefix, model, records, **rates):
    """30 steps on `records` lower the loss, move every parameter under `prefix` and nothing outside the LLM
    and `prefix`."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_on_cached_media(model, records, steps=30, lr=3e-3, batch_size=4, seed=1, **rates)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    module = {k for k in before if k.startswith(prefix)}
    assert module and module <= changed
    assert all(k.startswith(("model.language_model.", "lm_head.", prefix)) for k in changed)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_object_features_rebuild_the_object_tokens_and_train_the_object_mlp(framework, shapes):
    from pixelrefer.cached_media import OBJECT_MLP, cached_embeds

    model, processor = build(framework)
    plain = cache_media(model, processor, shapes, progress=False)
    kept = cache_media(model, processor, shapes, progress=False, objects=True)
    K, C = model.config.num_object_tokens, model.config.vision_config.hidden_size
    pad = model.config.text_config.pad_token_id
    with torch.no_grad():
        for sample, record, cached in zip(shapes, kept, plain):
            regions = int((record.input_ids == model.config.region_token_id).sum())
            assert record.objects.shape == (regions // K, K, C) and record.object_valid.shape == (regions // K, K)
            assert torch.equal(record.media, cached.media)
            full = model(**full_batch(processor, [sample])).loss
            assert torch.equal(cached_loss(model, collate_cached([record], pad)), full), sample.where
        # the object MLP run on the kept features writes exactly what the cache holds
        assert torch.equal(cached_embeds(model, collate_cached(kept, pad)), cached_embeds(model, collate_cached(plain, pad)))
    assert_trains_the_llm_and(OBJECT_MLP, model, kept, object_mlp_lr=3e-3)
    # the features themselves stay put: only what comes after them trains
    fresh = cache_media(build(framework)[0], processor, shapes, progress=False, objects=True)
    assert all(torch.equal(r.objects, k.objects) for r, k in zip(kept, fresh))
    with pytest.raises(ValueError, match="cached without its object features"):
        train_on_cached_media(model, plain, steps=1, lr=1e-3, batch_size=2, object_mlp_lr=1e-3)
    with pytest.raises(ValueError, match=f"{plain[1].where} was cached without its object features"):
        collate_cached([kept[0], plain[1]], pad)


def test_projector_inputs_rebuild_the_global_tokens_and_train_the_projector(shapes):
    from pixelrefer.cached_media import PROJECTOR, cached_embeds

    model, processor = build("vision_object")
    plain = cache_media(model, processor, shapes, progress=False)
    kept = cache_media(model, processor, shapes, progress=False, vision=True, objects=True)
    pad = model.config.text_config.pad_token_id
    C = model.config.vision_config.hidden_size
    global_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    with torch.no_grad():
        for sample, record in zip(shapes, kept):
            slots = int(torch.isin(record.input_ids, global_ids).sum())
            assert slots and record.vision.shape == (slots, C), sample.where
            full = model(**full_batch(processor, [sample])).loss
            assert torch.equal(cached_loss(model, collate_cached([record], pad)), full), sample.where
        # the projector run on the kept inputs writes exactly what the plain cache holds, videos and images mixed
        assert torch.equal(cached_embeds(model, collate_cached(kept, pad)), cached_embeds(model, collate_cached(plain, pad)))
        # and it is what writes them: another projector gives other global tokens
        model.model.projector.readout[0].weight.mul_(2)
        changed = cached_embeds(model, collate_cached(kept, pad)) != cached_embeds(model, collate_cached(plain, pad))
        batch = collate_cached(kept, pad)
        assert torch.equal(changed.any(-1), torch.isin(batch["input_ids"], global_ids))
        model.model.projector.readout[0].weight.div_(2)
    assert_trains_the_llm_and(PROJECTOR, model, kept, projector_lr=3e-3)
    with pytest.raises(ValueError, match="cached without its projector inputs: cache with vision=True"):
        train_on_cached_media(model, plain, steps=1, lr=1e-3, batch_size=2, projector_lr=1e-3)
    with pytest.raises(ValueError, match=f"{kept[1].where} was cached without its projector inputs"):
        collate_cached([kept[0], dataclasses.replace(kept[1], vision=None)], pad)
    lite, lite_processor = build("object_only")
    lite_records = cache_media(lite, lite_processor, shapes, progress=False, vision=True)
    assert all(r.vision.shape == (0, C) for r in lite_records)
    with pytest.raises(ValueError, match="no record has image or video tokens"):
        train_on_cached_media(lite, lite_records, steps=1, lr=1e-3, batch_size=2, projector_lr=1e-3)


def test_a_bad_record_is_named(shapes):
    model, processor = build("object_only")

    class Broken:
        where, task = "broken.json:7", "category"

        def load_media(self):
            text, image, video, masks = shapes[3].load_media()
            return text, image, video, [np.zeros_like(masks[0])] + list(masks[1:])

    with pytest.raises(InputError, match="broken.json:7"):
        cache_media(model, processor, [Broken()], progress=False)


def test_task_weights_and_mismatched_media():
    record = CachedRecord(torch.tensor([5, 6]), torch.tensor([-100, 6]), torch.ones(2, dtype=torch.long),
                          torch.zeros(0, 4), "caption", "a:0")
    other = CachedRecord(record.input_ids, record.labels, record.attention_mask, record.media, "choice", "a:1")
    assert weighted_indices([record, other], {"choice": 3}) == [0, 1, 1, 1]
    assert weighted_indices([record, other], {"caption": 0}) == [1]
    with pytest.raises(ValueError, match="leave no record"):
        weighted_indices([record], {"caption": 0})
    model, _ = build("object_only")
    region = model.config.region_token_id
    word = next(i for i in range(10, 100) if i not in media_token_ids(model.config))
    bad = CachedRecord(torch.tensor([word, region]), torch.tensor([-100, 6]), torch.ones(2, dtype=torch.long),
                       torch.zeros(0, model.config.text_config.hidden_size), "x", "a:2")
    with pytest.raises(ValueError, match="0 cached media embeddings for 1 media slots"):
        cached_loss(model, collate_cached([bad], 0))


def test_choice_letters_teacher_forced_match_the_full_model(shapes):
    from pixelrefer.cached_media import choice_letter_accuracy

    model, processor = build("object_only")
    records = cache_media(model, processor, shapes, progress=False)
    choices = [(s, r) for s, r in zip(shapes, records) if s.task == "multiple_choice"]
    assert choices and all(r.kind == s.meta["type"] for s, r in choices)
    assert all(r.kind == "" for s, r in zip(shapes, records) if s.task != "multiple_choice")
    open_id = processor.tokenizer.convert_tokens_to_ids("(")
    scores = choice_letter_accuracy(model, records, open_id, batch_size=4)
    assert scores["all"]["total"] == len(choices), "one lettered answer per multiple-choice record"
    right = 0
    with torch.no_grad():  # the same letters from the full model, one record at a time
        for sample, record in choices:
            batch = full_batch(processor, [sample])
            labels = batch["labels"][0]
            j = int(((labels[:-1] == open_id) & (labels[1:] != -100)).nonzero()[0])
            right += int(model(**batch).logits[0, j].argmax() == labels[j + 1])
    assert scores["all"]["right"] == right
    assert sum(v["total"] for k, v in scores.items() if k != "all") == len(choices)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes-tiny", "shapes-tiny-lite"])
def test_choice_letters_teacher_forced_are_the_generated_letters(tmp_path, name):
    """What the in-training probe reports is what the benchmark scores: a model that opens its answer with "("
    (shapes-tiny up to v15) has its greedy letter the teacher-forced one, question by question; both shipped models
    now write the answer's one word first and then its letter ("higher (D)"; shapes-tiny-lite since v23, shapes-tiny
    since v18; a Reasoning answer's speeds before it), so on records written that way the greedy letter is the
    teacher-forced one wherever the text written is the reference's."""
    import pixelrefer
    from pixelrefer.cached_media import choice_letter_accuracy
    from pixelrefer.data import generate_shapesworld, load_annotations
    from pixelrefer.data.sample import SampleInputs
    from pixelrefer.evaluation.choice import predicted_letter, score_item
    from pixelrefer.evaluation.models import PixelReferModel

    paths = generate_shapesworld(tmp_path, seed=321, num_images=0, num_videos=6, splits=(1.0, 0.0, 0.0),
                                 option_first=True, answer_words=True, speed_steps=True)
    questions = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "multiple_choice"]
    model, processor = pixelrefer.load(name)
    records = cache_media(model, processor, questions, progress=False)
    open_id = processor.tokenizer.convert_tokens_to_ids("(")
    forced = [choice_letter_accuracy(model, [r], open_id)["all"]["right"] for r in records]
    queries = []
    for sample in questions:
        text, image, video, masks = sample.load_media()
        queries.append(SampleInputs(text[:1], image, video, masks))  # the question turn alone
    predictions = PixelReferModel(model, processor, max_new_tokens=24)(queries)
    generated = [int(score_item(s.id, p, s.meta["Answer"], type=s.meta["type"], options=s.meta["options"]).correct)
                 for s, p in zip(questions, predictions)]
    text = [" ".join(p.split()).rsplit(" (", 1)[0] == s.meta["Answer"].rsplit(" (", 1)[0] and predicted_letter(p)
            for s, p in zip(questions, predictions)]
    assert not any(p.lstrip().startswith("(") for p in predictions), predictions
    same = [i for i, t in enumerate(text) if t]
    assert len(questions) >= 20 and len(same) >= 15, (len(questions), len(same))
    assert [forced[i] for i in same] == [generated[i] for i in same]


@pytest.mark.parametrize("option_first", [False, True])
def test_answer_letters_weighed_in_the_loss(tmp_path, option_first):
    """`letter_weight`: weight 1 everywhere is the model's own loss; weight w is the mean with each answer
    letter counted w times, the letter found in either answer order and nowhere in the prompt."""
    from pixelrefer.cached_media import answer_letter_weights, cached_embeds
    from pixelrefer.data import generate_shapesworld, load_annotations
    from pixelrefer.option_order import OptionTokens

    paths = generate_shapesworld(tmp_path, seed=5, num_images=1, num_videos=1, splits=(1.0, 0.0, 0.0),
                                 option_first=option_first)
    samples = [s for s in load_annotations(paths["train"], tmp_path) if s.task in ("multiple_choice", "category")]
    model, processor = build("object_only")
    records = cache_media(model, processor, samples, progress=False)
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    batch = collate_cached(records, model.config.text_config.pad_token_id)
    labels = batch["labels"]
    weights = answer_letter_weights(labels, tokens, 5.0)
    letters = {run[1] for run in tokens.letters}
    heavy = weights == 5.0
    # exactly one weighted token per multiple-choice answer: its letter, supervised, after a supervised "("
    assert [int(heavy[b].sum()) for b in range(len(records))] == [int(s.task == "multiple_choice") for s in samples]
    assert all(int(labels[b, j]) in letters and int(labels[b, j - 1]) == tokens.letters[0][0]
               for b, j in heavy.nonzero().tolist())
    assert not (weights[~heavy] != 1.0).any()
    with torch.no_grad():
        plain = cached_loss(model, batch)
        torch.testing.assert_close(cached_loss(model, batch, torch.ones_like(weights)), plain)
        logits = model(inputs_embeds=cached_embeds(model, batch), attention_mask=batch["attention_mask"]).logits
    each = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                             reduction="none")
    supervised = labels[:, 1:] != -100
    w = torch.where(heavy[:, 1:], 5.0, 1.0) * supervised
    expected = (each * w).sum() / w.sum()
    torch.testing.assert_close(cached_loss(model, batch, weights).detach(), expected)
    assert not torch.isclose(expected, plain)
    with pytest.raises(ValueError, match="letter_tokens"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=2, letter_weight=3.0)
