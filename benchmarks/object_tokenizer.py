"""Time the batched ObjectTokenizer against the per-object looped reference.

The 2B shape (REFERENCE §9): crop grids of 12–16 cells a side, C = 1152,
D = 1536, K = 32, 5 k-means iterations, ~60 % foreground cells, random
features. Inference timing (eval mode, no autograd). Prints one JSON
document: per object count, the median time of both paths (`*_aggregate`:
stopping before the MLP), of the MLP alone (the same work in both paths, so
a floor for any speed-up), the speed-ups, and the largest difference
between the two paths' tokens.

    python benchmarks/object_tokenizer.py --objects 1,8,32,128 --repeats 5

On a CPU shared with other jobs, `--threads 1` avoids OpenMP threads
stalling on each other and gives steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from pixelrefer.modeling.object_tokenizer import ObjectTokenizer, object_tokenizer_reference

VISION_DIM, LLM_DIM, NUM_TOKENS, ITERATIONS = 1152, 1536, 32, 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--objects", default="1,8,32,128", help="comma-separated object counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--foreground", type=float, default=0.6, help="fraction of foreground cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--skip-reference-above", type=int, default=None,
        help="skip the slow loop above this many objects (default: 32 on CPU, never on CUDA)",
    )
    args = parser.parse_args()
    if args.skip_reference_above is None and not args.device.startswith("cuda"):
        args.skip_reference_above = 32
    return args


def make_inputs(num_objects: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """Packed crop cells of `num_objects` random crops, as the processor would give them."""
    g = torch.Generator().manual_seed(args.seed + num_objects)
    sides = torch.randint(12, 17, (num_objects, 2), generator=g)
    cells_per_object = sides.prod(1)  # (N,)
    P = int(cells_per_object.sum())
    features = torch.randn(P, VISION_DIM, generator=g)
    positions = torch.rand(P, 2, generator=g)
    mask = torch.rand(P, generator=g) < args.foreground
    mask[cells_per_object.cumsum(0) - 1] = True  # every object keeps a foreground cell
    dtype = getattr(torch, args.dtype)
    return (
        features.to(args.device, dtype),
        positions.to(args.device),
        mask.to(args.device),
        cells_per_object,
    )


def median_ms(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, float]:
    """Median wall time of each function in milliseconds.

    The functions take turns within every repeat, so that load from other
    processes on a shared machine hits all of them alike.
    """
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for step in range(args.warmup + args.repeats):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            if step >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {f"{name}_ms": statistics.median(values) for name, values in times.items()}


def run_one(tokenizer: ObjectTokenizer, num_objects: int, args: argparse.Namespace) -> dict:
    inputs = make_inputs(num_objects, args)
    ours = tokenizer(*inputs)
    fns = {
        "ours": lambda: tokenizer(*inputs),
        "ours_aggregate": lambda: tokenizer.aggregate(*inputs),
        # Both paths run the same MLP on the N·K tokens: a floor that batching cannot remove.
        "mlp": lambda: tokenizer.project(ours.aggregated.features),
    }
    row = {"objects": num_objects, "cells": inputs[0].shape[0], "foreground_cells": int(inputs[2].sum())}
    run_reference = args.skip_reference_above is None or num_objects <= args.skip_reference_above
    if run_reference:
        fns["reference"] = lambda: object_tokenizer_reference(tokenizer, *inputs)
        fns["reference_aggregate"] = lambda: object_tokenizer_reference(tokenizer, *inputs, project=False)
    times = median_ms(fns, args)
    if run_reference:
        times["speedup"] = times["reference_ms"] / times["ours_ms"]
        times["aggregate_speedup"] = times["reference_aggregate_ms"] / times["ours_aggregate_ms"]
        expected = object_tokenizer_reference(tokenizer, *inputs)
        row["max_abs_diff"] = max((ours.tokens[n, : t.shape[0]] - t).abs().max().item() for n, t in enumerate(expected))
    return row | {key: round(value, 3) for key, value in times.items()}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = ObjectTokenizer(VISION_DIM, LLM_DIM, NUM_TOKENS, kmeans_iterations=ITERATIONS)
    tokenizer = tokenizer.to(args.device, getattr(torch, args.dtype)).eval()
    with torch.inference_mode():
        results = [run_one(tokenizer, int(n), args) for n in args.objects.split(",")]
    report = {
        "benchmark": "object_tokenizer",
        "torch": torch.__version__,
        "device": args.device,
        "device_name": device_name(args.device),
        "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(),
        "shape": {"vision_dim": VISION_DIM, "llm_dim": LLM_DIM, "num_tokens": NUM_TOKENS,
                  "kmeans_iterations": ITERATIONS, "crop_side": [12, 16], "foreground": args.foreground},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
