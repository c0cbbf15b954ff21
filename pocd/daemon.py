"""The daemon: wires device runners, the engine, the store writer, the clock and the API.

Data moves one way: runners put readings into the inbox; the engine task evaluates them and
queues samples and events in the store writer (pocd.writer), which commits them in batches.
Every task is named and lives in one TaskGroup. A failing device runner is restarted on its
own, and an error of the engine on one reading is an incident: the reading is stored all the
same and the next one is judged. Only a store that cannot be opened ends the daemon (and an
API that cannot listen, at start). Run control (start, phase, stop, site status) happens here,
in the event loop, one operation at a time, and returns once its records are committed, or
says that they are not yet (CommitTimeout) after a bounded wait.

At some 800 lines this still holds run control, resume and the status view beside the
wiring: the Lines issue (several runs at once) splits them into parts of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

import structlog

from pocd.clock import ClockWatch, steady_ns
from pocd.engine import Engine, EngineEvent
from pocd.errors import CommitTimeout, ConfigError, RunError
from pocd.inbox import Inbox, Reading
from pocd.model import (
    NS,
    AuditEntry,
    CommStatus,
    Deviation,
    DeviationCause,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    Incident,
    IncidentKind,
    PhaseChange,
    ProtocolText,
    Quality,
    Run,
    RunStatus,
    Sample,
    SiteStatus,
    now_ns,
)
from pocd.protocol import Protocol
from pocd.settings import Site, load_site, protocol_from_text
from pocd.sinks import build_sinks
from pocd.store import Record, Store
from pocd.transports import Device, DeviceRunner, get_transport
from pocd.writer import StoreWriter

__all__ = ["Daemon", "PointStatus"]

log = structlog.get_logger("pocd.daemon")

INBOX_SIZE = 100_000  # readings waiting for the engine; runners block when it is full
# The engine takes the inbox at most this often, so that a burst of readings costs it one
# wake-up, not one per poll. Readings carry their own receive time: only the live view and the
# alerts wait, by at most this long.
ENGINE_WINDOW = 0.01
# Records waiting for the store beyond which the engine takes no more readings (the runners
# then wait on the inbox): a few seconds of the fastest site, a few hundred MB at most.
HIGH_WATER: Final = 500_000
# How long an operation waits for its records to be committed before it says they are not.
COMMIT_WAIT_S: Final = 5.0
_DISTINCT_FAULTS: Final = 100  # engine errors told apart (and each an incident), then counted


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
    text: str | None = None  # the latest text of a text point (an OPC UA String), where set


class Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.run_record: Run | None = None
        self.site_status = SiteStatus.ACTIVE  # read from the store at start
        self.inbox = Inbox(INBOX_SIZE)
        self.latest: dict[tuple[str, str], Sample] = {}
        self.runners: dict[str, DeviceRunner] = {}
        self.down: set[str] = set()  # devices whose transport says they do not answer
        self.incident_counts: defaultdict[str, int] = defaultdict(int)
        self.counts: Counter[str] = Counter()  # samples, excursions, deviations since start
        self.started = asyncio.Event()  # set once the store is open and the API listens
        self.writer = StoreWriter(
            batch_size=site.config.store.batch_size,
            high_water=HIGH_WATER,
            on_incident=self._count_incident,
        )
        self._control = asyncio.Lock()  # one run or site operation at a time
        self._stop = asyncio.Event()
        self._clock = ClockWatch()
        self._sources = site.parameter_source()
        self.sinks = build_sinks(site)
        self._phase_source = site.config.run.phase_source
        self._phase_value: str | None = None  # the last phase-source value not acted on
        self._faults: Counter[str] = Counter()  # engine errors by kind

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
        self.writer.store = self.store
        try:
            with structlog.contextvars.bound_contextvars(site=self.site.id):
                self.site_status = await asyncio.to_thread(self.store.site_status)
                await self._serve()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.writer.stopping = True
            await self.flush()
            self.writer.store = None
            self.store.close()
            self.store = None
            log.info("daemon stopped")

    async def _serve(self) -> None:
        from pocd.api.http import serve_api  # the API imports this module

        self._record_load(self.site, "config.load")
        await self._resume()
        try:
            await self.flush(within=COMMIT_WAIT_S)
        except CommitTimeout as exc:  # the devices start all the same; the records wait
            log.error("the store has not committed the start records yet", error=str(exc))
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._engine_task(), name="engine"),
                tg.create_task(
                    self.writer.run(self.site.config.store.flush_interval), name="store-writer"
                ),
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
            self.writer.room.set()  # what the runners put before they stopped is taken in
            await self.inbox.join()  # every reading already taken in reaches the writer
            workers[0].cancel()

    def reload(self) -> None:
        """SIGHUP: reload the protocols. They apply to runs started after it (a running run
        keeps its own); the other settings apply at the next restart, and the audit entry says
        which those are. An invalid config changes nothing and is an incident."""
        t = now_ns()
        try:
            site = load_site(self.site.path)
        except ConfigError as exc:
            log.error("config reload failed; keeping the running config", problems=str(exc))
            self._incident(IncidentKind.CONFIGURATION, "config-reload", "daemon", str(exc), t)
            return
        running = self.site.config.model_dump()
        waiting = sorted(
            key
            for key, value in site.config.model_dump().items()
            if key != "protocols" and value != running[key]
        )
        if waiting:
            log.warning("config changes that apply at the next restart", sections=waiting)
        # The running config stays what it was, with the new protocols: that is what is audited.
        self.site = replace(self.site, protocols=site.protocols)
        self._record_load(site, "config.reload", not_applied=waiting)
        log.info("config reloaded", protocols=len(site.protocols))

    def _record_load(self, loaded: Site, action: str, *, not_applied: Iterable[str] = ()) -> None:
        """Audit what is applied: the config, the drivers in use and the protocols, each with
        its hash; keep each protocol's text by its hash."""
        t = now_ns()
        details = {"applied": "protocols" if action == "config.reload" else "all"}
        if not_applied:
            details["not applied until restart"] = ", ".join(not_applied)
        add = self.writer.add
        add(
            AuditEntry(
                t,
                "system",
                action,
                str(loaded.path),
                old=None if action == "config.load" else self.site.config_hash,
                new=loaded.config_hash,
                details=details,
            )
        )
        if action == "config.load":
            drivers = {device.driver.id: device.driver for device in self.site.devices.values()}
            for driver in drivers.values():
                add(
                    AuditEntry(
                        t,
                        "system",
                        "driver.load",
                        driver.id,
                        new=driver.hash,
                        details={"file": driver.source, "transport": driver.transport},
                    )
                )
        for proto in self.site.protocols.values():
            add(ProtocolText(proto.hash, proto.id, proto.version, proto.text))
            add(
                AuditEntry(
                    t,
                    "system",
                    "protocol.load",
                    f"{proto.id} {proto.version}",
                    new=proto.hash,
                    details={"file": proto.source, "status": proto.status.value},
                )
            )

    async def _resume(self) -> None:
        """Take over a run that was running when the daemon last stopped (or was killed)."""
        assert self.store is not None
        store = self.store
        run = await asyncio.to_thread(store.active_run)
        if run is None:
            return
        t = now_ns()
        self.run_record = run
        phases = await asyncio.to_thread(store.phases, run.id)
        proto = await self._protocol_of(run)
        if proto is None:
            await self._unmonitored(run, phases[-1].phase if phases else "", t)
            return
        if not phases:  # a store written before run start was one transaction
            first = PhaseChange(
                run.id, run.started, proto.phases[0].id, None, "system", True, "restored"
            )
            self._incident(
                IncidentKind.SOFTWARE,
                "phase-restored",
                "daemon",
                f"run {run.id} had no phase record: it started in its first phase "
                f"{first.phase!r}, recorded now",
                t,
            )
            self.writer.add(first)
            phases = [first]
        last_phase = phases[-1]
        seen = await asyncio.to_thread(store.last_sample_times)
        last_seen = {p: seen[src] for p, src in self._sources.items() if src in seen}
        excursions = await asyncio.to_thread(store.excursions, run.id)
        deviations = await asyncio.to_thread(store.deviations, run.id)
        lost_flagged = {d.excursion_id for d in deviations if d.cause is DeviationCause.DATA_LOSS}
        # An outage that was going on goes on (one excursion for one outage); whatever else
        # was open ends at the last data we have.
        ongoing: dict[str, tuple[Excursion, bool]] = {}
        cumulative: dict[tuple[str, str, ExcursionKind], float] = defaultdict(float)
        for exc in excursions:
            key = (exc.parameter, exc.phase, exc.kind)
            if exc.end is not None:
                cumulative[key] += (exc.end - exc.start) / NS
                continue
            resume_from = max(last_seen.get(exc.parameter, last_phase.t), last_phase.t)
            if exc.kind is ExcursionKind.COMM_LOSS and exc.phase == last_phase.phase:
                ongoing[exc.parameter] = (exc, exc.id in lost_flagged)
                cumulative[key] += max(0, resume_from - exc.start) / NS
                continue
            end = max(exc.start, last_seen.get(exc.parameter, exc.start))
            self.writer.add(ExcursionEvent(ExcursionChange.CLOSED, replace(exc, end=end)))
            cumulative[key] += (end - exc.start) / NS
        spent = {
            (d.parameter, d.phase)
            for d in deviations
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
            ongoing=ongoing,
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
        self.engine = engine
        self._emit(events)
        log.warning("run resumed", run=run.id, phase=last_phase.phase, gap_s=round(gap, 1))

    async def _protocol_of(self, run: Run) -> Protocol | None:
        """The exact protocol the run started with, by hash: loaded from its file if that is
        unchanged, else from the text the store kept. None if it is nowhere."""
        for proto in self.site.protocols.values():
            if proto.hash == run.protocol_hash:
                return proto
        assert self.store is not None
        kept = await asyncio.to_thread(self.store.protocol_text, run.protocol_hash)
        if kept is None:
            return None
        try:
            proto = protocol_from_text(kept.text, f"the store's copy of {kept.id} {kept.version}")
        except ConfigError as exc:  # valid when it was loaded; this pocd checks more
            log.error("the stored protocol no longer loads", run=run.id, problems=str(exc))
            return None
        if proto.hash != run.protocol_hash:
            return None
        log.info("run resumes on the stored protocol", run=run.id, protocol=proto.key)
        return proto

    async def _unmonitored(self, run: Run, phase: str, t: int) -> None:
        """The run's protocol is nowhere to be found: a deviation, and what was open ends now."""
        assert self.store is not None
        message = (
            f"run {run.id}: protocol {run.protocol_id} {run.protocol_version} with hash "
            f"{run.protocol_hash[:12]} is neither loaded nor kept in the store; the run is "
            "not monitored from now on"
        )
        log.error("run not monitored", run=run.id, reason=message)
        self._incident(IncidentKind.CONFIGURATION, "protocol-missing", "daemon", message, t)
        deviations = await asyncio.to_thread(self.store.deviations, run.id)
        if not any(d.cause is DeviationCause.PROTOCOL_MISSING for d in deviations):
            deviation = Deviation(
                uuid.uuid4().hex, run.id, t, DeviationCause.PROTOCOL_MISSING, phase, message
            )
            self._emit([deviation])  # once per run, not at every restart
        for exc in await asyncio.to_thread(self.store.open_excursions, run.id):
            self._emit(
                [ExcursionEvent(ExcursionChange.CLOSED, replace(exc, end=max(t, exc.start)))]
            )

    # --- tasks ---------------------------------------------------------------------------------

    async def _device_task(self, device: Device) -> None:
        """Run one device's runner; restart it after an unexpected error, never stop others."""
        backoff = 1.0
        said = ""
        with structlog.contextvars.bound_contextvars(device=device.id):
            while True:
                try:
                    runner: DeviceRunner = get_transport(device.driver.transport).runner(device)
                    self.runners[device.id] = runner
                    await runner.run(self.inbox)
                except Exception as exc:  # a bug in a runner must not take the daemon down
                    message = f"{type(exc).__name__}: {exc}"
                    if message != said:  # the same failure again is logged, not recorded again
                        said = message
                        log.exception("device runner failed", error=str(exc))
                        await self.inbox.put(
                            Incident(
                                now_ns(), IncidentKind.SOFTWARE, "runner-failed", device.id, message
                            )
                        )
                        await self.inbox.put(
                            CommStatus(device.id, now_ns(), ok=False, reason="runner failed")
                        )
                    else:
                        log.debug("device runner failed again", error=str(exc))
                else:
                    return
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 60.0)

    async def _engine_task(self) -> None:
        writer = self.writer
        while True:
            if not writer.room.is_set():
                await writer.room.wait()  # the store is behind: the runners wait on the inbox
            readings = await self.inbox.take()
            try:
                self._take(readings, self._read_clock())
            finally:
                self.inbox.done(len(readings))
            writer.note_room()
            await asyncio.sleep(ENGINE_WINDOW)

    def _take(self, readings: list[Reading], wall: int) -> None:
        """Readings in the order they came: samples to the writer and the engine."""
        engine = self.engine
        add = self.writer.add
        latest = self.latest
        samples = 0
        for record in readings:
            if isinstance(record, Sample):
                samples += 1
                add(record)
                latest[record.device, record.point] = record
                if engine is not None:
                    try:
                        # A reading stamped before the wall clock stepped back is judged now,
                        # not in the engine's future.
                        judged = record if record.t <= wall else record._replace(t=wall)
                        events = engine.on_sample(judged)
                        if events:
                            self._emit(events)
                        if self._phase_source is not None:
                            self._phase_from_device(judged)
                    except Exception as exc:  # the reading is stored; the next is judged
                        self._engine_failed(exc, record)
            else:
                self._take_other(record, wall)
        self.counts["samples"] += samples

    def _take_other(self, record: CommStatus | Incident, wall: int) -> None:
        if isinstance(record, CommStatus):
            if record.ok:
                log.info("device answering", device=record.device)
                self.down.discard(record.device)
            else:
                log.error("device lost", device=record.device, reason=record.reason)
                self.down.add(record.device)
            if self.engine is not None:
                try:
                    judged = record if record.t <= wall else replace(record, t=wall)
                    self._emit(self.engine.on_comm(judged))
                except Exception as exc:
                    self._engine_failed(exc, record)
        else:
            self._count_incident(record)
            self.writer.add(record)

    def _engine_failed(self, exc: Exception, record: object) -> None:
        """A bug judging one reading (or tick): a software incident the first time it happens;
        the reading is on the record all the same."""
        kind = f"{type(exc).__name__}: {exc}"[:200]
        self.counts["engine_errors"] += 1
        if kind in self._faults or len(self._faults) >= _DISTINCT_FAULTS:
            self._faults[kind] += 1
            return
        self._faults[kind] = 1
        log.exception("the engine failed on a reading", reading=repr(record))
        self._incident(
            IncidentKind.SOFTWARE,
            "engine-failed",
            "engine",
            f"{kind} on {record!r}; the reading is stored, later ones are judged as usual "
            "(repeats are counted in status, engine_errors)",
            now_ns(),
        )

    def _phase_from_device(self, sample: Sample) -> None:
        source = self._phase_source
        assert source is not None and self.engine is not None
        if (sample.device, sample.point) != (source.device, source.point):
            return
        value = sample.value
        if sample.quality is Quality.BAD or not math.isfinite(value):
            return
        key = str(int(value)) if value == int(value) else str(value)
        phase = source.phases.get(key)
        if phase is None or phase == self.engine.phase:
            self._phase_value = None
            return
        order = [p.id for p in self.engine.protocol.phases]
        if phase not in order:
            if key != self._phase_value:  # once per value, not once per reading
                self._phase_value = key
                proto = self.engine.protocol
                self._incident(
                    IncidentKind.DATA,
                    "phase-unknown",
                    sample.device,
                    f"{sample.point} = {key} maps to phase {phase!r}, which protocol "
                    f"{proto.id} {proto.version} of run {self.engine.run_id} does not have "
                    f"(its phases: {', '.join(order)}); ignored",
                    sample.t,
                )
            return
        self._phase_value = None
        current = order.index(self.engine.phase) if self.engine.phase else -1
        reason = (
            ""
            if order.index(phase) == current + 1
            else f"{sample.point} = {key} on {sample.device}"
        )
        self._phase_change(phase, f"device:{sample.device}", reason, sample.t)

    def _read_clock(self) -> int:
        """The wall time now. A jump of the wall clock against the steady clock (an NTP step,
        a manual change) is an incident and moves the engine's clocks by as much, so it is
        neither a gap in the data nor negative time (see Engine.shift)."""
        wall = now_ns()
        jump = self._clock.check(wall, steady_ns())
        if jump:
            message = f"wall clock jumped {jump / NS:+.3f} s against the steady clock"
            log.warning("clock jump", jump_s=round(jump / NS, 3))
            self._incident(IncidentKind.CLOCK, "clock-jump", "daemon", message, wall)
            if self.engine is not None:
                self.engine.shift(jump)
        return wall

    async def _clock_task(self) -> None:
        while True:
            wall = self._read_clock()
            if self.engine is not None:
                try:
                    self._emit(self.engine.tick(wall))
                except Exception as exc:
                    self._engine_failed(exc, f"the clock tick at {wall}")
            await asyncio.sleep(1.0)

    # --- the store -----------------------------------------------------------------------------

    async def flush(self, *, within: float | None = None) -> None:
        """Commit everything queued (see StoreWriter.flush)."""
        await self.writer.flush(within=within)

    async def _commit(self, records: list[Record]) -> None:
        """Queue an operation's records as one transaction and wait for it, for a while."""
        self.writer.add_group(records)
        await self.writer.flush(within=COMMIT_WAIT_S)

    @property
    def pending_count(self) -> int:
        """Records taken in and not yet committed to the store."""
        return len(self.writer)

    # --- run control ---------------------------------------------------------------------------

    async def start_run(
        self, batch_id: str, protocol_id: str, version: str | None, operator: str
    ) -> Run:
        async with self._control:
            if not batch_id.strip() or not operator.strip():
                raise RunError("a run needs a batch id and an operator")
            if self.site_status is not SiteStatus.ACTIVE:
                raise RunError(
                    f"site {self.site.id} is {self.site_status.value}: runs start only at an "
                    "active site"
                )
            if self.engine is not None or self.run_record is not None:
                running = self.run_record.id if self.run_record else ""
                raise RunError(f"run {running} is still running")
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
            for device in sorted(self.down):  # lost before the run began: lost in it too
                events += engine.on_comm(CommStatus(device, t, ok=False, reason="not answering"))
            self.engine, self.run_record = engine, run
            audit = AuditEntry(
                t,
                operator,
                "run.start",
                run.id,
                new=batch_id,
                details={"protocol": f"{proto.id} {proto.version}", "hash": proto.hash},
            )
            await self._commit([run, audit, *self._note(events)])
            log.info(
                "run started", run=run.id, batch=batch_id, protocol=f"{proto.id} {proto.version}"
            )
            return run

    async def advance_phase(self, phase: str, operator: str, reason: str = "") -> PhaseChange:
        async with self._control:
            if self.engine is None:
                raise RunError("no run is active")
            change, records = self._phase_records(phase, operator, reason, now_ns())
            await self._commit(records)
            return change

    def _phase_change(self, phase: str, actor: str, reason: str, t: int) -> None:
        """A phase change from a device: committed with the next flush, in one transaction."""
        _, records = self._phase_records(phase, actor, reason, t)
        self.writer.add_group(records)

    def _phase_records(
        self, phase: str, actor: str, reason: str, t: int
    ) -> tuple[PhaseChange, list[Record]]:
        assert self.engine is not None and self.run_record is not None
        previous = self.engine.phase
        events = self.engine.enter_phase(phase, t, actor, reason)
        change = events[0]
        assert isinstance(change, PhaseChange)
        audit = AuditEntry(
            change.t, actor, "run.phase", self.run_record.id, reason, old=previous, new=phase
        )
        log.info(
            "phase changed", run=self.run_record.id, phase=phase, previous=previous, actor=actor
        )
        return change, [audit, *self._note(events)]

    async def stop_run(self, operator: str, *, abort: bool = False, reason: str = "") -> Run:
        async with self._control:
            if self.run_record is None:
                raise RunError("no run is active")
            if abort and not reason.strip():
                raise RunError("aborting a run needs a reason")
            t = now_ns()
            events: list[EngineEvent] = self.engine.finish(t) if self.engine else []
            status = RunStatus.ABORTED if abort else RunStatus.COMPLETED
            run = replace(self.run_record, status=status, ended=t, end_reason=reason)
            audit = AuditEntry(
                t,
                operator,
                "run.abort" if abort else "run.stop",
                run.id,
                reason,
                old=RunStatus.RUNNING.value,
                new=status.value,
            )
            self.engine, self.run_record = None, None
            await self._commit([*self._note(events), run, audit])
            log.info("run ended", run=run.id, status=status.value)
            return run

    async def set_site_status(self, status: SiteStatus, operator: str, reason: str) -> None:
        async with self._control:
            if not reason.strip() or not operator.strip():
                raise RunError("a site status change needs an operator and a reason")
            old = self.site_status
            if old is SiteStatus.CEASED:
                raise RunError(f"site {self.site.id} has ceased; it cannot change status")
            if old is status:
                raise RunError(f"site {self.site.id} is already {status.value}")
            self.site_status = status  # from now on: no run starts while it is committed
            audit = AuditEntry(
                now_ns(), operator, "site.status", self.site.id, reason, old.value, status.value
            )
            await self._commit([audit])

    def _note(self, events: Iterable[EngineEvent]) -> list[EngineEvent]:
        """Count and log the engine's events; they are returned to be queued."""
        noted = []
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
            noted.append(event)
        return noted

    def _emit(self, events: Iterable[EngineEvent]) -> None:
        add = self.writer.add
        for event in self._note(events):
            add(event)

    def _incident(self, kind: IncidentKind, code: str, source: str, message: str, t: int) -> None:
        incident = Incident(t, kind, code, source, message)
        self._count_incident(incident)
        self.writer.add(incident)

    def _count_incident(self, incident: Incident) -> None:
        self.incident_counts[incident.source] += 1

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        run = self.run_record
        writer = self.writer
        return {
            "site": {
                "id": self.site.id,
                "name": self.site.config.site.name,
                "timezone": self.site.config.site.timezone,
                "control_site": self.site.config.site.control_site,
                "status": self.site_status.value,
            },
            "run": None
            if run is None
            else {
                "id": run.id,
                "batch_id": run.batch_id,
                "protocol": f"{run.protocol_id} {run.protocol_version}",
                "phase": self.engine.phase if self.engine else None,
                "monitored": self.engine is not None,
                "started": run.started,
            },
            "points": [vars_of(p) for p in self.points()],
            "incidents": dict(self.incident_counts),
            "engine_errors": self.counts["engine_errors"],
            "sinks": {sink.name: sink.status() for sink in self.sinks},
            "store": {
                "pending": self.pending_count,
                "keeping_up": writer.room.is_set(),
                "failing": writer.failing,
                "last_commit": writer.last_commit,
                "quarantined": writer.quarantined,
            },
        }

    def points(self) -> list[PointStatus]:
        views = {v.parameter: v for v in self.engine.view()} if self.engine else {}
        out = []
        for device in self.site.devices.values():
            texts: dict[str, str] = getattr(self.runners.get(device.id), "texts", {})
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
                        text=texts.get(name),
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
        "text": point.text,
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
