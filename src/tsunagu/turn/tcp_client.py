"""The client data connection of an RFC 6062 TCP allocation, as a sans-I/O state machine.

For each peer connection -- one the server made for a Connect request (RFC 6062 §4.3) or one
a peer made to the relayed address (§4.4) -- the client opens a NEW TCP or TLS connection to
the server, "utilizing the same destination transport address to which the control
connection was established", from another local address, and sends ConnectionBind with the
CONNECTION-ID over it. Once the success response arrives, that connection is the client data
connection: it carries the peer's bytes as they are, no framing (§4.5).

:class:`DataConnection` is that handshake and nothing more; the driver owns the socket:

* inputs: :meth:`~DataConnection.connection_made` (the TCP/TLS connection is up: send the
  ConnectionBind), :meth:`~DataConnection.handle_data` (bytes from the server),
  :meth:`~DataConnection.handle_timeout`, :meth:`~DataConnection.connection_lost`;
* outputs: :meth:`~DataConnection.poll_transmit` (bytes for this connection),
  :meth:`~DataConnection.poll_event` (:class:`~tsunagu.turn.client_events.ConnectionBound` or
  :class:`~tsunagu.turn.client_events.ConnectionBindFailed`) and
  :meth:`~DataConnection.poll_timeout`.

After :class:`~tsunagu.turn.client_events.ConnectionBound` the stream belongs to the peer: the
event carries the bytes that arrived behind the response, and the driver moves every later
byte between application and socket without asking this object.

Authentication "MUST use the same method and credentials as for the control connection"
(§4.3, §4.4), so the request carries the control connection's USERNAME (or USERHASH), REALM,
NONCE and key. A server that keeps nonces per connection answers 401 or 438 with a nonce for
this one; the request is repeated once with it (RFC 8489 §9.2.5), and a 401 to that retry
means the credentials are refused. Make instances with
:meth:`tsunagu.turn.client.TurnClientConnection.bind_connection`.
"""

from __future__ import annotations

import enum
import secrets
import struct
from collections import deque
from collections.abc import Callable

from tsunagu.errors import (
    IntegrityError,
    LocalProtocolError,
    StunDecodeError,
    TransactionTimeoutError,
    TsunaguError,
    TurnError,
)
from tsunagu.stun.attributes import (
    Address,
    Attribute,
    ConnectionId,
    Nonce,
    PasswordAlgorithms,
    Realm,
)
from tsunagu.stun.constants import HEADER_LENGTH, MessageClass, Method
from tsunagu.stun.credentials import CredentialError
from tsunagu.stun.message import IntegrityAlgorithm, Message
from tsunagu.stun.transaction import TransactionConfig, TransactionManager
from tsunagu.turn import client_events as ev
from tsunagu.turn.client_auth import LongTermAuth, password_algorithms_stripped

__all__ = ["CONNECTION_BIND_TIMEOUT", "DataConnection", "DataConnectionState"]

CONNECTION_BIND_TIMEOUT = 30.0
"""RFC 6062 §5.2, §5.3: the server closes a peer connection that no ConnectionBind claimed
within 30 seconds, so a ConnectionAttempt older than this is not worth binding."""

_LENGTH = struct.Struct("!H")


class DataConnectionState(enum.Enum):
    CONNECTING = "connecting"
    """Waiting for the driver's TCP/TLS connection to the server."""
    BINDING = "binding"
    """ConnectionBind sent; waiting for its response."""
    BOUND = "bound"
    """The client data connection: raw peer bytes from here on (RFC 6062 §4.5)."""
    FAILED = "failed"


