"""Running an FX graph: with observers on chosen nodes, or stage by stage over many batches."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.fx as fx

from lowbit.compiler.graph import Observer

if TYPE_CHECKING:
    from lowbit.compiler.fx_graph import FxGraph

__all__ = ["Observing", "StagedRun"]


class Observing(fx.Interpreter):
    """An interpreter that hands chosen nodes' values to callbacks as they are computed."""

    def __init__(self, gm: fx.GraphModule, observe: Mapping[str, Observer]):
        super().__init__(gm)
        self._observe = observe

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        cb = self._observe.get(n.name)
        if cb is not None:
            cb(out)
        return out


class StagedRun:
    """Evaluate a graph over many input batches in node order, stopping where asked.

    ``advance(node)`` runs every batch up to and including ``node`` and returns its values.
    Only values still needed later are kept, so memory is one stage's live activations per
    batch, not the whole model's. Weights are read when a node runs, so a pass may replace the
    weights of layers it has not reached yet (sequential GPTQ feeds each layer the outputs of
    the already-quantized layers before it).

    Example:
        >>> import torch
        >>> from lowbit.compiler.capture import capture
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> g = capture(m, example_inputs=(torch.randn(2, 4),)).graph
        >>> run = g.staged([{"input": torch.ones(2, 4)}])
        >>> [tuple(v.shape) for v in run.advance(g.linears()[0].node)]
        [(2, 4)]
    """

    def __init__(self, graph: "FxGraph", inputs: Sequence[Mapping[str, torch.Tensor]]):
        self.graph = graph
        self.order = [n for n in graph.sync().graph.nodes if n.op != "output"]
        self._index = {n: i for i, n in enumerate(self.order)}
        self._last_use = {n: max((self._index.get(u, len(self.order)) for u in n.users),
                                 default=-1) for n in self.order}
        holders = [n for n in self.order if n.op == "placeholder"]
        self.envs: list[dict[fx.Node, Any]] = []
        for batch in inputs:
            if isinstance(batch, Mapping):
                batch = graph.complete(batch)
                args = [batch[n.name] if n.name in batch else batch[n.target] for n in holders]
            else:
                args = list(batch)
            self.envs.append(dict(zip(holders, args)))
        self.pos = len(holders)

    def _value(self, env: dict, a: fx.Node) -> Any:
        return self.graph.attr(a.target) if a.op == "get_attr" else env[a]

    def advance(self, node: str) -> list[torch.Tensor]:
        """Run all batches up to ``node`` (inclusive); returns its value per batch."""
        target = self.graph.node(node)
        stop = self._index[target]
        if stop < self.pos:
            raise ValueError(f"node '{node}' was already passed (stages must go forward)")
        todo = [n for n in self.order[self.pos:stop + 1] if n.op == "call_function"]
        with torch.no_grad():
            for env in self.envs:
                for n in todo:
                    args = fx.node.map_arg(n.args, lambda a: self._value(env, a))
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: self._value(env, a))
                    env[n] = n.target(*args, **kwargs)
                for k in [k for k in env if self._last_use[k] <= stop and k is not target]:
                    del env[k]
        self.pos = stop + 1
        return [env[target] for env in self.envs]
