"""The paper's ablations (§6.4: Table 7 / Fig. 10, Table 8 / Fig. 12, Table 9) as trainable studies on ShapesWorld.

    results = run_study("saot", "runs/ablations", AblationSettings(steps=300))
    study_table(results)   # one row per variant: overall / small / large category accuracy, held-out loss

A study is a list of variants; a variant is one framework plus config
overrides. Every variant of a study is trained with the same recipe, data and
seed, and evaluated on the same held-out records, so the only difference
between two rows is the design choice the row names.

Notable choices:
- Studies: `token_scaling` (n ∈ {1, 8, 16, 32}, both frameworks: Table 7 /
  Fig. 10), `saot` (mask pooling, without expansion, without position
  embedding, full: Table 8), `oci` (neither, local only, global only, both:
  Table 9, Object-Only as in the paper).
- "Without expansion" is the paper's wording for dropping the context padding
  around the cropped box (`context_padding_patches=0`), not for dropping the
  scale of Eq. 2.
- "Mask pooling" is the prior work's one token per object (Osprey,
  VideoRefer): the mean of the mask's cells at the image's own resolution. We
  take those cells from an unscaled crop (`use_dynamic_scaling=False`), so
  small objects lose detail exactly as they do on a global feature map.
- Metrics: per-object category exact match (LVIS-style recognition, the
  metric Table 8 and Fig. 12 lead with), split into small regions (ShapesWorld
  `tiny` and `small`, at most 18 px across: the paper's < 2000-pixel split is
  about 0.7 % of its images; these are under 2 % of a 128-px image) and large
  ones; and the token-mean loss on held-out records of every task, which is
  smooth enough to rank variants after short runs where accuracy is noise.
- The vision encoder is shared, as the paper's frozen SigLIP is: by default
  every variant starts from the embedded model's encoder of its framework
  (pretrained in stage 0, frozen) and trains the rest from random weights;
  `vision_encoder=None` instead trains a random encoder along (much slower to
  learn shapes).
- Resumable: each variant trains in its own folder (the trainer resumes from
  its last checkpoint) and writes `result.json` atomically when evaluated; a
  rerun reuses finished variants whose recipe is unchanged and refuses to mix
  a result made with another recipe into the study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pixelrefer.config import FRAMEWORKS
from pixelrefer.data import generate_shapesworld, load_annotations
from pixelrefer.data.sample import SampleInputs
from pixelrefer.evaluation.category import exact_match
from pixelrefer.evaluation.models import PixelReferModel
from pixelrefer.training import SHORT_RUN, TrainConfig, atomic_write_text, preset_config, train

CATEGORY_PROMPT = "<image>\nWhat is the category of <region>? Using only one word or phrase."
SMALL_SIZES = ("tiny", "small")


@dataclass(frozen=True)
class Variant:
    """One row of a study: a framework and the config overrides that make the design choice."""

    name: str
    framework: str
    overrides: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        short = "vo" if self.framework == "vision_object" else "lite"
        return f"{short}-" + re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


STUDIES: dict[str, tuple[Variant, ...]] = {
    "token_scaling": tuple(
        Variant(f"n={n}", framework, {"num_object_tokens": n}) for framework in FRAMEWORKS for n in (1, 8, 16, 32)
    ),
    "saot": (
        Variant("mask pooling", "vision_object", {"object_tokenizer": "mask_pooling", "use_dynamic_scaling": False}),
        Variant("w/o expansion", "vision_object", {"context_padding_patches": 0}),
        Variant("w/o position emb.", "vision_object", {"use_position_encoding": False}),
        Variant("full", "vision_object", {}),
    ),
    "oci": (
        Variant("none", "object_only", {"oci_use_local": False, "oci_use_global": False}),
        Variant("local only", "object_only", {"oci_use_global": False}),
        Variant("global only", "object_only", {"oci_use_local": False}),
        Variant("local + global", "object_only", {}),
    ),
}


@dataclass
class AblationSettings:
    """The recipe every variant of a study shares.

    Args:
        preset: the training preset the recipe starts from (its learning rates and model overrides).
        steps, batch_size: optimizer steps and samples per step of each variant.
        num_images, num_videos: the ShapesWorld generated once for the whole study.
        eval_records: held-out category records asked about (each has several objects).
        loss_records: held-out records of every task for the held-out loss.
        seed: data order and initialisation.
        data_seed: the study's ShapesWorld. It differs from the embedded models' (0) so that the shared
            vision encoder, pretrained on their data, has never seen the study's held-out images.
        mixed_precision: accelerate's setting for training ("bf16" on a GPU).
        vision_encoder: "embedded" (the shipped model of the variant's framework), an embedded model name or
            checkpoint folder to take the frozen vision encoder from, or None to train a random one along.
    """

    preset: str = "shapes-tiny"
    steps: int = 300
    batch_size: int = 16
    num_images: int = 1000
    num_videos: int = 200
    eval_records: int = 60
    loss_records: int = 64
    seed: int = 0
    data_seed: int = 1
    mixed_precision: str = "no"
    vision_encoder: str | None = "embedded"

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_images", "eval_records", "loss_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"AblationSettings.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class VariantResult:
    study: str
    variant: str
    framework: str
    overrides: dict
    settings: dict
    metrics: dict
    train_seconds: float
    final_train_loss: float

    def row(self) -> dict:
        return {"variant": self.variant, "framework": self.framework, **self.metrics}


def study_variants(study: str, frameworks: Sequence[str] | None = None,
                   names: Sequence[str] | None = None) -> tuple[Variant, ...]:
    """The variants of `study`, optionally only those of some frameworks and / or with some names."""
    if study not in STUDIES:
        raise KeyError(f"unknown ablation study {study!r}; known: {', '.join(STUDIES)}")
    variants = STUDIES[study]
    if frameworks is not None:
        unknown = set(frameworks) - set(FRAMEWORKS)
        if unknown:
            raise ValueError(f"unknown framework(s) {sorted(unknown)}; known: {', '.join(FRAMEWORKS)}")
        variants = tuple(v for v in variants if v.framework in frameworks)
    if names is not None:
        unknown = set(names) - {v.name for v in STUDIES[study]}
        if unknown:
            raise ValueError(f"{study} has no variant(s) {sorted(unknown)}; it has {[v.name for v in STUDIES[study]]}")
        variants = tuple(v for v in variants if v.name in names)
    return variants


def shapesworld_splits(root: Path, settings: AblationSettings) -> dict[str, Path]:
    """The study's ShapesWorld, generated once (again only when its parameters changed)."""
    wanted = dict(seed=settings.data_seed, num_images=settings.num_images, num_videos=settings.num_videos)
    info = root / "info.json"
    if info.exists():
        have = json.loads(info.read_text())
        if all(have.get(k) == v for k, v in wanted.items()):
            return {name: root / f"{name}.json" for name in ("train", "val", "test")}
    return generate_shapesworld(root, **wanted)


def variant_config(variant: Variant, settings: AblationSettings, train_data: Path, output_dir: Path) -> TrainConfig:
    base = preset_config(settings.preset)
    encoder = settings.vision_encoder
    if encoder == "embedded":
        encoder = "shapes-tiny" if variant.framework == "vision_object" else "shapes-tiny-lite"
    # Variants share one frozen encoder, as the paper's share SigLIP; a random one trains along with the rest.
    vision = dict(freeze_vision_encoder=encoder is not None)
    return dataclasses.replace(
        base,
        **SHORT_RUN,
        framework=variant.framework,
        model_overrides={**base.model_overrides, **variant.overrides, **vision},
        vision_pretrain_steps=0,
        vision_encoder_from=encoder,
        lr_vision_encoder=3e-4 if encoder is None else None,
        train_data=str(train_data),
        media_root=str(train_data.parent),
        shapesworld=None,
        output_dir=str(output_dir),
        steps=settings.steps,
        batch_size=settings.batch_size,
        save_every=max(1, math.ceil(settings.steps / 4)),
        seed=settings.seed,
        mixed_precision=settings.mixed_precision,
    )


# ----------------------------------------------------------------------------------------------- metrics
def category_queries(samples: Sequence) -> tuple[list[SampleInputs], list[str], list[str]]:
    """One single-object category question per object of ShapesWorld `category` records.

    Returns the queries, the reference categories and the objects' size labels.
    """
    queries, references, sizes = [], [], []
    for sample in samples:
        objects = sample.meta.get("objects")
        if sample.task != "category" or not objects:
            continue
        _, image, _, masks = sample.load_media()
        if len(objects) != len(masks):
            raise ValueError(f"{sample.where}: {len(masks)} masks but {len(objects)} object descriptions")
        for mask, obj in zip(masks, objects):
            queries.append(SampleInputs([{"role": "user", "content": CATEGORY_PROMPT}], image, None, [mask]))
            references.append(obj["category"])
            sizes.append(obj["size"])
    return queries, references, sizes


def category_accuracy(model, processor, samples: Sequence, *, batch_size: int = 32) -> dict[str, float]:
    """Exact-match category accuracy over every object, and over small / large regions separately."""
    queries, references, sizes = category_queries(samples)
    if not queries:
        raise ValueError("no ShapesWorld category records among the evaluation samples")
    answer = PixelReferModel(model, processor, max_new_tokens=4)
    predictions = []
    for start in range(0, len(queries), batch_size):
        predictions += answer(queries[start : start + batch_size])
    hits = [exact_match(p, r) for p, r in zip(predictions, references)]
    small = [h for h, s in zip(hits, sizes) if s in SMALL_SIZES]
    large = [h for h, s in zip(hits, sizes) if s not in SMALL_SIZES]

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    return dict(category_acc=mean(hits), small_acc=mean(small), large_acc=mean(large),
                objects=len(hits), small_objects=len(small), large_objects=len(large))


@torch.no_grad()
def heldout_loss(model, processor, samples: Sequence, *, batch_size: int = 16) -> float:
    """Token-mean next-token loss on the assistant turns of `samples` (teacher forcing)."""
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        text, images, videos, masks = (list(c) for c in zip(*(s.load_media() for s in samples[start : start + batch_size])))
        batch = processor(text=text, images=images, videos=videos, masks=masks).to(model.device)
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch).loss
        total += float(loss) * count
        tokens += count
    return total / tokens


