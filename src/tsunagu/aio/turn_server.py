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
avoids a transport object per relay socket and keeps the relay path short: ChannelData,
the usual Send indications and datagrams from peers go through the core's fast paths
(``relay_udp_channel_data``, ``relay_udp_send_indication``, ``relay_peer_datagram``) and
straight to a socket, with no message objects. On Linux, what a batch relays over UDP to
one peer (or one client) leaves in UDP GSO sends, one system call for a run of equal-size
datagrams (:meth:`TurnServer._send_batch`), per-flow order kept. A send error towards one
peer (ICMP unreachable, EMSGSIZE with DF set, ...) is counted and dropped: it never stops an
allocation from relaying to its other peers. Towards a TCP/TLS client whose connection
cannot keep up, relayed data beyond a bounded write buffer is dropped, as UDP would drop
it.

ICMP (RFC 8656 §11.5): on Linux relay sockets set IP_RECVERR / IPV6_RECVERR, and the
errors the kernel queues for them (read with MSG_ERRQUEUE) go to the core, which relays
them to the client as Data indications with an ICMP attribute.

Operations: structured log lines (:class:`LogEvent`, text or :class:`JsonFormatter`);
``config.metrics`` serves Prometheus ``/metrics`` and ``/healthz`` from a thread
(:class:`MetricsEndpoint`), the numbers read from the core at scrape time on the loop
(:meth:`TurnServer.metrics_snapshot`), so the relay path only increments integers. As one
worker of ``--workers`` (:mod:`tsunagu.aio.workers`), a server relays from its slice of
the port range, steers clients to workers by source address (SO_ATTACH_REUSEPORT_CBPF),
answers the supervisor's metrics queries, and hands an RFC 6062 ConnectionBind for another
worker's CONNECTION-ID to that worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import functools
import http.server
import json
import logging
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tsunagu.aio.sockets import shared_port_tcp_socket
from tsunagu.aio.workers import WorkerContext
from tsunagu.errors import StunDecodeError
from tsunagu.stun.attributes import ConnectionId
from tsunagu.stun.message import Message
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

__all__ = [
    "JsonFormatter",
    "LogEvent",
    "MetricsEndpoint",
    "RelaySockets",
    "TurnCollector",
    "TurnServer",
    "configure_logging",
    "hold_listening_ports",
    "merge_snapshots",
    "render_metrics",
    "worker_for_ip",
]

log = logging.getLogger("tsunagu.turn")

_LINUX = sys.platform.startswith("linux")
# <linux/in.h>: not exported by Python's socket module.
_IP_MTU_DISCOVER = 10
_IP_PMTUDISC_DONT = 0
_IP_PMTUDISC_DO = 2
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")  # <linux/errqueue.h> sock_extended_err
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
_ERRQUEUE_BATCH = 16  # queued ICMP errors read per readiness callback

_RECV_BATCH = 64  # datagrams read per readiness callback: bounded, and fair to other sockets
_RECV_SIZE = 65535

# Linux UDP GSO (generic segmentation offload, Linux >= 4.18, <linux/udp.h>): one sendmsg
# with a UDP_SEGMENT control message (the segment size, a u16) carries several datagrams
# for one destination, each of that size but the last, which may be shorter; the kernel
# (or the NIC) cuts them apart, and the receiver sees ordinary datagrams. The relay sends
# each run of equal-size datagrams for one peer (or one client) read in a batch this way:
# one system call where there were up to _RECV_BATCH.
_SOL_UDP = 17
_UDP_SEGMENT = 103
_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS: more is EINVAL
_GSO_MAX_BYTES = 65507  # the whole run is built as one UDP datagram (IPv4's largest payload)
_SEGMENT_SIZE = struct.Struct("=H")
# The kernel or the route cannot segment (no UDP_SEGMENT, xfrm, no checksum offload: EIO;
# a segment larger than the path MTU: EINVAL). Nothing was sent: a GSO send builds one
# packet or fails before transmitting anything. Refused on a socket's first try, GSO is
# turned off for it -- but EINVAL for segments larger than _GSO_SAFE_SEGMENT only says that
# this path's MTU is smaller: that run goes one datagram at a time, GSO stays.
_GSO_UNSUPPORTED = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_GSO_SAFE_SEGMENT = 1232  # fits any IPv6 path with its headers (RFC 8200 §5: MTU >= 1280)
_GSO_UNTRIED, _GSO_WORKS, _GSO_OFF = 0, 1, -1  # _UdpEndpoint.gso


_SOCKET_BUFFER = 1 << 20  # relayed bursts must not overflow the kernel buffers
_STREAM_WRITE_LIMIT = 1 << 20  # bytes queued to one slow TCP/TLS client before dropping
_BACKLOG = 1024
_PORT_ATTEMPTS = 16  # tries to find a port free for both UDP and TCP when asked for port 0
_HOUSEKEEPING_PERIOD = 5.0  # seconds between idle-connection sweeps
_PIPE_HOLD_LIMIT = 1 << 18  # RFC 6062 bytes held per side until the splice, then paused
_ACCEPT_BATCH = 16  # peer connections accepted per readiness callback
_CALL_TIMEOUT = 2.0  # seconds the metrics thread waits for the event loop's answer
_HANDOFF = b"C"  # mailbox post: an RFC 6062 data connection for the owning worker
_CONNECTION_BIND_REQUEST = b"\x00\x0b"  # STUN message type: ConnectionBind request
_SEND_INDICATION = b"\x00\x16"  # STUN message type: Send indication


