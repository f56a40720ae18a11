"""onnxscript translations of the lowbit ops for ``torch.onnx.export`` (ONNX Runtime backend).

Lowering of ``lowbit.quant_linear``:

* float activations -> ``MatMulNBits`` reading the packed bytes as they are (the packed
  layout *is* MatMulNBits' layout: ``B [N, K/block, block*bits/8]``, low bits first);
* int8 per-token activations (per-channel 8-bit weights) -> per-token symmetric int8
  quantization with standard ops, ``MatMulInteger`` on uint8 x uint8 (both codes offset by
  a zero point of 128), then the two scales. Measured on this AVX2 CPU (K=576, N=1536, one
  token): u8 x u8 42 us and exact; int8 x uint8 700 us (no fast kernel); uint8 x int8 42 us
  but its int16 pair sums saturate (``vpmaddubsw``) on full-range weights.
  The weight is stored ``[N, K]`` and transposed by a ``Transpose`` that ONNX Runtime
  constant-folds when the session is created.

``lowbit.hadamard`` -> two small ``MatMul``s on the last dimension viewed as ``[a, b]``.
"""
from __future__ import annotations

import numpy as np

from lowbit.compiler._onnx_quant import ScriptOps, fake_quant

__all__ = ["register_msft_schemas", "quant_linear_translation", "hadamard_translation"]


def register_msft_schemas() -> None:
    import onnx
    from onnx.defs import OpSchema
    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    fp = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"),
                fp("zero_points", "T3", param_option=opt)],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                    for a in ("K", "N", "bits", "block_size", "accuracy_level")])
    onnx.defs.register_schema(schema)


def quant_linear_translation(accuracy_level: int):
    import onnxscript
    from onnxscript import opset18 as op
    register_msft_schemas()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def quant_linear(x, qweight, scales, zero_points, bias, in_features, bits, group_size,
                     act_bits, act_clip=1.0, act_symmetric=True):
        n = qweight.shape[0]
        integer = act_bits == 8 and bits == 8 and scales.shape[1] == 1
        if act_bits and not integer:
            # no integer kernel for this pairing: quantize-dequantize x per token (as the
            # torch reference does), then the weight-only kernel
            x = fake_quant(ScriptOps(op), x, act_bits, act_clip, act_symmetric)
        if not integer and bits == 3:
            y = op.MatMul(x, op.Transpose(_dequantize_3bit(op, qweight, scales, zero_points,
                                                           in_features, group_size),
                                          perm=[1, 0]))
        elif not integer:
            args = [x, qweight, scales] + ([zero_points] if zero_points is not None else [])
            y = msft.MatMulNBits(*args, K=in_features, N=n, bits=bits, block_size=group_size,
                                 accuracy_level=accuracy_level)
        else:
            absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
            a = op.Max(absmax, op.Constant(value_float=1e-8))
            if act_clip != 1.0:
                a = op.Mul(a, op.Constant(value_float=float(act_clip)))
            s = op.Div(a, op.Constant(value_float=127.0))
            q = op.Clip(op.Round(op.Div(x, s)), op.Constant(value_float=-127.0),
                        op.Constant(value_float=127.0))
            # uint8 codes with zero point 128 (= the int8 codes): MLAS's u8 x u8 kernel is
            # exact (16-bit products, no saturation) and ~17x faster at one token than the
            # int8-activation path, which has no AVX2 kernel (bench notes in the module doc)
            xq = op.Cast(op.Add(q, op.Constant(value_float=128.0)), to=2)   # uint8
            w = op.Reshape(qweight, op.Constant(value_ints=[n, -1]))
            if qweight.shape[1] * qweight.shape[2] != in_features:  # drop last-group padding
                w = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]),
                             op.Constant(value_ints=[1]))
            w = op.Transpose(w, perm=[1, 0])
            wzp = (op.Constant(value=_u8_scalar(128)) if zero_points is None
                   else op.Reshape(zero_points, op.Constant(value_ints=[n])))
            acc = _matmul_integer(op, xq, w, wzp)
            y = op.Mul(op.Mul(op.Cast(acc, to=1), s),
                       op.Reshape(scales, op.Constant(value_ints=[n])))
        if bias is not None:
            y = op.Add(y, bias)
        return y
    return quant_linear


