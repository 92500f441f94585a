# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Ministral3's decoder layer and attention with the Llama-4 query scale computed once per forward.

Ministral3 attention multiplies the queries by 1 + beta * ln(1 + floor(position / original_max_position_embeddings)),
a [batch, 1, K, 1] tensor that depends on the positions and the config only, and it computes it again in every layer:
six small ops per layer. For a small model on a CPU those ops are a few percent of a forward (the 135M demo in
bf16: 3-4% of a generate() call in AR, LinearSpec and diffusion, `benchmarks/results/query_scale_cpu.md`). The
backbone computes the scale once (`query_scale`) and passes it to every layer; with beta 0 (every converted Llama /
Mistral checkpoint) the scale is exactly 1 and the multiplication is skipped. The products are the same as
Ministral3's, bit for bit. Parameter names do not change, so checkpoints load as before.
"""

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.ministral3.modeling_ministral3 import (
    Ministral3Attention,
    Ministral3DecoderLayer,
    apply_rotary_pos_emb,
    eager_attention_forward,
    get_llama_4_attn_scale,
)

# Query scale of a config whose Llama-4 scaling is off: multiplying by it would change nothing.
NO_QUERY_SCALE = 1.0


def query_scale(config, position_ids: torch.Tensor):
    """The Llama-4 query scale [batch, 1, K, 1] of `position_ids` [batch, K] (float32, as Ministral3 computes it), or
    `NO_QUERY_SCALE` when the config's `llama_4_scaling_beta` is 0 or unset."""
    rope = config.rope_parameters or {}
    beta = rope.get("llama_4_scaling_beta")
    if not beta:
        return NO_QUERY_SCALE
    return get_llama_4_attn_scale(position_ids, beta, rope.get("original_max_position_embeddings"))


class NemotronDiffusionAttention(Ministral3Attention):
    """Ministral3 attention taking the query scale from the caller (`query_scale`, see the module docstring); a call
    without it computes the scale itself, as Ministral3 does."""

    def forward(self, hidden_states, position_embeddings, attention_mask, position_ids, *args, **kwargs):
        # The cache comes positionally or as `cache` (transformers >= 5.24) / `past_key_values` (5.23).
        cache = args[0] if args else kwargs.pop("cache", kwargs.pop("past_key_values", None))
        scale = kwargs.pop("query_scale", None)
        if scale is None:
            scale = query_scale(self.config, position_ids)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if torch.is_tensor(scale):  # else NO_QUERY_SCALE: a multiplication by 1
            query_states = query_states * scale.to(query_states.dtype)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            position_ids=position_ids,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class NemotronDiffusionDecoderLayer(Ministral3DecoderLayer):
    """Ministral3's decoder layer with `NemotronDiffusionAttention` (same submodules and parameter names)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        # Ministral3's attention object, recast (the subclass adds no state): building a second one would draw
        # random numbers again and change the initial weights that a seed gives.
        self.self_attn.__class__ = NemotronDiffusionAttention


__all__ = ["NO_QUERY_SCALE", "NemotronDiffusionAttention", "NemotronDiffusionDecoderLayer", "query_scale"]
