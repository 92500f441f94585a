"""Speculative *sampling* is exact: LinearSpec and QuadraticSpec at temperature > 0 sample from AR's distribution.

* Unit tests of the acceptance rule (`speculative_accept`, rule R with a recorded q) on synthetic p and q.
* End to end: the joint distribution of the first generated tokens of a tiny fp32 model, enumerated exactly with
  full causal forwards, against a few thousand speculative samples (one batched `generate` of identical prompts),
  with a chi-square test. Models: a random one whose drafts differ from AR (the rejection/residual path matters) and
  a near-i.i.d. one whose drafts are usually accepted.

Seeds are fixed, so every test is deterministic; the p-value threshold is 0.01.
"""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import tiny_model
from nemotron_diffusion.sampling_nemotron_diffusion import left_to_right_commits, speculative_accept


P_MIN = 0.01


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for this module


def chi_square(observed: Counter, exact: dict, label=""):
    """Chi-square goodness of fit of the observed outcome counts to the exact probabilities. Outcomes of exact
    probability 0 must never be observed; cells expected below 5 are pooled. Returns (p-value, total variation)."""
    n = sum(observed.values())
    impossible = {k: v for k, v in observed.items() if exact.get(k, 0.0) <= 1e-12}
    assert not impossible, f"{label}: outcomes of probability 0 were sampled: {impossible}"
    keys = sorted(exact, key=lambda k: -exact[k])
    expected = np.array([exact[k] for k in keys], dtype=np.float64) * n
    counts = np.array([observed.get(k, 0) for k in keys], dtype=np.float64)
    big = expected >= 5
    exp_cells, obs_cells = list(expected[big]), list(counts[big])
    rest_exp, rest_obs = expected[~big].sum(), counts[~big].sum()
    if rest_exp >= 5 or not exp_cells:
        exp_cells.append(rest_exp)
        obs_cells.append(rest_obs)
    elif exp_cells:
        exp_cells[-1] += rest_exp
        obs_cells[-1] += rest_obs
    exp_cells = np.array(exp_cells)
    exp_cells *= np.sum(obs_cells) / exp_cells.sum()
    assert len(exp_cells) >= 2, f"{label}: degenerate test"
    p_value = stats.chisquare(obs_cells, exp_cells).pvalue
    tv = 0.5 * sum(abs(observed.get(k, 0) / n - exact.get(k, 0.0)) for k in set(exact) | set(observed))
    return p_value, tv


def assert_same_distribution(observed: Counter, exact: dict, label=""):
    p_value, tv = chi_square(observed, exact, label)
    assert p_value > P_MIN, f"{label}: chi-square p = {p_value:.2e}, TV = {tv:.3f}, n = {sum(observed.values())}"


# ------------------------------------------------------------------------------------------ 1. the acceptance rule
N_UNIT = 20000


def _dist(values):
    t = torch.tensor(values, dtype=torch.float64)
    return (t / t.sum()).float()


def run_rule(p, q=None, draft=None, seed=0):
    """p: [K+1, V] targets, q: [K, V] drafter distributions (drafts sampled from it) or None with fixed `draft` [K]
    (deterministic drafts). Vectorised over N_UNIT rows. Returns (draft [N, K], accepted [N], emitted [N, K+1])."""
    torch.manual_seed(seed)
    k = p.shape[0] - 1
    scores = torch.log(p)[None].expand(N_UNIT, -1, -1).clone()  # log 0 = -inf: softmax gives p back
    if q is not None:
        draft = torch.stack([torch.multinomial(q[j], N_UNIT, replacement=True) for j in range(k)], dim=1) if k else (
            torch.empty(N_UNIT, 0, dtype=torch.long)
        )
        q_rows = q[None].expand(N_UNIT, -1, -1).clone()
    else:
        draft = torch.as_tensor(draft, dtype=torch.long)[None].expand(N_UNIT, -1).clone()
        q_rows = None
    draft_before = draft.clone()
    accepted, emitted = speculative_accept(draft, scores, q_rows, True)
    assert torch.equal(draft, draft_before), "the drafts must not be modified"
    assert accepted.shape == (N_UNIT,) and emitted.shape == (N_UNIT, k + 1)
    assert ((accepted >= 0) & (accepted <= k)).all()
    # The emitted prefix is the accepted drafts.
    for j in range(k):
        rows = accepted > j
        assert torch.equal(emitted[rows, j], draft[rows, j])
    return draft, accepted, emitted


