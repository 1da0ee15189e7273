"""STUN client transactions (RFC 8489 §6.2) as a sans-I/O timer state machine.

:class:`TransactionManager` owns every outstanding request of one client: it decides when
each request is (re)transmitted, when a transaction has timed out, and what RTO to start the
next transaction to a server with. It never touches a socket or a clock: the driver passes
``now`` in and pulls ``poll_transmit()``, ``poll_event()`` and ``poll_timeout()`` out.

Over UDP (RFC 8489 §6.2.1) a request is sent at 0, RTO, 3·RTO, 7·RTO, ... (the interval
doubling each time) until Rc requests have gone out; Rm·RTO after the last one the
transaction times out. With the defaults: sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s,
timeout at 39.5 s. Over TCP/TLS (§6.2.2) the request is sent once and times out after Ti.

The RTO of each server is estimated as RFC 6298 describes, from transactions that were never
retransmitted (Karn's algorithm, RECOMMENDED by §6.2.1), and cached per server IP address
until no transaction has involved that server for 10 minutes.

Pacing -- §6.2's "SHOULD limit itself to ten outstanding transactions to the same server" and
ICE's Ta -- belongs to the caller, which knows the usage; this class tracks any number.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from tsunagu.errors import LocalProtocolError

__all__ = ["TransactionConfig", "TransactionManager", "TransactionTimedOut"]

Address = tuple[str, int]

# RFC 6298 §2: SRTT and RTTVAR gains and the variance multiplier.
_ALPHA = 1 / 8
_BETA = 1 / 4
_K = 4
# RFC 6298's clock granularity G. RFC 8489 §6.2.1 asks for 1 ms accuracy instead of whole
# seconds, so RTTVAR's share of the RTO never drops below 1 ms.
_GRANULARITY = 0.001


@dataclass(frozen=True, slots=True)
class TransactionConfig:
    """Every knob of RFC 8489 §6.2 client transactions, with its default."""

    initial_rto: float = 0.5
    """Seconds before the first retransmission when nothing is known about a server.
    §6.2.1: SHOULD be >= 500 ms; 500 ms is RECOMMENDED on fixed-line access links."""

    rc: int = 7
    """Total number of requests sent over UDP, the first included (§6.2.1 default)."""

    rm: int = 16
    """After the last request, wait ``rm`` times the RTO before giving up (§6.2.1 default),
    "providing ample time to get a response if only this final request actually succeeds"."""

    reliable_timeout: float = 39.5
    """Ti: seconds to wait for a response over TCP or TLS (§6.2.2 default), chosen to equal
    the UDP timeout with the default initial RTO."""

    rto_min: float = 0.1
    """Floor for a measured RTO. RFC 6298's 1 s floor is the "rounded up to the nearest
    second" that §6.2.1 overrides; 100 ms keeps a single fast sample on a LAN from turning
    retransmissions into a burst while still letting a close server be probed quickly."""

    rto_max: float = 3.0
    """Ceiling for a measured RTO: 3 s, the conservative initial RTO of RFC 2988 that RFC 5389
    referred to. It bounds the UDP transaction timeout at (2^(rc-1) - 1 + rm) · 3 s = 237 s
    with the defaults, however slow the samples were."""

    rto_cache_lifetime: float = 600.0
    """Seconds without any transaction to a server after which its cached RTO is discarded
    and ``initial_rto`` applies again (§6.2.1: "in the last 10 minutes")."""

    def __post_init__(self) -> None:
        if not self.initial_rto > 0:
            raise ValueError("initial_rto must be positive")
        if self.rc < 1:
            raise ValueError("rc must be at least 1")
        if self.rm < 1:
            raise ValueError("rm must be at least 1")
        if not self.reliable_timeout > 0:
            raise ValueError("reliable_timeout must be positive")
        if not 0 < self.rto_min <= self.rto_max:
            raise ValueError("need 0 < rto_min <= rto_max")
        if not self.rto_cache_lifetime > 0:
            raise ValueError("rto_cache_lifetime must be positive")


@dataclass(frozen=True, slots=True)
class TransactionTimedOut:
    """No response arrived in time (§6.2.1 after Rc requests and Rm·RTO; §6.2.2 after Ti)."""

    transaction_id: bytes
    remote: Address


@dataclass(slots=True)
class _RttEstimate:
    """RFC 6298 state for one server, keyed by its IP address."""

    srtt: float
    rttvar: float
    rto: float
    last_activity: float


@dataclass(eq=False, slots=True)
class _Transaction:
    transaction_id: bytes
    request: bytes
    remote: Address
    reliable: bool
    rto: float
    started: float
    deadline: float
    sends: int = 1
    done: bool = False
    generation: int = 0


class TransactionManager:
    """Client-side STUN transactions of one agent, over any number of servers."""

    def __init__(self, config: TransactionConfig | None = None) -> None:
        self._config = config if config is not None else TransactionConfig()
        self._transactions: dict[bytes, _Transaction] = {}
        self._rtt: dict[str, _RttEstimate] = {}
        # Deadlines as a heap of (deadline, tie-breaker, generation, transaction); an entry
        # whose generation no longer matches its transaction's is stale and skipped.
        self._timers: list[tuple[float, int, int, _Transaction]] = []
        self._order = itertools.count()
        # FIFOs of a few items between polls: lists, 700 B smaller than empty deques each.
        self._transmits: list[tuple[_Transaction, bytes, Address]] = []
        self._events: list[TransactionTimedOut] = []

    @property
    def config(self) -> TransactionConfig:
        """The configuration this manager was built with."""
        return self._config

    def __len__(self) -> int:
        """Number of outstanding transactions."""
        return len(self._transactions)

    def __contains__(self, transaction_id: object) -> bool:
        return transaction_id in self._transactions

    # --- inputs --------------------------------------------------------------------------

    def start(
        self,
        transaction_id: bytes,
        request: bytes,
        remote: Address,
        now: float,
        *,
        reliable: bool = False,
        rto: float | None = None,
    ) -> None:
        """Begin a transaction and queue its first transmission.

        ``reliable``: the request goes over TCP or TLS, so it is sent once and only the Ti
        timer runs (§6.2.2). ``rto``: use this RTO instead of the cached estimate, for usages
        that compute their own (ICE connectivity checks, RFC 8445 §14.3); RTT samples from the
        transaction still feed the cache.
        """
        if transaction_id in self._transactions:
            raise LocalProtocolError(f"transaction {transaction_id.hex()} is already running")
        if rto is not None and not rto > 0:
            raise LocalProtocolError("rto must be positive")
        if reliable:
            initial = self._config.reliable_timeout
            deadline = now + self._config.reliable_timeout
        else:
            initial = rto if rto is not None else self.current_rto(remote, now)
            deadline = now + self._wait_after(1, initial)
        tx = _Transaction(
            transaction_id=transaction_id,
            request=request,
            remote=remote,
            reliable=reliable,
            rto=initial,
            started=now,
            deadline=deadline,
        )
        self._transactions[transaction_id] = tx
        self._touch(remote, now)
        self._transmits.append((tx, request, remote))
        self._arm(tx)

    def handle_response(self, transaction_id: bytes, now: float) -> bool:
        """A response (success or error) with this transaction ID arrived.

        Returns True and ends the transaction if it was outstanding; False for a stray,
        duplicate or late response, which the caller discards (§6.3). Only the first response
        of a transaction that was sent exactly once yields an RTT sample (Karn's algorithm):
        with a retransmission, there is no telling which copy was answered.
        """
        tx = self._transactions.pop(transaction_id, None)
        if tx is None:
            return False
        self._finish(tx)
        sample = now - tx.started
        if not tx.reliable and tx.sends == 1 and sample >= 0:
            self._add_sample(tx.remote[0], sample, now)
        else:
            self._touch(tx.remote, now)
        return True

    def handle_timeout(self, now: float) -> None:
        """Fire every deadline at or before ``now``: retransmit, or time out.

        A transaction whose deadline passed retransmits once, however late the call is, and
        its next interval runs from ``now``: a late driver delays the schedule rather than
        bursting the missed copies onto the network.
        """
        while self._timers and self._timers[0][0] <= now:
            _, _, generation, tx = heapq.heappop(self._timers)
            if tx.done or generation != tx.generation:
                continue
            if tx.reliable or tx.sends >= self._config.rc:
                del self._transactions[tx.transaction_id]
                self._finish(tx)
                self._touch(tx.remote, now)
                self._events.append(TransactionTimedOut(tx.transaction_id, tx.remote))
                continue
            tx.sends += 1
            self._transmits.append((tx, tx.request, tx.remote))
            tx.deadline = now + self._wait_after(tx.sends, tx.rto)
            self._arm(tx)

    def cancel(self, transaction_id: bytes) -> bool:
        """Forget a transaction without an event (the caller gave up, or got an ICMP error).

        Returns whether it was outstanding. Transmissions already queued for it are dropped.
        """
        tx = self._transactions.pop(transaction_id, None)
        if tx is None:
            return False
        self._finish(tx)
        return True

    # --- outputs -------------------------------------------------------------------------

    def poll_transmit(self) -> tuple[bytes, Address] | None:
        """The next datagram to send, as (request bytes, remote address), or None."""
        while self._transmits:
            tx, data, remote = self._transmits.pop(0)
            if not tx.done:
                return data, remote
        return None

    def poll_event(self) -> TransactionTimedOut | None:
        """The next timeout event, or None."""
        return self._events.pop(0) if self._events else None

    def poll_timeout(self) -> float | None:
        """Absolute time of the next deadline, or None when nothing is outstanding."""
        while self._timers:
            deadline, _, generation, tx = self._timers[0]
            if not tx.done and generation == tx.generation:
                return deadline
            heapq.heappop(self._timers)
        return None

    def current_rto(self, remote: Address, now: float) -> float:
        """The RTO a new UDP transaction to ``remote`` would start with at ``now``."""
        estimate = self._rtt.get(remote[0])
        if estimate is None:
            return self._config.initial_rto
        if now - estimate.last_activity > self._config.rto_cache_lifetime:
            return self._config.initial_rto  # stale (§6.2.1); swept by _expire_estimates
        return estimate.rto

    # --- internals -----------------------------------------------------------------------

    def _wait_after(self, sends: int, rto: float) -> float:
        # §6.2.1: the interval after the n-th request is RTO·2^(n-1); after the Rc-th, Rm·RTO.
        if sends >= self._config.rc:
            return self._config.rm * rto
        return rto * (1 << (sends - 1))

    def _arm(self, tx: _Transaction) -> None:
        tx.generation += 1
        heapq.heappush(self._timers, (tx.deadline, next(self._order), tx.generation, tx))

    def _finish(self, tx: _Transaction) -> None:
        # Queued transmissions and heap entries are dropped lazily when they surface.
        tx.done = True

    def _touch(self, remote: Address, now: float) -> None:
        """Record activity with a server, keeping its cached RTO fresh (§6.2.1)."""
        self._expire_estimates(now)
        estimate = self._rtt.get(remote[0])
        if estimate is not None:
            estimate.last_activity = max(estimate.last_activity, now)

    def _expire_estimates(self, now: float) -> None:
        # Sweep so that a client which meets many servers once does not keep them all.
        lifetime = self._config.rto_cache_lifetime
        stale = [ip for ip, e in self._rtt.items() if now - e.last_activity > lifetime]
        for ip in stale:
            del self._rtt[ip]

    def _add_sample(self, ip: str, rtt: float, now: float) -> None:
        """Fold one RTT measurement into the server's estimate (RFC 6298 §2.2, §2.3)."""
        self._expire_estimates(now)
        estimate = self._rtt.get(ip)
        if estimate is None:
            srtt, rttvar = rtt, rtt / 2
        else:
            # RTTVAR is updated with the old SRTT, then SRTT (RFC 6298 §2.3 order).
            rttvar = (1 - _BETA) * estimate.rttvar + _BETA * abs(estimate.srtt - rtt)
            srtt = (1 - _ALPHA) * estimate.srtt + _ALPHA * rtt
        rto = srtt + max(_GRANULARITY, _K * rttvar)
        rto = min(max(rto, self._config.rto_min), self._config.rto_max)
        self._rtt[ip] = _RttEstimate(srtt=srtt, rttvar=rttvar, rto=rto, last_activity=now)
