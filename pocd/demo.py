"""`pocd demo`: two lines of simulated CAR-T manufacture on the embedded store, with a live
terminal view.

Some 550 lines in one module: the script, the simulators it starts and the live view are one
demo, read together.

It starts simulated devices in process (a Thermo CTS Rotea over OPC UA, a Modbus TCP CO2
probe, a Modbus RTU pH sensor, a Heracell incubator and an MT-SICS balance over serial, each
serial device on a socat pty pair, and `sim` devices), writes a site config
for them to DATA_DIR/pocd.toml with the example protocol, runs the daemon and starts a run.
The Rotea's step number moves the run to the next phase every 15 s, and scripted faults
provoke an alert excursion, an action deviation, a comm-loss and a bad-quality stretch
(DemoScript: a longer demo stretches all of it; a shorter one than the script is refused). The
config stays behind so that `pocd run list -c DATA_DIR/pocd.toml` works afterwards.

Two lines share the culture chamber (`incubator`): the Rotea's line runs the CAR-T protocol
for the whole demo, while a Cocoon beside it runs two short expansion batches on their own
protocol. Between them the Cocoon's line is on standby, watched by the chamber's standby
protocol, and the chamber's warm stretch there is an equipment excursion of that line (the
same stretch is an alert of the CAR-T run on the other line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pocd.access import hash_password
from pocd.daemon import Daemon, run_until
from pocd.logs import configure_logging
from pocd.model import AlarmState, AuditEntry, Quality, User, now_ns
from pocd.runs import Lines
from pocd.settings import Site, load_driver, load_site
from pocd.signatures import Signer
from pocd.sim.modbus import Fault, ModbusSimulator, unit_from_driver
from pocd.sim.opcua import OpcuaSimulator
from pocd.sim.pty import pty_pair
from pocd.sim.serial import serve as serve_serial
from pocd.sim.webhook import Received, Receiver
from pocd.status import PointStatus
from pocd.store import Store
from pocd.transports.modbus import ModbusSettings

__all__ = ["PHASE_SECONDS", "SHORTEST", "DemoScript", "run_demo", "write_demo_site"]

PHASE_SECONDS = 15.0  # at the script's shortest
PHASES = 6
SHORTEST = PHASE_SECONDS * PHASES  # 90 s: every phase, each long enough for its faults
PROTOCOL = "CART-TCT"
COCOON_PROTOCOL = "CAR-T-EXPAND"
# The Cocoon line's runs, in seconds of the script at its shortest: the first ends before the
# chamber's warm stretch (31 s to 44 s), the second starts after it.
COCOON_RUNS = ((0.0, 28.0), (47.0, SHORTEST))

# The demo's own protocols, beside the shipped example: the Cocoon's batches, and the
# chamber's standby limits (what applies to the Cocoon line between its runs).
DEMO_PROTOCOLS = {
    "car-t-expand-1.0.toml": """\
# Written by `pocd demo`: a short expansion batch on a Cocoon, in the shared chamber.
id = "CAR-T-EXPAND"
version = "1.0"
title = "CAR-T expansion on a Cocoon (demo)"
status = "approved"

[parameters.temperature]
unit = "C"
critical = true
[parameters.temperature.limits]
alert_low = 36.5
alert_high = 37.5
action_low = 36.0
action_high = 38.0
on_delay = "10s"
off_delay = "5s"

[parameters.ph]
unit = "pH"
critical = true
limits = { alert_low = 6.9, alert_high = 7.4, action_low = 6.8, action_high = 7.5, on_delay = "5s" }

[[phases]]
id = "seed"

[[phases]]
id = "expand"
""",
    "chamber-standby-1.0.toml": """\
# Written by `pocd demo`: the culture chamber between batches.
id = "CHAMBER-STANDBY"
version = "1.0"
title = "Culture chamber, between batches (demo)"
status = "approved"
kind = "standby"

[parameters.temperature]
unit = "C"
[parameters.temperature.limits]
alert_low = 36.0
alert_high = 37.5
action_low = 35.0
action_high = 39.0
on_delay = "5s"
off_delay = "2s"

[parameters.ph]
unit = "pH"
limits = { monitored = false }

