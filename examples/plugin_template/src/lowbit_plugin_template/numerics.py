"""Pure tensor math of the plugin, separate from graph plumbing."""
from __future__ import annotations

from typing import Sequence

import torch

from lowbit.numerics.quant import dequantize_weight, group_layout, quantize_weight

__all__ = ["search_clip_ratios"]


def search_clip_ratios(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                       grid: Sequence[float]) -> torch.Tensor:
    """Clip ratio per (output channel, group) of ``w [N, K]`` minimising the group's MSE.

    For each ratio ``r`` in ``(1.0, *grid)`` the weight is quantized with
    ``quantize_weight(w, ..., clip_ratio=r)`` and dequantized; the group error is
    ``e_r[n, g] = sum over k in group g of (w[n, k] - deq_r[n, k])^2``. Returns the float64
    ``[N, n_groups]`` tensor ``ratio[n, g] = argmin_r e_r[n, g]``. ``1.0`` (plain
    round-to-nearest) is always tried first and wins ties, so the result is never worse
    than ``rtn`` for any group.

    Example:
        >>> import torch
        >>> w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
        >>> r = search_clip_ratios(w, 4, 32, False, (1.0, 0.9, 0.8))
        >>> tuple(r.shape), bool(((r == 1.0) | (r == 0.9) | (r == 0.8)).all())
        ((4, 2), True)
    """
    candidates = (1.0, *(float(r) for r in grid if float(r) != 1.0))
    n, k = w.shape
    group, n_groups = group_layout(k, group_size)
    wd = w.detach().to(torch.float64)
    errors = []
    for r in candidates:
        qw = quantize_weight(w, bits, group_size, symmetric, clip_ratio=r)
        err = (wd - dequantize_weight(qw, torch.float64)).pow(2)
        err = torch.nn.functional.pad(err, (0, n_groups * group - k))
        errors.append(err.reshape(n, n_groups, group).sum(-1))
    best = torch.stack(errors).argmin(0)      # first minimum: earlier ratios win ties
    return torch.tensor(candidates, dtype=torch.float64)[best]
