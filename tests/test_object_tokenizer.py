"""Batched k-means and object tokenizers against their looped references and hand checks."""

import pytest
import torch
from torch.testing import assert_close

from pixelrefer.modeling.kmeans import _cluster_sums, batched_kmeans, initial_indices, kmeans_reference
from pixelrefer.modeling.object_tokenizer import MaskPooling, ObjectTokenizer, object_tokenizer_reference

C, D, K = 16, 24, 4
TOL = dict(atol=1e-5, rtol=1e-5)


def padded(counts, dim=C, seed=0):
    """Random left-packed points (N, P_max, C) with valid (N, P_max) for the given counts."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(len(counts), max(counts), dim, generator=g)
    valid = torch.arange(max(counts)) < torch.tensor(counts)[:, None]
    return points * valid[..., None], valid


def packed_crops(grids, foreground, seed=0):
    """Packed crop cells for crops of the given (h, w) and foreground fractions."""
    g = torch.Generator().manual_seed(seed)
    cells_per_object = torch.tensor([h * w for h, w in grids])
    P = int(cells_per_object.sum())
    features = torch.randn(P, C, generator=g)
    positions = torch.rand(P, 2, generator=g)
    mask = torch.cat([torch.rand(h * w, generator=g) < f for (h, w), f in zip(grids, foreground)])
    mask[cells_per_object.cumsum(0) - 1] = True  # at least one foreground cell per object
    return features, positions, mask, cells_per_object


GRIDS = [(3, 4), (2, 2), (5, 5), (1, 3), (4, 4)]
FOREGROUND = [0.7, 0.3, 0.6, 1.0, 0.9]


@pytest.mark.parametrize("iterations", [0, 1, 5])
def test_batched_kmeans_matches_reference(iterations):
    counts = [20, 3, K, 37, 1, 50, K + 1]  # fewer than K, exactly K, more than K
    points, valid = padded(counts)
    result = batched_kmeans(points, valid, K, iterations, seed=3)
    expected = kmeans_reference(
        [points[n, :c] for n, c in enumerate(counts)], K, iterations, list(result.init_indices)
    )
    for n, c in enumerate(counts):
        k_n = min(c, K)
        assert_close(result.centroids[n, :k_n], expected[n], **TOL, msg=lambda m, n=n: f"object {n}: {m}")
        assert result.valid[n].tolist() == [k < k_n for k in range(K)]
        assert not result.centroids[n, k_n:].any()
        assert (result.assignments[n, c:] == -1).all() and (result.assignments[n, :c] >= 0).all()


def test_kmeans_centroids_are_means_of_their_assignments():
    points, valid = padded([30, 2])
    result = batched_kmeans(points, valid, K, iterations=3)
    for k in range(K):
        members = points[0][result.assignments[0] == k]
        if len(members):
            assert_close(result.centroids[0, k], members.mean(0), **TOL)
    assert result.assignments[1, :2].tolist() == [0, 1]  # pass-through: the point's own token


def test_kmeans_is_deterministic_and_batch_invariant():
    points, valid = padded([20, 33, 9])
    first = batched_kmeans(points, valid, K, 5, seed=7)
    second = batched_kmeans(points, valid, K, 5, seed=7)
    assert torch.equal(first.centroids, second.centroids)
    assert torch.equal(first.assignments, second.assignments)
    other = batched_kmeans(points, valid, K, 5, seed=8)
    assert not torch.equal(first.init_indices[1], other.init_indices[1])
    # The init depends on an object's own points only: alone, or wider padding, same result.
    alone = batched_kmeans(points[1:2, :33], valid[1:2, :33], K, 5, seed=7)
    wider = batched_kmeans(torch.nn.functional.pad(points, (0, 0, 0, 10)),
                           torch.nn.functional.pad(valid, (0, 10)), K, 5, seed=7)
    assert torch.equal(alone.centroids[0], first.centroids[1])
    assert torch.equal(wider.centroids, first.centroids)


def test_cluster_sums_matmul_and_scatter_agree():
    # The accelerator path (one-hot matmul) is exercised here on CPU.
    points, valid = padded([20, 3, 9])
    assignments = torch.randint(K, valid.shape, generator=torch.Generator().manual_seed(0))
    scatter = _cluster_sums(points, assignments, valid, K, use_matmul=False)
    matmul = _cluster_sums(points, assignments, valid, K, use_matmul=True)
    assert_close(matmul, scatter, **TOL)
    assert_close(scatter[1].sum((1, 2)), valid.sum(1).float(), atol=0, rtol=0)


def test_initial_indices_pick_valid_points_only():
    valid = torch.tensor([[True, False, True, True, False, True, True]])
    init = initial_indices(valid, 3, seed=1)[0]
    assert valid[0, init].all() and len(set(init.tolist())) == 3


def test_empty_cluster_keeps_its_centroid():
    # Two distinct values and K = 3: two initial centroids coincide, argmin
    # gives all their points to the first, so the other cluster is empty.
    a, b = torch.full((C,), 1.0), torch.full((C,), 5.0)
    points = torch.stack([a, a, a, a, b, b])[None]  # (1, 6, C)
    valid = torch.ones(1, 6, dtype=torch.bool)
    for seed in range(4):
        result = batched_kmeans(points, valid, 3, iterations=2, seed=seed)
        init = result.init_indices[0]
        empty = [k for k in range(3) if not (result.assignments[0] == k).any()]
        assert empty, "construction should leave a cluster empty"
        for k in empty:
            assert_close(result.centroids[0, k], points[0, init[k]], **TOL)
        expected = kmeans_reference([points[0]], 3, 2, [init])[0]
        assert_close(result.centroids[0], expected, **TOL)


def test_object_tokenizer_matches_reference():
    tokenizer = ObjectTokenizer(C, D, K, kmeans_iterations=3, kmeans_seed=2)
    inputs = packed_crops(GRIDS, FOREGROUND)
    out = tokenizer(*inputs)
    expected = object_tokenizer_reference(tokenizer, *inputs)
    assert out.tokens.shape == (len(GRIDS), K, D)
    for n, tokens in enumerate(expected):
        k_n = tokens.shape[0]
        assert_close(out.tokens[n, :k_n], tokens, **TOL, msg=lambda m, n=n: f"object {n}: {m}")
        assert out.valid[n].sum() == k_n and not out.tokens[n, k_n:].any()
    # A fixed padded width (no sync) changes nothing.
    fixed = tokenizer(*inputs, max_cells=40)
    assert fixed.aggregated.cells.shape[1] == 40
    assert_close(fixed.tokens, out.tokens, atol=0, rtol=0)


def test_aggregated_cells_layout():
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    agg = ObjectTokenizer(C, D, K, use_position_encoding=False).aggregate(
        features, positions, mask, cells_per_object
    )
    for n, cells in enumerate(features.split(cells_per_object.tolist())):
        fg = cells[mask.split(cells_per_object.tolist())[n]]
        assert_close(agg.cells[n, : len(fg)], fg, atol=0, rtol=0)
        assert agg.cell_valid[n].sum() == len(fg)
    assert_close(agg.cells[agg.cell_valid], features[agg.cell_index[agg.cell_valid]], atol=0, rtol=0)


def test_position_encoding_is_added_to_each_cell_before_masking():
    tokenizer = ObjectTokenizer(C, D, num_tokens=32)  # more tokens than cells: pass-through
    with torch.no_grad():
        tokenizer.position_proj.weight.copy_(torch.arange(2 * C, dtype=torch.float).view(C, 2))
        tokenizer.position_proj.bias.fill_(0.5)
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    agg = tokenizer.aggregate(torch.zeros_like(features), positions, mask, cells_per_object)
    weight = torch.arange(2 * C, dtype=torch.float).view(C, 2)
    offsets = [0, *cells_per_object.cumsum(0).tolist()]
    for n in range(len(GRIDS)):
        own = positions[offsets[n] : offsets[n + 1]][mask[offsets[n] : offsets[n + 1]]]  # (F_n, 2)
        assert_close(agg.features[n, : len(own)], own @ weight.T + 0.5, **TOL)


def test_without_position_encoding_positions_are_ignored():
    tokenizer = ObjectTokenizer(C, D, K, use_position_encoding=False)
    assert tokenizer.position_proj is None
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    out = tokenizer(features, positions, mask, cells_per_object)
    moved = tokenizer(features, torch.rand_like(positions), mask, cells_per_object)
    assert_close(out.tokens, moved.tokens, atol=0, rtol=0)
    expected = object_tokenizer_reference(tokenizer, features, positions, mask, cells_per_object)
    for n, tokens in enumerate(expected):
        assert_close(out.tokens[n, : tokens.shape[0]], tokens, **TOL)


def test_mask_pooling_is_mean_then_mlp():
    pooling = MaskPooling(C, D)
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    out = pooling(features, positions, mask, cells_per_object)
    assert out.tokens.shape == (len(GRIDS), 1, D) and out.valid.all()
    with_position = features + positions @ pooling.position_proj.weight.T + pooling.position_proj.bias
    for n, (cells, fg) in enumerate(zip(with_position.split(cells_per_object.tolist()),
                                        mask.split(cells_per_object.tolist()))):
        mean = cells[fg].mean(0)
        hand = pooling.mlp[2](torch.nn.functional.gelu(pooling.mlp[0](mean)))
        assert_close(out.tokens[n, 0], hand, **TOL)


@pytest.mark.parametrize("module", [ObjectTokenizer(C, D, K), MaskPooling(C, D)], ids=["saot", "mask_pooling"])
def test_every_parameter_gets_a_gradient(module):
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    features.requires_grad_(True)
    module(features, positions, mask, cells_per_object).tokens.square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert features.grad[mask].abs().sum() > 0 and not features.grad[~mask].any()


def test_inconsistent_cells_per_object_is_rejected():
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    cells_per_object[0] += 1
    with pytest.raises(ValueError, match="sums to"):
        ObjectTokenizer(C, D, K)(features, positions, mask, cells_per_object)


def test_object_without_foreground_is_rejected():
    features, positions, mask, cells_per_object = packed_crops(GRIDS, FOREGROUND)
    mask[12:16] = False  # object 1 is the 2×2 crop at cells 12..15
    with pytest.raises(ValueError, match=r"object\(s\) \[1\]"):
        ObjectTokenizer(C, D, K)(features, positions, mask, cells_per_object)


def test_bfloat16_matches_float32():
    # Cells come in K exact copies (same feature and position), far apart: rounding to
    # bf16 cannot split a copy group or move a cell across groups, so the clustering
    # is the same in both precisions and only rounding differs.
    g = torch.Generator().manual_seed(0)
    grids = [(6, 6), (5, 7), (2, 1)]
    P = sum(h * w for h, w in grids)
    group = torch.randint(K, (P,), generator=g)
    features = (20 * torch.randn(K, C, generator=g))[group]
    positions = torch.rand(K, 2, generator=g)[group]
    mask = torch.ones(P, dtype=torch.bool)
    cells_per_object = torch.tensor([h * w for h, w in grids])
    tokenizer = ObjectTokenizer(C, D, K, kmeans_iterations=5)
    reference = tokenizer(features, positions, mask, cells_per_object)
    out = tokenizer.to(torch.bfloat16)(features.bfloat16(), positions, mask, cells_per_object)
    assert out.tokens.dtype == torch.bfloat16 and out.aggregated.features.dtype == torch.bfloat16
    assert torch.equal(out.aggregated.assignments, reference.aggregated.assignments)
    # bf16 keeps 8 mantissa bits (relative step 2⁻⁸ ≈ 0.4 %); over the features, weights
    # and two layers that stays within 2 % of the largest token value.
    scale = reference.tokens.abs().max().item()
    assert_close(out.tokens.float(), reference.tokens, atol=2e-2 * scale, rtol=0)
