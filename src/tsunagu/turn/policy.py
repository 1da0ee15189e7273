"""Which peers a relay may talk to (RFC 8656 §10.2, §11.2, §12.2: "The server MAY impose
restrictions on the IP address and port values allowed"; §21.3 on relaying into a
private network).

The policy decides on explicit CIDR tables, never on :mod:`ipaddress`'s ``is_*`` flags: on
Python 3.11 ``::127.0.0.1`` and ``64:ff9b::7f00:1`` report ``is_global``,
``::ffff:127.0.0.1`` is not ``is_loopback`` and ``::ffff:169.254.169.254`` is not
``is_link_local`` -- exactly the spellings that let peers reach a TURN server's own network
through relays that trusted such flags (coturn CVE-2020-26262 and its successors).

Decision procedure for one IP address:

1. Every IPv4 address embedded in an IPv6 address is extracted (:func:`embedded_ipv4`):
   IPv4-mapped ``::ffff:0:0/96``, IPv4-translated ``::ffff:0:0:0/96``, IPv4-compatible
   ``::/96``, NAT64 ``64:ff9b::/96`` and every RFC 6052 position inside the local-use
   prefix ``64:ff9b:1::/48``, 6to4 ``2002::/16``, both Teredo addresses of ``2001::/32``,
   and ISATAP interface identifiers. The address is refused if any of its forms is refused.
2. Each form is looked up in one table of CIDR rules by longest prefix. The table holds the
   built-in denials (:data:`DEFAULT_DENIED_IPV4`, :data:`DEFAULT_DENIED_IPV6`) and the
   operator's ``allow-peer``/``deny-peer`` rules. The most specific rule wins; on equal
   prefixes an operator rule beats a built-in one and, between operator rules, deny beats
   allow. No matching rule means allowed (a public unicast address).

So ``--allow-peer 10.0.0.0/8`` opens the RFC 1918 block, ``--deny-peer 10.9.0.0/16``
closes part of it again, and the cloud metadata /32s stay closed unless allowed by exactly
that /32: an operator who opens CGNAT's ``100.64.0.0/10`` does not open
``100.100.100.200``.

On top of the table, the server's own transport addresses (listening ports, and the relay
port range on the relay addresses) are refused for peer *transport addresses* by
:meth:`PeerPolicy.permits`, whatever the operator rules say, so that a relay can never
loop into the server itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Address = tuple[str, int]

DEFAULT_DENIED_IPV4: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", '"this network" (RFC 1122 §3.2.1.3)'),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space, CGNAT (RFC 6598)"),
    ("100.100.100.200/32", "cloud metadata (Alibaba Cloud)"),
    ("127.0.0.0/8", "loopback (RFC 1122 §3.2.1.3)"),
    ("169.254.0.0/16", "link-local (RFC 3927)"),
    ("169.254.169.254/32", "cloud metadata (AWS, GCP, Azure, OpenStack)"),
    ("169.254.170.2/32", "cloud metadata (AWS ECS task)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("224.0.0.0/4", "multicast (RFC 5771)"),
    ("240.0.0.0/4", "reserved (RFC 1112 §4)"),
    ("255.255.255.255/32", "limited broadcast (RFC 919)"),
)
"""IPv4 blocks refused by default, with the reason logged when a peer falls in one."""

DEFAULT_DENIED_IPV6: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified (RFC 4291 §2.5.2)"),
    ("::1/128", "loopback (RFC 4291 §2.5.3)"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001:2::/48", "benchmarking (RFC 5180)"),
    ("fc00::/7", "unique local (RFC 4193)"),
    ("fd00:ec2::254/128", "cloud metadata (AWS, IPv6)"),
    ("fe80::/10", "link-local (RFC 4291 §2.5.6)"),
    ("fec0::/10", "site-local, deprecated (RFC 3879)"),
    ("ff00::/8", "multicast (RFC 4291 §2.7)"),
)
"""IPv6 blocks refused by default. IPv6 spellings of IPv4 addresses are judged as IPv4."""

_MASK32 = 0xFFFFFFFF


def _bits(value: int, start: int, length: int) -> int:
    """``length`` bits of a 128-bit integer, counting bit 0 as the most significant."""
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address that an IPv6 address spells, by any embedding a router or the
    kernel may act on (see the module docstring). Empty for a plain IPv6 address."""
    value = int(address)
    upper96 = value >> 32
    found: list[int] = []
    if upper96 in (0xFFFF, 0xFFFF_0000) or (upper96 == 0 and value > 1):
        # ::ffff:0:0/96 IPv4-mapped (RFC 4291 §2.5.5.2), ::ffff:0:0:0/96 IPv4-translated
        # (RFC 2765 §2.1), ::/96 IPv4-compatible (§2.5.5.1) -- but :: and ::1 are the
        # unspecified and loopback addresses (§2.5.2, §2.5.3), judged as IPv6.
        found.append(value & _MASK32)
    if upper96 == 0x0064_FF9B_0000_0000_0000_0000:  # 64:ff9b::/96 (RFC 6052 §2.1)
        found.append(value & _MASK32)
    if value >> 80 == 0x0064_FF9B_0001:
        # 64:ff9b:1::/48 (RFC 8215) may use any RFC 6052 §2.2 prefix length of /48 or more;
        # bits 64-71 (the "u" octet) are never part of the IPv4 address.
        found.append((_bits(value, 48, 16) << 16) | _bits(value, 72, 16))  # /48
        found.append((_bits(value, 56, 8) << 24) | _bits(value, 72, 24))  # /56
        found.append(_bits(value, 72, 32))  # /64
        found.append(value & _MASK32)  # /96
    if value >> 112 == 0x2002:  # 6to4 (RFC 3056 §2): 2002:V4ADDR::/48
        found.append(_bits(value, 16, 32))
    if value >> 96 == 0x2001_0000:  # Teredo (RFC 4380 §4): server, then inverted client
        found.append(_bits(value, 32, 32))
        found.append(~value & _MASK32)
    if _bits(value, 64, 32) in (0x0000_5EFE, 0x0200_5EFE):  # ISATAP (RFC 5214 §6.1)
        found.append(value & _MASK32)
    return tuple(ipaddress.IPv4Address(v) for v in dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One row of the policy table."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    allow: bool
    operator: bool
    """True for ``allow-peer``/``deny-peer`` rules, False for the built-in denials."""
    reason: str


def _rank(rule: PeerRule) -> tuple[bool, bool]:
    # Higher wins on equal prefixes: operator over built-in, then deny over allow.
    return (rule.operator, not rule.allow)


class _Table:
    """Longest-prefix match over the rules of one IP version."""

    __slots__ = ("_by_length", "_lengths", "_width")

    def __init__(self, width: int, rules: Iterable[PeerRule]) -> None:
        self._width = width
        by_length: dict[int, dict[int, PeerRule]] = {}
        for rule in rules:
            row = by_length.setdefault(rule.network.prefixlen, {})
            key = int(rule.network.network_address)
            current = row.get(key)
            if current is None or _rank(rule) > _rank(current):
                row[key] = rule
        self._by_length = by_length
        self._lengths = sorted(by_length, reverse=True)

    def lookup(self, value: int) -> PeerRule | None:
        width = self._width
        for length in self._lengths:
            key = (value >> (width - length)) << (width - length) if length else 0
            rule = self._by_length[length].get(key)
            if rule is not None:
                return rule
        return None


def parse_network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or a bare address, meaning a /32 or /128); host bits must be zero."""
    try:
        return ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a CIDR block: {cidr!r} ({exc})") from None


class PeerPolicy:
    """Decides whether a peer IP address (permissions) or transport address (relaying) is
    allowed. Immutable; build a new one to change the policy (SIGHUP reload)."""

    __slots__ = ("_own", "_own_cache", "_own_ranges", "_v4", "_v6")

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        own_addresses: Iterable[Address] = (),
        own_port_ranges: Iterable[tuple[str, int, int]] = (),
        builtin_denials: bool = True,
    ) -> None:
        """``allow``/``deny``: operator CIDR lists. ``own_addresses``: the server's own
        transport addresses (listening sockets). ``own_port_ranges``: (ip, first, last)
        port ranges that belong to the server (the relay range on each relay address).
        ``builtin_denials=False`` drops the default tables (simulations of private
        networks)."""
        rules: list[PeerRule] = []
        if builtin_denials:
            for cidr, reason in DEFAULT_DENIED_IPV4 + DEFAULT_DENIED_IPV6:
                rules.append(PeerRule(parse_network(cidr), False, False, reason))
        for cidr in allow:
            rules.append(PeerRule(parse_network(cidr), True, True, "allow-peer"))
        for cidr in deny:
            rules.append(PeerRule(parse_network(cidr), False, True, "deny-peer"))
        self._v4 = _Table(32, (r for r in rules if r.network.version == 4))
        self._v6 = _Table(128, (r for r in rules if r.network.version == 6))
        own: set[tuple[int, int, int]] = set()
        for ip, port in own_addresses:
            for version, value in _forms(ip):
                own.add((version, value, port))
        self._own = frozenset(own)
        ranges: list[tuple[int, int, int, int]] = []
        for ip, first, last in own_port_ranges:
            for version, value in _forms(ip):
                ranges.append((version, value, first, last))
        self._own_ranges = tuple(ranges)
        # is_own runs for every Send indication: remember answers (bounded; a policy is
        # immutable, a reload builds a new one).
        self._own_cache: dict[Address, bool] = {}

    def denial_reason(self, ip: str) -> str | None:
        """Why ``ip`` may not be a peer, or None when it may. Malformed input is refused."""
        try:
            forms = _forms(ip)
        except ValueError:
            return "not an IP address"
        for version, value in forms:
            rule = (self._v4 if version == 4 else self._v6).lookup(value)
            if rule is not None and not rule.allow:
                spelled = "" if version == 6 or ":" not in ip else " (embedded IPv4)"
                return f"{rule.network} {rule.reason}{spelled}"
        return None

    def permits_ip(self, ip: str) -> bool:
        """Whether a permission may be installed for ``ip`` (RFC 8656 §10.2)."""
        return self.denial_reason(ip) is None

    def is_own(self, address: Address) -> bool:
        """Whether ``address`` (any spelling) is one of the server's own transport
        addresses."""
        cached = self._own_cache.get(address)
        if cached is None:
            if len(self._own_cache) >= _OWN_CACHE_SIZE:
                self._own_cache.clear()
            cached = self._own_cache[address] = self._is_own(address)
        return cached

    def _is_own(self, address: Address) -> bool:
        ip, port = address
        try:
            forms = _forms(ip)
        except ValueError:
            return True
        for version, value in forms:
            if (version, value, port) in self._own:
                return True
            for r_version, r_value, first, last in self._own_ranges:
                if r_version == version and r_value == value and first <= port <= last:
                    return True
        return False

    def permits(self, address: Address) -> bool:
        """Whether data may be relayed to the peer transport address ``address``."""
        return self.permits_ip(address[0]) and not self.is_own(address)


_OWN_CACHE_SIZE = 4096


def _forms(ip: str) -> list[tuple[int, int]]:
    """(version, integer) of an address and of every IPv4 address it embeds."""
    parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    forms: list[tuple[int, int]] = [(parsed.version, int(parsed))]
    if isinstance(parsed, ipaddress.IPv6Address):
        forms.extend((4, int(v4)) for v4 in embedded_ipv4(parsed))
    return forms
