"""The asyncio STUN server: sockets around :class:`~tsunagu.stun.server.StunServerCore`.

UDP, TCP and TLS, IPv4 and IPv6 (IPv6 sockets are IPv6-only, so ``0.0.0.0:3478`` and
``[::]:3478`` coexist), and the three extra address/port combinations RFC 5780 §6 needs to
answer CHANGE-REQUEST. Port 0 binds an ephemeral port, the same one for the UDP and TCP
socket of an address; :attr:`StunServer.udp_addresses` and friends say what was bound.

    async with await StunServer.start(StunServerConfig(listen=(("127.0.0.1", 0),))) as srv:
        print(srv.listening_line())
        await asyncio.Event().wait()

:func:`serve` is the blocking entry point of ``tsunagu stun-server``: signal handling, the
readiness line, and ``workers`` processes sharing the ports through SO_REUSEPORT under a
supervising parent.

The UDP hot path is the core's :meth:`~tsunagu.stun.server.StunServerCore.respond_fast`,
called straight from ``datagram_received``: no logging, no per-packet objects beyond the
reply itself; everything else goes through ``handle_datagram``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, cast

from tsunagu.address import format_address
from tsunagu.aio.loop import run
from tsunagu.aio.workers import Supervisor, WorkerContext
from tsunagu.errors import StunDecodeError
from tsunagu.stun.attributes import Address
from tsunagu.stun.framing import StreamFramer
from tsunagu.stun.server import StunServerCore
from tsunagu.stun.server_config import StunServerConfig

__all__ = ["StunServer", "serve"]

logger = logging.getLogger(__name__)

Kind = Literal["udp", "tcp", "tls"]

_BIND_ATTEMPTS = 32  # ephemeral port groups retried when a companion port is taken
_UDP_BUFFER = 1 << 21  # ask for 2 MiB socket buffers; the kernel caps at its rmem_max
_UDP_BATCH = 64  # datagrams read per readiness callback before other sockets get a turn
_MAX_DATAGRAM = 65536  # read buffer: no UDP payload is larger, so none is truncated
_STOP_TIMEOUT = 10.0  # seconds workers get to exit after SIGTERM before SIGKILL


# -- binding ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    """One socket to bind. Sockets sharing ``group`` share a port: the UDP and TCP socket
    of one address, and the P1/P2 columns of RFC 5780's four addresses."""

    kind: Kind
    ip: str
    group: tuple[str, int]
    port: int  # as configured; 0 = ephemeral, chosen by the first bind of the group


def _plan(config: StunServerConfig) -> list[_Spec]:
    specs: list[_Spec] = []
    for i, (ip, port) in enumerate(config.listen):
        specs.append(_Spec("udp", ip, ("listen", i), port))
        specs.append(_Spec("tcp", ip, ("listen", i), port))
    for i, (ip, port) in enumerate(config.tls_listen):
        specs.append(_Spec("tls", ip, ("tls", i), port))
    primary, other = config.rfc5780_primary, config.other
    if primary is not None and other is not None:
        # RFC 5780 §6: UDP and TCP on A1:P2, A2:P1 and A2:P2 besides A1:P1 (a listen entry).
        p1 = ("listen", config.listen.index(primary))
        p2 = ("other", 0)
        taken = {(s.kind, s.ip, s.port) for s in specs if s.port}
        for ip, group, port in (
            (primary[0], p2, other[1]),
            (other[0], p1, primary[1]),
            (other[0], p2, other[1]),
        ):
            for kind in ("udp", "tcp"):
                if not port or (kind, ip, port) not in taken:
                    specs.append(_Spec(kind, ip, group, port))
    return specs


