"""Frozen-media stage: train the LLM on object (and vision) tokens computed once.

When the vision encoder, the object encoder (SAOT, OCI) and the image projector are frozen, every record's
object and vision tokens are fixed: computing them once and training only the LLM on them gives the same
gradients as a full step with those modules frozen, at a fraction of the cost (on the `tiny` preset most
of a step's time is the vision encoder on every (object, frame) crop). This is what lets a 2-core machine
run the thousands of video steps the LLM needs before it reads motion from the per-frame object tokens.

`cache_media` runs the model once per record up to its language model and keeps, per record, the token
ids, the labels, the language model's attention mask and the embeddings of the media slots (`<REGION>`,
image and video tokens) in sequence order. `train_on_cached_media` then rebuilds each batch's
`inputs_embeds` as the LLM's own (trainable) token embeddings with the cached media written into their
slots, and trains the LLM's parameters alone.

With `objects=True` a record also keeps its object features as they enter the object MLP (SAOT centroids, or
Lite's infused features), so a stage can train that MLP too: the k-means before it, the position encoding and
OCI stay as they are, and the object tokens are recomputed from those features at every step, exactly as the
full model computes them. This matters because the MLP is where location is lost: a linear readout of an
object's motion from its first and last frame gets 99 % of held-out videos from the centroids, 96 % after
OCI and 80 % from the tokens the MLP makes of them (shapes-tiny-lite, README "Object tokens that know where").

With `vision=True` a record also keeps the global image and video features as they enter the image projector
(after the encoder's token merging; video token compression only drops tokens, and the projector acts on each
token alone), so a stage can train the projector too: Vision-Object's global tokens are recomputed from them at
every step. A stage that changes the vision encoder needs this, or its projector would keep reading the old one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from pixelrefer.errors import InputError
from pixelrefer.letter_attention import (HeadReadout, LetterAttention, QuestionSpans, letter_attention_loss,
                                         question_spans)
from pixelrefer.option_order import OptionTokens, drill_letter, lettered_questions, shuffle_options
from pixelrefer.stage_checkpoint import StageCheckpoint

LLM_PREFIXES = ("model.language_model.", "lm_head.")
OBJECT_MLP = "model.object_tokenizer.mlp."
OBJECT_TIME = "model.object_tokenizer.time_embedding."  # trains with the object MLP
PROJECTOR = "model.projector."


@dataclass
class CachedRecord:
    """One record with its media tokens computed.

    input_ids, labels, attention_mask: (L,) as the processor built them (attention 0 on padded object slots).
    media: (M, D) embeddings of the M media slots of `input_ids`, in sequence order.
    task: the record's task, for weighting; where: names the record in errors.
    kind: a multiple-choice record's question type (Bench-Q `type`: Basic, Sequential, …), else "".
    objects: (N, K, C) features of the record's N object units before the object MLP, or None when not kept.
    object_valid: (N, K) bool real tokens of those units (the MLP's output is zeroed elsewhere).
    object_frames: (N,) frame index of each unit (-1 for an image), for a model whose object tokens carry a time
        embedding (`object_time_embedding`), kept with `objects`.
    vision: (V, C) features entering the image projector of the record's V image and video slots, in sequence
        order, or None when not kept.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    media: Tensor
    task: str
    where: str
    kind: str = ""
    objects: Tensor | None = None
    object_valid: Tensor | None = None
    object_frames: Tensor | None = None
    vision: Tensor | None = None


class _Captured(Exception):
    """Raised by the language-model hook once it has the embeddings: the LLM itself need not run."""


def media_token_ids(config) -> list[int]:
    """Token ids whose embeddings come from the media (object tokens, image and video tokens), not the table."""
    ids = [config.region_token_id]
    for name in ("image_token_id", "video_token_id"):
        value = getattr(config, name, None)
        if value is not None:
            ids.append(int(value))
    return ids


def _media_slots(input_ids: Tensor, media_ids: Tensor) -> Tensor:
    return torch.isin(input_ids, media_ids)


def global_token_ids(config) -> list[int]:
    """Token ids of the global image and video tokens (what the image projector writes)."""
    return [int(v) for v in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if v is not None]


def _projector_inputs(inputs: list[Tensor], batch, input_ids: Tensor, config, where: str) -> Tensor:
    """The projector's inputs of one record (images first, then videos, as VideoLLaMA3 calls it) laid out in
    the sequence order of its image and video slots: (V, C)."""
    calls = iter(inputs)
    parts = {}
    if batch.get("pixel_values") is not None:
        parts[int(config.image_token_id)] = next(calls)
    if batch.get("pixel_values_videos") is not None:
        video = next(calls)
        keep = batch.get("video_compression_mask")
        parts[int(config.video_token_id)] = video if keep is None else video[keep.to(video.device)]
    slots = torch.isin(input_ids, torch.tensor(global_token_ids(config), device=input_ids.device))
    if not parts:
        if slots.any():
            raise RuntimeError(f"{where}: image or video slots but no global features reached the projector")
        return torch.zeros(0, config.vision_config.hidden_size)
    first = next(iter(parts.values()))
    out = first.new_zeros(int(slots.sum()), first.shape[-1])
    ids = input_ids[slots]
    for token_id, features in parts.items():
        rows = ids == token_id
        if int(rows.sum()) != features.shape[0]:
            raise RuntimeError(f"{where}: {features.shape[0]} projector inputs for {int(rows.sum())} slots of "
                               f"token {token_id}")
        out[rows] = features
    return out


@torch.no_grad()
def cache_media(model, processor, samples: Sequence, *, dtype: torch.dtype = torch.float32,
                progress: bool = True, objects: bool = False, vision: bool = False) -> list[CachedRecord]:
    """Every sample's media-slot embeddings as the model (in eval mode) computes them, one record at a time.

    A record that cannot be encoded raises `InputError` naming it. The embeddings are those the language
    model receives, taken by a forward pre-hook on `model.model.language_model`, so they include whatever the
    model does before its LLM (SAOT, OCI, the image projector, video token compression). `objects=True` also
    keeps each record's object features before the object MLP (`CachedRecord.objects`), for a stage that
    trains that MLP; `vision=True` keeps the features entering the image projector (`CachedRecord.vision`), for a
    stage that trains the projector.
    """
    language_model = model.model.language_model
    media_ids = torch.tensor(media_token_ids(model.config))
    captured: dict[str, Tensor] = {}
    inner = model.model
    object_features = inner.get_object_features

    def keep_object_features(*args, **kwargs):
        result = object_features(*args, **kwargs)
        captured["objects"] = result.aggregated.features if result.infused is None else result.infused
        captured["object_valid"] = result.valid
        return result

    def keep_projector_input(_module, args):
        captured.setdefault("projector", []).append(args[0])

    def hook(_module, _args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]
        captured["attention_mask"] = kwargs.get("attention_mask")
        raise _Captured

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    handles = [handle]
    if vision:
        handles.append(inner.projector.register_forward_pre_hook(keep_projector_input))
    if objects:
        inner.get_object_features = keep_object_features
    records = []
    try:
        for sample in tqdm(samples, desc="caching media tokens", disable=not progress):
            where = getattr(sample, "where", repr(sample))
            try:
                text, image, video, masks = sample.load_media()
                batch = processor(text=[text], images=[image], videos=[video], masks=[masks])
            except InputError as error:
                raise InputError(f"cannot cache {where}: {error}") from error
            batch = batch.to(device)
            captured.clear()
            try:
                model(**batch)
            except _Captured:
                pass
            if "inputs_embeds" not in captured:
                raise RuntimeError(f"{where}: the language model was never called")
            input_ids = batch["input_ids"][0]
            embeds = captured["inputs_embeds"][0]
            if embeds.shape[0] != input_ids.shape[0]:
                raise RuntimeError(f"{where}: {embeds.shape[0]} embeddings for {input_ids.shape[0]} token ids")
            mask = captured["attention_mask"]
            if mask is None or mask.ndim != 2:
                raise RuntimeError(f"{where}: expected a 2-D attention mask at the language model")
            slots = _media_slots(input_ids, media_ids.to(input_ids.device))
            kept = {}
            if objects:
                width, tokens = _object_shape(model)
                kept = dict(objects=captured.get("objects", embeds.new_zeros(0, tokens, width)).to("cpu", dtype),
                            object_valid=captured.get("object_valid", torch.zeros(0, tokens, dtype=torch.bool)).cpu(),
                            object_frames=batch.get("region_frame_index", torch.zeros(0, dtype=torch.long)).cpu())
            if vision:
                kept["vision"] = _projector_inputs(captured.get("projector", []), batch, input_ids, model.config,
                                                   where).to("cpu", dtype)
            records.append(CachedRecord(
                input_ids=input_ids.cpu(),
                labels=batch["labels"][0].cpu(),
                attention_mask=mask[0].cpu(),
                media=embeds[slots].to("cpu", dtype),
                task=getattr(sample, "task", None) or "",
                where=where,
                kind=str((getattr(sample, "meta", None) or {}).get("type") or ""),
                **kept,
            ))
    finally:
        for h in handles:
            h.remove()
        if objects:
            del inner.get_object_features  # back to the class's method
        model.train(was_training)
    return records


def _object_shape(model) -> tuple[int, int]:
    """(C, K): the width of the features entering the object MLP and the tokens per object unit."""
    return model.config.vision_config.hidden_size, model.model.object_tokenizer.num_tokens


def collate_cached(records: Sequence[CachedRecord], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad records into (B, L) input_ids / labels / attention_mask and list their media, batch order;
    with the records' object features ("objects", "object_valid") and projector inputs ("vision") when they all
    kept them."""
    length = max(r.input_ids.shape[0] for r in records)
    input_ids = torch.full((len(records), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(records), length), -100, dtype=torch.long)
    attention = torch.zeros((len(records), length), dtype=torch.long)
    for b, record in enumerate(records):
        n = record.input_ids.shape[0]
        input_ids[b, :n], labels[b, :n], attention[b, :n] = record.input_ids, record.labels, record.attention_mask
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
             "media": torch.cat([r.media for r in records])}
    for field, what, keys in (("objects", "object features", ("objects", "object_valid", "object_frames")),
                              ("vision", "projector inputs", ("vision",))):
        kept = [getattr(r, field) is not None for r in records]
        if not any(kept):
            continue
        if not all(kept):
            missing = next(r.where for r in records if getattr(r, field) is None)
            raise ValueError(f"{missing} was cached without its {what}, other records of the batch with them")
        for key in keys:
            batch[key] = torch.cat([getattr(r, key) for r in records])
    return batch


def cached_embeds(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, L, D) inputs of a collated batch: the LLM's token embeddings with the cached media in their slots.

    A batch with "objects" gets its `<REGION>` slots from the model's object MLP run on them (so the MLP is
    trained through this); a batch with "vision" gets its image and video slots from the model's projector run
    on them; the other media slots come from the cache.
    """
    from pixelrefer.modeling.pixelrefer import ObjectFeatures

    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    slots = _media_slots(input_ids, torch.tensor(media_token_ids(model.config), device=input_ids.device))
    media = batch["media"].to(embeds.device, embeds.dtype)
    if int(slots.sum()) != media.shape[0]:
        raise ValueError(f"{media.shape[0]} cached media embeddings for {int(slots.sum())} media slots")
    embeds = embeds.masked_scatter(slots.unsqueeze(-1), media)
    inner = model.model
    if "vision" in batch:
        global_slots = torch.isin(input_ids, torch.tensor(global_token_ids(model.config), device=input_ids.device))
        vision = batch["vision"].to(embeds.device, next(inner.projector.parameters()).dtype)
        if int(global_slots.sum()) != vision.shape[0]:
            raise ValueError(f"{vision.shape[0]} cached projector inputs for {int(global_slots.sum())} image and "
                             "video slots")
        embeds = embeds.masked_scatter(global_slots.unsqueeze(-1), inner.projector(vision).to(embeds.dtype))
    if "objects" not in batch:
        return embeds
    valid = batch["object_valid"].to(embeds.device)
    features = batch["objects"].to(embeds.device, next(inner.object_tokenizer.parameters()).dtype)
    tokens = inner.object_tokenizer.project(features, batch.get("object_frames")) * valid[..., None]  # (N, K, D),
    # as get_object_features
    return inner.scatter_object_tokens(input_ids, embeds, ObjectFeatures(tokens=tokens, valid=valid))


def cached_loss(model, batch: dict[str, Tensor], weights: Tensor | None = None,
                letter_attention: LetterAttention | None = None,
                spans: Sequence[Sequence[QuestionSpans]] | None = None) -> Tensor:
    """The model's loss on a collated batch: token embeddings with the cached media in their slots.

    `weights` (B, L), one per label (`answer_letter_weights`), makes it the weighted mean of the supervised
    tokens' cross-entropies; None is the model's own loss (their plain mean). `letter_attention` adds its
    auxiliary attention terms on the batch rows' lettered questions `spans` (`pixelrefer.letter_attention`;
    the model must run eager attention, which returns the probabilities)."""
    embeds = cached_embeds(model, batch)
    extra = {"output_attentions": True} if letter_attention is not None else {}
    readout = HeadReadout(model, letter_attention) if letter_attention and letter_attention.readout_weight else None
    with readout or contextlib.nullcontext():
        loss, out = _lm_loss(model, batch, embeds, weights, extra)
        if letter_attention is None:
            return loss
        if spans is None or len(spans) != batch["input_ids"].shape[0]:
            raise ValueError("letter_attention needs the spans of every batch row's lettered questions")
        return loss + letter_attention_loss(out.attentions, spans, letter_attention, readout, batch["input_ids"])


def _lm_loss(model, batch: dict[str, Tensor], embeds: Tensor, weights: Tensor | None, extra: dict):
    if weights is None:
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"], **extra)
        loss = out.loss
    else:
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **extra)
        labels = batch["labels"][:, 1:]  # position j predicts token j + 1
        losses = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=-100, reduction="none")
        weights = weights[:, 1:].flatten() * (labels.flatten() != -100)
        loss = (losses * weights).sum() / weights.sum()
    return loss, out


