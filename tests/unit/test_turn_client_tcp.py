"""The client side of RFC 6062 (TURN TCP allocations), sans-I/O, against scripted answers.

The control connection is :class:`TurnClientConnection` with ``requested_transport="tcp"``
(Allocate, Connect, ConnectionAttempt, permissions, refresh, close); each data connection is a
:class:`DataConnection` (the ConnectionBind handshake). The tests feed bytes and time as a
driver would and assert what goes out and which events come back.
"""

from __future__ import annotations

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
    Attribute,
    ConnectionId,
    DontFragment,
    EvenPort,
    Lifetime,
    MessageIntegrity,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.credentials import SecurityFeatures, long_term_key
from tsunagu.stun.message import Message, error_response, success_response
from tsunagu.stun.transaction import TransactionConfig
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import (
    CONNECT_RETRY_DELAY,
    PERMISSION_LIFETIME,
    ClientState,
    TurnClientConfig,
    TurnClientConnection,
)
from tsunagu.turn.tcp_client import DataConnection, DataConnectionState

SERVER = ("192.0.2.1", 3478)
RELAYED = ("192.0.2.1", 50000)
MAPPED = ("198.51.100.5", 40000)
PEER = ("203.0.113.9", 7000)
USER = "alice"
PASSWORD = "secret"
REALM = "example.org"
KEY = long_term_key(USER, REALM, PASSWORD)
CID = 0x12345678
TCP = TurnClientConfig(requested_transport="tcp")


# --- the scripted server ---------------------------------------------------------------


def tokens() -> itertools.count[int]:
    return itertools.count(1)


def control(config: TurnClientConfig = TCP) -> TurnClientConnection:
    counter = tokens()
    return TurnClientConnection(
        SERVER,
        USER,
        PASSWORD,
        stream=True,
        config=config,
        token_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def requests(client: TurnClientConnection) -> list[Message]:
    out = []
    while (transmit := client.poll_transmit()) is not None:
        message = Message.decode(transmit.data)
        if message.message_class is MessageClass.REQUEST:
            out.append(message)
    return out


def only_request(client: TurnClientConnection) -> Message:
    out = requests(client)
    assert len(out) == 1, out
    return out[0]


def events(client: TurnClientConnection | DataConnection) -> list[object]:
    out: list[object] = []
    while (event := client.poll_event()) is not None:
        out.append(event)
    return out


def answer(request: Message, attributes: Iterable[Attribute] = ()) -> bytes:
    return success_response(request, attributes).encode(KEY)


def refuse(request: Message, code: int) -> bytes:
    return error_response(request, code).encode(KEY)


def challenge(request: Message, code: int = 401, nonce: str = "nonce-1") -> bytes:
    return error_response(request, code, attributes=[Realm(REALM), Nonce(nonce)]).encode()


def allocated(config: TurnClientConfig = TCP) -> TurnClientConnection:
    client = control(config)
    client.allocate(0.0)
    client.handle_stream_data(challenge(only_request(client)), 0.01)
    request = only_request(client)
    ok = [XorRelayedAddress(RELAYED), XorMappedAddress(MAPPED), Lifetime(600)]
    client.handle_stream_data(answer(request, ok), 0.02)
    assert isinstance(events(client)[0], ev.Allocated)
    return client


def with_permission(client: TurnClientConnection, ip: str = PEER[0]) -> None:
    client.create_permission(ip, 0.1)
    client.handle_stream_data(answer(only_request(client)), 0.1)
    assert events(client) == [ev.PermissionCreated(ip)]


def connect_request(client: TurnClientConnection, peer: tuple[str, int] = PEER) -> Message:
    client.connect(peer, 1.0)
    request = only_request(client)
    assert request.method == Method.CONNECT
    return request


def attempt(peer: tuple[str, int] = PEER, connection_id: int = CID) -> bytes:
    indication = Message(
        Method.CONNECTION_ATTEMPT,
        MessageClass.INDICATION,
        b"\x07" * 12,
        [XorPeerAddress(peer), ConnectionId(connection_id)],
    )
    return indication.encode()


def bound_handshake(client: TurnClientConnection | None = None) -> DataConnection:
    client = client if client is not None else allocated()
    data = client.bind_connection(CID, PEER)
    data.connection_made(5.0)
    return data


def bind_request(data: DataConnection) -> Message:
    raw = data.poll_transmit()
    assert raw is not None and data.poll_transmit() is None
    request = Message.decode(raw)
    assert request.method == Method.CONNECTION_BIND
    assert request.message_class is MessageClass.REQUEST
    return request


# --- Allocate (RFC 6062 §4.1) ----------------------------------------------------------


def test_allocate_asks_for_tcp() -> None:
    client = control()
    client.allocate(0.0)
    request = only_request(client)
    assert request.get(RequestedTransport) == RequestedTransport(6)
    assert client.is_tcp_allocation


def test_tcp_allocation_options_are_checked() -> None:
    # RFC 6062 §4.1: no DONT-FRAGMENT, EVEN-PORT or RESERVATION-TOKEN in the request.
    for bad in (
        {"dont_fragment": True},
        {"even_port": True},
        {"reservation_token": b"12345678"},
    ):
        with pytest.raises(ValueError, match="TCP allocation"):
            TurnClientConfig(requested_transport="tcp", **bad)
    with pytest.raises(ValueError):
        TurnClientConfig(requested_transport="sctp")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="TCP or TLS"):
        TurnClientConnection(SERVER, USER, PASSWORD, config=TCP)  # over UDP


