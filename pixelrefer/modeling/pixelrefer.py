"""PixelRefer (Vision-Object) and PixelRefer-Lite (Object-Only) on transformers' VideoLLaMA3.

Notable:
- Subclasses `VideoLlama3Model` / `VideoLlama3ForConditionalGeneration`: the
  SigLIP-NaViT encoder, projector and Qwen2 LLM are transformers' own; this
  file adds the object path and nothing else.
- Every crop of every object (and, in Lite, every local crop and each distinct
  global image) goes through the vision encoder in ONE packed call.
- Object tokens enter the `<REGION>` slots with `masked_scatter`; the slot
  count is checked against the token count with a clear error.
- Position ids follow the attention mask (cumulative sum), so padding and
  masked-out object slots never shift positions differently in training and
  in generation.
- Lite never puts global vision tokens in the sequence: the global image only
  reaches the LLM through Object-Centric Infusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import VideoLlama3ForConditionalGeneration, VideoLlama3Model
from transformers import initialization as init
from transformers.models.video_llama_3.modeling_video_llama_3 import (
    VideoLlama3CausalLMOutputWithPast,
    VideoLlama3ModelOutputWithPast,
    VideoLlama3PreTrainedModel,
)
from transformers.utils import ModelOutput

from pixelrefer.config import PixelReferConfig
from pixelrefer.modeling.infusion import ObjectCentricInfusion
from pixelrefer.modeling.object_tokenizer import AggregatedObjects, MaskPooling, ObjectTokenizer
from pixelrefer.modeling.time_embedding import FrameTimeEmbedding

REGION_INPUTS = (
    "region_pixel_values",
    "region_grid_thw",
    "region_cell_mask",
    "region_cell_positions",
    "region_token_valid",
    "region_local_pixel_values",
    "region_global_pixel_values",
    "region_global_index",
    "region_frame_index",
)


@dataclass
class ObjectFeatures(ModelOutput):
    """Object tokens of a batch and what produced them.

    Attributes:
        tokens: (N, K, D) tokens for the LLM, one row per (object, frame) unit.
        valid: (N, K) bool, False for padding of objects with fewer than K cells.
        aggregated: SAOT intermediates (cells before and centroids after k-means).
        infused: (N, K, C) features after Object-Centric Infusion (Lite only).
    """

    tokens: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    aggregated: AggregatedObjects | None = None
    infused: torch.Tensor | None = None


@dataclass
class PixelReferModelOutputWithPast(VideoLlama3ModelOutputWithPast):
    object_outputs: ObjectFeatures | None = None


@dataclass
class PixelReferCausalLMOutputWithPast(VideoLlama3CausalLMOutputWithPast):
    object_outputs: ObjectFeatures | None = None


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L_total) 0/1 mask → (B, length) position ids of the last `length` tokens."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]


class PixelReferModel(VideoLlama3Model):
    config_class = PixelReferConfig
    config: PixelReferConfig

    def __init__(self, config: PixelReferConfig):
        super().__init__(config)
        vision_dim, llm_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        if config.object_tokenizer == "mask_pooling":
            self.object_tokenizer = MaskPooling(vision_dim, llm_dim, use_position_encoding=config.use_position_encoding)
        else:
            self.object_tokenizer = ObjectTokenizer(
                vision_dim,
                llm_dim,
                config.num_object_tokens,
                kmeans_iterations=config.kmeans_iterations,
                kmeans_seed=config.kmeans_seed,
                use_position_encoding=config.use_position_encoding,
            )
        if config.object_time_embedding:
            self.object_tokenizer.time_embedding = FrameTimeEmbedding(llm_dim, config.object_time_frames)
        self.infusion = None
        if config.is_lite:
            self.infusion = ObjectCentricInfusion(
                vision_dim, config.oci_num_heads, use_local=config.oci_use_local, use_global=config.oci_use_global
            )
        self.post_init()
        if config.freeze_vision_encoder:
            self.vision_model.requires_grad_(False)
        if config.is_lite:
            # Lite sends no global vision tokens to the LLM, so the image projector is unused; it stays in the
            # state dict so VideoLLaMA3 and release checkpoints load unchanged.
            self.projector.requires_grad_(False)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.position_init_std
        # VideoLlama3Model.__init__ initialises before the object tokenizer exists; PixelReferModel's own
        # post_init reaches it.
        if std is not None and module is getattr(getattr(self, "object_tokenizer", None), "position_proj", None):
            init.normal_(module.weight, mean=0.0, std=std)
        time_embedding = getattr(getattr(self, "object_tokenizer", None), "time_embedding", None)
        if time_embedding is not None and module is time_embedding.proj:
            init.zeros_(module.weight)  # switching the embedding on changes nothing until it trains

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Packed crops (P, 3·p·p) with per-crop (1, h, w) grids → (P, C) features, no token merging."""
        merge_sizes = torch.ones(grid_thw.shape[0], dtype=torch.long, device=grid_thw.device)
        trainable = any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.vision_model(pixel_values=pixel_values, grid_thw=grid_thw, merge_sizes=merge_sizes).last_hidden_state

    def get_object_features(
        self,
        region_pixel_values: torch.Tensor,
        region_grid_thw: torch.Tensor,
        region_cell_mask: torch.Tensor,
        region_cell_positions: torch.Tensor,
        region_local_pixel_values: torch.Tensor | None = None,
        region_global_pixel_values: torch.Tensor | None = None,
        region_global_index: torch.Tensor | None = None,
        region_frame_index: torch.Tensor | None = None,
        **_,
    ) -> ObjectFeatures:
        """All object units of a batch → (N, K, D) tokens, with one vision-encoder call."""
        cfg = self.config
        patch = cfg.patch_size
        num_objects = region_grid_thw.shape[0]
        pixels, grids = [region_pixel_values], [region_grid_thw]
        if cfg.is_lite:
            if region_local_pixel_values is None or region_global_pixel_values is None or region_global_index is None:
                raise ValueError("object_only (Lite) needs region_local_pixel_values, region_global_pixel_values "
                                 "and region_global_index: build inputs with a Lite processor")
            local_side, global_side = cfg.oci_local_size // patch, cfg.oci_global_size // patch
            num_global = region_global_pixel_values.shape[0] // global_side**2
            pixels += [region_local_pixel_values, region_global_pixel_values]
            grids += [
                region_grid_thw.new_tensor([1, local_side, local_side]).expand(num_objects, 3),
                region_grid_thw.new_tensor([1, global_side, global_side]).expand(num_global, 3),
            ]
        features = self.encode_vision(torch.cat(pixels), torch.cat(grids))  # (P_all, C)
        num_cells = region_pixel_values.shape[0]
        cell_features = features[:num_cells]
        aggregated = self.object_tokenizer.aggregate(
            cell_features,
            region_cell_positions.to(cell_features.dtype),
            region_cell_mask.bool(),
            region_grid_thw.prod(-1),
        )
        object_features, infused = aggregated.features, None
        if cfg.is_lite:
            vision_dim = features.shape[-1]
            local_end = num_cells + num_objects * local_side**2
            local = features[num_cells:local_end].view(num_objects, local_side**2, vision_dim)  # (N, L_loc, C)
            global_ = features[local_end:].view(num_global, global_side**2, vision_dim)  # (G, L_glob, C)
            infused = self.infusion(object_features, aggregated.valid, local, global_, region_global_index)
            object_features = infused
        tokens = self.object_tokenizer.project(object_features, region_frame_index) * aggregated.valid[..., None]
        return ObjectFeatures(tokens=tokens, valid=aggregated.valid, aggregated=aggregated, infused=infused)

    def scatter_object_tokens(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, objects: ObjectFeatures
    ) -> torch.Tensor:
        """Write object tokens into the `<REGION>` slots of `inputs_embeds` (B, L, D), in order."""
        slots = input_ids == self.config.region_token_id  # (B, L)
        if self.config.release_variable_token_count:
            tokens = objects.tokens[objects.valid]  # (M, D): only real tokens have slots
        else:
            tokens = objects.tokens.flatten(0, 1)  # (N·K, D): padded slots are masked out of attention
        num_slots = int(slots.sum())
        if num_slots != tokens.shape[0]:
            raise ValueError(
                f"object tokens and <REGION> slots do not match: {tokens.shape[0]} tokens "
                f"({objects.tokens.shape[0]} object units × {objects.tokens.shape[1]}) but {num_slots} slots in input_ids"
            )
        tokens = tokens.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(slots.unsqueeze(-1), tokens)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        region_pixel_values: torch.Tensor | None = None,
        region_token_valid: torch.Tensor | None = None,
        **kwargs,
    ) -> PixelReferModelOutputWithPast:
        region_kwargs = {k: kwargs.pop(k) for k in REGION_INPUTS if k in kwargs}
        if self.config.is_lite and (kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None):
            raise ValueError("object_only (Lite) takes no global vision tokens: pixel_values must not be given")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        objects = None
        if region_pixel_values is not None:
            if input_ids is None:
                raise ValueError("object tokens need input_ids to locate the <REGION> slots")
            objects = self.get_object_features(region_pixel_values, **region_kwargs)
            if region_token_valid is not None and not torch.equal(region_token_valid.to(objects.valid.device), objects.valid):
                raise ValueError("the processor and the model disagree on which object tokens are real: "
                                 "were they built from the same config (num_object_tokens, object_tokenizer)?")
            inputs_embeds = self.scatter_object_tokens(input_ids, inputs_embeds, objects)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return PixelReferModelOutputWithPast(**outputs, object_outputs=objects)


