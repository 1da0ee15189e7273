"""The RFC 5769 test vectors, decoded, verified and re-encoded.

The vectors' bytes are the RFC's (§2.1-§2.4, hex dumps transcribed). The first three pad
their SOFTWARE/USERNAME values with 0x20, not zero; RFC 8489 §14 says padding may be any
value and must be ignored, and our encoder always writes zeros. So for those three the
re-encoding check is made in two steps, each exact:

1. ``reseal`` below (a small reference implementation of §14.5 and §14.7 written from the
   RFC with ``hmac``/``zlib``, sharing no code with tsunagu) recomputes MESSAGE-INTEGRITY
   and FINGERPRINT over the RFC's own bytes and must reproduce the RFC's values exactly;
2. our encoder, given the decoded attributes, must produce exactly the RFC's bytes with the
   padding zeroed and then resealed by that same reference.

§2.4 has zero padding and is re-encoded byte for byte directly.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import struct
import zlib
from collections.abc import Iterator

import pytest

from tsunagu.errors import StunDecodeError
from tsunagu.stun import Message, MessageClass, Method
from tsunagu.stun.attributes import (
    Fingerprint,
    IceControlled,
    MessageIntegrity,
    Nonce,
    Priority,
    Realm,
    Software,
    Username,
    XorMappedAddress,
)


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 §2.1 Sample Request
SAMPLE_REQUEST = _hex(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
# RFC 5769 §2.2 Sample IPv4 Response
SAMPLE_IPV4_RESPONSE = _hex(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
# RFC 5769 §2.3 Sample IPv6 Response
SAMPLE_IPV6_RESPONSE = _hex(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)
# RFC 5769 §2.4 Sample Request with Long-Term Authentication (no FINGERPRINT)
SAMPLE_LONG_TERM_REQUEST = _hex(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34
                73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)

SHORT_TERM_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"
TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LONG_TERM_REALM = "example.org"
LONG_TERM_NONCE = "f//499k954d6OL34oL9FSTvy64sA"
LONG_TERM_PASSWORD = "TheMatrIX"  # the RFC's password after SASLprep
MAPPED_PORT = 32853

SHORT_TERM_VECTORS = {
    "2.1-request": SAMPLE_REQUEST,
    "2.2-ipv4-response": SAMPLE_IPV4_RESPONSE,
    "2.3-ipv6-response": SAMPLE_IPV6_RESPONSE,
}


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MD5(username ":" realm ":" password): tsunagu's credentials module when it exists."""
    if importlib.util.find_spec("tsunagu.stun.credentials") is not None:
        from tsunagu.stun import credentials

        return credentials.long_term_key(username, realm, password)
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


# --- an independent reference for the wire format (RFC 8489 §5, §14, §14.5, §14.7) --------


def walk(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, type, value length) of each attribute."""
    offset = 20
    while offset < len(data):
        attr_type, length = struct.unpack_from("!HH", data, offset)
        yield offset, attr_type, length
        offset += 4 + length + (-length % 4)
    assert offset == len(data)


def with_padding(data: bytes, fill: int) -> bytes:
    """The same message with every padding byte set to ``fill`` (MI/FP not recomputed)."""
    out = bytearray(data)
    for offset, _, length in walk(data):
        end = offset + 4 + length
        out[end : end + (-length % 4)] = bytes([fill]) * (-length % 4)
    return bytes(out)


def reseal(data: bytes, key: bytes) -> bytes:
    """Recompute MESSAGE-INTEGRITY (HMAC-SHA1) and FINGERPRINT in place, by the RFC."""
    out = bytearray(data)
    for offset, attr_type, _ in walk(data):
        if attr_type == 0x0008:
            header = out[:2] + struct.pack("!H", offset + 24 - 20)
            out[offset + 4 : offset + 24] = hmac.new(
                key, bytes(header + out[4:offset]), "sha1"
            ).digest()
        elif attr_type == 0x8028:
            crc = zlib.crc32(bytes(out[:offset])) ^ 0x5354554E
            out[offset + 4 : offset + 8] = struct.pack("!I", crc)
    return bytes(out)


def test_the_reference_reproduces_the_rfc_values() -> None:
    """Step 1: the reference computation agrees with the RFC on the RFC's own bytes."""
    for vector in SHORT_TERM_VECTORS.values():
        assert reseal(vector, SHORT_TERM_KEY) == vector
        assert reseal(vector, b"wrong") != vector
    key = long_term_key(LONG_TERM_USERNAME, LONG_TERM_REALM, LONG_TERM_PASSWORD)
    assert reseal(SAMPLE_LONG_TERM_REQUEST, key) == SAMPLE_LONG_TERM_REQUEST


# --- §2.1 ---------------------------------------------------------------------------------


