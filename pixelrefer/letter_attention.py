"""Where an option-first answer's letter is read: an auxiliary attention loss (a training aid).

An option-first answer ("above <object1> (B)") is decided at its words; its letter must then be found among the
prompt's options, on the line whose text the answer states. The letter precedes that text in the prompt, so a
causal model cannot match the answer to the letter token itself: the line's words must first carry their letter
(one hop), and the answer's "(" must then attend to the words of the right line (a second). A 4-layer model left
to find both from the answer loss alone spreads its attention over the four lines (docs/embedded-models.md,
"Session 22"). `LetterAttention` names the two hops and supervises each on one head:

- `weight` (the lookup): at the position that predicts the answer's letter (its "("), head `head` of layer
  `layer` attends to the right option's line (its "(X)" and text); the term is -log of that head's attention
  share there, averaged over the batch's lettered questions.
- `line_weight` (the line's letter): at every token of an option's text, head `line_head` of layer `line_layer`
  attends to its own line's letter; -log of that share, averaged over the text tokens of the batch.

- `answer_weight` (the lookup's query): at the same position, head `answer_head` of layer `answer_layer` attends
  to the answer's telling words, those of its written text that no other option has (all of its words when none
  is its own): sibling options ("above <object1>", "below <object1>") differ in one word, often not the last.
- `readout_weight` (what the two heads write): each supervised head's own output (its slice of the attention
  output through its columns of `o_proj`), read by the LLM's final norm and output head as if it were the
  residual, is trained to name the letter: the lookup head's at the letter-predicting position the answer's
  letter, the line head's at every option word its line's letter (cross-entropy over the vocabulary).

The terms are added to the language-model loss; the heads are free otherwise (what the other heads do is left
to the answer loss). The attention probabilities come from eager attention (`output_attentions=True`), which a
stage using this switches the model to while it trains; the heads' outputs from hooks on their layers' `o_proj`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pixelrefer.option_order import LetteredQuestion, OptionTokens


@dataclass(frozen=True)
class LetterAttention:
    """The two auxiliary terms' weights and the (layer, head) each supervises (module docstring). Layers count
    from 0; a negative layer counts from the last, as in Python."""

    weight: float = 0.0
    layer: int = -1
    head: int = 0
    line_weight: float = 0.0
    line_layer: int = 0
    line_head: int = 0
    readout_weight: float = 0.0
    answer_weight: float = 0.0
    answer_layer: int = -2
    answer_head: int = 0

    def check(self, num_layers: int, num_heads: int, where: str = "letter_attention") -> "LetterAttention":
        """Self, or a ValueError naming the field that does not fit a model of that many layers and heads."""
        for name in ("weight", "line_weight", "readout_weight", "answer_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}: {name} must be a non-negative number, got {value!r}")
        if not (self.weight or self.line_weight or self.readout_weight or self.answer_weight):
            raise ValueError(f"{where}: weight, line_weight, readout_weight and answer_weight are all 0: nothing to "
                             "supervise")
        for layer, head, what in ((self.layer, self.head, ""), (self.line_layer, self.line_head, "line_"),
                                  (self.answer_layer, self.answer_head, "answer_")):
            if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
                raise ValueError(f"{where}: {what}layer {layer!r} is not one of the model's {num_layers} layers")
            if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < num_heads:
                raise ValueError(f"{where}: {what}head {head!r} is not one of the model's {num_heads} query heads")
        return self


@dataclass(frozen=True)
class QuestionSpans:
    """Positions of one lettered question in its record: `query` predicts the answer's letter; `right` is the
    [start, stop) of the right option's line; `lines` holds (letter position, text start, text stop) per
    option, in letter order; `telling`, the positions of the answer's telling words written before the query
    (empty for an answer written letter first)."""

    query: int
    right: tuple[int, int]
    lines: tuple[tuple[int, int, int], ...]
    telling: tuple[int, ...] = ()


def letter_offset(tokens: OptionTokens) -> int:
    """Where, in a "(X)" run as the tokenizer writes it, the letter is: the first position at which the runs
    of different letters differ ("B" of "( B )": 1)."""
    runs = tokens.letters
    varying = [k for k in range(len(runs[0])) if len({run[k] for run in runs}) > 1]
    if not varying:
        raise ValueError("the tokenizer writes every option letter's \"(X)\" the same: no letter token to find")
    return varying[0]


def question_spans(question: LetteredQuestion, tokens: OptionTokens, input_ids: Sequence[int] | None = None,
                   labels: Sequence[int] | None = None) -> QuestionSpans:
    """`QuestionSpans` of a question found by `option_order.lettered_questions` in a record of those
    `input_ids` and `labels` (without them, no `telling` positions). The answer's written text is the run of
    supervised tokens just before its "(X)"; when that run ends with the right option's text after steps of its
    own (a worked answer: "<object0> moves at speed 3 and …: <object0> (B)"), just that option text."""
    width, offset = len(tokens.letters[0]), letter_offset(tokens)
    if offset == 0:
        raise ValueError("the option letter is the first token of its \"(X)\" run: no position before it "
                         "predicts it")
    bounds = [*question.markers, question.end]
    lines = tuple((bounds[k] + offset, bounds[k] + width, bounds[k + 1]) for k in range(len(question.markers)))
    right = (bounds[question.answer_index], bounds[question.answer_index + 1])
    telling: tuple[int, ...] = ()
    if input_ids is not None and labels is not None:
        first = question.answer
        while first > 0 and labels[first - 1] != -100:
            first -= 1
        written = range(first, question.answer)
        _, start, stop = lines[question.answer_index]
        option = list(input_ids[start:stop])
        tail = range(question.answer - len(option), question.answer)
        if option and len(written) > len(option) and [input_ids[t] for t in tail] == option:
            written = tail
        others = {input_ids[t] for k, (_, start, stop) in enumerate(lines) if k != question.answer_index
                  for t in range(start, stop)}
        own = tuple(t for t in written if input_ids[t] not in others)
        telling = own or tuple(written)
    return QuestionSpans(question.answer + offset - 1, right, lines, telling)


def letter_attention_loss(attentions: Sequence[Tensor], spans: Sequence[Sequence[QuestionSpans]],
                          spec: LetterAttention, readout: "HeadReadout | None" = None,
                          input_ids: Tensor | None = None) -> Tensor:
    """spec.weight × the lookup term + spec.line_weight × the line term + spec.readout_weight × the readout
    term (module docstring), from the model's per-layer attention probabilities `attentions` ((B, heads, L, L)
    each), the `spans` of each batch row's lettered questions (an empty list for a row without one) and, for the
    readout term, the heads' outputs `readout` caught while the model ran on `input_ids` (B, L). Zero (with a
    gradient path) when the batch holds no lettered question."""
    if spec.readout_weight and (readout is None or input_ids is None):
        raise ValueError("the readout term needs the heads' outputs (HeadReadout) and the batch's input_ids")
    total = attentions[0].sum() * 0.0
    lookup, line, answer, rows, positions = [], [], [], [], []
    for row, questions in enumerate(spans):
        for q in questions:
            if spec.weight:
                share = attentions[spec.layer][row, spec.head, q.query, q.right[0]:q.right[1]].sum()
                lookup.append(-torch.log(share.clamp_min(1e-6)))
            if spec.answer_weight and q.telling:
                share = attentions[spec.answer_layer][row, spec.answer_head, q.query, list(q.telling)].sum()
                answer.append(-torch.log(share.clamp_min(1e-6)))
            if spec.line_weight:
                probs = attentions[spec.line_layer][row, spec.line_head]
                for letter, start, stop in q.lines:
                    line.append(-torch.log(probs[start:stop, letter].clamp_min(1e-6)))
            if spec.readout_weight:
                rows.append((row, q.query, int(input_ids[row, q.query + 1])))
                for letter, start, stop in q.lines:
                    positions += [(row, t, int(input_ids[row, letter])) for t in range(start, stop)]
    if lookup:
        total = total + spec.weight * torch.stack(lookup).mean()
    if line:
        total = total + spec.line_weight * torch.cat(line).mean()
    if answer:
        total = total + spec.answer_weight * torch.stack(answer).mean()
    for which, found in (("lookup", rows), ("line", positions)):
        if found:
            index = torch.tensor(found, device=total.device)
            logits = readout.logits(which, index[:, 0], index[:, 1])
            total = total + spec.readout_weight * torch.nn.functional.cross_entropy(logits.float(), index[:, 2])
    return total


class HeadReadout:
    """Catches the input of the supervised layers' `o_proj` while the model runs (a context manager) and reads
    one head's output through the final norm and output head: `logits("lookup" | "line", rows, positions)`."""

    def __init__(self, model, spec: LetterAttention):
        language = model.model.language_model
        self.model, self.spec, self.layers, self.caught = model, spec, language.layers, {}
        self.heads = {"lookup": (spec.layer, spec.head), "line": (spec.line_layer, spec.line_head)}
        self.hooks = []

    def __enter__(self) -> "HeadReadout":
        for which, (layer, _) in self.heads.items():
            def catch(_module, args, which=which):
                self.caught[which] = args[0]
            self.hooks.append(self.layers[layer].self_attn.o_proj.register_forward_pre_hook(catch))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.caught = [], {}

    def written(self, which: str, rows: Tensor, positions: Tensor) -> Tensor:
        """(N, hidden): what the head adds to the residual at those (row, position) pairs (its share of o_proj's
        output, which has no bias in these models)."""
        layer, head = self.heads[which]
        attention = self.layers[layer].self_attn
        width = attention.head_dim
        own = self.caught[which][rows, positions, head * width:(head + 1) * width]  # (N, head_dim)
        return own @ attention.o_proj.weight[:, head * width:(head + 1) * width].T

    def logits(self, which: str, rows: Tensor, positions: Tensor) -> Tensor:
        """(N, vocabulary): `written` read by the final norm and the output head."""
        return self.model.lm_head(self.model.model.language_model.norm(self.written(which, rows, positions)))


