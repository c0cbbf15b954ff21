"""The OPC UA simulator: serves an OPC UA driver file's nodes from an asyncua server, for the
demo, the tests and the bench.

Some 750 lines: the server, its fault switches and its command line are one simulator, written
against the driver files only.

Nodes are laid out as the driver says: browse paths become folders and objects under the
Objects folder (so a LADS driver gets DeviceSet/Device/FunctionalUnitSet/.../SensorValue and
the Rotea driver a Rotea object with its variables), node ids become variables with exactly
those ids; AnalogItems get EURange and EngineeringUnits properties. Values follow each point's
`sim` signal (base + sine + noise, or a text), or a schedule the caller gives, and are written
every `interval` with a fresh SourceTimestamp. Faults: a Bad status on a point, a frozen
SourceTimestamp, a server restart, dropped connections, a slow server (responses delayed by a
proxy in front of the server). It must not import the transport's runner or session: it checks
pocd from the far side of the wire, sharing only the config models.

In-process API (the demo runs it as a task):

    from pocd.settings import load_driver
    from pocd.sim.opcua import serve
    task = asyncio.create_task(serve(load_driver("thermo-rotea"), "opc.tcp://127.0.0.1:4841",
        schedule={"protocol_step_number": [(0, 1), (20, 2), (40, 3), (60, 4)]}, repeat=80))

`serve(driver, endpoint, *, schedule=None, repeat=None, interval=1.0, **options)` runs until
cancelled. `schedule` maps a point to (seconds after start, value) steps: from each step's
time on, the point serves that value (a number, or a text for String nodes); `repeat` replays
the schedule every so many seconds. For faults and more control, use `OpcuaSimulator` as an
async context manager (`set_bad`, `freeze`, `restart`, `drop_connections`, `set_delay`,
`set_value`, `update`). From the command line: `pocd simulate DRIVER --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.binary_server_asyncio import BinaryServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.status_codes import StatusCodes

from pocd.configtypes import parse_duration
from pocd.settings import Driver, load_driver
from pocd.transports.opcua.config import (
    BrowseName,
    BrowsePath,
    NodeIdText,
    OpcuaPoint,
    OpcuaSettings,
    SimSignal,
    parse_browse_path,
    parse_node,
)
from pocd.transports.opcua.security import application_uri_of, load_certificate

__all__ = ["OpcuaSimulator", "Schedule", "main", "serve"]

ScheduleValue = float | int | bool | str
Schedule = Mapping[str, Sequence[tuple[float, ScheduleValue]]]

_VARIANTS = {
    "Double": ua.VariantType.Double,
    "Float": ua.VariantType.Float,
    "Int16": ua.VariantType.Int16,
    "UInt16": ua.VariantType.UInt16,
    "Int32": ua.VariantType.Int32,
    "UInt32": ua.VariantType.UInt32,
    "Int64": ua.VariantType.Int64,
    "Boolean": ua.VariantType.Boolean,
    "String": ua.VariantType.String,
    "LocalizedText": ua.VariantType.LocalizedText,
}
_QN_RANGE = ua.QualifiedName("EURange", ua.UInt16(0))
_QN_UNITS = ua.QualifiedName("EngineeringUnits", ua.UInt16(0))
_INTEGERS = {"Int16", "UInt16", "Int32", "UInt32", "Int64"}
_POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256/Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256/SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    "Aes128_Sha256_RsaOaep/Sign": ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    "Aes128_Sha256_RsaOaep/SignAndEncrypt": (
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt
    ),
    "Aes256_Sha256_RsaPss/Sign": ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    "Aes256_Sha256_RsaPss/SignAndEncrypt": ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
}


class _Users(UserManager):
    """asyncua user manager: the given users with their passwords, nobody anonymous."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


@dataclass(slots=True, eq=False)
class _SimNode:
    name: str
    point: OpcuaPoint
    signal: SimSignal
    variant: ua.VariantType
    node_id: ua.NodeId | None = None
    value: ScheduleValue | None = None  # set by set_value, over the signal and the schedule
    bad: str | None = None  # a Bad status name while a fault is on
    frozen: datetime | None = None  # the SourceTimestamp served while frozen
    last: ua.DataValue | None = None
    steps: list[tuple[float, ScheduleValue]] = field(default_factory=list)


