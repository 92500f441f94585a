"""`nemotron-diffusion bench`: the benchmark suite (`benchmarks/bench.py` of a source checkout).

The benchmark code is not part of the installed package: this command loads `benchmarks/bench.py` from the source
tree next to the package (an editable install or a checkout on `sys.path`) and runs it. From an installation without
the source tree it says so in one line.
"""

import importlib.util
import sys
from pathlib import Path

from ..cli import UserError

HELP = "benchmark every decoding mode against transformers' baselines (needs the source checkout)"
_MODULE_NAME = "nemotron_diffusion_benchmarks_bench"
_MARKER = 'SUITE = "nemotron-diffusion bench"'  # a line of benchmarks/bench.py: it is ours, not another project's


def bench_script() -> Path:
    """Where `benchmarks/bench.py` is expected: beside the package folder, in the repository root."""
    return Path(__file__).resolve().parent.parent.parent / "benchmarks" / "bench.py"


def load_bench():
    """The benchmark module of the source checkout, or None when this installation has no source tree."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    path = bench_script()
    try:
        if _MARKER not in path.read_text(encoding="utf-8"):
            return None
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[_MODULE_NAME]
        raise
    return module


def add_arguments(parser):
    bench = load_bench()
    if bench is None:
        # Accept any flags, so that `run` explains what is missing rather than argparse naming an unknown flag.
        parser.description = f"{HELP}. Not available in this installation: {bench_script()} is missing."
        parse_known_args = parser.parse_known_args

        def accept_anything(args=None, namespace=None):
            args = list(sys.argv[1:] if args is None else args)
            if "-h" in args or "--help" in args:
                return parse_known_args(["--help"], namespace)
            namespace, _ = parse_known_args([], namespace)
            return namespace, []

        parser.parse_known_args = accept_anything
        return
    bench.add_arguments(parser)
    parser.description = bench.__doc__.strip().splitlines()[0]


def run(args):
    bench = load_bench()
    if bench is None:
        raise UserError(
            f"the benchmark suite runs from a source checkout, and this installation has none ({bench_script()} "
            "is missing): clone the repository and `pip install -e .` it, or run `python benchmarks/bench.py` there"
        )
    try:
        return bench.run(args)
    except bench.BenchError as error:
        raise UserError(str(error)) from None
