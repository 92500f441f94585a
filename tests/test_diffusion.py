"""Block-diffusion decoding (`generate(decode_mode="diffusion")`).

The core check is token equality with `reference_diffusion_generate` below: a slow, cache-free transcription of
NVIDIA's `generate` (docs/reference-model.md §7.1, §7.3) for one row, with its RNG call order (§8.2). Every forward
of the reference recomputes the whole sequence with an explicit attention pattern, so it shares nothing with the
package's loop (no cache, no `_Rows`, no selection helpers).

The one intentional difference from NVIDIA (docs/reference-model.md §10 item 8): the package never predicts the mask
token, neither as an AR seed nor as a denoising candidate. The reference below does the same (it excludes the
mask id from every candidate / seed distribution) and documents it where it happens; confidences are still
softmax(raw logits) with the mask id included, as in NVIDIA's code.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, PreTrainedTokenizerFast, pipeline
from transformers.cache_utils import DynamicCache
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import EOS_ID, MASK_ID, PAD_ID, left_pad, new_tokens, random_prompt, tiny_model

from nemotron_diffusion import NemotronDiffusionForCausalLM, NemotronDiffusionGenerateOutput
from nemotron_diffusion.generation_config_nemotron_diffusion import COMMIT_ORDERS
from nemotron_diffusion.sampling_nemotron_diffusion import select_commits


# transformers 5.24 renamed generate's `past_key_values` to `cache` (the old name only warns).
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def confident_model():
    """A tiny model whose logits are sharp enough that denoising confidences cross 0.3 and 0.9 regularly, so the
    threshold path commits several slots per step (checked explicitly below)."""
    return tiny_model(seed=0, std=0.6)


@pytest.fixture(scope="module")
def plain_model():
    return tiny_model(seed=0, std=0.2)


def fresh_confident_model():
    return tiny_model(seed=0, std=0.6)


def gen(model, input_ids, attention_mask=None, **kwargs):
    """Diffusion generate with a dict output; defaults: greedy, no EOS, block 8."""
    kwargs.setdefault("decode_mode", "diffusion")
    kwargs.setdefault("block_size", 8)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("return_dict_in_generate", True)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model.generate(input_ids, **kwargs)


# ------------------------------------------------------------------------------------------- the reference
def _causal_last_logits(model, x):
    """Causal forward over the whole sequence; logits of the last position (predicts the next token)."""
    return model(input_ids=x, is_causal=True, use_cache=False).logits[:, -1].float()


def _block_logits(model, x, block_start, causal_context, prompt_length, block_length):
    """Logits of the current block x[:, block_start:], recomputed from scratch.

    causal_context=True: the committed prefix is causal (exactly what a causal prefill plus causal commit passes put
    in the cache), the block sees the whole prefix and itself bidirectionally.
    causal_context=False: the prompt is one bidirectional block, every committed block is bidirectional within
    itself and sees everything before it (NVIDIA's bidirectional prefill and commit passes), the current block too.
    """

    if causal_context:

        def mask(batch_idx, head_idx, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (q_idx >= block_start)

    else:

        def block_id(i):
            return torch.where(i < prompt_length, -1, (i - prompt_length) // block_length)

        def mask(batch_idx, head_idx, q_idx, kv_idx):
            return block_id(kv_idx) <= block_id(q_idx)

    logits = model(input_ids=x, use_cache=False, is_causal=False, mask_function=mask).logits
    return logits[:, block_start:].float()


def _without_mask(logits, mask_id):
    # OUR INTENTIONAL FIX (docs/reference-model.md §10 item 8): the mask id is never a seed or a candidate.
    logits = logits.clone()
    logits[..., mask_id] = -math.inf
    return logits


def _sample_token(logits, temperature):
    """NVIDIA: multinomial over softmax(l / T) at T > 0, argmax otherwise."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1)[:, 0]
    return logits.argmax(dim=-1)


def _add_gumbel_noise(logits, temperature):
    """NVIDIA's Gumbel noise: float64, exp(l) / (-ln U)^T; argmax of it is a sample of softmax(l / T)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def _num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


def _get_transfer_index(logits, temperature, mask_index, x, num_transfer_tokens, threshold, mask_id, leftmost=False,
                        defer_repeats=False):
    x0 = torch.argmax(_add_gumbel_noise(_without_mask(logits, mask_id), temperature), dim=-1)
    p = torch.softmax(logits, dim=-1)  # raw logits, T = 1, mask id included (NVIDIA's confidence)
    x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    if defer_repeats:  # defer_adjacent_repeats (ours): a slot repeating its masked left neighbour's candidate waits
        mask_index = mask_index.clone()
        for j in range(mask_index.shape[0]):
            for slot in range(mask_index.shape[1] - 1, 0, -1):
                if mask_index[j, slot - 1] and x0[j, slot] == x0[j, slot - 1]:
                    mask_index[j, slot] = False
        num_transfer_tokens = torch.minimum(num_transfer_tokens, mask_index.sum(dim=1))
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, torch.tensor(-math.inf))
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if leftmost:  # commit_order="leftmost": the threshold's slots plus the leftmost masked one, or the first k
        for j in range(confidence.shape[0]):
            masked_slots = mask_index[j].nonzero()[:, 0].tolist()
            k = len(masked_slots) if threshold is not None else int(num_transfer_tokens[j])
            for rank, slot in enumerate(masked_slots[:k]):
                transfer_index[j, slot] = rank == 0 or threshold is None or bool(confidence[j, slot] >= threshold)
        return x0, transfer_index
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        k = int(num_transfer_tokens[j])
        _, select_index = torch.topk(confidence[j], k=k)
        transfer_index[j, select_index] = True
        if threshold is not None:
            for r in range(1, k):
                if confidence[j, select_index[r]] < threshold:
                    transfer_index[j, select_index[r]] = False
    return x0, transfer_index


@torch.no_grad()
def reference_diffusion_generate(
    model, prompt_ids, max_new_tokens, block_length, threshold=None, causal_context=True, temperature=0.0, eos_token_id=None,
    steps_per_block=None, leftmost=False, defer_repeats=False, fused=False,
):
    """NVIDIA's `generate` (docs/reference-model.md §7.3) for a batch of one, cache-free.

    Returns (sequence [1, P + n], stats) with stats = dict(denoise=#denoise forwards, commits=#commit forwards,
    per_step=[tokens committed by each denoise step]).
    `steps_per_block` is `block_length` in NVIDIA's release; the transfer schedule takes any step count (their
    earlier `steps` argument), which is what `max_denoising_steps` means without a threshold. `leftmost` is our
    `commit_order="leftmost"` (not NVIDIA's): the leftmost masked slot instead of the most confident one.
    `defer_repeats` is our `defer_adjacent_repeats=True` (not NVIDIA's either). `fused` is our
    `fused_commit_forward=True`: after each commit pass but the last, the next block, all masks (its seed slot
    too), is denoised once over the committed sequence; that look-ahead step commits, next to the seed, only the
    slots at or above the threshold (none forced) and is not a counted denoise forward (it rides on the commit).
    """
    assert prompt_ids.shape[0] == 1
    assert max_new_tokens % block_length == 0
    mask_id = model.config.mask_token_id
    num_blocks = max_new_tokens // block_length
    steps_per_block = steps_per_block or block_length
    prompt_length = prompt_ids.shape[1]
    x = prompt_ids.clone()
    stats = dict(denoise=0, commits=0, per_step=[])

    seed = None
    if causal_context:  # prefill: causal, its last logit seeds block 0 (not counted by NVIDIA)
        seed = _sample_token(_without_mask(_causal_last_logits(model, x), mask_id), temperature)
    lookahead = None  # fused: the next block's look-ahead logits

    for b in range(num_blocks):
        block_start = prompt_length + b * block_length
        block = torch.full((1, block_length), mask_id, dtype=torch.long)
        if causal_context:
            block[:, 0] = seed
        x = torch.cat([x, block], dim=1)
        num_transfer = _num_transfer_tokens(x[:, block_start:] == mask_id, steps_per_block)
        if lookahead is not None:
            mask_index = x[:, block_start:] == mask_id
            x0, _ = _get_transfer_index(lookahead, temperature, mask_index, x[:, block_start:], num_transfer[:, 0],
                                        threshold, mask_id, leftmost, defer_repeats)
            p = torch.softmax(lookahead, dim=-1).gather(-1, x0[..., None])[..., 0]
            eligible = mask_index.clone()
            if defer_repeats:
                eligible[:, 1:] &= ~(mask_index[:, :-1] & (x0[:, 1:] == x0[:, :-1]))
            transfer = eligible & (p >= threshold)
            stats["per_step"].append(int(transfer.sum()))
            region = x[:, block_start:]
            region[transfer] = x0[transfer]
            x[:, block_start:] = region
        for i in range(steps_per_block):
            # Equality test is safe here: the mask id is never committed (see _without_mask).
            mask_index = x[:, block_start:] == mask_id
            if not mask_index.any():
                break
            stats["denoise"] += 1
            logits = _block_logits(model, x, block_start, causal_context, prompt_length, block_length)
            x0, transfer = _get_transfer_index(
                logits, temperature, mask_index, x[:, block_start:], num_transfer[:, i], threshold, mask_id, leftmost,
                defer_repeats,
            )
            stats["per_step"].append(int(transfer.sum()))
            region = x[:, block_start:]
            region[transfer] = x0[transfer]
            x[:, block_start:] = region
            if eos_token_id is not None:
                row = x[0, block_start:]
                hits = (row == eos_token_id).nonzero()
                if hits.numel() and not (row[: int(hits[0])] == mask_id).any():
                    break
        # commit pass: writes the block; with causal context its last logit is the next seed
        stats["commits"] += 1
        if causal_context:
            seed = _sample_token(_without_mask(_causal_last_logits(model, x), mask_id), temperature)
        if fused and b + 1 < num_blocks:
            ahead = torch.cat([x, torch.full((1, block_length), mask_id, dtype=torch.long)], dim=1)
            lookahead = _block_logits(model, ahead, x.shape[1], True, prompt_length, block_length)
        if eos_token_id is not None:
            generated = x[0, prompt_length:]
            hits = (generated == eos_token_id).nonzero()
            if hits.numel():
                return x[:, : prompt_length + int(hits[0]) + 1], stats
    return x, stats


def expected_forwards(stats):
    """Our convention: prefill counted, every denoise forward, one commit per block except the final one (after the
    last needed token there is nothing left to seed)."""
    return 1 + stats["denoise"] + stats["commits"] - 1


# ------------------------------------------------------------------------ 1. greedy equality with the reference
GREEDY_CASES = [
    # (block, max_new_tokens, threshold, causal_context, prompt_seed, prompt_length)
    (4, 16, 0.9, True, 11, 5),
    (4, 16, 0.3, True, 12, 9),
    (4, 16, None, True, 13, 7),
    (8, 24, 0.9, True, 14, 6),
    (8, 24, 0.3, True, 15, 12),
    (8, 24, None, True, 16, 4),
    (32, 32, 0.9, True, 17, 8),
    (32, 32, 0.3, True, 18, 5),
    (32, 32, None, True, 19, 10),
    (8, 16, 0.9, False, 20, 7),
    (4, 12, None, False, 21, 6),
]


@pytest.mark.parametrize("block,max_new,threshold,causal,seed,length", GREEDY_CASES)
def test_greedy_matches_reference(confident_model, block, max_new, threshold, causal, seed, length):
    prompt = random_prompt(seed, length)
    ref, stats = reference_diffusion_generate(confident_model, prompt, max_new, block, threshold, causal_context=causal)
    out = gen(
        confident_model, prompt, block_size=block, confidence_threshold=threshold, causal_context=causal,
        max_new_tokens=max_new,
    )
    assert isinstance(out, NemotronDiffusionGenerateOutput)
    assert out.sequences.tolist() == ref.tolist()
    assert int(out.num_forwards[0]) == expected_forwards(stats)
    assert out.tokens_per_forward[0].item() == pytest.approx(max_new / int(out.num_forwards[0]))
    if threshold is None:
        assert set(stats["per_step"]) == {1}  # one committed slot per denoising step



LEFTMOST_CASES = [(4, 16, 0.9, True, 31, 5), (4, 16, 0.3, True, 32, 9), (8, 24, 0.5, True, 33, 6),
                  (8, 24, None, True, 34, 4), (8, 16, 0.9, False, 35, 7)]


@pytest.mark.parametrize("block,max_new,threshold,causal,seed,length", LEFTMOST_CASES)
def test_leftmost_commit_order_matches_reference(confident_model, block, max_new, threshold, causal, seed, length):
    """commit_order="leftmost": each step commits the slots at or above the threshold plus the leftmost masked one
    (without a threshold: the schedule's count from the left, i.e. left to right, one per step)."""
    prompt = random_prompt(seed, length)
    ref, stats = reference_diffusion_generate(confident_model, prompt, max_new, block, threshold,
                                              causal_context=causal, leftmost=True)
    out = gen(confident_model, prompt, block_size=block, confidence_threshold=threshold, causal_context=causal,
              max_new_tokens=max_new, commit_order="leftmost")
    assert out.sequences.tolist() == ref.tolist()
    assert int(out.num_forwards[0]) == expected_forwards(stats)


def test_commit_orders_differ(confident_model):
    """The two orders are different rules: on the same prompts the leftmost order commits other tokens somewhere
    (else the test above could not tell them apart)."""
    outputs = {}
    for order in COMMIT_ORDERS:
        outputs[order] = [gen(confident_model, random_prompt(seed, 6), block_size=8, confidence_threshold=0.9,
                              max_new_tokens=16, commit_order=order).sequences.tolist() for seed in range(40, 46)]
    assert outputs["leftmost"] != outputs["most_confident"]


DEFER_CASES = [(4, 16, 0.9, True, 51, 5, False), (4, 16, 0.3, True, 52, 9, True), (8, 24, 0.3, True, 53, 6, False),
               (8, 24, None, True, 54, 4, True), (8, 16, 0.5, False, 55, 7, True), (8, 24, 0.2, True, 56, 8, True)]


@pytest.mark.parametrize("block,max_new,threshold,causal,seed,length,leftmost", DEFER_CASES)
def test_defer_adjacent_repeats_matches_reference(confident_model, block, max_new, threshold, causal, seed, length,
                                                  leftmost):
    """defer_adjacent_repeats=True: a masked slot whose candidate equals its masked left neighbour's is left for a
    later step, in either commit order, with or without a threshold."""
    prompt = random_prompt(seed, length)
    ref, stats = reference_diffusion_generate(confident_model, prompt, max_new, block, threshold,
                                              causal_context=causal, leftmost=leftmost, defer_repeats=True)
    out = gen(confident_model, prompt, block_size=block, confidence_threshold=threshold, causal_context=causal,
              max_new_tokens=max_new, commit_order="leftmost" if leftmost else "most_confident",
              defer_adjacent_repeats=True)
    assert out.sequences.tolist() == ref.tolist()
    assert int(out.num_forwards[0]) == expected_forwards(stats)


FUSED_CASES = [(4, 16, 0.9, 61, 5, False, False), (4, 16, 0.3, 62, 9, True, True), (8, 24, 0.3, 63, 6, False, True),
               (4, 20, 0.3, 64, 7, True, False), (8, 16, 0.5, 65, 4, False, False), (3, 15, 0.2, 66, 8, True, True)]


@pytest.mark.parametrize("block,max_new,threshold,seed,length,leftmost,defer", FUSED_CASES)
def test_fused_commit_forward_matches_reference(confident_model, block, max_new, threshold, seed, length, leftmost,
                                                defer):
    """fused_commit_forward=True: the commit forward's look-ahead at the next block's masks is that block's first
    denoising step (threshold commits only), one forward fewer per block when it commits; same tokens as the
    reference loop that computes the look-ahead from scratch, in either commit order, with or without deferral."""
    prompt = random_prompt(seed, length)
    ref, stats = reference_diffusion_generate(confident_model, prompt, max_new, block, threshold, leftmost=leftmost,
                                              defer_repeats=defer, fused=True)
    out = gen(confident_model, prompt, block_size=block, confidence_threshold=threshold, max_new_tokens=max_new,
              commit_order="leftmost" if leftmost else "most_confident", defer_adjacent_repeats=defer,
              fused_commit_forward=True)
    assert out.sequences.tolist() == ref.tolist()
    assert int(out.num_forwards[0]) == expected_forwards(stats)


def test_fused_commit_forward_saves_forwards(confident_model):
    """The look-ahead commits on these models: fewer forwards for the same budget than the plain loop, and other
    tokens somewhere (its step did not see the seed), so the reference test above tells the two loops apart."""
    forwards, outputs = {}, {}
    for fused in (False, True):
        runs = [gen(confident_model, random_prompt(seed, 6), block_size=4, confidence_threshold=0.3, max_new_tokens=16,
                    fused_commit_forward=fused) for seed in range(70, 76)]
        forwards[fused] = sum(int(run.num_forwards[0]) for run in runs)
        outputs[fused] = [run.sequences.tolist() for run in runs]
    assert forwards[True] < forwards[False]
    assert outputs[True] != outputs[False]


def test_defer_adjacent_repeats_changes_commits(confident_model):
    """The deferral is not a no-op on these models (else the reference test above could not tell it apart)."""
    forwards = {}
    for defer in (False, True):
        forwards[defer] = [int(gen(confident_model, random_prompt(seed, 6), block_size=8, confidence_threshold=0.3,
                                   max_new_tokens=16, defer_adjacent_repeats=defer).num_forwards[0])
                           for seed in range(60, 66)]
    assert sum(forwards[True]) > sum(forwards[False])  # here the deferred slots cost forwards


def test_select_commits_defers_a_slot_repeating_its_masked_neighbour():
    masked = torch.tensor([[False, True, True, True, True]])
    candidates = torch.tensor([[7, 7, 7, 7, 8]])
    confidence = torch.tensor([[-math.inf, 0.95, 0.99, 0.97, 0.95]])
    plain = select_commits(confidence, masked, 0.9)
    assert plain.tolist() == [[False, True, True, True, True]]
    # Slot 1's left neighbour (slot 0) is committed, so slot 1 may repeat it; slots 2 and 3 repeat a masked slot.
    deferred = select_commits(confidence, masked, 0.9, candidates=candidates)
    assert deferred.tolist() == [[False, True, False, False, True]]
    # Below the threshold everywhere: the one slot every step commits is never a deferred one.
    low = torch.tensor([[-math.inf, 0.2, 0.6, 0.5, 0.1]])
    assert select_commits(low, masked, 0.9, candidates=candidates).tolist() == [[False, True, False, False, False]]
    assert select_commits(low, masked, 0.9).tolist() == [[False, False, True, False, False]]
    # The schedule (no threshold) takes its count among the slots that are not deferred.
    schedule = select_commits(confidence, masked, None, masks_at_start=torch.tensor([4]), max_steps=2,
                              candidates=candidates)
    assert schedule.tolist() == [[False, True, False, False, True]]


def test_commit_order_in_another_mode_warns(plain_model):
    with pytest.warns(UserWarning, match="commit_order"):
        plain_model.generate(random_prompt(1, 4), decode_mode="ar", max_new_tokens=2, commit_order="leftmost")

class MaskShadowHead(torch.nn.Module):
    """LM head whose mask-token logit sits `gap` below the best other logit: the mask id is never the argmax, but it
    holds a large share of the probability, so a confidence computed with or without it differs a lot."""

    def __init__(self, linear, gap=1.0):
        super().__init__()
        self.linear, self.gap = linear, gap

    def forward(self, hidden):
        logits = self.linear(hidden)
        others = logits.clone()
        others[..., MASK_ID] = -math.inf
        logits = logits.clone()
        logits[..., MASK_ID] = others.max(dim=-1).values - self.gap
        return logits


@pytest.fixture(scope="module")
def mask_shadow_model():
    model = tiny_model(seed=0, std=0.6)
    model.diffusion_head = MaskShadowHead(model.diffusion_head)
    return model


@pytest.mark.parametrize("block,max_new,threshold,temperature", [(8, 24, 0.5, 0.0), (4, 16, 0.3, 0.0), (8, 16, 0.4, 0.7)])
def test_confidence_includes_mask_probability(mask_shadow_model, block, max_new, threshold, temperature):
    """NVIDIA's confidence is softmax(raw logits) at the candidate, the mask id included; only the candidate excludes
    it. With a head that gives the mask id a large probability, excluding it from the confidence too would change
    which slots pass the threshold."""
    prompt = random_prompt(15, 8)
    torch.manual_seed(9)
    ref, stats = reference_diffusion_generate(mask_shadow_model, prompt, max_new, block, threshold, temperature=temperature)
    torch.manual_seed(9)
    out = gen(mask_shadow_model, prompt, block_size=block, confidence_threshold=threshold, max_new_tokens=max_new,
              do_sample=temperature > 0, temperature=temperature or None, top_k=0)
    assert out.sequences.tolist() == ref.tolist()
    assert max(stats["per_step"]) > 1
    assert int(out.num_forwards[0]) == expected_forwards(stats)


def test_threshold_path_commits_several_slots_per_step(confident_model):
    """Guard for the equality tests: with the confident model, both thresholds really commit several slots in one
    step (otherwise the tests above would only exercise the one-per-step path)."""
    for threshold in (0.9, 0.3):
        multi = False
        for block, max_new, th, causal, seed, length in GREEDY_CASES:
            if th != threshold or not causal:
                continue
            _, stats = reference_diffusion_generate(confident_model, random_prompt(seed, length), max_new, block, th)
            multi |= max(stats["per_step"]) > 1
            out = gen(confident_model, random_prompt(seed, length), block_size=block, confidence_threshold=th,
                      max_new_tokens=max_new)
            masks = max_new - max_new // block  # slots that need denoising (seeds come from the AR head)
            if max(stats["per_step"]) > 1:
                assert int(out.num_forwards[0]) < 1 + masks + max_new // block - 1
        assert multi, f"threshold {threshold} never committed more than one slot per step"


def test_greedy_with_eos_matches_reference(confident_model):
    """A stop inside a block: the reference's EOS exit (batch of one) and ours give the same tokens."""
    prompt = random_prompt(14, 6)
    free, _ = reference_diffusion_generate(confident_model, prompt, 24, 8, 0.9)
    generated = free[0, 6:].tolist()
    # an EOS id that first appears strictly inside a block (not at a seed slot)
    eos = next(t for i, t in enumerate(generated) if i % 8 != 0 and t not in generated[:i] and i > 2)
    ref, stats = reference_diffusion_generate(confident_model, prompt, 24, 8, 0.9, eos_token_id=eos)
    out = gen(confident_model, prompt, block_size=8, confidence_threshold=0.9, max_new_tokens=24, eos_token_id=eos)
    assert out.sequences.tolist() == ref.tolist()
    assert ref[0, -1].item() == eos and ref.shape[1] < 6 + 24
    assert int(out.num_forwards[0]) == expected_forwards(stats)


# ---------------------------------------------------------------------------- 2. sampling with a fixed seed
@pytest.mark.parametrize(
    "block,max_new,threshold,seed",
    [(8, 24, 0.9, 0), (4, 16, None, 1), (8, 16, 0.3, 2)],
)
def test_sampling_matches_reference_rng_order(confident_model, block, max_new, threshold, seed):
    """RNG order (docs/reference-model.md §8.2): prefill multinomial; one float64 uniform [B, L, V] per denoise step;
    one multinomial per commit. NVIDIA samples without top-k, so top_k=0 (transformers' default adds top-k 50)."""
    prompt = random_prompt(30 + seed, 6)
    torch.manual_seed(1234 + seed)
    ref, _ = reference_diffusion_generate(confident_model, prompt, max_new, block, threshold, temperature=0.7)
    torch.manual_seed(1234 + seed)
    out = gen(
        confident_model, prompt, block_size=block, confidence_threshold=threshold, max_new_tokens=max_new,
        do_sample=True, temperature=0.7, top_k=0,
    )
    assert out.sequences.tolist() == ref.tolist()
    # sampling really happened: the greedy output differs
    greedy = gen(confident_model, prompt, block_size=block, confidence_threshold=threshold, max_new_tokens=max_new)
    assert greedy.sequences.tolist() != out.sequences.tolist()


def test_sampling_is_reproducible_and_never_returns_mask(confident_model):
    prompt = random_prompt(40, 5, batch=2)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(gen(confident_model, prompt, max_new_tokens=16, do_sample=True, temperature=1.0).sequences)
    assert torch.equal(outs[0], outs[1])
    assert not (outs[0][:, 5:] == MASK_ID).any()


# ---------------------------------------------------------------------------- 3. batching, stops, streaming
def _mask_loving_model():
    """A model whose head puts by far the highest logit on the mask token everywhere."""
    model = tiny_model(seed=3, std=0.6)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.diffusion_head.weight)
        head.bias.zero_()
        head.bias[MASK_ID] = 30.0
    model.diffusion_head = head
    return model


def test_mask_token_never_returned():
    model = _mask_loving_model()
    prompt = random_prompt(50, 6, batch=2)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, torch.full((2, 8), MASK_ID)], 1), is_causal=False).logits
    assert (logits.argmax(-1) == MASK_ID).all()  # the model really wants the mask id
    for threshold in (0.9, None):
        out = gen(model, prompt, max_new_tokens=20, confidence_threshold=threshold)
        assert out.sequences.shape == (2, 6 + 20)
        assert not (out.sequences[:, 6:] == MASK_ID).any()
    torch.manual_seed(0)
    out = gen(model, prompt, max_new_tokens=20, do_sample=True, temperature=1.0, top_k=0)
    assert not (out.sequences[:, 6:] == MASK_ID).any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("threshold", [0.9, None])
