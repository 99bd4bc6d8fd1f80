"""Scale-Adaptive Object Tokenizer: crop cells -> n object tokens per object.

Paper §4.2.1 (Eq. 3–6) and REFERENCE §2. Input is the vision encoder's output
for every object crop, packed object after object; output is K tokens of the
LLM width per object.

Notable:
- Everything is batched over objects: the foreground cells are moved into a
  padded layout (N, P_max, C) with one scatter whose slots come from
  cumulative offsets, then `batched_kmeans` clusters all objects at once.
  The only host synchronisation is one read of the foreground counts per
  call (to validate them and size P_max), plus the sum of
  `cells_per_object` if that lives on an accelerator.
- The relative position encoding (Eq. 4–5) is added to every cell before
  the mask is applied; the coordinates themselves are computed by the
  processor (it owns the release's swapped-axes switch).
- Objects with ≤ K foreground cells keep their cells as tokens, left-packed
  and followed by padding rows that `valid` marks False; `forward` zeroes the
  padded tokens after the MLP so that nothing but zeros can leak from them.
- Object tokens go through their own MLP (Linear, exact GELU, Linear), never
  through the global image projector.
- `MaskPooling` (prior work, one averaged token per object) shares the
  layout, the position encoding and the MLP, for ablations.
- `object_tokenizer_reference` is the slow per-object loop used by the tests
  and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pixelrefer.errors import InputError
from pixelrefer.modeling.kmeans import batched_kmeans, initial_indices, kmeans_reference
from pixelrefer.modeling.time_embedding import FrameTimeEmbedding


@dataclass
class AggregatedObjects:
    """Object features before the MLP, with the cells they were made from.

    Attributes:
        features: (N, K, C) aggregated object tokens in the vision width.
        valid: (N, K) bool, real tokens (False only for objects with fewer
            than K foreground cells).
        cells: (N, P_max, C) position-aware foreground cells before
            aggregation, left-packed in crop row-major order, zero padded.
        cell_valid: (N, P_max) bool, real rows of `cells`.
        assignments: (N, P_max) long, token each cell was merged into,
            −1 for padding.
        cell_index: (N, P_max) long, index of each cell in the packed input
            (P,), −1 for padding; maps clusters back onto the crop grid.
    """

    features: Tensor
    valid: Tensor
    cells: Tensor
    cell_valid: Tensor
    assignments: Tensor
    cell_index: Tensor


@dataclass
class ObjectTokens:
    """Output of an object tokenizer.

    Attributes:
        tokens: (N, K, D) object tokens for the LLM, zero where not `valid`.
        valid: (N, K) bool, real tokens.
        aggregated: the intermediate `AggregatedObjects`.
    """

    tokens: Tensor
    valid: Tensor
    aggregated: AggregatedObjects


def _foreground_counts(cell_mask: Tensor, cells_per_object: Tensor) -> tuple[Tensor, Tensor]:
    """Object id of every packed cell (P,) and foreground cells per object (N,)."""
    N, P = cells_per_object.numel(), cell_mask.numel()
    object_id = torch.repeat_interleave(
        torch.arange(N, device=cell_mask.device), cells_per_object, output_size=P
    )
    counts = torch.zeros(N, dtype=torch.long, device=cell_mask.device).index_add_(0, object_id, cell_mask.long())
    return object_id, counts


def _check_inputs(
    cell_features: Tensor, cell_positions: Tensor, cell_mask: Tensor, cells_per_object: Tensor
) -> None:
    P = cell_features.shape[0]
    if cell_positions.shape != (P, 2) or cell_mask.shape != (P,):
        raise InputError(
            f"expected cell_positions (P, 2) and cell_mask (P,) with P = {P}, got "
            f"{tuple(cell_positions.shape)} and {tuple(cell_mask.shape)}"
        )
    if cells_per_object.numel() == 0:
        raise InputError("the object tokenizer needs at least one object")
    total = int(cells_per_object.sum())
    if total != P:
        raise InputError(f"cells_per_object sums to {total} but there are {P} packed cells")


def _padded_width(counts: Tensor, max_cells: int | None) -> int:
    """Validate the foreground counts (one host sync) and pick P_max."""
    smallest, largest = torch.stack([counts.min(), counts.max()]).tolist()
    if smallest == 0:
        empty = (counts == 0).nonzero().flatten().tolist()
        raise InputError(f"object(s) {empty} have no foreground cell in their crop mask")
    if max_cells is None:
        return largest
    if max_cells < largest:
        raise InputError(f"max_cells = {max_cells} but an object has {largest} foreground cells")
    return max_cells


def pack_foreground(
    cell_features: Tensor, cell_mask: Tensor, cells_per_object: Tensor, max_cells: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Move each object's foreground cells into a padded layout, without a loop.

    Args:
        cell_features: (P, C) packed cells of all objects.
        cell_mask: (P,) bool foreground.
        cells_per_object: (N,) long, cells of each object's crop (h·w).
        max_cells: padded width P_max; None uses the largest foreground count.

    Returns:
        cells (N, P_max, C), cell_valid (N, P_max) and cell_index (N, P_max),
        the packed index of each slot (−1 for padding).
    """
    P, C = cell_features.shape
    object_id, counts = _foreground_counts(cell_mask, cells_per_object)
    N, width = counts.numel(), _padded_width(counts, max_cells)
    first_fg = counts.cumsum(0) - counts  # (N,) foreground cells before each object
    rank = cell_mask.long().cumsum(0) - 1 - first_fg[object_id]  # (P,) slot within the object
    # Background cells all go to one extra trash slot, dropped afterwards;
    # padding slots are never written and stay zero.
    slot = torch.where(cell_mask, object_id * width + rank, N * width)  # (P,)
    cell_index = torch.full((N * width + 1,), -1, dtype=torch.long, device=cell_features.device)
    cell_index = cell_index.index_put_((slot,), torch.arange(P, device=cell_features.device))
    cells = cell_features.new_zeros(N * width + 1, C).index_put_((slot,), cell_features)
    cell_index = cell_index[:-1].view(N, width)  # (N, P_max)
    return cells[:-1].view(N, width, C), cell_index >= 0, cell_index


