"""The store writer against a real store: order, groups, records set aside, back-pressure."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pocd.errors import CommitTimeout
from pocd.model import (
    NS,
    AuditEntry,
    Deviation,
    DeviationCause,
    Incident,
    PhaseChange,
    Run,
    Sample,
)
from pocd.store import Store
from pocd.store.writer import Commits, StoreWriter

T0 = 1_767_225_600 * NS


def samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample("dev", "p", T0 + (start + i) * NS, float(start + i)) for i in range(n)]


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[StoreWriter]:
    seen: list[Incident] = []
    writer = StoreWriter(batch_size=1000, high_water=100, on_incident=seen.append)
    writer.store = Store(tmp_path / "pocd.sqlite")
    try:
        yield writer
    finally:
        writer.store.close()


async def test_a_record_the_store_rejects_is_set_aside_and_the_rest_is_kept(
    writer: StoreWriter,
) -> None:
    assert writer.store is not None
    deviation = Deviation("d1", "R", T0, DeviationCause.PHASE_ORDER, "a", "first")
    writer.add(deviation)
    await writer.flush()
    # the same deviation id again violates the store's key; a device time beyond int64 cannot
    # be stored at all: only those two are refused
    for record in [*samples(5), deviation, Sample("dev", "p", T0, 1.0, device_t=2**64)]:
        writer.add(record)
    for record in samples(5, 5):
        writer.add(record)
    await writer.flush()
    assert writer.store.sample_count() == 10
    codes = [i.code for i in writer.store.incidents()]
    assert codes == ["record-rejected", "record-rejected"]
    assert writer.quarantined == 2
    refused = writer.store.incidents()[1].message
    assert "Sample refused by the store (OverflowError" in refused
    assert "device_t=18446744073709551616" in refused  # the record is kept in the incident


async def test_what_a_failing_store_committed_is_not_written_twice(tmp_path: Path) -> None:
    """A batch halved around a refused record, then the store fails: the halves already
    committed are not put back (the append-only tables would hold them twice)."""
    path = tmp_path / "pocd.sqlite"
    writer = StoreWriter(batch_size=1000, high_water=10_000, on_incident=lambda _: None)
    writer.store = Store(path)
    store = writer.store
    bad = Sample("dev", "p", T0, 1.0, device_t=2**64)
    batch = [*samples(8), bad, *samples(7, 8)]
    original = store.write
    calls = 0

    def fail_once_after_halving(records: list[object]) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:  # [whole] refused, [first half] ok, [second half] refused -> fail
            raise_disk_full()
        original(records)  # type: ignore[arg-type]

    def raise_disk_full() -> None:
        from pocd.errors import StoreError

        raise StoreError("disk I/O error (a fault made by the test)")

    store.write = fail_once_after_halving  # type: ignore[method-assign]
    try:
        for record in batch:
            writer.add(record)
        await writer.flush()
        assert store.sample_count() == 15
        assert [s.value for _, s in store.samples()] == [float(i) for i in range(15)]
        assert [i.code for i in store.incidents()] == ["record-rejected"]
    finally:
        store.close()


async def test_a_group_is_committed_in_one_transaction(writer: StoreWriter) -> None:
    assert writer.store is not None
    run = Run("R1", "B1", "S", "UTC", "P", "1", "0" * 64, "op", T0)
    first = PhaseChange("R1", T0, "a", None, "op")
    audit = AuditEntry(T0, "op", "run.start", "R1")
    writer.batch_size = 2  # entries: the group of three is one
    for record in samples(1):
        writer.add(record)
    writer.add_group([run, first, audit])
    assert len(writer) == 4
    for record in samples(1, 1):
        writer.add(record)
    await writer.flush()
    assert writer.store.runs() == [run]
    assert writer.store.phases("R1") == [first]
    assert len(writer) == 0


@pytest.fixture
async def held_worker() -> AsyncIterator[threading.Event]:
    """The loop's one worker thread, held until the event is set (a store thread stuck on a
    dead disk): a commit's job waits behind it."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    gate = threading.Event()
    busy = loop.run_in_executor(None, gate.wait)
    try:
        yield gate
    finally:
        gate.set()
        await busy


