"""TurnServerCore fed bytes, as h11's tests do: every RFC 8656 request path, its error codes,
and that an error leaves no trace in the server's state."""

from __future__ import annotations

import dataclasses
import gc
import struct
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    EvenPort,
    Lifetime,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    Software,
    UnknownAttribute,
    UnknownAttributes,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import (
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AddressFamily,
    AttrType,
    MessageClass,
    Method,
)
from tsunagu.stun.credentials import (
    NONCE_COOKIE,
    long_term_key,
    parse_security_features,
    rest_api_password,
    rest_api_username,
    userhash,
)
from tsunagu.stun.credentials import PasswordAlgorithm as Algorithm
from tsunagu.stun.framing import ChannelData
from tsunagu.stun.message import IntegrityAlgorithm, Message
from tsunagu.turn import auth as auth_module
from tsunagu.turn import server as server_module
from tsunagu.turn.auth import Authenticated, Authenticator, parse_users_file
from tsunagu.turn.config import TurnServerConfig
from tsunagu.turn.entropy import SeededEntropy
from tsunagu.turn.events import (
    AllocationCreated,
    AllocationDeleted,
    AllocationExpired,
    AllocationRefreshed,
    AuthFailed,
    ChannelBound,
    ChannelExpired,
    ClosePeerConnection,
    ConnectToPeer,
    DataConnectionBound,
    PermissionCreated,
    PermissionExpired,
    RequestRejected,
    TurnEvent,
)
from tsunagu.turn.server import TurnServerCore, build_users, source_key
from tsunagu.turn.transport import Address, FiveTuple, Transmit, Transport

REALM = "example.org"
USER, PASSWORD = "alice", "wonderland"
SERVER: Address = ("203.0.113.1", 3478)
RELAY_V4 = "203.0.113.1"
RELAY_V6 = "2001:db8::1"
CLIENT: Address = ("198.51.100.1", 50000)
CLIENT2: Address = ("198.51.100.2", 50001)
PEER: Address = ("198.51.100.20", 40000)
PEER2: Address = ("198.51.100.21", 40001)
PEER_V6: Address = ("2001:db8::20", 40000)
MIN_PORT, MAX_PORT = 50000, 50099
UDP = RequestedTransport(TRANSPORT_UDP)


class FakeBinder:
    """The driver side of RelayBinder: a set of bound addresses."""

    def __init__(self, *, dont_fragment: bool = True, taken: Iterable[Address] = ()) -> None:
        self.bound: set[Address] = set()
        self.tcp_bound: set[Address] = set()  # RFC 6062 listening sockets
        self.taken = set(taken)  # held by "another program"
        self._dont_fragment = dont_fragment

    @property
    def supports_dont_fragment(self) -> bool:
        return self._dont_fragment

    def bind(self, address: Address) -> bool:
        assert address not in self.bound, f"{address} bound twice"
        if address in self.taken:
            return False
        self.bound.add(address)
        return True

    def unbind(self, address: Address) -> None:
        self.bound.remove(address)

    def bind_tcp(self, address: Address) -> bool:
        assert address not in self.tcp_bound, f"{address} bound twice"
        if address in self.taken:
            return False
        self.tcp_bound.add(address)
        return True

    def unbind_tcp(self, address: Address) -> None:
        self.tcp_bound.remove(address)


def make_core(
    binder: FakeBinder | None = None, *, relay_ips: Sequence[str] = (RELAY_V4,), **overrides: Any
) -> tuple[TurnServerCore, FakeBinder]:
    values: dict[str, Any] = {
        "listen": (SERVER,),
        "relay_ips": tuple(relay_ips),
        "realm": REALM,
        "users": (f"{USER}:{PASSWORD}", "bob:builder"),
        "min_port": MIN_PORT,
        "max_port": MAX_PORT,
    }
    values.update(overrides)
    binder = binder or FakeBinder()
    core = TurnServerCore(TurnServerConfig(**values), binder, entropy=SeededEntropy(b"unit"))
    return core, binder


def drain(core: TurnServerCore) -> list[Transmit]:
    out = []
    while (item := core.poll_transmit()) is not None:
        out.append(item)
    return out


def events(core: TurnServerCore) -> list[TurnEvent]:
    out = []
    while (item := core.poll_event()) is not None:
        out.append(item)
    return out


def snapshot(core: TurnServerCore, binder: FakeBinder) -> object:
    """Everything an error response must leave alone."""
    return (
        sorted(binder.bound),
        sorted(binder.tcp_bound),
        core.reservation_count,
        [
            (
                a.five_tuple,
                a.username,
                sorted((f, dataclasses.astuple(r)) for f, r in a.relays.items()),
                sorted((ip, p.expires) for ip, p in a.permissions.items()),
                sorted((n, c.peer, c.expires) for n, c in a.channels.items()),
            )
            for a in core.allocations()
        ],
    )


class Client:
    """A TURN client speaking to the core through handle_datagram."""

    def __init__(
        self,
        core: TurnServerCore,
        *,
        address: Address = CLIENT,
        transport: Transport = Transport.UDP,
        username: str = USER,
        password: str = PASSWORD,
    ) -> None:
        self.core = core
        self.address = address
        self.transport = transport
        self.username = username
        self.password = password
        self.nonce: str | None = None
        self.counter = 0

    @property
    def five_tuple(self) -> FiveTuple:
        return FiveTuple(self.transport, self.address, SERVER)

    def key(self, algorithm: Algorithm = Algorithm.MD5) -> bytes:
        return long_term_key(self.username, REALM, self.password, algorithm)

    def tid(self) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(12, "big")

    def feed(self, data: bytes, now: float) -> list[Transmit]:
        self.core.handle_datagram(data, SERVER, self.address, now, self.transport)
        return drain(self.core)

    def exchange(self, data: bytes, now: float) -> Message:
        out = self.feed(data, now)
        assert len(out) == 1, out
        transmit = out[0]
        assert (transmit.transport, transmit.local, transmit.remote) == (
            self.transport,
            SERVER,
            self.address,
        )
        return Message.decode(transmit.data)

    def signed(
        self,
        method: int,
        attributes: Iterable[Attribute],
        *,
        tid: bytes | None = None,
        algorithm: Algorithm = Algorithm.MD5,
        integrity: IntegrityAlgorithm = "sha1",
        identity: Attribute | None = None,
        after_integrity: bytes = b"",
    ) -> bytes:
        assert self.nonce is not None
        attrs = [
            *attributes,
            identity or Username(self.username),
            Realm(REALM),
            Nonce(self.nonce),
        ]
        message = Message(method, MessageClass.REQUEST, tid or self.tid(), attrs)
        data = message.encode(self.key(algorithm), integrity=integrity)
        if after_integrity:
            length = struct.unpack_from("!H", data, 2)[0] + len(after_integrity)
            data = data[:2] + struct.pack("!H", length) + data[4:] + after_integrity
        return data

    def request(
        self, method: int, attributes: Iterable[Attribute] = (), now: float = 0.0
    ) -> Message:
        """Send authenticated, learning the nonce from a 401/438 first when needed."""
        attributes = list(attributes)
        if self.nonce is None:
            challenge = self.exchange(
                Message(method, MessageClass.REQUEST, self.tid(), attributes).encode(), now
            )
            assert challenge.error is not None and challenge.error.code == 401
            self.nonce = challenge.get(Nonce).value  # type: ignore[union-attr]
        response = self.exchange(self.signed(method, attributes), now)
        if response.error is not None and response.error.code == 438:
            self.nonce = response.get(Nonce).value  # type: ignore[union-attr]
            response = self.exchange(self.signed(method, attributes), now)
        if response.error is None or response.error.code not in (400, 401):
            assert response.verify_integrity(self.key()), "response not signed with our key"
        return response

    def allocate(self, *attributes: Attribute, now: float = 0.0) -> Message:
        return self.request(Method.ALLOCATE, [UDP, *attributes], now)

    def relayed(self, response: Message) -> Address:
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None, response
        return relayed.address

    def permit(self, *peers: Address, now: float = 0.0) -> Message:
        return self.request(Method.CREATE_PERMISSION, [XorPeerAddress(p) for p in peers], now)

    def bind(self, channel: int, peer: Address, now: float = 0.0) -> Message:
        return self.request(
            Method.CHANNEL_BIND, [ChannelNumber(channel), XorPeerAddress(peer)], now
        )

    def send_indication(
        self, peer: Address, payload: bytes, now: float = 0.0, *extra: Attribute
    ) -> list[Transmit]:
        message = Message(
            Method.SEND,
            MessageClass.INDICATION,
            self.tid(),
            [XorPeerAddress(peer), Data(payload), *extra],
        )
        return self.feed(message.encode(), now)


