"""mixed: exact allocation (vs brute force), Hutchinson traces, budgets in real bytes."""
from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.numerics.bitalloc import InfeasibleBudget, solve_allocation
from lowbit.passes.mixed import ggn_traces, hessian_traces, parse_format
from lowbit.testing import random_ids, tiny_llama

CALIB = random_ids(4, 32, seed=3)
CANDIDATES = ["2g16", "3g32", "4g32", "8g32"]


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(6, 3, generator=g)
    size = torch.randint(1, 10, (6, 3), generator=g)
    budget = float(size.float().mean(1).sum())
    choice = solve_allocation(cost, size, budget)
    best = min((sum(cost[i, c] for i, c in enumerate(cs)), cs)
               for cs in itertools.product(range(3), repeat=6)
               if sum(size[i, c] for i, c in enumerate(cs)) <= budget)
    assert sum(size[i, c] for i, c in enumerate(choice)) <= budget
    assert float(sum(cost[i, c] for i, c in enumerate(choice))) == pytest.approx(float(best[0]))


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(InfeasibleBudget, match="smallest possible 2"):
        solve_allocation(torch.ones(2, 2), torch.ones(2, 2), budget=1)


def test_hutchinson_trace_matches_the_exact_hessian_trace():
    """One linear, MSE loss: the Hessian is I_3 (x) A with A = 2 X^T X / (40 * 3).

    With orthogonal input columns A is diagonal, and then every Rademacher sample gives the
    trace exactly, so the estimate must match to float error (the double-backprop path is
    what is being checked).
    """
    from lowbit.compiler.capture import capture
    lin = torch.nn.Linear(6, 3, bias=False)
    q, _ = torch.linalg.qr(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)))
    scales = torch.arange(1.0, 7.0)
    x = (q * scales)[None]
    graph = capture(lin, example_inputs=(x,)).graph
    site = graph.linears()[0]
    name = graph.placeholders()[0]
    est = hessian_traces(graph, [site], [{name: x}], "module", samples=3)[site.node]
    exact = 3 * float(2 * scales.pow(2).sum() / 120)
    assert est == pytest.approx(exact, rel=1e-4)


def test_hutchinson_trace_is_unbiased_on_a_non_diagonal_hessian():
    """Two linears with a tanh between, MSE to the float output: the Hessians are dense.

    Each Rademacher sample ``v^T H v`` has mean ``tr(H)`` and variance
    ``2 sum_{i != j} H_ij^2``; with ``S`` samples the estimate must lie within 4 standard
    deviations ``4 sqrt(2 sum_{i != j} H_ij^2 / S)`` (about 6% here) of the exact trace from
    ``torch.autograd.functional.hessian``. A non-random probe (``v = 1``) would give the sum
    of all entries instead, 2.7x the trace for the first layer.
    """
    from lowbit.compiler.capture import capture
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3, bias=False))
    x = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(1)) + 1.0
    graph = capture(net, example_inputs=(x,)).graph
    samples = 1024
    est = hessian_traces(graph, graph.linears(), [{graph.placeholders()[0]: x}], "module",
                         samples=samples)
    params, reference = dict(net.named_parameters()), net(x).detach()
    for site, key in zip(graph.linears(), ("0.weight", "2.weight")):
        def loss(w, key=key):
            out = torch.func.functional_call(net, {**params, key: w}, (x,))
            return (out - reference).pow(2).mean()
        n = params[key].numel()
        h = torch.autograd.functional.hessian(loss, params[key].detach()).reshape(n, n)
        off_diagonal = float(h.pow(2).sum() - h.diagonal().pow(2).sum())
        sd = (2 * off_diagonal / samples) ** 0.5
        assert abs(est[site.node] - float(h.trace())) <= 4 * sd


def test_ggn_trace_matches_the_exact_gauss_newton_trace():
    """Two linears with a tanh between, MSE to the float output (N outputs).

    The Gauss-Newton matrix is ``G = 2/N J^T J`` with ``J = d out / d W``, so
    ``tr(G) = 2/N ||J||_F^2`` from the exact Jacobian. Each sample ``||J^T e||^2`` with
    ``e ~ N(0, 2/N I)`` has mean ``tr(G)`` and variance ``2 ||G||_F^2``; with 2000 samples the
    estimate must lie within 4 standard deviations.
    """
    from lowbit.compiler.capture import capture
    net = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3, bias=False))
    x = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(1)) + 1.0
    graph = capture(net, example_inputs=(x,)).graph
    samples = 2000
    est = ggn_traces(graph, graph.linears(), [{graph.placeholders()[0]: x}], "module",
                     samples=samples)
    params = dict(net.named_parameters())
    n_out = net(x).numel()
    for site, key in zip(graph.linears(), ("0.weight", "2.weight")):
        def out(w, key=key):
            return torch.func.functional_call(net, {**params, key: w}, (x,)).reshape(-1)
        jac = torch.autograd.functional.jacobian(out, params[key].detach()).reshape(n_out, -1)
        g = 2 / n_out * jac.T @ jac
        sd = (2 * float(g.pow(2).sum()) / samples) ** 0.5
        assert float(g.trace()) > 0
        assert abs(est[site.node] - float(g.trace())) <= 4 * sd