# ----------------------------------------------------------------------------------------------- runner
def run_variant(study: str, variant: Variant, settings: AblationSettings, out_dir: str | Path,
                splits: dict[str, Path] | None = None) -> VariantResult:
    """Train (or resume) one variant and evaluate it; reuse its `result.json` when the recipe matches."""
    from pixelrefer.inference import load

    out = Path(out_dir)
    splits = splits or shapesworld_splits(out / "shapesworld", settings)
    folder = out / study / variant.slug
    result_file = folder / "result.json"
    recipe = dataclasses.asdict(settings)
    if result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved["settings"] == recipe and saved["overrides"] == variant.overrides:
            return VariantResult(**saved)
        raise ValueError(f"{result_file} was made with another recipe or variant; use a new output folder "
                         f"(saved settings {saved['settings']}, now {recipe})")
    config = variant_config(variant, settings, splits["train"], folder)
    trained = train(config)
    model, processor = load(str(trained.final_dir))
    model.eval()
    test = load_annotations(splits["test"], splits["test"].parent)
    category = [s for s in test if s.task == "category"][: settings.eval_records]
    metrics = category_accuracy(model, processor, category)
    metrics["heldout_loss"] = heldout_loss(model, processor, test[: settings.loss_records])
    result = VariantResult(study, variant.name, variant.framework, variant.overrides, recipe, metrics,
                           trained.seconds, trained.losses[-1])
    atomic_write_text(result_file, json.dumps(dataclasses.asdict(result), indent=1, allow_nan=True))
    return result


