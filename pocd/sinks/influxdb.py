"""The InfluxDB sink kind: the store forwarded to one InfluxDB by pocd.sinks.forward's cursor
forwarder, nothing lost, nothing doubled. What lives here is what is InfluxDB's own: two
writers, the encoders of the two streams into line protocol, and the sink's settings.

Some 430 lines: the two write paths (about 250 of them) share their error and answer handling,
and the encoders share one timeline; the write paths are the part to move out if it grows.

Two write paths behind one encoder (pocd.sinks.lineprotocol): `V2Writer` writes through
influxdb-client's async write service (/api/v2/write, `Authorization: Token`; InfluxDB 2.x,
3.x, Cloud and 1.8+), `V1Writer` POSTs to /write with basic auth (1.x before 1.8, such as
Debian's 1.6). A 2xx is ok; 400, 413 and 422 (a partial write too) reject what the batch
holds, and `dropped=N` in InfluxDB's words says it dropped N points whole (beyond the
retention policy); anything else, or no answer, is a failure to retry.

`InfluxSink` forwards two streams: samples by rowid, and the store's event log (run starts
and ends, phase changes, excursion transitions, deviations) by event id, every transition its
own point (cursor names and the forwarding rules: see pocd.sinks.forward). A rejected point
is quarantined as an `influx-rejected` incident holding its lines, counted in `status()` until
`pocd sink resend` (pocd.sinks.resend) sends it again.
Secrets never appear in messages, logs or status.

Must not: write to the store (the forwarder writes its cursors and incidents); raise for a
fault of the far side.
"""

from __future__ import annotations

import gzip
import json
import re
from base64 import b64encode
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import aiohttp

from pocd.errors import StoreError
from pocd.model import (
    AlarmEvent,
    Checkpoint,
    Deviation,
    ExcursionEvent,
    PhaseChange,
    Run,
    RunStatus,
)
from pocd.sinks import SinkError, SinkKind, SinkSettings
from pocd.sinks.config import InfluxSettings, SecretValue
from pocd.sinks.forward import (
    FarSide,
    Forwarder,
    Outcome,
    Stream,
    Units,
    Writer,
    WriteResult,
)
from pocd.sinks.lineprotocol import SampleEncoder, Timelines, encode_event
from pocd.store import Event, Store

if TYPE_CHECKING:
    from pocd.settings import Site

__all__ = [
    "QUARANTINE",
    "SINK",
    "EventLines",
    "InfluxSink",
    "SampleLines",
    "V1Writer",
    "V2Writer",
    "line_body",
    "open_writer",
]

_REJECTED: Final = frozenset({400, 413, 422})
_DROPPED: Final = re.compile(r"\bdropped=(\d+)")
_ERROR_CHARS: Final = 500
# The incident code of a quarantined point (or request): its lines are in the incident's raw
# bytes, and `pocd sink resend` sends them again.
QUARANTINE: Final = "influx-rejected"


# --- write paths ------------------------------------------------------------------------------


def _answer(status: int, error: str = "", retry_after: float | None = None) -> WriteResult:
    """An HTTP answer of InfluxDB as a WriteResult (status 0: none came)."""
    if 200 <= status < 300:
        return WriteResult(Outcome.OK)
    if not status:
        return WriteResult(Outcome.FAILED, error, retry_after, answered=False)
    text = f"HTTP {status}: {error}"
    if status in _REJECTED:
        found = _DROPPED.search(error)
        dropped = int(found.group(1)) if found else None
        return WriteResult(Outcome.REJECTED, text, retry_after, dropped)
    return WriteResult(Outcome.FAILED, text, retry_after)


def _no_answer(exc: BaseException) -> WriteResult:
    return WriteResult(Outcome.FAILED, _connection_error(exc), answered=False)


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
                    return _answer(resp.status)
                text = await resp.text(errors="replace")
                error = _error_text(resp.headers.get("X-Influxdb-Error"), text)
                return _answer(resp.status, error, _retry_after(resp.headers))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _no_answer(exc)

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
            return _answer(
                int(exc.status or 0),
                _error_text(None, str(raw or exc.reason or "")),
                _retry_after(exc.headers),
            )
        except (aiohttp.ClientError, TimeoutError, OSError, InfluxDBError) as exc:
            return _no_answer(exc)
        status = answer[1] if isinstance(answer, tuple) and len(answer) > 1 else 204
        return _answer(int(status))

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


