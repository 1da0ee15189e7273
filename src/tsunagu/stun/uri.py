"""STUN and TURN server URIs: ``stun:``/``stuns:`` (RFC 7064) and ``turn:``/``turns:``
(RFC 7065), parsed into one frozen :class:`StunUri`.

The grammar (RFC 7064 §3.1, RFC 7065 §3.1, host and port from RFC 3986 §3.2.2-3.2.3)::

    stunURI   = scheme ":" host [ ":" port ]               ; scheme = "stun" / "stuns"
    turnURI   = scheme ":" host [ ":" port ]
                [ "?transport=" transport ]                ; scheme = "turn" / "turns"
    transport = "udp" / "tcp" / transport-ext
    host      = IP-literal / IPv4address / reg-name

There is no ``//`` authority marker, no user information and no path. Defaults: port 3478
for ``stun:``/``turn:`` and 5349 for the secure schemes (RFC 7064 §3.2, RFC 7065 §3.2,
RFC 8489 §18.6); transport UDP for ``stun:``/``turn:`` and TCP (that is, TLS over TCP) for
``stuns:``/``turns:``. ``turns:...?transport=udp`` is DTLS (RFC 7350); it parses, and the
client that cannot speak DTLS says so. Scheme, host name and transport are case-insensitive
(RFC 3986 §3.1, §3.2.2) and kept in lower case.

Host names are checked as DNS names (RFC 1123 §2.1 labels) rather than RFC 3986's looser
reg-name: a percent-encoded or otherwise odd name cannot be resolved anyway, and saying so
when the URI is parsed beats a resolver error later. IPv6 literals may carry an RFC 6874
zone (``[fe80::1%25eth0]``), kept as ``fe80::1%eth0``, the form socket calls accept.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal, cast

from tsunagu.errors import TsunaguError
from tsunagu.stun.constants import DEFAULT_PORT, DEFAULT_TLS_PORT

__all__ = ["Scheme", "StunUri", "StunUriError", "Transport"]

Scheme = Literal["stun", "stuns", "turn", "turns"]
Transport = Literal["udp", "tcp"]

_SCHEMES: tuple[Scheme, ...] = ("stun", "stuns", "turn", "turns")
# RFC 1123 §2.1: letters, digits and hyphens, not starting or ending with a hyphen, at most
# 63 characters. Underscores are tolerated: they appear in real (SRV-style) names.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_DIGITS = re.compile(r"[0-9]+")
# RFC 3986 §2.3 unreserved characters: what RFC 7065's transport-ext may contain.
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]+")
_MAX_NAME = 253  # RFC 1035 §2.3.4, written without the trailing dot


class StunUriError(TsunaguError, ValueError):
    """A text that is not a well-formed STUN/TURN URI; the message says what is wrong."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"invalid STUN/TURN URI {text!r}: {problem}")
        self.text = text
        self.problem = problem


@dataclass(frozen=True, slots=True)
class StunUri:
    """A parsed ``stun:``, ``stuns:``, ``turn:`` or ``turns:`` URI.

    ``host`` is a lower-case DNS name or an IP literal without brackets; ``port`` and
    ``transport`` are always set, to the scheme's defaults when the URI leaves them out.
    """

    scheme: Scheme
    host: str
    port: int
    transport: Transport

    def __post_init__(self) -> None:
        # Direct construction gets the same checks as parse(), so every StunUri is valid.
        if self.scheme not in _SCHEMES:
            raise StunUriError(str(self.scheme), f"unknown scheme {self.scheme!r}")
        if not 1 <= self.port <= 65535:
            raise StunUriError(self.host, f"port {self.port} outside 1-65535")
        if self.transport not in ("udp", "tcp"):
            raise StunUriError(self.host, f"transport {self.transport!r} is not udp or tcp")
        if self.scheme in ("stun", "stuns") and self.transport != _default_transport(self.scheme):
            raise StunUriError(self.host, f"{self.scheme}: URIs have no transport choice")
        _check_host(self.host, self.host)

    # -- parsing --------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> StunUri:
        """Parse ``text``; raises :class:`StunUriError` (a ValueError) if it is malformed."""
        if not isinstance(text, str):
            raise StunUriError(repr(text), "a URI is a string")
        stripped = text.strip()
        scheme_text, colon, rest = stripped.partition(":")
        scheme = scheme_text.lower()
        if not colon or scheme not in _SCHEMES:
            raise StunUriError(text, "expected stun:, stuns:, turn: or turns: followed by a host")
        if rest.startswith("//"):
            # RFC 7064 §3.1 / RFC 7065 §3.1 have no authority marker (unlike http://).
            raise StunUriError(text, f"write {scheme}:HOST[:PORT], without '//'")
        authority, question, query = rest.partition("?")
        if "@" in authority:
            raise StunUriError(text, "user information is not allowed (RFC 7064 §3.1)")
        if "/" in authority or "#" in authority:
            raise StunUriError(text, "a STUN/TURN URI has no path or fragment")
        host, port = _split_host_port(text, authority)
        transport = _default_transport(scheme)
        if question:
            transport = _parse_query(text, scheme, query)
        return cls(scheme, host, port if port is not None else _default_port(scheme), transport)

    # -- views ----------------------------------------------------------------------------

    @property
    def secure(self) -> bool:
        """``stuns:``/``turns:``: TLS over TCP (or DTLS over UDP, RFC 7350)."""
        return self.scheme in ("stuns", "turns")

    @property
    def is_turn(self) -> bool:
        return self.scheme in ("turn", "turns")

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``; the host may still be a DNS name to resolve."""
        return (self.host, self.port)

    @property
    def is_ip_literal(self) -> bool:
        return _ip_literal(self.host) is not None

    @property
    def netloc(self) -> str:
        """``host:port`` with IPv6 literals in brackets (and a zone as RFC 6874 ``%25``)."""
        host = self.host
        if ":" in host:
            host = "[" + host.replace("%", "%25") + "]"
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        """The URI with its port always written and ``?transport=`` when it is not the
        scheme's default: ``StunUri.parse(str(uri)) == uri``."""
        text = f"{self.scheme}:{self.netloc}"
        if self.is_turn and self.transport != _default_transport(self.scheme):
            text += f"?transport={self.transport}"
        return text


