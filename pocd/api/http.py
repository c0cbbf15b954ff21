"""The control API over HTTP (aiohttp): run start, phase, stop, site status, and live status.

Listens on the site's `api.listen` (127.0.0.1 by default). JSON in, JSON out; a refused
operation is 409 with {"error": ...}, a malformed request 400. Reads of the record (runs,
excursions) go to the store; control goes to the daemon, which answers after committing.
Named users and roles arrive with the console; until then the operator is named in the body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from pocd.api.metrics import render_metrics
from pocd.errors import PocdError, RunError
from pocd.model import SiteStatus
from pocd.records import run_detail, run_summary

if TYPE_CHECKING:
    from pocd.daemon import Daemon

__all__ = ["make_app", "serve_api"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


async def _body(request: web.Request, *required: str) -> dict[str, str]:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "body is not JSON"})) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}))
    missing = [k for k in required if not str(body.get(k) or "").strip()]
    if missing:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"missing: {', '.join(missing)}"}))
    return {k: str(v) for k, v in body.items() if v is not None}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RunError as exc:
        return web.json_response({"error": str(exc)}, status=409)
    except PocdError as exc:  # the store has not committed in time (CommitTimeout)
        return web.json_response({"error": str(exc)}, status=503)


async def status(request: web.Request) -> web.Response:
    return web.json_response(_daemon(request).status())


async def metrics(request: web.Request) -> web.Response:
    body = render_metrics(_daemon(request))
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def list_runs(request: web.Request) -> web.Response:
    store = _daemon(request).store
    assert store is not None
    return web.json_response([run_summary(r) for r in store.runs()])


async def show_run(request: web.Request) -> web.Response:
    store = _daemon(request).store
    assert store is not None
    run = store.run(request.match_info["run"])
    if run is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such run"}))
    return web.json_response(run_detail(store, run))


async def start_run(request: web.Request) -> web.Response:
    body = await _body(request, "batch_id", "protocol", "operator")
    run = await _daemon(request).start_run(
        body["batch_id"], body["protocol"], body.get("version"), body["operator"]
    )
    return web.json_response(run_summary(run), status=201)


async def phase(request: web.Request) -> web.Response:
    body = await _body(request, "phase", "operator")
    change = await _daemon(request).advance_phase(
        body["phase"], body["operator"], body.get("reason", "")
    )
    return web.json_response(
        {"phase": change.phase, "previous": change.previous, "in_order": change.in_order}
    )


async def stop_run(request: web.Request) -> web.Response:
    body = await _body(request, "operator")
    abort = body.get("abort", "").lower() in ("1", "true", "yes")
    run = await _daemon(request).stop_run(
        body["operator"], abort=abort, reason=body.get("reason", "")
    )
    return web.json_response(run_summary(run))


async def site_status(request: web.Request) -> web.Response:
    body = await _body(request, "status", "operator", "reason")
    try:
        wanted = SiteStatus(body["status"])
    except ValueError:
        known = ", ".join(s.value for s in SiteStatus)
        raise web.HTTPBadRequest(text=json.dumps({"error": f"status is one of {known}"})) from None
    await _daemon(request).set_site_status(wanted, body["operator"], body["reason"])
    return web.json_response({"status": wanted.value})


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[DAEMON] = daemon
    app.add_routes(
        [
            web.get("/api/status", status),
            web.get("/metrics", metrics),
            web.get("/api/runs", list_runs),
            web.get("/api/runs/{run}", show_run),
            web.post("/api/runs", start_run),
            web.post("/api/run/phase", phase),
            web.post("/api/run/stop", stop_run),
            web.post("/api/site/status", site_status),
        ]
    )
    return app


async def serve_api(daemon: Daemon) -> None:
    """Serve until cancelled."""
    api = daemon.site.config.api
    runner = web.AppRunner(make_app(daemon), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, api.host, api.port)
        try:
            await site.start()
        except OSError as exc:
            raise PocdError(f"the API cannot listen on {api.listen}: {exc.strerror}") from None
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
