"""Static cache + torch.compile (CUDA graphs) on an 8B-shaped random-weight bf16 model, batch 1.

    python benchmarks/gpu_compiled.py --out compiled.json [--budget-s 330]

1. AR decoding tok/s and % of the HBM roofline: stock transformers `generate()` (Ministral3ForCausalLM sharing our
   weights) vs ours (`decode_mode="ar"`), both with `cache_implementation="static"` (transformers auto-compiles the
   decode step with CUDA graphs), and the eager dynamic-cache baseline.
2. ms per compiled forward of each block kind over a 512-token static prefix cache: LinearSpec draft (read-only,
   bidirectional) and verify (causal, written then rolled back) at B = 32, 8, 16, and the QuadraticSpec chunk at
   B = 16, 8 — in priority order, until the time budget is spent (each new shape compiles once, ~1 minute).
Results are written to the JSON file after every measurement, so a run cut short still reports what it measured.
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import CompileConfig, StaticCache

from benchmarks.gpu_backends import eight_b_config, native_twin
from nemotron_diffusion import NemotronDiffusionForCausalLM
from nemotron_diffusion.cache_nemotron_diffusion import rewind_cache
from nemotron_diffusion.generation_nemotron_diffusion import _quadratic_mask_function


ROOFLINE_FORWARDS_PER_S = 3.35e12  # H100 SXM bytes/s; divided by the bytes streamed per forward below


def timed(fn, repeats=20, warmup=3):
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_compiled.json")
    parser.add_argument("--budget-s", type=float, default=330)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--hidden", type=int, default=None, help="smaller hidden size for a dry run")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' for a dry run)")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (CUDA graphs by default)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_config = CompileConfig(backend=args.backend, mode=args.mode if args.backend == "inductor" else None)
    compile_config._compile_all_devices = device == "cpu"
    # One graph per block kind and size: more than dynamo's default of 8 per function, past which it runs eagerly.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 256
    began = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = NemotronDiffusionForCausalLM._from_config(eight_b_config(args.layers, args.hidden), dtype=torch.bfloat16).eval()
    model.generation_config.compile_config = compile_config
    streamed = (sum(p.numel() for p in model.parameters()) - model.encoder.embed_tokens.weight.numel()) * 2
    roofline = ROOFLINE_FORWARDS_PER_S / streamed
    result = {
        "info": {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                 "transformers": transformers.__version__, "model": "8B-shaped random weights, bf16, batch 1",
                 "roofline_forwards_per_s": roofline, "context": args.context},
        "ar_tok_per_s": {}, "compiled_ms_per_forward": {}, "compile_s": {},
    }

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def log(name, value, compile_s=None):
        extra = f" (compile + warm-up {compile_s:.0f} s)" if compile_s is not None else ""
        print(f"{name}: {value}{extra}   [{time.time() - began:.0f} s]", flush=True)
        save()

    # 1. AR decoding
    native = native_twin(model)
    native.generation_config.compile_config = compile_config
    prompt = torch.randint(200, model.config.vocab_size, (1, 128), device=device)
    new_tokens = 128
    runs = [("stock_eager_dynamic", native, {}), ("stock_static_compiled", native, {"cache_implementation": "static"}),
            ("ours_static_compiled", model, {"cache_implementation": "static", "decode_mode": "ar"})]
    with torch.no_grad():
        for name, m, kwargs in runs:
            def run():
                m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
            t0 = time.time()
            run()  # compiles
            compile_s = time.time() - t0
            ms = timed(run, repeats=3, warmup=1)
            rate = new_tokens / (ms / 1000)
            result["ar_tok_per_s"][name] = {"tok_per_s": rate, "roofline_fraction": rate / roofline}
            result["compile_s"][name] = compile_s
            log(f"AR {name}", f"{rate:.1f} tok/s = {rate / roofline:.1%} of roofline", compile_s)

    # 2. compiled block forwards
    compiled = torch.compile(model.encoder.__call__, **compile_config.to_dict())
    cache = StaticCache(config=model.config, max_cache_len=args.context + 16 * 17 + 64)
    context_ids = torch.randint(200, model.config.vocab_size, (1, args.context), device=device)
    with torch.no_grad():
        model.encoder(input_ids=context_ids, cache=cache)
    mask_length = cache.layers[0].max_cache_len
    mask_id = model.config.mask_token_id

    def padded_mask(query):
        mask = torch.zeros(1, mask_length, dtype=torch.long, device=device)
        mask[:, : args.context + query] = 1
        return mask

    def kinds():
        step = torch.full((1, 1), 42, device=device)
        step_mask = padded_mask(1)

        def ar_step():
            h = compiled(input_ids=step, attention_mask=step_mask, position_ids=torch.full((1, 1), args.context, device=device),
                         cache=cache, use_cache=True, is_causal=True).last_hidden_state
            model.diffusion_head(h)
            rewind_cache(cache, 1)

        yield "ar_step", ar_step
        for b in (32, 8, 16):
            block = torch.full((1, b), mask_id, device=device)
            block[:, 0] = 42
            positions = args.context + torch.arange(b, device=device)[None]
            mask = padded_mask(b)

            def draft(block=block, positions=positions, mask=mask):
                h = compiled(input_ids=block, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, is_causal=False, update_cache=False).last_hidden_state
                model.diffusion_head(h[:, 1:])

            def verify(block=block, positions=positions, mask=mask, b=b):
                h = compiled(input_ids=block, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, is_causal=True).last_hidden_state
                model.diffusion_head(h)
                rewind_cache(cache, b)

            yield f"draft_{b}", draft
            yield f"verify_{b}", verify
            if b == 32:
                for q in (16, 8):
                    yield from quadratic(q)

    def quadratic(b):
        n = b * (b + 1)
        chunk = torch.full((1, n), mask_id, device=device)
        chunk[:, :: b + 1] = 42
        offsets = (torch.arange(b, device=device)[:, None] + torch.arange(b + 1, device=device)[None]).reshape(1, -1)
        positions = args.context + offsets
        pattern = model.encoder.build_attention_mask(
            torch.empty(1, n, 0, dtype=model.dtype, device=device), padded_mask(n), cache, positions, False,
            _quadratic_mask_function(args.context, b, device),
        )

        def forward():
            h = compiled(input_ids=chunk, attention_mask=pattern, position_ids=positions, cache=cache, use_cache=True,
                         is_causal=False).last_hidden_state.view(1, b, b + 1, -1)
            model.diffusion_head(h[:, :, 0])
            model.diffusion_head(h[:, 0, 1:])
            rewind_cache(cache, n)

        yield f"quadratic_{b}", forward

    with torch.no_grad():
        for name, fn in kinds():
            if time.time() - began > args.budget_s:
                print(f"time budget spent: {name} and later kinds not measured", flush=True)
                break
            t0 = time.time()
            fn()
            compile_s = time.time() - t0
            ms = timed(fn)
            result["compiled_ms_per_forward"][name] = ms
            result["compile_s"][name] = compile_s
            log(f"compiled {name}", f"{ms:.2f} ms", compile_s)
        step_ms = result["compiled_ms_per_forward"].get("ar_step")
        verify = result["compiled_ms_per_forward"].get("verify_32")
        if step_ms and verify:
            result["verify_32_over_ar_step"] = verify / step_ms
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
