"""Analyses of the paper: attention by token group, object-token similarity, FLOPs (Eq. 9–10)."""

from pixelrefer.analysis.flops import TABLE5, llm_flops, table5_comparison
from pixelrefer.analysis.similarity import ObjectSimilarity, object_similarity, token_cell_map
from pixelrefer.analysis.attention import (
    GROUPS,
    AttentionCapture,
    GroupCurves,
    TokenGroups,
    capture_attention,
    group_curves,
    token_groups,
)
from pixelrefer.analysis.attention_view import AttentionView, attention_view

__all__ = [
    "GROUPS",
    "TABLE5",
    "AttentionCapture",
    "AttentionView",
    "GroupCurves",
    "ObjectSimilarity",
    "TokenGroups",
    "attention_view",
    "capture_attention",
    "group_curves",
    "llm_flops",
    "object_similarity",
    "table5_comparison",
    "token_cell_map",
    "token_groups",
]
