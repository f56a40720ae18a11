"""Compiled FX graph -> Relax IRModule (``relax.frontend.torch.from_exported_program``).

The graph is re-exported with the model's dynamic dimensions, every weight (packed or float)
made a parameter so that it stays a function input (saved next to the library, not inside
it), then imported with a converter map in which

* ``lowbit.quant_linear`` / ``lowbit.hadamard`` emit lowbit's kernels (:mod:`._emit`);
* symbols that torch.export gave one ``Dim`` on different inputs are made one shape var
  (the cache's past length has come out as s15 on some layers and s92 on others: Relax then
  sees unrelated lengths, and building failed with ``VarRemapGet(source) == nullptr``);
* every stock converter is wrapped to repair what the 0.27 importer gets wrong on exported
  Hugging Face graphs: a result whose shape it could not simplify (``min(1, s)`` terms from
  the mask arithmetic; TVM does not know ``s >= 2``) is ``match_cast`` to the shape torch
  inferred; ``cumsum`` of a bool tensor is computed in torch's result dtype (the importer
  keeps ``bool``, which LLVM code generation rejects); negative slice dims are normalised;
  ``x ** n`` for integers ``n <= 4`` is multiplied out (CUDA's fast ``powf`` is NaN for
  negative ``x``).
"""
from __future__ import annotations

from typing import Callable

import sympy
import torch

from lowbit.backends import ModelSpec
from lowbit.backends._export import export_program, spec_dynamic_shapes
from lowbit.backends.tvm._emit import Emitter
from lowbit.backends.tvm.kernels import HadamardSpec, QuantLinearSpec
from lowbit.errors import LoweringError

__all__ = ["import_graph"]

_QUANT_LINEAR, _HADAMARD = "quant_linear.default", "hadamard.default"


