"""The STUN codec piece by piece: message types, every attribute, integrity and fingerprint
rules, legacy and unknown attributes, malformed input, ChannelData, stream framing, demux.

Messages that the encoder cannot produce (two integrity attributes, attributes after
MESSAGE-INTEGRITY or FINGERPRINT, truncated MESSAGE-INTEGRITY-SHA256, RFC 3489 headers) are
built by hand with the small wire helpers below, written from RFC 8489 and sharing no code
with tsunagu.
"""

from __future__ import annotations

import contextlib
import hmac
import struct
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.errors import RemoteProtocolError, StunDecodeError
from tsunagu.stun import (
    ATTRIBUTE_CLASSES,
    AttrType,
    ChannelData,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    PacketKind,
    StreamFramer,
    UnknownAttribute,
    classify,
    error_response,
    new_transaction_id,
    success_response,
)
from tsunagu.stun import message as message_module
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
    UnknownAttributes,
    UseCandidate,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import is_comprehension_required
from tsunagu.stun.message import (
    IntegrityAlgorithm,
    IntegrityKey,
    decode_message_type,
    encode_message_type,
)

TID = bytes(range(1, 13))
KEY = b"0123456789abcdefghijkl"
COOKIE = b"\x21\x12\xa4\x42"

# --- hand-made wire format (RFC 8489 §5, §14, §14.5-14.7) ----------------------------------


def tlv(attr_type: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + pad * (-len(value) % 4)


def wire(
    attrs: bytes,
    message_type: int = 0x0001,
    tid: bytes = TID,
    cookie: bytes = COOKIE,
    length: int | None = None,
) -> bytes:
    """A header (length from ``attrs`` unless given) and the attribute bytes."""
    size = len(attrs) if length is None else length
    return struct.pack("!HH", message_type, size) + cookie + tid + attrs


def add_integrity(message: bytes, key: bytes, algorithm: str = "sha1", size: int = 0) -> bytes:
    """Append MESSAGE-INTEGRITY (or -SHA256 truncated to ``size``) computed per §14.5/§14.6."""
    attr_type = 0x0008 if algorithm == "sha1" else 0x001C
    size = size or (20 if algorithm == "sha1" else 32)
    length = len(message) - 20 + 4 + size
    covered = message[:2] + struct.pack("!H", length) + message[4:]
    mac = hmac.new(key, covered, algorithm).digest()[:size]
    return covered + tlv(attr_type, mac)


def add_fingerprint(message: bytes, trailing: bytes = b"") -> bytes:
    """Append FINGERPRINT (§14.7), then ``trailing`` bytes counted in the header length."""
    length = len(message) - 20 + 8 + len(trailing)
    covered = message[:2] + struct.pack("!H", length) + message[4:]
    crc = zlib.crc32(covered) ^ 0x5354554E
    return covered + tlv(0x8028, struct.pack("!I", crc)) + trailing


# --- message types (RFC 8489 §5) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "message_class", "message_type"),
    [
        (Method.BINDING, MessageClass.REQUEST, 0x0001),
        (Method.BINDING, MessageClass.INDICATION, 0x0011),
        (Method.BINDING, MessageClass.SUCCESS, 0x0101),
        (Method.BINDING, MessageClass.ERROR, 0x0111),
        (Method.ALLOCATE, MessageClass.REQUEST, 0x0003),
        (Method.ALLOCATE, MessageClass.SUCCESS, 0x0103),
        (Method.ALLOCATE, MessageClass.ERROR, 0x0113),
        (Method.REFRESH, MessageClass.REQUEST, 0x0004),
        (Method.SEND, MessageClass.INDICATION, 0x0016),
        (Method.DATA, MessageClass.INDICATION, 0x0017),
        (Method.CREATE_PERMISSION, MessageClass.REQUEST, 0x0008),
        (Method.CHANNEL_BIND, MessageClass.SUCCESS, 0x0109),
        (Method.CONNECT, MessageClass.REQUEST, 0x000A),
        (Method.CONNECTION_BIND, MessageClass.REQUEST, 0x000B),
        (Method.CONNECTION_ATTEMPT, MessageClass.INDICATION, 0x001C),
        # All method bits set: M11..M7 C1 M6..M4 C0 M3..M0 with the class bits in between.
        (0xFFF, MessageClass.REQUEST, 0x3EEF),
        (0xFFF, MessageClass.INDICATION, 0x3EFF),
        (0xFFF, MessageClass.SUCCESS, 0x3FEF),
        (0xFFF, MessageClass.ERROR, 0x3FFF),
        (0x080, MessageClass.REQUEST, 0x0200),  # M7 moves two places up
        (0x010, MessageClass.REQUEST, 0x0020),  # M4 moves one place up
    ],
)
def test_message_type_interleaving(
    method: int, message_class: MessageClass, message_type: int
) -> None:
    assert encode_message_type(method, message_class) == message_type
    assert decode_message_type(message_type) == (method, message_class)
    encoded = Message(method, message_class, TID).encode()
    assert encoded[:2] == struct.pack("!H", message_type)


def test_message_type_is_a_bijection_over_all_methods_and_classes() -> None:
    seen = set()
    for method in range(0x1000):
        for message_class in MessageClass:
            message_type = encode_message_type(method, message_class)
            assert 0 <= message_type < 0x4000
            assert decode_message_type(message_type) == (method, message_class)
            seen.add(message_type)
    assert seen == set(range(0x4000))


def test_every_method_and_class_round_trips_through_a_message() -> None:
    for method in range(0x1000):
        for message_class in MessageClass:
            decoded = Message.decode(Message(method, message_class, TID).encode())
            assert (decoded.method, decoded.message_class) == (method, message_class)
            assert decoded.message_class is message_class


# --- every attribute class -----------------------------------------------------------------

