"""The asyncio driver of the mDNS core (:class:`~tsunagu.mdns.responder.MdnsResponder`).

    async with MdnsService("192.168.1.20") as mdns:
        name = await mdns.register("192.168.1.20")       # "5f0c...-....local", announced
        ip = await mdns.resolve("0d6e...-....local", 3.0)  # "192.168.1.31", or None

One service per interface, named by one of its addresses. The sockets are set up as
RFC 6762 asks of a full mDNS responder and querier:

- UDP port 5353 (§3) with SO_REUSEADDR and SO_REUSEPORT, so it shares the port with avahi,
  a browser or another service in the same process;
- bound to the wildcard address: Linux hands multicast datagrams only to sockets bound to
  the wildcard or to the group itself, never to one bound to a unicast address. The
  interface is chosen instead by joining 224.0.0.251 on the caller's interface address
  (``IP_ADD_MEMBERSHIP``), sending through it (``IP_MULTICAST_IF``) and, on Linux, turning
  ``IP_MULTICAST_ALL`` off so that groups joined on other interfaces are not delivered;
- TTL / hop limit 255 on everything sent (§11), multicast loopback on (other mDNS users on
  this host hear us);
- ff02::fb joined on the same interface over IPv6 too, when the interface can be found and
  IPv6 is available (a failure leaves the service IPv4-only).

The driver follows DESIGN.md: after every input (a datagram, the timer, an API call) it
flushes the core's transmits and events, then re-arms one timer for ``poll_timeout()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from tsunagu.aio.loop import clock
from tsunagu.errors import LocalProtocolError
from tsunagu.mdns.dns import canonical_name
from tsunagu.mdns.events import MdnsEvent, NameResolved
from tsunagu.mdns.responder import (
    IPV4_DESTINATION,
    IPV6_DESTINATION,
    MDNS_IPV4_GROUP,
    MDNS_IPV6_GROUP,
    MDNS_PORT,
    Address,
    MdnsConfig,
    MdnsResponder,
    Transmit,
)

__all__ = ["MdnsService"]

logger = logging.getLogger(__name__)


_HOP_LIMIT = 255  # RFC 6762 §11
_IP_MULTICAST_ALL = 49  # Linux <linux/in.h>; not exported by the socket module
_IPV6_MULTICAST_ALL = 29  # Linux <linux/in6.h>
_SIOCGIFADDR = 0x8915  # Linux <linux/sockios.h>
_SLACK = 1.0  # seconds past the core's deadline before a resolve gives up on its own
_TIMER_SLACK = 0.001  # loop timers may fire a little early; the core must see its deadline
_MAX_INTERFACES = 4096  # lines of /proc/net/if_inet6 or interfaces looked at, at most


def _interface_index(ip: str) -> int | None:
    """The index of the interface that holds ``ip`` (Linux; None where unknown). IPv4 is
    matched against each interface's primary address (``SIOCGIFADDR``)."""
    address = ipaddress.ip_address(ip)
    if sys.platform != "linux":
        return None
    if address.version == 6:
        try:
            lines = Path("/proc/net/if_inet6").read_text().splitlines()
        except OSError:
            return None
        for line in lines[:_MAX_INTERFACES]:
            fields = line.split()
            if len(fields) >= 6 and fields[0] == address.packed.hex():
                return int(fields[1], 16)
        return None
    import fcntl  # noqa: PLC0415 - POSIX only, and only needed here

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for index, name in socket.if_nameindex()[:_MAX_INTERFACES]:
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue
            if reply[20:24] == address.packed:  # struct ifreq: name[16], sockaddr_in
                return index
    return None


def _shared_port_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _ipv4_socket(interface_ip: str) -> socket.socket:
    sock = _shared_port_socket(socket.AF_INET)
    try:
        if sys.platform == "linux":
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.bind(("0.0.0.0", MDNS_PORT))
        interface = socket.inet_aton(interface_ip)
        membership = socket.inet_aton(MDNS_IPV4_GROUP) + interface  # struct ip_mreq
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, _HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, _HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _ipv6_socket(index: int) -> socket.socket:
    sock = _shared_port_socket(socket.AF_INET6)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if sys.platform == "linux":
            with contextlib.suppress(OSError):  # Linux >= 4.20
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MULTICAST_ALL, 0)
        sock.bind(("::", MDNS_PORT))
        group = socket.inet_pton(socket.AF_INET6, MDNS_IPV6_GROUP)
        membership = group + struct.pack("@I", index)  # struct ipv6_mreq
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, membership)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, _HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, _HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
    except OSError:
        sock.close()
        raise
    return sock


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        host, port = str(addr[0]), int(addr[1])
        if len(addr) >= 4 and addr[3]:  # IPv6 link-local source: keep its zone
            host = f"{host}%{addr[3]}"
        self._on_datagram(data, (host, port))

    def error_received(self, exc: Exception) -> None:
        logger.debug("mdns socket: %s", exc)


