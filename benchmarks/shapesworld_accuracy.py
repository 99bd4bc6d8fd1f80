"""Held-out ShapesWorld accuracy of a model, as JSON: the numbers of the README's embedded-model table.

    python benchmarks/shapesworld_accuracy.py --model shapes-tiny [--data runs/eval-shapesworld] [--threads 1]
        [--device cuda] [--tasks multiple_choice,category] [--limit 100]

- category: exact match of one single-object category question per object of every test `category`
  record, overall and for small (tiny, small) / large regions;
- exact_match: per task, the greedy answer to each record's first question against its reference
  (detailed captions left out: exact match says nothing about a 40-word caption); with `--short-answers`
  the one-word answers to the video questions too, per question type;
- multiple_choice: option-letter accuracy per VideoRefer-Bench-Q type (videos); image_choice: the same on the
  images' lettered colour / shape questions (first question of each record); for both, how often the option
  text after the letter is right, and right under a wrong letter; and, overall and per type, the option
  text right and `option_ranking`: the option whose whole answer ("(B) red") has the lowest loss, what the
  model knows whatever letter it writes first (`--no-ranking` skips it: one forward pass per option;
  `--option-first` ranks them as a model trained on ShapesWorld's `option_first` answers writes them,
  "red (B)"); the letter is read from anywhere in the answer (`evaluation.choice`), so either order scores;
  `speed_steps`, for a model whose Reasoning answers state both objects' speeds first (ShapesWorld's
  `speed_steps`): how many answers do, and how many stated speeds are right (and right about moving or not);
- short_caption_metrics: BLEU / ROUGE-L / CIDEr of the short captions (METEOR off: Java start-up);
  short_caption_words: how often a short caption names its object's colour and its category (the one colour /
  category word of the reference, and no other one);
- video_caption_words: the same for every question of each test video caption ("What does <object1><region>
  do?", earlier answers given): its motion word (left / right / up / down / still), its event words (appears /
  disappears, or none), colour and category: does the model see how an object moves; and `motion_ranking`,
  how often the caption with the right motion phrase has the lowest loss of the five (chance 20 %).

The test split is the one the shipped models were trained beside (`shapesworld_test_split` defaults).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch

import pixelrefer
from pixelrefer.analysis.ablations import category_accuracy
from pixelrefer.data import load_annotations
from pixelrefer.data.sample import SampleInputs
from pixelrefer.data.scenes import COLOURS, EVENTS, MOTIONS
from pixelrefer.data.tasks import MOTION_PHRASES, SHAPE_NAMES, SHORT_ANSWER_WORDS, stated_speeds
from pixelrefer.evaluation.captions import caption_scores
from pixelrefer.evaluation.category import exact_match
from pixelrefer.evaluation.choice import choice_scores, predicted_letter, reference_letter, score_item
from pixelrefer.evaluation.models import PixelReferModel
from pixelrefer.evaluation.runners import add_split_arguments, split_from_arguments


def nth_question(sample, n: int, media=None) -> tuple[SampleInputs, str]:
    """The sample up to its n-th answer (earlier answers are the references, as in training), with the masks its
    `<region>`s use so far; and that answer. `media`: the sample's `load_media()`, when already loaded."""
    text, image, video, masks = media or sample.load_media()
    answers = [i for i, turn in enumerate(text) if turn["role"] == "assistant"]
    if not 0 <= n < len(answers):
        raise IndexError(f"record {sample.id!r} has {len(answers)} answer(s); asked for answer {n}")
    k = answers[n]
    used = sum(turn["content"].count("<region>") for turn in text[:k])
    return SampleInputs(text[:k], image, video, masks[:used]), text[k]["content"]


def first_question(sample) -> tuple[SampleInputs, str]:
    return nth_question(sample, 0)


def every_question(sample) -> list[tuple[SampleInputs, str]]:
    """`nth_question` for each answer of a multi-turn record (a video caption asks about each object in turn)."""
    media = sample.load_media()
    count = sum(turn["role"] == "assistant" for turn in media[0])
    return [nth_question(sample, n, media) for n in range(count)]


def named_words(predictions: list[str], references: list[str], vocabulary) -> float:
    """Fraction of predictions whose words hold the reference's one word of `vocabulary` and no other of it."""
    vocabulary, right = set(vocabulary), 0
    for prediction, reference in zip(predictions, references, strict=True):
        wanted = set(reference.lower().split()) & vocabulary
        right += len(wanted) == 1 and set(prediction.lower().split()) & vocabulary == wanted
    return right / max(len(predictions), 1)


def same_words(predictions: list[str], references: list[str], vocabulary) -> float:
    """Fraction of predictions holding exactly the reference's words of `vocabulary` (none when it has none):
    for the event words of a motion caption ("appears", "disappears"), which most captions do not have."""
    vocabulary = set(vocabulary)
    right = sum(set(p.lower().split()) & vocabulary == set(r.lower().split()) & vocabulary
                for p, r in zip(predictions, references, strict=True))
    return right / max(len(predictions), 1)


