"""The asyncio driver of the ICE agent core: :class:`IceConnection`.

The protocol lives in :class:`tsunagu.ice.agent.IceAgent`; this module owns the sockets
and the clock and follows the one driver pattern of :mod:`tsunagu.aio` (as aioquic's
QuicConnectionProtocol): after each input -- a datagram, a timer, an API call -- it sends
every :meth:`~IceAgent.poll_transmit` out of the socket of its base, delivers every
:meth:`~IceAgent.poll_event` to the futures and queues the public API awaits, and re-arms
one timer for :meth:`~IceAgent.poll_timeout`. ``now`` is always
:data:`tsunagu.aio.loop.clock`, finer than uvloop's ``loop.time()``.

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

Candidates gathered: UDP host candidates on every usable interface (or on
``host_addresses``; :mod:`tsunagu.aio.interfaces` enumerates and orders them), server-reflexive
ones from ``stun_servers`` through the host sockets, and relayed ones from ``turn_servers``
through :class:`~tsunagu.aio.turn_client.TurnClient` datagram endpoints (``relay_only``
keeps only those, as RTCConfiguration's iceTransportPolicy "relay").
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar

from tsunagu.aio.ice_mdns import MdnsCandidates
from tsunagu.aio.ice_tcp import IceTcp
from tsunagu.aio.inbox import Inbox
from tsunagu.aio.interfaces import (
    HostAddress,
    PortRangeExhaustedError,
    bind_host_socket,
    check_port_range,
    parse_host_address,
    rank_host_addresses,
    select_host_addresses,
)
from tsunagu.aio.loop import clock
from tsunagu.aio.turn_client import TurnClient, TurnDatagramTransport
from tsunagu.errors import LocalProtocolError, TsunaguError
from tsunagu.ice.agent import IceAgent
from tsunagu.ice.candidate import Address, Candidate, TransportProtocol, normalize_ip
from tsunagu.ice.config import IceConfig
from tsunagu.ice.events import (
    CandidateGathered,
    CandidatePairStateChanged,
    ConnectionStateChanged,
    ConsentLost,
    DataReceived,
    GatheringComplete,
    GatheringFailed,
    IceEvent,
    IceTransportState,
    PeerReflexiveCandidate,
    RemoteCandidateIgnored,
    RoleChanged,
    SelectedPairChanged,
)
from tsunagu.ice.pair import PairInfo
from tsunagu.ice.policy import address_problem
from tsunagu.ice.servers import IceServer, IceTransportPolicy, TurnServer, split_ice_servers
from tsunagu.ice.transmit import Transmit
from tsunagu.mdns.responder import MdnsConfig

__all__ = [
    "HostAddress",
    "IceClosedError",
    "IceConnection",
    "IceFailedError",
    "IceStream",
    "PortRangeExhaustedError",
    "TurnServer",
    "default_host_addresses",
]

logger = logging.getLogger(__name__)

_GATHER_LIMIT = 10.0
"""Seconds :meth:`IceConnection.gather` waits at most for server-reflexive answers (the
core's own gathering transactions give up well before)."""


class IceFailedError(TsunaguError):
    """ICE failed: every pair failed, or consent was lost, before :meth:`connect` returned."""


class IceClosedError(TsunaguError, ConnectionError):
    """The connection is closed: :meth:`IceConnection.recv` has nothing more to give."""


_T = TypeVar("_T")

_PUBLISHED = (
    CandidateGathered,
    GatheringComplete,
    GatheringFailed,
    RemoteCandidateIgnored,
    PeerReflexiveCandidate,
    CandidatePairStateChanged,
    SelectedPairChanged,
    ConnectionStateChanged,
    RoleChanged,
    ConsentLost,
)
"""The core's events :meth:`IceConnection.events` passes on (application data goes to
:meth:`IceConnection.recv`; TCP connection requests are the driver's own business)."""


class IceStream(Generic[_T]):
    """An async iterator over what an :class:`IceConnection` reports, made by
    :meth:`IceConnection.events` or :meth:`IceConnection.local_candidates_trickled`.

    It buffers every item from the moment it is made, so none is missed between making it
    and iterating; the iteration ends at the stream's natural end (end-of-candidates, the
    connection closing) or after :meth:`aclose`, which also drops what is still buffered.
    One consumer per stream: make one stream per consumer."""

    def __init__(self, streams: list[IceStream[_T]]) -> None:
        self._items: deque[_T] = deque()
        self._streams = streams
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        streams.append(self)

    def __aiter__(self) -> IceStream[_T]:
        return self

    async def __anext__(self) -> _T:
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop the stream: iteration ends at once, buffered items are dropped."""
        self._items.clear()
        self._end()

    def _push(self, item: _T) -> None:
        if not self._ended:
            self._items.append(item)
            self._wake()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self in self._streams:
            self._streams.remove(self)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def default_host_addresses(*, allow_loopback: bool = False, use_ipv6: bool = True) -> list[str]:
    """The IPs :class:`IceConnection` gathers host candidates on by default, most
    preferred first: every usable interface's
    (:func:`~tsunagu.aio.interfaces.select_host_addresses`: the default routes'
    interfaces first, no link-local), IPv6 ones only when ``use_ipv6``, loopback ones
    (last) only when ``allow_loopback``."""
    return [
        host.ip for host in select_host_addresses(allow_loopback=allow_loopback, use_ipv6=use_ipv6)
    ]


_REMOTES_KEPT = 64  # sender addresses a host socket keeps normalised


class _HostProtocol(asyncio.DatagramProtocol):
    """One host socket: every datagram goes to the agent with the base it arrived on."""

    def __init__(self, connection: IceConnection) -> None:
        self._connection = connection
        self.base: Address | None = None
        # The loop's sender addresses, normalised once each: a pair sends from one.
        self._remotes: dict[tuple[str | int, ...], Address] = {}

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.base is None:
            return
        remote = self._remotes.get(addr)
        if remote is None:
            # A link-local sender is on this socket's interface: its zone, should a loop
            # spell one, says nothing more (candidates carry plain addresses).
            ip = str(addr[0]).partition("%")[0]
            remote = (normalize_ip(ip), int(addr[1]))
            if len(self._remotes) >= _REMOTES_KEPT:
                self._remotes.clear()  # bounded: a peer may send from any number
            self._remotes[addr] = remote
        self._connection._on_datagram(data, self.base, remote)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...): the checks' retransmissions and timeouts
        # already account for lost datagrams.
        pass


class IceConnection:
    """An ICE connection over UDP, driven on the running event loop.

    ``components``: the components of the data stream (default: ``config.components``,
    itself 1): host, server-reflexive and relayed candidates are gathered for each, and
    :meth:`connect` returns once every one has a selected pair; :meth:`send` and
    :meth:`recvfrom` name the component (as aioice's ``sendto``/``recvfrom``).

    Host candidates (RFC 8445 §5.1.1.1): by default one UDP socket per component on every
    address of every usable (up and running) interface, IPv4 and IPv6, link-local and
    loopback ones left out (:mod:`tsunagu.aio.interfaces`). The interfaces of the default
    routes come first in the local preference, IPv6 and IPv4 interleaved across interfaces
    (RFC 8421). ``interfaces``: only these interface names; ``address_filter``: only the
    IPs it returns True for; ``include_link_local``: link-local addresses too (IPv6 ones
    are bound with their interface as scope, while the candidate carries the plain
    address; the agent then also accepts remote link-local candidates); ``use_ipv6``:
    False for IPv4 only; ``allow_loopback`` also lets remote loopback candidates through
    the agent's address policy, and gathers on loopback addresses too. ``host_addresses``:
    the IPs to bind host sockets on instead, in preference order (``fe80::1%eth0`` for an
    IPv6 link-local one); the interface options do not apply to them. ``port_range``:
    ``(low, high)``, the UDP host sockets are bound on ports in it (inclusive), tried in
    a random order (:mod:`secrets`); :meth:`gather` raises
    :class:`~tsunagu.aio.interfaces.PortRangeExhaustedError` when none is free.
    :attr:`host_addresses` lists what will be bound. ``stun_servers``: ``(host, port)``
    of STUN servers for server-reflexive candidates; ``turn_servers`` for relayed ones
    (``relay_only``: no host or server-reflexive candidates at all). ``ice_servers`` and
    ``transport_policy`` say the same as RTCConfiguration's ``iceServers`` and
    ``iceTransportPolicy`` (:mod:`tsunagu.ice.servers`). ``config`` tunes the core
    (:class:`IceConfig`).

    mDNS (:mod:`tsunagu.aio.ice_mdns`): ``mdns`` hides the host addresses behind random
    ``.local`` names in :attr:`local_candidates` (announced and answered on each host
    interface from :meth:`gather` on, which also catches names the remote announces
    unprompted); ``resolve_mdns`` (default on) resolves remote ``.local`` candidates
    before the agent sees them -- an unresolved one is dropped with a log line.

    Trickle ICE (RFC 8838): :meth:`local_candidates_trickled` yields each local candidate
    as soon as it is gathered and ends at end-of-candidates; remote candidates may be
    added at any time (:meth:`add_remote_candidate`), checks run while they come.

    ICE restart (RFC 8445 §9): :meth:`restart`, or new remote credentials (the peer
    restarted), gives new local credentials; data keeps flowing on the previous selected
    pairs until the new session has selected its own.

    Events: :meth:`events` streams the core's events (state changes, selected pair
    changes, candidates, pair states...), and the callbacks :attr:`on_state_change`,
    :attr:`on_selected_pair_change` and :attr:`on_local_candidate` are called with the
    same news, as RTCIceTransport's statechange and selectedcandidatepairchange and
    RTCPeerConnection's icecandidate.
    """

    on_state_change: Callable[[IceTransportState], None] | None
    """Called with the new state on every change of :attr:`state`."""
    on_selected_pair_change: Callable[[int, PairInfo | None], None] | None
    """Called with ``(component, pair)`` when the current session selects a pair (None:
    consent was lost on it)."""
    on_local_candidate: Callable[[Candidate | None], None] | None
    """Called with each local candidate of the current session as it is gathered (as
    signalled: behind its mDNS name with ``mdns``), then None for end-of-candidates."""

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
        components: int | None = None,
        ice_servers: Sequence[IceServer] = (),
        transport_policy: IceTransportPolicy | str = IceTransportPolicy.ALL,
        interfaces: Sequence[str] | None = None,
        address_filter: Callable[[str], bool] | None = None,
        include_link_local: bool = False,
        use_ipv6: bool = True,
        port_range: tuple[int, int] | None = None,
    ) -> None:
        config = config if config is not None else IceConfig()
        self._port_range = check_port_range(port_range)
        if isinstance(interfaces, str):
            raise TypeError("interfaces is a sequence of interface names, not one name")
        if host_addresses is not None:
            hosts = [parse_host_address(text) for text in host_addresses]
        else:
            hosts = select_host_addresses(
                interfaces=None if interfaces is None else set(interfaces),
                address_filter=address_filter,
                include_link_local=include_link_local,
                allow_loopback=allow_loopback,
                use_ipv6=use_ipv6,
                prefer_ipv6=config.prefer_ipv6,
            )
        self._hosts = list(rank_host_addresses(hosts))
        """The host addresses with their interface and address ranks, preferred first."""
        if any(host.link_local for host in hosts) and not config.address_policy.allow_link_local:
            # Our link-local sockets can reach the remote's link-local candidates only.
            config = dataclasses.replace(
                config,
                address_policy=dataclasses.replace(config.address_policy, allow_link_local=True),
            )
        # RTCConfiguration's iceServers and iceTransportPolicy, on top of the lists above.
        listed_stun, listed_turn = split_ice_servers(ice_servers)
        stun_servers = [*stun_servers, *(s for s in listed_stun if s not in stun_servers)]
        turn_servers = [*turn_servers, *(t for t in listed_turn if t not in turn_servers)]
        relay_only = relay_only or IceTransportPolicy(transport_policy) is IceTransportPolicy.RELAY
        if components is not None and components != config.components:
            config = dataclasses.replace(config, components=components)
        if allow_loopback and not config.address_policy.allow_loopback:
            config = dataclasses.replace(
                config,
                address_policy=dataclasses.replace(config.address_policy, allow_loopback=True),
            )
        self._agent = IceAgent(config, controlling=controlling)
        self._tcp = (  # RFC 6544
            IceTcp(self._agent, self._service, simultaneous_open=config.tcp_simultaneous_open)
            if config.tcp
            else None
        )
        self._stun_servers = [] if relay_only else list(stun_servers)
        self._turn_servers = list(turn_servers)
        self._relay_only = relay_only
        self._host_addresses = list(dict.fromkeys(host.ip for host in hosts))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transports: dict[Address, asyncio.DatagramTransport] = {}
        self._relays: list[TurnDatagramTransport] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._received: Inbox[tuple[bytes, int]] = Inbox()
        self._gathered: asyncio.Future[None] | None = None
        self._connected: asyncio.Future[PairInfo] | None = None
        self._remote_username: str | None = None
        self._remote_password: str | None = None
        self._applied_remote: tuple[str, str] | None = None
        self._event_streams: list[IceStream[IceEvent]] = []
        self._trickle_streams: list[IceStream[Candidate]] = []
        self._trickled: list[Candidate] = []
        """The local candidates of the current session as signalled, in gathering order."""
        self._trickle_complete = False
        self.on_state_change = None
        self.on_selected_pair_change = None
        self.on_local_candidate = None
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
    def host_addresses(self) -> list[HostAddress]:
        """The addresses host candidates are (or will be) gathered on, preferred first:
        ``host_addresses`` as given, or what the interface options selected."""
        return [host for host, _, _ in self._hosts]

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
        """The pair data of component 1 goes over (during a restart, the previous
        session's until the new one is selected)."""
        return self._agent.selected_pair()

    @property
    def selected_pairs(self) -> dict[int, PairInfo]:
        """The pair of each component that has one, by component."""
        pairs = {c: self._agent.selected_pair(c) for c in self._components()}
        return {c: pair for c, pair in pairs.items() if pair is not None}

    @property
    def components(self) -> int:
        return self._agent.config.components

    @property
    def restarting(self) -> bool:
        """An ICE restart is under way: data still goes over the previous session's pairs
        (:attr:`selected_pairs`) until the new session has selected its own."""
        return self._agent.restarting

    # -- API ----------------------------------------------------------------------------------

    async def gather(self) -> None:
        """Bind the host sockets, ask the STUN servers, allocate on the TURN servers, and
        return once every local candidate is known (:attr:`local_candidates`). A STUN
        server that does not answer only costs its candidate; a TURN server that refuses
        (:class:`~tsunagu.errors.TurnError`) or cannot be reached raises. Each candidate
        is trickled (:meth:`local_candidates_trickled`) as soon as it is known; run
        gather() in a task to signal them while it goes on."""
        try:
            await self._gather()
        except BaseException:
            # No more candidates in this session: trickle streams end (early; the
            # gather() task says why) instead of waiting forever.
            self._end_trickle()
            raise

    async def _gather(self) -> None:
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
        hosts = [] if self._relay_only else self._hosts
        for component in self._components():
            for address, interface_rank, address_rank in hosts:
                await self._gather_host(loop, address, component, interface_rank, address_rank)
        if self._tcp is not None and not self._relay_only:
            # IPv6 link-local addresses need a scope to bind, which the TCP sockets lack.
            await self._tcp.gather([h.ip for h, _, _ in self._hosts if h.scope_id == 0])
        for host, port in self._stun_servers:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            families: set[int] = set()
            for family, _, _, _, sockaddr in infos:
                if family in families:
                    continue  # one address per server and family is enough
                families.add(family)
                server = (normalize_ip(str(sockaddr[0])), int(sockaddr[1]))
                for base in self._transports:
                    if (":" in base[0]) != (family == socket.AF_INET6):
                        continue
                    if ipaddress.ip_address(base[0]).is_link_local:
                        continue  # a STUN server is never on our link's link-local scope
                    self._agent.gather_server_reflexive(base, server, clock())
            self._service()
        for relay in self._turn_servers:
            for component in self._components():
                await self._gather_relayed(relay, component)
        self._agent.finish_gathering()
        self._service()
        await asyncio.wait_for(asyncio.shield(self._gathered), _GATHER_LIMIT)

    async def _gather_host(
        self,
        loop: asyncio.AbstractEventLoop,
        host: HostAddress,
        component: int,
        interface_rank: int,
        address_rank: int,
    ) -> None:
        """One UDP host socket and its candidate (bound with the scope an IPv6 link-local
        address needs; in ``port_range`` if given)."""
        sock = bind_host_socket(host, self._port_range)
        try:
            transport, protocol = await loop.create_datagram_endpoint(self._new_protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        port = int(transport.get_extra_info("sockname")[1])
        candidate = self._agent.add_host_candidate(
            (host.ip, port), component, interface_rank=interface_rank, address_rank=address_rank
        )
        if candidate is None:
            transport.close()
            return
        protocol.base = candidate.transport_address
        self._transports[candidate.transport_address] = transport
        self._service()  # trickled at once

    async def _gather_relayed(self, relay: TurnServer, component: int = 1) -> None:
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
            relayed,
            server_ip=client.server_address[0],
            mapped=client.mapped_address,
            component=component,
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
        """Wait until every component has a selected pair of the current session (after
        :meth:`restart`: the new session's) and return component 1's; raise
        :class:`IceFailedError` if ICE fails (or the connection closes)."""
        self._check_open()
        loop = self._bind_loop()
        self._service()
        pair = self._connected_pair()
        if pair is not None:
            return pair
        if self._agent.state is IceTransportState.FAILED:
            raise IceFailedError("ICE failed")
        if self._connected is None or self._connected.done():
            self._connected = loop.create_future()
        return await asyncio.shield(self._connected)

    async def send(self, data: bytes, component: int = 1) -> None:
        """Send one datagram over the selected pair of ``component`` (during a restart,
        the previous session's until the new one is selected)."""
        self._check_open()
        self._bind_loop()
        # Sending data queues no event and moves only the keepalive deadline, later
        # (RFC 8445 §11): the armed timer may fire early, then handle_timeout does nothing
        # and re-arms. This keeps poll_timeout(), which looks at every timer of the agent,
        # off the data path.
        transmit = self._agent.send_now(data, component)
        if transmit is None:
            self._flush_transmits()
        else:
            self._write(transmit)

    async def sendto(self, data: bytes, component: int) -> None:
        """:meth:`send` with aioice's ``Connection.sendto`` signature."""
        await self.send(data, component)

    async def recv(self) -> bytes:
        """The next datagram of application data, of any component;
        :class:`IceClosedError` once closed."""
        data, _ = await self._received.get()  # recvfrom(), one coroutine fewer per datagram
        return data

    async def recvfrom(self) -> tuple[bytes, int]:
        """The next datagram of application data and its component (as aioice's
        ``Connection.recvfrom``); :class:`IceClosedError` once closed."""
        return await self._received.get()

    def local_candidates_trickled(self) -> IceStream[Candidate]:
        """Trickle ICE (RFC 8838): an async iterator over the local candidates of the
        current session as signalled (behind mDNS names with ``mdns``), each as soon as
        it is gathered, ending at end-of-candidates -- signal that when the loop ends::

            gathering = asyncio.create_task(conn.gather())
            async for candidate in conn.local_candidates_trickled():
                signal(candidate.to_sdp())
            await gathering  # raises what made gathering fail, if anything
            signal_end_of_candidates()

        Candidates already gathered come first. After :meth:`restart` (or the peer's) a
        new stream gives the new session's: every local candidate again, for the new
        credentials; a stream of the previous session ends. The stream also ends if
        :meth:`gather` fails or the connection closes."""
        stream: IceStream[Candidate] = IceStream(self._trickle_streams)
        for candidate in self._trickled:
            stream._push(candidate)
        if self._trickle_complete or self._closed:
            stream._end()
        return stream

    def events(self) -> IceStream[IceEvent]:
        """An async iterator over the events of the core from now on, until the
        connection closes (its last event is the change to the closed state):
        :class:`~tsunagu.ice.events.ConnectionStateChanged`,
        :class:`~tsunagu.ice.events.SelectedPairChanged`,
        :class:`~tsunagu.ice.events.CandidateGathered` (as signalled),
        :class:`~tsunagu.ice.events.GatheringComplete`,
        :class:`~tsunagu.ice.events.CandidatePairStateChanged`,
        :class:`~tsunagu.ice.events.PeerReflexiveCandidate`,
        :class:`~tsunagu.ice.events.RemoteCandidateIgnored`,
        :class:`~tsunagu.ice.events.GatheringFailed`,
        :class:`~tsunagu.ice.events.RoleChanged` and
        :class:`~tsunagu.ice.events.ConsentLost`. Application data is not an event
        (:meth:`recv`). Events buffer until read: iterate, or :meth:`IceStream.aclose`."""
        stream: IceStream[IceEvent] = IceStream(self._event_streams)
        if self._closed:
            stream._end()
        return stream

    async def restart(self) -> None:
        """ICE restart (RFC 8445 §9): new local credentials (:attr:`local_username`,
        :attr:`local_password`) to signal, the local candidates trickled again for them
        (:meth:`local_candidates_trickled`), and a new session that waits for the
        remote's new credentials and candidates. Data keeps flowing on the previous
        selected pairs until the new session has selected a pair for every component
        (:class:`~tsunagu.ice.events.SelectedPairChanged`, :meth:`connect` returns,
        :attr:`restarting` becomes False).

        When the peer restarts, just give its new credentials (:meth:`set_remote_credentials`,
        or both properties): this connection restarts too, so read the local
        credentials again for the answer."""
        self._check_open()
        self._bind_loop()
        self._service()  # what the previous session said, it says before the restart
        self._agent.restart()
        self._remote_username = self._remote_password = None
        self._applied_remote = None
        self._new_session()
        self._service()

    async def close(self) -> None:
        """Stop the agent, close the sockets, wake every waiter."""
        if self._closed:
            return
        self._closed = True
        self._agent.close()
        while (event := self._agent.poll_event()) is not None:
            self._publish(event)  # the change to closed, for events() and callbacks
        self._end_trickle()
        for stream in list(self._event_streams):
            stream._end()
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
        if self._tcp is not None:
            self._tcp.close()
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
        self._received.fail(IceClosedError("the connection is closed"))

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
        ufrag, pwd = self._remote_username, self._remote_password
        if ufrag is None or pwd is None:
            return
        applied = self._applied_remote
        if applied is not None and (ufrag == applied[0]) != (pwd == applied[1]):
            # Half of the peer's restart (RFC 8445 §9 changes both ufrag and pwd), set
            # one property at a time: wait for the other half rather than restart twice.
            return
        if self._loop is not None:
            self._service()  # what the previous session said, it says before a restart
        before = self._agent.local_credentials
        self._agent.set_remote_credentials(ufrag, pwd)
        self._applied_remote = (ufrag, pwd)
        if self._agent.local_credentials != before:
            self._new_session()  # the peer restarted ICE, and so did the agent
        if self._loop is not None:
            self._service()

    def _components(self) -> range:
        return range(1, self._agent.config.components + 1)

    def _connected_pair(self) -> PairInfo | None:
        """Component 1's pair once every component has one of the current session."""
        if self._agent.restarting:
            return None
        pairs = [self._agent.selected_pair(c) for c in self._components()]
        return pairs[0] if all(pair is not None for pair in pairs) else None

    def _new_session(self) -> None:
        """The agent restarted: the local candidates will be trickled again for the new
        credentials; what the previous session still waited for is dropped."""
        self._end_trickle()
        self._trickled = []
        self._trickle_complete = False
        # mDNS resolutions of the previous session's remote candidates must not reach
        # the new session (nor their deferred end-of-candidates).
        self._end_of_candidates_deferred = False
        for task in list(self._resolving):
            task.cancel()

    def _end_trickle(self) -> None:
        self._trickle_complete = True
        for stream in list(self._trickle_streams):
            stream._end()

    def _on_datagram(self, data: bytes, base: Address, remote: Address) -> None:
        if self._closed or self._loop is None:
            return
        if self._agent.handle_datagram(data, base, remote, clock()):
            # Application data: the core queued at most a DataReceived event, nothing to
            # send and no timer to move (IceAgent.handle_datagram).
            self._deliver_events()
        else:
            self._service()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self._loop is None:
            return
        when = self._timer_at if self._timer_at is not None else 0.0
        # asyncio may fire a handle up to one clock resolution early: never hand the
        # core a time before the deadline it asked for, or it would ask again at once.
        self._agent.handle_timeout(max(clock(), when))
        self._service()

    def _service(self) -> None:
        """Flush transmits, deliver events, re-arm the timer."""
        if self._closed:
            return
        self._flush_transmits()
        self._deliver_events()
        waiter = self._connected
        if waiter is not None and not waiter.done():
            pair = self._connected_pair()
            if pair is not None:
                waiter.set_result(pair)
        self._rearm()

    def _flush_transmits(self) -> None:
        while (transmit := self._agent.poll_transmit()) is not None:
            self._write(transmit)

    def _write(self, transmit: Transmit) -> None:
        if transmit.transport is not TransportProtocol.UDP:
            if self._tcp is not None:
                self._tcp.send(transmit)
            return
        transport = self._transports.get(transmit.local)
        if transport is not None and not transport.is_closing():
            transport.sendto(transmit.data, transmit.remote)

    def _deliver_events(self) -> None:
        while (event := self._agent.poll_event()) is not None:
            self._deliver(event)

    def _deliver(self, event: IceEvent) -> None:
        if self._tcp is not None and self._tcp.handle_event(event):
            return
        if isinstance(event, DataReceived):
            self._received.put((event.data, event.component))
            return
        if isinstance(event, GatheringComplete):
            if self._gathered is not None and not self._gathered.done():
                self._gathered.set_result(None)
        elif isinstance(event, ConnectionStateChanged):
            waiter = self._connected
            if event.state is IceTransportState.FAILED and waiter is not None and not waiter.done():
                waiter.set_exception(IceFailedError("ICE failed"))
        self._publish(event)

    def _publish(self, event: IceEvent) -> None:
        """Hand an event to the trickle and event streams and to the callbacks."""
        if not isinstance(event, _PUBLISHED):
            return
        if isinstance(event, CandidateGathered):
            candidate = event.candidate
            if self._hide_host_addresses and self._mdns is not None:
                candidate = self._mdns.signalled(candidate)
                event = CandidateGathered(candidate)
            self._trickled.append(candidate)
            for trickle in list(self._trickle_streams):
                trickle._push(candidate)
            self._call(self.on_local_candidate, candidate)
        elif isinstance(event, GatheringComplete):
            self._end_trickle()
            self._call(self.on_local_candidate, None)
        elif isinstance(event, ConnectionStateChanged):
            self._call(self.on_state_change, event.state)
        elif isinstance(event, SelectedPairChanged):
            self._call(self.on_selected_pair_change, event.component, event.pair)
        for stream in list(self._event_streams):
            stream._push(event)

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            # A user's callback must not break the driver (it runs inside it).
            logger.exception("ice: callback %r raised", callback)

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
            self._timer = self._loop.call_later(max(0.0, deadline - clock()), self._on_timer)
