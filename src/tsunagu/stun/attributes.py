"""Typed STUN attributes (RFC 8489 §14, RFC 5780 §7, RFC 8656 §18, RFC 6062 §6.2,
RFC 8445 §16.1), each with its value codec.

Every attribute class has a ``TYPE`` and two methods: ``encode_value(xor_key)`` returns the
value (unpadded) and ``decode_value(value, xor_key)`` builds the attribute from it, raising
:class:`~tsunagu.errors.StunDecodeError` and nothing else on bad input. ``xor_key`` is the 16
bytes of the header after the type and length (magic cookie + transaction ID), which the
XOR address attributes need (RFC 8489 §14.2). Attributes we do not know are kept raw as
:class:`UnknownAttribute` so a message can be re-encoded and inspected.

The encoder also asks each attribute for its whole wire form (``_encode_tlv``: header,
value, padding) in one call. The base class derives it from ``encode_value``; the common
classes override it with one ``struct`` call. A subclass that overrides ``encode_value``
(here or in user code) gets the derived form back automatically, so ``encode_value`` stays
the one method a new attribute has to write.

For the decoder's compiled message shapes (see :mod:`tsunagu.stun.message`) a class may
declare ``_LAYOUT``: how its value maps to the single constructor argument once the value's
length is known to be valid. ``"I"`` / ``"Q"``: one big-endian unsigned 32/64-bit integer;
``"s"``: the value bytes as they are; ``"utf-8"``: the value decoded as UTF-8, which
``decode_value`` rejects with its own error when it is not; ``""``: no argument (an empty
value); None (the default): only ``decode_value`` knows, and the decoder calls it. A
subclass that overrides ``decode_value`` gets None back automatically.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from tsunagu.errors import StunDecodeError
from tsunagu.stun.constants import AddressFamily, AttrType

Address = tuple[str, int]
"""A transport address: (IP literal, port). IPv6 literals carry no brackets."""

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_ADDR_HEAD = struct.Struct("!BBH")
_XOR_V4 = struct.Struct("!BBHI")  # reserved, family, port, IPv4 address
# Whole attributes (type, length, value) for the encoder's one-call forms.
_TLV_HEAD = struct.Struct("!HH")
_TLV_U32 = struct.Struct("!HHI")
_TLV_U64 = struct.Struct("!HHQ")
_TLV_XOR_V4 = struct.Struct("!HHBBHI")
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # by value length & 3
_inet_pton = socket.inet_pton
_inet_ntoa = socket.inet_ntoa
_AF_INET = socket.AF_INET
# RFC 8489 §14.5-14.7: the encoder computes these itself; a copy in a message's attribute
# list is not written out (``_encode_tlv`` gives b"").
_COMPUTED_TYPES = frozenset(
    int(t)
    for t in (AttrType.MESSAGE_INTEGRITY, AttrType.MESSAGE_INTEGRITY_SHA256, AttrType.FINGERPRINT)
)


class Attribute:
    """Base of every attribute; subclasses are small dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[int]
    _LAYOUT: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A class with its own encode_value (decode_value) but no matching _encode_tlv
        # (_LAYOUT) must not inherit a specialised one that would bypass it.
        if "encode_value" in cls.__dict__ and "_encode_tlv" not in cls.__dict__:
            cls._encode_tlv = Attribute._encode_tlv  # type: ignore[method-assign]
        if "decode_value" in cls.__dict__ and "_LAYOUT" not in cls.__dict__:
            cls._LAYOUT = None

    def encode_value(self, xor_key: bytes) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        raise NotImplementedError

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        """The attribute as the encoder writes it: type, length, value, zero padding to a
        multiple of 4 bytes; b"" for MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT, which the
        encoder computes. Raises ValueError for a value longer than 65535 bytes."""
        attr_type = self.TYPE
        if attr_type in _COMPUTED_TYPES:
            return b""
        value = self.encode_value(xor_key)
        length = len(value)
        if length > 0xFFFF:
            raise ValueError("attribute value longer than 65535 bytes")
        return _TLV_HEAD.pack(attr_type, length) + value + _PADDING[length & 3]