@torch.no_grad()
def attention_shares(model, records: Sequence, tokens: OptionTokens, batch_size: int = 16) -> dict[str, Tensor]:
    """Every head's mean share of attention where `LetterAttention` would want it, on cached `records`
    (`pixelrefer.cached_media.CachedRecord`) with lettered questions: "lookup" (layers, heads), at each answer's
    letter-predicting position, on the right option's line; "line" (layers, heads), at each option word, on its
    line's letter; "readout" (layers, heads), how often the head's own output at the letter-predicting position,
    read by the final norm and output head, names the answer's letter (`HeadReadout`); "questions", how many
    were measured; "answer" (layers, heads), at the letter-predicting position, on the answer's telling words
    (`QuestionSpans.telling`). Runs eager attention for the call."""
    from pixelrefer.cached_media import _eager_attention, cached_embeds, collate_cached
    from pixelrefer.option_order import lettered_questions

    found = [(r, [question_spans(q, tokens, r.input_ids.tolist(), r.labels.tolist()) for q in lettered_questions(
        r.input_ids.tolist(), r.labels.tolist(), tokens, r.attention_mask.tolist())]) for r in records]
    found = [(r, spans) for r, spans in found if spans]
    if not found:
        raise ValueError(f"none of the {len(records)} records has a lettered question to measure")
    pad = model.config.text_config.pad_token_id or 0
    device = next(model.parameters()).device
    lookup, line, named, telling, count, words = 0.0, 0.0, 0.0, 0.0, 0, 0
    language = model.model.language_model
    heads = model.config.text_config.num_attention_heads
    readers = [HeadReadout(model, LetterAttention(layer=layer, head=head)) for layer in range(len(language.layers))
               for head in range(heads)]
    was_training = model.training
    model.eval()
    try:
        with _eager_attention(model, True), contextlib.ExitStack() as stack:
            for reader in readers:
                stack.enter_context(reader)
            for start in range(0, len(found), batch_size):
                chunk = found[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate_cached([r for r, _ in chunk], pad).items()}
                out = model(inputs_embeds=cached_embeds(model, batch), attention_mask=batch["attention_mask"],
                            output_attentions=True)
                probs = torch.stack(out.attentions, 1).float()  # (B, layers, heads, L, L)
                for row, (_, spans) in enumerate(chunk):
                    for q in spans:
                        lookup = lookup + probs[row, :, :, q.query, q.right[0]:q.right[1]].sum(-1)
                        telling = telling + probs[row, :, :, q.query, list(q.telling)].sum(-1)
                        count += 1
                        where = torch.tensor([row], device=device), torch.tensor([q.query], device=device)
                        letter = batch["input_ids"][row, q.query + 1]
                        named = named + torch.tensor([float(reader.logits("lookup", *where)[0].argmax() == letter)
                                                      for reader in readers]).view(-1, heads)
                        for letter, first, stop in q.lines:
                            line = line + probs[row, :, :, first:stop, letter].sum(-1)
                            words += stop - first
    finally:
        model.train(was_training)
    return {"lookup": lookup / count, "line": line / words, "readout": named / count, "answer": telling / count,
            "questions": count}
