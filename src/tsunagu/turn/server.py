"""The TURN server as a sans-I/O state machine (RFC 8656 §5-§12, RFC 8489 §9.2).

Inputs, each with the driver's clock ``now``:

* :meth:`TurnServerCore.handle_datagram` -- a UDP datagram, or one STUN message or
  ChannelData frame cut from a TCP/TLS stream (RFC 8489 §6.2.2, RFC 8656 §12.5), that a
  client sent to one of the server's listening addresses;
* :meth:`TurnServerCore.handle_peer_datagram` -- a UDP datagram a peer sent to a relay
  socket;
* :meth:`TurnServerCore.connection_closed` -- a client's TCP/TLS connection ended;
* :meth:`TurnServerCore.handle_timeout`;
* for RFC 6062 TCP allocations: :meth:`peer_connected`, :meth:`peer_connection_failed`
  (the outcome of a :class:`~tsunagu.turn.events.ConnectToPeer` command),
  :meth:`peer_connection_accepted` and :meth:`peer_connection_closed`.

Outputs, pulled by the driver: :meth:`poll_transmit`, :meth:`poll_event`,
:meth:`poll_timeout`. Relay sockets are opened and closed synchronously through the
driver's :class:`~tsunagu.turn.relay.RelayBinder` (see :mod:`tsunagu.turn.relay` for why).
RFC 6062 peer connections are driven by three command events (``ConnectToPeer``,
``DataConnectionBound``, ``ClosePeerConnection``); once a data connection is bound the
driver pipes its bytes and the core only tracks the connection's lifetime.

Security properties built in (issue 3 §6):

* every request on an allocation authenticates as the allocation's user, else 441 (§5);
* attributes after MESSAGE-INTEGRITY have no effect (the codec drops them, RFC 8489 §14.5);
* nonces are stateless and secrets come from an injected :class:`Entropy`;
* answers that need no credentials (401, 438, 400 before authentication, Binding) are
  rate-limited per source (IPv4 address or IPv6 /64) in a bounded table, and nothing else
  is stored per source;
* every error response leaves the state exactly as it was: all checks run before the one
  fallible side effect (binding relay ports), which is undone if a later step fails;
* the peer policy is checked when a permission, channel or RFC 6062 connection is made,
  the server's own transport addresses on every Send indication, and a permission on
  every relayed packet;
* one peer's send error is the driver's to swallow: nothing here stops relaying for it.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import socket
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from tsunagu.errors import StunDecodeError
from tsunagu.stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    EvenPort,
    Fingerprint,
    Icmp,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    Software,
    UnknownAttributes,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    MAGIC_COOKIE_BYTES,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AddressFamily,
    AttrType,
    ErrorCode,
    MessageClass,
    Method,
)
from tsunagu.stun.message import Message, error_response, success_response
from tsunagu.stun.server import RateLimiter
from tsunagu.turn.allocation import Allocation, RelayedAddress
from tsunagu.turn.auth import (
    Authenticated,
    Authenticator,
    Rejected,
    UserKeys,
    parse_user,
    parse_users_file,
)
from tsunagu.turn.config import TurnServerConfig, format_address
from tsunagu.turn.constants import (
    CHANNEL_LIFETIME,
    PERMISSION_LIFETIME,
    RESERVATION_LIFETIME,
    RESERVATION_TOKEN_LENGTH,
    RFC5766_CHANNEL_MAX,
)
from tsunagu.turn.entropy import Entropy, SystemEntropy
from tsunagu.turn.events import (
    AllocationCreated,
    AllocationDeleted,
    AllocationExpired,
    AllocationRefreshed,
    AuthFailed,
    ChannelBound,
    ChannelExpired,
    ClosePeerConnection,
    ConnectToPeer,
    DataConnectionBound,
    PermissionCreated,
    PermissionExpired,
    RequestRejected,
    TurnEvent,
)
from tsunagu.turn.policy import PeerPolicy
from tsunagu.turn.relay import PortPool, RelayBinder, RelayEndpoint, Reservation
from tsunagu.turn.tcp import (
    CONNECT_TIMEOUT,
    CONNECTION_BIND_TIMEOUT,
    PeerConnection,
    PeerConnectionState,
)
from tsunagu.turn.transport import Address, FiveTuple, Transmit, Transport

_CHANNEL_HEAD = struct.Struct("!HH")
_DATA_HEAD = struct.Struct("!HH")  # STUN attribute header (type, length)
_DATA_INDICATION_TYPE = 0x0017  # Data indication: method 0x007, class indication (§18)
_TURN_METHODS = frozenset(
    (
        Method.ALLOCATE,
        Method.REFRESH,
        Method.CREATE_PERMISSION,
        Method.CHANNEL_BIND,
        Method.CONNECT,  # RFC 6062
        Method.CONNECTION_BIND,
    )
)
_XPA_IPV4_HEAD = struct.pack("!HH", AttrType.XOR_PEER_ADDRESS, 8)
_DATA_TYPE = struct.pack("!H", AttrType.DATA)
_PEERS_SEEN = 4096  # decoded XOR-PEER-ADDRESS values remembered by the Send fast path
_CONNECTION_ID_DRAWS = 16  # tries for an unused 32-bit CONNECTION-ID
_NONCE_SECRET_LENGTH = 32
_TIMERS_MIN_COMPACTION = 4096  # timer heap entries before stale ones are worth dropping
# Largest payload a Data indication can carry: the STUN length field is 16 bits and the
# indication adds XOR-PEER-ADDRESS (at most 24 bytes) and the DATA header (4 bytes).
_MAX_DATA_INDICATION_PAYLOAD = 0xFFFF - 24 - 4 - 3


MAX_TRACKED_SOURCES = 65_536
"""Sources the unauthenticated-answer rate limiter remembers (least recently seen forgotten
first), which bounds its memory whatever a spoofed flood sends."""


def source_key(ip: str) -> str | bytes:
    """Rate-limit key of a source: the IPv4 address (also when IPv4-mapped), or the IPv6
    /64, since one host usually holds a whole /64."""
    if ":" not in ip:
        return ip
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ipaddress.IPv6Address(ip.split("%", 1)[0]).packed[:8]


def family_of(ip: str) -> int:
    """The STUN address family of an IP literal (RFC 8489 §14.1)."""
    return AddressFamily.IPV6 if ":" in ip else AddressFamily.IPV4


def _is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


@dataclass(slots=True)
class TurnStats:
    """Counters for metrics; the driver reads them, the core only adds."""

    packets_to_peers: int = 0
    bytes_to_peers: int = 0
    packets_to_clients: int = 0
    bytes_to_clients: int = 0
    dropped_from_clients: int = 0
    """Datagrams from clients that were not relayed (no allocation, channel, permission,
    malformed, forbidden destination)."""
    dropped_from_peers: int = 0
    """Datagrams from peers without a permission, or to a relay with no allocation."""
    rate_limited: int = 0
    """Requests left unanswered by the per-source rate limit."""
    dropped_bandwidth: int = 0
    """Datagrams (either direction) dropped by the per-allocation bandwidth limit."""
    icmp_to_clients: int = 0
    """ICMP errors from peers relayed to clients as Data indications (RFC 8656 §11.5)."""


class _TokenBucket:
    """Bytes an allocation may still relay now (``bandwidth_limit``)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class _RefusalError(Exception):
    """Internal: abort request processing with an error response (never escapes)."""

    def __init__(self, code: int, detail: str, attributes: tuple[Attribute, ...] = ()) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.attributes = attributes