class ObjectTokenizer(nn.Module):
    """SAOT: position encoding, mask feature extractor, k-means to K tokens, MLP.

    Args:
        vision_dim: C, vision encoder width.
        llm_dim: D, LLM width.
        num_tokens: K (= n), tokens per object.
        kmeans_iterations: Lloyd steps (5 in PixelRefer, 3 in Lite).
        kmeans_seed: seed of the initial centroid subset.
        use_position_encoding: False drops Eq. 4–5 (paper ablation); then
            `position_proj` is None so that every parameter is used.
    """

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        num_tokens: int,
        kmeans_iterations: int = 5,
        kmeans_seed: int = 0,
        use_position_encoding: bool = True,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.kmeans_iterations = kmeans_iterations
        self.kmeans_seed = kmeans_seed
        self.position_proj = nn.Linear(2, vision_dim) if use_position_encoding else None
        self.mlp = nn.Sequential(
            nn.Linear(vision_dim, llm_dim), nn.GELU(approximate="none"), nn.Linear(llm_dim, llm_dim)
        )
        self.time_embedding: FrameTimeEmbedding | None = None  # set by the model with object_time_embedding

    def encode_positions(self, cell_features: Tensor, cell_positions: Tensor) -> Tensor:
        """(P, C) features + Linear((P, 2) positions), Eq. 5, on every cell."""
        if self.position_proj is None:
            return cell_features
        encoding = self.position_proj(cell_positions.to(cell_features.dtype)).to(cell_features.dtype)
        # In place on the fresh projection: one (P, C) allocation instead of two,
        # which matters on CPU where large fresh buffers cost a page fault per 4 KiB.
        return encoding.add_(cell_features)

    def reduce(self, cells: Tensor, cell_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, P_max, C) cells -> features (N, K, C), valid (N, K), assignments (N, P_max)."""
        result = batched_kmeans(cells, cell_valid, self.num_tokens, self.kmeans_iterations, self.kmeans_seed)
        return result.centroids, result.valid, result.assignments

    def aggregate(
        self,
        cell_features: Tensor,
        cell_positions: Tensor,
        cell_mask: Tensor,
        cells_per_object: Tensor,
        max_cells: int | None = None,
    ) -> AggregatedObjects:
        """Packed crop cells -> K aggregated features per object (vision width).

        Args:
            cell_features: (P, C) vision-encoder outputs of all crop cells,
                object after object, row-major within each crop.
            cell_positions: (P, 2) float (x, y) of each cell in the original
                image, in [0, 1].
            cell_mask: (P,) bool, foreground cells.
            cells_per_object: (N,) long, h·w of each crop grid.
            max_cells: fixed padded width P_max (static shapes); must be at
                least the largest foreground count. None uses that count.

        Raises:
            InputError (a ValueError): inconsistent shapes or counts, or an
                object without any foreground cell.
        """
        _check_inputs(cell_features, cell_positions, cell_mask, cells_per_object)
        cells_per_object = cells_per_object.to(cell_features.device)
        x = self.encode_positions(cell_features, cell_positions)  # (P, C), before masking (Eq. 5)
        cells, cell_valid, cell_index = pack_foreground(x, cell_mask.bool(), cells_per_object, max_cells)
        features, valid, assignments = self.reduce(cells, cell_valid)
        return AggregatedObjects(features, valid, cells, cell_valid, assignments, cell_index)

    def project(self, features: Tensor, frame_index: Tensor | None = None) -> Tensor:
        """(N, K, C) -> (N, K, D): the object MLP (not the global image projector), plus each unit's frame
        embedding when the tokenizer has a `time_embedding` ((N,) `frame_index`, -1 for an image unit)."""
        tokens = self.mlp(features)
        if self.time_embedding is None:
            return tokens
        if frame_index is None:
            raise ValueError("this model adds a time embedding to its object tokens (object_time_embedding): "
                             "it needs region_frame_index, which the PixelRefer processor returns")
        if frame_index.shape != tokens.shape[:1]:
            raise ValueError(f"region_frame_index has shape {tuple(frame_index.shape)} for {tokens.shape[0]} object "
                             "units")
        return tokens + self.time_embedding(frame_index).to(tokens.dtype)[:, None, :]

    def forward(
        self,
        cell_features: Tensor,
        cell_positions: Tensor,
        cell_mask: Tensor,
        cells_per_object: Tensor,
        max_cells: int | None = None,
    ) -> ObjectTokens:
        """`aggregate` then `project`; arguments as in `aggregate`."""
        aggregated = self.aggregate(cell_features, cell_positions, cell_mask, cells_per_object, max_cells)
        tokens = self.project(aggregated.features) * aggregated.valid[..., None]  # (N, K, D)
        return ObjectTokens(tokens, aggregated.valid, aggregated)


class MaskPooling(ObjectTokenizer):
    """Prior-work baseline: one token per object, the mean of its foreground cells.

    Same position encoding, layout and MLP as `ObjectTokenizer`, with K = 1.
    """

    def __init__(self, vision_dim: int, llm_dim: int, use_position_encoding: bool = True):
        super().__init__(vision_dim, llm_dim, num_tokens=1, use_position_encoding=use_position_encoding)

    def reduce(self, cells: Tensor, cell_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, P_max, C) cells -> features (N, 1, C), valid (N, 1), assignments (N, P_max)."""
        # Sum in float32 (a bf16 running sum over hundreds of cells loses digits),
        # as a (1 × P_max) @ (P_max × C) matmul per object: no (N, P_max, C) temporary.
        compute_dtype = torch.promote_types(cells.dtype, torch.float32)
        weights = cell_valid.to(compute_dtype)[:, None, :]  # (N, 1, P_max)
        mean = (weights @ cells.to(compute_dtype)) / weights.sum(-1, keepdim=True).clamp(min=1.0)  # (N, 1, C)
        valid = torch.ones(cells.shape[0], 1, dtype=torch.bool, device=cells.device)
        assignments = torch.where(cell_valid, 0, -1)
        return mean.to(cells.dtype), valid, assignments


def object_tokenizer_reference(
    module: ObjectTokenizer,
    cell_features: Tensor,
    cell_positions: Tensor,
    cell_mask: Tensor,
    cells_per_object: Tensor,
    project: bool = True,
) -> list[Tensor]:
    """Slow reference: one object at a time, with the per-cluster `kmeans_reference`.

    Mirrors the release's loop, for the tests and the benchmark only.

    Args:
        project: False stops before the MLP (vision width C).

    Returns:
        Per object, its real tokens (min(F_i, K), D), F_i = foreground cells.
    """
    K = module.num_tokens
    tokens, start = [], 0
    for count in cells_per_object.tolist():
        features = cell_features[start : start + count]  # (h·w, C)
        positions, mask = cell_positions[start : start + count], cell_mask[start : start + count]
        start += count
        foreground = module.encode_positions(features, positions)[mask.bool()]  # (F_i, C)
        everything = torch.ones(1, foreground.shape[0], dtype=torch.bool, device=foreground.device)
        init = initial_indices(everything, K, module.kmeans_seed)[0] if foreground.shape[0] > K else None
        aggregated = kmeans_reference([foreground], K, module.kmeans_iterations, [init])[0]
        tokens.append(module.project(aggregated) if project else aggregated)
    return tokens
