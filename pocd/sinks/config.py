"""The settings of the sinks, as validated at load: `[sinks.influxdb]` and where secrets live.

Kept apart from the sinks themselves so that pocd.settings can use them without importing an
HTTP client. Secrets (tokens, passwords, and for InfluxDB v2 the org and bucket too) are never
in the config text: a setting names a file or an environment variable, read when the sink
starts, and `Secret` never shows the value it read. Nothing here opens a socket.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pocd.configtypes import ConfigFile, Duration, StrictModel

__all__ = ["InfluxSettings", "SecretRef", "SecretValue"]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_SECRET_HINT = (
    'secrets never go in the config text: write {{ file = "/etc/pocd/{name}" }} or '
    '{{ env = "POCD_INFLUX_{upper}" }}'
)


class SecretValue:
    """A secret read from its file or variable. Its repr and str never show the value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretValue(from {self.source})"

    __str__ = __repr__


class SecretRef(StrictModel):
    """Where a secret is read from when the sink starts: a file (its first line) or an
    environment variable. A relative file is relative to the config file."""

    file: ConfigFile | None = Field(default=None, min_length=1)  # `pocd check` reads it
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        return self

    def describe(self, base: Path) -> str:
        if self.env is not None:
            return f"environment variable {self.env}"
        return f"file {base / str(self.file)}"

    def read(self, base: Path) -> SecretValue:
        """The secret; ValueError naming the file or variable (never a value) if unusable."""
        where = self.describe(base)
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ValueError(f"{where} is not set")
        else:
            try:
                text = (base / str(self.file)).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read {where}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text") from None
            value = text.splitlines()[0] if text.strip() else ""
        value = value.strip()
        if not value:
            raise ValueError(f"{where} is empty")
        return SecretValue(value, where)


class InfluxSettings(StrictModel):
    """One InfluxDB the store is forwarded to. `api = "v2"` (InfluxDB 2.x, 3.x, Cloud, and
    1.8+ through its v2 endpoints) writes with influxdb-client; `api = "v1"` (1.x before 1.8)
    POSTs to /write."""

    name: str = Field(default="influxdb", pattern=_ID)  # the sink's name: task, cursor, status
    enabled: bool = True
    url: str
    api: Literal["v1", "v2"]
    # v1
    database: str | None = Field(default=None, min_length=1)
    retention_policy: str | None = Field(default=None, min_length=1)
    username: str | None = Field(default=None, min_length=1)
    password: SecretRef | None = None
    # v2
    org: SecretRef | None = None
    bucket: SecretRef | None = None
    token: SecretRef | None = None
    # forwarding
    batch_size: int = Field(default=5000, ge=1, le=100_000)  # points per request
    flush_interval: Duration = Field(default=1.0, gt=0)  # longest wait to fill a batch
    timeout: Duration = Field(default=10.0, gt=0)  # per request
    backoff_max: Duration = Field(default=30.0, gt=0)  # longest pause between retries
    gzip: bool = True

    @property
    def commit_interval(self) -> float:
        """Confirmed positions are committed at most this often (and at stop): a crash resends
        at most this much, which overwrites the same data. Committing after every batch would
        cost an fsync per batch."""
        return 0.5

    @property
    def in_flight(self) -> int:
        """While InfluxDB ingests, the next batch is read, encoded and compressed here. Three
        keep it busy even when that takes longer than its ingest (a busy host); measured on
        bench/influx.py, two was slower there and four no faster."""
        return 3

    @property
    def probe_neighbours(self) -> bool:
        return True  # a refused batch may be a refused stream (see pocd.sinks.forward)

    @field_validator("password", "org", "bucket", "token", mode="before")
    @classmethod
    def _not_inline(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):
            name = info.field_name or "secret"
            # ValueError: pydantic locates only that; the value is not echoed (a secret).
            raise ValueError(_SECRET_HINT.format(name=name, upper=name.upper()))  # noqa: TRY004
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "the URL must not hold a user or password: use username and password (v1) "
                "or token (v2)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: the URL takes no query or fragment")
        try:
            parts.port  # noqa: B018  # raises ValueError for a bad port
        except ValueError:
            raise ValueError(f"{value!r} has an invalid port") from None
        return value.rstrip("/")

    @model_validator(mode="after")
    def _api_keys(self) -> InfluxSettings:
        v1: dict[str, object] = {
            "database": self.database,
            "retention_policy": self.retention_policy,
            "username": self.username,
            "password": self.password,
        }
        v2: dict[str, object] = {"org": self.org, "bucket": self.bucket, "token": self.token}
        mine, other = (v1, v2) if self.api == "v1" else (v2, v1)
        foreign = [k for k, v in other.items() if v is not None]
        if foreign:
            other_api = "v2" if self.api == "v1" else "v1"
            raise ValueError(
                f"{', '.join(foreign)}: only for api = {other_api!r} (this sink has "
                f"api = {self.api!r})"
            )
        required = ["database"] if self.api == "v1" else ["org", "bucket", "token"]
        missing = [k for k in required if mine[k] is None]
        if missing:
            raise ValueError(f"api = {self.api!r} needs {', '.join(missing)}")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        return self

    def where(self) -> str:
        """Where the points go, for messages: no secret in it."""
        if self.api == "v1":
            rp = f", retention policy {self.retention_policy}" if self.retention_policy else ""
            return f"{self.url} (v1, database {self.database}{rp})"
        return f"{self.url} (v2)"
