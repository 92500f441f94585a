"""Held-out measurement of the demo: tokens per forward and wall-clock per decoding mode against AR.

    python examples/demo_heldout.py [--prompts 10] [--max-new-tokens 96] [--configs ar,linear_spec:8,...]
                                    [--drafter PATH|none] [--threads N] [--time-limit S] [--out PREFIX]

The prompts are chat requests built from held-out files of the CPython standard library (the split the demo drafter
was not trained on, `nemotron_diffusion.training.stdlib_files("heldout")`; the drafter's own evaluation sequences
used another seed). Each prompt is generated greedily (batch 1) with every configuration (`mode` or
`mode:block_size`) back to back, AR first, so that slow phases of a shared machine hit all configurations alike.
Per prompt: new tokens, forwards (prefill included), seconds, tokens per forward, tok/s and the speed ratio against
AR on the same prompt; the table reports medians over prompts (and total tokens / total forwards). Both
self-speculative modes must return exactly the AR tokens on every prompt (the script exits non-zero otherwise).
With `--out PREFIX` the results are written to PREFIX.json and PREFIX.md.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers

import nemotron_diffusion  # noqa: F401
from nemotron_diffusion.demo import demo_drafter_path, load_demo
from nemotron_diffusion.generation_config_nemotron_diffusion import DECODE_MODES
from nemotron_diffusion.training import stdlib_files, stdlib_prompts

DEFAULT_CONFIGS = "ar,diffusion:8,linear_spec:4,linear_spec:8,linear_spec:16,quadratic_spec:4,quadratic_spec:8"
CONFIDENCE_THRESHOLD = 0.9  # diffusion mode


def parse_configs(text):
    """'ar,linear_spec:8' -> [("ar", None), ("linear_spec", 8)]; AR is always measured (first)."""
    configs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        mode, _, size = item.partition(":")
        if mode not in DECODE_MODES:
            raise SystemExit(f"--configs: mode {mode!r} is invalid; allowed: {', '.join(DECODE_MODES)}")
        if mode == "ar":
            size = None
        elif not size:
            size = 8
        else:
            try:
                size = int(size)
            except ValueError:
                raise SystemExit(f"--configs: block size {size!r} of {mode} is not an integer") from None
            if size < 2:
                raise SystemExit(f"--configs: block size {size} of {mode} must be >= 2")
        if (mode, size) not in configs:
            configs.append((mode, size))
    configs = [c for c in configs if c[0] != "ar"]
    return [("ar", None)] + configs


def label(config):
    mode, size = config
    return mode if size is None else f"{mode} B={size}"


def generate_kwargs(config, max_new_tokens):
    mode, size = config
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "decode_mode": mode, "return_dict_in_generate": True}
    if size is not None:
        kwargs["block_size"] = size
    if mode == "diffusion":
        kwargs["confidence_threshold"] = CONFIDENCE_THRESHOLD
    return kwargs


def median(values):
    return float(statistics.median(values)) if values else float("nan")


def summarize(rows, configs):
    """Per configuration: medians over prompts, totals and the identity check against AR."""
    summary = {}
    for config in configs:
        name = label(config)
        mine = [r[name] for r in rows]
        ar = [r["ar"] for r in rows]
        tokens = sum(m["new_tokens"] for m in mine)
        forwards = sum(m["forwards"] for m in mine)
        seconds = sum(m["seconds"] for m in mine)
        summary[name] = {
            "mode": config[0],
            "block_size": config[1],
            "median_tokens_per_forward": median([m["new_tokens"] / m["forwards"] for m in mine]),
            "median_tok_s": median([m["new_tokens"] / m["seconds"] for m in mine]),
            "median_speed_vs_ar": median([(m["new_tokens"] / m["seconds"]) / (a["new_tokens"] / a["seconds"])
                                          for m, a in zip(mine, ar)]),
            "total_new_tokens": tokens,
            "total_forwards": forwards,
            "total_seconds": seconds,
            "tokens_per_forward_total": tokens / forwards,
            "prompts_identical_to_ar": sum(bool(m["identical_to_ar"]) for m in mine),
        }
    return summary


def markdown(result):
    s = result["setup"]
    lines = [
        "# The SmolLM2 demo on held-out prompts (CPU)",
        "",
        (f"{s['prompts']} held-out prompts (chat requests built from held-out CPython standard-library files), "
         f"greedy, batch 1, at most {s['max_new_tokens']} new tokens; model {s['model']}, float32; drafter "
         f"`{s['drafter']}`. Machine: {s['machine']}; torch {s['torch']}, transformers {s['transformers']}, "
         f"Python {s['python']}, {s['threads']} torch thread{'s' if s['threads'] != 1 else ''}. Produced by "
         f"`{s['command']}` in {s['wall_seconds'] / 60:.1f} min."),
        "",
        ("Medians over prompts; tokens / forward counts the prefill as a forward (AR's prefill emits its first "
         "token: 1.00); \"vs AR\" is the per-prompt ratio of tok/s to AR's tok/s on the same prompt, then the "
         "median."),
        "",
        ("| mode | block | tokens / forward (median) | tokens / forward (total) | tok/s (median) | vs AR (median) "
         "| = AR tokens |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"].values():
        same = f"{r['prompts_identical_to_ar']}/{s['prompts']}"
        if r["mode"] == "diffusion":
            same += " (not required)"
        lines.append(
            f"| {r['mode']} | {r['block_size'] or '-'} | {r['median_tokens_per_forward']:.2f} | "
            f"{r['tokens_per_forward_total']:.2f} | {r['median_tok_s']:.1f} | {r['median_speed_vs_ar']:.2f}x | {same} |"
        )
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated mode or mode:block_size")
    parser.add_argument("--drafter", default=None, help="adapter folder (default: the shipped one) or 'none'")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out prompt order")
    parser.add_argument("--machine", default=None, help="description of the machine for the written results")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: start no new prompt after this (the results cover the prompts done)")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the written results")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise SystemExit("--prompts and --max-new-tokens must be >= 1")
    configs = parse_configs(args.configs)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()

    if args.drafter in (None, "none"):
        model, tokenizer = load_demo(drafter=args.drafter is None)
    else:
        from peft import PeftModel

        model, tokenizer = load_demo(drafter=False)
        model = PeftModel.from_pretrained(model, args.drafter, adapter_name="drafter").eval().base_model.model
    drafter = "none" if args.drafter == "none" else (args.drafter or "nemotron_diffusion/demo_drafter")
    if args.drafter is None:
        demo_drafter_path()  # fails loudly if the shipped adapter is missing
    prompts = stdlib_prompts(tokenizer, stdlib_files("heldout"), seed=args.seed, raw_share=0.0)[: args.prompts]

    rows = []
    with torch.no_grad():
        warm = torch.tensor([prompts[0]])
        for config in configs:
            model.generate(warm, **generate_kwargs(config, 4))
        for i, prompt in enumerate(prompts):
            if args.time_limit is not None and rows and time.perf_counter() - started > args.time_limit:
                print(f"--time-limit reached: {len(rows)} of {len(prompts)} prompts measured", flush=True)
                prompts = prompts[: len(rows)]
                break
            ids = torch.tensor([prompt])
            row, reference = {}, None
            for config in configs:
                start = time.perf_counter()
                out = model.generate(ids, **generate_kwargs(config, args.max_new_tokens))
                seconds = time.perf_counter() - start
                new = out.sequences[0, ids.shape[1]:]
                if config[0] == "ar":
                    reference = new
                row[label(config)] = {
                    "new_tokens": len(new),
                    "forwards": int(out.num_forwards[0]),
                    "seconds": seconds,
                    "identical_to_ar": bool(torch.equal(new, reference)),
                }
            rows.append(row)
            print(f"prompt {i + 1}/{len(prompts)} ({len(prompt)} tokens): "
                  + ", ".join(f"{k} {v['new_tokens'] / v['forwards']:.2f} tok/fwd {v['seconds']:.1f} s" for k, v in row.items()),
                  flush=True)

    summary = summarize(rows, configs)
    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct tri-mode demo (nemotron_diffusion.demo)",
            "drafter": drafter,
            "prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "max_new_tokens": args.max_new_tokens,
            "confidence_threshold_diffusion": CONFIDENCE_THRESHOLD,
            "threads": torch.get_num_threads(),
            "machine": args.machine or f"{platform.machine()} CPU, {os.cpu_count()} logical cores",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "command": "python examples/demo_heldout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_seconds": time.perf_counter() - started,
        },
        "summary": summary,
        "notes": args.note,
        "per_prompt": rows,
    }

    print("\n" + markdown(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))
        print(f"wrote {args.out}.json and {args.out}.md")
    bad = [name for name, r in summary.items()
           if r["mode"].endswith("_spec") and r["prompts_identical_to_ar"] != len(prompts)]
    if bad:
        raise SystemExit(f"self-speculation differed from AR: {', '.join(bad)}")


if __name__ == "__main__":
    main()
