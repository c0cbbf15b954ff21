"""The control API over HTTP (aiohttp): logins, run start, phase, stop, site status, live
status, the records of runs, Prometheus metrics and the OpenAPI schema of it all.

Every endpoint is one `Route` of `ROUTES`: its method and path, the action of the
permission matrix it takes (pocd.access.roles), its body and answer models. The same table
makes the application and its OpenAPI schema (pocd.api.openapi), so the schema cannot drift
from what is served. Who is asking, and whether they may, is the guard's (pocd.api.guard):
every request but a login and the reads `api.public` opens comes from a named user's session,
a browser's cookie or the CLI's bearer token, and the identity in the records is the
session's, never a field of the body.

Listens on the site's `api.listen` (127.0.0.1 by default) and, with `api.tls_listen`, over TLS
too. A request's Host must name this API (pocd.api.authority), a browser's Origin must be this
API's, and a body must be `application/json` in UTF-8 (a page of another site cannot send that
without a CORS preflight, which is not answered). Bodies are typed models (pocd.api.bodies).

Every answer is valid JSON (a non-finite number is null), errors as {"error": ...}: 400 a
malformed request, naming the field; 401 no session (or an ended one), a wrong login; 403 a
role that does not allow the action, a foreign Origin, a missing CSRF token, a wrong signature
password; 413 a body over CLIENT_MAX_SIZE; 415 a body that is not JSON in UTF-8; 409 an
operation run control refused; 428 an operation that needs an electronic signature; 429 a
locked account; 503 one not completed (the store did not commit in time). Never a 500 for
anything a client sent.

It depends on run control, the status view, a recorder of audit entries and a read-only
store through small interfaces, never on the daemon. One module of some 800 lines: the route
table, its handlers and the middleware that turns each outcome into an answer are read
together; the bodies, answers, authority and OpenAPI document are modules of their own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from aiohttp import hdrs, web
from pydantic import BaseModel, ValidationError

from pocd.access import Action, SessionKind
from pocd.alarms import AlarmCommand, AlarmView, view_json
from pocd.api import answers
from pocd.api.authority import Authority
from pocd.api.bodies import (
    AlarmRequest,
    DeviationAssessRequest,
    DeviationCloseRequest,
    LoginRequest,
    PhaseRequest,
    RunStartRequest,
    RunStopRequest,
    SiteStatusRequest,
    explain,
)
from pocd.api.guard import Guard, Principal, Recorder, Refusal
from pocd.api.metrics import render_metrics
from pocd.api.openapi import openapi_document
from pocd.api.reader import StoreReader
from pocd.configtypes import StrictModel
from pocd.errors import PocdError, RunError, SignatureRequired
from pocd.model import NS, DeviationChange, DeviationState, PhaseChange, Run, SiteStatus, now_ns
from pocd.records import json_bytes, run_detail, run_summary
from pocd.signatures import Signer
from pocd.store import Store
from pocd.store.recordtypes import iso

if TYPE_CHECKING:
    from pocd.settings import AccessSection, ApiSection

__all__ = [
    "CLIENT_MAX_SIZE",
    "COOKIE",
    "CSRF_HEADER",
    "ROUTES",
    "Authority",
    "Route",
    "RunControl",
    "StatusView",
    "make_app",
    "serve_api",
]

log = structlog.get_logger("pocd.api")

# The largest body read. Every valid body is far smaller (a few identifiers of at most 128
# characters, a reason of at most 2000 and a password of at most 1024, even escaped as \uXXXX
# pairs); a bigger one is refused before it is parsed.
CLIENT_MAX_SIZE = 64 * 1024
COOKIE = "pocd_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
_UTF8 = frozenset({"utf-8", "utf8"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = TypeVar("Body", bound=StrictModel)


class RunControl(Protocol):
    """Start runs on lines, advance and stop them by id, change the site's status; each
    answers once committed. `line` or `run` None: the site's only line, or its run. A
    critical operation takes the actor's `signature`. Raises SignatureRequired for one that
    needs it, RunError for an operation refused, another PocdError for one not completed."""

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
        self,
        phase: str,
        operator: str,
        reason: str = "",
        *,
        run: str | None = None,
        signature: Signer | None = None,
    ) -> PhaseChange: ...

    async def stop_run(
        self,
        operator: str,
        *,
        abort: bool = False,
        reason: str = "",
        run: str | None = None,
        signature: Signer | None = None,
    ) -> Run: ...

    async def set_site_status(
        self, status: SiteStatus, operator: str, reason: str, *, signature: Signer | None = None
    ) -> None: ...

    async def alarm_command(
        self,
        command: AlarmCommand,
        key: tuple[str, str, str],
        actor: str,
        comment: str = "",
        *,
        until: int | None = None,
        signature: Signer | None = None,
    ) -> AlarmView: ...

    async def deviation_change(
        self,
        deviation_id: str,
        state: DeviationState,
        actor: str,
        note: str,
        *,
        disposition: str = "",
        root_cause: str = "",
        signature: Signer | None = None,
    ) -> DeviationChange: ...


class StatusView(Protocol):
    """The live state of the site: lines, runs, points, incidents, sinks (JSON-ready)."""

    def status(self) -> dict[str, Any]: ...

    def line_status(self) -> list[dict[str, Any]]:
        """Each line with its run, or the standby protocol watching it."""
        ...

    def alarms(self) -> dict[str, Any]:
        """Every alarm condition in its state, and each line's alarm KPIs."""
        ...

    def health(self) -> list[str]:
        """What keeps the daemon from being healthy (a store writer that has not committed
        recently, a sink far behind), as sentences; empty when healthy."""
        ...


