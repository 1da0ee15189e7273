"""The sans-I/O mDNS core on virtual time: registering and announcing, answering our own
names (multicast, QU unicast, legacy unicast, §6 rate limit, §7.1 known answers),
resolving with retries and a bounded timeout, learning from unsolicited announcements,
the cache-flush bit both ways, cache bounds, address filtering, and bad input."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.errors import LocalProtocolError
from tsunagu.mdns import (
    IPV4_DESTINATION,
    IPV6_DESTINATION,
    MdnsConfig,
    MdnsResponder,
    NameResolved,
    NameUnresolved,
    Transmit,
)
from tsunagu.mdns.dns import (
    FLAG_AA,
    FLAG_QR,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    DnsMessage,
    Question,
    ResourceRecord,
    address_record,
    decode_message,
    encode_message,
)
from tsunagu.mdns.events import MdnsEvent

PEER = ("192.0.2.50", 5353)
REMOTE_NAME = "0d6e1c2a-5b3f-4e8a-9c1d-2f3e4a5b6c7d.local"


def counter_bytes() -> Callable[[int], bytes]:
    """A deterministic stand-in for secrets.token_bytes: 00.., 01.., 02.., ..."""
    counter = itertools.count()
    return lambda size: bytes([next(counter) % 256]) * size


def make(**overrides: object) -> MdnsResponder:
    return MdnsResponder(MdnsConfig(**overrides), token_bytes=counter_bytes())  # type: ignore[arg-type]


def drain(core: MdnsResponder) -> list[Transmit]:
    out: list[Transmit] = []
    while (transmit := core.poll_transmit()) is not None:
        out.append(transmit)
    return out


def events(core: MdnsResponder) -> list[MdnsEvent]:
    out: list[MdnsEvent] = []
    while (event := core.poll_event()) is not None:
        out.append(event)
    return out


def query(*questions: Question, answers: tuple[ResourceRecord, ...] = (), ident: int = 0) -> bytes:
    return encode_message(DnsMessage(id=ident, questions=questions, answers=answers))


def response(*records: ResourceRecord) -> bytes:
    return encode_message(DnsMessage(flags=FLAG_QR | FLAG_AA, answers=records))


def run_until(core: MdnsResponder, end: float) -> list[tuple[float, Transmit]]:
    """Advance virtual time to ``end`` through the core's own deadlines (bounded)."""
    sent: list[tuple[float, Transmit]] = []
    for _ in range(1000):
        deadline = core.poll_timeout()
        if deadline is None or deadline > end:
            return sent
        core.handle_timeout(deadline)
        sent.extend((deadline, t) for t in drain(core))
    raise AssertionError("the core kept asking for timers")


# -- registering and announcing (§8.3) ------------------------------------------------------


def test_register_gives_a_random_uuid4_local_name_per_address() -> None:
    core = MdnsResponder()  # the real secrets-backed source
    name = core.register("192.0.2.1", now=0.0)
    assert name.endswith(".local")
    assert uuid.UUID(name.removesuffix(".local")).version == 4
    assert core.register("192.0.2.1", now=0.5) == name  # one name per address
    other = core.register("2001:db8::1", now=0.5)
    assert other != name
    assert core.names == {name: "192.0.2.1", other: "2001:db8::1"}


def test_register_announces_twice_one_second_apart() -> None:
    core = make(multicast_groups=(IPV4_DESTINATION, IPV6_DESTINATION))
    name = core.register("192.0.2.1", now=10.0)
    first = drain(core)
    assert [t.destination for t in first] == [IPV4_DESTINATION, IPV6_DESTINATION]
    message = decode_message(first[0].data)
    assert (message.id, message.flags, message.questions) == (0, FLAG_QR | FLAG_AA, ())
    (record,) = message.answers
    assert record == address_record(name, "192.0.2.1", 120, cache_flush=True)
    assert core.poll_timeout() == 11.0
    later = run_until(core, 100.0)
    assert [(when, t.destination) for when, t in later] == [
        (11.0, IPV4_DESTINATION),
        (11.0, IPV6_DESTINATION),
    ]
    assert core.poll_timeout() is None


def test_more_announcements_double_the_interval() -> None:
    core = make(announcements=4)
    core.register("192.0.2.1", now=0.0)
    drain(core)
    assert [when for when, _ in run_until(core, 100.0)] == [1.0, 3.0, 7.0]


