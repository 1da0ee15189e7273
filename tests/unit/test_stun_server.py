"""The sans-I/O STUN Binding server core: bytes in, transmits out (RFC 8489 §6.3, §12.2;
RFC 5780 §6), its rate limiter on a virtual clock, and its configuration."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu import SOFTWARE
from tsunagu.address import format_address, parse_address
from tsunagu.stun import Message, MessageClass, Method
from tsunagu.stun.attributes import (
    Address,
    ChangedAddress,
    ChangeRequest,
    ErrorCodeAttr,
    Fingerprint,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
)
from tsunagu.stun.constants import MAGIC_COOKIE
from tsunagu.stun.server import RateLimiter, StunServerCore, Transmit
from tsunagu.stun.server_config import StunServerConfig, config_values, load_toml

A1, P1 = "192.0.2.1", 3478
A2, P2 = "192.0.2.2", 3479
LOCAL: Address = (A1, P1)
LOCAL6: Address = ("2001:db8::1", 3478)
CLIENT: Address = ("198.51.100.7", 40001)
CLIENT6: Address = ("2001:db8:5::9", 40002)
TID = bytes.fromhex("0102030405060708090a0b0c")
LEGACY_TID = bytes.fromhex("a1a2a3a4") + TID  # RFC 3489: 128 bits, no magic cookie
FP_XOR = 0x5354554E


def make_core(**overrides: object) -> StunServerCore:
    values: dict[str, object] = {"listen": (LOCAL, LOCAL6), "rate_limit": 0.0}
    values.update(overrides)
    return StunServerCore(StunServerConfig(**values))  # type: ignore[arg-type]


def make_5780_core(**overrides: object) -> StunServerCore:
    return make_core(other=(A2, P2), **overrides)


def binding_request(
    *attributes: object,
    fingerprint: bool = True,
    legacy: bool = False,
    message_class: MessageClass = MessageClass.REQUEST,
    method: int = Method.BINDING,
) -> bytes:
    message = Message(
        method,
        message_class,
        LEGACY_TID if legacy else TID,
        list(attributes),  # type: ignore[arg-type]
        legacy=legacy,
    )
    return message.encode(fingerprint=fingerprint and not legacy)


def raw_message(
    message_type: int,
    attributes: list[tuple[int, bytes]],
    *,
    fingerprint: bool = False,
    head: bytes = struct.pack("!I", MAGIC_COOKIE) + TID,
) -> bytes:
    """Hand-built STUN bytes, for shapes the codec would refuse to encode."""
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) & 3) for t, v in attributes
    )
    length = len(body) + (8 if fingerprint else 0)
    data = struct.pack("!HH", message_type, length) + head + body
    if fingerprint:
        data += struct.pack("!HHI", 0x8028, 4, zlib.crc32(data) ^ FP_XOR)
    return data


def only(transmits: list[Transmit]) -> tuple[Transmit, Message]:
    assert len(transmits) == 1, transmits
    transmit = transmits[0]
    return transmit, Message.decode(transmit.data)


def answer(
    core: StunServerCore,
    data: bytes,
    local: Address = LOCAL,
    remote: Address = CLIENT,
    now: float = 0.0,
    *,
    stream: bool = False,
) -> tuple[Transmit, Message]:
    return only(core.handle_datagram(data, local, remote, now, stream=stream))


def error_of(message: Message) -> int:
    assert message.message_class is MessageClass.ERROR
    error = message.get(ErrorCodeAttr)
    assert error is not None
    return error.code


# -- the ordinary Binding transaction (RFC 8489 §6.3.1) ----------------------------------------


def test_success_carries_xor_mapped_address_software_and_fingerprint() -> None:
    transmit, response = answer(make_core(), binding_request())
    assert transmit.source == LOCAL and transmit.destination == CLIENT
    assert response.method == Method.BINDING
    assert response.message_class is MessageClass.SUCCESS
    assert response.transaction_id == TID
    assert [type(a) for a in response.attributes] == [XorMappedAddress, Software, Fingerprint]
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)
    assert response.get(Software) == Software(SOFTWARE)
    # The XOR by hand, not through the codec (RFC 8489 §14.2).
    at = transmit.data.index(b"\x00\x20\x00\x08")
    family, xport, xaddr = struct.unpack_from("!xBHI", transmit.data, at + 4)
    assert family == 1
    assert xport ^ (MAGIC_COOKIE >> 16) == CLIENT[1]
    assert xaddr ^ MAGIC_COOKIE == int.from_bytes(bytes(map(int, CLIENT[0].split("."))), "big")


def test_ipv6_client_gets_its_address_xored_with_cookie_and_transaction_id() -> None:
    transmit, response = answer(make_core(), binding_request(), LOCAL6, CLIENT6)
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT6)
    at = transmit.data.index(b"\x00\x20\x00\x14")
    raw = transmit.data[at + 8 : at + 24]
    key = struct.pack("!I", MAGIC_COOKIE) + TID
    import ipaddress

    unxored = bytes(a ^ b for a, b in zip(raw, key, strict=True))
    assert unxored == ipaddress.IPv6Address(CLIENT6[0]).packed
    assert transmit.destination == CLIENT6 and transmit.source == LOCAL6


def test_fingerprint_is_sent_even_when_the_request_has_none() -> None:
    _, response = answer(make_core(), binding_request(fingerprint=False))
    assert isinstance(response.attributes[-1], Fingerprint)


def test_software_is_configurable_and_can_be_left_out() -> None:
    _, response = answer(make_core(software="probe 1"), binding_request())
    assert response.get(Software) == Software("probe 1")
    _, response = answer(make_core(software=None), binding_request())
    assert response.get(Software) is None
    assert [type(a) for a in response.attributes] == [XorMappedAddress, Fingerprint]


def test_request_software_and_optional_unknown_attributes_are_ignored() -> None:
    request = binding_request(Software("client"), UnknownAttribute(0x8123, b"opt"))
    _, response = answer(make_core(), request)
    assert response.message_class is MessageClass.SUCCESS


def test_fast_path_and_general_path_send_identical_bytes() -> None:
    """respond_fast is an optimisation: it must agree with the Message-based path."""
    requests = [
        binding_request(),
        binding_request(fingerprint=False),
        binding_request(Software("client ü")),
        binding_request(Software("x" * 100), fingerprint=False),
    ]
    for software in (SOFTWARE, None, "ab"):
        core = make_core(software=software)
        for request in requests:
            for local, remote in (
                (LOCAL, CLIENT),
                (LOCAL6, CLIENT6),
                (LOCAL6, ("fe80::1%eth0", 5)),
            ):
                fast = core.respond_fast(request, remote, 0.0)
                assert fast
                general = core._handle(request, local, remote, 0.0, False)  # the slow path
                assert [fast] == [t.data for t in general]


def test_fast_path_declines_what_it_does_not_handle() -> None:
    core = make_core()
    declined = [
        binding_request(legacy=True),
        binding_request(ChangeRequest()),
        binding_request(message_class=MessageClass.INDICATION),
        binding_request(Software("x"))[:-1] + b"\x00",  # broken FINGERPRINT
        raw_message(0x0001, [(0x8022, b"\xff\xfe")]),  # SOFTWARE not UTF-8
        b"\x00\x01\x00\x08" + struct.pack("!I", MAGIC_COOKIE) + TID + b"\x80\x28\x00\x04",
    ]
    for request in declined:
        assert core.respond_fast(request, CLIENT, 0.0) is None


# -- RFC 3489 clients (RFC 8489 §12.2) ----------------------------------------------------------


def test_rfc3489_request_gets_mapped_address_without_xor_or_fingerprint() -> None:
    request = binding_request(legacy=True)
    transmit, response = answer(make_core(), request)
    assert response.legacy
    assert transmit.data[4:20] == LEGACY_TID  # its "cookie" bytes copied back
    assert [type(a) for a in response.attributes] == [MappedAddress, Software]
    assert response.get(MappedAddress) == MappedAddress(CLIENT)


def test_rfc3489_request_in_rfc5780_mode_gets_source_and_changed_address() -> None:
    request = binding_request(ChangeRequest(change_ip=True, change_port=True), legacy=True)
    transmit, response = answer(make_5780_core(), request)
    assert transmit.source == (A2, P2)
    assert response.get(MappedAddress) == MappedAddress(CLIENT)
    assert response.get(SourceAddress) == SourceAddress((A2, P2))
    assert response.get(ChangedAddress) == ChangedAddress((A2, P2))
    assert response.get(XorMappedAddress) is None and response.get(Fingerprint) is None


def test_rfc3489_response_address_is_refused_as_unknown() -> None:
    from tsunagu.stun.attributes import ResponseAddress

    _, response = answer(make_core(), binding_request(ResponseAddress(CLIENT), legacy=True))
    assert error_of(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x0002,))
    assert response.get(Fingerprint) is None  # still an RFC 3489 exchange


# -- what is not answered (RFC 8489 §6.3: silently discarded) -----------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(binding_request(message_class=MessageClass.INDICATION), id="indication"),
        pytest.param(binding_request(message_class=MessageClass.SUCCESS), id="success"),
        pytest.param(binding_request(message_class=MessageClass.ERROR), id="error"),
        pytest.param(binding_request(method=Method.ALLOCATE), id="allocate-request"),
        pytest.param(binding_request(method=0x0FF), id="unknown-method"),
        pytest.param(binding_request()[:-1] + b"\x00", id="bad-fingerprint"),
        pytest.param(binding_request()[:-4], id="truncated"),
        pytest.param(binding_request() + b"\x00\x00\x00\x00", id="trailing-bytes"),
        pytest.param(raw_message(0x0001, [(0x8022, b"abc")])[:-4], id="attribute-overruns"),
        pytest.param(b"\x16\xfe\xfd" + bytes(30), id="dtls"),
        pytest.param(b"\x80" + bytes(40), id="rtp"),
        pytest.param(b"\x40\x00\x00\x04data", id="channel-data"),
        pytest.param(b"", id="empty"),
        pytest.param(bytes(19), id="short"),
        pytest.param(b"\x00\x01\x00\x03" + bytes(19), id="length-not-multiple-of-4"),
    ],
)
def test_discarded_without_reply(data: bytes) -> None:
    core = make_core()
    assert core.handle_datagram(data, LOCAL, CLIENT, 0.0) == []
    assert core.handle_datagram(data, LOCAL, CLIENT, 0.0, stream=True) == []


# -- 420 and 400 (RFC 8489 §6.3.1, §14.8) -------------------------------------------------------


def test_unknown_comprehension_required_attributes_get_420_listing_them() -> None:
    request = binding_request(
        UnknownAttribute(0x7001, b"a"),
        UnknownAttribute(0x8100, b"optional"),  # comprehension-optional: ignored
        UnknownAttribute(0x0030, b""),
        UnknownAttribute(0x7001, b"again"),  # listed once
    )
    transmit, response = answer(make_core(), request)
    assert transmit.destination == CLIENT
    assert response.transaction_id == TID
    assert error_of(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x7001, 0x0030))
    assert isinstance(response.attributes[-1], Fingerprint)
    assert response.get(Software) == Software(SOFTWARE)


def test_change_request_without_rfc5780_is_420() -> None:
    # RFC 5780 §6: a server without a second address MUST answer CHANGE-REQUEST with 420.
    for flags in ((False, False), (True, True)):
        _, response = answer(make_core(), binding_request(ChangeRequest(*flags)))
        assert error_of(response) == 420
        assert response.get(UnknownAttributes) == UnknownAttributes((0x0003,))


@pytest.mark.parametrize(
    "attribute",
    [
        pytest.param((0x0020, b"\x00\x07\x00\x01\x00\x00\x00\x00"), id="xor-address-family-7"),
        pytest.param((0x0001, b"\x00\x01\x00"), id="mapped-address-short"),
        pytest.param((0x0003, b"\x00\x00\x06"), id="change-request-3-bytes"),
        pytest.param((0x0027, b"\x00\x01"), id="response-port-2-bytes"),
        pytest.param((0x8022, b"\xff\xfe\xfd"), id="software-not-utf8"),
        pytest.param((0x0008, b"short"), id="message-integrity-5-bytes"),
    ],
)
def test_recognisable_request_with_malformed_attribute_gets_400(
    attribute: tuple[int, bytes],
) -> None:
    for fingerprint in (False, True):
        request = raw_message(0x0001, [attribute], fingerprint=fingerprint)
        transmit, response = answer(make_core(), request)
        assert transmit.destination == CLIENT
        assert response.transaction_id == TID
        assert error_of(response) == 400


def test_malformed_rfc3489_request_gets_legacy_400() -> None:
    request = raw_message(0x0001, [(0x0001, b"\x00\x09")], head=LEGACY_TID)
    _, response = answer(make_core(), request)
    assert response.legacy and response.transaction_id == LEGACY_TID
    assert error_of(response) == 400
    assert response.get(Fingerprint) is None


# -- RFC 5780 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "flags", "source", "other"),
    [
        # RFC 5780 §6.1 Table 1, from each of the four local addresses.
        ((A1, P1), (False, False), (A1, P1), (A2, P2)),
        ((A1, P1), (True, False), (A2, P1), (A2, P2)),
        ((A1, P1), (False, True), (A1, P2), (A2, P2)),
        ((A1, P1), (True, True), (A2, P2), (A2, P2)),
        ((A2, P1), (False, False), (A2, P1), (A1, P2)),
        ((A2, P1), (False, True), (A2, P2), (A1, P2)),
        ((A1, P2), (True, False), (A2, P2), (A2, P1)),
        ((A2, P2), (True, True), (A1, P1), (A1, P1)),
    ],
)
def test_rfc5780_change_request_picks_the_source(
    local: Address, flags: tuple[bool, bool], source: Address, other: Address
) -> None:
    request = binding_request(ChangeRequest(*flags))
    transmit, response = answer(make_5780_core(), request, local)
    assert transmit.source == source
    assert transmit.destination == CLIENT
    assert response.get(ResponseOrigin) == ResponseOrigin(source)
    assert response.get(OtherAddress) == OtherAddress(other)
    # RFC 5780 §6.1: both MAPPED-ADDRESS and XOR-MAPPED-ADDRESS.
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)
    assert response.get(MappedAddress) == MappedAddress(CLIENT)


def test_rfc5780_attributes_without_change_request() -> None:
    transmit, response = answer(make_5780_core(), binding_request())
    assert transmit.source == LOCAL
    assert response.get(ResponseOrigin) == ResponseOrigin(LOCAL)
    assert response.get(OtherAddress) == OtherAddress((A2, P2))


def test_rfc5780_applies_only_to_its_four_addresses() -> None:
    core = make_5780_core()
    assert set(core.rfc5780_addresses) == {(A1, P1), (A1, P2), (A2, P1), (A2, P2)}
    assert not core.fast_path_ok(LOCAL) and core.fast_path_ok(LOCAL6)
    _, response = answer(core, binding_request(), LOCAL6, CLIENT6)
    assert response.get(OtherAddress) is None and response.get(ResponseOrigin) is None
    _, response = answer(core, binding_request(ChangeRequest(True, True)), LOCAL6, CLIENT6)
    assert error_of(response) == 420


def test_rfc5780_over_tcp_answers_on_the_connection_or_refuses() -> None:
    core = make_5780_core()
    transmit, response = answer(core, binding_request(ChangeRequest()), stream=True)
    assert transmit.source == LOCAL and response.get(OtherAddress) == OtherAddress((A2, P2))
    for flags in ((True, False), (False, True)):
        _, response = answer(core, binding_request(ChangeRequest(*flags)), stream=True)
        assert error_of(response) == 420
        assert response.get(UnknownAttributes) == UnknownAttributes((0x0003,))


def test_response_port_redirects_the_response_on_udp_only() -> None:
    core = make_5780_core()
    transmit, response = answer(core, binding_request(ResponsePort(5000)))
    assert transmit.destination == (CLIENT[0], 5000)
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)  # still the source
    # Works without RFC 5780 too (it needs no second address).
    transmit, _ = answer(make_core(), binding_request(ResponsePort(5001)))
    assert transmit.destination == (CLIENT[0], 5001)
    transmit, response = answer(core, binding_request(ResponsePort(5000)), stream=True)
    assert error_of(response) == 420 and transmit.destination == CLIENT
    assert response.get(UnknownAttributes) == UnknownAttributes((0x0027,))


def test_response_port_with_padding_or_port_zero_is_400() -> None:
    core = make_5780_core()
    transmit, response = answer(core, binding_request(ResponsePort(5000), Padding(bytes(64))))
    assert error_of(response) == 400  # RFC 5780 §6.1, §7.5
    assert transmit.destination == CLIENT  # refused, so not redirected
    _, response = answer(core, binding_request(ResponsePort(0)))
    assert error_of(response) == 400


def test_padding_is_echoed_but_never_outgrows_the_request() -> None:
    core = make_5780_core()
    # A client testing fragmentation pads its request to the MTU (RFC 5780 §7.6).
    big = binding_request(Padding(bytes(1500)))
    transmit, response = answer(core, big)
    padding = response.get(Padding)
    assert padding is not None and len(padding.value) > 1000
    assert len(padding.value) % 4 == 0
    assert len(transmit.data) <= len(big)
    # A small request gets PADDING (it MUST be there) but no amplification.
    small = binding_request(Padding(b"pad!"))
    transmit, response = answer(core, small)
    assert response.get(Padding) is not None
    unpadded = len(answer(core, binding_request())[0].data)
    assert len(transmit.data) <= max(len(small), unpadded + 4)
    # The configured length caps it.
    transmit, response = answer(make_5780_core(padding_length=100), big)
    padding = response.get(Padding)
    assert padding is not None and len(padding.value) == 100


def test_unauthenticated_responses_stay_small() -> None:
    """Amplification report. For the requests an attacker would pick (the smallest), the
    response size and the ratio response/request, payload only and on the wire (with the
    28-byte UDP/IPv4 or 48-byte UDP/IPv6 headers both ways):

    ======================  =======  =========  ===========  =============
    configuration           request  response   payload x    wire x
    ======================  =======  =========  ===========  =============
    default, IPv4           20 / 28  60         3.0 / 2.14   1.83 / 1.57
    default, IPv6           20 / 28  72         3.6 / 2.57   1.76 / 1.58
    software=None, IPv4     20 / 28  40         2.0 / 1.43   1.42 / 1.21
    RFC 5780, IPv4          20 / 28  96         4.8 / 3.43   2.58 / 2.21
    ======================  =======  =========  ===========  =============

    (coturn 4.6 answers the same 20 bytes with RESPONSE-ORIGIN and a longer SOFTWARE.)
    Rate limiting then bounds the rate, and PADDING and 420 lists are bounded by the
    request's own size (see the property tests below).
    """
    smallest = binding_request(fingerprint=False)  # a bare header
    typical = binding_request()  # header + FINGERPRINT
    assert (len(smallest), len(typical)) == (20, 28)
    cases = {
        "default ipv4": (make_core(), LOCAL, CLIENT, 60, 28),
        "default ipv6": (make_core(), LOCAL6, CLIENT6, 72, 48),
        "no software ipv4": (make_core(software=None), LOCAL, CLIENT, 40, 28),
        "rfc5780 ipv4": (make_5780_core(), LOCAL, CLIENT, 96, 28),
    }
    payload: dict[tuple[str, int], float] = {}
    wire: dict[tuple[str, int], float] = {}
    for name, (core, local, remote, size, headers) in cases.items():
        for request in (smallest, typical):
            transmit, _ = answer(core, request, local, remote)
            assert len(transmit.data) == size, name
            payload[name, len(request)] = len(transmit.data) / len(request)
            wire[name, len(request)] = (len(transmit.data) + headers) / (len(request) + headers)
    assert payload["default ipv4", 20] == 3.0
    assert max(payload.values()) <= 5.0, payload
    assert max(wire.values()) <= 2.6, wire
    assert wire["default ipv4", 28] < 1.6


# -- rate limiting on a virtual clock -------------------------------------------------------------


def test_rate_limit_per_source_with_virtual_time() -> None:
    core = make_core(rate_limit=1.0, rate_burst=3)
    request = binding_request()

    def answered(now: float, remote: Address = CLIENT) -> bool:
        return bool(core.handle_datagram(request, LOCAL, remote, now))

    assert [answered(0.0) for _ in range(4)] == [True, True, True, False]  # burst of 3
    assert not answered(0.5)  # half a token
    assert answered(1.0)  # one token a second
    assert not answered(1.0)
    assert answered(0.0, ("198.51.100.8", 1))  # another source has its own bucket
    assert not answered(0.9)  # a clock going backwards refills nothing
    assert answered(100.0) and answered(100.0) and answered(100.0)  # capped at the burst
    assert not answered(100.0)


def test_rate_limit_covers_every_reply_but_not_discarded_input() -> None:
    core = make_core(rate_limit=1.0, rate_burst=2)
    indication = binding_request(message_class=MessageClass.INDICATION)
    bad_fingerprint = binding_request(UnknownAttribute(0x7001, b""))[:-1] + b"\x00"
    overrun = struct.pack("!HHI", 1, 12, MAGIC_COOKIE) + TID + struct.pack("!HH", 1, 99) + bytes(8)
    for _ in range(10):
        for discarded in (indication, b"\x17junk", bad_fingerprint, overrun):
            assert core.handle_datagram(discarded, LOCAL, CLIENT, 0.0) == []
            assert core.handle_datagram(discarded, LOCAL, CLIENT, 0.0, stream=True) == []
    legacy = binding_request(legacy=True)  # the general path counts too
    unknown = binding_request(UnknownAttribute(0x7001, b""))  # and so do errors
    assert core.handle_datagram(legacy, LOCAL, CLIENT, 0.0)
    assert core.handle_datagram(unknown, LOCAL, CLIENT, 0.0)
    assert core.handle_datagram(binding_request(), LOCAL, CLIENT, 0.0) == []
    assert core.handle_datagram(legacy, LOCAL, CLIENT, 0.0, stream=True) == []


def test_rate_limit_keys_ipv6_by_slash_64() -> None:
    core = make_core(rate_limit=1.0, rate_burst=1)
    request = binding_request()
    assert core.handle_datagram(request, LOCAL6, ("2001:db8:1:2::1", 1), 0.0)
    assert not core.handle_datagram(request, LOCAL6, ("2001:db8:1:2:ffff::7", 2), 0.0)
    assert core.handle_datagram(request, LOCAL6, ("2001:db8:1:3::1", 1), 0.0)
    # An IPv4-mapped source is its IPv4 host.
    assert core.handle_datagram(request, LOCAL6, ("::ffff:198.51.100.7", 1), 0.0)
    assert not core.handle_datagram(request, LOCAL, CLIENT, 0.0)


def test_rate_limiter_state_is_bounded_with_lru_eviction() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, capacity=2)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
    assert not limiter.allow("a", 0.0)  # "a" is now the most recently used
    assert limiter.allow("c", 0.0)  # evicts "b", the least recently used
    assert len(limiter) == 2 and "b" not in limiter and "a" in limiter
    assert not limiter.allow("a", 0.0)  # "a" kept its empty bucket
    assert limiter.allow("b", 0.0)  # "b" comes back with a full one

    core = make_core(rate_limit=10.0, rate_burst=5, max_tracked_sources=100)
    for i in range(1000):
        core.handle_datagram(binding_request(), LOCAL, (f"10.0.{i // 256}.{i % 256}", 1), 0.0)
    assert core.tracked_sources == 100


# -- robustness ---------------------------------------------------------------------------------


def check_transmits(data: bytes, transmits: list[Transmit]) -> None:
    assert isinstance(transmits, list)
    for transmit in transmits:
        assert isinstance(transmit, Transmit) and isinstance(transmit.data, bytes)
        response = Message.decode(transmit.data)
        assert response.method == Method.BINDING
        assert response.message_class in (MessageClass.SUCCESS, MessageClass.ERROR)
        assert transmit.data[4:20] == data[4:20]  # cookie and transaction ID echoed
        # No amplification beyond a small constant, whatever the request.
        assert len(transmit.data) <= len(data) + 160


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200), stream=st.booleans())
def test_any_bytes_give_transmits_or_nothing(data: bytes, stream: bool) -> None:
    for core in (make_core(), make_5780_core()):
        check_transmits(data, core.handle_datagram(data, LOCAL, CLIENT, 0.0, stream=stream))


_INTERESTING_TYPES = [
    0x0001, 0x0002, 0x0003, 0x0006, 0x0008, 0x0009, 0x000A, 0x0020, 0x0024, 0x0025, 0x0026,
    0x0027, 0x7001, 0x8022, 0x8028, 0x8029, 0x802B, 0x802C, 0x8123,
]  # fmt: skip


@st.composite
def stun_like(draw: st.DrawFn) -> bytes:
    """Messages with a valid Binding header and arbitrary attributes, to get past framing."""
    attributes = draw(
        st.lists(st.tuples(st.sampled_from(_INTERESTING_TYPES), st.binary(max_size=24)), max_size=6)
    )
    head = draw(st.sampled_from([struct.pack("!I", MAGIC_COOKIE) + TID, LEGACY_TID]))
    message_type = draw(st.sampled_from([0x0001, 0x0001, 0x0011, 0x0101]))
    return raw_message(message_type, attributes, fingerprint=draw(st.booleans()), head=head)


@settings(max_examples=400, deadline=None)
@given(data=stun_like(), stream=st.booleans())
def test_stun_shaped_input_never_raises(data: bytes, stream: bool) -> None:
    for core in (make_core(), make_5780_core(padding_length=64)):
        for local in (LOCAL, (A2, P2), LOCAL6):
            check_transmits(data, core.handle_datagram(data, local, CLIENT, 0.0, stream=stream))


# -- configuration ------------------------------------------------------------------------------


def test_parse_and_format_addresses() -> None:
    assert parse_address("127.0.0.1:3478") == ("127.0.0.1", 3478)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("[2001:DB8::1]") == ("2001:db8::1", 3478)
    assert parse_address("::1") == ("::1", 3478)
    assert parse_address("10.0.0.1", 5349) == ("10.0.0.1", 5349)
    assert format_address(("::1", 5)) == "[::1]:5"
    for bad in ("localhost:3478", "1.2.3.4:99999", "[::1", "[::1]x", "1.2.3.4:", "1.2.3.4:-1"):
        with pytest.raises(ValueError):
            parse_address(bad)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"listen": ()}, "nothing to listen on"),
        ({"tls_listen": (("127.0.0.1", 5349),)}, "needs cert and key"),
        ({"cert": "c.pem"}, "go together"),
        ({"other": ("127.0.0.2", 3479)}, "specific IP"),  # default listen is 0.0.0.0
        ({"listen": (("127.0.0.1", 3478),), "other": ("127.0.0.1", 3479)}, "second IP"),
        ({"listen": (("127.0.0.1", 3478),), "other": ("127.0.0.2", 3478)}, "second port"),
        ({"listen": (("::1", 3478),), "other": ("127.0.0.2", 3479)}, "same family"),
        ({"rate_limit": -1.0}, "rate_limit"),
        ({"rate_limit": float("nan")}, "rate_limit"),
        ({"rate_burst": 0}, "rate_burst"),
        ({"max_tracked_sources": 0}, "max_tracked_sources"),
        ({"workers": 0}, "workers"),
        ({"idle_timeout": 0.0}, "idle_timeout"),
        ({"software": "x" * 200}, "128"),
        ({"padding_length": 70000}, "padding_length"),
        ({"log_level": "loud"}, "log_level"),
        ({"listen": (("127.0.0.1", 70000),)}, "bad port"),
    ],
)
def test_config_rejects_nonsense(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StunServerConfig(**values)  # type: ignore[arg-type]


def test_core_needs_resolved_rfc5780_ports() -> None:
    config = StunServerConfig(listen=(("127.0.0.1", 0),), other=("127.0.0.2", 0))
    with pytest.raises(ValueError, match="resolved"):
        StunServerCore(config)
    # Without RFC 5780 the core does not care about ports.
    StunServerCore(StunServerConfig(listen=(("127.0.0.1", 0),)))


def test_config_defaults() -> None:
    config = StunServerConfig()
    assert config.listen == (("0.0.0.0", 3478),)
    assert config.software == SOFTWARE
    assert config.other is None and config.rfc5780_primary is None
    assert config.rate_limit > 0 and config.workers == 1


def test_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "stun.toml"
    path.write_text(
        'listen = ["127.0.0.1:3478", "[::1]:3478"]\n'
        'other = "127.0.0.2:3479"\n'
        "software = false\n"
        "rate-limit = 5\n"
        "rate_burst = 7\n"
        "workers = 2\n"
    )
    config = load_toml(path, rate_burst=9)
    assert config.listen == (("127.0.0.1", 3478), ("::1", 3478))
    assert config.other == ("127.0.0.2", 3479)
    assert config.rfc5780_primary == ("127.0.0.1", 3478)
    assert config.software is None
    assert config.rate_limit == 5.0 and isinstance(config.rate_limit, float)
    assert config.rate_burst == 9  # the override wins
    assert config.workers == 2


def test_toml_rejects_unknown_keys_and_wrong_types(tmp_path: Path) -> None:
    path = tmp_path / "stun.toml"
    path.write_text('listen = "127.0.0.1:3478"\nrate-limt = 5\nsoftwar = "x"\n')
    with pytest.raises(ValueError, match=r"unknown setting\(s\) rate-limt, softwar"):
        load_toml(path)
    with pytest.raises(ValueError, match="workers: expected an integer"):
        config_values({"workers": "2"})
    with pytest.raises(ValueError, match="expected an integer"):
        config_values({"workers": True})
    with pytest.raises(ValueError, match="listen: expected HOST:PORT"):
        config_values({"listen": [3478]})
    path.write_text("listen = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(path)
    path.write_text('other = "127.0.0.2:3479"\n')
    with pytest.raises(ValueError, match=str(path)):
        load_toml(path)
