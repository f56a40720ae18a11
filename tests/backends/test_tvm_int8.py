"""The int8-dot decode GEMV (llvm option ``accuracy="int8"``, :mod:`lowbit.backends.tvm._cpu_int8`).

Numerics: against the dequantized weight times the int8-rounded activation
(:func:`quantize_activation_per_group`) in float64 -- the same math, so agreement to float32
rounding -- and against the float reference within the stated int8 rounding bound. Decode
row counts 1 and 3 (GEMV path); 7 rows take the float GEMM, exact as before.
"""
from __future__ import annotations

import pytest
import torch

import lowbit.ops as ops
from lowbit.errors import UsageError
from lowbit.numerics.packing import pack_codes, pack_zero_points
from lowbit.numerics.quant import (dequantize_weight, quantize_activation_per_group,
                                   quantize_weight, sqnr_db)

tvm = pytest.importorskip("tvm")
from lowbit.backends.tvm import (TRANSFORM_PARAMS, _check_accuracy, _options,  # noqa: E402
                                  has_vnni, resolve_target)
from lowbit.backends.tvm.kernels import INT8_DOT_ROWS, QuantLinearSpec  # noqa: E402
from lowbit.backends.tvm.testing import compile_quant_linear, quant_linear_library  # noqa: E402

# same math as the reference, summed in another order in float32
EXACT_TOL = 1e-5
# int8 activations per group: measured 44-46 dB SQNR vs the float GEMV on Gaussian data
# (max error ~6e-3 of max|y|, as ORT level 4); int4-rounded activations would give ~20 dB
MIN_SQNR_DB = 40.0


def _case(n, k, bits, group, symmetric, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, group, symmetric)
    zp = None if symmetric else pack_zero_points(qw.zero_points, bits)
    b = torch.randn(n, generator=g) if bias else None
    spec = QuantLinearSpec(n, k, bits, group, zp is not None, bias)
    return qw, (pack_codes(qw.codes, bits), qw.scales, zp, b), spec


def _int8_reference(x, qw, bias):
    """Dequantized weight x int8-rounded activation, float64."""
    xq, s = quantize_activation_per_group(x, qw.group_size)
    xr = (xq * s[..., None]).flatten(-2)[..., : qw.in_features].double()
    y = xr @ dequantize_weight(qw, torch.float64).T
    return y + bias.double() if bias is not None else y


def _rel(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


# (n, k, bits, group, symmetric, bias): 16- and 32-byte vectors, 1..4 vectors per group,
# K = 576 with group 128 (last group half padding), K = 200 with group 64 (8 of 64 real);
# N = 48 and 40: blocks of 8 rows over 6 and 5 tasks
CASES = [(64, 256, 4, 32, False, False), (48, 200, 4, 64, False, True),
         (64, 576, 4, 128, False, False), (32, 512, 4, 128, True, True),
         (40, 1024, 4, 256, False, False), (64, 256, 2, 64, False, False),
         (32, 576, 2, 128, True, False)]


# the int8 products: AVX2 everywhere; AVX512-VNNI only runs where this CPU has it
DOT_PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not has_vnni(resolve_target("llvm", {"mcpu": "native"})), reason="CPU without AVX512-VNNI"))]


@pytest.mark.parametrize("vnni", DOT_PATHS, ids=["avx2", "vnni"])
@pytest.mark.parametrize("n,k,bits,group,symmetric,bias", CASES)
def test_int8_gemv_matches_int8_reference(n, k, bits, group, symmetric, bias, vnni):
    qw, args, spec = _case(n, k, bits, group, symmetric, bias)
    kernel = compile_quant_linear(spec, accuracy="int8", vnni=vnni)
    for m in (1, 3):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(10 + m))
        got = kernel(x, *args)
        assert _rel(got, _int8_reference(x, qw, args[3])) < EXACT_TOL, f"{spec.name} M={m}"
        ref = ops.quant_linear(x, *args, k, bits, qw.group_size, 0)
        assert sqnr_db(ref, got) > MIN_SQNR_DB, f"{spec.name} M={m}"


def _asm(library) -> str:
    asm, todo = [], [library.mod]
    while todo:
        mod = todo.pop()
        if mod.kind == "llvm":
            asm.append(mod.inspect_source("asm"))
        todo.extend(mod.imports)
    return "\n".join(asm)


