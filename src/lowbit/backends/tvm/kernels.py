"""What a lowbit TIR kernel computes, independent of the target it is scheduled for.

A quantized linear reads the packed layout of :mod:`lowbit.numerics.packing` unchanged:
``qweight [N, n_groups, group*bits/8]`` (low bits first; 3 bits as 24-bit words of 8 codes),
``scales [N, n_groups]``, optional ``zero_points [N, ceil(n_groups*bits/8)]``, optional
``bias [N]``. With ``x`` the activation rows ``[M, K]`` and ``s_x`` a per-row scale
(1, or the dynamic per-token scale when ``act_bits`` is set)::

    y[m, n] = s_x[m] * sum_g s[n, g] * (sum_{k in g} x'[m, k] q[n, k] - z[n, g] sum_{k in g} x'[m, k])

where ``x' = x`` or ``x' = clamp(round(x / s_x), -qmax, qmax)`` (``lowbit.ops`` semantics:
``s_x = max(max|x|, 1e-8) * act_clip / qmax``, round half to even). Codes of the zero-padded
last group dequantize to 0 and meet zero activations, so every group is processed whole.

``accuracy="int8"`` (opt-in, CPU) replaces the float activations of the decode GEMV by int8
codes per weight group (:func:`lowbit.numerics.quant.quantize_activation_per_group`:
``x ~= xq_g * t_g``) and the dot products by integer ones::

    y[m, n] = sum_g s[n, g] * t[m, g] * (sum_{k in g} xq[m, k] q[n, k] - z[n, g] sum_{k in g} xq[m, k])

(ONNX Runtime's ``accuracy_level=4``). It applies where :attr:`QuantLinearSpec.int8_dot`
holds; elsewhere (int3 / int8 weights, ``act_bits`` set, M > 4, N not a multiple of
:data:`INT8_DOT_ROWS`) the kernels stay float.

Example:
    >>> spec = QuantLinearSpec(out_features=576, in_features=576, bits=4, group_size=128,
    ...                        has_zero_points=True, has_bias=False)
    >>> spec.n_groups, spec.padded_in_features, spec.codes_per_unit, spec.units_per_group
    (5, 640, 2, 64)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuantLinearSpec", "HadamardSpec", "ACCURACIES", "INT8_DOT_ROWS"]

ACCURACIES = ("float", "int8")
#: weight rows the int8-dot GEMV reduces together (the lanes of its float accumulator)
INT8_DOT_ROWS = 8


@dataclass(frozen=True)
class QuantLinearSpec:
    """Static shape and numerics of one ``lowbit::quant_linear`` node (M stays symbolic)."""
    out_features: int
    in_features: int
    bits: int
    group_size: int
    has_zero_points: bool
    has_bias: bool
    act_bits: int = 0
    act_clip: float = 1.0
    accuracy: str = "float"

    def __post_init__(self):
        if self.accuracy not in ACCURACIES:
            raise ValueError(f"accuracy must be one of {ACCURACIES}; got {self.accuracy!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"TVM kernels support bits 2, 3, 4, 8; got {self.bits}")
        if self.group_size * self.bits % 8 or (self.bits == 3 and self.group_size % 8):
            raise ValueError(f"group of {self.group_size} x {self.bits}-bit codes is not a "
                             "whole number of packed units")

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def padded_in_features(self) -> int:
        return self.n_groups * self.group_size

    @property
    def codes_per_unit(self) -> int:
        """Codes in one packed unit: a byte, or a 3-byte word for 3 bits."""
        return 8 if self.bits == 3 else 8 // self.bits

    @property
    def unit_bytes(self) -> int:
        return 3 if self.bits == 3 else 1

    @property
    def units_per_group(self) -> int:
        return self.group_size // self.codes_per_unit

    @property
    def group_bytes(self) -> int:
        return self.group_size * self.bits // 8

    @property
    def zero_point_bytes(self) -> int:
        per_byte = 8 // self.bits if 8 % self.bits == 0 else 8
        return -(-self.n_groups // per_byte) * per_byte * self.bits // 8

    @property
    def int8_dot(self) -> bool:
        """Whether the decode GEMV runs on int8 dot products (``accuracy="int8"``, float
        activations, 2- or 4-bit codes, whole 16-byte vectors of packed codes per group, a
        multiple of :data:`INT8_DOT_ROWS` output features)."""
        return (self.accuracy == "int8" and self.act_bits == 0 and self.bits in (2, 4)
                and self.group_bytes % 16 == 0 and self.out_features % INT8_DOT_ROWS == 0)

    @property
    def name(self) -> str:
        """A readable, unique kernel-name stem for this spec."""
        clip = "" if self.act_clip == 1.0 else f"c{round(self.act_clip * 1000)}"
        return (f"n{self.out_features}_k{self.in_features}_w{self.bits}g{self.group_size}"
                f"{'z' if self.has_zero_points else 's'}{'b' if self.has_bias else ''}"
                f"{f'_a{self.act_bits}{clip}' if self.act_bits else ''}"
                f"{'_i8dot' if self.int8_dot else ''}")


@dataclass(frozen=True)
class HadamardSpec:
    """``y = A^T X B`` on rows of length ``left * right`` (``lowbit::hadamard``)."""
    left: int
    right: int

    @property
    def name(self) -> str:
        return f"{self.left}x{self.right}"
