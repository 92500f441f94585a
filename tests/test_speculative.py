"""Self-speculative decoding (LinearSpec, QuadraticSpec) at temperature 0: lossless against greedy AR, budget and
stopping edges, streaming, counters (NFE / TPF / acceptance lengths), batching, and the LoRA drafter.

Two kinds of tiny fp32 models are used:

* random models with a small vocabulary (a few lucky acceptances), and
* "chain" models (`chain_model`), built so that drafts are often accepted: full and partial acceptance, and
  accepted chunks that get cut by a stop, happen all the time.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conftest import left_pad, tiny_drafter_model, tiny_model


SPEC_MODES = ("linear_spec", "quadratic_spec")


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for this module


# ---------------------------------------------------------------------------------------------------- models
def chain_model(seed: int, vocab: int = 32, eps: float = 0.0, margin: float = 1.0, noise: float = 0.1,
                direct: float = 0.5):
    """A model whose drafts are often accepted.

    `o_proj` and `down_proj` are scaled by `eps`: at eps = 0 every slot's hidden state is its own input embedding, so
    its logits are a function of its input token only. Embeddings are (nearly) one-hot and the head puts `margin` on
    W[f(x), x], so a causal slot holding x predicts f(x) and a bidirectional mask slot predicts f(mask). The map f has
    a fixed point a = f(a) = f(mask), every chain reaches it, and a fraction `direct` of the tokens maps straight to
    a. Drafts propose a everywhere: they are rejected until the AR chain x, f(x), f(f(x)), ... reaches a, and then
    every draft is accepted. eps > 0 adds context (attention over positions and the cache) that now and then breaks
    the chain.

    Returns (model, f, a).
    """
    model = tiny_model(seed, vocab_size=vocab, mask_token_id=vocab - 1)
    hidden = model.config.hidden_size
    assert vocab <= hidden
    generator = torch.Generator().manual_seed(1000 + seed)
    # Rank the real tokens (never pad 0, bos 1, eos 2 or mask) with a first; every other token maps to a or to a
    # token of lower rank, so every chain reaches a.
    real = torch.arange(3, vocab - 1)[torch.randperm(vocab - 4, generator=generator)]
    a = int(real[0])
    f = torch.full((vocab,), a, dtype=torch.long)
    for rank in range(1, len(real)):
        if float(torch.rand(1, generator=generator)) >= direct:
            f[real[rank]] = real[int(torch.randint(rank, (1,), generator=generator))]
    for special in (0, 1, 2):
        f[special] = real[int(torch.randint(len(real), (1,), generator=generator))]
    with torch.no_grad():
        embed = torch.randn(vocab, hidden, generator=generator) * noise
        embed[torch.arange(vocab), torch.arange(vocab)] += 1.0
        model.encoder.embed_tokens.weight.copy_(embed)
        head = torch.randn(vocab, hidden, generator=generator) * noise
        head[f, torch.arange(vocab)] += margin
        model.diffusion_head.weight.copy_(head)
        for layer in model.encoder.layers:
            layer.self_attn.o_proj.weight.mul_(eps)
            layer.mlp.down_proj.weight.mul_(eps)
    return model, f, a


# Built once: hypothesis examples pick from this pool.
_POOL_SPECS = [
    ("random", dict(seed=0, vocab_size=16, mask_token_id=15)),
    ("random", dict(seed=1, vocab_size=24, mask_token_id=23)),
    ("random", dict(seed=2, vocab_size=32, mask_token_id=31)),
    ("random", dict(seed=3)),  # vocab 64
    ("chain", dict(seed=1, vocab=16, eps=0.0)),
    ("chain", dict(seed=1, vocab=32, eps=0.0)),
    ("chain", dict(seed=2, vocab=24, eps=0.03)),
    ("chain", dict(seed=7, vocab=32, eps=0.06)),
    ("chain", dict(seed=4, vocab=32, eps=0.1)),
    ("chain", dict(seed=5, vocab=16, eps=0.1)),
]
_POOL = []


def pool():
    if not _POOL:
        for kind, kwargs in _POOL_SPECS:
            _POOL.append(tiny_model(**kwargs) if kind == "random" else chain_model(**kwargs)[0])
    return _POOL


# --------------------------------------------------------------------------------------------------- helpers
def generate(model, ids, mask, mode, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, decode_mode=mode, return_dict_in_generate=True, **kwargs)


def random_batch(seed, lengths, vocab, extra_pad=0):
    """Left-padded prompts of the given lengths, tokens in [1, vocab) (the mask token included)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]
    ids, mask = left_pad(prompts)
    if extra_pad:
        ids = torch.cat([torch.zeros(len(lengths), extra_pad, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(len(lengths), extra_pad, dtype=torch.long), mask], dim=1)
    return ids, mask


def new_counts(sequences, prompt_width, max_new, eos):
    """New tokens per row when EOS and max_new_tokens are the only stops: up to the first EOS, else the budget."""
    counts = []
    for row in sequences[:, prompt_width:].tolist():
        hits = [i for i, t in enumerate(row) if eos is not None and t in eos]
        counts.append(hits[0] + 1 if hits else max_new)
    return counts


def cycles_of(out):
    """Per row, the list of acceptance lengths (0-padding removed), checking that the padding is trailing only."""
    batch = out.sequences.shape[0]
    lengths = out.acceptance_lengths
    if lengths is None:
        return [[] for _ in range(batch)]
    assert lengths.dtype == torch.long and lengths.shape[0] == batch
    rows = []
    for row in lengths.tolist():
        nonzero = [x for x in row if x > 0]
        assert row == nonzero + [0] * (len(row) - len(nonzero)), f"acceptance lengths not 0-padded at the end: {row}"
        rows.append(nonzero)
    assert lengths.shape[1] == max(len(r) for r in rows), "acceptance_lengths has an all-zero trailing column"
    return rows


def check_counters(out, prompt_width, mode, max_new, block_size, threshold, eos):
    """The exact accounting of the two loops (see `_linear_spec_decode` / `_quadratic_spec_decode`).

    LinearSpec: the prefill emits the seed; every later token comes from a cycle, so new = 1 + sum(AL). A cycle is a
    verify forward plus, with threshold None, one draft forward, skipped when the cycle's block has no draft slot
    (block = min(block_size, largest remaining budget among live rows) == 1). Cycles of all live rows run in lockstep.
    QuadraticSpec: the bootstrap forward is the prefill and each cycle is one forward; a row left with one token of
    budget emits its pending AR token without a forward and without a cycle, so new - sum(AL) is 0 or (at the
    budget) 1.
    """
    batch = out.sequences.shape[0]
    new = new_counts(out.sequences, prompt_width, max_new, eos)
    cycles = cycles_of(out)
    forwards = out.num_forwards.tolist()
    assert out.num_forwards.shape == (batch,) and out.tokens_per_forward.shape == (batch,)
    expected_tpf = torch.tensor(new, dtype=torch.float) / torch.tensor(forwards, dtype=torch.float)
    torch.testing.assert_close(out.tokens_per_forward.float(), expected_tpf)
    for r in range(batch):
        assert all(1 <= a <= block_size for a in cycles[r]), cycles[r]
    if mode == "linear_spec":
        for r in range(batch):
            assert new[r] == 1 + sum(cycles[r]), (r, new[r], cycles[r])
        # Replay the lockstep loop to know each cycle's block size.
        draft_slots = []
        for k in range(max((len(c) for c in cycles), default=0)):
            live = [r for r in range(batch) if len(cycles[r]) > k]
            remaining = max(max_new - 1 - sum(cycles[r][:k]) for r in live)
            draft_slots.append(min(block_size, remaining) - 1)
        for r in range(batch):
            verify = len(cycles[r])
            own = draft_slots[:verify]
            for k, a in enumerate(cycles[r]):
                assert a <= own[k] + 1, (r, k, a, own[k])
            if threshold is None:
                assert forwards[r] == 1 + verify + sum(1 for s in own if s > 0), (r, forwards[r], cycles[r])
            else:
                low = 1 + verify + sum(1 for s in own if s > 0)
                high = 1 + verify + sum(own)
                assert low <= forwards[r] <= high, (r, forwards[r], low, high)
    else:
        for r in range(batch):
            assert forwards[r] == 1 + len(cycles[r]), (r, forwards[r], cycles[r])
            gap = new[r] - sum(cycles[r])
            assert gap in (0, 1), (r, new[r], cycles[r])
            if gap == 1:
                assert new[r] == max_new, (r, new[r], cycles[r])
    return new, cycles


def assert_lossless(model, ids, mask, mode, max_new, block_size=None, threshold=None, eos=None, check=True,
                    spec_only=None, **kwargs):
    """`kwargs` go to both calls, `spec_only` (e.g. the verify tree's fields) to the speculative one."""
    eos_kw = dict(eos_token_id=eos)
    ar = generate(model, ids, mask, "ar", max_new_tokens=max_new, **eos_kw, **kwargs)
    spec_kwargs = dict(max_new_tokens=max_new, **eos_kw, **kwargs, **(spec_only or {}))
    if block_size is not None:
        spec_kwargs["block_size"] = block_size
    if threshold is not None:
        spec_kwargs["confidence_threshold"] = threshold
    out = generate(model, ids, mask, mode, **spec_kwargs)
    assert torch.equal(out.sequences, ar.sequences), (
        f"{mode} != greedy AR\nspec {out.sequences[:, ids.shape[1]:].tolist()}"
        f"\nar   {ar.sequences[:, ids.shape[1]:].tolist()}"
    )
    if check:
        default_block = {"linear_spec": 32, "quadratic_spec": 16}[mode]
        eos_list = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        check_counters(out, ids.shape[1], mode, max_new, block_size or default_block, threshold, eos_list)
    return out, ar


# --------------------------------------------------------------------------------- 1. property-based lossless
@st.composite
def spec_cases(draw, mode):
    model_index = draw(st.integers(0, len(_POOL_SPECS) - 1))
    batch = draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4, 5, 8]))
    lengths = draw(st.lists(st.integers(1, 9), min_size=batch, max_size=batch))
    if mode == "linear_spec":
        block_size = draw(st.sampled_from([2, 3, 4, 5, 7, 8, 8, 11, 16, 23, 32]))
        threshold = draw(st.sampled_from([None, None, 0.3, 0.9]))
    else:
        block_size = draw(st.sampled_from([2, 3, 4, 5, 6, 8, 8, 11, 16] if batch <= 3 else [2, 3, 4, 5, 8]))
        threshold = None
    return dict(
        model_index=model_index,
        lengths=lengths,
        extra_pad=draw(st.sampled_from([0, 0, 0, 2])),
        prompt_seed=draw(st.integers(0, 2**20)),
        block_size=block_size,
        threshold=threshold,
        max_new=draw(st.sampled_from([9, 16, 24, 1, 2, 3, 5, 7, 8, 11, 13, 17, 20, 28])),
        eos=draw(st.sampled_from(["none", "none", "config", "mid", "mid"])),
        eos_row=draw(st.integers(0, 7)),
        eos_index=draw(st.integers(0, 6)),
    )


