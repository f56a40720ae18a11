"""clip: round-to-nearest with each group's range chosen by a clipping search.

OmniQuant's learnable weight clipping without training: per output row and group, the range
ratio (1.0 down to 0.6) minimising the Hessian-weighted output error ``e H_gg e^T`` of the
group, with Hessians from sequential calibration (:mod:`lowbit.passes._sequential`).
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.gptq import DEFAULT_CLIP_RATIOS, search_clip
from lowbit.numerics.quant import quantize_weight
from lowbit.passes._sequential import quantize_sequentially
from lowbit.passes.rtn import WeightQuantOptions

__all__ = ["clip", "ClipOptions"]


@dataclass(frozen=True)
class ClipOptions(WeightQuantOptions):
    max_batches: int = 32           # calibration batches used

    def __post_init__(self):
        super().__post_init__()
        if self.max_batches < 1:
            raise ValueError("max_batches must be >= 1")


@graph_pass(name="clip", numerics="approx", requires=("calibration",),
            provides=("quantized_weights",), options=ClipOptions)
def clip(graph, ctx) -> PassResult:
    """RTN with per-group ranges searched to minimise the layer's output error."""
    o = ctx.options

    def quantize(w, h, bits, group_size):
        ratio = search_clip(w, h, bits, group_size, o.symmetric, DEFAULT_CLIP_RATIOS)
        return quantize_weight(w, bits, group_size, o.symmetric, ratio)
    return quantize_sequentially(graph, ctx, "clip", quantize)
