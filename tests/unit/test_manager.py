"""The pass manager: contracts checked before running, errors that name the pass, instruments."""
from __future__ import annotations

import io
import re
import time

import pytest
import torch

import lowbit
from lowbit.compiler.context import PassContext
from lowbit.compiler.instruments import GraphDump, Log, NumericVerifier, Timing
from lowbit.compiler.passes import NoOptions, PassResult, graph_pass

_calls: list[str] = []


@graph_pass(name="spy", numerics="analysis")
def spy(graph, ctx):
    """Records that it ran."""
    _calls.append("spy")
    return PassResult(changed=False)


@graph_pass(name="double_first_weight", numerics="exact")
def double_first_weight(graph, ctx):
    """Wrongly claims to be exact: doubles the first linear's weight."""
    site = graph.linears()[0]
    graph.set_linear_weight(site, graph.linear_weight(site) * 2)
    return PassResult(transformed=(site.name,))


@graph_pass(name="rescale_through_relu", numerics="exact")
def rescale_through_relu(graph, ctx):
    """Really exact: relu(c*x) = c*relu(x) for c > 0, so fc1 rows * c, fc2 columns / c."""
    fc1, fc2 = graph.linears()[:2]
    c = torch.linspace(0.5, 4.0, fc1.out_features)
    graph.set_linear_weight(fc1, graph.linear_weight(fc1) * c[:, None])
    graph.set_linear_weight(fc2, graph.linear_weight(fc2) / c[None, :])
    return PassResult(transformed=(fc1.name, fc2.name))


@graph_pass(name="explode", numerics="approx")
def explode(graph, ctx):
    """Fails inside."""
    return {}["missing"]


@graph_pass(name="no_result", numerics="analysis")
def no_result(graph, ctx):
    """Forgets to return a PassResult."""
    return None


@graph_pass(name="sleepy", numerics="analysis")
def sleepy(graph, ctx):
    """Takes a measurable while."""
    time.sleep(0.05)
    return PassResult(changed=False)


@pytest.fixture(autouse=True)
def _reset_calls():
    _calls.clear()


# -- contracts, checked before anything runs ---------------------------------------------

def test_pack_alone_names_the_missing_result_and_the_pass_that_provides_it(mlp_captured,
                                                                           run_passes):
    ctx = PassContext(progress=False)
    with pytest.raises(lowbit.ContractError) as info:
        run_passes(mlp_captured.graph, [spy, "pack"], ctx=ctx)
    msg = str(info.value)
    assert "pass 'pack' (#2) requires 'quantized_weights'" in msg
    # installed plugins may provide more weight quantizers; the built-in one is offered
    assert re.search(r"add one of \[[^\]]*'rtn'[^\]]*\] before 'pack'", msg), msg
    assert _calls == [] and ctx.records == []  # nothing ran
    assert mlp_captured.graph.quant_linears() == {}


def test_wrong_order_suggests_moving_the_provider_first(mlp_captured, run_passes):
    with pytest.raises(lowbit.ContractError, match="move 'rtn' before 'pack'"):
        run_passes(mlp_captured.graph, ["pack", "rtn"])


def test_every_problem_is_reported_at_once(mlp_captured, run_passes):
    with pytest.raises(lowbit.ContractError) as info:
        run_passes(mlp_captured.graph, ["act_quant", "pack"])
    msg = str(info.value)
    assert "'act_quant' (#1) requires 'quantized_weights'" in msg
    assert "'pack' (#2) requires 'quantized_weights'" in msg


def test_calibrate_without_calibration_data_is_a_contract_error(mlp_captured, run_passes,
                                                                mlp_input):
    with pytest.raises(lowbit.ContractError, match="requires 'calibration'.*give calibration"):
        run_passes(mlp_captured.graph, [spy, "calibrate"])
    assert _calls == []
    ctx = run_passes(mlp_captured.graph, ["calibrate"], calibration=[{"x": mlp_input}])
    assert ctx.history == ("calibrate",)


# -- numeric contract of `exact` passes ----------------------------------------------------

def test_exact_pass_that_changes_outputs_raises_numeric_mismatch(mlp_captured, run_passes,
                                                                 mlp_input):
    verifier = NumericVerifier({"x": mlp_input}, tolerance=1e-5)
    with pytest.raises(lowbit.NumericMismatchError) as info:
        run_passes(mlp_captured.graph, ["rtn", double_first_weight], instruments=[verifier])
    err = info.value
    assert err.pass_name == "double_first_weight" and err.history == ("rtn",)
    assert "pass 'double_first_weight'" in str(err) and "after: rtn" in str(err)
    assert "max relative error" in str(err)


