"""Nodes of the simulated network: interfaces and routing shared by all, :class:`Host`
(sockets, no forwarding) and :class:`Router` (forwarding, optionally blocking UDP).
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tsunagu.sim.clock import SimulationError
from tsunagu.sim.packet import (
    IPV4_HEADER,
    IPV6_HEADER,
    TCP_HEADER,
    Address,
    Packet,
    Proto,
    TcpFlags,
    TcpHeader,
    is_ipv6,
    normalize_ip,
)
from tsunagu.sim.tcp import SimTcpConnection, SimTcpListener, TcpConfig
from tsunagu.sim.udp import SimUdpSocket

if TYPE_CHECKING:
    from tsunagu.sim.network import IPNetwork, Lan, Network

__all__ = ["Host", "Interface", "Node", "Route", "Router"]

EPHEMERAL_PORTS = (49152, 65535)
"""IANA's dynamic port range (RFC 6335 §6), where hosts pick ports for ``bind(0)``."""

_WILDCARDS = {4: "0.0.0.0", 6: "::"}


def _version(ip: str) -> int:
    return 6 if is_ipv6(ip) else 4


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class Interface:
    """A node's attachment to a LAN, with its addresses there."""

    __slots__ = ("addresses", "lan", "node")

    def __init__(self, node: Node, lan: Lan, addresses: list[str]) -> None:
        self.node = node
        self.lan = lan
        self.addresses = addresses

    def address(self, version: int) -> str | None:
        """The first address of IP ``version`` (4 or 6), if any."""
        for ip in self.addresses:
            if _version(ip) == version:
                return ip
        return None

    def __repr__(self) -> str:
        return f"<Interface {self.node.name}@{self.lan.name} {' '.join(self.addresses)}>"


@dataclass(frozen=True, slots=True)
class Route:
    """``network`` is reached through ``interface``, via ``gateway`` (None: on-link)."""

    network: IPNetwork
    interface: Interface
    gateway: str | None


