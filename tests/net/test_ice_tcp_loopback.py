"""ICE over TCP candidates (RFC 6544) with the asyncio driver, on real loopback sockets:
two IceConnections with ``IceConfig(tcp=True)`` that signal each other only their TCP
candidates select a TCP pair and carry data both ways over one framed connection; with
``tcp_simultaneous_open=True`` and only their simultaneous-open candidates signalled, they
connect between the two ports they signalled; a peer whose S-O port does not listen (it
connects only when its own check goes out) is reached too, and one that never connects
fails the pair after a bounded number of refused tries.

Every wait is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tsunagu.aio.ice import IceConnection, IceFailedError, IceStream
from tsunagu.aio.ice_tcp import SO_CONNECT_TIMEOUT, simultaneous_open_supported
from tsunagu.ice.candidate import Candidate, CandidateType, TcpType, TransportProtocol
from tsunagu.ice.checks import check_success
from tsunagu.ice.config import IceConfig
from tsunagu.ice.events import CandidatePairStateChanged, IceEvent, IceTransportState
from tsunagu.ice.pair import PairState
from tsunagu.ice.tcp import Rfc4571Framer, frame
from tsunagu.stun import Message, MessageClass, Method, Username
from tsunagu.stun.credentials import short_term_key

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py
    sys.path.insert(0, _TESTS)
from aiotest import bounded  # noqa: E402

LIMIT = 10.0
TCP = TransportProtocol.TCP
SO = TcpType.SIMULTANEOUS_OPEN

needs_so = pytest.mark.skipif(
    not simultaneous_open_supported(), reason="simultaneous-open candidates need Linux"
)


def loopback(controlling: bool, *, tcp: bool = True, so: bool = False) -> IceConnection:
    return IceConnection(
        controlling,
        host_addresses=["127.0.0.1"],
        allow_loopback=True,
        config=IceConfig(tcp=tcp, tcp_simultaneous_open=so),
    )


async def signal_tcp_only(
    a: IceConnection,
    b: IceConnection,
    keep: Callable[[Candidate], bool] = lambda c: c.transport is TCP,
) -> None:
    """Credentials and the TCP candidates (or those ``keep`` keeps) both ways: the UDP
    ones are filtered out, as a network that blocks UDP would."""
    a.set_remote_credentials(b.local_username, b.local_password)
    b.set_remote_credentials(a.local_username, a.local_password)
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            if keep(candidate):
                await me.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
        await me.add_remote_candidate(None)


async def exchange(a: IceConnection, b: IceConnection) -> None:
    """Five datagrams each way, A's of growing size (2 bytes to 2.4 KB), each arriving
    whole and in order through the RFC 4571 framing."""
    for i in range(5):
        await a.send(b"a%d" % i * (i * 300 + 1))
        await b.send(b"b%d" % i)
    for i in range(5):
        assert await b.recv() == b"a%d" % i * (i * 300 + 1)
        assert await a.recv() == b"b%d" % i


def so_socket() -> socket.socket:
    """A loopback port as a simultaneous-open peer without a listening socket holds it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def so_remote(port: int) -> Candidate:
    return Candidate("9", 1, TCP, 1518280447, "127.0.0.1", port, CandidateType.HOST, tcptype=SO)


async def so_pair_in_progress(events: IceStream[IceEvent]) -> None:
    async for event in events:
        if (
            isinstance(event, CandidatePairStateChanged)
            and event.pair.local.tcptype is SO
            and event.pair.state is PairState.IN_PROGRESS
        ):
            return


