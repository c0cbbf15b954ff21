"""The Modbus device runner: polls one device on a fixed grid and turns replies into records.

Some 500 lines: the poll, its fast path and its plain twin (`_evaluate`) stay side by side,
pinned by a property test.

Each poll makes the planned reads through the device's shared `Link`, then decodes every point
and judges its quality (NaN, infinity, sentinels, an overflow of the scaling, valid range,
status registers). Every fault becomes a BAD sample whose reason is a short code (`timeout`,
`nan`, `out-of-range`, `co2 status bad`, ...) and an `Incident` holding the raw words; repeats
of one fault are counted (`RepeatedIncidents`) rather than recorded one per poll. A unit that
stops answering is a `CommStatus` and is retried with jittered backoff, so it cannot take the
bus time of the units that answer. It never raises for a device fault and never skips a point
it was asked to read.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import structlog

from pocd.errors import ConfigError, ConfigProblem
from pocd.model import CommStatus, Incident, IncidentKind, Quality, Sample
from pocd.transports import BusUse, Device, Inbox, PollGrid, ReadStats, jittered_backoff
from pocd.transports.modbus.codec import Decoder, Item, decoder, read_decoder
from pocd.transports.modbus.config import REGISTER_COUNT, ModbusPoint, ModbusSettings, StatusRule
from pocd.transports.modbus.link import Endpoint, Link, ModbusReadError, Reply, join, leave
from pocd.transports.modbus.plan import Read, Span, locate, plan_reads
from pocd.transports.repeats import RepeatedIncidents, report_repeats

__all__ = ["ModbusRunner", "bus_use", "check_device"]

_NAN = math.nan
_GOOD = Quality.GOOD
# The valid range of a point that sets none: every finite number. An infinity, in the raw value
# or made by the scaling, is outside it, so the one range test of the common case catches it.
_LARGEST = sys.float_info.max
_new = tuple.__new__
# Faults after which the rest of a poll is not attempted: the unit (or the link) is gone, and
# every further read would hold the bus for another timeout.
_GIVE_UP = frozenset({"timeout", "connection"})


# The index of a value (an Item) in the decoded values of read number `read`.
_Index = Callable[[int, Item], int]


# What a poll needs of a point or a status rule, worked out once: every poll evaluates every
# point, and this is most of the runner's time when a device answers fast.
@dataclass(frozen=True, slots=True)
class _Rule:
    rule: StatusRule
    read: int  # index of the read that covers the status register
    start: int  # its words are values[start:end] of that read
    end: int
    decode: Decoder
    index: int  # of its value in the read's decoded values (`read_decoder`)
    # Whatever makes the status not GOOD, for the quick test of the common case (`_all_fine`).
    flag_mask: int
    flag_values: frozenset[int]
    expect: int | None

    @classmethod
    def of(cls, point: ModbusPoint, rule: StatusRule, reads: list[Read], index: _Index) -> _Rule:
        span = _rule_span(point, rule)
        read, start = locate(reads, span)
        decode = decoder(rule.type, rule.word_order, rule.byte_order)
        return cls(
            rule,
            read,
            start,
            start + span.count,
            decode,
            index(read, (start, rule.type, rule.word_order, rule.byte_order, None)),
            rule.bad_mask | rule.uncertain_mask,
            frozenset(rule.bad_values) | frozenset(rule.uncertain_values),
            rule.expect,
        )


@dataclass(frozen=True, slots=True)
class _Slot:
    name: str
    point: ModbusPoint
    read: int  # index of the read that covers the point
    start: int  # its words are values[start:end] of that read
    end: int
    decode: Decoder
    index: int  # of its value in the read's decoded values (`read_decoder`)
    scale: float
    offset: float
    sentinels: tuple[float, ...]
    low: float  # valid range of the scaled value; the finite numbers where the point sets none
    high: float
    rules: tuple[_Rule, ...]

    @classmethod
    def of(cls, name: str, point: ModbusPoint, reads: list[Read], index: _Index) -> _Slot:
        read, start = locate(reads, Span(point.function, point.address, point.count))
        item = (start, point.type, point.word_order, point.byte_order, point.bit)
        return cls(
            name,
            point,
            read,
            start,
            start + point.count,
            decoder(point.type, point.word_order, point.byte_order, point.bit),
            index(read, item),
            point.scale,
            point.offset,
            tuple(point.sentinels),
            -_LARGEST if point.valid_min is None else point.valid_min,
            _LARGEST if point.valid_max is None else point.valid_max,
            tuple(_Rule.of(point, rule, reads, index) for rule in point.status),
        )


def check_device(device: Device) -> list[tuple[str, str]]:
    """What a Modbus device needs beyond its settings and points each: an address, a point."""
    problems = []
    settings = device.settings
    if (
        isinstance(settings, ModbusSettings)
        and settings.host is None
        and settings.serial_port is None
    ):
        problems.append(("transport", "needs host (Modbus TCP) or serial_port (Modbus RTU)"))
    if not any(isinstance(p, ModbusPoint) for p in device.points.values()):
        problems.append(
            ("points", "a Modbus device needs at least one point (list them in the site config)")
        )
    return problems


def bus_use(device: Device) -> BusUse | None:
    """The link a Modbus device is on (a serial port, or a TCP gateway), for the load checks."""
    settings = device.settings
    if not isinstance(settings, ModbusSettings) or (
        settings.host is None and settings.serial_port is None
    ):
        return None
    endpoint = Endpoint.of(settings)
    if endpoint.kind == "tcp":
        bus, protocol, key = f"tcp {endpoint.address}:{endpoint.port}", "Modbus TCP", "host"
        line = f"frame_pause {endpoint.pause * 1000:.3g} ms"
    else:
        bus, protocol, key = endpoint.address, "Modbus RTU", "serial_port"
        line = str(endpoint).removeprefix(f"rtu {endpoint.address} ")
        line += f", frame_pause {endpoint.pause * 1000:.3g} ms"
    return BusUse(
        bus=bus,
        protocol=protocol,
        line=line,
        address=f"unit id {settings.unit_id}",
        bus_key=f"transport.{key}",
        address_key="transport.unit_id",
    )


class ModbusRunner:
    """Reads one Modbus device until cancelled. See pocd.transports for the contract."""

    def __init__(self, device: Device) -> None:
        if not isinstance(device.settings, ModbusSettings):
            raise TypeError(f"device {device.id!r} has no Modbus settings")
        problems = check_device(device)
        if problems:
            raise ConfigError(
                [ConfigProblem(device.driver.source, k, m, device=device.id) for k, m in problems]
            )
        settings = device.settings
        self.device = device
        self.settings: ModbusSettings = settings
        points = {n: p for n, p in device.points.items() if isinstance(p, ModbusPoint)}
        spans: list[Span] = []
        for point in points.values():
            spans.append(Span(point.function, point.address, point.count))
            spans.extend(_rule_span(point, rule) for rule in point.status)
        self.reads: list[Read] = plan_reads(
            spans,
            max_gap=settings.max_gap,
            max_registers=settings.max_registers,
            blocks=settings.blocks,
        )
        # Every value a read carries (points and status registers, each once), decoded in one
        # call per read on each poll; slots and rules know their index in it.
        items: list[dict[Item, int]] = [{} for _ in self.reads]

        def index(read: int, item: Item) -> int:
            return items[read].setdefault(item, len(items[read]))

        self._slots = [_Slot.of(n, point, self.reads, index) for n, point in points.items()]
        self._plan = [
            (read, read_decoder(list(table))) for read, table in zip(self.reads, items, strict=True)
        ]
        self.counts: Counter[str] = Counter()  # faults by code, for status pages and the bench
        self.polls = 0
        self.stats = ReadStats()
        self.grid = PollGrid(settings.interval, self.stats)
        self.up = True  # as far as anyone has said: no CommStatus until the first failure
        self._failures = 0  # polls in a row that got no answer
        self._failing: set[str] = set()  # fault codes of the last poll, to log changes once
        self.repeats = RepeatedIncidents()
        # (point, status rule) -> (status, poll) of the last status that was not GOOD: an
        # incident is made when it changes, not at every poll it lasts.
        self._statuses: dict[tuple[str, int], tuple[int, int]] = {}
        self._rng = random.Random()
        self._log = structlog.get_logger(__name__).bind(device=device.id)
        # Read on every request: plain attributes, not lookups through the settings model.
        self._id = device.id
        self._unit = settings.unit_id
        self._timeout = settings.timeout
        self._retries = settings.retries

    async def run(self, inbox: Inbox) -> None:
        link = join(self.device.id, self.settings, source=self.device.driver.source)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    report_repeats(self.repeats, inbox), name=f"modbus-repeats:{self._id}"
                )
                await self.grid.run(lambda: self.poll(link, inbox), self._backoff)
        finally:
            leave(link, self.device.id)

    def _backoff(self) -> float:
        first = self.settings.interval or self.settings.timeout
        return jittered_backoff(self._failures, first, self.settings.backoff_max, self._rng)

    async def poll(self, link: Link, inbox: Inbox) -> bool:
        """Make every planned read once and report. True when the unit answered at all."""
        results: list[Reply | ModbusReadError] = []
        decoded: list[tuple[float, ...] | None] = []  # each read's values, None if it failed
        given_up: ModbusReadError | None = None
        faults = False  # any failed attempt, even one a retry made good
        answered = False
        for read, decode in self._plan:
            if given_up is not None:
                results.append(given_up)
                decoded.append(None)
                continue
            try:
                reply = await link.read(
                    device=self._id,
                    unit=self._unit,
                    read=read,
                    answer_within=self._timeout,
                    retries=self._retries,
                )
            except ModbusReadError as fault:
                faults = True
                answered = answered or fault.answered
                results.append(fault)
                decoded.append(None)
                if not fault.answered and fault.code in _GIVE_UP:
                    given_up = fault
            else:
                answered = True
                if reply.faults:
                    faults = True
                results.append(reply)
                decoded.append(decode(reply.values))
        self.polls += 1
        # A clean poll of a unit that is up with no fault going on has nothing to report.
        if faults or not self.up or self._failing:
            await self._report_comm(inbox, answered, results)
            await self._report_faults(inbox, results)
        device = self._id
        put = inbox.put_nowait
        for slot in self._slots:
            raws = decoded[slot.read]
            if raws is not None:  # the common case inline: a GOOD value
                raw = raws[slot.index]
                value = raw * slot.scale + slot.offset
                if (
                    slot.low <= value <= slot.high  # False for NaN and for an infinity
                    and raw not in slot.sentinels
                    and (not slot.rules or _all_fine(slot.rules, decoded))
                ):
                    t = results[slot.read].t
                    # A number (NaN fails the range test): Sample's NaN rule has nothing to do.
                    sample = _new(Sample, (device, slot.name, t, value, _GOOD, None, ""))
                    try:
                        put(sample)
                    except asyncio.QueueFull:
                        await inbox.put(sample)
                    continue
            sample, found = self._evaluate(slot, results)
            for key, incident in found:
                await self._incident(inbox, incident, key)
            await inbox.put(sample)
        return answered

    async def _report_comm(
        self, inbox: Inbox, answered: bool, results: list[Reply | ModbusReadError]
    ) -> None:
        if answered:
            if not self.up:
                self._log.info("device answers again", after_failed_polls=self._failures)
                await inbox.put(CommStatus(self.device.id, _time(results), ok=True))
            self.up = True
            self._failures = 0
            return
        self._failures += 1
        if self.up:
            fault = next(r for r in results if isinstance(r, ModbusReadError))
            self._log.error("device stopped answering", reason=fault.reason, code=fault.code)
            await inbox.put(CommStatus(self.device.id, fault.t, ok=False, reason=fault.reason))
        self.up = False

    async def _report_faults(self, inbox: Inbox, results: list[Reply | ModbusReadError]) -> None:
        faults: list[ModbusReadError] = []
        seen: set[int] = set()
        for result in results:
            found = result.faults if isinstance(result, Reply) else (*result.earlier, result)
            for fault in found:
                if id(fault) not in seen:  # a read given up on repeats the fault that ended it
                    seen.add(id(fault))
                    faults.append(fault)
        codes = {f.code for f in faults}
        for fault in faults:
            # Log a fault once when it starts, quietly while it lasts, and once when it ends.
            log = self._log.debug if fault.code in self._failing else self._log.error
            log("modbus read failed", read=fault.address, code=fault.code, reason=fault.reason)
            await self._incident(
                inbox,
                Incident(
                    t=fault.t,
                    kind=fault.kind,
                    code=fault.code,
                    source=self.device.id,
                    message=str(fault),
                    raw=fault.raw,
                ),
                (fault.code, fault.address),
            )
        for code in self._failing - codes:
            self._log.info("modbus reads recovered", code=code)
        self._failing = codes

    async def _incident(self, inbox: Inbox, incident: Incident, key: Hashable) -> None:
        """Count the incident; record it unless it repeats one recorded a moment ago."""
        self.counts[incident.code] += 1
        recorded = self.repeats.offer(incident, time.monotonic(), key)
        if recorded is not None:
            await inbox.put(recorded)

    def _evaluate(
        self, slot: _Slot, results: list[Reply | ModbusReadError]
    ) -> tuple[Sample, list[tuple[Hashable, Incident]]]:
        """The sample of a point that is not plainly GOOD (`poll` does that case), with the
        incidents (and their repeat keys) of a data fault and of a status that changed."""
        device = self._id
        result = results[slot.read]
        if isinstance(result, ModbusReadError):
            return Sample(device, slot.name, result.t, _NAN, Quality.BAD, None, result.code), []
        words = result.values[slot.start : slot.end]
        raw = slot.decode(words)
        value = raw * slot.scale + slot.offset
        quality = Quality.GOOD
        reasons: list[str] = []
        found: list[tuple[Hashable, Incident]] = []
        fault = detail = ""
        if math.isnan(raw):
            fault, detail = "nan", "the device sent NaN"
        elif math.isinf(raw):
            fault, detail, value = "inf", "the device sent an infinity", _NAN
        elif raw in slot.sentinels:
            # A sentinel says "no value": it must not reach the record as a number.
            fault, detail, value = "sentinel", f"sentinel {raw:g} (no value)", _NAN
        elif not math.isfinite(value):
            fault, value = "overflow", _NAN
            detail = f"{raw!r} * scale {slot.scale:g} + offset {slot.offset:g} is not finite"
        elif not slot.low <= value <= slot.high:
            fault, detail = "out-of-range", f"{value:g} outside valid range {_range(slot.point)}"
        if fault:
            quality = Quality.BAD
            reasons.append(fault)
            message = f"{slot.name}: {detail} (raw {raw!r})"
            incident = Incident(
                result.t, IncidentKind.DATA, fault, device, message, _words_bytes(words)
            )
            found.append(((fault, slot.name), incident))
        for index, judged in enumerate(slot.rules):
            rule_quality, reason, status = _judge(judged, results)
            if rule_quality is Quality.GOOD:
                continue
            quality = max(quality, rule_quality)
            reasons.append(reason)
            if status is not None:
                changed = self._status_changed(slot, index, judged, status, results)
                if changed is not None:
                    found.append(changed)
        sample = Sample(device, slot.name, result.t, value, quality, None, "; ".join(reasons))
        return sample, found

    def _status_changed(
        self,
        slot: _Slot,
        index: int,
        judged: _Rule,
        status: int,
        results: list[Reply | ModbusReadError],
    ) -> tuple[Hashable, Incident] | None:
        """The incident of a status register that reads a value that is not GOOD and was not
        so at the last poll: the sample's reason says only bad, uncertain or unexpected; the
        value itself is kept here, once per change (a poll that found the status fine, which
        `poll` does not look at, breaks the run of polls, so the same value is new again)."""
        key = (slot.name, index)
        last = self._statuses.get(key)
        self._statuses[key] = (status, self.polls)
        if last is not None and last == (status, self.polls - 1):
            return None  # the same status as at the last poll
        rule = judged.rule
        result = results[judged.read]
        assert isinstance(result, Reply)
        words = _words_bytes(result.values[judged.start : judged.end])
        message = f"{slot.name}: {rule.label} reads {status} ({status:#x})"
        if rule.expect is not None and status != rule.expect:
            message += f", expected {rule.expect} ({rule.expect:#x})"
        incident = Incident(result.t, IncidentKind.DATA, "status", self._id, message, words)
        # Keyed by the value too: a new status is news; only a status that flaps is counted.
        return ("status", slot.name, index, status), incident


def _rule_span(point: ModbusPoint, rule: StatusRule) -> Span:
    function = rule.function or point.function
    return Span(function, rule.address, REGISTER_COUNT[rule.type])


def _all_fine(rules: tuple[_Rule, ...], decoded: list[tuple[float, ...] | None]) -> bool:
    """Whether every status rule reads GOOD: `_judge` for the common case, in a fraction of
    its time (every status rule of every point is tested on every poll)."""
    for judged in rules:
        raws = decoded[judged.read]
        if raws is None:
            return False
        status = int(raws[judged.index])
        if (
            status & judged.flag_mask
            or status in judged.flag_values
            or (judged.expect is not None and status != judged.expect)
        ):
            return False
    return True


def _judge(
    judged: _Rule, results: list[Reply | ModbusReadError]
) -> tuple[Quality, str, int | None]:
    """The quality a status rule gives, its reason (the rule's label and a state: the status
    value itself goes into an incident, so that reasons stay a small set), and the status."""
    rule = judged.rule
    result = results[judged.read]
    if isinstance(result, ModbusReadError):
        # The value arrived but what the device says about it did not: not BAD, not trusted.
        return Quality.UNCERTAIN, f"{rule.label} unavailable", None
    status = int(judged.decode(result.values[judged.start : judged.end]))
    if rule.expect is not None and status != rule.expect:
        return Quality.BAD, f"{rule.label} unexpected", status
    if status in rule.bad_values or status & rule.bad_mask:
        return Quality.BAD, f"{rule.label} bad", status
    if status in rule.uncertain_values or status & rule.uncertain_mask:
        return Quality.UNCERTAIN, f"{rule.label} uncertain", status
    return Quality.GOOD, "", status


def _time(results: list[Reply | ModbusReadError]) -> int:
    return min(r.t for r in results)


def _range(point: ModbusPoint) -> str:
    low = "-inf" if point.valid_min is None else f"{point.valid_min:g}"
    high = "inf" if point.valid_max is None else f"{point.valid_max:g}"
    return f"[{low}, {high}]"


def _words_bytes(words: list[int] | list[bool]) -> bytes:
    return b"".join(int(w).to_bytes(2, "big") for w in words)
