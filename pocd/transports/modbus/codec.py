"""Register encoding: Modbus registers (16-bit words) <-> numbers, for every point data type.

Pure functions shared by the transport (decode) and the simulator (encode). Golden bytes from
device manuals anchor them in the tests. Nothing here does I/O or knows about quality.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from collections.abc import Callable, Sequence

from pocd.transports.modbus.config import REGISTER_COUNT, DataType, Order

__all__ = ["Decoder", "Item", "crc16", "decode", "decoder", "encode", "read_decoder"]

Decoder = Callable[[Sequence[int]], float]
# One value in a read's registers: (first register, type, word order, byte order, bit).
Item = tuple[int, DataType, Order, Order, int | None]
_CODES: dict[str, str] = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "float64": "d",
}

_STRUCTS: dict[str, struct.Struct] = {
    "int16": struct.Struct(">h"),
    "uint16": struct.Struct(">H"),
    "int32": struct.Struct(">i"),
    "uint32": struct.Struct(">I"),
    "float32": struct.Struct(">f"),
    "float64": struct.Struct(">d"),
}
_LIMITS: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


def _swap(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _signed(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


@functools.cache
def decoder(
    type: DataType, word_order: Order = "big", byte_order: Order = "big", bit: int | None = None
) -> Decoder:
    """A function from registers to the number they hold, made once per encoding: the runner
    decodes every point of every poll, and this way does the type dispatch only once."""
    if type == "bit":
        shift = bit or 0
        return lambda words: float((words[0] >> shift) & 1)
    if type == "bool":
        return lambda words: 1.0 if words[0] else 0.0
    if REGISTER_COUNT[type] == 1:  # one register: word order is moot
        if byte_order == "little":
            if type == "int16":
                return lambda words: float(_signed(_swap(words[0])))
            return lambda words: float(_swap(words[0]))
        if type == "int16":
            return lambda words: float(_signed(words[0]))
        return lambda words: float(words[0])
    # Packing the registers little-endian ("<H") swaps the bytes of each one; word order is
    # the order they are packed in. The bytes are then read as the type, big-endian.
    pack = struct.Struct(("<" if byte_order == "little" else ">") + "H" * REGISTER_COUNT[type]).pack
    unpack = _STRUCTS[type].unpack
    if word_order == "little":
        return lambda words: float(unpack(pack(*reversed(words)))[0])
    return lambda words: float(unpack(pack(*words))[0])


def read_decoder(items: Sequence[Item]) -> Callable[[Sequence[int]], tuple[float, ...]]:
    """One function from a read's registers to every item's raw value, in the order given.

    When every item is a number type and they share a byte order (the usual case), it is one
    pick of the registers in wire order, one pack and one unpack: a poll decodes every value
    this way, and a function call per value was most of the time it took. Otherwise each
    item goes through its own `decoder`. Integer types come out as int, the rest as float.
    """
    byte_orders = {byte_order for _, _, _, byte_order, _ in items}
    if items and len(byte_orders) == 1 and all(item[1] in _CODES for item in items):
        order: list[int] = []
        for start, type, word_order, _, _ in items:
            words = range(start, start + REGISTER_COUNT[type])
            order += reversed(words) if word_order == "little" else words
        endian = "<" if byte_orders == {"little"} else ">"  # "<H" swaps each register's bytes
        pack = struct.Struct(endian + "H" * len(order)).pack
        unpack = struct.Struct(">" + "".join(_CODES[item[1]] for item in items)).unpack
        if len(order) == 1:
            (only,) = order
            return lambda words: unpack(pack(words[only]))
        pick = operator.itemgetter(*order)
        return lambda words: unpack(pack(*pick(words)))
    each = [(start, REGISTER_COUNT[t], decoder(t, w, b, bit)) for start, t, w, b, bit in items]
    return lambda words: tuple(fn(words[s : s + n]) for s, n, fn in each)


def decode(
    words: Sequence[int],
    type: DataType,
    word_order: Order = "big",
    byte_order: Order = "big",
    bit: int | None = None,
) -> float:
    """The number held in `words` (exactly as many registers as the type occupies)."""
    return decoder(type, word_order, byte_order, bit)(words)


def encode(
    value: float,
    type: DataType,
    word_order: Order = "big",
    byte_order: Order = "big",
    bit: int | None = None,
    current: int = 0,
) -> list[int]:
    """The registers that hold `value`. Integers are rounded and clamped to the type's range.

    For type "bit", `current` is the register the bit is set in or cleared from.
    """
    if type == "bit":
        mask = 1 << (bit or 0)
        return [(current | mask) if value else (current & ~mask & 0xFFFF)]
    if type == "bool":
        return [1 if value else 0]
    if type in _LIMITS:
        low, high = _LIMITS[type]
        number: float | int = 0 if math.isnan(value) else max(low, min(high, round(value)))
    else:
        number = value
    raw = _STRUCTS[type].pack(number)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [_swap(w) for w in words]
    assert len(words) == REGISTER_COUNT[type]
    return words


def crc16(data: bytes) -> bytes:
    """The Modbus RTU CRC of `data`, as the two bytes that follow it on the wire."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")
