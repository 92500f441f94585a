"""The VLM in our classes: NVIDIA's config and key names, transformers' Pixtral tower and Mistral3 projector, the
splice of image features at the image tokens, and clear errors for bad image inputs."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Mistral3Config
from transformers import Mistral3ForConditionalGeneration

from nemotron_diffusion import (
    NemotronDiffusionConfig,
    NemotronDiffusionForCausalLM,
    NemotronDiffusionVLMConfig,
    NemotronDiffusionVLMForConditionalGeneration,
)
from vlm_helpers import (
    IMAGE_PAD,
    image_prompt,
    nvidia_vlm_config_dict,
    nvidia_vlm_state_dict,
    random_pixels,
    tiny_vlm,
)


# ------------------------------------------------------------------------------------------------------- config
def test_config_accepts_every_field_of_nvidia_vlm_config():
    values = nvidia_vlm_config_dict()
    config = NemotronDiffusionVLMConfig(**values)
    assert config.model_type == "nemotron_labs_diffusion_vlm"
    assert config.vocab_size == 128 and config.mask_token_id == 100 and config.eos_token_id == 11
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 16.0
    assert config.dlm_type == "llada" and config.complementary_mask is False
    assert config.spatial_merge_size == 2 and config.projector_hidden_act == "gelu"
    assert config.multimodal_projector_bias is False and config.vision_feature_layer == -1
    vision = config.vision_config
    assert type(vision).__name__ == "PixtralVisionConfig"
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.head_dim) == (16, 2, 14, 8)
    assert vision.hidden_act == "silu"
    assert (config.image_start_token_id, config.image_token_id, config.image_break_token_id,
            config.image_end_token_id) == (18, 19, 20, 21)
    assert config._attn_implementation == "sdpa"
    assert values == nvidia_vlm_config_dict()  # the dict passed in is not modified


def test_config_defaults_describe_nvidia_vlm_8b():
    config = NemotronDiffusionVLMConfig()
    assert config.vocab_size == 131073 and config.hidden_size == 4096 and config.num_hidden_layers == 34
    vision = config.vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.head_dim, vision.patch_size, vision.hidden_act) == (1024, 4096, 24, 16, 64, 14, "silu")
    # A partial vision dict takes NVIDIA's values for the rest, not Pixtral's class defaults (gelu, patch 16).
    partial = NemotronDiffusionVLMConfig(vision_config={"num_hidden_layers": 2})
    assert partial.vision_config.hidden_act == "silu" and partial.vision_config.patch_size == 14


def test_config_round_trips_through_dict_and_auto_config(tmp_path):
    config = NemotronDiffusionVLMConfig(**nvidia_vlm_config_dict())
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is NemotronDiffusionVLMConfig
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert loaded.image_token_id == 19 and loaded.spatial_merge_size == 2
    fresh = AutoConfig.for_model("nemotron_labs_diffusion_vlm", image_token_index=7)
    assert type(fresh) is NemotronDiffusionVLMConfig and fresh.image_token_id == 7


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_token_id": 100}, "image_token_id"),  # the mask id
        ({"image_token_id": 128}, "image_token_id"),  # outside the vocabulary
        ({"image_end_token_id": 18}, "image_end_token_id"),  # the start marker's id
        ({"spatial_merge_size": 0}, "spatial_merge_size"),
        ({"projector_hidden_act": "swish-ish"}, "projector_hidden_act"),
        ({"vision_feature_layer": 3}, "vision_feature_layer"),
        ({"vision_feature_layer": [1, -1]}, "vision_feature_layer"),
        ({"dlm_type": "dream"}, "dlm_type"),
        ({"mask_token_id": 128}, "mask_token_id"),  # the text validation still runs
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        NemotronDiffusionVLMConfig(**nvidia_vlm_config_dict(**overrides))


@pytest.mark.parametrize(
    "vision, field",
    [
        ({"head_dim": 4}, "vision_config\\['head_dim'\\]"),
        ({"num_attention_heads": 3}, "vision_config\\['num_attention_heads'\\]"),
        ({"model_type": "siglip_vision_model"}, "vision_config\\['model_type'\\]"),
        ({"hidden_act": "nope"}, "vision_config\\['hidden_act'\\]"),
    ],
)
def test_config_rejects_bad_vision_values(vision, field):
    values = nvidia_vlm_config_dict()
    values["vision_config"] = dict(values["vision_config"], **vision)
    with pytest.raises(ValueError, match=field):
        NemotronDiffusionVLMConfig(**values)


def test_config_rejects_a_vision_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="vision_config"):
        NemotronDiffusionVLMConfig(vision_config=NemotronDiffusionConfig())


# ------------------------------------------------------------------------------------------ NVIDIA's folder
@pytest.fixture
def nvidia_vlm_folder(tmp_path):
    folder = tmp_path / "nvidia-vlm-tiny"
    folder.mkdir()
    config = nvidia_vlm_config_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 11, "_from_model_config": True}))
    state = nvidia_vlm_state_dict(config)
    text = 9 * config["num_hidden_layers"] + 3
    vision = 2 + 9 * config["vision_config"]["num_hidden_layers"] + 4
    assert len(state) == text + vision  # 531 at the real sizes (34 text layers, 24 vision layers)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, state


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForImageTextToText])
def test_nvidia_vlm_folder_loads_without_missing_or_unexpected_keys(nvidia_vlm_folder, auto_class):
    folder, state = nvidia_vlm_folder
    model, info = auto_class.from_pretrained(folder, output_loading_info=True, dtype=torch.bfloat16)
    assert type(model) is NemotronDiffusionVLMForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    assert model.config.vision_config._attn_implementation == "sdpa"
    # the tower's axial RoPE frequencies are computed, not loaded: they equal a fresh tower's
    fresh = NemotronDiffusionVLMForConditionalGeneration(model.config)
    assert torch.equal(
        model.encoder.vision_tower.patch_positional_embedding.inv_freq,
        fresh.encoder.vision_tower.patch_positional_embedding.inv_freq.to(torch.bfloat16),
    ) or torch.equal(
        model.encoder.vision_tower.patch_positional_embedding.inv_freq.float(),
        fresh.encoder.vision_tower.patch_positional_embedding.inv_freq.float(),
    )


def test_text_adapter_targets_exist_under_nvidia_names(nvidia_vlm_folder):
    folder, _ = nvidia_vlm_folder
    names = dict(AutoModel.from_pretrained(folder).named_modules())
    assert isinstance(names["encoder.layers.1.self_attn.o_proj"], torch.nn.Linear)
    assert isinstance(names["encoder.vision_tower.transformer.layers.1.attention.o_proj"], torch.nn.Linear)


# ------------------------------------------------------------------------ same functions as transformers' Mistral3
def _mistral3_twin(model: NemotronDiffusionVLMForConditionalGeneration) -> Mistral3ForConditionalGeneration:
    """transformers' Mistral3 with a Ministral3 language model, on the same weights (names mapped)."""
    c = model.config
    text = {
        k: getattr(c, k)
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act")
    }
    config = Mistral3Config(
        vision_config=c.vision_config.to_dict(),
        text_config=dict(
            text, model_type="ministral3", rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False
        ),
        image_token_index=c.image_token_id,
        spatial_merge_size=c.spatial_merge_size,
        projector_hidden_act=c.projector_hidden_act,
        multimodal_projector_bias=c.multimodal_projector_bias,
        vision_feature_layer=c.vision_feature_layer,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    twin = Mistral3ForConditionalGeneration(config).eval()
    mapped = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.vision_tower.") or key.startswith("encoder.multi_modal_projector."):
            mapped["model." + key[len("encoder."):]] = value
        elif key.startswith("encoder."):
            mapped["model.language_model." + key[len("encoder."):]] = value
        else:
            mapped[key.replace("diffusion_head.", "lm_head.")] = value
    missing, unexpected = twin.load_state_dict(mapped, strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing), (missing, unexpected)
    return twin


# (A lone one-cell image is left out: Mistral3's `get_image_features` squeezes its single feature row away.)
@pytest.mark.parametrize("grids", [[(1, 2)], [(2, 3)], [(3, 2), (1, 4)], [(2, 2), (1, 1), (3, 1)]])
def test_tower_and_projector_equal_mistral3(grids):
    model = tiny_vlm()
    twin = _mistral3_twin(model)
    pixels, sizes = random_pixels(grids, seed=len(grids))
    with torch.no_grad():
        ours = model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        theirs = twin.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    assert len(ours) == len(grids)
    for (r, c), a, b in zip(grids, ours, theirs):
        assert a.shape == (r * c, model.config.hidden_size)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_another_vision_feature_layer_equals_mistral3():
    # (Mistral3 itself fails on layer 0, which its hidden-state selection reads as "no hidden states".)
    model = tiny_vlm(vision_feature_layer=-2)
    twin = _mistral3_twin(model)
    pixels, sizes = random_pixels([(2, 3), (1, 2)])
    with torch.no_grad():
        ours = model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        theirs = twin.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        last = tiny_vlm().get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    for a, b, c in zip(ours, theirs, last):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)


