"""TVM backend end to end: a tiny random Llama through the llvm target (logits vs the torch
reference backend, KV-cache decoding, save/load without re-compiling) and CUDA code
generation (no GPU needed).

Compiling a tiny model takes ~10-30 s on 2 cores; each is compiled once per module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.compiler.instruments import max_relative_error
from lowbit.testing import assert_numerically_equal, incremental_logits, random_ids, tiny_llama

pytest.importorskip("tvm")

# intermediate_size 192 with group 128: down_proj has K = 192, a partial last group
LLAMA = dict(intermediate_size=192)
# float32 kernels, summation order differs from torch's: a few ulps of the logits' range
TOL = 1e-5
# accuracy="int8" decode: int8 activations per group (measured 4.5e-3 .. 6.7e-3 on these
# logits, 5 seeds)
INT8_TOL = 2e-2


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(recipe, target="llvm", kv_cache=None):
        if (recipe, target, kv_cache) not in cache:
            opts = {"mcpu": "native", "threads": 2} if target == "llvm" else {}
            cache[recipe, target, kv_cache] = lowbit.compile(
                tiny_llama(**LLAMA), recipe=recipe, target=target, backend_options=opts,
                progress=False, kv_cache=kv_cache)
        return cache[recipe, target, kv_cache]
    return get


def _reference(recipe):
    return lowbit.compile(tiny_llama(**LLAMA), recipe=recipe, target="torch", progress=False)


@pytest.mark.parametrize("recipe,kv_cache", [("w4a16-rtn", True), ("w8a8", False)])
def test_llvm_logits_match_torch_reference(compiled, recipe, kv_cache):
    """w4a16-rtn: group-128 int4 with a partial group, in cache form (the default); w8a8:
    rotation (online Hadamard) and per-token int8 activations, in the no-cache form. New
    batch and sequence sizes, decode-sized too."""
    cm, ref = compiled(recipe, kv_cache=kv_cache), _reference(recipe)
    assert (cm.cache is not None) == kv_cache
    assert cm.backend == "tvm-llvm"
    assert cm.figures["backend_max_rel_error_vs_torch"] < TOL
    for ids in (random_ids(3, 23, seed=21), random_ids(1, 2, seed=22)):
        assert max_relative_error(ref(ids), cm(ids)) < TOL


def test_llvm_artifact_loads_without_recompiling(compiled, tmp_path):
    cm = compiled("w4a16-rtn", kv_cache=True)
    path = cm.save(tmp_path / "artifact")
    files = set(json.loads((path / "manifest.json").read_text())["files"])
    assert {"model.so", "params.safetensors", "tvm.json"} <= files
    loaded = lowbit.load(path)
    assert loaded.backend == "tvm-llvm"
    ids = random_ids(2, 9, seed=5)
    assert torch.equal(loaded(ids), cm(ids))


def test_artifact_runs_on_a_runtime_only_tvm(compiled, tmp_path):
    """A deployment needs only TVM's runtime library (no ``libtvm_compiler``, 250 MB):
    ``TVM_USE_RUNTIME_LIB=1`` loads the runtime alone, as a runtime-only install would."""
    cm = compiled("w4a16-rtn", kv_cache=True)
    path = cm.save(tmp_path / "artifact")
    ids = random_ids(2, 9, seed=6)
    torch.save({"ids": ids, "logits": cm(ids)}, tmp_path / "expected.pt")
    script = f"""
