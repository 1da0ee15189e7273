"""The public asyncio ICE API beyond connect/send/recv, on real loopback sockets: trickled
local candidates (:meth:`IceConnection.local_candidates_trickled`, also through ``tsunagu
ice-peer``), remote candidates added during checks and after end-of-candidates, ICE
restart with data flowing across it, two components, and the event stream and callbacks.

No test sleeps in place of an event: gathering is held back by a STUN server that answers
only when the test releases it, and every wait is bounded (``LIMIT``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import cast

from tsunagu.aio.ice import IceConnection, TurnServer
from tsunagu.ice.candidate import Address, Candidate, CandidateType
from tsunagu.ice.checks import check_request
from tsunagu.ice.config import IceConfig
from tsunagu.ice.events import (
    CandidateGathered,
    ConnectionStateChanged,
    GatheringComplete,
    IceEvent,
    IceTransportState,
    PeerReflexiveCandidate,
    SelectedPairChanged,
)
from tsunagu.ice.pair import PairInfo
from tsunagu.ice.servers import IceServer
from tsunagu.stun.attributes import XorMappedAddress
from tsunagu.stun.constants import MessageClass
from tsunagu.stun.credentials import short_term_key
from tsunagu.stun.message import Message, new_transaction_id, success_response

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import bounded, signal_pair, start_tsunagu  # noqa: E402
from loopback_servers import PASSWORD, USER, start_turn_server  # noqa: E402

LIMIT = 10.0
MAPPED = ("203.0.113.7", 40000)
"""What the held STUN server says our address is (a documentation address: it only ever
appears in a candidate, no datagram goes there)."""


def loopback(
    controlling: bool,
    *,
    stun_servers: list[Address] | None = None,
    turn_servers: list[TurnServer] | None = None,
    components: int = 1,
) -> IceConnection:
    return IceConnection(
        controlling,
        host_addresses=["127.0.0.1"],
        allow_loopback=True,
        stun_servers=stun_servers or [],
        turn_servers=turn_servers or [],
        components=components,
    )


async def trickle_to(source: IceConnection, sink: IceConnection) -> None:
    """Signalling with trickle ICE: each local candidate of ``source`` goes to ``sink`` as
    soon as it is known, then end-of-candidates."""
    async for candidate in source.local_candidates_trickled():
        await sink.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
    await sink.add_remote_candidate(None)


def exchange_credentials(a: IceConnection, b: IceConnection) -> None:
    a.set_remote_credentials(b.local_username, b.local_password)
    b.set_remote_credentials(a.local_username, a.local_password)


class HeldStunServer(asyncio.DatagramProtocol):
    """A STUN server that keeps Binding requests until :meth:`release`, then answers each
    with XOR-MAPPED-ADDRESS ``MAPPED``: gathering cannot complete before the test says so."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.held: list[tuple[Message, tuple[str, int]]] = []
        self.asked = asyncio.get_running_loop().create_future()
        self.released = False

    @classmethod
    async def start(cls) -> tuple[HeldStunServer, Address]:
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        address = transport.get_extra_info("sockname")
        return server, (address[0], address[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.held.append((Message.decode(data), addr))
        if not self.asked.done():
            self.asked.set_result(None)
        if self.released:
            self.release()

    def release(self) -> None:
        self.released = True
        held, self.held = self.held, []
        assert self.transport is not None
        for request, addr in held:
            response = success_response(request, [XorMappedAddress(MAPPED)])
            self.transport.sendto(response.encode(fingerprint=True), addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- trickle ---------------------------------------------------------------------------------


def test_candidates_trickle_and_connect_before_gathering_completes() -> None:
    """The host candidate is trickled while the server-reflexive request is still
    unanswered; the peer gets it at once and the two connect and exchange data before
    ``a``'s gathering is over. Released, the server-reflexive candidate follows, then
    end-of-candidates; the callback and the event stream saw the same."""

    async def test() -> None:
        server, address = await HeldStunServer.start()
        seen: list[Candidate | None] = []
        try:
            async with loopback(True, stun_servers=[address]) as a, loopback(False) as b:
                a.on_local_candidate = seen.append
                events = a.events()
                trickled = a.local_candidates_trickled()
                gathering = asyncio.create_task(a.gather())
                first = await anext(trickled)
                assert first.type is CandidateType.HOST and first.address == "127.0.0.1"
                await server.asked  # the request is out, and held
                assert not gathering.done()

                await b.gather()
                exchange_credentials(a, b)
                await b.add_remote_candidate(first)  # trickled: no need to wait for more
                await trickle_to(b, a)
                pair, _ = await asyncio.gather(a.connect(), b.connect())
                assert pair.local == first
                await a.send(b"before gathering completed")
                assert await b.recv() == b"before gathering completed"
                assert not gathering.done() and not a.agent.gathering_complete
                assert a.state is IceTransportState.CONNECTED  # not completed: still gathering

                server.release()
                rest = [candidate async for candidate in trickled]
                await gathering
                assert [c.type for c in rest] == [CandidateType.SERVER_REFLEXIVE]
                assert rest[0].transport_address == MAPPED
                assert rest[0].related_address == "127.0.0.1" and rest[0].related_port == first.port
                assert seen == [first, rest[0], None]
                assert a.local_candidates == [first, rest[0]]
                # A stream made now replays the session's candidates and ends at once.
                assert [c async for c in a.local_candidates_trickled()] == [first, rest[0]]

                await b.add_remote_candidate(rest[0])
                await b.add_remote_candidate(None)
                received: list[IceEvent] = []
                final = None
                async for event in events:
                    received.append(event)
                    if isinstance(event, ConnectionStateChanged) and event.state in (
                        IceTransportState.COMPLETED,
                        IceTransportState.FAILED,
                    ):
                        final = event.state
                        break
                await events.aclose()
                assert final is IceTransportState.COMPLETED
                gathered = [
                    e for e in received if isinstance(e, CandidateGathered | GatheringComplete)
                ]
                assert gathered == [
                    CandidateGathered(first),
                    CandidateGathered(rest[0]),
                    GatheringComplete(),
                ]
        finally:
            server.close()

    bounded(test, LIMIT)


def test_relayed_candidate_is_trickled_after_host_candidate() -> None:
    """With a TURN server, gathering waits for the allocation: the host candidate is out
    before, the relayed one after; both sides trickle to each other while they gather
    and connect over them."""

    async def test() -> None:
        turn = await start_turn_server()
        relay = TurnServer(f"turn:127.0.0.1:{turn.udp_addresses[0][1]}", USER, PASSWORD)
        try:
            async with loopback(True, turn_servers=[relay]) as a, loopback(False) as b:
                exchange_credentials(a, b)  # before gathering: trickle from the start
                trickled = a.local_candidates_trickled()
                gathering = asyncio.gather(a.gather(), b.gather())
                first = await anext(trickled)
                assert first.type is CandidateType.HOST
                assert not a.agent.gathering_complete  # the allocation is under way
                await b.add_remote_candidate(first)
                rest = [c async for c in trickled]
                assert [c.type for c in rest] == [CandidateType.RELAYED]
                await b.add_remote_candidate(rest[0])
                await b.add_remote_candidate(None)
                await asyncio.gather(gathering, trickle_to(b, a))
                await asyncio.gather(a.connect(), b.connect())
                await b.send(b"trickled")
                assert await a.recv() == b"trickled"
        finally:
            await turn.close()

    bounded(test, LIMIT)


def test_remote_candidates_added_during_checks_and_peer_reflexive_after_end() -> None:
    """``a`` is already checking (a candidate that never answers) when ``b``'s real one
    arrives: it is paired and wins. ``c`` got end-of-candidates with only the silent
    candidate: ``d``'s checks still reach it, and it connects over the peer-reflexive
    candidate they reveal."""

    async def test() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind(("127.0.0.1", 0))  # receives checks, answers none
            silent = Candidate.from_sdp(
                f"candidate:9 1 udp 2130706431 127.0.0.1 {sink.getsockname()[1]} typ host"
            )
            async with loopback(True) as a, loopback(False) as b:
                await asyncio.gather(a.gather(), b.gather())
                exchange_credentials(a, b)
                events = a.events()
                await a.add_remote_candidate(silent)
                async for event in events:
                    if isinstance(event, ConnectionStateChanged):
                        assert event.state is IceTransportState.CHECKING
                        break
                await events.aclose()
                for candidate in b.local_candidates:
                    await a.add_remote_candidate(candidate)
                await trickle_to(a, b)
                pair, _ = await asyncio.gather(a.connect(), b.connect())
                assert pair.remote.transport_address == b.local_candidates[0].transport_address
                await a.send(b"added while checking")
                assert await b.recv() == b"added while checking"

            async with loopback(False) as c, loopback(True) as d:
                await asyncio.gather(c.gather(), d.gather())
                exchange_credentials(c, d)
                events = c.events()
                await c.add_remote_candidate(silent)
                await c.add_remote_candidate(None)  # d's real candidate never comes
                await trickle_to(c, d)
                pair, _ = await asyncio.gather(c.connect(), d.connect())
                assert pair.remote.type is CandidateType.PEER_REFLEXIVE
                assert pair.remote.transport_address == d.local_candidates[0].transport_address
                learnt = []
                async for event in events:
                    if isinstance(event, PeerReflexiveCandidate):
                        learnt.append(event)
                    if isinstance(event, SelectedPairChanged):
                        break
                await events.aclose()
                assert [(e.candidate, e.local) for e in learnt] == [(pair.remote, False)]
                await d.send(b"peer-reflexive")
                assert await c.recv() == b"peer-reflexive"

    bounded(test, LIMIT)


def test_ice_peer_prints_candidates_as_they_are_gathered() -> None:
    """``tsunagu ice-peer`` prints its credentials and host candidate while the STUN
    server still holds its request, the server-reflexive candidate once released, then
    end-of-candidates (the documented line format)."""

    async def test() -> None:
        server, (host, port) = await HeldStunServer.start()
        proc = await start_tsunagu(
            "ice-peer",
            "--role",
            "controlling",
            "--timeout",
            "8",
            f"--stun=stun:{host}:{port}",
            stdin=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None

            async def line() -> dict[str, object]:
                assert proc.stdout is not None
                parsed: dict[str, object] = json.loads(await proc.stdout.readline())
                return parsed

            credentials = await line()
            assert set(credentials) == {"ufrag", "pwd"}
            first = await line()  # printed while the request is held: before gathering ends
            await server.asked
            assert Candidate.from_sdp(str(first["candidate"])).type is CandidateType.HOST
            server.release()
            second = await line()
            srflx = Candidate.from_sdp(str(second["candidate"]))
            assert srflx.type is CandidateType.SERVER_REFLEXIVE
            assert srflx.transport_address == MAPPED
            assert await line() == {"end-of-candidates": True}
        finally:
            server.close()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    bounded(test, LIMIT)


# -- restart ---------------------------------------------------------------------------------


async def connected_pair(a: IceConnection, b: IceConnection) -> tuple[PairInfo, PairInfo]:
    await asyncio.gather(a.gather(), b.gather())
    exchange_credentials(a, b)
    await asyncio.gather(trickle_to(a, b), trickle_to(b, a))
    return await asyncio.gather(a.connect(), b.connect())


class Counter:
    """Numbered datagrams both ways, each awaited before the next goes: a lost or
    reordered one fails the test (at once, or at the bounded wait)."""

    def __init__(self, a: IceConnection, b: IceConnection) -> None:
        self.a, self.b = a, b
        self.sent = 0
        self.during_restart = 0

    async def exchange(self) -> None:
        message = f"{self.sent:06d}".encode()
        if self.a.restarting or self.b.restarting:
            self.during_restart += 1
        await self.a.send(message)
        assert await asyncio.wait_for(self.b.recv(), 2) == message
        await self.b.send(message)
        assert await asyncio.wait_for(self.a.recv(), 2) == message
        self.sent += 1


def check_response(
    sender: IceConnection, receiver: Address, credentials: tuple[str, str, str]
) -> Message:
    """Send one connectivity check to ``receiver`` from a socket of our own, with
    ``(receiver's ufrag, receiver's pwd, sender's ufrag)``, and return the answer."""
    ufrag, pwd, sender_ufrag = credentials
    request = check_request(
        new_transaction_id(),
        local_ufrag=sender_ufrag,
        remote_ufrag=ufrag,
        remote_key=short_term_key(pwd),
        priority=1,
        controlling=sender.ice_controlling,
        tie_breaker=sender.agent.tie_breaker,
        use_candidate=False,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(2)
        probe.sendto(request, receiver)
        return Message.decode(probe.recv(2048))


def test_restart_keeps_data_on_the_old_pair_until_the_new_one_is_selected() -> None:
    """``a`` restarts; ``b`` learns ``a``'s new credentials and restarts in answer; the
    new candidates are trickled. Numbered datagrams flow both ways the whole time, none
    lost; then both have the new session's pair, data goes over it, and only the new
    credentials are still accepted."""

    async def test() -> None:
        async with loopback(True) as a, loopback(False) as b:
            await connected_pair(a, b)
            old = (b.local_username, b.local_password, a.local_username)
            a_events, b_events = a.events(), b.events()
            counter = Counter(a, b)
            await counter.exchange()
            old_pair = a.selected_pair
            assert old_pair is not None

            await a.restart()
            assert a.restarting and not b.restarting
            assert a.remote_username is None  # the peer's new ones are to come
            for _ in range(3):
                await counter.exchange()  # over the old pair: the peer knows nothing yet

            b.remote_username = a.local_username  # one half of the peer's restart:
            assert not b.restarting  # nothing happens until the other half
            b.remote_password = a.local_password
            assert b.restarting and b.local_username != old[0]
            for _ in range(3):
                await counter.exchange()
            during = a.selected_pair  # still the previous session's: it carried all six
            assert during is not None and during.bytes_sent == old_pair.bytes_sent + 6 * 6

            a.set_remote_credentials(b.local_username, b.local_password)
            trickles = asyncio.gather(trickle_to(a, b), trickle_to(b, a))
            connecting = asyncio.gather(a.connect(), b.connect())
            while not connecting.done():
                await counter.exchange()  # data keeps flowing while the new pair is checked
            new_a, new_b = await connecting
            await trickles
            assert not a.restarting and not b.restarting
            assert counter.during_restart >= 6

            before = counter.sent
            for _ in range(3):
                await counter.exchange()
            selected = a.selected_pair
            assert selected is not None and selected.remote == new_a.remote
            # The new session's pair has carried what went after the switch, and only that.
            assert (counter.sent - before) * 6 <= selected.bytes_sent < counter.sent * 6

            for events, pair in ((a_events, new_a), (b_events, new_b)):
                changes: list[IceEvent] = []
                async for event in events:
                    if isinstance(event, ConnectionStateChanged | SelectedPairChanged):
                        changes.append(event)
                    if (
                        isinstance(event, ConnectionStateChanged)
                        and event.state is IceTransportState.COMPLETED
                    ):
                        break
                await events.aclose()
                assert [type(e) for e in changes] == [
                    ConnectionStateChanged,
                    SelectedPairChanged,
                    ConnectionStateChanged,
                ]
                assert changes[0] == ConnectionStateChanged(
                    IceTransportState.CONNECTED, IceTransportState.COMPLETED
                )
                assert isinstance(changes[1], SelectedPairChanged)
                assert changes[1].component == 1 and changes[1].pair is not None
                assert changes[1].pair.remote == pair.remote

            # The previous session is gone: its credentials are refused (401), the new
            # ones accepted.
            b_address = b.local_candidates[0].transport_address
            loop = asyncio.get_running_loop()
            refused = await loop.run_in_executor(None, check_response, a, b_address, old)
            assert refused.message_class is MessageClass.ERROR
            assert refused.error is not None and refused.error.code == 401
            new = (b.local_username, b.local_password, a.local_username)
            accepted = await loop.run_in_executor(None, check_response, a, b_address, new)
            assert accepted.message_class is MessageClass.SUCCESS

    bounded(test, LIMIT)


# -- components ------------------------------------------------------------------------------


def test_two_components_connect_and_carry_data_each() -> None:
    async def test() -> None:
        async with loopback(True, components=2) as a, loopback(False, components=2) as b:
            assert a.components == 2
            await connected_pair(a, b)
            for conn in (a, b):
                assert sorted(c.component for c in conn.local_candidates) == [1, 2]
                pairs = conn.selected_pairs
                assert sorted(pairs) == [1, 2]
                assert pairs[1].local.port != pairs[2].local.port
                assert all(pair.component == c for c, pair in pairs.items())
            for component in (1, 2, 2, 1):
                await a.send(f"a{component}".encode(), component=component)
                assert await b.recvfrom() == (f"a{component}".encode(), component)
                await b.sendto(f"b{component}".encode(), component)
                assert await a.recvfrom() == (f"b{component}".encode(), component)

    bounded(test, LIMIT)


# -- events ----------------------------------------------------------------------------------


def test_state_and_selected_pair_events_and_callbacks() -> None:
    """The event stream and the callbacks report the same state changes and selected
    pair; the stream's last event is the change to closed, then it ends."""

    async def test() -> None:
        b = loopback(False)
        async with loopback(True) as a:
            states: list[IceTransportState] = []
            selections: list[tuple[int, PairInfo | None]] = []
            a.on_state_change = states.append
            a.on_selected_pair_change = lambda component, pair: selections.append((component, pair))
            events = a.events()
            pair, _ = await connected_pair(a, b)
            assert [(c, p.local, p.remote) for c, p in selections if p] == [
                (1, pair.local, pair.remote)
            ]
            assert len(selections) == 1
            connected = list(states)
            assert connected[0] is IceTransportState.CHECKING
            assert connected[-1] is IceTransportState.COMPLETED
            await b.close()
        await a.close()
        received = [event async for event in events]
        streamed = [e.state for e in received if isinstance(e, ConnectionStateChanged)]
        assert streamed == states and states[-1] is IceTransportState.CLOSED
        assert [e for e in received if isinstance(e, SelectedPairChanged)] == [
            SelectedPairChanged(*selections[0])
        ]
        assert [c async for c in a.events()] == []  # closed: nothing more will come

    bounded(test, LIMIT)


def test_ice_servers_and_relay_policy_like_rtc_configuration() -> None:
    """``ice_servers`` (RTCIceServer) and ``transport_policy="relay"``: a STUN URL and a
    TURN URL with credentials; the relay policy leaves only the relayed candidate, and the
    connection works through it."""

    async def test() -> None:
        server = await start_turn_server()
        port = server.udp_addresses[0][1]
        servers = [
            IceServer(f"stun:127.0.0.1:{port}"),
            IceServer(f"turn:127.0.0.1:{port}?transport=udp", username=USER, credential=PASSWORD),
        ]
        try:
            async with (
                IceConnection(
                    True, ice_servers=servers, transport_policy="relay", allow_loopback=True
                ) as ours,
                IceConnection(False, host_addresses=["127.0.0.1"], allow_loopback=True) as peer,
            ):
                await asyncio.gather(ours.gather(), peer.gather())
                assert [c.type for c in ours.local_candidates] == [CandidateType.RELAYED]
                await signal_pair(ours, peer)
                pair, _ = await asyncio.gather(ours.connect(), peer.connect())
                assert pair.local.type is CandidateType.RELAYED
                await ours.send(b"through the relay")
                assert await peer.recv() == b"through the relay"
        finally:
            await server.close()

    bounded(test, LIMIT)


def test_ice_lite_connection_serves_a_full_agent() -> None:
    """An ICE-lite IceConnection (a server's, RFC 8445 §2.5): host candidates only, no
    checks of its own; the full agent controls, nominates, and data flows both ways."""

    async def test() -> None:
        async with (
            IceConnection(
                False,
                host_addresses=["127.0.0.1"],
                allow_loopback=True,
                config=IceConfig(lite=True),
            ) as lite,
            IceConnection(True, host_addresses=["127.0.0.1"], allow_loopback=True) as full,
        ):
            await asyncio.gather(lite.gather(), full.gather())
            await signal_pair(lite, full)
            pair, lite_pair = await asyncio.gather(full.connect(), lite.connect())
            assert pair.nominated and lite_pair.nominated
            assert pair.requests_sent >= 1 and lite_pair.requests_sent == 0  # lite never checks
            await full.send(b"to the server")
            assert await lite.recv() == b"to the server"
            await lite.send(b"to the client")
            assert await full.recv() == b"to the client"

    bounded(test, LIMIT)
