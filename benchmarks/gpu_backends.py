"""Milliseconds per forward of each kind, per attention backend, on an 8B-shaped random-weight model in bf16.

    python benchmarks/gpu_backends.py --out results.json [--layers 34] [--context 512]

Forward kinds (batch 1, a prefix cache of `--context` tokens):
  ar_step        1 causal token, cache append (rolled back after timing)
  draft_B        bidirectional [seed, masks] block over the read-only cache (LinearSpec draft / diffusion denoise)
  verify_B       causal block, cache append (LinearSpec verify / diffusion commit)
  quadratic_B    the B*(B+1) QuadraticSpec chunk with its custom mask, head on 2B rows
Backends: sdpa (PyTorch's own dispatch), sdpa restricted to one kernel (flash / cuDNN / efficient / math), eager,
flex_attention. A kernel that cannot run a call (e.g. sdpa's flash kernel with a materialised mask) is reported
as n/a with the reason. Also: AR decoding tok/s of stock transformers `generate()` (Ministral3ForCausalLM sharing
the same weights) against ours, and the HBM roofline for the measured model. Prints a table and writes JSON.
"""

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, Ministral3ForCausalLM

from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM
from nemotron_diffusion.generation_nemotron_diffusion import _quadratic_mask_function
from nemotron_diffusion.native_twin import ministral3_config


BACKENDS = {
    "sdpa": ("sdpa", None),
    "sdpa-flash": ("sdpa", SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION),
    "sdpa-efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-math": ("sdpa", SDPBackend.MATH),
    "eager": ("eager", None),
    "flex_attention": ("flex_attention", None),
}


def eight_b_config(layers, hidden=None):
    sizes = {} if hidden is None else dict(hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=1024,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4)
    return NemotronDiffusionConfig(num_hidden_layers=layers, mask_token_id=100, eos_token_id=11, pad_token_id=0, **sizes)


def cuda_time(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # CPU dry run of the script
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_kinds(model, context, blocks, quadratic_blocks):
    device = model.device
    mask_id = model.config.mask_token_id
    prompt = torch.randint(200, model.config.vocab_size, (1, context), device=device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, logits_to_keep=1)

    def ar_step():
        model(input_ids=prompt[:, :1], cache=cache)
        cache.crop(-1)

    kinds = {"ar_step": ar_step}
    for b in blocks:
        block = torch.full((1, b), mask_id, device=device)
        block[:, 0] = 42

        def draft(block=block):
            hidden = model.encoder(input_ids=block, cache=cache, is_causal=False, update_cache=False).last_hidden_state
            model.diffusion_head(hidden[:, 1:])

        def verify(block=block, b=b):
            model(input_ids=block, cache=cache)
            cache.crop(-b)

        kinds[f"draft_{b}"] = draft
        kinds[f"verify_{b}"] = verify
    for b in quadratic_blocks:
        chunk = torch.full((1, b * (b + 1)), mask_id, device=device)
        chunk[:, :: b + 1] = 42
        offsets = (torch.arange(b, device=device)[:, None] + torch.arange(b + 1, device=device)[None]).reshape(1, -1)
        mask_function = _quadratic_mask_function(context, b, device)

        def quadratic(chunk=chunk, offsets=offsets, mask_function=mask_function, b=b):
            hidden = model.encoder(input_ids=chunk, position_ids=context + offsets, cache=cache, is_causal=False,
                                   update_cache=False, mask_function=mask_function).last_hidden_state
            hidden = hidden.view(1, b, b + 1, -1)
            model.diffusion_head(hidden[:, :, 0])
            model.diffusion_head(hidden[:, 0, 1:])

        kinds[f"quadratic_{b}"] = quadratic
    return kinds


def native_twin(model):
    """Ministral3ForCausalLM sharing our modules (no weight copy): the stock transformers baseline."""
    with torch.device("meta"):
        native = Ministral3ForCausalLM(ministral3_config(model.config))
    native.model.embed_tokens = model.encoder.embed_tokens
    native.model.layers = model.encoder.layers
    native.model.norm = model.encoder.norm
    native.model.rotary_emb = model.encoder.rotary_emb
    native.lm_head = model.diffusion_head
    return native.eval()


def generation_rates(model, context, new_tokens, repeats):
    native = native_twin(model)
    prompt = torch.randint(200, model.config.vocab_size, (1, context), device=model.device)
    rates = {}
    for name, m, kwargs in (("stock_generate", native, {}), ("ours_ar", model, {"decode_mode": "ar"})):
        def run():
            m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
        ms = cuda_time(run, repeats, warmup=1)
        rates[name] = new_tokens / (ms / 1000)
    rates["ours_over_stock"] = rates["ours_ar"] / rates["stock_generate"]
    return rates


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_backends.json")
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--hidden", type=int, default=None, help="smaller hidden size for a dry run")
    parser.add_argument("--flex-kinds", default="ar_step,draft_32,verify_32,quadratic_16",
                        help="flex_attention compiles per shape: time only these kinds")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = NemotronDiffusionForCausalLM._from_config(eight_b_config(args.layers, args.hidden), dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    streamed_bytes = (params - model.encoder.embed_tokens.weight.numel()) * 2
    info = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": f"8B-shaped random weights, {args.layers} layers, bf16, {params / 1e9:.2f} B params",
        "context": args.context,
        "streamed_gb_per_forward": streamed_bytes / 1e9,
    }
    print(json.dumps(info, indent=1), flush=True)
    results = {}
    for name in args.backends.split(","):
        impl, kernel = BACKENDS[name]
        model.set_attn_implementation(impl)
        kinds = forward_kinds(model, args.context, (8, 32), (8, 16))
        results[name] = {}
        for kind, fn in kinds.items():
            if impl == "flex_attention" and kind not in args.flex_kinds.split(","):
                continue
            context = sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext()
            try:
                with context, torch.no_grad():
                    t0 = time.time()
                    results[name][kind] = round(cuda_time(fn, args.repeats), 3)
            except Exception as error:  # a kernel that cannot serve this call
                results[name][kind] = f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            print(f"{name:>15} {kind:>13}: {results[name][kind]}  ({time.time() - t0:.1f}s)", flush=True)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        rates = generation_rates(model, 128, 128, 3)
    roofline_ms = streamed_bytes / 3.35e12 * 1e3  # H100 SXM HBM3
    summary = {
        "info": info,
        "ms_per_forward": results,
        "ar_generate_tok_per_s": rates,
        "hbm_roofline": {"bandwidth_tb_s": 3.35, "ms_per_forward": roofline_ms, "forwards_per_s": 1000 / roofline_ms},
    }
    kinds = list(next(iter(results.values())).keys())
    print("\n| backend | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, row in results.items():
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else ("n/a" if k in row else "-") for k in kinds]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nAR generate tok/s (batch 1, 128 prompt + 128 new): {json.dumps({k: round(v, 2) for k, v in rates.items()})}")
    print(f"HBM roofline: {roofline_ms:.2f} ms/forward ({1000 / roofline_ms:.0f} forwards/s)")
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
