"""Text-only lettered questions in ShapesWorld's words: the data of the LLM stage (`llm_pretrain_steps`).

A real PixelRefer starts from an instruction-tuned LLM that already answers "(B) red" to a lettered question;
the tiny model's LLM starts from random weights and, trained on multimodal records alone, learns the option
text but not the letter (README, "Why multiple choice stays at chance"). These conversations teach the letter
step from text, where it is cheap: a first user turn states what a few objects are and do, in ShapesWorld's
words ("<object0> is a red circle . <object1> moves left and then disappears ."), then a question in the
exact wording and option pools of a ShapesWorld multiple-choice type, about one of them, without `<region>`.
The answer is the lettered option, as in VideoRefer-Bench-Q. Every word is in `shapesworld_vocabulary()`
(tested), so the embedded tokenizer needs no new word.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pixelrefer.data import tasks
from pixelrefer.data.formats import bench_q_prompt
from pixelrefer.data.scenes import COLOURS
from pixelrefer.tokenizer import MAX_NAMED_OBJECTS

KINDS = ("colour", "shape", "sequential", "relationship", "reasoning", "future")
MOTIONS = tuple(tasks.MOTION_PHRASES)
EVENTS = tuple(tasks.EVENT_PHRASES)
# Other objects a context may describe beside the asked ones (at most 3): their names stay within the tokenizer's
# `<objectK>` tokens.
MAX_CONTEXT_OBJECTS = 12


def _question(template: str, k: int = 0) -> str:
    return template.format(k=k).replace("<region>", "")


def _check_context(context_objects) -> None:
    if isinstance(context_objects, bool) or not isinstance(context_objects, int) or not (
            0 <= context_objects <= MAX_CONTEXT_OBJECTS):
        raise ValueError(f"context_objects must be an integer from 0 to {MAX_CONTEXT_OBJECTS}, got {context_objects!r}")


def _fact(k: int, words: str) -> str:
    return f"<object{k}> {words} ."


def context_facts(rng: np.random.Generator, first: int, count: int) -> list[str]:
    """Facts about objects `first` … `first + count - 1`, none of them asked about: what each is, what it does
    and where it is first seen, in ShapesWorld's words (about 21 tokens an object)."""
    if first + count > MAX_NAMED_OBJECTS:
        raise ValueError(f"context facts about <object{first}> to <object{first + count - 1}>: the tokenizer names "
                         f"objects up to <object{MAX_NAMED_OBJECTS - 1}>")
    facts = []
    for k in range(first, first + count):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(tasks.SHAPE_NAMES)))
        event, motion = EVENTS[int(rng.integers(len(EVENTS)))], MOTIONS[int(rng.integers(len(MOTIONS)))]
        row, column = (int(i) for i in rng.integers(3, size=2))
        where = tasks.position_phrase((column + 0.5) / 3, (row + 0.5) / 3, 1, 1)
        facts += [_fact(k, f"is {tasks.article(shape)} {colour} {shape}"),
                  _fact(k, tasks.EVENT_PHRASES[event].format(motion=tasks.MOTION_PHRASES[motion])),
                  _fact(k, f"is {where} when it is first seen")]
    return facts


