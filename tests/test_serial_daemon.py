"""A serial instrument unplugged and plugged back while the real daemon runs a run."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from pocd.model import ExcursionKind, Quality
from pocd.settings import load_driver, load_site
from pocd.sim.serial import PtyPair, serve
from pocd.store import Store
from tests.sitekit import api, running, until, write_site


async def test_unplugged_incubator_is_comm_loss_then_resumes(tmp_path: Path) -> None:
    link = str(tmp_path / "heracell")
    devices = f"""
[[devices]]
id = "heracell"
driver = "thermo-heracell"
transport = {{ port = "{link}", interval = 0.2, timeout = 0.5 }}
points.temperature = {{ parameter = "temperature" }}
"""
    site = load_site(write_site(tmp_path, devices))
    async with PtyPair(link) as pair:
        sim = asyncio.create_task(serve(load_driver("thermo-heracell"), pair))
        try:
            async with running(site) as daemon:
                await api(
                    site,
                    "POST",
                    "/api/runs",
                    {"batch_id": "B", "protocol": "CART-TCT"},
                )
                await until(lambda: daemon.counts["samples"] >= 3)
                await pair.unplug()
                await asyncio.sleep(2.0)
                before = daemon.counts["samples"]
                await pair.plug()
                await until(lambda: daemon.counts["samples"] >= before + 3)
                status, live = await api(site, "GET", "/api/status")
                assert status == 200
                point = next(p for p in live["points"] if p["parameter"] == "temperature")
                assert point["quality"] == "good"
                await api(site, "POST", "/api/run/stop", {})
        finally:
            sim.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sim
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        losses = [e for e in store.excursions(run.id) if e.kind is ExcursionKind.COMM_LOSS]
        assert [e.parameter for e in losses] == ["temperature"]
        assert losses[0].end is not None
        assert losses[0].duration_s is not None and losses[0].duration_s >= 1.0
        samples = [s for _, s in store.samples(device="heracell")]
        assert samples[-1].quality is Quality.GOOD
        assert samples[-1].t > losses[0].end
