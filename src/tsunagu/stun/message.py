"""STUN messages (RFC 8489 §5, §14.5-14.7): header, attribute walk, integrity, fingerprint.

Decoding is strict about framing and lenient about content, as RFC 8489 asks: any byte
string either decodes or raises :class:`~tsunagu.errors.StunDecodeError`. A decoded
message keeps its raw bytes so MESSAGE-INTEGRITY can be checked later, once the caller knows
which key applies (a server learns the key from USERNAME inside the same message).
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import struct
import zlib
from collections.abc import Iterable
from typing import Literal, TypeVar

from tsunagu.errors import StunDecodeError
from tsunagu.stun.attributes import (
    ATTRIBUTE_CLASSES,
    Attribute,
    ErrorCodeAttr,
    UnknownAttribute,
)
from tsunagu.stun.constants import (
    FINGERPRINT_XOR,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    MAGIC_COOKIE_BYTES,
    REASON_PHRASES,
    AttrType,
    MessageClass,
    Method,
    is_comprehension_required,
)

A = TypeVar("A", bound=Attribute)
IntegrityAlgorithm = Literal["sha1", "sha256"]

_HEADER = struct.Struct("!HHI")
_ATTR_HEAD = struct.Struct("!HH")
_MI_TYPE = AttrType.MESSAGE_INTEGRITY
_MI256_TYPE = AttrType.MESSAGE_INTEGRITY_SHA256
_FP_TYPE = AttrType.FINGERPRINT
_COMPUTED = frozenset((_MI_TYPE, _MI256_TYPE, _FP_TYPE))
_MI_HEAD = _ATTR_HEAD.pack(_MI_TYPE, 20)
_MI256_HEAD = _ATTR_HEAD.pack(_MI256_TYPE, 32)
_FP_HEAD = _ATTR_HEAD.pack(_FP_TYPE, 4)


def encode_message_type(method: int, message_class: int) -> int:
    """RFC 8489 §5: interleave the class bits C1 C0 into the 12-bit method."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def decode_message_type(message_type: int) -> tuple[int, MessageClass]:
    method = (
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    )
    message_class = ((message_type & 0x0010) >> 4) | ((message_type & 0x0100) >> 7)
    return method, MessageClass(message_class)


def new_transaction_id() -> bytes:
    """96 random bits from the OS CSPRNG (RFC 8489 §5: uniformly and randomly chosen)."""
    return secrets.token_bytes(12)


def fingerprint(data: bytes) -> int:
    """RFC 8489 §14.7: CRC-32 of the message so far, xor 0x5354554e."""
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def _hmac(key: bytes, data: bytes, algorithm: IntegrityAlgorithm) -> bytes:
    return hmac.digest(key, data, "sha1" if algorithm == "sha1" else "sha256")


