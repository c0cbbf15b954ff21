"""Loading and validating site configs, process protocols and driver files (all TOML).

Some 1,300 lines: the config models, their loaders and the messages that name file, key and
device. The load-time checks of a whole site (buses, files) are the next part to move to a
module of their own.

Everything is validated once, at load, with pydantic; unknown keys are errors. Every problem is
reported as a `ConfigProblem` that names the file, the key path and, where one applies, the
device. Paths in a file are relative to that file. The loader checks each device as a whole
and the devices of each shared bus against each other; `check_files` (`pocd check`, the
service's gate) also makes sure that every file a config names can be read and the data
folder written, and warns of settings that work but expose the site. Nothing here opens a
device, a socket or the store.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
import stat
import tomllib
import types
import typing
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pocd.configtypes import (
    ConfigFile,
    Duration,
    PathUse,
    StrictModel,
    config_paths,
    field_path_use,
)
from pocd.errors import ConfigError, ConfigProblem
from pocd.model import MAIN_LINE, AlarmPriority, ExcursionKind
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
from pocd.sinks.config import InfluxSettings
from pocd.sinks.notify.settings import (
    ChannelSettings,
    EmailSettings,
    MqttSettings,
    NotifySection,
    WebhookSettings,
)
from pocd.transports import TRANSPORTS, BusUse, Device, DriverInfo, get_transport

__all__ = [
    "Line",
    "Site",
    "SiteConfig",
    "check_files",
    "driver_dirs",
    "load_driver",
    "load_protocol",
    "load_site",
    "point_lines",
    "protocol_from_text",
    "site_file_problems",
    "site_warnings",
]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ID_RE = re.compile(_ID)
_ID_RULE = "must start with a letter or digit and use only letters, digits, '.', '_' and '-'"
_LIMIT_FIELDS = ("alert_low", "alert_high", "action_low", "action_high")


# --- protocol files ------------------------------------------------------------------------


class LimitSpec(StrictModel):
    """Limits as written in a file. Unset keys fall back to the parameter's defaults."""

    monitored: bool = True
    alert_low: float | None = None
    alert_high: float | None = None
    action_low: float | None = None
    action_high: float | None = None
    deadband: float = Field(default=0.0, ge=0)
    on_delay: Duration = 0.0
    off_delay: Duration = 0.0
    max_rate: float | None = Field(default=None, gt=0)
    stale_after: Duration | None = None
    budget: Duration | None = None
    max_data_loss: Duration | None = None

    @model_validator(mode="after")
    def _ordered(self) -> LimitSpec:
        check_limit_order(self)
        return self


def check_limit_order(spec: LimitSpec) -> None:
    for tier in ("alert", "action"):
        low, high = getattr(spec, f"{tier}_low"), getattr(spec, f"{tier}_high")
        if low is not None and high is not None and low >= high:
            raise ValueError(f"{tier}_low ({low}) must be below {tier}_high ({high})")
    if (
        spec.alert_low is not None
        and spec.action_low is not None
        and spec.alert_low < spec.action_low
    ):
        raise ValueError(
            f"alert_low ({spec.alert_low}) is wider than action_low ({spec.action_low}): "
            "alert limits must lie inside the action limits"
        )
    if (
        spec.alert_high is not None
        and spec.action_high is not None
        and spec.alert_high > spec.action_high
    ):
        raise ValueError(
            f"alert_high ({spec.alert_high}) is wider than action_high ({spec.action_high}): "
            "alert limits must lie inside the action limits"
        )


def _as_priority(value: object) -> AlarmPriority:
    return _choice(AlarmPriority, value)


_Priority = Annotated[AlarmPriority, BeforeValidator(_as_priority)]
# The kinds of a parameter's alarms; comm-loss is a device's (the site's alarms.comm_loss_priority)
_PARAMETER_KINDS = tuple(k.value for k in ExcursionKind if k is not ExcursionKind.COMM_LOSS)


class AlarmSpec(StrictModel):
    """A parameter's alarm properties (`[parameters.<name>.alarm]`): `priority` for every kind
    of its alarms, `priorities` over it for some (keyed by kind: "action-high", "rate", ...),
    `standby_priority` while the line has no run, `latching` (a returned alarm waits for a
    reset), `realarm` (an acknowledged alarm still active after it alarms again) and a
    first-out `group`. What is left out takes its default, as without the table."""

    priority: _Priority | None = None
    priorities: dict[str, _Priority] = Field(default_factory=dict)
    standby_priority: _Priority | None = None
    latching: bool = False
    realarm: Duration | None = Field(default=None, gt=0)
    group: str | None = Field(default=None, pattern=_ID)

    @field_validator("priorities")
    @classmethod
    def _kinds(cls, value: dict[str, AlarmPriority]) -> dict[str, AlarmPriority]:
        for kind in value:
            if kind == ExcursionKind.COMM_LOSS.value:
                raise ValueError(
                    "comm-loss is an alarm of the device, not of a parameter: set its priority "
                    "in the site config's [alarms] comm_loss_priority"
                )
            if kind not in _PARAMETER_KINDS:
                close = difflib.get_close_matches(kind.replace("_", "-"), _PARAMETER_KINDS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"{_unknown('alarm kind', kind)} ({hint}kinds: {', '.join(_PARAMETER_KINDS)})"
                )
        return value

    def properties(self) -> AlarmProperties:
        return AlarmProperties(
            priority=self.priority,
            priorities=dict(self.priorities),
            standby_priority=self.standby_priority,
            latching=self.latching,
            realarm=self.realarm,
            group=self.group,
        )


class ParameterSpec(StrictModel):
    unit: str
    critical: bool = False
    description: str = ""
    limits: LimitSpec = LimitSpec()  # defaults for every phase
    alarm: AlarmSpec = AlarmSpec()


class PhaseSpec(StrictModel):
    id: str = Field(pattern=_ID)
    title: str = ""
    description: str = ""
    expected_duration: Duration | None = None
    limits: dict[str, LimitSpec] = Field(default_factory=dict)


