"""Simulated UDP sockets: ``sendto`` and a receive callback (or queue)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tsunagu.sim.clock import SimulationError
from tsunagu.sim.packet import Address, Packet, Proto, is_ipv6, normalize_ip

if TYPE_CHECKING:
    from tsunagu.sim.node import Host

__all__ = ["MAX_UDP_PAYLOAD", "Datagram", "SimUdpSocket"]

MAX_UDP_PAYLOAD = 65507
"""The largest UDP payload in one IPv4 datagram (65535 - 20 - 8)."""


@dataclass(frozen=True, slots=True)
class Datagram:
    """A datagram received: from ``remote`` to ``local`` -- the address it was sent to,
    which for a wildcard socket names the interface address (as IP_PKTINFO tells)."""

    data: bytes
    remote: Address
    local: Address
    time: float


class SimUdpSocket:
    """A UDP socket of a :class:`~tsunagu.sim.node.Host`.

    Incoming datagrams go to :attr:`on_datagram` if set, else into :attr:`received`.
    """

    def __init__(self, host: Host, ip: str, port: int) -> None:
        self.host = host
        self.local: Address = (ip, port)
        self.on_datagram: Callable[[Datagram], None] | None = None
        self.received: deque[Datagram] = deque()
        self.closed = False

    def __repr__(self) -> str:
        return f"<SimUdpSocket {self.host.name} {self.local[0]}:{self.local[1]}>"

    @property
    def port(self) -> int:
        return self.local[1]

    @property
    def is_wildcard(self) -> bool:
        return self.local[0] in ("0.0.0.0", "::")

    def sendto(self, data: bytes, remote: Address, *, source_ip: str | None = None) -> None:
        """Send ``data`` to ``remote``. A wildcard socket sends from ``source_ip`` if given
        (one of the host's addresses), else from the outgoing interface's address."""
        if self.closed:
            raise SimulationError("sendto on a closed socket")
        if len(data) > MAX_UDP_PAYLOAD:
            raise SimulationError(f"a UDP payload is at most {MAX_UDP_PAYLOAD} bytes")
        remote_ip = normalize_ip(remote[0])
        if not 0 < remote[1] <= 65535:
            raise SimulationError(f"bad destination port {remote[1]}")
        v6 = is_ipv6(remote_ip)
        ip = self.local[0]
        if self.is_wildcard:
            if is_ipv6(ip) != v6:
                raise SimulationError(f"{self!r} cannot send to {remote_ip}")
            if source_ip is not None:
                ip = normalize_ip(source_ip)
                if not self.host.owns(ip):
                    raise SimulationError(f"{self.host.name} has no address {ip}")
            else:
                chosen = self.host.source_for(remote_ip)
                if chosen is None:
                    self.host.net.drop(self.host.name, self._packet(ip, remote, data), "no-route")
                    return
                ip = chosen
        if is_ipv6(ip) != v6:
            raise SimulationError(f"{self!r} cannot send to {remote_ip}")
        self.host.send_packet(self._packet(ip, (remote_ip, remote[1]), data))

    def _packet(self, ip: str, remote: Address, data: bytes) -> Packet:
        return Packet(Proto.UDP, (ip, self.local[1]), remote, bytes(data))

    def deliver(self, packet: Packet) -> None:
        """Hand an arrived datagram to the application (called by the host)."""
        datagram = Datagram(packet.payload, packet.src, packet.dst, self.host.net.clock.now)
        if self.on_datagram is not None:
            self.on_datagram(datagram)
        else:
            self.received.append(datagram)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.host._udp_closed(self)
