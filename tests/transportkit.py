"""Helpers shared by the transport tests: runners run as the daemon runs them, records
collected from their inbox, faults counted through the counts of repeated incidents, and the
far end of a pty pair read byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import termios
import tty
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pocd.model import CommStatus, Incident, Sample
from pocd.transports import DeviceRunner

Record = Sample | CommStatus | Incident


@contextlib.asynccontextmanager
async def running(
    runners: Sequence[DeviceRunner], inbox: asyncio.Queue[Record]
) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """The runners run (as the daemon runs them) while the block runs; yields their tasks."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(r.run(inbox), name=f"runner {r.device.id}") for r in runners]
        try:
            yield tasks
        finally:
            for task in tasks:
                task.cancel()


async def until(
    inbox: asyncio.Queue[Record],
    seen: list[Record],
    predicate: Callable[[Record], bool],
    within: float = 5.0,
) -> Record:
    """Collect records into `seen` until one matches; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            record = await inbox.get()
            seen.append(record)
            if predicate(record):
                return record


_COUNT = re.compile(r"^(\d+) more '([^']*)' incident\(s\) from ")


def repeats_in(incident: Incident) -> int:
    """How many repeats a count of repeated incidents stands for; 0 for any other incident."""
    found = _COUNT.match(incident.message)
    return int(found.group(1)) if found and found.group(2) == incident.code else 0


def occurrences(records: Sequence[Record], code: str) -> int:
    """How many faults of `code` the incidents among `records` stand for: one for each
    incident recorded as it happened, N for a count of N repeats."""
    return sum(repeats_in(r) or 1 for r in records if isinstance(r, Incident) and r.code == code)


class PtyPeer:
    """The far end of a pty pair, read and written byte for byte by the test."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd, termios.TCSANOW)
        self.buffer = bytearray()
        self._more = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.buffer += os.read(self.fd, 1024)
            self._more.set()

    async def _wait_for(self, done: Callable[[], bool], within: float) -> None:
        async with asyncio.timeout(within):
            while not done():
                self._more.clear()
                await self._more.wait()

    async def read(self, count: int, within: float = 3.0) -> bytes:
        """Exactly `count` bytes."""
        await self._wait_for(lambda: len(self.buffer) >= count, within)
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def read_until(self, end: bytes, within: float = 3.0) -> bytes:
        """Everything up to and including `end`."""
        await self._wait_for(lambda: end in self.buffer, within)
        cut = self.buffer.index(end) + len(end)
        data = bytes(self.buffer[:cut])
        del self.buffer[:cut]
        return data

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
