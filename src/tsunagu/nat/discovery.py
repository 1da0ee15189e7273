"""RFC 5780 §4 NAT behaviour discovery as a sans-I/O state machine.

:class:`NatDiscovery` runs the Binding tests of RFC 5780 against one server and concludes
the NAT's mapping and filtering behaviour (RFC 4787 terms, :mod:`tsunagu.nat.behavior`),
whether it hairpins, and optionally how long an idle mapping lives. It never touches a
socket or a clock. The driver owns up to two local UDP sockets -- ``local`` (the one under
test) and ``secondary`` (for the hairpin and lifetime tests) -- and::

    discovery.start(now)
    loop:
        while (t := discovery.poll_transmit()) is not None:
            socket_bound_to(t.local).sendto(t.data, t.remote)
        while (event := discovery.poll_event()) is not None:
            ...                      # progress; DiscoveryCompleted carries the result
        wait for a datagram -> discovery.handle_datagram(data, local, remote, now)
             or poll_timeout()   -> discovery.handle_timeout(now)

Order of the tests, and why:

1. Test I (§4.3, §4.4): a Binding to the server's primary address ``A1:P1`` gives the mapped
   address and OTHER-ADDRESS ``A2:P2`` (§7.4). No answer at all: UDP is blocked. No
   OTHER-ADDRESS: the server does not support RFC 5780 and the behaviour tests cannot run.
2. Filtering tests II and III (§4.4) -- CHANGE-REQUEST "change IP and port" and "change
   port" -- from the ``secondary`` socket when there is one, and *before* anything is sent
   to ``A2``. Another socket, because a NAT that tracks connections (Linux conntrack) lets
   filtering test II's answer from ``A2:P2`` create a reply flow through the tested
   mapping; mapping test III's request to ``A2:P2`` would then leave as a "reply" through
   test I's mapping, and address-dependent mapping would look address-and-port-dependent.
   Before the mapping tests, because a filter that keys on the internal host rather than
   the mapping would otherwise have been opened to ``A2`` and pass for
   endpoint-independent. Both requests go to ``A1:P1`` only, so they run together, which
   halves the wait on the NATs that drop both answers. A timeout here is the answer
   "filtered", not an error. The hairpin test (§4.5) runs alongside: it only sends from
   the second socket to the first one's mapped address.
3. Mapping test II (§4.3) to ``A2:P1``; if its mapped address differs from test I's,
   mapping test III to ``A2:P2``.
4. Optionally the binding lifetime (§4.6): for each idle period T of a configurable schedule,
   a Binding from ``local`` refreshes its mapping, then after T seconds of silence a
   Binding from ``secondary`` carries RESPONSE-PORT (§7.5) set to ``local``'s mapped port,
   so the answer only reaches ``local`` if its mapping survived. The schedule stops at the
   first lost mapping, or before it would exceed the total budget.

Retransmissions and timeouts are :class:`~tsunagu.stun.transaction.TransactionManager`'s
(RFC 8489 §6.2.1). Tests whose timeout *is* the answer (filtering, hairpin, lifetime probe)
start with the configured initial RTO rather than the RTT estimate of the server, so they
always wait the full configured time before concluding "no".
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from tsunagu import SOFTWARE
from tsunagu.address import format_address
from tsunagu.errors import LocalProtocolError, StunDecodeError
from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.nat.events import (
    DiscoveryCompleted,
    FilteringDetermined,
    HairpinningDetermined,
    LifetimeProbed,
    MappingDetermined,
    NatEvent,
    NatTest,
    TestFinished,
)
from tsunagu.nat.theory import NAT_TYPES, direct_possible
from tsunagu.stun.attributes import (
    Address,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    XorMappedAddress,
)
from tsunagu.stun.constants import HEADER_LENGTH, MAGIC_COOKIE_BYTES, MessageClass, Method
from tsunagu.stun.message import Message, new_transaction_id
from tsunagu.stun.transaction import TransactionConfig, TransactionManager

__all__ = [
    "DiscoveryConfig",
    "NatDiscovery",
    "NatDiscoveryResult",
    "Transmit",
    "transaction_config",
    "verdict",
]

_MAX_RC = 7  # RFC 8489 §6.2.1 default Rc: never send more copies than the RFC's default


def transaction_config(timeout: float, initial_rto: float = 0.5) -> TransactionConfig:
    """RFC 8489 §6.2.1 parameters whose whole UDP transaction lasts about ``timeout`` seconds.

    Keeps the RFC's doubling schedule from ``initial_rto`` (halved if ``timeout`` is shorter
    than two RTOs), sends as many copies as fit (at most the default Rc of 7) while leaving
    at least one RTO to wait after the last, and picks Rm to end near ``timeout``. For
    ``timeout=39.5`` this is exactly the RFC's default (Rc 7, Rm 16); for 3 s: sends at 0,
    0.5 and 1.5 s, timeout at 3 s. Over TCP/TLS (§6.2.2) Ti is ``timeout`` itself.
    """
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    if not initial_rto > 0:
        raise ValueError("initial_rto must be positive")
    rto = min(initial_rto, timeout / 2)
    rc, last_send = 1, 0.0
    while rc < _MAX_RC:
        next_send = last_send + rto * (1 << (rc - 1))
        if next_send + rto > timeout + 1e-9:
            break
        last_send, rc = next_send, rc + 1
    rm = max(1, round((timeout - last_send) / rto))
    return TransactionConfig(initial_rto=rto, rc=rc, rm=rm, reliable_timeout=timeout)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Every knob of a discovery run, with its default."""

    timeout: float = 3.0
    """Seconds each Binding exchange waits for its answer, retransmitting in between as
    RFC 8489 §6.2.1 does (see :func:`transaction_config`). For the filtering, hairpin and
    lifetime tests a timeout is the answer "blocked", so this bounds how long they take."""
    initial_rto: float = 0.5
    """RFC 8489 §6.2.1 initial RTO (SHOULD be at least 500 ms on the open internet)."""
    hairpinning: bool = True
    """Run the §4.5 hairpin test (needs the ``secondary`` local address)."""
    lifetime: bool = False
    """Run the §4.6 binding lifetime test (needs ``secondary``; takes minutes by default)."""
    lifetime_schedule: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
    """Idle periods to probe, in seconds, in increasing order. The lifetime reported is the
    longest period the mapping survived; probing stops at the first one it did not."""
    lifetime_budget: float = 420.0
    """Upper bound, in seconds, on the whole lifetime test: a period whose refresh, wait and
    probe could end past it is not started."""
    software: str | None = SOFTWARE
    """SOFTWARE attribute of our requests (RFC 8489 §14.14); None sends none."""
    fingerprint: bool = True
    """Add FINGERPRINT to requests (RFC 8489 §14.7)."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if not self.initial_rto > 0:
            raise ValueError("initial_rto must be positive")
        if not self.lifetime_schedule or any(not t > 0 for t in self.lifetime_schedule):
            raise ValueError("lifetime_schedule must hold positive idle periods")
        if list(self.lifetime_schedule) != sorted(self.lifetime_schedule):
            raise ValueError("lifetime_schedule must be in increasing order")
        if not self.lifetime_budget > 0:
            raise ValueError("lifetime_budget must be positive")

    @property
    def transaction(self) -> TransactionConfig:
        return transaction_config(self.timeout, self.initial_rto)


@dataclass(frozen=True, slots=True)
class Transmit:
    """A datagram to send from the local socket bound to ``local`` to ``remote``."""

    data: bytes
    local: Address
    remote: Address


@dataclass(frozen=True, slots=True)
class NatDiscoveryResult:
    """What RFC 5780 discovery found. Fields stay None where a test could not tell."""

    server: Address
    """The server's primary address (``A1:P1``) the tests started from."""
    local: Address
    """The local address under test."""
    mapped: Address | None = None
    """Test I's XOR-MAPPED-ADDRESS: our address as the server sees it."""
    other_address: Address | None = None
    """The server's OTHER-ADDRESS (``A2:P2``); None: the server does not do RFC 5780."""
    response_origin: Address | None = None
    """RESPONSE-ORIGIN of test I (RFC 5780 §7.3)."""
    software: str | None = None
    """The server's SOFTWARE, if it sent one."""
    mapping: MappingBehavior | None = None
    filtering: FilteringBehavior | None = None
    hairpinning: bool | None = None
    """Whether a datagram to our own mapped address came back in (None: not tested)."""
    lifetime: float | None = None
    """Longest idle period, in seconds, after which the mapping was still alive (0.0 when
    even the first period lost it; None when not measured)."""
    lifetime_expired_after: float | None = None
    """Shortest idle period that lost the mapping (None when none did, or not measured)."""
    nat_present: bool | None = None
    """Whether the mapped address differs from the local one (§4.3)."""
    udp_blocked: bool = False
    """Test I got no answer at all."""
    error: str | None = None
    """Why the behaviour could not be (fully) determined, e.g. no RFC 5780 support."""
    notes: tuple[str, ...] = ()
    """Other things worth knowing (a test that could not run, a server quirk)."""

    @property
    def rfc5780_supported(self) -> bool:
        return self.other_address is not None

    @property
    def verdict(self) -> str:
        return verdict(self)


