# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Checks of what `generate()` is given, in every decoding mode, before any tensor is built from it.

Each bad value raises a `ValueError` (or a `TypeError` for a wrong type) that names the argument, the value and what
is allowed; a setting that does not apply to the chosen mode is ignored with a warning that names it (Python's
warning filter shows each such warning once per call site).

* `validate_generate_inputs`: the prompt tensors (`input_ids`, `attention_mask`) against the model config.
* `validate_generation_settings`: the resolved generation config (`max_new_tokens`, the thinking budget, settings
  that do not apply to the mode) and the model config's generation fields, which may have been edited since the
  model was built.
"""

import warnings

import torch

from .generation_config_nemotron_diffusion import GENERATION_FIELDS


_ID_DTYPES = (torch.int64, torch.int32)


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_model_config(model_config):
    """The model config's fields that generation indexes with: `vocab_size` and `mask_token_id`."""
    vocab_size = getattr(model_config, "vocab_size", None)
    if not _is_int(vocab_size) or vocab_size < 1:
        raise ValueError(f"model config: `vocab_size`={vocab_size!r} is invalid; allowed: an int >= 1.")
    mask_token_id = getattr(model_config, "mask_token_id", None)
    if not _is_int(mask_token_id) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"model config: `mask_token_id`={mask_token_id!r} is invalid; allowed: an id in "
            f"[0, vocab_size={vocab_size})."
        )


def validate_generate_inputs(input_ids, attention_mask, model_config):
    """`input_ids`: an int64/int32 tensor [batch >= 1, length >= 1] of ids in [0, vocab_size); `attention_mask`: None
    or a bool/integer tensor of the same shape holding only 0 and 1. `input_ids` may be None (AR with
    `inputs_embeds`), then only the mask's values are checked."""
    validate_model_config(model_config)
    vocab_size = model_config.vocab_size
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"`input_ids`={_describe(input_ids)} is invalid; allowed: a torch.LongTensor of shape [batch, length]."
            )
        if input_ids.dtype not in _ID_DTYPES:
            raise TypeError(
                f"`input_ids` is {_describe(input_ids)}; allowed: an integer tensor (torch.long or torch.int32)."
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` is {_describe(input_ids)}; allowed: 2 dimensions [batch, length] (a single prompt "
                "is `ids[None]`)."
            )
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(
                f"`input_ids` is {_describe(input_ids)}; allowed: at least one row and one token (batch >= 1, "
                "length >= 1)."
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"`input_ids` holds the id {bad}; allowed: ids in [0, vocab_size={vocab_size}).")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"`attention_mask`={_describe(attention_mask)} is invalid; allowed: a tensor of 0/1 shaped like input_ids."
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(
            f"`attention_mask` is {_describe(attention_mask)}; allowed: a bool or integer tensor of 0/1."
        )
    if input_ids is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; allowed: the shape of input_ids "
            f"{tuple(input_ids.shape)}."
        )
    if attention_mask.dtype != torch.bool and attention_mask.numel():
        values = torch.unique(attention_mask)
        others = values[(values != 0) & (values != 1)]
        if others.numel():
            raise ValueError(
                f"`attention_mask` holds the value {int(others[0])}; allowed: only 0 (padding) and 1 (token)."
            )


# Fields that only one group of modes reads: field -> (modes that read it, what they are).
_MODE_ONLY_FIELDS = {
    "max_denoising_steps": (("diffusion",), "decode_mode='diffusion'"),
    "commit_order": (("diffusion",), "decode_mode='diffusion'"),
    "defer_adjacent_repeats": (("diffusion",), "decode_mode='diffusion'"),
    "fused_commit_forward": (("diffusion",), "decode_mode='diffusion'"),
    "confidence_threshold": (("diffusion", "linear_spec", "quadratic_spec"), "the non-AR modes"),
    "tree_width": (("linear_spec",), "decode_mode='linear_spec'"),
}


def validate_generation_settings(generation_config, model_config, set_by_call=None):
    """The resolved generation config (mode fields already checked by the mode's own validation). `set_by_call`:
    the fields the generate() call itself set; a field that no mode of the call reads is warned about only then (a
    model's saved generation config may well set diffusion's `confidence_threshold` for every call; None: warn for
    every field)."""
    validate_model_config(model_config)
    mode = getattr(generation_config, "decode_mode", "ar")
    max_new_tokens = generation_config.max_new_tokens
    for field in ("max_new_tokens", "max_length"):
        value = getattr(generation_config, field, None)
        if value is None:
            continue
        if not _is_int(value):
            raise TypeError(f"`{field}`={value!r} is invalid; allowed: an int >= 1.")
        if value < 1:
            raise ValueError(f"`{field}`={value!r} is invalid; allowed: an int >= 1.")
    end_think = getattr(generation_config, "end_think_token_id", None)
    if end_think is not None and end_think == model_config.mask_token_id:
        raise ValueError(
            f"`end_think_token_id`={end_think!r} is invalid for decode_mode={mode!r}; allowed: a token other than "
            f"the mask token ({model_config.mask_token_id})."
        )
    for field, (modes, readers) in _MODE_ONLY_FIELDS.items():
        value = getattr(generation_config, field, None)
        if value not in (None, GENERATION_FIELDS[field]) and mode not in modes and (
            set_by_call is None or field in set_by_call
        ):
            warnings.warn(
                f"`{field}`={value!r} does not apply to decode_mode={mode!r} (only {readers} read it); it is ignored.",
                UserWarning,
                stacklevel=2,
            )
    width = getattr(generation_config, "tree_width", None)
    if mode == "linear_spec" and width is not None and width > 1 and generation_config.do_sample:
        warnings.warn(
            f"`tree_width`={width!r} is ignored with do_sample=True: a verify tree is accepted greedily, so sampling "
            "verifies the chain of drafts.",
            UserWarning,
            stacklevel=2,
        )
    if end_think is not None and getattr(generation_config, "max_thinking_tokens", None) is None:
        warnings.warn(
            f"`end_think_token_id`={end_think!r} is ignored: it applies only with `max_thinking_tokens` (the thinking "
            "budget), which is not set.",
            UserWarning,
            stacklevel=2,
        )


__all__ = ["validate_generate_inputs", "validate_generation_settings", "validate_model_config"]
