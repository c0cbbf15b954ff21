"""Records as JSON-ready dicts for the API and `pocd run list|show --json`, the one JSON
encoder of both, and how a number reads for people.

Times are ISO 8601 in UTC with nanoseconds kept beside them (`*_ns`), so nothing is rounded
away; the run's time zone is given for local display. JSON keeps full values; only the text
for people rounds them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ConfigDict, TypeAdapter

from pocd.model import NS, Deviation, Excursion, PhaseChange, Run
from pocd.store import Store

__all__ = ["iso", "json_bytes", "readable", "run_detail", "run_summary"]

# JSON has no infinity or NaN: Python's json writes `Infinity`, which strict parsers (browsers'
# JSON.parse, jq, Go, Rust) refuse. A device or a stored record may hold one whatever the
# transports do now (old records, a bug), so the encoder writes them as null.
_JSON = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="null"))


def json_bytes(data: Any, *, indent: int | None = None) -> bytes:
    """Valid JSON (UTF-8) of a JSON-ready value; a non-finite number becomes null."""
    return _JSON.dump_json(data, indent=indent)


def readable(value: float | None, digits: int = 4) -> str:
    """A number for people: `digits` significant digits and no exponent for everyday sizes
    (37.659903078597615 -> 37.66, 50012.34 -> 50012); `-` for none."""
    if value is None:
        return "-"
    if 10**digits <= abs(value) < 1e15:  # whole units; beyond, the exponent reads better
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def iso(t: int | None) -> str | None:
    if t is None:
        return None
    return (
        datetime.fromtimestamp(t / NS, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "batch_id": run.batch_id,
        "site_id": run.site_id,
        "timezone": run.timezone,
        "protocol_id": run.protocol_id,
        "protocol_version": run.protocol_version,
        "protocol_hash": run.protocol_hash,
        "operator": run.operator,
        "status": run.status.value,
        "started": iso(run.started),
        "started_ns": run.started,
        "ended": iso(run.ended),
        "ended_ns": run.ended,
        "end_reason": run.end_reason,
        "line": run.line,
    }


def _phase(p: PhaseChange) -> dict[str, Any]:
    return {
        "phase": p.phase,
        "previous": p.previous,
        "t": iso(p.t),
        "t_ns": p.t,
        "actor": p.actor,
        "in_order": p.in_order,
        "reason": p.reason,
    }


def _excursion(e: Excursion) -> dict[str, Any]:
    return {
        "id": e.id,
        "parameter": e.parameter,
        "kind": e.kind.value,
        "phase": e.phase,
        "protocol_id": e.protocol_id,
        "protocol_version": e.protocol_version,
        "limit": e.limit,
        "start": iso(e.start),
        "start_ns": e.start,
        "end": iso(e.end),
        "end_ns": e.end,
        "duration_s": e.duration_s,
        "worst": e.worst,
        "integral": e.integral,
        "run_id": e.run_id,
        "line": e.line,
    }


def _deviation(d: Deviation) -> dict[str, Any]:
    return {
        "id": d.id,
        "t": iso(d.t),
        "t_ns": d.t,
        "cause": d.cause.value,
        "phase": d.phase,
        "parameter": d.parameter,
        "excursion_id": d.excursion_id,
        "description": d.description,
        "run_id": d.run_id,
        "line": d.line,
    }


def run_detail(store: Store, run: Run) -> dict[str, Any]:
    return {
        **run_summary(run),
        "phases": [_phase(p) for p in store.phases(run.id)],
        "excursions": [_excursion(e) for e in store.excursions(run.id)],
        "deviations": [_deviation(d) for d in store.deviations(run.id)],
    }
