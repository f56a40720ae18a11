"""lowbit.compile / CompiledModel.save / lowbit.load on the torch backend."""
from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.numerics.quant import dequantize_weight, quantize_weight, sqnr_db
from lowbit.testing import assert_numerically_equal, random_ids, tiny_llama


@pytest.fixture(scope="module")
def w8a16():
    """tiny Llama compiled with the w8a16 preset for the torch backend (and its source)."""
    model = tiny_llama()
    return model, lowbit.compile(model, recipe="w8a16", target="torch", progress=False)


def _fake_quantized_llama(layers: dict, bits: int, group_size, symmetric: bool):
    model = tiny_llama()
    with torch.no_grad():
        for name in layers:
            linear = model.get_submodule(name)
            qw = quantize_weight(linear.weight, bits, group_size, symmetric)
            linear.weight.copy_(dequantize_weight(qw))
    return model


def test_compile_end_to_end_matches_the_fake_quantized_model(w8a16):
    model, cm = w8a16
    assert cm.backend == "torch" and cm.kind == "causal_lm"
    layers = cm.manifest["layers"]
    assert len(layers) == 14 and "lm_head" not in layers
    assert layers["model.layers.0.mlp.down_proj"] == {
        "bits": 8, "group_size": 128, "act_bits": 0, "act_clip": 1.0, "symmetric": True,
        "in_features": 128, "out_features": 64, "act_symmetric": True}
    ids = random_ids(2, 23, seed=11)
    logits = cm(ids)
    assert logits.shape == (2, 23, 128)
    reference = _fake_quantized_llama(layers, 8, 128, True)
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        float_logits = model(input_ids=ids, use_cache=False).logits
    assert_numerically_equal(logits, expected, rtol=1e-5)
    # 8-bit weights: close to the float model (weight SQNR ~45 dB), but not identical
    assert 35 < sqnr_db(float_logits, logits) < 60


def test_manifest_records_recipe_passes_and_figures(w8a16):
    _, cm = w8a16
    m = cm.manifest
    assert m["recipe"]["name"] == "w8a16"
    assert [p["pass"] for p in m["recipe"]["passes"]] == ["rtn", "pack"]
    assert [p["name"] for p in m["passes"]] == ["rtn", "pack"]
    rtn = m["passes"][0]
    assert rtn["transformed"] == 14 and rtn["skipped"][0]["target"] == "lm_head"
    assert m["passes"][1]["verification"]["output_sqnr_db"] > 35
    assert m["figures"]["backend_max_rel_error_vs_torch"] == 0.0
    assert m["figures"]["artifact_bytes"] == cm.nbytes > 0
    assert {"python", "torch", "lowbit"} <= set(m["versions"])


@pytest.mark.parametrize("target,backend", [("llvm", "tvm-llvm"), ("tvm", "tvm-llvm"),
                                            ("cuda", "tvm-cuda")])
def test_tvm_targets_resolve_to_the_tvm_backends(target, backend):
    from lowbit.compiler.pipeline import resolve_backend
    from lowbit.plugins.manager import get_registry
    assert resolve_backend(target, get_registry()).name == backend


def test_unknown_target_lists_the_targets(mlp, mlp_input):
    with pytest.raises(lowbit.UsageError) as info:
        lowbit.compile(mlp, recipe="w8a16", target="tpu", example_inputs=(mlp_input,))
    assert "unknown target 'tpu'" in str(info.value)
    assert "'onnxruntime'" in str(info.value) and "'torch'" in str(info.value)


def test_plain_module_compiles(mlp, mlp_input):
    recipe = {"name": "w8-channel", "passes": [
        {"rtn": {"bits": 8, "group_size": None, "symmetric": True}}, "pack"]}
    cm = lowbit.compile(mlp, recipe=recipe, target="torch", example_inputs=(mlp_input,),
                        progress=False)
    assert cm.kind == "module" and sorted(cm.manifest["layers"]) == ["fc1", "fc2"]
    with torch.no_grad():
        assert 35 < sqnr_db(mlp(mlp_input), cm(mlp_input)) < 60


def test_calibration_data_reaches_the_calibrate_pass(mlp, mlp_input):
    recipe = {"passes": ["calibrate", {"rtn": {"bits": 8}}, "pack"]}
    batches = [{"x": mlp_input}, {"x": 2 * mlp_input}]
    cm = lowbit.compile(mlp, recipe=recipe, target="torch", example_inputs=(mlp_input,),
                        calibration=batches, progress=False)
    calibrate = cm.manifest["passes"][0]
    assert calibrate["name"] == "calibrate" and calibrate["metrics"]["batches"] == 2


def test_missing_calibration_without_tokenizer_is_a_data_error(mlp, mlp_input):
    with pytest.raises(lowbit.DataError, match="needs calibration data"):
        lowbit.compile(mlp, recipe={"passes": ["calibrate", "rtn", "pack"]}, target="torch",
                       example_inputs=(mlp_input,), progress=False)


# -- save / load ----------------------------------------------------------------------------

def test_save_load_round_trip_is_identical(w8a16, tmp_path, assert_only_safe_files):
    _, cm = w8a16
    target = cm.save(tmp_path / "artifact")
    files = sorted(p.name for p in target.iterdir())
    assert "manifest.json" in files and "weights.safetensors" in files
    assert_only_safe_files(target)
    manifest = json.loads((target / "manifest.json").read_text())
    assert {"recipe", "layers", "versions", "figures", "passes"} <= set(manifest)
    assert sorted(manifest["files"] + ["manifest.json"]) == files
    assert manifest["figures"]["artifact_bytes"] == sum(
        (target / f).stat().st_size for f in manifest["files"])
    loaded = lowbit.load(target)
    assert loaded.backend == "torch" and loaded.manifest["layers"] == cm.manifest["layers"]
    for ids in (random_ids(2, 23, seed=12), random_ids(1, 5, seed=13)):
        assert torch.equal(loaded(ids), cm(ids))


def test_save_refuses_a_non_empty_directory_and_leaves_it_alone(w8a16, tmp_path):
    _, cm = w8a16
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(lowbit.UsageError, match="not empty.*overwrite=True"):
        cm.save(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    cm.save(target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "manifest.json").exists()


def test_failed_save_leaves_no_temporary_directory(w8a16, tmp_path, monkeypatch):
    _, cm = w8a16
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text("{}")

    def broken_save(directory):
        (directory / "half-written.bin").write_bytes(b"\0" * 10)
        raise OSError("disk full")
    monkeypatch.setattr(cm.executable, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cm.save(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        cm.save(tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no .new.* / .old.* left
    assert (tmp_path / "old" / "manifest.json").read_text() == "{}"  # old artifact intact


def test_load_rejects_a_directory_that_is_not_an_artifact(tmp_path):
    with pytest.raises(lowbit.UsageError, match="not a lowbit artifact"):
        lowbit.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(lowbit.UsageError, match="format 99 is not supported"):
        lowbit.load(tmp_path)


def test_fp32_preset_is_the_uncompressed_baseline():
    from lowbit.testing import random_ids, tiny_llama
    model = tiny_llama()
    cm = lowbit.compile(model, recipe="fp32", target="torch", progress=False)
    ids = random_ids(1, 20)
    assert cm.manifest["layers"] == {} and cm.manifest["passes"] == []
    assert torch.equal(cm(ids), model(input_ids=ids).logits.detach())
