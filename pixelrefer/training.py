"""One readable training loop for both frameworks, on accelerate.

Notable:
- `TrainConfig` is a plain dataclass, saved as JSON next to every checkpoint.
- Per-module learning rates (paper §6.1): Stage 1 — LLM 1e-5, projector 1e-5,
  object encoder 1e-3; Stage 2 — everything 1e-5; the vision encoder is frozen
  (its parameters are not given to the optimizer at all) unless the model
  unfreezes it (`freeze_vision_encoder=False`) and `lr_vision_encoder` is set.
- The loss of an optimizer step is the mean over every supervised token of the
  global batch (all micro-batches, all processes): each micro-batch's summed
  loss is divided by the step's global token count, so gradient accumulation
  and data parallelism give the same gradient as one big batch.
- Data order is a pure function of (seed, epoch): step s always sees the same
  samples, so a resumed run continues exactly (bit-identical losses in float32
  on CPU). Epochs run over a pool where each record appears `task_weights[task]`
  times (default once), plus `text_choice_records` text-only lettered questions.
  With `num_workers`, DataLoader processes encode the next steps' batches while
  the model trains on this one (same batches, same order: tested). Checkpoints
  hold model, optimizer, scheduler, step, loss history and RNG states, written
  to a temporary folder and renamed into place.
- A bad record stops training with its file and index, unless `skip_bad` is
  set, in which case it is skipped and counted.
- Stage 0 (`vision_pretrain_steps`, tiny models only): the paper starts from a
  pretrained SigLIP-NaViT; a tiny model has no such encoder, and learning shape
  through the LLM's loss alone left the shipped models at chance on shape
  categories. Stage 0 trains the vision encoder first to name each object's
  category and colour from the mean of its foreground cell features
  (linear heads, discarded after), on the records' own object labels and the
  same crops the object tokenizer sees, or on a ShapesWorld of its own
  (`vision_pretrain_shapesworld`). It runs on the main process, is saved atomically to
  `vision_pretrain/`, loaded by the other processes and by a resumed run, and
  leaves the global RNG state untouched, so resumes stay exact.
- LLM stage (`llm_pretrain_steps`, tiny models only), after stage 0: the paper starts from an instruction-tuned
  Qwen2.5 that already answers lettered questions with "(B) ..."; a tiny LLM from random weights learns the
  option text from multimodal records but not the letter. This stage trains the LLM alone on text-only
  lettered questions in ShapesWorld's words (`pixelrefer.data.text_tasks`, facts about
  `llm_pretrain_max_objects` objects, `llm_pretrain_batch_size` questions a step: the letters arrive in a
  sudden jump that more questions per step bring forward), saved to `llm_pretrain/` and reused like stage 0.
- Frozen-media stages (`media_stages`, a list of `MediaStage`), after the main stage, in order: the LLM alone
  trains on object and vision tokens computed once by the trained encoders (`pixelrefer.cached_media`), on the
  main stage's records or on a ShapesWorld of its own. The per-frame object tokens carry where an object is,
  but the LLM needs thousands of video questions before it compares them across frames (motion, speed, the
  future); with the encoders frozen each step costs the LLM alone. A stage may first scale the position
  Linear (Eq. 5) so that location is loud in the tokens it caches, and may train the object MLP along
  (`object_mlp_lr`; the features entering it are cached instead of its tokens), which is where location was
  being lost. Saved to `media_stage/`, `media_stage_2/`…
  and reused like the other stages; their settings are not part of the main stage's trajectory, so stages can
  follow a finished run.
- `weights_from` starts a preset model from another checkpoint's architecture and weights, across frameworks
  (`copy_weights`: a Vision-Object model from an Object-Only one leaves the infusion module out; the other way
  it keeps its initialisation, with a warning). The shipped shapes-tiny starts from shapes-tiny-lite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from pixelrefer.cached_media import LLM_PREFIXES
from pixelrefer.errors import InputError
from pixelrefer.inference import load
from pixelrefer.processing import PixelReferProcessor
from pixelrefer.stage_checkpoint import StageCheckpoint

STAGE_LEARNING_RATES = {
    1: dict(llm=1e-5, projector=1e-5, object_encoder=1e-3),
    2: dict(llm=1e-5, projector=1e-5, object_encoder=1e-5),
}
CHECKPOINTS = "checkpoints"
PARTIAL = ".partial"  # suffix of a stage's checkpoint folder (`Trainer.stage_checkpoint`)
VISION_PRETRAIN = "vision_pretrain"
LLM_PRETRAIN = "llm_pretrain"
MEDIA_STAGE = "media_stage"
POSITION_LINEAR = "model.object_tokenizer.position_proj"
VISION_MODEL = "model.vision_model."


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as `train_config.json` with each checkpoint.

    `lr_*` left as None take the paper's value for `stage`. `steps` counts
    optimizer steps; one step sees batch_size × grad_accum × processes samples.
    """

    model: str = "tiny"  # preset name or checkpoint folder to start from
    framework: str = "vision_object"
    model_overrides: dict = field(default_factory=dict)
    train_data: str = ""
    media_root: str | None = None
    shapesworld: dict | None = None  # generate_shapesworld kwargs: used when train_data is empty
    output_dir: str = "runs/train"
    stage: int = 1
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr_llm: float | None = None
    lr_projector: float | None = None
    lr_object_encoder: float | None = None
    lr_vision_encoder: float | None = None  # only for a model whose vision encoder is not frozen
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "bf16" on GPUs
    gradient_checkpointing: bool = False
    save_every: int = 50
    num_workers: int = 0  # processes encoding the next steps' batches ahead of the GPU; 0 encodes in the loop
    seed: int = 0
    skip_bad: bool = False
    vision_pretrain_steps: int = 0  # stage 0 (see the module docstring); 0 skips it
    vision_pretrain_lr: float = 3e-3
    vision_pretrain_shapesworld: dict | None = None  # generate_shapesworld kwargs of stage 0's own images; None: the main stage's
    vision_encoder_from: str | None = None  # embedded model or checkpoint whose vision encoder to start from
    weights_from: str | None = None  # embedded model or checkpoint whose architecture and weights start a preset model
    llm_pretrain_steps: int = 0  # LLM stage on text-only lettered questions (see the module docstring); 0 skips it
    llm_pretrain_lr: float = 1e-3
    llm_pretrain_max_objects: int = 1  # objects per question's facts (2 for relationship / reasoning ones)
    llm_pretrain_batch_size: int | None = None  # questions per LLM-stage step; None: batch_size
    task_weights: dict = field(default_factory=dict)  # task → how many times each of its records is in the pool
    text_choice_records: int = 0  # text-only lettered questions added to the main stage's records
    media_stages: list = field(default_factory=list)  # `MediaStage` fields per frozen-media stage, run in order

    def learning_rates(self) -> dict[str, float]:
        if self.stage not in STAGE_LEARNING_RATES:
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        rates = dict(STAGE_LEARNING_RATES[self.stage], vision_encoder=None)
        for name in rates:
            if (value := getattr(self, f"lr_{name}")) is not None:
                rates[name] = value
        return rates

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(dataclasses.asdict(self), indent=2))

    def frozen_media_stages(self) -> list["MediaStage"]:
        """`media_stages` checked and parsed, in order."""
        if not isinstance(self.media_stages, list):
            raise ValueError(f"media_stages must be a list of MediaStage field dicts, got {self.media_stages!r}")
        return [MediaStage.parse(spec, index) for index, spec in enumerate(self.media_stages)]

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        data = _upgraded(json.loads(Path(path).read_text()), path)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class MediaStage:
    """One frozen-media stage (module docstring), as a dict in `TrainConfig.media_stages`.

    `position_scale` multiplies the weight of the object tokenizer's position Linear (Eq. 5) before the
    tokens are cached: location gets louder in every object token while the object MLP stays as trained; the
    scaled weight is saved with the stage. `mixed_precision` "bf16" runs the LLM under bf16 autocast, on a
    GPU or on a CPU with bf16 matrix units (AMX), whatever the main stage's precision. `object_mlp_lr` trains
    the object MLP (SAOT's Linear-GELU-Linear after k-means and OCI) at that rate beside the LLM; None keeps it
    frozen; `projector_lr` likewise trains the image projector (Vision-Object only: its global image and video
    tokens). `vision_steps` first continues stage 0 on the vision encoder for that many steps (fresh heads,
    `vision_lr`, on `vision_shapesworld`'s images or the main stage's records) before the tokens are cached, so
    the stage's object MLP and LLM learn to read a better encoder; the encoder is saved with the stage.
    `object_time_embedding` switches the model's object time embedding on at this stage
    (`PixelReferConfig.object_time_embedding`, the paper's timestamp embeddings) before the tokens are cached, its
    vectors starting at that mean norm (seeded by `seed`); it trains with the object MLP, so it needs `object_mlp_lr`.
    `language_layers` appends that many decoder layers to the LLM at this stage, each starting as the identity
    (`pixelrefer.modeling.depth.add_language_layers`, seeded by `seed`), trained with the LLM. `attention_heads`
    (0: as they are) gives every LLM attention layer that many query heads, each with its own key/value head, the
    old heads unchanged and the new ones silent at the start (`pixelrefer.modeling.depth.widen_attention`).
    `text_choice_records` mixes that many text-only lettered questions (`data.text_tasks`, task "text_choice",
    their own stream for each stage) into the stage's records, answered option first when the stage's
    ShapesWorld is (`option_first`): the step from a written answer to its letter, practised where it is cheap.
    `text_choice_context` puts facts about up to that many other objects before each of them
    (`text_tasks.context_facts`), so the step is practised at the prompt lengths of region questions too.
    `shuffle_options` deals each drawn lettered question's options to the letters in a new order, its answer's
    letter moving with its text (`pixelrefer.option_order`): the letter of an answer is practised on every
    record's own prompt many times over, where repeating a record would teach its one letter.
    `letter_weight` weighs each answer's letter that many times in the loss (the mean over supervised tokens
    otherwise counts it once among the answer's words): the step from an answer to its letter gets more of
    each step's gradient. `letter_drill` asks that share of the drawn questions (one lettered question a record,
    answered option first) with a random option's text written as the answer and only its letter supervised
    (`pixelrefer.option_order.drill_letter`): the letter must come from the text written, not from the media.
    `new_lr` trains what this stage adds (`language_layers`' layers, `attention_heads`' new heads) at that rate
    instead of the LLM's `lr` (`cached_media.train_on_cached_media(fresh_lr=...)`): zero-start output weights
    moving at the old layers' rate hardly speak after a stage.
    `letter_attention` (a dict of `pixelrefer.letter_attention.LetterAttention` fields) supervises where the
    letter of each drawn lettered question is read: one head at the answer's "(" attends to the right option's
    line, one earlier head at each option word to its line's letter (auxiliary terms added to the loss; the stage
    trains with eager attention).
    """

    steps: int
    lr: float = 3e-4
    batch_size: int = 32
    shapesworld: dict | None = None  # generate_shapesworld kwargs of its own records; None: the main stage's
    task_weights: dict = field(default_factory=dict)  # as TrainConfig.task_weights
    position_scale: float = 1.0
    mixed_precision: str = "no"
    object_mlp_lr: float | None = None
    projector_lr: float | None = None
    vision_steps: int = 0
    vision_lr: float = 1e-3
    vision_batch_size: int = 16
    vision_shapesworld: dict | None = None
    object_time_embedding: float | None = None
    language_layers: int = 0
    text_choice_records: int = 0
    text_choice_context: int = 0
    shuffle_options: bool = False
    letter_weight: float = 1.0
    letter_drill: float = 0.0
    attention_heads: int = 0
    new_lr: float | None = None
    letter_attention: dict | None = None

    @classmethod
    def parse(cls, spec: dict, index: int) -> "MediaStage":
        where = f"media_stages[{index}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a dict of MediaStage fields, got {spec!r}")
        unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)})
        if unknown or "steps" not in spec:
            raise ValueError(f"{where}: unknown fields {unknown}" if unknown else f"{where}: 'steps' is required")
        stage = cls(**spec)
        if not isinstance(stage.steps, int) or stage.steps < 1:
            raise ValueError(f"{where}: steps must be a positive integer, got {stage.steps!r}")
        if not stage.position_scale > 0:
            raise ValueError(f"{where}: position_scale must be positive, got {stage.position_scale!r}")
        if stage.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"{where}: mixed_precision must be 'no' or 'bf16', got {stage.mixed_precision!r}")
        for name in ("object_mlp_lr", "projector_lr"):
            value = getattr(stage, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{where}: {name} must be a positive number or None, got {value!r}")
        for name in ("vision_steps", "vision_batch_size", "language_layers", "text_choice_records",
                     "attention_heads"):
            value = getattr(stage, name)
            least = 1 if name == "vision_batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{where}: {name} must be a {'positive' if least else 'non-negative'} "
                                 f"integer, got {value!r}")
        from pixelrefer.data.text_tasks import MAX_CONTEXT_OBJECTS

        context = stage.text_choice_context
        if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= MAX_CONTEXT_OBJECTS:
            raise ValueError(f"{where}: text_choice_context must be an integer from 0 to {MAX_CONTEXT_OBJECTS}, "
                             f"got {context!r}")
        if not isinstance(stage.shuffle_options, bool):
            raise ValueError(f"{where}: shuffle_options must be true or false, got {stage.shuffle_options!r}")
        weight = stage.letter_weight
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"{where}: letter_weight must be a positive number, got {weight!r}")
        drill = stage.letter_drill
        if isinstance(drill, bool) or not (isinstance(drill, (int, float)) and 0 <= drill <= 1):
            raise ValueError(f"{where}: letter_drill is a share of the drawn lettered questions, from 0 to 1, "
                             f"got {drill!r}")
        if stage.new_lr is not None:
            if isinstance(stage.new_lr, bool) or not (isinstance(stage.new_lr, (int, float)) and stage.new_lr > 0):
                raise ValueError(f"{where}: new_lr must be a positive number or None, got {stage.new_lr!r}")
            if not (stage.language_layers or stage.attention_heads):
                raise ValueError(f"{where}: new_lr is the rate of what the stage adds: set language_layers or "
                                 "attention_heads")
        if stage.letter_attention is not None:
            from pixelrefer.letter_attention import LetterAttention

            spec = stage.letter_attention
            known = {f.name for f in dataclasses.fields(LetterAttention)}
            if not isinstance(spec, dict) or set(spec) - known:
                raise ValueError(f"{where}: letter_attention must be a dict of {sorted(known)}, got {spec!r}")
            LetterAttention(**spec).check(num_layers=10**6, num_heads=10**6, where=f"{where}.letter_attention")
        if context and not stage.text_choice_records:
            raise ValueError(f"{where}: text_choice_context is the context of its text_choice_records: set those")
        if not (isinstance(stage.vision_lr, (int, float)) and stage.vision_lr > 0):
            raise ValueError(f"{where}: vision_lr must be a positive number, got {stage.vision_lr!r}")
        norm = stage.object_time_embedding
        if norm is not None:
            if isinstance(norm, bool) or not (isinstance(norm, (int, float)) and norm > 0):
                raise ValueError(f"{where}: object_time_embedding is the norm the time embedding starts at, a positive "
                                 f"number or None, got {norm!r}")
            if stage.object_mlp_lr is None:
                raise ValueError(f"{where}: object_time_embedding trains with the object MLP: set object_mlp_lr")
        return stage

    @staticmethod
    def folder(index: int) -> str:
        """The output subfolder of stage `index`: `media_stage`, then `media_stage_2`, …."""
        return MEDIA_STAGE if index == 0 else f"{MEDIA_STAGE}_{index + 1}"


