"""Adapter of the :class:`~lowbit.compiler.graph.Graph` protocol over a torch.export module."""
from __future__ import annotations

import copy
import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

import lowbit.ops  # noqa: F401  (defines torch.ops.lowbit.*)
from lowbit.compiler._fx_run import Observing, StagedRun
from lowbit.compiler.graph import LinearSite, Observer, PackedLinear

__all__ = ["FxGraph", "StagedRun"]

_aten = torch.ops.aten
_LINEAR_TARGETS = {_aten.linear.default, _aten.addmm.default, _aten.mm.default}
_PACKED_MODULE = "lowbit_packed"


class FxGraph:
    """A captured model as a mutable FX graph (from ``torch.export(...).module()``).

    ``prefix`` is stripped from parameter paths to form model-level layer names.
    ``optional_inputs(batch)`` gives the values of inputs a caller may leave out (the empty
    KV cache of a causal LM captured in cache form).
    """

    form = "fx"

    def __init__(self, gm: fx.GraphModule, prefix: str = "",
                 optional_inputs: Callable[[int], dict[str, torch.Tensor]] | None = None):
        self.gm = gm
        self.prefix = prefix
        self.optional_inputs = optional_inputs
        if not hasattr(gm, _PACKED_MODULE):
            gm.add_module(_PACKED_MODULE, torch.nn.Module())
        # Drop computations whose results nobody reads (e.g. an encoder's unused pooler).
        gm.graph.eliminate_dead_code(
            is_impure_node=lambda n: n.op in ("call_module", "placeholder", "output")
            or n.is_impure())
        self._drop_unused_constants()
        gm.recompile()
        self._dirty = False
        self._index()

    # -- lookup -------------------------------------------------------------------------
    def _index(self) -> None:
        self._nodes = {n.name: n for n in self.gm.graph.nodes}

    def node(self, name: str) -> fx.Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no node named '{name}' in the graph") from None

    def nodes(self) -> list[str]:
        return [n.name for n in self.gm.graph.nodes]

    def op(self, node: str) -> str:
        n = self.node(node)
        if n.op == "placeholder":
            return "input"
        if n.op == "output":
            return "output"
        if n.op == "get_attr":
            return "constant"
        if n.op == "call_function":
            if n.target is torch.ops.lowbit.quant_linear.default:
                return "lowbit.quant_linear"
            if self._linear_parts(n) is not None:
                return "linear"
            name = getattr(n.target, "__name__", str(n.target))
            return name.split(".")[0]
        return n.op

    def inputs(self, node: str) -> list[str]:
        return [a.name for a in self.node(node).all_input_nodes]

    def consumers(self, node: str) -> list[str]:
        return [u.name for u in self.node(node).users]

    def attr(self, target: str) -> torch.Tensor:
        """The tensor a ``get_attr`` target names (parameter or buffer)."""
        mod_path, _, leaf = target.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        return getattr(mod, leaf)

    def _set_attr(self, target: str, value: torch.Tensor) -> None:
        mod_path, _, leaf = target.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        old = getattr(mod, leaf)
        if isinstance(old, torch.nn.Parameter):
            setattr(mod, leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, value.detach().clone())

    def _new_constant(self, key: str, value: torch.Tensor) -> str:
        store = getattr(self.gm, _PACKED_MODULE)
        name, i = key, 0
        while hasattr(store, name):
            i += 1
            name = f"{key}_{i}"
        store.register_buffer(name, value.detach().contiguous())
        return f"{_PACKED_MODULE}.{name}"

    def untie_constant(self, node: str, target: str, created_by: str) -> str:
        """Give ``node`` its own copy of the constant ``target`` (shared with other nodes).

        Returns the new constant's target. Used when tied weights (an embedding shared with
        the output head) must change differently.
        """
        n = self.node(node)
        olds = [a for a in n.all_input_nodes if a.op == "get_attr" and a.target == target]
        if not olds:
            raise KeyError(f"node '{node}' does not read constant '{target}'")
        new_target = self._new_constant(f"{node}_{target.replace('.', '_')}",
                                        self.attr(target).clone())
        with self.gm.graph.inserting_before(n):
            fresh = self.gm.graph.get_attr(new_target)
        fresh.meta["lowbit_created_by"] = created_by
        for old in olds:
            n.replace_input_with(old, fresh)
        self._dirty = True
        self._index()
        return new_target

    def insert_before_input(self, site: LinearSite, op, constants: Sequence[torch.Tensor],
                            created_by: str) -> str:
        """Feed ``site`` with ``op(x, *constants)`` instead of its input ``x``.

        ``op`` is a torch operator (``torch.ops.lowbit.hadamard.default``); the constants are
        stored as buffers. Returns the new node's name.
        """
        n = self.node(site.node)
        x = n.args[0] if n.target is _aten.linear.default else n.args[1]
        graph = self.gm.graph
        with graph.inserting_before(n):
            args = [graph.get_attr(self._new_constant(f"{site.node}_{created_by}_{i}", t))
                    for i, t in enumerate(constants)]
            new = graph.call_function(op, (x, *args))
        if "val" in x.meta:
            new.meta["val"] = x.meta["val"]
        new.meta["lowbit_created_by"] = created_by
        new.meta["lowbit_source"] = site.name
        n.replace_input_with(x, new)
        self._dirty = True
        self._index()
        return new.name

    def insert_on_input(self, sites: Sequence[LinearSite], op,
                        constants: Sequence[torch.Tensor], created_by: str) -> str:
        """Feed every site in ``sites`` (which read one value ``x``) with ``op(x, *constants)``.

        Unlike :meth:`insert_before_input`, ``op`` may change the last dimension (a channel
        split, say): the new node carries no shape metadata. Returns the new node's name.
        """
        nodes = [self.node(s.node) for s in sites]
        xs = {n.args[0] if n.target is _aten.linear.default else n.args[1] for n in nodes}
        if len(xs) != 1:
            raise ValueError(f"sites {[s.name for s in sites]} do not read one value")
        x = xs.pop()
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        first = min(nodes, key=order.__getitem__)
        graph = self.gm.graph
        with graph.inserting_before(first):
            args = [graph.get_attr(self._new_constant(f"{first.name}_{created_by}_{i}", t))
                    for i, t in enumerate(constants)]
            new = graph.call_function(op, (x, *args))
        new.meta["lowbit_created_by"] = created_by
        new.meta["lowbit_source"] = sites[0].name
        for n in nodes:
            n.replace_input_with(x, new)
        self._dirty = True
        self._index()
        return new.name

    def replace_embedding_table(self, node: str, codes: torch.Tensor, scales: torch.Tensor,
                                created_by: str) -> str:
        """Make the lookup ``node`` read integer ``codes`` ``[V, H]`` times per-row ``scales``
        ``[V, 1]``: ``embedding(codes, ids).float() * embedding(scales, ids)``, standard ops
        every backend lowers (a gather of the codes, a gather of the scales, a multiply).
        Returns the name of the node that now carries the embedding."""
        n = self.node(node)
        old_table, ids = n.args[0], n.args[1]
        graph = self.gm.graph
        with graph.inserting_before(n):
            q = graph.get_attr(self._new_constant(f"{node}_codes", codes))
            s = graph.get_attr(self._new_constant(f"{node}_scales", scales))
            eq = graph.call_function(_aten.embedding.default, (q, ids))
            ef = graph.call_function(_aten._to_copy.default, (eq,), {"dtype": torch.float32})
            es = graph.call_function(_aten.embedding.default, (s, ids))
            out = graph.call_function(_aten.mul.Tensor, (ef, es))
        for new in (q, s, eq, ef, es, out):
            new.meta["lowbit_created_by"] = created_by
        if "val" in n.meta:
            out.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        self._drop_if_unused([old_table] if isinstance(old_table, fx.Node) else [])
        self._dirty = True
        self._index()
        return out.name

    def norm_args(self, node: str) -> dict:
        """``{"width", "weight", "bias", "eps"}`` of a ``layer_norm``/``native_layer_norm``/
        ``rms_norm`` node: ``width`` the normalised size if it is one dimension, ``weight``
        and ``bias`` the nodes of the affine parts (or None), ``eps`` (None: op default)."""
        n = self.node(node)
        layer = self.op(node) in ("layer_norm", "native_layer_norm")
        names = ("input", "normalized_shape", "weight") + (("bias",) if layer else ())
        args = {"weight": None, "bias": None, "eps": 1e-5 if layer else None,
                **dict(zip(names + ("eps",), n.args)), **n.kwargs}
        shape = list(args["normalized_shape"])
        name = lambda a: a.name if isinstance(a, fx.Node) else None  # noqa: E731
        return {"width": int(shape[0]) if len(shape) == 1 else None,
                "weight": name(args["weight"]), "bias": name(args["bias"]), "eps": args["eps"]}

    def set_attr(self, target: str, value: torch.Tensor) -> None:
        """Replace the constant ``target`` names (a pass folding values into a norm, say)."""
        self._set_attr(target, value)
        self._dirty = True

    def layer_name(self, target: str) -> str:
        name = target[len(self.prefix):] if target.startswith(self.prefix) else target
        return re.sub(r"\.(weight|bias)$", "", name)

    # -- linears --------------------------------------------------------------------------
    def _linear_parts(self, n: fx.Node):
        """``(x, weight_target, bias_target, transposed)`` if ``n`` is a constant-weight linear."""
        if n.op != "call_function" or n.target not in _LINEAR_TARGETS:
            return None
        if n.target is _aten.linear.default:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            transposed = False
        elif n.target is _aten.addmm.default:
            if n.kwargs or len(n.args) > 3:  # beta/alpha given: not a plain linear
                return None
            b, x, w = n.args
            transposed = True
        else:
            x, w = n.args
            b, transposed = None, True
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            return None
        if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
            return None
        if self.attr(w.target).dim() != 2:
            return None
        return x, w.target, (b.target if b is not None else None), transposed

    def _site(self, n: fx.Node) -> LinearSite | None:
        parts = self._linear_parts(n)
        if parts is None:
            return None
        x, w, b, transposed = parts
        shape = self.attr(w).shape
        out_f, in_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        return LinearSite(node=n.name, name=self.layer_name(w), input=x.name, weight=w,
                          bias=b, in_features=int(in_f), out_features=int(out_f))

    def linears(self) -> list[LinearSite]:
        sites = (self._site(n) for n in self.gm.graph.nodes)
        return [s for s in sites if s is not None]

    def linear_weight(self, site: LinearSite) -> torch.Tensor:
        w = self.attr(site.weight).detach()
        return w.T if self.node(site.node).target is not _aten.linear.default else w

    def set_linear_weight(self, site: LinearSite, weight: torch.Tensor) -> None:
        if self.node(site.node).target is not _aten.linear.default:
            weight = weight.T.contiguous()
        self._set_attr(site.weight, weight)

    def replace_with_quant_linear(self, site: LinearSite, packed: PackedLinear,
                                  created_by: str) -> str:
        n = self.node(site.node)
        x = n.args[0] if n.target is _aten.linear.default else n.args[1]
        store = getattr(self.gm, _PACKED_MODULE)
        key = site.node
        tensors = {"qweight": packed.qweight, "scales": packed.scales,
                   "zero_points": packed.zero_points}
        if site.bias is not None:
            tensors["bias"] = self.attr(site.bias).detach().clone()
        graph = self.gm.graph
        with graph.inserting_before(n):
            args = {}
            for k, t in tensors.items():
                if t is None:
                    args[k] = None
                    continue
                store.register_buffer(f"{key}_{k}", t.contiguous())
                args[k] = graph.get_attr(f"{_PACKED_MODULE}.{key}_{k}")
            new = graph.call_function(
                torch.ops.lowbit.quant_linear.default,
                (x, args["qweight"], args["scales"], args["zero_points"], args.get("bias"),
                 packed.in_features, packed.bits, packed.group_size, packed.act_bits,
                 float(packed.act_clip))
                + (() if packed.act_symmetric else (False,)))
        new.meta.update(n.meta)
        new.meta["lowbit_created_by"] = created_by
        new.meta["lowbit_source"] = site.name
        old_attrs = [a for a in n.all_input_nodes if a.op == "get_attr"]
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        self._drop_if_unused(old_attrs)
        self._nodes.pop(n.name, None)
        self._nodes[new.name] = new
        for a in new.all_input_nodes:
            self._nodes[a.name] = a
        self._dirty = True
        return new.name

    def _drop_if_unused(self, attrs: list[fx.Node]) -> None:
        for a in attrs:
            if a.users:
                continue
            target = a.target
            self.gm.graph.erase_node(a)
            self._nodes.pop(a.name, None)
            if not any(m.op == "get_attr" and m.target == target for m in self.gm.graph.nodes):
                mod_path, _, leaf = target.rpartition(".")
                mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
                delattr(mod, leaf)

    def _drop_unused_constants(self) -> None:
        self._drop_if_unused([n for n in self.gm.graph.nodes if n.op == "get_attr"])

    def sync(self) -> fx.GraphModule:
        """Regenerate the module's code after graph edits; returns the module."""
        if self._dirty:
            self.gm.recompile()
            self._dirty = False
        return self.gm

    def quant_linears(self) -> dict[str, dict[str, Any]]:
        out = {}
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.lowbit.quant_linear.default:
                qweight = self.attr(n.args[1].target)
                in_f, bits, group, act_bits = n.args[5:9]
                act_clip = n.args[9] if len(n.args) > 9 else 1.0
                out[n.name] = {"name": n.meta.get("lowbit_source", n.name), "bits": bits,
                               "group_size": group, "act_bits": act_bits,
                               "act_clip": act_clip,
                               "act_symmetric": bool(n.args[10]) if len(n.args) > 10 else True,
                               "in_features": in_f, "out_features": int(qweight.shape[0]),
                               "symmetric": n.args[3] is None,
                               "created_by": n.meta.get("lowbit_created_by")}
        return out

    # -- execution ------------------------------------------------------------------------
    def placeholders(self) -> list[str]:
        return [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]

    def complete(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` plus the default value of every optional input left out."""
        out = dict(inputs)
        if self.optional_inputs is not None and inputs:
            batch = next(iter(inputs.values())).shape[0]
            for k, v in self.optional_inputs(batch).items():
                out.setdefault(k, v)
        return out

    def run(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
            observe: Mapping[str, Observer] | None = None) -> list[torch.Tensor]:
        if isinstance(inputs, Mapping):
            inputs = self.complete(inputs)
            names = self.placeholders()
            missing = [k for k in names if k not in inputs]
            if missing:
                raise KeyError(f"graph inputs {missing} not given (have {sorted(inputs)})")
            args = [inputs[k] for k in names]
        else:
            args = list(inputs)
        with torch.no_grad():
            gm = self.sync()
            out = Observing(gm, observe).run(*args) if observe else gm(*args)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return [t for t in flat if isinstance(t, torch.Tensor)]

    def copy(self) -> "FxGraph":
        """An independent copy (weights included) to transform without touching this one."""
        return FxGraph(copy.deepcopy(self.sync()), self.prefix, self.optional_inputs)

    def staged(self, inputs: Sequence[Mapping[str, torch.Tensor]]) -> "StagedRun":
        """Run the graph over ``inputs`` stage by stage (see :class:`StagedRun`)."""
        return StagedRun(self, inputs)

    def dump(self) -> str:
        lines = []
        for n in self.gm.graph.nodes:
            src = n.meta.get("lowbit_source")
            by = n.meta.get("lowbit_created_by")
            extra = f"  # {src} (by {by})" if by else ""
            args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a)
                             for a in n.args if not isinstance(a, (list, tuple)))
            lines.append(f"{n.name} = {self.op(n.name)}({args}){extra}")
        return "\n".join(lines)

    def num_parameters_bytes(self) -> int:
        """Bytes of every tensor the graph module holds (float weights + packed buffers)."""
        seen, total = set(), 0
        for t in list(self.gm.parameters()) + list(self.gm.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total
