# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the vision-language tri-mode model (NVIDIA's Nemotron-Labs-Diffusion-VLM layout).

NVIDIA's VLM `config.json` keeps the text fields flat at its root, exactly as the text model does, and adds a nested
Pixtral `vision_config` plus a few projector fields. This class is therefore the text configuration plus those
fields; every value the modeling code relies on is validated, and a bad value raises a `ValueError` naming the field.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.pixtral.configuration_pixtral import PixtralVisionConfig

from .configuration_nemotron_diffusion import NemotronDiffusionConfig


# The vision tower of the released VLM (a Pixtral encoder at Ministral3-8B size, with a SiLU-gated MLP). Used for
# every field a `vision_config` leaves out, so a partial dict still describes NVIDIA's tower.
NVIDIA_VISION_DEFAULTS = {
    "model_type": "pixtral",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 1540,
    "patch_size": 14,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "initializer_range": 0.02,
}

# Ids of the image markers in NVIDIA's tokenizer: <|image_start|>, <|image_pad|>, <|image_break|>, <|image_end|>.
DLM_TYPES = ("llada",)


@strict
class NemotronDiffusionVLMConfig(NemotronDiffusionConfig):
    r"""
    Configuration of [`NemotronDiffusionVLMForConditionalGeneration`]. Defaults describe NVIDIA's VLM-8B.

    Every field of [`NemotronDiffusionConfig`] (flat, at the root), plus:

    vision_config (`dict` or `PixtralVisionConfig`, *optional*):
        The Pixtral vision tower. Fields a dict leaves out take NVIDIA's values (hidden 1024, 24 layers, patch 14,
        `hidden_act="silu"`), not Pixtral's class defaults.
    spatial_merge_size (`int`, defaults to 2):
        The projector merges each `spatial_merge_size` x `spatial_merge_size` block of patches into one feature.
    projector_hidden_act (`str`, defaults to `"gelu"`), multimodal_projector_bias (`bool`, defaults to `False`):
        The projector's activation and whether its linear layers have biases.
    vision_feature_layer (`int`, defaults to -1):
        Which tower hidden state feeds the projector (-1: the last layer's output; 0: the patch embeddings).
    image_token_id (`int`, defaults to 19):
        `<|image_pad|>`: the positions whose embeddings are replaced by image features. Also read as
        `image_token_index`.
    image_start_token_id, image_break_token_id, image_end_token_id (`int`, defaults to 18, 20, 21):
        The markers around and between the rows of an image. They keep their token embeddings.
    dlm_type (`str`, defaults to `"llada"`):
        Logit alignment of the diffusion head: `"llada"` (logit i predicts token i, no shift) is the only one.
    complementary_mask (`bool`, defaults to `False`):
        A training option of NVIDIA's; accepted and stored, unused at inference.
    """

    model_type = "nemotron_labs_diffusion_vlm"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=PixtralVisionConfig, init_kwargs=NVIDIA_VISION_DEFAULTS)
    }

    vocab_size: int = 131073
    vision_config: dict | PreTrainedConfig | None = None
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int | list[int] = -1  # a list is refused (see validation)
    image_token_id: int = 19
    image_start_token_id: int = 18
    image_break_token_id: int = 20
    image_end_token_id: int = 21
    dlm_type: str = "llada"
    complementary_mask: bool = False

    def __post_init__(self, **kwargs):
        vision = self.vision_config
        if vision is None:
            vision = copy.deepcopy(NVIDIA_VISION_DEFAULTS)
        elif isinstance(vision, dict):
            head_dim = vision.get("head_dim")
            vision = {**copy.deepcopy(NVIDIA_VISION_DEFAULTS), **copy.deepcopy(vision)}
            vision.pop("head_dim", None)  # Pixtral derives it from hidden_size / num_attention_heads
            heads, hidden = vision["num_attention_heads"], vision["hidden_size"]
            if not isinstance(heads, int) or not isinstance(hidden, int) or heads < 1 or hidden % heads:
                raise ValueError(
                    f"NemotronDiffusionVLMConfig: `vision_config['num_attention_heads']`={heads!r} is invalid; "
                    f"allowed: a divisor of vision_config['hidden_size']={hidden!r}."
                )
            if head_dim is not None:
                if hidden // heads != head_dim:
                    raise ValueError(
                        f"NemotronDiffusionVLMConfig: `vision_config['head_dim']`={head_dim!r} is invalid; allowed: "
                        f"vision hidden_size / num_attention_heads = {hidden} / {heads}."
                    )
        elif not isinstance(vision, PixtralVisionConfig):
            raise TypeError(
                f"NemotronDiffusionVLMConfig: `vision_config` must be a dict or a PixtralVisionConfig, got "
                f"{type(vision).__name__}."
            )
        self.vision_config = vision
        super().__post_init__(**kwargs)
        self._validate_vision_fields()

    def _validate_vision_fields(self):
        def bad(field, value, allowed):
            raise ValueError(f"NemotronDiffusionVLMConfig: `{field}`={value!r} is invalid; allowed: {allowed}.")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        vision = self.vision_config
        if vision.model_type != "pixtral":
            bad("vision_config['model_type']", vision.model_type, "'pixtral'")
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels"):
            value = getattr(vision, field)
            if not is_int(value) or value < 1:
                bad(f"vision_config['{field}']", value, "an integer >= 1")
        if vision.hidden_size % vision.num_attention_heads or (vision.hidden_size // vision.num_attention_heads) % 4:
            bad(
                "vision_config['num_attention_heads']",
                vision.num_attention_heads,
                f"a divisor of hidden_size={vision.hidden_size} leaving a head size divisible by 4 (2-D RoPE)",
            )
        if not is_int(vision.patch_size) or vision.patch_size < 1:
            bad("vision_config['patch_size']", vision.patch_size, "an integer >= 1")
        if vision.hidden_act not in ACT2FN:
            bad("vision_config['hidden_act']", vision.hidden_act, f"one of {sorted(ACT2FN)}")
        if not is_int(self.spatial_merge_size) or self.spatial_merge_size < 1:
            bad("spatial_merge_size", self.spatial_merge_size, "an integer >= 1")
        if self.projector_hidden_act not in ACT2FN:
            bad("projector_hidden_act", self.projector_hidden_act, f"one of {sorted(ACT2FN)}")
        layers = vision.num_hidden_layers
        selected = self.vision_feature_layer
        # One layer only: the projector's norm and merger are sized for one vision hidden state per patch.
        if not is_int(selected) or not -(layers + 1) <= selected <= layers:
            bad(
                "vision_feature_layer",
                self.vision_feature_layer,
                f"an index into the {layers + 1} hidden states of the tower, in [{-(layers + 1)}, {layers}]",
            )
        markers = {}
        for field in ("image_token_id", "image_start_token_id", "image_break_token_id", "image_end_token_id"):
            value = getattr(self, field)
            if not is_int(value) or not 0 <= value < self.vocab_size:
                bad(field, value, f"an id in [0, vocab_size={self.vocab_size})")
            if value == self.mask_token_id:
                bad(field, value, f"an id other than mask_token_id={self.mask_token_id}")
            if value in markers:
                bad(field, value, f"an id other than {markers[value]}={value} (each marker needs its own id)")
            markers[value] = field
        if self.dlm_type not in DLM_TYPES:
            bad("dlm_type", self.dlm_type, f"one of {DLM_TYPES} (logit i predicts token i)")

    @property
    def image_marker_ids(self) -> tuple[int, int, int, int]:
        """(start, pad, break, end) ids of the image markers."""
        return (self.image_start_token_id, self.image_token_id, self.image_break_token_id, self.image_end_token_id)


__all__ = ["NemotronDiffusionVLMConfig", "NVIDIA_VISION_DEFAULTS"]