import torch, tvm.base, lowbit
assert tvm.base._RUNTIME_ONLY
e = torch.load({str(tmp_path / "expected.pt")!r})
assert torch.equal(lowbit.load({str(path)!r})(e["ids"]), e["logits"])
print("ok")
"""
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_llvm_kv_cache_decode_equals_the_full_sequence(compiled):
    """Prefill from an empty cache (past = 0), then a chunk and single-token decode steps."""
    cm = compiled("w4a16-rtn", kv_cache=True)
    assert cm.cache is not None
    # TVM 0.27's FuseTIR fails on the cache form: built unfused, and the manifest says so
    assert cm.executable.lowering["operator_fusion"] is False
    ids = random_ids(2, 12, seed=9)
    chunked = incremental_logits(cm.executable, cm.cache, ids, (7, 9, 10, 11, 12))
    assert_numerically_equal(chunked, cm(ids), rtol=TOL,
                             what="tvm-llvm incremental logits")


def test_llvm_greedy_generation_matches_torch_reference(compiled):
    ids = random_ids(1, 6, seed=4)
    got = compiled("w4a16-rtn", kv_cache=True).generate(ids, max_new_tokens=8,
                                                         stop_at_eos=False)
    want = _reference("w4a16-rtn").generate(ids, max_new_tokens=8, stop_at_eos=False)
    assert got.ids.shape == (1, 14)
    assert torch.equal(got.ids, want.ids)


def test_llvm_int8_accuracy_is_opt_in_and_reported():
    """``accuracy="int8"``: decode-sized calls (M <= 4 rows) round activations to int8 per
    group -- approximate, the option kept in the manifest; prefill-sized calls run the float
    GEMM and stay exact."""
    cm = lowbit.compile(tiny_llama(**LLAMA), recipe="w4a16-rtn", target="llvm", progress=False,
                        backend_options={"mcpu": "native", "threads": 2, "accuracy": "int8"})
    ref = _reference("w4a16-rtn")
    assert cm.manifest["backend_options"]["accuracy"] == "int8"
    decode = random_ids(1, 2, seed=22)
    err = max_relative_error(ref(decode), cm(decode))
    assert TOL < err < INT8_TOL
    assert max_relative_error(ref(random_ids(3, 23, seed=21)), cm(random_ids(3, 23, seed=21))) \
        < TOL


def test_unknown_option_is_refused():
    with pytest.raises(lowbit.UsageError,
                       match="valid: \\['accuracy', 'mcpu', 'target', 'threads'\\]"):
        lowbit.compile(tiny_llama(**LLAMA), recipe="w4a16-rtn", target="llvm",
                       backend_options={"mcpus": "native"}, progress=False)


def test_asymmetric_activations_are_refused_naming_the_layer():
    recipe = {"passes": [{"rtn": {"bits": 4, "group_size": 32}},
                         {"act_quant": {"bits": 4, "integer_only": False, "symmetric": False}},
                         "pack"]}
    cm = lowbit.compile(tiny_llama(**LLAMA), recipe=recipe, target="torch", kv_cache=False,
                        progress=False)
    with pytest.raises(lowbit.LoweringError,
                       match=r"layer 'model\.layers\.0\..*asymmetric.*Fix: act_quant"):
        lowbit.relower(cm, "llvm")


def _has_cuda_device() -> bool:
    import tvm
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:                        # noqa: BLE001 - no driver: no device
        return False


def test_cuda_codegen_without_a_gpu(compiled, tmp_path):
    """``target='cuda'`` builds a library with CUDA kernels here, with no device and no
    nvcc: the library carries CUDA C source, compiled for the GPU it is loaded on."""
    cm = compiled("w4a16-rtn", "cuda")
    assert cm.backend == "tvm-cuda"
    assert "cuda" in cm.executable.imported_kinds()
    if not _has_cuda_device():          # built and kept, compared with torch where it runs
        assert cm.figures["backend_verification"].startswith("skipped: tvm-cuda cannot run")
    from lowbit.backends.tvm.inspect import cuda_kernels
    names = [k["name"] for k in cuda_kernels(cm.executable)]
    assert any(n.startswith("lowbit_quant_linear_") for n in names)
    path = cm.save(tmp_path / "cuda")
    assert (path / "model.so").stat().st_size > 0


@pytest.mark.skipif(_has_cuda_device(), reason="checks the machine without a CUDA driver")
def test_cuda_artifact_without_a_driver_is_a_clear_error(compiled, tmp_path):
    path = compiled("w4a16-rtn", "cuda").save(tmp_path / "cuda")
    with pytest.raises(lowbit.UsageError, match=r"libcuda\.so\.1.*Fix:|Fix:.*libcuda\.so\.1"):
        lowbit.load(path)


def test_cuda_weight_only_linears_dispatch_on_rows(compiled):
    """Weight-only layers get lowbit's warp-per-column kernel for m <= 8 rows and dlight's
    tiled matmul above (a Relax If on the row count); on an H200 the first took 3.3-5.8 us at
    SmolLM2's decode shapes where dlight's padded matmul took 25-72 us."""
    from lowbit.backends.tvm import _cuda
    from lowbit.backends.tvm.inspect import cuda_kernels
    cm = compiled("w4a16-rtn", "cuda")
    names = {k["name"] for k in cuda_kernels(cm.executable)}
    linears = {n.removesuffix("_gemv_kernel") for n in names if n.endswith("_gemv_kernel")}
    assert linears and all(f"{n}_gemm_kernel" in names for n in linears)
    assert _cuda.MT == 8


def test_cuda_kernels_use_no_fast_math_power(compiled):
    """RMSNorm's ``x.pow(2)`` is multiplied out: TVM compiles CUDA with ``--use_fast_math``,
    under which ``powf(x, 2)`` is ``exp2(2 log2 x)``, NaN for negative x (on an H200 every
    logit was NaN before)."""
    from lowbit.backends.tvm.inspect import cuda_source
    src = cuda_source(compiled("w4a16-rtn", "cuda").executable)
    assert "__global__" in src and "powf" not in src and "pow(" not in src


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_device(), reason="no CUDA GPU on this machine")
def test_cuda_library_runs_on_a_gpu(compiled):
    """On a GPU the CUDA artifact's logits match the torch reference (float32 kernels)."""
    cm, ref = compiled("w4a16-rtn", "cuda"), _reference("w4a16-rtn")
    for ids in (random_ids(2, 17, seed=31), random_ids(1, 1, seed=32)):
        assert max_relative_error(ref(ids), cm(ids)) < 1e-4


def test_llvm_cache_form_artifact_loads_and_generates(compiled, tmp_path):
    cm = compiled("w4a16-rtn", kv_cache=True)
    loaded = lowbit.load(cm.save(tmp_path / "cached"))
    assert cm.cache is not None and loaded.cache == cm.cache
    assert loaded.executable.lowering == cm.executable.lowering
    ids = random_ids(2, 9, seed=5)
    assert torch.equal(loaded.generate(ids, 4, stop_at_eos=False).ids,
                       cm.generate(ids, 4, stop_at_eos=False).ids)
