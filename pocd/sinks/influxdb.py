"""The InfluxDB sink: the store forwarded to one InfluxDB by cursor, nothing lost, nothing doubled.

Some 900 lines: the two write paths and the forwarder; the write paths are the part to move out
if it grows again.

Two write paths behind one encoder (pocd.sinks.lineprotocol): `V2Writer` writes through
influxdb-client's async write service (/api/v2/write, `Authorization: Token`; InfluxDB 2.x,
3.x, Cloud and 1.8+), `V1Writer` POSTs to /write with basic auth (1.x before 1.8, such as
Debian's 1.6).

`InfluxSink` forwards two streams, each by its own cursor in the store: samples by rowid, and
runs, phase changes, excursions and deviations by the id of the store's outbox. A cursor moves
only after a 2xx. Samples travel in one lane while it keeps up; once the backlog exceeds a few
batches (an outage, a new sink on an old store) it is split at the head: a live lane sends new
samples as they come while a backfill lane sends the backlog oldest first, as fast as the far
side takes it, both in rowid order. The sample cursors are `samples` (all up to it confirmed),
`samples.split` (end of the backfill range) and `samples.live` (confirmed on the live lane);
all three are equal when there is no backfill.

A rejected batch (400, 413, 422, a partial write) is first weighed against its neighbours:
single points of the same stream are written alone, those outside it first (the newest one,
the one just before it), then its own last, first and middle ones. If InfluxDB
takes none of them, it refuses the stream, not these points (a proxy that refuses gzip, a
field-type conflict): the batch counts as a failure and is retried with backoff like an
outage, a circuit breaker that quarantines nothing. If it takes one, the batch is bisected
down to the points refused on their own, or to a request InfluxDB dropped whole (points
beyond its retention policy); each is quarantined as an incident holding its lines, stored
in the transaction that moves the cursor past it, and counted in `status()` until
`pocd sink resend` (pocd.sinks.resend) sends it again. Any other failure keeps the batch and
retries it with jittered exponential backoff; what was in flight behind it is sent again,
which overwrites the same points (same tags and timestamps). Secrets never appear in
messages, logs or status.

Must not: write to the store anything but its cursors and incidents; raise for a fault of the
far side (that is a state, in `status()` and in incidents).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import time
from base64 import b64encode
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import aiohttp
import structlog

from pocd.errors import StoreError
from pocd.model import NS, Deviation, Excursion, Incident, IncidentKind, PhaseChange, Run, now_ns
from pocd.sinks import SinkError
from pocd.sinks.config import InfluxSettings, SecretValue
from pocd.sinks.lineprotocol import SampleEncoder, Timeline, encode_change
from pocd.store import Change, Store

if TYPE_CHECKING:
    from pocd.settings import Site

__all__ = [
    "QUARANTINE",
    "InfluxSink",
    "V1Writer",
    "V2Writer",
    "WriteResult",
    "Writer",
    "line_body",
    "open_writer",
    "redact",
    "refused_alone",
]

log = structlog.get_logger("pocd.sinks.influxdb")

# Requests on the wire at once: while InfluxDB ingests, the next batch is read, encoded and
# compressed here. Three keeps InfluxDB busy even when that takes longer than its ingest (a
# busy host); measured on the bench, two was slower there and four no faster.
_IN_FLIGHT: Final = 3
# Split off a backfill lane when the sample backlog exceeds this many batches.
_SPLIT_BATCHES: Final = 4
# Confirmed positions are committed at most this often (and at stop): a crash resends at
# most this much, which overwrites the same points. Committing after every batch would cost
# an fsync per batch.
_COMMIT_INTERVAL_S: Final = 0.5
_REJECTED: Final = frozenset({400, 413, 422})
_DROPPED: Final = re.compile(r"\bdropped=(\d+)")
_FIRST_BACKOFF_S: Final = 0.5
_ERROR_CHARS: Final = 500
# The incident code of a quarantined point (or request): its lines are in the incident's raw
# bytes, and `pocd sink resend` sends them again.
QUARANTINE: Final = "influx-rejected"
# How often the size of the quarantine is read again from the store, where `pocd sink resend`
# (another process, perhaps) may have emptied it.
_QUARANTINE_REFRESH_S: Final = 1.0


# --- write paths ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The far side's answer to one write. `status` 0: no answer (refused, reset, timeout)."""

    status: int
    error: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def rejected(self) -> bool:
        """Refused for what the batch holds: bisect it, quarantine the points refused alone."""
        return self.status in _REJECTED

    @property
    def dropped(self) -> int | None:
        """How many points InfluxDB says it dropped (`dropped=N` in a partial write)."""
        found = _DROPPED.search(self.error)
        return int(found.group(1)) if found else None

    def describe(self) -> str:
        return f"HTTP {self.status}: {self.error}" if self.status else self.error