def test_ggn_traces_of_a_causal_lm_are_positive():
    """Every GGN (Fisher) sample is a squared norm: no layer can look 'free to quantize'."""
    from lowbit.compiler.capture import capture
    graph = capture(tiny_llama(), kv_cache=False).graph
    sites = graph.linears()
    batch = {"input_ids": torch.randint(0, 128, (1, 32), generator=torch.Generator()
                                        .manual_seed(0))}
    traces = ggn_traces(graph, sites, [batch], "causal_lm", samples=2)
    assert len(traces) == len(sites)
    assert all(t > 0 for t in traces.values())


def test_bad_candidates_are_rejected():
    with pytest.raises(ValueError, match="not '<bits>g<group>'"):
        parse_format("5g128")
    with pytest.raises(lowbit.RecipeError, match="candidate"):
        lowbit.compile(tiny_llama(), recipe={"passes": [{"mixed": {"candidates": ["4g100"]}},
                                                        "rtn", "pack"]},
                       target="torch", calibration=CALIB, progress=False)


BUDGET = 4.5


@pytest.fixture(scope="module")
def compiled():
    """Tiny Llama compiled once by mixed -> rtn -> pack (shared: each compile takes seconds)."""
    recipe = {"passes": [{"mixed": {"budget": BUDGET, "candidates": CANDIDATES}},
                         {"rtn": {"bits": 4, "group_size": 32}}, "pack"]}
    return lowbit.compile(tiny_llama(), recipe=recipe, target="torch", calibration=CALIB,
                          progress=False)


def test_budget_holds_in_packed_bytes(compiled):
    mixed, _, pack = compiled.manifest["passes"]
    weights = sum(v["in_features"] * v["out_features"]
                  for v in compiled.manifest["layers"].values() if "bits" in v)
    assert pack["metrics"]["packed_bytes"] == mixed["metrics"]["packed_bytes"]
    assert pack["metrics"]["packed_bytes"] <= BUDGET / 8 * weights
    assert len(set(mixed["metrics"]["bits"].values())) > 1       # really mixed


def test_layers_reading_one_value_share_a_format(compiled):
    bits = compiled.manifest["passes"][0]["metrics"]["bits"]
    layers = compiled.manifest["layers"]
    for layer in ("0", "1"):
        qkv = {bits[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"}
        gate_up = {bits[f"model.layers.{layer}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    for name, fmt in bits.items():      # rtn followed the assignment
        assert "%dg%d" % (layers[name]["bits"], layers[name]["group_size"]) == fmt


def test_infeasible_budget_is_a_pass_error_with_the_fix():
    recipe = {"passes": [{"mixed": {"budget": 3.0, "candidates": CANDIDATES}}, "rtn", "pack"]}
    with pytest.raises(lowbit.PassError, match="smallest choice takes 4.125 bits/weight"):
        lowbit.compile(tiny_llama(), recipe=recipe, target="torch", calibration=CALIB,
                       progress=False)


def test_report_and_saved_plot_show_bits_per_layer(compiled, tmp_path):
    cm = compiled
    report = cm.report()
    assert "bits per layer (mixed:" in report
    assert "model.layers.1.mlp.down_proj" in report.split("bits per layer")[1]
    cm.save(tmp_path / "a")
    png = (tmp_path / "a" / "bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits.png" in lowbit.load(tmp_path / "a").manifest["files"]


def test_traces_are_cached_per_weights_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    recipe = {"passes": [{"mixed": {"budget": 5.0, "candidates": CANDIDATES}},
                         {"rtn": {"bits": 4, "group_size": 32}}, "pack"]}

    def run(nudge, calib, budget=5.0):
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] += nudge
        recipe["passes"][0]["mixed"]["budget"] = budget
        cm = lowbit.compile(model, recipe=recipe, target="torch", calibration=calib,
                            progress=False)
        return cm.manifest["passes"][0]["metrics"]

    first = run(0, CALIB)
    again = run(0, CALIB, budget=4.5)                 # another budget: same traces, a hit
    assert not first["traces_from_cache"] and again["traces_from_cache"]
    assert again["hessian_trace"] == first["hessian_trace"]
    assert len(list((tmp_path / "traces").glob("*.json"))) == 1
    assert not run(0, random_ids(4, 32, seed=4))["traces_from_cache"]      # new data
    assert not run(1e-3, CALIB)["traces_from_cache"]                          # new weights
    assert len(list((tmp_path / "traces").glob("*.json"))) == 3
    assert not list((tmp_path / "traces").glob("*.tmp"))


def test_preset_budget_override_is_validated_before_any_work():
    """``recipe_options`` / ``--set`` reach the pass options; unknown names list valid ones."""
    from lowbit.cli import _settings
    assert _settings(["mixed.budget=3.0", "mixed.candidates=[3g128, 4g128]"]) == {
        "mixed": {"budget": 3.0, "candidates": ["3g128", "4g128"]}}
    with pytest.raises(SystemExit, match="PASS.OPTION=VALUE"):
        _settings(["budget=3.0"])
    model = torch.nn.Linear(4, 4)     # never captured: options fail first
    with pytest.raises(lowbit.RecipeError, match=r"no option\(s\) \['budgett'\]; valid options:"
                                                 r" \['budget', 'candidates'"):
        lowbit.compile(model, recipe="mixed", recipe_options={"mixed": {"budgett": 3.0}})
    with pytest.raises(lowbit.RecipeError, match=r"\['awq'\].*runs only \['rotate', 'mixed'"):
        lowbit.compile(model, recipe="mixed", recipe_options={"awq": {"grid": 3}})
    with pytest.raises(lowbit.RecipeError, match="budget .* must be in"):
        lowbit.compile(model, recipe="mixed", recipe_options={"mixed": {"budget": 0.5}})
