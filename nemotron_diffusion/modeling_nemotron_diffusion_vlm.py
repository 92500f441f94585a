# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The vision-language tri-mode model, in NVIDIA's Nemotron-Labs-Diffusion-VLM layout.

The vision tower is transformers' `PixtralVisionModel` and the projector transformers' `Mistral3MultiModalProjector`
(norm, 2x2 patch merger, linear, GELU, linear); the language model is this package's text backbone. NVIDIA keeps the
tower and the projector inside `encoder`, next to the text layers, so the module tree here is

    encoder.embed_tokens, encoder.layers.*, encoder.norm      text backbone (as the text model)
    encoder.vision_tower.*                                    PixtralVisionModel
    encoder.multi_modal_projector.*                           Mistral3MultiModalProjector
    diffusion_head                                            LM head (untied)

and NVIDIA's weight files load with no renaming. Images enter only through the forward that sees their tokens: the
forward embeds the ids, replaces the rows whose id is `config.image_token_id` with the image features, in order, and
runs the backbone on the result. Every later forward (AR steps, diffusion blocks, drafts, verifies) carries token ids
only and reads the image rows from the cache. `generate()` therefore passes `pixel_values`/`image_sizes` to the
prefill only, in every decoding mode.
"""

import torch
from torch import nn
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.mistral3.configuration_mistral3 import Mistral3Config
from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

from .configuration_nemotron_diffusion_vlm import NemotronDiffusionVLMConfig
from .model_card import should_write as _should_write_card
from .model_card_vlm import write_vlm_model_card
from .modeling_nemotron_diffusion import (
    NemotronDiffusionForCausalLM,
    NemotronDiffusionModel,
    NemotronDiffusionPreTrainedModel,
    _greedy_unless_configured,
)


# Keyword arguments of `generate()` that belong to the prompt's forward only.
IMAGE_INPUTS = ("pixel_values", "image_sizes")
# Module names of the vision side (PEFT's `exclude_modules`, matched against full module names).
VISION_MODULES_PATTERN = r"(.*\.)?encoder\.(vision_tower|multi_modal_projector)(\..*)?"


def _projector_config(config: NemotronDiffusionVLMConfig) -> Mistral3Config:
    """The fields transformers' Mistral3 projector reads, from our flat configuration."""
    # A copy: building a composite config resets the attention backend of the sub-configs it is given.
    return Mistral3Config(
        vision_config=config.vision_config.to_dict(),
        text_config={"model_type": "mistral", "hidden_size": config.hidden_size, "rms_norm_eps": config.rms_norm_eps},
        spatial_merge_size=config.spatial_merge_size,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        vision_feature_layer=config.vision_feature_layer,
    )