def run_case(mode, case):
    model = pool()[case["model_index"]]
    vocab = model.config.vocab_size
    ids, mask = random_batch(case["prompt_seed"], case["lengths"], vocab, case["extra_pad"])
    max_new = case["max_new"]
    eos = None
    if case["eos"] == "config":
        eos = model.config.eos_token_id
    elif case["eos"] == "mid":
        # A token the model emits mid-generation (e.g. the 5th AR token of some row) becomes EOS.
        free = generate(model, ids, mask, "ar", max_new_tokens=max_new, eos_token_id=None).sequences[:, ids.shape[1]:]
        row = case["eos_row"] % free.shape[0]
        eos = int(free[row, min(case["eos_index"], free.shape[1] - 1)])
    out, _ = assert_lossless(model, ids, mask, mode, max_new, case["block_size"], case["threshold"], eos)
    lengths = [a for row in cycles_of(out) for a in row]
    longest = "none" if not lengths else "1" if max(lengths) == 1 else "2-4" if max(lengths) <= 4 else "5+"
    event(f"longest acceptance: {longest}")
    new = new_counts(out.sequences, ids.shape[1], max_new, None if eos is None else [eos])
    event(f"rows stopped by EOS before the budget: {'yes' if min(new) < max_new else 'no'}")


_HYPOTHESIS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@settings(max_examples=320, **_HYPOTHESIS)
@given(case=spec_cases("linear_spec"))
def test_linear_spec_equals_greedy_ar(case):
    run_case("linear_spec", case)


@settings(max_examples=200, **_HYPOTHESIS)
@given(case=spec_cases("quadratic_spec"))
def test_quadratic_spec_equals_greedy_ar(case):
    run_case("quadratic_spec", case)


@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("block_size", [2, 32])
def test_large_and_minimal_blocks_with_a_padded_batch(mode, block_size):
    model = pool()[6]
    ids, mask = random_batch(7, [3, 9, 1, 5], model.config.vocab_size)
    for max_new in (1, 2, 33):
        assert_lossless(model, ids, mask, mode, max_new, block_size, eos=None)


def test_chain_models_accept_drafts_often():
    """The accepting construction works: mean acceptance > 2 at block 8, and single, partial and full-block
    acceptances all occur, in both modes."""
    ids, mask = random_batch(11, [4, 6, 2, 7, 5, 3], 32)
    for mode in SPEC_MODES:
        seen = []
        for seed, eps in [(1, 0.0), (5, 0.06), (7, 0.06), (4, 0.1)]:
            model, _, _ = chain_model(seed, vocab=32, eps=eps)
            out, _ = assert_lossless(model, ids, mask, mode, 40, 8, eos=None)
            lengths = [a for row in cycles_of(out) for a in row]
            assert sum(lengths) / len(lengths) > 2, (mode, seed, lengths)
            seen += lengths
        assert 1 in seen and 8 in seen and any(1 < a < 8 for a in seen), seen


def test_random_small_vocab_models_get_lucky_acceptances():
    """The random models of the pool are not trivial either: some drafts are accepted."""
    ids, mask = random_batch(5, [4, 6, 2, 7], 16)
    out, _ = assert_lossless(pool()[0], ids, mask, "linear_spec", 30, 4, eos=None)
    assert max(a for row in cycles_of(out) for a in row) > 1


# ---------------------------------------------------------------------------------------------------- 2. edges
@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("block_size", [None, 4, 8])
@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 7, 8, 9, 13, 17])
def test_never_more_than_max_new_tokens(mode, block_size, max_new):
    """Budgets smaller than, equal to and not multiples of the block; with an accepting model a whole accepted block
    would overshoot."""
    model, _, _ = chain_model(1, vocab=32, eps=0.0)
    ids, mask = random_batch(3, [5, 2, 8], 32)
    out, _ = assert_lossless(model, ids, mask, mode, max_new, block_size, eos=None)
    assert out.sequences.shape[1] == ids.shape[1] + max_new
    assert not (out.sequences[:, ids.shape[1]:] == model.config.mask_token_id).any()