def assert_emitted_follow_p(p, accepted, emitted, label):
    """Token j is emitted by this cycle iff accepted >= j; given that, it must be distributed as p_j."""
    for j in range(p.shape[0]):
        rows = accepted >= j
        if int(rows.sum()) < 200:
            continue
        observed = Counter(emitted[rows, j].tolist())
        exact = {t: float(p[j, t]) for t in range(p.shape[1]) if p[j, t] > 0}
        assert_same_distribution(observed, exact, f"{label} position {j}")


def assert_acceptance_rate(successes, trials, probability, label):
    result = stats.binomtest(int(successes), int(trials), float(probability))
    assert result.pvalue > P_MIN, f"{label}: {successes}/{trials} accepted, expected rate {probability:.4f}"


def test_rule_r_general_overlap():
    p = torch.stack([_dist([5, 1, 0, 3, 1]), _dist([1, 1, 1, 1, 6]), _dist([2, 0, 2, 3, 3]), _dist([1, 2, 3, 4, 5])])
    q = torch.stack([_dist([1, 4, 2, 1, 2]), _dist([0, 1, 1, 1, 7]), _dist([3, 3, 0, 2, 2])])
    draft, accepted, emitted = run_rule(p, q, seed=1)
    assert_emitted_follow_p(p, accepted, emitted, "overlap")
    # Rule R accepts d_1 with probability sum_x min(p, q) = 1 - TV (rule M would give sum_x p q).
    assert_acceptance_rate((accepted >= 1).sum(), N_UNIT, torch.minimum(p[0], q[0]).sum(), "first draft")
    second = accepted >= 1
    assert_acceptance_rate((accepted >= 2).sum(), second.sum(), torch.minimum(p[1], q[1]).sum(), "second draft")


def test_rule_r_disjoint_supports_always_rejects_and_samples_p():
    p = torch.stack([_dist([0, 0, 2, 1, 1]), _dist([1, 1, 1, 1, 1]), _dist([1, 0, 0, 0, 1])])
    q = torch.stack([_dist([3, 1, 0, 0, 0]), _dist([0, 1, 0, 0, 0])])
    draft, accepted, emitted = run_rule(p, q, seed=2)
    assert (accepted == 0).all()
    assert_emitted_follow_p(p, accepted, emitted, "disjoint")


def test_rule_r_p_equal_q_always_accepts():
    p = torch.stack([_dist([1, 2, 3, 4, 0]), _dist([4, 3, 2, 1, 1]), _dist([1, 1, 5, 1, 1]), _dist([2, 1, 0, 1, 2])])
    q = torch.softmax(torch.log(p[:-1]), dim=-1)  # the very distributions the rule computes from the scores
    draft, accepted, emitted = run_rule(p, q, seed=3)
    assert (accepted == 3).all()
    assert_emitted_follow_p(p, accepted, emitted, "p == q")


@pytest.mark.parametrize("draft", [[3, 0], [0, 4], [2, 2]])
def test_rule_r_deterministic_drafts(draft):
    """One-hot q (argmax or threshold-refined drafts): accept d with probability p(d); otherwise sample p without d."""
    p = torch.stack([_dist([1, 2, 3, 4, 0]), _dist([3, 1, 1, 0, 5]), _dist([1, 1, 1, 1, 1])])
    _, accepted, emitted = run_rule(p, draft=draft, seed=4)
    assert_emitted_follow_p(p, accepted, emitted, f"one-hot {draft}")
    assert_acceptance_rate((accepted >= 1).sum(), N_UNIT, p[0, draft[0]], "one-hot first draft")
    if p[0, draft[0]] == 0:
        assert (accepted == 0).all()