_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)
"""Linux: create sockets non-blocking in the socket() call itself."""


@functools.cache
def _gso_available() -> bool:
    """Whether this kernel knows UDP_SEGMENT (Linux >= 4.18): asked once."""
    if not _LINUX:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.getsockopt(_SOL_UDP, _UDP_SEGMENT)
    except OSError:
        return False
    return True


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _udp_socket(address: Address, reuse_port: bool = False) -> socket.socket:
    # One of these per allocation (relay sockets): the family is taken from the address
    # rather than from ``sock.family`` (an enum conversion per read), and the socket is
    # created non-blocking where the platform allows, saving the calls of setblocking().
    family = _family(address[0])
    sock = socket.socket(family, socket.SOCK_DGRAM | _SOCK_NONBLOCK)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:  # noqa: SIM105 - cheaper than contextlib.suppress, once per allocation
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:
                pass  # a smaller buffer than asked for will do
        sock.bind(address)
        if not _SOCK_NONBLOCK:
            sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _tcp_socket(address: Address, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(_family(address[0]), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bound(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return name[0], name[1]


# Classic BPF for SO_ATTACH_REUSEPORT_CBPF (<linux/filter.h>): pick the worker by the
# client's IP address, so that all of one host's connections and datagrams reach the same
# worker (see :func:`worker_for_ip`).
_SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000
_AFFINITY_MULTIPLIER = 0x9E3779B1


def _affinity_program(workers: int, ipv6: bool) -> bytes:
    """The BPF instructions: load the source address word(s), hash, modulo ``workers``."""
    net = _SKF_NET_OFF & 0xFFFFFFFF
    # IPv4: ld [source address]. IPv6: the last 64 bits of the source address (offset 8 + 8
    # in the header), folded: ld; tax; ld; xor x.
    ipv4_load = [(0x20, net + 12)]
    ipv6_load = [(0x20, net + 20), (0x07, 0), (0x20, net + 16), (0xAC, 0)]
    load = ipv6_load if ipv6 else ipv4_load
    code = [
        *load,
        (0x24, _AFFINITY_MULTIPLIER),  # mul
        (0x74, 16),  # rsh
        (0x94, workers),  # mod
        (0x16, 0),  # ret a
    ]
    return b"".join(struct.pack("=HBBI", op, 0, 0, k) for op, k in code)


def worker_for_ip(ip: str, workers: int) -> int:
    """The slot of the SO_REUSEPORT group (one socket per worker, in the order they bound
    it) that the kernel gives traffic from ``ip`` once every worker is listening: what
    :func:`_steer_by_source` programs. Two addresses with different slots reach different
    workers."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    if len(packed) == 16:
        word = int.from_bytes(packed[12:16]) ^ int.from_bytes(packed[8:12])
    else:
        word = int.from_bytes(packed)
    return ((word * _AFFINITY_MULTIPLIER & 0xFFFFFFFF) >> 16) % workers


def _steer_by_source(sock: socket.socket, workers: int) -> bool:
    """Attach the source-address affinity program to ``sock``'s SO_REUSEPORT group (Linux;
    False elsewhere or if refused, leaving the kernel's 4-tuple hash)."""
    if not _LINUX:
        return False
    program = _affinity_program(workers, sock.family == socket.AF_INET6)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // 8, ctypes.addressof(buffer))  # sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.warning(LogEvent("affinity-unavailable", error=str(exc)))
        return False
    return True


def _bind_pair(address: Address, reuse_port: bool = False) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on the same address and port (RFC 8656 §4.1: TURN over UDP and
    TCP share the port)."""
    attempts = _PORT_ATTEMPTS if address[1] == 0 else 1
    for attempt in range(attempts):
        udp = _udp_socket(address, reuse_port)
        try:
            return udp, _tcp_socket(_bound(udp), reuse_port)
        except OSError as exc:
            udp.close()
            if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise
    raise OSError(errno.EADDRINUSE, f"no port free for UDP and TCP on {address[0]}")


def hold_listening_ports(config: TurnServerConfig) -> tuple[list[socket.socket], TurnServerConfig]:
    """For a supervisor of ``--workers``: bind the listening addresses given with port 0
    (SO_REUSEPORT) so that every worker binds the same ports; returns the sockets to hold
    until the workers listen, and the configuration with those ports filled in."""
    held: list[socket.socket] = []
    try:
        listen: list[Address] = []
        for address in config.listen:
            if address[1] == 0:
                udp, tcp = _bind_pair(address, reuse_port=True)
                held += [udp, tcp]
                listen.append(_bound(udp))
            else:
                listen.append(address)
        tls_listen: list[Address] = []
        for address in config.tls_listen:
            if address[1] == 0:
                tls = _tcp_socket(address, reuse_port=True)
                held.append(tls)
                tls_listen.append(_bound(tls))
            else:
                tls_listen.append(address)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, dataclasses.replace(config, listen=tuple(listen), tls_listen=tuple(tls_listen))


class _UdpEndpoint:
    """A bound UDP socket: a listening socket or a relay socket."""

    __slots__ = ("address", "dont_fragment", "gso", "sendmsg", "sendto", "sock")

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self.sock = sock
        self.sendto = sock.sendto
        self.sendmsg = sock.sendmsg
        self.address = address
        self.dont_fragment = False
        self.gso = _GSO_UNTRIED if _gso_available() else _GSO_OFF
        """UDP GSO on this socket: untried, known to work, or off (refused on the first
        try, or not in the kernel)."""

    def set_dont_fragment(self, on: bool) -> None:
        """RFC 8656 §14: the IPv4 DF bit (or IPv6's "do not fragment locally")."""
        sock = self.sock
        with contextlib.suppress(OSError):
            if ":" not in self.address[0]:  # IPv4 (not sock.family: an enum per read)
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
        if _LINUX:
            ipv4 = ":" not in address[0]  # not sock.family: an enum conversion per read
            # RFC 8656 §11.5: queue ICMP errors for the socket (read with MSG_ERRQUEUE).
            with contextlib.suppress(OSError):
                if ipv4:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            if ipv4:
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
            sock = shared_port_tcp_socket(address)
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

    def __init__(self, server: TurnServer, kind: Transport, initial: bytes | None = None) -> None:
        """``initial``: bytes another worker read from this connection before handing it
        over (RFC 6062 routing, see :meth:`TurnServer._route_connection_bind`)."""
        super().__init__()
        self._server = server
        self.kind = kind
        channel_max = 0x7F if server.config.rfc5766_channels else 0x4F
        self._framer = _Framer(channel_max)
        self.local: Address = ("", 0)
        self.remote: Address = ("", 0)
        self.last_active = 0.0
        self._initial = initial
        # Only the first frame of a TCP connection accepted here may be routed elsewhere
        # (a TLS session cannot be passed to another process).
        self.fresh = initial is None and server._routes_connection_binds and kind is Transport.TCP

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
        if self._initial:
            initial, self._initial = self._initial, None
            self.data_received(initial)

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
                if self.fresh:
                    self.fresh = False
                    owner = server._connection_bind_owner(frame)
                    if owner is not None:  # RFC 6062 §5.4 on another worker's CONNECTION-ID
                        server._hand_off(self, owner, frame + framer.take_rest())
                        return
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
        worker: WorkerContext | None = None,
    ) -> None:
        """Use :meth:`start`."""
        self.config = config
        self._on_event = on_event
        self._loop = loop
        self._worker = worker
        self._routes_connection_binds = worker is not None and worker.count > 1
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
        self._adoptions: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None
        self._closing = False
        self._metrics: MetricsEndpoint | None = None
        self.udp_addresses: list[Address] = []
        self.tcp_addresses: list[Address] = []
        self.tls_addresses: list[Address] = []
        self.metrics_address: Address | None = None
        """Where ``/metrics`` and ``/healthz`` are served (``config.metrics``, resolved)."""
        self.send_errors = 0
        """Datagrams the kernel refused to send (one peer's trouble, counted and dropped)."""
        self.stream_drops = 0
        """Frames dropped because a TCP/TLS client's write buffer was full."""
        self.errors_by_code: Counter[int] = Counter()
        """Error responses sent, by STUN error code (401/438 included)."""
        self.auth_failures: Counter[int] = Counter()
        """401/438 answers to requests that carried credentials (not first challenges)."""
        self.handoffs = 0
        """RFC 6062 data connections handed to the worker owning their CONNECTION-ID."""

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        config: TurnServerConfig,
        *,
        users: Mapping[str, UserKeys] | None = None,
        on_event: Callable[[TurnEvent], None] | None = None,
        reuse_port: bool = False,
        worker: WorkerContext | None = None,
    ) -> TurnServer:
        """Bind every socket and start serving. ``users`` defaults to ``config.users``
        plus the contents of ``config.users_file``; ``on_event`` receives every core event
        after it is logged (metrics, tests). ``reuse_port`` binds the listening sockets
        with SO_REUSEPORT; ``worker`` makes this server one of several processes
        (``--workers``, see :mod:`tsunagu.aio.workers`): it then relays from its slice of
        the port range and answers its mailbox. ``config.metrics`` starts the HTTP
        metrics endpoint (never in a worker: the supervisor serves it). Raises OSError
        or ValueError."""
        server = cls(config, asyncio.get_running_loop(), on_event, worker)
        try:
            await server._open(users, reuse_port)
        except BaseException:
            await server.close()
            raise
        return server

    async def _open(self, users: Mapping[str, UserKeys] | None, reuse_port: bool) -> None:
        config = self.config
        worker = self._worker
        if users is None:
            text = Path(config.users_file).read_text() if config.users_file else None
            users = build_users(config, text)
        for address in config.listen:
            udp, tcp = _bind_pair(address, reuse_port)
            self._listen_sockets.append((Transport.TCP, tcp))
            endpoint = _UdpEndpoint(udp, _bound(udp))
            self._listening_udp.append(endpoint)
            self._udp[endpoint.address] = endpoint
            self.udp_addresses.append(endpoint.address)
            self.tcp_addresses.append(_bound(tcp))
        for address in config.tls_listen:
            tls = _tcp_socket(address, reuse_port)
            self._listen_sockets.append((Transport.TLS, tls))
            self.tls_addresses.append(_bound(tls))
        listening = [*self.udp_addresses, *self.tcp_addresses, *self.tls_addresses]
        self.core = TurnServerCore(
            config,
            RelaySockets(self),
            listening=listening,
            users=users,
            unix_time_offset=time.time() - self._loop.time(),
            relay_ports=config.worker_ports(worker.index) if worker is not None else None,
            connection_id_shard=(worker.index, worker.count) if worker is not None else (0, 1),
            tcp_allocations_over_tls=not self._routes_connection_binds,
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
        if worker is not None:
            self._loop.add_reader(worker.inbox.fileno(), self._mailbox_readable)
            if worker.count > 1 and reuse_port:
                for sock in [e.sock for e in self._listening_udp] + [
                    sock for _, sock in self._listen_sockets
                ]:
                    _steer_by_source(sock, worker.count)
        elif config.metrics is not None:
            self._metrics = MetricsEndpoint(config.metrics, self._render_metrics, self._healthy)
            self.metrics_address = self._metrics.address
        self._housekeeping = self._loop.call_later(_HOUSEKEEPING_PERIOD, self._housekeep)

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
        if self._metrics is not None:
            await self._metrics.aclose()
        if self._worker is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._worker.inbox.fileno())
        for task in list(self._adoptions):
            task.cancel()
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

    # -- metrics and health -----------------------------------------------------------------

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters and gauges for ``/metrics``, read from the core at this moment (call on
        the event loop). Plain JSON values, so that workers can send theirs to the
        supervisor, which adds them up (:func:`merge_snapshots`)."""
        core = self.core
        stats = core.stats
        permissions = channels = peer_connections = 0
        for allocation in core.allocations():
            permissions += len(allocation.permissions)
            channels += len(allocation.channels)
            peer_connections += len(allocation.connections)
        return {
            "allocations": core.allocation_count,
            "permissions": permissions,
            "channels": channels,
            "peer_connections": peer_connections,
            "client_connections": len(self._connections),
            "relay_ports": core.relay_ports_in_use,
            "packets": {"to_peer": stats.packets_to_peers, "to_client": stats.packets_to_clients},
            "bytes": {"to_peer": stats.bytes_to_peers, "to_client": stats.bytes_to_clients},
            "dropped": {
                "from_client": stats.dropped_from_clients,
                "from_peer": stats.dropped_from_peers,
                "bandwidth": stats.dropped_bandwidth,
                "send_error": self.send_errors,
                "stream_full": self.stream_drops,
            },
            "icmp_to_clients": stats.icmp_to_clients,
            "rate_limited": stats.rate_limited,
            "handoffs": self.handoffs,
            "auth_failures": {str(code): n for code, n in self.auth_failures.items()},
            "errors": {str(code): n for code, n in self.errors_by_code.items()},
            "draining": int(not core.accepting),
            "workers": 1,
        }

    def _in_loop(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the event loop from another thread (the metrics server's)
        and return its result; raises TimeoutError or RuntimeError (loop closed)."""
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                result.set_result(function())
            except Exception as exc:  # handed to the waiting thread
                result.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return result.result(_CALL_TIMEOUT)

    def _render_metrics(self) -> bytes:
        return render_metrics(self._in_loop(self.metrics_snapshot))

    def _healthy(self) -> bool:
        """Serving: the loop answers and new allocations are accepted (not draining)."""
        try:
            return bool(self._in_loop(lambda: self.core.accepting and not self._closing))
        except (TimeoutError, RuntimeError):
            return False

    # -- workers: mailbox and RFC 6062 routing ------------------------------------------------

    def _mailbox_readable(self) -> None:
        worker = self._worker
        assert worker is not None
        for mail in worker.receive():
            if mail.kind == "query":
                mail.reply(json.dumps(self.metrics_snapshot()).encode())
                for fd in mail.fds:
                    os.close(fd)
            elif mail.body[:1] == _HANDOFF and len(mail.fds) == 1 and not self._closing:
                self._adopt_client(mail.fds[0], mail.body[1:])
            else:
                for fd in mail.fds:
                    os.close(fd)

    def _connection_bind_owner(self, frame: bytes) -> int | None:
        """RFC 6062 with several workers: the worker owning the CONNECTION-ID of a
        ConnectionBind that arrived here as the first frame of a TCP connection, when that
        is another worker (the kernel spreads new connections over the workers, but the
        peer connection lives where the allocation is). None: handle it here."""
        worker = self._worker
        if worker is None or frame[:2] != _CONNECTION_BIND_REQUEST:
            return None
        try:
            connection_id = Message.decode(frame).get(ConnectionId)
        except StunDecodeError:
            return None
        if connection_id is None:
            return None
        owner = connection_id.value % worker.count
        return None if owner == worker.index else owner

    def _hand_off(self, connection: _Connection, owner: int, data: bytes) -> None:
        """Pass a client TCP connection (its socket, and the bytes read from it so far) to
        worker ``owner``; this worker forgets it without telling the core (which has no
        state for it: the first frame was not processed here)."""
        worker = self._worker
        transport = connection.transport
        assert worker is not None and transport is not None
        del self._connections[(connection.kind, connection.local, connection.remote)]
        sock = transport.get_extra_info("socket")
        posted = False
        if sock is not None:
            fd = os.dup(sock.fileno())
            try:
                posted = worker.post(owner, _HANDOFF + data, [fd])
            finally:
                os.close(fd)
        if posted:
            self.handoffs += 1
        else:
            log.warning(LogEvent("handoff-failed", client=format_address(connection.remote)))
        # Closing our descriptor leaves the connection open: the owner holds it now.
        transport.abort()

    def _adopt_client(self, fd: int, data: bytes) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        sock.setblocking(False)
        task = self._loop.create_task(self._adopt(sock, data))
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt(self, sock: socket.socket, data: bytes) -> None:
        try:
            await self._loop.connect_accepted_socket(
                functools.partial(_Connection, self, Transport.TCP, data), sock
            )
        except OSError:
            sock.close()
        except asyncio.CancelledError:
            sock.close()
            raise

    # -- the hot paths --------------------------------------------------------------------

    def _listen_readable(self, endpoint: _UdpEndpoint) -> None:
        # The client side of the hot path: ChannelData and Send indications (without
        # DONT-FRAGMENT) go from the core's fast paths (which check and count each datagram)
        # to a list, sent once the batch is read, so that runs for one peer leave in one GSO
        # send (_send_to_peers); everything else goes through handle_datagram and _flush,
        # after what was read before it is sent.
        core = self.core
        recvfrom = endpoint.sock.recvfrom
        local = endpoint.address
        now = self._loop.time()
        channel_data = core.relay_udp_channel_data
        send_indication = core.relay_udp_send_indication
        first_max = core.channel_first_byte_max
        udp = self._udp
        ipv4 = endpoint.sock.family == socket.AF_INET
        targets: list[tuple[Address, Address, bytes]] = []
        for _ in range(_RECV_BATCH):
            try:
                data, remote = recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # an ICMP error queued on the socket; the next read goes on
            if not ipv4:
                remote = (remote[0], remote[1])  # drop flow info and scope id
            if data and 0x40 <= data[0] <= first_max:
                target = channel_data(data, local, remote, now)
                if target is not None:
                    targets.append(target)
                continue
            if data[:2] == _SEND_INDICATION:
                sent = send_indication(data, local, remote, now)
                if sent is not False:
                    if sent is None:
                        continue  # dropped (and counted) by the core
                    relay_address, peer, payload, dont_fragment = sent
                    if not dont_fragment:  # joins the batch, in order, like ChannelData
                        targets.append((relay_address, peer, payload))
                        continue
                    if targets:  # keep each flow in order: what came before goes first
                        self._send_to_peers(targets)
                        targets = []
                    if (relay := udp.get(relay_address)) is not None:
                        self._send_udp(relay, payload, peer, dont_fragment)
                    continue
            if targets:  # keep each flow in order: what came before this goes first
                self._send_to_peers(targets)
                targets = []
            core.handle_datagram(data, local, remote, now)
        if targets:
            self._send_to_peers(targets)
        self._flush()

    def _send_to_peers(self, targets: list[tuple[Address, Address, bytes]]) -> None:
        """Send the ChannelData payloads of one batch: grouped by (relay socket, peer) in
        the order read (per-flow order holds; flows may interleave differently), each
        group by :meth:`_send_batch`. Only payloads sent without DONT-FRAGMENT come here
        (ChannelData has none; a Send indication may ask for it): DF off (RFC 8656 §14)."""
        udp = self._udp
        if len(targets) == 1:
            relay_address, peer, payload = targets[0]
            relay = udp.get(relay_address)
            if relay is not None:
                if relay.dont_fragment:
                    relay.set_dont_fragment(False)
                try:
                    relay.sendto(payload, peer)
                except OSError:
                    self._send_udp(relay, payload, peer, False)  # retry
            return
        groups: dict[tuple[Address, Address], list[bytes]] = {}
        for relay_address, peer, payload in targets:
            key = (relay_address, peer)
            group = groups.get(key)
            if group is None:
                groups[key] = [payload]
            else:
                group.append(payload)
        for (relay_address, peer), payloads in groups.items():
            relay = udp.get(relay_address)
            if relay is not None:
                if relay.dont_fragment:
                    relay.set_dont_fragment(False)
                self._send_batch(relay, payloads, peer, True)

    def _send_batch(
        self, endpoint: _UdpEndpoint, datagrams: list[bytes], destination: Address, to_peer: bool
    ) -> None:
        """Send ``datagrams`` in order to one destination: each run of equal sizes (the
        last of a run may be shorter; empty datagrams never join one) in one UDP GSO
        sendmsg, the rest, or all when GSO is off or refused, one ``sendto`` each. A
        failed send is retried once towards a peer (see :meth:`_send_udp`), counted and
        dropped towards a client, as without GSO."""
        count = len(datagrams)
        start = 0
        while start < count:  # bounded: each pass moves start forward
            end = start + 1
            if endpoint.gso != _GSO_OFF:
                size = total = len(datagrams[start])
                limit = min(count, start + _GSO_MAX_SEGMENTS)
                while end < limit and size:
                    length = len(datagrams[end])
                    if length > size or not length or total + length > _GSO_MAX_BYTES:
                        break
                    total += length
                    end += 1
                    if length < size:
                        break  # only the last segment may be shorter
                if end - start > 1:
                    try:
                        endpoint.sendmsg(
                            datagrams[start:end],
                            [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT_SIZE.pack(size))],
                            0,
                            destination,
                        )
                    except OSError as exc:
                        # Nothing of the run was sent: it goes one datagram at a time below.
                        if (
                            endpoint.gso == _GSO_UNTRIED
                            and exc.errno in _GSO_UNSUPPORTED
                            and (exc.errno != errno.EINVAL or size <= _GSO_SAFE_SEGMENT)
                        ):
                            endpoint.gso = _GSO_OFF
                    else:
                        endpoint.gso = _GSO_WORKS
                        start = end
                        continue
            for datagram in datagrams[start:end]:
                try:
                    endpoint.sendto(datagram, destination)
                except OSError:
                    if to_peer:
                        self._send_udp(endpoint, datagram, destination, False)  # retry
                    else:
                        self.send_errors += 1
            start = end

    def _send_udp(
        self, endpoint: _UdpEndpoint, data: bytes, peer: Address, dont_fragment: bool
    ) -> None:
        if dont_fragment != endpoint.dont_fragment:
            endpoint.set_dont_fragment(dont_fragment)
        try:
            endpoint.sock.sendto(data, peer)
        except BlockingIOError:
            self.send_errors += 1
        except OSError:
            # With IP_RECVERR the kernel reports an ICMP error that came back for an
            # earlier datagram (maybe to another peer) on the next send, and drops that
            # send: retry once, so that one unreachable peer never costs another peer its
            # packet.
            try:
                endpoint.sock.sendto(data, peer)
            except OSError:
                self.send_errors += 1

    def _write_stream(
        self, transport: Transport, local: Address, remote: Address, data: bytes
    ) -> None:
        connection = self._connections.get((transport, local, remote))
        if connection is None or connection.transport is None:
            return
        stream = connection.transport
        if stream.is_closing():
            return
        if stream.get_write_buffer_size() > _STREAM_WRITE_LIMIT:
            self.stream_drops += 1
            return
        stream.write(data)

    def _relay_readable(self, endpoint: _UdpEndpoint) -> None:
        # The peer side of the hot path: the core checks and counts each datagram; the
        # frames for a UDP client are sent once the batch is read (_send_to_client).
        core = self.core
        recvfrom = endpoint.sock.recvfrom
        relay = endpoint.address
        now = self._loop.time()
        relay_peer_datagram = core.relay_peer_datagram
        ipv4 = endpoint.sock.family == socket.AF_INET
        frames: list[bytes] = []
        client: FiveTuple | None = None
        for n in range(_RECV_BATCH):
            try:
                data, peer = recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if n == 0 and _LINUX:
                    # Woken with nothing to read: an ICMP error is queued (EPOLLERR) whose
                    # pending error a send already reported.
                    self._read_icmp_errors(endpoint, now)
                break
            except OSError:  # IP_RECVERR: an ICMP error is queued; datagrams may follow
                self._read_icmp_errors(endpoint, now)
                continue
            if not ipv4:
                peer = (peer[0], peer[1])
            relayed = relay_peer_datagram(data, relay, peer, now)
            if relayed is None:
                continue
            five_tuple, frame = relayed
            if five_tuple[0] is Transport.UDP:
                # Held until the batch is read, in order, then sent in GSO runs (one
                # allocation, so one client, per relay socket). ChannelData over UDP is
                # not padded (RFC 8656 §12.5): equal payloads make equal frames.
                if five_tuple is not client:
                    if frames:
                        self._send_to_client(client, frames)
                        frames = []
                    client = five_tuple
                frames.append(frame)
            else:
                self._write_stream(five_tuple[0], five_tuple[2], five_tuple[1], frame)
        if frames:
            self._send_to_client(client, frames)
        self._flush()

    def _send_to_client(self, five_tuple: FiveTuple | None, frames: list[bytes]) -> None:
        """Send frames relayed from peers to a UDP client, in order (:meth:`_send_batch`)."""
        assert five_tuple is not None
        listening = self._udp.get(five_tuple[2])
        if listening is None:
            return
        if len(frames) == 1:
            try:
                listening.sendto(frames[0], five_tuple[1])
            except OSError:
                self.send_errors += 1
        else:
            self._send_batch(listening, frames, five_tuple[1], False)

    def _read_icmp_errors(self, endpoint: _UdpEndpoint, now: float) -> None:
        """RFC 8656 §11.5: hand the relay socket's queued ICMP errors to the core."""
        sock = endpoint.sock
        for _ in range(_ERRQUEUE_BATCH):
            try:
                _, ancdata, _, peer = sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except OSError:
                return
            for level, kind, value in ancdata:
                if (level, kind) not in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ) or len(value) < _SOCK_EXTENDED_ERR.size:
                    continue
                _, origin, icmp_type, icmp_code, _, info, _ = _SOCK_EXTENDED_ERR.unpack_from(value)
                if origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6) and peer:
                    self.core.handle_peer_icmp(
                        endpoint.address, (peer[0], peer[1]), (icmp_type, icmp_code, info), now
                    )

    def _flush(self) -> None:
        core = self.core
        udp = self._udp
        while (transmit := core.poll_transmit()) is not None:
            if transmit.transport is Transport.UDP:
                endpoint = udp.get(transmit.local)
                if endpoint is not None:
                    self._send_udp(endpoint, transmit.data, transmit.remote, transmit.dont_fragment)
            else:
                self._write_stream(
                    transmit.transport, transmit.local, transmit.remote, transmit.data
                )
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
                _log_event(event, self.errors_by_code, self.auth_failures)
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
            sock = shared_port_tcp_socket(command.relay)
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


