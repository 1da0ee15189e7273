"""RFC 6062 TCP allocations: the peer connections of a TCP relayed transport address.

A peer connection is made by the server for a Connect request (§5.2) or accepted at the
relayed address (§5.3). Either way it is identified by a CONNECTION-ID and waits up to 30 s
for the client to open a data connection and send ConnectionBind (§5.4); from then on the
driver pipes the two TCP connections together and the core only tracks their lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tsunagu.stun.message import Message
from tsunagu.turn.allocation import Allocation
from tsunagu.turn.auth import Authenticated
from tsunagu.turn.transport import Address, FiveTuple

CONNECT_TIMEOUT = 30.0
"""RFC 6062 §5.2: how long a Connect may wait for the TCP handshake before 447."""

CONNECTION_BIND_TIMEOUT = 30.0
"""RFC 6062 §5.2, §5.3: a peer connection without ConnectionBind after 30 s is closed."""


class PeerConnectionState(Enum):
    CONNECTING = "connecting"
    """Connect received; the driver is opening the TCP connection to the peer."""
    PENDING_BIND = "pending-bind"
    """Established; waiting for the client's ConnectionBind on a new connection."""
    BOUND = "bound"
    """Piped to a client data connection."""


@dataclass(slots=True, eq=False)
class PeerConnection:
    """One TCP connection between a relayed transport address and a peer."""

    connection_id: int
    allocation: Allocation
    relay: Address
    peer: Address
    state: PeerConnectionState
    deadline: float
    """When CONNECTING or PENDING_BIND gives up; infinite once BOUND."""
    connect_request: Message | None = None
    """The Connect request to answer once the driver reports the outcome (§5.2)."""
    connect_auth: Authenticated | None = None
    data_connection: FiveTuple | None = None
    timer_at: float = float("inf")
