"""A FIFO of received items for async readers, as small as one can be.

An ``asyncio.Queue`` carries three deques and an ``asyncio.Event`` with a fourth, about
3 KB before it holds anything; an application with thousands of ICE connections or TURN
allocations keeps one per connection. :class:`Inbox` has one deque and a list of the
readers' futures, and ends with an error instead of a sentinel item.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items handed to :meth:`get` in the order :meth:`put` received them. After
    :meth:`fail`, what is buffered is still handed out, then every :meth:`get` raises the
    error. Any number of readers: each waits on a future of its own and every put wakes
    them all, so a reader cancelled while being woken strands no item."""

    __slots__ = ("_error", "_getters", "_items")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._getters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        self._items.append(item)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the inbox with ``error`` (the first one given counts)."""
        if self._error is None:
            self._error = error
        self._wake()

    def take_all(self) -> list[T]:
        """Everything buffered, now, oldest first."""
        items = list(self._items)
        self._items.clear()
        return items

    async def get(self) -> T:
        while not self._items:
            if self._error is not None:
                # A fresh traceback each time: the same error object may be raised to
                # many readers, many times.
                raise self._error.with_traceback(None)
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            finally:
                if getter in self._getters:
                    self._getters.remove(getter)
        return self._items.popleft()

    def _wake(self) -> None:
        getters, self._getters = self._getters, []
        for getter in getters:
            if not getter.done():
                getter.set_result(None)
