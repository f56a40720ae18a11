"""Choosing one candidate format per item under a byte budget, exactly (a multiple-choice
knapsack solved as an integer linear program).

    minimise  sum_i sum_c cost[i, c] x[i, c]
    s.t.      sum_c x[i, c] = 1 for every item i,   sum_i sum_c bytes[i, c] x[i, c] <= budget,
              x binary

Solved with ``scipy.optimize.milp`` (HiGHS branch and bound: optimal, not greedy).

Example:
    >>> import torch
    >>> cost = torch.tensor([[9.0, 1.0], [4.0, 3.0]])
    >>> size = torch.tensor([[1, 2], [1, 2]])
    >>> solve_allocation(cost, size, budget=3)
    [1, 0]
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["solve_allocation", "check_budget", "InfeasibleBudget"]


class InfeasibleBudget(ValueError):
    """No choice fits: ``minimum`` is the smallest budget that does."""

    def __init__(self, budget: float, minimum: float):
        super().__init__(f"budget {budget:,.0f} bytes is below the smallest possible "
                         f"{minimum:,.0f} bytes")
        self.budget, self.minimum = budget, minimum


def check_budget(size: torch.Tensor, budget: float) -> None:
    """Raise :class:`InfeasibleBudget` unless ``sum_i min_c size[i, c] <= budget``.

    Needs only the sizes, so a caller can check before computing any cost.
    """
    minimum = float(size.min(1).values.sum())
    if minimum > budget:
        raise InfeasibleBudget(budget, minimum)


def solve_allocation(cost: torch.Tensor, size: torch.Tensor, budget: float) -> list[int]:
    """Index of the chosen candidate per item (see module doc)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    n, m = cost.shape
    check_budget(size, budget)
    c = cost.to(torch.float64).reshape(-1).numpy()
    one_each = np.kron(np.eye(n), np.ones((1, m)))
    constraints = [LinearConstraint(one_each, 1, 1),
                   LinearConstraint(size.to(torch.float64).reshape(1, -1).numpy(), 0, budget)]
    res = milp(c / max(np.abs(c).max(), 1e-30), constraints=constraints,
               integrality=np.ones(n * m), bounds=Bounds(0, 1))
    if res.x is None:
        raise RuntimeError(f"the allocation ILP failed: {res.message}")
    return [int(i) for i in np.round(res.x).reshape(n, m).argmax(1)]