def test_tcp_allocation_has_no_datagrams_and_udp_has_no_connect() -> None:
    client = allocated()
    with pytest.raises(LocalProtocolError, match="connect"):
        client.send_to(b"x", PEER, 1.0)
    udp = allocated(TurnClientConfig())
    with pytest.raises(LocalProtocolError, match="TCP allocation"):
        udp.connect(PEER, 1.0)
    with pytest.raises(LocalProtocolError, match="TCP allocation"):
        udp.bind_connection(CID)


def test_connect_needs_an_allocation() -> None:
    client = control()
    with pytest.raises(LocalProtocolError, match="no allocation"):
        client.connect(PEER, 0.0)
    with pytest.raises(LocalProtocolError, match="no allocation"):
        client.bind_connection(CID)


# --- Connect (RFC 6062 §4.3) -----------------------------------------------------------


def test_connect_creates_the_permission_first_then_succeeds() -> None:
    client = allocated()
    client.connect(PEER, 1.0)
    permission = only_request(client)
    assert permission.method == Method.CREATE_PERMISSION
    assert permission.get(XorPeerAddress) == XorPeerAddress((PEER[0], 0))
    client.handle_stream_data(answer(permission), 1.1)
    request = only_request(client)
    assert request.method == Method.CONNECT
    assert request.get(XorPeerAddress) == XorPeerAddress(PEER)
    assert request.get(Username) == Username(USER)  # authenticated like any request
    assert request.verify_integrity(KEY)
    client.handle_stream_data(answer(request, [ConnectionId(CID)]), 1.2)
    assert events(client) == [ev.PermissionCreated(PEER[0]), ev.ConnectSucceeded(PEER, CID)]
    assert client.has_permission(PEER[0])


def test_connect_with_a_permission_goes_at_once() -> None:
    client = allocated()
    with_permission(client)
    request = connect_request(client)
    client.handle_stream_data(answer(request, [ConnectionId(CID)]), 1.2)
    assert events(client) == [ev.ConnectSucceeded(PEER, CID)]


def test_connect_normalises_the_peer_address() -> None:
    client = allocated()
    client.create_permission("2001:db8::1", 0.1)
    client.handle_stream_data(answer(only_request(client)), 0.1)
    events(client)
    client.connect(("2001:DB8:0::1", 80), 1.0)
    request = only_request(client)
    assert request.get(XorPeerAddress) == XorPeerAddress(("2001:db8::1", 80))
    client.handle_stream_data(answer(request, [ConnectionId(7)]), 1.1)
    assert events(client) == [ev.ConnectSucceeded(("2001:db8::1", 80), 7)]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (446, "Connection Already Exists"),
        (447, "Connection Timeout or Failure"),
        (403, "Forbidden"),
    ],
)
def test_connect_errors_are_typed(code: int, reason: str) -> None:
    client = allocated()
    with_permission(client)
    request = connect_request(client)
    client.handle_stream_data(refuse(request, code), 1.1)
    (failed,) = events(client)
    assert isinstance(failed, ev.ConnectFailed) and failed.peer == PEER
    assert isinstance(failed.error, TurnError)
    assert (failed.error.code, failed.error.reason) == (code, reason)
    assert client.state is ClientState.ALLOCATED  # the allocation is unaffected


