"""Pieces the subcommands share: finding and loading a model folder, decoding settings from flags, prompts, stats."""

import argparse
import contextlib
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass

from ..cli import UserError
from ..generation_config_nemotron_diffusion import DECODE_MODES


SPEC_MODES = ("linear_spec", "quadratic_spec")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------- flag value types
def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def threshold(text):
    """A confidence threshold in (0, 1], or `none` (diffusion: one slot per step; LinearSpec: one-forward drafts)."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {text!r}")
    return value


def temperature(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text!r}")
    return value


_UNSET = object()


# ------------------------------------------------------------------------------------------------- arguments
def add_model_arguments(parser):
    parser.add_argument(
        "--model", "-m", default=None,
        help="model folder (ours or NVIDIA's layout) or Hub id; default: the demo model (nemotron_diffusion.demo)",
    )
    parser.add_argument(
        "--drafter", default="auto", metavar="PATH",
        help="a PEFT LoRA drafter folder for linear_spec drafts, or 'none' (default 'auto': the demo model's drafter, "
        "or a drafter subfolder of --model such as NVIDIA's linear_spec_lora/)",
    )
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument(
        "--device", default=None,
        help="torch device (cpu, cuda, cuda:1, ...) or 'auto' to spread the model over the GPUs with "
        "device_map='auto' (default: cuda if available, else cpu)",
    )


def add_image_argument(parser):
    parser.add_argument(
        "--image", action="append", default=None, metavar="PATH",
        help="an image file for a vision-language model (repeat for several; they come before the prompt text)",
    )


def check_image_files(paths):
    """Every `--image` is an existing file (checked before the model is loaded)."""
    for path in paths or ():
        if not os.path.isfile(path):
            raise UserError(f"--image {path!r}: no such file")


def add_mode_arguments(parser):
    parser.add_argument(
        "--mode", default=None, choices=DECODE_MODES,
        help="decoding mode (default: the model's generation_config.json, else ar)",
    )
    parser.add_argument("--block-size", type=positive_int, default=None, help="slots per diffusion block / draft")
    parser.add_argument(
        "--threshold", type=threshold, default=_UNSET, metavar="T",
        help="confidence_threshold in (0, 1], or 'none' (default: 0.9 in diffusion, none in the spec modes)",
    )
    parser.add_argument(
        "--tree-width", type=positive_int, default=None, metavar="W",
        help="linear_spec, greedy: verify the drafter's top W tokens at the first draft slots as a tree (default: "
        "the model's generation config; 1 = the chain)",
    )
    parser.add_argument(
        "--temperature", type=temperature, default=None,
        help="0 = greedy; > 0 samples at this temperature (default: the model's generation config: greedy unless "
        "it sets do_sample)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=None, help="random seed (for sampling)")


# ------------------------------------------------------------------------------------------ decoding settings
@dataclass
class Settings:
    """The decoding settings of a command (a chat changes them between turns). `None` = the model's default."""

    mode: str | None = None
    block_size: int | None = None
    threshold: object = _UNSET  # a float, None (explicitly none), or _UNSET
    temperature: float | None = None
    max_new_tokens: int = 256
    tree_width: int | None = None

    @classmethod
    def from_args(cls, args):
        return cls(args.mode, args.block_size, args.threshold, args.temperature, args.max_new_tokens,
                   getattr(args, "tree_width", None))

    def resolved_mode(self, model=None):
        if self.mode is not None:
            return self.mode
        return getattr(getattr(model, "generation_config", None), "decode_mode", None) or "ar"

    def check(self, mode):
        """Combinations the flags allow one by one but the mode refuses, named by their flags."""
        if mode in SPEC_MODES and self.block_size is not None and self.block_size < 2:
            raise UserError(
                f"--block-size {self.block_size} is too small for --mode {mode} "
                "(needs >= 2: a seed slot and a draft slot)"
            )
        if mode == "quadratic_spec" and self.threshold not in (_UNSET, None):
            raise UserError(
                f"--threshold {self.threshold} does not apply to --mode quadratic_spec (it drafts the next block in "
                "the verify forward); leave it out"
            )

    def ignored_flags(self, mode):
        """The flags that are set but do not apply to `mode` (AR has no blocks and no confidence threshold; only
        LinearSpec verifies a tree)."""
        flags = [f"--tree-width {self.tree_width}"] if self.tree_width is not None and mode != "linear_spec" else []
        if mode != "ar":
            return flags
        if self.block_size is not None:
            flags.append(f"--block-size {self.block_size}")
        if self.threshold is not _UNSET:
            flags.append(f"--threshold {'none' if self.threshold is None else self.threshold}")
        return flags

    def warn_ignored(self, mode):
        """One line on stderr for each flag that does not apply to `mode`."""
        for flag in self.ignored_flags(mode):
            print(f"nemotron-diffusion: warning: {flag} does not apply to --mode {mode}; ignored", file=sys.stderr)

    def generate_kwargs(self, model=None):
        mode = self.resolved_mode(model)
        self.check(mode)
        kwargs = dict(max_new_tokens=self.max_new_tokens)
        if self.mode is not None:
            kwargs["decode_mode"] = self.mode
        if self.block_size is not None and mode != "ar":
            kwargs["block_size"] = self.block_size
        if self.threshold is not _UNSET and mode != "ar":
            kwargs["confidence_threshold"] = self.threshold
        if self.tree_width is not None and mode == "linear_spec":
            kwargs["tree_width"] = self.tree_width
        if self.temperature is not None:
            if self.temperature > 0:
                kwargs.update(do_sample=True, temperature=self.temperature)
            else:
                kwargs["do_sample"] = False
        return kwargs

    def describe(self, model=None):
        mode = self.resolved_mode(model)
        parts = [f"mode={mode}"]
        if self.block_size is not None:
            parts.append(f"block_size={self.block_size}")
        if self.threshold is not _UNSET:
            parts.append(f"threshold={self.threshold}")
        if self.tree_width is not None:
            parts.append(f"tree_width={self.tree_width}")
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature}")
        parts.append(f"max_new_tokens={self.max_new_tokens}")
        return " ".join(parts)


