"""What an OPC UA driver file and a site config may say: device settings, points, node addresses.

Validated once, at load, by pydantic (unknown keys are errors). Everything that can be checked
without the server is checked here: node id and browse path syntax, security settings that fit
together (a user's password never on an unsecured channel), one password source. File paths
are relative to the config file that names them, and `pocd check` reads each. What needs the
server (a namespace URI it knows, a node it has) is judged by the runner, per point. Nothing
here opens a socket or reads a file.

A point's `node` is either an OPC UA node id (`ns=2;s=Rotea.ProtocolState`, `i=2258`,
`nsu=http://example.com/UA/;s=Temp`) or a browse path of browse names separated by `/`:
`/2:Rotea/2:ProtocolState` starts at the Objects folder, `lads:FunctionSet/dev:Sensor/lads:Value`
(no leading `/`) starts at the device's `root` path. A browse name's prefix is a namespace
index or an alias from the device's `namespaces` table; without a prefix it is in namespace 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pocd.configtypes import ConfigFile, ConfigFolder, Duration, StrictModel
from pocd.transports import PointSettings, TransportSettings

__all__ = [
    "DEFAULT_ENDPOINT",
    "BrowseName",
    "BrowsePath",
    "NodeIdText",
    "NodeRef",
    "OpcuaPoint",
    "OpcuaSettings",
    "ReadMode",
    "SecurityMode",
    "SecurityPolicyName",
    "SimSignal",
    "parse_browse_path",
    "parse_node",
]

DEFAULT_ENDPOINT = "opc.tcp://127.0.0.1:4840"  # 4840: the IANA port of OPC UA

SecurityPolicyName = Literal[
    "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"
]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]
ReadMode = Literal["subscription", "poll"]
SimType = Literal[
    "Double", "Float", "Int16", "UInt16", "Int32", "UInt32", "Int64", "Boolean", "String",
    "LocalizedText",
]  # fmt: skip

_NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?[isgb]=.+$", re.DOTALL)
_PREFIX = re.compile(r"^([A-Za-z0-9_.-]+):(.+)$")


@dataclass(frozen=True, slots=True)
class BrowseName:
    """One element of a browse path: a name and its namespace (an index, or an alias)."""

    namespace: int | str  # int: a namespace index; str: an alias from `namespaces`
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}:{self.name}"


@dataclass(frozen=True, slots=True)
class BrowsePath:
    """Browse names from the Objects folder (absolute) or from the device's `root` path."""

    elements: tuple[BrowseName, ...]
    absolute: bool

    def __str__(self) -> str:
        return ("/" if self.absolute else "") + "/".join(map(str, self.elements))


@dataclass(frozen=True, slots=True)
class NodeIdText:
    """A node id as written; `nsu=` URIs are turned into indexes against the server's table."""

    text: str

    def __str__(self) -> str:
        return self.text


NodeRef = NodeIdText | BrowsePath


def parse_browse_path(text: str) -> BrowsePath:
    """`/2:Rotea/2:ProtocolState` or `lads:FunctionSet/lads:SensorValue`. Raises ValueError."""
    absolute = text.startswith("/")
    parts = text.strip("/").split("/")
    if not text.strip("/") or any(not p.strip() for p in parts):
        raise ValueError(f"{text!r} is not a browse path such as '/2:Device/2:Temperature'")
    elements = []
    for part in parts:
        found = _PREFIX.match(part)
        if found is None:
            elements.append(BrowseName(0, part))
            continue
        prefix, name = found.groups()
        elements.append(BrowseName(int(prefix) if prefix.isdigit() else prefix, name))
    return BrowsePath(tuple(elements), absolute)


def parse_node(text: str) -> NodeRef:
    """A node id or a browse path, checked for syntax only. Raises ValueError."""
    text = text.strip()
    if _NODE_ID.match(text):
        # deferred: loading a site config without OPC UA devices should not import asyncua
        from asyncua import ua
        from asyncua.ua.uaerrors import UaStringParsingError

        try:
            ua.NodeId.from_string(text)
        except (UaStringParsingError, ValueError) as exc:
            raise ValueError(f"{text!r} is not a valid node id: {exc}") from None
        return NodeIdText(text)
    if "=" in text.split("/")[0] and ";" in text:
        raise ValueError(
            f"{text!r} is neither a node id (ns=2;s=Name, i=2258, nsu=URI;s=Name) "
            "nor a browse path (/2:Folder/2:Name)"
        )
    return parse_browse_path(text)


class SimSignal(StrictModel):
    """What the simulator serves for a point (`pocd simulate`). Ignored by the transport."""

    type: SimType = "Double"
    base: float = 0.0
    amplitude: float = 0.0
    period: Duration = Field(default=60.0, gt=0)
    noise: float = Field(default=0.0, ge=0)  # standard deviation
    text: str = ""  # the value of a String or LocalizedText node
    eu_range: list[float] | None = Field(default=None, min_length=2, max_length=2)  # EURange


