"""RFC 8489 §6.2 client transactions: schedules, timeouts and RTO estimation."""

from __future__ import annotations

from typing import Any

import pytest

from tsunagu.errors import LocalProtocolError
from tsunagu.stun.transaction import TransactionConfig, TransactionManager, TransactionTimedOut

SERVER = ("192.0.2.1", 3478)
OTHER_SERVER = ("198.51.100.7", 3478)
TID = bytes(range(12))
TID2 = bytes(range(1, 13))
REQUEST = b"binding request"


def drain(manager: TransactionManager) -> list[tuple[bytes, tuple[str, int]]]:
    out = []
    while (item := manager.poll_transmit()) is not None:
        out.append(item)
    return out


def run(manager: TransactionManager, until: float) -> tuple[list[float], list[float]]:
    """Drive the manager like an event loop; return (send times, timeout-event times)."""
    sends: list[float] = []
    timeouts: list[float] = []
    now = 0.0
    while True:
        sends.extend(now for _ in drain(manager))
        while manager.poll_event() is not None:
            timeouts.append(now)
        deadline = manager.poll_timeout()
        if deadline is None or deadline > until:
            return sends, timeouts
        now = deadline
        manager.handle_timeout(now)


def test_default_udp_schedule_matches_rfc_8489_example() -> None:
    # RFC 8489 §6.2.1: "requests would be sent at times 0 ms, 500 ms, 1500 ms, 3500 ms,
    # 7500 ms, 15500 ms, and 31500 ms ... timed out after 39500 ms".
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    sends, timeouts = run(manager, until=100.0)
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert timeouts == [39.5]
    assert len(manager) == 0
    assert manager.poll_timeout() is None


def test_every_transmission_carries_the_request_to_the_remote() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 10.0)
    assert drain(manager) == [(REQUEST, SERVER)]
    manager.handle_timeout(10.5)
    assert drain(manager) == [(REQUEST, SERVER)]


def test_timeout_event_names_the_transaction() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    run(manager, until=39.4)
    assert manager.poll_event() is None
    manager.handle_timeout(39.5)
    assert manager.poll_event() == TransactionTimedOut(transaction_id=TID, remote=SERVER)
    assert manager.poll_event() is None
    assert TID not in manager


def test_custom_config_schedule() -> None:
    config = TransactionConfig(initial_rto=1.0, rc=3, rm=4)
    manager = TransactionManager(config)
    manager.start(TID, REQUEST, SERVER, 0.0)
    sends, timeouts = run(manager, until=100.0)
    assert sends == [0.0, 1.0, 3.0]
    assert timeouts == [7.0]


def test_single_request_config_waits_rm_rto() -> None:
    manager = TransactionManager(TransactionConfig(rc=1, rm=2))
    manager.start(TID, REQUEST, SERVER, 0.0)
    assert run(manager, until=100.0) == ([0.0], [1.0])


def test_response_stops_retransmissions() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    drain(manager)
    manager.handle_timeout(0.5)
    assert len(drain(manager)) == 1
    assert manager.handle_response(TID, 0.7) is True
    assert len(manager) == 0
    assert manager.poll_timeout() is None
    manager.handle_timeout(1000.0)
    assert drain(manager) == []
    assert manager.poll_event() is None


def test_duplicate_or_unknown_response_is_not_matched() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    assert manager.handle_response(TID2, 0.1) is False
    assert manager.handle_response(TID, 0.1) is True
    assert manager.handle_response(TID, 0.2) is False


def test_queued_retransmission_is_dropped_when_the_response_wins() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    drain(manager)
    manager.handle_timeout(0.5)  # retransmission queued, not yet pulled by the driver
    manager.handle_response(TID, 0.5)
    assert manager.poll_transmit() is None


def test_reliable_transport_sends_once_and_times_out_after_ti() -> None:
    # RFC 8489 §6.2.2: no STUN-level retransmission over TCP; Ti defaults to 39.5 s.
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0, reliable=True)
    assert manager.poll_timeout() == 39.5
    sends, timeouts = run(manager, until=100.0)
    assert sends == [0.0]
    assert timeouts == [39.5]


def test_reliable_response_gives_no_rtt_sample() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0, reliable=True)
    manager.handle_response(TID, 0.05)
    assert manager.current_rto(SERVER, 1.0) == 0.5


def test_fast_response_lowers_rto_for_next_transaction_to_same_ip() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    drain(manager)
    assert manager.handle_response(TID, 0.1)
    # RFC 6298 §2.2 first sample R = 0.1: SRTT = 0.1, RTTVAR = 0.05, RTO = 0.1 + 4 * 0.05.
    assert manager.current_rto(SERVER, 1.0) == pytest.approx(0.3)
    # The cache is keyed by IP address (§6.2.1), so another port of that server shares it.
    manager.start(TID2, REQUEST, (SERVER[0], 5349), 1.0)
    deadline = manager.poll_timeout()
    assert deadline is not None
    assert deadline == pytest.approx(1.3)
    # ... and a different server still starts from the initial RTO.
    assert manager.current_rto(OTHER_SERVER, 1.0) == 0.5


