"""ONNX Runtime lowering of ``lowbit::hadamard`` (the rotate pass's online Hadamard).

One export of a rotated, 4-bit tiny Llama (one layer: an export costs ~10 s on 2 cores).
"""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.testing import random_ids, tiny_llama

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

RECIPE = {"passes": ["rotate", {"rtn": {"bits": 4, "group_size": 32}}, "pack"]}


def test_rotated_model_on_onnxruntime_matches_torch_and_round_trips(tmp_path):
    cm = lowbit.compile(tiny_llama(num_hidden_layers=1), recipe=RECIPE, target="onnxruntime",
                        progress=False)
    assert cm.manifest["passes"][0]["metrics"]["online_hadamard"]     # two inserted
    assert cm.figures["backend_max_rel_error_vs_torch"] < 1e-4
    cm.save(tmp_path / "a")
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx", "com.microsoft"}
    assert not domains, f"the online Hadamard must lower to standard ops, found {domains}"
    ids = random_ids(1, 9, seed=5)
    torch.testing.assert_close(lowbit.load(tmp_path / "a")(ids), cm(ids))
