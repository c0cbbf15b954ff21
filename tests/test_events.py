"""The event log on a real store: a real engine's every transition, written as the daemon
writes it, is in the event tables in the order it was emitted, and the current-state tables
agree with a replay of the events."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pocd.engine import Engine, EngineEvent
from pocd.errors import StoreError
from pocd.model import (
    AuditEntry,
    Deviation,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    PhaseChange,
    Run,
    RunStatus,
    Sample,
)
from pocd.protocol import Limits, ProtocolKind
from pocd.store import Event, Record, Store
from pocd.store.writer import StoreWriter
from tests.enginekit import at, protocol, run

# Steps after the run started: (seconds, what, *args). The excursions open, worsen, close,
# one is closed and reopened by a phase change, and an out-of-order phase is a deviation.
STEPS: list[tuple[Any, ...]] = [
    (0, "phase", "a"),
    (1, "v", 9.0),
    (2, "v", 11.0),  # alert-high opens
    (3, "v", 13.0),  # action-high opens, with a deviation; alert worsens
    (4, "v", 14.0),
    (5, "v", 11.0),  # action closes
    (6, "phase", "b"),  # alert closes at the change and opens anew under b's limits
    (7, "v", 12.5),
    (8, "v", 9.0),  # closes
    (9, "phase", "d", "operator skipped c"),  # out of order: a deviation
    (10, "v", 21.0),
    (11, "end"),
]
STANDBY_STEPS: list[tuple[Any, ...]] = [(20, "v", 30.0), (21, "v", 35.0), (22, "v", 20.0)]


def _engine(engine_run: Run | None) -> Engine:
    limits = Limits(alert_high=10.0, action_high=12.0)
    proto = protocol({"a": limits, "b": Limits(alert_high=10.0), "c": limits, "d": limits})
    if engine_run is None:
        proto = replace(proto, kind=ProtocolKind.STANDBY, phases=proto.phases[:1])
    counter = itertools.count(1)
    prefix = "standby" if engine_run is None else "run"
    return Engine(
        engine_run, proto, {"x": ("dev", "x")}, new_id=lambda: f"{prefix}-{next(counter)}"
    )


def _step(engine: Engine, step: tuple[Any, ...]) -> tuple[list[Sample], list[EngineEvent]]:
    t, what, *args = step
    if what == "v":
        sample = Sample("dev", "x", at(t), float(args[0]))
        return [sample], engine.on_sample(sample)
    if what == "phase":
        return [], engine.enter_phase(args[0], at(t), "op", args[1] if len(args) > 1 else "")
    assert what == "end"
    return [], engine.finish(at(t))


def _drive(store: Store, commit: Callable[[list[Record]], None] | None = None) -> list[Event]:
    """Run a batch and then the line's standby monitoring, committing every record (samples
    and the events they caused in one batch, unless `commit` says otherwise); return the
    events in the order they were emitted."""
    started = run()
    emitted: list[Event] = []

    def write(records: list[Record]) -> None:
        (commit or store.write)(records)
        emitted.extend(r for r in records if not isinstance(r, Sample))

    write([started, AuditEntry(started.started, "op", "run.start", started.id, new="running")])
    engine = _engine(started)
    for step in STEPS:
        samples, events = _step(engine, step)
        write([*samples, *events])
    ended = replace(started, status=RunStatus.COMPLETED, ended=at(11), end_reason="done")
    write([ended, AuditEntry(at(11), "op", "run.stop", started.id, "done", "running", "completed")])

    standby = _engine(None)
    write(list(standby.enter_phase("a", at(19), "daemon")))
    for step in STANDBY_STEPS:
        samples, events = _step(standby, step)
        write([*samples, *events])
    return emitted


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "pocd.db")


def test_every_transition_is_an_event_in_emission_order(store: Store) -> None:
    with store:
        emitted = _drive(store)
        changes = [e.change for e in emitted if isinstance(e, ExcursionEvent)]
        # the scenario covers what it says it does
        assert set(changes) == set(ExcursionChange)
        assert any(isinstance(e, Deviation) for e in emitted)
        assert sum(isinstance(e, PhaseChange) for e in emitted) == 3
        assert any(isinstance(e, ExcursionEvent) and e.excursion.run_id is None for e in emitted)

        logged = store.events(0, 10_000)
        assert [event for _, event in logged] == emitted
        assert [event_id for event_id, _ in logged] == list(range(1, len(emitted) + 1))
        assert store.event_count() == len(emitted)
        for _, event in logged:
            if isinstance(event, ExcursionEvent):
                assert event.t is not None
                assert event.t >= event.excursion.start
        # read by cursor, a few at a time: the same events
        paged: list[tuple[int, Event]] = []
        while page := store.events(paged[-1][0] if paged else 0, 3):
            paged.extend(page)
        assert paged == logged
        assert store.events(store.event_count(), 10) == []


async def test_the_store_writer_keeps_the_order_across_its_transactions(store: Store) -> None:
    """Written as the daemon writes, through the store writer, in transactions of a few
    records that cut through the engine's batches: the log is still in emission order."""
    writer = StoreWriter(batch_size=3, high_water=10_000, on_incident=lambda _: None)
    writer.store = store

    def queue(records: list[Record]) -> None:
        for record in records:
            writer.add(record)

    with store:
        emitted = _drive(store, queue)
        await writer.flush()
        assert writer.commits.count > len(emitted) // 3
        assert [event for _, event in store.events(0, 10_000)] == emitted
        assert store.incidents() == []


