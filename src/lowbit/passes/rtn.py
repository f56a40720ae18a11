"""rtn: round-to-nearest weight quantization (per channel or per group)."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.quant import dequantize_weight, quantize_weight, sqnr_db
from lowbit.passes.patterns import select_linears

__all__ = ["rtn", "WeightQuantOptions"]


@dataclass(frozen=True)
class WeightQuantOptions:
    bits: int = 4
    group_size: int | None = 128        # None: one scale per output channel
    symmetric: bool = False
    include_head: bool = False          # quantize the output head (lm_head) too
    exclude: tuple[str, ...] = ()       # regexes of layer names to keep in float

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size is not None and (self.group_size < 16
                                            or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be a power of two >= 16 or None (per-channel),"
                             f" got {self.group_size}")
        if self.bits == 3 and self.group_size is None:
            raise ValueError("3-bit weights need a group_size (bytes hold whole groups)")
        object.__setattr__(self, "exclude", tuple(self.exclude))


@graph_pass(name="rtn", numerics="analysis", provides=("quantized_weights",),
            preserves=("graph",), options=WeightQuantOptions)
def rtn(graph, ctx) -> PassResult:
    """Round each weight to the nearest point of its group's integer grid."""
    o = ctx.options
    sites, skipped = select_linears(graph, o.include_head, o.exclude)
    quantized = ctx.analysis.setdefault("quantized_weights", {})
    assignment = ctx.analysis.get("bit_assignment", {})   # from 'mixed', when it ran
    sqnr = {}
    for site in sites:
        w = graph.linear_weight(site)
        bits, group_size = assignment.get(site.node, (o.bits, o.group_size))
        qw = quantize_weight(w, bits, group_size, o.symmetric)
        quantized[site.node] = qw
        sqnr[site.name] = round(sqnr_db(w, dequantize_weight(qw)), 2)
    return PassResult(changed=False, transformed=tuple(s.name for s in sites),
                      skipped=tuple(skipped), metrics={"weight_sqnr_db": sqnr})
