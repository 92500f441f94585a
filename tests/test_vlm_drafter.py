"""A text model's LoRA drafter (NVIDIA's `linear_spec_lora` format: target_modules ["o_proj"]) attaches to the VLM's
language layers only, and LinearSpec with it stays exactly AR with images."""

import re

import pytest
import torch

from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM
from vlm_helpers import image_prompt, nvidia_vlm_config_dict, random_pixels, tiny_vlm


peft = pytest.importorskip("peft")


@pytest.fixture
def text_drafter(tmp_path):
    """A LoRA on every o_proj of a text model with the VLM's text shape, B random (so it changes drafts)."""
    values = {k: v for k, v in nvidia_vlm_config_dict().items() if k not in (
        "vision_config", "spatial_merge_size", "multimodal_projector_bias", "projector_hidden_act",
        "vision_feature_layer", "dlm_type", "complementary_mask", "auto_map", "architectures", "model_type")}
    text = NemotronDiffusionForCausalLM(NemotronDiffusionConfig(**values))
    wrapped = peft.get_peft_model(text, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    wrapped.save_pretrained(tmp_path / "linear_spec_lora")
    return tmp_path / "linear_spec_lora"


def test_bare_peft_would_wrap_the_vision_layers_too(text_drafter):
    model = tiny_vlm()
    with pytest.warns(UserWarning, match="missing adapter keys.*vision_tower"):
        wrapped = peft.PeftModel.from_pretrained(model, text_drafter)
    names = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert any("vision_tower" in n for n in names)


def test_drafter_attaches_to_the_language_layers_only(text_drafter):
    model = tiny_vlm()
    model = model.load_drafter(text_drafter)
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and "drafter" in m.lora_A)
    layers = model.config.num_hidden_layers
    assert wrapped == [f"encoder.layers.{i}.self_attn.o_proj" for i in range(layers)]
    for name in wrapped:
        module = dict(model.named_modules())[name]
        assert not torch.all(module.lora_B["drafter"].weight == 0)  # the saved weights were loaded


def test_linear_spec_with_the_drafter_equals_ar_with_images(text_drafter):
    base = tiny_vlm(seed=6)
    grids = [(2, 2), (1, 3)]
    pixels, sizes = random_pixels(grids)
    ids = torch.tensor([image_prompt(grids)])
    kwargs = dict(pixel_values=pixels, image_sizes=sizes, max_new_tokens=12, do_sample=False, use_cache=True)
    with torch.no_grad():
        ar = base.generate(ids, **kwargs)
        plain = base.generate(ids, decode_mode="linear_spec", block_size=4, return_dict_in_generate=True, **kwargs)
        model = base.load_drafter(text_drafter)
        lora = dict(model.named_modules())["encoder.layers.0.self_attn.o_proj"]
        calls = []
        handle = lora.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[1], not m.disable_adapters)))
        ar_with = model.generate(ids, **kwargs)
        # AR never runs the adapter (generate swaps the LoRA wrappers out for their base layers when it is off)
        assert not any(on for _, on in calls)
        calls.clear()
        spec = model.generate(ids, decode_mode="linear_spec", block_size=4, return_dict_in_generate=True, **kwargs)
        handle.remove()
    assert ar_with.tolist() == ar.tolist()
    assert spec.sequences.tolist() == ar.tolist() == plain.sequences.tolist()
    # The adapter ran in draft forwards only: blocks of at most 4 slots (the last may be shorter), never the prompt.
    assert calls and all(on and length <= 4 for length, on in calls)
