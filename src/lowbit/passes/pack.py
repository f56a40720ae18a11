"""pack: pack quantized weights into bytes and rewrite each linear as one quant_linear node."""
from __future__ import annotations

from lowbit.compiler.graph import PackedLinear
from lowbit.compiler.passes import NoOptions, PassResult, graph_pass
from lowbit.numerics.packing import pack_codes, pack_zero_points
from lowbit.numerics.quant import QuantizedWeight

__all__ = ["pack", "pack_weight"]


def pack_weight(qw: QuantizedWeight, act_bits: int = 0, act_clip: float = 1.0,
                act_symmetric: bool = True) -> PackedLinear:
    """The packed form of ``qw``; symmetric grids store no zero points."""
    return PackedLinear(
        qweight=pack_codes(qw.codes, qw.bits), scales=qw.scales.contiguous(),
        zero_points=None if qw.symmetric else pack_zero_points(qw.zero_points, qw.bits),
        in_features=qw.in_features, bits=qw.bits, group_size=qw.group_size,
        act_bits=act_bits, act_clip=act_clip, act_symmetric=act_symmetric)


@graph_pass(name="pack", numerics="approx", requires=("quantized_weights",),
            provides=("packed",), consumes=("quantized_weights", "activation_quant"),
            options=NoOptions)
def pack(graph, ctx) -> PassResult:
    """Replace each quantized linear by a quant_linear node holding packed bytes."""
    qws = ctx.analysis["quantized_weights"]
    acts = ctx.analysis.get("activation_quant", {})
    clips = ctx.analysis.get("activation_clip", {})
    asymmetric = ctx.analysis.get("activation_asymmetric", set())
    sites = {s.node: s for s in graph.linears()}
    done, nbytes = [], 0
    for node, qw in qws.items():
        site = sites[node]
        packed = pack_weight(qw, acts.get(node, 0), clips.get(node, 1.0),
                             node not in asymmetric)
        graph.replace_with_quant_linear(site, packed, created_by="pack")
        done.append(site.name)
        nbytes += packed.nbytes
    return PassResult(transformed=tuple(done), metrics={"packed_bytes": nbytes})
