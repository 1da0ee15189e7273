"""The asyncio driver of the ICE agent core: :class:`IceConnection`.

The protocol lives in :class:`tsunagu.ice.agent.IceAgent`; this module owns the sockets
and the clock and follows the one driver pattern of :mod:`tsunagu.aio` (as aioquic's
QuicConnectionProtocol): after each input -- a datagram, a timer, an API call -- it sends
every :meth:`~IceAgent.poll_transmit` out of the socket of its base, delivers every
:meth:`~IceAgent.poll_event` to the futures and queues the public API awaits, and re-arms
one ``loop.call_at`` for :meth:`~IceAgent.poll_timeout`. ``now`` is always ``loop.time()``.

The public API is close to aioice's ``Connection``::

    async with IceConnection(controlling=True, stun_servers=[("stun.example", 3478)]) as conn:
        await conn.gather()
        signal(conn.local_username, conn.local_password, conn.local_candidates)
        conn.remote_username, conn.remote_password = ufrag, pwd
        for candidate in remote_candidates:
            await conn.add_remote_candidate(candidate)
        await conn.add_remote_candidate(None)  # end-of-candidates
        await conn.connect()
        await conn.send(b"hello")
        data = await conn.recv()

Candidates gathered: UDP host candidates on ``host_addresses``, server-reflexive ones
from ``stun_servers`` through the host sockets, and relayed ones from ``turn_servers``
through :class:`~tsunagu.aio.turn_client.TurnClient` datagram endpoints (``relay_only``
keeps only those, as RTCConfiguration's iceTransportPolicy "relay").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from tsunagu.aio.ice_mdns import MdnsCandidates
from tsunagu.aio.turn_client import TurnClient, TurnDatagramTransport
from tsunagu.errors import LocalProtocolError, TsunaguError
from tsunagu.ice.agent import IceAgent
from tsunagu.ice.candidate import Address, Candidate, TransportProtocol, normalize_ip
from tsunagu.ice.config import IceConfig
from tsunagu.ice.events import (
    ConnectionStateChanged,
    DataReceived,
    GatheringComplete,
    IceEvent,
    IceTransportState,
    SelectedPairChanged,
)
from tsunagu.ice.pair import PairInfo
from tsunagu.ice.policy import address_problem
from tsunagu.mdns.responder import MdnsConfig

__all__ = [
    "IceClosedError",
    "IceConnection",
    "IceFailedError",
    "TurnServer",
    "default_host_addresses",
]

# Where the UDP "connect" trick points to learn the address of the default route: connecting
# a UDP socket sends nothing, it only asks the kernel for a route (RFC 5737 / RFC 3849
# documentation prefixes, so no real host is ever named).
_PROBE_TARGETS = ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1"))
logger = logging.getLogger(__name__)

_GATHER_LIMIT = 10.0
"""Seconds :meth:`IceConnection.gather` waits at most for server-reflexive answers (the
core's own gathering transactions give up well before)."""


@dataclass(frozen=True, slots=True)
class TurnServer:
    """A TURN server to gather a relayed candidate from: ``uri`` as ``turn:host[:port]``
    (``?transport=tcp``) or ``turns:host[:port]``, and the long-term credentials."""

    uri: str
    username: str
    password: str


class IceFailedError(TsunaguError):
    """ICE failed: every pair failed, or consent was lost, before :meth:`connect` returned."""


class IceClosedError(TsunaguError, ConnectionError):
    """The connection is closed: :meth:`IceConnection.recv` has nothing more to give."""


def default_host_addresses(*, allow_loopback: bool = False, use_ipv6: bool = True) -> list[str]:
    """The addresses of the default routes (IPv4, and IPv6 when ``use_ipv6``), found with
    a UDP ``connect`` (which sends nothing), plus loopback when ``allow_loopback``."""
    found: list[str] = []
    for family, target in _PROBE_TARGETS:
        if family == socket.AF_INET6 and not use_ipv6:
            continue
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))
                ip = normalize_ip(probe.getsockname()[0])
        except OSError:
            continue
        if ip not in found and not ip.startswith(("127.", "::1")):
            found.append(ip)
    if allow_loopback:
        found.append("127.0.0.1")
    return found


class _HostProtocol(asyncio.DatagramProtocol):
    """One host socket: every datagram goes to the agent with the base it arrived on."""

    def __init__(self, connection: IceConnection) -> None:
        self._connection = connection
        self.base: Address | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.base is not None:
            self._connection._on_datagram(
                data, self.base, (normalize_ip(str(addr[0])), int(addr[1]))
            )

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...): the checks' retransmissions and timeouts
        # already account for lost datagrams.
        pass


