"""MaskPropagator on tiny random SAM 2 models of both backends: shapes, object ids, frame alignment, memory, errors.

`write_tiny_transformers_sam2` and `write_tiny_sam2_package` are reused by the end-to-end and notebook tests.
"""

import sys

import numpy as np
import pytest
import torch

from pixelrefer import InputError
from pixelrefer.propagation import MaskPropagator, ObjectPrompt, forget_distant_frames
from pixelrefer.video import open_video

SIZE = 64  # the tiny models' square input (1024 in the released ones)
H, W = 48, 80  # not square, so a resize that forgot the aspect ratio would show

# The sam2 package's model for the tests: the layout of its sam2.1_hiera_t.yaml with every width shrunk.
TINY_SAM2_YAML = """
model:
  _target_: sam2.modeling.sam2_base.SAM2Base
  image_encoder:
    _target_: sam2.modeling.backbones.image_encoder.ImageEncoder
    scalp: 1
    trunk: {{_target_: sam2.modeling.backbones.hieradet.Hiera, embed_dim: 8, num_heads: 1, stages: [1, 1, 2, 1],
             global_att_blocks: [3], window_pos_embed_bkg_spatial_size: [4, 4], window_spec: [4, 4, 4, 2]}}
    neck:
      _target_: sam2.modeling.backbones.image_encoder.FpnNeck
      position_encoding: {{_target_: sam2.modeling.position_encoding.PositionEmbeddingSine, num_pos_feats: 64,
                           normalize: true, scale: null, temperature: 10000}}
      d_model: 64
      backbone_channel_list: [64, 32, 16, 8]
      fpn_top_down_levels: [2, 3]
      fpn_interp_model: nearest
  memory_attention:
    _target_: sam2.modeling.memory_attention.MemoryAttention
    d_model: 64
    pos_enc_at_input: true
    num_layers: 1
    layer:
      _target_: sam2.modeling.memory_attention.MemoryAttentionLayer
      activation: relu
      dim_feedforward: 64
      dropout: 0.1
      pos_enc_at_attn: false
      d_model: 64
      pos_enc_at_cross_attn_keys: true
      pos_enc_at_cross_attn_queries: false
      self_attention: {{_target_: sam2.modeling.sam.transformer.RoPEAttention, rope_theta: 10000.0,
                        feat_sizes: [{grid}, {grid}], embedding_dim: 64, num_heads: 1, downsample_rate: 1,
                        dropout: 0.1}}
      cross_attention: {{_target_: sam2.modeling.sam.transformer.RoPEAttention, rope_theta: 10000.0,
                         feat_sizes: [{grid}, {grid}], rope_k_repeat: true, embedding_dim: 64, num_heads: 1,
                         downsample_rate: 1, dropout: 0.1, kv_in_dim: 32}}
  memory_encoder:
    _target_: sam2.modeling.memory_encoder.MemoryEncoder
    out_dim: 32
    in_dim: 64
    position_encoding: {{_target_: sam2.modeling.position_encoding.PositionEmbeddingSine, num_pos_feats: 32,
                         normalize: true, scale: null, temperature: 10000}}
    mask_downsampler: {{_target_: sam2.modeling.memory_encoder.MaskDownSampler, kernel_size: 3, stride: 2,
                        padding: 1, embed_dim: 64}}
    fuser:
      _target_: sam2.modeling.memory_encoder.Fuser
      num_layers: 1
      layer: {{_target_: sam2.modeling.memory_encoder.CXBlock, dim: 64, kernel_size: 7, padding: 3,
               layer_scale_init_value: 1e-6, use_dwconv: true}}
  num_maskmem: 3
  max_obj_ptrs_in_encoder: 4
  image_size: {size}
  sigmoid_scale_for_mem_enc: 20.0
  sigmoid_bias_for_mem_enc: -10.0
  use_mask_input_as_output_without_sam: true
  directly_add_no_mem_embed: true
  no_obj_embed_spatial: true
  use_high_res_features_in_sam: true
  multimask_output_in_sam: true
  iou_prediction_use_sigmoid: true
  use_obj_ptrs_in_encoder: true
  add_tpos_enc_to_obj_ptrs: true
  proj_tpos_enc_in_obj_ptrs: true
  use_signed_tpos_enc_to_obj_ptrs: true
  only_obj_ptrs_in_the_past_for_eval: true
  pred_obj_scores: true
  pred_obj_scores_mlp: true
  fixed_no_obj_ptr: true
  multimask_output_for_tracking: true
  use_multimask_token_for_obj_ptr: true
  multimask_min_pt_num: 0
  multimask_max_pt_num: 1
  use_mlp_for_obj_ptr_proj: true
  compile_image_encoder: false
"""


