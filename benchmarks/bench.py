"""Benchmark suite: every decoding mode against the Hugging Face baselines, a speed-of-light check, plots.

    nemotron-diffusion bench [--model FOLDER | --random SHAPE] [--block-sizes 8,16,32] [--batch-sizes 1,4] ...
    python benchmarks/bench.py ...                      (the same, from a source checkout)

On one model (the demo by default, or random weights of a given shape) and a held-out prompt set (chat requests
built from the CPython standard-library files that `nemotron_diffusion.training.stdlib_files("heldout")` holds out
of drafter training), it measures:

1. **Modes x block sizes x batch sizes** (greedy): tok/s (median over `--repeats` timed passes over the prompt set;
   a warm-up call per setting first, passes interleaved across settings so drifts hit all alike), physical forwards,
   tokens per forward (new tokens / forwards, the prefill included, as `generate()` reports it), the
   acceptance-length histogram (speculative modes), milliseconds per forward by kind (prefill / step / draft /
   verify / commit / draft+verify, head included), peak memory, and whether the tokens equal AR's. In the same run
   and on the same weights, the baselines a user would pick: transformers' stock `generate()` of the equivalent
   native model (greedy; `LlamaForCausalLM` for the demo, `Ministral3ForCausalLM` for NVIDIA's checkpoints; the
   base weights shared, not copied) and transformers' assisted generation with prompt lookup
   (`prompt_lookup_num_tokens`; batch 1 only, as transformers allows).
2. **Speed of light**: a model of the same shape built so that its drafts are perfect (every layer's o_proj and
   down_proj zeroed, so each slot's logits depend only on its own token, and a head that maps every token, the mask
   included, to one token `a` with a large margin): AR, drafts and diffusion all agree with confidence ~1. Tokens per
   forward with the prefill excluded must reach 0.97 of each mode's ceiling (diffusion B/2, LinearSpec B/2,
   QuadraticSpec B per cycle); tok/s there is each mode's speed at perfect acceptance on this machine.
3. **AR overhead**: `decode_mode="ar"` against stock `generate()` on the same weights, batch 1, a fixed number of
   new tokens, interleaved runs, medians (target ratio >= 0.97); with a Llama twin also against stock
   `Ministral3ForCausalLM`, whose layers are ours, to isolate the overhead of our generation code.

Writes PREFIX.json, PREFIX.md, PREFIX_tok_s.png and PREFIX_tokens_per_forward.png (plots need matplotlib:
`pip install nemotron-diffusion[bench]`; without it they are skipped with a message). Random fp32 weights can produce denormals
that slow CPU matmuls many times over: flushing them is on (`torch.set_flush_denormal(True)`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

SUITE = "nemotron-diffusion bench"  # `nemotron-diffusion bench` checks for this line before loading the file
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
BASELINES = ("stock", "prompt_lookup")
SPEC_MODES = ("linear_spec", "quadratic_spec")
# Random-weight shapes for `--random` (overridable: `--random small,layers=8`).
RANDOM_SHAPES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128, "vocab": 512},
    "small": {
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 64,
        "intermediate": 768,
        "vocab": 2048,
    },
    "smollm2": {
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
        "intermediate": 1536,
        "vocab": 49153,
    },
}
HELD_OUT_SEED = 2026


class BenchError(Exception):
    """A bad argument or an unusable model: one line, exit status 2."""


# ============================================================================================================ args
def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _name_list(allowed):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or (not values and text.strip()):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return values

    return parse


def add_arguments(parser):
    from nemotron_diffusion.commands.common import positive_int, threshold

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", "-m", default=None, help="model folder or Hub id (default: the demo model, nemotron_diffusion.demo)"
    )
    model.add_argument(
        "--random",
        default=None,
        metavar="SHAPE",
        help=f"random weights instead of a model: {', '.join(RANDOM_SHAPES)}, optionally with "
        "overrides (e.g. 'small,layers=8'); prompts are then byte-encoded",
    )
    model.add_argument(
        "--drafter",
        default="auto",
        metavar="PATH",
        help="PEFT LoRA drafter for linear_spec drafts, or 'none' (default 'auto': the demo's drafter, "
        "or a drafter subfolder of --model)",
    )
    model.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    model.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--modes", type=_name_list(MODES), default=list(MODES), help="comma-separated decode modes")
    sweep.add_argument("--block-sizes", type=_int_list, default=[8, 16, 32], help="comma-separated block sizes")
    sweep.add_argument("--batch-sizes", type=_int_list, default=[1, 4], help="comma-separated batch sizes")
    sweep.add_argument(
        "--quadratic-max-block",
        type=positive_int,
        default=16,
        help="skip quadratic_spec blocks above this in the sweep: its forward carries B*(B+1) "
        "queries, compute-bound on a CPU (default 16)",
    )
    sweep.add_argument(
        "--baselines",
        type=_name_list(BASELINES),
        default=list(BASELINES),
        help="comma-separated baselines: stock (transformers generate) and prompt_lookup",
    )
    sweep.add_argument(
        "--prompt-lookup-tokens",
        type=positive_int,
        default=10,
        help="prompt_lookup_num_tokens of the prompt-lookup baseline (default 10)",
    )
    sweep.add_argument("--prompts", type=positive_int, default=10, help="held-out prompts (default 10)")
    sweep.add_argument("--max-prompt-tokens", type=positive_int, default=256)
    sweep.add_argument("--max-new-tokens", type=positive_int, default=96)
    sweep.add_argument(
        "--threshold",
        type=threshold,
        default=0.9,
        help="diffusion confidence_threshold (0.9; 'none': one slot per step)",
    )
    sweep.add_argument("--repeats", type=positive_int, default=3, help="timed passes per setting (median reported)")
    checks = parser.add_argument_group("checks")
    checks.add_argument("--no-speed-of-light", action="store_true", help="skip the perfect-drafter check")
    checks.add_argument("--sol-max-new-tokens", type=positive_int, default=128)
    checks.add_argument(
        "--overhead-repeats",
        type=int,
        default=15,
        help="interleaved pairs of the AR-overhead check (0 skips it; default 15)",
    )
    checks.add_argument("--overhead-tokens", type=positive_int, default=64)
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        default=str(RESULTS_DIR / "bench"),
        metavar="PREFIX",
        help="output prefix: PREFIX.json, PREFIX.md, PREFIX_tok_s.png, PREFIX_tokens_per_forward.png "
        "(default benchmarks/results/bench)",
    )
    output.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--note", default=None, help="a free-text note stored with the results")


# ===================================================================================================== the model
def _random_shape(spec):
    name, *overrides = [p.strip() for p in spec.split(",") if p.strip()] or [""]
    if name not in RANDOM_SHAPES:
        raise BenchError(f"--random {spec!r}: unknown shape {name!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    shape = dict(RANDOM_SHAPES[name])
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in shape or not value.isdigit() or int(value) < 1:
            raise BenchError(f"--random {spec!r}: {item!r} is not KEY=INT with KEY in {', '.join(shape)}")
        shape[key] = int(value)
    return name, shape


def random_model(spec, dtype, device):
    import torch

    from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM

    name, s = _random_shape(spec)
    try:
        config = NemotronDiffusionConfig(
            vocab_size=s["vocab"],
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            head_dim=s["head_dim"],
            mask_token_id=s["vocab"] - 1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="sdpa",
        )
    except ValueError as error:
        raise BenchError(f"--random {spec!r}: {error}") from None
    torch.manual_seed(0)
    model = NemotronDiffusionForCausalLM(config).to(dtype=dtype, device=device).eval()
    description = f"random weights ({name}: " + ", ".join(f"{k}={v}" for k, v in s.items()) + ")"
    return model, None, description


def load_bench_model(args):
    """(model, tokenizer or None, description, drafter folder or None)."""
    import torch

    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.random is not None:
        if args.model is not None:
            raise BenchError("--random and --model exclude each other")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer, description = random_model(args.random, dtypes[args.dtype] or torch.float32, device)
        return model, tokenizer, description, None
    from nemotron_diffusion.cli import UserError
    from nemotron_diffusion.commands import common

    try:
        model, tokenizer = common.load_model(args)
        path = common.resolve_model_path(args.model) if args.model is not None else common.default_model_path()
    except UserError as error:
        raise BenchError(str(error)) from None
    drafter = None
    if any(hasattr(m, "lora_A") for m in model.modules()):
        drafter = common._drafter_folder(args.drafter, path, demo=args.model is None)
    if args.model is None:
        description = "the demo model (SmolLM2-135M-Instruct, tri-mode; nemotron_diffusion.demo.demo_path())"
    else:
        description = _display_path(path)
    return model, tokenizer, description, drafter


def _display_path(path):
    """`path` as written into results: relative to the source tree when inside it, `~/...` under the home folder,
    so committed results carry no machine-specific absolute paths."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    for base, shown in ((ROOT, ""), (Path.home(), "~/")):
        if resolved.is_relative_to(base):
            return shown + str(resolved.relative_to(base))
    return str(path)


