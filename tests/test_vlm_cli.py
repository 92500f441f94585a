"""`nemotron-diffusion generate/chat --image PATH` with a vision-language model folder, and its one-line errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from nemotron_diffusion import NemotronDiffusionVLMImageProcessor, NemotronDiffusionVLMProcessor
from test_cli import cli, folder  # noqa: F401  (the text model folder fixture)
from vlm_helpers import tiny_vlm, vlm_tokenizer


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-cli")
    model = tiny_vlm(seed=5)
    processor = NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), vlm_tokenizer())
    model.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate([(60, 30), (20, 50)]):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return str(root / "vlm"), model, processor, paths


def _expected(model, processor, paths, conversation, mode, max_new_tokens=6):
    messages = conversation
    content = [{"type": "image"} for _ in paths] + [{"type": "text", "text": messages[0]["content"]}]
    messages = [dict(messages[0], content=content)] + messages[1:]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.open(p) for p in paths], text=text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, decode_mode=mode, block_size=4, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_generate_with_images(vlm_folder, capsys, mode):
    path, model, processor, images = vlm_folder
    status, out, err = cli(
        capsys, "generate", "what is in this picture", "--model", path, "--image", images[0], "--image", images[1],
        "--mode", mode, "--block-size", 4, "--max-new-tokens", 6, "--device", "cpu",
    )
    assert status == 0, err
    expected = _expected(model, processor, images, [{"role": "user", "content": "what is in this picture"}], mode)
    assert out.strip() == expected.strip()


def test_chat_with_an_image_keeps_it_for_the_conversation(vlm_folder, capsys, monkeypatch):
    path, model, processor, images = vlm_folder
    status, out, err = cli(
        capsys, "chat", "--model", path, "--image", images[0], "--no-stream", "--max-new-tokens", 5,
        "--device", "cpu", stdin="what is in this picture\nand a cat\n", monkeypatch=monkeypatch,
    )
    assert status == 0, err
    first = _expected(model, processor, images[:1], [{"role": "user", "content": "what is in this picture"}], "ar", 5)
    history = [{"role": "user", "content": "what is in this picture"}, {"role": "assistant", "content": first.strip()},
               {"role": "user", "content": "and a cat"}]
    second = _expected(model, processor, images[:1], history, "ar", 5)
    assert out.strip().splitlines() == [first.strip(), second.strip()]


def test_image_errors_are_one_line(vlm_folder, folder, tmp_path, capsys):  # noqa: F811
    path, _, _, images = vlm_folder
    status, out, err = cli(capsys, "generate", "hello", "--model", path, "--image", str(tmp_path / "nope.png"))
    assert status == 2 and "--image" in err and "no such file" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    status, out, err = cli(capsys, "generate", "hello", "--model", path, "--image", str(bad), "--device", "cpu")
    assert status == 2 and f"--image {str(bad)!r}: cannot read an image" in err and len(err.strip().splitlines()) == 1
    status, out, err = cli(capsys, "generate", "hello", "--model", folder, "--image", images[0], "--device", "cpu")
    assert status == 2 and "--image needs a vision-language model" in err and len(err.strip().splitlines()) == 1