class MdnsService:
    """mDNS names for host candidates on one interface, over real multicast.

    ``interface_ip`` names the interface by one of its addresses (IPv4, or IPv6 for an
    IPv6-only service); ``interface`` (a name such as ``"eth0"``) finds it for IPv6 when
    the address alone does not. ``config`` is the core's
    (:class:`~tsunagu.mdns.responder.MdnsConfig`); its ``multicast_groups`` are replaced
    by the groups actually joined."""

    def __init__(
        self,
        interface_ip: str,
        *,
        config: MdnsConfig | None = None,
        interface: str | None = None,
        ipv6: bool = True,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        try:
            self.interface_ip = str(ipaddress.ip_address(interface_ip))
        except ValueError:
            raise LocalProtocolError(f"{interface_ip!r} is not an IP address") from None
        self._interface = interface
        self._want_ipv6 = ipv6 or ":" in self.interface_ip
        self._config = config if config is not None else MdnsConfig()
        self._token_bytes = token_bytes
        self._core: MdnsResponder | None = None
        self._v4: asyncio.DatagramTransport | None = None
        self._v6: asyncio.DatagramTransport | None = None
        self._index: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: dict[str, list[asyncio.Future[str | None]]] = {}

    # -- lifetime --------------------------------------------------------------------------

    async def start(self) -> MdnsService:
        """Open the sockets and join the groups. Raises OSError when IPv4 (or, for an
        IPv6 ``interface_ip``, IPv6) cannot be set up."""
        if self._core is not None:
            raise LocalProtocolError("the mDNS service is already started")
        loop = asyncio.get_running_loop()
        groups: list[Address] = []
        try:
            if ":" not in self.interface_ip:
                self._v4 = await self._endpoint(loop, _ipv4_socket(self.interface_ip))
                groups.append(IPV4_DESTINATION)
            if self._want_ipv6:
                await self._start_ipv6(loop, required=":" in self.interface_ip)
                if self._v6 is not None:
                    groups.append(IPV6_DESTINATION)
        except BaseException:
            self._close_transports()
            raise
        config = dataclasses.replace(self._config, multicast_groups=tuple(groups))
        self._core = MdnsResponder(config, token_bytes=self._token_bytes)
        return self

    async def _start_ipv6(self, loop: asyncio.AbstractEventLoop, *, required: bool) -> None:
        try:
            if self._interface is not None:
                index: int | None = socket.if_nametoindex(self._interface)
            else:
                index = _interface_index(self.interface_ip)
            if index is None:
                raise OSError(f"no interface found holding {self.interface_ip}")
            self._v6 = await self._endpoint(loop, _ipv6_socket(index))
            self._index = index
        except OSError as exc:
            if required:
                raise
            logger.debug("mdns on %s: IPv4 only (%s)", self.interface_ip, exc)

    async def _endpoint(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket
    ) -> asyncio.DatagramTransport:
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._on_datagram), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return transport

    async def __aenter__(self) -> MdnsService:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Multicast goodbyes for our names (RFC 6762 §10.1), end pending resolutions
        with None and close the sockets. Idempotent."""
        if self._core is not None:
            self._core.close(clock())
            self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_transports()

    def _close_transports(self) -> None:
        for transport in (self._v4, self._v6):
            if transport is not None:
                transport.close()
        self._v4 = self._v6 = None

    # -- the API ---------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[Address, ...]:
        """The mDNS groups joined: ``("224.0.0.251", 5353)`` and/or ``("ff02::fb", 5353)``."""
        return self._started().config.multicast_groups

    @property
    def core(self) -> MdnsResponder:
        """The sans-I/O core (for its ``stats`` and ``names``)."""
        return self._started()

    async def register(self, ip: str) -> str:
        """The ``.local`` name of local address ``ip``, announced on the link at once."""
        name = self._started().register(ip, clock())
        self._pump()
        return name

    async def unregister(self, name: str) -> None:
        """Withdraw one of our names (a goodbye is multicast)."""
        self._started().unregister(name, clock())
        self._pump()

    def lookup(self, name: str) -> str | None:
        """An address for ``name`` already known (ours or cached), without a query."""
        known = self._started().lookup(name, clock())
        return known[0] if known else None

    async def resolve(self, name: str, timeout: float | None = None) -> str | None:
        """The address of the ``.local`` name ``name``, or None when no usable answer came
        within ``timeout`` seconds (default ``config.resolve_timeout``)."""
        core = self._started()
        key = canonical_name(name)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            core.resolve(name, clock(), timeout)
            self._pump()
            wait = core.config.resolve_timeout if timeout is None else timeout
            async with asyncio.timeout(wait + _SLACK):
                return await future
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(key, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(key, None)

    # -- the driver ------------------------------------------------------------------------

    def _started(self) -> MdnsResponder:
        if self._core is None:
            raise LocalProtocolError("start the mDNS service first (await start())")
        return self._core

    def _on_datagram(self, data: bytes, remote: Address) -> None:
        if self._core is not None:
            self._core.handle_datagram(data, remote, clock())
            self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        if self._core is not None:
            self._core.handle_timeout(clock())
            self._pump()

    def _pump(self) -> None:
        core = self._started()
        while (transmit := core.poll_transmit()) is not None:
            self._send(transmit)
        while (event := core.poll_event()) is not None:
            self._deliver(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = core.poll_timeout()
        if deadline is not None:
            delay = max(0.0, deadline - clock()) + _TIMER_SLACK
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _send(self, transmit: Transmit) -> None:
        ip, port = transmit.destination
        if ":" not in ip:
            if self._v4 is not None:
                self._v4.sendto(transmit.data, (ip, port))
            return
        if self._v6 is None:
            return
        host, _, zone = ip.partition("%")
        if host == MDNS_IPV6_GROUP:  # link-local scope: say which link
            scope = self._index or 0
        elif zone:  # a link-local querier, its zone kept by _Datagrams
            scope = int(zone) if zone.isdigit() else socket.if_nametoindex(zone)
        else:
            scope = 0
        # A 4-tuple: uvloop (libuv) does not read a numeric "%zone" inside the host.
        self._v6.sendto(transmit.data, cast(Any, (host, port, 0, scope)))

    def _deliver(self, event: MdnsEvent) -> None:
        result: str | None = None
        if isinstance(event, NameResolved):
            result = event.ip
        else:
            logger.info("mdns: %s unresolved (%s)", event.name, event.reason)
        for future in self._waiters.pop(canonical_name(event.name), []):
            if not future.done():
                future.set_result(result)
