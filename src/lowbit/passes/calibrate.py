"""calibrate: per-channel activation statistics at the input of every linear."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult, graph_pass

__all__ = ["calibrate", "CalibrateOptions", "ActivationStats"]


@dataclass(frozen=True)
class CalibrateOptions:
    max_batches: int = 32          # calibration batches to run (each one input dict)

    def __post_init__(self):
        if self.max_batches < 1:
            raise ValueError("max_batches must be >= 1")


@dataclass
class ActivationStats:
    """Running statistics of one linear's input ``x [..., K]``."""
    absmax: torch.Tensor            # [K] max |x| per input channel
    sq_sum: torch.Tensor            # [K] sum of x^2 per channel (float64)
    tokens: int = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(0))
        self.sq_sum += flat.to(torch.float64).pow(2).sum(0)
        self.tokens += flat.shape[0]

    @property
    def outlier_ratio(self) -> float:
        """max over channels of absmax / median channel absmax."""
        med = self.absmax.median().clamp(min=1e-12)
        return float(self.absmax.max() / med)


@graph_pass(name="calibrate", numerics="analysis", requires=("calibration",),
            provides=("activation_stats",), preserves=("graph",), options=CalibrateOptions)
def calibrate(graph, ctx) -> PassResult:
    """Record per-channel |x| max and mean square at every linear's input."""
    sites = graph.linears()
    stats: dict[str, ActivationStats] = {}
    observe = {}
    for s in sites:
        st = stats.setdefault(s.input, ActivationStats(torch.zeros(s.in_features),
                                                       torch.zeros(s.in_features,
                                                                   dtype=torch.float64)))
        observe[s.input] = st.update
    batches = ctx.calibration[: ctx.options.max_batches]
    for batch in tqdm(batches, desc="calibrate", disable=not ctx.progress, leave=False):
        graph.run(batch, observe=observe)
    ctx.analysis["activation_stats"] = {s.node: stats[s.input] for s in sites}
    ratios = {s.name: stats[s.input].outlier_ratio for s in sites}
    return PassResult(changed=False, transformed=tuple(ratios),
                      metrics={"outlier_ratio": ratios, "batches": len(batches)})
