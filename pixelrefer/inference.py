"""Load a model by preset name or local path, and ask it about regions.

Notable:
- Nothing is downloaded: a name is a preset (random weights, for shapes and
  benchmarks) and anything else must be a local checkpoint folder.
- Random-weight models of the 2B/7B shapes are built directly on the target
  device and dtype, so a 7B model never materialises in float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pixelrefer.modeling import PixelReferForConditionalGeneration
from pixelrefer.presets import preset_names
from pixelrefer.processing import EncodedBatch, PixelReferProcessor


ASSETS = Path(__file__).resolve().parent / "assets"


def embedded_models() -> list[str]:
    """Trained checkpoints shipped inside the package (`shapes-tiny`, `shapes-tiny-lite`)."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").exists()) if ASSETS.is_dir() else []


@dataclass
class Answer:
    """A generated answer with the encoded prompt it came from."""

    text: str
    token_ids: torch.Tensor  # (T,) generated tokens only
    encoded: EncodedBatch


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **config_overrides,
) -> tuple[PixelReferForConditionalGeneration, PixelReferProcessor]:
    """Return (model, processor) for an embedded model, a preset (random weights) or a local checkpoint folder.

    Args:
        name_or_path: `shapes-tiny` / `shapes-tiny-lite` (trained, shipped), `tiny`, `2b`, `7b`, or a folder
            written by `save_pretrained`.
        device: where the model lives.
        dtype: parameter dtype (default float32).
        seed: initialisation seed for preset (random-weight) models.
        **config_overrides: `PixelReferConfig` fields for presets, e.g. `framework="object_only"`.
    """
    path = ASSETS / str(name_or_path) if str(name_or_path) in embedded_models() else Path(name_or_path)
    if path.is_dir():
        if config_overrides:
            raise ValueError(f"config overrides {sorted(config_overrides)} apply to presets, not to checkpoint {path}")
        model = PixelReferForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)
        processor = PixelReferProcessor.from_pretrained(path)
        model.to(device)
    elif str(name_or_path) in preset_names():
        warnings.warn(
            f"preset {name_or_path!r} has random weights: answers are meaningless until you load a trained checkpoint",
            stacklevel=2,
        )
        processor = PixelReferProcessor.from_preset(str(name_or_path), **config_overrides)
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.device(device):
            model = PixelReferForConditionalGeneration(processor.config)
    else:
        raise ValueError(
            f"{name_or_path!r} is neither an embedded model ({', '.join(embedded_models()) or 'none shipped'}), "
            f"a preset ({', '.join(preset_names())}) nor an existing checkpoint folder"
        )
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


@torch.no_grad()
def ask(
    model: PixelReferForConditionalGeneration,
    processor: PixelReferProcessor,
    prompt: str | list[dict],
    *,
    image=None,
    video=None,
    masks=(),
    max_new_tokens: int = 32,
    do_sample: bool = False,
) -> Answer:
    """Generate an answer to `prompt` (with one `<region>` per mask) about an image or a video."""
    encoded = processor.encode(prompt, images=image, videos=video, masks=list(masks))
    inputs = encoded.inputs.to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].cpu()
    return Answer(processor.decode(new_tokens), new_tokens, encoded)


@dataclass
class Prediction:
    """A model's answer to one annotated sample, next to the annotation's own answer."""

    sample_id: str
    task: str | None
    question: str
    prediction: str
    reference: str


def predict(model, processor, samples, *, max_new_tokens: int = 24) -> list[Prediction]:
    """Answer each sample's first user turn (anything with `load_media()` and `conversation`, e.g. `pixelrefer.data.Sample`)."""
    predictions = []
    for sample in samples:
        text, image, video, masks = sample.load_media()
        first_answer = next(i for i, turn in enumerate(text) if turn["role"] == "assistant")
        prompt, reference = text[:first_answer], text[first_answer]["content"]
        used = sum(turn["content"].count("<region>") for turn in prompt)  # masks are consumed in prompt order
        answer = ask(model, processor, prompt, image=image, video=video, masks=masks[:used],
                     max_new_tokens=max_new_tokens)
        predictions.append(Prediction(str(getattr(sample, "id", len(predictions))), getattr(sample, "task", None),
                                      prompt[-1]["content"], answer.text, reference))
    return predictions
