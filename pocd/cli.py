"""The `pocd` command line: check [--connect], serve, status, run, site, sink, demo.

One module of some 500 lines: one argparse tree, each command a small handler; a command that
grows beyond that moves to its own module, as `pocd sink` did (pocd.sinks.resend).

Exit codes: 0 success, 1 an operation was refused or failed, 2 invalid input (config, usage).
Control commands (run start|phase|stop, site set, status) talk to the running daemon's API;
`run list|show` and `site status` read the store directly, so they work when it is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pocd.errors import ConfigError, ConfigProblem, PocdError
from pocd.records import json_bytes, readable
from pocd.settings import Site, check_files, load_site

if TYPE_CHECKING:
    from pocd.sinks import Sink

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


def _api(site: Site, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    api = site.config.api
    url = f"http://{api.listen}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        if exc.code == 409:
            raise CommandError(f"refused: {message}") from None
        raise CommandError(f"the daemon answered {exc.code} {exc.reason}: {message}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise CommandError(
            f"the daemon does not answer at {url} ({getattr(exc, 'reason', exc)}): "
            f"is `pocd serve -c {site.path}` running?"
        ) from None


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
        "operator": args.operator,
    }
    run = _api(_site(args), "POST", "/api/runs", body)
    print(
        f"run {run['id']} started: batch {run['batch_id']}, {run['protocol_id']} "
        f"{run['protocol_version']}"
    )
    return 0


def _run_phase(args: argparse.Namespace) -> int:
    body = {"phase": args.phase, "operator": args.operator, "reason": args.reason}
    change = _api(_site(args), "POST", _run_path(args, "phase"), body)
    order = "" if change["in_order"] else " (out of order: recorded as a deviation)"
    print(f"phase {change['previous']} -> {change['phase']}{order}")
    return 0


def _run_stop(args: argparse.Namespace) -> int:
    body = {"operator": args.operator, "abort": args.abort, "reason": args.reason}
    run = _api(_site(args), "POST", _run_path(args, "stop"), body)
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
        *(f"  {d['t']}  {d['cause']:<13} {d['description']}" for d in detail["deviations"]),
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
    with _open_store(_site(args)) as store:
        status = store.site_status()
    print(status.value)
    return 0


def _site_set(args: argparse.Namespace) -> int:
    body = {"status": args.status, "operator": args.operator, "reason": args.reason}
    _api(_site(args), "POST", "/api/site/status", body)
    print(f"site status: {args.status}")
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


def _add_line_commands(sub: Any) -> None:
    line = sub.add_parser("line", help="the site's lines and what each is doing")
    line_sub = line.add_subparsers(dest="line_command", required=True)
    lst = with_config(line_sub.add_parser("list", help="each line with its run or standby"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_line_list)


def _add_run_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="start, advance, stop and inspect runs")
    run_sub = run.add_subparsers(dest="run_command", required=True)
    start = with_config(run_sub.add_parser("start", help="start a run"))
    start.add_argument("--line", help="the line it runs on (a site of one line need not say)")
    start.add_argument("--batch", required=True, help="batch id")
    start.add_argument("--protocol", required=True, help="protocol id")
    start.add_argument("--version", help="protocol version (default: the approved one)")
    start.add_argument("--operator", required=True)
    start.set_defaults(func=_run_start)
    phase = with_config(run_sub.add_parser("phase", help="enter the next (or another) phase"))
    phase.add_argument("phase")
    phase.add_argument("--run", help="run id (a site of one line need not say)")
    phase.add_argument("--operator", required=True)
    phase.add_argument("--reason", default="", help="required out of protocol order")
    phase.set_defaults(func=_run_phase)
    stop = with_config(run_sub.add_parser("stop", help="complete (or --abort) the run"))
    stop.add_argument("--run", help="run id (a site of one line need not say)")
    stop.add_argument("--operator", required=True)
    stop.add_argument("--abort", action="store_true")
    stop.add_argument("--reason", default="")
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
    _add_run_commands(sub)
    _add_sink_commands(sub)

    site = sub.add_parser("site", help="site status: active, suspended, ceased")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    with_config(site_sub.add_parser("status", help="show the site status")).set_defaults(
        func=_site_status
    )
    site_set = with_config(site_sub.add_parser("set", help="change the site status"))
    site_set.add_argument("status", choices=["active", "suspended", "ceased"])
    site_set.add_argument("--operator", required=True)
    site_set.add_argument("--reason", required=True)
    site_set.set_defaults(func=_site_set)

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
