"""GPTQ's column loop inside one block, compiled with numba (row-parallel, no interpreter).

Rows of ``W`` are independent given ``U`` (the upper Cholesky factor of ``H^-1``): each row
walks the block's columns in order, rounds column ``i`` on its group's grid, and spreads the
error over its own later columns. So the loop runs row by row, rows split over the threads,
with the same float32 operations in the same order as the tensor form
(:func:`lowbit.numerics._gptq_loop.span_torch`; products rounded before they are subtracted, no
fused multiply-add): codes and compensated weights are bit for bit the same, whatever the
thread count or CPU. Written against torch, the loop is ~10 tiny tensor ops per column, bound
by the interpreter; here it is arithmetic on both cores.
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["span"]

_F = np.float32


@numba.njit(parallel=True, cache=True)
def span(w1, u1, diag, scales, zeros, codes, err1, a, b, top, cols):  # pragma: no cover
    """Columns ``a..b-1`` of a block (all float32, C-contiguous).

    ``w1 [N, B]`` the block's weights (updated in place), ``u1 [B, B]`` its part of ``U``,
    ``diag [B]`` ``U``'s diagonal, ``scales``/``zeros [N, b - a]`` each column's grid,
    ``codes [N, K]`` written at ``cols[i]`` (the column's index in the weight), ``err1
    [N, B]`` the scaled errors (for the lazy update of later blocks), ``top = 2^bits - 1``.
    """
    n, width = w1.shape
    for r in numba.prange(n):
        row = w1[r].copy()
        for i in range(a, b):
            wi = row[i]
            s = scales[r, i - a]
            z = zeros[r, i - a]
            q = _F(np.rint(_F(wi / s)) + z)
            if q < _F(0.0):
                q = _F(0.0)
            if q > top:
                q = top
            codes[r, cols[i]] = q
            e = _F(_F(wi - _F(_F(q - z) * s)) / diag[i])
            err1[r, i] = e
            u = u1[i]
            for j in range(i + 1, width):
                row[j] = row[j] - e * u[j]
        w1[r, :] = row
