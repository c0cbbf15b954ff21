"""Lines and their runs: the engines that judge each line, and run control.

A line (an ISA-88 unit, `pocd.settings.Line`) always has an engine: its run's while a batch
runs on it, else its standby engine, on the line's standby protocol or, without one, on the
built-in equipment watch (comm-loss and bad quality of every parameter the line feeds). So
the equipment is watched between runs too, and what is found then is the line's, with no
batch. A sample of a point in several lines is judged once per line, by each line's engine.

Control (start, phase, stop, the site's status) happens in the event loop, one operation at
a time; each takes the acting user's identity as a value, writes its audit entries, and
returns once its records are committed (CommitTimeout after a bounded wait: they stay queued).
An engine error on one reading is an incident, and the other lines judge it all the same.

Some 700 lines in one module: starting, stopping and resuming a line's runs and its standby
all build and replace the line's engine and its routing (`LineState`, `_routes`, `_standby`);
split apart, that state would have to be public.

Must not: read devices, or write to the store except through the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

import structlog

from pocd.access import Action, separation_conflict
from pocd.alarms import AlarmCommand, AlarmKey, Alarms, AlarmSettings, AlarmView
from pocd.engine import Engine, EngineEvent, ParameterView
from pocd.errors import ConfigError, RunError, SignatureRequired
from pocd.model import (
    NS,
    AlarmEvent,
    AlarmPriority,
    AuditEntry,
    CommStatus,
    Deviation,
    DeviationCause,
    DeviationChange,
    DeviationState,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    IncidentKind,
    PhaseChange,
    Quality,
    Run,
    RunStatus,
    Sample,
    SiteStatus,
    now_ns,
)
from pocd.protocol import (
    AlarmProperties,
    Limits,
    Parameter,
    Phase,
    Protocol,
    ProtocolKind,
    ProtocolStatus,
    canonical_hash,
)
from pocd.settings import Line, Site, point_lines, protocol_from_text
from pocd.signatures import SignedRecord, Signer, sign
from pocd.store import Record, Store
from pocd.store.writer import StoreWriter

__all__ = ["COMMIT_WAIT_S", "Actor", "LineState", "Lines", "equipment_watch"]

log = structlog.get_logger("pocd.runs")

# The acting user's identity. A name today; a later issue makes it a signed-in user.
Actor = str
# The id of the built-in standby protocol of a line that names none (`equipment_watch`).
_EQUIPMENT_WATCH: Final = "pocd-equipment-watch"
# How long an operation waits for its records to be committed before it says they are not.
COMMIT_WAIT_S: Final = 5.0
_DISTINCT_FAULTS: Final = 100  # engine errors told apart (and each an incident), then counted
Incidents = Callable[[IncidentKind, str, str, str, int], None]


@dataclass(slots=True)
class LineState:
    """What a line is doing: its run (None between runs) and the engine judging it (None for
    a run whose protocol is nowhere to be found: not monitored)."""

    line: Line
    engine: Engine | None
    run: Run | None = None
    phase_value: str | None = None  # the last phase-source value not acted on

    @property
    def monitored(self) -> bool:
        return self.engine is not None

    def view(self) -> dict[str, ParameterView]:
        return {} if self.engine is None else {v.parameter: v for v in self.engine.view()}


def equipment_watch(line: Line, site: Site) -> Protocol:
    """The standby protocol of a line that names none: no limits, so what it records is
    comm-loss and bad quality of every parameter the line's points feed."""
    units = {
        name: site.devices[device].points[point].unit
        for name, (device, point) in line.sources.items()
    }
    parameters = {name: Parameter(name, unit, critical=False) for name, unit in units.items()}
    phase = Phase("standby", "Standby", {name: Limits() for name in parameters})
    return Protocol(
        id=_EQUIPMENT_WATCH,
        version="1",
        title="Equipment watch: communication and quality",
        status=ProtocolStatus.APPROVED,
        hash=canonical_hash({"builtin": "equipment-watch", "units": units}),
        parameters=parameters,
        phases=(phase,),
        kind=ProtocolKind.STANDBY,
    )