@pytest.mark.parametrize("mode,threshold", [("linear_spec", None), ("linear_spec", 0.5), ("quadratic_spec", None)])
def test_eos_inside_an_accepted_chunk_cuts_there(mode, threshold):
    """Chain model at eps = 0: a prompt ending in a token x with f(x) = a gives the seed a, and the next cycle
    accepts a whole block of a's. With EOS = a the first accepted a must end the row, inside the chunk."""
    model, f, a = chain_model(1, vocab=32, eps=0.0)
    direct = [x for x in range(3, 31) if int(f[x]) == a and x != a]
    indirect = [x for x in range(3, 31) if int(f[x]) != a and int(f[f[x]]) == a]
    assert direct and indirect
    ids, mask = left_pad([[5, 7, direct[0]], [indirect[0]], [9, indirect[-1], 4, direct[-1]]])
    # Free run: a, a, a, ... accepted in full blocks.
    out, _ = assert_lossless(model, ids, mask, mode, 20, 8, threshold, eos=None)
    assert max(a_ for row in cycles_of(out) for a_ in row) == 8
    # With EOS = a every row stops at its first a; a different stop token inside the run works the same.
    out, ar = assert_lossless(model, ids, mask, mode, 20, 8, threshold, eos=a)
    for row in ar.sequences[:, ids.shape[1]:].tolist():
        assert a in row and row.index(a) < 3
    assert_lossless(model, ids, mask, mode, 20, 8, threshold, eos=[17, a])


class StopAfterRepeats(StoppingCriteria):
    """Stops a row once `token` has been generated `count` times: fires in the middle of an accepted run."""

    def __init__(self, token, count, prompt_width):
        self.token, self.count, self.prompt_width = token, count, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_width:] == self.token).sum(dim=1) >= self.count


@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("count", [1, 3, 6])
def test_custom_stopping_criteria_cut_inside_an_accepted_chunk(mode, count):
    model, f, a = chain_model(1, vocab=32, eps=0.0)
    ids, mask = random_batch(4, [4, 2, 6], 32)
    criteria = StoppingCriteriaList([StopAfterRepeats(a, count, ids.shape[1])])
    ar = generate(model, ids, mask, "ar", max_new_tokens=24, eos_token_id=None, stopping_criteria=criteria)
    out = generate(
        model, ids, mask, mode, max_new_tokens=24, block_size=8, eos_token_id=None, stopping_criteria=criteria
    )
    # Each row ends at the token where the criterion fired (the count-th a), padded after it.
    stops = []
    for row in ar.sequences[:, ids.shape[1]:].tolist():
        stops.append([i for i, t in enumerate(row) if t == a][count - 1] + 1)
    assert_rows_cut(out, ar, ids.shape[1], stops, model.config.pad_token_id)
    if count > 1:
        assert max(x for row in cycles_of(out) for x in row) > 1


def assert_rows_cut(out, ar, prompt_width, stops, pad_id):
    """Row r of `out` equals AR's row up to its stop (stops[r] new tokens), then padding. (Without an EOS id,
    transformers' AR loop keeps generating real tokens for rows that a custom criterion finished.)"""
    spec_rows = out.sequences[:, prompt_width:].tolist()
    ar_rows = ar.sequences[:, prompt_width:].tolist()
    assert len(spec_rows[0]) == max(stops)
    for r, stop in enumerate(stops):
        assert spec_rows[r][:stop] == ar_rows[r][:stop], (r, spec_rows[r], ar_rows[r])
        assert all(t == pad_id for t in spec_rows[r][stop:]), (r, spec_rows[r])