class ProtocolFile(StrictModel):
    id: str = Field(pattern=_ID)
    version: str = Field(min_length=1)
    title: str
    status: ProtocolStatus
    # batch: a run's protocol; standby: a line's equipment monitoring between runs
    kind: ProtocolKind = ProtocolKind.BATCH
    product: str = ""
    description: str = ""
    approved_by: str = ""
    approved_on: date | None = None
    parameters: dict[str, ParameterSpec] = Field(min_length=1)
    phases: list[PhaseSpec] = Field(min_length=1)

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: object) -> ProtocolStatus:
        return _choice(ProtocolStatus, value)

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: object) -> ProtocolKind:
        return _choice(ProtocolKind, value)


_Choice = typing.TypeVar("_Choice", bound=StrEnum)


def _choice(enum: type[_Choice], value: object) -> _Choice:
    known = [member.value for member in enum]
    if isinstance(value, str) and value in known:
        return enum(value)
    raise ValueError(f"must be one of {', '.join(map(repr, known))} (got {value!r})")


def _resolve_limits(default: LimitSpec, override: LimitSpec | None) -> Limits:
    merged = default.model_dump()
    if override is not None:
        merged.update({k: getattr(override, k) for k in override.model_fields_set})
    spec = LimitSpec.model_validate(merged)  # re-checks order after the merge
    return Limits(**spec.model_dump())


def _protocol_problems(path: str, spec: ProtocolFile) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = [
        ConfigProblem(path, f"parameters.{name}", f"parameter id {name!r} {_ID_RULE}")
        for name in spec.parameters
        if not _ID_RE.fullmatch(name)
    ]
    seen: dict[str, int] = {}
    for i, phase in enumerate(spec.phases):
        if phase.id in seen:
            problems.append(
                ConfigProblem(
                    path,
                    f"phases[{i}].id",
                    f"duplicate phase {phase.id!r} (also phases[{seen[phase.id]}])",
                )
            )
        seen.setdefault(phase.id, i)
        for name, override in phase.limits.items():
            key = f"phases[{i}].limits.{name}"
            if name not in spec.parameters:
                known = ", ".join(sorted(spec.parameters))
                problems.append(
                    ConfigProblem(
                        path,
                        key,
                        f"unknown parameter {name!r} in phase {phase.id!r} (known: {known})",
                    )
                )
                continue
            try:
                _resolve_limits(spec.parameters[name].limits, override)
            except ValidationError as exc:
                msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                problems.append(
                    ConfigProblem(
                        path,
                        key,
                        f"{msg} (phase {phase.id!r} over the defaults in parameters.{name}.limits)",
                    )
                )
    return problems


def load_protocol(path: str | Path) -> Protocol:
    """Load, validate and resolve one protocol file. Raises ConfigError."""
    name = str(path)
    return protocol_from_text(_read_text(name), name)


def protocol_from_text(text: str, name: str) -> Protocol:
    """Validate and resolve a protocol from the text of its file (as the store keeps it);
    `name` says where it came from in messages. Raises ConfigError."""
    doc = _parse_toml(text, name)
    spec = _validate(ProtocolFile, doc, name)
    problems = _protocol_problems(name, spec)
    if problems:
        raise ConfigError(problems)
    phases = tuple(
        Phase(
            id=p.id,
            title=p.title or p.id,
            expected_duration=p.expected_duration,
            limits={
                n: _resolve_limits(ps.limits, p.limits.get(n)) for n, ps in spec.parameters.items()
            },
        )
        for p in spec.phases
    )
    return Protocol(
        id=spec.id,
        version=spec.version,
        title=spec.title,
        status=spec.status,
        hash=canonical_hash(doc),
        parameters={
            n: Parameter(
                id=n,
                unit=ps.unit,
                critical=ps.critical,
                description=ps.description,
                alarm=ps.alarm.properties(),
            )
            for n, ps in spec.parameters.items()
        },
        phases=phases,
        source=name,
        kind=spec.kind,
        text=text,
    )


# --- driver files --------------------------------------------------------------------------


class DriverHeader(StrictModel):
    transport: str
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    manual: str = ""


class DriverFile(StrictModel):
    driver: DriverHeader
    defaults: dict[str, Any] = Field(default_factory=dict)
    points: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Driver:
    info: DriverInfo
    defaults: Mapping[str, Any]
    points: Mapping[str, Mapping[str, Any]]


def driver_dirs(extra: Iterable[Path] = ()) -> list[Path]:
    """Where driver files are looked up: the site's own folder first, then the shipped ones."""
    here = Path(__file__).parent
    shipped = [here / "_drivers", here.parent / "drivers"]  # wheel, then source checkout
    return [*extra, *(d for d in shipped if d.is_dir())]


def load_driver(name: str, dirs: Iterable[Path] = ()) -> Driver:
    """Find `<name>.toml` in the driver folders and check it against its transport."""
    for folder in driver_dirs(dirs):
        path = folder / f"{name}.toml"
        if path.is_file():
            break
    else:
        known = sorted({p.stem for d in driver_dirs(dirs) for p in d.glob("*.toml")})
        raise KeyError(f"unknown driver {name!r} (known: {', '.join(known)})")
    file = str(path)
    doc = _read_toml(file)
    spec = _validate(DriverFile, doc, file)
    if spec.driver.transport not in TRANSPORTS:
        raise ConfigError(
            [ConfigProblem(file, "driver.transport", _unknown("transport", spec.driver.transport))]
        )
    transport = get_transport(spec.driver.transport)
    _validate(transport.settings, spec.defaults, file, prefix="defaults")
    for point, body in spec.points.items():
        _validate(transport.point, body, file, prefix=f"points.{point}")
    info = DriverInfo(
        id=name,
        transport=spec.driver.transport,
        manufacturer=spec.driver.manufacturer,
        model=spec.driver.model,
        description=spec.driver.description,
        source=file,
        hash=canonical_hash(doc),
    )
    return Driver(info=info, defaults=spec.defaults, points=spec.points)