_LEGACY_MEDIA_STAGE = ("steps", "lr", "batch_size", "shapesworld", "task_weights")


def _upgraded(data: dict, path) -> dict:
    """A saved TrainConfig dict with the single frozen-media stage of older runs (`media_stage_steps`, …)
    turned into `media_stages`."""
    legacy = {name: data.pop(f"media_stage_{name}") for name in _LEGACY_MEDIA_STAGE if f"media_stage_{name}" in data}
    if not legacy:
        return data
    if "media_stages" in data:
        raise ValueError(f"{path}: both media_stages and the older media_stage_* fields")
    data["media_stages"] = [legacy] if legacy.get("steps") else []
    return data


# The video stage (shapes-tiny-lite's, and shapes-tiny v15's): a frozen-media stage on a ShapesWorld of its own (seed 8)
# with video multiple choice ×3 and video captions ×2, in bf16 autocast (1.2-1.6× faster on this CPU's AMX units). It
# lifted video multiple choice from 26.2 to 32.7 % (shapes-tiny) and from 40.8 to 47.6 % (shapes-tiny-lite). README,
# "The embedded models".
VIDEO_STAGE = dict(steps=1500, lr=3e-4, batch_size=32, mixed_precision="bf16",
                   task_weights=dict(multiple_choice=3, video_caption=2),
                   shapesworld=dict(seed=8, num_images=300, num_videos=1500, image_choice=True))

# shapes-tiny-lite's encoder stage: stage 0 continued for 2000 steps on a ShapesWorld of 12,000 new images (seed 11; on
# the preset's 2000 images more stage-0 steps only overfit: the encoder's probe stays at 91 %, on new images it
# reaches 93.7 %), then the object MLP (1e-3) and the LLM (3e-4) re-fit to the new encoder's tokens on the main
# stage's data with category ×2. docs/embedded-models.md, "Stage 0 is data-limited".
ENCODER_STAGE = dict(steps=600, lr=3e-4, batch_size=32, mixed_precision="bf16", object_mlp_lr=1e-3,
                     task_weights=dict(category=2),
                     shapesworld=dict(seed=0, num_images=2000, num_videos=600, image_choice=True),
                     vision_steps=2000, vision_lr=1e-3, vision_batch_size=16,
                     vision_shapesworld=dict(seed=11, num_images=12000, num_videos=0))

# The video re-fit (shapes-tiny-lite's, and shapes-tiny v15's): the video stage's recipe again for 600 steps, the LLM
# alone, after the encoder stage, whose re-fit on the main stage's data (600 videos) cost the video letters. Held-out
# video multiple choice 44.6 -> 50.0 % (shapes-tiny-lite; Basic 56.7 -> 96.7 %) and 35.0 -> 38.8 % (shapes-tiny),
# categories 92.0 -> 91.5 and 93.0 -> 91.2 %. docs/embedded-models.md, "Session 13".
VIDEO_REFIT_STAGE = dict(VIDEO_STAGE, steps=600)