EXAMPLES: dict[type[Attribute], list[Attribute]] = {
    MappedAddress: [MappedAddress(("192.0.2.1", 3478)), MappedAddress(("2001:db8::1", 1))],
    ResponseAddress: [ResponseAddress(("10.0.0.1", 0)), ResponseAddress(("::1", 65535))],
    SourceAddress: [SourceAddress(("198.51.100.7", 1234)), SourceAddress(("fe80::1", 5))],
    ChangedAddress: [ChangedAddress(("203.0.113.9", 3479)), ChangedAddress(("2001:db8::2", 9))],
    AlternateServer: [AlternateServer(("192.0.2.99", 3478)), AlternateServer(("::", 3478))],
    ResponseOrigin: [ResponseOrigin(("192.0.2.2", 3478)), ResponseOrigin(("2001:db8::3", 1))],
    OtherAddress: [OtherAddress(("192.0.2.3", 3479)), OtherAddress(("2001:db8::4", 2))],
    XorMappedAddress: [
        XorMappedAddress(("192.0.2.1", 32853)),
        XorMappedAddress(("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
        XorMappedAddress(("255.255.255.255", 0)),
    ],
    XorPeerAddress: [XorPeerAddress(("198.51.100.1", 49152)), XorPeerAddress(("::ffff:1", 7))],
    XorRelayedAddress: [
        XorRelayedAddress(("203.0.113.5", 50000)),
        XorRelayedAddress(("2001:db8::ffff", 65535)),
    ],
    Username: [Username("evtj:h6vY"), Username("\u30de\u30c8\u30ea\u30c3\u30af\u30b9")],
    Realm: [Realm("example.org")],
    Nonce: [Nonce("f//499k954d6OL34oL9FSTvy64sA"), Nonce("")],
    Software: [Software("tsunagu 0.1"), Software("x" * 763)],
    AlternateDomain: [AlternateDomain("turn.example.net")],
    Data: [Data(b""), Data(b"\x00\x01\x02"), Data(bytes(range(256)))],
    Padding: [Padding(b"\x00" * 7)],
    ReservationToken: [ReservationToken(b"12345678")],
    Userhash: [Userhash(bytes(range(32)))],
    MessageIntegrity: [MessageIntegrity(bytes(range(20)))],
    MessageIntegritySha256: [
        MessageIntegritySha256(bytes(range(32))),
        MessageIntegritySha256(bytes(range(16))),
    ],
    Fingerprint: [Fingerprint(0), Fingerprint(0xFFFFFFFF)],
    Lifetime: [Lifetime(600), Lifetime(0)],
    Priority: [Priority(0x6E0001FF)],
    ConnectionId: [ConnectionId(0xDEADBEEF)],
    IceControlled: [IceControlled(0x932FF9B151263B36)],
    IceControlling: [IceControlling(0xFFFFFFFFFFFFFFFF), IceControlling(0)],
    ChannelNumber: [ChannelNumber(0x4000), ChannelNumber(0x4FFF)],
    ResponsePort: [ResponsePort(5000)],
    UseCandidate: [UseCandidate()],
    DontFragment: [DontFragment()],
    RequestedTransport: [RequestedTransport(17), RequestedTransport(6)],
    RequestedAddressFamily: [RequestedAddressFamily(1), RequestedAddressFamily(2)],
    AdditionalAddressFamily: [AdditionalAddressFamily(2)],
    EvenPort: [EvenPort(True), EvenPort(False)],
    ChangeRequest: [
        ChangeRequest(True, True),
        ChangeRequest(True, False),
        ChangeRequest(False, True),
        ChangeRequest(),
    ],
    ErrorCodeAttr: [
        ErrorCodeAttr(438, "Stale Nonce"),
        ErrorCodeAttr(300, ""),
        ErrorCodeAttr(699, "\u00e9"),
    ],
    AddressErrorCode: [AddressErrorCode(2, 440, "Address Family not Supported")],
    Icmp: [Icmp(3, 1, 0x1234), Icmp(127, 511, 0xFFFFFFFF)],
    UnknownAttributes: [UnknownAttributes((0x0030, 0x0031, 0x7FFF)), UnknownAttributes(())],
    PasswordAlgorithm: [PasswordAlgorithm(2), PasswordAlgorithm(1, b"abc")],
    PasswordAlgorithms: [
        PasswordAlgorithms(((1, b""), (2, b""))),
        PasswordAlgorithms(((0x1234, b"p"), (2, b"four"), (7, b"fived"))),
        PasswordAlgorithms(()),
    ],
}
COMPUTED: set[type[Attribute]] = {MessageIntegrity, MessageIntegritySha256, Fingerprint}


def test_examples_cover_every_attribute_class() -> None:
    assert set(EXAMPLES) == set(ATTRIBUTE_CLASSES.values())
    for cls in ATTRIBUTE_CLASSES.values():
        assert ATTRIBUTE_CLASSES[cls.TYPE] is cls
        assert cls.TYPE in AttrType.__members__.values()


def _by_type(cls: type[Attribute]) -> int:
    return cls.TYPE


ALL_CLASSES = sorted(EXAMPLES, key=_by_type)
PLAIN_CLASSES = sorted(set(EXAMPLES) - COMPUTED, key=_by_type)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_attribute_value_round_trip(cls: type[Attribute]) -> None:
    xor_key = COOKIE + TID
    for attribute in EXAMPLES[cls]:
        value = attribute.encode_value(xor_key)
        assert cls.decode_value(value, xor_key) == attribute


@pytest.mark.parametrize("cls", PLAIN_CLASSES, ids=lambda c: c.__name__)
def test_attribute_round_trip_through_a_message(cls: type[Attribute]) -> None:
    attributes = EXAMPLES[cls]
    encoded = Message(Method.ALLOCATE, MessageClass.REQUEST, TID, attributes).encode(
        KEY, fingerprint=True
    )
    decoded = Message.decode(encoded)
    assert decoded.attributes[:-2] == attributes
    assert decoded.get_all(cls) == attributes
    assert decoded.get(cls) == attributes[0]
    assert decoded.verify_integrity(KEY)
    # Every attribute starts on a 4-byte boundary and the padding is zero.
    offset = 20
    while offset < len(encoded):
        length = struct.unpack_from("!H", encoded, offset + 2)[0]
        pad = -length % 4
        assert encoded[offset + 4 + length : offset + 4 + length + pad] == b"\x00" * pad
        offset += 4 + length + pad
    assert offset == len(encoded)


def test_xor_address_depends_on_the_transaction_id() -> None:
    for address in (("192.0.2.1", 32853), ("2001:db8::1", 32853)):
        attribute = XorMappedAddress(address)
        one = attribute.encode_value(COOKIE + TID)
        other = attribute.encode_value(COOKIE + bytes(12))
        plain = MappedAddress(address).encode_value(b"")
        # the port is XOR'd with the top of the cookie in both
        assert one[2:4] == other[2:4] == struct.pack("!H", address[1] ^ 0x2112)
        if ":" in address[0]:
            assert one != other  # IPv6 mixes in the transaction ID
        else:
            assert one == other  # IPv4 uses the cookie only
        assert one[4:] != plain[4:]
        assert XorMappedAddress.decode_value(one, COOKIE + TID) == attribute


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        (MappedAddress(("192.0.2.1", 3478)), "0001 0d96 c0000201"),
        (XorMappedAddress(("192.0.2.1", 32853)), "0001 a147 e112a643"),
        (ErrorCodeAttr(438, "Stale Nonce"), "00000426" + b"Stale Nonce".hex()),
        (ErrorCodeAttr(300), "00000300"),
        (AddressErrorCode(2, 440, ""), "02000428"),
        (ChangeRequest(True, True), "00000006"),
        (ChangeRequest(change_ip=True), "00000004"),
        (ChangeRequest(change_port=True), "00000002"),
        (EvenPort(True), "80"),
        (EvenPort(False), "00"),
        (ChannelNumber(0x4001), "40010000"),
        (ResponsePort(5000), "13880000"),
        (RequestedTransport(17), "11000000"),
        (RequestedAddressFamily(2), "02000000"),
        (Icmp(3, 1, 0x1234), "00000601 00001234"),
        (UnknownAttributes((0x0030, 0x8001)), "0030 8001"),
        (PasswordAlgorithms(((1, b""), (2, b""))), "0001 0000 0002 0000"),
        (PasswordAlgorithms(((1, b"abc"),)), "0001 0003 61626300"),
        (PasswordAlgorithm(2), "0002 0000"),
        (Priority(0x6E0001FF), "6e0001ff"),
        (IceControlling(1), "0000000000000001"),
        (UseCandidate(), ""),
        (Username("evtj:h6vY"), b"evtj:h6vY".hex()),
    ],
    ids=repr,
)
def test_attribute_wire_values(attribute: Attribute, value: str) -> None:
    assert attribute.encode_value(COOKIE + TID) == bytes.fromhex(value.replace(" ", ""))


