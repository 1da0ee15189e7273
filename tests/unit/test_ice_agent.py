"""The sans-I/O ICE agent, fed bytes on virtual time: checks in and out, credentials, role
conflicts, peer-reflexive discovery and its bounds, nomination, consent, restart, lite,
several components, and two agents wired back to back in memory."""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.errors import LocalProtocolError
from tsunagu.ice import (
    AddressPolicy,
    Candidate,
    CandidateGathered,
    CandidateType,
    ConnectionStateChanged,
    ConsentLost,
    DataReceived,
    GatheringComplete,
    GatheringFailed,
    IceAgent,
    IceConfig,
    IceEvent,
    IceNotConnectedError,
    IceTransportState,
    Nomination,
    PairState,
    PeerReflexiveCandidate,
    RemoteCandidateIgnored,
    RoleChanged,
    SelectedPairChanged,
    Transmit,
    TransportProtocol,
)
from tsunagu.ice.checks import check_request
from tsunagu.ice.consent import ConsentFreshness, SystemJitter
from tsunagu.ice.errors import SdpError
from tsunagu.stun import (
    ErrorCodeAttr,
    Fingerprint,
    IceControlled,
    IceControlling,
    Message,
    MessageClass,
    Method,
    Priority,
    UnknownAttribute,
    UnknownAttributes,
    UseCandidate,
    Username,
    XorMappedAddress,
    new_transaction_id,
)
from tsunagu.stun.credentials import short_term_key

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/unit/agent_io.py, shared by the agent tests
    sys.path.insert(0, _HERE)
from agent_io import PEER_CREDENTIALS, drain, events, state  # noqa: E402

UDP = TransportProtocol.UDP
TCP = TransportProtocol.TCP
BASE = ("192.0.2.1", 5000)
PEER = ("198.51.100.2", 6000)
STUN_SERVER = ("203.0.113.1", 3478)


# --- helpers ---------------------------------------------------------------------------------


def decode(transmit: Transmit) -> Message:
    return Message.decode(transmit.data)


def peer_candidate(
    address: tuple[str, int] = PEER, priority: int = 2130706431, foundation: str = "9"
) -> Candidate:
    return Candidate(foundation, 1, UDP, priority, address[0], address[1], CandidateType.HOST)


def make_agent(
    *,
    controlling: bool = True,
    remote: bool = True,
    tie_breaker: int = 1000,
    **config: object,
) -> IceAgent:
    """An agent with one host candidate on BASE, the peer's credentials and (optionally)
    the peer's host candidate at PEER."""
    agent = IceAgent(IceConfig(**config), controlling=controlling, tie_breaker=tie_breaker)  # type: ignore[arg-type]
    agent.add_host_candidate(BASE)
    agent.set_remote_credentials(PEER_CREDENTIALS.ufrag, PEER_CREDENTIALS.pwd)
    if remote:
        agent.add_remote_candidate(peer_candidate())
    events(agent)
    return agent


def peer_check(
    agent: IceAgent,
    *,
    controlling: bool = False,
    tie_breaker: int = 5,
    use_candidate: bool = False,
    priority: int = 1853824767,
    pwd: str | None = None,
    ufrag: str | None = None,
    transaction_id: bytes | None = None,
) -> bytes:
    """A check the peer sends to ``agent`` (USERNAME agent:peer, keyed by agent's pwd)."""
    return check_request(
        transaction_id or new_transaction_id(),
        local_ufrag=PEER_CREDENTIALS.ufrag,
        remote_ufrag=ufrag or agent.local_credentials.ufrag,
        remote_key=short_term_key(pwd or agent.local_credentials.pwd),
        priority=priority,
        controlling=controlling,
        tie_breaker=tie_breaker,
        use_candidate=use_candidate,
    )


def answer(request: Transmit, mapped: tuple[str, int] | None = None, *, code: int = 0) -> bytes:
    """The peer's response to one of the agent's checks (keyed by the peer's pwd)."""
    message = decode(request)
    if code:
        response = Message(
            Method.BINDING, MessageClass.ERROR, message.transaction_id, [ErrorCodeAttr(code, "")]
        )
    else:
        response = Message(
            Method.BINDING,
            MessageClass.SUCCESS,
            message.transaction_id,
            [XorMappedAddress(mapped or request.local)],
        )
    return response.encode(short_term_key(PEER_CREDENTIALS.pwd), fingerprint=True)


def checks_sent(agent: IceAgent, now: float) -> list[Transmit]:
    agent.handle_timeout(now)
    return [t for t in drain(agent) if decode(t).message_class is MessageClass.REQUEST]


@dataclass(order=True)
class _Delivery:
    when: float
    seq: int
    target: IceAgent = field(compare=False)
    transmit: Transmit = field(compare=False)


class Wire:
    """Agents wired back to back: a transmit to a base some agent owns arrives there after
    ``latency``; ``drop(transmit)`` may lose it. Virtual time only."""

    def __init__(self, latency: float = 0.01) -> None:
        self.now = 0.0
        self.latency = latency
        self.owners: dict[tuple[str, int], IceAgent] = {}
        self.agents: list[IceAgent] = []
        self.events: dict[int, list[IceEvent]] = {}
        self.sent: dict[int, list[tuple[float, Transmit]]] = {}
        self.drop: Callable[[Transmit], bool] = lambda transmit: False
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()

    def add(self, agent: IceAgent, *bases: tuple[str, int]) -> None:
        self.agents.append(agent)
        self.events[id(agent)] = []
        self.sent[id(agent)] = []
        for base in bases:
            self.owners[base] = agent

    def log(self, agent: IceAgent) -> list[IceEvent]:
        return self.events[id(agent)]

    def received(self, agent: IceAgent, component: int = 1) -> list[bytes]:
        return [
            e.data
            for e in self.log(agent)
            if isinstance(e, DataReceived) and e.component == component
        ]

    def _flush(self) -> None:
        for agent in self.agents:
            while (transmit := agent.poll_transmit()) is not None:
                self.sent[id(agent)].append((self.now, transmit))
                target = self.owners.get(transmit.remote)
                if target is not None and not self.drop(transmit):
                    delivery = _Delivery(self.now + self.latency, next(self._seq), target, transmit)
                    heapq.heappush(self._queue, delivery)
            while (event := agent.poll_event()) is not None:
                self.events[id(agent)].append(event)

    def run(self, duration: float) -> None:
        until = self.now + duration
        while True:
            self._flush()
            timers = [(w, a) for a in self.agents if (w := a.poll_timeout()) is not None]
            next_timer = min(timers, key=lambda item: item[0]) if timers else None
            next_packet = self._queue[0].when if self._queue else None
            candidates = [t for t in (next_packet, next_timer and next_timer[0]) if t is not None]
            if not candidates or min(candidates) > until:
                break
            self.now = max(self.now, min(candidates))
            if next_packet is not None and next_packet <= self.now:
                delivery = heapq.heappop(self._queue)
                sent = delivery.transmit
                delivery.target.handle_datagram(sent.data, sent.remote, sent.local, self.now)
            else:
                for when, agent in timers:
                    if when <= self.now:
                        agent.handle_timeout(self.now)
        self.now = until
        self._flush()


