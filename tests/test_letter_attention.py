"""The auxiliary attention loss on where an option-first answer's letter is read."""

import math

import numpy as np
import pytest
import torch

from pixelrefer.cached_media import (cache_media, cached_embeds, collate_cached, media_token_ids,
                                     train_on_cached_media)
from pixelrefer.data.text_tasks import text_choice_records
from pixelrefer.letter_attention import (HeadReadout, LetterAttention, QuestionSpans, attention_shares,
                                         letter_attention_loss, letter_offset, question_spans)
from pixelrefer.option_order import OptionTokens, lettered_questions
from tests.conftest import FRAMEWORKS, build
from tests.test_option_order import lettered_samples


def decoded(tokenizer, ids):
    return tokenizer.decode(ids).replace(" ", "")


@pytest.mark.parametrize("option_first", [False, True])
def test_spans_name_the_letter_position_the_right_line_and_each_line_letter(option_first, tmp_path):
    model, processor = build("object_only")
    samples, _ = lettered_samples(tmp_path, option_first)
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    assert letter_offset(tokens) == 1  # "( B )"
    records = cache_media(model, processor, samples, progress=False)
    tok = processor.tokenizer
    checked = telling_checked = 0
    for sample, record in zip(samples, records):
        ids = record.input_ids.tolist()
        found = lettered_questions(ids, record.labels.tolist(), tokens, record.attention_mask.tolist())
        turns = [t["content"] for t in sample.load_media()[0] if t["role"] == "assistant"]
        for question, answer in zip(found, turns):
            spans = question_spans(question, tokens, ids, record.labels.tolist())
            assert question_spans(question, tokens).telling == ()
            letter = ids[spans.query + 1]
            assert ids[spans.query] == tok.convert_tokens_to_ids("(") and record.labels[spans.query + 1] == letter
            assert f"({tok.convert_ids_to_tokens(letter)})" in answer
            right = decoded(tok, ids[spans.right[0]:spans.right[1]])
            assert right.startswith(f"({tok.convert_ids_to_tokens(letter)})"), sample.where
            text = answer.replace(f"({tok.convert_ids_to_tokens(letter)})", "").replace(" ", "")
            assert right[3:] == text, (sample.where, right, answer)
            assert [tok.convert_ids_to_tokens(ids[p]) for p, _, _ in spans.lines] == list("ABCDE"[:len(spans.lines)])
            for (p, first, stop), following in zip(spans.lines, [*spans.lines[1:], None]):
                assert first == p + 2 and stop > first
                assert following is None or stop == following[0] - 1
            if not option_first:
                assert spans.telling == (), "nothing is written before a letter-first answer's letter"
            else:
                written = [t for t in range(spans.query - 20, spans.query) if record.labels[t] != -100]
                others = {ids[t] for p, first, stop in spans.lines if p - 1 != spans.right[0]
                          for t in range(first, stop)}
                own = [t for t in written if ids[t] not in others]
                assert list(spans.telling) == (own or written) and spans.telling, (sample.where, answer)
                assert decoded(tok, [ids[t] for t in written]) == text
                telling_checked += bool(own)
            checked += 1
    assert checked >= 5 and (telling_checked >= 3 or not option_first)


