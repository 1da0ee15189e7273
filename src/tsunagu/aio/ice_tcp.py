"""TCP candidates (RFC 6544) for :class:`~tsunagu.aio.ice.IceConnection`.

With ``IceConfig(tcp=True)`` the connection gathers, per host address, a passive candidate
(a listening socket) and an active one (port 9 in SDP, RFC 6544 §4.5); with
``tcp_simultaneous_open=True`` as well (Linux only), a simultaneous-open one. Everything
ICE does with them lives in the core (:mod:`tsunagu.ice.tcp`); this module only carries
out what the core asks and reports what the sockets did:

* :class:`~tsunagu.ice.events.TcpConnectRequested` -> a connection from the requested
  local address; established -> :meth:`IceAgent.handle_tcp_connected`, failed ->
  :meth:`IceAgent.handle_tcp_closed`;
* a connection accepted on a listening socket -> :meth:`IceAgent.handle_tcp_accepted`
  (refused: the socket is closed);
* bytes read -> :meth:`IceAgent.handle_tcp_data` (the core cuts the RFC 4571 frames);
  connection lost -> :meth:`IceAgent.handle_tcp_closed`;
* a TCP :class:`~tsunagu.ice.transmit.Transmit` -> written as it is (already framed) to
  its connection; :class:`~tsunagu.ice.events.TcpCloseRequested` -> closed.

Simultaneous open (RFC 6544 §4.1, §7.1). Both ends connect from the ports they signalled
to each other's; when the two SYNs cross, each socket in SYN-SENT takes the other's SYN
and the two connects become one connection (RFC 9293 §3.5). The candidate's port is held
by a socket with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` (Linux: every socket bound to the
port must set it, a listening one included), and every connect request gets a new socket
with the same options bound to that port. That socket *listens*, because:

* RFC 6544 §7.2: an agent "MUST be prepared to receive incoming TCP connection requests on
  the base of any TCP candidate that is simultaneous-open or passive";
* a SYN that reaches a port where no socket is in SYN-SENT or LISTEN is answered with a
  RST (the connect fails with ``ECONNREFUSED``). The SYNs cross only if each is still in
  flight when the other end connects: over a path with some delay, or a NAT that drops
  the early SYN, yes; on loopback, or a LAN, the first connect is refused at once. (On
  Linux loopback two threads connecting at the same instant through a barrier made
  6 simultaneous opens in 300 tries, the rest were refused on both ends.)

With the listening socket, a SYN that finds our connecting socket still crosses (the
kernel looks up connected sockets before listening ones); one that comes first is
accepted, and the peer's connect succeeds as a plain open. An accepted connection whose
(base, remote) has a connect request pending *is* that connection (the pending connect,
which fails with ``EADDRNOTAVAIL`` on the taken 4-tuple, is dropped); otherwise the core
is told as of any accepted one and uses it for its checks. Refused or failed connects are
retried a few times, with back-off, within :data:`SO_CONNECT_TIMEOUT` -- a peer that
does not listen on its S-O port opens it only when its own check goes out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from typing import cast

from tsunagu.aio.loop import clock
from tsunagu.aio.sockets import shared_port_tcp_socket
from tsunagu.ice.agent import IceAgent
from tsunagu.ice.candidate import Address, TcpType, normalize_ip
from tsunagu.ice.events import IceEvent, TcpCloseRequested, TcpConnectRequested
from tsunagu.ice.tcp import ACTIVE_PORT
from tsunagu.ice.transmit import Transmit

__all__ = ["SO_CONNECT_TIMEOUT", "SO_RETRIES", "IceTcp", "simultaneous_open_supported"]

logger = logging.getLogger(__name__)

_WRITE_LIMIT = 1 << 20
"""Bytes a connection may have waiting in its write buffer; frames beyond are dropped
whole (as a full UDP socket buffer drops datagrams), so the stream stays in frame."""

SO_CONNECT_TIMEOUT = 10.0
"""Seconds a simultaneous-open connect may take, retries included (a SYN nobody answers
is retransmitted by the kernel at 1, 3, 7 s; the core gives the check up at ~39.5 s)."""

SO_RETRIES = 5
"""Simultaneous-open connects tried again after a refusal (RST), ``EADDRNOTAVAIL`` (the
4-tuple is taken, by a connection from the peer not accepted yet) or ``EADDRINUSE``; the
waits double from :data:`_SO_FIRST_BACKOFF`: 1.55 s in all."""

_SO_FIRST_BACKOFF = 0.05

_SO_RETRYABLE = frozenset({errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.EADDRINUSE})


def simultaneous_open_supported() -> bool:
    """Simultaneous-open candidates need Linux's ``SO_REUSEPORT``: a listening socket and
    connecting ones on one port."""
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


class _Stream(asyncio.Protocol):
    """One TCP connection: outgoing (``connection`` known from the start) or accepted on
    the listening socket of ``base`` (``connection`` given by the core once accepted)."""

    def __init__(self, owner: IceTcp, *, connection: int | None, base: Address | None) -> None:
        self._owner = owner
        self.connection = connection
        self.base = base
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without being subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self._owner._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.connection is not None:
            self._owner._on_data(self.connection, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_lost(self)


class IceTcp:
    """The TCP sockets of one :class:`~tsunagu.aio.ice.IceConnection`: ``service`` is the
    connection's flush-deliver-rearm step, run after every input given to ``agent``.
    ``simultaneous_open``: gather simultaneous-open candidates too (where
    :func:`simultaneous_open_supported`)."""

    def __init__(
        self,
        agent: IceAgent,
        service: Callable[[], None],
        *,
        simultaneous_open: bool = False,
    ) -> None:
        self._agent = agent
        self._service = service
        self._simultaneous_open = simultaneous_open
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._streams: dict[int, _Stream] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._so_bases: set[Address] = set()
        self._so_pending: dict[tuple[Address, Address], int] = {}
        """Simultaneous-open connects under way, by (base, remote)."""
        self._closed = False

    async def gather(self, host_addresses: Sequence[str]) -> None:
        """A listening socket and a passive candidate, an active candidate, and with
        ``simultaneous_open`` a simultaneous-open candidate, on each host address (RFC
        6544 §4.1)."""
        loop = self._loop = asyncio.get_running_loop()
        simultaneous_open = self._simultaneous_open and simultaneous_open_supported()
        if self._simultaneous_open and not simultaneous_open:
            logger.info("ice-tcp: no simultaneous-open candidates on %s", sys.platform)
        for ip in host_addresses:
            listener: list[Address] = []  # the base, known once the socket is bound

            def accept(listener: list[Address] = listener) -> _Stream:
                return _Stream(self, connection=None, base=listener[0] if listener else None)

            server = await loop.create_server(accept, host=ip, port=0)
            port = int(server.sockets[0].getsockname()[1])
            passive = self._agent.add_tcp_host_candidate((ip, port), TcpType.PASSIVE)
            if passive is None:
                server.close()
            else:
                listener.append(passive.transport_address)
                self._servers.append(server)
            self._agent.add_tcp_host_candidate((ip, ACTIVE_PORT), TcpType.ACTIVE)
            if simultaneous_open:
                await self._gather_simultaneous_open(loop, ip)

    async def _gather_simultaneous_open(self, loop: asyncio.AbstractEventLoop, ip: str) -> None:
        sock = shared_port_tcp_socket((ip, 0))
        port = int(sock.getsockname()[1])
        candidate = self._agent.add_tcp_host_candidate((ip, port), TcpType.SIMULTANEOUS_OPEN)
        if candidate is None:
            sock.close()
            return
        base = candidate.transport_address
        server = await loop.create_server(
            lambda: _Stream(self, connection=None, base=base), sock=sock
        )
        self._so_bases.add(base)
        self._servers.append(server)

    def send(self, transmit: Transmit) -> None:
        """Write one framed transmit to its connection."""
        stream = None if transmit.connection is None else self._streams.get(transmit.connection)
        transport = None if stream is None else stream.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > _WRITE_LIMIT:
            logger.debug("ice-tcp: connection %s is backed up, frame dropped", stream)
            return
        transport.write(transmit.data)

    def handle_event(self, event: IceEvent) -> bool:
        """Carry out a connect or close request; False for events that are not ours."""
        if isinstance(event, TcpConnectRequested):
            if self._loop is not None and not self._closed:
                if event.local in self._so_bases:
                    self._so_pending[(event.local, event.remote)] = event.connection
                    task = self._loop.create_task(self._connect_simultaneous(event))
                else:
                    task = self._loop.create_task(self._connect(event))
                self._connecting[event.connection] = task
                task.add_done_callback(lambda _: self._forget(event.connection))
            return True
        if isinstance(event, TcpCloseRequested):
            pending = self._connecting.pop(event.connection, None)
            if pending is not None:
                pending.cancel()
            self._so_forget(event.connection)
            stream = self._streams.pop(event.connection, None)
            if stream is not None and stream.transport is not None:
                stream.transport.close()
            return True
        return False

    def _forget(self, connection: int) -> None:
        self._connecting.pop(connection, None)
        self._so_forget(connection)

    def _so_forget(self, connection: int) -> None:
        for key, pending in list(self._so_pending.items()):
            if pending == connection:
                del self._so_pending[key]

    def close(self) -> None:
        """Close every socket; nothing reaches the agent any more."""
        self._closed = True
        for server in self._servers:
            server.close()
        self._servers.clear()
        for task in self._connecting.values():
            task.cancel()
        self._connecting.clear()
        self._so_pending.clear()
        for stream in self._streams.values():
            if stream.transport is not None:
                stream.transport.close()
        self._streams.clear()

    # -- socket callbacks ---------------------------------------------------------------------

    async def _connect(self, request: TcpConnectRequested) -> None:
        assert self._loop is not None
        host, port = request.remote
        try:
            await self._loop.create_connection(
                lambda: _Stream(self, connection=request.connection, base=None),
                host,
                port,
                local_addr=request.local,
            )
        except OSError as exc:
            logger.debug("ice-tcp: connection to %s failed: %r", request.remote, exc)
            self._failed(request.connection)

    async def _connect_simultaneous(self, request: TcpConnectRequested) -> None:
        """RFC 6544 §7.1: connect from the candidate's own port; retried after a refusal
        (the peer's connect has not started yet, or it does not listen) or a taken
        4-tuple (its connection, about to be adopted by :meth:`_on_made`)."""
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + SO_CONNECT_TIMEOUT
        backoff = _SO_FIRST_BACKOFF
        for attempt in range(SO_RETRIES + 1):
            try:
                sock = shared_port_tcp_socket(request.local)
                try:
                    async with asyncio.timeout_at(deadline):
                        await loop.sock_connect(sock, request.remote)
                except BaseException:
                    sock.close()
                    raise
            except (OSError, TimeoutError) as exc:
                code = exc.errno if isinstance(exc, OSError) else None
                logger.debug(
                    "ice-tcp: simultaneous open %s -> %s, try %d: %r",
                    request.local,
                    request.remote,
                    attempt + 1,
                    exc,
                )
                if (
                    code not in _SO_RETRYABLE
                    or attempt == SO_RETRIES
                    or loop.time() + backoff >= deadline
                ):
                    break
                await asyncio.sleep(backoff)
                backoff *= 2
                continue
            self._so_forget(request.connection)  # connected: nothing left to adopt
            try:
                await loop.create_connection(
                    lambda: _Stream(self, connection=request.connection, base=None), sock=sock
                )
            except OSError as exc:
                sock.close()
                logger.debug("ice-tcp: simultaneous open to %s lost: %r", request.remote, exc)
                break
            return
        self._failed(request.connection)

    def _failed(self, connection: int) -> None:
        if not self._closed:
            self._agent.handle_tcp_closed(connection, clock())
            self._service()

    def _on_made(self, stream: _Stream) -> None:
        assert self._loop is not None and stream.transport is not None
        if self._closed:
            stream.transport.close()
            return
        now = clock()
        if stream.connection is not None:  # ours: established
            self._streams[stream.connection] = stream
            self._agent.handle_tcp_connected(stream.connection, now)
        else:  # a peer's, on a listening socket
            peer = stream.transport.get_extra_info("peername")
            connection = None
            if stream.base is not None and peer is not None:
                remote = (normalize_ip(str(peer[0])), int(peer[1]))
                adopted = self._so_pending.pop((stream.base, remote), None)
                if adopted is not None:
                    # The peer's connect beat ours to it: the connection the core asked
                    # for, between the same two ports (RFC 6544 §7.1, §7.2).
                    pending = self._connecting.pop(adopted, None)
                    if pending is not None:
                        pending.cancel()
                    logger.debug("ice-tcp: %s adopted, from %s", adopted, remote)
                    stream.connection = adopted
                    self._streams[adopted] = stream
                    self._agent.handle_tcp_connected(adopted, now)
                    self._service()
                    return
                connection = self._agent.handle_tcp_accepted(stream.base, remote, now)
            if connection is None:
                stream.transport.close()
                return
            stream.connection = connection
            self._streams[connection] = stream
        self._service()

    def _on_data(self, connection: int, data: bytes) -> None:
        if self._closed or self._loop is None:
            return
        self._agent.handle_tcp_data(connection, data, clock())
        self._service()

    def _on_lost(self, stream: _Stream) -> None:
        connection = stream.connection
        if connection is None or self._streams.get(connection) is not stream:
            return  # refused, or closed at the core's request
        del self._streams[connection]
        if not self._closed and self._loop is not None:
            self._agent.handle_tcp_closed(connection, clock())
            self._service()
