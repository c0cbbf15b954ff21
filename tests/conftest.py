"""Fixtures shared by the test modules: socat pty pairs, a task-leak check, and a real influxd
(one per test module) with a fresh database per test."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.influxkit import Influxd, running_influxd


@pytest.fixture
def pty_pair() -> Iterator[tuple[str, str]]:
    """Two connected pseudo-terminals from socat: what one end writes, the other reads."""
    if shutil.which("socat") is None:
        pytest.fail("socat is missing: apt-get install -y socat")
    proc = subprocess.Popen(
        ["socat", "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    paths: list[str] = []
    while len(paths) < 2:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            pytest.fail("socat ended before making a pty pair")
        if found := re.search(r"PTY is (\S+)", line):
            paths.append(found.group(1))
    try:
        yield paths[0], paths[1]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stderr.close()


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fails a test that leaves asyncio tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    # Closed transports run their last callbacks in tasks of their own; on a loaded machine
    # that takes a few loop turns. A real leak is still there a second later.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while True:
        leaked = asyncio.all_tasks() - before - {asyncio.current_task()}
        if not leaked or loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    assert not leaked, f"tasks left running: {[t.get_name() for t in leaked]}"


@pytest.fixture(scope="module")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    with running_influxd(tmp_path_factory.mktemp("influxd")) as server:
        yield server


@pytest.fixture
def database(influxd: Influxd, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"\W", "_", request.node.name)[:60]
    influxd.create_database(name)
    return name
