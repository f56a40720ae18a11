"""ocs: greedy split plan, exactness on several architectures, structure, lowering, skips."""
from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.compiler.instruments import max_relative_error
from lowbit.passes.ocs import plan_split, split_channels
from lowbit.testing import random_ids, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2

CALIB = random_ids(4, 32, seed=3)
IDS = random_ids(2, 16, seed=5)


def test_plan_minimises_the_largest_range_for_its_budget():
    a = torch.tensor([9.0, 1.0, 4.0, 3.5, 0.5])
    for budget in range(0, 7):
        ways = plan_split(a, budget)
        assert int((ways - 1).sum()) == budget
        best = min(float((a / torch.tensor(c)).max())
                   for c in itertools.product(range(1, budget + 2), repeat=5)
                   if sum(c) - 5 == budget)
        assert float((a / ways).max()) == pytest.approx(best)


def test_threshold_stops_early():
    a = torch.tensor([8.0, 1.0, 1.0, 1.0, 1.0])
    ways = plan_split(a, budget=10, threshold=2.0)     # 8 / 4 = 2 <= 2 * median: stop
    assert ways.tolist() == [4, 1, 1, 1, 1]


def test_split_node_keeps_the_linear_function():
    x, w = torch.randn(3, 6), torch.randn(4, 6)
    ways = plan_split(x.abs().amax(0), 3)
    index = torch.repeat_interleave(torch.arange(6), ways - 1)
    keep = 1.0 / ways.float()
    xs = split_channels(x, index, keep, keep[index])
    assert xs.shape == (3, 9)
    torch.testing.assert_close(xs @ torch.cat([w, w[:, index]], 1).T, x @ w.T)
    assert xs.abs().amax() < x.abs().amax()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_opt, tiny_gpt2, tiny_bert],
                         ids=["llama", "qwen2", "opt", "gpt2", "bert"])
def test_exact_on_every_architecture(make):
    cm = lowbit.compile(make(), recipe={"passes": [{"ocs": {"expand_ratio": 0.1}}]},
                        target="torch", calibration=CALIB, progress=False)
    record = cm.manifest["passes"][0]
    assert record["verification"]["max_rel_error"] <= 1e-5
    assert record["metrics"]["total_channels_added"] > 0 and record["transformed"]


def test_one_split_per_value_and_weights_grow_by_the_channels_added():
    recipe = {"passes": [{"ocs": {"expand_ratio": 0.1}}, {"rtn": {"bits": 8}}, "pack"]}
    cm = lowbit.compile(tiny_llama(), recipe=recipe, target="torch", calibration=CALIB,
                        progress=False)
    m = cm.manifest["passes"][0]["metrics"]
    qkv = "model.layers.0.self_attn.q_proj + model.layers.0.self_attn.k_proj + " \
          "model.layers.0.self_attn.v_proj"
    assert m["channels_added"][qkv] == round(0.1 * 64)          # hidden 64
    assert m["channels_added"]["model.layers.0.mlp.down_proj"] == round(0.1 * 128)
    assert all(r >= 1.0 for r in m["range_shrink"].values())
    assert len(m["channels_added"]) == 8                         # 4 values x 2 layers
    skipped = {r["target"]: r["reason"] for r in cm.manifest["passes"][0]["skipped"]}
    assert skipped["lm_head"].startswith("output head kept in float")   # left alone
    layers = cm.manifest["layers"]
    assert layers["model.layers.0.self_attn.k_proj"]["in_features"] == 64 + 6
    assert layers["model.layers.0.mlp.down_proj"]["in_features"] == 128 + 13


def test_int8_activations_after_splitting_lower_on_onnxruntime():
    pytest.importorskip("onnxruntime")
    recipe = {"passes": [{"ocs": {"expand_ratio": 0.1}},
                         {"rtn": {"bits": 8, "group_size": None, "symmetric": True}},
                         "act_quant", "pack"]}
    outs = {t: lowbit.compile(tiny_llama(), recipe=recipe, target=t, calibration=CALIB,
                              progress=False)(IDS) for t in ("torch", "onnxruntime")}
    assert max_relative_error(outs["torch"], outs["onnxruntime"]) <= 1e-4


def test_nothing_to_split_is_recorded_with_the_reason():
    cm = lowbit.compile(tiny_llama(), recipe={"passes": [{"ocs": {"threshold": 1e6}}]},
                        target="torch", calibration=CALIB, progress=False)
    record = cm.manifest["passes"][0]
    assert record["transformed"] == 0
    reasons = {r["target"]: r["reason"] for r in record["skipped"]}
    assert reasons["model.layers.1.mlp.down_proj"] == "no channel above the threshold to split"


def test_bad_options_are_rejected():
    with pytest.raises(lowbit.RecipeError, match="expand_ratio"):
        lowbit.compile(tiny_llama(), recipe={"passes": [{"ocs": {"expand_ratio": 2}}]},
                       target="torch", calibration=CALIB, progress=False)
