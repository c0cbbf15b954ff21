"""The one place that talks to pymodbus: a `Link` is a TCP connection or a serial port.
Some 490 lines, because everything that touches the library stays here.

A link owns one pymodbus client, one lock and the pause between frames, and is shared by every
device on it: several unit ids on one RS-485 port, or behind one TCP gateway. Runners find
their link in a registry keyed by the running event loop and the endpoint (`("rtu", real
path of the port)` or `("tcp", host, port)`): the first to `join` opens it, the last to `leave`
closes it. Devices on one serial port must agree on the line settings and use distinct unit
ids; a conflict is a ConfigError when the second device joins.

Reconnection has one owner. pymodbus's reconnect task, its retry loop and its own timeouts
are switched off (reconnect_delay=0, retries=0, timeout=None); the link connects on demand
when a read finds it closed, and the runners pace those reads with jittered backoff.
A read either returns registers or bits, or raises `ModbusReadError` with a fault code:
"timeout", "crc", "short-response", "garbled", "connection", "modbus-exception-N".
Nothing here decodes values or builds records.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadInputRegistersRequest

from pocd.errors import ConfigError, ConfigProblem, DeviceReadError
from pocd.model import IncidentKind, now_ns
from pocd.transports.modbus.codec import crc16
from pocd.transports.modbus.config import ModbusSettings
from pocd.transports.modbus.plan import FUNCTION_CODES, Read

__all__ = ["Endpoint", "Link", "ModbusReadError", "Reply", "join", "leave", "links"]

# pymodbus's own timeout for a response or a connection: none, as every wait here has ours.
# pymodbus waits with asyncio.wait_for, which with no timeout is a plain await; any timeout,
# however long, would cost a timer per request (a fifth of the per-read CPU on loopback).
# pymodbus types it float; None is what wait_for (and pyserial) take for "no timeout".
_NO_TIMEOUT: Any = None
# A TCP connection that stays silent for this many requests in a row is closed and reopened:
# a half-open socket never recovers by itself (pymodbus closes after retries + 3).
_TCP_SILENT_LIMIT = 3
_REQUESTS: dict[str, type[ModbusPDU]] = {
    "holding": ReadHoldingRegistersRequest,
    "input": ReadInputRegistersRequest,
    "coil": ReadCoilsRequest,
    "discrete": ReadDiscreteInputsRequest,
}
# Exception 06 "server device busy" is worth an immediate retry (as Telegraf does); others not.
_BUSY = 6


class ModbusReadError(DeviceReadError):
    """One read failed. `answered` says whether the unit sent a valid frame (an exception or a
    short response) - a unit that answers is alive even when its data is unusable."""

    def __init__(
        self,
        message: str,
        *,
        device: str,
        address: str,
        code: str,
        kind: IncidentKind = IncidentKind.COMMUNICATION,
        answered: bool = False,
        retryable: bool = False,
        raw: bytes = b"",
    ) -> None:
        super().__init__(message, device=device, address=address, code=code)
        self.reason = message
        self.kind = kind
        self.answered = answered
        self.retryable = retryable
        self.raw = raw
        self.t = now_ns()
        self.earlier: tuple[ModbusReadError, ...] = ()  # attempts before this one, same read


class Reply(NamedTuple):
    """The registers (or bits) of one read, received at `t`; `faults` are the failed attempts
    that a retry made good (they are incidents too). A tuple: one is made per read."""

    values: list[int] | list[bool]
    t: int
    faults: tuple[ModbusReadError, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a link goes, with the settings every device on it must share."""

    kind: Literal["tcp", "rtu"]
    address: str  # host, or the serial port's real path (or pyserial URL)
    port: int = 0
    baudrate: int = 0
    bytesize: int = 0
    parity: str = ""
    stopbits: int = 0
    pause: float = 0.0

    @classmethod
    def of(cls, settings: ModbusSettings) -> Endpoint:
        if settings.host is not None:
            return cls("tcp", settings.host, settings.port, pause=settings.pause)
        assert settings.serial_port is not None
        path = settings.serial_port
        if "://" not in path:  # two names for one port are one bus
            path = os.path.realpath(path)
        return cls(
            "rtu",
            path,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            pause=settings.pause,
        )

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.kind, self.address, self.port)

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"tcp {self.address}:{self.port}"
        return f"rtu {self.address} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