def wired(
    config_a: IceConfig | None = None,
    config_b: IceConfig | None = None,
    *,
    components: int = 1,
    signal: bool = True,
    b_controlling: bool = False,
) -> tuple[Wire, IceAgent, IceAgent]:
    """Controlling A on 10.0.0.1, controlled B on 10.0.0.2, candidates and credentials
    exchanged (unless ``signal`` is False), gathering finished on both."""
    wire = Wire()
    a = IceAgent(
        config_a or IceConfig(components=components), controlling=True, rng=random.Random(1)
    )
    b = IceAgent(
        config_b or IceConfig(components=components),
        controlling=b_controlling,
        rng=random.Random(2),
    )
    a_bases = [("10.0.0.1", 1000 + c) for c in range(1, components + 1)]
    b_bases = [("10.0.0.2", 2000 + c) for c in range(1, components + 1)]
    wire.add(a, *a_bases)
    wire.add(b, *b_bases)
    for component, base in enumerate(a_bases, 1):
        a.add_host_candidate(base, component)
    for component, base in enumerate(b_bases, 1):
        b.add_host_candidate(base, component)
    a.finish_gathering()
    b.finish_gathering()
    if signal:
        exchange(a, b)
    return wire, a, b


def exchange(a: IceAgent, b: IceAgent) -> None:
    """Signal credentials, candidates and end-of-candidates both ways."""
    for me, other in ((a, b), (b, a)):
        credentials = other.local_credentials
        me.set_remote_credentials(credentials.ufrag, credentials.pwd, lite=other.config.lite)
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            me.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
        me.add_remote_candidate(None)


def states(log: list[IceEvent]) -> list[IceTransportState]:
    return [e.state for e in log if isinstance(e, ConnectionStateChanged)]


# --- construction and credentials ------------------------------------------------------------


def test_credentials_and_tie_breaker_are_fresh_secrets() -> None:
    agents = [IceAgent() for _ in range(20)]
    assert len({a.local_credentials.ufrag for a in agents}) == 20
    assert len({a.local_credentials.pwd for a in agents}) == 20
    assert len({a.tie_breaker for a in agents}) == 20
    assert all(0 <= a.tie_breaker < 2**64 for a in agents)
    assert state(agents[0]) is IceTransportState.NEW
    assert agents[0].poll_timeout() is None


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        IceConfig(ta=0)
    with pytest.raises(ValueError):
        IceConfig(consent_interval=40.0)
    with pytest.raises(ValueError):
        IceConfig(components=0)
    assert IceConfig(nomination="aggressive").nomination is Nomination.AGGRESSIVE  # type: ignore[arg-type]


def test_remote_credentials_are_validated() -> None:
    agent = IceAgent()
    with pytest.raises(SdpError):
        agent.set_remote_credentials("abc", PEER_CREDENTIALS.pwd)
    with pytest.raises(SdpError):
        agent.set_remote_credentials("abcd", "short")


# --- outgoing checks (RFC 8445 §7.2) ---------------------------------------------------------


def test_outgoing_check_carries_the_ice_attributes() -> None:
    agent = make_agent()
    (check,) = checks_sent(agent, 0.0)
    assert (check.local, check.remote) == (BASE, PEER)
    message = decode(check)
    assert message.method == Method.BINDING
    username = message.get(Username)
    assert username is not None
    assert username.value == f"{PEER_CREDENTIALS.ufrag}:{agent.local_credentials.ufrag}"
    priority = message.get(Priority)
    host = agent.local_candidates[0]
    # §7.1.1: the priority of a peer-reflexive candidate with the same local preference.
    assert priority is not None and priority.value >> 24 == 110
    assert (priority.value >> 8) & 0xFFFF == (host.priority >> 8) & 0xFFFF
    controlling = message.get(IceControlling)
    assert controlling is not None and controlling.value == agent.tie_breaker
    assert message.get(IceControlled) is None
    assert message.get(UseCandidate) is None  # regular nomination: not on ordinary checks
    assert message.get(Fingerprint) is not None
    assert message.verify_integrity(short_term_key(PEER_CREDENTIALS.pwd))
    assert not message.verify_integrity(short_term_key(agent.local_credentials.pwd))
    assert state(agent) is IceTransportState.CHECKING


def test_no_checks_before_remote_credentials() -> None:
    agent = IceAgent(controlling=True)
    agent.add_host_candidate(BASE)
    agent.add_remote_candidate(peer_candidate())
    assert checks_sent(agent, 0.0) == []
    assert agent.poll_timeout() is None
    agent.set_remote_credentials(PEER_CREDENTIALS.ufrag, PEER_CREDENTIALS.pwd)
    assert len(checks_sent(agent, 0.0)) == 1


def test_checks_are_paced_by_ta_and_retransmitted_with_the_rfc_rto() -> None:
    agent = make_agent(remote=False, ta=0.05)
    for port in range(7000, 7010):
        agent.add_remote_candidate(peer_candidate(("198.51.100.2", port), foundation=str(port)))
    times: list[float] = []
    first_check: dict[bytes, float] = {}
    retransmits: list[float] = []
    now = 0.0
    while now < 2.0:
        agent.handle_timeout(now)
        for transmit in drain(agent):
            tid = decode(transmit).transaction_id
            if tid in first_check:
                retransmits.append(now - first_check[tid])
            else:
                first_check[tid] = now
                times.append(now)
        deadline = agent.poll_timeout()
        assert deadline is not None
        now = deadline
    assert len(times) == 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.05 - 1e-9
    # §14.3: RTO = MAX(500 ms, Ta * (waiting + in-progress)) = 0.05 * 10 = 500 ms.
    assert retransmits and min(retransmits) >= 0.5 - 1e-9


