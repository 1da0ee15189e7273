"""RFC 4787 NAT behaviour of ``tsunagu.sim.Nat``, probed with raw datagrams.

Every test builds a small network -- an inside host behind a NAT, and outside endpoints on
two server IPs and two ports (the A1/A2 x P1/P2 of an RFC 5780 server) plus a stranger --
sends datagrams through it and checks which external addresses the NAT uses and which
inbound packets it lets in. Everything runs on virtual time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.sim import (
    Address,
    Host,
    Nat,
    NatConfig,
    Network,
    Proto,
    SimUdpSocket,
    TcpState,
)

EI_M = MappingBehavior.ENDPOINT_INDEPENDENT
AD_M = MappingBehavior.ADDRESS_DEPENDENT
APD_M = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
EI_F = FilteringBehavior.ENDPOINT_INDEPENDENT
AD_F = FilteringBehavior.ADDRESS_DEPENDENT
APD_F = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT

ALL_COMBINATIONS = [(m, f) for m in MappingBehavior for f in FilteringBehavior]
SHORT = {
    "endpoint-independent": "EI",
    "address-dependent": "AD",
    "address-and-port-dependent": "APD",
}


def combo_id(value: object) -> str:
    return SHORT.get(str(value), str(value))


A1, A2 = "203.0.113.1", "203.0.113.2"
P1, P2 = 3478, 3479
STRANGER = "203.0.113.50"
PUBLIC = "198.51.100.1"
ALICE = "192.168.1.10"
BOB = "192.168.1.11"
INTERNAL_PORT = 5000


@dataclass
class Lab:
    net: Network
    nat: Nat
    alice: Host
    bob: Host
    sock: SimUdpSocket
    outside: dict[Address, SimUdpSocket] = field(default_factory=dict)

    def send_out(self, dst: Address, sock: SimUdpSocket | None = None) -> Address:
        """Send from the inside to an outside endpoint; the source it arrived from."""
        (sock or self.sock).sendto(b"out", dst)
        self.net.run_for(1.0)
        received = self.outside[dst].received
        assert len(received) == 1, f"nothing reached {dst}"
        return received.popleft().remote

    def send_in(self, src: Address, dst: Address, sock: SimUdpSocket | None = None) -> bool:
        """Send from an outside endpoint to ``dst``; whether the inside socket got it."""
        target = sock or self.sock
        self.outside[src].sendto(b"in", dst)
        self.net.run_for(1.0)
        got = [d for d in target.received if d.remote == src]
        target.received.clear()
        return len(got) == 1


def build(
    config: NatConfig,
    *,
    public_ips: Sequence[str] = (PUBLIC,),
    seed: int = 1,
) -> Lab:
    net = Network(seed=seed)
    internet = net.add_lan("internet", latency=0.02)
    home = net.add_lan("home", "192.168.1.0/24", latency=0.001)
    server = net.add_host("server", internet, [A1, A2])
    stranger = net.add_host("stranger", internet, STRANGER)
    nat = net.add_nat(
        "nat",
        inside=home,
        inside_ip="192.168.1.1",
        outside=internet,
        public_ips=list(public_ips),
        config=config,
    )
    alice = net.add_host("alice", home, ALICE)
    bob = net.add_host("bob", home, BOB)
    lab = Lab(net, nat, alice, bob, alice.bind_udp(INTERNAL_PORT))
    for ip in (A1, A2):
        for port in (P1, P2):
            lab.outside[(ip, port)] = server.bind_udp(port, ip)
    lab.outside[(STRANGER, P1)] = stranger.bind_udp(P1)
    return lab


# -- mapping (RFC 4787 §4.1) ----------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_mapping_behaviour(mapping: MappingBehavior, filtering: FilteringBehavior) -> None:
    lab = build(NatConfig(mapping, filtering))
    seen = {dst: lab.send_out(dst) for dst in [(A1, P1), (A1, P2), (A2, P1), (A2, P2)]}
    assert all(ip == PUBLIC for ip, _ in seen.values())
    same_ip_other_port = seen[(A1, P1)] == seen[(A1, P2)]
    other_ip = seen[(A1, P1)] == seen[(A2, P1)]
    if mapping is EI_M:
        assert len(set(seen.values())) == 1  # one mapping for every destination
    elif mapping is AD_M:
        assert same_ip_other_port and seen[(A2, P1)] == seen[(A2, P2)] and not other_ip
        assert len(set(seen.values())) == 2  # one per destination IP
    else:
        assert len(set(seen.values())) == 4  # one per destination IP and port
    assert len(lab.nat.mappings()) == len(set(seen.values()))
    # Sending again reuses the mappings: nothing new is created.
    assert lab.send_out((A1, P1)) == seen[(A1, P1)]
    assert len(lab.nat.mappings()) == len(set(seen.values()))


def test_separate_internal_endpoints_get_separate_mappings() -> None:
    """REQ-3: no port overloading, two internal endpoints never share an external one."""
    lab = build(NatConfig(EI_M, EI_F))
    first = lab.send_out((A1, P1))
    second = lab.send_out((A1, P1), lab.alice.bind_udp(5001))
    third = lab.send_out((A1, P1), lab.bob.bind_udp(INTERNAL_PORT))
    assert len({first, second, third}) == 3


# -- filtering (RFC 4787 §5) ----------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_filtering_behaviour(mapping: MappingBehavior, filtering: FilteringBehavior) -> None:
    lab = build(NatConfig(mapping, filtering))
    external = lab.send_out((A1, P1))  # the only packet alice sends
    admitted = {src: lab.send_in(src, external) for src in lab.outside}
    expected = {
        EI_F: set(lab.outside),
        AD_F: {(A1, P1), (A1, P2)},
        APD_F: {(A1, P1)},
    }[filtering]
    assert {src for src, ok in admitted.items() if ok} == expected
    assert lab.net.drops["filtered"] == len(lab.outside) - len(expected)


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_no_mapping_no_entry(mapping: MappingBehavior, filtering: FilteringBehavior) -> None:
    lab = build(NatConfig(mapping, filtering))
    external = lab.send_out((A1, P1))
    other_port = external[1] + 1 if external[1] < 65535 else external[1] - 1
    assert not lab.send_in((A1, P1), (PUBLIC, other_port))
    assert lab.net.drops["no-mapping"] == 1


@pytest.mark.parametrize("mapping", list(MappingBehavior), ids=combo_id)
@pytest.mark.parametrize("filtering", [EI_F, AD_F], ids=combo_id)
def test_replies_leave_through_the_mapping_they_came_in_on(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    """Conntrack: an admitted packet's replies use its mapping, whatever the mapping
    behaviour would choose for a fresh packet to that destination."""
    lab = build(NatConfig(mapping, filtering))
    external = lab.send_out((A1, P1))
    newcomer = (A1, P2)  # admitted by endpoint-independent and address-dependent filters
    assert lab.send_in(newcomer, external)
    assert lab.send_out(newcomer) == external
    if filtering is EI_F:
        assert lab.send_in((STRANGER, P1), external)
        assert lab.send_out((STRANGER, P1)) == external


def test_existing_flow_is_not_taken_over_by_an_inbound_packet() -> None:
    """If alice already talks to X through a mapping of its own, a packet from X that
    arrives through another mapping does not move her replies."""
    lab = build(NatConfig(APD_M, EI_F))
    to_stranger = lab.send_out((STRANGER, P1))
    to_server = lab.send_out((A1, P1))
    assert to_stranger != to_server
    assert lab.send_in((STRANGER, P1), to_server)
    assert lab.send_out((STRANGER, P1)) == to_stranger


# -- mapping lifetime and refresh (RFC 4787 §4.3, REQ-5, REQ-6) -----------------------------


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_mapping_expires_after_idle_lifetime(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    lab = build(NatConfig(mapping, filtering))
    assert lab.nat.config.mapping_lifetime == 300.0  # REQ-5c default
    external = lab.send_out((A1, P1))  # sent at t=0, arrives at t=0.021
    lab.net.run(298.0)
    assert lab.send_in((A1, P1), external)  # at 298 s: alive (inbound does not refresh)
    lab.net.run(300.5)
    assert not lab.send_in((A1, P1), external)  # idle 300 s since the last outbound packet
    assert lab.nat.mappings() == []
    assert lab.net.drops["no-mapping"] == 1
    # A new outbound packet creates a new mapping (here on another random port).
    again = lab.send_out((A1, P1))
    assert again != external
    assert lab.send_in((A1, P1), again)


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_keepalives_refresh_the_mapping(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    lab = build(NatConfig(mapping, filtering, mapping_lifetime=120.0))
    external = lab.send_out((A1, P1))
    for _ in range(20):  # 20 keepalives 60 s apart: 1200 s, ten lifetimes
        lab.net.run_for(59.0)
        assert lab.send_out((A1, P1)) == external
    assert lab.send_in((A1, P1), external)
    assert len(lab.nat.mappings()) == 1


def test_keepalive_to_one_destination_keeps_an_endpoint_independent_mapping() -> None:
    """With EIM a keepalive to the STUN server also keeps the mapping other peers use."""
    lab = build(NatConfig(EI_M, AD_F, mapping_lifetime=120.0))
    external = lab.send_out((STRANGER, P1))
    for _ in range(5):
        lab.net.run_for(100.0)
        assert lab.send_out((A1, P1)) == external
    assert lab.send_in((STRANGER, P1), external)


def test_address_dependent_mappings_expire_separately() -> None:
    lab = build(NatConfig(AD_M, EI_F, mapping_lifetime=120.0))
    to_a1 = lab.send_out((A1, P1))
    to_a2 = lab.send_out((A2, P1))
    for _ in range(3):
        lab.net.run_for(60.0)
        lab.send_out((A1, P1))
    assert [m.external for m in lab.nat.mappings()] == [to_a1]
    assert not lab.send_in((A2, P1), to_a2)


@pytest.mark.parametrize("inbound_refresh", [False, True])
def test_inbound_refresh(inbound_refresh: bool) -> None:
    """REQ-6a: inbound packets refresh the mapping only when configured to."""
    lab = build(NatConfig(EI_M, EI_F, mapping_lifetime=120.0, inbound_refresh=inbound_refresh))
    external = lab.send_out((A1, P1))  # the only outbound packet, at t=0
    # Inbound packets at t=60, 120, 180, 240: past t=120 only inbound refresh keeps it.
    admitted = []
    for _ in range(4):
        lab.net.run_for(59.0)
        admitted.append(lab.send_in((A1, P1), external))
    assert admitted == [True, inbound_refresh, inbound_refresh, inbound_refresh]
    lab.net.run_for(59.0)
    assert lab.send_in((STRANGER, P1), external) is inbound_refresh


# -- hairpinning (RFC 4787 §6, REQ-9) -------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
@pytest.mark.parametrize("hairpinning", [True, False])
def test_hairpinning(
    mapping: MappingBehavior, filtering: FilteringBehavior, hairpinning: bool
) -> None:
    lab = build(NatConfig(mapping, filtering, hairpinning=hairpinning))
    bob = lab.bob.bind_udp(INTERNAL_PORT)
    bob_external = lab.send_out((A1, P1), bob)
    alice_external = lab.send_out((A1, P1))
    lab.sock.sendto(b"hairpin", bob_external)
    lab.net.run_for(1.0)
    if not hairpinning:
        assert not bob.received
        assert lab.net.drops["hairpinning-off"] == 1
        return
    (datagram,) = bob.received
    # REQ-9a: the source is alice's external address, not her internal one. Towards the
    # NAT's own address alice gets the mapping her behaviour gives for that destination.
    assert datagram.remote[0] == PUBLIC
    if mapping is EI_M:
        assert datagram.remote == alice_external
    else:
        assert datagram.remote != alice_external
    # Bob answers the address he saw; it hairpins back to alice, from bob's mapping.
    bob.sendto(b"reply", datagram.remote)
    lab.net.run_for(1.0)
    assert [d.remote for d in lab.sock.received] == [bob_external]


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_hairpin_to_own_mapping_from_a_second_socket(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    """RFC 5780 §4.5's probe: a second local socket writes to the first one's mapping."""
    lab = build(NatConfig(mapping, filtering))
    external = lab.send_out((A1, P1))
    lab.alice.bind_udp(5001).sendto(b"hairpin", external)
    lab.net.run_for(1.0)
    assert len(lab.sock.received) == 1


# -- port assignment (RFC 4787 §4.1, §4.2) --------------------------------------------------


@pytest.mark.parametrize("mapping", list(MappingBehavior), ids=combo_id)
def test_port_preservation_with_one_public_ip(mapping: MappingBehavior) -> None:
    lab = build(NatConfig(mapping, APD_F, port_preservation=True))
    first = lab.send_out((A1, P1))
    assert first == (PUBLIC, INTERNAL_PORT)
    second = lab.send_out((A2, P2))
    if mapping is EI_M:
        assert second == first
    else:
        # A second mapping cannot have the same external address (REQ-3): the port
        # preserved for the first one is taken, so this one gets a random port.
        assert second[0] == PUBLIC and second[1] != INTERNAL_PORT
    # Another host's port 5000 is taken on the only public IP too.
    bob = lab.send_out((A1, P1), lab.bob.bind_udp(INTERNAL_PORT))
    assert bob[1] != INTERNAL_PORT


def test_port_preservation_across_a_pool_of_public_ips() -> None:
    """With "arbitrary" pooling the NAT keeps the port by moving to another public IP,
    so an address-dependent mapping shows up as a change of IP, not of port."""
    pool = ["198.51.100.1", "198.51.100.2"]
    lab = build(NatConfig(AD_M, EI_F, port_preservation=True, pooling="arbitrary"), public_ips=pool)
    first = lab.send_out((A1, P1))
    second = lab.send_out((A2, P1))
    assert first[1] == second[1] == INTERNAL_PORT
    assert {first[0], second[0]} == set(pool)
    assert lab.send_out((A1, P2)) == first  # same destination IP, same mapping


def test_paired_pooling_uses_one_public_ip_per_internal_ip() -> None:
    """REQ-2: with "paired" pooling every mapping of one internal IP has the same IP."""
    pool = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
    lab = build(NatConfig(APD_M, EI_F, port_preservation=True), public_ips=pool)
    externals = [lab.send_out(dst) for dst in [(A1, P1), (A1, P2), (A2, P1), (A2, P2)]]
    assert len({ip for ip, _ in externals}) == 1
    assert len({port for _, port in externals}) == 4


def test_random_ports_without_preservation() -> None:
    lab = build(NatConfig(EI_M, EI_F))
    externals = [lab.send_out((A1, P1), lab.alice.bind_udp(6000 + i)) for i in range(8)]
    ports = [port for _, port in externals]
    assert all(1024 <= port <= 65535 for port in ports)
    assert len(set(ports)) == 8
    assert ports != [6000 + i for i in range(8)]


def test_well_known_ports_stay_well_known() -> None:
    """REQ-3a: an internal port below 1024 gets an external port below 1024."""
    lab = build(NatConfig(EI_M, EI_F))
    external = lab.send_out((A1, P1), lab.alice.bind_udp(123))
    assert 1 <= external[1] <= 1023


def test_port_parity() -> None:
    """REQ-4: with port parity on, external ports keep the internal port's parity."""
    lab = build(NatConfig(APD_M, EI_F, port_parity=True))
    for port in range(7000, 7006):
        external = lab.send_out((A1, P1), lab.alice.bind_udp(port))
        assert external[1] % 2 == port % 2


