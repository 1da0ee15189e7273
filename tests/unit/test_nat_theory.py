"""tsunagu.nat.theory: the STUN-only direct-connectivity table of docs/nat.md.

Checked three ways: known cells with their reasons, structural properties (symmetry, the
count, monotonicity in filtering), and an exhaustive comparison with a small abstract
packet model -- two single-host NATs with the mapping, filtering and conntrack-like flow
rules of tsunagu.sim.nat, and two minimal ICE agents -- that plays the exchange out instead
of reasoning about it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.nat.theory import NAT_TYPES, direct_possible

EIM = MappingBehavior.ENDPOINT_INDEPENDENT
ADM = MappingBehavior.ADDRESS_DEPENDENT
APDM = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
EIF = FilteringBehavior.ENDPOINT_INDEPENDENT
ADF = FilteringBehavior.ADDRESS_DEPENDENT
APDF = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT

Type = tuple[MappingBehavior, FilteringBehavior]
FULL_CONE: Type = (EIM, EIF)
RESTRICTED_CONE: Type = (EIM, ADF)
PORT_RESTRICTED_CONE: Type = (EIM, APDF)
SYMMETRIC: Type = (APDM, APDF)


def connects(a: Type, b: Type, first: str | None = None) -> bool:
    if first is None:
        return direct_possible(a[0], a[1], b[0], b[1])
    assert first in ("a", "b")
    return direct_possible(a[0], a[1], b[0], b[1], first="a" if first == "a" else "b")


def test_nine_types() -> None:
    assert len(NAT_TYPES) == 9 and len(set(NAT_TYPES)) == 9
    assert NAT_TYPES[0] == FULL_CONE and NAT_TYPES[-1] == SYMMETRIC


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # Anything connects to a full cone: its filter lets the other's first check in.
        (FULL_CONE, SYMMETRIC, True),
        (FULL_CONE, FULL_CONE, True),
        # Restricted cone vs symmetric: the symmetric side's new port is on an IP the cone
        # has written to.
        (RESTRICTED_CONE, SYMMETRIC, True),
        # Port-restricted cones punch through each other: both write to the other's s.
        (PORT_RESTRICTED_CONE, PORT_RESTRICTED_CONE, True),
        # ... but not a symmetric NAT, whose port the cone never wrote to.
        (PORT_RESTRICTED_CONE, SYMMETRIC, False),
        (PORT_RESTRICTED_CONE, (ADM, APDF), False),
        (PORT_RESTRICTED_CONE, (ADM, ADF), False),
        # Nor ADM/APDM with EIF (simultaneous checks): that side's answer to the cone is
        # pulled onto the mapping its own checks to the cone opened.
        (PORT_RESTRICTED_CONE, (APDM, EIF), False),
        (PORT_RESTRICTED_CONE, (ADM, EIF), False),
        # ... which a symmetric NAT does connect to: its checks come from a new port.
        (SYMMETRIC, (APDM, EIF), True),
        (SYMMETRIC, (ADM, EIF), True),
        ((ADM, EIF), (ADM, EIF), True),
        # Both sides change their mapping per destination and filter: no way in.
        (SYMMETRIC, SYMMETRIC, False),
        ((ADM, ADF), (ADM, ADF), False),
        ((ADM, ADF), SYMMETRIC, False),
    ],
)
def test_known_cells(a: Type, b: Type, expected: bool) -> None:
    assert connects(a, b) is expected
    assert connects(b, a) is expected


def test_symmetric_in_the_two_peers() -> None:
    for a, b in itertools.product(NAT_TYPES, repeat=2):
        assert connects(a, b) == connects(b, a), (a, b)
        assert connects(a, b, "a") == connects(b, a, "b"), (a, b)


def test_counts() -> None:
    pairs = list(itertools.product(NAT_TYPES, repeat=2))
    assert sum(connects(a, b) for a, b in pairs) == 53
    assert sum(connects(a, b, "a") for a, b in pairs) == 55
    # Going first only ever helps, and only in the two order-dependent cells.
    changed = {(a, b) for a, b in pairs if connects(a, b, "a") != connects(a, b)}
    assert changed == {(PORT_RESTRICTED_CONE, (ADM, EIF)), (PORT_RESTRICTED_CONE, (APDM, EIF))}
    # ... and only when the port-restricted cone's check is the one that arrives first.
    assert not any(connects(a, b, "b") for a, b in changed)


def test_row_summaries() -> None:
    def partners(t: Type) -> int:
        return sum(connects(t, other) for other in NAT_TYPES)

    assert partners(FULL_CONE) == partners(RESTRICTED_CONE) == 9
    assert partners(PORT_RESTRICTED_CONE) == 3
    assert partners((ADM, EIF)) == partners((APDM, EIF)) == 8
    for t in ((ADM, ADF), (ADM, APDF), (APDM, ADF), SYMMETRIC):
        assert partners(t) == 4


def test_more_permissive_filtering_never_hurts() -> None:
    order = [APDF, ADF, EIF]
    for (am, af), b in itertools.product(NAT_TYPES, NAT_TYPES):
        for looser in order[order.index(af) + 1 :]:
            if connects((am, af), b):
                assert connects((am, looser), b), ((am, af), looser, b)


def test_accepts_the_json_names() -> None:
    assert (
        direct_possible(
            "endpoint-independent",
            "address-and-port-dependent",
            "address-and-port-dependent",
            "address-and-port-dependent",
        )
        is False
    )
    with pytest.raises(ValueError, match="bogus"):
        direct_possible("bogus", "endpoint-independent", EIM, EIF)


# -- an abstract packet model ------------------------------------------------------------------

Addr = tuple[str, int]
SERVER: Addr = ("server", 3478)
LATENCY = 1.0  # one way, between any two NATs
RTO = 5.0  # check retransmission interval, doubling; far above LATENCY
RETRANSMITS = 7


@dataclass
class _Mapping:
    external: Addr
    permits: set[Addr] = field(default_factory=set)
    ips: set[str] = field(default_factory=set)


@dataclass
class _Nat:
    """One inside endpoint; rules of tsunagu.sim.nat (mapping, filtering, flows)."""

    ip: str
    mapping: MappingBehavior
    filtering: FilteringBehavior
    by_key: dict[object, _Mapping] = field(default_factory=dict)
    by_external: dict[Addr, _Mapping] = field(default_factory=dict)
    flows: dict[Addr, _Mapping] = field(default_factory=dict)
    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000))

    def send(self, remote: Addr) -> Addr:
        """The external source of a packet to ``remote``."""
        mapping = self.flows.get(remote)
        if mapping is None:
            key: object = {EIM: None, ADM: remote[0], APDM: remote}[self.mapping]
            mapping = self.by_key.get(key)
            if mapping is None:
                mapping = _Mapping((self.ip, next(self.ports)))  # no port preservation
                self.by_key[key] = mapping
                self.by_external[mapping.external] = mapping
        mapping.permits.add(remote)
        mapping.ips.add(remote[0])
        self.flows[remote] = mapping
        return mapping.external

    def admit(self, source: Addr, external: Addr) -> bool:
        mapping = self.by_external.get(external)
        if mapping is None:
            return False
        if self.filtering is ADF and source[0] not in mapping.ips:
            return False
        if self.filtering is APDF and source not in mapping.permits:
            return False
        self.flows.setdefault(source, mapping)  # replies leave the way this came in
        return True


def _play(a: Type, b: Type, start: dict[str, float]) -> bool:
    """Both agents gather s from the server, then check each other's s; True when both
    get a symmetric success response."""
    nats = {"a": _Nat("198.51.100.1", *a), "b": _Nat("198.51.100.2", *b)}
    peer = {"a": "b", "b": "a"}
    srflx = {side: nats[side].send(SERVER) for side in nats}
    remote = {side: {srflx[peer[side]]} for side in nats}
    pending: dict[int, tuple[str, Addr]] = {}
    succeeded = {"a": False, "b": False}
    # (time, order, kind, side, source, destination, transaction)
    queue: list[tuple[float, int, str, str, Addr, Addr, int]] = []
    order, transactions = itertools.count(), itertools.count()

    def check(side: str, target: Addr, now: float) -> None:
        tid = next(transactions)
        pending[tid] = (side, target)
        for n in range(RETRANSMITS):
            when = now + RTO * (2**n - 1)
            heapq.heappush(queue, (when, next(order), "send", side, target, target, tid))

    def transmit(side: str, kind: str, target: Addr, tid: int, now: float) -> None:
        source = nats[side].send(target)
        heapq.heappush(queue, (now + LATENCY, next(order), kind, side, source, target, tid))

    for side in nats:
        check(side, srflx[peer[side]], start[side])
    for _ in range(10_000):
        if not queue:
            break
        now, _, kind, side, source, target, tid = heapq.heappop(queue)
        if kind == "send":
            if tid in pending:
                transmit(side, "request", target, tid, now)
            continue
        receiver = peer[side]
        if not nats[receiver].admit(source, target):
            continue
        if kind == "request":
            if source not in remote[receiver]:  # peer-reflexive: triggered check
                remote[receiver].add(source)
                check(receiver, source, now)
            transmit(receiver, "response", source, tid, now)
        elif tid in pending:
            checker, destination = pending.pop(tid)
            succeeded[checker] |= source == destination  # RFC 8445 §7.2.5.2.1
    return succeeded["a"] and succeeded["b"]


@pytest.mark.parametrize("first", [None, "a", "b"])
def test_matches_the_abstract_model(first: str | None) -> None:
    # Simultaneous: both send at 0, before anything arrives (LATENCY > 0). First: the other
    # side starts after the first side's check has arrived (and been dropped or answered).
    late = 2 * LATENCY + 0.5
    start = {"a": late if first == "b" else 0.0, "b": late if first == "a" else 0.0}
    for a, b in itertools.product(NAT_TYPES, repeat=2):
        assert _play(a, b, start) == connects(a, b, first), (a, b, first)
