"""lowbit's graph operators, defined as real torch operators (``torch.ops.lowbit.*``).

A quantized linear is *one* node holding packed weights, group scales and (for asymmetric
grids) zero points in the layout of :mod:`lowbit.numerics.packing`. The implementations here
are the torch reference kernels; every other backend lowers the same node.

Defining a torch operator needs a module-level registration (as torch's own operators do);
this module registers nothing else.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowbit.numerics.packing import unpack_codes, unpack_zero_points
from lowbit.numerics.quant import quantize_activation_per_token

__all__ = ["quant_linear", "dequantize_packed", "hadamard"]


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor,
                      zero_points: Optional[torch.Tensor], in_features: int,
                      bits: int, group_size: int) -> torch.Tensor:
    """Packed bytes -> float32 weight ``[N, K]`` (``w = (q - z) * s``)."""
    n, n_groups = scales.shape
    codes = unpack_codes(qweight, bits, group_size).to(torch.float32)
    if zero_points is None:
        z = torch.full((n, n_groups), float(2 ** (bits - 1)))
    else:
        z = unpack_zero_points(zero_points, bits, n_groups).to(torch.float32)
    w = (codes - z[..., None]) * scales[..., None]
    return w.reshape(n, -1)[:, :in_features]


def _integer_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zero_points: Optional[torch.Tensor], in_features: int, bits: int,
                    act_bits: int, act_clip: float) -> torch.Tensor:
    """Exact integer emulation: ``y = (xq @ (q - z)^T) * s_x * s_w`` (per-channel weights)."""
    n = scales.shape[0]
    codes = unpack_codes(qweight, bits, qweight.shape[-1] * 8 // bits).reshape(n, -1)
    z = (torch.full((n, 1), 2 ** (bits - 1), dtype=torch.int64) if zero_points is None
         else unpack_zero_points(zero_points, bits, 1).to(torch.int64))
    wq = (codes[:, :in_features].to(torch.int64) - z).to(torch.float32)
    xq, s = quantize_activation_per_token(x, act_bits, act_clip)
    # Integer products summed in float32 are exact while |partial sum| < 2**24: split K into
    # chunks that cannot exceed it, add the chunk sums in float64 (exact), then round once.
    bound = float(2 ** (act_bits - 1) - 1) * max(float(wq.abs().max()), 1.0)
    chunk = max(1, int(2 ** 24 // bound))
    acc = sum((xq[..., k:k + chunk] @ wq[:, k:k + chunk].T).to(torch.float64)
              for k in range(0, in_features, chunk))
    return acc.to(torch.float32) * s * scales[:, 0]


@torch.library.custom_op("lowbit::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 in_features: int, bits: int, group_size: int, act_bits: int,
                 act_clip: float = 1.0, act_symmetric: bool = True) -> torch.Tensor:
    """``y = x @ dequant(W)^T + b``; with ``act_bits`` > 0, x is first quantized per token
    (range ``act_clip * max|x|``, or with ``act_symmetric=False`` the clipped ``[min, max]``
    with a zero point: :func:`lowbit.numerics.quant.quantize_activation_per_token`)."""
    if act_bits and scales.shape[1] == 1:
        y = _integer_linear(x, qweight, scales, zero_points, in_features, bits, act_bits,
                            act_clip)
    else:
        if act_bits:
            xq, s = quantize_activation_per_token(x, act_bits, act_clip, act_symmetric)
            x = xq * s
        w = dequantize_packed(qweight, scales, zero_points, in_features, bits, group_size)
        y = torch.nn.functional.linear(x, w.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y


@quant_linear.register_fake
def _quant_linear_fake(x, qweight, scales, zero_points, bias, in_features, bits, group_size,
                       act_bits, act_clip=1.0, act_symmetric=True):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Online Hadamard transform ``y = x (A (x) B)`` in factored form.

    With ``x``'s last dimension viewed as ``[a, b]`` (``X``), ``y = A^T X B`` flattened back:
    ``n (a + b)`` multiply-adds per row instead of ``n^2``. Inserted by the ``rotate`` pass.
    """
    a, b = left.shape[0], right.shape[0]
    xr = x.unflatten(-1, (a, b))
    y = torch.matmul(left.T.to(x.dtype), torch.matmul(xr, right.to(x.dtype)))
    return y.flatten(-2)


@hadamard.register_fake
def _hadamard_fake(x, left, right):
    return torch.empty_like(x)


def _hadamard_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _hadamard_backward(ctx, grad):
    """``y = A^T X B`` is linear: ``dX = A dY B^T`` (itself differentiable: HVPs work)."""
    left, right = ctx.saved_tensors
    return hadamard(grad, left.T.contiguous(), right.T.contiguous()), None, None


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)