class Node(ABC):
    """Anything with interfaces and a routing table."""

    def __init__(self, net: Network, name: str) -> None:
        self.net = net
        self.name = name
        self.interfaces: list[Interface] = []
        self.routes: list[Route] = []
        self._addresses: set[str] = set()
        self.rng = net.derive_rng()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @property
    def addresses(self) -> list[str]:
        """Every address of every interface, in the order they were added."""
        return [ip for interface in self.interfaces for ip in interface.addresses]

    def owns(self, ip: str) -> bool:
        return ip in self._addresses

    # -- configuration --------------------------------------------------------------------

    def add_interface(self, lan: Lan, addresses: str | Sequence[str]) -> Interface:
        """Attach to ``lan`` with ``addresses`` (each inside one of the LAN's subnets) and
        add on-link routes for the LAN's subnets of those IP versions."""
        ips = [normalize_ip(ip) for ip in _as_list(addresses)]
        if not ips:
            raise SimulationError(f"{self.name}: an interface needs at least one address")
        interface = Interface(self, lan, ips)
        lan.attach(interface)
        self.interfaces.append(interface)
        self._addresses.update(ips)
        versions = {_version(ip) for ip in ips}
        for subnet in lan.subnets:
            if subnet.version in versions:
                self.add_route(str(subnet), interface, None)
        return interface

    def add_address(self, interface: Interface, ip: str) -> None:
        """Give ``interface`` one more address."""
        ip = normalize_ip(ip)
        if not interface.lan.contains(ip):
            raise SimulationError(f"{ip} is not in {interface.lan.name}'s subnets")
        interface.lan.add_address(interface, ip)
        interface.addresses.append(ip)
        self._addresses.add(ip)

    def add_route(self, prefix: str, interface: Interface, gateway: str | None) -> None:
        route = Route(
            ipaddress.ip_network(prefix, strict=False),
            interface,
            None if gateway is None else normalize_ip(gateway),
        )
        self.routes.append(route)
        # Longest prefix first; among equals, the older route wins (stable sort).
        self.routes.sort(key=lambda r: r.network.prefixlen, reverse=True)

    def add_default_routes(
        self, interface: Interface, gateway: str | Sequence[str] | None = None
    ) -> None:
        """Default routes out of ``interface``: to the given gateways (per IP version), else
        to the LAN's gateway; none where the LAN already puts everything on-link."""
        explicit = {_version(ip): normalize_ip(ip) for ip in _as_list(gateway)}
        for version in sorted({_version(ip) for ip in interface.addresses}):
            if any(s.version == version and s.prefixlen == 0 for s in interface.lan.subnets):
                continue
            via = explicit.get(version, interface.lan.gateway(version))
            if via is None or self.owns(via):
                continue
            self.add_route("0.0.0.0/0" if version == 4 else "::/0", interface, via)

    # -- routing --------------------------------------------------------------------------

    def route(self, ip: str) -> tuple[Interface, str] | None:
        """(outgoing interface, next-hop address) for destination ``ip``, or None."""
        address = ipaddress.ip_address(ip)
        for route in self.routes:
            if route.network.version == address.version and address in route.network:
                return route.interface, route.gateway if route.gateway is not None else ip
        return None

    def source_for(self, ip: str) -> str | None:
        """The source address to use towards ``ip`` (the outgoing interface's)."""
        found = self.route(ip)
        if found is None:
            return None
        return found[0].address(_version(ip))

    def output(self, packet: Packet) -> bool:
        """Route ``packet`` and put it on the outgoing LAN; False (and a drop) if there
        is no route."""
        found = self.route(packet.dst[0])
        if found is None:
            self.net.drop(self.name, packet, "no-route")
            return False
        interface, next_hop = found
        interface.lan.transmit(packet, interface, next_hop)
        return True

    @abstractmethod
    def receive(self, packet: Packet, interface: Interface | None) -> None:
        """A packet arrived on ``interface`` (None: looped back inside the node)."""


