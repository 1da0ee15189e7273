"""The check list of one data stream (RFC 8445 §6.1.2): forming pairs, pruning, the cap,
initial states and unfreezing by foundation, the triggered-check queue, and choosing the
next check at each Ta tick (§6.1.4.2).

The check list holds state only; sending, timing and transactions are the agent's.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterator

from tsunagu.ice.candidate import Address, Candidate, CandidateType, TcpType, TransportProtocol
from tsunagu.ice.pair import CandidatePair, LocalCandidate, PairState

__all__ = ["CheckList", "can_pair", "is_ordinary"]

_PairKey = tuple[int, TransportProtocol, Address, Address]

# RFC 6544 §6.2: which TCP candidate types pair (local tcptype -> remote tcptype).
_TCP_PARTNER = {
    TcpType.ACTIVE: TcpType.PASSIVE,
    TcpType.PASSIVE: TcpType.ACTIVE,
    TcpType.SIMULTANEOUS_OPEN: TcpType.SIMULTANEOUS_OPEN,
}


@functools.lru_cache(maxsize=1024)
def _scope(ip: str) -> str:
    """Loopback, link-local, or global (anything else). Cached: asked for every pair."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "global"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    return "global"


def can_pair(local: Candidate, remote: Candidate) -> bool:
    """RFC 8445 §6.1.2.2: same component, transport and IP address family; a link-local
    address only with another one (the RFC's IPv6 rule, applied to 169.254/16 too), and a
    loopback address only with another one (neither reaches beyond its scope). RFC 6544
    §6.2 for TCP: active with passive, simultaneous-open with simultaneous-open."""
    if local.component != remote.component or local.transport is not remote.transport:
        return False
    if remote.is_mdns or local.is_ipv6 != remote.is_ipv6:
        return False
    if _scope(local.address) != _scope(remote.address):
        return False
    if local.transport is TransportProtocol.TCP:
        return local.tcptype is not None and _TCP_PARTNER[local.tcptype] is remote.tcptype
    return True


def is_ordinary(pair: CandidatePair) -> bool:
    """Whether the pair takes part in ordinary checks. RFC 6544 §7.1: an agent does not
    open connections from a passive TCP candidate; such pairs are checked only as
    triggered checks, on the connection the peer opened."""
    return pair.local.candidate.tcptype is not TcpType.PASSIVE


