"""Helpers to write a site to a temporary folder and run the real daemon on it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from pocd.daemon import Daemon
from pocd.engine import Engine
from pocd.model import Run
from pocd.settings import Site, load_site

ROOT = Path(__file__).resolve().parent.parent

FAST_DEVICES = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 0.05, seed = 1 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0, noise = 0.01 }
points.co2 = { parameter = "co2", unit = "%", base = 5.0 }

[[devices]]
id = "bioreactor"
driver = "sim"
transport = { interval = 0.05, seed = 2 }
points.ph = { parameter = "ph", unit = "pH", base = 7.1 }
points.do = { parameter = "do", unit = "%-sat", base = 60.0 }
points.rocking = { parameter = "rocking", unit = "rocks/min", base = 12.0 }
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_site(folder: Path, devices: str = FAST_DEVICES, extra: str = "") -> Path:
    """A site config in `folder` with the example protocols; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "config" / "protocols", folder / "protocols", dirs_exist_ok=True)
    config = folder / "pocd.toml"
    config.write_text(
        f"""
[site]
id = "test-site"
name = "Test site"
timezone = "Europe/London"
control_site = "test-cs"

[store]
data_dir = "data"
flush_interval = "50ms"

[api]
listen = "127.0.0.1:{free_port()}"
{extra}
{devices}
"""
    )
    return config


@contextlib.asynccontextmanager
async def running(site: Site) -> AsyncIterator[Daemon]:
    """The daemon serving `site` in this event loop, stopped (flushed, closed) on exit."""
    daemon = Daemon(site)
    task = asyncio.create_task(daemon.serve(handle_signals=False))
    started = asyncio.create_task(daemon.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        await task
    assert started in done, "daemon did not start"
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)


def engine_of(daemon: Daemon) -> Engine | None:
    """The engine of the run on the site's only line; None between runs (or unmonitored)."""
    (state,) = daemon.lines.states.values()
    return state.engine if state.run is not None else None


def run_of(daemon: Daemon) -> Run | None:
    """The run on the site's only line, if one is going on."""
    (state,) = daemon.lines.states.values()
    return state.run


async def api(site: Site, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = f"http://{site.config.api.listen}{path}"
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as resp:
        data = await resp.json()
        return resp.status, data


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def spawn_daemon(config: Path) -> subprocess.Popen[bytes]:
    """`pocd serve` in its own process, waited for until its API answers. Its log goes to
    `pocd.log` beside the config: a pipe nobody reads would fill and stop the daemon."""
    log = config.parent / "pocd.log"
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocd", "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    listen = load_site(config).config.api.listen
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{listen}/api/status", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"daemon did not start: {log.read_text()}") from None
            time.sleep(0.1)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pocd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
