"""Attention backends: automatic choice, every mode on every CPU backend, and the FlashAttention path (emulated)."""

import math

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import nemotron_diffusion.modeling_nemotron_diffusion as modeling
from conftest import left_pad, tiny_model


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def _generate(model, ids, mask, mode, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, decode_mode=mode,
                              block_size=4, confidence_threshold=0.2 if mode == "diffusion" else None, **kwargs)


@pytest.mark.parametrize(
    "cuda,capability,fa3,fa2,expected",
    [
        (False, None, True, True, "sdpa"),
        (True, (9, 0), True, True, "flash_attention_3"),
        (True, (9, 0), False, True, "flash_attention_2"),
        (True, (8, 0), True, True, "flash_attention_2"),
        (True, (8, 0), False, False, "sdpa"),
        (True, (10, 0), True, False, "sdpa"),
    ],
)
def test_preferred_backend(monkeypatch, cuda, capability, fa3, fa2, expected):
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(modeling.torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(modeling, "is_flash_attn_3_available", lambda: fa3)
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: fa2)
    assert modeling.preferred_attn_implementation() == expected


def test_no_request_or_auto_takes_the_preferred_backend_and_a_request_wins(monkeypatch):
    monkeypatch.setattr(modeling, "preferred_attn_implementation", lambda: "eager")
    assert tiny_model(attn_implementation=None).config._attn_implementation == "eager"
    assert tiny_model(attn_implementation="auto").config._attn_implementation == "eager"
    assert tiny_model(attn_implementation="sdpa").config._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def batch():
    return left_pad([[5, 9, 13, 17, 21, 25, 29, 33], [7, 8, 40], [41, 42, 43, 44, 45]])


@pytest.fixture(scope="module")
def sdpa_tokens(batch):
    model = tiny_model(seed=5, attn_implementation="sdpa")
    return {mode: _generate(model, *batch, mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_same_tokens_on_eager(batch, sdpa_tokens, mode):
    model = tiny_model(seed=5, attn_implementation="eager")
    assert torch.equal(_generate(model, *batch, mode), sdpa_tokens[mode])


def test_every_mode_gives_the_same_tokens_on_flex_attention(torch_cpu_flex_attention_works):
    """flex_attention compiles on CPU (once per shape, see conftest.py), so one row and a short run per mode."""
    model = tiny_model(seed=5, attn_implementation="flex_attention")
    reference = tiny_model(seed=5, attn_implementation="sdpa")
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    for mode in MODES:
        with torch.no_grad():
            kwargs = dict(max_new_tokens=6, do_sample=False, decode_mode=mode, block_size=3)
            assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs)), mode


def test_quadratic_mask_on_flex_attention(torch_cpu_flex_attention_works):
    from transformers import DynamicCache

    from nemotron_diffusion.generation_nemotron_diffusion import _quadratic_mask_function

    outputs = []
    for impl in ("flex_attention", "sdpa"):
        model = tiny_model(seed=5, attn_implementation=impl)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]]), cache=cache)
            chunk = torch.tensor([[40, 63, 63, 63, 41, 63, 63, 63, 42, 63, 63, 63]])
            positions = torch.tensor([[8, 9, 10, 11, 9, 10, 11, 12, 10, 11, 12, 13]])
            outputs.append(model(input_ids=chunk, position_ids=positions, cache=cache, update_cache=False,
                                 mask_function=_quadratic_mask_function(8, 3, "cpu")).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------- FlashAttention, emulated
def flash_emulator(calls):
    """The contract of transformers' flash_attention_2 path, computed densely: keys are the real slots of the 2-D
    padding mask (or all), queries the last q_length slots; `is_causal` aligns bottom-right over real tokens."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        calls.append((query.shape[2], is_causal, attention_mask is not None and attention_mask.dim()))
        assert attention_mask is None or attention_mask.dim() == 2, "flash receives padding masks only"
        batch, heads, q_len, dim = query.shape
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        k_len = key.shape[2]
        real = torch.ones(batch, k_len, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        out = torch.zeros_like(query)
        for b in range(batch):
            keys = real[b].nonzero()[:, 0]
            queries = (real[b, -q_len:]).nonzero()[:, 0]
            scores = query[b][:, queries] @ key[b][:, keys].transpose(-1, -2) * (scaling or dim**-0.5)
            if is_causal:
                offset = len(keys) - len(queries)
                allowed = torch.arange(len(keys))[None, :] <= (torch.arange(len(queries))[:, None] + offset)
                scores = scores.masked_fill(~allowed, -math.inf)
            out[b][:, queries] = torch.softmax(scores.float(), -1).to(value.dtype) @ value[b][:, keys]
        return out.transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_the_flash_path(monkeypatch, batch, sdpa_tokens, mode):
    calls = []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", flash_emulator(calls))
    model = tiny_model(seed=5, attn_implementation="sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert torch.equal(_generate(model, *batch, mode), sdpa_tokens[mode])
    assert model.config._attn_implementation == "flash_attention_2"  # per-call fallbacks leave no trace
    if mode == "quadratic_spec":
        # Every QuadraticSpec forward (bootstrap and B*(B+1) chunks) needs a custom mask: all ran on sdpa.
        assert calls == []
    else:
        assert calls, "the flash kernel was used"
        assert {is_causal for _, is_causal, _ in calls} == ({True} if mode == "ar" else {True, False})
