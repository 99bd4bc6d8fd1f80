"""Linear probes of the vision encoder (`pixelrefer.analysis.probe`)."""

import pytest
import torch

from pixelrefer.analysis.probe import linear_probe, object_features
from tests.conftest import build


def _labels(classes, sizes=("small", "large")):
    return [{"category": f"c{c}", "size": sizes[i % len(sizes)]} for i, c in enumerate(classes)]


def test_linear_probe_reads_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(4, (400,), generator=g)
    centres = torch.randn(4, 16, generator=g) * 4
    features = centres[classes] + torch.randn(400, 16, generator=g)
    train, test = (features[:300], _labels(classes[:300].tolist())), (features[300:], _labels(classes[300:].tolist()))
    result = linear_probe(train, test, "category")
    assert result.accuracy > 0.95 and result.objects == 100 and result.classes == 4
    assert set(result.per_size) == {"small", "large"}

    noise = torch.randn(400, 16, generator=g)
    chance = linear_probe((noise[:300], train[1]), (noise[300:], test[1]), "category")
    assert chance.accuracy < 0.45, "random features carry no category"


def test_a_test_value_unseen_in_training_counts_as_wrong():
    features = torch.eye(3).repeat(10, 1)
    labels = _labels([0, 1, 2] * 10)
    result = linear_probe((features, labels), (torch.eye(3), _labels([0, 1, 7])), "category")
    assert result.accuracy == pytest.approx(2 / 3)


def test_object_features_give_one_row_per_labelled_object(tmp_path):
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path, seed=3, num_images=5, num_videos=0, splits=(1.0, 0.0, 0.0))
    records = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "category"]
    model, processor = build("vision_object")
    features, labels = object_features(model, processor, records, batch_size=2)
    assert features.shape == (sum(len(r.masks) for r in records), model.config.vision_config.hidden_size)
    assert [o["category"] for o in labels] == [o["category"] for r in records for o in r.meta["objects"]]
    assert torch.isfinite(features).all()
    with pytest.raises(ValueError, match="objects carry categories"):
        object_features(model, processor, [])


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_object_token_features_are_each_objects_mean_token_in_order(tmp_path, framework):
    """Stage "tokens": one row per object, the mean of its valid object tokens (what the LLM reads), the same
    in a batch as record by record."""
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path, seed=3, num_images=4, num_videos=0, splits=(1.0, 0.0, 0.0))
    records = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "category"]
    model, processor = build(framework)
    batched, labels = object_features(model, processor, records, batch_size=4, stage="tokens")
    assert batched.shape == (sum(len(r.masks) for r in records), model.config.text_config.hidden_size)
    assert len(labels) == batched.shape[0]
    _, image, _, masks = records[0].load_media()
    encoded = processor(text=[[{"role": "user", "content": "<image>\n" + "<region>" * len(masks)}]],
                        images=[image], masks=[masks])
    with torch.no_grad():
        out = model.get_object_features(**{k: v for k, v in encoded.items() if k.startswith("region_")})
    expected = torch.stack([t[v].mean(0) for t, v in zip(out.tokens, out.valid)])
    torch.testing.assert_close(batched[: len(masks)], expected, rtol=1e-4, atol=1e-5)
    one_by_one = torch.cat([object_features(model, processor, [r], stage="tokens")[0] for r in records])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="stage must be one of"):
        object_features(model, processor, records, stage="llm")


def test_variance_share_is_the_part_of_the_variance_the_class_means_explain():
    from pixelrefer.analysis.probe import variance_share

    labels = _labels([0, 0, 1, 1])
    features = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert variance_share(features, labels, "category") == pytest.approx(1.0)
    noisy = features + torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, -1.0], [0.0, 1.0]])
    assert variance_share(noisy, labels, "category") == pytest.approx(0.5)
    assert variance_share(noisy, labels, "size") == pytest.approx(0.0), "each size holds one object of each class and opposite noise"


def test_location_r2_reads_linear_location_and_not_noise():
    from pixelrefer.analysis.probe import location_r2

    g = torch.Generator().manual_seed(0)
    centres = torch.rand(200, 2, generator=g)
    features = centres @ torch.randn(2, 16, generator=g) + 0.01 * torch.randn(200, 16, generator=g)
    assert location_r2((features[:150], centres[:150]), (features[150:], centres[150:])) > 0.95
    noise = torch.randn(200, 16, generator=g)
    assert location_r2((noise[:150], centres[:150]), (noise[150:], centres[150:])) < 0.1
    with pytest.raises(ValueError, match="differ in count"):
        location_r2((features[:150], centres[:149]), (features[150:], centres[150:]))