[[phases]]
id = "standby"
""",
}


@dataclass(frozen=True, slots=True)
class DemoScript:
    """The demo's timeline for the length asked: the Rotea's steps (the phases), the sim
    devices' scripted segments and the Modbus simulators' faults, every time stretched by the
    same factor so that each fault keeps its place in its phase.

    It cannot shrink: the protocol's on-delays (10 s for temperature, 5 s for pH) are the
    protocol's, so a breach must last that long inside one phase. A length shorter than
    SHORTEST is refused rather than run without its deviation.
    """

    seconds: float | None  # the length asked; None: until Ctrl-C
    stretch: float = 1.0

    @classmethod
    def for_seconds(cls, seconds: float | None) -> DemoScript:
        if seconds is None:
            return cls(None)
        if not math.isfinite(seconds):
            raise ValueError(f"the demo's length must be a number of seconds, not {seconds}")
        if seconds < SHORTEST:
            raise ValueError(
                f"{seconds:g} s is too short for the demo's script: it needs at least "
                f"{SHORTEST:g} s (six phases of {PHASE_SECONDS:g} s, with an alert, an action "
                "deviation, a comm-loss and a bad-quality stretch); give 90 or more, or leave "
                "--seconds out to run until Ctrl-C"
            )
        return cls(seconds, seconds / SHORTEST)

    def at(self, t: float) -> float:
        """A time (or duration) of the script at its shortest, stretched."""
        return round(t * self.stretch, 3)

    @property
    def phase_seconds(self) -> float:
        return self.at(PHASE_SECONDS)

    def rotea_steps(self) -> list[tuple[float, int]]:
        """(seconds from the Rotea's start, protocol step number): one step per phase."""
        return [(i * self.phase_seconds, i + 1) for i in range(PHASES)]

    def site_times(self) -> dict[str, float]:
        """The times SITE_TOML is written with."""
        return {"repeat": self.at(SHORTEST), "warm_at": self.at(31), "warm_for": self.at(13)}

    def co2_faults(self) -> list[Fault]:
        # activation: the CO2 probe restarts and is not ready (NaN, status 256: bad quality)
        return [Fault("startup", after=self.at(20), duration=self.at(3))]

    def ph_faults(self) -> list[Fault]:
        # expansion: pH falls to 6.72, past the action limit (6.8) for longer than its
        # on-delay; harvest: the pH sensor stops answering (comm-loss)
        return [
            Fault("set", point="ph", value=6.72, after=self.at(47), duration=self.at(11)),
            Fault("silence", after=self.at(63), duration=self.at(5)),
        ]


# Times are seconds since the daemon started, for the script at its shortest (DemoScript
# stretches them); phases change every PHASE_SECONDS: enrichment 0, activation 15,
# transduction 30, expansion 45, harvest 60, formulation 75.
SITE_TOML = """\
# Written by `pocd demo`: a point-of-care site with simulated devices.
[site]
id = "demo-site"
name = "pocd demo site"
timezone = "Europe/London"
control_site = "demo-control"

[store]
data_dir = "."
flush_interval = "200ms"

[api]
listen = "127.0.0.1:{port}"

[protocols]
dir = "protocols"

[[devices]]
id = "incubator"
driver = "sim"
title = "Culture chamber"
serial_number = "SIM-0001"
# the script repeats, so a demo left running keeps showing faults
transport = {{ interval = 1.0, seed = 1, repeat = {repeat} }}
[devices.points.temperature]
parameter = "temperature"
unit = "C"
base = 37.0
noise = 0.005
# transduction: 37.65 C, past the alert limit (37.5) for longer than the on-delay
script = [{{ start = {warm_at}, duration = {warm_for}, action = "offset", value = 0.65 }}]

[[devices]]
id = "bioreactor"
driver = "sim"
title = "Rocking bioreactor"
serial_number = "SIM-0002"
transport = {{ interval = 1.0, seed = 2, repeat = {repeat} }}
[devices.points.do]
parameter = "do"
unit = "%-sat"
base = 60.0
noise = 0.5
[devices.points.rocking]
parameter = "rocking"
unit = "rocks/min"
base = 12.0
step = 1.0

# A second closed system beside the first, on its own batches (line "cocoon").
[[devices]]
id = "cocoon"
driver = "sim"
title = "Cocoon cassette"
serial_number = "SIM-0008"
transport = {{ interval = 1.0, seed = 3 }}
[devices.points.ph]
parameter = "ph"
unit = "pH"
base = 7.2
noise = 0.005

# A Thermo CTS Rotea over OPC UA (a simulator in this process): its protocol step number
# drives the run's phase.
[[devices]]
id = "rotea"
driver = "thermo-rotea"
serial_number = "SIM-0005"
transport = {{ endpoint = "{rotea_endpoint}" }}

# Two lines share the culture chamber. The Rotea's line runs the CAR-T protocol; the Cocoon's
# line runs its own batches, and between them the chamber's standby limits apply to it.
[[lines]]
id = "prodigy"
title = "Rotea CAR-T line"
devices = ["rotea", "incubator", "bioreactor", "heracell", "balance", "co2-probe", "ph-probe"]

[lines.phase_source]
device = "rotea"
point = "protocol_step_number"
[lines.phase_source.phases]
"1" = "enrichment"
"2" = "activation"
"3" = "transduction"
"4" = "expansion"
"5" = "harvest"
"6" = "formulation"

[[lines]]
id = "cocoon"
title = "Cocoon expansion line"
devices = ["cocoon"]
points = {{ incubator = ["temperature"] }}
standby = "CHAMBER-STANDBY"

# A Heracell incubator (serial ASCII with checksums) and an MT-SICS balance, each on a socat
# pty pair (simulators in this process). Their readings are recorded beside the protocol's.
[[devices]]
id = "heracell"
driver = "thermo-heracell"
serial_number = "SIM-0006"
transport = {{ port = "{heracell_port}" }}

[[devices]]
id = "balance"
driver = "mettler-sics"
serial_number = "SIM-0007"
transport = {{ port = "{balance_port}" }}

# A Vaisala GMP251 CO2 probe over Modbus TCP (a simulator in this process, see DemoScript).
[[devices]]
id = "co2-probe"
driver = "vaisala-gmp251"
serial_number = "SIM-0003"
transport = {{ host = "127.0.0.1", port = {co2_port}, unit_id = 240 }}
# the probe reads ppm; the protocol wants %
points.co2 = {{ parameter = "co2", scale = 0.0001, unit = "%", valid_max = 20.0 }}

# Alarms are POSTed, signed, to a webhook receiver the demo runs (it prints what it gets).
[[sinks.webhook]]
name = "ward-webhook"
url = "{hook_url}"
secret = {{ file = "webhook.secret" }}

[notify]
base_url = "http://127.0.0.1:{port}"

[[notify.routes]]
name = "ward"
channels = ["ward-webhook"]
transitions = ["activate", "acknowledge", "realarm"]

# A Hamilton Arc pH sensor over Modbus RTU on a socat pty pair (a simulator in this process).
[[devices]]
id = "ph-probe"
driver = "hamilton-arc-ph"
serial_number = "SIM-0004"
transport = {{ serial_port = "{ph_port}" }}
points.ph = {{ parameter = "ph" }}
"""


def _free_port(preferred: int = 8470) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    raise OSError("no free port on 127.0.0.1")


def _shipped_protocols() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_examples" / "protocols", here.parent / "config" / "protocols"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the example protocols are not installed")


