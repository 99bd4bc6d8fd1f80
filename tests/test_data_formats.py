"""Annotation formats: every record variant of REFERENCE §5 loads, and bad records name file and index.

The helpers at the top write tiny fixture files; test_data_check and test_data_dataset reuse them.
"""

import json

import numpy as np
import pytest
from PIL import Image

from pixelrefer import InputError, PixelReferProcessor, Video
from pixelrefer.data import load_annotations
from pixelrefer.data.formats import BENCH_Q_INSTRUCTION
from pixelrefer.regions import mask_to_rle
from tests.conftest import tiny_overrides

H, W = 32, 40
QUESTION = "<image>\nWhat is the category of <region>? Using only one word or phrase."


def square_mask(x0=4, y0=6, x1=20, y1=18, height=H, width=W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths down columns, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": list(mask.shape)}


def write_image(path, mask=None, height=H, width=W, colour=(200, 40, 40)):
    image = np.full((height, width, 3), 20, dtype=np.uint8)
    image[square_mask(height=height, width=width) if mask is None else mask] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_frames(folder, count=3, height=H, width=W):
    return [write_image(folder / f"frame_{t:02d}.png", square_mask(2 + 4 * t, 6, 14 + 4 * t, 18), height, width)
            for t in range(count)]


def image_record(mask_spec, image="img.png", **extra):
    return {"image": image, "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "square"}],
            "masks": [mask_spec], **extra}


def video_record(frames, masks, timestamps=None, question="<video>\nWhat does <object0><region> do?", **extra):
    record = {"video": frames, "conversations": [{"from": "human", "value": question},
                                                 {"from": "gpt", "value": "it moves right"}], "masks": masks, **extra}
    if timestamps is not None:
        record["timestamps"] = timestamps
    return record


def frame_masks(frames=(0, 1, 2)) -> dict:
    return {str(t): mask_to_rle(square_mask(2 + 4 * t, 6, 14 + 4 * t, 18)) for t in frames}


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_image_record_mask_forms_all_load(tmp_path):
    write_image(tmp_path / "img.png")
    mask = square_mask()
    polygon = [[4, 6, 20, 6, 20, 18, 4, 18]]  # pycocotools fills [x0, x1) × [y0, y1) here
    records = [image_record(polygon, height=H, width=W), image_record(mask_to_rle(mask)),
               image_record(uncompressed_rle(mask), height=H, width=W), image_record([4, 6, 20, 18])]
    samples = load_annotations(write_json(tmp_path / "a.json", records))
    assert [s.index for s in samples] == [0, 1, 2, 3]
    for sample in samples:
        inputs = sample.load_media()
        assert inputs.video is None and inputs.image.size == (W, H)
        np.testing.assert_array_equal(inputs.masks[0], mask)
        assert inputs.text == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "square"}]


def test_image_may_be_a_one_element_list_and_paths_follow_media_root(tmp_path):
    write_image(tmp_path / "media" / "img.png")
    path = write_json(tmp_path / "a.json", [image_record(mask_to_rle(square_mask()), image=["img.png"])])
    sample = load_annotations(path, media_root=tmp_path / "media")[0]
    assert sample.image == tmp_path / "media" / "img.png"
    assert sample.load_media().image.size == (W, H)


def test_video_frame_list_with_timestamps_and_mask_dicts(tmp_path):
    write_frames(tmp_path / "clip")
    frames = [f"clip/frame_{t:02d}.png" for t in range(3)]
    path = write_json(tmp_path / "v.json", [video_record(frames, [frame_masks((0, 2))], timestamps=[0.0, 0.5, 1.0])])
    inputs = load_annotations(path)[0].load_media()
    assert isinstance(inputs.video, Video) and len(inputs.video.frames) == 3
    assert inputs.video.times() == [0.0, 0.5, 1.0]
    assert sorted(inputs.masks[0]) == [0, 2]
    np.testing.assert_array_equal(inputs.masks[0][2], square_mask(10, 6, 22, 18))


def test_video_frame_folder_loads_every_frame_in_name_order(tmp_path):
    write_frames(tmp_path / "clip", count=4)
    path = write_json(tmp_path / "v.json", [video_record("clip", [frame_masks((3,))], fps=2.0)])
    inputs = load_annotations(path)[0].load_media()
    assert len(inputs.video.frames) == 4 and inputs.video.times() == [0.0, 0.5, 1.0, 1.5]