def test_port_allocation_is_deterministic() -> None:
    def run(seed: int) -> list[Address]:
        lab = build(NatConfig(APD_M, EI_F), seed=seed)
        return [lab.send_out(dst) for dst in [(A1, P1), (A1, P2), (A2, P1)]]

    assert run(3) == run(3)
    assert run(3) != run(4)


# -- CGNAT (NATs in a chain) ------------------------------------------------------------------


def test_cgnat_chain() -> None:
    """Two homes with the same private subnet behind their own NATs, behind one carrier
    NAT with a pool of public IPs."""
    net = Network(seed=5)
    internet = net.add_lan("internet", latency=0.02)
    carrier = net.add_lan("carrier", "100.64.0.0/10", latency=0.005)
    home1 = net.add_lan("home1", "192.168.1.0/24", latency=0.001)
    home2 = net.add_lan("home2", "192.168.1.0/24", latency=0.001)
    server = net.add_host("server", internet, A1)
    stranger = net.add_host("stranger", internet, STRANGER)
    cgnat = net.add_nat(
        "cgnat",
        inside=carrier,
        inside_ip="100.64.0.1",
        outside=internet,
        public_ips=["198.51.100.1", "198.51.100.2"],
        config=NatConfig(EI_M, EI_F, hairpinning=True),
    )
    nat1 = net.add_nat(
        "nat1",
        inside=home1,
        inside_ip="192.168.1.1",
        outside=carrier,
        public_ips="100.64.0.2",
        config=NatConfig(EI_M, APD_F),
    )
    nat2 = net.add_nat(
        "nat2",
        inside=home2,
        inside_ip="192.168.1.1",
        outside=carrier,
        public_ips="100.64.0.3",
        config=NatConfig(EI_M, EI_F),
    )
    alice = net.add_host("alice", home1, "192.168.1.10")
    carol = net.add_host("carol", home2, "192.168.1.10")  # the same private address
    stun = server.bind_udp(P1)
    a, c = alice.bind_udp(5000), carol.bind_udp(5000)

    a.sendto(b"a", (A1, P1))
    c.sendto(b"c", (A1, P1))
    net.run_for(1.0)
    seen = {d.data: d.remote for d in stun.received}
    assert seen[b"a"][0] in cgnat.public_ips and seen[b"c"][0] in cgnat.public_ips
    assert seen[b"a"] != seen[b"c"]
    # Each home NAT's mapping is the inside endpoint of a carrier NAT mapping.
    (m1,) = nat1.mappings()
    assert m1.external[0] == "100.64.0.2"
    assert [m.internal for m in cgnat.mappings() if m.external == seen[b"a"]] == [m1.external]
    (m2,) = nat2.mappings()
    assert m2.internal == ("192.168.1.10", 5000) and m2.external[0] == "100.64.0.3"

    # Replies find their way back through both NATs.
    stun.sendto(b"to-a", seen[b"a"])
    stun.sendto(b"to-c", seen[b"c"])
    net.run_for(1.0)
    assert [d.data for d in a.received] == [b"to-a"]
    assert [d.data for d in c.received] == [b"to-c"]
    assert a.received[0].remote == (A1, P1)

    # A stranger gets through the endpoint-independent carrier NAT; then carol's home
    # NAT (EIF) admits it and alice's (APDF) does not.
    outsider = stranger.bind_udp(P1)
    outsider.sendto(b"x", seen[b"a"])
    outsider.sendto(b"x", seen[b"c"])
    net.run_for(1.0)
    assert len(a.received) == 1 and len(c.received) == 2
    assert net.drops["filtered"] == 1

    # Carol reaches alice's public address by hairpinning in the carrier NAT, but alice's
    # own NAT filters her out until alice has written to carol's public address.
    c.sendto(b"hello", seen[b"a"])
    net.run_for(1.0)
    assert len(a.received) == 1
    a.sendto(b"punch", seen[b"c"])
    net.run_for(1.0)
    c.sendto(b"hello", seen[b"a"])
    net.run_for(1.0)
    assert a.received[-1].data == b"hello" and a.received[-1].remote == seen[b"c"]
    assert c.received[-1].data == b"punch" and c.received[-1].remote == seen[b"a"]