class _Proxy:
    """A TCP relay in front of the server that can delay the server's answers (a slow server)."""

    def __init__(self, host: str, port: int, target_port: int) -> None:
        self.host, self.port, self.target_port = host, port, target_port
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst, delayed in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pump(src, dst, delayed), name="opcua-sim-proxy")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delayed: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()
            self._writers.discard(dst)

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class OpcuaSimulator:
    """An asyncua server serving one driver file's nodes. Use as an async context manager."""

    def __init__(
        self,
        driver: Driver,
        endpoint: str = "opc.tcp://127.0.0.1:4840",
        *,
        interval: float = 1.0,
        seed: int = 0,
        schedule: Schedule | None = None,
        repeat: float | None = None,
        root: str | None = None,
        namespaces: Mapping[str, str] | None = None,
        certificate: Path | None = None,
        private_key: Path | None = None,
        policies: Sequence[str] | None = None,
        users: Mapping[str, str] | None = None,
        proxy: bool = False,
    ) -> None:
        if driver.info.transport != "opcua":
            raise ValueError(f"driver {driver.info.id!r} is not an OPC UA driver")
        settings = OpcuaSettings.model_validate(dict(driver.defaults))
        self.driver = driver
        self.endpoint = endpoint
        self.interval = interval
        self.repeat = repeat
        self.root = root if root is not None else settings.root
        self.namespaces = {**settings.namespaces, **(namespaces or {})}
        self.certificate = certificate
        self.private_key = private_key
        self.users = users
        secured = certificate is not None and private_key is not None
        self.policies = list(policies or (list(_POLICIES) if secured else ["None"]))
        unknown = [p for p in self.policies if p not in _POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown} (known: {', '.join(_POLICIES)})")
        if not secured and self.policies != ["None"]:
            raise ValueError("secure policies need a certificate and a private key")
        self._rng = random.Random(seed)
        self.nodes: dict[str, _SimNode] = {}
        for name, body in driver.points.items():
            point = OpcuaPoint.model_validate(dict(body))
            signal = point.sim or SimSignal()
            self.nodes[name] = _SimNode(name, point, signal, _VARIANTS[signal.type])
        for name, steps in (schedule or {}).items():
            if name not in self.nodes:
                raise KeyError(f"schedule for unknown point {name!r} (points: {list(self.nodes)})")
            self.nodes[name].steps = sorted(steps, key=lambda step: step[0])
        url = urlparse(endpoint)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port if url.port is not None else 4840  # 0: any free port
        self._proxy = _Proxy(self.host, self.port, 0) if proxy else None
        self._server: Server | None = None
        self._ns: dict[str, int] = {}  # alias or URI -> index, as registered
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None
        self.writes = 0  # values written, for the bench
        self.restarts = 0

    # --- life cycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> OpcuaSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._proxy is not None:
            await self._proxy.start()
            self.port = self._proxy.port
        await self._start_server()
        self._started = time.monotonic()  # the schedule starts when clients can connect
        await self.update()
        self._task = asyncio.create_task(self._update_loop(), name="opcua-sim-values")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_server()
        if self._proxy is not None:
            await self._proxy.stop()

    async def _start_server(self) -> None:
        server = Server()
        await server.init()
        server.set_server_name(f"pocd simulator: {self.driver.info.id}")
        if self._proxy is not None:
            server.set_endpoint("opc.tcp://127.0.0.1:0/")
        else:
            server.set_endpoint(f"opc.tcp://{self.host}:{self.port}/")
        server.set_security_policy([_POLICIES[p] for p in self.policies])
        if self.certificate is not None and self.private_key is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            cert = load_certificate(self.certificate, self.driver.info.id, "server certificate")
            uri = application_uri_of(cert)
            if uri is not None:  # clients check the server's URI against its certificate's
                await server.set_application_uri(uri)
        if self.users is not None:
            server.iserver.user_manager = _Users(self.users)
            server.set_identity_tokens([ua.UserNameIdentityToken])
        await self._build(server)
        await server.start()
        if self._proxy is not None:
            assert server.bserver is not None
            self._proxy.target_port = server.bserver.port
        elif self.port == 0 and server.bserver is not None:
            self.port = server.bserver.port
            self.endpoint = f"opc.tcp://{self.host}:{self.port}"
        self._server = server

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
            await _close_sessions(server)

    # --- the address space --------------------------------------------------------------------

    async def _namespace(self, prefix: int | str, server: Server) -> int:
        if isinstance(prefix, int):
            while len(await server.get_namespace_array()) <= prefix:
                count = len(await server.get_namespace_array())
                await server.register_namespace(f"urn:pocd:sim:ns{count}")
            return prefix
        uri = self.namespaces.get(prefix, prefix)
        if uri not in self._ns:
            self._ns[uri] = await server.register_namespace(uri)
        return self._ns[uri]

    async def _child(self, parent: Node, element: BrowseName, server: Server) -> Node:
        index = await self._namespace(element.namespace, server)
        for child in await parent.get_children():
            name = await child.read_browse_name()
            if name.Name == element.name and name.NamespaceIndex == index:
                return child
        return await parent.add_object(index, element.name)

    async def _walk(self, elements: Sequence[BrowseName], server: Server) -> Node:
        node: Node = server.nodes.objects
        for element in elements:
            node = await self._child(node, element, server)
        return node

    async def _build(self, server: Server) -> None:
        self._ns = {}
        root_path = parse_browse_path(self.root) if self.root else None
        root = await self._walk(root_path.elements, server) if root_path else None
        for sim in self.nodes.values():
            ref = parse_node(sim.point.node)
            initial = ua.Variant(self._value(sim, 0.0), sim.variant)
            if isinstance(ref, NodeIdText):
                parsed = ua.NodeId.from_string(ref.text)
                uri = getattr(parsed, "NamespaceUri", None)
                index = await self._namespace(uri if uri else parsed.NamespaceIndex, server)
                node_id = ua.NodeId(parsed.Identifier, ua.Int16(index), parsed.NodeIdType)
                parent = root or server.nodes.objects
                var = await parent.add_variable(
                    node_id, ua.QualifiedName(sim.name, ua.UInt16(index)), initial
                )
            else:
                path = ref if ref.absolute or root_path is None else _join(root_path, ref)
                parent = await self._walk(path.elements[:-1], server)
                leaf = path.elements[-1]
                index = await self._namespace(leaf.namespace, server)
                var = await parent.add_variable(index, leaf.name, initial)
            if sim.signal.eu_range is not None:
                low, high = sim.signal.eu_range
                home = ua.NodeId(ua.Int32(0), var.nodeid.NamespaceIndex)  # 0: the server picks
                await var.add_property(home, _QN_RANGE, ua.Range(Low=low, High=high))
                units = ua.EUInformation(
                    NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
                    DisplayName=ua.LocalizedText(sim.point.unit),
                    Description=ua.LocalizedText(sim.point.unit),
                )
                await var.add_property(home, _QN_UNITS, units)
            sim.node_id = var.nodeid
            if sim.last is not None:  # a restart: serve what was served before it
                await server.write_attribute_value(var.nodeid, sim.last)

    # --- values -------------------------------------------------------------------------------

    def _value(self, sim: _SimNode, elapsed: float) -> Any:
        if sim.value is not None:
            return _as_type(sim.value, sim.signal.type)
        if sim.steps:
            t = elapsed % self.repeat if self.repeat else elapsed
            current: ScheduleValue | None = None
            for start, value in sim.steps:
                if start <= t:
                    current = value
            if current is not None:
                return _as_type(current, sim.signal.type)
        signal = sim.signal
        if signal.type in ("String", "LocalizedText"):
            return _as_type(signal.text, signal.type)
        number = signal.base
        if signal.amplitude:
            number += signal.amplitude * math.sin(2 * math.pi * elapsed / signal.period)
        if signal.noise:
            number += self._rng.gauss(0.0, signal.noise)
        return _as_type(number, signal.type)

    async def update(self) -> None:
        """Write every node's current value now (the update loop does this every interval)."""
        server = self._server
        if server is None:
            return
        elapsed = time.monotonic() - self._started
        now = datetime.now(UTC)
        for sim in self.nodes.values():
            if sim.node_id is None:
                continue
            variant = ua.Variant(self._value(sim, elapsed), sim.variant)
            status = ua.StatusCode(
                ua.UInt32(getattr(StatusCodes, sim.bad) if sim.bad else StatusCodes.Good)
            )
            data = ua.DataValue(
                variant,
                StatusCode=status,
                SourceTimestamp=_stamp(sim.frozen or now),
                ServerTimestamp=_stamp(now),
            )
            sim.last = data
            await server.write_attribute_value(sim.node_id, data)
            self.writes += 1

    async def _update_loop(self) -> None:
        tick = 0
        while True:
            tick += 1
            # On a grid from the start, so values do not drift however long an update takes.
            await asyncio.sleep(max(0.0, self._started + tick * self.interval - time.monotonic()))
            await self.update()

    # --- faults and control -------------------------------------------------------------------

    def _points(self, point: str | None) -> list[_SimNode]:
        if point is None:
            return list(self.nodes.values())
        if point not in self.nodes:
            raise KeyError(f"unknown point {point!r} (points: {', '.join(self.nodes)})")
        return [self.nodes[point]]

    def node_id(self, point: str) -> str:
        """The node id a point is served at, as text (after `start`)."""
        node_id = self.nodes[point].node_id
        if node_id is None:
            raise RuntimeError("the simulator has not started")
        text: str = node_id.to_string()
        return text

    def set_value(self, point: str, value: ScheduleValue | None) -> None:
        """Serve this value (None: back to the schedule or the signal) from the next update."""
        self._points(point)[0].value = value

    def set_bad(self, point: str | None, status: str | None = "BadCommunicationError") -> None:
        """Serve a Bad status (None clears it) on a point, or on every point."""
        if status is not None and not isinstance(getattr(StatusCodes, status, None), int):
            raise ValueError(f"unknown status code {status!r}")
        for sim in self._points(point):
            sim.bad = status

    def freeze(
        self, point: str | None = None, frozen: bool = True, at: datetime | None = None
    ) -> None:
        """Stop (or restart) the SourceTimestamp of a point, or of every point; values go on.
        `at` serves that SourceTimestamp instead of the last one (e.g. a time no device gives:
        asyncua encodes 9999-12-31 as OPC UA's DateTime.MaxValue)."""
        now = datetime.now(UTC)
        for sim in self._points(point):
            last = sim.last.SourceTimestamp if sim.last else now
            sim.frozen = (at or last) if frozen else None

    async def restart(self, down_for: float = 0.0) -> None:
        """Restart the server's OPC UA stack: the port closes, every connection and session
        ends, and after `down_for` seconds it listens again, serving the same nodes. (The
        address space is kept: building asyncua's standard nodes anew takes seconds.)"""
        server = self._server
        if server is None or server.bserver is None:
            raise RuntimeError("the simulator has not started")
        self._server = None  # no value updates while it is down, as on a rebooting device
        await server.bserver.stop()
        await _close_sessions(server)
        await asyncio.sleep(down_for)
        # What Server.start does for its binary server, with the endpoints already set up.
        bserver = BinaryServer(
            server.iserver, server.bserver.hostname, server.bserver.port, server.limits
        )
        bserver.set_policies(server._policies)
        await bserver.start()
        server.bserver = bserver
        self._server = server
        self.restarts += 1

    def drop_connections(self) -> None:
        """Close every client connection, as a network fault would; the server stays up."""
        if self._proxy is not None:
            self._proxy.drop()
        if self._server is not None:
            for transport in list(self._server.iserver.asyncio_transports):
                transport.close()

    async def expire_sessions(self) -> None:
        """End every client session on the server while the connections stay open, as a
        server does when a session times out; the client hears of it at its next request."""
        if self._server is not None:
            await _close_sessions(self._server)

    def set_delay(self, seconds: float) -> None:
        """Delay every answer of the server by this much (needs `proxy=True`)."""
        if self._proxy is None:
            raise RuntimeError("a slow server needs the simulator started with proxy=True")
        self._proxy.delay = seconds