def write_demo_site(data_dir: Path, script: DemoScript | None = None, **endpoints: object) -> Path:
    """Write the demo's site config (for `script`, by default the shortest) and protocols
    into `data_dir`; returns the config path."""
    times = (script or DemoScript(None)).site_times()
    data_dir.mkdir(parents=True, exist_ok=True)
    protocols = data_dir / "protocols"
    protocols.mkdir(exist_ok=True)
    for path in _shipped_protocols().glob("*.toml"):
        shutil.copyfile(path, protocols / path.name)
    for name, text in DEMO_PROTOCOLS.items():
        (protocols / name).write_text(text)
    demo_secret(data_dir)
    config = data_dir / "pocd.toml"
    port = _free_port()
    endpoints.setdefault("hook_url", f"http://127.0.0.1:{_free_port(port + 1)}/hook")
    config.write_text(SITE_TOML.format(port=port, **times, **endpoints))
    return config


def demo_secret(data_dir: Path) -> str:
    """The HMAC key the demo's webhook channel and receiver share, made at the first demo."""
    path = data_dir / "webhook.secret"
    if not path.exists():
        path.write_text(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def print_notification(console: Console, summary: dict[str, Any], got: Received) -> None:
    """What the demo's webhook receiver got, one line each, above the live view."""
    data = json.loads(got.body)
    summary["webhook"] = summary.get("webhook", 0) + 1
    if data["type"] == "summary":
        what = f"flood on {data['line']}: {data['count']} alarms"
    else:
        value = "" if data["value"] is None else f" {data['value']:g} {data['unit']}".rstrip()
        what = (
            f"{data['priority']} {data['transition']} {data['line']}/{data['source']} "
            f"{data['kind']}{value} by {data['actor']}"
        )
    console.print(f"[bold]webhook received[/bold] (signature checked): {what}")


async def start_simulators(
    stack: contextlib.AsyncExitStack, data_dir: Path, script: DemoScript
) -> dict[str, Any]:
    """Start the simulated devices the demo's site talks to over real protocols, faults as
    `script` says; they stop with `stack`. Returns where they listen, for `write_demo_site`."""
    # The Rotea first: its server takes a few seconds to start, and the step schedule counts
    # from when it listens, like the Modbus faults from their simulators' creation just after.
    rotea = OpcuaSimulator(
        load_driver("thermo-rotea"),
        "opc.tcp://127.0.0.1:0",
        schedule={"protocol_step_number": script.rotea_steps()},
        interval=0.5,
    )
    await stack.enter_async_context(rotea)

    co2 = ModbusSimulator([unit_from_driver("vaisala-gmp251")], faults=script.co2_faults())
    await stack.enter_async_context(co2)
    co2_port = await co2.start_tcp("127.0.0.1", 0)

    ph_link = str((data_dir / "ph-probe.pty").resolve())
    sim_end = stack.enter_context(pty_pair(ph_link))
    line = ModbusSettings.model_validate(load_driver("hamilton-arc-ph").defaults)
    ph = ModbusSimulator([unit_from_driver("hamilton-arc-ph")], faults=script.ph_faults())
    await stack.enter_async_context(ph)
    await ph.start_rtu(
        sim_end,
        baudrate=line.baudrate,
        bytesize=line.bytesize,
        parity=line.parity,
        stopbits=line.stopbits,
    )
    ports: dict[str, Any] = {"co2_port": co2_port, "ph_port": ph_link}
    for name in ("heracell", "balance"):
        link = str((data_dir / f"{name}.pty").resolve())
        sim_end = stack.enter_context(pty_pair(link))
        driver = "thermo-heracell" if name == "heracell" else "mettler-sics"
        task = asyncio.create_task(serve_serial(load_driver(driver), sim_end), name=f"sim:{name}")
        stack.push_async_callback(_cancel, task)
        ports[f"{name}_port"] = link
    return {**ports, "rotea_endpoint": rotea.endpoint}


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


_STYLE = {"normal": "green", "not-monitored": "dim", "no-run": "dim", "no-data": "yellow"}


def _limits(p: PointStatus) -> str:
    lim = p.limits
    if not lim:
        return ""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    return (
        f"alert {fmt(lim['alert_low'])}..{fmt(lim['alert_high'])}  "
        f"action {fmt(lim['action_low'])}..{fmt(lim['action_high'])}"
    )


def value_cell(p: PointStatus) -> Text:
    """A point's value in the live view: its text for a text point (a protocol name), BAD for
    a reading with no value, else the number."""
    if p.text is not None:
        return Text(p.text)
    if p.quality is Quality.BAD:
        return Text("BAD", style="red")
    return Text("-" if p.value is None else f"{p.value:.3f}")


def render(daemon: Daemon, started: float) -> Group:
    head = Text(f"pocd demo  {time.monotonic() - started:5.0f} s", style="bold")
    for state in daemon.lines.states.values():
        run, engine = state.run, state.engine
        head.append(f"\nline {state.line.id}  ")
        if run is None:
            standby = f"{engine.protocol.id}" if engine else "-"
            head.append(f"between runs, watched by {standby}")
        else:
            head.append(
                f"run {run.id}  batch {run.batch_id}  {run.protocol_id} {run.protocol_version}  "
            )
            head.append(f"phase {engine.phase if engine else '-'}", style="bold cyan")
    counts = daemon.lines.counts
    head.append(
        f"\nexcursions {counts['excursions']}  deviations {counts['deviations']}  "
        f"incidents {sum(daemon.incident_counts.values())}"
    )
    table = Table(expand=False)
    for column in ("line", "device", "parameter", "value", "unit", "limits", "state", "alarm"):
        table.add_column(column, justify="right" if column == "value" else "left")
    alarms = _alarms_by_source(daemon)
    points = daemon.view.points()
    feeding = {p.device for p in points if p.parameter}
    for p in points:
        if p.parameter is None and p.device in feeding:  # status words: recorded, not shown
            continue
        value = value_cell(p)
        urgent = "action" in p.state and "pending" not in p.state
        style = _STYLE.get(p.state, "bold red" if urgent else "yellow")
        table.add_row(
            p.line or "-",
            p.device,
            p.parameter or p.point,
            value,
            p.unit,
            _limits(p),
            Text(p.state, style=style),
            alarms.get((p.line or "", p.parameter or ""), Text("")),
        )
    return Group(head, table)


# What the live view marks, most urgent first: an alarm nobody has acknowledged yet blinks.
_ALARM_MARKS: dict[AlarmState, tuple[str, str]] = {
    AlarmState.ACTIVE_UNACKED: ("UNACK", "bold red blink"),
    AlarmState.RETURNED_UNACKED: ("cleared, unack", "magenta"),
    AlarmState.LATCHED: ("latched", "magenta"),
    AlarmState.ACTIVE_ACKED: ("acked", "yellow"),
    AlarmState.SHELVED: ("shelved", "dim"),
    AlarmState.OUT_OF_SERVICE: ("out of service", "dim"),
}


def _alarms_by_source(daemon: Daemon) -> dict[tuple[str, str], Text]:
    """(line, parameter) -> the mark of its most urgent alarm (comm-loss marks every
    parameter of its device)."""
    urgency = list(_ALARM_MARKS)
    best: dict[tuple[str, str], tuple[int, str]] = {}
    devices = {
        line.id: {param: device for param, (device, _) in line.sources.items()}
        for line in daemon.site.lines.values()
    }
    for view in daemon.lines.alarms.view():
        if view.state not in _ALARM_MARKS:
            continue
        params = [
            param
            for param, device in devices.get(view.line, {}).items()
            if (device if view.kind == "comm-loss" else param) == view.source
        ]
        for param in params:
            rank = urgency.index(view.state)
            if (view.line, param) not in best or rank < best[view.line, param][0]:
                best[view.line, param] = (rank, view.kind)
    marks = {}
    for key, (rank, kind) in best.items():
        text, style = _ALARM_MARKS[urgency[rank]]
        marks[key] = Text(f"{text} {kind}", style=style)
    return marks


# The demo's named users: (printed name, roles). Made in the demo's store at its first run,
# each with a random password kept in DATA_DIR/demo-users.txt (0600), so that the demo needs no
# typing and `pocd login -c DATA_DIR/pocd.toml --user demo-qa` works afterwards.
DEMO_USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo-operator": ("Demo Operator", ("operator",)),
    "demo-supervisor": ("Demo Supervisor", ("supervisor",)),
    "demo-qa": ("Demo QA Reviewer", ("qa",)),
    "demo-qp": ("Demo Qualified Person", ("qp",)),
    "demo-admin": ("Demo Administrator", ("admin",)),
}


