"""Running the asyncio tests of tests/net and tests/interop: each on a fresh standard asyncio
event loop, bounded in time, and ``python -m tsunagu`` as a subprocess that does not block
the loop.

    asynctest = asynctest_within(60)     # a module's decorator: @asynctest async def test_…
    bounded(test, LIMIT)                 # run a nested ``async def test()`` at once
    code, stdout, stderr = await run_tsunagu("turn-probe", …, limit=20)
    process = await start_tsunagu("ice-peer", …, stdin=asyncio.subprocess.PIPE)

Import it after putting its folder (tests/) on ``sys.path``, as the test folders have no
``__init__.py``.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec

if TYPE_CHECKING:
    from tsunagu.aio.ice import IceConnection

__all__ = ["asynctest_within", "bounded", "run_tsunagu", "signal_pair", "start_tsunagu"]

P = ParamSpec("P")


def asynctest_within(
    limit: float,
) -> Callable[[Callable[P, Coroutine[Any, Any, None]]], Callable[P, None]]:
    """A decorator that runs an async test on a fresh asyncio loop and fails it when it
    takes more than ``limit`` seconds."""

    def asynctest(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
        @functools.wraps(test)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            asyncio.run(asyncio.wait_for(test(*args, **kwargs), limit))

        return run

    return asynctest


async def signal_pair(a: IceConnection, b: IceConnection) -> None:
    """What a signalling channel would do between two connections of this process:
    credentials, every local candidate gathered so far and end-of-candidates, both ways."""
    a.set_remote_credentials(b.local_username, b.local_password)
    b.set_remote_credentials(a.local_username, a.local_password)
    for here, there in ((a, b), (b, a)):
        for candidate in there.local_candidates:
            await here.add_remote_candidate(candidate)
        await here.add_remote_candidate(None)


def bounded(test: Callable[[], Awaitable[None]], limit: float) -> None:
    """Run ``test()`` on a fresh asyncio loop; it fails after ``limit`` seconds."""

    async def main() -> None:
        await asyncio.wait_for(test(), limit)

    asyncio.run(main())


async def start_tsunagu(*args: str, stdin: int | None = None) -> asyncio.subprocess.Process:
    """``python -m tsunagu ARGS`` started, its stdout and stderr piped; ``stdin`` as
    :func:`asyncio.create_subprocess_exec` takes it (``asyncio.subprocess.PIPE`` to write to
    the command)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tsunagu",
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_tsunagu(*args: str, limit: float) -> tuple[int, str, str]:
    """``python -m tsunagu ARGS`` to its end, at most ``limit`` seconds (else it is killed):
    its exit code, stdout and stderr."""
    process = await start_tsunagu(*args)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), limit)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
