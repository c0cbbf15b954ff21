"""Detecting wall-clock jumps against the monotonic clock. Pure: the caller reads the clocks."""

from __future__ import annotations

from dataclasses import dataclass

from pocd.model import NS, Incident, IncidentKind

__all__ = ["ClockWatch"]


@dataclass(slots=True)
class ClockWatch:
    """Feed it (wall, monotonic) readings in ns; a wall step that the monotonic clock did not
    take is a jump (NTP step, manual change, VM resume) and comes back as an incident."""

    threshold_s: float = 2.0
    _last: tuple[int, int] | None = None

    def check(self, wall_ns: int, mono_ns: int) -> Incident | None:
        last, self._last = self._last, (wall_ns, mono_ns)
        if last is None:
            return None
        jump = ((wall_ns - last[0]) - (mono_ns - last[1])) / NS
        if abs(jump) < self.threshold_s:
            return None
        return Incident(
            t=wall_ns,
            kind=IncidentKind.CLOCK,
            code="clock-jump",
            source="daemon",
            message=f"wall clock jumped {jump:+.3f} s against the monotonic clock",
        )
