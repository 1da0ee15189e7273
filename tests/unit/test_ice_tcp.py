"""ICE TCP candidates (RFC 6544) in the sans-I/O agent: priorities, pairing, connections
the agent asks for and is told about, checks and data framed with RFC 4571, peer-reflexive
candidates of accepted connections, and what a failed or closed connection does.

:class:`TcpNet` plays the operating system on virtual time: it opens the connections the
agents request (to whichever agent listens at the address), hands accepted ones to the
listener, carries the framed bytes (optionally cut into small chunks) and reports closes.
"""

from __future__ import annotations

import heapq
import itertools
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsunagu.errors import LocalProtocolError
from tsunagu.ice import (
    Candidate,
    CandidatePairStateChanged,
    CandidateType,
    ConnectionStateChanged,
    ConsentLost,
    DataReceived,
    IceAgent,
    IceConfig,
    IceEvent,
    IceNotConnectedError,
    IceTransportState,
    PairState,
    PeerReflexiveCandidate,
    SelectedPairChanged,
    TcpCloseRequested,
    TcpConnectRequested,
    TcpType,
    Transmit,
    TransportProtocol,
)
from tsunagu.ice.candidate import Address
from tsunagu.ice.checks import check_request
from tsunagu.ice.tcp import MAX_FRAME, Rfc4571Framer, TcpConnections, frame
from tsunagu.stun import Message, MessageClass, Method, XorMappedAddress, new_transaction_id
from tsunagu.stun.credentials import short_term_key

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/unit/agent_io.py, shared by the agent tests
    sys.path.insert(0, _HERE)
from agent_io import PEER_CREDENTIALS, drain, events, state  # noqa: E402

UDP = TransportProtocol.UDP
TCP = TransportProtocol.TCP
ACTIVE, PASSIVE, SO = TcpType.ACTIVE, TcpType.PASSIVE, TcpType.SIMULTANEOUS_OPEN
A_IP, B_IP = "10.0.0.1", "10.0.0.2"


# --- helpers ---------------------------------------------------------------------------------


def unframe(transmit: Transmit) -> Message:
    """The one STUN message of a framed TCP transmit."""
    assert transmit.transport is TCP and transmit.connection is not None
    (payload,) = Rfc4571Framer().feed(transmit.data)
    assert len(transmit.data) == 2 + len(payload)
    return Message.decode(payload)


def peer_check(
    agent: IceAgent, *, use_candidate: bool = False, priority: int = 1853824767
) -> bytes:
    """A controlled peer's check to ``agent``."""
    return check_request(
        new_transaction_id(),
        local_ufrag=PEER_CREDENTIALS.ufrag,
        remote_ufrag=agent.local_credentials.ufrag,
        remote_key=short_term_key(agent.local_credentials.pwd),
        priority=priority,
        controlling=False,
        tie_breaker=5,
        use_candidate=use_candidate,
    )


def answer(request: Message, mapped: Address) -> bytes:
    """The peer's success response to one of the agent's checks."""
    response = Message(
        Method.BINDING, MessageClass.SUCCESS, request.transaction_id, [XorMappedAddress(mapped)]
    )
    return response.encode(short_term_key(PEER_CREDENTIALS.pwd), fingerprint=True)


def tcp_candidate(ip: str, port: int, tcptype: TcpType, foundation: str = "t") -> Candidate:
    return Candidate(foundation, 1, TCP, 1518280447, ip, port, CandidateType.HOST, tcptype=tcptype)


def lone_agent(*types: TcpType, config: IceConfig | None = None) -> IceAgent:
    """A controlling agent with TCP host candidates on A_IP (passive on 4001, S-O on
    4101) and the peer's credentials."""
    agent = IceAgent(config, controlling=True, tie_breaker=1000, rng=random.Random(0))
    ports = {ACTIVE: 9, PASSIVE: 4001, SO: 4101}
    for tcptype in types:
        agent.add_tcp_host_candidate((A_IP, ports[tcptype]), tcptype)
    agent.set_remote_credentials(PEER_CREDENTIALS.ufrag, PEER_CREDENTIALS.pwd)
    events(agent)
    return agent


