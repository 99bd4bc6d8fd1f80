"""Timestamp embedding of video object tokens (PixelRefer-Lite, paper §4.3 "Extension to Videos").

The paper "prepend[s] timestamps embeddings to each object token, enabling the model to distinguish objects across
different frames". The authors' release writes the time as text before each (object, frame) unit instead (`Time
1.5:` then the unit's tokens, REFERENCE §3), and that stays the default. With `PixelReferConfig.object_time_embedding`
every token of a video unit also gets a learned vector of its frame added, so an attention head can pick an
object's first or last frame by what its tokens hold rather than by where they sit in the sequence (a 4-layer LLM
reading only the `Time` text never compared an object's position on two frames: docs/embedded-models.md,
"Session 16").

Notable:
- The input is the unit's frame index in the sampled clip (0 … F-1), not seconds: it is what tells two units of one
  object apart, and it does not depend on the video's frame rate.
- Features: a ramp f / (F-1) and sin / cos of k·π·f / F for k = 1 … `num_frequencies`, then one Linear without bias
  to the LLM width. The ramp makes "later" one direction; the sinusoids tell neighbouring frames apart.
- Image units (frame index -1) get nothing added.
- The Linear starts at zero, so switching the embedding on leaves a trained model's outputs unchanged until it
  trains; `start_at_norm` gives it a seeded random start of a chosen size instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FrameTimeEmbedding(nn.Module):
    """(N,) frame indices (-1 for an image unit) → (N, D) vectors to add to every token of each unit.

    Args:
        llm_dim: D, the LLM width.
        num_frames: F, the clip length the ramp spans (frames past F - 1 continue it).
        num_frequencies: sin / cos pairs of the frame index.
    """

    def __init__(self, llm_dim: int, num_frames: int = 8, num_frequencies: int = 4):
        super().__init__()
        if num_frames < 2:
            raise ValueError(f"num_frames must be at least 2, got {num_frames}")
        self.num_frames = num_frames
        self.num_frequencies = num_frequencies
        self.proj = nn.Linear(1 + 2 * num_frequencies, llm_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def features(self, frame_index: Tensor) -> Tensor:
        """(N,) frame indices → (N, 1 + 2·num_frequencies) ramp and sinusoids."""
        frame = frame_index.to(torch.float32)[:, None]
        frequencies = torch.arange(1, self.num_frequencies + 1, device=frame.device) * math.pi / self.num_frames
        angles = frame * frequencies
        return torch.cat([frame / (self.num_frames - 1), torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, frame_index: Tensor) -> Tensor:
        frame_index = frame_index.to(self.proj.weight.device)
        out = self.proj(self.features(frame_index).to(self.proj.weight.dtype))
        return out * (frame_index >= 0)[:, None].to(out.dtype)

    @torch.no_grad()
    def start_at_norm(self, norm: float, seed: int = 0) -> None:
        """Random (seeded) weights scaled so that the vectors of frames 0 … F-1 have mean norm `norm`."""
        if not norm > 0:
            raise ValueError(f"norm must be positive, got {norm!r}")
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(self.proj.weight.shape, generator=generator)
        vectors = self.features(torch.arange(self.num_frames)) @ weight.T
        self.proj.weight.copy_(weight * (norm / vectors.norm(dim=-1).mean()))
