"""Do a model's per-frame object tokens carry motion, and how loudly? ShapesWorld video tracks, as JSON.

    python benchmarks/motion_readout.py --model shapes-tiny-lite [--data runs/eval-shapesworld]
        [--train-records 200] [--ridge 1.0] [--stage tokens|pre_mlp|centroids]

Each object of each video-caption record is encoded alone; a ridge regression from a unit's mean object token
to its mask centroid, fitted on the first `--train-records` train records, turns every test track into a
trajectory whose straight-line fit names a motion (`pixelrefer.analysis.probe.motion_readout`). "centres" is
that rule on the true centroids; "location_share" how much of the tokens' raw variance location explains
(overall and within tracks). Compare "tokens" with `video_caption_words.motion` of
`benchmarks/shapesworld_accuracy.py`: high here and at chance there means the LLM does not read the motion its
tokens carry. The split is the one the shipped models were trained beside. `--stage pre_mlp` reads the features
entering the object MLP instead (after OCI in Lite), `--stage centroids` the k-means centroids: where along
the object path location is lost.
"""

from __future__ import annotations

import json
import time

from pixelrefer.analysis.probe import TRACK_STAGES, motion_readout, track_features
from pixelrefer.evaluation.runners import model_and_task_records, probe_parser


def main() -> None:
    parser = probe_parser(__doc__.splitlines()[0], model="shapes-tiny-lite", train_records=200)
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--stage", choices=TRACK_STAGES, default="tokens")
    args = parser.parse_args()
    model, processor, videos = model_and_task_records(args, "video_caption")
    started = time.perf_counter()
    fitted = track_features(model, processor, videos["train"][: args.train_records], stage=args.stage)
    scored = track_features(model, processor, videos["test"], stage=args.stage)
    report = {"model": args.model, "stage": args.stage, "train_tracks": len(fitted.motions), **motion_readout(fitted, scored, ridge=args.ridge),
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