@dataclass(order=True)
class _Action:
    when: float
    seq: int
    run: Callable[[], None] = field(compare=False)


class TcpNet:
    """Agents whose TCP connections are carried in memory, ``latency`` apart."""

    def __init__(self, latency: float = 0.01) -> None:
        self.now = 0.0
        self.latency = latency
        self.agents: list[IceAgent] = []
        self.listening: dict[Address, IceAgent] = {}
        self.links: dict[tuple[int, int], tuple[IceAgent, int]] = {}
        self.log: dict[int, list[IceEvent]] = {}
        self.sent: dict[int, list[Transmit]] = {}
        self.refuse: set[Address] = set()
        self.chunk: int | None = None
        """Deliver stream bytes in chunks of this size (None: as written)."""
        self._queue: list[_Action] = []
        self._seq = itertools.count()
        self._ports = itertools.count(50000)
        self._opening: dict[tuple[Address, Address], tuple[IceAgent, int]] = {}
        """Simultaneous-open connects waiting for the other end's, by (local, remote)."""

    def add(self, agent: IceAgent) -> None:
        self.agents.append(agent)
        self.log[id(agent)] = []
        self.sent[id(agent)] = []
        for candidate in agent.local_candidates:
            if candidate.tcptype is PASSIVE:
                self.listening[candidate.transport_address] = agent

    def events(self, agent: IceAgent) -> list[IceEvent]:
        return self.log[id(agent)]

    def received(self, agent: IceAgent) -> list[bytes]:
        return [e.data for e in self.events(agent) if isinstance(e, DataReceived)]

    def at(self, delay: float, run: Callable[[], None]) -> None:
        heapq.heappush(self._queue, _Action(self.now + delay, next(self._seq), run))

    def reset(self, agent: IceAgent, connection: int) -> None:
        """Both ends of a connection see it close (an RST)."""
        peer, peer_connection = self.links.pop((id(agent), connection))
        del self.links[(id(peer), peer_connection)]
        agent.handle_tcp_closed(connection, self.now)
        peer.handle_tcp_closed(peer_connection, self.now)

    def _connect(self, agent: IceAgent, request: TcpConnectRequested) -> None:
        if request.local[1]:  # simultaneous open: one connection once both ends connect
            other = self._opening.pop((request.remote, request.local), None)
            if other is None:
                self._opening[(request.local, request.remote)] = (agent, request.connection)
                return
            peer, peer_connection = other

            def opened() -> None:
                self.links[(id(agent), request.connection)] = (peer, peer_connection)
                self.links[(id(peer), peer_connection)] = (agent, request.connection)
                agent.handle_tcp_connected(request.connection, self.now)
                peer.handle_tcp_connected(peer_connection, self.now)

            self.at(self.latency, opened)
            return
        target = self.listening.get(request.remote)
        if target is None or request.remote in self.refuse:
            self.at(self.latency, lambda: agent.handle_tcp_closed(request.connection, self.now))
            return
        source = (request.local[0], next(self._ports))  # an active end's ephemeral port

        def established() -> None:
            accepted = target.handle_tcp_accepted(request.remote, source, self.now)
            if accepted is None:
                agent.handle_tcp_closed(request.connection, self.now)
                return
            self.links[(id(agent), request.connection)] = (target, accepted)
            self.links[(id(target), accepted)] = (agent, request.connection)
            agent.handle_tcp_connected(request.connection, self.now)

        self.at(self.latency, established)

    def _close(self, agent: IceAgent, connection: int) -> None:
        link = self.links.pop((id(agent), connection), None)
        if link is not None:
            peer, peer_connection = link
            del self.links[(id(peer), peer_connection)]
            self.at(self.latency, lambda: peer.handle_tcp_closed(peer_connection, self.now))

    def _write(self, agent: IceAgent, transmit: Transmit) -> None:
        assert transmit.transport is TCP and transmit.connection is not None
        link = self.links.get((id(agent), transmit.connection))
        assert link is not None, "a transmit on a connection that is not open"
        peer, peer_connection = link
        size = self.chunk or len(transmit.data)
        for start in range(0, len(transmit.data), size):
            piece = transmit.data[start : start + size]
            self.at(
                self.latency,
                lambda piece=piece: peer.handle_tcp_data(peer_connection, piece, self.now),  # type: ignore[misc]
            )

    def flush(self) -> None:
        for agent in self.agents:
            while (transmit := agent.poll_transmit()) is not None:
                self.sent[id(agent)].append(transmit)
                self._write(agent, transmit)
            while (event := agent.poll_event()) is not None:
                self.log[id(agent)].append(event)
                if isinstance(event, TcpConnectRequested):
                    self._connect(agent, event)
                elif isinstance(event, TcpCloseRequested):
                    self._close(agent, event.connection)

    def run(self, duration: float, max_steps: int = 100_000) -> None:
        until = self.now + duration
        for _ in range(max_steps):
            self.flush()
            timers = [(w, a) for a in self.agents if (w := a.poll_timeout()) is not None]
            next_timer = min(w for w, _ in timers) if timers else None
            next_action = self._queue[0].when if self._queue else None
            due = [t for t in (next_action, next_timer) if t is not None]
            if not due or min(due) > until:
                break
            self.now = max(self.now, min(due))
            if next_action is not None and next_action <= self.now:
                heapq.heappop(self._queue).run()
            else:
                for when, agent in timers:
                    if when <= self.now:
                        agent.handle_timeout(self.now)
        else:
            raise AssertionError("the agents keep asking for timers that change nothing")
        self.now = until
        self.flush()


