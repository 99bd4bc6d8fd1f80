"""The annotation validator: every planted problem in one pass, with file, index and reason; the CLI's exit codes."""

import argparse
import json
import re

import numpy as np
import pytest

from pixelrefer.data import check_annotations
from pixelrefer.data.check import add_parser
from pixelrefer.regions import mask_to_rle
from tests.test_data_formats import (
    H, W, frame_masks, image_record, square_mask, video_record, write_frames, write_image, write_json,
)

FRAMES = [f"clip/frame_{t:02d}.png" for t in range(3)]


def planted(tmp_path):
    """A file whose records 1.. each hold the planted problem(s) listed beside them; record 0 is clean."""
    write_image(tmp_path / "img.png")
    write_frames(tmp_path / "clip")
    good = mask_to_rle(square_mask())
    two_regions = image_record(good)
    two_regions["conversations"][0]["value"] += " And <region>?"
    bot = image_record(good)
    bot["conversations"][1]["from"] = "bot"
    records = [
        image_record(good),                                                             # 0: clean
        image_record(good, image="missing.png"),                                         # 1
        image_record([[2, 2, 50, 2, 50, 20, 2, 20]]),                                    # 2
        image_record(mask_to_rle(np.ones((10, 10), dtype=bool))),                        # 3
        image_record(mask_to_rle(np.zeros((H, W), dtype=bool))),                         # 4
        two_regions,                                                                     # 5
        video_record(FRAMES, [{**frame_masks(), "7": good}]),                            # 6
        bot,                                                                             # 7
        image_record(good, height=H + 1, width=W),                                       # 8
        {**image_record(good, image="gone.png"), "conversations": two_regions["conversations"]},  # 9: two problems
        video_record(FRAMES, [frame_masks()], timestamps=[0.0, 1.0]),                    # 10
    ]
    return write_json(tmp_path / "bad.json", records)


EXPECTED = {
    1: ["image file", "missing.png", "does not exist"],
    2: ["object 0", "point (x=50, y=2) lies outside the image (height 32, width 40)"],
    3: ["object 0", "RLE size [10, 10] does not match image shape [32, 40]"],
    4: ["object 0", "mask is empty"],
    5: ["2 <region> but the record has 1 masks"],
    6: ["object 0, frame 7", "frame index 7 is out of range (video has 3 frames)"],
    7: ["turn 1", "role 'bot' is not one of human, gpt, system"],
    8: ["the record says 33x40", "media are 32x40"],
    10: ["2 timestamps for 3 frames"],
}


def test_every_planted_problem_is_found_in_one_pass(tmp_path):
    path = planted(tmp_path)
    report = check_annotations(path)
    assert report.num_records == 11 and not report.ok
    by_index = {}
    for problem in report.problems:
        assert problem.file == str(path)
        by_index.setdefault(problem.index, []).append(problem.reason)
    assert sorted(by_index) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    for index, words in EXPECTED.items():
        assert len(by_index[index]) == 1, by_index[index]
        for word in words:
            assert word in by_index[index][0], (index, by_index[index][0])
    reasons = " | ".join(by_index[9])
    assert len(by_index[9]) == 2 and "gone.png" in reasons and "2 <region>" in reasons
    assert report.count == 11 and report.bad_records == 10


def test_report_text_has_one_line_per_problem_and_a_summary(tmp_path):
    report = check_annotations(planted(tmp_path))
    lines = str(report).splitlines()
    assert len(lines) == report.count + 1
    assert lines[0].startswith(f"{report.path}:1: ")
    assert lines[-1].endswith("11 problem(s) in 10 of 11 records")


def test_unreadable_jsonl_lines_are_reported_with_their_line_number(tmp_path):
    write_image(tmp_path / "img.png")
    good = json.dumps(image_record(mask_to_rle(square_mask())))
    path = tmp_path / "a.jsonl"
    path.write_text(f"{good}\n{{not json\n{good}\n[1, 2\n")
    report = check_annotations(path)
    assert [(p.index, p.reason.split(":")[0]) for p in report.problems] == [(1, "line 2"), (3, "line 4")]
    assert report.num_records == 4


