"""Static cache + torch.compile (CUDA graphs) on an 8B-shaped random-weight bf16 model, batch 1.

    python -m benchmarks.gpu_compiled --out compiled.json [--kinds ar_step,verify_32,...] [--tuned]
    python -m benchmarks.gpu_compiled --workers 4 --out compiled.json       # the kinds split over 4 processes

Kinds (each compiled once for its fixed shape, then timed):
  generate_stock / generate_ours   AR decoding tok/s with `cache_implementation="static"` (transformers auto-compiles
                                   the decode step): stock `generate()` of Ministral3ForCausalLM sharing our weights,
                                   and ours with `decode_mode="ar"`; 128-token prompt, 128 new tokens.
  ar_step                          one causal token over a `--context`-token static prefix (written, rolled back)
  draft_B                          LinearSpec draft / diffusion denoise: bidirectional [seed, masks] block, read-only
  verify_B                         LinearSpec verify / diffusion commit: causal block, written then rolled back
  quadratic_B                      the B*(B+1) QuadraticSpec chunk with its custom mask, head on 2B rows
`--tuned` compiles with the inductor settings of gpt-fast (coordinate-descent tuning of the generated kernels).

Compiling an 8B-shaped model takes 70-100 s per shape, mostly single-threaded Python, so `--workers N` starts N
processes that compile their share of the kinds at the same time (the model is 16 GB; four fit on an 80 GB card)
and then take turns on the GPU: nothing is timed while another process runs. Results are written after every
measurement, so a run cut short still reports what it measured.
"""

import argparse
import fcntl
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import CompileConfig, StaticCache

from benchmarks.gpu_backends import cuda_time, eight_b_config, native_twin
from nemotron_diffusion import NemotronDiffusionForCausalLM
from nemotron_diffusion.cache_nemotron_diffusion import rewind_cache
from nemotron_diffusion.generation_nemotron_diffusion import _quadratic_mask_function

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
NEW_TOKENS = 128
# The split used by --workers 4: about equal compile work per process, the most wanted numbers first.
WORKER_KINDS = [
    "ar_step,verify_32,generate_ours,generate_stock",
    "draft_8,verify_8,quadratic_8",
    "draft_16,verify_16,quadratic_16",
    "ar_step,verify_32,draft_32",  # with --tuned
]


def build_kinds(model, context, device):
    """name -> zero-argument callable running that forward once (the first call compiles it)."""
    compile_config = model.generation_config.compile_config
    compiled = torch.compile(model.encoder.__call__, **compile_config.to_dict())
    cache = StaticCache(config=model.config, max_cache_len=context + 16 * 17 + 64)
    with torch.no_grad():
        model.encoder(input_ids=torch.randint(200, model.config.vocab_size, (1, context), device=device), cache=cache)
    mask_length = cache.layers[0].max_cache_len
    mask_id = model.config.mask_token_id

    def padded_mask(query):  # fixed-length padding mask: one compiled graph per query length
        mask = torch.zeros(1, mask_length, dtype=torch.long, device=device)
        mask[:, : context + query] = 1
        return mask

    def block_forward(ids, positions, mask, *, is_causal, update_cache, head_rows):
        hidden = compiled(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            is_causal=is_causal,
            update_cache=update_cache,
        ).last_hidden_state
        model.diffusion_head(head_rows(hidden))
        if update_cache:
            rewind_cache(cache, ids.shape[1])

    kinds = {}
    for b in (1, 8, 16, 32):
        block = torch.full((1, b), mask_id, device=device)
        block[:, 0] = 42
        positions = context + torch.arange(b, device=device)[None]
        mask = padded_mask(b)
        kinds["ar_step" if b == 1 else f"verify_{b}"] = functools.partial(
            block_forward, block, positions, mask, is_causal=True, update_cache=True, head_rows=lambda h: h
        )
        if b > 1:
            kinds[f"draft_{b}"] = functools.partial(
                block_forward,
                block,
                positions,
                mask,
                is_causal=False,
                update_cache=False,
                head_rows=lambda h: h[:, 1:],
            )
    for b in (8, 16):
        n = b * (b + 1)
        chunk = torch.full((1, n), mask_id, device=device)
        chunk[:, :: b + 1] = 42
        positions = context + (
            torch.arange(b, device=device)[:, None] + torch.arange(b + 1, device=device)[None]
        ).reshape(1, -1)
        pattern = model.encoder.build_attention_mask(
            torch.empty(1, n, 0, dtype=model.dtype, device=device),
            padded_mask(n),
            cache,
            positions,
            False,
            _quadratic_mask_function(context, b, device),
        )

        def rows(hidden, b=b):
            hidden = hidden.view(1, b, b + 1, -1)
            return torch.cat([hidden[:, :, 0], hidden[:, 0, 1:]], dim=1)

        kinds[f"quadratic_{b}"] = functools.partial(
            block_forward, chunk, positions, pattern, is_causal=False, update_cache=True, head_rows=rows
        )

    prompt = torch.randint(200, model.config.vocab_size, (1, 128), device=device)
    native = native_twin(model)
    native.generation_config.compile_config = compile_config
    for name, m, extra in (("generate_stock", native, {}), ("generate_ours", model, {"decode_mode": "ar"})):
        kinds[name] = functools.partial(
            m.generate,
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            cache_implementation="static",
            **extra,
        )
    return kinds