def verdict(result: NatDiscoveryResult) -> str:
    """What the result means for peer-to-peer connectivity (ICE, RFC 8445), in one line."""
    if result.udp_blocked:
        return "UDP blocked: you will need TURN over TCP/TLS"
    if result.mapped is not None and result.other_address is None:
        return (
            "unknown: the server does not support RFC 5780 (no OTHER-ADDRESS); "
            "use one that does to test NAT behaviour"
        )
    mapping, filtering = result.mapping, result.filtering
    if mapping is None or filtering is None:
        missing = " and ".join(
            name
            for name, value in (("mapping", mapping), ("filtering", filtering))
            if value is None
        )
        reason = f" ({result.error})" if result.error else ""
        return f"unknown: could not determine the {missing} behaviour{reason}"
    if (
        result.nat_present is False
        and mapping is MappingBehavior.ENDPOINT_INDEPENDENT
        and filtering is FilteringBehavior.ENDPOINT_INDEPENDENT
    ):
        return "no NAT or filtering: direct connections will work with most peers"
    # Which of the nine RFC 4787 NAT types a peer may sit behind we can reach directly with
    # STUN-only ICE: the theory table of docs/nat.md, one definition in nat/theory.py.
    blocked = [
        f"{_MAPPING_ABBREVIATION[m]}/{_FILTERING_ABBREVIATION[f]}"
        for m, f in NAT_TYPES
        if not direct_possible(mapping, filtering, m, f)
    ]
    if not blocked:
        return "direct connections will work with peers behind any kind of NAT"
    reachable = len(NAT_TYPES) - len(blocked)
    if reachable > len(blocked):
        return (
            f"direct connections will work with most peers ({reachable} of {len(NAT_TYPES)} "
            f"NAT types); you will need TURN for peers behind {', '.join(blocked)} NATs"
        )
    return (
        f"you will need TURN for many peers: direct connections work only with {reachable} "
        f"of {len(NAT_TYPES)} NAT types (not {', '.join(blocked)}; see docs/nat.md)"
    )


