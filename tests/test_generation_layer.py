"""The generation layer's contracts: its GenerationConfig class, the thinking budget on every AR path, adapters the
user attached, forward counts on every stop, the batch index seen by prefix constraints, serialised concurrent
calls, and the drafter at QuadraticSpec's mask slots / in diffusion's denoising forwards (`drafter_modes`)."""

import json
import threading

import peft
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from conftest import left_pad, random_prompt, tiny_model
from nemotron_diffusion import NemotronDiffusionGenerationConfig

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def _lora(model, name, seed, targets=("o_proj", "v_proj")):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets),
                             init_lora_weights=False)
    peft.inject_adapter_in_model(config, model, adapter_name=name)
    return model


def _greedy_by_hand(model, ids, steps):
    """Greedy decoding with plain forwards of the model as it is (adapters as the user set them)."""
    sequence = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


# ------------------------------------------------------------------------------------------ the config class
def test_models_carry_our_generation_config_class(tmp_path):
    model = tiny_model()
    assert type(model.generation_config) is NemotronDiffusionGenerationConfig
    model.save_pretrained(tmp_path / "m", model_card=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded.generation_config) is NemotronDiffusionGenerationConfig
    # NVIDIA's generation_config.json has only eos_token_id: same class, the fields unset, defaults per mode
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    nvidia_like = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(nvidia_like.generation_config) is NemotronDiffusionGenerationConfig
    assert "decode_mode" not in vars(nvidia_like.generation_config)
    assert nvidia_like.generation_config.do_sample is False


def test_config_field_errors_name_the_field():
    with pytest.raises(ValueError, match=r"`block_size`=0 is invalid for decode_mode='diffusion'"):
        NemotronDiffusionGenerationConfig(decode_mode="diffusion", block_size=0)
    with pytest.raises(ValueError, match="`decode_mode`='fast'"):
        NemotronDiffusionGenerationConfig(decode_mode="fast")
    with pytest.raises(ValueError, match="drafter_modes"):
        NemotronDiffusionGenerationConfig(drafter_modes=["ar"])
    with pytest.raises(ValueError, match="drafter_modes"):
        NemotronDiffusionGenerationConfig(drafter_modes="diffusion")


def test_our_config_passed_to_generate_equals_kwargs():
    model = tiny_model()
    ids = random_prompt(3, 6)
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    by_kwargs = model.generate(ids, decode_mode="diffusion", block_size=4, confidence_threshold=0.5, **kwargs)
    config = NemotronDiffusionGenerationConfig(decode_mode="diffusion", block_size=4, confidence_threshold=0.5,
                                               **kwargs)
    before = config.to_dict()
    assert torch.equal(model.generate(ids, generation_config=config), by_kwargs)
    assert config.to_dict() == before  # the passed config is not modified


def test_drafter_modes_is_saved_and_reloaded(tmp_path):
    model = tiny_model()
    model.generation_config.drafter_modes = ["linear_spec", "diffusion"]
    model.save_pretrained(tmp_path / "m", model_card=False)
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert saved["drafter_modes"] == ["linear_spec", "diffusion"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").generation_config.drafter_modes == [
        "linear_spec", "diffusion"]
    fresh = tiny_model()
    fresh.save_pretrained(tmp_path / "n", model_card=False)
    assert json.loads((tmp_path / "n" / "generation_config.json").read_text())["drafter_modes"] == ["linear_spec"]


# ------------------------------------------------------------------------------- the thinking budget in AR
@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}, {"prompt_lookup_num_tokens": 2}, {"do_sample": True}])
def test_thinking_budget_holds_on_every_ar_path(extra):
    model = tiny_model()
    ids = torch.tensor([[5, 17, 42, 5, 17, 42, 5]])
    end, budget = 9, 3
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=8, eos_token_id=None, max_thinking_tokens=budget,
                         end_think_token_id=end, **{"do_sample": False, **extra})
    new = out[0, ids.shape[1]:].tolist()
    assert new[budget] == end or end in new[:budget], new
    plain = model.generate(ids, max_new_tokens=8, eos_token_id=None, **{"do_sample": False, **extra})
    if extra.get("do_sample") is None:
        assert plain[0, ids.shape[1] + budget] != end  # the processor, not the model, put it there


