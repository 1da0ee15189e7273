"""The ICE agent (RFC 8445 full and lite, RFC 8838 trickle, RFC 7675 consent) as a sans-I/O
state machine.

:class:`IceAgent` never touches a socket or a clock. The driver owns the sockets (host,
server-reflexive through them, relayed through its TURN clients) and tells the agent which
candidates exist and what their bases are; the agent decides what to send where and when:

* inputs: :meth:`~IceAgent.handle_datagram` (every datagram arriving on a base, with the
  base it arrived on), :meth:`~IceAgent.handle_timeout`, and API calls
  (:meth:`~IceAgent.add_local_candidate` and its helpers, :meth:`~IceAgent.add_remote_candidate`,
  :meth:`~IceAgent.set_remote_credentials`, :meth:`~IceAgent.send`, :meth:`~IceAgent.restart`,
  :meth:`~IceAgent.close`);
* outputs: :meth:`~IceAgent.poll_transmit` (:class:`~tsunagu.ice.transmit.Transmit`),
  :meth:`~IceAgent.poll_event` (:mod:`tsunagu.ice.events`), :meth:`~IceAgent.poll_timeout`.

Sessions. Credentials, the check list and the remote candidates form one session (a
"generation"). :meth:`~IceAgent.restart` starts a new session with new credentials (RFC
8445 §9) and keeps the old one's selected pairs -- data, consent and keepalives -- until
the new session has selected a pair for every component.

Valid pairs. When a check's mapped address differs from its local candidate (a NAT in the
way), RFC 8445 §7.2.5.3.2 builds the valid pair from a local peer-reflexive candidate with
the same base. That pair has the same 5-tuple as the checked pair, so the agent records the
learnt candidate (§7.2.5.3.1, reported in :class:`PeerReflexiveCandidate`) and marks the
checked pair itself valid: data and nomination flow on the same base and remote address.

Security properties the tests hold the agent to: nothing arriving on a pair before a check
of ours on it succeeded is delivered (an ICE-lite agent, which sends no checks, accepts a
pair once an authenticated check arrived on it); unauthenticated or malformed checks get
400/401/420 and change no state; remote and peer-reflexive candidates are filtered by
:mod:`tsunagu.ice.policy` and bounded in number; the check list is capped and outgoing
requests are paced (Ta) and rate-bounded.

TCP candidates (RFC 6544). The agent keeps the table of TCP connections
(:mod:`tsunagu.ice.tcp`): it asks the driver to open them
(:class:`~tsunagu.ice.events.TcpConnectRequested`), is told of accepted ones, bytes read
and closes (``handle_tcp_*``), frames everything with RFC 4571, and fails the pairs of a
connection that fails.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator

from tsunagu.errors import LocalProtocolError, StunDecodeError
from tsunagu.ice.candidate import (
    Address,
    Candidate,
    CandidateType,
    FoundationAllocator,
    TcpType,
    TransportProtocol,
    candidate_priority,
    is_redundant,
    local_preference,
    normalize_ip,
)
from tsunagu.ice.checklist import CheckList, can_pair, is_ordinary
from tsunagu.ice.checks import (
    binding_indication,
    check_error,
    check_request,
    check_success,
    parse_check_request,
)
from tsunagu.ice.config import IceConfig, Nomination
from tsunagu.ice.consent import ConsentFreshness, JitterSource, SystemJitter
from tsunagu.ice.errors import IceNotConnectedError
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
    TcpCloseRequested,
    TcpConnectRequested,
)
from tsunagu.ice.gather import GatherResult, ServerReflexiveGatherer
from tsunagu.ice.pair import CandidatePair, LocalCandidate, PairInfo, PairState
from tsunagu.ice.policy import address_problem
from tsunagu.ice.sdp import IceCredentials, validate_pwd, validate_ufrag
from tsunagu.ice.tcp import (
    ACTIVE_PORT,
    MAX_FRAME,
    TcpConnection,
    TcpConnections,
    TcpConnectionState,
    connect_from,
    frame,
)
from tsunagu.ice.transmit import Transmit
from tsunagu.stun.attributes import XorMappedAddress
from tsunagu.stun.constants import ErrorCode, MessageClass, Method
from tsunagu.stun.credentials import short_term_key
from tsunagu.stun.message import IntegrityKey, Message, new_transaction_id
from tsunagu.stun.transaction import TransactionManager

__all__ = ["IceAgent"]

_RemoteKey = tuple[int, TransportProtocol, Address]
# Error responses a peer may send without MESSAGE-INTEGRITY (RFC 8489 §9.1.4: it cannot
# authenticate them when it did not accept our credentials).
_UNAUTHENTICATED_ERRORS = frozenset((400, 401, 420))
# Float slack of the token bucket: without it, a refill that rounds to 0.99999... would
# schedule a wake-up too close to ``now`` to move a float clock forward.
_TOKEN_SLACK = 1e-6
_SYSTEM_JITTER = SystemJitter()  # no state: one serves every agent
_TCP_PEER = {
    TcpType.ACTIVE: TcpType.PASSIVE,
    TcpType.PASSIVE: TcpType.ACTIVE,
    TcpType.SIMULTANEOUS_OPEN: TcpType.SIMULTANEOUS_OPEN,
}


class _Session:
    """One generation of ICE: credentials, remote candidates, check list, selection."""

    def __init__(self, credentials: IceCredentials, checklist: CheckList) -> None:
        self.local = credentials
        # Short-term keys (RFC 8489 §9.1.1) with their HMAC key schedule, made once per
        # password: every check, response and consent request of the session uses one.
        self.local_key = IntegrityKey(short_term_key(credentials.pwd))
        self.remote_ufrag: str | None = None
        self.remote_pwd: str | None = None
        self.remote_key: IntegrityKey | None = None
        self.remote_lite = False
        self.checklist = checklist
        self.remote_candidates: list[Candidate] = []
        self.remote_index: dict[_RemoteKey, Candidate] = {}
        self.remote_end = False
        self.remote_signalled = 0
        self.remote_prflx = 0
        self.local_prflx: list[LocalCandidate] = []
        self.usable: dict[tuple[Address, Address], CandidatePair] = {}
        """Pairs whose check succeeded, by (base, remote address): data from there is
        delivered."""
        self.selected: dict[int, CandidatePair] = {}
        self.nominate_at: dict[int, float] = {}
        """Controlling, regular nomination: when to stop waiting for better pairs."""
        self.consent_lost: set[int] = set()
        self.tcp_passive_until: float | None = None
        """When pairs of passive TCP candidates stop waiting for the peer's connection."""


class _Check:
    """An outstanding (or cancelled but still answerable) connectivity check."""

    __slots__ = (
        "cancelled_until",
        "controlling",
        "pair",
        "priority",
        "sent_at",
        "session",
        "transmissions",
        "use_candidate",
    )

    def __init__(
        self,
        pair: CandidatePair,
        session: _Session,
        *,
        use_candidate: bool,
        controlling: bool,
        priority: int,
        sent_at: float,
    ) -> None:
        self.pair = pair
        self.session = session
        self.use_candidate = use_candidate
        self.controlling = controlling
        self.priority = priority
        self.sent_at = sent_at
        self.transmissions = 0
        self.cancelled_until: float | None = None


