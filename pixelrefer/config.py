"""PixelRefer configuration: a VideoLLaMA3 config plus the region fields.

Notable:
- `framework` selects the paper's two designs: "vision_object" (PixelRefer:
  global vision tokens and object tokens both enter the LLM) or "object_only"
  (PixelRefer-Lite: only object tokens, enriched by Object-Centric Infusion).
- Every derived value (patch area, downscale threshold, k-means iterations,
  tokens per object) is computed here, once, so that modules and the
  processor never re-derive them.
- Release-compatibility switches reproduce the authors' release where it
  deviates from the paper (REFERENCE.md §1–2); they default to the paper.
- Presets: `tiny` (CPU, a few million parameters), `2b` and `7b` (the
  published shapes: SigLIP-NaViT 1152/14 with Qwen2.5-1.5B / Qwen2.5-7B).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import VideoLlama3Config

FRAMEWORKS = ("vision_object", "object_only")
OBJECT_TOKENIZERS = ("saot", "mask_pooling")


@strict
class PixelReferConfig(VideoLlama3Config):
    """VideoLLaMA3 config with the Scale-Adaptive Object Tokenizer and OCI fields.

    Args:
        framework: "vision_object" (PixelRefer) or "object_only" (PixelRefer-Lite).
        num_object_tokens: n, tokens per object (32 in the paper).
        region_token_id: id of the per-token placeholder `<REGION>`.
        object_tokenizer: "saot" (the paper) or "mask_pooling" (prior-work
            baseline, one token per object) for ablations.
        downscale_threshold: T of Eq. 2, in patches; None picks the release's
            value (100 for PixelRefer, 50 for Lite).
        context_padding_patches: contextual padding around the box, in patches.
        max_scale: cap on the upscale factor s (the release has none).
        max_crop_pixels: cap on crop area; s shrinks until the crop fits.
        use_dynamic_scaling: False crops at native resolution ("w/o expansion").
        use_position_encoding: False drops Eq. 4–5 ("w/o position encoding").
        position_init_std: std of the normal initialisation of the position
            Linear (Eq. 5); None takes `initializer_range` (0.02) like every
            other Linear. The paper does not say. At 0.02 the position term is
            about 2 % of a tiny-model cell feature and the object tokens do not
            learn where their object is (README, "Object tokens that know where").
        kmeans_iterations: None picks the release's value (5 PR, 3 Lite).
        kmeans_seed: seed of the deterministic centroid initialisation.
        oci_local_size / oci_global_size: side of the local crop and of the
            global image fed to OCI (224 / 336 in the release).
        oci_num_heads: attention heads of both OCI blocks.
        oci_use_local / oci_use_global: Table 9 ablation switches.
        video_merge_size: spatial downsampling of video frame tokens (2×2 in VideoLLaMA3).
        video_compression_threshold: VideoLLaMA3's frame-difference pruning of
            video tokens (mean |Δpixel|·255 of a merged token vs. the previous
            frame); None keeps every token.
        freeze_vision_encoder: the paper trains with the encoder frozen.
        release_swapped_position_axes: reproduce the release's box read as
            (x0, y0, x1, y1) while stored as (top, left, bottom, right).
        object_time_embedding: add a learned embedding of its frame to every
            token of a video object unit (the paper's "timestamps embeddings",
            §4.3; `pixelrefer.modeling.time_embedding`). The release writes
            only `Time t:` text before each unit; so does the default.
        object_time_frames: the clip length the time embedding's ramp spans.
        release_variable_token_count: an object with fewer foreground cells
            than n gets that many tokens (the release's PixelRefer) instead of
            n tokens with the empty ones masked out.
        release_prompt_format: build prompts token for token as the release does:
            text between special tokens tokenized as one string, user text
            stripped around the `<image>`/`<video>` tag, and a Lite video object
            written as one bracket of comma-separated `Time t:` units.
    """

    model_type = "pixelrefer"

    framework: str = "vision_object"
    num_object_tokens: int = 32
    region_token_id: int = 151665
    object_tokenizer: str = "saot"
    downscale_threshold: int | None = None
    context_padding_patches: int = 2
    max_scale: float = 8.0
    max_crop_pixels: int = 448 * 448
    use_dynamic_scaling: bool = True
    use_position_encoding: bool = True
    position_init_std: float | None = None
    kmeans_iterations: int | None = None
    kmeans_seed: int = 0
    oci_local_size: int = 224
    oci_global_size: int = 336
    oci_num_heads: int = 8
    oci_use_local: bool = True
    oci_use_global: bool = True
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 14 * 14 * 4 * 1280
    video_merge_size: int = 2
    video_compression_threshold: float | None = 0.1
    freeze_vision_encoder: bool = True
    object_time_embedding: bool = False
    object_time_frames: int = 8
    release_swapped_position_axes: bool = False
    release_variable_token_count: bool = False
    release_prompt_format: bool = False

    def __post_init__(self, **kwargs):
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {self.framework!r}")
        if self.object_tokenizer not in OBJECT_TOKENIZERS:
            raise ValueError(f"object_tokenizer must be one of {OBJECT_TOKENIZERS}, got {self.object_tokenizer!r}")
        if self.position_init_std is not None and not self.position_init_std > 0:
            raise ValueError(f"position_init_std must be a positive number or None, got {self.position_init_std}")
        if self.object_time_frames < 2:
            raise ValueError(f"object_time_frames must be at least 2, got {self.object_time_frames}")
        if self.num_object_tokens < 1:
            raise ValueError(f"num_object_tokens must be >= 1, got {self.num_object_tokens}")
        if self.downscale_threshold is None:
            self.downscale_threshold = 100 if self.framework == "vision_object" else 50
        if self.kmeans_iterations is None:
            self.kmeans_iterations = 5 if self.framework == "vision_object" else 3
        super().__post_init__(**kwargs)
        patch = self.patch_size
        for name in ("oci_local_size", "oci_global_size"):
            if getattr(self, name) % patch:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of the patch size {patch}")

    # Derived values: computed here only.
    @property
    def is_lite(self) -> bool:
        return self.framework == "object_only"

    @property
    def patch_size(self) -> int:
        patch = self.vision_config.patch_size
        return patch if isinstance(patch, int) else int(patch[0])

    @property
    def patch_area(self) -> int:
        """Ω of Eq. 2: pixels in one vision patch."""
        return self.patch_size**2

    @property
    def tokens_per_object(self) -> int:
        """LLM slots one object (or one object-frame unit) occupies."""
        return 1 if self.object_tokenizer == "mask_pooling" else self.num_object_tokens

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PixelReferConfig":
        """Build a named preset (`tiny`, `2b`, `7b`); keyword overrides win."""
        from pixelrefer.presets import preset_kwargs

        kwargs = preset_kwargs(name)
        for key in ("text_config", "vision_config"):
            if key in overrides and isinstance(overrides[key], dict):
                kwargs[key] = {**kwargs[key], **overrides.pop(key)}
        kwargs.update(overrides)
        return cls(**kwargs)
