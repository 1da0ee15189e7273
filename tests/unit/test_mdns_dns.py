"""The strict DNS codec of tsunagu.mdns.dns: round trips, independent encodings (dnspython,
hand-written bytes), and every malformed shape the ICE issue names (compression loops,
truncated records, oversized messages) raising DnsDecodeError and nothing else."""

from __future__ import annotations

import contextlib
import struct

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsunagu.errors import LocalProtocolError, RemoteProtocolError
from tsunagu.mdns.dns import (
    CLASS_IN,
    FLAG_AA,
    FLAG_QR,
    MAX_MESSAGE_SIZE,
    TYPE_A,
    TYPE_AAAA,
    DnsDecodeError,
    DnsEncodeError,
    DnsMessage,
    Question,
    ResourceRecord,
    address_record,
    canonical_name,
    decode_message,
    encode_message,
    encode_name,
)

NAME = "1f0ad3bf-3b0b-4b2c-9b6e-0c9a0e4b2f11.local"
HEADER = struct.Struct("!HHHHHH")


def header(qd: int = 0, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(0, flags, qd, an, ns, ar)


def label_bytes(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"


# -- round trips and independent encodings --------------------------------------------------


def test_announcement_round_trip() -> None:
    message = DnsMessage(
        flags=FLAG_QR | FLAG_AA,
        answers=(address_record(NAME, "192.0.2.1", 120), address_record(NAME, "2001:db8::1", 120)),
    )
    decoded = decode_message(encode_message(message))
    assert decoded == message
    assert decoded.is_response and decoded.opcode == 0 and decoded.rcode == 0
    a, aaaa = decoded.answers
    assert (a.rtype, a.address, a.cache_flush, a.ttl) == (TYPE_A, "192.0.2.1", True, 120)
    assert (aaaa.rtype, aaaa.address) == (TYPE_AAAA, "2001:db8::1")


def test_query_round_trip_with_qu_bit() -> None:
    message = DnsMessage(
        questions=(Question(NAME, TYPE_A, unicast_response=True), Question(NAME, TYPE_AAAA))
    )
    data = encode_message(message)
    # RFC 6762 §18.12: the QU bit is the top bit of the class field on the wire.
    assert data[12 + len(label_bytes(NAME)) + 2 :][:2] == b"\x80\x01"
    assert decode_message(data) == message


def test_hand_written_chromium_style_announcement() -> None:
    """Bytes written out by hand, the shape Chromium multicasts when it gathers: ID 0,
    QR|AA, no question, one A record with the cache-flush bit and TTL 120."""
    data = (
        b"\x00\x00\x84\x00\x00\x00\x00\x01\x00\x00\x00\x00"
        + label_bytes(NAME)
        + b"\x00\x01\x80\x01\x00\x00\x00\x78\x00\x04\xc0\x00\x02\x07"
    )
    message = decode_message(data)
    (record,) = message.answers
    assert record == ResourceRecord(NAME, TYPE_A, b"\xc0\x00\x02\x07", 120, CLASS_IN, True)
    assert record.address == "192.0.2.7"
    assert encode_message(message) == data


def test_dnspython_encodes_we_decode_with_compression() -> None:
    """dnspython compresses the second owner name into a pointer to the first."""
    response = dns.message.Message(id=0)
    response.flags = dns.flags.QR | dns.flags.AA
    for address in ("192.0.2.1", "192.0.2.2"):
        response.answer.append(dns.rrset.from_text(NAME + ".", 120, "IN", "A", address))
    response.additional.append(dns.rrset.from_text(NAME + ".", 120, "IN", "AAAA", "2001:db8::5"))
    wire = response.to_wire()
    assert b"\xc0\x0c" in wire  # a compression pointer to the first name
    message = decode_message(wire)
    assert [r.address for r in message.answers] == ["192.0.2.1", "192.0.2.2"]
    assert [r.name for r in message.answers] == [NAME, NAME]
    assert message.additionals[0].address == "2001:db8::5"


def test_we_encode_dnspython_decodes() -> None:
    data = encode_message(
        DnsMessage(flags=FLAG_QR | FLAG_AA, answers=(address_record(NAME, "192.0.2.9", 120),))
    )
    parsed = dns.message.from_wire(data)
    (rrset,) = parsed.answer
    assert rrset.name == dns.name.from_text(NAME)
    assert rrset.rdtype == dns.rdatatype.A
    assert rrset.rdclass == dns.rdataclass.IN | 0x8000  # the cache-flush bit, as aioice wants


def test_escaped_dots_in_labels_stay_unambiguous() -> None:
    data = header(qd=1) + b"\x03a.b\x05local\x00" + b"\x00\x01\x00\x01"
    (question,) = decode_message(data).questions
    assert question.name == "a\\.b.local"
    assert encode_name(question.name) == b"\x03a.b\x05local\x00"
    assert canonical_name(question.name) != "a.b.local"


def test_canonical_name_folds_ascii_only() -> None:
    assert canonical_name("ABC.Local.") == "abc.local"
    assert canonical_name("ÄB.local") == "Äb.local"  # RFC 6762 §16: ASCII only
    assert canonical_name("a\\..local") == "a\\..local"  # an escaped dot is kept


def test_ttl_with_top_bit_decodes_as_zero() -> None:
    data = (
        header(an=1)
        + label_bytes(NAME)
        + b"\x00\x01\x00\x01\x80\x00\x00\x01\x00\x04\x01\x02\x03\x04"
    )
    assert decode_message(data).answers[0].ttl == 0  # RFC 2181 §8


def test_other_record_types_keep_raw_rdata() -> None:
    data = header(an=1) + label_bytes(NAME) + b"\x00\x10\x00\x01\x00\x00\x00\x0a\x00\x03\x02hi"
    (record,) = decode_message(data).answers
    assert (record.rtype, record.rdata, record.address) == (16, b"\x02hi", None)


# -- malformed input ------------------------------------------------------------------------


def _valid_response() -> bytes:
    return encode_message(
        DnsMessage(
            flags=FLAG_QR | FLAG_AA,
            questions=(Question(NAME, TYPE_A),),
            answers=(address_record(NAME, "192.0.2.1", 120),),
            additionals=(address_record(NAME, "2001:db8::1", 120),),
        )
    )


def test_every_truncation_is_rejected() -> None:
    data = _valid_response()
    for cut in range(len(data)):
        with pytest.raises(DnsDecodeError):
            decode_message(data[:cut])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(DnsDecodeError, match="after the last record"):
        decode_message(_valid_response() + b"\x00")


def test_oversized_message_is_rejected() -> None:
    with pytest.raises(DnsDecodeError, match="9000"):
        decode_message(header() + bytes(MAX_MESSAGE_SIZE))


def test_counts_beyond_the_message_are_rejected_before_parsing() -> None:
    with pytest.raises(DnsDecodeError, match="counts"):
        decode_message(header(qd=0xFFFF, an=0xFFFF) + b"\x00" * 20)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc0\x0c\x00\x01\x00\x01", "prior occurrence"),  # points at itself
        (b"\xc0\x0e\x00\x01\x00\x01", "prior occurrence"),  # points forward
        (b"\x01a\xc0\x0c\x00\x01\x00\x01", "prior occurrence"),  # back to its own start
        (b"\xc0\x05\x00\x01\x00\x01", "header"),
        (b"\x01a\x01b\xc0", "cut short"),
        (b"\x40abc\x00\x00\x01\x00\x01", "label type"),  # RFC 6891 extended label
        (b"\x80abc\x00\x00\x01\x00\x01", "label type"),
        (b"\x02\xff\xfe\x00\x00\x01\x00\x01", "UTF-8"),
    ],
)
def test_malformed_names(body: bytes, match: str) -> None:
    with pytest.raises(DnsDecodeError, match=match):
        decode_message(header(qd=1) + body)


