"""The serial simulator: serves any serial driver file on one end of a pty pair, for the demo,
the tests, the bench and `pocd simulate DRIVER`. Some 630 lines: the framing, the reply
templates and the faults act on one reply at a time and are read together.

It answers the commands listed in the driver's `[defaults.sim]` table with reply templates
filled from the points' signal models (base + sine + noise, `sim` of each point), frames them
as the driver says (terminator or STX/ETX, checksum), and streams when told to (MT-SICS `SIR`).
Faults, each active from `after` for `for` seconds and on every `every`-th reply: `partial`
lines, `garbage` bytes, `silence` (no reply), `error` replies, bad `checksum`s, `slow`
replies, the port that `vanish`es (the pty pair is removed, then made again), and `set`
(a template value forced, e.g. MT-SICS `S D` while moving, an Alicat status word).
It must not import the transport's runner or port: it checks pocd from the far side of the
wire, sharing only the codec and the models.

In-process API, for the demo and the tests (runs until cancelled):

    async with PtyPair("/tmp/pocd-balance") as pair:   # pocd's port: /tmp/pocd-balance
        async with asyncio.TaskGroup() as tg:
            tg.create_task(serve(load_driver("mettler-sics"), pair), name="sim:balance")

    async def serve(driver: Driver | str, port: str | PtyPair, *, faults: Sequence[Fault] = (),
                    settings: Mapping[str, Any] | None = None, seed: int = 0,
                    ready: asyncio.Event | None = None) -> None

`port` is a `PtyPair` (the simulator serves its `device` end; needed for `vanish`) or the path
of the simulator's end of a pty pair made elsewhere. `settings` overrides the driver's
defaults as a site config's `transport` table would (e.g. `{"address": "B"}`); `ready` is set
once the port is open. For counters (`commands`, `replies`, `opens`), build a
`SerialSimulator` and await its `serve`; for several units on one RS-485 port, `serve_bus`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import subprocess
import termios
import time
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import serial_asyncio_fast

# pyserial's module, not its package: see pocd.transports.serial.port.
from serial.serialutil import SerialException

from pocd.configtypes import parse_duration
from pocd.settings import Driver, load_driver
from pocd.transports.serial.codec import STX, Codec, Frame, make_framer, substitute
from pocd.transports.serial.config import (
    SerialPoint,
    SerialSettings,
    SimReply,
    SimulatorModel,
)

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "PtyPair",
    "SerialSimulator",
    "main",
    "parse_fault",
    "serve",
    "serve_bus",
]

FaultKind = Literal["partial", "garbage", "silence", "error", "checksum", "slow", "vanish", "set"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "partial",
    "garbage",
    "silence",
    "error",
    "checksum",
    "slow",
    "vanish",
    "set",
)
# Bytes for the garbage fault: none of them is a terminator, STX, ETX or printable text, so
# garbage never completes a frame or turns into a believable value by itself.
_GARBAGE = bytes([0x00, 0x07, 0x11, 0x7F, 0x81, 0xA5, 0xC3, 0xFE, 0xFF])
_REOPEN = 0.05  # seconds between attempts to reopen the simulator's end of the pair


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault the simulator injects; see the module docstring.

    It is active from `after` seconds (since the simulator started) for `duration` seconds
    (None: until the end), on every `every`-th reply or streamed line. `code` picks the error
    reply (by its text, default the driver's first); `delay` is the slowness of `slow`;
    `var`/`value` is what `set` forces.
    """

    kind: FaultKind
    after: float = 0.0
    duration: float | None = None
    every: int = 1
    code: str = ""
    delay: float = 0.5
    var: str = ""
    value: str = ""

    def active(self, elapsed: float) -> bool:
        if elapsed < self.after:
            return False
        return self.duration is None or elapsed < self.after + self.duration