def _check_image_inputs(pixel_values, image_sizes, cell: int, patch: int):
    """Validates `pixel_values` [N, C, H, W] and `image_sizes` [N, 2]; returns image_sizes as a list of (h, w)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            "`pixel_values` must be a torch.Tensor [images, channels, height, width], got "
            f"{type(pixel_values).__name__}."
        )
    if pixel_values.ndim != 4 or not pixel_values.is_floating_point():
        raise ValueError(
            f"`pixel_values` must be a 4-D floating-point tensor [images, channels, height, width], got shape "
            f"{tuple(pixel_values.shape)} and dtype {pixel_values.dtype}."
        )
    if image_sizes is None:
        raise ValueError(
            "`pixel_values` was given without `image_sizes`: pass the (height, width) in pixels of each image, as the "
            "image processor returns them."
        )
    sizes = torch.as_tensor(image_sizes).tolist() if not isinstance(image_sizes, list) else image_sizes
    if len(sizes) != pixel_values.shape[0] or not all(len(s) == 2 for s in sizes):
        raise ValueError(
            f"`image_sizes` must hold one (height, width) pair per image of `pixel_values` ({pixel_values.shape[0]} "
            f"images), got {image_sizes!r}."
        )
    height, width = pixel_values.shape[-2:]
    out = []
    for i, (h, w) in enumerate(sizes):
        h, w = int(h), int(w)
        if not (0 < h <= height and 0 < w <= width) or h % cell or w % cell:
            raise ValueError(
                f"`image_sizes[{i}]`=({h}, {w}) is invalid; allowed: positive multiples of {cell} (patch {patch} x "
                f"merge) no larger than the pixel_values size ({height}, {width})."
            )
        out.append((h, w))
    return out


class NemotronDiffusionVLMModel(NemotronDiffusionModel):
    """NVIDIA's `encoder` of the VLM: the text backbone plus `vision_tower` and `multi_modal_projector`.

    `forward` takes the text backbone's arguments plus `pixel_values` and `image_sizes`; with them, the rows of
    `input_ids` equal to `config.image_token_id` get the image features (images in order, each image row-major)."""

    config_class = NemotronDiffusionVLMConfig
    _no_split_modules = ["NemotronDiffusionDecoderLayer", "PixtralAttentionLayer"]

    def __init__(self, config: NemotronDiffusionVLMConfig):
        super().__init__(config)
        self.vision_tower = PixtralVisionModel(config.vision_config)
        self.multi_modal_projector = Mistral3MultiModalProjector(_projector_config(config))
        self.post_init()

    def get_image_features(self, pixel_values, image_sizes, vision_feature_layer=None, **kwargs):
        """Tower + projector. Returns a `BaseModelOutputWithPooling` whose `pooler_output` is a tuple with one
        [cells, hidden_size] tensor per image (as transformers' Mistral3 does), `last_hidden_state` the tower's
        output."""
        patch = self.config.vision_config.patch_size
        cell = patch * self.config.spatial_merge_size
        sizes = _check_image_inputs(pixel_values, image_sizes, cell, patch)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        sizes_tensor = torch.tensor(sizes, dtype=torch.long, device=pixel_values.device)
        last = self.config.vision_config.num_hidden_layers
        if layer in (-1, last):  # the last layer's output: no need to keep every layer's (GBs at 8B size)
            tower = self.vision_tower(pixel_values, image_sizes=sizes_tensor, return_dict=True)
            selected = tower.last_hidden_state
        else:
            tower = self.vision_tower(
                pixel_values, image_sizes=sizes_tensor, output_hidden_states=True, return_dict=True
            )
            selected = tower.hidden_states[layer]
        features = self.multi_modal_projector(selected.squeeze(0), sizes_tensor)
        per_image = [(h // cell) * (w // cell) for h, w in sizes]
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=torch.split(features, per_image),
            hidden_states=tower.hidden_states,
        )

    def embed_with_images(self, input_ids, pixel_values, image_sizes):
        """Token embeddings of `input_ids` with the image-token rows replaced by the image features, in order."""
        if input_ids is None:
            raise ValueError("`pixel_values` needs `input_ids` (the image-token positions), not `inputs_embeds`.")
        embeds = self.embed_tokens(input_ids)
        features = torch.cat(self.get_image_features(pixel_values, image_sizes).pooler_output, dim=0)
        cell = self.config.vision_config.patch_size * self.config.spatial_merge_size
        slots = input_ids == self.config.image_token_id
        found = int(slots.sum())
        if found != features.shape[0]:
            raise ValueError(
                f"`input_ids` hold {found} image tokens (id {self.config.image_token_id}) but `pixel_values` with "
                f"`image_sizes`={[list(s) for s in torch.as_tensor(image_sizes).tolist()]} give {features.shape[0]} "
                f"image features: each image needs one token per {cell}x{cell} cell (the processor expands images)."
            )
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def forward(self, input_ids=None, inputs_embeds=None, pixel_values=None, image_sizes=None, **kwargs):
        if pixel_values is not None:
            inputs_embeds = self.embed_with_images(input_ids, pixel_values, image_sizes)
            input_ids = None
        elif image_sizes is not None:
            raise ValueError("`image_sizes` was given without `pixel_values`.")
        elif input_ids is not None and input_ids.shape[1] > 1 and not torch.compiler.is_compiling():
            # (one-token AR steps are skipped: the markers are never generated, and the check would sync the GPU)
            found = int((input_ids == self.config.image_token_id).sum())
            if found:
                raise ValueError(
                    f"`input_ids` hold {found} image tokens (id {self.config.image_token_id}) but no `pixel_values` "
                    "were given."
                )
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class NemotronDiffusionVLMForConditionalGeneration(NemotronDiffusionForCausalLM):
    """Nemotron-Labs-Diffusion-VLM with its LM head: images + text in, text out, in every `decode_mode`.

    `generate(input_ids, pixel_values=..., image_sizes=...)` runs the vision tower once, in the prompt's forward;
    the image marker ids and the mask id are never generated (they are suppressed in every mode)."""

    config_class = NemotronDiffusionVLMConfig
    _no_split_modules = ["NemotronDiffusionDecoderLayer", "PixtralAttentionLayer"]
    input_modalities = ("image", "text")
    _accepts_image_inputs = True

    def __init__(self, config: NemotronDiffusionVLMConfig):
        NemotronDiffusionPreTrainedModel.__init__(self, config)
        self.encoder = NemotronDiffusionVLMModel(config)
        self.vocab_size = config.vocab_size
        self.mask_token_id = config.mask_token_id
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        _greedy_unless_configured(self.generation_config)

    def get_image_features(self, pixel_values, image_sizes, vision_feature_layer=None, **kwargs):
        return self.encoder.get_image_features(pixel_values, image_sizes, vision_feature_layer, **kwargs)

    def _remote_code_auto_map(self) -> dict:
        return dict(_VLM_AUTO_MAP)

    def load_drafter(self, folder, adapter_name: str = "drafter"):
        """Attaches a PEFT LoRA drafter saved in `folder` (e.g. the text 8B's `linear_spec_lora/`, whose
        `target_modules` is `["o_proj"]`) to the language layers only, and returns the model itself (the LoRA layers
        stay inside it; generate() turns them on for LinearSpec draft forwards only). The vision tower's layers
        have modules of the same names (`attention.o_proj`, ...): they are excluded, so the adapter wraps exactly
        the modules it has weights for."""
        import warnings

        from peft import LoraConfig, PeftModel

        config = LoraConfig.from_pretrained(folder)
        config.exclude_modules = VISION_MODULES_PATTERN
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = PeftModel.from_pretrained(self, folder, adapter_name=adapter_name, config=config)
        return wrapped.base_model.model.eval()

    def save_pretrained(self, save_directory, *args, model_card=None, **kwargs):
        """As the text model's `save_pretrained` (NVIDIA's key names, this package's files as remote code), with an
        `auto_map` for AutoConfig, AutoModel and AutoModelForImageTextToText, and the VLM's README.md model card
        (`model_card_vlm.py`; its snippets need the processor saved in the same folder). model_card: `None` writes
        it unless the folder has a README.md this package did not write; `True` always; a dict with `license`,
        `base_model`, `tags`; `False` none."""
        if not (model_card is None or isinstance(model_card, (bool, dict))):
            raise ValueError(
                f"save_pretrained: `model_card`={model_card!r} is invalid; allowed: None, True, False, a dict."
            )
        output = super().save_pretrained(save_directory, *args, model_card=False, **kwargs)
        write_card = model_card is not False and kwargs.get("is_main_process", True) and not kwargs.get("push_to_hub")
        if write_card and (model_card is not None or _should_write_card(save_directory)):
            fields = model_card if isinstance(model_card, dict) else {}
            write_vlm_model_card(save_directory, name_or_path=self.name_or_path, **fields)
        return output

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ):
        r"""The text model's forward (see [`NemotronDiffusionForCausalLM.forward`]) plus `pixel_values`
        [images, 3, H, W] and `image_sizes` [images, 2] (height, width in pixels), spliced at the image tokens.
        Images are read in order: the first image fills the first image tokens of the first row, and so on."""
        if labels is not None and pixel_values is not None:
            raise ValueError(
                "Training forwards (with `labels`) do not take `pixel_values`: not implemented for images."
            )
        if pixel_values is not None or image_sizes is not None:
            kwargs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            cache=cache,
            **kwargs,
        )

    # ---- generation ----------------------------------------------------------------------------------------
    def never_generated_token_ids(self) -> list[int]:
        """Ids suppressed in every decoding mode: the four image markers and the mask token."""
        return sorted({*self.config.image_marker_ids, self.config.mask_token_id})

    def _get_logits_processor(self, *args, **kwargs):
        processors = super()._get_logits_processor(*args, **kwargs)
        device = kwargs.get("device", self.device)
        processors.insert(0, SuppressTokensLogitsProcessor(self.never_generated_token_ids(), device=device))
        return processors

    def prepare_inputs_for_generation(self, *args, pixel_values=None, image_sizes=None, **kwargs):
        """Images go to the first forward of a generation (the prefill) only, as in transformers' VLMs."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        first = kwargs.get("is_first_iteration")
        if first is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            first = cache is None or cache.get_seq_length() == 0
        if first or not kwargs.get("use_cache", True):
            if pixel_values is not None:
                inputs["pixel_values"], inputs["image_sizes"] = pixel_values, image_sizes
        else:
            inputs.pop("pixel_values", None)
            inputs.pop("image_sizes", None)
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """`num_return_sequences` > 1: transformers repeats every tensor along dim 0, which for `pixel_values`
        (one entry per image, not per row) is right only with one image per row. Here each row's own images are
        repeated with the row, in order."""
        pixel_values, image_sizes = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_sizes", None)
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            order = self._images_per_row(input_ids, image_sizes)
            index = [i for row in order for _ in range(expand_size) for i in row]
            index = torch.tensor(index, dtype=torch.long, device=pixel_values.device)
            pixel_values = pixel_values[index]
            image_sizes = torch.as_tensor(image_sizes, device=pixel_values.device)[index]
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        if image_sizes is not None:
            model_kwargs["image_sizes"] = image_sizes
        return expanded_ids, model_kwargs

    def _images_per_row(self, input_ids, image_sizes):
        """The indices of the images each row of `input_ids` holds, from its number of image tokens."""
        cell = self.config.vision_config.patch_size * self.config.spatial_merge_size
        sizes = torch.as_tensor(image_sizes).tolist() if image_sizes is not None else []
        features = [(int(h) // cell) * (int(w) // cell) for h, w in sizes]
        rows, image = [], 0
        counts = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        for count in counts:
            mine = []
            while count > 0 and image < len(features):
                mine.append(image)
                count -= features[image]
                image += 1
            if count != 0:
                break
            rows.append(mine)
        if len(rows) != input_ids.shape[0] or image != len(features):
            raise ValueError(
                f"The image tokens of `input_ids` (per row: {counts}) "
                f"do not split into whole images of `image_sizes`={sizes} (features per image: {features})."
            )
        return rows

    def _prefill_inputs(self, model_kwargs):
        """The block decoding loops pass these to the prompt's forward only."""
        return {name: model_kwargs[name] for name in IMAGE_INPUTS if model_kwargs.get(name) is not None}


_VLM_AUTO_MAP = {
    "AutoConfig": f"configuration_nemotron_diffusion_vlm.{NemotronDiffusionVLMConfig.__name__}",
    "AutoModel": f"modeling_nemotron_diffusion_vlm.{NemotronDiffusionVLMForConditionalGeneration.__name__}",
    "AutoModelForImageTextToText": (
        f"modeling_nemotron_diffusion_vlm.{NemotronDiffusionVLMForConditionalGeneration.__name__}"
    ),
}
# `save_pretrained` copies the files behind these classes (and their single-dot relative imports) next to the weights.
NemotronDiffusionVLMConfig.register_for_auto_class()
NemotronDiffusionVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

# NVIDIA's config.json names the architecture `NemotronLabsDiffusionVLMModel` (loaded with `AutoModel`): the full
# model with the LM head.
NemotronLabsDiffusionVLMModel = NemotronDiffusionVLMForConditionalGeneration

__all__ = [
    "NemotronDiffusionVLMModel",
    "NemotronDiffusionVLMForConditionalGeneration",
    "NemotronLabsDiffusionVLMModel",
]
