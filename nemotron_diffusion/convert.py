# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint conversion into this package's tri-mode format.

* `convert_checkpoint(src, dst)`: a Llama, Mistral or Ministral3 causal LM (a model folder, or a GGUF file that
  transformers can read) becomes a `NemotronDiffusionForCausalLM` folder: the same weights under NVIDIA's module
  names, the tied head kept (`tie_word_embeddings`), RoPE parameters mapped (plus `llama_4_scaling_beta` 0, i.e. no
  Llama-4 query scaling), a mask token chosen or added and recorded in `config.mask_token_id`, the tokenizer (with its
  chat template) and generation config carried over. The result is checked against the source model: AR logits on
  a probe sequence must agree.
* `convert_nvidia_folder(src, dst)`: an NVIDIA Nemotron-Labs-Diffusion folder rewritten to use this package's remote
  code (our three model files and an `auto_map`), weights untouched (hard-linked, symlinked or copied).

This module is tooling beside the model files: it imports them, never the other way round.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral3")
ADDED_MASK_TOKEN = "<|mask|>"
# Tokens whose name says they are free for a new purpose, in order of preference.
_MASK_NAMES = ("<|mask|>", "<mask>", "[MASK]", "<|MASK|>", "<MASK>")
_RESERVED_PATTERN = re.compile(r"reserved|unused|^\[control_\d+\]$|^<SPECIAL_\d+>$", re.IGNORECASE)


def _our_model_files():
    """The model files a folder needs as remote code: the modeling module and every module it imports relatively
    (what `save_pretrained` copies)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    modeling = Path(__file__).resolve().parent / "modeling_nemotron_diffusion.py"
    return sorted([modeling.name, *(Path(f).name for f in get_relative_import_files(str(modeling)))])


@dataclass
class ConversionReport:
    """What `convert_checkpoint` did, and how closely the converted model reproduces the source."""

    source: str
    destination: str
    model_type: str
    mask_token: str
    mask_token_id: int
    mask_token_added: bool
    vocab_size: int
    max_abs_logit_diff: float
    greedy_tokens_equal: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        how = "added" if self.mask_token_added else "existing token"
        lines = [
            f"converted {self.model_type} {self.source} -> {self.destination}",
            f"  mask token {self.mask_token!r} (id {self.mask_token_id}, {how}); vocab {self.vocab_size}",
            f"  AR check: max |logit diff| {self.max_abs_logit_diff:.3g}, greedy tokens equal: {self.greedy_tokens_equal}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- loading
def _split_source(src) -> tuple[str, str | None]:
    """(folder, gguf_file or None) for a model folder or a `.gguf` file."""
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a path (str or os.PathLike), got {type(src).__name__}")
    path = Path(src)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"src={str(src)!r} is a file but not a .gguf file; pass a model folder or a GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"src={str(src)!r} is a folder without config.json: not a transformers model folder")
        return str(path), None
    raise ValueError(f"src={str(src)!r} does not exist")


def _source_text_config(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        text = getattr(config, "text_config", None)
        if text is not None and getattr(text, "model_type", None) in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"src is a multimodal {model_type!r} checkpoint; convert its text model (a {text.model_type!r} "
                "folder) instead"
            )
        raise ValueError(
            f"src has model_type={model_type!r}; supported source architectures: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def load_source(src, dtype=None):
    """Loads (model, tokenizer, config) of a Llama / Mistral / Ministral3 folder or GGUF file, on the CPU.

    A GGUF file is dequantized by transformers (it needs the `gguf` and `accelerate` packages)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _split_source(src)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        import importlib.util

        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"src={str(src)!r} is a GGUF file: transformers reads it with the packages gguf and "
                             f"accelerate; install them: pip install {' '.join(missing)}")
    config = _source_text_config(AutoConfig.from_pretrained(folder, **extra))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto", **extra)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    return model, tokenizer, config


