"""TIR expressions reading one code / zero point out of the packed layout (shared by targets)."""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from lowbit.backends.tvm.kernels import QuantLinearSpec


def _i32(v):
    return T.Cast("int32", v)


def code_in_unit(spec: QuantLinearSpec, w, n, g, c, u):
    """Code ``c`` of packed unit ``u`` of group ``g`` of row ``n`` (int32).

    Unit = one byte holding ``8/bits`` codes (low bits first), or for 3 bits one little-endian
    24-bit word of 8 codes at bytes ``3u .. 3u+2``.
    """
    mask = (1 << spec.bits) - 1
    if spec.bits == 8:
        return _i32(w[n, g, u])
    if spec.bits == 3:
        word = (_i32(w[n, g, u * 3]) | T.shift_left(_i32(w[n, g, u * 3 + 1]), 8)
                | T.shift_left(_i32(w[n, g, u * 3 + 2]), 16))
        return T.shift_right(word, c * 3) & mask
    return T.shift_right(_i32(w[n, g, u]), c * spec.bits) & mask


def code_at(spec: QuantLinearSpec, w, n, k):
    """Code of weight ``(n, k)`` in natural input order (k < padded K)."""
    g, j = k // spec.group_size, k % spec.group_size
    per = spec.codes_per_unit
    return code_in_unit(spec, w, n, g, j % per, j // per)


def zero_point(spec: QuantLinearSpec, zp, n, g):
    """Zero point of group ``g`` of row ``n`` (int32): packed like the codes, along groups."""
    if not spec.has_zero_points:
        return tirx.const(1 << (spec.bits - 1), "int32")
    mask = (1 << spec.bits) - 1
    if spec.bits == 8:
        return _i32(zp[n, g])
    if spec.bits == 3:
        u = g // 8
        word = (_i32(zp[n, u * 3]) | T.shift_left(_i32(zp[n, u * 3 + 1]), 8)
                | T.shift_left(_i32(zp[n, u * 3 + 2]), 16))
        return T.shift_right(word, (g % 8) * 3) & mask
    per = 8 // spec.bits
    return T.shift_right(_i32(zp[n, g // per]), (g % per) * spec.bits) & mask


def quantize_value(spec: QuantLinearSpec, v, scale):
    """``clamp(round_half_even(v / s), -qmax, qmax)`` (lowbit.numerics.quant semantics)."""
    qmax = float(2 ** (spec.act_bits - 1) - 1)
    return T.max(T.min(T.nearbyint(v / scale), T.float32(qmax)), T.float32(-qmax))


def row_scale(spec: QuantLinearSpec, absmax):
    """``max(absmax, 1e-8) [* clip] / qmax`` in float32, in lowbit.ops' operation order."""
    qmax = float(2 ** (spec.act_bits - 1) - 1)
    a = T.max(absmax, T.float32(1e-8))
    if spec.act_clip != 1.0:
        a = a * T.float32(spec.act_clip)
    return a / T.float32(qmax)
