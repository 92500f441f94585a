# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Faster products for the linear layers of CPU generation: prepacked bfloat16 weights (oneDNN's blocked layout)
and, in float32, a few rows computed as `weight @ x.T`.

On a CPU, `F.linear` with a bfloat16 weight hands the weight to oneDNN in its plain [out, in] layout on every call
(as far as we can tell oneDNN then reorders it each time; at the few query tokens of a decoding step that costs
about as much as the product itself). Reordering once and keeping the blocked copy
(`torch.ops.mkldnn._reorder_linear_weight`, then `torch.ops.mkldnn._linear_pointwise`, the pair torch's inductor
uses for frozen CPU linears) computes the same product: on torch 2.13 the outputs were bit-identical to `F.linear`
for every shape and row count we tried, and a generate() call returns the same tokens with and without it
(`tests/test_packed.py` holds both). Products of the demo's sizes ran 1.2-2x faster (`docs/cpu-performance.md`).

The price is one more copy of each packed weight in memory, so it is opt-in (`enable_packed_weights`, on by
default for the demo on a CPU with bf16). Packed copies are used only inside generate() (`packed_linears`), never in
a forward that may need gradients, and are rebuilt when a weight changes.

Float32 on a CPU needs no copy: for 2 or 4 rows (the query tokens of a LinearSpec verify or a diffusion commit
forward of a block of 4, a batch of 2's AR step), MKL's `linear` of the demo's layer shapes took 1.06-1.4x as long
as the same sums computed as `weight @ x.T` (one weight read, the few rows streamed against it), on two AMD EPYC
(Zen 3, AVX2) hosts; at 3 rows the transposed product won on one host and lost on the other, and from 5 rows on
`linear` is as fast or faster (`python -m benchmarks.few_row_product`, `docs/cpu-performance.md` §8). Inside
generate() every plain float32 linear layer on a CPU takes the transposed product for those row counts
(`few_row_linear`); the sums are the same in another order (float32 rounding, ~1e-6), and a one-row AR step keeps
`linear`.
"""

import contextlib
import functools

import torch
from torch import nn

# Where a linear layer's packed copy is kept: its __dict__ (not a submodule or buffer: no state dict entry).
PACKED_ATTRIBUTE = "_nemotron_diffusion_packed_weight"

# float32 on a CPU: row counts for which a layer's product is computed as weight @ x.T (see `few_row_linear`).
FEW_ROW_LAYER_ROWS = (2, 4)


def few_row_product_applies(x: torch.Tensor, weight: torch.Tensor, row_counts=None) -> bool:
    """Whether `F.linear(x, weight)` is computed as `weight @ x.T` (`few_row_linear`): a float32 CPU product of a
    plain tensor weight (not a tensor-parallel DTensor shard) outside autograd, whose number of rows (x's elements
    over its last dimension) is in `row_counts` (default `FEW_ROW_LAYER_ROWS`)."""
    return (
        _few_float32_rows(x, FEW_ROW_LAYER_ROWS if row_counts is None else row_counts)
        and weight.dtype == torch.float32 and weight.device.type == "cpu"
        and weight.dim() == 2 and type(weight.data) is torch.Tensor
    )


def _few_float32_rows(x: torch.Tensor, row_counts) -> bool:
    """The input's half of `few_row_product_applies`: float32 rows, as many as one of `row_counts`, no autograd
    (the row count first: it is the test that says no at almost every AR step)."""
    return (
        x.dim() > 0 and x.shape[-1] > 0 and x.numel() // x.shape[-1] in row_counts
        and x.dtype == torch.float32 and not torch.is_grad_enabled()
    )


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` [..., out] as `(weight @ x.T).T` of the flattened [N, in] rows (see
    `few_row_product_applies`; the same sums in another order)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, flat.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether `weight` can be kept prepacked: a plain bfloat16 tensor on a CPU whose oneDNN build has bf16 kernels."""
    return (
        type(weight.data) is torch.Tensor
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and _bf16_kernels()
    )


@functools.lru_cache(maxsize=None)
def _bf16_kernels() -> bool:
    """Whether this build and CPU have oneDNN's bf16 kernels (asked once: it is checked in every packed forward)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedWeight:
    """The oneDNN-blocked copy of one weight, rebuilt when the weight's storage or version changes."""

    def __init__(self):
        self._key, self._packed = None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
            self._key = key
        return self._packed


def can_use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.linear(x, weight)` may run on a packed copy: no gradient can be needed, the weight is packable and
    x has its dtype (anything else keeps `F.linear`'s own behaviour, errors included)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not needs_grad and x.dtype == weight.dtype and packing_supported(weight)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias, packed: PackedWeight) -> torch.Tensor:
    """`F.linear(x, weight, bias)` [..., out] computed with the packed copy of `weight` (see `can_use_packed`; any
    leading dimensions: the kernel takes the [N, in] matrix)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, packed.get(weight), bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def _packable_linears(model):
    """The plain `nn.Linear` layers of `model` whose weight can be packed, except those whose forward someone else
    already replaced (accelerate's offloading hooks, for one)."""
    return [
        m for m in model.modules()
        if type(m) is nn.Linear and packing_supported(m.weight) and "forward" not in vars(m)
        and not hasattr(m, "_hf_hook")
    ]


def enable_packed_weights(model) -> int:
    """Keeps a packed copy of every packable linear layer's weight (built at the first generate() that uses it);
    returns how many layers are packed (0 where packing is not supported, e.g. float32 or a GPU)."""
    layers = _packable_linears(model)
    for layer in layers:
        if PACKED_ATTRIBUTE not in vars(layer):
            layer.__dict__[PACKED_ATTRIBUTE] = PackedWeight()
    return len(layers)


def disable_packed_weights(model) -> None:
    """Frees the packed copies kept by `enable_packed_weights`."""
    for module in model.modules():
        module.__dict__.pop(PACKED_ATTRIBUTE, None)


def kept_packed_weight(module):
    """The `PackedWeight` kept on `module` by `enable_packed_weights`, or None."""
    return vars(module).get(PACKED_ATTRIBUTE)


def _few_row_linears(model):
    """The plain float32 `nn.Linear` layers of `model` on a CPU whose forward nobody else replaced, and which no
    hook may hand a sharded or offloaded weight (tensor parallelism, accelerate)."""
    return [
        m for m in model.modules()
        if type(m) is nn.Linear and PACKED_ATTRIBUTE not in vars(m) and "forward" not in vars(m)
        and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" and type(m.weight.data) is torch.Tensor
        and not (m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"))
    ]


@contextlib.contextmanager
def packed_linears(model):
    """Inside: every linear layer of `model` with a kept packed copy computes with it, and every plain float32 CPU
    linear layer takes `few_row_linear` for a few rows (its instance `forward` is replaced, so PEFT wrappers and the
    drafting switch still see the same `nn.Linear`); a forward that could need gradients computes `F.linear` as
    before. Restored on exit."""
    packed = [m for m in model.modules() if PACKED_ATTRIBUTE in vars(m) and "forward" not in vars(m)]
    few_rows = _few_row_linears(model)
    for layer in packed:
        layer.forward = _packed_forward(layer)
    for layer in few_rows:
        layer.forward = _few_row_forward(layer)
    try:
        yield
    finally:
        for layer in packed + few_rows:
            vars(layer).pop("forward", None)


def _packed_forward(layer: nn.Linear):
    packed, plain = vars(layer)[PACKED_ATTRIBUTE], type(layer).forward

    def forward(x, *args, **kwargs):
        if args or kwargs or not can_use_packed(x, layer.weight):
            return plain(layer, x, *args, **kwargs)
        return packed_linear(x, layer.weight, layer.bias, packed)

    return forward


def _few_row_forward(layer: nn.Linear):
    plain = type(layer).forward
    # The weight's half of `few_row_product_applies` was checked once (`_few_row_linears`): a plain float32 CPU
    # weight. Every AR step calls this for every layer, so per call only the input's half is tested.
    weight, bias = layer.weight, layer.bias

    def forward(x, *args, **kwargs):
        if args or kwargs or not _few_float32_rows(x, FEW_ROW_LAYER_ROWS) or layer.weight is not weight:
            return plain(layer, x, *args, **kwargs)
        return few_row_linear(x, weight, bias)

    return forward


__all__ = [
    "FEW_ROW_LAYER_ROWS",
    "PACKED_ATTRIBUTE",
    "PackedWeight",
    "can_use_packed",
    "disable_packed_weights",
    "enable_packed_weights",
    "few_row_linear",
    "few_row_product_applies",
    "kept_packed_weight",
    "packed_linear",
    "packed_linears",
    "packing_supported",
]