# --------------------------------------------------------------------------------------------------- config
def map_rope_parameters(source_config) -> dict:
    """The source's RoPE parameters for our Ministral3-based attention.

    Llama / Mistral RoPE types (`default`, `linear`, `dynamic`, `llama3`, `yarn`, ...) are kept as they are; the
    Llama-4 query scaling that Ministral3 attention applies is switched off (`llama_4_scaling_beta` 0) unless the
    source is a Ministral3 model, whose own value is kept."""
    params = getattr(source_config, "rope_parameters", None)
    params = dict(params) if params else {}
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    params.pop("type", None)
    if "rope_theta" not in params:
        theta = getattr(source_config, "rope_theta", None)
        if theta is None:
            raise ValueError("source config has no rope_theta (neither in rope_parameters nor at the top level)")
        params["rope_theta"] = float(theta)
    if source_config.model_type != "ministral3":
        params["llama_4_scaling_beta"] = 0.0
    return params


def _choose_mask_token(tokenizer, mask_token=None) -> tuple[str, int | None]:
    """(token, id or None when it must be added). Preference: the caller's choice, a token named like a mask, a
    reserved / unused special token, else a new `<|mask|>`."""
    vocab = tokenizer.get_vocab()
    if mask_token is not None:
        if isinstance(mask_token, bool) or not isinstance(mask_token, (str, int)):
            raise TypeError(f"mask_token must be a token string or an id, got {type(mask_token).__name__}")
        if isinstance(mask_token, int):
            if not 0 <= mask_token < len(tokenizer):
                raise ValueError(f"mask_token={mask_token} is not an id of the tokenizer (size {len(tokenizer)})")
            return tokenizer.convert_ids_to_tokens(mask_token), mask_token
        return mask_token, vocab.get(mask_token)
    existing = getattr(tokenizer, "mask_token", None)
    if existing and existing in vocab:
        return existing, vocab[existing]
    for name in _MASK_NAMES:
        if name in vocab:
            return name, vocab[name]
    specials = sorted(
        (token_id, str(token))
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(token, "special", True)
    )
    named = {getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "unk", "pad", "sep", "cls")}
    for token_id, token in specials:
        if _RESERVED_PATTERN.search(token) and token_id not in named:
            return token, token_id
    return ADDED_MASK_TOKEN, None


def build_config(source_config, mask_token_id: int, vocab_size: int, notes: list):
    from .configuration_nemotron_diffusion import NemotronDiffusionConfig

    c = source_config
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"source hidden_act={c.hidden_act!r}: only SwiGLU ('silu') models can be converted")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            raise ValueError(f"source {flag}=True: the tri-mode architecture has no biases")
    if getattr(c, "sliding_window", None) is not None:
        notes.append(
            f"source sliding_window={c.sliding_window} dropped (full attention): outputs agree for sequences up to "
            "that length"
        )
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    eos = c.eos_token_id
    return NemotronDiffusionConfig(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        initializer_range=getattr(c, "initializer_range", 0.02),
        rope_parameters=map_rope_parameters(c),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=getattr(c, "pad_token_id", None),
        mask_token_id=mask_token_id,
        sliding_window=None,
        attn_implementation="sdpa",
    )


def _state_dict_for_ours(source_model, tie: bool) -> dict:
    state = {}
    for key, tensor in source_model.state_dict().items():
        if key.startswith("model."):
            state["encoder." + key[len("model."):]] = tensor
        elif key == "lm_head.weight":
            if not tie:
                state["diffusion_head.weight"] = tensor
        elif key.endswith(("rotary_emb.inv_freq", "original_inv_freq")):
            continue
        else:
            raise ValueError(f"unexpected source weight {key!r}: not a Llama/Mistral causal LM layout")
    return state


