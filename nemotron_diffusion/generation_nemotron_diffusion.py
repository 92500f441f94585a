# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Generation for tri-mode models: `model.generate(decode_mode=...)`.

`generate()` is transformers' own: it prepares inputs, the cache, logits processors, stopping criteria and the
streamer, then calls `_sample`, which we override as a dispatcher on `generation_config.decode_mode`:

* `"ar"`: transformers' `_sample`, unchanged (greedy, sampling, processors, streamers, beams, assisted decoding).
* `"diffusion"`: block diffusion (`_diffusion_decode`).
* `"linear_spec"`: draft a block with diffusion, verify it causally (`_linear_spec_decode`).
* `"quadratic_spec"`: draft and verify in one forward (`_quadratic_spec_decode`).

Each loop reads top to bottom; the steps they share (prefill, token selection with logits processors, the per-row
emission with stopping criteria and streaming, the ragged cache of a batch) are written once below.

Forward counting (`num_forwards` in the output): every physical forward a row takes part in while it is still
generating, the prefill included. `tokens_per_forward` = new tokens / `num_forwards`.
"""

import contextlib
import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import CompileConfig, GenerationMixin
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_nemotron_diffusion import (
    compact_cache_rows,
    is_static_cache,
    keep_chunk_entries,
    rewind_cache,
    select_cache_rows,
)

DECODE_MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")

# Generation-config fields of this package, with their defaults. `block_size` and `confidence_threshold` default
# per mode (`_MODE_DEFAULTS`; block size 16 for QuadraticSpec, whose forward carries B*(B+1) query tokens).
GENERATION_FIELDS = {
    # Which decoding loop runs: one of DECODE_MODES.
    "decode_mode": "ar",
    # Tokens per diffusion block / speculative draft (int >= 1). Default 32; 16 for quadratic_spec.
    "block_size": None,
    # Diffusion: commit every masked slot whose confidence reaches it (plus the most confident one) per step.
    # None: one slot per step. Spec modes: None drafts a block in one forward; a value drafts in several forwards.
    # Default 0.9 in diffusion mode, None in the spec modes.
    "confidence_threshold": None,
    # Diffusion: seed each block with the AR token of the causal prefix (True, NVIDIA's default), or encode the
    # prompt and commit blocks bidirectionally (False).
    "causal_context": True,
    # Diffusion: at most this many denoising forwards per block; the last one commits every remaining slot.
    "max_denoising_steps": None,
    # Thinking budget: after this many generated tokens without `end_think_token_id`, that token is emitted next.
    "max_thinking_tokens": None,
    "end_think_token_id": None,
    # Spec modes: name of the PEFT adapter used for drafting (None = every attached adapter is the drafter).
    "drafter_adapter": None,
}
_MODE_DEFAULTS = {
    "block_size": {"ar": 32, "diffusion": 32, "linear_spec": 32, "quadratic_spec": 16},
    "confidence_threshold": {"ar": None, "diffusion": 0.9, "linear_spec": None, "quadratic_spec": None},
}
_MODE_DEFAULT = object()  # placeholder for "not set anywhere": resolved per decode_mode
# Forward arguments that select an attention pattern: `generate` must never pass them to every forward.
_FORBIDDEN_GENERATE_KWARGS = ("is_causal", "update_cache", "mask_function", "labels")
# Logits processors that do not read `input_ids`: safe to apply to many positions at once.
_PREFIX_FREE_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    SuppressTokensLogitsProcessor,
)


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


class ThinkingBudgetLogitsProcessor(LogitsProcessor):
    """Forces `end_think_token_id` as generated token number `max_thinking_tokens + 1` (0-based index
    `max_thinking_tokens`) of every row that has not emitted it yet. Injected once: a row that already contains the
    token is left alone. In AR and speculative decoding it sees the exact prefix, so the forced token is emitted
    like any other token and enters the cache as the next input."""

    def __init__(self, max_thinking_tokens: int, end_think_token_id: int, prompt_length: int):
        self.max_thinking_tokens = max_thinking_tokens
        self.end_think_token_id = end_think_token_id
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] != self.max_thinking_tokens:
            return scores
        force = ~(generated == self.end_think_token_id).any(dim=1)
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.end_think_token_id] = 0.0
        return torch.where(force[:, None], forced, scores)


# --------------------------------------------------------------------------------------------------------- helpers
def _cache_from(model_kwargs):
    return model_kwargs.get("cache", model_kwargs.get("past_key_values"))


def _run_processors(logits_processor, prefix_ids, scores):
    """Apply the processors to `scores` [N, V] whose rows all continue `prefix_ids` [N, T]."""
    return logits_processor(prefix_ids, scores) if len(logits_processor) else scores


def _process_block(logits_processor, rows, block_ids, logits, first=0):
    """Logits processors on block positions, each with its exact prefix.

    logits: [B, K, V] for block slots first..first+K-1; slot j continues `rows.sequences()[b] + block_ids[b, :j]`.
    Processors that never read the prefix run once on all positions; the others run per row and position, because
    rows of a batch have different lengths (`MinNewTokensLength`, repetition penalties and the thinking budget
    depend on them).
    """
    if not len(logits_processor):
        return logits
    batch, k, vocab = logits.shape
    if all(isinstance(p, _PREFIX_FREE_PROCESSORS) for p in logits_processor):
        dummy = torch.zeros((batch * k, 1), dtype=torch.long, device=logits.device)
        return logits_processor(dummy, logits.reshape(batch * k, vocab).clone()).reshape(batch, k, vocab)
    out = torch.empty_like(logits)
    for b in range(batch):
        sequence = rows.sequence(b)
        row_processors = _processors_for_row(logits_processor, int(rows.active[b]))
        for j in range(k):
            ids = torch.cat([sequence, block_ids[b, : first + j]])[None]
            out[b, j] = row_processors(ids, logits[b, j][None].clone())[0]
    return out


# Processor attributes that hold one value per row of the batch `generate` was called with.
_PER_ROW_STATE = {RepetitionPenaltyLogitsProcessor: ("prompt_ignore_length",)}


def _processors_for_row(logits_processor, row):
    """The processors as seen by original batch row `row` alone (per-row state sliced to that row)."""
    out = LogitsProcessorList()
    for processor in logits_processor:
        fields = [f for t, names in _PER_ROW_STATE.items() if isinstance(processor, t) for f in names]
        state = {f: getattr(processor, f) for f in fields if isinstance(getattr(processor, f, None), torch.Tensor)}
        if state:
            processor = copy.copy(processor)
            for name, value in state.items():
                setattr(processor, name, value[row : row + 1])
        out.append(processor)
    return out


def _probs(scores):
    return F.softmax(scores.float(), dim=-1)


def _sample_or_argmax(scores, do_sample):
    """scores [..., V] (processed) -> tokens [...]."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = _probs(scores)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1).reshape(probs.shape[:-1])


