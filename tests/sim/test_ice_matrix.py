"""Issue 6 §2: ICE across the 9 x 9 NAT matrix of the default lab scenario, checked against
the theory table (:func:`tsunagu.nat.theory.direct_possible`, docs/nat.md).

STUN only: exactly the pairs theory allows connect (directly), the others fail cleanly
within the ICE timeout. With TURN: all 81 connect, directly whenever theory says a direct
path exists, through the relay otherwise. Everything runs on virtual time.
"""

from __future__ import annotations

import time

import pytest

from tsunagu.nat.theory import direct_possible
from tsunagu.sim.scenario import ICE_TIMEOUT, NAT_SPECS, ScenarioResult, run_matrix, run_scenario


def theory(result: ScenarioResult) -> bool:
    a_mapping, _, a_filtering = result.a.partition("/")
    b_mapping, _, b_filtering = result.b.partition("/")
    return direct_possible(a_mapping, a_filtering, b_mapping, b_filtering)


@pytest.fixture(scope="module")
def stun_only() -> list[ScenarioResult]:
    return run_matrix(turn=False)


@pytest.fixture(scope="module")
def with_turn() -> list[ScenarioResult]:
    return run_matrix(turn=True)


def test_matrix_covers_all_81_ordered_pairs(stun_only: list[ScenarioResult]) -> None:
    assert len(NAT_SPECS) == 9
    assert [(r.a, r.b) for r in stun_only] == [(a, b) for a in NAT_SPECS for b in NAT_SPECS]


def test_stun_only_connects_exactly_where_theory_allows(stun_only: list[ScenarioResult]) -> None:
    disagreements = [
        (r.a, r.b, r.outcome) for r in stun_only if (r.outcome == "direct") != theory(r)
    ]
    assert disagreements == []
    assert {r.outcome for r in stun_only} == {"direct", "failed"}
    assert sum(r.outcome == "direct" for r in stun_only) == 53


def test_stun_only_failures_are_clean_and_within_the_ice_timeout(
    stun_only: list[ScenarioResult],
) -> None:
    for result in stun_only:
        assert result.settled_after is not None, (result.a, result.b)
        assert result.settled_after <= ICE_TIMEOUT
        if result.outcome == "failed":
            assert result.selected is None and result.time_to_connect is None
        else:
            assert result.time_to_connect is not None and result.time_to_connect < 10.0
            assert result.selected is not None
            assert "relay" not in " ".join(result.selected)


def test_with_turn_all_connect_direct_when_possible_else_relayed(
    with_turn: list[ScenarioResult],
) -> None:
    expected = [("direct" if theory(r) else "relay") for r in with_turn]
    assert [r.outcome for r in with_turn] == expected
    assert sum(r.outcome == "relay" for r in with_turn) == 28
    for result in with_turn:
        assert result.turn
        assert result.selected is not None and result.time_to_connect is not None
        local, remote = result.selected
        assert ("relay" in local or "relay" in remote) is (result.outcome == "relay")


def test_scenario_replays_from_its_seed() -> None:
    spec = "address-and-port-dependent/address-and-port-dependent"
    first = run_scenario(spec, spec, turn=True, seed=3)
    assert first == run_scenario(spec, spec, turn=True, seed=3)
    assert first.outcome == "relay"


def test_whole_matrix_runs_in_seconds() -> None:
    started = time.perf_counter()
    run_matrix(turn=True)
    assert time.perf_counter() - started < 15.0
