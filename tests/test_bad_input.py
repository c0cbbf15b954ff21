"""The daemon fed garbage on every transport at once, as a service process (issue 11).

One device of each transport, each fed garbage for a while, beside a healthy sim device:
- OPC UA (a real asyncua server): DateTime.MaxValue source times, NaN, Infinity, a Bad
  status and a 1 MB string;
- Modbus TCP (pymodbus): exception codes 2 and 4, and the probe's NaN start-up pattern;
- serial (a socat pty pair): random bytes, as a line at the wrong baud rate gives.
During and after it the healthy device keeps its full sample rate, every control call
answers within 2 s, the daemon's memory stays bounded and the quality codes stay few.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from asyncua import Server, ua

from pocd.model import NS, Quality
from pocd.settings import load_site
from pocd.sim.modbus import ModbusSimulator, parse_fault, unit_from_driver
from pocd.store import Store
from tests.sitekit import bearer, free_port, spawn_daemon, write_site

SECONDS = float(os.environ.get("POCD_BAD_INPUT_SECONDS", "20"))  # of garbage
HEALTHY_INTERVAL = 0.05  # the sim device: 20 samples a second
DATETIME_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # .NET DateTime.MaxValue


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def opcua_garbage(endpoint: str, stop: asyncio.Event) -> None:
    """A server whose `value` and `label` nodes take garbage in turns, every 50 ms."""
    server = Server()
    await server.init()
    server.set_endpoint(endpoint)
    ns = await server.register_namespace("urn:pocd:test:garbage")
    device = await server.nodes.objects.add_object(ns, "Garbage")
    value = await device.add_variable(ua.NodeId("value", ns), "value", 37.0)
    label = await device.add_variable(ua.NodeId("label", ns), "label", "ok")
    huge = "x" * 1_000_000
    bad = ua.StatusCode(ua.StatusCodes.BadCommunicationError)
    now = lambda: datetime.now(UTC)  # noqa: E731
    turns = itertools.cycle(
        [
            (
                value,
                lambda: ua.DataValue(
                    ua.Variant(37.0, ua.VariantType.Double), SourceTimestamp=DATETIME_MAX
                ),
            ),
            (
                value,
                lambda: ua.DataValue(
                    ua.Variant(math.nan, ua.VariantType.Double), SourceTimestamp=now()
                ),
            ),
            (
                value,
                lambda: ua.DataValue(
                    ua.Variant(math.inf, ua.VariantType.Double), SourceTimestamp=now()
                ),
            ),
            (
                value,
                lambda: ua.DataValue(
                    ua.Variant(37.0, ua.VariantType.Double), bad, SourceTimestamp=now()
                ),
            ),
            (
                label,
                lambda: ua.DataValue(
                    ua.Variant(huge + str(random.random())), SourceTimestamp=now()
                ),
            ),
            (
                value,
                lambda: ua.DataValue(
                    ua.Variant(36.9, ua.VariantType.Double),
                    SourceTimestamp=now() + timedelta(microseconds=1),
                ),
            ),
        ]
    )
    async with server:
        while not stop.is_set():
            node, make = next(turns)
            await server.write_attribute_value(node.nodeid, make())
            await asyncio.sleep(0.05)


async def serial_garbage(path: str, stop: asyncio.Event) -> None:
    """Random bytes on the line, as a balance at the wrong baud rate sends."""
    rng = random.Random(11)
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        while not stop.is_set():
            try:
                os.write(fd, bytes(rng.randrange(256) for _ in range(200)))
                os.read(fd, 4096)  # what the daemon asks is answered with more noise
            except BlockingIOError:
                pass
            await asyncio.sleep(0.05)
    finally:
        os.close(fd)


def devices(opcua: str, modbus_port: int, tty: str) -> str:
    return f"""
[[devices]]
id = "healthy"
driver = "sim"
transport = {{ interval = {HEALTHY_INTERVAL}, seed = 3 }}
points.temperature = {{ parameter = "temperature", unit = "C", base = 37.0, noise = 0.01 }}

[[devices]]
id = "rotea"
driver = "opcua"
transport = {{ endpoint = "{opcua}", publishing_interval = 0.1, sampling_interval = 0.05 }}
points.value = {{ node = "ns=2;s=value", parameter = "co2", unit = "%" }}
points.label = {{ node = "ns=2;s=label" }}

[[devices]]
id = "probe"
driver = "vaisala-gmp251"
transport = {{ host = "127.0.0.1", port = {modbus_port}, interval = 0.1, timeout = 0.3 }}

