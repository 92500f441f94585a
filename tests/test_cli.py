"""The `nemotron-diffusion` command line: generate and chat in every mode, --help for every subcommand, and user
errors as one line with exit status 2 (never a traceback)."""

import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

from nemotron_diffusion.cli import COMMANDS, main
from conftest import tiny_model
from tiny_tokenizer import save_tiny_folder, word_tokenizer


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_folder(tmp_path_factory.mktemp("cli") / "tiny"))


def cli(capsys, *args, stdin=None, monkeypatch=None):
    """(exit status, stdout, stderr) of `nemotron-diffusion *args`, run in this process."""
    capsys.readouterr()  # drop what earlier steps printed
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:  # argparse: --help, bad flags
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def reply(model, tok, conversation, mode="ar", max_new_tokens=8, raw=False, **kwargs):
    """What generate decodes for a conversation (chat template) or, with raw, a plain prompt."""
    if raw:
        enc = tok(conversation, return_tensors="pt")
    else:
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, decode_mode=mode, **kwargs)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def one_line_error(status, err, *needles):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------------------------------ help
def test_every_subcommand_has_help(capsys):
    status, out, _ = cli(capsys, "--help")
    assert status == 0
    for name in COMMANDS:
        assert name in out
    for name in COMMANDS:
        status, out, _ = cli(capsys, name, "--help")
        assert status == 0 and out.startswith(f"usage: nemotron-diffusion {name}"), name
    status, out, _ = cli(capsys, "generate", "--help")
    for flag in ("--mode", "--block-size", "--threshold", "--temperature", "--max-new-tokens", "--stream", "--stats"):
        assert flag in out


# -------------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("mode", MODES)
def test_generate_every_mode(folder, capsys, mode):
    model, tok = tiny_model(), word_tokenizer()
    expected = reply(model, tok, "hello the sea", mode, block_size=4, do_sample=False)
    args = ("generate", "hello the sea", "-m", folder, "--mode", mode, "--block-size", 4, "--max-new-tokens", 8)
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    assert out == expected + "\n"
    status, streamed, _ = cli(capsys, *args, "--stream")
    assert status == 0 and streamed == out
    status, out, err = cli(capsys, *args, "--stats")
    assert status == 0 and out == expected + "\n"
    stats = err.strip().splitlines()[-1]
    assert stats.startswith(f"[{mode}] ") and "forwards" in stats and "tokens/forward" in stats and "tok/s" in stats
    if mode in ("linear_spec", "quadratic_spec"):
        assert "tokens/cycle" in stats


def test_generate_with_a_verify_tree(folder, capsys):
    """--tree-width reaches generate() in linear_spec (same text as greedy AR), and is named as ignored elsewhere."""
    model, tok = tiny_model(), word_tokenizer()
    expected = reply(model, tok, "hello the sea", "linear_spec", block_size=4, do_sample=False, tree_width=3)
    assert expected == reply(model, tok, "hello the sea", "ar", do_sample=False)
    base = ("generate", "hello the sea", "-m", folder, "--block-size", 4, "--max-new-tokens", 8, "--tree-width", 3)
    status, out, err = cli(capsys, *base, "--mode", "linear_spec")
    assert status == 0 and out == expected + "\n", err
    status, out, err = cli(capsys, *base, "--mode", "quadratic_spec")
    assert status == 0 and "--tree-width 3 does not apply to --mode quadratic_spec; ignored" in err


def test_generate_raw_threshold_sampling_and_stdin(folder, capsys, monkeypatch):
    model, tok = tiny_model(), word_tokenizer()
    status, out, _ = cli(capsys, "generate", "hello the sea", "-m", folder, "--raw", "--max-new-tokens", 8)
    assert status == 0 and out == reply(model, tok, "hello the sea", raw=True) + "\n"
    status, out, _ = cli(
        capsys, "generate", "hello", "-m", folder, "--mode", "diffusion", "--threshold", "none", "--max-new-tokens", 8
    )
    assert status == 0
    assert out == reply(model, tok, "hello", "diffusion", confidence_threshold=None) + "\n"
    # sampling: --temperature with --seed is reproducible and is what generate samples with that seed
    args = ("generate", "hello", "-m", folder, "--temperature", 0.8, "--seed", 7, "--max-new-tokens", 8)
    status, first, _ = cli(capsys, *args)
    _, second, _ = cli(capsys, *args)
    set_seed(7)
    assert status == 0 and first == second == reply(model, tok, "hello", do_sample=True, temperature=0.8) + "\n"
    # the prompt from stdin
    status, out, _ = cli(capsys, "generate", "-", "-m", folder, "--max-new-tokens", 8, stdin="hello the sea\n",
                         monkeypatch=monkeypatch)
    assert status == 0 and out == reply(model, tok, "hello the sea\n") + "\n"