# -- UDP-blocking networks ----------------------------------------------------------------


def test_udp_blocked_network_still_carries_tcp() -> None:
    lab = build(NatConfig(EI_M, EI_F))
    lab.nat.block_udp = True
    lab.sock.sendto(b"stun?", (A1, P1))
    lab.net.run_for(1.0)
    assert not lab.outside[(A1, P1)].received
    assert lab.net.drops["udp-blocked"] == 1
    assert lab.nat.mappings() == []  # a blocked packet creates no mapping

    server = lab.outside[(A1, P1)].host
    listener = server.listen_tcp(P1, A1)
    connection = lab.alice.connect_tcp((A1, P1))
    lab.net.run_for(1.0)
    (accepted,) = listener.accepted
    connection.send(b"binding request over tcp")
    accepted.send(b"binding response")
    lab.net.run_for(1.0)
    assert bytes(accepted.received) == b"binding request over tcp"
    assert bytes(connection.received) == b"binding response"
    assert accepted.remote[0] == PUBLIC
    assert [m.proto for m in lab.nat.mappings()] == [Proto.TCP]


def test_udp_blocked_router_without_nat() -> None:
    net = Network(seed=2)
    internet = net.add_lan("internet", latency=0.01)
    office = net.add_lan("office", "203.0.113.64/26", latency=0.001)
    server = net.add_host("server", internet, A1)
    net.add_router(
        "firewall", [(internet, "198.51.100.9"), (office, "203.0.113.65")], block_udp=True
    )
    host = net.add_host("host", office, "203.0.113.70")
    assert host.route(A1) is not None
    udp = server.bind_udp(P1)
    host.bind_udp(5000).sendto(b"x", (A1, P1))
    listener = server.listen_tcp(P1)
    connection = host.connect_tcp((A1, P1))
    net.run_for(2.0)
    assert not udp.received
    assert net.drops["udp-blocked"] == 1
    assert len(listener.accepted) == 1
    assert listener.accepted[0].remote == connection.local  # routed, not translated