def test_outgoing_requests_per_second_are_bounded() -> None:
    """A remote description listing hundreds of candidates at a victim: the check list is
    capped and the request rate bounded, retransmissions included."""
    agent = make_agent(remote=False, max_checks_per_second=20.0, check_burst=5, ta=0.001)
    accepted = 0
    for index in range(300):
        candidate = peer_candidate(("198.51.100.50", 10000 + index), foundation=f"f{index}")
        accepted += agent.add_remote_candidate(candidate)
    assert accepted == 200  # max_remote_candidates
    assert len(agent.pairs()) == 100  # max_pairs (§6.1.2.5)
    sends: list[float] = []
    now = 0.0
    while now < 30.0:
        agent.handle_timeout(now)
        sends.extend(now for _ in drain(agent))
        deadline = agent.poll_timeout()
        assert deadline is not None
        now = deadline
    for start in range(29):
        in_window = [t for t in sends if start <= t < start + 1]
        assert len(in_window) <= 20 + 5
    assert len(sends) > 100  # it does keep checking, at the bounded rate
    assert len({t for t in sends}) > 50


# --- incoming checks (RFC 8445 §7.3) ---------------------------------------------------------


def test_valid_check_gets_a_success_response_and_a_triggered_check() -> None:
    agent = make_agent(controlling=True, tie_breaker=2**63)
    checks_sent(agent, 0.0)  # our ordinary check is in progress
    agent.handle_datagram(peer_check(agent), BASE, PEER, 0.01)
    (response,) = drain(agent)
    message = decode(response)
    assert message.message_class is MessageClass.SUCCESS
    assert (response.local, response.remote) == (BASE, PEER)
    mapped = message.get(XorMappedAddress)
    assert mapped is not None and mapped.address == PEER
    assert message.verify_integrity(short_term_key(agent.local_credentials.pwd))
    assert message.get(Fingerprint) is not None
    # §7.3.1.4: the in-progress pair is checked again at the next Ta tick.
    (triggered,) = checks_sent(agent, 0.1)
    assert triggered.remote == PEER
    assert agent.pairs()[0].requests_received == 1


def _response_code(agent: IceAgent) -> int | None:
    (transmit,) = drain(agent)
    error = decode(transmit).error
    return None if error is None else error.code


def test_checks_with_bad_credentials_are_refused_and_change_nothing() -> None:
    agent = make_agent(remote=False)
    before = agent.pairs()
    cases: list[tuple[bytes, int]] = [
        (peer_check(agent, pwd="wrongpasswordwrongpassword"), 401),
        (peer_check(agent, ufrag="nobody"), 401),
    ]
    tid = new_transaction_id()
    no_integrity = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [Username(f"{agent.local_credentials.ufrag}:peer"), Priority(1), IceControlled(1)],
    ).encode(fingerprint=True)
    cases.append((no_integrity, 400))
    no_username = Message(
        Method.BINDING, MessageClass.REQUEST, tid, [Priority(1), IceControlled(1)]
    ).encode(short_term_key(agent.local_credentials.pwd), fingerprint=True)
    cases.append((no_username, 400))
    no_fingerprint = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [Username(f"{agent.local_credentials.ufrag}:peer"), Priority(1), IceControlled(1)],
    ).encode(short_term_key(agent.local_credentials.pwd))
    cases.append((no_fingerprint, 400))
    no_priority = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [Username(f"{agent.local_credentials.ufrag}:peer"), IceControlled(1)],
    ).encode(short_term_key(agent.local_credentials.pwd), fingerprint=True)
    cases.append((no_priority, 400))
    both_roles = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [
            Username(f"{agent.local_credentials.ufrag}:peer"),
            Priority(1),
            IceControlled(1),
            IceControlling(2),
        ],
    ).encode(short_term_key(agent.local_credentials.pwd), fingerprint=True)
    cases.append((both_roles, 400))
    # The remote ufrag is known: a check naming another one is not from this session.
    agent2 = make_agent(remote=False)
    wrong_remote = check_request(
        tid,
        local_ufrag="othr",
        remote_ufrag=agent2.local_credentials.ufrag,
        remote_key=short_term_key(agent2.local_credentials.pwd),
        priority=1,
        controlling=False,
        tie_breaker=1,
        use_candidate=True,
    )
    agent2.handle_datagram(wrong_remote, BASE, PEER, 0.0)
    assert _response_code(agent2) == 401
    assert agent2.pairs() == [] and agent2.remote_candidates == ()
    for data, code in cases:
        agent.handle_datagram(data, BASE, PEER, 0.0)
        assert _response_code(agent) == code
        assert agent.pairs() == before
        assert agent.remote_candidates == ()
        assert events(agent) == []
        assert checks_sent(agent, 0.0) == []


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    agent = make_agent(remote=False)
    tid = new_transaction_id()
    request = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [
            Username(f"{agent.local_credentials.ufrag}:peer"),
            Priority(1),
            IceControlled(1),
            UnknownAttribute(0x0042, b"????"),
        ],
    ).encode(short_term_key(agent.local_credentials.pwd), fingerprint=True)
    agent.handle_datagram(request, BASE, PEER, 0.0)
    (transmit,) = drain(agent)
    message = decode(transmit)
    assert message.error is not None and message.error.code == 420
    unknown = message.get(UnknownAttributes)
    assert unknown is not None and unknown.types == (0x0042,)
    assert agent.pairs() == []


def test_garbage_and_stray_packets_change_nothing() -> None:
    agent = make_agent()
    before = agent.pairs()
    for data in (b"", b"\x00\x01\x00", b"\x01" * 40, b"hello", bytes(range(256))):
        agent.handle_datagram(data, BASE, PEER, 0.0)
    stray = Message(
        Method.BINDING, MessageClass.SUCCESS, new_transaction_id(), [XorMappedAddress(BASE)]
    ).encode(short_term_key(PEER_CREDENTIALS.pwd), fingerprint=True)
    agent.handle_datagram(stray, BASE, PEER, 0.0)
    # A check arriving on an address that is none of our bases is not ours to answer.
    agent.handle_datagram(peer_check(agent), ("192.0.2.99", 1), PEER, 0.0)
    assert drain(agent) == []
    assert agent.pairs() == before
    assert [e for e in events(agent) if isinstance(e, DataReceived)] == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_arbitrary_datagrams_never_raise(data: bytes, stun_like: bool) -> None:
    agent = make_agent()
    if stun_like and len(data) >= 20:
        data = b"\x00\x01" + (len(data) - 20).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + data[8:]
    agent.handle_datagram(data, BASE, PEER, 0.0)
    agent.handle_timeout(0.0)
    drain(agent)


