"""ICE candidates: the value type, priorities, foundations, redundancy, SDP syntax.

* :class:`Candidate` -- one candidate as RFC 8445 §5.1 defines it, with the RFC 8839 §5.1
  extensions WebRTC peers send (``generation``, ``ufrag``, ``network-id``,
  ``network-cost``) and RFC 6544's ``tcptype``.
* :func:`candidate_priority`, :func:`local_preference` -- RFC 8445 §5.1.2 priorities, with
  the local preference interleaving interfaces and address families as RFC 8421 §4 asks
  (and RFC 6544 §4.2's formula for TCP).
* :class:`FoundationAllocator` -- RFC 8445 §5.1.1.3 foundations.
* :func:`is_redundant` -- RFC 8445 §5.1.3 elimination of redundant candidates.
* :meth:`Candidate.from_sdp` / :meth:`Candidate.to_sdp` -- the RFC 8839 §5.1 ``candidate``
  attribute, parsed strictly: anything malformed raises :class:`CandidateError` naming the
  problem, and nothing else.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from tsunagu.ice.errors import CandidateError

__all__ = [
    "TYPE_PREFERENCES",
    "Address",
    "Candidate",
    "CandidateType",
    "FoundationAllocator",
    "TcpType",
    "TransportProtocol",
    "candidate_priority",
    "is_ice_chars",
    "is_mdns_name",
    "is_redundant",
    "local_preference",
    "normalize_ip",
]

Address = tuple[str, int]
"""A transport address: (IP literal or mDNS name, port). IPv6 literals carry no brackets."""


class CandidateType(StrEnum):
    """RFC 8445 §5.1.1 candidate types, spelled as in SDP (RFC 8839 §5.1)."""

    HOST = "host"
    SERVER_REFLEXIVE = "srflx"
    PEER_REFLEXIVE = "prflx"
    RELAYED = "relay"


class TransportProtocol(StrEnum):
    UDP = "udp"
    TCP = "tcp"  # RFC 6544


class TcpType(StrEnum):
    """RFC 6544 §4.5: the role of a TCP candidate in connection establishment."""

    ACTIVE = "active"
    PASSIVE = "passive"
    SIMULTANEOUS_OPEN = "so"


TYPE_PREFERENCES: dict[CandidateType, int] = {
    # RFC 8445 §5.1.2.2: the RECOMMENDED values.
    CandidateType.HOST: 126,
    CandidateType.PEER_REFLEXIVE: 110,
    CandidateType.SERVER_REFLEXIVE: 100,
    CandidateType.RELAYED: 0,
}

MAX_PRIORITY = 2**31 - 1  # RFC 8445 §5.1.2.1: a positive integer between 1 and 2^31 - 1
MAX_COMPONENT = 256  # RFC 8445 §5.1.2.1: component IDs 1-256
_MAX_FOUNDATION = 32  # RFC 8839 §5.1: foundation = 1*32ice-char

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")  # RFC 8839 §5.1: ice-char = ALPHA / DIGIT / "+" / "/"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+")  # RFC 3261 token
_VCHARS = re.compile(r"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_ice_chars(text: str) -> bool:
    """Whether ``text`` is one or more RFC 8839 ice-chars."""
    return _ICE_CHARS.fullmatch(text) is not None


def is_mdns_name(name: str) -> bool:
    """Whether ``name`` is a syntactically valid multicast DNS host name (``x.local``), as
    WebRTC uses to hide host addresses (draft-ietf-mmusic-mdns-ice-candidates)."""
    if len(name) > 253 or not name.lower().endswith(".local"):
        return False
    labels = name.split(".")
    return len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels)


@functools.lru_cache(maxsize=1024)
def normalize_ip(text: str) -> str:
    """The canonical spelling of an IP literal (IPv6 compressed, lower case).

    Raises ValueError for anything that is not a plain IPv4 or IPv6 literal (zone IDs and
    brackets included). Cached (failures are not): an agent parses the same few addresses
    in every candidate, check and response, and ``ipaddress`` is slow at it."""
    if "%" in text or text.startswith("["):
        raise ValueError(f"not a plain IP literal: {text!r}")
    return str(ipaddress.ip_address(text))


def _parse_connection_address(text: str, what: str) -> str:
    """RFC 8839 §5.1 connection-address: IPv4, IPv6 or an FQDN; we accept mDNS names only
    among FQDNs (resolving other names is not part of ICE candidates in WebRTC)."""
    if ":" in text or _DIGITS.fullmatch(text.replace(".", "")):
        try:
            return normalize_ip(text)
        except ValueError:
            raise CandidateError(f"{what} {text!r} is not a valid IP address") from None
    if is_mdns_name(text):
        return text.lower()
    raise CandidateError(
        f"{what} {text!r} is neither an IP address nor an mDNS .local name "
        "(other host names are not supported)"
    )


def _parse_int(text: str, what: str, low: int, high: int) -> int:
    if not _DIGITS.fullmatch(text) or len(text) > 10:
        raise CandidateError(f"{what} {text!r} is not a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise CandidateError(f"{what} {value} is outside {low}-{high}")
    return value


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE candidate (RFC 8445 §5.1), local or remote.

    ``address`` is an IP literal (canonical spelling) or, for a remote candidate that hides
    its host address, an mDNS ``.local`` name which must be resolved before it can be used.
    ``related_address``/``related_port`` are SDP's raddr/rport: the base of a reflexive
    candidate, the mapped address of a relayed one (RFC 8839 §5.1).
    """

    foundation: str
    component: int
    transport: TransportProtocol
    priority: int
    address: str
    port: int
    type: CandidateType
    related_address: str | None = None
    related_port: int | None = None
    tcptype: TcpType | None = None
    generation: int | None = None
    ufrag: str | None = None
    network_id: int | None = None
    network_cost: int | None = None
    extensions: tuple[tuple[str, str], ...] = ()
    """Other cand-extensions (name, value), kept in order so they survive a round trip."""

    def __post_init__(self) -> None:
        if not (is_ice_chars(self.foundation) and len(self.foundation) <= _MAX_FOUNDATION):
            raise CandidateError(f"foundation {self.foundation!r} is not 1-32 ice-chars")
        if not 1 <= self.component <= MAX_COMPONENT:
            raise CandidateError(f"component {self.component} is outside 1-{MAX_COMPONENT}")
        if not 1 <= self.priority <= MAX_PRIORITY:
            raise CandidateError(f"priority {self.priority} is outside 1-{MAX_PRIORITY}")
        if not 0 <= self.port <= 0xFFFF:
            raise CandidateError(f"port {self.port} is outside 0-65535")
        if (self.related_address is None) != (self.related_port is None):
            raise CandidateError("raddr and rport go together")
        if self.related_port is not None and not 0 <= self.related_port <= 0xFFFF:
            raise CandidateError(f"rport {self.related_port} is outside 0-65535")
        if (self.transport is TransportProtocol.TCP) != (self.tcptype is not None):
            raise CandidateError("a TCP candidate needs a tcptype and a UDP one has none")
        if self.ufrag is not None and not is_ice_chars(self.ufrag):
            raise CandidateError(f"ufrag {self.ufrag!r} is not ice-chars")

    # -- views ----------------------------------------------------------------------------

    @property
    def transport_address(self) -> Address:
        return (self.address, self.port)

    @property
    def is_mdns(self) -> bool:
        """The address is an unresolved mDNS name, not an IP literal."""
        return self.address.endswith(".local")

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.address

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.is_ipv6 else self.address
        tcp = f"/{self.tcptype}" if self.tcptype is not None else ""
        return f"{self.type} {self.transport}{tcp} {host}:{self.port}"

    # -- SDP (RFC 8839 §5.1) ----------------------------------------------------------------

    def to_sdp(self) -> str:
        """The ``candidate:`` attribute value (without ``a=``), in the order Chromium uses
        for the extensions; unknown extensions follow in their original order."""
        parts = [
            f"candidate:{self.foundation}",
            str(self.component),
            self.transport.value,
            str(self.priority),
            self.address,
            str(self.port),
            "typ",
            self.type.value,
        ]
        if self.related_address is not None:
            parts += ["raddr", self.related_address, "rport", str(self.related_port)]
        if self.tcptype is not None:
            parts += ["tcptype", self.tcptype.value]
        if self.generation is not None:
            parts += ["generation", str(self.generation)]
        if self.ufrag is not None:
            parts += ["ufrag", self.ufrag]
        if self.network_id is not None:
            parts += ["network-id", str(self.network_id)]
        if self.network_cost is not None:
            parts += ["network-cost", str(self.network_cost)]
        for name, value in self.extensions:
            parts += [name, value]
        return " ".join(parts)

    @classmethod
    def from_sdp(cls, text: str) -> Candidate:
        """Parse an RFC 8839 §5.1 ``candidate`` attribute: ``candidate:...``, with or
        without a leading ``a=`` and trailing CRLF.

        Raises :class:`CandidateError` with a message naming the offending field for
        anything that does not follow the grammar, an unknown transport or candidate type,
        a host name other than an mDNS ``.local`` name, or a repeated extension.
        """
        line = text.strip()
        if line.startswith("a="):
            line = line[2:]
        head, sep, rest = line.partition(":")
        if not sep or head != "candidate":
            raise CandidateError(f"not a candidate attribute: {text[:60]!r}")
        fields = rest.split(" ")
        if any(not field for field in fields):
            raise CandidateError("fields must be separated by single spaces")
        if len(fields) < 8:
            raise CandidateError(
                f"a candidate has at least 8 fields, got {len(fields)}: {text[:80]!r}"
            )
        foundation, component, transport, priority, address, port, typ, cand_type = fields[:8]
        if not is_ice_chars(foundation) or len(foundation) > _MAX_FOUNDATION:
            raise CandidateError(f"foundation {foundation!r} is not 1-32 ice-chars")
        component_id = _parse_int(component, "component-id", 1, MAX_COMPONENT)
        if not _TOKEN.fullmatch(transport):
            raise CandidateError(f"transport {transport!r} is not a token")
        try:
            protocol = TransportProtocol(transport.lower())
        except ValueError:
            raise CandidateError(f"unsupported transport {transport!r}") from None
        priority_value = _parse_int(priority, "priority", 1, MAX_PRIORITY)
        ip = _parse_connection_address(address, "connection-address")
        port_value = _parse_int(port, "port", 0, 0xFFFF)
        if typ != "typ":
            raise CandidateError(f"expected 'typ' after the port, got {typ!r}")
        try:
            kind = CandidateType(cand_type)
        except ValueError:
            raise CandidateError(f"unknown candidate type {cand_type!r}") from None

        tail = fields[8:]
        if len(tail) % 2:
            raise CandidateError(f"extension {tail[-1]!r} has no value")
        pairs = [(tail[i], tail[i + 1]) for i in range(0, len(tail), 2)]
        related_address: str | None = None
        related_port: int | None = None
        if pairs and pairs[0][0] == "raddr":
            related_address = _parse_connection_address(pairs.pop(0)[1], "raddr")
            if not pairs or pairs[0][0] != "rport":
                raise CandidateError("raddr must be followed by rport")
        if pairs and pairs[0][0] == "rport":
            if related_address is None:
                raise CandidateError("rport without raddr")
            related_port = _parse_int(pairs.pop(0)[1], "rport", 0, 0xFFFF)

        known: dict[str, str] = {}
        extensions: list[tuple[str, str]] = []
        for name, value in pairs:
            if not _TOKEN.fullmatch(name):
                raise CandidateError(f"extension name {name!r} is not a token")
            if not _VCHARS.fullmatch(value):
                raise CandidateError(f"extension {name} has a value that is not VCHARs")
            if name in ("raddr", "rport"):
                raise CandidateError(f"{name} must come right after the candidate type")
            if name in ("tcptype", "generation", "ufrag", "network-id", "network-cost"):
                if name in known:
                    raise CandidateError(f"extension {name} is repeated")
                known[name] = value
            else:
                extensions.append((name, value))

        tcptype: TcpType | None = None
        if "tcptype" in known:
            try:
                tcptype = TcpType(known["tcptype"])
            except ValueError:
                raise CandidateError(f"unknown tcptype {known['tcptype']!r}") from None
        if protocol is TransportProtocol.TCP and tcptype is None:
            raise CandidateError("a TCP candidate needs a tcptype (RFC 6544 §4.5)")
        if protocol is TransportProtocol.UDP and tcptype is not None:
            raise CandidateError("tcptype on a UDP candidate")
        ufrag = known.get("ufrag")
        if ufrag is not None and not is_ice_chars(ufrag):
            raise CandidateError(f"ufrag {ufrag!r} is not ice-chars")

        def optional_int(name: str) -> int | None:
            value = known.get(name)
            return None if value is None else _parse_int(value, name, 0, 2**32 - 1)

        return cls(
            foundation=foundation,
            component=component_id,
            transport=protocol,
            priority=priority_value,
            address=ip,
            port=port_value,
            type=kind,
            related_address=related_address,
            related_port=related_port,
            tcptype=tcptype,
            generation=optional_int("generation"),
            ufrag=ufrag,
            network_id=optional_int("network-id"),
            network_cost=optional_int("network-cost"),
            extensions=tuple(extensions),
        )