@pytest.mark.parametrize(
    ("cls", "value"),
    [
        (MappedAddress, b"\x00\x01\x00"),  # shorter than family + port
        (MappedAddress, b"\x00\x03\x0d\x96\xc0\x00\x02\x01"),  # family 3
        (MappedAddress, b"\x00\x00\x0d\x96\xc0\x00\x02\x01"),  # family 0
        (MappedAddress, b"\x00\x01\x0d\x96" + bytes(16)),  # IPv4 with 16 address bytes
        (XorMappedAddress, b"\x00\x02\x0d\x96" + bytes(4)),  # IPv6 with 4 address bytes
        (XorPeerAddress, b"\x00\x05\x0d\x96" + bytes(4)),
        (Username, b"\xff\xfe"),  # not UTF-8
        (Username, b"u" * 514),
        (Realm, b"r" * 764),
        (Software, b"\xc3"),  # truncated UTF-8 sequence
        (AlternateDomain, b"d" * 256),
        (Priority, b"\x00\x00\x01"),
        (Lifetime, b"\x00" * 8),
        (Fingerprint, b"\x00" * 2),
        (IceControlled, b"\x00" * 4),
        (IceControlling, b"\x00" * 9),
        (ChannelNumber, b"\x40\x00"),
        (ResponsePort, b"\x13\x88"),
        (ChangeRequest, b"\x00\x06"),
        (RequestedTransport, b"\x11"),
        (EvenPort, b"\x80\x00"),
        (EvenPort, b""),
        (UseCandidate, b"\x00"),
        (DontFragment, b"\x00\x00\x00\x00"),
        (ReservationToken, b"1234567"),
        (Userhash, bytes(31)),
        (MessageIntegrity, bytes(19)),
        (MessageIntegrity, bytes(32)),
        (MessageIntegritySha256, bytes(12)),
        (MessageIntegritySha256, bytes(18)),
        (MessageIntegritySha256, bytes(36)),
        (ErrorCodeAttr, b"\x00\x00\x04"),  # too short
        (ErrorCodeAttr, b"\x00\x00\x02\x00"),  # class 2
        (ErrorCodeAttr, b"\x00\x00\x07\x00"),  # class 7
        (ErrorCodeAttr, b"\x00\x00\x04\x64"),  # number 100
        (ErrorCodeAttr, b"\x00\x00\x04\x00\xff"),  # reason not UTF-8
        (ErrorCodeAttr, b"\x00\x00\x04\x00" + b"x" * 764),
        (AddressErrorCode, b"\x02\x00\x01\x00"),
        (Icmp, bytes(4)),
        (UnknownAttributes, b"\x00\x30\x00"),
        (PasswordAlgorithms, b"\x00\x01\x00"),  # truncated algorithm header
        (PasswordAlgorithms, b"\x00\x01\x00\x08abcd"),  # parameters run past the value
        (PasswordAlgorithm, b""),  # no algorithm
        (PasswordAlgorithm, b"\x00\x01\x00\x00\x00\x02\x00\x00"),  # two algorithms
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else v.hex()[:24],
)
def test_malformed_attribute_values_are_rejected(cls: type[Attribute], value: bytes) -> None:
    with pytest.raises(StunDecodeError):
        cls.decode_value(value, COOKIE + TID)
    # ... also when they arrive inside a message (padding added as needed).
    with pytest.raises(StunDecodeError):
        Message.decode(wire(tlv(cls.TYPE, value)))


def test_limits_are_inclusive() -> None:
    xor_key = COOKIE + TID
    assert Username.decode_value(b"u" * 513, xor_key) == Username("u" * 513)
    assert Realm.decode_value(b"r" * 763, xor_key) == Realm("r" * 763)
    assert ErrorCodeAttr.decode_value(b"\x00\x00\x06\x63", xor_key) == ErrorCodeAttr(699)
    # reserved bits around the error class are ignored
    assert ErrorCodeAttr.decode_value(b"\xff\xff\xfc\x01", xor_key) == ErrorCodeAttr(401)
    for size in (16, 20, 24, 28, 32):
        assert MessageIntegritySha256.decode_value(bytes(size), xor_key).value == bytes(size)
    with pytest.raises(ValueError, match="longer than"):
        Realm("r" * 764).encode_value(xor_key)


# --- integrity -----------------------------------------------------------------------------


def test_message_integrity_sha256_full_length() -> None:
    message = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("user")])
    encoded = message.encode(KEY, integrity="sha256", fingerprint=True)
    decoded = Message.decode(encoded)
    mi = decoded.get(MessageIntegritySha256)
    assert mi is not None and len(mi.value) == 32
    assert decoded.get(MessageIntegrity) is None
    assert decoded.integrity_algorithm == "sha256"
    assert decoded.verify_integrity(KEY)
    assert not decoded.verify_integrity(KEY + b"x")
    # Same bytes as the hand-made reference.
    reference = add_fingerprint(add_integrity(wire(tlv(0x0006, b"user")), KEY, "sha256"))
    assert encoded == reference


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_truncated_message_integrity_sha256_verifies(size: int) -> None:
    data = add_integrity(wire(tlv(0x0006, b"user")), KEY, "sha256", size)
    decoded = Message.decode(data)
    assert decoded.integrity_algorithm == "sha256"
    assert decoded.verify_integrity(KEY)
    assert not decoded.verify_integrity(b"other key")
    corrupted = bytearray(data)
    corrupted[-1] ^= 1
    assert not Message.decode(bytes(corrupted)).verify_integrity(KEY)


def test_sha1_integrity_matches_the_reference() -> None:
    encoded = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("user")]).encode(KEY)
    assert encoded == add_integrity(wire(tlv(0x0006, b"user")), KEY)
    decoded = Message.decode(encoded)
    assert decoded.integrity_algorithm == "sha1"
    assert decoded.verify_integrity(KEY)


