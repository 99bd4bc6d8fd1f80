"""pixelrefer: PixelRefer and PixelRefer-Lite on transformers' VideoLLaMA3, as a workbench.

Public entry points:
    PixelReferConfig.from_preset(name)      `tiny`, `2b`, `7b`
    PixelReferForConditionalGeneration(config)
    PixelReferProcessor.from_preset(name)   prompts, images, videos, masks → inputs
    open_video(path) / MaskPropagator       video frames, sampling, SAM 2 mask propagation
    InputError                              every rejected input
"""

from transformers import AutoConfig

from pixelrefer.config import PixelReferConfig
from pixelrefer.errors import InputError
from pixelrefer.modeling import PixelReferForConditionalGeneration, PixelReferModel
from pixelrefer.inference import Answer, ask, load
from pixelrefer.presets import preset_names
from pixelrefer.processing import PixelReferProcessor, Video
from pixelrefer.propagation import MaskPropagator, ObjectPrompt
from pixelrefer.video import SampledVideo, open_video, sample_video

AutoConfig.register(PixelReferConfig.model_type, PixelReferConfig, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "InputError",
    "MaskPropagator",
    "ObjectPrompt",
    "PixelReferConfig",
    "PixelReferForConditionalGeneration",
    "PixelReferModel",
    "PixelReferProcessor",
    "SampledVideo",
    "Video",
    "ask",
    "load",
    "open_video",
    "preset_names",
    "sample_video",
]
