"""smooth: SmoothQuant activation smoothing, with alpha searched per scale group.

For each scale group (:mod:`lowbit.passes._scaling`) ``s_j = max|X_j|^alpha /
max|W_:,j|^(1-alpha)`` over the group's consumers, folded exactly (``X/s``, ``W diag(s)``).
``alpha`` is chosen per group from a grid to minimise the group's output error after
quantizing weights per channel and activations per token
(``sum_W |Q_a(X/s) Q_w(W diag(s))^T - X W^T|^2`` on calibration tokens), not one global
constant. The function is unchanged; per-token activation ranges shrink.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.quant import (dequantize_weight, quantize_activation_per_token,
                                   quantize_weight)
from lowbit.numerics.scaling import smooth_scales
from lowbit.passes._scaling import apply_scale, scale_groups_in_order

__all__ = ["smooth", "SmoothOptions"]


@dataclass(frozen=True)
class SmoothOptions:
    weight_bits: int = 8
    act_bits: int = 8
    grid: int = 10                  # alpha in {0, 1/grid, ..., 1}
    tokens: int = 2048              # calibration tokens the search scores on
    max_batches: int = 32
    include_head: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not (2 <= self.weight_bits <= 8 and 2 <= self.act_bits <= 8):
            raise ValueError("weight_bits and act_bits must be in 2..8")
        if self.grid < 1 or self.tokens < 1 or self.max_batches < 1:
            raise ValueError("grid, tokens and max_batches must be >= 1")
        object.__setattr__(self, "exclude", tuple(self.exclude))


def _sample(values: list[torch.Tensor], tokens: int) -> torch.Tensor:
    flat = torch.cat([v.reshape(-1, v.shape[-1]) for v in values])
    step = max(1, flat.shape[0] // tokens)
    return flat[::step][:tokens].to(torch.float32)


def _w8a8_error(x: torch.Tensor, weights, s: torch.Tensor, wbits: int, abits: int) -> float:
    xs = x / s.to(x.dtype)
    xq, sx = quantize_activation_per_token(xs, abits)
    total = 0.0
    for w in weights:
        ref = x @ w.T
        wq = dequantize_weight(quantize_weight(w * s.to(w.dtype), wbits, None, True))
        total += float(((xq * sx) @ wq.T - ref).pow(2).sum())
    return total


@graph_pass(name="smooth", numerics="exact", requires=("calibration",), options=SmoothOptions)
def smooth(graph, ctx) -> PassResult:
    """Migrate activation outliers into the weights (SmoothQuant), alpha searched per group."""
    o = ctx.options
    groups, skipped, unscalable, run = scale_groups_in_order(graph, o, ctx.calibration)
    alphas, gains = {}, {}
    for g in tqdm(groups, desc="smooth", disable=not ctx.progress, leave=False):
        x = _sample(run.advance(g.value), o.tokens)
        weights = [graph.linear_weight(c).to(torch.float32) for c in g.consumers]
        w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        x_absmax = x.abs().amax(0)
        scored = []
        for i in range(o.grid + 1):
            s = torch.ones_like(x_absmax, dtype=torch.float64) if i == 0 else \
                smooth_scales(x_absmax, w_absmax, i / o.grid)
            scored.append((_w8a8_error(x, weights, s, o.weight_bits, o.act_bits), i, s))
        err, best, s = min(scored, key=lambda t: t[:2])
        name = " + ".join(c.name for c in g.consumers)
        alphas[name] = best / o.grid
        gains[name] = round(err / max(scored[0][0], 1e-30), 4)
        if best:
            apply_scale(graph, g, s)
    return PassResult(changed=any(alphas.values()), transformed=tuple(alphas),
                      skipped=tuple(skipped) + tuple(unscalable),
                      metrics={"alpha": alphas, "error_vs_unsmoothed": gains})