def test_a_backward_pointer_into_its_own_name_is_a_loop() -> None:
    """``a`` at 12, ``b`` at 14, then at 16 a pointer to 14: it points backwards from
    where it stands, yet reading on from 14 reaches it again, forever. Targets must lie
    before the data the name began with, so this is refused at once."""
    data = header(qd=1) + b"\x01a\x01b\xc0\x0e" + b"\x00\x01\x00\x01"
    with pytest.raises(DnsDecodeError, match="prior occurrence"):
        decode_message(data)
    # The legitimate use: a second name "c.b" pointing at the first one's "b" label.
    ok = header(qd=2) + b"\x01a\x01b\x00\x00\x01\x00\x01" + b"\x01c\xc0\x0e\x00\x01\x00\x01"
    assert [q.name for q in decode_message(ok).questions] == ["a.b", "c.b"]


def test_a_long_pointer_chain_is_bounded() -> None:
    """200 pointers, each to the one before it, kept in the raw RDATA of a TXT-like record
    (RDATA of unknown types is not parsed): loop-free, but beyond the pointer budget."""
    base = 12 + 1 + 10  # after the first record's root name and fixed fields
    chain = struct.pack("!H", 0xC000 | 12)  # first pointer: to the root name at 12
    for index in range(1, 200):
        chain += struct.pack("!H", 0xC000 | base + 2 * (index - 1))
    first = b"\x00" + struct.pack("!HHIH", 16, 1, 0, len(chain)) + chain
    last_pointer = base + 2 * 199
    second = struct.pack("!H", 0xC000 | last_pointer) + struct.pack("!HHIH", 16, 1, 0, 0)
    data = header(an=2) + first + second
    with pytest.raises(DnsDecodeError, match="too many"):
        decode_message(data)
    # The same chain of 100 pointers is fine.
    short = header(an=2) + first + struct.pack("!H", 0xC000 | base + 2 * 99) + second[2:]
    assert decode_message(short).answers[1].name == ""