# -- TCP through NATs (RFC 5382) --------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "filtering"), ALL_COMBINATIONS, ids=combo_id)
def test_tcp_mapping_and_unsolicited_syn(
    mapping: MappingBehavior, filtering: FilteringBehavior
) -> None:
    lab = build(NatConfig(mapping, filtering))
    server = lab.outside[(A1, P1)].host
    listener = server.listen_tcp(P1, A1)
    connection = lab.alice.connect_tcp((A1, P1), local_port=INTERNAL_PORT)
    lab.net.run_for(1.0)
    (accepted,) = listener.accepted
    external = accepted.remote
    assert external[0] == PUBLIC
    (tcp_mapping,) = lab.nat.mappings(Proto.TCP)
    assert tcp_mapping.internal == connection.local
    # An unsolicited SYN to a port without a mapping is dropped silently (RFC 5382 REQ-4:
    # no RST), so the connect times out instead of being refused.
    stranger = lab.outside[(STRANGER, P1)].host
    probe = stranger.connect_tcp((PUBLIC, 40000))
    errors: list[object] = []
    probe.on_closed = errors.append
    lab.net.run_for(200.0)
    assert errors == ["timeout"]


def test_tcp_mapping_lifetimes() -> None:
    """RFC 5382 REQ-5: transitory mappings live 4 minutes, established ones 2 h 4 min."""
    lab = build(NatConfig(EI_M, EI_F))
    server = lab.outside[(A1, P1)].host
    server.listen_tcp(P1, A1)
    connection = lab.alice.connect_tcp((A1, P1))
    lab.net.run_for(1.0)
    (mapping,) = lab.nat.mappings(Proto.TCP)
    assert lab.nat.lifetime(mapping) == 7440.0  # the SYN-ACK came back: established
    lab.net.run_for(7000.0)
    assert lab.nat.mappings(Proto.TCP) == [mapping]
    lab.net.run_for(500.0)
    assert lab.nat.mappings(Proto.TCP) == []

    # A SYN that is never answered (nobody has that address) leaves a transitory mapping.
    unanswered = lab.alice.connect_tcp(("203.0.113.99", 9))
    lab.net.run_for(0.5)
    (pending,) = lab.nat.mappings(Proto.TCP)
    assert lab.nat.lifetime(pending) == 240.0
    assert unanswered.state is TcpState.SYN_SENT
    assert connection.is_open  # the first connection never noticed its mapping went


