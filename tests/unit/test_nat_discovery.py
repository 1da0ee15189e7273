"""RFC 5780 discovery core (tsunagu.nat.discovery), driven on virtual time through a
scripted NAT and a scripted RFC 5780 server whose responses are built with the codec.

The harness is deliberately small and explicit: the NAT maps and filters as RFC 4787
§4.1/§5 define, hairpins when told to, and forgets idle mappings after ``lifetime``
seconds; the server answers as RFC 5780 §6.1 Table 1 says. Nothing sleeps: the clock is a
float advanced to the next delivery or core deadline.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tsunagu.errors import LocalProtocolError
from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.nat.discovery import (
    DiscoveryConfig,
    NatDiscovery,
    NatDiscoveryResult,
    Transmit,
    transaction_config,
    verdict,
)
from tsunagu.nat.events import (
    DiscoveryCompleted,
    FilteringDetermined,
    HairpinningDetermined,
    LifetimeProbed,
    MappingDetermined,
    NatEvent,
    NatTest,
    TestFinished,
)
from tsunagu.stun.attributes import (
    Address,
    Attribute,
    ChangeRequest,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    UnknownAttributes,
    XorMappedAddress,
)
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.message import Message, error_response, success_response
from tsunagu.stun.server import StunServerCore
from tsunagu.stun.server_config import StunServerConfig

EIM, ADM, APDM = (
    MappingBehavior.ENDPOINT_INDEPENDENT,
    MappingBehavior.ADDRESS_DEPENDENT,
    MappingBehavior.ADDRESS_AND_PORT_DEPENDENT,
)
EIF, ADF, APDF = (
    FilteringBehavior.ENDPOINT_INDEPENDENT,
    FilteringBehavior.ADDRESS_DEPENDENT,
    FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT,
)

A1, A2, P1, P2 = "198.51.100.1", "198.51.100.2", 3478, 3479
SERVER: Address = (A1, P1)
OTHER: Address = (A2, P2)
X: Address = ("10.0.0.2", 5000)  # the socket under test
Y: Address = ("10.0.0.2", 5001)  # the second socket (hairpin, lifetime)
PUBLIC_IP = "203.0.113.7"
LATENCY = 0.02  # one way, seconds


# --- the scripted server -------------------------------------------------------------------


@dataclass
class ScriptedServer:
    """RFC 5780 §6.1 behaviour, with switches for the broken servers the client must spot."""

    rfc5780: bool = True  # send OTHER-ADDRESS and honour CHANGE-REQUEST
    silent: bool = False  # answer nothing at all
    ignore_change_request: bool = False  # answer from where the request came
    refuse_change_request: bool = False  # 420 to CHANGE-REQUEST
    honour_response_port: bool = True  # RFC 5780 §7.5
    refuse_response_port: bool = False  # 420 to RESPONSE-PORT
    software: str | None = "scripted 1.0"
    requests: list[tuple[Address, Message]] = field(default_factory=list)

    def handle(self, data: bytes, src: Address, dst: Address) -> tuple[bytes, Address, Address]:
        """(response bytes, from, to) or raises NoAnswerError."""
        request = Message.decode(data)
        self.requests.append((dst, request))
        if self.silent:
            raise NoAnswerError
        assert request.method == Method.BINDING and request.message_class is MessageClass.REQUEST
        change = request.get(ChangeRequest)
        port = request.get(ResponsePort)
        unknown: list[int] = []
        if change is not None and (not self.rfc5780 or self.refuse_change_request):
            unknown.append(ChangeRequest.TYPE)
        if port is not None and self.refuse_response_port:
            unknown.append(ResponsePort.TYPE)
        if unknown:
            response = error_response(request, 420, None, [UnknownAttributes(tuple(unknown))])
            return response.encode(fingerprint=True), dst, src
        source = dst
        if change is not None and not self.ignore_change_request:
            ip = (A2 if dst[0] == A1 else A1) if change.change_ip else dst[0]
            other_port = (P2 if dst[1] == P1 else P1) if change.change_port else dst[1]
            source = (ip, other_port)
        destination = src
        if port is not None and self.honour_response_port:
            destination = (src[0], port.port)
        attributes: list[Attribute] = [XorMappedAddress(src), MappedAddress(src)]
        if self.rfc5780:
            attributes += [ResponseOrigin(source), OtherAddress(OTHER)]
        if self.software is not None:
            attributes.append(Software(self.software))
        response = success_response(request, attributes)
        return response.encode(fingerprint=True), source, destination


class NoAnswerError(Exception):
    pass


class RealServer:
    """tsunagu's own sans-I/O server core as the far end (cross-checks the scripted one)."""

    def __init__(self) -> None:
        config = StunServerConfig(listen=(SERVER,), other=OTHER, rate_limit=0)
        self.core = StunServerCore(config)
        self.requests: list[tuple[Address, Message]] = []

    def handle(self, data: bytes, src: Address, dst: Address) -> tuple[bytes, Address, Address]:
        self.requests.append((dst, Message.decode(data)))
        replies = self.core.handle_datagram(data, dst, src, 0.0)
        if not replies:
            raise NoAnswerError
        (reply,) = replies
        return reply.data, reply.source, reply.destination


