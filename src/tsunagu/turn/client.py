"""The TURN client (RFC 8656) as a sans-I/O state machine.

One :class:`TurnClientConnection` owns one allocation on one server over one 5-tuple. It
never touches a socket or a clock; the driver feeds it and drains it, as DESIGN.md asks:

* inputs: :meth:`~TurnClientConnection.handle_datagram` (UDP) or
  :meth:`~TurnClientConnection.handle_stream_data` (TCP/TLS, cut into frames with
  :class:`~tsunagu.stun.framing.StreamFramer`), :meth:`~TurnClientConnection.handle_timeout`,
  and the API calls :meth:`~TurnClientConnection.allocate`,
  :meth:`~TurnClientConnection.send_to`, :meth:`~TurnClientConnection.create_permission`,
  :meth:`~TurnClientConnection.close`;
* outputs: :meth:`~TurnClientConnection.poll_transmit` (bytes for the server),
  :meth:`~TurnClientConnection.poll_event` (the frozen dataclasses of
  :mod:`tsunagu.turn.client_events`) and :meth:`~TurnClientConnection.poll_timeout`.

What it does, section by section:

* Allocate (RFC 8656 §7): the first request goes without credentials (RFC 8489 §9.2.3.1);
  a 401 brings REALM and NONCE and the request is repeated with the long-term credential
  (§9.2.5), with USERHASH when the nonce cookie says so, and with the first supported
  algorithm of PASSWORD-ALGORITHMS (so SHA-256 when the server lists it first) plus
  MESSAGE-INTEGRITY-SHA256 when the server offers them. 438 retries with the new nonce; 300
  hands the ALTERNATE-SERVER to the driver; 420 naming DONT-FRAGMENT retries without it
  (§7.4). REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY (dual allocation), EVEN-PORT,
  RESERVATION-TOKEN and LIFETIME come from :class:`TurnClientConfig`.
* Refresh (§8): "roughly 1 minute before it expires" -- we refresh at
  ``lifetime - min(refresh_margin, (1 - refresh_fraction) * lifetime)``: 540 s of the
  default 600 s, and 80 % of a lifetime shorter than 5 minutes, so a refresh that needs every
  retransmission (39.5 s, RFC 8489 §6.2.1) still ends before the allocation does. A 437 means
  the server lost the allocation (§5, §8.3): the client allocates again and says so. Closing
  sends Refresh with LIFETIME 0 (§8.1); a 437 to it counts as success (§8.3).
* Permissions (§9, §10): created on demand when the application first sends to a peer's IP
  (data waits, bounded, until the permission exists) and refreshed by the same rule before
  the fixed 300 s Permission Lifetime ends -- as long as the peer carried traffic since the
  last refresh, or the permission was asked for explicitly.
* Channels (§12): a peer that carries traffic gets a ChannelBind; until its success response
  data goes in Send indications (§11.1), afterwards in ChannelData (§12.5). Bindings in use
  are refreshed before their 600 s lifetime ends; a channel number stays with its peer for
  the life of the allocation, so it is never rebound to another address (§12: "MUST wait
  5 minutes").
* Data indications (§11.4) and ChannelData (§12.6) from peers with a permission become
  :class:`~tsunagu.turn.client_events.DataReceived`; an ICMP attribute (§11.6) becomes
  :class:`~tsunagu.turn.client_events.PeerUnreachable`.
* TCP allocations (RFC 6062, ``requested_transport="tcp"`` over a TCP/TLS connection): no
  Send, Data or channels (§5); :meth:`~TurnClientConnection.connect` sends Connect (§4.3)
  after creating the peer's permission, ConnectionAttempt indications (§4.4) become
  :class:`~tsunagu.turn.client_events.ConnectionAttempt`, and
  :meth:`~TurnClientConnection.bind_connection` returns the ConnectionBind handshake of a new
  data connection (:class:`~tsunagu.turn.tcp_client.DataConnection`). The allocation and
  its permissions are refreshed as for UDP, which keeps the data connections alive (§4.6).
* Retransmission and timeouts are :class:`~tsunagu.stun.transaction.TransactionManager`'s
  (RFC 8489 §6.2): a server that disappears yields AllocationFailed / AllocationLost with a
  :class:`~tsunagu.errors.TransactionTimeoutError` within the transaction timeout.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import secrets
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from tsunagu.errors import (
    IntegrityError,
    LocalProtocolError,
    StunDecodeError,
    TransactionTimeoutError,
    TsunaguError,
    TurnError,
)
from tsunagu.stun.attributes import (
    AdditionalAddressFamily,
    Address,
    AddressErrorCode,
    AlternateDomain,
    AlternateServer,
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    EvenPort,
    Icmp,
    Lifetime,
    Nonce,
    PasswordAlgorithms,
    Realm,
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
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AddressFamily,
    AttrType,
    MessageClass,
    Method,
)
from tsunagu.stun.credentials import (
    CredentialError,
    PasswordAlgorithm,
    opaque_string,
)
from tsunagu.stun.framing import ChannelData, StreamFramer
from tsunagu.stun.message import IntegrityAlgorithm, Message
from tsunagu.stun.transaction import TransactionConfig, TransactionManager
from tsunagu.turn import client_events as ev
from tsunagu.turn.client_auth import LongTermAuth, password_algorithms_stripped
from tsunagu.turn.tcp_client import DataConnection

__all__ = [
    "CHANNEL_LIFETIME",
    "CONNECT_RETRY_DELAY",
    "DEFAULT_LIFETIME",
    "PERMISSION_LIFETIME",
    "ClientState",
    "Transmit",
    "TurnClientConfig",
    "TurnClientConnection",
    "TurnClientStats",
    "normalize_ip",
]

DEFAULT_LIFETIME = 600  # RFC 8656 §6: default allocation lifetime, seconds
PERMISSION_LIFETIME = 300.0  # RFC 8656 §9: "MUST be 300 seconds"
CHANNEL_LIFETIME = 600.0  # RFC 8656 §12: "lasts for 10 minutes unless refreshed"
_REDIRECT_MEMORY = 300.0  # RFC 8489 §10: ignore a redirection to a server tried in 5 minutes
CONNECT_RETRY_DELAY = 10.0
"""RFC 6062 §4.3: after a 447 the client "MAY retry with the same XOR-PEER-ADDRESS attribute,
but MUST wait at least 10 seconds"."""

_CHANNEL_HEAD = struct.Struct("!HH")
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


class Transmit(NamedTuple):
    """Bytes for the server. Over TCP/TLS ``remote`` is just the connection's peer."""

    data: bytes
    remote: Address


