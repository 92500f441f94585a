# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The live batch of a block loop: what each row emitted (stopping criteria, streaming, counts) and where its
tokens sit in the ragged cache.

Rows leave the batch as soon as they finish, so every tensor indexed by the live batch (`Rows.active` maps it to
the caller's rows) shrinks with them, the cache included.
"""

import torch
import torch.nn.functional as F
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .cache_nemotron_diffusion import compact_cache_rows, select_cache_rows

# Emitted tokens are kept in a buffer that grows with them (doubling), never sized by `max_new_tokens` up front.
_INITIAL_CAPACITY = 64


class RaggedSlots:
    """Which cache slots of each live row hold real tokens, and the position its next token takes.

    The cache is rectangular; rows that kept fewer tokens than others in a cycle leave *holes*, slots masked out in
    `slot_mask` [live, S], and each row's positions count only its real tokens (`next_position` [live]). Holes
    are compacted away when they waste a quarter of the cache. With a static cache, `mask_length` is its length
    and every attention mask spans it, so shapes never change.
    """

    def __init__(self, attention_mask, mask_length=None):
        self.slot_mask = attention_mask.long()
        self.next_position = self.slot_mask.sum(dim=1)
        self.mask_length = mask_length

    def prompt_positions(self):
        """[live, P] positions of the (left-padded) prompt: real tokens count from 0."""
        return (self.slot_mask.cumsum(-1) - 1).clamp(min=0)

    def attention_mask(self, query_length):
        """[live, S + query_length] (1 = real token) for a block of `query_length` after the S cache slots."""
        ones = torch.ones(self.slot_mask.shape[0], query_length, dtype=self.slot_mask.dtype,
                          device=self.slot_mask.device)
        mask = torch.cat([self.slot_mask, ones], dim=1)
        if self.mask_length is not None:
            mask = F.pad(mask, (0, self.mask_length - mask.shape[1]))
        return mask

    def positions(self, offsets):
        """[live, K] positions of block slots at `offsets` [K] after each row's last real token."""
        return self.next_position[:, None] + offsets[None, :]

    def append(self, kept):
        """After a forward whose first kept[b] slots row b keeps (the cache holds exactly max(kept) of them), extend
        the slot mask and advance positions."""
        width = int(kept.max()) if kept.numel() else 0
        new = (torch.arange(width, device=kept.device)[None, :] < kept[:, None]).long()
        self.slot_mask = torch.cat([self.slot_mask, new], dim=1)
        self.next_position = self.next_position + kept

    def select(self, index, cache):
        self.slot_mask = self.slot_mask[index]
        self.next_position = self.next_position[index]
        if cache is not None and index.numel():
            select_cache_rows(cache, index)

    def compact(self, cache):
        """Left-align each row's real slots when holes and padding waste at least a quarter of the cache."""
        if not self.slot_mask.shape[0]:
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


class Rows:
    """The live batch of a block loop: emission (token by token, so the budget and the stopping criteria cut
    inside a block), streaming, forward counts and acceptance lengths per caller row, plus the ragged cache slots
    (`slots`), the backbone call of this generation (`encoder_call`, compiled for static caches on GPU) and the
    inputs only the prompt's forward takes (`prefill_inputs`, a VLM's images)."""

    def __init__(self, input_ids, attention_mask, max_new_tokens, pad_token_id, stopping_criteria, streamer,
                 encoder_call, mask_length=None, prefill_inputs=None):
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        self.prompt = input_ids
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.tokens = torch.full((batch, min(max_new_tokens, _INITIAL_CAPACITY)), pad_token_id, dtype=torch.long,
                                 device=device)
        self.num_emitted = torch.zeros(batch, dtype=torch.long, device=device)
        self.num_forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.cycle_lengths = [[] for _ in range(batch)]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.active = torch.arange(batch, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.slots = RaggedSlots(attention_mask, mask_length)
        self.encoder_call = encoder_call
        self.prefill_inputs = dict(prefill_inputs or {})
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

    def count_forward(self, live_rows=None):
        rows = self.active if live_rows is None else self.active[live_rows]
        self.num_forwards[rows] += 1

    # -- emission ---------------------------------------------------------------------------------------------
    def emit(self, chunk, counts):
        """Emit chunk[b, :counts[b]] for every live row b, token by token: the budget and the stopping criteria
        cut inside the chunk. Returns [live] number of tokens actually emitted per row."""
        emitted = torch.zeros_like(counts)
        counts = torch.minimum(counts, self.remaining())
        self._reserve(int((self.num_emitted[self.active] + counts).max()) if self.size else 0)
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

    def _reserve(self, width):
        """Grows the token buffer (doubling) to hold `width` tokens per row."""
        if width <= self.tokens.shape[1]:
            return
        capacity = min(self.max_new_tokens, max(width, 2 * self.tokens.shape[1]))
        grown = torch.full((self.tokens.shape[0], capacity), self.pad_token_id, dtype=torch.long,
                           device=self.tokens.device)
        grown[:, : self.tokens.shape[1]] = self.tokens
        self.tokens = grown

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

    def drop_finished(self, cache, *tensors):
        """Remove finished rows from the live batch, the cache and the given [live, ...] tensors."""
        keep = ~self.finished[self.active]
        if bool(keep.all()):
            return tensors
        index = keep.nonzero()[:, 0]
        self.active = self.active[index]
        self.slots.select(index, cache)
        return tuple(t[index] if t is not None else None for t in tensors)

    def finish(self):
        """(sequences [batch, prompt + longest row], num_forwards [batch], tokens_per_forward [batch],
        acceptance_lengths [batch, cycles] or None)."""
        if self.streamer is not None:
            self.streamer.end()
        width = int(self.num_emitted.max()) if self.num_emitted.numel() else 0
        sequences = torch.cat([self.prompt, self.tokens[:, :width]], dim=1)
        acceptance = None
        if any(len(c) for c in self.cycle_lengths):
            lengths = [torch.tensor(c, dtype=torch.long) for c in self.cycle_lengths]
            acceptance = torch.nn.utils.rnn.pad_sequence(lengths, batch_first=True).to(sequences.device)
        tokens_per_forward = self.num_emitted.float() / self.num_forwards.clamp(min=1).float()
        return sequences, self.num_forwards.clone(), tokens_per_forward, acceptance
