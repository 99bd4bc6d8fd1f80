"""Widgets' Python side: picker state through its mouse handlers, mask export, explorer and viewer switching."""

from functools import lru_cache
from unittest import mock

import numpy as np
import pytest
import torch

from pixelrefer import InputError
from pixelrefer.analysis import capture_attention, token_groups
from pixelrefer.demo import demo_scene, demo_video
from pixelrefer.regions import decode_mask, mask_to_rle
from tests.conftest import build
from tests.test_attention_capture import encode
from tests.test_propagation import single_thread, write_tiny_transformers_sam2  # noqa: F401 (a fixture)
from widgets import AttentionExplorer, RegionPicker, SimilarityViewer
from widgets.region_picker import paint_segment

H, W = 96, 128  # demo_scene

# One torch thread for the tiny models: on a shared 2-core machine OpenMP barriers make them several times slower.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def picker():
    image, masks = demo_scene()
    return RegionPicker(image, {"square": masks["square"], "disc": masks["disc"]}, brush_radius=2)


def stroke(picker, points):
    picker.mouse_down(*points[0])
    for point in points[1:]:
        picker.mouse_move(*point)
    picker.mouse_up(*points[-1])


# ---------------------------------------------------------------------------------------------- painting
def test_a_stroke_paints_pixel_centres_within_the_radius_of_the_segment():
    mask = np.zeros((20, 20), bool)
    paint_segment(mask, (5.5, 10.5), (15.5, 10.5), 2)
    # 11 columns × 5 rows along the segment, plus 3 + 1 pixels beyond each end.
    assert mask.sum() == 11 * 5 + 2 * (3 + 1)
    assert mask[8:13, 5:16].all() and not mask[7].any() and not mask[13].any()
    dot = np.zeros((20, 20), bool)
    paint_segment(dot, (10.5, 10.5), (10.5, 10.5), 2)  # a click: a disc of 13 pixel centres
    assert dot.sum() == 13
    corner = np.zeros((20, 20), bool)
    paint_segment(corner, (-3, -3), (0.5, 0.5), 1.5)  # clipped at the border, no error
    assert corner[0, 0] and corner.sum() < 13


# ---------------------------------------------------------------------------------------------- picker state
def test_built_from_masks_names_objects_in_order(picker):
    assert list(picker.masks) == ["<object0>", "<object1>"]
    assert picker.labels == {"<object0>": "square", "<object1>": "disc"}
    assert picker.current == 1
    np.testing.assert_array_equal(picker.masks["<object0>"], demo_scene()[1]["square"])


def test_built_from_rle_polygon_box_and_list():
    image, masks = demo_scene()
    picker = RegionPicker(image, [mask_to_rle(masks["disc"]), [[10, 10, 40, 10, 25, 30]], [0, 0, 5, 5]])
    assert list(picker.labels.values()) == ["", "", ""]
    np.testing.assert_array_equal(picker.masks["<object0>"], masks["disc"])
    assert picker.masks["<object1>"][12, 25] and picker.masks["<object2>"].sum() == 25


def test_wrong_mask_shape_names_the_object():
    image, masks = demo_scene()
    with pytest.raises(InputError, match=r"object 1 \('small'\): mask shape \(5, 5\) does not match image shape"):
        RegionPicker(image, {"square": masks["square"], "small": np.ones((5, 5), bool)})


def test_drawing_adds_to_the_new_object_only(picker):
    before = picker.masks
    index = picker.add_object("drawn")
    assert index == 2 and picker.current == 2 and not picker.masks["<object2>"].any()
    stroke(picker, [(80.0, 80.0), (90.0, 82.0), (100.0, 84.0)])
    drawn = picker.masks["<object2>"]
    assert drawn.sum() > 20 and drawn[80, 90]
    for name in before:
        np.testing.assert_array_equal(picker.masks[name], before[name])


def test_erase_undo_and_clear(picker):
    picker.select(0)
    square = picker.masks["<object0>"]
    picker.tool = "erase"
    stroke(picker, [(10.0, 40.0), (60.0, 40.0)])
    erased = picker.masks["<object0>"]
    assert erased.sum() < square.sum() and not erased[40, 30] and (erased <= square).all()
    assert picker.undo()
    np.testing.assert_array_equal(picker.masks["<object0>"], square)
    picker.clear()
    assert not picker.masks["<object0>"].any() and picker.masks["<object1>"].any()
    picker.undo()
    np.testing.assert_array_equal(picker.masks["<object0>"], square)
    picker.add_object()
    picker.undo()
    assert len(picker.objects) == 2
    while picker.undo():
        pass
    assert not picker.undo()


