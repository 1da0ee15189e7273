"""A strict, minimal DNS message codec for multicast DNS (RFC 1035 §4, RFC 6762 §18).

Enough of DNS for WebRTC's ``.local`` host names: the header, questions and resource
records, with A/AAAA record data checked and every other type's RDATA kept as raw bytes.
The multicast DNS reinterpretations of the class field are decoded into flags: the top bit
of a question's class is the "unicast response" (QU) bit (RFC 6762 §5.4, §18.12) and the
top bit of a record's class is the cache-flush bit (RFC 6762 §10.2, §18.13).

Decoding is strict. Any byte string either decodes or raises :class:`DnsDecodeError` (a
:class:`~tsunagu.errors.RemoteProtocolError`), never another exception:

- a message is at most 9000 octets (RFC 6762 §17) and its section counts must fit in it;
- a label is at most 63 octets, a name at most 255 octets in wire form (RFC 1035 §2.3.4),
  label types other than "normal" and "pointer" are rejected (RFC 6891 §5 retired the
  extended label types);
- compression pointers (RFC 1035 §4.1.4) must point into the message body, each one
  strictly before where the data it continues began (a "prior occurrence"), so pointer
  targets strictly decrease and a loop is impossible; their number is bounded as well;
- labels are UTF-8 (RFC 6762 §16), A data is 4 octets and AAAA data 16 (RFC 1035 §3.4.1,
  RFC 3596 §2.2), nothing follows the last record.

Names are text: labels joined with ``.``, a ``.`` or ``\\`` inside a label escaped with a
backslash as in master files (RFC 1035 §5.1), so a decoded name is never ambiguous. Compare
names with :func:`canonical_name` (DNS names are case-insensitive for ASCII letters only,
RFC 6762 §16).

The encoder never compresses (RFC 6762 §18.14 makes compression optional for senders);
misuse (a label too long, a TTL out of range) raises :class:`DnsEncodeError`, a
:class:`~tsunagu.errors.LocalProtocolError`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from tsunagu.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CLASS_ANY",
    "CLASS_IN",
    "FLAG_AA",
    "FLAG_QR",
    "FLAG_TC",
    "MAX_MESSAGE_SIZE",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_ANY",
    "DnsDecodeError",
    "DnsEncodeError",
    "DnsMessage",
    "Question",
    "ResourceRecord",
    "address_record",
    "canonical_name",
    "decode_message",
    "encode_message",
    "encode_name",
]

TYPE_A = 1  # RFC 1035 §3.2.2
TYPE_AAAA = 28  # RFC 3596 §2.1
TYPE_ANY = 255  # RFC 1035 §3.2.3 QTYPE "*"
CLASS_IN = 1  # RFC 1035 §3.2.4
CLASS_ANY = 255  # RFC 1035 §3.2.5 QCLASS "*"

FLAG_QR = 0x8000  # RFC 1035 §4.1.1: response
FLAG_AA = 0x0400  # authoritative answer (RFC 6762 §18.4: set in every mDNS response)
FLAG_TC = 0x0200  # truncated (RFC 6762 §18.5: more known answers follow)
_OPCODE_MASK = 0x7800
_RCODE_MASK = 0x000F

_TOP_BIT = 0x8000  # QU bit in a question's class, cache-flush bit in a record's class

HEADER_SIZE = 12
MAX_MESSAGE_SIZE = 9000  # RFC 6762 §17: no mDNS message is larger (jumbo frames included)
MAX_NAME_LENGTH = 255  # RFC 1035 §2.3.4, octets in wire form
MAX_LABEL_LENGTH = 63  # RFC 1035 §2.3.4
MAX_POINTERS = 127  # a 255-octet name has at most 127 labels: one pointer each is plenty
MAX_TTL = 0x7FFFFFFF  # RFC 2181 §8

_MIN_QUESTION = 5  # a one-octet (root) name, QTYPE, QCLASS
_MIN_RECORD = 11  # a one-octet name, TYPE, CLASS, TTL, RDLENGTH
_ADDRESS_LENGTHS = {TYPE_A: 4, TYPE_AAAA: 16}

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECORD_TAIL = struct.Struct("!HHIH")


class DnsDecodeError(RemoteProtocolError, ValueError):
    """Bytes that are not a well-formed (multicast) DNS message."""


class DnsEncodeError(LocalProtocolError, ValueError):
    """A name, record or message that cannot be put on the wire."""


@dataclass(frozen=True, slots=True)
class Question:
    """One entry of the question section (RFC 1035 §4.1.2)."""

    name: str
    qtype: int
    qclass: int = CLASS_IN
    """Without the QU bit."""
    unicast_response: bool = False
    """RFC 6762 §5.4 QU: the querier asks for a unicast answer."""


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    """One resource record (RFC 1035 §4.1.3). ``rdata`` is the raw record data: names
    inside the RDATA of types other than A/AAAA are not decompressed."""

    name: str
    rtype: int
    rdata: bytes
    ttl: int
    """Seconds; a wire value with the top bit set decodes as 0 (RFC 2181 §8)."""
    rclass: int = CLASS_IN
    """Without the cache-flush bit."""
    cache_flush: bool = False
    """RFC 6762 §10.2: this record replaces what caches hold for its name and type."""

    @property
    def address(self) -> str | None:
        """The IP address of an A or AAAA record (canonical text), else None."""
        if _ADDRESS_LENGTHS.get(self.rtype) != len(self.rdata) or self.rclass != CLASS_IN:
            return None
        return str(ipaddress.ip_address(self.rdata))


@dataclass(frozen=True, slots=True)
class DnsMessage:
    """A DNS message (RFC 1035 §4.1); mDNS puts 0 in ``id`` (RFC 6762 §18.1) except in
    answers to legacy unicast queries (§6.7)."""

    id: int = 0
    flags: int = 0
    """QR, OPCODE, AA, TC, RD, RA, Z, AD, CD and RCODE as on the wire."""
    questions: tuple[Question, ...] = ()
    answers: tuple[ResourceRecord, ...] = ()
    authorities: tuple[ResourceRecord, ...] = ()
    additionals: tuple[ResourceRecord, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags & _OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & _RCODE_MASK


def address_record(name: str, ip: str, ttl: int, *, cache_flush: bool = True) -> ResourceRecord:
    """An A (IPv4) or AAAA (IPv6) record for ``name``; mDNS host address records are
    unique, so they carry the cache-flush bit (RFC 6762 §10.2) unless told otherwise."""
    address = ipaddress.ip_address(ip)
    rtype = TYPE_A if address.version == 4 else TYPE_AAAA
    return ResourceRecord(name, rtype, address.packed, ttl, CLASS_IN, cache_flush)


def canonical_name(name: str) -> str:
    """``name`` for comparisons: ASCII letters lower-cased (RFC 6762 §16 leaves other
    characters as they are), one trailing root dot removed."""
    if name.endswith("."):
        body = name[:-1]
        if (len(body) - len(body.rstrip("\\"))) % 2 == 0:  # the dot itself is not escaped
            name = body
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


# -- decoding -------------------------------------------------------------------------------


def _label_text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DnsDecodeError("label is not UTF-8 (RFC 6762 §16)") from None
    return text.replace("\\", "\\\\").replace(".", "\\.")


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name starting at ``offset`` and the offset just after it in the record."""
    labels: list[str] = []
    wire_length = 1  # the final zero octet
    pointers = 0
    position = offset
    segment_start = offset  # where the data being read now began
    end: int | None = None
    while True:
        if position >= len(data):
            raise DnsDecodeError("name runs past the end of the message")
        length = data[position]
        kind = length & 0xC0
        if kind == 0xC0:  # RFC 1035 §4.1.4 compression pointer
            if position + 1 >= len(data):
                raise DnsDecodeError("compression pointer cut short")
            target = ((length & 0x3F) << 8) | data[position + 1]
            if end is None:
                end = position + 2
            pointers += 1
            if pointers > MAX_POINTERS:
                raise DnsDecodeError("too many compression pointers in one name")
            if target < HEADER_SIZE:
                raise DnsDecodeError("compression pointer into the header")
            if target >= segment_start:
                raise DnsDecodeError("compression pointer not to a prior occurrence (loop)")
            position = segment_start = target
            continue
        if kind != 0:
            raise DnsDecodeError(f"label type {kind >> 6:#b} is not supported (RFC 6891 §5)")
        if length == 0:
            return ".".join(labels), position + 1 if end is None else end
        wire_length += length + 1
        if wire_length > MAX_NAME_LENGTH:
            raise DnsDecodeError("name longer than 255 octets")
        raw = data[position + 1 : position + 1 + length]
        if len(raw) < length:
            raise DnsDecodeError("label runs past the end of the message")
        labels.append(_label_text(raw))
        position += 1 + length


