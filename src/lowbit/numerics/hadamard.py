"""Orthonormal Hadamard matrices of size ``2^k * m`` and their Kronecker factors.

Constructions (all float64, scaled by ``1/sqrt(n)`` so ``H H^T = I``):

* **Sylvester**: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` for powers of two;
* **Paley I** for ``m = q + 1`` with ``q`` a prime ``= 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60,
  ...): with the Jacobsthal matrix ``Q_ij = chi(j - i)`` (quadratic character mod q),
  ``H = I + [[0, 1^T], [-1, Q]]``;
* **Kronecker products**: ``H_a (x) H_b`` is Hadamard, so ``n = 2^k * m`` works for any such
  ``m``. SmolLM2's widths: 576 = Paley 72 (x) Sylvester 8, 1536 = Paley 12 (x) Sylvester
  128, 64 = Sylvester 64.

A width with no such factorisation (an odd one, say) gets a *block-diagonal* orthogonal
matrix of Sylvester blocks along its binary expansion (``n = 2^a + 2^b + ...``): still exact
as a rotation, but it mixes channels only within blocks, so it spreads outliers less.

Example:
    >>> import torch
    >>> h = hadamard_matrix(576)
    >>> bool(torch.allclose(h @ h.T, torch.eye(576, dtype=torch.float64), atol=1e-12))
    True
    >>> hadamard_factors(1536)
    (12, 128)
"""
from __future__ import annotations

import functools

import torch

__all__ = ["hadamard_matrix", "random_hadamard", "hadamard_factors", "construction"]


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley_ok(m: int) -> bool:
    return _is_prime(m - 1) and (m - 1) % 4 == 3


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor:
    """Unnormalised Paley I Hadamard matrix of order ``m = q + 1``."""
    q = m - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                       dtype=torch.float64)
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return torch.eye(m, dtype=torch.float64) + s


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _unnormalised(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order ``n``: ``H_a (x) H_b`` of :func:`hadamard_factors`."""
    if n & (n - 1) == 0:
        return _sylvester(n)
    a, b = hadamard_factors(n)
    if b > 1:
        return torch.kron(_unnormalised(a), _sylvester(b))
    return _paley(n) if _paley_ok(n) else None


def construction(n: int) -> str:
    """Which construction :func:`hadamard_matrix` uses for ``n`` (for reports)."""
    if n & (n - 1) == 0:
        return f"sylvester({n})"
    if _unnormalised(n) is not None:
        a, b = hadamard_factors(n)
        return f"kronecker({a} x {b})" if b > 1 else f"paley({n})"
    return "block-diagonal sylvester (no Hadamard construction known here)"


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal ``[n, n]`` Hadamard matrix (block-diagonal fallback, see module doc)."""
    h = _unnormalised(n)
    if h is not None:
        return h / n ** 0.5
    out, start = torch.zeros(n, n, dtype=torch.float64), 0
    for bit in reversed(range(n.bit_length())):
        size = 1 << bit
        if n - start >= size:
            out[start:start + size, start:start + size] = _sylvester(size) / size ** 0.5
            start += size
    return out


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``H diag(d)`` with random signs ``d`` (still orthonormal): QuaRot's randomised Hadamard."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``H_n = H_a (x) H_b`` as built here, ``b`` the largest power of two.

    An online transform then costs ``n * (a + b)`` multiply-adds instead of ``n^2``.
    """
    b = n & -n                      # largest power of two dividing n
    a = n // b
    if a > 1 and not _paley_ok(a):
        for m in range(4, n, 4):
            if n % m == 0 and _paley_ok(m) and (n // m) & (n // m - 1) == 0:
                return m, n // m
        return n, 1
    return a, b
