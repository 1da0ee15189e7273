"""RFC 5780 discovery (``tsunagu.nat.discovery``) against the real STUN server core
(``tsunagu.stun.server``), both unchanged, across every simulated RFC 4787 NAT.

The server sits on the public side with its two IPs and two ports (RFC 5780 §6); the
discovery client sits behind a NAT configured with each of the nine mapping x filtering
combinations, with and without hairpinning, and must report exactly that configuration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.nat.discovery import DiscoveryConfig, NatDiscovery, NatDiscoveryResult
from tsunagu.nat.events import DiscoveryCompleted, LifetimeProbed
from tsunagu.sim import Address, Nat, NatConfig, Network, SimDriver, SimStunServer, SimUdpSocket
from tsunagu.stun import Message, MessageClass, Method, XorMappedAddress
from tsunagu.stun.server_config import StunServerConfig

A1, A2 = "203.0.113.1", "203.0.113.2"
P1, P2 = 3478, 3479
PUBLIC = "198.51.100.1"
PUBLIC_2 = "198.51.100.2"
SHORT = {
    "endpoint-independent": "EI",
    "address-dependent": "AD",
    "address-and-port-dependent": "APD",
}
ALL_COMBINATIONS = [(m, f) for m in MappingBehavior for f in FilteringBehavior]


def combo_id(value: object) -> str:
    return SHORT.get(str(value), str(value))


MAPPING_COMBINATIONS = [
    pytest.param(m, f, id=f"{SHORT[m]}-{SHORT[f]}") for m, f in ALL_COMBINATIONS
]


@dataclass
class Setup:
    net: Network
    nat: Nat
    server: SimStunServer
    local: SimUdpSocket
    secondary: SimUdpSocket


def build(config: NatConfig, *, seed: int = 1, public_ips: tuple[str, ...] = (PUBLIC,)) -> Setup:
    net = Network(seed=seed)
    internet = net.add_lan("internet", latency=0.02, jitter=0.005)
    home = net.add_lan("home", "192.168.1.0/24", latency=0.001)
    server_host = net.add_host("stun", internet, [A1, A2])
    server = SimStunServer(
        server_host, StunServerConfig(listen=((A1, P1),), other=(A2, P2), software=None)
    )
    nat = net.add_nat(
        "nat",
        inside=home,
        inside_ip="192.168.1.1",
        outside=internet,
        public_ips=list(public_ips),
        config=config,
    )
    client = net.add_host("client", home, "192.168.1.10")
    return Setup(net, nat, server, client.bind_udp(0, "192.168.1.10"), client.bind_udp(0))


def discover(setup: Setup, config: DiscoveryConfig | None = None) -> NatDiscoveryResult:
    ids = random.Random(42)
    discovery = NatDiscovery(
        (A1, P1),
        setup.local.local,
        secondary=setup.secondary.local,
        config=config,
        transaction_id=lambda: ids.randbytes(12),
    )
    driver = SimDriver(setup.net.clock, discovery, [setup.local, setup.secondary])
    discovery.start(setup.net.now)
    driver.flush()
    assert setup.net.run_until(lambda: discovery.done, timeout=600.0)
    driver.close()
    completed = [e for e in driver.events if isinstance(e, DiscoveryCompleted)]
    assert len(completed) == 1
    result = discovery.result
    assert result is not None and completed[0].result == result
    return result


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
@pytest.mark.parametrize("hairpinning", [True, False], ids=["hairpin", "no-hairpin"])
def test_discovery_reports_the_configured_nat(
    mapping: MappingBehavior, filtering: FilteringBehavior, hairpinning: bool
) -> None:
    setup = build(NatConfig(mapping, filtering, hairpinning=hairpinning))
    started = setup.net.now
    result = discover(setup)
    assert result.error is None, result.error
    assert result.mapping is not None  # compared in test_discovery_reports_the_configured_mapping
    assert result.filtering is filtering
    assert result.hairpinning is hairpinning
    assert result.nat_present is True
    assert result.udp_blocked is False
    assert result.other_address == (A2, P2)
    # Test I's mapping is the NAT's mapping of the socket under test.
    assert result.mapped is not None and result.mapped[0] == PUBLIC
    internal = setup.local.local
    assert result.mapped in [m.external for m in setup.nat.mappings() if m.internal == internal]
    # Timeouts that are answers (filtering, hairpin) take a few virtual seconds at most.
    assert setup.net.now - started < 15.0


@pytest.mark.parametrize(("mapping", "filtering"), MAPPING_COMBINATIONS)
@pytest.mark.parametrize("port_preservation", [False, True], ids=["random-ports", "preserved"])
def test_discovery_reports_the_configured_mapping(
    mapping: MappingBehavior, filtering: FilteringBehavior, port_preservation: bool
) -> None:
    """One public IP. Port preservation only keeps the port of a socket's first mapping
    (REQ-3: no two mappings share an external address), so every later mapping still
    shows up with a port of its own."""
    setup = build(NatConfig(mapping, filtering, port_preservation=port_preservation))
    result = discover(setup)
    assert result.filtering is filtering
    if port_preservation:
        assert result.mapped == (PUBLIC, setup.local.local[1])
    assert result.mapping is mapping


@pytest.mark.parametrize(("mapping", "filtering"), MAPPING_COMBINATIONS)
def test_discovery_with_a_pool_of_public_ips(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    """Two public IPs, "arbitrary" pooling, port preservation: a new mapping keeps the
    port by moving to the other IP, so mapping test II sees a change of IP alone; only a
    third mapping (test III under address-and-port-dependent mapping) needs a new port."""
    setup = build(
        NatConfig(mapping, filtering, port_preservation=True, pooling="arbitrary"),
        public_ips=(PUBLIC, PUBLIC_2),
    )
    result = discover(setup)
    assert result.filtering is filtering
    port = setup.local.local[1]
    externals = [m.external for m in setup.nat.mappings() if m.internal == setup.local.local]
    preserved = [address for address in externals if address[1] == port]
    if mapping is MappingBehavior.ENDPOINT_INDEPENDENT:
        assert externals == [result.mapped]
    else:
        assert {ip for ip, _ in preserved} == {PUBLIC, PUBLIC_2}
    assert result.mapping is mapping


def test_discovery_through_a_blocking_network() -> None:
    setup = build(NatConfig())
    setup.nat.block_udp = True
    result = discover(setup)
    assert result.udp_blocked is True
    assert result.mapping is None and result.filtering is None


# -- mapping lifetime (RFC 4787 REQ-5, RFC 5780 §4.6) -------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_discovered_lifetime_brackets_the_configured_one(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    setup = build(NatConfig(mapping, filtering, mapping_lifetime=30.0))
    config = DiscoveryConfig(
        lifetime=True, lifetime_schedule=(5.0, 10.0, 20.0, 40.0, 80.0), lifetime_budget=400.0
    )
    result = discover(setup, config)
    assert result.filtering is filtering
    assert result.lifetime == 20.0  # survived 20 s idle
    assert result.lifetime_expired_after == 40.0  # did not survive 40 s (lifetime 30 s)


def binding(setup: Setup, sock: SimUdpSocket, ids: random.Random) -> Address:
    """One Binding request from ``sock`` to the server's primary address; the mapped
    address of the answer."""
    request = Message(Method.BINDING, MessageClass.REQUEST, ids.randbytes(12))
    sock.on_datagram = None
    sock.sendto(request.encode(fingerprint=True), (A1, P1))
    setup.net.run_for(1.0)
    (datagram,) = sock.received
    sock.received.clear()
    response = Message.decode(datagram.data)
    assert response.message_class is MessageClass.SUCCESS
    assert response.transaction_id == request.transaction_id
    xor = response.get(XorMappedAddress)
    assert xor is not None
    return xor.address


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_mapping_expires_when_idle_and_keepalives_prevent_it(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    setup = build(NatConfig(mapping, filtering, mapping_lifetime=120.0))
    result = discover(setup)
    ids = random.Random(7)
    # Keepalives (Binding requests, as ICE and TURN clients send them) every 25 s keep the
    # discovered mapping for ten minutes: five lifetimes.
    for _ in range(24):
        setup.net.run_for(24.0)
        assert binding(setup, setup.local, ids) == result.mapped
    # Silence longer than the lifetime: the mapping is gone and the next request gets a
    # new one (a fresh random port).
    setup.net.run_for(121.0)
    renewed = binding(setup, setup.local, ids)
    assert renewed != result.mapped and renewed[0] == PUBLIC


def test_lifetime_events_are_reported() -> None:
    setup = build(NatConfig(mapping_lifetime=12.0))
    config = DiscoveryConfig(lifetime=True, lifetime_schedule=(5.0, 10.0, 20.0))
    ids = random.Random(1)
    discovery = NatDiscovery(
        (A1, P1),
        setup.local.local,
        secondary=setup.secondary.local,
        config=config,
        transaction_id=lambda: ids.randbytes(12),
    )
    driver = SimDriver(setup.net.clock, discovery, [setup.local, setup.secondary])
    discovery.start(setup.net.now)
    driver.flush()
    assert setup.net.run_until(lambda: discovery.done, timeout=300.0)
    probes = [(e.idle, e.alive) for e in driver.events if isinstance(e, LifetimeProbed)]
    assert probes == [(5.0, True), (10.0, True), (20.0, False)]


def test_whole_matrix_is_deterministic() -> None:
    def run(seed: int) -> list[object]:
        out: list[object] = []
        for mapping, filtering in ALL_COMBINATIONS:
            setup = build(NatConfig(mapping, filtering), seed=seed)
            result = discover(setup)
            out.append((result.mapped, result.mapping, result.filtering, setup.net.now))
        return out

    assert run(11) == run(11)