def test_announcing_can_be_turned_off() -> None:
    core = make(announcements=0)
    core.register("192.0.2.1", now=0.0)
    assert drain(core) == [] and core.poll_timeout() is None


@pytest.mark.parametrize("ip", ["0.0.0.0", "224.0.0.251", "255.255.255.255", "::", "ff02::fb"])
def test_register_refuses_unusable_addresses(ip: str) -> None:
    with pytest.raises(LocalProtocolError):
        make().register(ip, 0.0)


def test_register_refuses_garbage_and_zones() -> None:
    core = make()
    for ip in ("not-an-ip", "fe80::1%eth0"):
        with pytest.raises(LocalProtocolError):
            core.register(ip, 0.0)


def test_a_random_source_that_repeats_is_detected() -> None:
    core = MdnsResponder(token_bytes=bytes)  # all zeros, every time
    core.register("192.0.2.1", 0.0)
    with pytest.raises(LocalProtocolError, match="repeating"):
        core.register("192.0.2.2", 0.0)


# -- answering queries (§5.4, §6, §6.7, §7.1) -----------------------------------------------


def registered(**overrides: object) -> tuple[MdnsResponder, str]:
    core = make(announcements=0, **overrides)
    return core, core.register("192.0.2.1", now=0.0)


def test_answers_a_query_for_its_name_by_multicast() -> None:
    core, name = registered()
    core.handle_datagram(query(Question(name, TYPE_A)), PEER, now=5.0)
    (transmit,) = drain(core)
    assert transmit.destination == IPV4_DESTINATION
    message = decode_message(transmit.data)
    assert message.answers == (address_record(name, "192.0.2.1", 120),)
    assert message.questions == ()  # §6: none in mDNS responses


def test_answers_over_ipv6_to_the_ipv6_group_and_any_type() -> None:
    core, name = registered()
    core.handle_datagram(query(Question(name.upper(), TYPE_ANY)), ("fe80::2%3", 5353), 5.0)
    (transmit,) = drain(core)
    assert transmit.destination == IPV6_DESTINATION
    assert decode_message(transmit.data).answers[0].address == "192.0.2.1"


def test_ignores_queries_for_other_names_and_types() -> None:
    core, name = registered()
    core.handle_datagram(query(Question(REMOTE_NAME, TYPE_A)), PEER, 5.0)
    core.handle_datagram(query(Question(name, TYPE_AAAA)), PEER, 5.0)  # we have no AAAA
    core.handle_datagram(query(Question(name, TYPE_A, qclass=3)), PEER, 5.0)  # CHAOS
    assert drain(core) == []


def test_answer_queries_off_is_an_announce_only_peer_like_chromium() -> None:
    core, name = registered(answer_queries=False)
    core.handle_datagram(query(Question(name, TYPE_A)), PEER, 5.0)
    assert drain(core) == []


def test_multicast_at_most_once_a_second_later_queries_get_unicast_then_multicast() -> None:
    core, name = registered()
    core.handle_datagram(query(Question(name, TYPE_A)), PEER, 5.0)
    assert [t.destination for t in drain(core)] == [IPV4_DESTINATION]
    for now in (5.2, 5.4, 5.6):  # three more queries within the second
        core.handle_datagram(query(Question(name, TYPE_A)), PEER, now)
        assert [t.destination for t in drain(core)] == [PEER]
    assert core.poll_timeout() == 6.0
    later = run_until(core, 10.0)
    assert [(when, t.destination) for when, t in later] == [(6.0, IPV4_DESTINATION)]


def test_query_right_after_an_announcement_waits_for_the_second() -> None:
    core = make(announcements=1)
    name = core.register("192.0.2.1", 0.0)
    drain(core)
    core.handle_datagram(query(Question(name, TYPE_A)), PEER, 0.3)
    (unicast,) = drain(core)
    assert unicast.destination == PEER
    assert decode_message(unicast.data).answers == (address_record(name, "192.0.2.1", 120),)
    assert core.poll_timeout() == 1.0
    assert [(when, t.destination) for when, t in run_until(core, 5.0)] == [(1.0, IPV4_DESTINATION)]


