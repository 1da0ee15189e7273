"""The 5-tuple (RFC 8656 §2) and what the core asks its driver to send."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

Address = tuple[str, int]
"""A transport address: (IP literal, port), IPv6 without brackets -- as in tsunagu.stun."""


class Transport(Enum):
    """The client-to-server transport of a 5-tuple (RFC 8656 §3.1)."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"

    # Members are singletons compared by identity, so the identity hash agrees with ==; it
    # is computed in C, where Enum's (hash of the name) runs Python code, and every lookup
    # of an allocation by its FiveTuple hashes one.
    __hash__ = object.__hash__

    @property
    def is_stream(self) -> bool:
        """TCP and TLS carry a byte stream: ChannelData is padded (RFC 8656 §12.5)."""
        return self is not Transport.UDP


class FiveTuple(NamedTuple):
    """Client address, server address and transport: identifies an allocation (§2)."""

    transport: Transport
    client: Address
    server: Address


class Transmit(NamedTuple):
    """A datagram (or stream frame) for the driver to send.

    ``transport`` and ``local`` name the socket: a listening socket (UDP), a client
    connection (TCP/TLS, together with ``remote``) or a relay socket (UDP, ``local`` being
    the address the relay socket is bound to). ``dont_fragment`` asks for the IP DF bit
    (RFC 8656 §14, only ever set towards peers).

    A NamedTuple, like :class:`FiveTuple`: immutable, and built for every response the
    server sends at less than half the cost of a frozen dataclass.
    """

    transport: Transport
    local: Address
    remote: Address
    data: bytes
    dont_fragment: bool = False
