"""Deepening and widening a trained LLM: decoder layers appended that start as the identity, attention heads
added that start silent.

A 4-layer LLM that computes an answer in its last layer (a relation, a motion: docs/embedded-models.md,
"Session 17") has no layer left to find the option that states it and copy that option's letter. Appending
layers gives it room without losing what it has learned: each new layer's two output projections (attention
`o_proj`, MLP `down_proj`) start at zero, so its residual branches add nothing and the model's outputs are
unchanged until it trains; the other weights start as a fresh layer's (seeded).

Notable:
- The text config's `num_hidden_layers` and `layer_types` grow with the layers, so `save_pretrained` writes a
  config that builds the deeper model on load; generation's KV cache gets one entry per layer (`layer_idx`).
- The final norm and `lm_head` stay where they are: the new layers sit between the old last layer and the norm.
- `widen_attention` gives every attention layer more query heads, each with a key and value head of its own
  (the tiny preset's four query heads share two key/value heads: two key spaces per layer in which to find an
  option's text and read its letter). The old heads' key/value weights are copied to each head that shared
  them, so they attend and read exactly as before; a new head's output columns of `o_proj` start at zero, so it
  adds nothing until it trains. `head_dim` is written to the config, since the hidden size over the new head
  count no longer gives it.
- Zero-start weights move at the optimizer's rate, one learning-rate step at a time: after 600 steps at 3e-4 the
  new heads' output columns had a norm of 0.3 against the old heads' 4 (docs/embedded-models.md, "Session 21").
  `added_parameters` and `new_head_entries` say which entries are new, so a stage can train them at a rate of
  their own (`cached_media.train_on_cached_media(fresh=...)`).
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


def widen_attention(model, heads: int, seed: int = 0) -> list[int]:
    """Give every attention layer of `model`'s LLM `heads` query heads, each with its own key/value head (module
    docstring); return the indices of the new query heads (empty when only the key/value heads were ungrouped).

    Raises ValueError for a head count that is not an integer at least the LLM's, or one that would change
    nothing (as many heads as now, each already with its own key/value head).
    """
    language_model = model.model.language_model
    config = language_model.config
    old, kv = config.num_attention_heads, config.num_key_value_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < old:
        raise ValueError(f"attention heads must be an integer of at least the LLM's {old}, got {heads!r}")
    if heads == old and kv == old:
        raise ValueError(f"the LLM already has {old} attention heads, each with its own key/value head: "
                         "nothing to widen")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // old
    group = old // kv
    shared = torch.tensor([i // group for i in range(old)])  # the key/value head each old query head reads
    generator = torch.Generator().manual_seed(seed)

    def fresh(rows: int, columns: int, reference: torch.Tensor) -> torch.Tensor:
        weight = torch.empty(rows, columns).normal_(0.0, config.initializer_range, generator=generator)
        return weight.to(device=reference.device, dtype=reference.dtype)

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def by_head(tensor: torch.Tensor, count: int) -> torch.Tensor:
        return tensor.reshape(count, head_dim, *tensor.shape[1:])

    added = heads - old
    hidden = config.hidden_size
    with torch.no_grad():
        for layer in language_model.layers:
            attention = layer.self_attn
            q, o = attention.q_proj, attention.o_proj
            attention.q_proj = linear(
                torch.cat([q.weight, fresh(added * head_dim, hidden, q.weight)]),
                None if q.bias is None else torch.cat([q.bias, q.bias.new_zeros(added * head_dim)]))
            for name in ("k_proj", "v_proj"):
                projection = getattr(attention, name)
                weight = by_head(projection.weight, kv)[shared].flatten(0, 1)
                bias = None if projection.bias is None else by_head(projection.bias, kv)[shared].flatten()
                setattr(attention, name, linear(
                    torch.cat([weight, fresh(added * head_dim, hidden, weight)]),
                    None if bias is None else torch.cat([bias, bias.new_zeros(added * head_dim)])))
            attention.o_proj = linear(torch.cat([o.weight, o.weight.new_zeros(hidden, added * head_dim)], 1), o.bias)
            attention.num_key_value_groups = 1
            attention.head_dim = head_dim
    config.num_attention_heads = config.num_key_value_heads = heads
    config.head_dim = head_dim
    return list(range(old, heads))


def added_parameters(model, layers: list[int]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Every parameter of the LLM's decoder `layers` (as `add_language_layers` returns them), each with an
    all-True mask: entries a stage trains at the rate of what it added."""
    language_model = model.model.language_model
    return {p: torch.ones_like(p, dtype=torch.bool) for i in layers for p in language_model.layers[i].parameters()}


def new_head_entries(model, heads: list[int]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """The entries of the widened attention's query heads `heads` (as `widen_attention` returns them): their
    rows of `q_proj`, `k_proj` and `v_proj` (each new query head has its own key/value head), their columns
    of `o_proj`, as a bool mask per parameter of every layer."""
    language_model = model.model.language_model
    config = language_model.config
    total = config.num_attention_heads
    if config.num_key_value_heads != total or any(not 0 <= h < total for h in heads):
        raise ValueError(f"heads {heads} are not query heads of a widened attention ({total} heads, "
                         f"{config.num_key_value_heads} key/value heads)")
    head_dim = config.head_dim
    rows = torch.zeros(total * head_dim, dtype=torch.bool)
    for head in heads:
        rows[head * head_dim : (head + 1) * head_dim] = True
    entries = {}
    for layer in language_model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            projection = getattr(attention, name)
            entries[projection.weight] = rows.to(projection.weight.device)[:, None].expand_as(projection.weight)
            if projection.bias is not None:
                entries[projection.bias] = rows.to(projection.bias.device)
        weight = attention.o_proj.weight
        entries[weight] = rows.to(weight.device)[None, :].expand_as(weight)
    return {p: mask.clone() for p, mask in entries.items()}