def test_checks_from_unusable_addresses_are_ignored() -> None:
    agent = make_agent(remote=False)
    for source in (
        ("255.255.255.255", 6000),
        ("127.0.0.1", 6000),
        ("224.0.0.1", 5),
        (PEER[0], 0),
    ):
        agent.handle_datagram(peer_check(agent), BASE, source, 0.0)
        assert drain(agent) == []
    assert agent.remote_candidates == ()


# --- role conflicts (RFC 8445 §7.2.5.1, §7.3.1.1) --------------------------------------------


def test_role_conflict_both_controlling_we_win() -> None:
    agent = make_agent(controlling=True, tie_breaker=2**40)
    agent.handle_datagram(peer_check(agent, controlling=True, tie_breaker=2**39), BASE, PEER, 0.0)
    assert _response_code(agent) == 487
    assert agent.controlling
    assert not any(isinstance(e, RoleChanged) for e in events(agent))


def test_role_conflict_both_controlling_we_lose() -> None:
    agent = make_agent(controlling=True, tie_breaker=2**39)
    agent.handle_datagram(peer_check(agent, controlling=True, tie_breaker=2**40), BASE, PEER, 0.0)
    assert _response_code(agent) is None  # success
    assert not agent.controlling
    assert RoleChanged(controlling=False) in events(agent)


def test_role_conflict_both_controlled_we_win() -> None:
    agent = make_agent(controlling=False, tie_breaker=2**40)
    agent.handle_datagram(peer_check(agent, controlling=False, tie_breaker=2**39), BASE, PEER, 0.0)
    assert _response_code(agent) is None
    assert agent.controlling
    assert RoleChanged(controlling=True) in events(agent)


def test_role_conflict_both_controlled_we_lose() -> None:
    agent = make_agent(controlling=False, tie_breaker=2**39)
    agent.handle_datagram(peer_check(agent, controlling=False, tie_breaker=2**40), BASE, PEER, 0.0)
    assert _response_code(agent) == 487
    assert not agent.controlling


def test_487_response_switches_role_and_retries() -> None:
    agent = make_agent(controlling=True)
    (check,) = checks_sent(agent, 0.0)
    agent.handle_datagram(answer(check, code=487), BASE, PEER, 0.02)
    assert not agent.controlling
    assert RoleChanged(controlling=False) in events(agent)
    (retry,) = checks_sent(agent, 0.1)
    assert decode(retry).get(IceControlled) is not None
    assert decode(retry).transaction_id != decode(check).transaction_id


def test_role_conflict_between_two_agents_resolves() -> None:
    wire, a, b = wired(b_controlling=True)  # both think they control (e.g. both offered)
    wire.run(3.0)
    assert a.controlling != b.controlling
    assert state(a) is IceTransportState.COMPLETED and state(b) is IceTransportState.COMPLETED
    winner = a if a.tie_breaker >= b.tie_breaker else b
    assert winner.controlling


# --- peer-reflexive candidates (RFC 8445 §7.2.5.3.1, §7.3.1.3) -------------------------------


def test_remote_peer_reflexive_candidate_from_a_check() -> None:
    agent = make_agent(remote=False)
    source = ("198.51.100.77", 40000)
    agent.handle_datagram(peer_check(agent, priority=1862270975), BASE, source, 0.0)
    assert _response_code(agent) is None
    learnt = [e for e in events(agent) if isinstance(e, PeerReflexiveCandidate)]
    assert len(learnt) == 1 and not learnt[0].local
    candidate = learnt[0].candidate
    assert candidate.type is CandidateType.PEER_REFLEXIVE
    assert candidate.transport_address == source
    assert candidate.priority == 1862270975  # §7.3.1.3: from PRIORITY
    (check,) = checks_sent(agent, 0.0)  # triggered check towards it
    assert check.remote == source
    # The signalled candidate arriving later takes over the peer-reflexive one.
    assert agent.add_remote_candidate(peer_candidate(source, foundation="sig"))
    (remote,) = agent.remote_candidates
    assert remote.type is CandidateType.HOST and remote.foundation == "sig"
    assert len(agent.pairs()) == 1


def test_peer_reflexive_flood_is_bounded() -> None:
    agent = make_agent(remote=False, max_peer_reflexive=8)
    for index in range(1000):
        source = (f"198.51.{100 + index // 250}.{index % 250 + 1}", 20000 + index)
        agent.handle_datagram(peer_check(agent), BASE, source, index * 0.001)
    assert len(agent.remote_candidates) == 8
    assert len(agent.pairs()) == 8
    learnt = [e for e in events(agent) if isinstance(e, PeerReflexiveCandidate)]
    assert len(learnt) == 8


def test_unauthenticated_flood_creates_nothing() -> None:
    agent = make_agent(remote=False)
    for index in range(500):
        source = ("198.51.100.9", 20000 + index)
        agent.handle_datagram(peer_check(agent, pwd="x" * 22), BASE, source, 0.0)
    assert agent.remote_candidates == () and agent.pairs() == []
    assert all(decode(t).error is not None for t in drain(agent))


def test_local_peer_reflexive_candidate_from_a_response() -> None:
    agent = make_agent()
    (check,) = checks_sent(agent, 0.0)
    mapped = ("203.0.113.40", 31000)  # a NAT between us and the peer
    agent.handle_datagram(answer(check, mapped), BASE, PEER, 0.02)
    learnt = [e for e in events(agent) if isinstance(e, PeerReflexiveCandidate)]
    assert len(learnt) == 1 and learnt[0].local
    candidate = learnt[0].candidate
    assert candidate.transport_address == mapped
    assert (candidate.related_address, candidate.related_port) == BASE
    assert candidate.priority == decode(check).get(Priority).value  # type: ignore[union-attr]
    (pair,) = agent.pairs()
    assert pair.state is PairState.SUCCEEDED and pair.valid


def test_asymmetric_response_fails_the_pair() -> None:
    agent = make_agent()
    (check,) = checks_sent(agent, 0.0)
    agent.handle_datagram(answer(check), BASE, ("198.51.100.2", 6001), 0.02)
    (pair,) = agent.pairs()
    assert pair.state is PairState.FAILED


def test_response_with_bad_integrity_is_discarded() -> None:
    agent = make_agent()
    (check,) = checks_sent(agent, 0.0)
    forged = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        decode(check).transaction_id,
        [XorMappedAddress(BASE)],
    ).encode(short_term_key("forgedpasswordforgedpass"), fingerprint=True)
    agent.handle_datagram(forged, BASE, PEER, 0.02)
    (pair,) = agent.pairs()
    assert pair.state is PairState.IN_PROGRESS
    agent.handle_datagram(answer(check), BASE, PEER, 0.03)
    assert agent.pairs()[0].state is PairState.SUCCEEDED


