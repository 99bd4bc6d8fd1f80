"""One layer of one captured run, as the numbers an attention explorer shows.

`attention_view(capture, encoded, layer, head=…)` turns an `AttentionCapture`
into an `AttentionView`: the group-to-group matrix, the layer's pooled map,
and the attention of the query group's tokens (the answer, by default) to
every key token, placed on the image's vision-token grid and on each object's
tokens. Nothing here runs a model: switching layers or heads is indexing into
the capture.

Notable:
- Per-key attention comes from the capture's `key_mass` (`key_layers`), so
  it exists for any model size; full maps are never needed.
- A Vision-Object image is encoded at merge size 1, so its vision tokens are
  the image grid in row-major order (`image_grid_thw` = (1, gh, gw)); an
  Object-Only prompt has no vision tokens and gets no grid. Video grids
  (merged and frame-pruned tokens) are not mapped.
- Objects keep only their attended token slots (attention_mask 1): empty
  slots of small objects take no part in attention.
- `head=None` averages over heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pixelrefer.analysis.attention import AttentionCapture
from pixelrefer.errors import InputError
from pixelrefer.processing import EncodedBatch


@dataclass
class AttentionView:
    """What one (layer, head) of a capture shows, for one sample.

    Attributes:
        layer, head: the layer, and the head (None: mean over heads).
        query: the query group whose per-key attention is shown (e.g. "answer").
        groups: names of the groups present in the sample, the matrix's order.
        matrix: (G', G') mean attention a token of the row group gives the column group (rows sum to 1).
        pooled: (⌈L/f⌉, ⌈L/f⌉) the layer's average-pooled map, None if the layer's map was not kept.
        keys: (L,) attention a `query` token gives each key token, averaged over the query tokens.
        image_grid: (gh, gw) `keys` on the image's vision tokens, None without vision tokens.
        objects: per object, (K_valid,) `keys` on its attended object tokens.
        to_groups: {group: share} of a `query` token's attention per key group (the matrix row).
    """

    layer: int
    head: int | None
    query: str
    groups: list[str]
    matrix: Tensor
    pooled: Tensor | None
    keys: Tensor
    image_grid: Tensor | None
    objects: list[Tensor]
    to_groups: dict[str, float]


def image_grid_attention(encoded: EncodedBatch, values: Tensor, sample: int = 0) -> Tensor | None:
    """(gh, gw): per-token `values` (L,) of `sample` on its image's vision-token grid; None without one."""
    spans = [s for s in encoded.spans[sample] if s.group == "vision"]
    if not spans:
        return None
    if any(s.frame_index is not None for s in spans):
        raise InputError(f"sample {sample}: vision-grid attention is for images; video tokens are merged and pruned")
    images_before = sum(any(s.group == "vision" for s in spans_b) for spans_b in encoded.spans[:sample])
    _, grid_h, grid_w = (int(v) for v in encoded.inputs["image_grid_thw"][images_before])
    (span,) = spans  # an image has one run of vision tokens
    if span.end - span.start != grid_h * grid_w:
        raise InputError(f"sample {sample}: {span.end - span.start} vision tokens for a {grid_h}×{grid_w} grid")
    return values[span.start : span.end].reshape(grid_h, grid_w)


def object_token_attention(encoded: EncodedBatch, values: Tensor, sample: int = 0) -> list[Tensor]:
    """Per object of `sample`, its attended tokens' `values` (all frames of a video object, in order)."""
    attended = encoded.inputs["attention_mask"][sample].bool()
    count = 1 + max((s.object_index for s in encoded.spans[sample] if s.group == "object"), default=-1)
    pieces: list[list[Tensor]] = [[] for _ in range(count)]
    for span in encoded.spans[sample]:
        if span.group == "object":
            keep = attended[span.start : span.end].to(values.device)
            pieces[span.object_index].append(values[span.start : span.end][keep])
    return [torch.cat(p) if p else values.new_zeros(0) for p in pieces]


def attention_view(
    capture: AttentionCapture,
    encoded: EncodedBatch,
    layer: int,
    *,
    head: int | None = None,
    query: str = "answer",
    sample: int = 0,
) -> AttentionView:
    """The `AttentionView` of `layer` (and `head`, None for the mean) for `sample` of a captured batch.

    The capture must hold `layer` in its group statistics and in `key_layers`; its pooled map is used
    when `pooled_layers` kept it.
    """
    if layer not in capture.mass:
        raise InputError(f"layer {layer} was not captured; captured layers: {sorted(capture.mass)}")
    heads = capture.mass[layer].shape[1]
    if head is not None and not 0 <= head < heads:
        raise InputError(f"head {head} is out of range: layer {layer} has {heads} heads")
    names = capture.groups.names
    if query not in names:
        raise InputError(f"query group {query!r} is not one of {list(names)}")
    counts = capture.query_counts[sample]
    if counts[names.index(query)] == 0:
        raise InputError(f"sample {sample} has no {query!r} tokens: encode the prompt with its answer (teacher forcing)")
    if layer not in capture.key_mass:
        raise InputError(f"layer {layer} kept no per-key attention; capture it with key_layers (have {sorted(capture.key_mass)})")

    def pick(x: Tensor) -> Tensor:  # (H, …) → (…): one head or the mean over heads
        return x.mean(0) if head is None else x[head]

    present = [k for k, count in enumerate(counts.tolist()) if count > 0]
    matrix = pick(capture.mean_attention(layer)[sample])[present][:, present]  # (G', G')
    pooled = pick(capture.pooled[layer][sample]) if layer in capture.pooled else None
    keys = pick(capture.key_attention(layer, query)[sample])  # (L,)
    groups = [names[k] for k in present]
    row = matrix[groups.index(query)]
    return AttentionView(
        layer=layer,
        head=head,
        query=query,
        groups=groups,
        matrix=matrix,
        pooled=pooled,
        keys=keys,
        image_grid=image_grid_attention(encoded, keys, sample),
        objects=object_token_attention(encoded, keys, sample),
        to_groups={name: float(v) for name, v in zip(groups, row)},
    )