def answer_letter_weights(labels: Tensor, tokens: OptionTokens, weight: float) -> Tensor:
    """(B, L) loss weights for `labels` (B, L): `weight` on each supervised answer letter (the token of a
    labelled "(X)" run, as `tokens` writes it, where the letters differ: "B" of "( B )"), 1 elsewhere."""
    runs = torch.tensor(tokens.letters, device=labels.device)  # (letters, width)
    width = runs.shape[1]
    varying = [k for k in range(width) if len(set(runs[:, k].tolist())) > 1]
    weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    if labels.shape[1] < width:
        return weights
    windows = labels.unfold(1, width, 1)  # (B, L - width + 1, width)
    starts = (windows[:, :, None, :] == runs[None, None]).all(-1).any(-1)  # (B, L - width + 1)
    for k in varying:
        weights[:, k:k + starts.shape[1]][starts] = weight
    return weights


@torch.no_grad()
def choice_letter_accuracy(model, records: Sequence[CachedRecord], open_id: int,
                           batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Teacher-forced option letters: for every supervised `open_id` token (the `(` of "(B) …", or of "… (B)" in
    option-first answers) followed by a supervised token, is the model's most likely next token that letter?

    One forward pass per batch instead of generation. A model that opens its answers with "(" writes, greedily,
    the letter this scores; one that writes the option first (shapes-tiny-lite) writes it wherever its option text
    is the reference's (both tested), so on records in the model's own order it tracks the benchmark's
    multiple-choice accuracy while a frozen-media stage trains, given the right text. Returns {group: {"right", "total", "accuracy"}} per record
    `kind` (else task) and over all as "all"; records without a lettered answer are left out.
    """
    device = next(model.parameters()).device
    pad = model.config.text_config.pad_token_id or 0
    counts: dict[str, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_cached(chunk, pad).items()}
            logits = model(inputs_embeds=cached_embeds(model, batch), attention_mask=batch["attention_mask"]).logits
            predicted = logits.argmax(-1)  # (B, L): the token predicted after each position
            labels = batch["labels"]
            supervised = labels != -100
            # letter positions: a supervised token whose predecessor is a supervised "("
            letters = supervised[:, 1:] & supervised[:, :-1] & (labels[:, :-1] == open_id)  # (B, L-1)
            right = predicted[:, :-1] == labels[:, 1:]  # (B, L-1): position j predicts token j+1
            for b, record in enumerate(chunk):
                positions = letters[b].nonzero().flatten()
                if not len(positions):
                    continue
                hits = int(right[b, positions].sum())
                for group in (record.kind or record.task, "all"):
                    tally = counts.setdefault(group, [0, 0])
                    tally[0] += hits
                    tally[1] += len(positions)
    finally:
        model.train(was_training)
    return {group: {"right": r, "total": t, "accuracy": r / t} for group, (r, t) in sorted(counts.items())}


def weighted_indices(records: Sequence[CachedRecord], task_weights: dict[str, int]) -> list[int]:
    """Record indices with each record repeated by its task's weight (default 1; 0 leaves it out)."""
    pool = []
    for i, record in enumerate(records):
        pool.extend([i] * int(task_weights.get(record.task, 1)))
    if not pool:
        raise ValueError(f"task_weights {task_weights} leave no record to train on")
    return pool


def _dealt(record: CachedRecord, questions, rng: np.random.Generator, option_tokens: OptionTokens | None,
           letter_drill: float, letter_tokens: OptionTokens | None) -> CachedRecord:
    """A drawn record as a step sees it: its options dealt anew (`option_tokens`), then, with probability
    `letter_drill` for a record of one lettered question, drilled (`drill_letter`)."""
    if not questions:
        return record
    if option_tokens is not None:
        record = shuffle_options(record, option_tokens, rng, questions)
    if letter_drill and len(questions) == 1 and rng.random() < letter_drill:
        if option_tokens is not None:  # dealt anew: its options sit elsewhere now
            questions = lettered_questions(record.input_ids.tolist(), record.labels.tolist(), letter_tokens,
                                           record.attention_mask.tolist())
        record = drill_letter(record, letter_tokens, rng, questions[0])
    return record


def train_on_cached_media(model, records: Sequence[CachedRecord], *, steps: int, lr: float, batch_size: int,
                          seed: int = 0, warmup_ratio: float = 0.03, task_weights: dict[str, int] | None = None,
                          autocast: Callable = contextlib.nullcontext,
                          callback: Callable[[int, float], None] | None = None,
                          object_mlp_lr: float | None = None, projector_lr: float | None = None,
                          checkpoint: StageCheckpoint | None = None,
                          option_tokens: OptionTokens | None = None, letter_weight: float = 1.0,
                          letter_tokens: OptionTokens | None = None, letter_drill: float = 0.0,
                          fresh: dict[torch.nn.Parameter, Tensor] | None = None,
                          fresh_lr: float | None = None,
                          letter_attention: LetterAttention | None = None) -> list[float]:
    """Train the LLM (embeddings, layers, head) on cached records; returns the per-step losses.

    Each step draws `batch_size` records with replacement from the task-weighted pool (seeded by `seed`).
    AdamW, cosine schedule with warm-up, gradient norm clipped at 1; only the LLM's parameters are given to
    the optimizer, so the rest of the model is untouched. `object_mlp_lr` trains the object MLP too, at that
    rate, on records cached with `objects=True` (and the object time embedding, when the model has one). `callback(step, loss)` runs after each step. `checkpoint`
    (`pixelrefer.stage_checkpoint`) saves what trains, the optimizer and the sampler every few steps and
    continues from its last save. `option_tokens` (`pixelrefer.option_order`) deals every drawn lettered
    question's options to the letters in a new order (from the sampler's generator), the answer's letter moving
    with its text. `letter_weight` weighs each answer's letter that much in the loss (`answer_letter_weights`,
    letters as `letter_tokens` writes them, required then), every other supervised token once. `letter_drill`
    is the share of drawn records with one lettered question, answered option first, that are asked with an
    option drawn at random written as the answer and only its letter supervised (`option_order.drill_letter`,
    after any dealing anew; letters as `letter_tokens` writes them).
    `fresh` maps trained parameters to bool masks of entries a stage added (`modeling.depth.added_parameters`,
    `new_head_entries`); with `fresh_lr` those entries train at that rate, under the same schedule: each step's
    change to them is scaled by fresh_lr / lr after the optimizer's step (AdamW's update, weight decay included,
    is proportional to the rate), so they move as fast as a parameter group of their own would.
    `letter_attention` adds its auxiliary attention terms (`pixelrefer.letter_attention`) on every drawn lettered
    question, found after any dealing anew (letters as `letter_tokens` writes them); the model runs eager
    attention while it trains, and its own implementation again after.
    """
    if not records:
        raise ValueError("no cached records to train on")
    if (letter_weight != 1.0 or letter_drill or letter_attention is not None) and letter_tokens is None:
        raise ValueError(f"letter_weight {letter_weight} / letter_drill {letter_drill} / letter_attention need the "
                         "answer letters: give letter_tokens to find them")
    questions = {}
    finder = option_tokens if option_tokens is not None else letter_tokens if (
        letter_drill or letter_attention is not None) else None
    if finder is not None:
        questions = {i: found for i, r in enumerate(records)
                     if (found := lettered_questions(r.input_ids.tolist(), r.labels.tolist(), finder,
                                                     r.attention_mask.tolist()))}
    if letter_attention is not None:
        text = model.config.text_config
        letter_attention.check(text.num_hidden_layers, text.num_attention_heads)
        if not questions:
            raise ValueError(f"letter_attention: none of the {len(records)} records has a lettered question (\"(A)\" "
                             f"… as {letter_tokens.letters[0]}, then the instruction, then the answer's letter)")
    if letter_drill and not any(len(found) == 1 for found in questions.values()):
        raise ValueError(f"letter_drill: none of the {len(records)} records has one lettered question to drill")
    if option_tokens is not None:
        if not questions:
            raise ValueError(f"shuffle_options: none of the {len(records)} records has a lettered question whose "
                             f"options can be reordered (\"(A)\" … as {option_tokens.letters[0]}, then the "
                             f"instruction) to deal anew")
    device = next(model.parameters()).device
    pool = weighted_indices(records, task_weights or {})
    rng = np.random.default_rng(seed)
    named = dict(model.named_parameters())
    trained = LLM_PREFIXES
    groups = [{"params": [p for n, p in named.items() if n.startswith(LLM_PREFIXES)], "lr": lr}]
    extra = (("object_mlp_lr", object_mlp_lr, (OBJECT_MLP, OBJECT_TIME), "objects", "the object MLP", "object features",
              "objects"),
             ("projector_lr", projector_lr, (PROJECTOR,), "vision", "the image projector", "projector inputs",
              "vision"))
    for name, rate, prefix, field, module, what, flag in extra:
        if rate is None:
            continue
        lacking = next((r.where for r in records if getattr(r, field) is None), None)
        if lacking is not None:
            raise ValueError(f"{name} trains {module}, but {lacking} was cached without its {what}: cache with "
                             f"{flag}=True")
        groups.append({"params": [p for n, p in named.items() if n.startswith(prefix)], "lr": rate})
        trained += prefix
    if projector_lr is not None and not any(r.vision.shape[0] for r in records):
        raise ValueError("projector_lr trains the image projector, but no record has image or video tokens "
                         "(an object-only model sends none to its LLM)")
    parameters = [p for group in groups for p in group["params"]]
    if fresh_lr is not None:
        if not (isinstance(fresh_lr, (int, float)) and fresh_lr > 0):
            raise ValueError(f"fresh_lr must be a positive number, got {fresh_lr!r}")
        if not fresh:
            raise ValueError("fresh_lr is the rate of the entries a stage added: give them as fresh")
        trained_ids = {id(p) for p in groups[0]["params"]}
        if any(id(p) not in trained_ids for p in fresh):
            raise ValueError("fresh: every parameter with added entries must be one of the LLM's, trained at lr")
    scale = [] if fresh_lr is None else [(p, mask, fresh_lr / lr) for p, mask in fresh.items()]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    pad = model.config.text_config.pad_token_id
    pad = 0 if pad is None else pad
    saved = dict(tensors={n: p for n, p in named.items() if n.startswith(trained)},
                 optimizer=optimizer, scheduler=scheduler, sampler=rng)
    start, losses = checkpoint.restore(**saved) if checkpoint else (0, [])
    with _eager_attention(model, letter_attention is not None):
        model.train()
        for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="frozen-media stage"):
            drawn = [pool[i] for i in rng.integers(0, len(pool), size=batch_size)]
            chosen = [_dealt(records[i], questions.get(i), rng, option_tokens, letter_drill, letter_tokens)
                      for i in drawn]
            batch = {k: v.to(device) for k, v in collate_cached(chosen, pad).items()}
            weights = None if letter_weight == 1.0 else answer_letter_weights(batch["labels"], letter_tokens,
                                                                              letter_weight)
            spans = None
            if letter_attention is not None:
                spans = [[question_spans(q, letter_tokens, ids, labels) for q in lettered_questions(
                    ids, labels, letter_tokens, r.attention_mask.tolist())] if i in questions else []
                    for i, r in zip(drawn, chosen) for ids, labels in [(r.input_ids.tolist(), r.labels.tolist())]]
            with autocast():
                loss = cached_loss(model, batch, weights, letter_attention, spans)
            model.zero_grad(set_to_none=True)  # also what reached modules the optimizer does not train
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            before = [p.detach().clone() for p, _, _ in scale]
            optimizer.step()
            with torch.no_grad():
                for (p, mask, factor), old in zip(scale, before):
                    p.copy_(torch.where(mask, old + (p - old) * factor, p))
            scheduler.step()
            losses.append(loss.item())
            if checkpoint and checkpoint.due(step, steps):
                checkpoint.save(step, losses, **saved)
            if callback is not None:
                callback(step, losses[-1])
        return losses


@contextlib.contextmanager
def _eager_attention(model, wanted: bool):
    """Eager attention inside (it returns the probabilities `letter_attention` supervises), then the model's own."""
    own = model.config._attn_implementation
    if wanted and own != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if model.config._attn_implementation != own:
            model.set_attn_implementation(own)
