"""The `sim` transport's readings, with plain values: a NaN stretch on a stepped point, and a
drift beyond every float (issue 11, items 1a and 18: no impossible value, no crash)."""

from __future__ import annotations

import math

from pocd.model import Quality
from pocd.transports import Device, DriverInfo
from pocd.transports.sim import SimPoint, SimRunner, SimSettings


def sim_runner(**points: dict[str, object]) -> SimRunner:
    device = Device(
        id="sim",
        driver=DriverInfo("sim", "sim"),
        settings=SimSettings(),
        points={name: SimPoint.model_validate(body) for name, body in points.items()},
    )
    return SimRunner(device)


def test_a_nan_stretch_on_a_stepped_point_is_a_nan_reading() -> None:
    runner = sim_runner(
        rocking={
            "base": 12.0,
            "step": 1.0,
            "script": [{"start": 0, "duration": 5, "action": "nan"}],
        }
    )
    reading = runner.reading("rocking", 1.0)  # round() of a NaN used to raise here
    assert reading is not None and math.isnan(reading[0])
    assert runner.reading("rocking", 6.0) == (12.0, Quality.GOOD, "")


def test_a_value_beyond_every_float_is_bad_not_infinite() -> None:
    runner = sim_runner(level={"base": 1e308, "drift": 1e308, "step": 1.0})
    reading = runner.reading("level", 120.0)
    assert reading is not None
    value, quality, reason = reading
    assert math.isnan(value) and (quality, reason) == (Quality.BAD, "overflow")