def write_tiny_transformers_sam2(folder, size: int = SIZE):
    """A 1 M-parameter random `Sam2VideoModel` (`size`-px input, 3 memories, 4 object pointers) saved to `folder`.

    Widths follow transformers' own Sam2 test config; the FPN width stays a multiple of the 64 memory channels
    (the memory attention's key width is fixed at 64) and twice it (at equal widths the object pointers are
    not split and their concatenation fails). The object-score head is biased so that the random model sees
    the object on every frame instead of masking everything out.
    """
    from transformers import Sam2VideoConfig, Sam2VideoModel
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    backbone = Sam2HieraDetConfig(hidden_size=8, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1],
                                  embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
                                  window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=128,
                              backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2])
    config = Sam2VideoConfig(
        vision_config=vision, image_size=size, num_maskmem=3, max_object_pointers_in_encoder=4,
        prompt_encoder_config=dict(hidden_size=128, image_size=size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=32,
        memory_attention_rope_feat_sizes=[size // 16] * 2, memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=64)
    torch.manual_seed(0)
    model = Sam2VideoModel(config).eval()
    with torch.no_grad():
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    model.save_pretrained(folder)
    return folder


def write_tiny_sam2_package(folder, size: int = SIZE):
    """The tiny sam2-package model: (checkpoint .pt in sam2's {"model": state_dict} layout, yaml config)."""
    pytest.importorskip("sam2")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny_sam2.yaml"
    config.write_text(TINY_SAM2_YAML.format(size=size, grid=size // 16))
    torch.manual_seed(0)
    model = instantiate(OmegaConf.load(config).model, _recursive_=True)
    torch.save({"model": model.state_dict()}, folder / "tiny_sam2.pt")
    return folder / "tiny_sam2.pt", config


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread: on a shared 2-core machine OpenMP barriers made these tiny models ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam2")
    found = {"transformers": (write_tiny_transformers_sam2(root / "transformers"), None)}
    try:
        found["sam2"] = write_tiny_sam2_package(root / "package")
    except pytest.skip.Exception:
        pass
    return found


@pytest.fixture(params=["transformers", "sam2"])
def load(request, checkpoints, single_thread):
    if request.param not in checkpoints:
        pytest.skip("the sam2 package is not installed (make setup installs it)")
    path, config = checkpoints[request.param]
    return lambda **kwargs: MaskPropagator.from_pretrained(path, backend=request.param, config=config,
                                                           progress=False, **kwargs)


def video(count=10):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(count)]


def box_mask(x0=20, y0=10, x1=50, y1=30):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_masks_have_one_row_per_object_and_one_column_per_kept_frame(load):
    prompts = {5: ObjectPrompt(frame=0, points=[(30, 20)]), 9: ObjectPrompt(frame=3, box=(10, 5, 60, 40)),
               2: ObjectPrompt(frame=3, mask=box_mask())}
    result = load().propagate(video(), prompts, frames=[9, 0, 2, 3, 5, 7], keep=[3, 2, 9])
    assert result.object_ids == [5, 9, 2] and result.frame_indices == [2, 3, 9]
    assert result.masks.shape == (3, 3, H, W) and result.masks.dtype == bool
    prompted = result.masks[2, 1]  # object 2 on frame 3, where its mask was given
    iou = (prompted & box_mask()).sum() / (prompted | box_mask()).sum()
    assert iou > 0.95, f"a mask prompt comes back on its own frame (IoU {iou:.3f})"
    assert result.masks[:2].any(), "the random models predict something for the click and the box"
    per_object = result.per_object()
    assert 3 in per_object[2] and all(set(m) <= {2, 3, 9} for m in per_object)
    np.testing.assert_array_equal(per_object[2][3], prompted)


def test_tracking_runs_forward_from_the_prompt_then_backward(load):
    prompts = [ObjectPrompt(frame=4, mask=box_mask()),
               ObjectPrompt(frame=0, points=[(10, 10), (70, 40)], labels=[1, 0])]
    with open_video(video(8)) as reader:
        order = [(t, ids) for t, ids, masks in load().iter_masks(reader, prompts, frames=[0, 2, 4, 6, 7])]
    assert order == [(0, [1]), (2, [1]), (4, [1]), (6, [1]), (7, [1]),
                     (4, [0]), (6, [0]), (7, [0]), (2, [0]), (0, [0])]


def test_bounded_memory_changes_no_mask_and_stays_flat(load):
    frames = video(14)
    prompts = {0: ObjectPrompt(frame=6, mask=box_mask()), 1: ObjectPrompt(frame=6, points=[(60, 30)])}
    unbounded, bounded = load(bounded_memory=False), load()
    stored = []
    run = bounded.backend.run

    def recording_run(state, start, reverse):
        for item in run(state, start, reverse):
            yield item
            stored.append(max(len(m["non_cond_frame_outputs"]) for m in bounded.backend.memory(state).values()))

    bounded.backend.run = recording_run
    expected = unbounded.propagate(frames, prompts).masks
    np.testing.assert_array_equal(bounded.propagate(frames, prompts).masks, expected)
    assert 0.0 < expected.mean() < 1.0, "the comparison is between non-trivial masks"
    assert bounded.backend.window == 4 and max(stored) <= bounded.backend.window
    assert len(stored) == 8 + 7  # frames 6..13 forward, 6..0 backward (the prompt frame in both passes)


def test_forget_distant_frames_keeps_the_window_behind_in_tracking_order():
    memory = {0: {"cond_frame_outputs": {5: "prompt"}, "non_cond_frame_outputs": dict.fromkeys(range(12))}}
    forget_distant_frames(memory, position=9, reverse=False, window=3)
    assert sorted(memory[0]["non_cond_frame_outputs"]) == [7, 8, 9, 10, 11]
    forget_distant_frames(memory, position=7, reverse=True, window=3)
    assert sorted(memory[0]["non_cond_frame_outputs"]) == [7, 8, 9]
    assert memory[0]["cond_frame_outputs"] == {5: "prompt"}


def test_no_torchvision_needed(load):
    load().propagate(video(3), [ObjectPrompt(frame=1, box=(5, 5, 40, 30))])
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("prompt, message", [
    (ObjectPrompt(frame=1, points=[(5, 5)]), "object 0, frame 1: the prompt's frame is not among the tracked frames"),
    (ObjectPrompt(frame=0), "object 0, frame 0: the prompt has no points, box or mask"),
    (ObjectPrompt(frame=0, points=[(81, 5)]),
     r"point \(x=81.0, y=5.0\) lies outside the frame \(height 48, width 80\)"),
    (ObjectPrompt(frame=0, points=[(5, 5)], labels=[1, 1]), "labels must be one 0 or 1 per point"),
    (ObjectPrompt(frame=0, box=(40, 5, 10, 30)), "box must be .* with x0 < x1"),
    (ObjectPrompt(frame=0, mask=np.ones((H, W + 1), bool)), r"mask is \(48, 81\), the video is 48x80"),
    (ObjectPrompt(frame=0, mask=np.zeros((H, W), bool)), "mask is empty"),
    (ObjectPrompt(frame=0, mask=box_mask(), points=[(5, 5)]), "give a mask or points/box, not both"),
])
def test_bad_prompts_name_object_and_frame(checkpoints, single_thread, prompt, message):
    propagator = MaskPropagator.from_pretrained(checkpoints["transformers"][0], progress=False)
    with pytest.raises(InputError, match=message):
        propagator.propagate(video(4), [prompt], frames=[0, 2, 3])


def test_bad_frames_and_checkpoints_raise_input_errors(checkpoints, single_thread, tmp_path):
    propagator = MaskPropagator.from_pretrained(checkpoints["transformers"][0], progress=False)
    prompt = [ObjectPrompt(frame=0, points=[(5, 5)])]
    with pytest.raises(InputError, match=r"frame index 4 is out of range \(video frames in memory has 4 frames\)"):
        propagator.propagate(video(4), prompt, frames=[0, 4])
    with pytest.raises(InputError, match=r"frames \[3\] are kept but not tracked"):
        propagator.propagate(video(4), prompt, frames=[0, 1], keep=[3])
    with pytest.raises(InputError, match="no object prompts"):
        propagator.propagate(video(4), [])
    with pytest.raises(InputError, match="has no config.json .*nothing is downloaded"):
        MaskPropagator.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(InputError, match="needs the yaml config"):
        MaskPropagator.from_pretrained(tmp_path / "x.pt", backend="sam2")


def test_sam2_checkpoint_that_does_not_fit_its_config_is_rejected(checkpoints, tmp_path):
    if "sam2" not in checkpoints:
        pytest.skip("the sam2 package is not installed")
    checkpoint, config = checkpoints["sam2"]
    with pytest.raises(InputError, match="is neither a file nor a config shipped with the sam2 package"):
        MaskPropagator.from_pretrained(checkpoint, backend="sam2", config=tmp_path / "missing.yaml")
    weights = torch.load(checkpoint, weights_only=True)["model"]
    weights.pop("no_mem_embed")
    torch.save({"model": weights}, tmp_path / "partial.pt")
    with pytest.raises(InputError, match="partial.pt does not match config"):
        MaskPropagator.from_pretrained(tmp_path / "partial.pt", backend="sam2", config=config)