def _adapter_digest(folder):
    """sha256 (first 16 hex digits) of a drafter's weights file, to identify the adapter measured."""
    import hashlib

    if not folder:
        return None
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = Path(folder) / name
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return None


def _base_module(module):
    from nemotron_diffusion.drafting_nemotron_diffusion import peft_base_module as _peft_base_module

    return _peft_base_module(module)


def native_twin(model):
    """The stock transformers model a user would run instead, on the same (base) weights, shared, not copied:
    `LlamaForCausalLM` when the configuration is Llama's (no Llama-4 query scaling, no sliding window; the demo,
    converted from SmolLM2), else `Ministral3ForCausalLM`, whose layers ours are."""
    from transformers import LlamaConfig, LlamaForCausalLM, Ministral3Config, Ministral3ForCausalLM

    c = model.config
    rope = dict(c.rope_parameters)
    fields = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "attn_implementation": c._attn_implementation,
    }
    if not rope.get("llama_4_scaling_beta") and getattr(c, "sliding_window", None) is None:
        rope.pop("llama_4_scaling_beta", None)
        if rope.get("rope_type", "default") == "default":
            rope = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        config = LlamaConfig(rope_parameters=rope, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, **fields)
        cls = LlamaForCausalLM
    else:
        config, cls = Ministral3Config(rope_parameters=rope, **fields), Ministral3ForCausalLM
    return _stock_model(model, cls, config)


