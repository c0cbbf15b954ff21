"""The inbox between the runners and the engine task: order, batches, backpressure, join."""

from __future__ import annotations

import asyncio

import pytest

from pocd.inbox import Inbox
from pocd.model import CommStatus, Sample


def sample(i: int) -> Sample:
    return Sample("dev", "p", i, float(i))


async def test_take_returns_everything_waiting_in_order() -> None:
    inbox = Inbox(10)
    for i in range(3):
        await inbox.put(sample(i))
    inbox.put_nowait(CommStatus("dev", 3, ok=False))
    assert inbox.qsize() == 4
    taken = await inbox.take()
    assert taken == [sample(0), sample(1), sample(2), CommStatus("dev", 3, ok=False)]
    assert inbox.qsize() == 0


async def test_take_waits_for_the_first_reading() -> None:
    inbox = Inbox(10)
    taker = asyncio.create_task(inbox.take())
    await asyncio.sleep(0.01)
    assert not taker.done()
    inbox.put_nowait(sample(1))
    assert await asyncio.wait_for(taker, 1) == [sample(1)]


async def test_a_full_inbox_holds_runners_back_and_loses_nothing() -> None:
    inbox = Inbox(2)
    inbox.put_nowait(sample(0))
    inbox.put_nowait(sample(1))
    assert inbox.full()
    with pytest.raises(asyncio.QueueFull):
        inbox.put_nowait(sample(2))
    late = [asyncio.create_task(inbox.put(sample(i))) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in late)
    taken = await inbox.take()
    await asyncio.sleep(0.01)
    taken += await inbox.take()
    await asyncio.sleep(0.01)
    taken += await inbox.take()
    await asyncio.gather(*late)
    assert taken == [sample(i) for i in range(5)]


async def test_a_cancelled_runner_hands_its_room_on() -> None:
    inbox = Inbox(1)
    inbox.put_nowait(sample(0))
    first = asyncio.create_task(inbox.put(sample(1)))
    second = asyncio.create_task(inbox.put(sample(2)))
    await asyncio.sleep(0.01)
    assert await inbox.take() == [sample(0)]  # room for one: the first putter is woken ...
    first.cancel()  # ... and cancelled before it runs
    await asyncio.sleep(0.01)
    assert second.done()
    assert await inbox.take() == [sample(2)]


async def test_join_waits_until_the_consumer_is_done() -> None:
    inbox = Inbox(10)
    await inbox.join()  # nothing put: returns at once
    inbox.put_nowait(sample(0))
    inbox.put_nowait(sample(1))
    joined = asyncio.create_task(inbox.join())
    taken = await inbox.take()
    await asyncio.sleep(0.01)
    assert not joined.done()  # taken is not dealt with
    inbox.done(len(taken))
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError, match="more readings"):
        inbox.done(1)
