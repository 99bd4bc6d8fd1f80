"""Per-item inference time, peak memory and LLM FLOPs of both frameworks (paper Tables 5–6 protocol).

Prints one JSON document. Each framework runs in its own process, so the CPU
peak-RSS figures do not include the other model. On a GPU:

    python benchmarks/efficiency.py --model 2b --device cuda --dtype bfloat16 --items 12

Items are ShapesWorld image records (regions and questions of the dataset),
generated into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch


def measure(args) -> dict:
    import pixelrefer
    from pixelrefer.analysis.profiling import profile_inference
    from pixelrefer.data import generate_shapesworld, load_annotations

    warnings.simplefilter("ignore", UserWarning)
    overrides = {"framework": args.framework} if args.model in pixelrefer.preset_names() else {}
    model, processor = pixelrefer.load(args.model, device=args.device, dtype=getattr(torch, args.dtype), **overrides)
    with tempfile.TemporaryDirectory() as root:
        generate_shapesworld(root, seed=args.seed, num_images=max(args.items * 2, 10), num_videos=1)
        records = [s for split in ("train", "val", "test") for s in load_annotations(Path(root) / f"{split}.json", root)]
        items = []
        for sample in [s for s in records if s.image is not None][: args.items + 1]:
            text, image, video, masks = sample.load_media()
            first_answer = next(i for i, t in enumerate(text) if t["role"] == "assistant")
            used = sum(t["content"].count("<region>") for t in text[:first_answer])
            items.append((text[:first_answer], image, video, masks[:used]))
        profile = profile_inference(model, processor, items, max_new_tokens=args.max_new_tokens, warmup=1)
    return profile.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset, embedded model or checkpoint folder")
    parser.add_argument("--framework", choices=["vision_object", "object_only"], help="one framework (presets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.framework:
        print(json.dumps(measure(args)))
        return
    results = []
    for framework in ("vision_object", "object_only"):
        command = [sys.executable, __file__, "--framework", framework] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "framework" and v is not None]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = dict(benchmark="efficiency", model=args.model, device=args.device, dtype=args.dtype,
                  torch=torch.__version__, results=results)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