class IceAgent:
    """One ICE agent for one data stream of ``config.components`` components.

    ``controlling``: the initial role (RFC 8445 §6.1.1: the offerer's agent, or the full
    agent facing a lite one); an ICE-lite agent is always controlled. ``rng`` supplies the
    consent jitter only. ``credentials`` and ``tie_breaker`` default to fresh draws from
    :mod:`secrets`; pass them only to replay a recorded run.
    """

    def __init__(
        self,
        config: IceConfig | None = None,
        *,
        controlling: bool = True,
        rng: JitterSource | None = None,
        credentials: IceCredentials | None = None,
        tie_breaker: int | None = None,
    ) -> None:
        self.config = config if config is not None else IceConfig()
        self._rng = rng if rng is not None else _SYSTEM_JITTER
        self._controlling = controlling and not self.config.lite
        if tie_breaker is not None and not 0 <= tie_breaker < 2**64:
            raise LocalProtocolError("the tie-breaker is a 64-bit unsigned integer")
        self._tie_breaker = tie_breaker if tie_breaker is not None else secrets.randbits(64)
        self._foundations = FoundationAllocator()
        self._local: list[LocalCandidate] = []
        self._bases: dict[tuple[TransportProtocol, Address], LocalCandidate] = {}
        self._checks_tm = TransactionManager(self.config.check_transactions)
        self._checks: dict[bytes, _Check] = {}
        self._consent: dict[bytes, tuple[_Session, CandidatePair]] = {}
        self._gatherer = ServerReflexiveGatherer(self.config.gathering_transactions)
        self._gathering_finished = False
        self._gathering_complete = False
        # Output queues as lists, not deques: they hold a few items between two polls,
        # and an empty deque takes 760 bytes against a list's 56 (per agent, it adds up).
        self._transmits: list[Transmit] = []
        self._requests: list[Transmit] = []
        self._events: list[IceEvent] = []
        self._tcp = TcpConnections(self.config.max_tcp_accepted)
        self._tokens = float(self.config.check_burst)
        self._tokens_at: float | None = None
        self._now = 0.0
        """The latest time an input carried; API calls without ``now`` act at it."""
        self._next_check_at = -math.inf
        self._check_idle = False
        self._checks_started = False
        self._state = IceTransportState.NEW
        self._closed = False
        transactions = self.config.check_transactions
        self._cancelled_window = self.config.check_rto_min * (
            (1 << (transactions.rc - 1)) - 1 + transactions.rm
        )
        self._session = self._new_session(
            credentials if credentials is not None else IceCredentials.generate()
        )
        self._previous: _Session | None = None

    def __repr__(self) -> str:
        role = "controlling" if self._controlling else "controlled"
        return f"<IceAgent {self._session.local.ufrag} {role} {self._state}>"

    # -- read-only views ----------------------------------------------------------------------

    @property
    def controlling(self) -> bool:
        return self._controlling

    @property
    def tie_breaker(self) -> int:
        return self._tie_breaker

    @property
    def state(self) -> IceTransportState:
        return self._state

    @property
    def local_credentials(self) -> IceCredentials:
        """The ufrag and pwd to signal (``a=ice-ufrag``, ``a=ice-pwd``)."""
        return self._session.local

    @property
    def local_candidates(self) -> tuple[Candidate, ...]:
        """Host, server-reflexive and relayed candidates, in the order they came."""
        return tuple(local.candidate for local in self._local)

    @property
    def remote_candidates(self) -> tuple[Candidate, ...]:
        """Remote candidates of the current session, peer-reflexive ones included."""
        return tuple(self._session.remote_candidates)

    @property
    def gathering_complete(self) -> bool:
        return self._gathering_complete

    def pairs(self) -> list[PairInfo]:
        """The current session's check list, highest priority first."""
        return [pair.info() for pair in self._session.checklist]

    def selected_pair(self, component: int = 1) -> PairInfo | None:
        """The pair :meth:`send` uses for ``component``, if any."""
        pair = self._sending_pair(component)
        return None if pair is None else pair.info()

    @property
    def restarting(self) -> bool:
        """An ICE restart is under way (RFC 8445 §9): some component still sends over the
        previous session's selected pair, the current session has not selected its own
        for every component yet."""
        return self._previous is not None

    # -- local candidates ---------------------------------------------------------------------

    def add_local_candidate(self, candidate: Candidate, base: Address | None = None) -> bool:
        """A candidate the driver gathered, with its base (default: the candidate's own
        address, right for host and relayed candidates). Returns False if it is redundant
        (RFC 8445 §5.1.3). Accepted candidates are paired with the remote ones and
        announced in :class:`CandidateGathered` for trickling."""
        self._check_open()
        if not 1 <= candidate.component <= self.config.components:
            raise LocalProtocolError(f"component {candidate.component} is not in this stream")
        if candidate.type is CandidateType.PEER_REFLEXIVE:
            raise LocalProtocolError("peer-reflexive candidates are learnt, not added")
        if self.config.lite and candidate.type is not CandidateType.HOST:
            raise LocalProtocolError("an ICE-lite agent has host candidates only (§5.1.1)")
        if candidate.is_mdns:
            raise LocalProtocolError(
                "local candidates carry IP addresses (the driver may "
                "signal an mDNS name in their place)"
            )
        is_base = candidate.type in (CandidateType.HOST, CandidateType.RELAYED)
        if base is None:
            if not is_base:
                raise LocalProtocolError("a server-reflexive candidate needs its base")
            base = candidate.transport_address
        elif is_base and base != candidate.transport_address:
            raise LocalProtocolError("a host or relayed candidate is its own base")
        if not is_base:
            owner = self._bases.get((candidate.transport, base))
            if owner is None or owner.component != candidate.component:
                raise LocalProtocolError(f"base {base} is not a host candidate of the component")
        if is_redundant(candidate, base, ((c.candidate, c.base) for c in self._local)):
            return False
        if is_base:
            key = (candidate.transport, base)
            if key in self._bases:
                raise LocalProtocolError(f"base {base} already belongs to another candidate")
        for existing in list(self._local):  # §5.1.3: the lower-priority duplicate goes
            if existing.candidate.type is CandidateType.SERVER_REFLEXIVE and is_redundant(
                existing.candidate, existing.base, [(candidate, base)]
            ):
                self._local.remove(existing)
        local = LocalCandidate(candidate, base)
        self._local.append(local)
        if is_base:
            self._bases[(candidate.transport, base)] = local
        self._events.append(CandidateGathered(candidate))
        if is_base and not self.config.lite:
            session = self._session
            for remote in session.remote_candidates:
                self._pair(session, local, remote)
            session.checklist.update_frozen()
            self._wake()
        return True

    def add_host_candidate(
        self,
        address: Address,
        component: int = 1,
        *,
        interface_rank: int = 0,
        address_rank: int = 0,
    ) -> Candidate | None:
        """Build and add a UDP host candidate on ``address`` (a socket the driver bound),
        with the RFC 8445 §5.1.2 priority and §5.1.1.3 foundation."""
        ip = normalize_ip(address[0])
        preference = local_preference(
            ip,
            interface_rank=interface_rank,
            address_rank=address_rank,
            prefer_ipv6=self.config.prefer_ipv6,
        )
        candidate = Candidate(
            foundation=self._foundations.foundation(CandidateType.HOST, ip),
            component=component,
            transport=TransportProtocol.UDP,
            priority=candidate_priority(CandidateType.HOST, preference, component),
            address=ip,
            port=address[1],
            type=CandidateType.HOST,
        )
        return candidate if self.add_local_candidate(candidate) else None

    def add_relayed_candidate(
        self,
        relayed: Address,
        *,
        server_ip: str,
        mapped: Address | None = None,
        component: int = 1,
        interface_rank: int = 0,
    ) -> Candidate | None:
        """Build and add a relayed candidate for a TURN allocation (RFC 8445 §5.1.1.2):
        ``relayed`` is the XOR-RELAYED-ADDRESS, ``mapped`` the XOR-MAPPED-ADDRESS (the
        related address), ``server_ip`` the TURN server's (it shapes the foundation)."""
        ip = normalize_ip(relayed[0])
        preference = local_preference(
            ip, interface_rank=interface_rank, prefer_ipv6=self.config.prefer_ipv6
        )
        candidate = Candidate(
            foundation=self._foundations.foundation(
                CandidateType.RELAYED, ip, server_ip=normalize_ip(server_ip)
            ),
            component=component,
            transport=TransportProtocol.UDP,
            priority=candidate_priority(CandidateType.RELAYED, preference, component),
            address=ip,
            port=relayed[1],
            type=CandidateType.RELAYED,
            related_address=None if mapped is None else normalize_ip(mapped[0]),
            related_port=None if mapped is None else mapped[1],
        )
        return candidate if self.add_local_candidate(candidate) else None

    def gather_server_reflexive(self, base: Address, server: Address, now: float) -> None:
        """Ask the STUN server ``server`` for the mapped address of the host candidate
        whose base is ``base`` (RFC 8445 §5.1.1.2); the result arrives as a
        :class:`CandidateGathered` (or :class:`GatheringFailed`) event."""
        self._check_open()
        self._advance(now)
        if self.config.lite:
            raise LocalProtocolError("an ICE-lite agent gathers host candidates only")
        local = self._bases.get((TransportProtocol.UDP, base))
        if local is None or local.candidate.type is not CandidateType.HOST:
            raise LocalProtocolError(f"{base} is not the base of a UDP host candidate")
        self._gatherer.start(base, (normalize_ip(server[0]), server[1]), now)

    def finish_gathering(self) -> None:
        """The driver will add no more candidates. Once the server-reflexive requests are
        done, :class:`GatheringComplete` says to signal end-of-candidates (RFC 8838 §8.2)."""
        self._check_open()
        self._gathering_finished = True
        self._update_gathering()

    # -- remote side --------------------------------------------------------------------------

    def set_remote_credentials(self, ufrag: str, pwd: str, *, lite: bool = False) -> None:
        """The peer's ``a=ice-ufrag``/``a=ice-pwd`` (and ``a=ice-lite``). Checks start
        once they are known. New credentials after known ones mean the peer restarted ICE
        (RFC 8445 §9): the agent restarts too, so read :attr:`local_credentials` again for
        the answer."""
        self._check_open()
        validate_ufrag(ufrag)
        validate_pwd(pwd)
        session = self._session
        if session.remote_ufrag is not None and (ufrag, pwd) != (
            session.remote_ufrag,
            session.remote_pwd,
        ):
            self.restart()
            session = self._session
        session.remote_ufrag, session.remote_pwd, session.remote_lite = ufrag, pwd, lite
        session.remote_key = IntegrityKey(short_term_key(pwd))
        if lite and not self.config.lite and not self._controlling:
            self._set_role(True)  # §6.1.1: facing a lite agent, the full agent controls
        self._wake()

    def add_remote_candidate(self, candidate: Candidate | None) -> bool:
        """A trickled remote candidate, or None for end-of-candidates (RFC 8838 §11).
        Returns whether the candidate is used; an ignored one is reported in a
        :class:`RemoteCandidateIgnored` event with the reason. mDNS names must be resolved
        by the driver first (replace the address, keep the rest)."""
        self._check_open()
        session = self._session
        if candidate is None:
            session.remote_end = True
            self._wake()
            return True
        reason = self._remote_problem(session, candidate)
        if reason is not None:
            self._events.append(RemoteCandidateIgnored(candidate, reason))
            return False
        key = (candidate.component, candidate.transport, candidate.transport_address)
        existing = session.remote_index.get(key)
        if existing is not None:
            if existing.type is not CandidateType.PEER_REFLEXIVE:
                self._events.append(RemoteCandidateIgnored(candidate, "duplicate address"))
                return False
            # RFC 8445 §7.3.1.3 / RFC 8838 §11.3: a peer-reflexive candidate turns out to
            # be a signalled one: it takes the signalled type and priority, keeps its pairs.
            index = session.remote_candidates.index(existing)
            session.remote_candidates[index] = candidate
            session.remote_index[key] = candidate
            session.checklist.replace_remote(existing, candidate)
            return True
        session.remote_candidates.append(candidate)
        session.remote_index[key] = candidate
        session.remote_signalled += 1
        if not self.config.lite and candidate.component not in session.selected:
            for local in self._local:
                if local.candidate.type in (CandidateType.HOST, CandidateType.RELAYED):
                    self._pair(session, local, candidate)
            session.checklist.update_frozen()
            self._wake()
        return True

    def _remote_problem(self, session: _Session, candidate: Candidate) -> str | None:
        if session.remote_ufrag is not None and candidate.ufrag not in (None, session.remote_ufrag):
            return "ufrag of another ICE generation"
        if candidate.component > self.config.components:
            return f"component {candidate.component} is not in this stream"
        if candidate.is_mdns:
            return "unresolved mDNS name"
        problem = address_problem(candidate.address, candidate.port, self.config.address_policy)
        if problem is not None:
            return problem
        if session.remote_signalled >= self.config.max_remote_candidates:
            return "too many remote candidates"
        return None

    # -- data ---------------------------------------------------------------------------------

    def send(self, data: bytes, component: int = 1) -> None:
        """Send application data over the selected pair of ``component`` (during a
        restart, over the previous session's pair until the new one is selected): queued
        for :meth:`poll_transmit`. Raises :class:`IceNotConnectedError` when there is
        none or consent was lost."""
        self._transmits.append(self._data_transmit(data, component))

    def send_now(self, data: bytes, component: int = 1) -> Transmit | None:
        """:meth:`send`, for a driver that sends at once: the UDP transmit to write now,
        or None when it was queued instead (behind transmits not polled yet, which go
        first, or on TCP, where poll_transmit frames it): then poll as usual. Sending data
        moves no timer earlier (only the keepalive, later) and queues no event, so
        nothing else needs polling for it."""
        transmit = self._data_transmit(data, component)
        if self._transmits or transmit.transport is not TransportProtocol.UDP:
            self._transmits.append(transmit)
            return None
        return transmit

    def _data_transmit(self, data: bytes, component: int) -> Transmit:
        pair = self._sending_pair(component) if not self._closed else None
        if pair is None:
            raise IceNotConnectedError(f"component {component} has no selected pair")
        transport = pair.local.candidate.transport
        if transport is TransportProtocol.TCP and len(data) > MAX_FRAME:
            raise LocalProtocolError(f"RFC 4571 frames carry at most {MAX_FRAME} bytes")
        pair.bytes_sent += len(data)
        pair.last_sent = self._now
        return Transmit(data, pair.local.base, pair.remote.transport_address, transport)

    def _sending_pair(self, component: int) -> CandidatePair | None:
        pair = self._session.selected.get(component)
        if pair is None and self._previous is not None:
            pair = self._previous.selected.get(component)
        return pair

    # -- restart and close --------------------------------------------------------------------

    def restart(self) -> None:
        """ICE restart (RFC 8445 §9): new ufrag and pwd, a fresh check list; remote
        credentials and candidates are to be set again. Data keeps flowing on the
        previous selected pairs until the new session selects its own. Local candidates
        are kept and announced again (with :class:`GatheringComplete` if gathering was
        complete) so the driver can signal them with the new credentials."""
        self._check_open()
        old = self._session
        for transaction_id, check in list(self._checks.items()):
            if check.session is old:
                self._checks_tm.cancel(transaction_id)
                del self._checks[transaction_id]
        old.checklist.triggered.clear()
        if old.selected:
            if self._previous is not None:
                self._drop_consent(self._previous)
            self._previous = old
        self._session = self._new_session(IceCredentials.generate())
        self._next_check_at = -math.inf
        for local in self._local:
            self._events.append(CandidateGathered(local.candidate))
        if self._gathering_complete:
            self._events.append(GatheringComplete())
        self._update_state(self._now)

    def close(self) -> None:
        """Stop: no more checks, consent or data; the state becomes closed."""
        if self._closed:
            return
        self._closed = True
        for transaction_id in list(self._checks):
            self._checks_tm.cancel(transaction_id)
        self._checks.clear()
        self._consent.clear()
        self._gatherer.cancel_all()
        self._transmits.clear()
        self._requests.clear()
        self._tcp.clear()  # the driver closes its sockets with the agent
        self._set_state(IceTransportState.CLOSED)

    # -- driver interface ---------------------------------------------------------------------

    def handle_datagram(
        self,
        data: bytes,
        local: Address,
        remote: Address,
        now: float,
        transport: TransportProtocol = TransportProtocol.UDP,
    ) -> bool:
        """A datagram (or RFC 4571 frame) that arrived on the base ``local`` from
        ``remote``. STUN is processed; anything else is application data, delivered only
        from a pair whose check has succeeded.

        Returns True for application data (delivered or dropped): it changes no ICE state,
        so it queues no transmit and moves no timer, and a driver need not read
        :meth:`poll_transmit` or :meth:`poll_timeout` again for it, only
        :meth:`poll_event`."""
        if self._closed:
            return False
        if transport is TransportProtocol.TCP and not self._tcp.is_open(local, remote):
            return False  # TCP traffic exists only on a connection of ours (handle_tcp_data)
        self._advance(now)
        if data and data[0] < 4:  # RFC 7983 §7: 0-3 is STUN
            try:
                message = Message.decode(data)
            except StunDecodeError:
                return False
            if message.method != Method.BINDING or message.legacy:
                return False
            if message.message_class is MessageClass.REQUEST:
                self._handle_request(message, local, remote, now, transport)
            elif message.message_class is not MessageClass.INDICATION:
                self._handle_response(message, local, remote, now)
            # Binding indications are keepalives: nothing to do (RFC 8445 §11).
        else:
            # Application data changes no ICE state: no need to re-evaluate anything.
            self._handle_data(data, local, remote, transport)
            return True
        self._update(now)
        return False

    def handle_timeout(self, now: float) -> None:
        """Run every timer due at ``now``: retransmissions, the Ta tick, consent,
        keepalives, nomination."""
        if self._closed:
            return
        self._advance(now)
        self._checks_tm.handle_timeout(now)
        while (timed_out := self._checks_tm.poll_event()) is not None:
            check = self._checks.pop(timed_out.transaction_id, None)
            if check is not None:
                self._fail_check(check, timed_out.transaction_id, now)
        for result in self._gatherer.handle_timeout(now):
            self._on_gathered(result)
        self._purge_cancelled(now)
        self._pull_requests()
        session = self._session
        if (
            not self.config.lite
            and session.remote_pwd is not None
            and now >= self._next_check_at
            and not self._check_idle
            and not self._requests  # backpressure: the rate bound holds requests back
        ):
            pair = session.checklist.next_check()
            if pair is not None:
                self._send_check(session, pair, now)
                self._next_check_at = now + self.config.ta
            else:
                self._check_idle = True
        self._run_consent(now)
        self._run_keepalives(now)
        self._update(now)

    def poll_transmit(self) -> Transmit | None:
        """The next datagram to send: responses and data first, then requests within the
        rate bound (checks, retransmissions, consent, gathering). TCP transmits come
        framed, with their connection (see :mod:`tsunagu.ice.tcp`); a check that needs
        a new connection yields a :class:`TcpConnectRequested` event instead."""
        while (transmit := self._next_transmit()) is not None:
            if transmit.transport is TransportProtocol.UDP or transmit.connection is not None:
                return transmit  # UDP, or framed already (held until its connection was up)
            routed = self._route_tcp(transmit)
            if routed is not None:
                return routed
        return None

    def _next_transmit(self) -> Transmit | None:
        if self._transmits:
            return self._transmits.pop(0)
        self._pull_requests()
        if self._requests and self._take_token():
            return self._requests.pop(0)
        return None

    def poll_event(self) -> IceEvent | None:
        return self._events.pop(0) if self._events else None

    def poll_timeout(self) -> float | None:
        """The absolute time :meth:`handle_timeout` should next run, or None."""
        if self._closed:
            return None
        deadlines: list[float] = []
        for timer in (self._checks_tm.poll_timeout(), self._gatherer.poll_timeout()):
            if timer is not None:
                deadlines.append(timer)
        session = self._session
        # When requests wait for the token bucket, nothing new is checked before a token
        # is there (see handle_timeout).
        tokens_at = self._now
        if self._requests and self._tokens < 1 - _TOKEN_SLACK:
            wait = (1 - self._tokens) / self.config.max_checks_per_second
            tokens_at = self._now + max(wait, _TOKEN_SLACK)
            deadlines.append(tokens_at)
        if not self.config.lite and session.remote_pwd is not None and not self._check_idle:
            deadlines.append(max(self._next_check_at, tokens_at))
        deadlines.extend(session.nominate_at.values())
        if session.tcp_passive_until is not None and session.tcp_passive_until > self._now:
            deadlines.append(session.tcp_passive_until)  # a passed one is acted on already
        for active in self._sessions():
            for pair in active.selected.values():
                if pair.consent is not None:
                    deadlines.append(pair.consent.deadline(self._now))
                deadlines.append(pair.last_sent + self.config.keepalive_interval)
        return min(deadlines) if deadlines else None

    # -- TCP candidates and connections (RFC 6544) --------------------------------------------

    def add_tcp_host_candidate(
        self,
        address: Address,
        tcptype: TcpType,
        component: int = 1,
        *,
        interface_rank: int = 0,
        address_rank: int = 0,
    ) -> Candidate | None:
        """Build and add a TCP host candidate (RFC 6544 §4.1) with the RFC 6544 §4.2
        priority (direction preference in the local preference) and a foundation of its
        own transport (RFC 8445 §5.1.1.3).

        ``tcptype`` passive: ``address`` is a socket the driver listens on. Active: only
        its IP counts; the candidate has port 9 (RFC 6544 §4.5) and the driver opens each
        connection from an ephemeral port of that IP when asked. Simultaneous-open: the
        port the driver connects from (both ends connect at once)."""
        ip = normalize_ip(address[0])
        port = address[1]
        if tcptype is TcpType.ACTIVE:
            if port not in (0, ACTIVE_PORT):
                raise LocalProtocolError("an active TCP candidate has no port of its own")
            port = ACTIVE_PORT
        elif port == 0:
            raise LocalProtocolError(f"a {tcptype} TCP candidate needs its port")
        preference = local_preference(
            ip,
            interface_rank=interface_rank,
            address_rank=address_rank,
            prefer_ipv6=self.config.prefer_ipv6,
            transport=TransportProtocol.TCP,
            tcptype=tcptype,
        )
        candidate = Candidate(
            foundation=self._foundations.foundation(CandidateType.HOST, ip, TransportProtocol.TCP),
            component=component,
            transport=TransportProtocol.TCP,
            priority=candidate_priority(CandidateType.HOST, preference, component),
            address=ip,
            port=port,
            type=CandidateType.HOST,
            tcptype=tcptype,
        )
        return candidate if self.add_local_candidate(candidate) else None

    def handle_tcp_accepted(self, local: Address, remote: Address, now: float) -> int | None:
        """The driver accepted a connection from ``remote`` on the listening socket of
        the passive or simultaneous-open candidate whose base is ``local`` (RFC 6544
        §7.2: an agent "MUST be prepared to receive incoming TCP connection requests on
        the base of any TCP candidate that is simultaneous-open or passive"). Returns the
        id to pass to :meth:`handle_tcp_data`, or None: close the socket (no such
        candidate there, a remote address the policy refuses, too many connections).
        Checks of ours to ``remote`` from ``local`` go over it as well: no connection is
        requested for them while it is open. (Simultaneous open: a socket accepted while
        the :class:`TcpConnectRequested` for the same ``local`` and ``remote`` is pending
        is that connection, reported with :meth:`handle_tcp_connected`, not here.)
        The peer checks over it; its first check creates the peer-reflexive candidate
        of the connection's source address (RFC 6544 §7.2, RFC 8445 §7.3.1.3)."""
        if self._closed:
            return None
        self._advance(now)
        base = self._bases.get((TransportProtocol.TCP, local))
        if base is None or base.candidate.tcptype not in (
            TcpType.PASSIVE,
            TcpType.SIMULTANEOUS_OPEN,
        ):
            return None
        if address_problem(remote[0], remote[1], self.config.address_policy) is not None:
            return None
        connection, dropped = self._tcp.accept(local, remote, self._tcp_in_use)
        for old in dropped:
            self._events.append(TcpCloseRequested(old.id))
            self._tcp_fail_pairs(old, now)
        if dropped:
            self._update(now)
        return None if connection is None else connection.id

    def handle_tcp_connected(self, connection: int, now: float) -> None:
        """The connection asked for in :class:`TcpConnectRequested` is established: the
        checks waiting for it go out (RFC 6544 §7.1)."""
        if self._closed:
            return
        self._advance(now)
        conn = self._tcp.get(connection)
        if conn is None or conn.state is TcpConnectionState.OPEN:
            return
        conn.state = TcpConnectionState.OPEN
        for data in conn.pending:
            self._transmits.append(
                Transmit(data, conn.base, conn.remote, TransportProtocol.TCP, conn.id)
            )
        conn.pending.clear()

    def handle_tcp_data(self, connection: int, data: bytes, now: float) -> None:
        """Bytes read from an open connection, cut into RFC 4571 frames here; each frame is
        handled as a datagram between the connection's base and remote address."""
        if self._closed:
            return
        conn = self._tcp.get(connection)
        if conn is None or conn.state is not TcpConnectionState.OPEN:
            return
        for payload in conn.framer.feed(data):
            self.handle_datagram(payload, conn.base, conn.remote, now, TransportProtocol.TCP)
            if self._tcp.get(connection) is not conn:
                return  # closed while handling a frame

    def handle_tcp_closed(self, connection: int, now: float) -> None:
        """The connection could not be established, was reset or closed. Its pairs fail
        (RFC 6544 §7.1: a check whose connection fails has failed); a selected pair on
        it can carry no more data and loses consent (:class:`ConsentLost`)."""
        if self._closed:
            return
        self._advance(now)
        conn = self._tcp.remove(connection)
        if conn is None:
            return
        self._tcp_fail_pairs(conn, now)
        self._update(now)

    def _tcp_pairs(
        self, base: Address, remote: Address
    ) -> Iterator[tuple[_Session, CandidatePair]]:
        owner = self._bases.get((TransportProtocol.TCP, base))
        if owner is None:
            return
        for session in self._sessions():
            pair = session.checklist.find(owner.component, TransportProtocol.TCP, base, remote)
            if pair is not None:
                yield session, pair

    def _tcp_in_use(self, conn: TcpConnection) -> bool:
        return any(True for _ in self._tcp_pairs(conn.base, conn.remote))

    def _tcp_fail_pairs(self, conn: TcpConnection, now: float) -> None:
        for session, pair in list(self._tcp_pairs(conn.base, conn.remote)):
            component = pair.component
            if pair.transaction_id is not None:
                self._checks_tm.cancel(pair.transaction_id)
                self._checks.pop(pair.transaction_id, None)
                pair.transaction_id = None
            if session.selected.get(component) is pair:
                self._lose_consent(session, component, pair)
            elif (
                self._controlling
                and (pair.nominating or pair.nominated)
                and session is self._session
                and component not in session.selected
            ):
                session.nominate_at[component] = now  # another valid pair, if any
            pair.valid = pair.nominated = pair.nominating = pair.nominate_on_success = False
            session.usable.pop(pair.key, None)
            if pair in session.checklist.triggered:
                session.checklist.triggered.remove(pair)
            session.checklist.set_state(pair, PairState.FAILED)

    def _tcp_release(self, base: Address, remote: Address) -> None:
        """A pair failed: close the outgoing connection under it unless a pair of another
        session still uses it (connections opened by the peer are the peer's to close,
        within :attr:`IceConfig.max_tcp_accepted`)."""
        conn = self._tcp.find(base, remote)
        if conn is None or not conn.outgoing:
            return
        if any(pair.state is not PairState.FAILED for _, pair in self._tcp_pairs(base, remote)):
            return
        self._tcp.remove(conn.id)
        self._events.append(TcpCloseRequested(conn.id))

    def _tcp_passive_waiting(self, session: _Session, now: float) -> bool:
        """Pairs of a passive candidate are checked only once the peer has connected
        (RFC 6544 §7.1, §7.2). When nothing else is left to check, they wait as long as a
        check of the peer's may take to succeed or fail, then fail."""
        waiting = [
            pair
            for pair in session.checklist
            if not is_ordinary(pair) and pair.state in (PairState.FROZEN, PairState.WAITING)
        ]
        if not waiting:
            return False
        if session.tcp_passive_until is None:
            session.tcp_passive_until = now + self._cancelled_window
        if now < session.tcp_passive_until:
            return True
        session.tcp_passive_until = -math.inf  # done waiting, for good
        for pair in waiting:
            session.checklist.set_state(pair, PairState.FAILED)
        return False

    def _tcp_connection_for(
        self, check: _Check, transaction_id: bytes, remote: Address
    ) -> TcpConnection | None:
        """RFC 6544 §7.1: the connection a check goes on. With none yet, an active or
        simultaneous-open candidate asks the driver for one at once (the check waits for
        it); a passive candidate cannot -- only the peer connects to it -- and the check
        fails."""
        base = check.pair.local.base
        conn = self._tcp.find(base, remote)
        if conn is not None:
            return conn
        local = check.pair.local.candidate
        if local.tcptype is TcpType.PASSIVE:
            self._checks_tm.cancel(transaction_id)
            self._checks.pop(transaction_id, None)
            self._fail_check(check, transaction_id, self._now)
            return None
        conn = self._tcp.connect(base, remote)
        self._events.append(TcpConnectRequested(conn.id, connect_from(local), remote))
        return conn

    def _route_tcp(self, transmit: Transmit) -> Transmit | None:
        """RFC 6544 §7.1, §10: put a TCP transmit, framed with RFC 4571, on the connection
        between its base and remote address (a connecting one holds it). A check finds
        its connection as when it was queued; anything else with no connection under it
        (the connection closed meanwhile) is dropped."""
        conn = self._tcp.find(transmit.local, transmit.remote)
        if conn is None:
            transaction_id = transmit.data[8:20]
            check = self._checks.get(transaction_id)
            if check is None:
                return None
            conn = self._tcp_connection_for(check, transaction_id, transmit.remote)
            if conn is None:
                return None
        data = frame(transmit.data)
        if conn.state is TcpConnectionState.CONNECTING:
            conn.queue(data)
            return None
        return Transmit(data, transmit.local, transmit.remote, TransportProtocol.TCP, conn.id)

    # -- internals: plumbing ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the agent is closed")

    def _advance(self, now: float) -> None:
        self._now = max(self._now, now)
        if self._tokens_at is None:
            self._tokens_at = now

    def _sessions(self) -> Iterator[_Session]:
        yield self._session
        if self._previous is not None:
            yield self._previous

    def _new_session(self, credentials: IceCredentials) -> _Session:
        checklist = CheckList(self.config.max_pairs, self._controlling, self._on_pair_state)
        return _Session(credentials, checklist)

    def _wake(self) -> None:
        """Something changed that may give the Ta tick a pair to check."""
        self._check_idle = False

    def _on_pair_state(self, pair: CandidatePair, previous: PairState) -> None:
        self._check_idle = False
        self._events.append(CandidatePairStateChanged(pair.info(), previous))
        if pair.state is PairState.FAILED and pair.local.candidate.tcptype is not None:
            self._tcp_release(pair.local.base, pair.remote.transport_address)

    def _take_token(self) -> bool:
        """Token bucket of :attr:`IceConfig.max_checks_per_second`."""
        now = self._now
        if self._tokens_at is not None and now > self._tokens_at:
            rate = self.config.max_checks_per_second
            self._tokens = min(
                float(self.config.check_burst), self._tokens + (now - self._tokens_at) * rate
            )
        self._tokens_at = now
        if self._tokens >= 1 - _TOKEN_SLACK:
            self._tokens = max(0.0, self._tokens - 1)
            return True
        return False

    def _pull_requests(self) -> None:
        while (item := self._checks_tm.poll_transmit()) is not None:
            data, remote = item
            check = self._checks.get(data[8:20])
            if check is None:
                continue
            pair = check.pair
            transport = pair.local.candidate.transport
            if transport is TransportProtocol.TCP and check.transmissions:
                # RFC 6544 §7.1, RFC 8489 §6.2.2: TCP is reliable, no retransmission (the
                # transaction still times out, or the connection's failure ends it).
                continue
            check.transmissions += 1
            pair.requests_sent += 1
            pair.last_sent = self._now
            self._requests.append(Transmit(data, pair.local.base, remote, transport))
        while (transmit := self._gatherer.poll_transmit()) is not None:
            self._requests.append(transmit)

    def _respond(
        self, data: bytes, local: Address, remote: Address, transport: TransportProtocol
    ) -> None:
        self._transmits.append(Transmit(data, local, remote, transport))

    # -- internals: pairing -------------------------------------------------------------------

    def _pair(self, session: _Session, local: LocalCandidate, remote: Candidate) -> None:
        if can_pair(local.candidate, remote):
            session.checklist.add(local, remote)

    def _set_role(self, controlling: bool) -> None:
        """Role switch (RFC 8445 §7.2.5.1, §7.3.1.1): pair priorities are recomputed."""
        if controlling == self._controlling:
            return
        self._controlling = controlling
        for session in self._sessions():
            session.checklist.set_role(controlling)
            session.nominate_at.clear()
            if not controlling:
                for pair in session.checklist:
                    pair.nominating = False
        self._events.append(RoleChanged(controlling))
        self._wake()

    def _fail_check(self, check: _Check, transaction_id: bytes, now: float) -> None:
        """A check failed (timeout, error response, asymmetric response)."""
        session, pair = check.session, check.pair
        if pair.transaction_id != transaction_id:
            return  # superseded by a newer check on the pair: that one decides
        pair.transaction_id = None
        if pair.valid:
            # Only a nomination check runs on a valid pair (§8.1.1); if it fails, the pair
            # is no longer valid and another one gets nominated.
            if check.use_candidate and pair.nominating:
                pair.nominating = False
                if session.selected.get(pair.component) is not pair:
                    pair.valid = False
                    session.usable.pop(pair.key, None)
                    session.checklist.set_state(pair, PairState.FAILED)
                    if self._controlling:
                        session.nominate_at[pair.component] = now
            return
        pair.nominating = False
        session.checklist.set_state(pair, PairState.FAILED)

    # -- internals: checks (RFC 8445 §7.2) ----------------------------------------------------

    def _send_check(self, session: _Session, pair: CandidatePair, now: float) -> None:
        assert session.remote_ufrag is not None and session.remote_key is not None
        local = pair.local.candidate
        # §7.1.1: PRIORITY is the priority a peer-reflexive candidate learnt from this
        # check would have: same local preference and component, prflx type preference.
        priority = candidate_priority(
            CandidateType.PEER_REFLEXIVE, (local.priority >> 8) & 0xFFFF, local.component
        )
        use_candidate = self._controlling and (
            pair.nominating or self.config.nomination is Nomination.AGGRESSIVE
        )
        transaction_id = new_transaction_id()
        data = check_request(
            transaction_id,
            local_ufrag=session.local.ufrag,
            remote_ufrag=session.remote_ufrag,
            remote_key=session.remote_key,
            priority=priority,
            controlling=self._controlling,
            tie_breaker=self._tie_breaker,
            use_candidate=use_candidate,
        )
        if pair.transaction_id is not None:
            self._cancel_check(pair.transaction_id, now)
        # §14.3: RTO = MAX(500 ms, Ta * (Num-Waiting + Num-In-Progress)).
        busy = session.checklist.count(PairState.WAITING, PairState.IN_PROGRESS)
        rto = max(self.config.check_rto_min, self.config.ta * busy)
        self._checks_tm.start(transaction_id, data, pair.remote.transport_address, now, rto=rto)
        self._checks[transaction_id] = _Check(
            pair,
            session,
            use_candidate=use_candidate,
            controlling=self._controlling,
            priority=priority,
            sent_at=now,
        )
        pair.transaction_id = transaction_id
        self._checks_started = True
        if not (pair.nominating and pair.state is PairState.SUCCEEDED):
            session.checklist.set_state(pair, PairState.IN_PROGRESS)
        if local.transport is TransportProtocol.TCP:
            check = self._checks[transaction_id]
            self._tcp_connection_for(check, transaction_id, pair.remote.transport_address)

    def _cancel_check(self, transaction_id: bytes, now: float) -> None:
        """§7.3.1.4 cancellation: no more retransmissions, but a response that still
        arrives within the transaction timeout counts."""
        self._checks_tm.cancel(transaction_id)
        check = self._checks.get(transaction_id)
        if check is not None:
            check.cancelled_until = now + self._cancelled_window

    def _purge_cancelled(self, now: float) -> None:
        expired = [
            tid
            for tid, check in self._checks.items()
            if check.cancelled_until is not None and check.cancelled_until <= now
        ]
        for tid in expired:
            check = self._checks.pop(tid)
            self._fail_check(check, tid, now)

    def _handle_response(
        self, message: Message, local: Address, remote: Address, now: float
    ) -> None:
        transaction_id = message.transaction_id
        if self._gatherer.owns(transaction_id):
            result = self._gatherer.handle_response(message, local, remote, now)
            if result is not None:
                self._on_gathered(result)
            return
        consent = self._consent.get(transaction_id)
        if consent is not None:
            self._on_consent_response(
                message, local=local, remote=remote, now=now, session=consent[0], pair=consent[1]
            )
            return
        check = self._checks.get(transaction_id)
        if check is None:
            return
        session, pair = check.session, check.pair
        key = session.remote_key
        if key is None:
            return
        if message.integrity_algorithm is not None:
            if not message.verify_integrity(key):
                return  # RFC 8489 §9.1.3: discard, as if it never arrived
        else:
            error = message.error
            if error is None or error.code not in _UNAUTHENTICATED_ERRORS:
                return
        if check.cancelled_until is None and not self._checks_tm.handle_response(
            transaction_id, now
        ):
            return
        del self._checks[transaction_id]
        success = message.message_class is MessageClass.SUCCESS
        if pair.transaction_id != transaction_id and not success:
            return  # a superseded check's failure says nothing about the pair
        pair.responses_received += 1
        # §7.2.5.2.1: the response must come from where the request went, to where it
        # came from; otherwise the check fails.
        if remote != pair.remote.transport_address or local != pair.local.base:
            self._fail_check(check, transaction_id, now)
            return
        if not success:
            error = message.error
            if error is not None and error.code == ErrorCode.ROLE_CONFLICT:
                # §7.2.5.1: switch role unless it switched since the request was sent,
                # then check the pair again.
                if check.controlling == self._controlling:
                    self._set_role(not check.controlling)
                if pair.transaction_id == transaction_id:
                    pair.transaction_id = None
                    session.checklist.enqueue_triggered(
                        pair, nomination=pair.valid and pair.nominating
                    )
                    self._wake()
            else:
                self._fail_check(check, transaction_id, now)
            return
        mapped = message.get(XorMappedAddress)
        if mapped is None:
            self._fail_check(check, transaction_id, now)
            return
        self._on_check_success(check, transaction_id, mapped.address, now)

    def _on_check_success(
        self, check: _Check, transaction_id: bytes, mapped: Address, now: float
    ) -> None:
        session, pair = check.session, check.pair
        if pair.transaction_id == transaction_id:
            pair.transaction_id = None
        if check.transmissions == 1:
            pair.rtt = now - check.sent_at
        local = pair.local
        component = local.component
        transport = local.candidate.transport
        if local.candidate.tcptype is TcpType.ACTIVE:
            # RFC 6544 §4.5, §7.2: each connection of an active candidate has its own
            # ephemeral port; only the IP of the mapped address can reveal a NAT.
            mapped = (mapped[0], ACTIVE_PORT)
        # §7.2.5.3.1: a mapped address no local candidate has is a peer-reflexive one.
        known = mapped == local.candidate.transport_address or any(
            other.candidate.transport_address == mapped
            and other.component == component
            and other.candidate.transport is transport
            for other in (*self._local, *session.local_prflx)
        )
        if not known and len(session.local_prflx) < self.config.max_peer_reflexive:
            learnt = Candidate(
                foundation=self._foundations.foundation(
                    CandidateType.PEER_REFLEXIVE, local.base[0], transport
                ),
                component=component,
                transport=transport,
                priority=check.priority,
                address=mapped[0],
                port=mapped[1],
                type=CandidateType.PEER_REFLEXIVE,
                related_address=local.base[0],
                related_port=local.base[1],
                tcptype=local.candidate.tcptype,
            )
            session.local_prflx.append(LocalCandidate(learnt, local.base))
            self._events.append(PeerReflexiveCandidate(learnt, local=True))
        # §7.2.5.3.2: the valid pair (same 5-tuple as the checked pair, see module doc).
        pair.valid = True
        session.usable[pair.key] = pair
        session.checklist.set_state(pair, PairState.SUCCEEDED)
        # §7.2.5.3.3: pairs of the same foundation can now be checked.
        session.checklist.unfreeze_foundation(pair.foundation)
        # §7.2.5.3.4 / §8.1.1: a nomination check (ours) or a nomination that arrived
        # while our check was pending (§7.3.1.5) nominates the pair.
        if check.use_candidate if self._controlling else pair.nominate_on_success:
            pair.nominated = True
        if check.use_candidate:
            pair.nominating = False
        if (
            self._controlling
            and self.config.nomination is Nomination.REGULAR
            and component not in session.nominate_at
            and not any(
                p.nominated or p.nominating for p in session.checklist if p.component == component
            )
        ):
            session.nominate_at[component] = now + self.config.nomination_delay

    # -- internals: incoming checks (RFC 8445 §7.3) -------------------------------------------

    def _handle_request(
        self,
        message: Message,
        local: Address,
        remote: Address,
        now: float,
        transport: TransportProtocol,
    ) -> None:
        base = self._bases.get((transport, local))
        if base is None:
            return  # not one of our bases
        if address_problem(remote[0], remote[1], self.config.address_policy) is not None:
            return  # §7.3.1.3 peers at such addresses are ignored outright
        parsed = parse_check_request(message)
        if isinstance(parsed, tuple):
            code, unknown = parsed
            self._respond(check_error(message, code, unknown=unknown), local, remote, transport)
            return
        session = next((s for s in self._sessions() if s.local.ufrag == parsed.local_ufrag), None)
        if session is None or (
            session.remote_ufrag is not None and parsed.remote_ufrag != session.remote_ufrag
        ):
            self._respond(check_error(message, ErrorCode.UNAUTHENTICATED), local, remote, transport)
            return
        if not message.verify_integrity(session.local_key):
            self._respond(check_error(message, ErrorCode.UNAUTHENTICATED), local, remote, transport)
            return
        key = session.local_key
        # §7.3.1.1: role conflict, resolved by the tie-breakers.
        if parsed.controlling is not None and not self.config.lite:
            if self._controlling and parsed.controlling:
                if self._tie_breaker >= parsed.tie_breaker:
                    self._respond(
                        check_error(message, ErrorCode.ROLE_CONFLICT, key), local, remote, transport
                    )
                    return
                self._set_role(False)
            elif not self._controlling and not parsed.controlling:
                if self._tie_breaker >= parsed.tie_breaker:
                    self._set_role(True)
                else:
                    self._respond(
                        check_error(message, ErrorCode.ROLE_CONFLICT, key), local, remote, transport
                    )
                    return
        # §7.3.1.2: the success response, XOR-MAPPED-ADDRESS = the request's source.
        self._respond(check_success(message, remote, key), local, remote, transport)
        if session is not self._session:
            return  # an earlier generation: answer (consent on the old pair), no more
        component = base.component
        candidate = session.remote_index.get((component, transport, remote))
        if candidate is None:
            candidate = self._learn_remote_prflx(session, base, remote, parsed.priority)
            if candidate is None:
                return
        pair = session.checklist.find(component, transport, local, remote)
        if pair is None:
            if session.selected.get(component) is not None and not self.config.lite:
                return  # §8.1.2: the component is done; no new pairs
            pair = session.checklist.add(base, candidate)
            if pair is None:
                return  # the cap (§6.1.2.5) keeps better pairs
        pair.requests_received += 1
        if self.config.lite:
            # A lite agent sends no checks: an authenticated check is all it can know
            # of the pair (RFC 8445 §2.5), so it becomes valid.
            if not pair.valid:
                pair.valid = True
                session.usable[pair.key] = pair
                session.checklist.set_state(pair, PairState.SUCCEEDED)
            if parsed.use_candidate:
                pair.nominated = True
            return
        # §7.3.1.4: triggered check.
        if pair.state is PairState.IN_PROGRESS and pair.transaction_id is not None:
            self._cancel_check(pair.transaction_id, now)
            pair.transaction_id = None
            session.checklist.enqueue_triggered(pair)
            self._wake()
        elif pair.state is not PairState.SUCCEEDED:
            session.checklist.enqueue_triggered(pair)
            self._wake()
        # (A check on a succeeded pair -- consent, keepalive -- queues nothing: no wake-up.)
        # §7.3.1.5: the controlling agent nominated this pair.
        if parsed.use_candidate and not self._controlling:
            if pair.valid:
                pair.nominated = True
            else:
                pair.nominate_on_success = True

    def _learn_remote_prflx(
        self, session: _Session, base: LocalCandidate, remote: Address, priority: int
    ) -> Candidate | None:
        """§7.3.1.3: a check from an address that is no known remote candidate."""
        if session.remote_prflx >= self.config.max_peer_reflexive:
            return None
        foundations = {c.foundation for c in session.remote_candidates}
        number = session.remote_prflx + 1
        while f"prflx{number}" in foundations:
            number += 1
        local = base.candidate
        candidate = Candidate(
            foundation=f"prflx{number}",
            component=local.component,
            transport=local.transport,
            priority=priority,
            address=remote[0],
            port=remote[1],
            type=CandidateType.PEER_REFLEXIVE,
            tcptype=None if local.tcptype is None else _TCP_PEER[local.tcptype],
        )
        session.remote_prflx += 1
        session.remote_candidates.append(candidate)
        session.remote_index[(local.component, local.transport, remote)] = candidate
        self._events.append(PeerReflexiveCandidate(candidate, local=False))
        return candidate

    # -- internals: data ----------------------------------------------------------------------

    def _handle_data(
        self, data: bytes, local: Address, remote: Address, transport: TransportProtocol
    ) -> None:
        key = (local, remote)
        pair = self._session.usable.get(key)
        previous = self._previous  # _sessions(), unrolled: this runs for every datagram
        if previous is not None and (
            pair is None or pair.local.candidate.transport is not transport
        ):
            pair = previous.usable.get(key)
        if pair is not None and pair.local.candidate.transport is transport:
            pair.bytes_received += len(data)
            self._events.append(DataReceived(data, pair.component))

    # -- internals: gathering -----------------------------------------------------------------

    def _on_gathered(self, result: GatherResult) -> None:
        if result.mapped is None:
            self._events.append(
                GatheringFailed(result.base, result.server, result.error or "failed")
            )
        else:
            base = self._bases.get((TransportProtocol.UDP, result.base))
            if base is not None:
                host = base.candidate
                ip = normalize_ip(result.mapped[0])
                candidate = Candidate(
                    foundation=self._foundations.foundation(
                        CandidateType.SERVER_REFLEXIVE, host.address, server_ip=result.server[0]
                    ),
                    component=host.component,
                    transport=TransportProtocol.UDP,
                    priority=candidate_priority(
                        CandidateType.SERVER_REFLEXIVE,
                        (host.priority >> 8) & 0xFFFF,
                        host.component,
                    ),
                    address=ip,
                    port=result.mapped[1],
                    type=CandidateType.SERVER_REFLEXIVE,
                    related_address=result.base[0],
                    related_port=result.base[1],
                )
                self.add_local_candidate(candidate, result.base)
        self._update_gathering()

    def _update_gathering(self) -> None:
        if self._gathering_finished and not self._gatherer.active and not self._gathering_complete:
            self._gathering_complete = True
            self._events.append(GatheringComplete())
            self._wake()

    # -- internals: consent and keepalives (RFC 7675, RFC 8445 §11) ---------------------------

    def _run_consent(self, now: float) -> None:
        for session in list(self._sessions()):
            for component, pair in list(session.selected.items()):
                consent = pair.consent
                if consent is None:
                    continue
                if consent.lost(now):
                    self._lose_consent(session, component, pair)
                elif now >= consent.next_request:
                    self._send_consent(session, pair, now)

    def _send_consent(self, session: _Session, pair: CandidatePair, now: float) -> None:
        assert pair.consent is not None
        if session.remote_ufrag is None or session.remote_key is None:
            return
        local = pair.local.candidate
        transaction_id = new_transaction_id()
        data = check_request(
            transaction_id,
            local_ufrag=session.local.ufrag,
            remote_ufrag=session.remote_ufrag,
            remote_key=session.remote_key,
            priority=candidate_priority(
                CandidateType.PEER_REFLEXIVE, (local.priority >> 8) & 0xFFFF, local.component
            ),
            controlling=self._controlling,
            tie_breaker=self._tie_breaker,
            use_candidate=False,
        )
        pair.consent.request_sent(transaction_id, now)
        # Forget requests that can no longer refresh consent (the tracker dropped them).
        self._consent = {
            tid: entry
            for tid, entry in self._consent.items()
            if entry[1].consent is not None and entry[1].consent.owns(tid)
        }
        self._consent[transaction_id] = (session, pair)
        pair.requests_sent += 1
        pair.last_sent = now
        self._requests.append(
            Transmit(data, pair.local.base, pair.remote.transport_address, local.transport)
        )

    def _on_consent_response(
        self,
        message: Message,
        *,
        local: Address,
        remote: Address,
        now: float,
        session: _Session,
        pair: CandidatePair,
    ) -> None:
        key = session.remote_key
        if (
            key is None
            or message.message_class is not MessageClass.SUCCESS
            or not message.verify_integrity(key)
            or (local, remote) != pair.key
            or pair.consent is None
        ):
            return
        if pair.consent.response(message.transaction_id, now):
            del self._consent[message.transaction_id]
            pair.responses_received += 1

    def _lose_consent(self, session: _Session, component: int, pair: CandidatePair) -> None:
        """RFC 7675 §5.1: consent expired; stop sending on the pair."""
        pair.consent = None
        del session.selected[component]
        session.consent_lost.add(component)
        session.usable.pop(pair.key, None)
        self._events.append(ConsentLost(component, pair.info()))
        if session is self._session:
            self._events.append(SelectedPairChanged(component, None))

    def _drop_consent(self, session: _Session) -> None:
        for transaction_id in [t for t, (s, _) in self._consent.items() if s is session]:
            del self._consent[transaction_id]
        for pair in session.selected.values():
            pair.consent = None

    def _run_keepalives(self, now: float) -> None:
        interval = self.config.keepalive_interval
        for session in self._sessions():
            for pair in session.selected.values():
                if now >= pair.last_sent + interval:  # the poll_timeout expression
                    pair.last_sent = now
                    self._transmits.append(
                        Transmit(
                            binding_indication(),
                            pair.local.base,
                            pair.remote.transport_address,
                            pair.local.candidate.transport,
                        )
                    )

    # -- internals: nomination, selection, state ----------------------------------------------

    def _update(self, now: float) -> None:
        self._maybe_nominate(now)
        for session in list(self._sessions()):
            self._update_selection(session, now)
        previous = self._previous
        if previous is not None and all(
            c in self._session.selected for c in range(1, self.config.components + 1)
        ):
            self._drop_consent(previous)  # §9: the restart is over
            self._previous = None
        self._update_state(now)

    def _maybe_nominate(self, now: float) -> None:
        """§8.1.1 regular nomination by the controlling agent: nominate the best valid
        pair of a component once no better pair can still succeed, or after
        ``nomination_delay``."""
        session = self._session
        if (
            not self._controlling
            or self.config.lite
            or self.config.nomination is not Nomination.REGULAR
        ):
            return
        for component, deadline in list(session.nominate_at.items()):
            pairs = [p for p in session.checklist if p.component == component]
            if any(p.nominated or p.nominating for p in pairs):
                del session.nominate_at[component]
                continue
            valid = [p for p in pairs if p.valid and p.state is PairState.SUCCEEDED]
            if not valid:
                del session.nominate_at[component]  # re-armed by the next success
                continue
            best = valid[0]  # the check list is in priority order
            better_pending = any(
                p.priority > best.priority
                and p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS)
                for p in pairs
            )
            if better_pending and now < deadline:
                continue
            del session.nominate_at[component]
            best.nominating = True
            session.checklist.enqueue_triggered(best, nomination=True)
            self._wake()
            # The nomination goes out now, not at the next Ta tick: it is one request on a
            # pair the peer has just answered, and the request rate bound still applies.
            # (A deviation from §6.1.4.2's pacing that saves Ta -- 50 ms -- per connection.)
            self._next_check_at = min(self._next_check_at, now)

    def _update_selection(self, session: _Session, now: float) -> None:
        """The selected pair of a component is its highest-priority nominated valid pair
        (§8.1.1; with aggressive nomination a better one may replace it)."""
        for component in range(1, self.config.components + 1):
            if component in session.consent_lost:
                continue
            best = next(
                (
                    p
                    for p in session.checklist
                    if p.component == component and p.nominated and p.valid
                ),
                None,
            )
            current = session.selected.get(component)
            if best is None or best is current:
                continue
            session.selected[component] = best
            if current is not None:
                current.consent = None
            if not self.config.lite:
                best.consent = ConsentFreshness(
                    now,
                    interval=self.config.consent_interval,
                    jitter=self.config.consent_jitter,
                    timeout=self.config.consent_timeout,
                    disconnected_timeout=self.config.disconnected_timeout,
                    rng=self._rng,
                )
            if best.last_sent < 0:
                best.last_sent = now
            self._events.append(SelectedPairChanged(component, best.info()))
            # §8.1.2: no more checks for the component, except better pairs in flight.
            for pair in session.checklist.prune_component(component):
                if pair.priority < best.priority and pair.transaction_id is not None:
                    self._checks_tm.cancel(pair.transaction_id)
                    self._checks.pop(pair.transaction_id, None)
                    pair.transaction_id = None
                    session.checklist.set_state(pair, PairState.FAILED)

    def _compute_state(self, now: float) -> IceTransportState:
        if self._closed:
            return IceTransportState.CLOSED
        session = self._session
        if session.consent_lost:
            return IceTransportState.FAILED
        components = range(1, self.config.components + 1)
        selected = [self._sending_pair(c) for c in components]
        if all(pair is not None for pair in selected):
            for pair in selected:
                if pair is not None and pair.consent is not None and pair.consent.disconnected(now):
                    return IceTransportState.DISCONNECTED
            if all(c in session.selected for c in components) and (
                self.config.lite or (session.remote_end and self._gathering_complete)
            ):
                return IceTransportState.COMPLETED
            return IceTransportState.CONNECTED
        if self._checklist_failed(session) and not self._tcp_passive_waiting(session, now):
            return IceTransportState.FAILED
        if self._checks_started or (len(session.checklist) and session.remote_pwd is not None):
            return IceTransportState.CHECKING
        return IceTransportState.NEW

    def _checklist_failed(self, session: _Session) -> bool:
        """RFC 8445 §7.2.5.3.5 / RFC 8838 §8: every pair failed and no more candidates
        can come (end-of-candidates from the peer, local gathering complete), leaving a
        component without a valid pair."""
        if self.config.lite or not (session.remote_end and self._gathering_complete):
            return False
        if session.remote_pwd is None:
            return False
        checklist = session.checklist
        if checklist.has_pending() or checklist.count(PairState.IN_PROGRESS):
            return False
        return any(
            not any(p.valid and p.component == c for p in checklist)
            for c in range(1, self.config.components + 1)
        )

    def _update_state(self, now: float) -> None:
        self._set_state(self._compute_state(now))

    def _set_state(self, state: IceTransportState) -> None:
        if state is not self._state:
            previous, self._state = self._state, state
            self._events.append(ConnectionStateChanged(state, previous))