class IceConnection:
    """An ICE connection with one component over UDP, driven on the running event loop.

    ``host_addresses``: the IPs to bind host sockets on (default:
    :func:`default_host_addresses`). ``allow_loopback`` also lets remote loopback
    candidates through the agent's address policy (and adds 127.0.0.1 to the default
    host addresses). ``stun_servers``: ``(host, port)`` of STUN servers for
    server-reflexive candidates; ``turn_servers`` for relayed ones (``relay_only``: no
    host or server-reflexive candidates at all). ``config`` tunes the core (:class:`IceConfig`).

    mDNS (:mod:`tsunagu.aio.ice_mdns`): ``mdns`` hides the host addresses behind random
    ``.local`` names in :attr:`local_candidates` (announced and answered on each host
    interface from :meth:`gather` on, which also catches names the remote announces
    unprompted); ``resolve_mdns`` (default on) resolves remote ``.local`` candidates
    before the agent sees them -- an unresolved one is dropped with a log line.
    """

    def __init__(
        self,
        controlling: bool,
        *,
        stun_servers: Sequence[tuple[str, int]] = (),
        turn_servers: Sequence[TurnServer] = (),
        relay_only: bool = False,
        host_addresses: Sequence[str] | None = None,
        allow_loopback: bool = False,
        config: IceConfig | None = None,
        mdns: bool = False,
        resolve_mdns: bool = True,
    ) -> None:
        config = config if config is not None else IceConfig()
        if config.components != 1:
            raise LocalProtocolError("IceConnection drives one component")
        if allow_loopback and not config.address_policy.allow_loopback:
            config = dataclasses.replace(
                config,
                address_policy=dataclasses.replace(config.address_policy, allow_loopback=True),
            )
        self._agent = IceAgent(config, controlling=controlling)
        self._stun_servers = [] if relay_only else list(stun_servers)
        self._turn_servers = list(turn_servers)
        self._relay_only = relay_only
        self._host_addresses = (
            list(host_addresses)
            if host_addresses is not None
            else default_host_addresses(allow_loopback=allow_loopback)
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transports: dict[Address, asyncio.DatagramTransport] = {}
        self._relays: list[TurnDatagramTransport] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._received: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._gathered: asyncio.Future[None] | None = None
        self._connected: asyncio.Future[PairInfo] | None = None
        self._remote_username: str | None = None
        self._remote_password: str | None = None
        self._gathering_started = False
        self._closed = False
        self._hide_host_addresses = mdns
        self._mdns: MdnsCandidates | None = None
        if mdns or resolve_mdns:
            policy = config.address_policy
            self._mdns = MdnsCandidates(
                self._host_addresses,
                # The agent's address policy, applied to answers too (RFC 8445 §5.1.1.1's
                # filters must not be bypassed through a name).
                config=MdnsConfig(address_filter=lambda ip: address_problem(ip, 1, policy) is None),
            )
        self._resolving: set[asyncio.Task[None]] = set()
        self._end_of_candidates_deferred = False

    async def __aenter__(self) -> IceConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- views --------------------------------------------------------------------------------

    @property
    def agent(self) -> IceAgent:
        """The sans-I/O core (read its state, pairs and candidates; drive it only here)."""
        return self._agent

    @property
    def ice_controlling(self) -> bool:
        return self._agent.controlling

    @property
    def state(self) -> IceTransportState:
        return self._agent.state

    @property
    def local_candidates(self) -> list[Candidate]:
        """The local candidates as they are signalled (behind mDNS names with ``mdns``);
        :attr:`agent` has them with their addresses."""
        if self._hide_host_addresses and self._mdns is not None:
            return [self._mdns.signalled(c) for c in self._agent.local_candidates]
        return list(self._agent.local_candidates)

    @property
    def remote_candidates(self) -> list[Candidate]:
        return list(self._agent.remote_candidates)

    @property
    def local_username(self) -> str:
        return self._agent.local_credentials.ufrag

    @property
    def local_password(self) -> str:
        return self._agent.local_credentials.pwd

    @property
    def remote_username(self) -> str | None:
        return self._remote_username

    @remote_username.setter
    def remote_username(self, value: str) -> None:
        self._remote_username = value
        self._apply_remote_credentials()

    @property
    def remote_password(self) -> str | None:
        return self._remote_password

    @remote_password.setter
    def remote_password(self, value: str) -> None:
        self._remote_password = value
        self._apply_remote_credentials()

    def set_remote_credentials(self, ufrag: str, pwd: str) -> None:
        """Both remote credentials at once (``a=ice-ufrag``, ``a=ice-pwd``)."""
        self._remote_username, self._remote_password = ufrag, pwd
        self._apply_remote_credentials()

    @property
    def selected_pair(self) -> PairInfo | None:
        return self._agent.selected_pair()

    # -- API ----------------------------------------------------------------------------------

    async def gather(self) -> None:
        """Bind the host sockets, ask the STUN servers, allocate on the TURN servers, and
        return once every local candidate is known (:attr:`local_candidates`). A STUN
        server that does not answer only costs its candidate; a TURN server that refuses
        (:class:`~tsunagu.errors.TurnError`) or cannot be reached raises."""
        self._check_open()
        if self._gathering_started:
            raise LocalProtocolError("gather() was already called")
        self._gathering_started = True
        loop = self._bind_loop()
        self._gathered = loop.create_future()
        if self._hide_host_addresses and self._mdns is not None and not self._relay_only:
            # Names first: every host candidate is known by its name from the moment it
            # exists, so none is ever signalled with its address.
            for ip in self._host_addresses:
                await self._mdns.register(ip)
        for ip in [] if self._relay_only else self._host_addresses:
            transport, protocol = await loop.create_datagram_endpoint(
                self._new_protocol, local_addr=(ip, 0)
            )
            port = int(transport.get_extra_info("sockname")[1])
            candidate = self._agent.add_host_candidate((ip, port))
            if candidate is None:
                transport.close()
                continue
            protocol.base = candidate.transport_address
            self._transports[candidate.transport_address] = transport
        for host, port in self._stun_servers:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            families: set[int] = set()
            for family, _, _, _, sockaddr in infos:
                if family in families:
                    continue  # one address per server and family is enough
                families.add(family)
                server = (normalize_ip(str(sockaddr[0])), int(sockaddr[1]))
                for base in self._transports:
                    if (":" in base[0]) == (family == socket.AF_INET6):
                        self._agent.gather_server_reflexive(base, server, loop.time())
            self._service()
        for relay in self._turn_servers:
            await self._gather_relayed(relay)
        self._agent.finish_gathering()
        self._service()
        await asyncio.wait_for(asyncio.shield(self._gathered), _GATHER_LIMIT)

    async def _gather_relayed(self, relay: TurnServer) -> None:
        client = TurnClient(relay.uri, relay.username, relay.password)
        try:
            await client.connect()
            transport, protocol = await client.create_datagram_endpoint(self._new_protocol)
        except BaseException:
            await client.close()
            raise
        if self._closed:
            await client.close()
            raise IceClosedError("closed while gathering")
        self._relays.append(transport)
        relayed = client.relayed_address
        candidate = self._agent.add_relayed_candidate(
            relayed, server_ip=client.server_address[0], mapped=client.mapped_address
        )
        if candidate is None:
            return
        protocol.base = candidate.transport_address
        self._transports[candidate.transport_address] = transport
        self._service()

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        """A remote candidate (trickled), or None for end-of-candidates. Candidates the
        agent will not use (policy, bounds) are dropped. A ``.local`` candidate is
        resolved first (``resolve_mdns``) and reaches the agent when resolved;
        end-of-candidates waits for those resolutions, so that the agent does not give up
        on pairs it has not seen yet."""
        self._check_open()
        loop = self._bind_loop()
        if candidate is not None and candidate.is_mdns and self._mdns is not None:
            task = loop.create_task(self._add_resolved(self._mdns, candidate))
            self._resolving.add(task)
            task.add_done_callback(self._resolved)
            return
        if candidate is None and self._resolving:
            self._end_of_candidates_deferred = True
            return
        self._agent.add_remote_candidate(candidate)
        self._service()

    async def _add_resolved(self, mdns: MdnsCandidates, candidate: Candidate) -> None:
        resolved = await mdns.resolve(candidate)
        if self._closed:
            return
        if resolved is None:
            # The peer's checks still arrive: its address comes back as a peer-reflexive
            # candidate (RFC 8445 §7.3.1.3).
            logger.warning("ice: dropping remote candidate %s: mDNS name not resolved", candidate)
            return
        self._agent.add_remote_candidate(resolved)
        self._service()

    def _resolved(self, task: asyncio.Task[None]) -> None:
        self._resolving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("ice: mDNS resolution failed: %r", task.exception())
        if self._resolving or not self._end_of_candidates_deferred or self._closed:
            return
        self._end_of_candidates_deferred = False
        self._agent.add_remote_candidate(None)
        self._service()

    async def connect(self) -> PairInfo:
        """Wait until a pair is selected and return it; raise
        :class:`IceFailedError` if ICE fails (or the connection closes)."""
        self._check_open()
        loop = self._bind_loop()
        self._service()
        pair = self._agent.selected_pair()
        if pair is not None:
            return pair
        if self._agent.state is IceTransportState.FAILED:
            raise IceFailedError("ICE failed")
        if self._connected is None or self._connected.done():
            self._connected = loop.create_future()
        return await asyncio.shield(self._connected)

    async def send(self, data: bytes) -> None:
        """Send one datagram over the selected pair."""
        self._check_open()
        self._bind_loop()
        self._agent.send(data)
        self._service()

    async def recv(self) -> bytes:
        """The next datagram of application data; :class:`IceClosedError` once closed."""
        if self._closed and self._received.empty():
            raise IceClosedError("the connection is closed")
        data = await self._received.get()
        if data is None:
            self._received.put_nowait(None)  # wake every other reader too
            raise IceClosedError("the connection is closed")
        return data

    async def close(self) -> None:
        """Stop the agent, close the sockets, wake every waiter."""
        if self._closed:
            return
        self._closed = True
        self._agent.close()
        while self._agent.poll_event() is not None:
            pass
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._resolving):
            task.cancel()
        if self._mdns is not None:
            await self._mdns.close()  # goodbyes for our names (RFC 6762 §10.1)
        for transport in self._transports.values():
            if not isinstance(transport, TurnDatagramTransport):
                transport.close()
        self._transports.clear()
        relays, self._relays = self._relays, []
        for relay in relays:  # delete the allocations (RFC 8656 §7.2)
            client: TurnClient = relay.get_extra_info("turn_client")
            await client.close()
        if self._gathered is not None and not self._gathered.done():
            self._gathered.set_exception(IceClosedError("closed while gathering"))
            self._gathered.exception()  # retrieved: nobody may be awaiting it
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(IceFailedError("closed before connecting"))
            self._connected.exception()
        self._received.put_nowait(None)

    # -- the driver ---------------------------------------------------------------------------

    def _new_protocol(self) -> _HostProtocol:
        return _HostProtocol(self)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise LocalProtocolError("IceConnection is bound to another event loop")
        return loop

    def _check_open(self) -> None:
        if self._closed:
            raise IceClosedError("the connection is closed")

    def _apply_remote_credentials(self) -> None:
        self._check_open()
        if self._remote_username is None or self._remote_password is None:
            return
        self._agent.set_remote_credentials(self._remote_username, self._remote_password)
        if self._loop is not None:
            self._service()

    def _on_datagram(self, data: bytes, base: Address, remote: Address) -> None:
        if self._closed or self._loop is None:
            return
        self._agent.handle_datagram(data, base, remote, self._loop.time())
        self._service()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self._loop is None:
            return
        when = self._timer_at if self._timer_at is not None else 0.0
        # asyncio may fire a handle up to one clock resolution early: never hand the
        # core a time before the deadline it asked for, or it would ask again at once.
        self._agent.handle_timeout(max(self._loop.time(), when))
        self._service()

    def _service(self) -> None:
        """Flush transmits, deliver events, re-arm the timer."""
        if self._closed:
            return
        while (transmit := self._agent.poll_transmit()) is not None:
            if transmit.transport is not TransportProtocol.UDP:
                continue
            transport = self._transports.get(transmit.local)
            if transport is not None and not transport.is_closing():
                transport.sendto(transmit.data, transmit.remote)
        while (event := self._agent.poll_event()) is not None:
            self._deliver(event)
        self._rearm()

    def _deliver(self, event: IceEvent) -> None:
        if isinstance(event, DataReceived):
            self._received.put_nowait(event.data)
        elif isinstance(event, GatheringComplete):
            if self._gathered is not None and not self._gathered.done():
                self._gathered.set_result(None)
        elif isinstance(event, SelectedPairChanged):
            waiter = self._connected
            if event.pair is not None and waiter is not None and not waiter.done():
                waiter.set_result(event.pair)
        elif isinstance(event, ConnectionStateChanged):
            waiter = self._connected
            if event.state is IceTransportState.FAILED and waiter is not None and not waiter.done():
                waiter.set_exception(IceFailedError("ICE failed"))

    def _rearm(self) -> None:
        if self._loop is None:
            return
        deadline = self._agent.poll_timeout()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)
