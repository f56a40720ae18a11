"""awq: activation-aware per-channel weight scaling (AWQ), folded exactly.

For each scale group (:mod:`lowbit.passes._scaling`: a norm or linear feeding only linears),
``s = m^alpha`` with ``m_j = sqrt(H_jj / 2)`` the RMS of input channel ``j`` (AWQ uses the
mean magnitude; the RMS comes free with the Hessian), ``alpha`` searched on a grid to minimise
the group's output error after quantization to the target grid, ``tr(E H E^T)`` with
``H = 2 X^T X / n`` from sequential calibration. The scale is folded into the producer and the
consumers, so the pass changes no output; the quantizer that follows sees easier weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.scaling import search_awq_alpha
from lowbit.passes._scaling import apply_scale, scale_groups_in_order
from lowbit.passes._sequential import stage_hessian
from lowbit.passes.rtn import WeightQuantOptions

__all__ = ["awq", "AwqOptions"]


@dataclass(frozen=True)
class AwqOptions(WeightQuantOptions):
    grid: int = 20                  # alpha in {0, 1/grid, ..., 1}
    max_batches: int = 32           # calibration batches used

    def __post_init__(self):
        super().__post_init__()
        if self.grid < 1 or self.max_batches < 1:
            raise ValueError("grid and max_batches must be >= 1")


@graph_pass(name="awq", numerics="exact", requires=("calibration",), options=AwqOptions)
def awq(graph, ctx) -> PassResult:
    """Scale input channels by activation magnitude^alpha where it lowers quantization error."""
    o = ctx.options
    groups, skipped, unscalable, run = scale_groups_in_order(graph, o, ctx.calibration)
    alphas, gains = {}, {}
    for g in tqdm(groups, desc="awq", disable=not ctx.progress, leave=False):
        h = stage_hessian(run.advance(g.value))
        weights = [graph.linear_weight(c) for c in g.consumers]
        magnitude = (torch.diag(h) / 2).clamp(min=0).sqrt()
        alpha, s, err, base = search_awq_alpha(weights, h, magnitude, o.bits, o.group_size,
                                               o.symmetric, o.grid)
        name = " + ".join(c.name for c in g.consumers)
        alphas[name] = alpha
        gains[name] = round(err / max(base, 1e-30), 4)
        if alpha > 0:
            apply_scale(graph, g, s)
    return PassResult(changed=any(a > 0 for a in alphas.values()), transformed=tuple(alphas),
                      skipped=tuple(skipped) + tuple(unscalable),
                      metrics={"alpha": alphas, "error_vs_unscaled": gains})
