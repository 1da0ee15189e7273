"""A NAT box with the behaviours of RFC 4787 (UDP) and RFC 5382 (TCP), on virtual time.

Mapping (RFC 4787 §4.1) and filtering (§5) are chosen independently -- all nine
combinations -- from :class:`~tsunagu.nat.behavior.MappingBehavior` and
:class:`~tsunagu.nat.behavior.FilteringBehavior`:

- a *mapping* binds an internal endpoint ``X:x`` to an external one ``X1':x1'``. It is
  reused for every destination (endpoint-independent), for destinations with the same IP
  (address-dependent), or only for the same IP and port (address-and-port-dependent);
- *filtering* decides which inbound packets to ``X1':x1'`` get through: from anyone
  (endpoint-independent), from IPs the mapping has sent to (address-dependent), or from
  the exact IP:port it has sent to (address-and-port-dependent).

Also modelled: external IP pooling "paired" or "arbitrary" over several public IPs
(§4.1, REQ-2), port preservation (§4.2.1), ports below 1024 kept below 1024 (REQ-3a), port
parity (REQ-4), the mapping timer with outbound refresh and optional inbound refresh
(§4.3, REQ-5, REQ-6), hairpinning with the external source address (§6, REQ-9), UDP-blocking
(inherited from :class:`~tsunagu.sim.node.Router`), and TCP mappings with RFC 5382's
established and transitory idle timeouts.

Like Linux conntrack, the NAT also remembers *flows*: once an inbound packet from ``R`` has
been admitted through a mapping, the inside host's replies to ``R`` leave through that same
mapping even when the mapping behaviour alone would have chosen (or created) another one.
Without this, an address-dependent mapping with endpoint-independent filtering would
answer an unknown peer from a port the peer never wrote to. The flip side, as on a real
conntrack NAT: state opened by one exchange shows in the next. An RFC 5780 client whose
filtering test II answer (from ``A2:P2``) was let in, and which then runs mapping test III
(to ``A2:P2``) from the same socket, sends a *reply*, and sees test I's mapping again.

An external transport address belongs to one mapping at a time (REQ-3: no "port
overloading"): when port preservation wants a port that is taken -- say the second
mapping of one internal endpoint under address-dependent mapping, with a single public IP
-- another IP of the pool is tried ("arbitrary" pooling) and then a random port.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.sim.node import Interface, Router
from tsunagu.sim.packet import Address, Packet, Proto, is_ipv6

if TYPE_CHECKING:
    from tsunagu.sim.network import Network

__all__ = ["Mapping", "Nat", "NatConfig"]

_SWEEP_INTERVAL = 60.0  # seconds of virtual time between sweeps of dead mappings and flows
_PORT_DRAWS = 64  # random draws before scanning the range for a free port


@dataclass(frozen=True, slots=True)
class NatConfig:
    """Every knob of a simulated NAT, with its default.

    The defaults describe a NAT that follows RFC 4787's MUSTs and the first of its
    RECOMMENDED choices, except where a field says otherwise.
    """

    mapping: MappingBehavior = MappingBehavior.ENDPOINT_INDEPENDENT
    """RFC 4787 §4.1. REQ-1: a NAT MUST have endpoint-independent mapping (the default)."""
    filtering: FilteringBehavior = FilteringBehavior.ENDPOINT_INDEPENDENT
    """RFC 4787 §5. REQ-8: endpoint-independent filtering is RECOMMENDED "if application
    transparency is most important" (the default), address-dependent if security is."""
    port_preservation: bool = False
    """RFC 4787 §4.2.1: try to use the internal port as the external port. Off by default:
    the external port is drawn at random (REQ-3's "no port overloading" holds either way)."""
    hairpinning: bool = True
    """RFC 4787 §6: forward packets from the inside to one of the NAT's own external
    addresses back inside, to the internal endpoint of the active mapping there. REQ-9: a
    NAT MUST support it (the default); REQ-9a: the hairpinned packet carries the sender's
    *external* address as source. Filtering, which guards the mapping against the outside,
    does not apply: §6 asks only for an active mapping, and RFC 5780 §4.5's test (a second
    socket writing to the first one's mapped address) presupposes exactly that."""
    mapping_lifetime: float = 300.0
    """Idle seconds before a UDP mapping expires. REQ-5: MUST NOT be under two minutes (the
    simulation allows shorter, as many deployed NATs do); REQ-5c: five minutes or more is
    RECOMMENDED as default."""
    inbound_refresh: bool = False
    """REQ-6: outbound packets always refresh a mapping; REQ-6a: inbound ones MAY (off by
    default, as RFC 4787 §4.3 explains, so that an outsider cannot keep a mapping open)."""
    pooling: Literal["paired", "arbitrary"] = "paired"
    """RFC 4787 §4.1 IP address pooling over several public IPs: "paired" (REQ-2,
    RECOMMENDED) gives every mapping of an internal IP the same external IP; "arbitrary"
    picks one per mapping."""
    port_parity: bool = False
    """REQ-4: keep the parity of the internal port (RECOMMENDED for RTP/RTCP pairs). Off by
    default: ICE with rtcp-mux has no port pairs, and random ports stay uniform."""
    port_range: tuple[int, int] = (1024, 65535)
    """External ports for internal ports >= 1024; REQ-3a: an internal port below 1024 gets
    an external port below 1024."""
    tcp_established_lifetime: float = 7440.0
    """Idle seconds before a TCP mapping that has carried traffic both ways expires (RFC
    5382 REQ-5: the "established connection idle-timeout" MUST NOT be under 2 h 4 min)."""
    tcp_transitory_lifetime: float = 240.0
    """Idle seconds before a TCP mapping that has seen only outbound traffic expires (RFC
    5382 REQ-5: the "transitory connection idle-timeout" MUST NOT be under 4 min)."""

    def __post_init__(self) -> None:
        # Accept the behaviours' string values too (as `nat-check --json` prints them).
        object.__setattr__(self, "mapping", MappingBehavior(self.mapping))
        object.__setattr__(self, "filtering", FilteringBehavior(self.filtering))
        for name in ("mapping_lifetime", "tcp_established_lifetime", "tcp_transitory_lifetime"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.pooling not in ("paired", "arbitrary"):
            raise ValueError("pooling is 'paired' or 'arbitrary'")
        low, high = self.port_range
        if not 1024 <= low < high <= 65535:
            raise ValueError("port_range must lie within 1024-65535")

    @classmethod
    def from_spec(cls, spec: str, **overrides: Any) -> NatConfig:
        """``"MAPPING/FILTERING"`` with the behaviour names, e.g.
        ``"endpoint-independent/address-and-port-dependent"``, plus any other fields."""
        mapping, sep, filtering = spec.partition("/")
        if not sep:
            raise ValueError(f"expected MAPPING/FILTERING, got {spec!r}")
        return replace(cls(MappingBehavior(mapping), FilteringBehavior(filtering)), **overrides)

    @property
    def spec(self) -> str:
        """``"MAPPING/FILTERING"``, the inverse of :meth:`from_spec`."""
        return f"{self.mapping.value}/{self.filtering.value}"


class Mapping:
    """One NAT binding ``internal`` <-> ``external`` (read it; the NAT owns it)."""

    __slots__ = (
        "alive",
        "created",
        "external",
        "inbound_seen",
        "internal",
        "key",
        "permits",
        "permitted_ips",
        "proto",
        "refreshed",
        "remote",
    )

    def __init__(
        self,
        proto: Proto,
        internal: Address,
        external: Address,
        remote: str | Address | None,
        now: float,
    ) -> None:
        self.proto = proto
        self.internal = internal
        self.external = external
        self.remote = remote
        """What the mapping is specific to: None (endpoint-independent), the remote IP
        (address-dependent) or the remote IP and port (address-and-port-dependent)."""
        self.key: tuple[Proto, Address, str | Address | None] = (proto, internal, remote)
        self.created = now
        self.refreshed = now
        self.permits: set[Address] = set()
        """Remote endpoints this mapping has sent to (address-and-port-dependent filter)."""
        self.permitted_ips: set[str] = set()
        """Remote IPs this mapping has sent to (address-dependent filter)."""
        self.inbound_seen = False
        self.alive = True

    def __repr__(self) -> str:
        return (
            f"<Mapping {self.proto.value} {self.internal[0]}:{self.internal[1]} <-> "
            f"{self.external[0]}:{self.external[1]}>"
        )


FlowKey = tuple[Proto, Address, Address]


class Nat(Router):
    """A NAT router between one inside and one outside interface (see the module doc).

    Build it with :meth:`~tsunagu.sim.network.Network.add_nat`. The outside interface's
    addresses are the public IPs (one or more, IPv4 and/or IPv6 -- a packet is translated
    to a public IP of its own version, or dropped if there is none).
    """

    def __init__(
        self, net: Network, name: str, config: NatConfig, *, block_udp: bool = False
    ) -> None:
        super().__init__(net, name, block_udp=block_udp)
        self.config = config
        self.inside: Interface | None = None
        self.outside: Interface | None = None
        self._mappings: dict[tuple[Proto, Address, str | Address | None], Mapping] = {}
        self._by_external: dict[tuple[Proto, Address], Mapping] = {}
        self._flows: dict[FlowKey, Mapping] = {}
        self._paired: dict[str, str] = {}
        self._next_sweep = 0.0

    def set_sides(self, inside: Interface, outside: Interface) -> None:
        """Name the inside and outside interfaces (called by ``Network.add_nat``)."""
        self.inside = inside
        self.outside = outside

    @property
    def public_ips(self) -> list[str]:
        return list(self.outside.addresses) if self.outside is not None else []

    # -- introspection --------------------------------------------------------------------

    def lifetime(self, mapping: Mapping) -> float:
        """The idle time after which ``mapping`` expires."""
        if mapping.proto is Proto.UDP:
            return self.config.mapping_lifetime
        if mapping.inbound_seen:
            return self.config.tcp_established_lifetime
        return self.config.tcp_transitory_lifetime

    def expires_at(self, mapping: Mapping) -> float:
        return mapping.refreshed + self.lifetime(mapping)

    def mappings(self, proto: Proto | None = None) -> list[Mapping]:
        """The live mappings (of ``proto``, or all), oldest first."""
        now = self.net.clock.now
        live = [m for m in list(self._mappings.values()) if self._alive(m, now)]
        return [m for m in live if proto is None or m.proto is proto]

    # -- packet processing ----------------------------------------------------------------

    def receive(self, packet: Packet, interface: Interface | None) -> None:
        dst_ip = packet.dst[0]
        if interface is not None and interface is self.inside:
            if self.outside is not None and dst_ip in self.outside.addresses:
                self._hairpin(packet, interface)
                return
            if dst_ip in self._addresses:
                self.net.drop(self.name, packet, "to-router")
                return
            found = self.route(dst_ip)
            if found is not None and found[0] is self.outside:
                self._translate_out(packet, interface)
                return
            self.forward(packet, interface)
            return
        if interface is not None and interface is self.outside:
            if dst_ip in self.outside.addresses:
                self._translate_in(packet, interface)
            else:
                # The inside is private: nothing from outside is routed to it directly.
                self.net.drop(self.name, packet, "not-public", "the inside of a NAT is not routed")
            return
        super().receive(packet, interface)

    def _forwardable(self, packet: Packet) -> bool:
        """The checks of :meth:`forward` that must pass before a mapping is created."""
        if packet.ttl <= 1:
            self.net.drop(self.name, packet, "ttl")
            return False
        if self.block_udp and packet.proto is Proto.UDP:
            self.net.drop(self.name, packet, "udp-blocked")
            return False
        return True

    def _translate_out(self, packet: Packet, incoming: Interface) -> None:
        if not self._forwardable(packet):
            return
        mapping = self._outbound(packet)
        if mapping is None:
            return
        translated = packet.with_src(mapping.external)
        self.net.record("nat-out", self.name, translated)
        self.forward(translated, incoming)

    def _translate_in(self, packet: Packet, incoming: Interface) -> None:
        if not self._forwardable(packet):
            return
        mapping = self._inbound(packet)
        if mapping is None:
            return
        translated = packet.with_dst(mapping.internal)
        self.net.record("nat-in", self.name, translated)
        self.forward(translated, incoming)

    def _hairpin(self, packet: Packet, incoming: Interface) -> None:
        """RFC 4787 §6: inside -> one of our external addresses -> inside."""
        if not self.config.hairpinning:
            self.net.drop(self.name, packet, "hairpinning-off")
            return
        if not self._forwardable(packet):
            return
        source = self._outbound(packet)
        if source is None:
            return
        # REQ-9a: the packet comes back with the sender's external address as source. It
        # never left the NAT, so the destination mapping's filter does not apply.
        turned = packet.with_src(source.external)
        target = self._inbound(turned, filtered=False)
        if target is None:
            return
        translated = turned.with_dst(target.internal)
        self.net.record("hairpin", self.name, translated)
        self.forward(translated, incoming)

    # -- mappings -------------------------------------------------------------------------

    def _remote_key(self, remote: Address) -> str | Address | None:
        mapping = self.config.mapping
        if mapping is MappingBehavior.ENDPOINT_INDEPENDENT:
            return None
        if mapping is MappingBehavior.ADDRESS_DEPENDENT:
            return remote[0]
        return remote

    def _outbound(self, packet: Packet) -> Mapping | None:
        """The mapping an outbound packet leaves through (found, or created), refreshed."""
        now = self.net.clock.now
        self._maybe_sweep(now)
        proto, internal, remote = packet.proto, packet.src, packet.dst
        flow_key = (proto, internal, remote)
        mapping = self._flows.get(flow_key)
        if mapping is None or not self._alive(mapping, now):
            key = (proto, internal, self._remote_key(remote))
            mapping = self._mappings.get(key)
            if mapping is None or not self._alive(mapping, now):
                mapping = self._create(packet, key[2], now)
                if mapping is None:
                    return None
        mapping.refreshed = now  # REQ-6: outbound refresh is always on
        mapping.permits.add(remote)
        mapping.permitted_ips.add(remote[0])
        self._flows[flow_key] = mapping
        return mapping

    def _inbound(self, packet: Packet, *, filtered: bool = True) -> Mapping | None:
        """The mapping an inbound packet is admitted through, or None (and a drop)."""
        now = self.net.clock.now
        self._maybe_sweep(now)
        mapping = self._by_external.get((packet.proto, packet.dst))
        if mapping is None or not self._alive(mapping, now):
            self.net.drop(self.name, packet, "no-mapping")
            return None
        if filtered and not self._admits(mapping, packet.src):
            self.net.drop(self.name, packet, "filtered", self.config.filtering.value)
            return None
        if self.config.inbound_refresh:
            mapping.refreshed = now  # REQ-6a
        if packet.proto is Proto.TCP:
            mapping.inbound_seen = True
        # Conntrack: replies to this source leave through this mapping, unless the inside
        # host already talks to that source through a mapping of its own.
        flow_key = (packet.proto, mapping.internal, packet.src)
        existing = self._flows.get(flow_key)
        if existing is None or not self._alive(existing, now):
            self._flows[flow_key] = mapping
        return mapping

    def _admits(self, mapping: Mapping, source: Address) -> bool:
        """RFC 4787 §5: whether the filter lets a packet from ``source`` through."""
        filtering = self.config.filtering
        if filtering is FilteringBehavior.ENDPOINT_INDEPENDENT:
            return True
        if filtering is FilteringBehavior.ADDRESS_DEPENDENT:
            return source[0] in mapping.permitted_ips
        return source in mapping.permits

    def _alive(self, mapping: Mapping, now: float) -> bool:
        """Whether ``mapping`` still exists at ``now``; an expired one is removed."""
        if not mapping.alive:
            return False
        if now - mapping.refreshed < self.lifetime(mapping):
            return True
        self._remove(mapping)
        return False

    def _remove(self, mapping: Mapping) -> None:
        mapping.alive = False
        if self._mappings.get(mapping.key) is mapping:
            del self._mappings[mapping.key]
        external = (mapping.proto, mapping.external)
        if self._by_external.get(external) is mapping:
            del self._by_external[external]

    def _maybe_sweep(self, now: float) -> None:
        """Forget dead mappings and flows now and then, so long runs stay small."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL
        for mapping in list(self._mappings.values()):
            self._alive(mapping, now)
        dead = [key for key, mapping in self._flows.items() if not mapping.alive]
        for key in dead:
            del self._flows[key]

    def _create(self, packet: Packet, remote: str | Address | None, now: float) -> Mapping | None:
        external = self._allocate(packet.proto, packet.src, now)
        if external is None:
            self.net.drop(self.name, packet, "no-port", "no external address or port free")
            return None
        mapping = Mapping(packet.proto, packet.src, external, remote, now)
        self._mappings[mapping.key] = mapping
        self._by_external[(packet.proto, external)] = mapping
        return mapping

    def _free(self, proto: Proto, external: Address, now: float) -> bool:
        holder = self._by_external.get((proto, external))
        return holder is None or not self._alive(holder, now)

    def _allocate(self, proto: Proto, internal: Address, now: float) -> Address | None:
        """An external (IP, port) for a new mapping of ``internal``."""
        v6 = is_ipv6(internal[0])
        pool = [ip for ip in self.public_ips if is_ipv6(ip) == v6]
        if not pool:
            return None
        rng = self.rng
        if self.config.pooling == "paired":
            # REQ-2: every mapping of one internal IP uses the same external IP.
            ip = self._paired.get(internal[0])
            if ip is None or ip not in pool:
                ip = rng.choice(pool)
                self._paired[internal[0]] = ip
            candidates = [ip]
        else:
            candidates = list(pool)
            rng.shuffle(candidates)
        port = internal[1]
        if self.config.port_preservation:
            for ip in candidates:
                if self._free(proto, (ip, port), now):
                    return (ip, port)
        # REQ-3a: well-known internal ports map to well-known external ports.
        low, high = (1, 1023) if port < 1024 else self.config.port_range
        for ip in candidates:
            for _ in range(_PORT_DRAWS):
                candidate = self._parity(rng.randint(low, high), port, low, high)
                if self._free(proto, (ip, candidate), now):
                    return (ip, candidate)
            for candidate in range(low, high + 1):
                if (not self.config.port_parity or candidate % 2 == port % 2) and self._free(
                    proto, (ip, candidate), now
                ):
                    return (ip, candidate)
        return None

    def _parity(self, candidate: int, port: int, low: int, high: int) -> int:
        """REQ-4: with port parity on, move ``candidate`` to the parity of ``port``."""
        if not self.config.port_parity or candidate % 2 == port % 2:
            return candidate
        return candidate + 1 if candidate < high else candidate - 1
