"""Benchmark scripts that have logic of their own: their inputs are well formed and they run end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_choice_questions_point_at_the_option_named_in_the_prompt():
    from pixelrefer.data import shapesworld_vocabulary
    from pixelrefer.tokenizer import build_tokenizer

    text_choice = _script("text_choice")
    tokenizer = build_tokenizer(shapesworld_vocabulary())
    rng = np.random.default_rng(0)
    letters = []
    for _ in range(200):
        prompt, answer = text_choice.question(rng)
        named = prompt.split(" is ", 1)[1].split(" ")[0]
        options = [line for line in prompt.split("\n") if line[:1] == "("]
        assert len(options) == 4 and answer in options and answer.endswith(f") {named}")
        assert [o[4:] for o in options].count(named) == 1
        letters.append(answer[1])
        assert tokenizer.unk_token not in tokenizer.tokenize(prompt + answer)
    assert set(letters) == set("ABCD"), "the right letter varies"
    batch = text_choice.encode(tokenizer, [text_choice.question(rng) for _ in range(3)])
    supervised = batch["labels"] != -100
    assert (supervised.sum(1) == 5).all(), '"(", letter, ")", colour, <|im_end|>'


@pytest.mark.parametrize("questions", ["colour", "llm-stage"])
def test_text_choice_runs_and_reports_a_learning_curve(questions):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "benchmarks/text_choice.py", "--steps", "4", "--every", "2",
                           "--questions-from", questions], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [point["step"] for point in report["curve"]] == [2, 4] and report["layers"] == 4
    assert report["questions_from"] == questions
    assert all(0 <= point["letter_accuracy"] <= 1 for point in report["curve"])


def test_text_choice_measures_a_model_per_question_kind():
    from pixelrefer.data.text_tasks import KINDS

    report = _script("text_choice").model_letter_accuracy("shapes-tiny", questions=3, seed=0, max_objects=1)
    assert report["max_objects"] == 1
    assert set(report["per_kind"]) == set(KINDS) and all(v in (0, 1 / 3, 2 / 3, 1) for v in report["per_kind"].values())
    assert abs(sum(report["predicted_letters"].values()) - 1) < 1e-9
    assert report["accuracy"] == sum(report["per_kind"].values()) / len(KINDS)


def test_shapesworld_accuracy_counts_named_colour_and_category_words():
    named_words = _script("shapesworld_accuracy").named_words
    references = ["a small red circle", "a big blue house", "a green star"]
    predictions = ["a small red circle", "a big red house", "a green and red star"]
    assert named_words(predictions, references, {"red", "blue", "green"}) == 1 / 3, "a second colour is wrong"
    assert named_words(predictions, references, {"circle", "house", "star"}) == 1.0
    with pytest.raises(ValueError):
        named_words(predictions[:2], references, {"red"})
