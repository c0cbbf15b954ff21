"""The `modbus` transport: Modbus TCP and Modbus RTU (RS-485) devices, read with pymodbus.

A driver file says what to read (function, 0-based wire address, data type, word and byte
order, scale, unit, quality rules); the site config says where the device is and may override
any of it. Layout: `config` (settings and point models), `codec` (registers <-> numbers),
`plan` (merging points into reads), `link` (the only module that touches pymodbus: shared
connections, locks, reconnection), `runner` (polling and records). This package must not
know about the engine, the store or the daemon: it only fills the inbox it is given.
"""

from __future__ import annotations

from pocd.transports import TransportSpec
from pocd.transports.modbus.config import (
    Block,
    ModbusPoint,
    ModbusSettings,
    SignalModel,
    StatusRule,
)
from pocd.transports.modbus.link import Link, ModbusReadError
from pocd.transports.modbus.runner import ModbusRunner, bus_use, check_device

__all__ = [
    "TRANSPORT",
    "Block",
    "Link",
    "ModbusPoint",
    "ModbusReadError",
    "ModbusRunner",
    "ModbusSettings",
    "SignalModel",
    "StatusRule",
]

TRANSPORT = TransportSpec(
    name="modbus",
    settings=ModbusSettings,
    point=ModbusPoint,
    runner=ModbusRunner,
    check=check_device,
    bus=bus_use,
)
