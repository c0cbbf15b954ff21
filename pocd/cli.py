"""The `pocd` command line: check [--connect], serve, status, run, site, sink, user, login,
logout, demo.

One module of some 950 lines: one argparse tree, each command a small handler; what a command
needs beyond that lives in its own module, as `pocd sink` (pocd.sinks.resend), `pocd user`
(pocd.users) and the saved sessions of `pocd login` (pocd.tokens) do.

Exit codes: 0 success, 1 an operation was refused or failed, 2 invalid input (config, usage).
Control commands (run start|phase|stop, site set, status, line list) talk to the running
daemon's API as the user `pocd login` logged in (its saved bearer token); `run list|show`,
`site status` and `user ...` use the store directly, so they work when it is stopped.

Passwords are asked on the terminal (a new one twice). Without a terminal (a script, a pipe)
each is read as one line of stdin, in the order they would be asked: a new user's password
first, then the admin's (`--as`); a signature's password where the operation needs one.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocd import tokens
from pocd.access import SIGNED, Action, Meaning, Role
from pocd.errors import ConfigError, ConfigProblem, PocdError
from pocd.records import json_bytes, readable
from pocd.settings import Site, check_files, load_site

if TYPE_CHECKING:
    from pocd.sinks import Sink
    from pocd.store import Store
    from pocd.users import Admin

__all__ = ["main", "run_text", "status_text"]


class CommandError(PocdError):
    """A command could not do what was asked; the message says why. Exit 1."""


def _site(args: argparse.Namespace) -> Site:
    return load_site(args.config)


def _check(args: argparse.Namespace) -> int:
    warnings: list[ConfigProblem] = []
    problems = check_files(args.files, warnings)
    for problem in problems:
        print(problem, file=sys.stderr)
    for warning in warnings:  # the config works: they do not fail the check
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        return 2
    for path in args.files:
        print(f"{path}: ok")
    if args.connect:
        return asyncio.run(_connect(_sinks_of(args.files)))
    return 0


def _sinks_of(paths: Sequence[str]) -> list[tuple[str, Sink]]:
    """(file, sink) of every sink of the site configs among `paths` (all already checked)."""
    import tomllib

    from pocd.settings import file_kind
    from pocd.sinks import build_sinks

    found: list[tuple[str, Sink]] = []
    for path in paths:
        with open(path, "rb") as fh:
            if file_kind(tomllib.load(fh)) != "site":
                continue
        site = load_site(path)
        for settings in site.config.sinks.influxdb:
            if not settings.enabled:
                print(f"{path}: sink {settings.name}: disabled (enabled = false), not checked")
        sinks = build_sinks(site)
        if not sinks and not site.config.sinks.influxdb:
            print(f"{path}: no sinks to connect to")
        found += [(path, sink) for sink in sinks]
    return found


async def _connect(sinks: Sequence[tuple[str, Sink]]) -> int:
    """Run each sink's healthcheck: 1 if one fails, with the reason on stderr."""
    from pocd.sinks import SinkError

    failed = False
    for path, sink in sinks:
        try:
            detail = await sink.healthcheck()
        except SinkError as exc:
            failed = True
            print(f"{path}: sink {sink.name}: {exc}", file=sys.stderr)
        else:
            print(f"{path}: sink {sink.name}: ok: {detail}")
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from pocd.daemon import Daemon
    from pocd.logs import configure_logging

    site = _site(args)
    configure_logging(args.log_level)
    try:
        asyncio.run(Daemon(site).serve())
    except ExceptionGroup as group:  # a fatal error in one of the daemon's tasks
        fatal = group.subgroup(PocdError)
        if fatal is None:
            raise
        raise CommandError("; ".join(str(e) for e in fatal.exceptions)) from None
    return 0


