"""The simulated network: LANs (links) that carry packets with latency, jitter, loss and an
MTU, and the :class:`Network` that owns the virtual clock, the seeded random source, the
trace, and builders for hosts, routers and NATs.

Topology model. A :class:`Lan` is one broadcast segment (a link is a LAN with two
interfaces). Each node interface on it holds addresses; a packet sent on a LAN towards a
next hop is delivered to the interface that owns that address, or -- for prefixes that sit
behind a router on the LAN -- to the router the LAN has a route for (the way a routing
protocol would have told everyone). "The internet" is simply a LAN whose subnets are
``0.0.0.0/0`` and ``::/0``: every public address is on-link there, private ones are owned by
nobody and so unreachable.

Randomness: the network draws from one injected :class:`random.Random`; every component
(LAN jitter and loss, host ephemeral ports and TCP sequence numbers, NAT port choice) gets
its own generator seeded from it when it is created, so the same seed and the same build
order give the same run, and traffic on one LAN does not shift the ports a NAT picks.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tsunagu.sim.clock import Scheduler, SimulationError
from tsunagu.sim.nat import Nat, NatConfig
from tsunagu.sim.node import Host, Interface, Node, Router
from tsunagu.sim.packet import Packet, normalize_ip

__all__ = ["ANYWHERE", "IPNetwork", "Lan", "Network", "TraceEntry"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ANYWHERE: tuple[str, ...] = ("0.0.0.0/0", "::/0")
"""The subnets of an "internet" LAN: every address is on-link."""


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One thing that happened to a packet: ``send`` (put on a LAN), ``deliver`` (arrived
    at an interface), ``drop`` (with a reason), ``nat-out``/``nat-in``/``hairpin`` (a NAT
    rewrote it; ``packet`` is the rewritten packet)."""

    time: float
    event: str
    where: str
    packet: str
    reason: str = ""

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.time:12.6f} {self.event:8} {self.where:12} {self.packet}{reason}"


class Lan:
    """A broadcast segment with one-way ``latency`` (s), uniform ``jitter`` (s, added on
    top), independent ``loss`` probability and ``mtu`` (bytes at the IP layer; a larger
    packet is dropped, as with DF set and no one to tell)."""

    def __init__(
        self,
        net: Network,
        name: str,
        subnets: Sequence[str],
        *,
        latency: float,
        jitter: float,
        loss: float,
        mtu: int,
    ) -> None:
        if latency < 0 or jitter < 0:
            raise SimulationError("latency and jitter must be >= 0")
        if not 0.0 <= loss <= 1.0:
            raise SimulationError("loss is a probability in [0, 1]")
        if mtu < 68:  # RFC 791: every IPv4 link carries at least 68 bytes
            raise SimulationError("mtu must be at least 68")
        self.net = net
        self.name = name
        self.subnets: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(subnet, strict=False) for subnet in subnets
        )
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.mtu = mtu
        self.interfaces: list[Interface] = []
        self._owners: dict[str, Interface] = {}
        self._routes: list[tuple[IPNetwork, str]] = []
        self._gateways: dict[int, str] = {}
        self._rng = net.derive_rng()

    def __repr__(self) -> str:
        return f"<Lan {self.name} {', '.join(map(str, self.subnets))}>"

    # -- addressing -----------------------------------------------------------------------

    def contains(self, ip: str) -> bool:
        """Whether ``ip`` is on-link here."""
        address = ipaddress.ip_address(ip)
        return any(address in subnet for subnet in self.subnets)

    def attach(self, interface: Interface) -> None:
        """Register an interface and its addresses (called by :meth:`Node.add_interface`)."""
        for ip in interface.addresses:
            if not self.contains(ip):
                raise SimulationError(f"{ip} is not in {self.name}'s subnets")
            if ip in self._owners:
                raise SimulationError(f"{ip} is already used on {self.name}")
        for ip in interface.addresses:
            self._owners[ip] = interface
        self.interfaces.append(interface)

    def add_address(self, interface: Interface, ip: str) -> None:
        if ip in self._owners:
            raise SimulationError(f"{ip} is already used on {self.name}")
        self._owners[ip] = interface

    def owner(self, ip: str) -> Interface | None:
        return self._owners.get(ip)

    def add_route(self, prefix: str, via: str) -> None:
        """Tell the LAN that ``prefix`` lies behind the interface owning ``via``."""
        self._routes.append((ipaddress.ip_network(prefix, strict=False), normalize_ip(via)))
        self._routes.sort(key=lambda route: route[0].prefixlen, reverse=True)

    def gateway(self, version: int) -> str | None:
        """The default gateway hosts attached later get, for IP ``version`` 4 or 6."""
        return self._gateways.get(version)

    def set_gateway(self, ip: str) -> None:
        ip = normalize_ip(ip)
        self._gateways[ipaddress.ip_address(ip).version] = ip

    def _resolve(self, next_hop: str) -> Interface | None:
        interface = self._owners.get(next_hop)
        if interface is not None:
            return interface
        if self._routes:
            address = ipaddress.ip_address(next_hop)
            for network, via in self._routes:
                if address.version == network.version and address in network:
                    return self._owners.get(via)
        return None

    # -- carrying packets -----------------------------------------------------------------

    def transmit(self, packet: Packet, sender: Interface, next_hop: str) -> None:
        """Carry ``packet`` from ``sender`` to whoever answers for ``next_hop`` here."""
        net = self.net
        if packet.size > self.mtu:
            net.drop(self.name, packet, "mtu", f"{packet.size} > {self.mtu}")
            return
        if self.loss and self._rng.random() < self.loss:
            net.drop(self.name, packet, "loss")
            return
        target = self._resolve(next_hop)
        if target is None:
            net.drop(self.name, packet, "unreachable", f"nobody has {next_hop}")
            return
        delay = self.latency
        if self.jitter:
            delay += self._rng.random() * self.jitter
        net.record("send", self.name, packet)
        net.clock.call_later(delay, lambda: self._deliver(packet, target))

    def _deliver(self, packet: Packet, target: Interface) -> None:
        self.net.record("deliver", target.node.name, packet)
        target.node.receive(packet, target)