# --- priorities (RFC 8445 §5.1.2) ---------------------------------------------------------


def candidate_priority(
    candidate_type: CandidateType, local_pref: int, component: int, *, type_pref: int | None = None
) -> int:
    """RFC 8445 §5.1.2.1: ``2^24·type-pref + 2^8·local-pref + (256 - component)``."""
    if type_pref is None:
        type_pref = TYPE_PREFERENCES[candidate_type]
    if not 0 <= type_pref <= 126:
        raise ValueError("type preference must be 0-126")
    if not 0 <= local_pref <= 0xFFFF:
        raise ValueError("local preference must be 0-65535")
    if not 1 <= component <= MAX_COMPONENT:
        raise ValueError(f"component must be 1-{MAX_COMPONENT}")
    return (type_pref << 24) + (local_pref << 8) + (256 - component)


# RFC 6544 §4.2 direction preferences: for host and relayed candidates active connections
# are the most likely to work; behind a NAT (reflexive candidates) simultaneous open is.
_DIRECTION_HOST = {TcpType.ACTIVE: 6, TcpType.PASSIVE: 4, TcpType.SIMULTANEOUS_OPEN: 2}
_DIRECTION_NAT = {TcpType.SIMULTANEOUS_OPEN: 6, TcpType.ACTIVE: 4, TcpType.PASSIVE: 2}


