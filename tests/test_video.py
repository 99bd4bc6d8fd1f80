"""Video decoding and sampling: random access equals a plain decode, lazy seeking, timestamps, every input error."""

import json

import numpy as np
import pytest
from PIL import Image

from pixelrefer import InputError, Video
from pixelrefer.data import load_annotations
from pixelrefer.regions import mask_to_rle
from pixelrefer.video import SampledVideo, open_video, sample_video, uniform_indices, write_video

av = pytest.importorskip("av")

H, W, FPS = 48, 64, 10


def frame(t: int) -> np.ndarray:
    """Frame t of the test clip: a red level that encodes t, and a bar that moves right."""
    image = np.full((H, W, 3), 30, dtype=np.uint8)
    image[..., 0] = 4 * t
    image[10:20, t % (W - 4): t % (W - 4) + 4] = 255
    return image


def plain_decode(path) -> list[np.ndarray]:
    """Every frame in decode order: the reference that random access must reproduce."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """50 frames of H.264 with B-frames and a keyframe every 10 frames."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width, stream.pix_fmt = H, W, "yuv420p"
        stream.options = {"g": "10", "bf": "2", "crf": "18"}
        for t in range(50):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(t), format="rgb24")))
        container.mux(stream.encode())
    return path


class CountingContainer:
    """Wraps a PyAV container and counts the frames it decodes."""

    def __init__(self, container):
        self.container, self.decoded = container, 0

    def decode(self, *args, **kwargs):
        for f in self.container.decode(*args, **kwargs):
            self.decoded += 1
            yield f

    def __getattr__(self, name):
        return getattr(self.container, name)


def test_uniform_indices_take_segment_centres():
    assert uniform_indices(50, 16) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 47]
    twenty = uniform_indices(1000, 20)
    assert len(twenty) == 20 and twenty[0] == 25 and twenty[-1] == 974 and len(set(np.diff(twenty))) <= 2
    assert uniform_indices(8, 16) == list(range(8)), "a short video keeps every frame, none twice"
    with pytest.raises(InputError, match="at least one"):
        uniform_indices(10, 0)


def test_random_access_equals_a_plain_decode_in_any_order(clip):
    reference = plain_decode(clip)
    with open_video(clip) as video:
        assert (video.num_frames, video.fps, video.height, video.width) == (50, FPS, H, W)
        order = [49, 3, 27, 26, 0, 10, 9, 33, 33, 48]
        for t, got in zip(order, video.read(order)):
            np.testing.assert_array_equal(got, reference[t], err_msg=f"frame {t}")
        backwards = [video[t] for t in range(49, -1, -1)]  # SAM 2's reverse pass reads like this
        np.testing.assert_array_equal(np.stack(backwards[::-1]), np.stack(reference))
        assert video.timestamps([0, 1, 49]) == pytest.approx([0.0, 0.1, 4.9])


def test_reads_seek_to_the_keyframe_and_continue_sequentially(clip):
    with open_video(clip) as video:
        counting = video._container = CountingContainer(video._container)
        video.read([45])
        assert counting.decoded <= 8, f"frame 45 needs the 40..45 GOP, decoded {counting.decoded}"
        before = counting.decoded
        video.read([46, 47])
        assert counting.decoded - before == 2, "the next frames continue the running decoder"


def test_sample_returns_frames_indices_and_timestamps(clip):
    reference = plain_decode(clip)
    sampled = sample_video(clip, 16)
    assert isinstance(sampled, SampledVideo) and isinstance(sampled, Video)
    assert sampled.indices == uniform_indices(50, 16) and len(sampled.frames) == 16
    assert sampled.times() == pytest.approx([t / FPS for t in sampled.indices])
    for t, got in zip(sampled.indices, sampled.frames):
        np.testing.assert_array_equal(got, reference[t])
    picked = open_video(clip).sample(indices=[7, 3])
    assert picked.indices == [7, 3] and picked.times() == pytest.approx([0.7, 0.3])


def test_decord_reads_the_same_frames_and_times(clip):
    pytest.importorskip("decord")
    with open_video(clip, backend="pyav") as pyav, open_video(clip, backend="decord") as decord:
        assert (decord.num_frames, decord.fps, decord.height, decord.width) == (50, FPS, H, W)
        indices = [0, 17, 49, 5]
        for a, b in zip(pyav.read(indices), decord.read(indices)):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert decord.timestamps(indices) == pytest.approx(pyav.timestamps(indices), abs=1e-5)


