"""Linear probes of a model's object features: how well they name category and colour, and how loudly.

Notable:
- Two places to read: stage "encoder", the mean of an object's foreground
  crop cells (`pixelrefer.training.pooled_object_features`), the quantity
  stage 0 trains on; stage "tokens", the mean of its object tokens after the
  object MLP (after OCI in Lite), what the LLM reads. Comparing the two shows
  where a signal gets quiet. The probe is one linear layer on standardised
  features, fitted with full-batch Adam on one set of records and scored on
  another.
- Accuracy is per object, overall and per ShapesWorld size (tiny, small,
  medium, large; objects without a size, such as composites, count as
  "unsized"). It measures what is linearly readable, not what the LLM reads:
  standardising hides how quiet a signal is, which `variance_share` shows.
- `object_centres` and `location_r2`: whether the features know where their
  object is. A ridge regression from an object's features to its mask
  centroid (x, y in [0, 1] of the image), fitted on one set and scored as R²
  on another: near 1 the features locate the object, at or below 0 they
  carry no location. Relations, motion and the video questions about them
  need it (README, "Object tokens that know where").
- `track_features` and `motion_readout`: the same question over time. Per
  (object, frame) of video records, the mean object token and the mask
  centroid; a ridge regression token → centroid fitted on one set of tracks
  turns each test track into a trajectory, and its straight-line fit names a
  motion (left, right, up, down, still) the way ShapesWorld does. Read from
  the true centroids the rule is near exact, so a low score from the tokens
  means the tokens do not carry motion, and a high one beside a model that
  cannot caption motion means its LLM does not read it.
- `location_share`: how loud location is, the part of the features' raw
  variance a linear function of the centroid explains; with `groups` (a
  track per unit) only the variance within each track, where motion lives.
  A readout can be near exact while the share is a few percent: standardised
  regressions hear quiet directions that the LLM's dot products do not.
- `llm_track_states` and `layer_probes`: does the LLM compute what its
  tokens carry? Each labelled video object alone in the caption prompt, its
  answer teacher-forced up to the motion ("the red square"): the hidden state
  there after every LLM layer (0: the input embeddings), the state whose next
  word is the motion. A linear probe per layer of its motion (or speed): high
  at the last layer beside a model whose captions miss the motion means the
  readout is lost on the way out; chance at every layer, that the LLM never
  gathers it from the object tokens.
- `variance_share` is the fraction of the features' total variance that an
  attribute's class means explain (R²): linear readability says a signal is
  there, its share says how loud it is next to the others.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from pixelrefer.training import labelled_objects, pooled_object_features


@dataclass
class ProbeResult:
    attribute: str
    accuracy: float
    per_size: dict[str, float]
    objects: int
    classes: int


STAGES = ("encoder", "tokens")


def object_token_means(model, processor, samples: Sequence) -> torch.Tensor:
    """(objects, D) mean of each object's valid object tokens, object after object of `samples` (image
    records): the object MLP's output (after OCI in Lite), which is what the LLM reads."""
    device = next(model.parameters()).device
    loaded = [sample.load_media() for sample in samples]
    prompts = [[{"role": "user", "content": "<image>\n" + "<region>" * len(masks)}] for _, _, _, masks in loaded]
    encoded = processor(text=prompts, images=[image for _, image, _, _ in loaded],
                        masks=[masks for _, _, _, masks in loaded])
    regions = {k: v.to(device) for k, v in encoded.items() if k.startswith("region_") and torch.is_tensor(v)}
    out = model.get_object_features(**regions)
    valid = out.valid.to(out.tokens.dtype)[..., None]
    return ((out.tokens * valid).sum(1) / valid.sum(1).clamp(min=1)).float()