# -- IPv6 ----------------------------------------------------------------------------------


def test_nat66_and_routed_ipv6() -> None:
    net = Network(seed=9)
    internet = net.add_lan("internet", latency=0.01)
    home = net.add_lan("home", ["192.168.1.0/24", "fd00:1::/64"], latency=0.001)
    server = net.add_host("server", internet, ["203.0.113.1", "2001:db8::1"])
    nat = net.add_nat(
        "nat",
        inside=home,
        inside_ip=["192.168.1.1", "fd00:1::1"],
        outside=internet,
        public_ips=["198.51.100.1", "2001:db8:ffff::1"],
        config=NatConfig(APD_M, APD_F),
    )
    alice = net.add_host("alice", home, ["192.168.1.10", "fd00:1::10"])
    v4 = server.bind_udp(P1, "0.0.0.0")
    v6 = server.bind_udp(P1, "::")
    alice.bind_udp(5000, "0.0.0.0").sendto(b"4", ("203.0.113.1", P1))
    alice6 = alice.bind_udp(5000, "::")
    alice6.sendto(b"6", ("2001:0db8:0::1", P1))  # any spelling of the address works
    net.run_for(1.0)
    assert v4.received[0].remote[0] == "198.51.100.1"
    remote6 = v6.received[0].remote
    assert remote6[0] == "2001:db8:ffff::1"
    assert {m.external[0] for m in nat.mappings()} == {"198.51.100.1", "2001:db8:ffff::1"}
    v6.sendto(b"back", remote6)
    net.run_for(1.0)
    assert [(d.data, d.remote) for d in alice6.received] == [(b"back", ("2001:db8::1", P1))]