def test_after_447_a_new_connect_waits_ten_seconds() -> None:
    client = allocated()
    with_permission(client)
    request = connect_request(client)
    client.handle_stream_data(refuse(request, 447), 2.0)
    events(client)
    client.connect(PEER, 3.0)
    assert requests(client) == []  # RFC 6062 §4.3: "MUST wait at least 10 seconds"
    assert client.poll_timeout() == pytest.approx(2.0 + CONNECT_RETRY_DELAY)
    client.handle_timeout(2.0 + CONNECT_RETRY_DELAY)
    retry = only_request(client)
    assert retry.method == Method.CONNECT and retry.get(XorPeerAddress) == XorPeerAddress(PEER)
    client.handle_stream_data(answer(retry, [ConnectionId(CID)]), 12.5)
    assert events(client) == [ev.ConnectSucceeded(PEER, CID)]
    # Another port of the same IP was never refused: no wait for it.
    other = (PEER[0], PEER[1] + 1)
    client.connect(other, 13.0)
    assert only_request(client).get(XorPeerAddress) == XorPeerAddress(other)


def test_simultaneous_connects_to_one_peer_are_refused_locally() -> None:
    client = allocated()
    with_permission(client)
    connect_request(client)
    # RFC 6062 §4.3: "MUST NOT be sent simultaneously".
    with pytest.raises(LocalProtocolError, match="in progress"):
        client.connect(PEER, 1.1)
    client.connect((PEER[0], PEER[1] + 1), 1.1)  # another peer address is fine
    assert len(requests(client)) == 1


def test_refused_permission_fails_the_connect_without_sending_it() -> None:
    client = allocated()
    client.connect(PEER, 1.0)
    permission = only_request(client)
    client.handle_stream_data(refuse(permission, 403), 1.1)
    (refused, failed) = events(client)
    assert isinstance(refused, ev.PermissionFailed)
    assert isinstance(failed, ev.ConnectFailed) and failed.peer == PEER
    assert isinstance(failed.error, TurnError) and failed.error.code == 403
    assert requests(client) == []
    client.connect(PEER, 2.0)  # nothing stuck: the next try starts over
    assert only_request(client).method == Method.CREATE_PERMISSION


def test_connect_success_without_connection_id_is_a_failure() -> None:
    client = allocated()
    with_permission(client)
    client.handle_stream_data(answer(connect_request(client)), 1.1)
    (failed,) = events(client)
    assert isinstance(failed, ev.ConnectFailed)
    assert isinstance(failed.error, TurnError) and "CONNECTION-ID" in failed.error.reason


def test_connect_timeout() -> None:
    config = TurnClientConfig(
        requested_transport="tcp", transaction=TransactionConfig(reliable_timeout=5.0)
    )
    client = allocated(config)
    with_permission(client)
    connect_request(client)
    assert client.poll_timeout() == pytest.approx(6.0)
    client.handle_timeout(6.0)
    (failed,) = events(client)
    assert isinstance(failed, ev.ConnectFailed)
    assert isinstance(failed.error, TransactionTimeoutError)
    assert client.state is ClientState.ALLOCATED


def test_437_to_connect_loses_the_allocation_and_the_connect() -> None:
    client = allocated()
    with_permission(client)
    client.handle_stream_data(refuse(connect_request(client), 437), 1.1)
    seen = events(client)
    assert any(isinstance(e, ev.AllocationLost) for e in seen)
    failed = [e for e in seen if isinstance(e, ev.ConnectFailed)]
    assert len(failed) == 1 and isinstance(failed[0].error, TurnError)
    assert failed[0].error.code == 437


def test_lost_control_connection_fails_pending_connects() -> None:
    client = allocated()
    client.connect(PEER, 1.0)  # waiting for its permission
    requests(client)
    client.connection_lost(1.5)
    seen = events(client)
    assert [type(e) for e in seen] == [ev.ConnectFailed, ev.AllocationLost]
    assert client.state is ClientState.FAILED