def test_rule_r_one_hot_recorded_q():
    """A recorded q that is one-hot behaves like a deterministic draft."""
    p = torch.stack([_dist([1, 2, 3, 4, 0]), _dist([3, 1, 1, 0, 5])])
    q = torch.nn.functional.one_hot(torch.tensor([1]), 5).float()
    _, accepted, emitted = run_rule(p, q, seed=15)
    assert_emitted_follow_p(p, accepted, emitted, "recorded one-hot q")
    assert_acceptance_rate((accepted >= 1).sum(), N_UNIT, p[0, 1], "recorded one-hot q")


def test_rule_r_without_drafts_samples_the_bonus():
    """K = 0 (a LinearSpec block of one slot, e.g. one token of budget left): the bonus is a plain sample of p_0."""
    p = _dist([1, 2, 3, 4, 5])[None]
    _, accepted, emitted = run_rule(p, q=torch.empty(0, 5), seed=6)
    assert (accepted == 0).all()
    assert_emitted_follow_p(p, accepted, emitted, "K = 0")


def test_greedy_rule():
    scores = torch.tensor(
        [
            [[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 3.0]],  # argmax 1, 0, 2
            [[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 3.0]],
            [[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 3.0]],
            [[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 3.0]],
        ]
    )
    draft = torch.tensor([[1, 0], [1, 2], [2, 0], [0, 0]])
    accepted, emitted = speculative_accept(draft, scores, None, False)
    assert accepted.tolist() == [2, 1, 0, 0]
    assert emitted.tolist() == [[1, 0, 2]] * 4
    accepted, emitted = speculative_accept(draft[:, :0], scores[:, :1], None, False)
    assert accepted.tolist() == [0] * 4 and emitted[:, 0].tolist() == [1] * 4


# ---------------------------------------------------------------------------------------------- 2. end to end
PROMPT = [3, 5, 4, 6, 3]
N_E2E = 5000


def rejecting_model(vocab=8):
    """A random model: its bidirectional drafts are far from its causal distribution (many rejections)."""
    return tiny_model(0, std=0.3, vocab_size=vocab, mask_token_id=vocab - 1)


def accepting_model(vocab=8, seed=0, spread=0.3, eps=0.3, head_scale=0.3):
    """A near-i.i.d. model whose drafts are usually accepted: all embeddings share one direction (token-specific
    parts of size `spread`) and attention/MLP outputs are scaled by `eps`, so every slot, mask slots included, sees
    almost the same hidden state; the mask token's logit is pushed down. q ~ p, but p still depends on the prefix."""
    model = tiny_model(seed, std=0.3, vocab_size=vocab, mask_token_id=vocab - 1)
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        base = torch.randn(hidden, generator=generator)
        model.encoder.embed_tokens.weight.copy_(base + spread * torch.randn(vocab, hidden, generator=generator))
        model.diffusion_head.weight.mul_(head_scale)
        model.diffusion_head.weight[vocab - 1] = -0.5 * base / base.norm()
        for layer in model.encoder.layers:
            layer.self_attn.o_proj.weight.mul_(eps)
            layer.mlp.down_proj.weight.mul_(eps)
    return model


