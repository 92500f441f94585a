"""torchao int8 weight-only against float32 / bfloat16 weights: speed, memory and agreement, every mode.

    python -m benchmarks.quantized                       # the demo model (and its drafter), CPU
    python -m benchmarks.quantized --model FOLDER --device cuda --variants bf16,int8-bf16 --out results.json

Each variant runs in a process of its own (so that its peak RSS is its own): the model is loaded with
transformers' `TorchAoConfig(Int8WeightOnlyConfig())` for the `int8-*` variants (the activations stay in the named
dtype), the drafter attached as `nemotron-diffusion serve` does, then every prompt is generated greedily in each
mode after one warm-up generation. Reported per variant and mode: tok/s (median over prompts), tokens per forward,
whether self-speculation returned the variant's own AR tokens, and the share of AR tokens equal to the float32 AR
tokens (prefix agreement: tokens before the first difference); per variant: the bytes of the weights (torchao's
int8 data and scales counted as stored), and the peak RSS of the process. Not run by the test suite.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {  # name -> (activation dtype, quantized)
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "int8-fp32": ("float32", True),
    "int8-bf16": ("bfloat16", True),
}
MODES = {  # name -> generate() settings
    "ar": {"decode_mode": "ar"},
    "linear_spec": {"decode_mode": "linear_spec", "block_size": 8},
    "quadratic_spec": {"decode_mode": "quadratic_spec", "block_size": 4},
    "diffusion": {"decode_mode": "diffusion", "block_size": 8},
}
PROMPTS = [
    "Explain what a hash table is in two sentences.",
    "Write a short Python function that reverses a string.",
    "Give three tips for writing clear commit messages.",
]


def weight_bytes(model):
    """Bytes of the parameters and buffers as stored: a torchao tensor counts its inner tensors (int8 data and
    scales); a tied weight counts once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names = getattr(tensor, "tensor_data_names", None)
        parts = [getattr(tensor, name) for name in names] if names else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def prefix_agreement(tokens, reference):
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def run_variant(args):
    """One variant, in this process: {mode: {...}, "weight_bytes": ..., "peak_rss_bytes": ...} as JSON on stdout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemotron_diffusion.commands.common import _attach_drafter, resolve_model_path

    torch.set_num_threads(args.threads)
    dtype_name, quantized = VARIANTS[args.variant]
    dtype = getattr(torch, dtype_name)
    path = resolve_model_path(args.model)
    kwargs = {"dtype": dtype}
    if quantized:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs.update(quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map=args.device)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quantized:
        model = model.to(args.device)
    model = _attach_drafter(model.eval(), args.drafter, path, demo=args.model is None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(args.device)
        for p in PROMPTS
    ]

    def generate(inputs, settings):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, return_dict_in_generate=True, **settings)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        return new, seconds, float(out.tokens_per_forward[0])

    generate(encoded[0], MODES["ar"])  # warm-up
    results, ar_tokens = {}, []
    for mode in ["ar", *(m for m in args.modes.split(",") if m != "ar")]:  # AR first: the others compare to it
        settings = MODES[mode]
        rates, per_forward, tokens = [], [], []
        for inputs in encoded:
            new, seconds, tpf = generate(inputs, settings)
            rates.append(len(new) / seconds)
            per_forward.append(tpf)
            tokens.append(new)
        if mode == "ar":
            ar_tokens = tokens
        results[mode] = {
            "tok_s": statistics.median(rates),
            "tokens_per_forward": statistics.median(per_forward),
            "tokens": tokens,
            "equals_own_ar": [t == a for t, a in zip(tokens, ar_tokens)],
        }
    results["weight_bytes"] = weight_bytes(model)
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump(results, sys.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--drafter", default="auto", help="as `nemotron-diffusion serve --drafter` (default auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default="fp32,bf16,int8-fp32,int8-bf16")
    parser.add_argument("--modes", default=",".join(MODES), help=f"a subset of {','.join(MODES)}")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/quantized_cpu.json")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args = parser.parse_args()
    if args.variant is not None:
        return run_variant(args)

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}; allowed: {', '.join(VARIANTS)}")
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown --modes {unknown}; allowed: {', '.join(MODES)}")
    child_args = ["--device", args.device, "--drafter", args.drafter, "--new-tokens", str(args.new_tokens),
                  "--modes", args.modes,
                  "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    runs = {}
    for variant in variants:
        print(f"[{variant}] ...", file=sys.stderr, flush=True)
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.quantized", *child_args, "--variant", variant],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        runs[variant] = json.loads(child.stdout)
        rows = write_results(args, runs)  # after every variant: a run cut short keeps what it measured
    print_table(rows, "fp32" if "fp32" in runs else variants[0])
    print(f"\nwrote {args.out}", file=sys.stderr)


def table_rows(runs, reference_name):
    """One row per variant and mode; AR agreement is measured against the AR tokens of `reference_name`."""
    reference = runs[reference_name]["ar"]["tokens"]
    rows = []
    for variant, result in runs.items():
        agreement = statistics.mean(prefix_agreement(t, r) for t, r in zip(result["ar"]["tokens"], reference))
        for mode in (m for m in MODES if m in result):
            m = result[mode]
            rows.append(dict(
                variant=variant, mode=mode, tok_s=round(m["tok_s"], 2),
                tokens_per_forward=round(m["tokens_per_forward"], 3),
                equals_own_ar=f"{sum(m['equals_own_ar'])}/{len(m['equals_own_ar'])}" if mode != "ar" else "-",
                ar_agreement=round(agreement, 3) if mode == "ar" else None,
                weight_mib=round(result["weight_bytes"] / 2**20, 1),
                peak_rss_mib=round(result["peak_rss_bytes"] / 2**20),
            ))
    return rows


def print_table(rows, reference_name):
    print(f"\n| variant | mode | tok/s | tokens / forward | = own AR | AR agreement with {reference_name} "
          "| weights MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        agreement = "" if r["ar_agreement"] is None else r["ar_agreement"]
        print(f"| {r['variant']} | {r['mode']} | {r['tok_s']} | {r['tokens_per_forward']} | {r['equals_own_ar']} "
              f"| {agreement} | {r['weight_mib']} | {r['peak_rss_mib']} |")


def write_results(args, runs):
    import torch
    import transformers

    rows = table_rows(runs, "fp32" if "fp32" in runs else next(iter(runs)))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    setup = {"model": args.model or "demo", "device": args.device, "threads": args.threads,
             "new_tokens": args.new_tokens, "prompts": PROMPTS, "modes": MODES,
             "torch": torch.__version__, "transformers": transformers.__version__}
    with open(args.out, "w") as f:
        json.dump({"setup": setup, "rows": rows, "runs": runs}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
