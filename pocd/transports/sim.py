"""The `sim` transport: signals computed in process, for the demo, training and validation runs.

Each point is base + drift + sine + noise, with scripted segments on top (offsets, ramps, fixed
values, stale periods, bad-quality stretches, NaN) and device outages that report comm-loss.
Script times are seconds since the runner started; `repeat` replays the script in a loop.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Literal

from pydantic import Field

from pocd.configtypes import Duration, StrictModel
from pocd.model import CommStatus, Quality, Sample, now_ns
from pocd.transports import (
    Device,
    Inbox,
    PointSettings,
    ReadStats,
    TransportSettings,
    TransportSpec,
)

__all__ = ["TRANSPORT", "SimPoint", "SimRunner", "SimSettings"]


class Segment(StrictModel):
    start: Duration
    duration: Duration
    action: Literal["offset", "ramp", "set", "stale", "bad", "nan"]
    value: float = 0.0


class Outage(StrictModel):
    start: Duration
    duration: Duration


class SimSettings(TransportSettings):
    seed: int = 0
    repeat: Duration | None = Field(default=None, gt=0)
    outages: list[Outage] = []


class SimPoint(PointSettings):
    base: float = 0.0
    noise: float = Field(default=0.0, ge=0)  # standard deviation
    drift: float = 0.0  # unit per minute
    amplitude: float = 0.0
    period: Duration = 60.0
    step: float | None = Field(default=None, gt=0)  # quantum, e.g. 1 for a rocking rate
    script: list[Segment] = []


def _active(start: float, duration: float, elapsed: float) -> bool:
    return start <= elapsed < start + duration


class SimRunner:
    def __init__(self, device: Device) -> None:
        self.device = device
        assert isinstance(device.settings, SimSettings)
        self.settings: SimSettings = device.settings
        self.points = {
            name: point for name, point in device.points.items() if isinstance(point, SimPoint)
        }
        self._rng = random.Random(self.settings.seed)
        self.stats = ReadStats()

    def reading(self, name: str, elapsed: float) -> tuple[float, Quality, str] | None:
        """The value of a point `elapsed` seconds after start; None while it is stale."""
        point = self.points[name]
        script_t = self._script_time(elapsed)
        value = point.base + point.drift * elapsed / 60.0
        if point.amplitude:
            value += point.amplitude * math.sin(2 * math.pi * elapsed / point.period)
        if point.noise:
            value += self._rng.gauss(0.0, point.noise)
        quality, reason = Quality.GOOD, ""
        for seg in point.script:
            if not _active(seg.start, seg.duration, script_t):
                continue
            if seg.action == "offset":
                value += seg.value
            elif seg.action == "ramp":
                value += seg.value * (script_t - seg.start) / seg.duration
            elif seg.action == "set":
                value = seg.value
            elif seg.action == "stale":
                return None
            elif seg.action == "bad":
                quality, reason = Quality.BAD, "simulated-fault"
            else:
                value = math.nan
        if math.isinf(value):  # a drift or a ramp beyond every float: no number to record
            value, quality, reason = math.nan, Quality.BAD, "overflow"
        if point.step and math.isfinite(value):  # (round() of a NaN raises)
            value = round(value / point.step) * point.step
        return value, quality, reason

    def _script_time(self, elapsed: float) -> float:
        return elapsed % self.settings.repeat if self.settings.repeat else elapsed

    def in_outage(self, elapsed: float) -> bool:
        script_t = self._script_time(elapsed)
        return any(_active(o.start, o.duration, script_t) for o in self.settings.outages)

    async def run(self, inbox: Inbox) -> None:
        interval = self.settings.interval
        started = time.monotonic()
        down = False
        tick = 0
        while True:
            elapsed = time.monotonic() - started
            t = now_ns()
            if self.in_outage(elapsed) != down:
                down = not down
                reason = "simulated outage" if down else ""
                await inbox.put(CommStatus(device=self.device.id, t=t, ok=not down, reason=reason))
            self.stats.observe(0.0, ok=not down)  # an outage is a read that fails
            if not down:
                for name in self.points:
                    reading = self.reading(name, elapsed)
                    if reading is not None:
                        value, quality, reason = reading
                        await inbox.put(
                            Sample(self.device.id, name, t, value, quality, None, reason)
                        )
            tick += 1
            # Scheduled from the start, so polls never drift.
            await asyncio.sleep(max(0.0, started + tick * interval - time.monotonic()))


TRANSPORT = TransportSpec(name="sim", settings=SimSettings, point=SimPoint, runner=SimRunner)