def test_box_without_refinement_fills_it_and_a_click_is_no_box(picker):
    picker.add_object()
    picker.tool = "box"
    stroke(picker, [(20.2, 70.0), (30.0, 75.0), (40.0, 90.5)])
    np.testing.assert_array_equal(picker.masks["<object2>"], decode_mask([20, 70, 40, 91], H, W))
    assert picker.objects[2].box == (20, 70, 40, 91)
    history = len(picker._history)
    stroke(picker, [(5.0, 5.0)])
    assert len(picker._history) == history and picker.objects[2].box == (20, 70, 40, 91)


def test_points_without_refinement_paint_and_erase_a_disc(picker):
    picker.add_object()
    picker.tool = "point +"
    picker.mouse_down(100.5, 80.5)
    picker.mouse_up(100.5, 80.5)
    assert picker.masks["<object2>"].sum() == 13  # brush radius 2
    picker.tool = "point -"
    picker.mouse_down(101.5, 80.5)
    assert 0 < picker.masks["<object2>"].sum() < 13
    assert picker.objects[2].points == [(100.5, 80.5, 1), (101.5, 80.5, 0)]


def test_refinement_replaces_the_mask_from_all_prompts():
    image, _ = demo_scene()
    calls = []

    def refine(img, points, labels, box):
        calls.append((points.copy(), labels.copy(), box))
        mask = np.zeros(img.shape[:2], bool)
        for (x, y), label in zip(points, labels):
            mask[int(y) - 3:int(y) + 3, int(x) - 3:int(x) + 3] = bool(label)
        return mask

    picker = RegionPicker(image, refine=refine)
    picker.tool = "point +"
    picker.mouse_down(50.0, 50.0)
    picker.tool = "point -"
    picker.mouse_down(20.0, 20.0)
    picker.tool = "box"
    stroke(picker, [(10.0, 10.0), (60.0, 60.0)])
    assert len(calls) == 3 and calls[-1][2] == (10, 10, 60, 60)
    np.testing.assert_array_equal(calls[-1][0], [[50, 50], [20, 20]])
    np.testing.assert_array_equal(calls[-1][1], [1, 0])
    assert picker.masks["<object0>"].sum() == 36


def test_prompts_say_what_made_each_object(picker):
    picker.add_object()
    picker.tool = "point +"
    picker.mouse_down(100.5, 80.5)
    picker.tool = "box"
    stroke(picker, [(90.0, 70.0), (110.0, 90.0)])
    square, disc, clicked = picker.prompts()
    np.testing.assert_array_equal(square["mask"], picker.masks["<object0>"])
    assert set(square) == {"frame", "mask"} and disc["frame"] == 0
    assert clicked == dict(frame=0, points=[(100.5, 80.5)], labels=[1], box=(90, 70, 110, 90))


def test_a_sam2_mask_propagator_refines_clicks_and_tracks_the_picked_objects(tmp_path):
    """pixelrefer's MaskPropagator (tiny random SAM 2) as `refine`, then `prompts()` as its tracking prompts."""
    from pixelrefer.propagation import MaskPropagator, ObjectPrompt

    propagator = MaskPropagator.from_pretrained(write_tiny_transformers_sam2(tmp_path), progress=False)

    def refine(image, points, labels, box):
        prompt = ObjectPrompt(0, points.tolist() or None, labels.tolist() or None, box)
        return propagator.propagate([image], [prompt]).masks[0, 0]

    video, _ = demo_video()
    picker = RegionPicker.from_video(video, 1, refine=refine)
    picker.tool = "point +"
    picker.mouse_down(100.0, 40.0)
    assert picker.masks["<object0>"].any(), "the random model predicts something for a click"
    tracked = propagator.propagate(video, [ObjectPrompt(**p) for p in picker.prompts()])
    assert tracked.masks.shape == (1, len(video.frames), H, W)
    np.testing.assert_array_equal(tracked.masks[0, 1], picker.masks["<object0>"])


def test_a_bad_refined_mask_is_rejected_and_shown_by_the_canvas_callback():
    image, _ = demo_scene()
    picker = RegionPicker(image, refine=lambda img, points, labels, box: np.ones((4, 4), bool))
    picker.tool = "point +"
    with pytest.raises(InputError, match=r"refine returned a mask of shape \(4, 4\) for <object0>"):
        picker.mouse_down(5.0, 5.0)
    picker.undo()
    picker._canvas[1]._handle_frontend_event(None, {"event": "mouse_down", "x": 5.0, "y": 5.0}, [])
    assert "refine returned a mask" in picker._status.value
    assert picker.objects[0].points == [] and not picker.masks["<object0>"].any()


def test_canvas_events_reach_the_handlers():
    image, _ = demo_scene()
    picker = RegionPicker(image)
    top = picker._canvas[1]
    for event, x in (("mouse_down", 30.0), ("mouse_move", 40.0), ("mouse_move", 50.0), ("mouse_up", 50.0)):
        top._handle_frontend_event(None, {"event": event, "x": x, "y": 20.0}, [])
    assert picker.masks["<object0>"][20, 30:51].all()
    assert f"&lt;object0&gt;: {picker.masks['<object0>'].sum()} px" in picker._status.value