async def _close_sessions(server: Server) -> None:
    # asyncua keeps a session with subscriptions alive after its connection closes, for the
    # client to take it over (Part 4, 6.7); a stopped server has no one to keep it for.
    for session in list(server.iserver._external_sessions.values()):
        await session.close_session(True)


def _stamp(moment: datetime) -> ua.DateTime:
    # asyncua types timestamps as its DateTime subclass, and encodes any aware datetime.
    return cast("ua.DateTime", moment)


def _join(root: BrowsePath, ref: BrowsePath) -> BrowsePath:
    return BrowsePath(root.elements + ref.elements, absolute=True)


def _as_type(value: ScheduleValue, type_name: str) -> Any:
    if type_name == "String":
        return str(value)
    if type_name == "LocalizedText":
        return ua.LocalizedText(str(value))
    if type_name == "Boolean":
        return bool(value) if not isinstance(value, str) else value.lower() in ("1", "true")
    if isinstance(value, str):
        value = float(value)
    if type_name in _INTEGERS:
        return round(value)
    return float(value)


async def serve(
    driver: Driver,
    endpoint: str,
    *,
    schedule: Schedule | None = None,
    repeat: float | None = None,
    interval: float = 1.0,
    **options: Any,
) -> None:
    """Serve the driver's nodes at `endpoint` until cancelled (see the module docstring)."""
    async with OpcuaSimulator(
        driver, endpoint, schedule=schedule, repeat=repeat, interval=interval, **options
    ):
        await asyncio.Event().wait()


