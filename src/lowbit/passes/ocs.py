"""ocs: outlier channel splitting (OCS, Zhao et al. 2019; QLLM's channel disassembly), exact.

A linear ``y = W x`` reads input channel ``j`` through column ``W[:, j]``. Splitting the
channel into ``c`` copies of ``x_j / c`` and repeating the column ``c`` times leaves ``y``
unchanged, and shrinks that channel's range by ``c``::

    x' = [x * keep, x[index] * extra],     W' = [W, W[:, index]]

with ``keep_j = extra_t = 1 / c_j`` for a channel split ``c_j`` ways (``index`` lists channel
``j`` ``c_j - 1`` times). A per-token activation quantizer takes its range from the largest
``|x_j|``: after the split it sees the next largest.

Which channels: per value read by linears (one split node feeds all of them, so q/k/v keep
sharing their input), calibration gives each channel's ``max |x_j|``; the channel with the
largest ``max |x_j| / c_j`` is split once more, greedily (as OCS does), until
``expand_ratio * K`` channels were added or (with ``threshold``) every channel is below
``threshold * median``. The added node is plain torch ops (``mul``, ``index_select``,
``cat``), which every backend lowers. The linears' K grows; a grid's last partial group
absorbs the new channels (SmolLM2's K = 576 has 64 padding channels at group 128).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.passes._sequential import stages
from lowbit.passes.patterns import select_linears

__all__ = ["ocs", "OcsOptions", "split_channels", "plan_split"]


@dataclass(frozen=True)
class OcsOptions:
    expand_ratio: float = 0.02       # at most this fraction of K added per value
    threshold: float | None = None   # stop once every channel is below threshold * median
    max_batches: int = 8             # calibration batches for the channel ranges
    include_head: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0 <= self.expand_ratio <= 1:
            raise ValueError(f"expand_ratio must be in [0, 1], got {self.expand_ratio}")
        if self.threshold is not None and self.threshold <= 1:
            raise ValueError(f"threshold (x median) must be > 1, got {self.threshold}")
        if self.max_batches < 1:
            raise ValueError("max_batches must be >= 1")
        object.__setattr__(self, "exclude", tuple(self.exclude))


def split_channels(x: torch.Tensor, index: torch.Tensor, keep: torch.Tensor,
                   extra: torch.Tensor) -> torch.Tensor:
    """``[x * keep, x[..., index] * extra]`` (module doc): the node ``ocs`` inserts."""
    return torch.cat([x * keep, torch.index_select(x, -1, index) * extra], dim=-1)


def plan_split(absmax: torch.Tensor, budget: int, threshold: float | None = None
               ) -> torch.Tensor:
    """Ways ``c_j >= 1`` to split each channel: greedy on ``absmax / c`` (module doc)."""
    ways = torch.ones_like(absmax, dtype=torch.int64)
    a = absmax.to(torch.float64)
    limit = None if threshold is None else threshold * float(a.median())
    for _ in range(budget):
        cur = a / ways
        j = int(cur.argmax())
        if limit is not None and float(cur[j]) <= limit:
            break
        ways[j] += 1
    return ways


@graph_pass(name="ocs", numerics="exact", requires=("calibration",), options=OcsOptions)
def ocs(graph, ctx) -> PassResult:
    """Split the largest input channels of every linear (exact; see module doc)."""
    o = ctx.options
    sites, skipped = select_linears(graph, o.include_head, o.exclude)
    groups = stages(graph, sites)
    absmax = {v: torch.zeros(group[0].in_features) for v, group in groups.items()}

    def observer(value):
        def update(x):
            absmax[value] = torch.maximum(absmax[value],
                                          x.detach().reshape(-1, x.shape[-1]).abs().amax(0))
        return update
    observe = {v: observer(v) for v in groups}
    for batch in tqdm(ctx.calibration[: o.max_batches], desc="ocs ranges",
                      disable=not ctx.progress, leave=False):
        graph.run(batch, observe=observe)
    added, shrink, done = {}, {}, []
    for value, group in groups.items():
        a = absmax[value]
        ways = plan_split(a, int(round(o.expand_ratio * a.numel())), o.threshold)
        index = torch.repeat_interleave(torch.arange(a.numel()), ways - 1)
        if index.numel() == 0:
            skipped.extend((s.name, "no channel above the threshold to split") for s in group)
            continue
        keep = (1.0 / ways).to(a.dtype)
        for s in group:
            w = graph.linear_weight(s)
            graph.set_linear_weight(s, torch.cat([w, w[:, index]], dim=1))
        graph.insert_on_input(group, split_channels, [index, keep, keep[index]], "ocs")
        label = " + ".join(s.name for s in group)
        added[label] = int(index.numel())
        shrink[label] = round(float(a.max() / (a / ways).max()), 3)
        done.extend(s.name for s in group)
    return PassResult(transformed=tuple(done), skipped=tuple(skipped),
                      metrics={"channels_added": added, "range_shrink": shrink,
                               "total_channels_added": sum(added.values())})