def test_left_padded_batch_equals_rows_alone(confident_model, threshold, causal):
    prompts = [random_prompt(60 + i, n)[0].tolist() for i, n in enumerate((3, 9, 6))]
    ids, mask = left_pad(prompts)
    settings = dict(max_new_tokens=20, confidence_threshold=threshold, causal_context=causal)
    batch = gen(confident_model, ids, mask, **settings)
    rows = new_tokens(batch.sequences, ids.shape[1])
    for i, p in enumerate(prompts):
        alone = gen(confident_model, torch.tensor([p]), **settings)
        assert rows[i] == alone.sequences[0, len(p):].tolist()
        assert int(batch.num_forwards[i]) == int(alone.num_forwards[0])
    assert ids.equal(left_pad(prompts)[0])


def test_per_row_eos_in_a_batch(confident_model):
    """Rows stop independently: a row that hits EOS is padded after it, the other rows continue unchanged; a
    left-padded batch whose rows drop out mid-way still gives every row its own tokens."""
    prompts = [random_prompt(70 + i, n)[0].tolist() for i, n in enumerate((4, 8, 6))]
    free = [gen(confident_model, torch.tensor([p]), max_new_tokens=24, confidence_threshold=0.9).sequences[0, len(p):].tolist()
            for p in prompts]
    # EOS: a token that row 0 produces strictly inside a block and before the end, and that row 2 never produces
    eos = next(t for i, t in enumerate(free[0]) if 0 < i < 20 and i % 8 and t not in free[0][:i] and t not in free[2])
    stop0 = free[0].index(eos)
    ids, mask = left_pad(prompts)
    out = gen(confident_model, ids, mask, max_new_tokens=24, confidence_threshold=0.9, eos_token_id=eos,
              pad_token_id=PAD_ID)
    rows = new_tokens(out.sequences, ids.shape[1])
    assert out.sequences.shape[1] == ids.shape[1] + 24
    assert rows[0] == free[0][: stop0 + 1] + [PAD_ID] * (24 - stop0 - 1)
    expected1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert rows[1][: len(expected1)] == expected1 and set(rows[1][len(expected1):]) <= {PAD_ID}
    assert rows[2] == free[2]
    assert int(out.num_forwards[0]) < int(out.num_forwards[2])
    assert out.tokens_per_forward[0].item() == pytest.approx((stop0 + 1) / int(out.num_forwards[0]))


