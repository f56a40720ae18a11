"""ONNX graph edits the ``rotate`` pass needs beyond the Graph protocol (ONNX form only).

The counterparts of :mod:`lowbit.passes._fx_edits` on an
:class:`~lowbit.compiler.onnx_graph.OnnxGraph`; new nodes record the creating pass in their
``lowbit.created_by`` metadata.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from lowbit.compiler import _onnx_build as build
from lowbit.compiler.graph import LinearSite

__all__ = ["replace_layer_norm", "set_linear_bias"]


def set_linear_bias(graph, site: LinearSite, bias: torch.Tensor, created_by: str) -> None:
    """Give ``site`` the bias ``bias`` (``[out_features]``), adding one if it has none.

    A ``Gemm`` gets its ``C`` input; a ``MatMul`` is followed by an ``Add`` of the new
    constant, which the adapter folds into the same linear node (the name is kept).
    """
    if site.bias is not None:
        graph.set_attr(site.bias, bias)
        return
    lin = graph._linear(site)
    arr = bias.detach().contiguous().numpy().astype(lin.weight.const_value.dtype.numpy())
    b = graph.new_initializer(f"{site.node}_bias", arr)
    if lin.main.op_type == "Gemm":
        lin.main.resize_inputs(3)
        lin.main.replace_input_with(2, b)
    else:
        y = lin.main.outputs[0]
        add = ir.node("Add", [y, b], name=graph.fresh_name(f"{site.node}_bias_add"),
                      metadata_props={"lowbit.created_by": created_by})
        graph.graph.insert_after(lin.main, add)
        out = add.outputs[0]
        was_output = y.is_graph_output()
        y.replace_all_uses_with(out, replace_graph_outputs=True)
        add.replace_input_with(0, y)
        if was_output:
            name = y.name
            y.name = graph.fresh_name(f"{name}_nobias")
            out.name = name
        else:
            out.name = graph.fresh_name(f"{site.node}_biased")
    graph._touch(structure=True)


def replace_layer_norm(graph, output: str, eps: float, created_by: str) -> str:
    """Replace the LayerNorm ``output`` by ``x * rsqrt(mean(x^2, -1) + eps)``.

    Exact under the conditions of :func:`lowbit.passes._fx_edits.replace_layer_norm`.
    The new nodes are the decomposed RMS pattern, so structural matchers find it again.
    Returns the name of the new output node.
    """
    e = graph._entry(output)
    ln = e.parts[-1]
    x = ln.inputs[0]
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    b = build.Builder(graph, graph.fresh_name(f"{output}_rms"), "rms", created_by,
                      grouped=False)
    y = build.rms_normalize(b, x, eps, dtype)
    graph._splice(e, b.finish(y), y)
    return b.group
