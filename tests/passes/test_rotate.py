"""rotate: Hadamard constructions, stream discovery, exactness, lowering, skip reasons."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.compiler.instruments import NumericVerifier
from lowbit.numerics.hadamard import (construction, hadamard_factors, hadamard_matrix,
                                      random_hadamard)
from lowbit.passes._stream import find_stream
from lowbit.testing import random_ids

VERIFY = {"input_ids": random_ids(1, 24, seed=99)}


# -- numerics -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,kind", [(64, "sylvester(64)"), (12, "paley(12)"),
                                    (20, "paley(20)"), (576, "kronecker(72 x 8)"),
                                    (1536, "kronecker(12 x 128)"), (7, "block-diagonal")])
def test_hadamard_matrices_are_orthonormal(n, kind):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert construction(n).startswith(kind)
    if not kind.startswith("block"):     # a true Hadamard: every entry +-1/sqrt(n)
        torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
        a, b = hadamard_factors(n)
        torch.testing.assert_close(torch.kron(hadamard_matrix(a), hadamard_matrix(b)), h)


def test_random_hadamard_is_orthonormal_and_seeded():
    q = random_hadamard(576, seed=3)
    torch.testing.assert_close(q.T @ q, torch.eye(576, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_hadamard(576, seed=3))
    assert not torch.equal(q, random_hadamard(576, seed=4))


def test_online_op_equals_the_dense_product():
    a, b = hadamard_factors(1536)
    left, right = hadamard_matrix(a), hadamard_matrix(b)
    x = torch.randn(2, 3, 1536, dtype=torch.float64)
    y = torch.ops.lowbit.hadamard(x, left, right)
    torch.testing.assert_close(y, x @ torch.kron(left, right))


# -- structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stream_of_pre_norm_models(capture_tiny, arch):
    graph = capture_tiny(arch).graph
    plan = find_stream(graph)
    assert plan.problem is None and plan.width == 64
    assert len(plan.norms) == 5                        # 2 per layer + final
    tail = lambda sites: [s.name.rsplit(".", 1)[-1] for s in sites]  # noqa: E731
    assert tail(plan.norms[0].readers) == ["q_proj", "k_proj", "v_proj"]
    assert tail(plan.norms[1].readers) == ["gate_proj", "up_proj"]
    assert tail(plan.norms[-1].readers) == ["lm_head"]
    assert tail(plan.writers) == ["o_proj", "down_proj"] * 2
    assert all(n.gamma is not None for n in plan.norms)


@pytest.mark.parametrize("arch,reason", [("opt", "LayerNorm"), ("gpt2", "LayerNorm"),
                                         ("bert", "not a linear")])
def test_layernorm_and_post_norm_models_are_skipped_with_a_reason(capture_tiny, run_passes,
                                                                  arch, reason):
    graph = capture_tiny(arch).graph
    ctx = run_passes(graph, ["rotate"])
    record = ctx.records[0]
    assert record.changed is False and record.transformed == ()
    assert record.skipped[0][0] == "residual stream" and reason in record.skipped[0][1]


# -- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotation_is_exact_and_unties_the_tied_head(capture_tiny, run_passes, arch):
    graph = capture_tiny(arch).graph
    g = torch.Generator().manual_seed(0)
    for norm in find_stream(graph).norms:     # trained norms are not all-ones: fold real ones
        gamma = graph.attr(norm.gamma)
        graph.set_attr(norm.gamma, torch.rand(gamma.shape, generator=g) + 0.5)
    ctx = run_passes(graph, ["rotate"], instruments=[NumericVerifier(VERIFY, 1e-4)])
    record = ctx.records[0]
    assert record.verification["max_rel_error"] < 1e-5
    assert len(record.metrics["online_hadamard"]) == 4
    ops = [graph.op(n) for n in graph.nodes()]
    assert ops.count("hadamard") == 4
    emb = next(n for n in graph.nodes() if graph.op(n) == "embedding")
    head = next(s for s in graph.linears() if s.name == "lm_head")
    assert graph.node(graph.inputs(emb)[0]).target != head.weight   # untied
    gammas = [graph.attr(n.gamma) for n in find_stream(graph).norms]
    assert all(bool((g == 1).all()) for g in gammas)                  # folded away


def test_rotation_flattens_weight_outliers(capture_tiny, run_passes):
    """The point of rotating: a reader's input-channel outlier is spread over all channels."""
    graph = capture_tiny("llama").graph
    q = next(s for s in graph.linears() if s.name.endswith("0.self_attn.q_proj"))
    w = graph.linear_weight(q).clone()
    w[:, 5] *= 50
    graph.set_linear_weight(q, w)
    kurt = lambda t: float((t.abs().amax(0) / t.abs().amax(0).median()).max())  # noqa: E731
    before = kurt(graph.linear_weight(q))
    run_passes(graph, ["rotate"])
    assert kurt(graph.linear_weight(q)) < before / 5


def test_rotated_quantized_model_lowers_on_onnxruntime_and_round_trips(tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.testing import tiny_llama
    calib = random_ids(4, 32, seed=1)
    recipe = {"passes": ["rotate", {"gptq": {"bits": 4, "group_size": 32}}, "pack"]}
    cm = lowbit.compile(tiny_llama(), recipe=recipe, target="onnxruntime", calibration=calib,
                        progress=False)
    assert cm.figures["backend_max_rel_error_vs_torch"] < 1e-4
    cm.save(tmp_path / "a")
    ids = random_ids(1, 9, seed=5)
    torch.testing.assert_close(lowbit.load(tmp_path / "a")(ids), cm(ids))


def test_online_op_has_first_and_second_derivatives():
    """``mixed`` takes Hessian-vector products through rotated graphs."""
    x = torch.randn(2, 3, 128, dtype=torch.float64, requires_grad=True)
    left, right = hadamard_matrix(4), hadamard_matrix(32)
    fn = lambda t: torch.ops.lowbit.hadamard(t, left, right) ** 2  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))