def test_sample_request_decodes() -> None:
    message = Message.decode(SAMPLE_REQUEST)
    assert message.method == Method.BINDING
    assert message.message_class is MessageClass.REQUEST
    assert message.transaction_id == TRANSACTION_ID
    assert not message.legacy
    # The 0x20 padding after "evtj:h6vY" is not part of the value.
    assert message.attributes == [
        Software("STUN test client"),
        Priority(0x6E0001FF),
        IceControlled(0x932FF9B151263B36),
        Username("evtj:h6vY"),
        MessageIntegrity(bytes.fromhex("9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2")),
        Fingerprint(0xE57A3BCF),
    ]
    assert message.integrity_algorithm == "sha1"
    assert message.unknown_comprehension_required() == ()
    assert message.error is None


# --- §2.2 and §2.3 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "address", "integrity", "fingerprint"),
    [
        (
            SAMPLE_IPV4_RESPONSE,
            "192.0.2.1",
            "2b91f599fd9e90c38c7489f92af9ba53f06be7d7",
            0xC07D4C96,
        ),
        (
            SAMPLE_IPV6_RESPONSE,
            "2001:db8:1234:5678:11:2233:4455:6677",
            "a382954e4be67bf11784c97c8292c275bfe3ed41",
            0xC8FB0B4C,
        ),
    ],
    ids=["ipv4", "ipv6"],
)
def test_sample_responses_decode(
    vector: bytes, address: str, integrity: str, fingerprint: int
) -> None:
    message = Message.decode(vector)
    assert (message.method, message.message_class) == (Method.BINDING, MessageClass.SUCCESS)
    assert message.transaction_id == TRANSACTION_ID
    assert message.attributes == [
        Software("test vector"),
        XorMappedAddress((address, MAPPED_PORT)),
        MessageIntegrity(bytes.fromhex(integrity)),
        Fingerprint(fingerprint),
    ]


# --- §2.4 ---------------------------------------------------------------------------------


def test_long_term_request_decodes() -> None:
    message = Message.decode(SAMPLE_LONG_TERM_REQUEST)
    assert (message.method, message.message_class) == (Method.BINDING, MessageClass.REQUEST)
    assert message.transaction_id == bytes.fromhex("78ad3433c6ad72c029da412e")
    assert message.attributes == [
        Username(LONG_TERM_USERNAME),
        Nonce(LONG_TERM_NONCE),
        Realm(LONG_TERM_REALM),
        MessageIntegrity(bytes.fromhex("f67024656dd64a3e02b8e0712e85c9a28ca89666")),
    ]
    assert message.get(Fingerprint) is None


def test_long_term_key_is_md5_of_username_realm_password() -> None:
    key = long_term_key(LONG_TERM_USERNAME, LONG_TERM_REALM, LONG_TERM_PASSWORD)
    expected = hashlib.md5(
        "\u30de\u30c8\u30ea\u30c3\u30af\u30b9:example.org:TheMatrIX".encode()
    ).digest()
    assert key == expected


# --- integrity: right key verifies, wrong key does not -------------------------------------


@pytest.mark.parametrize("name", sorted(SHORT_TERM_VECTORS))
def test_short_term_integrity(name: str) -> None:
    message = Message.decode(SHORT_TERM_VECTORS[name])
    assert message.verify_integrity(SHORT_TERM_KEY)
    assert not message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBu")
    assert not message.verify_integrity(b"")
    assert not message.verify_integrity(SHORT_TERM_KEY[:-1])


def test_long_term_integrity() -> None:
    message = Message.decode(SAMPLE_LONG_TERM_REQUEST)
    username = message.get(Username)
    realm = message.get(Realm)
    assert username is not None and realm is not None
    assert message.verify_integrity(long_term_key(username.value, realm.value, "TheMatrIX"))
    assert not message.verify_integrity(long_term_key(username.value, realm.value, "TheMatrix"))
    assert not message.verify_integrity(long_term_key("matrix", realm.value, "TheMatrIX"))
    # The password alone is a short-term key, not the long-term one.
    assert not message.verify_integrity(b"TheMatrIX")


@pytest.mark.parametrize("name", sorted(SHORT_TERM_VECTORS))
def test_integrity_covers_the_attributes(name: str) -> None:
    """A changed attribute with a correct FINGERPRINT still decodes, but fails integrity."""
    vector = SHORT_TERM_VECTORS[name]
    tampered = bytearray(vector)
    # SOFTWARE is the first attribute in all three; change its first character.
    assert tampered[20:22] == b"\x80\x22"
    tampered[24] ^= 0x01
    tampered_bytes = reseal(bytes(tampered), b"not the key")  # FP right, MI wrong
    message = Message.decode(tampered_bytes)
    assert not message.verify_integrity(SHORT_TERM_KEY)
    assert message.verify_integrity(b"not the key")


# --- fingerprint: any change is caught -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHORT_TERM_VECTORS))
def test_any_flipped_bit_before_the_fingerprint_is_rejected(name: str) -> None:
    vector = SHORT_TERM_VECTORS[name]
    fingerprint_at = len(vector) - 8
    assert vector[fingerprint_at : fingerprint_at + 2] == b"\x80\x28"
    for index in range(fingerprint_at):
        for bit in range(8):
            flipped = bytearray(vector)
            flipped[index] ^= 1 << bit
            with pytest.raises(StunDecodeError):
                Message.decode(bytes(flipped))