def parse_fault(text: str) -> Fault:
    """A fault from `KIND[,key=value...]`, e.g. `silence,after=5s,for=10s`, `error,code=ES`,
    `slow,delay=800ms,every=3`, `set,var=status,value=D`, `vanish,after=2s,for=3s`."""
    kind, *options = text.split(",")
    kind = kind.strip()
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault {kind!r} (one of {', '.join(FAULT_KINDS)})")
    values: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"fault option {option!r} is not key=value")
        if key == "after":
            values["after"] = parse_duration(value.strip())
        elif key == "for":
            values["duration"] = parse_duration(value.strip())
        elif key == "delay":
            values["delay"] = parse_duration(value.strip())
        elif key == "every":
            values["every"] = int(value)
        elif key in ("code", "var"):
            values[key] = value.strip()
        elif key == "value":
            values["value"] = value  # kept as given: a status word may need its leading space
        else:
            raise ValueError(f"unknown fault option {key!r}")
    if values.get("every", 1) < 1:
        raise ValueError("every must be 1 or more")
    if kind == "set" and not values.get("var"):
        raise ValueError("a set fault needs var=NAME")
    return Fault(kind, **values)


class PtyPair:
    """A socat pty pair: pocd opens `host`, the simulator `device` (both symlinks).

    `unplug` removes the pair as a pulled USB adapter would (the links vanish and both ends
    see the port lost); `plug` makes it again under the same names.
    """

    def __init__(self, host: str, device: str | None = None) -> None:
        self.host = host
        self.device = device or f"{host}.sim"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def plugged(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def plug(self) -> None:
        if self.plugged:
            return
        self._proc = await asyncio.create_subprocess_exec(
            "socat",
            f"pty,raw,echo=0,link={self.device}",
            f"pty,raw,echo=0,link={self.host}",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        # (Looking up two links in /dev or /tmp takes microseconds: not worth a thread.)
        while not (os.path.exists(self.device) and os.path.exists(self.host)):  # noqa: ASYNC240
            if self._proc.returncode is not None or time.monotonic() > deadline:
                await self.unplug()
                raise RuntimeError(f"socat could not make a pty pair at {self.host}")
            await asyncio.sleep(0.005)

    async def unplug(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        for link in (self.host, self.device):  # socat removes them; a killed one may not
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)

    async def __aenter__(self) -> PtyPair:
        await self.plug()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unplug()


class _Wire(asyncio.Protocol):
    """The simulators' end of the line: frames commands in, hands each to every simulator on
    it (on a bus, each answers only its own)."""

    def __init__(self, simulators: Sequence[SerialSimulator]) -> None:
        self.simulators = simulators
        settings = simulators[0].settings
        self.framer = make_framer(settings.framing, settings.request_terminator, settings.max_frame)
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        bus = len(self.simulators) > 1
        for frame in self.framer.feed(data):
            for simulator in self.simulators:
                simulator.received(frame, self, bus=bus)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)


class SerialSimulator:
    """One simulated serial device, built from a driver file; see the module docstring."""

    def __init__(
        self,
        driver: Driver | str,
        *,
        faults: Sequence[Fault] = (),
        settings: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(driver, str):
            driver = load_driver(driver)
        if driver.info.transport != "serial":
            raise ValueError(f"driver {driver.info.id!r} is not a serial driver")
        self.name = driver.info.id
        self.settings = SerialSettings.model_validate({**driver.defaults, **(settings or {})})
        self.points = {
            name: SerialPoint.model_validate(body) for name, body in driver.points.items()
        }
        self.model: SimulatorModel = self.settings.sim or SimulatorModel()
        self.codec = Codec(self.settings)
        self.faults = list(faults)
        if any(f.kind == "checksum" for f in self.faults) and self.codec.checksum is None:
            raise ValueError(f"driver {self.name!r} has no checksum to corrupt")
        self.address = self.settings.address
        self.commands: Counter[str] = Counter()  # commands received, by text
        self.replies = 0  # replies and streamed lines sent
        self.opens = 0  # times the simulator's end was opened
        self.streaming = False
        self._rng = random.Random(seed)
        self._hits: Counter[int] = Counter()  # per fault: replies it could have applied to
        self._started = time.monotonic()
        self._entries = [(entry, self._matcher(entry)) for entry in self.model.replies]
        stream = self.model.stream
        self._stream_start = (
            {substitute(c, self.address, pattern=False) for c in stream.start} if stream else set()
        )
        self._stream_stop = (
            {substitute(c, self.address, pattern=False) for c in stream.stop} if stream else set()
        )
        self.streaming = stream is not None and not stream.start
        self._check_templates()

    def _check_templates(self) -> None:
        """Render every template once, so that a driver's mistake shows at start, not on the
        first command that needs it."""
        names = {"command"}
        for _, matcher in self._entries:
            if not isinstance(matcher, str):
                names.update(matcher.groupindex)
        values = {**self.values(0.0), **dict.fromkeys(names, "0")}
        model = self.model
        templates = [e.reply for e in model.replies] + [model.unknown, *model.errors]
        templates += [model.bad_checksum or "", model.stream.template if model.stream else ""]
        for template in templates:
            try:
                template.format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"driver {self.name!r}: sim template {template!r}: {exc!r}"
                ) from None

    def _matcher(self, entry: SimReply) -> str | re.Pattern[str]:
        if entry.command is not None:
            return substitute(entry.command, self.address, pattern=False)
        assert entry.pattern is not None
        return re.compile(substitute(entry.pattern, self.address, pattern=True))

    # --- values ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the simulator started serving: the clock of the fault windows."""
        return time.monotonic() - self._started

    def start_clock(self) -> None:
        self._started = time.monotonic()

    def values(self, elapsed: float) -> dict[str, Any]:
        """Template values at `elapsed` seconds: points, vars, address, with `set` faults."""
        values: dict[str, Any] = {"address": self.address, **self.model.vars}
        for name, point in self.points.items():
            signal_model = point.sim
            value = 0.0
            if signal_model is not None:
                value = signal_model.base
                if signal_model.amplitude:
                    phase = 2 * math.pi * elapsed / signal_model.period
                    value += signal_model.amplitude * math.sin(phase)
                if signal_model.noise:
                    value += self._rng.gauss(0.0, signal_model.noise)
            # The device sends its own number; the driver's scale and offset undo it.
            raw = (value - point.offset) / point.scale if point.scale else value
            if point.codes:
                by_number = {number: text for text, number in point.codes.items()}
                values[name] = by_number.get(round(value), next(iter(point.codes)))
            else:
                values[name] = raw
        for fault in self.faults:
            if fault.kind == "set" and fault.active(elapsed):
                values[fault.var] = fault.value
        return values

    # --- answering -------------------------------------------------------------------------

    def received(self, frame: Frame, wire: _Wire, *, bus: bool = False) -> None:
        """A command arrived. On a bus (several units on the wire) a unit stays silent to
        commands it does not know, as an addressed RS-485 device does."""
        if frame.fault or not frame.data:
            return  # a device ignores what it cannot read as a command
        data = frame.data
        text = data.decode("latin-1")
        bad_checksum = False
        if self.settings.checksum_commands and self.codec.checksum is not None:
            stripped = self._strip_checksum(data)
            if stripped is None:
                bad_checksum = True
                text = data[: -self.codec.checksum.digits].decode("latin-1")
            else:
                text = stripped
        self.commands[text] += 1
        if text in self._stream_start:
            self.streaming = True
            return
        if text in self._stream_stop:
            self.streaming = False
        template, groups, known = self._template(text)
        if bus and not known:
            return
        if bad_checksum:
            template = (
                self.model.bad_checksum
                if self.model.bad_checksum is not None
                else self.model.unknown
            )
        if template:
            self.send(template, groups, wire)

    def _strip_checksum(self, data: bytes) -> str | None:
        checksum = self.codec.checksum
        assert checksum is not None
        sep = self.settings.checksum_separator.encode("latin-1")
        body, sent = data[: -checksum.digits], data[-checksum.digits :]
        if not body.endswith(sep) or sent.upper() != checksum.text(body).upper():
            return None
        return body[: len(body) - len(sep)].decode("latin-1")

    def _template(self, command: str) -> tuple[str, dict[str, str], bool]:
        """The reply template for a command, the values it may use, and whether it is known."""
        for entry, matcher in self._entries:
            if isinstance(matcher, str):
                if matcher == command:
                    return entry.reply, {"command": command}, True
            else:
                found = matcher.fullmatch(command)
                if found is not None:
                    groups = {k: v for k, v in found.groupdict().items() if v is not None}
                    return entry.reply, {"command": command, **groups}, True
        return self.model.unknown, {"command": command}, False

    def _active(self, kind: FaultKind, elapsed: float) -> Fault | None:
        found = None
        for index, fault in enumerate(self.faults):
            if fault.kind == kind and fault.active(elapsed):
                self._hits[index] += 1
                if (self._hits[index] - 1) % fault.every == 0:
                    found = fault
        return found

    def render(self, template: str, groups: Mapping[str, str], elapsed: float) -> bytes | None:
        """The bytes of one reply at `elapsed`, faults applied; None for no reply."""
        if self._active("silence", elapsed) is not None:
            return None
        error = self._active("error", elapsed)
        if error is not None and (error.code or self.model.errors):
            # The driver's error reply of that text (or its first); an unlisted code as it is.
            chosen = [e for e in self.model.errors if e == error.code or not error.code]
            template = chosen[0] if chosen else error.code
        values = {**self.values(elapsed), **groups}
        try:
            text = template.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"driver {self.name!r}: sim template {template!r}: {exc}") from None
        data = self.codec.seal(text)
        if self._active("checksum", elapsed) is not None:
            data = self._corrupt_checksum(data)
        garbage = self._active("garbage", elapsed)
        if garbage is not None:
            data = bytes(self._rng.choice(_GARBAGE) for _ in range(4)) + data
        if self._active("partial", elapsed) is not None:
            data = data[: max(1, len(data) // 2)]
        return data

    def _corrupt_checksum(self, data: bytes) -> bytes:
        checksum = self.codec.checksum
        assert checksum is not None
        end = len(data) - (1 if data.startswith(STX) else len(self.settings.reply_terminator))
        start = end - checksum.digits
        digits = data[start:end].decode("latin-1")
        wrong = format((int(digits, 16) + 1) % (16**checksum.digits), f"0{checksum.digits}x")
        wrong = wrong.upper() if checksum.upper else wrong
        return data[:start] + wrong.encode() + data[end:]

    def send(self, template: str, groups: Mapping[str, str], wire: _Wire) -> None:
        elapsed = self.elapsed()
        data = self.render(template, groups, elapsed)
        if data is None:
            return
        self.replies += 1
        slow = self._active("slow", elapsed)
        if slow is not None:
            asyncio.get_running_loop().call_later(slow.delay, wire.write, data)
        else:
            wire.write(data)

    # --- serving ---------------------------------------------------------------------------

    async def serve(self, port: str | PtyPair, *, ready: asyncio.Event | None = None) -> None:
        """Serve on `port` until cancelled; reopen the simulator's end when it vanishes."""
        await serve_bus([self], port, ready=ready)

    async def _stream(self, wires: list[_Wire]) -> None:
        stream = self.model.stream
        assert stream is not None
        while True:
            await asyncio.sleep(stream.period)
            if self.streaming and wires:
                self.send(stream.template, {}, wires[0])

    async def _vanish(self, pair: PtyPair) -> None:
        for fault in sorted((f for f in self.faults if f.kind == "vanish"), key=lambda f: f.after):
            await asyncio.sleep(max(0.0, fault.after - self.elapsed()))
            await pair.unplug()
            if fault.duration is None:
                return
            await asyncio.sleep(fault.duration)
            await pair.plug()


async def serve_bus(
    simulators: Sequence[SerialSimulator],
    port: str | PtyPair,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve several units on one port (an RS-485 bus) until cancelled. They share the first
    one's framing; each answers the commands it knows."""
    if not simulators:
        raise ValueError("no simulator to serve")
    pair = port if isinstance(port, PtyPair) else None
    path = port.device if isinstance(port, PtyPair) else port
    wires: list[_Wire] = []  # the open wire, if any: the streaming tasks write to it
    for simulator in simulators:
        simulator.start_clock()
    async with asyncio.TaskGroup() as group:
        for simulator in simulators:
            if any(f.kind == "vanish" for f in simulator.faults):
                if pair is None:
                    raise ValueError("the vanish fault needs a PtyPair (pocd simulate --link)")
                group.create_task(simulator._vanish(pair), name=f"sim:{simulator.name}:vanish")
            if simulator.model.stream is not None:
                group.create_task(simulator._stream(wires), name=f"sim:{simulator.name}:stream")
        while True:
            wire = await _open(simulators, path)
            if wire is None:
                await asyncio.sleep(_REOPEN)
                continue
            for simulator in simulators:
                simulator.opens += 1
            wires.append(wire)
            if ready is not None:
                ready.set()
            try:
                await wire.lost
            finally:
                wires.clear()
                if wire.transport is not None:
                    wire.transport.abort()
                    await wire.lost


async def _open(simulators: Sequence[SerialSimulator], path: str) -> _Wire | None:
    loop = asyncio.get_running_loop()
    settings = simulators[0].settings
    line = {
        "baudrate": settings.baudrate,
        "bytesize": settings.bytesize,
        "parity": settings.parity,
        "stopbits": settings.stopbits,
    }
    # A pty refuses parity and 7 data bits (and ignores the rest): fall back to 8N1 there.
    for options in (line, {"baudrate": settings.baudrate}):
        try:
            _, protocol = await serial_asyncio_fast.create_serial_connection(
                loop, lambda: _Wire(simulators), path, **options
            )
        except (SerialException, OSError, termios.error, ValueError):
            continue
        assert isinstance(protocol, _Wire)
        return protocol
    return None


async def serve(
    driver: Driver | str,
    port: str | PtyPair,
    *,
    faults: Sequence[Fault] = (),
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve one simulated device on `port` until cancelled (see the module docstring)."""
    simulator = SerialSimulator(driver, faults=faults, settings=settings, seed=seed)
    await simulator.serve(port, ready=ready)


# --- pocd simulate DRIVER ------------------------------------------------------------------


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:  # a TOML value (a number, true, "text"), else the text as it is
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def main(driver: Driver, argv: Sequence[str]) -> int:
    """`pocd simulate DRIVER [--port PATH | --link PATH] [--fault F]... [--set KEY=VALUE]...`"""
    parser = argparse.ArgumentParser(
        prog=f"pocd simulate {driver.info.id}",
        description="Serve a simulated serial device on one end of a pty pair.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", metavar="PATH", help="the simulator's end of a pty pair")
    where.add_argument(
        "--link",
        metavar="PATH",
        help="make a socat pty pair; pocd opens PATH, the simulator PATH.sim",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        type=parse_fault,
        help="KIND[,after=2s][,for=5s][,every=N][,code=..][,delay=..][,var=..,value=..]; "
        f"KIND is one of {', '.join(FAULT_KINDS)}",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=_setting,
        metavar="KEY=VALUE",
        help="override a transport setting of the driver, e.g. address=B",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    if args.port is not None and not os.path.exists(args.port):
        parser.error(f"no such port: {args.port}")
    try:
        simulator = SerialSimulator(
            driver, faults=args.fault, settings=dict(args.set), seed=args.seed
        )
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve_until_signal(simulator, args.port, args.link))
    return 0


async def _serve_until_signal(
    simulator: SerialSimulator, port: str | None, link: str | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        target: str | PtyPair
        if link is not None:
            target = await stack.enter_async_context(PtyPair(link))
            where = f"{target.device} (pocd opens {link})"
        else:
            assert port is not None
            target, where = port, port
        ready = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            serving = group.create_task(simulator.serve(target, ready=ready), name="sim:serve")
            await ready.wait()
            print(f"serial simulator {simulator.name} on {where}", flush=True)
            await stop.wait()
            serving.cancel()
