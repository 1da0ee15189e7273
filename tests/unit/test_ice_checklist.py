"""The RFC 8445 §6.1.2 check list: pair priority, pairing rules, pruning, the cap, initial
states, unfreezing by foundation, the triggered queue and §6.1.4.2 scheduling."""

from __future__ import annotations

from tsunagu.ice.candidate import Candidate, CandidateType, TcpType, TransportProtocol
from tsunagu.ice.checklist import CheckList, can_pair
from tsunagu.ice.pair import CandidatePair, LocalCandidate, PairState, pair_priority

UDP = TransportProtocol.UDP
TCP = TransportProtocol.TCP
HOST = CandidateType.HOST


def cand(
    address: str,
    port: int,
    *,
    foundation: str = "1",
    priority: int = 1000,
    component: int = 1,
    kind: CandidateType = HOST,
    transport: TransportProtocol = UDP,
    tcptype: TcpType | None = None,
) -> Candidate:
    return Candidate(
        foundation, component, transport, priority, address, port, kind, tcptype=tcptype
    )


def local(address: str, port: int, **kwargs: object) -> LocalCandidate:
    candidate = cand(address, port, **kwargs)  # type: ignore[arg-type]
    return LocalCandidate(candidate, candidate.transport_address)


def state_of(pair: CandidatePair) -> PairState:
    """Read through a call, so that mypy's narrowing of ``pair.state`` does not stick."""
    return pair.state


def test_pair_priority_formula_and_agreement_between_agents() -> None:
    g, d = 2130706431, 1694498815
    assert pair_priority(g, d) == (min(g, d) << 32) + 2 * max(g, d) + 1
    assert pair_priority(d, g) == (min(g, d) << 32) + 2 * max(g, d)
    # Both agents compute the same priority for the same pair, whatever their role.
    a = local("192.0.2.1", 1, priority=g)
    b = local("192.0.2.2", 2, priority=d)
    on_controlling = CandidatePair(a, b.candidate, controlling=True)
    on_controlled = CandidatePair(b, a.candidate, controlling=False)
    assert on_controlling.priority == on_controlled.priority
    on_controlling.update_priority(False)
    assert on_controlling.priority == pair_priority(d, g)


def test_pairing_rules() -> None:
    v4 = cand("192.0.2.1", 1)
    assert can_pair(v4, cand("198.51.100.1", 2))
    assert not can_pair(v4, cand("2001:db8::1", 2))
    assert not can_pair(v4, cand("198.51.100.1", 2, component=2))
    assert not can_pair(v4, cand("abc.local", 2))
    assert not can_pair(cand("fe80::1", 1), cand("2001:db8::1", 2))
    assert can_pair(cand("fe80::1", 1), cand("fe80::2", 2))
    assert not can_pair(cand("169.254.0.1", 1), v4)
    assert not can_pair(v4, cand("127.0.0.1", 2))
    assert can_pair(cand("127.0.0.1", 1), cand("127.0.0.2", 2))
    assert not can_pair(v4, cand("198.51.100.1", 2, transport=TCP, tcptype=TcpType.PASSIVE))
    active = cand("192.0.2.1", 9, transport=TCP, tcptype=TcpType.ACTIVE)
    passive = cand("198.51.100.1", 443, transport=TCP, tcptype=TcpType.PASSIVE)
    so = cand("198.51.100.1", 444, transport=TCP, tcptype=TcpType.SIMULTANEOUS_OPEN)
    assert can_pair(active, passive) and can_pair(passive, active)
    assert not can_pair(active, active) and not can_pair(active, so)
    assert can_pair(so, so)


def test_pairs_are_ordered_by_priority_and_pruned() -> None:
    checklist = CheckList(100, controlling=True)
    host = local("192.0.2.1", 1, priority=2000)
    low = checklist.add(host, cand("198.51.100.1", 2, priority=10))
    high = checklist.add(host, cand("198.51.100.2", 2, priority=3000))
    assert [p for p in checklist] == [high, low]
    # §6.1.2.4: a server-reflexive local candidate is replaced by its base: no own pairs.
    srflx = LocalCandidate(cand("203.0.113.1", 7, kind=CandidateType.SERVER_REFLEXIVE), host.base)
    assert checklist.add(srflx, cand("198.51.100.3", 2)) is None
    # Same base, same remote address: redundant; the higher priority pair is kept.
    assert checklist.add(host, cand("198.51.100.1", 2, priority=5)) is None
    better = checklist.add(host, cand("198.51.100.1", 2, priority=4000))
    assert better is not None and low not in list(checklist) and len(checklist) == 2
    assert checklist.find(1, UDP, host.base, ("198.51.100.1", 2)) is better


