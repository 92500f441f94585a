"""pipeline("text-generation") and streamers in every mode: plain text and chat messages, the mode per call or
from the generation config, greedy unless configured."""

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer, TextStreamer, pipeline

from conftest import tiny_model
from tiny_tokenizer import save_tiny_folder, word_tokenizer


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
BLOCK = {"ar": {}, "diffusion": {"block_size": 4}, "linear_spec": {"block_size": 4},
         "quadratic_spec": {"block_size": 4}}
TEXT = "hello the sea is blue"
MESSAGES = [{"role": "user", "content": "write a haiku about the sea"}]


def greedy_text(model, tok, text_or_messages, mode, max_new_tokens=8, **kwargs):
    """What `model.generate` decodes greedily after the prompt (chat template for messages)."""
    if isinstance(text_or_messages, str):
        enc = tok(text_or_messages, return_tensors="pt")
    else:
        enc = tok.apply_chat_template(
            text_or_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, decode_mode=mode, **BLOCK[mode], **kwargs)
    out = model.generate(**enc, **settings)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("pipe") / "tiny-tri-mode")


# ------------------------------------------------------------------------------------------------ greedy default
def test_generation_config_is_greedy_unless_configured(tmp_path):
    import nemotron_diffusion  # noqa: F401

    assert tiny_model().generation_config.do_sample is False  # in memory
    folder = save_tiny_folder(tmp_path / "saved")
    saved = json.loads((folder / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["decode_mode"] == "ar"
    assert AutoModelForCausalLM.from_pretrained(folder).generation_config.do_sample is False
    # a folder whose generation_config.json leaves do_sample out (NVIDIA's has only eos_token_id)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "_from_model_config": True}))
    assert AutoModelForCausalLM.from_pretrained(folder).generation_config.do_sample is False
    # ... and a folder without one at all
    (folder / "generation_config.json").unlink()
    assert AutoModelForCausalLM.from_pretrained(folder).generation_config.do_sample is False
    # configured sampling is kept
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5}))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.generation_config.do_sample is True and loaded.generation_config.temperature == 0.5


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_decodes_greedily_by_default(mode):
    model, tok = tiny_model(), word_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    expected = greedy_text(model, tok, TEXT, mode)
    results = set()
    for seed in range(3):
        torch.manual_seed(seed)
        out = generator(TEXT, max_new_tokens=8, decode_mode=mode, return_full_text=False, **BLOCK[mode])
        results.add(out[0]["generated_text"])
    assert results == {expected}
    # the check can see sampling: the pipeline samples when asked to
    sampled = set()
    for seed in range(3):
        torch.manual_seed(seed)
        out = generator(
            TEXT, max_new_tokens=8, decode_mode=mode, return_full_text=False, do_sample=True, **BLOCK[mode]
        )
        sampled.add(out[0]["generated_text"])
    assert sampled != {expected}


def test_pipeline_samples_when_the_generation_config_says_so():
    model, tok = tiny_model(), word_tokenizer()
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    results = set()
    for seed in range(3):
        torch.manual_seed(seed)
        results.add(generator(TEXT, max_new_tokens=8, return_full_text=False)[0]["generated_text"])
    assert len(results) > 1


# ------------------------------------------------------------------------------------------- folders and modes
@pytest.mark.parametrize("mode", MODES)
def test_pipeline_from_a_folder_text_and_chat(folder, mode):
    model, tok = AutoModelForCausalLM.from_pretrained(folder), word_tokenizer()
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    out = generator(TEXT, max_new_tokens=8, decode_mode=mode, return_full_text=False, **BLOCK[mode])
    assert out[0]["generated_text"] == greedy_text(model, tok, TEXT, mode)
    full = generator(TEXT, max_new_tokens=8, decode_mode=mode, **BLOCK[mode])
    assert full[0]["generated_text"].startswith(TEXT)

    chat = generator(MESSAGES, max_new_tokens=8, decode_mode=mode, **BLOCK[mode])
    conversation = chat[0]["generated_text"]
    assert conversation[:-1] == MESSAGES
    assert conversation[-1]["role"] == "assistant"
    assert conversation[-1]["content"] == greedy_text(model, tok, MESSAGES, mode)


def test_mode_from_the_generation_config_and_per_call_override(tmp_path):
    model = tiny_model()
    model.generation_config.decode_mode = "diffusion"
    model.generation_config.block_size = 4
    model.generation_config.max_new_tokens = 8
    folder = save_tiny_folder(tmp_path / "diffusion-default", model=model)
    saved = json.loads((folder / "generation_config.json").read_text())
    assert (saved["decode_mode"], saved["block_size"], saved["do_sample"]) == ("diffusion", 4, False)

    tok = word_tokenizer()
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    diffusion = greedy_text(model, tok, TEXT, "diffusion")
    assert diffusion != greedy_text(model, tok, TEXT, "ar")
    assert generator(TEXT, return_full_text=False)[0]["generated_text"] == diffusion
    chat = generator(MESSAGES)[0]["generated_text"][-1]["content"]
    assert chat == greedy_text(model, tok, MESSAGES, "diffusion")
    ar = generator(TEXT, decode_mode="ar", return_full_text=False)[0]["generated_text"]
    assert ar == greedy_text(model, tok, TEXT, "ar")
    # a mode given when the pipeline is built applies to every call
    built = pipeline("text-generation", model=model, tokenizer=tok, decode_mode="linear_spec", max_new_tokens=8)
    assert built(TEXT, return_full_text=False)[0]["generated_text"] == greedy_text(model, tok, TEXT, "linear_spec")


def test_pipeline_refuses_a_bad_mode_with_a_clear_error():
    generator = pipeline("text-generation", model=tiny_model(), tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="decode_mode.*'fast'"):
        generator(TEXT, decode_mode="fast", max_new_tokens=4)


# ------------------------------------------------------------------------------------------------- streaming
class CollectingStreamer(TextStreamer):
    """A TextStreamer that records what it would print (and how many pieces arrived before the end)."""

    def __init__(self, tok):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.pieces, self.ended = [], False

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ended = self.ended or stream_end


@pytest.mark.parametrize("mode", MODES)
def test_text_streamer_prints_every_mode(mode, capsys):
    model, tok = tiny_model(), word_tokenizer()
    enc = tok(TEXT, return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, decode_mode=mode, **BLOCK[mode])
    expected = tok.decode(model.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    model.generate(**enc, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True), **kwargs)
    assert capsys.readouterr().out == expected + "\n"

    collecting = CollectingStreamer(tok)
    model.generate(**enc, streamer=collecting, **kwargs)
    assert "".join(collecting.pieces) == expected and collecting.ended
    assert len([p for p in collecting.pieces if p]) > 1  # it streamed, not one piece at the end


@pytest.mark.parametrize("mode", MODES)
def test_text_iterator_streamer_every_mode(mode):
    model, tok = tiny_model(), word_tokenizer()
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kwargs = dict(max_new_tokens=12, do_sample=False, decode_mode=mode, **BLOCK[mode])
    expected = tok.decode(model.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(target=model.generate, kwargs=dict(**enc, streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected
    assert len([p for p in pieces if p]) > 1


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_streams(mode):
    model, tok = tiny_model(), word_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    streamer = CollectingStreamer(tok)
    out = generator(
        TEXT, max_new_tokens=12, decode_mode=mode, streamer=streamer, return_full_text=False, **BLOCK[mode]
    )
    assert "".join(streamer.pieces) == out[0]["generated_text"]
