"""The flags of `nemotron-diffusion bench`, defined once. The command line imports this module to build its parser,
so it imports nothing of the benchmark itself (no torch work, no models)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..commands.common import positive_int, threshold

DESCRIPTION = "Benchmark suite: every decoding mode against the Hugging Face baselines, a speed-of-light check, plots."
MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
BASELINES = ("stock", "prompt_lookup")
SPEC_MODES = ("linear_spec", "quadratic_spec")
# Random-weight shapes for `--random` (overridable: `--random small,layers=8`).
RANDOM_SHAPES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128, "vocab": 512},
    "small": {
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 64,
        "intermediate": 768,
        "vocab": 2048,
    },
    "smollm2": {
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
        "intermediate": 1536,
        "vocab": 49153,
    },
}


class BenchError(Exception):
    """A bad argument or an unusable model: one line, exit status 2."""


def source_checkout() -> Path | None:
    """The repository root when this package runs from its source checkout (an editable install), else None."""
    root = Path(__file__).resolve().parents[2]
    try:
        project = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "nemotron-diffusion"' in project and (root / "benchmarks").is_dir() else None


def default_out() -> str:
    """benchmarks/results/bench of the source checkout, else `bench` in the current folder."""
    root = source_checkout()
    return str(root / "benchmarks" / "results" / "bench") if root is not None else "bench"


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _name_list(allowed):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or (not values and text.strip()):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return values

    return parse


def add_arguments(parser):
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", "-m", default=None, help="model folder or Hub id (default: the demo model, nemotron_diffusion.demo)"
    )
    model.add_argument(
        "--random",
        default=None,
        metavar="SHAPE",
        help=f"random weights instead of a model: {', '.join(RANDOM_SHAPES)}, optionally with "
        "overrides (e.g. 'small,layers=8'); prompts are then byte-encoded",
    )
    model.add_argument(
        "--drafter",
        default="auto",
        metavar="PATH",
        help="PEFT LoRA drafter for linear_spec drafts, or 'none' (default 'auto': the demo's drafter, "
        "or a drafter subfolder of --model)",
    )
    model.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    model.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--modes", type=_name_list(MODES), default=list(MODES), help="comma-separated decode modes")
    sweep.add_argument("--block-sizes", type=_int_list, default=[8, 16, 32], help="comma-separated block sizes")
    sweep.add_argument("--batch-sizes", type=_int_list, default=[1, 4], help="comma-separated batch sizes")
    sweep.add_argument(
        "--quadratic-max-block",
        type=positive_int,
        default=16,
        help="skip quadratic_spec blocks above this in the sweep: its forward carries B*(B+1) "
        "queries, compute-bound on a CPU (default 16)",
    )
    sweep.add_argument(
        "--baselines",
        type=_name_list(BASELINES),
        default=list(BASELINES),
        help="comma-separated baselines: stock (transformers generate) and prompt_lookup",
    )
    sweep.add_argument(
        "--prompt-lookup-tokens",
        type=positive_int,
        default=10,
        help="prompt_lookup_num_tokens of the prompt-lookup baseline (default 10)",
    )
    sweep.add_argument("--prompts", type=positive_int, default=10, help="held-out prompts (default 10)")
    sweep.add_argument("--max-prompt-tokens", type=positive_int, default=256)
    sweep.add_argument("--max-new-tokens", type=positive_int, default=96)
    sweep.add_argument(
        "--threshold",
        type=threshold,
        default=0.9,
        help="diffusion confidence_threshold (0.9; 'none': one slot per step)",
    )
    sweep.add_argument("--repeats", type=positive_int, default=3, help="timed passes per setting (median reported)")
    checks = parser.add_argument_group("checks")
    checks.add_argument("--no-speed-of-light", action="store_true", help="skip the perfect-drafter check")
    checks.add_argument("--sol-max-new-tokens", type=positive_int, default=128)
    checks.add_argument(
        "--overhead-repeats",
        type=int,
        default=15,
        help="interleaved pairs of the AR-overhead check (0 skips it; default 15)",
    )
    checks.add_argument("--overhead-tokens", type=positive_int, default=64)
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        default=default_out(),
        metavar="PREFIX",
        help="output prefix: PREFIX.json, PREFIX.md, PREFIX_tok_s.png, PREFIX_tokens_per_forward.png "
        "(default benchmarks/results/bench in the source checkout, else bench in the current folder)",
    )
    output.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--note", default=None, help="a free-text note stored with the results")