def run_study(study: str, out_dir: str | Path, settings: AblationSettings | None = None, *,
              frameworks: Sequence[str] | None = None, variants: Sequence[str] | None = None,
              callback: Callable[[VariantResult], None] | None = None) -> list[VariantResult]:
    """Every variant of `study` (optionally only some frameworks' or names'), trained and evaluated in turn."""
    settings = settings or AblationSettings()
    chosen = study_variants(study, frameworks, variants)
    out = Path(out_dir)
    splits = shapesworld_splits(out / "shapesworld", settings)
    results = []
    for variant in chosen:
        result = run_variant(study, variant, settings, out, splits)
        results.append(result)
        if callback is not None:
            callback(result)
    return results


def study_table(results: Sequence[VariantResult]) -> list[dict]:
    """One dict per variant, in study order: variant, framework and every metric."""
    return [r.row() for r in results]


def add_parser(commands) -> None:
    """`pixelrefer ablate STUDY [--out DIR] [--framework F] [--set KEY=VALUE ...]`."""
    parser = commands.add_parser("ablate", help="train and evaluate every variant of an ablation study")
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", default="runs/ablations", help="study folder (resumes what is there)")
    parser.add_argument("--framework", action="append", choices=FRAMEWORKS, help="only these frameworks' variants")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an AblationSettings field (" + ", ".join(f.name for f in dataclasses.fields(AblationSettings)) + ")")
    parser.set_defaults(handler=_ablate_command)


