"""A saved VLM folder (model + processor) is Hub-ready: NVIDIA's key names, our files as remote code, and it loads
with trust_remote_code=True, offline, in a process that cannot import this package, generating the same tokens."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from nemotron_diffusion import NemotronDiffusionVLMImageProcessor, NemotronDiffusionVLMProcessor
from vlm_helpers import nvidia_vlm_state_dict, tiny_vlm, vlm_tokenizer


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
PROMPT = "what <|image_start|> and <|image_start|> cat"

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["nemotron_diffusion"] = None  # importing the installed package is now impossible
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    folder, images = sys.argv[1], sys.argv[2:]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = processor(images=[Image.open(p) for p in images], text=%r)
    result = {"config": type(config).__name__, "model": type(base).__name__, "processor": type(processor).__name__,
              "image_processor": type(processor.image_processor).__name__}
    for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False, decode_mode=mode, block_size=4)
        result[mode] = out[0].tolist()
    print(json.dumps(result))
    """ % PROMPT
)


def test_remote_code_round_trip_offline_without_the_package(tmp_path):
    model = tiny_vlm(seed=4)
    processor = NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), vlm_tokenizer())
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    files = set(os.listdir(folder))
    for name in ("configuration_nemotron_diffusion_vlm.py", "modeling_nemotron_diffusion_vlm.py",
                 "image_processing_nemotron_diffusion_vlm.py", "processing_nemotron_diffusion_vlm.py",
                 "configuration_nemotron_diffusion.py", "modeling_nemotron_diffusion.py",
                 "generation_nemotron_diffusion.py"):
        assert name in files, name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion_vlm"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nemotron_diffusion_vlm.NemotronDiffusionVLMConfig",
        "AutoModel": "modeling_nemotron_diffusion_vlm.NemotronDiffusionVLMForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_nemotron_diffusion_vlm.NemotronDiffusionVLMForConditionalGeneration",
    }
    assert "auto_map" not in model.config.to_dict() or model.config.auto_map is None  # the model is left unchanged
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    values = dict(json.loads((folder / "config.json").read_text()))
    assert saved_keys == set(nvidia_vlm_state_dict(values))  # NVIDIA's key names

    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(60, 30), (28, 40)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    inputs = processor(images=[Image.open(p) for p in paths], text=PROMPT)
    expected = {}
    with torch.no_grad():
        for mode in MODES:
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False, decode_mode=mode, block_size=4)
            expected[mode] = out[0].tolist()
    assert expected["linear_spec"] == expected["ar"] == expected["quadratic_spec"]

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("PYTHONPATH", None)
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(folder), *paths], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["config"] == "NemotronDiffusionVLMConfig"
    assert result["model"] == "NemotronDiffusionVLMForConditionalGeneration"
    assert result["processor"] == "NemotronDiffusionVLMProcessor"
    assert result["image_processor"] == "NemotronDiffusionVLMImageProcessor"
    for mode, tokens in expected.items():
        assert result[mode] == tokens, mode