@pytest.mark.parametrize("first_controlling", [True, False])
def test_tcp_pair_is_selected_and_carries_data_both_ways(first_controlling: bool) -> None:
    async def test() -> None:
        async with loopback(first_controlling) as a, loopback(not first_controlling) as b:
            await asyncio.gather(a.gather(), b.gather())
            for conn in (a, b):
                kinds = {(c.transport, c.tcptype) for c in conn.local_candidates}
                assert kinds == {
                    (TransportProtocol.UDP, None),
                    (TCP, TcpType.PASSIVE),
                    (TCP, TcpType.ACTIVE),
                }
                ports = [c.port for c in conn.local_candidates if c.tcptype is TcpType.ACTIVE]
                assert ports == [9]  # RFC 6544 §4.5
            await signal_tcp_only(a, b)
            pair_a, pair_b = await asyncio.gather(a.connect(), b.connect())
            for pair in (pair_a, pair_b):
                assert pair.local.transport is TCP and pair.remote.transport is TCP
                assert {pair.local.tcptype, pair.remote.tcptype} == {
                    TcpType.ACTIVE,
                    TcpType.PASSIVE,
                }
            # Both ends name the same connection: A's active end is B's peer-reflexive
            # remote (its ephemeral port), or the other way round.
            active, passive = (
                (pair_a, pair_b) if pair_a.local.tcptype is TcpType.ACTIVE else (pair_b, pair_a)
            )
            assert active.remote.transport_address == passive.local.transport_address
            assert passive.remote.type is CandidateType.PEER_REFLEXIVE
            await exchange(a, b)
            assert a.state in (IceTransportState.CONNECTED, IceTransportState.COMPLETED)
            assert a.selected_pair is not None and a.selected_pair.bytes_received > 0

    bounded(test, LIMIT)


def test_refused_connection_fails_ice() -> None:
    """A TCP check whose connection is refused fails at once (RFC 6544 §7.1)."""

    async def test() -> None:
        with socket.socket() as probe:  # a loopback port nobody listens on
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        async with loopback(True) as a:
            await a.gather()
            a.set_remote_credentials("peer", "peerpasswordpeerpassword")
            await a.add_remote_candidate(
                Candidate(
                    "1",
                    1,
                    TCP,
                    1518280447,
                    "127.0.0.1",
                    closed_port,
                    CandidateType.HOST,
                    tcptype=TcpType.PASSIVE,
                )
            )
            await a.add_remote_candidate(None)
            with pytest.raises(IceFailedError):
                await a.connect()
            assert [p.local.tcptype for p in a.agent.pairs()] == [TcpType.ACTIVE]

    bounded(test, LIMIT)


def test_tcp_is_opt_in() -> None:
    async def test() -> None:
        async with loopback(True, tcp=False) as a:
            await a.gather()
            assert [c.transport for c in a.local_candidates] == [TransportProtocol.UDP]

    bounded(test, LIMIT)


# --- simultaneous open (RFC 6544 §4.1, §7.1) ---------------------------------------------------


@needs_so
def test_simultaneous_open_candidates_are_gathered_when_asked() -> None:
    async def test() -> None:
        async with loopback(True, so=True) as a:
            await a.gather()
            by_type = {c.tcptype: c for c in a.local_candidates if c.transport is TCP}
            assert set(by_type) == {TcpType.ACTIVE, TcpType.PASSIVE, SO}
            so, passive = by_type[SO], by_type[TcpType.PASSIVE]
            assert so.port not in (9, passive.port) and so.type is CandidateType.HOST
            assert so.to_sdp().endswith("typ host tcptype so")
            assert Candidate.from_sdp(so.to_sdp()) == so
            # RFC 6544 §4.2: host type preference, direction preference 2 (S-O) in the
            # top bits of the local preference, below passive (4) and active (6).
            assert so.priority >> 24 == passive.priority >> 24 == 126
            assert (so.priority >> 8 & 0xFFFF) >> 13 == 2
            assert (passive.priority >> 8 & 0xFFFF) >> 13 == 4
            assert so.foundation == passive.foundation  # one per IP and transport
            # The port is held: nobody else can bind it without SO_REUSEPORT.
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("127.0.0.1", so.port))

    bounded(test, LIMIT)