def tcp_net(
    a_types: tuple[TcpType, ...] = (ACTIVE, PASSIVE),
    b_types: tuple[TcpType, ...] = (ACTIVE, PASSIVE),
) -> tuple[TcpNet, IceAgent, IceAgent]:
    """Controlling A on A_IP and controlled B on B_IP with TCP host candidates of the given
    types (passive ports 4001/4002, S-O 4101/4102), everything signalled both ways."""
    net = TcpNet()
    a = IceAgent(controlling=True, rng=random.Random(1))
    b = IceAgent(controlling=False, rng=random.Random(2))
    for agent, ip, offset, types in ((a, A_IP, 1, a_types), (b, B_IP, 2, b_types)):
        ports = {ACTIVE: 9, PASSIVE: 4000 + offset, SO: 4100 + offset}
        for tcptype in types:
            assert agent.add_tcp_host_candidate((ip, ports[tcptype]), tcptype) is not None
        agent.finish_gathering()
        net.add(agent)
    for me, other in ((a, b), (b, a)):
        me.set_remote_credentials(other.local_credentials.ufrag, other.local_credentials.pwd)
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            assert me.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
        me.add_remote_candidate(None)
    return net, a, b


# --- RFC 4571 framing --------------------------------------------------------------------------


def test_frames_are_cut_whatever_the_reads() -> None:
    packets = [b"\x00\x01stun", b"x" * 1000, b"", b"y" * MAX_FRAME, b"z"]
    stream = b"".join(frame(p) for p in packets)
    assert stream[:2] == b"\x00\x06"
    for size in (1, 2, 3, 7, 4096, len(stream)):
        framer = Rfc4571Framer()
        out: list[bytes] = []
        for start in range(0, len(stream), size):
            out += framer.feed(stream[start : start + size])
            assert framer.buffered <= 2 + MAX_FRAME
        assert out == [p for p in packets if p]  # empty frames carry nothing
        assert framer.buffered == 0
    with pytest.raises(ValueError):
        frame(b"x" * (MAX_FRAME + 1))


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_framing_round_trips(packets: list[bytes], size: int) -> None:
    stream = b"".join(frame(p) for p in packets)
    framer = Rfc4571Framer()
    out: list[bytes] = []
    for start in range(0, len(stream), size):
        out += framer.feed(stream[start : start + size])
    assert out == [p for p in packets if p]