def fresh_nonce(core: TurnServerCore, client: Address) -> str:
    """A nonce as a 401 would hand to ``client`` at time 0."""
    request = Message(Method.REFRESH, MessageClass.REQUEST, bytes(12)).encode()
    core.handle_datagram(request, SERVER, client, 0.0)
    (out,) = drain(core)
    events(core)
    nonce = Message.decode(out.data).get(Nonce)
    assert nonce is not None
    return nonce.value


def code_of(response: Message) -> int | None:
    return response.error.code if response.error is not None else None


def relay_bound(core: TurnServerCore, client: Client, family: int = AddressFamily.IPV4) -> Address:
    allocation = core.allocation(client.five_tuple)
    assert allocation is not None
    return allocation.relays[family].bound


# -- authentication (RFC 8489 §9.2.4) ------------------------------------------------------


def test_allocate_without_credentials_is_challenged_and_changes_nothing() -> None:
    core, binder = make_core()
    client = Client(core)
    before = snapshot(core, binder)
    response = client.exchange(
        Message(Method.ALLOCATE, MessageClass.REQUEST, client.tid(), [UDP]).encode(), 0.0
    )
    assert code_of(response) == 401
    assert response.get(Realm) == Realm(REALM)
    nonce = response.get(Nonce)
    assert nonce is not None and nonce.value.startswith(NONCE_COOKIE)
    features = parse_security_features(nonce.value)
    assert features is not None and features.password_algorithms
    algorithms = response.get(PasswordAlgorithms)
    assert algorithms is not None
    assert [a for a, _ in algorithms.algorithms] == [Algorithm.SHA256, Algorithm.MD5]
    assert response.integrity_algorithm is None  # a 401 carries no MESSAGE-INTEGRITY
    assert snapshot(core, binder) == before
    assert [type(e) for e in events(core)] == [AuthFailed]


def test_allocate_succeeds_with_long_term_credentials() -> None:
    core, binder = make_core()
    client = Client(core)
    response = client.allocate()
    assert response.message_class == MessageClass.SUCCESS
    ip, port = client.relayed(response)
    assert ip == RELAY_V4 and MIN_PORT <= port <= MAX_PORT
    assert response.get(Lifetime) == Lifetime(600)
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)
    assert binder.bound == {(RELAY_V4, port)}
    created = [e for e in events(core) if isinstance(e, AllocationCreated)]
    assert created == [AllocationCreated(client.five_tuple, USER, ((RELAY_V4, port),), 600)]


def test_wrong_password_is_401_with_source_in_event() -> None:
    core, binder = make_core()
    client = Client(core, password="not it")
    challenge = client.exchange(
        Message(Method.ALLOCATE, MessageClass.REQUEST, client.tid(), [UDP]).encode(), 0.0
    )
    client.nonce = challenge.get(Nonce).value  # type: ignore[union-attr]
    events(core)
    response = client.exchange(client.signed(Method.ALLOCATE, [UDP]), 0.0)
    assert code_of(response) == 401
    assert response.get(Nonce) is not None
    assert core.allocation_count == 0 and not binder.bound
    (event,) = events(core)
    assert isinstance(event, AuthFailed)
    assert event.source == CLIENT and event.username == USER and event.code == 401


def test_unknown_user_is_401() -> None:
    core, _ = make_core()
    client = Client(core, username="mallory")
    client.nonce = fresh_nonce(core, CLIENT)
    assert code_of(client.exchange(client.signed(Method.ALLOCATE, [UDP]), 0.0)) == 401


def test_stale_nonce_is_438_and_the_retry_succeeds() -> None:
    core, _ = make_core(nonce_lifetime=60.0)
    client = Client(core)
    client.allocate(now=0.0)
    old_nonce = client.nonce
    response = client.exchange(client.signed(Method.REFRESH, []), 61.0)
    assert code_of(response) == 438
    assert response.get(Realm) == Realm(REALM)
    new_nonce = response.get(Nonce)
    assert new_nonce is not None and new_nonce.value != old_nonce
    client.nonce = new_nonce.value
    assert code_of(client.exchange(client.signed(Method.REFRESH, []), 61.0)) is None


def test_nonce_is_bound_to_the_client_address() -> None:
    core, _ = make_core()
    alice = Client(core)
    alice.allocate()
    thief = Client(core, address=CLIENT2)
    thief.nonce = alice.nonce
    assert code_of(thief.exchange(thief.signed(Method.ALLOCATE, [UDP]), 0.0)) == 438


@pytest.mark.parametrize("missing", ["username", "realm", "nonce"])
def test_integrity_without_username_realm_or_nonce_is_400(missing: str) -> None:
    core, binder = make_core()
    client = Client(core)
    client.nonce = fresh_nonce(core, CLIENT)
    attrs: list[Attribute] = [UDP]
    if missing != "username":
        attrs.append(Username(USER))
    if missing != "realm":
        attrs.append(Realm(REALM))
    if missing != "nonce":
        attrs.append(Nonce(client.nonce))
    data = Message(Method.ALLOCATE, MessageClass.REQUEST, client.tid(), attrs).encode(client.key())
    response = client.exchange(data, 0.0)
    assert code_of(response) == 400
    assert response.integrity_algorithm is None
    assert core.allocation_count == 0 and not binder.bound


def test_sha256_password_algorithm_and_message_integrity_sha256() -> None:
    core, _ = make_core()
    client = Client(core)
    challenge = client.exchange(
        Message(Method.ALLOCATE, MessageClass.REQUEST, client.tid(), [UDP]).encode(), 0.0
    )
    client.nonce = challenge.get(Nonce).value  # type: ignore[union-attr]
    offered = challenge.get(PasswordAlgorithms)
    assert offered is not None
    chosen = [PasswordAlgorithm(Algorithm.SHA256), offered]
    data = client.signed(
        Method.ALLOCATE, [UDP, *chosen], algorithm=Algorithm.SHA256, integrity="sha256"
    )
    response = client.exchange(data, 0.0)
    assert code_of(response) is None
    assert response.integrity_algorithm == "sha256"
    assert response.verify_integrity(client.key(Algorithm.SHA256))


def test_password_algorithms_altered_by_a_middlebox_is_400() -> None:
    core, _ = make_core()
    client = Client(core)
    client.nonce = fresh_nonce(core, CLIENT)
    downgraded = PasswordAlgorithms(((Algorithm.MD5, b""),))
    data = client.signed(Method.ALLOCATE, [UDP, PasswordAlgorithm(Algorithm.MD5), downgraded])
    assert code_of(client.exchange(data, 0.0)) == 400
    assert core.allocation_count == 0


def test_userhash_identifies_a_static_user() -> None:
    core, _ = make_core()
    client = Client(core)
    client.nonce = fresh_nonce(core, CLIENT)
    data = client.signed(Method.ALLOCATE, [UDP], identity=Userhash(userhash(USER, REALM)))
    response = client.exchange(data, 0.0)
    assert code_of(response) is None
    allocation = core.allocation(client.five_tuple)
    assert allocation is not None and allocation.username == USER
    features = parse_security_features(client.nonce)
    assert features is not None and features.username_anonymity
    bad = client.signed(Method.REFRESH, [], identity=Userhash(bytes(32)))
    assert code_of(client.exchange(bad, 0.0)) == 401


def test_rest_api_credentials() -> None:
    secret = "shared-secret"
    now_unix = 1_700_000_000
    config = TurnServerConfig(
        listen=(SERVER,), relay_ips=(RELAY_V4,), realm=REALM, auth_secrets=("old", secret)
    )
    core = TurnServerCore(
        config, FakeBinder(), entropy=SeededEntropy(b"rest"), unix_time_offset=now_unix
    )
    username = rest_api_username(now_unix + 3600, "carol")
    client = Client(core, username=username, password=rest_api_password(secret, username))
    assert code_of(client.allocate()) is None
    # No USERHASH advertised: REST users cannot be found by hash.
    assert client.nonce is not None
    features = parse_security_features(client.nonce)
    assert features is not None and not features.username_anonymity

    expired = rest_api_username(now_unix - 1, "carol")
    late = Client(
        core, address=CLIENT2, username=expired, password=rest_api_password(secret, expired)
    )
    late.nonce = fresh_nonce(core, CLIENT2)
    assert code_of(late.exchange(late.signed(Method.ALLOCATE, [UDP]), 0.0)) == 401

    forged = Client(core, address=CLIENT2, username=username, password="guess")
    forged.nonce = late.nonce
    assert code_of(forged.exchange(forged.signed(Method.ALLOCATE, [UDP]), 0.0)) == 401