async def test_a_control_call_waits_for_its_commit_a_bounded_time(
    writer: StoreWriter, held_worker: threading.Event
) -> None:
    assert writer.store is not None
    writer.add_group(samples(3))
    with pytest.raises(CommitTimeout, match=r"not committed within 0\.3 s"):
        await writer.flush(within=0.3)
    held_worker.set()
    await writer.flush()  # waits for the commit that went on
    assert writer.store.sample_count() == 3


async def test_a_cancelled_flush_still_commits_its_batch(
    writer: StoreWriter, held_worker: threading.Event
) -> None:
    """A flush hands its batch to a thread; cancelling the flush (the writer task at shutdown,
    an API request that goes away) must not cancel a thread job that has not started yet."""
    assert writer.store is not None
    for record in samples(10):
        writer.add(record)
    flush = asyncio.create_task(writer.flush())
    await asyncio.sleep(0.05)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    held_worker.set()
    await writer.flush()  # waits for the commit the cancelled flush began
    assert writer.store.sample_count() == 10


async def test_the_high_water_mark_holds_readings_back_and_is_on_the_record(
    writer: StoreWriter,
) -> None:
    assert writer.store is not None
    for record in samples(120):
        writer.add(record)
    writer.note_room()
    assert not writer.room.is_set()
    await writer.flush()
    assert writer.room.is_set()
    await writer.flush()  # the incident that says so
    incidents = writer.store.incidents()
    assert [i.code for i in incidents] == ["store-backlog", "store-caught-up"]
    assert "store not keeping up" in incidents[0].message
    assert writer.store.sample_count() == 120


async def test_a_store_fault_of_any_type_keeps_the_batch(writer: StoreWriter) -> None:
    assert writer.store is not None
    store, write = writer.store, writer.store.write
    calls = 0

    def out_of_memory_once(records: list[object]) -> None:  # fault injection
        nonlocal calls
        calls += 1
        if calls == 1:
            raise MemoryError
        write(records)  # type: ignore[arg-type]

    store.write = out_of_memory_once  # type: ignore[method-assign]
    for record in samples(10):
        writer.add(record)
    await writer.flush()
    assert store.sample_count() == 10


async def test_a_wait_for_a_commit_that_is_cancelled_as_the_commit_comes_ends_cancelled() -> None:
    """A sink stopped at the moment the writer commits must stop: on Python 3.11, wait_for
    returned the commit instead, and the sink went on waiting (a daemon's shutdown hung 20 s
    in the suite under load)."""
    commits = Commits()
    waiting = asyncio.create_task(commits.after(0, 30))
    await asyncio.sleep(0)  # it waits for the next commit
    commits.note()
    waiting.cancel()  # in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 1)


async def test_hurry_commits_at_once_and_a_burst_costs_few_commits(writer: StoreWriter) -> None:
    """An alarm is committed without waiting for the flush interval (no flush loop runs
    here); hurrying while a commit is under way asks for one more, not one per call."""
    writer.add(samples(1)[0])
    writer.hurry()
    await writer.commits.after(0, 5)
    assert (writer.commits.count, len(writer)) == (1, 0)
    for s in samples(50, start=1):
        writer.add(s)
        writer.hurry()
    while len(writer):
        await writer.commits.after(writer.commits.count, 5)
    assert 2 <= writer.commits.count <= 3
    assert writer.store is not None and writer.store.sample_count() == 51


async def test_a_remap_applies_to_the_samples_queued_after_it(writer: StoreWriter) -> None:
    assert writer.store is not None
    for record in samples(3):
        writer.add(record)
    writer.remap({("dev", "p"): "temperature"}, {("dev", "p"): "line-b"})
    for record in samples(2, 3):
        writer.add(record)
    assert len(writer) == 5
    await writer.flush()  # one flush: the samples before the remap as they were taken
    channels, _ = writer.store.sample_codes()
    rows = writer.store.sample_rows(1, 5)
    assert [channels[key >> 32][2:] for key, _, _ in rows] == [("", "")] * 3 + [
        ("temperature", "line-b")
    ] * 2
    assert len(writer) == 0 and writer.idle