@needs_so
@pytest.mark.parametrize("first_controlling", [True, False])
def test_simultaneous_open_pair_connects_and_carries_data_both_ways(
    first_controlling: bool,
) -> None:
    async def test() -> None:
        async with (
            loopback(first_controlling, so=True) as a,
            loopback(not first_controlling, so=True) as b,
        ):
            await asyncio.gather(a.gather(), b.gather())
            await signal_tcp_only(a, b, keep=lambda c: c.tcptype is SO)
            pair_a, pair_b = await asyncio.gather(a.connect(), b.connect())
            for pair in (pair_a, pair_b):
                assert (pair.local.tcptype, pair.remote.tcptype) == (SO, SO)
                assert pair.remote.type is CandidateType.HOST
            # One connection between the two ports the candidates signalled.
            assert pair_a.local.transport_address == pair_b.remote.transport_address
            assert pair_b.local.transport_address == pair_a.remote.transport_address
            await exchange(a, b)
            for conn in (a, b):
                assert conn.state in (IceTransportState.CONNECTED, IceTransportState.COMPLETED)
                # No peer-reflexive candidate: both ends connect from their signalled ports.
                assert [c.type for c in conn.remote_candidates] == [CandidateType.HOST]

    bounded(test, LIMIT)


@needs_so
def test_simultaneous_open_with_a_peer_that_does_not_listen() -> None:
    """A peer holds its S-O port without listening: our connect is refused (RST) and
    retried; its connect from that port, made once our check is out, is accepted on our S-O
    port and becomes the connection our check waits for. Our checks go over it."""

    async def test() -> None:
        loop = asyncio.get_running_loop()
        peer_pwd = "peerpasswordpeerpassword"
        with so_socket() as peer:
            async with loopback(True, so=True) as a:
                await a.gather()
                (ours,) = [c for c in a.local_candidates if c.tcptype is SO]
                a.set_remote_credentials("peer", peer_pwd)
                in_progress = asyncio.ensure_future(so_pair_in_progress(a.events()))
                await a.add_remote_candidate(so_remote(peer.getsockname()[1]))
                await a.add_remote_candidate(None)
                connected = asyncio.ensure_future(a.connect())
                await asyncio.wait({in_progress, connected}, return_when=asyncio.FIRST_COMPLETED)
                assert in_progress.done(), (
                    connected
                )  # our connect is out, and refused: the peer is closed
                await loop.sock_connect(peer, ours.transport_address)
                framer = Rfc4571Framer()
                checks = 0
                while not connected.done():
                    read = asyncio.ensure_future(loop.sock_recv(peer, 4096))
                    await asyncio.wait({read, connected}, return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        read.cancel()
                        break
                    data = read.result()
                    assert data, "the connection closed"
                    for payload in framer.feed(data):
                        request = Message.decode(payload)
                        assert request.method == Method.BINDING
                        assert request.message_class == MessageClass.REQUEST
                        username = request.get(Username)
                        assert username is not None
                        assert username.value == f"peer:{a.local_username}"
                        checks += 1
                        response = check_success(
                            request, ours.transport_address, short_term_key(peer_pwd)
                        )
                        await loop.sock_sendall(peer, frame(response))
                pair = await connected
                assert checks >= 1
                assert (pair.local.tcptype, pair.remote.tcptype) == (SO, SO)
                assert pair.remote.port == peer.getsockname()[1]
                assert pair.local.transport_address == ours.transport_address

    bounded(test, LIMIT)


@needs_so
@pytest.mark.parametrize("peer", ["closed", "bound, not connecting"])
def test_simultaneous_open_to_a_port_that_never_connects_fails(peer: str) -> None:
    """Every try is refused: after the bounded retries the pair fails, and ICE with it."""

    async def test() -> None:
        with so_socket() as holder:
            port = holder.getsockname()[1]
            if peer == "closed":
                holder.close()
            async with loopback(True, so=True) as a:
                await a.gather()
                a.set_remote_credentials("peer", "peerpasswordpeerpassword")
                await a.add_remote_candidate(so_remote(port))
                await a.add_remote_candidate(None)
                started = time.monotonic()
                with pytest.raises(IceFailedError):
                    await a.connect()
                assert time.monotonic() - started < SO_CONNECT_TIMEOUT
                pairs = a.agent.pairs()
                assert [(p.local.tcptype, p.state) for p in pairs] == [(SO, PairState.FAILED)]

    bounded(test, LIMIT)