def test_check_timeout_fails_the_pair_and_then_the_agent() -> None:
    agent = make_agent()
    agent.add_remote_candidate(None)
    agent.finish_gathering()
    now = 0.0
    sends = 0
    while (deadline := agent.poll_timeout()) is not None:
        now = deadline
        agent.handle_timeout(now)
        sends += len(drain(agent))
    (pair,) = agent.pairs()
    assert pair.state is PairState.FAILED
    assert sends == 7  # Rc
    assert 39.0 <= now <= 40.0  # 39.5 s with the 500 ms RTO
    assert state(agent) is IceTransportState.FAILED


def test_no_candidates_at_all_fails_after_end_of_candidates() -> None:
    agent = make_agent(remote=False)
    agent.finish_gathering()
    assert state(agent) is not IceTransportState.FAILED
    agent.add_remote_candidate(None)
    agent.handle_timeout(0.0)
    assert state(agent) is IceTransportState.FAILED


# --- remote candidates -----------------------------------------------------------------------


def test_remote_candidates_at_unusable_addresses_are_ignored() -> None:
    agent = make_agent(remote=False)
    bad = [
        ("0.0.0.0", 5000),
        ("255.255.255.255", 5000),
        ("224.0.0.1", 5000),
        ("198.51.100.2", 0),
        ("127.0.0.1", 5000),
        ("169.254.0.1", 5000),
        ("::ffff:255.255.255.255", 5000),
    ]
    for address in bad:
        assert not agent.add_remote_candidate(peer_candidate(address))
    reasons = [e.reason for e in events(agent) if isinstance(e, RemoteCandidateIgnored)]
    assert len(reasons) == len(bad)
    assert agent.pairs() == [] and agent.remote_candidates == ()
    hidden = Candidate.from_sdp("candidate:1 1 udp 1 abc.local 5000 typ host")
    assert not agent.add_remote_candidate(hidden)
    wrong_generation = Candidate.from_sdp(
        "candidate:1 1 udp 1 198.51.100.2 5000 typ host ufrag zzzz"
    )
    assert not agent.add_remote_candidate(wrong_generation)
    assert not agent.add_remote_candidate(
        Candidate.from_sdp("candidate:1 2 udp 1 198.51.100.2 5000 typ host")
    )
    assert agent.add_remote_candidate(peer_candidate())
    assert not agent.add_remote_candidate(peer_candidate())  # duplicate


def test_loopback_remote_candidates_with_the_policy_flag() -> None:
    agent = make_agent(remote=False, address_policy=AddressPolicy(allow_loopback=True))
    assert agent.add_remote_candidate(peer_candidate(("127.0.0.1", 5000)))
    assert agent.pairs() == []  # loopback pairs only with a loopback base
    agent.add_host_candidate(("127.0.0.1", 4000))
    (pair,) = agent.pairs()
    assert pair.local.address == "127.0.0.1" and pair.remote.address == "127.0.0.1"


def test_local_candidate_misuse_is_refused() -> None:
    agent = IceAgent()
    host = agent.add_host_candidate(BASE)
    assert host is not None
    assert agent.add_host_candidate(BASE) is None  # the same candidate again: redundant
    with pytest.raises(LocalProtocolError):
        agent.add_host_candidate(("192.0.2.2", 1), component=2)  # not in the stream
    two = IceAgent(IceConfig(components=2))
    two.add_host_candidate(BASE, 1)
    with pytest.raises(LocalProtocolError):
        two.add_host_candidate(BASE, 2)  # one base, one component
    srflx = Candidate("5", 1, UDP, 1694498815, "203.0.113.5", 1, CandidateType.SERVER_REFLEXIVE)
    with pytest.raises(LocalProtocolError):
        agent.add_local_candidate(srflx)  # no base
    with pytest.raises(LocalProtocolError):
        agent.add_local_candidate(srflx, ("192.0.2.50", 1))  # unknown base
    assert agent.add_local_candidate(srflx, BASE)
    redundant = Candidate("6", 1, UDP, 1694498815, BASE[0], BASE[1], CandidateType.SERVER_REFLEXIVE)
    assert not agent.add_local_candidate(redundant, BASE)  # §5.1.3
    with pytest.raises(LocalProtocolError):
        agent.gather_server_reflexive(("192.0.2.50", 1), STUN_SERVER, 0.0)
    lite = IceAgent(IceConfig(lite=True))
    with pytest.raises(LocalProtocolError):
        lite.add_relayed_candidate(("203.0.113.9", 9), server_ip="203.0.113.1")


# --- server-reflexive gathering (RFC 8445 §5.1.1.2) ------------------------------------------


def test_server_reflexive_gathering_and_end_of_candidates() -> None:
    agent = IceAgent()
    agent.add_host_candidate(BASE)
    agent.gather_server_reflexive(BASE, STUN_SERVER, 0.0)
    agent.gather_server_reflexive(BASE, ("203.0.113.2", 3478), 0.0)
    agent.finish_gathering()
    requests = drain(agent)
    assert [(t.local, t.remote) for t in requests] == [
        (BASE, STUN_SERVER),
        (BASE, ("203.0.113.2", 3478)),
    ]
    gathered = [e for e in events(agent) if isinstance(e, CandidateGathered)]
    assert [e.candidate.type for e in gathered] == [CandidateType.HOST]
    mapped = ("198.51.100.40", 42000)
    response = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        decode(requests[0]).transaction_id,
        [XorMappedAddress(mapped)],
    ).encode()
    agent.handle_datagram(response, BASE, ("203.0.113.99", 3478), 0.05)  # wrong source
    assert events(agent) == []
    agent.handle_datagram(response, BASE, STUN_SERVER, 0.05)
    (gathered_event,) = events(agent)
    assert isinstance(gathered_event, CandidateGathered)
    srflx = gathered_event.candidate
    assert srflx.type is CandidateType.SERVER_REFLEXIVE
    assert srflx.transport_address == mapped
    assert (srflx.related_address, srflx.related_port) == BASE
    assert srflx.priority >> 24 == 100
    # The second server never answers: gathering completes when its request gives up.
    now = 0.05
    while (deadline := agent.poll_timeout()) is not None:
        now = deadline
        agent.handle_timeout(now)
        drain(agent)
    log = events(agent)
    assert isinstance(log[0], GatheringFailed) and log[0].server == ("203.0.113.2", 3478)
    assert isinstance(log[1], GatheringComplete)
    assert now <= 4.0
    assert agent.gathering_complete


