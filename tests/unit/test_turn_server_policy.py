"""The TURN server's peer policy: explicit CIDR tables, every IPv4 embedding reduced."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.turn.policy import (
    DEFAULT_DENIED_IPV4,
    PeerPolicy,
    embedded_ipv4,
    parse_network,
)

DEFAULT = PeerPolicy()

DENIED_V4 = [ipaddress.ip_network(cidr) for cidr, _ in DEFAULT_DENIED_IPV4]


def embeddings(v4: ipaddress.IPv4Address) -> list[str]:
    """Every IPv6 spelling of an IPv4 address the policy must see through."""
    n = int(v4)
    hi16, lo16 = n >> 16, n & 0xFFFF
    spellings = [
        f"::ffff:{v4}",  # IPv4-mapped
        f"::{v4}",  # IPv4-compatible
        f"::ffff:0:{v4}",  # IPv4-translated (SIIT)
        f"64:ff9b::{v4}",  # NAT64 well-known prefix
        f"64:ff9b:1::{v4}",  # local-use NAT64 with a /96 prefix
        f"2002:{hi16:x}:{lo16:x}::1",  # 6to4
        f"2001:0:{hi16:x}:{lo16:x}::1",  # Teredo server
        f"2001:0:4136:e378:8000:63bf:{(~hi16) & 0xFFFF:x}:{(~lo16) & 0xFFFF:x}",  # Teredo client
        f"2001:db8:1:2:0:5efe:{hi16:x}:{lo16:x}",  # ISATAP
        f"2001:db8:1:2:200:5efe:{hi16:x}:{lo16:x}",  # ISATAP, universal bit
    ]
    # local-use NAT64 (RFC 6052 §2.2) with /48, /56 and /64 prefixes
    b = n.to_bytes(4, "big")
    prefix48 = bytes.fromhex("0064ff9b0001")
    spellings.append(str(ipaddress.IPv6Address(prefix48 + b[:2] + b"\x00" + b[2:] + bytes(5))))
    spellings.append(
        str(ipaddress.IPv6Address(prefix48 + b"\x00" + b[:1] + b"\x00" + b[1:] + bytes(4)))
    )
    spellings.append(str(ipaddress.IPv6Address(prefix48 + b"\x00\x00" + b"\x00" + b + bytes(3))))
    return spellings


@pytest.mark.parametrize(
    "ip",
    [
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "100.100.100.200",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "169.254.1.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.168.0.1",
        "198.18.0.1",
        "224.0.0.251",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "fec0::1",
        "64:ff9b:1::1",
        "100::1",
        # The Python 3.11 traps named in the issue:
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::",
    ],
)
def test_denied_by_default(ip: str) -> None:
    assert not DEFAULT.permits_ip(ip)
    assert DEFAULT.denial_reason(ip) is not None


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",
        "100.128.0.0",
        "172.32.0.1",
        "198.51.100.7",
        "2001:4860:4860::8888",
        "2606:4700::1111",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "::ffff:8.8.8.8",
        "2002:808:808::1",
    ],
)
def test_public_addresses_are_allowed(ip: str) -> None:
    assert DEFAULT.permits_ip(ip)


def test_ipaddress_flags_would_have_been_wrong() -> None:
    # Why the policy does not use ipaddress's is_* properties (issue 3 §6, Python 3.11).
    assert ipaddress.ip_address("::127.0.0.1").is_loopback is False
    assert ipaddress.ip_address("::ffff:169.254.169.254").is_link_local is False
    assert not DEFAULT.permits_ip("::127.0.0.1")
    assert not DEFAULT.permits_ip("::ffff:169.254.169.254")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(DENIED_V4), st.integers(min_value=0, max_value=2**32 - 1))
def test_every_embedding_of_a_denied_ipv4_address_is_denied(
    network: ipaddress.IPv4Network, offset: int
) -> None:
    v4 = network[offset % network.num_addresses]
    assert not DEFAULT.permits_ip(str(v4))
    for spelling in embeddings(v4):
        assert not DEFAULT.permits_ip(spelling), spelling
        v6 = ipaddress.IPv6Address(spelling)
        if int(v6) > 1:  # "::" and "::1" are IPv6's own unspecified and loopback addresses
            assert v4 in embedded_ipv4(v6), spelling


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_allowing_an_ipv4_block_allows_its_mapped_spelling(n: int) -> None:
    v4 = ipaddress.IPv4Address(n)
    policy = PeerPolicy(allow=("0.0.0.0/0",))
    # a /0 allow loses to every more specific built-in denial
    assert policy.permits_ip(str(v4)) == DEFAULT.permits_ip(str(v4))
    open_all = PeerPolicy(builtin_denials=False)
    assert open_all.permits_ip(f"::ffff:{v4}")


def test_longest_prefix_wins_and_operator_beats_builtin_on_ties() -> None:
    policy = PeerPolicy(allow=("10.0.0.0/8",), deny=("10.9.0.0/16",))
    assert policy.permits_ip("10.1.2.3")
    assert not policy.permits_ip("10.9.2.3")
    assert policy.denial_reason("10.9.2.3") == "10.9.0.0/16 deny-peer"
    # opening CGNAT does not open the metadata /32 inside it
    cgnat = PeerPolicy(allow=("100.64.0.0/10",))
    assert cgnat.permits_ip("100.64.1.1")
    assert not cgnat.permits_ip("100.100.100.200")
    assert PeerPolicy(allow=("100.100.100.200/32",)).permits_ip("100.100.100.200")
    # between operator rules for one block, deny wins
    both = PeerPolicy(allow=("203.0.113.0/24",), deny=("203.0.113.0/24",))
    assert not both.permits_ip("203.0.113.9")
    # an allowed IPv4 block is allowed in its IPv6 spellings too
    loop = PeerPolicy(allow=("127.0.0.0/8",))
    assert loop.permits_ip("::ffff:127.0.0.1")
    assert not loop.permits_ip("::1")
    # ::1 is IPv6 loopback, not the IPv4-compatible spelling of 0.0.0.1
    assert PeerPolicy(allow=("::1/128",)).permits_ip("::1")


def test_the_servers_own_transport_addresses() -> None:
    policy = PeerPolicy(
        allow=("127.0.0.0/8",),
        own_addresses=[("127.0.0.1", 3478)],
        own_port_ranges=[("127.0.0.1", 49152, 65535)],
    )
    assert policy.permits(("127.0.0.1", 3480))
    assert not policy.permits(("127.0.0.1", 3478))
    assert not policy.permits(("::ffff:127.0.0.1", 3478))
    assert not policy.permits(("127.0.0.1", 50000))
    assert policy.permits(("127.0.0.2", 50000))
    assert not policy.permits(("not an ip", 1))


def test_bad_cidr_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError, match="not a CIDR"):
        PeerPolicy(allow=("nonsense",))
    assert not DEFAULT.permits_ip("nonsense")
