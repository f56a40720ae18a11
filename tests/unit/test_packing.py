"""Bit packing: exact round trips and the byte layout MatMulNBits reads."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.numerics.packing import (pack_codes, pack_zero_points, packed_group_bytes,
                                     unpack_codes, unpack_zero_points)

BITS = [2, 3, 4, 8]


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, shape, generator=g).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
def test_codes_round_trip_is_exact(bits):
    codes = _codes((5, 3, 64), bits, seed=bits)
    # every code value occurs, so a lost high bit would show
    assert int(codes.max()) == 2 ** bits - 1 and int(codes.min()) == 0
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_groups", [1, 5, 8])
def test_zero_points_round_trip_is_exact(bits, n_groups):
    zp = _codes((7, n_groups), bits, seed=10 * bits + n_groups)
    packed = pack_zero_points(zp, bits)
    assert packed.dtype == torch.uint8 and packed.shape[0] == 7
    assert packed.shape[1] * 8 >= n_groups * bits
    assert torch.equal(unpack_zero_points(packed, bits, n_groups), zp)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n_groups", [1, 5, 8])
def test_zero_points_take_the_documented_bytes(bits, n_groups):
    packed = pack_zero_points(torch.zeros(3, n_groups, dtype=torch.uint8), bits)
    assert packed.shape == (3, math.ceil(n_groups * bits / 8))


def test_four_bit_low_nibble_holds_the_even_k():
    codes = torch.tensor([[[0x1, 0x2, 0x3, 0x4, 0xF, 0x0]]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[[0x21, 0x43, 0x0F]]]


def test_four_bit_zero_points_pack_low_nibble_first_and_pad_with_zero():
    zp = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_zero_points(zp, 4).tolist() == [[0x21, 0x03]]


def test_two_bit_layout_puts_earlier_k_in_lower_bits():
    codes = torch.tensor([[[1, 2, 3, 0, 3, 3, 0, 1]]], dtype=torch.uint8)
    # byte = c0 | c1 << 2 | c2 << 4 | c3 << 6
    assert pack_codes(codes, 2).tolist() == [[[1 | 2 << 2 | 3 << 4, 3 | 3 << 2 | 1 << 6]]]


def test_three_bit_codes_form_a_little_endian_bit_stream():
    values = [1, 2, 3, 4, 5, 6, 7, 5]
    packed = pack_codes(torch.tensor([[values]], dtype=torch.uint8), 3)
    stream = sum(v << (3 * i) for i, v in enumerate(values))
    assert bytes(packed.flatten().tolist()) == stream.to_bytes(3, "little")


def test_eight_bit_packing_is_the_identity():
    codes = _codes((2, 2, 16), 8, seed=3)
    assert torch.equal(pack_codes(codes, 8), codes)


def test_group_that_is_not_whole_bytes_is_rejected():
    assert packed_group_bytes(32, 3) == 12
    with pytest.raises(ValueError, match="whole number of bytes"):
        pack_codes(torch.zeros(1, 1, 4, dtype=torch.uint8), 3)
