"""The alarm layer: ISA-18.2 / OPC UA Part 9 alarm conditions fed by the engine's excursions,
the design scope of each line, the operators' commands and the clock.

Pure like the engine: no I/O, no asyncio, no clock of its own (every input carries `t`, ns).
Every call returns the `AlarmEvent`s it caused; they are the record, and the state of a
condition is its latest event's: `resume` rebuilds it by applying the same events with the same
code (`_apply`) that made them. It must not send, store or log anything.

A shelve, a suppression by design and an out-of-service each mask the condition; masking ends
the activation shown to the operator (the mask's event records who and why), and when the last
mask goes while the condition is still active it alarms again, as a new activation.

Some 700 lines in one module on purpose: the conditions, their commands, the clock, the scope
and `resume` all change one table of conditions through `_apply`, and its invariants (one
activation shown at a time, masks ending it, a replay making the same state) hold only while
one class owns that table. The rate KPIs, which need none of it, live in kpis.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pocd.alarms.kpis import AlarmKey, AlarmKpis, Rates
from pocd.errors import RunError
from pocd.model import (
    NS,
    AlarmEvent,
    AlarmPriority,
    AlarmState,
    AlarmTransition,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
)
from pocd.store.recordtypes import iso

__all__ = ["AlarmError", "AlarmSettings", "AlarmView", "Alarms", "Scope", "default_priority"]

S = AlarmState
T = AlarmTransition
_ACTIVE = (S.ACTIVE_UNACKED, S.ACTIVE_ACKED)
_COMM = ExcursionKind.COMM_LOSS.value
_DEFAULT_PRIORITY = {
    ExcursionKind.ACTION_HIGH: AlarmPriority.HIGH,
    ExcursionKind.ACTION_LOW: AlarmPriority.HIGH,
    ExcursionKind.COMM_LOSS: AlarmPriority.HIGH,
}


def _defaults(line: str, source: str, kind: str) -> AlarmSettings:
    return AlarmSettings()


# The operator commands on an alarm condition (Alarms.acknowledge, reset, shelve, ...).
AlarmCommand = Literal["acknowledge", "reset", "shelve", "unshelve", "remove", "restore"]


class AlarmError(RunError):
    """An operator's command that makes no sense in the condition's state; nothing changed."""

    def __init__(self, message: str, *, key: AlarmKey, state: AlarmState | None) -> None:
        self.key = key
        self.state = state
        super().__init__(message)


def default_priority(kind: str) -> AlarmPriority:
    """Action limits and comm-loss are HIGH; alerts, rate, stale and bad quality MEDIUM."""
    try:
        return _DEFAULT_PRIORITY.get(ExcursionKind(kind), AlarmPriority.MEDIUM)
    except ValueError:
        return AlarmPriority.MEDIUM


@dataclass(frozen=True, slots=True)
class AlarmSettings:
    """One condition's properties, from the protocol. `priority` None takes the kind's default;
    `standby_priority` (None: as `priority`) applies while the line has no run."""

    priority: AlarmPriority | None = None
    standby_priority: AlarmPriority | None = None
    latching: bool = False
    realarm_s: float | None = None
    group: str | None = None  # first-out group


@dataclass(frozen=True, slots=True)
class Scope:
    """What a line monitors now, as (source, kind) pairs (comm-loss: (device, "comm-loss")),
    and the run, batch and phase its events carry (run_id None: standby)."""

    monitored: frozenset[tuple[str, str]]
    run_id: str | None = None
    batch_id: str | None = None
    phase: str | None = None


@dataclass(frozen=True, slots=True)
class AlarmView:
    """The current state of one condition, for status and the console."""

    line: str
    source: str
    kind: str
    state: AlarmState
    active: bool  # the process condition holds, whether or not a mask hides it
    alarm_id: str
    priority: AlarmPriority
    began: int | None
    first_out: bool
    acknowledged_by: str | None
    acknowledged_at: int | None
    shelved_until: int | None
    one_shot: bool
    device: str
    value: float | None
    limit: float | None
    unit: str  # of the value and the limit
    since: int | None  # the time of its latest event


@dataclass(slots=True)
class _Condition:
    key: AlarmKey
    settings: AlarmSettings
    device: str
    unit: str
    priority: AlarmPriority
    base: AlarmState = S.NORMAL  # the annunciated state under any mask (NORMAL while masked)
    alarm_id: str = ""
    began: int | None = None
    first_out: bool = False
    acked_by: str | None = None
    acked_at: int | None = None
    unacked_since: int | None = None
    shelved: bool = False
    shelved_until: int | None = None
    one_shot: bool = False
    suppressed: bool = False
    out_of_service: bool = False
    value: float | None = None
    limit: float | None = None
    last: AlarmEvent | None = None
    causes: dict[str, Excursion] = field(default_factory=dict)  # open excursions by id
    used: dict[str, int] = field(default_factory=dict)  # activations made from each cause

    @property
    def state(self) -> AlarmState:
        if self.out_of_service:
            return S.OUT_OF_SERVICE
        if self.suppressed:
            return S.SUPPRESSED
        if self.shelved:
            return S.SHELVED
        return self.base

    @property
    def masked(self) -> bool:
        return self.out_of_service or self.suppressed or self.shelved

    @property
    def cause(self) -> Excursion | None:
        return next(iter(self.causes.values()), None)


class Alarms:
    """Every alarm condition of a site: one per (line, parameter, limit kind), plus one per
    (line, device) for comm-loss, active while any parameter of the device has a comm-loss
    excursion open. `devices` maps each line's parameters to their device, `units` to their
    unit (a rate's value and limit are in unit/min; a comm-loss has none). `settings` gives
    a condition's properties when it is first seen, and again at each `set_scope` of its line
    (where the protocol in use may change); what a stored event says stays as it was.

    Feed each engine call's events in one `on_excursions` batch: the engine closes and reopens
    an excursion across a phase change, and in one batch that is one alarm going on."""

    def __init__(
        self,
        *,
        settings: Callable[[str, str, str], AlarmSettings]
        | Mapping[AlarmKey, AlarmSettings] = _defaults,
        devices: Mapping[str, Mapping[str, str]] = {},
        units: Mapping[str, Mapping[str, str]] = {},
        max_shelve_s: float = 8 * 3600.0,
    ) -> None:
        if isinstance(settings, Mapping):
            table = settings
            self._settings: Callable[[str, str, str], AlarmSettings] = lambda line, source, kind: (
                table.get((line, source, kind), AlarmSettings())
            )
        else:
            self._settings = settings
        self._devices = devices
        self._units = units
        self.max_shelve = round(max_shelve_s * NS)
        self._conditions: dict[AlarmKey, _Condition] = {}
        self._scopes: dict[str, Scope] = {}
        self._rates = Rates()
        # Conditions whose excursions a restart ended at the last data (`hold`), until the
        # engine judges their parameter again.
        self._held: set[AlarmKey] = set()

    def relabel(
        self, *, devices: Mapping[str, Mapping[str, str]], units: Mapping[str, Mapping[str, str]]
    ) -> None:
        """Each line's parameters' devices and units from now on (a reloaded config); the
        lines not named keep theirs."""
        self._devices = {**self._devices, **devices}
        self._units = {**self._units, **units}

    # --- inputs ------------------------------------------------------------------------------

    def on_excursions(self, events: Iterable[ExcursionEvent]) -> list[AlarmEvent]:
        """OPENED activates a condition, CLOSED returns it, UPDATED refreshes its value."""
        out: list[AlarmEvent] = []
        touched: dict[AlarmKey, tuple[bool, int]] = {}
        for event in events:
            exc = event.excursion
            t = event.t if event.t is not None else exc.end or exc.start
            self._clock(t, out)
            cond = self._condition(self._key(exc), t, out)
            was, _ = touched.get(cond.key, (bool(cond.causes) or cond.key in self._held, t))
            self._held.discard(cond.key)
            if event.change is ExcursionChange.CLOSED:
                cond.causes.pop(exc.id, None)
                cond.used.pop(exc.id, None)
            else:
                cond.causes[exc.id] = exc
            touched[cond.key] = (was, t)
        for key, (was, t) in touched.items():
            cond = self._conditions[key]
            if cond.causes and not was:
                self._alarm(cond, t, out)
            elif was and not cond.causes:
                self._returned(cond, t, out)
        return out

    def on_excursion(self, event: ExcursionEvent) -> list[AlarmEvent]:
        return self.on_excursions((event,))

    def hold(self, events: Iterable[ExcursionEvent]) -> None:
        """Excursions a restart ended at the last data before it (CLOSED events): their
        conditions keep their state, acknowledgement included, until `release`. If the
        engine's next judgement opens the excursion again, it is the same alarm going on."""
        for event in events:
            key = self._key(event.excursion)
            cond = self._conditions.get(key)
            if cond is not None and cond.causes.pop(event.excursion.id, None) is not None:
                cond.used.pop(event.excursion.id, None)
                if not cond.causes:
                    self._held.add(key)

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def release(self, line: str, source: str, device: str, t: int) -> list[AlarmEvent]:
        """The engine judged parameter `source` of `device` on `line` again after a restart:
        each held condition of it (and the device's comm-loss) that no excursion opened again
        meanwhile returns to normal at `t`."""
        out: list[AlarmEvent] = []

        def judged(key: AlarmKey) -> bool:
            return key[0] == line and key[1:] in ((source, key[2]), (device, _COMM))

        for key in sorted(k for k in self._held if judged(k)):
            self._held.discard(key)
            self._returned(self._conditions[key], t, out)
        return out

    def set_scope(
        self,
        line: str,
        monitored: frozenset[tuple[str, str]],
        t: int,
        *,
        run_id: str | None = None,
        batch_id: str | None = None,
        phase: str | None = None,
    ) -> list[AlarmEvent]:
        """The line's design scope from `t` (a run's start or end, a phase change): conditions
        outside it are suppressed, those back in it unsuppressed (and alarm if active). The
        line's conditions take their properties anew."""
        out: list[AlarmEvent] = []
        self._clock(t, out)
        self._scopes[line] = Scope(monitored, run_id, batch_id, phase)
        for source, kind in sorted(monitored):
            self._condition((line, source, kind), t, out)
        where = f"phase {phase!r}" if run_id is not None else "standby"
        for cond in [c for c in self._ordered() if c.key[0] == line]:
            cond.settings = self._settings(*cond.key)
            inside = cond.key[1:] in monitored
            if inside and cond.suppressed:
                self._emit(cond, T.UNSUPPRESS, t, out, comment=f"monitored in {where}")
                self._alarm(cond, t, out)
            elif not inside and not cond.suppressed:
                self._emit(cond, T.SUPPRESS, t, out, comment=f"not monitored in {where}")
        return out

    def tick(self, t: int) -> list[AlarmEvent]:
        """Shelves that expire by `t` end, acknowledged alarms past their re-alarm time re-alarm."""
        out: list[AlarmEvent] = []
        self._clock(t, out)
        self._rates.prune(t)
        return out

    # --- operator commands: each raises AlarmError and changes nothing when it makes no sense -

    def acknowledge(
        self, key: AlarmKey, t: int, *, user: str, comment: str = ""
    ) -> list[AlarmEvent]:
        def act(cond: _Condition, out: list[AlarmEvent]) -> None:
            if cond.state not in (S.ACTIVE_UNACKED, S.RETURNED_UNACKED):
                what = "reset it" if cond.state is S.LATCHED else "nothing to acknowledge"
                self._refuse(cond, f"is {cond.state.value}: {what}")
            self._emit(cond, T.ACKNOWLEDGE, t, out, actor=user, comment=comment)

        return self._command(key, t, act)

    def reset(self, key: AlarmKey, t: int, *, user: str, comment: str = "") -> list[AlarmEvent]:
        def act(cond: _Condition, out: list[AlarmEvent]) -> None:
            if cond.state is not S.LATCHED:
                self._refuse(cond, f"is {cond.state.value}: only a latched alarm is reset")
            self._emit(cond, T.RESET, t, out, actor=user, comment=comment)

        return self._command(key, t, act)

    def shelve(
        self, key: AlarmKey, t: int, *, user: str, comment: str, until: int | None = None
    ) -> list[AlarmEvent]:
        """Shelve until `until`, or (None) one-shot: until the condition next returns to normal.
        Never longer than the maximum: a one-shot shelve ends at it too."""

        def act(cond: _Condition, out: list[AlarmEvent]) -> None:
            if cond.state in (S.OUT_OF_SERVICE, S.SUPPRESSED, S.SHELVED):
                self._refuse(cond, f"is {cond.state.value}: it cannot be shelved")
            if not comment.strip():
                self._refuse(cond, "cannot be shelved without a reason")
            if until is not None and not t < until <= t + self.max_shelve:
                self._refuse(
                    cond,
                    f"cannot be shelved for {(until - t) / NS:g} s: a shelve lasts more than "
                    f"0 s and at most {self.max_shelve / NS:g} s",
                )
            self._emit(cond, T.SHELVE, t, out, actor=user, comment=comment, until=until)

        return self._command(key, t, act)

    def unshelve(self, key: AlarmKey, t: int, *, user: str, comment: str = "") -> list[AlarmEvent]:
        def act(cond: _Condition, out: list[AlarmEvent]) -> None:
            if not cond.shelved:
                self._refuse(cond, "is not shelved")
            self._emit(cond, T.UNSHELVE, t, out, actor=user, comment=comment)
            self._alarm(cond, t, out)

        return self._command(key, t, act)

    def remove(self, key: AlarmKey, t: int, *, user: str, comment: str) -> list[AlarmEvent]:
        """Take the condition out of service: it does not alarm until restored."""

        def act(cond: _Condition, out: list[AlarmEvent]) -> None:
            if cond.out_of_service:
                self._refuse(cond, "is out of service already")
            if not comment.strip():
                self._refuse(cond, "cannot be taken out of service without a reason")
            self._emit(cond, T.REMOVE, t, out, actor=user, comment=comment)

        return self._command(key, t, act)

    def restore(self, key: AlarmKey, t: int, *, user: str, comment: str = "") -> list[AlarmEvent]:
        def act(cond: _Condition, out: list[AlarmEvent]) -> None:
            if not cond.out_of_service:
                self._refuse(cond, "is in service")
            self._emit(cond, T.RESTORE, t, out, actor=user, comment=comment)
            self._alarm(cond, t, out)

        return self._command(key, t, act)

    # --- restart and views -------------------------------------------------------------------

    def resume(
        self,
        events: Iterable[AlarmEvent],
        *,
        open_excursions: Iterable[Excursion] = (),
        scopes: Mapping[str, Scope] = {},
    ) -> None:
        """Rebuild the state from the stored events, the excursions open now and each line's
        scope, making no event. After a restart feed the engine's re-judgement: an OPENED on a
        condition the events leave active goes on as the same alarm (its acknowledgement kept)."""
        self._scopes.update(scopes)
        for line, scope in scopes.items():
            for source, kind in sorted(scope.monitored):
                self._register((line, source, kind))
        for event in events:
            cond = self._register((event.line, event.source, event.kind))
            self._apply(cond, event)
        for exc in open_excursions:
            self._register(self._key(exc)).causes[exc.id] = exc
        for cond in self._conditions.values():
            cond.used = {k: n for k, n in cond.used.items() if k in cond.causes}

    def open_excursions(self) -> list[Excursion]:
        """The excursions that hold conditions active, for `resume`."""
        return [e for c in self._conditions.values() for e in c.causes.values()]

    def scopes(self) -> dict[str, Scope]:
        return dict(self._scopes)

    def view(self) -> list[AlarmView]:
        return [self._view(c) for c in self._ordered()]

    def kpis(
        self, t: int, *, standing_s: float = 1800.0, unacked_s: float = 600.0
    ) -> dict[str, AlarmKpis]:
        """Per line at `t`: rate, flood, chattering, standing (active longer than
        `standing_s`), unacknowledged longer than `unacked_s`, shelved and out-of-service."""
        lines = {c.key[0] for c in self._conditions.values()} | self._rates.lines()
        result: dict[str, AlarmKpis] = {}
        for line in sorted(lines):
            conds = [c for c in self._ordered() if c.key[0] == line]
            result[line] = AlarmKpis(
                line=line,
                t=t,
                per_10_min=self._rates.per_10_min(line, t),
                flood=self._rates.flood(line, t),
                chattering=self._rates.chattering(line, t),
                standing=tuple(
                    c.key
                    for c in conds
                    if c.state in _ACTIVE and (c.began or t) <= t - round(standing_s * NS)
                ),
                unacknowledged=tuple(
                    c.key
                    for c in conds
                    if c.state in (S.ACTIVE_UNACKED, S.RETURNED_UNACKED)
                    and (c.unacked_since or t) <= t - round(unacked_s * NS)
                ),
                shelved=sum(c.shelved for c in conds),
                out_of_service=sum(c.out_of_service for c in conds),
                suppressed=sum(c.suppressed for c in conds),
            )
        return result

    # --- internals ---------------------------------------------------------------------------

    def _ordered(self) -> list[_Condition]:
        # by key, not by when each was first seen, which a restart does not reproduce
        return [self._conditions[k] for k in sorted(self._conditions)]

    def _key(self, exc: Excursion) -> AlarmKey:
        if exc.kind is ExcursionKind.COMM_LOSS:
            # without a device for it the parameter stands for its device: it still alarms
            device = self._devices.get(exc.line, {}).get(exc.parameter, exc.parameter)
            return (exc.line, device, _COMM)
        return (exc.line, exc.parameter, exc.kind.value)

    def _register(self, key: AlarmKey) -> _Condition:
        cond = self._conditions.get(key)
        if cond is None:
            line, source, kind = key
            settings = self._settings(line, source, kind)
            if kind == _COMM:
                device, unit = source, ""
            else:
                device = self._devices.get(line, {}).get(source, "")
                unit = self._units.get(line, {}).get(source, "")
                if unit and kind == ExcursionKind.RATE.value:
                    unit = f"{unit}/min"
            priority = settings.priority or default_priority(kind)
            cond = _Condition(key, settings, device, unit, priority)
            self._conditions[key] = cond
        return cond

    def _condition(self, key: AlarmKey, t: int, out: list[AlarmEvent]) -> _Condition:
        """The condition, made when first seen: suppressed at once if its line's scope
        leaves it out."""
        new = key not in self._conditions
        cond = self._register(key)
        scope = self._scopes.get(key[0])
        if new and scope is not None and key[1:] not in scope.monitored:
            self._emit(cond, T.SUPPRESS, t, out, comment="not monitored")
        return cond

    def _priority(self, cond: _Condition) -> AlarmPriority:
        run_id, _, _ = self._context(cond)
        base = cond.settings.priority or default_priority(cond.key[2])
        standby = cond.settings.standby_priority
        return standby if run_id is None and standby is not None else base

    def _context(self, cond: _Condition) -> tuple[str | None, str | None, str | None]:
        scope = self._scopes.get(cond.key[0])
        if scope is not None:
            return scope.run_id, scope.batch_id, scope.phase
        cause = cond.cause
        return (None, None, None) if cause is None else (cause.run_id, None, cause.phase)

    def _alarm(self, cond: _Condition, t: int, out: list[AlarmEvent]) -> None:
        """A new activation, if the condition holds, nothing masks it and it is not shown
        active already (a restart's re-judgement of an alarm that went on)."""
        cause = cond.cause
        if cause is None or cond.masked or cond.base in _ACTIVE:
            return
        n = cond.used.get(cause.id, 0) + 1
        group = cond.settings.group
        first = group is not None and all(
            c.base is S.NORMAL
            for c in self._conditions.values()
            if c is not cond and c.key[0] == cond.key[0] and c.settings.group == group
        )
        self._emit(
            cond,
            T.ACTIVATE,
            t,
            out,
            alarm_id=cause.id if n == 1 else f"{cause.id}.{n}",
            began=min(cause.start, t),
            priority=self._priority(cond),
            first_out=first,
        )

    def _returned(self, cond: _Condition, t: int, out: list[AlarmEvent]) -> None:
        if cond.shelved and cond.one_shot:
            self._emit(cond, T.UNSHELVE, t, out, comment="one-shot shelve: returned to normal")
        if cond.base in _ACTIVE and not cond.masked:
            if cond.settings.latching:
                after = S.LATCHED
            elif cond.base is S.ACTIVE_UNACKED:
                after = S.RETURNED_UNACKED
            else:
                after = S.NORMAL
            self._emit(cond, T.RETURN, t, out, state=after)

    def _clock(self, t: int, out: list[AlarmEvent]) -> None:
        for cond in self._ordered():
            if cond.shelved and cond.shelved_until is not None and cond.shelved_until <= t:
                self._emit(cond, T.UNSHELVE, t, out, comment="shelve expired")
                self._alarm(cond, t, out)
            realarm = cond.settings.realarm_s
            if (
                cond.state is S.ACTIVE_ACKED
                and realarm is not None
                and cond.acked_at is not None
                and cond.acked_at + round(realarm * NS) <= t
            ):
                self._emit(cond, T.REALARM, t, out, comment=f"still active after {realarm:g} s")

    def _command(
        self, key: AlarmKey, t: int, act: Callable[[_Condition, list[AlarmEvent]], None]
    ) -> list[AlarmEvent]:
        # The clock runs first (an expired shelve, a re-alarm change what makes sense), and a
        # refusal undoes it too, so that a refused command changes nothing at all.
        if key not in self._conditions:
            line, source, kind = key
            raise AlarmError(
                f"line {line!r} has no {kind} alarm for {source!r}", key=key, state=None
            )
        saved = copy.deepcopy((self._conditions, self._rates))
        out: list[AlarmEvent] = []
        try:
            self._clock(t, out)
            act(self._conditions[key], out)
        except AlarmError:
            self._conditions, self._rates = saved
            raise
        return out

    @staticmethod
    def _refuse(cond: _Condition, why: str) -> None:
        line, source, kind = cond.key
        raise AlarmError(
            f"the {kind} alarm of {source!r} on line {line!r} {why}", key=cond.key, state=cond.state
        )

    def _emit(
        self,
        cond: _Condition,
        transition: AlarmTransition,
        t: int,
        out: list[AlarmEvent],
        *,
        state: AlarmState | None = None,
        actor: str = "system",
        comment: str = "",
        until: int | None = None,
        alarm_id: str | None = None,
        began: int | None = None,
        priority: AlarmPriority | None = None,
        first_out: bool | None = None,
    ) -> None:
        cause = cond.cause
        run_id, batch_id, phase = self._context(cond)
        event = AlarmEvent(
            t=t,
            alarm_id=cond.alarm_id if alarm_id is None else alarm_id,
            line=cond.key[0],
            source=cond.key[1],
            kind=cond.key[2],
            transition=transition,
            state=state or cond.state,
            priority=priority or cond.priority,
            began=cond.began if began is None else began,
            actor=actor,
            comment=comment,
            until=until,
            run_id=run_id,
            batch_id=batch_id,
            phase=phase,
            device=cond.device,
            value=cond.value if cause is None else cause.worst,
            limit=cond.limit if cause is None else cause.limit,
            unit=cond.unit,
            first_out=cond.first_out if first_out is None else first_out,
        )
        self._apply(cond, event)
        if state is None:
            event = replace(event, state=cond.state)
        cond.last = event
        out.append(event)

    def _apply(self, cond: _Condition, event: AlarmEvent) -> None:
        """The one place a condition changes: live from the event just made, and in `resume`
        from the stored one. Reads nothing of the event's `state` but a return's."""
        tr = event.transition
        cond.last, cond.priority, cond.value, cond.limit = (
            event,
            event.priority,
            event.value,
            event.limit,
        )
        if tr is T.ACTIVATE:
            root, dot, n = event.alarm_id.rpartition(".")
            if not (dot and n.isdigit()):
                root, n = event.alarm_id, "1"
            cond.used[root] = int(n)
            cond.base, cond.alarm_id, cond.began = S.ACTIVE_UNACKED, event.alarm_id, event.began
            cond.first_out, cond.unacked_since = event.first_out, event.t
            cond.acked_by = cond.acked_at = None
            self._rates.add(cond.key, event.t)
        elif tr is T.ACKNOWLEDGE:
            cond.base = S.ACTIVE_ACKED if cond.base is S.ACTIVE_UNACKED else S.NORMAL
            cond.acked_by, cond.acked_at, cond.unacked_since = event.actor, event.t, None
        elif tr is T.RETURN:
            cond.base = event.state
        elif tr is T.RESET:
            cond.base = S.NORMAL
        elif tr is T.REALARM:
            cond.base, cond.unacked_since = S.ACTIVE_UNACKED, event.t
            cond.acked_by = cond.acked_at = None
        elif tr is T.SHELVE:
            cond.shelved, cond.one_shot = True, event.until is None
            cond.shelved_until = event.until or event.t + self.max_shelve
        elif tr is T.UNSHELVE:
            cond.shelved, cond.shelved_until, cond.one_shot = False, None, False
        elif tr is T.SUPPRESS:
            cond.suppressed = True
        elif tr is T.UNSUPPRESS:
            cond.suppressed = False
        elif tr is T.REMOVE:
            cond.out_of_service = True
        elif tr is T.RESTORE:
            cond.out_of_service = False
        if cond.masked:
            cond.base, cond.first_out, cond.unacked_since = S.NORMAL, False, None
            cond.acked_by = cond.acked_at = None

    def _view(self, cond: _Condition) -> AlarmView:
        cause = cond.cause
        return AlarmView(
            line=cond.key[0],
            source=cond.key[1],
            kind=cond.key[2],
            state=cond.state,
            active=cause is not None,
            alarm_id=cond.alarm_id,
            priority=cond.priority,
            began=cond.began,
            first_out=cond.first_out,
            acknowledged_by=cond.acked_by,
            acknowledged_at=cond.acked_at,
            shelved_until=cond.shelved_until,
            one_shot=cond.one_shot,
            device=cond.device,
            value=cond.value if cause is None else cause.worst,
            limit=cond.limit if cause is None else cause.limit,
            unit=cond.unit,
            since=None if cond.last is None else cond.last.t,
        )


def view_json(view: AlarmView) -> dict[str, Any]:
    """An alarm view as JSON-ready values (times as ISO text) for status and the API."""
    return {
        "line": view.line,
        "source": view.source,
        "kind": view.kind,
        "state": view.state.value,
        "active": view.active,
        "alarm_id": view.alarm_id,
        "priority": view.priority.value,
        "began": iso(view.began),
        "first_out": view.first_out,
        "acknowledged_by": view.acknowledged_by,
        "acknowledged_at": iso(view.acknowledged_at),
        "shelved_until": iso(view.shelved_until),
        "one_shot": view.one_shot,
        "device": view.device,
        "value": view.value,
        "limit": view.limit,
        "unit": view.unit,
        "since": iso(view.since),
    }