def test_users_file_with_plain_and_precomputed_keys() -> None:
    md5 = long_term_key("dave", REALM, "secret", Algorithm.MD5)
    text = f"# comment\n\ndave:0x{md5.hex()}\nerin:pass:word\n"
    users = parse_users_file(text, REALM)
    assert users["dave"].md5 == md5 and users["dave"].sha256 is None
    assert users["erin"].md5 == long_term_key("erin", REALM, "pass:word")
    core, _ = make_core(users=(), users_file="unused")
    core.update_users(users, ())
    client = Client(core, username="dave", password="secret")
    assert code_of(client.allocate()) is None
    with pytest.raises(ValueError, match="line 1"):
        parse_users_file("no-colon\n", REALM)
    config = TurnServerConfig(relay_ips=(RELAY_V4,), users=("frank:x",))
    assert set(build_users(config, "gina:y\n")) == {"frank", "gina"}


def test_reloaded_credentials_apply_to_the_next_request() -> None:
    """Keys that verified a request are kept prepared; a reload (SIGHUP) must not let the
    old password or an old REST API secret through on the strength of them."""
    core, _ = make_core()
    client = Client(core)
    assert code_of(client.allocate()) is None
    assert code_of(client.request(Method.REFRESH)) is None  # the prepared key verifies
    core.update_users(parse_users_file(f"{USER}:changed\n", REALM), ())
    assert code_of(client.exchange(client.signed(Method.REFRESH, []), 0.0)) == 401
    client.password = "changed"
    assert code_of(client.request(Method.REFRESH)) is None

    config = TurnServerConfig(
        listen=(SERVER,), relay_ips=(RELAY_V4,), realm=REALM, auth_secrets=("old",)
    )
    core = TurnServerCore(config, FakeBinder(), entropy=SeededEntropy(b"rotate"))
    core.unix_time_offset = 1000.0
    username = rest_api_username(5000, "carol")
    rest = Client(core, username=username, password=rest_api_password("old", username))
    assert code_of(rest.allocate()) is None
    assert code_of(rest.request(Method.REFRESH)) is None
    core.update_users({}, ("new",))  # the old secret is retired
    assert code_of(rest.exchange(rest.signed(Method.REFRESH, []), 0.0)) == 401
    # ... and a REST credential whose key is prepared still expires on time
    core.update_users({}, ("old",))
    assert code_of(rest.request(Method.REFRESH)) is None
    core.unix_time_offset = 5001.0
    assert code_of(rest.exchange(rest.signed(Method.REFRESH, []), 0.0)) == 401


def authenticator(**overrides: Any) -> Authenticator:
    values: dict[str, Any] = {
        "realm": REALM,
        "users": parse_users_file(f"{USER}:{PASSWORD}\n", REALM),
        "nonce_secret": bytes(32),
        "nonce_lifetime": 600.0,
    }
    values.update(overrides)
    return Authenticator(**values)


def signed_request(
    auth: Authenticator, username: str, password: str, integrity: IntegrityAlgorithm = "sha1"
) -> Message:
    nonce = auth.challenge(CLIENT, 0.0)[1]
    attrs = [UDP, Username(username), Realm(REALM), nonce]
    key = long_term_key(username, REALM, password)
    data = Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(12), attrs)
    return Message.decode(data.encode(key, integrity=integrity))


def test_prepared_keys_only_after_verification_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth_module, "PREPARED_KEYS", 3)
    auth = authenticator(rest_secrets=("s",))
    # Requests that do not verify leave nothing behind, however many usernames they name.
    for n in range(20):
        for username in (USER, rest_api_username(5000, f"u{n}")):
            bad = auth.authenticate(signed_request(auth, username, "guess"), CLIENT, 0.0, 1000.0)
            assert not isinstance(bad, Authenticated)
    assert auth.prepared_keys == 0
    good = auth.authenticate(signed_request(auth, USER, PASSWORD), CLIENT, 0.0, 1000.0)
    assert isinstance(good, Authenticated) and auth.prepared_keys == 1
    # the prepared key answers the next request alike, whichever integrity it carries
    again = auth.authenticate(signed_request(auth, USER, PASSWORD), CLIENT, 0.0, 1000.0)
    assert again == good
    sha256 = signed_request(auth, USER, PASSWORD, "sha256")
    assert auth.authenticate(sha256, CLIENT, 0.0, 1000.0) == dataclasses.replace(
        good, integrity="sha256"
    )
    for n in range(10):
        username = rest_api_username(5000, f"u{n}")
        request = signed_request(auth, username, rest_api_password("s", username))
        rest = auth.authenticate(request, CLIENT, 0.0, 1000.0)
        assert isinstance(rest, Authenticated) and rest.account == f"u{n}"
    assert auth.prepared_keys == 3


def test_attributes_after_message_integrity_have_no_effect() -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate()
    trailer = struct.pack("!HH", AttrType.LIFETIME, 4) + (0).to_bytes(4, "big")
    response = client.exchange(client.signed(Method.REFRESH, [], after_integrity=trailer), 0.0)
    assert code_of(response) is None
    assert response.get(Lifetime) == Lifetime(600)  # not 0: the allocation lives on
    assert core.allocation_count == 1 and len(binder.bound) == 1


def test_request_from_another_user_on_the_allocation_is_441() -> None:
    core, binder = make_core()
    alice = Client(core)
    alice.allocate()
    alice.permit(PEER)
    before = snapshot(core, binder)
    bob = Client(core, username="bob", password="builder")
    bob.nonce = alice.nonce
    cases: list[tuple[int, list[Attribute]]] = [
        (Method.REFRESH, [Lifetime(0)]),
        (Method.CREATE_PERMISSION, [XorPeerAddress(PEER2)]),
        (Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)]),
    ]
    for method, attrs in cases:
        response = bob.exchange(bob.signed(method, attrs), 0.0)
        assert code_of(response) == 441
        assert response.verify_integrity(bob.key())
    assert snapshot(core, binder) == before


def test_unknown_comprehension_required_attribute_is_420_after_authentication() -> None:
    core, binder = make_core()
    client = Client(core)
    response = client.allocate(UnknownAttribute(0x7777, b"\x01\x02\x03\x04"))
    assert code_of(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x7777,))
    assert core.allocation_count == 0 and not binder.bound
    # comprehension-optional unknown attributes are ignored
    assert code_of(client.allocate(UnknownAttribute(0xC001, b"x"))) is None


def test_unauthenticated_answers_are_rate_limited_per_source() -> None:
    core, _ = make_core(unauthenticated_rate=1.0, unauthenticated_burst=3)
    client = Client(core)
    request = Message(Method.ALLOCATE, MessageClass.REQUEST, client.tid(), [UDP]).encode()
    answered = [len(client.feed(request, 0.0)) for _ in range(5)]
    assert answered == [1, 1, 1, 0, 0]
    assert core.stats.rate_limited == 2
    assert len(client.feed(request, 1.0)) == 1  # refilled one token after a second
    other = Client(core, address=CLIENT2)
    assert len(other.feed(request, 1.0)) == 1  # another source has its own bucket


def test_binding_request_is_answered_without_credentials() -> None:
    core, _ = make_core()
    client = Client(core)
    response = client.exchange(
        Message(Method.BINDING, MessageClass.REQUEST, client.tid()).encode(fingerprint=True), 0.0
    )
    assert response.message_class == MessageClass.SUCCESS
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)


def test_unknown_method_is_400() -> None:
    core, _ = make_core()
    client = Client(core)
    response = client.exchange(Message(0x0AB, MessageClass.REQUEST, client.tid()).encode(), 0.0)
    assert code_of(response) == 400


def test_software_attribute_only_when_configured() -> None:
    core, _ = make_core(software="tsunagu test")
    client = Client(core)
    assert client.allocate().get(Software) == Software("tsunagu test")
    core, _ = make_core()
    assert Client(core).allocate().get(Software) is None


# -- Allocate (RFC 8656 §7.2) ---------------------------------------------------------------