def ministral3_twin(model):
    """`Ministral3ForCausalLM` on the same weights: stock generate() with layer code identical to ours, so that
    the AR-overhead check can separate our loop's overhead from the layers' (Ministral3 computes its Llama-4 query
    scale in every attention call, even at beta 0)."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    c = model.config
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "rope_parameters",
    )
    config = Ministral3Config(attn_implementation=c._attn_implementation, **{k: getattr(c, k) for k in keys})
    return _stock_model(model, Ministral3ForCausalLM, config)


def _stock_model(model, cls, config):
    import torch

    with torch.device("meta"):
        stock = cls(config)
    state = {}
    for name in stock.state_dict():
        path, _, param = name.rpartition(".")
        ours = "diffusion_head" if path == "lm_head" else "encoder" + path.removeprefix("model")
        state[name] = getattr(_base_module(model.get_submodule(ours)), param)
    stock.load_state_dict(state, strict=True, assign=True)
    with torch.device(model.device):  # non-persistent buffers (RoPE frequencies) are not in the state dict
        stock.model.rotary_emb = type(stock.model.rotary_emb)(config=config)
    stock.generation_config.pad_token_id = model.config.pad_token_id
    stock.generation_config.eos_token_id = model.config.eos_token_id
    stock.generation_config.do_sample = False
    return stock.eval()


def perfect_drafter_model(model, token):
    """A model of `model`'s shape whose bidirectional predictions equal its AR ones: each slot's logits depend only
    on its own token (o_proj and down_proj zeroed), and the head sends every token, the mask included, to `token`
    with a margin of about 4*sqrt(hidden) (confidence ~1). Greedy AR output: `token` forever; drafts: all `token`."""
    import torch

    from nemotron_diffusion import NemotronDiffusionForCausalLM

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


# =================================================================================================== the prompts
class _ByteTokenizer:
    """Byte-level ids for random-weight models (no tokenizer): byte b -> 3 + b mod (vocab - 4), below the mask id."""

    chat_template = None

    def __init__(self, vocab_size):
        self.span = vocab_size - 4

    def __call__(self, text, add_special_tokens=False):
        return argparse.Namespace(input_ids=[3 + b % self.span for b in text.encode("utf-8")])


def held_out_prompts(tokenizer, vocab_size, count, max_prompt_tokens):
    """`count` chat requests about held-out standard-library functions (write / explain / complete), as token ids:
    the files `stdlib_files("heldout")` keeps out of drafter training, shuffled with a fixed seed."""
    from nemotron_diffusion.training import stdlib_files, stdlib_prompts

    tok = tokenizer if tokenizer is not None else _ByteTokenizer(vocab_size)
    prompts = stdlib_prompts(
        tok, stdlib_files("heldout"), seed=HELD_OUT_SEED, raw_share=0.0, max_prompt_tokens=max_prompt_tokens
    )
    prompts = [p for p in prompts if len(p) >= 8][:count]
    if len(prompts) < count:
        raise BenchError(f"only {len(prompts)} held-out prompts of at most {max_prompt_tokens} tokens were found")
    return prompts


def _prompt_text(tokenizer, ids, limit=160):
    """The prompt's user request, shortened (for the record of which prompts were measured)."""
    if tokenizer is None:
        text = bytes((i - 3) % 256 for i in ids).decode("utf-8", "replace")
    else:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    text = " ".join(text.split())
    for role in ("system", "user"):  # chat templates: keep the user's text
        text = text.split(f" {role} ", 1)[-1] if text.startswith(("system", "user")) else text
    text = text.removesuffix(" assistant")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def batches_of(prompts, batch_size, pad_id, device):
    import torch

    out = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, p in enumerate(group):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out.append((ids.to(device), mask.to(device)))
    return out


