"""The `opcua` transport: OPC UA servers (LADS devices, the CTS Rotea, NAMUR MTP modules).

A driver file names the nodes (node ids or browse paths) and how each is read, by subscription
(sampling interval, queue size, deadband) or by polling in batched reads; the site config says
where the server is and how to trust it. Layout: `config` (settings and point models),
`values` (DataValue -> number, quality, device time; repeats and staleness), `security`
(certificates, trust, password), `certs` (`pocd certs create`), `session` (the only module
that talks to asyncua's client), `runner` (sessions, recovery, records). This package must not
know about the engine, the store or the daemon: it only fills the inbox it is given.
"""

from __future__ import annotations

from pocd.transports import TransportSpec
from pocd.transports.opcua.certs import create_certificate
from pocd.transports.opcua.config import OpcuaPoint, OpcuaSettings, SimSignal
from pocd.transports.opcua.runner import OpcuaRunner
from pocd.transports.opcua.security import (
    AuthenticationFailed,
    SecuritySetupError,
    ServerCertificateUntrusted,
)
from pocd.transports.opcua.session import ConnectionLost

__all__ = [
    "TRANSPORT",
    "AuthenticationFailed",
    "ConnectionLost",
    "OpcuaPoint",
    "OpcuaRunner",
    "OpcuaSettings",
    "SecuritySetupError",
    "ServerCertificateUntrusted",
    "SimSignal",
    "create_certificate",
]

TRANSPORT = TransportSpec(
    name="opcua", settings=OpcuaSettings, point=OpcuaPoint, runner=OpcuaRunner
)
