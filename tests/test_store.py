"""The embedded store on real SQLite files: round trips, append-only triggers, migrations,
concurrent readers and durability across kill -9."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pocd.errors import RecordRejected, StoreError
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
    SiteStatus,
)
from pocd.records import json_bytes, run_detail, run_summary
from pocd.store import SAMPLE_KEY_BITS, SCHEMA_VERSION, AmbiguousRunError, Record, Store, schema

REPO = Path(__file__).resolve().parents[1]
T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z


def make_run(run_id: str = "run-0001", batch_id: str = "B-001", started: int = T0) -> Run:
    return Run(
        id=run_id,
        batch_id=batch_id,
        site_id="site-1",
        timezone="Europe/Berlin",
        protocol_id="CART-TCT",
        protocol_version="3.1",
        protocol_hash="ab" * 32,
        operator="alice",
        started=started,
    )


def make_excursion(**changes: Any) -> Excursion:
    opened = Excursion(
        id="exc-1",
        run_id="run-0001",
        parameter="temperature",
        kind=ExcursionKind.ACTION_HIGH,
        protocol_id="CART-TCT",
        protocol_version="3.1",
        phase="expansion",
        limit=38.0,
        start=T0 + 10 * NS,
    )
    return replace(opened, **changes)


def make_samples(count: int, *, start: int = T0, devices: int = 3) -> list[Sample]:
    """Round-robin over `devices` channels, 1 ms apart, every 97th BAD, some device times."""
    samples = []
    for i in range(count):
        device, point = f"dev-{i % devices}", "temperature" if i % 2 else "ph"
        t = start + i * 1_000_000
        if i % 97 == 0:
            samples.append(Sample(device, point, t, 1e9 + i, Quality.BAD, None, "overload"))
        else:
            samples.append(
                Sample(device, point, t, 37.0 + i / 1000, device_t=t - 5 if i % 3 else None)
            )
    return samples


def all_records() -> list[Record]:
    run = make_run()
    return [
        run,
        PhaseChange(run.id, T0 + 1, "enrichment", None, "alice"),
        PhaseChange(
            run.id, T0 + 2, "harvest", "enrichment", "bob", in_order=False, reason="cells ready"
        ),
        Sample("bioreactor-1", "temperature", T0 + 3, 37.25, device_t=T0 + 2),
        Sample("bioreactor-1", "ph", T0 + 4, 7.125, Quality.UNCERTAIN, None, "calibration due"),
        ExcursionEvent(ExcursionChange.OPENED, make_excursion(worst=38.5, integral=0.25)),
        ExcursionEvent(
            ExcursionChange.OPENED,
            make_excursion(id="exc-2", kind=ExcursionKind.STALE, limit=None, parameter="ph"),
        ),
        Deviation(
            "dev-1",
            run.id,
            T0 + 5,
            DeviationCause.ACTION_LIMIT,
            "expansion",
            "temperature above action limit",
            parameter="temperature",
            excursion_id="exc-1",
        ),
        Deviation("dev-2", run.id, T0 + 6, DeviationCause.PHASE_ORDER, "harvest", "skipped"),
        Incident(
            T0 + 7, IncidentKind.COMMUNICATION, "crc", "pump-1", "bad CRC", b"\x01\x03\xff\x00"
        ),
        Incident(T0 + 8, IncidentKind.SOFTWARE, "restart", "daemon", "restarted"),
        AuditEntry(T0 + 9, "alice", "run.start", run.id, new="running", details={"batch": "B-001"}),
        AuditEntry(T0 + 10, "qa", "site.status", "site-1", "audit", "active", "suspended"),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "pocd.db") as opened:
        yield opened


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# -- round trips ------------------------------------------------------------------------------


def test_every_record_type_round_trips(store: Store) -> None:
    records = all_records()
    store.write(records)

    run = records[0]
    assert store.runs() == [run]
    assert store.phases("run-0001") == records[1:3]
    assert [s for _, s in store.samples()] == records[3:5]
    assert store.excursions() == [
        e.excursion for e in records[5:7] if isinstance(e, ExcursionEvent)
    ]
    assert store.deviations("run-0001") == records[7:9]
    assert store.incidents() == records[9:11]
    assert store.incidents(since=T0 + 8) == records[10:11]
    assert store.audit() == records[11:13]
    (phase,) = [p for p in store.phases("run-0001") if not p.in_order]
    assert phase.in_order is False
    assert isinstance(store.runs()[0].status, RunStatus)
    assert isinstance(store.excursions()[0].kind, ExcursionKind)
    assert isinstance(store.incidents()[0].kind, IncidentKind)
    assert isinstance(store.deviations()[0].cause, DeviationCause)
    assert store.phases("other") == []
    assert store.deviations("other") == []
    assert store.excursions("other") == []


def test_samples_keep_order_and_fields_in_batches_of_any_size(store: Store) -> None:
    samples = make_samples(3100)
    # Batches cut into statements of 512, 256, ..., 1 rows: every size up to 1023 is covered
    # by 1023 itself (all of them), 1 and 512 (one each), 1024 + 540 (two 512s and a mix).
    sizes = [1, 512, 1023, 1024, 540]
    start = 0
    for size in sizes:
        store.write(iter(samples[start : start + size]))  # any iterable, not only lists
        start += size
    assert start == len(samples)
    stored = store.samples()
    assert [rowid for rowid, _ in stored] == list(range(1, 3101))
    assert [s for _, s in stored] == samples
    assert store.sample_count() == 3100
    assert {s.quality for _, s in stored} == {Quality.GOOD, Quality.BAD}


def test_nan_reads_back_as_nan_and_bad(store: Store) -> None:
    store.write(
        [
            Sample("ph-probe", "ph", T0, math.nan),  # the model makes this BAD, reason "nan"
            Sample("ph-probe", "ph", T0 + 1, math.nan, Quality.BAD, None, "no answer"),
            Sample("ph-probe", "ph", T0 + 2, math.inf, Quality.BAD, None, "overload"),
        ]
    )
    first, second, third = (s for _, s in store.samples())
    assert math.isnan(first.value) and first.quality is Quality.BAD and first.reason == "nan"
    assert math.isnan(second.value) and second.quality is Quality.BAD
    assert second.reason == "no answer"
    assert third.value == math.inf and third.reason == "overload"

    # SQLite keeps no NaN: optional floats come back None, the integral NaN
    store.write(
        [ExcursionEvent(ExcursionChange.OPENED, make_excursion(worst=math.nan, integral=math.nan))]
    )
    (excursion,) = store.excursions()
    assert excursion.worst is None and math.isnan(excursion.integral)
    store.write([])  # an empty batch is no transaction at all
    assert store.sample_count() == 3


def test_sample_queries(store: Store) -> None:
    samples = make_samples(10_000)  # three blocks of 4096 rowids
    store.write(samples)
    # a clock jump back: these are stored last but are older than everything above
    jumped = [Sample("dev-0", "ph", T0 - 60 * NS + i, float(i)) for i in range(5)]
    store.write(jumped)

    dev1 = [s for _, s in store.samples(device="dev-1")]
    assert dev1 == [s for s in samples if s.device == "dev-1"]
    ph = [s for _, s in store.samples(device="dev-2", point="ph")]
    assert ph == [s for s in samples if (s.device, s.point) == ("dev-2", "ph")]
    assert [s for _, s in store.samples(point="temperature")] == [
        s for s in samples if s.point == "temperature"
    ]
    assert store.samples(device="nobody") == []

    since, until = samples[5000].t, samples[5010].t
    assert [s for _, s in store.samples(since=since, until=until)] == samples[5000:5010]
    assert [s for _, s in store.samples(until=T0)] == jumped
    assert [s for _, s in store.samples(since=samples[-1].t)] == samples[-1:]
    assert store.samples(since=T0 + 3600 * NS) == []

    page = store.samples(after_id=9998, limit=3)
    assert [rowid for rowid, _ in page] == [9999, 10000, 10001]
    assert [s for _, s in page] == [*samples[9998:], jumped[0]]

    assert store.sample_count() == 10_005
    latest = store.last_sample_times()
    assert latest[("dev-0", "ph")] == jumped[-1].t  # the latest stored, not the largest t
    assert latest[("dev-1", "temperature")] == max(
        s.t for s in samples if (s.device, s.point) == ("dev-1", "temperature")
    )
    assert len(latest) == 6


# -- excursions and runs, updated in place ----------------------------------------------------


def test_excursion_upsert_lifecycle(store: Store) -> None:
    opened = make_excursion()
    other_run = make_excursion(id="exc-9", run_id="run-0002")
    store.write([ExcursionEvent(ExcursionChange.OPENED, opened)])
    store.write([ExcursionEvent(ExcursionChange.OPENED, other_run)])
    assert store.open_excursions("run-0001") == [opened]

    worse = make_excursion(worst=39.0, integral=4.5)
    store.write([ExcursionEvent(ExcursionChange.UPDATED, worse)])
    assert store.open_excursions("run-0001") == [worse]

    # updated and closed within one batch: applied in order
    closed = make_excursion(worst=39.5, integral=7.0, end=T0 + 70 * NS)
    store.write(
        [
            ExcursionEvent(ExcursionChange.UPDATED, make_excursion(worst=39.5, integral=6.0)),
            ExcursionEvent(ExcursionChange.CLOSED, closed),
        ]
    )
    assert store.open_excursions("run-0001") == []
    assert store.excursions("run-0001") == [closed]
    assert closed.duration_s == 60.0
    assert store.excursions() == [closed, other_run]


def test_excursion_identity_is_fixed_and_a_failed_batch_keeps_nothing(store: Store) -> None:
    store.write([ExcursionEvent(ExcursionChange.OPENED, make_excursion())])
    moved = make_excursion(parameter="ph", worst=1.0)
    with pytest.raises(StoreError, match="fixed"):
        store.write(
            [Sample("new-device", "ph", T0, 7.0), ExcursionEvent(ExcursionChange.UPDATED, moved)]
        )
    assert store.sample_count() == 0
    assert store.excursions() == [make_excursion()]
    # the channel interned by the rolled-back batch is gone; the next batch interns it again
    store.write([Sample("new-device", "ph", T0 + 1, 7.0)])
    assert [s for _, s in store.samples(device="new-device")] == [
        Sample("new-device", "ph", T0 + 1, 7.0)
    ]


def test_run_is_upserted_and_final_once_ended(store: Store) -> None:
    started = make_run()
    store.write([started])
    assert store.active_run() == started
    with pytest.raises(StoreError, match="only status, ended and end_reason change"):
        store.write([replace(started, batch_id="B-999")])
    ended = replace(started, status=RunStatus.COMPLETED, ended=T0 + NS, end_reason="done")
    store.write([ended])
    store.write([ended])  # writing the same final record again is harmless
    assert store.runs() == [ended]
    assert store.active_run() is None
    with pytest.raises(StoreError, match="a finished run is final"):
        store.write([started])
    assert store.runs() == [ended]


def test_write_refuses_unknown_record_types(store: Store) -> None:
    with pytest.raises(RecordRejected, match="cannot store a str"):
        store.write([Sample("d", "p", T0, 1.0), "not a record"])  # type: ignore[list-item]
    assert store.sample_count() == 0


@pytest.mark.parametrize(
    "record",
    [
        Sample("d", "p", T0, 1.0, device_t=2**64),  # DateTime.MaxValue in ns: beyond int64
        Sample("d", "p", 2**63, 1.0),
        Incident(T0, IncidentKind.DATA, "x", "d", "message", raw="not bytes"),  # type: ignore[arg-type]
    ],
)
def test_a_record_that_cannot_be_stored_is_rejected_as_such(store: Store, record: Record) -> None:
    """Not an I/O error: the daemon sets such a record aside instead of retrying for ever."""
    with pytest.raises(RecordRejected):
        store.write([Sample("d", "p", T0, 2.0), record])
    assert store.sample_count() == 0
    store.write([Sample("d", "p", T0, 2.0)])  # the store is unharmed
    assert store.sample_count() == 1


def test_writes_from_several_threads_are_serialised(store: Store) -> None:
    def writer(n: int) -> None:
        for k in range(5):
            store.write(
                [Sample(f"thread-{n}", "p", T0 + k * 1000 + i, float(i)) for i in range(700)]
            )

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.sample_count() == 4 * 5 * 700
    assert len(store.last_sample_times()) == 4


# -- append-only ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [
        "samples",
        "audit",
        "incidents",
        "phases",
        "deviations",
        "channels",
        "qualities",
        "run_events",
        "excursion_events",
        "events",
    ],
)
def test_append_only_tables_refuse_update_and_delete(tmp_path: Path, table: str) -> None:
    path = tmp_path / "pocd.db"
    with Store(path) as store:
        store.write([*all_records(), Sample("d", "p", T0, math.nan)])
    db = raw(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only: UPDATE refused"):
            db.execute(f"UPDATE {table} SET id = id + 100")
        with pytest.raises(sqlite3.IntegrityError, match="append-only: DELETE refused"):
            db.execute(f"DELETE FROM {table}")
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0
    finally:
        db.close()


@pytest.mark.parametrize("table", ["runs", "excursions"])
def test_runs_and_excursions_are_never_deleted(tmp_path: Path, table: str) -> None:
    path = tmp_path / "pocd.db"
    with Store(path) as store:
        store.write(all_records())
    db = raw(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            db.execute(f"DELETE FROM {table}")
    finally:
        db.close()


# -- lookups ----------------------------------------------------------------------------------


def test_run_lookup_by_id_prefix_and_batch(store: Store) -> None:
    first = make_run("a1b2c3d4", "B-001", T0)
    second = make_run("a1ffee00", "B-001", T0 + NS)
    third = make_run("c0ffee11", "B-002", T0 + 2 * NS)
    store.write([first, second, third])
    assert store.run("a1b2c3d4") == first
    assert store.run("a1b") == first
    assert store.run("c0") == third
    assert store.run("B-001") == second  # the latest run of the batch
    assert store.run("B-002") == third
    assert store.run("nothing") is None
    assert store.run("") is None
    with pytest.raises(AmbiguousRunError) as caught:
        store.run("a1")
    assert caught.value.matches == ("a1b2c3d4", "a1ffee00")


def test_site_status_follows_the_latest_audit_entry(store: Store) -> None:
    assert store.site_status() is SiteStatus.ACTIVE
    store.write([AuditEntry(T0, "qa", "site.status", "site-1", "audit", "active", "suspended")])
    assert store.site_status() is SiteStatus.SUSPENDED
    store.write(
        [
            AuditEntry(T0 + 1, "qa", "site.status", "site-1", "closing", "suspended", "ceased"),
            AuditEntry(T0 + 2, "alice", "run.start", "run-0001", new="active"),
        ]
    )
    assert store.site_status() is SiteStatus.CEASED


# -- files: readers, migrations, refusals ------------------------------------------------------


def test_reader_sees_committed_batches_while_the_writer_is_open(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folder" / "pocd.db"
    with pytest.raises(StoreError, match="cannot open"):
        Store(path, readonly=True)  # a reader never creates the store
    with Store(path) as writer:
        writer.write(make_samples(100))
        with Store(path, readonly=True) as reader:
            assert reader.sample_count() == 100
            writer.write([make_run(), Sample("late-device", "co2", T0 + NS, 5.0)])
            assert reader.sample_count() == 101
            assert reader.active_run() == make_run()
            # a channel the reader has not seen yet is looked up afresh
            assert [s for _, s in reader.samples(device="late-device")] == [
                Sample("late-device", "co2", T0 + NS, 5.0)
            ]
            assert reader.last_sample_times()[("late-device", "co2")] == T0 + NS
            with pytest.raises(StoreError, match="read-only"):
                reader.write([Sample("x", "y", T0, 1.0)])
    with Store(path, readonly=True) as reader:  # after the writer closed and removed the WAL
        assert reader.sample_count() == 101


def test_a_new_store_is_created_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    raw(path).close()  # an empty (v0) SQLite file
    assert path.stat().st_size == 0
    with Store(path) as store:
        store.write(make_samples(10))
    db = raw(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_an_older_store_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    db = raw(path)
    assert schema.migrate(db, path, target=1) == 0
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO channels (id, device, point) VALUES (?, ?, ?)",
        [(1, "old-reactor", "temperature"), (2, "old-reactor", "ph")],
    )
    db.executemany(
        "INSERT INTO samples (ch, t, dt, v, q) VALUES (?, ?, NULL, ?, 0)",
        [(1 + i % 2, T0 + i, 36.0 + i) for i in range(5000)],
    )
    db.execute("COMMIT")
    db.close()
    with pytest.raises(StoreError, match="open it read-write once"):
        Store(path, readonly=True)

    with Store(path) as store:
        assert store.last_sample_times() == {
            ("old-reactor", "temperature"): T0 + 4998,
            ("old-reactor", "ph"): T0 + 4999,
        }
        window = store.samples(since=T0 + 4100, until=T0 + 4103)
        assert [(rowid, s.value) for rowid, s in window] == [
            (4101, 4136.0),
            (4102, 4137.0),
            (4103, 4138.0),
        ]
        store.write([Sample("old-reactor", "ph", T0 + 5000, 7.0)])
        assert store.sample_count() == 5001
    db = raw(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_store_from_a_newer_pocd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pocd.db"
    Store(path).close()
    db = raw(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 1} is newer"):
            Store(path, readonly=readonly)


def test_files_that_are_not_pocd_stores_are_refused_untouched(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, just some text\n" * 200)
    foreign = tmp_path / "foreign.db"
    db = raw(foreign)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    db.close()
    for path in (garbage, foreign):
        before = path.read_bytes()
        with pytest.raises(StoreError, match="not a pocd store"):
            Store(path)
        assert path.read_bytes() == before


# -- durability -------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from pocd.model import Sample
from pocd.store import Store

store = Store(Path(sys.argv[1]))
total = 0
while True:
    store.write([Sample("kill", f"p{i % 3}", total + i, float(i)) for i in range(3000)])
    total += 3000
    print(total, flush=True)
"""