def exact_joint(model, prompt, max_new, processors=None, eos=None):
    """Exact AR probabilities of every outcome (the generated tokens, ending at EOS or after max_new tokens), by
    enumerating prefixes with full causal forwards (no cache) and the given logits processors."""
    processors = processors or LogitsProcessorList()
    vocab = model.config.vocab_size
    frontier, result = {(): 1.0}, {}
    for step in range(max_new):
        prefixes = list(frontier)
        ids = torch.tensor([prompt + list(k) for k in prefixes])
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()
        probs = torch.softmax(processors(ids, logits).double(), dim=-1)
        new_frontier = {}
        for i, prefix in enumerate(prefixes):
            for t in range(vocab):
                pr = frontier[prefix] * float(probs[i, t])
                if pr == 0.0:
                    continue
                key = prefix + (t,)
                if t == eos or step == max_new - 1:
                    result[key] = result.get(key, 0.0) + pr
                else:
                    new_frontier[key] = pr
        frontier = new_frontier
    assert abs(sum(result.values()) - 1) < 1e-6
    return result


def sample_outcomes(model, mode, max_new, seed, eos, **kwargs):
    """One generate over N_E2E copies of PROMPT; returns (Counter of outcomes, output)."""
    ids = torch.tensor([PROMPT] * N_E2E)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            decode_mode=mode,
            do_sample=True,
            max_new_tokens=max_new,
            eos_token_id=eos,
            return_dict_in_generate=True,
            **kwargs,
        )
    outcomes = Counter()
    for row in out.sequences[:, len(PROMPT):].tolist():
        row = row[:max_new]
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        outcomes[tuple(row)] += 1
    return outcomes, out