class _Refused(Exception):
    """The daemon answered an HTTP error: its status and its {"error": ...} message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _call(
    site: Site, method: str, path: str, body: dict[str, Any] | None, token: str | None
) -> Any:
    """One request to the daemon's API: its JSON answer, _Refused for an HTTP error, and
    CommandError when the daemon does not answer."""
    api = site.config.api
    url = f"http://{api.listen}{path}"
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise _Refused(exc.code, str(exc.reason), str(message)) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise CommandError(
            f"the daemon does not answer at {url} ({getattr(exc, 'reason', exc)}): "
            f"is `pocd serve -c {site.path}` running?"
        ) from None


def _api(
    site: Site,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    meaning: str = Meaning.PERFORMED.value,
) -> Any:
    """A request as the user logged in at this API (`pocd login`). An operation the daemon
    says needs a signature (428) is sent again once, signed with `meaning`."""
    saved = tokens.find(site.config.api.listen)
    token = None if saved is None else saved.token
    try:
        return _call(site, method, path, body, token)
    except _Refused as exc:
        if exc.status != 428 or body is None or "signature" in body:
            raise _refusal(site, exc, saved) from None
        signed = {**body, "signature": _signature(site, meaning, exc.message)}
    try:
        return _call(site, method, path, signed, token)
    except _Refused as exc:
        raise _refusal(site, exc, saved) from None


def _refusal(site: Site, exc: _Refused, saved: tokens.SavedToken | None) -> CommandError:
    if exc.status == 401:
        if saved is None:
            return _not_logged_in(site)
        return CommandError(
            f"the daemon refused the session of {saved.login} ({exc.message}): "
            f"run `pocd login -c {site.path}`"
        )
    if exc.status in (403, 409, 428, 429):
        return CommandError(f"refused: {exc.message}")
    return CommandError(f"the daemon answered {exc.status} {exc.reason}: {exc.message}")


def _not_logged_in(site: Site) -> CommandError:
    return CommandError(
        f"not logged in at {site.config.api.listen}: run `pocd login -c {site.path}`"
    )


def _secret(prompt: str, *, new: bool = False) -> str:
    """A password: asked on the terminal (a `new` one twice, as it cannot be seen), else the
    next line of stdin, as scripts give them."""
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        secret = getpass.getpass(f"{prompt}: ")
        if new and getpass.getpass("the same again: ") != secret:
            raise CommandError("the two passwords differ: nothing was changed")
        return secret
    line = stdin.readline() if stdin is not None else ""
    if not line:
        raise CommandError(
            f"{prompt}: stdin has no line for it (without a terminal, each password is read "
            "as one line of stdin)"
        )
    return line.removesuffix("\n").removesuffix("\r")


def _signature(site: Site, meaning: str, why: str) -> dict[str, str]:
    """The electronic signature of the user logged in at this API: their password, asked
    again, with what it means (`why` says what it signs)."""
    saved = tokens.find(site.config.api.listen)
    if saved is None:
        raise _not_logged_in(site)
    if sys.stdin is not None and sys.stdin.isatty():
        print(why, file=sys.stderr)
    try:
        password = _secret(f"the password of {saved.login}, signing as {meaning}")
    except CommandError as exc:
        raise CommandError(f"{why}; {exc}") from None
    return {"password": password, "meaning": meaning}


def _print(data: Any, as_json: bool, text: str) -> None:
    """`--json`: the full values, as valid JSON (no `Infinity`); else the text for people."""
    if as_json:
        print(json_bytes(data, indent=2).decode())
    else:
        print(text)


def status_text(data: dict[str, Any]) -> str:
    """`pocd status` for people: each line's run (or standby), then one line per point with
    its value rounded, or the text of a text point (such as a protocol name), its unit and its
    state (on each line it is in, where the site has several)."""
    several = len(data["lines"]) > 1
    if several:
        lines = [f"site {data['site']['id']}"]
        lines += [f"  {line_text(line)}" for line in data["lines"]]
    else:
        run = data["run"]
        doing = "no run" if run is None else f"run {run['id']} batch {run['batch_id']}"
        lines = [f"site {data['site']['id']}: {doing}" + (f" phase {run['phase']}" if run else "")]
    for p in data["points"]:
        text = p.get("text")
        value = text if text is not None else readable(p["value"])
        on = f" ({p['line'] or 'no line'})" if several else ""
        lines.append(
            f"  {p['device']}.{p['point']:<12} {value:>10} {p['unit']:<10} {p['state']}{on}"
        )
    return "\n".join(lines)


def line_text(line: dict[str, Any]) -> str:
    """One line of `pocd line list` and `pocd status`: what the line is doing."""
    run = line["run"]
    if run is not None:
        doing = f"run {run['id']} batch {run['batch_id']} {run['protocol']} phase {run['phase']}"
    else:
        doing = f"standby ({line['standby']['protocol'] if line['standby'] else 'unwatched'})"
    return f"line {line['id']}: {doing}"


def _line_list(args: argparse.Namespace) -> int:
    found = _api(_site(args), "GET", "/api/lines")
    text = "\n".join(f"{line_text(line)}  [{', '.join(line['devices'])}]" for line in found)
    _print(found, args.json, text or "no lines")
    return 0


def _status(args: argparse.Namespace) -> int:
    data = _api(_site(args), "GET", "/api/status")
    _print(data, args.json, status_text(data))
    return 0


def _run_start(args: argparse.Namespace) -> int:
    body = {
        "line": args.line,
        "batch_id": args.batch,
        "protocol": args.protocol,
        "version": args.version,
    }
    run = _api(_site(args), "POST", "/api/runs", body)
    print(
        f"run {run['id']} started: batch {run['batch_id']}, {run['protocol_id']} "
        f"{run['protocol_version']}"
    )
    return 0


def alarm_text(alarm: dict[str, Any]) -> str:
    """One alarm condition of `pocd alarm list`: where, what, its state and since when."""
    value = "" if alarm["value"] is None else f" value {readable(alarm['value'])}"
    limit = "" if alarm["limit"] is None else f" limit {readable(alarm['limit'])}"
    acked = f" acked by {alarm['acknowledged_by']}" if alarm["acknowledged_by"] else ""
    shelved = f" until {alarm['shelved_until']}" if alarm["shelved_until"] else ""
    return (
        f"{alarm['line']}  {alarm['source']:<12} {alarm['kind']:<12} {alarm['state']:<16} "
        f"{alarm['priority']:<8}{value}{limit}{acked}{shelved}  since {alarm['since'] or '-'}"
    )


def _alarm_list(args: argparse.Namespace) -> int:
    found = _api(_site(args), "GET", "/api/alarms")
    shown = [a for a in found["alarms"] if args.all or a["state"] not in ("normal", "suppressed")]
    text = "\n".join(alarm_text(a) for a in shown) or "no alarm (--all lists every condition)"
    _print(found, args.json, text)
    return 0


def _alarm_notifications(args: argparse.Namespace) -> int:
    """Who was told what, from the store: each queued notification and its attempts."""
    from pocd.store.recordtypes import iso

    with _open_store(_site(args)) as store:
        attempts: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for a in store.attempts():
            attempts.setdefault((a.notification, a.channel), []).append(
                {"t": iso(a.t), "outcome": a.outcome, "reason": a.reason}
            )
        found = []
        for _, q in store.notifications():
            item = json.loads(q.item)
            if args.alarm and args.alarm not in (item.get("alarm_id"), q.notification):
                continue
            tried = attempts.get((q.notification, q.channel), [])
            found.append(
                {
                    "notification": q.notification,
                    "channel": q.channel,
                    "queued": iso(q.t),
                    "route": q.route,
                    "tier": q.tier,
                    "via": q.via,
                    "type": item["type"],
                    "alarm_id": item.get("alarm_id"),
                    "what": item.get("transition") or f"flood summary of {item.get('count')}",
                    "delivered": any(a["outcome"] == "delivered" for a in tried),
                    "attempts": tried,
                }
            )
    text = "\n".join(
        f"{n['queued']}  {n['channel']:<12} tier {n['tier']} {n['what']:<12} "
        f"alarm {n['alarm_id'] or '-'}  "
        + ("delivered" if n["delivered"] else f"not delivered ({len(n['attempts'])} attempts)")
        + (f" (fallback of {n['via']})" if n["via"] else "")
        for n in found
    )
    _print(found, args.json, text or "no notifications")
    return 0


def _alarm_command(args: argparse.Namespace) -> int:
    """acknowledge, reset, shelve, unshelve, remove or restore one condition; the daemon asks
    for a signature where one is needed (428), which is then given."""
    body: dict[str, Any] = {
        "line": args.line,
        "source": args.source,
        "kind": args.kind,
        "comment": args.comment,
    }
    if getattr(args, "minutes", None) is not None:
        body["minutes"] = args.minutes
    meaning = getattr(args, "meaning", Meaning.PERFORMED.value)
    alarm = _api(_site(args), "POST", f"/api/alarms/{args.alarm_command}", body, meaning=meaning)
    print(alarm_text(alarm))
    return 0


def _deviation_command(args: argparse.Namespace) -> int:
    """assess an open deviation, or close an assessed one (signed)."""
    if args.deviation_command == "assess":
        body: dict[str, Any] = {"note": args.note}
    else:
        body = {
            "disposition": args.disposition,
            "reason": args.reason,
            "root_cause": args.root_cause,
        }
    path = f"/api/deviations/{urllib.parse.quote(args.id, safe='')}/{args.deviation_command}"
    meaning = getattr(args, "meaning", Meaning.PERFORMED.value)
    change = _api(_site(args), "POST", path, body, meaning=meaning)
    print(f"deviation {change['deviation']} is {change['state']} (by {change['actor']})")
    return 0


def _run_phase(args: argparse.Namespace) -> int:
    body = {"phase": args.phase, "reason": args.reason}
    change = _api(_site(args), "POST", _run_path(args, "phase"), body, meaning=args.meaning)
    order = "" if change["in_order"] else " (out of order: recorded as a deviation)"
    print(f"phase {change['previous']} -> {change['phase']}{order}")
    return 0


def _run_stop(args: argparse.Namespace) -> int:
    site = _site(args)
    body: dict[str, Any] = {"abort": args.abort, "reason": args.reason}
    if args.abort:
        if not args.reason.strip():
            print("pocd: run stop --abort needs --reason", file=sys.stderr)
            return 2
        why = "aborting a run needs your electronic signature"
        body["signature"] = _signature(site, args.meaning, why)
    run = _api(site, "POST", _run_path(args, "stop"), body)
    print(f"run {run['id']} {run['status']}")
    return 0


def _run_path(args: argparse.Namespace, action: str) -> str:
    """The run named by --run, or the run of a site with one line."""
    if args.run is None:
        return f"/api/run/{action}"
    return f"/api/runs/{urllib.parse.quote(args.run, safe='')}/{action}"


def _open_store(site: Site) -> Any:
    from pocd.store import Store

    if not site.store_path.exists():
        raise CommandError(f"no store yet at {site.store_path}: the daemon has not run")
    return Store(site.store_path, readonly=True)


def _run_list(args: argparse.Namespace) -> int:
    from pocd.records import run_summary

    with _open_store(_site(args)) as store:
        runs = [run_summary(r) for r in store.runs()]
    text = "\n".join(
        f"{r['id']}  {r['line']:<10} {r['batch_id']:<20} {r['protocol_id']} "
        f"{r['protocol_version']:<6} "
        f"{r['status']:<10} {r['started']}"
        for r in runs
    )
    _print(runs, args.json, text or "no runs")
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from pocd.records import run_detail

    with _open_store(_site(args)) as store:
        run = store.run(args.run)
        if run is None:
            raise CommandError(
                f"no run {args.run!r} (give a run id, a unique prefix or a batch id)"
            )
        detail = run_detail(store, run)
    _print(detail, args.json, run_text(detail))
    return 0


def _excursion_line(e: dict[str, Any]) -> str:
    duration = "open" if e["duration_s"] is None else f"{e['duration_s']:.1f} s"
    line = f"  {e['start']}  {e['parameter']:<12} {e['kind']:<12} {e['phase']:<12} {duration}"
    if e["worst"] is not None:
        line += f", worst {readable(e['worst'])}"
    if e["limit"] is not None:
        line += f" (limit {readable(e['limit'])})"
    return line


def run_text(detail: dict[str, Any]) -> str:
    """`pocd run show` for people: values rounded (`--json` keeps them whole)."""
    lines = [
        f"run {detail['id']}  batch {detail['batch_id']}  line {detail['line']}  "
        f"{detail['status']}",
        f"protocol {detail['protocol_id']} {detail['protocol_version']}",
        f"protocol sha256 {detail['protocol_hash']}",
        f"started {detail['started']} by {detail['operator']}, ended {detail['ended'] or '-'}",
        "phases:",
        *(
            f"  {p['t']}  {p['phase']}"
            + ("" if p["in_order"] else f" (out of order: {p['reason']})")
            for p in detail["phases"]
        ),
        f"excursions: {len(detail['excursions'])}",
        *(_excursion_line(e) for e in detail["excursions"]),
        f"deviations: {len(detail['deviations'])}",
        *(
            f"  {d['t']}  {d['id']}  {d['state']:<9} {d['cause']:<13} {d['description']}"
            for d in detail["deviations"]
        ),
        f"signatures: {len(detail['signatures'])}",
        *(_signature_line(s) for s in detail["signatures"]),
    ]
    return "\n".join(lines)


def _signature_line(signature: dict[str, Any]) -> str:
    """A signature as it is printed: the meaning, the printed name, local time with the
    offset, what was signed, and whether the record is still as signed."""
    state = "intact" if signature["intact"] else "BROKEN: the record changed since it was signed"
    return (
        f"  {signature['meaning']} by {signature['name']} ({signature['login']}) at "
        f"{signature['t']} (UTC{signature['utc_offset']})  {signature['action']} "
        f"{signature['record']}  sha256 {signature['record_hash'][:16]}  {state}"
    )


def _site_status(args: argparse.Namespace) -> int:
    """The status, then each signed change of it (a signature of no run: shown here)."""
    from pocd.signatures import verify
    from pocd.store.recordtypes import SIGNATURE

    with _open_store(_site(args)) as store:
        status = store.site_status()
        changes = [
            {**SIGNATURE.json(s), "intact": verify(store, s)}
            for s in store.signatures()
            if s.action == "site.status"
        ]
    print(status.value)
    for change in changes:
        print(_signature_line(change))
    return 0


def _site_set(args: argparse.Namespace) -> int:
    site = _site(args)
    why = "a site status change needs your electronic signature"
    body = {
        "status": args.status,
        "reason": args.reason,
        "signature": _signature(site, args.meaning, why),
    }
    _api(site, "POST", "/api/site/status", body)
    print(f"site status: {args.status}")
    return 0


# --- users, logins ----------------------------------------------------------------------------


def _accounts(site: Site) -> Store:
    """The store, to write users to (made if need be: the first admin may come first)."""
    from pocd.store import Store

    # As the daemon opens it: a store of an older schema is migrated with the site's points.
    return Store(site.store_path, parameters=site.point_parameters(), lines=site.point_lines())


def _admin(args: argparse.Namespace) -> Admin | None:
    """The admin of `--as`, with their password (asked after any new password)."""
    from pocd.users import Admin

    if args.as_admin is None:
        return None
    return Admin(args.as_admin, _secret(f"password of admin {args.as_admin}"))


def _new_password(site: Site, login: str) -> str:
    from pocd.users import check_new_password

    password = _secret(f"new password of {login}", new=True)
    # Checked before anything else is asked: a password refused is asked again at once.
    check_new_password(login, password, password_min=site.config.access.password_min)
    return password


def _user_add(args: argparse.Namespace) -> int:
    from pocd.users import add_user, check_new_user

    site = _site(args)
    check_new_user(args.login, args.name, args.role)  # before a password is asked for it
    password = _new_password(site, args.login)
    admin = _admin(args)
    with _accounts(site) as store:
        user = add_user(
            store,
            args.login,
            args.name,
            args.role,
            password,
            admin=admin,
            password_min=site.config.access.password_min,
        )
    print(f"user {user.login} added: {user.name} ({', '.join(user.roles)})")
    return 0


def _user_disable(args: argparse.Namespace) -> int:
    from pocd.users import disable_user

    site = _site(args)
    admin = _admin(args)
    with _accounts(site) as store:
        disable_user(store, args.login, admin=admin)
    print(f"user {args.login} disabled: their sessions end at their next request")
    return 0


def _user_enable(args: argparse.Namespace) -> int:
    from pocd.users import enable_user

    site = _site(args)
    admin = _admin(args)
    with _accounts(site) as store:
        enable_user(store, args.login, admin=admin)
    print(f"user {args.login} enabled")
    return 0


def _user_passwd(args: argparse.Namespace) -> int:
    from pocd.users import set_password

    site = _site(args)
    password = _new_password(site, args.login)
    admin = _admin(args)
    with _accounts(site) as store:
        set_password(
            store,
            args.login,
            password,
            admin=admin,
            password_min=site.config.access.password_min,
        )
    print(f"password of {args.login} set")
    return 0


def _user_roles(args: argparse.Namespace) -> int:
    from pocd.users import set_roles

    site = _site(args)
    admin = _admin(args)
    with _accounts(site) as store:
        user = set_roles(store, args.login, args.role, admin=admin)
    print(f"user {user.login}: {', '.join(user.roles)}")
    return 0


def _user_unlock(args: argparse.Namespace) -> int:
    from pocd.users import unlock_user

    site = _site(args)
    admin = _admin(args)
    with _accounts(site) as store:
        unlock_user(store, args.login, admin=admin)
    print(f"user {args.login} unlocked: the daemon lifts their lockout at their next login")
    return 0


def _user_list(args: argparse.Namespace) -> int:
    from pocd.store.recordtypes import iso

    site = _site(args)
    if not site.store_path.exists():
        raise CommandError(
            f"no store yet at {site.store_path}, so no users: add the first admin with "
            f'`pocd user add LOGIN --name "Full Name" --role admin -c {site.path}`'
        )
    with _open_store(site) as store:
        # Field by field: the password hash is never shown, nor written out as JSON.
        found = [
            {
                "login": u.login,
                "name": u.name,
                "roles": list(u.roles),
                "disabled": u.disabled,
                "created": iso(u.created),
                "changed": iso(u.changed),
            }
            for u in store.users()
        ]
    text = "\n".join(
        f"{u['login']:<16} {u['name']:<28} {', '.join(u['roles']):<28} "
        f"{'disabled' if u['disabled'] else 'enabled':<8} {u['created']}"
        for u in found
    )
    _print(found, args.json, text or "no users")
    return 0


def _login(args: argparse.Namespace) -> int:
    site = _site(args)
    listen = site.config.api.listen
    login = args.user or getpass.getuser()
    password = _secret(f"password of {login} at {listen}")
    body = {"login": login, "password": password, "client": "cli"}
    try:
        answer = _call(site, "POST", "/api/login", body, None)
    except _Refused as exc:
        raise CommandError(f"login refused: {exc.message}") from None
    saved = tokens.SavedToken(
        answer["login"], answer["token"], answer["session"], answer["expires"]
    )
    path = tokens.save(listen, saved)
    print(
        f"logged in at {listen} as {answer['name']} ({answer['login']}: "
        f"{', '.join(answer['roles'])}) until {answer['expires']}, or until "
        f"{answer['idle_timeout_s']:g} s without a request; the token is in {path}"
    )
    return 0


def _logout(args: argparse.Namespace) -> int:
    site = _site(args)
    listen = site.config.api.listen
    saved = tokens.find(listen)
    if saved is None:
        print(f"not logged in at {listen}")
        return 0
    note = ""
    try:
        _call(site, "POST", "/api/logout", None, saved.token)
    except _Refused as exc:  # the session ended already (a restart, a timeout): forget it
        note = f" (the daemon said: {exc.message})"
    except CommandError:
        note = " (the daemon does not answer; its sessions end when it stops)"
    tokens.forget(listen)
    print(f"logged out {saved.login} at {listen}{note}")
    return 0


def _sink_quarantine(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pocd.sinks.resend import quarantine, sink_settings

    site = _site(args)
    name = sink_settings(site, args.sink).name
    with _open_store(site) as store:
        held = quarantine(store, name)
    text = "\n".join(f"#{e.incident_id}  {e.points:>6} points  {e.message}" for e in held)
    _print([asdict(e) for e in held], args.json, text or f"sink {name}: the quarantine is empty")
    return 0


def _sink_resend(args: argparse.Namespace) -> int:
    from pocd.sinks.resend import resend, sink_settings

    site = _site(args)
    report = asyncio.run(resend(site, sink_settings(site, args.sink), operator=args.operator))
    print(report.describe(), file=sys.stdout if report.complete else sys.stderr)
    return 0 if report.complete else 1


def _add_sink_commands(sub: Any) -> None:
    sink = sub.add_parser("sink", help="a sink's quarantine: points InfluxDB refused")
    sink_sub = sink.add_subparsers(dest="sink_command", required=True)
    held = with_config(sink_sub.add_parser("quarantine", help="list it (from the store)"))
    resend = with_config(sink_sub.add_parser("resend", help="send it again (exit 1 if kept)"))
    for p in (held, resend):
        p.add_argument("--sink", help="the sink's name (needed if there are several)")
    held.add_argument("--json", action="store_true")
    held.set_defaults(func=_sink_quarantine)
    resend.add_argument("--operator", required=True)
    resend.set_defaults(func=_sink_resend)


def _simulate(args: argparse.Namespace) -> int:
    """Serve a simulated device for a driver file: `pocd.sim.<transport>.main(driver, argv)`
    parses its own options (see `pocd simulate DRIVER --help`)."""
    import importlib
    from pathlib import Path

    from pocd.settings import load_driver

    path = Path(args.driver)
    dirs = [path.resolve().parent] if path.suffix == ".toml" else []
    try:
        driver = load_driver(path.stem if dirs else args.driver, dirs)
    except KeyError as exc:
        raise CommandError(str(exc.args[0])) from None
    try:
        module = importlib.import_module(f"pocd.sim.{driver.info.transport}")
    except ModuleNotFoundError:
        raise CommandError(f"no simulator for transport {driver.info.transport!r}") from None
    code: int = module.main(driver, list(args.options))
    return code


def _certs(args: argparse.Namespace) -> int:
    """`pocd certs create ...`: OPC UA client certificates (pocd.transports.opcua.certs)."""
    from pocd.transports.opcua.certs import main as certs_main

    return certs_main(list(args.options))


def _demo(args: argparse.Namespace) -> int:
    from pocd.demo import run_demo

    return run_demo(seconds=args.seconds, data_dir=args.data_dir)


def _demo_seconds(text: str) -> float:
    from pocd.demo import DemoScript

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        DemoScript.for_seconds(seconds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return seconds


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pocd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(version unknown: not installed as a package)"


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="site config")
    return p


SECRETS = (
    "Passwords are asked on the terminal (a new one twice). Without a terminal (a script, a "
    "pipe) each is read as one line of stdin, in the order they would be asked: a new "
    "password first, then the admin's (--as), then a signature's."
)


def with_meaning(p: argparse.ArgumentParser, action: Action) -> argparse.ArgumentParser:
    meanings = sorted(m.value for m in SIGNED[action])
    default = Meaning.PERFORMED.value if Meaning.PERFORMED.value in meanings else meanings[0]
    p.add_argument(
        "--meaning",
        choices=meanings,
        default=default,
        help=f"what your signature means, where one is needed (default: {default})",
    )
    return p


def _account_command(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
    p = with_config(sub.add_parser(name, help=help_, epilog=SECRETS))
    p.add_argument("login", help="the user's login")
    p.add_argument(
        "--as",
        dest="as_admin",
        metavar="ADMIN",
        help="the enabled admin making the change (their password is asked); needed once "
        "the store holds one",
    )
    return p


def _add_user_commands(sub: Any) -> None:
    user = sub.add_parser(
        "user",
        help="named users: add, disable, enable, passwd, roles, unlock, list (the store)",
        description="Users are kept in the store and managed on it, by whoever can write "
        "it: the first user is an admin, added without --as; after that, every change is "
        "made --as an enabled admin, with their password. Logins are never reused and users "
        "never deleted, only disabled.",
        epilog=SECRETS,
    )
    user_sub = user.add_subparsers(dest="user_command", required=True)
    roles = [r.value for r in Role]
    add = _account_command(user_sub, "add", "add a user (the first one: an admin)")
    add.add_argument("--name", required=True, help="their full printed name (signatures show it)")
    add.add_argument(
        "--role", action="append", required=True, choices=roles, help="a role; repeat for more"
    )
    add.set_defaults(func=_user_add)
    for name, help_, func in (
        ("disable", "disable a user: no login, their sessions end", _user_disable),
        ("enable", "enable a disabled user again", _user_enable),
        ("passwd", "set a user's password", _user_passwd),
        ("unlock", "lift a user's lockout after failed logins", _user_unlock),
    ):
        _account_command(user_sub, name, help_).set_defaults(func=func)
    set_roles = _account_command(user_sub, "roles", "set a user's roles (all of them)")
    set_roles.add_argument(
        "--role", action="append", required=True, choices=roles, help="a role; repeat for more"
    )
    set_roles.set_defaults(func=_user_roles)
    lst = with_config(user_sub.add_parser("list", help="every user (never a password hash)"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_user_list)


def _add_login_commands(sub: Any) -> None:
    where = (
        "The token is saved in $XDG_CONFIG_HOME/pocd/tokens.json (~/.config/pocd/tokens.json), "
        "0600, by the API's address."
    )
    login = with_config(
        sub.add_parser(
            "login",
            help="log in to the daemon's API: control commands act as you",
            epilog=f"{where} {SECRETS}",
        )
    )
    login.add_argument("--user", metavar="LOGIN", help="your login (default: your OS user name)")
    login.set_defaults(func=_login)
    logout = with_config(
        sub.add_parser("logout", help="end the session and forget its token", epilog=where)
    )
    logout.set_defaults(func=_logout)


def _add_line_commands(sub: Any) -> None:
    line = sub.add_parser("line", help="the site's lines and what each is doing")
    line_sub = line.add_subparsers(dest="line_command", required=True)
    lst = with_config(line_sub.add_parser("list", help="each line with its run or standby"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_line_list)


def _add_alarm_commands(sub: Any) -> None:
    alarm = sub.add_parser("alarm", help="the alarms: list, acknowledge, shelve, ...")
    alarm_sub = alarm.add_subparsers(dest="alarm_command", required=True)
    lst = with_config(alarm_sub.add_parser("list", help="alarms not normal (from the daemon)"))
    lst.add_argument("--all", action="store_true", help="every condition, normal ones too")
    lst.add_argument("--json", action="store_true", help="with each line's alarm KPIs")
    lst.set_defaults(func=_alarm_list)
    sent = with_config(
        alarm_sub.add_parser("notifications", help="who was told what, each attempt (store)")
    )
    sent.add_argument("--alarm", help="only those of this alarm id (or notification id)")
    sent.add_argument("--json", action="store_true", help="with every delivery attempt")
    sent.set_defaults(func=_alarm_notifications)
    for name, help_, signed in (
        ("acknowledge", "acknowledge an alarm (a critical one with a --comment)", None),
        ("reset", "reset a latched alarm back to normal", None),
        ("shelve", "shelve an alarm (a critical one is signed)", Action.ALARM_SHELVE_CRITICAL),
        ("unshelve", "end a shelve", None),
        ("remove", "take an alarm out of service (signed)", Action.ALARM_OUT_OF_SERVICE),
        ("restore", "return an alarm to service (signed)", Action.ALARM_OUT_OF_SERVICE),
    ):
        p = with_config(alarm_sub.add_parser(name, help=help_, epilog=SECRETS))
        p.add_argument("source", help="the parameter (or, for comm-loss, the device)")
        p.add_argument("kind", help="alert-high, action-low, comm-loss, ...")
        p.add_argument("--line", help="the line (a site of one line need not name it)")
        p.add_argument("--comment", default="", help="the note or reason, for the record")
        if name == "shelve":
            p.add_argument(
                "--minutes", type=float, help="how long (default: until it returns to normal)"
            )
        if signed is not None:
            with_meaning(p, signed)
        p.set_defaults(func=_alarm_command)


def _audit_verify(args: argparse.Namespace) -> int:
    """Walk the store's tamper-evident chain and its signed checkpoints: 0 if it holds, 1
    naming what does not."""
    from dataclasses import asdict

    from pocd.sitekey import public_key_file

    site = _site(args)
    key_path = Path(args.key) if args.key else public_key_file(site.data_dir)
    try:
        public = bytes.fromhex(key_path.read_text().strip()) if key_path.exists() else None
    except ValueError:
        raise CommandError(f"{key_path}: not a public key (64 hex digits)") from None
    if args.key and public is None:
        raise CommandError(f"{key_path}: no such file")
    with _open_store(site) as store:
        report = store.verify_chain(public)
    signed = f"signatures checked with {key_path}" if public else "signatures NOT checked: no key"
    text = (
        f"the chain holds: {report.entries} entries cover {report.records} records and "
        f"{report.samples} samples; {report.checkpoints} checkpoints match it ({signed})"
    )
    if not report.holds:
        head = f"the chain does NOT hold ({len(report.problems)} problems):"
        text = "\n".join([head, *(f"  {p}" for p in report.problems)])
    _print(asdict(report), args.json, text)
    return 0 if report.holds else 1


def _backup(args: argparse.Namespace) -> int:
    """An online backup of the store, while the daemon runs, audited in the store's chain."""
    import getpass
    import platform

    from pocd.model import AuditEntry, now_ns
    from pocd.store import Store
    from pocd.store.backup import make_backup

    site = _site(args)
    made = make_backup(site.store_path, Path(args.output))
    with Store(site.store_path) as store:
        store.write(
            [
                AuditEntry(
                    now_ns(),
                    f"local:{getpass.getuser()}@{platform.node()}",
                    "backup.create",
                    str(made.path),
                    new=made.sha256,
                    details={
                        "bytes": str(made.size),
                        "schema_version": str(made.schema_version),
                        "chain_entries": str(made.entries),
                        "samples_upto": str(made.samples),
                    },
                )
            ]
        )
    print(
        f"backed up {site.store_path} to {made.path}: {made.size:,} bytes, sha256 {made.sha256}, "
        f"{made.entries:,} chain entries, samples up to {made.samples:,}"
    )
    return 0


