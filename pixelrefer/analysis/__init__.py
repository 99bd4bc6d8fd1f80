"""Analyses of the paper: attention by token group (more to come: similarity, FLOPs, profiling, ablations)."""

from pixelrefer.analysis.attention import (
    GROUPS,
    AttentionCapture,
    TokenGroups,
    capture_attention,
    token_groups,
)

__all__ = ["GROUPS", "AttentionCapture", "TokenGroups", "capture_attention", "token_groups"]
