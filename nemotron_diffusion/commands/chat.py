"""`nemotron-diffusion chat`: an interactive, multi-turn chat through the model's chat template.

Replies go to stdout; the banner, command answers, errors and stats go to stderr. Lines starting with `/` are
commands (`/help` lists them); the decoding mode and its settings can change between turns.
"""

import argparse
import sys
import time

from ..cli import UserError
from ..generation_config_nemotron_diffusion import DECODE_MODES
from .common import (
    _UNSET,
    Settings,
    add_mode_arguments,
    add_image_argument,
    add_model_arguments,
    check_image_files,
    encode_prompt,
    encode_prompt_with_images,
    format_stats,
    load_model,
    load_processor,
    positive_int,
    temperature,
    threshold,
)


HELP = "chat with a model (multi-turn, chat template; switch modes with /mode)"

COMMANDS_HELP = f"""commands:
  /mode NAME            decoding mode: {", ".join(DECODE_MODES)}
  /block-size N         block / draft size ('default' = the mode's default)
  /threshold T          confidence threshold in (0, 1], 'none', or 'default'
  /temperature T        0 = greedy, > 0 samples ('default' = the model's generation config)
  /max-new-tokens N     length limit of a reply
  /stats [on|off]       stats of the last reply; on/off: print them after every reply
  /settings             the current settings
  /reset                forget the conversation
  /help                 this list
  /quit                 leave (also /exit, Ctrl-D)"""


def add_arguments(parser):
    add_model_arguments(parser)
    add_mode_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message that starts the conversation")
    add_image_argument(parser)  # shown with the first user message, kept for the whole conversation
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="print each reply when it is done")
    parser.add_argument("--stats", action="store_true", help="print stats after every reply (on stderr)")


def _note(text):
    print(text, file=sys.stderr, flush=True)


class Chat:
    def __init__(self, model, tokenizer, settings, system=None, stream=True, show_stats=False, processor=None,
                 images=()):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.processor, self.images = processor, list(images)
        self.system, self.stream, self.show_stats = system, stream, show_stats
        self.history = []
        self.last_stats = None
        self.reset()

    def reset(self):
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    # ---- commands -------------------------------------------------------------------------------------------
    def command(self, line):
        """Runs a `/command`; returns False when the chat should end."""
        name, _, value = line[1:].strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            _note(COMMANDS_HELP)
        elif name == "reset":
            self.reset()
            _note("(conversation cleared)")
        elif name == "settings":
            _note(self.settings.describe(self.model))
        elif name == "stats":
            if value.lower() in ("on", "off"):
                self.show_stats = value.lower() == "on"
                _note(f"(stats after every reply: {value.lower()})")
            else:
                _note(self.last_stats or "(no reply yet)")
        elif name in ("mode", "block-size", "block", "threshold", "temperature", "max-new-tokens"):
            self._set(name, value)
        else:
            _note(f"unknown command /{name}; /help lists the commands")
        return True

    def _set(self, name, value):
        parse = {
            "mode": self._mode,
            "block-size": positive_int,
            "block": positive_int,
            "threshold": threshold,
            "temperature": temperature,
            "max-new-tokens": positive_int,
        }[name]
        field = {"block": "block_size", "block-size": "block_size", "max-new-tokens": "max_new_tokens"}.get(name, name)
        if not value:
            _note(f"/{name} needs a value (current: {self.settings.describe(self.model)})")
            return
        previous = getattr(self.settings, field)
        try:
            if value.lower() == "default" and name != "max-new-tokens":
                new = _UNSET if field == "threshold" else None
            else:
                new = parse(value)
            setattr(self.settings, field, new)
            self.settings.check(self.settings.resolved_mode(self.model))
        except (ValueError, UserError, argparse.ArgumentTypeError) as error:
            setattr(self.settings, field, previous)
            _note(f"error: /{name} {value}: {error}")
            return
        _note(f"({self.settings.describe(self.model)})")
        self.settings.warn_ignored(self.settings.resolved_mode(self.model))

    @staticmethod
    def _mode(value):
        if value not in DECODE_MODES:
            raise ValueError(f"expected one of {', '.join(DECODE_MODES)}, got {value!r}")
        return value

    # ---- one turn -------------------------------------------------------------------------------------------
    def reply(self, text):
        from transformers import TextStreamer

        self.history.append({"role": "user", "content": text})
        if self.images:
            try:
                encoded = encode_prompt_with_images(self.processor, self.history, self.images)
            except UserError as error:
                self.history.pop()
                _note(f"error: {error}")
                return
            encoded["pixel_values"] = encoded["pixel_values"].to(self.model.dtype)
        else:
            encoded = encode_prompt(self.tokenizer, self.history)
        inputs = {k: v.to(self.model.device) for k, v in encoded.items()}
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if self.stream else None
        start = time.perf_counter()
        try:
            out = self.model.generate(
                **inputs, streamer=streamer, return_dict_in_generate=True, **self.settings.generate_kwargs(self.model)
            )
        except (ValueError, UserError) as error:
            self.history.pop()
            _note(f"error: {error}")
            return
        except KeyboardInterrupt:
            self.history.pop()
            print(flush=True)
            _note("(interrupted; the message was dropped)")
            return
        seconds = time.perf_counter() - start
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        if not self.stream:
            print(answer, flush=True)
        self.history.append({"role": "assistant", "content": answer})
        self.last_stats = format_stats(self.settings.resolved_mode(self.model), out, len(new), seconds)
        if self.show_stats:
            _note(self.last_stats)


def run(args):
    settings = Settings.from_args(args)
    if settings.mode is not None:
        settings.check(settings.mode)
    check_image_files(args.image)
    model, tokenizer = load_model(args)
    processor = load_processor(model, tokenizer) if args.image else None
    if not getattr(processor or tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template, which chat needs; use `nemotron-diffusion generate --raw`"
        )
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    chat = Chat(
        model, tokenizer, settings, system=args.system, stream=args.stream, show_stats=args.stats,
        processor=processor, images=args.image or (),
    )
    settings.warn_ignored(settings.resolved_mode(model))
    interactive = sys.stdin.isatty()
    _note(f"chat ({settings.describe(model)}); /help lists the commands, /quit leaves")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not chat.command(text):
                break
            continue
        chat.reply(text)
    return 0
