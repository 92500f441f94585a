"""The two checks: speed of light (a model whose drafts are perfect reaches each mode's tokens-per-forward ceiling)
and AR overhead (`decode_mode="ar"` against stock `generate()` on the same weights)."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .. import NemotronDiffusionForCausalLM
from .arguments import SPEC_MODES
from .measure import histogram, sync
from .models import ministral3_twin
from .prompts import batches_of, eos_ids, pad_id


# ================================================================================================ speed of light
def perfect_drafter_model(model, token):
    """A model of `model`'s shape whose bidirectional predictions equal its AR ones: each slot's logits depend only
    on its own token (o_proj and down_proj zeroed), and the head sends every token, the mask included, to `token`
    with a margin of about 4*sqrt(hidden) (confidence ~1). Greedy AR output: `token` forever; drafts: all `token`."""
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False  # the head needs its own weights
    with torch.device(model.device):
        torch.manual_seed(0)
        sol = NemotronDiffusionForCausalLM(config).to(dtype=model.dtype).eval()
    with torch.no_grad():
        for layer in sol.encoder.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = sol.encoder.embed_tokens.weight
        embed.normal_(0.0, 0.01)
        embed[:, 0] = 1.0
        sol.encoder.norm.weight.fill_(1.0)
        head = sol.diffusion_head.weight
        head[:, 0] = 0.0
        head[token, 0] = 4.0
    sol.generation_config.do_sample = False
    return sol


CEILINGS = {
    "ar": lambda b: 1.0,
    "diffusion": lambda b: b / 2,
    "linear_spec": lambda b: b / 2,
    "quadratic_spec": lambda b: float(b),
}


def sol_plan(args):
    """(batch, mode, block) of the speed-of-light runs: every mode and block of the sweep (QuadraticSpec above
    --quadratic-max-block at batch 1 only)."""
    return [
        (batch, mode, block)
        for batch in args.batch_sizes
        for mode in args.modes
        for block in ([None] if mode == "ar" else args.block_sizes)
        if not (mode in SPEC_MODES and block < 2)
        and not (mode == "quadratic_spec" and batch > 1 and block > args.quadratic_max_block)
    ]


def speed_of_light(model, prompts, args, bar):
    """Perfect drafts: tokens per forward (prefill excluded) against each mode's ceiling, per block and batch."""
    special = eos_ids(model.config) | {model.config.mask_token_id, model.config.pad_token_id}
    token = next(t for t in range(3, model.config.vocab_size) if t not in special)
    sol = perfect_drafter_model(model, token)
    pad = pad_id(model.config)
    n = args.sol_max_new_tokens
    rows = []
    for batch, mode, block in sol_plan(args):
        ids, mask = batches_of(prompts[:batch], batch, pad, model.device)[0]
        kwargs = {
            "decode_mode": mode,
            "max_new_tokens": n,
            "min_new_tokens": n if mode == "ar" else None,
            "do_sample": False,
            "pad_token_id": pad,
            "return_dict_in_generate": True,
        }
        if mode != "ar":
            kwargs["block_size"] = block
        if mode == "diffusion":
            kwargs["confidence_threshold"] = args.threshold
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        bar.set_postfix_str(f"speed of light {mode} B={block} bs={batch}")
        with torch.no_grad():
            warm_up = dict(kwargs, max_new_tokens=min(n, 2 * (block or 8)))
            sol.generate(ids, attention_mask=mask, **warm_up)
            sync(model.device)
            start = time.perf_counter()
            out = sol.generate(ids, attention_mask=mask, **kwargs)
            sync(model.device)
            seconds = time.perf_counter() - start
        bar.update(1)
        new = out.sequences[:, ids.shape[1] :]
        new_tokens = int(new.numel())
        forwards = out.num_forwards.tolist()
        tpf = [new.shape[1] / max(f - 1, 1) for f in forwards]  # prefill excluded
        ceiling = CEILINGS[mode](block or 1)
        rows.append(
            {
                "mode": mode,
                "block_size": block,
                "batch_size": batch,
                "new_tokens_per_row": int(new.shape[1]),
                "forwards_per_row": forwards[0],
                "forwards_min": min(forwards),
                "forwards_max": max(forwards),
                "tokens_per_forward_excl_prefill": min(tpf),
                "ceiling": ceiling,
                "ratio": min(tpf) / ceiling,
                "perfect": bool((new == token).all()),
                "acceptance_histogram": histogram(out.acceptance_lengths),
                "tok_per_s": new_tokens / seconds,
            }
        )
    del sol
    return {
        "construction": "same shape as the benchmarked model; every layer's o_proj and down_proj zeroed, untied head "
        f"mapping every token (mask included) to token {token} with a margin of ~4*sqrt(hidden)",
        "max_new_tokens": n,
        "threshold": args.threshold,
        "target_ratio": 0.97,
        "all_pass": all(r["ratio"] >= 0.97 for r in rows),
        "rows": rows,
    }


# ==================================================================================================== AR overhead
def ar_overhead(model, native, prompt, args, bar):
    """Ours (`decode_mode="ar"`) vs stock `generate()` of the native twin, batch 1, exactly `--overhead-tokens` new
    tokens each, medians of `--overhead-repeats` rounds (the order rotating each round). When the native twin is
    Llama, stock generate() of `Ministral3ForCausalLM` (layers identical to ours) runs too: ours against it is the
    overhead of our generation code alone, ours against Llama what a user of the demo sees."""
    n = args.overhead_tokens
    ids = torch.tensor([prompt], device=model.device)
    pad = pad_id(model.config)
    common = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad}
    runs = {
        "ours": lambda: model.generate(ids, decode_mode="ar", **common),
        "stock": lambda: native.generate(ids, **common),
    }
    same_layers = None
    if not type(native).__name__.startswith("Ministral3"):
        same_layers = ministral3_twin(model)
        runs["stock_ministral3"] = lambda: same_layers.generate(ids, **common)
    names = list(runs)
    times = {name: [] for name in names}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the same tokens
        for r in range(args.overhead_repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sync(model.device)
                start = time.perf_counter()
                runs[name]()
                sync(model.device)
                times[name].append(time.perf_counter() - start)
            bar.update(1)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "new_tokens": n,
        "prompt_tokens": len(prompt),
        "rounds": args.overhead_repeats,
        "stock_model": type(native).__name__,
        "same_tokens": all(torch.equal(outputs["ours"], out) for out in outputs.values()),
        "ours_tok_per_s": n / median["ours"],
        "stock_tok_per_s": n / median["stock"],
        "ratio": median["stock"] / median["ours"],
        "paired_ratio": statistics.median(s / o for s, o in zip(times["stock"], times["ours"])),
        "seconds": times,
        "target_ratio": 0.97,
    }
    if same_layers is not None:
        result.update(
            stock_ministral3_tok_per_s=n / median["stock_ministral3"],
            ratio_same_layers=median["stock_ministral3"] / median["ours"],
            paired_ratio_same_layers=statistics.median(
                s / o for s, o in zip(times["stock_ministral3"], times["ours"])
            ),
        )
    return result