# --- candidates and priorities (RFC 6544 §4.2, §4.5) -------------------------------------------


def test_tcp_host_candidates_priorities_and_syntax() -> None:
    agent = IceAgent()
    udp = agent.add_host_candidate((A_IP, 5000))
    active = agent.add_tcp_host_candidate((A_IP, 0), ACTIVE)
    passive = agent.add_tcp_host_candidate((A_IP, 4001), PASSIVE)
    so = agent.add_tcp_host_candidate((A_IP, 4101), SO)
    assert udp is not None and active is not None and passive is not None and so is not None
    # §4.5: active candidates are signalled with the discard port.
    assert active.port == 9 and active.to_sdp().endswith("typ host tcptype active")
    assert Candidate.from_sdp(passive.to_sdp()) == passive
    # §4.2: local preference = 2^13 * direction-pref + other-pref; for host candidates
    # active (6) > passive (4) > S-O (2). The type preference stays the host one.
    directions = [(c.priority >> 8 & 0xFFFF) >> 13 for c in (active, passive, so)]
    assert directions == [6, 4, 2]
    assert all(c.priority >> 24 == 126 for c in (active, passive, so))
    assert udp.priority > active.priority > passive.priority > so.priority
    # TCP and UDP candidates on one IP have different foundations (RFC 8445 §5.1.1.3).
    assert udp.foundation != active.foundation == passive.foundation == so.foundation
    with pytest.raises(LocalProtocolError):
        agent.add_tcp_host_candidate((A_IP, 4002), ACTIVE)
    with pytest.raises(LocalProtocolError):
        agent.add_tcp_host_candidate((A_IP, 0), PASSIVE)
    # One active candidate per IP: a second one is redundant (RFC 8445 §5.1.3).
    assert agent.add_tcp_host_candidate((A_IP, 9), ACTIVE) is None


def test_tcp_pairs_follow_rfc_6544_roles() -> None:
    """RFC 6544 §6.2: active pairs with passive, passive with active, S-O with S-O, and
    never a TCP candidate with a UDP one."""
    agent = lone_agent(ACTIVE, PASSIVE, SO)
    agent.add_host_candidate((A_IP, 5000))
    remotes = [
        tcp_candidate(B_IP, 9, ACTIVE, "a"),
        tcp_candidate(B_IP, 4002, PASSIVE, "p"),
        tcp_candidate(B_IP, 4102, SO, "s"),
        Candidate("u", 1, UDP, 2130706431, B_IP, 6000, CandidateType.HOST),
    ]
    for candidate in remotes:
        assert agent.add_remote_candidate(candidate)
    pairs = {(p.local.transport, p.local.tcptype, p.remote.tcptype) for p in agent.pairs()}
    assert pairs == {
        (TCP, ACTIVE, PASSIVE),
        (TCP, PASSIVE, ACTIVE),
        (TCP, SO, SO),
        (UDP, None, None),
    }


# --- connections and checks (RFC 6544 §7.1) -----------------------------------------------------


