"""ICE TCP candidates (RFC 6544): RFC 4571 framing and the agent's table of connections.

The agent (:class:`~tsunagu.ice.agent.IceAgent`) decides which TCP connections exist and
what goes over them; the driver only opens, accepts, reads, writes and closes sockets,
naming each connection by the integer id the agent gave it:

* out of the agent: a check on a pair whose local candidate is active (or
  simultaneous-open) and that has no connection yet makes the agent emit
  :class:`~tsunagu.ice.events.TcpConnectRequested` (RFC 6544 §7.1: the active side opens
  the connection and sends the check over it); the check is queued until the driver
  reports :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_connected`. Every TCP
  :class:`~tsunagu.ice.transmit.Transmit` carries the ``connection`` id and data already
  framed with RFC 4571: the driver writes the bytes as they are.
  :class:`~tsunagu.ice.events.TcpCloseRequested` asks the driver to close one.
* into the agent: :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_accepted` for a
  connection that arrived on the listening socket of a passive candidate (RFC 6544 §7.2),
  :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_data` with whatever bytes the socket
  read (the agent cuts the frames), and :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_closed`
  when a connection failed, was reset or closed (RFC 6544 §7.1: the pair's check fails).

A connection is identified inside the agent by (base, remote): the base of the local
candidate -- ``(ip, 9)`` for an active one, whose connections each come from an
ephemeral port (RFC 6544 §4.5) -- and the remote transport address, which for a
connection accepted from a peer's active candidate is the peer's ephemeral port. Each
pair therefore has at most one connection, and pairs of a later ICE session with the
same base and remote reuse it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from enum import StrEnum

from tsunagu.ice.candidate import Address, Candidate, TcpType

__all__ = [
    "ACTIVE_PORT",
    "MAX_FRAME",
    "Rfc4571Framer",
    "TcpConnection",
    "TcpConnectionState",
    "TcpConnections",
    "connect_from",
    "frame",
]

ACTIVE_PORT = 9
"""RFC 6544 §4.5: active candidates are signalled with the discard port, 9 -- their
connections come from ephemeral ports nobody can know in advance."""

MAX_FRAME = 0xFFFF
"""RFC 4571 §2: the length field has 16 bits."""

_MAX_PENDING = 16
"""Frames a connection still being opened holds (checks only: nothing else is sent on a
connection before it is up)."""


def frame(data: bytes) -> bytes:
    """RFC 4571 §2: a 16-bit big-endian length, then the packet. RFC 6544 §7.1 and §10:
    STUN checks and application data alike go in these frames over ICE-TCP."""
    if len(data) > MAX_FRAME:
        raise ValueError(f"RFC 4571 frames carry at most {MAX_FRAME} bytes, not {len(data)}")
    return len(data).to_bytes(2, "big") + data


def connect_from(candidate: Candidate) -> Address:
    """Where the driver binds the socket of an outgoing connection from ``candidate``: any
    port of its IP for an active candidate, its own port for simultaneous open (both sides
    connect from the ports they signalled and the SYNs cross, RFC 6544 §7.1)."""
    if candidate.tcptype is TcpType.ACTIVE:
        return (candidate.address, 0)
    return candidate.transport_address


class Rfc4571Framer:
    """Cuts a TCP byte stream into RFC 4571 frames.

    Every length is valid, so a stream can never be out of sync: the buffer holds at most
    one incomplete frame (2 + 65535 bytes). Empty frames carry nothing and are skipped.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= 2:
            length = (buffer[offset] << 8) | buffer[offset + 1]
            end = offset + 2 + length
            if end > len(buffer):
                break
            if length:
                frames.append(bytes(buffer[offset + 2 : end]))
            offset = end
        del buffer[:offset]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class TcpConnectionState(StrEnum):
    CONNECTING = "connecting"
    """Requested from the driver (:class:`~tsunagu.ice.events.TcpConnectRequested`), not
    established yet: frames wait in :attr:`TcpConnection.pending`."""
    OPEN = "open"


class TcpConnection:
    """One TCP connection of the agent, between the base of a local candidate and a
    remote transport address."""

    __slots__ = ("base", "framer", "id", "outgoing", "pending", "remote", "state")

    def __init__(self, connection_id: int, base: Address, remote: Address, *, outgoing: bool):
        self.id = connection_id
        self.base = base
        self.remote = remote
        self.outgoing = outgoing
        self.state = TcpConnectionState.CONNECTING if outgoing else TcpConnectionState.OPEN
        self.framer = Rfc4571Framer()
        self.pending: list[bytes] = []

    def __repr__(self) -> str:
        direction = "to" if self.outgoing else "from"
        return f"<TcpConnection {self.id} {self.base} {direction} {self.remote} {self.state}>"

    def queue(self, data: bytes) -> None:
        """Hold a frame until the connection is up (bounded: a check is retried anyway)."""
        if len(self.pending) < _MAX_PENDING:
            self.pending.append(data)


class TcpConnections:
    """The agent's connections by id and by (base, remote).

    ``max_accepted`` bounds the connections peers opened to passive candidates: when a new
    one would exceed it, the oldest accepted connection that carries no pair of the agent
    (``in_use`` says which do) is evicted, or else the new one is refused -- so a peer
    that floods the listening socket with connections cannot grow the agent's state.
    """

    def __init__(self, max_accepted: int) -> None:
        if max_accepted < 1:
            raise ValueError("max_accepted must be at least 1")
        self.max_accepted = max_accepted
        self._ids = itertools.count(1)
        self._by_id: dict[int, TcpConnection] = {}
        self._by_key: dict[tuple[Address, Address], TcpConnection] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[TcpConnection]:
        return iter(list(self._by_id.values()))

    def get(self, connection_id: int) -> TcpConnection | None:
        return self._by_id.get(connection_id)

    def find(self, base: Address, remote: Address) -> TcpConnection | None:
        return self._by_key.get((base, remote))

    def is_open(self, base: Address, remote: Address) -> bool:
        connection = self._by_key.get((base, remote))
        return connection is not None and connection.state is TcpConnectionState.OPEN

    def connect(self, base: Address, remote: Address) -> TcpConnection:
        """A new outgoing connection, in the connecting state."""
        return self._add(TcpConnection(next(self._ids), base, remote, outgoing=True))

    def accept(
        self, base: Address, remote: Address, in_use: Callable[[TcpConnection], bool]
    ) -> tuple[TcpConnection | None, list[TcpConnection]]:
        """A connection a peer opened: (the new connection or None if refused, the
        connections it replaced or evicted, which the driver must close)."""
        dropped: list[TcpConnection] = []
        stale = self._by_key.get((base, remote))
        if stale is not None:  # the close of an earlier connection was not reported yet
            dropped.append(stale)
            self.remove(stale.id)
        accepted = [c for c in self._by_id.values() if not c.outgoing]
        if len(accepted) >= self.max_accepted:
            victim = next((c for c in accepted if not in_use(c)), None)
            if victim is None:
                return None, dropped
            dropped.append(victim)
            self.remove(victim.id)
        connection = TcpConnection(next(self._ids), base, remote, outgoing=False)
        return self._add(connection), dropped

    def remove(self, connection_id: int) -> TcpConnection | None:
        connection = self._by_id.pop(connection_id, None)
        if connection is not None:
            del self._by_key[(connection.base, connection.remote)]
        return connection

    def clear(self) -> None:
        self._by_id.clear()
        self._by_key.clear()

    def _add(self, connection: TcpConnection) -> TcpConnection:
        self._by_id[connection.id] = connection
        self._by_key[(connection.base, connection.remote)] = connection
        return connection