# --- command line ---------------------------------------------------------------------------

_WINDOW = re.compile(r"^(?P<what>[^@]*)@(?P<start>[^+]+)(?:\+(?P<duration>.+))?$")


@dataclass(frozen=True, slots=True)
class _Event:
    at: float
    action: str  # bad, good, freeze, thaw, restart, slow, fast, drop
    point: str | None = None
    arg: str = ""


def _seconds(text: str) -> float:
    """Seconds from "3", "2.5", "90s" or "1m30s"."""
    try:
        return parse_duration(float(text))
    except ValueError:
        return parse_duration(text)


def _window(text: str, option: str) -> tuple[str, float, float | None]:
    found = _WINDOW.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{option} {text!r}: expected WHAT@START[+DURATION]")
    duration = found.group("duration")
    return (
        found.group("what"),
        _seconds(found.group("start")),
        _seconds(duration) if duration else None,
    )


def _events(args: argparse.Namespace) -> list[_Event]:
    events: list[_Event] = []
    for text in args.bad:
        what, start, duration = _window(text, "--bad")
        point, _, status = what.partition("=")
        target = None if point in ("", "all") else point
        events.append(_Event(start, "bad", target, status or "BadCommunicationError"))
        if duration is not None:
            events.append(_Event(start + duration, "good", target))
    for text in args.freeze:
        what, start, duration = _window(text, "--freeze")
        target = None if what in ("", "all") else what
        events.append(_Event(start, "freeze", target))
        if duration is not None:
            events.append(_Event(start + duration, "thaw", target))
    for text in args.restart:
        _, start, down = _window(f"@{text}", "--restart")
        events.append(_Event(start, "restart", arg=str(down or 0.0)))
    for text in args.slow:
        what, start, duration = _window(text, "--slow")
        events.append(_Event(start, "slow", arg=str(_seconds(what))))
        if duration is not None:
            events.append(_Event(start + duration, "slow", arg="0"))
    events.extend(_Event(_seconds(text), "drop") for text in args.drop)
    return sorted(events, key=lambda e: e.at)