def test_second_allocate_on_a_5_tuple_is_437_and_a_retransmission_is_answered_alike() -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate()
    client.nonce = client.nonce
    first = client.signed(Method.ALLOCATE, [UDP], tid=b"R" * 12)
    core2, _ = make_core()
    del core2
    client.request(Method.REFRESH)  # keep the nonce fresh
    before = snapshot(core, binder)
    response = client.exchange(client.signed(Method.ALLOCATE, [UDP]), 0.0)
    assert code_of(response) == 437
    assert snapshot(core, binder) == before
    # the retransmission case: a fresh core, the same Allocate twice
    core, binder = make_core()
    client = Client(core)
    client.nonce = fresh_nonce(core, CLIENT)
    first = client.signed(Method.ALLOCATE, [UDP], tid=b"R" * 12)
    answer1 = client.feed(first, 0.0)
    answer2 = client.feed(first, 0.5)
    assert answer1 == answer2 and len(answer1) == 1
    assert core.allocation_count == 1 and len(binder.bound) == 1


def test_requested_transport_missing_is_400_and_unknown_is_442() -> None:
    core, binder = make_core()
    client = Client(core)
    assert code_of(client.request(Method.ALLOCATE, [])) == 400
    assert code_of(client.request(Method.ALLOCATE, [RequestedTransport(132)])) == 442  # SCTP
    # RFC 6062 §5.1: a TCP allocation needs a TCP or TLS control connection
    assert code_of(client.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])) == 400
    assert core.allocation_count == 0 and not binder.bound and not binder.tcp_bound
    rejected = [e for e in events(core) if isinstance(e, RequestRejected)]
    assert [e.code for e in rejected] == [400, 442, 400]


def test_dont_fragment() -> None:
    core, _ = make_core()
    client = Client(core)
    assert code_of(client.allocate(DontFragment())) is None
    allocation = core.allocation(client.five_tuple)
    assert allocation is not None and allocation.dont_fragment
    client.permit(PEER)
    (out,) = client.send_indication(PEER, b"df", 0.0, DontFragment())
    assert out.dont_fragment
    (out,) = client.send_indication(PEER, b"no df", 0.0)
    assert not out.dont_fragment

    core, binder = make_core(FakeBinder(dont_fragment=False))
    client = Client(core)
    response = client.allocate(DontFragment())
    assert code_of(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((AttrType.DONT_FRAGMENT,))
    assert core.allocation_count == 0 and not binder.bound


def test_requested_address_family() -> None:
    core, binder = make_core()
    client = Client(core)
    assert code_of(client.allocate(RequestedAddressFamily(AddressFamily.IPV6))) == 440
    assert code_of(client.allocate(RequestedAddressFamily(7))) == 440
    assert not binder.bound
    core, _ = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    client = Client(core)
    response = client.allocate(RequestedAddressFamily(AddressFamily.IPV6))
    assert client.relayed(response)[0] == RELAY_V6
    assert len(response.get_all(XorRelayedAddress)) == 1


def test_ipv6_only_server_refuses_a_default_ipv4_allocation() -> None:
    core, binder = make_core(relay_ips=(RELAY_V6,))
    assert code_of(Client(core).allocate()) == 440
    assert not binder.bound


def test_dual_allocation() -> None:
    core, binder = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    client = Client(core)
    response = client.allocate(AdditionalAddressFamily(AddressFamily.IPV6))
    relayed = [a.address[0] for a in response.get_all(XorRelayedAddress)]
    assert relayed == [RELAY_V4, RELAY_V6]
    assert response.get(AddressErrorCode) is None
    assert len(binder.bound) == 2
    # a peer of either family can be permitted and reached
    client.permit(PEER, PEER_V6)
    (out,) = client.send_indication(PEER_V6, b"v6", 0.0)
    assert out.local == relay_bound(core, client, AddressFamily.IPV6)
    (out,) = client.send_indication(PEER, b"v4", 0.0)
    assert out.local == relay_bound(core, client, AddressFamily.IPV4)


def test_dual_allocation_partially_met_reports_address_error_code() -> None:
    core, _ = make_core()
    client = Client(core)
    response = client.allocate(AdditionalAddressFamily(AddressFamily.IPV6))
    assert code_of(response) is None
    assert [a.address[0] for a in response.get_all(XorRelayedAddress)] == [RELAY_V4]
    error = response.get(AddressErrorCode)
    assert error is not None and (error.family, error.code) == (AddressFamily.IPV6, 440)


@pytest.mark.parametrize(
    "attributes",
    [
        [AdditionalAddressFamily(AddressFamily.IPV4)],
        [AdditionalAddressFamily(AddressFamily.IPV6), RequestedAddressFamily(AddressFamily.IPV4)],
        [AdditionalAddressFamily(AddressFamily.IPV6), EvenPort(reserve=True)],
        [ReservationToken(bytes(8)), EvenPort()],
        [ReservationToken(bytes(8)), RequestedAddressFamily(AddressFamily.IPV4)],
        [ReservationToken(bytes(8)), AdditionalAddressFamily(AddressFamily.IPV6)],
    ],
    ids=["aaf-ipv4", "raf-and-aaf", "r-bit-dual", "token-even", "token-raf", "token-aaf"],
)
def test_conflicting_allocate_options_are_400(attributes: list[Attribute]) -> None:
    core, binder = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    response = Client(core).allocate(*attributes)
    assert code_of(response) == 400
    assert core.allocation_count == 0 and not binder.bound


def test_even_port_and_reservation_token() -> None:
    core, binder = make_core()
    first = Client(core)
    response = first.allocate(EvenPort(reserve=True))
    port = first.relayed(response)[1]
    assert port % 2 == 0
    token = response.get(ReservationToken)
    assert token is not None and len(token.value) == 8
    assert binder.bound == {(RELAY_V4, port), (RELAY_V4, port + 1)}
    assert core.reservation_count == 1

    second = Client(core, address=CLIENT2, transport=Transport.TCP)
    response = second.allocate(token)
    assert second.relayed(response) == (RELAY_V4, port + 1)
    assert core.reservation_count == 0
    # the token is spent
    third = Client(core, address=("198.51.100.3", 1))
    assert code_of(third.allocate(token)) == 508
    assert code_of(third.allocate(ReservationToken(b"12345678"))) == 508

    plain_even = Client(core, address=("198.51.100.4", 1)).allocate(EvenPort())
    assert plain_even.get(XorRelayedAddress).address[1] % 2 == 0  # type: ignore[union-attr]
    assert plain_even.get(ReservationToken) is None


def test_reservation_expires_after_30_seconds_and_frees_the_port() -> None:
    core, binder = make_core()
    client = Client(core)
    response = client.allocate(EvenPort(reserve=True))
    port = client.relayed(response)[1]
    token = response.get(ReservationToken)
    assert token is not None
    assert core.poll_timeout() == 30.0
    core.handle_timeout(30.0)
    assert core.reservation_count == 0
    assert binder.bound == {(RELAY_V4, port)}
    late = Client(core, address=CLIENT2)
    assert code_of(late.allocate(token, now=31.0)) == 508


@pytest.mark.parametrize(
    ("requested", "granted"), [(None, 600), (10, 600), (0, 600), (1800, 1800), (99999, 3600)]
)
def test_allocate_lifetime(requested: int | None, granted: int) -> None:
    core, _ = make_core()
    attrs = [] if requested is None else [Lifetime(requested)]
    assert Client(core).allocate(*attrs).get(Lifetime) == Lifetime(granted)


def test_allocation_quotas_are_486() -> None:
    core, binder = make_core(max_allocations_per_user=2, max_allocations=3)
    for n in range(2):
        assert code_of(Client(core, address=("198.51.100.9", n + 1)).allocate()) is None
    before = snapshot(core, binder)
    assert code_of(Client(core, address=("198.51.100.9", 3)).allocate()) == 486
    assert snapshot(core, binder) == before
    bob = Client(core, address=("198.51.100.9", 4), username="bob", password="builder")
    assert code_of(bob.allocate()) is None
    carol = Client(core, address=("198.51.100.9", 5), username="bob", password="builder")
    assert code_of(carol.allocate()) == 486  # total
    # deleting one frees the user's quota
    Client(core, address=("198.51.100.9", 1)).request(Method.REFRESH, [Lifetime(0)])
    assert code_of(Client(core, address=("198.51.100.9", 6)).allocate()) is None


def test_out_of_ports_is_508_and_taken_ports_are_skipped() -> None:
    taken = {(RELAY_V4, p) for p in range(MIN_PORT, MIN_PORT + 2)}
    core, binder = make_core(FakeBinder(taken=taken), min_port=MIN_PORT, max_port=MIN_PORT + 3)
    ports = set()
    for n in range(2):
        client = Client(core, address=("198.51.100.9", n + 1))
        ports.add(client.relayed(client.allocate())[1])
    assert ports == {MIN_PORT + 2, MIN_PORT + 3}
    before = snapshot(core, binder)
    response = Client(core, address=("198.51.100.9", 9)).allocate()
    assert code_of(response) == 508
    assert snapshot(core, binder) == before


def test_even_port_pair_unavailable_is_508() -> None:
    # ports 50000-50001: the even one is taken by another program, so no N, N+1 pair.
    core, binder = make_core(
        FakeBinder(taken={(RELAY_V4, MIN_PORT)}), min_port=MIN_PORT, max_port=MIN_PORT + 1
    )
    assert code_of(Client(core).allocate(EvenPort(reserve=True))) == 508
    assert not binder.bound


def test_draining_server_refuses_new_allocations_with_508() -> None:
    core, _ = make_core()
    existing = Client(core)
    existing.allocate()
    core.stop_accepting()
    assert code_of(Client(core, address=CLIENT2).allocate()) == 508
    assert code_of(existing.request(Method.REFRESH)) is None


# -- Refresh (RFC 8656 §8) -------------------------------------------------------------------


def test_refresh_and_delete() -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate(now=0.0)
    response = client.request(Method.REFRESH, [Lifetime(1200)], now=100.0)
    assert response.get(Lifetime) == Lifetime(1200)
    assert isinstance(events(core)[-1], AllocationRefreshed)
    core.handle_timeout(700.0)  # the original 600 s would have expired here
    assert core.allocation_count == 1
    response = client.request(Method.REFRESH, [Lifetime(0)], now=200.0)
    assert response.get(Lifetime) == Lifetime(0)
    assert core.allocation_count == 0 and not binder.bound
    assert events(core)[-1] == AllocationDeleted(client.five_tuple, USER, "refresh")
    # RFC 8656 §8.3: a retransmitted delete gets 437
    assert code_of(client.request(Method.REFRESH, [Lifetime(0)], now=200.0)) == 437


def test_requests_without_an_allocation_are_437() -> None:
    core, binder = make_core()
    client = Client(core)
    cases: list[tuple[int, list[Attribute]]] = [
        (Method.REFRESH, []),
        (Method.CREATE_PERMISSION, [XorPeerAddress(PEER)]),
        (Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)]),
    ]
    for method, attrs in cases:
        assert code_of(client.request(method, attrs)) == 437
    assert core.allocation_count == 0 and not binder.bound


