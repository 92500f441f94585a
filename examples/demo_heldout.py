"""Held-out measurement of the demo: speed of every decoding mode against stock transformers on the same weights.

    python examples/demo_heldout.py [--prompts 12] [--max-new-tokens 96]
                                    [--configs ar,linear_spec:4:w3,diffusion:4:t0.5,linear_spec:4:int8]
                                    [--dtype auto|bfloat16|float32] [--batch 4] [--drafter PATH|none]
                                    [--threads 1] [--time-limit S] [--out PREFIX]

The prompts are held-out chat requests of `nemotron_diffusion.demo_prompts` (code, documentation prose and everyday
requests; none of them, nor its source file or topic pairing, is in the drafter's training data). The baseline is
stock `LlamaForCausalLM.generate()` (the demo is SmolLM2, a Llama model) on the very same weight tensors and dtype,
greedy. Per prompt every configuration runs back to back, the stock baseline first, so that slow phases of a shared
machine hit all of them alike. Per prompt and configuration: new tokens, forwards (prefill included), seconds,
tokens per forward, tok/s, the speed ratio against stock on the same prompt, whether the tokens equal our AR
tokens, and the mean negative log-likelihood per token of the output under the AR model (with a repeated-4-gram
share, to see degenerate text). The table reports medians over prompts.

In float32 both self-speculative modes must return exactly the AR tokens on every prompt (the script exits
non-zero otherwise). In bfloat16 a K-token verify and a one-token AR step may round differently: the agreement
is reported, not required. `--batch N` adds a left-padded batch of N prompts per group against batched stock.
An `:int8` suffix (linear_spec, diffusion) runs that configuration on a second copy of the demo whose drafter keeps
its merged weights as weight-only int8 (with an int8 draft head) instead of what the drafter's settings ask for
(bf16 merged weights, prepacked on a CPU), so the two kinds of draft weights are compared in one interleaved run.
Both copies keep prepacked bf16 weights on a CPU with bf16 (`load_demo`); `--no-packed` measures without them.
Diffusion commits by the model's `commit_order` and `defer_adjacent_repeats` (the demo drafter's settings:
`"leftmost"`, True); a `:most_confident` or `:leftmost` suffix asks for an order, `:repeats` or `:defer` turns
the deferral off or on. `adjacent repeats` counts tokens equal to the one before them (the stutter of parallel
commits, "the the", which NLL and repeated 4-grams barely see): the median per prompt, and the sum over prompts
(which one degenerate output can dominate).
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
from nemotron_diffusion.demo import load_demo, preferred_dtype
from nemotron_diffusion.demo_prompts import demo_prompts
from nemotron_diffusion.drafting_nemotron_diffusion import adapters_for_drafting, peft_base_module
from nemotron_diffusion.generation_config_nemotron_diffusion import COMMIT_ORDERS, DECODE_MODES
from nemotron_diffusion.native_twin import native_twin
from nemotron_diffusion.tooling import left_pad

DEFAULT_CONFIGS = ("ar,diffusion:4,diffusion:3:t0.5,diffusion:4:t0.5,diffusion:8:t0.5,linear_spec:4,linear_spec:3:w3,"
                   "linear_spec:4:w3,linear_spec:6:w3,quadratic_spec:2,quadratic_spec:3,quadratic_spec:4")
CONFIDENCE_THRESHOLD = 0.9  # diffusion mode, unless a configuration says otherwise (diffusion:B:tX)
TREE_SLOTS = 3  # linear_spec:B:wN verifies a tree of width N over the first 3 draft slots
STOCK = "stock"
DEFER_SUFFIXES = {"defer": True, "repeats": False}  # diffusion:B:defer / :repeats -> defer_adjacent_repeats
DEFER_LABELS = {True: "repeats deferred", False: "repeats not deferred"}
FUSED_SUFFIXES = {"fused": True, "unfused": False}  # diffusion:B:fused / :unfused -> fused_commit_forward
RULE_LABELS = {"defer_adjacent_repeats": DEFER_LABELS,
               "fused_commit_forward": {True: "fused commit forward", False: "separate commit forward"}}


def parse_configs(text):
    """'ar,linear_spec:8:w3,diffusion:4:t0.5:int8' -> [("ar", None, None, None, False, ()), ("linear_spec", 8, 3,
    None, False, ()), ("diffusion", 4, None, 0.5, True, ())]: (mode, block size, verify-tree width, diffusion
    confidence threshold, whether the draft weights are merged as int8 instead of as the drafter's settings say
    (`:int8`), diffusion's commit rules as (field, value) pairs: `:leftmost` / `:most_confident` set
    `commit_order`, `:defer` / `:repeats` set `defer_adjacent_repeats` and `:fused` / `:unfused`
    `fused_commit_forward` to True / False; a rule not named follows
    the model's generation config, which the drafter's settings set); AR is always measured."""
    configs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        mode, *parts = item.split(":")
        if mode not in DECODE_MODES:
            raise SystemExit(f"--configs: mode {mode!r} is invalid; allowed: {', '.join(DECODE_MODES)}")
        size, width, threshold, int8_drafts, rules = None, None, None, False, {}
        for part in parts[1:]:
            if part == "int8" and mode in ("linear_spec", "diffusion"):
                int8_drafts = True
            elif part in COMMIT_ORDERS and mode == "diffusion":
                rules["commit_order"] = part
            elif part in DEFER_SUFFIXES and mode == "diffusion":
                rules["defer_adjacent_repeats"] = DEFER_SUFFIXES[part]
            elif part in FUSED_SUFFIXES and mode == "diffusion":
                rules["fused_commit_forward"] = FUSED_SUFFIXES[part]
            elif part.startswith("w") and part[1:].isdigit() and mode == "linear_spec":
                width = int(part[1:])
            elif part.startswith("t") and mode == "diffusion":
                try:
                    threshold = float(part[1:])
                except ValueError:
                    raise SystemExit(f"--configs: {item!r}: threshold {part[1:]!r} is not a number") from None
            else:
                raise SystemExit(f"--configs: {item!r}: write linear_spec:B:wN (a tree of width N), "
                                 f"diffusion:B:tX (confidence threshold X), :int8 for int8 draft weights and, for "
                                 f"diffusion, :leftmost or :most_confident (the commit order), :defer or :repeats "
                                 f"(whether a slot repeating its masked neighbour waits) and :fused or :unfused "
                                 f"(whether the commit forward also drafts the next block)")
        if mode != "ar":
            try:
                size = int(parts[0] if parts and parts[0] else 8)
            except ValueError:
                raise SystemExit(f"--configs: block size {parts[0]!r} of {mode} is not an integer") from None
            if size < 2:
                raise SystemExit(f"--configs: block size {size} of {mode} must be >= 2")
        if mode == "diffusion" and threshold is None:
            threshold = CONFIDENCE_THRESHOLD
        config = (mode, size, width, threshold, int8_drafts, tuple(sorted(rules.items())))
        if config not in configs:
            configs.append(config)
    return [("ar", None, None, None, False, ())] + [c for c in configs if c[0] != "ar"]


def label(config):
    mode, size, width, threshold, int8_drafts, rules = config
    text = mode if size is None else f"{mode} B={size}"
    if threshold is not None:
        text = f"{text} threshold {threshold:g}"
    for field, value in rules:
        text = f"{text} {value}" if field == "commit_order" else f"{text} {RULE_LABELS[field][value]}"
    text = text if width is None else f"{text} tree {width}x{TREE_SLOTS}"
    return f"{text}, int8 draft weights" if int8_drafts else text


def generate_kwargs(config, max_new_tokens, eos):
    mode, size, width, threshold, _, rules = config
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "decode_mode": mode,
              "return_dict_in_generate": True, "eos_token_id": eos}
    if size is not None:
        kwargs["block_size"] = size
    if width is not None:
        kwargs.update(tree_width=width, tree_slots=TREE_SLOTS)
    if threshold is not None:
        kwargs["confidence_threshold"] = threshold
    kwargs.update(rules)
    return kwargs


def median(values):
    return float(statistics.median(values)) if values else float("nan")


@torch.no_grad()
def ar_nll(model, prompt, new):
    """Mean negative log-likelihood per token of `new` after `prompt` under the AR model (drafter off)."""
    if len(new) == 0:
        return float("nan")
    ids = torch.tensor([list(prompt) + list(new)])
    with adapters_for_drafting(model, model.generation_config.drafter_adapter):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(new), reduction="mean"))


def repeated_4grams(tokens):
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def adjacent_repeats(tokens):
    """How many tokens equal the token right before them."""
    return sum(1 for before, token in zip(tokens, tokens[1:]) if token == before)


def strip_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def measure(model, stock, prompts, configs, max_new_tokens, eos, pad, int8_model=None):
    """One row per prompt group: {config label: measurements}; stock first, then ours in the given order."""
    if len(prompts) == 1:
        ids, mask = torch.tensor([prompts[0]]), None
    else:
        ids, mask = left_pad(prompts, pad)
    row = {}
    start = time.perf_counter()
    out = stock.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    row[STOCK] = {"seconds": time.perf_counter() - start, "new": [strip_eos(r, eos) for r in
                                                                   out[:, ids.shape[1]:].tolist()]}
    for config in configs:
        start = time.perf_counter()
        out = (int8_model if config[4] else model).generate(ids, attention_mask=mask, pad_token_id=pad,
                                                             **generate_kwargs(config, max_new_tokens, eos))
        seconds = time.perf_counter() - start
        row[label(config)] = {"seconds": seconds, "forwards": out.num_forwards.tolist(),
                              "new": [strip_eos(r, eos) for r in out.sequences[:, ids.shape[1]:].tolist()]}
    for m in row.values():
        m["new_tokens"] = sum(len(n) for n in m["new"])
        m["identical_to_ar"] = m["new"] == row["ar"]["new"]
        m["tok_s"] = m["new_tokens"] / m["seconds"]
        if "forwards" in m:
            m["tokens_per_forward"] = m["new_tokens"] / max(sum(m["forwards"]), 1)
    for m in row.values():
        m["speed_vs_stock"] = m["tok_s"] / row[STOCK]["tok_s"]
        m["speed_vs_ar"] = m["tok_s"] / row["ar"]["tok_s"]
    if len(prompts) == 1:
        for m in row.values():
            m["nll"] = ar_nll(model, prompts[0], m["new"][0])
            m["repeated_4grams"] = repeated_4grams(m["new"][0])
            m["adjacent_repeats"] = adjacent_repeats(m["new"][0])
    return row


def summarize(rows, names):
    summary = {}
    for name in names:
        mine = [r[name] for r in rows]
        summary[name] = {
            "median_tok_s": median([m["tok_s"] for m in mine]),
            "median_speed_vs_stock": median([m["speed_vs_stock"] for m in mine]),
            "median_speed_vs_ar": median([m["speed_vs_ar"] for m in mine]),
            "median_tokens_per_forward": median([m["tokens_per_forward"] for m in mine if "tokens_per_forward" in m]),
            "median_nll": median([m["nll"] for m in mine if "nll" in m and m["nll"] == m["nll"]]),
            "median_repeated_4grams": median([m["repeated_4grams"] for m in mine if "repeated_4grams" in m]),
            "median_adjacent_repeats": median([m["adjacent_repeats"] for m in mine if "adjacent_repeats" in m]),
            "total_adjacent_repeats": sum(m.get("adjacent_repeats", 0) for m in mine),
            "identical_to_ar": sum(bool(m["identical_to_ar"]) for m in mine),
            "groups": len(mine),
            "total_new_tokens": sum(m["new_tokens"] for m in mine),
        }
    return summary


def table(summary, title):
    lines = [f"**{title}**", "",
             "| configuration | tokens / forward | tok/s | vs stock | vs our AR | = AR tokens | NLL / token | "
             "repeated 4-grams | adjacent repeats: median (all prompts) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        tpf = "-" if r["median_tokens_per_forward"] != r["median_tokens_per_forward"] else \
            f"{r['median_tokens_per_forward']:.2f}"
        nll = "-" if r["median_nll"] != r["median_nll"] else f"{r['median_nll']:.2f}"
        rep = "-" if r["median_repeated_4grams"] != r["median_repeated_4grams"] else \
            f"{r['median_repeated_4grams']:.2f}"
        adjacent = f"{r['median_adjacent_repeats']:g} ({r['total_adjacent_repeats']})"
        lines.append(f"| {name} | {tpf} | {r['median_tok_s']:.1f} | {r['median_speed_vs_stock']:.2f}x | "
                     f"{r['median_speed_vs_ar']:.2f}x | {r['identical_to_ar']}/{r['groups']} | {nll} | {rep} | "
                     f"{'-' if rep == '-' else adjacent} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated mode, mode:block_size, linear_spec:block_size:wN (a tree of width N) or "
                             "diffusion:block_size:tX (confidence threshold X, default 0.9)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--batch", type=int, default=0, help="also measure left-padded batches of this many prompts")
    parser.add_argument("--drafter", default=None, help="adapter folder (default: the shipped one) or 'none'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-packed", action="store_true", help="no prepacked bf16 weights (enable_packed_weights)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out prompt draw")
    parser.add_argument("--machine", default=None, help="description of the machine for the written results")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: start no new prompt after this")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the written results")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise SystemExit("--prompts and --max-new-tokens must be >= 1")
    configs = parse_configs(args.configs)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dtype = preferred_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)

    model, tokenizer = load_demo(drafter=args.drafter is None, dtype=dtype, packed=not args.no_packed)
    if args.drafter not in (None, "none"):
        from nemotron_diffusion.demo import attach_drafter

        model = attach_drafter(model, args.drafter)
    stock = native_twin(model, base_module=peft_base_module)
    int8_model = None
    if any(c[4] for c in configs):  # a second copy of the demo whose drafter keeps int8 merged weights
        from nemotron_diffusion.demo import attach_drafter, demo_drafter_path

        int8_model, _ = load_demo(drafter=False, dtype=dtype, packed=not args.no_packed)
        int8_model = attach_drafter(int8_model, args.drafter or demo_drafter_path(), merged="int8")
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = demo_prompts(tokenizer, "heldout", seed=args.seed, limit=args.prompts)
    sources = [p["source"] for p in prompts]
    prompts = [p["input_ids"] for p in prompts]
    names = [STOCK] + [label(c) for c in configs]

    with torch.no_grad():  # warm-up
        measure(model, stock, prompts[:1], configs, 4, eos, pad, int8_model)
    rows = []
    for i, prompt in enumerate(prompts):
        if args.time_limit is not None and rows and time.perf_counter() - started > args.time_limit:
            print(f"--time-limit reached: {len(rows)} of {len(prompts)} prompts measured", flush=True)
            break
        row = measure(model, stock, [prompt], configs, args.max_new_tokens, eos, pad, int8_model)
        rows.append(row)
        print(f"prompt {i + 1}/{len(prompts)} ({sources[i]}, {len(prompt)} tokens): " + ", ".join(
            f"{k} {v['tok_s']:.1f} tok/s" + ("" if k == STOCK else f" {v.get('tokens_per_forward', 0):.2f}/fwd")
            for k, v in row.items()), flush=True)
    batch_rows = []
    if args.batch > 1:
        for start in range(0, len(rows) - args.batch + 1, args.batch):
            group = prompts[start : start + args.batch]
            batch_rows.append(measure(model, stock, group, configs, args.max_new_tokens, eos, pad, int8_model))
            print(f"batch of {args.batch} (prompts {start + 1}-{start + args.batch}): " + ", ".join(
                f"{k} {v['tok_s']:.1f} tok/s" for k, v in batch_rows[-1].items()), flush=True)

    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct tri-mode demo (nemotron_diffusion.demo)",
            "baseline": "stock transformers LlamaForCausalLM.generate() on the same weight tensors, greedy",
            "dtype": str(dtype).replace("torch.", ""),
            "drafter": args.drafter or "nemotron_diffusion/demo_drafter",
            "prompts": len(rows),
            "sources": sources[: len(rows)],
            "max_new_tokens": args.max_new_tokens,
            "confidence_threshold_diffusion": f"{CONFIDENCE_THRESHOLD} unless the configuration names one",
            "threads": torch.get_num_threads(),
            "machine": args.machine or f"{platform.machine()} CPU, {os.cpu_count()} logical cores",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "command": "python examples/demo_heldout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_seconds": time.perf_counter() - started,
        },
        "summary": summarize(rows, names),
        "batch_summary": summarize(batch_rows, names) if batch_rows else None,
        "notes": args.note,
        "per_prompt": rows,
        "per_batch": batch_rows,
    }
    text = markdown(result)
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        print(f"wrote {args.out}.json and {args.out}.md")
    if dtype == torch.float32:
        bad = [n for n, r in result["summary"].items() if "_spec" in n and r["identical_to_ar"] != r["groups"]]
        if bad:
            raise SystemExit(f"float32 self-speculation differed from AR: {', '.join(bad)}")


def markdown(result):
    s = result["setup"]
    counts = {src: s["sources"].count(src) for src in sorted(set(s["sources"]))}
    lines = [
        "# The SmolLM2 demo on held-out prompts (CPU)", "",
        (f"{s['prompts']} held-out chat requests ({', '.join(f'{n} {k}' for k, n in counts.items())}), greedy, "
         f"at most {s['max_new_tokens']} new tokens, {s['dtype']}; drafter `{s['drafter']}`. Baseline: "
         f"{s['baseline']}. Machine: {s['machine']}; torch {s['torch']}, transformers {s['transformers']}, "
         f"{s['threads']} torch thread(s). `{s['command']}`, {s['wall_seconds'] / 60:.1f} min."), "",
        ("Medians over prompts. tokens / forward counts the prefill. \"vs stock\" is the per-prompt ratio of tok/s "
         "to stock generate() on the same prompt, run just before; \"vs our AR\" the same against our AR mode. "
         "NLL / token: the output's mean negative "
         "log-likelihood under the AR model."), "",
        *table(result["summary"], "batch 1"), "",
    ]
    if result.get("batch_summary"):
        lines += [*table(result["batch_summary"], "left-padded batches"), ""]
    lines += result.get("notes", [])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
