"""The model under test (a folder, the demo, or random weights of a given shape) and its stock transformers twin."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .. import NemotronDiffusionConfig, NemotronDiffusionForCausalLM, native_twin
from ..cli import UserError
from ..commands import common
from .arguments import RANDOM_SHAPES, BenchError
from ..drafting_nemotron_diffusion import peft_base_module
from .report import display_path

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _random_shape(spec):
    name, *overrides = [p.strip() for p in spec.split(",") if p.strip()] or [""]
    if name not in RANDOM_SHAPES:
        raise BenchError(f"--random {spec!r}: unknown shape {name!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    shape = dict(RANDOM_SHAPES[name])
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in shape or not value.isdigit() or int(value) < 1:
            raise BenchError(f"--random {spec!r}: {item!r} is not KEY=INT with KEY in {', '.join(shape)}")
        shape[key] = int(value)
    return name, shape


def random_model(spec, dtype, device):
    name, s = _random_shape(spec)
    try:
        config = NemotronDiffusionConfig(
            vocab_size=s["vocab"],
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            head_dim=s["head_dim"],
            mask_token_id=s["vocab"] - 1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="sdpa",
        )
    except ValueError as error:
        raise BenchError(f"--random {spec!r}: {error}") from None
    torch.manual_seed(0)
    model = NemotronDiffusionForCausalLM(config).to(dtype=dtype, device=device).eval()
    description = f"random weights ({name}: " + ", ".join(f"{k}={v}" for k, v in s.items()) + ")"
    return model, None, description


def load_bench_model(args):
    """(model, tokenizer or None, description, drafter folder or None)."""
    if args.random is not None:
        if args.model is not None:
            raise BenchError("--random and --model exclude each other")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer, description = random_model(args.random, DTYPES[args.dtype] or torch.float32, device)
        return model, tokenizer, description, None
    try:
        model, tokenizer = common.load_model(args)
        path = common.resolve_model_path(args.model) if args.model is not None else common.default_model_path()
    except UserError as error:
        raise BenchError(str(error)) from None
    drafter = None
    if any(hasattr(m, "lora_A") for m in model.modules()):
        drafter = common._drafter_folder(args.drafter, path, demo=args.model is None)
    if args.model is None:
        description = "the demo model (SmolLM2-135M-Instruct, tri-mode; nemotron_diffusion.demo.demo_path())"
    else:
        description = display_path(path)
    return model, tokenizer, description, drafter


def adapter_digest(folder):
    """sha256 (first 16 hex digits) of a drafter's weights file, to identify the adapter measured."""
    if not folder:
        return None
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = Path(folder) / name
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return None


def stock_twin(model):
    """The stock transformers model a user would run instead, on the same base weights (a drafter's adapters left
    out), shared, not copied: `LlamaForCausalLM` for a Llama configuration (the demo, converted from SmolLM2), else
    `Ministral3ForCausalLM`, whose layers ours are."""
    return native_twin.native_twin(model, base_module=peft_base_module)


def ministral3_twin(model):
    """`Ministral3ForCausalLM` on the same base weights: stock generate() with layer code identical to ours, so that
    the AR-overhead check can separate our loop's overhead from the layers' (Ministral3 computes its Llama-4 query
    scale in every attention call, even at beta 0)."""
    return native_twin.ministral3_twin(model, base_module=peft_base_module)


def base_head_modules(model):
    """The LM head of `model` and, under a PEFT wrapper, its base module (both are timed as head calls)."""
    return {model.diffusion_head, peft_base_module(model.diffusion_head)}