def _char_tokenizer(vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    tokens = {alphabet[i]: i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(tokens, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend), alphabet


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_stop_strings_inside_an_accepted_chunk(mode):
    model, f, a = chain_model(1, vocab=32, eps=0.0)
    tokenizer, alphabet = _char_tokenizer(32)
    ids, mask = random_batch(4, [4, 2, 6], 32)
    stop = alphabet[a] * 3
    kwargs = dict(max_new_tokens=24, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer)
    ar = generate(model, ids, mask, "ar", **kwargs)
    out = generate(model, ids, mask, mode, block_size=8, **kwargs)
    stops = []
    for row in ar.sequences[:, ids.shape[1]:].tolist():
        text = "".join(alphabet[t] for t in row)
        assert stop in text
        stops.append(text.index(stop) + len(stop))
    assert_rows_cut(out, ar, ids.shape[1], stops, model.config.pad_token_id)
    assert max(x for row in cycles_of(out) for x in row) > 1


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        assert self.ends == 0
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ends += 1


@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("model_index,eos", [(5, None), (8, None), (2, 2), (6, "mid")])
def test_streamer_receives_accepted_chunks_in_order(mode, model_index, eos):
    model = pool()[model_index]
    ids, mask = random_batch(21, [6], model.config.vocab_size)
    if eos == "mid":
        eos = int(generate(model, ids, mask, "ar", max_new_tokens=9, eos_token_id=None).sequences[0, -1])
    ar_streamer, streamer = RecordingStreamer(), RecordingStreamer()
    ar = generate(model, ids, mask, "ar", max_new_tokens=30, eos_token_id=eos, streamer=ar_streamer)
    out = generate(model, ids, mask, mode, max_new_tokens=30, block_size=6, eos_token_id=eos, streamer=streamer)
    assert torch.equal(out.sequences, ar.sequences)
    assert streamer.ends == 1
    assert streamer.puts[0] == ids[0].tolist(), "the prompt is put first, as in AR"
    new = out.sequences[0, ids.shape[1]:].tolist()
    chunks = streamer.puts[1:]
    assert sum(chunks, []) == new == sum(ar_streamer.puts[1:], [])
    assert all(chunks), "no empty puts"
    cycles = cycles_of(out)[0]
    if mode == "linear_spec":
        assert [len(c) for c in chunks] == [1] + cycles  # the prefill's seed, then one chunk per cycle
    else:
        assert [len(c) for c in chunks][: len(cycles)] == cycles
        assert len(chunks) - len(cycles) in (0, 1)


def test_streamer_with_a_batch_is_refused():
    model = pool()[0]
    ids, mask = random_batch(1, [3, 4], 16)
    for mode in SPEC_MODES:
        with pytest.raises(ValueError):
            generate(model, ids, mask, mode, max_new_tokens=4, streamer=RecordingStreamer())


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_mask_token_is_emitted_only_where_ar_emits_it(mode):
    """Drafts never propose the mask token, but a verified AR token may be the mask id; rows that finish early are
    padded with the pad token, never with a mask placeholder."""
    model, f, a = chain_model(2, vocab=24, eps=0.0)
    mask_id = model.config.mask_token_id
    b = next(x for x in range(3, 23) if x != a)
    with torch.no_grad():  # route b -> mask -> a: greedy AR emits the mask id once
        head = model.diffusion_head.weight
        head[:, b] = 0.0
        head[mask_id, b] = 1.0
    ids, mask = left_pad([[4, 5, b], [6], [b, 7, 8, 9]])
    out, ar = assert_lossless(model, ids, mask, mode, 12, 4, eos=None)
    assert (ar.sequences[:, ids.shape[1]:] == mask_id).any()
    # Early-finishing rows: EOS = a ends them at different times.
    out, ar = assert_lossless(model, ids, mask, mode, 12, 4, eos=a)
    new = out.sequences[:, ids.shape[1]:]
    assert ((new == mask_id).sum(dim=1) == (ar.sequences[:, ids.shape[1]:] == mask_id).sum(dim=1)).all()


def _snapshot(model):
    return dict(
        params={k: (v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()},
        buffers={k: v.detach().clone() for k, v in model.named_buffers()},
        modules={n: (type(m), m.training, getattr(m, "is_causal", None)) for n, m in model.named_modules()},
        config=model.config.to_dict(),
        generation_config=model.generation_config.to_dict(),
        attn=model.config._attn_implementation,
        grad=torch.is_grad_enabled(),
    )


def _assert_same_snapshot(before, after):
    assert before["params"].keys() == after["params"].keys()
    for k, (v, grad) in before["params"].items():
        assert torch.equal(v, after["params"][k][0]) and grad == after["params"][k][1], k
    for k, v in before["buffers"].items():
        assert torch.equal(v, after["buffers"][k]), k
    for key in ("modules", "config", "generation_config", "attn", "grad"):
        assert before[key] == after[key], key


@pytest.mark.parametrize("mode,threshold", [("linear_spec", None), ("linear_spec", 0.5), ("quadratic_spec", None)])
def test_model_state_and_caller_tensors_unchanged(mode, threshold):
    model = pool()[7]
    ids, mask = random_batch(9, [5, 2, 7], model.config.vocab_size)
    ids_copy, mask_copy = ids.clone(), mask.clone()
    config = GenerationConfig(max_new_tokens=15, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    config_copy = config.to_dict()
    logits_before = model(ids, attention_mask=mask).logits
    before = _snapshot(model)
    extra = {} if threshold is None else {"confidence_threshold": threshold}
    with torch.no_grad():
        first = model.generate(
            ids, attention_mask=mask, generation_config=config, decode_mode=mode, block_size=4, **extra
        )
    _assert_same_snapshot(before, _snapshot(model))
    assert torch.equal(ids, ids_copy) and torch.equal(mask, mask_copy)
    assert config.to_dict() == config_copy
    assert torch.equal(model(ids, attention_mask=mask).logits, logits_before)
    # A second call gives the same result (nothing carried over), and grad mode is restored outside no_grad too.
    second = model.generate(
        ids, attention_mask=mask, generation_config=config, decode_mode=mode, block_size=4, **extra
    )
    assert torch.is_grad_enabled()
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(first.num_forwards, second.num_forwards)
    _assert_same_snapshot(before, _snapshot(model))


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_training_mode_model(mode):
    """A model left in training mode generates the same tokens (no dropout configured) and stays in training mode."""
    model = copy.deepcopy(pool()[4]).train()
    ids, mask = random_batch(2, [4, 6], model.config.vocab_size)
    out = generate(model, ids, mask, mode, max_new_tokens=10, block_size=4, eos_token_id=None)
    assert model.training and all(m.training for m in model.modules())
    ar = generate(model.eval(), ids, mask, "ar", max_new_tokens=10, eos_token_id=None)
    assert torch.equal(out.sequences, ar.sequences)


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_counters_simple_cases(mode):
    model, f, a = chain_model(1, vocab=32, eps=0.0)
    ids, mask = random_batch(3, [5], 32)
    # Budget 1: the prefill (or bootstrap) alone.
    out = generate(model, ids, mask, mode, max_new_tokens=1, block_size=4, eos_token_id=None)
    assert out.num_forwards.tolist() == [1]
    assert out.tokens_per_forward.tolist() == [1.0]
    assert out.acceptance_lengths is None or not out.acceptance_lengths.any()
    # Once the chain sits on a, every cycle emits a whole block of 4.
    out, ar = assert_lossless(model, ids, mask, mode, 41, 4, eos=None)
    cycles = cycles_of(out)[0]
    assert cycles[-4:-1] == [4, 4, 4]
    if mode == "linear_spec":
        assert sum(cycles) == 40 and out.num_forwards.item() == 1 + 2 * len(cycles)
    else:
        assert sum(cycles) in (40, 41) and out.num_forwards.item() == 1 + len(cycles)
    assert out.tokens_per_forward.item() == pytest.approx(41 / out.num_forwards.item())
    # Without return_dict_in_generate: the same sequences as a tensor.
    with torch.no_grad():
        plain = model.generate(
            ids, attention_mask=mask, decode_mode=mode, max_new_tokens=41, block_size=4, eos_token_id=None
        )
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences)


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_counters_with_rows_finishing_at_different_times(mode):
    model = pool()[8]
    ids, mask = random_batch(13, [3, 8, 5, 1, 6], model.config.vocab_size)
    free = generate(model, ids, mask, "ar", max_new_tokens=16, eos_token_id=None).sequences[:, ids.shape[1]:]
    eos = int(free[1, 4])
    out, ar = assert_lossless(model, ids, mask, mode, 16, 5, eos=eos)
    new = new_counts(out.sequences, ids.shape[1], 16, [eos])
    assert len(set(new)) > 1, "rows should finish at different times"
    # Rows stop counting forwards when they finish: a row that finished earlier took part in fewer forwards.
    forwards = out.num_forwards.tolist()
    for r in range(5):
        for s in range(5):
            if new[r] < new[s]:
                assert forwards[r] <= forwards[s], (new, forwards)
    if mode == "linear_spec":
        for r in range(5):
            if new[r] == 1:  # stopped at the prefill's seed
                assert forwards[r] == 1 and cycles_of(out)[r] == []


def test_threshold_drafting_takes_several_forwards():
    """With a high confidence threshold a random model needs several draft forwards per cycle."""
    model = pool()[2]
    ids, mask = random_batch(17, [6, 3], model.config.vocab_size)
    none, _ = assert_lossless(model, ids, mask, "linear_spec", 20, 8, None, eos=None)
    high, _ = assert_lossless(model, ids, mask, "linear_spec", 20, 8, 0.99, eos=None)
    cycles = cycles_of(high)
    assert (high.num_forwards > torch.tensor([1 + 2 * len(c) for c in cycles])).all()


# ------------------------------------------------------------------------------------------ processors, batch
@pytest.mark.parametrize("mode,threshold", [("linear_spec", None), ("linear_spec", 0.5), ("quadratic_spec", None)])
@pytest.mark.parametrize(
    "processors",
    [
        dict(repetition_penalty=1.5),
        dict(no_repeat_ngram_size=2),
        dict(min_new_tokens=6),
        dict(repetition_penalty=0.7, sequence_bias={(5,): 2.0, (7, 9): 3.0}),
        dict(suppress_tokens=[3, 4, 5], begin_suppress_tokens=[6]),
    ],
)
@pytest.mark.parametrize("lengths", [[4], [4, 7]], ids=["batch1", "batch2"])
def test_processors_see_the_exact_prefix(mode, threshold, processors, lengths):
    """Prefix-dependent processors (penalties, n-gram bans, min length on EOS) are applied per verify position with
    the exact prefix: greedy spec == greedy AR with the same processors."""
    model, f, a = chain_model(5, vocab=32, eps=0.06)
    ids, mask = random_batch(31, lengths, 32)
    eos = a if "min_new_tokens" in processors else None
    assert_lossless(model, ids, mask, mode, 14, 4, threshold, eos=eos, **processors)


@pytest.mark.parametrize("mode,threshold", [("linear_spec", None), ("linear_spec", 0.3), ("quadratic_spec", None)])
@pytest.mark.parametrize("model_index", [1, 5, 8])
def test_batch_rows_equal_rows_alone(mode, threshold, model_index):
    model = pool()[model_index]
    vocab = model.config.vocab_size
    lengths = [7, 2, 5, 1, 9, 4]
    ids, mask = random_batch(40 + model_index, lengths, vocab)
    free = generate(model, ids, mask, "ar", max_new_tokens=18, eos_token_id=None).sequences[:, ids.shape[1]:]
    eos = int(free[2, 5])
    kwargs = dict(max_new_tokens=18, block_size=6, eos_token_id=eos)
    if threshold is not None:
        kwargs["confidence_threshold"] = threshold
    batched = generate(model, ids, mask, mode, **kwargs)
    width = ids.shape[1]
    for r, n in enumerate(lengths):
        alone = generate(model, ids[r:r + 1, width - n:], mask[r:r + 1, width - n:], mode, **kwargs)
        row = batched.sequences[r, width:].tolist()
        single = alone.sequences[0, n:].tolist()
        assert row[: len(single)] == single and all(t == model.config.pad_token_id for t in row[len(single):]), r


# ------------------------------------------------------------------------------------------------ 4. LoRA drafter
peft = pytest.importorskip("peft")


def lora_config(r=4, **kwargs):
    """NVIDIA's drafter shape (o_proj only, alpha = 4 r), with random A and B so that the adapter changes outputs."""
    return peft.LoraConfig(
        r=r, lora_alpha=4 * r, lora_dropout=0.0, target_modules=["o_proj"], init_lora_weights=False, **kwargs
    )


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "_active_adapter")]


def lora_state(model):
    """Each LoRA layer's switches, and the module tree itself (generate() takes the PEFT wrappers out of the call
    path while the drafter is off and must put every one of them back)."""
    switches = [(layer._disable_adapters, list(layer.active_adapters), getattr(layer, "merged", False))
                for layer in lora_layers(model)]
    return switches, [(name, id(module)) for name, module in model.named_modules()]


class ForwardLog:
    """Records, for every backbone forward, whether it was a draft (bidirectional, no custom mask), the state of
    the LoRA layers during it, the adapters whose lora_A ran, and its output."""

    def __init__(self, model):
        self.calls = []
        self.handles = [
            model.encoder.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.encoder.register_forward_hook(self._post),
        ]
        for layer in lora_layers(model):
            for name, module in getattr(layer, "lora_A", {}).items():
                self.handles.append(module.register_forward_hook(self._adapter_hook(name)))
        # QuadraticSpec's gated drafting runs the drafter's LoRA terms in our module, not through lora_A.
        self.handles.append(torch.nn.modules.module.register_module_forward_hook(self._gated_hook))

    def _gated_hook(self, module, args, output):
        from nemotron_diffusion.drafting_nemotron_diffusion import GatedDraftLoRALinear

        if isinstance(module, GatedDraftLoRALinear) and self.calls:
            self.calls[-1]["ran"].update(module.adapter_names)

    def _pre(self, module, args, kwargs):
        draft = not kwargs.get("is_causal", True) and kwargs.get("mask_function") is None
        self.calls.append(dict(draft=draft, ran=set()))

    def _adapter_hook(self, name):
        def hook(module, args, output):
            self.calls[-1]["ran"].add(name)

        return hook

    def _post(self, module, args, output):
        self.calls[-1]["hidden"] = output.last_hidden_state.detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def _lora_prompt():
    return random_batch(77, [5, 3], 32)


def _with_lora(wrapper, names=("drafter",), seed=0):
    """Chain model + LoRA(s) on o_proj: via get_peft_model (PeftModel wrapper), inject_adapter_in_model or
    model.add_adapter (no wrapper). Returns (base copy, inner model, object to call generate on)."""
    model, _, _ = chain_model(5, vocab=32, eps=0.06)
    base = copy.deepcopy(model)
    torch.manual_seed(seed)
    if wrapper == "get_peft_model":
        outer = peft.get_peft_model(model, lora_config(), adapter_name=names[0])
        for name in names[1:]:
            outer.add_adapter(name, lora_config(r=8))
        outer.eval()
    elif wrapper == "inject":
        for i, name in enumerate(names):
            peft.inject_adapter_in_model(lora_config(r=4 if i == 0 else 8), model, adapter_name=name)
        for layer in lora_layers(model):
            layer.set_adapter(names[0])
        outer = model
    else:
        for i, name in enumerate(names):
            try:
                model.add_adapter(lora_config(r=4 if i == 0 else 8), adapter_name=name)
            except ValueError as error:  # transformers 5.24 needs a newer peft for its adapter integration
                if "version of PEFT" in str(error):
                    pytest.skip(str(error))
                raise
        model.set_adapter(names[0])
        outer = model
    assert lora_layers(model)
    return base, model, outer


def _gen(outer, ids, mask, mode, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return outer.generate(
            input_ids=ids, attention_mask=mask, decode_mode=mode, return_dict_in_generate=True, **kwargs
        )


WRAPPERS = ["get_peft_model", "inject", "add_adapter"]


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_lora_changes_drafts_only(wrapper):
    """(a) Draft forwards run with the adapter (their hidden states differ from the base model's), every causal
    forward runs with base weights (identical hidden states), and the acceptance changes."""
    base, model, outer = _with_lora(wrapper)
    ids, mask = _lora_prompt()
    kwargs = dict(max_new_tokens=16, block_size=6, eos_token_id=None)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits), "the LoRA must change the model's outputs"
    log_lora, log_base = ForwardLog(model), ForwardLog(base)
    try:
        with_lora = _gen(outer, ids, mask, "linear_spec", **kwargs)
        without = _gen(base, ids, mask, "linear_spec", **kwargs)
    finally:
        log_lora.remove()
        log_base.remove()
    assert torch.equal(with_lora.sequences, without.sequences)
    drafts = [c for c in log_lora.calls if c["draft"]]
    causal = [c for c in log_lora.calls if not c["draft"]]
    assert drafts and causal
    assert all(c["ran"] == {"drafter"} for c in drafts)
    assert all(not c["ran"] for c in causal)
    # The first draft forward and the prefill see the same inputs in both runs.
    first_draft = next(i for i, c in enumerate(log_lora.calls) if c["draft"])
    assert not torch.allclose(log_lora.calls[first_draft]["hidden"], log_base.calls[first_draft]["hidden"])
    torch.testing.assert_close(log_lora.calls[0]["hidden"], log_base.calls[0]["hidden"], rtol=0, atol=0)
    assert not torch.equal(with_lora.acceptance_lengths, without.acceptance_lengths) or not torch.equal(
        with_lora.num_forwards, without.num_forwards
    )


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_lora_output_equals_base_ar_in_every_mode(wrapper):
    """(b) At temperature 0 every mode of the adapter-carrying model equals greedy AR of the base model (diffusion:
    equals diffusion of the base model, its own decoder)."""
    base, model, outer = _with_lora(wrapper)
    ids, mask = _lora_prompt()
    kwargs = dict(max_new_tokens=14, eos_token_id=None)
    reference = _gen(base, ids, mask, "ar", **kwargs).sequences
    for mode, extra in [
        ("ar", {}),
        ("linear_spec", dict(block_size=5)),
        ("linear_spec", dict(block_size=8, confidence_threshold=0.6)),
        ("quadratic_spec", dict(block_size=5)),
    ]:
        out = _gen(outer, ids, mask, mode, **kwargs, **extra)
        assert torch.equal(out.sequences, reference), (wrapper, mode, extra)
    diffusion = dict(block_size=4, confidence_threshold=0.9)
    assert torch.equal(
        _gen(outer, ids, mask, "diffusion", **kwargs, **diffusion).sequences,
        _gen(base, ids, mask, "diffusion", **kwargs, **diffusion).sequences,
    )


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("enabled_before", [True, False])
@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec", "ar"])
def test_lora_state_restored(wrapper, enabled_before, mode):
    """(c) Enabled/disabled state, active adapter and merge state are exactly as before the call."""
    base, model, outer = _with_lora(wrapper, names=("drafter", "other"))
    ids, mask = _lora_prompt()
    if not enabled_before:
        if wrapper == "get_peft_model":
            outer.base_model.disable_adapter_layers()
        elif wrapper == "inject":
            for layer in lora_layers(model):
                layer.enable_adapters(False)
        else:
            model.disable_adapters()
    before = lora_state(model)
    assert all(disabled == (not enabled_before) for disabled, _, _ in before[0])
    assert all(active == ["drafter"] for _, active, _ in before[0])
    with torch.no_grad():
        logits_before = model(ids, attention_mask=mask).logits
    out = _gen(outer, ids, mask, mode, max_new_tokens=10, block_size=4, eos_token_id=None)
    assert lora_state(model) == before
    if wrapper == "get_peft_model":
        assert outer.active_adapter == "drafter"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, logits_before)
    assert torch.equal(out.sequences, _gen(base, ids, mask, "ar", max_new_tokens=10, eos_token_id=None).sequences)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_lora_state_restored_after_an_exception(wrapper):
    base, model, outer = _with_lora(wrapper)
    ids, mask = _lora_prompt()

    class Boom(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            if self.calls > 4:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    before = lora_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        criteria = StoppingCriteriaList([Boom()])
        _gen(outer, ids, mask, "linear_spec", max_new_tokens=20, block_size=4, stopping_criteria=criteria)
    assert lora_state(model) == before
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_drafter_adapter_selects_the_adapter(wrapper):
    """(d) drafter_adapter picks which adapter drafts and is the only adapter generate() switches: a named drafter
    is on in draft forwards only, every other adapter keeps the user's state ("one" stays active in every forward);
    None makes every adapter the drafter (causal forwards run the base weights); an unknown name raises."""
    base, model, outer = _with_lora(wrapper, names=("one", "two"))
    ids, mask = _lora_prompt()
    kwargs = dict(max_new_tokens=12, block_size=5, eos_token_id=None)
    reference = _gen(base, ids, mask, "ar", **kwargs).sequences
    # AR of the model as the user set it ("one" active), e.g. what a task LoRA gives
    with_one = _gen(outer, ids, mask, "ar", drafter_adapter="two", **kwargs).sequences
    assert not torch.equal(with_one, reference)
    results = {}
    cases = [("two", {"one", "two"}, {"one"}, with_one), ("one", {"one"}, set(), reference),
             (None, {"one"}, set(), reference)]
    for choice, drafting, causal, expected_tokens in cases:
        log = ForwardLog(model)
        try:
            out = _gen(outer, ids, mask, "linear_spec", drafter_adapter=choice, **kwargs)
        finally:
            log.remove()
        assert torch.equal(out.sequences, expected_tokens), choice
        assert all(c["ran"] == drafting for c in log.calls if c["draft"]), (choice, [c["ran"] for c in log.calls])
        assert all(c["ran"] == causal for c in log.calls if not c["draft"]), choice
        assert all(active == ["one"] for _, active, _ in lora_state(model)[0])
        results[choice] = [c["hidden"] for c in log.calls if c["draft"]][0]
    assert not torch.allclose(results["one"], results["two"])
    torch.testing.assert_close(results["one"], results[None], rtol=0, atol=0)
    before = lora_state(model)
    with pytest.raises(ValueError, match="drafter_adapter"):
        _gen(outer, ids, mask, "linear_spec", drafter_adapter="three", **kwargs)
    assert lora_state(model) == before
    # Also through a GenerationConfig.
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    config.drafter_adapter = "two"
    config.block_size = 5
    log = ForwardLog(model)
    try:
        with torch.no_grad():
            out = outer.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, decode_mode="linear_spec"
            )
    finally:
        log.remove()
    assert torch.equal(out.sequences, with_one)
    assert all(c["ran"] == {"one", "two"} for c in log.calls if c["draft"])
    assert all(c["ran"] == {"one"} for c in log.calls if not c["draft"])


