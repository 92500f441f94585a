# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Generation for tri-mode models: `model.generate(decode_mode=...)`.

`generate()` is transformers' own: it prepares inputs, the cache, logits processors, stopping criteria and the
streamer, then calls `_sample`, which we override as a dispatcher on `generation_config.decode_mode`:

* `"ar"`: transformers' `_sample`, unchanged (greedy, sampling, processors, streamers; beams and assisted decoding
  take their own transformers loops).
* `"diffusion"`: block diffusion (`_diffusion_decode`).
* `"linear_spec"`: draft a block with diffusion, verify it causally (`_linear_spec_decode`).
* `"quadratic_spec"`: draft and verify in one forward (`_quadratic_spec_decode`).

Each loop reads top to bottom. What they share lives beside this file: the mode fields and their validation
(`generation_config_nemotron_diffusion`), token selection and acceptance (`sampling_nemotron_diffusion`), the
live batch with its emission and ragged cache (`rows_nemotron_diffusion`), the drafter switch
(`drafting_nemotron_diffusion`); the forwards themselves go through `_block_forward` and `_head` below.

Forward counting (`num_forwards` in the output): every physical forward a row takes part in while it is still
generating, the prefill included. `tokens_per_forward` = new tokens / `num_forwards`.

Generation on one model is serialised (a lock per model): a call flips shared state for its duration (adapter
flags, and with FlashAttention configured the attention backend of calls with custom masks).
"""

import contextlib
import functools
import math
import threading
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import CompileConfig, GenerationMixin
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .cache_nemotron_diffusion import is_static_cache, keep_chunk_entries, rewind_cache
from .drafting_nemotron_diffusion import (
    adapters_for_drafting,
    disable_merged_drafter,
    enable_merged_drafter,
    peft_layers,
)
from .generation_config_nemotron_diffusion import (
    DECODE_MODES,
    GENERATION_FIELDS,
    NemotronDiffusionGenerationConfig,
    mode_field,
)
from .head_nemotron_diffusion import Int8DraftHead, apply_head
from .packed_nemotron_diffusion import disable_packed_weights, enable_packed_weights, packed_linears
from .rows_nemotron_diffusion import Rows
from .sampling_nemotron_diffusion import (
    PREFIX_FREE_PROCESSORS,
    process_tree,
    ThinkingBudgetLogitsProcessor,
    contiguous_committed,
    exclude_token,
    gumbel_argmax,
    left_to_right_commits,
    process_block,
    sample_or_argmax,
    select_commits,
    shift_left,
    softmax_probs,
    speculative_accept,
    without_infinite_temperature,
)
from .validation_nemotron_diffusion import validate_generate_inputs, validate_generation_settings
from .verify_tree_nemotron_diffusion import verify_tree

# QuadraticSpec blocks up to this size apply the LM head once to all B * B rows it needs (B draft slots, B - 1 masks
# per row) rather than twice (B rows, then B - 1): on a CPU the head's cost is mostly reading its weight.
_ONE_HEAD_CALL_MAX_BLOCK = 4
# Forward arguments that select an attention pattern: `generate` must never pass them to every forward.
_FORBIDDEN_GENERATE_KWARGS = ("is_causal", "update_cache", "mask_function", "labels")

logger = logging.get_logger(__name__)

_GENERATION_LOCKS = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


_BLOCK_MODES = ("diffusion", "linear_spec", "quadratic_spec")


def _generation_lock(model):
    with _LOCKS_LOCK:
        return _GENERATION_LOCKS.setdefault(model, threading.RLock())


@dataclass
class NemotronDiffusionGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    num_forwards (`torch.LongTensor` of shape `(batch_size,)`):
        Forwards each row took part in while generating, the prefill included.
    tokens_per_forward (`torch.FloatTensor` of shape `(batch_size,)`):
        New tokens of the row divided by its `num_forwards`.
    acceptance_lengths (`torch.LongTensor` of shape `(batch_size, max_cycles)`, *optional*):
        Spec modes: tokens emitted per draft/verify cycle (bonus included), 0-padded after the row's last cycle.
    """

    num_forwards: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    acceptance_lengths: torch.LongTensor | None = None


class _FirstStopRecorder(StoppingCriteriaList):
    """The stopping criteria of an AR call, recording the sequence length at which each row first stopped (EOS,
    stop strings, custom criteria alike), so that `num_forwards` counts only the forwards a row took part in."""

    def __init__(self, criteria):
        super().__init__(criteria)
        self.stop_length = None

    def __call__(self, input_ids, scores, **kwargs):
        done = super().__call__(input_ids, scores, **kwargs)
        if self.stop_length is None:
            self.stop_length = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        newly = done & (self.stop_length < 0)
        self.stop_length[newly] = input_ids.shape[1]
        return done


def _cache_from(model_kwargs):
    return model_kwargs.get("cache", model_kwargs.get("past_key_values"))