class Network:
    """A whole simulated network: clock, randomness, trace, LANs and nodes.

    ``rng`` is the one source of randomness (default: ``random.Random(seed)``). With
    ``trace=True`` every send, delivery, drop and NAT rewrite is appended to
    :attr:`trace`; drops are always counted by reason in :attr:`drops`.
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        seed: int = 0,
        trace: bool = False,
        on_trace: Callable[[TraceEntry], None] | None = None,
    ) -> None:
        self.rng = rng if rng is not None else random.Random(seed)
        self.clock = Scheduler()
        self.trace: list[TraceEntry] | None = [] if trace else None
        self.on_trace = on_trace
        self.drops: Counter[str] = Counter()
        self.lans: dict[str, Lan] = {}
        self.nodes: dict[str, Node] = {}

    @property
    def now(self) -> float:
        return self.clock.now

    def derive_rng(self) -> random.Random:
        """A generator of its own for a new component, seeded from the network's."""
        return random.Random(self.rng.getrandbits(64))

    # -- trace ----------------------------------------------------------------------------

    def record(self, event: str, where: str, packet: Packet, reason: str = "") -> None:
        if self.trace is None and self.on_trace is None:
            return
        entry = TraceEntry(self.clock.now, event, where, packet.summary(), reason)
        if self.trace is not None:
            self.trace.append(entry)
        if self.on_trace is not None:
            self.on_trace(entry)

    def drop(self, where: str, packet: Packet, reason: str, detail: str = "") -> None:
        """Count a packet that goes no further under ``reason`` (a short code: ``mtu``,
        ``loss``, ``unreachable``, ``no-route``, ``port-unreachable``, ``not-local``,
        ``tcp-reset``, ``to-router``, ``ttl``, ``udp-blocked``, ``no-mapping``,
        ``filtered``, ``hairpinning-off``, ``not-public``, ``no-port``, ``malformed``),
        and trace it."""
        self.drops[reason] += 1
        self.record("drop", where, packet, f"{reason}: {detail}" if detail else reason)

    # -- running --------------------------------------------------------------------------

    def run(self, until: float | None = None) -> int:
        """Run the clock (see :meth:`Scheduler.run`)."""
        return self.clock.run(until)

    def run_for(self, duration: float) -> int:
        return self.clock.run_for(duration)

    def run_until(self, predicate: Callable[[], bool], *, timeout: float) -> bool:
        return self.clock.run_until(predicate, timeout=timeout)

    # -- building -------------------------------------------------------------------------

    def _register(self, name: str) -> None:
        if name in self.nodes or name in self.lans:
            raise SimulationError(f"the name {name!r} is taken")

    def add_lan(
        self,
        name: str,
        subnets: str | Sequence[str] = ANYWHERE,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        loss: float = 0.0,
        mtu: int = 1500,
    ) -> Lan:
        """A LAN (or link) over ``subnets``; the default is an "internet" LAN on which
        every address is on-link."""
        self._register(name)
        lan = Lan(
            self,
            name,
            (subnets,) if isinstance(subnets, str) else subnets,
            latency=latency,
            jitter=jitter,
            loss=loss,
            mtu=mtu,
        )
        self.lans[name] = lan
        return lan

    def add_host(
        self,
        name: str,
        lan: Lan,
        addresses: str | Sequence[str],
        *,
        gateway: str | Sequence[str] | None = None,
    ) -> Host:
        """A host with one interface on ``lan``. Its default route goes to ``gateway``
        (one per IP version), else to the LAN's gateway, else nowhere but on-link."""
        self._register(name)
        host = Host(self, name)
        interface = host.add_interface(lan, addresses)
        host.add_default_routes(interface, gateway)
        self.nodes[name] = host
        return host

    def add_router(
        self,
        name: str,
        attachments: Sequence[tuple[Lan, str | Sequence[str]]],
        *,
        upstream: Lan | None = None,
        gateway: str | Sequence[str] | None = None,
        block_udp: bool = False,
    ) -> Router:
        """A router between ``attachments`` (LAN, its addresses there).

        The router's default route goes out on ``upstream`` (default: the first attached
        LAN that is an internet LAN) to ``gateway`` or that LAN's gateway. It becomes the
        gateway of every other attached LAN that has none, and ``upstream`` learns routes to
        their subnets through it. ``block_udp``: forward no UDP at all (a network that
        blocks UDP; TCP still passes).
        """
        self._register(name)
        router = Router(self, name, block_udp=block_udp)
        self._wire(router, attachments, upstream, gateway)
        self.nodes[name] = router
        return router

    def add_nat(
        self,
        name: str,
        *,
        inside: Lan,
        inside_ip: str | Sequence[str],
        outside: Lan,
        public_ips: str | Sequence[str],
        config: NatConfig | None = None,
        gateway: str | Sequence[str] | None = None,
        block_udp: bool = False,
    ) -> Nat:
        """A NAT between ``inside`` and ``outside`` with one or more ``public_ips`` on the
        outside (see :class:`~tsunagu.sim.nat.Nat`). It becomes the inside LAN's gateway;
        ``gateway`` (or the outside LAN's) is where it sends everything else. NATs chain:
        a NAT's outside LAN may be another NAT's inside (CGNAT)."""
        self._register(name)
        nat = Nat(self, name, config if config is not None else NatConfig(), block_udp=block_udp)
        inner = nat.add_interface(inside, inside_ip)
        outer = nat.add_interface(outside, public_ips)
        nat.set_sides(inner, outer)
        # The inside subnets are private: the outside learns no route to them.
        self._wire_gateways(nat, [inner], outer, gateway, announce=False)
        self.nodes[name] = nat
        return nat

    def _wire(
        self,
        router: Router,
        attachments: Sequence[tuple[Lan, str | Sequence[str]]],
        upstream: Lan | None,
        gateway: str | Sequence[str] | None,
    ) -> None:
        interfaces = [router.add_interface(lan, addresses) for lan, addresses in attachments]
        if upstream is None:
            internet = [i for i in interfaces if any(s.prefixlen == 0 for s in i.lan.subnets)]
            up = internet[0] if internet else None
        else:
            matches = [i for i in interfaces if i.lan is upstream]
            if not matches:
                raise SimulationError(f"{router.name} is not attached to {upstream.name}")
            up = matches[0]
        self._wire_gateways(router, [i for i in interfaces if i is not up], up, gateway)

    @staticmethod
    def _wire_gateways(
        router: Router,
        downstream: list[Interface],
        up: Interface | None,
        gateway: str | Sequence[str] | None,
        *,
        announce: bool = True,
    ) -> None:
        for interface in downstream:
            for ip in interface.addresses:
                version = ipaddress.ip_address(ip).version
                if interface.lan.gateway(version) is None:
                    interface.lan.set_gateway(ip)
        if up is None:
            return
        router.add_default_routes(up, gateway)
        if not announce:
            return
        for interface in downstream:
            for subnet in interface.lan.subnets:
                via = up.address(subnet.version)
                if via is not None and subnet.prefixlen > 0:
                    up.lan.add_route(str(subnet), via)
