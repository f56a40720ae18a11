"""PassManager: checks a recipe's contracts, then runs its passes under instruments."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from lowbit.compiler.context import PassContext, PassRecord
from lowbit.compiler.passes import PassInfo, PassResult
from lowbit.errors import ContractError, LowbitError, PassError

__all__ = ["PassManager", "ScheduledPass"]


@dataclass(frozen=True)
class ScheduledPass:
    info: PassInfo
    options: Any


class PassManager:
    """Runs ``passes`` in order. ``catalog`` (all known passes) only improves error advice."""

    def __init__(self, passes: Sequence[ScheduledPass], instruments: Iterable = (),
                 catalog: Iterable[PassInfo] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.catalog = list(catalog)

    def check(self, ctx: PassContext) -> None:
        """Report every contract problem of the whole schedule before anything runs."""
        have = ctx.available()
        consumed_by: dict[str, str] = {}
        problems = []
        for i, sp in enumerate(self.passes):
            for req in sp.info.requires:
                if req in have:
                    continue
                later = [p.info.name for p in self.passes[i + 1:] if req in p.info.provides]
                makers = sorted({p.name for p in self.catalog if req in p.provides})
                if req in consumed_by:
                    fix = (f"'{consumed_by[req]}' uses it up before; move "
                           f"'{sp.info.name}' before '{consumed_by[req]}'")
                elif req == "calibration":
                    fix = "give calibration data (compile(..., calibration=...))"
                elif later:
                    fix = f"move '{later[0]}' before '{sp.info.name}'"
                elif makers:
                    fix = f"add one of {makers} before '{sp.info.name}'"
                else:
                    fix = "no registered pass provides it"
                problems.append(f"pass '{sp.info.name}' (#{i + 1}) requires '{req}', which "
                                f"nothing before it provides: {fix}")
            for gone in sp.info.consumes:
                have.discard(gone)
                consumed_by[gone] = sp.info.name
            have |= set(sp.info.provides)
            for made in sp.info.provides:
                consumed_by.pop(made, None)
        if problems:
            raise ContractError("recipe cannot run:\n  " + "\n  ".join(problems))

    def run(self, graph, ctx: PassContext) -> list[PassRecord]:
        self.check(ctx)
        for sp in self.passes:
            self._run_one(sp, graph, ctx)
        return ctx.records

    def _run_one(self, sp: ScheduledPass, graph, ctx: PassContext) -> None:
        info = sp.info
        history = ctx.history
        record = PassRecord(name=info.name, plugin=info.plugin, numerics=info.numerics,
                            options=dataclasses.asdict(sp.options))
        ctx.options, ctx.pass_name = sp.options, info.name
        try:
            for ins in self.instruments:
                ins.before_pass(info, graph, ctx)
            result = info.fn(graph, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"returned {type(result).__name__}, expected PassResult")
            record.changed, record.transformed = result.changed, tuple(result.transformed)
            record.skipped, record.metrics = tuple(result.skipped), dict(result.metrics)
            for gone in info.consumes:
                ctx.analysis.pop(gone, None)
            ctx.records.append(record)
            for ins in reversed(self.instruments):
                ins.after_pass(info, graph, ctx, record)
        except PassError as e:
            # a pass raising about itself cannot know the history: the manager adds it
            if e.pass_name is None or (e.pass_name == info.name and e.history != history):
                raise type(e)(e.message, pass_name=info.name, history=history,
                              node=e.node) from e
            raise
        except LowbitError:
            raise
        except Exception as e:
            raise PassError(f"{type(e).__name__}: {e}", pass_name=info.name, history=history,
                            node=getattr(e, "node", None)) from e
        finally:
            ctx.options, ctx.pass_name = None, None