class OpcuaSettings(TransportSettings):
    """One OPC UA server: where it is, how points are read, security, and recovery timing.

    `interval` (from TransportSettings) is the polling interval of points read by polling.
    """

    endpoint: str = DEFAULT_ENDPOINT
    read: ReadMode = "subscription"  # how points are read unless a point says otherwise
    publishing_interval: Duration = Field(default=1.0, gt=0)
    sampling_interval: Duration = Field(default=0.5, ge=0)  # default for subscribed points
    queue_size: int = Field(default=10, ge=1, le=10_000)  # default for subscribed points
    keepalive: Duration = Field(default=10.0, gt=0)  # longest silence of a subscription
    timeout: Duration = Field(default=5.0, gt=0)  # per request
    # How often the connection is probed (a Read of the server state), and how long the probe
    # may take: a busy server answering in 2 s is slow, not gone.
    watchdog: Duration = Field(default=5.0, gt=0)
    # Short: a server keeps the session of a dropped connection this long, and pocd never
    # takes an old session over, it makes a new one.
    session_timeout: Duration = Field(default=30.0, gt=0)
    backoff_min: Duration = Field(default=0.5, gt=0)  # first wait before a reconnect
    backoff_max: Duration = Field(default=5.0, gt=0)  # longest wait between reconnects
    node_retry: Duration = Field(default=60.0, gt=0)  # retry of nodes the server did not have
    max_nodes_per_read: int = Field(default=500, ge=1)
    max_items_per_call: int = Field(default=1000, ge=1)
    root: str = ""  # browse path that relative point paths start from, e.g. "/2:MyDevice"
    namespaces: dict[str, str] = {}  # alias -> namespace URI, for browse names and the root
    # Security. The channel's policy and mode, this client's certificate and key (made with
    # `pocd certs create`), and how the server's certificate is trusted: a pinned file, or a
    # folder of trusted certificates (self-signed ones, or the CAs that issued them).
    security_policy: SecurityPolicyName = "None"
    security_mode: SecurityMode | None = None  # default: SignAndEncrypt when a policy is set
    certificate: ConfigFile | None = None
    private_key: ConfigFile | None = None
    application_uri: str | None = None  # default: the URI in the client certificate
    server_certificate: ConfigFile | None = None
    trust_dir: ConfigFolder | None = None
    username: str | None = None
    password_file: ConfigFile | None = None  # the password is the file's first line
    password_env: str | None = None  # or an environment variable; never in a config file

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^/:\s]+(?::\d{1,5})?(?:/\S*)?", value):
            raise ValueError(f"{value!r} is not an endpoint like opc.tcp://192.0.2.10:4840")
        return value

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        if value:
            if not value.startswith("/"):
                raise ValueError(f"root {value!r} must start at the Objects folder: '/2:Device'")
            parse_browse_path(value)
        return value

    @model_validator(mode="after")
    def _security(self) -> OpcuaSettings:
        secured = self.security_policy != "None"
        mode = self.security_mode
        if secured and mode == "None":
            raise ValueError(f"security_policy {self.security_policy} needs Sign or SignAndEncrypt")
        if not secured and mode not in (None, "None"):
            raise ValueError(f"security_mode {mode} needs a security_policy other than None")
        if secured:
            missing = [key for key in ("certificate", "private_key") if getattr(self, key) is None]
            if missing:
                raise ValueError(
                    f"security_policy {self.security_policy} needs {' and '.join(missing)} "
                    "(make a pair with `pocd certs create`)"
                )
            if self.server_certificate is None and self.trust_dir is None:
                raise ValueError(
                    "a secured connection needs server_certificate (a pinned file) or "
                    "trust_dir (a folder of trusted certificates) to check the server"
                )
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if self.username is None and (self.password_file or self.password_env):
            raise ValueError("a password needs a username")
        if self.username is not None and not (self.password_file or self.password_env):
            raise ValueError(
                "username needs password_file or password_env (a password is never written "
                "in a config file)"
            )
        if self.username is not None and not secured:
            raise ValueError(
                f"username {self.username!r} needs a security_policy other than None: on an "
                "unsecured channel the password would travel in clear"
            )
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min must not exceed backoff_max")
        return self

    @property
    def mode(self) -> SecurityMode:
        if self.security_policy == "None":
            return "None"
        return self.security_mode or "SignAndEncrypt"

    @property
    def root_path(self) -> BrowsePath | None:
        return parse_browse_path(self.root) if self.root else None


class OpcuaPoint(PointSettings):
    """One node: where it is, how it is read, and how its value becomes a number."""

    node: str  # a node id or a browse path (see the module docstring)
    read: ReadMode | None = None  # default: the device's `read`
    sampling_interval: Duration | None = Field(default=None, ge=0)
    queue_size: int | None = Field(default=None, ge=1, le=10_000)
    deadband: float = Field(default=0.0, ge=0)  # subscription only
    deadband_type: Literal["absolute", "percent"] = "absolute"
    # A SourceTimestamp that has not advanced for this long makes the point stale. Set it only
    # for nodes whose device refreshes the timestamp (a sensor sampling on its own clock): most
    # servers keep the timestamp of a value that does not change.
    stale_after: Duration | None = Field(default=None, gt=0)
    values: dict[str, float] = {}  # text (String, LocalizedText) -> number
    analog: bool = False  # an AnalogItem: read EURange and EngineeringUnits each session
    sim: SimSignal | None = None

    @field_validator("node")
    @classmethod
    def _node(cls, value: str) -> str:
        parse_node(value)
        return value

    @model_validator(mode="after")
    def _deadband(self) -> OpcuaPoint:
        if self.deadband_type == "percent" and self.deadband > 100:
            raise ValueError("a percent deadband is 0..100 (percent of the EURange)")
        if self.deadband and self.read == "poll":
            raise ValueError("a deadband applies to subscribed points, not polled ones")
        return self

    @property
    def ref(self) -> NodeRef:
        return parse_node(self.node)