def generation_kwargs(args):
    """The `generate()` keyword arguments of the mode flags (`--mode`, `--block-size`, ...)."""
    return Settings.from_args(args).generate_kwargs()


# --------------------------------------------------------------------------------------------------- models
def _demo_module():
    try:
        # through sys.modules (not the package attribute), so a stand-in or a blocked module there is honoured
        demo = importlib.import_module(__package__.rsplit(".", 1)[0] + ".demo")
    except ImportError as error:
        raise UserError(f"no model given: pass --model FOLDER (the demo model is not available: {error})") from error
    return demo


def default_model_path():
    """The demo model folder (`nemotron_diffusion.demo.demo_path()`), imported only when no --model is given. What
    the demo prints while it is built the first time goes to stderr, so stdout stays the generated text."""
    demo = _demo_module()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return os.fspath(demo.demo_path())
    except Exception as error:  # the demo could not be built or found: report it as the reason, in one line
        raise UserError(
            f"no model given and the demo model is not available ({_one_line(error)}); pass --model FOLDER"
        ) from error


def resolve_model_path(path):
    if path is None:
        path = default_model_path()
        print(f"nemotron-diffusion: using the demo model at {path}", file=sys.stderr)
        return path
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"--model {path!r} is not a model folder (no config.json there)")
        return path
    if not _REPO_ID.match(path):
        raise UserError(f"--model {path!r}: no such folder")
    return path  # a Hub repo id


