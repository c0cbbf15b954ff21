"""The OPC UA device runner: one server, its points, and the recovery of its sessions.

Some 500 lines: sessions, nodes and values of one server, all on the runner's own state; pure
parts live in `values` and `session`.

The runner owns reconnection (jittered exponential backoff; asyncua's own is off). Each
session resolves every point's node afresh, recreates the subscription and its monitored
items, and starts polling; a point whose node the server does not have is a BAD sample and an
incident, and every other point goes on. A lost session is one CommStatus(ok=False) however
many reconnects fail, and one CommStatus(ok=True) once values flow again; the engine turns
the pair into comm-loss. Values seen again after a reconnect (same point, same SourceTimestamp)
are dropped here, so the store never holds them twice. Every sample of a runner has a receive
time of its own (`_receive_times`): the values of one publish response arrive together, and a
point's several queued values must not share a time (InfluxDB would keep only the last).
A text value is kept in `texts` for the live view, and each change of a text that is not
recorded as a number is a data incident holding it; per-point incidents that repeat are
counted (`RepeatedIncidents`). It never raises for a device fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import structlog
from asyncua import ua
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from pocd.errors import DeviceError
from pocd.model import NS, CommStatus, Incident, IncidentKind, Quality, Sample, now_ns
from pocd.transports import Device, Inbox, ReadStats
from pocd.transports.opcua.config import NodeRef, OpcuaPoint, OpcuaSettings, ReadMode
from pocd.transports.opcua.security import (
    AuthenticationFailed,
    SecuritySetupError,
    ServerCertificateUntrusted,
)
from pocd.transports.opcua.session import (
    ConnectionLost,
    ItemRequest,
    NodeFault,
    OpcuaSession,
)
from pocd.transports.opcua.values import (
    NODE_FAULTS,
    TEXT_REASON,
    UNMAPPED_TEXT_REASON,
    PointTrack,
    Reading,
    reading_of,
    status_name,
    status_reason,
)
from pocd.transports.repeats import RepeatedIncidents, report_repeats

__all__ = ["TEXT_KEPT", "TEXT_SHOWN", "OpcuaRunner"]

_NAN = float("nan")
TEXT_SHOWN = 256  # characters of a point's latest text kept in `texts`, for the live view
TEXT_KEPT = 4096  # characters of a text kept in its incident
# A wall clock that steps back by more than this is a clock jump (the daemon records those):
# receive times then follow it instead of counting on from before the jump.
_CLOCK_STEP_BACK = NS


@dataclass(slots=True, eq=False)
class _Slot:
    """One point and what the runner knows of it across sessions."""

    handle: int  # the monitored item's client handle
    name: str
    point: OpcuaPoint
    ref: NodeRef
    read: ReadMode
    track: PointTrack
    node: ua.NodeId | None = None  # resolved in the current session
    fault: str | None = None  # why its node is unusable, to report a change once
    eu_range: tuple[float, float] | None = None
    notes: set[str] = field(default_factory=set)  # metadata incidents already raised


class OpcuaRunner:
    """Reads one OPC UA server until cancelled. See pocd.transports for the contract."""

    def __init__(self, device: Device) -> None:
        if not isinstance(device.settings, OpcuaSettings):
            raise TypeError(f"device {device.id!r} has no OPC UA settings")
        self.device = device
        self.settings: OpcuaSettings = device.settings
        self.slots = [
            _Slot(
                handle=i + 1,
                name=name,
                point=point,
                ref=point.ref,
                read=point.read or self.settings.read,
                track=PointTrack(stale_after=point.stale_after),
            )
            for i, (name, point) in enumerate(device.points.items())
            if isinstance(point, OpcuaPoint)
        ]
        self._by_handle = {slot.handle: slot for slot in self.slots}
        self.up: bool | None = None  # None until the first connect succeeds or fails
        self.session: OpcuaSession | None = None  # the current one, for tests and the bench
        self.counts: Counter[str] = Counter()  # sessions, samples, repeats, notifications
        self.stats = ReadStats()  # polled reads, and sessions lost or never opened
        self.texts: dict[str, str] = {}  # point -> its latest text (first TEXT_SHOWN characters)
        self.repeats = RepeatedIncidents()
        self._texts_seen: dict[str, str] = {}  # point -> latest text, to tell a change
        self._last_t = 0  # receive time of the latest sample
        self._failure: str | None = None  # code of the current outage, to report changes once
        self._down_since = 0.0
        self._inbox: Inbox | None = None
        # Raised inside synchronous steps, put after them (through `repeats`, by key).
        self._incidents: list[tuple[Hashable, Incident]] = []
        self._queued: list[Sample] = []  # likewise: BAD samples of nodes found unusable
        self._rng = random.Random()
        self._log = structlog.get_logger(__name__).bind(device=device.id)

    # --- the session loop -----------------------------------------------------------------

    async def run(self, inbox: Inbox) -> None:
        self._inbox = inbox
        async with asyncio.TaskGroup() as group:
            group.create_task(
                report_repeats(self.repeats, inbox), name=f"opcua-repeats:{self.device.id}"
            )
            try:
                await self._sessions()
            except asyncio.CancelledError as exc:
                if type(exc) is asyncio.CancelledError:
                    raise
                # asyncua (wait_for2) cancels with a subclass when a reply came as it was
                # cancelled; Python 3.11's TaskGroup tells cancellation by identity and would
                # end with that as an error instead of being cancelled.
                raise asyncio.CancelledError(*exc.args) from None

    async def _sessions(self) -> None:
        settings = self.settings
        delay = settings.backoff_min
        while True:
            session = OpcuaSession(settings, self.device.id)
            self.session = session
            self.counts["attempts"] += 1
            error: Exception
            try:
                try:
                    await session.open()
                    error = ConnectionLost(await self._serve(session), device=self.device.id)
                finally:
                    await session.close()
            except (DeviceError, OSError, TimeoutError, UaError) as exc:
                error = exc
            if self.up:
                delay = settings.backoff_min  # it worked: the next outage starts afresh
            await self._down(error, session.password)
            await asyncio.sleep(delay * self._rng.uniform(0.8, 1.2))
            delay = min(delay * 2, settings.backoff_max)

    async def _serve(self, session: OpcuaSession) -> str:
        """Set the session up, report the device up, read until the session is lost."""
        self.counts["sessions"] += 1
        now = time.monotonic()
        for slot in self.slots:
            slot.track.restart(now)
        await self._resolve(session, self.slots)
        subscribed = [s for s in self.slots if s.read == "subscription"]
        if subscribed:
            await self._subscribe(session, [s for s in subscribed if s.node is not None])
        await self._up()
        await self._flush_incidents()
        async with asyncio.TaskGroup() as tg:
            tasks = []
            name = self.device.id
            if any(s.read == "poll" for s in self.slots):
                tasks.append(tg.create_task(self._poll(session), name=f"opcua-poll:{name}"))
            if subscribed:
                tasks.append(
                    tg.create_task(session.watch_publishing(), name=f"opcua-keepalive:{name}")
                )
            if any(s.point.stale_after for s in self.slots):
                tasks.append(tg.create_task(self._watch_stale(), name=f"opcua-stale:{name}"))
            tasks.append(tg.create_task(self._retry_nodes(session), name=f"opcua-nodes:{name}"))
            await session.lost.wait()
            for task in tasks:
                task.cancel()
        return session.lost_reason

    # --- nodes ----------------------------------------------------------------------------

    async def _resolve(self, session: OpcuaSession, slots: Sequence[_Slot]) -> None:
        found = await session.resolve([s.ref for s in slots])
        t = now_ns()
        for slot, node in zip(slots, found, strict=True):
            if isinstance(node, NodeFault):
                self._node_fault(slot, node, t)
            else:
                slot.node = node
                if slot.fault is not None:
                    self._log.info("node found again", point=slot.name, node=str(node))
                    slot.fault = None
        analog = [s for s in slots if s.point.analog and s.node is not None]
        if analog:
            props = await session.analog_properties([s.node for s in analog if s.node])
            for slot, prop in zip(analog, props, strict=True):
                slot.eu_range = prop.eu_range
                if prop.eu_range is None:
                    self._note(slot, "no-eurange", f"{slot.point.node} has no EURange property", t)
                if prop.units is not None and slot.point.unit and prop.units != slot.point.unit:
                    self._note(
                        slot,
                        "unit-mismatch",
                        f"the device reports EngineeringUnits {prop.units!r}, the config says "
                        f"{slot.point.unit!r}",
                        t,
                    )

    async def _subscribe(self, session: OpcuaSession, slots: Sequence[_Slot]) -> None:
        settings = self.settings
        items = [
            ItemRequest(
                handle=s.handle,
                node=s.node,
                sampling_interval=(
                    s.point.sampling_interval
                    if s.point.sampling_interval is not None
                    else settings.sampling_interval
                ),
                queue_size=s.point.queue_size or settings.queue_size,
                deadband=s.point.deadband,
                percent=s.point.deadband_type == "percent",
                timestamp_trigger=s.point.stale_after is not None,
            )
            for s in slots
            if s.node is not None
        ]
        faults = await session.subscribe(items, self._on_items)
        t = now_ns()
        for slot, fault in zip(slots, faults, strict=True):
            if fault is not None:
                self._node_fault(slot, fault, t)

    def _node_fault(self, slot: _Slot, fault: NodeFault, t: int) -> None:
        slot.node = None
        reading = Reading(_NAN, Quality.BAD, status_reason(fault.status), None, fault.status)
        at = self._receive_times(1)
        sample = slot.track.take(self.device.id, slot.name, at, reading, time.monotonic())
        if sample is not None:
            self._queued.append(sample)
        if slot.fault == fault.message:
            return
        slot.fault = fault.message
        code = "node-unknown" if fault.status in NODE_FAULTS else "node-refused"
        message = (
            f"point {slot.name} ({slot.point.node}): {fault.message}; "
            "the device's other points are read as usual"
        )
        self._log.error("node unusable", point=slot.name, reason=fault.message)
        self._incidents.append(
            (
                (code, slot.name),
                Incident(t, IncidentKind.CONFIGURATION, code, self.device.id, message),
            )
        )

    def _note(self, slot: _Slot, code: str, message: str, t: int) -> None:
        if code in slot.notes:
            return
        slot.notes.add(code)
        self._log.warning("point metadata", point=slot.name, reason=message)
        incident = Incident(
            t, IncidentKind.CONFIGURATION, code, self.device.id, f"point {slot.name}: {message}"
        )
        self._incidents.append(((code, slot.name), incident))

    async def _retry_nodes(self, session: OpcuaSession) -> None:
        """Try again, now and then, the nodes the server did not have (a device may add them)."""
        while True:
            await asyncio.sleep(self.settings.node_retry)
            failed = [s for s in self.slots if s.node is None]
            if not failed:
                continue
            try:
                await self._resolve(session, failed)
                again = [s for s in failed if s.read == "subscription" and s.node is not None]
                if again:
                    await self._subscribe(session, again)
            except (OSError, TimeoutError, UaError) as exc:
                session.mark_lost(f"retrying nodes failed: {exc}")
                return
            await self._flush_incidents()

    # --- values ---------------------------------------------------------------------------

    def _receive_times(self, count: int) -> int:
        """The receive time of the first of `count` samples taken now; the others take the
        nanoseconds after it. Never the time of an earlier sample of this runner: a clock that
        has not moved on since (or stepped back by less than a second) counts on from there."""
        t = now_ns()
        last = self._last_t
        if last - _CLOCK_STEP_BACK < t <= last:
            t = last + 1
        self._last_t = t + count - 1
        return t

    async def _on_items(self, items: list[ua.MonitoredItemNotification]) -> None:
        """The values of one publish response (the hot path: keep it lean). Each gets a
        receive time of its own: the response's, plus its place in the response in ns."""
        t = self._receive_times(len(items))
        now = time.monotonic()
        by_handle = self._by_handle
        judge = self._judge
        samples = []
        for item in items:
            slot = by_handle.get(item.ClientHandle)
            if slot is not None:
                sample = judge(slot, item.Value, t, now)
                if sample is not None:
                    samples.append(sample)
            t += 1
        self.counts["notifications"] += len(items)
        await self._put_all(samples)
        if self._incidents or self._queued:
            await self._flush_incidents()

    async def _poll(self, session: OpcuaSession) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.interval
        start = loop.time()
        tick = 0
        while not session.lost.is_set():
            slots = [s for s in self.slots if s.read == "poll" and s.node is not None]
            if slots:
                began = loop.time()
                try:
                    values = await session.read([s.node for s in slots if s.node is not None])
                except (OSError, TimeoutError, UaError) as exc:
                    session.mark_lost(f"a read failed: {type(exc).__name__}: {exc}")
                    return  # an error counted with the session lost (`_down`)
                self.stats.observe(loop.time() - began)
                t = self._receive_times(len(slots))
                now = time.monotonic()
                for slot, data in zip(slots, values, strict=True):
                    sample = self._judge(slot, data, t, now)
                    if sample is not None:
                        await self._put(sample)
                    t += 1
                await self._flush_incidents()
            tick += 1
            next_at = start + tick * interval
            late = loop.time() - next_at
            if late > 0:  # a slow server: skip the ticks it ran past instead of bunching up
                tick += int(late // interval) + 1
                next_at = start + tick * interval
            await asyncio.sleep(next_at - loop.time())

    def _judge(self, slot: _Slot, data: ua.DataValue, t: int, now: float) -> Sample | None:
        reading = reading_of(data, slot.point.values, slot.eu_range)
        if reading.status != slot.track.status:
            self._status_changed(slot, reading, t)
        if reading.text is not None and reading.text[:TEXT_KEPT] != self._texts_seen.get(slot.name):
            self._text_changed(slot, reading, reading.text, t)
        sample = slot.track.take(self.device.id, slot.name, t, reading, now)
        if sample is None:
            self.counts["repeats"] += 1
        elif reading.fault:  # (a repeat of a fault is no new fault)
            message = f"point {slot.name} ({slot.point.node}): {reading.detail}"
            incident = Incident(t, IncidentKind.DATA, reading.fault, self.device.id, message)
            self._incidents.append(((reading.fault, slot.name), incident))
        return sample

    def _text_changed(self, slot: _Slot, reading: Reading, text: str, t: int) -> None:
        """A point's text changed: kept for the live view, and, where the sample cannot hold it
        (no number stands for it), recorded as a data incident."""
        kept = text[:TEXT_KEPT]
        self._texts_seen[slot.name] = kept
        self.texts[slot.name] = text[:TEXT_SHOWN]
        if reading.reason not in (TEXT_REASON, UNMAPPED_TEXT_REASON):
            return  # a text of the point's `values`: its number is the record
        message = f"point {slot.name} ({slot.point.node}): text {kept!r}"
        if len(text) > len(kept):
            message += f" (the first {len(kept)} of {len(text)} characters)"
        if reading.reason == UNMAPPED_TEXT_REASON:
            message += " is not among the point's values"
        incident = Incident(
            t, IncidentKind.DATA, reading.reason, self.device.id, message, kept.encode("utf-8")
        )
        self._incidents.append(((reading.reason, slot.name), incident))

    def _status_changed(self, slot: _Slot, reading: Reading, t: int) -> None:
        old, new = slot.track.status, reading.status
        slot.track.status = new
        if new in NODE_FAULTS:
            self._node_fault(slot, NodeFault(new, f"the server answers {status_name(new)}"), t)
            return
        if new >> 30 >= 2:  # Bad_*: once per change, the samples carry it every time
            name = status_name(new)
            self._log.error("bad status", point=slot.name, status=name)
            incident = Incident(
                t,
                IncidentKind.DATA,
                "bad-status",
                self.device.id,
                f"point {slot.name} ({slot.point.node}): the server reports {name}",
            )
            # Keyed by the status too: a new status is news; only one that flaps is counted.
            self._incidents.append((("bad-status", slot.name, new), incident))
        elif old >> 30 >= 2:
            self._log.info("status recovered", point=slot.name, status=reading.reason or "Good")

    async def _watch_stale(self) -> None:
        slots = [s for s in self.slots if s.point.stale_after]
        step = min(1.0, max(0.05, min(s.point.stale_after or 1.0 for s in slots) / 4))
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for slot in slots:
                t = self._receive_times(1)
                marker = slot.track.check_stale(self.device.id, slot.name, t, now)
                if marker is None:
                    continue
                message = (
                    f"point {slot.name} ({slot.point.node}): the SourceTimestamp has not "
                    f"advanced for more than {slot.point.stale_after:g} s"
                )
                self._log.warning("stale source timestamp", point=slot.name)
                await self._put(marker)
                await self._put_incident(
                    ("stale", slot.name),
                    Incident(t, IncidentKind.DATA, "stale", self.device.id, message),
                )

    async def _put(self, sample: Sample) -> None:
        self.counts["samples"] += 1
        assert self._inbox is not None
        await self._inbox.put(sample)

    async def _put_all(self, samples: list[Sample]) -> None:
        """Put a publish response's samples: without a coroutine per sample while the inbox has
        room; a full one is waited on, in order."""
        inbox = self._inbox
        assert inbox is not None
        self.counts["samples"] += len(samples)
        taken = 0
        with contextlib.suppress(asyncio.QueueFull):
            for sample in samples:
                inbox.put_nowait(sample)
                taken += 1
        for sample in samples[taken:]:
            await inbox.put(sample)

    async def _put_record(self, record: CommStatus | Incident) -> None:
        assert self._inbox is not None
        await self._inbox.put(record)

    async def _put_incident(self, key: Hashable, incident: Incident) -> None:
        """Record the incident unless it repeats one recorded a moment ago (then it counts)."""
        recorded = self.repeats.offer(incident, time.monotonic(), key)
        if recorded is not None:
            await self._put_record(recorded)

    async def _flush_incidents(self) -> None:
        queued, self._queued = self._queued, []
        for sample in queued:
            await self._put(sample)
        incidents, self._incidents = self._incidents, []
        for key, incident in incidents:
            await self._put_incident(key, incident)

    # --- up and down ----------------------------------------------------------------------

    async def _up(self) -> None:
        if self.up is False:
            # The daemon logs the CommStatus itself; this adds how long the gap was.
            gap = time.monotonic() - self._down_since
            self._log.debug("session re-established", after_s=round(gap, 1))
            await self._put_record(CommStatus(self.device.id, now_ns(), ok=True))
        self.up = True
        self._failure = None

    async def _down(self, error: Exception, secret: str | None) -> None:
        self.stats.errors += 1
        code, kind, message = self._classify(error)
        if secret:
            message = message.replace(secret, "***")
        t = now_ns()
        if self.up is not False:
            self.up = False
            self._down_since = time.monotonic()
            self._failure = code
            # Logged by the daemon when it takes the CommStatus; the incident keeps the code.
            # (A session that keeps dropping is a flood of them: repeats are counted.)
            await self._put_record(CommStatus(self.device.id, t, ok=False, reason=message))
            await self._put_incident(code, Incident(t, kind, code, self.device.id, message))
        elif code != self._failure:
            self._failure = code
            self._log.error("device still lost, for another reason", code=code, reason=message)
            await self._put_incident(code, Incident(t, kind, code, self.device.id, message))
        else:
            self._log.debug("reconnect failed", code=code, reason=message)

    def _classify(self, error: Exception) -> tuple[str, IncidentKind, str]:
        endpoint = self.settings.endpoint
        if isinstance(error, ServerCertificateUntrusted):
            return error.code, IncidentKind.COMMUNICATION, f"{endpoint}: {error.detail}"
        if isinstance(error, AuthenticationFailed | SecuritySetupError):
            return error.code, IncidentKind.CONFIGURATION, f"{endpoint}: {error.detail}"
        if isinstance(error, ConnectionLost):
            return error.code, IncidentKind.COMMUNICATION, f"{endpoint}: {error.reason}"
        if isinstance(error, ConnectionRefusedError):
            message = f"{endpoint}: connection refused (is the server running?)"
            return "connection-refused", IncidentKind.COMMUNICATION, message
        if isinstance(error, TimeoutError):
            return "timeout", IncidentKind.COMMUNICATION, f"{endpoint}: no answer (timeout)"
        if isinstance(error, OSError):
            return (
                "unreachable",
                IncidentKind.COMMUNICATION,
                f"{endpoint}: {error.strerror or error}",
            )
        if isinstance(error, UaStatusCodeError):
            name = ua.StatusCode(ua.UInt32(error.code)).name
            return "status", IncidentKind.COMMUNICATION, f"{endpoint}: the server answered {name}"
        message = f"{endpoint}: {type(error).__name__}: {error}"
        return "protocol", IncidentKind.COMMUNICATION, message
