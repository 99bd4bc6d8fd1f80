"""Linear probes of a model's object features (vision encoder or object tokens) on ShapesWorld objects, as JSON.

    python benchmarks/vision_probe.py --model shapes-tiny [--stage encoder|tokens] [--encoder PATH.safetensors]
        [--data runs/eval-shapesworld]

Object features are the mean of each object's foreground crop cells (`--stage encoder`, what stage 0 trains) or
of its object tokens after the object MLP (`--stage tokens`, what the LLM reads); the probe is fitted
on the first `--train-records` labelled train records and scored on the labelled val records
(`pixelrefer.analysis.probe`); `variance_share` is the share of the val features' variance an attribute's
class means explain. `--encoder` scores a stage-0 encoder file (`<output_dir>/vision_pretrain/
vision_encoder.safetensors`) in the model's place. The split is the one the shipped models were trained beside.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from safetensors.torch import load_file

import pixelrefer
from pixelrefer.analysis.probe import STAGES, linear_probe, object_features, variance_share
from pixelrefer.data import load_annotations
from pixelrefer.evaluation.runners import probe_parser, split_from_arguments


def main() -> None:
    parser = probe_parser(__doc__.splitlines()[0], model="shapes-tiny", train_records=1200)
    parser.add_argument("--encoder", default=None, help="a vision_encoder.safetensors to load into the model")
    parser.add_argument("--stage", default="encoder", choices=STAGES, help="where to read object features")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = pixelrefer.load(args.model)
    if args.encoder:
        model.model.vision_model.load_state_dict(load_file(args.encoder))
    root = split_from_arguments(args).parent
    train = [s for s in load_annotations(root / "train.json", root) if s.task == "category"][: args.train_records]
    val = [s for s in load_annotations(root / "val.json", root) if s.task == "category"]
    started = time.perf_counter()
    fitted = object_features(model, processor, train, stage=args.stage)
    scored = object_features(model, processor, val, stage=args.stage)
    report = {"model": args.model, "encoder": args.encoder, "stage": args.stage, "train_objects": len(fitted[1]),
              "val_objects": len(scored[1])}
    for attribute in ("category", "colour"):
        report[attribute] = dataclasses.asdict(linear_probe(fitted, scored, attribute))
        report[attribute]["variance_share"] = variance_share(*scored, attribute)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
