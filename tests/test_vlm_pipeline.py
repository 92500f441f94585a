"""pipeline("image-text-to-text") with chat messages holding images, in the default mode and via generate_kwargs."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from nemotron_diffusion import NemotronDiffusionVLMImageProcessor, NemotronDiffusionVLMProcessor
from vlm_helpers import tiny_vlm, vlm_tokenizer


@pytest.fixture(scope="module")
def parts():
    model = tiny_vlm(seed=3)
    processor = NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), vlm_tokenizer())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8))]
    messages = [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "text", "text": "what is in this picture and"},
        {"type": "image", "image": images[1]}]}]
    return model, processor, images, messages


def _direct(model, processor, images, messages, **kwargs):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=text)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, **kwargs)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("generate_kwargs", [None, {"decode_mode": "diffusion", "block_size": 4},
                                             {"decode_mode": "linear_spec", "block_size": 4}])
def test_pipeline_with_chat_messages_equals_direct_generation(parts, generate_kwargs):
    model, processor, images, messages = parts
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    kwargs = {} if generate_kwargs is None else {"generate_kwargs": dict(generate_kwargs)}
    out = pipe(text=messages, max_new_tokens=6, return_full_text=False, **kwargs)
    expected = _direct(model, processor, images, messages, **(generate_kwargs or {}))
    assert out[0]["generated_text"].strip() == expected.strip()


def test_pipeline_modes_differ_where_they_should(parts):
    model, processor, images, messages = parts
    ar = _direct(model, processor, images, messages)
    assert _direct(model, processor, images, messages, decode_mode="linear_spec", block_size=4) == ar
    assert _direct(model, processor, images, messages, decode_mode="diffusion", block_size=4) != ar  # this model


def test_generation_arguments_given_to_the_processor_are_a_clear_error(parts):
    model, processor, images, messages = parts
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    with pytest.raises(ValueError, match=r"\['decode_mode'\] are generation arguments.*generate_kwargs="):
        pipe(text=messages, max_new_tokens=6, decode_mode="diffusion")