@dataclass(frozen=True, slots=True)
class _Parts:
    control: RunControl
    view: StatusView
    records: StoreReader
    guard: Guard
    metrics: Callable[[], bytes]
    authorities: tuple[Authority, ...]
    public: frozenset[str]
    openapi: dict[str, Any]


PARTS: web.AppKey[_Parts] = web.AppKey("parts")


@dataclass(frozen=True, slots=True)
class Call:
    """A request as a route's handler gets it: who asks (None on an open route), its body,
    and the signer, where the body carried a signature that checked out."""

    request: web.Request
    principal: Principal | None
    body: Any
    signer: Signer | None = None

    @property
    def parts(self) -> _Parts:
        return self.request.app[PARTS]

    @property
    def login(self) -> str:
        assert self.principal is not None
        return self.principal.login


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint. `action` is what the permission matrix is asked (of the body, where it
    depends on it), None for a login, which needs no session; `public` names the `api.public`
    entry that opens it to callers without one; `signs` the action a body's signature signs.
    `body` and `answer` are the models the OpenAPI schema is made of."""

    method: str
    path: str
    handler: Callable[[Call], Awaitable[web.StreamResponse]]
    summary: str
    action: Action | Callable[[Any], Action] | None
    body: type[StrictModel] | None = None
    answer: type[BaseModel] | None = None
    status: int = 200
    public: str | None = None
    signs: Callable[[Any], Action] | None = None
    content_type: str = "application/json"

    def action_of(self, body: Any) -> Action | None:
        if self.action is None or isinstance(self.action, Action):
            return self.action
        return self.action(body)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json_bytes(data),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _error(
    status: int,
    message: str,
    fields: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if fields is not None:
        body["fields"] = fields
    return _json(body, status, headers)


@web.middleware
async def _answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every outcome as a JSON answer: refusals, run control's errors, aiohttp's own (404,
    405, 413) and, should a handler have a bug, a 500 that says so."""
    try:
        return await handler(request)
    except Refusal as exc:
        return _error(exc.status, exc.message, exc.fields, exc.headers)
    except SignatureRequired as exc:
        return _error(428, str(exc), ["signature"])
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
    authorities = request.app[PARTS].authorities
    host = request.headers.get(hdrs.HOST)
    if not any(a.accepts_host(host) for a in authorities):
        said = "no Host header" if host is None else f"Host {host!r}"
        listens = " or ".join(a.listen for a in authorities)
        raise Refusal(
            400,
            f"{said} does not name this API (it listens on {listens}); "
            "requests are served only to clients that address it as it listens",
            ["Host"],
        )
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not any(a.accepts_origin(origin) for a in authorities):
        raise Refusal(
            403, f"a request from the web page {origin!r} is refused: it is not this API's"
        )
    routed = request.match_info.http_exception is None  # else a 404 or 405 says more
    # A POST without a body (a logout) has nothing to type; one a page sent carries no
    # session a page can give it (the cookie needs its CSRF header, which needs a preflight).
    if routed and request.method not in _SAFE_METHODS and request.body_exists:
        if request.content_type != "application/json":
            raise Refusal(
                415,
                f"Content-Type must be application/json (got {request.content_type})",
                ["Content-Type"],
            )
        charset = request.charset
        if charset is not None and charset.lower() not in _UTF8:
            raise Refusal(415, f"a JSON body is UTF-8, not charset {charset!r}", ["Content-Type"])
    return await handler(request)


