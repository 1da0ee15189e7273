"""The asyncio TURN client: ``async with TurnClient(uri, username, password) as turn``.

A thin driver around the sans-I/O :class:`~tsunagu.turn.client.TurnClientConnection`, in the
shape DESIGN.md gives every driver (after aioquic's QuicConnectionProtocol): after each input
-- a datagram, stream bytes, a timer, an API call -- flush ``poll_transmit()`` to the socket,
deliver ``poll_event()`` to waiting futures, re-arm one ``loop.call_at(poll_timeout())``.

* Transports (RFC 8656 §3.1, RFC 7065 URIs): ``turn:host[:port]`` is UDP unless
  ``?transport=tcp``; ``turns:`` is TLS over TCP (default port 5349). Hosts may be DNS names,
  IPv4 or IPv6 literals; TCP and TLS connect with Happy Eyeballs (RFC 8656 §3.9).
* Allocation (:meth:`TurnClient.connect`): follows 300 Try Alternate by reconnecting to the
  ALTERNATE-SERVER (RFC 8489 §10), and answers a 437 to the Allocate by trying again from a
  new local port, three times in all (RFC 8656 §7.4).
* Data: ``await turn.send_to(data, peer)`` (the first datagram to a new peer IP waits for
  its permission, and a refused permission raises :class:`~tsunagu.errors.TurnError`, e.g.
  403), ``await turn.recv_from()``; or :meth:`TurnClient.create_datagram_endpoint` for a
  :class:`asyncio.DatagramTransport` look-alike an ICE agent can use like a socket.
* TCP allocations (RFC 6062; ``TurnClientConfig(requested_transport="tcp")`` over a
  ``?transport=tcp`` or ``turns:`` server): ``reader, writer = await turn.connect_peer(peer)``
  has the server connect to ``peer`` (Connect, §4.3), and ``reader, writer, peer = await
  turn.accept()`` takes the next peer that connected to the relayed address
  (ConnectionAttempt, §4.4). Either way a new connection to the server is bound to the peer
  with ConnectionBind and handed over as an :mod:`asyncio` stream pair carrying the peer's
  bytes unchanged (§4.5). Peers that connect in must have a permission
  (:meth:`TurnClient.create_permission`, §5.3).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast

from tsunagu.aio.inbox import Inbox
from tsunagu.errors import LocalProtocolError, TsunaguError, TurnError
from tsunagu.stun.attributes import Address
from tsunagu.stun.constants import DEFAULT_PORT, DEFAULT_TLS_PORT
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import (
    ClientState,
    TurnClientConfig,
    TurnClientConnection,
    normalize_ip,
)
from tsunagu.turn.tcp_client import CONNECTION_BIND_TIMEOUT, DataConnection

__all__ = [
    "TurnClient",
    "TurnDatagramTransport",
    "TurnTarget",
    "create_turn_endpoint",
]

TransportName = Literal["udp", "tcp", "tls"]
_P = TypeVar("_P", bound=asyncio.BaseProtocol)

_UDP_RECEIVE_BUFFER = 1 << 20  # bursts of relayed datagrams must not overflow the socket
_MAX_CONNECT_ATTEMPTS = 8  # redirections plus 437 retries, whichever comes first
_MISMATCH_ATTEMPTS = 3  # RFC 8656 §7.4: "SHOULD try three different client transport addresses"
_ALPN = "stun.turn"  # RFC 7443: ALPN for TURN over TLS


@dataclass(frozen=True, slots=True)
class TurnTarget:
    """Where and how to reach a TURN server."""

    host: str
    port: int
    transport: TransportName

    @classmethod
    def from_uri(cls, uri: str) -> TurnTarget:
        """A ``turn:``/``turns:`` URI (RFC 7065 §3.1) with optional ``?transport=udp|tcp``,
        parsed by :class:`tsunagu.stun.uri.StunUri` (imported here, on first use, so that
        callers who pass a :class:`TurnTarget` never depend on the URI module)."""
        from tsunagu.stun.uri import StunUri  # noqa: PLC0415 - deliberate lazy import

        parsed = StunUri.parse(uri)
        if parsed.scheme not in ("turn", "turns"):
            raise ValueError(f"not a TURN URI: {uri!r}")
        secure = parsed.scheme == "turns"
        transport: TransportName
        if secure:
            if parsed.transport not in (None, "tcp"):
                raise ValueError("turns: runs over TCP only here (DTLS is not supported)")
            transport = "tls"
        else:
            transport = "tcp" if parsed.transport == "tcp" else "udp"
        default = DEFAULT_TLS_PORT if secure else DEFAULT_PORT
        return cls(parsed.host, parsed.port if parsed.port is not None else default, transport)


class _UdpLink(asyncio.DatagramProtocol):
    def __init__(self, client: TurnClient) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._client._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        self._client._on_unreachable(exc)


class _StreamLink(asyncio.Protocol):
    def __init__(self, client: TurnClient) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        self._client._on_stream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._on_connection_lost(exc)


class TurnClient:
    """An allocation on a TURN server, used like a UDP socket bound to the relayed address.

    ``config`` sets every protocol knob (:class:`~tsunagu.turn.client.TurnClientConfig`);
    ``ssl_context`` the TLS trust for ``turns:`` (default: the system's CAs, host name
    checked, ALPN "stun.turn"); ``on_event`` sees every core event (allocations lost and
    regained, channels bound, ...) as it happens. Received datagrams wait in a queue of at most
    ``max_queued`` for :meth:`recv_from`; more are dropped, as a full socket buffer would.
    """

    def __init__(
        self,
        uri: str | TurnTarget,
        username: str,
        password: str,
        *,
        config: TurnClientConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_event: Callable[[ev.TurnClientEvent], None] | None = None,
        max_queued: int = 4096,
    ) -> None:
        self.target = uri if isinstance(uri, TurnTarget) else TurnTarget.from_uri(uri)
        self._username = username
        self._password = password
        self._config = config if config is not None else TurnClientConfig()
        if self._config.requested_transport == "tcp" and self.target.transport == "udp":
            # RFC 6062 §4.1: the control connection of a TCP allocation is TCP or TLS.
            raise ValueError("a TCP allocation needs a turn:...?transport=tcp or turns: server")
        self._ssl_context = ssl_context
        self._on_event = on_event
        self._max_queued = max_queued

        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: TurnClientConnection | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._write: Callable[[bytes], None] | None = None
        self._pending: list[bytes] = []
        self._stream_write: Callable[[bytes], None] | None = None
        self._outcome: asyncio.Future[ev.Allocated | ev.AlternateServer] | None = None
        self._closed: asyncio.Future[ev.Closed] | None = None
        self._error: TsunaguError | None = None
        self._inbox: Inbox[tuple[bytes, Address]] = Inbox()
        self._permission_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._endpoint: asyncio.DatagramProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # RFC 6062: Connects waiting for their outcome, ConnectionAttempts waiting for
        # accept() (with the time they arrived), and the data connections opened.
        self._tls_name = self.target.host
        self._connect_waiters: dict[Address, asyncio.Future[int]] = {}
        self._attempts: Inbox[tuple[ev.ConnectionAttempt, float]] = Inbox()
        self._data_links: set[_DataLink] = set()
        self.dropped = 0
        """Received datagrams (and RFC 6062 ConnectionAttempts) dropped because nobody took
        them."""

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the transport and allocate; raises what stopped it: a
        :class:`~tsunagu.errors.TurnError` (401 wrong credentials, 486 quota, ...), a
        :class:`~tsunagu.errors.TransactionTimeoutError`, or :class:`OSError` /
        :class:`ssl.SSLError` from the network."""
        if self._core is not None:
            raise LocalProtocolError("connect() was already called")
        self._loop = asyncio.get_running_loop()
        host, port, tls_name = self.target.host, self.target.port, self.target.host
        mismatches = 0
        fresh = True
        try:
            for _ in range(_MAX_CONNECT_ATTEMPTS):
                server = await self._open(host, port, tls_name)
                loop = self._loop
                self._outcome = loop.create_future()
                if fresh or self._core is None:
                    self._core = TurnClientConnection(
                        server,
                        self._username,
                        self._password,
                        stream=self.target.transport != "udp",
                        config=self._config,
                    )
                    self._core.allocate(loop.time())
                else:
                    self._core.allocate(loop.time(), server=server)
                self._pump()
                try:
                    outcome = await self._outcome
                except TurnError as exc:
                    self._close_transport()
                    mismatches += 1
                    if exc.code == 437 and mismatches < _MISMATCH_ATTEMPTS:
                        fresh = True  # a new socket is a new 5-tuple, hence a new client
                        continue
                    raise
                if isinstance(outcome, ev.Allocated):
                    self._tls_name = tls_name  # RFC 6062 data connections go to this server
                    return
                self._close_transport()  # 300 Try Alternate: same transport, other server
                host, port = outcome.server
                tls_name = outcome.domain or tls_name
                fresh = False
            raise TurnError(0, "too many redirections and retries while allocating")
        except BaseException:
            self._close_transport()
            self._core = None
            raise

    async def close(self) -> None:
        """Delete the allocation (Refresh LIFETIME 0) and close the transport. Waits at most
        one transaction timeout for the server's answer; never raises for it."""
        core, loop = self._core, self._loop
        if core is None or loop is None:
            return
        if core.state is not ClientState.CLOSED:
            if self._closed is None:
                self._closed = loop.create_future()
                core.close(loop.time())
                self._pump()
            await asyncio.shield(self._closed)
        self._close_transport()
        self._fail(LocalProtocolError("the TURN client is closed"))
        # The data connections end with their allocation (RFC 6062 §5.5, the server's
        # side); close our ends too rather than wait for the server's close.
        for link in list(self._data_links):
            link.close()

    async def _open(self, host: str, port: int, tls_name: str) -> Address:
        loop = self._loop
        assert loop is not None
        if self.target.transport == "udp":
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            remote = (str(sockaddr[0]), int(sockaddr[1]))
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpLink(self), remote_addr=remote, family=family
            )
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RECEIVE_BUFFER)
            self._transport = transport
            self._write = transport.sendto
            return remote
        context: ssl.SSLContext | None = None
        if self.target.transport == "tls":
            context = self._ssl_context or _default_ssl_context()
        timeout = self._config.transaction.reliable_timeout
        options: dict[str, Any] = {}
        if isinstance(loop, asyncio.BaseEventLoop):
            # RFC 8656 §3.9 / RFC 8305 Happy Eyeballs over the resolved addresses; uvloop
            # has no such option and tries them in turn.
            options["happy_eyeballs_delay"] = 0.25
        stream, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: _StreamLink(self),
                host,
                port,
                ssl=context,
                server_hostname=tls_name if context is not None else None,
                **options,
            ),
            timeout,
        )
        peer = stream.get_extra_info("peername")
        self._transport = stream
        self._stream_write = stream.write
        self._write = self._coalesce
        return (str(peer[0]), int(peer[1]))

    def _coalesce(self, data: bytes) -> None:
        """Stream writes made in one turn of the event loop leave in one ``write`` (one
        syscall, one TLS record) instead of one each; nothing waits past the current turn."""
        pending = self._pending
        pending.append(data)
        if len(pending) == 1 and self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._stream_write is not None and self._transport is not None:
            self._stream_write(b"".join(pending))

    def _close_transport(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        self._flush()
        transport, self._transport, self._write = self._transport, None, None
        if transport is not None:
            transport.close()

    # --- the allocation ------------------------------------------------------------------

    def _require_core(self) -> TurnClientConnection:
        if self._error is not None:
            raise self._error
        if self._core is None or self._core.state is not ClientState.ALLOCATED:
            if self._core is not None and self._core.state is ClientState.ALLOCATING:
                return self._core  # allocating again after a 437: datagrams are dropped
            raise LocalProtocolError("the TURN client is not connected")
        return self._core

    @property
    def relayed_address(self) -> Address:
        """The relayed transport address peers send to (the first one of a dual allocation)."""
        core = self._require_core()
        address = core.relayed_address
        if address is None:
            raise LocalProtocolError("no relayed address while allocating again")
        return address

    @property
    def relayed_addresses(self) -> tuple[Address, ...]:
        return self._require_core().relayed_addresses

    @property
    def mapped_address(self) -> Address | None:
        """The client's address as the server sees it (XOR-MAPPED-ADDRESS)."""
        return self._require_core().mapped_address

    @property
    def server_address(self) -> Address:
        """The server's IP and port this allocation lives on (after any redirection)."""
        return self._require_core().server

    @property
    def connection(self) -> TurnClientConnection:
        """The sans-I/O core, for its statistics and state."""
        if self._core is None:
            raise LocalProtocolError("the TURN client is not connected")
        return self._core

    async def create_permission(self, peer_ip: str) -> None:
        """Install a permission for ``peer_ip`` and keep it refreshed (RFC 8656 §9), so the
        peer can send first; raises :class:`~tsunagu.errors.TurnError` if refused (403)."""
        core = self._require_core()
        ip = normalize_ip(peer_ip)
        core.create_permission(ip, self._now())
        self._pump()
        if not core.has_permission(ip):
            await self._permission_outcome(ip)

    async def send_to(self, data: bytes, peer: Address) -> None:
        """Relay one datagram to ``peer``. The first one to a new peer IP waits until the
        server installed the permission and raises if it refused (e.g. TurnError 403)."""
        core = self._require_core()
        if core.state is not ClientState.ALLOCATED or core.has_permission(peer[0]):
            core.send_to(data, peer, self._now())  # while allocating again: dropped
            self._pump()
            return
        ip = normalize_ip(peer[0])
        core.send_to(data, (ip, peer[1]), self._now())
        self._pump()
        if not core.has_permission(ip):
            await self._permission_outcome(ip)

    async def recv_from(self) -> tuple[bytes, Address]:
        """The next datagram a peer sent to the relayed address, and that peer's address."""
        if not self._inbox and self._error is None and self._loop is None:
            raise LocalProtocolError("the TURN client is not connected")
        return await self._inbox.get()

    async def create_datagram_endpoint(
        self, protocol_factory: Callable[[], _P]
    ) -> tuple[TurnDatagramTransport, _P]:
        """Hand the allocation to a datagram protocol: ``sendto(data, peer)`` relays,
        ``datagram_received(data, peer)`` delivers what peers send, refused permissions come
        to ``error_received``; ``close()`` deletes the allocation."""
        self._require_core()
        if self._endpoint is not None:
            raise LocalProtocolError("the allocation already has an endpoint")
        protocol = protocol_factory()
        if not isinstance(protocol, asyncio.DatagramProtocol):
            raise TypeError("protocol_factory must make an asyncio.DatagramProtocol")
        transport = TurnDatagramTransport(self, protocol)
        self._endpoint = protocol
        protocol.connection_made(transport)
        for data, peer in self._inbox.take_all():
            protocol.datagram_received(data, peer)
        return transport, protocol

    # --- RFC 6062 TCP allocations -------------------------------------------------------

    async def connect_peer(
        self, peer: Address
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``peer`` through a TCP allocation (RFC 6062 §4.3): create its
        permission if needed, send Connect, then bind a new data connection to the
        CONNECTION-ID. Returns the stream pair carrying the peer's bytes.

        Raises :class:`~tsunagu.errors.TurnError` for a refusal: 446 (a connection to this
        peer exists), 447 (the server could not connect; another try waits 10 s), 403 (peer
        policy), or the ConnectionBind's error; :class:`OSError` if the data connection to the
        server cannot be opened."""
        core = self._require_tcp()
        loop = self._loop
        assert loop is not None
        peer = (normalize_ip(peer[0]), peer[1])
        core.connect(peer, loop.time())
        waiter: asyncio.Future[int] = loop.create_future()
        self._connect_waiters[peer] = waiter
        self._pump()
        try:
            connection_id = await waiter
        finally:
            if self._connect_waiters.get(peer) is waiter:
                del self._connect_waiters[peer]
        return await self._bind(connection_id, peer)

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Address]:
        """Wait for a peer to connect to the relayed address (a ConnectionAttempt, RFC 6062
        §4.4), bind a new data connection to it and return ``(reader, writer, peer)``. Only
        peers with a permission get through (§5.3): call :meth:`create_permission` first.
        Attempts older than 30 s are skipped (the server closed them, §5.3); a failed
        ConnectionBind raises, and the next call takes the next attempt."""
        self._require_tcp()
        loop = self._loop
        assert loop is not None
        while True:
            attempt, received = await self._attempts.get()
            if loop.time() - received >= CONNECTION_BIND_TIMEOUT:
                continue
            reader, writer = await self._bind(attempt.connection_id, attempt.peer)
            return reader, writer, attempt.peer

    def _require_tcp(self) -> TurnClientConnection:
        core = self._require_core()
        if not core.is_tcp_allocation:
            raise LocalProtocolError('needs TurnClientConfig(requested_transport="tcp")')
        if core.state is not ClientState.ALLOCATED:
            raise LocalProtocolError("no allocation while allocating again")
        return core

    async def _bind(
        self, connection_id: int, peer: Address
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a data connection to the control connection's server address, with its
        transport (RFC 6062 §4.3: "the same destination transport address"), and run the
        ConnectionBind handshake on it."""
        core = self._require_tcp()
        loop = self._loop
        assert loop is not None
        handshake = core.bind_connection(connection_id, peer)
        reader = asyncio.StreamReader()
        link = _DataLink(self, handshake, reader, loop)
        context: ssl.SSLContext | None = None
        if self.target.transport == "tls":
            context = self._ssl_context or _default_ssl_context()
        host, port = handshake.server
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: link,
                    host,
                    port,
                    ssl=context,
                    server_hostname=self._tls_name if context is not None else None,
                ),
                self._config.transaction.reliable_timeout,
            )
        except BaseException:
            if link.bound.done() and not link.bound.cancelled():
                link.bound.exception()  # reported by the raise below, not as "never retrieved"
            raise
        try:
            await link.bound
        except BaseException:
            transport.close()
            raise
        return reader, asyncio.StreamWriter(transport, link, reader, loop)

    async def _permission_outcome(self, ip: str) -> None:
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._permission_waiters.setdefault(ip, []).append(waiter)
        await waiter

    # --- the driver ----------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_datagram(self, data: bytes) -> None:
        core = self._core
        if core is not None:
            core.handle_datagram(data, self._now())
            self._pump()

    def _on_stream_data(self, data: bytes) -> None:
        core = self._core
        if core is not None:
            core.handle_stream_data(data, self._now())
            self._pump()

    def _on_unreachable(self, exc: Exception) -> None:
        core = self._core
        if core is not None:
            core.handle_unreachable(str(exc) or type(exc).__name__, self._now())
            self._pump()

    def _on_connection_lost(self, exc: Exception | None) -> None:
        core = self._core
        if core is not None and self._loop is not None:
            core.connection_lost(self._now(), str(exc) if exc is not None else "closed")
            self._pump()

    def _send_datagram(self, data: bytes, peer: Address) -> None:
        """The synchronous path of the datagram transport: no await, no task."""
        core, loop = self._core, self._loop
        if core is None or loop is None or self._error is not None:
            return
        try:
            core.send_to(data, peer, loop.time())
        except LocalProtocolError:
            return  # closing: dropped, as a closing socket would
        self._pump()

    def _pump(self) -> None:
        core = self._core
        if core is None:
            return
        write = self._write
        while (transmit := core.poll_transmit()) is not None:
            if write is not None:
                write(transmit.data)
        while (event := core.poll_event()) is not None:
            self._dispatch(event)
        deadline = core.poll_timeout()
        if deadline != self._timer_at and self._loop is not None and self._write is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = None if deadline is None else self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        core, deadline = self._core, self._timer_at
        self._timer = self._timer_at = None
        if core is None or deadline is None:
            return
        # call_at may run a hair early (clock resolution): never tell the core an earlier time.
        core.handle_timeout(max(self._now(), deadline))
        self._pump()

    def _dispatch(self, event: ev.TurnClientEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
        if isinstance(event, ev.DataReceived):
            if self._endpoint is not None:
                self._endpoint.datagram_received(event.data, event.peer)
            elif len(self._inbox) >= self._max_queued:
                self.dropped += 1
            else:
                self._inbox.put((event.data, event.peer))
        elif isinstance(event, ev.PermissionCreated):
            for waiter in self._permission_waiters.pop(event.peer_ip, ()):
                if not waiter.done():
                    waiter.set_result(None)
        elif isinstance(event, ev.PermissionFailed):
            for waiter in self._permission_waiters.pop(event.peer_ip, ()):
                if not waiter.done():
                    waiter.set_exception(event.error)
            if self._endpoint is not None:
                self._endpoint.error_received(event.error)
        elif isinstance(event, ev.Allocated | ev.AlternateServer):
            if self._outcome is not None and not self._outcome.done():
                self._outcome.set_result(event)
        elif isinstance(event, ev.AllocationFailed):
            if self._outcome is not None and not self._outcome.done():
                self._outcome.set_exception(event.error)
            else:
                self._fail(event.error)  # allocating again after a 437 failed
        elif isinstance(event, ev.AllocationLost):
            if not event.reallocating:
                self._fail(event.error)
        elif isinstance(event, ev.Closed) and self._closed is not None and not self._closed.done():
            self._closed.set_result(event)
        elif isinstance(event, ev.ConnectSucceeded | ev.ConnectFailed):
            connector = self._connect_waiters.pop(event.peer, None)
            if connector is not None and not connector.done():
                if isinstance(event, ev.ConnectSucceeded):
                    connector.set_result(event.connection_id)
                else:
                    connector.set_exception(event.error)
        elif isinstance(event, ev.ConnectionAttempt):
            if len(self._attempts) >= self._max_queued:
                self.dropped += 1  # unclaimed, the server closes it after 30 s (§5.3)
                return
            assert self._loop is not None
            self._attempts.put((event, self._loop.time()))

    def _fail(self, error: TsunaguError) -> None:
        """The allocation is over: wake everyone who waits on it."""
        if self._error is None:
            self._error = error
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(error)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(ev.Closed(error))
        self._inbox.fail(error)
        self._attempts.fail(error)
        connectors, self._connect_waiters = self._connect_waiters, {}
        for connector in connectors.values():
            if not connector.done():
                connector.set_exception(error)
        waiters, self._permission_waiters = self._permission_waiters, {}
        for pending in waiters.values():
            for waiter in pending:
                if not waiter.done():
                    waiter.set_exception(error)
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.connection_lost(None if isinstance(error, LocalProtocolError) else error)


class _DataLink(asyncio.StreamReaderProtocol):
    """One RFC 6062 client data connection. Until ConnectionBind succeeds its bytes go to the
    sans-I/O :class:`~tsunagu.turn.tcp_client.DataConnection`; from then on this is a plain
    :class:`asyncio.StreamReaderProtocol` and the peer's bytes go to the reader unchanged
    (RFC 6062 §4.5), starting with any that arrived behind the success response."""

    def __init__(
        self,
        client: TurnClient,
        handshake: DataConnection,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(reader, loop=loop)
        self._client = client
        self._handshake: DataConnection | None = handshake
        self._event_loop = loop
        self._link: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.bound: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._link = cast(asyncio.Transport, transport)
        self._client._data_links.add(self)
        if self._handshake is not None:
            self._handshake.connection_made(self._event_loop.time())
            self._pump()

    def data_received(self, data: bytes) -> None:
        handshake = self._handshake
        if handshake is None:
            super().data_received(data)
            return
        handshake.handle_data(data, self._event_loop.time())
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._data_links.discard(self)
        handshake = self._handshake
        if handshake is not None:
            handshake.connection_lost(self._event_loop.time(), str(exc) if exc else "closed")
            self._pump()
        super().connection_lost(exc)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()

    def _pump(self) -> None:
        handshake = self._handshake
        if handshake is None:
            return
        while (data := handshake.poll_transmit()) is not None:
            if self._link is not None:
                self._link.write(data)
        while (event := handshake.poll_event()) is not None:
            self._handshake = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if isinstance(event, ev.ConnectionBound):
                if event.data:
                    super().data_received(event.data)
                if not self.bound.done():
                    self.bound.set_result(None)
            else:
                if not self.bound.done():
                    self.bound.set_exception(event.error)
                self.close()
            return
        deadline = handshake.poll_timeout()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._event_loop.call_at(deadline, self._fire, deadline)

    def _fire(self, deadline: float) -> None:
        self._timer = None
        if self._handshake is not None:
            self._handshake.handle_timeout(max(self._event_loop.time(), deadline))
            self._pump()


class TurnDatagramTransport(asyncio.DatagramTransport):
    """An :class:`asyncio.DatagramTransport` whose "socket" is a TURN allocation, so an ICE
    agent can gather a relayed candidate and use it as it uses a host socket.

    ``get_extra_info("sockname")`` is the relayed address, ``"related_address"`` the mapped
    address (RFC 8445 §5.1.1.2's related address of a relayed candidate), ``"turn_client"``
    the :class:`TurnClient`. ``sendto`` never blocks: datagrams for a peer without a
    permission wait inside the client until the server installs it.
    """

    def __init__(self, client: TurnClient, protocol: asyncio.DatagramProtocol) -> None:
        super().__init__()
        self._client = client
        self._protocol = protocol
        self._closing = False

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if addr is None:
            raise ValueError("a TURN relay needs the peer address")
        if self._closing:
            return
        if type(data) is not bytes:
            data = bytes(data)
        if len(addr) != 2:  # an IPv6 socket address (host, port, flowinfo, scope_id)
            addr = (addr[0], addr[1])
        self._client._send_datagram(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        client = self._client
        if name == "turn_client":
            return client
        core = client._core
        if core is None:
            return default
        if name == "sockname":
            return core.relayed_address or default
        if name == "related_address":
            return core.mapped_address or default
        if name == "peername":
            return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Delete the allocation in the background; ``connection_lost(None)`` follows."""
        if self._closing:
            return
        self._closing = True
        asyncio.get_running_loop().create_task(self._close())

    def abort(self) -> None:
        self.close()

    async def _close(self) -> None:
        await self._client.close()


async def create_turn_endpoint(
    protocol_factory: Callable[[], _P],
    uri: str | TurnTarget,
    username: str,
    password: str,
    **kwargs: Any,
) -> tuple[TurnDatagramTransport, _P]:
    """Allocate on ``uri`` and return a datagram endpoint on the relayed address, in the shape
    of aioice's ``create_turn_endpoint``; ``kwargs`` go to :class:`TurnClient`."""
    client = TurnClient(uri, username, password, **kwargs)
    await client.connect()
    try:
        return await client.create_datagram_endpoint(protocol_factory)
    except BaseException:
        await client.close()
        raise


def _default_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.set_alpn_protocols([_ALPN])
    return context
