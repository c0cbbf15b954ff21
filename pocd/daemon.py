"""The daemon: wires device runners, the engine, the store writer, the clock and the API.

Data moves one way: runners put readings into the inbox; the engine task evaluates them and
queues samples and events for the writer; the writer commits them to the store in batches.
Every task is named and lives in one TaskGroup. A failing device runner is restarted on its
own; only a fatal error (the store cannot be opened) ends the daemon. Run control (start,
phase, stop, site status) happens here, in the event loop, and returns once its records are
committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from pocd.clock import ClockWatch
from pocd.engine import Engine, EngineEvent
from pocd.errors import ConfigError, RunError, StoreError
from pocd.inbox import Inbox, Reading
from pocd.model import (
    NS,
    AuditEntry,
    CommStatus,
    Deviation,
    DeviationCause,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    Incident,
    IncidentKind,
    PhaseChange,
    Quality,
    Run,
    RunStatus,
    Sample,
    SiteStatus,
    now_ns,
)
from pocd.settings import Site, load_site
from pocd.sinks import build_sinks
from pocd.store import Record, Store
from pocd.transports import Device, DeviceRunner, get_transport

__all__ = ["Daemon", "PointStatus"]

log = structlog.get_logger("pocd.daemon")

INBOX_SIZE = 100_000  # readings waiting for the engine; runners block when it is full
# The engine takes the inbox at most this often, so that a burst of readings costs it one
# wake-up, not one per poll. Readings carry their own receive time: only the live view and the
# alerts wait, by at most this long.
ENGINE_WINDOW = 0.01


@dataclass(frozen=True, slots=True)
class PointStatus:
    """The live state of one device point, for the status API and the terminal view."""

    device: str
    point: str
    parameter: str | None
    unit: str
    value: float | None
    quality: Quality | None
    t: int | None
    limits: dict[str, float | None]
    state: str  # normal, not-monitored, no-run, no-data, or the open excursion kinds


class Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.run_record: Run | None = None
        self.inbox = Inbox(INBOX_SIZE)
        self.latest: dict[tuple[str, str], Sample] = {}
        self.incident_counts: defaultdict[str, int] = defaultdict(int)
        self.counts: Counter[str] = Counter()  # samples, excursions, deviations since start
        self.started = asyncio.Event()  # set once the store is open and the API listens
        self._pending: list[Record] = []
        self._flush_lock = asyncio.Lock()
        self._flushes: set[asyncio.Task[None]] = set()  # a task must be referenced while it runs
        self._stop = asyncio.Event()
        self._sources = site.parameter_source()
        self.sinks = build_sinks(site)
        self._phase_source = site.config.run.phase_source

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to flush, close and return from `serve`."""
        self._stop.set()

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Run until `stop()` (or SIGTERM/SIGINT). Flushes and closes the store on the way out."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        # Each sample is recorded with the parameter its point feeds under this config.
        parameters = {source: parameter for parameter, source in self._sources.items()}
        self.store = await asyncio.to_thread(Store, self.site.store_path, parameters=parameters)
        try:
            with structlog.contextvars.bound_contextvars(site=self.site.id):
                await self._serve()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self.flush()
            self.store.close()
            self.store = None
            log.info("daemon stopped")

    async def _serve(self) -> None:
        from pocd.api.http import serve_api  # the API imports this module

        self._record_load()
        self._resume()
        await self.flush()
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._engine_task(), name="engine"),
                tg.create_task(self._writer_task(), name="store-writer"),
                tg.create_task(self._clock_task(), name="clock"),
                tg.create_task(serve_api(self), name="api"),
            ]
            workers += [
                tg.create_task(self._device_task(device), name=f"device:{device.id}")
                for device in self.site.devices.values()
            ]
            workers += [tg.create_task(sink.run(), name=f"sink:{sink.name}") for sink in self.sinks]
            await asyncio.sleep(0)  # let the API bind before announcing start
            self.started.set()
            log.info(
                "daemon started", devices=len(self.site.devices), store=str(self.site.store_path)
            )
            await self._stop.wait()
            for task in workers:
                if task.get_name() != "engine":
                    task.cancel()
            await self.inbox.join()  # every reading already taken in reaches the pending batch
            workers[0].cancel()

    def reload(self) -> None:
        """SIGHUP: reload the site config and protocols. New protocols apply to runs started
        after it; device changes need a restart. An invalid config changes nothing and is an
        incident."""
        t = now_ns()
        try:
            site = load_site(self.site.path)
        except ConfigError as exc:
            log.error("config reload failed; keeping the running config", problems=str(exc))
            self._incident(IncidentKind.CONFIGURATION, "config-reload", "daemon", str(exc), t)
            return
        if site.config.devices != self.site.config.devices:
            log.warning("device changes in the config apply at the next restart")
        self.site = replace(self.site, protocols=site.protocols, config_hash=site.config_hash)
        self._record_load()
        log.info("config reloaded", protocols=len(site.protocols))

    def _record_load(self) -> None:
        t = now_ns()
        self._pending.append(
            AuditEntry(
                t,
                "system",
                "config.load",
                str(self.site.path),
                new=self.site.config_hash,
            )
        )
        for proto in self.site.protocols.values():
            self._pending.append(
                AuditEntry(
                    t,
                    "system",
                    "protocol.load",
                    f"{proto.id} {proto.version}",
                    new=proto.hash,
                    details={"file": proto.source, "status": proto.status.value},
                )
            )

    def _resume(self) -> None:
        """Take over a run that was running when the daemon last stopped (or was killed)."""
        assert self.store is not None
        run = self.store.active_run()
        if run is None:
            return
        t = now_ns()
        proto = self.site.protocols.get((run.protocol_id, run.protocol_version))
        if proto is None or proto.hash != run.protocol_hash:
            self._incident(
                IncidentKind.CONFIGURATION,
                "protocol-changed",
                "daemon",
                f"run {run.id}: protocol {run.protocol_id} {run.protocol_version} with hash "
                f"{run.protocol_hash[:12]} is no longer loaded; the run is not monitored",
                t,
            )
            self.run_record = run
            return
        phases = self.store.phases(run.id)
        last_phase = phases[-1]
        seen = self.store.last_sample_times()
        last_seen = {p: seen[src] for p, src in self._sources.items() if src in seen}
        # Excursions that were open when the daemon died end at the last data we have.
        cumulative: dict[tuple[str, str, ExcursionKind], float] = defaultdict(float)
        for exc in self.store.open_excursions(run.id):
            end = max(exc.start, last_seen.get(exc.parameter, exc.start))
            self._pending.append(ExcursionEvent(ExcursionChange.CLOSED, replace(exc, end=end)))
            cumulative[(exc.parameter, exc.phase, exc.kind)] += (end - exc.start) / NS
        for exc in self.store.excursions(run.id):
            if exc.end is not None:
                cumulative[(exc.parameter, exc.phase, exc.kind)] += (exc.end - exc.start) / NS
        spent = {
            (d.parameter, d.phase)
            for d in self.store.deviations(run.id)
            if d.cause is DeviationCause.BUDGET_SPENT and d.parameter
        }
        engine = Engine(run, proto, self._sources)
        events = engine.resume(
            last_phase.phase,
            last_phase.t,
            t,
            last_seen=last_seen,
            cumulative=cumulative,
            budget_spent=spent,
        )
        gap = (t - max(last_seen.values(), default=last_phase.t)) / NS
        self._incident(
            IncidentKind.SOFTWARE,
            "restart",
            "daemon",
            f"resumed run {run.id} (batch {run.batch_id}) in phase {last_phase.phase!r} after "
            f"a gap of {gap:.1f} s without data",
            t,
        )
        self.engine, self.run_record = engine, run
        self._emit(events)
        log.warning("run resumed", run=run.id, phase=last_phase.phase, gap_s=round(gap, 1))

    # --- tasks ---------------------------------------------------------------------------------

    async def _device_task(self, device: Device) -> None:
        """Run one device's runner; restart it after an unexpected error, never stop others."""
        backoff = 1.0
        with structlog.contextvars.bound_contextvars(device=device.id):
            while True:
                runner: DeviceRunner = get_transport(device.driver.transport).runner(device)
                try:
                    await runner.run(self.inbox)
                except Exception as exc:  # a bug in a runner must not take the daemon down
                    log.exception("device runner failed", error=str(exc))
                    await self.inbox.put(
                        Incident(
                            now_ns(),
                            IncidentKind.SOFTWARE,
                            "runner-failed",
                            device.id,
                            f"{type(exc).__name__}: {exc}",
                        )
                    )
                    await self.inbox.put(
                        CommStatus(device.id, now_ns(), ok=False, reason="runner failed")
                    )
                else:
                    return
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 60.0)

    async def _engine_task(self) -> None:
        while True:
            readings = await self.inbox.take()
            try:
                self._take(readings)
            finally:
                self.inbox.done(len(readings))
            await asyncio.sleep(ENGINE_WINDOW)

    def _take(self, readings: list[Reading]) -> None:
        """Readings in the order they came: samples to the engine and the pending batch."""
        engine = self.engine
        pending = self._pending
        latest = self.latest
        samples = 0
        for record in readings:
            if isinstance(record, Sample):
                samples += 1
                pending.append(record)
                latest[record.device, record.point] = record
                if engine is not None:
                    events = engine.on_sample(record)
                    if events:
                        self._emit(events)
                    if self._phase_source is not None:
                        self._phase_from_device(record)
            else:
                self._take_other(record)
        self.counts["samples"] += samples

    def _take_other(self, record: CommStatus | Incident) -> None:
        if isinstance(record, CommStatus):
            if record.ok:
                log.info("device answering", device=record.device)
            else:
                log.error("device lost", device=record.device, reason=record.reason)
            if self.engine is not None:
                self._emit(self.engine.on_comm(record))
        else:
            self.incident_counts[record.source] += 1
            self._pending.append(record)

    def _phase_from_device(self, sample: Sample) -> None:
        source = self._phase_source
        assert source is not None and self.engine is not None
        if (sample.device, sample.point) != (source.device, source.point):
            return
        if sample.quality is Quality.BAD:
            return
        value = sample.value
        key = str(int(value)) if value == int(value) else str(value)
        phase = source.phases.get(key)
        if phase is None or phase == self.engine.phase:
            return
        actor = f"device:{sample.device}"
        order = [p.id for p in self.engine.protocol.phases]
        current = order.index(self.engine.phase) if self.engine.phase else -1
        reason = (
            ""
            if order.index(phase) == current + 1
            else f"{sample.point} = {key} on {sample.device}"
        )
        self._phase_change(phase, actor, reason, sample.t)

    async def _writer_task(self) -> None:
        interval = self.site.config.store.flush_interval
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def flush(self) -> None:
        """Commit everything pending. On a store error the batch is kept and retried.

        Cancelling the caller does not cancel the commit: a batch taken off the pending list is
        in a thread's hands, and a cancelled thread job would lose it. The commit goes on in
        its own task, and the next flush waits for it (the lock)."""
        commit = asyncio.create_task(self._flush(), name="store-flush")
        self._flushes.add(commit)
        commit.add_done_callback(self._flushes.discard)
        await asyncio.shield(commit)

    async def _flush(self) -> None:
        async with self._flush_lock:
            batch_size = self.site.config.store.batch_size
            failures = 0
            # Only what is pending now: readings that arrive meanwhile wait for the next flush,
            # so a busy daemon commits full batches instead of one fsync per few records.
            due = len(self._pending)
            while due > 0 and self.store is not None:
                size = min(due, batch_size)
                batch, self._pending = self._pending[:size], self._pending[size:]
                try:
                    await self._write(batch)
                    due -= size
                except Exception as exc:  # disk full, I/O error: keep the data, retry
                    self._pending[:0] = batch
                    failures += 1
                    if failures == 1:
                        log.error("store write failed; retrying", error=str(exc))
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    if self._stop.is_set() and failures > 5:
                        raise
                else:
                    if failures:
                        log.info("store write recovered", attempts=failures + 1)
                    failures = 0

    async def _write(self, batch: list[Record]) -> None:
        """Commit a batch. A record the store rejects (a constraint, never an I/O error) is
        found by halving the batch and set aside as an incident, so it cannot block the rest."""
        assert self.store is not None
        try:
            await asyncio.to_thread(self.store.write, batch)
        except StoreError as exc:
            if not isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise
            if len(batch) > 1:
                half = len(batch) // 2
                await self._write(batch[:half])
                await self._write(batch[half:])
                return
            (record,) = batch
            log.error("record rejected by the store", record=repr(record), error=str(exc))
            self.incident_counts["store"] += 1
            rejected = Incident(
                now_ns(),
                IncidentKind.SOFTWARE,
                "record-rejected",
                "store",
                f"{type(record).__name__} rejected ({exc.__cause__}): {record!r}",
            )
            await asyncio.to_thread(self.store.write, [rejected])

    async def _clock_task(self) -> None:
        watch = ClockWatch()
        while True:
            wall = now_ns()
            incident = watch.check(wall, time.monotonic_ns())
            if incident is not None:
                log.warning("clock jump", message=incident.message)
                await self.inbox.put(incident)
            if self.engine is not None:
                self._emit(self.engine.tick(wall))
            await asyncio.sleep(1.0)

    # --- run control ---------------------------------------------------------------------------

    async def start_run(
        self, batch_id: str, protocol_id: str, version: str | None, operator: str
    ) -> Run:
        assert self.store is not None
        if not batch_id.strip() or not operator.strip():
            raise RunError("a run needs a batch id and an operator")
        status = self.store.site_status()
        if status is not SiteStatus.ACTIVE:
            raise RunError(
                f"site {self.site.id} is {status.value}: runs start only at an active site"
            )
        if self.engine is not None or self.run_record is not None:
            raise RunError(f"run {self.run_record.id if self.run_record else ''} is still running")
        try:
            proto = self.site.protocol(protocol_id, version)
        except KeyError:
            known = ", ".join(
                f"{p.id} {p.version} ({p.status.value})" for p in self.site.protocols.values()
            )
            raise RunError(
                f"no approved protocol {protocol_id} {version or ''} (loaded: {known})"
            ) from None
        t = now_ns()
        run = Run(
            id=uuid.uuid4().hex[:12],
            batch_id=batch_id,
            site_id=self.site.id,
            timezone=self.site.config.site.timezone,
            protocol_id=proto.id,
            protocol_version=proto.version,
            protocol_hash=proto.hash,
            operator=operator,
            started=t,
        )
        engine = Engine(run, proto, self._sources)  # refuses a draft or superseded protocol
        events = engine.enter_phase(proto.phases[0].id, t, operator)
        self.engine, self.run_record = engine, run
        self._pending.append(run)
        self._pending.append(
            AuditEntry(
                t,
                operator,
                "run.start",
                run.id,
                new=batch_id,
                details={"protocol": f"{proto.id} {proto.version}", "hash": proto.hash},
            )
        )
        self._emit(events)
        await self.flush()
        log.info("run started", run=run.id, batch=batch_id, protocol=f"{proto.id} {proto.version}")
        return run

    async def advance_phase(self, phase: str, operator: str, reason: str = "") -> PhaseChange:
        if self.engine is None:
            raise RunError("no run is active")
        change = self._phase_change(phase, operator, reason, now_ns())
        await self.flush()
        return change

    def _phase_change(self, phase: str, actor: str, reason: str, t: int) -> PhaseChange:
        assert self.engine is not None and self.run_record is not None
        previous = self.engine.phase
        events = self.engine.enter_phase(phase, t, actor, reason)
        self._pending.append(
            AuditEntry(t, actor, "run.phase", self.run_record.id, reason, old=previous, new=phase)
        )
        self._emit(events)
        log.info(
            "phase changed", run=self.run_record.id, phase=phase, previous=previous, actor=actor
        )
        change = events[0]
        assert isinstance(change, PhaseChange)
        return change

    async def stop_run(self, operator: str, *, abort: bool = False, reason: str = "") -> Run:
        if self.run_record is None:
            raise RunError("no run is active")
        if abort and not reason.strip():
            raise RunError("aborting a run needs a reason")
        t = now_ns()
        events: list[EngineEvent] = self.engine.finish(t) if self.engine else []
        status = RunStatus.ABORTED if abort else RunStatus.COMPLETED
        run = replace(self.run_record, status=status, ended=t, end_reason=reason)
        self._emit(events)
        self._pending.append(run)
        self._pending.append(
            AuditEntry(
                t,
                operator,
                "run.abort" if abort else "run.stop",
                run.id,
                reason,
                old=RunStatus.RUNNING.value,
                new=status.value,
            )
        )
        self.engine, self.run_record = None, None
        await self.flush()
        log.info("run ended", run=run.id, status=status.value)
        return run

    async def set_site_status(self, status: SiteStatus, operator: str, reason: str) -> None:
        assert self.store is not None
        if not reason.strip() or not operator.strip():
            raise RunError("a site status change needs an operator and a reason")
        await self.flush()
        old = self.store.site_status()
        if old is SiteStatus.CEASED:
            raise RunError(f"site {self.site.id} has ceased; it cannot change status")
        if old is status:
            raise RunError(f"site {self.site.id} is already {status.value}")
        self._pending.append(
            AuditEntry(
                now_ns(),
                operator,
                "site.status",
                self.site.id,
                reason,
                old=old.value,
                new=status.value,
            )
        )
        await self.flush()

    def _emit(self, events: Iterable[EngineEvent]) -> None:
        for event in events:
            if isinstance(event, Deviation):
                self.counts["deviations"] += 1
                log.warning(
                    "deviation",
                    run=event.run_id,
                    cause=event.cause.value,
                    description=event.description,
                )
            elif isinstance(event, ExcursionEvent) and event.change is ExcursionChange.OPENED:
                self.counts["excursions"] += 1
            self._pending.append(event)

    def _incident(self, kind: IncidentKind, code: str, source: str, message: str, t: int) -> None:
        self.incident_counts[source] += 1
        self._pending.append(Incident(t, kind, code, source, message))

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        run = self.run_record
        return {
            "site": {
                "id": self.site.id,
                "name": self.site.config.site.name,
                "timezone": self.site.config.site.timezone,
                "control_site": self.site.config.site.control_site,
            },
            "run": None
            if run is None
            else {
                "id": run.id,
                "batch_id": run.batch_id,
                "protocol": f"{run.protocol_id} {run.protocol_version}",
                "phase": self.engine.phase if self.engine else None,
                "started": run.started,
            },
            "points": [vars_of(p) for p in self.points()],
            "incidents": dict(self.incident_counts),
            "sinks": {sink.name: sink.status() for sink in self.sinks},
            "pending_records": self.pending_count,
        }

    @property
    def pending_count(self) -> int:
        """Records taken in and not yet committed to the store."""
        return len(self._pending)

    def points(self) -> list[PointStatus]:
        views = {v.parameter: v for v in self.engine.view()} if self.engine else {}
        out = []
        for device in self.site.devices.values():
            for name, point in device.points.items():
                sample = self.latest.get((device.id, name))
                view = views.get(point.parameter) if point.parameter else None
                limits: dict[str, float | None] = {}
                if view is None:
                    state = "no-run" if self.engine is None or point.parameter else "recorded"
                elif not view.limits.monitored:
                    state = "not-monitored"
                else:
                    lim = view.limits
                    limits = {
                        "action_low": lim.action_low,
                        "alert_low": lim.alert_low,
                        "alert_high": lim.alert_high,
                        "action_high": lim.action_high,
                    }
                    pending = ",".join(f"{k.value} pending" for k in view.pending)
                    state = ",".join(k.value for k in view.open) or pending or "normal"
                if sample is None and state in ("normal", "no-run"):
                    state = "no-data"
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
                        state=state,
                    )
                )
        return out


def vars_of(point: PointStatus) -> dict[str, Any]:
    return {
        "device": point.device,
        "point": point.point,
        "parameter": point.parameter,
        "unit": point.unit,
        "value": point.value,
        "quality": None if point.quality is None else point.quality.name.lower(),
        "t": point.t,
        "limits": point.limits,
        "state": point.state,
    }


async def run_until(daemon: Daemon, coro: Callable[[], Awaitable[None]]) -> None:
    """Serve the daemon while `coro` runs (used by the demo); stop it when `coro` returns."""
    server = asyncio.create_task(daemon.serve(handle_signals=False), name="daemon")
    started = asyncio.create_task(daemon.started.wait())
    done, _ = await asyncio.wait({server, started}, return_when=asyncio.FIRST_COMPLETED)
    if server in done:
        started.cancel()
        await server  # raises what stopped it
        return
    try:
        await coro()
    finally:
        daemon.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await server