# -- links: latency, jitter, loss, MTU; determinism ------------------------------------------


def test_latency_adds_up_along_the_path() -> None:
    lab = build(NatConfig())
    lab.sock.sendto(b"x", (A1, P1))
    lab.net.run_for(1.0)
    (datagram,) = lab.outside[(A1, P1)].received
    assert datagram.time == pytest.approx(0.001 + 0.02)  # home LAN, then the internet


def test_mtu_drops_oversize_packets() -> None:
    net = Network(seed=1)
    internet = net.add_lan("internet", latency=0.01, mtu=1280)
    home = net.add_lan("home", ["192.168.1.0/24", "fd00:1::/64"], latency=0.001, mtu=1500)
    server = net.add_host("server", internet, [A1, "2001:db8::1"])
    net.add_nat(
        "nat",
        inside=home,
        inside_ip=["192.168.1.1", "fd00:1::1"],
        outside=internet,
        public_ips=[PUBLIC, "2001:db8:ffff::1"],
    )
    alice = net.add_host("alice", home, [ALICE, "fd00:1::10"])
    v4, v6 = server.bind_udp(P1, "0.0.0.0"), server.bind_udp(P1, "::")
    s4, s6 = alice.bind_udp(5000, "0.0.0.0"), alice.bind_udp(5000, "::")
    # 1280 bytes at the IP layer: IPv4 + UDP headers are 28 bytes, IPv6 + UDP 48.
    for size in (1252, 1253, 1400, 1473):
        s4.sendto(bytes(size), (A1, P1))
    for size in (1232, 1233):
        s6.sendto(bytes(size), ("2001:db8::1", P1))
    net.run_for(1.0)
    assert [len(d.data) for d in v4.received] == [1252]
    assert [len(d.data) for d in v6.received] == [1232]
    # 1473 bytes overflow the home LAN's 1500 already; the others die on the internet.
    assert net.drops["mtu"] == 4


