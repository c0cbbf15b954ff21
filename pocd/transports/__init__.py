"""The transport interface: how a device's readings reach the daemon.

A transport is a protocol noun (sim, modbus, opcua, serial). Each lives in its own module that
exposes `TRANSPORT`, a `TransportSpec` naming its settings model, its point model, the runner
that reads one device, and the checks the site loader makes at load (of a whole device, and of
the devices that share a bus: `BusUse`). Modules are imported only when a config uses them.

Contract of a runner (`DeviceRunner.run`): read the device until cancelled and put every
`Sample`, `CommStatus` and `Incident` into the inbox. It owns reconnection (jittered backoff),
never raises for a device fault, and never drops a reading: a value it cannot trust is a BAD
sample whose reason is a short code (what the device said goes into an incident), a lost
device is a `CommStatus(ok=False)`, and a fault that repeats is counted (`repeats`).
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Final, Protocol

from pocd.configtypes import Duration, StrictModel
from pocd.model import CommStatus, Incident, Sample

__all__ = [
    "READ_BUCKETS",
    "TRANSPORTS",
    "BusUse",
    "Device",
    "DeviceRunner",
    "DriverInfo",
    "Inbox",
    "PointSettings",
    "PollGrid",
    "ReadStats",
    "TransportSettings",
    "TransportSpec",
    "get_transport",
    "jittered_backoff",
    "next_poll",
]


class PointSettings(StrictModel):
    """What every point has, whatever its transport."""

    parameter: str | None = None  # the protocol parameter this point feeds, if any
    unit: str = ""
    description: str = ""


class TransportSettings(StrictModel):
    """What every device has, whatever its transport."""

    interval: Duration = 1.0  # seconds between polls


@dataclass(frozen=True, slots=True)
class DriverInfo:
    id: str
    transport: str
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    source: str = ""
    hash: str = ""  # SHA-256 of the driver file's content (canonical JSON), for the audit trail


@dataclass(frozen=True, slots=True)
class Device:
    """A device of the site, resolved from the site config over its driver file."""

    id: str
    driver: DriverInfo
    settings: TransportSettings
    points: Mapping[str, PointSettings]
    title: str = ""
    serial_number: str = ""
    firmware: str = ""
    calibration_due: date | None = None
    identity: Mapping[str, str] = field(default_factory=dict)


class Inbox(Protocol):
    """Where a runner puts its records (the daemon's is `pocd.inbox.Inbox`)."""

    async def put(self, record: Sample | CommStatus | Incident, /) -> None: ...

    def put_nowait(self, record: Sample | CommStatus | Incident, /) -> None:
        """Put without waiting; asyncio.QueueFull when there is no room."""


# The upper bounds (s) of the read-time histogram's buckets: Prometheus's defaults.
READ_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ReadStats:
    """A runner's reads of its device, for /metrics: how long each poll took (a histogram
    over `READ_BUCKETS`), and the reads that failed (a poll the device did not answer, a
    session lost)."""

    __slots__ = ("buckets", "errors", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(READ_BUCKETS) + 1)  # reads per bucket; the last: beyond all
        self.seconds = 0.0  # their total time
        self.errors = 0

    def observe(self, seconds: float, *, ok: bool = True) -> None:
        self.buckets[bisect.bisect_left(READ_BUCKETS, seconds)] += 1
        self.seconds += seconds
        if not ok:
            self.errors += 1


class DeviceRunner(Protocol):
    device: Device
    stats: ReadStats

    async def run(self, inbox: Inbox) -> None:
        """Read the device until cancelled. See the module docstring for the contract."""
        ...


@dataclass(frozen=True, slots=True)
class BusUse:
    """How a device uses a connection that other devices may share (an RS-485 port, a Modbus
    TCP gateway), for the checks the site loader makes across devices: everything on one bus
    speaks one protocol, with the same line settings, and each device has its own address."""

    bus: str  # the bus: a port's real path, or "tcp host:port"
    protocol: str  # what is spoken on it: "serial ASCII", "Modbus RTU", "Modbus TCP"
    line: str  # the settings every device on the bus must share, as text
    address: str  # the device's address on the bus (a Modbus unit id, an Alicat unit id)
    bus_key: str  # where the bus is set, under devices[i]: "transport.serial_port"
    address_key: str  # where the address is set: "transport.unit_id"
    alone: bool = False  # the device must have the bus to itself (a serial device streaming)


@dataclass(frozen=True, slots=True)
class TransportSpec:
    name: str
    settings: type[TransportSettings]
    point: type[PointSettings]
    runner: Callable[[Device], DeviceRunner]
    # Checks that need the whole resolved device (driver defaults + site overrides), run at
    # load so that `pocd check` reports them: (key under devices[i], message) per problem.
    check: Callable[[Device], list[tuple[str, str]]] | None = None
    # The bus a device is on, if it may share one: the loader checks the devices of each bus
    # against each other (the runners' `join` checks the same again when they start).
    bus: Callable[[Device], BusUse | None] | None = None


TRANSPORTS: Mapping[str, str] = {
    "sim": "pocd.transports.sim",
    "modbus": "pocd.transports.modbus",
    "opcua": "pocd.transports.opcua",
    "serial": "pocd.transports.serial",
}


def get_transport(name: str) -> TransportSpec:
    """The transport of that name. Raises KeyError for an unknown one."""
    spec: TransportSpec = importlib.import_module(TRANSPORTS[name]).TRANSPORT
    return spec


def next_poll(
    tick: int, start: float, now: float, interval: float, wait: float | None
) -> tuple[int, int]:
    """The tick of the next poll on the grid start + n * interval, after poll `tick` ended at
    `now`, and how many ticks it skips. Polls never drift; one that ran late skips the ticks it
    missed instead of bunching up behind them; after a poll the device did not answer, the
    next waits at least `wait` s (those ticks are not counted as skipped)."""
    following = tick + 1
    if wait is not None:
        following = max(following, math.ceil((now + wait - start) / interval))
    late = math.floor((now - start) / interval) + 1
    return max(following, late), max(0, late - following)


class PollGrid:
    """A runner's polls on the grid start + n * interval (see `next_poll`); with interval 0,
    back to back. After a poll the device did not answer, the next waits `backoff()`."""

    def __init__(self, interval: float, stats: ReadStats) -> None:
        self.interval = interval
        self.stats = stats  # each poll's time, and whether the device answered it
        self.skipped = 0  # grid ticks missed because a poll ran past them

    async def run(self, poll: Callable[[], Awaitable[bool]], backoff: Callable[[], float]) -> None:
        """Poll until cancelled; `poll` says whether the device answered."""
        loop = asyncio.get_running_loop()
        interval = self.interval
        observe = self.stats.observe
        start = loop.time()
        tick = 0
        while True:
            began = loop.time()
            answered = await poll()
            observe(loop.time() - began, ok=answered)
            if interval <= 0:  # back to back, as fast as the device answers (the benches)
                # An answered poll has waited for the device, so others have had their turn.
                if not answered:
                    await asyncio.sleep(backoff())
                continue
            wait = None if answered else backoff()
            tick, skipped = next_poll(tick, start, loop.time(), interval, wait)
            self.skipped += skipped
            await asyncio.sleep(start + tick * interval - loop.time())


def jittered_backoff(failures: int, first: float, most: float, rng: random.Random) -> float:
    """The wait after `failures` failed attempts in a row: exponential from `first`, at most
    `most`, with "equal jitter" (half of it fixed, half random) so devices do not retry in step."""
    ceiling = min(most, first * 2.0 ** max(0, failures - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)