@torch.no_grad()
def object_features(model, processor, samples: Sequence, *, batch_size: int = 16, stage: str = "encoder"
                    ) -> tuple[torch.Tensor, list[dict]]:
    """Per-object features of every labelled image record, and each object's labels.

    `stage`: "encoder", the mean foreground crop-cell features of the vision encoder (C wide: what stage 0
    trains); "tokens", the mean of the object's tokens after the object MLP (D wide: what the LLM reads).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    chosen, _ = labelled_objects(samples)
    if not chosen:
        raise ValueError("no image record whose objects carry categories (ShapesWorld `objects` labels)")
    pool = pooled_object_features if stage == "encoder" else object_token_means
    was_training = model.training
    model.eval()
    features, labels = [], []
    for start in range(0, len(chosen), batch_size):
        items = [samples[i] for i in chosen[start : start + batch_size]]
        features.append(pool(model, processor, items).cpu())
        labels += [o for item in items for o in item.meta["objects"]]
    model.train(was_training)
    return torch.cat(features), labels


def linear_probe(train: tuple[torch.Tensor, list[dict]], test: tuple[torch.Tensor, list[dict]], attribute: str,
                 *, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> ProbeResult:
    """Fit a linear classifier of `attribute` on `train` (features, labels) and score it on `test`.

    Test objects whose value never occurs in training count as wrong.
    """
    (x, y_labels), (x_test, test_labels) = train, test
    values = sorted({o[attribute] for o in y_labels})
    y = torch.tensor([values.index(o[attribute]) for o in y_labels])
    y_test = torch.tensor([values.index(o[attribute]) if o[attribute] in values else -1 for o in test_labels])
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], len(values))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        hits = (head(x_test).argmax(1) == y_test).float().tolist()
    by_size = defaultdict(list)
    for obj, hit in zip(test_labels, hits):
        by_size[obj.get("size") or "unsized"].append(hit)
    return ProbeResult(attribute, sum(hits) / len(hits), {k: sum(v) / len(v) for k, v in sorted(by_size.items())},
                       len(hits), len(values))


def object_centres(samples: Sequence) -> torch.Tensor:
    """(objects, 2) mask centroid (x, y), as fractions of the image's width and height, of every object of
    the labelled image records of `samples`, in the order of `object_features`."""
    chosen, _ = labelled_objects(samples)
    centres = []
    for i in chosen:
        _, image, _, masks = samples[i].load_media()
        for k, mask in enumerate(masks):
            rows, cols = torch.as_tensor(mask).squeeze().nonzero(as_tuple=True)
            if rows.numel() == 0:
                raise ValueError(f"{getattr(samples[i], 'where', f'sample {i}')}: mask {k} is empty")
            centres.append([(cols.double().mean() + 0.5) / image.width, (rows.double().mean() + 0.5) / image.height])
    return torch.tensor(centres, dtype=torch.float64)


def location_r2(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                *, ridge: float = 1.0) -> float:
    """R² on `test` of a ridge regression from features to centres fitted on `train` ((features, centres)
    pairs; features standardised with the training statistics). 1: exact; 0 or less: no location."""
    (x, y), (x_test, y_test) = train, test
    if x.shape[0] != y.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ValueError(f"features and centres differ in count: train {x.shape[0]} vs {y.shape[0]}, "
                         f"test {x_test.shape[0]} vs {y_test.shape[0]}")
    x, x_test, y, y_test = x.double(), x_test.double(), y.double(), y_test.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    offset = y.mean(0)
    weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (y - offset))
    residual = ((x_test @ weights + offset - y_test) ** 2).sum()
    return float(1 - residual / ((y_test - y_test.mean(0)) ** 2).sum())


TRACK_STAGES = ("tokens", "pre_mlp", "centroids")


@dataclass
class TrackFeatures:
    """Per (object, frame) unit of some video records: its mean object token, its mask centroid (x, y as
    fractions of the frame), the track it belongs to and its frame; per track, its labelled motion."""

    features: torch.Tensor  # (units, D)
    centres: torch.Tensor  # (units, 2) float64
    track: torch.Tensor  # (units,) long, index into `motions`
    frame: torch.Tensor  # (units,) long
    motions: list[str]
    frame_size: tuple[int, int]  # (height, width) of the frames


def _labelled_video_objects(samples: Sequence):
    """(sample, video, object index, its masks, its labels) for every object of the video records whose objects
    all carry a `motion` label (ShapesWorld video captions)."""
    for sample in samples:
        objects = getattr(sample, "meta", {}).get("objects") or []
        if not getattr(sample, "is_video", False) or not objects or not all("motion" in o for o in objects):
            continue
        _, _, video, masks = sample.load_media()
        if len(masks) != len(objects):
            raise ValueError(f"{sample.where}: {len(masks)} masks but {len(objects)} labelled objects")
        for k, (spec, info) in enumerate(zip(masks, objects)):
            yield sample, video, k, spec, info


@torch.no_grad()
def track_features(model, processor, samples: Sequence, *, stage: str = "tokens") -> TrackFeatures:
    """`TrackFeatures` of every video record of `samples` whose objects carry a `motion` label (ShapesWorld
    video captions): each object alone in a prompt, as the tokens of one video `<region>`.

    stage: "tokens" (what the LLM receives), "pre_mlp" (the features entering the object MLP: Lite's infused
    features, else the SAOT centroids) or "centroids" (k-means centroids, before OCI); the mean is over each
    unit's real tokens.
    """
    if stage not in TRACK_STAGES:
        raise ValueError(f"stage must be one of {TRACK_STAGES}, got {stage!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, centres, track, frame, motions, size = [], [], [], [], [], None
    for sample, video, k, spec, info in _labelled_video_objects(samples):
        frames = sorted(int(t) for t, m in spec.items() if torch.as_tensor(m).any())
        if not frames:
            raise ValueError(f"{sample.where}, object {k}: every frame's mask is empty")
        spec = {t: spec[t] if t in spec else spec[str(t)] for t in frames}
        prompt = [{"role": "user", "content": "<video>\nWhat does <region> do?"}]
        encoded = processor(text=[prompt], images=[None], videos=[video], masks=[[spec]])
        regions = {key: v.to(device) for key, v in encoded.items() if key.startswith("region_") and torch.is_tensor(v)}
        out = model.get_object_features(**regions)
        chosen = {"tokens": out.tokens, "centroids": out.aggregated.features,
                  "pre_mlp": out.aggregated.features if out.infused is None else out.infused}[stage]
        valid = out.valid.to(chosen.dtype)[..., None]
        features.append(((chosen * valid).sum(1) / valid.sum(1).clamp(min=1)).float().cpu())
        height, width = next(iter(spec.values())).shape[-2:]
        size = (int(height), int(width))
        for t in frames:
            rows, cols = torch.as_tensor(spec[t]).squeeze().nonzero(as_tuple=True)
            centres.append([(cols.double().mean() + 0.5) / width, (rows.double().mean() + 0.5) / height])
        track += [len(motions)] * len(frames)
        frame += frames
        motions.append(info["motion"])
    model.train(was_training)
    if not motions:
        raise ValueError("no video record whose objects carry a motion label (ShapesWorld video captions)")
    return TrackFeatures(torch.cat(features), torch.tensor(centres, dtype=torch.float64), torch.tensor(track),
                         torch.tensor(frame), motions, size)


def trajectory_motion(frames: torch.Tensor, centres: torch.Tensor, frame_size: tuple[int, int],
                      still_speed: float = 1.0) -> str:
    """The motion a straight-line fit of (frame, centre) names: "still" when it travels under `still_speed`
    pixels a frame on both axes (ShapesWorld's movers travel 2 to 4), else the axis it travels most along."""
    t = frames.double() - frames.double().mean()
    if len(t) < 2:
        return "still"
    pixels = centres.double() * torch.tensor([frame_size[1], frame_size[0]], dtype=torch.float64)
    velocity = (t[:, None] * (pixels - pixels.mean(0))).sum(0) / (t**2).sum()  # (vx, vy) pixels a frame
    if velocity.abs().max() < still_speed:
        return "still"
    if velocity[0].abs() >= velocity[1].abs():
        return "right" if velocity[0] > 0 else "left"
    return "down" if velocity[1] > 0 else "up"


def motion_readout(train: TrackFeatures, test: TrackFeatures, *, ridge: float = 1.0) -> dict[str, float]:
    """How well `test`'s tokens give its tracks' motions: "tokens", through a ridge regression token → centre
    fitted on `train`; "centres", the same rule on the true centroids (its ceiling); "location_r2" of that
    regression on `test`'s units; "location_share" (overall and within tracks) of `test`'s units, how loud
    location is; "majority", the share of the most common motion (chance)."""
    x, y = train.features.double(), train.centres
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    offset = y.mean(0)
    weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (y - offset))
    predicted = ((test.features.double() - mean) / std) @ weights + offset
    residual = ((predicted - test.centres) ** 2).sum()
    r2 = float(1 - residual / ((test.centres - test.centres.mean(0)) ** 2).sum())
    hits = {"tokens": [], "centres": []}
    for index, motion in enumerate(test.motions):
        rows = test.track == index
        hits["tokens"].append(trajectory_motion(test.frame[rows], predicted[rows], test.frame_size) == motion)
        hits["centres"].append(trajectory_motion(test.frame[rows], test.centres[rows], test.frame_size) == motion)
    majority = max(test.motions.count(m) for m in set(test.motions)) / len(test.motions)
    return {"tokens": sum(hits["tokens"]) / len(test.motions), "centres": sum(hits["centres"]) / len(test.motions),
            "location_r2": r2, "location_share": location_share(test.features, test.centres),
            "location_share_within_tracks": location_share(test.features, test.centres, test.track),
            "majority": majority, "tracks": len(test.motions)}