def motion_variants(caption: str) -> list[str]:
    """The caption with its motion phrase ("moves left", "stays still") replaced by each of the five, its own
    first: the candidates `motion_ranking` scores. Empty when the caption names no motion phrase."""
    phrases = list(MOTION_PHRASES.values())
    found = [phrase for phrase in phrases if phrase in caption]
    if len(found) != 1:
        return []
    return [caption] + [caption.replace(found[0], other) for other in phrases if other != found[0]]


def option_text(answer: str) -> str:
    """An answer without its option letter, first or last, and without the steps a worked answer states first:
    "(B) it moves left", "it moves left (B)" and "<object0> moves at speed 3 and …: it moves left (B)" ->
    "it moves left" (no option text holds a colon)."""
    return " ".join(re.sub(r"^\s*\([A-Z]\)|\([A-Z]\)\s*$", "", answer.rsplit(": ", 1)[-1]).split())


def same_option(prediction: str, reference: str) -> bool:
    """Whether an answer names the reference's option, by its text or by the one word only that option holds
    (ShapesWorld's `answer_words`: "above (C)" names "(C) above <object1>")."""
    said, text = option_text(prediction), option_text(reference)
    return said == text or said == SHORT_ANSWER_WORDS.get(text)


def option_first(option: str) -> str:
    """A lettered option as an `option_first` answer writes it: "(B) red" -> "red (B)"."""
    letter, text = option.split(" ", 1)
    return f"{text} {letter}"


def ranked_option(answer, query: SampleInputs, first: bool = False) -> str | None:
    """The option of `query` ("(B) red") whose whole answer has the lowest loss under `answer` (a
    `PixelReferModel`), written "(B) red", or "red (B)" with `first`; None if the question has no options."""
    options = question_options(query)
    if not options:
        return None
    losses = answer.answer_losses(query, [option_first(o) for o in options] if first else options)
    return options[losses.index(min(losses))]


def speed_step_scores(prediction: str, objects: list[dict]) -> list[tuple[int, int]]:
    """(stated, true) speed of each object a Reasoning answer states a speed for (`speed_steps` answers:
    "<object0> moves at speed 3 and <object1> does not move: …"); [] when it states none."""
    stated = stated_speeds(prediction)
    return [(speed, objects[k]["speed"]) for k, speed in sorted(stated.items()) if k < len(objects)]


def speed_step_summary(steps: list[list[tuple[int, int]]]) -> dict[str, float]:
    """How Reasoning answers that state speeds state them: the share of answers with steps, of stated speeds
    that are right, of moving / still right, and of answers whose every stated speed is right."""
    pairs = [pair for answer in steps for pair in answer]
    stated = [answer for answer in steps if answer]
    return {"answers_with_steps": len(stated) / len(steps), "speeds_right": sum(a == b for a, b in pairs) / len(pairs),
            "moving_right": sum((a > 0) == (b > 0) for a, b in pairs) / len(pairs),
            "answers_all_right": sum(all(a == b for a, b in answer) for answer in stated) / len(stated)}


def split_choice(predictions: list[str], references: list[str]) -> dict[str, float]:
    """How lettered answers fail: the option text right (whatever the letter), and right text under a wrong
    letter, the sign that a model knows the answer but not which letter stands for it."""
    text = [same_option(p, r) for p, r in zip(predictions, references, strict=True)]
    letter = [predicted_letter(p) == reference_letter(r) for p, r in zip(predictions, references, strict=True)]
    count = max(len(text), 1)
    return {"option_text_right": sum(text) / count,
            "text_right_letter_wrong": sum(t and not k for t, k in zip(text, letter)) / count}


def question_options(query: SampleInputs) -> list[str]:
    """The lettered options ("(A) red", ...) of the last user turn, one per line as `bench_q_prompt` writes them."""
    last = [turn for turn in query.text if turn["role"] == "user"][-1]["content"]
    return [line.strip() for line in last.splitlines() if re.match(r"\([A-Z]\) ", line.strip())]


def per_type(flags: list[tuple[str, bool]]) -> dict[str, float]:
    """Mean of each type's flags, types in first-seen order."""
    grouped = defaultdict(list)
    for kind, flag in flags:
        grouped[kind].append(flag)
    return {kind: sum(v) / len(v) for kind, v in grouped.items()}


