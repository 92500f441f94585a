"""What a run writes: the machine it ran on, the markdown table, the PNG plots, and paths as results show them."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch
import transformers

from .arguments import source_checkout


def display_path(path):
    """`path` as written into results: relative to the source tree when inside it, `~/...` under the home folder,
    so committed results carry no machine-specific absolute paths."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    checkout = source_checkout()
    for base, shown in ((checkout, ""), (Path.home(), "~/")):
        if base is not None and resolved.is_relative_to(base):
            return shown + str(resolved.relative_to(base))
    return str(path)


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _kinds_cell(kinds):
    return ", ".join(f"{k} {v['median_ms']:.1f}×{v['count']}" for k, v in kinds.items()) if kinds else "-"


def markdown(result):
    info, s = result["machine"], result["settings"]
    lines = [
        f"# Benchmark: {result['model']['description']}",
        "",
        (
            f"{result['created']} · {info.get('cpu') or info['platform']} ({info['cpu_cores']} cores, "
            f"{info['torch_threads']} torch threads){' · ' + info['gpu'] if info.get('gpu') else ''} · "
            f"torch {info['torch']} · transformers {info['transformers']} · Python {info['python']} · "
            f"{result['model']['dtype']} · drafter: {result['model']['drafter'] or 'none'}"
        ),
        "",
        (
            f"{s['prompts']} held-out prompts ({result['prompts']['source']}; {result['prompts']['min_tokens']}-"
            f"{result['prompts']['max_tokens']} tokens), greedy, max {s['max_new_tokens']} new tokens, "
            f"diffusion threshold {s['threshold']}, tok/s = median of {s['repeats']} timed passes over the prompt set "
            "(warm-up excluded, passes interleaved across settings). Tokens/forward count the prefill (`generate()`'s "
            "`tokens_per_forward`); ms/forward by kind: median ms × forwards per pass (head included); in forwards: "
            "share of the wall time inside forwards (the rest is the loop's own work); peak MB: peak memory over the "
            "start of the pass (CPU: resident set size)."
        ),
        "",
        (
            "| batch | mode | block | tok/s | vs stock | forwards / pass | tokens/forward | mean accept | same as AR "
            "| ms/forward by kind | in forwards | peak MB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['name']} | - | failed: {r['error']} | | | | | | | | |")
            continue
        same = r.get("same_tokens_as_ours_ar")
        lines.append(
            f"| {r['batch_size']} | {r['name']} | {_fmt(r['block_size'])} | {r['tok_per_s']:.1f} | "
            f"{_fmt(r.get('speedup_vs_stock'))}× | {r['forwards']} | {r['tokens_per_forward']:.2f} | "
            f"{_fmt(r['mean_acceptance'])} | {'-' if same is None else f'{same:.0%}'} | "
            f"{_kinds_cell(r['ms_per_forward'])} | {r['time_in_forwards']:.0%} | "
            f"{_fmt(r['peak_memory_over_start_mb'], 0)} |"
        )
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"]) + "."]
    hists = [r for r in result["runs"] if r.get("acceptance_histogram")]
    if hists:
        lines += ["", "Acceptance lengths (tokens per draft/verify cycle, bonus included: count):", ""]
        for r in hists:
            hist = ", ".join(f"{k}: {v}" for k, v in r["acceptance_histogram"].items())
            lines.append(f"* {r['name']} B={r['block_size']} batch {r['batch_size']}: {hist}")
    sol = result.get("speed_of_light")
    if sol:
        lines += [
            "",
            "## Speed of light (perfect drafts)",
            "",
            (
                f"{sol['construction']}; {sol['max_new_tokens']} new tokens. Tokens per forward exclude the prefill; "
                f"ceiling: diffusion B/2, LinearSpec B/2, QuadraticSpec B. All >= {sol['target_ratio']}: "
                f"**{'yes' if sol['all_pass'] else 'NO'}**."
            ),
            "",
            "| batch | mode | block | forwards | tokens/forward | ceiling | ratio | tok/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sol["rows"]:
            lines.append(
                f"| {r['batch_size']} | {r['mode']} | {_fmt(r['block_size'])} | {r['forwards_per_row']} | "
                f"{r['tokens_per_forward_excl_prefill']:.2f} | {r['ceiling']:g} | {r['ratio']:.3f} | "
                f"{r['tok_per_s']:.1f} |"
            )
    over = result.get("ar_overhead")
    if over:
        lines += [
            "",
            "## AR overhead",
            "",
            (
                f'`decode_mode="ar"` vs stock `generate()` of `{over["stock_model"]}` on the same weights, batch 1, '
                f"{over['new_tokens']} new tokens after a {over['prompt_tokens']}-token prompt, medians of "
                f"{over['rounds']} interleaved rounds: ours {over['ours_tok_per_s']:.1f} tok/s, stock "
                f"{over['stock_tok_per_s']:.1f} tok/s, ratio **{over['ratio']:.3f}** (median of per-round ratios "
                f"{over['paired_ratio']:.3f}; target >= {over['target_ratio']}); same tokens: {over['same_tokens']}."
            ),
        ]
        if "ratio_same_layers" in over:
            lines[-1] += (
                f" Against stock `Ministral3ForCausalLM` (layers identical to ours, "
                f"{over['stock_ministral3_tok_per_s']:.1f} tok/s), i.e. the overhead of our generation code alone: "
                f"ratio **{over['ratio_same_layers']:.3f}** (per-round {over['paired_ratio_same_layers']:.3f})."
            )
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    return "\n".join(lines) + "\n"


def plots(result, prefix):
    """Two PNGs: tok/s and tokens per forward by mode and block size, one panel per batch size, baselines as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench: matplotlib is not installed, so no plots were written (pip install matplotlib, or "
            "pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return []
    runs = [r for r in result["runs"] if "error" not in r]
    batches = sorted({r["batch_size"] for r in runs})
    modes = [
        m
        for m in ("diffusion", "linear_spec", "quadratic_spec")
        if any(r["mode"] == m and r["impl"] == "ours" for r in runs)
    ]
    blocks = sorted({r["block_size"] for r in runs if r["block_size"] is not None})
    written = []
    for metric, label, suffix in (
        ("tok_per_s", "tokens / s", "tok_s"),
        ("tokens_per_forward", "tokens / forward", "tokens_per_forward"),
    ):
        digits = 1 if metric == "tok_per_s" else 2
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.6), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            width = 0.8 / max(len(blocks), 1)
            for i, block in enumerate(blocks):
                values = [
                    next(
                        (
                            r[metric]
                            for r in runs
                            if r["impl"] == "ours"
                            and r["mode"] == m
                            and r["block_size"] == block
                            and r["batch_size"] == batch
                        ),
                        0.0,
                    )
                    for m in modes
                ]
                xs = [j + (i - (len(blocks) - 1) / 2) * width for j in range(len(modes))]
                bars = ax.bar(xs, values, width=width, label=f"B={block}")
                ax.bar_label(bars, labels=[f"{v:.{digits}f}" if v else "" for v in values], fontsize=7, padding=1)
            styles = {
                "ours ar": ("black", "-"),
                "stock generate": ("tab:red", "--"),
                "prompt lookup": ("tab:purple", ":"),
            }
            for r in runs:
                if r["batch_size"] == batch and r["name"] in styles:
                    color, style = styles[r["name"]]
                    ax.axhline(
                        r[metric],
                        color=color,
                        linestyle=style,
                        linewidth=1.2,
                        label=f"{r['name']} ({r[metric]:.{digits}f})",
                    )
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels(modes)
            ax.tick_params(axis="x", length=0)
            ax.set_title(f"batch {batch}")
            ax.set_ylabel(label)
            ax.margins(y=0.12)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
        where = result["machine"].get("cpu") or result["machine"]["device"]
        fig.suptitle(f"{label}: {result['model']['short']}, {where}", fontsize=9)
        fig.tight_layout()
        path = f"{prefix}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
