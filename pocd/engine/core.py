"""The engine: checks the samples of one run against the limits of its protocol's current phase.

Some 700 lines in one module on purpose: the conditions, the parameters and the engine share
their mutable state (`_Open`, `_Condition`, `_Parameter`), and splitting them would make that
state public.

Pure: no I/O and no clock of its own. Time comes from the samples (their receive time) and from
`tick(t)`, so it can be driven by a fake clock and replayed over stored data. Every call returns
the events it caused: `ExcursionEvent`s, `Deviation`s and `PhaseChange`s.

Excursions keep their true span: with an on-delay an excursion opens only once the breach has
lasted that long, but starts when the breach began; with an off-delay it closes once the value
has stayed back inside that long, but ends when it came back. Deadband is the hysteresis between
the limit that opens an excursion and the level that ends it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from pocd.errors import RunError
from pocd.model import (
    MAIN_LINE,
    NS,
    STALE_REASON,
    CommStatus,
    Deviation,
    DeviationCause,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    PhaseChange,
    Quality,
    Run,
    Sample,
)
from pocd.protocol import Limits, Protocol, ProtocolKind, ProtocolStatus

__all__ = ["Engine", "EngineEvent", "ParameterView"]

EngineEvent = ExcursionEvent | Deviation | PhaseChange

_NONE: list[EngineEvent] = []  # returned (never mutated) when nothing happened: the fast path
_BAD = Quality.BAD
_PER_MIN = 60.0 * NS  # nanoseconds per minute: rates are unit/min
_THRESHOLDS = (
    (ExcursionKind.ACTION_HIGH, "action_high", 1.0),
    (ExcursionKind.ACTION_LOW, "action_low", -1.0),
    (ExcursionKind.ALERT_HIGH, "alert_high", 1.0),
    (ExcursionKind.ALERT_LOW, "alert_low", -1.0),
)


@dataclass(slots=True)
class _Open:
    """An excursion being built: the mutable twin of `model.Excursion`.

    `since` is its start on the engine's clock, which a wall-clock jump moves (`shift`); the
    record keeps the wall time it began (`snapshot.start`). Durations count from `since`.
    """

    snapshot: Excursion
    since: int
    worst: float | None = None
    integral: float = 0.0
    deviated: bool = False  # a deviation was raised for it (action, data loss)

    def event(self, change: ExcursionChange, t: int, end: int | None = None) -> ExcursionEvent:
        """The transition made at `t` (engine time: the parameter's clock)."""
        # A record never ends before it began, whatever the clocks did in between.
        start = self.snapshot.start
        end = None if end is None else max(end, start)
        snap = replace(self.snapshot, end=end, worst=self.worst, integral=self.integral)
        return ExcursionEvent(change, snap, max(t, end or start))


@dataclass(slots=True)
class _Condition:
    """A threshold (or rate) condition with on-delay, off-delay and deadband.

    `sign` is +1 for a high limit (breach above it) and -1 for a low one.
    """

    kind: ExcursionKind
    limit: float
    sign: float
    deadband: float
    breach_since: int | None = None  # breaching now, excursion pending or open
    clear_since: int | None = None  # back inside, off-delay running
    held: float = 0.0  # the last value applied (a rate for the rate condition), held until the next
    pending_integral: float = 0.0
    pending_worst: float | None = None
    excursion: _Open | None = None

    def beyond(self, value: float) -> float:
        return (value - self.limit) * self.sign

    def breached(self, value: float) -> bool:
        return self.beyond(value) > 0.0

    def cleared(self, value: float) -> bool:
        return self.beyond(value) <= -self.deadband

    def worse(self, a: float | None, b: float) -> float:
        if a is None:
            return b
        return max(a, b) if self.sign > 0 else min(a, b)


@dataclass(slots=True)
class _Parameter:
    """Everything the engine tracks for one parameter in the current phase."""

    id: str
    critical: bool
    limits: Limits
    conditions: list[_Condition] = field(default_factory=list)
    rate: _Condition | None = None
    data: dict[ExcursionKind, _Open] = field(default_factory=dict)  # stale, bad-quality, comm-loss
    value: float | None = None  # last GOOD or UNCERTAIN value
    value_t: int = 0  # when `value` was read (or went bad)
    quality: Quality | None = None
    seen_t: int = 0  # last sample of any quality (or phase start), for staleness
    now: int = 0  # latest time processed for this parameter
    # the tightest band: a value inside it, with nothing pending or open, takes the fast path
    inner_low: float = -math.inf
    inner_high: float = math.inf
    rate_per_ns: float = math.inf  # max_rate in unit/ns, inf when unlimited
    quiet: bool = True  # nothing pending or open: see Engine._settle

    def checks(self) -> list[_Condition]:
        """The threshold conditions and the rate condition."""
        return self.conditions if self.rate is None else [*self.conditions, self.rate]


@dataclass(frozen=True, slots=True)
class ParameterView:
    """What the live status shows of one parameter."""

    parameter: str
    value: float | None
    quality: Quality | None
    t: int | None
    limits: Limits
    open: tuple[ExcursionKind, ...]
    pending: tuple[ExcursionKind, ...]  # breached, waiting for the on-delay


class Engine:
    """Monitors one run, or a line between runs (`run` None: on the line's standby protocol).
    Construct it, then `enter_phase` the first phase (or `resume`).

    `sources` maps each parameter to the (device, point) that feeds it on this line."""

    def __init__(
        self,
        run: Run | None,
        protocol: Protocol,
        sources: Mapping[str, tuple[str, str]],
        *,
        line: str | None = None,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        if protocol.status is not ProtocolStatus.APPROVED:
            raise RunError(
                f"protocol {protocol.id} {protocol.version} is {protocol.status.value}: "
                "runs start only on an approved protocol"
            )
        wanted = ProtocolKind.BATCH if run is not None else ProtocolKind.STANDBY
        if protocol.kind is not wanted:
            use = "a run" if run is not None else "monitoring between runs"
            raise RunError(
                f"protocol {protocol.id} {protocol.version} is a {protocol.kind.value} protocol: "
                f"{use} needs a {wanted.value} protocol"
            )
        self.run = run
        self.run_id = None if run is None else run.id
        self.line = run.line if run is not None else line or MAIN_LINE
        self.protocol = protocol
        self.new_id = new_id
        self.phase: str | None = None
        self.phase_started: int | None = None
        self.ended = False
        # (device, point) -> parameter, for the parameters of this protocol only
        self._by_source = {src: p for p, src in sources.items() if p in protocol.parameters}
        self._by_device: dict[str, list[str]] = {}
        for (device, _), param in self._by_source.items():
            self._by_device.setdefault(device, []).append(param)
        self._params: dict[str, _Parameter] = {}
        self._cumulative: dict[tuple[str, str, ExcursionKind], float] = {}
        self._budget_spent: set[tuple[str, str]] = set()
        self._fast: dict[tuple[str, str], _Parameter] = {}  # source -> parameter while live

    # --- run and phase control ---------------------------------------------------------------

    def in_order(self, phase_id: str) -> bool:
        """Whether entering `phase_id` now keeps the protocol's order: it is the first phase
        of a run not yet in one, or the phase after the current one."""
        order = [p.id for p in self.protocol.phases]
        expected = 0 if self.phase is None else order.index(self.phase) + 1
        return expected < len(order) and order[expected] == phase_id

    def enter_phase(self, phase_id: str, t: int, actor: str, reason: str = "") -> list[EngineEvent]:
        """Switch to `phase_id` at `t`. Out of protocol order it needs a reason and opens a
        deviation. Open excursions close at `t` and are re-evaluated against the new limits."""
        if self.ended:
            raise RunError(f"{self._what} has ended")
        order = [p.id for p in self.protocol.phases]
        if phase_id not in order:
            raise RunError(f"unknown phase {phase_id!r} (protocol phases: {', '.join(order)})")
        if phase_id == self.phase:
            raise RunError(f"{self._what} is already in phase {phase_id!r}")
        expected = 0 if self.phase is None else order.index(self.phase) + 1
        in_order = self.in_order(phase_id)
        if not in_order and not reason.strip():
            want = order[expected] if expected < len(order) else "none (last phase)"
            raise RunError(
                f"phase {phase_id!r} is out of protocol order (next is {want}): "
                "an override needs a reason and is recorded as a deviation"
            )
        # Not before what the engine has already judged under the old phase (a device's phase
        # value can arrive stamped earlier than another device's sample already taken).
        t = max([t, *(p.now for p in self._params.values())])
        # A line between runs has no phase record: its standby protocol's audit says it all.
        events: list[EngineEvent] = (
            []
            if self.run_id is None
            else [PhaseChange(self.run_id, t, phase_id, self.phase, actor, in_order, reason)]
        )
        carried, pending = self._close_all(t, events)
        if not in_order:
            events.append(
                self._deviation(
                    t,
                    DeviationCause.PHASE_ORDER,
                    f"phase {phase_id!r} entered out of order after {self.phase!r} by {actor}: "
                    f"{reason}",
                    phase=phase_id,
                )
            )
        self._set_phase(phase_id, t)
        self._reopen(carried, pending, t, events)
        return events

    def resume(
        self,
        phase_id: str,
        phase_started: int,
        t: int,
        *,
        last_seen: Mapping[str, int],
        cumulative: Mapping[tuple[str, str, ExcursionKind], float] = {},
        budget_spent: Iterable[tuple[str, str]] = (),
        ongoing: Mapping[str, tuple[Excursion, bool]] = {},
    ) -> list[EngineEvent]:
        """Take over a run after a restart at `t`. The time since each parameter's last stored
        sample is a gap: it opens as comm-loss and closes with the first fresh sample.

        `ongoing` holds, by parameter, a comm-loss excursion of this phase still open when the
        daemon stopped, and whether a data-loss deviation was raised for it: the outage goes
        on, as the same excursion, instead of a second one opening beside it."""
        self._cumulative.update(cumulative)
        self._budget_spent.update(budget_spent)
        self._set_phase(phase_id, phase_started)
        events: list[EngineEvent] = []
        for param in self._params.values():
            start = max(last_seen.get(param.id, phase_started), phase_started)
            param.seen_t = param.now = start
            if param.limits.monitored:
                if param.id in ongoing:
                    exc, deviated = ongoing[param.id]
                    param.data[ExcursionKind.COMM_LOSS] = _Open(exc, exc.start, deviated=deviated)
                else:
                    self._open_data(param, ExcursionKind.COMM_LOSS, start, events)
                self._settle(param)
        self.tick(t, events)
        return events

    def finish(self, t: int) -> list[EngineEvent]:
        """The run ends at `t`: every open excursion closes; pending breaches never opened."""
        events: list[EngineEvent] = []
        self._close_all(t, events)
        self.ended = True
        self._fast = {}
        return events

    def shift(self, delta: int) -> None:
        """The wall clock jumped by `delta` ns (an NTP step, a manual change, a VM resume)
        while no time passed: move every time the engine measures from by as much, so the
        jump is neither a gap (stale data, data loss, budget spent) nor negative time. The
        records keep the wall times they were made at; a jump is an incident, not a
        deviation."""
        if self.phase_started is not None:
            self.phase_started += delta
        for param in self._params.values():
            param.now += delta
            param.seen_t += delta
            param.value_t += delta
            for cond in param.checks():
                if cond.breach_since is not None:
                    cond.breach_since += delta
                if cond.clear_since is not None:
                    cond.clear_since += delta
                if cond.excursion is not None:
                    cond.excursion.since += delta
            for exc in param.data.values():
                exc.since += delta

    # --- inputs --------------------------------------------------------------------------------

    def on_sample(self, sample: Sample) -> list[EngineEvent]:
        param = self._fast.get((sample.device, sample.point))
        if param is None:
            return _NONE
        t = sample.t
        value = sample.value
        last = param.value
        # The fast path: a valid value inside the tightest band, changing slowly enough, while
        # nothing is pending or open, changes nothing but the last value.
        if (
            param.quiet
            and sample.quality is not _BAD
            and param.inner_low <= value <= param.inner_high
            and t > param.now
            and last is not None
            and abs(value - last) <= param.rate_per_ns * (t - param.value_t)
        ):
            param.value, param.value_t, param.quality = value, t, sample.quality
            param.seen_t = param.now = t
            return _NONE
        events = self._evaluate(param, sample)
        self._settle(param)
        return events

    def on_comm(self, status: CommStatus) -> list[EngineEvent]:
        """A device stopped or resumed answering: comm-loss for every parameter it feeds."""
        events: list[EngineEvent] = []
        if self.ended or self.phase is None:
            return events
        for name in self._by_device.get(status.device, ()):
            param = self._params[name]
            if not param.limits.monitored:
                continue
            self._advance(param, status.t, events)
            if status.ok:
                self._close_data(param, ExcursionKind.COMM_LOSS, status.t, events)
            else:
                self._close_data(param, ExcursionKind.STALE, status.t, events)
                self._open_data(param, ExcursionKind.COMM_LOSS, status.t, events)
            self._settle(param)
        return events

    def tick(self, t: int, events: list[EngineEvent] | None = None) -> list[EngineEvent]:
        """Advance the clock: on/off-delays, staleness, budgets and data-loss deviations."""
        events = [] if events is None else events
        if self.ended or self.phase is None:
            return events
        for param in self._params.values():
            if param.limits.monitored and t > param.now:
                self._advance(param, t, events)
                self._settle(param)
        return events

    # --- queries -------------------------------------------------------------------------------

    @property
    def _what(self) -> str:
        return f"line {self.line} (standby)" if self.run_id is None else f"run {self.run_id}"

    def cumulative(
        self,
        parameter: str | None = None,
        phase: str | None = None,
        kinds: Iterable[ExcursionKind] | None = None,
    ) -> float:
        """Seconds spent in excursions, summed over what matches: per parameter, per phase, per
        run. Kept by its own accounting, apart from the excursions' durations; open excursions
        count up to each parameter's clock (`tick` moves it)."""
        wanted = None if kinds is None else set(kinds)
        return sum(
            seconds
            for (p, ph, kind), seconds in self._cumulative.items()
            if parameter in (None, p) and phase in (None, ph) and (wanted is None or kind in wanted)
        )

    def open_excursions(self) -> list[Excursion]:
        return [
            replace(e.snapshot, worst=e.worst, integral=e.integral) for e in self._open_excursions()
        ]

    def view(self) -> list[ParameterView]:
        return [
            ParameterView(
                parameter=p.id,
                value=p.value,
                quality=p.quality,
                t=p.value_t if p.quality is not None else None,
                limits=p.limits,
                open=tuple(e.snapshot.kind for e in self._param_open(p)),
                pending=tuple(
                    c.kind for c in p.checks() if c.breach_since is not None and c.excursion is None
                ),
            )
            for p in self._params.values()
        ]

    # --- internals -----------------------------------------------------------------------------

    def _set_phase(self, phase_id: str, t: int) -> None:
        phase = self.protocol.phase(phase_id)
        self.phase, self.phase_started = phase_id, t
        for name, spec in self.protocol.parameters.items():
            limits = phase.limits[name]
            old = self._params.get(name)
            param = _Parameter(id=name, critical=spec.critical, limits=limits)
            if old is not None:
                param.value, param.value_t, param.quality = old.value, old.value_t, old.quality
                param.seen_t, param.now = old.seen_t, max(old.now, t)
            else:
                param.seen_t = param.now = t
            if limits.monitored:
                for kind, attr, sign in _THRESHOLDS:
                    limit = getattr(limits, attr)
                    if limit is not None:
                        param.conditions.append(_Condition(kind, limit, sign, limits.deadband))
                        if sign > 0:
                            param.inner_high = min(param.inner_high, limit)
                        else:
                            param.inner_low = max(param.inner_low, limit)
                if limits.max_rate is not None:
                    param.rate = _Condition(ExcursionKind.RATE, limits.max_rate, 1.0, 0.0)
                    param.rate_per_ns = limits.max_rate / _PER_MIN
            self._params[name] = param
        self._fast = {src: self._params[name] for src, name in self._by_source.items()}

    @staticmethod
    def _settle(param: _Parameter) -> None:
        """Recompute whether the fast path may take this parameter's next sample."""
        param.quiet = not param.data and all(c.breach_since is None for c in param.checks())

    def _open_excursions(self) -> list[_Open]:
        return [e for p in self._params.values() for e in self._param_open(p)]

    @staticmethod
    def _param_open(param: _Parameter) -> list[_Open]:
        found = [c.excursion for c in param.checks() if c.excursion is not None]
        return found + list(param.data.values())

    def _close_all(
        self, t: int, events: list[EngineEvent]
    ) -> tuple[list[tuple[str, ExcursionKind, bool]], dict[tuple[str, ExcursionKind], int]]:
        """Close every open excursion at `t`. Returns what was open (parameter, kind, deviated)
        so that a condition that still holds in the next phase can reopen at once, and when
        each pending breach (on-delay running) began, so that its on-delay goes on."""
        carried: list[tuple[str, ExcursionKind, bool]] = []
        pending: dict[tuple[str, ExcursionKind], int] = {}
        for param in self._params.values():
            if param.limits.monitored:
                self._advance(param, t, events)
            for cond in param.checks():
                if cond.excursion is not None:
                    carried.append((param.id, cond.kind, cond.excursion.deviated))
                    self._close(param, cond.excursion, cond.clear_since or t, events)
                elif cond.breach_since is not None:
                    pending[(param.id, cond.kind)] = cond.breach_since
                cond.excursion, cond.breach_since, cond.clear_since = None, None, None
            for kind, exc in list(param.data.items()):
                carried.append((param.id, kind, exc.deviated))
                self._close_data(param, kind, t, events)
        return carried, pending

    def _reopen(
        self,
        carried: list[tuple[str, ExcursionKind, bool]],
        pending: Mapping[tuple[str, ExcursionKind], int],
        t: int,
        events: list[EngineEvent],
    ) -> None:
        for name, kind, deviated in carried:
            param = self._params[name]
            if not param.limits.monitored:
                continue
            if kind in (ExcursionKind.STALE, ExcursionKind.BAD_QUALITY, ExcursionKind.COMM_LOSS):
                self._open_data(param, kind, t, events)
                param.data[kind].deviated = deviated
                continue
            cond = next((c for c in param.conditions if c.kind is kind), None)
            if cond is None or param.value is None or not cond.breached(param.value):
                continue
            # The breach goes on across the change: its on-delay was served already.
            cond.breach_since, cond.held = t, param.value
            cond.excursion = self._open(param, cond, t, t, events, param.value, deviated=deviated)
        for param in self._params.values():
            if param.limits.monitored and param.value is not None and not param.data:
                for cond in param.conditions:
                    if cond.breach_since is None and cond.breached(param.value):
                        # A breach already pending goes on with its on-delay; it opens in this
                        # phase (see `_timers`), with what it accrued here.
                        cond.breach_since = pending.get((param.id, cond.kind), t)
                        cond.held = param.value
                        cond.pending_worst, cond.pending_integral = param.value, 0.0
                        self._timers(param, cond, t, events)
        for param in self._params.values():
            self._settle(param)

    def _evaluate(self, param: _Parameter, sample: Sample) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        t = max(sample.t, param.now)
        monitored = param.limits.monitored
        # The transport's word that the device's value stopped being fresh (an OPC UA source
        # timestamp that does not move): no new data, so a stale excursion, not bad quality.
        stale = sample.quality is Quality.BAD and sample.reason == STALE_REASON
        if monitored:
            self._advance(param, t, events)
            if not stale:
                self._close_data(param, ExcursionKind.STALE, t, events)
        if not stale:
            param.seen_t = t
        if sample.quality is Quality.BAD:
            param.quality = Quality.BAD
            param.value, param.value_t = None, t
            # While the device is lost, its BAD readings are the loss itself, not a new fault.
            if monitored and ExcursionKind.COMM_LOSS not in param.data:
                kind = ExcursionKind.STALE if stale else ExcursionKind.BAD_QUALITY
                self._open_data(param, kind, t, events)
            return events
        if monitored:
            self._close_data(param, ExcursionKind.COMM_LOSS, t, events)
        value = sample.value
        if monitored:
            self._close_data(param, ExcursionKind.BAD_QUALITY, t, events)
            if param.rate is not None and param.value is not None:
                dt = (t - param.value_t) / NS
                if dt > 0:
                    self._check(param, param.rate, abs(value - param.value) / dt * 60.0, t, events)
            for cond in param.conditions:
                self._check(param, cond, value, t, events)
        param.value, param.value_t, param.quality = value, t, sample.quality
        return events

    def _check(
        self, param: _Parameter, cond: _Condition, value: float, t: int, events: list[EngineEvent]
    ) -> None:
        """Apply one new value to one condition (its clock was advanced to `t` already)."""
        if cond.breached(value):
            cond.clear_since = None
            if cond.breach_since is None:
                cond.breach_since, cond.pending_integral, cond.pending_worst = t, 0.0, value
            elif cond.excursion is None:
                cond.pending_worst = cond.worse(cond.pending_worst, value)
            else:
                worst = cond.worse(cond.excursion.worst, value)
                if worst != cond.excursion.worst:
                    cond.excursion.worst = worst
                    events.append(cond.excursion.event(ExcursionChange.UPDATED, t))
        elif cond.excursion is not None:
            if cond.cleared(value):
                if cond.clear_since is None:
                    cond.clear_since = t
            else:
                cond.clear_since = None
        else:
            cond.breach_since = None  # an on-delay needs an unbroken breach
        cond.held = value
        self._timers(param, cond, t, events)

    def _timers(
        self, param: _Parameter, cond: _Condition, t: int, events: list[EngineEvent]
    ) -> None:
        limits = param.limits
        if cond.excursion is None:
            if cond.breach_since is not None and (t - cond.breach_since) / NS >= limits.on_delay:
                worst, integral = cond.pending_worst, cond.pending_integral
                # An excursion belongs to one phase: a breach pending across a phase change
                # opens at the change, once its on-delay (counted from its true start) is up.
                start = max(cond.breach_since, self.phase_started or cond.breach_since)
                cond.excursion = self._open(param, cond, start, t, events, worst, integral)
        elif cond.clear_since is not None and (t - cond.clear_since) / NS >= limits.off_delay:
            self._close(param, cond.excursion, cond.clear_since, events)
            cond.excursion, cond.breach_since, cond.clear_since = None, None, None

    def _advance(self, param: _Parameter, t: int, events: list[EngineEvent]) -> None:
        """Move a parameter's clock to `t`: accumulate integrals and time, run the timers."""
        if t <= param.now:
            return
        dt = (t - param.now) / NS
        fresh = param.value is not None and not param.data
        for cond in param.checks():
            if fresh and cond.breach_since is not None and cond.clear_since is None:
                excess = max(0.0, cond.beyond(cond.held)) * dt
                if cond.excursion is None:
                    cond.pending_integral += excess
                else:
                    cond.excursion.integral += excess
            if fresh or cond.excursion is not None:
                self._timers(param, cond, t, events)
        for kind, exc in param.data.items():
            self._add_time(param.id, kind, exc.since, param.now, t)
        for cond in param.checks():
            if cond.excursion is not None:
                self._add_time(param.id, cond.kind, cond.excursion.since, param.now, t)
        param.now = t
        limits = param.limits
        if (
            limits.stale_after is not None
            and ExcursionKind.COMM_LOSS not in param.data
            and ExcursionKind.STALE not in param.data
            and (t - param.seen_t) / NS > limits.stale_after
        ):
            start = param.seen_t + round(limits.stale_after * NS)
            self._open_data(param, ExcursionKind.STALE, start, events)
        self._check_budget(param, t, events)
        self._check_data_loss(param, t, events)

    def _add_time(self, name: str, kind: ExcursionKind, start: int, frm: int, to: int) -> None:
        assert self.phase is not None
        key = (name, self.phase, kind)
        seconds = (to - max(frm, start)) / NS
        if seconds > 0:
            self._cumulative[key] = self._cumulative.get(key, 0.0) + seconds

    def _check_budget(self, param: _Parameter, t: int, events: list[EngineEvent]) -> None:
        budget = param.limits.budget
        assert self.phase is not None
        if budget is None or (param.id, self.phase) in self._budget_spent:
            return
        kinds = (ExcursionKind.ACTION_LOW, ExcursionKind.ACTION_HIGH)
        spent = sum(self._cumulative.get((param.id, self.phase, k), 0.0) for k in kinds)
        if spent > budget:
            self._budget_spent.add((param.id, self.phase))
            events.append(
                self._deviation(
                    t,
                    DeviationCause.BUDGET_SPENT,
                    f"{param.id}: {spent:.0f} s outside the action limits in phase "
                    f"{self.phase!r}, budget {budget:.0f} s",
                    parameter=param.id,
                )
            )

    def _check_data_loss(self, param: _Parameter, t: int, events: list[EngineEvent]) -> None:
        allowed = param.limits.max_data_loss
        if not param.critical or allowed is None:
            return
        for kind in (ExcursionKind.STALE, ExcursionKind.COMM_LOSS):
            exc = param.data.get(kind)
            if exc is not None and not exc.deviated and (t - exc.since) / NS > allowed:
                exc.deviated = True
                events.append(
                    self._deviation(
                        t,
                        DeviationCause.DATA_LOSS,
                        f"{param.id}: no valid data for over {allowed:.0f} s ({kind.value})",
                        parameter=param.id,
                        excursion_id=exc.snapshot.id,
                    )
                )

    def _open(
        self,
        param: _Parameter,
        cond: _Condition,
        start: int,
        now: int,
        events: list[EngineEvent],
        worst: float | None,
        integral: float = 0.0,
        *,
        deviated: bool = False,
    ) -> _Open:
        snapshot = self._snapshot(param, cond.kind, cond.limit, start)
        exc = _Open(snapshot, start, worst=worst, integral=integral, deviated=deviated)
        # the time between the true start and the parameter's clock was pending: count it
        self._add_time(param.id, cond.kind, start, start, param.now)
        events.append(exc.event(ExcursionChange.OPENED, now))
        if cond.kind.is_action and not deviated:
            exc.deviated = True
            limit = f"{cond.kind.value} limit {cond.limit:g}"
            events.append(
                self._deviation(
                    now,
                    DeviationCause.ACTION_LIMIT,
                    f"{param.id} beyond its {limit} in phase {self.phase!r}",
                    parameter=param.id,
                    excursion_id=exc.snapshot.id,
                )
            )
        return exc

    def _close(self, param: _Parameter, exc: _Open, end: int, events: list[EngineEvent]) -> None:
        self._give_back(param, exc, end)
        events.append(exc.event(ExcursionChange.CLOSED, param.now, end))

    def _give_back(self, param: _Parameter, exc: _Open, end: int) -> None:
        """Time was counted up to the parameter's clock; an excursion that ended earlier (the
        true end of an off-delay, a phase change stamped earlier) gives the rest back. Never
        more than was counted: the end is no earlier than the start."""
        assert self.phase is not None
        overshoot = (param.now - max(end, exc.since)) / NS
        if overshoot > 0:
            key = (param.id, self.phase, exc.snapshot.kind)
            self._cumulative[key] = self._cumulative.get(key, 0.0) - overshoot

    def _open_data(
        self, param: _Parameter, kind: ExcursionKind, start: int, events: list[EngineEvent]
    ) -> None:
        if kind in param.data:
            return
        exc = _Open(self._snapshot(param, kind, None, start), start)
        param.data[kind] = exc
        # what lies between its start and the parameter's clock is counted now, as `_open` does
        self._add_time(param.id, kind, start, start, param.now)
        events.append(exc.event(ExcursionChange.OPENED, param.now))

    def _close_data(
        self, param: _Parameter, kind: ExcursionKind, t: int, events: list[EngineEvent]
    ) -> None:
        exc = param.data.pop(kind, None)
        if exc is not None:
            self._give_back(param, exc, t)
            events.append(exc.event(ExcursionChange.CLOSED, param.now, t))

    def _snapshot(
        self, param: _Parameter, kind: ExcursionKind, limit: float | None, start: int
    ) -> Excursion:
        assert self.phase is not None
        return Excursion(
            id=self.new_id(),
            run_id=self.run_id,
            parameter=param.id,
            kind=kind,
            protocol_id=self.protocol.id,
            protocol_version=self.protocol.version,
            phase=self.phase,
            limit=limit,
            start=start,
            line=self.line,
        )

    def _deviation(
        self,
        t: int,
        cause: DeviationCause,
        description: str,
        *,
        phase: str | None = None,
        parameter: str | None = None,
        excursion_id: str | None = None,
    ) -> Deviation:
        return Deviation(
            id=self.new_id(),
            run_id=self.run_id,
            t=t,
            cause=cause,
            phase=phase or self.phase or "",
            description=description,
            parameter=parameter,
            excursion_id=excursion_id,
            line=self.line,
        )
