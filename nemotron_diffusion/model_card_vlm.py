# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The README.md model card of saved VLM folders (standard library only: it travels as remote code).

The snippets load the folder with `trust_remote_code=True` and need the processor saved in the same folder
(`processor.save_pretrained(folder)`); they draw their own picture so that they run as written.
"""

import json
import os

from .model_card import CARD_MARKER, _read_json, _yaml_value, guess_base_model


VLM_TAGS = ("nemotron-diffusion", "vision-language", "block-diffusion", "speculative-decoding", "custom_code")


def vlm_model_card_text(model_id, *, license="unknown", base_model=None, tags=None, config=None):
    config = config or {}
    metadata = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "license": license}
    if base_model:
        metadata["base_model"] = base_model
    metadata["tags"] = list(dict.fromkeys(list(VLM_TAGS) + list(tags or ())))
    front = "---\n" + "".join(f"{key}:{_yaml_value(value)}\n" for key, value in metadata.items()) + "---\n"
    size = ""
    if config.get("num_hidden_layers") and config.get("hidden_size"):
        size = f" ({config['num_hidden_layers']} language layers, hidden size {config['hidden_size']})"
    id_literal = json.dumps(model_id)
    return f"""{front}{CARD_MARKER}

# {os.path.basename(model_id)}

A tri-mode vision-language model{size} in the layout of NVIDIA's Nemotron-Labs-Diffusion-VLM: a Pixtral vision
tower and a Mistral3 projector feed image features into a language model that generates autoregressively, by block
diffusion, or by self-speculation (the model drafts a block with diffusion and verifies it causally, which gives
exactly the autoregressive output). Images are read once, in the prompt's forward, in every mode.

## Usage

```python
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = {id_literal}
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

image = Image.new("RGB", (320, 240), "white")  # or Image.open("photo.jpg")
ImageDraw.Draw(image).ellipse([80, 40, 240, 200], fill="red")
question = {{"type": "text", "text": "What is in this picture?"}}
messages = [{{"role": "user", "content": [{{"type": "image"}}, question]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[image], text=text)
inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
width = inputs["input_ids"].shape[1]

settings = {{
    "ar": {{}},
    "diffusion": {{"block_size": 32, "confidence_threshold": 0.9}},
    "linear_spec": {{"block_size": 32}},
    "quadratic_spec": {{"block_size": 16}},
}}
with torch.no_grad():
    for mode, fields in settings.items():
        out = model.generate(**inputs, max_new_tokens=128, decode_mode=mode, use_cache=True, **fields)
        print(mode, processor.decode(out[0, width:], skip_special_tokens=True))
```

Several images: one `{{"type": "image"}}` part per image, and the images in the same order in `images=[...]`.
Greedy `linear_spec` and `quadratic_spec` return exactly the `ar` tokens.

With the pipeline (generation fields go in `generate_kwargs`):

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model=model, processor=processor)
describe = {{"type": "text", "text": "Describe it."}}
chat = [{{"role": "user", "content": [{{"type": "image", "image": image}}, describe]}}]
result = pipe(text=chat, max_new_tokens=64, return_full_text=False, generate_kwargs={{"decode_mode": "linear_spec"}})
print("pipeline", result[0]["generated_text"])
```

The model code in this repository comes from the `nemotron-diffusion` package (transformers-native tri-mode models).
"""


def write_vlm_model_card(folder, model_id=None, name_or_path=None, **metadata):
    """Writes `folder/README.md` for a saved VLM. metadata: `license`, `base_model`, `tags`."""
    folder = os.fspath(folder)
    unknown = sorted(set(metadata) - {"license", "base_model", "tags"})
    if unknown:
        raise ValueError(f"model card: unknown field(s) {unknown}; allowed: ['base_model', 'license', 'tags'].")
    if model_id is None:
        model_id = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    if metadata.get("base_model") is None:
        metadata["base_model"] = guess_base_model(name_or_path)
    text = vlm_model_card_text(model_id, config=_read_json(folder, "config.json"), **metadata)
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


__all__ = ["vlm_model_card_text", "write_vlm_model_card"]