class CheckList:
    """Pairs ordered by priority, highest first, plus the triggered-check FIFO.

    ``max_pairs`` is the §6.1.2.5 limit: when a new pair would exceed it, the lowest-
    priority pair not yet checked is dropped (or the new one, if it is the lowest).
    ``on_state`` is called as ``on_state(pair, old_state)`` after every state change.
    """

    def __init__(
        self,
        max_pairs: int,
        controlling: bool,
        on_state: Callable[[CandidatePair, PairState], None] | None = None,
    ) -> None:
        if max_pairs < 1:
            raise ValueError("max_pairs must be at least 1")
        self.max_pairs = max_pairs
        self.controlling = controlling
        self.pairs: list[CandidatePair] = []
        self.triggered: list[CandidatePair] = []  # FIFO, short: a list is 700 B less
        self._index: dict[_PairKey, CandidatePair] = {}
        self._on_state = on_state

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[CandidatePair]:
        return iter(self.pairs)

    # -- states ---------------------------------------------------------------------------

    def set_state(self, pair: CandidatePair, state: PairState) -> None:
        old = pair.state
        if old is state:
            return
        pair.state = state
        if self._on_state is not None:
            self._on_state(pair, old)

    def count(self, *states: PairState) -> int:
        return sum(1 for pair in self.pairs if pair.state in states)

    # -- forming (§6.1.2.2 - §6.1.2.5) --------------------------------------------------------

    @staticmethod
    def _key(local: LocalCandidate, remote: Candidate) -> _PairKey:
        # §6.1.2.4: pairs are redundant when their local candidates have the same base and
        # their remote candidates the same address; so the key holds the base, not the
        # local candidate's own address (a server-reflexive candidate is replaced by it).
        return (
            local.component,
            local.candidate.transport,
            local.base,
            remote.transport_address,
        )

    def find(
        self, component: int, transport: TransportProtocol, base: Address, remote: Address
    ) -> CandidatePair | None:
        return self._index.get((component, transport, base, remote))

    def add(self, local: LocalCandidate, remote: Candidate) -> CandidatePair | None:
        """Add the pair (``local``, ``remote``) in the Frozen state; return it, or None if
        it is redundant with a better pair (§6.1.2.4) or lost to the cap (§6.1.2.5)."""
        if local.candidate.type is CandidateType.SERVER_REFLEXIVE:
            # §6.1.2.4: a server-reflexive local candidate is replaced by its base, whose
            # own pair (host candidate, same remote) makes this one redundant.
            return None
        key = self._key(local, remote)
        pair = CandidatePair(local, remote, self.controlling)
        existing = self._index.get(key)
        if existing is not None:
            if pair.priority <= existing.priority or existing.state not in (
                PairState.FROZEN,
                PairState.WAITING,
            ):
                return None
            self.remove(existing)
        if len(self.pairs) >= self.max_pairs:
            victim = self._lowest_unchecked()
            if victim is None or victim.priority >= pair.priority:
                return None
            self.remove(victim)
        self._insert(pair)
        self._index[key] = pair
        return pair

    def _lowest_unchecked(self) -> CandidatePair | None:
        for pair in reversed(self.pairs):
            if pair.state in (PairState.FROZEN, PairState.WAITING) and not pair.valid:
                return pair
        return None

    def _insert(self, pair: CandidatePair) -> None:
        pairs = self.pairs
        low, high = 0, len(pairs)
        while low < high:  # first index whose priority is lower than the new pair's
            mid = (low + high) // 2
            if pairs[mid].priority >= pair.priority:
                low = mid + 1
            else:
                high = mid
        pairs.insert(low, pair)

    def remove(self, pair: CandidatePair) -> None:
        self.pairs.remove(pair)
        key = self._key(pair.local, pair.remote)
        if self._index.get(key) is pair:
            del self._index[key]
        if pair in self.triggered:
            self.triggered.remove(pair)

    def replace_remote(self, old: Candidate, new: Candidate) -> None:
        """A signalled candidate turned out to be a known peer-reflexive one (RFC 8838
        §11.3 / RFC 8445 §7.3.1.3): keep the pairs and their state, take the new
        candidate's type and priority."""
        for pair in self.pairs:
            if pair.remote == old:
                pair.remote = new
                pair.update_priority(self.controlling)
        self.pairs.sort(key=lambda p: -p.priority)

    def set_role(self, controlling: bool) -> None:
        """Role switch (§7.2.5.1, §7.3.1.1): pair priorities depend on the role."""
        self.controlling = controlling
        for pair in self.pairs:
            pair.update_priority(controlling)
        self.pairs.sort(key=lambda p: -p.priority)

    # -- initial states and unfreezing (§6.1.2.6, §7.2.5.3.3) -----------------------------

    def update_frozen(self) -> None:
        """Give every foundation a pair to check (RFC 8445 §6.1.2.6).

        Foundations with a succeeded pair have all their Frozen pairs unfrozen
        (§7.2.5.3.3). Each other foundation with no Waiting or In-Progress pair gets its
        Frozen pair with the lowest component ID (then highest priority) set to Waiting --
        the initial states of §6.1.2.6, applied as trickled pairs arrive (RFC 8838 §10)."""
        succeeded: set[tuple[str, str]] = set()
        active: set[tuple[str, str]] = set()
        for pair in self.pairs:
            if not is_ordinary(pair):
                continue
            if pair.state is PairState.SUCCEEDED:
                succeeded.add(pair.foundation)
            elif pair.state in (PairState.WAITING, PairState.IN_PROGRESS):
                active.add(pair.foundation)
        best: dict[tuple[str, str], CandidatePair] = {}
        for pair in self.pairs:  # highest priority first
            if pair.state is not PairState.FROZEN or not is_ordinary(pair):
                continue
            foundation = pair.foundation
            if foundation in succeeded:
                self.set_state(pair, PairState.WAITING)
            elif foundation not in active:
                chosen = best.get(foundation)
                if chosen is None or pair.component < chosen.component:
                    best[foundation] = pair
        for pair in best.values():
            self.set_state(pair, PairState.WAITING)

    def unfreeze_foundation(self, foundation: tuple[str, str]) -> None:
        """§7.2.5.3.3: after a success, Frozen pairs with the same foundation wait."""
        for pair in self.pairs:
            if pair.state is PairState.FROZEN and pair.foundation == foundation:
                self.set_state(pair, PairState.WAITING)

    # -- scheduling (§6.1.4.2, §7.3.1.4) ------------------------------------------------------

    def enqueue_triggered(self, pair: CandidatePair, *, nomination: bool = False) -> None:
        """§7.3.1.4: put the pair in the triggered-check queue, in the Waiting state.

        ``nomination``: the controlling agent repeats a check on a valid pair with
        USE-CANDIDATE (§8.1.1); the pair keeps its Succeeded state meanwhile."""
        if not nomination:
            self.set_state(pair, PairState.WAITING)
        if pair not in self.triggered:
            self.triggered.append(pair)

    def next_check(self) -> CandidatePair | None:
        """The pair to check at this Ta tick (§6.1.4.2), or None: the head of the
        triggered queue; else the highest-priority Waiting pair; else, after unfreezing one
        pair per idle foundation, the highest-priority Waiting pair."""
        while self.triggered:
            pair = self.triggered.pop(0)
            if pair.state is PairState.WAITING or (
                pair.nominating and pair.state is PairState.SUCCEEDED
            ):
                return pair
        for attempt in range(2):
            for pair in self.pairs:
                if pair.state is PairState.WAITING and is_ordinary(pair):
                    return pair
            if attempt == 0:
                self.update_frozen()
        return None

    def has_pending(self) -> bool:
        """Whether any pair still waits for a check (Frozen, Waiting or triggered)."""
        return bool(self.triggered) or any(
            pair.state in (PairState.FROZEN, PairState.WAITING) and is_ordinary(pair)
            for pair in self.pairs
        )

    def prune_component(self, component: int) -> list[CandidatePair]:
        """§8.1.2: once a pair of ``component`` is nominated, its Frozen and Waiting pairs
        are removed. Returns the In-Progress pairs of the component, whose retransmissions
        the agent stops."""
        in_progress: list[CandidatePair] = []
        for pair in list(self.pairs):
            if pair.component != component or pair.valid:
                continue
            if pair.state in (PairState.FROZEN, PairState.WAITING):
                self.remove(pair)
            elif pair.state is PairState.IN_PROGRESS:
                in_progress.append(pair)
        return in_progress
