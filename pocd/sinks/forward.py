"""The cursor forwarder: a store's streams delivered to one far side, nothing lost, nothing doubled.

Some 750 lines: the interface a sink kind supplies (about 250) and the forwarder. The
forwarder is one class on purpose: the lanes, the in-flight pipeline, the bisection, the
backoff and the cursor commits all act on one set of positions, and the invariants that keep
a cursor from passing an unconfirmed unit hold only while one object owns them.

What lives here knows nothing of any far side's protocol. A sink kind (pocd.sinks.influxdb;
later email, webhooks, MQTT) supplies, for one configured sink:
- an `Encoder` per stream it takes: store rows of that stream -> the far side's units (InfluxDB:
  lines of line protocol). A unit is one line of text: quarantined units are stored joined
  by newlines. A kind may take both streams or one (notifiers take only `Stream.EVENTS`);
- a `Writer`: a payload -> a `WriteResult` saying ok, rejected (for what the payload holds) or
  failed (the far side is down or busy, with an optional retry-after); and `body`, which makes
  the payload of a list of units;
- a `FarSide`: how messages, incident codes and status name it.

`Forwarder` forwards each stream by its own cursors in the store. A cursor moves only after
the writer said ok. Samples travel in one lane while it keeps up; once their backlog exceeds a
few batches (an outage, a new sink on an old store) it is split at the head: a live lane sends
new samples as they come while a backfill lane sends the backlog oldest first, both in rowid
order. The sample cursors are `samples` (all up to it confirmed), `samples.split` (end of the
backfill range) and `samples.live` (confirmed on the live lane); all three are equal when there
is no backfill. Events go in one lane, cursor `events`, ahead of samples.

A rejected batch is first weighed against its neighbours: single units of the same stream
written alone, those outside it first (the newest one, the one just before it), then its own
last, first and middle ones. If the far side takes none of them, it refuses the stream, not
these units (a proxy that refuses gzip, a field-type conflict): the batch counts as a failure
and is retried with backoff like an outage, a circuit breaker that quarantines nothing. If it
takes one, the batch is bisected down to the units refused on their own, or to a request the
far side dropped whole (`WriteResult.dropped`); each is quarantined as an incident holding its
units, stored in the transaction that moves the cursor past it. Any other failure keeps the
batch and retries it with jittered exponential backoff; what was in flight behind it is sent
again, which the far side must take as the same data (InfluxDB overwrites identical points).

Must not: write to the store anything but its cursors and incidents; raise for a fault of the
far side (that is a state, in `status()` and in incidents); show a secret in a message.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from pocd.model import NS, Incident, IncidentKind, now_ns
from pocd.sinks import SinkError
from pocd.store import Store
from pocd.store.writer import Commits

if TYPE_CHECKING:
    from pocd.settings import Site

__all__ = [
    "QUARANTINE_CURSOR",
    "Encoder",
    "FarSide",
    "ForwardSettings",
    "Forwarder",
    "Outcome",
    "Stream",
    "Units",
    "WriteResult",
    "Writer",
    "redact",
    "refused_alone",
]

log = structlog.get_logger("pocd.sinks.forward")

# Split off a backfill lane when the sample backlog exceeds this many batches.
_SPLIT_BATCHES: Final = 4
_FIRST_BACKOFF_S: Final = 0.5
# How often the size of the quarantine is read again from the store, where `pocd sink resend`
# (another process, perhaps) may have emptied it.
_QUARANTINE_REFRESH_S: Final = 1.0
# The cursor `pocd sink resend` advances: quarantine incidents up to it were sent again.
QUARANTINE_CURSOR: Final = "quarantine"


# --- what a sink kind supplies ----------------------------------------------------------------


class Stream(StrEnum):
    """A stream of the store, read by a rowid-like cursor."""

    SAMPLES = "samples"  # by sample rowid; one unit per sample; lanes (live + backfill)
    EVENTS = "events"  # runs, phases, excursions, deviations; one lane


class Outcome(StrEnum):
    OK = "ok"
    REJECTED = "rejected"  # for what the payload holds: bisect it, quarantine what is refused
    FAILED = "failed"  # the far side is down, busy or refuses everything: retry after backoff


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The far side's answer to one write."""

    outcome: Outcome
    error: str = ""  # its words for messages, with its status ("HTTP 400: unable to parse")
    retry_after: float | None = None  # seconds it asked to wait, if it said
    dropped: int | None = None  # of a rejection: how many units it says it dropped whole
    answered: bool = True  # False: no answer at all (refused, reset, timeout)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def rejected(self) -> bool:
        return self.outcome is Outcome.REJECTED

    def describe(self) -> str:
        return self.error


