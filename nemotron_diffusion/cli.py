"""The `nemotron-diffusion` command line: one entry point, one subcommand per task.

Each subcommand lives in its own module, which provides `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. User errors (a missing model, a bad flag value) print one line, without a traceback, and exit
with status 2: subcommands raise `UserError`, and argparse's own errors are shortened to one line as well. Any other
failure prints one line too and exits with status 1 (`--verbose` shows its traceback).
"""

import argparse
import contextlib
import importlib
import sys


# name -> module implementing it (relative to this package)
COMMANDS = {
    "generate": ".commands.generate",
    "chat": ".commands.chat",
    "convert": ".commands.convert",
    "train": ".commands.train",
    "bench": ".commands.bench",
    "serve": ".commands.serve",
}


class UserError(Exception):
    """A mistake of the caller (missing model, bad flag value): reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (`prog: error: message (see prog --help)`) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="nemotron-diffusion",
        description="Tri-mode (AR / block diffusion / self-speculation) language models on Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--verbose", "-v", action="store_true",
        help="show transformers' warnings and progress bars, and the traceback of an internal error",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name, __package__)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """transformers' warnings and progress bars off for the command (restored afterwards, for in-process callers)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _quiet_transformers(not args.verbose):
            return args.run(args) or 0
    except UserError as error:
        print(f"nemotron-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:  # a failure that is not the caller's mistake: one line too, the traceback on request
        if args.verbose:
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(
            f"nemotron-diffusion {args.command}: internal error: {type(error).__name__}: {message} "
            "(run with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    # `python -m nemotron_diffusion.cli`: run the package's copy of this module, whose `UserError` the subcommands
    # raise (this file, run as `__main__`, is a second module object with a second `UserError` class).
    from nemotron_diffusion.cli import main as _main

    sys.exit(_main())