def _one_line(error):
    """The error's message on one line (a multi-line message joined, so nothing after its first line is lost)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def _refuse_incomplete_weights(path, loading):
    """A checkpoint with a weight missing is refused: transformers would fill it with random values and only log a
    report (which the CLI keeps quiet)."""
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise UserError(
            f"--model {path!r} is incomplete: {len(missing)} weight(s) missing from the checkpoint: {shown}"
        )


def load_model(args, **from_pretrained_kwargs):
    """Model and tokenizer of `--model` (or the demo model) on `--device`, in eval mode. `from_pretrained_kwargs`
    (the server's `quantization_config`, `attn_implementation`) go to `from_pretrained`; a quantized model is placed
    with `device_map`, since quantized weights cannot all be moved with `.to()`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import NemotronDiffusionConfig, NemotronDiffusionVLMConfig  # importing the package registers them

    path = resolve_model_path(args.model)
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "auto":
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device!r}: CUDA is not available on this machine")
    from safetensors import SafetensorError

    errors = (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError)
    try:
        config = AutoConfig.from_pretrained(path)
    except errors as error:
        raise UserError(f"cannot load --model {path!r}: {_one_line(error)}") from error
    types = (NemotronDiffusionConfig.model_type, NemotronDiffusionVLMConfig.model_type)
    if config.model_type not in types:
        raise UserError(
            f"--model {path!r} is a {config.model_type!r} model, not a tri-mode nemotron-diffusion model "
            f"(model_type {types[0]!r}, or {types[1]!r} for the vision-language model)"
        )
    auto_class = AutoModelForCausalLM
    if config.model_type == NemotronDiffusionVLMConfig.model_type:
        from transformers import AutoModelForImageTextToText as auto_class
    if getattr(args, "image", None) and config.model_type != NemotronDiffusionVLMConfig.model_type:
        raise UserError(
            f"--image needs a vision-language model (model_type {NemotronDiffusionVLMConfig.model_type!r}); "
            f"--model {path!r} is a text model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except errors as error:
        raise UserError(f"cannot load the tokenizer of --model {path!r}: {_one_line(error)}") from error
    try:
        kwargs = {k: v for k, v in from_pretrained_kwargs.items() if v is not None}
        if device == "auto":
            placement = dict(device_map="auto")
        elif "quantization_config" in kwargs:  # quantized weights are placed while loading
            placement = dict(device_map=str(device))
        else:
            placement = {}
        model, loading = auto_class.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **placement, **kwargs
        )
    except SafetensorError as error:
        raise UserError(
            f"cannot read the weights of --model {path!r} (a .safetensors file is truncated or corrupt): "
            f"{_one_line(error)}"
        ) from error
    except errors as error:
        raise UserError(f"cannot load --model {path!r}: {_one_line(error)}") from error
    _refuse_incomplete_weights(path, loading)
    if device != "auto" and "quantization_config" not in kwargs:
        model = model.to(device)
    model = _attach_drafter(model, getattr(args, "drafter", "none"), path, demo=args.model is None)
    if args.model is None and "quantization_config" not in kwargs:
        # The demo, as load_demo() has it: prepacked bf16 weights on a CPU (the same tokens, faster; a no-op in
        # float32 or on a GPU). Other models keep one copy of their weights.
        model.enable_packed_weights()
    return model.eval(), tokenizer


def _drafter_folder(choice, path, demo):
    """The drafter adapter folder for `--drafter` (None: no drafter)."""
    if choice is None or choice.lower() == "none":
        return None
    if choice.lower() != "auto":
        if not os.path.isfile(os.path.join(choice, "adapter_config.json")):
            raise UserError(f"--drafter {choice!r} is not a PEFT adapter folder (no adapter_config.json there)")
        return choice
    if demo:
        try:
            return _demo_module().demo_drafter_path()
        except Exception:  # a demo without its drafter still runs every mode
            return None
    from ..model_card import find_drafter_subfolder

    subfolder = find_drafter_subfolder(path) if os.path.isdir(path) else None
    return os.path.join(path, subfolder) if subfolder else None


