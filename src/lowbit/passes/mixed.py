"""mixed: HAWQ-V2 mixed-precision assignment under a budget in real bytes.

1. Per-layer Hessian trace of the calibration loss (next-token cross-entropy for causal LMs,
   else the squared distance to the float outputs). Two estimators (option ``estimator``):

   * ``"ggn"`` (default): the trace of the Gauss-Newton part ``G = J^T H_out J`` (for the
     cross-entropy this is the Fisher), ``tr(G) = E ||J^T e||^2`` with ``e`` drawn so that
     ``E[e e^T] = H_out``: labels sampled from the model's own softmax (causal LMs), scaled
     Gaussian noise on the outputs (squared distance). Every sample is >= 0; one backward
     pass each.
   * ``"hutchinson"``: ``tr(H) ~ mean_v v^T H v`` with Rademacher ``v`` and exact
     Hessian-vector products (double backprop; attention runs its math kernel, which has
     second derivatives). The full Hessian of a trained LM is indefinite, and with a few
     probes the estimate is often negative: on SmolLM2 (2 batches x 2 probes) 63 of the 210
     layers came out below zero, which the cost model can only read as "free to quantize" —
     they went to 2 bits. G is what HAWQ-V2's trace approximates near a minimum (H ~ G).
2. Sensitivity of layer ``l`` at candidate format ``c``:
   ``Omega_l(c) = tr(H_l) / n_l * |Q_c(W_l) - W_l|^2`` (HAWQ-V2).
3. Linears reading one value (q/k/v, gate/up: a backend may fuse them) form one item and share
   a format. Formats are chosen to minimise ``sum Omega`` subject to the packed bytes
   (codes + float32 scales + packed zero points + padding, as the artifact stores them) being
   at most ``budget / 8`` bytes per weight, exactly (ILP, :mod:`lowbit.numerics.bitalloc`).

The traces depend only on the weights, the calibration batches and the estimator's settings,
not on the budget, so they are cached on disk (``$LOWBIT_CACHE/traces``, keyed by a hash of
all of those): compiling again at another budget skips the expensive part.

The result is a ``bit_assignment`` (layer node -> ``(bits, group_size)``) that the weight
quantizers (``rtn``, ``clip``, ``gptq``) follow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.errors import PassError
from lowbit.numerics.bitalloc import InfeasibleBudget, check_budget, solve_allocation
from lowbit.numerics.packing import packed_nbytes
from lowbit.numerics.quant import dequantize_weight, quantize_weight
from lowbit.passes._sequential import stages
from lowbit.passes.patterns import select_linears

__all__ = ["mixed", "MixedOptions", "parse_format", "hessian_traces", "ggn_traces"]

_FORMAT = re.compile(r"^([2348])g(\d+)$")


def parse_format(text: str) -> tuple[int, int]:
    """``"4g128"`` -> ``(4, 128)``."""
    m = _FORMAT.match(str(text))
    if not m or int(m.group(2)) < 16 or int(m.group(2)) & (int(m.group(2)) - 1):
        raise ValueError(f"candidate {text!r} is not '<bits>g<group>' with bits in 2/3/4/8 and "
                         "a power-of-two group >= 16 (e.g. '4g128')")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class MixedOptions:
    budget: float = 3.5             # average bits per weight, in real packed bytes
    # g64 as well as g128: on K = 576 (SmolLM2) g128 pads to 640, so 4g64 stores fewer bytes
    # than 4g128 (4.57 against 4.76 bits/weight) and is finer
    candidates: tuple[str, ...] = ("2g64", "3g64", "3g128", "4g64", "4g128", "8g128")
    symmetric: bool = False
    estimator: str = "ggn"          # "ggn" | "hutchinson" (module doc)
    samples: int = 2                # probes (sampled outputs / Rademacher vectors) per batch
    max_batches: int = 2            # calibration batches for the traces
    seq_len: int | None = None      # first tokens of each batch used (None: all; LMs/encoders)
    include_head: bool = False
    exclude: tuple[str, ...] = ()
    cache: bool = True              # reuse Hessian traces computed before (see module doc)

    def __post_init__(self):
        if not 1 <= self.budget <= 16:
            raise ValueError(f"budget (bits per weight) must be in [1, 16], got {self.budget}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for c in self.candidates:
            parse_format(c)
        if self.estimator not in ("ggn", "hutchinson"):
            raise ValueError(f"estimator must be 'ggn' or 'hutchinson', got {self.estimator!r}")
        if not self.candidates or self.samples < 1 or self.max_batches < 1:
            raise ValueError("need candidates, samples >= 1 and max_batches >= 1")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 tokens or None (all), got {self.seq_len}")


def _loss(graph, batch, kind: str, reference):
    batch = graph.complete(batch)
    out = graph.sync()(*[batch[k] for k in graph.placeholders()])
    out = out[0] if isinstance(out, (tuple, list)) else out
    if kind == "causal_lm":
        ids = batch["input_ids"]
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    return (out - reference).pow(2).mean()


def _trace_batches(ctx, max_batches: int, seq_len: int | None) -> list[dict]:
    """The first ``max_batches`` calibration batches, cut to their first ``seq_len`` tokens.

    The cost of a trace is about ``batches * (3 + 4 samples) * tokens`` forward passes' worth
    of work, and its memory grows with the tokens (double backprop keeps the whole graph), so
    short windows keep it in seconds. Static-shape captures (``module``) are left whole.
    """
    batches = ctx.calibration[:max_batches]
    if seq_len is None or ctx.model_kind == "module":
        return list(batches)
    return [{k: v[:, :seq_len] if v.dim() >= 2 else v for k, v in b.items()} for b in batches]


@contextlib.contextmanager
def _requiring_grad(params):
    """The weights require gradients inside the block; their old flags are restored after."""
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def hessian_traces(graph, sites, batches, kind: str, samples: int, seed: int = 0,
                   progress: bool = False) -> dict[str, float]:
    """Hutchinson estimate of ``tr(d^2 L / dW_l^2)`` per site (see module doc)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    params = [graph.attr(s.weight) for s in sites]
    gen = torch.Generator().manual_seed(seed)
    total = [0.0] * len(sites)
    with _requiring_grad(params):
        for batch in tqdm(batches, desc="hessian trace", disable=not progress, leave=False):
            reference = None if kind == "causal_lm" else graph.run(batch)[0]
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                grads = torch.autograd.grad(_loss(graph, batch, kind, reference),
                                            params, create_graph=True)
                for i in range(samples):
                    vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
                          for p in params]
                    hv = torch.autograd.grad(grads, params, grad_outputs=vs,
                                             retain_graph=i < samples - 1)
                    for j, (v, h) in enumerate(zip(vs, hv)):
                        total[j] += float((v * h).sum())
    n = len(batches) * samples
    return {s.node: t / n for s, t in zip(sites, total)}


