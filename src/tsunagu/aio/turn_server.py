"""The asyncio driver of the TURN server: ``server = await TurnServer.start(config)``.

It owns every socket and feeds :class:`~tsunagu.turn.server.TurnServerCore`, in the shape
DESIGN.md gives all drivers: after each input (a datagram, stream bytes, a timer) flush
``poll_transmit()`` to the sockets, log ``poll_event()``, re-arm one ``loop.call_at`` for
``poll_timeout()``. The core's clock is ``loop.time()``.

Sockets:

* one UDP and one TCP socket per ``listen`` address (port 0: the OS picks one, the same for
  both), a TLS-over-TCP socket per ``tls_listen`` address;
* one UDP socket per relayed transport address, opened and closed synchronously when the
  core asks (:class:`RelaySockets` is the core's :class:`~tsunagu.turn.relay.RelayBinder`).

UDP sockets are read with ``loop.add_reader`` and ``recvfrom`` in bounded batches, which
avoids a transport object per relay socket and keeps the relay path short. A send error
towards one peer (ICMP unreachable, EMSGSIZE with DF set, ...) is counted and dropped: it
never stops an allocation from relaying to its other peers. Towards a TCP/TLS client whose
connection cannot keep up, relayed data beyond a bounded write buffer is dropped, as UDP
would drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from tsunagu.errors import StunDecodeError
from tsunagu.turn.auth import UserKeys
from tsunagu.turn.config import TurnServerConfig, format_address
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
from tsunagu.turn.server import TurnServerCore, build_users
from tsunagu.turn.transport import Address, FiveTuple, Transport

__all__ = ["RelaySockets", "TurnServer"]

log = logging.getLogger("tsunagu.turn")

_LINUX = sys.platform.startswith("linux")
# <linux/in.h>: not exported by Python's socket module.
_IP_MTU_DISCOVER = 10
_IP_PMTUDISC_DONT = 0
_IP_PMTUDISC_DO = 2
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)

_RECV_BATCH = 64  # datagrams read per readiness callback: bounded, and fair to other sockets
_RECV_SIZE = 65535
_SOCKET_BUFFER = 1 << 20  # relayed bursts must not overflow the kernel buffers
_STREAM_WRITE_LIMIT = 1 << 20  # bytes queued to one slow TCP/TLS client before dropping
_BACKLOG = 1024
_PORT_ATTEMPTS = 16  # tries to find a port free for both UDP and TCP when asked for port 0
_HOUSEKEEPING_PERIOD = 5.0  # seconds between idle-connection sweeps
_PIPE_HOLD_LIMIT = 1 << 18  # RFC 6062 bytes held per side until the splice, then paused
_ACCEPT_BATCH = 16  # peer connections accepted per readiness callback


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _udp_socket(address: Address) -> socket.socket:
    sock = socket.socket(_family(address[0]), socket.SOCK_DGRAM)
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _tcp_socket(address: Address) -> socket.socket:
    sock = socket.socket(_family(address[0]), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _relay_tcp_socket(address: Address) -> socket.socket:
    """A TCP socket on a relayed transport address: both the RFC 6062 listener and the
    sockets connecting out to peers bind there, hence SO_REUSEADDR and SO_REUSEPORT."""
    sock = socket.socket(_family(address[0]), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bound(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return name[0], name[1]


class _UdpEndpoint:
    """A bound UDP socket: a listening socket or a relay socket."""

    __slots__ = ("address", "dont_fragment", "sock")

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self.sock = sock
        self.address = address
        self.dont_fragment = False

    def set_dont_fragment(self, on: bool) -> None:
        """RFC 8656 §14: the IPv4 DF bit (or IPv6's "do not fragment locally")."""
        sock = self.sock
        with contextlib.suppress(OSError):
            if sock.family == socket.AF_INET:
                value = _IP_PMTUDISC_DO if on else _IP_PMTUDISC_DONT
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, value)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_DONTFRAG, int(on))
        self.dont_fragment = on


