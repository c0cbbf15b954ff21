"""Write the store of tests/test_migration.py with the code of commit 484da67 (schema v3).

Run it with that commit's package first on the path, not today's:

    git worktree add /work/wt-old 484da67
    PYTHONPATH=/work/wt-old .venv/bin/python tests/data/make_store_484da67.py \
        tests/data/store_484da67.sqlite

It writes two runs (one completed, one still running), their phase changes, excursions closed
and open (one opened, worsened and closed), deviations, incidents, audit entries and 3,000
samples, in time order and in batches as the daemon of that commit did. What it writes is what
tests/test_migration.py expects to find: change one, change the other.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pocd.model import (
    NS,
    AuditEntry,
    Deviation,
    DeviationCause,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    Incident,
    IncidentKind,
    PhaseChange,
    Quality,
    Run,
    RunStatus,
    Sample,
)
from pocd.store import SCHEMA_VERSION, Store

T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z
MS = NS // 1000
SAMPLES = 3000  # 10 ms apart: 30 s


def at(seconds: float) -> int:
    return T0 + round(seconds * NS)


def samples() -> list[tuple[int, Any]]:
    found = []
    points = [("bioreactor-1", "temperature"), ("bioreactor-1", "ph"), ("incubator", "t")]
    for i in range(SAMPLES):
        device, point = points[i % 3]
        t = T0 + i * 10 * MS
        if i % 101 == 0:
            sample = Sample(device, point, t, 1e9, Quality.BAD, None, "overload")
        else:
            sample = Sample(device, point, t, 37.0 + i / 1000, device_t=t - 5 if i % 2 else None)
        found.append((t, sample))
    return found


def events() -> list[tuple[int, Any]]:
    done = Run(
        id="run-done",
        batch_id="B-100",
        site_id="site-1",
        timezone="Europe/Berlin",
        protocol_id="CART",
        protocol_version="2",
        protocol_hash="ab" * 32,
        operator="alice",
        started=at(1),
    )
    live = replace(done, id="run-live", batch_id="B-101", operator="bob", started=at(20))
    hot = Excursion(
        id="exc-hot",
        run_id="run-done",
        parameter="temperature",
        kind=ExcursionKind.ACTION_HIGH,
        protocol_id="CART",
        protocol_version="2",
        phase="expansion",
        limit=38.0,
        start=at(3),
        worst=38.5,
        integral=0.5,
    )
    stale = Excursion(
        id="exc-stale",
        run_id="run-done",
        parameter="ph",
        kind=ExcursionKind.STALE,
        protocol_id="CART",
        protocol_version="2",
        phase="expansion",
        limit=None,
        start=at(4),
    )
    lost = replace(
        stale, id="exc-lost", run_id="run-live", kind=ExcursionKind.COMM_LOSS, start=at(25)
    )
    return [
        (at(1), AuditEntry(at(1), "alice", "config.load", "site-1", details={"hash": "cd" * 32})),
        (at(1), AuditEntry(at(1), "alice", "run.start", "run-done", new="running")),
        (at(1), done),
        (at(1), PhaseChange("run-done", at(1), "expansion", None, "alice")),
        (at(3), ExcursionEvent(ExcursionChange.OPENED, hot)),
        (
            at(3),
            Deviation(
                "dev-hot",
                "run-done",
                at(3),
                DeviationCause.ACTION_LIMIT,
                "expansion",
                "temperature above 38.0",
                "temperature",
                "exc-hot",
            ),
        ),
        (at(4), ExcursionEvent(ExcursionChange.UPDATED, replace(hot, worst=39.25, integral=2.0))),
        (at(4), ExcursionEvent(ExcursionChange.OPENED, stale)),
        (
            at(5),
            Incident(
                at(5), IncidentKind.COMMUNICATION, "crc", "bioreactor-1", "bad CRC", b"\x01\x03\xff"
            ),
        ),
        (at(6), ExcursionEvent(ExcursionChange.CLOSED, replace(stale, end=at(6)))),
        (
            at(7),
            ExcursionEvent(
                ExcursionChange.CLOSED, replace(hot, worst=39.25, integral=3.5, end=at(7))
            ),
        ),
        (at(8), PhaseChange("run-done", at(8), "harvest", "expansion", "alice")),
        (at(10), replace(done, status=RunStatus.COMPLETED, ended=at(10), end_reason="done")),
        (
            at(10),
            AuditEntry(at(10), "alice", "run.stop", "run-done", "done", "running", "completed"),
        ),
        (at(20), AuditEntry(at(20), "bob", "run.start", "run-live", new="running")),
        (at(20), live),
        (at(20), PhaseChange("run-live", at(20), "expansion", None, "bob")),
        (
            at(22),
            PhaseChange(
                "run-live",
                at(22),
                "harvest",
                "expansion",
                "bob",
                in_order=False,
                reason="cells ready",
            ),
        ),
        (
            at(22),
            Deviation(
                "dev-order",
                "run-live",
                at(22),
                DeviationCause.PHASE_ORDER,
                "harvest",
                "phase 'harvest' entered out of order",
            ),
        ),
        (at(25), ExcursionEvent(ExcursionChange.OPENED, lost)),
        (
            at(26),
            Deviation(
                "dev-lost",
                "run-live",
                at(26),
                DeviationCause.DATA_LOSS,
                "harvest",
                "incubator not answering",
                "ph",
                "exc-lost",
            ),
        ),
        (at(27), Incident(at(27), IncidentKind.SOFTWARE, "restart", "daemon", "restarted")),
    ]


def main(path: Path) -> None:
    if SCHEMA_VERSION != 3:
        raise SystemExit(f"this is pocd with schema v{SCHEMA_VERSION}, not 484da67's (v3)")
    if path.exists():
        raise SystemExit(f"{path} exists: remove it first")
    # Time order, the events of an instant after its samples, in batches of about a second.
    records = sorted(samples() + events(), key=lambda pair: pair[0])
    with Store(path) as store:
        batch: list[Any] = []
        second = T0
        for t, record in records:
            if t >= second + NS and batch:
                store.write(batch)
                batch, second = [], t
            batch.append(record)
        store.write(batch)
    print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