# --- the scripted NAT ----------------------------------------------------------------------


@dataclass
class _Mapping:
    internal: Address
    public_port: int
    contacted: set[Address] = field(default_factory=set)
    admitted: set[Address] = field(default_factory=set)  # remotes let in (conntrack flows)
    last_out: float = 0.0


@dataclass
class ScriptedNat:
    mapping: MappingBehavior = EIM
    filtering: FilteringBehavior = EIF
    hairpin: bool = True
    lifetime: float = 1e9  # idle seconds (outbound only refreshes) before a mapping dies
    present: bool = True  # False: no NAT at all, addresses pass unchanged
    conntrack: bool = True  # a packet let in makes replies to its source use its mapping
    drop_first: set[NatTest] = field(default_factory=set)  # lose a test's first request
    mappings: dict[tuple[object, ...], _Mapping] = field(default_factory=dict)
    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(40000))

    def _key(self, internal: Address, remote: Address) -> tuple[object, ...]:
        if self.mapping is EIM:
            return (internal,)
        if self.mapping is ADM:
            return (internal, remote[0])
        return (internal, remote)

    def outbound(self, internal: Address, remote: Address, now: float) -> Address:
        if not self.present:
            return internal
        if self.conntrack:
            # Stateful NATs (Linux conntrack): a reply to a remote that was let in through
            # a mapping leaves through that mapping, whatever the mapping behaviour says.
            for flow in self.mappings.values():
                alive = now - flow.last_out <= self.lifetime
                if alive and flow.internal == internal and remote in flow.admitted:
                    flow.contacted.add(remote)
                    flow.last_out = now
                    return (PUBLIC_IP, flow.public_port)
        key = self._key(internal, remote)
        entry = self.mappings.get(key)
        if entry is None or now - entry.last_out > self.lifetime:
            entry = _Mapping(internal, next(self.ports))
            self.mappings[key] = entry
        entry.contacted.add(remote)
        entry.last_out = now
        return (PUBLIC_IP, entry.public_port)

    def inbound(
        self, public: Address, remote: Address, now: float, *, hairpinned: bool = False
    ) -> Address | None:
        """The internal address a packet to ``public`` from ``remote`` reaches, or None."""
        if not self.present:
            return public
        for entry in self.mappings.values():
            if entry.public_port != public[1]:
                continue
            if now - entry.last_out > self.lifetime:
                return None  # expired
            if hairpinned:  # RFC 4787 REQ-9: hairpinned traffic passes (in this NAT)
                return entry.internal
            if self.filtering is ADF:
                allowed = any(c[0] == remote[0] for c in entry.contacted)
            else:
                allowed = self.filtering is EIF or remote in entry.contacted
            if not allowed:
                return None
            entry.admitted.add(remote)
            return entry.internal
        return None