def _attach_drafter(model, choice, path, demo):
    """Attaches the LoRA drafter with PEFT as adapter "drafter". generate() switches it on for linear_spec's
    bidirectional draft forwards only; every other forward of every mode runs with the base weights."""
    folder = _drafter_folder(choice, path, demo)
    if folder is None:
        return model
    try:
        import peft  # noqa: F401
    except ImportError:
        if choice.lower() == "auto":
            print("nemotron-diffusion: peft is not installed, so the drafter is not attached", file=sys.stderr)
            return model
        raise UserError(f"--drafter {choice!r} needs peft: pip install peft") from None
    try:
        if hasattr(model, "load_drafter"):  # the VLM: the adapter goes to the language layers only
            return model.load_drafter(folder)
        from ..demo import attach_drafter

        return attach_drafter(model, folder)
    except (ImportError, OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise UserError(f"cannot attach the drafter {folder!r}: {_one_line(error)}") from error


# -------------------------------------------------------------------------------------------------- prompts
def load_processor(model, tokenizer):
    """The VLM processor of the model's folder (AutoProcessor), or one built from the tokenizer and the default
    image processor when the folder has none (e.g. NVIDIA's)."""
    from transformers import AutoProcessor

    from .. import NemotronDiffusionVLMImageProcessor, NemotronDiffusionVLMProcessor

    path = getattr(model, "name_or_path", None)
    if path and os.path.isdir(path) and os.path.exists(os.path.join(path, "processor_config.json")):
        try:
            return AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot load the processor of --model {path!r}: {_one_line(error)}") from error
    try:
        return NemotronDiffusionVLMProcessor(NemotronDiffusionVLMImageProcessor(), tokenizer)
    except ValueError as error:
        raise UserError(f"cannot build a processor for --model {path!r}: {_one_line(error)}") from error


def with_images(messages, image_paths):
    """The messages with the images as image parts before the text of the first user message."""
    out, done = [], not image_paths
    for message in messages:
        if not done and message["role"] == "user":
            parts = [{"type": "image", "path": p} for p in image_paths]
            message = dict(message, content=parts + [{"type": "text", "text": message["content"]}])
            done = True
        out.append(message)
    return out


def encode_prompt_with_images(processor, messages_or_text, image_paths, raw=False):
    """`input_ids`, `attention_mask`, `pixel_values` and `image_sizes` for a prompt (or a conversation) whose first
    user message shows the images: the chat template with image parts (raw: one placeholder per image, then the
    text), then the processor's expansion of each image."""
    if isinstance(messages_or_text, str):
        if raw:
            text = processor.image_placeholder * len(image_paths) + messages_or_text
            return _process(processor, image_paths, text, add_special_tokens=True)
        messages_or_text = [{"role": "user", "content": messages_or_text}]
    messages = with_images(messages_or_text, image_paths)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _process(processor, image_paths, text, add_special_tokens=False)


def _process(processor, image_paths, text, **kwargs):
    from ..image_processing_nemotron_diffusion_vlm import NemotronDiffusionVLMImageProcessor

    images = []
    for path in image_paths:
        try:
            images.append(NemotronDiffusionVLMImageProcessor.load_image(path))
        except ValueError as error:
            raise UserError(f"--image {path!r}: {_one_line(error).split(': ', 1)[-1]}") from error
    return dict(processor(images=images, text=text, **kwargs))


def encode_prompt(tokenizer, messages_or_text, raw=False):
    """`input_ids` and `attention_mask` [1, T]: the chat template with a generation prompt when the tokenizer has
    one (and `raw` is off), else the plain text."""
    if isinstance(messages_or_text, str):
        if raw or not getattr(tokenizer, "chat_template", None):
            return dict(tokenizer(messages_or_text, return_tensors="pt"))
        messages_or_text = [{"role": "user", "content": messages_or_text}]
    text = tokenizer.apply_chat_template(messages_or_text, tokenize=False, add_generation_prompt=True)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))


# ---------------------------------------------------------------------------------------------------- stats
def format_stats(mode, output, new_tokens, seconds):
    """One line: tokens, forwards, tokens per forward, speed, and the mean acceptance of the speculative modes."""
    forwards = int(output.num_forwards[0]) if getattr(output, "num_forwards", None) is not None else None
    line = f"[{mode}] {new_tokens} new tokens"
    if forwards is not None:
        line += f", {forwards} forwards, {new_tokens / max(forwards, 1):.2f} tokens/forward"
    line += f", {new_tokens / max(seconds, 1e-9):.1f} tok/s ({seconds:.2f} s)"
    lengths = getattr(output, "acceptance_lengths", None)
    if lengths is not None:
        cycles = lengths[0][lengths[0] > 0]
        if len(cycles):
            line += f", {float(cycles.float().mean()):.2f} tokens/cycle over {len(cycles)} cycles"
    return line
