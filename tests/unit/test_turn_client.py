"""The sans-I/O TURN client (RFC 8656) against scripted server answers built with the codec.

Every test drives :class:`TurnClientConnection` the way a driver would: feed bytes and time,
drain transmissions and events. The "server" here is a handful of helpers that decode the
client's requests and build the answers a real server would give.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.errors import (
    IntegrityError,
    LocalProtocolError,
    StunDecodeError,
    TransactionTimeoutError,
    TurnError,
)
from tsunagu.stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    AlternateDomain,
    AlternateServer,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    EvenPort,
    Icmp,
    Lifetime,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    Software,
    UnknownAttributes,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import AddressFamily, AttrType, MessageClass, Method
from tsunagu.stun.credentials import SecurityFeatures, long_term_key, userhash
from tsunagu.stun.framing import ChannelData, StreamFramer
from tsunagu.stun.message import Message, error_response, success_response
from tsunagu.stun.transaction import TransactionConfig
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import (
    ClientState,
    TurnClientConfig,
    TurnClientConnection,
)

SERVER = ("192.0.2.1", 3478)
ALT_SERVER = ("192.0.2.2", 3478)
RELAYED = ("192.0.2.1", 50000)
MAPPED = ("198.51.100.5", 40000)
PEER = ("203.0.113.9", 7000)
PEER2 = ("203.0.113.10", 7001)
USER = "alice"
PASSWORD = "secret"
REALM = "example.org"
KEY = long_term_key(USER, REALM, PASSWORD)


# --- the scripted server ---------------------------------------------------------------


def client_for(
    config: TurnClientConfig | None = None, *, stream: bool = False
) -> TurnClientConnection:
    counter = itertools.count()
    return TurnClientConnection(
        SERVER,
        USER,
        PASSWORD,
        stream=stream,
        config=config,
        token_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def sent(client: TurnClientConnection) -> list[bytes]:
    out = []
    while (transmit := client.poll_transmit()) is not None:
        out.append(transmit.data)
    return out


def sent_messages(client: TurnClientConnection) -> list[Message]:
    return [Message.decode(data) for data in sent(client) if data[0] < 4]


def only_request(client: TurnClientConnection) -> Message:
    messages = [m for m in sent_messages(client) if m.message_class is MessageClass.REQUEST]
    assert len(messages) == 1, messages
    return messages[0]


def events(client: TurnClientConnection) -> list[ev.TurnClientEvent]:
    out = []
    while (event := client.poll_event()) is not None:
        out.append(event)
    return out


def unauthorized(
    request: Message,
    *,
    realm: str = REALM,
    nonce: str = "nonce-1",
    extra: Iterable[Attribute] = (),
    code: int = 401,
) -> bytes:
    attributes: list[Attribute] = [Realm(realm), Nonce(nonce), *extra]
    return error_response(request, code, attributes=attributes).encode()


def answer(
    request: Message,
    attributes: Iterable[Attribute] = (),
    *,
    key: bytes | None = KEY,
    integrity: str = "sha1",
) -> bytes:
    response = success_response(request, attributes)
    if key is None:
        return response.encode()
    return response.encode(key, integrity="sha256" if integrity == "sha256" else "sha1")


def refuse(request: Message, code: int, attributes: Iterable[Attribute] = ()) -> bytes:
    return error_response(request, code, attributes=attributes).encode(KEY)


def allocate_ok(request: Message, lifetime: int = 600) -> bytes:
    return answer(
        request, [XorRelayedAddress(RELAYED), XorMappedAddress(MAPPED), Lifetime(lifetime)]
    )


def allocated_client(
    config: TurnClientConfig | None = None, *, stream: bool = False, lifetime: int = 600
) -> TurnClientConnection:
    if config is None:
        config = TurnClientConfig(keepalive_interval=None)  # keep timers to the RFC's
    client = client_for(config, stream=stream)
    client.allocate(0.0)
    first = only_request(client)
    feed(client, unauthorized(first), 0.01)
    second = only_request(client)
    feed(client, allocate_ok(second, lifetime), 0.02)
    assert isinstance(events(client)[0], ev.Allocated)
    return client


def feed(client: TurnClientConnection, data: bytes, now: float) -> None:
    if client._framer is not None:  # stream mode
        client.handle_stream_data(data, now)
    else:
        client.handle_datagram(data, now)


def run_until(client: TurnClientConnection, until: float) -> list[bytes]:
    """Fire timers up to ``until`` without answering anything; return what went out."""
    out = sent(client)
    for _ in range(1000):
        deadline = client.poll_timeout()
        if deadline is None or deadline > until:
            return out
        client.handle_timeout(deadline)
        out.extend(sent(client))
    raise AssertionError("timer loop did not settle")


def make_permission(client: TurnClientConnection, peer: tuple[str, int], now: float) -> None:
    """Answer the CreatePermission and ChannelBind that the first send_to to ``peer`` caused."""
    for message in sent_messages(client):
        if message.message_class is MessageClass.REQUEST:
            feed(client, answer(message), now)


# --- Allocate ------------------------------------------------------------------------------


def test_first_allocate_goes_without_credentials() -> None:
    client = client_for()
    client.allocate(0.0)
    request = only_request(client)
    assert request.method == Method.ALLOCATE
    assert request.get(RequestedTransport) == RequestedTransport(17)  # RFC 8656 §7.1: UDP
    assert request.get(Software) == Software("tsunagu")  # §5: SHOULD in Allocate
    # RFC 8489 §9.2.3.1: "the first request is sent as if there were no authentication".
    for kind in (Username, Realm, Nonce, MessageIntegrity, MessageIntegritySha256):
        assert request.get(kind) is None
    assert client.state is ClientState.ALLOCATING


def test_401_then_credentials_then_allocated() -> None:
    client = client_for(TurnClientConfig(keepalive_interval=None))
    client.allocate(0.0)
    first = only_request(client)
    feed(client, unauthorized(first), 0.1)
    second = only_request(client)
    assert second.transaction_id != first.transaction_id  # a new transaction (§9.2.5)
    assert second.get(Username) == Username(USER)
    assert second.get(Realm) == Realm(REALM)
    assert second.get(Nonce) == Nonce("nonce-1")
    assert second.get(MessageIntegrity) is not None
    assert second.verify_integrity(KEY)  # MD5 long-term key, HMAC-SHA1
    feed(client, allocate_ok(second), 0.2)
    (allocated,) = events(client)
    assert allocated == ev.Allocated(relayed=(RELAYED,), mapped=MAPPED, lifetime=600)
    assert client.state is ClientState.ALLOCATED
    assert client.relayed_address == RELAYED
    assert client.mapped_address == MAPPED
    # Refresh "roughly 1 minute before it expires" (RFC 8656 §8), timed from the request.
    assert client.poll_timeout() == pytest.approx(0.1 + 540)


def test_wrong_credentials_fail_with_401_and_no_retry() -> None:
    client = client_for()
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    feed(client, unauthorized(only_request(client), nonce="nonce-2"), 0.2)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert isinstance(failed.error, TurnError) and failed.error.code == 401
    assert sent(client) == []
    assert client.state is ClientState.FAILED
    assert client.poll_timeout() is None


def test_new_realm_in_a_second_401_is_a_change_worth_one_retry() -> None:
    client = client_for()
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    feed(client, unauthorized(only_request(client), realm="other.org"), 0.2)
    retry = only_request(client)
    assert retry.get(Realm) == Realm("other.org")
    assert retry.verify_integrity(long_term_key(USER, "other.org", PASSWORD))


def test_stale_nonce_retries_with_the_new_nonce_and_is_bounded() -> None:
    client = client_for(TurnClientConfig(max_challenges=3))
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)  # challenge 1: the expected 401
    request = only_request(client)
    for i in range(2):  # challenges 2 and 3: stale nonces, retried with the new one
        feed(client, unauthorized(request, nonce=f"fresh-{i}", code=438), 0.2 + i)
        request = only_request(client)
        assert request.get(Nonce) == Nonce(f"fresh-{i}")
        assert request.verify_integrity(KEY)
    feed(client, unauthorized(request, nonce="fresh-2", code=438), 3.0)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert isinstance(failed.error, TurnError) and failed.error.code == 438
    assert sent(client) == []


def _password_algorithms_nonce() -> str:
    return SecurityFeatures(password_algorithms=True).cookie() + "abcdef"


def test_sha256_password_algorithm_when_the_server_offers_it() -> None:
    client = client_for()
    client.allocate(0.0)
    offered = PasswordAlgorithms(((2, b""), (1, b"")))  # SHA-256 first, then MD5
    nonce = _password_algorithms_nonce()
    feed(client, unauthorized(only_request(client), nonce=nonce, extra=[offered]), 0.1)
    request = only_request(client)
    # RFC 8489 §9.2.5: echo PASSWORD-ALGORITHMS, pick the first supported, use -SHA256.
    assert request.get(PasswordAlgorithms) == offered
    assert request.get(PasswordAlgorithm) == PasswordAlgorithm(2)
    assert request.get(MessageIntegritySha256) is not None
    assert request.get(MessageIntegrity) is None
    sha_key = hashlib.sha256(f"{USER}:{REALM}:{PASSWORD}".encode()).digest()
    assert request.verify_integrity(sha_key)
    assert not request.verify_integrity(KEY)
    response = success_response(
        request, [XorRelayedAddress(RELAYED), XorMappedAddress(MAPPED), Lifetime(600)]
    ).encode(sha_key, integrity="sha256")
    feed(client, response, 0.2)
    assert isinstance(events(client)[0], ev.Allocated)
    assert client.password_algorithm == 2


def test_first_supported_algorithm_wins_even_if_it_is_md5() -> None:
    client = client_for()
    client.allocate(0.0)
    offered = PasswordAlgorithms(((0x7777, b"xyz"), (1, b""), (2, b"")))
    nonce = _password_algorithms_nonce()
    feed(client, unauthorized(only_request(client), nonce=nonce, extra=[offered]), 0.1)
    request = only_request(client)
    assert request.get(PasswordAlgorithm) == PasswordAlgorithm(1)
    assert request.get(MessageIntegritySha256) is not None  # still SHA-256 integrity
    assert request.verify_integrity(KEY)


def test_no_supported_password_algorithm_means_no_retry() -> None:
    client = client_for()
    client.allocate(0.0)
    offered = PasswordAlgorithms(((0x7777, b""),))
    nonce = _password_algorithms_nonce()
    feed(client, unauthorized(only_request(client), nonce=nonce, extra=[offered]), 0.1)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert sent(client) == []


def test_bid_down_401_without_password_algorithms_is_not_retried() -> None:
    client = client_for()
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client), nonce=_password_algorithms_nonce()), 0.1)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert "PASSWORD-ALGORITHMS" in str(failed.error)
    assert sent(client) == []


def test_username_anonymity_sends_userhash() -> None:
    client = client_for()
    client.allocate(0.0)
    nonce = SecurityFeatures(username_anonymity=True).cookie() + "zz"
    feed(client, unauthorized(only_request(client), nonce=nonce), 0.1)
    request = only_request(client)
    assert request.get(Username) is None
    assert request.get(Userhash) == Userhash(userhash(USER, REALM))


def test_alternate_server_redirects_and_loops_are_refused() -> None:
    client = client_for()
    client.allocate(0.0)
    first = only_request(client)
    redirect = error_response(
        first, 300, attributes=[AlternateServer(ALT_SERVER), AlternateDomain("turn2.example")]
    ).encode()
    feed(client, redirect, 0.1)
    assert events(client) == [ev.AlternateServer(ALT_SERVER, "turn2.example")]
    assert client.state is ClientState.REDIRECTED
    assert client.poll_timeout() is None
    client.allocate(0.2, server=ALT_SERVER)
    transmit = client.poll_transmit()
    assert transmit is not None and transmit.remote == ALT_SERVER
    second = Message.decode(transmit.data)
    assert second.get(Username) is None  # first request to a new server (§9.2.3.1)
    # Sent back to a server already tried within 5 minutes: "MUST ignore the redirection".
    feed(client, error_response(second, 300, attributes=[AlternateServer(SERVER)]).encode(), 0.3)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert isinstance(failed.error, TurnError) and failed.error.code == 300


def test_requested_address_family_and_dual_allocation() -> None:
    client = client_for(TurnClientConfig(address_family=AddressFamily.IPV6))
    client.allocate(0.0)
    assert only_request(client).get(RequestedAddressFamily) == RequestedAddressFamily(2)

    client = client_for(TurnClientConfig(dual_stack=True))
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    request = only_request(client)
    assert request.get(AdditionalAddressFamily) == AdditionalAddressFamily(2)
    assert request.get(RequestedAddressFamily) is None
    relayed6 = ("2001:db8::1", 50002)
    response = answer(
        request,
        [
            XorRelayedAddress(RELAYED),
            XorRelayedAddress(relayed6),
            XorMappedAddress(MAPPED),
            Lifetime(600),
        ],
    )
    feed(client, response, 0.2)
    (allocated,) = events(client)
    assert isinstance(allocated, ev.Allocated)
    assert allocated.relayed == (RELAYED, relayed6)
    assert client.relayed_addresses == (RELAYED, relayed6)


def test_partial_dual_allocation_reports_the_address_error() -> None:
    client = client_for(TurnClientConfig(dual_stack=True))
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    response = answer(
        only_request(client),
        [
            XorRelayedAddress(RELAYED),
            XorMappedAddress(MAPPED),
            Lifetime(600),
            AddressErrorCode(2, 440, "Address Family not Supported"),
        ],
    )
    feed(client, response, 0.2)
    (allocated,) = events(client)
    assert isinstance(allocated, ev.Allocated)
    ((family, error),) = allocated.address_errors
    assert family == 2 and isinstance(error, TurnError) and error.code == 440


def test_even_port_reservation_token_round_trip() -> None:
    client = client_for(TurnClientConfig(even_port=True, reserve_next_port=True))
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    request = only_request(client)
    assert request.get(EvenPort) == EvenPort(reserve=True)
    token = b"\x01" * 8
    response = answer(
        request,
        [
            XorRelayedAddress(RELAYED),
            XorMappedAddress(MAPPED),
            Lifetime(600),
            ReservationToken(token),
        ],
    )
    feed(client, response, 0.2)
    (allocated,) = events(client)
    assert isinstance(allocated, ev.Allocated) and allocated.reservation_token == token

    second = client_for(TurnClientConfig(reservation_token=token))
    second.allocate(0.0)
    request = only_request(second)
    assert request.get(ReservationToken) == ReservationToken(token)
    assert request.get(EvenPort) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"address_family": AddressFamily.IPV4, "dual_stack": True},
        {"reservation_token": b"x" * 8, "even_port": True},
        {"reserve_next_port": True},
        {"even_port": True, "reserve_next_port": True, "dual_stack": True},
        {"refresh_fraction": 1.0},
        {"keepalive_interval": 0.0},
    ],
)
def test_config_rejects_combinations_the_rfc_forbids(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TurnClientConfig(**kwargs)  # type: ignore[arg-type]


def test_dont_fragment_unsupported_retries_without_it() -> None:
    client = client_for(TurnClientConfig(dont_fragment=True, channels=False))
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    request = only_request(client)
    assert request.get(DontFragment) is not None
    unknown = UnknownAttributes((AttrType.DONT_FRAGMENT,))
    feed(client, refuse(request, 420, [unknown]), 0.2)
    retry = only_request(client)
    assert retry.get(DontFragment) is None  # RFC 8656 §7.4 (420)
    feed(client, allocate_ok(retry), 0.3)
    events(client)
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.1)
    (indication,) = [m for m in sent_messages(client) if m.method == Method.SEND]
    assert indication.get(DontFragment) is None


def test_dont_fragment_supported_goes_into_send_indications() -> None:
    client = allocated_client(TurnClientConfig(dont_fragment=True, channels=False))
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.1)
    (indication,) = [m for m in sent_messages(client) if m.method == Method.SEND]
    assert indication.get(DontFragment) is not None


@pytest.mark.parametrize("code", [403, 437, 440, 442, 486, 508])
def test_allocate_errors_are_typed(code: int) -> None:
    client = client_for()
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    feed(client, refuse(only_request(client), code), 0.2)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert isinstance(failed.error, TurnError)
    assert failed.error.code == code
    assert client.poll_timeout() is None


def test_lost_allocate_is_retransmitted_then_times_out_cleanly() -> None:
    client = client_for(TurnClientConfig(transaction=TransactionConfig(rc=3, rm=2)))
    client.allocate(0.0)
    first = sent(client)
    out = run_until(client, 100.0)
    assert out == first * 2  # RFC 8489 §6.2.1: same bytes at RTO and 3 RTO
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert isinstance(failed.error, TransactionTimeoutError)
    assert client.poll_timeout() is None  # nothing left to wait for: never a hang


def test_default_timeout_is_rfc_8489_39_5_seconds() -> None:
    client = client_for()
    client.allocate(0.0)
    run_until(client, 39.4)
    assert events(client) == []
    run_until(client, 39.5)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)


def test_tampered_success_is_discarded_and_reported_as_integrity_failure() -> None:
    client = client_for(TurnClientConfig(transaction=TransactionConfig(rc=2, rm=2)))
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    request = only_request(client)
    forged = answer(request, [XorRelayedAddress(RELAYED), Lifetime(600)], key=b"wrong" * 4)
    feed(client, forged, 0.2)
    assert events(client) == []
    assert client.stats.discarded == 1
    # Still retransmitting (RFC 8489 §9.2.5: "as if it had never been received") ...
    assert len(run_until(client, 0.7)) == 1
    run_until(client, 100.0)
    (failed,) = events(client)
    # ... and the end is reported as an integrity violation, not a timeout.
    assert isinstance(failed, ev.AllocationFailed) and isinstance(failed.error, IntegrityError)


def test_tampered_success_over_tcp_ends_the_transaction_at_once() -> None:
    client = client_for(stream=True)
    client.allocate(0.0)
    feed(client, unauthorized(only_request(client)), 0.1)
    request = only_request(client)
    feed(client, answer(request, [XorRelayedAddress(RELAYED)], key=None), 0.2)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed) and isinstance(failed.error, IntegrityError)


def test_unauthenticated_400_to_an_authenticated_request_is_ignored() -> None:
    client = allocated_client()
    client.close(1.0)
    request = only_request(client)
    feed(client, error_response(request, 400).encode(), 1.1)  # RFC 8489 §9.2.5
    assert events(client) == []
    assert client.state is ClientState.CLOSING


def test_success_with_cookie_but_without_algorithms_is_ignored() -> None:
    client = allocated_client()
    client.close(1.0)
    request = only_request(client)
    response = answer(request, [Nonce(_password_algorithms_nonce())])
    feed(client, response, 1.1)  # RFC 8489 §9.2.5: "the response MUST be ignored"
    assert events(client) == []


# --- Refresh and close ---------------------------------------------------------------------


def test_refresh_before_lifetime_ends() -> None:
    client = allocated_client()
    deadline = client.poll_timeout()
    assert deadline is not None and deadline == pytest.approx(0.01 + 540)
    client.handle_timeout(deadline)
    request = only_request(client)
    assert request.method == Method.REFRESH
    assert request.get(Lifetime) is None  # default lifetime asked for
    assert request.get(Username) == Username(USER) and request.verify_integrity(KEY)
    feed(client, answer(request, [Lifetime(600)]), deadline + 0.05)
    assert events(client) == [ev.AllocationRefreshed(600)]
    assert client.poll_timeout() == pytest.approx(deadline + 540)


def test_short_lifetime_refreshes_at_80_percent() -> None:
    client = allocated_client(lifetime=100)
    assert client.poll_timeout() == pytest.approx(0.01 + 80)


def test_requested_lifetime_goes_into_allocate_and_refresh() -> None:
    config = TurnClientConfig(requested_lifetime=1200, keepalive_interval=None)
    client = allocated_client(config, lifetime=1200)
    deadline = client.poll_timeout()
    assert deadline is not None
    client.handle_timeout(deadline)
    assert only_request(client).get(Lifetime) == Lifetime(1200)


def test_refresh_stale_nonce_is_retried() -> None:
    client = allocated_client()
    deadline = client.poll_timeout()
    assert deadline is not None
    client.handle_timeout(deadline)
    feed(client, unauthorized(only_request(client), nonce="n2", code=438), deadline + 0.1)
    retry = only_request(client)
    assert retry.get(Nonce) == Nonce("n2")
    feed(client, answer(retry, [Lifetime(600)]), deadline + 0.2)
    assert events(client) == [ev.AllocationRefreshed(600)]


def test_refresh_437_reallocates_and_tells_the_user() -> None:
    client = allocated_client()
    client.create_permission(PEER[0], 1.0)
    feed(client, answer(only_request(client)), 1.1)
    assert events(client) == [ev.PermissionCreated(PEER[0])]
    deadline = client.poll_timeout()
    assert deadline is not None
    client.handle_timeout(deadline)
    feed(client, refuse(only_request(client), 437), deadline + 0.1)
    (lost,) = events(client)
    assert isinstance(lost, ev.AllocationLost) and lost.reallocating
    assert isinstance(lost.error, TurnError) and lost.error.code == 437
    allocate = only_request(client)
    assert allocate.method == Method.ALLOCATE
    assert allocate.verify_integrity(KEY)  # cached credentials, no new 401 round trip
    client.send_to(b"dropped while reallocating", PEER, deadline + 0.15)
    assert client.stats.dropped == 1
    new_relayed = ("192.0.2.1", 50010)
    response = answer(
        allocate, [XorRelayedAddress(new_relayed), XorMappedAddress(MAPPED), Lifetime(600)]
    )
    feed(client, response, deadline + 0.2)
    (allocated,) = events(client)
    assert isinstance(allocated, ev.Allocated)
    assert allocated.reallocated and allocated.relayed == (new_relayed,)
    # The explicit permission is installed again on the new allocation.
    permission = only_request(client)
    assert permission.method == Method.CREATE_PERMISSION
    assert permission.get(XorPeerAddress) == XorPeerAddress((PEER[0], 0))


def test_server_gone_during_refresh_is_a_clear_event() -> None:
    config = TurnClientConfig(transaction=TransactionConfig(rc=2, rm=2), keepalive_interval=None)
    client = allocated_client(config)
    deadline = client.poll_timeout()
    assert deadline is not None
    run_until(client, deadline + 100)
    (lost,) = events(client)
    assert isinstance(lost, ev.AllocationLost) and not lost.reallocating
    assert isinstance(lost.error, TransactionTimeoutError)
    assert client.state is ClientState.FAILED
    assert client.poll_timeout() is None


def test_close_sends_lifetime_zero_and_reports_closed() -> None:
    client = allocated_client()
    client.close(5.0)
    request = only_request(client)
    assert request.method == Method.REFRESH
    assert request.get(Lifetime) == Lifetime(0)  # RFC 8656 §8.1
    assert request.verify_integrity(KEY)
    feed(client, answer(request, [Lifetime(0)]), 5.1)
    assert events(client) == [ev.Closed()]
    assert client.state is ClientState.CLOSED
    assert client.poll_timeout() is None
    client.close(6.0)  # idempotent
    assert sent(client) == []
    with pytest.raises(LocalProtocolError):
        client.send_to(b"x", PEER, 6.0)


def test_close_answered_437_counts_as_closed() -> None:
    client = allocated_client()
    client.close(5.0)
    feed(client, refuse(only_request(client), 437), 5.1)
    assert events(client) == [ev.Closed()]


def test_close_without_answer_reports_the_timeout() -> None:
    client = allocated_client(TurnClientConfig(transaction=TransactionConfig(rc=1, rm=1)))
    client.close(5.0)
    run_until(client, 100.0)
    (closed,) = events(client)
    assert isinstance(closed, ev.Closed) and isinstance(closed.error, TransactionTimeoutError)


def test_close_before_allocation_closes_at_once() -> None:
    client = client_for()
    client.allocate(0.0)
    sent(client)
    client.close(0.1)
    assert events(client) == [ev.Closed()]
    assert client.poll_timeout() is None


# --- permissions, Send indications, channels -----------------------------------------------


def test_first_send_creates_permission_then_indication_then_channel() -> None:
    client = allocated_client()
    client.send_to(b"hello", PEER, 1.0)
    client.send_to(b"again", PEER, 1.01)
    (create,) = sent_messages(client)
    assert create.method == Method.CREATE_PERMISSION
    assert create.get(XorPeerAddress) == XorPeerAddress((PEER[0], 0))
    assert create.verify_integrity(KEY)
    feed(client, answer(create), 1.1)
    messages = sent_messages(client)
    kinds = [(m.method, m.message_class) for m in messages]
    # Queued data flushed as Send indications; the peer has traffic, so ChannelBind starts.
    assert kinds == [
        (Method.CHANNEL_BIND, MessageClass.REQUEST),
        (Method.SEND, MessageClass.INDICATION),
        (Method.SEND, MessageClass.INDICATION),
    ]
    bind, first, second = messages
    assert bind.get(ChannelNumber) == ChannelNumber(0x4000)
    assert bind.get(XorPeerAddress) == XorPeerAddress(PEER)
    assert first.get(XorPeerAddress) == XorPeerAddress(PEER)
    assert (first.get(Data), second.get(Data)) == (Data(b"hello"), Data(b"again"))
    assert first.get(MessageIntegrity) is None  # indications are never authenticated (§5)
    assert events(client) == [ev.PermissionCreated(PEER[0])]
    assert client.has_permission(PEER[0])
    # Until the ChannelBind succeeds, data still goes in Send indications (§12).
    client.send_to(b"third", PEER, 1.15)
    (third,) = sent_messages(client)
    assert third.method == Method.SEND
    feed(client, answer(bind), 1.2)
    assert events(client) == [ev.ChannelBound(PEER, 0x4000)]
    assert client.channel_for(PEER) == 0x4000
    client.send_to(b"fourth", PEER, 1.3)
    (frame,) = sent(client)
    assert ChannelData.decode(frame) == ChannelData(0x4000, b"fourth")
    assert client.stats.sent_channel_data == 1
    assert client.stats.sent_indications == 3


def test_second_peer_gets_its_own_channel() -> None:
    client = allocated_client()
    client.send_to(b"a", PEER, 1.0)
    make_permission(client, PEER, 1.1)
    make_permission(client, PEER, 1.2)
    client.send_to(b"b", PEER2, 1.3)
    make_permission(client, PEER2, 1.4)
    binds = [m for m in sent_messages(client) if m.method == Method.CHANNEL_BIND]
    assert [b.get(ChannelNumber) for b in binds] == [ChannelNumber(0x4001)]


def test_without_channels_only_indications_are_used() -> None:
    client = allocated_client(TurnClientConfig(channels=False))
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.1)
    for i in range(3):
        client.send_to(b"y", PEER, 1.2 + i)
    messages = sent_messages(client)
    assert all(m.method == Method.SEND for m in messages) and len(messages) == 4


def test_permission_refused_403_drops_the_queue_and_says_why() -> None:
    client = allocated_client()
    client.send_to(b"x", PEER, 1.0)
    client.send_to(b"y", PEER, 1.0)
    feed(client, refuse(only_request(client), 403), 1.1)
    (failed,) = events(client)
    assert isinstance(failed, ev.PermissionFailed) and failed.peer_ip == PEER[0]
    assert isinstance(failed.error, TurnError) and failed.error.code == 403
    assert client.stats.dropped == 2
    assert sent(client) == []
    assert not client.has_permission(PEER[0])


def test_queue_per_peer_is_bounded() -> None:
    client = allocated_client(TurnClientConfig(max_queued_per_peer=2, channels=False))
    for i in range(5):
        client.send_to(bytes([i]), PEER, 1.0)
    assert client.stats.dropped == 3
    make_permission(client, PEER, 1.1)
    datas = [m.get(Data) for m in sent_messages(client)]
    assert datas == [Data(b"\x00"), Data(b"\x01")]


def test_437_to_create_permission_means_the_allocation_is_gone() -> None:
    client = allocated_client()
    client.send_to(b"x", PEER, 1.0)
    feed(client, refuse(only_request(client), 437), 1.1)
    (lost,) = events(client)
    assert isinstance(lost, ev.AllocationLost) and lost.reallocating
    assert only_request(client).method == Method.ALLOCATE


def test_channel_bind_failure_falls_back_to_indications() -> None:
    client = allocated_client()
    client.send_to(b"x", PEER, 1.0)
    feed(client, answer(only_request(client)), 1.1)
    bind = next(m for m in sent_messages(client) if m.method == Method.CHANNEL_BIND)
    feed(client, refuse(bind, 508), 1.2)
    events_ = events(client)
    assert isinstance(events_[-1], ev.ChannelBindFailed)
    client.send_to(b"y", PEER, 1.3)
    assert [m.method for m in sent_messages(client)] == [Method.SEND]


def test_explicit_permission_lets_a_peer_reach_us_first() -> None:
    client = allocated_client()
    client.create_permission(PEER[0], 1.0)
    feed(client, answer(only_request(client)), 1.1)
    indication = Message(
        Method.DATA,
        MessageClass.INDICATION,
        b"\x07" * 12,
        [XorPeerAddress(PEER), Data(b"from peer")],
    )
    feed(client, indication.encode(), 1.2)
    assert events(client) == [ev.PermissionCreated(PEER[0]), ev.DataReceived(b"from peer", PEER)]
    assert client.stats.received_indications == 1


def test_data_from_a_peer_without_permission_is_discarded() -> None:
    client = allocated_client()
    indication = Message(
        Method.DATA, MessageClass.INDICATION, b"\x07" * 12, [XorPeerAddress(PEER), Data(b"x")]
    )
    feed(client, indication.encode(), 1.0)
    no_peer = Message(Method.DATA, MessageClass.INDICATION, b"\x08" * 12, [Data(b"x")])
    feed(client, no_peer.encode(), 1.0)
    assert events(client) == []
    assert client.stats.discarded == 2


def test_channel_data_received_and_unknown_channels_dropped() -> None:
    client = allocated_client()
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.1)
    make_permission(client, PEER, 1.2)
    events(client)
    feed(client, ChannelData(0x4000, b"pong").encode(), 1.3)
    feed(client, ChannelData(0x4005, b"nobody").encode(), 1.3)
    assert events(client) == [ev.DataReceived(b"pong", PEER, 0x4000)]
    assert client.stats.received_channel_data == 1
    assert client.stats.discarded == 1


def test_icmp_in_data_indication_is_peer_unreachable() -> None:
    client = allocated_client()
    client.create_permission(PEER[0], 1.0)
    feed(client, answer(only_request(client)), 1.1)
    events(client)
    indication = Message(
        Method.DATA, MessageClass.INDICATION, b"\x07" * 12, [XorPeerAddress(PEER), Icmp(3, 3)]
    )
    feed(client, indication.encode(), 1.2)
    assert events(client) == [ev.PeerUnreachable(PEER, 3, 3)]


def test_ipv6_peers_are_normalised() -> None:
    client = allocated_client(TurnClientConfig(channels=False))
    client.send_to(b"x", ("2001:DB8:0:0::9", 5000), 1.0)
    create = only_request(client)
    assert create.get(XorPeerAddress) == XorPeerAddress(("2001:db8::9", 0))
    feed(client, answer(create), 1.1)
    (indication,) = sent_messages(client)
    assert indication.get(XorPeerAddress) == XorPeerAddress(("2001:db8::9", 5000))
    assert client.has_permission("2001:db8:0::9")
    with pytest.raises(LocalProtocolError):
        client.send_to(b"x", ("turn.example.org", 5000), 1.2)


def test_permission_and_channel_refresh_while_in_use() -> None:
    config = TurnClientConfig(keepalive_interval=None)
    client = allocated_client(config)
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.0)  # CreatePermission
    make_permission(client, PEER, 1.0)  # ChannelBind
    events(client)
    client.send_to(b"keep using it", PEER, 100.0)
    sent(client)
    # Permission: 300 s lifetime, refreshed at 240 s (RFC 8656 §9).
    assert client.poll_timeout() == pytest.approx(241.0)
    client.handle_timeout(241.0)
    refresh = only_request(client)
    assert refresh.method == Method.CREATE_PERMISSION
    feed(client, answer(refresh), 241.1)
    assert events(client) == []  # a refresh is not a new permission
    # Channel: 600 s lifetime, refreshed at 540 s when used (RFC 8656 §12); the permission's
    # next refresh (481 s) comes first and, unused since 241 s, lets it go stale.
    client.send_to(b"still here", PEER, 400.0)
    sent(client)
    client.handle_timeout(481.1)
    assert only_request(client).method == Method.CREATE_PERMISSION
    client.send_to(b"more", PEER, 500.0)
    sent(client)
    client.handle_timeout(541.0)
    rebinds = [m for m in sent_messages(client) if m.method == Method.CHANNEL_BIND]
    assert [m.get(ChannelNumber) for m in rebinds] == [ChannelNumber(0x4000)]


def test_idle_permission_expires_and_is_created_again_on_demand() -> None:
    client = allocated_client(TurnClientConfig(keepalive_interval=None, channels=False))
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.0)
    sent(client)
    events(client)
    client.handle_timeout(241.0)  # refresh time, unused: no request, permission goes stale
    assert sent(client) == []
    assert client.poll_timeout() == pytest.approx(301.0)
    client.handle_timeout(301.0)
    assert not client.has_permission(PEER[0])
    client.send_to(b"back", PEER, 302.0)
    assert only_request(client).method == Method.CREATE_PERMISSION


def test_stale_permission_used_again_is_refreshed_at_once() -> None:
    client = allocated_client(TurnClientConfig(keepalive_interval=None, channels=False))
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.0)
    sent(client)
    client.handle_timeout(241.0)
    client.send_to(b"late", PEER, 250.0)
    messages = sent_messages(client)
    assert [m.method for m in messages] == [Method.CREATE_PERMISSION, Method.SEND]


def test_keepalive_binding_indication_over_udp_only() -> None:
    client = allocated_client(TurnClientConfig(channels=False))
    assert client.poll_timeout() == pytest.approx(0.01 + 15)
    client.handle_timeout(15.01)
    (keepalive,) = sent_messages(client)
    assert (keepalive.method, keepalive.message_class) == (Method.BINDING, MessageClass.INDICATION)
    client.send_to(b"x", PEER, 20.0)
    make_permission(client, PEER, 20.0)
    sent(client)
    client.handle_timeout(30.01)  # something was sent 10 s ago: no keepalive yet
    assert sent(client) == []
    assert client.poll_timeout() == pytest.approx(35.0)
    tcp = allocated_client(TurnClientConfig(), stream=True)
    assert tcp.poll_timeout() == pytest.approx(0.01 + 540)


# --- stream transports ---------------------------------------------------------------------


def test_stream_mode_frames_split_input_and_pads_channel_data() -> None:
    client = client_for(stream=True)
    client.allocate(0.0)
    challenge = unauthorized(only_request(client))
    for i in range(len(challenge)):  # one byte at a time
        client.handle_stream_data(challenge[i : i + 1], 0.1)
    request = only_request(client)
    client.handle_stream_data(allocate_ok(request), 0.2)
    events(client)
    client.send_to(b"x", PEER, 1.0)
    make_permission(client, PEER, 1.1)
    make_permission(client, PEER, 1.2)
    client.send_to(b"abcde", PEER, 1.3)
    (frame,) = sent(client)
    assert len(frame) == 12  # 4 + 5, padded to a multiple of 4 (RFC 8656 §12.5)
    assert StreamFramer().feed(frame) == [frame]
    client.handle_stream_data(ChannelData(0x4000, b"xyz").encode(stream=True), 1.4)
    assert events(client)[-1] == ev.DataReceived(b"xyz", PEER, 0x4000)


def test_stream_requests_are_not_retransmitted() -> None:
    client = client_for(stream=True)
    client.allocate(0.0)
    assert len(run_until(client, 39.0)) == 1  # RFC 8489 §6.2.2: reliable, sent once
    run_until(client, 40.0)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed)
    assert isinstance(failed.error, TransactionTimeoutError)


def test_unframeable_stream_loses_the_allocation() -> None:
    client = allocated_client(stream=True)
    client.handle_stream_data(b"\xff\xff\xff\xff", 1.0)
    (lost,) = events(client)
    assert isinstance(lost, ev.AllocationLost) and isinstance(lost.error, StunDecodeError)
    assert client.state is ClientState.FAILED


def test_connection_lost_and_unreachable() -> None:
    client = allocated_client(stream=True)
    client.connection_lost(1.0)
    (lost,) = events(client)
    assert isinstance(lost, ev.AllocationLost)
    assert isinstance(lost.error, TurnError) and lost.error.code == 0

    client = client_for()
    client.allocate(0.0)
    sent(client)
    client.handle_unreachable("Connection refused", 0.01)
    (failed,) = events(client)
    assert isinstance(failed, ev.AllocationFailed) and "unreachable" in str(failed.error)
    assert client.poll_timeout() is None


def test_api_misuse_is_a_local_error() -> None:
    client = client_for()
    with pytest.raises(LocalProtocolError):
        client.send_to(b"x", PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        client.create_permission(PEER[0], 0.0)
    with pytest.raises(LocalProtocolError):
        client.handle_stream_data(b"x", 0.0)
    client.allocate(0.0)
    with pytest.raises(LocalProtocolError):
        client.allocate(0.0)
    allocated = allocated_client()
    with pytest.raises(LocalProtocolError):
        allocated.send_to(b"x" * 70000, PEER, 1.0)


def test_stray_and_foreign_messages_are_discarded() -> None:
    client = allocated_client()
    stray = success_response(Message(Method.REFRESH, MessageClass.REQUEST, b"\x09" * 12))
    feed(client, stray.encode(), 1.0)
    feed(client, b"\x80" + b"\x00" * 11, 1.0)  # RTP-looking
    feed(client, b"", 1.0)
    request = Message(Method.BINDING, MessageClass.REQUEST, b"\x01" * 12)
    feed(client, request.encode(), 1.0)
    assert events(client) == []
    assert client.stats.discarded == 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_from_the_server_never_raises(data: bytes) -> None:
    client = allocated_client()
    client.handle_datagram(data, 1.0)
    client.handle_datagram(b"\x00\x01" + data, 1.0)
    client.handle_datagram(b"\x40\x00" + data, 1.0)
    stream = allocated_client(stream=True)
    stream.handle_stream_data(data, 1.0)


def test_401_after_accepted_credentials_restarts_authentication_once() -> None:
    # A server that lost our nonce (say it restarted) answers 401 with a fresh one: the
    # credentials it accepted before are worth one more try, not two.
    client = allocated_client()
    client.close(5.0)
    feed(client, unauthorized(only_request(client), nonce="after-restart"), 5.1)
    retry = only_request(client)
    assert retry.get(Nonce) == Nonce("after-restart") and retry.verify_integrity(KEY)
    feed(client, unauthorized(retry, nonce="again"), 5.2)
    (closed,) = events(client)
    assert isinstance(closed, ev.Closed)
    assert isinstance(closed.error, TurnError) and closed.error.code == 401