@pytest.mark.parametrize("wrapper", ["get_peft_model", "add_adapter"])
@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec", "ar"])
def test_merged_adapter_is_refused(wrapper, mode):
    """(e) A merged adapter would make every causal forward run with adapter weights."""
    base, model, outer = _with_lora(wrapper)
    ids, mask = _lora_prompt()
    for layer in lora_layers(model):
        layer.merge()
    with pytest.raises(ValueError, match="merged"):
        _gen(outer, ids, mask, mode, max_new_tokens=6, block_size=4, eos_token_id=None)
    for layer in lora_layers(model):
        layer.unmerge()
    out = _gen(outer, ids, mask, mode, max_new_tokens=6, block_size=4, eos_token_id=None)
    assert torch.equal(out.sequences, _gen(base, ids, mask, "ar", max_new_tokens=6, eos_token_id=None).sequences)


_mask_embedding_drafter = tiny_drafter_model  # (moved to conftest: test_packed.py builds the same drafter)


def test_draft_token_embedding_equals_peft_trainable_tokens():
    """The sparse embedding used by draft forwards computes exactly what PEFT's trainable-tokens layer does with
    its adapter on (which rebuilds the whole embedding matrix on every call)."""
    from nemotron_diffusion.drafting_nemotron_diffusion import DraftTokenEmbedding

    model = _mask_embedding_drafter()
    wrapper = model.encoder.embed_tokens
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    ids[0, 2:9] = model.config.mask_token_id
    with torch.no_grad():
        expected = wrapper(ids)  # adapter on (PEFT's default state after get_peft_model)
        sparse = DraftTokenEmbedding.for_wrapper(wrapper, wrapper.original_module, ["drafter"])
        assert sparse is not None
        assert torch.equal(sparse(ids), expected)
        assert not torch.equal(expected[0, 2], wrapper.original_module(ids)[0, 2])  # the row really is trained