def test_all_rows_stop_early_output_is_trimmed(confident_model):
    prompt = random_prompt(14, 6)
    free = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=0.9).sequences[0, 6:].tolist()
    eos = free[5]
    first = free.index(eos)
    out = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=0.9, eos_token_id=eos)
    assert out.sequences[0, 6:].tolist() == free[: first + 1]


@pytest.mark.parametrize("threshold", [0.9, 0.3, None])
@pytest.mark.parametrize("max_new", [1, 3, 13])
def test_exact_budget_cuts_the_last_block(confident_model, threshold, max_new):
    """A budget that ends inside a block (block 8): the full blocks before it are the longer run's; the last block
    is cut to the slots that are left, so no forward is spent on slots that would never be emitted, and it is
    decoded exactly as a block of that size."""
    prompt = random_prompt(80, 7, batch=2)
    full = max_new // 8 * 8  # new tokens in full blocks
    long = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=threshold)
    out = gen(confident_model, prompt, max_new_tokens=max_new, confidence_threshold=threshold)
    assert out.sequences.shape == (2, 7 + max_new)
    assert torch.equal(out.sequences[:, : 7 + full], long.sequences[:, : 7 + full])
    if max_new == 1:  # the AR seed of the prefill is the only token: no denoising forward
        assert out.num_forwards.tolist() == [1, 1]
    assert (out.num_forwards <= long.num_forwards).all()
    if max_new < 8:  # one block, cut to the budget: the run with block_size = budget
        cut = gen(confident_model, prompt, max_new_tokens=max_new, block_size=max_new, confidence_threshold=threshold)
        assert torch.equal(out.sequences, cut.sequences) and torch.equal(out.num_forwards, cut.num_forwards)
    # sampling, one row (a batch draws noise for its live rows only, so rows that finish change the others' draws):
    # the short run makes the same random draws as the long one through its full blocks (and the prefill's seed)
    torch.manual_seed(5)
    long = gen(confident_model, prompt[:1], max_new_tokens=24, confidence_threshold=threshold, do_sample=True)
    torch.manual_seed(5)
    out = gen(confident_model, prompt[:1], max_new_tokens=max_new, confidence_threshold=threshold, do_sample=True)
    same = 7 + max(full, 1)
    assert torch.equal(out.sequences[:, :same], long.sequences[:, :same])


class StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids[:, -1] == self.token


def test_custom_stopping_criteria_cut_inside_a_block(confident_model):
    prompt = random_prompt(14, 6)
    free = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=0.9).sequences[0, 6:].tolist()
    index = next(i for i, t in enumerate(free) if i % 8 not in (0, 7) and t not in free[:i])
    criteria = StopOnToken(free[index])
    out = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=0.9,
              stopping_criteria=StoppingCriteriaList([criteria]))
    assert out.sequences[0, 6:].tolist() == free[: index + 1]
    assert criteria.calls > 0
    # batch: only the row whose criterion fires stops
    other = random_prompt(90, 6)
    other_free = gen(confident_model, other, max_new_tokens=24, confidence_threshold=0.9).sequences[0, 6:].tolist()
    if free[index] not in other_free:
        out = gen(confident_model, torch.cat([prompt, other]), max_new_tokens=24, confidence_threshold=0.9,
                  stopping_criteria=StoppingCriteriaList([StopOnToken(free[index])]), pad_token_id=PAD_ID)
        rows = new_tokens(out.sequences, 6)
        assert rows[0] == free[: index + 1] + [PAD_ID] * (23 - index)
        assert rows[1] == other_free


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = 0

    def put(self, value):
        assert not self.ended
        self.chunks.append(value.tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("threshold,max_new,eos", [(0.9, 24, None), (None, 13, None), (0.9, 24, 18)])
def test_streamer_receives_chunks_in_order(confident_model, threshold, max_new, eos):
    prompt = random_prompt(14, 6)
    streamer = RecordingStreamer()
    out = gen(confident_model, prompt, max_new_tokens=max_new, confidence_threshold=threshold, streamer=streamer,
              eos_token_id=eos)
    if eos is not None:  # stopped inside the first block: nothing after the EOS was streamed
        assert out.sequences.shape[1] - 6 == 6 and out.sequences[0, -1] == eos
    assert streamer.ended == 1
    # transformers puts the prompt first (as a [1, P] batch), then our emitted chunks as 1-D tensors
    first, *rest = streamer.chunks
    assert first in (prompt.tolist(), prompt[0].tolist())
    flat = [t for chunk in rest for t in (chunk if isinstance(chunk, list) else [chunk])]
    assert flat == out.sequences[0, 6:].tolist()
    assert all(len(c) >= 1 for c in rest)
    blocks = math.ceil((out.sequences.shape[1] - 6) / 8)
    assert len(rest) > blocks  # streamed while blocks were being denoised, not once per block
    if threshold is not None:
        assert max(len(c) for c in rest) > 1  # a step that commits several slots streams them together


def test_streamer_with_batch_is_refused(confident_model):
    with pytest.raises(ValueError, match="stream"):
        gen(confident_model, random_prompt(1, 5, batch=2), max_new_tokens=8, streamer=RecordingStreamer())


@pytest.mark.parametrize("block,max_new", [(8, 24), (4, 10)])
def test_forward_counts_without_threshold(confident_model, block, max_new):
    """threshold None: one slot per denoising forward, so every block takes (B-1) denoising forwards plus one commit;
    with the prefill counted and no commit after the final block, num_forwards == max_new_tokens exactly when the
    budget is a multiple of the block size."""
    prompt = random_prompt(95, 5, batch=2)
    out = gen(confident_model, prompt, block_size=block, confidence_threshold=None, max_new_tokens=max_new)
    blocks = math.ceil(max_new / block)
    denoise = max_new - blocks  # every generated token but the seeds needs one denoising forward
    assert out.num_forwards.tolist() == [1 + denoise + blocks - 1] * 2
    assert torch.allclose(out.tokens_per_forward, torch.full((2,), max_new / (denoise + blocks)))
    assert (out.tokens_per_forward <= 1.0 + 1e-6).all()
    assert out.num_forwards.dtype == torch.long


def test_return_dict_off_returns_tensor(confident_model):
    prompt = random_prompt(14, 6)
    seq = gen(confident_model, prompt, max_new_tokens=9, return_dict_in_generate=False)
    assert isinstance(seq, torch.Tensor)
    assert seq.tolist() == gen(confident_model, prompt, max_new_tokens=9).sequences.tolist()


def test_block_size_one_is_autoregressive(confident_model):
    """block_size=1: every block is just the AR seed, so diffusion decoding is greedy AR through commit forwards."""
    prompts = [random_prompt(140, 5)[0].tolist(), random_prompt(141, 9)[0].tolist()]
    ids, mask = left_pad(prompts)
    ar = confident_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert not (ar[:, ids.shape[1]:] == MASK_ID).any()
    out = gen(confident_model, ids, mask, block_size=1, max_new_tokens=12)
    assert out.sequences.tolist() == ar.tolist()
    assert out.num_forwards.tolist() == [12, 12]  # prefill + one commit per token but the last


def test_max_length_and_eos_list(confident_model):
    prompt = random_prompt(14, 6)
    free = gen(confident_model, prompt, max_new_tokens=24).sequences
    assert torch.equal(gen(confident_model, prompt, max_length=6 + 13).sequences, free[:, : 6 + 13])
    tokens = free[0, 6:].tolist()
    stops = [tokens[9], tokens[4]]
    first = min(tokens.index(stops[0]), tokens.index(stops[1]))
    out = gen(confident_model, prompt, max_new_tokens=24, eos_token_id=stops)
    assert out.sequences[0, 6:].tolist() == tokens[: first + 1]


def test_min_new_tokens_holds_back_eos(confident_model):
    prompt = random_prompt(14, 6)
    tokens = gen(confident_model, prompt, max_new_tokens=24).sequences[0, 6:].tolist()
    eos = tokens[2]
    out = gen(confident_model, prompt, max_new_tokens=24, eos_token_id=eos, min_new_tokens=10).sequences[0, 6:].tolist()
    assert eos not in out[:10]
    assert len(out) >= 10
    assert MASK_ID not in out


def test_sampling_extras(confident_model):
    """num_return_sequences expands the batch; use_cache=False still decodes (the loop needs its own cache)."""
    prompt = random_prompt(150, 5)
    torch.manual_seed(0)
    out = gen(confident_model, prompt, max_new_tokens=10, do_sample=True, num_return_sequences=3)
    assert out.sequences.shape == (3, 15) and out.num_forwards.shape == (3,)
    assert not (out.sequences[:, 5:] == MASK_ID).any()
    a = gen(confident_model, prompt, max_new_tokens=10, use_cache=False)
    b = gen(confident_model, prompt, max_new_tokens=10)
    assert a.sequences.tolist() == b.sequences.tolist()


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
    block=st.sampled_from([1, 2, 3, 5, 8]),
    threshold=st.sampled_from([None, 0.5, 0.9]),
    max_new=st.integers(1, 20),
    causal=st.booleans(),
    eos=st.sampled_from([None, 5, 6, 18, 20]),
    seed=st.integers(0, 10_000),
)
def test_property_batch_rows_equal_rows_alone(confident_model, lengths, block, threshold, max_new, causal, eos, seed):
    """Any left-padded batch: each row gets exactly the tokens (and forward count) it gets alone; no mask id; rows end
    at their first EOS or after exactly max_new_tokens tokens, padded after."""
    prompts = [random_prompt(seed + i, n)[0].tolist() for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    settings_ = dict(block_size=block, confidence_threshold=threshold, max_new_tokens=max_new, causal_context=causal,
                     eos_token_id=eos, pad_token_id=PAD_ID)
    batch = gen(confident_model, ids, mask, **settings_)
    rows = new_tokens(batch.sequences, ids.shape[1])
    for i, p in enumerate(prompts):
        alone = gen(confident_model, torch.tensor([p]), **settings_)
        tokens = alone.sequences[0, len(p):].tolist()
        assert MASK_ID not in tokens
        if eos is not None and eos in tokens:
            assert tokens.index(eos) == len(tokens) - 1
        else:
            assert len(tokens) == max_new
        assert rows[i] == tokens + [PAD_ID] * (len(rows[i]) - len(tokens))
        assert int(batch.num_forwards[i]) == int(alone.num_forwards[0])
        assert batch.tokens_per_forward[i].item() == pytest.approx(len(tokens) / int(alone.num_forwards[0]))


# ----------------------------------------------------------------------------------------------- 4. config
def _run(model, prompt, **kwargs):
    out = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    return out.sequences.tolist(), out.num_forwards.tolist()


SETTINGS = {
    "a": dict(decode_mode="diffusion", block_size=4, confidence_threshold=None),
    "b": dict(decode_mode="diffusion", block_size=8, confidence_threshold=0.3),
    "c": dict(decode_mode="diffusion", block_size=16, confidence_threshold=0.9),
}
COMMON = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def direct_runs(confident_model):
    prompt = random_prompt(100, 6)
    runs = {k: _run(confident_model, prompt, **v, **COMMON) for k, v in SETTINGS.items()}
    runs["ar"] = _run(confident_model, prompt, **COMMON)
    # guard: the settings are distinguishable (tokens or forward counts)
    assert len({repr(r) for r in runs.values()}) == len(runs)
    return prompt, runs


def test_fields_from_passed_generation_config(confident_model, direct_runs):
    prompt, runs = direct_runs
    for name, fields in SETTINGS.items():
        config = GenerationConfig(**fields, **COMMON)
        assert _run(confident_model, prompt, generation_config=config) == runs[name]


def test_fields_from_model_generation_config(direct_runs):
    prompt, runs = direct_runs
    for name, fields in SETTINGS.items():
        model = fresh_confident_model()
        for key, value in {**fields, **COMMON}.items():
            setattr(model.generation_config, key, value)
        assert _run(model, prompt) == runs[name]


def test_default_threshold_and_block_size_in_diffusion_mode(confident_model):
    prompt = random_prompt(101, 6)
    # two full blocks of 32 (a budget that ends inside a block cuts that block, where the two thresholds agree here)
    default = _run(confident_model, prompt, decode_mode="diffusion", **{**COMMON, "max_new_tokens": 64})
    explicit = _run(confident_model, prompt, decode_mode="diffusion", block_size=32, confidence_threshold=0.9,
                    **{**COMMON, "max_new_tokens": 64})
    other = _run(confident_model, prompt, decode_mode="diffusion", block_size=32, confidence_threshold=None,
                 **{**COMMON, "max_new_tokens": 64})
    assert default == explicit
    assert other != explicit


def test_precedence_kwarg_over_passed_config_over_model_config(direct_runs):
    prompt, runs = direct_runs
    model = fresh_confident_model()
    for key, value in {**SETTINGS["a"], **COMMON}.items():
        setattr(model.generation_config, key, value)
    assert _run(model, prompt) == runs["a"]
    passed = GenerationConfig(**SETTINGS["b"], **COMMON)
    assert _run(model, prompt, generation_config=passed) == runs["b"]
    assert _run(model, prompt, generation_config=passed, block_size=16, confidence_threshold=0.9) == runs["c"]
    # a passed config without the mode fields leaves the model config's in place
    assert _run(model, prompt, generation_config=GenerationConfig(**COMMON)) == runs["a"]
    # a kwarg overrides the model config even without a passed config
    assert _run(model, prompt, block_size=16, confidence_threshold=0.9) == runs["c"]
    # None given explicitly is a value, not "unset": it beats 0.9 from the model config
    model.generation_config.confidence_threshold = 0.9
    assert _run(model, prompt, confidence_threshold=None) == runs["a"]
    # decode_mode="ar" as a kwarg beats the model's diffusion default
    assert _run(model, prompt, decode_mode="ar") == runs["ar"]


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_save_pretrained_round_trip_keeps_generation_fields(tmp_path, direct_runs, threshold):
    prompt, runs = direct_runs
    model = fresh_confident_model()
    fields = {**SETTINGS["a"], "confidence_threshold": threshold, **COMMON}
    expected = _run(model, prompt, **fields)
    for key, value in fields.items():
        setattr(model.generation_config, key, value)
    before = model.generation_config.to_dict()
    model.save_pretrained(tmp_path)
    assert model.generation_config.to_dict() == before  # saving leaves the in-memory config (incl. _from_model_config)
    loaded = NemotronDiffusionForCausalLM.from_pretrained(tmp_path).eval()
    for key, value in fields.items():
        assert getattr(loaded.generation_config, key) == value, key
    assert _run(loaded, prompt) == expected
    assert _run(loaded, prompt) != runs["ar"]


# ------------------------------------------------------------------------------------------ 5. no state leak
def _module_state(model):
    simple = (bool, int, float, str, type(None))
    return [
        (name, module.training, {k: v for k, v in vars(module).items() if isinstance(v, simple)})
        for name, module in model.named_modules()
    ]


def test_no_state_leak(tmp_path):
    model = fresh_confident_model()
    prompts = [random_prompt(110, 5)[0].tolist(), random_prompt(111, 8)[0].tolist()]
    ids, mask = left_pad(prompts)
    ids_copy, mask_copy = ids.clone(), mask.clone()
    ar_before = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # rotary tables are not in the state dict
    modules = _module_state(model)
    requires_grad = [p.requires_grad for p in model.parameters()]
    config, gen_config = model.config.to_dict(), model.generation_config.to_dict()
    passed = GenerationConfig(decode_mode="diffusion", block_size=4, max_new_tokens=12, do_sample=False)
    passed_before = passed.to_dict()
    grad_enabled = torch.is_grad_enabled()

    for causal in (True, False):
        gen(model, ids, mask, max_new_tokens=12, causal_context=causal)
    model.generate(ids, attention_mask=mask, generation_config=passed, confidence_threshold=None)
    torch.manual_seed(0)
    gen(model, ids, mask, max_new_tokens=12, do_sample=True)

    assert torch.is_grad_enabled() == grad_enabled
    assert ids.equal(ids_copy) and mask.equal(mask_copy)
    assert passed.to_dict() == passed_before
    assert model.config.to_dict() == config
    assert model.generation_config.to_dict() == gen_config
    assert not hasattr(model.generation_config, "decode_mode") or model.generation_config.decode_mode == "ar"
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert _module_state(model) == modules
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    ar_after = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ar_before, ar_after)
    # a plain AR call with the same prompts uses the default mode (not a leftover diffusion mode)
    assert _run(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[0] == ar_before.tolist()


def test_training_mode_model_is_left_in_training_mode():
    model = fresh_confident_model().train()
    prompt = random_prompt(112, 5)
    gen(model, prompt, max_new_tokens=8)
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------------------------------------- 6. validation
INVALID = [
    ("decode_mode", "blocky"),
    ("decode_mode", None),
    ("block_size", 0),
    ("block_size", -3),
    ("block_size", 1.5),
    ("block_size", True),
    ("block_size", "8"),
    ("confidence_threshold", 0),
    ("confidence_threshold", 0.0),
    ("confidence_threshold", 1.5),
    ("confidence_threshold", -0.1),
    ("confidence_threshold", True),
    ("confidence_threshold", "0.9"),
    ("confidence_threshold", float("nan")),
    ("causal_context", "yes"),
    ("causal_context", 1),
    ("causal_context", None),
    ("max_denoising_steps", 0),
    ("max_denoising_steps", -1),
    ("max_denoising_steps", 2.5),
    ("max_denoising_steps", True),
    ("commit_order", "rightmost"),
    ("commit_order", None),
    ("defer_adjacent_repeats", "yes"),
    ("defer_adjacent_repeats", None),
    ("fused_commit_forward", "yes"),
    ("fused_commit_forward", 1),
]


def _assert_names(message, field, value):
    assert field in message, message
    shown = re.escape(repr(value)) if not isinstance(value, float) or not math.isnan(value) else "nan"
    assert re.search(rf"(?<![\w.]){shown}(?![\w.])", message) or str(value) in message, message


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_field_values_raise(plain_model, field, value):
    prompt = random_prompt(1, 4)
    kwargs = dict(decode_mode="diffusion", max_new_tokens=4)
    kwargs[field] = value
    with pytest.raises(ValueError) as info:
        plain_model.generate(prompt, **kwargs)
    _assert_names(str(info.value), field, value)


@pytest.mark.parametrize("others,needs", [(dict(causal_context=False), "causal_context=False"),
                                           (dict(confidence_threshold=None), "confidence_threshold is None")])
def test_fused_commit_forward_needs_the_seed_and_a_threshold(plain_model, others, needs):
    """The look-ahead step commits, next to the seed, the slots that reach the threshold: without either it has no
    rule, and generate() says which field forbids it instead of running something else."""
    with pytest.raises(ValueError, match=rf"`fused_commit_forward`=True is invalid.*{re.escape(needs)}"):
        plain_model.generate(random_prompt(1, 4), decode_mode="diffusion", max_new_tokens=4, fused_commit_forward=True,
                             **others)


@pytest.mark.parametrize("source", ["passed_config", "model_config"])
@pytest.mark.parametrize("field,value", [("block_size", 0), ("confidence_threshold", 1.5), ("decode_mode", "blocky")])
def test_invalid_values_from_configs_raise(source, field, value):
    model = tiny_model()
    prompt = random_prompt(1, 4)
    fields = {"decode_mode": "diffusion", field: value}
    with pytest.raises(ValueError) as info:
        if source == "passed_config":
            model.generate(prompt, generation_config=GenerationConfig(max_new_tokens=4, **fields))
        else:
            for k, v in fields.items():
                setattr(model.generation_config, k, v)
            model.generate(prompt, max_new_tokens=4)
    _assert_names(str(info.value), field, value)


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        (dict(max_thinking_tokens=5), "end_think_token_id", None),
        (dict(max_thinking_tokens=-1, end_think_token_id=7), "max_thinking_tokens", -1),
        (dict(max_thinking_tokens=2.0, end_think_token_id=7), "max_thinking_tokens", 2.0),
        (dict(max_thinking_tokens=5, end_think_token_id=64), "end_think_token_id", 64),
        (dict(max_thinking_tokens=5, end_think_token_id=-1), "end_think_token_id", -1),
        (dict(max_thinking_tokens=5, end_think_token_id="</think>"), "end_think_token_id", "</think>"),
    ],
)
@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_invalid_thinking_budget_raises(plain_model, kwargs, field, value, mode):
    with pytest.raises(ValueError) as info:
        plain_model.generate(random_prompt(1, 4), decode_mode=mode, max_new_tokens=4, **kwargs)
    _assert_names(str(info.value), field, value)
    if field == "end_think_token_id" and value is None:
        assert "max_thinking_tokens" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,keyword",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(prompt_lookup_num_tokens=3), "prompt"),
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
        (dict(output_logits=True, return_dict_in_generate=True), "output_logits"),
        (dict(cache_implementation="offloaded"), "cache_implementation"),
    ],
)
def test_unsupported_combinations_refused(plain_model, kwargs, keyword):
    with pytest.raises(ValueError) as info:
        plain_model.generate(random_prompt(1, 4), decode_mode="diffusion", max_new_tokens=4, **kwargs)
    assert keyword in str(info.value).lower() and "diffusion" in str(info.value)