def test_server_reflexive_equal_to_host_is_redundant() -> None:
    agent = IceAgent()
    agent.add_host_candidate(BASE)
    agent.gather_server_reflexive(BASE, STUN_SERVER, 0.0)
    (request,) = drain(agent)
    events(agent)
    response = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        decode(request).transaction_id,
        [XorMappedAddress(BASE)],
    ).encode()
    agent.handle_datagram(response, BASE, STUN_SERVER, 0.05)
    assert events(agent) == []
    assert len(agent.local_candidates) == 1


# --- two agents back to back -----------------------------------------------------------------


def test_two_agents_connect_and_exchange_data() -> None:
    wire, a, b = wired()
    wire.run(2.0)
    assert state(a) is IceTransportState.COMPLETED
    assert state(b) is IceTransportState.COMPLETED
    assert states(wire.log(a)) == [
        IceTransportState.CHECKING,
        IceTransportState.COMPLETED,
    ] or states(wire.log(a)) == [
        IceTransportState.CHECKING,
        IceTransportState.CONNECTED,
        IceTransportState.COMPLETED,
    ]
    pair_a, pair_b = a.selected_pair(), b.selected_pair()
    assert pair_a is not None and pair_b is not None
    assert pair_a.local.transport_address == pair_b.remote.transport_address
    assert pair_a.nominated and pair_b.nominated
    a.send(b"ping")
    b.send(b"pong")
    wire.run(0.1)
    assert wire.received(b) == [b"ping"] and wire.received(a) == [b"pong"]
    info = a.selected_pair()
    assert info is not None and info.bytes_sent == 4 and info.bytes_received == 4
    assert info.rtt is not None and info.rtt == pytest.approx(0.02)


def test_send_now_hands_data_over_unless_transmits_are_waiting() -> None:
    wire, a, b = wired()
    wire.run(2.0)
    selected = a.selected_pair()
    assert selected is not None
    deadline = a.poll_timeout()
    # Nothing queued: the transmit comes back to be written at once, counted as sent.
    direct = a.send_now(b"\x80direct")
    assert direct is not None and a.poll_transmit() is None
    assert direct.data == b"\x80direct"
    assert direct.local == selected.local.transport_address  # a host candidate: its own base
    assert direct.remote == selected.remote.transport_address
    assert a.poll_timeout() == deadline  # no timer moves earlier for data
    # A transmit waiting (a check response, here) goes first: send_now queues behind it.
    (request,) = [
        t
        for _, t in wire.sent[id(b)]
        if t.data[0] < 4 and decode(t).message_class is MessageClass.REQUEST
    ][-1:]
    assert a.handle_datagram(request.data, request.remote, request.local, wire.now) is False
    assert a.send_now(b"\x80queued") is None
    first, second = a.poll_transmit(), a.poll_transmit()
    assert first is not None and first.data[0] < 4  # the response
    assert second is not None and second.data == b"\x80queued"
    info = a.selected_pair()
    assert info is not None and info.bytes_sent == len(b"\x80direct") + len(b"\x80queued")
    with pytest.raises(IceNotConnectedError):
        IceAgent(IceConfig(), controlling=True).send_now(b"\x80")


def test_handle_datagram_says_which_datagrams_were_application_data() -> None:
    wire, _, b = wired()
    wire.run(2.0)
    pair = b.selected_pair()
    assert pair is not None
    local, remote = pair.local.transport_address, pair.remote.transport_address  # host
    assert b.handle_datagram(b"\x80media", local, remote, wire.now) is True
    assert b.poll_transmit() is None
    assert [e for e in drain_events(b) if isinstance(e, DataReceived)] == [
        DataReceived(b"\x80media", 1)
    ]
    # From an address with no valid pair: still data (dropped), still nothing else to do.
    assert b.handle_datagram(b"\x80stray", local, ("10.9.9.9", 9), wire.now) is True
    assert drain_events(b) == []
    # STUN, or bytes that fail to decode as STUN, are not application data.
    assert b.handle_datagram(b"\x00\x01garbage", local, remote, wire.now) is False


def drain_events(agent: IceAgent) -> list[IceEvent]:
    events = []
    while (event := agent.poll_event()) is not None:
        events.append(event)
    return events


def test_regular_nomination_uses_use_candidate_once() -> None:
    wire, a, b = wired()
    wire.run(2.0)
    requests = [decode(t) for _, t in wire.sent[id(a)] if t.data[0] < 4]
    checks = [m for m in requests if m.message_class is MessageClass.REQUEST]
    with_use = [m for m in checks if m.get(UseCandidate) is not None]
    assert len(with_use) == 1
    assert not any(
        m.get(UseCandidate) for _, t in wire.sent[id(b)] if t.data[0] < 4 for m in [decode(t)]
    )
    selected = [e for e in wire.log(b) if isinstance(e, SelectedPairChanged)]
    assert len(selected) == 1


def test_aggressive_nomination_marks_every_check() -> None:
    config = IceConfig(nomination=Nomination.AGGRESSIVE)
    wire, a, b = wired(config, IceConfig())
    wire.run(1.0)
    checks = [
        decode(t)
        for _, t in wire.sent[id(a)]
        if t.data[0] < 4 and decode(t).message_class is MessageClass.REQUEST
    ]
    assert checks and all(m.get(UseCandidate) is not None for m in checks)
    assert a.selected_pair() is not None and b.selected_pair() is not None
    # Selected on the first success, with no nomination round trip: one check, one answer.
    assert len(checks) == 1
    first = next(e for e in wire.log(b) if isinstance(e, SelectedPairChanged))
    assert first.pair is not None and first.pair.nominated


def test_nothing_is_delivered_before_a_check_succeeds() -> None:
    agent = make_agent()
    agent.handle_datagram(b"early data", BASE, PEER, 0.0)
    assert not [e for e in events(agent) if isinstance(e, DataReceived)]
    # An authenticated check from the peer is not enough: it proves nothing about PEER.
    agent.handle_datagram(peer_check(agent), BASE, PEER, 0.0)
    drain(agent)
    agent.handle_datagram(b"still early", BASE, PEER, 0.0)
    assert not [e for e in events(agent) if isinstance(e, DataReceived)]
    (check,) = checks_sent(agent, 0.0)
    agent.handle_datagram(answer(check), BASE, PEER, 0.02)
    agent.handle_datagram(b"now", BASE, PEER, 0.03)
    agent.handle_datagram(b"not from the pair", BASE, ("198.51.100.3", 6000), 0.03)
    received = [e for e in events(agent) if isinstance(e, DataReceived)]
    assert received == [DataReceived(b"now", 1)]