def text_choice(rng: np.random.Generator, kind: str | None = None, max_objects: int = 3,
                option_first: bool = False, context_objects: int = 0) -> list[dict[str, str]]:
    """One conversation: facts about 1 to `max_objects` objects (two for relationship and reasoning questions)
    and a lettered question of `kind` (random when None), answered "(B) red", or "red (B)" with `option_first`
    (as ShapesWorld's `option_first`; draws nothing, so the conversation is otherwise the same).

    `context_objects` adds facts about 0 to that many other objects (`context_facts`), shuffled in with the
    rest, so the question comes after a context as long as a video's region tokens make one; with 0 nothing
    more is drawn and the conversation is the one without it.
    """
    _check_context(context_objects)
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    count = int(rng.integers(1, max_objects + 1)) if kind not in ("relationship", "reasoning") else 2
    colours = [str(c) for c in rng.choice(list(COLOURS), count, replace=False)]
    shapes = [str(s) for s in rng.choice(list(tasks.SHAPE_NAMES), count)]
    motions = [MOTIONS[int(i)] for i in rng.integers(len(MOTIONS), size=count)]
    events = [EVENTS[int(i)] for i in rng.integers(len(EVENTS), size=count)]
    k = int(rng.integers(count))
    facts = [_fact(i, f"is {tasks.article(shapes[i])} {colours[i]} {shapes[i]}") for i in range(count)]
    if kind == "colour":
        question, options = _question(tasks.CHOICE_COLOUR_Q, k), tasks._options(rng, colours[k], COLOURS)
    elif kind == "shape":
        question, options = _question(tasks.CHOICE_SHAPE_Q, k), tasks._options(rng, shapes[k], tasks.SHAPE_NAMES)
    elif kind in ("sequential", "future"):
        phrases = [tasks.EVENT_PHRASES[e].format(motion=tasks.MOTION_PHRASES[m]) for e, m in zip(events, motions)]
        facts = [_fact(i, phrase) for i, phrase in enumerate(phrases)]
        if kind == "sequential":
            pool = [tasks.SEQUENTIAL_OPTION.format(phrase=tasks.EVENT_PHRASES[e].format(motion=m))
                    for e in EVENTS for m in tasks.MOTION_PHRASES.values()]
            correct = tasks.SEQUENTIAL_OPTION.format(phrase=phrases[k])
            question = _question(tasks.SEQUENTIAL_Q.replace("<object0>", f"<object{k}>"))
            options = tasks._options(rng, correct, pool)
        else:
            question = _question(tasks.FUTURE_Q.replace("<object0>", f"<object{k}>"))
            options = tasks._options(rng, tasks.FUTURE_PHRASES[motions[k]], tasks.FUTURE_PHRASES.values())
    elif kind == "relationship":
        side = tuple(tasks.RELATIONS)[int(rng.integers(len(tasks.RELATIONS)))]
        facts = [_fact(0, f"is {tasks.RELATIONS[side]} <object1>")]
        texts = {s: f"{relation} <object1>" for s, relation in tasks.RELATIONS.items()}
        question, options = _question(tasks.RELATIONSHIP_Q), tasks._options(rng, texts[side], texts.values())
    elif kind == "reasoning":
        index = int(rng.integers(len(tasks.SPEED_OPTIONS)))  # <object0>, <object1>, same speed, neither
        correct = tasks.SPEED_OPTIONS[index]
        moving = [tasks.MOTION_PHRASES[m] for m in rng.choice([m for m in MOTIONS if m != "still"], 2)]
        if index == 3:
            facts = [_fact(i, tasks.MOTION_PHRASES["still"]) for i in range(2)]
        else:
            facts = [_fact(i, "moves faster" if i == index else moving[i]) for i in range(2)]
            facts += [f"{correct} ."] if index == 2 else []
        question, options = _question(tasks.REASONING_Q), tasks._options(rng, correct, tasks.SPEED_OPTIONS)
    else:
        raise ValueError(f"unknown text question kind {kind!r}; known: {', '.join(KINDS)}")
    choices, answer = options
    if context_objects:
        facts += context_facts(rng, first=count, count=int(rng.integers(context_objects + 1)))
    order = rng.permutation(len(facts))
    context = " ".join(facts[i] for i in order)
    return [{"role": "user", "content": context + "\n" + bench_q_prompt(question, choices)},
            {"role": "assistant", "content": tasks.option_first_answer(answer) if option_first else answer}]


@dataclass(frozen=True)
class TextChoiceRecord:
    """A text-only lettered question as a training record (`load_media()` like `pixelrefer.data.Sample`):
    number `index` of the stream seeded by `seed`, the same conversation every time it is loaded, answered
    option first with `option_first`, after facts about up to `context_objects` other objects."""

    seed: int
    index: int
    task: str = "text_choice"
    option_first: bool = False
    context_objects: int = 0
    meta: dict = field(default_factory=dict, compare=False)
    image = None
    video = None
    masks = ()

    @property
    def where(self) -> str:
        return f"text_choice:{self.seed}:{self.index}"

    def load_media(self):
        conversation = text_choice(np.random.default_rng([self.seed, self.index]), option_first=self.option_first,
                                   context_objects=self.context_objects)
        return conversation, None, None, []


def text_choice_records(count: int, seed: int = 0, option_first: bool = False,
                        context_objects: int = 0) -> list[TextChoiceRecord]:
    """`count` text-only lettered questions to mix into a multimodal training set (TrainConfig.text_choice_records,
    MediaStage.text_choice_records), answered option first with `option_first`, each after facts about up to
    `context_objects` other objects (`text_choice`)."""
    _check_context(context_objects)
    return [TextChoiceRecord(seed, i, option_first=option_first, context_objects=context_objects)
            for i in range(count)]