@dataclass(frozen=True, slots=True)
class TurnClientConfig:
    """Every knob of the TURN client, with its default and the RFC text behind it."""

    requested_transport: Literal["udp", "tcp"] = "udp"
    """REQUESTED-TRANSPORT of the Allocate request (RFC 8656 §7.1, §18.7): "udp" relays
    datagrams; "tcp" asks for an RFC 6062 TCP allocation, whose peers are reached with
    Connect and reach us with ConnectionAttempt, each over its own data connection. "tcp"
    needs a TCP or TLS connection to the server (RFC 6062 §4.1)."""

    requested_lifetime: int | None = None
    """LIFETIME hint in Allocate and Refresh requests (RFC 8656 §7.1); the server uses
    max(default, min(hint, its maximum)), so only values above 600 s change anything."""

    address_family: AddressFamily | None = None
    """REQUESTED-ADDRESS-FAMILY (RFC 8656 §7.1, §18.5); None lets the server pick IPv4."""

    dual_stack: bool = False
    """ADDITIONAL-ADDRESS-FAMILY IPv6: ask for an IPv4 and an IPv6 relayed address at once
    (RFC 8656 §7.1, §18.11). Excludes ``address_family``."""

    even_port: bool = False
    """EVEN-PORT (RFC 8656 §7.1, §18.6): the relayed port must be even (for RTP)."""

    reserve_next_port: bool = False
    """EVEN-PORT's R bit: reserve port N+1 too; the token comes back in
    :attr:`~tsunagu.turn.client_events.Allocated.reservation_token`."""

    reservation_token: bytes | None = None
    """RESERVATION-TOKEN (RFC 8656 §18.9): take the port another allocation reserved."""

    dont_fragment: bool = False
    """Send DONT-FRAGMENT in the Allocate request to test support (RFC 8656 §7.1) and, when
    the server supports it, in every Send indication (§11.1)."""

    channels: bool = True
    """Bind a channel to each peer that carries traffic and use ChannelData (RFC 8656 §12);
    False keeps to Send and Data indications (§11)."""

    refresh_margin: float = 60.0
    """Refresh allocations, permissions and channels this many seconds before they expire:
    RFC 8656 §8 suggests "roughly 1 minute before it expires"."""

    refresh_fraction: float = 0.8
    """... but never later than this fraction of the lifetime, for short lifetimes."""

    software: str | None = "tsunagu"
    """SOFTWARE in Allocate and Refresh requests (RFC 8656 §5: SHOULD); None omits it."""

    fingerprint: bool = True
    """FINGERPRINT on requests (RFC 8656 §5: MAY), which helps demultiplexing middleboxes."""

    max_queued_per_peer: int = 64
    """Datagrams held per peer while its permission is being created; more are dropped."""

    keepalive_interval: float | None = 15.0
    """Over UDP, send a Binding indication to the server after this many seconds without
    sending anything, to keep NAT bindings between client and server open (RFC 8489 §3:
    indications as keep-alives; 15 s is RFC 8445 §11's Tr default). None disables."""

    reallocate: bool = True
    """Allocate again when the server says the allocation is gone (437, RFC 8656 §8.3)."""

    max_challenges: int = 4
    """401 and 438 answers one request may get before it fails: the first 401 is expected,
    each 438 (Stale Nonce) brings a fresh nonce; a server that keeps changing realm or nonce
    must not keep the client busy forever."""

    transaction: TransactionConfig = field(default_factory=TransactionConfig)
    """Retransmission schedule and timeouts (RFC 8489 §6.2)."""

    def __post_init__(self) -> None:
        if self.requested_transport not in ("udp", "tcp"):
            raise ValueError(f"requested_transport {self.requested_transport!r}: udp or tcp")
        if self.requested_transport == "tcp" and (
            self.dont_fragment or self.even_port or self.reservation_token is not None
        ):
            # RFC 6062 §4.1: "The client MUST NOT include a DONT-FRAGMENT, RESERVATION-TOKEN,
            # or EVEN-PORT attribute in the request."
            raise ValueError("a TCP allocation excludes DONT-FRAGMENT, EVEN-PORT and tokens")
        if self.address_family is not None and self.dual_stack:
            raise ValueError("REQUESTED- and ADDITIONAL-ADDRESS-FAMILY exclude each other")
        if self.reservation_token is not None and (
            self.even_port or self.address_family is not None or self.dual_stack
        ):
            # RFC 8656 §7.2 item 5: the server answers 400 to such a request.
            raise ValueError("RESERVATION-TOKEN excludes EVEN-PORT and the address families")
        if self.reserve_next_port and not self.even_port:
            raise ValueError("reserve_next_port needs even_port")
        if self.reserve_next_port and self.dual_stack:
            raise ValueError("EVEN-PORT with the R bit excludes a dual allocation (§7.2 item 8)")
        if not self.refresh_margin > 0 or not 0 < self.refresh_fraction < 1:
            raise ValueError("need refresh_margin > 0 and 0 < refresh_fraction < 1")
        if self.max_queued_per_peer < 0 or self.max_challenges < 0:
            raise ValueError("limits must not be negative")
        if self.keepalive_interval is not None and not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive")

    def refresh_delay(self, lifetime: float) -> float:
        """Seconds after a grant of ``lifetime`` at which to refresh it."""
        return lifetime - min(self.refresh_margin, (1 - self.refresh_fraction) * lifetime)


@dataclass(slots=True)
class TurnClientStats:
    """Counters, for tests, benchmarks and operators."""

    sent_channel_data: int = 0
    sent_indications: int = 0
    received_channel_data: int = 0
    received_indications: int = 0
    dropped: int = 0
    """Datagrams the application sent that never left: queue overflow, refused permission,
    or sent while the client was allocating again."""
    discarded: int = 0
    """Datagrams from the server that were malformed, stray or not allowed."""


