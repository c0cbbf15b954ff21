"""Forwarders: they read the store by cursor and deliver to a far side (InfluxDB, later MQTT,
webhooks, email). The store is the system of record; a sink advances its cursor only after the
far side confirmed, so nothing the store accepted can be lost downstream.

Contract of a sink (`Sink.run`): forward until cancelled; own retries with backoff; never raise
for a far-side fault (a dead database is a state, reported by `status()` and as incidents).
This module holds the contract, the registry of sink kinds and `build_sinks`. Each kind lives
in its own module that exposes `SINK`, a `SinkKind` named like its config section under
`[sinks]`; modules are imported only when a config uses them. Kinds that forward by cursor
build on pocd.sinks.forward, which owns lanes, retries, quarantine and cursors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pocd.errors import PocdError

if TYPE_CHECKING:
    from pocd.settings import Site
    from pocd.store.writer import Commits

__all__ = [
    "SINKS",
    "Sink",
    "SinkError",
    "SinkKind",
    "SinkSettings",
    "build_sinks",
    "get_sink_kind",
]


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

    def follow(self, commits: Commits) -> None:
        """Wait on the daemon's store writer for new records instead of polling the store."""
        ...


class SinkSettings(Protocol):
    """What every sink's settings have, whatever its kind."""

    @property
    def name(self) -> str: ...  # the sink's name: task, cursors, status

    @property
    def enabled(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class SinkKind:
    name: str  # its config section: [sinks.<name>] / [[sinks.<name>]]
    # The sink of one entry of that section (its settings as validated at load). Opens
    # nothing: the sink connects when it runs.
    build: Callable[[Site, SinkSettings], Sink]


SINKS: Mapping[str, str] = {
    "influxdb": "pocd.sinks.influxdb",
    "email": "pocd.sinks.notify.email",
    "webhook": "pocd.sinks.notify.webhook",
    "mqtt": "pocd.sinks.notify.mqtt",
}


def get_sink_kind(name: str) -> SinkKind:
    """The sink kind of that config section. Raises KeyError for an unknown one."""
    kind: SinkKind = importlib.import_module(SINKS[name]).SINK
    return kind


def witness_channels(site: Site) -> list[str]:
    """The enabled MQTT channels that publish the chain's checkpoints (`witness`)."""
    return [m.name for m in site.config.sinks.mqtt if m.enabled and m.witness]


def build_sinks(site: Site) -> list[Sink]:
    """The enabled sinks configured in `[sinks]`, in the order of the sections' kinds, and the
    notifier (pocd.sinks.notify.sink) when `[notify]` has routes. A section's module is
    imported only when it has an entry (it may import an HTTP client)."""
    sinks: list[Sink] = []
    for section in type(site.config.sinks).model_fields:
        entries: list[SinkSettings] = getattr(site.config.sinks, section)
        enabled = [settings for settings in entries if settings.enabled]
        if enabled:
            kind = get_sink_kind(section)
            sinks += [kind.build(site, settings) for settings in enabled]
    if site.config.notify.routes or witness_channels(site):
        from pocd.sinks.notify.sink import Notifier

        sinks.append(Notifier(site))
    return sinks
