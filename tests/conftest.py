"""Shared fixtures: a synthetic scene with known masks, tiny processors and models."""

import pytest
import torch

from pixelrefer import PixelReferForConditionalGeneration, PixelReferProcessor
from pixelrefer.demo import demo_scene as make_scene
from pixelrefer.demo import demo_video as make_video

FRAMEWORKS = ("vision_object", "object_only")


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
