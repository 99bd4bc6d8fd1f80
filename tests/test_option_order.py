"""Options dealt anew on a cached record are the record asked with its options in that order."""

import re

import numpy as np
import pytest
import torch

from pixelrefer.cached_media import (cache_media, cached_loss, collate_cached, media_token_ids,
                                     train_on_cached_media)
from pixelrefer.data import generate_shapesworld, load_annotations
from pixelrefer.data.tasks import LETTERS
from pixelrefer.data.text_tasks import text_choice_records
from pixelrefer.option_order import OptionTokens, lettered_questions, reorder, shuffle_options
from tests.conftest import FRAMEWORKS, build

OPTION = re.compile(r"^\(([A-E])\) (.*)$")


def lettered_samples(root, option_first):
    paths = generate_shapesworld(root, seed=5, num_images=2, num_videos=1, image_choice=True,
                                 option_first=option_first)
    records = load_annotations(paths["train"], root)
    chosen = [r for r in records if r.task == "multiple_choice"][:2]
    chosen += [r for r in records if r.task == "image_choice"][:1]
    plain = [r for r in records if r.task == "category"][:1]
    texts = text_choice_records(2, seed=3, option_first=option_first)
    assert len(chosen) == 3 and plain
    return chosen + list(texts), plain


def reordered_conversation(conversation, rng):
    """The text-level reference: each user turn's option lines dealt in `rng`'s order, the next answer's
    letter moved with its text (the same draws `shuffle_options` makes)."""
    turns = [dict(t) for t in conversation]
    for number, turn in enumerate(turns):
        lines = turn["content"].split("\n")
        options = [i for i, line in enumerate(lines) if OPTION.match(line)]
        if turn["role"] != "user" or len(options) < 2:
            continue
        texts = [OPTION.match(lines[i]).group(2) for i in options]
        order = rng.permutation(len(texts)).tolist()
        for j, i in enumerate(options):
            lines[i] = f"({LETTERS[j]}) {texts[order[j]]}"
        turn["content"] = "\n".join(lines)
        answer = turns[number + 1]
        old = re.search(r"\(([A-E])\)", answer["content"]).group(1)
        new = LETTERS[order.index(LETTERS.index(old))]
        answer["content"] = answer["content"].replace(f"({old})", f"({new})", 1)
    return turns


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("option_first", [False, True])
def test_shuffled_options_are_the_question_asked_in_that_order(framework, option_first, tmp_path):
    model, processor = build(framework)
    samples, plain = lettered_samples(tmp_path, option_first)
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    records = cache_media(model, processor, samples + plain, progress=False)
    pad = model.config.text_config.pad_token_id
    moved = 0
    with torch.no_grad():
        for sample, record in zip(samples, records):
            conversation, image, video, masks = sample.load_media()
            asked = sum(1 for t in conversation if t["role"] == "user" and "\n(A) " in t["content"])
            found = lettered_questions(record.input_ids.tolist(), record.labels.tolist(), tokens,
                                       record.attention_mask.tolist())
            assert len(found) == asked >= 1, sample.where
            for seed in range(3):
                shuffled = shuffle_options(record, tokens, np.random.default_rng(seed))
                expected = reordered_conversation(conversation, np.random.default_rng(seed))
                batch = processor(text=[expected], images=[image], videos=[video], masks=[masks])
                assert torch.equal(shuffled.input_ids, batch["input_ids"][0]), (sample.where, seed)
                assert torch.equal(shuffled.labels, batch["labels"][0]), (sample.where, seed)
                assert torch.equal(model(**batch).loss, cached_loss(model, collate_cached([shuffled], pad)))
                moved += not torch.equal(shuffled.input_ids, record.input_ids)
        rng = np.random.default_rng(0)
        state = rng.bit_generator.state
        assert shuffle_options(records[-1], tokens, rng) is records[-1], "a record without options stays"
        assert rng.bit_generator.state == state, "and draws nothing"
    assert moved >= len(samples), "most draws change the order"


def option_texts(ids, question, tokens):
    width = len(tokens.letters[0])
    bounds = [*question.markers, question.end]
    return [tuple(ids[bounds[k] + width:bounds[k + 1]]) for k in range(len(question.markers))]


def test_the_answer_letter_follows_its_text_to_every_letter(tmp_path):
    model, processor = build("object_only")
    samples, _ = lettered_samples(tmp_path, option_first=True)
    tokens = OptionTokens.of(processor.tokenizer)
    record = cache_media(model, processor, samples[:1], progress=False)[0]
    question, = lettered_questions(record.input_ids.tolist(), record.labels.tolist(), tokens)
    before = record.input_ids.tolist()
    right = option_texts(before, question, tokens)[question.answer_index]
    letters = set()
    for order in (np.roll(np.arange(len(question.markers)), k).tolist() for k in range(len(question.markers))):
        ids = reorder(before, question, order, tokens)
        written = tuple(ids[question.answer:question.answer + 3])
        letter = tokens.letters.index(written)
        assert option_texts(ids, question, tokens)[letter] == right, order
        assert sorted(option_texts(ids, question, tokens)) == sorted(option_texts(before, question, tokens))
        changed = [i for i, (a, b) in enumerate(zip(before, ids)) if a != b]
        assert all(question.markers[0] <= i < question.end or i == question.answer + 1 for i in changed)
        letters.add(letter)
    assert letters == set(range(len(question.markers))), "the answer goes under every letter"
    with pytest.raises(ValueError, match="not a permutation of the 4 options"):
        reorder(before, question, [0, 0, 1, 2], tokens)


