"""Per-item inference time and peak memory (paper Table 6 protocol), and FLOPs of the same inputs.

Notable:
- Time is wall-clock per item for `generate` (prefill + `max_new_tokens` greedy
  steps), median over items after warm-up; CUDA is synchronised around it.
- Peak memory is `torch.cuda.max_memory_allocated` on a GPU (reset per run) and
  the process's peak resident set size on a CPU (it cannot be reset: it covers
  everything the process did before, so compare runs in separate processes).
- FLOPs use the token counts the processor actually produced (object, vision,
  text tokens from its spans), through Eq. 9 / Eq. 10.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from pixelrefer.analysis.flops import llm_flops


@dataclass
class InferenceProfile:
    """Cost of answering one item, for one model."""

    framework: str
    device: str
    items: int
    seconds_per_item: float
    peak_memory_gb: float
    memory_kind: str  # "cuda_max_allocated" or "process_peak_rss"
    region_tokens: float  # mean per item
    vision_tokens: float
    text_tokens: float
    llm_tflops: float  # Eq. 9 / 10 for the mean token counts

    def as_dict(self) -> dict:
        return asdict(self)


def token_counts(encoded) -> dict[str, int]:
    """Object, vision and text tokens of a one-sample encoding, from the processor's spans."""
    counts = {"object": 0, "vision": 0, "text": 0}
    mask = encoded.inputs["attention_mask"][0]
    for span in encoded.spans[0]:
        real = int(mask[span.start : span.end].sum())
        key = span.group if span.group in ("object", "vision") else "text"
        counts[key] += real
    return counts


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_peak_rss"  # KiB on Linux


@torch.no_grad()
def profile_inference(model, processor, items: list, *, max_new_tokens: int = 16, warmup: int = 1) -> InferenceProfile:
    """Time `generate` on each (text, image, video, masks) item and report per-item cost.

    The first `warmup` items are run but not timed.
    """
    if len(items) <= warmup:
        raise ValueError(f"need more than {warmup} items (warm-up) to time anything, got {len(items)}")
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, counts = [], []
    for index, (text, image, video, masks) in enumerate(items):
        encoded = processor.encode(text, images=image, videos=video, masks=masks)
        inputs = encoded.inputs.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
            counts.append(token_counts(encoded))
    mean = {key: statistics.fmean(c[key] for c in counts) for key in ("object", "vision", "text")}
    flops = llm_flops(model.config, round(mean["object"]), round(mean["vision"]), round(mean["text"]))
    memory, kind = _peak_memory(device)
    return InferenceProfile(model.config.framework, str(device), len(seconds), statistics.median(seconds), memory,
                            kind, mean["object"], mean["vision"], mean["text"], flops / 1e12)
