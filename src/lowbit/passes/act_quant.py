"""act_quant: dynamic per-token activation quantization at the input of quantized linears.

With per-channel weights the layer runs as an integer matmul (int8 x int8 on onnxruntime's
``MatMulInteger``; an exact integer emulation on the torch reference). Grouped weights have no
integer kernel: with ``integer_only=False`` their input is quantized and dequantized per token
(fake quantization) before the weight-only kernel, which gives the accuracy of an A4/A8
deployment but not its speed; with ``integer_only=True`` (the default) they are refused.
``symmetric=False`` (fake-quantized layers only) quantizes each token on its ``[min, max]``
range with a zero point instead of ``[-max|x|, max|x|]``: all ``2**bits`` levels, a finer
step for tokens mostly of one sign (``numerics.quant.quantize_activation_per_token``).
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.errors import PassError

__all__ = ["act_quant", "ActQuantOptions"]


@dataclass(frozen=True)
class ActQuantOptions:
    bits: int = 8
    granularity: str = "per_token"      # the only one: dynamic, per token
    integer_only: bool = True           # refuse grouped weights (no integer kernel; module doc)
    clip_ratio: float = 1.0             # range = clip_ratio * max|x| per token (QuaRot: 0.9)
    symmetric: bool = True              # False: [min, max] grid with a zero point per token

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be in 2..8, got {self.bits}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.granularity != "per_token":
            raise ValueError("granularity must be 'per_token'")


@graph_pass(name="act_quant", numerics="analysis", requires=("quantized_weights",),
            provides=("activation_quant",), preserves=("graph",), options=ActQuantOptions)
def act_quant(graph, ctx) -> PassResult:
    """Mark quantized linears to quantize their input per token (integer matmul)."""
    qws = ctx.analysis["quantized_weights"]
    names = {s.node: s.name for s in graph.linears()}
    plan = {}
    for node, qw in qws.items():
        if qw.codes.shape[1] != 1 and ctx.options.integer_only:
            raise PassError(f"integer activations need per-channel weights, but "
                            f"'{names.get(node, node)}' has group_size={qw.group_size}. Fix: "
                            "set group_size: null in the weight quantizer, or integer_only: "
                            "false to fake-quantize its input (accuracy only, no speed-up)",
                            pass_name="act_quant", node=node)
        if qw.codes.shape[1] == 1 and not ctx.options.symmetric:
            raise PassError(f"asymmetric activations are fake-quantized before a grouped "
                            f"weight-only kernel, but '{names.get(node, node)}' has "
                            "per-channel weights (the integer path, symmetric only). Fix: "
                            "symmetric: true, or a group_size in the weight quantizer",
                            pass_name="act_quant", node=node)
        plan[node] = ctx.options.bits
    ctx.analysis["activation_quant"] = plan
    if not ctx.options.symmetric:
        ctx.analysis["activation_asymmetric"] = set(plan)
    if ctx.options.clip_ratio != 1.0:
        ctx.analysis["activation_clip"] = {n: ctx.options.clip_ratio for n in plan}
    return PassResult(changed=False, transformed=tuple(names.get(n, n) for n in plan))