def profile_top_kernels(fn, rows=12):
    """The kernels of `fn` by GPU time (what a CUDA-graph replay runs), as a printable table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return events.table(sort_by=key, row_limit=rows)


def wait_for_turn(sync_dir, workers, deadline):
    """Barrier (every worker compiled, or the deadline passed), then an exclusive lock on the GPU for timing."""
    open(os.path.join(sync_dir, f"ready-{os.getpid()}"), "w").close()
    while time.time() < deadline and len([f for f in os.listdir(sync_dir) if f.startswith("ready-")]) < workers:
        time.sleep(1)
    lock = open(os.path.join(sync_dir, "gpu.lock"), "w")  # noqa: SIM115 (held open until timing is done)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def worker(args):
    began = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tuned:  # gpt-fast's inductor settings
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
        inductor_config.triton.unique_kernel_names = True
    # One graph per block kind and size: more than dynamo's default of 8 per function, past which it runs eagerly.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 256
    torch.manual_seed(0)
    with torch.device(device):
        model = NemotronDiffusionForCausalLM._from_config(
            eight_b_config(args.layers, args.hidden), dtype=torch.bfloat16
        ).eval()
    compile_config = CompileConfig(backend=args.backend, mode=args.mode if args.backend == "inductor" else None)
    compile_config._compile_all_devices = device == "cpu"
    model.generation_config.compile_config = compile_config
    streamed = (sum(p.numel() for p in model.parameters()) - model.encoder.embed_tokens.weight.numel()) * 2
    roofline = HBM_BYTES_PER_S / streamed
    suffix = "_tuned" if args.tuned else ""
    result = {
        "info": {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "model": "8B-shaped random weights, bf16, batch 1",
            "layers": args.layers,
            "streamed_gb_per_forward": streamed / 1e9,
            "roofline_forwards_per_s": roofline,
            "context": args.context,
            "tuned": args.tuned,
        },
        "ms_per_forward": {},
        "ar_tok_per_s": {},
        "compile_s": {},
        "not_measured": [],
    }

    def log(message):
        print(f"[{'tuned' if args.tuned else 'default'} {time.time() - began:4.0f} s] {message}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    kinds = build_kinds(model, args.context, device)
    wanted = args.kinds.split(",")
    ready = []
    with torch.no_grad():
        for name in wanted:
            if time.time() > args.deadline:
                result["not_measured"].append(name + suffix)
                log(f"deadline: {name} not compiled")
                continue
            t0 = time.time()
            kinds[name]()
            result["compile_s"][name + suffix] = time.time() - t0
            log(f"{name}: compiled in {time.time() - t0:.0f} s")
            ready.append(name)
        lock = wait_for_turn(args.sync_dir, args.workers, args.deadline + 60) if args.sync_dir else None
        for name in ready:
            if name.startswith("generate"):
                ms = cuda_time(kinds[name], repeats=3, warmup=1)
                rate = NEW_TOKENS / (ms / 1000)
                result["ar_tok_per_s"][name + suffix] = {"tok_per_s": rate, "roofline_fraction": rate / roofline}
                log(f"{name}: {rate:.1f} tok/s = {rate / roofline:.1%} of the roofline")
            else:
                result["ms_per_forward"][name + suffix] = ms = cuda_time(kinds[name], repeats=30, warmup=2)
                log(f"{name}: {ms:.2f} ms")
        if args.profile and "ar_step" in ready and device == "cuda":
            result["ar_step_profile" + suffix] = table = profile_top_kernels(kinds["ar_step"])
            log("ar_step kernels by GPU time:\n" + table)
    if lock is not None:
        lock.close()
    log("done")


def merge(paths):
    merged = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            part = json.load(f)
        merged.setdefault("info", part["info"])
        for key, value in part.items():
            if isinstance(value, dict) and key != "info":
                merged.setdefault(key, {}).update(value)
            elif isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif key != "info":
                merged[key] = value
    ms = merged.get("ms_per_forward", {})
    for suffix in ("", "_tuned"):
        step = ms.get("ar_step" + suffix)
        if step:
            merged.setdefault("over_ar_step" + suffix, {})
            for name, value in ms.items():
                if name.endswith(suffix) and (suffix or not name.endswith("_tuned")):
                    merged["over_ar_step" + suffix][name] = value / step
            merged.setdefault("ar_step_roofline_fraction", {})[suffix.strip("_") or "default"] = (
                1000 / step / merged["info"]["roofline_forwards_per_s"]
            )
    return merged


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_compiled.json")
    parser.add_argument("--kinds", default="ar_step,verify_32,draft_32,draft_8,verify_8,quadratic_8")
    parser.add_argument("--workers", type=int, default=1, help="split WORKER_KINDS over this many processes")
    parser.add_argument("--tuned", action="store_true", help="gpt-fast's inductor settings")
    parser.add_argument("--profile", action="store_true", help="print the AR step's kernels by GPU time")
    parser.add_argument("--budget-s", type=float, default=300, help="no new compile after this many seconds")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--hidden", type=int, default=None, help="smaller hidden size for a dry run")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' for a dry run)")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (CUDA graphs by default)")
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sync-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.deadline is None:
        args.deadline = time.time() + args.budget_s
    if args.workers <= 1 or args.sync_dir:  # a single process, or one of the workers started below
        return worker(args)

    sync_dir = tempfile.mkdtemp(prefix="gpu-compiled-")
    common = [
        "--deadline",
        str(args.deadline),
        "--sync-dir",
        sync_dir,
        "--workers",
        str(args.workers),
        "--context",
        str(args.context),
        "--layers",
        str(args.layers),
        "--backend",
        args.backend,
        "--mode",
        args.mode,
    ] + (["--hidden", str(args.hidden)] if args.hidden else [])
    parts, processes = [], []
    for rank, kinds in enumerate(WORKER_KINDS[: args.workers]):
        part = f"{args.out}.part{rank}"
        parts.append(part)
        extra = (["--tuned"] if rank == 3 else []) + (["--profile"] if rank in (0, 3) else [])
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.gpu_compiled", "--out", part, "--kinds", kinds] + common + extra
            )
        )
    for process in processes:
        process.wait()
    merged = merge(parts)
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    print(json.dumps({k: v for k, v in merged.items() if "profile" not in k}, indent=1))


if __name__ == "__main__":
    main()
