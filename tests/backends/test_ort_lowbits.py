"""int2 (MatMulNBits) and int3 (standard-op dequantization) weights on ONNX Runtime."""
from __future__ import annotations

import pytest

import lowbit
from lowbit.testing import random_ids, tiny_llama

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("bits,group,symmetric", [(3, 32, False), (3, 64, True),
                                                  (2, 16, False), (2, 32, True)])
def test_low_widths_agree_with_the_torch_reference(tmp_path, bits, group, symmetric):
    recipe = {"passes": [{"rtn": {"bits": bits, "group_size": group, "symmetric": symmetric}},
                         "pack"]}
    cm = lowbit.compile(tiny_llama(), recipe=recipe, target="onnxruntime", progress=False)
    assert cm.figures["backend_max_rel_error_vs_torch"] < 1e-5
    cm.save(tmp_path / "a")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.node}
    assert ("MatMulNBits" in ops) == (bits == 2)
    again = lowbit.load(tmp_path / "a")
    ids = random_ids(1, 7, seed=2)
    assert float((again(ids) - cm(ids)).abs().max()) == 0.0


def test_three_bit_partial_last_group():
    """K = 48 with group 32: the second group is half padding (codes = zero point)."""
    model = tiny_llama(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2)
    recipe = {"passes": [{"rtn": {"bits": 3, "group_size": 32}}, "pack"]}
    cm = lowbit.compile(model, recipe=recipe, target="onnxruntime", progress=False)
    assert cm.figures["backend_max_rel_error_vs_torch"] < 1e-5
