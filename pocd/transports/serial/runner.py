"""The serial device runner: asks (poll mode) or listens (stream mode) and turns frames into
records.

Some 600 lines: poll and stream mode share the port handling, the reply records and the
reporting of faults.

Poll mode sends each distinct command of the device's points on a fixed grid and waits for the
reply, retrying timeouts and unusable frames while it holds the port's lock. Stream mode
starts the device talking (e.g. MT-SICS `SIR`) and reads what comes. Every unusable frame is a
counted Incident with its raw bytes, and repeats of one fault (a babbling line: a wrong baud
rate) are counted per interval rather than recorded one by one (`RepeatedIncidents`); every
poll gives each point a sample (BAD with a reason code when there is no value); a device that
stops answering, or a port that vanishes, is a `CommStatus` and is retried with jittered
backoff. It never raises for a device fault. `check_device` and `bus_use` are the checks the
site loader makes of a serial device.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import structlog

from pocd.errors import ConfigError, ConfigProblem
from pocd.model import CommStatus, Incident, IncidentKind, Quality, Sample, now_ns
from pocd.transports import BusUse, Device, Inbox, PollGrid, ReadStats, jittered_backoff
from pocd.transports.repeats import RepeatedIncidents, report_repeats
from pocd.transports.serial.codec import Codec, Frame, PointReader, Rejected, Reply
from pocd.transports.serial.config import SerialPoint, SerialSettings
from pocd.transports.serial.port import Line, Port, PortError, join, leave

__all__ = ["Attempt", "SerialRunner", "bus_use", "check_device"]

_NAN = math.nan
Record = Sample | CommStatus | Incident
# Faults after which the rest of a poll is not attempted: each further request would wait out
# the same fault (a port that is gone, a device that is silent).
_GIVE_UP = frozenset({"port", "port-lost", "timeout"})
# Frame faults and what kind of incident each is: a frame that never arrived whole or fails
# its checksum is a line problem; one that arrived whole but says nothing known is data.
_FAULT_KIND = {
    "timeout": IncidentKind.COMMUNICATION,
    "partial": IncidentKind.COMMUNICATION,
    "overlong": IncidentKind.COMMUNICATION,
    "garbage": IncidentKind.COMMUNICATION,
    "checksum": IncidentKind.COMMUNICATION,
    "port": IncidentKind.COMMUNICATION,
    "port-lost": IncidentKind.COMMUNICATION,
    "unsolicited": IncidentKind.COMMUNICATION,
    "unparseable": IncidentKind.DATA,
}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed try at a request: why (`code`), and the bytes that came, if any."""

    code: str
    message: str
    t: int
    raw: bytes = b""


def check_device(device: Device) -> list[tuple[str, str]]:
    """Problems only the whole device shows (the driver's parts were checked one by one), as
    (key under devices[i], message): no port, no reply shapes, a point's field, match group or
    unit group that no reply has, a poll without a command, a status word's unknown point."""
    settings = device.settings
    if not isinstance(settings, SerialSettings):
        return [("transport", "not serial settings")]
    points = {n: p for n, p in device.points.items() if isinstance(p, SerialPoint)}
    codec = Codec(settings)
    problems: list[tuple[str, str]] = []
    if settings.port is None:
        problems.append(("transport", "needs port (e.g. /dev/ttyUSB0)"))
    if not settings.replies:
        problems.append(("transport.replies", "no reply shapes: nothing could be read"))
    groups: set[str] = set()
    for index in range(len(settings.replies)):
        groups.update(codec.groups(index))
    for name, point in points.items():
        where = f"points.{name}"
        field = point.field or name
        if field not in groups:
            problems.append((f"{where}.field", f"no reply shape has a group {field!r}"))
        problems.extend(
            (f"{where}.match", f"no reply shape has a group {key!r}")
            for key in point.match
            if key not in groups
        )
        if point.unit_field is not None and point.unit_field not in groups:
            problems.append(
                (f"{where}.unit_field", f"no reply shape has a group {point.unit_field!r}")
            )
        if settings.mode == "poll" and (point.command or settings.command) is None:
            problems.append(
                (f"{where}.command", "poll mode needs a command (or transport.command)")
            )
    for index, shape in enumerate(settings.replies):
        problems.extend(
            (f"transport.replies[{index}]", f"status word {rule.word!r}: unknown point {p!r}")
            for rule in shape.words
            for p in rule.points
            if p not in points
        )
    return problems


