"""Analyses of the paper: attention by token group and FLOPs (Eq. 9–10)."""

from pixelrefer.analysis.flops import TABLE5, llm_flops, table5_comparison
from pixelrefer.analysis.attention import (
    GROUPS,
    AttentionCapture,
    TokenGroups,
    capture_attention,
    token_groups,
)

__all__ = [
    "GROUPS",
    "TABLE5",
    "AttentionCapture",
    "TokenGroups",
    "capture_attention",
    "llm_flops",
    "table5_comparison",
    "token_groups",
]
