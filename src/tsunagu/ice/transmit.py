"""The datagrams the ICE agent core asks its driver to send."""

from __future__ import annotations

from dataclasses import dataclass

from tsunagu.ice.candidate import Address, TransportProtocol

__all__ = ["Transmit"]


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``data`` from the local base ``local`` to ``remote``.

    ``local`` is the base of a local candidate: a host address the driver has a socket
    on, or a relayed address, for which the driver sends through its TURN client. TCP
    transmits (RFC 6544) are whole STUN messages or data frames the driver frames with
    RFC 4571 on the connection between ``local`` and ``remote``.
    """

    data: bytes
    local: Address
    remote: Address
    transport: TransportProtocol = TransportProtocol.UDP