async def _body(request: web.Request, model: type[Body]) -> Body:
    raw = await request.read()  # at most CLIENT_MAX_SIZE (aiohttp refuses more: 413)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"body: not UTF-8 text (byte {exc.start})", ["body"]) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, fields = explain(exc)
        raise Refusal(400, message, fields) from None


async def _principal(request: web.Request, guard: Guard) -> Principal:
    """The session of a request: its bearer token (the CLI), else its cookie (a browser,
    whose state-changing requests also carry the CSRF token)."""
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refusal(
                401, "Authorization: only `Bearer <token>` is accepted", ["Authorization"]
            )
        return await guard.principal(token.strip(), "bearer", csrf=False)
    csrf: str | bool | None = (
        False if request.method in _SAFE_METHODS else request.headers.get(CSRF_HEADER)
    )
    return await guard.principal(request.cookies.get(COOKIE), "cookie", csrf=csrf)


def _endpoint(route: Route) -> Handler:
    """The handler of a route: the session (unless the route is open), the body, the
    permission check, the signature check, then the route's own handler."""

    async def handle(request: web.Request) -> web.StreamResponse:
        parts = request.app[PARTS]
        open_ = route.action is None or (route.public is not None and route.public in parts.public)
        principal = None if open_ else await _principal(request, parts.guard)
        body = await _body(request, route.body) if route.body is not None else None
        signer = None
        if principal is not None:
            action = route.action_of(body)
            assert action is not None
            await parts.guard.authorize(principal, action, request.path)
            signature = getattr(body, "signature", None)
            if signature is not None and route.signs is not None:
                signed = route.signs(body)
                signer = await parts.guard.sign(principal, signed, signature, _address(request))
        return await route.handler(Call(request, principal, body, signer))

    handle.__name__ = route.handler.__name__
    return handle


def _address(request: web.Request) -> str:
    return request.remote or ""


# --- the handlers ---------------------------------------------------------------------------


def _session_answer(parts: _Parts, principal: Principal) -> dict[str, Any]:
    session, user = principal.session, principal.user
    return {
        "login": user.login,
        "name": user.name,
        "roles": list(user.roles),
        "client": session.kind.value,
        "session": session.id,
        "expires": iso(session.created + int(parts.guard.access.session_max * NS)),
        "idle_timeout_s": parts.guard.access.session_idle,
    }


async def login(call: Call) -> web.StreamResponse:
    body: LoginRequest = call.body
    parts, request = call.parts, call.request
    kind = SessionKind(body.client)
    token, session, user = await parts.guard.login(
        body.login, body.password.get_secret_value(), kind, _address(request)
    )
    principal = Principal(
        user, session, token, "cookie" if kind is SessionKind.BROWSER else "bearer"
    )
    answer = _session_answer(parts, principal)
    if kind is SessionKind.BROWSER:
        response = _json({**answer, "csrf": session.csrf})
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
            max_age=int(parts.guard.access.session_max),
        )
        return response
    return _json({**answer, "token": token})


async def logout(call: Call) -> web.StreamResponse:
    assert call.principal is not None
    await call.parts.guard.logout(call.principal)
    response = _json({"logged_out": call.login})
    if call.principal.via == "cookie":
        response.del_cookie(COOKIE, path="/")
    return response