class Writer(Protocol):
    """One InfluxDB write path. `write` never raises for a far-side fault: it answers."""

    async def write(self, body: bytes) -> WriteResult:
        """POST one batch of line protocol (gzipped if the settings say so)."""
        ...

    async def healthcheck(self) -> str:
        """What answered, or SinkError saying why it did not."""
        ...

    async def close(self) -> None: ...


def _connection_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]


def _error_text(header: str | None, body: str) -> str:
    """InfluxDB's own words: the X-Influxdb-Error header, else {"error"|"message"} JSON."""
    if header:
        return header[:_ERROR_CHARS]
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:_ERROR_CHARS]
    if isinstance(data, dict):
        text = data.get("error") or data.get("message") or body
        return str(text)[:_ERROR_CHARS]
    return body.strip()[:_ERROR_CHARS]


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None


class V1Writer:
    """POST /write?db=&rp=&precision=n with basic auth: InfluxDB 1.x before 1.8."""

    def __init__(self, settings: InfluxSettings, password: SecretValue | None) -> None:
        self.settings = settings
        session_headers = {}
        if settings.username is not None:
            # Basic auth in a header, never u=/p= in the URL, where it would reach logs.
            login = f"{settings.username}:{password.reveal() if password else ''}"
            session_headers["Authorization"] = f"Basic {b64encode(login.encode()).decode()}"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.timeout), headers=session_headers
        )
        self._params = {"db": str(settings.database), "precision": "n"}
        if settings.retention_policy:
            self._params["rp"] = settings.retention_policy
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"

    async def write(self, body: bytes) -> WriteResult:
        url = f"{self.settings.url}/write"
        try:
            async with self._session.post(
                url, params=self._params, data=body, headers=self._headers
            ) as resp:
                if 200 <= resp.status < 300:
                    return WriteResult(resp.status)
                text = await resp.text(errors="replace")
                error = _error_text(resp.headers.get("X-Influxdb-Error"), text)
                return WriteResult(resp.status, error, _retry_after(resp.headers))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return WriteResult(0, _connection_error(exc))

    async def healthcheck(self) -> str:
        """GET /ping, then SHOW DATABASES: that the database exists and the login works."""
        url = self.settings.url
        try:
            async with self._session.get(f"{url}/ping") as resp:
                if resp.status != 204:
                    raise SinkError(f"{url}/ping answered HTTP {resp.status}, not 204")
                version = resp.headers.get("X-Influxdb-Version", "of unknown version")
            async with self._session.get(f"{url}/query", params={"q": "SHOW DATABASES"}) as resp:
                text = await resp.text(errors="replace")
                if resp.status in (401, 403):
                    raise SinkError(
                        f"{url} refused the login of user {self.settings.username!r} "
                        f"(HTTP {resp.status}: {_error_text(None, text)})"
                    )
                if resp.status != 200:
                    raise SinkError(f"{url}/query answered HTTP {resp.status}: {text[:200]}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"cannot reach {url}: {_connection_error(exc)}") from None
        names = _database_names(text)
        database = self.settings.database
        if names is not None and database not in names:
            raise SinkError(
                f"{url} has no database {database!r} (it has: {', '.join(names) or 'none'})"
            )
        return f"InfluxDB {version} at {url} answers /ping; database {database!r} exists"

    async def close(self) -> None:
        await self._session.close()


def _database_names(text: str) -> list[str] | None:
    """The names in a SHOW DATABASES answer; None if it is not one (a user who may not list)."""
    try:
        result = json.loads(text)["results"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if "error" in result:
        return None
    return [row[0] for series in result.get("series", []) for row in series.get("values", [])]


class V2Writer:
    """influxdb-client's async write service: POST /api/v2/write?org=&bucket=&precision=ns.

    The service rather than `write_api().write()`: that one gzips at level 9 inside the event
    loop, several times slower than the level 1 used here, in the worker thread.
    """

    def __init__(
        self,
        settings: InfluxSettings,
        *,
        org: SecretValue,
        bucket: SecretValue,
        token: SecretValue,
    ) -> None:
        # Imported here: influxdb-client takes about a second to import, and only v2 needs it.
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        from influxdb_client.service.health_service import HealthService
        from influxdb_client.service.write_service import WriteService

        self.settings = settings
        self._org = org.reveal()
        self._bucket = bucket.reveal()
        # influxdb-client is only partly typed: held as Any, used through this class only.
        self._client: Any = InfluxDBClientAsync(
            url=settings.url,
            token=token.reveal(),
            org=self._org,
            timeout=int(settings.timeout * 1000),
            enable_gzip=False,  # the body comes compressed (see the class docstring)
        )
        self._writes: Any = cast(Any, WriteService)(self._client.api_client)
        self._health: Any = cast(Any, HealthService)(self._client.api_client)

    async def write(self, body: bytes) -> WriteResult:
        from influxdb_client.client.exceptions import InfluxDBError
        from influxdb_client.rest import ApiException

        try:
            answer = await self._writes.post_write_async(
                org=self._org,
                bucket=self._bucket,
                body=body,
                precision="ns",
                content_encoding="gzip" if self.settings.gzip else "identity",
                content_type="text/plain; charset=utf-8",
                _return_http_data_only=False,
            )
        except ApiException as exc:
            # str(exc) lists the response headers; only status and body are used.
            raw = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
            return WriteResult(
                int(exc.status or 0),
                _error_text(None, str(raw or exc.reason or "")),
                _retry_after(exc.headers),
            )
        except (aiohttp.ClientError, TimeoutError, OSError, InfluxDBError) as exc:
            return WriteResult(0, _connection_error(exc))
        status = answer[1] if isinstance(answer, tuple) and len(answer) > 1 else 204
        return WriteResult(int(status))

    async def healthcheck(self) -> str:
        from influxdb_client.client.exceptions import InfluxDBError
        from influxdb_client.rest import ApiException

        url = self.settings.url
        try:
            health = await self._health.get_health_async()
        except ApiException as exc:
            raise SinkError(f"{url}/health answered HTTP {exc.status}") from None
        except (aiohttp.ClientError, TimeoutError, OSError, InfluxDBError) as exc:
            raise SinkError(f"cannot reach {url}: {_connection_error(exc)}") from None
        status = getattr(health, "status", None)
        if status != "pass":
            raise SinkError(f"{url}/health says {status!r}: {getattr(health, 'message', '')}")
        version = getattr(health, "version", None) or "of unknown version"
        return f"InfluxDB {version} at {url} answers /health: pass"

    async def close(self) -> None:
        await self._client.close()


def line_body(lines: Sequence[str], *, gzipped: bool) -> bytes:
    """The body of a write: the lines, gzipped if the settings say so."""
    data = "\n".join(lines).encode()
    # Level 1: a third of level 6's CPU for ~20 % more bytes; mtime=0 keeps bodies stable.
    return gzip.compress(data, compresslevel=1, mtime=0) if gzipped else data


async def refused_alone(
    writer: Writer,
    lines: Sequence[str],
    body: Callable[[Sequence[str]], bytes],
    result: WriteResult,
    span: range | None = None,
) -> list[tuple[range, WriteResult]] | WriteResult:
    """The stretches of `lines` (indices, with the refusal) that InfluxDB refuses on their
    own, found by bisecting a request it refused with `result`; or the answer that showed
    the far side failing. Lines accepted on the way are written again, harmlessly.

    A request InfluxDB says it dropped whole (`dropped=` the number of lines: points beyond
    the retention policy, say) is one refusal: bisecting it would cost a request per point
    and change nothing.
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


def open_writer(settings: InfluxSettings, base: Path) -> tuple[Writer, list[str]]:
    """The writer of a sink, with its secrets read (files relative to `base`), and the secret
    values to keep out of messages. SinkError naming the file or variable if one is unusable.
    Must be called in a running event loop."""
    try:
        if settings.api == "v1":
            password = settings.password.read(base) if settings.password else None
            return V1Writer(settings, password), [password.reveal()] if password else []
        assert settings.org and settings.bucket and settings.token  # checked at load
        org, bucket, token = (s.read(base) for s in (settings.org, settings.bucket, settings.token))
    except ValueError as exc:
        raise SinkError(str(exc)) from None
    writer = V2Writer(settings, org=org, bucket=bucket, token=token)
    return writer, [token.reveal()]


# --- the forwarder ----------------------------------------------------------------------------


class Lane(StrEnum):
    EVENTS = "events"
    MAIN = "samples"  # the one sample lane while there is no backfill
    BACKFILL = "backfill"
    LIVE = "live"


@dataclass(slots=True)
class Batch:
    """Lines covering the positions first..last of one lane, ready to send."""

    lane: Lane
    first: int
    last: int
    lines: list[str]
    body: bytes
    refs: list[str] = field(default_factory=list)  # per line, for events; samples: rowids

    def ref(self, i: int) -> str:
        return self.refs[i] if self.refs else f"sample {self.first + i}"

    @property
    def stream(self) -> str:
        """The stream of the store it comes from: "samples" (any lane) or "events"."""
        return "events" if self.lane is Lane.EVENTS else "samples"


class InfluxSink:
    """Forwards the site's store to one InfluxDB. See the module docstring."""

    def __init__(self, site: Site, settings: InfluxSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self.site_id = site.id
        self.store_path = site.store_path
        self.base = site.path.parent
        self.source = f"sink:{self.name}"
        self._encoder = SampleEncoder(site.id)
        # Only for a store this sink happens to open first: its migration takes the mapping.
        self._parameters = {src: name for name, src in site.parameter_source().items()}
        self._timeline_mark = -1
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
        self._dirty = False
        self._incidents: list[Incident] = []  # waiting to be committed with the cursors
        # For status and logs.
        self._state = "starting"
        self._health: str | None = None
        self._failures = 0
        self._failing_since: float | None = None
        # The stream InfluxDB refused whole (see `_settle`), or None when it failed for all
        # (unreachable, 5xx): a confirmed batch of another stream is no recovery.
        self._failing_stream: str | None = None
        self._last_error: str | None = None
        self._last_ok: int | None = None
        self._sent = 0
        # The quarantine: incidents and points not yet sent again (after the "quarantine"
        # cursor that `pocd sink resend` advances), as last read from the store.
        self._quarantine_after = -1
        self._quarantine_incidents = 0
        self._quarantined = 0
        self._quarantine_read = 0.0

    # -- the Sink protocol --------------------------------------------------------------------

    async def healthcheck(self) -> str:
        """/ping (v1) or /health (v2) of the configured InfluxDB; SinkError if it fails."""
        writer, secrets = open_writer(self.settings, self.base)
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
            "kind": "influxdb",
            "target": self.settings.where(),
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
        with structlog.contextvars.bound_contextvars(sink=self.name):
            self._store = await asyncio.to_thread(
                Store, self.store_path, parameters=self._parameters
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
        writer, self._secrets = open_writer(self.settings, self.base)
        self._writer = writer
        try:
            self._state = "checking"
            try:
                self._health = self._redact(await writer.healthcheck())
                log.info("influxdb healthy", health=self._health)
            except SinkError as exc:
                # Not fatal: the writes retry until it answers. Said once, at start-up.
                self._health = self._redact(str(exc))
                log.error("influxdb healthcheck failed; will keep trying", error=self._health)
            await asyncio.to_thread(self._load_cursors)
            self._state = "forwarding"
            await self._forward()
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
        self._encoder.set_codes(*self._store.sample_codes())
        self._timeline_mark = -1
        self._read_quarantine(self._store, found.get("quarantine", 0))

    def _positions(self) -> dict[str, int]:
        return {
            "samples": self._low,
            "samples.split": self._split,
            "samples.live": self._live,
            "events": self._events,
        }

    def _rewind(self) -> None:
        """Read again from what is confirmed."""
        self._read_low, self._read_live, self._read_events = self._low, self._live, self._events

    async def _forward(self) -> None:
        inflight: deque[tuple[Batch, asyncio.Task[WriteResult]]] = deque()
        writer = self._writer
        assert writer is not None
        async with asyncio.TaskGroup() as tg:
            while True:
                if len(inflight) < _IN_FLIGHT:
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
                if await self._settle(batch, result):
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
        await asyncio.sleep(min(0.1, self.settings.flush_interval / 4))

    # -- planning (in a worker thread: reads the store, encodes, compresses) -------------------

    def _next_batch(self, now: float) -> Batch | None:
        store = self._store
        assert store is not None
        if now - self._quarantine_read >= _QUARANTINE_REFRESH_S:
            self._read_quarantine(store, store.cursors(self.name).get("quarantine", 0))
        self._head = store.sample_count()
        self._events_head = store.change_count()
        self._note_oldest(store)
        if self._read_events < self._events_head:
            batch = self._events_batch(store)
            if batch is not None:
                return batch
        size = self.settings.batch_size
        interval = self.settings.flush_interval
        if self._split > self._low:  # backfilling: live first when it is due, else backlog
            live = self._head - self._read_live
            if live >= size or (live > 0 and now - self._last_send[Lane.LIVE] >= interval):
                self._last_send[Lane.LIVE] = now
                return self._sample_batch(
                    store, Lane.LIVE, self._read_live + 1, min(self._head, self._read_live + size)
                )
            if self._read_low < self._split:
                last = min(self._split, self._read_low + size)
                return self._sample_batch(store, Lane.BACKFILL, self._read_low + 1, last)
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
            return self._next_batch(now)
        if pending >= size or (pending > 0 and now - self._last_send[Lane.MAIN] >= interval):
            self._last_send[Lane.MAIN] = now
            return self._sample_batch(
                store, Lane.MAIN, self._read_low + 1, min(self._head, self._read_low + size)
            )
        return None

    def _note_oldest(self, store: Store) -> None:
        first = self._low + 1 if self._split > self._low else self._live + 1
        self._oldest_unsent = store.sample_time(first) if first <= self._head else None

    def _read_quarantine(self, store: Store, after: int) -> None:
        """The size of the quarantine, read again if its cursor moved."""
        self._quarantine_read = time.monotonic()
        if after != self._quarantine_after:
            self._quarantine_incidents, self._quarantined = store.incident_lines(
                self.source, QUARANTINE, after=after
            )
            self._quarantine_after = after

    def _refresh_timeline(self, store: Store) -> None:
        mark = store.change_count()
        if mark != self._timeline_mark:
            self._encoder.set_timeline(Timeline(*store.commit_marks()))
            self._timeline_mark = mark

    def _sample_lines(self, store: Store, first: int, last: int) -> list[str]:
        rows = store.sample_rows(first, last)
        if len(rows) != last - first + 1:
            raise StoreError(f"store returned {len(rows)} samples for rowids {first}..{last}")
        # After the rows: the timeline then holds every run and phase committed before or
        # with them (a later one marks a later rowid and cannot change their tags).
        self._refresh_timeline(store)
        try:
            return self._encoder.encode(rows, first)
        except KeyError:  # a channel or quality interned since the codes were read
            self._encoder.set_codes(*store.sample_codes())
            return self._encoder.encode(rows, first)

    def _sample_batch(self, store: Store, lane: Lane, first: int, last: int) -> Batch:
        lines = self._sample_lines(store, first, last)
        if lane is Lane.LIVE:
            self._read_live = last
        else:
            self._read_low = last
        return Batch(lane, first, last, lines, self._body(lines))

    def _events_batch(self, store: Store) -> Batch | None:
        changes = store.changes(self._read_events, self.settings.batch_size)
        if not changes:
            return None
        self._refresh_timeline(store)
        # A record changed several times in the batch goes once, in its current state.
        latest: dict[tuple[str, ...], Change] = {}
        for _, change in changes:
            key = _identity(change)
            latest.pop(key, None)
            latest[key] = change
        lines = self._change_lines(latest.values())
        refs = [" ".join(key) for key in latest]
        first, last = self._read_events + 1, changes[-1][0]
        self._read_events = last
        return Batch(Lane.EVENTS, first, last, lines, self._body(lines), refs)

    def _change_lines(self, changes: Iterable[Change]) -> list[str]:
        batches = self._encoder.timeline.batches
        return [encode_change(self.site_id, c, batches) for c in changes]

    def _neighbours(self, batch: Batch) -> list[str]:
        """Single lines to weigh a rejected batch against (see the module docstring), in the
        order to try them: the newest point of its stream and the one just before the batch
        (each if there is one: sent already, or soon, and harmless to send again), then the
        batch's own last, first and middle lines."""
        store = self._store
        assert store is not None
        head = store.change_count() if batch.lane is Lane.EVENTS else store.sample_count()
        positions = [p for p in (head, batch.first - 1) if p > batch.last or 0 < p < batch.first]
        if batch.lane is not Lane.EVENTS:
            outside = [self._sample_lines(store, p, p)[0] for p in positions]
        else:
            self._refresh_timeline(store)
            outside = self._change_lines(c for p in positions for _, c in store.changes(p - 1, 1))
        count = len(batch.lines)
        inside = [batch.lines[i] for i in (count - 1, 0, count // 2)]
        return list(dict.fromkeys(outside + inside))

    def _body(self, lines: Sequence[str]) -> bytes:
        return line_body(lines, gzipped=self.settings.gzip)

    # -- answers ------------------------------------------------------------------------------

    async def _settle(self, batch: Batch, result: WriteResult) -> bool:
        """Act on the answer to a batch. False if the far side failed (retry after backoff)."""
        if result.ok:
            await self._confirm(batch, [])
            return True
        if not result.rejected:
            self._note_failure(result)
            return False
        weighed = await self._neighbour_taken(batch)
        if weighed is False:
            # Nothing taken: InfluxDB refuses the stream: retry, quarantine nothing.
            self._note_failure(result, batch.stream)
            return False
        if isinstance(weighed, WriteResult):  # it failed meanwhile
            self._note_failure(weighed)
            return False
        assert self._writer is not None
        found = await refused_alone(self._writer, batch.lines, self._body, result)
        if isinstance(found, WriteResult):
            self._note_failure(found)
            return False
        incidents = []
        for lines, refusal in found:
            error = self._redact(refusal.describe())
            what = batch.ref(lines[0])
            if len(lines) > 1:
                what = f"{len(lines)} points, {what} to {batch.ref(lines[-1])},"
            log.error("rejected by influxdb; quarantined", points=what, error=error)
            incidents.append(
                self._incident(
                    IncidentKind.DATA,
                    QUARANTINE,
                    f"{what} rejected by InfluxDB ({error}); quarantined, later points go on",
                    raw="\n".join(batch.lines[i] for i in lines).encode(),
                )
            )
        await self._confirm(batch, incidents, quarantined=sum(len(lines) for lines, _ in found))
        return True

    async def _neighbour_taken(self, batch: Batch) -> bool | WriteResult:
        """Whether InfluxDB takes a neighbour of a rejected batch written alone (see
        `_neighbours`); the answer instead if the far side failed meanwhile."""
        assert self._writer is not None
        for line in await asyncio.to_thread(self._neighbours, batch):
            answer = await self._writer.write(self._body([line]))
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
        if self._incidents or time.monotonic() - self._last_commit >= _COMMIT_INTERVAL_S:
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
        held = [i for i in incidents if i.code == QUARANTINE]
        self._quarantine_incidents += len(held)
        self._quarantined += sum(i.raw.count(b"\n") + 1 for i in held)
        del self._incidents[: len(incidents)]
        self._last_commit = time.monotonic()
        self._dirty = bool(self._incidents)

    # -- failures -----------------------------------------------------------------------------

    def _note_failure(self, result: WriteResult, refused_stream: str | None = None) -> None:
        """A failed write. `refused_stream`: InfluxDB refused that stream whole (it took
        neither the batch nor a neighbour of it)."""
        error = self._redact(result.describe())
        self._last_error = error
        self._failures += 1
        self._failing_stream = refused_stream
        self._state = "retrying"
        if self._failures == 1:
            self._failing_since = time.monotonic()
            log.error("influxdb write failed; keeping the data and retrying", error=error)
            code = "influx-unreachable" if result.status == 0 else "influx-refused"
            what = f"writes to {self.settings.where()} fail ({error})"
            if refused_stream is not None:
                what = (
                    f"{self.settings.where()} refuses every {refused_stream} point it is sent, "
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
            log.debug("influxdb write failed again", error=error, attempt=self._failures)

    def _recovered(self) -> None:
        down = time.monotonic() - (self._failing_since or time.monotonic())
        log.info("influxdb writes recovered", after_s=round(down, 1), attempts=self._failures)
        self._incidents.append(
            self._incident(
                IncidentKind.COMMUNICATION,
                "influx-recovered",
                f"writes to {self.settings.where()} succeed again after {down:.1f} s and "
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
        # Jitter: sites that lost the same InfluxDB must not all come back in step.
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _incident(self, kind: IncidentKind, code: str, message: str, raw: bytes = b"") -> Incident:
        return Incident(now_ns(), kind, code, self.source, self._redact(message), raw)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)


def redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret value replaced: a last guard, as no message is built from one."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _identity(change: Change) -> tuple[str, ...]:
    if isinstance(change, Run):
        return ("run", change.id)
    if isinstance(change, PhaseChange):
        return ("phase", change.run_id, change.phase, str(change.t))
    if isinstance(change, Excursion):
        return ("excursion", change.id)
    if isinstance(change, Deviation):
        return ("deviation", change.id)
    raise TypeError(type(change).__name__)
