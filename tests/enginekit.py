"""Helpers to drive the engine with plain values and a fake clock (seconds from T0)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from pocd.engine import Engine, EngineEvent
from pocd.model import (
    NS,
    CommStatus,
    Deviation,
    ExcursionEvent,
    PhaseChange,
    Quality,
    Run,
    Sample,
)
from pocd.protocol import Limits, Parameter, Phase, Protocol, ProtocolStatus

T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z


def at(seconds: float) -> int:
    return T0 + round(seconds * NS)


def secs(t: int) -> float:
    return round((t - T0) / NS, 6)


def protocol(
    phases: dict[str, Limits],
    *,
    critical: bool = True,
    status: ProtocolStatus = ProtocolStatus.APPROVED,
) -> Protocol:
    """A protocol with one parameter `x` whose limits per phase are given in order."""
    return Protocol(
        id="P",
        version="1",
        title="test",
        status=status,
        hash="0" * 64,
        parameters={"x": Parameter(id="x", unit="u", critical=critical)},
        phases=tuple(Phase(id=name, title=name, limits={"x": lim}) for name, lim in phases.items()),
    )


def run() -> Run:
    return Run(
        id="R1",
        batch_id="B1",
        site_id="S",
        timezone="UTC",
        protocol_id="P",
        protocol_version="1",
        protocol_hash="0" * 64,
        operator="op",
        started=T0,
    )


def engine(proto: Protocol) -> Engine:
    counter = itertools.count(1)
    return Engine(run(), proto, {"x": ("dev", "x")}, new_id=lambda: f"id{next(counter)}")


def compact(event: EngineEvent) -> tuple[Any, ...]:
    """An event as a short tuple that a table of expectations can hold."""
    if isinstance(event, ExcursionEvent):
        exc = event.excursion
        if event.change == "opened":
            return ("opened", exc.kind.value, secs(exc.start))
        if event.change == "updated":
            return ("updated", exc.kind.value, exc.worst)
        assert exc.end is not None
        return ("closed", exc.kind.value, secs(exc.start), secs(exc.end))
    if isinstance(event, Deviation):
        return ("deviation", event.cause.value, event.parameter, secs(event.t))
    assert isinstance(event, PhaseChange)
    return ("phase", event.phase, event.in_order)


def apply(eng: Engine, step: tuple[Any, ...]) -> list[EngineEvent]:
    """One step of a scenario: (seconds, what, *args)."""
    t, what, *args = step
    if what == "v":
        return eng.on_sample(Sample("dev", "x", at(t), float(args[0])))
    if what == "uncertain":
        return eng.on_sample(Sample("dev", "x", at(t), float(args[0]), Quality.UNCERTAIN))
    if what == "bad":
        return eng.on_sample(Sample("dev", "x", at(t), 1.0, Quality.BAD, reason="test"))
    if what == "stale":
        return eng.on_sample(Sample("dev", "x", at(t), math.nan, Quality.BAD, reason="stale"))
    if what == "nan":
        return eng.on_sample(Sample("dev", "x", at(t), math.nan))
    if what == "tick":
        return eng.tick(at(t))
    if what in ("down", "up"):
        return eng.on_comm(CommStatus("dev", at(t), ok=what == "up"))
    if what == "phase":
        return eng.enter_phase(args[0], at(t), "op", args[1] if len(args) > 1 else "")
    if what == "end":
        return eng.finish(at(t))
    raise ValueError(what)