def test_exact_pass_that_keeps_outputs_passes_verification(mlp_captured, run_passes,
                                                           mlp_input):
    graph = mlp_captured.graph
    before_w = graph.linear_weight(graph.linears()[0]).clone()
    before = graph.run({"x": mlp_input})[0]
    ctx = run_passes(graph, [rescale_through_relu],
                     instruments=[NumericVerifier({"x": mlp_input}, tolerance=1e-5)])
    assert not torch.allclose(graph.linear_weight(graph.linears()[0]), before_w)
    record = ctx.records[0]
    assert record.verification["max_rel_error"] <= 1e-5
    torch.testing.assert_close(graph.run({"x": mlp_input})[0], before, rtol=1e-5, atol=1e-6)


def test_approx_pass_records_output_sqnr(mlp_captured, run_passes, mlp_input):
    ctx = run_passes(mlp_captured.graph, [{"rtn": {"bits": 8, "group_size": 32}}, "pack"],
                     instruments=[NumericVerifier({"x": mlp_input})])
    pack_record = ctx.records[-1]
    # 8-bit weights on two layers: output SQNR well above 30 dB, but not lossless
    assert 30 < pack_record.verification["output_sqnr_db"] < 80


# -- failures inside passes ------------------------------------------------------------------

def test_exception_in_a_pass_is_wrapped_with_pass_and_history(mlp_captured, run_passes):
    with pytest.raises(lowbit.PassError) as info:
        run_passes(mlp_captured.graph, ["rtn", "pack", explode])
    err = info.value
    assert type(err) is lowbit.PassError
    assert err.pass_name == "explode" and err.history == ("rtn", "pack")
    assert "KeyError" in str(err) and "(after: rtn -> pack)" in str(err)
    assert isinstance(err.__cause__, KeyError)


def test_first_pass_failure_says_so(mlp_captured, run_passes):
    with pytest.raises(lowbit.PassError, match=r"\[pass 'explode'\] \(first pass\)"):
        run_passes(mlp_captured.graph, [explode])


def test_pass_returning_no_result_is_a_pass_error(mlp_captured, run_passes):
    with pytest.raises(lowbit.PassError, match="expected PassResult.*no_result"):
        run_passes(mlp_captured.graph, [no_result])


def test_graph_pass_declaration_is_validated():
    with pytest.raises(ValueError, match="numerics must be one of"):
        graph_pass(name="x", numerics="fuzzy")
    with pytest.raises(TypeError, match="frozen dataclass"):
        graph_pass(name="x", numerics="exact", options=dict)
    assert spy.info.options is NoOptions and spy.info.doc == "Records that it ran."


# -- instruments -----------------------------------------------------------------------------

def test_timing_records_seconds(mlp_captured, run_passes):
    ctx = run_passes(mlp_captured.graph, [spy, sleepy], instruments=[Timing()])
    spy_record, sleepy_record = ctx.records
    assert 0.05 <= sleepy_record.seconds < 5
    assert spy_record.seconds < sleepy_record.seconds


def test_graph_dump_writes_one_listing_per_pass(mlp_captured, run_passes, tmp_path):
    dump_dir = tmp_path / "dumps"
    run_passes(mlp_captured.graph, ["rtn", "pack"], instruments=[GraphDump(dump_dir)])
    assert sorted(p.name for p in dump_dir.iterdir()) == ["01_rtn.txt", "02_pack.txt"]
    after_rtn = (dump_dir / "01_rtn.txt").read_text()
    after_pack = (dump_dir / "02_pack.txt").read_text()
    assert "lowbit.quant_linear" not in after_rtn and after_rtn.count("= linear(") == 3
    # fc1 and fc2 packed; the output head stays a float linear
    assert after_pack.count("lowbit.quant_linear(") == 2
    assert "# fc1 (by pack)" in after_pack and "# fc2 (by pack)" in after_pack
    assert after_pack.count("= linear(") == 1


def test_log_prints_one_line_per_pass(mlp_captured, run_passes):
    stream = io.StringIO()
    run_passes(mlp_captured.graph, ["rtn", "pack"], instruments=[Log(stream), Timing()])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[lowbit] rtn") and "2 transformed, 1 skipped" in lines[0]
    assert lines[1].startswith("[lowbit] pack")


def test_a_pass_after_the_one_that_consumed_its_input_is_refused_before_running():
    import lowbit
    from lowbit.testing import tiny_llama
    recipe = {"passes": [{"rtn": {"bits": 8, "group_size": None, "symmetric": True}},
                         "pack", "act_quant"]}
    with pytest.raises(lowbit.ContractError, match="'pack' uses it up.*move 'act_quant' "
                                                   "before 'pack'"):
        lowbit.compile(tiny_llama(), recipe=recipe, target="torch", progress=False)