def build_users(
    config: TurnServerConfig, users_file_text: str | None = None
) -> dict[str, UserKeys]:
    """The static users of ``config`` (``--user``) plus those of a users file's text;
    raises ValueError on a malformed entry. Reading the file is the driver's job."""
    users: dict[str, UserKeys] = {}
    if users_file_text is not None:
        users.update(parse_users_file(users_file_text, config.realm))
    for spec in config.users:
        name, keys = parse_user(spec, config.realm)
        users[name] = keys
    return users


class TurnServerCore:
    """One TURN server's allocations, driven by a driver (see the module docstring)."""

    def __init__(
        self,
        config: TurnServerConfig,
        relay: RelayBinder,
        *,
        listening: Iterable[Address] = (),
        users: Mapping[str, UserKeys] | None = None,
        entropy: Entropy | None = None,
        unix_time_offset: float = 0.0,
        relay_ports: tuple[int, int] | None = None,
        connection_id_shard: tuple[int, int] = (0, 1),
        tcp_allocations_over_tls: bool = True,
    ) -> None:
        """``listening``: the transport addresses the driver actually bound (ports
        resolved), refused as peers. ``users``: static users, by default those of
        ``config.users`` (:func:`build_users` adds a users file). ``unix_time_offset``:
        added to ``now`` to get Unix time, for TURN REST API expiry times.

        For one worker of several (``--workers``): ``relay_ports`` is the slice of the
        configured range this core allocates from (the whole range stays refused as
        peers); ``connection_id_shard`` = (index, count) makes every RFC 6062
        CONNECTION-ID ``cid % count == index``, so that whichever worker receives a
        ConnectionBind knows which one owns it; ``tcp_allocations_over_tls`` False
        answers RFC 6062 Allocates over TLS with 442 (a TLS data connection cannot be
        handed to another process)."""
        self.config = config
        self._relay = relay
        self._entropy: Entropy = entropy if entropy is not None else SystemEntropy()
        self.unix_time_offset = unix_time_offset
        """Add to ``now`` for Unix time (REST API expiry); drivers re-sync it."""
        self._listening = tuple(listening) or config.listen
        self._endpoints = self._relay_endpoints(config, self._listening)
        if not self._endpoints:
            raise ValueError("no relay address: give --relay-ip or listen on a specific IP")
        first_port, last_port = relay_ports or (config.min_port, config.max_port)
        self._pools = {
            family: PortPool(ep.bind_ip, first_port, last_port, self._entropy)
            for family, ep in self._endpoints.items()
        }
        shard, shards = connection_id_shard
        if not 0 <= shard < shards:
            raise ValueError(f"bad CONNECTION-ID shard {connection_id_shard}")
        self._cid_shard = shard
        self._cid_shards = shards
        self._tcp_over_tls = tcp_allocations_over_tls
        self._bandwidth = float(config.bandwidth_limit)
        self._bandwidth_burst = float(config.effective_bandwidth_burst)
        self._buckets: dict[FiveTuple, _TokenBucket] = {}
        self._peers_seen: dict[bytes, Address] = {}
        self._nonce_secret = self._entropy.token_bytes(_NONCE_SECRET_LENGTH)
        self._auth = Authenticator(
            config.realm,
            build_users(config) if users is None else users,
            rest_secrets=config.auth_secrets,
            nonce_secret=self._nonce_secret,
            nonce_lifetime=config.nonce_lifetime,
        )
        self._policy = self._build_policy(config.allow_peers, config.deny_peers)
        self._limiter = RateLimiter(
            config.unauthenticated_rate, config.unauthenticated_burst, MAX_TRACKED_SOURCES
        )
        self._software = Software(config.software) if config.software else None
        self._channel_max = RFC5766_CHANNEL_MAX if config.rfc5766_channels else CHANNEL_MAX
        # First byte of a ChannelData message (RFC 7983 §7; RFC 5766 §11 for the wider range)
        self._channel_first_byte_max = self._channel_max >> 8

        self._allocations: dict[FiveTuple, Allocation] = {}
        # UDP allocations again, by (client, server) plain tuples: the ChannelData hot path
        # looks them up without building a FiveTuple.
        self._udp_clients: dict[tuple[Address, Address], Allocation] = {}
        self._by_relay: dict[Address, Allocation] = {}
        self._per_user: dict[str, int] = {}
        self._reservations: dict[bytes, Reservation] = {}
        self._peer_connections: dict[int, PeerConnection] = {}
        self._data_connections: dict[FiveTuple, PeerConnection] = {}
        self._timers: list[tuple[float, int, Allocation | Reservation | PeerConnection]] = []
        self._timers_compaction = _TIMERS_MIN_COMPACTION
        self._sequence = itertools.count()
        self._transmits: deque[Transmit] = deque()
        self._events: deque[TurnEvent] = deque()
        self.stats = TurnStats()
        self.accepting = True
        """False after :meth:`stop_accepting` (SIGTERM drain): new Allocates get 508."""

    # -- construction helpers ---------------------------------------------------------------

    @staticmethod
    def _relay_endpoints(
        config: TurnServerConfig, listening: tuple[Address, ...]
    ) -> dict[int, RelayEndpoint]:
        ips = list(config.relay_ips)
        if not ips:
            for ip, _ in listening:
                if not _is_wildcard(ip) and all(family_of(ip) != family_of(i) for i in ips):
                    ips.append(ip)
        endpoints: dict[int, RelayEndpoint] = {}
        for ip in ips:
            family = family_of(ip)
            advertised = ip
            for public, private in config.external_ips:
                if private == ip or (private is None and family_of(public) == family):
                    advertised = public
            endpoints[family] = RelayEndpoint(family, ip, advertised)
        return endpoints

    def _build_policy(self, allow: Iterable[str], deny: Iterable[str]) -> PeerPolicy:
        own: list[Address] = []
        ranges: list[tuple[str, int, int]] = []
        listen_ports = {port for _, port in self._listening}
        for ip, port in self._listening:
            if not _is_wildcard(ip):
                own.append((ip, port))
        for endpoint in self._endpoints.values():
            for ip in {endpoint.bind_ip, endpoint.advertised_ip}:
                own.extend((ip, port) for port in listen_ports)
                if not self.config.relay_to_relay:
                    ranges.append((ip, self.config.min_port, self.config.max_port))
        return PeerPolicy(allow=allow, deny=deny, own_addresses=own, own_port_ranges=ranges)

    # -- outputs -----------------------------------------------------------------------------

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> TurnEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """The absolute time :meth:`handle_timeout` should next run, or None."""
        return self._timers[0][0] if self._timers else None

    # -- introspection (metrics, tests) ------------------------------------------------------

    @property
    def allocation_count(self) -> int:
        return len(self._allocations)

    def allocations(self) -> list[Allocation]:
        return list(self._allocations.values())

    def allocation(self, five_tuple: FiveTuple) -> Allocation | None:
        return self._allocations.get(five_tuple)

    @property
    def reservation_count(self) -> int:
        return len(self._reservations)

    @property
    def relay_ports_in_use(self) -> int:
        return sum(len(pool) for pool in self._pools.values())

    @property
    def tracked_sources(self) -> int:
        """Sources the unauthenticated-answer rate limiter currently remembers."""
        return len(self._limiter)

    @property
    def timer_entries(self) -> int:
        """Entries in the timer heap, stale ones included (see :meth:`_push_timer`)."""
        return len(self._timers)

    @property
    def relay_endpoints(self) -> tuple[RelayEndpoint, ...]:
        """The relay address of each family: bound, and advertised to clients."""
        return tuple(self._endpoints.values())

    @property
    def policy(self) -> PeerPolicy:
        return self._policy

    # -- configuration changes (SIGHUP) -----------------------------------------------------

    def update_users(self, users: Mapping[str, UserKeys], auth_secrets: Iterable[str]) -> None:
        """Swap the credentials. Allocations stay; their next request authenticates
        against the new users (a removed user's Refresh then fails and it expires).
        Outstanding nonces stay valid."""
        self._auth = Authenticator(
            self.config.realm,
            users,
            rest_secrets=auth_secrets,
            nonce_secret=self._nonce_secret,
            nonce_lifetime=self.config.nonce_lifetime,
        )

    def update_policy(self, allow: Iterable[str], deny: Iterable[str], now: float) -> int:
        """Swap the peer policy and drop every permission and channel it now refuses, so
        that no packet reaches a newly forbidden peer. Returns how many were dropped."""
        policy = self._build_policy(allow, deny)
        dropped = 0
        for allocation in self._allocations.values():
            for ip in [ip for ip in allocation.permissions if not policy.permits_ip(ip)]:
                del allocation.permissions[ip]
                dropped += 1
            for binding in list(allocation.channels.values()):
                if not policy.permits(binding.peer):
                    allocation.unbind_channel(binding.number)
                    dropped += 1
            for peer, connection_id in list(allocation.connections.items()):
                if not policy.permits(peer):
                    self._close_peer_connection(connection_id)
                    dropped += 1
        self._policy = policy
        return dropped

    def stop_accepting(self) -> None:
        """Refuse new allocations (with 508, RFC 8656 §7.4: "try again" elsewhere) while
        existing ones keep relaying -- the first half of a graceful shutdown."""
        self.accepting = False

    # -- input: from clients -----------------------------------------------------------------

    def handle_datagram(
        self,
        data: bytes,
        local: Address,
        remote: Address,
        now: float,
        transport: Transport = Transport.UDP,
    ) -> None:
        """A datagram (or stream frame) from ``remote`` to our listening ``local``."""
        if not data:
            self.stats.dropped_from_clients += 1
            return
        first = data[0]
        if 0x40 <= first <= self._channel_first_byte_max:  # RFC 8656 §12: ChannelData
            self._client_channel_data(data, FiveTuple(transport, remote, local), now)
            return
        if first > 3:
            self.stats.dropped_from_clients += 1  # §12: reserved first bytes are dropped
            return
        try:
            message = Message.decode(data)
        except StunDecodeError:
            self.stats.dropped_from_clients += 1
            return
        if message.legacy:  # TURN needs the magic cookie (RFC 8656 §5)
            self.stats.dropped_from_clients += 1
            return
        five_tuple = FiveTuple(transport, remote, local)
        if message.message_class == MessageClass.REQUEST:
            self._request(message, five_tuple, now)
        elif message.message_class == MessageClass.INDICATION and message.method == Method.SEND:
            self._send_indication(message, five_tuple, now)
        else:
            self.stats.dropped_from_clients += 1

    def connection_closed(
        self, transport: Transport, local: Address, remote: Address, now: float
    ) -> None:
        """A TCP/TLS client connection ended: its allocation goes with it (RFC 8656 §3.1,
        the 5-tuple no longer exists)."""
        five_tuple = FiveTuple(transport, remote, local)
        allocation = self._allocations.get(five_tuple)
        if allocation is not None:
            self._delete(allocation, "connection closed")
        bound = self._data_connections.get(five_tuple)
        if bound is not None:  # RFC 6062 §5.5: the peer connection goes too
            self._close_peer_connection(bound.connection_id)

    # -- input: from peers -------------------------------------------------------------------

    def handle_peer_datagram(self, data: bytes, relay: Address, peer: Address, now: float) -> None:
        """A UDP datagram from ``peer`` arrived at the relay socket bound to ``relay``
        (RFC 8656 §11.3, §12.7)."""
        relayed = self.relay_peer_datagram(data, relay, peer, now)
        if relayed is not None:
            five_tuple, frame = relayed
            self._transmits.append(
                Transmit(five_tuple.transport, five_tuple.server, five_tuple.client, frame)
            )

    def relay_peer_datagram(
        self, data: bytes, relay: Address, peer: Address, now: float
    ) -> tuple[FiveTuple, bytes] | None:
        """:meth:`handle_peer_datagram` for the driver's hot path: returns the client's
        5-tuple and the frame to send it (ChannelData or a Data indication) instead of
        queueing a :class:`Transmit`, or None when the datagram is dropped (counted)."""
        allocation = self._by_relay.get(relay)
        if allocation is None:
            self.stats.dropped_from_peers += 1
            return None
        permission = allocation.permissions.get(peer[0])
        if permission is None or permission.expires <= now:  # §9: only IPs are compared
            self.stats.dropped_from_peers += 1
            return None
        five_tuple = allocation.five_tuple
        if self._bandwidth and not self._spend(five_tuple, len(data), now):
            return None
        binding = allocation.channel_by_peer.get(peer)
        if binding is not None and binding.expires > now:
            frame = _CHANNEL_HEAD.pack(binding.number, len(data)) + data
            if five_tuple.transport.is_stream and len(data) & 3:  # §12.5: pad on streams
                frame += b"\x00" * (4 - (len(data) & 3))
        else:
            if len(data) > _MAX_DATA_INDICATION_PAYLOAD:
                self.stats.dropped_from_peers += 1
                return None
            frame = self._data_indication(peer, data)
        stats = self.stats
        stats.packets_to_clients += 1
        stats.bytes_to_clients += len(data)
        return five_tuple, frame

    def _spend(self, five_tuple: FiveTuple, size: int, now: float) -> bool:
        """Take ``size`` bytes from the allocation's bandwidth bucket; False (counted as a
        drop) when it holds fewer: the datagram is not relayed."""
        bucket = self._buckets.get(five_tuple)
        if bucket is None:
            bucket = self._buckets[five_tuple] = _TokenBucket(self._bandwidth_burst, now)
        else:
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(
                    self._bandwidth_burst, bucket.tokens + elapsed * self._bandwidth
                )
                bucket.stamp = now
        if bucket.tokens < size:
            self.stats.dropped_bandwidth += 1
            return False
        bucket.tokens -= size
        return True

    def handle_peer_icmp(
        self,
        relay: Address,
        peer: Address,
        icmp: tuple[int, int, int],
        now: float,
    ) -> None:
        """RFC 8656 §11.5: an ICMP error came back for a datagram the relay socket bound
        to ``relay`` sent to ``peer``. Relayed as a Data indication with XOR-PEER-ADDRESS
        and ICMP (no DATA) when it is an error the RFC names (ICMPv4 type 3 or 11, ICMPv6
        type 1, 2 or 3) and the peer still has a permission; dropped otherwise.
        ``icmp`` is (type, code, error data): the data is the next-hop MTU for
        "fragmentation needed" / "packet too big", else ignored (sent as 0)."""
        icmp_type, icmp_code, error_data = icmp
        v6 = ":" in relay[0]
        if icmp_type not in ((1, 2, 3) if v6 else (3, 11)) or not 0 <= icmp_code <= 0x1FF:
            return
        allocation = self._by_relay.get(relay)
        if allocation is None or allocation.transport != TRANSPORT_UDP:
            return
        if not allocation.has_permission(peer[0], now):
            return
        mtu_report = (icmp_type == 2) if v6 else (icmp_type == 3 and icmp_code == 4)
        indication = Message(
            Method.DATA,
            MessageClass.INDICATION,
            self._entropy.token_bytes(12),
            [
                XorPeerAddress(peer),
                Icmp(icmp_type, icmp_code, error_data & 0xFFFFFFFF if mtu_report else 0),
            ],
        )
        self.stats.icmp_to_clients += 1
        self._send(allocation.five_tuple, indication.encode())

    def _data_indication(self, peer: Address, data: bytes) -> bytes:
        """RFC 8656 §11.3: a Data indication with XOR-PEER-ADDRESS and DATA."""
        transaction_id = self._entropy.token_bytes(12)
        peer_value = XorPeerAddress(peer).encode_value(MAGIC_COOKIE_BYTES + transaction_id)
        padding = b"\x00" * (-len(data) & 3)
        body = (
            _DATA_HEAD.pack(AttrType.XOR_PEER_ADDRESS, len(peer_value))
            + peer_value
            + _DATA_HEAD.pack(AttrType.DATA, len(data))
            + data
            + padding
        )
        return (
            struct.pack("!HH", _DATA_INDICATION_TYPE, len(body))
            + MAGIC_COOKIE_BYTES
            + transaction_id
            + body
        )

    # -- timers ------------------------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        """Expire whatever is due: allocations, relayed addresses, permissions, channels,
        reservations, RFC 6062 connection attempts and unbound peer connections."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, item = heapq.heappop(timers)
            if not self._timer_pending(deadline, item):
                continue
            if isinstance(item, Reservation):
                del self._reservations[item.token]
                self._pools[item.family].release(self._relay.unbind, item.bound[1])
            elif isinstance(item, PeerConnection):
                self._peer_connection_timeout(item, now)
            else:
                item.timer_at = float("inf")
                self._sweep(item, now)

    def _timer_pending(
        self, deadline: float, item: Allocation | Reservation | PeerConnection
    ) -> bool:
        """Whether a timer heap entry may still do something: not once its item is gone
        (a deleted allocation, a used reservation, a closed peer connection), nor, for an
        allocation, once an earlier deadline superseded it."""
        if isinstance(item, Reservation):
            return self._reservations.get(item.token) is item
        if isinstance(item, PeerConnection):
            return self._peer_connections.get(item.connection_id) is item
        return self._allocations.get(item.five_tuple) is item and deadline == item.timer_at

    def _push_timer(self, deadline: float, item: Allocation | Reservation | PeerConnection) -> None:
        timers = self._timers
        heapq.heappush(timers, (deadline, next(self._sequence), item))
        if len(timers) > self._timers_compaction:
            # An entry whose item is gone stays until its deadline (an allocation deleted by
            # a Refresh: up to max-lifetime later), holding the item; with allocations
            # coming and going, such entries would pile up by the million. Drop them once the
            # heap has doubled: O(1) per push, amortised. In place: handle_timeout may be
            # iterating over this list.
            timers[:] = [entry for entry in timers if self._timer_pending(entry[0], entry[2])]
            heapq.heapify(timers)
            self._timers_compaction = max(_TIMERS_MIN_COMPACTION, 2 * len(timers))

    def _sweep(self, allocation: Allocation, now: float) -> None:
        relays, permissions, channels = allocation.sweep(now)
        five_tuple = allocation.five_tuple
        for relay in relays:
            self._release(allocation, relay)
        for permission in permissions:
            self._events.append(PermissionExpired(five_tuple, permission.peer_ip))
        for binding in channels:
            self._events.append(ChannelExpired(five_tuple, binding.number, binding.peer))
        if not allocation.relays:
            self._forget(allocation)
            self._events.append(AllocationExpired(five_tuple, allocation.username))
        else:
            self._schedule(allocation)

    def _schedule(self, allocation: Allocation) -> None:
        deadline = allocation.next_deadline()
        if deadline < allocation.timer_at:
            allocation.timer_at = deadline
            self._push_timer(deadline, allocation)

    # -- allocation bookkeeping --------------------------------------------------------------

    def _release(self, allocation: Allocation, relay: RelayedAddress) -> None:
        """Give a relayed transport address back to its pool, closing its socket."""
        self._by_relay.pop(relay.bound, None)
        binder = self._relay
        unbind = binder.unbind_tcp if allocation.transport == TRANSPORT_TCP else binder.unbind
        self._pools[relay.family].release(unbind, relay.bound[1])

    def _forget(self, allocation: Allocation) -> None:
        """Remove an allocation whose relays are already released; its TCP peer
        connections go with it (RFC 6062 §5.5)."""
        five_tuple = allocation.five_tuple
        del self._allocations[five_tuple]
        if five_tuple.transport is Transport.UDP:
            del self._udp_clients[(five_tuple.client, five_tuple.server)]
        self._buckets.pop(allocation.five_tuple, None)
        count = self._per_user.get(allocation.account, 0) - 1
        if count > 0:
            self._per_user[allocation.account] = count
        else:
            self._per_user.pop(allocation.account, None)
        for connection_id in list(allocation.connections.values()):
            self._close_peer_connection(connection_id)

    def _delete(self, allocation: Allocation, reason: str) -> None:
        for relay in allocation.relays.values():
            self._release(allocation, relay)
        allocation.relays.clear()
        self._forget(allocation)
        self._events.append(AllocationDeleted(allocation.five_tuple, allocation.username, reason))

    def close(self) -> None:
        """Delete every allocation and reservation, releasing their relay sockets."""
        for allocation in list(self._allocations.values()):
            self._delete(allocation, "shutdown")
        for reservation in self._reservations.values():
            self._pools[reservation.family].release(self._relay.unbind, reservation.bound[1])
        self._reservations.clear()
        self._timers.clear()

    # -- responses ---------------------------------------------------------------------------

    def _send(self, five_tuple: FiveTuple, data: bytes) -> None:
        self._transmits.append(
            Transmit(five_tuple.transport, five_tuple.server, five_tuple.client, data)
        )

    def _respond(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated | None,
        attributes: Iterable[Attribute] = (),
        *,
        code: int | None = None,
    ) -> bytes:
        attrs = list(attributes)
        if self._software is not None and request.method in (Method.ALLOCATE, Method.REFRESH):
            attrs.append(self._software)  # RFC 8656 §5: SHOULD in Allocate/Refresh responses
        if code is None:
            response = success_response(request, attrs)
        else:
            response = error_response(request, code, None, attrs)
        data = response.encode(
            auth.key if auth is not None else None,
            integrity=auth.integrity if auth is not None else "sha1",
            fingerprint=request.get(Fingerprint) is not None,
        )
        self._send(five_tuple, data)
        return data

    def _unauthenticated_allowed(self, five_tuple: FiveTuple, now: float) -> bool:
        if self._limiter.allow(source_key(five_tuple.client[0]), now):
            return True
        self.stats.rate_limited += 1
        return False

    # -- requests ----------------------------------------------------------------------------

    def _request(self, request: Message, five_tuple: FiveTuple, now: float) -> None:
        method = request.method
        if method == Method.BINDING:
            self._binding(request, five_tuple, now)
            return
        allocation = self._allocations.get(five_tuple)
        if (
            method == Method.ALLOCATE
            and allocation is not None
            and allocation.allocate_transaction == request.transaction_id
        ):
            self._send(five_tuple, allocation.allocate_response)  # a retransmission
            return
        if method not in _TURN_METHODS:
            if self._unauthenticated_allowed(five_tuple, now):
                self._respond(request, five_tuple, None, code=ErrorCode.BAD_REQUEST)
                self._events.append(
                    RequestRejected(five_tuple, method, ErrorCode.BAD_REQUEST, "unknown method")
                )
            return
        auth = self._auth.authenticate(
            request, self._nonce_identity(request, five_tuple), now, now + self.unix_time_offset
        )
        if isinstance(auth, Rejected):
            if not self._unauthenticated_allowed(five_tuple, now):
                return
            self._respond(request, five_tuple, None, auth.attributes, code=auth.code)
            if auth.code == ErrorCode.BAD_REQUEST:
                self._events.append(RequestRejected(five_tuple, method, auth.code, auth.reason))
            else:
                self._events.append(
                    AuthFailed(
                        five_tuple.client,
                        five_tuple.transport,
                        auth.username,
                        auth.code,
                        auth.reason,
                    )
                )
            return
        try:
            unknown = request.unknown_comprehension_required()
            if unknown:  # RFC 8489 §6.3.1.1, after authentication
                raise _RefusalError(
                    ErrorCode.UNKNOWN_ATTRIBUTE,
                    "unknown comprehension-required attributes",
                    (UnknownAttributes(unknown),),
                )
            if method == Method.CONNECTION_BIND:  # on a new connection: no allocation
                self._connection_bind(request, five_tuple, auth, allocation, now)
                return
            if (
                allocation is not None
                and method != Method.ALLOCATE
                and auth.username != allocation.username
            ):  # §5
                raise _RefusalError(ErrorCode.WRONG_CREDENTIALS, "not the allocation's user")
            if method == Method.ALLOCATE:
                self._allocate(request, five_tuple, auth, allocation, now)
                return
            if allocation is None:  # §5
                raise _RefusalError(ErrorCode.ALLOCATION_MISMATCH, "no allocation on this 5-tuple")
            if method == Method.REFRESH:
                self._refresh(request, five_tuple, auth, allocation, now)
            elif method == Method.CREATE_PERMISSION:
                self._create_permission(request, five_tuple, auth, allocation, now)
            elif method == Method.CHANNEL_BIND:
                self._channel_bind(request, five_tuple, auth, allocation, now)
            else:
                self._connect(request, five_tuple, auth, allocation, now)
        except _RefusalError as refusal:
            self._respond(request, five_tuple, auth, refusal.attributes, code=refusal.code)
            self._events.append(RequestRejected(five_tuple, method, refusal.code, refusal.detail))

    def _nonce_identity(self, request: Message, five_tuple: FiveTuple) -> Address:
        """Whose nonce a request must carry: its own source's, except that an RFC 6062
        ConnectionBind arrives on a new connection with the nonce of its allocation's
        control connection (clients reuse it), so that one is checked."""
        if request.method == Method.CONNECTION_BIND:
            id_attr = request.get(ConnectionId)
            if id_attr is not None:
                connection = self._peer_connections.get(id_attr.value)
                if connection is not None:
                    return connection.allocation.five_tuple.client
        return five_tuple.client

    def _binding(self, request: Message, five_tuple: FiveTuple, now: float) -> None:
        """RFC 8489 §6.3.1: a TURN server answers Binding requests too (no credentials)."""
        if not self._unauthenticated_allowed(five_tuple, now):
            return
        unknown = request.unknown_comprehension_required()
        if unknown:
            self._respond(
                request,
                five_tuple,
                None,
                (UnknownAttributes(unknown),),
                code=ErrorCode.UNKNOWN_ATTRIBUTE,
            )
            return
        self._respond(request, five_tuple, None, (XorMappedAddress(five_tuple.client),))

    def _desired_lifetime(self, attribute: Lifetime | None, *, refresh: bool) -> int:
        """RFC 8656 §7.2 (Allocate) and §8.2 (Refresh, where 0 means delete)."""
        config = self.config
        if attribute is None:
            return config.default_lifetime
        if refresh and attribute.value == 0:
            return 0
        computed = min(attribute.value, config.max_lifetime)
        return computed if computed > config.default_lifetime else config.default_lifetime

    def _allocate(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated,
        existing: Allocation | None,
        now: float,
    ) -> None:
        """RFC 8656 §7.2, checks in the RFC's order."""
        if existing is not None:  # step 2
            raise _RefusalError(ErrorCode.ALLOCATION_MISMATCH, "5-tuple already has an allocation")
        transport = request.get(RequestedTransport)  # step 3
        if transport is None:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "REQUESTED-TRANSPORT missing")
        dont_fragment = request.get(DontFragment) is not None
        if transport.value == TRANSPORT_TCP:  # RFC 6062 §5.1
            if not five_tuple.transport.is_stream:
                raise _RefusalError(ErrorCode.BAD_REQUEST, "TCP allocation over UDP")
            if five_tuple.transport is Transport.TLS and not self._tcp_over_tls:
                raise _RefusalError(
                    ErrorCode.UNSUPPORTED_TRANSPORT_PROTOCOL, "TCP allocation over TLS"
                )
            if (
                dont_fragment
                or request.get(EvenPort) is not None
                or request.get(ReservationToken) is not None
            ):
                raise _RefusalError(ErrorCode.BAD_REQUEST, "option not allowed for TCP")
        elif transport.value != TRANSPORT_UDP:
            raise _RefusalError(
                ErrorCode.UNSUPPORTED_TRANSPORT_PROTOCOL, f"transport {transport.value}"
            )
        if dont_fragment and not self._relay.supports_dont_fragment:  # step 4
            raise _RefusalError(
                ErrorCode.UNKNOWN_ATTRIBUTE,
                "DONT-FRAGMENT unsupported",
                (UnknownAttributes((AttrType.DONT_FRAGMENT,)),),
            )
        token = request.get(ReservationToken)
        even_port = request.get(EvenPort)
        requested = request.get(RequestedAddressFamily)
        additional = request.get(AdditionalAddressFamily)
        reservation: Reservation | None = None
        if token is not None:  # step 5
            if even_port is not None or requested is not None or additional is not None:
                raise _RefusalError(ErrorCode.BAD_REQUEST, "RESERVATION-TOKEN with other options")
            reservation = self._reservations.get(token.value)
            if reservation is None or reservation.expires <= now:
                raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "unknown reservation token")
        if requested is not None and additional is not None:  # step 6
            raise _RefusalError(ErrorCode.BAD_REQUEST, "both address family attributes")
        families: list[int]
        if reservation is not None:
            families = [reservation.family]
        elif requested is not None:  # step 7
            if requested.value not in self._endpoints:
                raise _RefusalError(
                    ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED, f"family {requested.value}"
                )
            families = [requested.value]
        elif additional is not None:
            if even_port is not None and even_port.reserve:  # step 8
                raise _RefusalError(ErrorCode.BAD_REQUEST, "EVEN-PORT R bit with a dual allocation")
            if additional.value != AddressFamily.IPV6:  # step 9
                raise _RefusalError(ErrorCode.BAD_REQUEST, "ADDITIONAL-ADDRESS-FAMILY must be IPv6")
            families = [AddressFamily.IPV4, AddressFamily.IPV6]
        else:
            if AddressFamily.IPV4 not in self._endpoints:  # step 7
                raise _RefusalError(ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED, "no IPv4 relay")
            families = [AddressFamily.IPV4]
        config = self.config
        if self._per_user.get(auth.account, 0) >= config.max_allocations_per_user:  # step 10
            raise _RefusalError(ErrorCode.ALLOCATION_QUOTA_REACHED, "allocations per user")
        if len(self._allocations) >= config.max_allocations:
            raise _RefusalError(ErrorCode.ALLOCATION_QUOTA_REACHED, "allocations in total")
        if not self.accepting:
            raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "server is draining")
        lifetime = self._desired_lifetime(request.get(Lifetime), refresh=False)
        expires = now + lifetime

        # Ports last: the only side effect that can fail, and it is undone on failure.
        relays: list[RelayedAddress] = []
        address_errors: list[AddressErrorCode] = []
        new_reservation: Reservation | None = None
        if reservation is not None:
            del self._reservations[reservation.token]
            endpoint = self._endpoints[reservation.family]
            relays.append(
                RelayedAddress(
                    reservation.family,
                    reservation.bound,
                    (endpoint.advertised_ip, reservation.bound[1]),
                    expires,
                )
            )
        else:
            tcp = transport.value == TRANSPORT_TCP
            bind = self._relay.bind_tcp if tcp else self._relay.bind
            unbind = self._relay.unbind_tcp if tcp else self._relay.unbind
            for family in families:
                endpoint_or_none = self._endpoints.get(family)
                if endpoint_or_none is None:
                    address_errors.append(
                        AddressErrorCode(family, ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED)
                    )
                    continue
                endpoint = endpoint_or_none
                got = self._pools[family].acquire(
                    bind,
                    unbind,
                    even=even_port is not None,
                    pair=even_port is not None and even_port.reserve,
                )
                if got is None:
                    address_errors.append(AddressErrorCode(family, ErrorCode.INSUFFICIENT_CAPACITY))
                    continue
                port, reserved_port = got
                bound = (endpoint.bind_ip, port)
                relays.append(
                    RelayedAddress(family, bound, (endpoint.advertised_ip, port), expires)
                )
                if reserved_port is not None:
                    new_reservation = Reservation(
                        self._entropy.token_bytes(RESERVATION_TOKEN_LENGTH),
                        family,
                        (endpoint.bind_ip, reserved_port),
                        now + RESERVATION_LIFETIME,
                    )
            if not relays:
                code = (
                    ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED
                    if all(e.code == ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED for e in address_errors)
                    else ErrorCode.INSUFFICIENT_CAPACITY
                )
                raise _RefusalError(code, "no relay port available")

        allocation = Allocation(
            five_tuple,
            auth.username,
            relays,
            account=auth.account,
            dont_fragment=dont_fragment,
            allocate_transaction=request.transaction_id,
            transport=transport.value,
        )
        self._allocations[five_tuple] = allocation
        if five_tuple.transport is Transport.UDP:
            self._udp_clients[(five_tuple.client, five_tuple.server)] = allocation
        for relay in relays:
            self._by_relay[relay.bound] = allocation
        self._per_user[auth.account] = self._per_user.get(auth.account, 0) + 1
        if new_reservation is not None:
            self._reservations[new_reservation.token] = new_reservation
            new_reservation.timer_at = new_reservation.expires
            self._push_timer(new_reservation.expires, new_reservation)
        self._schedule(allocation)

        attributes: list[Attribute] = [XorRelayedAddress(r.advertised) for r in relays]
        attributes.append(Lifetime(lifetime))
        if new_reservation is not None:
            attributes.append(ReservationToken(new_reservation.token))
        attributes.append(XorMappedAddress(five_tuple.client))
        attributes.extend(address_errors)
        allocation.allocate_response = self._respond(request, five_tuple, auth, attributes)
        self._events.append(
            AllocationCreated(
                five_tuple, auth.username, tuple(r.advertised for r in relays), lifetime
            )
        )

    def _refresh(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated,
        allocation: Allocation,
        now: float,
    ) -> None:
        """RFC 8656 §8.2; with REQUESTED-ADDRESS-FAMILY only that family of a dual
        allocation is refreshed or deleted (§8.1)."""
        requested = request.get(RequestedAddressFamily)
        if requested is not None:
            relay = allocation.relays.get(requested.value)
            if relay is None:
                raise _RefusalError(ErrorCode.PEER_ADDRESS_FAMILY_MISMATCH, "family not allocated")
            targets = [relay]
        else:
            targets = list(allocation.relays.values())
        lifetime = self._desired_lifetime(request.get(Lifetime), refresh=True)
        if lifetime == 0:
            for relay in targets:
                del allocation.relays[relay.family]
                self._release(allocation, relay)
            if not allocation.relays:
                self._forget(allocation)
                self._events.append(AllocationDeleted(five_tuple, allocation.username, "refresh"))
        else:
            for relay in targets:
                relay.expires = now + lifetime
            self._schedule(allocation)
            self._events.append(AllocationRefreshed(five_tuple, allocation.username, lifetime))
        self._respond(request, five_tuple, auth, (Lifetime(lifetime),))

    def _check_peer_family(self, allocation: Allocation, ip: str) -> None:
        if family_of(ip) not in allocation.relays:  # §10.2, §12.2
            raise _RefusalError(ErrorCode.PEER_ADDRESS_FAMILY_MISMATCH, f"peer {ip}")

    def _create_permission(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated,
        allocation: Allocation,
        now: float,
    ) -> None:
        """RFC 8656 §10.2: all XOR-PEER-ADDRESSes are installed, or none."""
        peers = request.get_all(XorPeerAddress)
        if not peers:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "XOR-PEER-ADDRESS missing")
        ips: list[str] = []
        for peer in peers:
            ip = peer.address[0]
            self._check_peer_family(allocation, ip)
            reason = self._policy.denial_reason(ip)
            if reason is not None:
                raise _RefusalError(ErrorCode.FORBIDDEN, f"peer {ip}: {reason}")
            ips.append(ip)
        new = {ip for ip in ips if not allocation.has_permission(ip, now)}
        limit = self.config.max_permissions_per_allocation
        if new and allocation.active_permissions(now) + len(new) > limit:
            raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "permissions per allocation")
        expires = now + PERMISSION_LIFETIME
        for ip in dict.fromkeys(ips):
            if self._install_permission(allocation, ip, now, expires):
                self._events.append(PermissionCreated(five_tuple, ip))
        self._schedule(allocation)
        self._respond(request, five_tuple, auth)

    @staticmethod
    def _install_permission(allocation: Allocation, ip: str, now: float, expires: float) -> bool:
        fresh = not allocation.has_permission(ip, now)
        allocation.install_permission(ip, expires)
        return fresh

    def _channel_bind(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated,
        allocation: Allocation,
        now: float,
    ) -> None:
        """RFC 8656 §12.2."""
        if allocation.transport == TRANSPORT_TCP:  # RFC 6062 §5: no channels on TCP
            raise _RefusalError(ErrorCode.BAD_REQUEST, "ChannelBind on a TCP allocation")
        number_attr = request.get(ChannelNumber)
        peer_attr = request.get(XorPeerAddress)
        if number_attr is None or peer_attr is None:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "CHANNEL-NUMBER or XOR-PEER-ADDRESS missing")
        number, peer = number_attr.value, peer_attr.address
        if not CHANNEL_MIN <= number <= self._channel_max:
            raise _RefusalError(ErrorCode.BAD_REQUEST, f"channel {number:#06x} out of range")
        bound = allocation.channel(number, now)
        if bound is not None and bound.peer != peer:
            raise _RefusalError(
                ErrorCode.BAD_REQUEST, f"channel {number:#06x} bound to another peer"
            )
        other = allocation.channel_for_peer(peer, now)
        if other is not None and other.number != number:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "peer bound to another channel")
        self._check_peer_family(allocation, peer[0])
        reason = self._policy.denial_reason(peer[0])
        if reason is None and self._policy.is_own(peer):
            reason = "the server's own address"
        if reason is not None:
            raise _RefusalError(ErrorCode.FORBIDDEN, f"peer {peer[0]}: {reason}")
        config = self.config
        if bound is None and allocation.active_channels(now) >= config.max_channels_per_allocation:
            raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "channels per allocation")
        if (
            not allocation.has_permission(peer[0], now)
            and allocation.active_permissions(now) >= config.max_permissions_per_allocation
        ):
            raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "permissions per allocation")
        allocation.bind_channel(number, peer, now + CHANNEL_LIFETIME)
        if bound is None:
            self._events.append(ChannelBound(five_tuple, number, peer))
        if self._install_permission(allocation, peer[0], now, now + PERMISSION_LIFETIME):
            self._events.append(PermissionCreated(five_tuple, peer[0]))
        self._schedule(allocation)
        self._respond(request, five_tuple, auth)

    # -- indications and ChannelData from clients --------------------------------------------

    def _send_indication(self, indication: Message, five_tuple: FiveTuple, now: float) -> None:
        """RFC 8656 §11.2: relay, or silently discard."""
        allocation = self._allocations.get(five_tuple)
        peer_attr = indication.get(XorPeerAddress)
        data_attr = indication.get(Data)
        if (
            allocation is None
            or peer_attr is None
            or data_attr is None
            or indication.unknown_comprehension_required()  # RFC 8489 §6.3.2
        ):
            self.stats.dropped_from_clients += 1
            return
        dont_fragment = indication.get(DontFragment) is not None
        target = self._send_target(
            allocation, peer_attr.address, data_attr.value, dont_fragment, now
        )
        if target is not None:
            self._transmits.append(Transmit(Transport.UDP, *target))

    def relay_udp_send_indication(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> tuple[Address, Address, bytes, bool] | Literal[False] | None:
        """The driver's hot path for a UDP datagram that starts like a Send indication
        (type 0x0016): the common shape -- XOR-PEER-ADDRESS (IPv4), DATA, optionally
        DONT-FRAGMENT, nothing else -- is parsed here and relayed as
        :meth:`handle_datagram` would: returns (relay socket address, peer, payload,
        DF), or None when dropped (counted). Anything else returns False: give it to
        :meth:`handle_datagram`."""
        size = len(data)
        if size < 20 or data[4:8] != MAGIC_COOKIE_BYTES or (data[2] << 8 | data[3]) + 20 != size:
            return False
        # The usual layout first: XOR-PEER-ADDRESS (IPv4) at 20, DATA at 32, nothing after.
        if data[20:24] == _XPA_IPV4_HEAD and data[32:34] == _DATA_TYPE:
            length = data[34] << 8 | data[35]
            if 36 + length + (-length & 3) == size:
                usual = self._peer_of(data[24:32])
                if usual is not None:
                    allocation = self._udp_clients.get((remote, local))
                    if allocation is None:
                        self.stats.dropped_from_clients += 1
                        return None
                    payload = data[36 : 36 + length]
                    return self._send_target(allocation, usual, payload, False, now)
        peer: Address | None = None
        data_value: bytes | None = None
        dont_fragment = False
        offset = 20
        while offset < size:
            if offset + 4 > size:
                return False
            kind, length = _DATA_HEAD.unpack_from(data, offset)
            start = offset + 4
            end = start + length
            if end > size:
                return False
            if kind == AttrType.XOR_PEER_ADDRESS and peer is None and length == 8:
                peer = self._peer_of(data[start:end])
                if peer is None:
                    return False
            elif kind == AttrType.DATA and data_value is None:
                data_value = data[start:end]
            elif kind == AttrType.DONT_FRAGMENT and not dont_fragment and length == 0:
                dont_fragment = True
            else:
                return False
            offset = end + (-length & 3)
        if offset != size or peer is None or data_value is None:
            return False
        allocation = self._udp_clients.get((remote, local))
        if allocation is None:
            self.stats.dropped_from_clients += 1
            return None
        return self._send_target(allocation, peer, data_value, dont_fragment, now)

    def _peer_of(self, value: bytes) -> Address | None:
        """The peer in an IPv4 XOR-PEER-ADDRESS value (8 bytes), remembered (bounded) so
        that a stream of Send indications to one peer decodes it once; None if not IPv4."""
        peer = self._peers_seen.get(value)
        if peer is None:
            if value[1] != AddressFamily.IPV4:
                return None
            port = (value[2] << 8 | value[3]) ^ 0x2112
            address = bytes(a ^ b for a, b in zip(value[4:8], MAGIC_COOKIE_BYTES, strict=True))
            if len(self._peers_seen) >= _PEERS_SEEN:
                self._peers_seen.clear()
            peer = self._peers_seen[value] = (socket.inet_ntoa(address), port)
        return peer

    def _send_target(
        self,
        allocation: Allocation,
        peer: Address,
        payload: bytes,
        dont_fragment: bool,
        now: float,
    ) -> tuple[Address, Address, bytes, bool] | None:
        if dont_fragment and not self._relay.supports_dont_fragment:
            self.stats.dropped_from_clients += 1  # §11.2: treated as unknown -> discarded
            return None
        relay = allocation.relays.get(family_of(peer[0]))
        if (
            relay is None
            or allocation.transport != TRANSPORT_UDP  # RFC 6062 §5: no Send on TCP
            or relay.expires <= now
            or not allocation.has_permission(peer[0], now)
            or self._policy.is_own(peer)
        ):
            self.stats.dropped_from_clients += 1
            return None
        if self._bandwidth and not self._spend(allocation.five_tuple, len(payload), now):
            return None
        self.stats.packets_to_peers += 1
        self.stats.bytes_to_peers += len(payload)
        return relay.bound, peer, payload, dont_fragment

    def _client_channel_data(self, data: bytes, five_tuple: FiveTuple, now: float) -> None:
        """RFC 8656 §12.6: relay on a bound channel with a live permission, else discard."""
        target = self._channel_target(self._allocations.get(five_tuple), data, now)
        if target is not None:
            relay, peer, payload = target
            self._transmits.append(Transmit(Transport.UDP, relay, peer, payload))

    @property
    def channel_first_byte_max(self) -> int:
        """ChannelData first bytes are 0x40 up to this (0x4F, or 0x7F for RFC 5766)."""
        return self._channel_first_byte_max

    def relay_udp_channel_data(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> tuple[Address, Address, bytes] | None:
        """The driver's hot path for a UDP datagram whose first byte is a ChannelData one
        (see :attr:`channel_first_byte_max`): exactly what :meth:`handle_datagram` does
        with it, but returns (relay socket address, peer, payload) to send instead of
        queueing a :class:`Transmit`; None when it is dropped (counted)."""
        return self._channel_target(self._udp_clients.get((remote, local)), data, now)

    def _channel_target(
        self, allocation: Allocation | None, data: bytes, now: float
    ) -> tuple[Address, Address, bytes] | None:
        """RFC 8656 §12.6 checks of a ChannelData message from ``allocation``'s client:
        (relay socket address, peer, payload) to send, or None when it is dropped."""
        if allocation is None or len(data) < 4:
            self.stats.dropped_from_clients += 1
            return None
        number, length = _CHANNEL_HEAD.unpack_from(data)
        if 4 + length > len(data):  # §12.6: shorter than its claimed length
            self.stats.dropped_from_clients += 1
            return None
        binding = allocation.channels.get(number)
        if binding is None or binding.expires <= now:
            self.stats.dropped_from_clients += 1
            return None
        peer = binding.peer
        permission = allocation.permissions.get(peer[0])
        relay = allocation.relays.get(binding.family)
        if permission is None or permission.expires <= now or relay is None or relay.expires <= now:
            self.stats.dropped_from_clients += 1
            return None
        if self._bandwidth and not self._spend(allocation.five_tuple, length, now):
            return None
        stats = self.stats
        stats.packets_to_peers += 1
        stats.bytes_to_peers += length
        return relay.bound, peer, data[4 : 4 + length]

    # -- RFC 6062 TCP allocations ------------------------------------------------------------

    def is_data_connection(self, five_tuple: FiveTuple) -> bool:
        """Whether a client connection is an RFC 6062 data connection (bound and piped)."""
        return five_tuple in self._data_connections

    def _new_connection_id(self) -> int | None:
        shards = self._cid_shards
        for _ in range(_CONNECTION_ID_DRAWS):
            connection_id = int.from_bytes(self._entropy.token_bytes(4))
            connection_id += self._cid_shard - connection_id % shards  # owner: cid % shards
            if 0 < connection_id <= 0xFFFFFFFF and connection_id not in self._peer_connections:
                return connection_id
        return None

    def _add_peer_connection(
        self,
        allocation: Allocation,
        relay: RelayedAddress,
        peer: Address,
        state: PeerConnectionState,
        deadline: float,
    ) -> PeerConnection | None:
        connection_id = self._new_connection_id()
        if connection_id is None:
            return None
        connection = PeerConnection(connection_id, allocation, relay.bound, peer, state, deadline)
        self._peer_connections[connection_id] = connection
        allocation.connections[peer] = connection_id
        connection.timer_at = deadline
        self._push_timer(deadline, connection)
        return connection

    def _close_peer_connection(self, connection_id: int) -> None:
        """Forget a peer connection and tell the driver to close it (and its data
        connection). Answers a pending Connect with 447."""
        connection = self._peer_connections.pop(connection_id, None)
        if connection is None:
            return
        allocation = connection.allocation
        if allocation.connections.get(connection.peer) == connection_id:
            del allocation.connections[connection.peer]
        if connection.data_connection is not None:
            self._data_connections.pop(connection.data_connection, None)
        request = connection.connect_request
        if (
            connection.state is PeerConnectionState.CONNECTING
            and request is not None
            and self._allocations.get(allocation.five_tuple) is allocation
        ):
            self._respond(
                request,
                allocation.five_tuple,
                connection.connect_auth,
                code=ErrorCode.CONNECTION_TIMEOUT_OR_FAILURE,
            )
            self._events.append(
                RequestRejected(
                    allocation.five_tuple,
                    Method.CONNECT,
                    ErrorCode.CONNECTION_TIMEOUT_OR_FAILURE,
                    f"peer {format_address(connection.peer)} unreachable",
                )
            )
        self._events.append(ClosePeerConnection(connection_id))

    def _peer_connection_timeout(self, connection: PeerConnection, now: float) -> None:
        """A pending timer entry of ``connection`` is due (see :meth:`_timer_pending`)."""
        if connection.state is not PeerConnectionState.BOUND and connection.deadline <= now:
            self._close_peer_connection(connection.connection_id)

    def _connect(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated,
        allocation: Allocation,
        now: float,
    ) -> None:
        """RFC 6062 §5.2: check, then ask the driver to connect; answered later."""
        if allocation.transport != TRANSPORT_TCP:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "Connect on a UDP allocation")
        peer_attr = request.get(XorPeerAddress)
        if peer_attr is None:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "XOR-PEER-ADDRESS missing")
        peer = peer_attr.address
        self._check_peer_family(allocation, peer[0])
        if peer in allocation.connections:
            raise _RefusalError(ErrorCode.CONNECTION_ALREADY_EXISTS, f"peer {format_address(peer)}")
        reason = self._policy.denial_reason(peer[0])
        if reason is None and self._policy.is_own(peer):
            reason = "the server's own address"
        if reason is not None:
            raise _RefusalError(ErrorCode.FORBIDDEN, f"peer {peer[0]}: {reason}")
        if not allocation.has_permission(peer[0], now):
            raise _RefusalError(ErrorCode.FORBIDDEN, f"no permission for {peer[0]}")
        if len(allocation.connections) >= self.config.max_tcp_connections_per_allocation:
            raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "connections per allocation")
        relay = allocation.relays[family_of(peer[0])]
        connection = self._add_peer_connection(
            allocation, relay, peer, PeerConnectionState.CONNECTING, now + CONNECT_TIMEOUT
        )
        if connection is None:
            raise _RefusalError(ErrorCode.INSUFFICIENT_CAPACITY, "no CONNECTION-ID left")
        connection.connect_request = request
        connection.connect_auth = auth
        self._events.append(ConnectToPeer(connection.connection_id, relay.bound, peer))

    def peer_connected(self, connection_id: int, now: float) -> None:
        """The driver's TCP connection for :class:`ConnectToPeer` is established."""
        connection = self._peer_connections.get(connection_id)
        if connection is None or connection.state is not PeerConnectionState.CONNECTING:
            self._events.append(ClosePeerConnection(connection_id))
            return
        request, auth = connection.connect_request, connection.connect_auth
        connection.state = PeerConnectionState.PENDING_BIND
        connection.connect_request = connection.connect_auth = None
        connection.deadline = connection.timer_at = now + CONNECTION_BIND_TIMEOUT
        self._push_timer(connection.deadline, connection)
        if request is not None:
            allocation = connection.allocation
            self._respond(request, allocation.five_tuple, auth, (ConnectionId(connection_id),))

    def peer_connection_failed(self, connection_id: int, now: float) -> None:
        """The driver could not connect (refused, unreachable, ...): 447 (§5.2)."""
        self._close_peer_connection(connection_id)

    def peer_connection_closed(self, connection_id: int, now: float) -> None:
        """The peer closed (or reset) its connection (§5.5)."""
        self._close_peer_connection(connection_id)

    def peer_connection_accepted(self, relay: Address, peer: Address, now: float) -> int | None:
        """RFC 6062 §5.3: a peer connected to the TCP relayed address ``relay``. Returns
        the CONNECTION-ID the driver keys it by, or None: close it (no permission)."""
        allocation = self._by_relay.get(relay)
        if (
            allocation is None
            or allocation.transport != TRANSPORT_TCP
            or not allocation.has_permission(peer[0], now)
            or peer in allocation.connections
            or len(allocation.connections) >= self.config.max_tcp_connections_per_allocation
        ):
            self.stats.dropped_from_peers += 1
            return None
        bound = allocation.relays.get(family_of(peer[0]))
        if bound is None:
            return None
        connection = self._add_peer_connection(
            allocation, bound, peer, PeerConnectionState.PENDING_BIND, now + CONNECTION_BIND_TIMEOUT
        )
        if connection is None:
            return None
        five_tuple = allocation.five_tuple
        # §5.3: a ConnectionAttempt indication on the control connection.
        attempt = Message(
            Method.CONNECTION_ATTEMPT,
            MessageClass.INDICATION,
            self._entropy.token_bytes(12),
            [XorPeerAddress(peer), ConnectionId(connection.connection_id)],
        )
        self._send(five_tuple, attempt.encode())
        return connection.connection_id

    def _connection_bind(
        self,
        request: Message,
        five_tuple: FiveTuple,
        auth: Authenticated,
        allocation: Allocation | None,
        now: float,
    ) -> None:
        """RFC 6062 §5.4: turn this new client connection into a data connection."""
        if not five_tuple.transport.is_stream:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "ConnectionBind over UDP")
        if allocation is not None or five_tuple in self._data_connections:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "not a new connection")
        id_attr = request.get(ConnectionId)
        if id_attr is None:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "CONNECTION-ID missing")
        connection = self._peer_connections.get(id_attr.value)
        if connection is None or connection.state is not PeerConnectionState.PENDING_BIND:
            raise _RefusalError(ErrorCode.BAD_REQUEST, "unknown CONNECTION-ID")
        if auth.username != connection.allocation.username:  # RFC 8656 §5
            raise _RefusalError(ErrorCode.WRONG_CREDENTIALS, "not the allocation's user")
        connection.state = PeerConnectionState.BOUND
        connection.deadline = float("inf")
        connection.data_connection = five_tuple
        self._data_connections[five_tuple] = connection
        self._respond(request, five_tuple, auth)
        self._events.append(DataConnectionBound(connection.connection_id, five_tuple))
