"""Hub-ready folders: save_pretrained writes config (auto_map), generation_config.json (do_sample and the mode
fields), the remote code and a README.md model card whose usage snippets run, offline, where this package cannot be
imported."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import nemotron_diffusion
from nemotron_diffusion.model_card import CARD_MARKER, write_model_card
from conftest import tiny_model
from tiny_tokenizer import save_tiny_folder, word_tokenizer


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
PRELUDE = 'import sys\nsys.modules["nemotron_diffusion"] = None  # the package cannot be imported\n'
# The snippets run as written, except that their lengths (max_new_tokens=256, ...) are cut to this, which keeps the
# test fast on a random tiny model (it rarely stops early) and changes no code path.
NEW_TOKENS = 10


def snippets(card_text):
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


def run_offline(script, cwd, tmp_path):
    """Runs `script` in a fresh interpreter: no network, no `nemotron_diffusion`, an empty HF cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("PYTHONPATH", None)
    path = tmp_path / "card_snippets.py"
    path.write_text(PRELUDE + re.sub(r"max_new_tokens=\d+", f"max_new_tokens={NEW_TOKENS}", script))
    run = subprocess.run(
        [sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, f"snippets failed:\n{run.stderr[-4000:]}"
    assert "custom code" not in run.stdout + run.stderr  # every loader got trust_remote_code=True: no prompt
    return run.stdout


def expected_outputs(folder):
    """What the card's snippets print, computed here with the package's classes."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = word_tokenizer()
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    width = inputs["input_ids"].shape[1]
    settings = {"ar": {}, "diffusion": dict(block_size=32, confidence_threshold=0.9),
                "linear_spec": dict(block_size=32), "quadratic_spec": dict(block_size=16)}
    lines = {}
    with torch.no_grad():
        for mode in MODES:
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, decode_mode=mode, **settings[mode])
            lines[mode] = f"{mode} {tok.decode(out[0, width:], skip_special_tokens=True)}"
    return lines


def test_saved_folder_is_hub_ready(tmp_path):
    folder = save_tiny_folder(tmp_path / "tiny-tri-mode")
    files = set(os.listdir(folder))
    for name in ("config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
                 "configuration_nemotron_diffusion.py", "modeling_nemotron_diffusion.py",
                 "generation_nemotron_diffusion.py", "model_card.py"):
        assert name in files, name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nemotron_diffusion.NemotronDiffusionForCausalLM"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["_from_model_config"] is False
    for field in ("decode_mode", "causal_context", "max_denoising_steps", "commit_order", "defer_adjacent_repeats",
                  "fused_commit_forward", "max_thinking_tokens", "end_think_token_id", "drafter_adapter"):
        assert field in generation, field
    assert "block_size" not in generation  # its default follows the mode: saved only when set

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "unknown"
    assert "nemotron-diffusion" in card.data.tags
    text = card.text
    assert "trust_remote_code=True" in text and 'model_id = "tiny-tri-mode"' in text
    for mode in MODES:
        assert f'decode_mode="{mode}"' in text or mode == "ar"
    assert "get_peft_model" in text and "drafter_adapter=" in text


def test_model_card_snippets_run_offline_without_the_package(tmp_path):
    card_fields = {"base_model": "org/base", "license": "apache-2.0"}
    folder = save_tiny_folder(tmp_path / "tiny-tri-mode", model_card=card_fields)
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/base" and card.data.license == "apache-2.0"
    code = snippets(card.text)
    assert len(code) >= 5  # load, the four modes, streaming, pipeline, drafter
    stdout = run_offline("\n".join(code), cwd=tmp_path, tmp_path=tmp_path)
    printed = stdout.splitlines()
    for mode, line in expected_outputs(folder).items():
        assert line in printed, (mode, line, stdout[-2000:])
    # lossless speculation: the spec modes print the AR text
    expected = expected_outputs(folder)
    assert expected["linear_spec"][len("linear_spec"):] == expected["ar"][len("ar"):]
    assert any(line.startswith("forwards:") for line in printed)


def test_card_with_a_drafter_subfolder_loads_it_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    folder = save_tiny_folder(tmp_path / "with-drafter")
    torch.manual_seed(1)
    model = tiny_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(folder / "linear_spec_lora")
    write_model_card(folder)  # rewrite the card now that the folder has a drafter
    text = (folder / "README.md").read_text()
    assert 'subfolder="linear_spec_lora"' in text and "PeftModel.from_pretrained" in text
    code = snippets(text)
    load = code[0]
    drafter = next(c for c in code if "PeftModel" in c)
    stdout = run_offline(load + "\n" + drafter, cwd=tmp_path, tmp_path=tmp_path)
    ar = expected_outputs(folder)["ar"][len("ar "):]
    assert ar in stdout.splitlines()  # a trained (here: random) drafter changes drafts, never the tokens
    assert "tokens per forward:" in stdout


def test_do_sample_is_saved_even_for_an_assigned_generation_config(tmp_path):
    from transformers import GenerationConfig

    model = tiny_model()
    model.generation_config = GenerationConfig(eos_token_id=2, decode_mode="linear_spec")
    model.save_pretrained(tmp_path / "m", model_card=False)
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["decode_mode"] == "linear_spec" and saved["causal_context"] is True


def test_card_policy(tmp_path):
    folder = tmp_path / "m"
    model = tiny_model()
    model.save_pretrained(folder, model_card=False)
    assert not (folder / "README.md").exists()
    model.save_pretrained(folder)
    assert CARD_MARKER in (folder / "README.md").read_text()
    # a card someone wrote is kept on the next save, unless a card is asked for
    (folder / "README.md").write_text("# my own card\n")
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my own card\n"
    model.save_pretrained(folder, model_card={"license": "mit", "tags": ["demo"]})
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and "demo" in card.data.tags
    with pytest.raises(ValueError, match="licence"):
        model.save_pretrained(folder, model_card={"licence": "mit"})
    with pytest.raises(ValueError, match="model_card"):
        model.save_pretrained(folder, model_card="yes")
    # saving leaves the in-memory generation config as it was
    assert not hasattr(model.generation_config, "decode_mode")


def test_base_model_comes_from_a_hub_id():
    from nemotron_diffusion.model_card import guess_base_model

    assert guess_base_model("nvidia/Nemotron-Labs-Diffusion-8B") == "nvidia/Nemotron-Labs-Diffusion-8B"
    assert guess_base_model("/tmp/some/folder") is None
    assert guess_base_model("") is None


def test_model_card_module_is_remote_code_safe():
    """It is copied next to the weights: only standard-library imports, so `check_imports` accepts it anywhere."""
    path = os.path.join(os.path.dirname(nemotron_diffusion.__file__), "model_card.py")
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "model_card.py must not import siblings"
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in sys.stdlib_module_names, name
