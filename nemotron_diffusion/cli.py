"""The `nemotron-diffusion` command line: one entry point, one subcommand per task.

Each subcommand lives in its own module, which provides `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. User errors raise `UserError` and print one line, without a traceback, and exit with status 2.
"""

import argparse
import importlib
import sys


# name -> module implementing it (relative to this package)
COMMANDS = {
    "generate": ".commands.generate",
}


class UserError(Exception):
    """A mistake of the caller (missing model, bad flag value): reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nemotron-diffusion",
        description="Tri-mode (AR / block diffusion / self-speculation) language models on Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name, __package__)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as error:
        print(f"nemotron-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
