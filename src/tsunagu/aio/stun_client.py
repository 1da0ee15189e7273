"""The asyncio STUN client: one Binding request, or a whole RFC 5780 NAT behaviour check.

    result = await binding_request("stun:stun.example.org")
    print(result.mapped, result.rtt)

    report = await discover_nat("stun:stun.example.org", lifetime=False)
    print(report.mapping, report.filtering, report.verdict)

Both resolve DNS names with ``loop.getaddrinfo`` (no SRV look-up: RFC 7064 URIs with an
explicit or default port are used as they are), and both are bounded in time: a server
that does not answer gives :class:`~tsunagu.errors.TransactionTimeoutError` (or, for
:func:`discover_nat`, a result saying UDP is blocked), never a hang. Transports follow the
URI (RFC 7064, RFC 7065): ``stun:``/``turn:`` over UDP, ``turn:...?transport=tcp`` over
TCP and ``stuns:``/``turns:`` over TLS, with messages cut from the stream by
:class:`~tsunagu.stun.framing.StreamFramer` (RFC 8489 §6.2.2).

Retransmissions are :class:`~tsunagu.stun.transaction.TransactionManager`'s (RFC 8489
§6.2.1), with the schedule stretched or shrunk to the ``timeout`` asked for
(:func:`~tsunagu.nat.discovery.transaction_config`). The drivers follow DESIGN.md: after
every input (a datagram, a timer) flush the core's transmits and events, then wait for the
next input or the core's next deadline, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from tsunagu import SOFTWARE
from tsunagu.address import format_address
from tsunagu.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    StunDecodeError,
    StunResponseError,
    TransactionTimeoutError,
    TsunaguError,
)
from tsunagu.nat.discovery import (
    DiscoveryConfig,
    NatDiscovery,
    NatDiscoveryResult,
    transaction_config,
)
from tsunagu.nat.events import NatEvent
from tsunagu.stun.attributes import (
    Address,
    Attribute,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    Software,
    XorMappedAddress,
)
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.framing import StreamFramer
from tsunagu.stun.message import Message, new_transaction_id
from tsunagu.stun.transaction import TransactionManager
from tsunagu.stun.uri import StunUri

__all__ = [
    "BindingResult",
    "ClientTransport",
    "ResolutionError",
    "ServerUnreachableError",
    "binding_request",
    "discover_nat",
    "resolve",
]

ClientTransport = Literal["udp", "tcp", "tls"]
Target = str | StunUri | Address

_QUEUE_LIMIT = 256  # datagrams waiting for the driver; more are dropped, as a full socket would
_MAX_INPUTS = 100_000  # inputs one run handles at most: a flood cannot keep a driver busy forever
_SLACK = 5.0  # seconds added to computed bounds for the safety deadline
_MAX_ADDRESSES = 4  # resolved addresses tried in turn when one refuses outright

_clock = time.monotonic
"""The drivers' time: uvloop's ``loop.time()`` moves in whole milliseconds, too coarse
for loopback round-trip times; the cores only need one consistent clock."""


class ResolutionError(TsunaguError, OSError):
    """The server's host name could not be resolved (or resolved to nothing usable)."""


class ServerUnreachableError(TsunaguError, ConnectionError):
    """The server refused us outright: ICMP port unreachable, a refused or reset TCP/TLS
    connection, a TLS failure."""


@dataclass(frozen=True, slots=True)
class BindingResult:
    """The answer to one Binding request (RFC 8489 §3, §14.2)."""

    mapped: Address
    """XOR-MAPPED-ADDRESS: our transport address as the server saw it."""
    rtt: float
    """Seconds from the first transmission of the request to the response."""
    software: str | None
    """The server's SOFTWARE attribute (RFC 8489 §14.14), if any."""
    server: Address
    """The address the request went to (resolved from the URI)."""
    local: Address
    """The local address it went from."""
    transport: ClientTransport
    transmissions: int = 1
    """How many copies of the request were sent (RFC 8489 §6.2.1 retransmissions)."""
    other_address: Address | None = None
    """RFC 5780 OTHER-ADDRESS, when the server supports NAT behaviour discovery."""
    response_origin: Address | None = None
    """RFC 5780 RESPONSE-ORIGIN."""