class ClientState(enum.Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    REDIRECTED = "redirected"  # waiting for the driver to reconnect (300 Try Alternate)
    ALLOCATED = "allocated"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class _Kind(enum.Enum):
    ALLOCATE = "Allocate"
    REFRESH = "Refresh"
    DEALLOCATE = "Refresh (LIFETIME 0)"
    PERMISSION = "CreatePermission"
    CHANNEL_BIND = "ChannelBind"
    CONNECT = "Connect"

    @property
    def method(self) -> int:
        return _METHODS[self]


_METHODS = {
    _Kind.ALLOCATE: Method.ALLOCATE,
    _Kind.REFRESH: Method.REFRESH,
    _Kind.DEALLOCATE: Method.REFRESH,
    _Kind.PERMISSION: Method.CREATE_PERMISSION,
    _Kind.CHANNEL_BIND: Method.CHANNEL_BIND,
    _Kind.CONNECT: Method.CONNECT,
}


@dataclass(eq=False, slots=True)
class _Request:
    """One logical request; every retry after 401/438 is a new transaction (§9.2.5)."""

    kind: _Kind
    attributes: list[Attribute]
    peer: Address | None = None
    started: float = 0.0
    key: bytes | None = None  # the key the current transaction was protected with
    challenges: int = 0
    reauthenticated: bool = False
    integrity_failed: bool = False


@dataclass(eq=False, slots=True)
class _Permission:
    ip: str
    installed: bool = False
    inflight: bool = False
    pinned: bool = False  # asked for with create_permission: refreshed while the allocation
    used: bool = False  # traffic since the last refresh was sent
    stale: bool = False  # refresh time passed unused: expires unless traffic comes
    refresh_at: float = math.inf
    expires_at: float = math.inf
    queue: deque[tuple[bytes, Address]] = field(default_factory=deque)


@dataclass(eq=False, slots=True)
class _Channel:
    number: int
    peer: Address
    bound: bool = False
    inflight: bool = False
    failed: bool = False
    used: bool = False
    stale: bool = False
    refresh_at: float = math.inf
    expires_at: float = math.inf


class _ConnectStep(enum.Enum):
    PERMISSION = "permission"  # waiting for CreatePermission (RFC 6062 §5.2 checks it)
    BACKOFF = "backoff"  # a 447 came less than 10 s ago (RFC 6062 §4.3)
    SENT = "sent"  # the Connect transaction runs


@dataclass(eq=False, slots=True)
class _Connect:
    """One Connect the application asked for (RFC 6062 §4.3), until its outcome."""

    peer: Address
    step: _ConnectStep
    not_before: float = 0.0


def normalize_ip(ip: str) -> str:
    """The canonical text of an IP address (as XOR-PEER-ADDRESS decodes it), the key of
    permissions and channels; raises LocalProtocolError for anything else (a DNS name)."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError as exc:
        raise LocalProtocolError(f"peer must be an IP address, not {ip!r}") from exc


class TurnClientConnection:
    """A TURN client allocation over one 5-tuple (see the module docstring)."""

    def __init__(
        self,
        server: Address,
        username: str,
        password: str,
        *,
        stream: bool = False,
        config: TurnClientConfig | None = None,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``server``: the server's (IP, port) as the transport reaches it. ``stream``: the
        transport is TCP or TLS (framing of RFC 8656 §12.5; one transmission per request,
        RFC 8489 §6.2.2). ``token_bytes``: source of transaction IDs, injectable so that
        simulations replay exactly."""
        self._server = server
        self._username = opaque_string(username)  # RFC 8489 §14.3: USERNAME is OpaqueString
        self._password = password
        self._stream = stream
        self._config = config if config is not None else TurnClientConfig()
        self._tcp = self._config.requested_transport == "tcp"
        if self._tcp and not stream:
            # RFC 6062 §4.1: the Allocate for a TCP relay goes over a TCP or TLS connection.
            raise LocalProtocolError("a TCP allocation needs a TCP or TLS control connection")
        self._token = token_bytes
        self._tm = TransactionManager(self._config.transaction)
        self._framer = StreamFramer() if stream else None

        self._state = ClientState.IDLE
        self._auth: LongTermAuth | None = None
        self._requests: dict[bytes, _Request] = {}
        self._transmits: deque[Transmit] = deque()
        self._events: deque[ev.TurnClientEvent] = deque()
        self._redirects: dict[Address, float] = {}
        self._dont_fragment = self._config.dont_fragment
        self._reallocating = False

        self._relayed: tuple[Address, ...] = ()
        self._mapped: Address | None = None
        self._lifetime = 0
        self._refresh_at = math.inf
        self._expires_at = math.inf
        self._refresh_inflight = False

        self._permissions: dict[str, _Permission] = {}
        self._channels: dict[Address, _Channel] = {}
        self._channel_numbers: dict[int, _Channel] = {}
        self._next_channel = CHANNEL_MIN
        self._connects: dict[Address, _Connect] = {}
        self._connect_retry_at: dict[Address, float] = {}

        self._last_sent = -math.inf
        self._keepalive_at = math.inf
        self._deadline: float | None = None
        self._dirty = True
        self._tm_sends = False
        self.stats = TurnClientStats()

    # --- read-only state -----------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def server(self) -> Address:
        return self._server

    @property
    def config(self) -> TurnClientConfig:
        return self._config

    @property
    def is_tcp_allocation(self) -> bool:
        """The allocation relays TCP (RFC 6062): peers go through Connect, ConnectionAttempt
        and data connections instead of :meth:`send_to`."""
        return self._tcp

    @property
    def relayed_addresses(self) -> tuple[Address, ...]:
        """The relayed transport address(es), empty until allocated (two when dual)."""
        return self._relayed

    @property
    def relayed_address(self) -> Address | None:
        return self._relayed[0] if self._relayed else None

    @property
    def mapped_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS of the Allocate response: the client as the server sees it."""
        return self._mapped

    @property
    def lifetime(self) -> int:
        """The lifetime the server granted in its last Allocate or Refresh response."""
        return self._lifetime

    @property
    def password_algorithm(self) -> PasswordAlgorithm | None:
        """The algorithm of the long-term key in use, once the server challenged us."""
        return self._auth.algorithm if self._auth is not None else None

    def has_permission(self, peer_ip: str) -> bool:
        permission = self._permissions.get(peer_ip) or self._permissions.get(normalize_ip(peer_ip))
        return permission is not None and permission.installed

    def channel_for(self, peer: Address) -> int | None:
        """The channel number bound to ``peer``, or None while data goes in indications."""
        channel = self._channels.get(peer)
        return channel.number if channel is not None and channel.bound else None

    # --- API -----------------------------------------------------------------------------

    def allocate(self, now: float, server: Address | None = None) -> None:
        """Start the Allocate transaction; ``server`` switches to another server first (after
        :class:`~tsunagu.turn.client_events.AlternateServer`, with the new transport)."""
        if self._state not in (ClientState.IDLE, ClientState.REDIRECTED, ClientState.FAILED):
            raise LocalProtocolError(f"cannot allocate in state {self._state.value}")
        if server is not None and server != self._server:
            # RFC 8489 §9.2.3.1: the first request to a new server carries no credentials.
            self._server = server
            self._auth = None
            if self._framer is not None:
                self._framer = StreamFramer()
        self._redirects.setdefault(self._server, now)
        self._reallocating = False
        self._state = ClientState.ALLOCATING
        self._start(_Request(_Kind.ALLOCATE, []), now)

    def create_permission(self, peer_ip: str, now: float) -> None:
        """Install a permission for ``peer_ip`` now and keep it refreshed until close, so the
        peer can reach the relayed address before we send to it (as ICE needs)."""
        self._require_allocated()
        ip = normalize_ip(peer_ip)
        permission = self._permissions.get(ip)
        if permission is None:
            permission = self._permissions[ip] = _Permission(ip)
        permission.pinned = True
        if not permission.installed and not permission.inflight:
            self._request_permission(permission, now)

    def connect(self, peer: Address, now: float) -> None:
        """Ask the server to open a TCP connection from the relayed address to ``peer``
        (RFC 6062 §4.3); :class:`~tsunagu.turn.client_events.ConnectSucceeded` (with the
        CONNECTION-ID for :meth:`bind_connection`) or
        :class:`~tsunagu.turn.client_events.ConnectFailed` follows.

        The peer's IP gets a permission first, created as for UDP and kept refreshed until
        close (servers check it, and RFC 6062 §5.3 needs it for the peer's own connections
        too). After a 447 the Connect to the same peer waits out the 10 s of §4.3."""
        self._require_allocated()
        if not self._tcp:
            raise LocalProtocolError("Connect needs a TCP allocation (RFC 6062 §4.3)")
        peer = (normalize_ip(peer[0]), peer[1])
        if peer in self._connects:
            # RFC 6062 §4.3: "Connect requests with the same XOR-PEER-ADDRESS parameter MUST
            # NOT be sent simultaneously."
            raise LocalProtocolError(f"a Connect to {peer[0]} port {peer[1]} is in progress")
        if self._connect_retry_at:  # forget 447s whose 10 s are over
            self._connect_retry_at = {p: t for p, t in self._connect_retry_at.items() if t > now}
        connect = self._connects[peer] = _Connect(peer, _ConnectStep.PERMISSION)
        permission = self._permissions.get(peer[0])
        if permission is None:
            permission = self._permissions[peer[0]] = _Permission(peer[0])
        permission.pinned = True
        if not permission.installed:
            if not permission.inflight:
                self._request_permission(permission, now)
            return
        self._send_connect(connect, now)

    def bind_connection(self, connection_id: int, peer: Address | None = None) -> DataConnection:
        """The handshake of a new data connection for ``connection_id`` (from
        :class:`~tsunagu.turn.client_events.ConnectSucceeded` or
        :class:`~tsunagu.turn.client_events.ConnectionAttempt`), carrying this connection's
        credentials as RFC 6062 §4.3/§4.4 require. The driver connects it to :attr:`server`
        with the control connection's transport (TCP or TLS)."""
        self._require_allocated()
        if not self._tcp:
            raise LocalProtocolError("ConnectionBind needs a TCP allocation (RFC 6062 §4.3)")
        return DataConnection(
            connection_id,
            self._server,
            self._username,
            self._password,
            self._auth.copy() if self._auth is not None else None,
            peer=peer,
            transaction=self._config.transaction,
            fingerprint=self._config.fingerprint,
            max_challenges=self._config.max_challenges,
            token_bytes=self._token,
        )

    def send_to(self, data: bytes, peer: Address, now: float) -> None:
        """Relay ``data`` to ``peer``: as ChannelData when a channel is bound, else in a Send
        indication; the first datagram to a new peer IP waits for its permission."""
        if self._tcp:
            # RFC 6062 §5: a TCP allocation relays over data connections, never in Send
            # indications or ChannelData.
            raise LocalProtocolError("a TCP allocation has no datagrams: use connect()")
        if self._state is not ClientState.ALLOCATED:
            if self._reallocating and self._state is ClientState.ALLOCATING:
                self.stats.dropped += 1  # like a datagram lost in the network
                return
            self._require_allocated()
        length = len(data)
        if length > 0xFFFF:
            raise LocalProtocolError("a datagram for the relay is at most 65535 bytes")
        self._last_sent = now
        permission = self._permissions.get(peer[0])
        if permission is not None and permission.installed and not permission.stale:
            # The steady state, inlined: permission and channel in place, ChannelData out.
            permission.used = True
            channel = self._channels.get(peer)
            if channel is not None and channel.bound and not channel.stale:
                channel.used = True
                frame = _CHANNEL_HEAD.pack(channel.number, length) + data
                if self._stream and length & 3:
                    frame += _PADDING[length & 3]  # RFC 8656 §12.5: pad to 4 over TCP/TLS
                self.stats.sent_channel_data += 1
                self._transmits.append(Transmit(frame, self._server))
                return
        if permission is None:
            peer = (normalize_ip(peer[0]), peer[1])
            permission = self._permissions.get(peer[0])
            if permission is None:
                permission = self._permissions[peer[0]] = _Permission(peer[0])
        if not permission.installed:
            if len(permission.queue) >= self._config.max_queued_per_peer:
                self.stats.dropped += 1
            else:
                permission.queue.append((bytes(data), peer))
            if not permission.inflight:
                self._request_permission(permission, now)
            return
        permission.used = True
        if permission.stale:
            self._request_permission(permission, now)
        self._send_data(data, peer, now)

    def close(self, now: float) -> None:
        """Delete the allocation (Refresh with LIFETIME 0, RFC 8656 §8.1), then
        :class:`~tsunagu.turn.client_events.Closed`. Without an allocation, close at once."""
        if self._state in (ClientState.CLOSING, ClientState.CLOSED):
            return
        allocated = self._state is ClientState.ALLOCATED
        self._cancel_all()
        self._abort_connects(LocalProtocolError("the TURN client is closing"))
        self._forget_allocation()
        if allocated:
            self._state = ClientState.CLOSING
            self._start(_Request(_Kind.DEALLOCATE, [Lifetime(0)]), now)
        else:
            self._state = ClientState.CLOSED
            self._events.append(ev.Closed())

    # --- inputs --------------------------------------------------------------------------

    def handle_datagram(self, data: bytes, now: float) -> None:
        """One UDP datagram from the server: a STUN message or ChannelData (RFC 7983)."""
        if not data:
            self.stats.discarded += 1
            return
        first = data[0]
        if first < 4:
            self._handle_stun(data, now)
        elif 64 <= first <= 79:
            self._handle_channel_data(data, now)
        else:
            self.stats.discarded += 1  # RFC 8656 §12 Table 3: reserved, MUST be dropped

    def handle_stream_data(self, data: bytes, now: float) -> None:
        """Bytes from the TCP/TLS connection. A stream that cannot be framed cannot be
        resynchronised: the allocation is declared lost and the driver should close."""
        if self._framer is None:
            raise LocalProtocolError("handle_stream_data needs stream=True")
        try:
            frames = self._framer.feed(data)
        except StunDecodeError as exc:
            self._transport_failed(exc, now)
            return
        for frame in frames:
            self.handle_datagram(frame, now)

    def handle_unreachable(self, reason: str, now: float) -> None:
        """The transport reported the server unreachable (e.g. ICMP port unreachable on a
        connected UDP socket). While the first Allocate is outstanding this fails it at once
        instead of waiting for the transaction timeout; later it is ignored, since a lost
        server shows as a Refresh timeout and ICMP alone is easy to spoof."""
        if self._state is ClientState.ALLOCATING and not self._reallocating:
            self._cancel_all()
            self._state = ClientState.FAILED
            self._events.append(ev.AllocationFailed(TurnError(0, f"server unreachable: {reason}")))

    def connection_lost(self, now: float, reason: str = "connection closed") -> None:
        """The TCP/TLS connection to the server ended; over TCP the allocation goes with it."""
        self._transport_failed(TurnError(0, f"connection to the TURN server lost: {reason}"), now)

    def handle_timeout(self, now: float) -> None:
        """Fire every timer due at ``now``: retransmissions and transaction timeouts, and the
        refreshes of the allocation, permissions and channels."""
        self._tm.handle_timeout(now)
        self._tm_sends = self._dirty = True
        while (timed_out := self._tm.poll_event()) is not None:
            request = self._requests.pop(timed_out.transaction_id, None)
            if request is None:
                continue
            self._dirty = True
            error: TsunaguError
            if request.integrity_failed:
                error = IntegrityError(
                    f"every response to {request.kind.value} failed MESSAGE-INTEGRITY"
                )
            else:
                error = TransactionTimeoutError(
                    f"no response to {request.kind.value} from {self._server[0]} "
                    f"port {self._server[1]}"
                )
            self._request_failed(request, error, now)
        if self._state is not ClientState.ALLOCATED:
            return
        if now >= self._expires_at:
            self._allocation_lost(TurnError(437, "allocation expired"), now, reallocate=False)
            return
        if now >= self._refresh_at and not self._refresh_inflight:
            self._refresh_allocation(now)
        for permission in list(self._permissions.values()):
            if not permission.installed or permission.inflight:
                continue
            if permission.stale:
                if now >= permission.expires_at:
                    self._expire_permission(permission)
            elif now >= permission.refresh_at:
                if permission.used or permission.pinned:
                    self._request_permission(permission, now)
                else:
                    permission.stale = True
                    self._dirty = True
        for channel in self._channels.values():
            if not channel.bound or channel.inflight:
                continue
            if channel.stale:
                if now >= channel.expires_at:
                    channel.bound = channel.stale = False
                    self._dirty = True
            elif now >= channel.refresh_at:
                if channel.used:
                    self._request_channel(channel, now)
                else:
                    channel.stale = True
                    self._dirty = True
        for connect in list(self._connects.values()):
            if connect.step is _ConnectStep.BACKOFF and now >= connect.not_before:
                self._send_connect(connect, now)
        if now >= self._keepalive_at:
            interval = self._config.keepalive_interval
            assert interval is not None
            if now - self._last_sent >= interval:
                keepalive = Message(Method.BINDING, MessageClass.INDICATION, self._token(12))
                self._transmits.append(Transmit(keepalive.encode(fingerprint=True), self._server))
                self._last_sent = now
            self._keepalive_at = self._last_sent + interval
            self._dirty = True

    # --- outputs -------------------------------------------------------------------------

    def poll_transmit(self) -> Transmit | None:
        """The next bytes to send to the server, or None."""
        if self._tm_sends:  # requests and retransmissions first
            item = self._tm.poll_transmit()
            if item is not None:
                return Transmit(item[0], item[1])
            self._tm_sends = False
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> ev.TurnClientEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """Absolute time at which :meth:`handle_timeout` must be called next, or None."""
        if self._dirty:
            # Every change to a timer, the transaction manager's included, goes through a
            # method of ours that sets _dirty, so the answer is cached in between.
            self._dirty = False
            own = self._compute_deadline()
            transactions = self._tm.poll_timeout()
            if transactions is None:
                self._deadline = own
            else:
                self._deadline = transactions if own is None else min(transactions, own)
        return self._deadline

    # --- requests ------------------------------------------------------------------------

    def _require_allocated(self) -> None:
        if self._state is not ClientState.ALLOCATED:
            raise LocalProtocolError(f"no allocation (state {self._state.value})")

    def _allocate_attributes(self) -> list[Attribute]:
        config = self._config
        # RFC 8656 §7.1; TCP (6) asks for an RFC 6062 TCP allocation (§4.1).
        transport = TRANSPORT_TCP if self._tcp else TRANSPORT_UDP
        attributes: list[Attribute] = [RequestedTransport(transport)]
        if config.address_family is not None:
            attributes.append(RequestedAddressFamily(config.address_family))
        if config.dual_stack:
            attributes.append(AdditionalAddressFamily(AddressFamily.IPV6))
        if config.requested_lifetime is not None:
            attributes.append(Lifetime(config.requested_lifetime))
        if self._dont_fragment:
            attributes.append(DontFragment())
        if config.reservation_token is not None:
            attributes.append(ReservationToken(config.reservation_token))
        elif config.even_port:
            attributes.append(EvenPort(config.reserve_next_port))
        return attributes

    def _start(self, request: _Request, now: float) -> None:
        """Send ``request`` in a new transaction, with the credentials we hold (§9.2.3)."""
        kind = request.kind
        if kind is _Kind.ALLOCATE:
            request.attributes = self._allocate_attributes()
        attributes = list(request.attributes)
        if self._config.software is not None and kind in (
            _Kind.ALLOCATE,
            _Kind.REFRESH,
            _Kind.DEALLOCATE,
        ):
            attributes.append(Software(self._config.software))
        auth = self._auth
        key: bytes | None = None
        integrity: IntegrityAlgorithm = "sha1"
        if auth is not None:
            attributes.extend(auth.attributes(self._username))
            key, integrity = auth.key, auth.integrity
        transaction_id = self._token(12)
        message = Message(kind.method, MessageClass.REQUEST, transaction_id, attributes)
        data = message.encode(key, integrity=integrity, fingerprint=self._config.fingerprint)
        request.key = key
        request.started = now
        request.integrity_failed = False
        self._requests[transaction_id] = request
        self._tm.start(transaction_id, data, self._server, now, reliable=self._stream)
        self._last_sent = now
        self._tm_sends = self._dirty = True

    def _cancel_all(self) -> None:
        for transaction_id in self._requests:
            self._tm.cancel(transaction_id)
        self._requests.clear()
        self._refresh_inflight = False
        self._dirty = True

    def _handle_stun(self, data: bytes, now: float) -> None:
        try:
            message = Message.decode(data)
        except StunDecodeError:
            self.stats.discarded += 1
            return
        message_class = message.message_class
        if message.legacy or message_class is MessageClass.REQUEST:
            self.stats.discarded += 1
            return
        if message_class is MessageClass.INDICATION:
            if message.method == Method.DATA:
                self._handle_data_indication(message, now)
            elif message.method == Method.CONNECTION_ATTEMPT:
                self._handle_connection_attempt(message)
            else:
                self.stats.discarded += 1
            return
        transaction_id = message.transaction_id
        request = self._requests.get(transaction_id)
        if request is None or message.method != request.kind.method:
            self.stats.discarded += 1  # stray, late or duplicate (RFC 8489 §6.3)
            return
        error = message.error
        code = error.code if error is not None else None
        nonce = message.get(Nonce)
        bid_down = nonce is not None and password_algorithms_stripped(
            nonce.value, message.get(PasswordAlgorithms)
        )
        if code in (401, 438):
            if not self._tm.handle_response(transaction_id, now):
                return
            del self._requests[transaction_id]
            self._dirty = True
            assert error is not None and code is not None
            if bid_down:
                # RFC 8489 §9.2.5: "MUST NOT retry" -- someone stripped PASSWORD-ALGORITHMS.
                self._request_failed(
                    request, TurnError(code, "nonce cookie without PASSWORD-ALGORITHMS"), now
                )
            else:
                self._challenge(request, message, code, error.reason, now)
            return
        if bid_down:
            self.stats.discarded += 1  # RFC 8489 §9.2.5: "the response MUST be ignored"
            return
        if request.key is not None and code != 300 and not message.verify_integrity(request.key):
            # RFC 8489 §9.2.5: an unauthenticated answer to an authenticated request is
            # discarded; over UDP retransmission goes on, over TCP/TLS the transaction ends.
            self.stats.discarded += 1
            if not self._stream:
                request.integrity_failed = True
                return
            self._tm.cancel(transaction_id)
            del self._requests[transaction_id]
            self._dirty = True
            self._request_failed(request, IntegrityError("response failed MESSAGE-INTEGRITY"), now)
            return
        if not self._tm.handle_response(transaction_id, now):
            return
        del self._requests[transaction_id]
        self._dirty = True
        if request.key is not None and self._auth is not None and request.key == self._auth.key:
            self._auth.proven = True
        if error is None:
            self._request_succeeded(request, message, now)
        elif code == 420 and request.kind is _Kind.ALLOCATE and self._dont_fragment:
            unknown = message.get(UnknownAttributes)
            if unknown is not None and AttrType.DONT_FRAGMENT in unknown.types:
                # RFC 8656 §7.4: the server lacks DONT-FRAGMENT; retry without it.
                self._dont_fragment = False
                self._start(request, now)
            else:
                self._request_failed(request, TurnError(420, error.reason), now)
        elif code == 300 and request.kind is _Kind.ALLOCATE:
            self._try_alternate(message, error.reason, now)
        else:
            assert code is not None
            self._request_failed(request, TurnError(code, error.reason), now)

    def _challenge(
        self, request: _Request, message: Message, code: int, reason: str, now: float
    ) -> None:
        """401 and 438 (RFC 8489 §9.2.5): retry with (new) credentials, or give up."""
        realm = message.get(Realm)
        nonce = message.get(Nonce)
        if realm is None or nonce is None:
            self._request_failed(request, TurnError(code, f"{reason} (no REALM/NONCE)"), now)
            return
        offered = message.get(PasswordAlgorithms)
        old = self._auth
        if code == 401 and request.key is not None and old is not None and realm.value == old.realm:
            if not old.proven or request.reauthenticated:
                # "MUST NOT perform this retry if it is not changing the USERNAME, USERHASH,
                # REALM, or its associated password": the server refuses our credentials.
                self._request_failed(request, TurnError(401, reason), now)
                return
            # These credentials were accepted before, so the server does not refuse them: it
            # lost our nonce (a restart, a revoked nonce). Start over once with the new one.
            request.reauthenticated = True
            old.proven = False
        if request.challenges >= self._config.max_challenges:
            self._request_failed(request, TurnError(code, reason), now)
            return
        request.challenges += 1
        try:
            self._auth = LongTermAuth.for_retry(
                old,
                self._username,
                self._password,
                realm=realm.value,
                nonce=nonce.value,
                offered=offered,
            )
        except CredentialError as exc:
            self._request_failed(request, TurnError(code, f"{reason} ({exc})"), now)
            return
        self._start(request, now)

    def _try_alternate(self, message: Message, reason: str, now: float) -> None:
        """300 Try Alternate (RFC 8656 §7.4, RFC 8489 §10)."""
        family = ":" in self._server[0]
        candidates = [a.address for a in message.get_all(AlternateServer)]
        # The first ALTERNATE-SERVER has the family of our request; prefer it.
        target = next((a for a in candidates if (":" in a[0]) == family), None)
        if target is None:
            self._fail_allocation(TurnError(300, f"{reason} (no usable ALTERNATE-SERVER)"))
            return
        tried = self._redirects.get(target)
        if tried is not None and now - tried < _REDIRECT_MEMORY:
            # "If the client has been redirected to a server to which it has already sent
            # this request within the last five minutes, it MUST ignore the redirection."
            self._fail_allocation(TurnError(300, f"{reason} (redirection loop via {target})"))
            return
        domain = message.get(AlternateDomain)
        self._redirects[target] = now
        self._state = ClientState.REDIRECTED
        self._events.append(ev.AlternateServer(target, domain.value if domain else None))

    def _fail_allocation(self, error: TsunaguError) -> None:
        self._cancel_all()
        self._abort_connects(error)
        self._forget_allocation()
        self._state = ClientState.FAILED
        self._reallocating = False
        self._events.append(ev.AllocationFailed(error))

    # --- outcomes ------------------------------------------------------------------------

    def _request_succeeded(self, request: _Request, message: Message, now: float) -> None:
        kind = request.kind
        if kind is _Kind.ALLOCATE:
            self._allocated(message, request.started, now)
        elif kind is _Kind.REFRESH:
            self._refresh_inflight = False
            lifetime = message.get(Lifetime)
            granted = lifetime.value if lifetime is not None else DEFAULT_LIFETIME
            self._set_lifetime(granted, request.started)
            self._events.append(ev.AllocationRefreshed(granted))
        elif kind is _Kind.DEALLOCATE:
            self._state = ClientState.CLOSED
            self._events.append(ev.Closed())
        elif kind is _Kind.PERMISSION:
            assert request.peer is not None
            permission = self._permissions.get(request.peer[0])
            if permission is not None:
                permission.inflight = False
                self._permission_installed(permission, request.started, now)
        elif kind is _Kind.CONNECT:
            assert request.peer is not None
            self._connect_succeeded(request.peer, message)
        else:
            assert request.peer is not None
            channel = self._channels.get(request.peer)
            if channel is None:
                return
            channel.inflight = False
            channel.bound = True
            channel.stale = False
            channel.refresh_at = request.started + self._config.refresh_delay(CHANNEL_LIFETIME)
            channel.expires_at = request.started + CHANNEL_LIFETIME
            self._events.append(ev.ChannelBound(channel.peer, channel.number))
            # RFC 8656 §12.3: the binding installed or refreshed the permission too.
            permission = self._permissions.get(channel.peer[0])
            if permission is not None:
                self._permission_installed(permission, request.started, now)

    def _allocated(self, message: Message, started: float, now: float) -> None:
        relayed = tuple(a.address for a in message.get_all(XorRelayedAddress))
        if not relayed:
            self._fail_allocation(TurnError(0, "Allocate success without XOR-RELAYED-ADDRESS"))
            return
        mapped = message.get(XorMappedAddress)
        lifetime = message.get(Lifetime)
        token = message.get(ReservationToken)
        reallocated = self._reallocating
        self._reallocating = False
        self._relayed = relayed
        self._mapped = mapped.address if mapped is not None else None
        self._state = ClientState.ALLOCATED
        granted = lifetime.value if lifetime is not None else DEFAULT_LIFETIME
        self._set_lifetime(granted, started)
        interval = self._config.keepalive_interval
        if interval is not None and not self._stream:
            self._keepalive_at = started + interval
        self._events.append(
            ev.Allocated(
                relayed=relayed,
                mapped=self._mapped,
                lifetime=granted,
                reservation_token=token.value if token is not None else None,
                address_errors=tuple(
                    (a.family, TurnError(a.code, a.reason))
                    for a in message.get_all(AddressErrorCode)
                ),
                reallocated=reallocated,
            )
        )
        for permission in self._permissions.values():  # pinned ones kept over a reallocation
            self._request_permission(permission, now)

    def _set_lifetime(self, lifetime: int, started: float) -> None:
        # Timers run from when the request was sent: the server started its own later, so
        # our view of the expiry errs on the early side.
        self._lifetime = lifetime
        effective = max(lifetime, 1)
        self._refresh_at = started + self._config.refresh_delay(effective)
        self._expires_at = started + effective
        self._dirty = True

    def _request_failed(self, request: _Request, error: TsunaguError, now: float) -> None:
        kind = request.kind
        code = error.code if isinstance(error, TurnError) else None
        if kind is _Kind.ALLOCATE:
            self._fail_allocation(error)
        elif kind is _Kind.REFRESH:
            self._refresh_inflight = False
            self._allocation_lost(error, now, reallocate=code == 437)
        elif kind is _Kind.DEALLOCATE:
            self._state = ClientState.CLOSED
            # RFC 8656 §8.3: a 437 to a deletion means the allocation is already gone.
            self._events.append(ev.Closed(None if code == 437 else error))
        elif code == 437:
            # RFC 8656 §5: "A client receiving a 437 error response to a request other than
            # Allocate MUST assume the allocation no longer exists."
            self._allocation_lost(error, now, reallocate=True)
        elif kind is _Kind.PERMISSION:
            assert request.peer is not None
            permission = self._permissions.pop(request.peer[0], None)
            if permission is not None:
                self.stats.dropped += len(permission.queue)
                self._dirty = True
                self._unbind_channels_of(permission.ip)
            self._events.append(ev.PermissionFailed(request.peer[0], error))
            # A Connect waiting for this permission cannot succeed (RFC 6062 §5.2: 403).
            for connect in list(self._connects.values()):
                if connect.peer[0] == request.peer[0]:
                    del self._connects[connect.peer]
                    self._events.append(ev.ConnectFailed(connect.peer, error))
        elif kind is _Kind.CONNECT:
            assert request.peer is not None
            self._connects.pop(request.peer, None)
            if code == 447:
                # RFC 6062 §4.3: a retry to this peer "MUST wait at least 10 seconds".
                self._connect_retry_at[request.peer] = now + CONNECT_RETRY_DELAY
            self._events.append(ev.ConnectFailed(request.peer, error))
        else:
            assert request.peer is not None
            channel = self._channels.get(request.peer)
            if channel is not None:
                channel.inflight = False
                channel.failed = True
                channel.bound = False
            self._events.append(ev.ChannelBindFailed(request.peer, error))

    def _allocation_lost(self, error: TsunaguError, now: float, *, reallocate: bool) -> None:
        pinned = [ip for ip, p in self._permissions.items() if p.pinned]
        self._cancel_all()
        self._abort_connects(error)
        self._forget_allocation()
        can_reallocate = reallocate and self._config.reallocate
        self._events.append(ev.AllocationLost(error, reallocating=can_reallocate))
        if not can_reallocate:
            self._state = ClientState.FAILED
            return
        for ip in pinned:
            self._permissions[ip] = _Permission(ip, pinned=True)
        self._state = ClientState.ALLOCATING
        self._reallocating = True
        self._start(_Request(_Kind.ALLOCATE, []), now)

    def _transport_failed(self, error: TsunaguError, now: float) -> None:
        state = self._state
        if state in (ClientState.CLOSED, ClientState.FAILED):
            return
        self._cancel_all()
        self._abort_connects(error)
        self._forget_allocation()
        if state is ClientState.CLOSING:
            self._state = ClientState.CLOSED
            # Over TCP/TLS the server deletes the allocation with the connection.
            self._events.append(ev.Closed())
        elif state is ClientState.ALLOCATED or self._reallocating:
            self._state = ClientState.FAILED
            self._reallocating = False
            self._events.append(ev.AllocationLost(error))
        else:
            self._state = ClientState.FAILED
            self._events.append(ev.AllocationFailed(error))

    def _forget_allocation(self) -> None:
        self._permissions.clear()
        self._channels.clear()
        self._channel_numbers.clear()
        self._next_channel = CHANNEL_MIN
        self._connect_retry_at.clear()
        self._relayed = ()
        self._refresh_at = self._expires_at = self._keepalive_at = math.inf
        self._refresh_inflight = False
        self._dirty = True

    def _refresh_allocation(self, now: float) -> None:
        attributes: list[Attribute] = []
        if self._config.requested_lifetime is not None:
            attributes.append(Lifetime(self._config.requested_lifetime))
        self._refresh_inflight = True
        self._start(_Request(_Kind.REFRESH, attributes), now)

    # --- permissions and channels --------------------------------------------------------

    def _request_permission(self, permission: _Permission, now: float) -> None:
        """CreatePermission for one IP (RFC 8656 §10.1); the port is ignored by the server."""
        permission.inflight = True
        permission.used = False
        permission.stale = False
        peer = (permission.ip, 0)
        self._start(_Request(_Kind.PERMISSION, [XorPeerAddress(peer)], peer=peer), now)

    def _permission_installed(self, permission: _Permission, started: float, now: float) -> None:
        first = not permission.installed
        permission.installed = True
        permission.stale = False
        permission.refresh_at = started + self._config.refresh_delay(PERMISSION_LIFETIME)
        permission.expires_at = started + PERMISSION_LIFETIME
        self._dirty = True
        if first:
            self._events.append(ev.PermissionCreated(permission.ip))
        queue = permission.queue
        while queue:
            data, peer = queue.popleft()
            self._send_data(data, peer, now)
        if self._connects:
            for connect in list(self._connects.values()):
                if connect.step is _ConnectStep.PERMISSION and connect.peer[0] == permission.ip:
                    self._send_connect(connect, now)

    def _expire_permission(self, permission: _Permission) -> None:
        del self._permissions[permission.ip]
        self.stats.dropped += len(permission.queue)
        self._unbind_channels_of(permission.ip)
        self._dirty = True

    def _unbind_channels_of(self, ip: str) -> None:
        # Without the permission the server relays nothing; the channel number stays
        # reserved for its peer and is bound again on the next use.
        for channel in self._channels.values():
            if channel.peer[0] == ip:
                channel.bound = channel.stale = False

    def _request_channel(self, channel: _Channel, now: float) -> None:
        """ChannelBind (RFC 8656 §12.1); the same request refreshes the binding."""
        channel.inflight = True
        channel.used = False
        channel.stale = False
        self._start(
            _Request(
                _Kind.CHANNEL_BIND,
                [ChannelNumber(channel.number), XorPeerAddress(channel.peer)],
                peer=channel.peer,
            ),
            now,
        )

    def _send_data(self, data: bytes, peer: Address, now: float) -> None:
        channel = self._channels.get(peer)
        if channel is not None and channel.bound:
            channel.used = True
            if channel.stale:
                self._request_channel(channel, now)
            length = len(data)
            frame = _CHANNEL_HEAD.pack(channel.number, length) + data
            if self._stream and length & 3:
                frame += _PADDING[length & 3]  # RFC 8656 §12.5: pad to 4 over TCP/TLS
            self.stats.sent_channel_data += 1
            self._transmits.append(Transmit(frame, self._server))
            return
        if self._config.channels:
            if channel is None:
                if self._next_channel <= CHANNEL_MAX:
                    channel = _Channel(self._next_channel, peer)
                    self._next_channel += 1
                    self._channels[peer] = channel
                    self._channel_numbers[channel.number] = channel
                    self._request_channel(channel, now)
            elif not channel.inflight and not channel.failed:
                self._request_channel(channel, now)  # the binding expired; bind it again
            if channel is not None:
                channel.used = True
        attributes: list[Attribute] = [XorPeerAddress(peer), Data(bytes(data))]
        if self._dont_fragment:
            attributes.append(DontFragment())
        indication = Message(Method.SEND, MessageClass.INDICATION, self._token(12), attributes)
        self.stats.sent_indications += 1
        self._transmits.append(Transmit(indication.encode(), self._server))

    def _handle_data_indication(self, message: Message, now: float) -> None:
        """RFC 8656 §11.4 and §11.6."""
        peer_attribute = message.get(XorPeerAddress)
        if peer_attribute is None or self._state is not ClientState.ALLOCATED:
            self.stats.discarded += 1
            return
        peer = peer_attribute.address
        permission = self._permissions.get(peer[0])
        if permission is None:
            self.stats.discarded += 1  # "SHOULD ... discard" without an active permission
            return
        icmp = message.get(Icmp)
        if icmp is not None:
            self._events.append(ev.PeerUnreachable(peer, icmp.icmp_type, icmp.icmp_code))
            return
        data = message.get(Data)
        if data is None:
            self.stats.discarded += 1
            return
        self._mark_used(permission, self._channels.get(peer), now)
        self.stats.received_indications += 1
        self._events.append(ev.DataReceived(data.value, peer))

    def _handle_channel_data(self, data: bytes, now: float) -> None:
        """RFC 8656 §12.6: unknown channels, and peers without permission, are discarded."""
        try:
            frame = ChannelData.decode(data)
        except StunDecodeError:
            self.stats.discarded += 1
            return
        channel = self._channel_numbers.get(frame.channel)
        permission = self._permissions.get(channel.peer[0]) if channel is not None else None
        if channel is None or permission is None or self._state is not ClientState.ALLOCATED:
            self.stats.discarded += 1
            return
        self._mark_used(permission, channel, now)
        self.stats.received_channel_data += 1
        self._events.append(ev.DataReceived(frame.data, channel.peer, frame.channel))

    def _mark_used(self, permission: _Permission, channel: _Channel | None, now: float) -> None:
        permission.used = True
        if permission.stale and not permission.inflight:
            self._request_permission(permission, now)
        if channel is not None:
            channel.used = True
            if channel.stale and channel.bound and not channel.inflight:
                self._request_channel(channel, now)

    # --- RFC 6062 TCP allocations --------------------------------------------------------

    def _send_connect(self, connect: _Connect, now: float) -> None:
        """The Connect request (RFC 6062 §4.3), unless a 447 for this peer is under 10 s old."""
        retry_at = self._connect_retry_at.get(connect.peer)
        if retry_at is not None:
            if now < retry_at:
                connect.step = _ConnectStep.BACKOFF
                connect.not_before = retry_at
                self._dirty = True
                return
            del self._connect_retry_at[connect.peer]
        connect.step = _ConnectStep.SENT
        self._start(_Request(_Kind.CONNECT, [XorPeerAddress(connect.peer)], peer=connect.peer), now)

    def _connect_succeeded(self, peer: Address, message: Message) -> None:
        self._connects.pop(peer, None)
        connection_id = message.get(ConnectionId)
        if connection_id is None:
            # RFC 6062 §5.2: the success response "MUST contain a CONNECTION-ID".
            error = TurnError(0, "Connect success without CONNECTION-ID")
            self._events.append(ev.ConnectFailed(peer, error))
            return
        self._events.append(ev.ConnectSucceeded(peer, connection_id.value))

    def _abort_connects(self, error: TsunaguError) -> None:
        connects, self._connects = self._connects, {}
        for connect in connects.values():
            self._events.append(ev.ConnectFailed(connect.peer, error))

    def _handle_connection_attempt(self, message: Message) -> None:
        """RFC 6062 §4.4: a peer connected to the relayed address. The server only sends
        this for a peer with a permission (§5.3); one we hold no permission for is stray."""
        peer_attribute = message.get(XorPeerAddress)
        connection_id = message.get(ConnectionId)
        if (
            peer_attribute is None
            or connection_id is None
            or not self._tcp
            or self._state is not ClientState.ALLOCATED
        ):
            self.stats.discarded += 1
            return
        peer = peer_attribute.address
        permission = self._permissions.get(peer[0])
        if permission is None or not permission.installed:
            self.stats.discarded += 1
            return
        permission.used = True  # the peer is active: keep its permission refreshed
        self._events.append(ev.ConnectionAttempt(peer, connection_id.value))

    # --- timers --------------------------------------------------------------------------

    def _compute_deadline(self) -> float | None:
        if self._state is not ClientState.ALLOCATED:
            return None
        deadline = self._expires_at
        if not self._refresh_inflight:
            deadline = min(deadline, self._refresh_at)
        deadline = min(deadline, self._keepalive_at)
        for permission in self._permissions.values():
            if permission.installed and not permission.inflight:
                due = permission.expires_at if permission.stale else permission.refresh_at
                deadline = min(deadline, due)
        for channel in self._channels.values():
            if channel.bound and not channel.inflight:
                due = channel.expires_at if channel.stale else channel.refresh_at
                deadline = min(deadline, due)
        for connect in self._connects.values():
            if connect.step is _ConnectStep.BACKOFF:
                deadline = min(deadline, connect.not_before)
        return None if deadline == math.inf else deadline
