"""LLM-judged benchmarks behind a pluggable judge: VideoRefer-Bench-D, CLAIR (Ref-L4), DLC-Bench.

A judge is any callable `prompt -> reply`: a string (parsed here), or
directly a number where the protocol asks for one score. Wrap whichever
client you have (a GPT-4o endpoint, a local LLM); nothing here calls a
network, and the tests use a fake judge.

Notable:
- VideoRefer-Bench-D (paper Table 2): the judge sees the reference and the
  predicted description and gives 0–5 scores for Subject Correspondence,
  Appearance Description, Temporal Description and Hallucination Detection;
  each dimension is averaged over the items that have it, and Avg is the
  mean of the four dimension averages (the release's analyze_score).
- CLAIR (Ref-L4 detailed captions): a 0–100 likelihood that candidate and
  references describe the same thing, reported as a fraction; parsed from
  the first JSON object, else the first number (values < 1 taken as
  fractions), else scored 0 with the reply kept, as the release does.
- DLC-Bench: per object, a recognition question ("is it a <class>?") and
  the benchmark's positive / negative multiple-choice questions are put to
  the judge about the predicted description alone. A wrong recognition caps
  every score of that object at 0. Pos / Neg are means over objects (Neg
  over objects with negatives), Avg = (Pos + Neg) / 2, as the release.
  Differs from the release: no `inflect` plural handling (the article is
  chosen from the class name's first letter).
- Prompts are ours, not the release's text; what is compared is the protocol.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Judge = Callable[[str], str | float | int]
VIDEO_D_DIMENSIONS = {"SC": "Subject Correspondence", "AD": "Appearance Description",
                      "TD": "Temporal Description", "HD": "Hallucination Detection"}
_NUMBER = re.compile(r"-?\d*\.?\d+")

VIDEO_D_PROMPT = """You grade a model's description of one object in a video against the correct description.
Score each aspect with an integer from 0 (worst) to 5 (best):
- Subject Correspondence: does the description refer to the same subject?
- Appearance Description: how accurately are the subject's looks described?
- Temporal Description: how accurately are its actions and changes over time described?
- Hallucination Detection: 5 if nothing is made up, lower the more is invented.
Reply with JSON only: {{"Subject Correspondence": n, "Appearance Description": n, "Temporal Description": n, \
"Hallucination Detection": n}}

##Correct answer: {reference}
##Predicted answer: {prediction}
"""

CLAIR_PROMPT = """You are deciding whether a set of candidate captions describes the same image region as a set of \
reference captions.
Candidate set:
{candidates}Reference set:
{references}On a scale from 0 to 100, how likely is it that the candidates describe the same thing as the \
references? Reply as JSON with a key "score" (a number from 0 to 100) and a key "reason" (a string).
"""

DLC_PROMPT = """Answer the multiple-choice question about an object, using only the description below.
Output exactly one of the choices and nothing else; pick the closest one, an exact match is not needed.

Description:
{description}

Question:
{question}
"""


def first_json_object(reply: str) -> dict | None:
    """The first `{...}` in a reply that parses as a JSON object, else None."""
    for match in re.finditer(r"\{[^{}]*\}", reply):
        try:
            parsed = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return None


# ----------------------------------------------------------------------------- VideoRefer-Bench-D


@dataclass
class DescriptionScores:
    """VideoRefer-Bench-D: mean 0–5 score per dimension (SC, AD, TD, HD) and their mean, Avg."""

    per_dimension: dict[str, float | None]
    average: float | None
    count: int
    failed: list[str] = field(default_factory=list)  # ids whose reply gave no score at all

    def as_dict(self) -> dict[str, float | None]:
        return {**self.per_dimension, "Avg": self.average}


def judge_description(prediction: str, reference: str, judge: Judge) -> dict[str, float]:
    """Ask the judge for the four VideoRefer-Bench-D scores of one description; missing ones are left out."""
    reply = judge(VIDEO_D_PROMPT.format(reference=reference, prediction=prediction))
    parsed = first_json_object(str(reply)) or {}
    scores = {}
    for short, name in VIDEO_D_DIMENSIONS.items():
        value = parsed.get(name, parsed.get(short))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[short] = float(value)
    return scores


def description_scores(ids: list[str], predictions: list[str], references: list[str], judge: Judge
                       ) -> DescriptionScores:
    """Judge every description; each dimension is averaged over the items that received it."""
    judged = [judge_description(p, r, judge) for p, r in zip(predictions, references)]
    per_dimension = {}
    for short in VIDEO_D_DIMENSIONS:
        values = [s[short] for s in judged if short in s]
        per_dimension[short] = sum(values) / len(values) if values else None
    present = [v for v in per_dimension.values() if v is not None]
    average = sum(present) / len(present) if len(present) == len(VIDEO_D_DIMENSIONS) else None
    failed = [i for i, s in zip(ids, judged) if not s]
    return DescriptionScores(per_dimension, average, len(judged), failed)


# ----------------------------------------------------------------------------- CLAIR


@dataclass
class ClairScore:
    """CLAIR for one caption: a fraction in [0, 1] and the judge's reason (or why parsing failed)."""

    score: float
    reason: str


