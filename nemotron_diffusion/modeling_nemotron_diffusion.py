# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Tri-mode Nemotron-Labs-Diffusion model: one set of weights, causal or bidirectional attention per call.

The layers are transformers' own Ministral3 building blocks (YaRN RoPE, Llama-4 query scaling, every attention
backend). What this file owns is small:

* the backbone forward, where the attention mode (`is_causal`) and the cache policy (`update_cache`) are arguments
  of the call, never module state;
* NVIDIA's module names (`encoder.*`, `diffusion_head`), so their checkpoints and PEFT adapters load unchanged;
* the training losses of the three `dlm_paradigm`s.

Logit semantics depend on the mode: a causal position predicts the *next* token, a bidirectional position predicts
the token *at* that position (a mask slot predicts its own token).
"""

import contextlib
import copy
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.ministral3.modeling_ministral3 import (
    Ministral3DecoderLayer,
    Ministral3RMSNorm,
    Ministral3RotaryEmbedding,
)
from transformers.utils import CONFIG_NAME, is_flash_attn_2_available, is_flash_attn_3_available
from transformers.utils.output_capturing import capture_outputs

from .attention_nemotron_diffusion import NemotronDiffusionAttention, NemotronDiffusionDecoderLayer, query_scale
from .cache_nemotron_diffusion import ReadOnlyCache, is_static_cache, rewind_cache
from .configuration_nemotron_diffusion import NemotronDiffusionConfig
from .generation_config_nemotron_diffusion import NemotronDiffusionGenerationConfig
from .generation_nemotron_diffusion import NemotronDiffusionGenerationMixin
from .head_nemotron_diffusion import apply_head
from .model_card import should_write as _should_write_card
from .model_card import write_model_card


# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`. A forward that
# misses the new name silently recomputes from scratch while `generate` feeds it only the last token, so every call
# below uses the name of the installed version.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Ministral3DecoderLayer.forward).parameters else "past_key_values"
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Both names of the flash kernels that cannot take an arbitrary (e.g. block-diffusion) mask inside one call.
_FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


@dataclass
class NemotronDiffusionModelOutput(BaseModelOutputWithPast):
    pass


@dataclass
class NemotronDiffusionCausalLMOutput(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        The training loss of the configured `dlm_paradigm` (see `NemotronDiffusionForCausalLM.forward`).
    diffusion_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean over masked tokens of the 1/t-weighted cross-entropy (bidirectional and block_diff paradigms).
    ar_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean shifted cross-entropy over the AR targets (autoregressive and block_diff paradigms).
    num_masked_tokens (`torch.LongTensor` of shape `()`, *optional*):
        Number of masked positions that entered the diffusion loss.
    num_ar_tokens (`torch.LongTensor` of shape `()`, *optional*):
        Number of targets that entered the AR loss.
    causal_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`, *optional*):
        block_diff only: the logits of the clean (causal) half; `logits` then holds the noisy half's.
    """

    diffusion_loss: torch.FloatTensor | None = None
    ar_loss: torch.FloatTensor | None = None
    num_masked_tokens: torch.LongTensor | None = None
    num_ar_tokens: torch.LongTensor | None = None
    causal_logits: torch.FloatTensor | None = None