# --- site config ---------------------------------------------------------------------------


class SiteSection(StrictModel):
    id: str = Field(pattern=_ID)
    name: str
    timezone: str
    control_site: str = Field(pattern=_ID)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
        return value


# Samples wait in memory for at most flush_interval before they are committed: a crash loses
# them. Shorter than the floor, the store writer would commit without pause (a core at 100 %).
FLUSH_INTERVAL_MIN = 0.01
FLUSH_INTERVAL_MAX = 10.0


class StoreSection(StrictModel):
    data_dir: str = "data"  # relative to the config file
    flush_interval: Duration = 0.2
    batch_size: int = Field(default=20_000, ge=1)
    # The chain's head is signed with the site key this often (pocd.store.chain checkpoints).
    checkpoint_every: Duration = Field(default=60.0, gt=0)

    @field_validator("flush_interval")
    @classmethod
    def _flush_interval(cls, value: float) -> float:
        if value < FLUSH_INTERVAL_MIN:
            raise ValueError(
                f"{value:g} s would commit without pause and keep a core busy: at least "
                f"{FLUSH_INTERVAL_MIN * 1000:g}ms (the default, 200ms, suits most sites)"
            )
        if value > FLUSH_INTERVAL_MAX:
            raise ValueError(
                f"{value:g} s of samples would wait in memory, lost if the daemon crashes: at "
                f"most {FLUSH_INTERVAL_MAX:g}s (the default, 200ms, suits most sites)"
            )
        return value


# The read endpoints that may be served to callers without a login (`api.public`), by name;
# the API's route table says which paths each is (pocd.api.http).
PublicRead = Literal["metrics", "health", "openapi", "status", "lines", "runs"]


def _default_public() -> list[PublicRead]:
    return ["metrics", "health", "openapi"]


class ApiSection(StrictModel):
    """The control API: a plain listener (loopback by default) and an optional TLS one, for
    clients on other machines (the QP's, the control site's)."""

    listen: str = "127.0.0.1:8470"
    tls_listen: str | None = None  # host:port of the TLS listener, with tls_cert and tls_key
    tls_cert: ConfigFile | None = None  # PEM certificate chain
    tls_key: ConfigFile | None = None  # PEM private key
    # Read endpoints served without a login; every other request needs one.
    public: list[PublicRead] = Field(default_factory=_default_public)

    @field_validator("listen", "tls_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        if not (_valid_host(host) and re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
            raise ValueError(
                f"{value!r} is not host:port, such as 127.0.0.1:8470, [::1]:8470 or localhost:8470"
            )
        return value

    @model_validator(mode="after")
    def _tls_is_whole(self) -> ApiSection:
        given = [self.tls_listen is not None, self.tls_cert is not None, self.tls_key is not None]
        if any(given) and not all(given):
            raise ValueError("tls_listen, tls_cert and tls_key are given together or not at all")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The server context of the TLS listener (None without one); ValueError naming the
        keys when the certificate and key cannot be loaded."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"api.tls_cert / api.tls_key ({self.tls_cert}, {self.tls_key}): cannot load: {exc}"
            ) from None
        return context

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _valid_host(host: str) -> bool:
    """An IPv4 address, a bracketed IPv6 address or a host name (bare IPv6 is ambiguous)."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    return re.fullmatch(rf"{label}(?:\.{label})*", host) is not None


class AccessSection(StrictModel):
    """Named users' sessions and logins (21 CFR 11.10(d), 11.300): how long a session lasts
    idle and at most, and when failed logins lock an account or slow an address."""

    session_idle: Duration = 900.0  # 15 min without a request ends a session
    session_max: Duration = 12 * 3600.0  # a shift: log in again after it
    lockout_after: int = Field(5, ge=1, le=100)  # failed logins of a user within `window`
    lockout: Duration = 900.0  # how long a locked account stays locked (an admin may unlock)
    address_limit: int = Field(20, ge=1, le=10_000)  # failed logins from one address in `window`
    window: Duration = 900.0
    password_min: int = Field(12, ge=8, le=128)


class AlarmsSection(StrictModel):
    """The site's alarm handling (ISA-18.2): the longest shelve, the priorities whose
    acknowledgement needs a note, when the KPIs count an alarm as standing or left
    unacknowledged, and the priority of a device's comm-loss alarm."""

    max_shelve: Duration = Field(default=8 * 3600.0, gt=0)
    note_required: list[_Priority] = Field(default_factory=lambda: [AlarmPriority.CRITICAL])
    unacknowledged_after: Duration = Field(default=600.0, gt=0)
    standing_after: Duration = Field(default=1800.0, gt=0)
    comm_loss_priority: _Priority = AlarmPriority.HIGH


class ProtocolsSection(StrictModel):
    dir: str = "protocols"  # relative to the config file


class PhaseSourceSection(StrictModel):
    """A device point that drives the run's phase: its value (as text) maps to a phase id."""

    device: str
    point: str
    phases: dict[str, str] = Field(min_length=1)


class RunSection(StrictModel):
    phase_source: PhaseSourceSection | None = None  # of the one line of a site without lines


class LineSection(StrictModel):
    """A line (an ISA-88 unit): the equipment one batch at a time runs on. It uses whole
    devices, or some points of a device (a shared incubator's temperature); a device may be
    in several lines. `standby` names the standby protocol whose limits apply whenever the
    line has no run."""

    id: str = Field(pattern=_ID)
    title: str = ""
    devices: list[str] = Field(default_factory=list)  # every point of these
    points: dict[str, list[str]] = Field(default_factory=dict)  # device -> some of its points
    standby: str | None = None  # the id of an approved standby protocol
    phase_source: PhaseSourceSection | None = None


