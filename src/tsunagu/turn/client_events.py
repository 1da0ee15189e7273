"""Events of the sans-I/O TURN client (:mod:`tsunagu.turn.client`), pulled with
``poll_event()``.

Small frozen dataclasses, one per thing the driver or the application must learn about, as
h11 (h11/_events.py) and aioquic (quic/events.py) do. Errors travel inside events as typed
exceptions: :class:`~tsunagu.errors.TurnError` for an error response (``code`` is the STUN
error code, 0 for a local failure), :class:`~tsunagu.errors.TransactionTimeoutError` when the
server stopped answering (RFC 8489 §6.2), :class:`~tsunagu.errors.IntegrityError` when its
answers failed MESSAGE-INTEGRITY (RFC 8489 §9.2.5), and
:class:`~tsunagu.errors.StunDecodeError` when a TCP/TLS stream could not be framed.

RFC 6062 TCP allocations add three events of the control connection (:class:`ConnectSucceeded`,
:class:`ConnectFailed`, :class:`ConnectionAttempt`) and the two outcomes of a data connection's
ConnectionBind (:class:`ConnectionBound`, :class:`ConnectionBindFailed`), which
:class:`~tsunagu.turn.tcp_client.DataConnection` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsunagu.errors import TsunaguError
from tsunagu.stun.attributes import Address

__all__ = [
    "Allocated",
    "AllocationFailed",
    "AllocationLost",
    "AllocationRefreshed",
    "AlternateServer",
    "ChannelBindFailed",
    "ChannelBound",
    "Closed",
    "ConnectFailed",
    "ConnectSucceeded",
    "ConnectionAttempt",
    "ConnectionBindFailed",
    "ConnectionBound",
    "DataConnectionEvent",
    "DataReceived",
    "PeerUnreachable",
    "PermissionCreated",
    "PermissionFailed",
    "TurnClientEvent",
]


@dataclass(frozen=True, slots=True)
class Allocated:
    """The Allocate transaction succeeded (RFC 8656 §7.3).

    ``relayed`` holds one relayed transport address, or two for a dual allocation (RFC 8656
    §7.2 item 9); ``address_errors`` lists (family, error) for a family of a dual request that
    the server could not allocate (ADDRESS-ERROR-CODE, §18.12). ``reallocated`` is True when
    this allocation replaces one the server lost (437 on a Refresh, RFC 8656 §8.3): peers then
    see new relayed addresses, and permissions and channels start afresh.
    """

    relayed: tuple[Address, ...]
    mapped: Address | None
    lifetime: int
    reservation_token: bytes | None = None
    address_errors: tuple[tuple[int, TsunaguError], ...] = ()
    reallocated: bool = False


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    """Allocating failed for good (an error response, a timeout, or integrity failures)."""

    error: TsunaguError


@dataclass(frozen=True, slots=True)
class AlternateServer:
    """300 Try Alternate (RFC 8656 §7.4, RFC 8489 §10): reconnect to ``server`` with the same
    transport and credentials, then call ``allocate(now, server=...)`` again. Over TLS the
    certificate is checked against ``domain`` (ALTERNATE-DOMAIN) when it is given, else
    against the original server name."""

    server: Address
    domain: str | None = None


@dataclass(frozen=True, slots=True)
class AllocationRefreshed:
    """A Refresh succeeded; the allocation now expires ``lifetime`` seconds later (§8.3)."""

    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationLost:
    """An established allocation is gone: the server answered 437 (RFC 8656 §5, §8.3), a
    Refresh timed out (the server disappeared), the allocation expired, or the TCP/TLS
    connection failed. With ``reallocating`` the client is already allocating again and an
    :class:`Allocated` (``reallocated=True``) or :class:`AllocationFailed` follows."""

    error: TsunaguError
    reallocating: bool = False


@dataclass(frozen=True, slots=True)
class Closed:
    """The client is closed; ``error`` tells why a deallocation could not be confirmed."""

    error: TsunaguError | None = None


@dataclass(frozen=True, slots=True)
class PermissionCreated:
    """A CreatePermission (or ChannelBind) installed a permission for ``peer_ip`` (§10.3)."""

    peer_ip: str


@dataclass(frozen=True, slots=True)
class PermissionFailed:
    """The server refused or never answered a CreatePermission; data queued for the peer is
    dropped. A 403 means the server's policy refuses this peer (RFC 8656 §10.2)."""

    peer_ip: str
    error: TsunaguError