def test_name_longer_than_255_octets_is_rejected() -> None:
    body = (b"\x3f" + b"a" * 63) * 4 + b"\x00"  # 4 * 64 + 1 = 257 octets
    with pytest.raises(DnsDecodeError, match="255"):
        decode_message(header(qd=1) + body + b"\x00\x01\x00\x01")


def test_compressed_name_longer_than_255_octets_is_rejected() -> None:
    long_name = (b"\x3f" + b"a" * 63) * 3 + b"\x00"  # 193 octets: fine on its own
    second = (b"\x3f" + b"b" * 63) + b"\xc0\x0c"  # 64 more through the pointer: 257
    data = header(qd=2) + long_name + b"\x00\x01\x00\x01" + second + b"\x00\x01\x00\x01"
    with pytest.raises(DnsDecodeError, match="255"):
        decode_message(data)


@pytest.mark.parametrize(("rtype", "length"), [(TYPE_A, 5), (TYPE_A, 3), (TYPE_AAAA, 4)])
def test_address_records_of_the_wrong_size(rtype: int, length: int) -> None:
    data = header(an=1) + label_bytes(NAME) + struct.pack("!HHIH", rtype, 0x8001, 120, length)
    with pytest.raises(DnsDecodeError, match="octets of data"):
        decode_message(data + bytes(length))


def test_rdata_past_the_end_is_rejected() -> None:
    data = header(an=1) + label_bytes(NAME) + struct.pack("!HHIH", TYPE_A, 1, 120, 4) + b"\x01"
    with pytest.raises(DnsDecodeError, match="cut short"):
        decode_message(data)


def test_decode_error_is_a_remote_protocol_error() -> None:
    assert issubclass(DnsDecodeError, RemoteProtocolError)
    assert issubclass(DnsEncodeError, LocalProtocolError)