def test_videorefer_annotation_wrapper_equals_plain_masks(tmp_path):
    write_frames(tmp_path / "clip")
    frames = [f"clip/frame_{t:02d}.png" for t in range(3)]
    plain = video_record(frames, [frame_masks()])
    wrapped = video_record(frames, None)
    del wrapped["masks"]
    wrapped["annotation"] = [{t: {"segmentation": rle} for t, rle in frame_masks().items()}]
    a, b = load_annotations(write_json(tmp_path / "v.json", [plain, wrapped]))
    for t in range(3):
        np.testing.assert_array_equal(a.load_media().masks[0][t], b.load_media().masks[0][t])


def test_bench_q_record_becomes_question_options_instruction_and_answer(tmp_path):
    write_frames(tmp_path / "clip")
    record = {
        "video": [f"clip/frame_{t:02d}.png" for t in range(3)], "timestamps": [0, 1, 2],
        "Question": "What does <object0><region> do?", "type": "Basic",
        "options": ["(A) it stays still", "(B) it moves right"], "Answer": "(B) it moves right",
        "annotation": [{"1": {"segmentation": frame_masks()["1"]}}],
    }
    sample = load_annotations(write_json(tmp_path / "q.json", [record]))[0]
    assert sample.task == "multiple_choice" and sample.meta["type"] == "Basic"
    user, answer = sample.conversation
    assert user["content"] == "\n".join([record["Question"], *record["options"], BENCH_Q_INSTRUCTION])
    assert answer == {"role": "assistant", "content": "(B) it moves right"}
    assert sorted(sample.load_media().masks[0]) == [1]


def test_jsonl_index_is_the_line_number_and_blank_lines_are_skipped(tmp_path):
    write_image(tmp_path / "img.png")
    record = json.dumps(image_record(mask_to_rle(square_mask())))
    path = tmp_path / "a.jsonl"
    path.write_text(f"{record}\n\n{record}\n")
    assert [s.index for s in load_annotations(path)] == [0, 2]


def test_video_file_decodes_only_the_frames_the_masks_name(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(6):
            frame = np.full((H, W, 3), 40 * t, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    masks = [{"1": mask_to_rle(square_mask()), "4": mask_to_rle(square_mask())}, {"4": mask_to_rle(square_mask())}]
    record = video_record("clip.mp4", masks, question="<object0><region> and <object1><region>?")
    inputs = load_annotations(write_json(tmp_path / "v.json", [record]))[0].load_media()
    assert len(inputs.video.frames) == 2 and inputs.video.frames[0].size == (W, H)
    assert inputs.video.times() == pytest.approx([0.2, 0.8])
    assert [sorted(m) for m in inputs.masks] == [[0, 1], [1]]
    bad = video_record("clip.mp4", [{"9": mask_to_rle(square_mask())}])
    with pytest.raises(InputError, match=r"v2.json:0: frame index 9 is out of range \(video .* has 6 frames\)"):
        load_annotations(write_json(tmp_path / "v2.json", [bad]))[0].load_media()


def test_load_annotations_raises_listing_every_bad_record(tmp_path):
    good = image_record(mask_to_rle(square_mask()))
    path = write_json(tmp_path / "a.json", [good, {"image": "x.png"}, good, [1, 2]])
    with pytest.raises(InputError) as info:
        load_annotations(path)
    message = str(info.value)
    assert "2 bad record(s)" in message
    assert f"{path}:1: a record needs 'conversations'" in message
    assert f"{path}:3: a record must be a JSON object" in message


def test_load_media_errors_name_file_index_object_and_frame(tmp_path):
    write_frames(tmp_path / "clip")
    frames = [f"clip/frame_{t:02d}.png" for t in range(3)]
    empty = mask_to_rle(np.zeros((H, W), dtype=bool))
    path = write_json(tmp_path / "v.json", [video_record(frames, [{"0": frame_masks()["0"], "1": empty}])])
    with pytest.raises(InputError, match=r"v.json:0, object 0, frame 1: mask is empty"):
        load_annotations(path)[0].load_media()


def test_stated_size_must_match_the_image(tmp_path):
    write_image(tmp_path / "img.png")
    path = write_json(tmp_path / "a.json", [image_record(mask_to_rle(square_mask()), height=H, width=W + 1)])
    with pytest.raises(InputError, match=r"a.json:0: the record says 32x41 .* media are 32x40"):
        load_annotations(path)[0].load_media()


def test_loaded_sample_encodes_with_the_processor(tmp_path):
    write_image(tmp_path / "img.png")
    sample = load_annotations(write_json(tmp_path / "a.json", [image_record(mask_to_rle(square_mask()))]))[0]
    text, image, video, masks = sample.load_media()
    processor = PixelReferProcessor.from_preset("tiny", **tiny_overrides())
    inputs = processor(text=text, images=image, videos=video, masks=masks)
    assert (inputs["input_ids"] == processor.config.region_token_id).sum() == processor.config.num_object_tokens
