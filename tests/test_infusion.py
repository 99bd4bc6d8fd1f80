"""Object-Centric Infusion against its per-object reference and hand checks."""

import pytest
import torch
from torch.testing import assert_close

from pixelrefer.modeling.infusion import ObjectCentricInfusion, _cross_attention, infusion_reference

N, K, C, HEADS, L_LOC, G, L_GLOB = 5, 4, 16, 4, 6, 2, 9
TOL = dict(atol=1e-5, rtol=1e-5)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(N, K, C, generator=g)
    valid = torch.ones(N, K, dtype=torch.bool)
    valid[1, 2:] = False
    valid[3, 1:] = False
    local = torch.randn(N, L_LOC, C, generator=g)
    global_ = torch.randn(G, L_GLOB, C, generator=g)
    index = torch.tensor([0, 0, 1, 0, 1])
    return tokens, valid, local, global_, index


def module(**flags):
    torch.manual_seed(0)
    oci = ObjectCentricInfusion(C, HEADS, **flags)
    with torch.no_grad():  # non-trivial norms and biases, so the reference checks them too
        for name, parameter in oci.named_parameters():
            if "norm" in name or "bias" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return oci


@pytest.mark.parametrize(
    "flags", [{}, {"use_local": False}, {"use_global": False}], ids=["both", "global_only", "local_only"]
)
def test_batched_matches_reference(flags):
    oci = module(**flags)
    tokens, valid, local, global_, index = inputs()
    out = oci(tokens, valid, local, global_, index)
    expected = infusion_reference(oci, tokens, valid, local, global_, index)
    assert out.shape == (N, K, C)
    for n in range(N):
        assert_close(out[n][valid[n]], expected[n], **TOL, msg=lambda m, n=n: f"object {n}: {m}")


def test_padded_tokens_are_zero():
    tokens, valid, local, global_, index = inputs()
    out = module()(tokens, valid, local, global_, index)
    assert not out[~valid].any() and out[valid].abs().min() > 0


def test_weights_follow_multihead_attention_layout():
    oci = module()
    tokens, _, local, _, _ = inputs()
    expected, _ = oci.local_attn(tokens, local, local, need_weights=False)
    assert_close(_cross_attention(oci.local_attn, tokens, local), expected, **TOL)
    assert oci.state_dict()["global_attn.in_proj_weight"].shape == (3 * C, C)


def test_each_object_uses_its_own_local_crop():
    oci = module()
    tokens, valid, local, global_, index = inputs()
    out = oci(tokens, valid, local, global_, index)
    perturbed = local.clone()
    perturbed[1] += 1.0
    again = oci(tokens, valid, perturbed, global_, index)
    assert_close(again[0], out[0], atol=0, rtol=0)
    assert not torch.allclose(again[1], out[1])


def test_each_object_uses_its_own_global_image():
    oci = module()
    tokens, valid, local, global_, index = inputs()
    out = oci(tokens, valid, local, global_, index)
    perturbed = global_.clone()
    perturbed[1] += 1.0
    again = oci(tokens, valid, local, perturbed, index)
    on_image_0 = index == 0
    assert_close(again[on_image_0], out[on_image_0], atol=0, rtol=0)
    assert not torch.allclose(again[~on_image_0], out[~on_image_0])


def test_disabled_steps_are_skipped():
    tokens, valid, local, global_, index = inputs()
    neither = ObjectCentricInfusion(C, HEADS, use_local=False, use_global=False)
    assert len(list(neither.parameters())) == 0
    assert_close(neither(tokens, valid, local, global_, index), tokens * valid[..., None], atol=0, rtol=0)
    local_only = module(use_global=False)
    out = local_only(tokens, valid, local, global_, index)
    assert_close(local_only(tokens, valid, local, global_ + 1.0, index), out, atol=0, rtol=0)
    global_only = module(use_local=False)
    out = global_only(tokens, valid, local, global_, index)
    assert_close(global_only(tokens, valid, local + 1.0, global_, index), out, atol=0, rtol=0)


def test_gradients_reach_every_parameter():
    oci = module()
    tokens, valid, local, global_, index = inputs()
    tokens.requires_grad_(True)
    oci(tokens, valid, local, global_, index).square().sum().backward()
    for name, parameter in oci.named_parameters():
        # The key bias only shifts every score of a query equally, so softmax
        # ignores it and its gradient is zero; the rest of in_proj_bias is not.
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert not tokens.grad[~valid].any() and tokens.grad[valid].abs().sum() > 0


def test_mismatched_local_features_are_rejected():
    tokens, valid, local, global_, index = inputs()
    with pytest.raises(ValueError, match="local_features"):
        module()(tokens, valid, local[:-1], global_, index)