# The location stage (shapes-tiny-lite's, and shapes-tiny v15's last): ShapesWorld's location questions (seed 13,
# `location=True`: "Where is <region> in the image?" and where each track is first seen, answered by the 3×3 cell of the
# object's centre) weighted ×8 / ×4, image relations ×4 and video multiple choice ×2, with the position Linear's weight
# ×4 and the object MLP trained beside the LLM. Before it neither model could say where an object is (12 / 7 % of
# held-out objects, chance for nine cells), so relations and the cross-frame questions sat at chance.
# docs/embedded-models.md, "Session 14".
LOCATION_QA_STAGE = dict(steps=1000, lr=3e-4, batch_size=32, mixed_precision="bf16", position_scale=4.0,
                         object_mlp_lr=1e-3,
                         task_weights=dict(location=8, relation=4, video_location=4, multiple_choice=2),
                         shapesworld=dict(seed=13, num_images=1000, num_videos=600, image_choice=True, location=True))

# shapes-tiny-lite's last stage: where each track is last seen (seed 14, `last_location=True`) ×8 beside where it is
# first seen ×4, video captions and multiple choice ×4, image location and relations ×2, as the location stage trains.
# Held-out: location 87.0 -> 94.5 %, relations 87.4 -> 91.9 %, video multiple choice 47.6 -> 50.0 % (Relationship's
# option ranking 66.7 -> 88.9 %); motion is still not computed by the LLM. docs/embedded-models.md, "Session 15".
LAST_LOCATION_STAGE = dict(LOCATION_QA_STAGE,
                           task_weights=dict(video_last_location=8, video_location=4, video_caption=4,
                                             multiple_choice=4, location=2, relation=2),
                           shapesworld=dict(seed=14, num_images=1000, num_videos=600, image_choice=True,
                                            location=True, last_location=True))

# shapes-tiny-lite's time stage: the object time embedding switched on (the paper's timestamp embeddings, started at
# half the object tokens' mean norm, 21.8) on a new ShapesWorld of 1500 videos (seed 16), video captions and multiple
# choice ×4, where each track is first and last seen ×2, the object MLP trained beside the LLM. The LLM starts naming
# the motion in captions; docs/embedded-models.md, "Session 16".
TIME_STAGE = dict(steps=1000, lr=3e-4, batch_size=32, mixed_precision="bf16", object_mlp_lr=1e-3,
                  object_time_embedding=10.9,
                  task_weights=dict(video_caption=4, multiple_choice=4, video_location=2, video_last_location=2),
                  shapesworld=dict(seed=16, num_images=300, num_videos=1500, image_choice=True, location=True,
                                   last_location=True))

# shapes-tiny-lite's short-answer stage: the Relationship, Reasoning and Future questions asked again without options
# and answered in one word (seed 17, `short_answers=True`: "left", "higher", "<object1>", "neither"…) ×4 beside the
# lettered ones ×4, so the LLM decides the answer at its first token, where a letter has to be picked; captions and
# location questions ×2 keep the rest. docs/embedded-models.md, "Session 17".
SHORT_ANSWER_STAGE = dict(steps=1000, lr=3e-4, batch_size=32, mixed_precision="bf16", object_mlp_lr=1e-3,
                          task_weights=dict(video_short_answer=4, multiple_choice=4, video_caption=2, location=2,
                                            video_location=2, video_last_location=2),
                          shapesworld=dict(seed=17, num_images=300, num_videos=1500, image_choice=True,
                                           location=True, last_location=True, short_answers=True))

# shapes-tiny-lite's option-first stage: its lettered answers written option first (ShapesWorld's `option_first`:
# "higher up (D)", not "(D) higher up"), so the answer is decided at its first word, as the short answers taught,
# and the letter is looked up after it (seed 19, 400 images + 1200 videos, multiple choice ×4, the rest ×2; the
# object MLP frozen). Alone it moved the letters little (52.7 -> 54.7 % on the probe): the lookup is slow to learn.
OPTION_FIRST_STAGE = dict(steps=600, lr=3e-4, batch_size=32, mixed_precision="bf16",
                          task_weights=dict(multiple_choice=4, image_choice=2, video_short_answer=2, video_caption=2,
                                            category=2, location=2, video_location=2, video_last_location=2),
                          shapesworld=dict(seed=19, num_images=400, num_videos=1200, image_choice=True,
                                           location=True, last_location=True, short_answers=True, option_first=True))

# shapes-tiny-lite's lookup stage: the same option-first records (seed 21, 200 images + 600 videos) with 12,000
# text-only lettered questions answered option first (`text_choice_records`), where finding the letter of a written
# answer is cheap to practise. docs/embedded-models.md, "Session 18".
LOOKUP_STAGE = dict(steps=600, lr=3e-4, batch_size=32, mixed_precision="bf16", text_choice_records=12000,
                    task_weights=dict(text_choice=2, multiple_choice=4, video_short_answer=2, video_caption=2,
                                      category=2),
                    shapesworld=dict(seed=21, num_images=200, num_videos=600, image_choice=True, location=True,
                                     last_location=True, short_answers=True, option_first=True))

# shapes-tiny-lite's shuffle stage: the lookup stage again on a new ShapesWorld (seed 23, 200 images + 600 videos, 6000
# text questions), every drawn lettered question's options dealt to the letters anew (`shuffle_options`), so the letter
# of a written answer is practised under every letter of each record's own prompt; multiple choice ×6. Validation
# letters 62.0 -> 67.8 %, Relationship's letter given its text 45.6 -> 66.7 %. docs/embedded-models.md, "Session 19".
SHUFFLE_STAGE = dict(steps=600, lr=3e-4, batch_size=32, mixed_precision="bf16", text_choice_records=6000,
                     shuffle_options=True,
                     task_weights=dict(text_choice=2, multiple_choice=6, image_choice=2, video_short_answer=2,
                                       video_caption=2, category=3),
                     shapesworld=dict(seed=23, num_images=200, num_videos=600, image_choice=True, location=True,
                                      last_location=True, short_answers=True, option_first=True))

# shapes-tiny-lite's attention stage: the shuffle stage's recipe on a new ShapesWorld (seed 28), the letter lookup
# supervised head by head (`letter_attention`: each option word's layer-0 head on its line's letter, a last-layer head
# at the letter position on the right option line, a layer-2 head there on the answer's telling words, and the heads'
# own outputs read as the letter). Run in float32 (this CPU has no fast bf16). The letter given the right text 73.2 ->
# 80.7 % on validation; the written letters unchanged (67.8 %). docs/embedded-models.md, "Session 23".
LETTER_ATTENTION = dict(weight=0.5, layer=-1, head=0, line_weight=0.5, line_layer=0, line_head=0, readout_weight=0.5,
                        answer_weight=0.5, answer_layer=-2, answer_head=0)
ATTENTION_STAGE = dict(SHUFFLE_STAGE, mixed_precision="no", letter_attention=LETTER_ATTENTION,
                       shapesworld=dict(SHUFFLE_STAGE["shapesworld"], seed=28))

# shapes-tiny-lite's answer-word stage: the attention stage on a new ShapesWorld (seed 30) whose answers write the one
# word only the right option holds before its letter ("above (C)", `answer_words`: the letter is then looked up by
# the token just before it, where a Relationship option's text ends in the "<object1>" all four share) and lead a
# Reasoning answer with both objects' speeds (`speed_steps`). Validation letters 67.8 -> 76.9 % (Relationship 59.6
# -> 91.2 %, Future 86.2 -> 94.8 %). docs/embedded-models.md, "Session 24".
ANSWER_WORD_STAGE = dict(ATTENTION_STAGE, shapesworld=dict(ATTENTION_STAGE["shapesworld"], seed=30, speed_steps=True,
                                                           answer_words=True))

# shapes-tiny's transfer stage, on shapes-tiny-lite's weights: the shuffle stage's recipe on a new ShapesWorld
# (seed 25, 300 images + 600 videos, 6000 text questions), category ×4, 600 steps × 32, with the image projector
# trained beside the LLM (`projector_lr`), so the LLM learns to read the global image and video tokens Lite never
# sent it, and object tokens without Lite's infusion. docs/embedded-models.md, "Session 20".
TRANSFER_STAGE = dict(SHUFFLE_STAGE, projector_lr=1e-3,
                      task_weights=dict(SHUFFLE_STAGE["task_weights"], category=4),
                      shapesworld=dict(SHUFFLE_STAGE["shapesworld"], seed=25, num_images=300))
# Then the same again on seed 26: validation letters (150 questions) 59.3 -> 69.3 % at its step 600; and on seed 27
# (v17): validation letters (295) 61.7 -> 65.4 %, categories 92.0 % before and after.
TRANSFER_STAGES = [dict(TRANSFER_STAGE, shapesworld=dict(TRANSFER_STAGE["shapesworld"], seed=seed))
                   for seed in (25, 26, 27)]