def test_assistant_model_refused(plain_model):
    with pytest.raises(ValueError) as info:
        plain_model.generate(random_prompt(1, 4), decode_mode="diffusion", max_new_tokens=4,
                             assistant_model=tiny_model(seed=1))
    assert "assistant" in str(info.value).lower()


def test_refused_combination_via_generation_config(plain_model):
    with pytest.raises(ValueError, match="num_beams"):
        plain_model.generate(random_prompt(1, 4), generation_config=GenerationConfig(
            decode_mode="diffusion", num_beams=2, max_new_tokens=4))


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
@pytest.mark.parametrize("name,value", [("is_causal", False), ("is_causal", True), ("update_cache", False)])
def test_attention_kwargs_refused_in_every_mode(plain_model, mode, name, value):
    with pytest.raises(ValueError, match=name):
        plain_model.generate(random_prompt(1, 4), decode_mode=mode, max_new_tokens=4, **{name: value})


def test_user_cache_and_inputs_embeds_refused(plain_model):
    prompt = random_prompt(1, 4)
    with pytest.raises(ValueError, match="cache"):
        plain_model.generate(prompt, decode_mode="diffusion", max_new_tokens=4, **{CACHE_KWARG: DynamicCache()})
    embeds = plain_model.get_input_embeddings()(prompt)
    with pytest.raises(ValueError, match="input_ids"):
        plain_model.generate(inputs_embeds=embeds, decode_mode="diffusion", max_new_tokens=4)


