"""The held-out prompt set: chat requests about standard-library files kept out of drafter training."""

from __future__ import annotations

import argparse

from ..tooling import left_pad
from ..training import stdlib_files, stdlib_prompts
from .arguments import BenchError

HELD_OUT_SEED = 2026


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
    tok = tokenizer if tokenizer is not None else _ByteTokenizer(vocab_size)
    prompts = stdlib_prompts(
        tok, stdlib_files("heldout"), seed=HELD_OUT_SEED, raw_share=0.0, max_prompt_tokens=max_prompt_tokens
    )
    prompts = [p for p in prompts if len(p) >= 8][:count]
    if len(prompts) < count:
        raise BenchError(f"only {len(prompts)} held-out prompts of at most {max_prompt_tokens} tokens were found")
    return prompts


def prompt_text(tokenizer, ids, limit=160):
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


def pad_id(config):
    """The pad id generate() gets: the model's, else 0."""
    return config.pad_token_id if config.pad_token_id is not None else 0


def eos_ids(config):
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()


def batches_of(prompts, batch_size, pad, device):
    """[(input_ids, attention_mask)] on `device`: the prompts in order, `batch_size` per batch, left-padded."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad)
        out.append((ids.to(device), mask.to(device)))
    return out