def test_loss_and_jitter() -> None:
    net = Network(seed=21)
    internet = net.add_lan("internet", latency=0.05, jitter=0.02, loss=0.25)
    a = net.add_host("a", internet, "203.0.113.10")
    b = net.add_host("b", internet, "203.0.113.20")
    receiver = b.bind_udp(P1)
    sender = a.bind_udp(5000)
    for i in range(2000):
        sender.sendto(i.to_bytes(2, "big"), ("203.0.113.20", P1))
    net.run_for(1.0)
    got = [int.from_bytes(d.data, "big") for d in receiver.received]
    assert 1400 < len(got) < 1600  # about 75% arrive
    assert net.drops["loss"] == 2000 - len(got)
    assert all(0.05 <= d.time <= 0.07 for d in receiver.received)
    assert got != sorted(got)  # jitter reorders datagrams sent back to back


def scenario_trace(seed: int) -> list[str]:
    """A lossy, jittery run through an APDM/APDF NAT: every packet event, as text."""
    net = Network(seed=seed, trace=True)
    internet = net.add_lan("internet", latency=0.03, jitter=0.01, loss=0.1)
    home = net.add_lan("home", "192.168.1.0/24", latency=0.001, jitter=0.001, loss=0.05)
    server = net.add_host("server", internet, A1)
    net.add_nat(
        "nat",
        inside=home,
        inside_ip="192.168.1.1",
        outside=internet,
        public_ips=PUBLIC,
        config=NatConfig(APD_M, APD_F),
    )
    alice = net.add_host("alice", home, ALICE)
    echo = server.bind_udp(P1)
    echo.on_datagram = lambda d: echo.sendto(d.data, d.remote)
    sockets = [alice.bind_udp() for _ in range(5)]
    for i in range(50):
        sockets[i % 5].sendto(b"ping %d" % i, (A1, P1))
        net.run_for(0.013)
    listener = server.listen_tcp(443)
    listener.on_connection = lambda c: setattr(c, "on_data", c.send)
    connection = alice.connect_tcp((A1, 443))
    connection.on_connected = lambda: connection.send(bytes(range(256)) * 40)
    net.run_for(30.0)
    assert bytes(connection.received) == bytes(range(256)) * 40  # TCP repairs the losses
    assert net.trace is not None
    return [str(entry) for entry in net.trace]


def test_same_seed_same_trace() -> None:
    first = scenario_trace(1234)
    assert len(first) > 500
    assert scenario_trace(1234) == first
    assert scenario_trace(1235) != first
