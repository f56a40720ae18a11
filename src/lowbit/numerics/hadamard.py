"""Orthonormal Hadamard matrices of size ``m * 2^k`` and their Kronecker factors.

Constructions (all float64, scaled by ``1/sqrt(n)`` so ``H H^T = I``):

* **Sylvester** for powers of two: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]] =
  H_2 (x) H_n``, so ``H_2^i (x) H_2^j = H_2^(i+j)``;
* **Paley I** for ``m = q + 1``, ``q`` a prime ``= 3 (mod 4)`` (12, 20, 24, 44, 48, 60, 72,
  ...): with the Jacobsthal matrix ``Q_ij = chi(j - i)`` (``chi`` the quadratic character mod
  ``q``; ``Q`` is skew), ``H = I + [[0, 1^T], [-1, Q]]``;
* **Paley II** for ``m = 2 (q + 1)``, ``q`` a prime ``= 1 (mod 4)`` (12, 28, 36, 60, 76,
  ...): ``Q`` is symmetric, ``S = [[0, 1^T], [1, Q]]`` (``S S^T = q I``) and
  ``H = S (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``;
* **Kronecker products**: ``H_a (x) H_b`` is Hadamard. ``n = m * 2^k`` uses ``H_n = H_m (x)
  H_2^k`` with ``m`` the smallest Paley I order that fits, else the smallest Paley II one
  (1 for powers of two). SmolLM2's widths: 576 = Paley I 72 (x) Sylvester 8 (71 is prime,
  = 3 mod 4), 1536 = Paley I 12 (x) Sylvester 128, 64 = Sylvester 64.

Any split of the Sylvester part gives the same ``H_n``, so :func:`hadamard_factors` picks the
most balanced ``H_n = H_a (x) H_b`` (``a`` a multiple of ``m``) and an online transform costs
``n (a + b)`` multiply-adds per row instead of ``n^2``.

A width with no such construction (an odd one, say) gets a *block-diagonal* orthogonal matrix:
greedily the largest constructible Hadamard block that fits, then the next on what is left
(7 = 4 + 2 + 1). It is still an exact rotation but mixes channels only within blocks (a block
of size 1 leaves its channel as it is), so it spreads outliers less.

Example:
    >>> import torch
    >>> h = hadamard_matrix(576)
    >>> bool(torch.allclose(h @ h.T, torch.eye(576, dtype=torch.float64), atol=1e-12))
    True
    >>> hadamard_factors(1536), construction(576)
    ((48, 32), 'kronecker(72 x 8)')
"""
from __future__ import annotations

import functools

import torch

__all__ = ["hadamard_matrix", "random_hadamard", "random_signs", "hadamard_transform",
           "hadamard_factors", "construction"]