class RelaySockets:
    """The core's :class:`~tsunagu.turn.relay.RelayBinder`: UDP relay sockets on the loop."""

    def __init__(self, server: TurnServer) -> None:
        self._server = server

    @property
    def supports_dont_fragment(self) -> bool:
        return _LINUX

    def bind(self, address: Address) -> bool:
        try:
            sock = _udp_socket(address)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                log.warning("relay bind %s failed: %s", format_address(address), exc)
            return False
        endpoint = _UdpEndpoint(sock, address)
        if _LINUX and sock.family == socket.AF_INET:
            endpoint.set_dont_fragment(False)  # Linux sets DF by default; only when asked
        server = self._server
        server._udp[address] = endpoint
        server._loop.add_reader(sock.fileno(), server._relay_readable, endpoint)
        return True

    def unbind(self, address: Address) -> None:
        endpoint = self._server._udp.pop(address, None)
        if endpoint is not None:
            self._server._loop.remove_reader(endpoint.sock.fileno())
            endpoint.sock.close()

    def bind_tcp(self, address: Address) -> bool:
        try:
            sock = _relay_tcp_socket(address)
            sock.listen(_BACKLOG)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                log.warning("relay bind tcp %s failed: %s", format_address(address), exc)
            return False
        server = self._server
        server._tcp_relays[address] = sock
        server._loop.add_reader(sock.fileno(), server._relay_accept, sock, address)
        return True

    def unbind_tcp(self, address: Address) -> None:
        sock = self._server._tcp_relays.pop(address, None)
        if sock is not None:
            self._server._loop.remove_reader(sock.fileno())
            sock.close()


class _Framer:
    """Cuts a client's byte stream into STUN messages and ChannelData frames (RFC 8489
    §6.2.2, RFC 8656 §12.5), one at a time, so that an RFC 6062 ConnectionBind can turn
    the rest of the stream into raw data (:meth:`take_rest`). ChannelData first bytes go
    up to 0x4F, or 0x7F with ``rfc5766_channels``. Holds at most one frame plus what one
    read delivered."""

    __slots__ = ("_buffer", "_channel_first_max")

    def __init__(self, channel_first_max: int) -> None:
        self._buffer = bytearray()
        self._channel_first_max = channel_first_max

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next whole frame, or None; raises StunDecodeError when the stream is not
        TURN framing (it cannot be resynchronised, the caller closes the connection)."""
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        first = buffer[0]
        length = int.from_bytes(buffer[2:4])
        if first <= 3:
            size = 20 + length
        elif 0x40 <= first <= self._channel_first_max:
            size = 4 + length + (-length & 3)
        else:
            raise StunDecodeError(f"unexpected first byte {first:#04x} on stream")
        if len(buffer) < size:
            return None
        frame = bytes(buffer[:size])
        del buffer[:size]
        return frame

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


class _Pipe(asyncio.Protocol):
    """One side of an RFC 6062 splice: bytes go to ``partner`` once linked, and are held
    (bounded, with reading paused) until then. Write back-pressure pauses the partner."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.partner: _Pipe | None = None
        self.held = bytearray()
        self.raw = False

    def relay(self, data: bytes) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.write(data)
            return
        self.held += data
        if len(self.held) > _PIPE_HOLD_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def link(self, partner: _Pipe) -> None:
        self.partner = partner
        partner.partner = self
        for side in (self, partner):
            if side.held and side.partner is not None and side.partner.transport is not None:
                side.partner.transport.write(bytes(side.held))
                side.held.clear()
                if side.transport is not None:
                    side.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()


class _Connection(_Pipe):
    """One TCP or TLS client connection: frames its byte stream for the core, or, as an
    RFC 6062 data connection, pipes it to a peer connection."""

    def __init__(self, server: TurnServer, kind: Transport) -> None:
        super().__init__()
        self._server = server
        self.kind = kind
        channel_max = 0x7F if server.config.rfc5766_channels else 0x4F
        self._framer = _Framer(channel_max)
        self.local: Address = ("", 0)
        self.remote: Address = ("", 0)
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        if server._closing or len(server._connections) >= server.config.max_connections:
            transport.abort()
            return
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        self.local = (sockname[0], sockname[1])
        self.remote = (peername[0], peername[1])
        self.last_active = server._loop.time()
        server._connections[(self.kind, self.local, self.remote)] = self

    def data_received(self, data: bytes) -> None:
        if self.raw:
            self.relay(data)
            return
        server = self._server
        now = server._loop.time()
        self.last_active = now
        framer = self._framer
        framer.feed(data)
        core = server.core
        five_tuple = FiveTuple(self.kind, self.remote, self.local)
        try:
            while (frame := framer.next_frame()) is not None:  # bounded by the data read
                core.handle_datagram(frame, self.local, self.remote, now, self.kind)
                if core.is_data_connection(five_tuple):
                    # RFC 6062 §5.4: after ConnectionBind the stream is the peer's.
                    self.raw = True
                    rest = framer.take_rest()
                    if rest:
                        self.held += rest
                    break
        except StunDecodeError:
            # RFC 8656 §12.5 framing lost: the stream cannot be resynchronised.
            assert self.transport is not None
            self.transport.abort()
        server._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        key = (self.kind, self.local, self.remote)
        if server._connections.get(key) is self:
            del server._connections[key]
            server.core.connection_closed(self.kind, self.local, self.remote, server._loop.time())
            server._flush()