# ================================================================================================= measurements
class ForwardRecorder:
    """Counts and times the physical forwards of a backbone (forward hooks), head calls added to the forward they
    follow. Kinds: prefill (empty cache), step (AR, one token), draft (bidirectional, cache read-only), verify
    (causal block checked against drafts), commit (diffusion's causal block write), draft+verify (QuadraticSpec).
    CUDA is timed with events (no synchronisation inside the loop), the CPU with perf_counter."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.mode = None
        self.records = []  # [kind, [(start, end), ...]]
        self.handles = []

    def _now(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
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
            self.torch.cuda.synchronize()
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
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
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
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            start = self.torch.cuda.memory_allocated()
            yield
            self.torch.cuda.synchronize()
            result["peak_mb"] = self.torch.cuda.max_memory_allocated() / 2**20
            result["peak_over_start_mb"] = (self.torch.cuda.max_memory_allocated() - start) / 2**20
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


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _trim(row, eos_ids):
    """New tokens of a row up to and including its first stop token (the rest is padding)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def _eos_ids(config):
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()


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


def _progress(total, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not enabled:

        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, text):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc="bench", unit="call", file=sys.stderr, dynamic_ncols=True)


class Runner:
    def __init__(self, model, native, args, bar):
        import torch

        self.torch = torch
        self.model, self.native, self.args, self.bar = model, native, args, bar
        self.device = model.device
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model.config)
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
        with self.torch.no_grad():
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
            heads = {target.diffusion_head, _base_module(target.diffusion_head)}
            self.recorder.attach(target.encoder, heads)
        else:
            self.recorder.attach(target.model, [target.lm_head])
        seconds, new_tokens, tokens, row_forwards, lengths = 0.0, 0, [], 0, []
        memory = {}
        try:
            with self.memory.measure(memory):
                for ids, mask in batches:
                    _sync(self.device)
                    start = time.perf_counter()
                    out = self.generate(setting, ids, mask, self.args.max_new_tokens)
                    _sync(self.device)
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
            setting.acceptance = _histogram(*lengths) or {}


def _histogram(*lengths):
    """{"length": count} over acceptance-length tensors (0 = padding after a row's last cycle), or None."""
    counts = {}
    for tensor in lengths:
        for x in tensor.flatten().tolist() if tensor is not None else []:
            if x > 0:
                counts[int(x)] = counts.get(int(x), 0) + 1
    return {str(k): counts[k] for k in sorted(counts)} or None


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