@pytest.mark.parametrize("content, reason", [("{oops", "not valid JSON"), ('{"a": 1}', "must be a list")])
def test_a_broken_file_is_one_problem_without_index(tmp_path, content, reason):
    path = tmp_path / "a.json"
    path.write_text(content)
    (problem,) = check_annotations(path).problems
    assert problem.index is None and reason in problem.reason


def test_missing_annotation_file_and_unknown_suffix(tmp_path):
    assert "cannot read" in check_annotations(tmp_path / "nope.json").problems[0].reason
    (tmp_path / "a.csv").write_text("x")
    assert "use .json or .jsonl" in check_annotations(tmp_path / "a.csv").problems[0].reason


def test_missing_frames_of_a_frame_list(tmp_path):
    write_frames(tmp_path / "clip", count=2)
    path = write_json(tmp_path / "v.json", [video_record(FRAMES, [frame_masks((0,))])])
    (problem,) = check_annotations(path).problems
    assert "1 of 3 frame files do not exist" in problem.reason and "frame_02.png" in problem.reason


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="pixelrefer")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_exits_1_on_problems_and_0_on_clean_data(tmp_path, capsys):
    assert run_cli(["data", "check", str(planted(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "bad.json:6: object 0, frame 7: frame index 7 is out of range" in out
    assert out.strip().endswith("11 problem(s) in 10 of 11 records")
    clean = write_json(tmp_path / "clean.json", [image_record(mask_to_rle(square_mask()))])
    assert run_cli(["data", "check", str(clean), "--media-root", str(tmp_path)]) == 0
    assert "1 records, no problems" in capsys.readouterr().out


def test_cli_writes_shapesworld_and_shows_usage_without_an_action(tmp_path, capsys):
    assert run_cli(["data", "shapesworld", str(tmp_path), "--images", "3", "--videos", "2", "--seed", "5"]) == 0
    assert "train: " in capsys.readouterr().out
    assert run_cli(["data", "check", str(tmp_path / "train.json")]) == 0
    assert '"image_choice": false' in (tmp_path / "info.json").read_text()
    assert run_cli(["data", "shapesworld", str(tmp_path / "mc"), "--images", "3", "--videos", "0",
                    "--image-choice"]) == 0
    assert json.loads((tmp_path / "mc" / "info.json").read_text())["image_choice"] is True
    assert run_cli(["data", "check", str(tmp_path / "mc" / "train.json")]) == 0
    assert run_cli(["data", "shapesworld", str(tmp_path / "loc"), "--images", "2", "--videos", "1", "--location"]) == 0
    info = json.loads((tmp_path / "loc" / "info.json").read_text())
    assert (info["image_choice"], info["location"], info["last_location"]) == (False, True, False)
    assert run_cli(["data", "shapesworld", str(tmp_path / "last"), "--images", "1", "--videos", "1",
                    "--last-location"]) == 0
    tasks = {record["task"] for split in ("train", "val", "test")
             for record in json.loads((tmp_path / "last" / f"{split}.json").read_text())}
    assert "video_last_location" in tasks and "video_location" not in tasks
    assert run_cli(["data", "shapesworld", str(tmp_path / "short"), "--images", "1", "--videos", "3",
                    "--short-answers"]) == 0
    assert json.loads((tmp_path / "short" / "info.json").read_text())["short_answers"] is True
    assert run_cli(["data", "shapesworld", str(tmp_path / "first"), "--images", "1", "--videos", "2",
                    "--option-first"]) == 0
    answers = [record["Answer"] for split in ("train", "val", "test")
               for record in json.loads((tmp_path / "first" / f"{split}.json").read_text()) if "Answer" in record]
    assert answers and all(re.fullmatch(r"[^()]+ \([A-D]\)", answer) for answer in answers), answers
    tasks = {record["task"] for split in ("train", "val", "test")
             for record in json.loads((tmp_path / "short" / f"{split}.json").read_text())}
    assert "video_short_answer" in tasks and "video_last_location" not in tasks
    assert run_cli(["data", "check", str(tmp_path / "loc" / "train.json")]) == 0
    assert run_cli(["data"]) == 2
