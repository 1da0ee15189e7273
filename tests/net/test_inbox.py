"""tsunagu.aio.inbox.Inbox: the readers' FIFO behind IceConnection.recv and
TurnClient.recv_from, on a real asyncio loop (no sockets)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tsunagu.aio.inbox import Inbox

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py
    sys.path.insert(0, _TESTS)
from aiotest import asynctest_within  # noqa: E402

asynctest = asynctest_within(10.0)


class ClosedError(Exception):
    pass


@asynctest
async def test_items_come_out_in_order_and_a_reader_waits_for_the_next() -> None:
    inbox: Inbox[int] = Inbox()
    inbox.put(1)
    inbox.put(2)
    assert len(inbox) == 2
    assert [await inbox.get(), await inbox.get()] == [1, 2]
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)  # the reader is now waiting
    assert not reader.done()
    inbox.put(3)
    assert await reader == 3
    assert len(inbox) == 0


@asynctest
async def test_after_fail_the_buffer_drains_then_every_reader_gets_the_error() -> None:
    inbox: Inbox[str] = Inbox()
    waiting = [asyncio.create_task(inbox.get()) for _ in range(3)]
    await asyncio.sleep(0)
    inbox.put("first")
    inbox.fail(ClosedError("gone"))
    inbox.fail(RuntimeError("later errors do not replace the first"))
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert sorted(map(repr, results)) == sorted(
        [repr("first"), repr(ClosedError("gone")), repr(ClosedError("gone"))]
    )
    for _ in range(3):  # and again, each time with a fresh traceback
        with pytest.raises(ClosedError) as raised:
            await inbox.get()
        assert raised.value.__traceback__ is not None
        assert len(list(_frames(raised.value.__traceback__))) <= 2


def _frames(tb: object) -> list[object]:
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next  # type: ignore[attr-defined]
    return frames


@asynctest
async def test_a_cancelled_reader_strands_nothing() -> None:
    inbox: Inbox[int] = Inbox()
    doomed = asyncio.create_task(inbox.get())
    patient = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put(7)  # both are woken; the one cancelled now must not take the item away
    doomed.cancel()
    assert await patient == 7
    with pytest.raises(asyncio.CancelledError):
        await doomed
    late = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put(8)
    assert await late == 8
    assert not inbox._getters  # no future of a finished reader is kept


@asynctest
async def test_take_all_empties_the_buffer_at_once() -> None:
    inbox: Inbox[int] = Inbox()
    for n in range(5):
        inbox.put(n)
    assert inbox.take_all() == [0, 1, 2, 3, 4]
    assert len(inbox) == 0 and inbox.take_all() == []
