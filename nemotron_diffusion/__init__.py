# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Transformers-native tri-mode (AR / block diffusion / self-speculation) Nemotron-Labs-Diffusion models.

Importing the package registers the configuration and model with transformers' Auto classes, so a folder in
NVIDIA's published layout (`model_type: "nemotron_labs_diffusion"`) loads with these classes, without
`trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_nemotron_diffusion import NemotronDiffusionConfig
from .configuration_nemotron_diffusion_vlm import NemotronDiffusionVLMConfig
from .image_processing_nemotron_diffusion_vlm import NemotronDiffusionVLMImageProcessor
from .processing_nemotron_diffusion_vlm import NemotronDiffusionVLMProcessor
from .generation_config_nemotron_diffusion import (
    DECODE_MODES,
    GENERATION_FIELDS,
    NemotronDiffusionGenerationConfig,
)
from .generation_nemotron_diffusion import NemotronDiffusionGenerateOutput, NemotronDiffusionGenerationMixin
from .sampling_nemotron_diffusion import ThinkingBudgetLogitsProcessor
from .modeling_nemotron_diffusion import (
    NemotronDiffusionCausalLMOutput,
    NemotronDiffusionForCausalLM,
    NemotronDiffusionModel,
    NemotronDiffusionPreTrainedModel,
    NemotronLabsDiffusionModel,
)
from .modeling_nemotron_diffusion_vlm import (
    NemotronDiffusionVLMForConditionalGeneration,
    NemotronDiffusionVLMModel,
    NemotronLabsDiffusionVLMModel,
)


__version__ = "0.1.0"

AutoConfig.register(NemotronDiffusionConfig.model_type, NemotronDiffusionConfig, exist_ok=True)
AutoModel.register(NemotronDiffusionConfig, NemotronDiffusionForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(NemotronDiffusionConfig, NemotronDiffusionForCausalLM, exist_ok=True)
# The VLM (NVIDIA's `model_type: "nemotron_labs_diffusion_vlm"`): `AutoModel` gives the full model, as NVIDIA's
# scripts expect.
AutoConfig.register(NemotronDiffusionVLMConfig.model_type, NemotronDiffusionVLMConfig, exist_ok=True)
AutoModel.register(NemotronDiffusionVLMConfig, NemotronDiffusionVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(
    NemotronDiffusionVLMConfig, NemotronDiffusionVLMForConditionalGeneration, exist_ok=True
)
AutoImageProcessor.register(
    NemotronDiffusionVLMConfig, image_processor_classes={"pil": NemotronDiffusionVLMImageProcessor}, exist_ok=True
)
AutoProcessor.register(NemotronDiffusionVLMConfig, NemotronDiffusionVLMProcessor, exist_ok=True)

__all__ = [
    "DECODE_MODES",
    "GENERATION_FIELDS",
    "NemotronDiffusionCausalLMOutput",
    "NemotronDiffusionConfig",
    "NemotronDiffusionForCausalLM",
    "NemotronDiffusionGenerateOutput",
    "NemotronDiffusionGenerationConfig",
    "NemotronDiffusionGenerationMixin",
    "NemotronDiffusionModel",
    "NemotronDiffusionPreTrainedModel",
    "NemotronLabsDiffusionModel",
    "NemotronDiffusionVLMConfig",
    "NemotronDiffusionVLMForConditionalGeneration",
    "NemotronDiffusionVLMImageProcessor",
    "NemotronDiffusionVLMModel",
    "NemotronDiffusionVLMProcessor",
    "NemotronLabsDiffusionVLMModel",
    "ThinkingBudgetLogitsProcessor",
]