# --- encoders ---------------------------------------------------------------------------------


class SampleLines:
    """The samples stream as line protocol: one line per sample, tagged with the run, batch
    and phase the store's timeline gives its rowid."""

    stream = Stream.SAMPLES

    def __init__(self, site_id: str) -> None:
        self.lines = SampleEncoder(site_id)
        self._timeline_mark = -1

    def start(self, store: Store) -> None:
        self.lines.set_codes(*store.sample_codes())
        self._timeline_mark = -1

    def head(self, store: Store) -> int:
        return store.sample_count()

    def refresh_timeline(self, store: Store) -> None:
        # The event log's head moves with every new run or phase (and more).
        mark = store.event_count()
        if mark != self._timeline_mark:
            self.lines.set_timeline(Timelines(*store.commit_marks()))
            self._timeline_mark = mark

    def encode(self, store: Store, first: int, last: int) -> Units:
        rows = store.sample_rows(first, last)
        if len(rows) != last - first + 1:
            raise StoreError(f"store returned {len(rows)} samples for rowids {first}..{last}")
        # After the rows: the timeline then holds every run and phase committed before or
        # with them (a later one marks a later rowid and cannot change their tags).
        self.refresh_timeline(store)
        try:
            return Units(last, self.lines.encode(rows, first))
        except KeyError:  # a channel or quality interned since the codes were read
            self.lines.set_codes(*store.sample_codes())
            return Units(last, self.lines.encode(rows, first))


class EventLines:
    """The events stream: the store's event log (`Store.events`) as line protocol, every
    transition its own point (see `encode_event`), with the batch ids of the samples'
    timeline."""

    stream = Stream.EVENTS

    def __init__(self, site_id: str, samples: SampleLines) -> None:
        self.site_id = site_id
        self.samples = samples

    def start(self, store: Store) -> None:
        """Nothing of its own: the timeline is the samples encoder's."""

    def head(self, store: Store) -> int:
        return store.event_count()

    def encode(self, store: Store, first: int, last: int) -> Units | None:
        events = store.events(first - 1, last - first + 1)
        if not events:
            return None
        self.samples.refresh_timeline(store)
        batches = self.samples.lines.timeline.batches
        lines: list[str] = []
        refs: list[str] = []
        for _, event in events:
            found = encode_event(self.site_id, event, batches)
            lines += found
            refs += [_ref(event)] * len(found)
        return Units(events[-1][0], lines, refs)


def _ref(event: Event) -> str:
    """What an event is, for people (a quarantine incident names it so)."""
    if isinstance(event, Run):
        return f"run {event.id} {'started' if event.status is RunStatus.RUNNING else 'ended'}"
    if isinstance(event, PhaseChange):
        return f"phase {event.run_id} {event.phase} {event.t}"
    if isinstance(event, ExcursionEvent):
        return f"excursion {event.excursion.id} {event.change.value}"
    if isinstance(event, Deviation):
        return f"deviation {event.id}"
    if isinstance(event, AlarmEvent):
        return f"alarm {event.alarm_id} {event.transition.value}"
    if isinstance(event, Checkpoint):
        return f"checkpoint {event.size}"
    return f"audit {event.action} {event.target}"


# --- the sink ---------------------------------------------------------------------------------


class InfluxSink(Forwarder):
    """Forwards the site's store to one InfluxDB. See the module docstring."""

    def __init__(self, site: Site, settings: InfluxSettings) -> None:
        samples = SampleLines(site.id)
        base = site.path.parent
        super().__init__(
            site,
            name=settings.name,
            far=FarSide("influxdb", "InfluxDB", "influx", settings.where()),
            settings=settings,
            encoders=[EventLines(site.id, samples), samples],
            open_writer=partial(open_writer, settings, base),
            body=partial(line_body, gzipped=settings.gzip),
        )
        self.site_id = site.id


def _build(site: Site, settings: SinkSettings) -> InfluxSink:
    if not isinstance(settings, InfluxSettings):
        raise TypeError(f"[sinks.influxdb] takes InfluxSettings, not {type(settings).__name__}")
    return InfluxSink(site, settings)


SINK: Final = SinkKind(name="influxdb", build=_build)