def test_object_centres_are_mask_centroids_in_object_features_order(tmp_path):
    from pixelrefer.analysis.probe import object_centres
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path, seed=3, num_images=4, num_videos=0, splits=(1.0, 0.0, 0.0))
    records = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "category"]
    centres = object_centres(records)
    assert centres.shape == (sum(len(r.masks) for r in records), 2)
    assert ((centres > 0) & (centres < 1)).all()
    _, image, _, masks = records[0].load_media()
    rows, cols = torch.as_tensor(masks[1]).squeeze().nonzero(as_tuple=True)
    expected = [(cols.double().mean() + 0.5) / image.width, (rows.double().mean() + 0.5) / image.height]
    torch.testing.assert_close(centres[1], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_object_tokens_locate_objects_only_with_a_scaled_position_encoding(tmp_path, framework):
    """At HF's 0.02 the position term (Eq. 5) is lost next to the cell features and the tokens of a random
    model carry no location (R² about -1 on 30 / 10 scenes); at position_init_std=3 they locate (R² 0.99)."""
    from pixelrefer.analysis.probe import location_r2, object_centres
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path, seed=3, num_images=40, num_videos=0, splits=(1.0, 0.0, 0.0))
    records = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "category"]
    train, test = records[:30], records[30:]
    scores = {}
    for std in (None, 3.0):
        model, processor = build(framework, **({"position_init_std": std} if std else {}))
        fit, held = (object_features(model, processor, part, stage="tokens")[0] for part in (train, test))
        scores[std] = location_r2((fit, object_centres(train)), (held, object_centres(test)))
    assert scores[None] < 0.3 and scores[3.0] > 0.8, scores


def test_trajectory_motion_names_the_axis_travelled_most_or_still():
    from pixelrefer.analysis.probe import trajectory_motion

    frames = torch.arange(8)
    size = (128, 256)  # (height, width): x fractions are of 256 pixels

    def path(dx, dy):  # pixels a frame
        return torch.stack([0.5 + dx * frames / 256, 0.5 + dy * frames / 128], 1).double()

    assert trajectory_motion(frames, path(-2, 0.5), size) == "left"
    assert trajectory_motion(frames, path(3, -1), size) == "right"
    assert trajectory_motion(frames, path(0.2, -2), size) == "up"
    assert trajectory_motion(frames[3:], path(0, 4)[3:], size) == "down", "a track that appears late"
    assert trajectory_motion(frames, path(0.5, -0.5), size) == "still", "under one pixel a frame"
    assert trajectory_motion(frames[:1], path(4, 0)[:1], size) == "still", "one frame shows no motion"


def _tracks(features, centres, motions, frames=8):
    from pixelrefer.analysis.probe import TrackFeatures

    count = len(motions)
    return TrackFeatures(features, centres, torch.arange(count).repeat_interleave(frames),
                         torch.arange(frames).repeat(count), motions, (128, 128))


def test_motion_readout_reads_motion_from_located_features_and_not_from_noise():
    from pixelrefer.analysis.probe import motion_readout

    g = torch.Generator().manual_seed(0)
    steps = {"left": (-3, 0), "right": (3, 0), "up": (0, -3), "down": (0, 3), "still": (0, 0)}
    motions = [list(steps)[i % 5] for i in range(100)]
    start = torch.rand(100, 1, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
    velocity = torch.tensor([steps[m] for m in motions], dtype=torch.float64)[:, None] / 128
    centres = (start + velocity * torch.arange(8, dtype=torch.float64)[None, :, None]).reshape(-1, 2)
    located = (centres @ torch.randn(2, 16, generator=g, dtype=torch.float64)).float()
    located += 0.001 * torch.randn(located.shape, generator=g)
    train, test = _tracks(located[:560], centres[:560], motions[:70]), _tracks(located[560:], centres[560:], motions[70:])
    result = motion_readout(train, test)
    assert result["tokens"] > 0.95 and result["centres"] == 1.0 and result["location_r2"] > 0.99
    assert result["tracks"] == 30 and result["majority"] == pytest.approx(6 / 30)

    noise = torch.randn(800, 16, generator=g)
    blind = motion_readout(_tracks(noise[:560], centres[:560], motions[:70]),
                           _tracks(noise[560:], centres[560:], motions[70:]))
    assert blind["tokens"] < 0.5 and blind["centres"] == 1.0 and blind["location_r2"] < 0.1


def test_track_features_give_one_unit_per_frame_an_object_is_seen(tmp_path):
    """On ShapesWorld videos: every (object, frame) with a non-empty mask, in track order, and the true
    centroids name every track's motion; a random model at position_init_std=3 already locates its units."""
    from pixelrefer.analysis.probe import motion_readout, track_features
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path, seed=3, num_images=1, num_videos=6, splits=(1.0, 0.0, 0.0))
    records = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "video_caption"]
    model, processor = build("object_only", position_init_std=3.0)
    tracks = track_features(model, processor, records)
    labelled = [o["motion"] for r in records for o in r.meta["objects"]]
    assert tracks.motions == labelled
    seen = [sum(bool(torch.as_tensor(m).any()) for m in spec.values()) for r in records for spec in r.load_media()[3]]
    assert torch.bincount(tracks.track).tolist() == seen
    assert tracks.features.shape == (sum(seen), model.config.text_config.hidden_size) and tracks.frame_size == (128, 128)
    result = motion_readout(tracks, tracks)
    assert result["centres"] == 1.0 and result["location_r2"] > 0.5
    with pytest.raises(ValueError, match="motion label"):
        track_features(model, processor, [s for s in load_annotations(paths["train"], tmp_path) if s.image])
    # the other stages: the same units in the vision width; Lite's "pre_mlp" is after OCI, so not the centroids
    width = model.config.vision_config.hidden_size
    centroids = track_features(model, processor, records, stage="centroids")
    pre_mlp = track_features(model, processor, records, stage="pre_mlp")
    assert centroids.features.shape == pre_mlp.features.shape == (sum(seen), width)
    assert torch.equal(centroids.track, tracks.track) and not torch.allclose(centroids.features, pre_mlp.features)
    plain, plain_processor = build("vision_object", position_init_std=3.0)
    assert torch.equal(track_features(plain, plain_processor, records[:1], stage="pre_mlp").features,
                       track_features(plain, plain_processor, records[:1], stage="centroids").features)
    with pytest.raises(ValueError, match="stage must be one of"):
        track_features(model, processor, records, stage="mlp")


