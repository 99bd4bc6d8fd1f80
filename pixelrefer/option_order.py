"""Lettered questions with their options in a new order, on token ids: a training augmentation.

A record of a lettered question ("(A) below <object1> (B) above <object1> … Answer with the option's letter from
the given choices directly.", answered "(B) above <object1>" or, option first, "above <object1> (B)") teaches
which letter goes with which option text in that one order. `shuffle_options` deals the option texts to the
letters anew and moves the answer's letter with its text, so every draw of the record asks the same question with
the answer under another letter: the step from an answer to its letter is practised on the record's own prompt
(its region tokens, its length), not learnt as one letter per record. It works on a cached record's token ids
(`pixelrefer.cached_media.CachedRecord`): the options' tokens are permuted in place, the sequence keeps its
length and every media slot its position, so the cached media still fit.

Notable:
- Found by token pattern: each letter's "(X)" as the tokenizer writes it alone (`OptionTokens.of`), consecutive
  from "(A)", in the prompt (label -100), ending where the benchmark's instruction starts; the answer is the
  first labelled "(X)" after it. Several questions in one conversation (image_choice's turns) are each dealt
  anew. A record without that pattern is left as it is (`lettered_questions` returns nothing for it).
- Options holding a media slot, or padding, are left in their order (the slots' embeddings are cached in
  sequence order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pixelrefer.data.formats import BENCH_Q_INSTRUCTION
from pixelrefer.data.tasks import LETTERS


@dataclass(frozen=True)
class OptionTokens:
    """How a tokenizer writes a lettered question: each letter's "(X)" and the instruction after the options,
    as token ids, and the media-slot ids no shuffled option may hold."""

    letters: tuple[tuple[int, ...], ...]
    instruction: tuple[int, ...]
    media: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tokenizer, media_ids: Sequence[int] = ()) -> "OptionTokens":
        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        letters = tuple(encode(f"({letter})") for letter in LETTERS)
        if len({len(ids) for ids in letters}) != 1:
            raise ValueError(f"{type(tokenizer).__name__} writes the option letters in token runs of different "
                             f"lengths {[len(ids) for ids in letters]}: their options cannot be reordered in place")
        return cls(letters, encode(BENCH_Q_INSTRUCTION), frozenset(int(i) for i in media_ids))


@dataclass(frozen=True)
class LetteredQuestion:
    """One question of a record: where its letters' "(X)" start (A, B, … in order), where its instruction starts,
    and where the answer's "(X)" starts with the index of the letter it names."""

    markers: tuple[int, ...]
    end: int
    answer: int
    answer_index: int


def _find(ids: Sequence[int], run: Sequence[int], start: int, stop: int) -> list[int]:
    width = len(run)
    return [i for i in range(start, stop - width + 1) if tuple(ids[i:i + width]) == tuple(run)]


def lettered_questions(input_ids: Sequence[int], labels: Sequence[int], tokens: OptionTokens,
                       attention_mask: Sequence[int] | None = None) -> list[LetteredQuestion]:
    """The lettered questions of one record whose options can be reordered in place (module docstring)."""
    ids, labels = list(input_ids), list(labels)
    width = len(tokens.letters[0])
    prompt = [label == -100 for label in labels]
    ends = [i for i in _find(ids, tokens.instruction, 0, len(ids)) if all(prompt[i:i + len(tokens.instruction)])]
    found, cursor = [], 0
    for number, end in enumerate(ends):
        following = ends[number + 1] if number + 1 < len(ends) else len(ids)
        firsts = [i for i in _find(ids, tokens.letters[0], cursor, end) if prompt[i]]
        cursor = end + len(tokens.instruction)
        if not firsts:
            continue
        markers = [firsts[-1]]
        for run in tokens.letters[1:]:
            later = [i for i in _find(ids, run, markers[-1] + width, end) if prompt[i]]
            if not later:
                break
            markers.append(later[0])
        if len(markers) < 2:
            continue
        block = range(markers[0], end)
        if any(ids[i] in tokens.media for i in block) or (
                attention_mask is not None and not all(attention_mask[i] for i in block)):
            continue
        answers = [(i, k) for k, run in enumerate(tokens.letters[:len(markers)])
                   for i in _find(ids, run, cursor, following) if not any(prompt[i:i + width])]
        if answers:
            answer, index = min(answers)
            found.append(LetteredQuestion(tuple(markers), end, answer, index))
    return found


