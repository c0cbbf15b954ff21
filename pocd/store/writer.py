"""The store writer: what the daemon takes in waits here, in order, until it is committed.

Records are committed in batches of at most `batch_size` entries per transaction, every
flush interval and whenever an operation asks (`flush`). A group of records that belong
together (a run's start: the run, its first phase and its audit entry) is one entry, never
split across transactions. The queue is bounded by a high-water mark: once it is reached,
`room` is cleared and the daemon stops taking from the inbox until the store has caught up
(to half of it), so the runners wait on the inbox. That is back-pressure at every hop, and
nothing is dropped.

A batch the store refuses because of what one record holds (`RecordRejected`) is halved until
that record is found: it is set aside as an incident holding it, and the rest is committed. A
batch the store fails on (a full disk, an I/O error) stays at the head of the queue and is
tried again with backoff; whatever of it was already committed is not written twice.

Every commit is announced (`commits`): in-process forwarders wait on it for new records
instead of polling the store. A change of what each point feeds (`remap`, a reloaded config)
takes its place in the queue: the samples before it are stored as they were taken.

Must not: drop, reorder or interpret a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, cast

import structlog

from pocd.errors import CommitTimeout, RecordRejected, StoreError
from pocd.model import Incident, IncidentKind, now_ns
from pocd.store import Record, Store

__all__ = ["Commits", "StoreWriter"]

log = structlog.get_logger("pocd.store.writer")

# Attempts of the last flush, at shutdown, before what is left is given up (and said so).
_FINAL_ATTEMPTS: Final = 5
_MOST_BACKOFF_S: Final = 5.0


class Commits:
    """The writer's word that it committed: `count` grows by one with every commit and `at`
    says when the last one was (wall time, ns). A forwarder takes `count`, reads the store,
    and when it found nothing new waits with `after(count)`, which returns at the next commit
    (or at the timeout: what another process wrote is found then)."""

    def __init__(self) -> None:
        self.count = 0
        self.at: int | None = None
        self._next = asyncio.Event()

    def note(self) -> None:
        self.count += 1
        self.at = now_ns()
        self._next.set()
        self._next = asyncio.Event()

    async def after(self, count: int, longest: float) -> None:
        """Return once a commit after `count` happened, or after `longest` seconds."""
        if self.count > count:
            return
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation
        # that comes as the commit does (it returns the wait's result), and a sink being
        # stopped then went on waiting, holding the daemon's shutdown up.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(longest):
                await self._next.wait()


def _said_if_failed(task: asyncio.Task[None]) -> None:
    """A commit no one awaits must not fail unheard (the store's own failures it retries)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("store commit failed", error=repr(task.exception()))


@dataclass(frozen=True, slots=True)
class _Group:
    """Records committed in one transaction or not at all."""

    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class _Remap:
    """From here in the queue on, what each (device, point) feeds (see Store.remap)."""

    parameters: Mapping[tuple[str, str], str]
    lines: Mapping[tuple[str, str], str]


_Entry: TypeAlias = Record | _Group  # what a batch holds


class _Unwritten(Exception):
    """The store failed: `rest` are the entries of a batch not yet written, in order."""

    def __init__(self, rest: list[_Entry], cause: StoreError) -> None:
        super().__init__(str(cause))
        self.rest = rest
        self.cause = cause


class StoreWriter:
    """Queues records and commits them to `store` (set once it is open)."""

    def __init__(
        self,
        *,
        batch_size: int,
        high_water: int,
        on_incident: Callable[[Incident], None],
    ) -> None:
        self.store: Store | None = None
        self.batch_size = batch_size
        self.high_water = high_water
        self._queue: deque[_Entry | _Remap] = deque()
        self.add: Callable[[Record], None] = self._queue.append  # one record, the hot path
        self._groups = 0  # group entries in the queue
        self._grouped = 0  # records inside them beyond one each, for `len`
        self._remaps = 0  # remap entries in the queue (no records)
        self.room = asyncio.Event()  # set while the queue is below the high-water mark
        self.room.set()
        self._lock = asyncio.Lock()
        self._commits: set[asyncio.Task[None]] = set()  # referenced while they run
        self._on_incident = on_incident
        self.quarantined = 0  # records the store refused, set aside as incidents
        self.failing: str | None = None  # the store's error while writes fail
        self.stopping = False  # the last flush gives up after a few attempts
        self.commits = Commits()
        self._hurried: asyncio.Task[None] | None = None  # see `hurry`
        self._again = False
        self.beat = time.monotonic()  # its last progress: a commit, or a flush with none due

    def __len__(self) -> int:
        """Records waiting to be committed."""
        return len(self._queue) + self._grouped - self._remaps

    @property
    def idle(self) -> bool:
        """Nothing queued and no commit under way."""
        return not self._queue and not self._lock.locked()

    def add_group(self, records: Sequence[Record]) -> None:
        """Queue records that must be committed together, in one transaction."""
        self._queue.append(_Group(tuple(records)))
        self._groups += 1
        self._grouped += len(records) - 1

    def remap(
        self, parameters: Mapping[tuple[str, str], str], lines: Mapping[tuple[str, str], str]
    ) -> None:
        """Samples queued from now on feed these parameters and lines (Store.remap)."""
        self._queue.append(_Remap(dict(parameters), dict(lines)))
        self._remaps += 1

    def note_room(self) -> None:
        """Clear `room` at the high-water mark and set it again at half of it; each change is
        an incident, so that a store that does not keep up is on the record."""
        waiting = len(self)
        if self.room.is_set() and waiting >= self.high_water:
            self.room.clear()
            log.error("store not keeping up; taking no more readings", waiting=waiting)
            self._incident(
                "store-backlog",
                f"store not keeping up: {waiting} records wait to be committed (high-water "
                f"mark {self.high_water}); readings are held back in the devices' queues "
                f"until it catches up{f' ({self.failing})' if self.failing else ''}",
            )
        elif not self.room.is_set() and waiting <= self.high_water // 2:
            self.room.set()
            log.info("store caught up", waiting=waiting)
            self._incident(
                "store-caught-up", f"store caught up: {waiting} records wait to be committed"
            )

    async def run(self, interval: float) -> None:
        """Flush every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.flush()
            self.beat = time.monotonic()

    def hurry(self) -> None:
        """Commit what is queued now, without waiting for the flush interval: an alarm is due
        to reach a person. Does not wait. While such a commit runs, another is asked for
        once more at most: a flood of alarms costs a commit at a time, not one per alarm."""
        if self._hurried is not None and not self._hurried.done():
            self._again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in the daemon's loop (a test driving the lines alone)
            return
        self._hurried = loop.create_task(self._hurry(), name="store-hurry")
        self._hurried.add_done_callback(_said_if_failed)

    async def _hurry(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            await self._flush()

    async def flush(self, *, within: float | None = None) -> None:
        """Commit every record queued so far. CommitTimeout if that takes longer than
        `within` seconds: the records stay queued and are committed when the store answers.

        Cancelling the caller does not cancel the commit: a batch in a thread's hands would be
        lost. The commit runs in its own task, and the next flush waits for it (the lock)."""
        commit = asyncio.create_task(self._flush(), name="store-flush")
        self._commits.add(commit)
        commit.add_done_callback(self._commits.discard)
        try:
            async with asyncio.timeout(within):  # not wait_for: see Commits.after
                await asyncio.shield(commit)
        except TimeoutError:
            why = self.failing or "it is busy"
            raise CommitTimeout(
                f"not committed within {within:g} s ({why}); it waits with {len(self)} "
                "other records and is committed when the store answers"
            ) from None

    async def _flush(self) -> None:
        async with self._lock:
            # Only what is queued now: what arrives meanwhile waits for the next flush, so a
            # busy daemon commits full batches instead of one fsync per few records.
            due = len(self._queue)
            failures = 0
            while due > 0 and self.store is not None:
                if self._remaps and type(self._queue[0]) is _Remap:
                    remap = self._queue.popleft()
                    assert isinstance(remap, _Remap)
                    self._remaps -= 1
                    due -= 1
                    self.store.remap(remap.parameters, remap.lines)
                    continue
                batch = self._take(min(due, self.batch_size))
                try:
                    await self._write(batch)
                except _Unwritten as exc:
                    due -= len(batch) - len(exc.rest)
                    self._put_back(exc.rest)
                    failures += 1
                    self.failing = str(exc.cause)
                    if failures == 1:
                        log.error("store write failed; keeping the records", error=str(exc))
                    if self.stopping and failures >= _FINAL_ATTEMPTS:
                        log.critical(
                            "store still failing at shutdown; records not committed",
                            records=len(self),
                            error=str(exc),
                        )
                        return
                    await asyncio.sleep(min(0.1 * 2**failures, _MOST_BACKOFF_S))
                else:
                    due -= len(batch)
                    self.commits.note()
                    self.beat = time.monotonic()
                    if failures:
                        log.info("store write recovered", attempts=failures + 1)
                    failures = 0
                    self.failing = None
                self.note_room()

    def _take(self, count: int) -> list[_Entry]:
        """Up to `count` entries from the head, up to the next remap (not taken)."""
        if self._remaps:
            head = itertools.islice(self._queue, count)
            count = next((i for i, e in enumerate(head) if type(e) is _Remap), count)
        popleft = self._queue.popleft
        batch = cast(list[_Entry], [popleft() for _ in range(count)])
        if self._groups:
            for entry in batch:
                if type(entry) is _Group:
                    self._groups -= 1
                    self._grouped -= len(entry.records) - 1
        return batch

    def _put_back(self, entries: list[_Entry]) -> None:
        self._queue.extendleft(reversed(entries))
        for entry in entries:
            if type(entry) is _Group:
                self._groups += 1
                self._grouped += len(entry.records) - 1

    @property
    def last_commit(self) -> int | None:
        """Wall time of the last commit (ns), None before the first."""
        return self.commits.at

    async def _write(self, batch: list[_Entry]) -> None:
        """Commit the batch, setting aside each record the store refuses. _Unwritten if the
        store fails; what it holds was not written."""
        assert self.store is not None
        try:
            await asyncio.to_thread(self.store.write, _records(batch))
        except RecordRejected as exc:
            rejected = exc
        except StoreError as exc:
            raise _Unwritten(batch, exc) from None
        except Exception as exc:  # the store says any fault of its own is a StoreError
            fault = StoreError(f"the store failed: {type(exc).__name__}: {exc}")
            raise _Unwritten(batch, fault) from None
        else:
            return
        if len(batch) > 1:
            half = len(batch) // 2
            parts: list[list[_Entry]] = [batch[:half], batch[half:]]
        elif isinstance(batch[0], _Group) and len(batch[0].records) > 1:
            # A group the store refuses is kept record by record: apart, but kept.
            parts = [[record] for record in batch[0].records]
        else:
            (entry,) = batch
            record = entry.records[0] if isinstance(entry, _Group) else entry
            await self._set_aside(record, rejected)
            return
        for i, part in enumerate(parts):
            try:
                await self._write(part)
            except _Unwritten as exc:
                rest = [entry for later in parts[i + 1 :] for entry in later]
                raise _Unwritten(exc.rest + rest, exc.cause) from None

    async def _set_aside(self, record: Record, why: RecordRejected) -> None:
        assert self.store is not None
        log.error("record refused by the store; set aside", record=repr(record), error=str(why))
        cause = why.__cause__ or why
        incident = Incident(
            now_ns(),
            IncidentKind.SOFTWARE,
            "record-rejected",
            "store",
            f"{type(record).__name__} refused by the store ({type(cause).__name__}: {cause}); "
            f"kept here: {record!r}",
        )
        try:
            try:
                await asyncio.to_thread(self.store.write, [incident])
            except RecordRejected:
                # Its text cannot be stored either (it cannot be a store fault: that would be a
                # plain StoreError): keep what can be, the type and the error; the log has it.
                incident = Incident(
                    incident.t,
                    incident.kind,
                    incident.code,
                    "store",
                    f"{type(record).__name__} refused by the store ({type(cause).__name__}); "
                    "its content could not be stored either and is in the log",
                )
                await asyncio.to_thread(self.store.write, [incident])
        except RecordRejected:
            log.critical(
                "record could not be set aside; it is only in the log", record=repr(record)
            )
        except StoreError as exc:
            raise _Unwritten([record], exc) from None
        self.quarantined += 1
        self._on_incident(incident)

    def _incident(self, code: str, message: str) -> None:
        incident = Incident(now_ns(), IncidentKind.SOFTWARE, code, "store", message)
        self.add(incident)
        self._on_incident(incident)


def _records(batch: list[_Entry]) -> list[Record]:
    if not any(type(entry) is _Group for entry in batch):
        return batch  # type: ignore[return-value]  # no groups: the entries are the records
    records: list[Record] = []
    for entry in batch:
        if isinstance(entry, _Group):
            records += entry.records
        else:
            records.append(entry)
    return records
