"""clip_rtn tested three ways: structure, numerics, contract (copy this layout for your pass).

Run after ``pip install -e .``: ``python -m pytest`` in this folder.
"""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.compiler.capture import capture
from lowbit.compiler.context import PassContext
from lowbit.compiler.manager import PassManager, ScheduledPass
from lowbit.compiler.passes import build_options
from lowbit.numerics.quant import dequantize_weight, quantize_weight, sqnr_db
from lowbit.testing import random_ids, tiny_llama

from lowbit_plugin_template.clip_rtn import clip_rtn
from lowbit_plugin_template.numerics import search_clip_ratios


def _run(graph, fn, **options):
    """Run one pass function on ``graph`` the way the compiler does; returns the context."""
    ctx = PassContext(progress=False)
    PassManager([ScheduledPass(fn.info, build_options(fn.info, options))]).run(graph, ctx)
    return ctx


@pytest.fixture(scope="module")
def llama():
    return capture(tiny_llama())


# -- structure ----------------------------------------------------------------------------

def test_quantizes_every_linear_but_the_head_and_leaves_the_graph(llama):
    ids = random_ids(1, 9)
    before, nodes = llama.graph.run({"input_ids": ids})[0], llama.graph.nodes()
    ctx = _run(llama.graph, clip_rtn, bits=4, group_size=32)
    record = ctx.records[0]
    assert record.skipped[0][0] == "lm_head" and len(record.transformed) == 14
    for site in llama.graph.linears()[:-1]:
        qw = ctx.analysis["quantized_weights"][site.node]
        assert qw.codes.shape == (site.out_features, site.in_features // 32, 32)
    assert llama.graph.nodes() == nodes
    assert torch.equal(llama.graph.run({"input_ids": ids})[0], before)


# -- numerics -----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric,gain_db", [(False, (0.15, 0.6)), (True, (0.7, 1.5))])
def test_no_group_is_worse_than_plain_rtn(symmetric, gain_db):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    clip = search_clip_ratios(w, 4, 64, symmetric, (0.95, 0.9, 0.85, 0.8, 0.75))
    clipped = dequantize_weight(quantize_weight(w, 4, 64, symmetric, clip_ratio=clip))
    plain = dequantize_weight(quantize_weight(w, 4, 64, symmetric))
    group_mse = [(x - w).pow(2).reshape(32, 4, 64).sum(-1) for x in (clipped, plain)]
    assert (group_mse[0] <= group_mse[1] * (1 + 1e-6)).all()
    # Gaussian weights, 64-wide 4-bit groups: trimming the tails gains a fraction of a dB
    # (measured 0.28 dB asymmetric, 1.05 dB symmetric, whose grid wastes more range)
    assert gain_db[0] < sqnr_db(w, clipped) - sqnr_db(w, plain) < gain_db[1]


def test_gaussian_rows_are_clipped_and_uniform_rows_are_not():
    w = torch.stack([torch.linspace(-1, 1, 1024),
                     torch.randn(1024, generator=torch.Generator().manual_seed(1))])
    clip = search_clip_ratios(w, 4, None, False, (0.9, 0.8))
    assert clip[0, 0] == 1.0     # evenly spread values: every level is used, nothing to trim
    assert clip[1, 0] < 1.0      # Gaussian tails: a narrower grid serves the bulk better


# -- contract -----------------------------------------------------------------------------

def test_contract():
    info = clip_rtn.info
    assert (info.name, info.numerics) == ("clip_rtn", "analysis")
    assert info.provides == ("quantized_weights",) and info.requires == ()
    with pytest.raises(lowbit.RecipeError, match="clip_grid"):
        build_options(info, {"clip_grid": [1.2]})
    with pytest.raises(lowbit.RecipeError, match="valid options"):
        build_options(info, {"clip": 0.9})


def test_installed_plugin_compiles_the_preset():
    """Needs ``pip install -e .``: the entry point registers the pass and the preset."""
    cm = lowbit.compile(tiny_llama(), recipe="w4a16-clip", target="torch", progress=False)
    assert [p["name"] for p in cm.manifest["passes"]] == ["clip_rtn", "pack"]
    assert len(cm.manifest["layers"]) == 14
    assert cm(random_ids(1, 8)).shape == (1, 8, 128)