# Two tables: the enums share their string values, so one dict would merge their keys.
_MAPPING_ABBREVIATION = {
    MappingBehavior.ENDPOINT_INDEPENDENT: "EIM",
    MappingBehavior.ADDRESS_DEPENDENT: "ADM",
    MappingBehavior.ADDRESS_AND_PORT_DEPENDENT: "APDM",
}
_FILTERING_ABBREVIATION = {
    FilteringBehavior.ENDPOINT_INDEPENDENT: "EIF",
    FilteringBehavior.ADDRESS_DEPENDENT: "ADF",
    FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT: "APDF",
}


class _Phase(Enum):
    IDLE = "idle"
    BINDING = "binding"
    FILTERING = "filtering"  # with the hairpin test
    MAPPING = "mapping"
    LIFETIME = "lifetime"
    DONE = "done"


@dataclass(eq=False, slots=True)
class _Pending:
    test: NatTest
    local: Address
    remote: Address
    started: float
    idle: float = 0.0  # LIFETIME_PROBE: the idle period it checks


@dataclass(slots=True)
class _Outcome:
    """How one exchange ended."""

    responded: bool
    mapped: Address | None = None
    source: Address | None = None
    error: str | None = None
    local: Address | None = None  # where the answer arrived
    message: Message | None = None


