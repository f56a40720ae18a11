"""gptq: GPTQ weight quantization with sequential, memory-bounded calibration.

Stage by stage (see :mod:`lowbit.passes._sequential`), each linear is quantized column by
column with every rounding error compensated through the inverse Hessian
(:func:`lowbit.numerics.gptq.gptq_quantize`); optionally with act-order and a Hessian-weighted
clipping search for each group's range.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.gptq import DEFAULT_CLIP_RATIOS, gptq_quantize
from lowbit.passes._sequential import quantize_sequentially
from lowbit.passes.rtn import WeightQuantOptions

__all__ = ["gptq", "GptqOptions"]


@dataclass(frozen=True)
class GptqOptions(WeightQuantOptions):
    act_order: bool = True          # visit columns by decreasing H_ii (static groups)
    damp: float = 0.01              # H += damp * mean(diag H) * I
    block_size: int = 128           # columns per lazy batch update
    clip_search: bool = True        # pick each group's range by Hessian-weighted error
    max_batches: int = 32           # calibration batches used
    float_target: bool = False      # fit the float model's outputs, not the layer's own
                                    # (asymmetric calibration, numerics.gptq.float_target)
    refine_rounds: int = 0          # refit group scales to the original weights, codes fixed;
                                    # > 1: rerun GPTQ on the refitted grids between refits
                                    # (numerics.gptq.refine_scales)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1 or self.max_batches < 1:
            raise ValueError("block_size and max_batches must be >= 1")
        if self.refine_rounds < 0:
            raise ValueError(f"refine_rounds must be >= 0, got {self.refine_rounds}")


@graph_pass(name="gptq", numerics="approx", requires=("calibration",),
            provides=("quantized_weights",), options=GptqOptions)
def gptq(graph, ctx) -> PassResult:
    """GPTQ: quantize column by column, compensating each error with the layer's Hessian."""
    o = ctx.options
    ratios = DEFAULT_CLIP_RATIOS if o.clip_search else (1.0,)

    def quantize(w, h, bits, group_size):
        return gptq_quantize(w, h, bits, group_size, o.symmetric, damp=o.damp,
                             block_size=o.block_size, act_order=o.act_order,
                             clip_ratios=ratios, refine_rounds=o.refine_rounds)
    return quantize_sequentially(graph, ctx, "gptq", quantize)
