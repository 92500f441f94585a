"""The saved VLM folder's README.md: its snippets (an image and a question, every mode, the pipeline) run as written,
offline, where this package cannot be imported, and print what the package's classes generate."""

import re

import torch
from PIL import Image, ImageDraw

from nemotron_diffusion import NemotronDiffusionVLMImageProcessor, NemotronDiffusionVLMProcessor
from test_model_card import NEW_TOKENS, run_offline, snippets
from vlm_helpers import tiny_vlm, vlm_tokenizer


def test_vlm_card_snippets_run_offline_without_the_package(tmp_path):
    model = tiny_vlm(seed=7)
    processor = NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), vlm_tokenizer())
    folder = tmp_path / "tiny-vlm"
    model.save_pretrained(folder, model_card={"license": "apache-2.0"})
    processor.save_pretrained(folder)
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: \"image-text-to-text\"" in card and "license: \"apache-2.0\"" in card
    code = snippets(card)
    assert len(code) == 2
    stdout = run_offline("\n".join(code), tmp_path, tmp_path)

    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).ellipse([80, 40, 240, 200], fill="red")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=text)
    width = inputs["input_ids"].shape[1]
    settings = {"ar": {}, "diffusion": {"block_size": 32, "confidence_threshold": 0.9},
                "linear_spec": {"block_size": 32}, "quadratic_spec": {"block_size": 16}}
    lines = stdout.strip().splitlines()
    with torch.no_grad():
        for mode, fields in settings.items():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, decode_mode=mode, use_cache=True, **fields)
            assert f"{mode} {processor.decode(out[0, width:], skip_special_tokens=True)}" in lines, mode
    assert any(line.startswith("pipeline") for line in lines)
    ar = [line for line in lines if line.startswith("ar ")][0][3:]
    for mode in ("linear_spec", "quadratic_spec"):
        assert [line for line in lines if line.startswith(mode)][0][len(mode) + 1:] == ar


def test_a_hand_written_readme_is_kept(tmp_path):
    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    tiny_vlm().save_pretrained(folder)
    assert (folder / "README.md").read_text() == "mine"
    tiny_vlm().save_pretrained(folder, model_card=False)
    assert (folder / "README.md").read_text() == "mine"
