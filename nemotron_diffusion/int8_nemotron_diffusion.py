# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Weight-only int8 for draft forwards on a CPU: one scale per output row, torch's `_weight_int8pack_mm` kernel.

On a CPU at a few query tokens a forward mostly reads weights, so halving their bytes makes a draft forward cheaper
(`docs/cpu-performance.md`). Only drafts use it (the drafter's merged weights, the draft head): the verifier keeps
the base weights, so self-speculation stays lossless.
"""

import torch


def int8_supported(device, dtype) -> bool:
    """Whether weight-only int8 pays off for activations of `dtype` on `device`: a CPU with bfloat16. torch's CPU
    kernel also takes float32 and float16 activations, but there it ran ~8x slower than the dense product (torch
    2.13, a [4, 576] x [576, 1536] product: 5.5 ms against 0.7 ms in float32), so those keep dense weights."""
    device = torch.device(device)
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CPU"))


def quantize_int8(weight: torch.Tensor):
    """(q int8 [out, in], scales [out] in the weight's dtype) with weight ≈ q * scales[:, None]: symmetric per row,
    the row's largest magnitude maps to 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] times the int8 weight's transpose: [..., out] in x's dtype. The kernel takes [N, in] rows in
    the scales' dtype (the 2-D view also keeps clear of torch's slow path for 3-D slices)."""
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(scales.dtype), q, scales)
    return out.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


__all__ = ["int8_linear", "int8_supported", "quantize_int8"]
