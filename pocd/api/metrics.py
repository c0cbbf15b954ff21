"""Prometheus metrics for the control API's GET /metrics, built from the live status at
scrape time (a custom collector: nothing is counted twice, nothing is kept here)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["render_metrics"]


class _StatusCollector(Collector):
    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        site = status["site"]["id"]
        counts = CounterMetricFamily(
            "pocd_records", "Records taken in since the daemon started", labels=["site", "kind"]
        )
        for kind in ("samples", "excursions", "deviations"):
            counts.add_metric([site, kind], status["counts"][kind])
        yield counts
        yield from _devices(status["devices"])
        incidents = CounterMetricFamily(
            "pocd_incidents", "Incidents since the daemon started", labels=["site", "source"]
        )
        for source, n in status["incidents"].items():
            incidents.add_metric([site, source], n)
        yield incidents
        store = status["store"]
        size = GaugeMetricFamily("pocd_store_bytes", "The store's file and its WAL on disk")
        size.add_metric([], float(store["bytes"]))
        yield size
        if store["last_commit"] is not None:
            commit = GaugeMetricFamily(
                "pocd_store_last_commit_timestamp_seconds", "When the store last committed"
            )
            commit.add_metric([], store["last_commit"] / 1e9)
            yield commit
        inbox = GaugeMetricFamily("pocd_inbox_depth", "Readings waiting for the engine")
        inbox.add_metric([], float(status["inbox"]))
        yield inbox
        flood = GaugeMetricFamily(
            "pocd_alarm_flood", "1 while a line's alarm rate is a flood (ISA-18.2)", labels=["line"]
        )
        for line, flooding in status["flood"].items():
            flood.add_metric([line], 1.0 if flooding else 0.0)
        yield flood
        active = GaugeMetricFamily("pocd_alarms_active", "Alarm conditions that hold now")
        active.add_metric([], float(status["alarms_active"]))
        yield active
        if status["clock"]["synchronised"] is not None:
            synced = GaugeMetricFamily(
                "pocd_clock_synchronised", "1 while the kernel counts the clock as synchronised"
            )
            synced.add_metric([], 1.0 if status["clock"]["synchronised"] else 0.0)
            yield synced
        pending = GaugeMetricFamily("pocd_store_pending", "Records waiting to be committed")
        pending.add_metric([], status["store"]["pending"])
        yield pending
        keeping_up = GaugeMetricFamily(
            "pocd_store_keeping_up",
            "1 while the store commits what comes in; 0 once its backlog reached the high-water "
            "mark and readings are held back in the devices' queues",
        )
        keeping_up.add_metric([], 1.0 if status["store"]["keeping_up"] else 0.0)
        yield keeping_up
        yield from _sinks(status["sinks"])


# Each sink's gauges: name, help, and the key of the sink's status it shows (0 if absent).
_SINK_GAUGES = (
    ("pocd_sink_backlog", "Records not yet confirmed by a sink", "backlog"),
    (
        "pocd_sink_oldest_unsent_age_seconds",
        "Age of the oldest record a sink has not delivered",
        "oldest_unsent_age_s",
    ),
    (
        "pocd_sink_quarantined",
        "Points a sink set aside because the far side refused them alone, not sent again "
        "(pocd sink resend)",
        "quarantined",
    ),
    ("pocd_sink_failures", "Consecutive failed writes of a sink (0 while it delivers)", "failures"),
)


def _sinks(sinks: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for name, help_text, key in _SINK_GAUGES:
        gauge = GaugeMetricFamily(name, help_text, labels=["sink"])
        for sink, status in sinks.items():
            gauge.add_metric([sink], float(status.get(key, 0)))
        yield gauge
    sent = CounterMetricFamily(
        "pocd_sink_sent", "Records a sink delivered since the daemon started", labels=["sink"]
    )
    delivered = GaugeMetricFamily(
        "pocd_sink_last_delivery_timestamp_seconds",
        "When a sink last delivered (absent until it has)",
        labels=["sink"],
    )
    for sink, status in sinks.items():
        if "sent" in status:
            sent.add_metric([sink], float(status["sent"]))
        if status.get("last_ok") is not None:
            delivered.add_metric([sink], status["last_ok"] / 1e9)
    yield sent
    yield delivered


def _devices(devices: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    samples = CounterMetricFamily(
        "pocd_device_samples",
        "Samples taken in from a device since the daemon started",
        labels=["device"],
    )
    errors = CounterMetricFamily(
        "pocd_device_read_errors",
        "Reads of a device that failed since its runner started: polls it did not answer, "
        "silences of a streaming device, OPC UA sessions lost or not opened",
        labels=["device"],
    )
    seconds = HistogramMetricFamily(
        "pocd_device_read_seconds",
        "How long each poll of a device took since its runner started, waits for a shared "
        "bus or a full inbox included (OPC UA: its polled reads that answered)",
        labels=["device"],
    )
    for device, d in devices.items():
        samples.add_metric([device], d["samples"])
        errors.add_metric([device], d["read_errors"])
        seconds.add_metric([device], list(d["read_buckets"].items()), d["read_seconds"])
    yield samples
    yield errors
    yield seconds


def render_metrics(status: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of a live status (`StatusView.status()`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)
