"""Shared fixtures: seeded inputs, a tiny MLP built in code, tiny HF models, a pass runner.

Test modules are split by need: ``unit/`` and ``passes/`` use torch only, ``backends/``
imports optional runtimes (onnxruntime) and skips without them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.compiler.capture import capture
from lowbit.compiler.context import PassContext
from lowbit.compiler.manager import PassManager, ScheduledPass
from lowbit.compiler.passes import build_options
from lowbit.compiler.recipe import Recipe, schedule
from lowbit.plugins.manager import get_registry
from lowbit.testing import TINY_MODELS


class TinyMLP(nn.Module):
    """x [.., 64] -> fc1 (no bias) -> relu -> fc2 -> relu -> out: three linears, one head."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96, bias=False)
        self.fc2 = nn.Linear(96, 64)
        self.out = nn.Linear(64, 32)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP().eval()


@pytest.fixture
def mlp_input() -> torch.Tensor:
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mlp_captured(mlp, mlp_input):
    """A fresh capture of :class:`TinyMLP` (static shapes: inputs must be [2, 5, 64])."""
    return capture(mlp, example_inputs=(mlp_input,))


@pytest.fixture
def capture_tiny():
    """``capture_tiny("llama", **config_overrides)``: a fresh capture of a tiny HF model."""
    def make(name: str, **overrides):
        return capture(TINY_MODELS[name](**overrides))
    return make


@pytest.fixture(scope="session")
def registry():
    return get_registry()


@pytest.fixture
def run_passes(registry):
    """Run recipe steps (names, ``{name: options}`` or ``@graph_pass`` functions) on a graph.

    Returns the pass context; ``ctx`` may be given to continue an earlier run.
    """
    def run(graph, steps, *, calibration=(), instruments=(), ctx=None):
        ctx = ctx if ctx is not None else PassContext(calibration=list(calibration),
                                                      progress=False)
        scheduled = []
        for step in steps:
            if callable(step) and hasattr(step, "info"):
                scheduled.append(ScheduledPass(step.info, build_options(step.info, {})))
            else:
                scheduled += schedule(Recipe.from_dict({"passes": [step]}), registry)
        PassManager(scheduled, instruments, catalog=registry.passes.values()).run(graph, ctx)
        return ctx
    return run


@pytest.fixture
def assert_only_safe_files():
    """Check an artifact holds JSON, safetensors and ONNX: nothing a loader would unpickle."""
    def check(directory):
        for path in directory.rglob("*"):
            if not path.is_file() or "tokenizer" in path.relative_to(directory).parts:
                continue
            if path.name == "generate.py":      # a script for the user; no loader runs it
                continue
            assert path.suffix in {".json", ".safetensors", ".onnx"}, path.name
            head = path.read_bytes()[:2]
            assert head != b"PK", f"{path.name} is a zip (torch.save) archive"
            assert head[:1] != b"\x80", f"{path.name} is a pickle"
    return check