@pytest.mark.parametrize("key_size", [0, 1, 16, 63, 64, 65, 200])
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_integrity_with_any_key_length(key_size: int, algorithm: str) -> None:
    """HMAC keys longer than the hash block (64 bytes) are hashed first (RFC 2104)."""
    key = bytes(range(key_size % 256)) * (key_size // 256) + bytes(range(key_size % 256))
    assert len(key) == key_size
    message = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("user")])
    encoded = message.encode(key, integrity="sha256" if algorithm == "sha256" else "sha1")
    assert encoded == add_integrity(wire(tlv(0x0006, b"user")), key, algorithm)
    decoded = Message.decode(encoded)
    assert decoded.verify_integrity(key)
    assert not decoded.verify_integrity(key + b"x")  # (trailing NULs would be equivalent)


def test_both_integrity_attributes_the_last_one_counts() -> None:
    body = wire(tlv(0x0006, b"user"))
    with_mi = add_integrity(body, KEY, "sha1")
    good = add_fingerprint(add_integrity(with_mi, KEY, "sha256"))
    decoded = Message.decode(good)
    assert [type(a) for a in decoded.attributes] == [
        Username,
        MessageIntegrity,
        MessageIntegritySha256,
        Fingerprint,
    ]
    assert decoded.integrity_algorithm == "sha256"
    assert decoded.verify_integrity(KEY)

    # A broken MESSAGE-INTEGRITY does not matter when MESSAGE-INTEGRITY-SHA256 follows ...
    broken_mi = bytearray(with_mi)
    broken_mi[-1] ^= 0xFF
    decoded = Message.decode(add_integrity(bytes(broken_mi), KEY, "sha256"))
    assert decoded.verify_integrity(KEY)
    # ... and a good one does not rescue a broken MESSAGE-INTEGRITY-SHA256.
    broken_sha256 = bytearray(add_integrity(with_mi, KEY, "sha256"))
    broken_sha256[-1] ^= 0xFF
    decoded = Message.decode(bytes(broken_sha256))
    assert decoded.get(MessageIntegrity) is not None
    assert not decoded.verify_integrity(KEY)


def test_message_integrity_after_sha256_is_ignored() -> None:
    with_sha256 = add_integrity(wire(tlv(0x0006, b"user")), KEY, "sha256")
    data = add_fingerprint(add_integrity(with_sha256, b"another key", "sha1"))
    decoded = Message.decode(data)
    assert [type(a) for a in decoded.attributes] == [
        Username,
        MessageIntegritySha256,
        Fingerprint,
    ]
    assert decoded.integrity_algorithm == "sha256"
    assert decoded.verify_integrity(KEY)
    assert not decoded.verify_integrity(b"another key")


def test_attributes_after_message_integrity_are_ignored() -> None:
    signed = add_integrity(wire(tlv(0x0006, b"user")), KEY)
    trailing = (
        tlv(0x8022, b"injected")  # SOFTWARE
        + tlv(0x0024, b"\x00\x00\x00\x01")  # PRIORITY
        + tlv(0x0030, b"must-understand")  # unknown comprehension-required
        + tlv(0x0008, bytes(20))  # a second MESSAGE-INTEGRITY
        + tlv(0x0024, b"bad")  # even a malformed known attribute is not looked at
    )
    data = signed + trailing
    data = data[:2] + struct.pack("!H", len(data) - 20) + data[4:]
    data = add_fingerprint(data)
    decoded = Message.decode(data)
    assert [type(a) for a in decoded.attributes] == [Username, MessageIntegrity, Fingerprint]
    assert decoded.unknown_comprehension_required() == ()
    assert decoded.get(Software) is None
    assert decoded.get(Priority) is None
    # The integrity still covers exactly what precedes it.
    assert decoded.verify_integrity(KEY)


def test_verify_integrity_without_integrity_is_false() -> None:
    assert not Message.decode(wire(tlv(0x0006, b"user"))).verify_integrity(KEY)
    built = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("user")])
    assert not built.verify_integrity(KEY)  # never decoded: no raw bytes
    assert built.integrity_algorithm is None


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_matches_the_reference() -> None:
    encoded = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("u")]).encode(
        fingerprint=True
    )
    assert encoded == add_fingerprint(wire(tlv(0x0006, b"u")))
    decoded = Message.decode(encoded)
    fingerprint = decoded.get(Fingerprint)
    assert fingerprint is not None
    assert fingerprint.value == zlib.crc32(encoded[:-8]) ^ 0x5354554E


def test_wrong_fingerprint_is_rejected() -> None:
    good = add_fingerprint(wire(tlv(0x0006, b"u")))
    bad = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(StunDecodeError, match="FINGERPRINT does not match"):
        Message.decode(bad)
    with pytest.raises(StunDecodeError, match="FINGERPRINT must be 4 bytes"):
        Message.decode(wire(tlv(0x0006, b"u") + tlv(0x8028, bytes(8))))


def test_attributes_after_fingerprint_are_rejected() -> None:
    for trailing in (tlv(0x8022, b"late"), tlv(0x8028, bytes(4)), tlv(0x0030, b"")):
        data = add_fingerprint(wire(tlv(0x0006, b"u")), trailing)
        # The CRC covers the header with the trailing attribute counted, so it matches: the
        # trailing attribute is the only fault.
        with pytest.raises(StunDecodeError, match="after FINGERPRINT"):
            Message.decode(data)


# --- RFC 3489, unknown attributes ---------------------------------------------------------


def test_rfc3489_message_is_recognised() -> None:
    tid16 = bytes(range(100, 116))
    mapped = tlv(0x0001, b"\x00\x01\x0d\x96\xc0\x00\x02\x01")
    data = struct.pack("!HH", 0x0101, len(mapped)) + tid16 + mapped
    decoded = Message.decode(data)
    assert decoded.legacy
    assert decoded.transaction_id == tid16
    assert (decoded.method, decoded.message_class) == (Method.BINDING, MessageClass.SUCCESS)
    assert decoded.attributes == [MappedAddress(("192.0.2.1", 3478))]
    assert decoded.encode() == data
    request = Message(Method.BINDING, MessageClass.REQUEST, tid16, legacy=True)
    response = success_response(request, [MappedAddress(("192.0.2.1", 3478))])
    assert response.legacy and response.transaction_id == tid16
    assert response.encode() == data
    # With the cookie present the same bytes 4..8 make a modern message.
    modern = Message.decode(wire(mapped, 0x0101))
    assert not modern.legacy and modern.transaction_id == TID


def test_rfc3489_xor_addresses_use_the_whole_16_bytes() -> None:
    tid16 = bytes(range(16))
    request = Message(Method.BINDING, MessageClass.SUCCESS, tid16, legacy=True)
    request.attributes.append(XorMappedAddress(("2001:db8::1", 80)))
    decoded = Message.decode(request.encode(KEY, fingerprint=True))
    assert decoded.legacy
    assert decoded.get(XorMappedAddress) == XorMappedAddress(("2001:db8::1", 80))
    assert decoded.verify_integrity(KEY)


def test_transaction_id_length_is_checked() -> None:
    with pytest.raises(ValueError, match="transaction ID"):
        Message(Method.BINDING, MessageClass.REQUEST, bytes(16))
    with pytest.raises(ValueError, match="transaction ID"):
        Message(Method.BINDING, MessageClass.REQUEST, bytes(12), legacy=True)
    assert len(new_transaction_id()) == 12
    assert new_transaction_id() != new_transaction_id()