# -- structured logs ---------------------------------------------------------------------------


class LogEvent:
    """A structured log message: an event name and its fields. ``str()`` gives the text
    form, ``event key=value ...`` (values with spaces or quotes JSON-quoted);
    :class:`JsonFormatter` writes the fields as JSON members."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, **fields: object) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        parts = [self.event]
        for key, value in self.fields.items():
            text = str(value)
            if not text or not text.isprintable() or any(c in text for c in ' "=\\'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``pid``,
    then ``event`` and the fields of a :class:`LogEvent`, or ``message`` for plain
    records."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        message = record.msg
        if isinstance(message, LogEvent) and not record.args:
            out["event"] = message.event
            for key, value in message.fields.items():
                plain = value is None or isinstance(value, bool | int | float | str)
                out.setdefault(key, value if plain else str(value))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``, as text lines or JSON objects (``--log-format``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _log_event(event: TurnEvent, errors: Counter[int], auth_failures: Counter[int]) -> None:
    """Structured log lines (see :class:`LogEvent`): allocation lifecycle at info,
    authentication failures with their source address, rejected requests. A line whose
    level is off is not built (every Allocate brings two or three of these events)."""
    if isinstance(event, AuthFailed | RequestRejected):
        errors[event.code] += 1
        if isinstance(event, AuthFailed) and event.username is not None:
            auth_failures[event.code] += 1
    # The first request of every client is challenged (401 without a user) and nonces
    # go stale (438): routine. A named user failing is worth a warning.
    named_401 = isinstance(event, AuthFailed) and event.username is not None and event.code == 401
    if not log.isEnabledFor(logging.WARNING if named_401 else _EVENT_LEVELS.get(type(event), 0)):
        return
    if isinstance(event, AllocationCreated):
        log.info(
            LogEvent(
                "allocation-created",
                client=_tuple(event.five_tuple),
                user=event.username,
                relayed=",".join(format_address(a) for a in event.relayed),
                lifetime=event.lifetime,
            )
        )
    elif isinstance(event, AllocationRefreshed):
        log.debug(
            LogEvent(
                "allocation-refreshed", client=_tuple(event.five_tuple), lifetime=event.lifetime
            )
        )
    elif isinstance(event, AllocationDeleted):
        log.info(
            LogEvent(
                "allocation-deleted",
                client=_tuple(event.five_tuple),
                user=event.username,
                reason=event.reason.replace(" ", "-"),
            )
        )
    elif isinstance(event, AllocationExpired):
        log.info(
            LogEvent("allocation-expired", client=_tuple(event.five_tuple), user=event.username)
        )
    elif isinstance(event, AuthFailed):
        log.log(
            logging.WARNING if named_401 else logging.INFO,
            LogEvent(
                "auth-failed",
                source=f"{event.transport.value}:{format_address(event.source)}",
                code=event.code,
                user=event.username if event.username is not None else "-",
                reason=event.reason,
            ),
        )
    elif isinstance(event, RequestRejected):
        log.info(
            LogEvent(
                "request-rejected",
                client=_tuple(event.five_tuple),
                method=f"{event.method:#05x}",
                code=event.code,
                detail=event.detail,
            )
        )
    elif isinstance(event, PermissionCreated | PermissionExpired):
        log.debug(LogEvent(_kebab(event), client=_tuple(event.five_tuple), peer=event.peer_ip))
    elif isinstance(event, ChannelBound | ChannelExpired):
        log.debug(
            LogEvent(
                _kebab(event),
                client=_tuple(event.five_tuple),
                channel=f"{event.channel:#06x}",
                peer=format_address(event.peer),
            )
        )


_EVENT_LEVELS: dict[type[TurnEvent], int] = {
    AllocationCreated: logging.INFO,
    AllocationRefreshed: logging.DEBUG,
    AllocationDeleted: logging.INFO,
    AllocationExpired: logging.INFO,
    AuthFailed: logging.INFO,  # WARNING for a named user's 401, see _log_event
    RequestRejected: logging.INFO,
    PermissionCreated: logging.DEBUG,
    PermissionExpired: logging.DEBUG,
    ChannelBound: logging.DEBUG,
    ChannelExpired: logging.DEBUG,
}
"""The level of each event's log line in :func:`_log_event` (others: none)."""