def test_qu_query_gets_a_unicast_answer_when_recently_multicast() -> None:
    core = make(announcements=1)
    name = core.register("192.0.2.1", 0.0)
    drain(core)
    core.handle_datagram(query(Question(name, TYPE_A, unicast_response=True)), PEER, 2.0)
    (transmit,) = drain(core)
    assert transmit.destination == PEER
    assert decode_message(transmit.data).answers[0].cache_flush


def test_qu_query_is_multicast_when_not_multicast_for_a_quarter_ttl() -> None:
    core, name = registered()  # never multicast
    core.handle_datagram(query(Question(name, TYPE_A, unicast_response=True)), PEER, 2.0)
    assert [t.destination for t in drain(core)] == [IPV4_DESTINATION]


def test_legacy_unicast_query_gets_id_question_short_ttl_and_no_flush_bit() -> None:
    core, name = registered()
    source = ("192.0.2.50", 40123)
    core.handle_datagram(query(Question(name, TYPE_A), ident=0x1234), source, 5.0)
    (transmit,) = drain(core)
    assert transmit.destination == source
    message = decode_message(transmit.data)
    assert message.id == 0x1234
    assert message.questions == (Question(name, TYPE_A),)
    assert message.answers == (address_record(name, "192.0.2.1", 10, cache_flush=False),)


def test_unicast_answers_are_rate_limited() -> None:
    core, name = registered(unicast_answer_rate=5.0)
    source = ("192.0.2.50", 40123)
    for _ in range(8):
        core.handle_datagram(query(Question(name, TYPE_A)), source, 5.0)
    assert len(drain(core)) == 5 and core.stats.rate_limited == 3
    core.handle_datagram(query(Question(name, TYPE_A)), source, 5.1)
    assert drain(core) == []  # 0.5 token: not yet
    core.handle_datagram(query(Question(name, TYPE_A)), source, 5.2)
    assert len(drain(core)) == 1  # one token back after 0.2 s at 5/s
    core.handle_datagram(query(Question(name, TYPE_A)), source, 100.0)
    assert len(drain(core)) == 1


def test_known_answer_suppression() -> None:
    core, name = registered()
    fresh = address_record(name, "192.0.2.1", 100)  # at least half of 120 left
    core.handle_datagram(query(Question(name, TYPE_A), answers=(fresh,)), PEER, 5.0)
    assert drain(core) == []
    stale = address_record(name, "192.0.2.1", 59)
    core.handle_datagram(query(Question(name, TYPE_A), answers=(stale,)), PEER, 5.0)
    assert len(drain(core)) == 1


def test_source_check_hook() -> None:
    core, name = registered(accept_source=lambda remote: remote[0].startswith("192.0.2."))
    core.handle_datagram(query(Question(name, TYPE_A)), ("198.51.100.1", 5353), 5.0)
    assert drain(core) == [] and core.stats.ignored == 1


# -- resolving (§5.2) -----------------------------------------------------------------------


def test_resolve_queries_retries_and_times_out() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=100.0)
    (first,) = drain(core)
    assert first.destination == IPV4_DESTINATION
    message = decode_message(first.data)
    assert not message.is_response and message.id == 0
    assert message.questions == (Question(REMOTE_NAME, TYPE_A), Question(REMOTE_NAME, TYPE_AAAA))
    sent = run_until(core, 1000.0)
    assert [when for when, _ in sent] == [101.0]  # 1 s after the first; the next is past 103
    assert events(core) == [NameUnresolved(REMOTE_NAME, "timeout")]
    assert core.poll_timeout() is None


def test_resolve_with_a_longer_timeout_doubles_the_gaps() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0, timeout=10.0)
    drain(core)
    assert [when for when, _ in run_until(core, 1000.0)] == [1.0, 3.0, 7.0]
    assert isinstance(core.poll_event(), NameUnresolved)


def test_resolve_completes_on_an_answer() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0)
    drain(core)
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 120)), PEER, 0.4)
    assert events(core) == [NameResolved(REMOTE_NAME, "192.0.2.7", ("192.0.2.7",))]
    assert core.poll_timeout() is None  # no more retries


def test_resolve_is_case_insensitive_and_keeps_the_callers_spelling() -> None:
    core = make()
    core.resolve(REMOTE_NAME.upper(), now=0.0)
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 120)), PEER, 0.4)
    (event,) = events(core)
    assert isinstance(event, NameResolved) and event.name == REMOTE_NAME.upper()