async def session(call: Call) -> web.StreamResponse:
    assert call.principal is not None
    return _json(_session_answer(call.parts, call.principal))


async def health(call: Call) -> web.StreamResponse:
    return _json({"status": "ok"})


async def probe(call: Call) -> web.StreamResponse:
    problems = call.parts.view.health()
    if problems:
        return _error(503, "unhealthy: " + "; ".join(problems))
    return _json({"status": "ok"})


async def openapi(call: Call) -> web.StreamResponse:
    return _json(call.parts.openapi)


async def status(call: Call) -> web.StreamResponse:
    return _json(call.parts.view.status())


async def prometheus(call: Call) -> web.StreamResponse:
    return web.Response(body=call.parts.metrics(), content_type="text/plain", charset="utf-8")


def _runs_of(records: Store) -> list[dict[str, Any]]:
    return [run_summary(r) for r in records.runs()]


async def list_runs(call: Call) -> web.StreamResponse:
    return _json(await call.parts.records.read(_runs_of))


def _detail_of(records: Store, *, key: str) -> dict[str, Any] | None:
    run = records.run(key)
    return None if run is None else run_detail(records, run)


async def show_run(call: Call) -> web.StreamResponse:
    key = call.request.match_info["run"]
    detail = await call.parts.records.read(partial(_detail_of, key=key))
    if detail is None:
        raise Refusal(404, f"no run {key!r} (give a run id, a unique prefix or a batch id)")
    return _json(detail)


async def list_lines(call: Call) -> web.StreamResponse:
    return _json(call.parts.view.line_status())


async def start_run(call: Call) -> web.StreamResponse:
    body: RunStartRequest = call.body
    run = await call.parts.control.start_run(
        body.batch_id, body.protocol, body.version, call.login, line=body.line
    )
    return _json(run_summary(run), status=201)


async def phase(call: Call) -> web.StreamResponse:
    """POST /api/runs/{run}/phase, or /api/run/phase: the run of a site with one line."""
    body: PhaseRequest = call.body
    change = await call.parts.control.advance_phase(
        body.phase,
        call.login,
        body.reason,
        run=call.request.match_info.get("run"),
        signature=call.signer,
    )
    return _json(
        {
            "run": change.run_id,
            "phase": change.phase,
            "previous": change.previous,
            "in_order": change.in_order,
        }
    )


async def stop_run(call: Call) -> web.StreamResponse:
    """POST /api/runs/{run}/stop, or /api/run/stop: the run of a site with one line."""
    body: RunStopRequest = call.body
    run = await call.parts.control.stop_run(
        call.login,
        abort=body.abort,
        reason=body.reason,
        run=call.request.match_info.get("run"),
        signature=call.signer,
    )
    return _json(run_summary(run))


async def site_status(call: Call) -> web.StreamResponse:
    body: SiteStatusRequest = call.body
    await call.parts.control.set_site_status(
        body.status, call.login, body.reason, signature=call.signer
    )
    return _json({"status": body.status.value})


async def list_alarms(call: Call) -> web.StreamResponse:
    return _json(call.parts.view.alarms())


# Each command, the action it takes, and the action its signature signs (None: not signed).
_ALARM_COMMANDS: dict[AlarmCommand, tuple[Action, Action | None]] = {
    "acknowledge": (Action.ALARM_ACK, None),
    "reset": (Action.ALARM_ACK, None),
    "shelve": (Action.ALARM_SHELVE, Action.ALARM_SHELVE_CRITICAL),  # a critical alarm's
    "unshelve": (Action.ALARM_SHELVE, None),
    "remove": (Action.ALARM_OUT_OF_SERVICE, Action.ALARM_OUT_OF_SERVICE),
    "restore": (Action.ALARM_OUT_OF_SERVICE, Action.ALARM_OUT_OF_SERVICE),
}


