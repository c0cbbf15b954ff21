"""The OPC UA transport against asyncua servers on 127.0.0.1 (the simulator of pocd.sim.opcua):
subscription and polling, unknown nodes among good ones, deadband, Bad status, frozen
timestamps, EURange, a dropped connection, a slow server, and the in-process `serve` API."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from pocd.model import IncidentKind, Quality
from pocd.settings import load_driver
from pocd.sim.opcua import OpcuaSimulator, serve
from pocd.transports.opcua.values import FROZEN_REASON, STALE_REASON
from tests.opcuakit import opcua_device, running
from tests.sitekit import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAST = {"publishing_interval": 0.05, "sampling_interval": 0.05, "backoff_min": 0.1}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rotea() -> AsyncIterator[OpcuaSimulator]:
    """The Rotea interface, values written every 0.1 s, shared by the tests of this module."""
    sim = OpcuaSimulator(
        load_driver("thermo-rotea"), f"opc.tcp://127.0.0.1:{free_port()}", interval=0.1
    )
    async with sim:
        yield sim


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lads() -> AsyncIterator[OpcuaSimulator]:
    """A LADS analog sensor whose values change only when a test says (interval: an hour)."""
    sim = OpcuaSimulator(
        load_driver("lads-analog-sensor"), f"opc.tcp://127.0.0.1:{free_port()}", interval=3600
    )
    async with sim:
        yield sim


def _tasks() -> set[asyncio.Task[object]]:
    """Tasks of this loop, but the servers': a server keeps the session of a dropped connection
    (and its subscription's task) for the client to take over, as OPC UA asks."""
    return {
        t
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task()
        and "asyncua/server/" not in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    }


@contextlib.asynccontextmanager
async def no_leaks() -> AsyncIterator[None]:
    before = _tasks()
    yield
    for _ in range(10):
        await asyncio.sleep(0)
    leaked = _tasks() - before
    assert not leaked, f"tasks left running: {[t.get_name() for t in leaked]}"


async def test_subscription_and_polling_read_the_same_node(rotea: OpcuaSimulator) -> None:
    """Subscribed points report changes only; a polled point reports each new SourceTimestamp
    once, in batched reads. Text states become numbers through `values`."""
    device = opcua_device(
        "thermo-rotea",
        endpoint=rotea.endpoint,
        interval=0.25,
        points={"step_polled": {"node": "rotea:ProtocolStepNumber", "read": "poll"}},
        **FAST,
    )
    async with no_leaks(), running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.samples("step_polled")) >= 4)
        rotea.set_value("protocol_step_number", 7)
        await inbox.wait_for(lambda: inbox.samples("protocol_step_number")[-1].value == 7)
        await inbox.wait_for(lambda: inbox.samples("step_polled")[-1].value == 7)
        rotea.set_value("protocol_step_number", None)
    subscribed = inbox.samples("protocol_step_number")
    assert [s.value for s in subscribed] == [1.0, 7.0]  # the value written every 0.1 s: 2 changes
    polled = inbox.samples("step_polled")
    assert len(polled) >= 5
    stamps = [s.device_t for s in polled]
    assert None not in stamps and stamps == sorted(set(stamps))  # every poll a newer value
    latest = {s.point: s for s in inbox.samples()}
    assert latest["protocol_state"].value == 4.0  # "ProtocolRunning"
    assert latest["door_state"].value == 0.0  # "Closed"
    assert latest["kit_state"].value == 3.0  # "InUse"
    assert latest["waiting_user_ack"].value == 0.0  # Boolean false
    name = latest["protocol_name"]
    # A text is no number: the sample's reason is the code `text`, the text is in the incident
    # (one per change of it) and, for the live view, in `texts`.
    assert name.quality is Quality.BAD and name.reason == "text"
    assert [(i.code, i.message) for i in inbox.incidents()] == [
        ("text", "point protocol_name (rotea:ProtocolName): text 'CAR-T Wash 3'")
    ]
    assert inbox.incidents()[0].raw == b"CAR-T Wash 3"
    assert runner.texts["protocol_name"] == "CAR-T Wash 3"
    assert runner.texts["protocol_state"] == "ProtocolRunning"  # mapped to 4: no incident
    assert all(s.device_t is not None for s in inbox.samples())
    assert inbox.comm() == []
    assert runner.counts["sessions"] == 1