def test_cached_rto_drives_the_whole_schedule() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_response(TID, 0.25)  # SRTT 0.25, RTTVAR 0.125 -> RTO 0.75
    manager.start(TID2, REQUEST, SERVER, 0.0)
    sends, timeouts = run(manager, until=1000.0)
    rto = 0.75
    expected = [0.0] + [rto * (2**n - 1) for n in range(1, 7)]
    assert sends == pytest.approx(expected)
    assert timeouts == pytest.approx([rto * (63 + 16)])


def test_second_sample_is_smoothed_per_rfc_6298() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_response(TID, 0.2)  # SRTT 0.2, RTTVAR 0.1
    manager.start(TID2, REQUEST, SERVER, 1.0)
    manager.handle_response(TID2, 1.1)  # R' = 0.1
    rttvar = 0.75 * 0.1 + 0.25 * abs(0.2 - 0.1)
    srtt = 0.875 * 0.2 + 0.125 * 0.1
    assert manager.current_rto(SERVER, 2.0) == pytest.approx(srtt + 4 * rttvar)


def test_karn_rule_ignores_retransmitted_transactions() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_timeout(0.5)  # retransmitted: the response could answer either copy
    assert manager.handle_response(TID, 0.6)
    assert manager.current_rto(SERVER, 1.0) == 0.5


def test_karn_rule_keeps_an_existing_estimate_unchanged() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_response(TID, 0.1)
    manager.start(TID2, REQUEST, SERVER, 1.0)
    manager.handle_timeout(1.3)
    manager.handle_response(TID2, 1.35)
    assert manager.current_rto(SERVER, 2.0) == pytest.approx(0.3)


def test_rto_is_clamped() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_response(TID, 0.001)  # RFC 6298 would give 3 ms
    assert manager.current_rto(SERVER, 1.0) == 0.1
    manager.start(TID2, REQUEST, OTHER_SERVER, 0.0)
    manager.handle_response(TID2, 2.0)  # RFC 6298 would give 6 s
    assert manager.current_rto(OTHER_SERVER, 3.0) == 3.0


def test_cached_rto_expires_after_ten_idle_minutes() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_response(TID, 0.1)
    assert manager.current_rto(SERVER, 600.1) == pytest.approx(0.3)
    assert manager.current_rto(SERVER, 600.2) == 0.5
    manager.start(TID2, REQUEST, SERVER, 600.2)
    assert manager.poll_timeout() == pytest.approx(600.7)


def test_activity_keeps_the_cached_rto_alive() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_response(TID, 0.1)
    # A transaction that gives no sample (it times out) is still activity with the server.
    manager.start(TID2, REQUEST, SERVER, 500.0)
    while (deadline := manager.poll_timeout()) is not None:
        manager.handle_timeout(deadline)
    assert manager.poll_event() is not None
    assert manager.current_rto(SERVER, 1000.0) == pytest.approx(0.3)


def test_explicit_rto_overrides_the_cache() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0, rto=0.05)
    assert manager.poll_timeout() == pytest.approx(0.05)
    manager.handle_timeout(0.05)
    assert manager.poll_timeout() == pytest.approx(0.15)


def test_late_driver_retransmits_once_and_shifts_the_schedule() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    drain(manager)
    manager.handle_timeout(5.0)  # the 0.5, 1.5 and 3.5 s deadlines were all missed
    assert len(drain(manager)) == 1
    assert manager.poll_timeout() == 6.0  # second interval (2 * RTO) from when it fired


def test_many_transactions_interleave() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.start(TID2, b"other", OTHER_SERVER, 0.2)
    assert len(manager) == 2
    assert drain(manager) == [(REQUEST, SERVER), (b"other", OTHER_SERVER)]
    assert manager.poll_timeout() == 0.5
    manager.handle_timeout(0.5)
    assert drain(manager) == [(REQUEST, SERVER)]
    assert manager.poll_timeout() == pytest.approx(0.7)
    manager.handle_timeout(0.7)
    assert drain(manager) == [(b"other", OTHER_SERVER)]
    assert manager.poll_timeout() == 1.5


def test_cancel_forgets_without_an_event() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    assert manager.cancel(TID) is True
    assert manager.cancel(TID) is False
    assert manager.poll_transmit() is None  # the first transmission was still queued
    assert manager.poll_timeout() is None
    manager.handle_timeout(100.0)
    assert manager.poll_event() is None
    assert len(manager) == 0


def test_transaction_id_can_be_reused_after_it_ends() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    manager.handle_timeout(0.5)  # queue a retransmission of the first request
    manager.cancel(TID)
    manager.start(TID, b"second", SERVER, 0.6)
    assert drain(manager) == [(b"second", SERVER)]


def test_starting_a_running_transaction_is_misuse() -> None:
    manager = TransactionManager()
    manager.start(TID, REQUEST, SERVER, 0.0)
    with pytest.raises(LocalProtocolError):
        manager.start(TID, REQUEST, SERVER, 0.1)
    with pytest.raises(LocalProtocolError):
        manager.start(TID2, REQUEST, SERVER, 0.1, rto=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_rto": 0.0},
        {"rc": 0},
        {"rm": 0},
        {"reliable_timeout": -1.0},
        {"rto_min": 2.0, "rto_max": 1.0},
        {"rto_cache_lifetime": 0.0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TransactionConfig(**kwargs)