def test_unknown_attributes_are_kept_and_reported() -> None:
    attrs = (
        tlv(0x0030, b"abc", pad=b"\x00")  # comprehension-required, 3 bytes
        + tlv(0x8050, b"optional")  # comprehension-optional
        + tlv(0x7FFF, b"")  # comprehension-required, empty
        + tlv(0xFFFF, b"\x01\x02\x03\x04\x05")
    )
    data = wire(attrs)
    decoded = Message.decode(data)
    assert decoded.attributes == [
        UnknownAttribute(0x0030, b"abc"),
        UnknownAttribute(0x8050, b"optional"),
        UnknownAttribute(0x7FFF, b""),
        UnknownAttribute(0xFFFF, b"\x01\x02\x03\x04\x05"),
    ]
    assert decoded.unknown_comprehension_required() == (0x0030, 0x7FFF)
    assert decoded.encode() == data
    # The 420 response lists them (RFC 8489 §6.3.1).
    response = error_response(
        decoded,
        ErrorCode.UNKNOWN_ATTRIBUTE,
        attributes=[UnknownAttributes(decoded.unknown_comprehension_required())],
    )
    again = Message.decode(response.encode())
    assert again.error == ErrorCodeAttr(420, "Unknown Attribute")
    assert again.get(UnknownAttributes) == UnknownAttributes((0x0030, 0x7FFF))


def test_comprehension_required_range() -> None:
    # RFC 8489 §14: 0x0000-0x7FFF must be understood, 0x8000-0xFFFF may be ignored.
    assert is_comprehension_required(0x0000)
    assert is_comprehension_required(0x7FFF)
    assert not is_comprehension_required(0x8000)
    assert not is_comprehension_required(0xFFFF)
    message = Message(Method.BINDING, MessageClass.REQUEST, TID)
    message.attributes += [UnknownAttribute(0x8000, b""), UnknownAttribute(0x7FFF, b"")]
    assert message.unknown_comprehension_required() == (0x7FFF,)


def test_unknown_attribute_with_a_computed_type_is_written_as_is() -> None:
    message = Message(Method.BINDING, MessageClass.INDICATION, TID)
    message.attributes.append(UnknownAttribute(0x8028, b"\x00\x00\x00\x00"))
    encoded = message.encode()
    assert encoded == wire(tlv(0x8028, bytes(4)), 0x0011)


# --- malformed messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than a STUN header"),
        (bytes(19), "shorter than a STUN header"),
        (wire(b"", 0x4001), "most significant bits"),
        (wire(b"", 0x8001), "most significant bits"),
        (wire(b"\x00\x00", length=2), "multiple of 4"),
        (wire(b"", length=4), "does not match"),  # claims more than arrived
        (wire(tlv(0x0006, b"user") + b"\x00" * 4, length=8), "does not match"),  # trailing
        (wire(struct.pack("!HH", 0x0006, 9) + b"abcd"), "past the end"),
        (wire(struct.pack("!HH", 0x8022, 0xFFFF) + bytes(60)), "past the end"),
        (wire(tlv(0x0001, b"\x00\x03\x00\x01" + bytes(4))), "family"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.hex()[:16],
)
def test_malformed_messages_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(StunDecodeError, match=reason):
        Message.decode(data)


def test_decode_errors_are_remote_protocol_errors() -> None:
    with pytest.raises(RemoteProtocolError):
        Message.decode(b"junk")
    with pytest.raises(ValueError, match="STUN header"):  # StunDecodeError is a ValueError
        Message.decode(b"junk")


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("u")]).encode(KEY)
    # The annotation says bytes; any bytes-like object works and is copied once.
    for decoded in (
        Message.decode(bytearray(data)),  # type: ignore[arg-type]
        Message.decode(memoryview(data)),  # type: ignore[arg-type]
    ):
        assert decoded.raw == data and isinstance(decoded.raw, bytes)
        assert decoded.verify_integrity(KEY)


def test_oversized_values_and_messages_are_refused_by_the_encoder() -> None:
    with pytest.raises(ValueError, match="65535"):
        Message(Method.SEND, MessageClass.INDICATION, TID, [Data(bytes(0x10000))]).encode()
    big = [Data(bytes(0x8000)), Data(bytes(0x8000))]  # each fits, together they do not
    too_big = Message(Method.SEND, MessageClass.INDICATION, TID, big)
    with pytest.raises(ValueError, match="65535"):
        too_big.encode()
    with pytest.raises(ValueError, match="65535"):
        too_big.encode(fingerprint=True)
    with pytest.raises(ValueError, match="65535"):
        too_big.encode(KEY)
    with pytest.raises(ValueError, match="65535"):
        too_big.encode(KEY, integrity="sha256", fingerprint=True)
    # The largest message that fits is encoded and decoded.
    fits = [Data(bytes(0xFFFF - 4 - 24 - 8 - 3))]
    data = Message(Method.SEND, MessageClass.INDICATION, TID, fits).encode(KEY, fingerprint=True)
    assert len(data) == 20 + 0xFFFF - 3
    assert Message.decode(data).verify_integrity(KEY)


# --- replies and access --------------------------------------------------------------------


def test_success_and_error_responses() -> None:
    request = Message.decode(
        Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [Username("u")]).encode()
    )
    ok = success_response(request, [Lifetime(600)])
    assert (ok.method, ok.message_class, ok.transaction_id) == (
        Method.ALLOCATE,
        MessageClass.SUCCESS,
        TID,
    )
    assert ok.attributes == [Lifetime(600)]
    error = error_response(request, ErrorCode.STALE_NONCE, attributes=[Nonce("n")])
    assert error.message_class is MessageClass.ERROR
    assert error.attributes == [ErrorCodeAttr(438, "Stale Nonce"), Nonce("n")]
    assert error.error == ErrorCodeAttr(438, "Stale Nonce")
    assert error_response(request, 499).error == ErrorCodeAttr(499, "")
    assert error_response(request, 400, "Nope").error == ErrorCodeAttr(400, "Nope")
    decoded = Message.decode(error.encode())
    assert decoded.error is not None and decoded.error.code == 438


def test_get_and_get_all_match_exact_classes() -> None:
    message = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        TID,
        [MappedAddress(("192.0.2.1", 1)), XorMappedAddress(("192.0.2.2", 2))],
    )
    message.attributes.append(MappedAddress(("192.0.2.3", 3)))
    assert message.get(MappedAddress) == MappedAddress(("192.0.2.1", 1))
    assert message.get_all(MappedAddress) == [
        MappedAddress(("192.0.2.1", 1)),
        MappedAddress(("192.0.2.3", 3)),
    ]
    assert message.get(OtherAddress) is None
    assert message.get_all(OtherAddress) == []
    assert "BINDING" in repr(message)
    assert "0x123" in repr(Message(0x123, MessageClass.REQUEST, TID))


