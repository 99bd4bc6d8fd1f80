"""Object-token similarity (Fig. 7) and token-to-cell maps."""

import pytest
import torch

from pixelrefer.analysis.similarity import cosine_matrix, mean_off_diagonal, object_similarity, token_cell_map
from tests.conftest import build


def test_cosine_matrix_and_mean_off_diagonal_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    s = 2**-0.5
    torch.testing.assert_close(cosine_matrix(x), torch.tensor([[1, 0, s], [0, 1, s], [s, s, 1]]))
    assert mean_off_diagonal(cosine_matrix(x)) == pytest.approx((4 * s) / 6)


def forward(scene, **overrides):
    model, processor = build("vision_object", **overrides)
    image, masks = scene
    encoded = processor.encode("<region> and <region>", images=image, masks=[masks["square"], masks["speck"]])
    with torch.no_grad():
        out = model(**encoded.inputs)
    return out.object_outputs, encoded


def test_object_similarity_shapes_match_cells_and_tokens(scene):
    objects, encoded = forward(scene)
    square = object_similarity(objects, 0, max_cells=10)
    cells = int(encoded.crops[0][0].cell_mask.sum())
    assert square.cells == cells and square.before.shape == (min(cells, 10), min(cells, 10))
    assert square.after.shape == (4, 4)
    torch.testing.assert_close(square.before.diagonal(), torch.ones(square.before.shape[0]))
    speck = object_similarity(objects, 1)
    assert speck.after.shape[0] == int(encoded.crops[0][1].cell_mask.sum()) <= 4


def test_token_cell_map_matches_crop_masks_and_assignments(scene):
    objects, encoded = forward(scene)
    for index, crop in enumerate(encoded.crops[0]):
        cells = token_cell_map(objects, index, encoded.inputs["region_grid_thw"])
        assert cells.shape == crop.grid
        assert torch.equal(cells >= 0, torch.from_numpy(crop.cell_mask))
        assert cells.max() < 4
    used = token_cell_map(objects, 0, encoded.inputs["region_grid_thw"])
    assert len(set(used[used >= 0].tolist())) > 1, "the square's cells are spread over several tokens"
