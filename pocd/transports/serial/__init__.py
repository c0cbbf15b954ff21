"""The `serial` transport: line-based ASCII instruments on RS-232/RS-485, on pyserial-asyncio-fast.

A driver file declares everything about an instrument: line settings, framing (terminator or
STX/ETX), checksum, the commands to send, the shapes its replies take (regular expressions with
named groups) and how status words and error replies set quality. The site config says which
port and may override any of it. Layout: `config` (settings and point models), `codec` (pure:
checksums, framers, reply matching, point reading), `port` (the only module that opens ports:
one shared connection and lock per port, reopened on demand), `runner` (polling, streaming,
records). This package must not know about the engine, the store or the daemon: it only fills
the inbox it is given.
"""

from __future__ import annotations

from pocd.transports import TransportSpec
from pocd.transports.serial.codec import CHECKSUMS, Checksum, Codec, register_checksum
from pocd.transports.serial.config import ReplyShape, SerialPoint, SerialSettings, WordRule
from pocd.transports.serial.port import Port, PortError
from pocd.transports.serial.runner import SerialRunner, bus_use, check_device

__all__ = [
    "CHECKSUMS",
    "TRANSPORT",
    "Checksum",
    "Codec",
    "Port",
    "PortError",
    "ReplyShape",
    "SerialPoint",
    "SerialRunner",
    "SerialSettings",
    "WordRule",
    "register_checksum",
]

TRANSPORT = TransportSpec(
    name="serial",
    settings=SerialSettings,
    point=SerialPoint,
    runner=SerialRunner,
    check=check_device,
    bus=bus_use,
)