def test_generate_takes_the_mode_from_the_generation_config(tmp_path, capsys):
    model, tok = tiny_model(), word_tokenizer()
    model.generation_config.decode_mode = "diffusion"
    model.generation_config.block_size = 4
    path = str(save_tiny_folder(tmp_path / "diffusion", model=model))
    status, out, err = cli(capsys, "generate", "hello", "-m", path, "--max-new-tokens", 8, "--stats")
    assert status == 0
    assert out == reply(model, tok, "hello", "diffusion") + "\n"
    assert err.strip().splitlines()[-1].startswith("[diffusion] ")


def test_demo_model_is_the_default(folder, capsys, monkeypatch):
    demo = types.ModuleType("nemotron_diffusion.demo")
    demo.demo_path = lambda: folder
    monkeypatch.setitem(sys.modules, "nemotron_diffusion.demo", demo)
    status, out, err = cli(capsys, "generate", "hello", "--max-new-tokens", 8)
    assert status == 0 and out == reply(tiny_model(), word_tokenizer(), "hello") + "\n"
    assert "using the demo model" in err
    # without the demo module: one clear line
    monkeypatch.setitem(sys.modules, "nemotron_diffusion.demo", None)
    status, _, err = cli(capsys, "generate", "hello")
    one_line_error(status, err, "no model given", "--model")
    # a demo that cannot be built says why
    broken = types.ModuleType("nemotron_diffusion.demo")

    def fail():
        raise FileNotFoundError("the demo's weights are not installed\nsecond line")

    broken.demo_path = fail
    monkeypatch.setitem(sys.modules, "nemotron_diffusion.demo", broken)
    status, _, err = cli(capsys, "chat")
    one_line_error(status, err, "the demo's weights are not installed", "--model")