def test_training_deals_options_anew_and_names_a_stage_without_any(tmp_path):
    model, processor = build("object_only")
    samples, plain = lettered_samples(tmp_path, option_first=True)
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    records = cache_media(model, processor, samples + plain, progress=False)
    losses = train_on_cached_media(model, records, steps=2, lr=1e-3, batch_size=3, option_tokens=tokens)
    assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="shuffle_options: none of the 1 records has a lettered question"):
        train_on_cached_media(model, records[-1:], steps=1, lr=1e-3, batch_size=1, option_tokens=tokens)


def test_a_tokenizer_writing_letters_unevenly_is_refused():
    class Uneven:
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "(A)" else [1, 2, 3]

    with pytest.raises(ValueError, match="token runs of different lengths"):
        OptionTokens.of(Uneven())


def drilled_conversation(conversation, k):
    """The text-level reference of `drill_letter`: the answer to the (one) lettered question is option k's text,
    then its letter."""
    turns = [dict(t) for t in conversation]
    number = next(i for i, t in enumerate(turns) if t["role"] == "user" and "\n(A) " in t["content"])
    texts = [OPTION.match(line).group(2) for line in turns[number]["content"].split("\n") if OPTION.match(line)]
    turns[number + 1]["content"] = f"{texts[k]} ({LETTERS[k]})"
    return turns, texts[k]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_drilled_letter_is_the_question_answered_with_that_option(framework, tmp_path):
    from pixelrefer.option_order import answer_text_span, drill_letter

    model, processor = build(framework)
    samples, _ = lettered_samples(tmp_path, option_first=True)
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    videos = [s for s in samples[:2] if s.task == "multiple_choice"]
    records = cache_media(model, processor, videos, progress=False)
    pad = model.config.text_config.pad_token_id
    drawn = set()
    with torch.no_grad():
        for sample, record in zip(videos, records):
            question, = lettered_questions(record.input_ids.tolist(), record.labels.tolist(), tokens)
            assert answer_text_span(record.input_ids.tolist(), record.labels.tolist(), question, tokens)
            conversation, image, video, masks = sample.load_media()
            for seed in range(4):
                k = int(np.random.default_rng(seed).integers(len(question.markers)))
                drilled = drill_letter(record, tokens, np.random.default_rng(seed), question)
                expected, text = drilled_conversation(conversation, k)
                batch = processor(text=[expected], images=[image], videos=[video], masks=[masks])
                assert torch.equal(drilled.input_ids, batch["input_ids"][0]), (sample.where, seed)
                labels = batch["labels"][0].clone()
                start = int((labels != -100).nonzero()[0])
                written = len(processor.tokenizer.encode(text, add_special_tokens=False))
                labels[start:start + written] = -100  # the text written is not supervised, its letter is
                assert torch.equal(drilled.labels, labels), (sample.where, seed)
                assert drilled.labels[start + written + 1] == tokens.letters[k][1]
                batch["labels"] = labels[None]
                assert torch.equal(model(**batch).loss, cached_loss(model, collate_cached([drilled], pad)))
                drawn.add(k)
    assert len(drawn) >= 2


def test_letter_first_answers_are_not_drilled_and_training_drills(tmp_path):
    from pixelrefer.option_order import drill_letter

    model, processor = build("object_only")
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    first, plain = lettered_samples(tmp_path / "first", option_first=False)
    record = cache_media(model, processor, first[:1], progress=False)[0]
    question, = lettered_questions(record.input_ids.tolist(), record.labels.tolist(), tokens)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert drill_letter(record, tokens, rng, question) is record and rng.bit_generator.state == state
    samples, plain = lettered_samples(tmp_path / "second", option_first=True)
    records = cache_media(model, processor, samples + plain, progress=False)
    for shuffle in (None, tokens):
        losses = train_on_cached_media(model, records, steps=2, lr=1e-3, batch_size=4, option_tokens=shuffle,
                                       letter_drill=1.0, letter_tokens=tokens)
        assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="letter_drill: none of the 1 records has one lettered question"):
        train_on_cached_media(model, records[-1:], steps=1, lr=1e-3, batch_size=1, letter_drill=0.5,
                              letter_tokens=tokens)
    with pytest.raises(ValueError, match="need the answer letters"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=1, letter_drill=0.5)