def _unpack_3bit(op, packed, n_codes: int, lead):
    """uint8 bytes ``[..., 3m]`` of a 3-bit little-endian stream -> float codes ``[lead, n]``.

    Three bytes make one 24-bit word holding 8 codes (code j at bits 3j..3j+2); standard
    integer ops only: ``code_j = (word / 8^j) mod 8``.
    """
    words = op.Reshape(op.Cast(packed, to=6), op.Constant(value_ints=[-1, 3]))   # int32
    b0, b1, b2 = (op.Slice(words, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]),
                           op.Constant(value_ints=[1])) for i in range(3))
    word = op.Add(op.Add(b0, op.Mul(b1, op.Constant(value=_i32(256)))),
                  op.Mul(b2, op.Constant(value=_i32(65536))))
    div = op.Constant(value=_i32([8 ** j for j in range(8)]))
    codes = op.Mod(op.Div(word, div), op.Constant(value=_i32(8)))                  # [-1, 8]
    codes = op.Reshape(codes, op.Constant(value_ints=[lead, -1]))
    codes = op.Slice(codes, op.Constant(value_ints=[0]), op.Constant(value_ints=[n_codes]),
                     op.Constant(value_ints=[1]))
    return op.Cast(codes, to=1)


def _dequantize_3bit(op, qweight, scales, zero_points, in_features: int, group_size: int):
    """``W [N, K] = (q - z) * s`` from 3-bit packed bytes, in standard ops.

    Only initializers feed it, so ONNX Runtime folds it into a float32 weight when the session
    is created: the file keeps 3 bits per weight, memory and speed are those of float32.
    """
    n, n_groups = scales.shape[0], scales.shape[1]
    codes = op.Reshape(_unpack_3bit(op, qweight, n_groups * group_size, n),
                       op.Constant(value_ints=[n, n_groups, group_size]))
    if zero_points is None:
        z = op.Constant(value_float=4.0)
    else:
        z = op.Unsqueeze(_unpack_3bit(op, zero_points, n_groups, n),
                         op.Constant(value_ints=[2]))
    w = op.Mul(op.Sub(codes, z), op.Unsqueeze(scales, op.Constant(value_ints=[2])))
    w = op.Reshape(w, op.Constant(value_ints=[n, -1]))
    return op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]),
                    op.Constant(value_ints=[1]))


def _i32(values):
    import onnx
    return onnx.numpy_helper.from_array(np.array(values, dtype=np.int32))


def hadamard_translation():
    from onnxscript import opset18 as op

    def hadamard(x, left, right):
        """``y = A^T X B`` on the last dim viewed as ``[a, b]`` (two small MatMuls)."""
        a, b = left.shape[0], right.shape[0]
        rank = len(x.shape) if getattr(x, "shape", None) is not None else None
        if rank:
            # constant shapes (0 copies a leading dim): no Shape/Slice/Concat per call, which
            # at one token per step cost as much as the two MatMuls
            xr = op.Reshape(x, op.Constant(value_ints=[0] * (rank - 1) + [a, b]))
            y = op.MatMul(op.Transpose(left, perm=[1, 0]), op.MatMul(xr, right))
            return op.Reshape(y, op.Constant(value_ints=[0] * (rank - 1) + [a * b]))
        shape = op.Shape(x)
        lead = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
        xr = op.Reshape(x, op.Concat(lead, op.Constant(value_ints=[a, b]), axis=0))
        y = op.MatMul(op.Transpose(left, perm=[1, 0]), op.MatMul(xr, right))
        return op.Reshape(y, shape)
    return hadamard


def _u8_scalar(v: int):
    import onnx
    return onnx.numpy_helper.from_array(np.array(v, dtype=np.uint8))


def _matmul_integer(op, xq, w, wzp):
    return op.MatMulInteger(xq, w, op.Constant(value=_u8_scalar(128)), wzp)