class Lines:
    """The site's lines and their runs. `latest` and `down` are the daemon's: the latest
    sample of each point and the devices not answering, which a new engine starts from."""

    def __init__(
        self,
        site: Site,
        writer: StoreWriter,
        *,
        incident: Incidents,
        latest: Mapping[tuple[str, str], Sample],
        down: set[str],
        on_lines: Callable[[], None] = lambda: None,
    ) -> None:
        self.site = site
        self.writer = writer
        self.site_status = SiteStatus.ACTIVE  # read from the store at `resume`
        # Each line's engine is made at `resume`, when the store says what was going on.
        self.states = {line.id: LineState(line, None) for line in site.lines.values()}
        self.counts: Counter[str] = Counter()  # excursions, deviations, engine_errors
        self._incident = incident
        self._latest = latest
        self._down = down
        self._on_lines = on_lines  # the lines in force changed (see `point_lines`)
        self._control = asyncio.Lock()  # one run or site operation at a time
        self._batches: set[str] = set()  # every batch id of the site (unique per site)
        # Runs running in the store that no line took at the start (`_orphan`): their line
        # starts no other run until a restart resumes them.
        self._orphans: list[Run] = []
        self._by_point: dict[tuple[str, str], list[LineState]] = {}
        self._by_device: dict[str, list[LineState]] = {}
        self._phase_sources: dict[tuple[str, str], list[LineState]] = {}
        self._faults: Counter[str] = Counter()  # engine errors by kind
        # The alarms of every line (pocd.alarms): fed every excursion event that goes to the
        # store (in `_note`), and each line's design scope when its engine or phase changes.
        self.alarms = Alarms(
            settings=self._alarm_settings,
            devices=_devices(site.lines.values()),
            units=_units(site.lines.values(), site.protocols),
            max_shelve_s=site.config.alarms.max_shelve,
        )

    # --- queries ------------------------------------------------------------------------------

    def runs(self) -> list[Run]:
        """The runs going on, in line order."""
        return [s.run for s in self.states.values() if s.run is not None]

    def state_of_run(self, run_id: str | None) -> LineState:
        """The line running `run_id`; None: the run of the site's only line."""
        if run_id is None:
            if len(self.states) != 1:
                raise RunError(
                    f"site {self.site.id} has {len(self.states)} lines: name the run "
                    "(POST /api/runs/{id}/...)"
                )
            state = next(iter(self.states.values()))
            if state.run is None:
                raise RunError("no run is active")
            return state
        for state in self.states.values():
            if state.run is not None and state.run.id == run_id:
                return state
        raise RunError(f"no run {run_id!r} is active (active: {self._active_text()})")

    def _active_text(self) -> str:
        return ", ".join(f"{r.id} on {r.line}" for r in self.runs()) or "none"

    def _state(self, line_id: str | None) -> LineState:
        if line_id is None:
            if len(self.states) != 1:
                raise RunError(f"site {self.site.id} has several lines: name one ({self._ids()})")
            return next(iter(self.states.values()))
        try:
            return self.states[line_id]
        except KeyError:
            raise RunError(f"no line {line_id!r} (lines: {self._ids()})") from None

    def _ids(self) -> str:
        return ", ".join(self.states)

    def point_parameters(self) -> dict[tuple[str, str], str]:
        """(device, point) -> the parameter it feeds: as the config says, but as its line's
        definition says for a point of a line a run is on (until the run ends)."""
        fed = self.site.point_parameters()
        for state in self.states.values():
            if state.run is not None:
                fed.update({point: parameter for parameter, point in state.line.sources.items()})
        return fed

    def point_lines(self) -> dict[tuple[str, str], str]:
        """(device, point) -> the line of every point in exactly one line, as the lines in
        force define them (a line a run is on keeps its definition until the run ends)."""
        return point_lines(state.line for state in self.states.values())

    # --- judging ------------------------------------------------------------------------------

    def judge(self, sample: Sample) -> None:
        """Judge one sample (already stored) on every line its point is in."""
        point = (sample.device, sample.point)
        for state in self._by_point.get(point, ()):
            engine = state.engine
            assert engine is not None
            try:
                events = engine.on_sample(sample)
                if events:
                    self._emit(events)
                if self.alarms.holding:  # after a restart: the parameter is judged again
                    line = state.line
                    for parameter, source in line.sources.items():
                        if source == point:
                            self._emit_records(
                                self.alarms.release(line.id, parameter, sample.device, sample.t)
                            )
            except Exception as exc:  # the reading is stored; the next is judged
                self._engine_failed(exc, sample)
        for state in self._phase_sources.get(point, ()):
            try:
                self._phase_from_device(state, sample)
            except Exception as exc:
                self._engine_failed(exc, sample)

    def on_comm(self, status: CommStatus) -> None:
        for state in self._by_device.get(status.device, ()):
            assert state.engine is not None
            try:
                self._emit(state.engine.on_comm(status))
            except Exception as exc:
                self._engine_failed(exc, status)

    def tick(self, t: int) -> None:
        alarmed = self.alarms.tick(t)  # shelves that end, re-alarms
        if alarmed:
            self._emit_records(alarmed)
            self.writer.hurry()
        for state in self.states.values():
            if state.engine is not None:
                try:
                    self._emit(state.engine.tick(t))
                except Exception as exc:
                    self._engine_failed(exc, f"the clock tick at {t}")

    def shift(self, delta: int) -> None:
        """The wall clock jumped (see Engine.shift)."""
        for state in self.states.values():
            if state.engine is not None:
                state.engine.shift(delta)

    def _routes(self) -> None:
        """Which lines' engines take which points, devices and phase sources."""
        self._by_point, self._by_device, self._phase_sources = {}, {}, {}
        for state in self.states.values():
            if state.engine is not None:
                for point in state.line.points:
                    self._by_point.setdefault(point, []).append(state)
                for device in state.line.devices:
                    self._by_device.setdefault(device, []).append(state)
            source = state.line.phase_source
            if state.run is not None and state.engine is not None and source is not None:
                self._phase_sources.setdefault((source.device, source.point), []).append(state)

    def _phase_from_device(self, state: LineState, sample: Sample) -> None:
        source, engine = state.line.phase_source, state.engine
        assert source is not None and engine is not None and engine.run_id is not None
        value = sample.value
        if sample.quality is Quality.BAD or not math.isfinite(value):
            return
        key = str(int(value)) if value == int(value) else str(value)
        phase = source.phases.get(key)
        if phase is None or phase == engine.phase:
            state.phase_value = None
            return
        order = [p.id for p in engine.protocol.phases]
        if phase not in order:
            if key != state.phase_value:  # once per value, not once per reading
                state.phase_value = key
                proto = engine.protocol
                self._incident(
                    IncidentKind.DATA,
                    "phase-unknown",
                    sample.device,
                    f"{sample.point} = {key} maps to phase {phase!r}, which protocol "
                    f"{proto.id} {proto.version} of run {engine.run_id} does not have "
                    f"(its phases: {', '.join(order)}); ignored",
                    sample.t,
                )
            return
        state.phase_value = None
        current = order.index(engine.phase) if engine.phase else -1
        reason = (
            ""
            if order.index(phase) == current + 1
            else f"{sample.point} = {key} on {sample.device}"
        )
        _, records = self._phase_records(state, phase, f"device:{sample.device}", reason, sample.t)
        self.writer.add_group(records)  # committed with the next flush, in one transaction

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

    # --- control ------------------------------------------------------------------------------

    async def start_run(
        self,
        batch_id: str,
        protocol_id: str,
        version: str | None,
        operator: Actor,
        *,
        line: str | None = None,
    ) -> Run:
        """Start a batch on `line` (None: the site's only line)."""
        async with self._control:
            if not batch_id.strip() or not operator.strip():
                raise RunError("a run needs a batch id and an operator")
            if self.site_status is not SiteStatus.ACTIVE:
                raise RunError(
                    f"site {self.site.id} is {self.site_status.value}: runs start only at an "
                    "active site"
                )
            if batch_id in self._batches:
                raise RunError(f"batch {batch_id!r} has a run already: a batch id is unique")
            state = self._state(line)
            if state.run is not None:
                raise RunError(f"run {state.run.id} is still running on line {state.line.id}")
            for orphan in self._orphans:
                if orphan.line == state.line.id:
                    raise RunError(
                        f"run {orphan.id} (batch {orphan.batch_id}) is still running on line "
                        f"{orphan.line}, not monitored since pocd started: restart pocd to "
                        "resume it, then stop it"
                    )
            proto = self._batch_protocol(protocol_id, version)
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
                line=state.line.id,
            )
            engine = Engine(run, proto, state.line.sources)  # refuses a draft or standby one
            # The standby's open excursions end at the start; the run judges anew.
            ended = state.engine.finish(t) if state.engine is not None else []
            events = engine.enter_phase(proto.phases[0].id, t, operator)
            events += self._catch_up(engine, state.line, t)
            state.engine, state.run = engine, run
            self._batches.add(batch_id)
            self._routes()
            audit = AuditEntry(
                t,
                operator,
                "run.start",
                run.id,
                new=batch_id,
                details={
                    "protocol": f"{proto.id} {proto.version}",
                    "hash": proto.hash,
                    "line": state.line.id,
                },
            )
            await self._commit(
                [
                    *self._note(ended),
                    run,
                    audit,
                    *self._alarm_scope(state, t),
                    *self._note(events),
                ]
            )
            log.info(
                "run started",
                run=run.id,
                batch=batch_id,
                line=state.line.id,
                protocol=f"{proto.id} {proto.version}",
            )
            return run

    def _batch_protocol(self, protocol_id: str, version: str | None) -> Protocol:
        try:
            proto = self.site.protocol(protocol_id, version)
        except KeyError:
            proto = None
        if proto is None or proto.kind is not ProtocolKind.BATCH:
            known = ", ".join(
                f"{p.id} {p.version} ({p.status.value})"
                for p in self.site.protocols.values()
                if p.kind is ProtocolKind.BATCH
            )
            raise RunError(f"no approved protocol {protocol_id} {version or ''} (loaded: {known})")
        return proto

    async def advance_phase(
        self,
        phase: str,
        operator: Actor,
        reason: str = "",
        *,
        run: str | None = None,
        signature: Signer | None = None,
    ) -> PhaseChange:
        """Enter `phase` in run `run` (None: the run of the site's only line). Out of the
        protocol's order it is an override: it needs `signature` (SignatureRequired)."""
        async with self._control:
            state = self.state_of_run(run)
            if state.engine is None:
                raise RunError(f"run {state.run.id if state.run else ''} is not monitored")
            engine = state.engine
            override = any(p.id == phase for p in engine.protocol.phases) and not (
                phase == engine.phase or engine.in_order(phase)
            )
            if override and signature is None:
                raise SignatureRequired(
                    f"phase {phase!r} is out of protocol order: the override needs your "
                    "electronic signature"
                )
            change, records = self._phase_records(state, phase, operator, reason, now_ns())
            if override:
                assert signature is not None
                records += self._signed(signature, "run.phase.override", change, change.run_id)
            await self._commit(records)
            return change

    def _signed(
        self, signer: Signer, action: str, record: SignedRecord, run_id: str | None
    ) -> list[Record]:
        """The signature of `record` and its audit entry, to commit with the record."""
        t = record.t if not isinstance(record, Run) else record.ended or record.started
        return list(
            sign(
                signer, action, record, t=t, timezone=self.site.config.site.timezone, run_id=run_id
            )
        )

    def _phase_records(
        self, state: LineState, phase: str, actor: str, reason: str, t: int
    ) -> tuple[PhaseChange, list[Record]]:
        engine, run = state.engine, state.run
        assert engine is not None and run is not None
        previous = engine.phase
        events = engine.enter_phase(phase, t, actor, reason)
        change = events[0]
        assert isinstance(change, PhaseChange)
        audit = AuditEntry(change.t, actor, "run.phase", run.id, reason, old=previous, new=phase)
        log.info("phase changed", run=run.id, phase=phase, previous=previous, actor=actor)
        return change, [audit, *self._note(events), *self._alarm_scope(state, change.t)]

    async def stop_run(
        self,
        operator: Actor,
        *,
        abort: bool = False,
        reason: str = "",
        run: str | None = None,
        signature: Signer | None = None,
    ) -> Run:
        """Complete (or abort, with a reason and `signature`) run `run` (None: the site's
        only line's)."""
        async with self._control:
            state = self.state_of_run(run)
            assert state.run is not None
            if abort and not reason.strip():
                raise RunError("aborting a run needs a reason")
            if abort and signature is None:
                raise SignatureRequired("aborting a run needs your electronic signature")
            t = now_ns()
            finished = self._note(state.engine.finish(t) if state.engine else [])
            status = RunStatus.ABORTED if abort else RunStatus.COMPLETED
            ended = replace(state.run, status=status, ended=t, end_reason=reason)
            audit = AuditEntry(
                t,
                operator,
                "run.abort" if abort else "run.stop",
                ended.id,
                reason,
                old=RunStatus.RUNNING.value,
                new=status.value,
            )
            signed = (
                self._signed(signature, "run.abort", ended, ended.id) if abort and signature else []
            )
            state.run = None
            standby = self._after_run(state, t)
            await self._commit([*finished, ended, audit, *signed, *standby])
            log.info("run ended", run=ended.id, status=status.value, line=state.line.id)
            return ended

    async def set_site_status(
        self, status: SiteStatus, operator: Actor, reason: str, *, signature: Signer | None = None
    ) -> None:
        """Suspend, cease or reactivate the site: a critical change, done only signed."""
        async with self._control:
            if not reason.strip() or not operator.strip():
                raise RunError("a site status change needs an operator and a reason")
            if signature is None:
                raise SignatureRequired("a site status change needs your electronic signature")
            old = self.site_status
            if old is SiteStatus.CEASED:
                raise RunError(f"site {self.site.id} has ceased; it cannot change status")
            if old is status:
                raise RunError(f"site {self.site.id} is already {status.value}")
            self.site_status = status  # from now on: no run starts while it is committed
            audit = AuditEntry(
                now_ns(), operator, "site.status", self.site.id, reason, old.value, status.value
            )
            await self._commit([audit, *self._signed(signature, "site.status", audit, None)])

    # --- alarms --------------------------------------------------------------------------------

    async def alarm_command(
        self,
        command: AlarmCommand,
        key: AlarmKey,
        actor: Actor,
        comment: str = "",
        *,
        until: int | None = None,
        signature: Signer | None = None,
    ) -> AlarmView:
        """An operator's command on the alarm condition `key` (line, source, kind; a line of
        "" is the site's only one): acknowledge (with a note at the priorities the site's
        `alarms.note_required` names) or reset with a note, shelve (until `until`,
        or None: one-shot) or unshelve, remove from service or restore. Shelving a critical
        alarm and taking an alarm out of service or back are signed. Raises AlarmError for a
        command its state does not allow, SignatureRequired. Answers the condition's view."""
        async with self._control:
            key = (key[0] or self._state(None).line.id, key[1], key[2])
            before = self._alarm_view(key)
            signed_action = _SIGNED_ALARM_COMMANDS.get(command)
            if command == "shelve" and before.priority is not AlarmPriority.CRITICAL:
                signed_action = None
            if signed_action is not None and signature is None:
                raise SignatureRequired(
                    f"{command} of alarm {'/'.join(key)} ({before.priority.value}) needs your "
                    "electronic signature"
                )
            noted = before.priority in self.site.config.alarms.note_required
            if command == "acknowledge" and noted and not comment.strip():
                raise RunError(f"acknowledging a {before.priority.value} alarm needs a note")
            t = now_ns()
            alarms = self.alarms
            if command == "shelve":
                events = alarms.shelve(key, t, user=actor, comment=comment, until=until)
            elif command == "remove":
                events = alarms.remove(key, t, user=actor, comment=comment)
            else:
                act = {
                    "acknowledge": alarms.acknowledge,
                    "reset": alarms.reset,
                    "unshelve": alarms.unshelve,
                    "restore": alarms.restore,
                }[command]
                events = act(key, t, user=actor, comment=comment)
            after = self._alarm_view(key)
            audit = AuditEntry(
                t,
                actor,
                f"alarm.{command}",
                "/".join(key),
                comment,
                old=before.state.value,
                new=after.state.value,
                details={"alarm": after.alarm_id, "priority": after.priority.value},
            )
            signed = (
                self._signed(signature, signed_action, audit, None)
                if signature is not None and signed_action is not None
                else []
            )
            await self._commit([*events, audit, *signed])
            return after

    def _alarm_settings(self, line: str, source: str, kind: str) -> AlarmSettings:
        """The alarm properties of a condition, from the protocol in use on its line: the
        run's, or the standby protocol. The built-in equipment watch has none (nor has a line
        without an engine: an unmonitored run, a restart before its engine is made), so there
        they come from the approved batch protocols that define the parameter: the first, by
        id and version, that gives it an alarm table, else the first (its `standby_priority`
        is what applies between runs). A parameter none defines takes the defaults. A
        critical parameter's action limits are critical unless the protocol says otherwise;
        comm-loss takes the site's `alarms.comm_loss_priority`."""
        if kind == ExcursionKind.COMM_LOSS.value:
            return AlarmSettings(priority=self.site.config.alarms.comm_loss_priority)
        state = self.states.get(line)
        engine = None if state is None else state.engine
        if engine is not None and engine.protocol.id != _EQUIPMENT_WATCH:
            protocols = [engine.protocol]
        else:
            protocols = [
                p
                for _, p in sorted(self.site.protocols.items())
                if p.kind is ProtocolKind.BATCH and p.status is ProtocolStatus.APPROVED
            ]
        defined = [p.parameters[source] for p in protocols if source in p.parameters]
        param = next((d for d in defined if d.alarm != AlarmProperties()), None)
        param = param or next(iter(defined), None)
        if param is None:
            return AlarmSettings()
        alarm = param.alarm
        priority = alarm.priority_of(kind)
        action = kind in (ExcursionKind.ACTION_LOW.value, ExcursionKind.ACTION_HIGH.value)
        if priority is None and param.critical and action:
            priority = AlarmPriority.CRITICAL
        return AlarmSettings(
            priority=priority,
            standby_priority=alarm.standby_priority,
            latching=alarm.latching,
            realarm_s=alarm.realarm,
            group=alarm.group,
        )

    # --- deviations ----------------------------------------------------------------------------

    async def deviation_change(
        self,
        deviation_id: str,
        state: DeviationState,
        actor: str,
        note: str,
        *,
        disposition: str = "",
        root_cause: str = "",
        signature: Signer | None = None,
    ) -> DeviationChange:
        """A step of a deviation's lifecycle: open -> assessed (the impact `note`) -> closed (a
        `disposition`, its reason in `note`, and the `root_cause`; signed). RunError for a
        step out of order or without what it needs, SignatureRequired for a close unsigned."""
        async with self._control:
            store = self.writer.store
            if store is None:
                raise RunError("the store is not open")
            found = [d for d in await asyncio.to_thread(store.deviations) if d.id == deviation_id]
            if not found:
                raise RunError(f"no deviation {deviation_id!r}")
            (deviation,) = found
            changes = await asyncio.to_thread(store.deviation_changes, deviation_id)
            before = changes[-1].state if changes else DeviationState.OPEN
            after = _DEVIATION_STEPS.get(before)
            if after is not state:
                raise RunError(
                    f"deviation {deviation_id} is {before.value}: "
                    + (f"it can only be {after.value} next" if after else "it is closed for good")
                )
            if not note.strip():
                what = "an impact assessment" if state is DeviationState.ASSESSED else "a reason"
                raise RunError(f"{state.value} deviation {deviation_id} needs {what} (the note)")
            if state is DeviationState.CLOSED:
                if not (disposition.strip() and root_cause.strip()):
                    raise RunError(
                        f"closing deviation {deviation_id} needs a disposition and a root cause"
                    )
                assessors = frozenset(c.actor for c in changes)
                conflict = separation_conflict(
                    Action.DEVIATION_CLOSE, actor, {"deviation.assess": assessors}
                )
                if conflict:
                    raise RunError(f"deviation {deviation_id}: {conflict}")
                if signature is None:
                    raise SignatureRequired(
                        f"closing deviation {deviation_id} needs your electronic signature"
                    )
            t = now_ns()
            change = DeviationChange(deviation_id, t, actor, state, note, disposition, root_cause)
            details = {"disposition": disposition, "root_cause": root_cause} if disposition else {}
            audit = AuditEntry(
                t,
                actor,
                f"deviation.{state.value}",
                deviation_id,
                note,
                old=before.value,
                new=state.value,
                details=details,
            )
            signed = (
                self._signed(signature, "deviation.close", audit, deviation.run_id)
                if signature is not None and state is DeviationState.CLOSED
                else []
            )
            await self._commit([change, audit, *signed])
            return change

    def _alarm_view(self, key: AlarmKey) -> AlarmView:
        for view in self.alarms.view():
            if (view.line, view.source, view.kind) == key:
                return view
        raise RunError(f"no alarm condition {'/'.join(key)} (line/source/kind) is known")

    async def _commit(self, records: list[Record]) -> None:
        """Queue an operation's records as one transaction and wait for it, for a while."""
        self.writer.add_group(records)
        await self.writer.flush(within=COMMIT_WAIT_S)

    # --- engines ------------------------------------------------------------------------------

    def _standby_protocol(self, line: Line) -> Protocol:
        """The line's standby protocol as loaded; the equipment watch if it names none, or
        one that is not loaded."""
        if line.standby is not None:
            with contextlib.suppress(KeyError):
                return self.site.protocol(line.standby)
        return equipment_watch(line, self.site)

    def _standby(self, state: LineState, t: int) -> list[Record]:
        """Watch the line's equipment from `t` on: its standby protocol's limits apply.
        Returns the records saying so (an audit entry, and what the engine found at once)."""
        line = state.line
        proto = self._standby_protocol(line)
        if line.standby is not None and proto.id != line.standby:
            # a reload took it away: the line is still watched
            self._incident(
                IncidentKind.CONFIGURATION,
                "standby-missing",
                "daemon",
                f"line {line.id}: no approved standby protocol {line.standby!r} is loaded; "
                f"the line is watched by {proto.id} (comm-loss and bad quality) instead",
                t,
            )
        engine = Engine(None, proto, line.sources, line=line.id)
        events = engine.enter_phase(proto.phases[0].id, t, "system")
        events += self._catch_up(engine, line, t)
        state.engine = engine
        self._routes()
        audit = AuditEntry(
            t,
            "system",
            "line.standby",
            line.id,
            new=f"{proto.id} {proto.version}",
            details={"hash": proto.hash},
        )
        return [audit, *self._alarm_scope(state, t), *self._note(events)]

    def _catch_up(self, engine: Engine, line: Line, t: int) -> list[EngineEvent]:
        """A new engine starts from what is known now: the devices not answering and the
        latest reading of each point, judged at `t`."""
        events: list[EngineEvent] = []
        for device in sorted(self._down):
            if device in line.devices:
                events += engine.on_comm(CommStatus(device, t, ok=False, reason="not answering"))
        for point in sorted(line.points):
            sample = self._latest.get(point)
            if sample is not None and sample.device not in self._down:
                events += engine.on_sample(sample._replace(t=max(sample.t, t)))
        return events

    def _note(self, events: Iterable[EngineEvent]) -> list[Record]:
        """Count and log the engine's events; they are returned to be queued, followed by the
        alarm events their excursion events made (one batch: an excursion the engine closes
        and opens again at a phase change is one alarm going on)."""
        noted: list[Record] = []
        for event in events:
            if isinstance(event, Deviation):
                self.counts["deviations"] += 1
                log.warning(
                    "deviation",
                    run=event.run_id,
                    line=event.line,
                    cause=event.cause.value,
                    description=event.description,
                )
            elif isinstance(event, ExcursionEvent) and event.change is ExcursionChange.OPENED:
                self.counts["excursions"] += 1
            noted.append(event)
        excursions = [e for e in noted if isinstance(e, ExcursionEvent)]
        if excursions:
            alarmed = self.alarms.on_excursions(excursions)
            if alarmed:
                self.writer.hurry()  # committed now, for the notifications
            noted += alarmed
        return noted

    def _alarm_scope(self, state: LineState, t: int) -> list[AlarmEvent]:
        """The line's alarms from `t` on: those of what its engine watches in its phase; the
        others are suppressed by design."""
        engine, run = state.engine, state.run
        return self.alarms.set_scope(
            state.line.id,
            alarm_scope(engine, state.line) if engine is not None else frozenset(),
            t,
            run_id=run.id if run is not None else None,
            batch_id=run.batch_id if run is not None else None,
            phase=engine.phase if engine is not None and run is not None else None,
        )

    def _emit(self, events: Iterable[EngineEvent]) -> None:
        add = self.writer.add
        for event in self._note(events):
            add(event)

    # --- reload -------------------------------------------------------------------------------

    def reload(self, site: Site, t: int) -> dict[str, list[str]]:
        """Take the lines of a reloaded config from `t`: a new line goes on standby, a line
        left out is no longer watched, and a changed one (or one whose standby protocol
        changed) is watched anew. A line a run is on keeps its definition, and its run its
        protocol, until the run ends (`stop_run` applies the change then). Returns the ids
        of the lines added, changed, removed and waiting for their run to end."""
        self.site = site
        done: dict[str, list[str]] = defaultdict(list)
        states: dict[str, LineState] = {}
        anew: list[LineState] = []  # watched on standby from `t`, once relabelled
        for line_id, line in site.lines.items():
            state = self.states.get(line_id) or LineState(line, None)
            engine = state.engine
            if state.run is not None:
                if line != state.line:
                    done["waiting"].append(line_id)
            elif line_id not in self.states:
                anew.append(state)
                done["added"].append(line_id)
                if any(orphan.line == line_id for orphan in self._orphans):
                    done["resuming its run at a restart"].append(line_id)
            elif line != state.line or (
                engine is not None and engine.protocol.hash != self._standby_protocol(line).hash
            ):
                # the old standby's open excursions end, under the labels they had
                self._emit(engine.finish(t) if engine is not None else [])
                state.line = line
                anew.append(state)
                done["changed"].append(line_id)
            states[line_id] = state
        for line_id, state in self.states.items():
            if line_id in states:
                continue
            if state.run is not None:
                states[line_id] = state
                done["waiting"].append(line_id)
            else:
                self._emit_records(self._retire(state, t))
                done["removed"].append(line_id)
        self.states = states
        self._relabel()
        for state in anew:
            what = "add" if state.line.id in done["added"] else "change"
            self.writer.add(_line_audit(f"line.{what}", state.line, t))
            self._emit_records(self._standby(state, t))
        self._routes()
        self._on_lines()
        return dict(done)

    def _after_run(self, state: LineState, t: int) -> list[Record]:
        """A run has ended on the line: the line goes on standby, as the config defines it
        now (a reload during the run may have changed it, or left it out)."""
        line = self.site.lines.get(state.line.id)
        if line == state.line:
            return self._standby(state, t)
        if line is None:
            del self.states[state.line.id]
            records = self._retire(state, t)
            self._routes()
        else:
            state.line = line
            self._relabel()
            records = [_line_audit("line.change", line, t), *self._standby(state, t)]
        self._on_lines()
        return records

    def _retire(self, state: LineState, t: int) -> list[Record]:
        """A line the config no longer has: its open excursions end and its alarms go out
        of scope at `t`."""
        engine = state.engine
        ended = engine.finish(t) if engine is not None and not engine.ended else []
        state.engine = None
        return [
            *self._note(ended),
            _line_audit("line.remove", state.line, t),
            *self._alarm_scope(state, t),
        ]

    def _relabel(self) -> None:
        """The devices and units of each line's parameters for the alarms, as the lines in
        force define them (a line that is gone keeps its last)."""
        lines = [state.line for state in self.states.values()]
        self.alarms.relabel(devices=_devices(lines), units=_units(lines, self.site.protocols))

    # --- resume -------------------------------------------------------------------------------

    async def resume(self, store: Store) -> None:
        """Take over after a start: the site's status, the runs that were running when the
        daemon last stopped (or was killed), and every other line on standby."""
        self.site_status = await asyncio.to_thread(store.site_status)
        self._batches = {r.batch_id for r in await asyncio.to_thread(store.runs)}
        self._orphans = []
        running = await asyncio.to_thread(store.active_runs)
        seen = await asyncio.to_thread(store.last_sample_times)
        t = now_ns()
        open_now = await asyncio.to_thread(store.open_excursions)
        self.alarms.resume(await asyncio.to_thread(store.alarm_events), open_excursions=open_now)
        self.states = {line.id: LineState(line, None) for line in self.site.lines.values()}
        for run in reversed(running):  # should a crash have left two on a line: the latest
            state = self.states.get(run.line)
            if state is None or state.run is not None:
                self._orphan(run, t, "its line is not in the config" if state is None else "")
                continue
            state.run = run
            await self._resume_run(store, state, seen, t)
        for state in self.states.values():
            if state.run is None:
                await self._end_equipment_records(store, state.line, seen)
                self._emit_records(self._standby(state, t))
        self._routes()

    def _emit_records(self, records: Iterable[Record]) -> None:
        for record in records:
            self.writer.add(record)

    def _orphan(self, run: Run, t: int, why: str) -> None:
        """A running run the config has no place for: it stays running, unmonitored."""
        why = why or f"line {run.line} is running another run"
        self._orphans.append(run)
        self._incident(
            IncidentKind.CONFIGURATION,
            "run-orphaned",
            "daemon",
            f"run {run.id} (batch {run.batch_id}) was running on line {run.line}, but {why}: "
            "it is not monitored; restore the line to the config and restart pocd",
            t,
        )

    async def _end_equipment_records(
        self, store: Store, line: Line, seen: Mapping[tuple[str, str], int]
    ) -> None:
        """Equipment excursions left open by the last process end at the last data; the new
        standby engine opens them again if they still hold."""
        last = max((seen[p] for p in line.points if p in seen), default=None)
        for exc in await asyncio.to_thread(store.line_excursions, line.id, open_only=True):
            self._end_at_restart(exc, max(exc.start, last or exc.start))

    def _end_at_restart(self, exc: Excursion, end: int) -> None:
        """An excursion the last process left open ends at the last data it had. Its alarm
        keeps its state until the engine judges the parameter again (Alarms.hold): the same
        alarm if the condition still holds, acknowledgement and all."""
        event = ExcursionEvent(ExcursionChange.CLOSED, replace(exc, end=end), end)
        self.writer.add(event)
        self.alarms.hold([event])

    async def _resume_run(
        self, store: Store, state: LineState, seen: Mapping[tuple[str, str], int], t: int
    ) -> None:
        run = state.run
        assert run is not None
        phases = await asyncio.to_thread(store.phases, run.id)
        proto = await self._protocol_of(store, run)
        if proto is None:
            await self._unmonitored(store, run, phases[-1].phase if phases else "", t)
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
        sources = state.line.sources
        last_seen = {p: seen[src] for p, src in sources.items() if src in seen}
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
            self._end_at_restart(exc, end)
            cumulative[key] += (end - exc.start) / NS
        spent = {
            (d.parameter, d.phase)
            for d in deviations
            if d.cause is DeviationCause.BUDGET_SPENT and d.parameter
        }
        engine = Engine(run, proto, sources)
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
            f"resumed run {run.id} (batch {run.batch_id}) on line {run.line} in phase "
            f"{last_phase.phase!r} after a gap of {gap:.1f} s without data",
            t,
        )
        state.engine = engine
        self._emit_records(self._alarm_scope(state, t))
        self._emit(events)
        log.warning("run resumed", run=run.id, phase=last_phase.phase, gap_s=round(gap, 1))

    async def _protocol_of(self, store: Store, run: Run) -> Protocol | None:
        """The exact protocol the run started with, by hash: loaded from its file if that is
        unchanged, else from the text the store kept. None if it is nowhere."""
        for proto in self.site.protocols.values():
            if proto.hash == run.protocol_hash:
                return proto
        kept = await asyncio.to_thread(store.protocol_text, run.protocol_hash)
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

    async def _unmonitored(self, store: Store, run: Run, phase: str, t: int) -> None:
        """The run's protocol is nowhere to be found: a deviation, and what was open ends now."""
        message = (
            f"run {run.id}: protocol {run.protocol_id} {run.protocol_version} with hash "
            f"{run.protocol_hash[:12]} is neither loaded nor kept in the store; the run is "
            "not monitored from now on"
        )
        log.error("run not monitored", run=run.id, reason=message)
        self._incident(IncidentKind.CONFIGURATION, "protocol-missing", "daemon", message, t)
        deviations = await asyncio.to_thread(store.deviations, run.id)
        if not any(d.cause is DeviationCause.PROTOCOL_MISSING for d in deviations):
            deviation = Deviation(
                uuid.uuid4().hex,
                run.id,
                t,
                DeviationCause.PROTOCOL_MISSING,
                phase,
                message,
                line=run.line,
            )
            self._emit([deviation])  # once per run, not at every restart
        for exc in await asyncio.to_thread(store.open_excursions, run.id):
            end = max(t, exc.start)
            self._emit([ExcursionEvent(ExcursionChange.CLOSED, replace(exc, end=end), end)])


