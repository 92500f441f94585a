"""Checkpoint conversion: Llama / Mistral folders into the tri-mode format (AR logits and tokens equal the source's),
mask token choice, RoPE mapping, tied heads, tokenizer and chat template, the CLI, and NVIDIA folders rewritten to
our remote code."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM
from nemotron_diffusion.cli import main as cli_main
from nemotron_diffusion.convert import convert_checkpoint, convert_nvidia_folder, map_rope_parameters
from nemotron_diffusion.native_twin import native_twin

VOCAB = 64
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}<|assistant|>"


def _tokenizer(extra_special=()):
    """A word-level tokenizer with exactly VOCAB ids (so an added mask token must grow the vocabulary)."""
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", *extra_special]
    vocab = {token: i for i, token in enumerate(special)}
    for i in range(len(special), VOCAB):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=special[4:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _llama(tmp_path, tie=True, rope_parameters=None, extra_special=(), seed=0, name="llama"):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.2, rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    _tokenizer(extra_special).save_pretrained(folder)
    return folder, model


def _mistral(tmp_path, extra_special=()):
    torch.manual_seed(1)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
    )
    model = MistralForCausalLM(config).eval()
    folder = tmp_path / "mistral"
    model.save_pretrained(folder)
    _tokenizer(extra_special).save_pretrained(folder)
    return folder, model


def _assert_same_ar(source, converted, length=40, new_tokens=12):
    ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = source(ids).logits
        ours = converted(ids).logits[..., : source.config.vocab_size]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    a = source.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    b = converted.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_llama_tied_adds_mask_token_and_matches_source(tmp_path):
    src, source = _llama(tmp_path)
    report = convert_checkpoint(src, tmp_path / "out")
    assert report.mask_token_added and report.mask_token == "<|mask|>" and report.mask_token_id == VOCAB
    assert report.greedy_tokens_equal and report.max_abs_logit_diff < 1e-5

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert isinstance(model, NemotronDiffusionForCausalLM)
    config = model.config
    assert config.mask_token_id == VOCAB and config.vocab_size == VOCAB + 1
    assert config.tie_word_embeddings
    assert model.diffusion_head.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()
    assert torch.count_nonzero(model.encoder.embed_tokens.weight[VOCAB]) == 0  # the new row starts at zero
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_parameters["llama_4_scaling_beta"] == 0.0
    assert config.head_dim == 8 and config.num_key_value_heads == 2
    _assert_same_ar(source, model)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.convert_tokens_to_ids("<|mask|>") == VOCAB
    assert tokenizer.chat_template == CHAT_TEMPLATE
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"].startswith("modeling_nemotron_diffusion.")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_llama_untied_with_llama3_rope_matches_source_beyond_original_length(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    src, source = _llama(tmp_path, tie=False, rope_parameters=rope)
    convert_checkpoint(src, tmp_path / "out")
    model = NemotronDiffusionForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert not model.config.tie_word_embeddings
    assert model.diffusion_head.weight.data_ptr() != model.encoder.embed_tokens.weight.data_ptr()
    params = model.config.rope_parameters
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0 and params["llama_4_scaling_beta"] == 0.0
    _assert_same_ar(source, model, length=60)  # 60 > original 16 positions: the llama3 frequency scaling matters


def test_native_twin_of_a_converted_llama_is_the_source_model(tmp_path):
    """Native -> ours (conversion) -> native (`native_twin`): a LlamaForCausalLM on the converted model's own tensors
    that computes the source model's logits."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    src, source = _llama(tmp_path, tie=False, rope_parameters=rope)
    convert_checkpoint(src, tmp_path / "out")
    model = NemotronDiffusionForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    model.encoder.layers[0].requires_grad_(False)  # e.g. a base frozen under a drafter: the twin leaves it frozen
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    twin = native_twin(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.requires_grad for p in twin.parameters())  # as a freshly loaded stock model
    assert isinstance(twin, LlamaForCausalLM)
    assert twin.lm_head.weight.data_ptr() == model.diffusion_head.weight.data_ptr()
    down_proj = model.encoder.layers[1].mlp.down_proj.weight
    assert twin.model.layers[1].mlp.down_proj.weight.data_ptr() == down_proj.data_ptr()
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits[..., :VOCAB], source(ids).logits, rtol=1e-5, atol=1e-5)


def test_mistral_reserved_token_becomes_the_mask(tmp_path):
    src, source = _mistral(tmp_path, extra_special=("<|reserved_special_token_0|>",))
    report = convert_checkpoint(src, tmp_path / "out")
    assert not report.mask_token_added
    assert report.mask_token == "<|reserved_special_token_0|>" and report.mask_token_id == 6
    assert any("sliding_window" in note for note in report.notes)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert model.config.vocab_size == VOCAB and model.config.mask_token_id == 6
    assert model.config.sliding_window is None and model.config.head_dim == 16
    _assert_same_ar(source, model)


def test_ministral3_keeps_yarn_and_llama4_scaling(tmp_path):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    torch.manual_seed(2)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
    config = Ministral3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, initializer_range=0.2, rope_parameters=rope,
    )
    source = Ministral3ForCausalLM(config).eval()
    source.save_pretrained(tmp_path / "ministral3")
    _tokenizer().save_pretrained(tmp_path / "ministral3")
    report = convert_checkpoint(tmp_path / "ministral3", tmp_path / "out")
    assert report.model_type == "ministral3" and report.greedy_tokens_equal
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    params = model.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0 and params["llama_4_scaling_beta"] == 0.1
    _assert_same_ar(source, model, length=40)  # 40 > 16: both the YaRN and the Llama-4 query scaling matter


