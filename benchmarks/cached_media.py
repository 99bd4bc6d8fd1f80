"""What the frozen-media stage saves: a training step with the encoders frozen vs the same step on cached
media tokens, per record, as JSON.

    python benchmarks/cached_media.py --model shapes-tiny-lite [--data runs/eval-shapesworld] [--num-videos N]
        [--records 64] [--batch-size 16] [--repeats 3] [--threads 1] [--device cpu] [--bf16]

Both steps train the LLM alone (`pixelrefer.cached_media.LLM_PREFIXES`) on the same batches of ShapesWorld
video records: "full" runs the whole model (processor included: loading frames and cropping every object is
part of a step), "cached" the LLM on the embeddings `cache_media` keeps; "cache" is the one-off cost of
caching a record. Losses of the two are reported side by side (equal up to float rounding). `--bf16` also
times the cached step under bf16 autocast (`MediaStage.mixed_precision`; fast on CPUs with AMX) and reports
how far its losses are from float32's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pixelrefer
from pixelrefer.cached_media import LLM_PREFIXES, cache_media, cached_loss, collate_cached
from pixelrefer.data import load_annotations
from pixelrefer.evaluation.runners import add_split_arguments, split_from_arguments


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-tiny-lite")
    add_split_arguments(parser)
    parser.add_argument("--records", type=int, default=64, help="video records timed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the records for each kind of step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time the cached step under bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = pixelrefer.load(args.model, device=args.device)
    test_file = split_from_arguments(args)
    samples = [s for s in load_annotations(test_file, test_file.parent) if s.is_video][: args.records]
    if len(samples) < args.batch_size:
        raise SystemExit(f"{test_file}: {len(samples)} video records, fewer than one batch of {args.batch_size}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(LLM_PREFIXES))
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples) - args.batch_size + 1, args.batch_size)]
    timed = sum(len(b) for b in batches) * args.repeats

    started = time.perf_counter()
    cached = cache_media(model, processor, samples, progress=False)
    cache_seconds = (time.perf_counter() - started) / len(samples)
    by_id = {id(s): r for s, r in zip(samples, cached)}
    pad = model.config.text_config.pad_token_id or 0

    model.train()
    full_losses = []
    _sync(args.device)
    started = time.perf_counter()
    for _ in range(args.repeats):
        for batch in batches:
            text, images, videos, masks = (list(c) for c in zip(*(s.load_media() for s in batch)))
            inputs = processor(text=text, images=images, videos=videos, masks=masks).to(args.device)
            loss = model(**inputs).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            full_losses.append(loss.item())
    _sync(args.device)
    full_seconds = (time.perf_counter() - started) / timed
    cached_seconds, cached_losses = _cached_steps(model, batches, by_id, pad, args)
    timings = {"full_step": round(full_seconds, 4), "cached_step": round(cached_seconds / timed, 4)}
    extra = {}
    if args.bf16:
        bf16_seconds, bf16_losses = _cached_steps(model, batches, by_id, pad, args, torch.bfloat16)
        timings["cached_step_bf16"] = round(bf16_seconds / timed, 4)
        extra = {"bf16_speedup_over_cached": round(cached_seconds / bf16_seconds, 2),
                 "bf16_max_loss_difference": max(abs(a - b) for a, b in zip(cached_losses, bf16_losses))}
    print(json.dumps({
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(), "records": len(samples),
        "batch_size": args.batch_size, "seconds_per_record": {**timings, "cache_once": round(cache_seconds, 4)},
        "speedup": round(full_seconds * timed / cached_seconds, 2),
        "max_loss_difference": max(abs(a - b) for a, b in zip(full_losses, cached_losses)), **extra,
    }, indent=2))


def _cached_steps(model, batches, by_id, pad, args, dtype=None) -> tuple[float, list[float]]:
    """Seconds and losses of forward + backward on the cached batches, `args.repeats` times (autocast to
    `dtype` when given)."""
    autocast = torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)
    losses = []
    _sync(args.device)
    started = time.perf_counter()
    for _ in range(args.repeats):
        for batch in batches:
            collated = collate_cached([by_id[id(s)] for s in batch], pad)
            with autocast:
                loss = cached_loss(model, {k: v.to(args.device) for k, v in collated.items()})
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
    _sync(args.device)
    return time.perf_counter() - started, losses


if __name__ == "__main__":
    main()