def test_close_deallocates_and_fails_pending_connects() -> None:
    client = allocated()
    with_permission(client)
    connect_request(client)
    client.close(2.0)
    (failed,) = events(client)
    assert isinstance(failed, ev.ConnectFailed)
    assert isinstance(failed.error, LocalProtocolError)
    deallocate = only_request(client)
    assert deallocate.method == Method.REFRESH and deallocate.get(Lifetime) == Lifetime(0)
    client.handle_stream_data(answer(deallocate), 2.1)
    assert events(client) == [ev.Closed()]


# --- refresh and permissions (RFC 6062 §4.2, §4.6) -------------------------------------


def test_allocation_and_connect_permission_are_refreshed_as_for_udp() -> None:
    client = allocated()
    client.connect(PEER, 1.0)
    client.handle_stream_data(answer(only_request(client)), 1.0)
    client.handle_stream_data(answer(only_request(client), [ConnectionId(CID)]), 1.1)
    events(client)
    # No traffic passes the control connection, yet the permission of a connected peer is
    # kept (the application asked for the peer): refreshed before 300 s.
    due = client.poll_timeout()
    assert due is not None and due < 1.0 + PERMISSION_LIFETIME
    client.handle_timeout(due)
    refresh = only_request(client)
    assert refresh.method == Method.CREATE_PERMISSION
    client.handle_stream_data(answer(refresh), due + 0.1)
    # The allocation's Refresh (RFC 6062 §4.6: keeps the data connections) at 540 s.
    now = due
    while (deadline := client.poll_timeout()) is not None and deadline < 541:
        now = deadline
        client.handle_timeout(now)
        for request in requests(client):
            if request.method == Method.REFRESH:
                assert request.get(Lifetime) is None
                client.handle_stream_data(answer(request, [Lifetime(600)]), now)
            else:
                client.handle_stream_data(answer(request), now)
    assert ev.AllocationRefreshed(600) in events(client)
    assert client.has_permission(PEER[0])


# --- ConnectionAttempt (RFC 6062 §4.4) -------------------------------------------------


def test_connection_attempt_from_a_permitted_peer_is_an_event() -> None:
    client = allocated()
    with_permission(client)
    client.handle_stream_data(attempt(), 2.0)
    assert events(client) == [ev.ConnectionAttempt(PEER, CID)]


def test_connection_attempts_that_cannot_be_right_are_discarded() -> None:
    client = allocated()
    client.handle_stream_data(attempt(), 2.0)  # no permission for that peer
    incomplete = Message(
        Method.CONNECTION_ATTEMPT, MessageClass.INDICATION, b"\x08" * 12, [XorPeerAddress(PEER)]
    )
    with_permission(client)
    client.handle_stream_data(incomplete.encode(), 2.1)  # no CONNECTION-ID
    assert events(client) == []
    assert client.stats.discarded == 2
    udp = allocated(TurnClientConfig())
    with_permission(udp)
    udp.handle_datagram(attempt(), 2.0)  # a UDP allocation has no peer connections
    assert events(udp) == [] and udp.stats.discarded == 1


def test_bind_connection_carries_the_control_connections_credentials() -> None:
    client = allocated()
    data = client.bind_connection(CID, PEER)
    assert data.server == SERVER and data.connection_id == CID and data.peer == PEER
    assert data.state.value == "connecting"
    assert data.poll_transmit() is None  # nothing before the connection is up
    data.connection_made(5.0)
    request = bind_request(data)
    # RFC 6062 §4.3/§4.4: CONNECTION-ID echoed, "the same method and credentials".
    assert request.get(ConnectionId) == ConnectionId(CID)
    assert request.get(Username) == Username(USER)
    assert request.get(Realm) == Realm(REALM)
    assert request.get(Nonce) == Nonce("nonce-1")
    assert request.verify_integrity(KEY)
    assert data.state is DataConnectionState.BINDING


# --- the data connection handshake (RFC 6062 §4.3, §4.4, §4.5) -------------------------


