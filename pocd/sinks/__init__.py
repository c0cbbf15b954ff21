"""Forwarders: they read the store by cursor and deliver to a far side (InfluxDB, later MQTT,
webhooks, email). The store is the system of record; a sink advances its cursor only after the
far side confirmed, so nothing the store accepted can be lost downstream.

Contract of a sink (`Sink.run`): forward until cancelled; own retries with backoff; never raise
for a far-side fault (a dead database is a state, reported by `status()` and as incidents).
This module holds the contract and `build_sinks`; each sink lives in its own module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pocd.errors import PocdError

if TYPE_CHECKING:
    from pocd.settings import Site

__all__ = ["Sink", "SinkError", "build_sinks"]


class SinkError(PocdError):
    """A sink cannot reach or use its far side, or a secret it needs. The message says why
    and never holds a secret."""


class Sink(Protocol):
    name: str

    async def run(self) -> None:
        """Forward from the store until cancelled. See the module docstring for the contract."""
        ...

    async def healthcheck(self) -> str:
        """Exercise the far side once (at start-up, and from `pocd check --connect`): what
        answered, or SinkError saying why it did not."""
        ...

    def status(self) -> dict[str, Any]:
        """Backlog, age of the oldest unsent record, last error: for status and metrics."""
        ...


def build_sinks(site: Site) -> list[Sink]:
    """The enabled sinks configured in `[sinks]`."""
    from pocd.sinks.influxdb import InfluxSink  # imports an HTTP client: only when configured

    return [
        InfluxSink(site, settings) for settings in site.config.sinks.influxdb if settings.enabled
    ]