def _schedule(texts: Sequence[str]) -> dict[str, list[tuple[float, ScheduleValue]]]:
    """--set POINT=T:V,T:V (a value is a number, or a text for String nodes)."""
    out: dict[str, list[tuple[float, ScheduleValue]]] = {}
    for text in texts:
        point, sep, steps = text.partition("=")
        if not sep or not steps:
            raise argparse.ArgumentTypeError(f"--set {text!r}: expected POINT=T:V[,T:V...]")
        for step in steps.split(","):
            at, sep, value = step.partition(":")
            if not sep:
                raise argparse.ArgumentTypeError(f"--set {text!r}: a step is SECONDS:VALUE")
            parsed: ScheduleValue
            try:
                parsed = float(value)
            except ValueError:
                parsed = value
            out.setdefault(point, []).append((_seconds(at), parsed))
    return out


async def _apply(sim: OpcuaSimulator, event: _Event) -> None:
    if event.action == "bad":
        sim.set_bad(event.point, event.arg)
    elif event.action == "good":
        sim.set_bad(event.point, None)
    elif event.action in ("freeze", "thaw"):
        sim.freeze(event.point, event.action == "freeze")
    elif event.action == "restart":
        await sim.restart(float(event.arg))
    elif event.action == "slow":
        sim.set_delay(float(event.arg))
    else:
        sim.drop_connections()
    print(f"{time.strftime('%H:%M:%S')} {event.action} {event.point or ''} {event.arg}".rstrip())


