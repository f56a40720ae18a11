"""Weight and activation quantization, in plain tensor functions.

Weight grid (per group of ``group_size`` input channels of one output row)::

    w ~= (q - z) * s          q in [0, 2**bits - 1] (unsigned codes), z integer

* symmetric:  s = max|w| / (2**(bits-1) - 1),  z = 2**(bits-1)
* asymmetric: lo = min(min w, 0), hi = max(max w, 0), s = (hi - lo) / (2**bits - 1),
  z = round(-lo / s)

``group_size=None`` means one group per output row (per-channel). The input dimension is
zero-padded up to a whole number of groups (padded codes are set to ``z`` so they dequantize
to exactly 0), which is what ONNX Runtime's ``MatMulNBits`` expects for a partial last block.

Example:
    >>> import torch
    >>> w = torch.randn(8, 64)
    >>> qw = quantize_weight(w, bits=4, group_size=32, symmetric=False)
    >>> bool((dequantize_weight(qw) - w).abs().max() < 0.5)
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight", "quantize_weight", "dequantize_weight", "group_layout", "grid_params",
    "fake_quantize",
    "quantize_activation_per_token", "quantize_activation_per_group", "sqnr_db",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """Unpacked integer codes of one weight matrix and their group parameters.

    codes: uint8 ``[N, n_groups, group]``; scales: float32 ``[N, n_groups]``;
    zero_points: uint8 ``[N, n_groups]``; ``in_features`` is the unpadded K.
    """
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    symmetric: bool

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def group_layout(in_features: int, group_size: int | None) -> tuple[int, int]:
    """Return ``(group, n_groups)`` for K input channels; ``None`` means per-channel."""
    group = in_features if group_size is None else int(group_size)
    if group <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return group, -(-in_features // group)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None,
                    symmetric: bool, clip_ratio: torch.Tensor | float = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w [N, K]`` (math in float64, see module doc).

    ``clip_ratio`` (scalar or ``[N, n_groups]``) shrinks the range before rounding.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = w.shape
    group, n_groups = group_layout(k, group_size)
    wd = w.detach().to(torch.float64)
    pad = n_groups * group - k
    wg = torch.nn.functional.pad(wd, (0, pad)).reshape(n, n_groups, group)
    scales, zp = grid_params(wg, bits, symmetric, clip_ratio)
    qmax = 2 ** bits - 1
    codes = torch.clamp(torch.round(wg / scales[..., None]) + zp[..., None], 0, qmax)
    if pad:
        codes[:, -1, group - pad:] = zp[:, -1:].expand(n, pad)
    return QuantizedWeight(codes.to(torch.uint8), scales.to(torch.float32),
                           zp.to(torch.uint8), bits, group, k, symmetric)


def grid_params(wg: torch.Tensor, bits: int, symmetric: bool,
                clip_ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group ``wg [..., group]`` (float64; see module doc).

    ``clip_ratio`` (scalar or shaped like ``wg[..., 0]``) shrinks the range before rounding.
    """
    wg = wg.to(torch.float64)
    clip = torch.as_tensor(clip_ratio, dtype=torch.float64)
    if symmetric:
        half = 2 ** (bits - 1)
        scales = (wg.abs().amax(-1) * clip / (half - 1)).clamp(min=1e-12)
        return scales, torch.full_like(scales, float(half))
    qmax = 2 ** bits - 1
    lo = wg.amin(-1).clamp(max=0) * clip
    hi = wg.amax(-1).clamp(min=0) * clip
    scales = ((hi - lo) / qmax).clamp(min=1e-12)
    return scales, torch.round(-lo / scales).clamp(0, qmax)


