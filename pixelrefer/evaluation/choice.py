"""Multiple-choice accuracy (VideoRefer-Bench-Q; paper Table 3).

Notable:
- Ground truth: the letter in the first `(X)` of `Answer`. A ground truth
  without one is a broken benchmark record and raises, naming it.
- Prediction, as the release parses it: the first `(X)`, else the first
  `X)`, else the first character once dots are removed (we also skip
  leading whitespace). Letters compare case-insensitively, as there.
- Unparseable answers (empty, or no letter where one is expected, or a
  letter that is not one of the question's options) are counted as wrong
  and listed with the reason; the release crashes on an empty answer.
- Accuracy per question type, in the paper's order (Basic, Sequential,
  Relationship, Reasoning, Future; other types after them) and overall
  (micro average over all questions, as the release's "average").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

QUESTION_TYPES = ("Basic", "Sequential", "Relationship", "Reasoning", "Future")
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_CLOSING = re.compile(r"([A-Z])\)")


def reference_letter(answer: str, where: str = "answer") -> str:
    """The option letter of a ground truth like `"(B) it moves left"`."""
    match = _PARENTHESISED.search(answer)
    if match is None:
        raise ValueError(f"{where}: ground truth {answer!r} has no option letter like '(A)'")
    return match.group(1)


def predicted_letter(prediction: str) -> str | None:
    """The release's parse: first `(X)`, else `X)`, else the first character (dots removed); None if empty."""
    for pattern in (_PARENTHESISED, _CLOSING):
        match = pattern.search(prediction)
        if match:
            return match.group(1)
    rest = prediction.replace(".", "").lstrip()
    return rest[0].upper() if rest else None


def option_letters(options: list[str] | None) -> set[str]:
    """Letters of options written like `"(A) ..."`; empty when there are none to check against."""
    return {m.group(1) for option in options or () if (m := _PARENTHESISED.match(option.strip()))}


@dataclass
class ChoiceItem:
    """One scored question."""

    id: str
    type: str
    reference: str
    predicted: str | None
    correct: bool
    problem: str | None = None  # why the answer could not be parsed, if it could not


@dataclass
class ChoiceScores:
    """Accuracy per question type and overall (fractions), with every unparseable answer.

    Attributes:
        per_type: {type: accuracy} in the paper's order of types.
        counts: {type: number of questions}.
        unparseable: the items whose answer gave no usable letter (all counted wrong).
    """

    overall: float
    per_type: dict[str, float]
    counts: dict[str, int]
    count: int
    unparseable: list[ChoiceItem] = field(default_factory=list)
    items: list[ChoiceItem] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {**self.per_type, "Overall": self.overall}


def score_item(id: str, prediction: str, answer: str, *, type: str = "", options: list[str] | None = None,
               where: str | None = None) -> ChoiceItem:
    """Score one answer; `where` names the benchmark record in errors (default: the id)."""
    expected = reference_letter(answer, where or id)
    letter = predicted_letter(prediction)
    allowed = option_letters(options)
    problem = None
    if letter is None:
        problem = "empty answer"
    elif not letter.isalpha():
        problem = f"no option letter in {prediction[:80]!r}"
    elif allowed and letter not in allowed:
        problem = f"letter {letter!r} is not one of the options {''.join(sorted(allowed))}"
    correct = problem is None and letter.lower() == expected.lower()
    return ChoiceItem(id, type, expected, letter, correct, problem)


def choice_scores(items: list[ChoiceItem]) -> ChoiceScores:
    """Aggregate scored questions into per-type and overall accuracy."""
    if not items:
        return ChoiceScores(float("nan"), {}, {}, 0)
    types = [t for t in QUESTION_TYPES if any(i.type == t for i in items)]
    types += sorted({i.type for i in items} - set(types))
    counts = {t: sum(i.type == t for i in items) for t in types}
    per_type = {t: sum(i.correct for i in items if i.type == t) / counts[t] for t in types}
    overall = sum(i.correct for i in items) / len(items)
    return ChoiceScores(overall, per_type, counts, len(items), [i for i in items if i.problem], items)
