"""The control API over HTTP (aiohttp): run start, phase, stop, site status, live status, the
records of runs, and Prometheus metrics.

Listens on the site's `api.listen` (127.0.0.1 by default). Until named users arrive with the
console, a request is served only if it comes from a client on this machine and not from a web
page: its Host must name this API (pocd.api.authority), a browser's Origin must be this API's,
and a body must be `application/json` in UTF-8 (a page of another site cannot send that without
a CORS preflight, which is not answered). Bodies are typed models (pocd.api.bodies).

Every answer is valid JSON (a non-finite number is null), errors as {"error": ...}: 400 a
malformed request, naming the field; 403 a foreign Origin; 413 a body over CLIENT_MAX_SIZE;
415 a body that is not JSON in UTF-8; 409 an operation run control refused; 503 one it could
not complete (the store did not commit in time). Never a 500 for anything a client sent.

It depends on run control, the status view and a read-only store through small interfaces,
never on the daemon: reads of the record run in a thread of their own on their own read-only
connection, so a long commit stalls neither them nor the event loop (and so the devices).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from aiohttp import hdrs, web
from pydantic import ValidationError

from pocd.api.authority import Authority
from pocd.api.bodies import (
    PhaseRequest,
    RunStartRequest,
    RunStopRequest,
    SiteStatusRequest,
    explain,
)
from pocd.api.metrics import render_metrics
from pocd.configtypes import StrictModel
from pocd.errors import PocdError, RunError
from pocd.model import PhaseChange, Run, SiteStatus
from pocd.records import json_bytes, run_detail, run_summary
from pocd.store import Store

if TYPE_CHECKING:
    from pocd.settings import ApiSection

__all__ = ["CLIENT_MAX_SIZE", "Authority", "RunControl", "StatusView", "make_app", "serve_api"]

log = structlog.get_logger("pocd.api")

# The largest body read. Every valid body is far smaller (five identifiers of at most 128
# characters and a reason of at most 2000, even escaped as \uXXXX pairs); a bigger one is
# refused before it is parsed.
CLIENT_MAX_SIZE = 64 * 1024
_SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
_UTF8 = frozenset({"utf-8", "utf8"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = TypeVar("Body", bound=StrictModel)
T = TypeVar("T")


class RunControl(Protocol):
    """Start runs on lines, advance and stop them by id, change the site's status; each
    answers once committed. `line` or `run` None: the site's only line, or its run. Raises
    RunError for an operation refused, another PocdError for one not completed."""

    async def start_run(
        self,
        batch_id: str,
        protocol_id: str,
        version: str | None,
        operator: str,
        *,
        line: str | None = None,
    ) -> Run: ...

    async def advance_phase(
        self, phase: str, operator: str, reason: str = "", *, run: str | None = None
    ) -> PhaseChange: ...

    async def stop_run(
        self, operator: str, *, abort: bool = False, reason: str = "", run: str | None = None
    ) -> Run: ...

    async def set_site_status(self, status: SiteStatus, operator: str, reason: str) -> None: ...


class StatusView(Protocol):
    """The live state of the site: lines, runs, points, incidents, sinks (JSON-ready)."""

    def status(self) -> dict[str, Any]: ...

    def line_status(self) -> list[dict[str, Any]]:
        """Each line with its run, or the standby protocol watching it."""
        ...


class _Records:
    """The API's own read-only connection to the store. Every read runs in the API's one
    reader thread: a read neither waits for the writer's lock nor holds up the event loop,
    and a burst of reads queues there instead of taking the worker threads the store writer
    commits in. The connection is opened at the first read (so the API listens at once) and
    closed with the app."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: Store | None = None
        self._opening = threading.Lock()
        # One thread: the connection serves one query at a time anyway.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pocd-api-read")

    async def read(self, query: Callable[[Store], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._read, query)

    def _read(self, query: Callable[[Store], T]) -> T:
        with self._opening:
            if self._store is None:
                self._store = Store(self.path, readonly=True)
            store = self._store
        return query(store)

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # the reads under way finish first
        with self._opening:
            if self._store is not None:
                self._store.close()
                self._store = None


@dataclass(frozen=True, slots=True)
class _Parts:
    control: RunControl
    view: StatusView
    records: _Records
    metrics: Callable[[], bytes]
    authority: Authority


PARTS: web.AppKey[_Parts] = web.AppKey("parts")


class _Refusal(Exception):
    """A request refused before it reaches run control; becomes {"error": message}."""

    def __init__(self, status: int, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json_bytes(data),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _error(status: int, message: str, fields: list[str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if fields is not None:
        body["fields"] = fields
    return _json(body, status)


@web.middleware
async def _answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every outcome as a JSON answer: refusals, run control's errors, aiohttp's own (404,
    405, 413) and, should a handler have a bug, a 500 that says so."""
    try:
        return await handler(request)
    except _Refusal as exc:
        return _error(exc.status, exc.message, exc.fields)
    except RunError as exc:
        return _error(409, str(exc))
    except PocdError as exc:  # the operation was not completed (e.g. not committed in time)
        return _error(503, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the request body is larger than {CLIENT_MAX_SIZE} bytes")
    except web.HTTPNotFound:
        return _error(404, f"no such path: {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        message = f"{request.method} is not allowed on {request.path}"
        return _json({"error": message}, 405, {hdrs.ALLOW: exc.headers[hdrs.ALLOW]})
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason)
    except Exception as exc:
        log.exception("API request failed", method=request.method, path=request.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


@web.middleware
async def _same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what a web page could send: a foreign Host (DNS rebinding), a foreign Origin,
    and a body that is not JSON (a cross-site form or text/plain POST needs no preflight)."""
    authority = request.app[PARTS].authority
    host = request.headers.get(hdrs.HOST)
    if not authority.accepts_host(host):
        said = "no Host header" if host is None else f"Host {host!r}"
        raise _Refusal(
            400,
            f"{said} does not name this API (api.listen = {authority.listen}); "
            "requests are served only to clients that address it as it listens",
            ["Host"],
        )
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not authority.accepts_origin(origin):
        raise _Refusal(
            403, f"a request from the web page {origin!r} is refused: it is not this API's"
        )
    routed = request.match_info.http_exception is None  # else a 404 or 405 says more
    if routed and request.method not in _SAFE_METHODS:
        if request.content_type != "application/json":
            raise _Refusal(
                415,
                f"Content-Type must be application/json (got {request.content_type})",
                ["Content-Type"],
            )
        charset = request.charset
        if charset is not None and charset.lower() not in _UTF8:
            raise _Refusal(415, f"a JSON body is UTF-8, not charset {charset!r}", ["Content-Type"])
    return await handler(request)


async def _body(request: web.Request, model: type[Body]) -> Body:
    raw = await request.read()  # at most CLIENT_MAX_SIZE (aiohttp refuses more: 413)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refusal(400, f"body: not UTF-8 text (byte {exc.start})", ["body"]) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, fields = explain(exc)
        raise _Refusal(400, message, fields) from None


def _parts(request: web.Request) -> _Parts:
    return request.app[PARTS]


async def status(request: web.Request) -> web.Response:
    return _json(_parts(request).view.status())


async def prometheus(request: web.Request) -> web.Response:
    body = _parts(request).metrics()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def _runs_of(records: Store) -> list[dict[str, Any]]:
    return [run_summary(r) for r in records.runs()]


async def list_runs(request: web.Request) -> web.Response:
    return _json(await _parts(request).records.read(_runs_of))


def _detail_of(records: Store, *, key: str) -> dict[str, Any] | None:
    run = records.run(key)
    return None if run is None else run_detail(records, run)


async def show_run(request: web.Request) -> web.Response:
    key = request.match_info["run"]
    detail = await _parts(request).records.read(partial(_detail_of, key=key))
    if detail is None:
        raise _Refusal(404, f"no run {key!r} (give a run id, a unique prefix or a batch id)")
    return _json(detail)


async def list_lines(request: web.Request) -> web.Response:
    return _json(_parts(request).view.line_status())


async def start_run(request: web.Request) -> web.Response:
    body = await _body(request, RunStartRequest)
    run = await _parts(request).control.start_run(
        body.batch_id, body.protocol, body.version, body.operator, line=body.line
    )
    return _json(run_summary(run), status=201)


async def phase(request: web.Request) -> web.Response:
    """POST /api/runs/{run}/phase, or /api/run/phase: the run of a site with one line."""
    body = await _body(request, PhaseRequest)
    change = await _parts(request).control.advance_phase(
        body.phase, body.operator, body.reason, run=request.match_info.get("run")
    )
    return _json(
        {
            "run": change.run_id,
            "phase": change.phase,
            "previous": change.previous,
            "in_order": change.in_order,
        }
    )


async def stop_run(request: web.Request) -> web.Response:
    """POST /api/runs/{run}/stop, or /api/run/stop: the run of a site with one line."""
    body = await _body(request, RunStopRequest)
    run = await _parts(request).control.stop_run(
        body.operator, abort=body.abort, reason=body.reason, run=request.match_info.get("run")
    )
    return _json(run_summary(run))


async def site_status(request: web.Request) -> web.Response:
    body = await _body(request, SiteStatusRequest)
    await _parts(request).control.set_site_status(body.status, body.operator, body.reason)
    return _json({"status": body.status.value})


def make_app(
    *,
    control: RunControl,
    view: StatusView,
    store_path: Path,
    metrics: Callable[[], bytes],
    authority: Authority,
) -> web.Application:
    """The API's application: control and view as given, reads from the store at
    `store_path` (its own read-only connection), `metrics` renders /metrics."""
    app = web.Application(middlewares=[_answers, _same_origin], client_max_size=CLIENT_MAX_SIZE)
    records = _Records(store_path)
    app[PARTS] = _Parts(control, view, records, metrics, authority)

    async def close_records(_: web.Application) -> None:
        await asyncio.to_thread(records.close)

    app.on_cleanup.append(close_records)
    app.add_routes(
        [
            web.get("/api/status", status),
            web.get("/metrics", prometheus),
            web.get("/api/lines", list_lines),
            web.get("/api/runs", list_runs),
            web.get("/api/runs/{run}", show_run),
            web.post("/api/runs", start_run),
            web.post("/api/runs/{run}/phase", phase),
            web.post("/api/runs/{run}/stop", stop_run),
            # the run of a site with one line, as before lines
            web.post("/api/run/phase", phase),
            web.post("/api/run/stop", stop_run),
            web.post("/api/site/status", site_status),
        ]
    )
    return app


async def serve_api(
    api: ApiSection,
    *,
    control: RunControl,
    view: StatusView,
    store_path: Path,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve the API on `api.listen` until cancelled; `ready` is set once the socket is bound.
    The store at `store_path` is open (and migrated) already."""
    # Listening on every interface, the machine is also addressed by its host name (the
    # kernel's, no DNS lookup); any other name needs api.listen to say it.
    app = make_app(
        control=control,
        view=view,
        store_path=store_path,
        metrics=lambda: render_metrics(view.status()),
        authority=Authority.of_listen(api.listen, [socket.gethostname()]),
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, api.host, api.port)
        try:
            await site.start()
        except OSError as exc:
            raise PocdError(f"the API cannot listen on {api.listen}: {exc.strerror}") from None
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