def _read_question(data: bytes, offset: int) -> tuple[Question, int]:
    name, offset = _read_name(data, offset)
    if offset + _QUESTION_TAIL.size > len(data):
        raise DnsDecodeError("question cut short")
    qtype, qclass = _QUESTION_TAIL.unpack_from(data, offset)
    question = Question(name, qtype, qclass & ~_TOP_BIT, bool(qclass & _TOP_BIT))
    return question, offset + _QUESTION_TAIL.size


def _read_record(data: bytes, offset: int) -> tuple[ResourceRecord, int]:
    name, offset = _read_name(data, offset)
    if offset + _RECORD_TAIL.size > len(data):
        raise DnsDecodeError("resource record header cut short")
    rtype, rclass, ttl, rdlength = _RECORD_TAIL.unpack_from(data, offset)
    offset += _RECORD_TAIL.size
    if offset + rdlength > len(data):
        raise DnsDecodeError("resource record data cut short")
    rdata = data[offset : offset + rdlength]
    expected = _ADDRESS_LENGTHS.get(rtype)
    if expected is not None and (rclass & ~_TOP_BIT) == CLASS_IN and rdlength != expected:
        raise DnsDecodeError(f"type {rtype} record with {rdlength} octets of data")
    record = ResourceRecord(
        name,
        rtype,
        rdata,
        0 if ttl > MAX_TTL else ttl,  # RFC 2181 §8: a set top bit means zero
        rclass & ~_TOP_BIT,
        bool(rclass & _TOP_BIT),
    )
    return record, offset + rdlength