class NemotronDiffusionPreTrainedModel(PreTrainedModel):
    config: NemotronDiffusionConfig
    config_class = NemotronDiffusionConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NemotronDiffusionDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": NemotronDiffusionDecoderLayer, "attentions": NemotronDiffusionAttention}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # transformers builds the class's default (8B-shaped) config for a local folder without config.json.
        folder = os.path.join(os.fspath(pretrained_model_name_or_path or ""), kwargs.get("subfolder") or "")
        if (
            kwargs.get("config") is None
            and kwargs.get("gguf_file") is None
            and os.path.isdir(folder)
            and not os.path.isfile(os.path.join(folder, "config.json"))
        ):
            raise OSError(
                f"{cls.__name__}.from_pretrained: the folder {folder!r} has no config.json; pass the folder of a "
                "saved model, or `config=` explicitly."
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # No request (or "auto"): the best backend installed, see `preferred_attn_implementation`. An explicit
        # request, from `from_pretrained(attn_implementation=...)` or a config.json (NVIDIA's pins "sdpa"), wins.
        if requested_attention in (None, "auto"):
            requested_attention = preferred_attn_implementation()
        return super().get_correct_attn_implementation(requested_attention, is_init_check)


def _attention_interface_is_flash(config) -> bool:
    return config._attn_implementation in _FLASH_IMPLEMENTATIONS


def preferred_attn_implementation() -> str:
    """The attention backend chosen when none is requested (or `"auto"` is): FlashAttention-3 on Hopper when its
    kernels are importable, FlashAttention-2 when `flash_attn` is, otherwise sdpa (whose own flash and cuDNN kernels
    run on recent GPUs, and which falls back to eager where it cannot run)."""
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major == 9 and is_flash_attn_3_available():
            return "flash_attention_3"
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


@contextlib.contextmanager
def _backend_for_custom_masks(config, needs_custom_mask: bool):
    """FlashAttention kernels take a causal flag and padding only. A call whose attention pattern they cannot
    express (QuadraticSpec, block-diffusion training) runs on sdpa instead, for that call only: the configured
    backend is restored on exit. (transformers reads the backend from the config inside each attention layer, so
    the switch is made there; like transformers' own per-call `is_causal`, it is not safe across threads.)"""
    if not (needs_custom_mask and _attention_interface_is_flash(config)):
        yield
        return
    configured = config._attn_implementation
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = configured


class NemotronDiffusionModel(NemotronDiffusionPreTrainedModel):
    """The Ministral3 backbone (NVIDIA's `encoder`), with the attention mode chosen per call."""

    def __init__(self, config: NemotronDiffusionConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [NemotronDiffusionDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Ministral3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Ministral3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        is_causal: bool = True,
        update_cache: bool | None = None,
        mask_function: Callable | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> NemotronDiffusionModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`): token ids of this chunk.
            attention_mask (`torch.Tensor` of shape `(batch_size, cache_length + query_length)`, *optional*):
                1 for real tokens, 0 for padding (or holes) in the cache and the chunk. Honoured in both modes.
            position_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*): absolute
                positions; default `cache_length + arange(query_length)`.
            past_key_values / cache (`Cache`, *optional*): the prefix cache (both names are accepted: transformers
                5.24 renamed the argument).
            is_causal (`bool`, defaults to `True`): causal attention (a position predicts the next token) or
                bidirectional attention over the cached prefix plus this whole chunk (a position predicts itself).
            update_cache (`bool`, *optional*): whether this chunk's keys/values are appended to the cache. `False`
                makes the cache read-only for this call (drafting, denoising). Defaults to `True`, except that a cache
                passed together with `use_cache=False` is read-only, as in NVIDIA's code.
            mask_function (`Callable`, *optional*): `(batch_idx, head_idx, q_idx, kv_idx) -> bool` over absolute
                key slots, replacing the causal/bidirectional pattern (QuadraticSpec, block-diffusion training).
                Padding from `attention_mask` is still applied on top.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("Pass the cache either as `cache` or as `past_key_values`, not both.")
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, ReadOnlyCache):
            raise TypeError("Pass the underlying cache together with update_cache=False, not a ReadOnlyCache.")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if update_cache is None:
            update_cache = not (cache is not None and use_cache is False)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        read_only = cache is not None and not update_cache
        # A dynamic cache is read through a view that stores nothing; a static one (fixed buffers for compiled
        # graphs) is written past its length and rolled back after the call, the stale slots being masked out.
        static_read_only = read_only and is_static_cache(cache)
        layer_cache = ReadOnlyCache(cache) if read_only and not static_read_only else cache
        prebuilt_pattern = getattr(attention_mask, "ndim", 2) == 4 or type(attention_mask).__name__ == "BlockMask"
        with _backend_for_custom_masks(self.config, mask_function is not None or prebuilt_pattern):
            output = self._layers_forward(
                inputs_embeds,
                attention_mask,
                position_ids,
                layer_cache,
                cache,
                use_cache,
                is_causal,
                mask_function,
                **kwargs,
            )
        if static_read_only:
            rewind_cache(cache, inputs_embeds.shape[1])
        return output

    def build_attention_mask(self, inputs_embeds, attention_mask, cache, position_ids, is_causal, mask_function=None):
        """The attention mask of a call in the configured backend's format (a 4-D mask, a BlockMask, a padding mask
        or None). Only the shape, dtype and device of `inputs_embeds` [B, Q, *] are used. A mask built ahead of a
        compiled call can be passed as `attention_mask` (4-D masks pass through), which keeps a per-call
        `mask_function` closure out of the compiled graph."""
        # The mask builders take the cache positionally: its keyword was renamed in transformers 5.24.
        if mask_function is not None:
            # bidirectional AND mask_function == mask_function, with padding applied by the mask interface; in
            # sdpa's format when FlashAttention is configured, since such calls run on sdpa (see forward).
            with _backend_for_custom_masks(self.config, True):
                return create_bidirectional_mask(
                    self.config, inputs_embeds, attention_mask, None, cache, and_mask_function=mask_function
                )
        if is_causal:
            return create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        return create_bidirectional_mask(self.config, inputs_embeds, attention_mask, None, cache)

    def _layers_forward(
        self,
        inputs_embeds,
        attention_mask,
        position_ids,
        layer_cache,
        cache,
        use_cache,
        is_causal,
        mask_function,
        **kwargs,
    ):
        attention_mask = self.build_attention_mask(
            inputs_embeds, attention_mask, layer_cache, position_ids, is_causal, mask_function
        )
        if mask_function is not None:
            is_causal = False

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        # `is_causal` reaches the kernels: sdpa and flash otherwise fall back to the module's `is_causal=True` when
        # no mask was needed (no padding), which would make a bidirectional call silently causal.
        kwargs["is_causal"] = is_causal
        # The Llama-4 query scale depends on the positions only: computed once, not in each layer.
        kwargs["query_scale"] = query_scale(self.config, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=use_cache,
                **{_CACHE_ARG: layer_cache},
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return NemotronDiffusionModelOutput(
            last_hidden_state=hidden_states, **{_CACHE_FIELD: cache if use_cache else None}
        )


def block_diff_mask_function(half_length: int, block_size: int) -> Callable:
    """Attention rules of the block-diffusion training sequence `[x_t (0..n-1) | x_0 (n..2n-1)]`, n = half_length.

    A query q may attend to key k iff
      (a) both are noisy and in the same block (a noisy block is bidirectional within itself),
      (b) q is noisy, k is clean and k's block is strictly earlier than q's, or
      (c) both are clean and q >= k (the clean stream is token-level causal).
    Clean tokens never see noisy ones. Written with tensor ops only, so it works under vmap and FlexAttention.
    """

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        q_clean = q_idx >= half_length
        kv_clean = kv_idx >= half_length
        q_block = (q_idx % half_length) // block_size
        kv_block = (kv_idx % half_length) // block_size
        same_noisy_block = ~q_clean & ~kv_clean & (q_block == kv_block)
        earlier_clean_block = ~q_clean & kv_clean & (q_block > kv_block)
        clean_causal = q_clean & kv_clean & (q_idx >= kv_idx)
        return same_noisy_block | earlier_clean_block | clean_causal

    return mask


class NemotronDiffusionForCausalLM(NemotronDiffusionPreTrainedModel, NemotronDiffusionGenerationMixin):
    """Nemotron-Labs-Diffusion with its LM head: AR, block-diffusion and self-speculative generation.

    Module names are NVIDIA's: the backbone is `encoder`, the LM head is `diffusion_head`. The head is untied in
    every released checkpoint; `tie_word_embeddings=True` ties it to `encoder.embed_tokens` (converted Llama models).
    """

    _tied_weights_keys = {"diffusion_head.weight": "encoder.embed_tokens.weight"}
    _tp_plan = {"diffusion_head": "colwise_gather_output"}
    _pp_plan = {"diffusion_head": (["hidden_states"], ["logits"])}
    # The loss is a per-batch mean whose denominator (masked tokens) is not the Trainer's `num_items_in_batch`.
    accepts_loss_kwargs = False
    generation_config_class = NemotronDiffusionGenerationConfig
    # Image inputs (`pixel_values`, `image_sizes`) are refused unless a subclass (the VLM) takes them.
    _accepts_image_inputs = False

    def _refuse_image_inputs(self, kwargs):
        for name in ("pixel_values", "image_sizes"):
            if not self._accepts_image_inputs and kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` was given to {type(self).__name__}, a text-only model; load a VLM checkpoint "
                    "(model_type 'nemotron_labs_diffusion_vlm') to use images."
                )

    def _validate_model_kwargs(self, model_kwargs):
        self._refuse_image_inputs(model_kwargs)
        super()._validate_model_kwargs(model_kwargs)

    def __init__(self, config: NemotronDiffusionConfig):
        super().__init__(config)
        self.encoder = NemotronDiffusionModel(config)
        self.vocab_size = config.vocab_size
        self.mask_token_id = config.mask_token_id
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        _greedy_unless_configured(self.generation_config)

    def adjust_generation_fn(self, *args, **kwargs):
        # `from_pretrained` replaces the generation config with a plain `GenerationConfig` read from the folder's
        # generation_config.json (if any): it becomes ours, with the same fields.
        super().adjust_generation_fn(*args, **kwargs)
        self.generation_config = _as_our_generation_config(self.generation_config)
        _greedy_unless_configured(self.generation_config)

    def save_pretrained(self, save_directory, *args, model_card=None, **kwargs):
        """Saves weights under NVIDIA's names, this package's model files as remote code, and an `auto_map` for
        AutoConfig, AutoModel and AutoModelForCausalLM, so the folder loads with `trust_remote_code=True` where
        this package is not installed. The generation config is saved as authoritative (`_from_model_config`
        False), otherwise transformers drops its `decode_mode`/`block_size`/... fields on reload; it carries
        `do_sample` and the mode fields explicitly.

        model_card: the README.md model card (see `model_card.write_model_card`). `None` (default) writes it unless
        the folder has a README.md that was not written by this package; `True` always writes it; a dict writes it
        with these fields (`license`, `base_model`, `tags`, `language`, `drafter_subfolder`, `description`);
        `False` writes none. (`push_to_hub=True` uploads transformers' own card instead: upload the saved folder
        with `huggingface_hub.upload_folder` to publish this one.)"""
        if not (model_card is None or isinstance(model_card, (bool, dict))):
            raise ValueError(
                f"save_pretrained: `model_card`={model_card!r} is invalid; allowed: None, True, False, a dict."
            )
        auto_map = getattr(self.config, "auto_map", None)
        output = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers' remote-code export writes its auto_map into the model's own config: put it back as it was.
        self.config.auto_map = auto_map
        if auto_map is None:
            del self.config.auto_map
        if kwargs.get("is_main_process", True):
            # Written after transformers' own files, from copies: the model's config and generation config are left
            # as they are. config.json gets the full `auto_map`; generation_config.json is written by our class
            # (authoritative, `do_sample` and the mode fields listed), whatever class was assigned to the model.
            config_path = os.path.join(save_directory, CONFIG_NAME)
            with open(config_path, encoding="utf-8") as f:
                saved = json.load(f)
            saved["auto_map"] = self._remote_code_auto_map()
            with open(config_path, "w", encoding="utf-8") as f:
                f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
            if self.generation_config is not None:
                generation_config = _as_our_generation_config(self.generation_config)
                _greedy_unless_configured(generation_config)
                generation_config.save_pretrained(save_directory)
        write_card = model_card is not False and kwargs.get("is_main_process", True) and not kwargs.get("push_to_hub")
        if write_card and (model_card is not None or _should_write_card(save_directory)):
            fields = model_card if isinstance(model_card, dict) else {}
            write_model_card(save_directory, name_or_path=self.name_or_path, **fields)
        return output

    def _remote_code_auto_map(self) -> dict:
        """The `auto_map` that `save_pretrained` writes (a subclass with other Auto classes overrides it)."""
        return dict(_AUTO_MAP)

    def get_input_embeddings(self):
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value):
        self.encoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.diffusion_head

    def set_output_embeddings(self, new_embeddings):
        self.diffusion_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        is_causal: bool = True,
        update_cache: bool | None = None,
        mask_function: Callable | None = None,
        masked_indices: torch.BoolTensor | None = None,
        p_mask: torch.FloatTensor | None = None,
        eps: float = 1e-3,
        cache: Cache | None = None,
        **kwargs,
    ) -> NemotronDiffusionCausalLMOutput:
        r"""
        Inference (no `labels`): one forward in the mode given by `is_causal`, with the cache policy given by
        `update_cache` (see [`NemotronDiffusionModel.forward`]). `logits_to_keep` limits the head to the last
        positions, so a prefill never materialises full-prompt logits.

        Training (`labels` given, `-100` = ignored): the loss of `config.dlm_paradigm`.
          * `autoregressive`: causal forward, mean shifted cross-entropy over the targets.
          * `bidirectional`: each sequence draws t ~ U(0, 1), p_mask = (1 - eps) t + eps; every target position is
            masked with probability p_mask (or as given by `masked_indices`/`p_mask`); bidirectional forward;
            loss = sum over masked positions of CE / p_mask, divided by the number of masked positions
            (NVIDIA's normalisation), times `dlm_loss_weight` if set.
          * `block_diff`: the doubled sequence `[x_t | x_0]` with the block-diffusion attention rules
            (`block_diff_mask_function`, `config.block_size`); loss = (diffusion sum + `ar_loss_weight` * AR sum)
            / (masked tokens + `ar_loss_weight` * AR targets), NVIDIA's combined normalisation.
        The loss is a scalar mean over this batch (the HF Trainer averages it over accumulation steps); its parts
        are returned as `diffusion_loss`, `ar_loss`, `num_masked_tokens` and `num_ar_tokens`.
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("Pass the cache either as `cache` or as `past_key_values`, not both.")
        cache = cache if cache is not None else past_key_values
        self._refuse_image_inputs(kwargs)
        if labels is not None:
            if cache is not None or mask_function is not None or not is_causal:
                raise ValueError(
                    "Training forwards (with `labels`) take their attention pattern from config.dlm_paradigm="
                    f"{self.config.dlm_paradigm!r}; do not pass a cache, `mask_function` or `is_causal` with labels."
                )
            return self._training_forward(
                input_ids, attention_mask, position_ids, inputs_embeds, labels, masked_indices, p_mask, eps, **kwargs
            )

        outputs = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            is_causal=is_causal,
            update_cache=update_cache,
            mask_function=mask_function,
            cache=cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = apply_head(self.diffusion_head, hidden_states)
        return NemotronDiffusionCausalLMOutput(
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )

    # ----------------------------------------------------------------------------------------------- training
    def _training_forward(
        self, input_ids, attention_mask, position_ids, inputs_embeds, labels, masked_indices, p_mask, eps, **kwargs
    ) -> NemotronDiffusionCausalLMOutput:
        paradigm = self.config.dlm_paradigm
        if input_ids is None:
            raise ValueError(f"dlm_paradigm={paradigm!r} training needs `input_ids` (mask tokens replace inputs).")
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} must equal `input_ids` shape {tuple(input_ids.shape)}"
            )
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        if paradigm == "autoregressive":
            logits = self._backbone_logits(input_ids, attention_mask, position_ids, is_causal=True, **kwargs)
            ar_sum, num_ar = _shifted_ce_sum(logits, labels)
            ar_loss = ar_sum / num_ar.clamp(min=1)
            return NemotronDiffusionCausalLMOutput(loss=ar_loss, logits=logits, ar_loss=ar_loss, num_ar_tokens=num_ar)

        masked_indices, p_mask = self._noise(labels, masked_indices, p_mask, eps)
        noisy_ids = torch.where(masked_indices, torch.full_like(input_ids, self.config.mask_token_id), input_ids)
        weight = self.config.dlm_loss_weight if self.config.dlm_loss_weight is not None else 1.0

        if paradigm == "bidirectional":
            logits = self._backbone_logits(noisy_ids, attention_mask, position_ids, is_causal=False, **kwargs)
            diff_sum, num_masked = _masked_diffusion_ce_sum(logits, labels, masked_indices, p_mask)
            diff_sum = diff_sum * weight
            loss = diff_sum / num_masked.clamp(min=1)
            return NemotronDiffusionCausalLMOutput(
                loss=loss, logits=logits, diffusion_loss=loss, num_masked_tokens=num_masked
            )

        # block_diff: [x_t | x_0], both halves at positions 0..n-1.
        half = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(half, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)
        doubled_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=1)
        logits = self._backbone_logits(
            torch.cat([noisy_ids, input_ids], dim=1),
            doubled_mask,
            torch.cat([position_ids, position_ids], dim=1),
            is_causal=False,
            mask_function=block_diff_mask_function(half, self.config.block_size),
            **kwargs,
        )
        diffusion_logits, causal_logits = logits[:, :half], logits[:, half:]
        diff_sum, num_masked = _masked_diffusion_ce_sum(diffusion_logits, labels, masked_indices, p_mask)
        diff_sum = diff_sum * weight
        ar_sum, num_ar = _shifted_ce_sum(causal_logits, labels)
        w = self.config.ar_loss_weight
        loss = (diff_sum + w * ar_sum) / (num_masked + w * num_ar).clamp(min=1)
        return NemotronDiffusionCausalLMOutput(
            loss=loss,
            logits=diffusion_logits,
            causal_logits=causal_logits,
            diffusion_loss=diff_sum / num_masked.clamp(min=1),
            ar_loss=ar_sum / num_ar.clamp(min=1),
            num_masked_tokens=num_masked,
            num_ar_tokens=num_ar,
        )

    def _backbone_logits(self, input_ids, attention_mask, position_ids, is_causal, mask_function=None, **kwargs):
        outputs = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            is_causal=is_causal,
            mask_function=mask_function,
            **kwargs,
        )
        return apply_head(self.diffusion_head, outputs.last_hidden_state)

    @staticmethod
    def _noise(labels, masked_indices, p_mask, eps):
        """Forward process of masked diffusion: which target positions are masked, and their mask probability."""
        loss_mask = labels != -100
        if masked_indices is not None:
            if p_mask is None:
                raise ValueError(
                    "`masked_indices` needs the matching `p_mask` (the probability each was masked with)."
                )
            p_mask = p_mask.expand_as(labels).to(torch.float32) if p_mask.dim() else p_mask.expand(labels.shape)
            return masked_indices.bool() & loss_mask, p_mask
        if p_mask is not None:
            raise ValueError("`p_mask` without `masked_indices` is ambiguous; pass both or neither.")
        t = torch.rand(labels.shape[0], 1, device=labels.device)
        p_mask = ((1 - eps) * t + eps).expand(labels.shape)
        masked_indices = (torch.rand(labels.shape, device=labels.device) < p_mask) & loss_mask
        return masked_indices, p_mask


def _shifted_ce_sum(logits, labels):
    """Sum and count of next-token cross-entropy: logits[:, i] against labels[:, i + 1]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, (shift_labels != -100).sum()