def test_location_share_is_the_part_of_the_raw_variance_location_explains():
    from pixelrefer.analysis.probe import location_share

    g = torch.Generator().manual_seed(0)
    centres = torch.rand(400, 2, generator=g, dtype=torch.float64)
    located = centres @ torch.randn(2, 8, generator=g, dtype=torch.float64)
    other = torch.randn(400, 8, generator=g, dtype=torch.float64)
    assert location_share(located, centres) == pytest.approx(1.0)
    assert location_share(other, centres) < 0.05
    quiet = location_share(located + 10 * other, centres)
    assert 0 < quiet < 0.05, "readable but quiet: ten times louder noise beside it"
    # per group: an offset per group is not location within the group
    groups = torch.arange(400) // 8
    shifted = located + 100 * torch.randn(50, 8, generator=g, dtype=torch.float64)[groups]
    assert location_share(shifted, centres) < 0.01 and location_share(shifted, centres, groups) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in count"):
        location_share(located[:10], centres)


@pytest.mark.parametrize("framework", ["object_only", "vision_object"])
def test_llm_track_states_read_the_state_whose_next_word_is_the_motion(tmp_path, framework):
    """One state per layer (and the embeddings) per labelled object without an event, taken at the last word of
    the teacher-forced prefix: the same state a full caption has there (the LLM is causal), at the category word."""
    from pixelrefer.analysis.probe import llm_track_states
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path, seed=3, num_images=1, num_videos=4, splits=(1.0, 0.0, 0.0))
    records = [s for s in load_annotations(paths["train"], tmp_path) if s.task == "video_caption"]
    model, processor = build(framework)
    states, labels = llm_track_states(model, processor, records)
    expected = [o for r in records for o in r.meta["objects"] if not o["event"]]
    assert labels == expected and len(expected) < sum(len(r.meta["objects"]) for r in records)
    assert states.shape == (model.config.text_config.num_hidden_layers + 1, len(expected),
                            model.config.text_config.hidden_size)
    record = next(r for r in records if not r.meta["objects"][0]["event"])
    _, _, video, masks = record.load_media()
    info = record.meta["objects"][0]
    caption = f"the {info['colour']} {info['category']} moves left"
    turns = [{"role": "user", "content": "<video>\nWhat does <region> do?"}, {"role": "assistant", "content": caption}]
    inputs = processor(text=[turns], images=[None], videos=[video], masks=[[masks[0]]])
    ids = inputs["input_ids"][0].tolist()
    at = len(ids) - 1 - ids[::-1].index(processor.tokenizer.convert_tokens_to_ids(info["category"]))
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states
    assert labels.count(info) == 1
    assert torch.allclose(states[:, labels.index(info)], torch.stack([h[0, at] for h in full]), atol=1e-5)
    bare, _ = llm_track_states(model, processor, [record], prefix="")
    prompt = processor(text=[turns[:1]], images=[None], videos=[video], masks=[[masks[0]]])
    with torch.no_grad():
        last = model(**prompt, output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(bare[-1, 0], last, atol=1e-5), "no prefix: the last prompt token"
    with pytest.raises(ValueError, match="motion label"):
        llm_track_states(model, processor, [s for s in load_annotations(paths["train"], tmp_path) if s.image])


def test_layer_probes_find_the_layer_that_carries_the_attribute():
    from pixelrefer.analysis.probe import layer_probes

    g = torch.Generator().manual_seed(0)
    motions = ["left", "right", "up", "down", "still"]
    labels = [{"motion": motions[i % 5]} for i in range(300)]
    states = torch.randn(3, 300, 16, generator=g)
    states[1, :, :5] += 4 * torch.eye(5)[torch.arange(300) % 5]
    accuracy = layer_probes((states[:, :200], labels[:200]), (states[:, 200:], labels[200:]), "motion")
    assert accuracy[1] > 0.95 and max(accuracy[0], accuracy[2]) < 0.45
    with pytest.raises(ValueError, match="layers"):
        layer_probes((states[:2, :200], labels[:200]), (states[:, 200:], labels[200:]), "motion")
