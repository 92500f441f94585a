"""The VLM processor: each image placeholder becomes its image's 1 + h(w + 1) marker tokens; the chat template's
image parts; save/load; the processor's output generating with the model."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from nemotron_diffusion import NemotronDiffusionVLMImageProcessor, NemotronDiffusionVLMProcessor
from vlm_helpers import IMAGE_BREAK, IMAGE_END, IMAGE_PAD, IMAGE_START, image_tokens, tiny_vlm, vlm_tokenizer


def processor():
    return NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), vlm_tokenizer())


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_each_placeholder_becomes_its_images_markers():
    proc = processor()
    tok = proc.tokenizer
    images = [picture(60, 30), picture(20, 90, 1)]  # 2 x 3 cells and 4 x 1 cells
    out = proc(images=images, text="what <|image_start|> and <|image_start|> cat", add_special_tokens=False)
    words = lambda s: tok.convert_tokens_to_ids(s.split())  # noqa: E731
    expected = words("what") + image_tokens(2, 3) + words("and") + image_tokens(4, 1) + words("cat")
    assert out["input_ids"].tolist() == [expected]
    assert len(image_tokens(2, 3)) == 1 + 2 * (3 + 1) and len(image_tokens(4, 1)) == 1 + 4 * 2
    assert out["image_sizes"].tolist() == [[56, 84], [112, 28]]
    assert tuple(out["pixel_values"].shape) == (2, 3, 112, 84)
    assert (out["input_ids"] == IMAGE_PAD).sum() == 2 * 3 + 4 * 1
    assert proc.image_token_ids == [IMAGE_START, IMAGE_PAD, IMAGE_BREAK, IMAGE_END]


def test_a_batch_of_prompts_with_different_numbers_of_images_is_left_padded():
    proc = processor()
    out = proc(
        images=[[picture(28, 28)], [], [picture(56, 28, 2), picture(28, 56, 3)]],
        text=["cat <|image_start|>", "dog", "<|image_start|> <|image_start|> blue"],
        padding_side="left",
        add_special_tokens=False,
    )
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 3 and out["image_sizes"].tolist() == [[28, 28], [28, 56], [56, 28]]
    assert mask[1].sum() == 1 and mask[1, -1] == 1 and ids[1, -1] == proc.tokenizer.convert_tokens_to_ids("dog")
    assert [(row == IMAGE_PAD).sum().item() for row in ids] == [1, 0, 4]


def test_placeholder_count_must_match_the_images():
    proc = processor()
    with pytest.raises(ValueError, match=r"`text` holds 1 image placeholders .* but 2 images were given in `images`"):
        proc(images=[picture(28, 28), picture(28, 28)], text="cat <|image_start|>")
    with pytest.raises(ValueError, match=r"`text` holds 1 image placeholders .* but 0 images"):
        proc(text="cat <|image_start|>")
    with pytest.raises(ValueError, match="`text` is required"):
        proc(images=[picture(28, 28)])


def test_marker_tokens_must_exist_in_the_tokenizer():
    with pytest.raises(ValueError, match=r"`image_token`='\[IMG\]' is invalid"):
        NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), vlm_tokenizer(), image_token="[IMG]")


def test_another_placeholder_string():
    proc = NemotronDiffusionVLMProcessor(
        NemotronDiffusionVLMImageProcessor(), vlm_tokenizer(), image_placeholder="<image>"
    )
    out = proc(images=picture(28, 56), text="cat <image> dog", add_special_tokens=False)
    assert (out["input_ids"] == IMAGE_PAD).sum() == 2


def test_chat_template_renders_one_placeholder_per_image_part():
    proc = processor()
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what is in this picture"}, {"type": "image"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|image_start|>what is in this picture<|image_start|><|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )


def test_save_and_load_with_auto_processor(tmp_path):
    import nemotron_diffusion  # noqa: F401  (registers the classes)

    proc = NemotronDiffusionVLMProcessor(
        NemotronDiffusionVLMImageProcessor(max_image_size=560), vlm_tokenizer(), image_placeholder="<image>"
    )
    proc.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is NemotronDiffusionVLMProcessor
    assert type(loaded.image_processor) is NemotronDiffusionVLMImageProcessor
    assert loaded.image_processor.max_image_size == 560 and loaded.image_placeholder == "<image>"
    image = picture(900, 300)
    a = proc(images=image, text="cat <image>")
    b = loaded(images=image, text="cat <image>")
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and torch.equal(a["pixel_values"], b["pixel_values"])


def test_processor_output_generates_in_every_mode():
    proc = processor()
    model = tiny_vlm(seed=3)
    inputs = proc(images=[picture(56, 28), picture(28, 28, 1)], text="what <|image_start|> and <|image_start|> cat")
    with torch.no_grad():
        ar = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
        for mode in ("linear_spec", "quadratic_spec"):
            spec = model.generate(**inputs, max_new_tokens=8, do_sample=False, decode_mode=mode, block_size=4)
            assert spec.tolist() == ar.tolist(), mode
        diffusion = model.generate(**inputs, max_new_tokens=8, decode_mode="diffusion", block_size=4)
    assert diffusion.shape[0] == 1
