"""Repeated incidents, counted (pocd.transports.repeats), with plain values and given times:
the first of a kind at once, then one count per interval, none dropped."""

from __future__ import annotations

import asyncio

import pytest

from pocd.model import NS, Incident, IncidentKind
from pocd.transports.repeats import RAW_KEPT, RepeatedIncidents, report_repeats
from tests.transportkit import repeats_in

T0 = 1_788_249_600 * NS


def fault(at: float, code: str = "unparseable", raw: bytes = b"\x81\xa5") -> Incident:
    return Incident(T0 + int(at * NS), IncidentKind.DATA, code, "balance", f"frame at {at}", raw)


def test_the_first_is_recorded_then_one_count_per_interval() -> None:
    repeats = RepeatedIncidents(interval=60)
    first = fault(0)
    assert repeats.offer(first, now=0) is first
    assert [repeats.offer(fault(t), now=t) for t in (1, 2, 30)] == [None, None, None]
    assert repeats.due(59.9) == []
    [count] = repeats.due(60)
    assert repeats_in(count) == 3 and count.t == fault(30).t
    assert (count.kind, count.code, count.source, count.raw) == (
        IncidentKind.DATA,
        "unparseable",
        "balance",
        b"\x81\xa5",
    )
    assert count.message.startswith(
        "3 more 'unparseable' incident(s) from 2026-09-01T08:00:01.000+00:00 to "
        "2026-09-01T08:00:30.000+00:00 (29 s)"
    )
    assert count.message.endswith("the last: frame at 30")
    assert repeats.counted["unparseable"] == 3
    # It goes on: the next interval counts again...
    assert repeats.offer(fault(70), now=70) is None
    assert [repeats_in(i) for i in repeats.due(120)] == [1]
    # ... and one without a repeat closes the window: the next fault is recorded at once.
    assert repeats.due(180) == []
    assert repeats.offer(fault(200), now=200) == fault(200)


def test_a_repeat_after_the_window_ended_brings_its_count() -> None:
    repeats = RepeatedIncidents(interval=10)
    repeats.offer(fault(0), now=0)
    repeats.offer(fault(1), now=1)
    count = repeats.offer(fault(15), now=15)  # `due` did not run in between
    assert count is not None and repeats_in(count) == 1 and count.t == fault(1).t
    [later] = repeats.drain()  # the one that brought it is the next window's first repeat
    assert repeats_in(later) == 1 and later.t == fault(15).t


def test_keys_keep_faults_apart() -> None:
    repeats = RepeatedIncidents()
    assert repeats.offer(fault(0, "timeout"), now=0) is not None
    assert repeats.offer(fault(0, "crc"), now=0) is not None  # another code: its own window
    assert repeats.offer(fault(1, "nan"), now=1, key=("nan", "co2")) is not None
    assert repeats.offer(fault(1, "nan"), now=1, key=("nan", "temperature")) is not None
    assert repeats.offer(fault(2, "nan"), now=2, key=("nan", "co2")) is None
    assert not RepeatedIncidents().pending and repeats.pending


def test_drain_gives_every_open_count_and_keeps_a_sample_of_the_raw_bytes() -> None:
    repeats = RepeatedIncidents()
    repeats.offer(fault(0), now=0)
    repeats.offer(fault(1, raw=b"x" * 5000), now=1)
    [count] = repeats.drain()
    assert repeats_in(count) == 1 and count.raw == b"x" * RAW_KEPT
    assert repeats.drain() == [] and not repeats.pending


def test_an_interval_is_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RepeatedIncidents(interval=0)


async def test_counts_are_put_when_due_and_when_the_runner_stops() -> None:
    repeats = RepeatedIncidents(interval=0.2)
    inbox: asyncio.Queue[object] = asyncio.Queue()
    task = asyncio.create_task(report_repeats(repeats, inbox))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    repeats.offer(fault(0), now=loop.time())
    repeats.offer(fault(0.01), now=loop.time())
    async with asyncio.timeout(2):
        count = await inbox.get()
    assert isinstance(count, Incident) and repeats_in(count) == 1
    repeats.offer(fault(0.5), now=loop.time())  # counted: the window goes on
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = inbox.get_nowait()  # put as the task stopped: not lost
    assert isinstance(last, Incident) and repeats_in(last) == 1