@dataclass(slots=True)
class UnknownAttribute(Attribute):
    """An attribute type this codec does not interpret; its bytes are kept as they came."""

    attr_type: int
    value: bytes
    TYPE: ClassVar[int] = -1

    def encode_value(self, xor_key: bytes) -> bytes:
        return self.value

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        # Written as is, whatever its type (even one the encoder would compute).
        value = self.value
        length = len(value)
        if length > 0xFFFF:
            raise ValueError("attribute value longer than 65535 bytes")
        return _TLV_HEAD.pack(self.attr_type, length) + value + _PADDING[length & 3]


# --- addresses (RFC 8489 §14.1, §14.2) -----------------------------------------------------


_IPV4 = int(AddressFamily.IPV4)
_IPV6 = int(AddressFamily.IPV6)
_VALUE_LENGTH = {_IPV4: 8, _IPV6: 20}  # family octet -> attribute value length
_XOR_PORT = 0x2112  # RFC 8489 §14.2: the port is XOR'd with the cookie's high 16 bits


def _pack_ip(ip: str) -> tuple[int, bytes]:
    if ":" not in ip:
        try:  # a canonical dotted quad, in C
            return _IPV4, _inet_pton(_AF_INET, ip)
        except (OSError, ValueError):
            pass  # below: what inet_pton is too strict for, or an error with our message
        parts = ip.split(".")
        if len(parts) == 4:
            try:
                return _IPV4, bytes(map(int, parts))
            except ValueError:
                pass
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise ValueError(f"not an IP address: {ip!r}") from exc
    return (_IPV4 if parsed.version == 4 else _IPV6), parsed.packed


def _unpack_ip(family: int, raw: bytes) -> str:
    if family == _IPV4:
        return _inet_ntoa(raw)
    return str(ipaddress.IPv6Address(raw))


def _xor(data: bytes, key: bytes) -> bytes:
    size = len(data)
    return (int.from_bytes(data) ^ int.from_bytes(key[:size])).to_bytes(size)


def _encode_address(address: Address) -> bytes:
    family, raw = _pack_ip(address[0])
    return _ADDR_HEAD.pack(0, family, address[1]) + raw


def _decode_address(value: bytes) -> tuple[int, int, bytes]:
    if len(value) < 4:
        raise StunDecodeError("address attribute too short")
    _, family, port = _ADDR_HEAD.unpack_from(value)
    expected = _VALUE_LENGTH.get(family)
    if expected is None:
        raise StunDecodeError(f"unknown address family {family:#x}")
    if len(value) != expected:
        raise StunDecodeError("address attribute has the wrong length for its family")
    return family, port, value[4:]


@dataclass(slots=True)
class _PlainAddressAttribute(Attribute):
    address: Address

    def encode_value(self, xor_key: bytes) -> bytes:
        return _encode_address(self.address)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        family, port, raw = _decode_address(value)
        return cls((_unpack_ip(family, raw), port))


@dataclass(slots=True)
class _XorAddressAttribute(Attribute):
    address: Address

    def encode_value(self, xor_key: bytes) -> bytes:
        ip, port = self.address
        family, raw = _pack_ip(ip)
        # RFC 8489 §14.2: port xor the cookie's high 16 bits, address xor cookie(+tid).
        if family == _IPV4:  # the common case, in one pack
            mask = int.from_bytes(xor_key[:4])
            return _XOR_V4.pack(0, _IPV4, port ^ _XOR_PORT, int.from_bytes(raw) ^ mask)
        return _ADDR_HEAD.pack(0, family, port ^ _XOR_PORT) + _xor(raw, xor_key)

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        ip, port = self.address
        if ":" not in ip:  # _pack_ip()'s fast path, inlined; header and value in one pack
            try:
                n = int.from_bytes(_inet_pton(_AF_INET, ip)) ^ int.from_bytes(xor_key[:4])
            except (OSError, ValueError):
                pass
            else:
                return _TLV_XOR_V4.pack(self.TYPE, 8, 0, _IPV4, port ^ _XOR_PORT, n)
        family, raw = _pack_ip(ip)
        if family == _IPV4:
            n = int.from_bytes(raw) ^ int.from_bytes(xor_key[:4])
            return _TLV_XOR_V4.pack(self.TYPE, 8, 0, _IPV4, port ^ _XOR_PORT, n)
        value = _ADDR_HEAD.pack(0, family, port ^ _XOR_PORT) + _xor(raw, xor_key)
        return _TLV_HEAD.pack(self.TYPE, 20) + value

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) == 8 and value[1] == _IPV4:  # the common case, without slicing
            _, _, port, n = _XOR_V4.unpack(value)
            n ^= int.from_bytes(xor_key[:4])
            return cls((_inet_ntoa(n.to_bytes(4)), port ^ _XOR_PORT))
        family, port, raw = _decode_address(value)
        return cls((_unpack_ip(family, _xor(raw, xor_key)), port ^ _XOR_PORT))