def location_share(features: torch.Tensor, centres: torch.Tensor, groups: torch.Tensor | None = None) -> float:
    """Fraction of the raw variance of `features` (units, D) that a least-squares linear function of `centres`
    (units, 2) explains; with `groups` ((units,) ids) both are centred within each group first."""
    if features.shape[0] != centres.shape[0] or (groups is not None and groups.shape[0] != features.shape[0]):
        raise ValueError(f"features, centres and groups differ in count: {features.shape[0]}, {centres.shape[0]}"
                         f"{'' if groups is None else f', {groups.shape[0]}'}")
    x, c = features.double(), centres.double()
    if groups is None:
        x, c = x - x.mean(0), c - c.mean(0)
    else:
        ids = torch.unique(groups, return_inverse=True)[1]
        counts = torch.bincount(ids).double()[:, None]
        x = x - (torch.zeros(len(counts), x.shape[1], dtype=x.dtype).index_add_(0, ids, x) / counts)[ids]
        c = c - (torch.zeros(len(counts), 2, dtype=c.dtype).index_add_(0, ids, c) / counts)[ids]
    total = (x**2).sum()
    if total == 0:
        return 0.0
    fitted = c @ torch.linalg.lstsq(c, x).solution
    return float((fitted**2).sum() / total)


def variance_share(features: torch.Tensor, labels: list[dict], attribute: str) -> float:
    """Fraction of the total variance of `features` (objects, C) explained by the means of `attribute`'s classes."""
    values = sorted({o[attribute] for o in labels})
    index = torch.tensor([values.index(o[attribute]) for o in labels])
    centred = features.double() - features.double().mean(0)
    means = torch.zeros(len(values), features.shape[1], dtype=torch.float64).index_add_(0, index, centred)
    means /= torch.bincount(index, minlength=len(values)).clamp(min=1)[:, None]
    return float((means[index] ** 2).sum() / (centred**2).sum())


