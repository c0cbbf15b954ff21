"""What the QP reviews by exception: the data gaps of a run and each class of exception, with
the automated check that proves a class empty. Pure: the exporter reads the records.

A gap is a period without good data for a parameter: a stale, bad-quality or comm-loss
excursion (the engine's own judgement, so the gaps match those excursions exactly), or the
daemon being down (from the last sample stored before a restart to the restart).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pocd.model import (
    NS,
    AlarmEvent,
    AlarmTransition,
    AuditEntry,
    Excursion,
    ExcursionKind,
    Incident,
    IncidentKind,
    PhaseChange,
    Run,
)
from pocd.protocol import Protocol
from pocd.store.recordtypes import iso

__all__ = ["GAP_COLUMNS", "Gap", "exception_classes", "find_gaps", "gap_row"]

GAP_COLUMNS: Final = (
    "parameter",
    "device",
    "point",
    "phase",
    "cause",
    "start",
    "end",
    "seconds",
    "start_ns",
    "end_ns",
)
DAEMON_DOWN: Final = "daemon-down"


@dataclass(frozen=True, slots=True)
class Gap:
    parameter: str
    device: str
    point: str
    phase: str
    cause: str  # comm-loss, stale, bad-quality or daemon-down
    start: int
    end: int

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / NS


def gap_row(gap: Gap) -> list[object]:
    return [
        gap.parameter,
        gap.device,
        gap.point,
        gap.phase,
        gap.cause,
        iso(gap.start),
        iso(gap.end),
        f"{gap.seconds:.3f}",
        gap.start,
        gap.end,
    ]


def _phase_at(phases: Sequence[PhaseChange], t: int) -> str:
    current = phases[0].phase if phases else ""
    for p in phases:
        if p.t > t:
            break
        current = p.phase
    return current


def find_gaps(
    excursions: Iterable[Excursion],
    downtimes: Iterable[tuple[int, int]],
    sources: Mapping[str, tuple[str, str]],
    phases: Sequence[PhaseChange],
    end: int,
) -> list[Gap]:
    """Every gap, by start: one per data-loss excursion (ending at the run's `end` if still
    open), and per daemon downtime (from, to) one for each parameter of `sources` (parameter
    -> its device and point on the run's line)."""
    found = [
        Gap(
            e.parameter,
            *sources.get(e.parameter, ("", "")),
            e.phase,
            e.kind.value,
            e.start,
            end if e.end is None else e.end,
        )
        for e in excursions
        if e.kind.is_data_loss
    ]
    for down, up in downtimes:
        phase = _phase_at(phases, down)
        found += [
            Gap(parameter, device, point, phase, DAEMON_DOWN, down, up)
            for parameter, (device, point) in sources.items()
        ]
    return sorted(found, key=lambda g: (g.start, g.parameter, g.cause))


def _class(name: str, title: str, records: list[str], where: str, check: str) -> dict[str, Any]:
    return {
        "class": name,
        "title": title,
        "count": len(records),
        "where": where,
        "check": check,
        "records": records,
    }


def _alarm_exceptions(
    events: Sequence[AlarmEvent], unacknowledged_after: float, end: int
) -> tuple[list[str], list[str]]:
    """(alarms left unacknowledged longer than the limit, shelved or out-of-service ones)."""
    activated: dict[str, int] = {}
    acknowledged: dict[str, int] = {}
    hidden: list[str] = []
    for e in events:
        if e.transition is AlarmTransition.ACTIVATE:
            activated.setdefault(e.alarm_id, e.t)
        elif e.transition is AlarmTransition.ACKNOWLEDGE:
            acknowledged.setdefault(e.alarm_id, e.t)
        elif e.transition in (AlarmTransition.SHELVE, AlarmTransition.REMOVE):
            hidden.append(f"{e.alarm_id} {e.source} {e.transition.value} by {e.actor}")
    late = [
        f"{alarm} ({(acknowledged.get(alarm, end) - t) / NS:.0f} s)"
        for alarm, t in activated.items()
        if acknowledged.get(alarm, end) - t > unacknowledged_after * NS
    ]
    return late, hidden


def _beyond_allowance(protocol: Protocol | None, gaps: Sequence[Gap]) -> list[str]:
    """Per parameter and phase, the gap seconds beyond the protocol's `max_data_loss` (a
    critical parameter with none set is allowed none)."""
    if protocol is None:
        return []
    spent: dict[tuple[str, str], float] = {}
    for gap in gaps:
        spent[gap.parameter, gap.phase] = spent.get((gap.parameter, gap.phase), 0.0) + gap.seconds
    found = []
    for (parameter, phase), seconds in sorted(spent.items()):
        known = protocol.parameters.get(parameter)
        try:
            limits = protocol.phase(phase).limits.get(parameter)
        except KeyError:
            limits = None
        allowed = limits.max_data_loss if limits and limits.max_data_loss is not None else None
        if allowed is None and not (known and known.critical):
            continue
        if seconds > (allowed or 0.0):
            found.append(
                f"{parameter} in {phase}: {seconds:.1f} s without data, {allowed or 0} s allowed"
            )
    return found


def exception_classes(
    *,
    run: Run,
    protocol: Protocol | None,
    window: tuple[int, int],
    excursions: Sequence[Excursion],
    deviation_states: Mapping[str, str],
    alarm_events: Sequence[AlarmEvent],
    unacknowledged_after: float,
    gaps: Sequence[Gap],
    phases: Sequence[PhaseChange],
    audit: Sequence[AuditEntry],
    incidents: Sequence[Incident],
) -> list[dict[str, Any]]:
    """Each class of exception of the run, in the order of the report's first page."""
    start, end = window
    action = [e.id for e in excursions if e.kind.is_action]
    alert = [
        e.id
        for e in excursions
        if e.kind in (ExcursionKind.ALERT_LOW, ExcursionKind.ALERT_HIGH, ExcursionKind.RATE)
    ]
    by_state = {
        s: [d for d, state in deviation_states.items() if state == s]
        for s in ("open", "assessed", "closed")
    }
    late, hidden = _alarm_exceptions(alarm_events, unacknowledged_after, end)
    changes = [
        f"{iso(a.t)} {a.action} {a.target} by {a.actor}"
        for a in audit
        if start < a.t <= end
        and (a.action in ("config.reload", "config.load", "protocol.load", "driver.load"))
        and (a.action == "config.reload" or a.old != a.new)
        and _changed(a, audit, start)
    ]
    in_window = [i for i in incidents if start <= i.t <= end]
    n_exc, n_dev = len(excursions), len(deviation_states)
    return [
        _class(
            "action-excursions",
            "Action-limit excursions",
            action,
            "excursions.json (kind action-low, action-high)",
            f"all {n_exc} excursions of the run were classified by kind",
        ),
        _class(
            "alert-excursions",
            "Alert-limit and rate excursions",
            alert,
            "excursions.json (kind alert-low, alert-high, rate)",
            f"all {n_exc} excursions of the run were classified by kind",
        ),
        *(
            _class(
                f"deviations-{state}",
                f"Deviations {state}",
                by_state[state],
                "deviations.json (state and every lifecycle step)",
                f"the lifecycle of all {n_dev} deviations of the run was read",
            )
            for state in ("open", "assessed", "closed")
        ),
        _class(
            "alarms-unacknowledged-long",
            f"Alarms unacknowledged longer than {unacknowledged_after:g} s",
            late,
            "alarms.json (activate to acknowledge)",
            f"the {len(alarm_events)} alarm events of the run were replayed",
        ),
        _class(
            "alarms-shelved-or-out-of-service",
            "Alarms shelved or out of service",
            hidden,
            "alarms.json (transitions shelve, remove)",
            f"the {len(alarm_events)} alarm events of the run were replayed",
        ),
        _class(
            "data-gaps-beyond-allowance",
            "Data gaps beyond the protocol's allowance",
            _beyond_allowance(protocol, gaps),
            "gaps.csv",
            f"the {len(gaps)} gaps were summed per parameter and phase against max_data_loss",
        ),
        _class(
            "phases-out-of-order",
            "Phases entered out of order",
            [
                f"{iso(p.t)} {p.phase} after {p.previous} by {p.actor}"
                for p in phases
                if not p.in_order
            ],
            "run.json (phases, in_order false)",
            f"all {len(phases)} phase changes were checked against the protocol's order",
        ),
        _class(
            "config-changes",
            "Config or protocol changes during the run",
            changes,
            "audit.jsonl (config.*, protocol.load, driver.load)",
            "every load of the config, drivers and protocols in the run's window was compared "
            "with what was in force at its start",
        ),
        _class(
            "incidents",
            "Incidents",
            [
                f"{iso(i.t)} {i.kind.value} {i.code} {i.source}"
                for i in in_window
                if i.kind is not IncidentKind.CLOCK
            ],
            "incidents.json",
            f"the store's incidents in the run's window were read ({len(in_window)})",
        ),
        _class(
            "clock-jumps",
            "Clock jumps",
            [f"{iso(i.t)} {i.message}" for i in in_window if i.kind is IncidentKind.CLOCK],
            "incidents.json (kind clock)",
            "the daemon compares the wall clock with a steady clock at every reading",
        ),
    ]


def _changed(entry: AuditEntry, audit: Sequence[AuditEntry], start: int) -> bool:
    """Whether a load during the run brought something other than what was in force at its
    start (a restart that loads the same files is not a change)."""
    if entry.action == "config.reload":
        return True
    before = [
        a.new
        for a in audit
        if a.t <= start and a.action == entry.action and a.target == entry.target
    ]
    return not before or before[-1] != entry.new
