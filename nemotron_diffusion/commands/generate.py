"""`nemotron-diffusion generate`: one prompt in, text out, in any decoding mode."""

import time

from ..cli import UserError
from .common import add_mode_arguments, add_model_arguments, encode_prompt, generation_kwargs, load_model


HELP = "generate text from a prompt in any decoding mode"


def add_arguments(parser):
    parser.add_argument("prompt", help="the prompt (a user message when the model has a chat template)")
    add_model_arguments(parser)
    add_mode_arguments(parser)
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    parser.add_argument("--stats", action="store_true", help="print forwards, tokens per forward and tok/s")


def run(args):
    from transformers import TextStreamer

    kwargs = generation_kwargs(args)
    model, tokenizer = load_model(args)
    input_ids = encode_prompt(tokenizer, args.prompt, raw=args.raw).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    start = time.perf_counter()
    try:
        out = model.generate(input_ids, streamer=streamer, return_dict_in_generate=True, **kwargs)
    except ValueError as error:
        raise UserError(str(error)) from error
    seconds = time.perf_counter() - start
    new = out.sequences[0, input_ids.shape[1]:]
    if not args.stream:
        print(tokenizer.decode(new, skip_special_tokens=True))
    if args.stats:
        forwards = int(out.num_forwards[0])
        print(
            f"[{args.mode}] {len(new)} new tokens, {forwards} forwards, "
            f"{len(new) / max(forwards, 1):.2f} tokens/forward, {len(new) / seconds:.1f} tok/s"
        )
    return 0