def ggn_traces(graph, sites, batches, kind: str, samples: int, seed: int = 0,
               progress: bool = False) -> dict[str, float]:
    """Sampled-output estimate of ``tr(J_l^T H_out J_l)`` per site (see module doc)."""
    params = [graph.attr(s.weight) for s in sites]
    gen = torch.Generator().manual_seed(seed)
    total = [0.0] * len(sites)
    with _requiring_grad(params):
        for batch in tqdm(batches, desc="gauss-newton trace", disable=not progress,
                          leave=False):
            batch = graph.complete(batch)
            with torch.enable_grad():
                out = graph.sync()(*[batch[k] for k in graph.placeholders()])
                out = out[0] if isinstance(out, (tuple, list)) else out
                if kind == "causal_lm":
                    logits = out[:, :-1].reshape(-1, out.shape[-1])
                    probs = torch.softmax(logits.detach().double(), -1)
                for i in range(samples):
                    if kind == "causal_lm":
                        # E_y[g g^T] of sum_t -log p(y_t) is sum_t J_t^T (diag p - p p^T) J_t:
                        # the GGN of the summed loss; / tokens: that of the mean loss
                        y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                        norm = logits.shape[0]
                    else:
                        # loss = mean (out - ref)^2: H_out = 2/N I; e ~ N(0, 2/N I)
                        e = torch.randn(out.shape, generator=gen, dtype=out.dtype)
                        loss = (out * e).sum() * (2.0 / out.numel()) ** 0.5
                        norm = 1
                    grads = torch.autograd.grad(loss, params, retain_graph=i < samples - 1)
                    for j, g in enumerate(grads):
                        total[j] += float(g.double().pow(2).sum()) / norm
    n = len(batches) * samples
    return {s.node: t / n for s, t in zip(sites, total)}