def _weights_as_parameters(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A module over a copy of ``gm``'s graph whose tensors are all (frozen) parameters."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    attrs = {}
    for node in graph.nodes:
        if node.op == "call_module":
            attrs[node.target] = gm.get_submodule(node.target)
        elif node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                value = torch.nn.Parameter(value.detach(), requires_grad=False)
            attrs[node.target] = value
    return torch.fx.GraphModule(attrs, graph)


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _to_prim(expr, symbols: dict):
    """A torch symbolic size (sympy) -> TIR expression over the importer's shape vars."""
    if isinstance(expr, int):
        return expr
    expr = expr.node.expr if hasattr(expr, "node") else expr
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return symbols.get(expr.name)
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        parts = [_to_prim(a, symbols) for a in expr.args]
        if any(p is None for p in parts):
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out + p if isinstance(expr, sympy.Add) else out * p
        return out
    return None


def _dim_aliases(ep: torch.export.ExportedProgram, spec: ModelSpec) -> dict[str, str]:
    """Symbol -> the symbol of the first input with the same ``torch.export.Dim``, for every
    input dim that came out under a symbol of its own."""
    first, aliases = {}, {}
    inputs = {n.name: n for n in ep.graph.find_nodes(op="placeholder")}
    for name, dims in zip(spec.input_names, spec_dynamic_shapes(spec) or ()):
        shape = inputs[name].meta["val"].shape
        for axis, dim in dims.items():
            if not isinstance(shape[axis], torch.SymInt):
                continue
            expr = shape[axis].node.expr
            if isinstance(expr, sympy.Symbol):
                canonical = first.setdefault(dim.__name__, expr.name)
                if expr.name != canonical:
                    aliases[expr.name] = canonical
    return aliases


def _merge_aliases(main, aliases: dict[str, str]):
    """``main`` with each alias shape var replaced by its canonical one."""
    from tvm import tirx
    if not aliases:
        return main
    shape_vars = {d.name: d for p in main.params if p.ty.shape is not None
                  for d in p.ty.shape if isinstance(d, tirx.Var)}
    main = main.bind_symbolic_vars({a: shape_vars[c] for a, c in aliases.items()
                                    if a in shape_vars and c in shape_vars})
    bounds = main.attrs.get("tir_var_lower_bound") if main.attrs else None
    if bounds is not None:
        main = main.with_attr("tir_var_lower_bound",
                              {k: v for k, v in bounds.items() if k not in aliases})
    return main


def _sym(value) -> sympy.Expr:
    """An FX argument / torch size (int, SymInt, or a node computing one) as sympy."""
    if isinstance(value, torch.fx.Node):
        value = value.meta["val"]
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return sympy.Integer(int(value))


def _is_polynomial(expr) -> bool:
    """Only constants, shape variables, + and * (no min/max/select left to prove)."""
    from tvm import tirx
    if isinstance(expr, (tirx.IntImm, tirx.Var)):
        return True
    if isinstance(expr, (tirx.Add, tirx.Mul, tirx.Sub)):
        return _is_polynomial(expr.a) and _is_polynomial(expr.b)
    return False


class _Converters:
    """The converter map handed to the importer (see the module doc)."""

    def __init__(self, emitter: Emitter, names):
        self.emitter = emitter
        self.names = list(names)
        self._stock: dict[int, dict] = {}
        self._symbols: dict[str, object] = {}

    def table(self) -> dict[str, Callable]:
        table = {name: self._wrap(name) for name in self.names}
        table[_QUANT_LINEAR] = self.quant_linear
        table[_HADAMARD] = self.hadamard
        return table

    def _stock_map(self, importer) -> dict:
        key = id(importer)
        if key not in self._stock:
            self._stock = {key: importer.create_convert_map()}
        return self._stock[key]

    def _shape_vars(self, importer) -> dict:
        from tvm import relax, tirx
        if not self._symbols:
            for value in importer.env.values():
                if isinstance(value, relax.Var) and isinstance(value.ty, relax.TensorType) \
                        and value.ty.shape is not None:
                    for d in value.ty.shape:
                        if isinstance(d, tirx.Var):
                            self._symbols[d.name] = d
        return self._symbols

    def _wrap(self, name: str) -> Callable:
        def convert(node, importer):
            if name == "cumsum.default":
                return self._cumsum(node, importer)
            if name == "pow.Tensor_Scalar":
                product = self._integer_power(node, importer)
                if product is not None:
                    return product
            if name == "slice.Tensor":
                sliced = self._slice(node, importer)
                if sliced is not None:
                    return sliced
                if len(node.args) > 1 and node.args[1] < 0:     # the stock one needs dim >= 0
                    node.args = (node.args[0], node.args[1] % node.args[0].meta["val"].dim(),
                                 *node.args[2:])
            return self._repair_shape(node, importer, self._stock_map(importer)[name](node))
        return convert

    def _repair_shape(self, node, importer, result):
        from tvm import relax
        val = node.meta.get("val")
        if not (isinstance(result, relax.Expr) and isinstance(val, torch.Tensor)
                and isinstance(result.ty, relax.TensorType)):
            return result
        shape = result.ty.shape
        if shape is not None and all(_is_polynomial(d) for d in shape):
            return result
        dims = [_to_prim(d, self._shape_vars(importer)) for d in val.shape]
        if any(d is None for d in dims):
            return result
        return importer.block_builder.match_cast(result, relax.TensorType(dims, result.ty.dtype))

    def _slice(self, node, importer):
        """An in-bounds slice (torch's result length is ``end - start``) as a
        ``strided_slice(assume_inbound=True)``: the stock lowering clamps symbolic bounds with
        ``if_then_else`` shape terms that Relax's operator fusion cannot type."""
        from tvm import relax
        x_node, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
        val, src = node.meta.get("val"), x_node.meta.get("val")
        if step != 1 or not isinstance(val, torch.Tensor) or not isinstance(src, torch.Tensor):
            return None
        dim %= src.dim()
        start, end = (_sym(0 if start is None else start),
                      _sym(src.shape[dim] if end is None else end))
        if end.is_Integer and end > 2 ** 62:     # x[a:] is exported with end=INT64_MAX
            end = _sym(src.shape[dim])
        if sympy.simplify(_sym(val.shape[dim]) - (end - start)) != 0:
            return None
        symbols = self._shape_vars(importer)
        begin, stop = _to_prim(start, symbols), _to_prim(end, symbols)
        if begin is None or stop is None:
            return None
        return importer.block_builder.emit(relax.op.strided_slice(
            importer.env[x_node], axes=[dim], begin=[begin], end=[stop], strides=[1],
            assume_inbound=True))

    def _integer_power(self, node, importer):
        """``x ** n`` for a small positive integer ``n`` as ``n - 1`` multiplications. The
        stock ``power`` becomes ``powf``, which CUDA's fast math (TVM compiles kernels with
        ``--use_fast_math``) computes as ``exp2(n * log2(x))``: NaN for every negative ``x``,
        so RMSNorm's ``x.pow(2)`` turned half of the hidden state into NaN on a GPU."""
        from tvm import relax
        n = node.args[1]
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) \
                or not 1 <= n <= 4:
            return None
        x = importer.env[node.args[0]]
        bb, out = importer.block_builder, x
        for _ in range(int(n) - 1):
            out = bb.emit(relax.op.multiply(out, x))
        return out

    def _cumsum(self, node, importer):
        from tvm import relax
        x = importer.env[node.args[0]]
        want = str(node.meta["val"].dtype).removeprefix("torch.")
        bb = importer.block_builder
        if x.ty.dtype != want:
            x = bb.emit(relax.op.astype(x, want))
        return bb.emit(relax.op.cumsum(x, axis=node.args[1], dtype=want))

    def quant_linear(self, node, importer):
        x, qweight, scales, zero_points, bias = importer.retrieve_args(node)[:5]
        in_f, bits, group, act_bits = node.args[5:9]
        act_clip = node.args[9] if len(node.args) > 9 else 1.0
        spec = QuantLinearSpec(
            out_features=int(node.args[1].meta["val"].shape[0]), in_features=int(in_f),
            bits=int(bits), group_size=int(group), has_zero_points=zero_points is not None,
            has_bias=bias is not None, act_bits=int(act_bits), act_clip=float(act_clip))
        return self.emitter.quant_linear(importer.block_builder, x, qweight, scales,
                                         zero_points, bias, spec)

    def hadamard(self, node, importer):
        x, left, right = importer.retrieve_args(node)
        spec = HadamardSpec(int(node.args[1].meta["val"].shape[0]),
                            int(node.args[2].meta["val"].shape[0]))
        return self.emitter.hadamard(importer.block_builder, x, left, right, spec)


