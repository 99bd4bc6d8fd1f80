"""Where an option-first model's letters come from: its written text or the video. ShapesWorld, as JSON.

    python benchmarks/letter_lookup.py --model shapes-tiny-lite --data runs/eval-sw5e --num-videos 600
        --image-choice --location --short-answers [--split val] [--limit 100] [--threads 2]

Every held-out video multiple-choice question is asked once per option, that option's text teacher-forced as
the answer ("above <object1> (" ...), and the letter the model writes next is read
(`pixelrefer.analysis.letters`). Per question type: `right_text.letter`, the letter accuracy given the right text
(an upper bound on what a perfect written answer scores); under a wrong text, the share of letters that are that
text's (`text`: a lookup), the right answer's (`media`) or another option's (`other`); and the commonest
confusions under the right text. For models that write lettered answers option first (both embedded ones).
`--split val` reads the validation split of the same folder (model selection), `test` (default) the held-out one.
`--attention` adds, per layer and head, the mean share of attention at the letter-predicting position on the
right option's line (`lookup`) and at each option word on its line's letter (`line`), and how often the head's
own output there, read by the output head, names the answer's letter (`readout`), the right text forced
(`pixelrefer.letter_attention.attention_shares`: what a stage's `letter_attention` supervises).
`--answer-words` forces each option as a model trained on ShapesWorld's `answer_words` writes it ("above (").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pixelrefer
from pixelrefer.analysis.letters import forced_letters, forced_variants, letter_sources
from pixelrefer.cached_media import cache_media, media_token_ids
from pixelrefer.data import load_annotations
from pixelrefer.data.tasks import SHORT_ANSWER_WORDS
from pixelrefer.evaluation.runners import add_split_arguments, split_from_arguments
from pixelrefer.letter_attention import attention_shares
from pixelrefer.option_order import OptionTokens


def right_text_attention(model, processor, questions, written=None) -> dict:
    """Per layer, each head's `attention_shares` on the questions answered with their right text, option first."""
    variants, info = forced_variants(questions, written)
    right = [v for v, i in zip(variants, info) if i["forced"] == i["truth"]]
    records = cache_media(model, processor, right, progress=False)
    shares = attention_shares(model, records, OptionTokens.of(processor.tokenizer, media_token_ids(model.config)))
    return {name: [[round(float(x), 3) for x in layer] for layer in shares[name]]
            for name in ("lookup", "line", "readout", "answer")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-tiny-lite")
    add_split_arguments(parser)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--limit", type=int, default=None, help="the first N multiple-choice questions")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None, help="where the model runs (cuda on a GPU machine)")
    parser.add_argument("--answer-words", action="store_true",
                        help="force each option as a model trained on ShapesWorld's answer_words writes it: the one "
                             "word only that option holds where it has one ('above (')")
    parser.add_argument("--attention", action="store_true",
                        help="each head's attention share on the right line and on each line's letter")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, processor = pixelrefer.load(args.model, device=args.device)
    root = split_from_arguments(args).parent
    questions = [s for s in load_annotations(root / f"{args.split}.json", root) if s.task == "multiple_choice"]
    questions = questions[: args.limit]
    written = (lambda text: SHORT_ANSWER_WORDS.get(text, text)) if args.answer_words else None
    rows = forced_letters(model, processor, questions, written=written)
    report = {"model": args.model, "split": args.split, "questions": len(questions), **letter_sources(rows),
              "seconds": round(time.perf_counter() - started, 1)}
    if args.attention:
        report["attention"] = right_text_attention(model, processor, questions, written)
        report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
