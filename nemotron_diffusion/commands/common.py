"""Pieces the subcommands share: loading a model folder, building a prompt, reading mode flags."""

import os

from ..cli import UserError
from ..generation_nemotron_diffusion import DECODE_MODES


def add_model_arguments(parser):
    parser.add_argument("--model", "-m", default=None, help="model folder (ours or NVIDIA's layout)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")


def add_mode_arguments(parser):
    parser.add_argument("--mode", default="ar", choices=DECODE_MODES, help="decoding mode (default: ar)")
    parser.add_argument("--block-size", type=int, default=None, help="block / draft size")
    parser.add_argument("--threshold", type=float, default=None, help="confidence_threshold")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=256)


def load_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nemotron_diffusion  # noqa: F401  (registers the model type)

    path = args.model
    if path is None:
        raise UserError("no model given: pass --model FOLDER")
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"--model {path!r} is not a model folder (no config.json there)")
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load --model {path!r}: {str(error).splitlines()[0]}") from error
    return model, tokenizer


def generation_kwargs(args):
    kwargs = dict(decode_mode=args.mode, max_new_tokens=args.max_new_tokens)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.block_size is not None:
        kwargs["block_size"] = args.block_size
    if args.threshold is not None:
        kwargs["confidence_threshold"] = args.threshold
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature)
    else:
        kwargs["do_sample"] = False
    return kwargs


def encode_prompt(tokenizer, messages_or_text, raw=False):
    """Chat template with a generation prompt when the tokenizer has one (and `raw` is off), else plain text."""
    if isinstance(messages_or_text, str):
        if raw or not getattr(tokenizer, "chat_template", None):
            return tokenizer(messages_or_text, return_tensors="pt").input_ids
        messages_or_text = [{"role": "user", "content": messages_or_text}]
    text = tokenizer.apply_chat_template(messages_or_text, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
