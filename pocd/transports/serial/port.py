"""The one place that opens serial ports: a `Port` is one pyserial-asyncio-fast connection with
its framer, its lock and the gap kept between commands, shared by every device on the port.

Runners find their port in a registry keyed by the running event loop and the port's real
path: the first to `join` creates it, the last to `leave` closes it. Devices on one port (an
RS-485 bus) must agree on line settings and framing and have distinct addresses; a device in
stream mode must be alone on its port (unsolicited lines carry no one's name). A conflict is a
ConfigError when the second device joins.

Reconnection has one owner: the runners. A port opens on demand (`ensure_open`) and never
retries by itself. A device file that vanishes (a USB adapter pulled, a pty removed) ends the
connection (`connection_lost`); `ensure_open` then fails until the path is back, and the
runners pace their attempts with jittered backoff. Nothing here parses replies or builds
records: a port hands out frames.
"""

from __future__ import annotations

import asyncio
import os
import termios
from collections import deque
from dataclasses import dataclass
from typing import Any

import serial_asyncio_fast

# From pyserial's modules rather than its package: bench/serial.py, run as a script or checked
# by mypy next to this file, is a module named `serial` too and would hide the package.
from serial.serialposix import Serial
from serial.serialutil import SerialException

from pocd.errors import ConfigError, ConfigProblem, DeviceError
from pocd.transports.serial.codec import Frame, Framer, make_framer
from pocd.transports.serial.config import SerialSettings

__all__ = ["Line", "Port", "PortError", "PortLock", "join", "leave", "ports"]

_CLOSE_WAIT = 2.0  # seconds to wait for pyserial-asyncio-fast to finish closing a port


class PortError(DeviceError):
    """The port cannot be opened, or was lost (code "port" or "port-lost")."""

    def __init__(self, message: str, *, device: str, path: str, code: str = "port") -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}", device=device, code=code)


class PortLock:
    """First come, first served turns on a port, held for a whole exchange.

    An asyncio.Lock would do, but a turn is taken once per reply: this one takes a free port
    without creating a coroutine (`try_take`), and queues only when the port is busy.
    """

    __slots__ = ("_held", "_queue")

    def __init__(self) -> None:
        self._held = False
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> bool:
        return self._held

    def try_take(self) -> bool:
        if self._held:
            return False
        self._held = True
        return True

    async def take(self) -> None:
        """Wait for the port (after `try_take` failed)."""
        if self.try_take():
            return
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give_back()  # handed over just as we were cancelled: pass it on
            else:
                self._queue.remove(turn)
            raise

    def give_back(self) -> None:
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)  # held passes straight to the next in line
                return
        self._held = False


@dataclass(frozen=True, slots=True)
class Line:
    """A port with the settings every device on it must share."""

    path: str  # the real path, so that two names of one port are one bus
    baudrate: int
    bytesize: int
    parity: str
    stopbits: float
    xonxoff: bool
    rtscts: bool
    framing: str
    terminator: bytes
    max_frame: int

    @classmethod
    def of(cls, settings: SerialSettings) -> Line:
        assert settings.port is not None
        return cls(
            path=os.path.realpath(settings.port),
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            xonxoff=settings.xonxoff,
            rtscts=settings.rtscts,
            framing=settings.framing,
            terminator=settings.reply_terminator,
            max_frame=settings.max_frame,
        )

    def __str__(self) -> str:
        handshake = "".join((" xonxoff" if self.xonxoff else "", " rtscts" if self.rtscts else ""))
        stop = f"{self.stopbits:g}"
        return f"{self.path} {self.baudrate} {self.bytesize}{self.parity}{stop}{handshake}"

    @property
    def settings_text(self) -> str:
        """Everything devices on the port must share but the path, as text to compare."""
        framing = "stx-etx" if self.framing == "stx-etx" else f"lines ending {self.terminator!r}"
        line = str(self).removeprefix(f"{self.path} ")
        return f"{line}, {framing}, max_frame {self.max_frame}"