# ================================================================================================ speed of light
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
    import torch

    special = _eos_ids(model.config) | {model.config.mask_token_id, model.config.pad_token_id}
    token = next(t for t in range(3, model.config.vocab_size) if t not in special)
    sol = perfect_drafter_model(model, token)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    n = args.sol_max_new_tokens
    rows = []
    for batch, mode, block in sol_plan(args):
        ids, mask = batches_of(prompts[:batch], batch, pad_id, model.device)[0]
        kwargs = {
            "decode_mode": mode,
            "max_new_tokens": n,
            "min_new_tokens": n if mode == "ar" else None,
            "do_sample": False,
            "pad_token_id": pad_id,
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
            _sync(model.device)
            start = time.perf_counter()
            out = sol.generate(ids, attention_mask=mask, **kwargs)
            _sync(model.device)
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
                "acceptance_histogram": _histogram(out.acceptance_lengths),
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
    import torch

    n = args.overhead_tokens
    ids = torch.tensor([prompt], device=model.device)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    common = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad_id}
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
                _sync(model.device)
                start = time.perf_counter()
                runs[name]()
                _sync(model.device)
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


# ======================================================================================================= machine
def machine_info(device):
    import torch
    import transformers

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


# ======================================================================================================== outputs
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


# =========================================================================================================== main
def run(args):
    """Runs the benchmark; returns the exit status. Raises BenchError for user errors."""
    import torch

    if args.quadratic_max_block < 2:
        raise BenchError("--quadratic-max-block must be >= 2")
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers keep their setting


def _run(args):
    began = time.time()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, tokenizer, description, drafter = load_bench_model(args)
    model.eval()
    prompts = held_out_prompts(tokenizer, model.config.vocab_size, args.prompts, args.max_prompt_tokens)
    native = native_twin(model) if (args.baselines or args.overhead_repeats) else None
    settings, skipped = plan_settings(args)
    calls = len(settings)  # warm-ups
    calls += sum(args.repeats * math.ceil(len(prompts) / s.batch_size) for s in settings)
    sol_calls = 0 if args.no_speed_of_light else len(sol_plan(args))
    bar = _progress(calls + sol_calls + max(args.overhead_repeats, 0), not args.no_progress)
    try:
        runs = run_sweep(model, native, prompts, args, bar, settings)
        sol = None if args.no_speed_of_light else speed_of_light(model, prompts, args, bar)
        overhead = ar_overhead(model, native, prompts[0], args, bar) if args.overhead_repeats > 0 else None
    finally:
        bar.close()
    device = model.device
    machine = machine_info(device)
    machine["load_average_at_start"] = load_at_start
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_at_end"] = os.getloadavg()
    short = (
        "demo (SmolLM2-135M tri-mode)"
        if args.model is None and args.random is None
        else (f"random {args.random}" if args.random else Path(str(args.model)).name)
    )
    result = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": None,
        "machine": machine,
        "model": {
            "description": description,
            "short": short,
            "dtype": str(model.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()),
            "drafter": _display_path(drafter),
            "drafter_sha256": _adapter_digest(drafter),
            "config": {
                k: getattr(model.config, k)
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                    "vocab_size",
                )
            },
        },
        "prompts": {
            "count": len(prompts),
            "min_tokens": min(map(len, prompts)),
            "max_tokens": max(map(len, prompts)),
            "source": f"training.stdlib_prompts over stdlib_files('heldout'), seed {HELD_OUT_SEED}, chat requests only"
            + (", byte-encoded" if tokenizer is None else ""),
            "texts": [_prompt_text(tokenizer, p) for p in prompts],
        },
        "settings": {
            "modes": args.modes,
            "block_sizes": args.block_sizes,
            "batch_sizes": args.batch_sizes,
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "threshold": args.threshold,
            "repeats": args.repeats,
            "baselines": args.baselines,
            "prompt_lookup_num_tokens": args.prompt_lookup_tokens,
            "quadratic_max_block": args.quadratic_max_block,
        },
        "runs": runs,
        "skipped": skipped,
        "speed_of_light": sol,
        "ar_overhead": overhead,
        "note": args.note,
    }
    result["wall_seconds"] = time.time() - began
    prefix = str(args.out).removesuffix(".json")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    table = markdown(result)
    with open(prefix + ".md", "w") as f:
        f.write(table)
    written = plots(result, prefix)
    print(table)
    print(
        f"wrote {prefix}.json, {prefix}.md"
        + "".join(f", {p}" for p in written)
        + f" ({result['wall_seconds']:.0f} s)",
        file=sys.stderr,
    )
    if sol is not None and not sol["all_pass"]:
        print("bench: speed-of-light check FAILED: some mode wastes forwards (see the table)", file=sys.stderr)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        return run(args)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
