"""Held-out, teacher-forced acceptance of a demo drafter: LinearSpec tokens per cycle at several block sizes, with
the chain and with verify trees, QuadraticSpec tokens per forward, and the accuracy of diffusion's later denoising
steps (blocks partly revealed).

    python -m benchmarks.draft_acceptance --data runs/data/heldout.jsonl [--adapter FOLDER] [--blocks 4,8,16]
                                          [--trees 2x3,3x3,4x4] [--sequences 32] [--out PREFIX]

`--data`: held-out self-distilled records (`scripts/distill_demo_data.py ... --split heldout` writes them; the
drafter never trained on them). `--adapter`: the drafter folder (default: the one shipped with the package); pass
several, comma-separated, to compare them in one table (e.g. before and after a training run). Every number comes
from `nemotron_diffusion.training.evaluate_model` (the training run's own held-out metrics): greedy acceptance of
draft blocks at 8 random seed positions per sequence, the base model's causal pass as the verifier. Not run by the
test suite; no timing.
"""

import argparse
import json
import os
import time

import torch


def parse_trees(text):
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        width, _, slots = item.partition("x")
        if not (width.isdigit() and slots.isdigit()) or int(width) < 2 or int(slots) < 1:
            raise SystemExit(f"--trees: {item!r} is invalid; allowed: WIDTHxSLOTS with WIDTH >= 2, SLOTS >= 1")
        shapes.append((int(width), int(slots)))
    return tuple(shapes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="held-out JSONL records (input_ids, prompt_length)")
    parser.add_argument("--adapter", default=None, help="drafter folder(s), comma-separated (default: shipped)")
    parser.add_argument("--blocks", default="4,8,16")
    parser.add_argument("--trees", default="2x3,3x3,4x4")
    parser.add_argument("--quadratic-block", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nemotron_diffusion.demo import attach_drafter, demo_drafter_path, load_demo
    from nemotron_diffusion.training import evaluate_model, load_records

    blocks = [int(b) for b in args.blocks.split(",")]
    trees = parse_trees(args.trees)
    records = load_records(args.data)[: args.sequences]
    adapters = args.adapter.split(",") if args.adapter else [demo_drafter_path()]
    rows = []
    for adapter in adapters:
        model, _ = load_demo(drafter=False, dtype=getattr(torch, args.dtype))
        model = attach_drafter(model, adapter, merged=False)
        for block in blocks:
            started = time.perf_counter()
            metrics = evaluate_model(model, records, target="drafter", block_size=block, acceptance_block_size=block,
                                     layouts=("linear", "denoise", ("quadratic", args.quadratic_block)),
                                     tree_shapes=trees)
            row = {"adapter": adapter, "block_size": block, "chain": metrics["tokens_per_cycle"],
                   "quadratic_tokens_per_forward": metrics["quadratic_tokens_per_forward"],
                   "draft_kl": metrics["draft_kl"], "denoise_accuracy": metrics["denoise_accuracy"],
                   "seconds": time.perf_counter() - started}
            for width, slots in trees:
                row[f"tree {width}x{slots}"] = metrics[f"tree{width}x{slots}_tokens_per_cycle"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = ["chain"] + [f"tree {w}x{s}" for w, s in trees]
    lines = [
        f"Held-out teacher-forced acceptance ({len(records)} sequences of {args.data}, {args.dtype}): LinearSpec "
        f"tokens per draft/verify cycle with the chain and with verify trees (WIDTHxSLOTS), and QuadraticSpec "
        f"(B={args.quadratic_block}) tokens per forward; diffusion's later denoising steps: the share of masked slots "
        f"guessed right (greedy) in blocks with each slot revealed with probability r ~ U(0, 1) (the denoise "
        f"layout).",
        "",
        "| adapter | block | " + " | ".join(columns) + " | QuadraticSpec tok/fwd | denoise accuracy | draft KL |",
        "|---|---|" + "---|" * len(columns) + "---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['adapter']} | {row['block_size']} | " + " | ".join(f"{row[c]:.2f}" for c in columns)
                     + f" | {row['quadratic_tokens_per_forward']:.2f} | {row['denoise_accuracy']:.3f} "
                     f"| {row['draft_kl']:.3f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"setup": vars(args), "rows": rows}, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
