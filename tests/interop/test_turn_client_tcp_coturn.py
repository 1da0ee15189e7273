"""RFC 6062 TCP allocations: tsunagu's TURN client against a real coturn ``turnserver``.

coturn relays TCP unless started with ``--no-tcp-relay``; it is started here the way
test_turn_client_coturn.py starts it (its :class:`Coturn` helper), with
``--allow-loopback-peers`` since the peers are asyncio TCP servers and clients on loopback.
A missing coturn FAILS these tests, it never skips them.

Covered: an outgoing connection (Connect, then ConnectionBind on a new connection, §4.3) and
an incoming one (ConnectionAttempt, then ConnectionBind, §4.4), each with bytes both ways,
over TCP and TLS control connections; coturn's 447, 446 and 403 as typed errors; and
``tsunagu turn-probe --tcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio.turn_client import TurnClient
from tsunagu.errors import TurnError
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import ClientState, TurnClientConfig

_HERE = Path(__file__).resolve().parent
for folder in (_HERE, _HERE.parent):  # coturn.py here, aiotest.py and loopback_servers.py in tests/
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
from coturn import PASSWORD, USER, Coturn, coturn_fixture  # noqa: E402

from aiotest import asynctest_within, run_tsunagu  # noqa: E402
from loopback_servers import closed_port, roundtrip, tcp_echo_peer  # noqa: E402

pytestmark = pytest.mark.interop

WAIT = 5.0  # upper bound for any single exchange with a local coturn
TCP = TurnClientConfig(requested_transport="tcp")
asynctest = asynctest_within(30)

coturn = coturn_fixture("coturn")
strict_coturn = coturn_fixture("strict_coturn", permissive=False)
"""coturn's default peer policy: loopback peers are refused."""


def tcp_relay(coturn: Coturn, transport: str = "tcp", **kwargs: Any) -> TurnClient:
    return TurnClient(
        coturn.target(transport),
        USER,
        PASSWORD,
        config=TCP,
        ssl_context=coturn.ssl_context(),
        **kwargs,
    )


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_outgoing_connection_through_coturn(coturn: Coturn, transport: str) -> None:
    seen: list[ev.TurnClientEvent] = []
    async with (
        tcp_echo_peer() as peer,
        tcp_relay(coturn, transport, on_event=seen.append) as turn,
    ):
        relayed = turn.relayed_address
        assert relayed[0] == "127.0.0.1"
        reader, writer = await turn.connect_peer(peer.address)
        await roundtrip(reader, writer, b"hello through coturn")
        assert await asyncio.wait_for(peer.first.get(), WAIT) == b"hello through coturn"
        await roundtrip(reader, writer, bytes(range(256)) * 16)  # no framing either way
        await roundtrip(reader, writer, b"y" * 500_000)
        writer.close()
    # The permission came first (created as for UDP), then the Connect's CONNECTION-ID.
    created = seen.index(ev.PermissionCreated("127.0.0.1"))
    succeeded = next(i for i, e in enumerate(seen) if isinstance(e, ev.ConnectSucceeded))
    assert created < succeeded
    assert turn.connection.state is ClientState.CLOSED


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_incoming_connection_through_coturn(coturn: Coturn, transport: str) -> None:
    async with tcp_relay(coturn, transport) as turn:
        await turn.create_permission("127.0.0.1")  # RFC 6062 §5.3: only permitted peers
        accepting = asyncio.ensure_future(turn.accept())
        peer_reader, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        peer_writer.write(b"knock knock")  # buffered by coturn until the bind
        reader, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer == peer_writer.get_extra_info("sockname")[:2]
        assert await asyncio.wait_for(reader.readexactly(11), WAIT) == b"knock knock"
        writer.write(b"who is there?")
        await writer.drain()
        assert await asyncio.wait_for(peer_reader.readexactly(13), WAIT) == b"who is there?"
        peer_writer.write(b"p" * 200_000)
        assert await asyncio.wait_for(reader.readexactly(200_000), WAIT) == b"p" * 200_000
        peer_writer.close()
        # The peer's close ends the data connection (§5.5); coturn does so with a reset.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        assert reader.at_eof() or reader.exception() is not None
        writer.close()


@asynctest
async def test_unpermitted_peer_is_turned_away(coturn: Coturn) -> None:
    async with tcp_relay(coturn) as turn:
        await turn.create_permission("127.0.0.1")
        accepting = asyncio.ensure_future(turn.accept())
        # 127.0.0.2 has no permission: coturn drops its connection (§5.3).
        with contextlib.suppress(ConnectionError):
            stranger_reader, stranger_writer = await asyncio.open_connection(
                *turn.relayed_address, local_addr=("127.0.0.2", 0)
            )
            assert await asyncio.wait_for(stranger_reader.read(), WAIT) == b""
            stranger_writer.close()
        assert not accepting.done()
        _, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        _, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer[0] == "127.0.0.1"
        writer.close()
        peer_writer.close()


@asynctest
async def test_coturn_connect_errors(coturn: Coturn) -> None:
    closed = ("127.0.0.1", closed_port())  # nothing listens there
    async with tcp_echo_peer() as peer, tcp_relay(coturn) as turn:
        with pytest.raises(TurnError) as failed:
            await turn.connect_peer(closed)
        assert failed.value.code == 447  # Connection Timeout or Failure
        reader, writer = await turn.connect_peer(peer.address)
        with pytest.raises(TurnError) as exists:
            await turn.connect_peer(peer.address)
        assert exists.value.code == 446  # Connection Already Exists
        await roundtrip(reader, writer, b"still fine")
        writer.close()


@asynctest
async def test_coturn_refuses_loopback_peers_with_403(strict_coturn: Coturn) -> None:
    async with tcp_echo_peer() as peer, tcp_relay(strict_coturn) as turn:
        with pytest.raises(TurnError) as refused:
            await turn.connect_peer(peer.address)
        assert refused.value.code == 403


# --- tsunagu turn-probe --tcp --------------------------------------------------------------


async def probe(*args: str) -> tuple[int, str, str]:
    return await run_tsunagu("turn-probe", *args, limit=20)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_probe_tcp_relay(coturn: Coturn, transport: str) -> None:
    code, stdout, stderr = await probe(
        coturn.uri(transport), "-u", USER, "-p", PASSWORD, "--tcp", "--json",
        "--cafile", str(coturn.cert),
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["relay"] == "tcp" and report["transport"] == transport
    assert report["relayed"].startswith("127.0.0.1:") and report["peer"].startswith("127.0.0.1:")
    assert report["sent"] == 5 and report["lost"] == 0 and report["rtt_ms"] is not None


@asynctest
async def test_probe_tcp_unreachable_peer_is_447(coturn: Coturn) -> None:
    port = closed_port()
    code, stdout, stderr = await probe(
        coturn.uri("tcp"), "-u", USER, "-p", PASSWORD, "--tcp", "--peer", f"127.0.0.1:{port}",
    )  # fmt: skip
    assert code == 1
    assert "447 connection timeout or failure" in stderr
    assert "relayed address: 127.0.0.1:" in stdout  # the allocation itself worked


def test_probe_tcp_needs_a_stream_transport(coturn: Coturn) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", "turn-probe", coturn.uri("udp"), "-u", USER,
         "-p", PASSWORD, "--tcp"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--tcp needs a TCP or TLS server" in done.stderr
