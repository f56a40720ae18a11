"""One exception hierarchy for lowbit.

Every error says *what* failed, *where* (pass, node, file) and *how to fix it*.
"""
from __future__ import annotations

__all__ = [
    "LowbitError", "UsageError", "RecipeError", "CaptureError", "DataError",
    "PluginError", "PassError", "ContractError", "NumericMismatchError", "LoweringError",
]


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class UsageError(LowbitError, ValueError):
    """The caller asked for something that cannot work (bad argument, unknown target...)."""


class RecipeError(UsageError):
    """A recipe is malformed: unknown key, unknown pass, bad option value."""


class CaptureError(LowbitError):
    """A model could not be captured into a graph (torch.export failed, file unreadable...)."""


class DataError(LowbitError):
    """Calibration or evaluation data is missing or malformed."""


class PluginError(LowbitError):
    """A plugin failed to load or one of its hooks raised."""


class PassError(LowbitError):
    """A pass failed. Carries the pass name and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str | None = None,
                 history: tuple[str, ...] = (), node: str | None = None):
        self.message = message
        self.pass_name = pass_name
        self.history = tuple(history)
        self.node = node
        parts = []
        if pass_name:
            parts.append(f"pass '{pass_name}'")
        if node:
            parts.append(f"node '{node}'")
        where = (" [" + ", ".join(parts) + "]") if parts else ""
        after = f" (after: {' -> '.join(self.history)})" if self.history else (
            " (first pass)" if pass_name else "")
        super().__init__(f"{message}{where}{after}")


class ContractError(PassError):
    """A recipe breaks a pass contract (missing requirement, impossible order)."""


class NumericMismatchError(PassError):
    """A pass declared `exact` changed the model's outputs beyond tolerance."""


class LoweringError(LowbitError):
    """A backend cannot lower (or run) part of the graph. Names the node and the target."""