def _exclude_token(logits, token_id):
    logits = logits.clone()
    logits[..., token_id] = -math.inf
    return logits


def _speculative_accept(draft, target_scores, draft_probs, do_sample):
    """Acceptance of a block of drafts against the causal target, for every row.

    draft:         [B, K]     d_1..d_K (K = block - 1), the tokens proposed for the slots after the seed.
    target_scores: [B, K+1, V] processed causal scores; row i gives p_i, the target for the slot of d_{i+1}.
    draft_probs:   [B, K, V]  q_i that d_i was drawn from (sampling only; None for deterministic drafts).
    Returns (accepted [B] in 0..K, emitted [B, K+1]): the row emits emitted[:, :accepted + 1], i.e. the accepted
    drafts followed by the correction (first mismatch) or the bonus (all accepted).

    Greedy: accept while argmax(p_i) == d_{i+1}; the next token is argmax(p_accepted).
    Sampling (rule R, Leviathan et al.): accept d_i with probability min(1, p(d_i) / q(d_i)), left to right; at the
    first rejection emit a sample of the normalised residual max(0, p - q); if all are accepted, a bonus sample of
    p_K. Every emitted token is then distributed exactly as p given the emitted prefix. A deterministic draft is
    the one-hot q = delta(d): acceptance p(d), residual = p without d, renormalised.
    """
    batch, k = draft.shape
    rows = torch.arange(batch, device=draft.device)
    if not do_sample:
        target = target_scores.argmax(dim=-1)
        matches = (target[:, :k] == draft).long()
        accepted = matches.cumprod(dim=1).sum(dim=1)
        return accepted, target
    p = _probs(target_scores)
    q = draft_probs if draft_probs is not None else F.one_hot(draft, p.shape[-1]).float()
    p_draft = p[:, :k].gather(-1, draft[..., None])[..., 0]
    q_draft = q.gather(-1, draft[..., None])[..., 0]
    accept = torch.rand(batch, k, device=draft.device) * q_draft <= p_draft
    accepted = accept.long().cumprod(dim=1).sum(dim=1)
    emitted = torch.zeros(batch, k + 1, dtype=draft.dtype, device=draft.device)
    emitted[:, :k] = draft
    # The token after the accepted drafts: residual sample at a rejection, bonus sample of p_K otherwise.
    at = accepted.clamp(max=k)
    p_at = p[rows, at]
    residual = (
        torch.where((accepted < k)[:, None], (p_at - q[rows, at.clamp(max=k - 1)]).clamp(min=0), p_at)
        if k > 0
        else p_at
    )
    mass = residual.sum(-1, keepdim=True)
    # A zero residual mass only happens when p == q (rejection then has probability 0); fall back to p.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_at)
    emitted[rows, at] = torch.multinomial(residual, 1)[:, 0]
    return accepted, emitted


@contextlib.contextmanager
def _adapters_for_drafting(model, adapter_name, bypass=False):
    """Yields `set_drafting(bool)`: the drafter adapter on for bidirectional draft forwards, off for every causal
    forward, and each PEFT layer's own state restored on exit. Works whether or not the model is wrapped in a
    `PeftModel` (both keep the LoRA layers inside the model). A no-op for a model without adapters.

    `bypass=True` (decoding loops): while drafting is off, each outermost PEFT wrapper is also swapped out of its
    parent for the base module it wraps, which computes the same thing without the wrappers' per-call Python work
    (about 8% of an AR step of the 135M demo with its drafter, on a CPU). While drafting, a trainable-tokens
    embedding (the drafter's own mask-token row) is computed sparsely (`_DraftTokenEmbedding`). The wrappers are
    put back on exit."""
    layers = [m for m in model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "_active_adapter")]
    if not layers:
        if adapter_name is not None:
            raise ValueError(f"drafter_adapter={adapter_name!r} is set, but the model has no PEFT adapter attached.")
        yield lambda drafting: None
        return
    if any(getattr(layer, "merged", False) for layer in layers):
        raise ValueError(
            "A PEFT adapter is merged into the base weights, so causal (AR and verify) forwards cannot run with base "
            "weights. Call `unmerge_adapter()` before generating."
        )
    saved = [(layer, layer._disable_adapters, layer._active_adapter) for layer in layers]
    if adapter_name is not None:
        known = set()
        for layer in layers:
            known.update(getattr(layer, "lora_A", {}).keys())
        if adapter_name not in known:
            raise ValueError(
                f"drafter_adapter={adapter_name!r} is not an adapter of this model; found {sorted(known)}."
            )

    swaps = []
    for parent, name, wrapper, base in _wrapper_swaps(model) if bypass else []:
        drafting_module = _DraftTokenEmbedding.for_wrapper(wrapper, base, adapter_name) or wrapper
        swaps.append((parent, name, wrapper, base, drafting_module))

    def set_drafting(drafting: bool):
        for layer, _, active in saved:
            layer._disable_adapters = not drafting
            if drafting and adapter_name is not None:
                layer._active_adapter = [adapter_name]
            else:
                layer._active_adapter = active
        for parent, name, _, base, drafting_module in swaps:
            parent._modules[name] = drafting_module if drafting else base

    try:
        set_drafting(False)
        yield set_drafting
    finally:
        for parent, name, wrapper, *_ in swaps:
            parent._modules[name] = wrapper
        for layer, disabled, active in saved:
            layer._disable_adapters = disabled
            layer._active_adapter = active