async def _run(driver: Driver, args: argparse.Namespace) -> int:
    events = _events(args)
    users = None
    if args.user:
        name, _, env = args.user.partition(":")
        import os

        password = os.environ.get(env or "POCD_SIM_PASSWORD")
        if not password:
            print(f"pocd: --user {args.user}: the environment variable is not set", file=sys.stderr)
            return 2
        users = {name: password}
    sim = OpcuaSimulator(
        driver,
        args.endpoint,
        interval=args.interval,
        seed=args.seed,
        schedule=_schedule(args.set),
        repeat=args.repeat,
        root=args.root,
        namespaces=dict(ns.split("=", 1) for ns in args.namespace),
        certificate=args.certificate,
        private_key=args.private_key,
        policies=args.policy or None,
        users=users,
        proxy=bool(args.slow),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        print(f"serving {driver.info.id} at {sim.endpoint} ({', '.join(sim.policies)})")
        for name in sim.nodes:
            print(f"  {name:<24} {sim.node_id(name)}")
        sys.stdout.flush()
        started = time.monotonic()
        for event in events:
            delay = started + event.at - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, delay))
            if stop.is_set():
                break
            await _apply(sim, event)
            sys.stdout.flush()
        remaining = None if args.duration is None else args.duration - (time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), remaining)
    return 0


def build_parser(prog: str = "pocd simulate DRIVER") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default="opc.tcp://127.0.0.1:4840")
    parser.add_argument("--interval", type=_seconds, default=1.0, help="value updates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="POINT=T:V,...", help="scheduled values"
    )
    parser.add_argument("--repeat", type=_seconds, help="replay the schedule every N s")
    parser.add_argument("--root", help="override the driver's root browse path")
    parser.add_argument("--namespace", action="append", default=[], metavar="ALIAS=URI")
    parser.add_argument(
        "--bad", action="append", default=[], metavar="POINT[=STATUS]@START[+DURATION]"
    )
    parser.add_argument("--freeze", action="append", default=[], metavar="POINT@START[+DURATION]")
    parser.add_argument("--restart", action="append", default=[], metavar="START[+DOWN]")
    parser.add_argument("--slow", action="append", default=[], metavar="DELAY@START[+DURATION]")
    parser.add_argument("--drop", action="append", default=[], metavar="START")
    parser.add_argument("--certificate", type=Path, help="server certificate (with --private-key)")
    parser.add_argument("--private-key", type=Path)
    parser.add_argument(
        "--policy", action="append", default=[], choices=list(_POLICIES), help="repeatable"
    )
    parser.add_argument(
        "--user", metavar="NAME[:ENV]", help="require this user; password from $ENV"
    )
    parser.add_argument("--duration", type=_seconds, help="stop after N s")
    return parser


def main(driver: Driver, argv: Sequence[str]) -> int:
    """`pocd simulate DRIVER [options]` for an OPC UA driver."""
    args = build_parser().parse_args(list(argv))
    try:
        return asyncio.run(_run(driver, args))
    except (ValueError, KeyError, OSError) as exc:
        print(f"pocd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m pocd.sim.opcua DRIVER|FILE.toml [options]", file=sys.stderr)
        sys.exit(2)
    _path = Path(sys.argv[1])
    _dirs = [_path.resolve().parent] if _path.suffix == ".toml" else []
    sys.exit(main(load_driver(_path.stem if _dirs else sys.argv[1], _dirs), sys.argv[2:]))
