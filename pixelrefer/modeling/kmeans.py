"""Batched k-means for Abundant Feature Aggregation (paper Eq. 6, REFERENCE §2).

Notable:
- All objects are clustered in one call on a padded layout (N, P, C) with a
  validity mask (N, P); distances are ‖x‖² − 2x·c + ‖c‖² via one batched
  matmul and centroid sums are a one-hot matmul (accelerators) or a row
  scatter-add (CPU), so nothing of size (N, P, K, C) is ever built.
- Arithmetic runs in float32 (bf16/fp16 inputs are upcast, the centroids cast
  back at the end) so that argmin ties and means do not depend on precision.
- The layout is left-packed (each object's valid points first), so the
  pass-through of a small object is a slice.
- As in the release, only objects with more than K points are clustered
  (with exactly K, k-means would merely permute them); the others keep
  their points as tokens, in order.
- The iteration loop has a fixed trip count and no host synchronisation:
  objects with ≤ K valid points are iterated like the others and their
  result is swapped for the pass-through with `torch.where`.
- Initialisation is a seeded random subset chosen by a counter-based integer
  hash of (seed, point index) instead of a stateful generator, so an object's
  initial centroids depend only on its own points: the result is the same
  whether it is clustered alone or in a batch, at any padded width, on any
  device.
- `kmeans_reference` is the slow per-object, per-cluster loop (the release's
  formulation) used by the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@dataclass
class KMeansResult:
    """Output of `batched_kmeans`.

    Attributes:
        centroids: (N, K, C) cluster means, in the input dtype. For an object
            with ≤ K valid points: those points in their original order, then
            zero rows.
        valid: (N, K) bool, which rows of `centroids` are real tokens.
        assignments: (N, P) long, cluster of each point (the clusters whose
            means are `centroids`); for a pass-through object the point's own
            token index; −1 for invalid points.
        init_indices: (N, K) long, positions in P of the initial centroids
            (meaningful only for objects with more than K valid points).
    """

    centroids: Tensor
    valid: Tensor
    assignments: Tensor
    init_indices: Tensor


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x · constant) mod 2³² for int64 x < 2³², in 16-bit halves so int64 never overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3 finaliser: a bijection on 32-bit values with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def initial_indices(valid: Tensor, num_clusters: int, seed: int = 0) -> Tensor:
    """Seeded random subset of each object's valid points, as initial centroids.

    Each point gets the score fmix32(golden·j + fmix32(seed)) from its position
    j alone; the K highest-scoring valid points are chosen. The scores are a
    bijection of j, so there are no ties.

    Args:
        valid: (N, P) bool, P ≥ K.
        num_clusters: K.
        seed: selects the subset.

    Returns:
        (N, K) long positions in P, highest score first.
    """
    N, P = valid.shape
    seed_hash = int(_fmix32(torch.tensor(seed & _MASK32, dtype=torch.long)))
    position = torch.arange(P, device=valid.device)
    scores = _fmix32((_mul32(position, _GOLDEN) + seed_hash) & _MASK32)  # (P,)
    # Scores are ≥ 0, so −1 ranks every invalid point below every valid one.
    scores = torch.where(valid, scores, -1)  # (N, P)
    return scores.topk(num_clusters, dim=1).indices


def _squared_distances(x: Tensor, x_sq: Tensor, centroids: Tensor) -> Tensor:
    """(N, P, C), (N, P), (N, K, C) -> (N, P, K) squared Euclidean distances."""
    c_sq = (centroids * centroids).sum(-1)  # (N, K)
    cross = torch.baddbmm(c_sq[:, None, :], x, centroids.transpose(1, 2), alpha=-2.0)
    return cross + x_sq[:, :, None]


def _cluster_sums(
    x: Tensor, assignments: Tensor, valid: Tensor, num_clusters: int, use_matmul: bool
) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (N, K, C) and counts (N, K, 1) of the valid points.

    `use_matmul` (accelerators): a one-hot matmul, on tensor cores, and
    deterministic where atomic scatter-adds are not. Otherwise (CPU): a row
    scatter-add, N·P·C additions instead of N·P·K·C multiply-adds, and
    deterministic on CPU.
    """
    N, P, C = x.shape
    K = num_clusters
    if use_matmul:
        one_hot = torch.nn.functional.one_hot(assignments, K).to(x.dtype) * valid[..., None]  # (N, P, K)
        return one_hot.transpose(1, 2) @ x, one_hot.sum(1)[..., None]
    # Invalid points go to an extra trash row N·K, dropped afterwards.
    row = torch.where(valid, assignments + K * torch.arange(N, device=x.device)[:, None], N * K)  # (N, P)
    row = row.view(N * P)
    sums = x.new_zeros(N * K + 1, C).index_add_(0, row, x.reshape(N * P, C))[:-1]
    counts = torch.bincount(row, minlength=N * K + 1)[:-1].to(x.dtype)
    return sums.view(N, K, C), counts.view(N, K, 1)