@pytest.mark.parametrize("mcpu,vnni", [("x86-64-v3", False), ("znver3", False),
                                       ("znver4", True), ("sapphirerapids", True)])
def test_int8_gemv_picks_the_targets_int8_dot_products(mcpu, vnni):
    """Built for a CPU (code generation only, whatever this host is): AVX512-VNNI's
    ``vpdpbusd`` where the target has it, else AVX2's ``vpmaddubsw`` + ``vpmaddwd``; the four
    rows of a block reduced together (``vphaddd``)."""
    _, _, spec = _case(64, 576, 4, 128, False, False)
    target = {"kind": "llvm", "mcpu": mcpu}
    assert has_vnni(target) == vnni
    asm = _asm(quant_linear_library(spec, target, accuracy="int8"))
    assert ("vpdpbusd" in asm) == vnni
    assert ("vpmaddubsw" in asm and "vpmaddwd" in asm) == (not vnni)
    assert "vphaddd" in asm


def test_scale_prepack_runs_once_at_load_not_per_call():
    """The int8 GEMV's prepack reads weights only: the build lifts it out of ``main``."""
    _, _, spec = _case(64, 576, 4, 128, False, False)
    kernel = compile_quant_linear(spec, accuracy="int8")
    assert kernel.vm.module.implements_function(TRANSFORM_PARAMS)
    assert "prepack" in _asm(kernel.library)
    # main takes x, the packed weight, scales, zero points (prefill reads them) and the
    # prepacked factors
    assert kernel.vm._get_function_arity("main") == 5


def test_prefill_rows_stay_exact_with_int8_accuracy():
    """M > 4 runs the float GEMM: same numerics as accuracy='float'."""
    qw, args, spec = _case(48, 576, 4, 128, False, True)
    x = torch.randn(7, 576)
    ref = ops.quant_linear(x, *args, 576, 4, 128, 0)
    assert _rel(compile_quant_linear(spec, accuracy="int8")(x, *args), ref.double()) < 2e-6


@pytest.mark.parametrize("bits,group,act_bits", [(3, 32, 0), (8, 32, 0), (4, 32, 8),
                                                 (4, 16, 0)])
def test_other_linears_keep_float_numerics(bits, group, act_bits):
    """int3 / int8 codes, model-requested int8 activations, 8-byte groups: the float path."""
    spec = QuantLinearSpec(32, 96, bits, group, True, False, act_bits, accuracy="int8")
    assert not spec.int8_dot
    qw, args, _ = _case(32, 96, bits, group, False, False)
    x = torch.randn(2, 96)
    ref = ops.quant_linear(x, *args, 96, bits, group, act_bits)
    kernel = compile_quant_linear(QuantLinearSpec(32, 96, bits, group, True, False, act_bits),
                                  accuracy="int8")
    assert _rel(kernel(x, *args), ref.double()) < 2e-6


def test_rows_not_a_multiple_of_the_block_keep_float_numerics():
    """N = 36: not whole blocks of INT8_DOT_ROWS (8) rows -- the exact float path."""
    spec = QuantLinearSpec(36, 256, 4, 32, True, False, accuracy="int8")
    assert not spec.int8_dot and INT8_DOT_ROWS == 8
    qw, args, plain = _case(36, 256, 4, 32, False, False)
    x = torch.randn(1, 256)
    ref = ops.quant_linear(x, *args, 256, 4, 32, 0)
    assert _rel(compile_quant_linear(plain, accuracy="int8")(x, *args), ref.double()) < 2e-6


def test_unknown_accuracy_is_refused_with_valid_values():
    with pytest.raises(UsageError, match=r"accuracy='int4'.*\['float', 'int8'\]"):
        _options("llvm", {"accuracy": "int4"})
    with pytest.raises(UsageError, match="unknown tvm \\(cuda\\) option"):
        _options("cuda", {"accuracy": "int8"})
    with pytest.raises(ValueError, match="accuracy must be one of"):
        QuantLinearSpec(8, 32, 4, 32, True, False, accuracy="fp8")


def test_int8_accuracy_needs_avx2():
    _check_accuracy({"kind": "llvm", "mcpu": "x86-64-v3"}, "int8")
    _check_accuracy({"kind": "llvm", "mcpu": "x86-64"}, "float")
    with pytest.raises(UsageError, match="AVX2"):
        _check_accuracy({"kind": "llvm", "mcpu": "x86-64"}, "int8")
