"""Sequential, memory-bounded calibration shared by the Hessian-based weight quantizers.

The graph runs over the calibration batches one stage at a time (a stage = the linears that
read one value: q/k/v, gate/up, o, down), so each stage's Hessian ``H = 2 X^T X / n`` comes
from inputs produced by the *already quantized* layers before it, and memory holds one
stage's live activations per batch, never the whole model's. Each quantized weight is written
back (dequantized) into the graph, so later stages see the quantization error.

With ``float_target`` (an option of the quantizer) a second run over the same batches keeps
the float model's inputs of each stage (the stages it passes run with their original weights),
and each stage's weight is first moved to the least-squares fit of the float outputs on the
quantized inputs (:func:`lowbit.numerics.gptq.float_target`), so a layer also corrects the
error the layers before it left.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult
from lowbit.numerics.gptq import float_target, output_error
from lowbit.numerics.quant import QuantizedWeight, dequantize_weight, quantize_weight
from lowbit.passes.patterns import select_linears

__all__ = ["quantize_sequentially", "stages", "stage_hessian"]

#: ``(w [N, K] float64, H [K, K], bits, group_size) -> QuantizedWeight``
Quantizer = Callable[[torch.Tensor, torch.Tensor, int, "int | None"], QuantizedWeight]


def stages(graph, sites) -> "OrderedDict[str, list]":
    """Sites grouped by the value they read, in graph order of that value."""
    order = {n: i for i, n in enumerate(graph.nodes())}
    out: OrderedDict[str, list] = OrderedDict()
    for site in sorted(sites, key=lambda s: order[s.input]):
        out.setdefault(site.input, []).append(site)
    return out


def stage_hessian(values: list[torch.Tensor]) -> torch.Tensor:
    """``2 X^T X / n`` over every batch's input (returned in float64).

    Accumulated in place in the activations' dtype: one ``addmm`` per batch, no per-batch
    float64 copies (float32 sums of 16k rows keep ~1e-6 relative error, far below GPTQ's
    damping).
    """
    return stage_cross(values, values)


def stage_cross(floats: list[torch.Tensor], quantized: list[torch.Tensor]) -> torch.Tensor:
    """``2 X^T X~ / n`` of float-model inputs ``X`` and quantized-model inputs ``X~`` (float64;
    :func:`stage_hessian` is the case ``X = X~``, so the two agree bit for bit then)."""
    total, count = None, 0
    for xf, xq in zip(floats, quantized):
        a, b = xf.reshape(-1, xf.shape[-1]), xq.reshape(-1, xq.shape[-1])
        if total is None:
            total = torch.zeros(a.shape[1], b.shape[1], dtype=a.dtype)
        total.addmm_(a.T, b, alpha=2.0)
        count += a.shape[0]
    return total.to(torch.float64) / max(count, 1)


def _split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Row blocks of a quantized weight (the layers of a stage quantized together)."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(dataclasses.replace(qw, codes=qw.codes[rows], scales=qw.scales[rows],
                                       zero_points=qw.zero_points[rows]))
        start += n
    return out


def quantize_sequentially(graph, ctx, name: str, quantize: Quantizer) -> PassResult:
    """Quantize every selected linear with ``quantize``, stage by stage (see module doc).

    Honours a ``bit_assignment`` analysis (layer node -> ``(bits, group_size)``) when present.
    Reports each layer's output error relative to plain RTN on the same grid.
    """
    o = ctx.options
    sites, skipped = select_linears(graph, o.include_head, o.exclude)
    assignment = ctx.analysis.get("bit_assignment", {})
    quantized = ctx.analysis.setdefault("quantized_weights", {})
    run = graph.staged(ctx.calibration[: o.max_batches])
    fit_float = getattr(o, "float_target", False)
    float_run = graph.staged(ctx.calibration[: o.max_batches]) if fit_float else None
    original: dict = {}          # site -> float weight, for stages the float run has not passed
    gain, shift = {}, {}
    groups = stages(graph, sites)
    for node, group in tqdm(groups.items(), desc=name, disable=not ctx.progress, leave=False):
        xs = run.advance(node)
        h = stage_hessian(xs)
        c = None
        if float_run is not None:
            done = {site: graph.linear_weight(site) for site in original}
            for site, w in original.items():
                graph.set_linear_weight(site, w)
            c = stage_cross(float_run.advance(node), xs)
            for site, w in done.items():
                graph.set_linear_weight(site, w)
            original.clear()
        del xs
        # layers reading one value share H: those on one grid are quantized as one matrix
        # (GPTQ and the clipping search are row-independent given H), saving loop overhead
        by_format: dict = {}
        for site in group:
            fmt = assignment.get(site.node, (o.bits, o.group_size))
            by_format.setdefault(fmt, []).append(site)
        for (bits, group_size), same in by_format.items():
            weights = [graph.linear_weight(site) for site in same]
            w64 = torch.cat(weights).to(torch.float64)
            if c is not None:
                target = float_target(w64, h, c, getattr(o, "damp", 0.01))
                shift[node] = round(float((target - w64).norm() / w64.norm()), 5)
                w64 = target
            parts = _split_rows(quantize(w64, h, bits, group_size),
                                [w.shape[0] for w in weights])
            h32 = h.to(torch.float32)
            for site, w, qw in zip(same, weights, parts):
                deq = dequantize_weight(qw)
                rtn = dequantize_weight(quantize_weight(w, bits, group_size, o.symmetric))
                gain[site.name] = round(output_error(w, deq, h32)
                                        / max(output_error(w, rtn, h32), 1e-30), 4)
                graph.set_linear_weight(site, deq.to(w.dtype))
                quantized[site.node] = qw
                if float_run is not None:
                    original[site] = w
    metrics = {"output_error_vs_rtn": gain, "stages": len(groups)}
    if fit_float:
        metrics["float_target_shift"] = shift      # |W* - W| / |W| per stage
    return PassResult(transformed=tuple(gain), skipped=tuple(skipped), metrics=metrics)