@pytest.mark.parametrize("cache_flush", [True, False])
def test_answers_are_accepted_with_or_without_the_cache_flush_bit(cache_flush: bool) -> None:
    """aioice insists on the bit and so fails against pion and Chromium; we do not."""
    core = make()
    core.resolve(REMOTE_NAME, now=0.0)
    record = address_record(REMOTE_NAME, "192.0.2.7", 120, cache_flush=cache_flush)
    core.handle_datagram(response(record), PEER, 0.1)
    assert events(core) == [NameResolved(REMOTE_NAME, "192.0.2.7", ("192.0.2.7",))]


def test_answers_in_the_additional_section_count() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0)
    data = encode_message(
        DnsMessage(
            flags=FLAG_QR | FLAG_AA,
            additionals=(address_record(REMOTE_NAME, "2001:db8::7", 120),),
        )
    )
    core.handle_datagram(data, PEER, 0.1)
    assert events(core) == [NameResolved(REMOTE_NAME, "2001:db8::7", ("2001:db8::7",))]


def test_responses_not_from_port_5353_are_ignored() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0)
    core.handle_datagram(
        response(address_record(REMOTE_NAME, "192.0.2.7", 120)), ("192.0.2.50", 5354), 0.1
    )
    assert events(core) == [] and core.stats.ignored == 1


def test_resolving_our_own_name_needs_no_network() -> None:
    core, name = registered()
    core.resolve(name, now=1.0)
    assert drain(core) == []
    assert events(core) == [NameResolved(name, "192.0.2.1", ("192.0.2.1",))]


def test_resolving_a_pending_name_again_extends_its_deadline_without_a_new_query() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0, timeout=2.0)
    drain(core)
    core.resolve(REMOTE_NAME, now=0.5, timeout=5.0)
    assert drain(core) == []
    run_until(core, 5.4)
    assert events(core) == []
    run_until(core, 5.5)
    assert events(core) == [NameUnresolved(REMOTE_NAME)]


@pytest.mark.parametrize("name", ["example.com", "local", "a..local", "x" * 64 + ".local"])
def test_resolve_refuses_names_that_are_not_mdns_names(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        make().resolve(name, 0.0)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("inf"), float("nan")])
def test_resolve_refuses_unbounded_timeouts(timeout: float) -> None:
    with pytest.raises(LocalProtocolError):
        make().resolve(REMOTE_NAME, 0.0, timeout=timeout)


def test_pending_resolutions_are_bounded() -> None:
    core = make(max_pending_resolutions=3)
    names = [f"{uuid.UUID(int=i, version=4)}.local" for i in range(5)]
    for name in names:
        core.resolve(name, 0.0)
    assert events(core) == [
        NameUnresolved(names[3], "too many pending resolutions"),
        NameUnresolved(names[4], "too many pending resolutions"),
    ]
    assert len(drain(core)) == 3


# -- the cache: unsolicited announcements, TTLs, flush, bounds (§10) ------------------------


def test_learns_from_an_unsolicited_announcement() -> None:
    """Chromium announces when it gathers and answers no query afterwards."""
    core = make()
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 120)), PEER, 1.0)
    assert events(core) == []  # nobody asked yet
    core.resolve(REMOTE_NAME, now=30.0)
    assert drain(core) == []  # no query needed
    assert events(core) == [NameResolved(REMOTE_NAME, "192.0.2.7", ("192.0.2.7",))]


def test_an_announcement_completes_a_pending_resolution() -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0)
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 120)), PEER, 0.9)
    assert isinstance(core.poll_event(), NameResolved)


def test_cached_records_expire_with_their_ttl() -> None:
    core = make()
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 10)), PEER, 0.0)
    assert core.lookup(REMOTE_NAME, 9.9) == ["192.0.2.7"]
    assert core.lookup(REMOTE_NAME, 10.0) == []


def test_claimed_ttls_are_capped() -> None:
    core = make(max_cache_ttl=60)
    record = address_record(REMOTE_NAME, "192.0.2.7", 0x7FFFFFFF)
    core.handle_datagram(response(record), PEER, 0.0)
    assert core.lookup(REMOTE_NAME, 60.0) == []


