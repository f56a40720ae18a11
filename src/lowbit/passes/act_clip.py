"""act_clip: choose each quantized linear's activation clip ratio on calibration data.

Per-token activation quantization with range ``r * max|x|`` trades saturating a token's few
largest values against rounding all the others finer. One global ratio (QuaRot's 0.9) suits
no layer exactly: the input of a down projection (after SiLU-gating and an online Hadamard)
and the rotated residual stream read by q/k/v have different tails. This pass measures, for
every linear that ``act_quant`` marked, the output error each candidate ratio causes,

    err(r) = sum over sampled tokens of || Q_r(x) @ W_q^T - x @ W^T ||^2,

the layer's output error against float (``W`` its float weight, ``W_q`` its quantized weight,
so the weight's own error takes part and the choice is the ratio of least total error) and
``Q_r`` the per-token quantizer of
:func:`lowbit.numerics.quant.quantize_activation_per_token`, and keeps the ratio of least
error (ties go to the larger ratio). Inputs are observed on the float graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.quant import dequantize_weight, quantize_activation_per_token

__all__ = ["act_clip", "ActClipOptions", "activation_clip_errors"]


@dataclass(frozen=True)
class ActClipOptions:
    grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    max_batches: int = 8            # calibration batches observed
    tokens_per_batch: int = 128     # tokens sampled from each batch (seeded)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(float(r) for r in self.grid))
        if not self.grid or any(not 0 < r <= 1 for r in self.grid):
            raise ValueError(f"grid must hold clip ratios in (0, 1], got {self.grid}")
        if self.max_batches < 1 or self.tokens_per_batch < 1:
            raise ValueError("max_batches and tokens_per_batch must be >= 1")


def activation_clip_errors(x: torch.Tensor, w_q: torch.Tensor, w: torch.Tensor, bits: int,
                           grid: tuple[float, ...], symmetric: bool = True) -> torch.Tensor:
    """``err[i] = ||Q_{grid[i]}(x) @ w_q^T - x @ w^T||^2`` for tokens ``x [T, K]``, quantized
    and float weights ``w_q, w [N, K]``.

    >>> x = torch.randn(64, 32); w = torch.randn(8, 32)
    >>> activation_clip_errors(x, w, w, 4, (1.0, 0.8)).shape
    torch.Size([2])
    """
    ref = x @ w.T
    errs = []
    for r in grid:
        xq, s = quantize_activation_per_token(x, bits, r, symmetric)
        errs.append(((xq * s) @ w_q.T - ref).double().pow(2).sum())
    return torch.stack(errs)


def _sampler(n_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def sample(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if flat.shape[0] <= n_tokens:
            return flat
        return flat[torch.randperm(flat.shape[0], generator=gen)[:n_tokens]]
    return sample


@graph_pass(name="act_clip", numerics="analysis",
            requires=("calibration", "quantized_weights", "activation_quant"),
            provides=("activation_clip",), preserves=("graph",), options=ActClipOptions)
def act_clip(graph, ctx) -> PassResult:
    """Pick, per quantized linear, the activation clip ratio of least output error."""
    o = ctx.options
    plan = ctx.analysis["activation_quant"]
    asymmetric = ctx.analysis.get("activation_asymmetric", set())
    qws = ctx.analysis["quantized_weights"]
    sites = [s for s in graph.linears() if s.node in plan]
    weights = {s.node: (dequantize_weight(qws[s.node]), graph.linear_weight(s).float())
               for s in sites}
    errors = {s.node: torch.zeros(len(o.grid), dtype=torch.float64) for s in sites}
    readers: dict[str, list] = {}
    for s in sites:
        readers.setdefault(s.input, []).append(s)
    sample = _sampler(o.tokens_per_batch, o.seed)

    def observer(sites_of_input):
        def update(x: torch.Tensor) -> None:
            xs = sample(x)
            for s in sites_of_input:
                errors[s.node] += activation_clip_errors(xs, *weights[s.node], plan[s.node],
                                                         o.grid, s.node not in asymmetric)
        return update

    observe = {node: observer(ss) for node, ss in readers.items()}
    batches = ctx.calibration[: o.max_batches]
    with torch.no_grad():
        for batch in tqdm(batches, desc="act_clip", disable=not ctx.progress, leave=False):
            graph.run(batch, observe=observe)
    chosen = {}
    for s in sites:
        e = errors[s.node]
        best = min(range(len(o.grid)), key=lambda i: (float(e[i]), -o.grid[i]))
        chosen[s.node] = o.grid[best]
    ctx.analysis["activation_clip"] = chosen
    names = {s.node: s.name for s in sites}
    return PassResult(changed=False, transformed=tuple(names[n] for n in chosen),
                      metrics={"clip_ratio": {names[n]: r for n, r in chosen.items()},
                               "batches": len(batches)})
