"""ShapesWorld videos through the whole video path: file → sampled frames → masks (ground truth or SAM 2) → model.

Lite must see one unit per (object, frame) with `Time t:` before it and no vision tokens; Vision-Object one run
of vision tokens per sampled frame plus the object units.
"""

import re

import numpy as np
import pytest
import torch

import pixelrefer
from pixelrefer.demo import shapesworld_video
from pixelrefer.propagation import MaskPropagator, ObjectPrompt
from pixelrefer.video import sample_video, write_video
from tests.conftest import FRAMEWORKS, build
from tests.test_propagation import single_thread, write_tiny_sam2_package, write_tiny_transformers_sam2  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "What do <object0><region> and <object1><region> do?"


def two_largest(masks: dict, clip) -> list[dict]:
    """The two objects with the most pixels on their first sampled frame (SAM 2 at 128 px keeps 4-px cells)."""
    def area(truth):
        return truth[min(t for t in clip.indices if t in truth)].sum()
    return sorted(masks.values(), key=area, reverse=True)[:2]


@pytest.fixture(scope="module")
def shapes_clip(tmp_path_factory):
    """A 12-frame ShapesWorld video written as H.264, its ground-truth masks, and 6 frames sampled from the file."""
    video, masks = shapesworld_video(seed=0, num_frames=12, fps=4)
    path = write_video(tmp_path_factory.mktemp("shapes") / "clip.mp4", video.frames, fps=4)
    return path, masks, sample_video(path, 6)


@pytest.fixture(scope="module")
def propagated(shapes_clip, tmp_path_factory):
    """Masks of the two largest objects from each SAM 2 backend, prompted with their ground-truth mask."""
    path, masks, clip = shapes_clip
    root = tmp_path_factory.mktemp("sam2")
    loaders = {"transformers": lambda: MaskPropagator.from_pretrained(write_tiny_transformers_sam2(root / "hf", 128))}
    try:
        checkpoint, config = write_tiny_sam2_package(root / "package", 128)
        loaders["sam2"] = lambda: MaskPropagator.from_pretrained(checkpoint, backend="sam2", config=config)
    except pytest.skip.Exception:
        pass
    prompts = []
    for truth in two_largest(masks, clip):
        first = min(t for t in clip.indices if t in truth)
        prompts.append(ObjectPrompt(frame=first, mask=truth[first]))
    return {name: load().propagate(path, prompts, frames=clip.indices) for name, load in loaders.items()}


def encode_and_check(framework, clip, selected):
    model, processor = build(framework)
    encoded = processor.encode(PROMPT, videos=clip, masks=selected)
    spans = encoded.spans[0]
    units = [(k, t) for k, per_frame in enumerate(selected) for t in per_frame]
    assert [(s.object_index, s.frame_index) for s in spans if s.group == "object"] == units
    text = processor.tokenizer.decode(encoded.inputs["input_ids"][0])
    times = [float(stamp.replace(" ", "")) for stamp in re.findall(r"Time ([\d .]+?) s? ?:", text)]
    if framework == "object_only":
        assert not [s for s in spans if s.group == "vision"]
        assert times == [round(clip.timestamps[t], 1) for _, t in units], "Lite: `Time t:` before every unit"
    else:
        assert [s.frame_index for s in spans if s.group == "vision"] == list(range(len(clip.frames)))
        assert encoded.inputs["video_grid_thw"][0, 0] == len(clip.frames)
        assert times == [round(t, 1) for t in clip.timestamps], "Vision-Object: one time per frame"
    with torch.no_grad():
        outputs = model(**encoded.inputs)
    assert torch.isfinite(outputs.logits).all()
    assert outputs.object_outputs.tokens.shape[0] == len(units)


def test_clip_is_sampled_from_the_file(shapes_clip):
    _, _, clip = shapes_clip
    assert clip.indices == [1, 3, 5, 6, 8, 10] and clip.timestamps == pytest.approx([t / 4 for t in clip.indices])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_ground_truth_masks_go_through_both_frameworks(shapes_clip, framework):
    _, masks, clip = shapes_clip
    selected = clip.select(list(masks.values())[:2])
    truth = list(masks.values())[0]
    assert sorted(selected[0]) == [i for i, t in enumerate(clip.indices) if t in truth]
    encode_and_check(framework, clip, selected)


@pytest.mark.parametrize("backend", ["transformers", "sam2"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sam2_masks_go_through_both_frameworks(shapes_clip, propagated, backend, framework):
    if backend not in propagated:
        pytest.skip("the sam2 package is not installed (make setup installs it)")
    _, masks, clip = shapes_clip
    result = propagated[backend]
    assert result.frame_indices == clip.indices and result.masks.shape[:2] == (2, len(clip.indices))
    for k, truth in enumerate(two_largest(masks, clip)):
        first = min(t for t in clip.indices if t in truth)
        got = result.masks[k, clip.indices.index(first)]
        assert (got & truth[first]).sum() / (got | truth[first]).sum() > 0.8, "the prompt frame keeps its mask"
    encode_and_check(framework, clip, clip.select(result.per_object()))


@pytest.mark.parametrize("model_name", ["shapes-tiny", "shapes-tiny-lite"])
def test_embedded_models_name_the_colours_of_objects_in_a_decoded_clip(shapes_clip, model_name):
    """Colours across time, through MP4 decoding and sampling. On five in-memory ShapesWorld videos the shipped
    models name 18/19 colours each; a broken video path names few."""
    _, masks, clip = shapes_clip
    model, processor = pixelrefer.load(model_name)
    answers = {}
    for name, truth in masks.items():
        answers[name] = pixelrefer.ask(model, processor, "What does <object0><region> do?", video=clip,
                                       masks=clip.select([truth]), max_new_tokens=10).text
    right = sum(name.split()[1] in answer for name, answer in answers.items())
    assert len(answers) >= 3 and right / len(answers) >= 0.6, answers