def test_goodbye_forgets_the_address_after_one_second() -> None:
    core = make()
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 120)), PEER, 0.0)
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 0)), PEER, 5.0)
    assert core.lookup(REMOTE_NAME, 5.5) == ["192.0.2.7"]
    assert core.lookup(REMOTE_NAME, 6.0) == []


def test_cache_flush_replaces_older_records_but_not_just_received_ones() -> None:
    core = make()
    old = address_record(REMOTE_NAME, "192.0.2.7", 120, cache_flush=False)
    core.handle_datagram(response(old), PEER, 0.0)
    # Without the bit, a second address is added.
    extra = address_record(REMOTE_NAME, "192.0.2.8", 120, cache_flush=False)
    core.handle_datagram(response(extra), PEER, 0.5)
    assert core.lookup(REMOTE_NAME, 0.6) == ["192.0.2.7", "192.0.2.8"]
    # With the bit, 3 s later: both older ones go; two flushed records in one message stay.
    new = [address_record(REMOTE_NAME, ip, 120) for ip in ("192.0.2.9", "192.0.2.10")]
    core.handle_datagram(response(*new), PEER, 3.0)
    assert core.lookup(REMOTE_NAME, 3.0) == ["192.0.2.9", "192.0.2.10"]


def test_cache_flush_keeps_the_other_address_family() -> None:
    core = make()
    core.handle_datagram(response(address_record(REMOTE_NAME, "2001:db8::7", 120)), PEER, 0.0)
    core.handle_datagram(response(address_record(REMOTE_NAME, "192.0.2.7", 120)), PEER, 5.0)
    assert core.lookup(REMOTE_NAME, 5.0) == ["2001:db8::7", "192.0.2.7"]


def test_cache_is_bounded_in_size_least_recently_updated_name_first() -> None:
    core = make(cache_size=4)
    names = [f"{uuid.UUID(int=i, version=4)}.local" for i in range(10)]
    for index, name in enumerate(names):
        core.handle_datagram(response(address_record(name, "192.0.2.7", 120)), PEER, index)
    assert [n for n in names if core.lookup(n, 10.0)] == names[6:]


def test_cache_bounds_addresses_per_name() -> None:
    core = make(max_addresses_per_name=2)
    records = [
        address_record(REMOTE_NAME, f"192.0.2.{i}", 120, cache_flush=False) for i in (1, 2, 3)
    ]
    core.handle_datagram(response(*records), PEER, 0.0)
    assert core.lookup(REMOTE_NAME, 0.0) == ["192.0.2.2", "192.0.2.3"]


def test_a_flood_of_announcements_stays_within_the_bounds() -> None:
    core = make(cache_size=16, max_addresses_per_name=2)
    for batch in range(40):
        records = [
            address_record(f"{uuid.UUID(int=batch * 50 + i, version=4)}.local", "192.0.2.7", 120)
            for i in range(50)
        ]
        core.handle_datagram(response(*records), PEER, float(batch))
    cached = sum(len(entries) for entries in core._cache.values())
    assert cached == core._cache_entries <= 16


def test_records_for_our_own_names_are_never_cached() -> None:
    core, name = registered()
    core.handle_datagram(response(address_record(name, "198.51.100.66", 120)), PEER, 1.0)
    assert core.lookup(name, 1.0) == ["192.0.2.1"]


def test_names_outside_local_are_not_cached() -> None:
    core = make()
    core.handle_datagram(response(address_record("evil.example", "192.0.2.7", 120)), PEER, 0.0)
    assert core.lookup("evil.example", 0.0) == []


UNUSABLE = [
    *("0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1"),
    *("::", "ff02::1", "::ffff:255.255.255.255", "::ffff:224.0.0.251", "::ffff:0.0.0.0"),
]


@pytest.mark.parametrize("ip", UNUSABLE)
def test_unusable_addresses_in_answers_are_dropped(ip: str) -> None:
    core = make()
    core.resolve(REMOTE_NAME, now=0.0)
    core.handle_datagram(response(address_record(REMOTE_NAME, ip, 120)), PEER, 0.1)
    assert events(core) == []
    assert core.stats.rejected_addresses == 1
    run_until(core, 10.0)
    assert events(core) == [NameUnresolved(REMOTE_NAME)]


