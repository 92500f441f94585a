# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Benchmark suite: every decoding mode against the Hugging Face baselines, a speed-of-light check, plots.

    nemotron-diffusion bench [--model FOLDER | --random SHAPE] [--block-sizes 8,16,32] [--batch-sizes 1,4] ...
    python -m nemotron_diffusion.bench ...              (the same)

On one model (the demo by default, or random weights of a given shape) and a held-out prompt set (chat requests
built from the CPython standard-library files that `nemotron_diffusion.training.stdlib_files("heldout")` holds out
of drafter training), it measures:

1. **Modes x block sizes x batch sizes** (greedy; `sweep`): tok/s (median over `--repeats` timed passes over the
   prompt set; a warm-up call per setting first, passes interleaved across settings so drifts hit all alike),
   physical forwards, tokens per forward (new tokens / forwards, the prefill included, as `generate()` reports it),
   the acceptance-length histogram (speculative modes), milliseconds per forward by kind (prefill / step / draft /
   verify / commit / draft+verify, head included), peak memory, and whether the tokens equal AR's. In the same run
   and on the same weights, the baselines a user would pick: transformers' stock `generate()` of the equivalent
   native model (greedy; `LlamaForCausalLM` for the demo, `Ministral3ForCausalLM` for NVIDIA's checkpoints; the
   base weights shared, not copied) and transformers' assisted generation with prompt lookup
   (`prompt_lookup_num_tokens`; batch 1 only, as transformers allows).
2. **Speed of light** (`checks`): a model of the same shape built so that its drafts are perfect (every layer's
   o_proj and down_proj zeroed, so each slot's logits depend only on its own token, and a head that maps every
   token, the mask included, to one token `a` with a large margin): AR, drafts and diffusion all agree with
   confidence ~1. Tokens per forward with the prefill excluded must reach 0.97 of each mode's ceiling (diffusion
   B/2, LinearSpec B/2, QuadraticSpec B per cycle); tok/s there is each mode's speed at perfect acceptance on this
   machine.
3. **AR overhead** (`checks`): `decode_mode="ar"` against stock `generate()` on the same weights, batch 1, a fixed
   number of new tokens, interleaved runs, medians (target ratio >= 0.97); with a Llama twin also against stock
   `Ministral3ForCausalLM`, whose layers are ours, to isolate the overhead of our generation code.

Writes PREFIX.json, PREFIX.md, PREFIX_tok_s.png and PREFIX_tokens_per_forward.png (`report`; plots need
matplotlib: `pip install nemotron-diffusion[bench]`; without it they are skipped with a message). Random fp32
weights can produce denormals that slow CPU matmuls many times over: flushing them is on
(`torch.set_flush_denormal(True)`).

Modules: `arguments` (the flags; imported by the command line, so it imports nothing heavy), `models` (the model
under test and its stock twin), `prompts`, `measure` (forward timing, peak memory), `sweep`, `checks`, `report`,
`suite` (one whole run). Tooling beside the model files: the model files never import it.
"""
