"""Named model shapes: `tiny` (CPU), `2b` and `7b` (the published shapes).

The 2B/7B shapes are PixelRefer's: the VL3-SigLIP-NaViT vision encoder
(width 1152, patch 14, 27 layers) with Qwen2.5-1.5B or Qwen2.5-7B. They are
built with random weights (nothing is downloaded); real weights come from a
local checkpoint. Special-token ids are those of the built-in tokenizer, so a
preset model and `PixelReferProcessor.from_preset` agree.
"""

from __future__ import annotations

import copy

from pixelrefer.tokenizer import SPECIAL_IDS

_SIGLIP_NAVIT = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)

_QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768)

_PRESETS: dict[str, dict] = {
    "tiny": dict(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
        ),
        text_config=dict(
            _QWEN2,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
        num_object_tokens=8,
        oci_local_size=56,
        oci_global_size=112,
        oci_num_heads=4,
        max_crop_pixels=224 * 224,
        image_min_pixels=28 * 28,
        image_max_pixels=112 * 112,
    ),
    "2b": dict(
        vision_config=_SIGLIP_NAVIT,
        text_config=dict(
            _QWEN2,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        ),
    ),
    "7b": dict(
        vision_config=_SIGLIP_NAVIT,
        text_config=dict(
            _QWEN2,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
        ),
    ),
}

_TOKEN_IDS = dict(
    image_token_id=SPECIAL_IDS["<image>"],
    video_token_id=SPECIAL_IDS["<video>"],
    region_token_id=SPECIAL_IDS["<REGION>"],
)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset_kwargs(name: str) -> dict:
    """Keyword arguments of `PixelReferConfig` for preset `name` (a fresh copy)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    kwargs = copy.deepcopy(_PRESETS[name])
    kwargs.update(_TOKEN_IDS)
    text = kwargs["text_config"]
    text.setdefault("pad_token_id", SPECIAL_IDS["<pad>"])
    text.setdefault("eos_token_id", SPECIAL_IDS["<|im_end|>"])
    text.setdefault("bos_token_id", None)
    return kwargs