def local_preference(
    ip: str,
    *,
    interface_rank: int = 0,
    address_rank: int = 0,
    prefer_ipv6: bool = True,
    transport: TransportProtocol = TransportProtocol.UDP,
    tcptype: TcpType | None = None,
    candidate_type: CandidateType = CandidateType.HOST,
) -> int:
    """RFC 8445 §5.1.2.1 local preference (0-65535) of a candidate on ``ip``.

    ``interface_rank`` orders interfaces (0 = most preferred), ``address_rank`` addresses
    of one family on one interface. RFC 8421 §4: the families are interleaved rather than
    one ranked wholesale above the other, so the order is interface 0 preferred family,
    interface 0 other family, interface 1 preferred family, ... -- a dual-stack host tries
    IPv4 early even when IPv6 is preferred. TCP candidates use RFC 6544 §4.2:
    ``2^13·direction-pref + other-pref`` with the same ordering in the 13 low bits.
    """
    if interface_rank < 0 or address_rank < 0:
        raise ValueError("ranks are >= 0")
    family_slot = 0 if (":" in ip) == prefer_ipv6 else 1
    slot = min(2 * interface_rank + family_slot, 255)
    other = max(0, 0xFFFF - slot * 256 - min(address_rank, 255))
    if transport is TransportProtocol.UDP:
        return other
    if tcptype is None:
        raise ValueError("a TCP candidate needs a tcptype")
    table = (
        _DIRECTION_NAT
        if candidate_type in (CandidateType.SERVER_REFLEXIVE, CandidateType.PEER_REFLEXIVE)
        else _DIRECTION_HOST
    )
    return (table[tcptype] << 13) + (other >> 3)


