"""TVM kernels vs lowbit's reference (``lowbit.ops``: dequantize_packed + matmul).

Every width (2, 3, 4, 8), group sizes including a zero-padded partial last group, symmetric
and asymmetric grids, bias, dynamic activation quantization; decode (M <= 4, the GEMV path)
and prefill (M > 4, the GEMM path; M not a multiple of the 6-row micro-tile). Each case is a
small Relax module built exactly as the model lowering emits it.
"""
from __future__ import annotations

import pytest
import torch

import lowbit.ops as ops
from lowbit.numerics.packing import pack_codes, pack_zero_points
from lowbit.numerics.quant import quantize_weight

tvm = pytest.importorskip("tvm")
from lowbit.backends.tvm.kernels import HadamardSpec, QuantLinearSpec  # noqa: E402
from lowbit.backends.tvm.testing import compile_hadamard, compile_quant_linear  # noqa: E402

# (bits, group): K = 72 with group 32 leaves a partial last group of 8
CASES = [(2, 16), (2, 32), (3, 24), (3, 32), (4, 32), (4, 128), (8, 32), (8, 72)]


def _packed(n, k, bits, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, bits, group, symmetric)
    zp = None if symmetric else pack_zero_points(qw.zero_points, bits)
    return pack_codes(qw.codes, bits), qw.scales, zp, qw.group_size


def _check(n, k, bits, group, symmetric, rows, act_bits=0, bias=False, act_clip=1.0,
           tol=2e-6):
    qweight, scales, zp, group = _packed(n, k, bits, group, symmetric)
    b = torch.randn(n) if bias else None
    spec = QuantLinearSpec(n, k, bits, group, zp is not None, bias, act_bits, act_clip)
    kernel = compile_quant_linear(spec)
    for m in rows:
        x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m))
        ref = ops.quant_linear(x, qweight, scales, zp, b, k, bits, group, act_bits, act_clip)
        got = kernel(x, qweight, scales, zp, b)
        assert got.shape == ref.shape
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < tol, f"{spec.name} M={2 * m}: relative error {err:.2e}"


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_linear_matches_reference(bits, group, symmetric):
    # 2*1 and 2*2 rows take the GEMV path, 2*7 = 14 the GEMM path with a 2-row tail
    _check(48, 72, bits, group, symmetric, rows=(1, 2, 7))


def test_partial_last_group_at_smollm2_width():
    """K = 576 with group 128: five groups, the last one half zero padding."""
    _check(64, 576, 4, 128, False, rows=(1, 9), bias=True)


@pytest.mark.parametrize("act_bits,bits,group", [(8, 8, 96), (8, 4, 32), (4, 4, 32)])
def test_activation_quantization_matches_reference(act_bits, bits, group):
    # (8, 8, per-channel) is lowbit.ops' exact-integer path; the others fake-quantize x
    _check(64, 96, bits, group, True, rows=(1, 5), act_bits=act_bits)


def test_activation_clip_matches_reference():
    _check(32, 64, 4, 32, False, rows=(3,), act_bits=8, act_clip=0.9)


@pytest.mark.parametrize("left,right", [(1, 64), (4, 16), (12, 8)])
def test_hadamard_matches_reference(left, right):
    from lowbit.numerics.hadamard import hadamard_matrix
    a, b = hadamard_matrix(left).float(), hadamard_matrix(right).float()
    x = torch.randn(3, 5, left * right)
    kernel = compile_hadamard(HadamardSpec(left, right))
    ref = ops.hadamard(x, a, b)
    assert torch.allclose(kernel(x, a, b), ref, rtol=1e-5, atol=1e-5)


def test_unsupported_width_is_refused():
    with pytest.raises(ValueError, match="bits 2, 3, 4, 8"):
        QuantLinearSpec(8, 32, 5, 32, True, False)


def _cuda_device() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:                        # noqa: BLE001 - no driver: no device
        return False


CUDA = {"kind": "cuda", "arch": "sm_90"}


@pytest.mark.parametrize("bits,group", CASES)
def test_cuda_quant_linear_builds_for_every_width(bits, group):
    """CUDA code generation (no GPU needed) for every width: weight-only layers get lowbit's
    row-dispatched decode kernel next to dlight's matmul, the rest dlight's alone."""
    from lowbit.backends.tvm import _cuda
    from lowbit.backends.tvm.inspect import cuda_kernels
    from lowbit.backends.tvm.testing import quant_linear_library
    k = 2 * group + 8 * (bits != 3)            # a partial last group where the width allows
    spec = QuantLinearSpec(48, k, bits, group, True, False)

    class Built:
        library = quant_linear_library(spec, CUDA)
    names = {kern["name"] for kern in cuda_kernels(Built)}
    gemv = f"lowbit_quant_linear_{spec.name}_gemv_kernel"
    assert (gemv in names) == _cuda.handles(spec), names
    assert any(n.startswith(f"lowbit_quant_linear_{spec.name}") for n in names)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_device(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_quant_linear_matches_reference(bits, group, symmetric):
    """On a GPU (built for its architecture): both sides of the row dispatch (M = 2 and 18
    rows) against lowbit.ops."""
    qweight, scales, zp, group = _packed(48, 2 * group, bits, group, symmetric)
    spec = QuantLinearSpec(48, 2 * group, bits, group, zp is not None, False)
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    kernel = compile_quant_linear(spec, target={"kind": "cuda", "arch": arch})
    for m in (1, 9):
        x = torch.randn(2, m, 2 * group, generator=torch.Generator().manual_seed(m))
        ref = ops.quant_linear(x, qweight, scales, zp, None, 2 * group, bits, group, 0)
        err = float((kernel(x, qweight, scales, zp) - ref).abs().max() / ref.abs().max())
        assert err < 2e-6, f"{spec.name} M={2 * m}: relative error {err:.2e}"