# --- ChannelData (RFC 8656 §12.4-12.5) -----------------------------------------------------


def test_channel_data_round_trip_and_padding() -> None:
    frame = ChannelData(0x4001, b"hello")
    assert frame.encode() == b"\x40\x01\x00\x05hello"
    assert frame.encode(stream=True) == b"\x40\x01\x00\x05hello\x00\x00\x00"
    assert ChannelData(0x4FFF, b"four").encode(stream=True) == b"\x4f\xff\x00\x04four"
    assert ChannelData.decode(frame.encode()) == frame
    assert ChannelData.decode(frame.encode(stream=True)) == frame
    assert ChannelData.decode(b"\x40\x00\x00\x00") == ChannelData(0x4000, b"")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x40\x01\x00", b"\x40\x01\x00\x06hello", b"\x3f\xff\x00\x00", b"\x50\x00\x00\x00"],
)
def test_malformed_channel_data(data: bytes) -> None:
    with pytest.raises(StunDecodeError):
        ChannelData.decode(data)


def test_channel_data_encoder_checks_its_arguments() -> None:
    for channel in (0x3FFF, 0x5000, 0):
        with pytest.raises(ValueError, match="channel number"):
            ChannelData(channel, b"x").encode()
    with pytest.raises(ValueError, match="65535"):
        ChannelData(0x4000, bytes(0x10000)).encode()


# --- stream framing (RFC 8489 §6.2.2, RFC 8656 §12.5) --------------------------------------


def _stream_frames() -> list[bytes]:
    return [
        Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("u")]).encode(
            KEY, fingerprint=True
        ),
        ChannelData(0x4001, b"hello").encode(stream=True),  # 5 bytes + 3 padding
        ChannelData(0x4002, b"").encode(stream=True),
        Message(Method.BINDING, MessageClass.SUCCESS, TID).encode(),  # header only
        ChannelData(0x4003, bytes(range(200))).encode(stream=True),
        Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [Data(bytes(999))]).encode(),
    ]


def test_stream_framer_byte_by_byte() -> None:
    frames = _stream_frames()
    stream = b"".join(frames)
    framer = StreamFramer()
    out: list[bytes] = []
    for index in range(len(stream)):
        out.extend(framer.feed(stream[index : index + 1]))
        assert framer.buffered == index + 1 - sum(len(f) for f in out)
    assert out == frames
    assert framer.buffered == 0
    assert Message.decode(out[0]).verify_integrity(KEY)
    assert ChannelData.decode(out[1]) == ChannelData(0x4001, b"hello")


def test_stream_framer_many_frames_in_one_feed_and_any_split() -> None:
    frames = _stream_frames()
    stream = b"".join(frames)
    framer = StreamFramer()
    assert framer.feed(stream) == frames
    assert framer.buffered == 0
    for cut in range(0, len(stream), 7):
        framer = StreamFramer()
        assert framer.feed(stream[:cut]) + framer.feed(stream[cut:]) == frames


def test_stream_framer_keeps_a_partial_frame() -> None:
    frame = ChannelData(0x4001, b"hello").encode(stream=True)
    framer = StreamFramer()
    assert framer.feed(frame + frame[:6]) == [frame]
    assert framer.buffered == 6
    assert framer.feed(frame[6:]) == [frame]
    assert framer.buffered == 0


@pytest.mark.parametrize("first", [0x04, 0x16, 0x3F, 0x50, 0x80, 0xFF])
def test_stream_framer_rejects_what_is_neither_stun_nor_channel_data(first: int) -> None:
    # 0x04-0x3F would be STUN with a method >= 0x100: reserved by RFC 7983 §7 so that STUN
    # always starts with 0-3.
    framer = StreamFramer()
    assert framer.feed(bytes([first, 0, 0])) == []  # not enough to judge yet
    with pytest.raises(StunDecodeError, match="first byte"):
        framer.feed(b"\x00")
    framer = StreamFramer()
    good = ChannelData(0x4001, b"ok").encode(stream=True)
    with pytest.raises(StunDecodeError):
        framer.feed(good + bytes([first, 0, 0, 0]))


# --- demultiplexing (RFC 7983 §7) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (0, PacketKind.STUN),
        (3, PacketKind.STUN),
        (4, PacketKind.OTHER),
        (15, PacketKind.OTHER),
        (16, PacketKind.ZRTP),
        (19, PacketKind.ZRTP),
        (20, PacketKind.DTLS),
        (63, PacketKind.DTLS),
        (64, PacketKind.CHANNEL_DATA),
        (79, PacketKind.CHANNEL_DATA),
        (80, PacketKind.OTHER),
        (127, PacketKind.OTHER),
        (128, PacketKind.RTP),
        (191, PacketKind.RTP),
        (192, PacketKind.OTHER),
        (255, PacketKind.OTHER),
    ],
)
def test_classify_boundaries(first: int, kind: PacketKind) -> None:
    assert classify(bytes([first]) + b"rest") is kind


def test_classify_every_first_byte_and_real_packets() -> None:
    expected = {
        **dict.fromkeys(range(4), PacketKind.STUN),
        **dict.fromkeys(range(16, 20), PacketKind.ZRTP),
        **dict.fromkeys(range(20, 64), PacketKind.DTLS),
        **dict.fromkeys(range(64, 80), PacketKind.CHANNEL_DATA),
        **dict.fromkeys(range(128, 192), PacketKind.RTP),
    }
    for first in range(256):
        assert classify(bytes([first])) is expected.get(first, PacketKind.OTHER)
    assert classify(b"") is PacketKind.OTHER
    assert classify(Message(Method.BINDING, MessageClass.REQUEST, TID).encode()) is (
        PacketKind.STUN
    )
    assert classify(ChannelData(0x4FFF, b"x").encode()) is PacketKind.CHANNEL_DATA


# --- prepared integrity keys ----------------------------------------------------------------


@pytest.mark.parametrize("key_size", [0, 1, 22, 63, 64, 65, 200])
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_integrity_key_macs_are_hmacs(key_size: int, algorithm: str) -> None:
    key = bytes(i % 251 for i in range(key_size))  # > 64 bytes: hashed first (RFC 2104)
    prepared = IntegrityKey(key)
    for data in (b"", b"x", bytes(68), bytes(range(256)) * 9):
        assert prepared.mac(data, algorithm) == hmac.digest(key, data, algorithm)  # type: ignore[arg-type]
    # The prepared states are copied, never consumed: the same MAC again.
    assert prepared.mac(b"x", algorithm) == hmac.digest(key, b"x", algorithm)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