def _wrapper_swaps(model):
    """[(parent, name, wrapper, base)] for each outermost PEFT wrapper (LoRA layer, trainable-tokens or
    modules-to-save wrapper) and the module it computes with its adapters disabled. Wrappers holding an accelerate
    hook (device_map offload) stay in place."""
    swaps = []

    def visit(parent):
        for name, child in parent._modules.items():
            if child is None:
                continue
            if not hasattr(child, "_disable_adapters"):
                visit(child)
                continue
            base = _peft_base_module(child)
            if base is not child and not hasattr(child, "_hf_hook"):
                swaps.append((parent, name, child, base))

    visit(model)
    return swaps


def _peft_base_module(module):
    """The module a PEFT wrapper (LoRA layer, trainable tokens, modules to save) computes with its adapters off."""
    while isinstance(inner := getattr(module, "base_layer", getattr(module, "original_module", None)), nn.Module):
        module = inner
    return module


class _DraftTokenEmbedding(nn.Module):
    """What a PEFT trainable-tokens embedding computes with its adapter on, without what PEFT does on every call:
    rebuild the whole [vocab, hidden] matrix to change a few rows (for a drafter, the mask token's). The base rows,
    with the adapter's rows put in where the input holds one of its tokens."""

    def __init__(self, embedding: nn.Embedding, token_ids: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.token_ids = token_ids  # [n]
        self.rows = rows  # [n, hidden]

    @classmethod
    def for_wrapper(cls, wrapper, base, adapter_name):
        """The sparse module for a trainable-tokens wrapper around a plain `nn.Embedding` whose drafting adapter(s)
        train tokens, else None (the wrapper itself then serves draft forwards)."""
        layer = getattr(wrapper, "token_adapter", None)
        if layer is None or type(base) is not nn.Embedding or getattr(layer, "merged", False):
            return None
        active = [adapter_name] if adapter_name is not None else layer._active_adapter
        names = [n for n in ([active] if isinstance(active, str) else active) if n in layer.token_indices]
        if not names:
            return None
        token_ids = torch.tensor([t for n in names for t in layer.token_indices[n]], device=base.weight.device)
        rows = torch.cat([layer.trainable_tokens_delta[n].detach() for n in names]).to(base.weight)
        return cls(base, token_ids, rows)

    def forward(self, input_ids):
        embeddings = self.embedding(input_ids)
        hits = input_ids[..., None] == self.token_ids  # [..., n]
        trained = self.rows[hits.int().argmax(dim=-1)]
        return torch.where(hits.any(dim=-1, keepdim=True), trained, embeddings)


class _Rows:
    """Per-row bookkeeping of a batched block loop.

    Rows leave the batch as soon as they finish, so every tensor indexed by the live batch (`self.active` maps it
    to the caller's rows) shrinks with them, the cache included. The cache is rectangular; rows that kept fewer
    tokens than others in a cycle leave *holes*, slots masked out in `slot_mask`, and each row's positions count
    only its real tokens. Holes are compacted away when they waste a quarter of the cache.
    """

    def __init__(self, input_ids, attention_mask, generation_config, stopping_criteria, streamer):
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        self.prompt = input_ids
        self.prompt_length = prompt_length
        self.max_new_tokens = generation_config.max_length - prompt_length
        self.pad_token_id = generation_config._pad_token_tensor
        if self.pad_token_id is None:
            self.pad_token_id = torch.tensor(0, device=device)
        self.tokens = torch.full((batch, self.max_new_tokens), int(self.pad_token_id), dtype=torch.long, device=device)
        self.num_emitted = torch.zeros(batch, dtype=torch.long, device=device)
        self.num_forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.cycle_lengths = [[] for _ in range(batch)]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.active = torch.arange(batch, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.slot_mask = attention_mask.long()
        self.mask_length = None  # the static cache's length, when there is one
        self.encoder_call = None  # the backbone call of this generation (compiled for static caches on GPU)
        self.next_position = self.slot_mask.sum(dim=1)
        self.stopping_criteria = stopping_criteria
        self.streamer = streamer
        eos = [c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
        self.eos_token_ids = eos[0] if eos else None
        self.only_simple_criteria = all(
            isinstance(c, (EosTokenCriteria, MaxLengthCriteria)) for c in stopping_criteria
        )

    # -- views of the live batch -----------------------------------------------------------------------------
    @property
    def size(self):
        return self.active.numel()

    def remaining(self):
        """[live] new tokens each live row may still emit."""
        return self.max_new_tokens - self.num_emitted[self.active]

    def sequence(self, b):
        """Prompt (with its left padding) plus emitted tokens of live row b: what AR `input_ids` would hold."""
        row = self.active[b]
        return torch.cat([self.prompt[row], self.tokens[row, : self.num_emitted[row]]])

    def last_tokens(self):
        """[live] the last token of each live row (its seed)."""
        rows = self.active
        last = self.num_emitted[rows] - 1
        return self.tokens[rows, last.clamp(min=0)]

    def block_attention_mask(self, query_length):
        """[live, S + query_length] (1 = real token) for a block after the S cache slots; with a static cache it
        spans all `mask_length` slots (the stale ones past the block masked), so its shape never changes."""
        ones = torch.ones(self.size, query_length, dtype=self.slot_mask.dtype, device=self.slot_mask.device)
        mask = torch.cat([self.slot_mask, ones], dim=1)
        if self.mask_length is not None:
            mask = F.pad(mask, (0, self.mask_length - mask.shape[1]))
        return mask

    def block_positions(self, offsets):
        return self.next_position[:, None] + offsets[None, :]

    def count_forward(self, live_rows=None):
        rows = self.active if live_rows is None else self.active[live_rows]
        self.num_forwards[rows] += 1

    # -- emission ---------------------------------------------------------------------------------------------
    def emit(self, chunk, counts):
        """Emit chunk[b, :counts[b]] for every live row b, token by token: the budget and the stopping criteria
        cut inside the chunk. Returns [live] number of tokens actually emitted per row."""
        emitted = torch.zeros_like(counts)
        counts = torch.minimum(counts, self.remaining())
        streamed = []
        for b in range(self.size):
            row, n = int(self.active[b]), int(counts[b])
            if n <= 0:
                continue
            start = int(self.num_emitted[row])
            self.tokens[row, start : start + n] = chunk[b, :n]
            stop_at = self._first_stop(row, start, n)
            kept = n if stop_at is None else stop_at + 1
            if kept < n:
                self.tokens[row, start + kept : start + n] = self.pad_token_id
            self.num_emitted[row] = start + kept
            emitted[b] = kept
            if stop_at is not None or start + kept >= self.max_new_tokens:
                self.finished[row] = True
            streamed.append(self.tokens[row, start : start + kept])
        if self.streamer is not None and streamed:
            self.streamer.put(streamed[0].cpu())
        return emitted

    def _first_stop(self, row, start, n):
        """Index in [0, n) of the first new token at which a stopping criterion fires, or None."""
        new = self.tokens[row, start : start + n]
        if self.only_simple_criteria:
            if self.eos_token_ids is None:
                return None
            hits = torch.isin(new, self.eos_token_ids.to(new.device)).nonzero()
            return int(hits[0]) if hits.numel() else None
        base = torch.cat([self.prompt[row], self.tokens[row, : start + n]])
        for j in range(n):
            if bool(self.stopping_criteria(base[None, : self.prompt_length + start + j + 1], None)[0]):
                return j
        return None

    def record_cycle(self, lengths):
        for b in range(self.size):
            self.cycle_lengths[int(self.active[b])].append(int(lengths[b]))

    # -- batch shrinking and the ragged cache -----------------------------------------------------------------
    def drop_finished(self, cache, *tensors):
        """Remove finished rows from the live batch, the cache and the given [live, ...] tensors."""
        keep = ~self.finished[self.active]
        if bool(keep.all()):
            return tensors
        index = keep.nonzero()[:, 0]
        self.active = self.active[index]
        self.slot_mask = self.slot_mask[index]
        self.next_position = self.next_position[index]
        if cache is not None and self.size:
            select_cache_rows(cache, index)
        return tuple(t[index] if t is not None else None for t in tensors)

    def append_slots(self, kept, written):
        """After a forward wrote `written` slots per row of which row b keeps the first kept[b] (the cache already
        holds exactly max(kept) of them), extend the slot mask and advance positions."""
        width = int(kept.max()) if kept.numel() else 0
        new = (torch.arange(width, device=kept.device)[None, :] < kept[:, None]).long()
        self.slot_mask = torch.cat([self.slot_mask, new], dim=1)
        self.next_position = self.next_position + kept

    def compact(self, cache):
        """Left-align each row's real slots when holes and padding waste at least a quarter of the cache."""
        if not self.size:
            return
        real = self.slot_mask.bool()
        total = real.shape[1]
        needed = int(real.sum(dim=1).max())
        if total == 0 or needed > 0.75 * total:
            return
        # Stable sort puts each row's empty slots first, then its real slots in order.
        order = torch.sort(real.int(), dim=1, stable=True).indices[:, total - needed :]
        compact_cache_rows(cache, order)
        self.slot_mask = real.gather(1, order).long()

    def finish(self, generation_config):
        if self.streamer is not None:
            self.streamer.end()
        width = int(self.num_emitted.max()) if self.num_emitted.numel() else 0
        sequences = torch.cat([self.prompt, self.tokens[:, :width]], dim=1)
        if not generation_config.return_dict_in_generate:
            return sequences
        num_forwards = self.num_forwards.clone()
        lengths = [torch.tensor(c, dtype=torch.long) for c in self.cycle_lengths]
        acceptance = None
        if any(len(c) for c in self.cycle_lengths):
            acceptance = torch.nn.utils.rnn.pad_sequence(lengths, batch_first=True).to(sequences.device)
        return NemotronDiffusionGenerateOutput(
            sequences=sequences,
            num_forwards=num_forwards,
            tokens_per_forward=self.num_emitted.float() / num_forwards.clamp(min=1).float(),
            acceptance_lengths=acceptance,
        )


# ------------------------------------------------------------------------------------------------------ the mixin
class NemotronDiffusionGenerationMixin(GenerationMixin):
    """`generate()` with `decode_mode` in ("ar", "diffusion", "linear_spec", "quadratic_spec").

    Mode fields (see `GENERATION_FIELDS`) are read with precedence: `generate()` kwarg > the passed
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
        custom = {name: kwargs.pop(name) for name in list(kwargs) if name in GENERATION_FIELDS}
        passed = generation_config
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for name, default in GENERATION_FIELDS.items():
            if name in custom:
                value = custom[name]
            elif passed is not None and hasattr(passed, name):
                value = getattr(passed, name)
            elif hasattr(self.generation_config, name):
                value = getattr(self.generation_config, name)
            else:
                value = _MODE_DEFAULT if name in _MODE_DEFAULTS else default
            setattr(generation_config, name, value)
        mode = generation_config.decode_mode
        if mode not in DECODE_MODES:
            raise ValueError(f"`decode_mode`={mode!r} is invalid; allowed: {DECODE_MODES}.")
        for name, defaults in _MODE_DEFAULTS.items():
            if getattr(generation_config, name) is _MODE_DEFAULT:
                setattr(generation_config, name, defaults[mode])
        _validate_mode_fields(generation_config, self.config)
        return generation_config, model_kwargs

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

    # ---- dispatch -------------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        # A drafter adapter serves only bidirectional draft forwards: every other forward of every decoding mode
        # (AR steps, beams, assisted decoding, prefill, verify, commit) runs with base weights, and each adapter's
        # own state is restored afterwards.
        passed = kwargs.get("generation_config")
        adapter = kwargs.get(
            "drafter_adapter",
            getattr(passed, "drafter_adapter", getattr(self.generation_config, "drafter_adapter", None)),
        )
        with _adapters_for_drafting(self, adapter if isinstance(adapter, str) else None):
            return super().generate(*args, **kwargs)

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
        logits_processor = LogitsProcessorList(list(logits_processor))
        if generation_config.max_thinking_tokens is not None:
            logits_processor.append(
                ThinkingBudgetLogitsProcessor(
                    generation_config.max_thinking_tokens, generation_config.end_think_token_id, input_ids.shape[1]
                )
            )
        if mode == "ar":
            return self._ar_decode(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus,
                streamer,
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
        rows = _Rows(input_ids, model_kwargs.get("attention_mask"), generation_config, stopping_criteria, streamer)
        rows.encoder_call = self._encoder_call(cache, generation_config)
        rows.prefill_inputs = self._prefill_inputs(model_kwargs)
        if is_static_cache(cache):
            rows.mask_length = cache.layers[0].max_cache_len
        loop = {
            "diffusion": self._diffusion_decode,
            "linear_spec": self._linear_spec_decode,
            "quadratic_spec": self._quadratic_spec_decode,
        }[mode]
        with (
            _adapters_for_drafting(self, generation_config.drafter_adapter, bypass=True) as set_drafting,
            torch.no_grad(),
        ):
            loop(rows, cache, logits_processor, generation_config, set_drafting)
        return rows.finish(generation_config)

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
        committed tokens (a verify block, or QuadraticSpec's B*(B+1) chunk). In a batch, rows that keep fewer
        tokens leave holes until compaction (at most a quarter of the cache): the committed part gets 4/3 room."""
        batch = input_ids.shape[0]
        committed = generation_config.max_length  # prompt + new tokens
        if batch > 1:
            committed = -(-4 * committed // 3)
        block = generation_config.block_size
        room = committed + block * (block + 1) + 2 * block
        return StaticCache(config=self.config, max_cache_len=room)

    def _ar_decode(
        self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
    ):
        with _adapters_for_drafting(self, None, bypass=True):  # AR never drafts: the base modules alone
            out = super()._sample(
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        if not generation_config.return_dict_in_generate:
            return out
        # One forward per new token (the prefill gives the first); finished rows stop counting at their stop.
        new = out.sequences[:, input_ids.shape[1] :]
        counts = torch.full((new.shape[0],), new.shape[1], dtype=torch.long, device=new.device)
        eos = generation_config._eos_token_tensor
        if eos is not None and new.shape[1]:
            hit = torch.isin(new, eos.to(new.device))
            first = torch.where(hit.any(1), hit.float().argmax(1) + 1, counts)
            counts = torch.minimum(counts, first)
        fields = {k: v for k, v in out.items()}
        return NemotronDiffusionGenerateOutput(
            **fields, num_forwards=counts, tokens_per_forward=torch.ones(new.shape[0], device=new.device)
        )

    # ---- shared steps ---------------------------------------------------------------------------------------
    def _prefill_inputs(self, model_kwargs):
        """Model inputs that only the prompt's forward takes (a VLM's `pixel_values`/`image_sizes`), picked from
        `generate()`'s model kwargs; the block loops pass them to the prefill and to no other forward."""
        return {}

    def _prefill_prompt(self, rows, cache, is_causal=True):
        """One forward over the prompt that writes the cache; returns the last position's logits [B, V]."""
        positions = (rows.slot_mask.cumsum(-1) - 1).clamp(min=0)
        out = self(
            input_ids=rows.prompt,
            attention_mask=rows.slot_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            is_causal=is_causal,
            logits_to_keep=1,
            **rows.prefill_inputs,
        )
        rows.count_forward()
        return out.logits[:, -1]

    def _block_forward(self, rows, cache, block_ids, is_causal, update_cache, hidden_only=False):
        """One forward of a [live, K] block at each row's next positions, on top of the cache."""
        k = block_ids.shape[1]
        out = rows.encoder_call(
            input_ids=block_ids,
            attention_mask=rows.block_attention_mask(k),
            position_ids=rows.block_positions(torch.arange(k, device=block_ids.device)),
            cache=cache,
            use_cache=True,
            is_causal=is_causal,
            update_cache=update_cache,
        )
        hidden = out.last_hidden_state
        return hidden if hidden_only else self.diffusion_head(hidden)

    def _seed_from_logits(self, rows, logits, logits_processor, generation_config, exclude_mask=False):
        """The AR token that follows each live row: processors with the exact prefix, then argmax or sample."""
        if exclude_mask:
            logits = _exclude_token(logits, self.config.mask_token_id)
        scores = _process_block(
            logits_processor, rows, torch.empty(rows.size, 0, dtype=torch.long, device=logits.device), logits[:, None]
        )[:, 0]
        return _sample_or_argmax(scores, generation_config.do_sample)

    # ---- block diffusion ------------------------------------------------------------------------------------
    def _diffusion_decode(self, rows, cache, logits_processor, generation_config, set_drafting):
        """Block diffusion (NVIDIA's `generate`, with per-row finishing).

        Per block of B slots: with `causal_context`, slot 0 holds the AR seed of the causal prefix and the other
        slots start masked. Each denoising forward reads the prefix cache without writing it; every masked slot
        whose confidence (probability of its candidate, at T=1) reaches the threshold is committed, plus the most
        confident one (or, without a threshold, the schedule's count: one per step). Candidates are the argmax or,
        at T > 0, a Gumbel-max sample of the processed scores. Committed tokens never change, so the contiguous
        committed prefix of the block is emitted (and checked by the stopping criteria) as soon as it grows. One
        causal forward per block then writes the block to the cache and yields the next seed.
        """
        config = generation_config
        mask_id, end_think = self.config.mask_token_id, config.end_think_token_id
        block_size, threshold, causal = config.block_size, config.confidence_threshold, config.causal_context
        device = rows.prompt.device
        seed_logits = self._prefill_prompt(rows, cache, is_causal=causal)
        seeds = (
            self._seed_from_logits(rows, seed_logits, logits_processor, config, exclude_mask=True) if causal else None
        )

        while rows.size:
            block = torch.full((rows.size, block_size), mask_id, dtype=torch.long, device=device)
            masked = torch.ones(rows.size, block_size, dtype=torch.bool, device=device)
            if causal:
                block[:, 0], masked[:, 0] = seeds, False
            forbidden = torch.zeros_like(masked)
            if config.max_thinking_tokens is not None:
                self._inject_thinking_budget(rows, block, masked, forbidden, config)
            needed = rows.remaining().clamp(max=block_size)  # a final block may need only its first slots
            masks_at_start = masked.sum(dim=1)
            emitted = rows.emit(block, _contiguous_committed(masked).clamp(max=needed))
            steps = 0
            while True:
                block, masked, forbidden, needed, masks_at_start, emitted = rows.drop_finished(
                    cache, block, masked, forbidden, needed, masks_at_start, emitted
                )
                live = emitted < needed
                if not bool(live.any()):
                    break
                logits = self._block_forward(rows, cache, block, is_causal=False, update_cache=False)
                rows.count_forward(live)
                candidate_logits = _exclude_token(logits, mask_id)
                if config.max_thinking_tokens is not None:
                    ban = forbidden & masked
                    candidate_logits[..., end_think] = candidate_logits[..., end_think].masked_fill(ban, -math.inf)
                scores = _process_block(logits_processor, rows, block, candidate_logits)
                candidates = _gumbel_argmax(scores) if config.do_sample else scores.argmax(dim=-1)
                # NVIDIA's confidence: probability of the candidate under the raw logits at T = 1.
                confidence = _probs(logits).gather(-1, candidates[..., None])[..., 0]
                confidence = torch.where(masked, confidence, -math.inf)
                steps += 1
                last_step = config.max_denoising_steps is not None and steps >= config.max_denoising_steps
                commit = _select_commits(
                    confidence, masked, threshold, masks_at_start, steps - 1, config.max_denoising_steps, last_step
                )
                commit &= live[:, None]
                block = torch.where(commit, candidates, block)
                masked = masked & ~commit
                ready = _contiguous_committed(masked).clamp(max=needed)
                emitted = emitted + rows.emit(_shift_left(block, emitted), ready - emitted)
            if not rows.size:
                break
            # Every live row completed its block: one forward writes it to the cache and seeds the next block.
            logits = self._block_forward(rows, cache, block, is_causal=causal, update_cache=True)
            rows.count_forward()
            rows.append_slots(torch.full((rows.size,), block_size, dtype=torch.long, device=device), block_size)
            if causal:
                seeds = self._seed_from_logits(rows, logits[:, -1], logits_processor, config, exclude_mask=True)

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
        """LinearSpec: per cycle one bidirectional draft forward over [seed, masks] (adapter on, cache read-only)
        and one causal verify forward over [seed, drafts] (base weights, cache written), then acceptance, and the
        cache rolled back to the seed plus the accepted drafts.

        With `confidence_threshold`, drafting takes several forwards; each fills the masked slots whose
        confidence reaches the threshold (at least one). Under sampling the slots are filled left to right (the
        leftmost masked slot and the contiguous slots after it whose highest probability reaches the threshold),
        a rule that depends on the drafter's distributions, never on sampled values; each draft token is therefore
        drawn from a recorded q given only the tokens to its left, which is what rule R needs to be exact.
        """
        config = generation_config
        device = rows.prompt.device
        seed_logits = self._prefill_prompt(rows, cache)
        seeds = self._seed_from_logits(rows, seed_logits, logits_processor, config)
        rows.emit(seeds[:, None], torch.ones(rows.size, dtype=torch.long, device=device))
        rows.drop_finished(cache)
        while rows.size:
            block_size = min(config.block_size, int(rows.remaining().max()))
            seeds = rows.last_tokens()
            drafts, draft_probs = self._draft_block(
                rows, cache, seeds, block_size, logits_processor, config, set_drafting
            )
            block = torch.cat([seeds[:, None], drafts], dim=1)
            logits = self._block_forward(rows, cache, block, is_causal=True, update_cache=True)
            rows.count_forward()
            scores = _process_block(logits_processor, rows, block[:, 1:], logits)
            accepted, emitted = _speculative_accept(drafts, scores, draft_probs, config.do_sample)
            kept = accepted + 1  # the seed and the accepted drafts are exact causal entries
            rewind_cache(cache, block_size - int(kept.max()))
            rows.append_slots(kept, block_size)
            n = rows.emit(emitted, accepted + 1)
            rows.record_cycle(n)
            rows.drop_finished(cache)
            rows.compact(cache)

    def _draft_block(self, rows, cache, seeds, block_size, logits_processor, config, set_drafting):
        """Drafts for the block slots 1..B-1 after each row's (already emitted) seed, from bidirectional forwards
        over the read-only cache with the drafter adapter on. Returns (drafts [live, B-1], q [live, B-1, V] or
        None for deterministic drafts)."""
        mask_id = self.config.mask_token_id
        device = seeds.device
        if block_size == 1:
            return torch.empty(rows.size, 0, dtype=torch.long, device=device), None
        block = torch.full((rows.size, block_size), mask_id, dtype=torch.long, device=device)
        block[:, 0] = seeds
        masked = torch.ones(rows.size, block_size - 1, dtype=torch.bool, device=device)
        threshold, draft_probs = config.confidence_threshold, None
        while bool(masked.any()):
            set_drafting(True)
            try:
                hidden = self._block_forward(rows, cache, block, is_causal=False, update_cache=False, hidden_only=True)
            finally:
                set_drafting(False)
            rows.count_forward(masked.any(dim=1))
            logits = _exclude_token(self.diffusion_head(hidden[:, 1:]), mask_id)
            if config.do_sample:
                probs, tokens = self._sample_drafts(rows, block, masked, logits, logits_processor, prefix_start=1)
                if threshold is None:
                    commit = masked
                else:
                    commit = _left_to_right_commits(probs.max(dim=-1).values, masked, threshold)
                draft_probs = probs if draft_probs is None else torch.where(commit[..., None], probs, draft_probs)
            else:
                tokens = _process_block(logits_processor, rows, block[:, 1:], logits).argmax(dim=-1)
                if threshold is None:
                    commit = masked
                else:
                    confidence = _probs(logits).gather(-1, tokens[..., None])[..., 0]
                    commit = _select_commits(
                        torch.where(masked, confidence, -math.inf), masked, threshold, None, 0, None, False
                    )
            block[:, 1:] = torch.where(commit, tokens, block[:, 1:])
            masked = masked & ~commit
        return block[:, 1:], draft_probs

    def _sample_drafts(self, rows, block, masked, logits, logits_processor, prefix_start):
        """Sampled drafts for the masked slots of block[:, 1:] (logits [live, B-1, V]).

        Slot j is drawn from q_j = softmax(processed logits), whose processors see the row's emitted tokens plus
        block[prefix_start : j + 1] as prefix. Slots are drawn left to right, so d_j ~ q_j( . | d_<j) also holds
        for processors that read the prefix. Returns (q [live, B-1, V], tokens [live, B-1])."""
        tokens = block[:, 1:].clone()
        if all(isinstance(p, _PREFIX_FREE_PROCESSORS) for p in logits_processor):
            probs = _probs(_process_block(logits_processor, rows, tokens, logits))
            sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(tokens.shape)
            return probs, torch.where(masked, sampled, tokens)
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        context = block[:, prefix_start:].clone()
        for j in range(logits.shape[1]):
            first = 1 - prefix_start + j
            probs[:, j] = _probs(
                _process_block(logits_processor, rows, context, logits[:, j : j + 1], first=first)[:, 0]
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
        verifies, so all run with base weights (a drafter adapter is never enabled in this mode).
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
            positions = rows.block_positions(offsets)
            # The chunk's attention pattern is built here, outside a possibly compiled call (its closure would
            # otherwise be a new graph input every cycle).
            pattern = self.encoder.build_attention_mask(
                torch.empty(chunk.shape + (0,), dtype=self.dtype, device=device),
                rows.block_attention_mask(chunk.shape[1]),
                cache,
                positions,
                is_causal=False,
                mask_function=_quadratic_mask_function(int(cache.get_seq_length()), block_size, device),
            )
            out = rows.encoder_call(
                input_ids=chunk,
                attention_mask=pattern,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                is_causal=False,
            )
            rows.count_forward()
            hidden = out.last_hidden_state.reshape(rows.size, block_size, row_len, -1)
            target_logits = self.diffusion_head(hidden[:, :, 0])
            # Row i's causal logits follow d_0..d_i, none of which is emitted yet.
            scores = _process_block(logits_processor, rows, drafts, target_logits, first=1)
            accepted, emitted = _speculative_accept(drafts[:, 1:], scores, draft_probs, config.do_sample)
            take = accepted + 1  # d_0 .. d_accepted
            # Keep only the accepted draft tokens' entries (exact causal K/V): d_0 .. d_accepted of each row.
            keep_chunk_entries(cache, chunk.shape[1], torch.arange(int(take.max()), device=device) * row_len)
            rows.append_slots(take, block_size)
            n = rows.emit(drafts, take)
            rows.record_cycle(n)
            # Next draft: the accepted row's masks; slot 0 is the AR token after the accepted prefix.
            batch = torch.arange(rows.size, device=device)
            next_logits = _exclude_token(self.diffusion_head(hidden[batch, accepted, 2:]), mask_id)
            next_first = emitted[batch, accepted]
            drafts, draft_probs = self._next_quadratic_draft(rows, next_first, next_logits, logits_processor, config)
            drafts, draft_probs = rows.drop_finished(cache, drafts, draft_probs)
            rows.compact(cache)

    def _quadratic_bootstrap(self, rows, cache, logits_processor, config, set_drafting):
        """[prompt | masks x B]: the prompt is causal, the masks see the prompt and each other. The prompt's K/V are
        kept; the first draft is the AR token after the prompt followed by the masks' diffusion guesses."""
        mask_id = self.config.mask_token_id
        block_size = config.block_size
        device = rows.prompt.device
        masks = torch.full((rows.size, block_size), mask_id, dtype=torch.long, device=device)
        prompt_positions = (rows.slot_mask.cumsum(-1) - 1).clamp(min=0)
        positions = torch.cat([prompt_positions, rows.block_positions(torch.arange(block_size, device=device))], dim=1)
        out = self.encoder(
            input_ids=torch.cat([rows.prompt, masks], dim=1),
            attention_mask=rows.block_attention_mask(block_size),
            position_ids=positions,
            cache=cache,
            use_cache=True,
            is_causal=False,
            update_cache=True,
            mask_function=_bootstrap_mask_function(rows.prompt_length),
            **rows.prefill_inputs,
        )
        rewind_cache(cache, block_size)
        rows.count_forward()
        hidden = out.last_hidden_state
        ar_logits = self.diffusion_head(hidden[:, rows.prompt_length - 1])
        first = self._seed_from_logits(rows, ar_logits, logits_processor, config)
        mask_logits = _exclude_token(self.diffusion_head(hidden[:, rows.prompt_length + 1 :]), mask_id)
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
        scores = _process_block(logits_processor, rows, block, mask_logits, first=1)
        return torch.cat([first[:, None], scores.argmax(dim=-1)], dim=1), None


# ------------------------------------------------------------------------------------------ small pure functions
def _validate_mode_fields(generation_config, model_config):
    mode = generation_config.decode_mode

    def bad(field, value, allowed):
        raise ValueError(f"`{field}`={value!r} is invalid for decode_mode={mode!r}; allowed: {allowed}.")

    block_size = generation_config.block_size
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        bad("block_size", block_size, "an int >= 1")
    if mode in ("linear_spec", "quadratic_spec") and block_size < 2:
        bad("block_size", block_size, "an int >= 2 (one seed slot plus at least one draft slot)")
    threshold = generation_config.confidence_threshold
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1
    ):
        bad("confidence_threshold", threshold, "a float in (0, 1], or None")
    if mode == "quadratic_spec" and threshold is not None:
        bad("confidence_threshold", threshold, "None (QuadraticSpec drafts the next block in the verify forward)")
    if not isinstance(generation_config.causal_context, bool):
        bad("causal_context", generation_config.causal_context, "True or False")
    if mode != "diffusion" and generation_config.causal_context is not True:
        bad("causal_context", generation_config.causal_context, "True (only diffusion can encode without it)")
    steps = generation_config.max_denoising_steps
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        bad("max_denoising_steps", steps, "an int >= 1, or None")
    budget, end = generation_config.max_thinking_tokens, generation_config.end_think_token_id
    if budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            bad("max_thinking_tokens", budget, "an int >= 0, or None")
        if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end < model_config.vocab_size:
            bad(
                "end_think_token_id",
                end,
                f"a token id in [0, {model_config.vocab_size}) when max_thinking_tokens is set",
            )
        if mode == "diffusion" and end == model_config.mask_token_id:
            bad("end_think_token_id", end, f"a token other than the mask token ({model_config.mask_token_id})")
    adapter = generation_config.drafter_adapter
    if adapter is not None and not isinstance(adapter, str):
        bad("drafter_adapter", adapter, "an adapter name (str) or None")


def _contiguous_committed(masked):
    """[B] length of each row's leading run of committed (unmasked) slots."""
    return (~masked).long().cumprod(dim=1).sum(dim=1)


def _shift_left(block, by):
    """Row b of the result is block[b, by[b]:], right-padded with its last value."""
    k = block.shape[1]
    index = (torch.arange(k, device=block.device)[None, :] + by[:, None]).clamp(max=k - 1)
    return block.gather(1, index)


def _gumbel_argmax(scores):
    """A sample of softmax(scores) per position by the Gumbel-max trick (float64 noise, as NVIDIA's code)."""
    uniform = torch.rand(scores.shape, dtype=torch.float64, device=scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
    return (scores.double() + gumbel).argmax(dim=-1)


def _transfer_count(masks_at_start, steps, step):
    """NVIDIA's schedule: `masks_at_start` spread over `steps` steps; the first (masks mod steps) get one more."""
    base = masks_at_start // steps
    extra = (masks_at_start % steps > step).long()
    return base + extra


def _select_commits(confidence, masked, threshold, masks_at_start, step, max_steps, last_step):
    """Which masked slots a denoising step commits. confidence is -inf outside masked slots."""
    batch = confidence.shape[0]
    rows = torch.arange(batch, device=confidence.device)
    if last_step:
        return masked.clone()
    if threshold is None:
        steps = max_steps if max_steps is not None else int(masks_at_start.max().clamp(min=1))
        count = _transfer_count(masks_at_start, max(steps, 1), step).clamp(min=1)
        count = torch.minimum(count, masked.sum(dim=1))
        order = confidence.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[rows[:, None], order] = torch.arange(confidence.shape[1], device=confidence.device)[None, :]
        return masked & (rank < count[:, None])
    commit = masked & (confidence >= threshold)
    best = confidence.argmax(dim=1)
    commit[rows, best] |= masked.any(dim=1)
    return commit


def _left_to_right_commits(max_prob, masked, threshold):
    """Sampling-safe multi-step drafting: the leftmost masked slot, plus the masked slots right after it (without a
    gap) whose drafter distribution has its highest probability >= threshold."""
    first = masked.long().argmax(dim=1)
    k = masked.shape[1]
    index = torch.arange(k, device=masked.device)[None, :]
    confident = masked & (max_prob >= threshold)
    after_first = index > first[:, None]
    # Slots after `first` stay selected while every slot between is confident.
    run = (confident | ~after_first).long().cumprod(dim=1).bool()
    return masked & (index >= first[:, None]) & run


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
    prefix; inside the chunk, the fixed pattern above (a table lookup, cheap to expand and compile-friendly)."""
    pattern = _quadratic_chunk_pattern(block_size, torch.device(device))
    last = pattern.shape[0] - 1

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        kv_local = kv_idx - start
        return (kv_local < 0) | pattern[(q_idx - start).clamp(0, last), kv_local.clamp(0, last)]

    return mask


def _bootstrap_mask_function(prompt_length):
    """[prompt | masks]: prompt tokens causal, mask tokens see everything."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (q_idx >= prompt_length)

    return mask


__all__ = [
    "DECODE_MODES",
    "GENERATION_FIELDS",
    "NemotronDiffusionGenerateOutput",
    "NemotronDiffusionGenerationMixin",
    "ThinkingBudgetLogitsProcessor",
]