def _masked_diffusion_ce_sum(logits, labels, masked_indices, p_mask):
    """Sum of CE / p_mask over masked positions (no shift: logit i predicts token i), and the masked count."""
    ce = F.cross_entropy(logits[masked_indices].float(), labels[masked_indices], reduction="none")
    return (ce / p_mask[masked_indices].float()).sum(), masked_indices.sum()


def _greedy_unless_configured(generation_config):
    """`do_sample=False` where the generation config leaves it unset. `generate()` already decodes greedily then,
    but `pipeline("text-generation")` samples at temperature 0.7 unless the model's generation config sets
    `do_sample`; with this the pipeline decodes like `generate()`."""
    if generation_config is not None and getattr(generation_config, "do_sample", None) is None:
        generation_config.do_sample = False


def _as_our_generation_config(generation_config):
    """The generation config as a `NemotronDiffusionGenerationConfig` (a copy when it is another class)."""
    if generation_config is None or isinstance(generation_config, NemotronDiffusionGenerationConfig):
        return generation_config
    converted = NemotronDiffusionGenerationConfig.from_dict(copy.deepcopy(generation_config.to_dict()))
    if hasattr(generation_config, "_original_object_hash"):
        converted._original_object_hash = hash(converted)
    return converted


_AUTO_MAP = {
    "AutoConfig": f"configuration_nemotron_diffusion.{NemotronDiffusionConfig.__name__}",
    "AutoModel": f"modeling_nemotron_diffusion.{NemotronDiffusionForCausalLM.__name__}",
    "AutoModelForCausalLM": f"modeling_nemotron_diffusion.{NemotronDiffusionForCausalLM.__name__}",
}
# `save_pretrained` copies the files behind these classes (and their single-dot relative imports) next to the weights.
NemotronDiffusionConfig.register_for_auto_class()
NemotronDiffusionForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# NVIDIA's checkpoints name the architecture `NemotronLabsDiffusionModel`, and their scripts load it with `AutoModel`:
# the full model with the LM head.
NemotronLabsDiffusionModel = NemotronDiffusionForCausalLM

__all__ = [
    "NemotronDiffusionPreTrainedModel",
    "NemotronDiffusionModel",
    "NemotronDiffusionForCausalLM",
    "NemotronLabsDiffusionModel",
    "NemotronDiffusionCausalLMOutput",
    "ReadOnlyCache",
    "block_diff_mask_function",
    "preferred_attn_implementation",
]