@pytest.mark.parametrize("fingerprint", [False, True])
def test_encode_and_verify_take_a_prepared_key(algorithm: str, fingerprint: bool) -> None:
    prepared = IntegrityKey(KEY)
    message = Message(Method.BINDING, MessageClass.REQUEST, TID, [Username("u:v"), Priority(7)])
    integrity: IntegrityAlgorithm = "sha256" if algorithm == "sha256" else "sha1"
    data = message.encode(prepared, integrity=integrity, fingerprint=fingerprint)
    assert data == message.encode(KEY, integrity=integrity, fingerprint=fingerprint)
    decoded = Message.decode(data)
    assert decoded.integrity_algorithm == algorithm
    assert decoded.verify_integrity(prepared)
    assert decoded.verify_integrity(KEY)
    assert not decoded.verify_integrity(IntegrityKey(KEY + b"!"))
    unsigned = Message.decode(message.encode(fingerprint=fingerprint))
    assert not unsigned.verify_integrity(prepared)
    assert not message.verify_integrity(prepared)  # built, not decoded


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_prepared_key_verifies_truncated_sha256(size: int) -> None:
    data = add_integrity(wire(tlv(0x0006, b"user")), KEY, "sha256", size)
    assert Message.decode(data).verify_integrity(IntegrityKey(KEY))
    assert not Message.decode(data).verify_integrity(IntegrityKey(b"other"))


def test_integrity_key_holds_bytes_and_keeps_them_out_of_its_repr() -> None:
    prepared = IntegrityKey(bytearray(KEY))
    assert prepared.key == KEY
    assert type(prepared.key) is bytes
    assert repr(prepared) == "IntegrityKey(...)"
    assert IntegrityKey(memoryview(KEY)).mac(b"m") == hmac.digest(KEY, b"m", "sha1")
    with pytest.raises(ValueError, match="algorithm"):
        prepared.mac(b"", "md5")  # type: ignore[arg-type]


# --- the attribute encoder hook -------------------------------------------------------------


def test_a_subclass_overriding_encode_value_is_encoded_through_it() -> None:
    class Shouting(Username):
        __slots__ = ()

        def encode_value(self, xor_key: bytes) -> bytes:
            return self.value.upper().encode()

    message = Message(Method.BINDING, MessageClass.INDICATION, TID, [Shouting("abc")])
    assert message.encode() == wire(tlv(0x0006, b"ABC"), 0x0011)


def test_a_subclass_overriding_decode_value_is_decoded_through_it() -> None:
    class Strict(Priority):
        __slots__ = ()

        @classmethod
        def decode_value(cls, value: bytes, xor_key: bytes) -> Strict:
            raise StunDecodeError("strict")

    assert Priority._LAYOUT == "I"
    assert Strict._LAYOUT is None  # so a compiled shape calls decode_value


def test_computed_attributes_encode_to_nothing_and_unknown_ones_as_they_are() -> None:
    xor_key = COOKIE + TID
    for attribute in (MessageIntegrity(bytes(20)), MessageIntegritySha256(bytes(32))):
        assert attribute._encode_tlv(xor_key) == b""
    assert Fingerprint(1)._encode_tlv(xor_key) == b""
    assert UnknownAttribute(0x8028, b"abcde")._encode_tlv(xor_key) == tlv(0x8028, b"abcde")


@pytest.mark.parametrize("cls", PLAIN_CLASSES, ids=lambda c: c.__name__)
def test_encode_tlv_is_header_value_and_padding(cls: type[Attribute]) -> None:
    xor_key = COOKIE + TID
    for attribute in EXAMPLES[cls]:
        assert attribute._encode_tlv(xor_key) == tlv(cls.TYPE, attribute.encode_value(xor_key))


def test_ipv4_addresses_outside_the_canonical_form_still_encode_as_before() -> None:
    # inet_pton takes the canonical dotted quad; what it refuses goes the old way.
    xor_key = COOKIE + TID
    canonical = XorMappedAddress(("10.0.0.1", 80)).encode_value(xor_key)
    assert XorMappedAddress(("010.0.0.1", 80)).encode_value(xor_key) == canonical
    assert MappedAddress(("010.000.0.01", 80)).encode_value(b"") == (
        MappedAddress(("10.0.0.1", 80)).encode_value(b"")
    )
    for bad in ("256.0.0.1", "1.2.3", "1.2.3.4\x00", "x"):
        with pytest.raises(ValueError, match="not an IP address"):
            XorMappedAddress((bad, 80)).encode_value(xor_key)


# --- compiled message shapes ----------------------------------------------------------------
#
# The decoder learns a message layout the second time it sees it and from then on decodes
# that layout with one struct call. These tests hold it to the general walk: same result,
# same exception, for the learnt layouts and for every value byte changed under them.


@contextlib.contextmanager
def general_walk_only() -> Iterator[None]:
    """Decode with the general attribute walk alone: no shape used, none learnt."""
    saved = message_module._SHAPES, message_module._SHAPE_MAX_SIZE
    message_module._SHAPES, message_module._SHAPE_MAX_SIZE = {}, -1
    try:
        yield
    finally:
        message_module._SHAPES, message_module._SHAPE_MAX_SIZE = saved


def outcome(data: bytes) -> tuple[object, ...]:
    """Everything decode() gives for ``data``: the message as callers see it, or the error."""
    try:
        message = Message.decode(data)
    except StunDecodeError as exc:
        return ("error", str(exc))
    return (
        "ok",
        message.method,
        message.message_class,
        message.transaction_id,
        message.legacy,
        message.raw,
        message.attributes,
        message.integrity_algorithm,
        message.verify_integrity(KEY),
        message.verify_integrity(IntegrityKey(KEY)),
    )


def reference(data: bytes) -> tuple[object, ...]:
    with general_walk_only():
        return outcome(data)


def learn(data: bytes) -> None:
    """Decode ``data`` until its layout has a compiled shape."""
    for _ in range(2):
        Message.decode(data)
    key = (len(data) << 32) | struct.unpack_from("!I", data, 20)[0]
    assert key in message_module._SHAPES


def refingerprint(data: bytes) -> bytes:
    """``data`` with its FINGERPRINT (if it ends with one) recomputed."""
    if len(data) >= 28 and data[-8:-4] == b"\x80\x28\x00\x04":
        crc = zlib.crc32(data[:-8]) ^ 0x5354554E
        return data[:-4] + struct.pack("!I", crc)
    return data


