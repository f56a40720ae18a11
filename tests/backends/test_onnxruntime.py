"""ONNX Runtime backend: agreement with the torch reference, the .onnx it writes, what ORT runs.

ONNX export of a tiny model takes ~10-15 s on 2 cores, so compiled models are shared per
module: six tiny-transformer exports (four Llama recipes/levels, w8a8, one BERT) and two
of a small MLP.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import lowbit
from lowbit.compiler.instruments import max_relative_error
from lowbit.numerics.packing import pack_codes
from lowbit.numerics.quant import quantize_weight
from lowbit.testing import random_ids, tiny_bert, tiny_llama

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the exporter's translation of lowbit.quant_linear
from lowbit.backends.onnxruntime import optimized_op_types  # noqa: E402

MSFT = "com.microsoft"
# intermediate_size 192 with block 128: down_proj has K = 192, a partial last block
LLAMA = dict(intermediate_size=192)


def _llama():
    return tiny_llama(**LLAMA)


@pytest.fixture(scope="module")
def compiled():
    """``compiled(recipe, target, **backend_options)``, each compiled once per module."""
    cache = {}

    def get(recipe, target, **options):
        key = (recipe, target, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = lowbit.compile(_llama(), recipe=recipe, target=target,
                                        backend_options=options, progress=False)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    """``saved(recipe, **options)``: path of the saved model.onnx."""
    paths = {}

    def get(recipe, **options):
        key = (recipe, tuple(sorted(options.items())))
        if key not in paths:
            directory = tmp_path_factory.mktemp(recipe) / "artifact"
            compiled(recipe, "onnxruntime", **options).save(directory)
            paths[key] = directory / "model.onnx"
        return paths[key]
    return get


def _ids():
    # neither the export example's batch (2) nor its sequence length (16)
    return [random_ids(3, 23, seed=21), random_ids(1, 5, seed=22)]


def _initializers(model):
    return {i.name: i for i in model.graph.initializer}


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _optimized_model(path, directory):
    """The graph ONNX Runtime runs after all its rewrites (ORT_ENABLE_ALL)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(directory / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(directory / "optimized.onnx"))


# -- agreement with the torch backend -----------------------------------------------------

@pytest.mark.parametrize("recipe,options,rtol", [
    ("w4a16-rtn", {}, 1e-4),                         # default accuracy_level 0: float math
    ("w8a16", {}, 1e-4),
    ("w4a16-rtn", {"accuracy_level": 4}, 3e-2),      # int8-quantized activations inside ORT
    ("w8a16", {"accuracy_level": 4}, 3e-2),
], ids=["w4a16-level0", "w8a16-level0", "w4a16-level4", "w8a16-level4"])
def test_weight_only_matches_torch_backend(compiled, saved, recipe, options, rtol):
    cm = compiled(recipe, "onnxruntime", **options)
    reference = compiled(recipe, "torch")
    for ids in _ids():
        err = max_relative_error(reference(ids), cm(ids))
        assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e} at {tuple(ids.shape)}"
    model = onnx.load(str(saved(recipe, **options)))
    levels = {_attrs(n)["accuracy_level"] for n in model.graph.node
              if n.op_type == "MatMulNBits"}
    assert levels == {options.get("accuracy_level", 0)}


def test_w8a8_matches_exact_integer_torch_reference(compiled):
    cm, reference = compiled("w8a8", "onnxruntime"), compiled("w8a8", "torch")
    for ids in _ids():
        # both sides run exact integer matmuls on identically quantized activations
        assert max_relative_error(reference(ids), cm(ids)) <= 1e-4


# -- the saved model --------------------------------------------------------------------------