def select(test: list, tasks: str | None, limit: int | None) -> list:
    """The records of `tasks` (comma-separated; all when None), the first `limit` of each task."""
    if tasks:
        wanted = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = sorted(set(wanted) - {s.task for s in test})
        if unknown:
            raise SystemExit(f"--tasks: no test record has task {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted({s.task for s in test}))}")
        test = [s for s in test if s.task in wanted]
    if limit is not None:
        seen = defaultdict(int)
        kept = []
        for sample in test:
            seen[sample.task] += 1
            if seen[sample.task] <= limit:
                kept.append(sample)
        test = kept
    return test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-tiny")
    add_split_arguments(parser)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda on a GPU machine)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", help="comma-separated tasks to score (default: all), e.g. multiple_choice,category")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many records per task")
    parser.add_argument("--no-ranking", action="store_true", help="skip option_ranking (a forward pass per option)")
    parser.add_argument("--option-first", action="store_true",
                        help="rank the options written option first, 'red (B)', as an option_first model answers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = pixelrefer.load(args.model, device=args.device)
    test_file = split_from_arguments(args)
    test = select(load_annotations(test_file, test_file.parent), args.tasks, args.limit)
    started = time.perf_counter()
    result = {"model": args.model, "test_records": len(test)}
    if any(s.task == "category" for s in test):
        result["category"] = category_accuracy(model, processor, [s for s in test if s.task == "category"])
    answer = PixelReferModel(model, processor, max_new_tokens=24)
    hits, choices, answers, captions = defaultdict(list), defaultdict(list), defaultdict(list), ([], [])
    motions, motion_ranked = ([], []), []
    texts, ranked, short_types, steps = defaultdict(list), defaultdict(list), [], []
    for task in sorted({s.task for s in test} - {"category", "detailed_caption"}):
        samples = [s for s in test if s.task == task]
        for start in range(0, len(samples), args.batch_size):
            chunk = samples[start : start + args.batch_size]
            asked = [first_question(s) for s in chunk]
            for sample, (query, reference), prediction in zip(chunk, asked, answer([q for q, _ in asked])):
                hits[task].append(exact_match(prediction, reference))
                if task == "video_short_answer":  # ids end in the question type: vid_00003-video_short_answer-future
                    short_types.append((sample.id.rsplit("-", 1)[1].capitalize(), hits[task][-1]))
                if task in ("multiple_choice", "image_choice"):
                    truth = sample.meta.get("Answer", reference)
                    answers[task].append((prediction, truth))
                    kind = sample.meta.get("type", "")
                    choices[task].append(score_item(sample.id, prediction, truth, type=kind,
                                                    options=sample.meta.get("options")))
                    texts[task].append((kind, same_option(prediction, reference)))
                    if kind == "Reasoning":
                        steps.append(speed_step_scores(prediction, sample.meta.get("objects") or []))
                    if not args.no_ranking:
                        best = ranked_option(answer, query, args.option_first)
                        ranked[task].append((kind, best is not None
                                             and reference_letter(best) == reference_letter(reference)))
                elif task == "short_caption":
                    captions[0].append(prediction)
                    captions[1].append(reference)
            if task == "video_caption":
                asked = [pair for sample in chunk for pair in every_question(sample)]
                motions[0].extend(answer([q for q, _ in asked]))
                motions[1].extend(r for _, r in asked)
                for query, reference in asked if not args.no_ranking else []:
                    if variants := motion_variants(reference):
                        losses = answer.answer_losses(query, variants)
                        motion_ranked.append(losses.index(min(losses)) == 0)
    result["exact_match"] = {task: {"accuracy": sum(v) / len(v), "records": len(v)} for task, v in hits.items()}
    if short_types:
        result["exact_match"]["video_short_answer"]["per_type"] = per_type(short_types)
    for task, items in sorted(choices.items()):
        scores = choice_scores(items)
        result[task] = {"accuracy": scores.overall, "per_type": scores.per_type, "questions": scores.count,
                        **split_choice(*zip(*answers[task])), "per_type_option_text": per_type(texts[task])}
        if ranked[task]:
            result[task]["option_ranking"] = sum(flag for _, flag in ranked[task]) / len(ranked[task])
            result[task]["per_type_option_ranking"] = per_type(ranked[task])
    if any(steps):
        result["multiple_choice"]["speed_steps"] = speed_step_summary(steps)
    if captions[0]:
        metrics = caption_scores(captions[0], captions[1], meteor=False)
        result["short_caption_metrics"] = {k: v for k, v in vars(metrics).items() if isinstance(v, float)}
        result["short_caption_words"] = {"colour": named_words(*captions, COLOURS),
                                         "category": named_words(*captions, SHAPE_NAMES), "captions": len(captions[0])}
    if motions[0]:
        result["video_caption_words"] = {
            "motion": named_words(*motions, MOTIONS), "event": same_words(*motions, EVENTS),
            "colour": named_words(*motions, COLOURS), "category": named_words(*motions, SHAPE_NAMES),
            "questions": len(motions[0])}
        if motion_ranked:
            result["video_caption_words"]["motion_ranking"] = sum(motion_ranked) / len(motion_ranked)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