# --- foundations (RFC 8445 §5.1.1.3) -------------------------------------------------------


class FoundationAllocator:
    """Hands out foundations: equal for candidates that share type, base IP, server IP
    (for reflexive and relayed ones) and transport, different otherwise (§5.1.1.3).

    Foundations are short counters ("1", "2", ...) rather than hashes of addresses, so they
    reveal nothing about the host addresses an mDNS candidate hides.
    """

    def __init__(self, prefix: str = "") -> None:
        if prefix and not is_ice_chars(prefix):
            raise ValueError("prefix must be ice-chars")
        self._prefix = prefix
        self._ids: dict[tuple[str, str, str, str | None], str] = {}

    def foundation(
        self,
        candidate_type: CandidateType,
        base_ip: str,
        transport: TransportProtocol = TransportProtocol.UDP,
        server_ip: str | None = None,
    ) -> str:
        key = (candidate_type.value, base_ip, transport.value, server_ip)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = f"{self._prefix}{len(self._ids) + 1}"
        return found


# --- redundancy (RFC 8445 §5.1.3) ----------------------------------------------------------


def is_redundant(
    candidate: Candidate, base: Address, others: Iterable[tuple[Candidate, Address]]
) -> bool:
    """RFC 8445 §5.1.3: a candidate is redundant if another one with the same transport
    address and base has a higher (or equal) priority -- e.g. a server-reflexive candidate
    of a host that is not behind a NAT, equal to its host candidate."""
    return any(
        other.component == candidate.component
        and other.transport is candidate.transport
        and other.transport_address == candidate.transport_address
        and other_base == base
        and other.priority >= candidate.priority
        for other, other_base in others
    )