def _kebab(event: Any) -> str:
    name: str = type(event).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


# -- metrics -------------------------------------------------------------------------------------

_PREFIX = "tsunagu_turn"


class TurnCollector:
    """A prometheus_client collector over a snapshot (:meth:`TurnServer.metrics_snapshot`
    or the sum of the workers'), taken when Prometheus scrapes: the relay path only adds
    to plain integers in ``core.stats`` and pays nothing for metrics."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for name, text in (
            ("allocations", "Allocations in place."),
            ("permissions", "Permissions installed, over all allocations."),
            ("channels", "Channel bindings, over all allocations."),
            ("peer_connections", "RFC 6062 TCP connections with peers."),
            ("client_connections", "Open TCP and TLS client connections."),
            ("relay_ports", "Relay ports bound (allocations and reservations)."),
            ("draining", "1 while draining after SIGTERM (no new allocations), else 0."),
            ("workers", "Worker processes that answered this scrape."),
        ):
            yield GaugeMetricFamily(f"{_PREFIX}_{name}", text, value=snap.get(name, 0))
        for name, text in (
            ("relayed_packets", "Datagrams relayed, by direction."),
            ("relayed_bytes", "Payload bytes relayed, by direction."),
        ):
            key = name.removeprefix("relayed_")
            family = CounterMetricFamily(f"{_PREFIX}_{name}", text, labels=["direction"])
            for direction, value in sorted(snap.get(key, {}).items()):
                family.add_metric([direction], value)
            yield family
        dropped = CounterMetricFamily(
            f"{_PREFIX}_dropped_packets",
            "Datagrams not relayed, by reason: from_client/from_peer (no allocation, "
            "permission or channel; malformed), bandwidth (per-allocation limit), "
            "send_error (refused by the kernel), stream_full (slow TCP/TLS client).",
            labels=["reason"],
        )
        for reason, value in sorted(snap.get("dropped", {}).items()):
            dropped.add_metric([reason], value)
        yield dropped
        yield CounterMetricFamily(
            f"{_PREFIX}_icmp_relayed",
            "ICMP errors from peers relayed to clients (RFC 8656 §11.5).",
            value=snap.get("icmp_to_clients", 0),
        )
        per_worker = snap.get("worker_packets")
        if per_worker is not None:
            family = CounterMetricFamily(
                f"{_PREFIX}_worker_relayed_packets",
                "Datagrams relayed (both directions) by each worker of --workers.",
                labels=["worker"],
            )
            for worker, value in sorted(per_worker.items()):
                family.add_metric([worker], value)
            yield family
        yield CounterMetricFamily(
            f"{_PREFIX}_connection_handoffs",
            "RFC 6062 data connections passed to the worker owning their CONNECTION-ID.",
            value=snap.get("handoffs", 0),
        )
        yield CounterMetricFamily(
            f"{_PREFIX}_rate_limited_requests",
            "Unauthenticated requests left unanswered by the per-source rate limit.",
            value=snap.get("rate_limited", 0),
        )
        for name, key, text in (
            (
                "auth_failures",
                "auth_failures",
                "Requests with credentials refused (401 wrong credentials, 438 stale nonce).",
            ),
            ("errors", "errors", "Error responses sent, by STUN error code."),
        ):
            family = CounterMetricFamily(f"{_PREFIX}_{name}", text, labels=["code"])
            for code, value in sorted(snap.get(key, {}).items()):
                family.add_metric([code], value)
            yield family


def render_metrics(snapshot: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of a snapshot."""
    registry = CollectorRegistry()
    registry.register(TurnCollector(lambda: snapshot))
    return generate_latest(registry)


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up the workers' snapshots (numbers add, nested tables add by key; ``draining``
    is the largest)."""
    total: dict[str, Any] = {}
    for snapshot in snapshots:
        for key, value in snapshot.items():
            if isinstance(value, Mapping):
                table = total.setdefault(key, {})
                for inner, number in value.items():
                    table[inner] = table.get(inner, 0) + number
            elif key == "draining":
                total[key] = max(total.get(key, 0), value)
            else:
                total[key] = total.get(key, 0) + value
    return total


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    render: Callable[[], bytes]
    healthy: Callable[[], bool]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = 5.0  # seconds a client may take to send its request
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        content_type = "text/plain; charset=utf-8"
        if path == "/metrics":
            try:
                status, body = 200, self.server.render()
                content_type = CONTENT_TYPE_LATEST
            except Exception:  # the loop did not answer in time, or is gone
                status, body = 503, b"metrics unavailable\n"
        elif path in ("/healthz", "/health"):
            healthy = self.server.healthy()
            status, body = (200, b"ok\n") if healthy else (503, b"draining\n")
        else:
            status, body = 404, b"not found: try /metrics or /healthz\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class MetricsEndpoint:
    """HTTP ``/metrics`` (Prometheus) and ``/healthz`` (200 while serving, 503 while
    draining or unresponsive) in a thread of its own, so that a scrape never waits for,
    nor delays, the relay loop longer than copying a snapshot. Bound at construction."""

    def __init__(
        self, address: Address, render: Callable[[], bytes], healthy: Callable[[], bool]
    ) -> None:
        server_class = type(
            "_Bound",
            (_HttpServer,),
            {"address_family": socket.AF_INET6 if ":" in address[0] else socket.AF_INET},
        )
        self._httpd: _HttpServer = server_class(address, _Handler)
        self._httpd.render = render
        self._httpd.healthy = healthy
        self.address: Address = _bound(self._httpd.socket)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="turn-metrics",
            daemon=True,
        )
        self._thread.start()

    def forget(self) -> None:
        """In a forked child: close the inherited listening socket (the thread serving
        it did not come along)."""
        self._httpd.socket.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