# shapes-tiny's answer-word stage: the transfer stage's recipe (the projector trained beside the LLM, category ×4) on
# the answer-word stage's ShapesWorld (seed 30: the answer's one word, then its letter; a Reasoning answer's speeds
# first) with the lookup supervised head by head (`letter_attention`), in float32. Validation letters 65.4 -> 75.6 %
# (the word format without `letter_attention`: 51.5 %), categories 92.0 -> 92.5 %; on the test split categories fell
# 91.2 -> 89.0 %, which the next stage takes back. docs/embedded-models.md, "Session 25".
TINY_ANSWER_WORD_STAGE = dict(TRANSFER_STAGE, mixed_precision="no", letter_attention=LETTER_ATTENTION,
                              shapesworld=dict(TRANSFER_STAGE["shapesworld"], seed=30, speed_steps=True,
                                               answer_words=True))
# Then 400 steps more on the same records at 2e-4 with category ×6 (v18): test letters 70.7 -> 80.6 %, categories
# 89.0 -> 90.0 % (validation 75.6 -> 80.0 %, 92.5 -> 92.7 %).
TINY_SETTLE_STAGE = dict(TINY_ANSWER_WORD_STAGE, steps=400, lr=2e-4,
                         task_weights=dict(TINY_ANSWER_WORD_STAGE["task_weights"], category=6))

# shapes-tiny-lite, the from-scratch recipe. The tiny model has no pretrained vision encoder, so stage 0 trains it on
# object categories and colours first (standing in for SigLIP's pretraining), and it then trains along at 2e-4 (the
# paper freezes it: a frozen 3600-step encoder lost colours). It has no instruction-tuned LLM either, so the LLM stage
# teaches it lettered answers on text (128 questions a step: fewer do not learn the letters in 2000 steps); the main
# stage keeps the LLM at 1e-4, which keeps those letters (1e-3 forgets them), and trains the object encoder and
# projector at 1e-3 from random weights. The position encoding starts larger (std 3.0, so the object tokens keep where
# an object is: the readout of its motion rises from chance to 87.5 %). Then the frozen-media stages: 1500 steps × 32
# records of seed 7 with video multiple choice ×3 (its letters rise from 30.6 to 40.8 %), the video stage, the encoder
# stage, the video re-fit, the location stage, the last-seen stage, the time stage, the short-answer stage, the
# option-first stage, the lookup stage (lettered answers written option first, then the letter), the shuffle stage
# (options dealt anew), the attention stage (the lookup supervised head by head) and the answer-word stage (the one
# word only the right option holds, then its letter). README, "The embedded models".
SHAPES_TINY_LITE = dict(
    model="tiny",
    framework="object_only",
    model_overrides=dict(freeze_vision_encoder=False, position_init_std=3.0),
    shapesworld=dict(seed=0, num_images=2000, num_videos=600, image_choice=True),
    output_dir="runs/train/shapes-tiny-lite",
    vision_pretrain_steps=3600,
    vision_pretrain_lr=3e-3,
    llm_pretrain_steps=2000,
    llm_pretrain_batch_size=128,
    llm_pretrain_max_objects=3,
    steps=1800,
    batch_size=16,
    lr_llm=1e-4,
    lr_projector=1e-3,
    lr_object_encoder=1e-3,
    lr_vision_encoder=2e-4,
    task_weights=dict(multiple_choice=3, image_choice=3),
    text_choice_records=3000,
    save_every=100,
    media_stages=[
        dict(steps=1500, lr=3e-4, batch_size=32, task_weights=dict(multiple_choice=3),
             shapesworld=dict(seed=7, num_images=500, num_videos=1500, image_choice=True)),
        VIDEO_STAGE,
        ENCODER_STAGE,
        VIDEO_REFIT_STAGE,
        LOCATION_QA_STAGE,
        LAST_LOCATION_STAGE,
        TIME_STAGE,
        SHORT_ANSWER_STAGE,
        OPTION_FIRST_STAGE,
        LOOKUP_STAGE,
        SHUFFLE_STAGE,
        ATTENTION_STAGE,
        ANSWER_WORD_STAGE,
    ],
)

TRAIN_PRESETS: dict[str, dict] = {
    # The embedded defaults: `pixelrefer train --preset shapes-tiny[-lite]` reproduces them. shapes-tiny (Vision-Object)
    # starts from shapes-tiny-lite's weights and architecture (`weights_from`: every tensor but Lite's infusion module;
    # the same LLM, encoders, object MLP and time embedding) and has no stage of its own before its frozen-media
    # stages, which teach the LLM the global image and video tokens (`TRANSFER_STAGE`) and then Lite's answer words
    # with the supervised lookup (`TINY_ANSWER_WORD_STAGE`, `TINY_SETTLE_STAGE`). Its from-scratch recipe up to
    # v15 is in docs/embedded-models.md; `weights_from=None` with `steps` and the stages set runs one.
    "shapes-tiny": dict(
        SHAPES_TINY_LITE,
        framework="vision_object",
        model_overrides={},  # the architecture comes with the weights
        weights_from="shapes-tiny-lite",
        output_dir="runs/train/shapes-tiny",
        vision_pretrain_steps=0,
        llm_pretrain_steps=0,
        steps=0,
        text_choice_records=0,
        media_stages=[*TRANSFER_STAGES, TINY_ANSWER_WORD_STAGE, TINY_SETTLE_STAGE],
    ),
    "shapes-tiny-lite": SHAPES_TINY_LITE,
}
# What the notebooks' and the ablations' short runs change in that recipe: no LLM stage (2000 steps of 128
# questions), no lettered questions mixed in, the LLM at the rate of a run with no letters to keep, no
# frozen-media stage, and the tiny preset's random weights (no `weights_from`).
SHORT_RUN = dict(llm_pretrain_steps=0, text_choice_records=0, task_weights={}, lr_llm=1e-3, media_stages=[],
                 weights_from=None)


def preset_config(name: str, **overrides) -> TrainConfig:
    """A `TrainConfig` from `TRAIN_PRESETS`, with keyword overrides."""
    if name not in TRAIN_PRESETS:
        raise KeyError(f"unknown training preset {name!r}; known: {', '.join(sorted(TRAIN_PRESETS))}")
    return TrainConfig(**{**TRAIN_PRESETS[name], **overrides})


@dataclass
class TrainResult:
    """What a run produced: per-step losses (of this and earlier sessions) and where things are."""

    losses: list[float]
    final_dir: Path
    skipped: list[str]
    seconds: float


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parameter_groups(model, rates: dict[str, float | None], weight_decay: float) -> list[dict]:
    """AdamW groups by module; a frozen vision encoder gets none."""
    groups: dict[str, list] = {name: [] for name in rates}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("model.vision_model"):
            if rates.get("vision_encoder") is None:
                raise ValueError("the vision encoder is trainable but lr_vision_encoder is not set")
            groups["vision_encoder"].append(parameter)
        elif name.startswith(("model.object_tokenizer", "model.infusion")):
            groups["object_encoder"].append(parameter)
        elif name.startswith("model.projector"):
            groups["projector"].append(parameter)
        elif name.startswith(("model.language_model", "lm_head")):
            groups["llm"].append(parameter)
        else:
            raise ValueError(f"parameter {name} belongs to no optimizer group")
    return [dict(params=p, lr=rates[n], weight_decay=weight_decay, name=n) for n, p in groups.items() if p]


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of an epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def step_indices(step: int, num_samples: int, seed: int, per_step: int) -> list[int]:
    """Indices of the global batch of optimizer step `step` (epochs continue seamlessly)."""
    start = step * per_step
    indices = []
    while len(indices) < per_step:
        position = start + len(indices)
        epoch, offset = divmod(position, num_samples)
        order = epoch_order(num_samples, seed, epoch)
        indices.extend(order[offset : offset + per_step - len(indices)])
    return indices


def weighted_pool(samples: Sequence, task_weights: dict[str, int]) -> list[int]:
    """Sample indices, each repeated by its task's weight (default 1): what the epochs of `step_indices` run over.
    Raises on a weight that is not a positive integer or a task no sample has."""
    if not task_weights:
        return list(range(len(samples)))
    tasks = [getattr(sample, "task", None) for sample in samples]
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        raise ValueError(f"task_weights names tasks no training record has: {unknown}; "
                         f"the records' tasks are {sorted({t for t in tasks if t})}")
    for task, weight in task_weights.items():
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError(f"task_weights[{task!r}] must be a positive integer (repeats), got {weight!r}")
    return [i for i, task in enumerate(tasks) for _ in range(task_weights.get(task, 1))]


