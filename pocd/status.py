"""The live view of the site: its lines and runs, each point's value and limit state, the
incidents counted, the store writer and the sinks, as JSON-ready data for the API and the
terminal view.

Reads only what the other parts hold in memory; it changes nothing and does no I/O.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from pocd.alarms import view_json
from pocd.model import Quality, Sample, now_ns
from pocd.runs import Lines, LineState
from pocd.settings import Site
from pocd.sinks import Sink
from pocd.store.writer import StoreWriter
from pocd.transports import READ_BUCKETS, DeviceRunner, ReadStats

# GET /health answers 503 when the store writer has had records waiting this long without a
# commit, or a sink's oldest record not delivered is this old.
WRITER_STALE_S: Final = 30.0
SINK_BEHIND_S: Final = 600.0

__all__ = ["LiveStatus", "PointStatus"]


@dataclass(frozen=True, slots=True)
class PointStatus:
    """The live state of one device point on one line (a point in several lines has one per
    line, each with that line's limits; a point in none has one with `line` None)."""

    device: str
    point: str
    parameter: str | None
    unit: str
    value: float | None
    quality: Quality | None
    t: int | None
    limits: dict[str, float | None]
    state: str  # normal, not-monitored, no-run, no-data, recorded, or the open excursion kinds
    text: str | None = None  # the latest text of a text point (an OPC UA String), where set
    line: str | None = None

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["quality"] = None if self.quality is None else self.quality.name.lower()
        return found


class LiveStatus:
    """The status of a running daemon, from its parts."""

    def __init__(
        self,
        site: Site,
        lines: Lines,
        writer: StoreWriter,
        *,
        latest: Mapping[tuple[str, str], Sample],
        runners: Mapping[str, DeviceRunner],
        sinks: Sequence[Sink],
        incidents: Mapping[str, int],
        samples: Callable[[], int],
        device_samples: Mapping[str, int] = {},
        clock_synced: Callable[[], bool | None] = lambda: None,
        inbox_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        self.site = site
        self.lines = lines
        self.writer = writer
        self._latest = latest
        self._runners = runners
        self._sinks = sinks
        self._incidents = incidents
        self._samples = samples
        self._device_samples = device_samples
        self._clock_synced = clock_synced
        self._inbox_depth = inbox_depth

    def alarms(self) -> dict[str, Any]:
        """Every alarm condition in its current state, and each line's alarm KPIs."""
        t = now_ns()
        rules = self.site.config.alarms
        kpis = self.lines.alarms.kpis(
            t, standing_s=rules.standing_after, unacked_s=rules.unacknowledged_after
        )
        return {
            "alarms": [view_json(v) for v in self.lines.alarms.view()],
            "kpis": {
                line: {
                    "per_10_min": k.per_10_min,
                    "flood": k.flood,
                    "chattering": ["/".join(c) for c in k.chattering],
                    "standing": ["/".join(c) for c in k.standing],
                    "unacknowledged": ["/".join(c) for c in k.unacknowledged],
                    "shelved": k.shelved,
                    "out_of_service": k.out_of_service,
                    "suppressed": k.suppressed,
                }
                for line, k in kpis.items()
            },
        }

    def status(self) -> dict[str, Any]:
        lines = [self._line(state) for state in self.lines.states.values()]
        writer = self.writer
        return {
            "site": {
                "id": self.site.id,
                "name": self.site.config.site.name,
                "timezone": self.site.config.site.timezone,
                "control_site": self.site.config.site.control_site,
                "status": self.lines.site_status.value,
            },
            # the run of a site with one line, as before lines (None with several: see lines)
            "run": lines[0]["run"] if len(lines) == 1 else None,
            "lines": lines,
            "points": [p.as_json() for p in self.points()],
            "incidents": dict(self._incidents),
            "counts": {  # since the daemon started
                "samples": self._samples(),
                "excursions": self.lines.counts["excursions"],
                "deviations": self.lines.counts["deviations"],
            },
            "engine_errors": self.lines.counts["engine_errors"],
            "devices": {device: self._device(device) for device in self.site.devices},
            "sinks": {sink.name: sink.status() for sink in self._sinks},
            "clock": {"synchronised": self._clock_synced()},
            "alarms_active": sum(view.active for view in self.lines.alarms.view()),
            "flood": {line: k.flood for line, k in self.lines.alarms.kpis(now_ns()).items()},
            "inbox": self._inbox_depth(),
            "store": {
                "bytes": _store_bytes(self.site.store_path),
                "pending": len(writer),
                "keeping_up": writer.room.is_set(),
                "failing": writer.failing,
                "last_commit": writer.last_commit,
                "quarantined": writer.quarantined,
            },
        }

    def _device(self, device: str) -> dict[str, Any]:
        """A device's samples since the start; its runner's reads (since it started), and
        their times as a cumulative histogram: reads that took at most `le` s."""
        runner = self._runners.get(device)
        stats = runner.stats if runner is not None else ReadStats()
        cumulative = list(itertools.accumulate(stats.buckets))
        return {
            "samples": self._device_samples.get(device, 0),
            "reads": cumulative[-1],
            "read_errors": stats.errors,
            "read_seconds": stats.seconds,
            "read_buckets": {
                **{f"{le:g}": n for le, n in zip(READ_BUCKETS, cumulative, strict=False)},
                "+Inf": cumulative[-1],
            },
        }

    def health(self) -> list[str]:
        now = time.monotonic()
        writer = self.writer
        problems = []
        quiet = now - writer.beat
        if quiet > WRITER_STALE_S and not writer.idle:
            problems.append(f"the store writer has committed nothing for {quiet:.0f} s")
        for sink in self._sinks:
            behind = float(sink.status().get("oldest_unsent_age_s", 0.0))
            if behind > SINK_BEHIND_S:
                problems.append(f"sink {sink.name} is {behind:.0f} s behind")
        return problems

    def line_status(self) -> list[dict[str, Any]]:
        return [self._line(state) for state in self.lines.states.values()]

    @staticmethod
    def _line(state: LineState) -> dict[str, Any]:
        run, engine, line = state.run, state.engine, state.line
        standby = None
        if run is None and engine is not None:
            standby = {"protocol": f"{engine.protocol.id} {engine.protocol.version}"}
        return {
            "id": line.id,
            "title": line.title,
            "devices": line.devices,
            "state": "run" if run is not None else "standby",
            "run": None
            if run is None
            else {
                "id": run.id,
                "batch_id": run.batch_id,
                "protocol": f"{run.protocol_id} {run.protocol_version}",
                "phase": engine.phase if engine else None,
                "monitored": engine is not None,
                "started": run.started,
            },
            "standby": standby,
        }

    def points(self) -> list[PointStatus]:
        states = list(self.lines.states.values())
        views = {state.line.id: state.view() for state in states}
        out = []
        for device in self.site.devices.values():
            texts: dict[str, str] = getattr(self._runners.get(device.id), "texts", {})
            for name, point in device.points.items():
                sample = self._latest.get((device.id, name))
                on: list[LineState | None] = [
                    s for s in states if (device.id, name) in s.line.points
                ]
                for state in on or [None]:
                    view = None
                    if state is not None and point.parameter:
                        view = views[state.line.id].get(point.parameter)
                    running = state is not None and state.run is not None
                    limits: dict[str, float | None] = {}
                    if view is None:
                        state_text = "recorded" if running and not point.parameter else "no-run"
                    elif not view.limits.monitored:
                        state_text = "not-monitored"
                    else:
                        lim = view.limits
                        limits = {
                            "action_low": lim.action_low,
                            "alert_low": lim.alert_low,
                            "alert_high": lim.alert_high,
                            "action_high": lim.action_high,
                        }
                        pending = ",".join(f"{k.value} pending" for k in view.pending)
                        state_text = ",".join(k.value for k in view.open) or pending or "normal"
                        if not any(value is not None for value in limits.values()):
                            limits = {}  # the equipment watch: no limits to show
                            if not running and state_text == "normal":
                                state_text = "no-run"
                    if sample is None and state_text in ("normal", "no-run"):
                        state_text = "no-data"
                    out.append(
                        PointStatus(
                            device=device.id,
                            point=name,
                            parameter=point.parameter,
                            unit=point.unit,
                            value=None
                            if sample is None or sample.quality is Quality.BAD
                            else sample.value,
                            quality=None if sample is None else sample.quality,
                            t=None if sample is None else sample.t,
                            limits=limits,
                            state=state_text,
                            text=texts.get(name),
                            line=None if state is None else state.line.id,
                        )
                    )
        return out


def _store_bytes(path: Path) -> int:
    """The store's size on disk: the file and its write-ahead log."""
    total = 0
    for part in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(OSError):
            total += part.stat().st_size
    return total