def _restore_check(args: argparse.Namespace) -> int:
    """Check a backup alone: SQLite's integrity, the schema version, the audit chain."""
    from dataclasses import asdict

    from pocd.sitekey import public_key_file
    from pocd.store.backup import check_backup

    key_path = Path(args.key) if args.key else None
    if key_path is None and args.config:  # the site's key, if it has made one yet
        key_path = public_key_file(_site(args).data_dir)
        key_path = key_path if key_path.exists() else None
    public = None
    if key_path is not None:
        try:
            public = bytes.fromhex(key_path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise CommandError(
                f"{key_path}: not a readable public key (64 hex digits): {exc}"
            ) from None
    found = check_backup(Path(args.path), public)
    signed = (
        f"checkpoint signatures checked with {key_path}"
        if public
        else ("checkpoint signatures NOT checked: give --key or -c")
    )
    lines = [
        f"{found.path}: {found.size:,} bytes, sha256 {found.sha256}",
        f"integrity: {found.integrity}; schema version {found.schema_version}",
    ]
    if found.chain is not None:
        lines.append(
            f"audit chain: {found.chain.entries:,} entries, {found.chain.checkpoints} "
            f"checkpoints ({signed})"
        )
    lines += [f"FAIL: {problem}" for problem in found.problems]
    lines.append("the backup holds" if found.holds else "the backup does NOT hold")
    _print(asdict(found) | {"holds": found.holds}, args.json, "\n".join(lines))
    return 0 if found.holds else 1


def _add_backup_commands(sub: Any) -> None:
    backup = with_config(sub.add_parser("backup", help="an online backup of the store (audited)"))
    backup.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="the backup file, or a folder for pocd-<UTC time>.sqlite",
    )
    backup.set_defaults(func=_backup)
    restore = sub.add_parser("restore", help="check a backup before restoring it")
    restore.add_argument(
        "--check",
        action="store_true",
        required=True,
        help="check the backup without touching the live store",
    )
    restore.add_argument("path", metavar="PATH", help="the backup file")
    restore.add_argument("-c", "--config", metavar="FILE", help="site config (for its key)")
    restore.add_argument("--key", help="the site's public key file (hex)")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=_restore_check)