def fake_quantize(w: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """``(clamp(round(w/s) + z, 0, 2**bits-1) - z) * s`` with ``s, z`` broadcast over ``w``."""
    q = torch.clamp(torch.round(w / scales) + zero_points, 0, 2 ** bits - 1)
    return (q - zero_points) * scales


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - z) * s`` back to ``[N, K]`` (padding dropped)."""
    w = (qw.codes.to(torch.float32) - qw.zero_points[..., None].to(torch.float32)) \
        * qw.scales[..., None]
    return w.reshape(qw.out_features, -1)[:, : qw.in_features].to(dtype)


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8, clip: float = 1.0,
                                  symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: ``x ~= xq * s``.

    Symmetric: ``s = max(max|x| over the last dim, 1e-8) * clip / (2**(bits-1) - 1)``
    (``clip < 1`` saturates the largest values of each token to round the rest finer),
    ``xq = clamp(round(x / s), -(2**(bits-1) - 1), 2**(bits-1) - 1)`` (round half to even).

    Asymmetric (``symmetric=False``): the grid spans ``[lo, hi]`` with
    ``lo = min(min x, 0) * clip``, ``hi = max(max x, 0) * clip``:
    ``s = max(hi - lo, 1e-8) / (2**bits - 1)``, zero point ``z = round(-lo / s)``,
    ``xq = clamp(round(x / s) + z, 0, 2**bits - 1) - z`` (all ``2**bits`` levels used; a token
    whose values are mostly of one sign gets a finer step).

    Computed in float32 exactly as the ONNX Runtime lowering does. Returns ``(xq, s)`` with
    ``xq`` holding integer values in a float tensor and ``s`` shaped ``[..., 1]``.

    >>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    >>> xq, s = quantize_activation_per_token(x, 2, symmetric=False)
    >>> (xq * s).tolist()
    [[0.0, 1.0, 2.0, 3.0]]
    """
    if not symmetric:
        top = float(2 ** bits - 1)
        lo = torch.clamp(x.amin(-1, keepdim=True), max=0.0)
        hi = torch.clamp(x.amax(-1, keepdim=True), min=0.0)
        if clip != 1.0:
            lo, hi = lo * clip, hi * clip
        s = torch.clamp(hi - lo, min=1e-8) / top
        z = torch.round(-lo / s)
        return torch.clamp(torch.round(x / s) + z, 0.0, top) - z, s
    qmax = float(2 ** (bits - 1) - 1)
    a = torch.clamp(x.abs().amax(-1, keepdim=True), min=1e-8)
    s = (a * clip if clip != 1.0 else a) / qmax
    xq = torch.clamp(torch.round(x / s), -qmax, qmax)
    return xq, s


def quantize_activation_per_group(x: torch.Tensor, group_size: int, bits: int = 8
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization of each group of ``group_size`` values along the last dim.

    The last dim is zero-padded to whole groups, then per group
    ``s = max(max|x_g|, 1e-8) / (2**(bits-1) - 1)``, ``xq = clamp(round(x / s), -qmax, qmax)``
    (round half to even), in float32 -- the activation side of an int8-dot GEMV (ONNX
    Runtime's ``MatMulNBits`` at ``accuracy_level=4`` quantizes per block the same way).
    Returns ``xq [..., n_groups, group_size]`` (integer values in a float tensor) and
    ``s [..., n_groups]``; ``xq * s[..., None]`` approximates the padded ``x``.

    Example:
        >>> xq, s = quantize_activation_per_group(torch.tensor([[1.0, -2.0, 0.5]]), 2)
        >>> xq.tolist(), s.shape
        ([[[64.0, -127.0], [127.0, 0.0]]], torch.Size([1, 2]))
    """
    k = x.shape[-1]
    n_groups = -(-k // group_size)
    xg = torch.nn.functional.pad(x.to(torch.float32), (0, n_groups * group_size - k))
    # each group is a "token" of the per-token quantizer: one rounding rule for both
    xq, s = quantize_activation_per_token(xg.reshape(*x.shape[:-1], n_groups, group_size), bits)
    return xq, s[..., 0]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    ref = reference.detach().to(torch.float64)
    err = (ref - approx.detach().to(torch.float64)).pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / err))
