"""The datagrams the ICE agent core asks its driver to send."""

from __future__ import annotations

from typing import NamedTuple

from tsunagu.ice.candidate import Address, TransportProtocol

__all__ = ["Transmit"]


class Transmit(NamedTuple):
    """Send ``data`` from the local base ``local`` to ``remote``.

    ``local`` is the base of a local candidate: a host address the driver has a socket
    on, or a relayed address, for which the driver sends through its TURN client. TCP
    transmits (RFC 6544) go on the TCP connection ``connection`` (an id from
    :class:`~tsunagu.ice.events.TcpConnectRequested` or
    :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_accepted`) and ``data`` is already
    framed with RFC 4571: write it to that stream as it is. A NamedTuple, as the other
    cores' transmits: one is built for every datagram sent.
    """

    data: bytes
    local: Address
    remote: Address
    transport: TransportProtocol = TransportProtocol.UDP
    connection: int | None = None
