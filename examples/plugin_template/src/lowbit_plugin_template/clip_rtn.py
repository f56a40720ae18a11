"""clip_rtn: round-to-nearest weight quantization with a per-group clip-ratio search."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.quant import dequantize_weight, quantize_weight, sqnr_db
from lowbit.passes.patterns import select_linears
from lowbit.passes.rtn import WeightQuantOptions

from lowbit_plugin_template.numerics import search_clip_ratios

__all__ = ["clip_rtn", "ClipRtnOptions"]


@dataclass(frozen=True)
class ClipRtnOptions(WeightQuantOptions):
    """The options of the built-in ``rtn`` pass, plus the grid of clip ratios to try."""
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)

    def __post_init__(self):
        super().__post_init__()
        grid = tuple(float(r) for r in self.clip_grid)
        if not grid or not all(0.0 < r <= 1.0 for r in grid):
            raise ValueError(f"clip_grid must be a non-empty list of ratios in (0, 1], "
                             f"got {self.clip_grid}")
        object.__setattr__(self, "clip_grid", grid)


@graph_pass(name="clip_rtn", numerics="analysis", provides=("quantized_weights",),
            preserves=("graph",), options=ClipRtnOptions)
def clip_rtn(graph, ctx) -> PassResult:
    """Round to nearest after choosing each group's clip ratio for the least weight MSE."""
    o = ctx.options
    sites, skipped = select_linears(graph, o.include_head, o.exclude)
    quantized = ctx.analysis.setdefault("quantized_weights", {})
    sqnr, mean_clip = {}, {}
    for site in sites:
        w = graph.linear_weight(site)
        clip = search_clip_ratios(w, o.bits, o.group_size, o.symmetric, o.clip_grid)
        qw = quantize_weight(w, o.bits, o.group_size, o.symmetric, clip_ratio=clip)
        quantized[site.node] = qw
        sqnr[site.name] = round(sqnr_db(w, dequantize_weight(qw)), 2)
        mean_clip[site.name] = round(float(clip.mean()), 4)
    return PassResult(changed=False, transformed=tuple(s.name for s in sites),
                      skipped=tuple(skipped),
                      metrics={"weight_sqnr_db": sqnr, "mean_clip_ratio": mean_clip})