@pytest.mark.parametrize("name", sorted(SHORT_TERM_VECTORS))
def test_a_flipped_bit_in_the_fingerprint_value_is_rejected(name: str) -> None:
    vector = SHORT_TERM_VECTORS[name]
    for index in range(len(vector) - 4, len(vector)):
        flipped = bytearray(vector)
        flipped[index] ^= 0x10
        with pytest.raises(StunDecodeError, match="FINGERPRINT"):
            Message.decode(bytes(flipped))


# --- padding is ignored --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHORT_TERM_VECTORS))
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x80])
def test_padding_value_does_not_matter(name: str, fill: int) -> None:
    vector = SHORT_TERM_VECTORS[name]
    assert with_padding(vector, 0x20) == vector  # the RFC pads with spaces
    repadded = reseal(with_padding(vector, fill), SHORT_TERM_KEY)
    assert repadded != vector
    original = Message.decode(vector)
    again = Message.decode(repadded)
    assert again.verify_integrity(SHORT_TERM_KEY)

    def content(message: Message) -> list[object]:
        return [a for a in message.attributes if not isinstance(a, (MessageIntegrity, Fingerprint))]

    assert content(again) == content(original)


# --- re-encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHORT_TERM_VECTORS))
def test_reencoding_reproduces_the_vector_with_zero_padding(name: str) -> None:
    """Step 2: decoded attributes -> our encoder -> the RFC's bytes, padding zeroed."""
    vector = SHORT_TERM_VECTORS[name]
    decoded = Message.decode(vector)
    # The decoded MI/FP attributes are recomputed by encode(), not copied.
    rebuilt = Message(
        decoded.method, decoded.message_class, decoded.transaction_id, decoded.attributes
    )
    encoded = rebuilt.encode(SHORT_TERM_KEY, fingerprint=True)
    assert encoded == reseal(with_padding(vector, 0x00), SHORT_TERM_KEY)
    # Everything but the padding and the two values computed over it is the RFC's.
    assert len(encoded) == len(vector)
    differing = {i for i, (a, b) in enumerate(zip(encoded, vector, strict=True)) if a != b}
    zeroed = with_padding(vector, 0)
    padding = {i for i, (a, b) in enumerate(zip(zeroed, vector, strict=True)) if a != b}
    assert padding  # the 0x20 bytes
    size = len(vector)  # MI value: [size-28, size-8); FP value: [size-4, size)
    computed = set(range(size - 28, size - 8)) | set(range(size - 4, size))
    assert padding <= differing <= padding | computed
    # And what we wrote decodes and verifies like the original.
    again = Message.decode(encoded)
    assert again.verify_integrity(SHORT_TERM_KEY)
    assert again.attributes[:-2] == decoded.attributes[:-2]


def test_reencoding_the_long_term_request_is_byte_exact() -> None:
    decoded = Message.decode(SAMPLE_LONG_TERM_REQUEST)
    key = long_term_key(LONG_TERM_USERNAME, LONG_TERM_REALM, LONG_TERM_PASSWORD)
    assert decoded.encode(key) == SAMPLE_LONG_TERM_REQUEST
    built = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        bytes.fromhex("78ad3433c6ad72c029da412e"),
        [Username(LONG_TERM_USERNAME), Nonce(LONG_TERM_NONCE), Realm(LONG_TERM_REALM)],
    )
    assert built.encode(key) == SAMPLE_LONG_TERM_REQUEST


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (SAMPLE_IPV4_RESPONSE, "192.0.2.1"),
        (SAMPLE_IPV6_RESPONSE, "2001:db8:1234:5678:11:2233:4455:6677"),
    ],
    ids=["ipv4", "ipv6"],
)
def test_xor_mapped_address_encodes_to_the_rfc_bytes(vector: bytes, address: str) -> None:
    """Built from scratch (not from the decoded message): the XOR'd address bytes match."""
    built = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        TRANSACTION_ID,
        [Software("test vector"), XorMappedAddress((address, MAPPED_PORT))],
    ).encode(SHORT_TERM_KEY, fingerprint=True)
    assert built == reseal(with_padding(vector, 0x00), SHORT_TERM_KEY)
    xor_attr_at = 20 + 4 + 12
    assert built[xor_attr_at : len(vector) - 32] == vector[xor_attr_at : len(vector) - 32]


def test_encoding_without_key_drops_integrity_and_fingerprint() -> None:
    decoded = Message.decode(SAMPLE_REQUEST)
    plain = decoded.encode()
    again = Message.decode(plain)
    assert again.get(MessageIntegrity) is None
    assert again.get(Fingerprint) is None
    assert again.attributes == decoded.attributes[:4]
    assert not again.verify_integrity(SHORT_TERM_KEY)
    assert struct.unpack_from("!H", plain, 2)[0] == len(plain) - 20
