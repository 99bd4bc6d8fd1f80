"""What a benchmark runner asks of a model: `(list of (turns, image, video, masks)) -> list[str]`.

Notable:
- Any callable with that signature can be evaluated: a wrapped API, another
  region model, a fixed-answer baseline. Each item is a `SampleInputs`
  (a NamedTuple, so plain 4-tuples work the same): the conversation up to
  the asked user turn, a PIL image or None, a `Video` or None, and one mask
  per `<region>` of the prompt (for a video `{frame position: mask}`).
- `PixelReferModel` adapts our (model, processor) pair: the whole list goes
  through ONE processor call (its batch path: left padding, all crops of all
  objects packed for one vision-encoder call) and ONE `model.generate`.
  Greedy decoding by default, so batched and one-by-one answers agree (a
  test holds that).
- `load_model("auto")` is the shipped, trained `shapes-tiny` when the package
  has it, else the random-weight `tiny` preset (for shapes and bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pixelrefer.data.sample import SampleInputs

ModelFn = Callable[[Sequence[SampleInputs]], list[str]]


class PixelReferModel:
    """A (model, processor) pair as a runner's model callable.

    Args:
        model, processor: from `pixelrefer.load`.
        max_new_tokens: answer length limit.
        name: the row label in summary tables.
        **generate_kwargs: passed to `model.generate` (default greedy: `do_sample=False`).
    """

    def __init__(self, model, processor, *, max_new_tokens: int = 64, name: str = "model", **generate_kwargs):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.name = name
        self.generate_kwargs = {"do_sample": False, **generate_kwargs}

    @torch.no_grad()
    def __call__(self, inputs: Sequence[SampleInputs]) -> list[str]:
        if not inputs:
            return []
        texts, images, videos, masks = (list(column) for column in zip(*inputs))
        encoded = self.processor.encode(texts, images=images, videos=videos, masks=[list(m) for m in masks])
        batch = encoded.inputs.to(self.model.device)
        output = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()  # (B, T) after the left-padded prompts
        return self.processor.batch_decode(new_tokens)

    @torch.no_grad()
    def answer_losses(self, query: SampleInputs, answers: Sequence[str]) -> list[float]:
        """Summed next-token loss (nats) of each answer as the assistant turn after `query`'s conversation,
        in one batch: ranking lettered options by it scores what the model knows regardless of the letter it
        would write first (the log-likelihood scoring of lm-eval-harness)."""
        if not answers:
            return []
        text, image, video, masks = query
        conversations = [list(text) + [{"role": "assistant", "content": answer}] for answer in answers]
        count = len(answers)
        batch = self.processor(text=conversations, images=[image] * count, videos=[video] * count,
                               masks=[list(masks)] * count).to(self.model.device)
        logits = self.model(**batch).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        return (losses * (labels != -100)).sum(1).tolist()


def resolve_model_name(name: str) -> str:
    """`auto` → `shapes-tiny` when the package ships it, else the `tiny` preset; other names unchanged."""
    from pixelrefer.inference import embedded_models

    if name != "auto":
        return name
    return "shapes-tiny" if "shapes-tiny" in embedded_models() else "tiny"


def load_model(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
               max_new_tokens: int = 64, **config_overrides) -> PixelReferModel:
    """`pixelrefer.load` wrapped as a runner's model callable (`auto` as in `resolve_model_name`)."""
    from pixelrefer.inference import load

    name = resolve_model_name(str(name_or_path))
    model, processor = load(name, device=device, dtype=dtype, seed=seed, **config_overrides)
    return PixelReferModel(model, processor, max_new_tokens=max_new_tokens, name=name)
