"""AR mode is transformers' own decoding loop: token-identical to native Ministral3 on the same weights."""

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conftest import left_pad, tiny_model

from nemotron_diffusion.native_twin import ministral3_twin


@pytest.fixture(scope="module")
def pair():
    model = tiny_model(seed=3)
    return model, ministral3_twin(model)  # Ministral3ForCausalLM on the same weights


def _generate_both(pair, *args, seed=None, **kwargs):
    outs = []
    for m in pair:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(m.generate(*args, **kwargs))
    return outs


def test_greedy_single_prompt_equals_native(pair):
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])
    ours, native = _generate_both(pair, ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(ours, native)


def test_greedy_left_padded_batch_equals_native(pair):
    ids, mask = left_pad([[5, 9, 13, 17, 21, 25, 29, 33, 37], [7, 8], [40, 41, 42, 43]])
    ours, native = _generate_both(pair, ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(ours, native)


def test_sampling_with_processors_equals_native(pair):
    ids, mask = left_pad([[5, 9, 13, 17], [7, 8, 30]])
    kwargs = dict(attention_mask=mask, max_new_tokens=25, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                  repetition_penalty=1.3, num_return_sequences=2)
    ours, native = _generate_both(pair, ids, seed=1234, **kwargs)
    assert torch.equal(ours, native)


def test_eos_pad_and_return_dict_equal_native(pair):
    model, native = pair
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        free_run = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = free_run[4]
    ids2, mask2 = left_pad([[5, 9, 13, 17, 21, 25, 29], [40, 41, 42]])
    ours, theirs = _generate_both(
        pair, ids2, attention_mask=mask2, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0,
        return_dict_in_generate=True, output_scores=True,
    )
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(theirs.scores)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b)
    row0 = ours.sequences[0, ids2.shape[1]:].tolist()
    assert eos in row0
    # Our output adds per-row forward counts: one forward per new token up to the row's stop (prefill included).
    assert ours.num_forwards[0].item() == row0.index(eos) + 1
    assert torch.all(ours.tokens_per_forward == 1.0)


def test_greedy_equals_a_cache_free_loop(pair):
    """A forward that missed the cache argument of the installed transformers would break exactly this."""
    model, _ = pair
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
        seq = ids[0].tolist()
        for _ in range(24):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_and_stopping_criteria_work_unchanged(pair):
    model, native = pair
    ids = torch.tensor([[5, 9, 13, 17]])

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 10, dtype=torch.bool)

    streams = []
    for m in (model, native):
        streamer = Collect()
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=20, do_sample=False, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([StopAtLength()]))
        assert streamer.ended and out.shape[1] == 10
        streams.append(streamer.chunks)
    assert streams[0] == streams[1]
    assert sum(streams[0][1:], []) == out[0, 4:].tolist()


def test_beam_search_and_prompt_lookup_work_in_ar_mode(pair):
    ids = torch.tensor([[5, 9, 13, 17, 5, 9, 13]])
    ours, native = _generate_both(pair, ids, max_new_tokens=10, num_beams=3, do_sample=False)
    assert torch.equal(ours, native)
    ours, native = _generate_both(pair, ids, max_new_tokens=10, prompt_lookup_num_tokens=2, do_sample=False)
    assert torch.equal(ours, native)


def test_generate_without_a_mode_is_ar_unless_the_generation_config_says_otherwise(pair):
    model, _ = pair
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        default = model.generate(ids, max_new_tokens=12, do_sample=False)
        ar = model.generate(ids, max_new_tokens=12, do_sample=False, decode_mode="ar")
        explicit = model.generate(ids, max_new_tokens=12, do_sample=False, block_size=4, decode_mode="diffusion",
                                  confidence_threshold=0.05, return_dict_in_generate=True)
        model.generation_config.decode_mode = "diffusion"
        model.generation_config.confidence_threshold = 0.05
        try:
            from_config = model.generate(ids, max_new_tokens=12, do_sample=False, block_size=4,
                                         return_dict_in_generate=True)
        finally:
            del model.generation_config.decode_mode
            del model.generation_config.confidence_threshold
    assert torch.equal(default, ar)
    assert torch.equal(from_config.sequences, explicit.sequences)
    assert torch.equal(from_config.num_forwards, explicit.num_forwards)
    assert explicit.num_forwards.item() < 12  # a low threshold commits several slots per forward: not AR


@pytest.mark.parametrize("kwarg", ["is_causal", "update_cache", "mask_function"])
def test_generate_refuses_forward_mode_arguments(pair, kwarg):
    model, _ = pair
    with pytest.raises(ValueError, match=kwarg):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, **{kwarg: False})


def test_bad_decode_mode_is_refused(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="`decode_mode`='blocky'"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, decode_mode="blocky")
    with pytest.raises(ValueError, match="decode_mode"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, generation_config=GenerationConfig(decode_mode="x"))