class MappedAddress(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.MAPPED_ADDRESS


class ResponseAddress(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.RESPONSE_ADDRESS


class SourceAddress(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.SOURCE_ADDRESS


class ChangedAddress(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.CHANGED_ADDRESS


class AlternateServer(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.ALTERNATE_SERVER


class ResponseOrigin(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.RESPONSE_ORIGIN


class OtherAddress(_PlainAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.OTHER_ADDRESS


class XorMappedAddress(_XorAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.XOR_MAPPED_ADDRESS


class XorPeerAddress(_XorAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.XOR_PEER_ADDRESS


class XorRelayedAddress(_XorAddressAttribute):
    __slots__ = ()
    TYPE = AttrType.XOR_RELAYED_ADDRESS


# --- text (RFC 8489 §14.3, §14.9, §14.10, §14.14, RFC 8656 §18 ALTERNATE-DOMAIN) ----------


@dataclass(slots=True)
class _TextAttribute(Attribute):
    value: str
    MAX_BYTES: ClassVar[int] = 763  # "fewer than 128 characters, which can be up to 763 bytes"
    _LAYOUT = "utf-8"

    def encode_value(self, xor_key: bytes) -> bytes:
        raw = self.value.encode()
        if len(raw) > self.MAX_BYTES:
            raise ValueError(f"{type(self).__name__} longer than {self.MAX_BYTES} bytes")
        return raw

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        raw = self.value.encode()
        length = len(raw)
        if length > self.MAX_BYTES:
            raise ValueError(f"{type(self).__name__} longer than {self.MAX_BYTES} bytes")
        return _TLV_HEAD.pack(self.TYPE, length) + raw + _PADDING[length & 3]

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) > cls.MAX_BYTES:
            raise StunDecodeError(f"{cls.__name__} longer than {cls.MAX_BYTES} bytes")
        try:
            return cls(value.decode())
        except UnicodeDecodeError as exc:
            raise StunDecodeError(f"{cls.__name__} is not UTF-8") from exc


class Username(_TextAttribute):
    __slots__ = ()
    TYPE = AttrType.USERNAME
    # RFC 8489 §14.3 asks senders for fewer than 509 bytes; RFC 5389 allowed 513, and we
    # accept what older peers send.
    MAX_BYTES = 513


class Realm(_TextAttribute):
    __slots__ = ()
    TYPE = AttrType.REALM


class Nonce(_TextAttribute):
    __slots__ = ()
    TYPE = AttrType.NONCE


class Software(_TextAttribute):
    __slots__ = ()
    TYPE = AttrType.SOFTWARE


class AlternateDomain(_TextAttribute):
    __slots__ = ()
    TYPE = AttrType.ALTERNATE_DOMAIN
    MAX_BYTES = 255  # a DNS name


# --- raw bytes -----------------------------------------------------------------------------


@dataclass(slots=True)
class _BytesAttribute(Attribute):
    value: bytes
    SIZES: ClassVar[tuple[int, ...] | None] = None  # allowed lengths; None = any
    _LAYOUT = "s"

    def encode_value(self, xor_key: bytes) -> bytes:
        return self.value

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        value = self.value
        length = len(value)
        if length > 0xFFFF:
            raise ValueError("attribute value longer than 65535 bytes")
        return _TLV_HEAD.pack(self.TYPE, length) + value + _PADDING[length & 3]

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if cls.SIZES is not None and len(value) not in cls.SIZES:
            raise StunDecodeError(f"{cls.__name__} has length {len(value)}")
        return cls(value)


class Data(_BytesAttribute):
    __slots__ = ()
    TYPE = AttrType.DATA


class Padding(_BytesAttribute):
    __slots__ = ()
    TYPE = AttrType.PADDING


class ReservationToken(_BytesAttribute):
    __slots__ = ()
    TYPE = AttrType.RESERVATION_TOKEN
    SIZES = (8,)


class Userhash(_BytesAttribute):
    __slots__ = ()
    TYPE = AttrType.USERHASH
    SIZES = (32,)


class MessageIntegrity(_BytesAttribute):
    __slots__ = ()
    TYPE = AttrType.MESSAGE_INTEGRITY
    SIZES = (20,)

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        return b""  # computed by the encoder


class MessageIntegritySha256(_BytesAttribute):
    __slots__ = ()
    TYPE = AttrType.MESSAGE_INTEGRITY_SHA256
    SIZES = (16, 20, 24, 28, 32)  # RFC 8489 §14.6: truncated to at least 16, multiple of 4

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        return b""  # computed by the encoder


# --- integers ------------------------------------------------------------------------------


@dataclass(slots=True)
class _U32Attribute(Attribute):
    value: int
    _LAYOUT = "I"

    def encode_value(self, xor_key: bytes) -> bytes:
        return _U32.pack(self.value)

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        return _TLV_U32.pack(self.TYPE, 4, self.value)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 4:
            raise StunDecodeError(f"{cls.__name__} must be 4 bytes")
        return cls(_U32.unpack(value)[0])


@dataclass(slots=True)
class _U64Attribute(Attribute):
    value: int
    _LAYOUT = "Q"

    def encode_value(self, xor_key: bytes) -> bytes:
        return _U64.pack(self.value)

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        return _TLV_U64.pack(self.TYPE, 8, self.value)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 8:
            raise StunDecodeError(f"{cls.__name__} must be 8 bytes")
        return cls(_U64.unpack(value)[0])


class Fingerprint(_U32Attribute):
    __slots__ = ()
    TYPE = AttrType.FINGERPRINT

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        return b""  # computed by the encoder


class Lifetime(_U32Attribute):
    __slots__ = ()
    TYPE = AttrType.LIFETIME


class Priority(_U32Attribute):
    __slots__ = ()
    TYPE = AttrType.PRIORITY


class ConnectionId(_U32Attribute):
    __slots__ = ()
    TYPE = AttrType.CONNECTION_ID


class IceControlled(_U64Attribute):
    """RFC 8445 §16.1: carries the agent's tie-breaker."""

    __slots__ = ()

    TYPE = AttrType.ICE_CONTROLLED


class IceControlling(_U64Attribute):
    __slots__ = ()
    TYPE = AttrType.ICE_CONTROLLING


@dataclass(slots=True)
class ChannelNumber(Attribute):
    """RFC 8656 §18.1: 16-bit channel number followed by 16 RFFU bits."""

    value: int
    TYPE: ClassVar[int] = AttrType.CHANNEL_NUMBER

    def encode_value(self, xor_key: bytes) -> bytes:
        return _U16.pack(self.value) + b"\x00\x00"

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 4:
            raise StunDecodeError("CHANNEL-NUMBER must be 4 bytes")
        return cls(_U16.unpack_from(value)[0])


@dataclass(slots=True)
class ResponsePort(Attribute):
    """RFC 5780 §7.5: 16-bit port then 16 bits of padding."""

    port: int
    TYPE: ClassVar[int] = AttrType.RESPONSE_PORT

    def encode_value(self, xor_key: bytes) -> bytes:
        return _U16.pack(self.port) + b"\x00\x00"

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 4:
            raise StunDecodeError("RESPONSE-PORT must be 4 bytes")
        return cls(_U16.unpack_from(value)[0])


# --- flags and small enumerations ----------------------------------------------------------


# No fields, so no generated __init__: object's (in C) does all there is to do, for half
# the cost of calling a Python one.
@dataclass(slots=True, init=False)
class _EmptyAttribute(Attribute):
    _LAYOUT = ""

    def encode_value(self, xor_key: bytes) -> bytes:
        return b""

    def _encode_tlv(self, xor_key: bytes) -> bytes:
        return _TLV_HEAD.pack(self.TYPE, 0)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if value:
            raise StunDecodeError(f"{cls.__name__} must be empty")
        return cls()


class UseCandidate(_EmptyAttribute):
    __slots__ = ()
    TYPE = AttrType.USE_CANDIDATE


class DontFragment(_EmptyAttribute):
    __slots__ = ()
    TYPE = AttrType.DONT_FRAGMENT


@dataclass(slots=True)
class _OneByteAttribute(Attribute):
    """One significant octet followed by three RFFU octets."""

    value: int

    def encode_value(self, xor_key: bytes) -> bytes:
        return bytes((self.value, 0, 0, 0))

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 4:
            raise StunDecodeError(f"{cls.__name__} must be 4 bytes")
        return cls(value[0])


class RequestedTransport(_OneByteAttribute):
    """RFC 8656 §18.4: the IANA protocol number (17 = UDP, 6 = TCP per RFC 6062)."""

    __slots__ = ()

    TYPE = AttrType.REQUESTED_TRANSPORT


class RequestedAddressFamily(_OneByteAttribute):
    """RFC 8656 §18.5: 0x01 IPv4, 0x02 IPv6."""

    __slots__ = ()

    TYPE = AttrType.REQUESTED_ADDRESS_FAMILY


class AdditionalAddressFamily(_OneByteAttribute):
    """RFC 8656 §18.11: only 0x02 (IPv6) is meaningful."""

    __slots__ = ()

    TYPE = AttrType.ADDITIONAL_ADDRESS_FAMILY


@dataclass(slots=True)
class EvenPort(Attribute):
    """RFC 8656 §18.6: the R bit asks the server to reserve the next-higher port."""

    reserve: bool = False
    TYPE: ClassVar[int] = AttrType.EVEN_PORT

    def encode_value(self, xor_key: bytes) -> bytes:
        return b"\x80" if self.reserve else b"\x00"

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 1:
            raise StunDecodeError("EVEN-PORT must be 1 byte")
        return cls(bool(value[0] & 0x80))


@dataclass(slots=True)
class ChangeRequest(Attribute):
    """RFC 5780 §7.2: ask the server to answer from another IP and/or port."""

    change_ip: bool = False
    change_port: bool = False
    TYPE: ClassVar[int] = AttrType.CHANGE_REQUEST

    def encode_value(self, xor_key: bytes) -> bytes:
        return _U32.pack((0x04 if self.change_ip else 0) | (0x02 if self.change_port else 0))

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 4:
            raise StunDecodeError("CHANGE-REQUEST must be 4 bytes")
        flags = _U32.unpack(value)[0]
        return cls(bool(flags & 0x04), bool(flags & 0x02))


# --- errors (RFC 8489 §14.8, RFC 8656 §18.12, §18.13) --------------------------------------


def _decode_error_number(value: bytes, what: str) -> tuple[int, str]:
    if len(value) < 4:
        raise StunDecodeError(f"{what} too short")
    error_class, number = value[2] & 0x07, value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunDecodeError(f"{what} has an invalid code")
    if len(value) - 4 > 763:
        raise StunDecodeError(f"{what} reason phrase too long")
    try:
        reason = value[4:].decode()
    except UnicodeDecodeError as exc:
        raise StunDecodeError(f"{what} reason phrase is not UTF-8") from exc
    return error_class * 100 + number, reason


@dataclass(slots=True)
class ErrorCodeAttr(Attribute):
    code: int
    reason: str = ""
    TYPE: ClassVar[int] = AttrType.ERROR_CODE

    def encode_value(self, xor_key: bytes) -> bytes:
        return bytes((0, 0, self.code // 100, self.code % 100)) + self.reason.encode()

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        return cls(*_decode_error_number(value, "ERROR-CODE"))


@dataclass(slots=True)
class AddressErrorCode(Attribute):
    """RFC 8656 §18.12: which family of a dual allocation failed, and why."""

    family: int
    code: int
    reason: str = ""
    TYPE: ClassVar[int] = AttrType.ADDRESS_ERROR_CODE

    def encode_value(self, xor_key: bytes) -> bytes:
        return bytes((self.family, 0, self.code // 100, self.code % 100)) + self.reason.encode()

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        code, reason = _decode_error_number(value, "ADDRESS-ERROR-CODE")
        return cls(value[0], code, reason)


@dataclass(slots=True)
class Icmp(Attribute):
    """RFC 8656 §18.13: 16 reserved bits, ICMP type (7 bits) and code (9 bits), error data."""

    icmp_type: int
    icmp_code: int
    error_data: int = 0
    TYPE: ClassVar[int] = AttrType.ICMP

    def encode_value(self, xor_key: bytes) -> bytes:
        return _U32.pack(((self.icmp_type & 0x7F) << 9) | (self.icmp_code & 0x1FF)) + _U32.pack(
            self.error_data
        )

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) != 8:
            raise StunDecodeError("ICMP must be 8 bytes")
        word, data = struct.unpack("!II", value)
        return cls((word >> 9) & 0x7F, word & 0x1FF, data)


@dataclass(slots=True)
class UnknownAttributes(Attribute):
    types: tuple[int, ...]
    TYPE: ClassVar[int] = AttrType.UNKNOWN_ATTRIBUTES

    def encode_value(self, xor_key: bytes) -> bytes:
        return b"".join(_U16.pack(t) for t in self.types)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        if len(value) % 2:
            raise StunDecodeError("UNKNOWN-ATTRIBUTES has an odd length")
        return cls(tuple(_U16.unpack_from(value, i)[0] for i in range(0, len(value), 2)))


# --- password algorithms (RFC 8489 §14.11, §14.12) -----------------------------------------


def _encode_algorithm(algorithm: int, params: bytes) -> bytes:
    pad = -len(params) % 4
    return struct.pack("!HH", algorithm, len(params)) + params + b"\x00" * pad


@dataclass(slots=True)
class PasswordAlgorithm(Attribute):
    algorithm: int
    params: bytes = b""
    TYPE: ClassVar[int] = AttrType.PASSWORD_ALGORITHM

    def encode_value(self, xor_key: bytes) -> bytes:
        return _encode_algorithm(self.algorithm, self.params)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        algorithms = PasswordAlgorithms.decode_value(value, xor_key).algorithms
        if len(algorithms) != 1:
            raise StunDecodeError("PASSWORD-ALGORITHM must hold exactly one algorithm")
        return cls(*algorithms[0])


@dataclass(slots=True)
class PasswordAlgorithms(Attribute):
    algorithms: tuple[tuple[int, bytes], ...]
    TYPE: ClassVar[int] = AttrType.PASSWORD_ALGORITHMS

    def encode_value(self, xor_key: bytes) -> bytes:
        return b"".join(_encode_algorithm(a, p) for a, p in self.algorithms)

    @classmethod
    def decode_value(cls, value: bytes, xor_key: bytes) -> Self:
        algorithms: list[tuple[int, bytes]] = []
        offset = 0
        while offset < len(value):
            if offset + 4 > len(value):
                raise StunDecodeError("truncated password algorithm")
            algorithm, length = struct.unpack_from("!HH", value, offset)
            end = offset + 4 + length
            if end > len(value):
                raise StunDecodeError("truncated password algorithm parameters")
            algorithms.append((algorithm, value[offset + 4 : end]))
            offset = end + (-length % 4)
        return cls(tuple(algorithms))


ATTRIBUTE_CLASSES: dict[int, type[Attribute]] = {
    cls.TYPE: cls
    for cls in (
        MappedAddress,
        ResponseAddress,
        ChangeRequest,
        SourceAddress,
        ChangedAddress,
        Username,
        MessageIntegrity,
        ErrorCodeAttr,
        UnknownAttributes,
        ChannelNumber,
        Lifetime,
        XorPeerAddress,
        Data,
        Realm,
        Nonce,
        XorRelayedAddress,
        RequestedAddressFamily,
        EvenPort,
        RequestedTransport,
        DontFragment,
        MessageIntegritySha256,
        PasswordAlgorithm,
        Userhash,
        XorMappedAddress,
        ReservationToken,
        Priority,
        UseCandidate,
        Padding,
        ResponsePort,
        ConnectionId,
        AdditionalAddressFamily,
        AddressErrorCode,
        PasswordAlgorithms,
        AlternateDomain,
        Icmp,
        Software,
        AlternateServer,
        Fingerprint,
        IceControlled,
        IceControlling,
        ResponseOrigin,
        OtherAddress,
    )
}
"""Every attribute type this codec interprets, by type number. Read-only: the decoder
compiles message layouts from it (and from each class's ``_LAYOUT``)."""
