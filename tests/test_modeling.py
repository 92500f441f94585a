"""The forward: both attention modes against an explicit-mask computation, read-only caches, positions, padding."""

import pytest
import torch
from transformers import DynamicCache

from conftest import left_pad, tiny_model
from reference_forward import (
    bidirectional_allowed,
    causal_allowed,
    positions_from_mask,
    reference_logits,
)


ATOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [7, 8, 9, 30, 31]]


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _assert_cache_equal(cache, snapshot):
    assert len(cache.layers) == len(snapshot)
    for layer, (keys, values) in zip(cache.layers, snapshot):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("is_causal", [True, False])
def test_full_sequence_matches_explicit_mask(impl, is_causal):
    model = tiny_model(attn_implementation=impl)
    ids, mask = left_pad(PROMPTS)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, is_causal=is_causal).logits
        allowed = causal_allowed(mask) if is_causal else bidirectional_allowed(mask)
        ref = reference_logits(model, ids, positions, allowed)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_without_mask_or_positions_the_forward_is_causal_by_default():
    """NVIDIA's model was bidirectional after loading (docs/reference-model.md §10 item 1); ours is causal unless
    told otherwise."""
    model = tiny_model(attn_implementation="eager")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ones = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        ref = reference_logits(model, ids, positions_from_mask(ones), causal_allowed(ones))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bidirectional_block_over_read_only_prefix_cache(impl):
    """Drafting: a block attends to the whole cached prefix and to itself in both directions; the cache is unchanged."""
    model = tiny_model(attn_implementation=impl)
    prefix_ids, prefix_mask = left_pad(PROMPTS)
    block = torch.tensor([[40, 63, 63, 63], [41, 63, 63, 63]])
    full_ids = torch.cat([prefix_ids, block], dim=1)
    full_mask = torch.cat([prefix_mask, torch.ones_like(block)], dim=1)
    positions = positions_from_mask(full_mask)
    p = prefix_ids.shape[1]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions[:, :p], cache=cache)
        before = _snapshot(cache)
        out = model(
            input_ids=block,
            attention_mask=full_mask,
            position_ids=positions[:, p:],
            cache=cache,
            is_causal=False,
            update_cache=False,
        ).logits
        _assert_cache_equal(cache, before)
        assert cache.get_seq_length() == p
        # Explicit mask: the prefix is causal among its real tokens; block queries see every real key.
        allowed = causal_allowed(full_mask)
        allowed[:, p:, :] = full_mask.bool()[:, None, :]
        ref = reference_logits(model, full_ids, positions, allowed)
    torch.testing.assert_close(out, ref[:, p:], atol=ATOL, rtol=0)


def test_nvidia_convention_cache_with_use_cache_false_is_read_only():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache)
        before = _snapshot(cache)
        read_only = model(input_ids=torch.tensor([[9, 63]]), cache=cache, use_cache=False, is_causal=False).logits
        _assert_cache_equal(cache, before)
        explicit = model(input_ids=torch.tensor([[9, 63]]), cache=cache, is_causal=False, update_cache=False).logits
    torch.testing.assert_close(read_only, explicit)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causal_block_on_prefix_cache_equals_full_forward_and_appends(impl):
    """Committing/verifying: positions continue from the cache length and the block's K/V are appended."""
    model = tiny_model(attn_implementation=impl)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :12], cache=cache)
        # no position_ids: they must default to cache length + arange (past position 16 the query scale changes)
        block = model(input_ids=ids[:, 12:], cache=cache).logits
        assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(block, full[:, 12:], atol=ATOL, rtol=0)


def test_bidirectional_block_with_cache_write_then_causal_block():
    """NVIDIA's `causal_context=False` commit: a bidirectional block written to the cache is then read causally."""
    model = tiny_model(attn_implementation="eager")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :4], cache=cache, is_causal=False)
        out = model(input_ids=ids[:, 4:], cache=cache).logits
        allowed = causal_allowed(torch.ones_like(ids))
        allowed[:, :4, :4] = True  # the prefix was encoded bidirectionally
        ref = reference_logits(model, ids, positions_from_mask(torch.ones_like(ids)), allowed)
    torch.testing.assert_close(out, ref[:, 4:], atol=ATOL, rtol=0)


def test_flex_attention_modes_match_explicit_mask(torch_cpu_flex_attention_works):
    """flex_attention on CPU (compiled, so this test is slower): both modes and a read-only prefix cache."""
    model = tiny_model(attn_implementation="flex_attention")
    ids, mask = left_pad(PROMPTS)
    positions = positions_from_mask(mask)
    real = mask.bool()
    with torch.no_grad():
        for is_causal, allowed in ((True, causal_allowed(mask)), (False, bidirectional_allowed(mask))):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, is_causal=is_causal).logits
            ref = reference_logits(model, ids, positions, allowed)
            torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_logits_to_keep_limits_the_head_to_the_last_positions():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last = model(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_mode_is_an_argument_not_module_state():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    state = {name: (m.training, getattr(m, "is_causal", None)) for name, m in model.named_modules()}
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model(input_ids=ids, is_causal=False)
        again = model(input_ids=ids).logits
    assert torch.equal(first, again)
    assert state == {name: (m.training, getattr(m, "is_causal", None)) for name, m in model.named_modules()}
    assert getattr(model.config, "is_causal", True) is True


def test_both_cache_argument_names_are_honoured():
    """transformers 5.24 renamed `past_key_values` to `cache`; a forward that misses one computes without the prefix."""
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :-1], **{name: cache})
            last = model(input_ids=ids[:, -1:], **{name: cache}).logits[:, -1]
            torch.testing.assert_close(last, full, atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="either as `cache` or as `past_key_values`"):
            model(input_ids=ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_output_carries_the_cache_under_this_versions_name():
    model = tiny_model()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 3


def test_tied_head_option():
    model = tiny_model(tie_word_embeddings=True)
    assert model.diffusion_head.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()
    untied = tiny_model()
    assert untied.diffusion_head.weight.data_ptr() != untied.encoder.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_head_equals_the_head_on_slices_and_batches(dtype):
    # The head is applied to a [N, H] matrix (a slow CPU path of 3-D `linear` on slices; see apply_head): the
    # logits must be the head's own, for slices of a batch of one, strided batches and 2-D / 4-D inputs.
    from nemotron_diffusion.head_nemotron_diffusion import TALL_PRODUCT_ROWS, apply_head

    head = torch.nn.Linear(16, 37, bias=False).to(dtype)
    hidden = torch.randn(3, 6, 4, 16, dtype=dtype)
    cases = [hidden[:1, :, 0], hidden[:1, 2:, 0], hidden[:1, -1:, 0], hidden[:, 1:, 2], hidden[0, 0], hidden,
             hidden[1, :, 3]]
    with torch.no_grad():
        for case in cases:
            got = apply_head(head, case)
            assert got.shape == case.shape[:-1] + (37,)
            want = torch.stack([row @ head.weight.T for row in case.reshape(-1, 16)]).reshape(got.shape)
            torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
            own = head(case.contiguous().reshape(-1, 16)).reshape(got.shape)
            if dtype == torch.float32 and case.reshape(-1, 16).shape[0] in TALL_PRODUCT_ROWS:
                # weight @ hidden.T: the same sums in another order, float32 rounding apart
                torch.testing.assert_close(got, own, rtol=1e-6, atol=1e-6)
                assert got.is_contiguous()
            else:
                assert torch.equal(got, own)
    assert any(case.reshape(-1, 16).shape[0] in TALL_PRODUCT_ROWS for case in cases)