@dataclass(slots=True)
class _State:
    """Everything learnt so far; frozen into a NatDiscoveryResult at the end."""

    mapped: Address | None = None
    other: Address | None = None  # OTHER-ADDRESS as the server sent it
    alternate: Address | None = None  # the same, once checked usable for the tests
    response_origin: Address | None = None
    software: str | None = None
    mapping: MappingBehavior | None = None
    filtering: FilteringBehavior | None = None
    hairpinning: bool | None = None
    lifetime: float | None = None
    lifetime_expired_after: float | None = None
    nat_present: bool | None = None
    udp_blocked: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # per-test outcomes of the running phase
    outcomes: dict[NatTest, _Outcome] = field(default_factory=dict)
    filtering_failed: bool = False
    mapping_ii: Address | None = None


def _normalize(address: Address) -> Address:
    """Canonical IP text (and no IPv6 scope) so addresses from sockets and from STUN
    attributes compare equal."""
    ip, port = address
    with contextlib.suppress(ValueError):
        ip = str(ipaddress.ip_address(ip.partition("%")[0]))
    return (ip, port)


class NatDiscovery:
    """One RFC 5780 discovery run against ``server`` (an IP address and port: resolving
    names is the driver's job), testing the mapping of the local socket ``local``.

    ``secondary`` is a second local UDP socket of the same address family, needed by the
    hairpin and lifetime tests; without it they are not run. ``transaction_id`` makes the
    96-bit transaction IDs (default: from the OS CSPRNG, RFC 8489 §5); tests inject a
    deterministic source.
    """

    def __init__(
        self,
        server: Address,
        local: Address,
        *,
        secondary: Address | None = None,
        config: DiscoveryConfig | None = None,
        transaction_id: Callable[[], bytes] = new_transaction_id,
    ) -> None:
        self._config = config if config is not None else DiscoveryConfig()
        self._server = _normalize(server)
        self._local = _normalize(local)
        self._secondary = _normalize(secondary) if secondary is not None else None
        if self._secondary == self._local:
            raise LocalProtocolError("the secondary local address must differ from local")
        if self._config.lifetime and self._secondary is None:
            raise LocalProtocolError("the lifetime test needs a secondary local address")
        self._new_id = transaction_id
        self._manager = TransactionManager(self._config.transaction)
        self._fixed_rto = self._manager.config.initial_rto
        self._pending: dict[bytes, _Pending] = {}
        self._events: deque[NatEvent] = deque()
        self._phase = _Phase.IDLE
        self._state = _State()
        self._hairpin_id: bytes | None = None
        # lifetime test (§4.6)
        self._lifetime_index = 0
        self._lifetime_started = 0.0
        self._lifetime_port = 0
        self._wake_at: float | None = None  # end of the current idle period
        self._result: NatDiscoveryResult | None = None

    # --- introspection -------------------------------------------------------------------

    @property
    def config(self) -> DiscoveryConfig:
        return self._config

    @property
    def server(self) -> Address:
        return self._server

    @property
    def local(self) -> Address:
        return self._local

    @property
    def secondary(self) -> Address | None:
        return self._secondary

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def result(self) -> NatDiscoveryResult | None:
        """The final result once :attr:`done`, else None."""
        return self._result

    # --- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Send test I. Call once."""
        if self._phase is not _Phase.IDLE:
            raise LocalProtocolError("discovery already started")
        self._phase = _Phase.BINDING
        self._send(NatTest.BINDING, self._local, self._server, now)

    def handle_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        """A datagram arrived on the local socket bound to ``local`` from ``remote``.

        Anything that is not a response to one of our requests (or our own hairpinned
        request) is ignored, as RFC 8489 §6.3 asks; malformed bytes never raise.
        """
        if self._phase in (_Phase.IDLE, _Phase.DONE):
            return
        if len(data) < HEADER_LENGTH or data[4:8] != MAGIC_COOKIE_BYTES:
            return  # not an RFC 8489 message: none of ours
        try:
            message = Message.decode(data)
        except StunDecodeError:
            return
        if message.method != Method.BINDING:
            return
        tid = message.transaction_id
        local = _normalize(local)
        remote = _normalize(remote)
        if message.message_class is MessageClass.REQUEST:
            # §4.5: our own request, sent from the secondary socket to our mapped address,
            # arrived on the primary socket: the NAT hairpins.
            if tid == self._hairpin_id and local == self._local:
                pending = self._pending.pop(tid, None)
                if pending is not None:
                    self._manager.cancel(tid)
                    self._finish(pending, _Outcome(True, source=remote, local=local), now)
            return
        if message.message_class is MessageClass.INDICATION:
            return
        pending = self._pending.get(tid)
        if pending is None or pending.test is NatTest.HAIRPIN:
            return
        if not self._manager.handle_response(tid, now):
            return  # a retransmission's duplicate answer (RFC 8489 §6.3)
        del self._pending[tid]
        self._finish(pending, _read_response(message, remote, local), now)

    def handle_timeout(self, now: float) -> None:
        """Fire retransmissions, transaction timeouts and the lifetime test's idle timer."""
        if self._phase in (_Phase.IDLE, _Phase.DONE):
            return
        self._manager.handle_timeout(now)
        while (timed_out := self._manager.poll_event()) is not None:
            pending = self._pending.pop(timed_out.transaction_id, None)
            if pending is not None:
                self._finish(pending, _Outcome(False), now)
        if self._wake_at is not None and now >= self._wake_at and self._phase is _Phase.LIFETIME:
            self._wake_at = None
            self._send_lifetime_probe(now)

    # --- outputs -------------------------------------------------------------------------

    def poll_transmit(self) -> Transmit | None:
        while (item := self._manager.poll_transmit()) is not None:
            data, remote = item
            pending = self._pending.get(data[8:20])
            if pending is not None:
                return Transmit(data, pending.local, remote)
        return None

    def poll_event(self) -> NatEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """Absolute time of the next retransmission, timeout or end of an idle period."""
        if self._phase is _Phase.DONE:
            return None
        deadline = self._manager.poll_timeout()
        if self._wake_at is not None and (deadline is None or self._wake_at < deadline):
            return self._wake_at
        return deadline

    # --- sending -------------------------------------------------------------------------

    def _send(
        self,
        test: NatTest,
        local: Address,
        remote: Address,
        now: float,
        attributes: tuple[Attribute, ...] = (),
        *,
        timeout_is_answer: bool = False,
        idle: float = 0.0,
    ) -> bytes:
        tid = self._new_id()
        if len(tid) != 12 or tid in self._pending:
            raise LocalProtocolError("transaction IDs must be 12 fresh bytes")
        attrs: list[Attribute] = list(attributes)
        if self._config.software is not None:
            attrs.append(Software(self._config.software))
        request = Message(Method.BINDING, MessageClass.REQUEST, tid, attrs)
        data = request.encode(fingerprint=self._config.fingerprint)
        self._pending[tid] = _Pending(test, local, remote, now, idle)
        self._manager.start(
            tid, data, remote, now, rto=self._fixed_rto if timeout_is_answer else None
        )
        return tid

    def _cancel(self, test: NatTest) -> None:
        for tid, pending in list(self._pending.items()):
            if pending.test is test:
                del self._pending[tid]
                self._manager.cancel(tid)

    # --- test outcomes -------------------------------------------------------------------

    def _finish(self, pending: _Pending, outcome: _Outcome, now: float) -> None:
        test = pending.test
        self._events.append(
            TestFinished(
                test,
                outcome.responded,
                mapped=outcome.mapped,
                source=outcome.source,
                rtt=now - pending.started if outcome.responded else None,
                error=outcome.error,
            )
        )
        if test is NatTest.BINDING:
            self._after_binding(outcome, now)
        elif test in (NatTest.FILTERING_II, NatTest.FILTERING_III, NatTest.HAIRPIN):
            self._state.outcomes[test] = outcome
            self._after_filtering(now)
        elif test in (NatTest.MAPPING_II, NatTest.MAPPING_III):
            self._after_mapping(test, outcome, now)
        elif test is NatTest.LIFETIME_REFRESH:
            self._after_lifetime_refresh(outcome, now)
        else:
            self._after_lifetime_probe(pending, outcome, now)

    def _after_binding(self, outcome: _Outcome, now: float) -> None:
        """Test I (§4.3 and §4.4 both start with it)."""
        state = self._state
        if not outcome.responded:
            state.udp_blocked = True
            state.error = "no response to a Binding request over UDP"
            self._complete()
            return
        if outcome.error is not None or outcome.mapped is None:
            state.error = f"test I failed: {outcome.error or 'no mapped address'}"
            self._complete()
            return
        state.mapped = outcome.mapped
        message = outcome.message
        assert message is not None
        _read_server_attributes(state, message)
        # §4.3: "If this address and port are the same as the local IP address and port of
        # the socket used to send the request, the client knows that it is not NATed".
        state.nat_present = outcome.mapped != self._local
        other = state.alternate = state.other
        if other is None:
            state.error = "server does not support RFC 5780 (no OTHER-ADDRESS in its response)"
        elif other[0] == self._server[0] or other[1] == self._server[1]:
            # §6: the alternate address differs from the primary in IP *and* port.
            state.error = (
                f"server's OTHER-ADDRESS {format_address(other)} does not differ from "
                f"{format_address(self._server)} in both IP and port"
            )
            state.alternate = None
        elif (":" in other[0]) != (":" in self._server[0]):
            state.error = f"server's OTHER-ADDRESS {format_address(other)} is of another family"
            state.alternate = None
        self._phase = _Phase.FILTERING
        if state.alternate is not None:
            # §4.4 test II and III, together, from the second socket if there is one (both go
            # to A1:P1 only; see the module docstring).
            filtering_socket = self._local
            if self._secondary is not None:
                filtering_socket = self._secondary
            else:
                state.notes.append(
                    "filtering tested on the socket under test (no second socket): a NAT "
                    "that tracks connections may then show address-dependent mapping as "
                    "address-and-port-dependent"
                )
            self._send(
                NatTest.FILTERING_II,
                filtering_socket,
                self._server,
                now,
                (ChangeRequest(change_ip=True, change_port=True),),
                timeout_is_answer=True,
            )
            self._send(
                NatTest.FILTERING_III,
                filtering_socket,
                self._server,
                now,
                (ChangeRequest(change_ip=False, change_port=True),),
                timeout_is_answer=True,
            )
        if self._config.hairpinning and self._secondary is not None:
            self._hairpin_id = self._send(
                NatTest.HAIRPIN, self._secondary, outcome.mapped, now, timeout_is_answer=True
            )
        elif self._config.hairpinning:
            state.notes.append("hairpinning not tested: no second local socket")
        self._after_filtering(now)

    def _after_filtering(self, now: float) -> None:
        """§4.4 filtering and §4.5 hairpinning, once their exchanges have ended."""
        state = self._state
        outcomes = state.outcomes
        if state.alternate is not None and state.filtering is None and not state.filtering_failed:
            ii, iii = outcomes.get(NatTest.FILTERING_II), outcomes.get(NatTest.FILTERING_III)
            behavior: FilteringBehavior | None = None
            failed: str | None = None
            other, server = state.alternate, self._server
            if ii is not None:
                failed = _filtering_problem(ii, other, "test II")
                if ii.responded and failed is None:
                    # "If the client receives a response, the current behavior of the NAT
                    # is Endpoint-Independent Filtering."
                    behavior = FilteringBehavior.ENDPOINT_INDEPENDENT
                elif failed is None and iii is not None:
                    failed = _filtering_problem(iii, (server[0], other[1]), "test III")
                    if failed is None:
                        behavior = (
                            FilteringBehavior.ADDRESS_DEPENDENT
                            if iii.responded
                            else FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT
                        )
            if behavior is not None:
                state.filtering = behavior
                self._events.append(FilteringDetermined(behavior))
                self._cancel(NatTest.FILTERING_III)
            elif failed is not None:
                state.error = state.error or f"filtering unknown: {failed}"
                state.filtering_failed = True
                self._cancel(NatTest.FILTERING_III)
        hairpin = outcomes.get(NatTest.HAIRPIN)
        if hairpin is not None and state.hairpinning is None:
            state.hairpinning = hairpin.responded
            self._events.append(HairpinningDetermined(hairpin.responded))
        if any(
            p.test in (NatTest.FILTERING_II, NatTest.FILTERING_III, NatTest.HAIRPIN)
            for p in self._pending.values()
        ):
            return
        # §4.3 mapping tests, now that nothing more depends on the filters being closed.
        if state.alternate is not None:
            self._phase = _Phase.MAPPING
            self._send(NatTest.MAPPING_II, self._local, (state.alternate[0], self._server[1]), now)
        else:
            self._after_mapping_phase(now)

    def _after_mapping(self, test: NatTest, outcome: _Outcome, now: float) -> None:
        """§4.3 tests II and III."""
        state = self._state
        if not outcome.responded or outcome.error is not None or outcome.mapped is None:
            problem = (outcome.error or "no mapped address") if outcome.responded else "no answer"
            state.error = (
                state.error or f"mapping unknown: {test.value} to the alternate address: {problem}"
            )
            self._after_mapping_phase(now)
            return
        behavior: MappingBehavior | None = None
        if test is NatTest.MAPPING_II:
            state.mapping_ii = outcome.mapped
            if outcome.mapped == state.mapped:
                # "If the XOR-MAPPED-ADDRESS in the Binding Response is the same as the test
                # I XOR-MAPPED-ADDRESS, the NAT currently has Endpoint-Independent Mapping."
                behavior = MappingBehavior.ENDPOINT_INDEPENDENT
            else:
                assert state.alternate is not None
                self._send(NatTest.MAPPING_III, self._local, state.alternate, now)
                return
        else:
            # "If the XOR-MAPPED-ADDRESS matches test II's, Address-Dependent Mapping;
            # otherwise Address and Port-Dependent Mapping."
            behavior = (
                MappingBehavior.ADDRESS_DEPENDENT
                if outcome.mapped == state.mapping_ii
                else MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
            )
        state.mapping = behavior
        self._events.append(MappingDetermined(behavior))
        self._after_mapping_phase(now)

    def _after_mapping_phase(self, now: float) -> None:
        state = self._state
        if not self._config.lifetime:
            self._complete()
            return
        if state.alternate is None or state.mapped is None:
            state.notes.append("binding lifetime not tested: no usable RFC 5780 server")
            self._complete()
            return
        self._phase = _Phase.LIFETIME
        self._lifetime_started = now
        self._lifetime_next(now)

    # --- §4.6 binding lifetime -----------------------------------------------------------

    def _lifetime_next(self, now: float) -> None:
        config = self._config
        schedule = config.lifetime_schedule
        if self._lifetime_index >= len(schedule):
            self._complete()
            return
        idle = schedule[self._lifetime_index]
        # Refresh, idle period, probe: each exchange can take up to the timeout.
        worst_end = now + 2 * config.timeout + idle
        if worst_end - self._lifetime_started > config.lifetime_budget:
            self._state.notes.append(
                f"binding lifetime: stopped before the {idle:g} s period "
                f"(budget {config.lifetime_budget:g} s)"
            )
            self._complete()
            return
        self._send(NatTest.LIFETIME_REFRESH, self._local, self._server, now)

    def _after_lifetime_refresh(self, outcome: _Outcome, now: float) -> None:
        if not outcome.responded or outcome.error is not None or outcome.mapped is None:
            self._state.notes.append(
                f"binding lifetime: refresh failed ({outcome.error or 'no answer'})"
            )
            self._complete()
            return
        # The idle period starts with the last packet through the mapping: this answer.
        self._lifetime_port = outcome.mapped[1]
        self._wake_at = now + self._config.lifetime_schedule[self._lifetime_index]

    def _send_lifetime_probe(self, now: float) -> None:
        assert self._secondary is not None
        idle = self._config.lifetime_schedule[self._lifetime_index]
        # §4.6: from the second socket, RESPONSE-PORT = the first socket's mapped port: the
        # answer goes to the NAT's address at that port and only gets through if the first
        # socket's mapping survived the idle period.
        self._send(
            NatTest.LIFETIME_PROBE,
            self._secondary,
            self._server,
            now,
            (ResponsePort(self._lifetime_port),),
            timeout_is_answer=True,
            idle=idle,
        )

    def _after_lifetime_probe(self, pending: _Pending, outcome: _Outcome, now: float) -> None:
        state = self._state
        if outcome.responded and outcome.error is not None:
            state.notes.append(f"binding lifetime not measured: probe failed ({outcome.error})")
            self._complete()
            return
        if outcome.responded and outcome.local != self._local:
            state.notes.append(
                "binding lifetime not measured: the server ignored RESPONSE-PORT (RFC 5780 §7.5)"
            )
            self._complete()
            return
        self._events.append(LifetimeProbed(pending.idle, outcome.responded))
        if outcome.responded:
            state.lifetime = pending.idle
            self._lifetime_index += 1
            self._lifetime_next(now)
            return
        state.lifetime_expired_after = pending.idle
        if state.lifetime is None:
            state.lifetime = 0.0
        self._complete()

    # --- the end -------------------------------------------------------------------------

    def _complete(self) -> None:
        for tid in list(self._pending):
            self._manager.cancel(tid)
        self._pending.clear()
        self._wake_at = None
        self._phase = _Phase.DONE
        s = self._state
        self._result = NatDiscoveryResult(
            server=self._server,
            local=self._local,
            mapped=s.mapped,
            other_address=s.other,
            response_origin=s.response_origin,
            software=s.software,
            mapping=s.mapping,
            filtering=s.filtering,
            hairpinning=s.hairpinning,
            lifetime=s.lifetime,
            lifetime_expired_after=s.lifetime_expired_after,
            nat_present=s.nat_present,
            udp_blocked=s.udp_blocked,
            error=s.error,
            notes=tuple(s.notes),
        )
        self._events.append(DiscoveryCompleted(self._result))


