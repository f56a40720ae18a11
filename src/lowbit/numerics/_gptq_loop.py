"""GPTQ's column loop (:func:`lowbit.numerics.gptq.gptq_quantize`): blocks of columns, each
rounded on its group's grid with its error spread over the block's later columns, the later
blocks updated lazily. The loop inside a block runs compiled (:mod:`lowbit.numerics._gptq_numba`,
imported when first used); :func:`span_torch` is the same loop in tensor ops, its reference.
"""
from __future__ import annotations

import torch

from lowbit.numerics.quant import grid_params

__all__ = ["columns", "span_torch", "span_compiled"]

#: GPTQ's working precision. float32 as in the reference implementations: with the damping
#: the Cholesky factors are well conditioned, and it is ~3x faster than float64 here.
_DTYPE = torch.float32


def columns(w, u, perm, scales, zeros, have, clip, bits, group, block_size, symmetric, *,
            threads: int = 1, span=None):
    """The GPTQ column loop (module doc); fills ``scales``/``zeros`` of groups reached first.

    Within a block, runs of columns whose grids are known go to ``span`` (default the
    compiled, row-parallel :func:`lowbit.numerics._gptq_numba.span`; :func:`span_torch` is the
    same loop in tensor ops, bit for bit); a column whose group has no grid yet (natural
    order: a group's first column) gets it from the current weights first.
    """
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=_DTYPE)
    if span is None:
        span = span_compiled(threads)
    order, have = perm.tolist(), have.tolist()
    diag = torch.diagonal(u).contiguous()
    top = float(2 ** bits - 1)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=_DTYPE)
        u1, cols = u[i1:i2, i1:i2].contiguous(), perm[i1:i2].contiguous()
        i = 0
        while i < i2 - i1:
            col = order[i1 + i]
            g = col // group
            if not have[g]:   # first column of its group (natural order): fix its grid now
                s, z = grid_params(w1[:, i:i + min(group, k - col)], bits, symmetric, clip[:, g])
                scales[:, g], zeros[:, g] = s.to(_DTYPE), z.to(_DTYPE)
                have[g] = True
            j = i + 1
            while j < i2 - i1 and have[order[i1 + j] // group]:
                j += 1
            gidx = [c // group for c in order[i1 + i:i1 + j]]
            span(w1, u1, diag[i1:i2], scales[:, gidx].contiguous(), zeros[:, gidx].contiguous(),
                 codes, err1, i, j, top, cols)
            i = j
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
    return codes


def span_torch(w1, u1, diag, s, z, codes, err1, a, b, top, cols):
    """Columns ``a..b-1`` of a block in tensor ops (the reference of the compiled span)."""
    n = w1.shape[0]
    q = torch.empty(n, dtype=_DTYPE)
    e = torch.empty(n, dtype=_DTYPE)
    d, cols = diag.tolist(), cols.tolist()
    for i in range(a, b):
        si, zi, wi = s[:, i - a], z[:, i - a], w1[:, i]
        torch.div(wi, si, out=q).round_().add_(zi).clamp_(0.0, top)
        codes[:, cols[i]] = q
        # e = (w_i - (q - z) s) / U_ii, then the rank-1 update of the block's later columns:
        # products rounded, then subtracted (no fused multiply-add, unlike BLAS's ``ger``,
        # which fuses only in its vector body, so its results depend on the CPU)
        torch.sub(q, zi, out=e).mul_(si).neg_().add_(wi).div_(d[i])
        w1[:, i + 1:].sub_(torch.outer(e, u1[i, i + 1:]))
        err1[:, i] = e


def span_compiled(threads: int):
    """:func:`lowbit.numerics._gptq_numba.span` on tensors (numpy views, no copies)."""
    import numba
    import numpy

    from lowbit.numerics._gptq_numba import span
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))

    def run(w1, u1, diag, s, z, codes, err1, a, b, top, cols):
        span(w1.numpy(), u1.numpy(), diag.numpy(), s.numpy(), z.numpy(), codes.numpy(),
             err1.numpy(), a, b, numpy.float32(top), cols.numpy())
    return run
