"""Forwarders: they read the store by cursor and deliver to a far side (InfluxDB, later MQTT,
webhooks, email). The store is the system of record; a sink advances its cursor only after the
far side confirmed, so nothing the store accepted can be lost downstream.

Contract of a sink (`Sink.run`): forward until cancelled; own retries with backoff; never raise
for a far-side fault (a dead database is a state, reported by `status()` and as incidents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pocd.settings import Site

__all__ = ["Sink", "build_sinks"]


class Sink(Protocol):
    name: str

    async def run(self) -> None:
        """Forward from the store until cancelled. See the module docstring for the contract."""
        ...

    def status(self) -> dict[str, Any]:
        """Backlog, age of the oldest unsent record, last error: for status and metrics."""
        ...


def build_sinks(site: Site) -> list[Sink]:
    """The sinks configured in `[sinks]`."""
    return []