# ------------------------------------------------------------------------------------------------------ the mixin
class NemotronDiffusionGenerationMixin(GenerationMixin):
    """`generate()` with `decode_mode` in ("ar", "diffusion", "linear_spec", "quadratic_spec").

    Mode fields (see `NemotronDiffusionGenerationConfig`) are read with precedence: `generate()` kwarg > the passed
    `generation_config` > `model.generation_config` (e.g. a saved `generation_config.json`) > default.
    """

    # ---- configuration --------------------------------------------------------------------------------------
    def _prepare_generation_config(self, generation_config=None, **kwargs):
        for name in _FORBIDDEN_GENERATE_KWARGS:
            if name in kwargs:
                raise ValueError(
                    f"generate() does not take `{name}`: it would apply to every forward. Choose the decoding with "
                    f"`decode_mode` (one of {DECODE_MODES})."
                )
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in GENERATION_FIELDS}
        prepared, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        resolved = NemotronDiffusionGenerationConfig.resolved(
            prepared, overrides, generation_config, self.generation_config
        )
        resolved.validate_for_model(self.config)
        # Fields this call set (keyword arguments, a passed config); the model's saved defaults are not the call's.
        set_by_call = set(overrides) | (set(vars(generation_config)) if generation_config is not None else set())
        validate_generation_settings(resolved, self.config, set_by_call)
        return resolved, model_kwargs

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        mode = generation_config.decode_mode
        if mode == "ar":
            return

        def refuse(what):
            raise ValueError(f"decode_mode={mode!r} does not support {what}; use decode_mode='ar' for it.")

        if generation_mode in (GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE):
            refuse(f"beam search (num_beams={generation_config.num_beams})")
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            refuse(f"generation mode {generation_mode!r} (assistant_model, prompt lookup and similar)")
        if generation_mode_kwargs.get("assistant_model") is not None:
            refuse("`assistant_model`")
        if generation_mode_kwargs.get("synced_gpus"):
            refuse("`synced_gpus`")
        if generation_config.cache_implementation not in (None, "dynamic", "static"):
            refuse(f"cache_implementation={generation_config.cache_implementation!r} (use None/'dynamic' or 'static')")
        for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
            if getattr(generation_config, flag, False):
                refuse(f"`{flag}=True`")

    def _get_logits_processor(self, generation_config, input_ids_seq_length=None, *args, **kwargs):
        # The thinking budget is a logits processor of every decoding path (AR sampling, beams, assisted decoding
        # and the block loops), so it is added where transformers builds the list for all of them.
        processors = super()._get_logits_processor(generation_config, input_ids_seq_length, *args, **kwargs)
        if getattr(generation_config, "max_thinking_tokens", None) is not None:
            processors.append(
                ThinkingBudgetLogitsProcessor(
                    generation_config.max_thinking_tokens, generation_config.end_think_token_id, input_ids_seq_length
                )
            )
        return processors

    # ---- dispatch -------------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        # A drafter adapter serves only the bidirectional forwards of the modes in `drafter_modes`: every other
        # forward of every decoding path (AR steps, beams, assisted decoding, prefill, verify, commit) runs without
        # it, and each adapter's own state is restored afterwards.
        prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        validate_generate_inputs(prompt, kwargs.get("attention_mask"), self.config)
        passed = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        adapter = mode_field("drafter_adapter", kwargs, passed, self.generation_config)
        if adapter is None and peft_layers(self):
            logger.warning_once(
                "generate(): PEFT adapters are attached and `drafter_adapter` is None, so every adapter is treated "
                "as the drafter: it runs only in draft forwards, never in AR steps or verification. For a task "
                "adapter, set `drafter_adapter=False` (no drafter) or to the drafter's name."
            )
        if not (adapter is None or adapter is False or isinstance(adapter, str)):
            adapter = None  # an invalid value is named by the config's validation
        # The block loops run every forward inside their own switch (`_sample`); the other paths inside this one.
        block_mode = mode_field("decode_mode", kwargs, passed, self.generation_config) in _BLOCK_MODES
        drafting = contextlib.nullcontext() if block_mode else adapters_for_drafting(self, adapter)
        with _generation_lock(self), packed_linears(self), drafting:
            return super().generate(*args, **kwargs)

    def enable_merged_drafter(self, adapter_name=None, weight_format=None):
        """Keeps merged draft weights (W + ΔW per LoRA linear of the drafter) so that draft forwards which apply
        the drafter everywhere (LinearSpec, diffusion) cost a base forward, at the price of one more copy of each
        adapted weight in memory. Causal forwards keep the base weights. `weight_format="int8"` (bf16 on a CPU)
        keeps them as weight-only int8, and the LM head of draft forwards too (`Int8DraftHead`): cheaper draft
        forwards, slightly different drafts, still lossless. See `drafting_nemotron_diffusion.enable_merged_drafter`;
        returns the number of layers merged."""
        with _generation_lock(self):
            count = enable_merged_drafter(self, adapter_name, weight_format)
            self._int8_draft_head = Int8DraftHead(self.diffusion_head) if weight_format == "int8" else None
            return count

    def disable_merged_drafter(self):
        """Frees the weights kept by `enable_merged_drafter`."""
        with _generation_lock(self):
            disable_merged_drafter(self)
            self._int8_draft_head = None

    def enable_packed_weights(self):
        """Keeps a oneDNN-prepacked copy of each bfloat16 linear weight on a CPU, used by every forward inside
        generate() (all modes): the same products, bit-identical on torch 2.13, in 0.5-0.8x of F.linear's time at
        decoding sizes (the demo's AR steps took about 0.8x), for one more copy of those weights in memory
        (`packed_nemotron_diffusion`). Returns the number of layers packed (0 in float32 or on a GPU); call again
        after adding layers (a PEFT adapter)."""
        with _generation_lock(self):
            return enable_packed_weights(self)

    def disable_packed_weights(self):
        """Frees the copies kept by `enable_packed_weights`."""
        with _generation_lock(self):
            disable_packed_weights(self)

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **model_kwargs,
    ):
        mode = generation_config.decode_mode
        if mode == "ar":
            return self._ar_decode(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                **model_kwargs,
            )
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                f"decode_mode={mode!r} needs `input_ids` (mask tokens are appended to them), not `inputs_embeds`."
            )
        cache = _cache_from(model_kwargs)
        if getattr(cache, "_is_user_defined", False):
            raise ValueError(f"decode_mode={mode!r} does not take a user-supplied cache (`past_key_values`).")
        if generation_config.cache_implementation == "static":
            cache = self._static_cache_for(input_ids, generation_config)
        elif cache is None:
            cache = DynamicCache(config=self.config)
        if input_ids.shape[0] > 1 and streamer is not None:
            raise ValueError(f"decode_mode={mode!r} streams a batch of one row only; got {input_ids.shape[0]} rows.")
        pad = generation_config._pad_token_tensor
        rows = Rows(
            input_ids,
            model_kwargs.get("attention_mask"),
            max_new_tokens=generation_config.max_length - input_ids.shape[1],
            pad_token_id=int(pad) if pad is not None else 0,
            stopping_criteria=stopping_criteria,
            streamer=streamer,
            encoder_call=self._encoder_call(cache, generation_config),
            mask_length=cache.layers[0].max_cache_len if is_static_cache(cache) else None,
            prefill_inputs=self._prefill_inputs(model_kwargs),
        )
        loop = {
            "diffusion": self._diffusion_decode,
            "linear_spec": self._linear_spec_decode,
            "quadratic_spec": self._quadratic_spec_decode,
        }[mode]
        with adapters_for_drafting(self, generation_config.drafter_adapter, bypass=True) as switch, torch.no_grad():
            if mode == "quadratic_spec" and mode in generation_config.drafter_modes and not switch.can_gate:
                raise ValueError(
                    "drafter_modes includes 'quadratic_spec', but the drafter adapter has layers whose contribution "
                    "cannot be limited to the mask slots (QuadraticSpec needs LoRA on linear layers and trainable "
                    "tokens of the mask token only); remove 'quadratic_spec' from drafter_modes."
                )
            # In a mode the drafter does not serve, every forward runs without it.
            set_drafting = switch if mode in generation_config.drafter_modes else None
            loop(rows, cache, without_infinite_temperature(logits_processor), generation_config, set_drafting)
        sequences, num_forwards, tokens_per_forward, acceptance = rows.finish()
        if not generation_config.return_dict_in_generate:
            return sequences
        return NemotronDiffusionGenerateOutput(
            sequences=sequences,
            num_forwards=num_forwards,
            tokens_per_forward=tokens_per_forward,
            acceptance_lengths=acceptance,
        )

    def _encoder_call(self, cache, generation_config):
        """The backbone call of the block loops: compiled (`generation_config.compile_config`, CUDA graphs by
        default) under transformers' own auto-compile rule, i.e. with a static cache on an accelerator unless
        `disable_compile`; eager otherwise. Each block kind has fixed shapes, so each compiles once."""
        if not (
            is_static_cache(cache)
            and self._valid_auto_compile_criteria({"cache": cache, "past_key_values": cache}, generation_config)
        ):
            return self.encoder.__call__
        compile_config = generation_config.compile_config or CompileConfig()
        # Kept on the model like transformers' own `get_compiled_call`, so graphs survive across generate calls.
        cached = getattr(self, "_compiled_encoder_call", None)
        if cached is None or cached[0] != compile_config:
            cached = (compile_config, torch.compile(self.encoder.__call__, **compile_config.to_dict()))
            self._compiled_encoder_call = cached
        return cached[1]

    def _static_cache_for(self, input_ids, generation_config):
        """A StaticCache with room for the prompt, every new token and the largest chunk a loop writes past the
        committed tokens (a verify block or tree, or QuadraticSpec's B*(B+1) chunk). In a batch, rows that keep fewer
        tokens leave holes until compaction (at most a quarter of the cache): the committed part gets 4/3 room."""
        batch = input_ids.shape[0]
        committed = generation_config.max_length  # prompt + new tokens
        if batch > 1:
            committed = -(-4 * committed // 3)
        block = min(generation_config.block_size, generation_config.max_length - input_ids.shape[1])
        room = committed + block * (block + 1) + 2 * block
        width = generation_config.tree_width or 1
        if generation_config.decode_mode == "linear_spec" and width > 1:
            room += 2 * (width - 1) * min(generation_config.tree_slots, block)  # a verify tree's siblings
        return StaticCache(config=self.config, max_cache_len=room)

    def _ar_decode(
        self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
    ):
        recorder = _FirstStopRecorder(stopping_criteria)
        with adapters_for_drafting(self, generation_config.drafter_adapter, bypass=True):  # AR never drafts
            out = super()._sample(
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=recorder,
                generation_config=generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        if not generation_config.return_dict_in_generate:
            return out
        # One forward per new token (the prefill gives the first); a row stops counting where it stopped.
        prompt_length = input_ids.shape[1]
        new = out.sequences.shape[1] - prompt_length
        counts = torch.full((out.sequences.shape[0],), new, dtype=torch.long, device=out.sequences.device)
        if recorder.stop_length is not None:
            stopped = recorder.stop_length >= 0
            counts = torch.where(stopped, recorder.stop_length - prompt_length, counts)
        fields = {k: v for k, v in out.items()}
        return NemotronDiffusionGenerateOutput(
            **fields, num_forwards=counts, tokens_per_forward=torch.ones(counts.shape[0], device=counts.device)
        )

    # ---- shared steps ---------------------------------------------------------------------------------------
    def _prefill_inputs(self, model_kwargs):
        """Model inputs that only the prompt's forward takes (a VLM's `pixel_values`/`image_sizes`), picked from
        `generate()`'s model kwargs; the block loops pass them to the prefill and to no other forward."""
        return {}

    def _block_forward(self, rows, cache, input_ids, *, is_causal, update_cache=True, positions=None,
                       attention_mask=None, mask_function=None, eager=False, extra_inputs=None):
        """Hidden states [live, K, H] of one backbone forward of `input_ids` [live, K] on top of the cache.

        By default the K tokens are a block at each row's next positions, seeing the row's real cache slots.
        `positions` / `attention_mask` ([live, K] / [live, S + K]) place them otherwise (the prompt, QuadraticSpec's
        bootstrap). `mask_function` is a custom attention pattern; it is turned into a mask here, outside the
        possibly compiled call (a closure would be a new graph input every cycle). `eager` runs the uncompiled
        backbone, for forwards whose shapes change every call. `extra_inputs` go to the backbone as they are (the
        prefill's `Rows.prefill_inputs`)."""
        k = input_ids.shape[1]
        if positions is None:
            positions = rows.slots.positions(torch.arange(k, device=input_ids.device))
        if attention_mask is None:
            attention_mask = rows.slots.attention_mask(k)
        if mask_function is not None:
            attention_mask = self._custom_attention_mask(cache, input_ids, attention_mask, positions, mask_function)
            is_causal = False
        call = self.encoder.__call__ if eager else rows.encoder_call
        out = call(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            is_causal=is_causal,
            update_cache=update_cache,
            **(extra_inputs or {}),
        )
        return out.last_hidden_state

    def _custom_attention_mask(self, cache, input_ids, attention_mask, positions, mask_function):
        """The attention mask of a chunk with a custom pattern: `mask_function` (one of the index-based patterns
        below) AND the 2-D padding mask `attention_mask` [live, S + K] over every key slot.

        With sdpa (also what FlashAttention calls with custom masks run on) it is evaluated once on broadcast index
        tensors, as transformers does for its own patterns; transformers evaluates a custom function with vmap
        instead (it cannot know it is index-based), ~3 ms a forward on a CPU. Other backends take transformers'
        builder. `test_custom_attention_mask_equals_transformers_mask` holds the two to the same mask."""
        if self.config._attn_implementation not in ("sdpa", "flash_attention_2", "flash_attention_3"):
            return self.encoder.build_attention_mask(
                torch.empty(input_ids.shape + (0,), dtype=self.dtype, device=input_ids.device),
                attention_mask, cache, positions, is_causal=False, mask_function=mask_function,
            )
        device = input_ids.device
        start = int(cache.get_seq_length())
        queries = torch.arange(start, start + input_ids.shape[1], device=device)
        keys = torch.arange(attention_mask.shape[1], device=device)
        batch = torch.arange(input_ids.shape[0], device=device)
        allowed = mask_function(batch[:, None, None, None], torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                                queries[None, None, :, None], keys[None, None, None, :])
        return allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]

    @staticmethod
    @contextlib.contextmanager
    def _drafting(set_drafting, only_at=None):
        """The drafter on for the forwards inside: everywhere, or at the `only_at` [live, K] positions; a no-op
        where the mode's forwards run without it (`set_drafting` None)."""
        if set_drafting is None:
            yield
            return
        set_drafting(True, only_at)
        try:
            yield
        finally:
            set_drafting(False)

    def _head(self, hidden):
        """Logits [..., V] of hidden states [..., H]: the LM head of the block loops' causal forwards."""
        return apply_head(self.diffusion_head, hidden)

    def _draft_head(self, hidden, set_drafting):
        """The LM head of draft forwards (LinearSpec's drafts, diffusion's denoising): its int8 copy where the
        drafter serves the mode (`set_drafting` not None) and the merged drafter is kept as int8
        (`enable_merged_drafter`), else the head itself."""
        int8_head = getattr(self, "_int8_draft_head", None)
        return self._head(hidden) if int8_head is None or set_drafting is None else int8_head(hidden)

    def _prefill_prompt(self, rows, cache, is_causal=True):
        """One forward over the prompt that writes the cache; returns the last position's logits [live, V]."""
        hidden = self._block_forward(
            rows, cache, rows.prompt, is_causal=is_causal, positions=rows.slots.prompt_positions(),
            attention_mask=rows.slots.slot_mask, eager=True, extra_inputs=rows.prefill_inputs,
        )
        rows.count_forward()
        return self._head(hidden[:, -1])

    def _seed_from_logits(self, rows, logits, logits_processor, generation_config, exclude_mask=False):
        """The AR token that follows each live row: processors with the exact prefix, then argmax or sample."""
        if exclude_mask:
            logits = exclude_token(logits, self.config.mask_token_id)
        scores = process_block(
            logits_processor, rows, torch.empty(rows.size, 0, dtype=torch.long, device=logits.device), logits[:, None]
        )[:, 0]
        return sample_or_argmax(scores, generation_config.do_sample)

    # ---- block diffusion ------------------------------------------------------------------------------------
    def _diffusion_decode(self, rows, cache, logits_processor, generation_config, set_drafting):
        """Block diffusion (NVIDIA's `generate`, with per-row finishing).

        Per block of B slots: with `causal_context`, slot 0 holds the AR seed of the causal prefix and the other
        slots start masked. Each denoising forward reads the prefix cache without writing it; every masked slot
        whose confidence (probability of its candidate, at T=1) reaches the threshold is committed, plus the most
        confident one or, with `commit_order="leftmost"`, the leftmost masked one (without a threshold, the
        schedule's count in that order: one per step). With `defer_adjacent_repeats`, a slot whose candidate equals
        its still-masked left neighbour's waits for a later step. Candidates are the argmax or, at T > 0, a
        Gumbel-max sample of the processed scores. Committed tokens never change, so the contiguous committed
        prefix of the block is emitted (and checked by the stopping criteria) as soon as it grows. One causal
        forward per block then writes the block to the cache and yields the next seed. With `fused_commit_forward`
        that forward also carries the next block's masks, which see the cache, the finished block and each other
        (with the drafter, if it serves diffusion, at those masks only): their logits are the next block's first
        denoising step, one forward fewer per block. Its slot 0 was a mask there, not the seed, so that step commits
        only the slots that reach the threshold.

        Per block: 1. the block is the seed and masks; 2. a denoising step: the look-ahead logits of the commit
        forward (fused), else one bidirectional forward; 3. candidates, confidences and commits; 4. the committed
        prefix is emitted; 2-4 repeat until every live row has its block; 5. the commit forward (causal) writes the
        block to the cache and yields the next seed (and, fused, the next block's look-ahead logits).
        """
        config = generation_config
        mask_id, end_think = self.config.mask_token_id, config.end_think_token_id
        threshold, causal = config.confidence_threshold, config.causal_context
        device = rows.prompt.device
        seed_logits = self._prefill_prompt(rows, cache, is_causal=causal)
        seeds = (
            self._seed_from_logits(rows, seed_logits, logits_processor, config, exclude_mask=True) if causal else None
        )
        lookahead_logits = None  # [live, B, V]: the next block's first denoising step, from the commit forward

        while rows.size:
            block_size = min(config.block_size, int(rows.remaining().max()))  # no slots past the budget
            block = torch.full((rows.size, block_size), mask_id, dtype=torch.long, device=device)
            masked = torch.ones(rows.size, block_size, dtype=torch.bool, device=device)
            if causal:
                block[:, 0], masked[:, 0] = seeds, False
            forbidden = torch.zeros_like(masked)
            if config.max_thinking_tokens is not None:
                self._inject_thinking_budget(rows, block, masked, forbidden, config)
            needed = rows.remaining().clamp(max=block_size)  # a final block may need only its first slots
            masks_at_start = masked.sum(dim=1)
            emitted = rows.emit(block, contiguous_committed(masked).clamp(max=needed))
            steps = 0
            while True:
                block, masked, forbidden, needed, masks_at_start, emitted, lookahead_logits = rows.drop_finished(
                    cache, block, masked, forbidden, needed, masks_at_start, emitted, lookahead_logits
                )
                live = emitted < needed
                if not bool(live.any()):
                    break
                lookahead = lookahead_logits is not None
                if lookahead:  # 2. this step was computed by the commit forward
                    logits, lookahead_logits = lookahead_logits, None
                else:
                    with self._drafting(set_drafting):
                        hidden = self._block_forward(rows, cache, block, is_causal=False, update_cache=False)
                    logits = self._draft_head(hidden, set_drafting)
                    rows.count_forward(live)
                candidate_logits = exclude_token(logits, mask_id)
                if config.max_thinking_tokens is not None:
                    ban = forbidden & masked
                    candidate_logits[..., end_think] = candidate_logits[..., end_think].masked_fill(ban, -math.inf)
                scores = process_block(logits_processor, rows, block, candidate_logits)
                candidates = gumbel_argmax(scores) if config.do_sample else scores.argmax(dim=-1)
                # NVIDIA's confidence: probability of the candidate under the raw logits at T = 1.
                confidence = softmax_probs(logits).gather(-1, candidates[..., None])[..., 0]
                confidence = torch.where(masked, confidence, -math.inf)
                # The look-ahead step is not counted against max_denoising_steps and forces no commit: its
                # guesses did not see the seed (which already makes this block progress).
                steps += 0 if lookahead else 1
                last_step = not lookahead and config.max_denoising_steps is not None and (
                    steps >= config.max_denoising_steps
                )
                commit = select_commits(
                    confidence, masked, threshold, masks_at_start=masks_at_start, step=steps - 1,
                    max_steps=config.max_denoising_steps, last_step=last_step,
                    leftmost=config.commit_order == "leftmost",
                    candidates=candidates if config.defer_adjacent_repeats else None, at_least_one=not lookahead,
                )
                commit &= live[:, None]
                block = torch.where(commit, candidates, block)
                masked = masked & ~commit
                ready = contiguous_committed(masked).clamp(max=needed)
                emitted = emitted + rows.emit(shift_left(block, emitted), ready - emitted)
            if not rows.size:
                break
            # 5. Every live row completed its block: one forward writes it to the cache and seeds the next block (the
            # head only at the block's last slot: the seed is all it is needed for).
            next_size = min(config.block_size, int(rows.remaining().max()))
            if config.fused_commit_forward and next_size > 1:
                hidden, lookahead_logits = self._commit_with_lookahead(rows, cache, block, next_size, set_drafting)
            else:
                hidden = self._block_forward(rows, cache, block, is_causal=causal, update_cache=True)
            rows.count_forward()
            rows.slots.append(torch.full((rows.size,), block_size, dtype=torch.long, device=device))
            if causal:
                seeds = self._seed_from_logits(rows, self._head(hidden[:, block_size - 1]), logits_processor, config,
                                               exclude_mask=True)

    def _commit_with_lookahead(self, rows, cache, block, next_size, set_drafting):
        """The commit forward of `fused_commit_forward`: [block, masks x next_size] at the rows' next positions; the
        block is causal (its K/V enter the cache exactly as in the plain commit forward) and the masks see the cache,
        the block and each other, like a denoising forward of the next block whose seed slot is still a mask. Only
        the block's K/V are kept. Returns (hidden [live, B, H] of the block, the masks' logits [live, next_size, V]).
        """
        device = block.device
        block_size = block.shape[1]
        masks = torch.full((rows.size, next_size), self.config.mask_token_id, dtype=torch.long, device=device)
        chunk = torch.cat([block, masks], dim=1)
        mask_slots = (torch.arange(chunk.shape[1], device=device) >= block_size)[None, :].expand(rows.size, -1)
        first_mask = int(cache.get_seq_length()) + block_size
        with self._drafting(set_drafting, only_at=mask_slots):
            hidden = self._block_forward(rows, cache, chunk, is_causal=False,
                                         mask_function=_causal_then_masks_mask_function(first_mask))
        rewind_cache(cache, next_size)
        return hidden[:, :block_size], self._draft_head(hidden[:, block_size:], set_drafting)

    def _inject_thinking_budget(self, rows, block, masked, forbidden, config):
        """Thinking budget inside a diffusion block (in place): if generated index `max_thinking_tokens` falls in
        this block and the row has not emitted the end-of-thinking token, that slot is committed to it up front and
        the token is forbidden at the masked slots before it, so it appears exactly once, at the budget. The only
        committed token it can replace is an AR seed at the very budget index, which AR decoding replaces too."""
        end = config.end_think_token_id
        offsets = config.max_thinking_tokens - rows.num_emitted[rows.active]
        for b in range(rows.size):
            k, row = int(offsets[b]), int(rows.active[b])
            if not 0 <= k < block.shape[1]:
                continue
            emitted_end = bool((rows.tokens[row, : rows.num_emitted[row]] == end).any())
            committed_end = bool(((block[b, :k] == end) & ~masked[b, :k]).any())  # e.g. the block's AR seed
            if emitted_end or committed_end:
                continue
            if k == 0 or masked[b, k]:
                block[b, k], masked[b, k] = end, False
                forbidden[b, :k] = True

    # ---- LinearSpec -----------------------------------------------------------------------------------------
    def _linear_spec_decode(self, rows, cache, logits_processor, generation_config, set_drafting):
        """LinearSpec. After the prefill emits the first AR token, each cycle:

        1. drafts a block: a bidirectional forward over [seed, masks] (drafter on, cache read-only);
        2. verifies it: a causal forward over [seed, drafts] (base weights, cache written), or with `tree_width`
           (greedy) over a verify tree: the chain plus the drafter's runner-ups at the first `tree_slots` slots
           (`verify_tree_nemotron_diffusion`), each node attending to its own path only;
        3. accepts drafts against the verifier's tokens (greedy) or by rule R (sampling);
        4. keeps the cache entries of the seed and the accepted drafts and emits them with the correction/bonus.

        With `confidence_threshold`, drafting takes several forwards; each fills the masked slots whose
        confidence reaches the threshold (at least one). Under sampling the slots are filled left to right (the
        leftmost masked slot and the contiguous slots after it whose highest probability reaches the threshold),
        a rule that depends on the drafter's distributions, never on sampled values; each draft token is therefore
        drawn from a recorded q given only the tokens to its left, which is what rule R needs to be exact.
        """
        config = generation_config
        device = rows.prompt.device
        tree_width = 1 if config.do_sample or config.tree_width is None else config.tree_width
        seed_logits = self._prefill_prompt(rows, cache)
        seeds = self._seed_from_logits(rows, seed_logits, logits_processor, config)
        rows.emit(seeds[:, None], torch.ones(rows.size, dtype=torch.long, device=device))
        rows.drop_finished(cache)
        while rows.size:
            block_size = min(config.block_size, int(rows.remaining().max()))
            seeds = rows.last_tokens()
            # 1. draft
            drafts, draft_probs, runner_ups = self._draft_block(
                rows, cache, seeds, block_size, logits_processor, config, set_drafting, runner_ups=tree_width - 1
            )
            if tree_width > 1 and drafts.shape[1]:
                # 2. verify a tree, 3. accept its longest matching path, 4. keep that path's entries
                tree = verify_tree(drafts.shape[1], tree_width, config.tree_slots, device)
                tokens = tree.tokens(seeds, drafts, runner_ups)
                hidden = self._block_forward(
                    rows, cache, tokens, is_causal=False, positions=rows.slots.positions(tree.depth),
                    mask_function=_chunk_mask_function(int(cache.get_seq_length()), tree.ancestors),
                )
                rows.count_forward()
                scores = process_tree(logits_processor, rows, tokens, tree.ancestors, self._head(hidden))
                path, kept, emitted = tree.accept_greedy(tokens, scores.argmax(dim=-1))
                keep_chunk_entries(cache, tree.size, path)
            else:
                # 2. verify
                block = torch.cat([seeds[:, None], drafts], dim=1)
                logits = self._head(self._block_forward(rows, cache, block, is_causal=True, update_cache=True))
                rows.count_forward()
                # 3. accept
                scores = process_block(logits_processor, rows, block[:, 1:], logits)
                accepted, emitted = speculative_accept(drafts, scores, draft_probs, config.do_sample)
                # 4. keep the seed and the accepted drafts (exact causal entries)
                kept = accepted + 1
                rewind_cache(cache, block_size - int(kept.max()))
            rows.slots.append(kept)
            n = rows.emit(emitted, kept)  # the accepted drafts and the correction/bonus
            rows.record_cycle(n)
            rows.drop_finished(cache)
            rows.slots.compact(cache)

    def _draft_block(self, rows, cache, seeds, block_size, logits_processor, config, set_drafting, runner_ups=0):
        """Drafts for the block slots 1..B-1 after each row's (already emitted) seed, from bidirectional forwards
        over the read-only cache with the drafter adapter on. Returns (drafts [live, B-1], q [live, B-1, V] or
        None for deterministic drafts, alternatives [live, B-1, runner_ups] or None): the alternatives are each
        slot's next-best tokens after its draft (greedy), from the forward that committed the slot."""
        mask_id = self.config.mask_token_id
        device = seeds.device
        if block_size == 1:
            return torch.empty(rows.size, 0, dtype=torch.long, device=device), None, None
        block = torch.full((rows.size, block_size), mask_id, dtype=torch.long, device=device)
        block[:, 0] = seeds
        masked = torch.ones(rows.size, block_size - 1, dtype=torch.bool, device=device)
        threshold, draft_probs, alternatives = config.confidence_threshold, None, None
        while bool(masked.any()):
            with self._drafting(set_drafting):
                hidden = self._block_forward(rows, cache, block, is_causal=False, update_cache=False)
            rows.count_forward(masked.any(dim=1))
            logits = exclude_token(self._draft_head(hidden[:, 1:], set_drafting), mask_id)
            if config.do_sample:
                probs, tokens = self._sample_drafts(rows, block, masked, logits, logits_processor, prefix_start=1)
                if threshold is None:
                    commit = masked
                else:
                    commit = left_to_right_commits(probs.max(dim=-1).values, masked, threshold)
                draft_probs = probs if draft_probs is None else torch.where(commit[..., None], probs, draft_probs)
            else:
                scores = process_block(logits_processor, rows, block[:, 1:], logits)
                tokens = scores.argmax(dim=-1)
                if threshold is None:
                    commit = masked
                else:
                    confidence = softmax_probs(logits).gather(-1, tokens[..., None])[..., 0]
                    commit = select_commits(torch.where(masked, confidence, -math.inf), masked, threshold)
                if runner_ups:
                    others = scores.scatter(-1, tokens[..., None], -math.inf).topk(runner_ups, dim=-1).indices
                    alternatives = others if alternatives is None else torch.where(commit[..., None], others,
                                                                                   alternatives)
            block[:, 1:] = torch.where(commit, tokens, block[:, 1:])
            masked = masked & ~commit
        return block[:, 1:], draft_probs, alternatives

    def _sample_drafts(self, rows, block, masked, logits, logits_processor, prefix_start):
        """Sampled drafts for the masked slots of block[:, 1:] (logits [live, B-1, V]).

        Slot j is drawn from q_j = softmax(processed logits), whose processors see the row's emitted tokens plus
        block[prefix_start : j + 1] as prefix. Slots are drawn left to right, so d_j ~ q_j( . | d_<j) also holds
        for processors that read the prefix. Returns (q [live, B-1, V], tokens [live, B-1])."""
        tokens = block[:, 1:].clone()
        if all(isinstance(p, PREFIX_FREE_PROCESSORS) for p in logits_processor):
            probs = softmax_probs(process_block(logits_processor, rows, tokens, logits))
            sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(tokens.shape)
            return probs, torch.where(masked, sampled, tokens)
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        context = block[:, prefix_start:].clone()
        for j in range(logits.shape[1]):
            first = 1 - prefix_start + j
            probs[:, j] = softmax_probs(
                process_block(logits_processor, rows, context, logits[:, j : j + 1], first=first)[:, 0]
            )
            sampled = torch.multinomial(probs[:, j], 1)[:, 0]
            tokens[:, j] = torch.where(masked[:, j], sampled, tokens[:, j])
            context[:, first] = tokens[:, j]
        return probs, tokens

    # ---- QuadraticSpec --------------------------------------------------------------------------------------
    def _quadratic_spec_decode(self, rows, cache, logits_processor, generation_config, set_drafting):
        """QuadraticSpec (TiDAR-style): one forward per cycle verifies the current draft causally and drafts the
        next block for every possible acceptance length.

        The chunk holds B rows of B+1 tokens: row i = [d_i, mask x B] at positions c+i .. c+i+B. Draft tokens are
        causal among themselves (d_i sees the prefix and d_0..d_i: exact AR queries); row i's masks see the prefix,
        d_0..d_i and their own row bidirectionally. d_0 (the previous AR token) is always accepted; d_{i+1} is
        checked against row i's causal logits. The next draft is the accepted row's masks, whose first slot takes
        the AR token that follows the accepted prefix. Only the accepted draft tokens' K/V are kept in the cache.
        The first cycle is a bootstrap forward over [prompt, masks] that doubles as the prefill. Every forward
        verifies, so its draft slots and the cache run with base weights; a drafter serving this mode
        (`drafter_modes`) is applied at the mask slots only, which nothing verified attends to.

        Per cycle: 1. build the chunk from the current draft; 2. one forward (verify + draft); 3. accept against
        the draft rows' causal logits; 4. keep the accepted drafts' cache entries and emit; 5. the accepted row's
        masks give the next draft.
        """
        config = generation_config
        mask_id = self.config.mask_token_id
        device = rows.prompt.device
        drafts, draft_probs = self._quadratic_bootstrap(rows, cache, logits_processor, config, set_drafting)
        while rows.size:
            remaining = rows.remaining()
            # A row with one token of budget left emits its pending AR token without a forward.
            if bool((remaining == 1).any()):
                ones = (remaining == 1).long()
                rows.emit(drafts[:, :1], ones)
                drafts, draft_probs = rows.drop_finished(cache, drafts, draft_probs)
                if not rows.size:
                    break
                remaining = rows.remaining()
            block_size = min(drafts.shape[1], int(remaining.max()))
            drafts = drafts[:, :block_size]
            draft_probs = draft_probs[:, : block_size - 1] if draft_probs is not None else None
            row_len = block_size + 1
            chunk = torch.full((rows.size, block_size, row_len), mask_id, dtype=torch.long, device=device)
            chunk[:, :, 0] = drafts
            chunk = chunk.reshape(rows.size, -1)
            offsets = (
                torch.arange(block_size, device=device)[:, None] + torch.arange(row_len, device=device)[None, :]
            ).reshape(-1)
            # The drafter at the mask slots only (by position: an AR token may be the mask id itself).
            mask_slots = (torch.arange(chunk.shape[1], device=device) % row_len > 0)[None, :].expand(rows.size, -1)
            with self._drafting(set_drafting, only_at=mask_slots):
                hidden = self._block_forward(
                    rows, cache, chunk, is_causal=False, positions=rows.slots.positions(offsets),
                    mask_function=_quadratic_mask_function(int(cache.get_seq_length()), block_size, device),
                )
            rows.count_forward()
            hidden = hidden.reshape(rows.size, block_size, row_len, -1)
            batch = torch.arange(rows.size, device=device)
            # Small blocks: one head call over every row's draft slot and masks 2..B (the head's weight, the bulk
            # of its cost at a few rows, is read once); larger ones: the draft slots, then the accepted row's masks.
            one_call = block_size <= _ONE_HEAD_CALL_MAX_BLOCK
            all_logits = self._head(hidden[:, :, [0, *range(2, row_len)]]) if one_call else None
            target_logits = all_logits[:, :, 0] if all_logits is not None else self._head(hidden[:, :, 0])
            # Row i's causal logits follow d_0..d_i, none of which is emitted yet.
            scores = process_block(logits_processor, rows, drafts, target_logits, first=1)
            accepted, emitted = speculative_accept(drafts[:, 1:], scores, draft_probs, config.do_sample)
            take = accepted + 1  # d_0 .. d_accepted
            # Keep only the accepted draft tokens' entries (exact causal K/V): d_0 .. d_accepted of each row.
            keep_chunk_entries(cache, chunk.shape[1], torch.arange(int(take.max()), device=device) * row_len)
            rows.slots.append(take)
            n = rows.emit(drafts, take)
            rows.record_cycle(n)
            # Next draft: the accepted row's masks; slot 0 is the AR token after the accepted prefix.
            next_logits = exclude_token(
                all_logits[batch, accepted, 1:] if all_logits is not None else self._head(hidden[batch, accepted, 2:]),
                mask_id,
            )
            next_first = emitted[batch, accepted]
            drafts, draft_probs = self._next_quadratic_draft(rows, next_first, next_logits, logits_processor, config)
            drafts, draft_probs = rows.drop_finished(cache, drafts, draft_probs)
            rows.slots.compact(cache)

    def _quadratic_bootstrap(self, rows, cache, logits_processor, config, set_drafting):
        """[prompt | masks x B]: the prompt is causal, the masks see the prompt and each other. The prompt's K/V are
        kept; the first draft is the AR token after the prompt followed by the masks' diffusion guesses."""
        mask_id = self.config.mask_token_id
        block_size = max(2, min(config.block_size, rows.max_new_tokens))
        device = rows.prompt.device
        masks = torch.full((rows.size, block_size), mask_id, dtype=torch.long, device=device)
        positions = torch.cat(
            [rows.slots.prompt_positions(), rows.slots.positions(torch.arange(block_size, device=device))], dim=1
        )
        input_ids = torch.cat([rows.prompt, masks], dim=1)
        # The drafter at the mask slots only: the prompt's K/V enter the cache as the base model computes them.
        mask_slots = (torch.arange(input_ids.shape[1], device=device) >= rows.prompt_length)[None, :]
        with self._drafting(set_drafting, only_at=mask_slots.expand(rows.size, -1)):
            hidden = self._block_forward(
                rows, cache, input_ids, is_causal=False, positions=positions,
                attention_mask=rows.slots.attention_mask(block_size),
                mask_function=_causal_then_masks_mask_function(rows.prompt_length), eager=True,
                extra_inputs=rows.prefill_inputs,
            )
        rewind_cache(cache, block_size)
        rows.count_forward()
        ar_logits = self._head(hidden[:, rows.prompt_length - 1])
        first = self._seed_from_logits(rows, ar_logits, logits_processor, config)
        mask_logits = exclude_token(self._head(hidden[:, rows.prompt_length + 1 :]), mask_id)
        return self._next_quadratic_draft(rows, first, mask_logits, logits_processor, config)

    def _next_quadratic_draft(self, rows, first, mask_logits, logits_processor, config):
        """Draft = [first, guesses]: `first` is the AR token that follows the emitted tokens (always accepted next
        cycle), the guesses come from mask_logits [live, B-1, V]. Returns (draft [live, B], q or None)."""
        guesses = torch.full(mask_logits.shape[:2], self.config.mask_token_id, dtype=torch.long, device=first.device)
        block = torch.cat([first[:, None], guesses], dim=1)
        if config.do_sample:
            probs, guesses = self._sample_drafts(
                rows, block, torch.ones_like(guesses, dtype=torch.bool), mask_logits, logits_processor, prefix_start=0
            )
            return torch.cat([first[:, None], guesses], dim=1), probs
        scores = process_block(logits_processor, rows, block, mask_logits, first=1)
        return torch.cat([first[:, None], scores.argmax(dim=-1)], dim=1), None


# ------------------------------------------------------------------------------------------ attention patterns
@functools.lru_cache(maxsize=16)
def _quadratic_chunk_pattern(block_size, device):
    """[Q, Q] bool, Q = B*(B+1): which chunk slot may attend to which. Row i of the layout is [d_i, mask x B]; d_i
    sees d_0..d_i (causal among draft tokens); a mask of row i sees d_0..d_i and every mask of its own row."""
    row_len = block_size + 1
    local = torch.arange(block_size * row_len, device=device)
    row, offset = local // row_len, local % row_len
    draft_key = (offset[None, :] == 0) & (row[None, :] <= row[:, None])
    own_row_masks = (offset[:, None] > 0) & (offset[None, :] > 0) & (row[:, None] == row[None, :])
    return draft_key | own_row_masks


def _quadratic_mask_function(start, block_size, device):
    """Attention of the QuadraticSpec chunk (slots start.. of B rows x (B+1)): every query sees the whole cached
    prefix; inside the chunk, the fixed pattern above."""
    return _chunk_mask_function(start, _quadratic_chunk_pattern(block_size, torch.device(device)))


def _chunk_mask_function(start, pattern):
    """Attention of a chunk written at cache slots start.. with the in-chunk pattern [Q, Q] (QuadraticSpec's rows,
    a verify tree's ancestors): every query sees the whole cached prefix, and inside the chunk what the pattern
    allows (a table lookup, cheap to expand and compile-friendly)."""
    last = pattern.shape[0] - 1

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        kv_local = kv_idx - start
        return (kv_local < 0) | pattern[(q_idx - start).clamp(0, last), kv_local.clamp(0, last)]

    return mask


def _causal_then_masks_mask_function(first_mask):
    """[tokens | masks] with the masks from cache slot `first_mask` on: the tokens are causal, the masks see
    everything (QuadraticSpec's bootstrap [prompt | masks], diffusion's commit forward with a look-ahead)."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (q_idx >= first_mask)

    return mask


__all__ = ["DECODE_MODES", "NemotronDiffusionGenerateOutput", "NemotronDiffusionGenerationMixin"]