def test_bound_data_connection_hands_over_the_bytes_behind_the_response() -> None:
    data = bound_handshake()
    request = bind_request(data)
    data.handle_data(answer(request) + b"peer says hi", 5.1)
    assert events(data) == [ev.ConnectionBound(CID, PEER, b"peer says hi")]
    assert data.state is DataConnectionState.BOUND
    assert data.poll_timeout() is None
    # From here on the stream is the peer's (§4.5): the core takes no more of it.
    with pytest.raises(LocalProtocolError, match="peer"):
        data.handle_data(b"more", 5.2)


def test_response_split_into_single_bytes() -> None:
    data = bound_handshake()
    response = answer(bind_request(data))
    for i in range(len(response)):
        assert data.state is DataConnectionState.BINDING
        data.handle_data(response[i : i + 1], 5.1)
    assert events(data) == [ev.ConnectionBound(CID, PEER, b"")]


def test_peer_bytes_that_look_like_stun_are_not_parsed() -> None:
    data = bound_handshake()
    request = bind_request(data)
    # A peer that happens to send a STUN message: after the response nothing is framed.
    peer_bytes = Message(Method.BINDING, MessageClass.REQUEST, b"\x05" * 12).encode()
    data.handle_data(answer(request) + peer_bytes, 5.1)
    assert events(data) == [ev.ConnectionBound(CID, PEER, peer_bytes)]


def test_stale_nonce_is_retried_with_the_new_one() -> None:
    data = bound_handshake()
    first = bind_request(data)
    data.handle_data(challenge(first, 438, nonce="fresh"), 5.1)
    retry = bind_request(data)
    assert retry.transaction_id != first.transaction_id
    assert retry.get(Nonce) == Nonce("fresh") and retry.verify_integrity(KEY)
    data.handle_data(answer(retry), 5.2)
    assert events(data) == [ev.ConnectionBound(CID, PEER, b"")]


def test_401_gets_one_retry_with_this_connections_nonce() -> None:
    data = bound_handshake()
    # A server keeping nonces per connection does not know the control connection's.
    data.handle_data(challenge(bind_request(data), 401, nonce="conn-nonce"), 5.1)
    retry = bind_request(data)
    assert retry.get(Nonce) == Nonce("conn-nonce") and retry.verify_integrity(KEY)
    data.handle_data(challenge(retry, 401, nonce="again"), 5.2)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert isinstance(failed.error, TurnError) and failed.error.code == 401
    assert data.state is DataConnectionState.FAILED
    assert data.poll_transmit() is None


def test_bid_down_challenge_to_connection_bind_is_not_retried() -> None:
    data = bound_handshake()
    # The nonce cookie advertises PASSWORD-ALGORITHMS, the 401 carries none (RFC 8489 §9.2.5).
    cookie = SecurityFeatures(password_algorithms=True).cookie() + "abcdef"
    data.handle_data(challenge(bind_request(data), 401, nonce=cookie), 5.1)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert "PASSWORD-ALGORITHMS" in str(failed.error)
    assert data.state is DataConnectionState.FAILED
    assert data.poll_transmit() is None


def test_unauthenticated_control_means_unauthenticated_bind_until_challenged() -> None:
    data = DataConnection(CID, SERVER, USER, PASSWORD, None, token_bytes=lambda n: b"\x01" * n)
    data.connection_made(0.0)
    first = bind_request(data)
    assert first.get(Username) is None and first.get(MessageIntegrity) is None
    data.handle_data(challenge(first), 0.1)
    second = Message.decode(data.poll_transmit() or b"")
    assert second.get(Username) == Username(USER) and second.verify_integrity(KEY)
    data.handle_data(answer(second), 0.2)
    assert isinstance(events(data)[0], ev.ConnectionBound)


def test_challenges_are_bounded() -> None:
    client = allocated(TurnClientConfig(requested_transport="tcp", max_challenges=2))
    data = bound_handshake(client)
    for i in range(2):
        data.handle_data(challenge(bind_request(data), 438, nonce=f"n{i}"), 5.1 + i)
    data.handle_data(challenge(bind_request(data), 438, nonce="n2"), 8.0)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert isinstance(failed.error, TurnError) and failed.error.code == 438