def warpers(temperature=1.0, top_k=0, top_p=1.0):
    """The processors AR sampling builds for these settings, in transformers' order."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


EOS = 2
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0)
PROCESSED = dict(temperature=0.7, top_k=4, top_p=0.9)

E2E_CASES = [
    # (id, model, mode, max_new, generate kwargs, sampling settings)
    ("ar-control", "rejecting", "ar", 3, {}, PLAIN),
    ("ar-control-processed", "rejecting", "ar", 3, {}, PROCESSED),
    ("linear-block2", "rejecting", "linear_spec", 3, dict(block_size=4), PLAIN),
    ("linear-block3", "rejecting", "linear_spec", 4, dict(block_size=3), PLAIN),
    ("linear-threshold", "rejecting", "linear_spec", 4, dict(block_size=4, confidence_threshold=0.5), PLAIN),
    ("linear-processed", "rejecting", "linear_spec", 3, dict(block_size=4), PROCESSED),
    ("linear-threshold-processed", "rejecting", "linear_spec", 4, dict(block_size=4, confidence_threshold=0.7),
     PROCESSED),
    ("quadratic-block3", "rejecting", "quadratic_spec", 3, dict(block_size=3), PLAIN),
    ("quadratic-block4", "rejecting", "quadratic_spec", 4, dict(block_size=4), PLAIN),
    ("quadratic-processed", "rejecting", "quadratic_spec", 3, dict(block_size=3), PROCESSED),
    ("linear-accepting", "accepting", "linear_spec", 4, dict(block_size=4), PLAIN),
    ("linear-threshold-accepting", "accepting", "linear_spec", 4, dict(block_size=4, confidence_threshold=0.4), PLAIN),
    ("quadratic-accepting", "accepting", "quadratic_spec", 4, dict(block_size=4), PLAIN),
]
_MODELS = {}


def get_model(kind):
    if kind not in _MODELS:
        _MODELS[kind] = rejecting_model() if kind == "rejecting" else accepting_model()
    return _MODELS[kind]


@pytest.mark.parametrize(
    "model_kind,mode,max_new,kwargs,sampling", [c[1:] for c in E2E_CASES], ids=[c[0] for c in E2E_CASES]
)
def test_first_tokens_follow_ar_distribution(model_kind, mode, max_new, kwargs, sampling):
    model = get_model(model_kind)
    exact = exact_joint(model, PROMPT, max_new, warpers(**sampling), eos=EOS)
    observed, out = sample_outcomes(model, mode, max_new, seed=1234, eos=EOS, **kwargs, **sampling)
    assert_same_distribution(observed, exact, f"{mode} {kwargs} {sampling}")
    if mode == "ar":
        return
    lengths = out.acceptance_lengths
    assert lengths is not None
    cycles = (lengths > 0).sum(dim=1)
    if model_kind == "accepting":
        # Drafts are usually accepted: the first cycle mostly emits more than one token.
        assert (lengths[:, 0] > 1).float().mean() > 0.5
    else:
        assert (lengths[:, 0] == 1).float().mean() > 0.2, "the rejection path must be exercised"
        assert (lengths[:, 0] > 1).float().mean() > 0.05, "and so must acceptance"
    if kwargs.get("confidence_threshold") is not None:
        # Several draft forwards in some cycles (multi-step drafting really happened).
        assert (out.num_forwards > 1 + 2 * cycles).float().mean() > 0.1


@pytest.mark.parametrize(
    "mode,kwargs",
    [("linear_spec", dict(block_size=4)), ("linear_spec", dict(block_size=4, confidence_threshold=0.5)),
     ("quadratic_spec", dict(block_size=3))],
    ids=["linear", "linear-threshold", "quadratic"],
)
def test_prefix_dependent_processor_under_sampling(mode, kwargs):
    """A repetition penalty reads the prefix: targets and drafts are processed per position with the exact prefix
    (drafts drawn left to right), and the samples still follow AR sampling with the same penalty."""
    model = get_model("rejecting")
    n = 2000
    exact = exact_joint(model, PROMPT, 3, LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8)]), eos=EOS)
    ids = torch.tensor([PROMPT] * n)
    torch.manual_seed(4321)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), decode_mode=mode, do_sample=True, top_k=0,
                             repetition_penalty=1.8, max_new_tokens=3, eos_token_id=EOS, return_dict_in_generate=True,
                             **kwargs)
    observed = Counter()
    for row in out.sequences[:, len(PROMPT):].tolist():
        observed[tuple(row[: row.index(EOS) + 1] if EOS in row else row)] += 1
    assert_same_distribution(observed, exact, f"{mode} {kwargs} repetition penalty")


@pytest.mark.parametrize(
    "mode,kwargs",
    [("linear_spec", dict(block_size=4)), ("quadratic_spec", dict(block_size=3))],
    ids=["linear", "quadratic"],
)
def test_left_padded_mixed_batch_under_sampling(mode, kwargs):
    """Rows of different prompts and left padding in one batch (ragged acceptance, holes in the cache): each half
    follows its own prompt's AR distribution."""
    model = get_model("rejecting")
    long_prompt = [4, 6] + PROMPT
    n = 2 * 1500
    ids = torch.tensor([[0, 0] + PROMPT if i % 2 == 0 else long_prompt for i in range(n)])
    mask = torch.ones_like(ids)
    mask[0::2, :2] = 0
    torch.manual_seed(2024)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, decode_mode=mode, do_sample=True, top_k=0, max_new_tokens=3,
                             eos_token_id=EOS, return_dict_in_generate=True, **kwargs)
    for parity, prompt in ((0, PROMPT), (1, long_prompt)):
        observed = Counter()
        for row in out.sequences[parity::2, ids.shape[1]:].tolist():
            observed[tuple(row[: row.index(EOS) + 1] if EOS in row else row)] += 1
        assert_same_distribution(observed, exact_joint(model, prompt, 3, eos=EOS), f"{mode} prompt {prompt}")


def draft_distribution(model, prompt, seed_token, block, processors=None):
    """q of the first draft slot of a LinearSpec cycle: bidirectional forward over [seed, masks] on top of the
    causal prompt cache, mask token excluded, processors applied."""
    from transformers import DynamicCache

    mask_id = model.config.mask_token_id
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([prompt]), cache=cache, use_cache=True)
        block_ids = torch.tensor([[seed_token] + [mask_id] * (block - 1)])
        out = model(block_ids, cache=cache, use_cache=True, is_causal=False, update_cache=False)
        logits = out.logits[0, 1].float()
    logits[mask_id] = -float("inf")
    if processors:
        logits = processors(block_ids, logits[None])[0]
    return torch.softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("model_kind", ["rejecting", "accepting"])
