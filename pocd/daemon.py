"""The daemon: wires the device runners, the lines (pocd.runs), the store writer, the clock,
the sinks and the API, and owns their tasks and the signals.

Data moves one way: runners put readings into the inbox; the engine task stores each sample
once (it queues it in the store writer, pocd.store.writer, which commits in batches) and has every
line it belongs to judge it (pocd.runs). Every task is named and lives in one TaskGroup. A
failing device runner is restarted on its own. Only a store that cannot be opened ends the
daemon (and an API that cannot listen, at start). Run control lives in pocd.runs and the
live view in pocd.status; the API (pocd.api) sees them through Protocols only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

import structlog

from pocd.api.http import serve_api
from pocd.clock import ClockWatch, clock_synchronised, steady_ns
from pocd.errors import CommitTimeout, ConfigError, StoreError
from pocd.inbox import Inbox, Reading
from pocd.model import (
    NS,
    AuditEntry,
    CommStatus,
    Incident,
    IncidentKind,
    LoadedFile,
    ProtocolText,
    Sample,
    now_ns,
)
from pocd.runs import COMMIT_WAIT_S, Lines
from pocd.settings import Site, load_site
from pocd.sinks import build_sinks
from pocd.sitekey import SiteKey
from pocd.status import LiveStatus
from pocd.store import Record, Store
from pocd.store.writer import StoreWriter
from pocd.systemd import Health, Systemd
from pocd.transports import Device, DeviceRunner, DriverInfo, get_transport

__all__ = ["Daemon", "run_until"]

log = structlog.get_logger("pocd.daemon")

INBOX_SIZE = 100_000  # readings waiting for the engine; runners block when it is full
# The engine takes the inbox at most this often, so that a burst of readings costs it one
# wake-up, not one per poll. Readings carry their own receive time: only the live view and the
# alerts wait, by at most this long.
ENGINE_WINDOW = 0.01
# Records waiting for the store beyond which the engine takes no more readings (the runners
# then wait on the inbox): a few seconds of the fastest site, a few hundred MB at most.
HIGH_WATER: Final = 500_000


class Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.store: Store | None = None
        self.inbox = Inbox(INBOX_SIZE)
        self.latest: dict[tuple[str, str], Sample] = {}
        self.runners: dict[str, DeviceRunner] = {}
        self.down: set[str] = set()  # devices whose transport says they do not answer
        self.incident_counts: defaultdict[str, int] = defaultdict(int)
        self.counts: Counter[str] = Counter()  # samples since start (the lines count events)
        self.device_samples: defaultdict[str, int] = defaultdict(int)  # and by device
        self.started = asyncio.Event()  # set once the store is open and the API listens
        self.writer = StoreWriter(
            batch_size=site.config.store.batch_size,
            high_water=HIGH_WATER,
            on_incident=self._count_incident,
        )
        self._stop = asyncio.Event()
        self._reload_due = False  # a SIGHUP before the daemon was ready: applied once it is
        self._site_key: SiteKey | None = None  # signs the chain's checkpoints, opened at need
        self._clock = ClockWatch()
        self.systemd = Systemd()
        self.engine_beat = time.monotonic()  # the engine's last take of readings
        self.clock_synced: bool | None = None  # the kernel's word (adjtimex), checked each minute
        self._synchronised = clock_synchronised
        self.reload_error: str | None = None  # why the last reload was refused, until one applies
        self._tasks: asyncio.TaskGroup | None = None  # the running daemon's, for reloads
        self._device_tasks: dict[str, asyncio.Task[None]] = {}
        self._sink_tasks: list[asyncio.Task[None]] = []
        self.sinks = build_sinks(site)
        for sink in self.sinks:
            sink.follow(self.writer.commits)
        self.lines = Lines(
            site,
            self.writer,
            incident=self._incident,
            latest=self.latest,
            down=self.down,
            on_lines=self._remap,
        )
        self.view = LiveStatus(
            site,
            self.lines,
            self.writer,
            latest=self.latest,
            runners=self.runners,
            sinks=self.sinks,
            incidents=self.incident_counts,
            samples=lambda: self.counts["samples"],
            device_samples=self.device_samples,
            clock_synced=lambda: self.clock_synced,
            inbox_depth=self.inbox.qsize,
        )

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to flush, close and return from `serve`."""
        if not self._stop.is_set():
            self.systemd.notify("STOPPING=1")
        self._stop.set()

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Run until `stop()` (or SIGTERM/SIGINT). Flushes and closes the store on the way out."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        # Each sample is recorded with the parameter its point feeds under this config, and
        # the line it belongs to alone.
        self.store = store = await asyncio.to_thread(
            Store,
            self.site.store_path,
            parameters=self.site.point_parameters(),
            lines=self.site.point_lines(),
        )
        self.writer.store = store
        try:
            with structlog.contextvars.bound_contextvars(site=self.site.id):
                await self._serve()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.writer.stopping = True
            await self.flush()
            await self._checkpoint()  # the chain's head as the daemon leaves it
            self.writer.store = None
            store.close()
            self.store = None
            self.systemd.close()
            log.info("daemon stopped")

    async def _serve(self) -> None:

        assert self.store is not None
        self._record_load(self.site, "config.load")
        await self.lines.resume(self.store)
        try:
            await self.flush(within=COMMIT_WAIT_S)
        except CommitTimeout as exc:  # the devices start all the same; the records wait
            log.error("the store has not committed the start records yet", error=str(exc))
        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            workers = [
                tg.create_task(self._engine_task(), name="engine"),
                tg.create_task(
                    self.writer.run(self.site.config.store.flush_interval), name="store-writer"
                ),
                tg.create_task(self._clock_task(), name="clock"),
                tg.create_task(self._checkpoint_task(), name="checkpoints"),
                tg.create_task(self._systemd_task(), name="systemd"),
                tg.create_task(
                    serve_api(
                        self.site.config.api,
                        self.site.config.access,
                        control=self.lines,
                        view=self.view,
                        recorder=self,
                        store_path=self.site.store_path,
                        ready=ready,
                    ),
                    name="api",
                ),
            ]
            self._device_tasks = {
                device.id: tg.create_task(self._device_task(device), name=f"device:{device.id}")
                for device in self.site.devices.values()
            }
            self._start_sinks()
            await ready.wait()  # the API has bound its socket (or failed, ending the group)
            self.started.set()
            self.systemd.notify("READY=1", self._status_line())
            if self._reload_due:
                self.reload()
            log.info(
                "daemon started", devices=len(self.site.devices), store=str(self.site.store_path)
            )
            await self._stop.wait()
            self._tasks = None  # no reload starts a task from here on
            for task in [*workers, *self._device_tasks.values(), *self._sink_tasks]:
                if task.get_name() != "engine":
                    task.cancel()
            self.writer.room.set()  # what the runners put before they stopped is taken in
            await self.inbox.join()  # every reading already taken in reaches the writer
            workers[0].cancel()

    async def _systemd_task(self) -> None:
        """Tell systemd how the daemon is, every half watchdog interval (10 s without a
        watchdog), and ping the watchdog only while the store writer and the engine make
        progress. The ping is sent from the event loop, so a blocked loop sends none."""
        if not self.systemd.active:
            return
        await self.started.wait()  # READY=1 comes first
        watchdog = self.systemd.watchdog_s
        interval = watchdog / 2 if watchdog else 10.0
        writer = self.writer
        health = Health(
            # a writer is quiet for up to its flush interval by design
            within=max(interval, 2 * self.site.config.store.flush_interval),
            writer_beat=lambda: writer.beat,
            writer_idle=lambda: writer.idle,
            engine_beat=lambda: self.engine_beat,
            # nothing to take, or held back by the writer (whose own progress is checked)
            engine_idle=lambda: self.inbox.qsize() == 0 or not writer.room.is_set(),
        )
        said: list[str] = []
        while True:
            problems = health.problems()
            if problems != said and problems:
                log.error("not pinging the watchdog", problems="; ".join(problems))
            said = problems
            status = self._status_line(problems)
            if watchdog and not problems:
                self.systemd.notify("WATCHDOG=1", status)
            else:
                self.systemd.notify(status)
            await asyncio.sleep(interval)

    def _status_line(self, problems: Sequence[str] = ()) -> str:
        """systemd's one-line STATUS: lines, runs, active alarms, backlogs, and what is
        wrong."""
        states = self.lines.states.values()
        runs = sum(state.run is not None for state in states)
        alarms = sum(view.active for view in self.lines.alarms.view())
        unsent = sum(int(sink.status().get("backlog", 0)) for sink in self.sinks)
        text = (
            f"{len(states)} lines, {runs} running, {alarms} alarms active, "
            f"{len(self.writer)} records to commit, {unsent} to forward"
        )
        errors = [self.reload_error] if self.reload_error else []
        return "STATUS=" + "; ".join([text, *problems, *errors])

    async def _checkpoint_task(self) -> None:
        """Sign the chain's head every `store.checkpoint_every` (pocd.store.chain)."""
        while True:
            await asyncio.sleep(self.site.config.store.checkpoint_every)
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Sign and store the chain's head if it grew; a failure is logged and an incident,
        and the next one tries again."""
        store = self.store
        if store is None:
            return
        try:
            if self._site_key is None:
                self._site_key = await asyncio.to_thread(SiteKey.open, self.site.data_dir)
            key = self._site_key
            await asyncio.to_thread(
                store.checkpoint, f"pocd/{self.site.id}", key.sign, key.id, now_ns()
            )
        except StoreError as exc:
            log.error("cannot checkpoint the chain", error=str(exc))
            self._incident(IncidentKind.DATA, "checkpoint-failed", "daemon", str(exc), now_ns())

    def reload(self) -> None:
        """SIGHUP: apply the config file as it is now. Protocols apply to runs started after
        it (a running run keeps its own); devices whose settings did not change keep running,
        changed ones restart, removed ones stop, new ones start; lines as `Lines.reload`
        says (a line a run is on changes when the run ends); the sinks and alert routes are
        rebuilt (their cursors are in the store: nothing is sent twice or lost). The other
        sections apply at the next restart, and the audit entry says which. An invalid
        config changes nothing: it is logged, audited, an incident and in STATUS. A SIGHUP
        before the daemon is ready (the lines are resumed from the store) waits for it."""
        if not self.started.is_set():
            self._reload_due = True
            return
        self.systemd.reloading()
        try:
            self._reload()
        finally:
            self.systemd.notify("READY=1", self._status_line())

    def _reload(self) -> None:
        t = now_ns()
        try:
            site = load_site(self.site.path)
        except ConfigError as exc:
            log.error("config reload refused; keeping the running config", problems=str(exc))
            # one line: a newline would end systemd's STATUS field
            self.reload_error = "config reload refused: " + " ".join(str(exc).split())[:500]
            self._incident(IncidentKind.CONFIGURATION, "config-reload", "daemon", str(exc), t)
            self.writer.add(
                AuditEntry(
                    t,
                    "system",
                    "config.reload.refused",
                    str(self.site.path),
                    old=self.site.config_hash,
                    details={"problems": str(exc)},
                )
            )
            return
        self.reload_error = None
        old, new = self.site.config, site.config
        applied = {"protocols", "devices", "drivers_dir", "lines", "sinks", "notify"}
        running = old.model_dump()
        waiting = sorted(
            key
            for key, value in new.model_dump().items()
            if key not in applied and value != running[key]
        )
        if waiting:
            log.warning("config changes that apply at the next restart", sections=waiting)
        changed = sorted(
            device_id
            for device_id in self.site.devices.keys() | site.devices.keys()
            if self.site.devices.get(device_id) != site.devices.get(device_id)
        )
        sinks_changed = (old.sinks, old.notify) != (new.sinks, new.notify)
        # What runs from now on: the new protocols, devices, sinks and routes; the rest as it
        # was. That is what is audited, with the file's hash.
        config = old.model_copy(
            update={key: getattr(new, key) for key in applied if key != "protocols"}
        )
        self._record_load(
            site,
            "config.reload",
            applied=sorted(applied),
            not_applied=waiting,
            drivers=[site.devices[d].driver for d in changed if d in site.devices],
        )
        self.site = replace(
            self.site,
            config=config,
            protocols=site.protocols,
            devices=site.devices,
            config_hash=site.config_hash,
            lines=site.lines,
        )
        self.view.site = self.site
        lines = self.lines.reload(self.site, t)
        for device_id in changed:
            self._restart_device(device_id)
        if sinks_changed:
            self._restart_sinks()
        log.info(
            "config reloaded",
            protocols=len(site.protocols),
            devices_restarted=changed,
            sinks_rebuilt=sinks_changed,
            **{f"lines {what}": ids for what, ids in lines.items()},
        )

    def _remap(self) -> None:
        """What each point feeds, and on which line, for the samples from now on."""
        self.writer.remap(self.lines.point_parameters(), self.lines.point_lines())

    def _restart_device(self, device_id: str) -> None:
        """Stop the runner of a device changed or removed by a reload, start the new one."""
        task = self._device_tasks.pop(device_id, None)
        if task is not None:
            task.cancel()
        self.runners.pop(device_id, None)
        self.down.discard(device_id)
        device = self.site.devices.get(device_id)
        if device is not None and self._tasks is not None:
            self._device_tasks[device_id] = self._tasks.create_task(
                self._device_task(device), name=f"device:{device_id}"
            )

    def _restart_sinks(self) -> None:
        """Rebuild the sinks and the notifier's routes of a reloaded config."""
        for task in self._sink_tasks:
            task.cancel()
        self.sinks[:] = build_sinks(self.site)  # the live view holds this list
        for sink in self.sinks:
            sink.follow(self.writer.commits)
        self._start_sinks()

    def _start_sinks(self) -> None:
        if self._tasks is None:  # not serving yet (it starts them) or stopping
            return
        self._sink_tasks = [
            self._tasks.create_task(sink.run(), name=f"sink:{sink.name}") for sink in self.sinks
        ]

    def _record_load(
        self,
        loaded: Site,
        action: str,
        *,
        applied: Iterable[str] = ("all",),
        not_applied: Iterable[str] = (),
        drivers: Iterable[DriverInfo] | None = None,
    ) -> None:
        """Audit what is applied: the config, the drivers (all in use at a load, those of the
        devices restarted at a reload) and the protocols, each with its hash; keep each file's
        text by its hash."""
        t = now_ns()
        details = {"applied": ", ".join(applied)}
        self._keep_file("config", loaded.config_hash, loaded.path)
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
        if drivers is None:
            drivers = [device.driver for device in loaded.devices.values()]
        for driver in {d.id: d for d in drivers}.values():
            self._keep_file("driver", driver.hash, Path(driver.source))
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
        for proto in loaded.protocols.values():
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

    def _keep_file(self, kind: str, digest: str, path: Path) -> None:
        """Keep the text of a file loaded, by the hash its load is audited with; a file that
        cannot be read again (gone since) is logged, its load still audited."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot keep the text of a loaded file", file=str(path), error=str(exc))
            return
        self.writer.add(LoadedFile(digest, kind, path.name, text))

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
            self.engine_beat = time.monotonic()
            writer.note_room()
            await asyncio.sleep(ENGINE_WINDOW)

    def _take(self, readings: list[Reading], wall: int) -> None:
        """Readings in the order they came: each sample stored once and judged by its lines."""
        add = self.writer.add
        judge = self.lines.judge
        latest = self.latest
        by_device = self.device_samples
        samples = 0
        for record in readings:
            if isinstance(record, Sample):
                samples += 1
                by_device[record.device] += 1
                add(record)
                latest[record.device, record.point] = record
                # A reading stamped before the wall clock stepped back is judged now, not in
                # the engine's future.
                judge(record if record.t <= wall else record._replace(t=wall))
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
            self.lines.on_comm(record if record.t <= wall else replace(record, t=wall))
        else:
            self._count_incident(record)
            self.writer.add(record)

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
            self.lines.shift(jump)
        return wall

    async def _clock_task(self) -> None:
        for second in itertools.count():
            wall = self._read_clock()
            if second % 60 == 0:
                self._check_sync(wall)
            self.lines.tick(wall)
            await asyncio.sleep(1.0)

    def _check_sync(self, wall: int) -> None:
        """Record an incident when the system clock loses synchronisation (every record is
        stamped with it); a clock never synchronised since the start is logged."""
        synced, self.clock_synced = self.clock_synced, self._synchronised()
        if self.clock_synced is False and synced is not False:
            message = "the system clock is not synchronised (adjtimex): check chrony or timesyncd"
            log.warning("clock not synchronised")
            if synced:
                self._incident(IncidentKind.CLOCK, "clock-unsynchronised", "daemon", message, wall)
        elif self.clock_synced and synced is False:
            log.info("clock synchronised again")

    # --- the store -----------------------------------------------------------------------------

    async def flush(self, *, within: float | None = None) -> None:
        """Commit everything queued (see StoreWriter.flush)."""
        await self.writer.flush(within=within)

    async def record(self, records: Sequence[Record]) -> None:
        """Commit records as one transaction, waiting for it a while (the API's audit
        entries of logins, refusals and signatures: pocd.api.guard.Recorder)."""
        self.writer.add_group(records)
        await self.writer.flush(within=COMMIT_WAIT_S)

    @property
    def pending_count(self) -> int:
        """Records taken in and not yet committed to the store."""
        return len(self.writer)

    def _incident(self, kind: IncidentKind, code: str, source: str, message: str, t: int) -> None:
        incident = Incident(t, kind, code, source, message)
        self._count_incident(incident)
        self.writer.add(incident)

    def _count_incident(self, incident: Incident) -> None:
        self.incident_counts[incident.source] += 1


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