def demo_users(site: Site) -> Path:
    """Make the demo's users that the store does not hold yet; returns the file that keeps
    their passwords."""
    passwords = site.data_dir / "demo-users.txt"
    with Store(site.store_path) as store:
        for login, (name, roles) in DEMO_USERS.items():
            if store.user(login) is not None:
                continue
            password = secrets.token_urlsafe(12)
            t = now_ns()
            user = User(login, name, roles, hash_password(password), False, t, t)
            audit = AuditEntry(t, "local:demo", "user.add", login, new=" ".join(roles))
            store.write([user, audit])
            fd = os.open(passwords, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as out:
                out.write(f"{login}\t{password}\t{' '.join(roles)}\n")
    return passwords


async def acknowledge_one(lines: Lines, summary: dict[str, Any]) -> None:
    """The demo operator acknowledges the first alarm raised, with a note, as an operator
    at the bedside would from the console."""
    for view in lines.alarms.view():
        if view.state in (AlarmState.ACTIVE_UNACKED, AlarmState.RETURNED_UNACKED):
            key = (view.line, view.source, view.kind)
            note = "seen on the live view: chamber door checked, closed"
            await lines.alarm_command("acknowledge", key, "demo-operator", note)
            summary["acknowledged"] = f"{'/'.join(key)} (alarm {view.alarm_id})"
            return


def run_demo(*, seconds: float | None, data_dir: str) -> int:
    """The demo for `seconds` (None: until Ctrl-C); ValueError for a length too short."""
    script = DemoScript.for_seconds(seconds)
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "pocd.log"
    console = Console()
    summary: dict[str, Any] = {}
    with log_path.open("a") as log_file:
        configure_logging("info", json=True, stream=log_file)
        # Ctrl-C completes the run (see _demo) and stops the daemon cleanly.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_demo(folder, script, console, summary))
    daemon: Daemon | None = summary.get("daemon")
    if daemon is None:
        print("The demo stopped before its devices were up; nothing was recorded.")
        return 0
    config = summary["config"]
    me = Path(sys.argv[0]).name if Path(sys.argv[0]).name == "pocd" else "pocd"
    prog = sys.argv[0] if "/" in sys.argv[0] else me
    counts = daemon.lines.counts
    run = summary.get("run", "<run>")
    print()
    for ended in summary.get("runs", []):
        print(f"Run {ended.id} (batch {ended.batch_id}) on line {ended.line} ended.")
    print(
        f"In all: {daemon.counts['samples']} samples, {counts['excursions']} excursions, "
        f"{counts['deviations']} deviations, {sum(daemon.incident_counts.values())} incidents."
    )
    print(f"The data is in {daemon.site.store_path} (log: {log_path}).")
    print(f"The demo's users and their passwords are in {summary['users']}.")
    if "acknowledged" in summary:
        print(f"demo-operator acknowledged the alarm {summary['acknowledged']}, with a note.")
    print(f"The demo's webhook receiver got {summary.get('webhook', 0)} signed notifications.")
    print("See it with:")
    print(f"  {prog} run list -c {config}")
    print(f"  {prog} run show -c {config} {run}")
    print(f"  {prog} run show -c {config} {run} --json")
    return 0


async def _demo(
    folder: Path, script: DemoScript, console: Console, summary: dict[str, Any]
) -> None:
    seconds = script.seconds
    async with contextlib.AsyncExitStack() as stack:
        hook = Receiver(
            demo_secret(folder), on_receive=partial(print_notification, console, summary)
        )
        await hook.start()
        stack.push_async_callback(hook.stop)
        endpoints = await start_simulators(stack, folder, script)
        config = write_demo_site(folder, script, hook_url=hook.url, **endpoints)
        daemon = Daemon(load_site(config))
        summary["daemon"], summary["config"] = daemon, config

        summary["users"] = demo_users(daemon.site)
        supervisor = Signer("demo-supervisor", DEMO_USERS["demo-supervisor"][0], "performed")

        async def operate() -> None:
            lines = daemon.lines
            for run in lines.runs():  # a demo interrupted earlier: close its runs
                await lines.stop_run(
                    supervisor.login,
                    abort=True,
                    reason="a new demo run starts",
                    run=run.id,
                    signature=supervisor,
                )
            batch = "DEMO-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            run = await lines.start_run(batch, PROTOCOL, None, "demo-operator", line="prodigy")
            summary["run"], summary["batch"] = run.id, batch
            summary["runs"] = [run]
            cocoon = [(script.at(a), script.at(b)) for a, b in COCOON_RUNS]
            current = None  # the Cocoon line's run going on
            started = time.monotonic()
            # The phases follow the Rotea's step number (the line's phase_source), not this
            # loop; the Cocoon's batches start and end on the script's times.
            with Live(render(daemon, started), console=console, refresh_per_second=4) as live:
                try:
                    while seconds is None or time.monotonic() - started < seconds:
                        elapsed = time.monotonic() - started
                        if current is None and cocoon and elapsed >= cocoon[0][0]:
                            n = len(summary["runs"])
                            current = await lines.start_run(
                                f"{batch}-C{n}",
                                COCOON_PROTOCOL,
                                None,
                                "demo-operator",
                                line="cocoon",
                            )
                            summary["runs"].append(current)
                        elif current is not None and elapsed >= cocoon[0][1]:
                            await lines.stop_run("demo-operator", run=current.id)
                            current, cocoon = None, cocoon[1:]
                        if "acknowledged" not in summary:
                            await acknowledge_one(lines, summary)
                        live.update(render(daemon, started))
                        await asyncio.sleep(0.25)
                except asyncio.CancelledError:  # Ctrl-C: complete the runs, then stop
                    summary["interrupted"] = True
                live.update(render(daemon, started))  # the last screen stays: the runs at the end
                for going in lines.runs():
                    await lines.stop_run("demo-operator", run=going.id)

        await run_until(daemon, operate)
