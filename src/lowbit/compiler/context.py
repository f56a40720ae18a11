"""PassContext: what a running pass can see besides the graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PassContext", "PassRecord"]


@dataclass
class PassRecord:
    """One pass as it ran: for reports and error messages."""
    name: str
    plugin: str
    numerics: str
    options: dict
    seconds: float = 0.0
    changed: bool = False
    transformed: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    metrics: dict = field(default_factory=dict)
    verification: dict | None = None


@dataclass
class PassContext:
    """Scoped state of one compilation.

    ``options`` holds the running pass's validated options; ``calibration`` the calibration
    batches (input dicts); ``analysis`` results passes provide to later passes (keyed by the
    names used in ``requires``/``provides``); ``records`` one entry per pass run.
    """
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)
    analysis: dict[str, Any] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)
    options: Any = None
    pass_name: str | None = None
    model_kind: str = "module"
    progress: bool = True

    @property
    def history(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.records)

    def available(self) -> set[str]:
        """Analysis results present now (plus ``calibration`` when data was given)."""
        have = set(self.analysis)
        if self.calibration:
            have.add("calibration")
        return have
