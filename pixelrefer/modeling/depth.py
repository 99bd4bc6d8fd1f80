"""Deepening a trained LLM: decoder layers appended that start as the identity.

A 4-layer LLM that computes an answer in its last layer (a relation, a motion: docs/embedded-models.md,
"Session 17") has no layer left to find the option that states it and copy that option's letter. Appending
layers gives it room without losing what it has learned: each new layer's two output projections (attention
`o_proj`, MLP `down_proj`) start at zero, so its residual branches add nothing and the model's outputs are
unchanged until it trains; the other weights start as a fresh layer's (seeded).

Notable:
- The text config's `num_hidden_layers` and `layer_types` grow with the layers, so `save_pretrained` writes a
  config that builds the deeper model on load; generation's KV cache gets one entry per layer (`layer_idx`).
- The final norm and `lm_head` stay where they are: the new layers sit between the old last layer and the norm.
"""

from __future__ import annotations

import torch


def add_language_layers(model, count: int, seed: int = 0) -> list[int]:
    """Append `count` identity-start decoder layers to `model`'s LLM; return their indices.

    `model` is a `PixelReferForConditionalGeneration` (or any model whose `model.language_model` is a
    transformers decoder with `.layers`). Raises ValueError for a count that is not a positive integer.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of language layers to add must be a positive integer, got {count!r}")
    language_model = model.model.language_model
    config = language_model.config
    layer_class = type(language_model.layers[0])
    reference = next(language_model.layers[-1].parameters())
    first = len(language_model.layers)
    added = list(range(first, first + count))
    config.num_hidden_layers = first + count  # before the layers: a layer reads its type from the config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types) + [config.layer_types[-1]] * count
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in added:
            layer = layer_class(config, layer_idx=index)
            with torch.no_grad():
                for name, parameter in layer.named_parameters():
                    if name.endswith("norm.weight"):
                        parameter.fill_(1.0)
                    elif name.endswith(("o_proj.weight", "down_proj.weight")) or name.endswith(".bias"):
                        parameter.zero_()
                    else:
                        parameter.normal_(0.0, config.initializer_range)
            language_model.layers.append(layer.to(device=reference.device, dtype=reference.dtype))
    return added
