"""An allocation and what hangs off it (RFC 8656 §6, §9, §12): relayed transport addresses
with their time-to-expiry, permissions, channel bindings. Plain state on the caller's
clock; the rules that change it live in :mod:`tsunagu.turn.server`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tsunagu.stun.constants import TRANSPORT_UDP, AddressFamily
from tsunagu.turn.transport import Address, FiveTuple


@dataclass(slots=True)
class RelayedAddress:
    """One relayed transport address of an allocation (two for a dual allocation,
    RFC 8656 §7.2 step 9), each with its own time-to-expiry (§6)."""

    family: int
    """:class:`~tsunagu.stun.constants.AddressFamily` value."""
    bound: Address
    """Where the driver's relay socket is bound (the private address behind 1:1 NAT)."""
    advertised: Address
    """What XOR-RELAYED-ADDRESS tells the client (``--external-ip``'s public address)."""
    expires: float


@dataclass(slots=True)
class Permission:
    """RFC 8656 §9: an IP address (no port) the relay may exchange data with."""

    peer_ip: str
    expires: float


@dataclass(slots=True)
class ChannelBinding:
    """RFC 8656 §12: a channel number bound to one peer transport address."""

    number: int
    peer: Address
    expires: float
    family: int = field(init=False)
    """:class:`~tsunagu.stun.constants.AddressFamily` value of ``peer``: the relayed
    address the channel sends from, worked out once rather than per relayed packet."""

    def __post_init__(self) -> None:
        self.family = int(AddressFamily.IPV6 if ":" in self.peer[0] else AddressFamily.IPV4)


class Allocation:
    """The server's state for one 5-tuple (RFC 8656 §6)."""

    __slots__ = (
        "account",
        "allocate_response",
        "allocate_transaction",
        "channel_by_peer",
        "channels",
        "connections",
        "dont_fragment",
        "five_tuple",
        "permissions",
        "relays",
        "timer_at",
        "transport",
        "username",
    )

    def __init__(
        self,
        five_tuple: FiveTuple,
        username: str,
        relays: list[RelayedAddress],
        *,
        account: str,
        dont_fragment: bool,
        allocate_transaction: bytes,
        transport: int = TRANSPORT_UDP,
    ) -> None:
        self.five_tuple = five_tuple
        self.username = username
        self.account = account
        """Whom the allocation counts against in quotas (see Authenticated.account)."""
        self.relays: dict[int, RelayedAddress] = {r.family: r for r in relays}
        self.permissions: dict[str, Permission] = {}
        self.channels: dict[int, ChannelBinding] = {}
        self.channel_by_peer: dict[Address, ChannelBinding] = {}
        self.dont_fragment = dont_fragment
        self.transport = transport
        """REQUESTED-TRANSPORT: UDP (RFC 8656) or TCP (RFC 6062)."""
        self.connections: dict[Address, int] = {}
        """RFC 6062: CONNECTION-ID of the TCP connection with each peer."""
        # RFC 8489 §6.3.1 / RFC 8656 §5: a retransmitted Allocate gets the same answer.
        self.allocate_transaction = allocate_transaction
        self.allocate_response = b""
        self.timer_at = float("inf")
        """The deadline the server's timer heap holds for this allocation."""

    def __repr__(self) -> str:
        return f"Allocation({self.five_tuple}, {self.username!r}, {list(self.relays.values())})"

    # -- permissions (§9) -------------------------------------------------------------------

    def has_permission(self, peer_ip: str, now: float) -> bool:
        permission = self.permissions.get(peer_ip)
        return permission is not None and permission.expires > now

    def active_permissions(self, now: float) -> int:
        return sum(1 for p in self.permissions.values() if p.expires > now)

    def install_permission(self, peer_ip: str, expires: float) -> bool:
        """Create or refresh; True when the permission is new."""
        permission = self.permissions.get(peer_ip)
        if permission is None:
            self.permissions[peer_ip] = Permission(peer_ip, expires)
            return True
        permission.expires = expires
        return False

    # -- channels (§12) ---------------------------------------------------------------------

    def channel(self, number: int, now: float) -> ChannelBinding | None:
        """The live binding of ``number``, if any."""
        binding = self.channels.get(number)
        if binding is None or binding.expires <= now:
            return None
        return binding

    def channel_for_peer(self, peer: Address, now: float) -> ChannelBinding | None:
        binding = self.channel_by_peer.get(peer)
        if binding is None or binding.expires <= now:
            return None
        return binding

    def active_channels(self, now: float) -> int:
        return sum(1 for c in self.channels.values() if c.expires > now)

    def bind_channel(self, number: int, peer: Address, expires: float) -> bool:
        """Create or refresh; True when the binding is new. The caller has checked the
        §12.2 uniqueness rules against live bindings; expired ones are replaced here."""
        binding = self.channels.get(number)
        if binding is not None and binding.peer == peer:
            binding.expires = expires
            return False
        self.unbind_channel(number)
        stale = self.channel_by_peer.get(peer)
        if stale is not None:
            self.unbind_channel(stale.number)
        binding = ChannelBinding(number, peer, expires)
        self.channels[number] = binding
        self.channel_by_peer[peer] = binding
        return True

    def unbind_channel(self, number: int) -> ChannelBinding | None:
        binding = self.channels.pop(number, None)
        if binding is not None:
            self.channel_by_peer.pop(binding.peer, None)
        return binding

    # -- expiry -----------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest time anything of this allocation expires."""
        # A plain loop: min() over a generator costs several times more, and this runs on
        # every Allocate, Refresh, CreatePermission and ChannelBind.
        deadline = float("inf")
        for relay in self.relays.values():
            deadline = min(deadline, relay.expires)
        for permission in self.permissions.values():
            deadline = min(deadline, permission.expires)
        for binding in self.channels.values():
            deadline = min(deadline, binding.expires)
        return deadline

    def sweep(
        self, now: float
    ) -> tuple[list[RelayedAddress], list[Permission], list[ChannelBinding]]:
        """Drop whatever expired at ``now``; returns what was dropped. When every relayed
        address is gone, the allocation itself is over and the caller deletes it."""
        gone_relays = [r for r in self.relays.values() if r.expires <= now]
        for relay in gone_relays:
            del self.relays[relay.family]
        gone_permissions = [p for p in self.permissions.values() if p.expires <= now]
        for permission in gone_permissions:
            del self.permissions[permission.peer_ip]
        gone_channels = [c for c in self.channels.values() if c.expires <= now]
        for binding in gone_channels:
            self.unbind_channel(binding.number)
        return gone_relays, gone_permissions, gone_channels
