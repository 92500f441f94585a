"""The sweep: every mode x block size x batch size, and the stock baselines, timed over the held-out prompts."""

from __future__ import annotations

import statistics
import time

import torch

from .arguments import SPEC_MODES
from .measure import ForwardRecorder, PeakMemory, histogram, sync
from .models import base_head_modules
from .prompts import batches_of, eos_ids, pad_id


def _trim(row, eos_ids):
    """New tokens of a row up to and including its first stop token (the rest is padding)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


class Setting:
    """One row of the sweep: how to call generate, and what was measured."""

    def __init__(self, impl, mode, block_size, batch_size):
        self.impl, self.mode, self.block_size, self.batch_size = impl, mode, block_size, batch_size
        self.passes = []  # per timed pass: dict(seconds, new_tokens, forwards)
        self.kinds = {}  # kind -> [ms]
        self.row_forwards = None
        self.acceptance = {}
        self.tokens = None  # new tokens per prompt of the first timed pass
        self.memory = {}
        self.error = None

    @property
    def name(self):
        if self.impl == "stock":
            return "stock generate"
        if self.impl == "prompt_lookup":
            return "prompt lookup"
        return self.mode if self.mode != "ar" else "ours ar"

    def kwargs(self, args):
        if self.impl == "stock":
            return {}
        if self.impl == "prompt_lookup":
            return {"prompt_lookup_num_tokens": args.prompt_lookup_tokens}
        kwargs = {"decode_mode": self.mode}
        if self.mode != "ar":
            kwargs["block_size"] = self.block_size
        if self.mode == "diffusion":
            kwargs["confidence_threshold"] = args.threshold
        return kwargs


def plan_settings(args):
    settings, skipped = [], []
    for batch in args.batch_sizes:
        for baseline in args.baselines:
            if baseline == "prompt_lookup" and batch > 1:
                skipped.append(f"prompt lookup at batch {batch}: transformers' assisted generation takes batch 1 only")
                continue
            settings.append(Setting(baseline, "ar", None, batch))
        if "ar" in args.modes:
            settings.append(Setting("ours", "ar", None, batch))
        for mode in args.modes:
            if mode == "ar":
                continue
            for block in args.block_sizes:
                if mode in SPEC_MODES and block < 2:
                    skipped.append(f"{mode} block {block}: needs block_size >= 2")
                    continue
                if mode == "quadratic_spec" and block > args.quadratic_max_block:
                    skipped.append(
                        f"quadratic_spec block {block} (batch {batch}): above --quadratic-max-block "
                        f"{args.quadratic_max_block}"
                    )
                    continue
                settings.append(Setting("ours", mode, block, batch))
    return settings, skipped


class Runner:
    """Calls generate() for each setting: warm-ups and timed passes, forwards recorded and memory measured."""

    def __init__(self, model, native, args, bar):
        self.model, self.native, self.args, self.bar = model, native, args, bar
        self.device = model.device
        self.pad_id = pad_id(model.config)
        self.eos_ids = eos_ids(model.config)
        self.recorder = ForwardRecorder(self.device)
        self.memory = PeakMemory(self.device)

    def _target(self, setting):
        return self.model if setting.impl == "ours" else self.native

    def generate(self, setting, ids, mask, max_new_tokens, **extra):
        target = self._target(setting)
        kwargs = dict(
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            **setting.kwargs(self.args),
            **extra,
        )
        with torch.no_grad():
            return target.generate(ids, **kwargs)

    def warm_up(self, setting, batches):
        ids, mask = batches[0]
        try:
            self.generate(setting, ids, mask, min(self.args.max_new_tokens, 2 * (setting.block_size or 8)))
        except Exception as error:  # a baseline transformers refuses: reported, not fatal
            if setting.impl == "ours":
                raise
            setting.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        self.bar.update(1)

    def timed_pass(self, setting, batches):
        if setting.error:
            self.bar.update(len(batches))
            return
        first = not setting.passes
        self.recorder.mode = setting.mode if setting.impl == "ours" else "ar"
        target = self._target(setting)
        if setting.impl == "ours":
            self.recorder.attach(target.encoder, base_head_modules(target))
        else:
            self.recorder.attach(target.model, [target.lm_head])
        seconds, new_tokens, tokens, row_forwards, lengths = 0.0, 0, [], 0, []
        memory = {}
        try:
            with self.memory.measure(memory):
                for ids, mask in batches:
                    sync(self.device)
                    start = time.perf_counter()
                    out = self.generate(setting, ids, mask, self.args.max_new_tokens)
                    sync(self.device)
                    seconds += time.perf_counter() - start
                    rows = [_trim(r, self.eos_ids) for r in out.sequences[:, ids.shape[1] :].tolist()]
                    new_tokens += sum(len(r) for r in rows)
                    tokens += rows
                    forwards = getattr(out, "num_forwards", None)
                    row_forwards += int(forwards.sum()) if forwards is not None else 0
                    if getattr(out, "acceptance_lengths", None) is not None:
                        lengths.append(out.acceptance_lengths)
                    self.bar.update(1)
        finally:
            self.recorder.detach()
        records = self.recorder.take()
        for kind, ms in records:
            setting.kinds.setdefault(kind, []).append(ms)
        setting.passes.append(
            {
                "seconds": seconds,
                "new_tokens": new_tokens,
                "forwards": len(records),
                "forward_seconds": sum(ms for _, ms in records) / 1e3,
            }
        )
        setting.memory = {k: max(v, setting.memory.get(k, 0.0)) for k, v in memory.items()}
        if first:
            setting.tokens = tokens
            setting.row_forwards = row_forwards if setting.impl == "ours" else None
            setting.acceptance = histogram(*lengths) or {}


_KIND_ORDER = ("prefill", "step", "draft", "verify", "commit", "draft+verify")


def summarize(setting, reference):
    passes = setting.passes
    row = {
        "name": setting.name,
        "impl": setting.impl,
        "mode": setting.mode,
        "block_size": setting.block_size,
        "batch_size": setting.batch_size,
    }
    if setting.error:
        row["error"] = setting.error
        return row
    rates = [p["new_tokens"] / p["seconds"] for p in passes]
    new_tokens = passes[0]["new_tokens"]
    forwards = passes[0]["forwards"]
    if setting.impl == "ours" and setting.row_forwards:
        tpf = new_tokens / setting.row_forwards
    elif setting.batch_size == 1:
        tpf = new_tokens / max(forwards, 1)
    else:  # stock AR: one token per row per forward by definition (transformers keeps finished rows running)
        tpf = 1.0
    cycles = sum(setting.acceptance.values())
    row.update(
        tok_per_s=statistics.median(rates),
        tok_per_s_passes=rates,
        seconds_per_pass=statistics.median(p["seconds"] for p in passes),
        # share of the wall time spent inside backbone + head calls; the rest is the decoding loop's own work
        # (logits processors, acceptance, emission, cache bookkeeping) and generate()'s setup
        time_in_forwards=statistics.median(p["forward_seconds"] / p["seconds"] for p in passes),
        new_tokens=new_tokens,
        forwards=forwards,
        row_forwards=setting.row_forwards,
        tokens_per_forward=tpf,
        acceptance_histogram=setting.acceptance or None,
        mean_acceptance=(sum(int(k) * v for k, v in setting.acceptance.items()) / cycles) if cycles else None,
        ms_per_forward={
            kind: {
                "count": len(ms) // len(passes),
                "median_ms": statistics.median(ms),
                "mean_ms": statistics.fmean(ms),
            }
            for kind, ms in sorted(setting.kinds.items(), key=lambda item: _KIND_ORDER.index(item[0]))
        },
        peak_memory_mb=setting.memory.get("peak_mb"),
        peak_memory_over_start_mb=setting.memory.get("peak_over_start_mb"),
    )
    if reference is not None and reference.tokens is not None and setting is not reference:
        same = sum(a == b for a, b in zip(setting.tokens, reference.tokens))
        row["same_tokens_as_ours_ar"] = same / len(reference.tokens)
    return row


def run_sweep(model, native, prompts, args, bar, settings):
    runner = Runner(model, native, args, bar)
    by_batch = {b: batches_of(prompts, b, runner.pad_id, model.device) for b in args.batch_sizes}
    for setting in settings:
        bar.set_postfix_str(f"warm-up {setting.name} B={setting.block_size} bs={setting.batch_size}")
        runner.warm_up(setting, by_batch[setting.batch_size])
    for r in range(args.repeats):  # interleaved: each pass visits every setting
        for setting in settings:
            bar.set_postfix_str(
                f"pass {r + 1}/{args.repeats} {setting.name} B={setting.block_size} bs={setting.batch_size}"
            )
            runner.timed_pass(setting, by_batch[setting.batch_size])
    rows = []
    for setting in settings:
        reference = next(
            (s for s in settings if s.impl == "ours" and s.mode == "ar" and s.batch_size == setting.batch_size), None
        )
        rows.append(summarize(setting, reference))
    for row in rows:
        stock = next(
            (r for r in rows if r["impl"] == "stock" and r["batch_size"] == row["batch_size"] and "tok_per_s" in r),
            None,
        )
        if stock is not None and "tok_per_s" in row:
            row["speedup_vs_stock"] = row["tok_per_s"] / stock["tok_per_s"]
    return rows
