"""`cache_implementation="static"` (fixed buffers, the basis of compiled / CUDA-graph decoding) gives exactly the
tokens and forward counts of the default dynamic cache, in every mode."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, StaticCache

from conftest import left_pad, tiny_model
from nemotron_diffusion.cache_nemotron_diffusion import keep_chunk_entries, rewind_cache


MODELS = {seed: tiny_model(seed=seed, std=0.4) for seed in (0, 1)}


def _both(model, ids, mask, **kwargs):
    outs = []
    for cache_implementation in (None, "static"):
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, return_dict_in_generate=True,
                                       cache_implementation=cache_implementation, **kwargs))
    return outs


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["diffusion", "linear_spec", "quadratic_spec"]))
    batch = draw(st.integers(1, 4))
    prompts = [draw(st.lists(st.integers(3, 62), min_size=1, max_size=12)) for _ in range(batch)]
    block_size = draw(st.integers(2, 8))
    threshold = None
    if mode == "diffusion":
        threshold = draw(st.sampled_from([None, 0.1, 0.5]))
    elif mode == "linear_spec":
        threshold = draw(st.sampled_from([None, 0.3]))
    eos = draw(st.sampled_from([None, 7, 20, 33]))
    extra = {}
    if mode == "diffusion" and threshold is not None:
        extra["fused_commit_forward"] = draw(st.booleans())
    return dict(mode=mode, prompts=prompts, block_size=block_size, threshold=threshold, eos=eos, extra=extra,
                max_new_tokens=draw(st.integers(1, 24)), seed=draw(st.sampled_from(sorted(MODELS))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_static_equals_dynamic(case):
    ids, mask = left_pad(case["prompts"])
    dynamic, static = _both(
        MODELS[case["seed"]], ids, mask, decode_mode=case["mode"], block_size=case["block_size"],
        confidence_threshold=case["threshold"], max_new_tokens=case["max_new_tokens"], do_sample=False,
        eos_token_id=case["eos"], pad_token_id=0, **case["extra"],
    )
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.equal(static.num_forwards, dynamic.num_forwards)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_static_equals_dynamic_under_sampling(mode):
    ids, mask = left_pad([[5, 9, 13, 17, 21], [7, 8, 40]])
    outs = []
    for cache_implementation in (None, "static"):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(MODELS[0].generate(ids, attention_mask=mask, decode_mode=mode, block_size=4, max_new_tokens=20,
                                           do_sample=True, temperature=0.9, top_k=0,
                                           cache_implementation=cache_implementation))
    assert torch.equal(outs[0], outs[1])


def _prefilled(cache):
    model = MODELS[0]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), cache=cache)
    return model


def test_read_only_forward_on_a_static_cache_leaves_it_as_it_was():
    static = StaticCache(config=MODELS[0].config, max_cache_len=32)
    dynamic = DynamicCache(config=MODELS[0].config)
    model = _prefilled(static)
    _prefilled(dynamic)
    block = torch.tensor([[10, 63, 63, 63]])
    before = [layer.keys[:, :, :5].clone() for layer in static.layers]
    with torch.no_grad():
        a = model(input_ids=block, attention_mask=torch.ones(1, 9, dtype=torch.long), cache=static,
                  is_causal=False, update_cache=False).logits
        b = model(input_ids=block, cache=dynamic, is_causal=False, update_cache=False).logits
    assert int(static.get_seq_length()) == 5
    for layer, keys in zip(static.layers, before):
        assert torch.equal(layer.keys[:, :, :5], keys)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_rewind_and_keep_chunk_entries(cache_class):
    make = (lambda: DynamicCache(config=MODELS[0].config)) if cache_class == "dynamic" else (
        lambda: StaticCache(config=MODELS[0].config, max_cache_len=32))
    cache = make()
    model = _prefilled(cache)
    with torch.no_grad():
        model(input_ids=torch.tensor([[20, 21, 22, 23, 24, 25]]), cache=cache)
    keys = [layer.keys[:, :, :11].clone() for layer in cache.layers]
    keep_chunk_entries(cache, 6, torch.tensor([0, 2, 5]))
    assert int(cache.get_seq_length()) == 8
    for layer, full in zip(cache.layers, keys):
        assert torch.equal(layer.keys[:, :, :8], full[:, :, [0, 1, 2, 3, 4, 5, 7, 10]])
    rewind_cache(cache, 2)
    assert int(cache.get_seq_length()) == 6


@pytest.mark.parametrize("mode,extra", [("diffusion", {}), ("diffusion", {"fused_commit_forward": True}),
                                        ("linear_spec", {}), ("quadratic_spec", {})])
def test_compiled_block_forwards_trace_without_graph_breaks(mode, extra):
    """The compiled path of the block loops (static cache; on GPU with inductor and CUDA graphs), traced here with
    dynamo's eager backend: same tokens as the eager dynamic-cache run, no graph break, few graphs."""
    from transformers import CompileConfig

    model = MODELS[1]
    ids, mask = left_pad([[5, 9, 13, 17, 21, 25, 29, 33], [7, 8, 40]])
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only
    counters = torch._dynamo.utils.counters
    counters.clear()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, decode_mode=mode, block_size=4, **extra)
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        compiled = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    model.__dict__.pop("_compiled_encoder_call", None)
    assert torch.equal(compiled, eager)
    assert not counters["graph_break"]
    assert 1 <= counters["stats"]["unique_graphs"] <= 8
