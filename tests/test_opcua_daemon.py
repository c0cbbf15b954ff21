"""OPC UA devices in the real daemon: a server killed and restarted mid-run (one gap, samples
back within 10 s, no value stored twice), and a Rotea step number driving the run's phase."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocd.model import DeviationCause, ExcursionKind, now_ns
from pocd.settings import load_driver, load_site
from pocd.sim.opcua import OpcuaSimulator
from pocd.store import Store
from tests.sitekit import api, engine_of, free_port, running, until, write_site


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def simulator_process(driver: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m pocd.sim.opcua DRIVER` in its own process, waited for until it listens."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pocd.sim.opcua",
            driver,
            "--endpoint",
            f"opc.tcp://127.0.0.1:{port}",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert proc.poll() is None, "the simulator ended before it listened"
            assert time.monotonic() < deadline, "the simulator did not listen within 30 s"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_a_server_killed_and_restarted_mid_run(tmp_path: Path) -> None:
    port = free_port()
    devices = f"""
[[devices]]
id = "lads"
driver = "lads-analog-sensor"
transport = {{ endpoint = "opc.tcp://127.0.0.1:{port}", publishing_interval = 0.2 }}
points.sensor_value = {{ parameter = "temperature" }}
"""
    site = load_site(write_site(tmp_path, devices))
    key = ("lads", "sensor_value")
    with simulator_process("lads-analog-sensor", port) as first:
        async with running(site) as daemon:
            status, _ = await api(
                site,
                "POST",
                "/api/runs",
                {"batch_id": "B", "protocol": "CART-TCT"},
            )
            assert status == 201
            await until(lambda: key in daemon.latest, within=15)
            await asyncio.sleep(1.0)
            first.kill()  # SIGKILL: no goodbye to the client
            first.wait(timeout=10)
            await asyncio.sleep(1.5)
            killed_at = now_ns()
            with simulator_process("lads-analog-sensor", port):
                back = time.monotonic()
                await until(lambda: daemon.latest[key].t > killed_at, within=10)
                resumed_after = time.monotonic() - back
                await asyncio.sleep(1.0)
                await api(site, "POST", "/api/run/stop", {})
    assert resumed_after < 10, f"samples resumed {resumed_after:.1f} s after the server came back"
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        gaps = [e for e in store.excursions(run.id) if e.kind is ExcursionKind.COMM_LOSS]
        assert len(gaps) == 1 and gaps[0].end is not None  # the gap, recorded once
        lost = [i for i in store.incidents() if i.source == "lads" and i.code == "connection-lost"]
        assert len(lost) == 1
        samples = [s for _, s in store.samples(device="lads")]
        stamps = Counter((s.device, s.point, s.device_t) for s in samples if s.device_t)
        assert stamps and max(stamps.values()) == 1  # no (device, point, source time) twice
        assert any(s.t > killed_at for s in samples)


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_the_rotea_step_number_drives_the_phase(tmp_path: Path) -> None:
    sim = OpcuaSimulator(
        load_driver("thermo-rotea"), f"opc.tcp://127.0.0.1:{free_port()}", interval=0.1
    )
    sim.set_value("protocol_step_number", 1)
    devices = f"""
[[devices]]
id = "rotea"
driver = "thermo-rotea"
transport = {{ endpoint = "{sim.endpoint}", publishing_interval = 0.1 }}
"""
    extra = """
[run.phase_source]
device = "rotea"
point = "protocol_step_number"
phases = { "1" = "enrichment", "2" = "activation", "3" = "transduction", "4" = "expansion" }
"""
    site = load_site(write_site(tmp_path, devices, extra))
    async with sim, running(site) as daemon:
        await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "CART-TCT"})
        await until(lambda: ("rotea", "protocol_step_number") in daemon.latest, within=15)
        sim.set_value("protocol_step_number", 2)
        await until(
            lambda: engine_of(daemon) is not None and engine_of(daemon).phase == "activation"
        )
        sim.set_value("protocol_step_number", 4)
        await until(
            lambda: engine_of(daemon) is not None and engine_of(daemon).phase == "expansion"
        )
        await api(site, "POST", "/api/run/stop", {})
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        phases = store.phases(run.id)
        assert [(p.phase, p.actor, p.in_order) for p in phases] == [
            ("enrichment", "op", True),
            ("activation", "device:rotea", True),
            ("expansion", "device:rotea", False),
        ]
        assert [d.cause for d in store.deviations(run.id)] == [DeviationCause.PHASE_ORDER]


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_a_frozen_source_timestamp_is_stale_data_and_a_text_point_shows_its_text(
    tmp_path: Path,
) -> None:
    rotea = OpcuaSimulator(
        load_driver("thermo-rotea"), f"opc.tcp://127.0.0.1:{free_port()}", interval=0.1
    )
    rotea.set_value("protocol_name", "CAR-T Wash 3")
    lads = OpcuaSimulator(
        load_driver("lads-analog-sensor"), f"opc.tcp://127.0.0.1:{free_port()}", interval=0.1
    )
    devices = f"""
[[devices]]
id = "rotea"
driver = "thermo-rotea"
transport = {{ endpoint = "{rotea.endpoint}", publishing_interval = 0.1 }}

[[devices]]
id = "lads"
driver = "lads-analog-sensor"
transport = {{ endpoint = "{lads.endpoint}", publishing_interval = 0.1 }}
points.sensor_value = {{ parameter = "temperature", unit = "C", stale_after = 0.5 }}
"""
    site = load_site(write_site(tmp_path, devices))
    async with rotea, lads, running(site) as daemon:
        lads.set_value("sensor_value", 37.0)
        assert (
            await api(
                site,
                "POST",
                "/api/runs",
                {"batch_id": "B", "protocol": "CART-TCT"},
            )
        )[0] == 201
        await until(lambda: ("lads", "sensor_value") in daemon.latest, within=15)
        lads.freeze("sensor_value")  # the device's clock stops: its value is no longer fresh
        await until(
            lambda: bool(engine_of(daemon) and engine_of(daemon).open_excursions()), within=10
        )
        status, live = await api(site, "GET", "/api/status")
        name = next(p for p in live["points"] if p["point"] == "protocol_name")
        assert status == 200 and name["text"] == "CAR-T Wash 3"
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        kinds = {e.kind for e in store.excursions(run.id)}
        assert kinds == {ExcursionKind.STALE}, kinds
