"""Object-token similarity (paper Fig. 7) and which crop cells each token stands for (cf. Fig. 11).

Notable:
- "Before" is an object's position-aware foreground cells as they enter
  Abundant Feature Aggregation; "after" is its aggregated tokens (vision
  width, before the MLP), both taken from the model's own `ObjectFeatures`.
- The intra-object similarity is the mean off-diagonal cosine similarity.
- Fig. 7 shows 50 randomly chosen cells; `max_cells` subsamples with a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pixelrefer.modeling.pixelrefer import ObjectFeatures


def cosine_matrix(x: Tensor) -> Tensor:
    """(M, C) → (M, M) pairwise cosine similarity."""
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.T


def mean_off_diagonal(matrix: Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN for a 1×1 matrix)."""
    size = matrix.shape[0]
    if size < 2:
        return float("nan")
    return float((matrix.sum() - matrix.diagonal().sum()) / (size * size - size))


@dataclass
class ObjectSimilarity:
    """Similarity of one object's tokens before and after aggregation.

    Attributes:
        before: (F, F) cosine similarity of its foreground cells (F ≤ max_cells).
        after: (K', K') cosine similarity of its real aggregated tokens.
        mean_before / mean_after: mean off-diagonal similarity of each.
        cells: foreground cells of the object (before any subsampling).
    """

    before: Tensor
    after: Tensor
    mean_before: float
    mean_after: float
    cells: int


def object_similarity(objects: ObjectFeatures, index: int, max_cells: int | None = 50, seed: int = 0) -> ObjectSimilarity:
    """Fig. 7 for object unit `index` of a forward pass's `object_outputs`."""
    aggregated = objects.aggregated
    cells = aggregated.cells[index][aggregated.cell_valid[index]].detach()  # (F, C)
    count = cells.shape[0]
    if max_cells is not None and count > max_cells:
        chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_cells].sort().values
        cells = cells[chosen.to(cells.device)]
    tokens = aggregated.features[index][aggregated.valid[index]].detach()  # (K', C)
    before, after = cosine_matrix(cells).cpu(), cosine_matrix(tokens).cpu()
    return ObjectSimilarity(before, after, mean_off_diagonal(before), mean_off_diagonal(after), count)


def token_cell_map(objects: ObjectFeatures, index: int, region_grid_thw: Tensor) -> Tensor:
    """(gh, gw) long: the object token each crop cell was aggregated into, −1 for background cells.

    `region_grid_thw` is the processor's (N, 3) crop grids; cells are packed
    object after object, row-major within each crop.
    """
    aggregated = objects.aggregated
    sizes = region_grid_thw.prod(-1)
    start = int(sizes[:index].sum())
    _, grid_h, grid_w = (int(v) for v in region_grid_thw[index])
    valid = aggregated.cell_valid[index]
    local = (aggregated.cell_index[index][valid] - start).cpu()  # position of each foreground cell in its crop
    result = torch.full((grid_h * grid_w,), -1, dtype=torch.long)
    result[local] = aggregated.assignments[index][valid].cpu()
    return result.view(grid_h, grid_w)