class Host(Node):
    """An end host: UDP sockets, TCP listeners and connections; it forwards nothing."""

    def __init__(self, net: Network, name: str, *, tcp_config: TcpConfig | None = None) -> None:
        super().__init__(net, name)
        self.tcp_config = tcp_config if tcp_config is not None else TcpConfig()
        self._udp: dict[Address, SimUdpSocket] = {}
        self._listeners: dict[Address, SimTcpListener] = {}
        self._connections: dict[tuple[Address, Address], SimTcpConnection] = {}

    # -- sending --------------------------------------------------------------------------

    def send_packet(self, packet: Packet) -> None:
        """Send from this host; a packet to one of its own addresses loops back."""
        if packet.dst[0] in self._addresses:
            self.net.record("loopback", self.name, packet)
            self.net.clock.call_later(0.0, lambda: self.receive(packet, None))
            return
        self.output(packet)

    def receive(self, packet: Packet, interface: Interface | None) -> None:
        if packet.dst[0] not in self._addresses:
            self.net.drop(self.name, packet, "not-local")
            return
        if packet.proto is Proto.UDP:
            socket = self._udp_lookup(packet.dst)
            if socket is None:
                self.net.drop(self.name, packet, "port-unreachable")
                return
            socket.deliver(packet)
        else:
            self._tcp_input(packet)

    # -- ports ----------------------------------------------------------------------------

    def _resolve_bind_ip(self, ip: str | None, port: int) -> str:
        if not 0 <= port <= 65535:
            raise SimulationError(f"bad port {port}")
        if ip is None:
            version = 4 if any(_version(a) == 4 for a in self._addresses) else 6
            return _WILDCARDS[version]
        ip = normalize_ip(ip)
        if ip not in _WILDCARDS.values() and ip not in self._addresses:
            raise SimulationError(f"{self.name} has no address {ip}")
        return ip

    @staticmethod
    def _conflicts(taken: set[Address], ip: str, port: int) -> bool:
        """Whether binding (ip, port) clashes with ``taken`` (no SO_REUSEADDR: a wildcard
        and a specific address of one IP version exclude each other)."""
        if (ip, port) in taken:
            return True
        wildcard = _WILDCARDS[_version(ip)]
        if ip == wildcard:
            return any(p == port and _version(i) == _version(ip) for i, p in taken)
        return (wildcard, port) in taken

    def _pick_port(self, taken: set[Address], ip: str) -> int:
        low, high = EPHEMERAL_PORTS
        for _ in range(64):
            port = self.rng.randint(low, high)
            if not self._conflicts(taken, ip, port):
                return port
        for port in range(low, high + 1):
            if not self._conflicts(taken, ip, port):
                return port
        raise SimulationError(f"{self.name}: no free ephemeral port")

    def bind_udp(self, port: int = 0, ip: str | None = None) -> SimUdpSocket:
        """A UDP socket on ``port`` (0: an ephemeral port drawn from the host's random
        source) and ``ip`` (None: the IPv4 wildcard, or the IPv6 one on an IPv6-only host;
        ``"0.0.0.0"``/``"::"``: that wildcard; else one of the host's addresses)."""
        ip = self._resolve_bind_ip(ip, port)
        taken = set(self._udp)
        if port == 0:
            port = self._pick_port(taken, ip)
        elif self._conflicts(taken, ip, port):
            raise SimulationError(f"{self.name}: UDP {ip} port {port} is in use")
        socket = SimUdpSocket(self, ip, port)
        self._udp[(ip, port)] = socket
        return socket

    def _udp_lookup(self, local: Address) -> SimUdpSocket | None:
        socket = self._udp.get(local)
        if socket is None:
            socket = self._udp.get((_WILDCARDS[_version(local[0])], local[1]))
        return socket

    def _udp_closed(self, socket: SimUdpSocket) -> None:
        if self._udp.get(socket.local) is socket:
            del self._udp[socket.local]

    # -- TCP ------------------------------------------------------------------------------

    def _tcp_taken(self) -> set[Address]:
        taken = set(self._listeners)
        taken.update(local for local, _ in self._connections)
        return taken

    def listen_tcp(self, port: int, ip: str | None = None) -> SimTcpListener:
        """Accept TCP connections on ``port`` (0: ephemeral) of ``ip`` (as
        :meth:`bind_udp`)."""
        ip = self._resolve_bind_ip(ip, port)
        taken = self._tcp_taken()
        if port == 0:
            port = self._pick_port(taken, ip)
        elif self._conflicts(set(self._listeners), ip, port):
            raise SimulationError(f"{self.name}: TCP {ip} port {port} is in use")
        listener = SimTcpListener(self, (ip, port))
        self._listeners[(ip, port)] = listener
        return listener

    def connect_tcp(
        self, remote: Address, *, local_port: int = 0, local_ip: str | None = None
    ) -> SimTcpConnection:
        """Open a TCP connection to ``remote``; the SYN leaves at once. Set the
        connection's callbacks before running the clock."""
        remote = (normalize_ip(remote[0]), remote[1])
        ip = normalize_ip(local_ip) if local_ip is not None else self.source_for(remote[0])
        if ip is None or ip not in self._addresses:
            raise SimulationError(f"{self.name}: no route to {remote[0]}")
        taken = self._tcp_taken()
        if local_port == 0:
            local_port = self._pick_port(taken, ip)
        elif ((ip, local_port), remote) in self._connections:
            raise SimulationError(f"{self.name}: that TCP connection already exists")
        connection = SimTcpConnection(self, (ip, local_port), remote, self._mss_towards(remote))
        self._connections[(connection.local, remote)] = connection
        connection.open()
        return connection

    def _mss_towards(self, remote: Address) -> int:
        headers = (IPV6_HEADER if is_ipv6(remote[0]) else IPV4_HEADER) + TCP_HEADER
        found = self.route(remote[0])
        mtu = found[0].lan.mtu if found is not None else 1500
        return max(mtu - headers, 1)

    def _tcp_forget(self, connection: SimTcpConnection) -> None:
        key = (connection.local, connection.remote)
        if self._connections.get(key) is connection:
            del self._connections[key]

    def _listener_closed(self, listener: SimTcpListener) -> None:
        if self._listeners.get(listener.local) is listener:
            del self._listeners[listener.local]

    def _tcp_input(self, packet: Packet) -> None:
        header = packet.tcp
        if header is None:
            self.net.drop(self.name, packet, "malformed", "tcp packet without header")
            return
        connection = self._connections.get((packet.dst, packet.src))
        if connection is not None:
            connection.segment(header, packet.payload)
            return
        if TcpFlags.RST in header.flags:
            return  # RFC 9293 §3.10.7.1: a reset for no connection is discarded
        if TcpFlags.SYN in header.flags and TcpFlags.ACK not in header.flags:
            listener = self._listeners.get(packet.dst)
            if listener is None:
                listener = self._listeners.get((_WILDCARDS[_version(packet.dst[0])], packet.dst[1]))
            if listener is not None:
                connection = SimTcpConnection(
                    self, packet.dst, packet.src, self._mss_towards(packet.src), listener=listener
                )
                self._connections[(packet.dst, packet.src)] = connection
                connection.accept(header)
                return
        self.net.drop(self.name, packet, "tcp-reset", "no connection; RST sent")
        self._send_reset(packet, header)

    def _send_reset(self, packet: Packet, header: TcpHeader) -> None:
        """RFC 9293 §3.10.7.1: answer a segment for no connection with a reset."""
        if TcpFlags.ACK in header.flags:
            reply = TcpHeader(TcpFlags.RST, header.ack)
        else:
            length = len(packet.payload) + (TcpFlags.SYN in header.flags)
            length += TcpFlags.FIN in header.flags
            reply = TcpHeader(TcpFlags.RST | TcpFlags.ACK, 0, header.seq + length)
        self.send_packet(Packet(Proto.TCP, packet.dst, packet.src, tcp=reply))


