"""Helpers of the serial tests: devices from driver files, runners and simulators as tasks,
and reading the inbox.

A device is built the way the site loader builds one (the driver's `[defaults]` under the
test's `transport` table, the driver's points under the test's), without a site file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from pocd.model import CommStatus, Incident, Sample
from pocd.settings import load_driver
from pocd.sim.serial import Fault, PtyPair, SerialSimulator, serve_bus
from pocd.transports import Device
from pocd.transports.serial import SerialPoint, SerialRunner, SerialSettings

Record = Sample | CommStatus | Incident
Inbox = asyncio.Queue[Record]

# Short timings for tests over a pty: a pty answers in well under a millisecond.
FAST = {"interval": 0.05, "timeout": 0.25, "retries": 1, "backoff_max": 0.1}


def device(
    driver: str,
    port: str,
    *,
    device_id: str | None = None,
    transport: Mapping[str, Any] | None = None,
    points: Mapping[str, Mapping[str, Any]] | None = None,
) -> Device:
    """A device of this driver on `port`, with FAST timings under `transport`."""
    loaded = load_driver(driver)
    settings = SerialSettings.model_validate(
        {**loaded.defaults, **FAST, "port": port, **(transport or {})}
    )
    extra = points or {}
    merged = {
        name: SerialPoint.model_validate({**loaded.points.get(name, {}), **extra.get(name, {})})
        for name in {**loaded.points, **extra}
    }
    return Device(id=device_id or driver, driver=loaded.info, settings=settings, points=merged)


def runner(driver: str, port: str, **kwargs: Any) -> SerialRunner:
    return SerialRunner(device(driver, port, **kwargs))


@contextlib.asynccontextmanager
async def simulating(
    pair: PtyPair | str,
    *simulators: SerialSimulator,
) -> AsyncIterator[None]:
    """The simulators serve on the pair (several: one RS-485 bus) while the block runs."""
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        task = group.create_task(serve_bus(simulators, pair, ready=ready), name="sim")
        async with asyncio.timeout(5):
            await ready.wait()
        try:
            yield
        finally:
            task.cancel()


def simulator(
    driver: str,
    *,
    faults: Sequence[Fault] = (),
    settings: Mapping[str, Any] | None = None,
    seed: int = 1,
) -> SerialSimulator:
    return SerialSimulator(driver, faults=faults, settings=settings, seed=seed)


async def collect(inbox: Inbox, seen: list[Record], count: int, within: float = 5.0) -> None:
    """Collect records into `seen` until `count` samples have come."""
    async with asyncio.timeout(within):
        while len(samples(seen)) < count:
            seen.append(await inbox.get())


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until `check()` holds: for counters of other tasks, which signal nothing."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 (there is no event to wait on)
            await asyncio.sleep(0.005)


def drain(inbox: Inbox) -> list[Record]:
    records = []
    while not inbox.empty():
        records.append(inbox.get_nowait())
    return records


def samples(records: Sequence[Record], point: str | None = None) -> list[Sample]:
    return [r for r in records if isinstance(r, Sample) and point in (None, r.point)]


def incidents(records: Sequence[Record], code: str | None = None) -> list[Incident]:
    return [r for r in records if isinstance(r, Incident) and code in (None, r.code)]


def comm(records: Sequence[Record]) -> list[CommStatus]:
    return [r for r in records if isinstance(r, CommStatus)]