@pytest.mark.parametrize("do_sample", [False, True])
def test_sparse_draft_embedding_changes_nothing(monkeypatch, do_sample):
    """LinearSpec with the sparse draft embedding gives the same tokens, acceptance lengths and forwards as with
    PEFT's own trainable-tokens layer in the draft forwards."""
    from nemotron_diffusion import drafting_nemotron_diffusion as drafting

    model = _mask_embedding_drafter()
    ids, mask = random_batch(5, [6, 9, 4], 40)
    kwargs = dict(max_new_tokens=24, block_size=5, eos_token_id=None, do_sample=do_sample, temperature=0.9)
    torch.manual_seed(3)
    fast = _gen(model, ids, mask, "linear_spec", **kwargs)
    monkeypatch.setattr(drafting.DraftTokenEmbedding, "for_wrapper", classmethod(lambda cls, *args: None))
    torch.manual_seed(3)
    peft_path = _gen(model, ids, mask, "linear_spec", **kwargs)
    assert torch.equal(fast.sequences, peft_path.sequences)
    assert torch.equal(fast.acceptance_lengths, peft_path.acceptance_lengths)
    assert torch.equal(fast.num_forwards, peft_path.num_forwards)


# ------------------------------------------------------------------------------------- merged draft weights
def _draft_hiddens(model, ids, mask, mode, **kwargs):
    """Hidden states of every draft forward (bidirectional, no custom mask) of one generate() call, the adapters
    whose lora_A ran in them, and the output."""
    log = ForwardLog(model)
    try:
        out = _gen(model, ids, mask, mode, **kwargs)
    finally:
        log.remove()
    drafts = [c for c in log.calls if c["draft"]]
    return [c["hidden"] for c in drafts], [c["ran"] for c in drafts], out


@pytest.mark.parametrize("mode,extra", [("linear_spec", {}), ("linear_spec", {"confidence_threshold": 0.5}),
                                        ("diffusion", {"confidence_threshold": 0.9})])