class _PeerConnection(_Pipe):
    """RFC 6062: a TCP connection between a relayed transport address and a peer."""

    def __init__(self, server: TurnServer, connection_id: int) -> None:
        super().__init__()
        self._server = server
        self.connection_id = connection_id
        self.raw = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._server._peer_established(self)

    def data_received(self, data: bytes) -> None:
        self.relay(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._peer_lost(self)


class TurnServer:
    """A running TURN server. Create with :meth:`start`; stop with :meth:`drain` and
    :meth:`close` (or ``async with``)."""

    core: TurnServerCore

    def __init__(
        self,
        config: TurnServerConfig,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[TurnEvent], None] | None = None,
    ) -> None:
        """Use :meth:`start`."""
        self.config = config
        self._on_event = on_event
        self._loop = loop
        self._udp: dict[Address, _UdpEndpoint] = {}
        self._listening_udp: list[_UdpEndpoint] = []
        self._listen_sockets: list[tuple[Transport, socket.socket]] = []
        self._servers: list[asyncio.Server] = []
        self._connections: dict[tuple[Transport, Address, Address], _Connection] = {}
        # RFC 6062: relay listeners, peer connections by CONNECTION-ID, connects in flight,
        # and data connections bound before their (accepted) peer connection was adopted.
        self._tcp_relays: dict[Address, socket.socket] = {}
        self._peers: dict[int, _PeerConnection] = {}
        self._peer_tasks: dict[int, asyncio.Task[None]] = {}
        self._wanted: set[int] = set()
        self._pending_splices: dict[int, _Connection] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None
        self._closing = False
        self.udp_addresses: list[Address] = []
        self.tcp_addresses: list[Address] = []
        self.tls_addresses: list[Address] = []
        self.send_errors = 0
        """Datagrams the kernel refused to send (one peer's trouble, counted and dropped)."""
        self.stream_drops = 0
        """Frames dropped because a TCP/TLS client's write buffer was full."""
        self.errors_by_code: Counter[int] = Counter()
        """Error responses sent, by STUN error code (401/438 included)."""

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        config: TurnServerConfig,
        *,
        users: Mapping[str, UserKeys] | None = None,
        on_event: Callable[[TurnEvent], None] | None = None,
    ) -> TurnServer:
        """Bind every socket and start serving. ``users`` defaults to ``config.users``
        plus the contents of ``config.users_file``; ``on_event`` receives every core event
        after it is logged (metrics, tests). Raises OSError or ValueError."""
        server = cls(config, asyncio.get_running_loop(), on_event)
        try:
            await server._open(users)
        except BaseException:
            await server.close()
            raise
        return server

    async def _open(self, users: Mapping[str, UserKeys] | None) -> None:
        config = self.config
        if users is None:
            text = Path(config.users_file).read_text() if config.users_file else None
            users = build_users(config, text)
        for address in config.listen:
            udp, tcp = self._bind_pair(address)
            self._listen_sockets.append((Transport.TCP, tcp))
            endpoint = _UdpEndpoint(udp, _bound(udp))
            self._listening_udp.append(endpoint)
            self._udp[endpoint.address] = endpoint
            self.udp_addresses.append(endpoint.address)
            self.tcp_addresses.append(_bound(tcp))
        for address in config.tls_listen:
            tls = _tcp_socket(address)
            self._listen_sockets.append((Transport.TLS, tls))
            self.tls_addresses.append(_bound(tls))
        listening = [*self.udp_addresses, *self.tcp_addresses, *self.tls_addresses]
        self.core = TurnServerCore(
            config,
            RelaySockets(self),
            listening=listening,
            users=users,
            unix_time_offset=time.time() - self._loop.time(),
        )
        context: ssl.SSLContext | None = None
        if config.tls_listen:
            assert config.cert is not None and config.key is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(config.cert, config.key)
        for endpoint in self._listening_udp:
            self._loop.add_reader(endpoint.sock.fileno(), self._listen_readable, endpoint)
        for kind, sock in self._listen_sockets:
            server = await self._loop.create_server(
                functools.partial(_Connection, self, kind),
                sock=sock,
                ssl=context if kind is Transport.TLS else None,
                ssl_handshake_timeout=config.idle_timeout if kind is Transport.TLS else None,
            )
            self._servers.append(server)
        self._housekeeping = self._loop.call_later(_HOUSEKEEPING_PERIOD, self._housekeep)

    def _bind_pair(self, address: Address) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same address and port (RFC 8656 §4.1: TURN over UDP
        and TCP share the port)."""
        attempts = _PORT_ATTEMPTS if address[1] == 0 else 1
        for attempt in range(attempts):
            udp = _udp_socket(address)
            try:
                return udp, _tcp_socket(_bound(udp))
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
        raise OSError(errno.EADDRINUSE, f"no port free for UDP and TCP on {address[0]}")

    def stop_accepting(self) -> None:
        """Refuse new allocations (508) while existing ones keep relaying."""
        if hasattr(self, "core"):
            self.core.stop_accepting()

    async def drain(self, timeout: float) -> None:
        """Stop accepting allocations, then wait until the last one is gone (refreshed to
        0, expired, or its connection closed) or ``timeout`` seconds have passed."""
        self.stop_accepting()
        if not hasattr(self, "core") or self.core.allocation_count == 0:
            return
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)

    async def close(self) -> None:
        """Release every socket; allocations end with "shutdown"."""
        if self._closing:
            return
        self._closing = True
        for handle in (self._timer, self._housekeeping):
            if handle is not None:
                handle.cancel()
        if hasattr(self, "core"):
            self.core.close()  # closes the relay sockets through RelaySockets.unbind
            self._flush_events()  # ... and the RFC 6062 peer connections
        for task in list(self._peer_tasks.values()):
            task.cancel()
        for sock in list(self._tcp_relays.values()):
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._tcp_relays.clear()
        for server in self._servers:
            server.close()
        for connection in list(self._connections.values()):
            if connection.transport is not None:
                connection.transport.abort()
        self._connections.clear()
        for endpoint in self._listening_udp:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(endpoint.sock.fileno())
            endpoint.sock.close()
        for endpoint in list(self._udp.values()):
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(endpoint.sock.fileno())
            endpoint.sock.close()
        self._udp.clear()
        for _, sock in self._listen_sockets:
            sock.close()
        for server in self._servers:
            await server.wait_closed()

    async def __aenter__(self) -> TurnServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def reload(self, config: TurnServerConfig, users: Mapping[str, UserKeys]) -> int:
        """Apply the credentials (users, REST secrets) and peer policy of ``config``
        without dropping allocations (SIGHUP). Permissions and channels the new policy
        refuses are dropped at once; returns how many. Other settings need a restart."""
        core = self.core
        core.update_users(users, config.auth_secrets)
        return core.update_policy(config.allow_peers, config.deny_peers, self._loop.time())

    # -- the hot paths --------------------------------------------------------------------

    def _listen_readable(self, endpoint: _UdpEndpoint) -> None:
        core = self.core
        sock = endpoint.sock
        local = endpoint.address
        now = self._loop.time()
        for _ in range(_RECV_BATCH):
            try:
                data, remote = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # an ICMP error queued on the socket; the next read goes on
            core.handle_datagram(data, local, (remote[0], remote[1]), now)
        self._flush()

    def _relay_readable(self, endpoint: _UdpEndpoint) -> None:
        core = self.core
        sock = endpoint.sock
        relay = endpoint.address
        now = self._loop.time()
        for _ in range(_RECV_BATCH):
            try:
                data, peer = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            core.handle_peer_datagram(data, relay, (peer[0], peer[1]), now)
        self._flush()

    def _flush(self) -> None:
        core = self.core
        udp = self._udp
        connections = self._connections
        while (transmit := core.poll_transmit()) is not None:
            if transmit.transport is Transport.UDP:
                endpoint = udp.get(transmit.local)
                if endpoint is None:
                    continue
                if transmit.dont_fragment != endpoint.dont_fragment:
                    endpoint.set_dont_fragment(transmit.dont_fragment)
                try:
                    endpoint.sock.sendto(transmit.data, transmit.remote)
                except OSError:
                    self.send_errors += 1
            else:
                connection = connections.get((transmit.transport, transmit.local, transmit.remote))
                if connection is None or connection.transport is None:
                    continue
                stream = connection.transport
                if stream.is_closing():
                    continue
                if stream.get_write_buffer_size() > _STREAM_WRITE_LIMIT:
                    self.stream_drops += 1
                    continue
                stream.write(transmit.data)
        self._flush_events()
        deadline = core.poll_timeout()
        if deadline != self._timer_deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_deadline = deadline
            self._timer = None if deadline is None else self._loop.call_at(deadline, self._on_timer)
        if self._drained is not None and core.allocation_count == 0:
            self._drained.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        self.core.handle_timeout(self._loop.time())
        self._flush()

    def _housekeep(self) -> None:
        """Close TCP/TLS connections that stayed idle without an allocation."""
        now = self._loop.time()
        core = self.core
        limit = self.config.idle_timeout
        for (kind, local, remote), connection in list(self._connections.items()):
            if connection.raw or now - connection.last_active <= limit:
                continue  # an RFC 6062 data connection lives as long as its peer's
            if core.allocation(FiveTuple(kind, remote, local)) is None and connection.transport:
                connection.transport.close()
        self.core.unix_time_offset = time.time() - now
        self._housekeeping = self._loop.call_later(_HOUSEKEEPING_PERIOD, self._housekeep)

    # -- logs -----------------------------------------------------------------------------

    def _flush_events(self) -> None:
        while (event := self.core.poll_event()) is not None:
            if isinstance(event, ConnectToPeer):
                self._wanted.add(event.connection_id)
                self._peer_tasks[event.connection_id] = self._loop.create_task(
                    self._connect_peer(event)
                )
            elif isinstance(event, DataConnectionBound):
                self._splice(event)
            elif isinstance(event, ClosePeerConnection):
                self._close_peer(event.connection_id)
            else:
                _log_event(event, self.errors_by_code)
            if self._on_event is not None:
                self._on_event(event)

    # -- RFC 6062 peer connections --------------------------------------------------------

    def _relay_accept(self, sock: socket.socket, relay: Address) -> None:
        """A peer connects to a TCP relayed transport address (RFC 6062 §5.3)."""
        now = self._loop.time()
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            connection_id = self.core.peer_connection_accepted(relay, (peer[0], peer[1]), now)
            if connection_id is None:
                conn.close()  # no permission: refused (§5.3)
                continue
            conn.setblocking(False)
            self._wanted.add(connection_id)
            self._peer_tasks[connection_id] = self._loop.create_task(
                self._adopt_peer(conn, connection_id)
            )
        self._flush()

    async def _adopt_peer(self, conn: socket.socket, connection_id: int) -> None:
        try:
            await self._loop.connect_accepted_socket(
                functools.partial(_PeerConnection, self, connection_id), conn
            )
        except OSError:
            conn.close()
            self._peer_tasks.pop(connection_id, None)
            if connection_id in self._wanted:
                self.core.peer_connection_closed(connection_id, self._loop.time())
                self._flush()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        self._peer_tasks.pop(connection_id, None)

    async def _connect_peer(self, command: ConnectToPeer) -> None:
        """RFC 6062 §5.2: connect from the relayed transport address to the peer."""
        connection_id = command.connection_id
        try:
            sock = _relay_tcp_socket(command.relay)
        except OSError:
            self._peer_tasks.pop(connection_id, None)
            self.core.peer_connection_failed(connection_id, self._loop.time())
            self._flush()
            return
        try:
            await self._loop.sock_connect(sock, command.peer)
            await self._loop.create_connection(
                functools.partial(_PeerConnection, self, connection_id), sock=sock
            )
        except OSError:
            sock.close()
            self._peer_tasks.pop(connection_id, None)
            if connection_id in self._wanted:
                self.core.peer_connection_failed(connection_id, self._loop.time())
                self._flush()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        self._peer_tasks.pop(connection_id, None)
        if connection_id in self._wanted:
            self.core.peer_connected(connection_id, self._loop.time())
            self._flush()

    def _peer_established(self, peer: _PeerConnection) -> None:
        connection_id = peer.connection_id
        if connection_id not in self._wanted:
            assert peer.transport is not None
            peer.transport.close()
            return
        self._peers[connection_id] = peer
        client = self._pending_splices.pop(connection_id, None)
        if client is not None:
            client.link(peer)

    def _peer_lost(self, peer: _PeerConnection) -> None:
        connection_id = peer.connection_id
        if self._peers.get(connection_id) is peer:
            del self._peers[connection_id]
            self.core.peer_connection_closed(connection_id, self._loop.time())
            self._flush()
        partner = peer.partner
        if partner is not None and partner.transport is not None:
            partner.transport.close()

    def _splice(self, event: DataConnectionBound) -> None:
        """RFC 6062 §5.4: pipe the client data connection and the peer connection."""
        five_tuple = event.five_tuple
        client = self._connections.get((five_tuple.transport, five_tuple.server, five_tuple.client))
        if client is None:
            return  # already gone; its connection_lost told the core
        client.raw = True
        peer = self._peers.get(event.connection_id)
        if peer is None:
            self._pending_splices[event.connection_id] = client  # not adopted yet
        else:
            client.link(peer)

    def _close_peer(self, connection_id: int) -> None:
        self._wanted.discard(connection_id)
        task = self._peer_tasks.pop(connection_id, None)
        if task is not None:
            task.cancel()
        for side in (
            self._pending_splices.pop(connection_id, None),
            self._peers.pop(connection_id, None),
        ):
            if side is None:
                continue
            for pipe in (side, side.partner):
                if pipe is not None and pipe.transport is not None:
                    pipe.transport.close()


def _tuple(five_tuple: FiveTuple) -> str:
    return (
        f"{five_tuple.transport.value}:{format_address(five_tuple.client)}"
        f"->{format_address(five_tuple.server)}"
    )


def _log_event(event: TurnEvent, errors: Counter[int]) -> None:
    """Structured log lines: ``event key=value ...``."""
    if isinstance(event, AllocationCreated):
        relayed = ",".join(format_address(a) for a in event.relayed)
        log.info(
            "allocation-created client=%s user=%s relayed=%s lifetime=%d",
            _tuple(event.five_tuple),
            event.username,
            relayed,
            event.lifetime,
        )
    elif isinstance(event, AllocationRefreshed):
        log.debug(
            "allocation-refreshed client=%s lifetime=%d", _tuple(event.five_tuple), event.lifetime
        )
    elif isinstance(event, AllocationDeleted):
        log.info(
            "allocation-deleted client=%s user=%s reason=%s",
            _tuple(event.five_tuple),
            event.username,
            event.reason.replace(" ", "-"),
        )
    elif isinstance(event, AllocationExpired):
        log.info("allocation-expired client=%s user=%s", _tuple(event.five_tuple), event.username)
    elif isinstance(event, AuthFailed):
        errors[event.code] += 1
        # The first request of every client is challenged (401 without a user) and nonces
        # go stale (438): routine. A named user failing is worth a warning.
        level = (
            logging.WARNING if event.username is not None and event.code == 401 else logging.INFO
        )
        log.log(
            level,
            "auth-failed source=%s:%s code=%d user=%s reason=%r",
            event.transport.value,
            format_address(event.source),
            event.code,
            event.username if event.username is not None else "-",
            event.reason,
        )
    elif isinstance(event, RequestRejected):
        errors[event.code] += 1
        log.info(
            "request-rejected client=%s method=%#05x code=%d detail=%r",
            _tuple(event.five_tuple),
            event.method,
            event.code,
            event.detail,
        )
    elif isinstance(event, PermissionCreated | PermissionExpired):
        log.debug("%s client=%s peer=%s", _kebab(event), _tuple(event.five_tuple), event.peer_ip)
    elif isinstance(event, ChannelBound | ChannelExpired):
        log.debug(
            "%s client=%s channel=%#06x peer=%s",
            _kebab(event),
            _tuple(event.five_tuple),
            event.channel,
            format_address(event.peer),
        )


def _kebab(event: Any) -> str:
    name: str = type(event).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")