class DeviceSection(StrictModel):
    id: str = Field(pattern=_ID)
    driver: str = Field(pattern=_ID)  # a file name in the driver folders, never a path
    enabled: bool = True
    title: str = ""
    serial_number: str = ""
    firmware: str = ""
    calibration_due: date | None = None
    transport: dict[str, Any] = Field(default_factory=dict)  # over the driver's defaults
    points: dict[str, dict[str, Any]] = Field(default_factory=dict)  # over/beside the driver's


def _table_or_tables(value: object) -> object:
    """`[sinks.influxdb]` (one table) reads as `[[sinks.influxdb]]` with one entry."""
    return [value] if isinstance(value, dict) else value


class SinksSection(StrictModel):
    """Forwarders that read the store by cursor (pocd.sinks). `[sinks.influxdb]` forwards to
    one InfluxDB, `[[sinks.influxdb]]` to several, each with its own `name`; the notification
    channels (`[[sinks.email]]`, `[[sinks.webhook]]`, `[[sinks.mqtt]]`) are sent what the
    routes of `[notify]` give them."""

    influxdb: Annotated[list[InfluxSettings], BeforeValidator(_table_or_tables)] = Field(
        default_factory=list
    )
    email: Annotated[list[EmailSettings], BeforeValidator(_table_or_tables)] = Field(
        default_factory=list
    )
    webhook: Annotated[list[WebhookSettings], BeforeValidator(_table_or_tables)] = Field(
        default_factory=list
    )
    mqtt: Annotated[list[MqttSettings], BeforeValidator(_table_or_tables)] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _unique_names(self) -> SinksSection:
        seen: dict[str, str] = {}
        for section in type(self).model_fields:
            for i, sink in enumerate(getattr(self, section)):
                where = f"{section}[{i}]"
                if sink.name in seen:
                    raise ValueError(
                        f"{where}.name: sink name {sink.name!r} is also used by "
                        f"{seen[sink.name]}; give each sink its own name (it keys the "
                        "sink's cursor in the store)"
                    )
                seen[sink.name] = where
        return self

    def channels(self) -> list[ChannelSettings]:
        """The notification channels, enabled or not."""
        return [*self.email, *self.webhook, *self.mqtt]


class SiteConfig(StrictModel):
    site: SiteSection
    store: StoreSection = StoreSection()
    api: ApiSection = ApiSection()
    access: AccessSection = AccessSection()
    alarms: AlarmsSection = AlarmsSection()
    protocols: ProtocolsSection = ProtocolsSection()
    run: RunSection = RunSection()
    drivers_dir: str | None = None
    devices: list[DeviceSection] = Field(default_factory=list)
    lines: list[LineSection] = Field(default_factory=list)
    sinks: SinksSection = SinksSection()
    notify: NotifySection = NotifySection()

    @field_validator("notify")
    @classmethod
    def _routes_name_what_exists(cls, notify: NotifySection, info: ValidationInfo) -> NotifySection:
        sinks = info.data.get("sinks")
        if not isinstance(sinks, SinksSection):
            return notify  # the sinks have their own problem, reported as such
        channels = {c.name for c in sinks.channels()}
        lines = {line.id for line in info.data.get("lines", [])} or {MAIN_LINE}
        devices = {device.id for device in info.data.get("devices", [])}
        for i, route in enumerate(notify.routes):
            for what, named, known in (
                ("channel", route.channel_names(), channels),
                ("line", set(route.lines), lines),
                ("device", set(route.devices), devices),
            ):
                unknown = sorted(named - known)
                if not unknown:
                    continue
                listed = ", ".join(sorted(known)) or "none"
                if what == "channel" and not known:
                    listed = "none: add [[sinks.email]], [[sinks.webhook]] or [[sinks.mqtt]]"
                raise ValueError(
                    f"routes[{i}] ({route.name}): no {what} {', '.join(unknown)} "
                    f"({what}s: {listed})"
                )
        return notify


@dataclass(frozen=True, slots=True)
class Line:
    """A resolved line: its points (of enabled devices) and the parameters they feed on it."""

    id: str
    title: str
    points: frozenset[tuple[str, str]]  # (device, point)
    sources: Mapping[str, tuple[str, str]]  # parameter -> the (device, point) feeding it here
    standby: str | None = None  # the id of its standby protocol
    phase_source: PhaseSourceSection | None = None

    @property
    def devices(self) -> list[str]:
        return sorted({device for device, _ in self.points})


def point_lines(lines: Iterable[Line]) -> dict[tuple[str, str], str]:
    """(device, point) -> the line of every point that belongs to exactly one of `lines`."""
    found: dict[tuple[str, str], list[str]] = {}
    for line in lines:
        for point in line.points:
            found.setdefault(point, []).append(line.id)
    return {point: ids[0] for point, ids in found.items() if len(ids) == 1}


@dataclass(frozen=True, slots=True)
class Site:
    """A loaded site: its config, devices resolved over their drivers, its protocols and
    lines (one line, `MAIN_LINE`, holding every device when the config declares none)."""

    path: Path
    config: SiteConfig
    devices: Mapping[str, Device]
    protocols: Mapping[tuple[str, str], Protocol]
    config_hash: str
    lines: Mapping[str, Line] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.config.site.id

    @property
    def data_dir(self) -> Path:
        return self.path.parent / self.config.store.data_dir

    @property
    def store_path(self) -> Path:
        return self.data_dir / "pocd.sqlite"

    def point_parameters(self) -> dict[tuple[str, str], str]:
        """(device, point) -> parameter for every enabled point that feeds one."""
        return {
            (device.id, name): point.parameter
            for device in self.devices.values()
            for name, point in device.points.items()
            if point.parameter
        }

    def parameter_source(self) -> dict[str, tuple[str, str]]:
        """parameter -> (device, point) of a site without lines (with lines, a parameter may
        be fed by one point per line: see `Line.sources` and `point_parameters`)."""
        return {parameter: point for point, parameter in self.point_parameters().items()}

    def point_lines(self) -> dict[tuple[str, str], str]:
        """(device, point) -> the line of every point that belongs to exactly one line."""
        return point_lines(self.lines.values())

    def protocol(self, protocol_id: str, version: str | None = None) -> Protocol:
        """The protocol of that id and version; without a version, the approved one."""
        if version is not None:
            return self.protocols[(protocol_id, version)]
        approved = [
            p
            for p in self.protocols.values()
            if p.id == protocol_id and p.status is ProtocolStatus.APPROVED
        ]
        if len(approved) != 1:
            raise KeyError(protocol_id)
        return approved[0]


