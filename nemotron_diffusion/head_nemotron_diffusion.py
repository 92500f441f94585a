# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The LM head applied to hidden states of any shape, as one 2-D matrix product, and its int8 copy for drafts."""

import torch
from torch import nn

from .int8_nemotron_diffusion import int8_linear, int8_supported, int8_weight
from .packed_nemotron_diffusion import few_row_linear, few_row_product_applies


# float32 on a CPU: row counts for which the head is computed as weight @ hidden.T (see `apply_head`).
TALL_PRODUCT_ROWS = range(2, 7)


def apply_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] of hidden states [..., H], computed as `head` of a [N, H] matrix.

    Why not `head(hidden)`: PyTorch's CPU `linear` (seen with torch 2.13) takes a slow path for a 3-D input whose
    leading stride does not follow from the other dimensions, e.g. a slice `hidden[:, 1:]` or `hidden[:, -1:]` of a
    batch of one (which still counts as contiguous): about 95 ms instead of 7 ms for the 49k-token head of the
    135M demo in bfloat16 on one thread, i.e. more than a whole forward, once per draft. Flattening first makes it
    one GEMM; it is a view for such slices and otherwise copies only the selected rows.

    For 2 to 6 rows in float32 on a CPU (a draft, a verify block) outside autograd, the same products are computed
    as `weight @ hidden.T` (`few_row_linear`, as the layers inside generate()): MKL's `linear` of 2 to 5 rows
    against a 49k x 576 head took 1.2 to 2.2 times as long (two AMD EPYC Zen 3 hosts, `python -m
    benchmarks.few_row_product`), and a block forward's head was a fifth of its time; at 6 rows the two tie on one
    host, and from 8 rows on `linear` won there. The sums are the same, in another order (float32 rounding, ~1e-6).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    weight = getattr(head, "weight", None)
    if (
        type(head) is nn.Linear and few_row_product_applies(flat, weight, TALL_PRODUCT_ROWS)
        and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))  # TP, offload hooks
    ):
        return few_row_linear(flat, weight, head.bias).reshape(*hidden.shape[:-1], -1)
    return head(flat).reshape(*hidden.shape[:-1], -1)


class Int8DraftHead:
    """The LM head of draft forwards as weight-only int8 (one scale per vocabulary row), kept beside the head by
    `enable_merged_drafter(weight_format="int8")`: drafts need the head's ranking, not its exact logits, and on a
    CPU reading the head's weight is most of its cost at a few rows (the demo's 49k x 576 head: ~7 ms in bf16).
    Causal forwards (AR, verification) never use it. Not a module: it adds nothing to the model's state dict.
    Recomputed when the head's weight changes; where int8 does not pay off for the weight's device and dtype
    (`int8_supported`), or the head has a bias, it computes the head itself."""

    def __init__(self, head: nn.Linear):
        self.head = head
        self._key, self._kept = None, None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        if not int8_supported(weight.device, weight.dtype) or getattr(self.head, "bias", None) is not None:
            return apply_head(self.head, hidden)
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if key != self._key:
            self._kept, self._key = int8_weight(weight), key
        return int8_linear(hidden, *self._kept)


__all__ = ["TALL_PRODUCT_ROWS", "Int8DraftHead", "apply_head"]
