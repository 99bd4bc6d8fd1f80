"""Attention statistics by token group, captured without materialising attention maps.

Notable:
- A registered attention function (transformers' `AttentionInterface`) that
  computes each LLM layer's attention chunk by chunk over queries: the output
  is exact, and while a chunk's probabilities (B, H, chunk, L) exist they are
  reduced to group-to-group attention mass and, for chosen layers, to
  average-pooled maps. Memory is one chunk, whatever the sequence length.
- It never relies on `output_attentions=True`: with SDPA, transformers 5
  returns no weights at all.
- Token groups come from the processor's own bookkeeping (`EncodedBatch.spans`),
  not from guessing token ids.
- Per-key attention by query group (`key_layers`, (B, H, G, L_k) per layer)
  is what the answer-to-image-grid and answer-to-object-token views need:
  L_k numbers per group instead of an L_q × L_k map, so it stays cheap for
  big models where full maps would not.
- Only the language model is captured; the vision encoder keeps its own
  attention implementation. The model's implementation is restored on exit.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from pixelrefer.processing import EncodedBatch

GROUPS = ("template", "system", "text", "vision", "object", "answer")
CAPTURE = "pixelrefer_capture"
_ACTIVE: list["AttentionCapture"] = []


@dataclass
class TokenGroups:
    """Which group every token of a batch belongs to.

    Attributes:
        group_ids: (B, L) long index into `names`, −1 for padding.
        object_ids: (B, L) long object index within its sample for object tokens, −1 elsewhere.
        names: group names (GROUPS).
        num_objects: the largest object count of any sample.
    """

    group_ids: Tensor
    object_ids: Tensor
    names: tuple[str, ...] = GROUPS
    num_objects: int = 0


def token_groups(encoded: EncodedBatch) -> TokenGroups:
    """Token groups of an encoded batch, from the processor's spans."""
    batch, length = encoded.inputs["input_ids"].shape
    group_ids = torch.full((batch, length), -1, dtype=torch.long)
    object_ids = torch.full((batch, length), -1, dtype=torch.long)
    for b, spans in enumerate(encoded.spans):
        for span in spans:
            group_ids[b, span.start : span.end] = GROUPS.index(span.group)
            if span.object_index is not None:
                object_ids[b, span.start : span.end] = span.object_index
    masked_slots = (encoded.inputs["attention_mask"] == 0) & (group_ids >= 0)
    group_ids[masked_slots] = -1  # empty object slots take no part in attention
    object_ids[masked_slots] = -1
    return TokenGroups(group_ids, object_ids, GROUPS, int(object_ids.max()) + 1)


@dataclass
class AttentionCapture:
    """Statistics gathered by `capture_attention`, for L_q queries over L_k keys.

    Attributes:
        groups: the token groups used.
        mass: {layer: (B, H, G, G)} summed attention probability from each query group to each key group.
        object_mass: {layer: (B, H, G, O)} the same towards each object's tokens separately.
        query_counts: (B, G) queries per group (to turn sums into per-query means).
        key_mass: {layer: (B, H, G, L_k)} summed attention from each query group to every key token,
            only for `key_layers`.
        pooled: {layer: (B, H, ⌈L_q/f⌉, ⌈L_k/f⌉)} attention maps average-pooled by `pool` (Fig. 3).
        full: {layer: (B, H, L_q, L_k)} full maps, only for `full_layers` (small models).
        peak_chunk_elements: largest probability block held at once (B·H·chunk·L_k), for memory checks.
    """

    groups: TokenGroups
    layers: tuple[int, ...] | None = None
    pooled_layers: tuple[int, ...] = ()
    full_layers: tuple[int, ...] = ()
    pool: int = 8
    chunk_size: int = 128
    key_layers: tuple[int, ...] = ()
    mass: dict[int, Tensor] = field(default_factory=dict)
    object_mass: dict[int, Tensor] = field(default_factory=dict)
    key_mass: dict[int, Tensor] = field(default_factory=dict)
    pooled: dict[int, Tensor] = field(default_factory=dict)
    full: dict[int, Tensor] = field(default_factory=dict)
    peak_chunk_elements: int = 0

    @property
    def query_counts(self) -> Tensor:
        one_hot = _one_hot(self.groups.group_ids, len(self.groups.names))  # (B, L, G)
        return one_hot.sum(1)

    def mean_attention(self, layer: int) -> Tensor:
        """(B, H, G, G): per query of a group, the attention it gives each key group (rows sum to 1)."""
        counts = self.query_counts.to(self.mass[layer].device)[:, None, :, None]
        return self.mass[layer] / counts.clamp(min=1)

    def key_attention(self, layer: int, query: str = "answer") -> Tensor:
        """(B, H, L_k): per `query` token, the attention it gives each key token (a `key_layers` layer)."""
        if layer not in self.key_mass:
            raise KeyError(f"layer {layer} kept no per-key attention; captured: {sorted(self.key_mass)} (key_layers)")
        q = self.groups.names.index(query)
        counts = self.query_counts[:, q].to(self.key_mass[layer].device)[:, None, None]  # (B, 1, 1)
        return self.key_mass[layer][:, :, q] / counts.clamp(min=1)

    def group_curve(self, query: str, key: str) -> Tensor:
        """(layers, B): mean over heads of the attention `query` tokens give `key` tokens, per layer."""
        q, k = self.groups.names.index(query), self.groups.names.index(key)
        return torch.stack([self.mean_attention(layer)[:, :, q, k].mean(1) for layer in sorted(self.mass)])

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