def _trace_key(graph, sites, batches, kind: str, samples: int, estimator: str) -> str:
    """Hash of everything the traces depend on: weights, calibration inputs, estimator."""
    h = hashlib.sha256(json.dumps([kind, samples, [s.name for s in sites]]
                                  + ([estimator] if estimator != "hutchinson" else []))
                       .encode())
    for s in sites:
        h.update(graph.linear_weight(s).detach().contiguous().numpy().tobytes())
    for batch in batches:
        for k in sorted(batch):
            h.update(k.encode())
            h.update(batch[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cached_traces(graph, sites, batches, kind: str, samples: int, progress: bool,
                  use_cache: bool, estimator: str = "ggn") -> tuple[dict[str, float], bool]:
    """The traces, read from or written to the on-disk cache; ``(traces, hit)``."""
    estimate = ggn_traces if estimator == "ggn" else hessian_traces
    if not use_cache:
        return estimate(graph, sites, batches, kind, samples, progress=progress), False
    from lowbit.data.models import cache_dir
    key = _trace_key(graph, sites, batches, kind, samples, estimator)
    path = cache_dir() / "traces" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    traces = estimate(graph, sites, batches, kind, samples, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")   # never a half-written file
    with os.fdopen(fd, "w") as f:
        json.dump(traces, f)
    os.replace(tmp, path)
    return traces, False


def _byte_table(items, formats, symmetric: bool) -> torch.Tensor:
    """``size[i, c]``: packed bytes of item ``i`` stored in format ``c`` (``packed_nbytes``)."""
    return torch.tensor([[sum(packed_nbytes(s.out_features, s.in_features, bits, group,
                                            symmetric) for s in item)
                          for bits, group in formats] for item in items], dtype=torch.float64)


def _cost_table(graph, items, formats, traces, symmetric: bool) -> torch.Tensor:
    """``cost[i, c] = sum_{l in i} max(tr(H_l), 0) / n_l * |Q_c(W_l) - W_l|^2`` (HAWQ-V2)."""
    cost = torch.zeros(len(items), len(formats), dtype=torch.float64)
    for i, item in enumerate(items):
        for s in item:
            w = graph.linear_weight(s).to(torch.float64)
            per_weight = max(traces[s.node], 0.0) / w.numel()
            for c, (bits, group) in enumerate(formats):
                err = dequantize_weight(quantize_weight(w, bits, group, symmetric),
                                        torch.float64) - w
                cost[i, c] += per_weight * float(err.pow(2).sum())
    return cost


def _check_feasible(size: torch.Tensor, budget_bytes: float, weights: int, o) -> None:
    """Fail before the (costly) traces when even the narrowest formats overflow the budget."""
    try:
        check_budget(size, budget_bytes)
    except InfeasibleBudget as e:
        raise PassError(f"budget {o.budget} bits/weight ({e.budget:,.0f} B) cannot hold the "
                        f"candidates {list(o.candidates)}: the smallest choice takes "
                        f"{8 * e.minimum / weights:.3f} bits/weight. Fix: raise 'budget' or add "
                        "a narrower candidate", pass_name="mixed") from e


@graph_pass(name="mixed", numerics="analysis", requires=("calibration",),
            provides=("bit_assignment",), preserves=("graph",), options=MixedOptions)
def mixed(graph, ctx) -> PassResult:
    """Bits per layer minimising Hessian-weighted error under a byte budget (HAWQ-V2)."""
    if graph.form != "fx":   # Hessian traces need autograd through the graph
        raise PassError(f"not yet on {graph.form} graphs: the Hessian traces need a graph "
                        "torch can differentiate. Fix: compile the PyTorch model (or its "
                        "Hugging Face directory) instead of the .onnx file, or use a "
                        "fixed-width recipe such as 'w4a16'", pass_name="mixed")
    o = ctx.options
    sites, skipped = select_linears(graph, o.include_head, o.exclude)
    if not sites:
        ctx.analysis["bit_assignment"] = {}
        return PassResult(changed=False, skipped=tuple(skipped))
    formats = [parse_format(c) for c in o.candidates]
    items = list(stages(graph, sites).values())      # linears reading one value share a format
    weights = sum(s.in_features * s.out_features for s in sites)
    budget = o.budget / 8 * weights
    size = _byte_table(items, formats, o.symmetric)
    _check_feasible(size, budget, weights, o)
    traces, hit = cached_traces(graph, sites, _trace_batches(ctx, o.max_batches, o.seq_len),
                                ctx.model_kind, o.samples, ctx.progress, o.cache,
                                o.estimator)
    choice = solve_allocation(_cost_table(graph, items, formats, traces, o.symmetric), size,
                              budget)
    assignment = {s.node: formats[c] for item, c in zip(items, choice) for s in item}
    ctx.analysis["bit_assignment"] = assignment
    used = float(sum(size[i, c] for i, c in enumerate(choice)))
    bits = {s.name: "%dg%d" % assignment[s.node] for item in items for s in item}
    return PassResult(changed=False, transformed=tuple(bits), skipped=tuple(skipped),
                      metrics={"bits": bits, "packed_bytes": int(used),
                               "budget_bytes": int(budget),
                               "bits_per_weight": round(8 * used / weights, 4),
                               "traces_from_cache": hit,
                               "hessian_trace": {s.name: traces[s.node] for s in sites}})