def test_committed_batches_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "pocd.db"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        # enough batches that the WAL has been checkpointed into the file at least once
        lines = [child.stdout.readline() for _ in range(50)]
        assert all(lines), f"writer ended early: {child.stderr.read()}"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # lines printed before the kill landed: each one a batch that write() returned for
    printed = [int(line) for line in lines + child.stdout.read().split()]
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    with Store(path) as store:
        count = store.sample_count()
        assert printed[-1] <= count <= printed[-1] + 3000  # at most one batch unreported
        assert [s.value for _, s in store.samples(after_id=count - 3, limit=5)] == [
            2997.0,
            2998.0,
            2999.0,
        ]
    db = raw(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == count
    finally:
        db.close()


# -- what a sample's forwarded tags come from (schema v4) ---------------------------------------


def test_runs_and_phases_mark_the_first_sample_committed_after_them(store: Store) -> None:
    run = make_run()
    enrichment = PhaseChange(run.id, T0, "enrichment", None, "alice")
    # a late, device-stamped phase change: its time is before samples already committed
    late = PhaseChange(run.id, T0 + 2, "activation", "enrichment", "device:rotea")
    ended = replace(run, status=RunStatus.COMPLETED, ended=T0 + 9)
    store.write([Sample("d", "p", T0, 1.0), run, enrichment, *make_samples(3, start=T0 + 1)])
    store.write([late])  # no sample in this batch: it marks the next one committed
    store.write([Sample("d", "p", T0 + 8, 2.0), ended, Sample("d", "p", T0 + 10, 3.0)])
    store.write([ended])  # the same state again keeps the marks
    runs, phases = store.commit_marks()
    assert runs == [(ended, 2, 6)]
    assert phases == [(enrichment, 2), (late, 5)]
    with pytest.raises(sqlite3.IntegrityError, match="marks of a run are fixed"):
        store._db.execute("UPDATE runs SET end_sample = 99")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store._db.execute("UPDATE phases SET first_sample = 1")


def test_a_sample_keeps_the_parameter_its_point_fed_when_recorded(tmp_path: Path) -> None:
    path = tmp_path / "pocd.db"
    with Store(path, parameters={("incubator", "t"): "temperature"}) as store:
        store.write([Sample("incubator", "t", T0, 37.0), Sample("incubator", "rh", T0, 90.0)])
    # the config now maps the point to another parameter, then to none
    with Store(path, parameters={("incubator", "t"): "chamber-temperature"}) as store:
        store.write([Sample("incubator", "t", T0 + 1, 37.1)])
    with Store(path) as store:
        store.write([Sample("incubator", "t", T0 + 2, 37.2)])
    with Store(path, readonly=True) as reader:
        channels, _ = reader.sample_codes()
        by_rowid = [channels[key >> SAMPLE_KEY_BITS] for key, _, _ in reader.sample_rows(1, 4)]
        assert by_rowid == [
            ("incubator", "t", "temperature", ""),
            ("incubator", "rh", "", ""),
            ("incubator", "t", "chamber-temperature", ""),
            ("incubator", "t", "", ""),
        ]
        # one point, whatever it fed: its samples and its latest time
        assert [s.value for _, s in reader.samples(device="incubator", point="t")] == [
            37.0,
            37.1,
            37.2,
        ]
        assert reader.last_sample_times() == {("incubator", "t"): T0 + 2, ("incubator", "rh"): T0}


def test_a_v3_store_with_data_is_migrated_to_v4(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    db = raw(path)
    schema.migrate(db, path, target=3)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO channels (id, device, point) VALUES (?, ?, ?)",
        [(1, "rotea", "step"), (2, "incubator", "t")],
    )
    # 10,000 samples 1 ms apart, with a jump back in time at rowid 6001
    times = [T0 + i * 10**6 for i in range(6000)] + [T0 + i * 10**6 for i in range(4000)]
    db.executemany(
        "INSERT INTO samples (ch, t, dt, v, q) VALUES (?, ?, NULL, ?, 0)",
        [(1 + i % 2, t, float(i)) for i, t in enumerate(times)],
    )
    db.execute(
        "INSERT INTO sample_blocks (block, t_min, t_max) SELECT id >> ?, min(t), max(t) "
        "FROM samples GROUP BY id >> ?",
        (schema.BLOCK_BITS, schema.BLOCK_BITS),
    )
    db.execute("INSERT INTO channel_latest SELECT ch, max(id), t FROM samples GROUP BY ch")
    db.execute(
        "INSERT INTO runs VALUES ('r1', 'B-1', 's', 'UTC', 'P', '1', 'h', 'op', ?, "
        "'completed', ?, '')",
        (T0 + 1000 * 10**6, T0 + 5000 * 10**6),
    )
    db.execute(
        "INSERT INTO runs VALUES ('r2', 'B-2', 's', 'UTC', 'P', '1', 'h', 'op', ?, "
        "'running', NULL, '')",
        (T0 + 90_000 * 10**6,),  # after every sample
    )
    db.executemany(
        "INSERT INTO phases (run_id, t, phase, previous, actor, in_order, reason) "
        "VALUES (?, ?, ?, ?, 'op', 1, '')",
        [("r1", T0 + 1000 * 10**6, "a", None), ("r1", T0 + 2500 * 10**6 + 1, "b", "a")],
    )
    db.execute("INSERT INTO cursors VALUES ('influxdb', 'samples', 7000)")
    db.execute("COMMIT")
    db.close()

    with Store(path, parameters={("incubator", "t"): "temperature"}) as store:
        runs, phases = store.commit_marks()
        # marked by time: the first sample at or after each record's time
        assert [(r.id, first, end) for r, first, end in runs] == [
            ("r1", 1001, 5001),
            ("r2", 10_001, None),
        ]
        assert [(p.phase, first) for p, first in phases] == [("a", 1001), ("b", 2502)]
        # marking is not a change: the events are r1's start, its phases and end, r2's start
        assert store.event_count() == 5
        assert store.cursors("influxdb") == {"samples": 7000}
        assert store.sample_codes()[0] == {
            1: ("rotea", "step", "", ""),
            2: ("incubator", "t", "temperature", ""),
        }
        assert store.sample_count() == 10_000
        assert store.last_sample_times() == {
            ("rotea", "step"): T0 + 3998 * 10**6,
            ("incubator", "t"): T0 + 3999 * 10**6,
        }
        # new samples of the mapped point go on in the migrated channel
        store.write([Sample("incubator", "t", T0 + 10**10, 1.0), replace(runs[1][0])])
        assert store.sample_rows(10_001, 10_001)[0][0] >> SAMPLE_KEY_BITS == 2
        assert store.commit_marks()[0][1][1:] == (10_001, None)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            store._db.execute("UPDATE channels SET parameter = 'x'")
    db = raw(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_temp_schema")}
        assert "migration_parameters" not in tables
    finally:
        db.close()


def test_a_v6_store_gets_its_history_as_events(tmp_path: Path) -> None:
    path = tmp_path / "v6.db"
    db = raw(path)
    schema.migrate(db, path, target=6)
    db.execute("BEGIN")
    db.execute(
        "INSERT INTO runs VALUES ('r1', 'B-1', 's', 'UTC', 'P', '1', 'h', 'op', ?, "
        "'aborted', NULL, 'crashed', 1, NULL, 'L1')",
        (T0 + 10,),
    )
    db.execute(
        "INSERT INTO excursions VALUES ('e1', NULL, 'x', 'comm-loss', 'S', '1', 'standby', "
        "NULL, ?, ?, NULL, 0.5, 'L1')",
        (T0, T0 + 20),
    )
    db.execute(
        "INSERT INTO deviations VALUES ('d1', NULL, ?, 'data-loss', 'standby', 'lost', 'x', "
        "'e1', 'L1')",
        (T0 + 5,),
    )
    db.execute("COMMIT")
    db.close()
    with Store(path) as store:
        (run,) = store.runs()
        (exc,) = store.excursions()
        assert [event for _, event in store.events(0, 10)] == [
            ExcursionEvent(ExcursionChange.OPENED, exc, T0),
            store.deviations()[0],
            # a run that ended without an end time: its end is its last event, at its start
            replace(run, status=RunStatus.RUNNING, end_reason=""),
            run,
            ExcursionEvent(ExcursionChange.CLOSED, exc, T0 + 20),
        ]
        assert exc.run_id is None
        assert exc.line == run.line == "L1"
        assert store.event_count() == 5  # the backfill adds each event once
        assert store.commit_marks()[0] == [(run, 1, None)]


# -- lines (schema v6) ------------------------------------------------------------------------


def test_runs_on_several_lines_at_once(store: Store) -> None:
    first = replace(make_run("run-a", "B-A"), line="prodigy-1")
    second = replace(make_run("run-b", "B-B", T0 + NS), line="cocoon-2")
    done = replace(make_run("run-c", "B-C", T0 - NS), line="prodigy-1")
    store.write([done, first, second])
    store.write([replace(done, status=RunStatus.COMPLETED, ended=T0)])
    assert store.active_runs() == [first, second]  # every running run, in start order
    assert store.active_run() == second  # the latest started, until the daemon asks per line
    assert [r.line for r in store.runs()] == ["prodigy-1", "prodigy-1", "cocoon-2"]
    with pytest.raises(RecordRejected, match="line of a run is fixed"):
        store.write([replace(first, line="cocoon-2")])
    store.write([replace(first, status=RunStatus.ABORTED, ended=T0 + 2 * NS, end_reason="x")])
    assert store.active_runs() == [second]
    assert store.run("run-a") == replace(
        first, status=RunStatus.ABORTED, ended=T0 + 2 * NS, end_reason="x"
    )


def test_equipment_records_belong_to_their_line_and_no_run(store: Store) -> None:
    run = replace(make_run(), line="L1")
    of_run = make_excursion(line="L1")
    closed = make_excursion(id="eq-1", run_id=None, phase="standby", line="L1", end=T0 + 20 * NS)
    still_open = make_excursion(id="eq-2", run_id=None, phase="standby", line="L1")
    elsewhere = make_excursion(id="eq-3", run_id=None, phase="standby", line="L2")
    run_deviation = Deviation(
        "dev-1", run.id, T0, DeviationCause.ACTION_LIMIT, "expansion", "high", line="L1"
    )
    line_deviation = Deviation(
        "dev-2", None, T0 + 1, DeviationCause.DATA_LOSS, "standby", "comm lost", line="L1"
    )
    other_deviation = replace(line_deviation, id="dev-3", line="L2")
    store.write(
        [run]
        + [
            ExcursionEvent(ExcursionChange.OPENED, e, e.start)
            for e in (of_run, replace(closed, end=None), still_open, elsewhere)
        ]
        + [ExcursionEvent(ExcursionChange.CLOSED, closed, closed.end)]
        + [run_deviation, line_deviation, other_deviation]
    )
    assert store.line_excursions("L1") == [closed, still_open]
    assert store.line_excursions("L1", open_only=True) == [still_open]
    assert store.line_excursions("L2") == [elsewhere]
    assert store.line_excursions("L3") == []
    assert store.excursions(run.id) == [of_run]  # a run's own only
    assert store.open_excursions(run.id) == [of_run]
    assert store.line_deviations("L1") == [line_deviation]
    assert store.line_deviations("L2") == [other_deviation]
    assert store.deviations(run.id) == [run_deviation]
    assert [e.id for e in store.excursions()] == ["exc-1", "eq-1", "eq-2", "eq-3"]
    with pytest.raises(RecordRejected, match="fixed"):  # an equipment excursion stays the line's
        store.write([ExcursionEvent(ExcursionChange.UPDATED, replace(still_open, run_id=run.id))])
    with pytest.raises(RecordRejected, match="fixed"):
        store.write([ExcursionEvent(ExcursionChange.UPDATED, replace(still_open, line="L2"))])


def test_a_sample_keeps_the_line_its_point_belonged_to_alone(tmp_path: Path) -> None:
    path = tmp_path / "pocd.db"
    lines = {("incubator", "t"): "L1", ("rotea", "step"): "L2"}
    with Store(path, parameters={("incubator", "t"): "temperature"}, lines=lines) as store:
        store.write([Sample("incubator", "t", T0, 37.0), Sample("rotea", "step", T0, 1.0)])
    # the incubator is shared by both lines now: its samples belong to no line alone
    with Store(path, parameters={("incubator", "t"): "temperature"}, lines={}) as store:
        store.write([Sample("incubator", "t", T0 + 1, 37.1), Sample("rotea", "step", T0 + 1, 2.0)])
    with Store(path, lines=lines) as store:
        store.write([Sample("incubator", "t", T0 + 2, 37.2)])
    with Store(path, readonly=True) as reader:
        channels, _ = reader.sample_codes()
        by_rowid = [channels[key >> SAMPLE_KEY_BITS] for key, _, _ in reader.sample_rows(1, 5)]
        assert by_rowid == [
            ("incubator", "t", "temperature", "L1"),
            ("rotea", "step", "", "L2"),
            ("incubator", "t", "temperature", ""),
            ("rotea", "step", "", ""),
            ("incubator", "t", "", "L1"),
        ]
        # one point, whatever line it belonged to
        assert [s.value for _, s in reader.samples(device="incubator")] == [37.0, 37.1, 37.2]
        assert reader.last_sample_times()[("incubator", "t")] == T0 + 2


def test_a_v5_store_is_migrated_to_v6(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    db = raw(path)
    schema.migrate(db, path, target=5)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO channels (id, device, point, parameter) VALUES (?, ?, ?, ?)",
        [(1, "incubator", "t", "temperature"), (2, "rotea", "step", "")],
    )
    db.executemany(
        "INSERT INTO samples (ch, t, dt, v, q) VALUES (?, ?, NULL, ?, 0)",
        [(1, T0, 37.0), (2, T0 + 1, 1.0)],
    )
    db.execute(
        "INSERT INTO runs VALUES ('r1', 'B-1', 's', 'UTC', 'P', '1', 'h', 'op', ?, "
        "'running', NULL, '', 1, NULL)",
        (T0,),
    )
    db.execute(
        "INSERT INTO excursions VALUES ('e1', 'r1', 'temperature', 'alert-high', 'P', '1', "
        "'a', 37.5, ?, NULL, 38.0, 0.5)",
        (T0,),
    )
    db.execute(
        "INSERT INTO deviations VALUES ('d1', 'r1', ?, 'action-limit', 'a', 'high', "
        "'temperature', 'e1')",
        (T0,),
    )
    db.execute("COMMIT")
    db.close()
    with Store(path, lines={("incubator", "t"): "L1"}) as store:
        (run,) = store.active_runs()
        assert run.line == "main"  # the one implicit line of the config that wrote them
        assert [(e.id, e.run_id, e.line) for e in store.excursions()] == [("e1", "r1", "main")]
        assert [(d.id, d.run_id, d.line) for d in store.deviations()] == [("d1", "r1", "main")]
        assert store.line_excursions("main") == store.line_deviations("main") == []
        assert store.sample_codes()[0] == {
            1: ("incubator", "t", "temperature", "L1"),
            2: ("rotea", "step", "", ""),
        }
        # equipment records can be stored now: run_id may be NULL
        store.write([Deviation("d2", None, T0 + 2, DeviationCause.DATA_LOSS, "standby", "lost")])
        assert [d.id for d in store.line_deviations("main")] == ["d2"]
    db = raw(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_temp_schema")}
        assert "migration_lines" not in tables
    finally:
        db.close()


def test_a_runs_json_holds_its_line_and_only_its_own_records(store: Store) -> None:
    """The JSON views (pocd.records, from the record descriptions) of what the store holds."""
    run = replace(make_run(), line="L1")
    other = replace(make_run("run-0002", "B-002"), line="L2")
    closed = make_excursion(line="L1", end=T0 + 70 * NS, worst=38.5)
    store.write(
        [
            run,
            other,
            PhaseChange(run.id, T0, "expansion", None, "alice"),
            ExcursionEvent(ExcursionChange.CLOSED, closed, closed.end),
            ExcursionEvent(
                ExcursionChange.OPENED, make_excursion(id="exc-2", run_id=other.id, line="L2")
            ),
            ExcursionEvent(
                ExcursionChange.OPENED, make_excursion(id="exc-3", run_id=None, line="L1")
            ),
            Deviation(
                "dev-1", run.id, T0, DeviationCause.ACTION_LIMIT, "expansion", "hi", line="L1"
            ),
            Deviation("dev-2", None, T0, DeviationCause.DATA_LOSS, "standby", "lost", line="L1"),
        ]
    )
    detail = json.loads(json_bytes(run_detail(store, run)))
    assert detail["id"] == run.id
    assert detail["line"] == "L1"
    assert (detail["started"], detail["started_ns"]) == ("2026-01-01T00:00:00.000Z", T0)
    assert (detail["ended"], detail["ended_ns"], detail["status"]) == (None, None, "running")
    assert [p["phase"] for p in detail["phases"]] == ["expansion"]
    (excursion,) = detail["excursions"]  # not the other run's, not the line's equipment's
    assert excursion == {
        "id": "exc-1",
        "parameter": "temperature",
        "kind": "action-high",
        "phase": "expansion",
        "protocol_id": "CART-TCT",
        "protocol_version": "3.1",
        "limit": 38.0,
        "start": "2026-01-01T00:00:10.000Z",
        "start_ns": T0 + 10 * NS,
        "end": "2026-01-01T00:01:10.000Z",
        "end_ns": T0 + 70 * NS,
        "duration_s": 60.0,
        "worst": 38.5,
        "integral": 0.0,
        "run_id": run.id,
        "line": "L1",
    }
    (deviation,) = detail["deviations"]
    assert (deviation["id"], deviation["run_id"], deviation["line"]) == ("dev-1", run.id, "L1")
    assert (deviation["t"], deviation["t_ns"]) == ("2026-01-01T00:00:00.000Z", T0)
    assert json.loads(json_bytes(run_summary(other)))["line"] == "L2"
