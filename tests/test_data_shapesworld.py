"""ShapesWorld: byte-reproducible, clean under the validator, every task present, covered by its vocabulary,
and trainable end to end by both frameworks on images and videos."""

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from pixelrefer import PixelReferConfig, PixelReferForConditionalGeneration, PixelReferProcessor
from pixelrefer.data import check_annotations, generate_shapesworld, load_annotations, shapesworld_vocabulary
from pixelrefer.data import tasks
from pixelrefer.data.formats import BENCH_Q_INSTRUCTION
from pixelrefer.data.shapesworld import split_counts
from pixelrefer.tokenizer import build_tokenizer
from tests.conftest import tiny_overrides

SMALL = dict(num_images=12, num_videos=6)
IMAGE_TASKS = {"category", "short_caption", "detailed_caption", "relation", "comparison", "counting", "part"}
BENCH_Q_TYPES = {"Basic", "Sequential", "Relationship", "Reasoning", "Future"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld")
    return out, generate_shapesworld(out, seed=0, **SMALL)


@pytest.fixture(scope="module")
def samples(world):
    _, paths = world
    return [sample for path in paths.values() for sample in load_annotations(path)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(shapesworld_vocabulary())


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    out, _ = world
    generate_shapesworld(tmp_path / "again", seed=0, **SMALL)
    generate_shapesworld(tmp_path / "other", seed=1, **SMALL)
    first, again, other = files(out), files(tmp_path / "again"), files(tmp_path / "other")
    assert len(first) > 12 + 6 * 8 and first.keys() == again.keys()
    assert [name for name in first if first[name] != again[name]] == []
    assert first["train.json"] != other["train.json"] and first["images/img_00000.png"] != other["images/img_00000.png"]
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_every_split_loads_and_passes_the_validator(world):
    _, paths = world
    assert sorted(paths) == ["test", "train", "val"]
    for path in paths.values():
        report = check_annotations(path)
        assert report.ok, str(report)
        assert report.num_records == len(load_annotations(path)) > 0


def test_every_task_type_is_present(samples):
    tasks = Counter(s.task for s in samples)
    assert IMAGE_TASKS | {"video_caption", "multiple_choice"} == set(tasks)
    assert {s.meta["type"] for s in samples if s.task == "multiple_choice"} == BENCH_Q_TYPES
    for sample in samples:
        if sample.task == "multiple_choice":
            assert sample.meta["Answer"] in sample.meta["options"]
            letters = [option[:3] for option in sample.meta["options"]]
            assert letters == ["(A)", "(B)", "(C)", "(D)"][: len(letters)]


@pytest.fixture(scope="module")
def with_choice(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld-choice")
    return generate_shapesworld(out, seed=0, image_choice=True, **SMALL)


def test_image_choice_questions_name_the_right_option_for_their_object(with_choice):
    """Image multiple choice: Bench-Q's layout (question, four lettered options, the instruction), answered by
    the option holding the asked object's colour or category; objects numbered by turn."""
    samples = [s for path in with_choice.values() for s in load_annotations(path)]
    records = [s for s in samples if s.task == "image_choice"]
    assert len(records) == SMALL["num_images"] and all(1 <= len(s.masks) <= 3 for s in records)
    asked = Counter()
    for sample in records:
        turns = sample.conversation
        assert [t["role"] for t in turns] == ["user", "assistant"] * len(sample.masks)
        for k, (question, answer) in enumerate(zip(turns[::2], turns[1::2])):
            lines = question["content"].removeprefix("<image>\n").split("\n")
            assert lines[0] in (tasks.CHOICE_COLOUR_Q.format(k=k), tasks.CHOICE_SHAPE_Q.format(k=k))
            assert [line[:3] for line in lines[1:5]] == ["(A)", "(B)", "(C)", "(D)"] and lines[5:] == [
                BENCH_Q_INSTRUCTION]
            assert answer["content"] in lines[1:5]
            attribute = "colour" if "colour" in lines[0] else "category"
            asked[attribute] += 1
            truth = sample.meta["objects"][k][attribute]
            assert answer["content"][4:] == truth
            assert [line[4:] for line in lines[1:5]].count(truth) == 1, "exactly one option is right"
    assert asked["colour"] > 0 and asked["category"] > 0


def test_image_choice_is_opt_in_and_leaves_every_other_record_unchanged(world, with_choice):
    """Drawn last, the image multiple choice must not change any other record of the same seed (so splits and
    numbers measured without it stay comparable)."""
    _, paths = world
    for name, path in paths.items():
        plain = json.loads(path.read_text())
        assert "image_choice" not in {r["task"] for r in plain}
        kept = [r for r in json.loads(with_choice[name].read_text()) if r["task"] != "image_choice"]
        assert kept == plain, name


@pytest.fixture(scope="module")
def with_location(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld-location")
    return out, generate_shapesworld(out, seed=0, location=True, last_location=True, **SMALL)


def _cell(x: float, y: float, height: int, width: int) -> str:
    """The expected phrase, written out independently of `tasks.position_phrase`."""
    row = ("top", "middle", "bottom")[min(2, int(3 * y / height))]
    column = ("left", "center", "right")[min(2, int(3 * x / width))]
    if row == "middle" and column == "center":
        return "in the center"
    if row == "middle":
        return f"on the {column}"
    if column == "center":
        return f"at the {row}"
    return f"in the {row} {column} corner"


def test_location_questions_name_the_cell_of_each_object(with_location, tokenizer):
    """Images: up to three objects, each answered by the 3×3 cell of its mask's centroid; videos: every track,
    answered by the cell of its centre on the first (`video_location`) and on the last (`video_last_location`)
    frame its mask is on. Covered by the vocabulary."""
    out, paths = with_location
    info = json.loads((out / "info.json").read_text())
    assert info["location"] is True and info["last_location"] is True
    samples = [s for path in paths.values() for s in load_annotations(path)]
    images = [s for s in samples if s.task == "location"]
    videos = [s for s in samples if s.task == "video_location"]
    last = [s for s in samples if s.task == "video_last_location"]
    assert len(images) == SMALL["num_images"] and len(videos) == len(last) == SMALL["num_videos"]
    answers, moved = Counter(), 0
    for sample in images + videos + last:
        media = sample.load_media()
        turns = sample.conversation
        assert len(turns) == 2 * len(sample.masks) and len(media.masks) == len(sample.masks)
        for k, (question, answer) in enumerate(zip(turns[::2], turns[1::2])):
            if sample.task == "location":
                assert question["content"].removeprefix("<image>\n") == tasks.LOCATION_Q
                mask = media.masks[k]
            elif sample.task == "video_location":
                assert question["content"].removeprefix("<video>\n") == tasks.VIDEO_LOCATION_Q.format(k=k)
                mask = media.masks[k][min(media.masks[k])]
            else:
                assert question["content"].removeprefix("<video>\n") == tasks.VIDEO_LAST_LOCATION_Q.format(k=k)
                mask = media.masks[k][max(media.masks[k])]
                first = media.masks[k][min(media.masks[k])].nonzero()
                moved += answer["content"] != _cell(first[1].mean(), first[0].mean(), *mask.shape)
            ys, xs = mask.nonzero()
            assert answer["content"] == _cell(xs.mean(), ys.mean(), *mask.shape), (sample.id, k)
            answers[answer["content"]] += 1
            text = question["content"].replace("<region>", " ").replace("<image>", " ").replace("<video>", " ")
            ids = tokenizer(text + " " + answer["content"], add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, (sample.id, text)
    assert len(answers) >= 5 and moved > 0, (answers, moved)


def test_location_is_opt_in_and_leaves_every_other_record_unchanged(world, with_location):
    _, plain_paths = world
    _, paths = with_location
    for name, path in plain_paths.items():
        plain = json.loads(path.read_text())
        located = {"location", "video_location", "video_last_location"}
        assert not located & {r["task"] for r in plain}
        kept = [r for r in json.loads(paths[name].read_text()) if r["task"] not in located]
        assert kept == plain, name
    for path in paths.values():
        report = check_annotations(path)
        assert report.ok, str(report)


@pytest.fixture(scope="module")
def with_short_answers(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld-short")
    return out, generate_shapesworld(out, seed=0, short_answers=True, num_images=2, num_videos=12)


def test_short_answers_ask_the_video_questions_again_answered_by_the_word_only_the_right_option_has(
        with_short_answers, tokenizer):
    """One `video_short_answer` record per Relationship, Reasoning and Future question of a video: the same
    question and masks, no options, the one-word suffix; the answer is a word of the right option that no other
    option of that question has (Basic and Sequential get none)."""
    out, paths = with_short_answers
    assert json.loads((out / "info.json").read_text())["short_answers"] is True
    records = [r for path in paths.values() for r in json.loads(path.read_text())]
    choices = {r["id"].replace("-mc-", "-video_short_answer-"): r for r in records if r["task"] == "multiple_choice"}
    short = [r for r in records if r["task"] == "video_short_answer"]
    expected = [key for key, r in choices.items() if r["type"] in ("Relationship", "Reasoning", "Future")]
    assert sorted(r["id"] for r in short) == sorted(expected) and len(short) >= 12
    words = Counter()
    for record in short:
        choice = choices[record["id"]]
        question, answer = (turn["value"] for turn in record["conversations"])
        assert question == f"<video>\n{choice['Question']} Using only one word or phrase.", record["id"]
        assert record["masks"] == [{t: m["segmentation"] for t, m in masks.items()} for masks in choice["annotation"]]
        assert record["video"] == choice["video"] and record["objects"] == choice["objects"]
        option_words = {option: set(option.split(") ", 1)[1].split()) for option in choice["options"]}
        assert answer in option_words[choice["Answer"]], (record["id"], answer, choice["Answer"])
        assert all(answer not in w for option, w in option_words.items() if option != choice["Answer"]), record["id"]
        ids = tokenizer(question.replace("<region>", " ").replace("<video>", " ") + " " + answer,
                        add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, record["id"]
        words[answer] += 1
    assert len(words) >= 5, words
    for path in paths.values():
        report = check_annotations(path)
        assert report.ok, str(report)
    sample = next(s for s in load_annotations(paths["train"]) if s.task == "video_short_answer")
    assert len(sample.load_media().masks) == len(sample.masks)


def test_short_answers_are_opt_in_and_leave_every_other_record_unchanged(with_short_answers, tmp_path):
    _, paths = with_short_answers
    plain = generate_shapesworld(tmp_path, seed=0, num_images=2, num_videos=12)
    for name, path in plain.items():
        records = json.loads(path.read_text())
        assert "video_short_answer" not in {r["task"] for r in records}
        kept = [r for r in json.loads(paths[name].read_text()) if r["task"] != "video_short_answer"]
        assert kept == records, name


def test_option_first_names_the_option_then_its_letter_and_changes_nothing_else(tmp_path):
    """`option_first=True`: every lettered answer (video multiple choice, the images' lettered questions) is
    "<option text> (X)" for the option "(X) <option text>" the letter-first answer names; questions, options,
    masks, the one-word answers and every other record are those of the same seed without it."""
    from pixelrefer.evaluation.choice import predicted_letter, reference_letter

    kwargs = dict(seed=0, num_images=4, num_videos=10, image_choice=True, short_answers=True)
    plain = generate_shapesworld(tmp_path / "plain", **kwargs)
    first = generate_shapesworld(tmp_path / "first", option_first=True, **kwargs)
    assert json.loads((tmp_path / "first" / "info.json").read_text())["option_first"] is True
    changed = Counter()
    for name, path in plain.items():
        before, after = json.loads(path.read_text()), json.loads(first[name].read_text())
        assert [r["id"] for r in after] == [r["id"] for r in before], name
        for old, new in zip(before, after):
            if old["task"] == "multiple_choice":
                letter, text = old["Answer"].split(" ", 1)
                assert new["Answer"] == f"{text} {letter}" and new["Answer"] != old["Answer"], new["id"]
                assert f"{letter} {text}" in new["options"], new["id"]
                assert reference_letter(new["Answer"]) == predicted_letter(new["Answer"]) == letter[1], new["id"]
                assert dict(new, Answer=old["Answer"]) == old, new["id"]
                changed[old["type"]] += 1
            elif old["task"] == "image_choice":
                for turn_old, turn_new in zip(old["conversations"], new["conversations"], strict=True):
                    if turn_old["from"] == "gpt":
                        letter, text = turn_old["value"].split(" ", 1)
                        assert turn_new["value"] == f"{text} {letter}", new["id"]
                        assert f"\n{letter} {text}\n" in previous, new["id"]
                        changed["image_choice"] += 1
                    else:
                        assert turn_new == turn_old, new["id"]
                    previous = turn_old["value"]
                assert dict(new, conversations=old["conversations"]) == old, new["id"]
            else:
                assert new == old, new["id"]
        assert check_annotations(first[name]).ok, name
    assert set(changed) == BENCH_Q_TYPES | {"image_choice"}, changed


def test_tiny_objects_and_parts_are_present(samples):
    areas = [int(mask.sum()) for s in samples if s.task == "category" for mask in s.load_media().masks]
    assert min(areas) < 196, "no object smaller than one 14-px patch"
    parts = [s for s in samples if s.task == "part" and len(s.masks) == 2]
    assert parts, "no part-naming record"
    whole, part = parts[0].load_media().masks
    assert part.sum() < whole.sum() and not (part & ~whole).any(), "a part mask lies inside its object's mask"


def test_image_masks_of_one_scene_never_overlap(samples):
    sample = next(s for s in samples if s.task == "category" and len(s.masks) > 1)
    masks = sample.load_media().masks
    assert sum(m.astype(int) for m in masks).max() == 1


def test_vocabulary_covers_every_generated_text(samples, tokenizer):
    unk = tokenizer.unk_token_id
    for sample in samples:
        for turn in sample.conversation:
            text = turn["content"].replace("<region>", " ").replace("<image>", " ").replace("<video>", " ")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids, (sample.id, text, tokenizer.convert_ids_to_tokens(ids))


def processor_and_model(tokenizer, framework):
    overrides = tiny_overrides()
    text = {**overrides.pop("text_config"), "vocab_size": max(1024, len(tokenizer))}
    config = PixelReferConfig.from_preset("tiny", framework=framework, text_config=text, **overrides)
    torch.manual_seed(0)
    return PixelReferProcessor(tokenizer, config), PixelReferForConditionalGeneration(config)


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_records_train_end_to_end_with_finite_loss(samples, tokenizer, framework):
    processor, model = processor_and_model(tokenizer, framework)
    picked = [next(s for s in samples if s.task == task) for task in ("category", "part", "video_caption")]
    picked += [next(s for s in samples if s.meta.get("type") == "Future")]
    for sample in picked:
        text, image, video, masks = sample.load_media()
        inputs = processor(text=text, images=image, videos=video, masks=masks)
        assert (inputs["input_ids"] != tokenizer.unk_token_id).all(), sample.id
        loss = model(**inputs).loss
        assert torch.isfinite(loss), sample.id
        loss.backward()


def test_split_counts_use_largest_remainder_and_feed_every_split():
    assert split_counts(100, (0.8, 0.1, 0.1)) == [80, 10, 10]
    assert split_counts(5, (0.8, 0.1, 0.1)) == [3, 1, 1]
    assert split_counts(7, (0.5, 0.5, 0.0)) in ([4, 3, 0], [3, 4, 0])
    assert split_counts(0, (0.8, 0.1, 0.1)) == [0, 0, 0]
    with pytest.raises(ValueError, match="summing to 1"):
        generate_shapesworld("unused", splits=(0.5, 0.2, 0.2))


def test_default_sizes_generate_quickly(tmp_path):
    start = time.perf_counter()
    paths = generate_shapesworld(tmp_path, seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"100 images + 20 videos took {elapsed:.1f} s"
    assert sum(len(load_annotations(p)) for p in paths.values()) > 100 * 6
    assert len(list((tmp_path / "videos").iterdir())) == 20


def test_the_built_in_tokenizer_covers_shapesworld():
    from pixelrefer.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    unknown = [w for w in shapesworld_vocabulary() if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id]
    assert not unknown


def _centroid_speed(track: dict) -> int:
    """Pixels a frame an object moves, from its masks alone: the largest centroid shift from the first frame it is
    on to the last, over the frames between."""
    from pixelrefer.regions import decode_mask

    frames = sorted(track, key=int)
    centres = []
    for t in (frames[0], frames[-1]):
        ys, xs = decode_mask(track[t]["segmentation"], 128, 128).nonzero()
        centres.append((xs.mean(), ys.mean()))
    (x0, y0), (x1, y1) = centres
    return round(max(abs(x1 - x0), abs(y1 - y0)) / max(int(frames[-1]) - int(frames[0]), 1))


def test_speed_steps_state_both_speeds_before_the_option_first_answer(tmp_path):
    """`speed_steps=True` (with `option_first`): a Reasoning answer is "<object0> moves at speed 3 and <object1>
    does not move: <option text> (X)", the speeds those of the objects' masks in pixels a frame; the letter read
    by the parsers is unchanged, and every other record is the option-first one. Without option_first it is
    refused, naming why."""
    from pixelrefer.evaluation.choice import predicted_letter, reference_letter

    kwargs = dict(seed=3, num_images=2, num_videos=16, option_first=True, short_answers=True)
    plain = generate_shapesworld(tmp_path / "plain", **kwargs)
    steps = generate_shapesworld(tmp_path / "steps", speed_steps=True, **kwargs)
    assert json.loads((tmp_path / "steps" / "info.json").read_text())["speed_steps"] is True
    tokenizer = build_tokenizer(shapesworld_vocabulary())
    speeds = Counter()
    for name, path in plain.items():
        before, after = json.loads(path.read_text()), json.loads(steps[name].read_text())
        assert [r["id"] for r in after] == [r["id"] for r in before], name
        for old, new in zip(before, after):
            if old.get("type") != "Reasoning":
                assert new == old, new["id"]
                continue
            a, b = (_centroid_speed(track) for track in new["annotation"])
            speeds.update([a, b])
            said = [f"<object{k}> " + (f"moves at speed {s}" if s else "does not move") for k, s in enumerate((a, b))]
            assert new["Answer"] == f"{said[0]} and {said[1]}: {old['Answer']}", new["id"]
            assert predicted_letter(new["Answer"]) == reference_letter(new["Answer"]) == old["Answer"][-2], new["id"]
            assert dict(new, Answer=old["Answer"]) == old, new["id"]
            ids = tokenizer(new["Answer"], add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)
            assert tasks.stated_speeds(new["Answer"]) == {0: a, 1: b}, new["id"]
        assert check_annotations(steps[name]).ok, name
    assert {0, 2, 3, 4} <= set(speeds), speeds
    with pytest.raises(ValueError, match="speed_steps needs option_first"):
        generate_shapesworld(tmp_path / "refused", seed=3, num_images=1, num_videos=1, speed_steps=True)


def test_answer_words_write_the_one_word_answer_before_the_letter(tmp_path):
    """`answer_words=True` (with `option_first`): a video multiple-choice answer whose option has a one-word answer
    is that word, then the letter ("above (C)"); the word is in the right option and in no other; Basic and
    Sequential answers, the questions and every other record are the option-first ones; with `speed_steps` the
    steps come before the word. Without option_first it is refused."""
    from pixelrefer.evaluation.choice import predicted_letter

    kwargs = dict(seed=4, num_images=2, num_videos=16, option_first=True, short_answers=True)
    plain = generate_shapesworld(tmp_path / "plain", **kwargs)
    words = generate_shapesworld(tmp_path / "words", answer_words=True, **kwargs)
    both = generate_shapesworld(tmp_path / "both", answer_words=True, speed_steps=True, **kwargs)
    assert json.loads((tmp_path / "words" / "info.json").read_text())["answer_words"] is True
    changed = Counter()
    for name, path in plain.items():
        before, after = json.loads(path.read_text()), json.loads(words[name].read_text())
        worked = json.loads(both[name].read_text())
        for old, new, steps in zip(before, after, worked, strict=True):
            if old.get("type") not in ("Relationship", "Reasoning", "Future"):
                assert new == old == steps, new["id"]
                continue
            text, letter = old["Answer"].rsplit(" ", 1)
            word, new_letter = new["Answer"].split(" ")
            assert new_letter == letter and predicted_letter(new["Answer"]) == letter[1], new["id"]
            holding = [o for o in old["options"] if word in o.split(" ")[1:]]
            assert holding == [f"{letter} {text}"], (new["id"], word, old["options"])
            assert dict(new, Answer=old["Answer"]) == old, new["id"]
            assert steps["Answer"].endswith(f": {new['Answer']}" if old["type"] == "Reasoning" else new["Answer"])
            changed[old["type"]] += text != word
        assert check_annotations(words[name]).ok, name
    assert changed["Relationship"] and changed["Future"] and changed["Reasoning"], changed
    with pytest.raises(ValueError, match="answer_words needs option_first"):
        generate_shapesworld(tmp_path / "refused", seed=3, num_images=1, num_videos=1, answer_words=True)
