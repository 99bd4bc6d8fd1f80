"""Does the LLM compute the motion its object tokens carry? Per-layer linear probes, as JSON.

    python benchmarks/llm_readout.py --model shapes-tiny-lite [--data runs/eval-shapesworld]
        [--train-records 300] [--prefix "the {colour} {category}"] [--attributes motion speed]

Each labelled object of ShapesWorld's video-caption records (without an appear / disappear event) is alone in
"What does <region> do?", its answer teacher-forced to `--prefix`: `pixelrefer.analysis.probe.llm_track_states`
reads the LLM's hidden state there (where the motion is the next word) after every layer, layer 0 being the
input embeddings, and a linear probe per layer, fitted on the first `--train-records` train records' objects,
names each test object's attribute. "next_word" is how often the model's own next word there is right for the
motion ("stays" for still objects, "moves" for the others), "majority" the share of the commonest value.
Compare with `benchmarks/motion_readout.py` (the tokens carry motion) and `video_caption_words.motion` of
`benchmarks/shapesworld_accuracy.py` (the captions name it).
"""

from __future__ import annotations

import json
import time

import torch

from pixelrefer.analysis.probe import layer_probes, llm_track_states
from pixelrefer.evaluation.runners import model_and_task_records, probe_parser


def main() -> None:
    parser = probe_parser(__doc__.splitlines()[0], model="shapes-tiny-lite", train_records=300)
    parser.add_argument("--prefix", default="the {colour} {category}")
    parser.add_argument("--attributes", nargs="+", default=["motion", "speed"])
    args = parser.parse_args()
    model, processor, videos = model_and_task_records(args, "video_caption")
    started = time.perf_counter()
    fitted = llm_track_states(model, processor, videos["train"][: args.train_records], prefix=args.prefix)
    scored = llm_track_states(model, processor, videos["test"], prefix=args.prefix)
    report = {"model": args.model, "prefix": args.prefix, "train_objects": len(fitted[1]),
              "test_objects": len(scored[1]), "layers": list(range(scored[0].shape[0]))}
    for attribute in args.attributes:
        values = [str(o[attribute]) for o in scored[1]]
        report[attribute] = {"per_layer": [round(a, 3) for a in layer_probes(fitted, scored, attribute)],
                             "majority": round(max(map(values.count, set(values))) / len(values), 3)}
    if args.prefix:
        with torch.no_grad():
            words = model.lm_head(scored[0][-1].to(model.lm_head.weight.dtype)).argmax(-1)
        said = [processor.tokenizer.convert_ids_to_tokens(int(i)) for i in words]
        right = [w == ("stays" if o["motion"] == "still" else "moves") for w, o in zip(said, scored[1])]
        report["next_word"] = round(sum(right) / len(right), 3)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