def import_graph(gm: torch.fx.GraphModule, spec: ModelSpec, cpu: bool,
                 accuracy: str = "float", vnni: bool = False):
    """Return ``(IRModule, params)``: ``main(*inputs, *params)`` and the parameter tensors
    (torch, in the order ``main`` takes them); ``accuracy`` as the llvm backend option,
    ``vnni``: the CPU target has AVX512-VNNI."""
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    ep = export_program(_weights_as_parameters(gm), spec).run_decompositions()
    stock = ExportedProgramImporter().create_convert_map()
    missing = sorted({f"{n.target.__name__} (node {n.name})" for n in ep.graph.nodes
                      if n.op == "call_function" and n.target.__name__ not in stock
                      and n.target.__name__ not in (_QUANT_LINEAR, _HADAMARD)})
    if missing:
        raise LoweringError(f"TVM's torch importer cannot convert {len(missing)} graph op(s): "
                            f"{', '.join(missing[:10])}. Fix: target='onnxruntime' or 'torch'")
    converters = _Converters(Emitter(cpu, accuracy, vnni), stock)
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                custom_convert_map=converters.table())
    by_arg = {s.arg.name: s.target for s in ep.graph_signature.input_specs}
    main = _merge_aliases(mod["main"], _dim_aliases(ep, spec))
    n_inputs = int(main.attrs["num_input"])
    state = ep.state_dict
    params = [state[by_arg[v.name]] for v in main.params[n_inputs:]]
    # the export's bounds (batch <= 1024, seq <= max_seq) would make memory planning reserve
    # every tensor at its largest size, [1024, 1, 8192, 8192] masks included: plan per call
    mod["main"] = main.without_attr("params").without_attr("tir_var_upper_bound")
    return mod, params