def test_the_current_state_is_a_replay_of_the_events(store: Store) -> None:
    with store:
        _drive(store)
        excursions: dict[str, Excursion] = {}
        runs: dict[str, Run] = {}
        phases: list[PhaseChange] = []
        deviations: list[Deviation] = []
        audit: list[AuditEntry] = []
        for _, event in store.events(0, 10_000):
            match event:
                case ExcursionEvent(excursion=e):
                    excursions[e.id] = e
                case Run():
                    runs[event.id] = event
                case PhaseChange():
                    phases.append(event)
                case Deviation():
                    deviations.append(event)
                case AuditEntry():
                    audit.append(event)
        assert store.excursions() == list(excursions.values())
        assert store.line_excursions("main") == [e for e in excursions.values() if e.run_id is None]
        assert store.runs() == list(runs.values())
        assert store.active_runs() == []
        assert store.phases() == phases
        assert store.deviations() == deviations
        assert store.audit() == audit
        # every excursion of the batch was closed by its end
        assert all(e.end is not None for e in store.excursions("R1"))


def test_a_rejected_transition_leaves_no_event(store: Store) -> None:
    with store:
        _drive(store)
        count, before = store.event_count(), store.excursions()
        first = next(e for _, e in store.events(0, 100) if isinstance(e, ExcursionEvent))
        moved = replace(first.excursion, parameter="y")
        with pytest.raises(StoreError, match="fixed"):
            store.write([ExcursionEvent(ExcursionChange.UPDATED, moved, at(30))])
        assert store.event_count() == count
        assert store.excursions() == before


def test_the_current_state_is_written_by_the_events_only(store: Store) -> None:
    """`runs` and `excursions` refuse a write that is not the latest event's (schema v9), so
    what the queries read cannot drift from the log; and the outbox the log replaced is gone."""
    with store:
        _drive(store)
        before = (store.runs(), store.excursions(), store.event_count())
        db = store._db
        refused = [
            "UPDATE runs SET status = 'aborted', end_reason = 'edited'",
            "UPDATE excursions SET worst = 99.0",
            "UPDATE excursions SET end_t = NULL",
            "INSERT INTO runs (id, batch_id, site_id, timezone, protocol_id, protocol_version, "
            "protocol_hash, operator, started, status, ended, end_reason, line) "
            "VALUES ('R9', 'B9', 's', 'UTC', 'P', '1', 'h', 'op', 1, 'running', NULL, '', 'main')",
            "INSERT INTO excursions (id, run_id, parameter, kind, protocol_id, protocol_version, "
            "phase, limit_value, start_t, line) "
            "VALUES ('x9', NULL, 'x', 'stale', 'P', '1', 'a', NULL, 1, 'main')",
        ]
        for sql in refused:
            with pytest.raises(sqlite3.IntegrityError, match="derived from"):
                db.execute(sql)
        assert (store.runs(), store.excursions(), store.event_count()) == before
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_schema")}
        assert "outbox" not in tables
        assert not [name for name in tables if "outbox" in name]