@pytest.fixture
def shape_uses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fresh shape tables, and a record of each time decode() tries a compiled shape:
    "applied", "skipped" (its headers differ) or "raised"."""
    monkeypatch.setattr(message_module, "_SHAPES", {})
    monkeypatch.setattr(message_module, "_SHAPE_CANDIDATES", {})
    uses: list[str] = []
    apply_shape = message_module._apply_shape

    def spy(*args: object) -> bool:
        try:
            applied = apply_shape(*args)  # type: ignore[arg-type]
        except StunDecodeError:
            uses.append("raised")
            raise
        uses.append("applied" if applied else "skipped")
        return applied

    monkeypatch.setattr(message_module, "_apply_shape", spy)
    return uses


def _ice_request(role: Attribute, use_candidate: bool) -> bytes:
    attributes = [Username("evtj:h6vY"), Priority(0x6E0001FF), role]
    if use_candidate:
        attributes.append(UseCandidate())
    return Message(Method.BINDING, MessageClass.REQUEST, TID, attributes).encode(
        KEY, fingerprint=True
    )


LAYOUTS = {
    "ice request, controlling": _ice_request(IceControlling(1), True),
    "ice request, controlled": _ice_request(IceControlled(2), False),
    "ice response": Message(
        Method.BINDING, MessageClass.SUCCESS, TID, [XorMappedAddress(("192.0.2.1", 32853))]
    ).encode(KEY, fingerprint=True),
    "ipv6 response, sha256": Message(
        Method.BINDING, MessageClass.SUCCESS, TID, [XorMappedAddress(("2001:db8::1", 1))]
    ).encode(KEY, integrity="sha256", fingerprint=True),
    "401": Message(
        Method.ALLOCATE,
        MessageClass.ERROR,
        TID,
        [ErrorCodeAttr(401, "Unauthorized"), Realm("example.org"), Nonce("n0nce"), Software("x")],
    ).encode(fingerprint=True),
    "send indication": Message(
        Method.SEND,
        MessageClass.INDICATION,
        TID,
        [XorPeerAddress(("198.51.100.1", 49152)), Data(b"odd"), DontFragment()],
    ).encode(),
    "rfc 3489": Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        bytes(range(16)),
        [MappedAddress(("192.0.2.1", 3478)), Software("old")],
        legacy=True,
    ).encode(),
    "unknown attributes": Message(
        Method.BINDING,
        MessageClass.REQUEST,
        TID,
        [UnknownAttribute(0x7FFF, b"abc"), EvenPort(True), UnknownAttribute(0xC057, b"")],
    ).encode(KEY),
    "after integrity": add_fingerprint(
        add_integrity(
            wire(tlv(0x0006, b"user") + tlv(0x0008, bytes(20)) + tlv(0x8022, b"ignored")),
            KEY,
            "sha256",
            16,
        )
    ),
    "mi then sha256": add_integrity(add_integrity(wire(tlv(0x0024, bytes(4))), KEY), KEY, "sha256"),
    **{
        f"classes {start}-": Message(
            Method.ALLOCATE,
            MessageClass.REQUEST,
            TID,
            [EXAMPLES[cls][-1] for cls in PLAIN_CLASSES[start : start + 10]],
        ).encode(KEY, fingerprint=True)
        for start in range(0, len(PLAIN_CLASSES), 10)
    },
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_learnt_shapes_decode_like_the_general_walk(name: str, shape_uses: list[str]) -> None:
    data = LAYOUTS[name]
    expected = reference(data)
    assert expected[0] == "ok"
    learn(data)
    shape_uses.clear()
    assert outcome(data) == expected
    assert shape_uses == ["applied"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_value_byte_changed_under_a_learnt_shape(name: str) -> None:
    """Flip every byte after the header, with FINGERPRINT fixed up or not: whatever the
    general walk says about the result (a message, or which error), decode() says too."""
    data = LAYOUTS[name]
    learn(data)
    for position in range(20, len(data)):
        for mask in (0x01, 0x80, 0xFF):
            changed = bytearray(data)
            changed[position] ^= mask
            for candidate in (bytes(changed), refingerprint(bytes(changed))):
                assert outcome(candidate) == reference(candidate), (position, mask)


def test_shape_path_rejects_bad_values(shape_uses: list[str]) -> None:
    request = LAYOUTS["ice request, controlling"]
    learn(request)
    response = LAYOUTS["ice response"]
    learn(response)
    username = request.index(b"evtj:h6vY")
    bad_username = refingerprint(request[:username] + b"\xff" + request[username + 1 :])
    bad_family = refingerprint(response[:25] + b"\x03" + response[26:])
    bad_fingerprint = request[:-1] + bytes([request[-1] ^ 1])
    shape_uses.clear()
    for data, reason in (
        (bad_username, "not UTF-8"),
        (bad_family, "family"),
        (bad_fingerprint, "FINGERPRINT does not match"),
    ):
        with pytest.raises(StunDecodeError, match=reason):
            Message.decode(data)
    assert shape_uses == ["raised"] * 3  # by the shapes, with the walk's errors


def test_layouts_sharing_a_key_each_keep_a_shape(shape_uses: list[str]) -> None:
    # Same size and first attribute header; only the role attribute differs.
    controlling = _ice_request(IceControlling(1), False)
    controlled = _ice_request(IceControlled(1), False)
    assert len(controlling) == len(controlled)
    learn(controlling)
    learn(controlled)
    shape_uses.clear()
    assert Message.decode(controlling).get(IceControlling) == IceControlling(1)
    assert Message.decode(controlled).get(IceControlled) == IceControlled(1)
    assert shape_uses == ["applied", "skipped", "applied"]


def test_shape_tables_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_module, "_SHAPES", {})
    monkeypatch.setattr(message_module, "_SHAPE_CANDIDATES", {})
    monkeypatch.setattr(message_module, "_MAX_SHAPE_KEYS", 8)
    monkeypatch.setattr(message_module, "_MAX_SHAPE_CANDIDATES", 16)
    for size in range(100):
        data = Message(Method.SEND, MessageClass.INDICATION, TID, [Data(bytes(size))]).encode()
        for _ in range(3):
            assert Message.decode(data).get(Data) == Data(bytes(size))
        assert len(message_module._SHAPES) <= 8
        assert len(message_module._SHAPE_CANDIDATES) <= 16


def test_large_messages_get_no_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_module, "_SHAPES", {})
    data = Message(Method.SEND, MessageClass.INDICATION, TID, [Data(bytes(2000))]).encode()
    for _ in range(3):
        Message.decode(data)
    assert message_module._SHAPES == {}


_shape_attributes = st.sampled_from(
    [attribute for cls in PLAIN_CLASSES for attribute in EXAMPLES[cls]]
    + [UnknownAttribute(0x7FFE, b"\x01\x02\x03"), UnknownAttribute(0xC001, b"")]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_shape_attributes, max_size=6),
    st.sampled_from([None, "sha1", "sha256"]),
    st.booleans(),
    st.data(),
)
def test_changed_values_under_learnt_shapes_decode_like_the_general_walk(
    attributes: list[Attribute], integrity: str | None, fingerprint: bool, data: st.DataObject
) -> None:
    key = None if integrity is None else KEY
    algorithm: IntegrityAlgorithm = "sha256" if integrity == "sha256" else "sha1"
    message = Message(Method.BINDING, MessageClass.REQUEST, TID, attributes)
    encoded = message.encode(key, integrity=algorithm, fingerprint=fingerprint)
    if len(encoded) == 20:
        return
    if len(encoded) <= message_module._SHAPE_MAX_SIZE:
        learn(encoded)
    assert outcome(encoded) == reference(encoded)
    changed = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(20, len(changed) - 1))
        changed[position] = data.draw(st.integers(0, 255))
    for candidate in (bytes(changed), refingerprint(bytes(changed))):
        assert outcome(candidate) == reference(candidate)