def _ablate_command(args) -> int:
    known = {f.name: f.type for f in dataclasses.fields(AblationSettings)}
    values = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            print(f"pixelrefer ablate: error: --set {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
            return 2
        if key == "vision_encoder":
            values[key] = None if value.lower() == "none" else value
        else:
            values[key] = value if key in ("preset", "mixed_precision") else int(value)
    results = run_study(args.study, args.out, AblationSettings(**values), frameworks=args.framework)
    print(json.dumps(study_table(results), indent=1))
    return 0


# ----------------------------------------------------------------------------------------------- findings
def _by_name(results: Sequence[VariantResult], framework: str | None = None) -> dict[str, dict]:
    return {r.variant: r.metrics for r in results if framework is None or r.framework == framework}


def token_scaling_findings(results: Sequence[VariantResult]) -> dict:
    """F4: Object-Only improves steadily with n while Vision-Object plateaus after n = 8.

    "Improves" is read on the held-out loss (lower is better), the metric that
    ranks short runs reliably; category accuracy is reported beside it.
    Needs n = 1, 8, 32 of both frameworks (16 is used when present).
    """
    out = {}
    for framework, key in (("object_only", "lite"), ("vision_object", "vo")):
        rows = sorted(((int(name.split("=")[1]), m) for name, m in _by_name(results, framework).items()))
        out[f"{key}_n"] = [n for n, _ in rows]
        out[f"{key}_heldout_loss"] = [m["heldout_loss"] for _, m in rows]
        out[f"{key}_category_acc"] = [m["category_acc"] for _, m in rows]
    lite, vo = dict(zip(out["lite_n"], out["lite_heldout_loss"])), dict(zip(out["vo_n"], out["vo_heldout_loss"]))
    if not {1, 8, 32} <= lite.keys() or not {1, 8, 32} <= vo.keys():
        raise ValueError("token-scaling findings need n = 1, 8 and 32 for both frameworks")
    losses = out["lite_heldout_loss"]
    out["lite_improves_steadily"] = all(b < a for a, b in zip(losses, losses[1:]))
    out["vo_gain_1_to_8"] = vo[1] - vo[8]
    out["vo_gain_8_to_32"] = vo[8] - vo[32]
    out["vo_plateaus"] = out["vo_gain_8_to_32"] < out["vo_gain_1_to_8"]
    out["F4"] = out["lite_improves_steadily"] and out["vo_plateaus"]
    return out


def saot_findings(results: Sequence[VariantResult]) -> dict:
    """F5: SAOT beats mask pooling, and by more on small regions than on large ones."""
    m = _by_name(results)
    if not {"full", "mask pooling"} <= m.keys():
        raise ValueError("SAOT findings need the 'full' and 'mask pooling' variants")
    full, pooled = m["full"], m["mask pooling"]
    out = {
        "gain_overall": full["category_acc"] - pooled["category_acc"],
        "gain_small": full["small_acc"] - pooled["small_acc"],
        "gain_large": full["large_acc"] - pooled["large_acc"],
        "loss_gain": pooled["heldout_loss"] - full["heldout_loss"],
    }
    out["saot_beats_mask_pooling"] = out["gain_overall"] > 0
    out["gain_larger_on_small_regions"] = out["gain_small"] > out["gain_large"]
    out["F5"] = out["saot_beats_mask_pooling"] and out["gain_larger_on_small_regions"]
    return out


def oci_findings(results: Sequence[VariantResult]) -> dict:
    """F6: local + global infusion is the best of the four (lowest held-out loss; accuracy beside it)."""
    m = _by_name(results)
    if len(m) < 2 or "local + global" not in m:
        raise ValueError("OCI findings need 'local + global' and at least one other variant")
    best_loss = min(m, key=lambda name: m[name]["heldout_loss"])
    best_acc = max(m, key=lambda name: m[name]["category_acc"])
    return {"best_by_loss": best_loss, "best_by_category_acc": best_acc,
            "F6": best_loss == "local + global"}
