"""Tiny VLM fixtures: NVIDIA's VLM config field set and key names at tiny sizes, random models, image prompts."""

import torch

from nemotron_diffusion import NemotronDiffusionVLMConfig, NemotronDiffusionVLMForConditionalGeneration
from test_config import nvidia_config_dict


IMAGE_START, IMAGE_PAD, IMAGE_BREAK, IMAGE_END = 18, 19, 20, 21
VLM_MASK_ID, VLM_EOS_ID, VLM_PAD_ID = 100, 11, 0
VLM_VOCAB = 128


def nvidia_vlm_config_dict(**overrides):
    """The field set of NVIDIA's VLM config.json (text fields flat at the root, a nested Pixtral vision_config,
    the projector fields), at tiny sizes. The tower keeps patch 14 and the 2x2 merge, so a cell is 28 pixels."""
    values = nvidia_config_dict(
        architectures=["NemotronLabsDiffusionVLMModel"],
        auto_map={
            "AutoConfig": "configuration_nemotron_labs_diffusion_vlm.NemotronLabsDiffusionVLMConfig",
            "AutoModel": "modeling_nemotron_labs_diffusion_vlm.NemotronLabsDiffusionVLMModel",
        },
        model_type="nemotron_labs_diffusion_vlm",
        vocab_size=VLM_VOCAB,
        dlm_type="llada",
        complementary_mask=False,
        spatial_merge_size=2,
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 8,
            "num_channels": 3,
            "patch_size": 14,
            "image_size": 1540,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    )
    values["rope_parameters"] = dict(values["rope_parameters"], type="yarn")  # NVIDIA's legacy duplicate key
    values.update(overrides)
    return values


def nvidia_vlm_state_dict(config: dict, seed: int = 0, std: float = 0.2):
    """Random bf16 tensors under NVIDIA's VLM key names and shapes: the text keys, `encoder.vision_tower.*`,
    `encoder.multi_modal_projector.*` and `diffusion_head.weight`."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, one=False):
        t = torch.randn(*shape, generator=g) * std
        return (t + 1 if one else t).to(torch.bfloat16)

    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    state = {
        "encoder.embed_tokens.weight": rand(v, h),
        "encoder.norm.weight": rand(h, one=True),
        "diffusion_head.weight": rand(v, h),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        state.update({
            p + "input_layernorm.weight": rand(h, one=True),
            p + "post_attention_layernorm.weight": rand(h, one=True),
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        })
    vc = config["vision_config"]
    vh, vi, patch = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    p = "encoder.vision_tower."
    state[p + "patch_conv.weight"] = rand(vh, vc["num_channels"], patch, patch)
    state[p + "ln_pre.weight"] = rand(vh, one=True)
    for i in range(vc["num_hidden_layers"]):
        lp = f"{p}transformer.layers.{i}."
        state[lp + "attention_norm.weight"] = rand(vh, one=True)
        state[lp + "ffn_norm.weight"] = rand(vh, one=True)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{lp}attention.{name}.weight"] = rand(vh, vh)
        state[lp + "feed_forward.gate_proj.weight"] = rand(vi, vh)
        state[lp + "feed_forward.up_proj.weight"] = rand(vi, vh)
        state[lp + "feed_forward.down_proj.weight"] = rand(vh, vi)
    merge = config["spatial_merge_size"]
    p = "encoder.multi_modal_projector."
    state[p + "norm.weight"] = rand(vh, one=True)
    state[p + "patch_merger.merging_layer.weight"] = rand(vh, vh * merge * merge)
    state[p + "linear_1.weight"] = rand(h, vh)
    state[p + "linear_2.weight"] = rand(h, h)
    return state


def tiny_vlm(seed: int = 0, std: float = 0.2, **overrides) -> NemotronDiffusionVLMForConditionalGeneration:
    """A random fp32 VLM in eval mode (NVIDIA's structure at tiny sizes; pad id 0 for padded batches)."""
    values = nvidia_vlm_config_dict(pad_token_id=VLM_PAD_ID, initializer_range=std, **overrides)
    values.pop("auto_map")
    config = NemotronDiffusionVLMConfig(**values)
    torch.manual_seed(seed)
    model = NemotronDiffusionVLMForConditionalGeneration(config).eval()
    # Random norms too, so that no function is accidentally the identity.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
                param.add_(torch.randn_like(param) * std)
    return model


def image_tokens(rows: int, cols: int) -> list[int]:
    """NVIDIA's expansion of one image of rows x cols cells: start, then per row `cols` pads and a break, the last
    break replaced by the end marker (1 + rows * (cols + 1) tokens)."""
    out = [IMAGE_START]
    for r in range(rows):
        out += [IMAGE_PAD] * cols + [IMAGE_END if r == rows - 1 else IMAGE_BREAK]
    return out


def random_pixels(grids, seed: int = 0, cell: int = 28):
    """pixel_values [N, 3, H, W] zero-padded bottom-right to the largest image, and image_sizes [N, 2], for images
    of the given (rows, cols) cell grids."""
    g = torch.Generator().manual_seed(seed)
    height = max(r for r, _ in grids) * cell
    width = max(c for _, c in grids) * cell
    pixels = torch.zeros(len(grids), 3, height, width)
    for i, (r, c) in enumerate(grids):
        pixels[i, :, : r * cell, : c * cell] = torch.randn(3, r * cell, c * cell, generator=g)
    sizes = torch.tensor([[r * cell, c * cell] for r, c in grids])
    return pixels, sizes


def image_prompt(grids, before=(5, 6), between=(7,), after=(8, 9, 10)) -> list[int]:
    """Token ids: `before`, each image's expansion (separated by `between`), then `after`."""
    ids = list(before)
    for i, (r, c) in enumerate(grids):
        if i:
            ids += list(between)
        ids += image_tokens(r, c)
    return ids + list(after)


VLM_WORDS = ["user", "assistant", "system", "what", "is", "in", "this", "picture", "and", "a", "cat", "dog", "blue"]


def vlm_tokenizer():
    """A word-level tokenizer with NVIDIA's special ids where they are known: <s> 1, <|im_start|> 10, <|im_end|> 11
    (EOS), <think> 12, </think> 13, the image markers 18-21, the mask <SPECIAL_100> 100; 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"<pad>": 0, "<s>": 1, "<unk>": 2, "<|im_start|>": 10, "<|im_end|>": 11, "<think>": 12,
               "</think>": 13, "<|image_start|>": IMAGE_START, "<|image_pad|>": IMAGE_PAD,
               "<|image_break|>": IMAGE_BREAK, "<|image_end|>": IMAGE_END, "<SPECIAL_100>": VLM_MASK_ID}
    vocab = dict(special)
    free = [i for i in range(VLM_VOCAB) if i not in special.values()]
    for word, i in zip(VLM_WORDS, free):
        vocab[word] = i
    for i in free[len(VLM_WORDS):]:
        vocab[f"w{i}"] = i
    assert sorted(vocab.values()) == list(range(VLM_VOCAB))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = [t for t in special if t not in ("<pad>", "<s>", "<unk>", "<|im_end|>", "<SPECIAL_100>")]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        mask_token="<SPECIAL_100>", additional_special_tokens=extra,
    )
