"""`nemotron-diffusion generate`: one prompt in, text out, in any decoding mode."""

import sys
import time

from ..cli import UserError
from .common import (
    Settings,
    add_image_argument,
    add_mode_arguments,
    add_model_arguments,
    check_image_files,
    encode_prompt,
    encode_prompt_with_images,
    format_stats,
    load_model,
    load_processor,
)


HELP = "generate text from a prompt in any decoding mode"


def add_arguments(parser):
    parser.add_argument(
        "prompt", help="the prompt ('-' reads it from stdin); a user message when the model has a chat template"
    )
    add_model_arguments(parser)
    add_image_argument(parser)
    add_mode_arguments(parser)
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--stream", action="store_true", help="print the text as tokens are committed")
    parser.add_argument(
        "--stats", action="store_true", help="print forwards, tokens per forward and tok/s (on stderr)"
    )


def run(args):
    from transformers import TextStreamer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty")
    settings = Settings.from_args(args)
    if settings.mode is not None:
        settings.check(settings.mode)  # before loading the model
    check_image_files(args.image)
    model, tokenizer = load_model(args)
    kwargs = settings.generate_kwargs(model)
    mode = settings.resolved_mode(model)
    settings.warn_ignored(mode)
    if args.image:
        encoded = encode_prompt_with_images(load_processor(model, tokenizer), prompt, args.image, raw=args.raw)
        encoded["pixel_values"] = encoded["pixel_values"].to(model.dtype)
    else:
        encoded = encode_prompt(tokenizer, prompt, raw=args.raw)
    inputs = {k: v.to(model.device) for k, v in encoded.items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    start = time.perf_counter()
    try:
        out = model.generate(**inputs, streamer=streamer, return_dict_in_generate=True, **kwargs)
    except ValueError as error:
        raise UserError(str(error)) from error
    seconds = time.perf_counter() - start
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    if not args.stream:
        print(tokenizer.decode(new, skip_special_tokens=True))
    if args.stats:
        print(format_stats(mode, out, len(new), seconds), file=sys.stderr)
    return 0