def _one_hot(ids: Tensor, classes: int) -> Tensor:
    """(…,) long with −1 for "none" → (…, classes) float."""
    return F.one_hot(ids.clamp(min=0), classes).float() * (ids >= 0)[..., None]


def _avg_pool_last(x: Tensor, factor: int) -> Tensor:
    """Average-pool the last dimension by `factor`, padding a short last window (mean of what exists)."""
    length = x.shape[-1]
    padded = math.ceil(length / factor) * factor
    total = F.pad(x, (0, padded - length)).unflatten(-1, (-1, factor)).sum(-1)
    sizes = torch.full((padded // factor,), float(factor), device=x.device)
    sizes[-1] = length - factor * (padded // factor - 1)
    return total / sizes


def _capture_mask(*args, **kwargs):
    """The explicit boolean mask (never the `is_causal` shortcut), so padding is always visible."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _repeat_kv(x: Tensor, heads: int) -> Tensor:
    """(B, H_kv, L, d) → (B, H, L, d) for grouped-query attention."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention computed chunk by chunk over queries, accumulating the active capture's statistics.

    query (B, H, L_q, d), key/value (B, H_kv, L_k, d), attention_mask (B, 1, L_q, L_k) bool or None.
    Returns (B, L_q, H, d) and no weights, like transformers' attention functions.
    """
    capture = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    batch, heads, q_len, _ = query.shape
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    k_len = key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is None:  # causal over the last q_len positions of the keys
        positions = torch.arange(k_len, device=query.device)
        attention_mask = (positions[None, :] <= positions[k_len - q_len :, None])[None, None]
    active = capture is not None and layer is not None and capture.wants(layer)
    if active:
        groups = capture.groups
        g = len(groups.names)
        key_groups = _pad_ids(groups.group_ids, k_len).to(query.device)  # (B, L_k)
        query_groups = key_groups[:, k_len - q_len :]  # (B, L_q)
        key_onehot = _one_hot(key_groups, g)  # (B, L_k, G)
        object_onehot = _one_hot(_pad_ids(groups.object_ids, k_len).to(query.device), max(groups.num_objects, 1))
        mass = query.new_zeros(batch, heads, g, g, dtype=torch.float32)
        object_mass = query.new_zeros(batch, heads, g, object_onehot.shape[-1], dtype=torch.float32)
        key_mass = query.new_zeros(batch, heads, g, k_len, dtype=torch.float32) if layer in capture.key_layers else None
        keep_pooled, keep_full = layer in capture.pooled_layers, layer in capture.full_layers
        pooled_rows, full_rows = [], []
    chunk = capture.chunk_size if capture is not None else q_len
    if active and keep_pooled:
        chunk = max(capture.pool, chunk // capture.pool * capture.pool)  # pooled rows never straddle chunks
    outputs = []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        scores = (query[:, :, start:stop].float() @ key.float().transpose(-1, -2)) * scaling  # (B, H, c, L_k)
        mask = attention_mask[:, :, start:stop]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
        probs = scores.softmax(-1)  # (B, H, c, L_k)
        outputs.append((probs.to(value.dtype) @ value).transpose(1, 2))  # (B, c, H, d)
        if active:
            capture.peak_chunk_elements = max(capture.peak_chunk_elements, probs.numel())
            rows = _one_hot(query_groups[:, start:stop], g)  # (B, c, G)
            to_groups = probs @ key_onehot[:, None]  # (B, H, c, G)
            mass += torch.einsum("bcq,bhck->bhqk", rows, to_groups)
            object_mass += torch.einsum("bcq,bhck->bhqk", rows, probs @ object_onehot[:, None])
            if key_mass is not None:
                key_mass += torch.einsum("bcq,bhck->bhqk", rows, probs)
            if keep_pooled:
                pooled = _avg_pool_last(probs, capture.pool)  # (B, H, c, L_k/f)
                pooled_rows.append(_avg_pool_last(pooled.transpose(-1, -2), capture.pool).transpose(-1, -2))
            if keep_full:
                full_rows.append(probs.cpu())
    if active:
        _accumulate(capture.mass, layer, mass)
        _accumulate(capture.object_mass, layer, object_mass)
        if key_mass is not None:
            _accumulate(capture.key_mass, layer, key_mass)
        if keep_pooled:
            capture.pooled[layer] = torch.cat(pooled_rows, dim=2).cpu()
        if keep_full:
            capture.full[layer] = torch.cat(full_rows, dim=2)
    return torch.cat(outputs, dim=1).to(query.dtype), None


def _pad_ids(ids: Tensor, length: int) -> Tensor:
    """Group ids for `length` keys: tokens beyond the encoded prompt (generated ones) count as answer."""
    if ids.shape[1] >= length:
        return ids[:, :length]
    extra = torch.full((ids.shape[0], length - ids.shape[1]), GROUPS.index("answer"), dtype=ids.dtype)
    return torch.cat([ids, extra], dim=1)


def _accumulate(store: dict[int, Tensor], layer: int, value: Tensor) -> None:
    store[layer] = store[layer] + value.cpu() if layer in store else value.cpu()


AttentionInterface.register(CAPTURE, capture_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE, _capture_mask)


@contextlib.contextmanager
def capture_attention(
    model,
    groups: TokenGroups,
    *,
    layers: tuple[int, ...] | None = None,
    pooled_layers: tuple[int, ...] = (),
    full_layers: tuple[int, ...] = (),
    key_layers: tuple[int, ...] = (),
    pool: int = 8,
    chunk_size: int = 128,
) -> Iterator[AttentionCapture]:
    """Within the block, the model's LLM attention is captured into the yielded `AttentionCapture`.

    Args:
        model: a `PixelReferForConditionalGeneration` (or anything whose LLM config is `config.text_config`).
        groups: `token_groups(encoded)` of the batch that will be run.
        layers: layers to gather group statistics for (None: all).
        pooled_layers: layers whose maps are kept average-pooled by `pool` (paper Fig. 3 uses 8).
        full_layers: layers whose full maps are kept (small models only).
        key_layers: layers whose per-key attention by query group is kept ((B, H, G, L_k) each).
        chunk_size: queries per chunk; memory is B·H·chunk·L_k floats.
    """
    text_config = model.config.text_config
    previous = text_config._attn_implementation
    capture = AttentionCapture(groups, None if layers is None else tuple(layers), tuple(pooled_layers),
                               tuple(full_layers), pool, chunk_size, tuple(key_layers))
    text_config._attn_implementation = CAPTURE
    _ACTIVE.append(capture)
    try:
        yield capture
    finally:
        _ACTIVE.remove(capture)
        text_config._attn_implementation = previous


@dataclass
class GroupCurves:
    """Attention of one query group to every key group, per layer, averaged over heads and samples.

    Attributes:
        query: the query group (e.g. "answer").
        layers: the layer indices, in order.
        mass: {key group: [per layer]} fraction of the query's attention that lands on the group.
        density: {key group: [per layer]} the same divided by the group's token count: attention per key token.
    """

    query: str
    layers: list[int]
    mass: dict[str, list[float]]
    density: dict[str, list[float]]


def group_curves(captures: list[AttentionCapture], query: str = "answer") -> GroupCurves:
    """Per-layer attention of `query` tokens to each key group, pooled over several single-sample captures."""
    names = captures[0].groups.names
    q = names.index(query)
    layers = sorted(captures[0].mass)
    mass = {name: [] for name in names}
    density = {name: [] for name in names}
    for layer in layers:
        per_sample_mass, per_sample_density = [], []
        for capture in captures:
            counts = capture.query_counts  # (B, G): tokens per group, also the key counts in a prefill
            mean = capture.mean_attention(layer).mean(1)  # (B, Gq, Gk), heads averaged
            has_query = counts[:, q] > 0
            per_sample_mass.append(mean[has_query, q])
            per_sample_density.append(mean[has_query, q] / counts[has_query].clamp(min=1))
        stacked_mass, stacked_density = torch.cat(per_sample_mass), torch.cat(per_sample_density)
        for k, name in enumerate(names):
            mass[name].append(float(stacked_mass[:, k].mean()))
            density[name].append(float(stacked_density[:, k].mean()))
    present = {name for capture in captures for name, count in zip(names, capture.query_counts.sum(0)) if count > 0}
    return GroupCurves(query, layers, {k: v for k, v in mass.items() if k in present},
                       {k: v for k, v in density.items() if k in present})
