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


def test_text_choice_letter_only_loss_supervises_the_letter_alone():
    from pixelrefer.data import shapesworld_vocabulary
    from pixelrefer.tokenizer import build_tokenizer

    text_choice = _script("text_choice")
    tokenizer = build_tokenizer(shapesworld_vocabulary())
    pairs = [text_choice.question(np.random.default_rng(i)) for i in range(3)]
    batch = text_choice.encode(tokenizer, pairs, letter_only=True)
    for (_, answer), ids, labels in zip(pairs, batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100]
        assert tokenizer.convert_ids_to_tokens(kept.tolist()) == [answer[1]]


def test_text_choice_stage_trains_the_real_llm_stage_and_saves_what_a_run_loads(tmp_path):
    from pixelrefer.training import TrainConfig, Trainer

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    saved = tmp_path / "run"
    done = subprocess.run([sys.executable, "benchmarks/text_choice.py", "--stage", "--steps", "4", "--every", "2",
                           "--max-objects", "3", "--batch-size", "4", "--save", str(saved)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [point["step"] for point in report["curve"]] == [2, 4]
    for point in report["curve"]:
        assert 0 <= point["letter_accuracy_1_objects"] <= 1 and 0 <= point["letter_accuracy_3_objects"] <= 1
    assert json.loads((saved / "curve.json").read_text()) == report["curve"]
    assert len(json.loads((saved / "llm_pretrain" / "loss_history.json").read_text())) == 4
    config = TrainConfig(model="tiny", output_dir=str(saved), steps=1, batch_size=2, llm_pretrain_steps=4,
                         shapesworld=dict(seed=0, num_images=4, num_videos=0))
    from pixelrefer.training import training_samples

    trainer = Trainer(config, training_samples(config))
    assert trainer.pretrain_llm() == [], "a run with that output_dir starts from the saved LLM"


def test_text_choice_forced_letter_accuracy_reads_the_letter_position():
    import torch

    import pixelrefer
    from pixelrefer.data.text_tasks import text_choice

    text_choice_script = _script("text_choice")
    model, processor = pixelrefer.load("shapes-tiny")
    conversations = [text_choice(np.random.default_rng(i), "colour", max_objects=1) for i in range(6)]
    letters = [turns[1]["content"][1] for turns in conversations]
    letter_id = {c: processor.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"}

    class Always:
        """Puts all weight on one letter at every position: accuracy is the share of answers with that letter."""

        def __init__(self, letter):
            self.letter = letter
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def parameters(self):
            return iter([self.weight])

        def eval(self):
            pass

        def train(self):
            pass

        def __call__(self, input_ids, **_):
            logits = torch.zeros(*input_ids.shape, len(processor.tokenizer))
            logits[..., letter_id[self.letter]] = 1.0
            return type("Out", (), {"logits": logits})

    for letter in "ABCD":
        expected = letters.count(letter) / len(letters)
        assert text_choice_script.forced_letter_accuracy(Always(letter), processor, conversations) == expected
    assert 0 <= text_choice_script.forced_letter_accuracy(model, processor, conversations, batch_size=4) <= 1


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


def test_shapesworld_accuracy_counts_motion_and_event_words():
    same_words = _script("shapesworld_accuracy").same_words
    references = ["the red circle appears and then moves left", "the blue star stays still", "the green ring moves up"]
    predictions = ["the red circle moves left", "the blue star stays still", "the green ring disappears"]
    assert same_words(predictions, references, {"appears", "disappears"}) == 1 / 3, "a missing or extra event"
    assert _script("shapesworld_accuracy").named_words(predictions, references, {"left", "still", "up"}) == 2 / 3
    with pytest.raises(ValueError):
        same_words(predictions[:1], references, {"appears"})


def test_shapesworld_accuracy_swaps_the_motion_phrase_of_a_caption():
    variants = _script("shapesworld_accuracy").motion_variants("the red circle appears and then moves left")
    assert variants[0] == "the red circle appears and then moves left" and len(set(variants)) == 5
    assert "the red circle appears and then stays still" in variants
    assert _script("shapesworld_accuracy").motion_variants("a small red circle") == []


def test_shapesworld_accuracy_asks_every_turn_with_the_earlier_answers(tmp_path):
    from pixelrefer.data import generate_shapesworld, load_annotations

    files = generate_shapesworld(tmp_path, seed=3, num_images=1, num_videos=2, splits=(1.0, 0.0, 0.0))
    accuracy = _script("shapesworld_accuracy")
    record = next(s for s in load_annotations(files["train"], tmp_path) if s.task == "video_caption")
    text = record.load_media()[0]
    asked = accuracy.every_question(record)
    assert len(asked) == sum(turn["role"] == "assistant" for turn in text) >= 2
    for n, (query, reference) in enumerate(asked):
        assert reference == [t for t in text if t["role"] == "assistant"][n]["content"]
        assert query.text[-1]["role"] == "user" and len(query.masks) == n + 1, "one object per caption question"
        assert [t["content"] for t in query.text if t["role"] == "assistant"] == [r for _, r in asked[:n]]
    assert accuracy.first_question(record)[1] == asked[0][1]
    with pytest.raises(IndexError, match=record.id):
        accuracy.nth_question(record, len(asked))


def test_shapesworld_accuracy_selects_tasks_and_limits_records():
    accuracy = _script("shapesworld_accuracy")
    test = [type("S", (), {"task": task})() for task in ["category", "multiple_choice", "category", "short_caption",
                                                            "multiple_choice", "category"]]
    assert [s.task for s in accuracy.select(test, None, None)] == [s.task for s in test]
    chosen = accuracy.select(test, "category, multiple_choice", 2)
    assert [s.task for s in chosen] == ["category", "multiple_choice", "category", "multiple_choice"]
    assert chosen[0] is test[0] and chosen[2] is test[2], "the first records of each task, in file order"
    with pytest.raises(SystemExit, match="no test record has task 'captions'"):
        accuracy.select(test, "captions", None)


def test_shapesworld_accuracy_separates_option_text_from_letter():
    accuracy = _script("shapesworld_accuracy")
    assert accuracy.option_text("(B) it moves  left") == "it moves left" and accuracy.option_text("green") == "green"
    predictions = ["(B) green", "(A) green", "(C) red", "(D) blue"]
    references = ["(B) green", "(D) green", "(C) blue", "(A) white"]
    assert accuracy.split_choice(predictions, references) == {"option_text_right": 0.5,
                                                              "text_right_letter_wrong": 0.25}
    with pytest.raises(ValueError):
        accuracy.split_choice(predictions[:1], references)
    # option-first answers ("green (B)", ShapesWorld's option_first): the letter is read wherever it is
    assert accuracy.option_text("it moves left (B)") == "it moves left"
    assert accuracy.option_first("(B) it moves left") == "it moves left (B)"
    later = ["green (B)", "green (A)", "red (C)", "(D) blue"]
    assert accuracy.split_choice(later, references) == accuracy.split_choice(predictions, references)
    assert accuracy.split_choice(["(B) green"], ["green (B)"]) == {"option_text_right": 1.0,
                                                                  "text_right_letter_wrong": 0.0}


def test_shapesworld_accuracy_scores_the_speeds_a_worked_reasoning_answer_states():
    """Answers that state speeds first (ShapesWorld's speed_steps): the option text is what follows the steps,
    each stated speed is scored against its object's, and answers without steps count as such."""
    accuracy = _script("shapesworld_accuracy")
    worked = "<object0> moves at speed 3 and <object1> does not move: <object0> (B)"
    assert accuracy.option_text(worked) == "<object0>"
    assert accuracy.same_option(worked, "(B) <object0>") and not accuracy.same_option(worked, "(C) <object1>")
    # one-word answers (ShapesWorld's answer_words) name their option by the word only it holds
    assert accuracy.same_option("above (C)", "(C) above <object1>")
    assert accuracy.same_option("left (A)", "(A) further to the left")
    assert not accuracy.same_option("below (C)", "(C) above <object1>")
    assert accuracy.split_choice(["above (D)", "right (B)"], ["(C) above <object1>", "(A) further to the left"]) == {
        "option_text_right": 0.5, "text_right_letter_wrong": 0.5}
    objects = [{"speed": 3}, {"speed": 2}]
    assert accuracy.speed_step_scores(worked, objects) == [(3, 3), (0, 2)]
    assert accuracy.speed_step_scores("<object1> (C)", objects) == []
    later = accuracy.speed_step_scores("<object0> does not move and <object1> moves at speed 2: <object1> (C)",
                                       objects)
    summary = accuracy.speed_step_summary([accuracy.speed_step_scores(worked, objects), [], later])
    assert summary == {"answers_with_steps": pytest.approx(2 / 3), "speeds_right": 0.5, "moving_right": 0.5,
                       "answers_all_right": 0.0}


def test_shapesworld_accuracy_reads_a_questions_options_and_groups_flags_by_type():
    from pixelrefer.data.formats import bench_q_prompt
    from pixelrefer.data.sample import SampleInputs

    accuracy = _script("shapesworld_accuracy")
    options = ["(A) it moves left", "(B) it stays still", "(C) red"]
    query = SampleInputs([{"role": "user", "content": "What is <region>?"}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": bench_q_prompt("Which one (A) is it?", options)}], None, None, [])
    assert accuracy.question_options(query) == options
    loss = {"(A) red": 1.0, "(B) blue": 2.0, "red (A)": 3.0, "blue (B)": 0.5}

    class Scorer:
        def answer_losses(self, asked, answers):
            assert asked is query
            return [loss[a] for a in answers]

    query = SampleInputs([{"role": "user", "content": bench_q_prompt("Which?", ["(A) red", "(B) blue"])}], None, None, [])
    assert accuracy.ranked_option(Scorer(), query) == "(A) red"
    assert accuracy.ranked_option(Scorer(), query, first=True) == "(B) blue"
    no_options = SampleInputs([{"role": "user", "content": "Which?"}], None, None, [])
    assert accuracy.ranked_option(Scorer(), no_options) is None
    flags = [("Basic", True), ("Future", False), ("Basic", False), ("Basic", True)]
    assert accuracy.per_type(flags) == {"Basic": pytest.approx(2 / 3), "Future": 0.0}


def test_shapesworld_accuracy_script_scores_short_answers_per_question_type(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/shapesworld_accuracy.py", "--model", "shapes-tiny-lite",
                           "--data", str(tmp_path), "--num-images", "2", "--num-videos", "40", "--short-answers",
                           "--tasks", "video_short_answer", "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["exact_match"]["video_short_answer"]
    records = [r for r in json.loads((tmp_path / "test.json").read_text()) if r["task"] == "video_short_answer"]
    assert report["records"] == len(records) >= 3
    kinds = {r["id"].rsplit("-", 1)[1].capitalize() for r in records}
    assert set(report["per_type"]) == kinds and kinds <= {"Relationship", "Reasoning", "Future"}
    assert all(0 <= a <= 1 for a in report["per_type"].values())


def test_motion_readout_script_reports_the_readout_of_an_embedded_model(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/motion_readout.py", "--model", "shapes-tiny-lite", "--data",
                           str(tmp_path), "--num-images", "2", "--num-videos", "20", "--train-records", "8",
                           "--threads", "1", "--stage", "pre_mlp"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["stage"] == "pre_mlp"
    assert report["model"] == "shapes-tiny-lite" and report["tracks"] >= 2 and report["train_tracks"] >= 8
    assert report["centres"] == 1.0 and 0 <= report["tokens"] <= 1 and 0 <= report["location_share"] <= 1


def test_llm_readout_script_reports_per_layer_probes_of_an_embedded_model(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/llm_readout.py", "--model", "shapes-tiny", "--data",
                           str(tmp_path), "--num-images", "2", "--num-videos", "20", "--train-records", "8",
                           "--threads", "1", "--attributes", "motion", "colour"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    layers = report["layers"]
    assert report["model"] == "shapes-tiny" and report["train_objects"] >= 8 and report["test_objects"] >= 1
    assert layers == list(range(len(layers))) and len(layers) >= 2
    for attribute in ("motion", "colour"):
        assert len(report[attribute]["per_layer"]) == len(layers)
        assert all(0 <= a <= 1 for a in report[attribute]["per_layer"]) and 0 < report[attribute]["majority"] <= 1
    assert 0 <= report["next_word"] <= 1 and "speed" not in report


def test_cached_media_script_times_both_steps_with_equal_losses(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/cached_media.py", "--model", "shapes-tiny", "--data",
                           str(tmp_path), "--num-images", "2", "--num-videos", "20", "--records", "6",
                           "--batch-size", "3", "--repeats", "1", "--threads", "1", "--bf16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["records"] == 6 and report["batch_size"] == 3
    assert all(report["seconds_per_record"][k] > 0
               for k in ("full_step", "cached_step", "cached_step_bf16", "cache_once"))
    assert report["max_loss_difference"] < 1e-4
    # bf16 rounds activations (8-bit mantissa): close to float32's loss, not equal
    assert 0 < report["bf16_max_loss_difference"] < 0.05 and report["bf16_speedup_over_cached"] > 0
