"""Where an option-first model's letter comes from: every option's text forced as the answer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pixelrefer.analysis.letters import ForcedLetter, forced_letters, forced_variants, letter_sources
from pixelrefer.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    from pixelrefer.data import generate_shapesworld, load_annotations

    folder = tmp_path_factory.mktemp("letters")
    paths = generate_shapesworld(folder, seed=3, num_images=1, num_videos=6, splits=(1.0, 0.0, 0.0))
    samples = [s for s in load_annotations(paths["train"], folder) if s.task == "multiple_choice"]
    assert len(samples) >= 8
    return samples[:8]


def test_every_option_is_forced_once_with_its_letter_after_it(questions):
    variants, info = forced_variants(questions[:2])
    assert len(variants) == len(info) == sum(len(q.meta["options"]) for q in questions[:2])
    for variant, what in zip(variants, info):
        question = next(q for q in questions if q.id == what["id"])
        option = question.meta["options"][what["forced"]]
        assert variant.conversation[0] == question.conversation[0], "the prompt is the record's own"
        letter, text = option[1], option[4:]
        assert variant.conversation[1] == {"role": "assistant", "content": f"{text} ({letter})"}
        assert question.meta["options"][what["truth"]] == question.meta["Answer"]
        assert what["letters"][what["forced"]] == letter and what["texts"][what["forced"]] == text


def test_options_are_forced_as_the_model_writes_them(questions):
    """`written` turns each option's text into what the model writes for it (ShapesWorld's answer_words: the one
    word only that option holds), the letter after it; the texts reported stay the options' own."""
    from pixelrefer.data.tasks import SHORT_ANSWER_WORDS

    variants, info = forced_variants(questions, lambda text: SHORT_ANSWER_WORDS.get(text, text))
    worded = 0
    for variant, what in zip(variants, info):
        text, letter = what["texts"][what["forced"]], what["letters"][what["forced"]]
        said = SHORT_ANSWER_WORDS.get(text, text)
        assert variant.conversation[1] == {"role": "assistant", "content": f"{said} ({letter})"}
        worded += said != text
    assert worded >= 3, "some forced options are written as their one word"


def test_a_record_that_is_not_one_lettered_question_is_named(questions):
    import dataclasses

    bad = dataclasses.replace(questions[0], meta=dict(questions[0].meta, Answer="(E) nowhere"))
    with pytest.raises(InputError, match=rf"{bad.id}\): not a multiple-choice record"):
        forced_variants([bad])
    options = ["A) red", *questions[0].meta["options"][1:]]
    odd = dataclasses.replace(questions[0], meta=dict(questions[0].meta, options=options, Answer="A) red"))
    with pytest.raises(InputError, match=r"option 'A\) red' is not written"):
        forced_variants([odd])


def test_sources_and_confusions_are_counted_per_type():
    def row(type_, forced, truth, predicted):
        return ForcedLetter("q", type_, forced, truth, ("left", "right", "up"), ("A", "B", "C"), predicted)

    rows = [row("Future", 0, 0, "A"), row("Future", 0, 0, "B"), row("Future", 1, 0, "B"), row("Future", 2, 0, "A"),
            row("Future", 2, 0, "B"), row("Basic", 1, 1, "("), row("Basic", 0, 1, "B")]
    report = letter_sources(rows)
    assert report["Future"]["right_text"] == {"questions": 2, "letter": 0.5}
    assert report["Future"]["wrong_text"] == {"forced": 3, "text": 1 / 3, "media": 1 / 3, "other": 1 / 3}
    assert report["Basic"]["right_text"] == {"questions": 1, "letter": 0.0}
    assert report["Basic"]["wrong_text"]["media"] == 1.0
    assert report["all"]["right_text"] == {"questions": 3, "letter": 1 / 3}
    assert report["confusions"] == {"left -> right": 1, "right -> (not a letter)": 1}


def test_the_right_text_rows_are_the_teacher_forced_letters_of_option_first_answers(questions):
    """The right-text rows read the same position as `cached_media.choice_letter_accuracy` on the questions
    answered option first."""
    import dataclasses

    import pixelrefer
    from pixelrefer.cached_media import cache_media, choice_letter_accuracy
    from pixelrefer.data.tasks import option_first_answer

    model, processor = pixelrefer.load("shapes-tiny-lite")
    rows = forced_letters(model, processor, questions, batch_size=5)
    assert len(rows) == sum(len(q.meta["options"]) for q in questions)
    assert all(r.predicted in r.letters for r in rows), "a trained model writes a letter after \"(\""
    right = [r for r in rows if r.forced == r.truth]
    assert [r.id for r in right] == [q.id for q in questions]
    answered = [dataclasses.replace(q, conversation=[q.conversation[0], {
        "role": "assistant", "content": option_first_answer(q.meta["Answer"])}]) for q in questions]
    records = cache_media(model, processor, answered, progress=False)
    open_id = processor.tokenizer.convert_tokens_to_ids("(")
    assert choice_letter_accuracy(model, records, open_id)["all"]["right"] == sum(r.source == "text" for r in right)


def test_the_script_reports_each_type(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/letter_lookup.py", "--model", "shapes-tiny-lite", "--data",
                           str(tmp_path), "--num-images", "2", "--num-videos", "20", "--limit", "6", "--threads", "1",
                           "--attention", "--answer-words"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["questions"] == 6 and report["split"] == "test"
    assert report["all"]["right_text"]["questions"] == 6
    shares = report["all"]["wrong_text"]
    assert shares["forced"] == 18 and abs(shares["text"] + shares["media"] + shares["other"] - 1) < 1e-9
    attention = report["attention"]
    for name in ("lookup", "line", "readout", "answer"):  # shapes-tiny-lite: 4 layers of 4 heads
        assert len(attention[name]) == 4 and all(len(layer) == 4 for layer in attention[name])
        assert all(0 <= share <= 1 for layer in attention[name] for share in layer)
    # shapes-tiny-lite v23 was trained with these heads supervised (`ATTENTION_STAGE`): each stands out in its layer
    # (measured: lookup 0.99, line 0.997, answer 0.991 on these six questions, the next head of the layer 0.66 or less)
    for name, layer, head in (("lookup", -1, 0), ("line", 0, 0), ("answer", 2, 0)):
        shares = attention[name][layer]
        assert shares[head] > 0.8 and shares[head] == max(shares), (name, shares)