def _make_socket(kind: Kind, ip: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            # One family per socket: [::]:3478 must not swallow IPv4 (mapped addresses would
            # then show up in XOR-MAPPED-ADDRESS) nor collide with 0.0.0.0:3478.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind != "udp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart past TIME_WAIT
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == "udp":
            # Bursts queue in the kernel rather than being dropped while the loop is busy.
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, _UDP_BUFFER)
        sock.bind((ip, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_plan(
    config: StunServerConfig, reuse_port: bool
) -> tuple[list[tuple[_Spec, socket.socket]], StunServerConfig]:
    """Bind every socket of the plan; returns them with the config, its ports resolved."""
    specs = _plan(config)
    for _attempt in range(_BIND_ATTEMPTS):
        bound: list[tuple[_Spec, socket.socket]] = []
        ports: dict[tuple[str, int], int] = {}
        try:
            for spec in specs:
                port = ports.get(spec.group, spec.port)
                try:
                    sock = _make_socket(spec.kind, spec.ip, port, reuse_port)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and spec.port == 0 and spec.group in ports:
                        raise _RetryError from exc  # an ephemeral port free here, taken there
                    raise OSError(
                        exc.errno,
                        f"cannot bind {spec.kind} {format_address((spec.ip, port))}: "
                        f"{exc.strerror}",
                    ) from exc
                bound.append((spec, sock))
                ports.setdefault(spec.group, sock.getsockname()[1])
        except _RetryError:
            for _, sock in bound:
                sock.close()
            continue
        except BaseException:
            for _, sock in bound:
                sock.close()
            raise
        other = config.other
        resolved = dataclasses.replace(
            config,
            listen=tuple((ip, ports[("listen", i)]) for i, (ip, _) in enumerate(config.listen)),
            tls_listen=tuple(
                (ip, ports[("tls", i)]) for i, (ip, _) in enumerate(config.tls_listen)
            ),
            other=None if other is None else (other[0], ports.get(("other", 0), other[1])),
        )
        return bound, resolved
    raise OSError(errno.EADDRINUSE, "no ephemeral port free on every address of a group")


class _RetryError(Exception):
    """An ephemeral port group must be chosen again (internal to _bind_plan)."""


def _tls_context(config: StunServerConfig) -> ssl.SSLContext:
    assert config.cert is not None and config.key is not None  # checked by the config
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.cert, config.key)
    return context


# -- protocols -------------------------------------------------------------------------------


class _UdpEndpoint:
    """One bound UDP socket.

    Served straight from ``loop.add_reader``: each readiness callback drains up to
    ``_UDP_BATCH`` datagrams with ``recvfrom`` and answers each with ``sendto``, so the
    per-datagram cost is two system calls and the core's fast path -- measurably less than
    a DatagramProtocol callback per datagram, on uvloop as on the selector loop. A reply
    that does not fit the socket buffer is dropped, as UDP would drop it anyway; the
    client retransmits (RFC 8489 §6.2.1). Loops without ``add_reader`` (Windows' proactor)
    get the same logic through :class:`_UdpProtocol`.
    """

    __slots__ = (
        "_core",
        "_fast",
        "_fd",
        "_loop",
        "_sendto",
        "_server",
        "_sock",
        "_transport",
        "local",
    )

    def __init__(self, server: StunServer, sock: socket.socket, local: Address) -> None:
        self._server = server
        self._core = server.core
        self._sock = sock
        self._fd = -1
        self.local = local
        self._fast = server.core.respond_fast if server.core.fast_path_ok(local) else None
        self._loop = asyncio.get_running_loop()
        self._sendto: Callable[[bytes, Any], Any] = sock.sendto
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        try:
            self._loop.add_reader(self._sock.fileno(), self._readable)
            self._fd = self._sock.fileno()
        except NotImplementedError:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), sock=self._sock
            )
            self._transport = transport
            self._sendto = transport.sendto

    def _readable(self) -> None:
        # The hot path. Locals, no logging, one core call per datagram.
        recvfrom = self._sock.recvfrom
        sendto = self._sendto
        fast = self._fast
        now = self._loop.time()
        for _ in range(_UDP_BATCH):
            try:
                data, addr = recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. a queued ICMP error; the socket is still fine
                logger.debug("udp %s: %s", format_address(self.local), exc)
                continue
            if fast is not None:
                reply = fast(data, addr, now)
                if reply:
                    # try/except, not contextlib.suppress: free when nothing is raised.
                    try:  # noqa: SIM105
                        sendto(reply, addr)
                    except OSError:
                        pass  # socket buffer full or destination unreachable: dropped
                    continue
                if reply is not None:
                    continue  # rate-limited
            self.general(data, addr, now)

    def general(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        """Everything the fast path declines: through ``handle_datagram``."""
        remote = (addr[0], addr[1])
        for transmit in self._core.handle_datagram(data, self.local, remote, now):
            # Reply to ``addr`` itself when we can: it keeps an IPv6 scope id.
            destination = addr if transmit.destination == remote else transmit.destination
            if transmit.source == self.local:
                self.send(transmit.data, destination)
            else:
                self._server._send_from(transmit.source, transmit.data, destination)

    def send(self, data: bytes, destination: Any) -> None:
        with contextlib.suppress(OSError):  # as in _readable: UDP may drop; clients retry
            self._sendto(data, destination)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        if self._transport is not None:
            self._transport.close()
        else:
            self._sock.close()
        self._sendto = _drop


class _UdpProtocol(asyncio.DatagramProtocol):
    """The fallback driver of a :class:`_UdpEndpoint`: one callback per datagram."""

    __slots__ = ("_endpoint", "_fast", "_time")

    def __init__(self, endpoint: _UdpEndpoint) -> None:
        self._endpoint = endpoint
        self._fast = endpoint._fast
        self._time = asyncio.get_running_loop().time

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        now = self._time()
        if self._fast is not None:
            reply = self._fast(data, addr, now)
            if reply:
                self._endpoint.send(reply, addr)
                return
            if reply is not None:
                return
        self._endpoint.general(data, addr, now)

    def error_received(self, exc: Exception) -> None:
        logger.debug("udp %s: %s", format_address(self._endpoint.local), exc)


def _drop(data: bytes, addr: Any) -> None:
    """Where replies go once an endpoint is closed."""


class _StreamProtocol(asyncio.Protocol):
    """One TCP or TLS connection: frames cut by StreamFramer (RFC 8489 §6.2.2), replies
    written back in order, idle timeout, reading paused while the peer does not read."""

    def __init__(self, server: StunServer) -> None:
        self._server = server
        self._core = server.core
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._framer = StreamFramer()
        self._local: Address = ("", 0)
        self._remote: Address = ("", 0)
        self._last_active = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        server = self._server
        if len(server._connections) >= server.config.max_connections:
            transport.abort()  # over the limit: refuse rather than queue
            return
        self._transport = transport
        server._connections.add(self)
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self._local = (local[0], local[1])
        self._remote = (peer[0], peer[1])
        self._last_active = self._loop.time()
        self._timer = self._loop.call_at(
            self._last_active + server.config.idle_timeout, self._check_idle
        )

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        now = self._loop.time()
        self._last_active = now
        try:
            frames = self._framer.feed(data)
        except StunDecodeError:
            # Not STUN framing: the stream cannot be resynchronised (RFC 8489 §6.2.2).
            transport.abort()
            return
        for frame in frames:
            for transmit in self._core.handle_datagram(
                frame, self._local, self._remote, now, stream=True
            ):
                transport.write(transmit.data)

    def pause_writing(self) -> None:
        # The peer is not reading its responses: stop reading its requests, which keeps
        # our write buffer bounded.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _check_idle(self) -> None:
        transport = self._transport
        if transport is None:
            return
        deadline = self._last_active + self._server.config.idle_timeout
        if self._loop.time() >= deadline:
            transport.abort()
        else:
            self._timer = self._loop.call_at(deadline, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


# -- the server ------------------------------------------------------------------------------


class StunServer:
    """A running STUN server. Create with :meth:`start`; stop with :meth:`close` or by
    leaving ``async with``."""

    def __init__(self, config: StunServerConfig, core: StunServerCore) -> None:
        self.config = config
        """The configuration with every port resolved (port 0 replaced by the bound one)."""
        self.core = core
        self.sockets: list[tuple[Kind, Address]] = []
        """Every bound socket, as (kind, address), in the order of :meth:`listening_line`."""
        self._udp: dict[Address, _UdpEndpoint] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[_StreamProtocol] = set()
        self._closed = False

    @classmethod
    async def start(cls, config: StunServerConfig, *, reuse_port: bool | None = None) -> Self:
        """Bind every socket and start serving. ``reuse_port`` (default: ``workers > 1``)
        sets SO_REUSEPORT so several processes can serve the same ports."""
        if reuse_port is None:
            reuse_port = config.workers > 1
        tls = _tls_context(config) if config.tls_listen else None
        bound, resolved = _bind_plan(config, reuse_port)
        server = cls(resolved, StunServerCore(resolved))
        loop = asyncio.get_running_loop()
        try:
            for spec, sock in bound:
                local: Address = sock.getsockname()[:2]
                server.sockets.append((spec.kind, local))
                if spec.kind == "udp":
                    endpoint = _UdpEndpoint(server, sock, local)
                    server._udp[local] = endpoint
                    await endpoint.start()
                else:
                    server._servers.append(
                        await loop.create_server(
                            lambda: _StreamProtocol(server),
                            sock=sock,
                            ssl=tls if spec.kind == "tls" else None,
                            ssl_handshake_timeout=(
                                resolved.idle_timeout if spec.kind == "tls" else None
                            ),
                            backlog=min(resolved.max_connections, socket.SOMAXCONN),
                        )
                    )
        except BaseException:
            await server.close()  # closes the transports made so far, then the rest:
            for _, sock in bound:
                sock.close()
            raise
        logger.info("%s", server.listening_line())
        return server

    @property
    def udp_addresses(self) -> list[Address]:
        return [address for kind, address in self.sockets if kind == "udp"]

    @property
    def tcp_addresses(self) -> list[Address]:
        return [address for kind, address in self.sockets if kind == "tcp"]

    @property
    def tls_addresses(self) -> list[Address]:
        return [address for kind, address in self.sockets if kind == "tls"]

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def listening_line(self) -> str:
        """``listening udp 127.0.0.1:3478, tcp 127.0.0.1:3478, ...``: what the command
        prints once every socket is bound, for whoever waits on its readiness."""
        return "listening " + ", ".join(
            f"{kind} {format_address(address)}" for kind, address in self.sockets
        )

    def _send_from(self, source: Address, data: bytes, destination: Address) -> None:
        """Send from another of our UDP sockets (RFC 5780 CHANGE-REQUEST)."""
        endpoint = self._udp.get(source)
        if endpoint is not None:
            endpoint.send(data, destination)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.abort()
        for endpoint in self._udp.values():
            endpoint.close()
        for server in self._servers:
            await server.wait_closed()
        # Let transports run their connection_lost callbacks before the loop may close.
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- processes -------------------------------------------------------------------------------


async def _serve_until_signalled(
    config: StunServerConfig, announce: Callable[[str], None], reuse_port: bool
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with await StunServer.start(config, reuse_port=reuse_port) as server:
            announce(server.listening_line())
            await stop.wait()
            logger.info("stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def serve(config: StunServerConfig, announce: Callable[[str], None]) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit status (0 on a signal).

    ``announce`` receives :meth:`StunServer.listening_line` once every socket of every
    worker is listening. With ``workers > 1`` this process forks the workers, each binding
    the same ports with SO_REUSEPORT, restarts any that dies (at most five times a minute),
    and forwards SIGTERM to them when told to stop (:class:`~tsunagu.aio.workers.Supervisor`).
    """
    try:
        if config.workers == 1:
            return run(_serve_until_signalled(config, announce, reuse_port=False))
        held: list[socket.socket] = []
        if any(port == 0 for _, port in (*config.listen, *config.tls_listen)) or (
            config.other is not None and config.other[1] == 0
        ):
            # Choose the ephemeral ports once, here, so that every worker binds the same
            # ones; hold them (SO_REUSEPORT) until the workers have bound them too.
            bound, config = _bind_plan(config, reuse_port=True)
            held = [sock for _, sock in bound]
        resolved = config

        def worker(context: WorkerContext, ready: Callable[[str], None]) -> int:
            return run(_serve_until_signalled(resolved, ready, reuse_port=True))

        return Supervisor(
            config.workers, worker, announce, held=held, stop_timeout=_STOP_TIMEOUT
        ).run()
    except (OSError, ssl.SSLError) as exc:
        logger.error("%s", exc)
        return 1