def test_send_before_selection_raises() -> None:
    agent = make_agent()
    with pytest.raises(IceNotConnectedError):
        agent.send(b"x")


def test_several_components() -> None:
    wire, a, b = wired(components=2)
    wire.run(3.0)
    assert state(a) is IceTransportState.COMPLETED and state(b) is IceTransportState.COMPLETED
    for component in (1, 2):
        pair = a.selected_pair(component)
        assert pair is not None and pair.component == component
        a.send(f"c{component}".encode(), component)
    wire.run(0.1)
    assert wire.received(b, 1) == [b"c1"] and wire.received(b, 2) == [b"c2"]
    bases = {a.selected_pair(c).local.port for c in (1, 2)}  # type: ignore[union-attr]
    assert bases == {1001, 1002}


def test_trickled_candidates_arrive_after_checks_started() -> None:
    wire, a, b = wired(signal=False)
    for me, other in ((a, b), (b, a)):
        credentials = other.local_credentials
        me.set_remote_credentials(credentials.ufrag, credentials.pwd)
    wire.run(1.0)
    assert state(a) is IceTransportState.NEW  # no remote candidate yet
    # Only B learns A's candidate: B's checks let A learn B as peer-reflexive.
    b.add_remote_candidate(Candidate.from_sdp(a.local_candidates[0].to_sdp()))
    wire.run(2.0)
    assert state(a) is IceTransportState.CONNECTED  # no end-of-candidates yet
    learnt = [e for e in wire.log(a) if isinstance(e, PeerReflexiveCandidate)]
    assert learnt and not learnt[0].local
    a.add_remote_candidate(Candidate.from_sdp(b.local_candidates[0].to_sdp()))
    a.add_remote_candidate(None)
    b.add_remote_candidate(None)
    wire.run(1.0)
    assert state(a) is IceTransportState.COMPLETED and state(b) is IceTransportState.COMPLETED
    (remote,) = a.remote_candidates
    assert remote.type is CandidateType.HOST  # the signalled type replaced prflx


# --- consent freshness (RFC 7675) ------------------------------------------------------------


def test_consent_requests_are_jittered_and_loss_stops_sending() -> None:
    wire, a, _ = wired()
    wire.run(2.0)
    assert state(a) is IceTransportState.COMPLETED
    start = wire.now
    wire.run(60.0)
    consent = [
        when
        for when, t in wire.sent[id(a)]
        if when > start and t.data[0] < 4 and decode(t).message_class is MessageClass.REQUEST
    ]
    gaps = [y - x for x, y in itertools.pairwise(consent)]
    assert len(consent) >= 9
    assert all(4.0 - 1e-9 <= gap <= 6.0 + 1e-9 for gap in gaps)  # 5 s ± 20 % (§5.1)
    assert len({round(gap, 6) for gap in gaps}) > 3  # actually randomised
    assert state(a) is IceTransportState.COMPLETED
    # Now B stops answering: disconnected after 10 s, consent lost after 30 s.
    cut = wire.now
    wire.drop = lambda transmit: transmit.remote[0] == "10.0.0.1"
    wire.run(40.0)
    log = wire.log(a)
    changes = [e for e in log if isinstance(e, ConnectionStateChanged)]
    assert [c.state for c in changes[-2:]] == [
        IceTransportState.DISCONNECTED,
        IceTransportState.FAILED,
    ]
    lost = [e for e in log if isinstance(e, ConsentLost)]
    assert len(lost) == 1 and lost[0].component == 1
    assert a.selected_pair() is None
    with pytest.raises(IceNotConnectedError):
        a.send(b"after consent loss")
    # Nothing at all goes to the peer after consent was lost.
    lost_at = max(when for when, t in wire.sent[id(a)] if t.remote[0] == "10.0.0.2")
    assert lost_at <= cut + 30.0 + 1e-6


def test_default_consent_jitter_comes_from_the_system_and_stays_in_bounds() -> None:
    # Agents built without an rng share a stateless SystemJitter (secrets), not a
    # Mersenne Twister each; its draws must still be uniform over [0.8, 1.2] x 5 s.
    draws = [
        ConsentFreshness(
            100.0,
            interval=5.0,
            jitter=0.2,
            timeout=30.0,
            disconnected_timeout=10.0,
            rng=SystemJitter(),
        ).next_request
        - 100.0
        for _ in range(2000)
    ]
    assert all(4.0 <= d <= 6.0 for d in draws)
    assert min(draws) < 4.1 and max(draws) > 5.9  # the whole range is used
    assert 4.9 < statistics.fmean(draws) < 5.1


def test_consent_recovers_from_a_short_outage() -> None:
    wire, a, _ = wired()
    wire.run(2.0)
    wire.drop = lambda transmit: True
    wire.run(12.0)
    assert state(a) is IceTransportState.DISCONNECTED
    wire.drop = lambda transmit: False
    wire.run(8.0)
    assert state(a) is IceTransportState.COMPLETED
    assert not any(isinstance(e, ConsentLost) for e in wire.log(a))


# --- restart (RFC 8445 §9) -------------------------------------------------------------------


def test_restart_keeps_data_on_the_old_pair_until_the_new_one_is_selected() -> None:
    wire, a, b = wired()
    wire.run(2.0)
    old = a.local_credentials
    a.restart()
    new = a.local_credentials
    assert new.ufrag != old.ufrag and new.pwd != old.pwd
    regathered = [e for e in (a.poll_event(), a.poll_event()) if e is not None]
    assert isinstance(regathered[0], CandidateGathered)
    # Before the new description reached B, data still flows on the old pair.
    a.send(b"during restart")
    wire.run(0.1)
    assert wire.received(b) == [b"during restart"]
    # B sees new remote credentials: it restarts too (§9), and the answer goes back.
    b_old = b.local_credentials
    b.set_remote_credentials(new.ufrag, new.pwd)
    assert b.local_credentials != b_old
    a.set_remote_credentials(b.local_credentials.ufrag, b.local_credentials.pwd)
    for me, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            me.add_remote_candidate(candidate)
        me.add_remote_candidate(None)
    b.send(b"still old pair")
    wire.run(3.0)
    assert wire.received(a) == [b"still old pair"]
    assert state(a) is IceTransportState.COMPLETED and state(b) is IceTransportState.COMPLETED
    selections = [e for e in wire.log(a) if isinstance(e, SelectedPairChanged)]
    assert len(selections) == 2  # the original one and the restarted session's
    a.send(b"new pair")
    wire.run(0.1)
    assert wire.received(b) == [b"during restart", b"new pair"]
    # The old credentials are retired: a check with them gets 401.
    stale = check_request(
        new_transaction_id(),
        local_ufrag="zzzz",
        remote_ufrag=old.ufrag,
        remote_key=short_term_key(old.pwd),
        priority=1,
        controlling=False,
        tie_breaker=1,
        use_candidate=False,
    )
    a.handle_datagram(stale, ("10.0.0.1", 1001), ("10.0.0.2", 2001), wire.now)
    assert _response_code(a) == 401