# -- encoder misuse -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a" * 64 + ".local", ".".join(["a" * 63] * 4) + ".local", "a..local", "a\\"]
)
def test_encoder_rejects_bad_names(name: str) -> None:
    with pytest.raises(DnsEncodeError):
        encode_name(name)


def test_encoder_rejects_bad_records() -> None:
    with pytest.raises(DnsEncodeError, match="TTL"):
        encode_message(DnsMessage(answers=(ResourceRecord(NAME, TYPE_A, bytes(4), -1),)))
    with pytest.raises(DnsEncodeError, match="octets"):
        encode_message(DnsMessage(answers=(ResourceRecord(NAME, TYPE_A, bytes(5), 1),)))
    with pytest.raises(DnsEncodeError, match="9000"):
        big = ResourceRecord(NAME, 16, bytes(0xFFFF), 1)
        encode_message(DnsMessage(answers=(big,)))


# -- properties -----------------------------------------------------------------------------

labels = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20).filter(
    lambda label: len(label.encode()) <= 63
)


@st.composite
def names(draw: st.DrawFn) -> str:
    parts = draw(st.lists(labels, min_size=1, max_size=4))
    name = ".".join(p.replace("\\", "\\\\").replace(".", "\\.") for p in parts)
    return name


questions = st.builds(
    Question,
    name=names(),
    qtype=st.integers(0, 0xFFFF),
    qclass=st.integers(0, 0x7FFF),
    unicast_response=st.booleans(),
)
address_records = st.builds(
    address_record,
    name=names(),
    ip=st.ip_addresses().map(str),
    ttl=st.integers(0, 0x7FFFFFFF),
    cache_flush=st.booleans(),
)
other_records = st.builds(
    ResourceRecord,
    name=names(),
    rtype=st.integers(0, 0xFFFF).filter(lambda t: t not in (TYPE_A, TYPE_AAAA)),
    rdata=st.binary(max_size=40),
    ttl=st.integers(0, 0x7FFFFFFF),
    rclass=st.integers(0, 0x7FFF),
    cache_flush=st.booleans(),
)
records = st.lists(address_records | other_records, max_size=4).map(tuple)
messages = st.builds(
    DnsMessage,
    id=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFF),
    questions=st.lists(questions, max_size=4).map(tuple),
    answers=records,
    authorities=records,
    additionals=records,
)


@given(messages)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_property(message: DnsMessage) -> None:
    try:
        data = encode_message(message)
    except DnsEncodeError:
        return  # a name over 255 octets: refused, as it must be
    assert decode_message(data) == message


def _decode_or_typed_error(data: bytes) -> None:
    with contextlib.suppress(DnsDecodeError):
        decode_message(data)


@given(st.binary(max_size=600))
@settings(max_examples=1500)
def test_arbitrary_bytes_raise_only_dns_decode_error(data: bytes) -> None:
    _decode_or_typed_error(data)


@given(
    st.integers(0, 4),
    st.integers(0, 4),
    st.lists(
        st.sampled_from([0x00, 0x01, 0x03, 0x3F, 0x40, 0x80, 0xC0, 0xC1, 0x0C, 0xFF])
        | st.integers(0, 255),
        max_size=200,
    ),
)
@settings(max_examples=800)
def test_small_counts_and_pointer_heavy_bodies(qd: int, an: int, body: list[int]) -> None:
    """Header counts that fit and bodies rich in label lengths and pointer octets reach
    the name and record parsers far more often than uniform random bytes."""
    _decode_or_typed_error(header(qd=qd, an=an) + bytes(body))


@given(st.data())
@settings(max_examples=500)
def test_mutated_valid_messages(data: st.DataObject) -> None:
    wire = bytearray(_valid_response())
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(wire) - 1))
        wire[position] = data.draw(st.integers(0, 255))
    _decode_or_typed_error(bytes(wire))
