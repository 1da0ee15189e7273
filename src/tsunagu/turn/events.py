"""What the TURN server core reports to its driver (logs, metrics), as small frozen
dataclasses pulled with :meth:`~tsunagu.turn.server.TurnServerCore.poll_event`.

Nothing here is emitted per relayed packet: packet and byte counts are in
:class:`~tsunagu.turn.server.TurnStats`. Most events are reports (for logs and metrics);
the three RFC 6062 ones at the end are commands the driver must carry out.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsunagu.turn.transport import Address, FiveTuple, Transport


@dataclass(frozen=True, slots=True)
class AllocationCreated:
    """RFC 8656 §7.2: an Allocate request succeeded."""

    five_tuple: FiveTuple
    username: str
    relayed: tuple[Address, ...]
    """The relayed transport addresses as advertised to the client."""
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationRefreshed:
    """RFC 8656 §8.2: a Refresh set a new time-to-expiry."""

    five_tuple: FiveTuple
    username: str
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationDeleted:
    """The allocation is gone before its time: ``reason`` is "refresh" (LIFETIME 0),
    "connection closed" (its TCP/TLS connection ended) or "shutdown"."""

    five_tuple: FiveTuple
    username: str
    reason: str


@dataclass(frozen=True, slots=True)
class AllocationExpired:
    """The time-to-expiry reached zero without a Refresh (RFC 8656 §6)."""

    five_tuple: FiveTuple
    username: str


@dataclass(frozen=True, slots=True)
class PermissionCreated:
    """A permission for ``peer_ip`` was installed (RFC 8656 §9), not merely refreshed."""

    five_tuple: FiveTuple
    peer_ip: str


@dataclass(frozen=True, slots=True)
class PermissionExpired:
    five_tuple: FiveTuple
    peer_ip: str


@dataclass(frozen=True, slots=True)
class ChannelBound:
    """A channel binding was created (RFC 8656 §12.2), not merely refreshed."""

    five_tuple: FiveTuple
    channel: int
    peer: Address


@dataclass(frozen=True, slots=True)
class ChannelExpired:
    five_tuple: FiveTuple
    channel: int
    peer: Address


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """A request was answered 401 or 438 (RFC 8489 §9.2.4); ``username`` is what the
    request claimed, if anything."""

    source: Address
    transport: Transport
    username: str | None
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Any request answered with an error other than 401/438 (those are
    :class:`AuthFailed`); ``detail`` says why, e.g. which peer policy rule refused."""

    five_tuple: FiveTuple
    method: int
    code: int
    detail: str


# -- RFC 6062 commands: the driver must act on these --------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectToPeer:
    """Open a TCP connection from ``relay`` to ``peer`` (RFC 6062 §5.2), then call
    ``peer_connected`` or ``peer_connection_failed`` with ``connection_id``."""

    connection_id: int
    relay: Address
    peer: Address


@dataclass(frozen=True, slots=True)
class DataConnectionBound:
    """RFC 6062 §5.4: the client connection ``five_tuple`` (whose ConnectionBind success
    response was transmitted just before this event) now carries raw bytes to and from
    the peer connection ``connection_id``, including peer data buffered so far."""

    connection_id: int
    five_tuple: FiveTuple


@dataclass(frozen=True, slots=True)
class ClosePeerConnection:
    """Close peer connection ``connection_id`` (or abandon connecting) and the client data
    connection bound to it, if any (RFC 6062 §5.5). Nothing needs to be reported back."""

    connection_id: int


TurnEvent = (
    AllocationCreated
    | AllocationRefreshed
    | AllocationDeleted
    | AllocationExpired
    | PermissionCreated
    | PermissionExpired
    | ChannelBound
    | ChannelExpired
    | AuthFailed
    | RequestRejected
    | ConnectToPeer
    | DataConnectionBound
    | ClosePeerConnection
)
