"""Repeated incidents of a device, aggregated: the first at once, then one count per interval.

A babbling line (a wrong baud rate), a unit that times out at every poll, a value that is NaN
at every read: each would otherwise be one incident per frame or read, without limit. Runners
pass every incident of that kind through `RepeatedIncidents.offer`, with a key that says what
"the same fault" is (its code, and the point or the read where there is one). The first of a
key is recorded at once and opens a window of `interval` seconds; repeats inside it are
counted, and when it ends one incident says how many there were, from when to when, and keeps
the message and the raw bytes of the last one. A window that saw no repeat closes, so the
next fault of that key is again recorded at once. Nothing is dropped: `due` gives the counts
whose window has ended, `drain` every count still open (when the runner stops).

The bookkeeping is pure (times are passed in; nothing here sleeps or puts). `report_repeats`
is the loop each runner runs beside its reads to put the counts when they fall due.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from pocd.model import NS, Incident
from pocd.transports import Inbox

__all__ = ["REPEAT_INTERVAL", "RepeatedIncidents", "report_repeats"]

REPEAT_INTERVAL = 60.0  # seconds a window counts repeats; then a count, if there were any
RAW_KEPT = 1024  # bytes of the last repeat's raw data kept in a count

_log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Window:
    opened: float  # monotonic time the window opened
    count: int = 0  # repeats counted in it
    first: int = 0  # wall time (ns) of the first repeat counted
    last: Incident | None = None  # the last repeat counted


class RepeatedIncidents:
    """Windows of repeats, one per key. See the module docstring."""

    def __init__(self, interval: float = REPEAT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError("a repeat interval is positive")
        self.interval = interval
        self.counted: Counter[str] = Counter()  # repeats counted, by code (status pages, tests)
        self._windows: dict[Hashable, _Window] = {}

    @property
    def pending(self) -> bool:
        """Whether some window holds repeats not yet reported."""
        return any(window.count for window in self._windows.values())

    def offer(self, incident: Incident, now: float, key: Hashable = None) -> Incident | None:
        """The incident to record now: `incident` itself (the first of its key), the count of
        the key's window that has just ended (then `incident` is the first repeat of the next
        one), or None (counted). `key` defaults to the incident's code."""
        if key is None:
            key = incident.code
        window = self._windows.get(key)
        if window is None or (window.count == 0 and now >= window.opened + self.interval):
            self._windows[key] = _Window(now)
            return incident
        summary = None
        if now >= window.opened + self.interval:
            summary = self._summary(window)
            window.opened, window.count = now, 0
        if window.count == 0:
            window.first = incident.t
        window.count += 1
        window.last = incident
        self.counted[incident.code] += 1
        return summary

    def due(self, now: float) -> list[Incident]:
        """The counts of the windows that have ended by `now`; windows without repeats close."""
        found: list[Incident] = []
        for key, window in list(self._windows.items()):
            if now < window.opened + self.interval:
                continue
            if window.count:
                found.append(self._summary(window))
                window.opened, window.count, window.last = now, 0, None
            else:
                del self._windows[key]
        return found

    def drain(self) -> list[Incident]:
        """Every count still open, whatever its window (the runner is stopping)."""
        found = [self._summary(w) for w in self._windows.values() if w.count]
        self._windows.clear()
        return found

    def _summary(self, window: _Window) -> Incident:
        last = window.last
        assert last is not None
        span = (last.t - window.first) / NS
        message = (
            f"{window.count} more {last.code!r} incident(s) from {_iso(window.first)} to "
            f"{_iso(last.t)} ({span:.3g} s), counted and not recorded one by one (a count at "
            f"most every {self.interval:g} s); the last: {last.message}"
        )
        return Incident(last.t, last.kind, last.code, last.source, message, last.raw[:RAW_KEPT])


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t / NS, UTC).isoformat(timespec="milliseconds")


async def report_repeats(repeats: RepeatedIncidents, inbox: Inbox) -> None:
    """Put the counts of `repeats` as their windows end, until cancelled; then every count
    still open, so that a runner that stops leaves none behind."""
    due: list[Incident] = []
    try:
        while True:
            await asyncio.sleep(repeats.interval / 4)
            due = repeats.due(time.monotonic())
            while due:
                await inbox.put(due[0])
                del due[0]
    finally:
        for incident in due + repeats.drain():
            try:
                inbox.put_nowait(incident)
            except asyncio.QueueFull:
                # Stopping with the inbox full (the engine gone): the count cannot be kept,
                # so it is logged, which is all that is left.
                _log.error(
                    "count of repeated incidents lost at stop",
                    device=incident.source,
                    code=incident.code,
                    message=incident.message,
                )