# --------------------------------------------------------------------------------------------------- convert
def _probe_ids(tokenizer, vocab_size, length=48):
    text = (
        "def reverse(s):\n    \"\"\"Return the string reversed.\"\"\"\n    return s[::-1]\n\n"
        "The quick brown fox jumps over the lazy dog."
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids[:length] if tokenizer is not None else []
    if len(ids) < 8:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
    return torch.tensor([ids])


@torch.no_grad()
def verify_ar_equivalence(source_model, model, input_ids, new_tokens: int = 8) -> tuple[float, bool]:
    """(max |logit difference| over the source vocabulary, greedy continuations equal) on `input_ids`."""
    src_vocab = source_model.config.vocab_size
    ref = source_model(input_ids).logits.float()
    ours = model(input_ids).logits.float()[..., :src_vocab]
    diff = float((ref - ours).abs().max())
    ids_a = ids_b = input_ids
    for _ in range(new_tokens):
        ids_a = torch.cat([ids_a, source_model(ids_a).logits[:, -1:].argmax(-1)], dim=1)
        ids_b = torch.cat([ids_b, model(ids_b).logits[:, -1:, :src_vocab].argmax(-1)], dim=1)
    return diff, bool(torch.equal(ids_a, ids_b))


def convert_checkpoint(
    src,
    dst,
    mask_token=None,
    dtype=None,
    tolerance: float = 1e-3,
    verify: bool = True,
    overwrite: bool = False,
) -> ConversionReport:
    """Converts a Llama / Mistral / Ministral3 folder or GGUF file into a tri-mode folder at `dst`.

    Args:
        src: model folder (config.json + weights + tokenizer) or a `.gguf` file.
        dst: output folder; must not exist (or be empty) unless `overwrite`.
        mask_token: token string or id to use as the mask; by default a token named like a mask, else a reserved /
            unused special token, else a new `<|mask|>` token is added (embedding row zero; the vocabulary grows by
            one and the head's new logit is 0).
        dtype: torch dtype of the saved weights (default: the source's; GGUF files dequantize to float32).
        tolerance: largest accepted |logit difference| against the source, relative to the largest |logit|.
        verify: run the AR check (logits and an 8-token greedy continuation).
    """
    from .modeling_nemotron_diffusion import NemotronDiffusionForCausalLM

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid; allowed: a number >= 0")
    if not isinstance(dst, (str, os.PathLike)):
        raise TypeError(f"dst must be a path (str or os.PathLike), got {type(dst).__name__}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"dst={str(dst)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    source_model, tokenizer, source_config = load_source(src, dtype)
    notes = []

    token, token_id = _choose_mask_token(tokenizer, mask_token)
    added = token_id is None
    source_vocab = source_model.config.vocab_size
    vocab_size = source_vocab
    if added:
        tokenizer.add_special_tokens({"mask_token": token})
        token_id = tokenizer.convert_tokens_to_ids(token)
        vocab_size = max(source_vocab, token_id + 1)
        notes.append(f"added {token!r} as id {token_id}; embedding rows grown {source_vocab} -> {vocab_size}")
    else:
        if token_id >= source_vocab:
            raise ValueError(f"mask_token {token!r} has id {token_id} outside the model's vocabulary ({source_vocab})")
        if getattr(tokenizer, "mask_token", None) != token:
            tokenizer.add_special_tokens({"mask_token": token})

    config = build_config(source_config, token_id, vocab_size, notes)
    weight_dtype = next(source_model.parameters()).dtype
    config.dtype = weight_dtype
    # Built on the meta device (no random initialisation of a second full-size model), then given the source tensors.
    with torch.device("meta"):
        model = NemotronDiffusionForCausalLM(config)
    state = _state_dict_for_ours(source_model, config.tie_word_embeddings)
    if vocab_size != source_vocab:
        for key in ("encoder.embed_tokens.weight", "diffusion_head.weight"):
            if key in state:
                old = state[key]
                grown = old.new_zeros((vocab_size, old.shape[1]))
                grown[:source_vocab] = old
                state[key] = grown
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "diffusion_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the tri-mode layout: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    # Non-persistent buffers (the rotary frequencies) are recomputed from the config.
    model.encoder.rotary_emb = type(model.encoder.rotary_emb)(config=config)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"conversion left tensors without values: {still_meta[:5]}")
    model = model.to(weight_dtype).eval()
    model.generation_config = _generation_config(source_model, config)

    diff, same_tokens = float("nan"), True
    if verify:
        probe = _probe_ids(tokenizer, source_vocab)
        diff, same_tokens = verify_ar_equivalence(source_model, model, probe)
        with torch.no_grad():
            scale = float(source_model(probe).logits.abs().max())
        if not diff <= tolerance * max(scale, 1.0) or not same_tokens:
            raise ValueError(
                f"conversion check failed: max |logit diff| {diff:.3g} (scale {scale:.3g}), greedy tokens equal: "
                f"{same_tokens}"
            )
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    report = ConversionReport(
        source=str(src),
        destination=str(dst),
        model_type=source_config.model_type,
        mask_token=token,
        mask_token_id=token_id,
        mask_token_added=added,
        vocab_size=vocab_size,
        max_abs_logit_diff=diff,
        greedy_tokens_equal=same_tokens,
        notes=notes,
    )
    (dst / "conversion.json").write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    return report


def _generation_config(source_model, config):
    from transformers import GenerationConfig

    source = getattr(source_model, "generation_config", None)
    values = source.to_diff_dict() if source is not None else {}
    values = {k: v for k, v in values.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id", "temperature", "top_p", "top_k")}
    values.setdefault("eos_token_id", config.eos_token_id)
    values.setdefault("bos_token_id", config.bos_token_id)
    if config.pad_token_id is not None:
        values.setdefault("pad_token_id", config.pad_token_id)
    return GenerationConfig(**{k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})


# --------------------------------------------------------------------------------------------------- NVIDIA
def convert_nvidia_folder(src, dst, link: str = "hardlink", overwrite: bool = False) -> list[str]:
    """Rewrites an NVIDIA Nemotron-Labs-Diffusion folder to load with this package's remote code.

    `config.json` keeps every field but gets our `auto_map`; our model files are written beside it; NVIDIA's
    own `*.py` files are left out; every other file and folder (weights, tokenizer, generation config, the
    `linear_spec_lora` adapter) is carried over untouched: `link` = "hardlink" (falls back to a copy across
    file systems), "symlink" or "copy". Returns the names written."""
    from .modeling_nemotron_diffusion import _AUTO_MAP

    for name, value in (("src", src), ("dst", dst)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    if link not in ("hardlink", "symlink", "copy"):
        raise ValueError(f"link={link!r} is invalid; allowed: 'hardlink', 'symlink', 'copy'")
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"src={str(src)!r} is not a model folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "nemotron_labs_diffusion":
        raise ValueError(
            f"src={str(src)!r} has model_type={config.get('model_type')!r}, not 'nemotron_labs_diffusion': use "
            "`convert` without --from-nvidia for Llama / Mistral / Ministral3 checkpoints"
        )
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise ValueError(f"src={str(src)!r} has no weight files (*.safetensors)")
    if src.resolve() == dst.resolve():
        raise ValueError("dst must differ from src (the source folder is left untouched)")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"dst={str(dst)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    dst.mkdir(parents=True, exist_ok=True)

    written = []
    for entry in sorted(src.iterdir()):
        if entry.name == "config.json" or entry.suffix == ".py" or entry.name == "__pycache__":
            continue
        target = dst / entry.name
        if target.exists() or target.is_symlink():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        elif link == "symlink":
            target.symlink_to(entry.resolve())
        elif link == "hardlink":
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)
        else:
            shutil.copy2(entry, target)
        written.append(entry.name)

    package_dir = Path(__file__).resolve().parent
    for name in _our_model_files():
        shutil.copy2(package_dir / name, dst / name)
        written.append(name)
    config["auto_map"] = dict(_AUTO_MAP)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    return written


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ConversionReport",
    "convert_checkpoint",
    "convert_nvidia_folder",
    "load_source",
    "map_rope_parameters",
    "verify_ar_equivalence",
]
