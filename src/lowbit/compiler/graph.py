"""The small graph protocol every pass is written against.

Two adapters implement it: :class:`lowbit.compiler.fx_graph.FxGraph` (torch.export / FX) and,
later, an ONNX adapter. Nodes are referred to by their (stable, unique) string names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Graph", "LinearSite", "PackedLinear", "Observer"]

#: Called with the value a node produced, once per observed node and graph run.
Observer = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class LinearSite:
    """A linear layer found in the graph: ``y = x @ W^T + b``.

    ``node`` is the graph node computing it; ``name`` the model-level name it came from
    (``model.layers.0.mlp.down_proj``); ``input`` the node producing ``x``.
    """
    node: str
    name: str
    input: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int


@dataclass(frozen=True)
class PackedLinear:
    """Everything a quantized-linear node holds (layout of :mod:`lowbit.numerics.packing`)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    in_features: int
    bits: int
    group_size: int
    act_bits: int = 0
    act_clip: float = 1.0           # activation range = act_clip * max|x| per token
    act_symmetric: bool = True      # False: per-token [min, max] grid with a zero point

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight, scales and zero points as stored."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zero_points) if t is not None)


@runtime_checkable
class Graph(Protocol):
    """What a pass may ask of a graph. Keep this small."""

    form: str

    def nodes(self) -> list[str]:
        """All node names in topological order."""

    def op(self, node: str) -> str:
        """Canonical op kind: ``input``, ``output``, ``constant``, ``linear``,
        ``lowbit.quant_linear`` or the framework op's short name (``mul``, ``view``...)."""

    def inputs(self, node: str) -> list[str]:
        """Names of the nodes whose values ``node`` reads (tensor inputs only)."""

    def consumers(self, node: str) -> list[str]:
        """Names of the nodes that read ``node``'s value."""

    def linears(self) -> list[LinearSite]:
        """Every float linear layer with a constant weight."""

    def linear_weight(self, site: LinearSite) -> torch.Tensor:
        """The weight of ``site`` as ``[out_features, in_features]``."""

    def set_linear_weight(self, site: LinearSite, weight: torch.Tensor) -> None:
        """Replace the weight of ``site`` (``[out_features, in_features]``)."""

    def replace_with_quant_linear(self, site: LinearSite, packed: PackedLinear,
                                  created_by: str) -> str:
        """Replace ``site`` by one quantized-linear node; returns the new node's name."""

    def quant_linears(self) -> dict[str, dict[str, Any]]:
        """Quantized-linear nodes: name -> attributes (``bits``, ``group_size``...)."""

    def complete(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` plus the default value of each optional input left out (a KV cache)."""

    def run(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
            observe: Mapping[str, Observer] | None = None) -> list[torch.Tensor]:
        """Evaluate the graph; ``observe`` maps node names to callbacks fed their values."""

    def dump(self) -> str:
        """A human-readable listing of the graph."""