class Message:
    """A STUN message: method, class, transaction ID and ordered attributes.

    ``transaction_id`` is 12 bytes; for an RFC 3489 message (``legacy``, no magic cookie) it
    is the 16 bytes that stand where RFC 8489 puts cookie and ID.
    """

    __slots__ = (
        "_integrity_offsets",
        "attributes",
        "legacy",
        "message_class",
        "method",
        "raw",
        "transaction_id",
    )

    def __init__(
        self,
        method: int,
        message_class: MessageClass,
        transaction_id: bytes,
        attributes: Iterable[Attribute] = (),
        *,
        legacy: bool = False,
    ) -> None:
        if len(transaction_id) != (16 if legacy else 12):
            raise ValueError("transaction ID must be 12 bytes (16 for RFC 3489 messages)")
        self.method = method
        self.message_class = message_class
        self.transaction_id = transaction_id
        self.attributes: list[Attribute] = list(attributes)
        self.legacy = legacy
        self.raw: bytes | None = None
        # (offset, attribute type) of MESSAGE-INTEGRITY(-SHA256) within ``raw``.
        self._integrity_offsets: list[tuple[int, int]] = []

    def __repr__(self) -> str:
        method = f"{self.method:#05x}"
        with contextlib.suppress(ValueError):
            method = Method(self.method).name
        return (
            f"Message({method} {self.message_class.name} {self.transaction_id.hex()} "
            f"{self.attributes!r})"
        )

    # -- access ---------------------------------------------------------------------------

    def get(self, kind: type[A]) -> A | None:
        """The first attribute of class ``kind``, or None."""
        for attribute in self.attributes:
            if type(attribute) is kind:
                return attribute
        return None

    def get_all(self, kind: type[A]) -> list[A]:
        return [a for a in self.attributes if type(a) is kind]

    def unknown_comprehension_required(self) -> tuple[int, ...]:
        """Types a server must list in a 420 response (RFC 8489 §6.3.1)."""
        return tuple(
            a.attr_type
            for a in self.attributes
            if isinstance(a, UnknownAttribute) and is_comprehension_required(a.attr_type)
        )

    @property
    def integrity_algorithm(self) -> IntegrityAlgorithm | None:
        """Which MESSAGE-INTEGRITY a decoded message carries (SHA-256 wins, §14.6)."""
        kinds = {t for _, t in self._integrity_offsets}
        if _MI256_TYPE in kinds:
            return "sha256"
        if _MI_TYPE in kinds:
            return "sha1"
        return None

    @property
    def error(self) -> ErrorCodeAttr | None:
        return self.get(ErrorCodeAttr)

    # -- encoding -------------------------------------------------------------------------

    def encode(
        self,
        integrity_key: bytes | None = None,
        *,
        integrity: IntegrityAlgorithm = "sha1",
        fingerprint: bool = False,
    ) -> bytes:
        """Serialise; with ``integrity_key`` append MESSAGE-INTEGRITY (or -SHA256), then
        FINGERPRINT when asked. Such attributes in ``attributes`` are recomputed, not copied.
        """
        head = MAGIC_COOKIE_BYTES + self.transaction_id if not self.legacy else self.transaction_id
        xor_key = head
        parts: list[bytes] = []
        for attribute in self.attributes:
            if isinstance(attribute, UnknownAttribute):
                attr_type, value = attribute.attr_type, attribute.value
            else:
                attr_type = attribute.TYPE
                if attr_type in _COMPUTED:
                    continue
                value = attribute.encode_value(xor_key)
            length = len(value)
            if length > 0xFFFF:
                raise ValueError("attribute value longer than 65535 bytes")
            parts.append(_ATTR_HEAD.pack(attr_type, length))
            parts.append(value)
            if length & 3:
                parts.append(b"\x00" * (4 - (length & 3)))
        body = b"".join(parts)
        message_type = encode_message_type(self.method, self.message_class)
        length = len(body)
        if integrity_key is not None:
            # RFC 8489 §14.5: the length covers up to and including the integrity attribute
            # while hashing; FINGERPRINT (if any) is counted afterwards.
            length += 36 if integrity == "sha256" else 24
            data = _HEADER.pack(message_type, length, 0)[:4] + head + body
            mac = _hmac(integrity_key, data, integrity)
            body += (_MI256_HEAD if integrity == "sha256" else _MI_HEAD) + mac
        if fingerprint:
            length += 8
            data = _HEADER.pack(message_type, length, 0)[:4] + head + body
            return data + _FP_HEAD + struct.pack("!I", zlib.crc32(data) ^ FINGERPRINT_XOR)
        if length > 0xFFFF:
            raise ValueError("message longer than 65535 bytes")
        return _HEADER.pack(message_type, length, 0)[:4] + head + body

    # -- decoding -------------------------------------------------------------------------

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Parse one whole STUN message (a UDP datagram, or a frame cut by a stream framer).

        Raises :class:`StunDecodeError` for anything malformed, including a FINGERPRINT
        that does not match (RFC 8489 §7.3: such a message is not STUN).
        """
        size = len(data)
        if size < HEADER_LENGTH:
            raise StunDecodeError("shorter than a STUN header")
        data = bytes(data)
        message_type, length, cookie = _HEADER.unpack_from(data)
        if message_type & 0xC000:
            raise StunDecodeError("the two most significant bits must be zero")
        if length & 3:
            raise StunDecodeError("length is not a multiple of 4")
        if length + HEADER_LENGTH != size:
            raise StunDecodeError("length field does not match the datagram")
        method, message_class = decode_message_type(message_type)
        legacy = cookie != MAGIC_COOKIE
        xor_key = data[4:20]
        message = cls(method, message_class, xor_key if legacy else data[8:20], legacy=legacy)
        message.raw = data
        attributes = message.attributes
        offsets = message._integrity_offsets
        classes = ATTRIBUTE_CLASSES
        offset = HEADER_LENGTH
        seen_integrity = seen_sha256 = seen_fingerprint = False
        while offset < size:
            if offset + 4 > size:
                raise StunDecodeError("truncated attribute header")
            attr_type, attr_length = _ATTR_HEAD.unpack_from(data, offset)
            start = offset + 4
            end = start + attr_length
            if end > size:
                raise StunDecodeError("attribute runs past the end of the message")
            next_offset = end + (-attr_length & 3)
            if seen_fingerprint:
                raise StunDecodeError("attribute after FINGERPRINT")
            value = data[start:end]
            if attr_type == _FP_TYPE:
                if len(value) != 4:
                    raise StunDecodeError("FINGERPRINT must be 4 bytes")
                expected = zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR
                if struct.unpack("!I", value)[0] != expected:
                    raise StunDecodeError("FINGERPRINT does not match")
                seen_fingerprint = True
            elif seen_sha256 or (seen_integrity and attr_type != _MI256_TYPE):
                # RFC 8489 §14.5/§14.6: ignore everything after the integrity attribute(s)
                # except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
                offset = next_offset
                continue
            elif attr_type == _MI_TYPE:
                seen_integrity = True
                offsets.append((offset, attr_type))
            elif attr_type == _MI256_TYPE:
                seen_sha256 = True
                offsets.append((offset, attr_type))
            attr_class = classes.get(attr_type)
            if attr_class is None:
                attributes.append(UnknownAttribute(attr_type, value))
            else:
                attributes.append(attr_class.decode_value(value, xor_key))
            offset = next_offset
        if offset != size:
            raise StunDecodeError("padding runs past the end of the message")
        return message

    def verify_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY, in constant
        time. False when the message carries neither or was not decoded from bytes."""
        raw = self.raw
        if raw is None or not self._integrity_offsets:
            return False
        offset, attr_type = self._integrity_offsets[-1]
        value_length = _ATTR_HEAD.unpack_from(raw, offset)[1]
        received = raw[offset + 4 : offset + 4 + value_length]
        # Patch the header length to end just after the integrity attribute (§14.5).
        adjusted = raw[:2] + struct.pack("!H", offset + 4 + value_length - HEADER_LENGTH)
        digest = _hmac(
            key, adjusted + raw[4:offset], "sha256" if attr_type == _MI256_TYPE else "sha1"
        )
        return hmac.compare_digest(digest[: len(received)], received)


# -- building replies -----------------------------------------------------------------------


def success_response(request: Message, attributes: Iterable[Attribute] = ()) -> Message:
    return Message(
        request.method,
        MessageClass.SUCCESS,
        request.transaction_id,
        attributes,
        legacy=request.legacy,
    )


def error_response(
    request: Message,
    code: int,
    reason: str | None = None,
    attributes: Iterable[Attribute] = (),
) -> Message:
    """An error response; the reason phrase defaults to the RFC's recommended one."""
    error = ErrorCodeAttr(code, REASON_PHRASES.get(code, "") if reason is None else reason)
    return Message(
        request.method,
        MessageClass.ERROR,
        request.transaction_id,
        [error, *attributes],
        legacy=request.legacy,
    )
