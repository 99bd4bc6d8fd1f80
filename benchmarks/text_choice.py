"""How fast the tiny LLM learns VideoRefer-Bench-Q's option-letter answers from text alone, as JSON.

    python benchmarks/text_choice.py [--layers 4] [--steps 2000] [--batch-size 16] [--every 250]
    python benchmarks/text_choice.py --model shapes-tiny|CHECKPOINT [--questions 50]
    python benchmarks/text_choice.py --stage [--max-objects 1] [--steps 2000] [--lr 1e-3] [--save DIR]

The embedded models answer multiple choice at chance: their option text is often right and the letter wrong.
This isolates the letter step. A fresh `tiny`-preset Qwen2 (random weights, the ShapesWorld tokenizer) trains on
text-only questions whose answer is written in the prompt ("it is green. What is the colour of it?",
four lettered colour options, the Bench-Q instruction), loss on the answer only, AdamW 1e-3 with the recipe's
cosine schedule. Every `--every` steps it reports the greedy letter accuracy on 256 fixed held-out questions
(chance 25 %). Prints one JSON document.

With `--model`, it trains nothing: it asks an embedded model or checkpoint `--questions` held-out text-only
questions of each kind of the LLM stage (`pixelrefer.data.text_tasks`: colour, shape, sequential, relationship,
reasoning, future; the answer is stated in the prompt) and reports its letter accuracy per kind and the share of
each predicted letter: whether a model still answers lettered questions when nothing has to be seen.

With `--stage`, it runs the training code's own LLM stage on a fresh `tiny` PixelRefer model and reports the
teacher-forced letter accuracy on 256 held-out questions with one object and with `--max-objects`; `--save DIR`
keeps each measured LLM as `DIR/llm_pretrain/`, which a run with `output_dir=DIR` loads instead of refitting.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, get_cosine_schedule_with_warmup

from pixelrefer.data import shapesworld_vocabulary
from pixelrefer.data.formats import bench_q_prompt
from pixelrefer.data.scenes import COLOURS
from pixelrefer.presets import preset_kwargs
from pixelrefer.tokenizer import build_tokenizer

LETTERS = "ABCD"


def mixed_question(rng: np.random.Generator, max_objects: int = 3) -> tuple[str, str]:
    """A question of the LLM stage (`pixelrefer.data.text_tasks`: six kinds, facts about 1-3 objects)."""
    from pixelrefer.data.text_tasks import text_choice

    user, assistant = text_choice(rng, max_objects=max_objects)
    return f"user : {user['content']}\nassistant : ", assistant["content"]


def question(rng: np.random.Generator) -> tuple[str, str]:
    options = [str(c) for c in rng.choice(list(COLOURS), len(LETTERS), replace=False)]
    target = options[int(rng.integers(len(options)))]
    lettered = [f"({letter}) {text}" for letter, text in zip(LETTERS, options)]
    prompt = bench_q_prompt(f"it is {target} . What is the colour of it ?", lettered)
    return f"user : {prompt}\nassistant : ", lettered[options.index(target)]


def encode(tokenizer, pairs: list[tuple[str, str]], letter_only: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and labels: loss on the whole answer, or with `letter_only` on its letter token alone."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for prompt, answer in pairs:
        asked, answered = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"] + [end]
        labels = [-100] * len(answered)
        labels[1] = answered[1]  # "(", letter, ")", option text, end
        rows.append((asked + answered, [-100] * len(asked) + (labels if letter_only else answered)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return dict(
        input_ids=torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        labels=torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        attention_mask=torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
    )


@torch.no_grad()
def letter_accuracy(model, tokenizer, held_out: list[tuple[str, str]]) -> float:
    """Greedy: the token after "(" must be the answer's letter."""
    model.eval()
    right = 0
    for prompt, answer in held_out:
        ids = torch.tensor([tokenizer(prompt)["input_ids"] + tokenizer("(")["input_ids"]])
        right += tokenizer.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax())) == answer[1]
    model.train()
    return right / len(held_out)


def model_letter_accuracy(name: str, questions: int, seed: int, max_objects: int = 3) -> dict:
    """Letter accuracy of model `name` on `questions` text-only lettered questions per kind (greedy), their facts
    naming up to `max_objects` objects."""
    from collections import Counter

    import pixelrefer
    from pixelrefer.data.sample import SampleInputs
    from pixelrefer.data.text_tasks import KINDS, text_choice
    from pixelrefer.evaluation.choice import predicted_letter, reference_letter
    from pixelrefer.evaluation.models import PixelReferModel

    model, processor = pixelrefer.load(name)
    answer = PixelReferModel(model, processor, max_new_tokens=12)
    rng = np.random.default_rng(20_000 + seed)
    per_kind, letters = {}, Counter()
    for kind in KINDS:
        asked = [text_choice(rng, kind, max_objects=max_objects) for _ in range(questions)]
        predictions = answer([SampleInputs(turns[:1], None, None, []) for turns in asked])
        right = 0
        for turns, prediction in zip(asked, predictions):
            letter = predicted_letter(prediction)
            letters[letter or "none"] += 1
            right += letter == reference_letter(turns[1]["content"])
        per_kind[kind] = right / questions
    total = sum(letters.values())
    return dict(model=name, questions_per_kind=questions, max_objects=max_objects,
                accuracy=sum(per_kind.values()) / len(per_kind),
                per_kind=per_kind, predicted_letters={k: v / total for k, v in sorted(letters.items())})


