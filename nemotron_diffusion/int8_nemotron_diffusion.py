# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Int8 weights for draft forwards on a CPU: one scale per output row.

On a CPU at a few query tokens a forward mostly reads weights, so fewer bytes make a draft forward cheaper
(`docs/cpu-performance.md`). Only drafts use it (the drafter's merged weights, the draft head): the verifier keeps
the base weights, so self-speculation stays lossless. bfloat16 weights take torch's weight-only kernel
(`_weight_int8pack_mm`, bf16 activations); float32 weights take FBGEMM's dynamic int8 product
(`quantized::linear_dynamic`: the activations are quantized per call too, 7-bit on x86), since torch's weight-only
kernel ran ~8x slower than the dense product with float32 activations (a [4, 576] x [576, 1536] product: 5.5 ms
against 0.7 ms) while FBGEMM's took 0.4x the dense time on an AVX2 CPU and 0.15x for the demo's 49k-row head.
"""

import warnings

import torch


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def int8_supported(device, dtype) -> bool:
    """Whether int8 draft weights are available for weights of `dtype` on `device`: a CPU, with bfloat16 (torch's
    weight-only kernel) or float32 (FBGEMM)."""
    device = torch.device(device)
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CPU")
    return dtype == torch.float32 and _fbgemm_available()


def int8_weight(weight: torch.Tensor):
    """The kept int8 form of `weight` for `int8_linear`: (q, scales) of `quantize_int8`, and for a float32 weight
    also FBGEMM's packed form of exactly that q and scales."""
    q, scales = quantize_int8(weight)
    if weight.dtype != torch.float32:
        return q, scales
    with warnings.catch_warnings():  # torch flags its quantized tensor types as deprecated; FBGEMM's ops need them
        warnings.simplefilter("ignore")
        quantized = torch._make_per_channel_quantized_tensor(
            q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0
        )
        packed = torch.ops.quantized.linear_prepack(quantized, None)
    return q, scales, packed


def quantize_int8(weight: torch.Tensor):
    """(q int8 [out, in], scales [out] in the weight's dtype) with weight ≈ q * scales[:, None]: symmetric per row,
    the row's largest magnitude maps to 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, packed=None) -> torch.Tensor:
    """x [..., in] times the int8 weight's transpose: [..., out] in x's dtype. The kernels take [N, in] rows (the
    2-D view also keeps clear of torch's slow path for 3-D slices): FBGEMM's where `packed` (`int8_weight` of a
    float32 weight) is given, else torch's weight-only kernel in the scales' dtype."""
    flat = x.reshape(-1, x.shape[-1])
    if packed is not None:
        out = torch.ops.quantized.linear_dynamic(flat.float().contiguous(), packed, True)
    else:
        out = torch.ops.aten._weight_int8pack_mm(flat.to(scales.dtype), q, scales)
    return out.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


__all__ = ["int8_linear", "int8_supported", "int8_weight", "quantize_int8"]