def test_the_cap_keeps_the_highest_priority_pairs() -> None:
    checklist = CheckList(3, controlling=True)
    host = local("192.0.2.1", 1, priority=2000)
    pairs = [checklist.add(host, cand("198.51.100.1", p, priority=p * 10)) for p in range(1, 6)]
    kept = list(checklist)
    assert len(kept) == 3
    assert kept == [pairs[4], pairs[3], pairs[2]]
    # A pair lower than everything kept is refused.
    assert checklist.add(host, cand("198.51.100.1", 99, priority=1)) is None
    # Checked pairs are never evicted by the cap.
    for pair in kept:
        checklist.set_state(pair, PairState.IN_PROGRESS)
    assert checklist.add(host, cand("198.51.100.1", 100, priority=10**6)) is None
    assert len(checklist) == 3


def test_initial_states_one_waiting_pair_per_foundation() -> None:
    checklist = CheckList(100, controlling=True)
    a1 = local("192.0.2.1", 1, foundation="A", priority=3000)
    a2 = local("192.0.2.1", 2, foundation="A", priority=2999, component=2)
    b1 = local("192.0.2.9", 1, foundation="B", priority=1000)
    remote1 = cand("198.51.100.1", 5, foundation="R", priority=3000)
    remote2 = cand("198.51.100.1", 6, foundation="R", priority=3000, component=2)
    p_a1 = checklist.add(a1, remote1)
    p_a2 = checklist.add(a2, remote2)
    p_b1 = checklist.add(b1, remote1)
    assert p_a1 and p_a2 and p_b1
    checklist.update_frozen()
    # §6.1.2.6: per foundation, the pair with the lowest component ID waits.
    assert p_a1.state is PairState.WAITING
    assert p_a2.state is PairState.FROZEN
    assert p_b1.state is PairState.WAITING
    # §7.2.5.3.3: a success unfreezes the pairs of its foundation.
    checklist.set_state(p_a1, PairState.SUCCEEDED)
    checklist.unfreeze_foundation(p_a1.foundation)
    assert state_of(p_a2) is PairState.WAITING


def test_scheduling_triggered_first_then_priority_then_unfreezing() -> None:
    changes: list[tuple[PairState, PairState]] = []
    checklist = CheckList(
        100, controlling=True, on_state=lambda p, old: changes.append((old, p.state))
    )
    host = local("192.0.2.1", 1, foundation="A", priority=3000)
    high = checklist.add(host, cand("198.51.100.1", 5, foundation="X", priority=3000))
    low = checklist.add(host, cand("198.51.100.2", 5, foundation="X", priority=10))
    assert high and low
    checklist.update_frozen()
    assert (high.state, low.state) == (PairState.WAITING, PairState.FROZEN)
    checklist.enqueue_triggered(low)
    assert state_of(low) is PairState.WAITING
    assert checklist.next_check() is low  # triggered queue first (§6.1.4.2)
    checklist.set_state(low, PairState.IN_PROGRESS)
    assert checklist.next_check() is high
    checklist.set_state(high, PairState.FAILED)
    checklist.set_state(low, PairState.FAILED)
    assert checklist.next_check() is None
    assert not checklist.has_pending()
    third = checklist.add(host, cand("198.51.100.3", 5, foundation="X", priority=20))
    assert third is not None and third.state is PairState.FROZEN
    # No Waiting pair and no active pair of the foundation: the Frozen one is unfrozen.
    assert checklist.next_check() is third
    assert (PairState.FROZEN, PairState.WAITING) in changes


def test_nomination_checks_keep_the_succeeded_state() -> None:
    checklist = CheckList(100, controlling=True)
    pair = checklist.add(local("192.0.2.1", 1), cand("198.51.100.1", 5))
    assert pair is not None
    checklist.set_state(pair, PairState.SUCCEEDED)
    pair.valid = pair.nominating = True
    checklist.enqueue_triggered(pair, nomination=True)
    assert pair.state is PairState.SUCCEEDED
    assert checklist.next_check() is pair


def test_role_change_recomputes_and_reorders() -> None:
    checklist = CheckList(100, controlling=True)
    a = checklist.add(local("192.0.2.1", 1, priority=100), cand("198.51.100.1", 5, priority=100))
    b = checklist.add(local("192.0.2.2", 1, priority=99), cand("198.51.100.2", 5, priority=101))
    assert a and b
    before = (a.priority, b.priority)
    checklist.set_role(False)
    assert (a.priority, b.priority) != before
    assert list(checklist) == sorted(checklist, key=lambda p: -p.priority)


def test_prune_component_after_nomination() -> None:
    checklist = CheckList(100, controlling=True)
    host1 = local("192.0.2.1", 1, foundation="A")
    host2 = local("192.0.2.1", 2, foundation="A", component=2)
    waiting = checklist.add(host1, cand("198.51.100.1", 5))
    running = checklist.add(host1, cand("198.51.100.2", 5))
    other = checklist.add(host2, cand("198.51.100.1", 6, component=2))
    assert waiting and running and other
    checklist.set_state(waiting, PairState.WAITING)
    checklist.set_state(running, PairState.IN_PROGRESS)
    checklist.enqueue_triggered(waiting)
    assert checklist.prune_component(1) == [running]
    assert waiting not in list(checklist) and not checklist.triggered
    assert other in list(checklist)
