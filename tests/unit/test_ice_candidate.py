"""ICE candidates: RFC 8839 §5.1 syntax, RFC 8445 §5.1.2 priorities, §5.1.1.3 foundations,
§5.1.3 redundancy, and the remote address policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsunagu.errors import RemoteProtocolError
from tsunagu.ice.candidate import (
    Candidate,
    CandidateType,
    FoundationAllocator,
    TcpType,
    TransportProtocol,
    candidate_priority,
    is_redundant,
    local_preference,
)
from tsunagu.ice.errors import CandidateError
from tsunagu.ice.policy import AddressPolicy, address_problem

UDP = TransportProtocol.UDP
TCP = TransportProtocol.TCP

ROUND_TRIPS = [
    # Chromium host candidate with its usual extensions.
    "candidate:842163049 1 udp 1677729535 192.0.2.7 50322 typ host generation 0 "
    "ufrag EsAw network-id 1 network-cost 10",
    # mDNS-hidden host candidate.
    "candidate:1510613869 1 udp 2122260223 4b4e1a5c-6f2a-4c3c-9bd2-0a3e5a7ce1f2.local 54400 "
    "typ host generation 0 network-id 1",
    "candidate:2 1 udp 1694498815 198.51.100.7 61000 typ srflx raddr 192.168.1.10 rport 5000",
    "candidate:3 1 udp 16777215 203.0.113.9 49152 typ relay raddr 198.51.100.7 rport 61000",
    "candidate:4 2 udp 2130706430 2001:db8::1 6000 typ host",
    "candidate:5 1 tcp 1518280447 192.0.2.7 9 typ host tcptype active",
    "candidate:6 1 tcp 1518280447 192.0.2.7 443 typ host tcptype passive",
    "candidate:7 1 tcp 1518280447 192.0.2.7 5001 typ srflx raddr 10.0.0.1 rport 5001 tcptype so",
    "candidate:a+/Z 1 udp 1 192.0.2.1 1 typ prflx raddr 0.0.0.0 rport 0 x-vendor abc",
]


@pytest.mark.parametrize("line", ROUND_TRIPS)
def test_candidate_lines_round_trip(line: str) -> None:
    candidate = Candidate.from_sdp(line)
    assert candidate.to_sdp() == line
    assert Candidate.from_sdp("a=" + line + "\r\n") == candidate


def test_rfc_8839_example_parses() -> None:
    candidate = Candidate.from_sdp("a=candidate:1 1 UDP 2130706431 10.0.1.1 8998 typ host")
    assert candidate.transport is UDP
    assert candidate.priority == 2130706431
    assert candidate.transport_address == ("10.0.1.1", 8998)
    assert candidate.type is CandidateType.HOST
    assert candidate.related_address is None
    assert Candidate.from_sdp(candidate.to_sdp()) == candidate


def test_fields_are_typed() -> None:
    candidate = Candidate.from_sdp(ROUND_TRIPS[0])
    assert candidate.foundation == "842163049"
    assert candidate.component == 1
    assert candidate.generation == 0
    assert candidate.ufrag == "EsAw"
    assert candidate.network_id == 1
    assert candidate.network_cost == 10
    relayed = Candidate.from_sdp(ROUND_TRIPS[3])
    assert relayed.type is CandidateType.RELAYED
    assert (relayed.related_address, relayed.related_port) == ("198.51.100.7", 61000)
    tcp = Candidate.from_sdp(ROUND_TRIPS[5])
    assert tcp.transport is TCP and tcp.tcptype is TcpType.ACTIVE
    assert Candidate.from_sdp(ROUND_TRIPS[-1]).extensions == (("x-vendor", "abc"),)


def test_ipv6_is_canonicalised_and_mdns_names_are_kept() -> None:
    candidate = Candidate.from_sdp("candidate:1 1 udp 1 2001:DB8:0:0::1 5 typ host")
    assert candidate.address == "2001:db8::1"
    assert candidate.is_ipv6
    assert str(candidate) == "host udp [2001:db8::1]:5"
    hidden = Candidate.from_sdp("candidate:1 1 udp 1 Abc-1.LOCAL 5 typ host")
    assert hidden.address == "abc-1.local" and hidden.is_mdns


MALFORMED = [
    ("", "not a candidate attribute"),
    ("a=ice-ufrag:abcd", "not a candidate attribute"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ", "at least 8 fields"),
    ("candidate:1 1 udp 1 192.0.2.1 5  typ host", "single spaces"),
    ("candidate:fo-o 1 udp 1 192.0.2.1 5 typ host", "foundation"),
    ("candidate:" + "a" * 33 + " 1 udp 1 192.0.2.1 5 typ host", "foundation"),
    ("candidate:1 0 udp 1 192.0.2.1 5 typ host", "component-id 0"),
    ("candidate:1 257 udp 1 192.0.2.1 5 typ host", "component-id 257"),
    ("candidate:1 x udp 1 192.0.2.1 5 typ host", "component-id 'x'"),
    ("candidate:1 1 sctp 1 192.0.2.1 5 typ host", "unsupported transport"),
    ("candidate:1 1 udp 0 192.0.2.1 5 typ host", "priority 0"),
    ("candidate:1 1 udp 2147483648 192.0.2.1 5 typ host", "priority 2147483648"),
    ("candidate:1 1 udp 99999999999 192.0.2.1 5 typ host", "priority"),
    ("candidate:1 1 udp -1 192.0.2.1 5 typ host", "priority"),
    ("candidate:1 1 udp 1 192.0.2.300 5 typ host", "not a valid IP address"),
    ("candidate:1 1 udp 1 1.2.3 5 typ host", "not a valid IP address"),
    ("candidate:1 1 udp 1 [2001:db8::1] 5 typ host", "not a valid IP address"),
    ("candidate:1 1 udp 1 fe80::1%eth0 5 typ host", "not a valid IP address"),
    ("candidate:1 1 udp 1 example.com 5 typ host", "mDNS"),
    ("candidate:1 1 udp 1 -bad.local 5 typ host", "mDNS"),
    ("candidate:1 1 udp 1 192.0.2.1 65536 typ host", "port 65536"),
    ("candidate:1 1 udp 1 192.0.2.1 5 type host", "expected 'typ'"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ bogus", "unknown candidate type"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ srflx raddr 10.0.0.1", "followed by rport"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ srflx raddr 10.0.0.1 generation 0", "rport"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ srflx rport 5 raddr 10.0.0.1", "rport without"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host generation 0 raddr 10.0.0.1", "right after"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ srflx raddr nowhere rport 1", "raddr"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host generation", "no value"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host generation x", "generation 'x'"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host generation 0 generation 1", "repeated"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host ufrag a-b", "ufrag"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host b@d v", "not a token"),
    ("candidate:1 1 tcp 1 192.0.2.1 5 typ host", "tcptype"),
    ("candidate:1 1 tcp 1 192.0.2.1 5 typ host tcptype sideways", "unknown tcptype"),
    ("candidate:1 1 udp 1 192.0.2.1 5 typ host tcptype active", "tcptype on a UDP"),
]


@pytest.mark.parametrize(("line", "message"), MALFORMED)
def test_malformed_candidates_raise_a_clear_typed_error(line: str, message: str) -> None:
    with pytest.raises(CandidateError, match=message):
        Candidate.from_sdp(line)


def test_candidate_errors_are_remote_protocol_errors() -> None:
    assert issubclass(CandidateError, RemoteProtocolError)
    assert issubclass(CandidateError, ValueError)


@given(st.text(max_size=200))
def test_arbitrary_text_either_parses_or_raises_candidate_error(text: str) -> None:
    for line in (text, "candidate:" + text):
        try:
            candidate = Candidate.from_sdp(line)
        except CandidateError:
            continue
        assert Candidate.from_sdp(candidate.to_sdp()) == candidate


ice_chars = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    min_size=1,
    max_size=32,
)
addresses = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]{1,20}\.local", fullmatch=True),
)


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    transport = draw(st.sampled_from(TransportProtocol))
    kind = draw(st.sampled_from(CandidateType))
    related = draw(st.none() | st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)))
    return Candidate(
        foundation=draw(ice_chars),
        component=draw(st.integers(1, 256)),
        transport=transport,
        priority=draw(st.integers(1, 2**31 - 1)),
        address=draw(addresses),
        port=draw(st.integers(0, 65535)),
        type=kind,
        related_address=None if related is None else related[0],
        related_port=None if related is None else related[1],
        tcptype=draw(st.sampled_from(TcpType)) if transport is TCP else None,
        generation=draw(st.none() | st.integers(0, 2**32 - 1)),
        ufrag=draw(st.none() | ice_chars),
        network_id=draw(st.none() | st.integers(0, 2**32 - 1)),
        network_cost=draw(st.none() | st.integers(0, 2**32 - 1)),
    )


@given(candidates())
def test_every_candidate_round_trips_through_sdp(candidate: Candidate) -> None:
    assert Candidate.from_sdp(candidate.to_sdp()) == candidate


def test_constructor_validates_like_the_parser() -> None:
    good = Candidate.from_sdp(ROUND_TRIPS[2])
    with pytest.raises(CandidateError, match="raddr and rport"):
        Candidate("1", 1, UDP, 1, "192.0.2.1", 5, CandidateType.SERVER_REFLEXIVE, "10.0.0.1")
    with pytest.raises(CandidateError, match="tcptype"):
        Candidate("1", 1, TCP, 1, "192.0.2.1", 5, CandidateType.HOST)
    with pytest.raises(CandidateError, match="priority"):
        Candidate("1", 1, UDP, 0, "192.0.2.1", 5, CandidateType.HOST)
    assert good.transport_address == ("198.51.100.7", 61000)


# --- priorities (RFC 8445 §5.1.2) ------------------------------------------------------------


def test_priority_formula_and_type_preferences() -> None:
    # 2^24 * 126 + 2^8 * 65535 + (256 - 1): the RFC 8839 example's priority.
    assert candidate_priority(CandidateType.HOST, 65535, 1) == 2130706431
    assert candidate_priority(CandidateType.HOST, 65535, 2) == 2130706430
    assert candidate_priority(CandidateType.PEER_REFLEXIVE, 0, 1) == (110 << 24) + 255
    assert candidate_priority(CandidateType.SERVER_REFLEXIVE, 0, 1) == (100 << 24) + 255
    assert candidate_priority(CandidateType.RELAYED, 1, 1) == 256 + 255
    ordered = [
        candidate_priority(kind, 40000, 1)
        for kind in (
            CandidateType.HOST,
            CandidateType.PEER_REFLEXIVE,
            CandidateType.SERVER_REFLEXIVE,
            CandidateType.RELAYED,
        )
    ]
    assert ordered == sorted(ordered, reverse=True)
    with pytest.raises(ValueError):
        candidate_priority(CandidateType.HOST, 65536, 1)
    with pytest.raises(ValueError):
        candidate_priority(CandidateType.HOST, 1, 0)


def test_local_preference_interleaves_families_across_interfaces() -> None:
    # RFC 8421 §4: interface 0 IPv6, interface 0 IPv4, interface 1 IPv6, interface 1 IPv4.
    order = [
        local_preference("2001:db8::1", interface_rank=0),
        local_preference("192.0.2.1", interface_rank=0),
        local_preference("2001:db8:1::1", interface_rank=1),
        local_preference("198.51.100.1", interface_rank=1),
    ]
    assert order == sorted(order, reverse=True)
    assert len(set(order)) == 4
    assert order[0] == 65535
    assert local_preference("192.0.2.1", prefer_ipv6=False) == 65535
    assert local_preference("192.0.2.1", address_rank=1) < local_preference("192.0.2.1")
    assert 0 <= local_preference("192.0.2.1", interface_rank=10_000) <= 65535


def test_tcp_local_preference_follows_rfc_6544() -> None:
    active = local_preference("192.0.2.1", transport=TCP, tcptype=TcpType.ACTIVE)
    passive = local_preference("192.0.2.1", transport=TCP, tcptype=TcpType.PASSIVE)
    so = local_preference("192.0.2.1", transport=TCP, tcptype=TcpType.SIMULTANEOUS_OPEN)
    assert active >> 13 == 6 and passive >> 13 == 4 and so >> 13 == 2
    nat_so = local_preference(
        "192.0.2.1",
        transport=TCP,
        tcptype=TcpType.SIMULTANEOUS_OPEN,
        candidate_type=CandidateType.SERVER_REFLEXIVE,
    )
    assert nat_so >> 13 == 6
    with pytest.raises(ValueError):
        local_preference("192.0.2.1", transport=TCP)


# --- foundations and redundancy ----------------------------------------------------------------


def test_foundations_group_similar_candidates() -> None:
    allocate = FoundationAllocator().foundation
    host = allocate(CandidateType.HOST, "192.0.2.1")
    assert allocate(CandidateType.HOST, "192.0.2.1") == host
    assert allocate(CandidateType.HOST, "192.0.2.2") != host
    assert allocate(CandidateType.HOST, "192.0.2.1", TCP) != host
    srflx = allocate(CandidateType.SERVER_REFLEXIVE, "192.0.2.1", server_ip="203.0.113.1")
    assert srflx not in (host,)
    assert allocate(CandidateType.SERVER_REFLEXIVE, "192.0.2.1", server_ip="203.0.113.1") == srflx
    assert allocate(CandidateType.SERVER_REFLEXIVE, "192.0.2.1", server_ip="203.0.113.2") != srflx
    # Counters, not hashes of the address: nothing about the host address leaks.
    assert host == "1" and "192" not in srflx


def test_redundant_candidates_are_detected() -> None:
    host = Candidate("1", 1, UDP, 2130706431, "198.51.100.7", 5000, CandidateType.HOST)
    srflx_same = Candidate(
        "2", 1, UDP, 1694498815, "198.51.100.7", 5000, CandidateType.SERVER_REFLEXIVE
    )
    srflx_other = Candidate(
        "2", 1, UDP, 1694498815, "203.0.113.5", 7000, CandidateType.SERVER_REFLEXIVE
    )
    existing = [(host, host.transport_address)]
    assert is_redundant(srflx_same, host.transport_address, existing)
    assert not is_redundant(srflx_other, host.transport_address, existing)
    assert not is_redundant(srflx_same, ("10.0.0.1", 5000), existing)


# --- address policy ------------------------------------------------------------------------------

REFUSED = [
    ("0.0.0.0", 5000, "unspecified"),
    ("0.1.2.3", 5000, "unspecified"),
    ("255.255.255.255", 5000, "broadcast"),
    ("240.0.0.1", 5000, "reserved"),
    ("224.0.0.251", 5353, "multicast"),
    ("239.255.255.250", 1900, "multicast"),
    ("192.0.2.1", 0, "port 0"),
    ("127.0.0.1", 5000, "loopback"),
    ("169.254.1.1", 5000, "link-local"),
    ("::", 5000, "unspecified"),
    ("::1", 5000, "loopback"),
    ("ff02::fb", 5353, "multicast"),
    ("fe80::1", 5000, "link-local"),
    ("::ffff:255.255.255.255", 5000, "IPv4-embedded broadcast"),
    ("::ffff:0.0.0.0", 5000, "IPv4-embedded unspecified"),
    ("::ffff:224.0.0.1", 5000, "IPv4-embedded multicast"),
    ("::ffff:127.0.0.1", 5000, "IPv4-embedded loopback"),
    ("::224.0.0.1", 5000, "IPv4-embedded multicast"),
    ("64:ff9b::ffff:ffff", 5000, "IPv4-embedded broadcast"),
    ("2002:e000:0001::1", 5000, "IPv4-embedded multicast"),  # 6to4 of 224.0.0.1
    ("::ffff:0:ffff:ffff", 5000, "IPv4-embedded broadcast"),  # IPv4-translated
    ("not-an-ip", 5000, "not an IP address"),
]


@pytest.mark.parametrize(("ip", "port", "reason"), REFUSED)
def test_unusable_addresses_are_refused(ip: str, port: int, reason: str) -> None:
    problem = address_problem(ip, port, AddressPolicy())
    assert problem is not None and reason in problem


@pytest.mark.parametrize(
    "ip", ["192.0.2.1", "10.0.0.1", "198.51.100.7", "2001:db8::1", "::ffff:192.0.2.1"]
)
def test_ordinary_unicast_addresses_are_allowed(ip: str) -> None:
    assert address_problem(ip, 5000, AddressPolicy()) is None


def test_loopback_and_link_local_only_when_the_policy_allows() -> None:
    permissive = AddressPolicy(allow_loopback=True, allow_link_local=True)
    for ip in ("127.0.0.1", "::1", "169.254.1.1", "fe80::1"):
        assert address_problem(ip, 5000, permissive) is None
    # Unspecified, broadcast, multicast and port 0 stay refused whatever the policy.
    for ip, port in (("0.0.0.0", 1), ("255.255.255.255", 1), ("ff02::1", 1), ("1.2.3.4", 0)):
        assert address_problem(ip, port, permissive) is not None