# ------------------------------------------------------------------------------------------------ user errors
BAD_FLAGS = [
    (("--mode", "fast"), ("--mode", "'fast'")),
    (("--block-size", "0"), ("--block-size", "'0'")),
    (("--block-size", "four"), ("--block-size", "'four'")),
    (("--threshold", "1.5"), ("--threshold", "'1.5'")),
    (("--temperature", "-1"), ("--temperature", "'-1'")),
    (("--max-new-tokens", "abc"), ("--max-new-tokens", "'abc'")),
    (("--dtype", "int8"), ("--dtype", "'int8'")),
    (("--no-such-flag",), ("--no-such-flag",)),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags,needles", BAD_FLAGS)
def test_bad_flag_values_are_one_line(capsys, command, flags, needles):
    args = (command, "hello", *flags) if command == "generate" else (command, *flags)
    status, _, err = cli(capsys, *args)
    one_line_error(status, err, *needles)


def test_bad_models_and_combinations_are_one_line(folder, tmp_path, capsys):
    status, _, err = cli(capsys, "generate", "hi", "-m", tmp_path / "missing")
    one_line_error(status, err, "--model", "no such folder")
    status, _, err = cli(capsys, "generate", "hi", "-m", tmp_path)
    one_line_error(status, err, "--model", "config.json")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    status, _, err = cli(capsys, "generate", "hi", "-m", other)
    one_line_error(status, err, "'gpt2'", "not a tri-mode")
    status, _, err = cli(capsys, "generate", "hi", "-m", folder, "--mode", "linear_spec", "--block-size", 1)
    one_line_error(status, err, "--block-size 1", "linear_spec")
    status, _, err = cli(capsys, "generate", "hi", "-m", folder, "--mode", "quadratic_spec", "--threshold", 0.5)
    one_line_error(status, err, "--threshold", "quadratic_spec")
    status, _, err = cli(capsys, "generate", "hi", "-m", folder, "--drafter", tmp_path / "nothing")
    one_line_error(status, err, "--drafter")
    status, _, err = cli(capsys, "generate", "  ", "-m", folder)
    one_line_error(status, err, "prompt")
    if not torch.cuda.is_available():
        status, _, err = cli(capsys, "generate", "hi", "-m", folder, "--device", "cuda")
        one_line_error(status, err, "--device", "CUDA")
    status, _, err = cli(capsys, "generate", "hi", "-m", folder, "--device", "gpu0")
    one_line_error(status, err, "--device", "'gpu0'")


def test_console_script_errors_without_traceback(folder, tmp_path):
    """The installed entry point and `python -m nemotron_diffusion.cli`, in fresh processes."""
    script = shutil.which("nemotron-diffusion", path=os.path.dirname(sys.executable))
    commands = [[script] if script else [sys.executable, "-m", "nemotron_diffusion"]]
    commands.append([sys.executable, "-m", "nemotron_diffusion.cli"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for command in commands:
        run = subprocess.run([*command, "generate", "hi", "-m", str(tmp_path / "missing")],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 2, (command, run.stderr)
        assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr, run.stderr
    run = subprocess.run([*commands[0], "generate", "hello", "-m", folder, "--max-new-tokens", "4", "--stats"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) <= 4 and "[ar] " in run.stderr
    assert "Loading weights" not in run.stderr  # transformers' progress bars are off unless --verbose


# ------------------------------------------------------------------------------------------------------ chat
CHAT_INPUT = """hello the sea
/mode diffusion
/block-size 4
the sea is blue
/stats
/mode bogus
/threshold 2
/mode quadratic_spec
/threshold 0.5
/mode linear_spec

/reset
hello
/settings
/help
/frobnicate
/quit
never read
"""


@pytest.mark.parametrize("stream", [False, True])
def test_chat_multi_turn_with_mode_switches(folder, capsys, monkeypatch, stream):
    model, tok = tiny_model(), word_tokenizer()
    flags = () if stream else ("--no-stream",)
    status, out, err = cli(capsys, "chat", "-m", folder, "--max-new-tokens", 6, *flags,
                           stdin=CHAT_INPUT, monkeypatch=monkeypatch)
    assert status == 0, err
    first = reply(model, tok, "hello the sea", max_new_tokens=6).strip()
    history = [{"role": "user", "content": "hello the sea"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "the sea is blue"}]
    second = reply(model, tok, history, "diffusion", max_new_tokens=6, block_size=4).strip()
    # after /reset only the new message counts; the mode is still the last valid one (linear_spec, block 4)
    third = reply(model, tok, "hello", "linear_spec", max_new_tokens=6, block_size=4).strip()
    assert [line.strip() for line in out.splitlines()] == [first, second, third]
    assert "[diffusion] " in err  # /stats: the last reply's stats
    assert "error: /mode bogus" in err
    assert "error: /threshold 2" in err
    assert "error: /threshold 0.5" in err  # refused under quadratic_spec
    assert "mode=linear_spec block_size=4" in err  # /settings
    assert "/mode NAME" in err  # /help
    assert "unknown command /frobnicate" in err
    assert "Traceback" not in err


def test_chat_system_message_stats_and_eof(folder, capsys, monkeypatch):
    model, tok = tiny_model(), word_tokenizer()
    status, out, err = cli(capsys, "chat", "-m", folder, "--system", "you are the sea", "--mode", "quadratic_spec",
                           "--block-size", 4, "--max-new-tokens", 6, "--no-stream", "--stats",
                           stdin="hello\n", monkeypatch=monkeypatch)  # ends at end of input
    assert status == 0
    messages = [{"role": "system", "content": "you are the sea"}, {"role": "user", "content": "hello"}]
    assert out.strip() == reply(model, tok, messages, "quadratic_spec", max_new_tokens=6, block_size=4).strip()
    assert "[quadratic_spec] " in err


def test_chat_needs_a_chat_template(tmp_path, capsys, monkeypatch):
    path = tmp_path / "no-template"
    tiny_model().save_pretrained(path)
    word_tokenizer(chat_template=False).save_pretrained(path)
    status, _, err = cli(capsys, "chat", "-m", path, stdin="hi\n", monkeypatch=monkeypatch)
    one_line_error(status, err, "chat template")


def test_cli_loads_a_folder_like_from_pretrained(folder):
    """The CLI's model is the folder's model (weights and generation config)."""
    from nemotron_diffusion.commands.common import load_model

    args = types.SimpleNamespace(model=folder, dtype="auto", device="cpu", drafter="auto")
    model, tok = load_model(args)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.generation_config.do_sample is False and tok.chat_template