# The one step a deviation may take next from each state.
_DEVIATION_STEPS: Final[dict[DeviationState, DeviationState]] = {
    DeviationState.OPEN: DeviationState.ASSESSED,
    DeviationState.ASSESSED: DeviationState.CLOSED,
}

# The commands signed (a shelve only of a critical alarm), as the action the signature signs.
_SIGNED_ALARM_COMMANDS: Final[dict[str, str]] = {
    "shelve": "alarm.shelve.critical",
    "remove": "alarm.out_of_service",
    "restore": "alarm.out_of_service",
}

_LIMIT_KINDS: Final = (
    (ExcursionKind.ALERT_LOW, "alert_low"),
    (ExcursionKind.ALERT_HIGH, "alert_high"),
    (ExcursionKind.ACTION_LOW, "action_low"),
    (ExcursionKind.ACTION_HIGH, "action_high"),
    (ExcursionKind.RATE, "max_rate"),
    (ExcursionKind.STALE, "stale_after"),
)


def alarm_scope(engine: Engine, line: Line) -> frozenset[tuple[str, str]]:
    """The alarm conditions (source, kind) an engine watches on a line in its current phase:
    each limit its phase sets on a parameter it monitors, bad quality of every monitored one,
    and comm-loss of each of the line's devices."""
    if engine.phase is None:
        return frozenset()
    phase = engine.protocol.phase(engine.phase)
    scope: set[tuple[str, str]] = {
        (device, ExcursionKind.COMM_LOSS.value) for device in line.devices
    }
    for parameter, limits in phase.limits.items():
        if parameter not in line.sources or not limits.monitored:
            continue
        scope.add((parameter, ExcursionKind.BAD_QUALITY.value))
        scope |= {
            (parameter, kind.value)
            for kind, name in _LIMIT_KINDS
            if getattr(limits, name) is not None
        }
    return frozenset(scope)


def _line_audit(action: str, line: Line, t: int) -> AuditEntry:
    """A line added, changed or removed by a reload."""
    return AuditEntry(t, "system", action, line.id, details={"devices": ", ".join(line.devices)})


def _devices(lines: Iterable[Line]) -> dict[str, dict[str, str]]:
    """Each line's parameters' devices."""
    return {
        line.id: {param: device for param, (device, _) in line.sources.items()} for line in lines
    }


def _units(
    lines: Iterable[Line], protocols: Mapping[tuple[str, str], Protocol]
) -> dict[str, dict[str, str]]:
    """Each line's parameters' units, as the protocols give them (load_site made sure that a
    point with a unit agrees with every protocol); "" where the protocols disagree."""
    given: dict[str, set[str]] = defaultdict(set)
    for proto in protocols.values():
        for name, param in proto.parameters.items():
            given[name].add(param.unit)
    return {
        line.id: {
            name: next(iter(given[name])) if len(given[name]) == 1 else "" for name in line.sources
        }
        for line in lines
    }
