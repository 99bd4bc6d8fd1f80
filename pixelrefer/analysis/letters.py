"""Where an option-first model's letter comes from: the text it wrote, or what it sees.

A model that writes a lettered answer option first ("above <object1> (B)", ShapesWorld's `option_first`) has to
find, among the prompt's options, the one its written text states and copy that option's letter. `forced_letters`
asks every multiple-choice question once per option, that option's text teacher-forced as the answer, and reads
the token the model predicts after the answer's "(" (greedy over the whole vocabulary, what generation would
write). `letter_sources` sums them up per question type:

- right text forced: the letter accuracy given the right text (what a perfect text would score);
- a wrong text forced: how often the letter is that text's (`text`: the model looks its written answer up), the
  right answer's (`media`: the letter comes from what the model sees, whatever it wrote) or another's (`other`);
- `confusions`: for the right text, which option's text the wrong letters belong to.

A model whose letter follows its text for every option has a perfect lookup; one that writes the right answer's
letter under any text decides its letter from the media, as a letter-first model does.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pixelrefer.errors import InputError


@dataclass(frozen=True)
class ForcedLetter:
    """One question asked with one option's text forced as the answer.

    id: the record; type: its question type (Bench-Q `type`); forced / truth: the index of the forced option and
    of the right one; texts / letters: every option's text and letter; predicted: the token the model writes
    after the answer's "(" (a letter, or whatever else it predicts)."""

    id: str
    type: str
    forced: int
    truth: int
    texts: tuple[str, ...]
    letters: tuple[str, ...]
    predicted: str

    @property
    def source(self) -> str:
        """"text" (the forced option's letter), "media" (the right one's, under a wrong text) or "other"."""
        if self.predicted == self.letters[self.forced]:
            return "text"
        return "media" if self.predicted == self.letters[self.truth] else "other"


def _split_option(option: str, where: str) -> tuple[str, str]:
    head, _, text = option.partition(" ")
    if len(head) < 3 or head[0] != "(" or head[-1] != ")" or not text:
        raise InputError(f"{where}: option {option!r} is not written \"(X) text\"")
    return head[1:-1], text


def forced_variants(samples: Sequence, written: Callable[[str], str] | None = None) -> tuple[list, list[dict]]:
    """Every lettered question once per option, answered with that option's text then its letter; and what each
    variant is (record id, type, forced and right option, texts, letters). `written` turns an option's text into
    what the model writes for it (ShapesWorld's `answer_words`: the one word only that option holds); None
    writes the text itself. Raises `InputError` naming a record that is not a one-question multiple-choice
    record with "(X) text" options and an answer among them."""
    variants, info = [], []
    for sample in samples:
        where = f"{sample.source}:{sample.index}"
        options, answer = sample.meta.get("options"), sample.meta.get("Answer")
        turns = sample.conversation
        if not options or answer not in options or [t["role"] for t in turns] != ["user", "assistant"]:
            raise InputError(f"{where} ({sample.id}): not a multiple-choice record with one question, its options "
                             "and an answer that is one of them")
        parts = [_split_option(option, where) for option in options]
        letters, texts = zip(*parts)
        for forced, (letter, text) in enumerate(parts):
            said = written(text) if written else text
            answered = [turns[0], {"role": "assistant", "content": f"{said} ({letter})"}]
            variants.append(dataclasses.replace(sample, conversation=answered))
            info.append(dict(id=sample.id, type=str(sample.meta.get("type", "")), forced=forced,
                             truth=options.index(answer), texts=tuple(texts), letters=tuple(letters)))
    return variants, info


@torch.no_grad()
def forced_letters(model, processor, samples: Sequence, batch_size: int = 16,
                   written: Callable[[str], str] | None = None) -> list[ForcedLetter]:
    """`ForcedLetter` rows for every option of every multiple-choice `samples` record (module docstring): one
    forward pass per batch of cached records (`cached_media`), the prediction read at the answer's "(";
    `written` as in `forced_variants`.

    Needs a tokenizer that writes "(" apart from the letter (ShapesWorld's word-level one does); raises
    `InputError` otherwise, and for records `forced_variants` refuses."""
    from pixelrefer.cached_media import cache_media, cached_embeds, collate_cached

    tokenizer = processor.tokenizer
    opening = tokenizer.convert_tokens_to_ids("(")
    if opening is None or opening == tokenizer.unk_token_id:
        raise InputError("forced_letters reads the letter after the answer's \"(\", but this tokenizer has no \"(\" "
                         "token of its own")
    variants, info = forced_variants(samples, written)
    records = cache_media(model, processor, variants, progress=False)
    pad = model.config.text_config.pad_token_id or 0
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch = {k: v.to(next(model.parameters()).device) for k, v in collate_cached(chunk, pad).items()}
            logits = model(inputs_embeds=cached_embeds(model, batch), attention_mask=batch["attention_mask"]).logits
            for b, record in enumerate(chunk):
                labels = batch["labels"][b]
                supervised = (labels != -100).nonzero().flatten().tolist()
                opens = [j for j in supervised if labels[j] == opening and j + 1 in supervised]
                if not opens:
                    raise InputError(f"{record.where}: the forced answer has no \"(\" before its letter")
                predicted = tokenizer.convert_ids_to_tokens(int(logits[b, opens[-1]].argmax()))
                rows.append(ForcedLetter(predicted=predicted, **info[start + b]))
    finally:
        model.train(was_training)
    return rows


def letter_sources(rows: Sequence[ForcedLetter], top: int = 10) -> dict:
    """Per question type and over "all": `right_text` {questions, letter: accuracy given the right text},
    `wrong_text` {forced: how many, text / media / other: shares}; and over all the `top` most common
    `confusions` ("right text -> text of the letter written": count) under the right text."""
    groups: dict[str, dict[str, Counter]] = {}
    confusions: Counter = Counter()
    for row in rows:
        right = row.forced == row.truth
        for group in (row.type or "untyped", "all"):
            tally = groups.setdefault(group, {"right": Counter(), "wrong": Counter()})
            tally["right" if right else "wrong"][row.source] += 1
        if right and row.source != "text":
            written = row.letters.index(row.predicted) if row.predicted in row.letters else None
            confusions[f"{row.texts[row.truth]} -> " + ("(not a letter)" if written is None
                                                        else row.texts[written])] += 1
    report = {}
    for group, tally in sorted(groups.items()):
        right, wrong = tally["right"], tally["wrong"]
        asked, forced = sum(right.values()), sum(wrong.values())
        report[group] = {
            "right_text": {"questions": asked, "letter": right["text"] / asked if asked else None},
            "wrong_text": {"forced": forced, **{s: (wrong[s] / forced if forced else None)
                                                  for s in ("text", "media", "other")}},
        }
    report["confusions"] = dict(confusions.most_common(top))
    return report