def test_w4a16_onnx_holds_matmulnbits_in_the_packed_layout(saved):
    model = onnx.load(str(saved("w4a16-rtn")))
    inits = _initializers(model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # 14 linears; the lowering merges q/k/v and gate/up (same input, rows concatenated):
    # 4 nodes per layer holding every row of the 14
    assert len(nbits) == 8 and all(n.domain == MSFT for n in nbits)
    rows = sum(m.out_features for name, m in _llama().named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    assert sum(_attrs(n)["N"] for n in nbits) == rows
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                   for n in model.graph.node)
    for n in nbits:
        a = _attrs(n)
        k, nn, block = a["K"], a["N"], a["block_size"]
        assert (a["bits"], block) == (4, 128)
        blocks = math.ceil(k / block)
        assert list(inits[n.input[1]].dims) == [nn, blocks, block // 2]       # B
        assert list(inits[n.input[2]].dims) == [nn, blocks]                   # scales
        assert list(inits[n.input[3]].dims) == [nn, math.ceil(blocks * 4 / 8)]  # zero points
    # down_proj: K = 192 is 1.5 blocks; its bytes are exactly the quantized, packed weight
    down = [n for n in nbits if _attrs(n)["K"] == 192]
    assert len(down) == 2
    model_weights = _llama()
    for layer, n in enumerate(down):
        w = model_weights.model.layers[layer].mlp.down_proj.weight.detach()
        packed = pack_codes(quantize_weight(w, 4, 128, symmetric=False).codes, 4)
        assert list(packed.shape) == [64, 2, 64]
        stored = onnx.numpy_helper.to_array(inits[n.input[1]])
        assert np.array_equal(stored, packed.numpy()), f"layer {layer} down_proj bytes differ"


@pytest.mark.parametrize("recipe", ["w8a8-rtn", "w8a8"])
def test_w8a8_onnx_uses_matmulinteger(saved, recipe):
    model = onnx.load(str(saved(recipe)))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] == 14 and ops["MatMulNBits"] == 0


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8"])
def test_saved_onnx_runs_in_a_plain_inference_session(compiled, saved, recipe):
    session = ort.InferenceSession(str(saved(recipe)), providers=["CPUExecutionProvider"])
    cm = compiled(recipe, "onnxruntime")
    cache = cm.cache   # causal LMs compile in cache form: the cache inputs follow input_ids
    # ... and the fused attention's count of valid cache positions
    assert [i.name for i in session.get_inputs()] == ["input_ids", *cache.input_names,
                                                      "cache_length"]
    assert [o.name for o in session.get_outputs()] == ["logits", *cache.output_names]
    for ids in _ids():
        empty = {k: v.numpy() for k, v in cache.empty(ids.shape[0]).items()}
        logits, *present = session.run(None, {"input_ids": ids.numpy(), **empty,
                                              "cache_length": np.array([0])})
        assert logits.shape == (*ids.shape, 128)
        assert [p.shape[2] for p in present] == [ids.shape[1]] * len(present)
        assert max_relative_error(cm(ids), torch.from_numpy(logits)) <= 1e-6


# -- what ONNX Runtime actually runs ---------------------------------------------------------

@pytest.mark.parametrize("recipe,ours,nodes", [("w4a16-rtn", "MatMulNBits", 8),
                                               ("w8a8-rtn", "MatMulInteger", 14)])
def test_ort_keeps_our_quantized_matmuls(saved, recipe, ours, nodes, tmp_path):
    # 14 quantized linears; the int4 ones merged to 8 nodes by the lowering (q/k/v, gate/up)
    ops = optimized_op_types(saved(recipe))
    assert ops[ours] == nodes
    assert ops["DynamicQuantizeMatMul"] == 0 and ops["MatMulIntegerToFloat"] == 0
    other = {"MatMulNBits", "MatMulInteger"} - {ours}
    assert all(ops[o] == 0 for o in other)
    # the only float matmul with a constant weight left is the output head [64 -> 128]
    model = _optimized_model(saved(recipe), tmp_path)
    inits = _initializers(model)
    const_matmuls = [[list(inits[i].dims) for i in n.input if i in inits]
                     for n in model.graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")
                     and any(i in inits for i in n.input)]
    assert const_matmuls == [[[64, 128]]]


# -- save / load --------------------------------------------------------------------------------

def test_save_load_round_trip_is_identical(compiled, tmp_path, assert_only_safe_files):
    cm = compiled("w4a16-rtn", "onnxruntime")
    target = cm.save(tmp_path / "artifact")
    # generate.py: the standalone decoding loop shipped with a causal LM (test_ort_kv_cache)
    assert sorted(p.name for p in target.iterdir()) == ["generate.py", "manifest.json",
                                                        "model.onnx"]
    assert_only_safe_files(target)
    loaded = lowbit.load(target)
    assert loaded.backend == "onnxruntime"
    assert {"recipe", "layers", "versions", "figures"} <= set(loaded.manifest)
    assert loaded.manifest["figures"]["artifact_bytes"] == (target / "model.onnx").stat().st_size
    for ids in _ids():
        assert torch.equal(loaded(ids), cm(ids))


# -- encoders, options and errors --------------------------------------------------------------

def test_encoder_with_attention_mask_matches_torch_backend():
    recipe = {"name": "w4-g32", "passes": [{"rtn": {"bits": 4, "group_size": 32}}, "pack"]}
    cms = {t: lowbit.compile(tiny_bert(), recipe=recipe, target=t, progress=False)
           for t in ("onnxruntime", "torch")}
    ids = random_ids(2, 21, seed=23)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    out = cms["onnxruntime"](ids, mask)
    assert out.shape == (2, 21, 64)
    assert max_relative_error(cms["torch"](ids, mask), out) <= 1e-4
    # a padded position changes nothing for the others
    assert max_relative_error(cms["torch"](ids[:1, :15]), cms["onnxruntime"](ids[:1, :15])) \
        <= 1e-4


def test_unknown_backend_option_lists_the_valid_ones(mlp, mlp_input):
    with pytest.raises(lowbit.UsageError) as info:
        lowbit.compile(mlp, recipe="w8a16", target="onnxruntime", example_inputs=(mlp_input,),
                       backend_options={"acuracy_level": 0}, progress=False)
    assert "['acuracy_level']" in str(info.value)
    assert "['accuracy_level', 'fuse', 'threads']" in str(info.value)


def test_int8_activations_with_a_padded_single_group(mlp, mlp_input):
    # group_size 128 > K = 64 / 96: one padded group per row, which the int8 path must drop
    recipe = {"passes": [{"rtn": {"bits": 8, "group_size": 128, "symmetric": True}},
                         "act_quant", "pack"]}
    cms = {t: lowbit.compile(mlp, recipe=recipe, target=t, example_inputs=(mlp_input,),
                             progress=False) for t in ("onnxruntime", "torch")}
    assert max_relative_error(cms["torch"](mlp_input), cms["onnxruntime"](mlp_input)) <= 1e-4


def test_relower_reuses_the_torch_compile(mlp, mlp_input):
    ref = lowbit.compile(mlp, recipe="w8a16", target="torch", example_inputs=(mlp_input,),
                         progress=False)
    cm = lowbit.relower(ref, "onnxruntime", {"threads": 1})
    assert cm.backend == "onnxruntime" and cm.manifest["backend_options"] == {"threads": 1}
    assert cm.manifest["layers"] == ref.manifest["layers"]       # the same quantized weights
    assert cm.figures["backend_max_rel_error_vs_torch"] <= 1e-4
    assert max_relative_error(ref(mlp_input), cm(mlp_input)) <= 1e-4
    with pytest.raises(lowbit.UsageError, match="target='torch'"):
        lowbit.relower(cm, "torch")                              # ORT holds no FX graph


def test_4_bit_weights_with_activations_need_a_matmulnbits_block(mlp, mlp_input):
    # no integer kernel for W4 x A8: the weight-only kernel must take the per-channel block
    recipe = {"passes": [{"rtn": {"bits": 4, "group_size": None, "symmetric": True}},
                         "act_quant", "pack"]}
    with pytest.raises(lowbit.LoweringError,
                       match=r"layer 'fc2'.*MatMulNBits.*bits=4, group_size=96.*target='torch'"):
        lowbit.compile(mlp, recipe=recipe, target="onnxruntime", example_inputs=(mlp_input,),
                       progress=False)


@pytest.mark.parametrize("act_bits,weights,clip,sym", [
    (4, {"bits": 4, "group_size": 32}, 0.9, True),
    (8, {"bits": 4, "group_size": 32}, 1.0, True),
    (4, {"bits": 3, "group_size": 32}, 1.0, True),
    (8, {"bits": 8, "group_size": None, "symmetric": True}, 0.8, True),
    (4, {"bits": 4, "group_size": 32}, 0.9, False),       # asymmetric activations
    (4, {"bits": 4, "group_size": 32}, 1.0, False)])
def test_fake_quantized_activations_agree_with_the_reference(act_bits, weights, clip, sym):
    recipe = {"passes": [{"rtn": weights},
                         {"act_quant": {"bits": act_bits, "integer_only": False,
                                        "clip_ratio": clip, "symmetric": sym}}, "pack"]}
    ids = random_ids(2, 16, seed=5)
    cms = {t: lowbit.compile(tiny_llama(), recipe=recipe, target=t, progress=False)
           for t in ("onnxruntime", "torch")}
    layers = [q for q in cms["torch"].manifest["layers"].values() if "bits" in q]
    assert {(q["act_bits"], q["act_clip"], q["act_symmetric"]) for q in layers} == {
        (act_bits, clip, sym)}
    ref, ort = cms["torch"](ids), cms["onnxruntime"](ids)
    # a per-token scale differing in the last ulp may flip one rounding: allow a few
    # elements, but the bulk must agree to float rounding
    assert max_relative_error(ref, ort) <= 2e-3
    fp = lowbit.compile(tiny_llama(), recipe="fp32", target="torch", progress=False)(ids)
    assert max_relative_error(fp, ref) > 10 * max_relative_error(ref, ort)   # it quantizes


def test_block_size_matmulnbits_cannot_run_is_refused_naming_the_layer():
    # per-channel 8-bit weights without int8 activations: block = K = 96, not a valid block
    recipe = {"passes": [{"rtn": {"bits": 8, "group_size": None, "symmetric": True}}, "pack"]}
    with pytest.raises(lowbit.LoweringError, match=r"layer 'model\.layers\.0\..*MatMulNBits"):
        lowbit.compile(tiny_llama(hidden_size=96), recipe=recipe, target="onnxruntime",
                       progress=False)


@pytest.mark.parametrize("target", ["torch", "onnxruntime"])
def test_asymmetric_activations_survive_save_and_load(target, tmp_path):
    recipe = {"passes": [{"rtn": {"bits": 4, "group_size": 32}},
                         {"act_quant": {"bits": 4, "integer_only": False, "symmetric": False}},
                         "pack"]}
    cm = lowbit.compile(tiny_llama(), recipe=recipe, target=target, progress=False)
    again = lowbit.load(cm.save(tmp_path / "asym"))
    ids = random_ids(2, 12, seed=3)
    assert torch.equal(again(ids), cm(ids))
    assert {q["act_symmetric"] for q in again.manifest["layers"].values()} == {False}
    assert "W4A4 g32 asym, activations asym" in again.report()