class Router(Node):
    """Forwards packets between its interfaces by longest-prefix match, decrementing the
    TTL and clamping the TCP MSS of SYNs to the smaller MTU of the two LANs (as routers
    with ``--clamp-mss-to-pmtu`` do). With ``block_udp`` it forwards no UDP at all: the
    network behind it (or in front of it) only lets TCP through."""

    def __init__(self, net: Network, name: str, *, block_udp: bool = False) -> None:
        super().__init__(net, name)
        self.block_udp = block_udp

    def receive(self, packet: Packet, interface: Interface | None) -> None:
        if packet.dst[0] in self._addresses:
            self.net.drop(self.name, packet, "to-router")
            return
        self.forward(packet, interface)

    def forward(self, packet: Packet, incoming: Interface | None) -> None:
        if packet.ttl <= 1:
            self.net.drop(self.name, packet, "ttl")
            return
        if self.block_udp and packet.proto is Proto.UDP:
            self.net.drop(self.name, packet, "udp-blocked")
            return
        found = self.route(packet.dst[0])
        if found is None:
            self.net.drop(self.name, packet, "no-route")
            return
        interface, next_hop = found
        packet = replace(packet, ttl=packet.ttl - 1)
        header = packet.tcp
        if header is not None and header.mss is not None:
            mtu = interface.lan.mtu
            if incoming is not None:
                mtu = min(mtu, incoming.lan.mtu)
            limit = mtu - (IPV6_HEADER if is_ipv6(packet.dst[0]) else IPV4_HEADER) - TCP_HEADER
            if header.mss > limit:
                packet = replace(packet, tcp=replace(header, mss=limit))
        interface.lan.transmit(packet, interface, next_hop)