# ---------------------------------------------------------------------------------------------- export
def test_rles_round_trip_and_region_masks(picker):
    for name, rle in picker.rles().items():
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_mask(rle, H, W), picker.masks[name])
    regions = picker.region_masks()
    assert len(regions) == 2 and regions[0] is not picker.objects[0].mask
    picker.add_object()
    with pytest.raises(InputError, match="<object2> is empty"):
        picker.region_masks()
    picker.remove_object()
    assert len(picker.region_masks()) == 2


def test_save_then_load_keeps_masks_and_labels(picker, tmp_path):
    path = picker.save_masks(tmp_path / "picked.json")
    image, _ = demo_scene()
    fresh = RegionPicker(image)
    fresh.remove_object()
    assert fresh.load_masks(path) == [1, 2]
    fresh.remove_object(0)  # the empty starting object
    assert fresh.labels == picker.labels
    for name in picker.masks:
        np.testing.assert_array_equal(fresh.masks[name], picker.masks[name])
    assert RegionPicker(image, path).labels == picker.labels


def test_video_frame_gives_frame_keyed_masks():
    video, masks = demo_video()
    picker = RegionPicker.from_video(video, 1, [masks["disc"][1]])
    (region,) = picker.region_masks()
    assert list(region) == [1]
    np.testing.assert_array_equal(region[1], masks["disc"][1])
    with pytest.raises(InputError, match="frame index 5 is out of range"):
        RegionPicker.from_video(video, 5)


def test_bad_controls_are_input_errors(picker):
    with pytest.raises(InputError, match="unknown tool 'lasso'"):
        picker.tool = "lasso"
    with pytest.raises(InputError, match="no object 4"):
        picker.select(4)


# ---------------------------------------------------------------------------------------------- explorer and viewer
@lru_cache(maxsize=None)
def run(framework):
    """A tiny model's forward pass on the demo scene, captured on every layer."""
    model, processor = build(framework)
    encoded = encode(processor, demo_scene())
    with torch.no_grad(), capture_attention(model, token_groups(encoded), pooled_layers=(0, 1), key_layers=(0, 1),
                                            pool=4) as capture:
        outputs = model(**encoded.inputs)
    return model, encoded, capture, outputs


def test_explorer_switches_layers_and_heads_without_the_model():
    model, encoded, capture, _ = run("vision_object")
    image, _ = demo_scene()
    with mock.patch.object(type(model), "forward", side_effect=AssertionError("the model ran")) as forward:
        explorer = AttentionExplorer(capture, encoded, image)
        first, readout = explorer.figure_png, explorer._readout.value
        assert explorer.layers == [0, 1] and explorer.heads == 4 and explorer.view.layer == 0
        assert explorer._head.label == "mean over heads" and explorer.view.head is None
        explorer._layer.value = 1  # what the slider does
        assert explorer.view.layer == 1 and explorer.figure_png != first and explorer._readout.value != readout
        assert explorer.view.to_groups != explorer.show(0).to_groups
        assert explorer.figure_png == first, "a revisited layer shows the same figure"
        explorer._head.value = 2
        assert explorer.view.head == 2 and explorer.view.layer == 0
        assert forward.call_count == 0
    assert first.startswith(b"\x89PNG")


def test_explorer_rejects_captures_without_key_layers_and_unknown_layers():
    model, encoded, capture, _ = run("vision_object")
    with torch.no_grad(), capture_attention(model, token_groups(encoded)) as plain:
        model(**encoded.inputs)
    with pytest.raises(InputError, match="key_layers"):
        AttentionExplorer(plain, encoded)
    explorer = AttentionExplorer(capture, encoded)
    with pytest.raises(InputError, match=r"layer 5 was not captured with key_layers; explorable: \[0, 1\]"):
        explorer.show(5)


def test_explorer_on_object_only_has_no_image_panel():
    _, encoded, capture, _ = run("object_only")
    explorer = AttentionExplorer(capture, encoded, demo_scene()[0])
    assert explorer.view.image_grid is None and len(explorer.view.objects) == 2


def test_similarity_viewer_per_object():
    _, _, _, outputs = run("vision_object")
    viewer = SimilarityViewer(outputs.object_outputs, ["square", "speck"])
    first = viewer.figure_png
    square = viewer.similarity(0)
    assert square.cells > 4 and square.after.shape == (4, 4)
    speck = viewer.show(1)
    assert viewer.figure_png != first and "speck" in viewer._readout.value
    assert speck.cells <= 4 and "tokens are the cells" in viewer._readout.value
    viewer._selector.value = 0  # what the dropdown does
    assert viewer.figure_png == first
    with pytest.raises(InputError, match="3 names for 2 objects"):
        SimilarityViewer(outputs.object_outputs, ["a", "b", "c"])