def test_merged_drafter_computes_what_peft_computes(mode, extra):
    """With merged draft weights, draft forwards run no LoRA module yet compute what PEFT's LoRA computes (float32,
    to rounding): same tokens, forwards and acceptance as the PEFT path, and LinearSpec still equals AR."""
    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "diffusion", "quadratic_spec"]
    ids, mask = random_batch(11, [6, 9, 4], 40)
    kwargs = dict(max_new_tokens=20, block_size=5, eos_token_id=None, **extra)
    peft_hidden, peft_ran, peft_out = _draft_hiddens(model, ids, mask, mode, **kwargs)
    before = lora_state(model)
    assert model.enable_merged_drafter() == len([m for m in lora_layers(model) if hasattr(m, "lora_A")])
    try:
        merged_hidden, merged_ran, merged_out = _draft_hiddens(model, ids, mask, mode, **kwargs)
    finally:
        model.disable_merged_drafter()
    assert lora_state(model) == before  # every PEFT wrapper is back in place
    assert all(ran == {"drafter"} for ran in peft_ran) and peft_ran
    assert all(not ran for ran in merged_ran) and len(merged_ran) == len(peft_ran)
    for a, b in zip(peft_hidden, merged_hidden):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged_out.sequences, peft_out.sequences)
    assert torch.equal(merged_out.num_forwards, peft_out.num_forwards)
    if mode == "linear_spec":
        assert torch.equal(merged_out.acceptance_lengths, peft_out.acceptance_lengths)
        ar = _gen(model, ids, mask, "ar", max_new_tokens=20, eos_token_id=None)
        assert torch.equal(merged_out.sequences, ar.sequences)


def test_merged_drafter_leaves_quadratic_spec_on_gated_lora():
    """QuadraticSpec drafts at its mask slots only, which a merged weight cannot express: its forwards keep PEFT's
    gated LoRA, and its output still equals AR."""
    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "quadratic_spec"]
    ids, mask = random_batch(12, [7, 5], 40)
    model.enable_merged_drafter()
    log = ForwardLog(model)
    try:
        out = _gen(model, ids, mask, "quadratic_spec", max_new_tokens=18, block_size=4, eos_token_id=None)
    finally:
        log.remove()
    assert any(c["ran"] == {"drafter"} for c in log.calls)
    ar = _gen(model, ids, mask, "ar", max_new_tokens=18, eos_token_id=None)
    assert torch.equal(out.sequences, ar.sequences)


@pytest.mark.parametrize("merged", [False, True])
def test_fused_commit_forward_drafts_at_its_masks_only(merged):
    """Diffusion's commit forward with a look-ahead (`fused_commit_forward`) runs the drafter at the next block's
    masks only: the finished block's K/V and the next seed stay the base model's. At threshold 1.0 the look-ahead
    commits nothing, so the fused loop must give exactly the plain loop's tokens and forwards (a drafter leaking into
    the block's positions would change the cache); its look-ahead forwards ran the drafter, and none without one."""
    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "diffusion", "quadratic_spec"]
    if merged:  # merged draft weights cannot be limited to positions: the look-ahead takes the gated LoRA terms
        model.enable_merged_drafter()
    ids, mask = random_batch(14, [7, 4], 40)
    kwargs = dict(max_new_tokens=16, block_size=4, eos_token_id=None, confidence_threshold=1.0)
    try:
        plain = _gen(model, ids, mask, "diffusion", **kwargs)
        log = ForwardLog(model)
        try:
            fused = _gen(model, ids, mask, "diffusion", fused_commit_forward=True, **kwargs)
        finally:
            log.remove()
    finally:
        model.disable_merged_drafter()
    assert torch.equal(fused.sequences, plain.sequences)
    assert torch.equal(fused.num_forwards, plain.num_forwards)
    lookaheads = [call for call in log.calls if call["hidden"].shape[1] == 2 * 4]  # [block, masks x 4]
    assert len(lookaheads) == 16 // 4 - 1 and all(call["ran"] == {"drafter"} for call in lookaheads)
    model.generation_config.drafter_modes = ["linear_spec"]
    log = ForwardLog(model)
    try:
        _gen(model, ids, mask, "diffusion", fused_commit_forward=True, **kwargs)
    finally:
        log.remove()
    assert not any(call["ran"] for call in log.calls)


def test_merged_drafter_follows_changed_adapter_weights():
    """A kept merged weight is recomputed when the adapter's weights change in place (an optimizer step)."""
    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    ids, mask = random_batch(13, [6], 40)
    kwargs = dict(max_new_tokens=8, block_size=4, eos_token_id=None)
    model.enable_merged_drafter()
    _draft_hiddens(model, ids, mask, "linear_spec", **kwargs)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-2.0)
    merged_hidden, _, _ = _draft_hiddens(model, ids, mask, "linear_spec", **kwargs)
    model.disable_merged_drafter()
    peft_hidden, _, _ = _draft_hiddens(model, ids, mask, "linear_spec", **kwargs)
    for a, b in zip(peft_hidden, merged_hidden):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert not any(hasattr(m, "_nemotron_diffusion_merged_draft") for m in model.modules())


@pytest.mark.parametrize("do_sample", [False, True])
def test_gated_draft_lora_equals_peft_with_gate_hooks(monkeypatch, do_sample):
    """QuadraticSpec's mask-only drafting through `GatedDraftLoRALinear` computes what PEFT's LoRA layers with a
    gate hook on lora_A compute: same forwards' hidden states, tokens, acceptance and forwards."""
    from nemotron_diffusion import drafting_nemotron_diffusion as drafting

    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "quadratic_spec"]
    ids, mask = random_batch(14, [6, 9, 4], 40)
    kwargs = dict(max_new_tokens=20, block_size=4, eos_token_id=None, do_sample=do_sample, temperature=0.9)

    def run():
        log = ForwardLog(model)
        torch.manual_seed(5)
        try:
            out = _gen(model, ids, mask, "quadratic_spec", **kwargs)
        finally:
            log.remove()
        return [c["hidden"] for c in log.calls], out

    ours_hidden, ours = run()
    monkeypatch.setattr(drafting.GatedDraftLoRALinear, "for_wrapper", classmethod(lambda cls, *args: None))
    peft_hidden, peft_out = run()
    assert len(ours_hidden) == len(peft_hidden)
    for a, b in zip(peft_hidden, ours_hidden):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.sequences, peft_out.sequences)
    assert torch.equal(ours.acceptance_lengths, peft_out.acceptance_lengths)
    assert torch.equal(ours.num_forwards, peft_out.num_forwards)