def test_dual_allocation_refresh_by_family() -> None:
    core, binder = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    client = Client(core)
    client.allocate(AdditionalAddressFamily(AddressFamily.IPV6))
    v6 = relay_bound(core, client, AddressFamily.IPV6)
    response = client.request(
        Method.REFRESH, [RequestedAddressFamily(AddressFamily.IPV6), Lifetime(0)]
    )
    assert response.get(Lifetime) == Lifetime(0)
    allocation = core.allocation(client.five_tuple)
    assert allocation is not None and list(allocation.relays) == [AddressFamily.IPV4]
    assert v6 not in binder.bound and len(binder.bound) == 1
    before = snapshot(core, binder)
    response = client.request(Method.REFRESH, [RequestedAddressFamily(AddressFamily.IPV6)])
    assert code_of(response) == 443
    assert snapshot(core, binder) == before


def test_allocation_expires_and_releases_everything() -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate(now=0.0)
    client.permit(PEER, now=0.0)
    client.bind(0x4001, PEER2, now=0.0)
    events(core)
    assert core.poll_timeout() == 300.0  # the permissions expire first
    core.handle_timeout(300.0)
    assert {type(e) for e in events(core)} == {PermissionExpired}
    assert core.poll_timeout() == 600.0
    core.handle_timeout(599.9)
    assert core.allocation_count == 1
    core.handle_timeout(600.0)
    assert core.allocation_count == 0 and not binder.bound
    assert core.poll_timeout() is None
    assert events(core) == [
        ChannelExpired(client.five_tuple, 0x4001, PEER2),
        AllocationExpired(client.five_tuple, USER),
    ]