def clair(candidates: list[str], references: list[str], judge: Judge) -> ClairScore:
    """CLAIR of candidate caption(s) against reference caption(s)."""
    prompt = CLAIR_PROMPT.format(candidates="".join(f"- {c}\n" for c in candidates),
                                 references="".join(f"- {r}\n" for r in references))
    reply = judge(prompt)
    if isinstance(reply, (int, float)) and not isinstance(reply, bool):
        return ClairScore(_fraction(float(reply)), "")
    text = str(reply)
    parsed = first_json_object(text)
    if parsed is not None and isinstance(parsed.get("score"), (int, float)):
        return ClairScore(_fraction(float(parsed["score"])), str(parsed.get("reason", "")))
    numbers = _NUMBER.findall(text)
    if numbers:
        return ClairScore(_fraction(float(numbers[0])), text)
    return ClairScore(0.0, f"unparseable judge reply: {text[:200]!r}")


def _fraction(value: float) -> float:
    """A 0–100 score as a fraction; values already below 1 are taken as fractions (as the release)."""
    return min(max(value if value < 1 else value / 100.0, 0.0), 1.0)


# ----------------------------------------------------------------------------- DLC-Bench


@dataclass
class DlcQuestion:
    """One DLC-Bench question: choices as (text, score) pairs; type "positive" or "negative"."""

    question: str
    choices: list[tuple[str, float]]
    type: str


@dataclass
class DlcScores:
    """DLC-Bench scores (fractions): Pos, Neg, Avg = (Pos + Neg) / 2, over `count` objects."""

    positive: float
    negative: float | None
    average: float | None
    count: int
    per_object: dict[str, dict] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, float | None]:
        return {"Pos": self.positive, "Neg": self.negative, "Avg": self.average}


def parse_choice(reply: str, choices: list[str]) -> int | None:
    """Index of the choice a judge reply names: exact text, `X.`-style letter, or a unique substring."""
    text = reply.strip().lower()
    if not text:
        return None
    lowered = [c.strip().lower() for c in choices]
    for index, choice in enumerate(lowered):
        letter = "abcde"[index] if index < 5 else None
        if text in (choice, letter, f"{letter}. {choice}", f"{letter}."):
            return index
    contained = [i for i, c in enumerate(lowered) if c in text]
    if len(contained) == 1:
        return contained[0]
    if len(text) > 1 and text[1] in ".)" and text[0] in "abcde"[: len(choices)]:
        return "abcde".index(text[0])
    if contained:  # several: the one mentioned last, as MMMU-style parsers do
        return max(contained, key=lambda i: (text.rfind(lowered[i]), len(lowered[i])))
    return None


def _ask(judge: Judge, description: str, question: str, choices: list[str]) -> int | None:
    listed = "".join(f"{'ABCDE'[i]}. {c}\n" for i, c in enumerate(choices))
    return parse_choice(str(judge(DLC_PROMPT.format(description=description, question=f"{question}\n{listed}"))),
                        choices)


def dlc_object_score(description: str, class_name: str, questions: list[DlcQuestion], judge: Judge) -> dict:
    """Scores of one object's description: recognised?, then positive and negative question scores."""
    article = "an" if class_name[:1].lower() in "aeiou" else "a"
    recognition = (f"Is it likely that the object in the description is {article} {class_name} or an object of a "
                   f"similar type? Again, it does not have to be an exact match.")
    recognised = _ask(judge, description, recognition, ["Yes", "No"]) == 0
    scores = {"positive": [], "negative": []}
    for q in questions:
        if q.type not in scores:
            raise ValueError(f"DLC-Bench question type {q.type!r} is not 'positive' or 'negative'")
        picked = _ask(judge, description, q.question, [text for text, _ in q.choices])
        value = q.choices[picked][1] if picked is not None else 0.0  # no match: treated as not mentioned
        scores[q.type].append(value if recognised else min(0.0, value))
    return {"recognised": recognised, **scores}


def read_dlc_bench(qa_path, class_names_path) -> tuple[dict[str, list[DlcQuestion]], dict[str, str]]:
    """DLC-Bench's `qa.json` ({key: [{question, choices: [[text, score], ...], type}]}) and `class_names.json`."""
    with open(qa_path, encoding="utf-8") as f:
        raw = json.load(f)
    with open(class_names_path, encoding="utf-8") as f:
        class_names = {str(k): str(v) for k, v in json.load(f).items()}
    qa = {}
    for key, questions in raw.items():
        try:
            qa[str(key)] = [DlcQuestion(q["question"], [(str(c), float(s)) for c, s in q["choices"]], q["type"])
                            for q in questions]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{qa_path}: object {key!r}: malformed question ({exc})") from None
    missing = sorted(set(qa) - set(class_names))
    if missing:
        raise ValueError(f"{class_names_path}: no class name for {len(missing)} object(s), e.g. {missing[:5]}")
    return qa, class_names


def dlc_scores(descriptions: dict[str, str], class_names: dict[str, str], qa: dict[str, list[DlcQuestion]],
               judge: Judge) -> DlcScores:
    """DLC-Bench over every object of `qa` (keys as in the benchmark's qa.json); a missing description raises."""
    missing = sorted(set(qa) - set(descriptions))
    if missing:
        raise KeyError(f"DLC-Bench: no description for {len(missing)} object(s), e.g. {missing[:5]}")
    per_object = {key: dlc_object_score(descriptions[key], class_names[key], qa[key], judge) for key in qa}
    positives = [sum(o["positive"]) / len(o["positive"]) for o in per_object.values() if o["positive"]]
    negatives = [sum(o["negative"]) / len(o["negative"]) for o in per_object.values() if o["negative"]]
    positive = sum(positives) / len(positives) if positives else float("nan")
    negative = sum(negatives) / len(negatives) if negatives else None
    average = (positive + negative) / 2 if negative is not None else None
    return DlcScores(positive, negative, average, len(per_object), per_object)
