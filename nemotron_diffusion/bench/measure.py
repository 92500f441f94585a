"""Measuring generate() calls: physical forwards by kind and their time, peak memory, acceptance histograms."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

import torch


class ForwardRecorder:
    """Counts and times the physical forwards of a backbone (forward hooks), head calls added to the forward they
    follow. Kinds: prefill (empty cache), step (AR, one token), draft (bidirectional, cache read-only), verify
    (causal block checked against drafts), commit (diffusion's causal block write), draft+verify (QuadraticSpec).
    CUDA is timed with events (no synchronisation inside the loop), the CPU with perf_counter."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.mode = None
        self.records = []  # [kind, [(start, end), ...]]
        self.handles = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _kind(self, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past == 0:
            return "prefill"
        if kwargs.get("is_causal", True) is False:
            return "draft" if kwargs.get("update_cache") is False else "draft+verify"
        if self.mode == "diffusion":
            return "commit"
        if self.mode == "linear_spec":
            return "verify"
        length = (ids if ids is not None else embeds).shape[1]
        return "step" if length == 1 else "verify"

    def attach(self, backbone, heads):
        def pre(module, args, kwargs):
            self.records.append([self._kind(args, kwargs), [[self._now(), None]]])

        def post(module, args, kwargs, output):
            self.records[-1][1][-1][1] = self._now()

        def head_pre(module, args):
            if self.records and self.records[-1][1][-1][1] is not None:
                self.records[-1][1].append([self._now(), None])

        def head_post(module, args, output):
            if self.records and self.records[-1][1][-1][1] is None:
                self.records[-1][1][-1][1] = self._now()

        self.handles = [
            backbone.register_forward_pre_hook(pre, with_kwargs=True),
            backbone.register_forward_hook(post, with_kwargs=True),
        ]
        for head in heads:  # nested (a PEFT wrapper and its base): the outer call's span is the one timed
            self.handles += [head.register_forward_pre_hook(head_pre), head.register_forward_hook(head_post)]

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def take(self):
        """[(kind, ms)] of the forwards since the last call (synchronises CUDA once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for kind, spans in self.records:
            spans = [s for s in spans if s[1] is not None]
            if self.cuda:
                ms = sum(start.elapsed_time(end) for start, end in spans)
            else:
                ms = sum((end - start) * 1e3 for start, end in spans)
            out.append((kind, ms))
        self.records = []
        return out


class PeakMemory:
    """Peak memory of a span of work. CUDA: the allocator's peak; CPU: resident set size sampled every 5 ms in a
    thread, minus the RSS at the start (freed heap returned to the system first with malloc_trim)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def _rss(self):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    @contextlib.contextmanager
    def measure(self, result):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            result["peak_over_start_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        start = self._rss()
        peak = [start]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.005):
                peak[0] = max(peak[0], self._rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], self._rss())
            result["peak_mb"] = peak[0] / 2**20
            result["peak_over_start_mb"] = (peak[0] - start) / 2**20


def sync(device):
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def histogram(*lengths):
    """{"length": count} over acceptance-length tensors (0 = padding after a row's last cycle), or None."""
    counts = {}
    for tensor in lengths:
        for x in tensor.flatten().tolist() if tensor is not None else []:
            if x > 0:
                counts[int(x)] = counts.get(int(x), 0) + 1
    return {str(k): counts[k] for k in sorted(counts)} or None