class Writer(Protocol):
    """One write path to the far side. `write` never raises for a far-side fault: it answers."""

    async def write(self, body: bytes) -> WriteResult:
        """Send one payload (made by the kind's `body` from a list of units)."""
        ...

    async def healthcheck(self) -> str:
        """Exercise the real path once: what answered, or SinkError saying why it did not."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Units:
    """What an encoder made of the positions from `first` to `last` of its stream."""

    last: int  # the last position covered (an encoder may cover fewer than it was asked)
    lines: list[str]  # the units, one line of text each
    refs: list[str] = field(default_factory=list)  # per unit, what it is, for messages;
    # empty: unit i is position first + i (samples)


class Encoder(Protocol):
    """Reads one stream of the store and encodes it into the far side's units. Called in a
    worker thread, never concurrently."""

    stream: Stream

    def start(self, store: Store) -> None:
        """A session begins (or begins again): read what encoding needs (codes, timelines)."""
        ...

    def head(self, store: Store) -> int:
        """The newest position of the stream in the store, 0 if none."""
        ...

    def encode(self, store: Store, first: int, last: int) -> Units | None:
        """Units for the positions from `first` up to at most `last`, None if there are none.
        For `Stream.SAMPLES` it must cover exactly first..last, one unit per position."""
        ...


class ForwardSettings(Protocol):
    """What the forwarder reads of a sink's settings (InfluxSettings has these)."""

    @property
    def batch_size(self) -> int: ...  # units per request

    @property
    def flush_interval(self) -> float: ...  # longest wait to fill a batch, s

    @property
    def backoff_max(self) -> float: ...  # longest pause between retries, s

    @property
    def commit_interval(self) -> float: ...  # confirmed positions are stored this often, s

    @property
    def in_flight(self) -> int: ...  # requests on the wire at once

    @property
    def probe_neighbours(self) -> bool: ...  # weigh a rejected batch against its neighbours


@dataclass(frozen=True, slots=True)
class FarSide:
    """How messages, incidents and status name the far side of one sink."""

    kind: str  # the sink kind, as in the config: "influxdb"
    title: str  # for messages: "InfluxDB"
    code: str  # the prefix of incident codes: "influx" -> influx-unreachable, influx-rejected
    where: str  # where the data goes, no secret in it
    unit: str = "point"  # what one unit is called in messages

    @property
    def quarantine(self) -> str:
        """The incident code of quarantined units (their lines in the incident's raw bytes)."""
        return f"{self.code}-rejected"


def redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret value replaced: a last guard, as no message is built from one."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


async def refused_alone(
    writer: Writer,
    lines: Sequence[str],
    body: Callable[[Sequence[str]], bytes],
    result: WriteResult,
    span: range | None = None,
) -> list[tuple[range, WriteResult]] | WriteResult:
    """The stretches of `lines` (indices, with the refusal) that the far side refuses on their
    own, found by bisecting a request it refused with `result`; or the answer that showed
    the far side failing. Lines accepted on the way are written again, harmlessly.

    A request the far side says it dropped whole (`dropped` = the number of lines: points
    beyond InfluxDB's retention policy, say) is one refusal: bisecting it would cost a request
    per line and change nothing.
    """
    span = range(len(lines)) if span is None else span
    if len(span) == 1 or result.dropped == len(span):
        return [(span, result)]
    refused: list[tuple[range, WriteResult]] = []
    middle = len(span) // 2
    for half in (span[:middle], span[middle:]):
        answer = await writer.write(body([lines[i] for i in half]))
        if answer.ok:
            continue
        if not answer.rejected:
            return answer
        found = await refused_alone(writer, lines, body, answer, half)
        if isinstance(found, WriteResult):
            return found
        refused += found
    return refused


