"""`nemotron-diffusion bench`: the benchmark suite (`nemotron_diffusion.bench`).

Building the parser imports only the bench's flags (`bench.arguments`); the suite itself is imported when it runs.
"""

from ..bench import arguments
from ..cli import UserError

HELP = "benchmark every decoding mode against transformers' baselines"


def add_arguments(parser):
    parser.description = arguments.DESCRIPTION
    arguments.add_arguments(parser)


def run(args):
    from ..bench.suite import run as run_suite

    try:
        return run_suite(args)
    except arguments.BenchError as error:
        raise UserError(str(error)) from None