# ------------------------------------------------------------------------------------------ 7. thinking budget
def _pick_end_think(model, prompt, avoid_count=24, **kwargs):
    """A token id the model does not produce in a free run, in both AR and diffusion."""
    seen = set()
    for mode in ("ar", "diffusion"):
        out = model.generate(prompt, decode_mode=mode, max_new_tokens=avoid_count, do_sample=False, eos_token_id=None,
                             **kwargs)
        seen |= set(out[0, prompt.shape[1]:].tolist())
    return next(t for t in range(3, MASK_ID) if t not in seen)


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
@pytest.mark.parametrize("budget", [0, 5, 8, 13])
def test_thinking_budget_forces_end_token_once(confident_model, mode, budget):
    prompt = random_prompt(120, 6)
    end = _pick_end_think(confident_model, prompt, block_size=8)
    common = dict(decode_mode=mode, block_size=8, max_new_tokens=24, do_sample=False, eos_token_id=None)
    free = confident_model.generate(prompt, **common)[0, 6:].tolist()
    out = confident_model.generate(prompt, max_thinking_tokens=budget, end_think_token_id=end, **common)
    tokens = out[0, 6:].tolist()
    assert len(tokens) == 24
    assert tokens[budget] == end
    assert end not in tokens[:budget]
    assert MASK_ID not in tokens or mode == "ar"
    if mode == "ar" or budget % 8 == 0:
        # AR sees the exact prefix; in diffusion a budget at a block start only replaces that block's seed
        assert tokens[:budget] == free[:budget]
    if mode == "ar":
        # injected once: what follows is the plain continuation of the prefix that ends with the forced token
        prefix = torch.cat([prompt, torch.tensor([tokens[: budget + 1]])], dim=1)
        rest = confident_model.generate(prefix, **{**common, "max_new_tokens": 24 - budget - 1})
        assert rest[0, prefix.shape[1]:].tolist() == tokens[budget + 1:]
    # with the token suppressed everywhere else, the budget still forces it, exactly once
    out = confident_model.generate(
        prompt, max_thinking_tokens=budget, end_think_token_id=end, suppress_tokens=[end], **common
    )
    tokens = out[0, 6:].tolist()
    assert tokens[budget] == end and tokens.count(end) == 1


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_thinking_budget_leaves_rows_that_already_ended_thinking(confident_model, mode):
    """Row 0 produces the end-of-thinking token by itself in an earlier block: it is left untouched; row 1 does not
    and gets it forced at the budget."""
    prompts = [random_prompt(120, 6)[0].tolist(), random_prompt(121, 6)[0].tolist()]
    common = dict(decode_mode=mode, block_size=4, max_new_tokens=16, do_sample=False, eos_token_id=None)
    free = [confident_model.generate(torch.tensor([p]), **common)[0, 6:].tolist() for p in prompts]
    budget = 9
    end = next(t for i, t in enumerate(free[0][:4]) if t not in free[1][:budget + 1])
    out = confident_model.generate(torch.tensor(prompts), max_thinking_tokens=budget, end_think_token_id=end, **common)
    rows = new_tokens(out, 6)
    assert rows[0] == free[0]
    assert rows[1][budget] == end and end not in rows[1][:budget]
    assert rows[1][:budget] == free[1][:budget] or mode == "diffusion"


