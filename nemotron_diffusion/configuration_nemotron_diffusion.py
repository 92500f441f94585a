# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Configuration of tri-mode (AR / block diffusion / self-speculation) Nemotron-Labs-Diffusion models.

The class reads NVIDIA's published `config.json` files unchanged (`model_type: "nemotron_labs_diffusion"`). It is a
Ministral3 configuration plus the diffusion fields; every value that the modeling code depends on is validated here,
and a bad value raises a `ValueError` that names the field.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.ministral3.configuration_ministral3 import Ministral3Config


DLM_PARADIGMS = ("bidirectional", "autoregressive", "block_diff")


@strict
class NemotronDiffusionConfig(Ministral3Config):
    r"""
    Configuration of [`NemotronDiffusionForCausalLM`]. Defaults describe the 8B checkpoint.

    Fields beyond [`Ministral3Config`] (names and meanings are NVIDIA's):

    mask_token_id (`int`, defaults to 100):
        Id of the mask token that fills undecoded slots of a diffusion block. Must lie in `[0, vocab_size)`.
    dlm_paradigm (`str`, defaults to `"bidirectional"`):
        Training objective used when `labels` are passed to `forward`: `"autoregressive"` (shifted cross-entropy),
        `"bidirectional"` (masked-diffusion loss with 1/t weighting) or `"block_diff"` (the doubled
        `[noisy | clean]` sequence with block-diffusion attention plus `ar_loss_weight` times the AR loss).
        Generation works in every mode whatever the paradigm.
    block_size (`int`, defaults to 32):
        Block size of the `block_diff` training objective. Generation takes its own `block_size` from the
        generation config.
    dlm_loss_weight (`float`, *optional*):
        Multiplies the diffusion loss when set.
    ar_loss_weight (`float`, defaults to 1.0):
        Weight of the AR loss in the `block_diff` objective.
    dp_varying_mask_ratio (`bool`, defaults to `False`):
        Accepted for compatibility with NVIDIA's configs. Our training code draws mask ratios from the generator it
        is given (or the global one) and never re-seeds global RNG state.
    attention_bias, mlp_bias (`bool`, defaults to `False`):
        Accepted because NVIDIA's configs carry them; the architecture has no biases, so `True` is rejected.

    The YaRN `factor` is always explicit: if a YaRN `rope_parameters` omits it, it is derived once here from
    `max_position_embeddings / original_max_position_embeddings` and stored, so later changes to
    `max_position_embeddings` never alter the positional scaling of a checkpoint.
    """

    model_type = "nemotron_labs_diffusion"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # The tensor-parallel plan is keyed on the backbone, which our model stores as `encoder` (NVIDIA's name).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    pad_token_id: int | None = None
    mask_token_id: int = 100
    dlm_paradigm: str = "bidirectional"
    block_size: int = 32
    dlm_loss_weight: float | int | None = None
    ar_loss_weight: float | int = 1.0
    dp_varying_mask_ratio: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self, **kwargs):
        # NVIDIA's configs may carry `rope_theta` beside `rope_parameters`; the latter wins, as in NVIDIA's code.
        rope_parameters = dict(self.rope_parameters) if self.rope_parameters is not None else None
        if rope_parameters is not None:
            if "rope_type" not in rope_parameters and "type" in rope_parameters:
                rope_parameters["rope_type"] = rope_parameters.pop("type")
            if rope_parameters.get("rope_type", "default") == "yarn":
                original = rope_parameters.get("original_max_position_embeddings")
                if original is None:
                    raise ValueError(
                        "rope_parameters['original_max_position_embeddings'] is required for YaRN, got "
                        f"rope_parameters={self.rope_parameters}"
                    )
                if rope_parameters.get("factor") is None:
                    rope_parameters["factor"] = float(self.max_position_embeddings) / float(original)
            # Ministral3 attention multiplies queries by 1 + beta * ln(1 + floor(pos / original_max)). Checkpoints
            # without Llama-4 scaling (e.g. converted Llama models) get beta = 0, i.e. no scaling.
            rope_parameters.setdefault("llama_4_scaling_beta", 0.0)
            rope_parameters.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            if rope_parameters.get("rope_type", "default") in ("default", "linear", "dynamic"):
                # The Llama-4 scale reads it whatever the RoPE type; transformers' RoPE validation would otherwise
                # warn about it on every load of a converted Llama model (YaRN / llama3 list it themselves).
                self.ignore_keys_at_rope_validation = set(self.ignore_keys_at_rope_validation or ()) | {
                    "original_max_position_embeddings"
                }
            self.rope_parameters = rope_parameters
        super().__post_init__(**kwargs)
        self._validate_diffusion_fields()

    def _validate_diffusion_fields(self):
        def bad(field, value, allowed):
            raise ValueError(f"NemotronDiffusionConfig: `{field}`={value!r} is invalid; allowed: {allowed}.")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(field, value, "an integer >= 1")
        if self.head_dim is None or self.head_dim < 1 or self.head_dim % 2:
            bad("head_dim", self.head_dim, "an even integer >= 2")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            bad(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if isinstance(self.mask_token_id, bool) or not 0 <= self.mask_token_id < self.vocab_size:
            bad("mask_token_id", self.mask_token_id, f"an id in [0, vocab_size={self.vocab_size})")
        if self.dlm_paradigm not in DLM_PARADIGMS:
            bad("dlm_paradigm", self.dlm_paradigm, f"one of {DLM_PARADIGMS}")
        if isinstance(self.block_size, bool) or self.block_size < 1:
            bad("block_size", self.block_size, "an integer >= 1")
        if self.dlm_loss_weight is not None and not self.dlm_loss_weight > 0:
            bad("dlm_loss_weight", self.dlm_loss_weight, "None or a number > 0")
        if not self.ar_loss_weight >= 0:
            bad("ar_loss_weight", self.ar_loss_weight, "a number >= 0")
        if self.attention_bias:
            bad("attention_bias", self.attention_bias, "False (the architecture has no attention biases)")
        if self.mlp_bias:
            bad("mlp_bias", self.mlp_bias, "False (the architecture has no MLP biases)")
        if self.sliding_window is not None:
            bad("sliding_window", self.sliding_window, "None (every released checkpoint uses full attention)")
        if self.rope_parameters.get("rope_type") == "yarn" and not self.rope_parameters.get("factor", 0) > 0:
            bad("rope_parameters['factor']", self.rope_parameters.get("factor"), "a number > 0")
        if self.hidden_act != "silu":
            bad("hidden_act", self.hidden_act, "'silu'")


__all__ = ["NemotronDiffusionConfig", "DLM_PARADIGMS"]
