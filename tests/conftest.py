"""Shared fixtures: a synthetic scene with known masks, tiny processors and models."""

import numpy as np
import pytest
import torch

from pixelrefer import PixelReferConfig, PixelReferForConditionalGeneration, PixelReferProcessor, Video

FRAMEWORKS = ("vision_object", "object_only")


def make_scene(height=96, width=128, seed=0):
    """An RGB image with a big square, a small disc and a 3-pixel speck, and their masks."""
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


def make_video(frames=3, height=96, width=128):
    """Frames where the disc moves right; masks per frame for the square and the disc."""
    images, square, disc = [], {}, {}
    for t in range(frames):
        image, masks = make_scene(height, width, seed=t)
        shifted = np.roll(masks["disc"], shift=-8 * t, axis=1)
        image[shifted] = (30, 30, 220)
        images.append(image)
        square[t] = masks["square"]
        disc[t] = shifted
    return Video(images, timestamps=[0.5 * t for t in range(frames)]), {"square": square, "disc": disc}


def tiny_overrides():
    """The `tiny` preset made smaller still, for fast tests."""
    return dict(
        text_config=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2),
        num_object_tokens=4,
    )


@pytest.fixture(scope="session")
def scene():
    return make_scene()


@pytest.fixture(scope="session")
def video():
    return make_video()


def build(framework, **overrides):
    kwargs = {**tiny_overrides(), "framework": framework, **overrides}
    processor = PixelReferProcessor.from_preset("tiny", **kwargs)
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(processor.config).eval()
    return model, processor


@pytest.fixture(scope="session", params=FRAMEWORKS)
def tiny(request):
    return build(request.param)
