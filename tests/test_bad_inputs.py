"""Bad inputs at every public entry point (generate() in each mode, the model config, from_pretrained, the pipeline,
the CLI): each is refused with a named error (the exception type and the words it must contain are in the tables),
settings that do not apply to the chosen mode warn, and no input makes a mode allocate memory for its whole budget
or for a block larger than what is left of it."""

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from nemotron_diffusion import NemotronDiffusionForCausalLM
from nemotron_diffusion.cli import main
from conftest import MASK_ID, tiny_model
from tiny_tokenizer import save_tiny_folder, word_tokenizer


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
NON_AR = MODES[1:]
REPO_ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 42, 9, 7]])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("bad-inputs") / "tiny")


# ---------------------------------------------------------------------------------------- generate(), every mode
# (name, generate arguments, modes, exception type, words the message must contain)
GENERATE_CASES = [
    ("mask shorter than the prompt", dict(attention_mask=torch.ones(1, 3, dtype=torch.long)), MODES, ValueError,
     ["attention_mask", "(1, 3)", "(1, 5)"]),
    ("mask with more rows than the prompt", dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), MODES, ValueError,
     ["attention_mask", "(2, 5)", "(1, 5)"]),
    ("mask holding 2", dict(attention_mask=torch.full((1, 5), 2)), MODES, ValueError,
     ["attention_mask", "value 2", "only 0", "and 1"]),
    ("float mask", dict(attention_mask=torch.ones(1, 5)), MODES, TypeError,
     ["attention_mask", "torch.float32", "bool or integer"]),
    ("empty prompt", dict(input_ids=torch.empty(1, 0, dtype=torch.long)), MODES, ValueError,
     ["input_ids", "(1, 0)", "length >= 1"]),
    ("empty batch", dict(input_ids=torch.empty(0, 5, dtype=torch.long)), MODES, ValueError,
     ["input_ids", "(0, 5)", "batch >= 1"]),
    ("float ids", dict(input_ids=IDS.float()), MODES, TypeError, ["input_ids", "torch.float32", "torch.long"]),
    ("1-D ids", dict(input_ids=IDS[0]), MODES, ValueError, ["input_ids", "(5,)", "2 dimensions"]),
    ("3-D ids", dict(input_ids=IDS[None]), MODES, ValueError, ["input_ids", "(1, 1, 5)", "2 dimensions"]),
    ("a list of ids", dict(input_ids=[[5, 17, 42]]), MODES, TypeError, ["input_ids", "[[5, 17, 42]]", "LongTensor"]),
    ("id = vocab_size", dict(input_ids=torch.tensor([[5, 64]])), MODES, ValueError,
     ["input_ids", "64", "[0, vocab_size=64)"]),
    ("negative id", dict(input_ids=torch.tensor([[5, -1]])), MODES, ValueError,
     ["input_ids", "-1", "[0, vocab_size=64)"]),
    ("fractional max_new_tokens", dict(max_new_tokens=2.5), MODES, TypeError, ["max_new_tokens", "2.5", "int"]),
    # diffusion refused it before; the other modes emitted the mask id at the budget
    ("end_think_token_id = mask id", dict(max_thinking_tokens=2, end_think_token_id=MASK_ID), ("ar",) + NON_AR[1:],
     ValueError, ["end_think_token_id", str(MASK_ID), "mask token"]),
]


def _generate(model, mode, **arguments):
    arguments.setdefault("input_ids", IDS)
    arguments.setdefault("max_new_tokens", 6)
    block = {} if mode == "ar" else dict(block_size=4)
    with torch.no_grad():
        return model.generate(decode_mode=mode, **block, **arguments)


def _expand(cases):
    return [pytest.param(mode, *case[1:2], *case[3:], id=f"{case[0]}-{mode}") for case in cases for mode in case[2]]


@pytest.mark.parametrize("mode,arguments,error,words", _expand(GENERATE_CASES))
def test_generate_refuses(model, mode, arguments, error, words):
    with pytest.raises(error) as raised:
        _generate(model, mode, **arguments)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


