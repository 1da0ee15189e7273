"""tsunagu's TURN client against tsunagu's own TURN server, on loopback sockets.

The server runs in the test's event loop (:class:`tsunagu.aio.turn_server.TurnServer`), the
peer is a UDP echo socket; the coturn interop tests prove the same client against a server
written by others.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast

import pytest

from tsunagu.aio.turn_client import TurnClient, TurnTarget
from tsunagu.errors import TurnError
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import TurnClientConfig

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import asynctest_within  # noqa: E402
from loopback_servers import PASSWORD, USER, start_turn_server  # noqa: E402

WAIT = 10.0
asynctest = asynctest_within(60)


class Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)


async def echo_peer() -> tuple[asyncio.DatagramTransport, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    address = transport.get_extra_info("sockname")
    return transport, (address[0], address[1])


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@asynctest
async def test_allocate_exchange_refresh_close(transport: str) -> None:
    server = await start_turn_server(nonce_lifetime=1.0)
    echo, peer = await echo_peer()
    seen: list[ev.TurnClientEvent] = []
    refreshed = asyncio.Event()

    def on_event(event: ev.TurnClientEvent) -> None:
        seen.append(event)
        if isinstance(event, ev.AllocationRefreshed):
            refreshed.set()

    port = (server.udp_addresses if transport == "udp" else server.tcp_addresses)[0][1]
    config = TurnClientConfig(refresh_margin=1e6, refresh_fraction=0.003)  # refresh at ~2 s
    target = TurnTarget("127.0.0.1", port, transport)  # type: ignore[arg-type]
    try:
        async with TurnClient(target, USER, PASSWORD, config=config, on_event=on_event) as turn:
            assert turn.relayed_address[0] == "127.0.0.1"
            for i in range(10):
                await turn.send_to(b"hello %d" % i, peer)
                data, source = await asyncio.wait_for(turn.recv_from(), WAIT)
                assert (data, source) == (b"hello %d" % i, peer)
            # With 1 s nonces, the refresh meets 438 Stale Nonce first and retries.
            await asyncio.wait_for(refreshed.wait(), WAIT)
            await turn.send_to(b"after refresh", peer)
            assert await asyncio.wait_for(turn.recv_from(), WAIT) == (b"after refresh", peer)
            assert turn.connection.stats.received_channel_data > 0
        assert ev.Closed() in seen
    finally:
        echo.close()
        await server.close()


@asynctest
async def test_wrong_password_and_refused_peer() -> None:
    server = await start_turn_server(allow_peers=())  # default policy: loopback peers refused
    echo, peer = await echo_peer()
    target = TurnTarget("127.0.0.1", server.udp_addresses[0][1], "udp")
    try:
        with pytest.raises(TurnError) as caught:
            async with TurnClient(target, USER, "wrong"):
                pass
        assert caught.value.code == 401
        async with TurnClient(target, USER, PASSWORD) as turn:
            with pytest.raises(TurnError) as refused:
                await turn.send_to(b"x", peer)
            assert refused.value.code == 403
    finally:
        echo.close()
        await server.close()
