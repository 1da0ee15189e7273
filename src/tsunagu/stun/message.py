"""STUN messages (RFC 8489 §5, §14.5-14.7): header, attribute walk, integrity, fingerprint.

Decoding is strict about framing and lenient about content, as RFC 8489 asks: any byte
string either decodes or raises :class:`~tsunagu.errors.StunDecodeError`. A decoded
message keeps its raw bytes so MESSAGE-INTEGRITY can be checked later, once the caller knows
which key applies (a server learns the key from USERNAME inside the same message).
"""

from __future__ import annotations

import contextlib
import hashlib
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
    Fingerprint,
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
_ATTR_HEAD = struct.Struct("!HH")  # also the first half of the header: type, length
_U32 = struct.Struct("!I")
# Plain ints: they are compared with the plain ints struct unpacks from the wire.
_MI_TYPE = int(AttrType.MESSAGE_INTEGRITY)
_MI256_TYPE = int(AttrType.MESSAGE_INTEGRITY_SHA256)
_FP_TYPE = int(AttrType.FINGERPRINT)
_COMPUTED = frozenset((_MI_TYPE, _MI256_TYPE, _FP_TYPE))
_MI_HEAD = _ATTR_HEAD.pack(_MI_TYPE, 20)
_MI256_HEAD = _ATTR_HEAD.pack(_MI256_TYPE, 32)
_FP_HEAD = _ATTR_HEAD.pack(_FP_TYPE, 4)
_CLASSES = tuple(MessageClass(value) for value in range(4))
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # by value length & 3
# RFC 2104 HMAC, computed with hashlib directly: OpenSSL 3's one-shot HMAC (what hmac.digest
# calls) costs more than twice the two hash computations it stands for, and a STUN agent
# runs one HMAC per message it sends or checks. SHA-1 and SHA-256 both have 64-byte blocks.
_HMAC_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


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
    """HMAC-SHA1 or HMAC-SHA256 of ``data`` (RFC 2104), equal to ``hmac.digest``."""
    new = hashlib.sha1 if algorithm == "sha1" else hashlib.sha256
    if len(key) > _HMAC_BLOCK:
        key = new(key).digest()
    key = key.ljust(_HMAC_BLOCK, b"\x00")
    inner = new(key.translate(_IPAD))
    inner.update(data)
    outer = new(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


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
        if integrity not in ("sha1", "sha256"):
            raise ValueError(f"unknown integrity algorithm {integrity!r}")
        head = self.transaction_id if self.legacy else MAGIC_COOKIE_BYTES + self.transaction_id
        parts: list[bytes] = []
        append = parts.append
        pack = _ATTR_HEAD.pack
        computed = _COMPUTED
        for attribute in self.attributes:
            if isinstance(attribute, UnknownAttribute):
                attr_type, value = attribute.attr_type, attribute.value
            else:
                attr_type = attribute.TYPE
                if attr_type in computed:
                    continue
                value = attribute.encode_value(head)
            length = len(value)
            if length > 0xFFFF:
                raise ValueError("attribute value longer than 65535 bytes")
            append(pack(attr_type, length))
            append(value)
            if length & 3:
                append(_PADDING[length & 3])
        body = b"".join(parts)
        method = self.method
        message_type = (  # encode_message_type(), inlined
            (method & 0x000F)
            | ((method & 0x0070) << 1)
            | ((method & 0x0F80) << 2)
            | ((self.message_class & 0b01) << 4)
            | ((self.message_class & 0b10) << 7)
        )
        length = len(body)
        sha256 = integrity == "sha256"
        total = length
        if integrity_key is not None:
            total += 36 if sha256 else 24
        if fingerprint:
            total += 8
        if total > 0xFFFF:
            raise ValueError("message longer than 65535 bytes")
        if integrity_key is not None:
            # RFC 8489 §14.5: the length covers up to and including the integrity attribute
            # while hashing; FINGERPRINT (if any) is counted afterwards.
            length += 36 if sha256 else 24
            mac = _hmac(integrity_key, pack(message_type, length) + head + body, integrity)
            body += (_MI256_HEAD if sha256 else _MI_HEAD) + mac
        if fingerprint:
            data = pack(message_type, length + 8) + head + body
            return data + _FP_HEAD + _U32.pack(zlib.crc32(data) ^ FINGERPRINT_XOR)
        return pack(message_type, length) + head + body

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
        message_type, length, cookie = _HEADER.unpack_from(data)
        if message_type & 0xC000:
            raise StunDecodeError("the two most significant bits must be zero")
        if length & 3:
            raise StunDecodeError("length is not a multiple of 4")
        if length + HEADER_LENGTH != size:
            raise StunDecodeError("length field does not match the datagram")
        # Copy (a bytearray or memoryview) only once the framing is known to be right.
        data = bytes(data)
        legacy = cookie != MAGIC_COOKIE
        xor_key = data[4:20]
        # Built without __init__: the transaction ID length holds by construction.
        message = cls.__new__(cls)
        message.method = (  # decode_message_type(), inlined
            (message_type & 0x000F)
            | ((message_type & 0x00E0) >> 1)
            | ((message_type & 0x3E00) >> 2)
        )
        message.message_class = _CLASSES[((message_type >> 4) & 1) | ((message_type >> 7) & 2)]
        message.transaction_id = xor_key if legacy else data[8:20]
        message.legacy = legacy
        message.raw = data
        attributes: list[Attribute] = []
        message.attributes = attributes
        offsets: list[tuple[int, int]] = []
        message._integrity_offsets = offsets
        append = attributes.append
        unpack_from = _ATTR_HEAD.unpack_from
        classes = ATTRIBUTE_CLASSES
        computed = _COMPUTED
        offset = HEADER_LENGTH
        seen_integrity = seen_sha256 = seen_fingerprint = False
        # ``size`` and every ``offset`` are multiples of 4 (checked above; each step below
        # is 4 + the padded value length), so a whole attribute header is always present.
        while offset < size:
            attr_type, attr_length = unpack_from(data, offset)
            start = offset + 4
            end = start + attr_length
            if end > size:
                raise StunDecodeError("attribute runs past the end of the message")
            next_offset = end + (-attr_length & 3)
            if seen_fingerprint:
                raise StunDecodeError("attribute after FINGERPRINT")
            if attr_type in computed:
                if attr_type == _FP_TYPE:
                    if attr_length != 4:
                        raise StunDecodeError("FINGERPRINT must be 4 bytes")
                    expected = zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR
                    if _U32.unpack_from(data, start)[0] != expected:
                        raise StunDecodeError("FINGERPRINT does not match")
                    seen_fingerprint = True
                    append(Fingerprint(expected))
                    offset = next_offset
                    continue
                elif seen_sha256 or (seen_integrity and attr_type == _MI_TYPE):
                    # RFC 8489 §14.5/§14.6: ignore everything after the integrity
                    # attribute(s) except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
                    offset = next_offset
                    continue
                elif attr_type == _MI_TYPE:
                    seen_integrity = True
                    offsets.append((offset, attr_type))
                else:
                    seen_sha256 = True
                    offsets.append((offset, attr_type))
            elif seen_integrity or seen_sha256:
                offset = next_offset
                continue
            attr_class = classes.get(attr_type)
            if attr_class is None:
                append(UnknownAttribute(attr_type, data[start:end]))
            else:
                append(attr_class.decode_value(data[start:end], xor_key))
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
        end = offset + 4 + value_length
        # Patch the header length to end just after the integrity attribute (§14.5).
        covered = raw[:2] + (end - HEADER_LENGTH).to_bytes(2, "big") + raw[4:offset]
        digest = _hmac(key, covered, "sha256" if attr_type == _MI256_TYPE else "sha1")
        return hmac.compare_digest(digest[:value_length], raw[offset + 4 : end])


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