def test_explicit_mask_token_and_spec_modes_stay_lossless(tmp_path):
    src, _source = _llama(tmp_path)
    report = convert_checkpoint(src, tmp_path / "out", mask_token="w60")
    assert report.mask_token_id == 60 and not report.mask_token_added
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(5))
    ar = model.generate(ids, max_new_tokens=16, do_sample=False)
    for mode in ("linear_spec", "quadratic_spec"):
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, decode_mode=mode, block_size=4), ar)


def test_bf16_dtype_and_map_rope_parameters():
    llama = LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})
    assert map_rope_parameters(llama) == {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0, "llama_4_scaling_beta": 0.0}


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="src="):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        convert_checkpoint(tmp_path / "weights.bin", tmp_path / "out")
    with pytest.raises(TypeError, match="src"):
        convert_checkpoint(123, tmp_path / "out")
    src, _ = _llama(tmp_path)
    with pytest.raises(TypeError, match="mask_token"):
        convert_checkpoint(src, tmp_path / "out", mask_token=1.5)
    with pytest.raises(TypeError, match="dtype"):
        convert_checkpoint(src, tmp_path / "out", dtype="float32")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ValueError, match="dst="):
        convert_checkpoint(src, tmp_path / "busy")
    # A tri-mode (or any unsupported) folder is refused by model type.
    NemotronDiffusionForCausalLM(NemotronDiffusionConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mask_token_id=63)).save_pretrained(tmp_path / "ours")
    _tokenizer().save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="model_type='nemotron_labs_diffusion'"):
        convert_checkpoint(tmp_path / "ours", tmp_path / "out2")


def test_cli_convert(tmp_path, capsys):
    src, _ = _llama(tmp_path)
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert "greedy tokens equal: True" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.encoder.embed_tokens.weight.dtype == torch.bfloat16
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out3")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --from-nvidia
def _nvidia_like_folder(tmp_path):
    """Our tiny model saved, then dressed as NVIDIA's release: their auto_map and remote-code file, an adapter."""
    torch.manual_seed(0)
    config = NemotronDiffusionConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mask_token_id=63, initializer_range=0.2,
    )
    folder = tmp_path / "nvidia"
    NemotronDiffusionForCausalLM(config).save_pretrained(folder)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            os.remove(folder / name)
    (folder / "modeling_nemotron_labs_diffusion.py").write_text("raise ImportError('NVIDIA remote code')\n")
    saved = json.loads((folder / "config.json").read_text())
    saved["auto_map"] = {"AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
                         "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"}
    saved["architectures"] = ["NemotronLabsDiffusionModel"]
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "linear_spec_lora").mkdir()
    (folder / "linear_spec_lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("link", ["hardlink", "symlink", "copy"])
def test_from_nvidia_rewrites_code_and_keeps_weights(tmp_path, link):
    src = _nvidia_like_folder(tmp_path)
    dst = tmp_path / "ours"
    written = convert_nvidia_folder(src, dst, link=link)
    assert "model.safetensors" in written
    names = set(os.listdir(dst))
    assert {"configuration_nemotron_diffusion.py", "modeling_nemotron_diffusion.py",
            "generation_nemotron_diffusion.py"} <= names
    assert "modeling_nemotron_labs_diffusion.py" not in names
    assert (dst / "linear_spec_lora" / "adapter_config.json").read_text() == '{"peft_type": "LORA"}'
    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nemotron_diffusion.NemotronDiffusionForCausalLM"
    assert config["architectures"] == ["NemotronLabsDiffusionModel"] and config["mask_token_id"] == 63
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    if link == "hardlink":
        assert os.stat(dst / "model.safetensors").st_ino == os.stat(src / "model.safetensors").st_ino
    if link == "symlink":
        assert (dst / "model.safetensors").is_symlink()
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key


def test_from_nvidia_folder_loads_as_remote_code_without_the_package(tmp_path):
    """Every model file the remote code imports is written (the modeling module's relative imports, as
    save_pretrained copies them): the folder loads with trust_remote_code where this package cannot be imported."""
    import subprocess
    import sys

    dst = tmp_path / "ours"
    convert_nvidia_folder(_nvidia_like_folder(tmp_path), dst, link="copy")
    script = (
        'import sys\nsys.modules["nemotron_diffusion"] = None\n'
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True)\n"
        "print(type(model).__name__, model.generate(__import__('torch').tensor([[5, 6, 7]]), max_new_tokens=2, "
        "decode_mode='linear_spec', block_size=2).shape[1])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["NemotronDiffusionForCausalLM", "5"]


def test_from_nvidia_refuses_other_folders(tmp_path, capsys):
    src, _ = _llama(tmp_path)
    with pytest.raises(ValueError, match="not 'nemotron_labs_diffusion'"):
        convert_nvidia_folder(src, tmp_path / "out")
    with pytest.raises(ValueError, match="link="):
        convert_nvidia_folder(_nvidia_like_folder(tmp_path), tmp_path / "out", link="move")
    assert cli_main(["convert", "--from-nvidia", str(src), str(tmp_path / "out")]) == 2
    assert "nemotron_labs_diffusion" in capsys.readouterr().err
