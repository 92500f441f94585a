"""Self-distillation data for the demo drafter: the demo model's own greedy continuations of chat requests
(`nemotron_diffusion.demo_prompts`: code, prose and general requests), appended chunk by chunk to a JSONL file so
that an interrupted run resumes where it stopped.

    python scripts/distill_demo_data.py OUT.jsonl [--split train] [--limit 2000] [--dtype bfloat16] [--batch-size 32]
                                        [--mix code:0.5,general:0.5] [--exclude EARLIER.jsonl ...]

`--exclude` skips the prompts already distilled into earlier files (a second data set of new requests only).
"""

import argparse
import json
import os
import time

import torch

from nemotron_diffusion.demo import load_demo
from nemotron_diffusion.demo_prompts import demo_prompts
from nemotron_diffusion.training import distill_sequences


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--split", default="train", choices=("train", "heldout"))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64, help="prompts per appended chunk")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mix", default="code:0.4,prose:0.2,general:0.4",
                        help="sources and their shares (`demo_prompts`' mix), e.g. code:0.5,general:0.5")
    parser.add_argument("--exclude", nargs="*", default=[], help="JSONL files whose prompts are skipped")
    args = parser.parse_args()
    mix = tuple((name, float(share)) for name, share in (part.split(":") for part in args.mix.split(",")))
    torch.set_num_threads(args.threads)
    model, tokenizer = load_demo(drafter=False, dtype=getattr(torch, args.dtype))
    seen = set()
    for path in args.exclude:
        with open(path) as f:
            for line in filter(str.strip, f):
                record = json.loads(line)
                seen.add(tuple(record["input_ids"][: record["prompt_length"]]))
    # Drawn from the whole pools, the earlier files' prompts removed, then cut to --limit in the mix's shares.
    pools = demo_prompts(tokenizer, args.split, seed=args.seed, mix=mix)
    fresh = [p for p in pools if tuple(p["input_ids"]) not in seen]
    total = sum(share for _, share in mix)
    quota = {name: round(args.limit * share / total) for name, share in mix}
    prompts = []  # in the pools' shuffled order, so that a run cut off early keeps an unbiased mix
    for prompt in fresh:
        if quota[prompt["source"]] > 0:
            quota[prompt["source"]] -= 1
            prompts.append(prompt)
    done = 0
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = sum(1 for line in f if line.strip())
    print(f"{len(prompts)} prompts, {done} already distilled", flush=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(done, len(prompts), args.chunk):
        chunk = prompts[start : start + args.chunk]
        t0 = time.time()
        records = distill_sequences(model, [p["input_ids"] for p in chunk], max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, pad_token_id=pad, progress=False)
        with open(args.out, "a") as f:
            for prompt, record in zip(chunk, records):
                record["source"] = prompt["source"]
                f.write(json.dumps(record) + "\n")
        print(f"{start + len(chunk)}/{len(prompts)} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