# --------------------------------------------------------------------------------------- the user's adapters
def test_a_task_lora_is_used_by_generate_in_every_mode():
    base = tiny_model()
    model = _lora(tiny_model(), "task", seed=1)
    ids = random_prompt(4, 6)
    expected = _greedy_by_hand(model, ids, 6)
    assert not torch.equal(expected, _greedy_by_hand(base, ids, 6))  # the adapter changes the tokens
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, block_size=3)
    for mode in ("ar", "linear_spec", "quadratic_spec"):
        out = model.generate(ids, decode_mode=mode, drafter_adapter=False, **kwargs)
        assert torch.equal(out, expected), mode
    # Without saying so, every attached adapter is taken for the drafter (NVIDIA's LoRA attached alone): the
    # causal forwards then run the base weights, and generate() warns about it.
    assert torch.equal(model.generate(ids, **kwargs), _greedy_by_hand(base, ids, 6))


def test_a_named_drafter_leaves_other_adapters_active():
    model = _lora(_lora(tiny_model(), "task", seed=1), "drafter", seed=2, targets=("o_proj",))
    for layer in (m for m in model.modules() if hasattr(m, "_active_adapter")):
        layer.set_adapter(["task"])  # the user's choice: only the task adapter active
    ids = random_prompt(5, 6)
    expected = _greedy_by_hand(model, ids, 8)
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, block_size=4, drafter_adapter="drafter")
    for mode in ("ar", "linear_spec", "quadratic_spec"):
        drafter_modes = ["linear_spec", "quadratic_spec"]
        out = model.generate(ids, decode_mode=mode, drafter_modes=drafter_modes, **kwargs)
        assert torch.equal(out, expected), mode
    assert all(layer.active_adapters == ["task"] for layer in model.modules() if hasattr(layer, "_active_adapter"))


# -------------------------------------------------------------------------------------------- forward counts
class _StopAfter(StoppingCriteria):
    """Stops row 0 once it has `n` new tokens (a custom criterion, not EOS)."""

    def __init__(self, prompt_length, n):
        self.prompt_length, self.n = prompt_length, n

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[0] = input_ids.shape[1] - self.prompt_length >= self.n
        return done


def test_ar_num_forwards_stop_at_custom_criteria():
    model = tiny_model()
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10, 11, 12]])
    criteria = StoppingCriteriaList([_StopAfter(ids.shape[1], 3)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=None,
                         stopping_criteria=criteria, return_dict_in_generate=True)
    assert out.num_forwards.tolist() == [3, 7]


# -------------------------------------------------------------------------- prefix constraints see their row
@pytest.mark.parametrize("mode", MODES)
def test_prefix_allowed_tokens_fn_sees_the_real_batch_index(mode):
    model = tiny_model()
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11]])
    allowed = {0: [20, 21], 1: [30, 31]}
    seen = set()

    def prefix_allowed_tokens_fn(batch_id, sentence):
        seen.add(batch_id)
        return allowed[batch_id]

    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         decode_mode=mode, block_size=3, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)
    assert seen == {0, 1}
    for row in (0, 1):
        assert set(out[row, ids.shape[1]:].tolist()) <= set(allowed[row]), (mode, row)


# ------------------------------------------------------------------------------------- concurrent generation
def test_concurrent_calls_in_different_modes_equal_their_solo_outputs():
    model = tiny_model()
    ids = random_prompt(6, 5)
    settings = [dict(decode_mode=m, block_size=4) for m in MODES] * 2
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)
    solo = [model.generate(ids, **kwargs, **s) for s in settings]
    results, errors = [None] * len(settings), []

    def run(i):
        try:
            results[i] = model.generate(ids, **kwargs, **settings[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, s in enumerate(settings):
        assert torch.equal(results[i], solo[i]), s


# ------------------------------------------------------------------ the drafter in QuadraticSpec / diffusion
def _drafter_model():
    return _lora(tiny_model(), "drafter", seed=3, targets=("o_proj", "v_proj", "k_proj", "q_proj"))


@pytest.mark.parametrize("rows", [[[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10, 11]]])
def test_quadratic_spec_with_the_drafter_at_mask_slots_stays_lossless(rows):
    model = _drafter_model()
    ids, mask = left_pad(rows)
    base = tiny_model()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, block_size=3,
                  return_dict_in_generate=True, drafter_adapter="drafter")
    ar = base.generate(ids, **{k: v for k, v in kwargs.items() if k != "drafter_adapter"}, decode_mode="ar")
    from nemotron_diffusion.drafting_nemotron_diffusion import GatedDraftLoRALinear

    lora_calls = []  # per call of the drafter's LoRA terms: whether they were on at some position
    lora_a = next(m for m in model.modules() if hasattr(m, "lora_A")).lora_A["drafter"]

    def record(module, args, output):
        if module is lora_a:  # PEFT's layer
            lora_calls.append(bool(output.abs().sum() > 0))
        elif isinstance(module, GatedDraftLoRALinear) and "drafter" in module.adapter_names:  # our gated layer
            lora_calls.append(module.gate is not None and bool(module.gate.any()))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with_drafter = model.generate(ids, decode_mode="quadratic_spec", drafter_modes=["quadratic_spec"], **kwargs)
        calls_with = list(lora_calls)
        lora_calls.clear()
        without = model.generate(ids, decode_mode="quadratic_spec", drafter_modes=[], **kwargs)
    finally:
        handle.remove()
    assert torch.equal(with_drafter.sequences, ar.sequences)  # the random model emits the mask id as AR does
    assert torch.equal(without.sequences, ar.sequences)
    assert calls_with and all(calls_with)  # the drafter ran in every QuadraticSpec forward
    assert not lora_calls  # and in none without drafter_modes


def test_quadratic_spec_refuses_a_drafter_it_cannot_limit_to_mask_slots():
    model = tiny_model()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["o_proj"], use_dora=True, init_lora_weights=False)
    peft.inject_adapter_in_model(config, model, adapter_name="drafter")
    with pytest.raises(ValueError, match="drafter_modes"):
        model.generate(random_prompt(1, 4), max_new_tokens=4, decode_mode="quadratic_spec", block_size=3,
                       drafter_adapter="drafter", drafter_modes=["quadratic_spec"])


