"""`pixelrefer ask IMAGE --mask MASK PROMPT`: the embedded default answers about masked regions of an image file."""

import numpy as np
import pytest
from PIL import Image

CATEGORY_Q = "What is the category of <region>? Using only one word or phrase."


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    """An unseen ShapesWorld scene saved as a PNG, each object's mask as a 0/255 PNG; with the objects' labels."""
    from pixelrefer.demo import shapesworld_scene

    root = tmp_path_factory.mktemp("ask")
    image, masks = shapesworld_scene(100)
    Image.fromarray(image).save(root / "scene.png")
    labels = []
    for i, (label, mask) in enumerate(masks.items()):
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"object{i}.png")
        labels.append(label)
    return root, image, masks, labels


def test_ask_prints_the_embedded_default_answer(scene_files, capsys):
    import pixelrefer
    from pixelrefer.cli import main

    root, image, masks, labels = scene_files
    model, processor = pixelrefer.load("shapes-tiny")
    right = 0
    for i, (label, mask) in enumerate(masks.items()):
        assert main(["ask", str(root / "scene.png"), "--mask", str(root / f"object{i}.png"), CATEGORY_Q]) == 0
        printed = capsys.readouterr().out.strip()
        # the same answer as the Python API on the same arrays: the files were read, not re-drawn
        assert printed == pixelrefer.ask(model, processor, CATEGORY_Q, image=image, masks=[mask]).text.strip()
        right += printed == label.split(" (")[0].split(" ")[2]
    assert right >= len(masks) - 2, f"{right}/{len(masks)} categories right"  # 5/6 at release (shapes-tiny v18)


def test_ask_takes_several_masks_and_another_model(scene_files, capsys):
    from pixelrefer.cli import main

    root, *_ = scene_files
    stack = np.stack([np.asarray(Image.open(root / f"object{i}.png")) > 0 for i in (0, 1)])
    np.save(root / "two.npy", stack)
    code = main(["ask", str(root / "scene.png"), "--mask", str(root / "two.npy"), "--model", "shapes-tiny-lite",
                 "--max-new-tokens", "3", "Is <region> bigger than <region>?"])
    assert code == 0
    assert 1 <= len(capsys.readouterr().out.split()) <= 3


@pytest.mark.parametrize("case", ["count", "missing", "size", "model"])
def test_ask_names_what_is_wrong(scene_files, capsys, case):
    from pixelrefer.cli import main

    root, *_ = scene_files
    scene, mask = str(root / "scene.png"), str(root / "object0.png")
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(root / "small.png")
    argv, expected = {
        "count": (["--mask", mask, "--mask", str(root / "object1.png"), "What is <region>?"],
                  "the prompt has 1 <region> but the mask files hold 2 masks: "
                  f"{mask} (1), {root / 'object1.png'} (1)"),
        "missing": (["--mask", str(root / "none.png"), "What is <region>?"], f"mask file {root / 'none.png'}"),
        "size": (["--mask", str(root / "small.png"), "What is <region>?"], f"mask file {root / 'small.png'}"),
        "model": (["--mask", mask, "--model", "no-such-model", "What is <region>?"], "'no-such-model'"),
    }[case]
    assert main(["ask", scene, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pixelrefer ask: error: ") and expected in captured.err, captured.err


def test_ask_refuses_an_unreadable_image(tmp_path, capsys):
    from pixelrefer.cli import main

    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    assert main(["ask", str(tmp_path / "broken.png"), "--mask", str(tmp_path / "mask.png"), "What is <region>?"]) == 2
    assert f"cannot read image {tmp_path / 'broken.png'}" in capsys.readouterr().err
