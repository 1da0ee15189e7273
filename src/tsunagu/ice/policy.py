"""Which remote and peer-reflexive addresses an agent will ever send checks to.

A remote description is attacker-controlled input: without a filter, an agent can be made
to send connectivity checks at broadcast or multicast groups, at port 0, or at the host's
own loopback services. :func:`address_problem` names what is wrong with an address, or
returns None for one the agent may use. IPv6 spellings that embed an IPv4 address
(IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 64:ff9b::/96, 6to4, Teredo) are judged
by the IPv4 address inside them too, so ``::ffff:255.255.255.255`` is as unusable as
``255.255.255.255``.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

__all__ = ["AddressPolicy", "address_problem"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # RFC 1122 §3.2.1.3 "this network"
_V4_RESERVED = ipaddress.IPv4Network("240.0.0.0/4")  # includes 255.255.255.255
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 §2.5.5.1 (deprecated)
_V4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 §2.1
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 §2.1
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """What remote addresses are allowed beyond ordinary unicast ones."""

    allow_loopback: bool = False
    """127.0.0.0/8 and ::1: only for tests and local demos (a remote description must not
    be able to point checks at the host's own services)."""
    allow_link_local: bool = False
    """169.254.0.0/16 and fe80::/10 (RFC 8445 §5.1.1.1 leaves them out by default)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if (
        address in _V4_COMPATIBLE
        or address in _V4_TRANSLATED
        or address in _NAT64
        or address in _NAT64_LOCAL
    ):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _ipv4_problem(address: ipaddress.IPv4Address, policy: AddressPolicy) -> str | None:
    if address in _V4_THIS_NETWORK:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address in _V4_RESERVED:
        return "broadcast or reserved"
    if address.is_loopback and not policy.allow_loopback:
        return "loopback"
    if address.is_link_local and not policy.allow_link_local:
        return "link-local"
    return None


def address_problem(ip: str, port: int, policy: AddressPolicy) -> str | None:
    """Why (``ip``, ``port``) must not receive checks or data, or None if it may."""
    if not 0 < port <= 0xFFFF:
        return "port 0" if port == 0 else "invalid port"
    return _ip_problem(ip, policy)


@functools.lru_cache(maxsize=1024)
def _ip_problem(ip: str, policy: AddressPolicy) -> str | None:
    """:func:`address_problem` for the address alone; cached, as an agent asks about the
    same few addresses for every candidate, check and datagram (``ipaddress`` is slow)."""
    try:
        address: IPAddress = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_problem(address, policy)
    if address.scope_id is not None:
        return "scoped address"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_loopback:
        return None if policy.allow_loopback else "loopback"
    if address.is_link_local:
        return None if policy.allow_link_local else "link-local"
    # The ::/96 range also holds :: and ::1, handled above.
    for inner in _embedded_ipv4(address):
        problem = _ipv4_problem(inner, AddressPolicy())  # never loopback through a tunnel
        if problem is not None:
            return f"IPv4-embedded {problem}"
    return None