async def test_an_unknown_node_affects_only_its_point(rotea: OpcuaSimulator) -> None:
    device = opcua_device(
        "thermo-rotea",
        endpoint=rotea.endpoint,
        interval=0.2,
        points={
            "missing_id": {"node": "ns=2;s=NoSuchNode"},
            "missing_path": {"node": "rotea:NoSuchVariable"},
            "missing_ns": {"node": "nsu=urn:nobody;s=X", "read": "poll"},
            "missing_polled": {"node": "ns=2;i=999999", "read": "poll"},
            "good_polled": {"node": "rotea:ProtocolStepNumber", "read": "poll"},
        },
        **FAST,
    )
    async with no_leaks(), running(device) as (_, inbox):
        await inbox.wait_for(lambda: len(inbox.samples("good_polled")) >= 3)
    missing = ["missing_id", "missing_path", "missing_ns", "missing_polled"]
    for point in missing:
        (sample,) = inbox.samples(point)  # one BAD sample, not one per poll
        assert sample.quality is Quality.BAD, point
        assert math.isnan(sample.value)
    assert inbox.samples("missing_id")[0].reason == "BadNodeIdUnknown"
    assert inbox.samples("missing_path")[0].reason == "BadNoMatch"
    incidents = inbox.incidents("node-unknown")
    assert sorted(i.message.split(" ")[1] for i in incidents) == sorted(missing)
    assert all("other points are read as usual" in i.message for i in incidents)
    assert "urn:nobody" in next(i.message for i in incidents if "missing_ns" in i.message)
    for point in ("protocol_state", "protocol_step_number", "door_state", "good_polled"):
        assert inbox.samples(point)[-1].quality is Quality.GOOD, point
    assert inbox.comm() == []


async def test_absolute_deadband_drops_small_changes(lads: OpcuaSimulator) -> None:
    node = "lads:FunctionalUnitSet/dev:SensorUnit/lads:FunctionSet/dev:Sensor/lads:SensorValue"
    device = opcua_device(
        "lads-analog-sensor",
        endpoint=lads.endpoint,
        points={
            "sensor_value": {"stale_after": None},
            "coarse": {"node": node, "deadband": 0.5, "unit": "C"},
            "percent": {"node": node, "deadband": 1.0, "deadband_type": "percent", "unit": "C"},
        },
        **FAST,
    )
    steps = [37.0, 37.1, 37.2, 37.3, 38.0, 38.1, 36.0]
    async with no_leaks(), running(device) as (_, inbox):
        await inbox.wait_for(lambda: len(inbox.samples("coarse")) == 1)
        for value in steps:
            lads.set_value("sensor_value", value)
            await lads.update()
            await inbox.wait_for(lambda v=value: inbox.samples("sensor_value")[-1].value == v)
        await inbox.wait_for(lambda: inbox.samples("coarse")[-1].value == 36.0)
        lads.set_value("sensor_value", None)
    assert [s.value for s in inbox.samples("sensor_value")][-len(steps) :] == steps
    # The first value, then only the changes beyond 0.5 (asyncua's server compares each value
    # with the one it sampled before it).
    assert [s.value for s in inbox.samples("coarse")][1:] == [38.0, 36.0]
    # Percent deadbands are requested with the EURange the server has; asyncua's own server
    # accepts them without applying them, so only the request is checked here.
    assert inbox.incidents() == [] and len(inbox.samples("percent")) >= len(steps)


async def test_bad_status_frozen_timestamp_and_eurange(lads: OpcuaSimulator) -> None:
    device = opcua_device(
        "lads-analog-sensor",
        endpoint=lads.endpoint,
        points={"sensor_value": {"stale_after": 1.0}},
        **FAST,
    )
    async with no_leaks(), running(device) as (runner, inbox):

        async def serve_value(value: float) -> None:
            lads.set_value("sensor_value", value)
            await lads.update()

        await inbox.wait_for(lambda: len(inbox.samples()) >= 1)
        assert runner.slots[0].eu_range == (0.0, 100.0)  # read from the EURange property
        lads.set_bad("sensor_value", "BadSensorFailure")
        await serve_value(37.0)
        await inbox.wait_for(lambda: inbox.samples()[-1].reason == "BadSensorFailure")
        lads.set_bad("sensor_value", None)
        await serve_value(150.0)  # beyond EURange [0, 100]
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 150.0)
        await serve_value(37.0)
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 37.0)
        lads.freeze("sensor_value")
        await serve_value(37.5)  # a new value under the old timestamp: the clock is stuck
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 37.5)
        await inbox.wait_for(lambda: inbox.samples()[-1].reason == STALE_REASON, within=3)
        await serve_value(37.6)
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 37.6)
        lads.freeze("sensor_value", frozen=False)
        await serve_value(37.7)
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 37.7)
        lads.set_value("sensor_value", None)
    got = [(s.value, s.quality, s.reason) for s in inbox.samples()]
    tail = got[-7:]
    assert math.isnan(tail[0][0]) and tail[0][1:] == (Quality.BAD, "BadSensorFailure")
    assert tail[1] == (150.0, Quality.UNCERTAIN, "outside-eurange")
    assert tail[2] == (37.0, Quality.GOOD, "")
    assert tail[3] == (37.5, Quality.UNCERTAIN, FROZEN_REASON)
    assert math.isnan(tail[4][0]) and tail[4][1:] == (Quality.BAD, STALE_REASON)
    assert tail[5] == (37.6, Quality.BAD, STALE_REASON)
    assert tail[6] == (37.7, Quality.GOOD, "")
    samples = inbox.samples()
    assert samples[-4].device_t is None and samples[-3].device_t is None  # no source time reused
    timed = [s.device_t for s in samples if s.device_t is not None]
    assert len(timed) == len(set(timed))
    assert [i.code for i in inbox.incidents()] == ["bad-status", "stale"]
    assert "BadSensorFailure" in inbox.incidents()[0].message


