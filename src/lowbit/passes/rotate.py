"""rotate: fold a randomised Hadamard rotation into the residual stream (QuaRot / SpinQuant).

With the stream found by structure (:mod:`lowbit.passes._stream`), ``d`` its width and ``Q``
an orthonormal randomised Hadamard of size ``d`` (row vectors, ``x' = x Q``):

1. RMS norms: ``gamma`` is folded into the readers (``W <- W diag(gamma)``, ``gamma <- 1``),
   so the norm is a pure RMS normalisation, which commutes with ``Q`` (``|xQ| = |x|``).
   LayerNorms (OPT, GPT-2), as in SliceGPT: every term added into the stream is centred with
   ``C = I - 1 1^T / d`` (embeddings ``E <- E C``, writers ``W <- C W``, ``b <- b C``), so the
   stream has zero mean and ``LN(x) = gamma * x / sqrt(mean(x^2) + eps) + beta``; ``gamma``
   and ``beta`` go into the readers (``W <- W diag(gamma)``, ``b <- b + W beta``) and the
   LayerNorm becomes that RMS normalisation;
2. with ``M = C Q`` (``M = Q`` for RMS norms): embedding tables ``E <- E M`` (a table tied
   to the head is untied first), writers ``W <- M^T W``, ``b <- b M``, readers (the head
   included) ``W <- W Q``;
3. optionally, an online Hadamard ``H`` (factored ``H_a (x) H_b``, inserted as a
   ``lowbit::hadamard`` node) on the input of every writer, with ``W <- W H`` so the product
   is unchanged: the down projection's and the attention output's inputs lose their outliers.

All folds run in float64 and are cast back once; products with ``Q`` and ``H`` use the
factored form (:func:`lowbit.numerics.hadamard.hadamard_transform`, ``n (a + b)`` per row, not
``n^2``). The function is unchanged (``exact``).
Post-norm models (BERT: the normalised value is itself the stream) are skipped with the
reason.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

import lowbit.ops  # noqa: F401  (torch.ops.lowbit.hadamard)
from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.hadamard import (construction, hadamard_factors, hadamard_matrix,
                                      hadamard_transform, random_signs)
from lowbit.passes import _fx_edits
from lowbit.passes._stream import Norm, StreamPlan, find_stream

__all__ = ["rotate", "RotateOptions"]

_F64 = torch.float64


@dataclass(frozen=True)
class RotateOptions:
    seed: int = 0                   # signs of the randomised Hadamard
    online: bool = True             # online Hadamard before every writer (o_proj, down_proj)


def _edits(graph):
    """The structural edits of the graph's form (FX or ONNX; onnx-ir is optional)."""
    if graph.form == "onnx":
        from lowbit.passes import _onnx_edits
        return _onnx_edits
    return _fx_edits


def _update(graph, site, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``W <- fn(W)`` computed in float64, cast back once."""
    w = graph.linear_weight(site)
    graph.set_linear_weight(site, fn(w.to(_F64)).to(w.dtype))


def _constant(graph, target: str | None) -> torch.Tensor | None:
    return None if target is None else graph.attr(target).to(_F64)


def _shift_bias(graph, site, beta: torch.Tensor) -> None:
    """``b <- b + W beta``: a LayerNorm's bias moves into its reader."""
    w = graph.linear_weight(site)
    b = w.to(_F64) @ beta
    if site.bias is not None:
        b = b + _constant(graph, site.bias)
    _edits(graph).set_linear_bias(graph, site, b.to(w.dtype), created_by="rotate")


def _rotate_readers(graph, norm: Norm, q: Callable) -> None:
    """``b <- b + W beta``, ``W <- W diag(gamma) Q`` for every reader; the norm then has no
    affine part (``gamma <- 1``; a LayerNorm becomes the RMS normalisation)."""
    gamma, beta = _constant(graph, norm.gamma), _constant(graph, norm.beta)
    for site in norm.readers:
        if beta is not None and bool(beta.any()):
            _shift_bias(graph, site, beta)
        _update(graph, site, lambda w: q(w if gamma is None else w * gamma))
    if norm.kind == "layer":
        _edits(graph).replace_layer_norm(graph, norm.output, norm.eps, created_by="rotate")
    elif gamma is not None:
        graph.set_attr(norm.gamma, torch.ones_like(graph.attr(norm.gamma)))


def _rotate_embeddings(graph, plan: StreamPlan, m: Callable) -> list[str]:
    """``E <- E M`` for every embedding table; one shared with other nodes is untied first."""
    readers: dict[str, set[str]] = {}
    for n in graph.nodes():
        for i in graph.inputs(n):
            if graph.op(i) == "constant":
                readers.setdefault(graph.node(i).target, set()).add(n)
    for emb in plan.embeddings:
        target = graph.node(graph.inputs(emb)[0]).target
        if len(readers.get(target, ())) > 1:          # tied with the head: untie
            target = graph.untie_constant(emb, target, created_by="rotate")
        table = graph.attr(target)
        graph.set_attr(target, m(table.to(_F64)).to(table.dtype))
    return list(plan.embeddings)


def _rotate_writer(graph, site, m: Callable) -> None:
    """``W <- M^T W = (W^T M)^T``, ``b <- b M``: the writer now adds ``y M`` to the stream."""
    _update(graph, site, lambda w: m(w.T).T)
    if site.bias is not None:
        b = graph.attr(site.bias)
        graph.set_attr(site.bias, m(b.to(_F64)).to(b.dtype))


def _online(graph, site) -> str:
    """Insert ``x <- x H`` before ``site`` and fold ``W <- W H``: ``(x H)(W H)^T = x W^T``."""
    a, b = hadamard_factors(site.in_features)
    _update(graph, site, hadamard_transform)
    graph.insert_before_input(site, torch.ops.lowbit.hadamard.default,
                              (hadamard_matrix(a).float(), hadamard_matrix(b).float()),
                              created_by="rotate")
    return construction(site.in_features)


def _stream_maps(plan: StreamPlan, seed: int) -> tuple[Callable, Callable]:
    """``(t -> t Q, t -> t M)``: ``M = C Q`` with ``t C = t - mean(t)`` (centring the last
    dimension) for LayerNorm streams, else ``M = Q``."""
    signs = random_signs(plan.width, seed)
    q = functools.partial(hadamard_transform, signs=signs)
    if plan.kind != "layer":
        return q, q
    return q, lambda t: q(t - t.mean(-1, keepdim=True))


@graph_pass(name="rotate", numerics="exact", options=RotateOptions)
def rotate(graph, ctx) -> PassResult:
    """Rotate the residual stream by a randomised Hadamard folded into the weights."""
    plan = find_stream(graph)
    if plan.problem is not None:
        return PassResult(changed=False, skipped=(("residual stream", plan.problem),))
    q, m = _stream_maps(plan, ctx.options.seed)
    embeddings = _rotate_embeddings(graph, plan, m)   # first: a tied head changes below
    for norm in plan.norms:
        _rotate_readers(graph, norm, q)
    online = {}
    for site in plan.writers:
        _rotate_writer(graph, site, m)
        if ctx.options.online:
            online[site.name] = _online(graph, site)
    readers = [s for norm in plan.norms for s in norm.readers]
    return PassResult(
        transformed=tuple(s.name for s in readers + plan.writers),
        metrics={"width": plan.width, "rotation": construction(plan.width),
                 "norm": "LayerNorm -> RMS (stream centred)" if plan.kind == "layer"
                 else "RMSNorm", "norms": len(plan.norms), "embeddings": embeddings,
                 "online_hadamard": online})