def decode_message(data: bytes) -> DnsMessage:
    """Decode one DNS message; raises :class:`DnsDecodeError` and nothing else."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise DnsDecodeError(f"{len(data)} octets: more than the {MAX_MESSAGE_SIZE} of mDNS")
    if len(data) < HEADER_SIZE:
        raise DnsDecodeError("shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    records = ancount + nscount + arcount
    if qdcount * _MIN_QUESTION + records * _MIN_RECORD > len(data) - HEADER_SIZE:
        raise DnsDecodeError("section counts exceed the message length")
    offset = HEADER_SIZE
    questions: list[Question] = []
    for _ in range(qdcount):
        question, offset = _read_question(data, offset)
        questions.append(question)
    sections: list[tuple[ResourceRecord, ...]] = []
    for count in (ancount, nscount, arcount):
        section: list[ResourceRecord] = []
        for _ in range(count):
            record, offset = _read_record(data, offset)
            section.append(record)
        sections.append(tuple(section))
    if offset != len(data):
        raise DnsDecodeError(f"{len(data) - offset} octets after the last record")
    return DnsMessage(ident, flags, tuple(questions), *sections)


# -- encoding -------------------------------------------------------------------------------


def _split_labels(name: str) -> list[str]:
    """Labels of a name in text form, undoing ``\\.`` and ``\\\\`` escapes."""
    labels: list[str] = []
    current: list[str] = []
    escaped = False
    for char in name:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ".":
            labels.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise DnsEncodeError(f"name {name!r} ends with a lone backslash")
    labels.append("".join(current))
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()  # "host.local." is the absolute spelling of "host.local"
    return labels


def encode_name(name: str) -> bytes:
    """The uncompressed wire form of ``name`` (``""`` or ``"."`` is the root)."""
    if name in ("", "."):
        return b"\x00"
    out = bytearray()
    for label in _split_labels(name):
        raw = label.encode("utf-8")
        if not raw:
            raise DnsEncodeError(f"name {name!r} has an empty label")
        if len(raw) > MAX_LABEL_LENGTH:
            raise DnsEncodeError(f"label {label!r} is longer than 63 octets")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME_LENGTH:
        raise DnsEncodeError(f"name {name!r} is longer than 255 octets")
    return bytes(out)


def _u16(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFF:
        raise DnsEncodeError(f"{what} {value} does not fit in 16 bits")
    return value


def _encode_record(record: ResourceRecord) -> bytes:
    if not 0 <= record.ttl <= MAX_TTL:
        raise DnsEncodeError(f"TTL {record.ttl} out of range (RFC 2181 §8)")
    if not 0 <= record.rclass < _TOP_BIT:
        raise DnsEncodeError(f"class {record.rclass} out of range")
    expected = _ADDRESS_LENGTHS.get(record.rtype)
    if expected is not None and record.rclass == CLASS_IN and len(record.rdata) != expected:
        raise DnsEncodeError(f"type {record.rtype} record with {len(record.rdata)} octets")
    rclass = record.rclass | (_TOP_BIT if record.cache_flush else 0)
    tail = _RECORD_TAIL.pack(
        _u16(record.rtype, "type"), rclass, record.ttl, _u16(len(record.rdata), "RDLENGTH")
    )
    return encode_name(record.name) + tail + record.rdata


def _encode_section(records: Iterable[ResourceRecord]) -> bytes:
    return b"".join(_encode_record(record) for record in records)


def encode_message(message: DnsMessage) -> bytes:
    """The wire form of ``message``, uncompressed; at most 9000 octets (RFC 6762 §17)."""
    out = bytearray(
        _HEADER.pack(
            _u16(message.id, "ID"),
            _u16(message.flags, "flags"),
            _u16(len(message.questions), "QDCOUNT"),
            _u16(len(message.answers), "ANCOUNT"),
            _u16(len(message.authorities), "NSCOUNT"),
            _u16(len(message.additionals), "ARCOUNT"),
        )
    )
    for question in message.questions:
        if not 0 <= question.qclass < _TOP_BIT:
            raise DnsEncodeError(f"class {question.qclass} out of range")
        qclass = question.qclass | (_TOP_BIT if question.unicast_response else 0)
        out += encode_name(question.name)
        out += _QUESTION_TAIL.pack(_u16(question.qtype, "QTYPE"), qclass)
    out += _encode_section(message.answers)
    out += _encode_section(message.authorities)
    out += _encode_section(message.additionals)
    if len(out) > MAX_MESSAGE_SIZE:
        raise DnsEncodeError(f"{len(out)} octets: more than the {MAX_MESSAGE_SIZE} of mDNS")
    return bytes(out)