async def test_an_impossible_source_time_is_a_bad_sample_and_an_incident(
    lads: OpcuaSimulator,
) -> None:
    """A server sending DateTime.MaxValue as SourceTimestamp: the sample is BAD with the code
    `impossible-time` and no device time (nanoseconds past 2262 fit no 64-bit integer, and one
    such record once stopped every later store write); the time itself is in a data incident."""
    device = opcua_device("lads-analog-sensor", endpoint=lads.endpoint, **FAST)
    async with no_leaks(), running(device) as (_, inbox):
        await inbox.wait_for(lambda: len(inbox.samples()) >= 1)
        lads.freeze("sensor_value", at=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
        lads.set_value("sensor_value", 38.5)
        await lads.update()
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 38.5)
        lads.freeze("sensor_value", frozen=False)
        lads.set_value("sensor_value", 37.0)
        await lads.update()
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 37.0)
        lads.set_value("sensor_value", None)
    impossible = inbox.samples()[-2]
    assert (impossible.value, impossible.quality, impossible.reason, impossible.device_t) == (
        38.5,
        Quality.BAD,
        "impossible-time",
        None,
    )
    assert all(s.device_t is None or s.device_t < 2**63 for s in inbox.samples())
    assert inbox.samples()[-1].quality is Quality.GOOD  # a real time again: as usual
    [incident] = inbox.incidents("impossible-time")
    assert incident.kind is IncidentKind.DATA and "9999-12-31" in incident.message


async def test_values_of_one_publish_response_have_distinct_receive_times(
    lads: OpcuaSimulator,
) -> None:
    """Several queued values of one point arrive in one publish response. InfluxDB keys a
    point by its time (the receive time): were they to share it, it would keep only the last.
    Each gets the response's time plus its place in the response, in nanoseconds."""
    device = opcua_device(
        "lads-analog-sensor",
        endpoint=lads.endpoint,
        publishing_interval=0.5,
        sampling_interval=0,
        queue_size=10,
        backoff_min=0.1,
    )
    burst = [40.0, 41.0, 42.0, 43.0, 44.0]
    async with no_leaks(), running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.samples()) >= 1)
        for value in burst:
            lads.set_value("sensor_value", value)
            await lads.update()
        await inbox.wait_for(lambda: inbox.samples()[-1].value == burst[-1])
        lads.set_value("sensor_value", None)
    got = [s for s in inbox.samples("sensor_value") if s.value in burst]
    assert [s.value for s in got] == burst
    times = [s.t for s in got]
    assert times == sorted(set(times))  # distinct, in the order the server queued them
    assert any(b - a == 1 for a, b in itertools.pairwise(times))  # (they came together)
    every = [s.t for s in inbox.samples()]
    assert len(every) == len(set(every)) and runner.counts["notifications"] >= len(burst)


