"""Alarm-rate KPIs (EEMUA 191 / ISA-18.2): activations per 10 minutes per line, flood state,
chattering conditions.

Pure: it keeps only the activations of the last 10 minutes (and at most `_CAP` of them per
line), given their times; it never reads a clock. What is standing, unacknowledged or shelved
is read from the conditions by `pocd.alarms.states`, not here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pocd.model import NS

__all__ = [
    "CHATTER_COUNT",
    "CHATTER_WINDOW",
    "FLOOD_END",
    "FLOOD_START",
    "WINDOW",
    "AlarmKey",
    "AlarmKpis",
    "Rates",
]

AlarmKey = tuple[str, str, str]  # (line, source, kind)

WINDOW = 600 * NS  # the rate window: alarms per 10 minutes
FLOOD_START = 10  # a flood starts above this many activations in the window ...
FLOOD_END = 5  # ... and ends below this many
CHATTER_WINDOW = 60 * NS
CHATTER_COUNT = 3  # this many activations of one condition in CHATTER_WINDOW is chattering
# A line raising more than this in 10 minutes is in a flood many times over: its rate reads as
# this cap rather than the memory growing with the flood.
_CAP = 1000


@dataclass(frozen=True, slots=True)
class AlarmKpis:
    """The alarm KPIs of one line at `t`. The tuples hold condition keys (line, source, kind)."""

    line: str
    t: int
    per_10_min: int  # activations in the 10 minutes up to t
    flood: bool
    chattering: tuple[AlarmKey, ...]
    standing: tuple[AlarmKey, ...]  # active longer than the standing time
    unacknowledged: tuple[AlarmKey, ...]  # unacknowledged longer than the given time
    shelved: int
    out_of_service: int
    suppressed: int


class Rates:
    """The recent activations of every line, and each line's flood state.

    The flood state has hysteresis, so it depends on the history: it is updated when an
    activation arrives (the count just before it can only have fallen since the last one), and
    a query applies the thresholds at its own time without changing anything. So the state is a
    function of the activations alone, whether or not (and how often) it was asked."""

    __slots__ = ("_flood", "_recent")

    def __init__(self) -> None:
        self._recent: dict[str, deque[tuple[int, AlarmKey]]] = {}
        self._flood: dict[str, bool] = {}

    def add(self, key: AlarmKey, t: int) -> None:
        line = key[0]
        recent = self._recent.setdefault(line, deque(maxlen=_CAP))
        self.prune(t)
        if self._count(line, t, WINDOW) < FLOOD_END:
            self._flood[line] = False
        recent.append((t, key))
        if self._count(line, t, WINDOW) > FLOOD_START:
            self._flood[line] = True

    def prune(self, t: int) -> None:
        for recent in self._recent.values():
            while recent and recent[0][0] <= t - WINDOW:
                recent.popleft()

    def _count(self, line: str, t: int, window: int) -> int:
        return sum(1 for at, _ in self._recent.get(line, ()) if t - window < at <= t)

    def per_10_min(self, line: str, t: int) -> int:
        return self._count(line, t, WINDOW)

    def flood(self, line: str, t: int) -> bool:
        count = self._count(line, t, WINDOW)
        if count > FLOOD_START:
            return True
        if count < FLOOD_END:
            return False
        return self._flood.get(line, False)

    def chattering(self, line: str, t: int) -> tuple[AlarmKey, ...]:
        counts: dict[AlarmKey, int] = {}
        for at, key in self._recent.get(line, ()):
            if t - CHATTER_WINDOW < at <= t:
                counts[key] = counts.get(key, 0) + 1
        return tuple(k for k, n in counts.items() if n >= CHATTER_COUNT)

    def lines(self) -> set[str]:
        return set(self._recent)
