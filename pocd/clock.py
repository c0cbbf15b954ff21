"""Detecting wall-clock jumps against a steady clock (pure: the caller reads the clocks), and
whether the kernel counts the system clock as synchronised (adjtimex(2))."""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

from pocd.model import NS

__all__ = ["ClockWatch", "clock_synchronised", "steady_ns"]

# The steady clock: CLOCK_BOOTTIME where there is one (Linux), which goes on through a suspend
# of the machine, unlike CLOCK_MONOTONIC. Time that really passed while suspended is then a gap
# in the data, as it should be, not a jump of the wall clock.
_STEADY = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def steady_ns() -> int:
    return time.clock_gettime_ns(_STEADY)


@dataclass(slots=True)
class ClockWatch:
    """Feed it (wall, steady) readings in ns; a wall step that the steady clock did not take
    (an NTP step, a manual change) is a jump, returned in ns (0 when there is none)."""

    threshold_s: float = 2.0
    _last: tuple[int, int] | None = None

    def check(self, wall_ns: int, steady: int) -> int:
        last, self._last = self._last, (wall_ns, steady)
        if last is None:
            return 0
        jump = (wall_ns - last[0]) - (steady - last[1])
        return 0 if abs(jump) < self.threshold_s * NS else jump


_TIME_ERROR = 5  # adjtimex's answer while the clock is not synchronised (STA_UNSYNC)


def clock_synchronised() -> bool | None:
    """Whether an NTP client (chrony, systemd-timesyncd) keeps the system clock synchronised,
    as adjtimex(2) with no change asked says; None where it cannot be asked."""
    timex = ctypes.create_string_buffer(512)  # struct timex (208 bytes on x86-64), modes = 0
    try:
        state = ctypes.CDLL(None, use_errno=True).adjtimex(timex)
    except (OSError, AttributeError):  # not Linux
        return None
    return None if state < 0 else state != _TIME_ERROR