def test_active_check_opens_a_connection_and_goes_framed_over_it() -> None:
    agent = lone_agent(ACTIVE, PASSIVE)
    agent.add_remote_candidate(tcp_candidate(B_IP, 4002, PASSIVE))
    agent.add_remote_candidate(tcp_candidate(B_IP, 9, ACTIVE, "a"))
    agent.handle_timeout(0.0)
    # Nothing goes out before the connection exists: the agent asks for it instead.
    assert drain(agent) == []
    requests = [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    assert requests == [TcpConnectRequested(requests[0].connection, (A_IP, 0), (B_IP, 4002))]
    connection = requests[0].connection
    # Later Ta ticks check nothing else: the passive pair waits for the peer to connect,
    # and nothing is ever aimed at the remote active candidate's discard port.
    for now in (0.05, 0.1, 0.2, 1.0):
        agent.handle_timeout(now)
        assert drain(agent) == []
    assert not [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    agent.handle_tcp_connected(connection, 1.0)
    (check,) = drain(agent)
    assert (check.local, check.remote, check.connection) == ((A_IP, 9), (B_IP, 4002), connection)
    request = unframe(check)
    assert request.message_class is MessageClass.REQUEST
    # The response arrives over the connection, in two reads.
    response = frame(answer(request, (A_IP, 50555)))
    agent.handle_tcp_data(connection, response[:5], 1.01)
    agent.handle_tcp_data(connection, response[5:], 1.02)
    (pair,) = [p for p in agent.pairs() if p.state is PairState.SUCCEEDED]
    assert (pair.local.tcptype, pair.remote.port) == (ACTIVE, 4002)
    # RFC 6544 §4.5: the mapped port of an active candidate's connection is ephemeral and
    # reveals no peer-reflexive candidate; only another IP would.
    assert not [e for e in events(agent) if isinstance(e, PeerReflexiveCandidate)]


def test_mapped_address_of_another_ip_is_an_active_peer_reflexive_candidate() -> None:
    agent = lone_agent(ACTIVE)
    agent.add_remote_candidate(tcp_candidate(B_IP, 4002, PASSIVE))
    agent.handle_timeout(0.0)
    (request,) = [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    agent.handle_tcp_connected(request.connection, 0.01)
    (check,) = drain(agent)
    agent.handle_tcp_data(
        request.connection, frame(answer(unframe(check), ("203.0.113.9", 61000))), 0.02
    )
    (learnt,) = [e.candidate for e in events(agent) if isinstance(e, PeerReflexiveCandidate)]
    assert learnt.type is CandidateType.PEER_REFLEXIVE and learnt.tcptype is ACTIVE
    assert learnt.transport_address == ("203.0.113.9", 9)


def test_no_retransmissions_over_tcp_and_a_timed_out_check_closes_its_connection() -> None:
    agent = lone_agent(ACTIVE)
    agent.add_remote_candidate(tcp_candidate(B_IP, 4002, PASSIVE))
    agent.add_remote_candidate(None)
    agent.finish_gathering()
    agent.handle_timeout(0.0)
    (request,) = [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    agent.handle_tcp_connected(request.connection, 0.01)
    assert len(drain(agent)) == 1
    sent = 0
    now = 0.01
    while (deadline := agent.poll_timeout()) is not None and deadline < 100:
        now = deadline
        agent.handle_timeout(now)
        sent += len(drain(agent))
    assert sent == 0  # RFC 8489 §6.2.2: reliable transport, one request
    log = events(agent)
    assert TcpCloseRequested(request.connection) in log
    assert [p.state for p in agent.pairs()] == [PairState.FAILED]
    assert agent.state is IceTransportState.FAILED
    assert 39 < now < 41  # the transaction timeout (Rc = 7, Rm = 16, RTO 500 ms)


def test_refused_connection_fails_the_pair_and_the_agent() -> None:
    net, a, b = tcp_net((ACTIVE,), (PASSIVE,))
    net.refuse.add((B_IP, 4002))
    net.run(1.0)
    (pair,) = a.pairs()
    assert pair.state is PairState.FAILED and a.state is IceTransportState.FAILED
    # Exactly one attempt: a failed pair is not checked again.
    assert sum(isinstance(e, TcpConnectRequested) for e in net.events(a)) == 1
    # The passive side waits as long as a check of the peer could take, then fails too.
    assert b.state is IceTransportState.CHECKING
    net.run(45.0)
    assert state(b) is IceTransportState.FAILED
    assert [p.state for p in b.pairs()] == [PairState.FAILED]


def test_passive_only_agent_waits_for_the_peer_then_connects_for_good() -> None:
    """B has only a passive candidate: it has nothing to check itself and waits for A's
    connection instead of failing; once connected, the wait's deadline asks for nothing
    more (run() bounds its steps)."""
    net, a, b = tcp_net((ACTIVE, PASSIVE), (PASSIVE,))
    net.run(100.0)
    for agent in (a, b):
        assert agent.state is IceTransportState.COMPLETED
        changes = [e.state for e in net.events(agent) if isinstance(e, ConnectionStateChanged)]
        assert IceTransportState.FAILED not in changes
    b.send(b"still here")
    net.run(0.1)
    assert net.received(a) == [b"still here"]


def test_checks_from_a_passive_candidate_need_the_peers_connection() -> None:
    """A triggered check on a passive candidate's pair whose connection is gone fails:
    only the peer can connect to a passive candidate."""
    agent = lone_agent(PASSIVE)
    agent.add_remote_candidate(tcp_candidate(B_IP, 9, ACTIVE, "a"))
    connection = agent.handle_tcp_accepted((A_IP, 4001), (B_IP, 50001), 0.0)
    assert connection is not None
    agent.handle_tcp_data(connection, frame(peer_check(agent)), 0.0)
    (response,) = drain(agent)
    assert response.connection == connection
    assert unframe(response).message_class is MessageClass.SUCCESS
    agent.handle_tcp_closed(connection, 0.01)
    agent.handle_timeout(0.05)
    assert drain(agent) == []
    assert not [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    states = {p.remote.port: p.state for p in agent.pairs()}
    assert states[50001] is PairState.FAILED


def test_simultaneous_open_connects_from_the_candidates_own_port() -> None:
    agent = lone_agent(SO)
    agent.add_remote_candidate(tcp_candidate(B_IP, 4102, SO))
    agent.handle_timeout(0.0)
    (request,) = [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    assert (request.local, request.remote) == ((A_IP, 4101), (B_IP, 4102))


# --- incoming connections (RFC 6544 §7.2) -------------------------------------------------------


def test_accepted_connection_first_check_learns_the_peer_and_is_answered_on_it() -> None:
    agent = lone_agent(PASSIVE)
    agent.add_remote_candidate(tcp_candidate(B_IP, 9, ACTIVE, "a"))
    source = (B_IP, 50123)
    # TCP bytes only count on a connection of the agent.
    agent.handle_datagram(peer_check(agent), (A_IP, 4001), source, 0.0, TCP)
    assert drain(agent) == []
    connection = agent.handle_tcp_accepted((A_IP, 4001), source, 0.0)
    assert connection is not None
    agent.handle_tcp_data(connection, frame(peer_check(agent, use_candidate=True)), 0.0)
    (response,) = drain(agent)
    message = unframe(response)
    assert message.message_class is MessageClass.SUCCESS
    mapped = message.get(XorMappedAddress)
    assert mapped is not None and mapped.address == source
    assert (response.local, response.remote, response.connection) == (
        (A_IP, 4001),
        source,
        connection,
    )
    (learnt,) = [e.candidate for e in events(agent) if isinstance(e, PeerReflexiveCandidate)]
    assert (learnt.tcptype, learnt.transport_address) == (ACTIVE, source)
    # The triggered check goes back over the same connection.
    agent.handle_timeout(0.05)
    (triggered,) = drain(agent)
    assert (triggered.connection, unframe(triggered).message_class) == (
        connection,
        MessageClass.REQUEST,
    )


def test_accepts_only_on_passive_bases_and_within_the_bound() -> None:
    agent = lone_agent(ACTIVE, PASSIVE, config=IceConfig(max_tcp_accepted=2))
    assert agent.handle_tcp_accepted((A_IP, 9), (B_IP, 50000), 0.0) is None
    assert agent.handle_tcp_accepted((A_IP, 4999), (B_IP, 50000), 0.0) is None
    assert agent.handle_tcp_accepted((A_IP, 4001), ("127.0.0.1", 50000), 0.0) is None
    first = agent.handle_tcp_accepted((A_IP, 4001), (B_IP, 50001), 0.0)
    second = agent.handle_tcp_accepted((A_IP, 4001), (B_IP, 50002), 0.0)
    assert first is not None and second is not None
    # The second one carries a check (so a pair): the first, idle, makes room.
    agent.handle_tcp_data(second, frame(peer_check(agent)), 0.0)
    third = agent.handle_tcp_accepted((A_IP, 4001), (B_IP, 50003), 0.0)
    assert third is not None
    assert TcpCloseRequested(first) in events(agent)
    agent.handle_tcp_data(third, frame(peer_check(agent)), 0.0)
    assert agent.handle_tcp_accepted((A_IP, 4001), (B_IP, 50004), 0.0) is None
    # Bytes for the evicted connection are ignored.
    agent.handle_tcp_data(first, frame(peer_check(agent)), 0.0)
    assert all(t.connection in (second, third) for t in drain(agent))


def test_accepts_on_simultaneous_open_bases_and_checks_go_over_the_connection() -> None:
    """RFC 6544 §7.2: S-O bases take incoming connections too. The peer's connection
    between the two S-O ports carries our check: no connection of ours is requested."""
    agent = lone_agent(SO)
    agent.add_remote_candidate(tcp_candidate(B_IP, 4102, SO))
    connection = agent.handle_tcp_accepted((A_IP, 4101), (B_IP, 4102), 0.0)
    assert connection is not None
    agent.handle_timeout(0.0)
    assert not [e for e in events(agent) if isinstance(e, TcpConnectRequested)]
    (check,) = drain(agent)
    assert (check.connection, check.local, check.remote) == (
        connection,
        (A_IP, 4101),
        (B_IP, 4102),
    )
    assert unframe(check).method == Method.BINDING
    agent.handle_tcp_data(connection, frame(answer(unframe(check), (A_IP, 4101))), 0.05)
    assert [p.state for p in agent.pairs()] == [PairState.SUCCEEDED]


# --- two agents end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_two_agents_select_a_tcp_pair_and_exchange_framed_data(chunk: int | None) -> None:
    net, a, b = tcp_net()
    net.chunk = chunk
    net.run(2.0)
    for agent in (a, b):
        assert agent.state is IceTransportState.COMPLETED
    pair_a, pair_b = a.selected_pair(), b.selected_pair()
    assert pair_a is not None and pair_b is not None
    assert (pair_a.local.tcptype, pair_a.remote.tcptype) == (ACTIVE, PASSIVE)
    assert pair_a.remote.transport_address == (B_IP, 4002)
    # B sees A's connection as coming from a peer-reflexive active candidate (§7.2).
    assert pair_b.local.tcptype is PASSIVE
    assert pair_b.remote.type is CandidateType.PEER_REFLEXIVE
    assert (pair_b.remote.tcptype, pair_b.remote.address) == (ACTIVE, A_IP)
    # Nothing was ever sent towards a discard port.
    for agent in (a, b):
        requests = [e for e in net.events(agent) if isinstance(e, TcpConnectRequested)]
        assert requests and all(r.remote[1] != 9 for r in requests)
    a.send(b"from a" * 100)
    b.send(b"from b")
    a.send(b"")  # an empty datagram is no frame at all
    net.run(0.1)
    assert net.received(b) == [b"from a" * 100]
    assert net.received(a) == [b"from b"]
    data = [t for t in net.sent[id(a)] if t.data[2:8] == b"from a"]
    assert len(data) == 1 and data[0].data[:2] == (600).to_bytes(2, "big")
    with pytest.raises(LocalProtocolError):
        a.send(b"x" * (MAX_FRAME + 1))
    # Consent (RFC 7675) keeps being refreshed over the connection.
    net.run(60.0)
    for agent in (a, b):
        assert agent.state is IceTransportState.COMPLETED
        assert not [e for e in net.events(agent) if isinstance(e, ConsentLost)]
    selected = a.selected_pair()
    assert selected is not None and selected.responses_received > 10


def test_simultaneous_open_pair_connects_end_to_end() -> None:
    net, a, b = tcp_net((SO,), (SO,))
    net.run(2.0)
    for agent, port in ((a, 4102), (b, 4101)):
        pair = agent.selected_pair()
        assert pair is not None and agent.state is IceTransportState.COMPLETED
        assert (pair.local.tcptype, pair.remote.tcptype, pair.remote.port) == (SO, SO, port)
        # No peer-reflexive candidate: both ends connect from the ports they signalled.
        assert not [e for e in net.events(agent) if isinstance(e, PeerReflexiveCandidate)]
    b.send(b"so")
    net.run(0.1)
    assert net.received(a) == [b"so"]


def test_closing_the_selected_connection_loses_consent() -> None:
    net, a, b = tcp_net((ACTIVE,), (PASSIVE,))
    net.run(2.0)
    selected = [t for t in net.sent[id(a)] if t.connection is not None][-1].connection
    assert selected is not None and a.selected_pair() is not None
    net.reset(a, selected)
    net.run(0.1)
    for agent in (a, b):
        log = net.events(agent)
        assert any(isinstance(e, ConsentLost) for e in log)
        assert SelectedPairChanged(1, None) in log
        assert agent.state is IceTransportState.FAILED
        with pytest.raises(IceNotConnectedError):
            agent.send(b"late")
    failed = [
        e
        for e in net.events(a)
        if isinstance(e, CandidatePairStateChanged) and e.pair.state is PairState.FAILED
    ]
    assert failed and failed[-1].pair.local.tcptype is ACTIVE


def test_restart_reuses_the_connection() -> None:
    net, a, b = tcp_net((ACTIVE,), (PASSIVE,))
    net.run(2.0)
    opened = sum(isinstance(e, TcpConnectRequested) for e in net.events(a))
    a.restart()
    b.restart()
    for me, other in ((a, b), (b, a)):
        me.set_remote_credentials(other.local_credentials.ufrag, other.local_credentials.pwd)
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            me.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
        me.add_remote_candidate(None)
    net.run(2.0)
    assert a.state is IceTransportState.COMPLETED and b.state is IceTransportState.COMPLETED
    assert sum(isinstance(e, TcpConnectRequested) for e in net.events(a)) == opened
    a.send(b"after restart")
    net.run(0.1)
    assert net.received(b)[-1] == b"after restart"


def test_connections_table_bounds_accepted_ones_only() -> None:
    table = TcpConnections(1)
    outgoing = [table.connect(("10.0.0.1", 9), ("10.0.0.2", 4000 + i)) for i in range(3)]
    first, dropped = table.accept(("10.0.0.1", 4001), ("10.0.0.2", 50000), lambda c: True)
    assert first is not None and dropped == []
    refused, dropped = table.accept(("10.0.0.1", 4001), ("10.0.0.2", 50001), lambda c: True)
    assert refused is None and dropped == []
    assert len(table) == 4 and all(table.get(c.id) is c for c in outgoing)
    with pytest.raises(ValueError):
        TcpConnections(0)


def test_state_events_are_consistent() -> None:
    net, a, b = tcp_net()
    net.run(2.0)
    for agent in (a, b):
        changes = [e.state for e in net.events(agent) if isinstance(e, ConnectionStateChanged)]
        assert changes[0] is IceTransportState.CHECKING
        assert changes[-1] is IceTransportState.COMPLETED
        assert IceTransportState.FAILED not in changes