async def test_a_dropped_connection_is_one_gap_and_no_value_twice(lads: OpcuaSimulator) -> None:
    """The server keeps its values (and their timestamps) across the drops: each new session's
    first notifications and polls repeat them, and the runner drops the repeats."""
    node = "lads:FunctionalUnitSet/dev:SensorUnit/lads:FunctionSet/dev:Sensor/lads:SensorValue"
    device = opcua_device(
        "lads-analog-sensor",
        endpoint=lads.endpoint,
        interval=0.1,
        points={"polled": {"node": node, "read": "poll", "unit": "C"}},
        **FAST,
    )
    async with no_leaks(), running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.samples()) == 2)
        for _ in range(2):
            sessions = runner.counts["sessions"]
            lads.drop_connections()
            await inbox.wait_for(lambda s=sessions: runner.counts["sessions"] == s + 1)
            await inbox.wait_for(lambda: runner.up is True)
        lads.set_value("sensor_value", 5.0)
        await lads.update()
        await inbox.wait_for(lambda: len(inbox.samples()) == 4)
        lads.set_value("sensor_value", None)
    assert [c.ok for c in inbox.comm()] == [False, True, False, True]
    assert [i.code for i in inbox.incidents()] == ["connection-lost", "connection-lost"]
    keys = [(s.point, s.device_t) for s in inbox.samples()]
    assert len(keys) == len(set(keys)) == 4  # first value and 5.0, subscribed and polled
    assert [s.value for s in inbox.samples("sensor_value")][-1] == 5.0
    assert runner.counts["repeats"] >= 2


async def test_an_expired_session_is_replaced(lads: OpcuaSimulator) -> None:
    device = opcua_device("lads-analog-sensor", endpoint=lads.endpoint, watchdog=0.2, **FAST)
    async with no_leaks(), running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.samples()) == 1)
        await lads.expire_sessions()  # the TCP connection stays; the session is gone
        await inbox.wait_for(lambda: runner.counts["sessions"] == 2 and runner.up is True)
        lads.set_value("sensor_value", 36.5)
        await lads.update()
        await inbox.wait_for(lambda: inbox.samples()[-1].value == 36.5)
        lads.set_value("sensor_value", None)
    assert [c.ok for c in inbox.comm()] == [False, True]
    (lost,) = inbox.incidents()
    assert "BadSession" in lost.message, lost.message
    assert len(inbox.samples()) == 2  # the first value is not stored again


async def test_a_slow_server_is_read_without_a_gap() -> None:
    driver = load_driver("thermo-rotea")
    sim = OpcuaSimulator(driver, f"opc.tcp://127.0.0.1:{free_port()}", interval=0.1, proxy=True)
    device = opcua_device(
        "thermo-rotea",
        endpoint=sim.endpoint,
        read="poll",
        interval=0.2,
        timeout=3.0,
        watchdog=3.0,
        only=["protocol_step_number"],
    )
    async with sim, no_leaks(), running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.samples()) >= 2)
        sim.set_delay(0.5)  # every answer 0.5 s late: polls run late, skip ticks, go on
        before = len(inbox.samples())
        await inbox.wait_for(lambda: len(inbox.samples()) >= before + 3, within=10)
        sim.set_delay(0)
    assert inbox.comm() == [] and runner.counts["sessions"] == 1


async def test_serve_follows_the_schedule_given() -> None:
    """The in-process API the demo uses: a step number that advances on a schedule."""
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
    task = asyncio.create_task(
        serve(
            load_driver("thermo-rotea"),
            endpoint,
            schedule={"protocol_step_number": [(0, 1), (0.4, 2), (0.8, 3)]},
            repeat=1.2,
            interval=0.1,
        )
    )
    device = opcua_device("thermo-rotea", endpoint=endpoint, only=["protocol_step_number"], **FAST)
    try:
        async with running(device) as (_, inbox):
            await inbox.wait_for(lambda: len(inbox.samples()) >= 5, within=15)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    values = [s.value for s in inbox.samples()]
    start = values.index(3.0)
    assert values[start : start + 3] == [3.0, 1.0, 2.0]  # 3, then around again


async def test_a_stop_that_meets_a_reply_cancels_the_runner_not_fails_it() -> None:
    """asyncua's wait_for2 raises a CancelledError subclass when a request is cancelled as
    its reply arrives (a stop during subscribe, seen in the suite). The runner must then end
    cancelled: Python 3.11's TaskGroup reported the subclass as an error."""
    from wait_for2.impl import CancelledWithResultError

    from pocd.transports.opcua.runner import OpcuaRunner
    from tests.opcuakit import RecordingInbox

    runner = OpcuaRunner(opcua_device("thermo-rotea", endpoint="opc.tcp://127.0.0.1:1"))

    async def stopped_as_the_reply_came() -> None:  # the race, raised as wait_for2 raises it
        raise CancelledWithResultError(b"reply", None)

    runner._sessions = stopped_as_the_reply_came  # type: ignore[method-assign]
    task = asyncio.create_task(runner.run(RecordingInbox()))
    with pytest.raises(asyncio.CancelledError) as ended:
        await task
    assert type(ended.value) is asyncio.CancelledError