def bus_use(device: Device) -> BusUse | None:
    """The port a serial device is on, for the load checks across the devices of one port."""
    settings = device.settings
    if not isinstance(settings, SerialSettings) or settings.port is None:
        return None
    line = Line.of(settings)
    return BusUse(
        bus=line.path,
        protocol="serial ASCII",
        line=line.settings_text,
        address=f"address {settings.address!r}",
        bus_key="transport.port",
        address_key="transport.address",
        alone=settings.mode == "stream",
    )


@dataclass(frozen=True, slots=True)
class _Request:
    command: str
    data: bytes  # as sent: address filled in, checksum and terminator added
    readers: tuple[PointReader, ...]
    # Whether a reply may be another request's (the device has other requests, or the
    # points match on groups): then a reply carrying none of these points is not this one's.
    checked: bool


class SerialRunner:
    """Reads one serial device until cancelled. See pocd.transports for the contract."""

    def __init__(self, device: Device) -> None:
        if not isinstance(device.settings, SerialSettings):
            raise TypeError(f"device {device.id!r} has no serial settings")
        self.device = device
        self.settings: SerialSettings = device.settings
        self.codec = Codec(self.settings)
        problems = check_device(device)
        if problems:  # (a device the site loader built has none)
            source = device.driver.source
            raise ConfigError([ConfigProblem(source, k, m, device=device.id) for k, m in problems])
        points = {n: p for n, p in device.points.items() if isinstance(p, SerialPoint)}
        self.readers = [PointReader(name, point) for name, point in points.items()]
        for reader in self.readers:
            reader.prepare(self.codec.shapes)
        # Shapes with a group some point reads carry values; the others are error replies.
        fields = {reader.group for reader in self.readers}
        self._carries = [
            bool(fields & set(self.codec.groups(i))) for i in range(len(self.codec.shapes))
        ]
        self.requests: list[_Request] = []
        if self.settings.mode == "poll":
            commands: dict[str, list[PointReader]] = {}
            for reader in self.readers:
                command = reader.point.command or self.settings.command
                assert command is not None  # _check
                commands.setdefault(command, []).append(reader)
            self.requests = [
                _Request(
                    command,
                    self.codec.encode(command),
                    tuple(readers),
                    len(commands) > 1 or any(r.point.match for r in readers),
                )
                for command, readers in commands.items()
            ]
        self.counts: Counter[str] = Counter()  # incidents by code, for status pages and tests
        self.polls = 0
        self.replies = 0  # frames that matched a reply shape
        self.stats = ReadStats()
        self.grid = PollGrid(self.settings.interval, self.stats)
        self.up = True  # as far as anyone has said: no CommStatus until the first failure
        self._failures = 0  # polls (or silences) in a row without a reply
        self._failing: set[str] = set()  # fault codes of the last poll, to log changes once
        self.repeats = RepeatedIncidents()
        self._rng = random.Random()
        self._log = structlog.get_logger(__name__).bind(device=device.id)
        # Taken out once for the per-reply path.
        self._id = device.id
        self._tries = self.settings.retries + 1
        self._timeout = self.settings.timeout
        self._decode = self.codec.decode
        self._single = self.requests[0] if len(self.requests) == 1 else None
        # ... and its only point, if it has one (a balance's weight).
        self._lone = (
            self._single.readers[0]
            if self._single is not None and len(self._single.readers) == 1
            else None
        )

    # --- running ---------------------------------------------------------------------------

    async def run(self, inbox: Inbox) -> None:
        port = join(self.device.id, self.settings, source=self.device.driver.source)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    report_repeats(self.repeats, inbox), name=f"serial-repeats:{self._id}"
                )
                if self.settings.mode == "stream":
                    await self._listen(port, inbox)
                else:
                    await self.grid.run(lambda: self.poll(port, inbox), self._backoff)
        finally:
            if self.settings.mode == "stream" and port.is_open:
                self._send_all(port, self.settings.stream_stop)  # best effort: leave it quiet
            await leave(port, self.device.id)

    def _backoff(self) -> float:
        first = self.settings.interval or self.settings.timeout
        return jittered_backoff(self._failures, first, self.settings.backoff_max, self._rng)

    async def poll(self, port: Port, inbox: Inbox) -> bool:
        """Send every request once and report. True when the device answered at all."""
        if self._single is not None and self.up and not self._failing:
            # The usual case, taken at thousands of polls a second in the bench: one request,
            # all well so far. Records go out as soon as the reply is in.
            request = self._single
            attempts: list[Attempt] = []
            result = await self._ask(port, request, attempts)
            if not attempts and type(result) is Reply:
                self.polls += 1
                t = now_ns()
                if self._lone is not None and result.shape.incident is None:
                    reading = self._lone.take(result)
                    if reading is not None and not reading.fault:
                        value, quality, reason, _ = reading
                        sample = Sample(self._id, self._lone.name, t, value, quality, None, reason)
                        try:
                            inbox.put_nowait(sample)
                        except asyncio.QueueFull:
                            await inbox.put(sample)
                        return True
                records, keys = self._reply_records(result, request.readers, t, asked=True)
                await self._put_all(inbox, records, keys)
                return True
            return await self._report_poll(inbox, [(request, result)], attempts)
        attempts = []
        results: list[tuple[_Request, Reply | Attempt]] = []
        given_up: Attempt | None = None
        for request in self.requests:
            if given_up is None:
                result = await self._ask(port, request, attempts)
                if isinstance(result, Reply):
                    pass
                elif result.code in _GIVE_UP:
                    given_up = result  # the rest would wait out the same fault
            else:
                result = given_up
            results.append((request, result))
        return await self._report_poll(inbox, results, attempts)

    async def _report_poll(
        self,
        inbox: Inbox,
        results: list[tuple[_Request, Reply | Attempt]],
        attempts: list[Attempt],
    ) -> bool:
        """Comm status, incidents, then one sample per point (BAD where there is no value)."""
        answered = any(type(result) is Reply for _, result in results)
        self.polls += 1
        if not (answered and self.up):
            await self._report_comm(inbox, answered, attempts)
        if attempts or self._failing:
            await self._report_attempts(inbox, attempts)
        t = now_ns()
        for request, result in results:
            if type(result) is Reply:
                records, keys = self._reply_records(result, request.readers, t, asked=True)
                await self._put_all(inbox, records, keys)
            else:
                assert isinstance(result, Attempt)
                # The code ("timeout", "port-lost", ...): the incident has the message.
                reason = result.code
                for reader in request.readers:
                    await inbox.put(
                        Sample(self._id, reader.name, result.t, _NAN, Quality.BAD, None, reason)
                    )
        return answered

    async def _ask(self, port: Port, request: _Request, failed: list[Attempt]) -> Reply | Attempt:
        """Send one request and wait for its reply, retrying; the reply, or the last failed
        try. Every failed try goes into `failed`. Holds the port for all tries.

        A reply carrying another request's values (late, after a timeout) is a failed try
        too, and the wait goes on. This runs once per reply: it is written for speed, in
        one piece, with the rare cases out of the way.
        """
        device = self._id
        lock = port.lock
        if not lock.try_take():
            await lock.take()
        try:
            last = self._tries - 1
            for attempt in range(self._tries):
                if not port.ready:
                    fault = await self._prepare(port, failed)
                    if fault is not None:
                        failed.append(fault)
                        return fault
                result: Reply | Attempt
                try:
                    port.write(request.data, device)
                    # From the write: a stall before it (a stopped process) is not the device's.
                    deadline = port.loop.time() + self._timeout
                    while True:
                        frame = await port.next_frame(deadline, device)
                        if frame is None:
                            result = self._no_reply(port)
                            break
                        decoded = self._decode(frame)
                        if decoded is None:
                            continue  # blank, an echo or a prompt: the reply may still come
                        if type(decoded) is Rejected:
                            result = Attempt(decoded.code, decoded.message, now_ns(), decoded.raw)
                            break
                        assert isinstance(decoded, Reply)
                        self.replies += 1
                        if request.checked and self._elsewhere(decoded, request, failed):
                            continue
                        if decoded.shape.retry and attempt < last:
                            shape = decoded.shape
                            code = shape.incident or "retry"
                            result = Attempt(code, shape.reason, now_ns(), decoded.raw)
                            break
                        return decoded
                except PortError as exc:
                    result = Attempt("port-lost", f"port lost: {exc.reason}", now_ns())
                finally:
                    if port.gap:
                        port.mark_quiet()
                failed.append(result)
                if result.code == "port-lost":
                    break
            return failed[-1]
        finally:
            lock.give_back()

    async def _prepare(self, port: Port, failed: list[Attempt]) -> Attempt | None:
        """Before a try: reopen the port, wait out the gap, report what came unasked."""
        if not port.is_open:
            loss = port.take_loss()
            if loss:  # lost between two polls (unplugged): say so before reopening
                failed.append(Attempt("port-lost", f"port lost: {loss}", now_ns()))
            try:
                await port.ensure_open(self._id)
            except PortError as exc:
                return Attempt("port", exc.reason, now_ns())
        if port.gap:
            await port.quiet()
        if port.has_stale:
            failed.extend(_unsolicited(frame) for frame in port.take_stale())
        return None

    def _no_reply(self, port: Port) -> Attempt:
        partial = port.take_partial()
        if partial is not None:
            return Attempt("partial", "incomplete reply", now_ns(), partial.data)
        return Attempt("timeout", f"no reply within {self._timeout:g} s", now_ns())

    def _elsewhere(self, reply: Reply, request: _Request, failed: list[Attempt]) -> bool:
        """Whether the reply carries another request's values (and so is counted, not used)."""
        if not self._carries[reply.shape_index]:
            return False  # an error reply: it answers whatever was asked
        if any(reader.carried_by(reply) for reader in request.readers):
            return False
        message = f"reply to another request: {reply.text!r}"
        failed.append(Attempt("unexpected-reply", message, now_ns(), reply.raw))
        return True

    # --- stream mode -----------------------------------------------------------------------

    async def _listen(self, port: Port, inbox: Inbox) -> None:
        loop = asyncio.get_running_loop()
        device = self.device.id
        silence = self.settings.timeout
        while True:
            try:
                await port.ensure_open(device)
            except PortError as exc:
                await self._silent(inbox, Attempt("port", exc.reason, now_ns()))
                await asyncio.sleep(self._backoff())
                continue
            self._send_all(port, self.settings.stream_start)
            last_reply = loop.time()
            while True:
                try:
                    frame = await port.next_frame(last_reply + silence, device)
                except PortError as exc:
                    await self._silent(
                        inbox, Attempt("port-lost", f"port lost: {exc.reason}", now_ns())
                    )
                    await asyncio.sleep(self._backoff())
                    break
                if frame is None:
                    partial = port.take_partial()
                    if partial is not None:
                        fault = _fault_of(partial)
                        await self._incident(inbox, _incident(device, fault), fault.code)
                    await self._silent(
                        inbox, Attempt("timeout", f"nothing usable for {silence:g} s", now_ns())
                    )
                    # The device may have been power-cycled and forgotten that it streams.
                    self._send_all(port, self.settings.stream_start)
                    last_reply = loop.time()
                    continue
                records, keys, usable = self._frame_records(frame, now_ns())
                if usable:
                    last_reply = loop.time()
                    if not self.up:
                        await self._report_comm(inbox, True, [])
                        await self._report_attempts(inbox, [])  # logs the recovery
                await self._put_all(inbox, records, keys)

    async def _silent(self, inbox: Inbox, fault: Attempt) -> None:
        """The device said nothing usable (or its port is gone): comm-loss, once."""
        self.stats.errors += 1  # a streaming device's reads are not timed: it is not asked
        await self._report_comm(inbox, False, [fault])
        await self._report_attempts(inbox, [fault])

    def _send_all(self, port: Port, commands: list[str]) -> None:
        for command in commands:
            try:
                port.write(self.codec.encode(command), self.device.id)
            except PortError:
                return

    def frame_records(self, frame: Frame, t: int) -> tuple[list[Record], bool]:
        """The records of one unsolicited frame (stream mode), and whether it was a reply.
        Nothing is sent and no incident counted: the caller puts the records in the inbox."""
        records, _, usable = self._frame_records(frame, t)
        return records, usable

    def _frame_records(self, frame: Frame, t: int) -> tuple[list[Record], list[Hashable], bool]:
        """`frame_records`, with the repeat key of each incident among the records."""
        decoded = self.codec.decode(frame)
        if decoded is None:
            return [], [], False
        if isinstance(decoded, Rejected):
            fault = Attempt(decoded.code, decoded.message, t, decoded.raw)
            return [_incident(self.device.id, fault)], [fault.code], False
        self.replies += 1
        records, keys = self._reply_records(decoded, self.readers, t, asked=False)
        return records, keys, True

    # --- records ---------------------------------------------------------------------------

    def _reply_records(
        self,
        reply: Reply,
        readers: tuple[PointReader, ...] | list[PointReader],
        t: int,
        *,
        asked: bool,
    ) -> tuple[list[Record], list[Hashable]]:
        """Records of a reply to a request for `readers` (`asked`), or of an unsolicited frame,
        which carries what it carries; and the repeat key of each incident among them, in
        order (the fault's code, and the point where it is a point's)."""
        device = self._id
        shape = reply.shape
        records: list[Record] = []
        keys: list[Hashable] = []
        if shape.incident is not None:
            message = f"{shape.reason or shape.incident}: {reply.text!r}"
            records.append(Incident(t, shape.kind, shape.incident, device, message, reply.raw))
            keys.append(shape.incident)
        carries = self._carries[reply.shape_index]
        for reader in readers:
            reading = reader.take(reply)
            if reading is not None:
                if reading.fault:
                    message = f"{reader.name}: {reading.fault} in {reply.text!r}"
                    records.append(
                        Incident(t, IncidentKind.DATA, reading.fault, device, message, reply.raw)
                    )
                    keys.append((reading.fault, reader.name))
                records.append(
                    Sample(
                        device, reader.name, t, reading.value, reading.quality, None, reading.reason
                    )
                )
            elif not carries:
                # An error reply (MT-SICS `S +`): the driver's reason for it, a bounded code.
                reason = shape.reason or shape.incident or "no-value"
                records.append(Sample(device, reader.name, t, _NAN, Quality.BAD, None, reason))
            elif asked:
                # The device answered the request with another value's reply (another
                # parameter, another unit id): the point has no value from this poll.
                message = f"{reader.name}: reply is not for this point: {reply.text!r}"
                records.append(
                    Incident(
                        t,
                        IncidentKind.COMMUNICATION,
                        "unexpected-reply",
                        device,
                        message,
                        reply.raw,
                    )
                )
                keys.append(("unexpected-reply", reader.name))
                records.append(
                    Sample(device, reader.name, t, _NAN, Quality.BAD, None, "unexpected-reply")
                )
        return records, keys

    async def _put_all(self, inbox: Inbox, records: list[Record], keys: list[Hashable]) -> None:
        """Put records of `_reply_records` or `_frame_records`, incidents through `_incident`."""
        if not keys:
            for record in records:
                await inbox.put(record)
            return
        pending = iter(keys)
        for record in records:
            if type(record) is Incident:
                await self._incident(inbox, record, next(pending))
            else:
                await inbox.put(record)

    async def _incident(self, inbox: Inbox, incident: Incident, key: Hashable) -> None:
        """Count the incident; record it unless it repeats one recorded a moment ago."""
        self.counts[incident.code] += 1
        recorded = self.repeats.offer(incident, time.monotonic(), key)
        if recorded is not None:
            await inbox.put(recorded)

    async def _report_comm(self, inbox: Inbox, answered: bool, attempts: list[Attempt]) -> None:
        device = self.device.id
        if answered:
            if not self.up:
                self._log.info("device answers again", after_failures=self._failures)
                await inbox.put(CommStatus(device, now_ns(), ok=True))
            self.up = True
            self._failures = 0
            return
        self._failures += 1
        if self.up:
            first = attempts[0]  # the cause; later ones are often its consequences
            self._log.error("device stopped answering", reason=first.message, code=first.code)
            await inbox.put(CommStatus(device, first.t, ok=False, reason=first.message))
        self.up = False

    async def _report_attempts(self, inbox: Inbox, attempts: list[Attempt]) -> None:
        codes = {a.code for a in attempts}
        for attempt in attempts:
            # Log a fault once when it starts, quietly while it lasts, and once when it ends.
            log = self._log.debug if attempt.code in self._failing else self._log.error
            log("serial exchange failed", code=attempt.code, reason=attempt.message)
            await self._incident(inbox, _incident(self.device.id, attempt), attempt.code)
        for code in self._failing - codes:
            self._log.info("serial exchanges recovered", code=code)
        self._failing = codes


def _fault_of(frame: Frame) -> Attempt:
    return Attempt(frame.fault or "partial", "incomplete frame", now_ns(), frame.data)


def _unsolicited(frame: Frame) -> Attempt:
    what = f"{frame.fault} frame" if frame.fault else "frame"
    return Attempt("unsolicited", f"{what} nobody asked for", now_ns(), frame.data)


def _incident(device: str, attempt: Attempt) -> Incident:
    kind = _FAULT_KIND.get(attempt.code, IncidentKind.COMMUNICATION)
    return Incident(attempt.t, kind, attempt.code, device, attempt.message, attempt.raw)
