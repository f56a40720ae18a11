"""rotate: fold a randomised Hadamard rotation into the residual stream (QuaRot / SpinQuant).

With the stream found by structure (:mod:`lowbit.passes._stream`) and ``Q`` an orthonormal
randomised Hadamard of the stream width (row vectors, ``x' = x Q``):

1. each norm's ``gamma`` is folded into its readers (``W <- W diag(gamma)``, ``gamma <- 1``),
   so the norm is a pure RMS normalisation, which commutes with ``Q`` (``|xQ| = |x|``);
2. embedding tables ``E <- E Q`` (a table tied to the head is untied first), readers
   ``W <- W Q`` (the head included), writers ``W <- Q^T W``, ``b <- b Q``;
3. optionally, an online Hadamard ``H`` (factored ``H_a (x) H_b``, inserted as a
   ``lowbit::hadamard`` node) on the input of every writer, with ``W <- W H`` so the product
   is unchanged: the down projection's and the attention output's inputs lose their outliers.

All folds run in float64 and are cast back once; the function is unchanged (``exact``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import lowbit.ops  # noqa: F401  (torch.ops.lowbit.hadamard)
from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.hadamard import (construction, hadamard_factors, hadamard_matrix,
                                      random_hadamard)
from lowbit.passes._stream import find_stream

__all__ = ["rotate", "RotateOptions"]


@dataclass(frozen=True)
class RotateOptions:
    seed: int = 0                   # signs of the randomised Hadamard
    online: bool = True             # online Hadamard before every writer (o_proj, down_proj)


def _update(graph, site, fn) -> None:
    w = graph.linear_weight(site)
    graph.set_linear_weight(site, fn(w.to(torch.float64)).to(w.dtype))


def _fold_gammas(graph, plan) -> None:
    for norm in plan.norms:
        if norm.gamma is None:
            continue
        gamma = graph.attr(norm.gamma).to(torch.float64)
        for site in norm.readers:
            _update(graph, site, lambda w: w * gamma)
        graph.set_attr(norm.gamma, torch.ones_like(graph.attr(norm.gamma)))


def _rotate_embeddings(graph, plan, q) -> list[str]:
    shared = {}
    for n in graph.nodes():
        for i in graph.inputs(n):
            if graph.op(i) == "constant":
                shared.setdefault(graph.node(i).target, set()).add(n)
    done = []
    for emb in plan.embeddings:
        target = graph.node(graph.inputs(emb)[0]).target
        if len(shared.get(target, ())) > 1:          # tied with the head: untie
            target = graph.untie_constant(emb, target, created_by="rotate")
        table = graph.attr(target)
        graph.set_attr(target, (table.to(torch.float64) @ q).to(table.dtype))
        done.append(emb)
    return done


def _online(graph, site) -> str | None:
    a, b = hadamard_factors(site.in_features)
    left, right = hadamard_matrix(a), hadamard_matrix(b)
    h = torch.kron(left, right)
    _update(graph, site, lambda w: w @ h)
    graph.insert_before_input(site, torch.ops.lowbit.hadamard.default,
                              (left.to(torch.float32), right.to(torch.float32)),
                              created_by="rotate")
    return construction(site.in_features)


@graph_pass(name="rotate", numerics="exact", options=RotateOptions)
def rotate(graph, ctx) -> PassResult:
    """Rotate the residual stream by a randomised Hadamard folded into the weights."""
    plan = find_stream(graph)
    if plan.problem is not None:
        return PassResult(changed=False, skipped=(("residual stream", plan.problem),))
    q = random_hadamard(plan.width, ctx.options.seed)
    embeddings = _rotate_embeddings(graph, plan, q)   # first: a tied head changes below
    _fold_gammas(graph, plan)
    readers = [s for norm in plan.norms for s in norm.readers]
    for site in readers:
        _update(graph, site, lambda w: w @ q)
    online = {}
    for site in plan.writers:
        _update(graph, site, lambda w: q.T @ w)
        if site.bias is not None:
            b = graph.attr(site.bias)
            graph.set_attr(site.bias, (b.to(torch.float64) @ q).to(b.dtype))
        if ctx.options.online:
            online[site.name] = _online(graph, site)
    return PassResult(
        transformed=tuple(s.name for s in readers + plan.writers),
        metrics={"width": plan.width, "rotation": construction(plan.width),
                 "norms": len(plan.norms), "embeddings": embeddings,
                 "online_hadamard": online})
