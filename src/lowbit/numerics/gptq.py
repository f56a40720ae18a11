"""GPTQ (Frantar et al., 2022) and Hessian-weighted clipping search, as tensor functions.

A linear ``y = x W^T`` quantized to ``Q`` has output error ``tr((W - Q) H (W - Q)^T) / 2`` with
``H = 2 X^T X / n`` over calibration inputs ``X [n, K]``. GPTQ quantizes one input column at a
time and spreads each column's rounding error over the columns not yet quantized, using the
upper Cholesky factor ``U`` of ``H^-1``::

    err_i = (w_i - q_i) / U_ii,        W[:, j] -= err_i * U_ij   for j > i

Columns go in blocks of ``block_size`` with the update of later blocks deferred ("lazy batch
updates"); ``act_order`` visits columns by decreasing ``H_ii``. Group scales and zero points
are taken when the first column of a group is reached (its columns already carry the updates
from earlier ones); with ``act_order`` they are fixed up front from the original weights
("static groups"), so groups stay contiguous in the stored layout.

Clipping search: per row and group, the range ratio ``r`` from ``ratios`` minimising the
Hessian-weighted error ``e H_gg e^T`` of that group (``e = w - Q_r(w)``), which is the output
error of the group up to cross-group terms.

Scale refinement (``refine_scales``): with GPTQ's codes fixed, each row's group scales are
the exact least-squares fit of the *original* row in the ``H`` metric: ``Q = A s`` with
``A[c, g] = q_c - z_g`` for column ``c`` of group ``g``, so ``s = (A^T H A)^-1 A^T H w``. The
grid GPTQ picked for a group when it reached it was fitted to weights that later columns'
compensation no longer matches; the fit moves each scale to the value that serves the whole
row's output best, and never increases the output error (the old scales are one candidate).

Example:
    >>> import torch
    >>> from lowbit.numerics.quant import dequantize_weight
    >>> w, x = torch.randn(16, 64), torch.randn(256, 64)
    >>> h = hessian_from_inputs(x)
    >>> qw = gptq_quantize(w, h, bits=4, group_size=32, symmetric=False)
    >>> rtn = quantize_weight(w, 4, 32, False)
    >>> bool(output_error(w, dequantize_weight(qw), h) <= output_error(w, dequantize_weight(rtn), h))
    True
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from lowbit.numerics._gptq_loop import _DTYPE, columns
from lowbit.numerics.quant import (QuantizedWeight, fake_quantize, grid_params, group_layout,
                                   quantize_weight)

__all__ = ["hessian_from_inputs", "output_error", "search_clip", "gptq_quantize",
           "float_target", "refine_scales", "DEFAULT_CLIP_RATIOS"]

#: Range ratios the clipping search tries (1.0 = no clipping).
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))   # 1.0 ... 0.6


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 X^T X / n`` (returned in float64) of inputs ``x [..., K]``.

    The product runs in ``x``'s dtype (float32 activations: half the time of float64 and
    ~1e-6 relative error on H, far below the damping GPTQ adds).
    """
    flat = x.reshape(-1, x.shape[-1])
    return (2 * flat.T @ flat).to(torch.float64) / max(flat.shape[0], 1)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the summed squared output error (times 2/n).

    Computed in ``h``'s dtype (pass a float32 ``h`` for a fast estimate).
    """
    e = (w.to(h.dtype) - q.to(h.dtype))
    return float(((e @ h) * e).sum())


def float_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float = 0.01
                 ) -> torch.Tensor:
    """The weight whose outputs on the layer's actual inputs best match the float model's.

    With ``X~`` the inputs the layer sees after earlier layers were quantized and ``X`` those
    of the float model, ``H = 2 X~^T X~ / n`` and ``C = 2 X^T X~ / n``, the error GPTQ should
    shrink is ``|X~ Q^T - X W^T|^2``, not ``|X~ (Q - W)^T|^2``. It splits exactly into
    ``|X~ (Q - W*)^T|^2`` plus a constant, with ``W*`` the least-squares solution; so GPTQ of
    ``W*`` with ``H`` minimises the true error (asymmetric calibration, as in GPTAQ). ``W*``
    is ridge-regularised towards ``W`` with GPTQ's damping ``lambda = damp * mean(diag H)``:

        W* = W + W (C - H) (H + lambda I)^-1          (W* = W when X~ = X)

    Example:
        >>> import torch
        >>> x = torch.randn(512, 8, dtype=torch.float64)
        >>> xq = x + 0.1 * torch.randn(512, 8, dtype=torch.float64)
        >>> w = torch.randn(4, 8, dtype=torch.float64)
        >>> h, c = 2 * xq.T @ xq / 512, 2 * x.T @ xq / 512
        >>> ws = float_target(w, h, c, damp=1e-9)
        >>> bool((xq @ ws.T - x @ w.T).norm() < (xq @ w.T - x @ w.T).norm())
        True
    """
    w, h, c = w.to(torch.float64), h.to(torch.float64), c.to(torch.float64)
    lam = damp * torch.diag(h).mean()
    hd = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    delta = w @ (c - h)                                     # [N, K]
    return w + torch.linalg.solve(hd, delta.T).T            # H symmetric


def refine_scales(qw: QuantizedWeight, w: torch.Tensor, h: torch.Tensor) -> QuantizedWeight:
    """Refit each row's group scales to ``w`` in the ``H`` metric, codes fixed (module doc).

    A row keeps its old scales where the fit is not better, not finite or not positive (a
    group whose codes all equal its zero point has no scale to fit and keeps its own).

    Example:
        >>> import torch
        >>> from lowbit.numerics.quant import dequantize_weight
        >>> w, x = torch.randn(8, 64, dtype=torch.float64), torch.randn(256, 64)
        >>> h = hessian_from_inputs(x)
        >>> qw = gptq_quantize(w, h, bits=3, group_size=16, symmetric=False)
        >>> rq = refine_scales(qw, w, h)
        >>> bool(output_error(w, dequantize_weight(rq), h) <= output_error(w, dequantize_weight(qw), h))
        True
    """
    return _refit(qw, _RefitTarget.of(w, h, qw))[0]


class _RefitTarget(NamedTuple):
    """``w`` and ``H`` zero-padded to whole groups (float64), with ``w H`` and ``w H w^T`` per
    row: computed once for every refit of one weight."""
    hp: torch.Tensor
    wh: torch.Tensor
    c: torch.Tensor

    @classmethod
    def of(cls, w: torch.Tensor, h: torch.Tensor, qw: QuantizedWeight) -> "_RefitTarget":
        pad = qw.codes.shape[1] * qw.codes.shape[2] - w.shape[1]
        hp = torch.nn.functional.pad(h.to(torch.float64), (0, pad, 0, pad))
        wp = torch.nn.functional.pad(w.to(torch.float64), (0, pad))
        wh = wp @ hp                                            # H symmetric
        return cls(hp, wh, (wp * wh).sum(-1))


def _refit(qw: QuantizedWeight, t: _RefitTarget) -> tuple[QuantizedWeight, torch.Tensor]:
    """:func:`refine_scales` on a prepared target; also returns each row's output error.

    With ``Q = A s``, a row's error is ``w H w^T - 2 s.b + s^T M s`` (``b = A^T H w``,
    ``M = A^T H A``), so both candidates are scored without another ``K x K`` product.
    """
    n, n_groups, group = qw.codes.shape
    a = qw.codes.to(torch.float64) - qw.zero_points.to(torch.float64)[..., None]  # [N, G, g]
    hp = t.hp.reshape(n_groups, group, -1)
    m0 = torch.empty(n, n_groups, n_groups, dtype=torch.float64)
    for i in range(n_groups):               # M[n, i, j] = a_ni^T H_ij a_nj
        m0[:, i, :] = ((a[:, i, :] @ hp[i]).reshape(n, n_groups, group) * a).sum(-1)
    b0 = (t.wh.reshape(n, n_groups, group) * a).sum(-1)
    old = qw.scales.to(torch.float64)
    diag = torch.diagonal(m0, dim1=1, dim2=2)
    empty = diag <= 1e-12 * diag.amax(-1, keepdim=True).clamp(min=1e-300)
    # an empty group: identity row/column with its old scale as the solution
    m = torch.where(empty[:, :, None] | empty[:, None, :], torch.zeros_like(m0), m0)
    m = m + torch.diag_embed(empty.to(m.dtype))
    new = torch.linalg.solve(m, torch.where(empty, old, b0))
    ok = torch.isfinite(new).all(-1) & (new > 0).all(-1)
    new = torch.where(ok[:, None], new, old).to(torch.float32).to(torch.float64)  # as stored

    def err(s):
        return t.c - 2 * (s * b0).sum(-1) + torch.einsum("ni,nij,nj->n", s, m0, s)
    err_old, err_new = err(old), err(new)
    better = err_new < err_old
    scales = torch.where(better[:, None], new, old).to(torch.float32)
    return (QuantizedWeight(qw.codes, scales, qw.zero_points, qw.bits, qw.group_size,
                            qw.in_features, qw.symmetric),
            torch.where(better, err_new, err_old))


def _group_blocks(h: torch.Tensor, group: int, n_groups: int) -> torch.Tensor:
    """Diagonal blocks ``H_gg`` ``[n_groups, group, group]`` (zero-padded past K)."""
    k = h.shape[0]
    hp = torch.nn.functional.pad(h, (0, n_groups * group - k, 0, n_groups * group - k))
    idx = torch.arange(n_groups)
    return hp.reshape(n_groups, group, n_groups, group)[idx, :, idx, :]


def search_clip(w: torch.Tensor, h: torch.Tensor | None, bits: int, group_size: int | None,
                symmetric: bool, ratios: Sequence[float] = DEFAULT_CLIP_RATIOS) -> torch.Tensor:
    """Per row and group, the ratio in ``ratios`` with the least (H-weighted) error.

    Returns ``[N, n_groups]``; ``h=None`` weighs every input channel equally.
    """
    n, k = w.shape
    group, n_groups = group_layout(k, group_size)
    wg = torch.nn.functional.pad(w.to(torch.float32), (0, n_groups * group - k))
    wg = wg.reshape(n, n_groups, group)
    # the search only ranks candidates: float32 batched products are plenty and ~20x faster
    blocks = None if h is None else _group_blocks(h.to(torch.float32), group, n_groups)
    best = torch.full((n, n_groups), float("inf"), dtype=torch.float64)
    choice = torch.ones(n, n_groups, dtype=torch.float64)
    for r in ratios:
        s, z = grid_params(wg, bits, symmetric, r)
        s, z = s.to(torch.float32), z.to(torch.float32)   # scales as stored
        e = wg - fake_quantize(wg, s[..., None], z[..., None], bits)
        if blocks is None:
            err = (e * e).sum(-1)
        else:
            eg = e.transpose(0, 1)                                  # [G, N, g]
            err = (torch.bmm(eg, blocks) * eg).sum(-1).T            # [N, G]
        err = err.to(torch.float64)
        better = err < best
        best = torch.where(better, err, best)
        choice = torch.where(better, torch.full_like(choice, r), choice)
    return choice


def _prepare(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero dead input channels, dampen ``H`` by ``damp * mean(diag H)``."""
    w, h = w.to(_DTYPE).clone(), h.to(_DTYPE).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return w, h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1``, retrying with more damping if ``H`` is singular."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (0.0, 1e-4, 1e-3, 1e-2, 1e-1):
        hd = h + extra * torch.diag(h).mean() * eye
        l, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return u
    raise ValueError("Hessian is not positive definite even after damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None,
                  symmetric: bool, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, clip_ratios: Sequence[float] = (1.0,),
                  refine_rounds: int = 0) -> QuantizedWeight:
    """GPTQ of ``w [N, K]`` given ``H [K, K]`` (see module doc); returns the integer codes.

    ``refine_rounds`` > 0 refits the scales to the original ``w`` afterwards
    (:func:`refine_scales`, in the damped ``H`` GPTQ used); each further round reruns the
    column loop on the refitted grids (new codes, same error compensation) and refits again.
    Each row keeps the round with its least output error.
    """
    n, k = w.shape
    group, n_groups = group_layout(k, group_size)
    w, h = _prepare(w, h, damp)
    w_orig, h_damped = w, h
    clip = (search_clip(w, h, bits, group_size, symmetric, clip_ratios)
            if len(clip_ratios) > 1 else torch.ones(n, n_groups, dtype=_DTYPE))
    scales = torch.zeros(n, n_groups, dtype=_DTYPE)
    zeros = torch.zeros(n, n_groups, dtype=_DTYPE)
    have = torch.zeros(n_groups, dtype=torch.bool)
    if act_order:   # static groups from the original weights
        static = quantize_weight(w, bits, group_size, symmetric, clip)
        scales, zeros = static.scales.to(_DTYPE), static.zero_points.to(_DTYPE)
        have[:] = True
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    block_size = group * max(1, block_size // group)   # groups never straddle blocks
    u = _inverse_cholesky(h)
    codes = _single_threaded(columns, w, u, perm, scales, zeros, have, clip, bits, group,
                             block_size, symmetric)
    best = qw = _assemble(codes, scales, zeros, bits, group, k, symmetric)
    target = _RefitTarget.of(w_orig, h_damped, best) if refine_rounds else None
    best_err = None
    for r in range(refine_rounds):
        if r:       # rerun the column loop on the refitted grids
            scales, zeros = qw.scales.to(_DTYPE).clone(), qw.zero_points.to(_DTYPE).clone()
            codes = _single_threaded(columns, w_orig[:, perm].clone(), u, perm, scales, zeros,
                                     torch.ones(n_groups, dtype=torch.bool), clip, bits, group,
                                     block_size, symmetric)
            qw = _assemble(codes, scales, zeros, bits, group, k, symmetric)
        qw, err = _refit(qw, target)   # never worse than its input, row by row
        best, best_err = (qw, err) if best_err is None else _better_rows(best, best_err, qw, err)
    return best


def _single_threaded(fn, *args):
    """Tensor ops of the column loop on one thread (many small ops: threads only stall); the
    compiled span splits rows over the threads torch was given."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, threads=threads)
    finally:
        torch.set_num_threads(threads)


def _better_rows(best: QuantizedWeight, best_err: torch.Tensor, qw: QuantizedWeight,
                 err: torch.Tensor) -> tuple[QuantizedWeight, torch.Tensor]:
    """Row by row, the quantization with the smaller output error."""
    take = err < best_err

    def pick(a, b):
        return torch.where(take.view(-1, *([1] * (a.dim() - 1))), b, a)
    return (QuantizedWeight(pick(best.codes, qw.codes), pick(best.scales, qw.scales),
                            pick(best.zero_points, qw.zero_points), qw.bits, qw.group_size,
                            qw.in_features, qw.symmetric),
            torch.minimum(err, best_err))


def _assemble(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group: int, k: int, symmetric: bool) -> QuantizedWeight:
    """Codes ``[N, K]`` -> :class:`QuantizedWeight` (padded codes dequantize to 0)."""
    n, n_groups = scales.shape
    pad = n_groups * group - k
    full = torch.cat([codes, zeros[:, -1:].expand(n, pad)], 1) if pad else codes
    return QuantizedWeight(full.reshape(n, n_groups, group).to(torch.uint8),
                           scales.to(torch.float32), zeros.to(torch.uint8), bits, group, k,
                           symmetric)