def test_linear_spec_acceptance_rate_is_rule_r(model_kind):
    """The first draft of the first cycle is accepted with probability sum_x min(p, q) given the seed (rule R), not
    sum_x p q (exact match with an independent verifier sample)."""
    model = get_model(model_kind)
    block = 2  # max_new_tokens = 3: the first cycle has one draft slot
    with torch.no_grad():
        p_seed = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].double(), -1)
    expected_r = expected_m = 0.0
    for s in range(model.config.vocab_size):
        if s == EOS:
            continue
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([PROMPT + [s]])).logits[0, -1].double(), -1)
        q = draft_distribution(model, PROMPT, s, block)
        # An accepted EOS ends the row: that cycle emits one token.
        not_eos = torch.arange(len(p)) != EOS
        expected_r += float(p_seed[s] * torch.minimum(p, q)[not_eos].sum())
        expected_m += float(p_seed[s] * (p * q)[not_eos].sum())
    _, out = sample_outcomes(model, "linear_spec", 3, seed=99, eos=EOS, block_size=4, top_k=0)
    first = out.acceptance_lengths[:, 0]
    assert abs(expected_r - expected_m) > 0.05, "the test needs rule R and rule M to differ"
    assert_acceptance_rate((first == 2).sum(), N_E2E, expected_r, f"{model_kind} first-cycle acceptance")


def test_left_to_right_commit_rule():
    """Sampled multi-step drafting commits the leftmost masked slot plus the masked slots right after it, without a
    gap, whose drafter distribution peaks at >= threshold: it reads distributions only, never sampled values."""
    masked = torch.tensor(
        [[True, True, True, True], [False, True, True, True], [False, False, True, True], [True, True, True, True]]
    )
    max_prob = torch.tensor([[0.9, 0.2, 0.95, 0.99], [0.0, 0.1, 0.8, 0.2], [0.0, 0.0, 0.1, 0.9], [0.1, 0.6, 0.7, 0.8]])
    commit = left_to_right_commits(max_prob, masked, 0.5)
    assert commit.tolist() == [
        [True, False, False, False],
        [False, True, True, False],
        [False, False, True, True],
        [True, True, True, True],
    ]


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_sampled_threshold_drafting_fills_slots_left_to_right(threshold):
    """Every draft forward of sampled threshold drafting sees committed drafts as a prefix of the block (slot 0 is
    the seed), so each draft is drawn given only tokens to its left, as rule R needs."""
    model = get_model("rejecting")
    mask_id = model.config.mask_token_id
    seen = []

    def hook(module, args, kwargs):
        if not kwargs.get("is_causal", True) and kwargs.get("mask_function") is None:
            seen.append(kwargs["input_ids"].clone())

    handle = model.encoder.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.tensor([PROMPT] * 64)
    torch.manual_seed(5)
    try:
        with torch.no_grad():
            model.generate(ids, decode_mode="linear_spec", do_sample=True, max_new_tokens=13, block_size=6,
                           confidence_threshold=threshold, eos_token_id=None, top_k=0)
    finally:
        handle.remove()
    partial = 0
    for block in seen:
        filled = block[:, 1:] != mask_id
        prefix = filled.long().cumprod(dim=1).bool()
        assert torch.equal(filled, prefix), block
        partial += int((filled.any(dim=1) & ~filled.all(dim=1)).sum())
    assert partial > 10, "multi-step drafting with partly filled blocks must occur"


def test_sampling_is_reproducible_with_a_seed():
    model = get_model("rejecting")
    ids = torch.tensor([PROMPT] * 8)
    outs = []
    for _ in range(2):
        for mode in ("linear_spec", "quadratic_spec"):
            torch.manual_seed(7)
            with torch.no_grad():
                outs.append(model.generate(ids, decode_mode=mode, do_sample=True, max_new_tokens=12, block_size=4))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
