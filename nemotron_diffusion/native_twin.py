# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""A tri-mode model and its native transformers twin: the same weights under transformers' own names.

NVIDIA's checkpoints, and this package's models, hold the decoder as `encoder.*` and the LM head as
`diffusion_head.weight` (docs/reference-model.md §3). A native causal LM (`LlamaForCausalLM`, `MistralForCausalLM`,
`Ministral3ForCausalLM`) holds the same tensors as `model.*` and `lm_head.weight`, with the same configuration
fields. Conversion maps native -> ours; the benchmark and the tests build the native twin of one of our models
(ours -> native) to compare with transformers' stock `generate()`.

Tooling beside the model files: this module imports them, never the other way round.
"""

from __future__ import annotations

# Configuration fields that mean the same thing in our config and in a native Llama / Mistral / Ministral3 config.
NATIVE_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

# (our prefix, native prefix) of every weight name.
_NAME_PREFIXES = (("encoder.", "model."), ("diffusion_head.", "lm_head."))


def our_name(name: str) -> str:
    """Our name of a native causal LM's weight: `model.X` -> `encoder.X`, `lm_head.X` -> `diffusion_head.X`."""
    for ours, native in _NAME_PREFIXES:
        if name.startswith(native):
            return ours + name[len(native) :]
    raise ValueError(f"unexpected source weight {name!r}: not a Llama/Mistral causal LM layout")


def is_rotary_buffer(name: str) -> bool:
    """RoPE frequency buffers, which some state dicts carry and checkpoints do not (they are recomputed)."""
    return name.endswith(("rotary_emb.inv_freq", "original_inv_freq"))


def native_config_fields(config) -> dict:
    """`NATIVE_CONFIG_FIELDS` of one of our configs, plus its attention implementation."""
    fields = {name: getattr(config, name) for name in NATIVE_CONFIG_FIELDS}
    fields["attn_implementation"] = config._attn_implementation
    return fields


def ministral3_config(config):
    """The `Ministral3Config` of our config: the architecture our layers are (Llama-4 query scaling included)."""
    from transformers import Ministral3Config

    return Ministral3Config(rope_parameters=dict(config.rope_parameters), **native_config_fields(config))


def native_config(config):
    """(causal LM class, config) a user would run instead of ours: `LlamaForCausalLM` when the configuration is
    Llama's (no Llama-4 query scaling, no sliding window; models converted from Llama, such as the demo), else
    `Ministral3ForCausalLM`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Ministral3ForCausalLM

    rope = dict(config.rope_parameters)
    if rope.get("llama_4_scaling_beta") or getattr(config, "sliding_window", None) is not None:
        return Ministral3ForCausalLM, ministral3_config(config)
    rope.pop("llama_4_scaling_beta", None)
    if rope.get("rope_type", "default") == "default":
        rope = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    llama = LlamaConfig(
        rope_parameters=rope,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        **native_config_fields(config),
    )
    return LlamaForCausalLM, llama


def native_twin(model, native_class=None, config=None, base_module=None):
    """The native causal LM on `model`'s weights, shared, not copied (the twin's parameters are `model`'s tensors).

    `native_class` and `config` default to `native_config(model.config)`. `base_module(module)`, if given, maps each
    of our modules to the one whose weights the twin takes (the bench passes the PEFT base module, so that the twin
    runs the base weights of a model with a drafter attached). Generation defaults: greedy, our pad and EOS ids.
    """
    import torch

    if native_class is None:
        native_class, config = native_config(model.config)
    with torch.device("meta"):
        twin = native_class(config)
    state = {}
    for name in twin.state_dict():
        path, _, parameter = our_name(name).rpartition(".")
        module = model.get_submodule(path)
        value = getattr(base_module(module) if base_module is not None else module, parameter)
        if isinstance(value, torch.nn.Parameter):
            # A Parameter of its own on the same storage: `assign=True` would otherwise set `requires_grad` on
            # `model`'s parameters (a frozen base under a drafter would come back trainable), and the twin's
            # flags are those of a freshly loaded stock model.
            value = torch.nn.Parameter(value.detach(), requires_grad=value.is_floating_point())
        state[name] = value
    twin.load_state_dict(state, strict=True, assign=True)
    with torch.device(model.device):  # non-persistent buffers (RoPE frequencies) are not in the state dict
        twin.model.rotary_emb = type(twin.model.rotary_emb)(config=config)
    twin.generation_config.pad_token_id = model.config.pad_token_id
    twin.generation_config.eos_token_id = model.config.eos_token_id
    twin.generation_config.do_sample = False
    return twin.eval()


def ministral3_twin(model, base_module=None):
    """`Ministral3ForCausalLM` on `model`'s weights: stock transformers with layer code identical to ours."""
    from transformers import Ministral3ForCausalLM

    return native_twin(model, Ministral3ForCausalLM, ministral3_config(model.config), base_module)
