"""Text-only lettered questions of the LLM stage: well formed, answerable from their text, in-vocabulary."""

import re

import numpy as np
import pytest

from pixelrefer.data import shapesworld_vocabulary
from pixelrefer.data.formats import BENCH_Q_INSTRUCTION
from pixelrefer.data.text_tasks import (KINDS, MAX_CONTEXT_OBJECTS, TextChoiceRecord, context_facts, text_choice,
                                        text_choice_records)
from pixelrefer.tokenizer import build_tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_a_well_formed_answerable_question(kind):
    rng = np.random.default_rng(7)
    for _ in range(50):
        user, assistant = text_choice(rng, kind)
        assert user["role"] == "user" and assistant["role"] == "assistant"
        context, question, *options, instruction = user["content"].split("\n")
        assert instruction == BENCH_Q_INSTRUCTION and "<region>" not in user["content"]
        assert [o[:3] for o in options] == ["(A)", "(B)", "(C)", "(D)"][: len(options)] and len(options) >= 3
        assert assistant["content"] in options and len(set(options)) == len(options)
        answer = assistant["content"][4:]
        asked = re.findall(r"<object\d>", question)
        assert asked and all(name in context for name in asked), "the question asks about a described object"
        if kind in ("colour", "shape", "sequential"):
            assert f"{asked[0]} " in context and answer.removeprefix("it ") in context, "the answer is stated"


def test_every_word_is_in_the_shapesworld_vocabulary():
    tokenizer = build_tokenizer(shapesworld_vocabulary())
    rng = np.random.default_rng(0)
    for _ in range(500):
        for turn in text_choice(rng):
            assert tokenizer.unk_token_id not in tokenizer(turn["content"])["input_ids"], turn["content"]


def test_seeded_and_every_kind_drawn():
    assert text_choice(np.random.default_rng(3)) == text_choice(np.random.default_rng(3))
    rng = np.random.default_rng(1)
    questions = {text_choice(rng)[0]["content"].split("\n")[1].split(" ")[0] for _ in range(200)}
    assert len(questions) >= 4  # What / Where / Which / If
    with pytest.raises(ValueError, match="unknown text question kind"):
        text_choice(rng, "colours")


def test_max_objects_bounds_the_facts():
    rng = np.random.default_rng(5)
    for kind in KINDS:
        for _ in range(20):
            context = text_choice(rng, kind, max_objects=1)[0]["content"].split("\n")[0]
            named = set(re.findall(r"<object\d>", context))
            assert len(named) == (2 if kind in ("relationship", "reasoning") else 1), (kind, context)
    assert max(len(set(re.findall(r"<object\d>", text_choice(rng, "colour")[0]["content"].split("\n")[0])))
               for _ in range(50)) == 3


def test_option_first_answers_name_the_option_then_its_letter_and_change_nothing_else():
    for kind in KINDS:
        for seed in range(20):
            plain = text_choice(np.random.default_rng(seed), kind)
            first = text_choice(np.random.default_rng(seed), kind, option_first=True)
            letter, text = plain[1]["content"].split(" ", 1)
            assert first[1]["content"] == f"{text} {letter}" and first[0] == plain[0], (kind, seed)
    records = text_choice_records(3, seed=5, option_first=True)
    assert [r.option_first for r in records] == [True] * 3 and records[0].task == "text_choice"
    conversation, image, video, masks = records[2].load_media()
    assert conversation == text_choice(np.random.default_rng([5, 2]), option_first=True)
    assert (image, video, masks) == (None, None, [])
    assert TextChoiceRecord(5, 2).load_media()[0] == text_choice(np.random.default_rng([5, 2]))


def test_context_objects_describe_other_objects_only_and_keep_the_question():
    """`context_objects`: facts about up to that many objects nobody asks about are shuffled in; the question,
    options, answer and the asked objects' facts are the ones drawn without them; 0 draws nothing more."""
    tokenizer = build_tokenizer(shapesworld_vocabulary())
    counts = []
    for kind in KINDS:
        for seed in range(30):
            plain = text_choice(np.random.default_rng(seed), kind)
            assert text_choice(np.random.default_rng(seed), kind, context_objects=0) == plain
            long = text_choice(np.random.default_rng(seed), kind, option_first=True, context_objects=6)
            context, rest = long[0]["content"].split("\n", 1)
            plain_context, plain_rest = plain[0]["content"].split("\n", 1)
            assert rest == plain_rest and long[1]["content"].endswith(plain[1]["content"].split(" ", 1)[0])
            facts, plain_facts = (re.findall(r"\S[^.]* \.", c) for c in (context, plain_context))
            named = {int(k) for k in re.findall(r"<object(\d+)>", plain_context)}
            others = [f for f in facts if f not in plain_facts]
            assert sorted(f for f in facts if f in plain_facts) == sorted(plain_facts), (kind, seed)
            new = {int(k) for f in others for k in re.findall(r"<object(\d+)>", f)}
            assert all(len(re.findall(r"<object\d+>", f)) == 1 for f in others) and min(new, default=99) > max(named)
            assert len(others) == 3 * len(new), "three facts an other object"
            counts.append(len(new))
            assert tokenizer.unk_token_id not in tokenizer(long[0]["content"])["input_ids"], long[0]["content"]
    assert min(counts) == 0 and max(counts) == 6, "0 to context_objects other objects"
    facts = context_facts(np.random.default_rng(0), first=3, count=2)
    assert len(facts) == 6 and {f.split(" ")[0] for f in facts} == {"<object3>", "<object4>"}
    assert any(f.endswith("when it is first seen .") for f in facts)


def test_context_objects_records_and_bad_values():
    records = text_choice_records(4, seed=2, option_first=True, context_objects=5)
    assert all(r.context_objects == 5 for r in records)
    assert records[1].load_media()[0] == text_choice(np.random.default_rng([2, 1]), option_first=True,
                                                     context_objects=5)
    for bad in (-1, MAX_CONTEXT_OBJECTS + 1, 2.0, True):
        with pytest.raises(ValueError, match="context_objects must be an integer from 0 to"):
            text_choice_records(1, context_objects=bad)
        with pytest.raises(ValueError, match="context_objects must be an integer from 0 to"):
            text_choice(np.random.default_rng(0), context_objects=bad)
    with pytest.raises(ValueError, match=r"<object14> to <object16>.*up to <object15>"):
        context_facts(np.random.default_rng(0), first=14, count=3)