def test_write_video_keeps_colours(tmp_path):
    frames = [frame(t) for t in range(6)]
    path = write_video(tmp_path / "w.mp4", frames, fps=2)
    with open_video(path) as video:
        assert video.num_frames == 6 and video.timestamps([5]) == pytest.approx([2.5])
        assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(video.read(range(6)), frames)) <= 2


def test_frame_folder_list_and_memory_readers(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in (2, 0, 1):  # written out of order: names decide
        Image.fromarray(frame(t)).save(folder / f"{t:05d}.png")
    (folder / "notes.txt").write_text("not a frame")
    with open_video(folder, fps=4) as video:
        assert video.num_frames == 3 and video.timestamps([2]) == [0.5]
        np.testing.assert_array_equal(video[1], frame(1))
    listed = open_video([folder / "00002.png", folder / "00000.png"], timestamps=[1.0, 3.0])
    np.testing.assert_array_equal(listed[0], frame(2))
    assert listed.timestamps([0, 1]) == [1.0, 3.0] and listed.fps == 0.5
    memory = open_video(Video([frame(0), Image.fromarray(frame(1))], timestamps=[0.0, 0.25]))
    np.testing.assert_array_equal(memory[1], frame(1))
    assert memory.fps == 4 and memory.sample(16).indices == [0, 1]


@pytest.mark.parametrize("index", [50, -1, 1000])
def test_out_of_range_index_names_video_and_index(clip, index):
    with open_video(clip, where="ann.json:3") as video, pytest.raises(
            InputError, match=rf"ann.json:3: frame index {index} is out of range \(video .*clip.mp4 has 50 frames\)"):
        video.read([0, index])


def test_non_integer_index_is_rejected(clip):
    with open_video(clip) as video, pytest.raises(InputError, match=r"frame index 1.5 of video .*clip.mp4 is not an"):
        video.sample(indices=[0, 1.5])


def test_bad_videos_raise_input_errors_naming_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.mp4 does not exist"):
        open_video(tmp_path / "missing.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video")
    with pytest.raises(InputError, match="cannot open video .*text.mp4"):
        open_video(tmp_path / "text.mp4")
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as container:  # a container without a single frame keeps no stream either
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height = W, H
        container.start_encoding()
    with pytest.raises(InputError, match="empty.mp4 has no video stream"):
        open_video(empty)
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="none holds no image files"):
        open_video(tmp_path / "none")
    with pytest.raises(InputError, match="video frames in memory has no frames"):
        open_video([])


def test_bad_frames_name_the_frame(tmp_path):
    Image.fromarray(frame(0)).save(tmp_path / "0.png")
    Image.fromarray(frame(1)[:20]).save(tmp_path / "1.png")
    (tmp_path / "2.png").write_bytes(b"broken")
    video = open_video(tmp_path)
    with pytest.raises(InputError, match="frame 1 of .* is 20x64, frame 0 is 48x64"):
        video.read([1])
    with pytest.raises(InputError, match=r"cannot read frame 2 \(.*2.png\)"):
        video.read([2])
    with pytest.raises(InputError, match="2 timestamps for 3 frames"):
        open_video(tmp_path, timestamps=[0.0, 1.0])


def test_select_maps_source_frames_to_positions_and_drops_the_rest():
    sampled = SampledVideo([frame(t) for t in (0, 4, 8)], timestamps=[0, 0.4, 0.8], indices=[0, 4, 8], source="v")
    on, off = np.ones((H, W), bool), np.zeros((H, W), bool)
    selected = sampled.select([{0: on, 3: on, 8: on}, {"4": on, 8: off}])
    assert [sorted(m) for m in selected] == [[0, 2], [1]]
    with pytest.raises(InputError, match=r"video v, object 1: no mask on any of the sampled frames \[0, 4, 8\]"):
        sampled.select([{0: on}, {5: on, 8: off}])


def test_annotated_video_file_decodes_only_the_named_frames(clip, tmp_path):
    mask = np.zeros((H, W), bool)
    mask[10:20, 10:30] = True
    turns = [{"from": "human", "value": "<region>?"}, {"from": "gpt", "value": "a"}]
    record = {"video": str(clip), "conversations": turns, "masks": [{"40": mask_to_rle(mask), "12": mask_to_rle(mask)}]}
    (tmp_path / "v.json").write_text(json.dumps([record]))
    inputs = load_annotations(tmp_path / "v.json")[0].load_media()
    reference = plain_decode(clip)
    assert inputs.video.times() == pytest.approx([1.2, 4.0])
    np.testing.assert_array_equal(np.asarray(inputs.video.frames[1]), reference[40])
