"""The inbox: every runner's readings on their way to the one engine task.

A bounded FIFO, like `asyncio.Queue`, with one difference: the consumer takes everything that
is waiting at once. Runners put one record at a time; a poll that reads ten points then costs
the engine task one wake-up, not ten, and no per-record get or task_done: at the thousands of
readings a second of bench/modbus.py, those were most of the engine task's time.

Nothing is dropped: a runner that finds the inbox full waits until the consumer has taken.
"""

from __future__ import annotations

import asyncio
from collections import deque

from pocd.model import CommStatus, Incident, Sample

__all__ = ["Inbox", "Reading"]

Reading = Sample | CommStatus | Incident


class Inbox:
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("an inbox holds at least one reading")
        self.maxsize = maxsize
        self._items: list[Reading] = []
        self._taker: asyncio.Future[None] | None = None  # the consumer, waiting for readings
        self._putters: deque[asyncio.Future[None]] = deque()  # runners waiting for room
        self._unfinished = 0  # put, and not yet reported done by the consumer
        self._idle = asyncio.Event()
        self._idle.set()

    def qsize(self) -> int:
        """Readings waiting to be taken."""
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    async def put(self, record: Reading, /) -> None:
        """Add a reading; wait first while the inbox is full."""
        while len(self._items) >= self.maxsize:
            room = asyncio.get_running_loop().create_future()
            self._putters.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room in self._putters:
                    self._putters.remove(room)
                elif len(self._items) < self.maxsize:
                    self._wake_putter()  # it was woken: hand the room on
                raise
        self.put_nowait(record)

    def put_nowait(self, record: Reading, /) -> None:
        """Add a reading now; asyncio.QueueFull if the inbox is full."""
        if len(self._items) >= self.maxsize:
            raise asyncio.QueueFull
        self._items.append(record)
        if not self._unfinished:
            self._idle.clear()
        self._unfinished += 1
        taker = self._taker
        if taker is not None and not taker.done():
            taker.set_result(None)

    async def take(self) -> list[Reading]:
        """Everything waiting, in the order it was put; waits for at least one reading.
        The caller reports `done(len(readings))` when it has dealt with them."""
        while not self._items:
            self._taker = asyncio.get_running_loop().create_future()
            try:
                await self._taker
            finally:
                self._taker = None
        items, self._items = self._items, []
        for _ in range(min(len(self._putters), self.maxsize)):
            self._wake_putter()
        return items

    def done(self, count: int) -> None:
        """`count` readings taken earlier have been dealt with."""
        if count > self._unfinished:
            raise ValueError("done() called for more readings than were put")
        self._unfinished -= count
        if not self._unfinished:
            self._idle.set()

    async def join(self) -> None:
        """Wait until every reading put so far has been taken and reported done."""
        await self._idle.wait()

    def _wake_putter(self) -> None:
        while self._putters:
            room = self._putters.popleft()
            if not room.done():
                room.set_result(None)
                return