MOTION_QUESTION = "What does <region> do?"


@torch.no_grad()
def llm_track_states(model, processor, samples: Sequence, *, question: str = MOTION_QUESTION,
                     prefix: str = "the {colour} {category}") -> tuple[torch.Tensor, list[dict]]:
    """The LLM's hidden states where each labelled video object's motion is next: (layers + 1, objects, D), index
    0 the input embeddings; and the objects' labels (ShapesWorld `objects` entries: motion, speed, colour, …).

    Each object of each video record is alone in a prompt asking `question`, its answer teacher-forced to
    `prefix` (formatted with the object's labels; "" reads the last prompt token). Objects with an event
    (appears / disappears) are left out: their next word is the event, not the motion.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    states, labels = [], []
    for _, video, _, spec, info in _labelled_video_objects(samples):
        if info.get("event"):
            continue
        turns = [{"role": "user", "content": f"<video>\n{question}"}]
        answer = prefix.format(**info).strip()
        if answer:
            turns.append({"role": "assistant", "content": answer})
        encoded = processor.encode([turns], images=[None], videos=[video], masks=[[spec]],
                                   add_generation_prompt=not answer)
        if answer:  # the last answer word, not the <|im_end|> the template closes the turn with
            ids = encoded.inputs["input_ids"][0]
            words = [span for span in encoded.spans[0] if span.group == "answer"
                     and not (ids[span.start:span.end] == processor.tokenizer.eos_token_id).all()]
            position = words[-1].end - 1
        else:
            position = encoded.inputs["input_ids"].shape[1] - 1
        inputs = {key: v.to(device) if torch.is_tensor(v) else v for key, v in encoded.inputs.items()}
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        states.append(torch.stack([h[0, position] for h in hidden]).float().cpu())
        labels.append(dict(info))
    model.train(was_training)
    if not labels:
        raise ValueError("no video object with a motion label and no event (ShapesWorld video captions)")
    return torch.stack(states, dim=1), labels


def layer_probes(train: tuple[torch.Tensor, list[dict]], test: tuple[torch.Tensor, list[dict]], attribute: str,
                 **probe_options) -> list[float]:
    """`linear_probe` accuracy of `attribute` at every layer of `llm_track_states` outputs (train, test)."""
    (x, labels), (x_test, test_labels) = train, test
    if x.shape[0] != x_test.shape[0]:
        raise ValueError(f"train states have {x.shape[0]} layers, test states {x_test.shape[0]}")
    return [linear_probe((x[i], labels), (x_test[i], test_labels), attribute, **probe_options).accuracy
            for i in range(x.shape[0])]