_F64 = torch.float64


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley_kind(m: int) -> int | None:
    """1 or 2 if a Paley construction of order ``m`` exists (see module doc), else None."""
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = chi(j - i)``: +1 for a non-zero square mod ``q``, -1 for a non-square, 0 on 0."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=_F64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _bordered(q: int, corner: float, column: float) -> torch.Tensor:
    """``[[corner, 1^T], [column * 1, Q]]`` of order ``q + 1``."""
    s = torch.full((q + 1, q + 1), corner, dtype=_F64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, column, _jacobsthal(q)
    return s


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor:
    """Unnormalised (+-1) Paley I or II Hadamard matrix of order ``m``."""
    if _paley_kind(m) == 1:
        return torch.eye(m, dtype=_F64) + _bordered(m - 1, 0.0, -1.0)
    s = _bordered(m // 2 - 1, 0.0, 1.0)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=_F64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=_F64)
    return torch.kron(s, a) + torch.kron(torch.eye(m // 2, dtype=_F64), b)


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=_F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(n: int) -> int | None:
    """The ``m`` of ``H_n = H_m (x) H_2^k``: 1 for powers of two, else the smallest Paley I
    order, else the smallest Paley II order (Paley I first keeps the matrices this module
    built before it had Paley II, so published results reproduce); None if there is none."""
    odd = n // (n & -n)                      # n = odd * 2^j
    if odd == 1:
        return 1
    orders = [odd << i for i in range((n // odd).bit_length())]
    for kind in (1, 2):
        m = next((m for m in orders if _paley_kind(m) == kind), None)
        if m is not None:
            return m
    return None


def _unnormalised(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order ``n``, ``H_m (x) H_2^k``, or None if not constructible."""
    m = _base(n)
    if m is None:
        return None
    return _sylvester(n) if m == 1 else torch.kron(_paley(m), _sylvester(n // m))


def _blocks(n: int) -> list[int]:
    """Block sizes of the fallback: greedily the largest constructible size that fits."""
    out = []
    while n > 0:
        size = next(s for s in range(n, 0, -1) if _base(s) is not None)
        out.append(size)
        n -= size
    return out


def construction(n: int) -> str:
    """Which construction :func:`hadamard_matrix` uses for ``n`` (for reports):
    ``sylvester(n)``, ``paley(m)`` (Paley I), ``paley2(m)`` (Paley II), ``kronecker(m x 2^k)``
    (``H_m (x) H_2^k``, see ``construction(m)`` for ``H_m``) or ``block-diagonal [sizes]``.

    Example:
        >>> construction(64), construction(1536), construction(28)
        ('sylvester(64)', 'kronecker(12 x 128)', 'paley2(28)')
        >>> construction(7)
        'block-diagonal [4, 2, 1] (no Hadamard construction known for 7)'
    """
    m = _base(n)
    if m == 1:
        return f"sylvester({n})"
    if m == n:
        return f"paley({n})" if _paley_kind(m) == 1 else f"paley2({n})"
    if m is not None:
        return f"kronecker({m} x {n // m})"
    return f"block-diagonal {_blocks(n)} (no Hadamard construction known for {n})"


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal ``[n, n]`` Hadamard matrix ``H`` (``H H^T = I``, entries ``+-1/sqrt(n)``).

    Block-diagonal orthogonal fallback where no construction is known (see module doc).

    Example:
        >>> hadamard_matrix(2) * 2 ** 0.5
        tensor([[ 1.,  1.],
                [ 1., -1.]], dtype=torch.float64)
    """
    h = _unnormalised(n)
    if h is not None:
        return h / n ** 0.5
    return torch.block_diag(*[hadamard_matrix(size) for size in _blocks(n)])


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """``d``: ``n`` seeded random signs (+-1, float64), the diagonal of :func:`random_hadamard`.

    Example:
        >>> random_signs(4, seed=0).abs().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(_F64) * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``Q = H diag(d)`` with ``d = random_signs(n, seed)`` (still ``Q Q^T = I``): QuaRot's
    randomised Hadamard.

    Example:
        >>> q = random_hadamard(12, seed=1)
        >>> bool(torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64)))
        True
    """
    return hadamard_matrix(n) * random_signs(n, seed)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``x H diag(signs)`` over the last dimension ``n`` (``x Q`` of :func:`random_hadamard`
    with its signs), in factored form: with ``H = H_a (x) H_b`` of :func:`hadamard_factors`
    and each row viewed as ``X [a, b]``, ``x H = vec(H_a^T X H_b)``, ``n (a + b)``
    multiply-adds per row instead of ``n^2``. Runs in ``x``'s dtype.

    Example:
        >>> x = torch.randn(3, 576, dtype=torch.float64)
        >>> bool(torch.allclose(hadamard_transform(x, random_signs(576, 2)),
        ...                     x @ random_hadamard(576, 2)))
        True
    """
    n = x.shape[-1]
    a, b = hadamard_factors(n)
    left, right = hadamard_matrix(a).to(x.dtype), hadamard_matrix(b).to(x.dtype)
    # H_a^T X H_b = ((X H_b)^T H_a)^T: two GEMMs over all rows (a broadcast left product
    # would run one small matmul per row)
    y = ((x.unflatten(-1, (a, b)) @ right).transpose(-1, -2) @ left).transpose(-1, -2)
    y = y.flatten(-2)
    return y if signs is None else y * signs.to(x.dtype)


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``hadamard_matrix(n) = kron(hadamard_matrix(a), hadamard_matrix(b))``.

    ``b`` is a power of two and ``a + b`` as small as the construction allows, since applying
    ``H_a (x) H_b`` in factored form costs ``n (a + b)`` multiply-adds per row. ``(n, 1)``
    where ``n`` has no construction (the dense fallback).

    Example:
        >>> hadamard_factors(64), hadamard_factors(576), hadamard_factors(7)
        ((8, 8), (72, 8), (7, 1))
    """
    m = _base(n)
    if m is None:
        return n, 1
    splits = []
    a = m
    while n % a == 0:
        splits.append((a + n // a, a))
        a *= 2
    a = min(splits)[1]
    return a, n // a
