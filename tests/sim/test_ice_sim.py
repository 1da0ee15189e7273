"""Two real ICE agents (``tsunagu.ice.IceAgent``, unchanged) on simulated hosts, behind
simulated RFC 4787 NATs, with host candidates and server-reflexive ones from the real STUN
server core. Signalling (credentials, trickled candidates, end-of-candidates) goes through
the test with a delay; everything runs on virtual time.

Expected outcomes follow from the NAT behaviours: endpoint-independent mapping on at least
one side lets the checks of both sides meet (directly or through a peer-reflexive
candidate); address-and-port-dependent mapping on both sides (or against a port-restricted
cone) cannot work without a relay, and the agents must then fail cleanly -- within the
check timeout, with no data delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tsunagu.ice import (
    AddressPolicy,
    Candidate,
    CandidateGathered,
    CandidateType,
    ConnectionStateChanged,
    DataReceived,
    GatheringComplete,
    IceAgent,
    IceConfig,
    IceTransportState,
    PeerReflexiveCandidate,
    SelectedPairChanged,
)
from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.sim import Host, NatConfig, Network, SimDriver, SimStunServer, SimUdpSocket
from tsunagu.stun.server_config import StunServerConfig

STUN_IP = "203.0.113.1"
STUN = (STUN_IP, 3478)
SIGNALLING_DELAY = 0.05
# Every pair fails at most 39.5 s (the check transaction timeout with the minimal RTO)
# after its first check, and all checks start within a few seconds.
ICE_TIMEOUT = 50.0

EI_M = MappingBehavior.ENDPOINT_INDEPENDENT
APD_M = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
EI_F = FilteringBehavior.ENDPOINT_INDEPENDENT
APD_F = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT


@dataclass
class Peer:
    name: str
    agent: IceAgent
    socket: SimUdpSocket
    driver: SimDriver | None = None
    events: list[object] = field(default_factory=list)
    peer: Peer | None = None

    @property
    def received(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, DataReceived)]

    def states(self) -> list[IceTransportState]:
        return [e.state for e in self.events if isinstance(e, ConnectionStateChanged)]


@dataclass
class Scenario:
    net: Network
    alice: Peer
    bob: Peer

    def start(self) -> None:
        for me in (self.alice, self.bob):
            me.agent.add_host_candidate(me.socket.local)
            me.agent.gather_server_reflexive(me.socket.local, STUN, self.net.now)
            me.agent.finish_gathering()
        for me, other in ((self.alice, self.bob), (self.bob, self.alice)):
            credentials = other.agent.local_credentials
            me.agent.set_remote_credentials(credentials.ufrag, credentials.pwd)
        for me in (self.alice, self.bob):
            assert me.driver is not None
            me.driver.flush()

    def connected(self) -> bool:
        good = (IceTransportState.CONNECTED, IceTransportState.COMPLETED)
        return self.alice.agent.state in good and self.bob.agent.state in good

    def failed(self) -> bool:
        return (
            self.alice.agent.state is IceTransportState.FAILED
            and self.bob.agent.state is IceTransportState.FAILED
        )


def _signal(net: Network, sender: Peer, event: object) -> None:
    """Trickle local candidates and end-of-candidates to the peer, after a delay."""
    receiver = sender.peer
    assert receiver is not None
    if isinstance(event, CandidateGathered):
        # Through SDP, as a real signalling channel would carry it.
        line = event.candidate.to_sdp()

        def deliver_candidate() -> None:
            receiver.agent.add_remote_candidate(Candidate.from_sdp(line))
            assert receiver.driver is not None
            receiver.driver.flush()

        net.clock.call_later(SIGNALLING_DELAY, deliver_candidate)
    elif isinstance(event, GatheringComplete):

        def deliver_end() -> None:
            receiver.agent.add_remote_candidate(None)
            assert receiver.driver is not None
            receiver.driver.flush()

        net.clock.call_later(SIGNALLING_DELAY, deliver_end)


def build(
    alice_nat: NatConfig | None,
    bob_nat: NatConfig | None,
    *,
    seed: int = 7,
    config: IceConfig | None = None,
) -> Scenario:
    """Alice and Bob each on a home LAN behind a NAT (or directly on the internet when
    the NAT config is None); a STUN server on the internet."""
    net = Network(seed=seed)
    internet = net.add_lan("internet", latency=0.02, jitter=0.002)
    SimStunServer(
        net.add_host("stun", internet, STUN_IP),
        StunServerConfig(listen=(STUN,), software=None),
        tcp=False,
    )
    hosts: list[Host] = []
    for index, (name, nat_config) in enumerate((("alice", alice_nat), ("bob", bob_nat)), 1):
        if nat_config is None:
            hosts.append(net.add_host(name, internet, f"198.51.100.{100 + index}"))
            continue
        lan = net.add_lan(f"{name}-lan", f"192.168.{index}.0/24", latency=0.001)
        net.add_nat(
            f"{name}-nat",
            inside=lan,
            inside_ip=f"192.168.{index}.1",
            outside=internet,
            public_ips=f"198.51.100.{index}",
            config=nat_config,
        )
        hosts.append(net.add_host(name, lan, f"192.168.{index}.10"))
    peers: list[Peer] = []
    for host, controlling in zip(hosts, (True, False), strict=True):
        agent = IceAgent(config or IceConfig(), controlling=controlling)
        peers.append(Peer(host.name, agent, host.bind_udp(5000, host.addresses[0])))
    alice, bob = peers
    alice.peer, bob.peer = bob, alice
    for me in peers:

        def on_event(event: object, me: Peer = me) -> None:
            me.events.append(event)
            _signal(net, me, event)

        me.driver = SimDriver(net.clock, me.agent, [me.socket], on_event=on_event)
    return Scenario(net, alice, bob)


def nat(mapping: MappingBehavior, filtering: FilteringBehavior) -> NatConfig:
    return NatConfig(mapping, filtering)


CONNECTING = [
    pytest.param(None, None, id="no-nat"),
    pytest.param(nat(EI_M, EI_F), nat(EI_M, EI_F), id="EIM-EIF/EIM-EIF"),
    pytest.param(nat(EI_M, APD_F), nat(EI_M, APD_F), id="EIM-APDF/EIM-APDF"),
    pytest.param(nat(EI_M, EI_F), None, id="EIM-EIF/public"),
    pytest.param(nat(APD_M, APD_F), nat(EI_M, EI_F), id="APDM-APDF/EIM-EIF"),
    # Symmetric mapping on both sides, but open filtering: a check reaches the peer's
    # server-reflexive mapping and the answer follows that inbound flow back out.
    pytest.param(nat(APD_M, EI_F), nat(APD_M, EI_F), id="APDM-EIF/APDM-EIF"),
]


@pytest.mark.parametrize(("alice_nat", "bob_nat"), CONNECTING)
def test_agents_connect_and_exchange_data(
    alice_nat: NatConfig | None, bob_nat: NatConfig | None
) -> None:
    scenario = build(alice_nat, bob_nat)
    scenario.start()
    assert scenario.net.run_until(scenario.connected, timeout=10.0)
    alice, bob = scenario.alice, scenario.bob
    pair_a = alice.agent.selected_pair()
    pair_b = bob.agent.selected_pair()
    assert pair_a is not None and pair_b is not None
    # Each side sends to where the other receives: the selected pairs mirror each other
    # through the NATs (remote of one = public face of the other's base).
    assert pair_a.valid and pair_b.valid and pair_a.nominated and pair_b.nominated
    alice.agent.send(b"hello bob")
    bob.agent.send(b"hello alice")
    assert alice.driver is not None and bob.driver is not None
    alice.driver.flush()
    bob.driver.flush()
    scenario.net.run_for(1.0)
    assert bob.received == [b"hello bob"]
    assert alice.received == [b"hello alice"]
    # Both reach completed once end-of-candidates went both ways.
    scenario.net.run_for(2.0)
    assert alice.agent.state is IceTransportState.COMPLETED
    assert bob.agent.state is IceTransportState.COMPLETED


def test_eim_eif_nats_connect_directly_through_server_reflexive_candidates() -> None:
    scenario = build(nat(EI_M, EI_F), nat(EI_M, EI_F))
    scenario.start()
    assert scenario.net.run_until(scenario.connected, timeout=10.0)
    for me in (scenario.alice, scenario.bob):
        gathered = [e.candidate for e in me.events if isinstance(e, CandidateGathered)]
        assert {c.type for c in gathered} == {CandidateType.HOST, CandidateType.SERVER_REFLEXIVE}
        pair = me.agent.selected_pair()
        assert pair is not None
        # Data goes from the host socket (the base) straight to the peer's NAT mapping:
        # no relay anywhere.
        assert pair.local.type is CandidateType.HOST
        assert pair.remote.type in (CandidateType.SERVER_REFLEXIVE, CandidateType.PEER_REFLEXIVE)
        assert pair.remote.address.startswith("198.51.100.")


def test_symmetric_nat_is_reached_through_a_peer_reflexive_candidate() -> None:
    scenario = build(nat(APD_M, APD_F), nat(EI_M, EI_F))
    scenario.start()
    assert scenario.net.run_until(scenario.connected, timeout=10.0)
    bob = scenario.bob
    learnt = [e for e in bob.events if isinstance(e, PeerReflexiveCandidate) and not e.local]
    assert learnt, "Bob should learn Alice's new mapping from her checks"
    pair = bob.agent.selected_pair()
    assert pair is not None and pair.remote.type is CandidateType.PEER_REFLEXIVE


FAILING = [
    pytest.param(nat(APD_M, APD_F), nat(APD_M, APD_F), id="APDM-APDF/APDM-APDF"),
    pytest.param(nat(APD_M, APD_F), nat(EI_M, APD_F), id="APDM-APDF/EIM-APDF"),
]


@pytest.mark.parametrize(("alice_nat", "bob_nat"), FAILING)
def test_agents_fail_cleanly_without_a_relay(alice_nat: NatConfig, bob_nat: NatConfig) -> None:
    scenario = build(alice_nat, bob_nat)
    started = scenario.net.now
    scenario.start()
    assert scenario.net.run_until(scenario.failed, timeout=ICE_TIMEOUT)
    assert scenario.net.now - started <= ICE_TIMEOUT
    for me in (scenario.alice, scenario.bob):
        assert me.agent.selected_pair() is None
        assert not any(isinstance(e, SelectedPairChanged) for e in me.events)
        assert me.received == []
        states = me.states()
        assert states[0] is IceTransportState.CHECKING
        assert states[-1] is IceTransportState.FAILED
        assert IceTransportState.CONNECTED not in states
    # Failed agents are quiet: nothing is left to time out.
    scenario.net.run_for(60.0)
    assert scenario.alice.agent.state is IceTransportState.FAILED
    assert scenario.alice.agent.poll_timeout() is None


def test_consent_is_lost_when_the_path_breaks() -> None:
    scenario = build(nat(EI_M, EI_F), nat(EI_M, EI_F))
    scenario.start()
    assert scenario.net.run_until(scenario.connected, timeout=10.0)
    scenario.net.run_for(20.0)  # consent keeps the pair alive meanwhile
    assert scenario.alice.agent.state is IceTransportState.COMPLETED
    bob = scenario.bob
    assert bob.driver is not None
    bob.driver.close()  # Bob vanishes
    assert scenario.net.run_until(
        lambda: scenario.alice.agent.state is IceTransportState.FAILED, timeout=40.0
    )
    states = scenario.alice.states()
    assert states[-2:] == [IceTransportState.DISCONNECTED, IceTransportState.FAILED]
    assert scenario.alice.agent.selected_pair() is None


def test_runs_replay_exactly_from_the_seed() -> None:
    def trace(seed: int) -> list[tuple[float, str]]:
        scenario = build(nat(EI_M, APD_F), nat(APD_M, APD_F), seed=seed)
        scenario.start()
        scenario.net.run_for(8.0)
        out: list[tuple[float, str]] = []
        for me in (scenario.alice, scenario.bob):
            selected = me.agent.selected_pair()
            out.append(
                (scenario.net.now, f"{me.name} {me.agent.state} {selected and selected.remote}")
            )
        return out

    assert trace(3) == trace(3)


def test_loopback_candidates_are_refused_by_default() -> None:
    """A host-only setup on one machine needs the policy flag."""
    net = Network(seed=1)
    lan = net.add_lan("lo", "127.0.0.0/8")
    host = net.add_host("box", lan, ["127.0.0.1", "127.0.0.2"])
    events: dict[str, list[object]] = {"a": [], "b": []}
    for allow in (False, True):
        config = IceConfig(address_policy=AddressPolicy(allow_loopback=allow))
        a = IceAgent(config, controlling=True)
        b = IceAgent(config, controlling=False)
        sa, sb = host.bind_udp(0, "127.0.0.1"), host.bind_udp(0, "127.0.0.2")
        da = SimDriver(net.clock, a, [sa], on_event=events["a"].append)
        db = SimDriver(net.clock, b, [sb], on_event=events["b"].append)
        ca = a.add_host_candidate(sa.local)
        cb = b.add_host_candidate(sb.local)
        assert ca is not None and cb is not None
        a.set_remote_credentials(b.local_credentials.ufrag, b.local_credentials.pwd)
        b.set_remote_credentials(a.local_credentials.ufrag, a.local_credentials.pwd)
        assert a.add_remote_candidate(cb) is allow
        assert b.add_remote_candidate(ca) is allow
        da.flush()
        db.flush()
        net.run_for(3.0)
        connected = a.state in (IceTransportState.CONNECTED, IceTransportState.COMPLETED)
        assert connected is allow
        da.close()
        db.close()
