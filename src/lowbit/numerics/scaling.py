"""Per-channel scales that move difficulty between activations and weights.

Folding ``s`` is exact: ``(X / s) (W diag(s))^T = X W^T``. What changes is what quantization
sees: large ``s_j`` enlarge weight column ``j`` (protecting it) and shrink activation ``j``.

* AWQ (Lin et al., 2023): ``s_j = m_j^alpha`` with ``m_j`` the mean magnitude of input channel
  ``j``, normalised by ``sqrt(max s * min s)``; ``alpha`` searched per group to minimise the
  output error after weight quantization.
* SmoothQuant (Xiao et al., 2023): ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``.

Example:
    >>> import torch
    >>> s = awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5)
    >>> [round(v, 3) for v in s.tolist()]
    [0.5, 1.0, 2.0]
"""
from __future__ import annotations

from typing import Sequence

import torch

from lowbit.numerics.quant import dequantize_weight, quantize_weight

__all__ = ["awq_scales", "smooth_scales", "scaled_quant_error", "search_awq_alpha"]


def awq_scales(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = m^alpha / sqrt(max(m^alpha) * min(m^alpha))`` (float64, m clamped at 1e-8)."""
    s = magnitude.to(torch.float64).clamp(min=1e-8).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (float64, both clamped at 1e-5)."""
    a = act_absmax.to(torch.float64).clamp(min=1e-5)
    w = weight_absmax.to(torch.float64).clamp(min=1e-5)
    return a.pow(alpha) / w.pow(1 - alpha)


def scaled_quant_error(weights: Sequence[torch.Tensor], h: torch.Tensor, s: torch.Tensor,
                       bits: int, group_size: int | None, symmetric: bool) -> float:
    """Output error ``sum_W tr(E H E^T)`` with ``E = Q(W diag(s)) diag(s)^-1 - W``."""
    s = s.to(torch.float64)
    total = 0.0
    for w in weights:
        w = w.to(torch.float64)
        q = dequantize_weight(quantize_weight(w * s, bits, group_size, symmetric),
                              torch.float64) / s
        e = q - w
        total += float(((e @ h) * e).sum())
    return total


def search_awq_alpha(weights: Sequence[torch.Tensor], h: torch.Tensor, magnitude: torch.Tensor,
                     bits: int, group_size: int | None, symmetric: bool,
                     grid: int = 20) -> tuple[float, torch.Tensor, float, float]:
    """Best ``alpha`` in ``{0, 1/grid, ..., 1}``; returns ``(alpha, s, error, error at 0)``."""
    best = None
    base = None
    for i in range(grid + 1):
        alpha = i / grid
        s = awq_scales(magnitude, alpha)
        err = scaled_quant_error(weights, h, s, bits, group_size, symmetric)
        if base is None:
            base = err
        if best is None or err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], base
