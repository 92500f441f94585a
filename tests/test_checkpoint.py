"""Checkpoints: NVIDIA's folder layout loads into our classes; saved folders load as remote code offline."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM
from test_config import nvidia_config_dict


def _nvidia_state_dict(config, seed=0):
    """Random tensors under NVIDIA's key names and shapes (docs/reference-model.md §3.2), bf16 like the release."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(torch.bfloat16)

    state = {"encoder.embed_tokens.weight": rand(v, h), "encoder.norm.weight": rand(h) + 1, "diffusion_head.weight": rand(v, h)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"encoder.layers.{i}."
        state.update({
            prefix + "input_layernorm.weight": rand(h) + 1,
            prefix + "self_attn.q_proj.weight": rand(q, h),
            prefix + "self_attn.k_proj.weight": rand(kv, h),
            prefix + "self_attn.v_proj.weight": rand(kv, h),
            prefix + "self_attn.o_proj.weight": rand(h, q),
            prefix + "post_attention_layernorm.weight": rand(h) + 1,
            prefix + "mlp.gate_proj.weight": rand(inter, h),
            prefix + "mlp.up_proj.weight": rand(inter, h),
            prefix + "mlp.down_proj.weight": rand(h, inter),
        })
    return state


@pytest.fixture
def nvidia_folder(tmp_path):
    folder = tmp_path / "nvidia-tiny"
    folder.mkdir()
    config = nvidia_config_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 11, "_from_model_config": True}))
    state = _nvidia_state_dict(config)
    assert len(state) == 9 * config["num_hidden_layers"] + 3  # NVIDIA's tensor count
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, state


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM])
def test_nvidia_folder_loads_into_our_class_without_remote_code(nvidia_folder, auto_class):
    folder, state = nvidia_folder
    model, info = auto_class.from_pretrained(folder, output_loading_info=True, dtype=torch.bfloat16)
    assert type(model) is NemotronDiffusionForCausalLM
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    assert model.can_generate()
    with torch.no_grad():
        tokens = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, 6)


def test_nvidia_adapter_keys_address_our_modules(nvidia_folder):
    """NVIDIA's LoRA drafter names `base_model.model.encoder.layers.N.self_attn.o_proj`: that module must exist."""
    folder, _ = nvidia_folder
    model = AutoModel.from_pretrained(folder)
    names = dict(model.named_modules())
    assert isinstance(names["encoder.layers.1.self_attn.o_proj"], torch.nn.Linear)


def test_save_pretrained_keeps_nvidia_names_and_writes_remote_code(nvidia_folder, tmp_path):
    folder, state = nvidia_folder
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    files = set(os.listdir(out))
    for name in ("configuration_nemotron_diffusion.py", "modeling_nemotron_diffusion.py", "generation_nemotron_diffusion.py"):
        assert name in files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nemotron_diffusion.NemotronDiffusionConfig",
        "AutoModel": "modeling_nemotron_diffusion.NemotronDiffusionForCausalLM",
        "AutoModelForCausalLM": "modeling_nemotron_diffusion.NemotronDiffusionForCausalLM",
    }
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state)
    # The in-memory config is not left modified by saving.
    assert model.config.auto_map["AutoModel"] == "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["nemotron_diffusion"] = None  # importing the installed package is now impossible
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(base).__name__ == "NemotronDiffusionForCausalLM"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    result = {"config": type(config).__name__}
    for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
        out = model.generate(ids, max_new_tokens=12, do_sample=False, decode_mode=mode, block_size=4)
        result[mode] = out[0].tolist()
    print(json.dumps(result))
    """
)


def test_remote_code_round_trip_offline_without_the_package(tmp_path):
    from conftest import tiny_model

    model = tiny_model()
    folder = tmp_path / "tri-mode"
    model.save_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = {}
    with torch.no_grad():
        for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
            expected[mode] = model.generate(ids, max_new_tokens=12, do_sample=False, decode_mode=mode, block_size=4)[0].tolist()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("PYTHONPATH", None)
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["config"] == "NemotronDiffusionConfig"
    for mode, tokens in expected.items():
        assert result[mode] == tokens, mode


def test_registered_auto_config():
    config = AutoConfig.for_model("nemotron_labs_diffusion", vocab_size=64, mask_token_id=5)
    assert isinstance(config, NemotronDiffusionConfig)
