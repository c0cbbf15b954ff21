"""The settings of the notification channels, as validated at load: `[[sinks.email]]`,
`[[sinks.webhook]]`, `[[sinks.mqtt]]` (listed in pocd.settings' SinksSection), and `[notify]`:
the routes that say which alarm events go to which channels, their fallback and escalation
tiers, and the flood summary window.

Secrets (the SMTP password, the webhook's HMAC secret, the MQTT password) are never in the
config text: a `SecretRef` names a file or an environment variable, read when the channel
opens. Must not: import a client library or open a socket.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict, ValidationInfo, field_validator, model_validator

from pocd.configtypes import ConfigFile, Duration, StrictModel
from pocd.model import AlarmPriority, AlarmTransition
from pocd.sinks.config import SecretRef

__all__ = [
    "ChannelSettings",
    "EmailSettings",
    "MqttSettings",
    "NotifySection",
    "RouteSettings",
    "TierSettings",
    "WebhookSettings",
]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A priority or transition as the config text spells it ("high", "activate").
_Priority = Annotated[AlarmPriority, Strict(False)]
_Transition = Annotated[AlarmTransition, Strict(False)]
# One MQTT topic level or more, without wildcards and without an empty level.
_TOPIC = r"^[^+#/\x00]+(/[^+#/\x00]+)*$"


def _not_inline(value: object, info: ValidationInfo) -> object:
    if isinstance(value, str):
        name = info.field_name or "secret"
        # The value is not echoed (a secret).
        raise ValueError(  # noqa: TRY004
            f'secrets never go in the config text: write {{ file = "/etc/pocd/{name}" }} or '
            f'{{ env = "POCD_{name.upper()}" }}'
        )
    return value


class ChannelSettings(StrictModel):
    """What every channel has; also what the cursor forwarder reads (`ForwardSettings`)."""

    name: str = Field(pattern=_ID)  # the sink's name: task, cursor, status
    enabled: bool = True
    timeout: Duration = Field(default=10.0, gt=0)  # per delivery attempt
    backoff_max: Duration = Field(default=60.0, gt=0)  # longest pause between retries
    flush_interval: Duration = Field(default=0.05, gt=0)  # a notification waits for none

    def where(self) -> str:
        """Where the channel sends, for messages and status: no secret in it."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return 1  # one notification per delivery: each has its own result and record

    @property
    def commit_interval(self) -> float:
        return 0.0  # the cursor moves past each delivered notification at once

    @property
    def in_flight(self) -> int:
        return 1  # in order, and a failure sends nothing a person was sent already again

    @property
    def probe_neighbours(self) -> bool:
        return False  # that would send people notifications they had already


class EmailSettings(ChannelSettings):
    """An SMTP server and the addresses a notification is mailed to."""

    name: str = Field(default="email", pattern=_ID)
    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"  # tls: implicit TLS (465)
    ca_file: ConfigFile | None = None  # trust these CAs instead of the system's
    username: str | None = Field(default=None, min_length=1)
    password: SecretRef | None = None
    sender: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)

    _secret = field_validator("password", mode="before")(_not_inline)

    def where(self) -> str:
        return f"smtp://{self.host}:{self.port} ({self.security})"


class WebhookSettings(ChannelSettings):
    """An HTTP(S) receiver of signed JSON POSTs."""

    name: str = Field(default="webhook", pattern=_ID)
    url: str = Field(pattern=r"^https?://[^/?#\s]+[^\s]*$")
    secret: SecretRef  # the HMAC-SHA256 key the receiver shares
    ca_file: ConfigFile | None = None

    _secret = field_validator("secret", mode="before")(_not_inline)

    def where(self) -> str:
        return self.url


class MqttSettings(ChannelSettings):
    """An MQTT broker: events at QoS 1 and retained alarm states under `prefix`."""

    name: str = Field(default="mqtt", pattern=_ID)
    host: str = Field(min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    prefix: str = Field(default="pocd", pattern=_TOPIC)
    tls: bool = False
    ca_file: ConfigFile | None = None
    username: str | None = Field(default=None, min_length=1)
    password: SecretRef | None = None
    client_id: str | None = Field(default=None, min_length=1, max_length=23)
    witness: bool = True  # publish each signed checkpoint of the chain (pocd.store.chain)

    _secret = field_validator("password", mode="before")(_not_inline)

    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class TierSettings(StrictModel):
    """An escalation tier: who is told when the alarm is still unacknowledged `after` its
    activation (or re-alarm)."""

    after: Duration = Field(gt=0)
    channels: list[str] = Field(min_length=1)


class RouteSettings(StrictModel):
    """Which alarm events go to which channels. An empty filter matches everything; an event
    matches when it matches every filter."""

    name: str = Field(pattern=_ID)
    channels: list[str] = Field(min_length=1)  # names of [[sinks.email|webhook|mqtt]] entries
    priorities: list[_Priority] = Field(default_factory=list)
    sites: list[str] = Field(default_factory=list)
    lines: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)
    transitions: list[_Transition] = Field(
        default_factory=lambda: [AlarmTransition.ACTIVATE, AlarmTransition.REALARM]
    )
    # A notification a channel has not delivered `fallback_after` its making goes to this one.
    fallback: str | None = None
    fallback_after: Duration = Field(default=120.0, gt=0)
    escalate: list[TierSettings] = Field(default_factory=list)
    # During a flood on a line, one summary per window instead of one message per alarm (an
    # MQTT route keeping each alarm's retained state says false).
    consolidate: bool = True

    @model_validator(mode="after")
    def _tiers_in_order(self) -> RouteSettings:
        afters = [tier.after for tier in self.escalate]
        if afters != sorted(set(afters)):
            raise ValueError(
                f"escalate: the tiers' after ({', '.join(f'{a:g} s' for a in afters)}) must "
                "grow from one tier to the next"
            )
        raising = {AlarmTransition.ACTIVATE, AlarmTransition.REALARM} & set(self.transitions)
        if self.escalate and not raising:
            raise ValueError(
                "escalate: the route notifies neither activate nor realarm, so nothing it "
                "sends can escalate"
            )
        if self.fallback is not None and self.fallback in self.channels:
            raise ValueError(f"fallback {self.fallback!r} is one of the route's own channels")
        return self

    def channel_names(self) -> set[str]:
        """Every channel the route names: its own, the fallback, the tiers'."""
        names = set(self.channels) | {c for tier in self.escalate for c in tier.channels}
        return names | ({self.fallback} if self.fallback else set())


class NotifySection(StrictModel):
    """`[notify]`: the console's address for the links in messages, the flood summary window,
    and the routes (`[[notify.routes]]`)."""

    # The console as the people notified reach it; unset: the API's listen address.
    base_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    summary_window: Duration = Field(default=300.0, gt=0)
    routes: list[RouteSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_routes(self) -> NotifySection:
        names = [route.name for route in self.routes]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"routes: route names must be unique ({', '.join(doubled)} twice)")
        return self