def test_the_address_filter_hook_applies_to_answers() -> None:
    core = make(address_filter=lambda ip: not ip.startswith("127."))
    core.resolve(REMOTE_NAME, now=0.0)
    good = address_record(REMOTE_NAME, "192.0.2.7", 120, cache_flush=False)
    bad = address_record(REMOTE_NAME, "127.0.0.1", 120, cache_flush=False)
    core.handle_datagram(response(bad, good), PEER, 0.1)
    assert events(core) == [NameResolved(REMOTE_NAME, "192.0.2.7", ("192.0.2.7",))]


# -- goodbyes and closing (§10.1) -----------------------------------------------------------


def test_unregister_sends_a_goodbye() -> None:
    core, name = registered()
    core.unregister(name, 3.0)
    (transmit,) = drain(core)
    assert decode_message(transmit.data).answers == (address_record(name, "192.0.2.1", 0),)
    assert core.names == {}
    with pytest.raises(LocalProtocolError):
        core.unregister(name, 3.0)


def test_close_says_goodbye_and_ends_resolutions() -> None:
    core, name = registered()
    core.resolve(REMOTE_NAME, 1.0)
    drain(core)
    core.close(2.0)
    (goodbye,) = drain(core)
    assert decode_message(goodbye.data).answers[0].ttl == 0
    assert events(core) == [NameUnresolved(REMOTE_NAME, "closed")]
    assert core.poll_timeout() is None
    core.handle_datagram(query(Question(name, TYPE_A)), PEER, 3.0)
    assert drain(core) == []
    with pytest.raises(LocalProtocolError):
        core.register("192.0.2.2", 3.0)


# -- two cores on one virtual link -----------------------------------------------------------


def deliver(source: MdnsResponder, source_ip: str, *targets: MdnsResponder, now: float) -> None:
    for transmit in drain(source):
        for target in targets:
            target.handle_datagram(transmit.data, (source_ip, 5353), now)


def test_two_cores_resolve_each_other() -> None:
    a, b = make(announcements=0), make()
    name = a.register("192.0.2.1", 0.0)
    b.resolve(name, 0.0)
    deliver(b, "192.0.2.2", a, now=0.0)  # the query
    deliver(a, "192.0.2.1", b, now=0.0)  # the answer
    assert events(b) == [NameResolved(name, "192.0.2.1", ("192.0.2.1",))]


def test_a_lost_first_query_is_recovered_by_the_retry() -> None:
    a, b = make(announcements=0), make()
    name = a.register("192.0.2.1", 0.0)
    b.resolve(name, 0.0)
    drain(b)  # lost
    for when, transmit in run_until(b, 1.0):
        a.handle_datagram(transmit.data, ("192.0.2.2", 5353), when)
    deliver(a, "192.0.2.1", b, now=1.0)
    assert events(b) == [NameResolved(name, "192.0.2.1", ("192.0.2.1",))]


# -- bad input ------------------------------------------------------------------------------


def test_malformed_datagrams_are_counted_and_dropped() -> None:
    core, name = registered()
    loop = b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\xc0\x0c\x00\x01\x00\x01"
    for data in (b"", b"\x00" * 5, loop, query(Question(name, TYPE_A))[:-1]):
        core.handle_datagram(data, PEER, 1.0)
    assert core.stats.malformed == 4 and drain(core) == []


def test_non_zero_opcode_or_rcode_is_ignored() -> None:
    core, name = registered()
    for flags in (0x0800, 0x0003):
        data = encode_message(DnsMessage(flags=flags, questions=(Question(name, TYPE_A),)))
        core.handle_datagram(data, PEER, 1.0)
    assert drain(core) == [] and core.stats.ignored == 2


def test_the_transmit_queue_is_bounded() -> None:
    core = make(max_queued_transmits=2)
    for i in range(4):
        core.resolve(f"{uuid.UUID(int=i, version=4)}.local", 0.0)
    assert len(drain(core)) == 2 and core.stats.dropped_transmits == 2


@given(st.binary(max_size=300), st.sampled_from([5353, 40000]))
@settings(max_examples=400)
def test_no_datagram_makes_the_core_raise(data: bytes, port: int) -> None:
    core = make()
    core.register("192.0.2.1", 0.0)
    core.resolve(REMOTE_NAME, 0.0)
    core.handle_datagram(data, ("192.0.2.50", port), 0.5)
    core.handle_timeout(0.6)
