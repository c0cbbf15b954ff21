"""Records as JSON-ready dicts for the API and `pocd run list|show --json`, the one JSON
encoder of both, and how a number reads for people.

Times are ISO 8601 in UTC with nanoseconds kept beside them (`*_ns`), so nothing is rounded
away; the run's time zone is given for local display. What each record's JSON holds is its
description's (pocd.store.recordtypes), shared with the store. JSON keeps full values; only
the text for people rounds them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, TypeAdapter

from pocd.model import Deviation, DeviationState, Run
from pocd.signatures import verify
from pocd.store import Store
from pocd.store.recordtypes import DEVIATION, EXCURSION, PHASE_CHANGE, RUN, SIGNATURE, iso

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


def run_summary(run: Run) -> dict[str, Any]:
    return RUN.json(run)


def deviation_json(store: Store, deviation: Deviation) -> dict[str, Any]:
    """A deviation with its lifecycle: its state now and every step to it."""
    changes = store.deviation_changes(deviation.id)
    return {
        **DEVIATION.json(deviation),
        "state": changes[-1].state.value if changes else DeviationState.OPEN.value,
        "changes": [
            {
                "t": iso(c.t),
                "actor": c.actor,
                "state": c.state.value,
                "note": c.note,
                "disposition": c.disposition,
                "root_cause": c.root_cause,
            }
            for c in changes
        ],
    }


def run_detail(store: Store, run: Run) -> dict[str, Any]:
    return {
        **run_summary(run),
        "phases": [PHASE_CHANGE.json(p) for p in store.phases(run.id)],
        "excursions": [EXCURSION.json(e) for e in store.excursions(run.id)],
        "deviations": [deviation_json(store, d) for d in store.deviations(run.id)],
        # each with whether the record it signs is still as it was signed
        "signatures": [
            {**SIGNATURE.json(s), "intact": verify(store, s)} for s in store.signatures(run.id)
        ],
    }