# --- the forwarder ----------------------------------------------------------------------------


class Lane(StrEnum):
    EVENTS = "events"
    MAIN = "samples"  # the one sample lane while there is no backfill
    BACKFILL = "backfill"
    LIVE = "live"


@dataclass(slots=True)
class Batch:
    """Units covering the positions first..last of one lane, ready to send."""

    lane: Lane
    first: int
    last: int
    lines: list[str]
    body: bytes
    refs: list[str] = field(default_factory=list)  # per unit, for events; samples: rowids

    def ref(self, i: int) -> str:
        return self.refs[i] if self.refs else f"sample {self.first + i}"

    @property
    def stream(self) -> Stream:
        return Stream.EVENTS if self.lane is Lane.EVENTS else Stream.SAMPLES


class Forwarder:
    """Forwards the site's store to one far side (see the module docstring). A `Sink`."""

    def __init__(
        self,
        site: Site,
        *,
        name: str,
        far: FarSide,
        settings: ForwardSettings,
        encoders: Sequence[Encoder],
        open_writer: Callable[[], tuple[Writer, list[str]]],
        body: Callable[[Sequence[str]], bytes],
    ) -> None:
        """`open_writer`: a writer with its secrets read, and the secret values to keep out
        of messages (SinkError naming what is unusable); called in the event loop, once per
        session. `body`: the payload of a list of units (called in a worker thread)."""
        self.name = name
        self.far = far
        self.settings = settings
        self.store_path = site.store_path
        self.source = f"sink:{name}"
        self._encoders: Mapping[Stream, Encoder] = {e.stream: e for e in encoders}
        if not self._encoders or len(self._encoders) != len(encoders):
            raise ValueError("give one encoder per stream, at least one")
        self._open_writer = open_writer
        self._body = body
        # Only for a store this sink happens to open first: its migration takes the mapping.
        self._parameters = site.point_parameters()
        self._lines = site.point_lines()
        self._store: Store | None = None
        self._writer: Writer | None = None
        self._secrets: list[str] = []
        # Confirmed positions (see the module docstring), and how far reading has gone ahead.
        self._low = self._split = self._live = self._events = 0
        self._read_low = self._read_live = self._read_events = 0
        self._head = self._events_head = 0
        self._oldest_unsent: int | None = None
        self._last_send = {Lane.MAIN: 0.0, Lane.LIVE: 0.0}
        self._last_commit = 0.0
        # The daemon's writer announces its commits (`follow`); without it (another process)
        # the store is polled.
        self._commits: Commits | None = None
        self._seen_commits = 0
        self._dirty = False
        self._incidents: list[Incident] = []  # waiting to be committed with the cursors
        # For status and logs.
        self._state = "starting"
        self._health: str | None = None
        self._failures = 0
        self._failing_since: float | None = None
        # The stream the far side refused whole (see `_settle`), or None when it failed for
        # all (unreachable, 5xx): a confirmed batch of another stream is no recovery.
        self._failing_stream: Stream | None = None
        self._last_error: str | None = None
        self._last_ok: int | None = None
        self._sent = 0
        # The quarantine: incidents and units not yet sent again (after the quarantine
        # cursor that `pocd sink resend` advances), as last read from the store.
        self._quarantine_after = -1
        self._quarantine_incidents = 0
        self._quarantined = 0
        self._quarantine_read = 0.0

    # -- the Sink protocol --------------------------------------------------------------------

    async def healthcheck(self) -> str:
        """The writer's healthcheck; SinkError if it fails."""
        writer, secrets = self._open_writer()
        try:
            return redact(await writer.healthcheck(), secrets)
        except SinkError as exc:
            raise SinkError(redact(str(exc), secrets)) from None
        finally:
            await writer.close()

    def status(self) -> dict[str, Any]:
        samples = (self._split - self._low) + max(0, self._head - self._live)
        events = max(0, self._events_head - self._events)
        age = 0.0
        if self._oldest_unsent is not None and samples:
            age = max(0.0, (now_ns() - self._oldest_unsent) / NS)
        return {
            "kind": self.far.kind,
            "target": self.far.where,
            "state": self._state,
            "health": self._health,
            "backlog": samples + events,
            "backlog_samples": samples,
            "backlog_events": events,
            "oldest_unsent_age_s": round(age, 3),
            "backfilling": self._split > self._low,
            "cursors": self._positions(),
            "sent": self._sent,
            "quarantined": self._quarantined,
            "quarantine_incidents": self._quarantine_incidents,
            "failures": self._failures,
            "last_error": self._last_error,
            "last_ok": self._last_ok,
        }

    async def run(self) -> None:
        """Forward until cancelled; recover from anything but cancellation."""
        with structlog.contextvars.bound_contextvars(sink=self.name, far=self.far.kind):
            self._store = await asyncio.to_thread(
                Store, self.store_path, parameters=self._parameters, lines=self._lines
            )
            try:
                while True:
                    try:
                        await self._session()
                    except SinkError as exc:  # a secret missing or unreadable
                        self._fail_config(str(exc))
                        await self._commit()
                        await asyncio.sleep(self.settings.backoff_max)
                    except Exception as exc:  # a bug here must not stop the daemon
                        log.exception("sink failed; restarting it", error=str(exc))
                        self._incidents.append(
                            self._incident(
                                IncidentKind.SOFTWARE,
                                "sink-failed",
                                f"{type(exc).__name__}: {exc}",
                            )
                        )
                        self._state = "restarting"
                        await self._commit()
                        await asyncio.sleep(self.settings.backoff_max)
            finally:
                self._commit_now()
                self._store.close()
                self._store = None
                self._state = "stopped"

    # -- one connection's life ----------------------------------------------------------------

    async def _session(self) -> None:
        writer, self._secrets = self._open_writer()
        self._writer = writer
        try:
            self._state = "checking"
            try:
                self._health = self._redact(await writer.healthcheck())
                log.info("far side healthy", health=self._health)
            except SinkError as exc:
                # Not fatal: the writes retry until it answers. Said once, at start-up.
                self._health = self._redact(str(exc))
                log.error("far side healthcheck failed; will keep trying", error=self._health)
            await asyncio.to_thread(self._load_cursors)
            self._state = "forwarding"
            await self._forward(writer)
        finally:
            self._writer = None
            await writer.close()

    def _load_cursors(self) -> None:
        assert self._store is not None
        found = self._store.cursors(self.name)
        low = found.get("samples", 0)
        split = max(low, found.get("samples.split", low))
        live = max(split, found.get("samples.live", split))
        if split == low:  # no backfill: everything up to the live position is confirmed
            low = split = live
        self._low, self._split, self._live = low, split, live
        self._events = found.get("events", 0)
        self._rewind()
        for encoder in self._encoders.values():
            encoder.start(self._store)
        self._read_quarantine(self._store, found.get(QUARANTINE_CURSOR, 0))

    def _positions(self) -> dict[str, int]:
        positions: dict[str, int] = {}
        if Stream.SAMPLES in self._encoders:
            positions |= {"samples": self._low, "samples.split": self._split}
            positions["samples.live"] = self._live
        if Stream.EVENTS in self._encoders:
            positions["events"] = self._events
        return positions

    def _rewind(self) -> None:
        """Read again from what is confirmed."""
        self._read_low, self._read_live, self._read_events = self._low, self._live, self._events

    async def _forward(self, writer: Writer) -> None:
        inflight: deque[tuple[Batch, asyncio.Task[WriteResult]]] = deque()
        async with asyncio.TaskGroup() as tg:
            while True:
                if len(inflight) < self.settings.in_flight:
                    # before reading: a commit during the read is then not waited for
                    self._seen_commits = self._commits.count if self._commits else 0
                    batch = await asyncio.to_thread(self._next_batch, time.monotonic())
                    if batch is not None:
                        task = tg.create_task(writer.write(batch.body), name=f"{self.source}:write")
                        inflight.append((batch, task))
                        continue
                if not inflight:
                    await self._idle()
                    continue
                batch, task = inflight.popleft()
                result = await task
                if await self._settle(writer, batch, result):
                    continue
                # The far side failed: what was sent behind this batch goes again after it.
                for _, later in inflight:
                    later.cancel()
                await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)
                inflight.clear()
                self._rewind()
                await self._backoff(result)

    async def _idle(self) -> None:
        if self._dirty:
            await self._commit()
        self._state = "idle" if not self._failures else self._state
        if self._commits is not None:  # until the writer's next commit (another process's
            # records are found within a flush interval)
            await self._commits.after(self._seen_commits, self.settings.flush_interval)
        else:
            await asyncio.sleep(min(0.1, self.settings.flush_interval / 4))

    def follow(self, commits: Commits) -> None:
        """Wait on the daemon's writer for new records instead of polling the store."""
        self._commits = commits

    # -- planning (in a worker thread: reads the store, encodes, compresses) -------------------

    def _next_batch(self, now: float) -> Batch | None:
        store = self._store
        assert store is not None
        if now - self._quarantine_read >= _QUARANTINE_REFRESH_S:
            self._read_quarantine(store, store.cursors(self.name).get(QUARANTINE_CURSOR, 0))
        events = self._encoders.get(Stream.EVENTS)
        if events is not None:
            self._events_head = events.head(store)
        samples = self._encoders.get(Stream.SAMPLES)
        if samples is not None:
            self._head = samples.head(store)
            self._note_oldest(store)
        if events is not None and self._read_events < self._events_head:
            batch = self._events_batch(store, events)
            if batch is not None:
                return batch
        if samples is None:
            return None
        return self._samples_batch(store, samples, now)

    def _samples_batch(self, store: Store, samples: Encoder, now: float) -> Batch | None:
        size = self.settings.batch_size
        interval = self.settings.flush_interval
        if self._split > self._low:  # backfilling: live first when it is due, else backlog
            live = self._head - self._read_live
            if live >= size or (live > 0 and now - self._last_send[Lane.LIVE] >= interval):
                self._last_send[Lane.LIVE] = now
                last = min(self._head, self._read_live + size)
                return self._sample_batch(store, samples, Lane.LIVE, self._read_live + 1, last)
            if self._read_low < self._split:
                last = min(self._split, self._read_low + size)
                return self._sample_batch(store, samples, Lane.BACKFILL, self._read_low + 1, last)
            return None
        pending = self._head - self._read_low
        if pending > _SPLIT_BATCHES * size and not self._failures:
            # Fallen behind (after an outage, a new sink on an old store): the backlog becomes
            # the backfill lane (batches of it in flight stay on it: same cursor) and new
            # samples go on the live lane from here. Not while failing: the split comes with
            # the first confirmed batch, so the live lane starts at the newest data.
            self._split = self._live = self._read_live = self._head
            self._dirty = True
            log.info("backfilling", backlog=pending, upto=self._head)
            return self._samples_batch(store, samples, now)
        if pending >= size or (pending > 0 and now - self._last_send[Lane.MAIN] >= interval):
            self._last_send[Lane.MAIN] = now
            last = min(self._head, self._read_low + size)
            return self._sample_batch(store, samples, Lane.MAIN, self._read_low + 1, last)
        return None

    def _note_oldest(self, store: Store) -> None:
        first = self._low + 1 if self._split > self._low else self._live + 1
        self._oldest_unsent = store.sample_time(first) if first <= self._head else None

    def _read_quarantine(self, store: Store, after: int) -> None:
        """The size of the quarantine, read again if its cursor moved."""
        self._quarantine_read = time.monotonic()
        if after != self._quarantine_after:
            self._quarantine_incidents, self._quarantined = store.incident_lines(
                self.source, self.far.quarantine, after=after
            )
            self._quarantine_after = after

    def _sample_batch(
        self, store: Store, samples: Encoder, lane: Lane, first: int, last: int
    ) -> Batch:
        units = samples.encode(store, first, last)
        if units is None or units.last != last or len(units.lines) != last - first + 1:
            raise RuntimeError(f"the sample encoder did not cover rowids {first}..{last}")
        if lane is Lane.LIVE:
            self._read_live = last
        else:
            self._read_low = last
        return Batch(lane, first, last, units.lines, self._body(units.lines))

    def _events_batch(self, store: Store, events: Encoder) -> Batch | None:
        first = self._read_events + 1
        units = events.encode(store, first, self._read_events + self.settings.batch_size)
        if units is None:
            return None
        self._read_events = units.last
        return Batch(
            Lane.EVENTS, first, units.last, units.lines, self._body(units.lines), units.refs
        )

    def _neighbours(self, batch: Batch) -> list[str]:
        """Single units to weigh a rejected batch against (see the module docstring), in the
        order to try them: the newest unit of its stream and the one just before the batch
        (each if there is one: sent already, or soon, and harmless to send again), then the
        batch's own last, first and middle units."""
        store = self._store
        assert store is not None
        encoder = self._encoders[batch.stream]
        head = encoder.head(store)
        positions = [p for p in (head, batch.first - 1) if p > batch.last or 0 < p < batch.first]
        outside = []
        for p in positions:
            units = encoder.encode(store, p, p)
            outside += units.lines if units is not None else []
        count = len(batch.lines)
        inside = [batch.lines[i] for i in (count - 1, 0, count // 2)]
        return list(dict.fromkeys(outside + inside))

    # -- answers ------------------------------------------------------------------------------

    async def _settle(self, writer: Writer, batch: Batch, result: WriteResult) -> bool:
        """Act on the answer to a batch. False if the far side failed (retry after backoff)."""
        if result.ok:
            await self._confirm(batch, [])
            return True
        if not result.rejected:
            self._note_failure(result)
            return False
        if not self.settings.probe_neighbours:  # no neighbour is sent again: quarantine it
            alone = [(range(len(batch.lines)), result)]
            await self._confirm(batch, self._quarantine(batch, alone), quarantined=len(batch.lines))
            return True
        weighed = await self._neighbour_taken(writer, batch)
        if weighed is False:
            # Nothing taken: the far side refuses the stream: retry, quarantine nothing.
            self._note_failure(result, batch.stream)
            return False
        if isinstance(weighed, WriteResult):  # it failed meanwhile
            self._note_failure(weighed)
            return False
        found = await refused_alone(writer, batch.lines, self._body, result)
        if isinstance(found, WriteResult):
            self._note_failure(found)
            return False
        quarantined = sum(len(lines) for lines, _ in found)
        await self._confirm(batch, self._quarantine(batch, found), quarantined=quarantined)
        return True

    def _quarantine(self, batch: Batch, found: list[tuple[range, WriteResult]]) -> list[Incident]:
        """The incidents holding the units of `batch` the far side refused."""
        incidents = []
        far = self.far
        for lines, refusal in found:
            error = self._redact(refusal.describe())
            what = batch.ref(lines[0])
            if len(lines) > 1:
                what = f"{len(lines)} {far.unit}s, {what} to {batch.ref(lines[-1])},"
            log.error("rejected by the far side; quarantined", units=what, error=error)
            incidents.append(
                self._incident(
                    IncidentKind.DATA,
                    far.quarantine,
                    f"{what} rejected by {far.title} ({error}); quarantined, later "
                    f"{far.unit}s go on",
                    raw="\n".join(batch.lines[i] for i in lines).encode(),
                )
            )
        return incidents

    async def _neighbour_taken(self, writer: Writer, batch: Batch) -> bool | WriteResult:
        """Whether the far side takes a neighbour of a rejected batch written alone (see
        `_neighbours`); the answer instead if the far side failed meanwhile."""
        for line in await asyncio.to_thread(self._neighbours, batch):
            answer = await writer.write(self._body([line]))
            if answer.ok:
                return True
            if not answer.rejected:
                return answer
        return False

    async def _confirm(
        self, batch: Batch, incidents: list[Incident], *, quarantined: int = 0
    ) -> None:
        if batch.lane is Lane.EVENTS:
            expected, self._events = self._events, batch.last
        elif batch.lane is Lane.LIVE:
            expected, self._live = self._live, batch.last
        else:
            expected, self._low = self._low, batch.last
        if batch.first != expected + 1:
            raise RuntimeError(f"{batch.lane} batch {batch.first}..{batch.last} after {expected}")
        if self._low >= self._split:  # no backfill (left): one lane again
            self._low = self._split = self._live = max(self._low, self._live)
            self._read_low = max(self._read_low, self._read_live)
        self._sent += len(batch.lines) - quarantined
        self._last_ok = now_ns()
        self._dirty = True
        self._incidents += incidents
        if self._failures and self._failing_stream in (None, batch.stream):
            self._recovered()
        if not self._failures:
            self._state = "forwarding"
        if self._incidents or time.monotonic() - self._last_commit >= self.settings.commit_interval:
            await self._commit()

    async def _commit(self) -> None:
        """Store the confirmed positions and the incidents waiting with them (in a thread)."""
        work = asyncio.ensure_future(asyncio.to_thread(self._commit_now))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread goes on regardless; wait for it, or the commit at stop would store
            # the same incidents a second time.
            await work
            raise

    def _commit_now(self) -> None:
        """Store the confirmed positions and waiting incidents; keep them if the store fails
        (busy, full) and try again at the next commit."""
        if self._store is None or not (self._dirty or self._incidents):
            return
        positions, incidents = self._positions(), list(self._incidents)
        try:
            self._store.advance_cursors(self.name, positions, incidents)
        except Exception as exc:
            log.error("cannot store the sink's cursors; will retry", error=str(exc))
            return
        held = [i for i in incidents if i.code == self.far.quarantine]
        self._quarantine_incidents += len(held)
        self._quarantined += sum(i.raw.count(b"\n") + 1 for i in held)
        del self._incidents[: len(incidents)]
        self._last_commit = time.monotonic()
        self._dirty = bool(self._incidents)

    # -- failures -----------------------------------------------------------------------------

    def _note_failure(self, result: WriteResult, refused_stream: Stream | None = None) -> None:
        """A failed write. `refused_stream`: the far side refused that stream whole (it took
        neither the batch nor a neighbour of it)."""
        error = self._redact(result.describe())
        self._last_error = error
        self._failures += 1
        self._failing_stream = refused_stream
        self._state = "retrying"
        if self._failures == 1:
            self._failing_since = time.monotonic()
            log.error("write failed; keeping the data and retrying", error=error)
            far = self.far
            code = f"{far.code}-unreachable" if not result.answered else f"{far.code}-refused"
            what = f"writes to {far.where} fail ({error})"
            if refused_stream is not None:
                what = (
                    f"{far.where} refuses every {refused_stream} {far.unit} it is sent, "
                    f"a batch and its neighbours alike ({error}); nothing is quarantined"
                )
            self._incidents.append(
                self._incident(
                    IncidentKind.COMMUNICATION,
                    code,
                    f"{what}; the store keeps the data and forwarding resumes when it answers",
                )
            )
        else:
            log.debug("write failed again", error=error, attempt=self._failures)

    def _recovered(self) -> None:
        down = time.monotonic() - (self._failing_since or time.monotonic())
        log.info("writes recovered", after_s=round(down, 1), attempts=self._failures)
        self._incidents.append(
            self._incident(
                IncidentKind.COMMUNICATION,
                f"{self.far.code}-recovered",
                f"writes to {self.far.where} succeed again after {down:.1f} s and "
                f"{self._failures} failed attempts; the backlog is being backfilled",
            )
        )
        self._failures = 0
        self._failing_since = None
        self._failing_stream = None

    def _fail_config(self, message: str) -> None:
        message = self._redact(message)
        if self._state != "misconfigured":
            log.error("sink cannot start; will try again", error=message)
            self._incidents.append(
                self._incident(IncidentKind.CONFIGURATION, "sink-config", message)
            )
            self._dirty = True
        self._state = "misconfigured"
        self._last_error = message

    async def _backoff(self, result: WriteResult) -> None:
        delay = min(self.settings.backoff_max, _FIRST_BACKOFF_S * 2 ** (self._failures - 1))
        if result.retry_after is not None:
            delay = min(self.settings.backoff_max, max(delay, result.retry_after))
        if self._incidents:
            await self._commit()
        # Jitter: sites that lost the same far side must not all come back in step.
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _incident(self, kind: IncidentKind, code: str, message: str, raw: bytes = b"") -> Incident:
        return Incident(now_ns(), kind, code, self.source, self._redact(message), raw)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)