def _add_audit_commands(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the store's tamper-evident audit chain")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    check = with_config(
        audit_sub.add_parser("verify", help="find any record or sample changed since stored")
    )
    check.add_argument(
        "--key", help="the site's public key (hex); default: site-key.pub beside the store"
    )
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_audit_verify)


def _add_deviation_commands(sub: Any) -> None:
    deviation = sub.add_parser("deviation", help="a deviation's lifecycle: assess, close")
    deviation_sub = deviation.add_subparsers(dest="deviation_command", required=True)
    assess = with_config(deviation_sub.add_parser("assess", help="note an open deviation's impact"))
    assess.add_argument("id", help="the deviation's id (pocd run show lists them)")
    assess.add_argument("--note", required=True, help="the impact assessment")
    assess.set_defaults(func=_deviation_command)
    close = with_config(
        deviation_sub.add_parser(
            "close", help="close an assessed deviation (signed, QA)", epilog=SECRETS
        )
    )
    close.add_argument("id", help="the deviation's id")
    close.add_argument("--disposition", required=True, help="what was decided")
    close.add_argument("--reason", required=True, help="why")
    close.add_argument("--root-cause", required=True, help="why it happened")
    with_meaning(close, Action.DEVIATION_CLOSE)
    close.set_defaults(func=_deviation_command)