def _read_response(message: Message, remote: Address, local: Address) -> _Outcome:
    """Turn a response into an outcome: the mapped address, or what was wrong with it."""
    if message.message_class is MessageClass.ERROR:
        error = message.error
        text = f"{error.code} {error.reason}".strip() if error else "error without ERROR-CODE"
        return _Outcome(True, source=remote, error=text, local=local, message=message)
    unknown = message.unknown_comprehension_required()
    if unknown:
        # RFC 8489 §6.3.3 (via §6.3.4 for errors): unknown comprehension-required attributes
        # in a response fail the transaction.
        listed = ", ".join(f"{t:#06x}" for t in unknown)
        return _Outcome(
            True,
            source=remote,
            error=f"unknown comprehension-required attributes {listed}",
            local=local,
            message=message,
        )
    xor = message.get(XorMappedAddress)
    plain = message.get(MappedAddress)
    # RFC 8489 §14.2 XOR-MAPPED-ADDRESS; MAPPED-ADDRESS (§14.1) from servers of RFC 3489 age.
    mapped = xor.address if xor is not None else plain.address if plain is not None else None
    return _Outcome(
        True,
        mapped=_normalize(mapped) if mapped is not None else None,
        source=remote,
        local=local,
        message=message,
    )


def _read_server_attributes(state: _State, message: Message) -> None:
    """Test I's OTHER-ADDRESS (RFC 5780 §7.4), RESPONSE-ORIGIN (§7.3) and SOFTWARE."""
    other = message.get(OtherAddress)
    if other is None:
        # RFC 5780 §7.4: OTHER-ADDRESS is RFC 3489's CHANGED-ADDRESS renamed; a server that
        # still sends the old attribute answers CHANGE-REQUEST the old way too.
        changed = message.get(ChangedAddress)
        if changed is not None:
            state.other = _normalize(changed.address)
            state.notes.append("the server sent CHANGED-ADDRESS (RFC 3489), not OTHER-ADDRESS")
    else:
        state.other = _normalize(other.address)
    origin = message.get(ResponseOrigin)
    state.response_origin = _normalize(origin.address) if origin is not None else None
    software = message.get(Software)
    state.software = software.value if software is not None else None


def _filtering_problem(outcome: _Outcome, expected: Address, name: str) -> str | None:
    """Why a filtering test's answer cannot be used (None: it can, or it timed out)."""
    if not outcome.responded:
        return None
    if outcome.error is not None:
        return f"{name}: the server answered CHANGE-REQUEST with {outcome.error}"
    if outcome.source != expected:
        source = format_address(outcome.source) if outcome.source is not None else "?"
        return (
            f"{name}: the answer came from {source}, not {format_address(expected)}: "
            "the server did not honour CHANGE-REQUEST"
        )
    return None
