# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Small helpers the tooling (training, the benchmark) and the tests share: left padding and a progress bar.

Tooling beside the model files: the model files never import this module.
"""

from __future__ import annotations

import sys

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token lists left-padded into (input_ids, attention_mask) on the CPU, as a tokenizer with
    padding_side='left' does."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar on stderr (tqdm comes with transformers); when not `enabled` it prints nothing and its
    `update`, `set_postfix_str` and `close` do nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
