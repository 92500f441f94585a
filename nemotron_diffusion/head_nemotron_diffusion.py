# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The LM head applied to hidden states of any shape, as one 2-D matrix product."""

import torch
from torch import nn


def apply_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] of hidden states [..., H], computed as `head` of a [N, H] matrix.

    Why not `head(hidden)`: PyTorch's CPU `linear` (seen with torch 2.13) takes a slow path for a 3-D input whose
    leading stride does not follow from the other dimensions, e.g. a slice `hidden[:, 1:]` or `hidden[:, -1:]` of a
    batch of one (which still counts as contiguous): about 95 ms instead of 7 ms for the 49k-token head of the
    135M demo in bfloat16 on one thread, i.e. more than a whole forward, once per draft. Flattening first makes it
    one GEMM; it is a view for such slices and otherwise copies only the selected rows.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    return head(flat).reshape(*hidden.shape[:-1], -1)


__all__ = ["apply_head"]
