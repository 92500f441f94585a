"""One whole benchmark run: the model, the prompts, the sweep and the checks, then the JSON, markdown and plots."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..tooling import progress_bar
from .arguments import BenchError
from .checks import ar_overhead, sol_plan, speed_of_light
from .models import adapter_digest, load_bench_model, stock_twin
from .prompts import HELD_OUT_SEED, held_out_prompts, prompt_text
from .report import display_path, machine_info, markdown, plots
from .sweep import plan_settings, run_sweep


def run(args):
    """Runs the benchmark; returns the exit status. Raises BenchError for user errors."""
    if args.quadratic_max_block < 2:
        raise BenchError("--quadratic-max-block must be >= 2")
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers keep their setting


def _run(args):
    began = time.time()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, tokenizer, description, drafter = load_bench_model(args)
    model.eval()
    prompts = held_out_prompts(tokenizer, model.config.vocab_size, args.prompts, args.max_prompt_tokens)
    native = stock_twin(model) if (args.baselines or args.overhead_repeats) else None
    settings, skipped = plan_settings(args)
    calls = len(settings)  # warm-ups
    calls += sum(args.repeats * math.ceil(len(prompts) / s.batch_size) for s in settings)
    sol_calls = 0 if args.no_speed_of_light else len(sol_plan(args))
    bar = progress_bar(
        calls + sol_calls + max(args.overhead_repeats, 0), "bench", enabled=not args.no_progress, unit="call"
    )
    try:
        runs = run_sweep(model, native, prompts, args, bar, settings)
        sol = None if args.no_speed_of_light else speed_of_light(model, prompts, args, bar)
        overhead = ar_overhead(model, native, prompts[0], args, bar) if args.overhead_repeats > 0 else None
    finally:
        bar.close()
    device = model.device
    machine = machine_info(device)
    machine["load_average_at_start"] = load_at_start
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_at_end"] = os.getloadavg()
    short = (
        "demo (SmolLM2-135M tri-mode)"
        if args.model is None and args.random is None
        else (f"random {args.random}" if args.random else Path(str(args.model)).name)
    )
    result = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": None,
        "machine": machine,
        "model": {
            "description": description,
            "short": short,
            "dtype": str(model.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()),
            "drafter": display_path(drafter),
            "drafter_sha256": adapter_digest(drafter),
            "config": {
                k: getattr(model.config, k)
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                    "vocab_size",
                )
            },
        },
        "prompts": {
            "count": len(prompts),
            "min_tokens": min(map(len, prompts)),
            "max_tokens": max(map(len, prompts)),
            "source": f"training.stdlib_prompts over stdlib_files('heldout'), seed {HELD_OUT_SEED}, chat requests only"
            + (", byte-encoded" if tokenizer is None else ""),
            "texts": [prompt_text(tokenizer, p) for p in prompts],
        },
        "settings": {
            "modes": args.modes,
            "block_sizes": args.block_sizes,
            "batch_sizes": args.batch_sizes,
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "threshold": args.threshold,
            "repeats": args.repeats,
            "baselines": args.baselines,
            "prompt_lookup_num_tokens": args.prompt_lookup_tokens,
            "quadratic_max_block": args.quadratic_max_block,
        },
        "runs": runs,
        "skipped": skipped,
        "speed_of_light": sol,
        "ar_overhead": overhead,
        "note": args.note,
    }
    result["wall_seconds"] = time.time() - began
    prefix = str(args.out).removesuffix(".json")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    table = markdown(result)
    with open(prefix + ".md", "w") as f:
        f.write(table)
    written = plots(result, prefix)
    print(table)
    print(
        f"wrote {prefix}.json, {prefix}.md"
        + "".join(f", {p}" for p in written)
        + f" ({result['wall_seconds']:.0f} s)",
        file=sys.stderr,
    )
    if sol is not None and not sol["all_pass"]:
        print("bench: speed-of-light check FAILED: some mode wastes forwards (see the table)", file=sys.stderr)
    return 0
