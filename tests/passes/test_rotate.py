"""rotate: Hadamard constructions, stream discovery, exactness, contract, skip reasons.

Captures are shared per module (an export costs seconds on 2 cores); tests that transform
work on ``graph.copy()``. ONNX Runtime lowering is tested in tests/backends/test_ort_hadamard.py.
"""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compiler.capture import capture
from lowbit.compiler.instruments import NumericVerifier
from lowbit.numerics.hadamard import (construction, hadamard_factors, hadamard_matrix,
                                      hadamard_transform, random_hadamard, random_signs)
from lowbit.passes._stream import find_stream
from lowbit.testing import TINY_MODELS, random_ids, tiny_llama

VERIFY = {"input_ids": random_ids(1, 24, seed=99)}
PRE_NORM = ["llama", "qwen2", "opt", "gpt2"]


@pytest.fixture(scope="module")
def captured():
    """``captured(arch)``: a tiny model captured once per module (copy before transforming)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = capture(TINY_MODELS[arch]())
        return cache[arch]
    return get


class TinyStream(nn.Module):
    """embedding -> norm -> up -> relu -> down -> add -> norm -> head, built in code."""

    def __init__(self, norm: type, post_norm: bool = False):
        super().__init__()
        self.emb, self.n1, self.n2 = nn.Embedding(32, 16), norm(16), norm(16)
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.post_norm = post_norm

    def forward(self, ids):
        x = self.emb(ids)
        if self.post_norm:          # BERT: the normalised value is the stream itself
            x = self.n1(x)
            return self.head(self.n2(x + self.down(torch.relu(self.up(x)))))
        x = x + self.down(torch.relu(self.up(self.n1(x))))
        return self.head(self.n2(x))


def _tiny_stream(norm, post_norm=False):
    torch.manual_seed(0)
    model = TinyStream(norm, post_norm).eval()
    for m in (model.n1, model.n2):
        if getattr(m, "weight", None) is None:
            continue
        nn.init.uniform_(m.weight, 0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return capture(model, example_inputs=(random_ids(2, 5, vocab=32),)).graph


def _tail(sites):
    return [s.name.rsplit(".", 1)[-1] for s in sites]


def _randomise_norms(graph, seed=0):
    """Trained norms are not ``gamma = 1, beta = 0``: give them values worth folding."""
    g = torch.Generator().manual_seed(seed)
    for norm in find_stream(graph).norms:
        for target in (norm.gamma, norm.beta):
            if target is not None:
                shape = graph.attr(target).shape
                graph.set_attr(target, torch.rand(shape, generator=g) + 0.5)


# -- numerics -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,kind", [
    (64, "sylvester(64)"), (12, "paley(12)"), (20, "paley(20)"), (28, "paley2(28)"),
    (36, "paley2(36)"), (96, "kronecker(12 x 8)"), (576, "kronecker(72 x 8)"),
    (1536, "kronecker(12 x 128)"), (896, "kronecker(224 x 4)"), (7, "block-diagonal [4, 2, 1]"),
    (100, "block-diagonal [96, 4]")])
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


@pytest.mark.parametrize("n", [1536, 576, 64, 7])
def test_factored_transforms_equal_the_dense_products(n):
    """The online op and the offline fold both apply ``H_a (x) H_b`` without forming it."""
    a, b = hadamard_factors(n)
    left, right = hadamard_matrix(a), hadamard_matrix(b)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.lowbit.hadamard(x, left, right),
                               x @ hadamard_matrix(n))
    signs = random_signs(n, seed=5)
    torch.testing.assert_close(hadamard_transform(x, signs), x @ random_hadamard(n, seed=5))
    torch.testing.assert_close(hadamard_transform(x[0, 0]), x[0, 0] @ hadamard_matrix(n))


def test_online_op_has_first_and_second_derivatives():
    """``mixed`` takes Hessian-vector products through rotated graphs (small: gradgradcheck
    builds dense Jacobians numerically)."""
    x = torch.randn(1, 1, 8, dtype=torch.float64, requires_grad=True)
    left, right = hadamard_matrix(4), hadamard_matrix(2)
    fn = lambda t: torch.ops.lowbit.hadamard(t, left, right) ** 2  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


# -- structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,kind,op", [(nn.LayerNorm, "layer", "layer_norm"),
                                          (nn.RMSNorm, "rms", "rms_norm")])
def test_stream_of_a_model_built_in_code(run_passes, norm, kind, op):
    graph = _tiny_stream(norm)
    plan = find_stream(graph)
    assert plan.problem is None and plan.kind == kind and plan.embeddings == ["embedding"]
    assert [(n.output, _tail(n.readers)) for n in plan.norms] == [
        (op, ["up"]), (f"{op}_1", ["head"])]
    assert _tail(plan.writers) == ["down"]
    ids = {"ids": random_ids(2, 5, vocab=32, seed=1)}
    record = run_passes(graph, ["rotate"], instruments=[NumericVerifier(ids, 1e-4)]).records[0]
    assert record.verification["max_rel_error"] < 1e-5
    assert record.transformed == ("up", "head", "down")
    assert record.metrics["online_hadamard"] == {"down": "kronecker(12 x 2)"}


def _as_native_layer_norms(graph):
    """Rewrite each ``layer_norm`` as ``getitem(native_layer_norm(..), 0)`` (decomposed form)."""
    g = graph.gm.graph
    for n in [n for n in g.nodes if n.target is torch.ops.aten.layer_norm.default]:
        with g.inserting_before(n):
            native = g.call_function(torch.ops.aten.native_layer_norm.default, n.args[:5])
            out = g.call_function(operator.getitem, (native, 0))
        n.replace_all_uses_with(out)
        g.erase_node(n)
    graph._index()
    graph._dirty = True


def test_native_layer_norms_are_rotated_exactly(run_passes):
    graph = _tiny_stream(nn.LayerNorm)
    _as_native_layer_norms(graph)
    assert [n.output for n in find_stream(graph).norms] == ["getitem", "getitem_1"]
    ids = {"ids": random_ids(2, 5, vocab=32, seed=1)}
    record = run_passes(graph, ["rotate"], instruments=[NumericVerifier(ids, 1e-4)]).records[0]
    assert record.verification["max_rel_error"] < 1e-5
    assert not {"native_layer_norm", "getitem"} & {graph.op(n) for n in graph.nodes()}


@pytest.mark.parametrize("norm,post_norm,reason", [
    (nn.LayerNorm, True, "stream value 'embedding': norm output 'layer_norm' also feeds a "
                         "residual add: a post-norm block (the normalised value is the stream "
                         "itself), which a rotation cannot pass"),
    (nn.Identity, False, "stream value 'embedding' is read by 'linear' (linear), not by one "
                         "norm")])
def test_unrotatable_streams_are_skipped_with_the_reason(run_passes, norm, post_norm, reason):
    graph = _tiny_stream(norm, post_norm)
    record = run_passes(graph, ["rotate"]).records[0]
    assert record.changed is False and record.skipped == (("residual stream", reason),)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stream_of_rms_norm_models(captured, arch):
    plan = find_stream(captured(arch).graph)
    assert plan.problem is None and plan.width == 64 and plan.kind == "rms"
    assert len(plan.norms) == 5 and len(plan.embeddings) == 1     # 2 per layer + final
    assert _tail(plan.norms[0].readers) == ["q_proj", "k_proj", "v_proj"]
    assert _tail(plan.norms[1].readers) == ["gate_proj", "up_proj"]
    assert _tail(plan.norms[-1].readers) == ["lm_head"]
    assert _tail(plan.writers) == ["o_proj", "down_proj"] * 2
    assert all(n.gamma is not None and n.beta is None for n in plan.norms)


@pytest.mark.parametrize("arch,readers,writers", [
    ("opt", [["k_proj", "v_proj", "q_proj"], ["fc1"]], ["out_proj", "fc2"]),
    ("gpt2", [["c_attn"], ["c_fc"]], ["c_proj", "c_proj"])])
def test_stream_of_layer_norm_models(captured, arch, readers, writers):
    """Token and learned position embeddings both start the stream; LayerNorms read it."""
    plan = find_stream(captured(arch).graph)
    assert plan.problem is None and plan.width == 64 and plan.kind == "layer"
    assert len(plan.embeddings) == 2 and len(plan.norms) == 5
    assert [_tail(n.readers) for n in plan.norms[:2]] == readers
    assert _tail(plan.norms[-1].readers) == ["lm_head"]
    assert _tail(plan.writers) == writers * 2
    assert all(n.beta is not None and n.eps == 1e-5 for n in plan.norms)


def test_post_norm_bert_is_skipped_with_a_reason(captured, run_passes):
    graph = captured("bert").graph.copy()
    record = run_passes(graph, ["rotate"]).records[0]
    assert record.changed is False and record.transformed == ()
    (where, why), = record.skipped
    assert where == "residual stream" and "post-norm" in why and "residual add" in why


def test_layer_norms_become_rms_norms_the_matcher_finds_again(captured, run_passes):
    graph = captured("opt").graph.copy()
    run_passes(graph, ["rotate"])
    ops = [graph.op(n) for n in graph.nodes()]
    assert "layer_norm" not in ops and ops.count("rsqrt") == 5
    created = [n for n in graph.nodes() if graph.node(n).meta.get("lowbit_created_by")]
    assert {graph.op(n) for n in created} >= {"pow", "mean", "rsqrt", "mul", "hadamard"}
    plan = find_stream(graph)
    assert plan.problem is None and plan.kind == "rms" and len(plan.norms) == 5


# -- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", PRE_NORM)
def test_rotation_is_exact(captured, run_passes, arch):
    graph = captured(arch).graph.copy()
    _randomise_norms(graph)
    plan = find_stream(graph)
    ctx = run_passes(graph, ["rotate"], instruments=[NumericVerifier(VERIFY, 1e-4)])
    record = ctx.records[0]
    assert record.verification["max_rel_error"] < 1e-5
    assert record.transformed == tuple(s.name for n in plan.norms for s in n.readers) + \
        tuple(s.name for s in plan.writers)
    assert len(record.metrics["online_hadamard"]) == 4
    assert [graph.op(n) for n in graph.nodes()].count("hadamard") == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_head_is_untied_and_norm_weights_are_folded(captured, run_passes, arch):
    graph = captured(arch).graph.copy()
    _randomise_norms(graph)
    run_passes(graph, ["rotate"])
    emb = next(n for n in graph.nodes() if graph.op(n) == "embedding")
    head = next(s for s in graph.linears() if s.name == "lm_head")
    assert graph.node(graph.inputs(emb)[0]).target != head.weight
    gammas = [graph.attr(n.gamma) for n in find_stream(graph).norms if n.gamma]
    assert all(bool((g == 1).all()) for g in gammas)             # folded away (or gone)


def test_layer_norm_bias_moves_into_a_bias_free_head(captured, run_passes):
    graph = captured("opt").graph.copy()
    _randomise_norms(graph)
    assert next(s for s in graph.linears() if s.name == "lm_head").bias is None
    run_passes(graph, ["rotate"])
    head = next(s for s in graph.linears() if s.name == "lm_head")
    assert head.bias is not None and graph.attr(head.bias).shape == (128,)


def test_rotation_flattens_weight_outliers(captured, run_passes):
    """The point of rotating: a reader's input-channel outlier is spread over all channels."""
    graph = captured("llama").graph.copy()
    q = next(s for s in graph.linears() if s.name.endswith("0.self_attn.q_proj"))
    w = graph.linear_weight(q).clone()
    w[:, 5] *= 50
    graph.set_linear_weight(q, w)
    kurt = lambda t: float((t.abs().amax(0) / t.abs().amax(0).median()).max())  # noqa: E731
    before = kurt(graph.linear_weight(q))
    run_passes(graph, ["rotate"])
    assert kurt(graph.linear_weight(q)) < before / 5