def test_a_worked_answers_telling_words_are_in_its_option_text_and_its_options_deal_anew(tmp_path):
    """A Reasoning answer that states speeds first ("<object0> moves at speed 3 and <object1> does not move:
    <object0> (B)", ShapesWorld's speed_steps): the telling words are the option text at its end, not the steps;
    dealing its options anew moves the letter and keeps the steps."""
    from pixelrefer.data import generate_shapesworld, load_annotations
    from pixelrefer.option_order import shuffle_options

    model, processor = build("object_only")
    paths = generate_shapesworld(tmp_path, seed=5, num_images=1, num_videos=8, splits=(1.0, 0.0, 0.0),
                                 option_first=True, speed_steps=True)
    samples = [s for s in load_annotations(paths["train"], tmp_path) if s.meta.get("type") == "Reasoning"][:3]
    assert len(samples) == 3
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    tok = processor.tokenizer
    rng = np.random.default_rng(0)
    for sample, record in zip(samples, cache_media(model, processor, samples, progress=False)):
        ids, labels = record.input_ids.tolist(), record.labels.tolist()
        (question,) = lettered_questions(ids, labels, tokens, record.attention_mask.tolist())
        spans = question_spans(question, tokens, ids, labels)
        steps, text = sample.meta["Answer"].rsplit(": ", 1)
        colon = max(t for t in range(spans.query) if ids[t] == tok.convert_tokens_to_ids(":"))
        assert spans.telling and min(spans.telling) > colon, sample.where
        assert decoded(tok, ids[colon + 1:spans.query]) == text[:-4].replace(" ", ""), sample.where
        dealt = shuffle_options(record, tokens, rng, [question])
        answered = dealt.labels != -100
        written = decoded(tok, dealt.input_ids[answered].tolist())
        assert written.startswith(steps.replace(" ", "")), (sample.where, written)
        (moved,) = lettered_questions(dealt.input_ids.tolist(), dealt.labels.tolist(), tokens)
        right = decoded(tok, dealt.input_ids[moved.markers[moved.answer_index]:].tolist())
        assert right.startswith(f"({tok.convert_ids_to_tokens(int(dealt.input_ids[moved.answer + 1]))})"
                                + text[:-4].replace(" ", "")), (sample.where, right)


def test_the_loss_is_minus_log_of_the_supervised_shares():
    layers, heads, length = 3, 2, 12
    torch.manual_seed(0)
    attentions = [torch.softmax(torch.randn(2, heads, length, length), -1) for _ in range(layers)]
    spans = [[QuestionSpans(query=10, right=(4, 7), lines=((2, 3, 5), (6, 7, 9)), telling=(8, 9))], []]
    spec = LetterAttention(weight=0.5, layer=-1, head=1, line_weight=2.0, line_layer=0, line_head=0,
                           answer_weight=3.0, answer_layer=1, answer_head=0)
    lookup = -math.log(attentions[2][0, 1, 10, 4:7].sum().item())
    line = [-math.log(attentions[0][0, 0, t, letter].item()) for letter, first, stop in ((2, 3, 5), (6, 7, 9))
            for t in range(first, stop)]
    answer = -math.log(attentions[1][0, 0, 10, 8].item() + attentions[1][0, 0, 10, 9].item())
    expected = 0.5 * lookup + 2.0 * sum(line) / len(line) + 3.0 * answer
    assert letter_attention_loss(attentions, spans, spec).item() == pytest.approx(expected, rel=1e-6)
    only_lookup = LetterAttention(weight=1.0, layer=2, head=1)
    assert letter_attention_loss(attentions, spans, only_lookup).item() == pytest.approx(lookup, rel=1e-6)
    empty = letter_attention_loss(attentions, [[], []], spec)
    assert empty.item() == 0.0


def test_the_heads_outputs_add_up_to_the_layer_output_and_read_as_logits():
    model, processor = build("object_only")
    records = cache_media(model, processor, text_choice_records(3, seed=2, option_first=True), progress=False)
    batch = collate_cached(records, model.config.text_config.pad_token_id or 0)
    layer = model.model.language_model.layers[1].self_attn
    outputs = []
    hook = layer.o_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    length = batch["input_ids"].shape[1]
    rows, positions = torch.arange(3).repeat_interleave(length), torch.arange(length).repeat(3)
    with torch.no_grad():
        written = []
        for head in range(4):
            with HeadReadout(model, LetterAttention(layer=1, head=head)) as readout:
                model(inputs_embeds=cached_embeds(model, batch), attention_mask=batch["attention_mask"])
                written.append(readout.written("lookup", rows, positions))
                if head == 2:
                    logits = readout.logits("lookup", rows[:5], positions[:5])
                    expected = model.lm_head(model.model.language_model.norm(written[-1][:5]))
        hook.remove()
    assert torch.allclose(sum(written), outputs[-1][rows, positions], atol=1e-5)
    assert torch.allclose(logits, expected, atol=1e-5) and logits.shape == (5, model.config.text_config.vocab_size)
    assert not readout.hooks, "the hooks go when the block ends"