def test_diffusion_uses_the_drafter_only_when_it_serves_diffusion():
    model = _drafter_model()
    ids = random_prompt(7, 6)
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, block_size=4, decode_mode="diffusion",
                  confidence_threshold=None, drafter_adapter="drafter")
    base_out = tiny_model().generate(ids, **{k: v for k, v in kwargs.items() if k != "drafter_adapter"})
    assert torch.equal(model.generate(ids, **kwargs), base_out)  # default drafter_modes: LinearSpec only
    with_drafter = model.generate(ids, drafter_modes=["diffusion"], **kwargs)
    assert not torch.equal(with_drafter, base_out)
    # the seeds and the cache come from causal forwards without the drafter: the first block's seed is AR's
    ar = tiny_model().generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None)
    assert with_drafter[0, ids.shape[1]] == ar[0, ids.shape[1]]


def test_passed_plain_generation_config_with_drafter_modes():
    model = _drafter_model()
    ids = random_prompt(8, 6)
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=None, decode_mode="diffusion",
                              block_size=4, drafter_adapter="drafter", drafter_modes=["diffusion"])
    assert torch.equal(model.generate(ids, generation_config=config),
                       model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      decode_mode="diffusion", block_size=4, drafter_adapter="drafter",
                                      drafter_modes=["diffusion"]))


@pytest.mark.parametrize("static", [False, True])
def test_custom_attention_mask_equals_transformers_mask(static):
    """The block loops build their custom-pattern masks (QuadraticSpec's chunk and bootstrap, verify trees) on
    broadcast indices; transformers' builder (vmap over the same function) must give the very same mask, with
    left padding, on dynamic and static caches."""
    from transformers.cache_utils import DynamicCache, StaticCache

    from nemotron_diffusion.generation_nemotron_diffusion import (
        _causal_then_masks_mask_function,
        _chunk_mask_function,
        _quadratic_mask_function,
    )
    from nemotron_diffusion.verify_tree_nemotron_diffusion import verify_tree

    model = tiny_model()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [7, 8, 9]])
    prompt_width = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=40) if static else DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    tree = verify_tree(3, 3, 3, "cpu")
    cases = [
        (12, _quadratic_mask_function(prompt_width, 3, "cpu")),
        (tree.size, _chunk_mask_function(prompt_width, tree.ancestors)),
        (5, _causal_then_masks_mask_function(prompt_width + 2)),
    ]
    for length, function in cases:
        block = torch.full((2, length), 4)
        width = 40 if static else prompt_width + length
        padding = torch.cat([mask, torch.ones(2, width - prompt_width, dtype=mask.dtype)], dim=1)
        padding[1, -1] = 0  # a hole (a static cache's dropped slot) is masked out too
        positions = torch.arange(length)[None].expand(2, -1) + prompt_width
        ours = model._custom_attention_mask(cache, block, padding, positions, function)
        theirs = model.encoder.build_attention_mask(
            torch.empty(2, length, 0), padding, cache, positions, is_causal=False, mask_function=function
        )
        assert ours.dtype == theirs.dtype == torch.bool
        assert torch.equal(ours, theirs.expand_as(ours))
        assert ours[0, 0, 0, : prompt_width].all() and not ours[1, 0, 0, :4].any()  # prefix seen, padding not
