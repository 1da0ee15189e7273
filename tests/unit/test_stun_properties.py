"""Properties of the STUN codec, checked with hypothesis.

(a) any bytes: ``Message.decode``, ``ChannelData.decode`` and ``StreamFramer.feed`` return
    or raise :class:`StunDecodeError`, nothing else (the h11/wsproto fuzz rule), and
    ``verify_integrity`` on whatever decodes returns a bool;
(b) the same for valid messages with bytes flipped, inserted or deleted;
(c) generated messages survive encode -> decode with equal attribute values;
(d) a header that claims more than arrived is refused at once, without allocating for it.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsunagu.errors import StunDecodeError
from tsunagu.stun import ATTRIBUTE_CLASSES, ChannelData, Message, MessageClass, StreamFramer
from tsunagu.stun.attributes import (
    AdditionalAddressFamily,
    AddressErrorCode,
    AlternateDomain,
    AlternateServer,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    ErrorCodeAttr,
    EvenPort,
    Fingerprint,
    IceControlled,
    IceControlling,
    Icmp,
    Lifetime,
    MappedAddress,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    OtherAddress,
    Padding,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    ResponseAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttribute,
    UnknownAttributes,
    UseCandidate,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)

KEY = b"VOkJxbRl1RmTxUk/WvJxBt"
COOKIE = b"\x21\x12\xa4\x42"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
addresses = st.tuples(st.ip_addresses().map(str), u16)


def text(max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_bytes // 2).filter(lambda s: len(s.encode()) <= max_bytes)


def _address(cls: type[Attribute]) -> st.SearchStrategy[Attribute]:
    return st.builds(cls, addresses)


ATTRIBUTE_STRATEGIES: dict[type[Attribute], st.SearchStrategy[Attribute]] = {
    **{
        cls: _address(cls)
        for cls in (
            MappedAddress,
            ResponseAddress,
            SourceAddress,
            ChangedAddress,
            AlternateServer,
            ResponseOrigin,
            OtherAddress,
            XorMappedAddress,
            XorPeerAddress,
            XorRelayedAddress,
        )
    },
    Username: st.builds(Username, text(513)),
    Realm: st.builds(Realm, text(120)),
    Nonce: st.builds(Nonce, text(120)),
    Software: st.builds(Software, text(120)),
    AlternateDomain: st.builds(AlternateDomain, text(255)),
    Data: st.builds(Data, st.binary(max_size=300)),
    Padding: st.builds(Padding, st.binary(max_size=64)),
    ReservationToken: st.builds(ReservationToken, st.binary(min_size=8, max_size=8)),
    Userhash: st.builds(Userhash, st.binary(min_size=32, max_size=32)),
    MessageIntegrity: st.builds(MessageIntegrity, st.binary(min_size=20, max_size=20)),
    MessageIntegritySha256: st.builds(
        MessageIntegritySha256,
        st.sampled_from([16, 20, 24, 28, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    ),
    Fingerprint: st.builds(Fingerprint, u32),
    Lifetime: st.builds(Lifetime, u32),
    Priority: st.builds(Priority, u32),
    ConnectionId: st.builds(ConnectionId, u32),
    IceControlled: st.builds(IceControlled, u64),
    IceControlling: st.builds(IceControlling, u64),
    ChannelNumber: st.builds(ChannelNumber, u16),
    ResponsePort: st.builds(ResponsePort, u16),
    UseCandidate: st.just(UseCandidate()),
    DontFragment: st.just(DontFragment()),
    RequestedTransport: st.builds(RequestedTransport, u8),
    RequestedAddressFamily: st.builds(RequestedAddressFamily, u8),
    AdditionalAddressFamily: st.builds(AdditionalAddressFamily, u8),
    EvenPort: st.builds(EvenPort, st.booleans()),
    ChangeRequest: st.builds(ChangeRequest, st.booleans(), st.booleans()),
    ErrorCodeAttr: st.builds(ErrorCodeAttr, st.integers(300, 699), text(200)),
    AddressErrorCode: st.builds(AddressErrorCode, u8, st.integers(300, 699), text(100)),
    Icmp: st.builds(Icmp, st.integers(0, 127), st.integers(0, 511), u32),
    UnknownAttributes: st.builds(UnknownAttributes, st.lists(u16, max_size=8).map(tuple)),
    PasswordAlgorithm: st.builds(PasswordAlgorithm, u16, st.binary(max_size=12)),
    PasswordAlgorithms: st.builds(
        PasswordAlgorithms,
        st.lists(st.tuples(u16, st.binary(max_size=12)), max_size=4).map(tuple),
    ),
}
COMPUTED = (MessageIntegrity, MessageIntegritySha256, Fingerprint)
unknown_attributes = st.builds(
    UnknownAttribute,
    u16.filter(lambda t: t not in ATTRIBUTE_CLASSES),
    st.binary(max_size=40),
)
message_attributes = st.one_of(
    *(s for cls, s in ATTRIBUTE_STRATEGIES.items() if cls not in COMPUTED), unknown_attributes
)


@st.composite
def messages(draw: st.DrawFn, max_method: int = 0xFFF) -> tuple[Message, bytes | None, str, bool]:
    legacy = draw(st.booleans()) and draw(st.booleans())  # a quarter are RFC 3489
    if legacy:
        tid = draw(st.binary(min_size=16, max_size=16).filter(lambda b: not b.startswith(COOKIE)))
    else:
        tid = draw(st.binary(min_size=12, max_size=12))
    message = Message(
        draw(st.integers(0, max_method)),
        draw(st.sampled_from(MessageClass)),
        tid,
        draw(st.lists(message_attributes, max_size=8)),
        legacy=legacy,
    )
    key = draw(st.none() | st.binary(max_size=80))
    return message, key, draw(st.sampled_from(["sha1", "sha256"])), draw(st.booleans())


def encode(generated: tuple[Message, bytes | None, str, bool]) -> bytes:
    message, key, integrity, fingerprint = generated
    return message.encode(key, integrity="sha256" if integrity == "sha256" else "sha1",
                          fingerprint=fingerprint)  # fmt: skip


@st.composite
def plausible_stun(draw: st.DrawFn) -> bytes:
    """A well-formed header (type bits, length, usually the cookie) over arbitrary
    attribute bytes, so the attribute parser is reached rather than the header checks."""
    body = draw(st.binary(max_size=200))
    body += bytes(-len(body) % 4)
    cookie = (
        COOKIE
        if draw(st.booleans()) or draw(st.booleans())
        else draw(st.binary(min_size=4, max_size=4))
    )
    header = struct.pack("!HH", draw(st.integers(0, 0x3FFF)), len(body)) + cookie
    return header + draw(st.binary(min_size=12, max_size=12)) + body


@st.composite
def tlv_soup(draw: st.DrawFn) -> bytes:
    """A header over a sequence of TLVs with known and unknown types and random values."""
    types = st.sampled_from(sorted(ATTRIBUTE_CLASSES)) | u16
    body = b""
    for attr_type, value in draw(st.lists(st.tuples(types, st.binary(max_size=40)), max_size=8)):
        body += struct.pack("!HH", attr_type, len(value)) + value + bytes(-len(value) % 4)
    if draw(st.booleans()):  # a correct FINGERPRINT on top, to get past that check too
        header = struct.pack("!HH", 0x0001, len(body) + 8) + COOKIE + bytes(12)
        crc = zlib.crc32(header + body) ^ 0x5354554E
        return header + body + struct.pack("!HHI", 0x8028, 4, crc)
    return struct.pack("!HH", 0x0001, len(body)) + COOKIE + bytes(12) + body


def check_decoders(data: bytes) -> None:
    """The fuzz rule: decoders return, or raise StunDecodeError; nothing else escapes."""
    try:
        message = Message.decode(data)
    except StunDecodeError:
        pass
    else:
        assert message.raw == data
        assert isinstance(message.verify_integrity(KEY), bool)
        assert isinstance(message.unknown_comprehension_required(), tuple)
        # Whatever decodes can be encoded again, and that decodes to the same attributes
        # (except what follows an integrity attribute, which decode drops).
        again = Message.decode(message.encode())
        kept = [a for a in message.attributes if not isinstance(a, COMPUTED)]
        assert again.attributes == kept
    try:
        frame = ChannelData.decode(data)
    except StunDecodeError:
        pass
    else:
        assert 0x4000 <= frame.channel <= 0x4FFF
        assert frame.data == data[4 : 4 + len(frame.data)]
    framer = StreamFramer()
    fed = 0
    try:
        for chunk in (data[:7], data[7:50], data[50:]):
            fed += len(chunk)
            for out in framer.feed(chunk):
                fed -= len(out)
                assert out and (out[0] <= 3 or 64 <= out[0] <= 79)
            assert framer.buffered == fed
    except StunDecodeError:
        pass


# --- (a) any bytes -------------------------------------------------------------------------


@THOROUGH
@given(st.binary(max_size=300))
def test_any_bytes(data: bytes) -> None:
    check_decoders(data)


@THOROUGH
@given(plausible_stun())
def test_any_attribute_bytes_under_a_valid_header(data: bytes) -> None:
    check_decoders(data)


@THOROUGH
@given(tlv_soup())
def test_any_tlv_sequence(data: bytes) -> None:
    check_decoders(data)


# --- (b) mutated valid messages ------------------------------------------------------------

mutation = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0), u8)


@THOROUGH
@given(messages(), st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_messages(
    generated: tuple[Message, bytes | None, str, bool],
    mutations: list[tuple[str, int, int]],
    fix_length: bool,
) -> None:
    data = bytearray(encode(generated))
    for kind, where, byte in mutations:
        index = where % (len(data) + 1)
        if kind == "insert":
            data.insert(index, byte)
        elif index < len(data):
            if kind == "flip":
                data[index] ^= byte or 1
            else:
                del data[index]
    if fix_length and 20 <= len(data) <= 0xFFFF + 20:
        # Keep the header length right so the attribute walk is what gets exercised.
        data[2:4] = struct.pack("!H", len(data) - 20)
    check_decoders(bytes(data))


# --- (c) round trip ------------------------------------------------------------------------


@THOROUGH
@given(messages())
def test_generated_messages_round_trip(generated: tuple[Message, bytes | None, str, bool]) -> None:
    message, key, integrity, fingerprint = generated
    data = encode(generated)
    decoded = Message.decode(data)
    assert decoded.method == message.method
    assert decoded.message_class is message.message_class
    assert decoded.transaction_id == message.transaction_id
    assert decoded.legacy == message.legacy
    trailer: list[type[Attribute]] = []
    if key is not None:
        trailer.append(MessageIntegritySha256 if integrity == "sha256" else MessageIntegrity)
    if fingerprint:
        trailer.append(Fingerprint)
    body = decoded.attributes[: len(decoded.attributes) - len(trailer)]
    assert body == message.attributes
    assert [type(a) for a in decoded.attributes[len(body) :]] == trailer
    if key is not None:
        assert decoded.integrity_algorithm == integrity
        assert decoded.verify_integrity(key)
        assert not decoded.verify_integrity(key + b"!")
    else:
        assert decoded.integrity_algorithm is None
        assert not decoded.verify_integrity(KEY)
    # Encoding is deterministic and decoding then re-encoding gives the same bytes.
    assert encode(generated) == data
    if key is not None:
        assert decoded.encode(key, integrity=decoded.integrity_algorithm or "sha1",
                              fingerprint=fingerprint) == data  # fmt: skip


@FAST
@given(st.one_of(*ATTRIBUTE_STRATEGIES.values()), st.binary(min_size=16, max_size=16))
def test_attribute_values_round_trip(attribute: Attribute, xor_key: bytes) -> None:
    value = attribute.encode_value(xor_key)
    assert type(attribute).decode_value(value, xor_key) == attribute


def test_strategies_cover_every_attribute_class() -> None:
    assert set(ATTRIBUTE_STRATEGIES) == set(ATTRIBUTE_CLASSES.values())


@FAST
@given(messages(max_method=0xFF), st.integers(1, 64))
def test_stream_framer_reassembles_any_chunking(
    generated: tuple[Message, bytes | None, str, bool], chunk: int
) -> None:
    # Methods 0x100-0xFFF are reserved (RFC 7983 §7, IANA) so that STUN's first byte is 0-3;
    # the framer relies on that, so only methods below 0x100 are framed here.
    frames = [encode(generated), ChannelData(0x4001, b"abc").encode(stream=True)] * 2
    stream = b"".join(frames)
    framer = StreamFramer()
    out: list[bytes] = []
    for start in range(0, len(stream), chunk):
        out.extend(framer.feed(stream[start : start + chunk]))
    assert out == frames
    assert framer.buffered == 0


# --- (d) no unbounded work for a lying header ---------------------------------------------


def _lying_header(length: int = 0xFFFF) -> bytes:
    return struct.pack("!HH", 0x0001, length) + COOKIE + bytes(12)


def test_a_length_claim_beyond_the_data_is_refused_fast() -> None:
    data = _lying_header()
    start = time.perf_counter()
    for _ in range(10_000):
        try:
            Message.decode(data)
        except StunDecodeError:
            pass
        else:  # pragma: no cover - the assertion below reports it
            raise AssertionError("decoded a message that claims 65535 bytes it lacks")
    assert time.perf_counter() - start < 1.0


def test_decoding_a_lying_header_allocates_nothing_for_the_claim() -> None:
    short = _lying_header()
    # A large buffer whose header lies about the length: refused before any copy.
    large = bytearray(_lying_header(0xFFFC) + bytes(1_000_000))

    def refuse(decode: Callable[[], Message]) -> None:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            decode()
        except StunDecodeError:
            pass
        else:  # pragma: no cover
            raise AssertionError("decoded a lying header")
        assert tracemalloc.get_traced_memory()[1] - baseline < 16_384

    tracemalloc.start()
    try:
        refuse(lambda: Message.decode(short))
        refuse(lambda: Message.decode(large))  # type: ignore[arg-type]
        refuse(lambda: Message.decode(memoryview(large)))  # type: ignore[arg-type]
    finally:
        tracemalloc.stop()


def test_stream_framer_does_not_reserve_for_a_claimed_length() -> None:
    framer = StreamFramer()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        assert framer.feed(_lying_header()) == []
        assert tracemalloc.get_traced_memory()[1] - baseline < 16_384
    finally:
        tracemalloc.stop()
    assert framer.buffered == 20
    # The claimed frame is delivered once (and only once) all of it has arrived.
    assert framer.feed(bytes(0xFFFE)) == []
    frames = framer.feed(b"\x00")
    assert [len(f) for f in frames] == [20 + 0xFFFF]
    assert framer.buffered == 0
    # ... and is not a valid message (its length is not a multiple of 4).
    try:
        Message.decode(frames[0])
    except StunDecodeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a length that is not a multiple of 4 decoded")


def test_a_maximal_message_decodes_quickly() -> None:
    data = Message(0x001, MessageClass.INDICATION, bytes(12), [Data(bytes(0xFFFF - 4 - 8 - 3))])
    encoded = data.encode(fingerprint=True)
    start = time.perf_counter()
    for _ in range(200):
        Message.decode(encoded)
    assert time.perf_counter() - start < 1.0
