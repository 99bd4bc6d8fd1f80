"""A synthetic scene and video with known masks, for the quickstart and the tests.

Deliberately tiny and deterministic: a big square, a disc and a 3-pixel speck
(smaller than one 14-pixel patch, the case the Scale-Adaptive Object Tokenizer
exists for). The ShapesWorld dataset is the full synthetic benchmark; this is
the one-picture example.
"""

from __future__ import annotations

import numpy as np

from pixelrefer.processing import Video


def demo_scene(height: int = 96, width: int = 128, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An RGB image (H, W, 3) uint8 and bool masks named `square`, `disc`, `speck`."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    square = (yy >= 10) & (yy < 70) & (xx >= 8) & (xx < 70)
    disc = (yy - 40) ** 2 + (xx - 100) ** 2 < 12**2
    speck = np.zeros((height, width), dtype=bool)
    speck[85, 20:23] = True
    for mask, colour in ((square, (200, 30, 30)), (disc, (30, 200, 30)), (speck, (250, 250, 250))):
        image[mask] = colour
    return image, {"square": square, "disc": disc, "speck": speck}


def demo_video(frames: int = 3, height: int = 96, width: int = 128) -> tuple[Video, dict[str, dict[int, np.ndarray]]]:
    """Frames 0.5 s apart in which a blue disc moves left; per-frame masks of the square and the disc."""
    images, square, disc = [], {}, {}
    for t in range(frames):
        image, masks = demo_scene(height, width, seed=t)
        moved = np.roll(masks["disc"], shift=-8 * t, axis=1)
        image[moved] = (30, 30, 220)
        images.append(image)
        square[t] = masks["square"]
        disc[t] = moved
    return Video(images, timestamps=[0.5 * t for t in range(frames)]), {"square": square, "disc": disc}


def shapesworld_scene(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One ShapesWorld picture (what the embedded models were trained on) and its objects' visible masks.

    Names are "<size> <colour> <category>", numbered when two objects would share a name.
    """
    from pixelrefer.data.scenes import sample_scene

    scene = sample_scene(np.random.default_rng(seed))
    masks: dict[str, np.ndarray] = {}
    for obj in scene.objects:
        name = f"{obj.size} {obj.colour} {obj.category}"
        key, k = name, 2
        while key in masks:
            key, k = f"{name} ({k})", k + 1
        masks[key] = obj.mask
    return scene.image, masks


def shapesworld_video(seed: int = 0, num_frames: int = 8, fps: float = 2.0,
                      size: int = 128) -> tuple[Video, dict[str, dict[int, np.ndarray]]]:
    """A ShapesWorld video (shapes that move, appear or disappear) and each object's visible mask per frame.

    Names are "<size> <colour> <category> that <motion>", e.g. "small red circle that moves left";
    an object's masks cover only the frames it is seen on.
    """
    from pixelrefer.data.scenes import sample_video
    from pixelrefer.data.tasks import motion_phrase

    scene = sample_video(np.random.default_rng(seed), size, size, num_frames, fps)
    masks = {f"{t.size} {t.colour} {t.category} that {motion_phrase(t)}": t.masks for t in scene.tracks}
    return Video(scene.frames, timestamps=scene.timestamps, fps=fps), masks
