"""Multicast DNS ``.local`` names for ICE host candidates (RFC 6762,
draft-ietf-mmusic-mdns-ice-candidates), sans-I/O.

:mod:`~tsunagu.mdns.dns` is the strict DNS message codec, :mod:`~tsunagu.mdns.responder`
the core that registers, announces, answers and resolves names, and
:mod:`~tsunagu.mdns.events` its events. :mod:`tsunagu.aio.mdns` drives it over a real
multicast socket.
"""

from tsunagu.mdns.dns import DnsDecodeError, DnsEncodeError, DnsMessage, canonical_name
from tsunagu.mdns.events import MdnsEvent, NameResolved, NameUnresolved
from tsunagu.mdns.responder import (
    IPV4_DESTINATION,
    IPV6_DESTINATION,
    MDNS_PORT,
    MdnsConfig,
    MdnsResponder,
    MdnsStats,
    Transmit,
    unusable_address,
)

__all__ = [
    "IPV4_DESTINATION",
    "IPV6_DESTINATION",
    "MDNS_PORT",
    "DnsDecodeError",
    "DnsEncodeError",
    "DnsMessage",
    "MdnsConfig",
    "MdnsEvent",
    "MdnsResponder",
    "MdnsStats",
    "NameResolved",
    "NameUnresolved",
    "Transmit",
    "canonical_name",
    "unusable_address",
]