def test_error_response_fails_the_bind_with_its_code() -> None:
    data = bound_handshake()
    data.handle_data(refuse(bind_request(data), 400), 5.1)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed) and failed.connection_id == CID
    assert isinstance(failed.error, TurnError) and failed.error.code == 400
    data.handle_data(b"ignored after failure", 5.2)
    assert events(data) == []


def test_unauthenticated_success_is_an_integrity_failure() -> None:
    data = bound_handshake()
    request = bind_request(data)
    forged = success_response(request).encode(long_term_key(USER, REALM, "guess"))
    data.handle_data(forged + b"peer bytes", 5.1)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert isinstance(failed.error, IntegrityError)
    assert data.state is DataConnectionState.FAILED


def test_stray_messages_before_the_response_are_skipped() -> None:
    data = bound_handshake()
    request = bind_request(data)
    other = Message(Method.CONNECTION_BIND, MessageClass.SUCCESS, b"\x09" * 12).encode(KEY)
    indication = Message(Method.DATA, MessageClass.INDICATION, b"\x0a" * 12).encode()
    data.handle_data(other + indication + answer(request) + b"x", 5.1)
    assert events(data) == [ev.ConnectionBound(CID, PEER, b"x")]


def test_bytes_that_are_not_stun_before_the_response_fail_the_bind() -> None:
    data = bound_handshake()
    bind_request(data)
    data.handle_data(b"HTTP/1.1 400 Bad Request\r\n\r\n", 5.1)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert isinstance(failed.error, StunDecodeError)


def test_bind_times_out_after_ti() -> None:
    config = TurnClientConfig(
        requested_transport="tcp", transaction=TransactionConfig(reliable_timeout=7.0)
    )
    data = bound_handshake(allocated(config))
    bind_request(data)
    assert data.poll_timeout() == pytest.approx(12.0)
    data.handle_timeout(11.9)
    assert events(data) == []
    data.handle_timeout(12.0)
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert isinstance(failed.error, TransactionTimeoutError)
    assert data.poll_timeout() is None


def test_connection_lost_before_the_response() -> None:
    data = bound_handshake()
    bind_request(data)
    data.connection_lost(5.5, "reset")
    (failed,) = events(data)
    assert isinstance(failed, ev.ConnectionBindFailed)
    assert isinstance(failed.error, TurnError) and "reset" in failed.error.reason
    data.connection_lost(5.6)  # once is enough
    assert events(data) == []


def test_misuse_is_a_local_error() -> None:
    client = allocated()
    data = client.bind_connection(CID)
    with pytest.raises(LocalProtocolError):
        data.handle_data(b"early", 0.0)
    data.connection_made(0.0)
    with pytest.raises(LocalProtocolError):
        data.connection_made(0.0)
    with pytest.raises(LocalProtocolError, match="32-bit"):
        client.bind_connection(1 << 32)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_server_bytes_never_raise(chunks: list[bytes]) -> None:
    data = bound_handshake()
    request = bind_request(data)
    prefix = answer(request)
    for chunk in [prefix[:7], *chunks]:
        if data.state is DataConnectionState.BOUND:
            break
        data.handle_data(chunk, 5.1)
    assert data.state in (
        DataConnectionState.BINDING,
        DataConnectionState.BOUND,
        DataConnectionState.FAILED,
    )
    assert all(isinstance(e, ev.ConnectionBound | ev.ConnectionBindFailed) for e in events(data))


def test_dont_fragment_and_even_port_never_leave_in_a_tcp_allocate() -> None:
    client = control()
    client.allocate(0.0)
    request = only_request(client)
    assert request.get(DontFragment) is None and request.get(EvenPort) is None


def test_permission_outlives_a_failed_connect() -> None:
    client = allocated()
    client.connect(PEER, 1.0)
    client.handle_stream_data(answer(only_request(client)), 1.0)
    client.handle_stream_data(refuse(only_request(client), 447), 1.1)
    events(client)
    # The 447 ended that Connect; the permission stays pinned (the application asked for
    # the peer) and is refreshed before it runs out, with no traffic.
    due = client.poll_timeout()
    assert due is not None and due < 1.0 + PERMISSION_LIFETIME
    client.handle_timeout(due)
    assert only_request(client).method == Method.CREATE_PERMISSION