[[devices]]
id = "balance"
driver = "mettler-sics"
transport = {{ port = "{tty}", interval = 0.1, timeout = 0.2, backoff_max = 1 }}
"""


async def control(
    session: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    body: dict[str, object] | None = None,
) -> tuple[float, int]:
    began = time.monotonic()
    async with session.request(method, base + path, json=body) as resp:
        await resp.read()
        return time.monotonic() - began, resp.status


async def test_garbage_on_every_transport_stops_nothing_healthy(
    tmp_path: Path, pty_pair: tuple[str, str]
) -> None:
    stop = asyncio.Event()
    opcua = f"opc.tcp://127.0.0.1:{free_port()}/garbage"
    serving = asyncio.create_task(opcua_garbage(opcua, stop))
    probe = unit_from_driver("vaisala-gmp251")
    faults = [
        parse_fault(f) for f in ("exception,code=2,every=3", "exception,code=4,every=5", "startup")
    ]
    modbus = ModbusSimulator([probe], faults=faults)
    modbus_port = await modbus.start_tcp()
    noise = asyncio.create_task(serial_garbage(pty_pair[1], stop))
    config = write_site(tmp_path, devices(opcua, modbus_port, pty_pair[0]))
    site = load_site(config)
    await asyncio.sleep(1.0)  # the OPC UA server is up
    proc = await asyncio.to_thread(spawn_daemon, config)
    base = f"http://{site.config.api.listen}"
    timings: list[tuple[str, float, int]] = []
    rss: list[int] = []
    try:
        headers = await bearer(site.config.api.listen)
        async with aiohttp.ClientSession(headers=headers) as session:
            began = time.monotonic()
            calls = itertools.cycle(
                [
                    (
                        "POST",
                        "/api/runs",
                        {"batch_id": "B-1", "protocol": "CART-TCT"},
                    ),
                    ("GET", "/api/status", None),
                    ("POST", "/api/run/phase", {"phase": "activation"}),
                    ("GET", "/api/runs", None),
                    ("POST", "/api/run/stop", {}),
                    ("GET", "/metrics", None),
                ]
            )
            while time.monotonic() - began < SECONDS:
                method, path, body = next(calls)
                elapsed, status = await control(session, base, method, path, body)
                timings.append((path, elapsed, status))
                rss.append(rss_kib(proc.pid))
                await asyncio.sleep(0.5)
        ended = time.time_ns()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        await asyncio.gather(serving, noise, return_exceptions=True)
        await modbus.stop()

    slow = [(p, round(e, 2), s) for p, e, s in timings if e >= 2.0 or s >= 500]
    assert not slow, f"control calls slow or failing: {slow}"
    assert {s for p, _, s in timings if p.startswith("/api/run")} <= {200, 201, 409}
    settled = rss[len(rss) // 4 :]  # after start-up
    assert max(settled) - min(settled) < 60 * 1024, f"RSS grew: {rss[0]} .. {max(rss)} KiB"

    check_the_record(site.store_path, ended)
    print(
        f"bad input: {len(timings)} control calls, slowest {max(e for _, e, _ in timings):.2f} s;"
        f" RSS {min(settled) // 1024}-{max(settled) // 1024} MiB"
        f" (by quarter: {[max(q) // 1024 for q in (rss[i::4] for i in range(4))]})"
    )


def check_the_record(path: Path, ended: int) -> None:
    with Store(path, readonly=True) as store:
        healthy = [s.t for _, s in store.samples(device="healthy")]
        window = [t for t in healthy if t >= healthy[0] + 2 * NS and t <= ended - NS]
        rate = (len(window) - 1) / ((window[-1] - window[0]) / NS)
        assert rate >= 0.9 / HEALTHY_INTERVAL, f"the healthy device slowed to {rate:.1f}/s"
        print(f"bad input: the healthy device at {rate:.1f} samples/s")
        gaps = [(b - a) / NS for a, b in itertools.pairwise(window)]
        assert max(gaps) < 0.5, f"the healthy device stalled {max(gaps):.2f} s"
        codes = {i.code for i in store.incidents()}
        assert "record-rejected" not in codes, "an impossible value reached the store"
        rotea = [s for _, s in store.samples(device="rotea")]
        assert any(s.quality is Quality.BAD for s in rotea)
        assert all(s.device_t is None or s.device_t < 2**63 for s in rotea)
        assert all(math.isnan(s.value) or math.isfinite(s.value) for _, s in store.samples())
        assert [s for _, s in store.samples(device="probe")], "the probe was read"
        assert any(i.source == "balance" for i in store.incidents()), "the noise is on record"
        qualities = store._query("SELECT count(*) FROM qualities")[0][0]
        assert qualities < 100, f"{qualities} quality codes: reasons hold device text"