def test_quantize_int8_round_trip():
    """Symmetric per-row int8: every row's largest magnitude maps to +-127, every entry is within half a step of
    the weight, and `int8_linear` multiplies by exactly the dequantized weight."""
    from nemotron_diffusion.int8_nemotron_diffusion import int8_linear, quantize_int8

    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    weight[3] *= 50.0  # rows of very different scales
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.shape == (24,) and scales.dtype == torch.float32
    assert torch.equal(q.abs().amax(dim=1), torch.full((24,), 127, dtype=torch.int8))
    dequantized = q.float() * scales[:, None]
    assert bool(((dequantized - weight).abs() <= scales[:, None] / 2 + 1e-6).all())
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(int8_linear(x, q, scales), x @ dequantized.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no FBGEMM in this torch")
def test_float32_int8_weight_is_the_same_int8_weight_through_fbgemm():
    """A float32 weight's kept int8 form packs exactly `quantize_int8`'s q and scales for FBGEMM, whose product
    also quantizes the activations (per call, 7-bit): close to x @ dequantized.T, not equal; bf16 keeps the pair."""
    from nemotron_diffusion.int8_nemotron_diffusion import int8_linear, int8_weight, quantize_int8

    torch.manual_seed(1)
    weight = torch.randn(48, 64)
    weight[5] *= 30.0
    q, scales, packed = int8_weight(weight)
    q_ref, scales_ref = quantize_int8(weight)
    assert torch.equal(q, q_ref) and torch.equal(scales, scales_ref)
    unpacked, _ = torch.ops.quantized.linear_unpack(packed)
    assert torch.equal(unpacked.int_repr(), q)
    torch.testing.assert_close(unpacked.q_per_channel_scales().float(), scales)
    x = torch.randn(3, 7, 64)
    want = x @ (q.float() * scales[:, None]).T
    got = int8_linear(x, q, scales, packed)
    assert got.shape == (3, 7, 48) and got.dtype == torch.float32
    assert not torch.equal(got, want)
    assert float((got - want).norm() / want.norm()) < 0.02
    assert len(int8_weight(weight.to(torch.bfloat16))) == 2


@pytest.mark.parametrize("mode,extra", [("linear_spec", {}), ("linear_spec", {"tree_width": 3}),
                                        ("linear_spec", {"do_sample": True, "temperature": 0.8}),
                                        ("diffusion", {"confidence_threshold": 0.5})])
def test_int8_merged_drafter_drafts_with_int8_weights_and_stays_lossless(monkeypatch, mode, extra):
    """`weight_format="int8"`: draft forwards run no LoRA module and compute the int8 form of the merged weights
    (close to PEFT's, not equal); the verifier keeps the base weights, so greedy LinearSpec still returns the AR
    tokens, and the kept weights are int8. In float32, where the guarantee is exact (FBGEMM's int8 product)."""
    from nemotron_diffusion.drafting_nemotron_diffusion import MERGED_DRAFT_ATTRIBUTE

    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "diffusion", "quadratic_spec"]
    ids, mask = random_batch(15, [6, 9, 4], 40)
    kwargs = dict(max_new_tokens=20, block_size=5, eos_token_id=None, **extra)
    torch.manual_seed(3)
    peft_hidden, _, peft_out = _draft_hiddens(model, ids, mask, mode, **kwargs)
    count = model.enable_merged_drafter(weight_format="int8")
    try:
        assert count == len([m for m in lora_layers(model) if hasattr(m, "lora_A")])
        kept = [getattr(m, MERGED_DRAFT_ATTRIBUTE) for m in model.modules() if hasattr(m, MERGED_DRAFT_ATTRIBUTE)]
        assert len(kept) == count and all(k["format"] == "int8" for k in kept)
        assert all(w[1][0].dtype == torch.int8 for k in kept for w in k["weights"].values())
        torch.manual_seed(3)
        int8_hidden, int8_ran, int8_out = _draft_hiddens(model, ids, mask, mode, **kwargs)
    finally:
        model.disable_merged_drafter()
    assert int8_ran and all(not ran for ran in int8_ran)
    # Same first draft forward input (the prompt's cache and seeds come from base forwards): int8 rounding only.
    first_peft, first_int8 = peft_hidden[0], int8_hidden[0]
    assert not torch.equal(first_int8, first_peft)
    # (FBGEMM also quantizes the activations, 7-bit, per call: ~8% of the hidden state's norm on this tiny model)
    assert float((first_int8 - first_peft).norm() / first_peft.norm()) < 0.1
    if mode == "linear_spec" and not extra.get("do_sample"):
        ar = _gen(model, ids, mask, "ar", max_new_tokens=20, eos_token_id=None)
        assert torch.equal(int8_out.sequences, ar.sequences)
    assert int8_out.sequences.shape == peft_out.sequences.shape


def test_int8_draft_head_serves_the_drafters_draft_forwards_only(monkeypatch):
    """The int8 copy of the LM head computes the logits of draft forwards in modes the drafter serves (LinearSpec's
    drafts here), never those of causal forwards, and not diffusion's when the drafter does not serve diffusion.
    Its logits are close to the head's, and it follows a changed head weight."""
    from nemotron_diffusion.head_nemotron_diffusion import Int8DraftHead

    calls = []
    original = Int8DraftHead.__call__
    monkeypatch.setattr(Int8DraftHead, "__call__", lambda self, hidden: calls.append(hidden.shape) or
                        original(self, hidden))
    model = _mask_embedding_drafter()
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec"]
    ids, mask = random_batch(16, [6, 9], 40)
    model.enable_merged_drafter(weight_format="int8")
    try:
        out = _gen(model, ids, mask, "linear_spec", max_new_tokens=12, block_size=4, eos_token_id=None)
        drafts = len(calls)
        assert drafts > 0 and all(len(shape) == 3 and shape[1] <= 3 for shape in calls)  # slots 1..B-1 only
        ar = _gen(model, ids, mask, "ar", max_new_tokens=12, eos_token_id=None)
        assert torch.equal(out.sequences, ar.sequences)
        _gen(model, ids, mask, "diffusion", max_new_tokens=8, block_size=4, eos_token_id=None)
        assert len(calls) == drafts
        head = model._int8_draft_head
        hidden = torch.randn(3, model.config.hidden_size)
        logits = model.diffusion_head(hidden)
        assert float((head(hidden) - logits).norm() / logits.norm()) < 0.02
        with torch.no_grad():
            model.diffusion_head.weight.mul_(2.0)
        torch.testing.assert_close(head(hidden), 2 * logits, rtol=0.05, atol=0.05 * float(logits.abs().max()))
    finally:
        model.disable_merged_drafter()
    assert model._int8_draft_head is None


def test_merged_drafter_weight_format_is_validated():
    """An unknown format is refused, and so is int8 where there is no int8 kernel (float16 weights); bfloat16 and
    float32 weights on a CPU take it, and the kept weights follow the model to another dtype (int8 again in
    float32, through FBGEMM, and LinearSpec still returns AR's tokens)."""
    from nemotron_diffusion import drafting_nemotron_diffusion as drafting

    model = _mask_embedding_drafter()
    with pytest.raises(ValueError, match=r"weight_format='int4' is invalid; allowed: \[None, 'int8'\]"):
        model.enable_merged_drafter(weight_format="int4")
    half = _mask_embedding_drafter().to(torch.float16)
    with pytest.raises(ValueError, match=r"weight_format='int8' is available for bfloat16 or float32 weights on a CPU "
                                         r"only; the drafter's weights are \['float16 on cpu'\]"):
        half.enable_merged_drafter(weight_format="int8")
    assert not any(hasattr(m, drafting.MERGED_DRAFT_ATTRIBUTE) for m in half.modules())

    model = model.to(torch.bfloat16)
    assert model.enable_merged_drafter(weight_format="int8") > 0
    ids, mask = random_batch(17, [6], 40)

    def kept_dtypes():
        return {w[1][0].dtype if isinstance(w[1], tuple) else w[1].dtype
                for m in model.modules() if hasattr(m, drafting.MERGED_DRAFT_ATTRIBUTE)
                for w in getattr(m, drafting.MERGED_DRAFT_ATTRIBUTE)["weights"].values()}

    _gen(model, ids, mask, "linear_spec", max_new_tokens=6, block_size=4, eos_token_id=None)
    assert kept_dtypes() == {torch.int8}
    model = model.to(torch.float32)
    out = _gen(model, ids, mask, "linear_spec", max_new_tokens=6, block_size=4, eos_token_id=None)
    assert kept_dtypes() == {torch.int8}
    assert all(len(w[1]) == 3 for m in model.modules() if hasattr(m, drafting.MERGED_DRAFT_ATTRIBUTE)
               for w in getattr(m, drafting.MERGED_DRAFT_ATTRIBUTE)["weights"].values())  # FBGEMM's packed form
    assert torch.equal(out.sequences, _gen(model, ids, mask, "ar", max_new_tokens=6, eos_token_id=None).sequences)
    model.disable_merged_drafter()


def test_merged_drafter_of_an_unknown_adapter_is_refused():
    model = _mask_embedding_drafter()
    with pytest.raises(ValueError, match=r"adapter_name='nope' is not a LoRA adapter of this model; found "
                                         r"\['drafter'\]"):
        model.enable_merged_drafter("nope")
    assert model.enable_merged_drafter("drafter") > 0
    model.disable_merged_drafter()
