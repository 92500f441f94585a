"""Quickstart: one checkpoint, four ways to generate.

    python examples/quickstart.py                  # a small random tri-mode model, built in memory
    python examples/quickstart.py PATH_TO_FOLDER   # any tri-mode folder (ours or NVIDIA's), with its tokenizer

It generates from one prompt with `decode_mode` = ar, diffusion, linear_spec and quadratic_spec, prints a table
(new tokens, forwards, tokens per forward, tok/s) and checks that both self-speculative modes returned exactly the
AR tokens (greedy decoding is lossless). With random weights the tokens are meaningless and drafts are rarely
accepted, so tokens per forward stay near their floor; a trained checkpoint is where the speed-up shows.
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nemotron_diffusion  # noqa: F401  (registers the model with the Auto classes)
from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def load(path):
    if path is None:
        torch.manual_seed(0)
        config = NemotronDiffusionConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, mask_token_id=511, eos_token_id=None, pad_token_id=0,
        )
        return NemotronDiffusionForCausalLM(config).eval(), None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def main(path=None, max_new_tokens=64):
    # Random weights drive some fp32 activations into denormal range, where CPU matmuls run ~40x slower and the
    # timings would measure that instead of the decoding loops.
    torch.set_flush_denormal(True)
    model, tokenizer = load(path)
    if tokenizer is not None:
        messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        input_ids = torch.tensor([[1, 17, 42, 99, 7, 256, 31, 77, 5]])

    results = {}
    for mode in MODES:
        settings = {"diffusion": dict(block_size=8, confidence_threshold=0.9), "quadratic_spec": dict(block_size=8)}
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, decode_mode=mode, return_dict_in_generate=True,
                      **settings.get(mode, dict(block_size=16)))
        model.generate(input_ids, **{**kwargs, "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, **kwargs)
        seconds = time.perf_counter() - start
        new = out.sequences[0, input_ids.shape[1]:]
        results[mode] = (new, int(out.num_forwards[0]), float(out.tokens_per_forward[0]), len(new) / seconds)

    print(f"{'mode':<16}{'new tokens':>11}{'forwards':>10}{'tok/forward':>13}{'tok/s':>9}")
    for mode, (new, forwards, tpf, rate) in results.items():
        print(f"{mode:<16}{len(new):>11}{forwards:>10}{tpf:>13.2f}{rate:>9.1f}")
    for mode, (new, *_rest) in results.items():
        shown = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else new.tolist()
        print(f"\n[{mode}] {shown}")

    ar_tokens = results["ar"][0]
    for mode in ("linear_spec", "quadratic_spec"):
        if not torch.equal(results[mode][0], ar_tokens):
            raise SystemExit(f"{mode} differs from AR: self-speculation must be lossless at temperature 0")
    print("\nlinear_spec and quadratic_spec returned exactly the AR tokens.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
