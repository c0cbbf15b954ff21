"""The settings of the notification channels, as validated at load: `[sinks.email]`,
`[sinks.webhook]`, `[sinks.mqtt]` (to be listed in pocd.settings' SinksSection with routing).

Secrets (the SMTP password, the webhook's HMAC secret, the MQTT password) are never in the
config text: a `SecretRef` names a file or an environment variable, read when the channel
opens. Must not: import a client library or open a socket.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from pocd.configtypes import ConfigFile, Duration, StrictModel
from pocd.sinks.config import SecretRef

__all__ = ["ChannelSettings", "EmailSettings", "MqttSettings", "WebhookSettings"]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
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

    @property
    def batch_size(self) -> int:
        return 1  # one notification per delivery: each has its own result and record


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


class WebhookSettings(ChannelSettings):
    """An HTTP(S) receiver of signed JSON POSTs."""

    name: str = Field(default="webhook", pattern=_ID)
    url: str = Field(pattern=r"^https?://[^/?#\s]+[^\s]*$")
    secret: SecretRef  # the HMAC-SHA256 key the receiver shares
    ca_file: ConfigFile | None = None

    _secret = field_validator("secret", mode="before")(_not_inline)


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

    _secret = field_validator("password", mode="before")(_not_inline)
