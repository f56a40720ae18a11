"""Instruments: cross-cutting behaviour around every pass (timing, logs, dumps, verification).

Passes never time themselves, print or write files; instruments do, on the pass context.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Protocol

import torch

from lowbit.compiler.context import PassContext, PassRecord
from lowbit.compiler.passes import PassInfo
from lowbit.errors import NumericMismatchError
from lowbit.numerics.quant import sqnr_db

__all__ = ["Instrument", "Timing", "Log", "GraphDump", "NumericVerifier", "max_relative_error"]


class Instrument(Protocol):
    def before_pass(self, info: PassInfo, graph, ctx: PassContext) -> None: ...

    def after_pass(self, info: PassInfo, graph, ctx: PassContext, record: PassRecord) -> None:
        ...


class Timing:
    """Wall-clock seconds of each pass, into its record."""

    def before_pass(self, info, graph, ctx):
        self._t0 = time.perf_counter()

    def after_pass(self, info, graph, ctx, record):
        record.seconds = time.perf_counter() - self._t0


class Log:
    """One line per pass on stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def before_pass(self, info, graph, ctx):
        pass

    def after_pass(self, info, graph, ctx, record):
        ver = record.verification or {}
        extra = ""
        if "max_rel_error" in ver:
            extra = f", max rel err {ver['max_rel_error']:.2e}"
        elif "output_sqnr_db" in ver:
            extra = f", output SQNR {ver['output_sqnr_db']:.1f} dB"
        print(f"[lowbit] {record.name:<16} {record.seconds:7.2f} s  "
              f"{len(record.transformed)} transformed, {len(record.skipped)} skipped{extra}",
              file=self.stream)


class GraphDump:
    """Writes the graph listing after each pass to ``directory/NN_<pass>.txt``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def before_pass(self, info, graph, ctx):
        pass

    def after_pass(self, info, graph, ctx, record):
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{len(ctx.records):02d}_{record.name}.txt"
        path.write_text(graph.dump() + "\n", encoding="utf-8")


def max_relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    """``max|ref - value| / max|ref|`` (float64)."""
    ref = reference.detach().to(torch.float64)
    den = ref.abs().max().clamp(min=1e-30)
    return float((ref - value.detach().to(torch.float64)).abs().max() / den)


class NumericVerifier:
    """Runs the graph before and after each pass on fixed inputs.

    An ``exact`` pass must keep every output within ``tolerance`` (max relative error), else
    :class:`NumericMismatchError` names the pass and the worst output. For ``approx`` passes
    the output SQNR is recorded (lossy passes are judged by their error, not stopped).
    """

    def __init__(self, inputs: dict[str, torch.Tensor], tolerance: float = 1e-4,
                 check_approx: bool = True):
        self.inputs = inputs
        self.tolerance = tolerance
        self.check_approx = check_approx
        self._before: list[torch.Tensor] | None = None

    def before_pass(self, info, graph, ctx):
        wanted = info.numerics == "exact" or (self.check_approx and info.numerics == "approx")
        self._before = graph.run(self.inputs) if wanted else None

    def after_pass(self, info, graph, ctx, record):
        if self._before is None:
            return
        after = graph.run(self.inputs)
        if info.numerics == "approx":
            record.verification = {"output_sqnr_db": min(
                sqnr_db(b, a) for b, a in zip(self._before, after))}
            return
        errors = [max_relative_error(b, a) for b, a in zip(self._before, after)]
        worst = max(range(len(errors)), key=errors.__getitem__)
        record.verification = {"max_rel_error": errors[worst], "tolerance": self.tolerance}
        if errors[worst] > self.tolerance:
            raise NumericMismatchError(
                f"pass declared 'exact' changed output #{worst} by max relative error "
                f"{errors[worst]:.3e} > tolerance {self.tolerance:.1e}. Fix: correct the "
                "pass's folding math, or declare it numerics='approx'",
                pass_name=info.name, history=ctx.history[:-1] if ctx.history else ())