def reorder(input_ids: Sequence[int], question: LetteredQuestion, order: Sequence[int],
            tokens: OptionTokens) -> list[int]:
    """`input_ids` with the question's option texts dealt to the letters in `order` (letter j gets the text
    letter `order[j]` had) and the answer's letter moved with its text; same length, nothing else changed."""
    ids = list(input_ids)
    width = len(tokens.letters[0])
    bounds = [*question.markers, question.end]
    texts = [ids[bounds[k] + width:bounds[k + 1]] for k in range(len(question.markers))]
    if sorted(order) != list(range(len(texts))):
        raise ValueError(f"order {list(order)} is not a permutation of the {len(texts)} options")
    dealt = [token for j, k in enumerate(order) for token in (*tokens.letters[j], *texts[k])]
    ids[question.markers[0]:question.end] = dealt
    new_letter = list(order).index(question.answer_index)
    ids[question.answer:question.answer + width] = tokens.letters[new_letter]
    return ids


def shuffle_options(record, tokens: OptionTokens, rng: np.random.Generator,
                    questions: Sequence[LetteredQuestion] | None = None):
    """A copy of cached `record` with each lettered question's options in a new random order (drawn from `rng`,
    one permutation a question) and its answer's letter moved with its text: input_ids and labels change,
    nothing else. `questions` (from `lettered_questions`) saves finding them again; a record without any is
    returned as it is, drawing nothing."""
    if questions is None:
        questions = lettered_questions(record.input_ids.tolist(), record.labels.tolist(), tokens,
                                       record.attention_mask.tolist())
    if not questions:
        return record
    ids = record.input_ids.tolist()
    for question in questions:
        ids = reorder(ids, question, rng.permutation(len(question.markers)).tolist(), tokens)
    input_ids = torch.tensor(ids, dtype=record.input_ids.dtype)
    labels = record.labels.clone()
    answered = labels != -100
    labels[answered] = input_ids[answered]
    return dataclasses.replace(record, input_ids=input_ids, labels=labels)


def answer_text_span(input_ids: Sequence[int], labels: Sequence[int], question: LetteredQuestion,
                     tokens: OptionTokens) -> tuple[int, int] | None:
    """Where an option-first answer's text is: (start, stop) of the supervised tokens before the answer's "(X)",
    when they are, token for token, the text of the option that letter names; None for any other answer (a
    letter-first one, or text that is not its option's)."""
    width = len(tokens.letters[0])
    start = question.answer
    while start > question.end and labels[start - 1] != -100:
        start -= 1
    bounds = [*question.markers, question.end]
    k = question.answer_index
    option = list(input_ids[bounds[k] + width:bounds[k + 1]])
    text = list(input_ids[start:question.answer])
    return (start, question.answer) if text and text == option else None


def drill_letter(record, tokens: OptionTokens, rng: np.random.Generator, question: LetteredQuestion):
    """A copy of cached `record` whose option-first answer names another option: the text of an option drawn
    from `rng` (any of them, the right one included), then that option's letter. The text is not supervised
    (it may be wrong), the letter and what follows it are: the step from a written text to its letter, on the
    record's own prompt, for every option alike. The sequence changes length with the text (the media slots,
    all before the answer, keep their places). A record whose answer is not its option's text, written option
    first (`answer_text_span`), is returned as it is, drawing nothing."""
    ids, labels = record.input_ids.tolist(), record.labels.tolist()
    span = answer_text_span(ids, labels, question, tokens)
    if span is None:
        return record
    start, stop = span
    width = len(tokens.letters[0])
    k = int(rng.integers(len(question.markers)))
    bounds = [*question.markers, question.end]
    text = ids[bounds[k] + width:bounds[k + 1]]
    letter = list(tokens.letters[k])
    after = stop + width
    mask = record.attention_mask.tolist()
    new_ids = ids[:start] + text + letter + ids[after:]
    new_labels = [-100] * (start + len(text)) + letter + labels[after:]
    new_mask = mask[:start] + [1] * (len(text) + width) + mask[after:]
    return dataclasses.replace(
        record, input_ids=torch.tensor(new_ids, dtype=record.input_ids.dtype),
        labels=torch.tensor(new_labels, dtype=record.labels.dtype),
        attention_mask=torch.tensor(new_mask, dtype=record.attention_mask.dtype))
