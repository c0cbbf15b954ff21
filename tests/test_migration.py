"""A store written by commit 484da67's own code (schema v3, tests/data/store_484da67.sqlite,
made by tests/data/make_store_484da67.py) opened by today's: every record is found, in the
queries and in the event stream, and the store goes on from there."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

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
from pocd.store import SCHEMA_VERSION, Event, Store

DATA = Path(__file__).parent / "data" / "store_484da67.sqlite"
T0 = 1_767_225_600 * NS
MS = NS // 1000


def at(seconds: float) -> int:
    return T0 + round(seconds * NS)


# What the script wrote, as today's records read it (everything on the one implicit line).
DONE_STARTED = Run(
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
DONE = replace(DONE_STARTED, status=RunStatus.COMPLETED, ended=at(10), end_reason="done")
LIVE = replace(DONE_STARTED, id="run-live", batch_id="B-101", operator="bob", started=at(20))
HOT = Excursion(
    id="exc-hot",
    run_id="run-done",
    parameter="temperature",
    kind=ExcursionKind.ACTION_HIGH,
    protocol_id="CART",
    protocol_version="2",
    phase="expansion",
    limit=38.0,
    start=at(3),
    end=at(7),
    worst=39.25,
    integral=3.5,
)
STALE = Excursion(
    id="exc-stale",
    run_id="run-done",
    parameter="ph",
    kind=ExcursionKind.STALE,
    protocol_id="CART",
    protocol_version="2",
    phase="expansion",
    limit=None,
    start=at(4),
    end=at(6),
)
LOST = replace(
    STALE, id="exc-lost", run_id="run-live", kind=ExcursionKind.COMM_LOSS, start=at(25), end=None
)
PHASES = [
    PhaseChange("run-done", at(1), "expansion", None, "alice"),
    PhaseChange("run-done", at(8), "harvest", "expansion", "alice"),
    PhaseChange("run-live", at(20), "expansion", None, "bob"),
    PhaseChange(
        "run-live", at(22), "harvest", "expansion", "bob", in_order=False, reason="cells ready"
    ),
]
DEVIATIONS = [
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
    Deviation(
        "dev-order",
        "run-live",
        at(22),
        DeviationCause.PHASE_ORDER,
        "harvest",
        "phase 'harvest' entered out of order",
    ),
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
]
AUDIT = [
    AuditEntry(at(1), "alice", "config.load", "site-1", details={"hash": "cd" * 32}),
    AuditEntry(at(1), "alice", "run.start", "run-done", new="running"),
    AuditEntry(at(10), "alice", "run.stop", "run-done", "done", "running", "completed"),
    AuditEntry(at(20), "bob", "run.start", "run-live", new="running"),
]
INCIDENTS = [
    Incident(at(5), IncidentKind.COMMUNICATION, "crc", "bioreactor-1", "bad CRC", b"\x01\x03\xff"),
    Incident(at(27), IncidentKind.SOFTWARE, "restart", "daemon", "restarted"),
]
# The event stream of the backfill: in time order, at equal times run start, phase,
# excursion opened, deviation, excursion closed, run end, audit; a migrated excursion's
# events carry its final snapshot.
EVENTS: list[Event] = [
    DONE_STARTED,
    PHASES[0],
    AUDIT[0],
    AUDIT[1],
    ExcursionEvent(ExcursionChange.OPENED, HOT, at(3)),
    DEVIATIONS[0],
    ExcursionEvent(ExcursionChange.OPENED, STALE, at(4)),
    ExcursionEvent(ExcursionChange.CLOSED, STALE, at(6)),
    ExcursionEvent(ExcursionChange.CLOSED, HOT, at(7)),
    PHASES[1],
    DONE,
    AUDIT[2],
    LIVE,
    PHASES[2],
    AUDIT[3],
    PHASES[3],
    DEVIATIONS[1],
    ExcursionEvent(ExcursionChange.OPENED, LOST, at(25)),
    DEVIATIONS[2],
]


def _time(event: Event) -> int:
    match event:
        case Run():
            return event.started if event.ended is None else event.ended
        case ExcursionEvent():
            assert event.t is not None
            return event.t
        case _:
            return event.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    path = tmp_path / "pocd.db"
    shutil.copyfile(DATA, path)
    with Store(path) as opened:
        yield opened


def test_the_committed_store_is_484da67s() -> None:
    # immutable: a read-only WAL reader would still leave -shm and -wal files beside it
    db = sqlite3.connect(f"{DATA.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == 3000
    finally:
        db.close()
    assert sorted(p.name for p in DATA.parent.iterdir()) == [
        "make_store_484da67.py",
        "store_484da67.sqlite",
    ]


def test_every_record_is_found_in_the_queries(store: Store) -> None:
    assert store.runs() == [DONE, LIVE]
    assert store.active_runs() == [LIVE]
    assert store.run("B-100") == DONE
    assert store.phases() == PHASES
    assert store.phases("run-live") == PHASES[2:]
    assert store.excursions() == [HOT, STALE, LOST]
    assert store.open_excursions("run-live") == [LOST]
    assert store.line_excursions("main") == []
    assert store.deviations() == DEVIATIONS
    assert store.deviations("run-done") == DEVIATIONS[:1]
    assert store.incidents() == INCIDENTS
    assert store.audit() == AUDIT
    assert store.sample_count() == 3000
    samples = store.samples(device="bioreactor-1", point="temperature", limit=2)
    assert samples == [
        (1, Sample("bioreactor-1", "temperature", T0, 1e9, Quality.BAD, None, "overload")),
        (4, Sample("bioreactor-1", "temperature", T0 + 30 * MS, 37.003, device_t=T0 + 30 * MS - 5)),
    ]
    window = store.samples(since=at(29.99))
    assert [(rowid, s.device, s.point) for rowid, s in window] == [(3000, "incubator", "t")]
    runs, phases = store.commit_marks()
    # marked by time (v4): the first sample at or after each record's time, 10 ms apart
    assert [(r.id, first, end) for r, first, end in runs] == [
        ("run-done", 101, 1001),
        ("run-live", 2001, None),
    ]
    assert [first for _, first in phases] == [101, 801, 2001, 2201]


def test_every_record_is_found_in_the_event_stream(store: Store) -> None:
    events = store.events(0, 1000)
    assert [event for _, event in events] == EVENTS
    assert store.event_count() == len(EVENTS)
    times = [_time(e) for e in EVENTS]
    assert times == sorted(times)


def test_a_sink_on_the_outbox_of_484da67_starts_again_on_the_event_log(tmp_path: Path) -> None:
    """The outbox is gone (v9), and a sink's cursor in it meant nothing in the event log: it
    starts again from the first event (v8); its samples cursor stays where it was."""
    path = tmp_path / "pocd.db"
    shutil.copyfile(DATA, path)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 16
        db.executemany(
            "INSERT INTO cursors VALUES ('influxdb', ?, ?)", [("samples", 2500), ("events", 12)]
        )
    finally:
        db.close()
    with Store(path) as store:
        assert store.cursors("influxdb") == {"samples": 2500}
        assert store.events(0, 3) == [(1, EVENTS[0]), (2, EVENTS[1]), (3, EVENTS[2])]
        tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_schema")}
    assert "outbox" not in tables


def test_the_migrated_store_goes_on(tmp_path: Path, store: Store) -> None:
    closed = replace(LOST, end=at(40), worst=None)
    ended = replace(LIVE, status=RunStatus.ABORTED, ended=at(41), end_reason="lost")
    store.write(
        [
            Sample("incubator", "t", at(40), 37.0),
            ExcursionEvent(ExcursionChange.CLOSED, closed, at(40)),
            ended,
            AuditEntry(at(41), "bob", "run.stop", "run-live", "lost", "running", "aborted"),
        ]
    )
    after = store.events(len(EVENTS), 10)
    assert [event for _, event in after] == [
        ExcursionEvent(ExcursionChange.CLOSED, closed, at(40)),
        ended,
        AuditEntry(at(41), "bob", "run.stop", "run-live", "lost", "running", "aborted"),
    ]
    assert store.runs() == [DONE, ended]
    assert store.excursions() == [HOT, STALE, closed]
    # the sample before the run's end in the batch is not in it: the next one is
    assert store.commit_marks()[0][1][1:] == (2001, 3002)
    store.close()
    with Store(tmp_path / "pocd.db", readonly=True) as reader:
        assert reader.event_count() == len(EVENTS) + 3
    db = sqlite3.connect(tmp_path / "pocd.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_the_migration_chains_what_the_old_store_held(tmp_path: Path, store: Store) -> None:
    """v13 chains every record and sample stored before it (pocd.store.chain.seed): the old
    records are as tamper-evident as the new."""
    store.write([AuditEntry(at(41), "bob", "run.stop", "run-live", "lost", "running", "aborted")])
    report = store.verify_chain()
    assert report.holds, report.problems
    assert report.samples == 3000
    assert report.records >= len(EVENTS) + 1
    store.close()
    db = sqlite3.connect(tmp_path / "pocd.db")
    db.execute("DROP TRIGGER samples_no_update") if db.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'samples_no_update'"
    ).fetchone() else None
    db.execute("UPDATE samples SET v = v + 1 WHERE id = 10")  # an old sample
    db.commit()
    db.close()
    with Store(tmp_path / "pocd.db", readonly=True) as reader:
        problems = reader.verify_chain().problems
    assert problems == ["samples 1..3000 differ from what was recorded (edited)"]