@dataclass(frozen=True, slots=True)
class ChannelBound:
    """``channel`` now carries the traffic with ``peer`` as ChannelData (RFC 8656 §12.3)."""

    peer: Address
    channel: int


@dataclass(frozen=True, slots=True)
class ChannelBindFailed:
    """A ChannelBind failed; the client keeps using Send/Data indications with ``peer``."""

    peer: Address
    error: TsunaguError


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Application data from ``peer``, relayed in a Data indication (RFC 8656 §11.4) or, when
    ``channel`` is set, in a ChannelData message (§12.6)."""

    data: bytes
    peer: Address
    channel: int | None = None


@dataclass(frozen=True, slots=True)
class PeerUnreachable:
    """A Data indication carried an ICMP attribute (RFC 8656 §11.6): the server got this ICMP
    error (type, code) for a datagram it relayed to ``peer``."""

    peer: Address
    icmp_type: int
    icmp_code: int


@dataclass(frozen=True, slots=True)
class ConnectSucceeded:
    """The server connected the TCP relayed address to ``peer`` (RFC 6062 §4.3, §5.2): open a
    new connection to the server and send ConnectionBind with ``connection_id`` (see
    :meth:`~tsunagu.turn.client.TurnClientConnection.bind_connection`) within 30 s."""

    peer: Address
    connection_id: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """A Connect request failed (RFC 6062 §4.3): ``error`` is a
    :class:`~tsunagu.errors.TurnError` with 446 Connection Already Exists, 447 Connection
    Timeout or Failure (the server could not reach the peer; a retry waits 10 s), 403
    Forbidden (peer policy, or the permission was refused), or a transaction timeout."""

    peer: Address
    error: TsunaguError


@dataclass(frozen=True, slots=True)
class ConnectionAttempt:
    """A ConnectionAttempt indication (RFC 6062 §4.4, §5.3): ``peer``, which has a permission,
    connected to the TCP relayed address. To accept, bind a data connection to
    ``connection_id`` within 30 s; otherwise the server closes the peer's connection."""

    peer: Address
    connection_id: int


@dataclass(frozen=True, slots=True)
class ConnectionBound:
    """ConnectionBind succeeded (RFC 6062 §4.3, §4.4): the data connection now carries the
    peer's bytes as they are (§4.5). ``data`` holds peer bytes that arrived right behind the
    success response; everything after it must go to the application unparsed."""

    connection_id: int
    peer: Address | None
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ConnectionBindFailed:
    """ConnectionBind failed (an error response such as 400 for an unknown or expired
    CONNECTION-ID, a timeout, or a lost connection): close the data connection."""

    connection_id: int
    peer: Address | None
    error: TsunaguError


TurnClientEvent = (
    Allocated
    | AllocationFailed
    | AlternateServer
    | AllocationRefreshed
    | AllocationLost
    | Closed
    | PermissionCreated
    | PermissionFailed
    | ChannelBound
    | ChannelBindFailed
    | DataReceived
    | PeerUnreachable
    | ConnectSucceeded
    | ConnectFailed
    | ConnectionAttempt
)
"""Every event :meth:`TurnClientConnection.poll_event` can return."""

DataConnectionEvent = ConnectionBound | ConnectionBindFailed
"""Every event :meth:`~tsunagu.turn.tcp_client.DataConnection.poll_event` can return."""