def test_thinking_budget_counts_the_blocks_seed(confident_model):
    """The AR seed at a block's offset 0 is generated before a budget index later in the same block. When the seed is
    the end-of-thinking token, the row has ended thinking (as in AR, which leaves it alone): the budget must not add a
    second one."""
    prompt = random_prompt(120, 6)
    common = dict(decode_mode="diffusion", block_size=8, max_new_tokens=24, do_sample=False, eos_token_id=None)
    free = confident_model.generate(prompt, **common)[0, 6:].tolist()
    end = free[8]  # the seed of block 1
    assert end not in free[:8]
    out = confident_model.generate(prompt, max_thinking_tokens=11, end_think_token_id=end, **common)[0, 6:].tolist()
    assert out == free
    ar_free = confident_model.generate(prompt, **{**common, "decode_mode": "ar"})[0, 6:].tolist()
    ar_end = ar_free[8]
    if ar_end not in ar_free[:8]:
        ar = confident_model.generate(
            prompt, max_thinking_tokens=11, end_think_token_id=ar_end, **{**common, "decode_mode": "ar"}
        )[0, 6:].tolist()
        assert ar == ar_free


def test_thinking_budget_left_padded_batch_equals_rows_alone(confident_model):
    prompts = [random_prompt(60 + i, n)[0].tolist() for i, n in enumerate((3, 9, 6))]
    ids, mask = left_pad(prompts)
    settings = dict(max_new_tokens=20, max_thinking_tokens=5, end_think_token_id=60)
    rows = new_tokens(gen(confident_model, ids, mask, **settings).sequences, ids.shape[1])
    for i, p in enumerate(prompts):
        alone = gen(confident_model, torch.tensor([p]), **settings).sequences[0, len(p):].tolist()
        assert rows[i] == alone
        assert alone[5] == 60