def _accelerator(mixed_precision: str) -> Accelerator:
    """An `Accelerator` for this run. accelerate keeps one process-wide state whose precision cannot change;
    in a single process (a notebook training twice) a state made with another precision is reset first."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision)


def copy_vision_encoder(source: str, model) -> None:
    """Load the vision encoder of `source` (an embedded model or checkpoint folder) into `model`."""
    donor, _ = load(source)
    mine, theirs = model.config.vision_config.to_dict(), donor.config.vision_config.to_dict()
    differing = sorted(k for k in mine.keys() | theirs.keys()
                       if k not in _VOLATILE_CONFIG_KEYS and mine.get(k) != theirs.get(k))
    if differing:
        raise ValueError(f"vision_encoder_from={source!r}: its vision encoder differs from the model's in {differing}")
    model.model.vision_model.load_state_dict(donor.model.vision_model.state_dict())


def architecture_of(source: str) -> dict:
    """The model config of `source` (an embedded model or checkpoint folder) as `PixelReferConfig` overrides,
    framework aside: what `weights_from` builds the model with before `framework` and `model_overrides` apply."""
    from pixelrefer.config import PixelReferConfig
    from pixelrefer.inference import ASSETS, embedded_models

    path = ASSETS / source if source in embedded_models() else Path(source)
    if not (path / "config.json").is_file():
        raise ValueError(f"weights_from={source!r} is neither an embedded model ({', '.join(embedded_models())}) "
                         "nor a checkpoint folder with a config.json")
    config = PixelReferConfig.from_pretrained(path).to_dict()
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS | {"model_type", "framework"}}


def copy_weights(source: str, model, tokenizer=None) -> dict[str, list[str]]:
    """Start `model` from the weights of `source` (an embedded model or checkpoint folder), across frameworks:
    every parameter and buffer of the same name is copied. The two must have the same LLM and vision encoder
    (their configs, and `tokenizer`'s vocabulary when given, are compared; what differs is named), and a tensor
    both have must have one shape. Returns what was not copied: `kept` (this model's own, e.g. the infusion
    module of an Object-Only model started from a Vision-Object one, left at its initialisation and warned
    about) and `left_out` (the source's, e.g. that infusion module going the other way)."""
    donor, donor_processor = load(source)
    for part in ("text_config", "vision_config"):
        mine, theirs = getattr(model.config, part).to_dict(), getattr(donor.config, part).to_dict()
        differing = sorted(k for k in mine.keys() | theirs.keys()
                           if k not in _VOLATILE_CONFIG_KEYS and mine.get(k) != theirs.get(k))
        if differing:
            raise ValueError(f"weights_from={source!r}: its {part} differs from the model's in {differing}")
    if tokenizer is not None and tokenizer.get_vocab() != donor_processor.tokenizer.get_vocab():
        raise ValueError(f"weights_from={source!r}: its tokenizer's vocabulary is not the model's")
    mine, theirs = model.state_dict(), donor.state_dict()
    shapes = sorted(f"{k} {tuple(theirs[k].shape)} -> {tuple(v.shape)}" for k, v in mine.items()
                    if k in theirs and theirs[k].shape != v.shape)
    if shapes:
        raise ValueError(f"weights_from={source!r}: tensors of other shapes: {shapes}")
    model.load_state_dict({k: theirs[k] for k in mine if k in theirs}, strict=False)
    report = dict(kept=sorted(k for k in mine if k not in theirs), left_out=sorted(k for k in theirs if k not in mine))
    if report["kept"]:
        warnings.warn(f"weights_from={source!r} has no {report['kept']}: they keep their initialisation", stacklevel=2)
    return report


ATTRIBUTES = ("category", "colour", "size")  # what stage 0 learns to name, where the records give it


def labelled_objects(samples: Sequence) -> tuple[list[int], dict[str, list[str]]]:
    """Indices of image samples whose every mask has a category (`meta["objects"]`), and per attribute
    (category, and colour / size where every chosen object has them) its sorted values."""
    chosen, values = [], {name: set() for name in ATTRIBUTES}
    for i, sample in enumerate(samples):
        objects = getattr(sample, "meta", {}).get("objects") or []
        if getattr(sample, "image", None) is None or not objects or len(objects) != len(sample.masks):
            continue
        if all(isinstance(o, dict) and o.get("category") for o in objects):
            chosen.append(i)
            for name in ATTRIBUTES:
                values[name].update(o.get(name) for o in objects)
    return chosen, {name: sorted(v) for name, v in values.items() if v and None not in v}


def pooled_object_features(model, processor: PixelReferProcessor, samples: Sequence,
                           autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """(objects, C) mean vision feature of each object's foreground crop cells, object after object of
    `samples` (image records): the object tokenizer's own crops, one vision-encoder call. What stage 0 trains
    on and what `pixelrefer.analysis.probe` reads."""
    inner = model.model
    device = next(inner.vision_model.parameters()).device
    loaded = [sample.load_media() for sample in samples]
    prompts = [[{"role": "user", "content": "<image>\n" + "<region>" * len(masks)}] for _, _, _, masks in loaded]
    encoded = processor(text=prompts, images=[image for _, image, _, _ in loaded],
                        masks=[masks for _, _, _, masks in loaded])
    grids = encoded["region_grid_thw"].to(device)
    cell_mask = encoded["region_cell_mask"].to(device).float()
    with autocast():
        features = inner.encode_vision(encoded["region_pixel_values"].to(device), grids)
    owner = torch.repeat_interleave(torch.arange(grids.shape[0], device=device), grids.prod(-1))
    sums = torch.zeros(grids.shape[0], features.shape[-1], device=device).index_add_(
        0, owner, features.float() * cell_mask[:, None])
    counts = torch.zeros(grids.shape[0], device=device).index_add_(0, owner, cell_mask)
    return sums / counts.clamp(min=1)[:, None]


def pretrain_vision_encoder(model, processor: PixelReferProcessor, samples: Sequence, *, steps: int, lr: float,
                            batch_size: int, seed: int = 0, warmup_ratio: float = 0.03,
                            autocast: Callable = contextlib.nullcontext,
                            callback: Callable[[int, float], None] | None = None,
                            checkpoint: StageCheckpoint | None = None) -> list[float]:
    """Stage 0: train `model`'s vision encoder to name each object's category and colour (and size).

    Each step encodes `batch_size` labelled records with the processor (the object tokenizer's own crops),
    runs the vision encoder once over all crops, averages every object's foreground cell features and
    applies one linear head per attribute (created here, discarded after); the loss is the sum of their
    cross-entropies. An attribute is used when every labelled object has it (ShapesWorld's parts have no
    size, so its stage 0 names category and colour). Naming colour keeps it in the features: an encoder
    trained on categories alone forgot colour, and it stays frozen after. AdamW, cosine schedule with warm-up, gradient
    norm clipped at 1. `callback(step, loss)` runs after each step; `checkpoint` saves the encoder, the heads and
    the optimizer every few steps and continues from its last save (`pixelrefer.stage_checkpoint`). Returns the
    per-step losses.
    """
    chosen, attributes = labelled_objects(samples)
    if not chosen:
        raise ValueError("vision_pretrain_steps needs image records whose objects carry categories "
                         "(`objects: [{category: ...}]` per mask, as ShapesWorld writes them)")
    vision = model.model.vision_model
    device = next(vision.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    heads = torch.nn.ModuleDict(
        {name: torch.nn.Linear(vision.config.hidden_size, len(values)) for name, values in attributes.items()})
    with torch.no_grad():
        for head in heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
            head.bias.zero_()
    heads.to(device)
    trainable = [p.requires_grad for p in vision.parameters()]
    vision.requires_grad_(True)
    parameters = list(vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    tensors = {**{f"vision.{n}": p for n, p in vision.named_parameters()},
               **{f"heads.{n}": p for n, p in heads.named_parameters()}}
    saved = dict(tensors=tensors, optimizer=optimizer, scheduler=scheduler, sampler=generator)
    start, losses = checkpoint.restore(**saved) if checkpoint else (0, [])
    vision.train()
    for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="stage 0: vision encoder"):
        picks = torch.randint(len(chosen), (batch_size,), generator=generator).tolist()
        items = [samples[chosen[i]] for i in picks]
        pooled = pooled_object_features(model, processor, items, autocast=autocast)
        loss = sum(
            torch.nn.functional.cross_entropy(
                heads[name](pooled),
                torch.tensor([values.index(o[name]) for item in items for o in item.meta["objects"]], device=device))
            for name, values in attributes.items())
        losses.append(_descend(loss, optimizer, scheduler, parameters))
        if checkpoint and checkpoint.due(step, steps):
            checkpoint.save(step, losses, **saved)
        if callback is not None:
            callback(step, losses[-1])
    for parameter, flag in zip(vision.parameters(), trainable):
        parameter.requires_grad_(flag)
    return losses


def pretrain_language_model(model, processor: PixelReferProcessor, *, steps: int, lr: float, batch_size: int,
                            seed: int = 0, warmup_ratio: float = 0.03, max_objects: int = 1,
                            autocast: Callable = contextlib.nullcontext,
                            callback: Callable[[int, float], None] | None = None,
                            checkpoint: StageCheckpoint | None = None) -> list[float]:
    """LLM stage: train `model`'s LLM (embeddings, layers, head) on text-only lettered questions.

    Each step draws `batch_size` conversations from `pixelrefer.data.text_tasks.text_choice` (seeded by
    `seed`, its own generator; facts about up to `max_objects` objects: with three, the 4-layer tiny LLM
    stayed at chance for 5000 steps, with one it learns the letters, see `benchmarks/text_choice.py`),
    encodes them with the processor (no image, no region) and minimises the model's loss on the answers.
    AdamW, cosine schedule with warm-up, gradient norm clipped at 1; only the LLM's parameters are given to
    the optimizer. `callback(step, loss)` runs after each step (e.g. to measure or save the LLM on the way);
    `checkpoint` saves the LLM and the optimizer every few steps and continues from its last save.
    Returns the per-step losses.
    """
    from pixelrefer.data.text_tasks import text_choice

    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    named = {n: p for n, p in model.named_parameters() if n.startswith(LLM_PREFIXES)}
    parameters = list(named.values())
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    saved = dict(tensors=named, optimizer=optimizer, scheduler=scheduler, sampler=rng)
    start, losses = checkpoint.restore(**saved) if checkpoint else (0, [])
    model.train()
    for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="LLM stage: lettered questions"):
        batch = processor(text=[text_choice(rng, max_objects=max_objects) for _ in range(batch_size)]).to(device)
        with autocast():
            loss = model(**batch).loss
        losses.append(_descend(loss, optimizer, scheduler, parameters))
        if checkpoint and checkpoint.due(step, steps):
            checkpoint.save(step, losses, **saved)
        if callback is not None:
            callback(step, losses[-1])
    return losses


def loss_histories(output_dir: str | Path) -> dict[str, list[float]]:
    """{stage: losses, one per step} of every stage a run in `output_dir` has finished, in the order they ran:
    `vision_pretrain`, `llm_pretrain`, the main stage (`final`), then `media_stage`, `media_stage_2`, …"""
    output_dir = Path(output_dir)
    names = [VISION_PRETRAIN, LLM_PRETRAIN, "final"]
    media = sorted((p.parent.name for p in output_dir.glob(f"{MEDIA_STAGE}*/loss_history.json")),
                   key=lambda name: int(name.rpartition("_")[2]) if name != MEDIA_STAGE else 1)
    histories = {}
    for name in names + media:
        path = output_dir / name / "loss_history.json"
        if path.is_file():
            histories[name] = json.loads(path.read_text())
    return histories


def save_stage(folder: Path, filename: str, module: torch.nn.Module, losses: list[float],
               prefixes: tuple[str, ...] = ("",)) -> None:
    """Write a pre-training stage's folder atomically: `module`'s parameters under `prefixes` in `filename`
    and the stage's losses in `loss_history.json`. A training run whose `output_dir` holds this folder
    (e.g. `llm_pretrain/language_model.safetensors`) loads it instead of running the stage."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous()  # clone: tied weights cannot share storage in a file
             for k, v in module.state_dict().items() if k.startswith(prefixes)}
    save_file(state, tmp / filename)
    atomic_write_text(tmp / "loss_history.json", json.dumps(losses))
    old = folder.with_name(f".{folder.name}.old")  # the previous folder stays on disk until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _descend(loss: torch.Tensor, optimizer, scheduler, parameters: list) -> float:
    """One step of a pre-training stage: backward, gradient norm clipped at 1, optimizer and schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


class Trainer:
    """Runs `TrainConfig` on `samples` (objects with `load_media()`, e.g. `pixelrefer.data.Sample`)."""

    def __init__(self, config: TrainConfig, samples: Sequence, accelerator: Accelerator | None = None):
        if not samples:
            raise ValueError("no training samples")
        self.config = config
        if config.text_choice_records:
            from pixelrefer.data.text_tasks import text_choice_records

            samples = list(samples) + text_choice_records(config.text_choice_records, config.seed)
        self.samples = samples
        self.pool = weighted_pool(samples, config.task_weights)
        self.accelerator = accelerator or _accelerator(config.mixed_precision)
        self.output = Path(config.output_dir)
        overrides = {"framework": config.framework, **config.model_overrides}
        if config.weights_from:
            if Path(config.model).is_dir():
                raise ValueError(f"weights_from={config.weights_from!r} starts a preset model from other weights, "
                                 f"but model={config.model!r} is a checkpoint already")
            overrides = {**architecture_of(config.weights_from), **overrides}
        if Path(config.model).is_dir():
            overrides = {}  # a checkpoint brings its own config
        with warnings.catch_warnings():  # random weights are what training starts from
            warnings.filterwarnings("ignore", message="preset .* has random weights")
            model, self.processor = load(config.model, seed=config.seed, **overrides)
        self.weights_copied = copy_weights(config.weights_from, model, self.processor.tokenizer) \
            if config.weights_from else None
        if config.vision_encoder_from:
            copy_vision_encoder(config.vision_encoder_from, model)
        model.train()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        groups = parameter_groups(model, config.learning_rates(), config.weight_decay)
        optimizer = torch.optim.AdamW(groups)
        warmup = math.ceil(config.warmup_ratio * config.steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
        # The scheduler stays out of `prepare`: accelerate would step it once per process per call, while
        # `steps` here already counts global optimizer steps.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.step, self.losses, self.skipped = 0, [], []

    # ------------------------------------------------------------------ data
    @property
    def per_step(self) -> int:
        cfg = self.config
        return cfg.batch_size * cfg.grad_accum * self.accelerator.num_processes

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches of `step`: slices of the step's global batch."""
        cfg, acc = self.config, self.accelerator
        indices = [self.pool[i] for i in step_indices(step, len(self.pool), cfg.seed, self.per_step)]
        batches = []
        for micro in range(cfg.grad_accum):
            start = (micro * acc.num_processes + acc.process_index) * cfg.batch_size
            batches.append(indices[start : start + cfg.batch_size])
        return batches

    def encode(self, indices: list[int]) -> tuple:
        """Load and encode samples as one batch, and list the records skipped. A bad record raises naming it,
        or is skipped (listed as "where: why") with `skip_bad`."""
        loaded, skipped = [], []
        for i in indices:
            try:
                loaded.append((i, self.samples[i].load_media()))
            except (InputError, OSError) as error:
                skipped.append(self._bad(i, error))
        try:
            return self._encode_batch([item for _, item in loaded]), skipped
        except InputError:
            good = []
            for i, item in loaded:  # find the culprit: the batch error names only its position
                try:
                    self._encode_batch([item])
                    good.append(item)
                except InputError as error:
                    skipped.append(self._bad(i, error))
            return self._encode_batch(good), skipped

    def step_batches(self, step: int) -> tuple[list, list[str]]:
        """This process's encoded micro-batches of `step` and the records skipped while encoding them."""
        encoded = [self.encode(ids) for ids in self.micro_batches(step)]
        return [batch for batch, _ in encoded], [where for _, skipped in encoded for where in skipped]

    def _encode_batch(self, items):
        if not items:
            return None
        text, images, videos, masks = (list(column) for column in zip(*items))
        return self.processor(text=text, images=images, videos=videos, masks=masks)

    def _bad(self, index: int, error: Exception) -> str:
        where = getattr(self.samples[index], "where", f"sample {index}")
        if not self.config.skip_bad:
            raise InputError(f"bad training record {where}: {error} (set skip_bad to skip such records)") from error
        return f"{where}: {error}"

    def _prepared_steps(self, first: int) -> Iterator[tuple[list, list[str]]]:
        """`step_batches` of steps first, first+1, …: in the loop, or `num_workers` processes ahead of it.
        Batches are a function of the step alone, so both give the same data in the same order."""
        workers = self.config.num_workers
        if not workers:
            return (self.step_batches(step) for step in range(first, self.config.steps))
        loader = torch.utils.data.DataLoader(
            _Steps(self, first), batch_size=None, num_workers=workers, collate_fn=_keep, prefetch_factor=2,
            multiprocessing_context="fork")  # the workers share the trainer's samples and processor
        return iter(loader)

    # ------------------------------------------------------------------ loop
    def train_step(self, prepared: tuple[list, list[str]] | None = None) -> float:
        """One optimizer step over the global batch (`prepared`: its `step_batches`, encoded ahead);
        returns the global token-mean loss."""
        acc = self.accelerator
        batches, skipped = prepared if prepared is not None else self.step_batches(self.step)
        self.skipped += skipped
        tokens = [int((b["labels"][:, 1:] != -100).sum()) if b is not None and "labels" in b else 0 for b in batches]
        total = acc.reduce(torch.tensor(float(sum(tokens)), device=acc.device), reduction="sum")
        if total.item() == 0:
            raise ValueError(f"step {self.step}: the global batch has no supervised token")
        summed = torch.zeros((), device=acc.device)
        for m, batch in enumerate(batches):
            last = m == len(batches) - 1
            context = acc.no_sync(self.model) if not last and acc.num_processes > 1 else contextlib.nullcontext()
            with context:
                if batch is None or tokens[m] == 0:
                    loss = sum(p.sum() * 0 for p in self.model.parameters() if p.requires_grad)
                else:
                    batch = batch.to(acc.device)
                    # sum over this micro-batch's tokens / global count; × processes undoes DDP's averaging
                    out = self.model(**batch, num_items_in_batch=total / acc.num_processes)
                    loss = out.loss
                    summed += loss.detach() / acc.num_processes
                acc.backward(loss)
        if self.config.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return acc.reduce(summed, reduction="sum").item()

    def run(self, stop_after: int | None = None, callback: Callable[[int, float], None] | None = None,
            stage_callback: Callable[[str, int, float], None] | None = None) -> TrainResult:
        """Train to `config.steps` (or stop after `stop_after` steps of this call), resuming if a checkpoint exists.

        `callback(step, loss)` runs after each main step, `stage_callback(stage, step, loss)` after each step of
        stage 0, the LLM stage and the frozen-media stages (`stage` is the stage's folder name).
        """
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        if not self.resume():
            if cfg.vision_pretrain_steps:
                self.pretrain_vision(stage_callback)
            if cfg.llm_pretrain_steps:
                self.pretrain_llm(stage_callback)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        done = 0
        prepared = self._prepared_steps(self.step)
        while self.step < cfg.steps and (stop_after is None or done < stop_after):
            tick = time.perf_counter()
            loss = self.train_step(next(prepared))
            self.losses.append(loss)
            done += 1
            rate = self.per_step / max(time.perf_counter() - tick, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.1f}")
            if callback is not None:
                callback(self.step, loss)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        final = self.output / "final"
        if self.step == cfg.steps:
            for index in range(len(cfg.frozen_media_stages())):
                self.media_stage(index, stage_callback)
            self.save_model(final)
            if acc.is_main_process:
                atomic_write_text(final / "loss_history.json", json.dumps(self.losses))
                from pixelrefer.visualize import plot_loss_histories, save_figure

                save_figure(plot_loss_histories(loss_histories(self.output)), final / "loss.png")
        return TrainResult(self.losses, final, self.skipped, time.perf_counter() - started)

    # ------------------------------------------------------------ stage 0 and the LLM stage
    def pretrain_vision(self, callback: Callable[[str, int, float], None] | None = None) -> list[float]:
        """Stage 0: fit the vision encoder to object categories (main process), then load it everywhere."""
        cfg, acc = self.config, self.accelerator
        model = acc.unwrap_model(self.model)
        fit = functools.partial(
            pretrain_vision_encoder, model, self.processor, self.vision_pretrain_samples(), steps=cfg.vision_pretrain_steps,
            lr=cfg.vision_pretrain_lr, batch_size=cfg.batch_size, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
            autocast=acc.autocast, callback=_named(callback, VISION_PRETRAIN),
            checkpoint=self.stage_checkpoint(VISION_PRETRAIN))
        return self._saved_stage(VISION_PRETRAIN, "vision_encoder.safetensors", model.model.vision_model, fit)

    def pretrain_llm(self, callback: Callable[[str, int, float], None] | None = None) -> list[float]:
        """LLM stage: fit the LLM to text-only lettered questions (main process), then load it everywhere."""
        cfg, acc = self.config, self.accelerator
        model = acc.unwrap_model(self.model)
        fit = functools.partial(
            pretrain_language_model, model, self.processor, steps=cfg.llm_pretrain_steps, lr=cfg.llm_pretrain_lr,
            batch_size=cfg.llm_pretrain_batch_size or cfg.batch_size, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
            max_objects=cfg.llm_pretrain_max_objects, autocast=acc.autocast, callback=_named(callback, LLM_PRETRAIN),
            checkpoint=self.stage_checkpoint(LLM_PRETRAIN))
        return self._saved_stage(LLM_PRETRAIN, "language_model.safetensors", model, fit, prefixes=LLM_PREFIXES)

    def stage_checkpoint(self, name: str, **settings) -> StageCheckpoint:
        """Where stage `name` saves its progress every `save_every` steps: `output_dir/name.partial/`, tied to
        the run's trajectory and the stage's own `settings` (removed once the stage's folder is written)."""
        fingerprint = json.loads(json.dumps(dict(run=_trajectory(self.config), stage=name, **settings)))
        return StageCheckpoint(self.output / f"{name}{PARTIAL}", self.config.save_every, fingerprint)

    def media_stage(self, index: int = 0, callback: Callable[[str, int, float], None] | None = None) -> list[float]:
        """Frozen-media stage `index`: cache every record's media tokens, then fit the LLM alone on them (main
        process); loaded everywhere after, and loaded instead of refit when its folder exists."""
        from pixelrefer.cached_media import (OBJECT_MLP, OBJECT_TIME, PROJECTOR, cache_media, media_token_ids,
                                             train_on_cached_media)
        from pixelrefer.letter_attention import LetterAttention
        from pixelrefer.option_order import OptionTokens

        cfg, acc = self.config, self.accelerator
        stage = cfg.frozen_media_stages()[index]
        model = acc.unwrap_model(self.model)
        prefixes = LLM_PREFIXES
        if stage.position_scale != 1.0:
            prefixes += (f"{POSITION_LINEAR}.",)
            if getattr(model.model.object_tokenizer, "position_proj", None) is None:
                raise ValueError(f"media_stages[{index}]: position_scale needs the position encoding, "
                                 "which this model does not use")
        if stage.object_time_embedding is not None:
            self._add_time_embedding(model, index)
        layers = self._add_language_layers(model, stage.language_layers) if stage.language_layers else []
        heads = self._widen_attention(model, stage.attention_heads) if stage.attention_heads else []
        fresh = {}
        if stage.new_lr is not None:  # after both: widening replaces the new layers' projections too
            from pixelrefer.modeling.depth import added_parameters, new_head_entries

            fresh = {**(new_head_entries(model, heads) if heads else {}), **added_parameters(model, layers)}
        if stage.object_mlp_lr is not None:
            prefixes += (OBJECT_MLP, OBJECT_TIME)
        if stage.projector_lr is not None:
            if model.config.is_lite:
                raise ValueError(f"media_stages[{index}]: projector_lr trains the image projector, which an "
                                 "object-only (Lite) model does not use")
            prefixes += (PROJECTOR,)
        if stage.vision_steps:
            prefixes += (VISION_MODEL,)
        autocast = acc.autocast
        if stage.mixed_precision == "bf16":
            device = next(model.parameters()).device
            autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)

        def fit() -> list[float]:
            name = MediaStage.folder(index)
            if stage.vision_steps:
                where = f"media_stages[{index}].vision_shapesworld"
                images = (self._own_shapesworld(f"{name}_vision", stage.vision_shapesworld, where)
                          if stage.vision_shapesworld else self.samples)
                pretrain_vision_encoder(
                    model, self.processor, images, steps=stage.vision_steps, lr=stage.vision_lr,
                    batch_size=stage.vision_batch_size, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
                    autocast=acc.autocast, callback=_named(callback, f"{name}_vision"),
                    checkpoint=self.stage_checkpoint(f"{name}_vision", settings=dataclasses.asdict(stage)))
            if stage.position_scale != 1.0:
                with torch.no_grad():
                    model.model.object_tokenizer.position_proj.weight.mul_(stage.position_scale)
            if stage.object_time_embedding is not None:
                model.model.object_tokenizer.time_embedding.start_at_norm(stage.object_time_embedding, seed=cfg.seed)
            records = cache_media(model, self.processor, self.media_stage_samples(index),
                                  progress=acc.is_main_process, objects=stage.object_mlp_lr is not None,
                                  vision=stage.projector_lr is not None)
            lettered = (stage.shuffle_options or stage.letter_weight != 1.0 or stage.letter_drill
                        or stage.letter_attention is not None)
            option_tokens = (OptionTokens.of(self.processor.tokenizer, media_token_ids(model.config))
                             if lettered else None)
            return train_on_cached_media(
                model, records, steps=stage.steps, lr=stage.lr, batch_size=stage.batch_size, seed=cfg.seed,
                warmup_ratio=cfg.warmup_ratio, task_weights=stage.task_weights, autocast=autocast,
                object_mlp_lr=stage.object_mlp_lr, projector_lr=stage.projector_lr, callback=_named(callback, name),
                option_tokens=option_tokens if stage.shuffle_options else None,
                letter_weight=stage.letter_weight, letter_tokens=option_tokens, letter_drill=stage.letter_drill,
                fresh=fresh if stage.new_lr is not None else None, fresh_lr=stage.new_lr,
                letter_attention=LetterAttention(**stage.letter_attention) if stage.letter_attention else None,
                checkpoint=self.stage_checkpoint(name, settings=dataclasses.asdict(stage),
                                                 before=[dataclasses.asdict(s) for s in cfg.frozen_media_stages()[:index]]))

        return self._saved_stage(MediaStage.folder(index), "language_model.safetensors", model, fit,
                                 prefixes=prefixes)

    def _add_language_layers(self, model, count: int) -> list[int]:
        """Append `count` identity-start decoder layers to `model`'s LLM; the processor's config says so too (it
        writes the config.json a saved model is loaded from). Returns their indices."""
        from pixelrefer.modeling.depth import add_language_layers

        added = add_language_layers(model, count, seed=self.config.seed)
        text, saved = model.config.text_config, self.processor.config.text_config
        saved.num_hidden_layers = text.num_hidden_layers
        if getattr(text, "layer_types", None) is not None:
            saved.layer_types = list(text.layer_types)
        return added

    def _widen_attention(self, model, heads: int) -> list[int]:
        """`widen_attention` on `model`'s LLM; the processor's config says so too (as `_add_language_layers`).
        Returns the new query heads' indices."""
        from pixelrefer.modeling.depth import widen_attention

        added = widen_attention(model, heads, seed=self.config.seed)
        text, saved = model.config.text_config, self.processor.config.text_config
        saved.num_attention_heads, saved.num_key_value_heads = text.num_attention_heads, text.num_key_value_heads
        saved.head_dim = text.head_dim
        return added

    def _add_time_embedding(self, model, index: int) -> None:
        """Give `model` its object time embedding (zero until the stage starts it), for media stage `index`; the
        processor's config says so too (it writes the config.json a saved model is loaded from)."""
        from pixelrefer.modeling.time_embedding import FrameTimeEmbedding

        tokenizer = model.model.object_tokenizer
        if tokenizer.time_embedding is not None:
            raise ValueError(f"media_stages[{index}].object_time_embedding switches the object time embedding on, "
                             "but the model has one already (object_time_embedding in its config)")
        model.config.object_time_embedding = self.processor.config.object_time_embedding = True
        device = next(tokenizer.parameters()).device
        tokenizer.time_embedding = FrameTimeEmbedding(model.config.text_config.hidden_size,
                                                      model.config.object_time_frames).to(device)

    def media_stage_samples(self, index: int = 0) -> Sequence:
        """Frozen-media stage `index`'s records: its own ShapesWorld (generated once into `output_dir`), else
        the main stage's; and its `text_choice_records`, if any."""
        from pixelrefer.data.text_tasks import text_choice_records

        stage = self.config.frozen_media_stages()[index]
        samples = self.samples
        if stage.shapesworld:
            where = f"media_stages[{index}].shapesworld"
            samples = self._own_shapesworld(MediaStage.folder(index), stage.shapesworld, where)
        if not stage.text_choice_records:
            return samples
        first = bool((stage.shapesworld or {}).get("option_first"))
        return list(samples) + text_choice_records(stage.text_choice_records, seed=self.config.seed + 1 + index,
                                                   option_first=first, context_objects=stage.text_choice_context)

    def vision_pretrain_samples(self) -> Sequence:
        """Stage 0's records: its own ShapesWorld (`vision_pretrain_shapesworld`, generated once into
        `output_dir`), else the main stage's. More images than the main stage has keep the encoder from
        learning its training objects by heart (docs/embedded-models.md, "Stage 0 is data-limited")."""
        spec = self.config.vision_pretrain_shapesworld
        if not spec:
            return self.samples
        return self._own_shapesworld(VISION_PRETRAIN, spec, "vision_pretrain_shapesworld")

    def _own_shapesworld(self, stage: str, spec: dict, where: str) -> Sequence:
        """The train split of a ShapesWorld generated once, from `spec`, into `output_dir/<stage>_shapesworld`."""
        import inspect

        from pixelrefer.data import generate_shapesworld, load_annotations

        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a dict of generate_shapesworld arguments, got {spec!r}")
        known = set(inspect.signature(generate_shapesworld).parameters) - {"out_dir"}
        if unknown := sorted(set(spec) - known):
            raise ValueError(f"{where}: unknown generate_shapesworld arguments {unknown}; known: {sorted(known)}")
        root = self.output / f"{stage}_shapesworld"
        if not (root / "train.json").exists():
            generate_shapesworld(root, **spec)
        return load_annotations(root / "train.json", root)

    def _saved_stage(self, name: str, filename: str, module: torch.nn.Module, fit: Callable[[], list[float]],
                     prefixes: tuple[str, ...] = ("",)) -> list[float]:
        """Run a pre-training stage once: `fit()` on the main process with the global RNG state put back after,
        `module`'s parameters under `prefixes` saved atomically to `output_dir/name/filename` with the losses,
        then loaded on every process. A folder already there (a resumed or copied run) is loaded, not refit.
        `fit` saves its progress in `output_dir/name.partial/` (`stage_checkpoint`), removed once the folder is
        written, so a run killed inside a stage continues that stage where it stopped."""
        from safetensors.torch import load_file

        acc = self.accelerator
        folder = self.output / name
        weights = folder / filename
        losses = []
        if not weights.exists() and acc.is_main_process:
            rng = _rng_state()
            losses = fit()
            _set_rng_state(rng)
            save_stage(folder, filename, module, losses, prefixes)
            for part in (name, f"{name}_vision"):  # the stage's own checkpoints
                shutil.rmtree(self.output / f"{part}{PARTIAL}", ignore_errors=True)
        acc.wait_for_everyone()
        state = load_file(weights)
        wanted = {k for k in module.state_dict() if k.startswith(prefixes)}
        if set(state) != wanted:
            raise ValueError(f"{weights} does not match the model: missing {sorted(wanted - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - wanted)[:5]}")
        module.load_state_dict(state, strict=False)
        return losses

    # ------------------------------------------------------------ checkpoints
    def save_model(self, path: Path) -> None:
        """Model, processor and TrainConfig, ready for `pixelrefer.load(path)`."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(self.model).save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            self.config.save(tmp / "train_config.json")
            _replace_dir(tmp, path)
        acc.wait_for_everyone()

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        path = self.output / CHECKPOINTS / f"step-{self.step:07d}"
        self.save_model(path)
        if acc.is_main_process:
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
            state = dict(step=self.step, losses=self.losses, skipped=self.skipped, rng=_rng_state())
            atomic_write_text(path / "trainer_state.json", json.dumps(state))
            atomic_write_text(self.output / CHECKPOINTS / "latest", path.name)
        acc.wait_for_everyone()

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in `output_dir`, if any."""
        pointer = self.output / CHECKPOINTS / "latest"
        if not pointer.exists():
            return False
        path = self.output / CHECKPOINTS / pointer.read_text().strip()
        saved = TrainConfig.load(path / "train_config.json")
        if _trajectory(saved) != _trajectory(self.config):
            raise ValueError(f"{path} was written by a different TrainConfig; use another output_dir")
        model = self.accelerator.unwrap_model(self.model)
        differing = _config_differences(json.loads((path / "config.json").read_text()), model.config.to_diff_dict())
        if differing:
            raise ValueError(f"{path}: the model config differs from the checkpoint's in {differing}; "
                             "use another output_dir")
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the model "
                             f"(missing {missing}, unexpected {unexpected})")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.losses, self.skipped = trainer_state["step"], trainer_state["losses"], trainer_state["skipped"]
        _set_rng_state(trainer_state["rng"])
        return True


class _Steps(torch.utils.data.Dataset):
    """Step numbers from `first` on → `Trainer.step_batches`, for the DataLoader's worker processes."""

    def __init__(self, trainer: Trainer, first: int):
        self.trainer, self.first = trainer, first

    def __len__(self) -> int:
        return self.trainer.config.steps - self.first

    def __getitem__(self, index: int) -> tuple[list, list[str]]:
        return self.trainer.step_batches(self.first + index)


def _keep(item):
    return item


def _trajectory(config: TrainConfig) -> dict:
    """Fields that must agree for a resume to continue the same run."""
    fields = dataclasses.asdict(config)
    for name in ("output_dir", "save_every", "steps", "num_workers"):
        fields.pop(name)
    fields.pop("media_stages")  # the frozen-media stages come after the main stage's trajectory
    return fields


_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two model config dicts, ignoring bookkeeping keys."""
    differing = []
    for key in sorted(set(saved) | set(current)):
        if key in _VOLATILE_CONFIG_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differing += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differing.append(f"{prefix}{key}")
    return differing


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path`; an existing `path` is moved aside first and removed after."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _named(callback: Callable[[str, int, float], None] | None, stage: str) -> Callable[[int, float], None] | None:
    """A stage loop's `callback(step, loss)` that reports to `callback(stage, step, loss)`."""
    return None if callback is None else functools.partial(callback, stage)


def _rng_state() -> dict:
    """Python, numpy and torch (CPU) generator states, as JSON."""
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return dict(
        python=[version, list(state), gauss],
        numpy=[kind, keys.tolist(), position, has_gauss, cached],
        torch=torch.get_rng_state().tolist(),
    )


def _set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def training_samples(config: TrainConfig) -> list:
    """The records `config` trains on: `train_data`, or a ShapesWorld generated into the output folder."""
    from pixelrefer.data import generate_shapesworld, load_annotations

    if config.train_data:
        return load_annotations(config.train_data, config.media_root)
    if not config.shapesworld:
        raise ValueError("TrainConfig needs train_data or shapesworld")
    root = Path(config.output_dir) / "shapesworld"
    if not (root / "train.json").exists():
        generate_shapesworld(root, **config.shapesworld)
    return load_annotations(root / "train.json", root)


def train(config: TrainConfig, samples: Sequence | None = None, **run_kwargs) -> TrainResult:
    """Train as `config` says; samples default to `training_samples(config)`."""
    return Trainer(config, samples if samples is not None else training_samples(config)).run(**run_kwargs)


def add_parser(commands) -> None:
    """`pixelrefer train (--preset NAME | --config FILE) [--set KEY=VALUE ...]`."""
    parser = commands.add_parser("train", help="train a model (resumes from the output folder's last checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(TRAIN_PRESETS))
    source.add_argument("--config", help="a TrainConfig JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field (value read as JSON when it parses)")
    parser.set_defaults(handler=_train_command)


def _train_command(args) -> int:
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    config = preset_config(args.preset, **overrides) if args.preset else TrainConfig(
        **{**dataclasses.asdict(TrainConfig.load(args.config)), **overrides})
    result = train(config)
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"{result.final_dir}: {len(result.losses)} steps{last}, {result.seconds / 60:.1f} min, "
          f"{len(result.skipped)} records skipped")
    return 0
