"""Object-Centric Infusion (PixelRefer-Lite, paper §4.3 Algorithm 1, REFERENCE §3).

Two pre-norm cross-attention steps inject context into the aggregated object
tokens: T ← T + Attn(LN_l(T), F_local, F_local), then
T ← T + Attn(LN_g(T), F_global, F_global). Keys and values are the raw vision
features; there is no feed-forward.

Notable:
- Parameters keep `nn.MultiheadAttention`'s layout (`in_proj_weight` (3C, C),
  `in_proj_bias`, `out_proj`) so the release's `fusion_attention_*` weights
  load by renaming, but the forward pass uses those weights directly: keys and
  values of each distinct global image are projected once and then indexed
  per object, instead of being projected again for every object on it.
- All objects go through one batched call; each object attends to its own
  local crop and to the global image picked by `global_index`.
- Padded object tokens are zeroed at the output. They never influence real
  tokens: the queries attend only to vision features, not to each other.
- A step switched off for the ablation (Table 9) has no modules at all, so
  every parameter of the module is used.
- `infusion_reference` is a per-object loop with explicit
  softmax(QKᵀ/√d)V per head, which checks the weight layout as well.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cross_attention(
    attn: nn.MultiheadAttention, queries: Tensor, keys_values: Tensor, index: Tensor | None = None
) -> Tensor:
    """Multi-head cross-attention with `attn`'s weights.

    Args:
        attn: supplies the weights, head count and dropout.
        queries: (N, K, C).
        keys_values: (G, L, C) raw features.
        index: (N,) long, which of the G feature sets each object attends to;
            None when G = N and object n uses set n.

    Returns:
        (N, K, C).
    """
    N, K, C = queries.shape
    h = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = F.linear(queries, w_q, b_q)
    # Project before indexing: each feature set once, however many objects use it.
    k, v = F.linear(keys_values, w_k, b_k), F.linear(keys_values, w_v, b_v)  # (G, L, C)
    if index is not None:
        k, v = k[index], v[index]  # (N, L, C)
    q = q.view(N, K, h, C // h).transpose(1, 2)  # (N, h, K, C/h)
    k = k.view(N, -1, h, C // h).transpose(1, 2)  # (N, h, L, C/h)
    v = v.view(N, -1, h, C // h).transpose(1, 2)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (N, h, K, C/h)
    return attn.out_proj(out.transpose(1, 2).reshape(N, K, C))


class ObjectCentricInfusion(nn.Module):
    """Local-to-object then global-to-object attention on the object tokens.

    Args:
        dim: C, the vision width (OCI runs before the object MLP).
        num_heads: heads of both attention blocks (8 in the release).
        use_local: run the local-to-object step.
        use_global: run the global-to-object step.
    """

    def __init__(self, dim: int, num_heads: int = 8, use_local: bool = True, use_global: bool = True):
        super().__init__()
        self.use_local, self.use_global = use_local, use_global
        self.local_norm = nn.LayerNorm(dim) if use_local else None
        self.local_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True) if use_local else None
        self.global_norm = nn.LayerNorm(dim) if use_global else None
        self.global_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True) if use_global else None

    def forward(
        self,
        tokens: Tensor,
        token_valid: Tensor,
        local_features: Tensor,
        global_features: Tensor,
        global_index: Tensor,
    ) -> Tensor:
        """Infuse local and global context into every object's tokens.

        Args:
            tokens: (N, K, C) aggregated object features.
            token_valid: (N, K) bool, real tokens.
            local_features: (N, L_loc, C), each object's own local crop.
            global_features: (G, L_glob, C), each distinct global image once.
            global_index: (N,) long, the global image of each object.

        Returns:
            (N, K, C) fused tokens, zero where `token_valid` is False.
        """
        N = tokens.shape[0]
        if local_features.shape[0] != N or global_index.shape != (N,):
            raise ValueError(
                f"{N} objects but local_features has {local_features.shape[0]} crops "
                f"and global_index has shape {tuple(global_index.shape)}"
            )
        if self.use_local:
            # differs from the release: it reused the first object's crop for every object of an image.
            tokens = tokens + _cross_attention(self.local_attn, self.local_norm(tokens), local_features)
        if self.use_global:
            tokens = tokens + _cross_attention(
                self.global_attn, self.global_norm(tokens), global_features, global_index
            )
        # differs from the release: padded tokens attended and reached the LLM.
        return tokens * token_valid[..., None]


def _reference_attention(attn: nn.MultiheadAttention, queries: Tensor, keys_values: Tensor) -> Tensor:
    """Explicit per-head softmax(QKᵀ/√d)V for one object: (K, C), (L, C) -> (K, C)."""
    C = queries.shape[-1]
    d = C // attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = queries @ w[:C].T + b[:C]
    k = keys_values @ w[C : 2 * C].T + b[C : 2 * C]
    v = keys_values @ w[2 * C :].T + b[2 * C :]
    heads = []
    for head in range(attn.num_heads):
        part = slice(head * d, (head + 1) * d)
        weights = torch.softmax(q[:, part] @ k[:, part].T / math.sqrt(d), dim=-1)  # (K, L)
        heads.append(weights @ v[:, part])
    return torch.cat(heads, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def infusion_reference(
    module: ObjectCentricInfusion,
    tokens: Tensor,
    token_valid: Tensor,
    local_features: Tensor,
    global_features: Tensor,
    global_index: Tensor,
) -> list[Tensor]:
    """Slow reference: one object at a time, only its valid tokens, explicit attention.

    Arguments as in `ObjectCentricInfusion.forward`.

    Returns:
        Per object, its fused valid tokens (K_i, C).
    """
    outputs = []
    for n in range(tokens.shape[0]):
        t = tokens[n][token_valid[n]]  # (K_i, C)
        if module.use_local:
            t = t + _reference_attention(module.local_attn, module.local_norm(t), local_features[n])
        if module.use_global:
            image = global_features[int(global_index[n])]  # (L_glob, C)
            t = t + _reference_attention(module.global_attn, module.global_norm(t), image)
        outputs.append(t)
    return outputs
