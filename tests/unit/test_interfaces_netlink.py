"""The rtnetlink parser and the host-address selection of :mod:`tsunagu.aio.interfaces`, on
hand-built messages and address lists: no socket, no kernel.

Malformed and truncated input must never raise: the parser keeps what it could read and
drops the rest (the dump then falls back or lists fewer addresses).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsunagu.aio import interfaces
from tsunagu.aio.interfaces import (
    IFA_ADDRESS,
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    IFA_FLAGS,
    IFA_LOCAL,
    IFF_LOOPBACK,
    IFF_RUNNING,
    IFF_UP,
    IFLA_IFNAME,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_GETADDR,
    RTM_NEWADDR,
    RTM_NEWLINK,
    AddressInfo,
    HostAddress,
    LinkInfo,
    host_addresses_of,
    parse_address,
    parse_attributes,
    parse_host_address,
    parse_link,
    parse_netlink,
    rank_host_addresses,
    select_host_addresses,
)
from tsunagu.ice.candidate import local_preference

UP_RUNNING = IFF_UP | IFF_RUNNING


# --- builders of the kernel's structures ------------------------------------------------------


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def rtattr(kind: int, value: bytes) -> bytes:
    return pad(struct.pack("=HH", 4 + len(value), kind) + value)


def nlmsg(kind: int, payload: bytes, *, flags: int = NLM_F_MULTI, seq: int = 7) -> bytes:
    return pad(struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload)


def link_payload(index: int, name: str | bytes, flags: int = UP_RUNNING) -> bytes:
    raw = name.encode() + b"\0" if isinstance(name, str) else name
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, flags, 0) + rtattr(IFLA_IFNAME, raw)


def address_payload(
    ip: str,
    index: int,
    prefix: int,
    *,
    flags: int = 0,
    extended: int | None = None,
    local: str | None = None,
) -> bytes:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    body = struct.pack("=BBBBI", family, prefix, flags & 0xFF, 0, index)
    body += rtattr(IFA_ADDRESS, socket.inet_pton(family, ip))
    if local is not None:
        body += rtattr(IFA_LOCAL, socket.inet_pton(family, local))
    if extended is not None:
        body += rtattr(IFA_FLAGS, struct.pack("=I", extended))
    return body


def host(
    interface: str,
    index: int,
    ip: str,
    prefix: int = 64,
    *,
    loopback: bool = False,
    temporary: bool = False,
) -> HostAddress:
    link_local = ip.startswith(("fe80:", "169.254."))
    return HostAddress(interface, index, ip, prefix, link_local, loopback, temporary)


DUMP = (
    nlmsg(RTM_NEWLINK, link_payload(1, "lo", UP_RUNNING | IFF_LOOPBACK))
    + nlmsg(RTM_NEWLINK, link_payload(2, "eth0"))
    + nlmsg(RTM_NEWADDR, address_payload("127.0.0.1", 1, 8))
    + nlmsg(RTM_NEWADDR, address_payload("2001:db8::5", 2, 64, extended=IFA_F_TEMPORARY))
    + nlmsg(NLMSG_DONE, struct.pack("=i", 0))
)


# --- parse_netlink and parse_attributes -----------------------------------------------------------


def test_messages_are_split_on_aligned_lengths() -> None:
    messages = parse_netlink(DUMP)
    assert [m.type for m in messages] == [RTM_NEWLINK] * 2 + [RTM_NEWADDR] * 2 + [NLMSG_DONE]
    assert all(m.seq == 7 and m.flags == NLM_F_MULTI for m in messages)
    assert parse_link(messages[1].payload) == LinkInfo(2, "eth0", UP_RUNNING)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x10\x00",  # shorter than a header
        struct.pack("=IHHII", 15, RTM_NEWLINK, 0, 1, 0),  # length below the header's
        struct.pack("=IHHII", 0, RTM_NEWLINK, 0, 1, 0),  # zero length: no endless loop
        struct.pack("=IHHII", 64, RTM_NEWLINK, 0, 1, 0) + b"x" * 10,  # longer than the data
        struct.pack("=IHHII", 0xFFFFFFFF, RTM_NEWLINK, 0, 1, 0),
    ],
)
def test_malformed_headers_yield_nothing(data: bytes) -> None:
    assert parse_netlink(data) == []


def test_a_truncated_message_ends_the_datagram_but_keeps_what_came_before() -> None:
    first = nlmsg(RTM_NEWLINK, link_payload(2, "eth0"))
    second = nlmsg(RTM_NEWLINK, link_payload(3, "eth1"))
    messages = parse_netlink(first + second[:-3])
    assert [parse_link(m.payload) for m in messages] == [LinkInfo(2, "eth0", UP_RUNNING)]


def test_every_truncation_of_a_dump_parses_without_raising() -> None:
    for end in range(len(DUMP) + 1):
        for message in parse_netlink(DUMP[:end]):
            parse_link(message.payload)
            parse_address(message.payload)


def test_attributes_stop_at_a_malformed_one() -> None:
    good = rtattr(IFLA_IFNAME, b"eth0\0")
    assert parse_attributes(good + struct.pack("=HH", 2, 9)) == {IFLA_IFNAME: b"eth0\0"}
    assert parse_attributes(good + struct.pack("=HH", 40, 9) + b"ab") == {IFLA_IFNAME: b"eth0\0"}
    assert parse_attributes(b"\x00") == {}
    # The first of a repeated type wins; the nested / byte-order bits are masked off.
    assert parse_attributes(rtattr(3, b"a") + rtattr(3, b"b")) == {3: b"a"}
    assert parse_attributes(rtattr(0x8000 | 3, b"n")) == {3: b"n"}


# --- links and addresses -------------------------------------------------------------------


def test_link_flags_and_name() -> None:
    lo = parse_link(link_payload(1, "lo", UP_RUNNING | IFF_LOOPBACK))
    assert lo is not None and lo.usable and lo.loopback
    down = parse_link(link_payload(3, "eth1", IFF_UP))  # up, but no carrier
    assert down is not None and not down.usable and not down.loopback
    unterminated = parse_link(link_payload(4, b"wlan0"))
    assert unterminated == LinkInfo(4, "wlan0", UP_RUNNING)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        struct.pack("=BxHiII", 0, 1, 2, UP_RUNNING, 0)[:15],  # short ifinfomsg
        struct.pack("=BxHiII", 0, 1, 2, UP_RUNNING, 0),  # no name
        link_payload(2, b"\0"),  # empty name
        link_payload(0, "eth0"),  # no index
        link_payload(-5, "eth0"),
    ],
)
def test_unusable_link_messages_are_none(payload: bytes) -> None:
    assert parse_link(payload) is None


def test_ipv4_address_uses_ifa_local_over_the_point_to_point_peer() -> None:
    payload = address_payload("10.9.9.9", 5, 32, local="10.0.0.1")
    assert parse_address(payload) == AddressInfo(socket.AF_INET, 5, "10.0.0.1", 32, 0, 0)


def test_ipv6_address_with_extended_flags() -> None:
    payload = address_payload("2001:DB8::1", 2, 64, flags=0, extended=IFA_F_TEMPORARY | 0x800)
    parsed = parse_address(payload)
    assert parsed is not None
    assert (parsed.ip, parsed.prefix_length, parsed.index) == ("2001:db8::1", 64, 2)
    assert parsed.temporary and parsed.usable
    # Without IFA_FLAGS the 8 bits of ifa_flags count.
    tentative = parse_address(address_payload("2001:db8::2", 2, 64, flags=IFA_F_TENTATIVE))
    assert tentative is not None and not tentative.usable
    # IFA_F_SECONDARY (IPv4) shares the temporary bit: not a privacy address.
    secondary = parse_address(address_payload("10.0.0.2", 2, 24, flags=IFA_F_TEMPORARY))
    assert secondary is not None and not secondary.temporary


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 2),  # no address attribute
        struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 2) + rtattr(IFA_ADDRESS, b"\1\2\3"),
        struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2) + rtattr(IFA_ADDRESS, b"\1" * 4),
        struct.pack("=BBBBI", socket.AF_INET, 33, 0, 0, 2) + rtattr(IFA_ADDRESS, b"\1" * 4),
        struct.pack("=BBBBI", 17, 0, 0, 0, 2) + rtattr(IFA_ADDRESS, b"\1" * 6),  # AF_PACKET
    ],
)
def test_malformed_address_messages_are_none(payload: bytes) -> None:
    assert parse_address(payload) is None


def test_host_addresses_keep_usable_addresses_of_usable_links() -> None:
    links = [
        LinkInfo(1, "lo", UP_RUNNING | IFF_LOOPBACK),
        LinkInfo(2, "eth0", UP_RUNNING),
        LinkInfo(3, "eth1", IFF_UP),  # no carrier
    ]
    v6 = socket.AF_INET6
    addresses = [
        AddressInfo(socket.AF_INET, 1, "127.0.0.1", 8, 0, 254),
        AddressInfo(socket.AF_INET, 2, "192.0.2.7", 24, 0, 0),
        AddressInfo(v6, 2, "2001:db8::1", 64, IFA_F_TEMPORARY, 0),
        AddressInfo(v6, 2, "2001:db8::2", 64, IFA_F_TENTATIVE, 0),
        AddressInfo(v6, 2, "2001:db8::3", 64, IFA_F_DEPRECATED, 0),
        AddressInfo(v6, 2, "2001:db8::4", 64, IFA_F_DADFAILED, 0),
        AddressInfo(v6, 2, "fe80::1", 64, 0, 253),
        AddressInfo(socket.AF_INET, 3, "198.51.100.1", 24, 0, 0),
        AddressInfo(socket.AF_INET, 9, "203.0.113.1", 24, 0, 0),  # unknown link
    ]
    assert host_addresses_of(links, addresses) == [
        HostAddress("lo", 1, "127.0.0.1", 8, False, True, False),
        HostAddress("eth0", 2, "192.0.2.7", 24, False, False, False),
        HostAddress("eth0", 2, "2001:db8::1", 64, False, False, True),
        HostAddress("eth0", 2, "fe80::1", 64, True, False, False),
    ]


@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for message in parse_netlink(data):
        parse_link(message.payload)
        parse_address(message.payload)
    parse_link(data)
    parse_address(data)
    parse_attributes(data)


@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 255))
def test_arbitrary_attributes_in_valid_headers_never_raise(values: list[bytes], kind: int) -> None:
    attrs = b"".join(rtattr(i % 10, value) for i, value in enumerate(values))
    for family in (socket.AF_INET, socket.AF_INET6, kind):
        parse_address(struct.pack("=BBBBI", family, kind, kind, 0, 2) + attrs)
    parse_link(struct.pack("=BxHiII", 0, 1, 2, UP_RUNNING, 0) + attrs)


# --- the bounded dump loop, on a fake socket -------------------------------------------------


class FakeNetlink:
    """What ``_dump`` uses of a netlink socket: datagrams to hand out, then silence."""

    def __init__(self, datagrams: list[bytes], *, sender: int = 0, flags: int = 0) -> None:
        self.datagrams = datagrams
        self.sender = sender
        self.flags = flags
        self.sent: list[bytes] = []
        self.reads = 0

    def sendto(self, data: bytes, address: tuple[int, int]) -> int:
        self.sent.append(data)
        return len(data)

    def settimeout(self, timeout: float) -> None:
        assert timeout > 0

    def recvmsg(self, size: int) -> tuple[bytes, list[Any], int, tuple[int, int]]:
        self.reads += 1
        if not self.datagrams:
            raise TimeoutError("timed out")
        return self.datagrams.pop(0), [], self.flags, (self.sender, 0)


def dump(fake: FakeNetlink, seq: int = 7) -> list[interfaces.NetlinkMessage]:
    return interfaces._dump(cast(socket.socket, fake), RTM_GETADDR, b"\0" * 8, seq)


def test_dump_reads_to_done_and_skips_other_sequences() -> None:
    ours = nlmsg(RTM_NEWADDR, address_payload("192.0.2.1", 2, 24))
    stale = nlmsg(RTM_NEWADDR, address_payload("192.0.2.9", 2, 24), seq=6)
    fake = FakeNetlink([stale + ours, nlmsg(NLMSG_DONE, b"\0" * 4)])
    found = dump(fake)
    assert [parse_address(m.payload) for m in found] == [
        AddressInfo(socket.AF_INET, 2, "192.0.2.1", 24, 0, 0)
    ]
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", fake.sent[0])
    assert (length, kind, seq) == (24, RTM_GETADDR, 7) and flags & 0x300 == 0x300


def test_dump_error_is_an_os_error() -> None:
    error = nlmsg(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16)
    with pytest.raises(OSError) as caught:
        dump(FakeNetlink([error]))
    assert caught.value.errno == errno.EPERM


def test_interrupted_dump_is_reported_for_a_retry() -> None:
    fake = FakeNetlink([nlmsg(NLMSG_DONE, b"\0" * 4, flags=NLM_F_MULTI | NLM_F_DUMP_INTR)])
    with pytest.raises(interfaces._InterruptedError):
        dump(fake)


def test_dump_ignores_datagrams_not_from_the_kernel() -> None:
    fake = FakeNetlink([nlmsg(NLMSG_DONE, b"\0" * 4)], sender=4242)
    with pytest.raises(TimeoutError):
        dump(fake)


def test_truncated_datagram_fails_the_dump() -> None:
    with pytest.raises(OSError, match="truncated"):
        dump(FakeNetlink([nlmsg(NLMSG_DONE, b"\0" * 4)], flags=socket.MSG_TRUNC))


def test_a_dump_that_never_ends_is_bounded() -> None:
    endless = nlmsg(RTM_NEWLINK, link_payload(2, "eth0"))
    fake = FakeNetlink([endless] * (interfaces._MAX_DATAGRAMS + 10))
    with pytest.raises(OSError, match="did not end"):
        dump(fake)
    assert fake.reads == interfaces._MAX_DATAGRAMS


def test_a_dump_too_long_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interfaces, "_MAX_ENTRIES", 3)
    many = nlmsg(RTM_NEWLINK, link_payload(2, "eth0")) * 5
    with pytest.raises(OSError, match="too long"):
        dump(FakeNetlink([many]))


def test_netlink_failure_falls_back_to_the_default_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused() -> None:
        raise PermissionError(errno.EPERM, "netlink refused")

    monkeypatch.setattr(interfaces, "netlink_dump", refused)
    monkeypatch.setattr(interfaces, "default_route_addresses", lambda **_: ["192.0.2.10"])
    found = interfaces.interface_addresses()
    assert [(a.ip, a.loopback) for a in found] == [
        ("192.0.2.10", False),
        ("127.0.0.1", True),
        ("::1", True),
    ]


# --- selection and order -----------------------------------------------------------------------

LO = [host("lo", 1, "127.0.0.1", 8, loopback=True), host("lo", 1, "::1", 128, loopback=True)]
ETH0 = [
    host("eth0", 2, "10.0.0.2", 24),
    host("eth0", 2, "2001:db8:0:1::2"),
    host("eth0", 2, "fe80::2"),
]
ETH1 = [
    host("eth1", 3, "10.1.0.2", 24),
    host("eth1", 3, "2001:db8:0:2::2"),
    host("eth1", 3, "fe80::3"),
]
ALL = [*LO, *ETH0, *ETH1]


def ips(selected: list[HostAddress]) -> list[str]:
    return [a.ip for a in selected]


def test_default_selection_leaves_out_loopback_and_link_local() -> None:
    selected = select_host_addresses(ALL, default_route=[])
    # No default route: interfaces by index, IPv6 before IPv4 within each.
    assert ips(selected) == ["2001:db8:0:1::2", "10.0.0.2", "2001:db8:0:2::2", "10.1.0.2"]


def test_default_route_interface_comes_first() -> None:
    selected = select_host_addresses(ALL, default_route=["10.1.0.2"])
    assert ips(selected) == ["2001:db8:0:2::2", "10.1.0.2", "2001:db8:0:1::2", "10.0.0.2"]
    # The preferred family's default route decides when the two differ.
    both = select_host_addresses(ALL, default_route=["10.1.0.2", "2001:db8:0:1::2"])
    assert [a.interface for a in both] == ["eth0", "eth0", "eth1", "eth1"]
    ipv4_first = select_host_addresses(
        ALL, default_route=["10.1.0.2", "2001:db8:0:1::2"], prefer_ipv6=False
    )
    assert ips(ipv4_first) == ["10.1.0.2", "2001:db8:0:2::2", "10.0.0.2", "2001:db8:0:1::2"]


def test_interfaces_filter_link_local_and_loopback_options() -> None:
    assert ips(select_host_addresses(ALL, interfaces={"eth1"}, default_route=[])) == [
        "2001:db8:0:2::2",
        "10.1.0.2",
    ]
    only_v4 = select_host_addresses(ALL, address_filter=lambda ip: ":" not in ip, default_route=[])
    assert ips(only_v4) == ["10.0.0.2", "10.1.0.2"]
    assert ips(select_host_addresses(ALL, use_ipv6=False, default_route=[])) == ips(only_v4)
    with_link_local = select_host_addresses(
        ALL, interfaces={"eth0"}, include_link_local=True, default_route=[]
    )
    assert ips(with_link_local) == ["2001:db8:0:1::2", "fe80::2", "10.0.0.2"]
    with_loopback = select_host_addresses(ALL, allow_loopback=True, default_route=[])
    assert ips(with_loopback)[-2:] == ["::1", "127.0.0.1"]  # loopback last


def test_rfc8445_never_gathered_addresses() -> None:
    odd = [
        host("eth0", 2, "fec0::1"),  # site-local
        host("eth0", 2, "::ffff:10.0.0.9"),  # IPv4-mapped
        host("eth0", 2, "::10.0.0.9"),  # IPv4-compatible
        host("eth0", 2, "10.0.0.2", 24),
        host("eth0", 2, "10.0.0.2", 24),  # listed twice
    ]
    assert ips(select_host_addresses(odd, allow_loopback=True, default_route=[])) == ["10.0.0.2"]


def test_temporary_address_hides_permanent_ones_of_its_prefix_and_link_local() -> None:
    addresses = [
        host("eth0", 2, "2001:db8:0:1::2"),
        host("eth0", 2, "2001:db8:0:1:a:b:c:d", temporary=True),
        host("eth0", 2, "2001:db8:0:9::2"),  # another prefix: kept
        host("eth0", 2, "fe80::2"),
        host("eth1", 3, "2001:db8:0:1::3"),  # same prefix, another interface: kept
        host("eth0", 2, "10.0.0.2", 24),
    ]
    selected = select_host_addresses(addresses, include_link_local=True, default_route=[])
    assert ips(selected) == [
        "2001:db8:0:1:a:b:c:d",  # temporary first (RFC 6724)
        "2001:db8:0:9::2",
        "10.0.0.2",
        "2001:db8:0:1::3",
    ]
    # A temporary address the caller filtered out hides nothing.
    unfiltered = select_host_addresses(
        addresses,
        include_link_local=True,
        address_filter=lambda ip: ip != "2001:db8:0:1:a:b:c:d",
        default_route=[],
    )
    assert "2001:db8:0:1::2" in ips(unfiltered) and "fe80::2" in ips(unfiltered)


def test_ranks_give_interleaved_distinct_local_preferences() -> None:
    selected = select_host_addresses(
        [*ETH0, *ETH1, host("eth1", 3, "10.1.0.3", 24)], include_link_local=True, default_route=[]
    )
    ranked = [(a.ip, i, r) for a, i, r in rank_host_addresses(selected)]
    assert ranked == [
        ("2001:db8:0:1::2", 0, 0),
        ("fe80::2", 0, 1),
        ("10.0.0.2", 0, 0),
        ("2001:db8:0:2::2", 1, 0),
        ("fe80::3", 1, 1),
        ("10.1.0.2", 1, 0),
        ("10.1.0.3", 1, 1),
    ]
    preferences = [local_preference(ip, interface_rank=i, address_rank=r) for ip, i, r in ranked]
    assert preferences == sorted(preferences, reverse=True)
    assert len(set(preferences)) == len(preferences)


def test_scope_and_sockaddr() -> None:
    assert host("eth0", 2, "fe80::2").sockaddr(5000) == ("fe80::2", 5000, 0, 2)
    assert host("eth0", 2, "2001:db8::2").sockaddr(5000) == ("2001:db8::2", 5000, 0, 0)
    assert host("eth0", 2, "169.254.1.1", 16).sockaddr(5000) == ("169.254.1.1", 5000)


def test_explicit_host_addresses() -> None:
    assert parse_host_address("2001:DB8::1") == HostAddress(
        "", 0, "2001:db8::1", 128, False, False, False
    )
    assert parse_host_address("127.0.0.1").loopback
    scoped = parse_host_address(f"fe80::1%{socket.if_nametoindex('lo')}")
    assert (scoped.interface, scoped.scope_id, scoped.ip) == ("lo", 1, "fe80::1")
    assert parse_host_address("fe80::1%lo").scope_id == socket.if_nametoindex("lo")
    for bad in ("fe80::1", "2001:db8::1%lo", "10.0.0.1%lo", "fe80::1%no-such-if0", "host"):
        with pytest.raises(ValueError):
            parse_host_address(bad)