class PixelReferForConditionalGeneration(VideoLlama3ForConditionalGeneration):
    """PixelRefer / PixelRefer-Lite with a language-model head; `config.framework` picks which."""

    config_class = PixelReferConfig
    config: PixelReferConfig

    def __init__(self, config: PixelReferConfig):
        VideoLlama3PreTrainedModel.__init__(self, config)
        self.model = PixelReferModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_object_features(self, **region_inputs) -> ObjectFeatures:
        return self.model.get_object_features(**region_inputs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_merge_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        video_merge_sizes: torch.LongTensor | None = None,
        video_compression_mask: torch.BoolTensor | None = None,
        region_pixel_values: torch.Tensor | None = None,
        region_grid_thw: torch.LongTensor | None = None,
        region_cell_mask: torch.BoolTensor | None = None,
        region_cell_positions: torch.Tensor | None = None,
        region_token_valid: torch.BoolTensor | None = None,
        region_local_pixel_values: torch.Tensor | None = None,
        region_global_pixel_values: torch.Tensor | None = None,
        region_global_index: torch.LongTensor | None = None,
        region_frame_index: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> PixelReferCausalLMOutputWithPast:
        """VideoLLaMA3's inputs plus the processor's `region_*` tensors.

        region_pixel_values: (P, 3·p·p) packed crop patches of all object units.
        region_grid_thw: (N, 3) crop grid (1, h, w) of each unit.
        region_cell_mask: (P,) foreground cells; region_cell_positions: (P, 2) Eq. 4 (x, y).
        region_token_valid: (N, K) real tokens per unit, checked against the model's own count.
        region_local_pixel_values / region_global_pixel_values / region_global_index: Lite's OCI views.
        region_frame_index: (N,) each unit's frame in its clip (-1 for an image), for `object_time_embedding`.
        """
        named = dict(
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_merge_sizes=image_merge_sizes,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            video_merge_sizes=video_merge_sizes,
            video_compression_mask=video_compression_mask,
            region_pixel_values=region_pixel_values,
            region_grid_thw=region_grid_thw,
            region_cell_mask=region_cell_mask,
            region_cell_positions=region_cell_positions,
            region_token_valid=region_token_valid,
            region_local_pixel_values=region_local_pixel_values,
            region_global_pixel_values=region_global_pixel_values,
            region_global_index=region_global_index,
            region_frame_index=region_frame_index,
        )
        kwargs.update({k: v for k, v in named.items() if v is not None})
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs["return_dict"] = True
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden_states[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return PixelReferCausalLMOutputWithPast(loss=loss, logits=logits, **rest)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        """Object and vision inputs are consumed by the first (prefill) step only."""
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration:
            for key in (*REGION_INPUTS, "pixel_values", "pixel_values_videos"):
                model_inputs.pop(key, None)
        return model_inputs
