# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Token selection of the block loops: logits processors on block positions, sampling, commits and acceptance.

Pure functions of tensors (and of the live rows' prefixes, for processors that read them); no module state.
"""

import copy
import math

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

class InfiniteTemperatureLogitsWarper(LogitsProcessor):
    """Temperature infinity: every token still allowed (finite score) gets score 0, i.e. a uniform draw over the
    allowed tokens; tokens already at -inf stay excluded. It replaces `TemperatureLogitsWarper(inf)`, whose
    `-inf / inf` is NaN for every excluded token (the block modes exclude the mask token before the processors).
    On finite scores both give the same zeros, so AR is unchanged."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return torch.where(scores > -math.inf, torch.zeros_like(scores), scores)


def without_infinite_temperature(logits_processor):
    """A copy of the list with an infinite `TemperatureLogitsWarper` replaced by `InfiniteTemperatureLogitsWarper`."""
    return LogitsProcessorList(
        InfiniteTemperatureLogitsWarper()
        if isinstance(p, TemperatureLogitsWarper) and math.isinf(p.temperature)
        else p
        for p in logits_processor
    )


# Logits processors that do not read `input_ids`: safe to apply to many positions at once.
PREFIX_FREE_PROCESSORS = (
    InfiniteTemperatureLogitsWarper,
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


def process_block(logits_processor, rows, block_ids, logits, first=0):
    """Logits processors on block positions, each with its exact prefix.

    logits: [B, K, V] for block slots first..first+K-1; slot j continues `rows.sequences()[b] + block_ids[b, :j]`.
    Processors that never read the prefix run once on all positions; the others run per row and position, because
    rows of a batch have different lengths (`MinNewTokensLength`, repetition penalties and the thinking budget
    depend on them).
    """
    if not len(logits_processor):
        return logits
    batch, k, vocab = logits.shape
    if all(isinstance(p, PREFIX_FREE_PROCESSORS) for p in logits_processor):
        dummy = torch.zeros((batch * k, 1), dtype=torch.long, device=logits.device)
        return logits_processor(dummy, logits.reshape(batch * k, vocab).clone()).reshape(batch, k, vocab)
    out = torch.empty_like(logits)
    for b in range(batch):
        sequence = rows.sequence(b)
        row_processors = processors_for_row(logits_processor, int(rows.active[b]))
        for j in range(k):
            ids = torch.cat([sequence, block_ids[b, : first + j]])[None]
            out[b, j] = row_processors(ids, logits[b, j][None].clone())[0]
    return out


def process_tree(logits_processor, rows, tokens, ancestors, logits):
    """Logits processors on the nodes of a verify tree, each with its exact prefix.

    tokens: [B, N] node tokens, node 0 being the row's last emitted token (the seed); ancestors: [N, N] bool (node
    n's path, n included, in node order = depth order); logits: [B, N, V]: node n's logits continue
    `rows.sequences()[b]` followed by the tokens on n's path after the seed."""
    if not len(logits_processor):
        return logits
    batch, n, vocab = logits.shape
    if all(isinstance(p, PREFIX_FREE_PROCESSORS) for p in logits_processor):
        return process_block(logits_processor, rows, tokens, logits)
    paths = [ancestors[node, 1:].nonzero()[:, 0] + 1 for node in range(n)]
    out = torch.empty_like(logits)
    for b in range(batch):
        sequence = rows.sequence(b)
        row_processors = processors_for_row(logits_processor, int(rows.active[b]))
        for node in range(n):
            ids = torch.cat([sequence, tokens[b, paths[node]]])[None]
            out[b, node] = row_processors(ids, logits[b, node][None].clone())[0]
    return out


# Processor attributes that hold one value per row of the batch `generate` was called with.
_PER_ROW_STATE = {RepetitionPenaltyLogitsProcessor: ("prompt_ignore_length",)}


def processors_for_row(logits_processor, row):
    """The processors as seen by original batch row `row` alone: per-row state sliced to that row, and a
    `prefix_allowed_tokens_fn` called with the row's real batch index (the row is processed as a batch of one)."""
    out = LogitsProcessorList()
    for processor in logits_processor:
        fields = [f for t, names in _PER_ROW_STATE.items() if isinstance(processor, t) for f in names]
        state = {f: getattr(processor, f) for f in fields if isinstance(getattr(processor, f, None), torch.Tensor)}
        if state:
            processor = copy.copy(processor)
            for name, value in state.items():
                setattr(processor, name, value[row : row + 1])
        if isinstance(processor, PrefixConstrainedLogitsProcessor):
            processor = copy.copy(processor)
            allowed = processor._prefix_allowed_tokens_fn
            processor._prefix_allowed_tokens_fn = lambda batch_id, sentence, fn=allowed: fn(row + batch_id, sentence)
        out.append(processor)
    return out


def softmax_probs(scores):
    return F.softmax(scores.float(), dim=-1)


def sample_or_argmax(scores, do_sample):
    """scores [..., V] (processed) -> tokens [...]."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = softmax_probs(scores)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1).reshape(probs.shape[:-1])


def exclude_token(logits, token_id):
    logits = logits.clone()
    logits[..., token_id] = -math.inf
    return logits


def speculative_accept(draft, target_scores, draft_probs, do_sample):
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
    p = softmax_probs(target_scores)
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



def contiguous_committed(masked):
    """[B] length of each row's leading run of committed (unmasked) slots."""
    return (~masked).long().cumprod(dim=1).sum(dim=1)


def shift_left(block, by):
    """Row b of the result is block[b, by[b]:], right-padded with its last value."""
    k = block.shape[1]
    index = (torch.arange(k, device=block.device)[None, :] + by[:, None]).clamp(max=k - 1)
    return block.gather(1, index)


def gumbel_argmax(scores):
    """A sample of softmax(scores) per position by the Gumbel-max trick (float64 noise, as NVIDIA's code)."""
    uniform = torch.rand(scores.shape, dtype=torch.float64, device=scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
    return (scores.double() + gumbel).argmax(dim=-1)


def transfer_count(masks_at_start, steps, step):
    """NVIDIA's schedule: `masks_at_start` spread over `steps` steps; the first (masks mod steps) get one more."""
    base = masks_at_start // steps
    extra = (masks_at_start % steps > step).long()
    return base + extra


def select_commits(confidence, masked, threshold, *, masks_at_start=None, step=0, max_steps=None, last_step=False,
                   leftmost=False, candidates=None, at_least_one=True):
    """Which masked slots [B, L] a denoising step commits. confidence [B, L] is -inf outside masked slots.

    With a threshold: every masked slot at or above it, plus one, so that each step commits: the most confident
    masked slot, or with `leftmost` the leftmost masked slot. Without: the schedule's count of masked slots, taken
    by confidence or, with `leftmost`, from the left. `last_step` commits every masked slot.

    `candidates` [B, L] (`defer_adjacent_repeats`): a masked slot whose candidate equals that of its left
    neighbour, itself masked, is deferred to a later step. The leftmost masked slot of a row is never deferred (its
    left neighbour is committed), so every step still commits.

    `at_least_one=False` (with a threshold): only the slots at or above it (diffusion's look-ahead step, which
    follows a committed seed)."""
    batch, length = confidence.shape
    rows = torch.arange(batch, device=confidence.device)
    if last_step:
        return masked.clone()
    eligible = masked
    if candidates is not None:
        repeat = torch.zeros_like(masked)
        repeat[:, 1:] = masked[:, :-1] & (candidates[:, 1:] == candidates[:, :-1])
        eligible = masked & ~repeat
    # Priority of each slot: its confidence, or its distance from the block's end (the leftmost masked slot first).
    priority = torch.arange(length, 0, -1, device=confidence.device).expand(batch, -1) if leftmost else confidence
    priority = torch.where(eligible, priority.to(confidence.dtype), -math.inf)
    if threshold is None:
        steps = max_steps if max_steps is not None else int(masks_at_start.max().clamp(min=1))
        count = transfer_count(masks_at_start, max(steps, 1), step).clamp(min=1)
        count = torch.minimum(count, eligible.sum(dim=1))
        order = priority.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[rows[:, None], order] = torch.arange(length, device=confidence.device)[None, :]
        return eligible & (rank < count[:, None])
    commit = eligible & (confidence >= threshold)
    if not at_least_one:
        return commit
    first = priority.argmax(dim=1)
    commit[rows, first] |= masked.any(dim=1)
    return commit


def left_to_right_commits(max_prob, masked, threshold):
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


