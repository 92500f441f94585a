"""Our decoder layer computes the Llama-4 query scale once per forward (attention_nemotron_diffusion): its outputs
must be Ministral3's, bit for bit, with the scaling on and off, and a layer called on its own must still scale."""

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.ministral3.modeling_ministral3 import Ministral3DecoderLayer, Ministral3RotaryEmbedding

from conftest import random_prompt, tiny_config, tiny_model

from nemotron_diffusion.attention_nemotron_diffusion import (
    NO_QUERY_SCALE,
    NemotronDiffusionDecoderLayer,
    query_scale,
)
from nemotron_diffusion.modeling_nemotron_diffusion import _CACHE_ARG
from nemotron_diffusion.native_twin import ministral3_twin


def _rope(beta):
    config = tiny_config()
    return dict(config.rope_parameters, llama_4_scaling_beta=beta)


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("pass_scale", [True, False])
def test_layer_equals_ministral3_layer(beta, pass_scale):
    config = tiny_config(rope_parameters=_rope(beta))
    torch.manual_seed(0)
    theirs = Ministral3DecoderLayer(config, 0).eval()
    ours = NemotronDiffusionDecoderLayer(config, 0).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same parameter names
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    hidden = torch.randn(2, 5, config.hidden_size)
    # Positions past original_max_position_embeddings (16), where beta > 0 changes the queries.
    positions = torch.arange(30, 35)[None].expand(2, -1)
    embeddings = Ministral3RotaryEmbedding(config)(hidden, position_ids=positions)
    extra = {"query_scale": query_scale(config, positions)} if pass_scale else {}
    with torch.no_grad():
        expected = theirs(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
        got = ours(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings, **extra)
    assert torch.equal(got, expected)


def test_query_scale_is_skipped_only_without_scaling():
    positions = torch.arange(30, 33)[None]
    assert query_scale(tiny_config(rope_parameters=_rope(0.0)), positions) is NO_QUERY_SCALE
    scale = query_scale(tiny_config(rope_parameters=_rope(0.1)), positions)
    assert scale.shape == (1, 1, 3, 1)
    assert torch.allclose(scale[0, 0, :, 0], 1 + 0.1 * torch.log(torch.tensor([2.0, 2.0, 3.0])))


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_model_logits_equal_ministral3(beta, monkeypatch):
    """The whole backbone with a cache (prefill, then a 3-token chunk at positions past 16) against transformers'
    Ministral3ForCausalLM on the same weights. (The head takes `linear` for every row count here, as Ministral3's
    does: its float32 product of a few rows on a CPU, `weight @ hidden.T`, sums in another order; that one is
    checked in test_modeling.py.)"""
    import nemotron_diffusion.head_nemotron_diffusion as head

    monkeypatch.setattr(head, "TALL_PRODUCT_ROWS", range(0))
    model = tiny_model(3, rope_parameters=_rope(beta))
    twin = ministral3_twin(model)
    prompt = random_prompt(5, 20)
    chunk = random_prompt(6, 3)
    with torch.no_grad():
        ours_cache, their_cache = DynamicCache(config=model.config), DynamicCache(config=twin.config)
        ours, theirs = [], []
        for ids in (prompt, chunk):
            ours.append(model(input_ids=ids, use_cache=True, **{_CACHE_ARG: ours_cache}).logits)
            theirs.append(twin(input_ids=ids, use_cache=True, **{_CACHE_ARG: their_cache}).logits)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
