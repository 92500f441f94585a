"""LinearSpec's verify tree (`tree_width` > 1): its layout and greedy acceptance on hand-built cases, the per-row
cache keep, and end to end: greedy output equal to AR on the tiny-model pool (batches, padding, thresholds,
processors that read the prefix, static cache, stops), sampling unchanged, and the fields' validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, StaticCache

from nemotron_diffusion.cache_nemotron_diffusion import keep_chunk_entries
from nemotron_diffusion.verify_tree_nemotron_diffusion import verify_tree
from test_speculative import (
    _HYPOTHESIS,
    _POOL_SPECS,
    assert_lossless,
    chain_model,
    cycles_of,
    generate,
    pool,
    random_batch,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for this module


# ------------------------------------------------------------------------------------------------ layout
def test_layout_of_a_small_tree():
    """4 drafts, width 3, 2 branching slots: chain 0..4, then sibling/continuation pairs of slots 1 and 2."""
    tree = verify_tree(4, 3, 2, "cpu")
    #            chain          s(1,1) c  s(1,2) c  s(2,1) c  s(2,2) c
    assert tree.depth.tolist() == [0, 1, 2, 3, 4, 1, 2, 1, 2, 2, 3, 2, 3]
    assert tree.siblings.tolist() == [[5, 7], [9, 11]]
    assert tree.continuations.tolist() == [[6, 8], [10, 12]]
    paths = {n: tree.ancestors[n].nonzero()[:, 0].tolist() for n in range(tree.size)}
    assert paths[4] == [0, 1, 2, 3, 4]
    assert paths[5] == [0, 5] and paths[6] == [0, 5, 6] and paths[8] == [0, 7, 8]
    assert paths[9] == [0, 1, 9] and paths[12] == [0, 1, 11, 12]
    # A sibling of the last draft slot has no continuation; slots are clipped to the drafts.
    small = verify_tree(2, 2, 5, "cpu")
    assert small.slots == 2 and small.continuations.tolist() == [[4], [-1]]
    assert small.depth.tolist() == [0, 1, 2, 1, 2, 2]


def _tokens(tree, seeds, drafts, runner_ups):
    return tree.tokens(torch.tensor(seeds), torch.tensor(drafts), torch.tensor(runner_ups))


def test_greedy_acceptance_cases():
    tree = verify_tree(4, 3, 2, "cpu")
    runner_ups = [[[20, 21], [22, 23], [24, 25], [26, 27]]]
    tokens = _tokens(tree, [9], [[10, 11, 12, 13]], runner_ups)
    assert tokens[0].tolist() == [9, 10, 11, 12, 13, 20, 11, 21, 11, 22, 12, 23, 12]

    def accept(targets):
        path, length, emitted = tree.accept_greedy(tokens, torch.tensor([targets]))
        n = int(length[0])
        return path[0, :n].tolist(), emitted[0, :n].tolist()

    # The whole chain: 4 drafts and the bonus after the last one.
    assert accept([10, 11, 12, 13, 99] + [0] * 8) == ([0, 1, 2, 3, 4], [10, 11, 12, 13, 99])
    # Slot 1 rejected, its second runner-up (21) is the verifier's token, and the continuation 11 follows it.
    # (After sibling (1, 2), node 7, the verifier wants d_2 = 11; after its continuation, node 8, it says 55.)
    assert accept([21, 0, 0, 0, 0, 0, 0, 11, 55, 0, 0, 0, 0]) == ([0, 7, 8], [21, 11, 55])
    # Slot 2 rejected; runner-up 22 matches but the continuation 12 does not: correction after the sibling.
    targets = [10, 22, 0, 0, 0, 0, 0, 0, 0, 77, 0, 0, 0]
    assert accept(targets) == ([0, 1, 9], [10, 22, 77])
    # Slot 3 rejected: it does not branch, so the chain's correction.
    assert accept([10, 11, 40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) == ([0, 1, 2], [10, 11, 40])
    # Slot 1 rejected and no runner-up matches.
    assert accept([30] + [0] * 12) == ([0], [30])


def test_rows_of_a_batch_take_different_paths():
    tree = verify_tree(2, 2, 2, "cpu")  # chain 0,1,2; sibling(1) 3 + continuation 4; sibling(2) 5
    tokens = _tokens(tree, [9, 9, 9], [[10, 11]] * 3, [[[20], [21]]] * 3)
    targets = torch.tensor([
        [10, 11, 50, 0, 0, 0],  # the chain and a bonus
        [20, 0, 0, 11, 60, 0],  # sibling of slot 1 and its continuation
        [10, 21, 0, 0, 0, 70],  # sibling of slot 2 (the last slot: no continuation)
    ])
    path, length, emitted = tree.accept_greedy(tokens, targets)
    assert length.tolist() == [3, 3, 3]
    assert path.tolist() == [[0, 1, 2], [0, 3, 4], [0, 1, 5]]
    assert emitted.tolist() == [[10, 11, 50], [20, 11, 60], [10, 21, 70]]


# -------------------------------------------------------------------------------------------- cache keep
@pytest.mark.parametrize("static", [False, True])
def test_keep_chunk_entries_per_row(static):
    from conftest import tiny_model

    config = tiny_model(0).config
    if static:
        cache = StaticCache(config=config, max_cache_len=16)
    else:
        cache = DynamicCache(config=config)
    heads, dim = config.num_key_value_heads, config.head_dim
    keys = torch.randn(2, heads, 9, dim)
    values = torch.randn(2, heads, 9, dim)
    for layer in range(config.num_hidden_layers):
        cache.update(keys[:, :, :5], values[:, :, :5], layer, {"cache_position": torch.arange(5)})
        cache.update(keys[:, :, 5:], values[:, :, 5:], layer, {"cache_position": torch.arange(5, 9)})
    keep = torch.tensor([[0, 2, 3], [1, 1, 3]])  # chunk entries (of the last 4) per row
    keep_chunk_entries(cache, 4, keep)
    assert cache.get_seq_length() == 8
    for layer in cache.layers:
        for b in range(2):
            expected = torch.cat([keys[b, :, :5], keys[b, :, 5 + keep[b]]], dim=1)
            assert torch.equal(layer.keys[b, :, :8], expected)
            assert torch.equal(layer.values[b, :, :8], torch.cat([values[b, :, :5], values[b, :, 5 + keep[b]]], 1))


# ---------------------------------------------------------------------------------------- lossless, end to end
@st.composite
def tree_cases(draw):
    batch = draw(st.sampled_from([1, 1, 2, 3, 5]))
    return dict(
        model_index=draw(st.integers(0, len(_POOL_SPECS) - 1)),
        lengths=draw(st.lists(st.integers(1, 9), min_size=batch, max_size=batch)),
        extra_pad=draw(st.sampled_from([0, 0, 2])),
        prompt_seed=draw(st.integers(0, 2**20)),
        block_size=draw(st.sampled_from([2, 3, 4, 5, 8, 11])),
        threshold=draw(st.sampled_from([None, None, 0.5])),
        width=draw(st.sampled_from([2, 3, 4])),
        slots=draw(st.sampled_from([1, 2, 3, 6])),
        max_new=draw(st.sampled_from([1, 2, 5, 9, 16, 23])),
        eos=draw(st.sampled_from(["none", "none", "config"])),
    )


@settings(max_examples=120, **_HYPOTHESIS)
@given(case=tree_cases())
def test_tree_equals_greedy_ar(case):
    model = pool()[case["model_index"]]
    ids, mask = random_batch(case["prompt_seed"], case["lengths"], model.config.vocab_size, case["extra_pad"])
    eos = model.config.eos_token_id if case["eos"] == "config" else None
    assert_lossless(model, ids, mask, "linear_spec", case["max_new"], case["block_size"], case["threshold"], eos,
                    spec_only=dict(tree_width=case["width"], tree_slots=case["slots"]))


@pytest.mark.parametrize("processors", [dict(repetition_penalty=1.7), dict(no_repeat_ngram_size=2),
                                        dict(min_new_tokens=5, suppress_tokens=[4, 5])])
def test_tree_with_processors_that_read_the_prefix(processors):
    """Each node's processors see its own path: prefix-dependent processors still give AR's tokens."""
    model = pool()[7]
    ids, mask = random_batch(3, [5, 8, 2], model.config.vocab_size)
    assert_lossless(model, ids, mask, "linear_spec", 24, 6, eos=model.config.eos_token_id, check=False,
                    spec_only=dict(tree_width=3, tree_slots=3), **processors)


@pytest.mark.parametrize("block_size,width,slots", [(5, 3, 3), (3, 12, 2), (2, 9, 1)])
def test_tree_with_a_static_cache(block_size, width, slots):
    """A static cache has room for the widest tree (its siblings are written before the path is kept)."""
    model = pool()[6]
    ids, mask = random_batch(9, [4, 7], model.config.vocab_size)
    assert_lossless(model, ids, mask, "linear_spec", 20, block_size, eos=None, check=False,
                    spec_only=dict(tree_width=width, tree_slots=slots), cache_implementation="static")


def test_tree_accepts_more_per_cycle_on_chain_models():
    """Same drafts, more candidates: over the chain models the tree needs no more forwards than the chain, and
    strictly fewer in total (a rejected slot's runner-up is often the verifier's token there)."""
    ids, mask = random_batch(11, [4, 6, 2, 7, 5, 3], 32)
    chain_forwards = tree_forwards = 0
    for seed, eps in [(1, 0.0), (5, 0.06), (7, 0.06), (4, 0.1)]:
        model, _, _ = chain_model(seed, vocab=32, eps=eps)
        chain, _ = assert_lossless(model, ids, mask, "linear_spec", 40, 6, eos=None)
        tree, _ = assert_lossless(model, ids, mask, "linear_spec", 40, 6, eos=None,
                                  spec_only=dict(tree_width=4, tree_slots=5))
        chain_forwards += int(chain.num_forwards.sum())
        tree_forwards += int(tree.num_forwards.sum())
        assert max(a for row in cycles_of(tree) for a in row) <= 6
    assert tree_forwards < chain_forwards, (tree_forwards, chain_forwards)


def test_sampling_verifies_the_chain_with_a_warning():
    model = pool()[7]
    ids, mask = random_batch(4, [5, 3], model.config.vocab_size)
    kwargs = dict(max_new_tokens=16, block_size=5, do_sample=True, temperature=0.8, eos_token_id=None)
    torch.manual_seed(0)
    chain = generate(model, ids, mask, "linear_spec", **kwargs)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"`tree_width`=3 is ignored with do_sample=True"):
        tree = generate(model, ids, mask, "linear_spec", tree_width=3, **kwargs)
    assert torch.equal(chain.sequences, tree.sequences)


@pytest.mark.parametrize("field,value,allowed", [
    ("tree_width", 0, "an int >= 1, or None"), ("tree_width", "2", "an int >= 1, or None"),
    ("tree_width", 2.0, "an int >= 1, or None"), ("tree_slots", 0, "an int >= 1"), ("tree_slots", None, "an int >= 1"),
])
def test_bad_tree_fields_are_named(field, value, allowed):
    model = pool()[0]
    ids, mask = random_batch(1, [3], model.config.vocab_size)
    with pytest.raises(ValueError, match=rf"`{field}`={value!r} is invalid for decode_mode='linear_spec'; allowed: "
                                         rf"{allowed}"):
        generate(model, ids, mask, "linear_spec", max_new_tokens=4, **{field: value})


def test_tree_wider_than_the_vocabulary_is_refused():
    model = pool()[0]  # vocabulary of 16
    ids, mask = random_batch(1, [3], model.config.vocab_size)
    with pytest.raises(ValueError, match=r"`tree_width`=16 is invalid for decode_mode='linear_spec'; allowed: an int "
                                         r"below the vocabulary size \(16\)"):
        generate(model, ids, mask, "linear_spec", max_new_tokens=4, tree_width=16)
    generate(model, ids, mask, "linear_spec", max_new_tokens=4, tree_width=15)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "quadratic_spec"])
def test_tree_width_in_another_mode_warns(mode):
    model = pool()[0]
    ids, mask = random_batch(1, [3], model.config.vocab_size)
    with pytest.warns(UserWarning, match=rf"`tree_width`=2 does not apply to decode_mode='{mode}'"):
        generate(model, ids, mask, mode, max_new_tokens=3, tree_width=2)


# ------------------------------------------------------------------------------- teacher-forced measurement
@pytest.mark.parametrize("width,slots", [(1, 3), (2, 1), (3, 3), (4, 8)])
def test_teacher_forced_tree_acceptance_matches_the_decoder(width, slots):
    """`training.tree_accepted` (the held-out tree metric) counts what `VerifyTree.accept_greedy` accepts when the
    verifier's token at slot j has rank ranks[j] among the drafter's candidates there."""
    from nemotron_diffusion.training import tree_accepted

    generator = torch.Generator().manual_seed(width * 10 + slots)
    d = 6
    ranks = torch.tensor([0, 0, 1, 2, 5, 9])[torch.randint(0, 6, (300, d), generator=generator)]
    ranks[:40] = 0  # full acceptances too
    expected = tree_accepted(ranks, width, slots)
    if width == 1:
        assert torch.equal(expected, (ranks == 0).long().cumprod(1).sum(1))
        return
    tree = verify_tree(d, width, slots, "cpu")
    drafts = 100 + torch.arange(d).expand(len(ranks), -1)
    runner_ups = 200 + 10 * torch.arange(d)[None, :, None] + torch.arange(width - 1)[None, None, :]
    runner_ups = runner_ups.expand(len(ranks), -1, -1)
    # The verifier's greedy token at slot j: the draft (rank 0), a runner-up (rank < width) or something else.
    greedy = torch.where(ranks == 0, drafts, 999)
    for r in range(1, width):
        greedy = torch.where(ranks == r, runner_ups[..., r - 1], greedy)
    greedy = torch.cat([greedy, torch.full((len(ranks), 2), 777)], dim=1)  # after the last slot: the bonus
    tokens = tree.tokens(torch.full((len(ranks),), 9), drafts, runner_ups)
    targets = torch.zeros_like(tokens)
    depth = tree.depth
    for node in range(tree.size):  # on the verifier's path, the token after a node at depth k is greedy[k]
        targets[:, node] = greedy[:, depth[node]]
    _, length, _ = tree.accept_greedy(tokens, targets)
    assert torch.equal(length - 1, expected)
    assert (expected >= (ranks == 0).long().cumprod(1).sum(1)).all()


def test_a_saved_default_for_another_mode_does_not_warn():
    """A model whose saved generation config sets a LinearSpec field (here `tree_width`) generates in other modes
    without a warning: the call did not set it. Passing it in the call still warns."""
    import warnings

    model = pool()[0]
    ids, mask = random_batch(2, [3], model.config.vocab_size)
    model.generation_config.tree_width = 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            generate(model, ids, mask, "quadratic_spec", max_new_tokens=3)
            generate(model, ids, mask, "ar", max_new_tokens=3)
        with pytest.warns(UserWarning, match=r"`tree_width`=3 does not apply to decode_mode='ar'"):
            generate(model, ids, mask, "ar", max_new_tokens=3, tree_width=3)
    finally:
        del model.generation_config.tree_width
