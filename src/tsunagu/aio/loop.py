"""Event loop choice: uvloop when it is installed (it roughly halves the per-datagram cost
of asyncio's own selector loop), the standard loop otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

clock = time.monotonic
"""The clock the drivers feed their cores with (``now``), where timing finer than the loop's
matters: uvloop's ``loop.time()`` moves in whole milliseconds, which would round an RTT on
a LAN or loopback to 0 or 1 ms. Timers are still armed on the loop, with ``call_later``."""


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415 - optional dependency, absent on Windows
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def install_event_loop() -> str:
    """Make new event loops uvloop loops if uvloop is available; returns ``"uvloop"`` or
    ``"asyncio"``. For code that creates its loop with ``asyncio.run``."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a uvloop loop when available, without touching the global
    event loop policy."""
    with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
        return runner.run(main)
