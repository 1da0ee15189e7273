"""TCP candidates (RFC 6544) for :class:`~tsunagu.aio.ice.IceConnection`.

With ``IceConfig(tcp=True)`` the connection gathers, per host address, a passive candidate
(a listening socket) and an active one (port 9 in SDP, RFC 6544 §4.5). Everything ICE
does with them lives in the core (:mod:`tsunagu.ice.tcp`); this module only carries out
what the core asks and reports what the sockets did:

* :class:`~tsunagu.ice.events.TcpConnectRequested` -> ``loop.create_connection`` from the
  requested local address; established -> :meth:`IceAgent.handle_tcp_connected`, failed ->
  :meth:`IceAgent.handle_tcp_closed`;
* a connection accepted on a listening socket -> :meth:`IceAgent.handle_tcp_accepted`
  (refused: the socket is closed);
* bytes read -> :meth:`IceAgent.handle_tcp_data` (the core cuts the RFC 4571 frames);
  connection lost -> :meth:`IceAgent.handle_tcp_closed`;
* a TCP :class:`~tsunagu.ice.transmit.Transmit` -> written as it is (already framed) to
  its connection; :class:`~tsunagu.ice.events.TcpCloseRequested` -> closed.

Simultaneous-open candidates are not gathered: asyncio has no portable way to connect
from a port another socket of ours is bound to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from tsunagu.aio.loop import clock
from tsunagu.ice.agent import IceAgent
from tsunagu.ice.candidate import Address, TcpType, normalize_ip
from tsunagu.ice.events import IceEvent, TcpCloseRequested, TcpConnectRequested
from tsunagu.ice.tcp import ACTIVE_PORT
from tsunagu.ice.transmit import Transmit

__all__ = ["IceTcp"]

logger = logging.getLogger(__name__)

_WRITE_LIMIT = 1 << 20
"""Bytes a connection may have waiting in its write buffer; frames beyond are dropped
whole (as a full UDP socket buffer drops datagrams), so the stream stays in frame."""


class _Stream(asyncio.Protocol):
    """One TCP connection: outgoing (``connection`` known from the start) or accepted on
    the listening socket of ``base`` (``connection`` given by the core once accepted)."""

    def __init__(self, owner: IceTcp, *, connection: int | None, base: Address | None) -> None:
        self._owner = owner
        self.connection = connection
        self.base = base
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._owner._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.connection is not None:
            self._owner._on_data(self.connection, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_lost(self)


class IceTcp:
    """The TCP sockets of one :class:`~tsunagu.aio.ice.IceConnection`: ``service`` is the
    connection's flush-deliver-rearm step, run after every input given to ``agent``."""

    def __init__(self, agent: IceAgent, service: Callable[[], None]) -> None:
        self._agent = agent
        self._service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._streams: dict[int, _Stream] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._closed = False

    async def gather(self, host_addresses: Sequence[str]) -> None:
        """A listening socket and a passive candidate, and an active candidate, on each
        host address (RFC 6544 §4.1)."""
        loop = self._loop = asyncio.get_running_loop()
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
                task = self._loop.create_task(self._connect(event))
                self._connecting[event.connection] = task
                task.add_done_callback(lambda _: self._forget(event.connection))
            return True
        if isinstance(event, TcpCloseRequested):
            pending = self._connecting.pop(event.connection, None)
            if pending is not None:
                pending.cancel()
            stream = self._streams.pop(event.connection, None)
            if stream is not None and stream.transport is not None:
                stream.transport.close()
            return True
        return False

    def _forget(self, connection: int) -> None:
        self._connecting.pop(connection, None)

    def close(self) -> None:
        """Close every socket; nothing reaches the agent any more."""
        self._closed = True
        for server in self._servers:
            server.close()
        self._servers.clear()
        for task in self._connecting.values():
            task.cancel()
        self._connecting.clear()
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
            if not self._closed:
                self._agent.handle_tcp_closed(request.connection, clock())
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
