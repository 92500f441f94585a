"""NemotronDiffusionConfig: NVIDIA's config.json fields, explicit YaRN factor, and errors that name the field."""

import json
import math

import pytest
import torch

from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM


def nvidia_config_dict(**overrides):
    """The field set of NVIDIA's released 8B config.json (docs/reference-model.md §2.1), at tiny sizes."""
    values = {
        "architectures": ["NemotronLabsDiffusionModel"],
        "ar_loss_weight": 1.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_implementation": "sdpa",
        "auto_map": {
            "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
            "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
        },
        "block_size": 32,
        "bos_token_id": 1,
        "dlm_loss_weight": None,
        "dlm_paradigm": "bidirectional",
        "dp_varying_mask_ratio": False,
        "dtype": "bfloat16",
        "eos_token_id": 11,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 48,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "mask_token_id": 100,
        "max_position_embeddings": 262144,
        "mlp_bias": False,
        "model_type": "nemotron_labs_diffusion",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": None,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 16.0,
            "llama_4_scaling_beta": 0.1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 16384,
            "rope_theta": 1000000.0,
            "rope_type": "yarn",
        },
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "5.0.0.dev0",
        "use_cache": False,
        "vocab_size": 256,
    }
    values.update(overrides)
    return values


def test_accepts_every_field_of_nvidia_config():
    config = NemotronDiffusionConfig(**nvidia_config_dict())
    assert config.model_type == "nemotron_labs_diffusion"
    assert config.mask_token_id == 100 and config.dlm_paradigm == "bidirectional" and config.block_size == 32
    assert config.ar_loss_weight == 1.0 and config.dlm_loss_weight is None and config.dp_varying_mask_ratio is False
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 16.0
    assert config.rope_parameters["llama_4_scaling_beta"] == 0.1
    assert config.head_dim == 16 and config.eos_token_id == 11 and config.pad_token_id is None
    assert config._attn_implementation == "sdpa"
    assert config.tie_word_embeddings is False


def test_defaults_describe_the_8b_checkpoint():
    config = NemotronDiffusionConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (4096, 34, 14336)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert config.mask_token_id == 100 and config.vocab_size == 131072
    assert config.rope_parameters["factor"] == 16.0 and config.rope_parameters["original_max_position_embeddings"] == 16384


def test_14b_rope_theta_from_rope_parameters_wins():
    config = NemotronDiffusionConfig(**nvidia_config_dict(rope_theta=1e6, rope_parameters={
        **nvidia_config_dict()["rope_parameters"], "rope_theta": 1e9}))
    assert config.rope_parameters["rope_theta"] == 1e9


def _yarn_inv_freq(theta, dim, factor, original, beta_fast=32.0, beta_slow=1.0):
    """docs/reference-model.md §4.3, written out."""
    i = torch.arange(0, dim, 2, dtype=torch.float32)
    pos_freq = theta ** (i / dim)
    extrapolation, interpolation = 1.0 / pos_freq, 1.0 / (factor * pos_freq)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight, (low, high)


@pytest.mark.parametrize("theta,expected_range", [(1e6, (20, 37)), (1e9, (13, 25))])
def test_yarn_matches_the_formula_and_the_published_constants(theta, expected_range):
    rope = {**nvidia_config_dict()["rope_parameters"], "rope_theta": theta}
    model = NemotronDiffusionForCausalLM(NemotronDiffusionConfig(**nvidia_config_dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1, hidden_size=64, rope_parameters=rope)))
    expected, correction_range = _yarn_inv_freq(theta, 128, 16.0, 16384)
    assert correction_range == expected_range  # docs/reference-model.md §2.3
    torch.testing.assert_close(model.encoder.rotary_emb.inv_freq, expected, rtol=1e-6, atol=0)
    assert model.encoder.rotary_emb.attention_scaling == 1.0  # mscale = mscale_all_dim = 1 -> no cos/sin scaling


def test_yarn_factor_stays_explicit_when_max_position_embeddings_changes(tmp_path):
    base = NemotronDiffusionForCausalLM(NemotronDiffusionConfig(**nvidia_config_dict()))
    shorter = NemotronDiffusionForCausalLM(NemotronDiffusionConfig(**nvidia_config_dict(max_position_embeddings=4096)))
    torch.testing.assert_close(base.encoder.rotary_emb.inv_freq, shorter.encoder.rotary_emb.inv_freq, rtol=0, atol=0)


def test_missing_yarn_factor_is_derived_once_and_stored(tmp_path):
    rope = {k: v for k, v in nvidia_config_dict()["rope_parameters"].items() if k != "factor"}
    config = NemotronDiffusionConfig(**nvidia_config_dict(rope_parameters=rope))
    assert config.rope_parameters["factor"] == 262144 / 16384
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"]["factor"] == 16.0
    reloaded = NemotronDiffusionConfig.from_pretrained(tmp_path, max_position_embeddings=4096)
    assert reloaded.rope_parameters["factor"] == 16.0


def test_config_round_trip(tmp_path):
    config = NemotronDiffusionConfig(**nvidia_config_dict(dlm_paradigm="block_diff", block_size=8, ar_loss_weight=0.5))
    config.save_pretrained(tmp_path)
    reloaded = NemotronDiffusionConfig.from_pretrained(tmp_path)
    for field in ("dlm_paradigm", "block_size", "ar_loss_weight", "mask_token_id", "rope_parameters", "head_dim"):
        assert getattr(reloaded, field) == getattr(config, field)


def test_rope_without_llama4_scaling_gets_beta_zero():
    """Converted Llama-family models: default RoPE and no Llama-4 query scaling."""
    config = NemotronDiffusionConfig(
        **nvidia_config_dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_theta=10000.0)
    )
    assert config.rope_parameters["llama_4_scaling_beta"] == 0.0
    model = NemotronDiffusionForCausalLM(config).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))


BAD_VALUES = [
    ("mask_token_id", 256, "mask_token_id"),
    ("mask_token_id", -1, "mask_token_id"),
    ("dlm_paradigm", "llada", "dlm_paradigm"),
    ("block_size", 0, "block_size"),
    ("block_size", -3, "block_size"),
    ("ar_loss_weight", -1.0, "ar_loss_weight"),
    ("dlm_loss_weight", 0.0, "dlm_loss_weight"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("sliding_window", 4096, "sliding_window"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("head_dim", 15, "head_dim"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
]


@pytest.mark.parametrize("field,value,name", BAD_VALUES)
def test_bad_values_raise_an_error_naming_the_field(field, value, name):
    with pytest.raises(ValueError) as error:
        NemotronDiffusionConfig(**nvidia_config_dict(**{field: value}))
    assert f"`{name}`" in str(error.value) and repr(value) in str(error.value)


def test_yarn_without_original_length_is_rejected():
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0}
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        NemotronDiffusionConfig(**nvidia_config_dict(rope_parameters=rope))