def test_prefill_logits_equal_mistral3_with_ministral3_text_model():
    """Our backbone is built from Ministral3 layers: the whole image prompt's causal logits equal Mistral3's."""
    model = tiny_vlm()
    twin = _mistral3_twin(model)
    grids = [(2, 3), (1, 2)]
    pixels, sizes = random_pixels(grids)
    ids = torch.tensor([image_prompt(grids)])
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        theirs = twin(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_spliced_prefill_equals_a_manual_splice():
    model = tiny_vlm()
    grids = [(2, 2), (1, 3)]
    pixels, sizes = random_pixels(grids)
    ids = torch.tensor([image_prompt(grids)])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        embeds = model.get_input_embeddings()(ids).clone()
        rows = [f for image in features for f in image]  # image by image, row-major inside an image
        slots = [j for j in range(ids.shape[1]) if int(ids[0, j]) == IMAGE_PAD]
        assert len(slots) == len(rows) == 7
        for j, row in zip(slots, rows):
            embeds[0, j] = row
        manual = model(inputs_embeds=embeds).logits
        spliced = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        text_only = model(input_ids=torch.where(ids == IMAGE_PAD, 5, ids)).logits
    assert torch.equal(spliced, manual)
    assert not torch.allclose(spliced, text_only)  # the images matter
    # Positions before the first image token are untouched by the splice (causal attention).
    assert torch.equal(spliced[:, :3], text_only[:, :3])


def test_image_features_of_a_padded_batch_equal_each_image_alone():
    model = tiny_vlm()
    grids = [(2, 3), (1, 1), (3, 2)]
    pixels, sizes = random_pixels(grids)
    with torch.no_grad():
        together = model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        for i, (r, c) in enumerate(grids):
            alone = model.get_image_features(
                pixel_values=pixels[i : i + 1, :, : r * 28, : c * 28], image_sizes=sizes[i : i + 1]
            ).pooler_output[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- bad input
def test_wrong_number_of_image_tokens_is_a_clear_error():
    model = tiny_vlm()
    pixels, sizes = random_pixels([(2, 3)])
    ids = torch.tensor([image_prompt([(2, 2)])])  # 4 image tokens, 6 features
    with pytest.raises(ValueError, match=r"`input_ids` hold 4 image tokens.*give 6 image features"):
        model(input_ids=ids, pixel_values=pixels, image_sizes=sizes)


def test_pixel_values_without_image_sizes_is_a_clear_error():
    model = tiny_vlm()
    pixels, _ = random_pixels([(1, 1)])
    with pytest.raises(ValueError, match="`pixel_values` was given without `image_sizes`"):
        model(input_ids=torch.tensor([image_prompt([(1, 1)])]), pixel_values=pixels)
    with pytest.raises(ValueError, match="`image_sizes` was given without `pixel_values`"):
        model(input_ids=torch.tensor([[5, 6]]), image_sizes=torch.tensor([[28, 28]]))


def test_image_tokens_without_pixel_values_is_a_clear_error():
    model = tiny_vlm()
    with pytest.raises(ValueError, match=r"hold 1 image tokens \(id 19\) but no `pixel_values`"):
        model(input_ids=torch.tensor([image_prompt([(1, 1)])]))


@pytest.mark.parametrize(
    "sizes, message",
    [
        ([[28, 30]], r"`image_sizes\[0\]`=\(28, 30\) is invalid; allowed: positive multiples of 28"),
        ([[56, 28]], r"`image_sizes\[0\]`=\(56, 28\) is invalid.*no larger than the pixel_values size \(28, 28\)"),
        ([[28, 28], [28, 28]], r"`image_sizes` must hold one \(height, width\) pair per image"),
    ],
)
def test_bad_image_sizes_are_clear_errors(sizes, message):
    model = tiny_vlm()
    pixels, _ = random_pixels([(1, 1)])
    with pytest.raises(ValueError, match=message):
        model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor(sizes))


def test_bad_pixel_values_are_clear_errors():
    model = tiny_vlm()
    with pytest.raises(TypeError, match="`pixel_values` must be a torch.Tensor"):
        model.get_image_features(pixel_values=[[0.0]], image_sizes=[[28, 28]])
    with pytest.raises(ValueError, match="`pixel_values` must be a 4-D floating-point tensor"):
        model.get_image_features(pixel_values=torch.zeros(3, 28, 28), image_sizes=[[28, 28]])


def test_images_with_labels_are_refused():
    model = tiny_vlm()
    pixels, sizes = random_pixels([(1, 1)])
    ids = torch.tensor([image_prompt([(1, 1)])])
    with pytest.raises(ValueError, match="do not take `pixel_values`"):
        model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, labels=ids)


def test_images_to_a_text_only_model_are_a_clear_error():
    from conftest import tiny_model

    model = tiny_model()
    with pytest.raises(ValueError, match="`pixel_values`.*text-only"):
        model(input_ids=torch.tensor([[5, 6]]), pixel_values=torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="`pixel_values`.*text-only"):
        model.generate(torch.tensor([[5, 6]]), pixel_values=torch.zeros(1, 3, 28, 28), max_new_tokens=2)
    with pytest.raises(ValueError, match="`image_sizes`.*text-only"):
        model.generate(
            torch.tensor([[5, 6]]), image_sizes=torch.tensor([[28, 28]]), max_new_tokens=2, decode_mode="diffusion"
        )
    assert type(model) is NemotronDiffusionForCausalLM
