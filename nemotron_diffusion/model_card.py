# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The README.md model card of a saved tri-mode folder.

`NemotronDiffusionForCausalLM.save_pretrained` calls `write_model_card`, and transformers copies this module next to
the weights with the other model files (it is imported with a single-dot relative import), so it must stay loadable
as remote code: standard library only. Call `write_model_card(folder, ...)` yourself to rewrite the card of a folder
after adding files to it (a tokenizer, a drafter adapter in a subfolder) or to set its metadata.

The card's usage snippets are meant to run as written against the folder: the test suite executes them.
"""

import json
import os
import re


CARD_MARKER = "<!-- model card written by nemotron-diffusion: rewritten on save_pretrained while this line is here -->"
DEFAULT_TAGS = ("nemotron-diffusion", "text-diffusion", "block-diffusion", "speculative-decoding", "custom_code")
_METADATA_KEYS = {"license", "base_model", "tags", "language", "drafter_subfolder", "description"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def guess_base_model(name_or_path):
    """A Hub repo id the model was loaded from (`org/name` that is not a local path), else None."""
    if not isinstance(name_or_path, str) or not _REPO_ID.match(name_or_path) or os.path.exists(name_or_path):
        return None
    return name_or_path


def find_drafter_subfolder(folder):
    """The subfolder holding a PEFT adapter (NVIDIA ships its drafter as `linear_spec_lora/`), or None."""
    candidates = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if os.path.isfile(os.path.join(folder, name, "adapter_config.json")):
                candidates.append(name)
    if "linear_spec_lora" in candidates:
        return "linear_spec_lora"
    return candidates[0] if candidates else None


def should_write(folder):
    """A card is written where there is none, or where the existing one was written by this module (its marker line
    is still there): a README.md someone wrote by hand is never replaced implicitly."""
    path = os.path.join(folder, "README.md")
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8") as f:
        return CARD_MARKER in f.read()


def _yaml_value(value):
    if isinstance(value, (list, tuple)):
        return "".join(f"\n- {json.dumps(str(v))}" for v in value)
    return " " + json.dumps(str(value))  # a JSON string is a valid YAML scalar


def _py(value):
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_card_text(
    model_id,
    *,
    license="unknown",
    base_model=None,
    tags=None,
    language=None,
    drafter_subfolder=None,
    generation_config=None,
    config=None,
    description=None,
):
    """The text of README.md: YAML front matter, what the model is, and runnable usage snippets.

    model_id: what the snippets pass to `from_pretrained` (a Hub repo id, or the folder's name: the snippets then
        run from the folder's parent directory).
    generation_config / config: dicts of the folder's generation_config.json / config.json (for the defaults table).
    """
    generation_config = generation_config or {}
    config = config or {}
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": license}
    if base_model:
        metadata["base_model"] = base_model
    if language:
        metadata["language"] = language
    metadata["tags"] = list(dict.fromkeys(list(DEFAULT_TAGS) + list(tags or ())))
    front = "---\n" + "".join(f"{key}:{_yaml_value(value)}\n" for key, value in metadata.items()) + "---\n"

    mode = generation_config.get("decode_mode", "ar")
    do_sample = generation_config.get("do_sample")
    size = ""
    if config.get("num_hidden_layers") and config.get("hidden_size"):
        size = f" ({config['num_hidden_layers']} layers, hidden size {config['hidden_size']})"
    intro = description or (
        f"A tri-mode language model{size} in the style of NVIDIA's Nemotron-Labs-Diffusion: one set of weights "
        "that generates autoregressively, by block diffusion, or by self-speculation (the model drafts a block with "
        "diffusion and verifies it causally, which gives exactly the autoregressive output)."
    )
    based = f"\n\nBase model: [{base_model}](https://huggingface.co/{base_model})." if base_model else ""
    id_literal = json.dumps(model_id)

    if drafter_subfolder:
        drafter = f"""This repository ships a LoRA drafter in `{drafter_subfolder}/`. Attach it with PEFT; it is
switched on for the bidirectional draft forwards only, so the output stays exactly the AR output, only faster:

```python
from peft import PeftModel

drafted = PeftModel.from_pretrained(model, model_id, subfolder={json.dumps(drafter_subfolder)}, adapter_name="drafter")
out = drafted.generate(**inputs, max_new_tokens=256, decode_mode="linear_spec", drafter_adapter="drafter",
                       return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("tokens per forward:", out.tokens_per_forward.tolist())
```"""
    else:
        drafter = """A LoRA drafter (NVIDIA's layout: rank 128, alpha 512, on `o_proj`) attaches with PEFT. It is
switched on for the bidirectional draft forwards only, so the output stays exactly the AR output; a trained
drafter only makes drafts better. This one is freshly initialised (a no-op until trained); load a trained one with
`PeftModel.from_pretrained(model, adapter_path, adapter_name="drafter")`:

```python
from peft import LoraConfig, get_peft_model

drafted = get_peft_model(model, LoraConfig(r=128, lora_alpha=512, target_modules=["o_proj"]), adapter_name="drafter")
out = drafted.generate(**inputs, max_new_tokens=256, decode_mode="linear_spec", drafter_adapter="drafter")
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""

    defaults = [f"`decode_mode={_py(mode)}`", f"`do_sample={_py(do_sample)}`"]
    for key in ("block_size", "confidence_threshold", "max_new_tokens", "temperature", "top_p"):
        if generation_config.get(key) is not None:
            defaults.append(f"`{key}={_py(generation_config[key])}`")

    return f"""{front}
{CARD_MARKER}

# {model_id.rstrip("/").split("/")[-1]}

{intro}{based}

| `decode_mode` | What runs | Same tokens as AR? |
|---|---|---|
| `"ar"` | ordinary autoregressive decoding (transformers' own loop) | it is AR |
| `"diffusion"` | block diffusion: each block of mask tokens is denoised in parallel; slots whose confidence reaches `confidence_threshold` are committed each step | no |
| `"linear_spec"` | self-speculation: draft a block with diffusion, verify it causally | yes (sampling: the same distribution) |
| `"quadratic_spec"` | self-speculation with drafting and verification in one forward | yes (sampling: the same distribution) |

Defaults from `generation_config.json`: {", ".join(defaults)} (greedy unless `do_sample=True` is set, also in
`pipeline`). Every field can be passed to `generate()` or a pipeline call.

## Usage

The model code ships with the weights (`trust_remote_code=True`); it needs `transformers>=5.23` and `torch`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = {id_literal}
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype="auto", device_map="auto")

messages = [{{"role": "user", "content": "Write a haiku about the sea."}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
prompt_length = inputs["input_ids"].shape[1]
```

One checkpoint, four ways to generate:

```python
ar = model.generate(**inputs, max_new_tokens=256)  # autoregressive (the default mode)
diffusion = model.generate(
    **inputs, max_new_tokens=256, decode_mode="diffusion", block_size=32, confidence_threshold=0.9
)
linear = model.generate(**inputs, max_new_tokens=256, decode_mode="linear_spec", block_size=32)
quadratic = model.generate(**inputs, max_new_tokens=256, decode_mode="quadratic_spec", block_size=16)
for name, out in [("ar", ar), ("diffusion", diffusion), ("linear_spec", linear), ("quadratic_spec", quadratic)]:
    print(name, tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True))

stats = model.generate(**inputs, max_new_tokens=256, decode_mode="linear_spec", return_dict_in_generate=True)
print("forwards:", stats.num_forwards.tolist(), "tokens per forward:", stats.tokens_per_forward.tolist())
```

Streaming works in every mode (diffusion and speculation emit several tokens at a time):

```python
from transformers import TextStreamer

streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
model.generate(**inputs, max_new_tokens=128, decode_mode="diffusion", streamer=streamer)
```

With a pipeline (plain text or chat messages; the mode per call or from `generation_config.json`):

```python
from transformers import pipeline

generator = pipeline("text-generation", model=model_id, trust_remote_code=True)
chat = generator(messages, max_new_tokens=128, decode_mode="linear_spec")
print(chat[0]["generated_text"][-1]["content"])
text = generator("The sea is", max_new_tokens=64, decode_mode="diffusion", return_full_text=False)
print(text[0]["generated_text"])
```

## Self-speculation with a LoRA drafter

{drafter}

## Beyond one GPU

`device_map="auto"` (accelerate) splits the layers over the GPUs and offloads to CPU or disk what does not fit;
every mode runs on it. Tensor parallelism uses transformers' own plan: run the script with
`torchrun --nproc_per_node N script.py` and load with
`AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, tp_plan="auto")`.

The model code in this repository comes from the `nemotron-diffusion` package (transformers-native tri-mode models).
"""


def write_model_card(folder, model_id=None, name_or_path=None, **metadata):
    """Writes `folder/README.md` from the folder's config.json and generation_config.json.

    model_id: the id the snippets load (default: the folder's name, so they run from its parent directory).
    name_or_path: where the model came from; a Hub repo id there becomes `base_model` unless one is given.
    metadata: `license`, `base_model`, `tags`, `language`, `drafter_subfolder` (default: found in the folder),
    `description`; see `model_card_text`.
    """
    folder = os.fspath(folder)
    unknown = sorted(set(metadata) - _METADATA_KEYS)
    if unknown:
        raise ValueError(f"model card: unknown field(s) {unknown}; allowed: {sorted(_METADATA_KEYS)}.")
    if model_id is None:
        model_id = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    if metadata.get("base_model") is None:
        metadata["base_model"] = guess_base_model(name_or_path)
    if metadata.get("drafter_subfolder") is None:
        metadata["drafter_subfolder"] = find_drafter_subfolder(folder)
    text = model_card_text(
        model_id,
        generation_config=_read_json(folder, "generation_config.json"),
        config=_read_json(folder, "config.json"),
        **metadata,
    )
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


__all__ = ["CARD_MARKER", "model_card_text", "write_model_card"]