def _add_run_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="start, advance, stop and inspect runs")
    run_sub = run.add_subparsers(dest="run_command", required=True)
    start = with_config(run_sub.add_parser("start", help="start a run"))
    start.add_argument("--line", help="the line it runs on (a site of one line need not say)")
    start.add_argument("--batch", required=True, help="batch id")
    start.add_argument("--protocol", required=True, help="protocol id")
    start.add_argument("--version", help="protocol version (default: the approved one)")
    start.set_defaults(func=_run_start)
    phase = with_config(
        run_sub.add_parser(
            "phase",
            help="enter the next (or another) phase",
            epilog="Out of protocol order the phase is an override: it needs a reason and "
            f"your electronic signature, which is asked for. {SECRETS}",
        )
    )
    phase.add_argument("phase")
    phase.add_argument("--run", help="run id (a site of one line need not say)")
    phase.add_argument("--reason", default="", help="required out of protocol order")
    with_meaning(phase, Action.RUN_PHASE_OVERRIDE)
    phase.set_defaults(func=_run_phase)
    stop = with_config(
        run_sub.add_parser(
            "stop",
            help="complete (or --abort) the run",
            epilog=f"An abort needs a reason and your electronic signature. {SECRETS}",
        )
    )
    stop.add_argument("--run", help="run id (a site of one line need not say)")
    stop.add_argument("--abort", action="store_true")
    stop.add_argument("--reason", default="", help="required with --abort")
    with_meaning(stop, Action.RUN_ABORT)
    stop.set_defaults(func=_run_stop)
    lst = with_config(run_sub.add_parser("list", help="list runs (from the store)"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_run_list)
    show = with_config(
        run_sub.add_parser("show", help="one run with phases, excursions, deviations")
    )
    show.add_argument("run", help="run id, unique prefix, or batch id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_run_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pocd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate site configs, protocols and driver files")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach each sink of the site configs (InfluxDB: /ping or /health); "
        "exit 1 if one cannot be reached or used",
    )
    check.set_defaults(func=_check)

    serve = with_config(sub.add_parser("serve", help="run the daemon"))
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    status = with_config(sub.add_parser("status", help="live values and limit states"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    _add_line_commands(sub)
    _add_alarm_commands(sub)
    _add_audit_commands(sub)
    _add_backup_commands(sub)
    _add_deviation_commands(sub)
    _add_run_commands(sub)
    _add_sink_commands(sub)
    from pocd.release.cli import add_commands as add_release_commands

    add_release_commands(sub)

    site = sub.add_parser("site", help="site status: active, suspended, ceased")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    with_config(site_sub.add_parser("status", help="show the site status")).set_defaults(
        func=_site_status
    )
    site_set = with_config(
        site_sub.add_parser(
            "set",
            help="change the site status (signed)",
            epilog=f"The change needs your electronic signature. {SECRETS}",
        )
    )
    site_set.add_argument("status", choices=["active", "suspended", "ceased"])
    site_set.add_argument("--reason", required=True)
    with_meaning(site_set, Action.SITE_STATUS)
    site_set.set_defaults(func=_site_set)

    _add_user_commands(sub)
    _add_login_commands(sub)

    simulate = sub.add_parser(
        "simulate",
        help="serve a simulated device for a driver file",
        description="Options after DRIVER belong to the transport's simulator.",
    )
    simulate.add_argument("driver", help="driver name (drivers/NAME.toml) or path to a .toml")
    simulate.add_argument("options", nargs=argparse.REMAINDER)
    simulate.set_defaults(func=_simulate)

    certs = sub.add_parser(
        "certs",
        help="make an OPC UA client certificate: pocd certs create --help",
        description="Options after `certs` belong to pocd.transports.opcua.certs.",
    )
    certs.add_argument("options", nargs=argparse.REMAINDER)
    certs.set_defaults(func=_certs)

    demo = sub.add_parser("demo", help="a simulated CAR-T run with a live view")
    demo.add_argument(
        "--seconds",
        type=_demo_seconds,
        default=None,
        help="stop after N s, 90 or more: the script stretches to fit (default: Ctrl-C)",
    )
    demo.add_argument("--data-dir", default="demo-data", help="where the store and config go")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except PocdError as exc:
        print(f"pocd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