# The model config edited after the model was built is checked again at generate() time.
CONFIG_EDITS = [
    ("mask id past the vocabulary", dict(mask_token_id=9999), ValueError, ["mask_token_id", "9999", "vocab_size=64"]),
    ("negative mask id", dict(mask_token_id=-1), ValueError, ["mask_token_id", "-1"]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("edit,error,words", [pytest.param(*c[1:], id=c[0]) for c in CONFIG_EDITS])
def test_generate_revalidates_an_edited_model_config(mode, edit, error, words):
    model = tiny_model()
    for field, value in edit.items():
        setattr(model.config, field, value)
    with pytest.raises(error) as raised:
        _generate(model, mode)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


# (generate arguments, modes, words the warning must contain): settings that the mode does not read
IGNORED_SETTINGS = [
    (dict(max_denoising_steps=2), ("ar", "linear_spec", "quadratic_spec"), ["max_denoising_steps", "does not apply"]),
    (dict(confidence_threshold=0.5), ("ar",), ["confidence_threshold", "decode_mode='ar'"]),
    (dict(end_think_token_id=5), MODES, ["end_think_token_id", "max_thinking_tokens"]),
]


@pytest.mark.parametrize(
    "mode,arguments,words",
    [pytest.param(mode, a, w, id=f"{next(iter(a))}-{mode}") for a, modes, w in IGNORED_SETTINGS for mode in modes],
)
def test_settings_that_do_not_apply_to_the_mode_warn(model, mode, arguments, words):
    with pytest.warns(UserWarning) as caught:
        out = _generate(model, mode, **arguments)
    messages = [str(w.message) for w in caught if all(word in str(w.message) for word in words)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert out.shape == (1, IDS.shape[1] + 6)


# ------------------------------------------------------------------------------------------- memory and blocks
@pytest.mark.parametrize("mode", NON_AR)
def test_a_huge_budget_allocates_nothing_up_front(model, mode):
    """max_new_tokens=10**12 (an 8 TB token buffer if allocated up front) with EOS as the first token: one token,
    as in AR."""
    first = int(_generate(model, mode, max_new_tokens=1)[0, -1])
    out = _generate(model, mode, max_new_tokens=10**12, eos_token_id=first)
    assert out[0, IDS.shape[1]:].tolist() == [first]


@pytest.mark.parametrize("mode,cache", [("diffusion", None), ("quadratic_spec", None), ("linear_spec", "static")])
def test_a_block_larger_than_the_budget_is_cut_to_it(model, mode, cache):
    """block_size=10**6 with 4 tokens to go (a 10**12-entry attention pattern, or static cache, if not cut) runs the
    same forwards and returns the same tokens as block_size=4."""
    settings = dict(max_new_tokens=4, return_dict_in_generate=True, cache_implementation=cache)
    with torch.no_grad():
        reference = model.generate(IDS, decode_mode=mode, block_size=4, **settings)
        huge = model.generate(IDS, decode_mode=mode, block_size=10**6, **settings)
    assert torch.equal(huge.sequences, reference.sequences)
    assert torch.equal(huge.num_forwards, reference.num_forwards)


def test_diffusion_spends_no_forwards_on_slots_past_the_budget(model):
    """A 64-slot block with 4 tokens to go denoises the 4 slots only: the forwards of block_size=4."""
    settings = dict(max_new_tokens=4, return_dict_in_generate=True, confidence_threshold=None)
    with torch.no_grad():
        reference = model.generate(IDS, decode_mode="diffusion", block_size=4, **settings)
        wide = model.generate(IDS, decode_mode="diffusion", block_size=64, **settings)
    assert torch.equal(wide.sequences, reference.sequences)
    # the prefill (which seeds slot 0) and one denoising step per remaining slot; the row is done before a commit
    assert wide.num_forwards.tolist() == reference.num_forwards.tolist() == [1 + 3]


@pytest.mark.parametrize("mode", NON_AR)
def test_infinite_temperature_samples_uniformly_in_every_mode(model, mode):
    """temperature=inf: AR samples uniformly over the vocabulary; so does every other mode (the mask token, which
    the non-AR modes exclude before the processors, stays excluded in diffusion) instead of failing on NaN."""
    torch.manual_seed(0)
    out = _generate(model, mode, input_ids=IDS.expand(16, -1), max_new_tokens=8, do_sample=True,
                    temperature=math.inf)
    new = out[:, IDS.shape[1]:]
    assert new.shape == (16, 8) and int(new.min()) >= 0 and int(new.max()) < 64
    assert len(set(new.flatten().tolist())) > 40  # 128 uniform draws from 64 ids hit about 55 of them
    if mode == "diffusion":
        assert MASK_ID not in new.flatten().tolist()


# ------------------------------------------------------------------------------------ from_pretrained, pipeline
def test_from_pretrained_refuses_a_folder_without_config(tmp_path):
    """It used to build the class's default (8B-shaped) config and load the weights into it."""
    folder = save_tiny_folder(tmp_path / "no-config")
    (folder / "config.json").unlink()
    with pytest.raises(OSError) as raised:
        NemotronDiffusionForCausalLM.from_pretrained(folder)
    for word in ("config.json", str(folder)):
        assert word in str(raised.value), (word, str(raised.value))


# (name, pipeline call arguments, exception type, words)
PIPELINE_CASES = [
    ("fractional max_new_tokens", dict(max_new_tokens=2.5, decode_mode="linear_spec"), TypeError,
     ["max_new_tokens", "2.5"]),
    ("end_think_token_id = mask id", dict(decode_mode="quadratic_spec", max_thinking_tokens=1,
                                          end_think_token_id=MASK_ID), ValueError, ["end_think_token_id", "mask"]),
    ("edited mask id", dict(decode_mode="ar", mask_token_id=99), ValueError, ["mask_token_id", "99"]),
]


@pytest.mark.parametrize("arguments,error,words", [pytest.param(*c[1:], id=c[0]) for c in PIPELINE_CASES])
def test_pipeline_refuses(folder, arguments, error, words):
    generator = pipeline("text-generation", model=str(folder))
    arguments = dict(arguments)
    if "mask_token_id" in arguments:
        generator.model.config.mask_token_id = arguments.pop("mask_token_id")
    with pytest.raises(error) as raised:
        generator("hello the sea", max_new_tokens=arguments.pop("max_new_tokens", 4), block_size=4, **arguments)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


# ---------------------------------------------------------------------------------------------------------- CLI
def cli(capsys, *args, stdin=None, monkeypatch=None):
    """(exit status, stdout, stderr) of `nemotron-diffusion *args`, run in this process (the worktree's code)."""
    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:
        status = exit.code
    return (status, *capsys.readouterr())


@pytest.fixture(scope="module")
def broken_folders(folder, tmp_path_factory):
    """Folders the CLI must refuse: truncated weights, a tensor missing, no tokenizer."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken")
    truncated = root / "truncated"
    shutil.copytree(folder, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    incomplete = root / "incomplete"
    shutil.copytree(folder, incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["encoder.layers.0.mlp.down_proj.weight"]
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    no_tokenizer = root / "no-tokenizer"
    tiny_model().save_pretrained(no_tokenizer)
    return {"truncated": truncated, "incomplete": incomplete, "no-tokenizer": no_tokenizer}


# (name, arguments after `generate hello`, words the one error line must contain); {name} = a broken folder
CLI_CASES = [
    ("infinite temperature", ("-m", "{tiny}", "--temperature", "inf", "--mode", "linear_spec"),
     ["--temperature", "'inf'", "finite"]),
    ("truncated weights", ("-m", "{truncated}"), ["--model", "truncated", ".safetensors", "incomplete metadata"]),
    ("a tensor missing", ("-m", "{incomplete}"), ["--model", "incomplete", "encoder.layers.0.mlp.down_proj.weight"]),
    ("no tokenizer", ("-m", "{no-tokenizer}"), ["tokenizer", "from one of: (1)", "(3)"]),
]


def _one_line_error(status, err, words):
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error:" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("arguments,words", [pytest.param(c[1], c[2], id=c[0]) for c in CLI_CASES])
def test_cli_refuses_in_one_line(capsys, folder, broken_folders, arguments, words):
    paths = {"tiny": folder, **broken_folders}
    arguments = [a.format(**{k: str(v) for k, v in paths.items()}) for a in arguments]
    status, _, err = cli(capsys, "generate", "hello", "--max-new-tokens", 3, *arguments)
    _one_line_error(status, err, words)


def test_cli_refusal_in_a_fresh_process_has_no_traceback(broken_folders):
    """The installed module run as a program, on the worktree's code (PYTHONPATH): the same single error line."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "nemotron_diffusion", "generate", "hi", "-m", str(broken_folders["truncated"])],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )
    ours = [line for line in run.stderr.splitlines() if line.startswith("nemotron-diffusion")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(ours) == 1 and "truncated or corrupt" in ours[0], run.stderr


def test_cli_internal_error_is_one_line_with_status_1(capsys, folder, monkeypatch):
    """A failure that is not the caller's mistake (here generate() raising as an out-of-memory would): one line,
    status 1, the traceback only with --verbose."""

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 8.00 GiB")

    monkeypatch.setattr(NemotronDiffusionForCausalLM, "generate", out_of_memory)
    status, _, err = cli(capsys, "generate", "hello", "-m", folder, "--max-new-tokens", 3)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "RuntimeError: CUDA out of memory. Tried to allocate 8.00 GiB" in lines[0] and "--verbose" in lines[0]
    with pytest.raises(RuntimeError):
        main(["--verbose", "generate", "hello", "-m", str(folder), "--max-new-tokens", "3"])


@pytest.fixture(scope="module")
def stops_at_once(tmp_path_factory):
    """A tiny folder whose EOS is the first token it generates for the chat prompt 'hello', in every mode."""
    model, tok = tiny_model(), word_tokenizer()
    inputs = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    first = int(model.generate(**inputs, max_new_tokens=1)[0, -1])
    model.generation_config.eos_token_id = first
    return save_tiny_folder(tmp_path_factory.mktemp("eos") / "stops", model=model), tok.decode([first])


@pytest.mark.parametrize("mode", ("linear_spec", "diffusion"))
def test_cli_huge_max_new_tokens_generates(capsys, stops_at_once, mode):
    path, first = stops_at_once
    status, out, err = cli(capsys, "generate", "hello", "-m", path, "--max-new-tokens", 99999999999, "--mode", mode,
                           "--block-size", 4)
    assert status == 0, err
    assert out == first + "\n"


def test_chat_huge_max_new_tokens_replies(capsys, monkeypatch, stops_at_once):
    path, first = stops_at_once
    status, out, err = cli(capsys, "chat", "-m", path, "--mode", "linear_spec", "--no-stream",
                           stdin="/max-new-tokens 99999999999\nhello\n", monkeypatch=monkeypatch)
    assert status == 0 and "Traceback" not in err, err
    assert out.strip() == first


@pytest.mark.parametrize("flags,words", [
    (("--block-size", "4"), ["--block-size 4", "--mode ar"]),
    (("--threshold", "0.5"), ["--threshold 0.5", "--mode ar"]),
])
def test_cli_flags_that_do_not_apply_to_ar_warn(capsys, folder, flags, words):
    status, out, err = cli(capsys, "generate", "hello", "-m", folder, "--mode", "ar", "--max-new-tokens", 3, *flags)
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert status == 0 and out.strip(), err
    assert len(warnings) == 1 and all(word in warnings[0] for word in words), err