class _Timeout:
    """`with timeout(seconds):` around one attempt, as `asyncio.timeout` but with far fewer
    timers: the attempt in flight is cancelled when its time is up, and TimeoutError raised.

    A link makes one attempt at a time, and an attempt that answers takes much less than its
    timeout, so one timer serves many attempts: when it fires before the attempt in flight is
    due, it is set again for that attempt's deadline. Back-to-back polls on loopback make
    thousands of attempts a second, and a timer each was about a tenth of the CPU per read.

    A due attempt is cancelled one loop iteration after the timer goes off, not at once: if
    the loop was held up past the deadline (a long pause, a stalled VM) while the answer came,
    the answer's callback ran in the timer's iteration and the attempt resumes with it first.
    And the time runs again from when the request is written (`sent`), so a stall before the
    write is not the device's either.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None  # the attempt in flight
        self._attempt = 0  # attempts begun, to tell the one a late expiry was meant for
        self._deadline = 0.0
        self._seconds = 0.0
        self._cancelling = 0  # the task's pending cancellations when the attempt started
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __call__(self, task: asyncio.Task[Any], seconds: float) -> _Timeout:
        loop = task.get_loop()
        self._task = task
        self._attempt += 1
        self._cancelling = task.cancelling()
        self._seconds = seconds
        self._deadline = deadline = loop.time() + seconds
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = loop.call_at(deadline, self._fire), deadline
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if self._expired:
            self._expired = False
            assert task is not None
            # Ours if no one else cancelled the task meanwhile (as asyncio.timeout decides).
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def sent(self) -> None:
        """The request of the attempt in flight is being written: its time runs from now.
        (A later deadline than the timer's is fine: the timer sets itself again.)"""
        if self._task is not None:
            self._deadline = self._task.get_loop().time() + self._seconds

    def release(self) -> None:
        """Drop the timer, unless an attempt is in flight: that one still needs it."""
        if self._timer is not None and self._task is None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        task = self._task
        if task is None:  # between attempts: the next one sets the timer
            return
        if self._deadline > self._timer_at:  # set for an attempt that has ended: this one later
            loop = task.get_loop()
            self._timer, self._timer_at = loop.call_at(self._deadline, self._fire), self._deadline
            return
        task.get_loop().call_soon(self._expire, self._attempt)

    def _expire(self, attempt: int) -> None:
        task = self._task
        if task is None or attempt != self._attempt:  # it ended with the iteration's answer
            return
        self._expired = True
        task.cancel()


class Link:
    """One pymodbus client with its lock; see the module docstring."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.members: dict[str, int] = {}  # device id -> unit id
        self._lock = asyncio.Lock()
        self._timeout = _Timeout()  # per attempt
        self._pause = endpoint.pause
        self._quiet_until = 0.0
        self._rx = b""  # what arrived during the current attempt, to classify a failed one
        self._silent = 0  # TCP requests in a row without an answer
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if endpoint.kind == "tcp":
            self._client = AsyncModbusTcpClient(
                endpoint.address,
                port=endpoint.port,
                name=f"pocd {endpoint}",
                reconnect_delay=0,
                timeout=_NO_TIMEOUT,
                retries=0,
                trace_packet=self._trace,
            )
        else:
            self._client = AsyncModbusSerialClient(
                endpoint.address,
                framer=FramerType.RTU,
                baudrate=endpoint.baudrate,
                bytesize=endpoint.bytesize,
                parity=endpoint.parity,
                stopbits=endpoint.stopbits,
                name=f"pocd {endpoint}",
                reconnect_delay=0,
                timeout=_NO_TIMEOUT,
                retries=0,
                trace_packet=self._trace,
            )
        # The request PDU of each (read, unit), made once: a read is the same every poll.
        self._requests: dict[tuple[str, int, int, int], ModbusPDU] = {}

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    def close(self) -> None:
        self._timeout.release()
        self._client.close()

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending:  # pymodbus writes the request right after this call
            self._timeout.sent()
            return data
        # pymodbus hands over its whole receive buffer each time, not only the new bytes.
        self._rx = data if data.startswith(self._rx) else self._rx + data
        return data

    async def read(
        self, *, device: str, unit: int, read: Read, answer_within: float, retries: int
    ) -> Reply:
        """Read once, retrying timeouts, CRC errors and "busy" up to `retries` more times.

        The lock is held across the retries so that a unit's retry is not overtaken on the bus.
        """
        faults: list[ModbusReadError] = []
        task = asyncio.current_task()
        assert task is not None
        lock = self._lock
        await lock.acquire()  # not `async with`: two calls fewer on every read
        try:
            for attempt in range(retries + 1):
                # One attempt, written out here rather than in a coroutine of its own: every
                # read, and every resumption when its answer comes, goes through one frame less.
                try:
                    if self._pause or not self._client.connected:
                        await self._get_ready(device, unit, read, answer_within)
                    self._rx = b""
                    try:
                        with self._timeout(task, answer_within):
                            response = await self._call(read, unit)
                    except TimeoutError:
                        raise self._no_answer(device, unit, read, answer_within) from None
                    except ModbusException as exc:  # pymodbus found the connection closed
                        where = _where(read, unit)
                        raise ModbusReadError(
                            f"pymodbus: {exc}", device=device, address=where, code="connection"
                        ) from None
                    finally:
                        if self._pause:
                            self._quiet_until = asyncio.get_running_loop().time() + self._pause
                    if task.cancelling():
                        # pymodbus awaits the response with asyncio.wait_for, which before
                        # Python 3.12 can swallow a cancellation that arrives with the response
                        # (CPython gh-86296): the runner would then poll on after the daemon
                        # cancelled it. With no timeout (_NO_TIMEOUT) that wait is a plain
                        # await and cannot; this stays as the guard.
                        raise asyncio.CancelledError
                    self._silent = 0
                    values = self._check(device, unit, read, response)
                except ModbusReadError as fault:
                    faults.append(fault)
                    if fault.retryable and attempt < retries:
                        continue
                    fault.earlier = tuple(faults[:-1])
                    raise
                return Reply(values, now_ns(), tuple(faults) if faults else ())
        finally:
            lock.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_ready(self, device: str, unit: int, read: Read, answer_within: float) -> None:
        """Connect if the link is closed; keep the pause since the last frame on the bus."""
        if not self._client.connected:
            await self._connect(device, answer_within, _where(read, unit))
        if self._pause:
            wait = self._quiet_until - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _connect(self, device: str, answer_within: float, where: str) -> None:
        try:
            async with asyncio.timeout(answer_within):
                connected = await self._client.connect()
        except TimeoutError:
            connected = False
        if not connected:
            self._client.close()
            raise ModbusReadError(
                f"cannot open {self.endpoint}", device=device, address=where, code="connection"
            )

    def _call(self, read: Read, unit: int) -> Any:
        key = (read.function, read.address, read.count, unit)  # hashed in C, unlike a Read
        request = self._requests.get(key)
        if request is None:
            request = _REQUESTS[read.function](address=read.address, count=read.count, dev_id=unit)
            self._requests[key] = request
        return self._client.execute(False, request)

    def _check(self, device: str, unit: int, read: Read, response: Any) -> list[int] | list[bool]:
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise ModbusReadError(
                f"exception response {code:02d}",
                device=device,
                address=_where(read, unit),
                code=f"modbus-exception-{code}",
                answered=True,
                retryable=code == _BUSY,
                raw=self._rx,
            )
        if response.function_code != FUNCTION_CODES[read.function]:
            raise ModbusReadError(
                f"answer to function {response.function_code}",
                device=device,
                address=_where(read, unit),
                code="garbled",
                answered=True,
                retryable=True,
                raw=self._rx,
            )
        values: list[int] | list[bool]
        values = response.registers if read.function in ("holding", "input") else response.bits
        if len(values) < read.count:
            raise ModbusReadError(
                f"{len(values)} of {read.count} values in the response",
                device=device,
                address=_where(read, unit),
                code="short-response",
                answered=True,
                retryable=True,
                raw=self._rx,
            )
        return values[: read.count]

    def _no_answer(self, device: str, unit: int, read: Read, timeout: float) -> ModbusReadError:
        where = _where(read, unit)
        raw = self._rx
        if not self._client.connected:
            return ModbusReadError(
                f"connection to {self.endpoint} lost",
                device=device,
                address=where,
                code="connection",
                raw=raw,
            )
        if self.endpoint.kind == "tcp":
            self._silent += 1
            if self._silent >= _TCP_SILENT_LIMIT:
                self._client.close()
                self._silent = 0
        if not raw:
            return ModbusReadError(
                f"no answer within {timeout:g} s",
                device=device,
                address=where,
                code="timeout",
                retryable=True,
            )
        if len(raw) < self._frame_length(read):
            code, what = "short-response", "incomplete frame"
        elif self.endpoint.kind == "rtu" and crc16(raw[:-2]) != raw[-2:]:
            code, what = "crc", "CRC error"
        else:
            code, what = "garbled", "unusable frame"
        return ModbusReadError(
            f"{what} ({len(raw)} bytes)",
            device=device,
            address=where,
            code=code,
            retryable=True,
            raw=raw,
        )

    def _frame_length(self, read: Read) -> int:
        data = 2 * read.count if read.function in ("holding", "input") else (read.count + 7) // 8
        pdu = 2 + data  # function code, byte count, data
        return pdu + (3 if self.endpoint.kind == "rtu" else 7)  # unit + CRC, or MBAP header


def _where(read: Read, unit: int) -> str:
    return f"{read} unit {unit}"


# --- the registry ---------------------------------------------------------------------------

_LINKS: dict[tuple[asyncio.AbstractEventLoop, tuple[str, str, int]], Link] = {}


def links() -> list[Link]:
    """The links open in the running event loop."""
    loop = asyncio.get_running_loop()
    return [link for (owner, _), link in _LINKS.items() if owner is loop]


def join(device: str, settings: ModbusSettings, *, source: str = "") -> Link:
    """The link for this device's endpoint, opened (lazily) if it is the first to use it.

    Raises ConfigError when the device's line settings or unit id clash with a device that
    already uses the same port.
    """
    endpoint = Endpoint.of(settings)
    key = (asyncio.get_running_loop(), endpoint.key)
    link = _LINKS.get(key)
    if link is None:
        link = _LINKS[key] = Link(endpoint)
    problem = ""
    if link.endpoint != endpoint:
        others = ", ".join(sorted(link.members))
        problem = f"{endpoint} differs from {link.endpoint} used by {others}"
    else:
        for other, unit in link.members.items():
            if unit == settings.unit_id:
                problem = f"unit id {unit} on {endpoint} is already used by {other!r}"
    if problem:
        if not link.members:
            del _LINKS[key]
        raise ConfigError([ConfigProblem(source, "transport", problem, device=device)])
    link.members[device] = settings.unit_id
    return link


def leave(link: Link, device: str) -> None:
    """The device stops using the link; the last one out closes it."""
    link.members.pop(device, None)
    if not link.members:
        link.close()
        for key, value in list(_LINKS.items()):
            if value is link:
                del _LINKS[key]
