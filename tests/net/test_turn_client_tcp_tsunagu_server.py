"""RFC 6062 TCP allocations: tsunagu's TURN client against tsunagu's TURN server, on loopback.

The server runs in the test's event loop (:class:`tsunagu.aio.turn_server.TurnServer`); peers
are asyncio TCP servers and clients on loopback. Outgoing connections (Connect) and incoming
ones (ConnectionAttempt) are both bound on new data connections (ConnectionBind) and carry
bytes both ways; the coturn interop tests prove the same client against another server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio.turn_client import TurnClient, TurnTarget
from tsunagu.aio.turn_server import TurnServer
from tsunagu.errors import LocalProtocolError, TurnError
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import ClientState, TurnClientConfig

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import asynctest_within, run_tsunagu  # noqa: E402
from loopback_servers import (  # noqa: E402
    PASSWORD,
    USER,
    closed_port,
    make_certificate,
    roundtrip,
    tcp_echo_peer,
    turn_server,
)

WAIT = 5.0
TCP = TurnClientConfig(requested_transport="tcp")
asynctest = asynctest_within(30)


def tcp_relay(server: TurnServer, **kwargs: Any) -> TurnClient:
    """A client for a TCP allocation (RFC 6062) over a TCP control connection."""
    return TurnClient(target(server), USER, PASSWORD, config=kwargs.pop("config", TCP), **kwargs)


def target(server: TurnServer, transport: str = "tcp") -> TurnTarget:
    addresses = server.tls_addresses if transport == "tls" else server.tcp_addresses
    return TurnTarget("127.0.0.1", addresses[0][1], transport)  # type: ignore[arg-type]


def tls_listener(transport: str, directory: Path) -> tuple[dict[str, Any], ssl.SSLContext | None]:
    """For ``tls``: the server settings of a TLS listener with a certificate made in
    ``directory``, and a client context that trusts it; for ``tcp``, none of that."""
    if transport != "tls":
        return {}, None
    cert, key = make_certificate(directory)
    tls = {"tls_listen": (("127.0.0.1", 0),), "cert": str(cert), "key": str(key)}
    return tls, ssl.create_default_context(cafile=str(cert))


# --- outgoing: Connect (RFC 6062 §4.3) -------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_connect_peer_relays_bytes_both_ways(transport: str, tmp_path: Path) -> None:
    tls, context = tls_listener(transport, tmp_path)
    async with turn_server(**tls) as server, tcp_echo_peer() as peer:
        turn = TurnClient(
            target(server, transport), USER, PASSWORD, config=TCP, ssl_context=context
        )
        async with turn:
            reader, writer = await turn.connect_peer(peer.address)
            assert isinstance(writer.transport, asyncio.Transport)
            # The data connection is a new connection to the same server address (§4.3).
            assert writer.get_extra_info("peername")[:2] == turn.server_address
            for i in range(5):
                await roundtrip(reader, writer, b"line %d\n" % i)
            # Bytes that look like STUN or ChannelData are the peer's too (§4.5).
            await roundtrip(reader, writer, bytes(range(256)) * 4)
            # A bulk transfer: flow control works through both relayed legs.
            await roundtrip(reader, writer, b"x" * (1 << 20))
            writer.close()
            await asyncio.wait_for(peer.ended.get(), WAIT)  # our close reached the peer
        assert turn.connection.state is ClientState.CLOSED


@asynctest
async def test_connect_errors_are_typed() -> None:
    async with turn_server() as server, tcp_echo_peer() as peer, tcp_relay(server) as turn:
        # 447: the server could not reach the peer (RFC 6062 §5.2).
        with pytest.raises(TurnError) as failed:
            await turn.connect_peer(("127.0.0.1", closed_port()))
        assert failed.value.code == 447
        # 446: a connection to this peer exists already (§5.2).
        reader, writer = await turn.connect_peer(peer.address)
        with pytest.raises(TurnError) as exists:
            await turn.connect_peer(peer.address)
        assert exists.value.code == 446
        await roundtrip(reader, writer, b"the first connection still works")
        # A UDP call on a TCP allocation is a local mistake, not a network error.
        with pytest.raises(LocalProtocolError):
            await turn.send_to(b"x", peer.address)
    async with (
        turn_server(allow_peers=()) as strict,
        tcp_echo_peer() as peer,
        tcp_relay(strict) as turn,
    ):
        # 403: loopback peers are refused by the default peer policy.
        with pytest.raises(TurnError) as refused:
            await turn.connect_peer(peer.address)
        assert refused.value.code == 403


@asynctest
async def test_tcp_allocation_needs_a_stream_transport() -> None:
    with pytest.raises(ValueError, match="TCP allocation"):
        TurnClient(TurnTarget("127.0.0.1", 3478, "udp"), USER, PASSWORD, config=TCP)
    async with turn_server() as server, TurnClient(target(server), USER, PASSWORD) as udp_relay:
        with pytest.raises(LocalProtocolError, match="requested_transport"):
            await udp_relay.connect_peer(("127.0.0.1", 9))


# --- incoming: ConnectionAttempt (RFC 6062 §4.4) ---------------------------------------


@asynctest
async def test_accept_binds_an_incoming_peer_connection() -> None:
    async with turn_server() as server, tcp_relay(server) as turn:
        await turn.create_permission("127.0.0.1")  # §5.3: only permitted peers get in
        accepting = asyncio.ensure_future(turn.accept())
        peer_reader, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        peer_writer.write(b"hello from the peer")  # before the client even bound
        reader, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer == peer_writer.get_extra_info("sockname")[:2]
        assert await reader.readexactly(19) == b"hello from the peer"
        writer.write(b"hello from the client")
        assert await asyncio.wait_for(peer_reader.readexactly(21), WAIT) == (
            b"hello from the client"
        )
        peer_writer.write(b"z" * 300_000)
        assert await asyncio.wait_for(reader.readexactly(300_000), WAIT) == b"z" * 300_000
        # The peer closes: the client's data connection ends too (§5.5).
        peer_writer.close()
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()


@asynctest
async def test_peer_without_permission_is_never_offered() -> None:
    async with turn_server() as server, tcp_relay(server) as turn:
        await turn.create_permission("127.0.0.1")
        accepting = asyncio.ensure_future(turn.accept())
        # 127.0.0.2 has no permission: the server closes its connection at once (§5.3)
        # and sends no ConnectionAttempt.
        stranger_reader, stranger_writer = await asyncio.open_connection(
            *turn.relayed_address, local_addr=("127.0.0.2", 0)
        )
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(stranger_reader.read(), WAIT) == b""
        stranger_writer.close()
        assert not accepting.done()
        _, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        _, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer == peer_writer.get_extra_info("sockname")[:2]
        writer.close()
        peer_writer.close()


@asynctest
async def test_close_deletes_the_allocation_and_its_connections() -> None:
    async with turn_server() as server, tcp_echo_peer() as peer:
        turn = TurnClient(target(server), USER, PASSWORD, config=TCP)
        await turn.connect()
        reader, writer = await turn.connect_peer(peer.address)
        await roundtrip(reader, writer, b"before close")
        await turn.close()
        # Our end of the data connection is closed, and the server closed the peer's
        # connection with the allocation.
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        await asyncio.wait_for(peer.ended.get(), WAIT)
        with pytest.raises(LocalProtocolError):
            await turn.connect_peer(peer.address)
        with pytest.raises(LocalProtocolError):
            await turn.accept()


@asynctest
async def test_refresh_keeps_the_tcp_allocation_and_its_connections() -> None:
    refreshed = asyncio.Event()

    def on_event(event: ev.TurnClientEvent) -> None:
        if isinstance(event, ev.AllocationRefreshed):
            refreshed.set()

    config = TurnClientConfig(
        requested_transport="tcp", refresh_margin=1e6, refresh_fraction=0.002
    )  # the allocation is refreshed about 1.2 s in; 1 s nonces make that meet a 438 first
    async with (
        turn_server(nonce_lifetime=1.0) as server,
        tcp_echo_peer() as peer,
        tcp_relay(server, config=config, on_event=on_event) as turn,
    ):
        reader, writer = await turn.connect_peer(peer.address)
        await roundtrip(reader, writer, b"before refresh")
        await asyncio.wait_for(refreshed.wait(), WAIT)
        await roundtrip(reader, writer, b"after refresh")
        # A second peer connection after the nonce went stale: Connect and
        # ConnectionBind retry with a fresh nonce.
        async with tcp_echo_peer() as other:
            reader2, writer2 = await turn.connect_peer(other.address)
            await roundtrip(reader2, writer2, b"second connection")
            writer2.close()
        writer.close()


# --- uvloop, and tsunagu turn-probe --tcp ----------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_connect_and_accept_on_uvloop(transport: str, tmp_path: Path) -> None:
    """The CLI runs on uvloop, whose transports and TLS differ from asyncio's own."""
    from tsunagu.aio.loop import run

    async def scenario() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        tls, context = tls_listener(transport, tmp_path)
        async with (
            turn_server(**tls) as server,
            tcp_echo_peer() as peer,
            TurnClient(
                target(server, transport), USER, PASSWORD, config=TCP, ssl_context=context
            ) as turn,
        ):
            reader, writer = await turn.connect_peer(peer.address)
            await roundtrip(reader, writer, b"out via uvloop" * 1000)
            accepting = asyncio.ensure_future(turn.accept())
            peer_reader, peer_writer = await asyncio.open_connection(*turn.relayed_address)
            peer_writer.write(b"in via uvloop")
            reader2, writer2, _ = await asyncio.wait_for(accepting, WAIT)
            assert await asyncio.wait_for(reader2.readexactly(13), WAIT) == b"in via uvloop"
            writer2.write(b"and back")
            assert await asyncio.wait_for(peer_reader.readexactly(8), WAIT) == b"and back"
            for stream in (writer, writer2, peer_writer):
                stream.close()

    run(asyncio.wait_for(scenario(), 30))


@asynctest
async def test_turn_probe_tcp_through_our_server() -> None:
    async with turn_server() as server:
        port = server.tcp_addresses[0][1]
        code, stdout, stderr = await run_tsunagu(
            "turn-probe",
            f"turn:127.0.0.1:{port}?transport=tcp",
            "-u",
            USER,
            "-p",
            PASSWORD,
            "--tcp",
            "--json",
            "--count",
            "3",
            limit=20,
        )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["relay"] == "tcp" and report["transport"] == "tcp"
    assert report["relayed"].startswith("127.0.0.1:")
    assert report["sent"] == 3 and report["received"] == 3 and report["lost"] == 0
