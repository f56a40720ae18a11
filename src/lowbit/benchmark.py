"""Latency measurement per ../shared/PROTOCOL.md: median of >= 5 runs after 2 warm-ups."""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], runs: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