def test_restart_before_connection_just_renews_credentials() -> None:
    agent = make_agent()
    old = agent.local_credentials
    agent.restart()
    assert agent.local_credentials != old
    assert agent.pairs() == [] and agent.remote_candidates == ()
    assert state(agent) is IceTransportState.NEW


# --- ICE lite (RFC 8445 §2.5) ----------------------------------------------------------------


def test_lite_server_with_full_client() -> None:
    wire, client, server = wired(IceConfig(), IceConfig(lite=True), signal=False)
    assert not server.controlling
    exchange(client, server)
    assert client.controlling
    wire.run(2.0)
    assert state(client) is IceTransportState.COMPLETED
    assert state(server) is IceTransportState.COMPLETED
    # The lite agent never sends a request: only responses (and data, keepalives).
    for _, transmit in wire.sent[id(server)]:
        if transmit.data[0] < 4:
            assert decode(transmit).message_class is not MessageClass.REQUEST
    client.send(b"to server")
    server.send(b"to client")
    wire.run(0.1)
    assert wire.received(server) == [b"to server"] and wire.received(client) == [b"to client"]
    # Keepalives (Binding indications) from the lite side every Tr.
    wire.run(40.0)
    indications = [
        t
        for _, t in wire.sent[id(server)]
        if t.data[0] < 4 and decode(t).message_class is MessageClass.INDICATION
    ]
    assert len(indications) >= 2
    assert state(server) is IceTransportState.COMPLETED


def test_full_agent_controls_against_a_lite_peer() -> None:
    agent = IceAgent(controlling=False)
    agent.set_remote_credentials(PEER_CREDENTIALS.ufrag, PEER_CREDENTIALS.pwd, lite=True)
    assert agent.controlling
    assert RoleChanged(controlling=True) in events(agent)


# --- close -----------------------------------------------------------------------------------


def test_close_stops_everything() -> None:
    wire, a, _ = wired()
    wire.run(2.0)
    a.close()
    assert state(a) is IceTransportState.CLOSED
    assert a.poll_timeout() is None and a.poll_transmit() is None
    with pytest.raises(IceNotConnectedError):
        a.send(b"x")
    with pytest.raises(LocalProtocolError):
        a.add_remote_candidate(None)
    a.handle_datagram(b"data", ("10.0.0.1", 1001), ("10.0.0.2", 2001), wire.now)
    a.handle_timeout(wire.now + 100)
    assert a.poll_transmit() is None
    a.close()  # idempotent


# --- nomination details (RFC 8445 §7.3.1.5, §8.1.1) -------------------------------------------


def test_controlled_agent_nominates_when_its_own_check_succeeds() -> None:
    agent = make_agent(controlling=False)
    # USE-CANDIDATE arrives before the agent's own check on the pair succeeded.
    agent.handle_datagram(peer_check(agent, controlling=True, use_candidate=True), BASE, PEER, 0.0)
    drain(agent)
    assert agent.selected_pair() is None
    (check,) = checks_sent(agent, 0.0)
    assert decode(check).get(UseCandidate) is None  # the controlled agent never sets it
    agent.handle_datagram(answer(check), BASE, PEER, 0.02)
    selected = [e for e in events(agent) if isinstance(e, SelectedPairChanged)]
    assert len(selected) == 1 and selected[0].pair is not None
    assert selected[0].pair.remote.transport_address == PEER


def test_regular_nomination_waits_for_better_pairs_then_gives_up() -> None:
    agent = make_agent(remote=False, nomination_delay=0.5)
    better = ("198.51.100.2", 6001)
    worse = ("198.51.100.2", 6002)
    agent.add_remote_candidate(peer_candidate(better, priority=2000000000, foundation="b"))
    agent.add_remote_candidate(peer_candidate(worse, priority=1000, foundation="w"))
    first = checks_sent(agent, 0.0)
    second = checks_sent(agent, 0.05)
    assert [t.remote for t in first + second] == [better, worse]
    agent.handle_datagram(answer(second[0]), BASE, worse, 0.07)
    # The better pair is still in progress: no nomination yet.
    assert all(decode(t).get(UseCandidate) is None for t in checks_sent(agent, 0.3))
    # After the nomination delay, the best valid pair (the worse one) is nominated.
    now = 0.3
    nominations: list[tuple[float, Transmit]] = []
    while not nominations:
        deadline = agent.poll_timeout()
        assert deadline is not None and deadline < 1.0
        now = deadline
        nominations += [(now, t) for t in checks_sent(agent, now) if decode(t).get(UseCandidate)]
    ((when, nomination),) = nominations
    assert nomination.remote == worse
    assert when >= 0.07 + 0.5 - 1e-9  # first valid pair at 0.07, then the delay
    agent.handle_datagram(answer(nomination), BASE, worse, now + 0.02)
    pair = agent.selected_pair()
    assert pair is not None and pair.remote.port == worse[1] and pair.nominated


def test_relayed_candidates_send_from_the_relayed_address() -> None:
    agent = IceAgent(tie_breaker=1)
    relayed = ("203.0.113.50", 50000)
    candidate = agent.add_relayed_candidate(
        relayed, server_ip="203.0.113.1", mapped=("198.51.100.9", 4000)
    )
    assert candidate is not None and candidate.type is CandidateType.RELAYED
    assert candidate.priority >> 24 == 0
    assert (candidate.related_address, candidate.related_port) == ("198.51.100.9", 4000)
    agent.set_remote_credentials(PEER_CREDENTIALS.ufrag, PEER_CREDENTIALS.pwd)
    agent.add_remote_candidate(peer_candidate())
    (check,) = checks_sent(agent, 0.0)
    assert (check.local, check.remote) == (relayed, PEER)
    # Responses come back through the TURN client, on the relayed address.
    agent.handle_datagram(answer(check, PEER), relayed, PEER, 0.05)
    (pair,) = agent.pairs()
    assert pair.state is PairState.SUCCEEDED