# --- the world -----------------------------------------------------------------------------


@dataclass
class World:
    nat: ScriptedNat = field(default_factory=ScriptedNat)
    server: ScriptedServer | RealServer = field(default_factory=ScriptedServer)
    now: float = 0.0
    in_flight: list[tuple[float, int, bytes, Address, Address]] = field(default_factory=list)
    sent: list[tuple[float, Transmit]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    tests_seen: set[bytes] = field(default_factory=set)

    def _deliver_later(self, data: bytes, local: Address, remote: Address) -> None:
        heapq.heappush(self.in_flight, (self.now + LATENCY, next(self.seq), data, local, remote))

    def send(self, transmit: Transmit, test: NatTest | None) -> None:
        self.sent.append((self.now, transmit))
        tid = transmit.data[8:20]
        if test in self.nat.drop_first and tid not in self.tests_seen:
            self.tests_seen.add(tid)
            return
        self.tests_seen.add(tid)
        public = self.nat.outbound(transmit.local, transmit.remote, self.now)
        if transmit.remote[0] == PUBLIC_IP or (not self.nat.present and transmit.remote in (X, Y)):
            # Towards our own public address: hairpinning (RFC 4787 §6).
            if self.nat.present and not self.nat.hairpin:
                return
            internal = self.nat.inbound(transmit.remote, public, self.now, hairpinned=True)
            if internal is not None:
                self._deliver_later(transmit.data, internal, public)
            return
        try:
            data, source, destination = self.server.handle(transmit.data, public, transmit.remote)
        except NoAnswerError:
            return
        internal = self.nat.inbound(destination, source, self.now + LATENCY)
        if internal is not None:
            self._deliver_later(data, internal, source)

    def run(
        self,
        discovery: NatDiscovery,
        *,
        limit: float = 3600.0,
        inject: Callable[[World, NatDiscovery], None] | None = None,
    ) -> tuple[NatDiscoveryResult, list[NatEvent]]:
        events: list[NatEvent] = []
        tests: dict[bytes, NatTest] = {}
        discovery.start(self.now)
        for _ in range(100_000):
            while (transmit := discovery.poll_transmit()) is not None:
                request = Message.decode(transmit.data)
                test = _classify(request, transmit, discovery)
                tests.setdefault(transmit.data[8:20], test)
                self.send(transmit, tests[transmit.data[8:20]])
            while (event := discovery.poll_event()) is not None:
                events.append(event)
            if discovery.done:
                assert discovery.result is not None
                assert isinstance(events[-1], DiscoveryCompleted)
                assert discovery.poll_timeout() is None
                return discovery.result, events
            deadline = discovery.poll_timeout()
            arrival = self.in_flight[0][0] if self.in_flight else None
            upcoming = min(t for t in (deadline, arrival) if t is not None)
            assert upcoming <= limit, "discovery did not finish within the time limit"
            self.now = max(self.now, upcoming)
            if self.in_flight and self.in_flight[0][0] <= self.now:
                _, _, data, local, remote = heapq.heappop(self.in_flight)
                discovery.handle_datagram(data, local, remote, self.now)
                if inject is not None:
                    inject(self, discovery)
            if deadline is not None and deadline <= self.now:
                discovery.handle_timeout(self.now)
        raise AssertionError("too many steps")


def _classify(request: Message, transmit: Transmit, discovery: NatDiscovery) -> NatTest:
    """Which RFC 5780 test a request is, from what it carries and where it goes."""
    change = request.get(ChangeRequest)
    if change is not None:
        return NatTest.FILTERING_II if change.change_ip else NatTest.FILTERING_III
    if request.get(ResponsePort) is not None:
        return NatTest.LIFETIME_PROBE
    if transmit.local == discovery.secondary:
        return NatTest.HAIRPIN
    if transmit.remote == (A2, P1):
        return NatTest.MAPPING_II
    if transmit.remote == (A2, P2):
        return NatTest.MAPPING_III
    return NatTest.BINDING


def make_ids(seed: int = 1) -> Callable[[], bytes]:
    rng = random.Random(seed)
    return lambda: rng.randbytes(12)


def discover(
    world: World,
    *,
    secondary: Address | None = Y,
    config: DiscoveryConfig | None = None,
    **kwargs: object,
) -> tuple[NatDiscoveryResult, list[NatEvent]]:
    discovery = NatDiscovery(
        SERVER, X, secondary=secondary, config=config, transaction_id=make_ids()
    )
    return world.run(discovery, **kwargs)  # type: ignore[arg-type]


# --- the nine mapping x filtering combinations ---------------------------------------------


@pytest.mark.parametrize("mapping", list(MappingBehavior))
@pytest.mark.parametrize("filtering", list(FilteringBehavior))
def test_every_mapping_and_filtering_combination(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    world = World(nat=ScriptedNat(mapping=mapping, filtering=filtering))
    result, events = discover(world)
    assert result.mapping is mapping
    assert result.filtering is filtering
    assert result.nat_present is True
    assert result.udp_blocked is False
    assert result.error is None
    assert result.mapped == (PUBLIC_IP, 40000)
    assert result.other_address == OTHER
    assert result.software == "scripted 1.0"
    assert MappingDetermined(mapping) in events
    assert FilteringDetermined(filtering) in events
    # Mapping test III only when test II's mapping differed from test I's (§4.3).
    mapping_tests = {e.test for e in events if isinstance(e, TestFinished)}
    assert (NatTest.MAPPING_III in mapping_tests) == (mapping is not EIM)
    # Filtering ran before anything went to A2 (else an address-dependent filter would
    # have been opened and passed for endpoint-independent).
    first_to_a2 = min(t for t, tx in world.sent if tx.remote[0] == A2)
    last_filtering = max(
        t for t, tx in world.sent if Message.decode(tx.data).get(ChangeRequest) is not None
    )
    assert last_filtering < first_to_a2
    # Filtering tests whose answer cannot get in take the full configured timeout, and
    # not more: the whole run stays bounded.
    timeout = DiscoveryConfig().timeout
    assert world.now < 3 * timeout + 1.0


@pytest.mark.parametrize(
    ("mapping", "filtering", "expected"),
    [
        (EIM, EIF, "direct connections will work with peers behind any kind of NAT"),
        (EIM, ADF, "direct connections will work with peers behind any kind of NAT"),
        (EIM, APDF, "direct connections work only with 3 of 9 NAT types (not ADM/EIF,"),
        (ADM, EIF, "most peers (8 of 9 NAT types); you will need TURN for peers behind EIM/APDF"),
        (ADM, APDF, "direct connections work only with 4 of 9 NAT types (not EIM/APDF, ADM/ADF"),
        (APDM, EIF, "most peers (8 of 9 NAT types); you will need TURN for peers behind EIM/APDF"),
        (APDM, APDF, "direct connections work only with 4 of 9 NAT types (not EIM/APDF, ADM/ADF"),
    ],
)
def test_verdicts(mapping: MappingBehavior, filtering: FilteringBehavior, expected: str) -> None:
    result, _ = discover(World(nat=ScriptedNat(mapping=mapping, filtering=filtering)))
    assert expected in result.verdict
    assert verdict(result) == result.verdict


def test_mapping_tests_compare_whole_addresses() -> None:
    # ADM: test II (A2:P1) gets a new mapping, test III (A2:P2) the same one as test II.
    world = World(nat=ScriptedNat(mapping=ADM))
    _, events = discover(world)
    mapped = {e.test: e.mapped for e in events if isinstance(e, TestFinished)}
    assert mapped[NatTest.MAPPING_II] != mapped[NatTest.BINDING]
    assert mapped[NatTest.MAPPING_III] == mapped[NatTest.MAPPING_II]


def test_against_tsunagu_server_core() -> None:
    # The same client against the project's own server core, for the strictest NAT.
    world = World(nat=ScriptedNat(mapping=APDM, filtering=APDF), server=RealServer())
    result, _ = discover(world)
    assert (result.mapping, result.filtering, result.hairpinning) == (APDM, APDF, True)
    assert result.other_address == OTHER
    assert result.software is not None and result.software.startswith("tsunagu")


def test_no_nat_on_the_path() -> None:
    world = World(nat=ScriptedNat(present=False))
    result, _ = discover(world)
    assert result.nat_present is False
    assert result.mapped == X
    assert (result.mapping, result.filtering, result.hairpinning) == (EIM, EIF, True)
    assert result.verdict.startswith("no NAT")


# --- hairpinning ---------------------------------------------------------------------------


@pytest.mark.parametrize("hairpin", [True, False])
def test_hairpinning(hairpin: bool) -> None:
    world = World(nat=ScriptedNat(hairpin=hairpin))
    result, events = discover(world)
    assert result.hairpinning is hairpin
    assert HairpinningDetermined(hairpin) in events
    # The hairpin request went from the second socket to our own mapped address.
    hairpin_sends = [tx for _, tx in world.sent if tx.remote == result.mapped]
    assert hairpin_sends
    assert all(tx.local == Y for tx in hairpin_sends)
    if not hairpin:
        # No answer: retransmitted per RFC 8489 §6.2.1 until the configured timeout.
        assert len(hairpin_sends) == DiscoveryConfig().transaction.rc


def test_hairpin_needs_a_second_socket() -> None:
    world = World()
    result, _ = discover(world, secondary=None)
    assert result.hairpinning is None
    assert any("no second local socket" in note for note in result.notes)
    assert (result.mapping, result.filtering) == (EIM, EIF)
    assert all(tx.local == X for _, tx in world.sent)


def test_filtering_runs_on_the_second_socket() -> None:
    # Address-dependent mapping behind a connection-tracking NAT: filtering test II's
    # answer from A2:P2 opens a reply flow through the tested mapping, which would carry
    # mapping test III (to A2:P2) too. From the second socket it cannot.
    world = World(nat=ScriptedNat(mapping=ADM, filtering=EIF, conntrack=True))
    result, _ = discover(world)
    assert (result.mapping, result.filtering) == (ADM, EIF)
    for _, tx in world.sent:
        if Message.decode(tx.data).get(ChangeRequest) is not None:
            assert tx.local == Y
    # With one socket the same NAT misleads the tests, and the result says so.
    world = World(nat=ScriptedNat(mapping=ADM, filtering=EIF, conntrack=True))
    result, _ = discover(world, secondary=None)
    assert result.mapping is APDM
    assert any("tracks connections" in note for note in result.notes)
    # Without connection tracking, one socket is enough.
    world = World(nat=ScriptedNat(mapping=ADM, filtering=EIF, conntrack=False))
    result, _ = discover(world, secondary=None)
    assert (result.mapping, result.filtering) == (ADM, EIF)


def test_hairpin_can_be_switched_off() -> None:
    world = World()
    result, _ = discover(world, config=DiscoveryConfig(hairpinning=False))
    assert result.hairpinning is None
    assert not any(tx.remote[0] == PUBLIC_IP for _, tx in world.sent)


# --- servers that cannot do RFC 5780, and silence ------------------------------------------


def test_server_without_other_address() -> None:
    world = World(server=ScriptedServer(rfc5780=False))
    result, _ = discover(world)
    assert result.error is not None and "does not support RFC 5780" in result.error
    assert result.mapping is None and result.filtering is None
    assert result.mapped == (PUBLIC_IP, 40000)
    assert not result.rfc5780_supported
    assert "does not support RFC 5780" in result.verdict
    # No CHANGE-REQUEST and nothing to an alternate address was sent.
    assert all(Message.decode(tx.data).get(ChangeRequest) is None for _, tx in world.sent)
    assert all(tx.remote[0] != A2 for _, tx in world.sent)
    # Hairpinning needs no RFC 5780 and is still tested.
    assert result.hairpinning is True


def test_silent_server_means_udp_blocked() -> None:
    world = World(server=ScriptedServer(silent=True))
    config = DiscoveryConfig(timeout=3.0)
    result, events = discover(world, config=config)
    assert result.udp_blocked is True
    assert result.verdict == "UDP blocked: you will need TURN over TCP/TLS"
    assert result.mapped is None and result.mapping is None and result.filtering is None
    # RFC 8489 §6.2.1 retransmissions: 0, 0.5, 1.5 s, and the timeout at 3 s.
    assert [t for t, _ in world.sent] == [0.0, 0.5, 1.5]
    assert world.now == pytest.approx(3.0)
    assert events[0] == TestFinished(NatTest.BINDING, responded=False)


def test_server_ignoring_change_request_is_caught() -> None:
    # Answers to CHANGE-REQUEST from the primary address would pass for EIF; the client
    # checks where they came from.
    world = World(server=ScriptedServer(ignore_change_request=True))
    result, _ = discover(world)
    assert result.filtering is None
    assert result.error is not None and "CHANGE-REQUEST" in result.error
    assert result.mapping is EIM  # the mapping tests do not need CHANGE-REQUEST
    assert "could not determine the filtering behaviour" in result.verdict


def test_server_refusing_change_request() -> None:
    world = World(server=ScriptedServer(refuse_change_request=True))
    result, events = discover(world)
    assert result.filtering is None
    assert result.error is not None and "420" in result.error
    assert any(isinstance(e, TestFinished) and e.error and "420" in e.error for e in events)


def test_lost_request_is_retransmitted_and_still_answers() -> None:
    # Filtering test II's first copy is lost; the retransmission's answer still says EIF.
    world = World(nat=ScriptedNat(drop_first={NatTest.FILTERING_II}))
    result, _ = discover(world)
    assert result.filtering is EIF


def test_timeouts_that_answer_wait_the_full_configured_time() -> None:
    # APDF: both filtering answers are dropped. Test I measured a 40 ms RTT, but a
    # "filtered" conclusion still waits the configured timeout, not a shrunken RTO.
    world = World(nat=ScriptedNat(filtering=APDF))
    config = DiscoveryConfig(timeout=2.0)
    _, events = discover(world, config=config)
    finished = [e for e in events if isinstance(e, TestFinished)]
    assert [e.test for e in finished][:1] == [NatTest.BINDING]
    filtering_sends = [
        t for t, tx in world.sent if Message.decode(tx.data).get(ChangeRequest) is not None
    ]
    start = min(filtering_sends)
    first_to_a2 = min(t for t, tx in world.sent if tx.remote[0] == A2)
    assert first_to_a2 - start == pytest.approx(2.0)


# --- binding lifetime (§4.6) ---------------------------------------------------------------


def test_lifetime_probe_finds_the_mapping_timeout() -> None:
    world = World(nat=ScriptedNat(lifetime=30.0))
    config = DiscoveryConfig(lifetime=True, lifetime_schedule=(10.0, 20.0, 40.0, 80.0))
    result, events = discover(world, config=config)
    assert result.lifetime == 20.0
    assert result.lifetime_expired_after == 40.0
    probes = [e for e in events if isinstance(e, LifetimeProbed)]
    assert probes == [
        LifetimeProbed(10.0, True),
        LifetimeProbed(20.0, True),
        LifetimeProbed(40.0, False),
    ]
    # Probes come from the second socket, carry RESPONSE-PORT = the first socket's mapped
    # port, and go to the primary server address.
    assert result.mapped is not None
    probe_sends = 0
    for _, tx in world.sent:
        port = Message.decode(tx.data).get(ResponsePort)
        if port is not None:
            probe_sends += 1
            assert tx.local == Y and tx.remote == SERVER
            assert port.port == result.mapped[1]
    # The 40 s probe got no answer: retransmitted until the configured timeout.
    assert probe_sends == 2 + DiscoveryConfig().transaction.rc
    assert (result.mapping, result.filtering) == (EIM, EIF)


def test_lifetime_longer_than_the_schedule() -> None:
    world = World()
    config = DiscoveryConfig(lifetime=True, lifetime_schedule=(1.0, 2.0))
    result, _ = discover(world, config=config)
    assert result.lifetime == 2.0
    assert result.lifetime_expired_after is None


def test_lifetime_shorter_than_the_first_period() -> None:
    world = World(nat=ScriptedNat(lifetime=5.0))
    config = DiscoveryConfig(lifetime=True, lifetime_schedule=(10.0, 20.0))
    result, _ = discover(world, config=config)
    assert result.lifetime == 0.0
    assert result.lifetime_expired_after == 10.0


def test_lifetime_respects_its_budget() -> None:
    world = World()
    config = DiscoveryConfig(
        lifetime=True, lifetime_schedule=(10.0, 100.0, 1000.0), lifetime_budget=150.0, timeout=1.0
    )
    result, _ = discover(world, config=config)
    assert result.lifetime == 100.0
    assert any("budget" in note for note in result.notes)
    assert world.now < 10.0 + 150.0 + 10.0


def test_lifetime_with_a_server_ignoring_response_port() -> None:
    world = World(server=ScriptedServer(honour_response_port=False))
    config = DiscoveryConfig(lifetime=True, lifetime_schedule=(1.0,))
    result, _ = discover(world, config=config)
    assert result.lifetime is None
    assert any("ignored RESPONSE-PORT" in note for note in result.notes)


def test_lifetime_with_a_server_refusing_response_port() -> None:
    world = World(server=ScriptedServer(refuse_response_port=True))
    config = DiscoveryConfig(lifetime=True, lifetime_schedule=(1.0,))
    result, _ = discover(world, config=config)
    assert result.lifetime is None
    assert any("420" in note for note in result.notes)


def test_lifetime_needs_a_second_socket() -> None:
    with pytest.raises(LocalProtocolError):
        NatDiscovery(SERVER, X, config=DiscoveryConfig(lifetime=True))


# --- robustness ----------------------------------------------------------------------------


def test_garbage_duplicates_and_strays_are_ignored() -> None:
    rng = random.Random(7)

    def inject(world: World, discovery: NatDiscovery) -> None:
        # After every real delivery: random bytes, a stray response, and a replay of the
        # request-response pattern with an unknown ID.
        discovery.handle_datagram(rng.randbytes(rng.randrange(0, 80)), X, SERVER, world.now)
        stray = Message(Method.BINDING, MessageClass.SUCCESS, rng.randbytes(12))
        discovery.handle_datagram(stray.encode(), X, SERVER, world.now)
        bogus = bytearray(stray.encode())
        bogus[0] = 0x00
        bogus[1] = 0x01  # a request that is not our hairpin
        discovery.handle_datagram(bytes(bogus), X, SERVER, world.now)

    world = World(nat=ScriptedNat(mapping=ADM, filtering=ADF))
    result, _ = discover(world, inject=inject)
    assert (result.mapping, result.filtering) == (ADM, ADF)


def test_duplicate_responses_do_not_count_twice() -> None:
    discovery = NatDiscovery(SERVER, X, secondary=Y, transaction_id=make_ids())
    discovery.start(0.0)
    transmit = discovery.poll_transmit()
    assert transmit is not None
    request = Message.decode(transmit.data)
    response = success_response(
        request, [XorMappedAddress((PUBLIC_IP, 1)), OtherAddress(OTHER)]
    ).encode()
    discovery.handle_datagram(response, X, SERVER, 0.1)
    discovery.handle_datagram(response, X, SERVER, 0.1)
    events = []
    while (event := discovery.poll_event()) is not None:
        events.append(event)
    assert [type(e) for e in events] == [TestFinished]


def test_error_response_to_test_i() -> None:
    discovery = NatDiscovery(SERVER, X, transaction_id=make_ids())
    discovery.start(0.0)
    transmit = discovery.poll_transmit()
    assert transmit is not None
    request = Message.decode(transmit.data)
    discovery.handle_datagram(error_response(request, 500).encode(), X, SERVER, 0.1)
    assert discovery.done and discovery.result is not None
    assert discovery.result.error == "test I failed: 500 Server Error"
    assert discovery.result.verdict.startswith("unknown")


def test_misuse() -> None:
    discovery = NatDiscovery(SERVER, X, transaction_id=make_ids())
    discovery.start(0.0)
    with pytest.raises(LocalProtocolError):
        discovery.start(1.0)
    with pytest.raises(LocalProtocolError):
        NatDiscovery(SERVER, X, secondary=X)
    for bad in (
        {"timeout": 0.0},
        {"initial_rto": -1.0},
        {"lifetime_schedule": ()},
        {"lifetime_schedule": (5.0, 1.0)},
        {"lifetime_budget": 0.0},
    ):
        with pytest.raises(ValueError):
            DiscoveryConfig(**bad)


def test_requests_carry_software_and_fingerprint() -> None:
    discovery = NatDiscovery(SERVER, X, transaction_id=make_ids())
    discovery.start(0.0)
    transmit = discovery.poll_transmit()
    assert transmit is not None and transmit.local == X and transmit.remote == SERVER
    request = Message.decode(transmit.data)  # FINGERPRINT is checked by decode
    assert request.get(Software) is not None
    assert transmit.data[-8:-6] == b"\x80\x28"  # FINGERPRINT last (RFC 8489 §14.7)
    quiet = NatDiscovery(
        SERVER, X, config=DiscoveryConfig(software=None, fingerprint=False),
        transaction_id=make_ids(),
    )  # fmt: skip
    quiet.start(0.0)
    plain = quiet.poll_transmit()
    assert plain is not None and Message.decode(plain.data).attributes == []


# --- transaction timing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "rto", "rc", "rm"),
    [
        (39.5, 0.5, 7, 16),  # RFC 8489 §6.2.1's own example
        (3.0, 0.5, 3, 3),
        (10.0, 0.5, 5, 5),
        (0.2, 0.1, 2, 1),
    ],
)
def test_transaction_config_fits_the_timeout(timeout: float, rto: float, rc: int, rm: int) -> None:
    config = transaction_config(timeout)
    assert config.initial_rto == pytest.approx(rto)
    assert (config.rc, config.rm) == (rc, rm)
    last_send = rto * ((1 << (rc - 1)) - 1)
    assert last_send + rm * rto == pytest.approx(timeout)
    assert config.reliable_timeout == timeout


def test_transaction_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        transaction_config(0.0)
    with pytest.raises(ValueError):
        transaction_config(1.0, initial_rto=0.0)


def test_hairpin_counts_only_on_the_first_socket() -> None:
    discovery = NatDiscovery(SERVER, X, secondary=Y, transaction_id=make_ids())
    discovery.start(0.0)
    first = discovery.poll_transmit()
    assert first is not None
    mapped = (PUBLIC_IP, 40000)
    response = success_response(
        Message.decode(first.data), [XorMappedAddress(mapped), OtherAddress(OTHER)]
    )
    discovery.handle_datagram(response.encode(), X, SERVER, 0.05)
    sent: list[Transmit] = []
    while (transmit := discovery.poll_transmit()) is not None:
        sent.append(transmit)
    (hairpin,) = [t for t in sent if t.remote == mapped]
    assert hairpin.local == Y
    # Our own request seen on the socket that sent it proves nothing.
    discovery.handle_datagram(hairpin.data, Y, mapped, 0.06)
    assert not any(isinstance(e, HairpinningDetermined) for e in _drain(discovery))
    discovery.handle_datagram(hairpin.data, X, (PUBLIC_IP, 40001), 0.07)
    assert HairpinningDetermined(True) in _drain(discovery)


def _drain(discovery: NatDiscovery) -> list[NatEvent]:
    events = []
    while (event := discovery.poll_event()) is not None:
        events.append(event)
    return events