def test_thinking_budget_with_sampling_diffusion(confident_model):
    prompt = random_prompt(122, 6, batch=3)
    end = 60
    torch.manual_seed(3)
    out = gen(confident_model, prompt, max_new_tokens=16, do_sample=True, top_k=0, max_thinking_tokens=6,
              end_think_token_id=end)
    for row in new_tokens(out.sequences, 6):
        if end not in row[:6]:
            assert row[6] == end
        assert MASK_ID not in row


# ---------------------------------------------------------------------------------------- 8. denoising cap
@pytest.mark.parametrize("threshold", [None, 0.9])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_max_denoising_steps_caps_forwards(confident_model, threshold, steps):
    prompt = random_prompt(130, 6, batch=2)
    out = gen(confident_model, prompt, block_size=8, max_new_tokens=24, confidence_threshold=threshold,
              max_denoising_steps=steps)
    assert out.sequences.shape == (2, 6 + 24)
    assert not (out.sequences[:, 6:] == MASK_ID).any()
    cap = 1 + 3 * steps + 2  # prefill + at most `steps` denoising forwards per block + 2 commits
    assert (out.num_forwards <= cap).all()
    if threshold is None:  # one slot per step would need 7 steps: the cap binds exactly
        assert out.num_forwards.tolist() == [cap, cap]
    uncapped = gen(confident_model, prompt, block_size=8, max_new_tokens=24, confidence_threshold=threshold)
    if steps == 1:
        assert (out.num_forwards <= uncapped.num_forwards).all()
    # the first block's tokens committed by the first step are the same (the cap only changes the last step)
    assert torch.equal(out.sequences[:, 6], uncapped.sequences[:, 6])


@pytest.mark.parametrize("steps", [2, 3, 7, 9])
def test_max_denoising_steps_without_threshold_matches_reference_schedule(confident_model, steps):
    """No threshold: the 7 masks of a block are spread over `steps` steps by NVIDIA's transfer schedule (2 steps: 4
    then 3). A cap >= 7 is no cap at all."""
    prompt = random_prompt(131, 6)
    ref, stats = reference_diffusion_generate(confident_model, prompt, 16, 8, None, steps_per_block=min(steps, 8))
    out = gen(confident_model, prompt, max_new_tokens=16, confidence_threshold=None, max_denoising_steps=steps)
    assert out.sequences.tolist() == ref.tolist()
    assert int(out.num_forwards[0]) == expected_forwards(stats) == 1 + 2 * min(steps, 7) + 1
    if steps == 2:
        assert stats["per_step"] == [4, 3, 4, 3]


# ------------------------------------------------------------------------------------------------ 9. pipeline
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    # id 3 is the word "abcdef": transformers' StopStringCriteria tokenizes that string to learn token spellings.
    vocab = {f"w{i}": i for i in range(64)}
    for token, index in {"<pad>": PAD_ID, "<s>": 1, "</s>": EOS_ID, "abcdef": 3, "<mask>": MASK_ID}.items():
        del vocab[f"w{index}"]
        vocab[token] = index
    backend = Tokenizer(models.WordLevel(vocab, unk_token="abcdef"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )
    return tok


def test_pipeline_text_generation_matches_generate(confident_model):
    tok = word_tokenizer()
    assert len(tok) == 64
    text = "w17 w40 w9 w22 w5"
    settings = dict(decode_mode="diffusion", block_size=4, max_new_tokens=8, do_sample=False)
    generator = pipeline("text-generation", model=confident_model, tokenizer=tok)
    # The pipeline decodes the new tokens on their own (return_full_text=False gives just them; with the default it
    # glues them to the prompt text without a separator, a property of this space-joined word-level tokenizer).
    result = generator(text, return_full_text=False, **settings)
    encoded = tok(text, return_tensors="pt")
    direct = confident_model.generate(**encoded, **settings)
    expected = tok.decode(direct[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(expected.split()) == 8
    assert result[0]["generated_text"] == expected
    assert generator(text, **settings)[0]["generated_text"] == text + expected
    # the same settings from the model's generation config (as a saved generation_config.json would give them)
    model = fresh_confident_model()
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    assert pipeline("text-generation", model=model, tokenizer=tok)(text, return_full_text=False) == result
    ar = confident_model.generate(**encoded, max_new_tokens=8, do_sample=False)
    assert tok.decode(ar[0, 5:], skip_special_tokens=True) != expected  # the mode really reached generate
    # batched through the pipeline (left padding) too
    texts = [text, "w30 w31"]
    batch = generator(texts, batch_size=2, return_full_text=False, **settings)
    for t, r in zip(texts, batch):
        enc = tok(t, return_tensors="pt")
        alone = confident_model.generate(**enc, **settings)
        assert r[0]["generated_text"] == tok.decode(alone[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_stop_strings_cut_inside_a_block(confident_model):
    tok = word_tokenizer()
    prompt = random_prompt(14, 6)
    free = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=0.9).sequences[0, 6:].tolist()
    index = next(i for i, t in enumerate(free) if i % 8 not in (0, 7) and t not in free[:i] and t > 3)
    stop = tok.convert_ids_to_tokens(free[index])
    out = gen(confident_model, prompt, max_new_tokens=24, confidence_threshold=0.9, stop_strings=[stop], tokenizer=tok)
    assert out.sequences[0, 6:].tolist() == free[: index + 1]