# -- targets and resolution -----------------------------------------------------------------


def _parse_target(target: Target) -> tuple[StunUri | None, str, int, ClientTransport]:
    """(uri, host, port, transport) of a URI, its text, or a bare (host, port) for UDP."""
    if isinstance(target, tuple):
        host, port = target
        return None, host, int(port), "udp"
    uri = target if isinstance(target, StunUri) else StunUri.parse(target)
    if uri.secure:
        if uri.transport == "udp":
            raise LocalProtocolError(f"{uri}: DTLS (RFC 7350) is not supported; use TLS over TCP")
        return uri, uri.host, uri.port, "tls"
    return uri, uri.host, uri.port, uri.transport


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.partition("%")[0])) if host else None
    except ValueError:
        return None


async def resolve(
    host: str, port: int, *, transport: ClientTransport = "udp", timeout: float = 5.0
) -> list[Address]:
    """The addresses of ``host`` (an IP literal is returned as it is), in the resolver's
    order of preference, without duplicates. Raises :class:`ResolutionError`."""
    if _literal(host) is not None:
        return [(host, port)]
    loop = asyncio.get_running_loop()
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=kind)
    except TimeoutError:
        raise ResolutionError(f"resolving {host!r} timed out after {timeout:g} s") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolutionError(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ResolutionError(f"{host!r} has no IPv4 or IPv6 address")
    return addresses


def _canonical(address: Address) -> Address:
    """Canonical IP text, as the discovery core keys its local addresses."""
    ip = _literal(address[0])
    return (ip if ip is not None else address[0], address[1])


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _source_ip(remote: Address) -> str:
    """The local IP the routing table picks to reach ``remote``: connecting a UDP socket
    sends nothing, it only chooses the route (and so the source address)."""
    with socket.socket(_family(remote[0]), socket.SOCK_DGRAM) as probe:
        probe.connect(remote)
        return str(probe.getsockname()[0])


# -- responses --------------------------------------------------------------------------------


def _request(software: str | None, attributes: Sequence[Attribute]) -> tuple[bytes, bytes]:
    tid = new_transaction_id()
    attrs = list(attributes)
    if software is not None:
        attrs.append(Software(software))
    message = Message(Method.BINDING, MessageClass.REQUEST, tid, attrs)
    return tid, message.encode(fingerprint=True)


def _match(data: bytes, tid: bytes) -> Message | None:
    """The response to transaction ``tid`` in ``data``, or None for anything else (RFC 8489
    §6.3: responses that match no transaction, and non-STUN bytes, are discarded)."""
    if len(data) < 20 or data[8:20] != tid:
        return None
    try:
        message = Message.decode(data)
    except StunDecodeError:
        return None
    if message.method != Method.BINDING or message.message_class not in (
        MessageClass.SUCCESS,
        MessageClass.ERROR,
    ):
        return None
    return message


def _result(
    message: Message,
    *,
    rtt: float,
    server: Address,
    local: Address,
    transport: ClientTransport,
    transmissions: int,
) -> BindingResult:
    software = message.get(Software)
    if message.message_class is MessageClass.ERROR:
        error = message.error
        if error is None:
            raise RemoteProtocolError("Binding error response without ERROR-CODE")
        raise StunResponseError(error.code, error.reason)
    unknown = message.unknown_comprehension_required()
    if unknown:
        # RFC 8489 §6.3.3: such a response fails the transaction.
        listed = ", ".join(f"{t:#06x}" for t in unknown)
        raise RemoteProtocolError(f"response with unknown comprehension-required {listed}")
    xor = message.get(XorMappedAddress)
    plain = message.get(MappedAddress)
    mapped = xor.address if xor is not None else plain.address if plain is not None else None
    if mapped is None:
        raise RemoteProtocolError("Binding response without XOR-MAPPED-ADDRESS")
    other = message.get(OtherAddress)
    origin = message.get(ResponseOrigin)
    return BindingResult(
        mapped=mapped,
        rtt=rtt,
        software=software.value if software is not None else None,
        server=server,
        local=local,
        transport=transport,
        transmissions=transmissions,
        other_address=other.address if other is not None else None,
        response_origin=origin.address if origin is not None else None,
    )


# -- sockets ----------------------------------------------------------------------------------


class _Inbox:
    """Datagrams or stream frames (with the local address they arrived on) and transport
    errors, waiting for the driver coroutine; bounded, dropping when full."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Address, Address] | BaseException] = asyncio.Queue(
            _QUEUE_LIMIT
        )

    def put(self, item: tuple[bytes, Address, Address] | BaseException) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(item)

    async def get(self, deadline: float | None) -> tuple[bytes, Address, Address] | None:
        """The next item, or None once ``deadline`` (on :func:`_clock`) passes; raises
        the errors put in."""
        if deadline is None:
            item = await self.queue.get()
        else:
            try:
                async with asyncio.timeout(max(deadline - _clock(), 0.0)):
                    item = await self.queue.get()
            except TimeoutError:
                return None
        if isinstance(item, BaseException):
            raise item
        return item


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, inbox: _Inbox, *, errors: bool) -> None:
        self._inbox = inbox
        self._errors = errors
        self.local: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        name = transport.get_extra_info("sockname")
        self.local = (str(name[0]), int(name[1]))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._inbox.put((data, self.local, (str(addr[0]), int(addr[1]))))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors. For one Binding request a port unreachable means "nobody there";
        # during NAT discovery they prove nothing (silence is what the tests measure).
        if self._errors and isinstance(exc, ConnectionRefusedError):
            self._inbox.put(ServerUnreachableError(f"the server refused: {exc}"))


class _Stream(asyncio.Protocol):
    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox
        self._framer = StreamFramer()
        self._local: Address = ("", 0)
        self._remote: Address = ("", 0)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport; the cast is honest.
        self.transport = cast(asyncio.Transport, transport)
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self._local = (str(local[0]), int(local[1]))
        self._remote = (str(peer[0]), int(peer[1]))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
        except StunDecodeError as exc:
            # RFC 8489 §6.2.2: a stream that is not STUN framing cannot be resynchronised.
            self._inbox.put(RemoteProtocolError(f"not STUN on the connection: {exc}"))
            if self.transport is not None:
                self.transport.abort()
            return
        for frame in frames:
            self._inbox.put((frame, self._local, self._remote))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self._inbox.put(ServerUnreachableError(f"the server closed the connection{reason}"))


# -- one Binding request ----------------------------------------------------------------------


async def binding_request(
    target: Target,
    *,
    timeout: float = 5.0,
    local_address: Address | None = None,
    ssl_context: ssl.SSLContext | None = None,
    software: str | None = SOFTWARE,
    attributes: Sequence[Attribute] = (),
) -> BindingResult:
    """Send one Binding request (RFC 8489 §6.1) to a ``stun:``/``stuns:``/``turn:``/``turns:``
    URI, a :class:`~tsunagu.stun.uri.StunUri` or a (host, port) over UDP, and return what
    the server saw.

    ``timeout`` bounds the whole call, DNS and connection set-up included. Raises
    :class:`~tsunagu.errors.TransactionTimeoutError` when no answer comes in time,
    :class:`ResolutionError` when the name does not resolve, :class:`ServerUnreachableError`
    when the server refuses, :class:`~tsunagu.errors.StunResponseError` for an error response
    and :class:`~tsunagu.stun.uri.StunUriError` (a ValueError) for a malformed URI.
    ``ssl_context`` is the trust for ``stuns:``/``turns:`` (default: the system's CAs, host
    name checked).
    """
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    _, host, port, transport = _parse_target(target)
    deadline = _clock() + timeout
    addresses = await resolve(host, port, transport=transport, timeout=timeout)
    refusals: list[str] = []
    for remote in addresses[:_MAX_ADDRESSES]:
        remaining = deadline - _clock()
        if remaining <= 0:
            break
        try:
            if transport == "udp":
                return await _binding_udp(remote, remaining, local_address, software, attributes)
            return await _binding_stream(
                remote,
                host,
                transport_name=transport,
                timeout=remaining,
                local_address=local_address,
                ssl_context=ssl_context,
                software=software,
                attributes=attributes,
            )
        except ServerUnreachableError as exc:
            refusals.append(f"{format_address(remote)}: {exc}")
    if refusals:
        raise ServerUnreachableError("; ".join(refusals))
    raise TransactionTimeoutError(f"no response from {host} within {timeout:g} s")


async def _transaction(
    inbox: _Inbox,
    send: Callable[[bytes], None],
    manager: TransactionManager,
    *,
    tid: bytes,
    request: bytes,
    remote: Address,
    reliable: bool,
) -> tuple[Message, float, int]:
    """Drive one transaction to its response: (response, rtt, transmissions)."""
    started = _clock()
    transmissions = 0
    manager.start(tid, request, remote, started, reliable=reliable)
    for _ in range(_MAX_INPUTS):
        while (item := manager.poll_transmit()) is not None:
            send(item[0])
            transmissions += 1
        if manager.poll_event() is not None:
            raise TransactionTimeoutError(
                f"no response from {format_address(remote)} after {transmissions} request(s) "
                f"in {_clock() - started:.1f} s"
            )
        received = await inbox.get(manager.poll_timeout())
        now = _clock()
        if received is None:
            manager.handle_timeout(now)
            continue
        message = _match(received[0], tid)
        if message is not None and manager.handle_response(tid, now):
            return message, now - started, transmissions
    raise TransactionTimeoutError(
        f"gave up on {format_address(remote)}: too much unrelated traffic"
    )


async def _binding_udp(
    remote: Address,
    timeout: float,
    local_address: Address | None,
    software: str | None,
    attributes: Sequence[Attribute],
) -> BindingResult:
    loop = asyncio.get_running_loop()
    inbox = _Inbox()
    # A connected socket: the kernel reports ICMP errors (nobody listening) for it, and
    # filters out datagrams from anyone but the server.
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Datagrams(inbox, errors=True),
        local_addr=local_address,
        remote_addr=remote,
        family=_family(remote[0]),
    )
    try:
        tid, request = _request(software, attributes)
        manager = TransactionManager(transaction_config(timeout))

        def send(data: bytes) -> None:
            transport.sendto(data, None)

        async with asyncio.timeout(timeout + _SLACK):
            message, rtt, sent = await _transaction(
                inbox, send, manager, tid=tid, request=request, remote=remote, reliable=False
            )
        return _result(
            message,
            rtt=rtt,
            server=remote,
            local=protocol.local,
            transport="udp",
            transmissions=sent,
        )
    finally:
        transport.close()


async def _binding_stream(
    remote: Address,
    host: str,
    *,
    transport_name: ClientTransport,
    timeout: float,
    local_address: Address | None,
    ssl_context: ssl.SSLContext | None,
    software: str | None,
    attributes: Sequence[Attribute],
) -> BindingResult:
    loop = asyncio.get_running_loop()
    inbox = _Inbox()
    context: ssl.SSLContext | None = None
    if transport_name == "tls":
        context = ssl_context or ssl.create_default_context()
    deadline = _clock() + timeout
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: _Stream(inbox),
                remote[0],
                remote[1],
                ssl=context,
                server_hostname=host.partition("%")[0] if context is not None else None,
                local_addr=local_address,
            )
    except TimeoutError:
        raise TransactionTimeoutError(
            f"connecting to {format_address(remote)} timed out after {timeout:g} s"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnreachableError(f"cannot connect to {format_address(remote)}: {exc}") from exc
    try:
        name = transport.get_extra_info("sockname")
        local = (str(name[0]), int(name[1]))
        tid, request = _request(software, attributes)
        # RFC 8489 §6.2.2: over TCP/TLS one transmission, and Ti for the answer.
        remaining = max(deadline - _clock(), 1e-3)
        manager = TransactionManager(transaction_config(remaining))
        async with asyncio.timeout(remaining + _SLACK):
            message, rtt, sent = await _transaction(
                inbox,
                transport.write,
                manager,
                tid=tid,
                request=request,
                remote=remote,
                reliable=True,
            )
        return _result(
            message,
            rtt=rtt,
            server=remote,
            local=local,
            transport=transport_name,
            transmissions=sent,
        )
    finally:
        transport.abort()


# -- RFC 5780 discovery -----------------------------------------------------------------------


async def discover_nat(
    target: Target,
    *,
    lifetime: bool = False,
    timeout: float = 3.0,
    hairpinning: bool = True,
    config: DiscoveryConfig | None = None,
    local_ip: str | None = None,
    on_event: Callable[[NatEvent], None] | None = None,
) -> NatDiscoveryResult:
    """Run RFC 5780 NAT behaviour discovery (:class:`~tsunagu.nat.discovery.NatDiscovery`)
    against a ``stun:``/``turn:`` URI (or (host, port)) over UDP.

    Opens two UDP sockets on ``local_ip`` (default: the address the routing table uses to
    reach the server), the second for the hairpin and lifetime tests. ``timeout`` is how long
    each test waits for its answer; ``config``, when given, replaces ``lifetime``,
    ``timeout`` and ``hairpinning``. ``on_event`` sees every event as it happens (progress).

    Silence from the server is a result (``udp_blocked``), not an exception, as is a server
    without RFC 5780 support (``error``). Raises :class:`ResolutionError` when the name does
    not resolve and :class:`~tsunagu.errors.LocalProtocolError` for a TCP/TLS URI (RFC 5780
    discovery is defined over UDP here).
    """
    if config is None:
        config = DiscoveryConfig(timeout=timeout, lifetime=lifetime, hairpinning=hairpinning)
    _, host, port, transport = _parse_target(target)
    if transport != "udp":
        raise LocalProtocolError(
            "NAT behaviour discovery runs over UDP: use a stun: or turn: URI without ?transport=tcp"
        )
    server = (await resolve(host, port, transport="udp", timeout=config.timeout))[0]
    loop = asyncio.get_running_loop()
    ip = local_ip if local_ip is not None else _source_ip(server)
    inbox = _Inbox()
    transports: list[asyncio.DatagramTransport] = []
    try:
        endpoints: dict[Address, asyncio.DatagramTransport] = {}
        for _ in range(2):
            udp, protocol = await loop.create_datagram_endpoint(
                lambda: _Datagrams(inbox, errors=False),
                local_addr=(ip, 0),
                family=_family(server[0]),
            )
            transports.append(udp)
            endpoints[_canonical(protocol.local)] = udp
        local, secondary = list(endpoints)
        discovery = NatDiscovery(server, local, secondary=secondary, config=config)
        # Every phase is bounded by its transactions; this only guards against a bug.
        phases = 5 * config.timeout + (config.lifetime_budget if config.lifetime else 0.0)
        async with asyncio.timeout(phases + _SLACK):
            return await _drive(discovery, inbox, endpoints, on_event)
    except TimeoutError:
        raise TransactionTimeoutError("NAT discovery did not finish in time") from None
    finally:
        for udp in transports:
            udp.close()


async def _drive(
    discovery: NatDiscovery,
    inbox: _Inbox,
    endpoints: dict[Address, asyncio.DatagramTransport],
    on_event: Callable[[NatEvent], None] | None,
) -> NatDiscoveryResult:
    discovery.start(_clock())
    for _ in range(_MAX_INPUTS):
        while (transmit := discovery.poll_transmit()) is not None:
            endpoint = endpoints.get(transmit.local)
            if endpoint is not None and not endpoint.is_closing():
                endpoint.sendto(transmit.data, transmit.remote)
        while (event := discovery.poll_event()) is not None:
            if on_event is not None:
                on_event(event)
        result = discovery.result
        if result is not None:
            return result
        deadline = discovery.poll_timeout()
        if deadline is None:
            raise LocalProtocolError("NAT discovery stalled with nothing to wait for")
        received = await inbox.get(deadline)
        if received is None:
            discovery.handle_timeout(_clock())
        else:
            data, local, remote = received
            discovery.handle_datagram(data, local, remote, _clock())
    raise TransactionTimeoutError("NAT discovery gave up: too much unrelated traffic")
