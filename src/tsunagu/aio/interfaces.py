"""The host's addresses, by interface, for ICE host candidates (RFC 8445 §5.1.1.1).

:func:`interface_addresses` lists the addresses of every usable interface (up and
running): on Linux from rtnetlink (an ``RTM_GETLINK`` and an ``RTM_GETADDR`` dump on a
``NETLINK_ROUTE`` socket, parsed here with :mod:`struct`; no subprocess), elsewhere -- or
where netlink is refused -- from the UDP ``connect`` trick (:func:`default_route_addresses`)
plus loopback. Addresses still in duplicate address detection (tentative), deprecated or
failed DAD are left out: a socket cannot use them, or should not start to.

:func:`select_host_addresses` applies the gathering rules of RFC 8445 §5.1.1.1 and the
caller's choices, and orders what is left by preference:

- loopback only when asked (``allow_loopback``), link-local (IPv4 169.254/16, IPv6
  fe80::/10) only when asked (``include_link_local``);
- never IPv4-compatible (``::a.b.c.d``, deprecated by RFC 4291) nor site-local (fec0::/10,
  RFC 3879) IPv6 addresses, and no IPv4-mapped ones (``::ffff:a.b.c.d``; we speak IPv4);
- privacy: where an interface has a temporary IPv6 address (RFC 8981, the kernel's
  ``IFA_F_TEMPORARY``), the permanent addresses of the same interface and prefix are not
  gathered, and once any temporary address is gathered no IPv6 link-local one is (both
  MUST NOTs of §5.1.1.1);
- order (RFC 8421 multihoming): the interfaces of the default routes first (the preferred
  family's first), then the others by index, loopback last; within an interface the
  preferred family first (IPv6 by default), temporary addresses before the others
  (RFC 6724 prefers them). :func:`rank_host_addresses` turns that order into the
  ``interface_rank`` and ``address_rank`` that :meth:`tsunagu.ice.agent.IceAgent.add_host_candidate`
  folds into the local preference, which interleaves the families across interfaces.

IPv6 link-local addresses need the interface to bind (``(ip, port, 0, scope_id)``):
:attr:`HostAddress.scope_id` is the interface index for them, 0 otherwise. The core's
:data:`~tsunagu.ice.candidate.Address` stays a plain ``(ip, port)``: a socket bound with the
scope sends on its interface whatever the destination's scope, and datagrams arrive with
plain addresses, so candidates carry the address without a zone.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from tsunagu.errors import TsunaguError
from tsunagu.ice.candidate import normalize_ip

__all__ = [
    "AddressInfo",
    "HostAddress",
    "LinkInfo",
    "NetlinkMessage",
    "PortRangeExhaustedError",
    "bind_host_socket",
    "check_port_range",
    "default_route_addresses",
    "host_addresses_of",
    "interface_addresses",
    "netlink_dump",
    "parse_address",
    "parse_attributes",
    "parse_host_address",
    "parse_link",
    "parse_netlink",
    "rank_host_addresses",
    "select_host_addresses",
]

logger = logging.getLogger(__name__)

# <linux/netlink.h>
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NETLINK_ROUTE = 0
# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
# <linux/if_link.h>, <linux/if_addr.h>
IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
# <linux/if.h>
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
# <linux/if_addr.h> address flags (IFA_F_SECONDARY, for IPv4, shares TEMPORARY's bit)
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type
_ERROR = struct.Struct("=i")  # nlmsgerr.error (negative errno), then the request's header

_RECV_SIZE = 1 << 16
"""Bytes per netlink datagram read (the kernel fills dump datagrams up to 32 KiB)."""
_DUMP_TIMEOUT = 2.0
"""Seconds one dump may take, end to end, before we give up on netlink."""
_MAX_DATAGRAMS = 1024
"""Datagrams one dump may take (thousands of addresses), before we give up on it."""
_MAX_ENTRIES = 16384
"""Links or addresses one dump may list, at most."""
_DUMP_ATTEMPTS = 3
"""Dumps tried when the kernel says one was interrupted by a change (NLM_F_DUMP_INTR)."""

# Where the UDP "connect" trick points to learn the address of the default route:
# connecting a UDP socket sends nothing, it only asks the kernel for a route (RFC 5737 /
# RFC 3849 documentation prefixes, so no real host is ever named).
_PROBE_TARGETS = ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1"))

_V4_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_V6_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_V6_COMPATIBLE = ipaddress.IPv6Network("::/96")


# --- the parsed records ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    """One netlink message: its header fields and its payload (after the header)."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """An interface, from an ``RTM_NEWLINK`` message (``struct ifinfomsg`` + ``IFLA_IFNAME``)."""

    index: int
    name: str
    flags: int

    @property
    def usable(self) -> bool:
        """Up (administratively) and running (operationally: carrier, not dormant)."""
        return self.flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING

    @property
    def loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK)


@dataclass(frozen=True, slots=True)
class AddressInfo:
    """An address, from an ``RTM_NEWADDR`` message (``struct ifaddrmsg`` + attributes);
    ``flags`` are the 32 bits of ``IFA_FLAGS`` when present, else ``ifa_flags``."""

    family: int
    index: int
    ip: str
    prefix_length: int
    flags: int
    scope: int

    @property
    def usable(self) -> bool:
        """Not tentative (DAD going on), not deprecated, DAD did not fail."""
        return not self.flags & (IFA_F_TENTATIVE | IFA_F_DEPRECATED | IFA_F_DADFAILED)

    @property
    def temporary(self) -> bool:
        """An IPv6 temporary (privacy, RFC 8981) address; the bit means "secondary" for IPv4."""
        return self.family == socket.AF_INET6 and bool(self.flags & IFA_F_TEMPORARY)


@dataclass(frozen=True, slots=True)
class HostAddress:
    """An address of a usable interface, as host candidates are gathered on."""

    interface: str
    """The interface's name ("" where unknown: the non-netlink fallback)."""
    index: int
    """The interface's index (0 where unknown)."""
    ip: str
    """The address, canonical spelling, no zone."""
    prefix_length: int
    link_local: bool
    """IPv4 169.254.0.0/16 or IPv6 fe80::/10."""
    loopback: bool
    """On a loopback interface, or a loopback address."""
    temporary: bool
    """An IPv6 temporary (privacy) address."""

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    @property
    def scope_id(self) -> int:
        """What a socket address for this IP needs as its scope: the interface index for
        an IPv6 link-local address, 0 otherwise."""
        return self.index if self.link_local and ":" in self.ip else 0

    def sockaddr(self, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
        """The socket address to bind on ``port``: with the scope where it needs one."""
        if self.family == socket.AF_INET:
            return (self.ip, port)
        return (self.ip, port, 0, self.scope_id)


# --- the parser (never raises on what the kernel, or anyone, sent) ---------------------------


def _align(length: int) -> int:
    return (length + 3) & ~3


def parse_netlink(data: bytes) -> list[NetlinkMessage]:
    """The messages of one netlink datagram; parsing stops at the first malformed or
    truncated one (what came before it is kept)."""
    messages: list[NetlinkMessage] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        payload = data[offset + _NLMSGHDR.size : offset + length]
        messages.append(NetlinkMessage(kind, flags, seq, pid, payload))
        offset += _align(length)
    return messages


def parse_attributes(data: bytes) -> dict[int, bytes]:
    """The route attributes (``struct rtattr`` TLVs) in ``data``, by type (the first of
    each type wins); parsing stops at the first malformed or truncated one."""
    attributes: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break
        attributes.setdefault(kind & 0x3FFF, data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return attributes


def parse_link(payload: bytes) -> LinkInfo | None:
    """An ``RTM_NEWLINK`` payload; None when it is too short or has no usable name."""
    if len(payload) < _IFINFOMSG.size:
        return None
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
    raw = parse_attributes(payload[_IFINFOMSG.size :]).get(IFLA_IFNAME)
    if raw is None or index <= 0:
        return None
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return LinkInfo(index, name, flags) if name else None


def parse_address(payload: bytes) -> AddressInfo | None:
    """An ``RTM_NEWADDR`` payload; None when it is too short, of another family, or its
    address attribute has the wrong length."""
    if len(payload) < _IFADDRMSG.size:
        return None
    family, prefix_length, flags, scope, index = _IFADDRMSG.unpack_from(payload)
    size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
    if size is None:
        return None
    attributes = parse_attributes(payload[_IFADDRMSG.size :])
    # IFA_LOCAL is the local address of a point-to-point link (IFA_ADDRESS its peer);
    # elsewhere IFA_ADDRESS is the address (IPv6 sends only that one).
    raw = attributes.get(IFA_LOCAL, attributes.get(IFA_ADDRESS))
    if raw is None or len(raw) != size or prefix_length > size * 8:
        return None
    extended = attributes.get(IFA_FLAGS)
    if extended is not None and len(extended) == 4:
        flags = struct.unpack("=I", extended)[0]
    ip = str(ipaddress.ip_address(raw))
    return AddressInfo(family, index, ip, prefix_length, flags, scope)


def _is_link_local(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv4Address):
        return address in _V4_LINK_LOCAL
    return address.is_link_local


def host_addresses_of(
    links: Sequence[LinkInfo], addresses: Sequence[AddressInfo]
) -> list[HostAddress]:
    """The usable addresses of the usable links, in the kernel's order."""
    by_index = {link.index: link for link in links}
    found: list[HostAddress] = []
    for entry in addresses:
        link = by_index.get(entry.index)
        if link is None or not link.usable or not entry.usable:
            continue
        found.append(
            HostAddress(
                interface=link.name,
                index=link.index,
                ip=entry.ip,
                prefix_length=entry.prefix_length,
                link_local=_is_link_local(entry.ip),
                loopback=link.loopback or ipaddress.ip_address(entry.ip).is_loopback,
                temporary=entry.temporary,
            )
        )
    return found


# --- the netlink dump ------------------------------------------------------------------------


class _InterruptedError(Exception):
    """The kernel marked the dump inconsistent (the table changed while it ran)."""


def _dump(sock: socket.socket, kind: int, body: bytes, seq: int) -> list[NetlinkMessage]:
    """Send one dump request and read its answers up to NLMSG_DONE, bounded in time,
    datagrams and entries. OSError for every failure."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    sock.sendto(header + body, (0, 0))
    deadline = time.monotonic() + _DUMP_TIMEOUT
    found: list[NetlinkMessage] = []
    interrupted = False
    for _ in range(_MAX_DATAGRAMS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        data, _, flags, sender = sock.recvmsg(_RECV_SIZE)
        if flags & socket.MSG_TRUNC:
            raise OSError(errno.EMSGSIZE, "netlink datagram truncated")
        if not isinstance(sender, tuple) or sender[0] != 0:
            continue  # only the kernel (port id 0) answers dumps
        for message in parse_netlink(data):
            if message.seq != seq:
                continue
            if message.flags & NLM_F_DUMP_INTR:
                interrupted = True
            if message.type == NLMSG_DONE:
                if interrupted:
                    raise _InterruptedError
                return found
            if message.type == NLMSG_ERROR:
                code = _ERROR.unpack_from(message.payload)[0] if len(message.payload) >= 4 else 0
                if code < 0:
                    raise OSError(-code, os.strerror(-code))
                continue  # an acknowledgement
            if message.type == NLMSG_NOOP:
                continue
            found.append(message)
            if len(found) > _MAX_ENTRIES:
                raise OSError(errno.E2BIG, "netlink dump too long")
    raise OSError(errno.ETIMEDOUT, "netlink dump did not end")


def netlink_dump() -> tuple[list[LinkInfo], list[AddressInfo]]:
    """Every interface and every address the kernel lists (Linux rtnetlink); OSError when
    netlink is unavailable or misbehaves."""
    for _attempt in range(_DUMP_ATTEMPTS):
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        ) as sock:
            sock.bind((0, 0))
            seq = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
            try:
                link_messages = _dump(sock, RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0), seq)
                address_messages = _dump(sock, RTM_GETADDR, _IFADDRMSG.pack(0, 0, 0, 0, 0), seq + 1)
            except _InterruptedError:
                continue
        links = [
            link
            for m in link_messages
            if m.type == RTM_NEWLINK and (link := parse_link(m.payload)) is not None
        ]
        addresses = [
            address
            for m in address_messages
            if m.type == RTM_NEWADDR and (address := parse_address(m.payload)) is not None
        ]
        return links, addresses
    raise OSError(errno.EAGAIN, "netlink dumps kept being interrupted by changes")


def default_route_addresses(*, use_ipv6: bool = True) -> list[str]:
    """The source addresses of the default routes (IPv4, then IPv6 when ``use_ipv6``),
    found with a UDP ``connect``, which sends nothing; loopback never."""
    found: list[str] = []
    for family, target in _PROBE_TARGETS:
        if family == socket.AF_INET6 and not use_ipv6:
            continue
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))
                ip = normalize_ip(str(probe.getsockname()[0]))
        except (OSError, ValueError):
            continue
        if ip not in found and not ipaddress.ip_address(ip).is_loopback:
            found.append(ip)
    return found


def _fallback_addresses() -> list[HostAddress]:
    """Without netlink: the default routes' addresses, and loopback (interfaces unknown)."""
    found = [
        HostAddress("", 0, ip, 32 if ":" not in ip else 128, _is_link_local(ip), False, False)
        for ip in default_route_addresses()
    ]
    found.append(HostAddress("", 0, "127.0.0.1", 8, False, True, False))
    if socket.has_ipv6:
        found.append(HostAddress("", 0, "::1", 128, False, True, False))
    return found


def interface_addresses() -> list[HostAddress]:
    """The addresses of every usable interface (up and running), loopback and link-local
    ones included, tentative, deprecated and DAD-failed ones not; in the kernel's order.
    Linux: rtnetlink; elsewhere, or if netlink fails, the default routes' addresses and
    loopback."""
    if sys.platform.startswith("linux") and hasattr(socket, "AF_NETLINK"):
        try:
            links, addresses = netlink_dump()
        except OSError as exc:
            logger.warning("interfaces: netlink failed (%s), using the default routes", exc)
        else:
            return host_addresses_of(links, addresses)
    return _fallback_addresses()


# --- selection and order (RFC 8445 §5.1.1.1, RFC 8421) ---------------------------------------


def _never_gathered(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """RFC 8445 §5.1.1.1's MUST NOTs and SHOULD NOTs, and what cannot carry traffic."""
    if address.is_multicast or address.is_unspecified:
        return True
    if isinstance(address, ipaddress.IPv4Address):
        return False
    if address.is_loopback:
        return False
    return address in _V6_SITE_LOCAL or address in _V6_COMPATIBLE or address.ipv4_mapped is not None


def _interface_key(address: HostAddress) -> tuple[int, str]:
    return (address.index, address.interface)


def select_host_addresses(
    addresses: Sequence[HostAddress] | None = None,
    *,
    interfaces: Collection[str] | None = None,
    address_filter: Callable[[str], bool] | None = None,
    include_link_local: bool = False,
    allow_loopback: bool = False,
    use_ipv6: bool = True,
    prefer_ipv6: bool = True,
    default_route: Sequence[str] | None = None,
) -> list[HostAddress]:
    """The addresses to gather host candidates on, most preferred first (module doc).

    ``addresses``: default :func:`interface_addresses`; ``interfaces``: only these
    interface names; ``address_filter``: only the IPs it returns True for (asked before
    the privacy rule, so a filtered-out temporary address hides nothing);
    ``default_route``: the default routes' source IPs (default
    :func:`default_route_addresses`), whose interfaces come first."""
    if isinstance(interfaces, str):
        raise TypeError("interfaces is a collection of interface names, not one name")
    if addresses is None:
        addresses = interface_addresses()
    kept: list[HostAddress] = []
    seen: set[tuple[str, int]] = set()
    for entry in addresses:
        ip = ipaddress.ip_address(entry.ip)
        key = (entry.ip, entry.scope_id)  # one IP on two interfaces: the first one
        if key in seen or _never_gathered(ip):
            continue
        if entry.family == socket.AF_INET6 and not use_ipv6:
            continue
        if interfaces is not None and entry.interface not in interfaces:
            continue
        if (entry.loopback or ip.is_loopback) and not allow_loopback:
            continue
        if entry.link_local and not include_link_local:
            continue
        if address_filter is not None and not address_filter(entry.ip):
            continue
        seen.add(key)
        kept.append(entry)
    kept = _privacy_filtered(kept)
    if default_route is None:
        default_route = default_route_addresses(use_ipv6=use_ipv6)
    return _ordered(kept, default_route, prefer_ipv6)


def _privacy_filtered(kept: list[HostAddress]) -> list[HostAddress]:
    temporary = [
        (entry, ipaddress.ip_network(f"{entry.ip}/{entry.prefix_length}", strict=False))
        for entry in kept
        if entry.temporary and not entry.link_local
    ]
    if not temporary:
        return kept

    def hidden(entry: HostAddress) -> bool:
        if entry.family != socket.AF_INET6 or entry.temporary or entry.loopback:
            return False
        if entry.link_local:
            return True
        ip = ipaddress.ip_address(entry.ip)
        return any(other.index == entry.index and ip in network for other, network in temporary)

    return [entry for entry in kept if not hidden(entry)]


def _ordered(
    kept: list[HostAddress], default_route: Sequence[str], prefer_ipv6: bool
) -> list[HostAddress]:
    def family_rank(ip: str) -> int:
        return 0 if (":" in ip) == prefer_ipv6 else 1

    order: list[tuple[int, str]] = []
    for ip in sorted(default_route, key=family_rank):
        for entry in kept:
            if entry.ip == ip and _interface_key(entry) not in order:
                order.append(_interface_key(entry))
    loopback: dict[tuple[int, str], bool] = {}
    for entry in kept:  # an interface is loopback when all its addresses are
        key = _interface_key(entry)
        loopback[key] = loopback.get(key, True) and entry.loopback
    rest = sorted(loopback.items(), key=lambda item: (item[1], item[0][0], item[0][1]))
    order.extend(key for key, _ in rest if key not in order)
    position = {key: i for i, key in enumerate(order)}
    return sorted(
        kept,
        key=lambda entry: (
            position[_interface_key(entry)],
            family_rank(entry.ip),
            not entry.temporary,
            entry.link_local,
        ),
    )


def rank_host_addresses(
    addresses: Sequence[HostAddress],
) -> Iterator[tuple[HostAddress, int, int]]:
    """``(address, interface_rank, address_rank)`` for addresses in preference order
    (:func:`select_host_addresses`): the interface's position among the interfaces, and
    the address's among those of its interface and family -- what
    :meth:`~tsunagu.ice.agent.IceAgent.add_host_candidate` takes."""
    interfaces: dict[tuple[int, str], int] = {}
    counts: dict[tuple[tuple[int, str], int], int] = {}
    for entry in addresses:
        key = _interface_key(entry)
        interface_rank = interfaces.setdefault(key, len(interfaces))
        slot = (key, entry.family)
        address_rank = counts.get(slot, 0)
        counts[slot] = address_rank + 1
        yield entry, interface_rank, address_rank


# --- explicit addresses and binding ----------------------------------------------------------


def parse_host_address(text: str) -> HostAddress:
    """An address given by the caller: an IP literal, or an IPv6 link-local one with its
    zone (``fe80::1%eth0`` or ``fe80::1%2``), which it needs to be bound. ValueError for
    anything else (a link-local IPv6 address without a zone included)."""
    ip_text, _, zone = text.partition("%")
    ip = normalize_ip(ip_text)
    address = ipaddress.ip_address(ip)
    link_local = _is_link_local(ip)
    index, interface = 0, ""
    if zone:
        if not (link_local and address.version == 6):
            raise ValueError(f"{text!r}: only an IPv6 link-local address takes a zone")
        try:
            index = int(zone) if zone.isdigit() else socket.if_nametoindex(zone)
            interface = socket.if_indextoname(index)
        except OSError as exc:
            raise ValueError(f"{text!r}: no interface {zone!r}") from exc
    elif link_local and address.version == 6:
        raise ValueError(f"{text!r}: an IPv6 link-local address needs its zone (ip%interface)")
    return HostAddress(
        interface=interface,
        index=index,
        ip=ip,
        prefix_length=address.max_prefixlen,
        link_local=link_local,
        loopback=address.is_loopback,
        temporary=False,
    )


class PortRangeExhaustedError(TsunaguError, OSError):
    """Every port of the allowed range is taken (or refused) on an address."""


def _bind_in_range(sock: socket.socket, host: HostAddress, port_range: tuple[int, int]) -> None:
    low, high = port_range
    ports = list(range(low, high + 1))
    secrets.SystemRandom().shuffle(ports)  # unpredictable ports (RFC 6056's reasoning)
    for port in ports:
        try:
            sock.bind(host.sockaddr(port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue  # taken, or privileged: the next one
            raise
        return
    raise PortRangeExhaustedError(
        errno.EADDRINUSE, f"no free UDP port in {low}-{high} on {host.ip}"
    )


def bind_host_socket(host: HostAddress, port_range: tuple[int, int] | None = None) -> socket.socket:
    """A non-blocking UDP socket bound on ``host`` (with its scope for IPv6 link-local),
    on a port the kernel picks, or on one of ``port_range`` (inclusive) tried in an
    order drawn from :mod:`secrets`; :class:`PortRangeExhaustedError` when none is free."""
    sock = socket.socket(host.family, socket.SOCK_DGRAM)
    try:
        if port_range is None:
            sock.bind(host.sockaddr(0))
        else:
            _bind_in_range(sock, host, port_range)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def check_port_range(port_range: tuple[int, int] | None) -> tuple[int, int] | None:
    """``port_range`` if it is ``(low, high)`` with ``1 <= low <= high <= 65535``;
    ValueError otherwise."""
    if port_range is None:
        return None
    low, high = port_range
    if not 1 <= low <= high <= 0xFFFF:
        raise ValueError(f"port range must be 1 <= low <= high <= 65535, not {low}-{high}")
    return (low, high)