def test_seed_and_online_options(captured, run_passes):
    graph = captured("llama").graph.copy()
    record = run_passes(graph, [{"rotate": {"seed": 1, "online": False}}]).records[0]
    assert record.metrics["online_hadamard"] == {}
    assert "hadamard" not in [graph.op(n) for n in graph.nodes()]


# -- contract -------------------------------------------------------------------------------

def test_compile_verifies_rotation_then_quantizes_and_round_trips(tmp_path):
    """``exact`` rotate runs under the compiler's NumericVerifier; the torch artifact with
    ``lowbit::hadamard`` nodes saves (torch.export serde) and loads."""
    recipe = {"passes": ["rotate", {"rtn": {"bits": 8, "group_size": 32}}, "pack"]}
    cm = lowbit.compile(tiny_llama(num_hidden_layers=1), recipe=recipe, target="torch",
                        progress=False)
    rotate_record = cm.manifest["passes"][0]
    assert rotate_record["name"] == "rotate" and rotate_record["numerics"] == "exact"
    assert rotate_record["verification"]["max_rel_error"] < 1e-5
    assert rotate_record["metrics"]["rotation"] == "sylvester(64)"
    cm.save(tmp_path / "a")
    ids = random_ids(1, 9, seed=5)
    torch.testing.assert_close(lowbit.load(tmp_path / "a")(ids), cm(ids))