class DataConnection:
    """The ConnectionBind handshake of one client data connection (see the module docs)."""

    def __init__(
        self,
        connection_id: int,
        server: Address,
        username: str,
        password: str,
        auth: LongTermAuth | None,
        *,
        peer: Address | None = None,
        transaction: TransactionConfig | None = None,
        fingerprint: bool = True,
        max_challenges: int = 4,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``username`` is OpaqueString-prepared already; ``auth`` is a copy of the control
        connection's credential state (None when that server never challenged)."""
        if not 0 <= connection_id <= 0xFFFFFFFF:
            raise LocalProtocolError(f"CONNECTION-ID {connection_id} is not a 32-bit value")
        self._connection_id = connection_id
        self._server = server
        self._peer = peer
        self._username = username
        self._password = password
        self._auth = auth
        self._fingerprint = fingerprint
        self._max_challenges = max_challenges
        self._token = token_bytes
        self._tm = TransactionManager(
            transaction if transaction is not None else TransactionConfig()
        )
        self._state = DataConnectionState.CONNECTING
        self._transaction_id: bytes | None = None
        self._key: bytes | None = None  # the key the current request was protected with
        self._challenges = 0
        self._own_nonce = False  # the nonce in use was issued on this connection
        self._buffer = bytearray()
        self._events: deque[ev.DataConnectionEvent] = deque()

    # --- read-only state -----------------------------------------------------------------

    @property
    def state(self) -> DataConnectionState:
        return self._state

    @property
    def connection_id(self) -> int:
        return self._connection_id

    @property
    def peer(self) -> Address | None:
        return self._peer

    @property
    def server(self) -> Address:
        """Where to connect: the control connection's destination (RFC 6062 §4.3)."""
        return self._server

    # --- inputs --------------------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The new TCP/TLS connection to the server is established: send ConnectionBind."""
        if self._state is not DataConnectionState.CONNECTING:
            raise LocalProtocolError(f"connection_made in state {self._state.value}")
        self._state = DataConnectionState.BINDING
        self._send_bind(now)

    def handle_data(self, data: bytes, now: float) -> None:
        """Bytes from the server before the handshake ended. Once bound, the stream is the
        peer's and must not come here (LocalProtocolError); after a failure it is ignored."""
        state = self._state
        if state is DataConnectionState.BOUND:
            raise LocalProtocolError("the data connection is bound: its bytes are the peer's")
        if state is not DataConnectionState.BINDING:
            if state is DataConnectionState.CONNECTING:
                raise LocalProtocolError("handle_data before connection_made")
            return
        buffer = self._buffer
        buffer += data
        while self._state is DataConnectionState.BINDING and len(buffer) >= HEADER_LENGTH:
            if buffer[0] > 3:
                # Only STUN may precede the success response (RFC 6062 §5.4: data is relayed
                # after it); anything else cannot be resynchronised.
                self._fail(StunDecodeError(f"unexpected first byte {buffer[0]:#04x}"))
                return
            size = HEADER_LENGTH + _LENGTH.unpack_from(buffer, 2)[0]
            if len(buffer) < size:
                return
            frame = bytes(buffer[:size])
            del buffer[:size]
            self._handle_message(frame, now)

    def handle_timeout(self, now: float) -> None:
        """The ConnectionBind transaction timed out after Ti (RFC 8489 §6.2.2)."""
        self._tm.handle_timeout(now)
        while (timed_out := self._tm.poll_event()) is not None:
            if timed_out.transaction_id != self._transaction_id:
                continue
            self._transaction_id = None
            self._fail(
                TransactionTimeoutError(
                    f"no response to ConnectionBind from {self._server[0]} port {self._server[1]}"
                )
            )

    def connection_lost(self, now: float, reason: str = "connection closed") -> None:
        """The TCP/TLS connection ended (or never came up) before the handshake ended."""
        if self._state in (DataConnectionState.CONNECTING, DataConnectionState.BINDING):
            self._fail(TurnError(0, f"data connection to the TURN server lost: {reason}"))

    # --- outputs -------------------------------------------------------------------------

    def poll_transmit(self) -> bytes | None:
        """The next bytes to write on this data connection, or None."""
        item = self._tm.poll_transmit()  # over TCP/TLS: each request once (RFC 8489 §6.2.2)
        return item[0] if item is not None else None

    def poll_event(self) -> ev.DataConnectionEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """Absolute time at which :meth:`handle_timeout` must be called next, or None."""
        return self._tm.poll_timeout()

    # --- the handshake -------------------------------------------------------------------

    def _send_bind(self, now: float) -> None:
        """ConnectionBind with the CONNECTION-ID "echoed from the Connect Success response"
        or the ConnectionAttempt indication (RFC 6062 §4.3, §4.4)."""
        attributes: list[Attribute] = [ConnectionId(self._connection_id)]
        key: bytes | None = None
        integrity: IntegrityAlgorithm = "sha1"
        auth = self._auth
        if auth is not None:
            attributes.extend(auth.attributes(self._username))
            key, integrity = auth.key, auth.integrity
        transaction_id = self._token(12)
        message = Message(Method.CONNECTION_BIND, MessageClass.REQUEST, transaction_id, attributes)
        data = message.encode(key, integrity=integrity, fingerprint=self._fingerprint)
        self._transaction_id = transaction_id
        self._key = key
        # Over TCP/TLS a request is sent once and only Ti runs (RFC 8489 §6.2.2).
        self._tm.start(transaction_id, data, self._server, now, reliable=True)

    def _handle_message(self, frame: bytes, now: float) -> None:
        try:
            message = Message.decode(frame)
        except StunDecodeError as exc:
            self._fail(exc)
            return
        if (
            message.legacy
            or message.method != Method.CONNECTION_BIND
            or message.message_class not in (MessageClass.SUCCESS, MessageClass.ERROR)
            or message.transaction_id != self._transaction_id
        ):
            return  # stray, late or not for us (RFC 8489 §6.3): discarded
        error = message.error
        code = error.code if error is not None else None
        if code in (401, 438):
            self._end_transaction(now)
            assert error is not None and code is not None
            self._challenge(message, code, error.reason, now)
            return
        if self._key is not None and not message.verify_integrity(self._key):
            # RFC 8489 §9.2.5: over a reliable transport an unauthenticated answer ends the
            # transaction "as if the transaction timed out".
            self._end_transaction(now)
            self._fail(IntegrityError("ConnectionBind response failed MESSAGE-INTEGRITY"))
            return
        self._end_transaction(now)
        if error is not None:
            self._fail(TurnError(error.code, error.reason))
            return
        # RFC 6062 §4.3/§4.4: "if it is a success, the TCP connection on which it was sent is
        # called the client data connection"; what follows the response is the peer's.
        self._state = DataConnectionState.BOUND
        leftover = bytes(self._buffer)
        self._buffer = bytearray()
        self._events.append(ev.ConnectionBound(self._connection_id, self._peer, leftover))

    def _end_transaction(self, now: float) -> None:
        if self._transaction_id is not None:
            self._tm.handle_response(self._transaction_id, now)
            self._transaction_id = None

    def _challenge(self, message: Message, code: int, reason: str, now: float) -> None:
        """401 and 438 (RFC 8489 §9.2.5): retry with the nonce this connection was given."""
        realm = message.get(Realm)
        nonce = message.get(Nonce)
        if realm is None or nonce is None:
            self._fail(TurnError(code, f"{reason} (no REALM/NONCE)"))
            return
        offered = message.get(PasswordAlgorithms)
        if password_algorithms_stripped(nonce.value, offered):
            # RFC 8489 §9.2.5: "MUST NOT retry" -- someone stripped PASSWORD-ALGORITHMS.
            self._fail(TurnError(code, "nonce cookie without PASSWORD-ALGORITHMS"))
            return
        if code == 401 and self._key is not None and self._own_nonce:
            # The nonce came from this connection and the key was still refused: a retry
            # would not be "changing the USERNAME, USERHASH, REALM, or its password".
            self._fail(TurnError(401, reason))
            return
        # Otherwise the control connection's nonce was not valid here (servers may keep
        # nonces per connection), or it went stale: retry with this connection's own.
        if self._challenges >= self._max_challenges:
            self._fail(TurnError(code, reason))
            return
        self._challenges += 1
        try:
            self._auth = LongTermAuth.for_retry(
                self._auth,
                self._username,
                self._password,
                realm=realm.value,
                nonce=nonce.value,
                offered=offered,
            )
        except CredentialError as exc:
            self._fail(TurnError(code, f"{reason} ({exc})"))
            return
        self._own_nonce = True
        self._send_bind(now)

    def _fail(self, error: TsunaguError) -> None:
        if self._transaction_id is not None:
            self._tm.cancel(self._transaction_id)
            self._transaction_id = None
        self._buffer = bytearray()
        self._state = DataConnectionState.FAILED
        self._events.append(ev.ConnectionBindFailed(self._connection_id, self._peer, error))