def test_timer_entries_of_deleted_allocations_do_not_pile_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Refresh with LIFETIME 0 leaves the allocation's timer entry behind until its
    deadline; such entries are dropped once they pile up, and the live ones still fire,
    also when dropping happens while handle_timeout is running."""
    monkeypatch.setattr(server_module, "_TIMERS_MIN_COMPACTION", 16)
    core, binder = make_core(
        min_port=20000,
        max_port=29999,
        max_allocations=10_000,
        max_allocations_per_user=10_000,
        unauthenticated_burst=10_000,
    )
    kept = [Client(core, address=("198.51.100.8", 1000 + n)) for n in range(40)]
    for client in kept:
        client.allocate(now=0.0)
        client.permit(PEER, now=0.0)
    for n in range(300):
        churn = Client(core, address=("198.51.100.9", 1000 + n))
        churn.allocate(now=1.0)
        assert churn.request(Method.REFRESH, [Lifetime(0)], now=1.0).get(Lifetime) == Lifetime(0)
        assert core.timer_entries <= 2 * (len(kept) + 1) + 1
    events(core)
    assert core.allocation_count == len(kept)
    # Each permission expiry reschedules (pushes) its allocation: the first push drops the
    # stale entries, in the list handle_timeout is working through.
    monkeypatch.setattr(core, "_timers_compaction", 0)
    core.handle_timeout(300.0)
    assert [type(e) for e in events(core)] == [PermissionExpired] * len(kept)
    assert core.poll_timeout() == 600.0
    core.handle_timeout(600.0)
    assert [type(e) for e in events(core)] == [AllocationExpired] * len(kept)
    assert core.allocation_count == 0 and not binder.bound


def test_closing_a_tcp_connection_deletes_its_allocation() -> None:
    core, binder = make_core()
    client = Client(core, transport=Transport.TCP)
    client.allocate()
    core.connection_closed(Transport.TCP, SERVER, CLIENT, 1.0)
    assert core.allocation_count == 0 and not binder.bound
    assert events(core)[-1] == AllocationDeleted(client.five_tuple, USER, "connection closed")
    # a UDP client with the same addresses is another 5-tuple
    udp = Client(core)
    udp.allocate()
    core.connection_closed(Transport.TCP, SERVER, CLIENT, 1.0)
    assert core.allocation_count == 1


def test_close_releases_every_relay_socket() -> None:
    core, binder = make_core()
    Client(core).allocate(EvenPort(reserve=True))
    Client(core, address=CLIENT2).allocate()
    core.close()
    assert core.allocation_count == 0 and core.reservation_count == 0 and not binder.bound


# -- permissions (RFC 8656 §9, §10) ---------------------------------------------------------


def test_create_permission_with_several_peers_and_data_indications() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    assert code_of(client.permit(PEER, PEER2, ("198.51.100.20", 1))) is None
    created = [e for e in events(core) if isinstance(e, PermissionCreated)]
    assert [e.peer_ip for e in created] == [PEER[0], PEER2[0]]
    relay = relay_bound(core, client)
    # any port of a permitted IP may send (§9: ports are not compared)
    core.handle_peer_datagram(b"hello", relay, ("198.51.100.20", 9999), 1.0)
    (out,) = drain(core)
    assert (out.transport, out.local, out.remote) == (Transport.UDP, SERVER, CLIENT)
    indication = Message.decode(out.data)
    assert (indication.method, indication.message_class) == (Method.DATA, MessageClass.INDICATION)
    assert indication.get(XorPeerAddress) == XorPeerAddress(("198.51.100.20", 9999))
    assert indication.get(Data) == Data(b"hello")
    # an unpermitted peer is dropped
    core.handle_peer_datagram(b"spam", relay, ("198.51.100.99", 1), 1.0)
    assert drain(core) == []
    assert core.stats.dropped_from_peers == 1
    assert core.stats.packets_to_clients == 1 and core.stats.bytes_to_clients == 5


def test_create_permission_is_all_or_nothing_on_403() -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate()
    before = snapshot(core, binder)
    response = client.permit(PEER, ("127.0.0.1", 1), PEER2)
    assert code_of(response) == 403
    assert snapshot(core, binder) == before
    rejected = [e for e in events(core) if isinstance(e, RequestRejected)]
    assert rejected[-1].code == 403 and "127.0.0.0/8" in rejected[-1].detail


@pytest.mark.parametrize(
    "peer",
    [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "192.168.1.1",
        "172.16.0.1",
    ],
)
def test_default_policy_refuses_internal_ipv4_peers(peer: str) -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    assert code_of(client.permit((peer, 1))) == 403
    assert code_of(client.bind(0x4000, (peer, 1))) == 403


@pytest.mark.parametrize(
    "peer", ["::1", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1", "fe80::1", "fd00::1"]
)
def test_default_policy_refuses_internal_ipv6_peers(peer: str) -> None:
    core, _ = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    client = Client(core)
    client.allocate(RequestedAddressFamily(AddressFamily.IPV6))
    assert code_of(client.permit((peer, 1))) == 403


def test_allow_peer_opens_a_denied_block() -> None:
    core, _ = make_core(allow_peers=("127.0.0.0/8",))
    client = Client(core)
    client.allocate()
    assert code_of(client.permit(("127.0.0.1", 5000))) is None
    core, _ = make_core(deny_peers=("198.51.100.0/24",))
    client = Client(core)
    client.allocate()
    assert code_of(client.permit(PEER)) == 403


def test_peer_family_mismatch_is_443() -> None:
    core, binder = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    client = Client(core)
    client.allocate()
    before = snapshot(core, binder)
    assert code_of(client.permit(PEER_V6)) == 443
    assert code_of(client.bind(0x4000, PEER_V6)) == 443
    assert snapshot(core, binder) == before


def test_permission_quota_is_508() -> None:
    core, binder = make_core(max_permissions_per_allocation=2)
    client = Client(core)
    client.allocate()
    client.permit(PEER)
    before = snapshot(core, binder)
    assert code_of(client.permit(PEER2, ("198.51.100.22", 1))) == 508
    assert snapshot(core, binder) == before
    assert code_of(client.permit(PEER, PEER2)) is None  # refreshing one, adding one
    assert code_of(client.bind(0x4000, ("198.51.100.23", 1))) == 508


def test_create_permission_without_peer_is_400() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    assert code_of(client.request(Method.CREATE_PERMISSION)) == 400


def test_permission_expires_after_300_seconds_unless_refreshed() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate(now=0.0)
    client.permit(PEER, now=0.0)
    relay = relay_bound(core, client)
    client.permit(PEER, now=200.0)  # refresh: now expires at 500
    core.handle_timeout(300.0)
    core.handle_peer_datagram(b"x", relay, PEER, 499.0)
    assert len(drain(core)) == 1
    core.handle_timeout(500.0)
    core.handle_peer_datagram(b"x", relay, PEER, 500.0)
    assert drain(core) == []
    assert client.send_indication(PEER, b"x", 500.0) == []


# -- Send indications (RFC 8656 §11) ---------------------------------------------------------


def test_send_indication_needs_a_permission() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    assert client.send_indication(PEER, b"no permission") == []
    client.permit(PEER)
    (out,) = client.send_indication(PEER, b"payload")
    assert out == Transmit(Transport.UDP, relay_bound(core, client), PEER, b"payload")
    assert core.stats.packets_to_peers == 1 and core.stats.dropped_from_clients == 1


def test_send_indication_never_reaches_the_servers_own_addresses() -> None:
    core, _ = make_core(allow_peers=("203.0.113.0/24",))
    client = Client(core)
    client.allocate()
    client.permit((RELAY_V4, 1))  # the IP is allowed ...
    assert client.send_indication((RELAY_V4, 1), b"ok") != []
    assert client.send_indication(SERVER, b"loop") == []  # ... but not our listening port
    assert client.send_indication((RELAY_V4, MIN_PORT + 5), b"loop") == []  # nor relay ports
    assert code_of(client.bind(0x4000, SERVER)) == 403


def test_send_indications_from_other_5_tuples_or_malformed_are_dropped() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    client.permit(PEER)
    stranger = Client(core, address=CLIENT2)
    assert stranger.send_indication(PEER, b"x") == []
    no_data = Message(Method.SEND, MessageClass.INDICATION, client.tid(), [XorPeerAddress(PEER)])
    assert client.feed(no_data.encode(), 0.0) == []
    unknown = client.send_indication(PEER, b"x", 0.0, UnknownAttribute(0x7001, b""))
    assert unknown == []
    # over TCP a Send indication is relayed alike
    tcp = Client(core, address=CLIENT2, transport=Transport.TCP)
    tcp.allocate()
    tcp.permit(PEER)
    assert len(tcp.send_indication(PEER, b"tcp")) == 1


# -- channels (RFC 8656 §12) -----------------------------------------------------------------


def test_channel_bind_and_channel_data_both_ways() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    assert code_of(client.bind(0x4000, PEER)) is None
    assert [type(e) for e in events(core)][-2:] == [ChannelBound, PermissionCreated]
    relay = relay_bound(core, client)
    (out,) = client.feed(ChannelData(0x4000, b"to peer").encode(), 1.0)
    assert out == Transmit(Transport.UDP, relay, PEER, b"to peer")
    core.handle_peer_datagram(b"to client", relay, PEER, 1.0)
    (out,) = drain(core)
    assert out.remote == CLIENT and ChannelData.decode(out.data) == ChannelData(
        0x4000, b"to client"
    )
    assert out.data == ChannelData(0x4000, b"to client").encode()  # no padding over UDP
    # another port of the same IP has the permission but no channel: Data indication
    core.handle_peer_datagram(b"other port", relay, (PEER[0], 1), 1.0)
    (out,) = drain(core)
    assert Message.decode(out.data).method == Method.DATA
    # zero-length ChannelData is relayed as an empty datagram (§12.6)
    (out,) = client.feed(ChannelData(0x4000, b"").encode(), 1.0)
    assert out.data == b""


def test_channel_data_is_padded_over_tcp() -> None:
    core, _ = make_core()
    client = Client(core, transport=Transport.TCP)
    client.allocate()
    client.bind(0x4ABC, PEER)
    core.handle_peer_datagram(b"12345", relay_bound(core, client), PEER, 1.0)
    (out,) = drain(core)
    assert out.transport == Transport.TCP
    assert out.data == ChannelData(0x4ABC, b"12345").encode(stream=True)
    assert len(out.data) == 12
    # padded ChannelData from the client is accepted too
    (sent,) = client.feed(ChannelData(0x4ABC, b"abc").encode(stream=True), 1.0)
    assert sent.data == b"abc"


@pytest.mark.parametrize("number", [0x3FFF, 0x5000, 0xFFFF, 0])
def test_channel_number_out_of_range_is_400(number: int) -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate()
    before = snapshot(core, binder)
    assert code_of(client.bind(number, PEER)) == 400
    assert snapshot(core, binder) == before


def test_channel_rebinding_rules() -> None:
    core, binder = make_core()
    client = Client(core)
    client.allocate()
    client.bind(0x4000, PEER, now=0.0)
    before = snapshot(core, binder)
    assert code_of(client.bind(0x4000, PEER2)) == 400  # channel bound to another peer
    assert code_of(client.bind(0x4001, PEER)) == 400  # peer bound to another channel
    assert snapshot(core, binder) == before
    missing = client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000)])
    assert code_of(missing) == 400
    # same channel, same peer: a refresh of both the binding and the permission
    assert code_of(client.bind(0x4000, PEER, now=250.0)) is None
    allocation = core.allocation(client.five_tuple)
    assert allocation is not None
    assert allocation.channels[0x4000].expires == 850.0
    assert allocation.permissions[PEER[0]].expires == 550.0


def test_channel_expires_after_600_seconds_and_can_then_be_rebound() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate(Lifetime(3600), now=0.0)
    client.bind(0x4000, PEER, now=0.0)
    for t in (290.0, 580.0):
        client.permit(PEER, now=t)
    relay = relay_bound(core, client)
    core.handle_timeout(600.0)
    assert client.feed(ChannelData(0x4000, b"late").encode(), 600.0) == []
    core.handle_peer_datagram(b"from peer", relay, PEER, 600.0)
    (out,) = drain(core)
    assert Message.decode(out.data).method == Method.DATA  # channel gone, permission alive
    assert code_of(client.bind(0x4000, PEER2, now=601.0)) is None
    assert code_of(client.bind(0x4001, PEER, now=601.0)) is None


def test_permission_is_checked_on_every_channel_packet() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate(now=0.0)
    client.bind(0x4000, PEER, now=0.0)
    relay = relay_bound(core, client)
    assert len(client.feed(ChannelData(0x4000, b"ok").encode(), 299.0)) == 1
    # the channel lives 600 s, its permission only 300 s unless refreshed
    assert client.feed(ChannelData(0x4000, b"x").encode(), 300.0) == []
    core.handle_peer_datagram(b"x", relay, PEER, 300.0)
    assert drain(core) == []


def test_channel_quota_is_508() -> None:
    core, binder = make_core(max_channels_per_allocation=1)
    client = Client(core)
    client.allocate()
    client.bind(0x4000, PEER)
    before = snapshot(core, binder)
    assert code_of(client.bind(0x4001, PEER2)) == 508
    assert snapshot(core, binder) == before
    assert code_of(client.bind(0x4000, PEER)) is None  # refreshing is not a new channel


def test_bad_channel_data_is_dropped() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    client.bind(0x4000, PEER)
    assert client.feed(ChannelData(0x4001, b"unbound").encode(), 1.0) == []
    assert client.feed(struct.pack("!HH", 0x4000, 10) + b"short", 1.0) == []
    assert client.feed(b"\x40", 1.0) == []
    assert Client(core, address=CLIENT2).feed(ChannelData(0x4000, b"x").encode(), 1.0) == []
    assert client.feed(b"\x80" + bytes(20), 1.0) == []  # RTP-looking: not ours
    assert core.stats.dropped_from_clients == 5


def test_policy_update_drops_now_forbidden_permissions_and_channels() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    client.permit(PEER2)
    client.bind(0x4000, PEER)
    assert core.update_policy((), ("198.51.100.20/32",), 1.0) == 2
    assert client.feed(ChannelData(0x4000, b"x").encode(), 1.0) == []
    assert len(client.send_indication(PEER2, b"y", 1.0)) == 1
    assert code_of(client.permit(PEER, now=1.0)) == 403


# -- robustness ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from(list(Transport)))
def test_arbitrary_bytes_never_raise(data: bytes, transport: Transport) -> None:
    core, _ = make_core()
    core.handle_datagram(data, SERVER, CLIENT, 0.0, transport)
    core.handle_peer_datagram(data, (RELAY_V4, MIN_PORT), PEER, 0.0)
    drain(core)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_requests_never_raise(data: st.DataObject) -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    client.bind(0x4000, PEER)
    valid = client.signed(Method.CREATE_PERMISSION, [XorPeerAddress(PEER), XorPeerAddress(PEER2)])
    position = data.draw(st.integers(0, len(valid) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = valid[:position] + bytes([value]) + valid[position + 1 :]
    client.feed(mutated, 1.0)
    client.feed(mutated[: data.draw(st.integers(0, len(mutated)))], 1.0)
    core.handle_timeout(10_000.0)
    assert core.allocation_count == 0


def test_message_integrity_must_cover_the_request() -> None:
    core, _ = make_core()
    client = Client(core)
    client.allocate()
    data = bytearray(client.signed(Method.REFRESH, [Lifetime(0)]))
    data[-5] ^= 0x01  # flip a bit of the HMAC
    assert code_of(client.exchange(bytes(data), 0.0)) == 401
    assert core.allocation_count == 1


def test_rest_api_quota_counts_the_user_not_each_credential() -> None:
    secret = "s"
    config = TurnServerConfig(
        listen=(SERVER,),
        relay_ips=(RELAY_V4,),
        realm=REALM,
        auth_secrets=(secret,),
        max_allocations_per_user=1,
    )
    core = TurnServerCore(config, FakeBinder(), entropy=SeededEntropy(b"q"))
    core.unix_time_offset = 1000.0
    first, second = rest_api_username(5000, "carol"), rest_api_username(6000, "carol")
    a = Client(core, username=first, password=rest_api_password(secret, first))
    assert code_of(a.allocate()) is None
    b = Client(core, address=CLIENT2, username=second, password=rest_api_password(secret, second))
    assert code_of(b.allocate()) == 486  # a fresh credential is still carol
    other = rest_api_username(6000, "dave")
    c = Client(
        core, address=("198.51.100.3", 1), username=other, password=rest_api_password(secret, other)
    )
    assert code_of(c.allocate()) is None


def test_ipv6_sources_share_a_rate_limit_per_64() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1") == "192.0.2.1"
    core, _ = make_core(unauthenticated_rate=1.0, unauthenticated_burst=1)
    request = Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(12), [UDP]).encode()
    core.handle_datagram(request, SERVER, ("2001:db8:1:2::1", 1), 0.0)
    core.handle_datagram(request, SERVER, ("2001:db8:1:2::2", 1), 0.0)
    core.handle_datagram(request, SERVER, ("2001:db8:9:9::1", 1), 0.0)
    assert [t.remote[0] for t in drain(core)] == ["2001:db8:1:2::1", "2001:db8:9:9::1"]


def test_a_spoofed_flood_of_unauthenticated_allocates_leaves_no_state() -> None:
    core, binder = make_core(unauthenticated_rate=1.0, unauthenticated_burst=1)
    request = Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(12), [UDP]).encode()
    answered = 0
    for n in range(3000):
        source = (f"198.18.{n >> 8}.{n & 255}", 1000 + n)
        core.handle_datagram(request, SERVER, source, 0.0)
        core.handle_datagram(request, SERVER, source, 0.0)  # the second is rate-limited
        answered += len(drain(core))
    events(core)
    assert answered == 3000
    assert core.stats.rate_limited == 3000
    assert core.allocation_count == 0 and core.reservation_count == 0 and not binder.bound
    assert core.poll_timeout() is None
    # the only per-source state is the bounded rate limiter
    assert core.tracked_sources <= 65_536
    # each 401 stays small (the smallest Allocate is 28 bytes): REALM, a 45-character
    # nonce, PASSWORD-ALGORITHMS and the error; no SOFTWARE unless configured
    core2, _ = make_core()
    core2.handle_datagram(request, SERVER, CLIENT, 0.0)
    (out,) = drain(core2)
    assert len(out.data) <= 128


# -- RFC 6062 TCP allocations ---------------------------------------------------------------

TCP = RequestedTransport(TRANSPORT_TCP)


def tcp_allocation(core: TurnServerCore) -> Client:
    control = Client(core, transport=Transport.TCP)
    response = control.request(Method.ALLOCATE, [TCP])
    assert code_of(response) is None
    return control


def connect(client: Client, peer: Address, now: float = 0.0) -> list[Transmit]:
    assert client.nonce is not None
    return client.feed(client.signed(Method.CONNECT, [XorPeerAddress(peer)]), now)


def test_tcp_allocation_binds_a_listening_socket() -> None:
    core, binder = make_core()
    control = tcp_allocation(core)
    allocation = core.allocation(control.five_tuple)
    assert allocation is not None
    relay = allocation.relays[AddressFamily.IPV4].bound
    assert binder.tcp_bound == {relay} and not binder.bound
    control.request(Method.REFRESH, [Lifetime(0)])
    assert not binder.tcp_bound


@pytest.mark.parametrize(
    "option", [DontFragment(), EvenPort(), ReservationToken(bytes(8))], ids=str
)
def test_tcp_allocation_refuses_udp_only_options(option: Attribute) -> None:
    core, binder = make_core()
    control = Client(core, transport=Transport.TCP)
    assert code_of(control.request(Method.ALLOCATE, [TCP, option])) == 400
    assert not binder.tcp_bound and core.allocation_count == 0


def test_connect_needs_a_permission_and_an_allowed_peer() -> None:
    core, binder = make_core()
    control = tcp_allocation(core)
    events(core)
    before = snapshot(core, binder)
    (out,) = connect(control, PEER)
    assert code_of(Message.decode(out.data)) == 403  # no permission yet
    (out,) = connect(control, ("127.0.0.1", 80))
    assert code_of(Message.decode(out.data)) == 403  # policy
    assert snapshot(core, binder) == before
    assert not [e for e in events(core) if isinstance(e, ConnectToPeer)]


def test_connect_success_failure_and_timeout() -> None:
    core, _ = make_core()
    control = tcp_allocation(core)
    control.permit(PEER, PEER2, ("198.51.100.22", 1))
    events(core)
    assert connect(control, PEER, 1.0) == []  # answered once the driver reports
    (command,) = [e for e in events(core) if isinstance(e, ConnectToPeer)]
    assert command.peer == PEER and command.relay == relay_bound(core, control)
    core.peer_connected(command.connection_id, 1.5)
    (out,) = drain(core)
    response = Message.decode(out.data)
    assert code_of(response) is None and response.method == Method.CONNECT
    assert response.get(ConnectionId) == ConnectionId(command.connection_id)
    assert response.verify_integrity(control.key())
    (out,) = connect(control, PEER, 2.0)  # RFC 6062 §5.2: one connection per peer
    assert code_of(Message.decode(out.data)) == 446

    connect(control, PEER2, 2.0)
    (failing,) = [e for e in events(core) if isinstance(e, ConnectToPeer)]
    core.peer_connection_failed(failing.connection_id, 3.0)
    (out,) = drain(core)
    assert code_of(Message.decode(out.data)) == 447
    assert ClosePeerConnection(failing.connection_id) in events(core)

    connect(control, ("198.51.100.22", 1), 4.0)
    (slow,) = [e for e in events(core) if isinstance(e, ConnectToPeer)]
    core.handle_timeout(4.0 + 29.9)
    assert drain(core) == []
    core.handle_timeout(34.0)
    (out,) = drain(core)
    assert code_of(Message.decode(out.data)) == 447
    assert ClosePeerConnection(slow.connection_id) in events(core)
    core.peer_connected(slow.connection_id, 35.0)  # too late: the driver is told to close
    assert events(core) == [ClosePeerConnection(slow.connection_id)]
    assert drain(core) == []


def test_connect_on_udp_allocation_or_wrong_family() -> None:
    core, _ = make_core(relay_ips=(RELAY_V4, RELAY_V6))
    udp = Client(core)
    udp.allocate()
    udp.permit(PEER)
    (out,) = connect(udp, PEER)
    assert code_of(Message.decode(out.data)) == 400
    control = tcp_allocation(core)
    (out,) = connect(control, PEER_V6)
    assert code_of(Message.decode(out.data)) == 443


def establish(core: TurnServerCore, control: Client, peer: Address, now: float) -> int:
    control.permit(peer, now=now)
    connect(control, peer, now)
    (command,) = [e for e in events(core) if isinstance(e, ConnectToPeer)]
    core.peer_connected(command.connection_id, now)
    drain(core)
    return command.connection_id


def connection_bind(
    data: Client, connection_id: int, now: float = 0.0, *, nonce: str | None = None
) -> Message:
    """ConnectionBind on ``data``'s connection, with ``nonce`` (clients reuse their
    control connection's) or else one issued to the data connection's own address."""
    data.nonce = nonce if nonce is not None else fresh_nonce(data.core, data.address)
    return data.exchange(data.signed(Method.CONNECTION_BIND, [ConnectionId(connection_id)]), now)


def test_connection_bind_makes_a_data_connection() -> None:
    core, _ = make_core()
    control = tcp_allocation(core)
    connection_id = establish(core, control, PEER, 0.0)
    data = Client(core, address=CLIENT2, transport=Transport.TCP)
    assert code_of(connection_bind(data, connection_id + 1)) == 400  # unknown id
    # the nonce that counts is the control connection's, which clients reuse
    assert code_of(connection_bind(data, connection_id)) == 438
    response = connection_bind(data, connection_id, nonce=control.nonce)
    assert code_of(response) is None and response.verify_integrity(data.key())
    assert DataConnectionBound(connection_id, data.five_tuple) in events(core)
    assert core.is_data_connection(data.five_tuple)
    # bound once: another connection cannot take it
    again = Client(core, address=("198.51.100.3", 7), transport=Transport.TCP)
    assert code_of(connection_bind(again, connection_id, nonce=control.nonce)) == 400
    # no timeout once bound
    core.handle_timeout(100.0)
    assert not [e for e in events(core) if isinstance(e, ClosePeerConnection)]
    # closing the data connection closes the peer connection (§5.5)
    core.connection_closed(Transport.TCP, SERVER, CLIENT2, 101.0)
    assert events(core) == [ClosePeerConnection(connection_id)]
    assert not core.is_data_connection(data.five_tuple)
    # and the peer may be connected again
    assert connect(control, PEER, 102.0) == []


def test_connection_bind_rules() -> None:
    core, _ = make_core()
    control = tcp_allocation(core)
    connection_id = establish(core, control, PEER, 0.0)
    # on the control connection (it has an allocation)
    assert code_of(connection_bind(control, connection_id, nonce=control.nonce)) == 400
    # over UDP
    udp = Client(core, address=CLIENT2)
    assert code_of(connection_bind(udp, connection_id, nonce=control.nonce)) == 400
    # as another user
    bob = Client(core, address=CLIENT2, transport=Transport.TCP, username="bob", password="builder")
    assert code_of(connection_bind(bob, connection_id, nonce=control.nonce)) == 441
    # unbound for 30 s: closed
    events(core)
    core.handle_timeout(30.0)
    assert events(core) == [ClosePeerConnection(connection_id)]
    late = Client(core, address=("198.51.100.3", 7), transport=Transport.TCP)
    assert code_of(connection_bind(late, connection_id, 31.0)) == 400  # forgotten


def test_incoming_peer_connection_and_connection_attempt() -> None:
    core, _ = make_core()
    control = tcp_allocation(core)
    relay = relay_bound(core, control)
    assert core.peer_connection_accepted(relay, PEER, 0.0) is None  # no permission
    assert drain(core) == []
    control.permit(PEER)
    connection_id = core.peer_connection_accepted(relay, PEER, 0.0)
    assert connection_id is not None
    (out,) = drain(core)
    assert (out.transport, out.remote) == (Transport.TCP, CLIENT)
    attempt = Message.decode(out.data)
    assert (attempt.method, attempt.message_class) == (
        Method.CONNECTION_ATTEMPT,
        MessageClass.INDICATION,
    )
    assert attempt.get(XorPeerAddress) == XorPeerAddress(PEER)
    assert attempt.get(ConnectionId) == ConnectionId(connection_id)
    assert core.peer_connection_accepted(relay, PEER, 0.0) is None  # one per peer
    data = Client(core, address=CLIENT2, transport=Transport.TCP)
    assert code_of(connection_bind(data, connection_id, nonce=control.nonce)) is None
    core.peer_connection_closed(connection_id, 1.0)
    assert ClosePeerConnection(connection_id) in events(core)
    assert not core.is_data_connection(data.five_tuple)


def test_tcp_allocation_has_no_channels_or_send_indications() -> None:
    core, _ = make_core()
    control = tcp_allocation(core)
    control.permit(PEER)
    assert code_of(control.bind(0x4000, PEER)) == 400
    assert control.send_indication(PEER, b"x") == []


def test_deleting_a_tcp_allocation_closes_its_peer_connections() -> None:
    core, binder = make_core()
    control = tcp_allocation(core)
    first = establish(core, control, PEER, 0.0)
    second = establish(core, control, PEER2, 0.0)
    events(core)
    control.request(Method.REFRESH, [Lifetime(0)], now=1.0)
    closed = [e for e in events(core) if isinstance(e, ClosePeerConnection)]
    assert sorted(c.connection_id for c in closed) == sorted([first, second])
    assert not binder.tcp_bound and core.allocation_count == 0


def test_relay_to_relay_opens_own_relay_ports_but_never_the_listening_port() -> None:
    core, _ = make_core(allow_peers=("203.0.113.0/24",))
    client = Client(core)
    client.allocate()
    own_relay = (RELAY_V4, MIN_PORT + 7)
    assert code_of(client.bind(0x4000, own_relay)) == 403
    core, _ = make_core(allow_peers=("203.0.113.0/24",), relay_to_relay=True)
    client = Client(core)
    client.allocate()
    assert code_of(client.bind(0x4000, own_relay)) is None
    assert code_of(client.bind(0x4001, SERVER)) == 403


def test_memory_per_allocation_is_bounded() -> None:
    """Measured with tracemalloc over the server's own code: an allocation with one
    permission and one channel costs about 2.5 KB (cached Allocate response included)."""
    core, _ = make_core(
        min_port=20000,
        max_port=29999,
        max_allocations=10_000,
        max_allocations_per_user=10_000,
        unauthenticated_burst=10_000,
    )
    count = 200
    clients = [Client(core, address=("198.51.100.9", 1000 + n)) for n in range(count + 1)]
    clients[0].allocate()  # warm up caches and interned strings
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for client in clients[1:]:
            client.allocate()
            client.permit(PEER)
            client.bind(0x4000, PEER2)
            events(core)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ours = [tracemalloc.Filter(True, "*/tsunagu/*")]
    grown = sum(
        s.size_diff
        for s in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    )
    assert core.allocation_count == count + 1
    assert grown / count < 4096, grown / count