def load_site(path: str | Path) -> Site:
    """Load a site config with its devices and protocols. Raises ConfigError with every problem."""
    file = str(path)
    doc = _read_toml(file)
    base = Path(file).resolve().parent
    config = _validate(SiteConfig, doc, file, base=base)
    problems: list[ConfigProblem] = []

    protocols, protocols_complete = _load_protocols(file, base / config.protocols.dir, problems)
    parameters = {n for p in protocols.values() for n in p.parameters}
    units: dict[str, set[str]] = {}  # parameter -> the units the protocols give it
    for proto in protocols.values():
        for name, param in proto.parameters.items():
            units.setdefault(name, set()).add(param.unit)

    extra_dirs: list[Path] = []
    if config.drivers_dir is not None:
        extra_dirs.append(base / config.drivers_dir)
        if not extra_dirs[0].is_dir():
            problems.append(ConfigProblem(file, "drivers_dir", f"no such folder: {extra_dirs[0]}"))
    devices: dict[str, Device] = {}
    seen: dict[str, int] = {}  # every device id, enabled or not, valid or not
    fed: dict[str, str] = {}
    for i, section in enumerate(config.devices):
        where = f"devices[{i}]"
        if section.id in seen:
            problems.append(
                ConfigProblem(
                    file,
                    f"{where}.id",
                    f"duplicate device id (also devices[{seen[section.id]}])",
                    device=section.id,
                )
            )
            continue
        seen[section.id] = i
        try:
            device = _resolve_device(file, where, section, extra_dirs, base)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        for name, point in device.points.items():
            if point.parameter is None:
                continue
            key = f"{where}.points.{name}.parameter"
            if point.parameter not in parameters:
                if protocols_complete:
                    known = ", ".join(sorted(parameters)) or "no protocol loaded"
                    problems.append(
                        ConfigProblem(
                            file,
                            key,
                            f"{_unknown('parameter', point.parameter)} (known: {known})",
                            device=section.id,
                        )
                    )
            elif point.unit and {point.unit} != units[point.parameter]:
                want = " or ".join(repr(u) for u in sorted(units[point.parameter]))
                problems.append(
                    ConfigProblem(
                        file,
                        f"{where}.points.{name}.unit",
                        f"unit {point.unit!r}, but the protocols give {point.parameter!r} in "
                        f"{want}: scale the point and set its unit",
                        device=section.id,
                    )
                )
            elif point.parameter in fed and not config.lines:  # with lines: per line
                problems.append(
                    ConfigProblem(
                        file,
                        key,
                        f"parameter {point.parameter!r} is already fed by {fed[point.parameter]}",
                        device=section.id,
                    )
                )
            fed[point.parameter] = f"{section.id}.{name} ({where})"
        if section.enabled:
            devices[section.id] = device

    problems += _bus_problems(file, devices, seen)
    loaded = protocols if protocols_complete else None
    if config.run.phase_source is not None:
        problems += _phase_source_problems(
            file, "run.phase_source", config.run.phase_source, devices, config.devices, loaded
        )
    lines = _resolve_lines(file, config, devices, loaded, problems)
    if problems:
        raise ConfigError(problems)
    return Site(
        path=Path(file).resolve(),
        config=config,
        devices=devices,
        protocols=protocols,
        config_hash=canonical_hash(doc),
        lines=lines,
    )


def _resolve_lines(
    file: str,
    config: SiteConfig,
    devices: Mapping[str, Device],
    protocols: Mapping[tuple[str, str], Protocol] | None,
    problems: list[ConfigProblem],
) -> dict[str, Line]:
    """The site's lines; without `[[lines]]`, one line holding every device. Appends to
    `problems`. `protocols` is None when some failed to load (standby ids are then not
    checked)."""
    if not config.lines:
        every = frozenset((d.id, name) for d in devices.values() for name in d.points)
        title = config.site.name or config.site.id
        return {MAIN_LINE: _line(MAIN_LINE, title, every, devices, config.run.phase_source)}
    if config.run.phase_source is not None:
        problems.append(
            ConfigProblem(
                file,
                "run.phase_source",
                "with [[lines]], each line has its own phase_source (lines[N].phase_source)",
            )
        )
    declared = {section.id: section.enabled for section in config.devices}
    lines: dict[str, Line] = {}
    for i, section in enumerate(config.lines):
        where = f"lines[{i}]"
        if section.id in lines:
            problems.append(ConfigProblem(file, f"{where}.id", f"duplicate line {section.id!r}"))
            continue
        wanted: list[tuple[str, str, list[str] | None]] = [
            (f"{where}.devices[{j}]", d, None) for j, d in enumerate(section.devices)
        ]
        wanted += [(f"{where}.points.{d}", d, names) for d, names in section.points.items()]
        points: set[tuple[str, str]] = set()
        for key, device_id, names in wanted:
            if device_id not in declared:
                known = ", ".join(declared) or "none"
                problems.append(
                    ConfigProblem(file, key, f"{_unknown('device', device_id)} (known: {known})")
                )
                continue
            device = devices.get(device_id)
            if device is None:  # disabled, or invalid (reported already): it feeds nothing
                continue
            for name in device.points if names is None else names:
                if name not in device.points:
                    known = ", ".join(sorted(device.points)) or "none"
                    problems.append(
                        ConfigProblem(
                            file,
                            key,
                            f"{_unknown('point', name)} (points of the device: {known})",
                            device=device_id,
                        )
                    )
                    continue
                points.add((device_id, name))
        if section.phase_source is not None:
            problems += _phase_source_problems(
                file,
                f"{where}.phase_source",
                section.phase_source,
                devices,
                config.devices,
                protocols,
            )
        if section.standby is not None and protocols is not None:
            standby = [
                p
                for p in protocols.values()
                if p.id == section.standby and p.status is ProtocolStatus.APPROVED
            ]
            if len(standby) != 1 or standby[0].kind is not ProtocolKind.STANDBY:
                problems.append(
                    ConfigProblem(
                        file,
                        f"{where}.standby",
                        f"no approved standby protocol {section.standby!r} (a protocol file "
                        'with kind = "standby" and status = "approved")',
                    )
                )
        line = _line(section.id, section.title or section.id, frozenset(points), devices)
        lines[section.id] = replace(
            line, standby=section.standby, phase_source=section.phase_source
        )
        problems += _fed_twice(file, where, points, devices)
    return lines