@pytest.mark.parametrize("spec, message", [
    (LetterAttention(), "weight, line_weight, readout_weight and answer_weight are all 0"),
    (LetterAttention(answer_weight=1.0, answer_head=-1), "answer_head -1 is not one of the model's 4 query heads"),
    (LetterAttention(weight=-1.0), "weight must be a non-negative number"),
    (LetterAttention(weight=1.0, layer=4), "layer 4 is not one of the model's 4 layers"),
    (LetterAttention(weight=1.0, layer=-5), "layer -5 is not one of the model's 4 layers"),
    (LetterAttention(line_weight=1.0, line_head=4), "line_head 4 is not one of the model's 4 query heads"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.check(num_layers=4, num_heads=4)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_moves_the_supervised_heads_onto_the_right_line_and_letter(framework):
    model, processor = build(framework)
    own = model.config._attn_implementation
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    records = cache_media(model, processor, text_choice_records(48, seed=4, option_first=True), progress=False)
    spec = LetterAttention(weight=1.0, layer=-1, head=1, line_weight=1.0, line_layer=0, line_head=0,
                           readout_weight=1.0, answer_weight=1.0, answer_layer=0, answer_head=2)
    before = attention_shares(model, records, tokens)
    assert before["questions"] == 48 and before["lookup"].shape == (2, 4) == before["line"].shape
    losses = train_on_cached_media(model, records, steps=100, lr=3e-3, batch_size=8, option_tokens=tokens,
                                   letter_tokens=tokens, letter_attention=spec)
    after = attention_shares(model, records, tokens)
    assert np.isfinite(losses).all() and model.config._attn_implementation == own, "its own attention again"
    for name, layer, head in (("lookup", -1, 1), ("line", 0, 0), ("answer", 0, 2)):
        supervised, others = after[name][layer, head], after[name][layer][torch.arange(4) != head]
        assert supervised > 3 * before[name][layer, head] and supervised > 2 * others.max(), (name, after[name])
    assert before["readout"].max() < 0.1 and after["readout"][-1, 1] > 0.2, (before["readout"], after["readout"])
    unsupervised = attention_shares(build(framework)[0], records, tokens)
    assert torch.equal(unsupervised["lookup"], before["lookup"]), "measuring changes nothing"


def test_training_without_lettered_questions_or_letters_is_refused(tmp_path):
    model, processor = build("object_only")
    _, plain = lettered_samples(tmp_path, option_first=True)
    tokens = OptionTokens.of(processor.tokenizer, media_token_ids(model.config))
    records = cache_media(model, processor, plain, progress=False)
    spec = LetterAttention(weight=1.0)
    with pytest.raises(ValueError, match="letter_attention: none of the 1 records has a lettered question"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=1, letter_tokens=tokens,
                              letter_attention=spec)
    with pytest.raises(ValueError, match="letter_attention need the answer letters"):
        train_on_cached_media(model, records, steps=1, lr=1e-3, batch_size=1, letter_attention=spec)
    with pytest.raises(ValueError, match="layer 7 is not one of the model's 2 layers"):
        train_on_cached_media(model, cache_media(model, processor, text_choice_records(2, seed=1), progress=False),
                              steps=1, lr=1e-3, batch_size=1, letter_tokens=tokens,
                              letter_attention=LetterAttention(weight=1.0, layer=7))


@pytest.mark.parametrize("spec, message", [
    (dict(weight=1.0, heads=2), "letter_attention must be a dict of"),
    ("yes", "letter_attention must be a dict of"),
    (dict(weight=0, line_weight=0), "letter_attention: weight, line_weight, readout_weight and answer_weight are"),
    (dict(line_weight=-0.5), "letter_attention: line_weight must be a non-negative number"),
])
def test_bad_stage_letter_attention_is_named(spec, message):
    from pixelrefer.training import MediaStage

    with pytest.raises(ValueError, match=rf"media_stages\[0\].*{message}"):
        MediaStage.parse(dict(steps=1, letter_attention=spec), 0)