# -- helpers ----------------------------------------------------------------------------------


def _default_port(scheme: str) -> int:
    # RFC 7064 §3.2 / RFC 7065 §3.2: 3478 for plain, 5349 for TLS.
    return DEFAULT_TLS_PORT if scheme in ("stuns", "turns") else DEFAULT_PORT


def _default_transport(scheme: str) -> Transport:
    # RFC 7065 §3.2: turns: without a transport means TLS over TCP; turn: means UDP.
    # RFC 7064: stuns: is STUN over TLS (TCP); stun: over UDP.
    return "tcp" if scheme in ("stuns", "turns") else "udp"


def _split_host_port(text: str, authority: str) -> tuple[str, int | None]:
    if not authority:
        raise StunUriError(text, "missing host")
    port_text: str | None = None
    if authority.startswith("["):
        # RFC 3986 §3.2.2 IP-literal.
        literal, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise StunUriError(text, "unterminated '[' in an IPv6 literal")
        if after:
            if not after.startswith(":"):
                raise StunUriError(text, f"unexpected {after!r} after the IPv6 literal")
            port_text = after[1:]
        host = _ipv6_literal(text, literal)
    else:
        if authority.count(":") > 1:
            raise StunUriError(text, "IPv6 addresses must be written in brackets, e.g. [::1]")
        host, colon, port_text_ = authority.partition(":")
        if colon:
            port_text = port_text_
        host = host.lower()
        _check_host(text, host)
    port: int | None = None
    # RFC 3986 §3.2.3 allows an empty port ("host:"), which means the default.
    if port_text:
        if not _DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise StunUriError(text, f"port {port_text!r} is not a number in 1-65535")
        port = int(port_text)
    return host, port


def _ipv6_literal(text: str, literal: str) -> str:
    address, percent, zone = literal.partition("%")
    if percent:
        # RFC 6874 §2: the zone delimiter is written "%25".
        if not zone.startswith("25") or len(zone) == 2:
            raise StunUriError(text, "an IPv6 zone is written %25ZONE (RFC 6874)")
        zone = zone[2:]
        if not _UNRESERVED.fullmatch(zone):
            raise StunUriError(text, f"bad IPv6 zone {zone!r}")
    if literal.lower().startswith("v"):
        raise StunUriError(text, "IPvFuture literals are not supported")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        raise StunUriError(text, f"{address!r} is not an IPv6 address") from None
    return f"{parsed}%{zone}" if percent else str(parsed)


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_host(text: str, host: str) -> None:
    """An IPv4 dotted quad, an IPv6 literal (already unbracketed), or a DNS name."""
    if not host:
        raise StunUriError(text, "missing host")
    if ":" in host:
        if _ip_literal(host) is None:
            raise StunUriError(text, f"{host!r} is not an IPv6 address")
        return
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name's root dot
    labels = name.split(".")
    if all(_DIGITS.fullmatch(label) for label in labels):
        # All-numeric: RFC 3986 §3.2.2 reads it as IPv4address, and 1.2.3.999 is no name.
        if len(labels) != 4 or _ip_literal(name) is None:
            raise StunUriError(text, f"{host!r} is not an IPv4 address")
        return
    if len(name) > _MAX_NAME:
        raise StunUriError(text, "host name longer than 253 characters")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise StunUriError(
                text,
                f"{host!r} is not a valid host name (letters, digits and '-' in labels of "
                "1-63 characters)",
            )


def _parse_query(text: str, scheme: Scheme, query: str) -> Transport:
    if scheme in ("stun", "stuns"):
        raise StunUriError(text, f"{scheme}: URIs take no query (RFC 7064 §3.1)")
    key, equals, value = query.partition("=")
    if key.lower() != "transport" or not equals:
        raise StunUriError(text, "the only query a TURN URI takes is ?transport=udp|tcp")
    value = value.lower()
    if value in ("udp", "tcp"):
        return cast(Transport, value)
    if not value:
        raise StunUriError(text, "empty transport")
    if _UNRESERVED.fullmatch(value):
        # RFC 7065 §3.1 transport-ext: syntactically fine, but nothing we can speak.
        raise StunUriError(text, f"unsupported transport {value!r} (use udp or tcp)")
    raise StunUriError(text, f"malformed transport {value!r}")