def _line(
    line_id: str,
    title: str,
    points: frozenset[tuple[str, str]],
    devices: Mapping[str, Device],
    phase_source: PhaseSourceSection | None = None,
) -> Line:
    sources = {
        parameter: (device, name)
        for device, name in sorted(points)
        if (parameter := devices[device].points[name].parameter)
    }
    return Line(line_id, title, points, sources, phase_source=phase_source)


def _fed_twice(
    file: str, where: str, points: Iterable[tuple[str, str]], devices: Mapping[str, Device]
) -> list[ConfigProblem]:
    """A parameter fed by two points of one line: the line's engine could not tell which."""
    fed: dict[str, str] = {}
    problems = []
    for device, name in sorted(points):
        point = devices[device].points.get(name)
        if point is None or not point.parameter:
            continue
        if point.parameter in fed:
            problems.append(
                ConfigProblem(
                    file,
                    where,
                    f"parameter {point.parameter!r} is fed by both {fed[point.parameter]} and "
                    f"{device}.{name} on this line",
                    device=device,
                )
            )
        fed[point.parameter] = f"{device}.{name}"
    return problems


def _load_protocols(
    file: str, folder: Path, problems: list[ConfigProblem]
) -> tuple[dict[tuple[str, str], Protocol], bool]:
    """Every protocol in the folder, and whether all of them loaded. Appends to `problems`."""
    protocols: dict[tuple[str, str], Protocol] = {}
    complete = True  # False when a protocol file failed: the names it defines are unknown
    if not folder.is_dir():
        problems.append(ConfigProblem(file, "protocols.dir", f"no such folder: {folder}"))
        return protocols, False
    for proto_path in sorted(folder.glob("*.toml")):
        try:
            proto = load_protocol(proto_path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            complete = False
            continue
        if proto.key in protocols:
            problems.append(
                ConfigProblem(
                    str(proto_path),
                    "id",
                    f"{proto.id} {proto.version} is also defined in {protocols[proto.key].source}",
                )
            )
            continue
        protocols[proto.key] = proto
    return protocols, complete


def _phase_source_problems(
    file: str,
    at: str,
    source: PhaseSourceSection,
    devices: Mapping[str, Device],
    sections: Iterable[DeviceSection],
    protocols: Mapping[tuple[str, str], Protocol] | None,
) -> list[ConfigProblem]:
    """Problems of a phase source (at key `at`). `devices` are the enabled, valid ones.

    `protocols` is None when some failed to load: phase ids are then not checked.
    """
    problems: list[ConfigProblem] = []
    declared = {section.id: section.enabled for section in sections}
    if source.device not in declared:
        problems.append(
            ConfigProblem(
                file,
                f"{at}.device",
                f"{_unknown('device', source.device)} (known: {', '.join(declared) or 'none'})",
            )
        )
    elif not declared[source.device]:
        problems.append(
            ConfigProblem(
                file,
                f"{at}.device",
                "the device is disabled (enabled = false)",
                device=source.device,
            )
        )
    elif source.device in devices and source.point not in devices[source.device].points:
        # (a device missing from `devices` is invalid, and that is reported already)
        known = ", ".join(sorted(devices[source.device].points)) or "none"
        problems.append(
            ConfigProblem(
                file,
                f"{at}.point",
                f"{_unknown('point', source.point)} (points of the device: {known})",
                device=source.device,
            )
        )
    if protocols is None:
        return problems
    phase_ids = {ph.id for p in protocols.values() for ph in p.phases}
    problems.extend(
        ConfigProblem(
            file,
            f"{at}.phases.{value}",
            f"{_unknown('phase', phase_id)}: no protocol has a phase of that id",
        )
        for value, phase_id in source.phases.items()
        if phase_id not in phase_ids
    )
    return problems


def _bus_problems(
    file: str, devices: Mapping[str, Device], index: Mapping[str, int]
) -> list[ConfigProblem]:
    """Clashes between the (enabled, valid) devices that share a bus: two protocols on one
    port (Modbus RTU beside serial ASCII), other line settings, one address twice, a device
    that must be alone. Each is reported at the later device, naming the earlier one."""
    problems: list[ConfigProblem] = []
    on_bus: dict[str, list[tuple[Device, BusUse]]] = {}
    for device in devices.values():
        bus_of = get_transport(device.driver.transport).bus
        use = bus_of(device) if bus_of is not None else None
        if use is None:
            continue
        where = f"devices[{index[device.id]}]"
        for other, theirs in on_bus.get(use.bus, []):
            them = f"{other.id!r} (devices[{index[other.id]}])"
            key, message = "", ""
            if use.protocol != theirs.protocol:
                key = use.bus_key
                message = (
                    f"{use.bus} carries {theirs.protocol} for {them}; a port speaks one "
                    f"protocol, so {use.protocol} cannot share it"
                )
            elif use.alone or theirs.alone:
                key = use.bus_key
                alone = "this device streams" if use.alone else f"{them} streams"
                message = (
                    f'{use.bus} is also used by {them}, but {alone} (mode = "stream"): a '
                    "streaming device must be alone on its port, its lines carry no address"
                )
            elif use.line != theirs.line:
                key = "transport"
                message = (
                    f"line settings {use.line} on {use.bus} differ from {theirs.line} of "
                    f"{them}: every device on a bus has the same"
                )
            elif use.address == theirs.address:
                key = use.address_key
                message = f"{use.address} on {use.bus} is already used by {them}"
            if message:
                problems.append(ConfigProblem(file, f"{where}.{key}", message, device=device.id))
                break
        else:
            on_bus.setdefault(use.bus, []).append((device, use))
    return problems


def _resolve_device(
    file: str, where: str, section: DeviceSection, extra_dirs: list[Path], base: Path
) -> Device:
    """The device over its driver. Raises ConfigError with every problem of this device."""
    try:
        driver = load_driver(section.driver, extra_dirs)
    except KeyError as exc:
        raise ConfigError(
            [ConfigProblem(file, f"{where}.driver", str(exc.args[0]), device=section.id)]
        ) from None
    except ConfigError as exc:
        # The problem is in the driver file; say which device brought it in.
        for problem in exc.problems:
            problem.device = problem.device or section.id
        raise
    transport = get_transport(driver.info.transport)
    problems: list[ConfigProblem] = []
    # Paths the driver file gives are relative to the driver file; the site's to the site's.
    defaults = _paths_against(transport.settings, driver.defaults, Path(driver.info.source))
    try:
        settings = _validate(
            transport.settings,
            {**defaults, **section.transport},
            file,
            prefix=f"{where}.transport",
            device=section.id,
            base=base,
        )
    except ConfigError as exc:
        problems.extend(exc.problems)
    points = {}
    for name in {**driver.points, **section.points}:
        body = {**driver.points.get(name, {}), **section.points.get(name, {})}
        try:
            points[name] = _validate(
                transport.point, body, file, prefix=f"{where}.points.{name}", device=section.id
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    device = Device(
        id=section.id,
        driver=driver.info,
        settings=settings,
        points=points,
        title=section.title or driver.info.model or section.id,
        serial_number=section.serial_number,
        firmware=section.firmware,
        calibration_due=section.calibration_due,
    )
    if transport.check is not None:
        problems = [
            ConfigProblem(file, f"{where}.{key}", message, device=section.id)
            for key, message in transport.check(device)
        ]
        if problems:
            raise ConfigError(problems)
    return device


def _paths_against(
    model: type[StrictModel], table: Mapping[str, Any], source: Path
) -> dict[str, Any]:
    """`table` with the relative paths among its keys made absolute against `source`'s folder."""
    folder = source.resolve().parent
    out = dict(table)
    for name, info in model.model_fields.items():
        value = out.get(name)
        if (
            isinstance(value, str)
            and field_path_use(info) is not None
            and "://" not in value
            and not Path(value).is_absolute()
        ):
            out[name] = str(folder / value)
    return out


# --- common --------------------------------------------------------------------------------

FileKind = Literal["site", "protocol", "driver"]
M = TypeVar("M", bound=StrictModel)


def file_kind(doc: Mapping[str, Any]) -> FileKind:
    """Site, driver or protocol, by the top-level keys (the three kinds share none).

    Any key of a kind counts, so a site config whose [site] table is missing or misspelt is
    still checked as a site config and the message says what is wrong with it.
    """
    if doc.keys() & SiteConfig.model_fields.keys():
        return "site"
    if doc.keys() & DriverFile.model_fields.keys():
        return "driver"
    return "protocol"


def check_files(
    paths: Iterable[str], warnings: list[ConfigProblem] | None = None
) -> list[ConfigProblem]:
    """Validate each file by its kind (site config, protocol or driver). [] when all are valid.

    For a site config, also what only the machine can say: every file it names can be read,
    every folder listed, the data folder written (`site_file_problems`). Settings that work
    but that no operator should leave as they are go into `warnings`, if given.
    """
    problems: list[ConfigProblem] = []
    for path in paths:
        try:
            kind = file_kind(_read_toml(path))
            if kind == "site":
                site = load_site(path)
                problems += site_file_problems(site, path)
                if warnings is not None:
                    warnings += site_warnings(site, path)
            elif kind == "driver":
                load_driver(Path(path).stem, [Path(path).resolve().parent])
            else:
                load_protocol(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def site_file_problems(site: Site, file: str | None = None) -> list[ConfigProblem]:
    """Files and folders the site config names that pocd could not use, as the user running
    this sees them (`pocd check` runs as the service's user, before the service starts): every
    path setting of the config and of each device (`configtypes.config_paths`: certificates,
    keys, password files, trust folders; sink secrets once they are typed so), and the data
    folder, which must be writable or creatable."""
    file = file if file is not None else str(site.path)
    problems: list[ConfigProblem] = []
    for key, path, use in config_paths(site.config):
        message = _path_problem(path, use)
        if message is not None:
            problems.append(ConfigProblem(file, key, message))
    for i, section in enumerate(site.config.devices):
        device = site.devices.get(section.id)
        if device is None:  # disabled
            continue
        for key, path, use in config_paths(device.settings, f"devices[{i}].transport"):
            message = _path_problem(path, use)
            if message is not None:
                problems.append(ConfigProblem(file, key, message, device=device.id))
    if not problems and site.config.api.tls_cert is not None:
        try:  # the files are there: are they a certificate and its key?
            site.config.api.tls_context()
        except ValueError as exc:
            problems.append(ConfigProblem(file, "api.tls_cert", str(exc)))
    message = _data_folder_problem(site.data_dir, site.store_path)
    if message is not None:
        problems.append(ConfigProblem(file, "store.data_dir", message))
    return problems


def _path_problem(path: str, use: PathUse) -> str | None:
    """Why pocd could not use the path as `use` says, or None."""
    if use.kind == "device":
        return None  # a serial port may be unplugged: a fault of its device, not of the config
    if use.kind == "folder":
        try:
            os.listdir(path)
        except FileNotFoundError:
            return f"no such folder: {path}"
        except NotADirectoryError:
            return f"{path} is not a folder"
        except OSError as exc:
            return f"cannot list the folder {path}: {exc.strerror}"
        return None
    try:
        # Non-blocking: a FIFO named by mistake must not hang the check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return f"no such file: {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return f"{path} is a folder, not a file"
        if not stat.S_ISREG(mode):
            return f"{path} is not a regular file"
    finally:
        os.close(fd)
    return None


def _data_folder_problem(folder: Path, store: Path) -> str | None:
    """Why the store could not be written in `folder`, or None. A folder that does not exist
    yet is made at the first start: then its nearest existing parent must be writable."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"the data folder {folder} cannot be made: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == folder:
            return f"cannot write to the data folder {folder}"
        return f"the data folder {folder} cannot be made: cannot write to {existing}"
    if store.exists() and not os.access(store, os.R_OK | os.W_OK):
        return f"cannot write to the store {store}"
    return None


def site_warnings(site: Site, file: str | None = None) -> list[ConfigProblem]:
    """Settings that work but expose the site, for `pocd check` to print (it still passes)."""
    file = file if file is not None else str(site.path)
    warnings: list[ConfigProblem] = []
    api = site.config.api
    if not _is_loopback(api.host):
        warnings.append(
            ConfigProblem(
                file,
                "api.listen",
                f"{api.listen} can be reached from other machines without TLS: passwords, "
                "signatures and session tokens would cross the network in clear. Keep "
                "api.listen on 127.0.0.1 and serve other machines on api.tls_listen",
            )
        )
    disabled = {c.name for c in site.config.sinks.channels() if not c.enabled}
    for i, route in enumerate(site.config.notify.routes):
        off = sorted(route.channel_names() & disabled)
        if off:
            warnings.append(
                ConfigProblem(
                    file,
                    f"notify.routes[{i}]",
                    f"route {route.name} names the disabled channel {', '.join(off)}: what it "
                    "queues there waits until the channel is enabled (or its fallback sends it)",
                )
            )
    return warnings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _read_toml(path: str) -> dict[str, Any]:
    return _parse_toml(_read_text(path), path)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(path, "", "no such file")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(path, "", f"cannot read: {exc.strerror}")]) from None
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigProblem(path, "", f"not UTF-8 text (line {line})")]) from None


def _parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(path, "", f"not valid TOML: {exc}")]) from None


def _validate(
    model: type[M],
    data: Mapping[str, Any],
    file: str,
    *,
    prefix: str = "",
    device: str | None = None,
    base: Path | None = None,
) -> M:
    """`data` as a `model`; relative paths in it against `base` (the file's folder)."""
    try:
        return model.model_validate(data, context=None if base is None else {"base": base})
    except ValidationError as exc:
        raise ConfigError(
            [_problem(file, error, data, prefix, device, model) for error in exc.errors()]
        ) from None


# Pydantic's wording names Python types ("a valid dictionary or instance of PhaseSpec"); the
# people reading these messages write TOML.
_TYPE_MESSAGES = {
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "int_type": "must be a whole number",
    "bool_type": "must be true or false",
    "date_type": "must be a TOML date such as 2026-09-01, without quotes",
    "finite_number": "must be a finite number, not nan or inf",
    "too_short": "must not be empty",
}


def _problem(
    file: str,
    error: Any,
    data: Mapping[str, Any],
    prefix: str,
    device: str | None,
    model: type[StrictModel],
) -> ConfigProblem:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    key = prefix
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    if device is None and len(loc) >= 2 and loc[0] == "devices" and isinstance(loc[1], int):
        devices = data.get("devices")
        entry = devices[loc[1]] if isinstance(devices, list) and loc[1] < len(devices) else None
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
            device = entry["id"]
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = _unknown_key_message(model, loc)
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == _ID:
        message = _ID_RULE
    else:
        message = _TYPE_MESSAGES.get(kind) or re.sub(
            r"^(Input|String|List|Dictionary|Value) should (have )?",
            lambda m: "must have " if m.group(2) else "must ",
            message,
        )
    shown = kind not in ("value_error", "extra_forbidden", "missing") and "input" in error
    if shown and not isinstance(error["input"], dict | list):
        message += f" (got {error['input']!r})"
    return ConfigProblem(file, key, message, device=device)


def _unknown_key_message(model: type[StrictModel], loc: tuple[str | int, ...]) -> str:
    """ "unknown key", with the nearest known key or, failing that, all of them."""
    known = _keys_at(model, loc[:-1])
    if known is None:
        return "unknown key"
    if not known:
        return "unknown key (this table takes no keys)"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (known keys here: {', '.join(known)})"


def _keys_at(model: type[StrictModel], path: tuple[str | int, ...]) -> list[str] | None:
    """The keys of the table at `path` inside `model`; None when it is not a model's table."""
    current: Any = model
    for part in path:
        table = _table(current)
        if isinstance(part, str) and table is not None and part in table.model_fields:
            current = table.model_fields[part].annotation
        elif typing.get_origin(current) is list and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict and isinstance(part, str):
            current = typing.get_args(current)[1]
        else:
            return None
    table = _table(current)
    return sorted(table.model_fields) if table is not None else None


def _table(annotation: object) -> type[StrictModel] | None:
    """The model an annotation stands for (`X` or `X | None`), if it is one."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if is_union else (annotation,)
    tables = [m for m in members if isinstance(m, type) and issubclass(m, StrictModel)]
    return tables[0] if len(tables) == 1 else None


def _unknown(what: str, value: str) -> str:
    return f"unknown {what} {value!r}"
