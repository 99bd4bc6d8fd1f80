"""LLM FLOPs of both frameworks: the paper's Eq. 9 (Vision-Object) and Eq. 10 (Object-Only).

Notable:
- Per decoder layer, the Qwen-style count of §6.1 (after FastV):
  2nd² + 2n·d·d_kv + 2n²d + 3ndm, with n tokens, d the hidden size, d_kv the
  key/value projection width (GQA) and m the FFN width.
- Eq. 10 adds Object-Centric Infusion, 2(L_R + L_local)·c² + 2(L_R + L_global)·c²,
  counted once (it runs before the LLM), in the vision width c.
- `layers=None` sums over every decoder layer. The published Table 5 numbers
  do not follow from that sum; `TABLE5` keeps them for side-by-side display
  and nothing here is adjusted to match them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pixelrefer.config import PixelReferConfig


def layer_flops(tokens: int, hidden: int, kv_width: int, ffn: int) -> float:
    """One Qwen-style decoder layer over `tokens` tokens: projections, attention scores, SwiGLU FFN."""
    n, d = tokens, hidden
    return 2 * n * d * d + 2 * n * d * kv_width + 2 * n * n * d + 3 * n * d * ffn


def llm_flops(
    config: PixelReferConfig,
    region_tokens: int,
    vision_tokens: int,
    text_tokens: int = 0,
    local_tokens: int = 0,
    global_tokens: int = 0,
    layers: int | None = None,
) -> float:
    """FLOPs of Eq. 9 (Vision-Object) or Eq. 10 (Object-Only, with OCI), per forward pass.

    Args:
        config: the model's config (framework and widths).
        region_tokens: L_R, object tokens in the sequence.
        vision_tokens: L_I, global vision tokens in the sequence (must be 0 for Object-Only).
        text_tokens: text tokens in the sequence (the paper's formulas leave them out: default 0).
        local_tokens / global_tokens: L_Il / L_Ig, the key sets of OCI's two attention blocks (Object-Only).
        layers: decoder layers to sum over; None means all of them.
    """
    text = config.text_config
    if config.is_lite and vision_tokens:
        raise ValueError("Object-Only (Lite) puts no vision tokens in the LLM: vision_tokens must be 0")
    if not config.is_lite and (local_tokens or global_tokens):
        raise ValueError("local/global infusion tokens only exist in Object-Only (Lite)")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_width = text.num_key_value_heads * head_dim
    count = text.num_hidden_layers if layers is None else layers
    tokens = region_tokens + vision_tokens + text_tokens
    total = count * layer_flops(tokens, text.hidden_size, kv_width, text.intermediate_size)
    if config.is_lite:
        width = config.vision_config.hidden_size
        total += 2 * (region_tokens + local_tokens) * width**2 + 2 * (region_tokens + global_tokens) * width**2
    return float(total)


@dataclass(frozen=True)
class PublishedFlops:
    """One row of the paper's Table 5 (FLOPs in T, memory in GB)."""

    setting: str
    model: str
    region_tokens: int
    vision_tokens: int
    local_tokens: int
    global_tokens: int
    flops_t: float
    memory_gb: float | None
    note: str = ""


TABLE5 = (
    PublishedFlops("image (DLC-Bench)", "2b", 32, 1408, 0, 0, 1.51, 13.2),
    PublishedFlops("image (DLC-Bench)", "2b-lite", 32, 0, 256, 576, 0.03, 4.9),
    PublishedFlops("image (DLC-Bench)", "7b", 32, 1408, 0, 0, 7.08, 25.1),
    PublishedFlops("image (DLC-Bench)", "7b-lite", 32, 0, 256, 576, 0.17, 15.8),
    PublishedFlops("video (HC-STVG)", "2b", 32, 7185, 0, 0, 11.15, 24.6),
    PublishedFlops("video (HC-STVG)", "2b-lite", 32, 0, 256, 576, 0.11, 5.1,
                   "token counts unreadable in our copy of the table; assumed equal to the image row"),
    PublishedFlops("video (HC-STVG)", "7b", 32, 7185, 0, 0, 43.83, 36.9),
    PublishedFlops("video (HC-STVG)", "7b-lite", 32, 0, 256, 576, 0.61, 17.6,
                   "token counts unreadable in our copy of the table; assumed equal to the image row"),
)


def table5_comparison(layers: int | None = None) -> list[dict]:
    """Table 5 beside `llm_flops` for the same token counts (all layers unless `layers` is given)."""
    rows = []
    for row in TABLE5:
        preset, _, lite = row.model.partition("-")
        config = PixelReferConfig.from_preset(preset, framework="object_only" if lite else "vision_object")
        ours = llm_flops(config, row.region_tokens, row.vision_tokens, local_tokens=row.local_tokens,
                         global_tokens=row.global_tokens, layers=layers) / 1e12
        rows.append(dict(setting=row.setting, model=row.model, region_tokens=row.region_tokens,
                         vision_tokens=row.vision_tokens, paper_tflops=row.flops_t, formula_tflops=round(ours, 3),
                         ratio=round(ours / row.flops_t, 2), note=row.note))
    return rows
