"""Request planning: which reads fetch a device's points, merged into as few as the rules allow.

Points and status registers of one function that lie close together (at most `max_gap`
unused registers apart) share one read of at most `max_registers` registers (2000 bits for
coils and discrete inputs). Blocks a driver declares are read whole. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pocd.transports.modbus.config import Block, Function

__all__ = ["BIT_LIMIT", "FUNCTION_CODES", "REGISTER_LIMIT", "Read", "Span", "locate", "plan_reads"]

REGISTER_LIMIT = 125  # registers in one FC03/FC04 response (Modbus application protocol 6.3)
BIT_LIMIT = 2000  # coils or discrete inputs in one FC01/FC02 response
FUNCTION_CODES: dict[Function, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """The registers (or bits) one value or status is decoded from."""

    function: Function
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class Read:
    """One request on the wire."""

    function: Function
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count

    def covers(self, span: Span) -> bool:
        return (
            span.function == self.function and self.address <= span.address <= span.end <= self.end
        )

    def __str__(self) -> str:
        return f"{self.function} {self.address}+{self.count}"


def plan_reads(
    spans: Iterable[Span],
    *,
    max_gap: int,
    max_registers: int = REGISTER_LIMIT,
    blocks: Sequence[Block] = (),
) -> list[Read]:
    """The reads that cover every span, ordered by function code and address."""
    wanted = sorted(set(spans), key=lambda s: (FUNCTION_CODES[s.function], s.address, s.count))
    reads = [
        Read(b.function, b.address, b.count)
        for b in blocks
        if any(Read(b.function, b.address, b.count).covers(s) for s in wanted)
    ]
    rest = [s for s in wanted if not any(r.covers(s) for r in reads)]
    current: Read | None = None
    for span in rest:
        limit = max_registers if span.function in ("holding", "input") else BIT_LIMIT
        if (
            current is not None
            and span.function == current.function
            and span.address - current.end <= max_gap
            and max(span.end, current.end) - current.address <= limit
        ):
            current = Read(
                current.function, current.address, max(span.end, current.end) - current.address
            )
            reads[-1] = current
            continue
        current = Read(span.function, span.address, span.count)
        reads.append(current)
    return sorted(reads, key=lambda r: (FUNCTION_CODES[r.function], r.address))


def locate(reads: Sequence[Read], span: Span) -> tuple[int, int]:
    """(index of the read that covers `span`, offset of the span in that read)."""
    for index, read in enumerate(reads):
        if read.covers(span):
            return index, span.address - read.address
    raise LookupError(f"no read covers {span}")
