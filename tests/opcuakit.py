"""Helpers for the OPC UA tests: a recording inbox, devices built from driver files, a runner
as a context manager, and certificate pairs made with `pocd certs create`'s function."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocd.model import CommStatus, Incident, Sample
from pocd.settings import load_driver
from pocd.transports import Device
from pocd.transports.opcua import OpcuaPoint, OpcuaRunner, OpcuaSettings, create_certificate

Record = Sample | CommStatus | Incident


class RecordingInbox:
    """What a runner puts, in order, with a way to wait for a condition on it."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    async def put(self, record: Record, /) -> None:
        self.records.append(record)

    def put_nowait(self, record: Record, /) -> None:
        self.records.append(record)

    def samples(self, point: str | None = None) -> list[Sample]:
        return [
            r for r in self.records if isinstance(r, Sample) and (point is None or r.point == point)
        ]

    def comm(self) -> list[CommStatus]:
        return [r for r in self.records if isinstance(r, CommStatus)]

    def incidents(self, code: str | None = None) -> list[Incident]:
        return [
            r for r in self.records if isinstance(r, Incident) and (code is None or r.code == code)
        ]

    async def wait_for(self, check: Callable[[], bool], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                tail = "\n".join(repr(r) for r in self.records[-15:])
                raise AssertionError(f"condition not reached in {within} s; last records:\n{tail}")
            await asyncio.sleep(0.02)


def opcua_device(
    driver: str,
    *,
    device_id: str = "dev",
    points: Mapping[str, Mapping[str, Any]] | None = None,
    only: list[str] | None = None,
    **transport: Any,
) -> Device:
    """A device as the site loader would resolve it: driver defaults and points, overridden."""
    spec = load_driver(driver)
    settings = OpcuaSettings.model_validate({**spec.defaults, **transport})
    extra = points or {}
    names = [*spec.points, *(n for n in extra if n not in spec.points)]
    if only is not None:
        names = [n for n in names if n in only or n in extra]
    resolved = {
        name: OpcuaPoint.model_validate({**spec.points.get(name, {}), **extra.get(name, {})})
        for name in names
    }
    return Device(id=device_id, driver=spec.info, settings=settings, points=resolved)


@contextlib.asynccontextmanager
async def running(device: Device) -> AsyncIterator[tuple[OpcuaRunner, RecordingInbox]]:
    """The runner reading `device` in a task, cancelled (and awaited) on exit."""
    runner = OpcuaRunner(device)
    inbox = RecordingInbox()
    task = asyncio.create_task(runner.run(inbox), name=f"runner:{device.id}")
    try:
        yield runner, inbox
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class Certs:
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a server certificate nobody trusts
    trust_dir: Path  # holds the server's certificate
    stranger_dir: Path  # holds only the stranger's


def make_certs(folder: Path) -> Certs:
    hosts = ["localhost", "127.0.0.1"]
    server_cert, server_key = folder / "server.der", folder / "server.pem"
    create_certificate(
        server_cert,
        server_key,
        application_uri="urn:pocd:test:server",
        hostnames=hosts,
        server=True,
    )
    client_cert, client_key = folder / "client.der", folder / "client-key.pem"
    create_certificate(client_cert, client_key, application_uri="urn:pocd:test:client")
    stranger_cert = folder / "stranger.pem"
    create_certificate(
        stranger_cert,
        folder / "stranger-key.pem",
        application_uri="urn:pocd:test:stranger",
        hostnames=hosts,
        server=True,
    )
    trust_dir, stranger_dir = folder / "trusted", folder / "strangers"
    trust_dir.mkdir()
    stranger_dir.mkdir()
    (trust_dir / "server.der").write_bytes(server_cert.read_bytes())
    (stranger_dir / "stranger.pem").write_bytes(stranger_cert.read_bytes())
    return Certs(
        server_cert, server_key, client_cert, client_key, stranger_cert, trust_dir, stranger_dir
    )
