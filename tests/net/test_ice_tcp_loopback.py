"""ICE over TCP candidates (RFC 6544) with the asyncio driver, on real loopback sockets:
two IceConnections with ``IceConfig(tcp=True)`` that signal each other only their TCP
candidates select a TCP pair and carry data both ways over one framed connection.

Every wait is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from tsunagu.aio.ice import IceConnection, IceFailedError
from tsunagu.ice.candidate import Candidate, CandidateType, TcpType, TransportProtocol
from tsunagu.ice.config import IceConfig
from tsunagu.ice.events import IceTransportState

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py
    sys.path.insert(0, _TESTS)
from aiotest import bounded  # noqa: E402

LIMIT = 10.0
TCP = TransportProtocol.TCP


def loopback(controlling: bool, *, tcp: bool = True) -> IceConnection:
    return IceConnection(
        controlling, host_addresses=["127.0.0.1"], allow_loopback=True, config=IceConfig(tcp=tcp)
    )


async def signal_tcp_only(a: IceConnection, b: IceConnection) -> None:
    """Credentials and the TCP candidates both ways: the UDP ones are filtered out, as a
    network that blocks UDP would."""
    a.set_remote_credentials(b.local_username, b.local_password)
    b.set_remote_credentials(a.local_username, a.local_password)
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            if candidate.transport is TCP:
                await me.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
        await me.add_remote_candidate(None)


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
            for i in range(5):
                await a.send(b"a%d" % i * (i * 300 + 1))
                await b.send(b"b%d" % i)
            for i in range(5):
                assert await b.recv() == b"a%d" % i * (i * 300 + 1)
                assert await a.recv() == b"b%d" % i
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
