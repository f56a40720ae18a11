"""Bit packing of integer codes into bytes: the one layout every backend reads.

Layout (ONNX Runtime ``MatMulNBits``): codes ``[N, n_groups, group]`` become uint8
``[N, n_groups, group * bits / 8]``; within a byte the earlier k sits in the lower bits
(for 4 bits: low nibble = even k). Zero points ``[N, n_groups]`` are packed the same way
along the group axis into ``[N, ceil(n_groups * bits / 8)]`` (3 bits: whole 3-byte words). Widths that do not divide 8
(3 bits) are packed as a little-endian bit stream per group.

Example:
    >>> import torch
    >>> c = torch.randint(0, 16, (2, 3, 32), dtype=torch.uint8)
    >>> bool((unpack_codes(pack_codes(c, 4), 4, 32) == c).all())
    True
"""
from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes", "pack_zero_points", "unpack_zero_points",
           "packed_group_bytes", "packed_nbytes"]


def packed_group_bytes(group: int, bits: int) -> int:
    """Bytes one group of ``group`` codes occupies."""
    total = group * bits
    if total % 8:
        raise ValueError(f"group of {group} x {bits}-bit codes is not a whole number of bytes")
    return total // 8


def _pack_last(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` as a little-endian bit stream."""
    *lead, length = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:
        per = 8 // bits
        c = codes.to(torch.int32).reshape(*lead, length // per, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    bitpos = torch.arange(bits, dtype=torch.int32)
    stream = ((codes.to(torch.int32)[..., None] >> bitpos) & 1).reshape(*lead, length * bits)
    stream = stream.reshape(*lead, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _unpack_last(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    *lead, _ = packed.shape
    if bits == 8:
        return packed[..., :length].to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        c = (packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)
        return c.reshape(*lead, -1)[..., :length].to(torch.uint8)
    stream = (packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32)) & 1
    stream = stream.reshape(*lead, -1)[..., : length * bits].reshape(*lead, length, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, n_groups, group]`` codes -> uint8 ``[N, n_groups, group*bits/8]``."""
    packed_group_bytes(codes.shape[-1], bits)
    return _pack_last(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    return _unpack_last(packed, bits, group)


def pack_zero_points(zero_points: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, n_groups]`` -> uint8 ``[N, ceil(n_groups*bits/8)]`` (padded with zeros).

    3-bit zero points are padded to a multiple of 8 groups (whole 3-byte words), so they take
    ``3 * ceil(n_groups / 8)`` bytes.
    """
    n, groups = zero_points.shape
    per_byte = 8 // bits if 8 % bits == 0 else 8
    pad = (-groups) % per_byte
    z = torch.nn.functional.pad(zero_points.to(torch.int32), (0, pad))
    return _pack_last(z, bits)


def unpack_zero_points(packed: torch.Tensor, bits: int, n_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`."""
    return _unpack_last(packed, bits, n_groups)


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int | None,
                  symmetric: bool) -> int:
    """Bytes a packed linear stores: codes + float32 scales (+ packed zero points).

    ``N * n_groups * group*bits/8 + 4 * N * n_groups (+ N * zp_bytes)``, with K zero-padded to
    whole groups, exactly what :func:`lowbit.passes.pack.pack_weight` produces.

    >>> packed_nbytes(576, 576, 4, 128, symmetric=False)   # 576 x (5*64 + 5*4 + 3) B
    197568
    """
    group = in_features if group_size is None else int(group_size)
    n_groups = -(-in_features // group)
    codes = n_groups * packed_group_bytes(group, bits)
    zp = 0
    if not symmetric:
        per_byte = 8 // bits if 8 % bits == 0 else 8
        zp = (-(-n_groups // per_byte) * per_byte) * bits // 8
    return out_features * (codes + 4 * n_groups + zp)