class Port(asyncio.Protocol):
    """One serial port shared by the devices on it. See the module docstring."""

    def __init__(self, line: Line, path: str) -> None:
        self.line = line
        self.path = path  # as configured: a by-id link is reopened by its name after a replug
        self.lock = PortLock()  # held for a whole exchange, retries included
        self.members: dict[str, SerialSettings] = {}
        self.gap = 0.0
        self.opens = 0  # successful opens, for tests and status pages
        self.lost_reason = ""
        self._loss = ""  # why an open port was lost, until a runner reports it
        self.loop = asyncio.get_running_loop()
        self._framer: Framer = make_framer(line.framing, line.terminator, line.max_frame)
        self._frames: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._transport: serial_asyncio_fast.SerialTransport | None = None
        self._closed: asyncio.Future[None] | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._quiet_until = 0.0
        self._deadline = 0.0  # of the current wait for a frame
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # --- opening and closing ---------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    @property
    def ready(self) -> bool:
        """Open, with no gap to wait out and nothing unasked waiting: a request can go now.
        (One check on the per-request path instead of three.)"""
        return (
            self._transport is not None
            and not self.gap
            and not self._frames
            and not self._framer.pending
        )

    async def ensure_open(self, device: str) -> None:
        """Open the port if it is closed. Raises PortError when it cannot be opened."""
        if self._transport is not None:
            return
        async with self._opening:  # two runners finding it closed open it once
            if self._transport is None:
                await self._open(device)

    async def _open(self, device: str) -> None:
        loop = self.loop
        try:
            port = await loop.run_in_executor(None, self._serial)
        except (SerialException, OSError, termios.error, ValueError) as exc:
            raise PortError(_why(exc), device=device, path=self.path) from None
        try:
            # The transport's constructor sets the timeouts, which reconfigures the line: a
            # setting the device refuses fails here (a pty refuses parity and 7 data bits).
            transport, _ = await serial_asyncio_fast.connection_for_serial(loop, lambda: self, port)
        except (SerialException, OSError, termios.error, ValueError) as exc:
            port.close()
            raise PortError(_why(exc), device=device, path=self.path) from None
        self._transport = transport
        self._closed = loop.create_future()
        self._framer = make_framer(self.line.framing, self.line.terminator, self.line.max_frame)
        self._frames.clear()
        self.lost_reason = self._loss = ""
        self.opens += 1

    def _serial(self) -> Any:
        line = self.line
        port = Serial()
        port.port = self.path
        port.baudrate = line.baudrate
        port.bytesize = line.bytesize
        port.parity = line.parity
        port.stopbits = line.stopbits
        port.xonxoff = line.xonxoff
        port.rtscts = line.rtscts
        port.exclusive = True  # a second program on the same port would steal replies
        port.timeout = 0
        port.write_timeout = 0
        port.open()
        port.reset_input_buffer()  # what came before we listened answers nothing we asked
        return port

    async def close(self) -> None:
        """Close the port (dropping unsent bytes) and wait until it is closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, closed = self._transport, self._closed
        if transport is None or closed is None:
            return
        # abort, not close: close would wait for the output to drain, forever on a dead line.
        transport.abort()
        try:
            async with asyncio.timeout(_CLOSE_WAIT):
                await asyncio.shield(closed)
        except TimeoutError:
            pass
        self._transport = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # the transport is kept when connection_for_serial returns it

    def data_received(self, data: bytes) -> None:
        frames = self._framer.feed(data)
        if frames:
            self._frames.extend(frames)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
                self._waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = _why(exc) if exc is not None else "closed"
        if exc is not None:
            self._loss = self.lost_reason
        self._transport = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_loss(self) -> str:
        """Why the port was lost since it was last open ("" if it was not), said once."""
        loss, self._loss = self._loss, ""
        return loss

    # --- exchanging ------------------------------------------------------------------------

    def write(self, data: bytes, device: str) -> None:
        transport = self._transport
        if transport is None:
            raise PortError(self.lost_reason or "not open", device=device, path=self.path)
        transport.write(data)

    async def next_frame(self, deadline: float, device: str) -> Frame | None:
        """The next frame received, or None if none came by `deadline` (in loop time).

        Raises PortError (code "port-lost") when the port is lost while waiting.
        """
        frames = self._frames
        if frames:
            return frames.popleft()
        if self._transport is None:
            raise PortError(self.lost_reason or "not open", device=device, path=self.path)
        waiter = self.loop.create_future()
        self._waiter = waiter
        # One timer serves many waits: at thousands of replies a second, arming and
        # cancelling a timer for each costs more than the rest of the wait. It is moved
        # only when it would fire after this wait's deadline; firing early, it re-arms.
        self._deadline = deadline
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._expire)
            self._timer_at = deadline
        try:
            await waiter
        finally:
            self._waiter = None
        if frames:
            return frames.popleft()
        if self._transport is None:
            raise PortError(self.lost_reason, device=device, path=self.path, code="port-lost")
        return None

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self.loop.time() >= self._deadline:
            waiter.set_result(None)
        else:
            self._timer = self.loop.call_at(self._deadline, self._expire)
            self._timer_at = self._deadline

    @property
    def has_stale(self) -> bool:
        """Whether frames (or bytes of one) wait that nobody asked for."""
        return bool(self._frames) or self._framer.pending > 0

    def take_stale(self) -> list[Frame]:
        """Frames (and bytes of an unfinished one) that arrived while nobody asked."""
        stale = list(self._frames)
        self._frames.clear()
        partial = self._framer.flush() if self._framer.pending else None
        if partial is not None:
            stale.append(partial)
        return stale

    def take_partial(self) -> Frame | None:
        """The bytes of an unfinished frame, given up as "partial" (after a timeout)."""
        return self._framer.flush() if self._framer.pending else None

    async def quiet(self) -> None:
        """Wait out the gap since the last reply, if one is still running."""
        wait = self._quiet_until - self.loop.time()
        if wait > 0:
            await asyncio.sleep(wait)

    def mark_quiet(self) -> None:
        if self.gap:
            self._quiet_until = self.loop.time() + self.gap


def _why(exc: BaseException) -> str:
    # pyserial puts the errno first and a long sentence with the path second: the errno says it.
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


# --- the registry ---------------------------------------------------------------------------

_PORTS: dict[tuple[asyncio.AbstractEventLoop, str], Port] = {}


def ports() -> list[Port]:
    """The ports in use in the running event loop."""
    loop = asyncio.get_running_loop()
    return [port for (owner, _), port in _PORTS.items() if owner is loop]


def join(device: str, settings: SerialSettings, *, source: str = "") -> Port:
    """The port of this device, created (not yet opened) if it is the first to use it.

    Raises ConfigError when the device clashes with a device already on the port: other line
    settings or framing, the same address, or stream mode on a shared port.
    """
    assert settings.port is not None
    line = Line.of(settings)
    key = (asyncio.get_running_loop(), line.path)
    port = _PORTS.get(key)
    if port is None:
        port = _PORTS[key] = Port(line, settings.port)
    problem = ""
    others = ", ".join(repr(name) for name in sorted(port.members))
    if port.line != line:
        problem = f"{line} differs from {port.line} used by {others}"
    elif port.members and settings.mode == "stream":
        problem = f"a device in stream mode must be alone on its port ({line.path} has {others})"
    elif any(other.mode == "stream" for other in port.members.values()):
        problem = f"{line.path} is used by {others} in stream mode"
    else:
        for other, theirs in port.members.items():
            if theirs.address == settings.address:
                problem = (
                    f"address {settings.address!r} on {line.path} is already used by {other!r}"
                )
    if problem:
        if not port.members:
            del _PORTS[key]
        raise ConfigError([ConfigProblem(source, "transport", problem, device=device)])
    port.members[device] = settings
    port.gap = max(member.gap for member in port.members.values())
    return port


async def leave(port: Port, device: str) -> None:
    """The device stops using the port; the last one out closes it."""
    port.members.pop(device, None)
    if port.members:
        port.gap = max(member.gap for member in port.members.values())
        return
    for key, value in list(_PORTS.items()):
        if value is port:
            del _PORTS[key]
    await port.close()
