"""Socket set-up shared by the asyncio drivers."""

from __future__ import annotations

import socket

from tsunagu.stun.attributes import Address

__all__ = ["shared_port_tcp_socket"]


def shared_port_tcp_socket(address: Address) -> socket.socket:
    """A non-blocking TCP socket bound to ``address`` with SO_REUSEADDR and SO_REUSEPORT,
    for a port that a listener and outgoing connections use at once: a TURN relayed
    address under RFC 6062, an ICE simultaneous-open candidate (RFC 6544 §7.2). IPv6
    sockets are IPv6 only."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