def _alarm_handler(command: AlarmCommand) -> Callable[[Call], Awaitable[web.StreamResponse]]:
    async def handle(call: Call) -> web.StreamResponse:
        body: AlarmRequest = call.body
        until = None if body.minutes is None else now_ns() + int(body.minutes * 60 * NS)
        view = await call.parts.control.alarm_command(
            command,
            (body.line or "", body.source, body.kind),
            call.login,
            body.comment,
            until=until,
            signature=call.signer,
        )
        return _json(view_json(view))

    handle.__name__ = f"alarm_{command}"
    return handle


async def assess_deviation(call: Call) -> web.StreamResponse:
    body: DeviationAssessRequest = call.body
    change = await call.parts.control.deviation_change(
        call.request.match_info["deviation"], DeviationState.ASSESSED, call.login, body.note
    )
    return _deviation_json(change)


async def close_deviation(call: Call) -> web.StreamResponse:
    body: DeviationCloseRequest = call.body
    change = await call.parts.control.deviation_change(
        call.request.match_info["deviation"],
        DeviationState.CLOSED,
        call.login,
        body.reason,
        disposition=body.disposition,
        root_cause=body.root_cause,
        signature=call.signer,
    )
    return _deviation_json(change)


def _deviation_json(change: DeviationChange) -> web.StreamResponse:
    return _json(
        {
            "deviation": change.deviation_id,
            "state": change.state.value,
            "actor": change.actor,
            "t": iso(change.t),
        }
    )


def _constant(action: Action, _: object) -> Action:
    return action


def _stop_action(body: RunStopRequest) -> Action:
    return Action.RUN_ABORT if body.abort else Action.RUN_STOP


def _phase_signs(_: PhaseRequest) -> Action:
    return Action.RUN_PHASE_OVERRIDE


def _site_signs(_: SiteStatusRequest) -> Action:
    return Action.SITE_STATUS


def _route(
    method: str, path: str, handler: Callable[[Call], Awaitable[web.StreamResponse]], summary: str
) -> Callable[..., Route]:
    return partial(Route, method, path, handler, summary)


A = Action
ROUTES: tuple[Route, ...] = (
    _route("POST", "/api/login", login, "Log in: a session")(
        None, LoginRequest, answers.SessionAnswer
    ),
    _route("POST", "/api/logout", logout, "Log out: end this session")(
        A.SESSION_READ, answer=answers.LogoutAnswer
    ),
    _route("GET", "/api/session", session, "Who is logged in")(
        A.SESSION_READ, answer=answers.SessionAnswer
    ),
    _route("GET", "/api/health", health, "Whether the API answers")(
        A.STATUS_READ, answer=answers.HealthAnswer, public="health"
    ),
    _route("GET", "/health", probe, "503 while the store writer or a sink is stuck or behind")(
        A.STATUS_READ, answer=answers.HealthAnswer, public="health"
    ),
    _route("GET", "/api/openapi.json", openapi, "This schema")(
        A.STATUS_READ, answer=answers.ObjectAnswer, public="openapi"
    ),
    _route("GET", "/metrics", prometheus, "Prometheus metrics")(
        A.STATUS_READ, public="metrics", content_type="text/plain"
    ),
    _route("GET", "/api/status", status, "The live status of the site")(
        A.STATUS_READ, answer=answers.ObjectAnswer, public="status"
    ),
    _route("GET", "/api/lines", list_lines, "The lines and what each is doing")(
        A.LINES_READ, answer=answers.LinesAnswer, public="lines"
    ),
    _route("GET", "/api/runs", list_runs, "Every run")(
        A.RUNS_READ, answer=answers.RunsAnswer, public="runs"
    ),
    _route("GET", "/api/runs/{run}", show_run, "A run with its records and signatures")(
        A.RUNS_READ, answer=answers.ObjectAnswer, public="runs"
    ),
    _route("POST", "/api/runs", start_run, "Start a run")(
        A.RUN_START, RunStartRequest, answers.RunAnswer, status=201
    ),
    *(
        _route("POST", path, phase, "Enter a phase (out of protocol order: signed)")(
            A.RUN_PHASE, PhaseRequest, answers.PhaseAnswer, signs=_phase_signs
        )
        for path in ("/api/runs/{run}/phase", "/api/run/phase")  # the second: the only line's
    ),
    *(
        _route("POST", path, stop_run, "Complete, or abort (signed), a run")(
            _stop_action, RunStopRequest, answers.RunAnswer, signs=_stop_action
        )
        for path in ("/api/runs/{run}/stop", "/api/run/stop")
    ),
    _route("POST", "/api/site/status", site_status, "Suspend, cease or reactivate the site")(
        A.SITE_STATUS, SiteStatusRequest, answers.SiteStatusAnswer, signs=_site_signs
    ),
    _route("GET", "/api/alarms", list_alarms, "Every alarm condition, and the alarm KPIs")(
        A.STATUS_READ, answer=answers.ObjectAnswer, public="status"
    ),
    *(
        _route("POST", f"/api/alarms/{command}", _alarm_handler(command), f"{command} an alarm")(
            action,
            AlarmRequest,
            answers.AlarmAnswer,
            signs=None if signed is None else partial(_constant, signed),
        )
        for command, (action, signed) in _ALARM_COMMANDS.items()
    ),
    _route("POST", "/api/deviations/{deviation}/assess", assess_deviation, "Assess a deviation")(
        A.DEVIATION_ASSESS, DeviationAssessRequest, answers.DeviationAnswer
    ),
    _route("POST", "/api/deviations/{deviation}/close", close_deviation, "Close a deviation")(
        A.DEVIATION_CLOSE,
        DeviationCloseRequest,
        answers.DeviationAnswer,
        signs=partial(_constant, A.DEVIATION_CLOSE),
    ),
)