def _lloyd_step(x: Tensor, x_sq: Tensor, valid: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """One assignment + update; a cluster that receives no point keeps its centroid."""
    assignments = _squared_distances(x, x_sq, centroids).argmin(-1)  # (N, P)
    use_matmul = x.device.type != "cpu"
    sums, counts = _cluster_sums(x, assignments, valid, centroids.shape[1], use_matmul)
    means = sums / counts.clamp(min=1.0)
    return torch.where(counts > 0, means, centroids), assignments


def _pass_through(x: Tensor, count: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Left-packed (N, P, C) -> its first K points (N, K, C) with their validity (N, K)."""
    valid = torch.arange(num_tokens, device=x.device) < count  # (N, K)
    return x[:, :num_tokens] * valid[..., None], valid


def batched_kmeans(
    points: Tensor, valid: Tensor, num_clusters: int, iterations: int, seed: int = 0
) -> KMeansResult:
    """Cluster every object's valid points into `num_clusters` centroids at once.

    Objects with more than K valid points run exactly `iterations` Lloyd steps
    from `initial_indices`; the others pass their points through unclustered.

    Args:
        points: (N, P, C) float, padded layout.
        valid: (N, P) bool, left-packed: each object's valid points come first.
        num_clusters: K.
        iterations: Lloyd steps (5 in PixelRefer, 3 in Lite).
        seed: initialisation seed.
    """
    N, P, C = points.shape
    K = num_clusters
    if P < K:
        # Pad with invalid points so that top-K and one-hot shapes exist; sliced off below.
        points = torch.nn.functional.pad(points, (0, 0, 0, K - P))
        valid = torch.nn.functional.pad(valid, (0, K - P), value=False)
    compute_dtype = torch.promote_types(points.dtype, torch.float32)
    x = points.to(compute_dtype)  # (N, P, C), P now ≥ K
    # A norm reads x once; (x * x).sum(-1) would first write an (N, P, C) temporary.
    x_sq = torch.linalg.vector_norm(x, dim=-1).square()  # (N, P)

    init = initial_indices(valid, K, seed)  # (N, K)
    centroids = x[torch.arange(N, device=x.device)[:, None], init]  # (N, K, C)
    for _ in range(iterations):
        centroids, assignments = _lloyd_step(x, x_sq, valid, centroids)
    if iterations == 0:
        assignments = _squared_distances(x, x_sq, centroids).argmin(-1)

    # The release's PixelRefer returns a variable token count for small objects;
    # fixed K rows plus `token_valid` carry the same information, batched.
    count = valid.sum(1, keepdim=True)  # (N, 1)
    packed, packed_valid = _pass_through(x, count, K)
    clustered = count > K
    centroids = torch.where(clustered[..., None], centroids, packed)
    token_valid = clustered | packed_valid
    position = torch.arange(valid.shape[1], device=x.device).expand_as(valid)
    assignments = torch.where(clustered, assignments, position)  # pass-through: own token
    assignments = assignments.masked_fill(~valid, -1)[:, :P]
    return KMeansResult(centroids.to(points.dtype), token_valid, assignments, init)


def kmeans_reference(
    points_list: list[Tensor], num_clusters: int, iterations: int, init_indices: list[Tensor | None]
) -> list[Tensor]:
    """Slow reference: a Python loop over objects and over clusters.

    The release's formulation (REFERENCE §9), kept to check `batched_kmeans`
    and to time against it. Not for the hot path.

    Args:
        points_list: per object, its (P_i, C) valid points.
        num_clusters: K.
        iterations: Lloyd steps.
        init_indices: per object, K positions in P_i of the initial centroids
            (unused, may be None, when P_i ≤ K).

    Returns:
        Per object, (min(P_i, K), C) tokens in the input dtype: the points
        themselves when P_i ≤ K, else the centroids.
    """
    tokens = []
    for points, init in zip(points_list, init_indices):
        if points.shape[0] <= num_clusters:
            tokens.append(points.clone())
            continue
        x = points.to(torch.promote_types(points.dtype, torch.float32))
        centroids = x[init[:num_clusters]]  # (K, C), a copy
        for _ in range(iterations):
            distances = torch.stack([((x - centroids[k]) ** 2).sum(-1) for k in range(num_clusters)], dim=1)
            assignments = distances.argmin(1)
            for k in range(num_clusters):
                members = x[assignments == k]
                if len(members) > 0:
                    centroids[k] = members.mean(0)
        tokens.append(centroids.to(points.dtype))
    return tokens
