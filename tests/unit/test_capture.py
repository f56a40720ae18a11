"""capture(): nn.Module / HF model -> FxGraph, with dynamic batch and sequence."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.compiler.capture import capture
from lowbit.testing import TINY_MODELS, assert_numerically_equal, random_ids

# linears per model, counted from the architectures: per layer x 2 layers (+ output head)
EXPECTED_LINEARS = {
    "llama": 2 * 7 + 1,     # q k v o gate up down, lm_head
    "qwen2": 2 * 7 + 1,
    "opt": 2 * 6 + 1,       # q k v out_proj fc1 fc2, lm_head
    "gpt2": 2 * 4 + 1,      # Conv1D c_attn c_proj c_fc c_proj, lm_head
    "bert": 2 * 6,          # query key value attention.output.dense intermediate output
}
FIRST_LINEAR = {
    "llama": "model.layers.0.self_attn.q_proj",
    "qwen2": "model.layers.0.self_attn.q_proj",
    "opt": "model.decoder.layers.0.self_attn.q_proj",
    "gpt2": "transformer.h.0.attn.c_attn",
    "bert": "encoder.layer.0.attention.self.query",
}
# (in_features, out_features) of a few layers; gpt2's Conv1D weights are stored [in, out]
SPOT_DIMS = {
    "llama": {"model.layers.1.self_attn.k_proj": (64, 32), "model.layers.1.mlp.down_proj":
              (128, 64), "lm_head": (64, 128)},
    "qwen2": {"model.layers.0.self_attn.v_proj": (64, 32), "lm_head": (64, 128)},
    "opt": {"model.decoder.layers.1.fc2": (128, 64), "lm_head": (64, 128)},
    "gpt2": {"transformer.h.0.attn.c_attn": (64, 192), "transformer.h.1.mlp.c_fc": (64, 256),
             "transformer.h.1.mlp.c_proj": (256, 64), "lm_head": (64, 128)},
    "bert": {"encoder.layer.1.intermediate.dense": (64, 128),
             "encoder.layer.1.output.dense": (128, 64)},
}


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def tiny(request):
    """(name, eager model, captured) once per tiny architecture."""
    model = TINY_MODELS[request.param]()
    return request.param, model, capture(model)


def _eager(name, model, inputs):
    with torch.no_grad():
        if name == "bert":
            return model(**inputs).last_hidden_state
        return model(input_ids=inputs["input_ids"], use_cache=False).logits


def test_graph_matches_eager_at_a_new_batch_and_sequence_length(tiny):
    name, model, cap = tiny
    assert cap.example_inputs["input_ids"].shape == (2, 16)
    ids = random_ids(batch=3, seq=23, seed=5)
    inputs = {"input_ids": ids}
    if name == "bert":
        assert cap.kind == "encoder" and cap.input_names == ["input_ids", "attention_mask"]
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0  # right padding in one row
        inputs["attention_mask"] = mask
    else:
        assert cap.kind == "causal_lm" and cap.input_names == ["input_ids"]
    (out,) = cap.graph.run(inputs)
    expected = _eager(name, model, inputs)
    assert out.shape == expected.shape
    assert_numerically_equal(out, expected, rtol=1e-5)


def test_linears_found_with_model_level_names(tiny):
    name, model, cap = tiny
    sites = cap.graph.linears()
    assert len(sites) == EXPECTED_LINEARS[name]
    assert sites[0].name == FIRST_LINEAR[name]
    assert len({s.node for s in sites}) == len(sites)
    dims = {s.name: (s.in_features, s.out_features) for s in sites}
    assert {k: dims.get(k) for k in SPOT_DIMS[name]} == SPOT_DIMS[name]
    for s in sites:
        module = model.get_submodule(s.name)
        weight = cap.graph.linear_weight(s)
        assert weight.shape == (s.out_features, s.in_features)
        # HF Conv1D (gpt2) stores [in, out]; the graph always hands out [out, in]
        expected = module.weight.T if type(module).__name__ == "Conv1D" else module.weight
        assert torch.equal(weight, expected.detach()), s.name


def test_plain_module_with_example_inputs(mlp, mlp_input):
    cap = capture(mlp, example_inputs=(mlp_input,))
    assert cap.kind == "module" and cap.input_names == ["x"]
    assert [s.name for s in cap.graph.linears()] == ["fc1", "fc2", "out"]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(9))
    (out,) = cap.graph.run({"x": x})
    assert_numerically_equal(out, mlp(x), rtol=1e-6)


def test_plain_module_accepts_named_example_inputs(mlp, mlp_input):
    cap = capture(mlp, example_inputs={"x": mlp_input})
    assert cap.input_names == ["x"]
    assert_numerically_equal(cap.graph.run([mlp_input])[0], mlp(mlp_input), rtol=1e-6)


def test_plain_module_needs_example_inputs(mlp):
    with pytest.raises(lowbit.UsageError, match="example_inputs"):
        capture(mlp)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not exportable
            return x * 2
        return x - 1


def test_unexportable_module_raises_capture_error_with_advice():
    with pytest.raises(lowbit.CaptureError) as info:
        capture(_DataDependent(), example_inputs=(torch.randn(2, 3),))
    msg = str(info.value)
    assert "_DataDependent" in msg
    assert "What to try" in msg and "torch.cond" in msg
    assert info.value.__cause__ is not None


def test_missing_path_raises_capture_error(tmp_path):
    with pytest.raises(lowbit.CaptureError, match="not found"):
        capture(str(tmp_path / "no-such-model"))


def test_missing_onnx_file_is_a_capture_error(tmp_path):
    # .onnx files go through the ONNX adapter (tests/backends/test_onnx_capture.py)
    with pytest.raises(lowbit.CaptureError, match="ONNX model .* not found"):
        capture(str(tmp_path / "model.onnx"))


def test_non_module_is_a_usage_error():
    with pytest.raises(lowbit.UsageError, match="cannot capture a int"):
        capture(42)