def make_app(
    *,
    control: RunControl,
    view: StatusView,
    store_path: Path,
    metrics: Callable[[], bytes],
    authorities: Collection[Authority],
    access: AccessSection,
    recorder: Recorder,
    public: Collection[str] = ("metrics", "health", "openapi"),
) -> web.Application:
    """The API's application: control and view as given, reads from the store at
    `store_path` (its own read-only connection), `metrics` renders /metrics, the guard's
    audit entries go to `recorder`, and the reads named in `public` need no login."""
    app = web.Application(middlewares=[_answers, _same_origin], client_max_size=CLIENT_MAX_SIZE)
    records = StoreReader(store_path)
    guard = Guard(access, reader=records, recorder=recorder)
    public_set = frozenset(public)
    app[PARTS] = _Parts(
        control,
        view,
        records,
        guard,
        metrics,
        tuple(authorities),
        public_set,
        openapi_document(ROUTES, public_set),
    )

    async def close(_: web.Application) -> None:
        await asyncio.to_thread(records.close)
        await asyncio.to_thread(guard.close)

    app.on_cleanup.append(close)
    app.add_routes([web.route(r.method, r.path, _endpoint(r)) for r in ROUTES])
    return app


async def serve_api(
    api: ApiSection,
    access: AccessSection,
    *,
    control: RunControl,
    view: StatusView,
    recorder: Recorder,
    store_path: Path,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve the API on `api.listen` (and `api.tls_listen`) until cancelled; `ready` is set
    once the sockets are bound. The store at `store_path` is open (and migrated) already."""
    # Listening on every interface, the machine is also addressed by its host name (the
    # kernel's, no DNS lookup); any other name needs api.listen to say it.
    names = [socket.gethostname()]
    listens = [api.listen, *([api.tls_listen] if api.tls_listen else [])]
    try:  # before the app opens the store
        tls = api.tls_context()
    except ValueError as exc:
        raise PocdError(str(exc)) from None
    app = make_app(
        control=control,
        view=view,
        store_path=store_path,
        metrics=lambda: render_metrics(view.status()),
        authorities=[Authority.of_listen(listen, names) for listen in listens],
        access=access,
        recorder=recorder,
        public=api.public,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        sites = [web.TCPSite(runner, api.host, api.port)]
        if api.tls_listen is not None:
            host, _, port = api.tls_listen.rpartition(":")
            sites.append(web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=tls))
        for site, listen in zip(sites, listens, strict=True):
            try:
                await site.start()
            except OSError as exc:
                raise PocdError(f"the API cannot listen on {listen}: {exc.strerror}") from None
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