@torch.no_grad()
def forced_letter_accuracy(model, processor, conversations: list, batch_size: int = 64) -> float:
    """Share of `conversations` whose answer letter is the model's most likely token where it is due (after the
    answer's "(", the true answer before it): greedy decoding's letter once the model writes "(" first."""
    device = next(model.parameters()).device
    model.eval()
    right = 0
    for start in range(0, len(conversations), batch_size):
        batch = processor(text=conversations[start:start + batch_size]).to(device)
        labels = batch["labels"]
        letter = (labels != -100).int().argmax(dim=1) + 1  # the answer is "(", letter, ")", option text, end
        rows = torch.arange(len(labels), device=labels.device)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        right += int((logits[rows, letter - 1].argmax(-1) == labels[rows, letter]).sum())
    model.train()
    return right / len(conversations)


def stage_curve(args) -> dict:
    """Train the LLM stage of a fresh `tiny` PixelRefer model (`pixelrefer.training.pretrain_language_model`, the
    processor's chat template) and measure its letter accuracy every `args.every` steps; with `args.save`, each
    measured state is written as `SAVE/llm_pretrain/` (a training run with that output_dir starts from it)."""
    import warnings
    from pathlib import Path

    import pixelrefer
    from pixelrefer.data.text_tasks import text_choice
    from pixelrefer.training import LLM_PREFIXES, atomic_write_text, pretrain_language_model, save_stage

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="preset .* has random weights")
        model, processor = pixelrefer.load("tiny", framework=args.framework, seed=args.seed)
    model.to(args.device)
    rng = np.random.default_rng(10_000 + args.seed)
    held_out = {k: [text_choice(rng, max_objects=k) for _ in range(256)] for k in sorted({1, args.max_objects})}
    curve, losses, started = [], [], time.perf_counter()

    def measure(step: int, loss: float) -> None:
        losses.append(loss)
        if step % args.every and step != args.steps:
            return
        point = dict(step=step, loss=round(float(np.mean(losses[-args.every:])), 4),
                     seconds=round(time.perf_counter() - started, 1))
        point.update({f"letter_accuracy_{k}_objects": forced_letter_accuracy(model, processor, convs)
                      for k, convs in held_out.items()})
        curve.append(point)
        if args.save:
            save_stage(Path(args.save) / "llm_pretrain", "language_model.safetensors", model, losses, LLM_PREFIXES)
            atomic_write_text(Path(args.save) / "curve.json", json.dumps(curve, indent=1))

    pretrain_language_model(model, processor, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, max_objects=args.max_objects, callback=measure)
    return dict(stage=True, framework=args.framework, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                max_objects=args.max_objects, device=args.device, curve=curve,
                seconds=round(time.perf_counter() - started, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="LLM depth (default: the tiny preset's)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", choices=["answer", "letter"], default="answer",
                        help="loss on the whole answer (as in training) or on its letter token alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions-from", choices=["colour", "llm-stage", "llm-stage-1"], default="colour",
                        help="one-object colour questions, the LLM stage's six kinds, or those with one object "
                             "where the kind allows")
    parser.add_argument("--model", help="measure this embedded model or checkpoint instead of training one")
    parser.add_argument("--questions", type=int, default=50, help="with --model: questions per kind")
    parser.add_argument("--max-objects", type=int, default=3,
                        help="with --model or --stage: objects the facts name, at most")
    parser.add_argument("--stage", action="store_true",
                        help="train the real LLM stage of a fresh tiny PixelRefer model (processor, chat template), "
                             "facts about up to --max-objects objects, and measure it every --every steps")
    parser.add_argument("--framework", choices=["vision_object", "object_only"], default="vision_object")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", help="with --stage: write each measured LLM to SAVE/llm_pretrain/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage:
        torch.manual_seed(args.seed)
        print(json.dumps(stage_curve(args), indent=1))
        return
    if args.model:
        print(json.dumps(model_letter_accuracy(args.model, args.questions, args.seed, args.max_objects), indent=1))
        return
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(shapesworld_vocabulary())
    text = {k: v for k, v in preset_kwargs("tiny")["text_config"].items() if k != "model_type"}
    if args.layers:
        text["num_hidden_layers"] = args.layers
    model = Qwen2ForCausalLM(Qwen2Config(**text))
    rng, held_out_rng = np.random.default_rng(args.seed), np.random.default_rng(10_000 + args.seed)
    make = {"colour": question, "llm-stage": mixed_question,
            "llm-stage-1": functools.partial(mixed_question, max_objects=1)}[args.questions_from]
    held_out = [make(held_out_rng) for _ in range(256)]
    if tokenizer.unk_token_id in encode(tokenizer, held_out)["input_ids"]:
        raise ValueError("a question has a word outside the ShapesWorld vocabulary")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * args.steps), args.steps)
    curve, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(**encode(tokenizer, [make(rng) for _ in range(args.batch_size)], args.loss == "letter")).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.every == 0 or step == args.steps:
            curve.append(dict(step=step, loss=round(loss.item(), 4),
                              letter_accuracy=letter_accuracy(model, tokenizer, held_out)))
    print(json.dumps(dict(questions_from=args.questions_from, layers=text["num_hidden_layers"],
                          hidden_size=text["hidden_size"], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          loss=args.loss, curve=curve,
                          seconds=round(time.perf_counter() - started, 1)), indent=1))


if __name__ == "__main__":
    main()
