"""STUN messages (RFC 8489 §5, §14.5-14.7): header, attribute walk, integrity, fingerprint.

Decoding is strict about framing and lenient about content, as RFC 8489 asks: any byte
string either decodes or raises :class:`~tsunagu.errors.StunDecodeError`. A decoded
message keeps its raw bytes so MESSAGE-INTEGRITY can be checked later, once the caller knows
which key applies (a server learns the key from USERNAME inside the same message).

Keys for MESSAGE-INTEGRITY(-SHA256) are raw bytes or an :class:`IntegrityKey`, which does
the HMAC key schedule once; an agent that signs or checks many messages under one
credential keeps one per credential. The module itself holds no key material.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import operator
import secrets
import struct
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

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

if TYPE_CHECKING:
    from _hashlib import HASH
    from collections.abc import Callable

A = TypeVar("A", bound=Attribute)
IntegrityAlgorithm = Literal["sha1", "sha256"]

_HEADER = struct.Struct("!HHI")
_HEADER_AND_FIRST = struct.Struct("!HHI12xI")  # ... and the first attribute header, as a word
_ATTR_HEAD = struct.Struct("!HH")  # also the first half of the header: type, length
_U32 = struct.Struct("!I")
_FP_TLV = struct.Struct("!HHI")  # a whole FINGERPRINT attribute
# Plain ints: they are compared with the plain ints struct unpacks from the wire.
_MI_TYPE = int(AttrType.MESSAGE_INTEGRITY)
_MI256_TYPE = int(AttrType.MESSAGE_INTEGRITY_SHA256)
_FP_TYPE = int(AttrType.FINGERPRINT)
_COMPUTED = frozenset((_MI_TYPE, _MI256_TYPE, _FP_TYPE))
_MI_HEAD = _ATTR_HEAD.pack(_MI_TYPE, 20)
_MI256_HEAD = _ATTR_HEAD.pack(_MI256_TYPE, 32)
# The class bits C1 (0x100) and C0 (0x010) of a message type, to the class (RFC 8489 §5).
_NO_INTEGRITY = (0, 0)
_CLASS_BITS = {((c & 2) << 7) | ((c & 1) << 4): MessageClass(c) for c in range(4)}
# RFC 2104 HMAC, computed with hashlib directly: OpenSSL 3's one-shot HMAC (what hmac.digest
# calls) costs more than twice the two hash computations it stands for, and a STUN agent
# runs one HMAC per message it sends or checks. SHA-1 and SHA-256 both have 64-byte blocks.
_HMAC_BLOCK = 64
_crc32 = zlib.crc32
_compare_digest = hmac.compare_digest
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


def _mac(key: bytes | IntegrityKey, data: bytes, sha256: bool) -> bytes:
    """HMAC-SHA1 (or HMAC-SHA256) of ``data`` (RFC 2104), equal to ``hmac.digest``: from
    the key's prepared hash states, or from a raw key's padded block."""
    if isinstance(key, IntegrityKey):
        inner_state, outer_state = key._sha256 if sha256 else key._sha1
        inner = inner_state.copy()
        outer = outer_state.copy()
    else:
        inner, outer = _hmac_states(key, hashlib.sha256 if sha256 else hashlib.sha1)
    inner.update(data)
    outer.update(inner.digest())
    return outer.digest()


def _hmac_states(key: bytes, new: Callable[[bytes], HASH]) -> tuple[HASH, HASH]:
    """RFC 2104's inner and outer hash states after the padded key block."""
    if len(key) > _HMAC_BLOCK:
        key = new(key).digest()
    key = key.ljust(_HMAC_BLOCK, b"\x00")
    return new(key.translate(_IPAD)), new(key.translate(_OPAD))


class IntegrityKey:
    """A MESSAGE-INTEGRITY(-SHA256) key with its HMAC key schedule done once.

    The hash states after the padded key block (RFC 2104's inner and outer) are computed
    here, for SHA-1 and SHA-256, and copied for each message: an HMAC then costs the
    hashing of the message and nothing for the key. :meth:`Message.encode` and
    :meth:`Message.verify_integrity` accept one wherever they accept a raw key and give the
    same result. Keep one per credential (an ICE password, a TURN long-term key) for as
    long as the credential is in use. ``repr`` does not show the key.
    """

    __slots__ = ("_sha1", "_sha256", "key")

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        key = bytes(key)
        self.key: bytes = key
        self._sha1 = _hmac_states(key, hashlib.sha1)
        self._sha256 = _hmac_states(key, hashlib.sha256)

    def __repr__(self) -> str:
        return "IntegrityKey(...)"

    def mac(self, data: bytes, algorithm: IntegrityAlgorithm = "sha1") -> bytes:
        """HMAC of ``data`` under this key; equal to ``hmac.digest(key, data, algorithm)``."""
        if algorithm not in ("sha1", "sha256"):
            raise ValueError(f"unknown integrity algorithm {algorithm!r}")
        return _mac(self, data, algorithm == "sha256")


class Message:
    """A STUN message: method, class, transaction ID and ordered attributes.

    ``transaction_id`` is 12 bytes; for an RFC 3489 message (``legacy``, no magic cookie) it
    is the 16 bytes that stand where RFC 8489 puts cookie and ID.
    """

    __slots__ = (
        "_integrity",
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
        # (offset within ``raw``, type) of the MESSAGE-INTEGRITY(-SHA256) that
        # verify_integrity checks (the SHA-256 one when both are present).
        self._integrity = _NO_INTEGRITY

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
        integrity_type = self._integrity[1]
        if integrity_type == _MI256_TYPE:
            return "sha256"
        if integrity_type == _MI_TYPE:
            return "sha1"
        return None

    @property
    def error(self) -> ErrorCodeAttr | None:
        for attribute in self.attributes:  # get(ErrorCodeAttr), inlined
            if type(attribute) is ErrorCodeAttr:
                return attribute
        return None

    # -- encoding -------------------------------------------------------------------------

    def encode(
        self,
        integrity_key: bytes | IntegrityKey | None = None,
        *,
        integrity: IntegrityAlgorithm = "sha1",
        fingerprint: bool = False,
    ) -> bytes:
        """Serialise; with ``integrity_key`` (raw bytes or an :class:`IntegrityKey`) append
        MESSAGE-INTEGRITY (or -SHA256), then FINGERPRINT when asked. Such attributes in
        ``attributes`` are recomputed, not copied.
        """
        if integrity not in ("sha1", "sha256"):
            raise ValueError(f"unknown integrity algorithm {integrity!r}")
        head = self.transaction_id if self.legacy else MAGIC_COOKIE_BYTES + self.transaction_id
        # Everything after the type and length fields: cookie, transaction ID, and each
        # attribute's whole TLV, padded (b"" for MI, MI-SHA256 and FINGERPRINT).
        rest = head + b"".join([attribute._encode_tlv(head) for attribute in self.attributes])
        length = len(rest) - 16
        method = self.method
        message_class = self.message_class
        message_type = (  # encode_message_type(), inlined
            (method & 0x000F)
            | ((method & 0x0070) << 1)
            | ((method & 0x0F80) << 2)
            | ((message_class & 0b01) << 4)
            | ((message_class & 0b10) << 7)
        )
        if integrity_key is None:
            if length + (8 if fingerprint else 0) > 0xFFFF:
                raise ValueError("message longer than 65535 bytes")
            if not fingerprint:
                return _ATTR_HEAD.pack(message_type, length) + rest
            data = _ATTR_HEAD.pack(message_type, length + 8) + rest
            return data + _FP_TLV.pack(_FP_TYPE, 4, _crc32(data) ^ FINGERPRINT_XOR)
        sha256 = integrity == "sha256"
        # RFC 8489 §14.5: the length covers up to and including the integrity attribute
        # while hashing; FINGERPRINT (if any) is counted afterwards.
        length += 36 if sha256 else 24
        if length + (8 if fingerprint else 0) > 0xFFFF:
            raise ValueError("message longer than 65535 bytes")
        covered = _ATTR_HEAD.pack(message_type, length) + rest
        mac = _mac(integrity_key, covered, sha256)
        if not fingerprint:
            return covered + (_MI256_HEAD if sha256 else _MI_HEAD) + mac
        data = (
            _ATTR_HEAD.pack(message_type, length + 8)
            + rest
            + (_MI256_HEAD if sha256 else _MI_HEAD)
            + mac
        )
        return data + _FP_TLV.pack(_FP_TYPE, 4, _crc32(data) ^ FINGERPRINT_XOR)

    # -- decoding -------------------------------------------------------------------------

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Parse one whole STUN message (a UDP datagram, or a frame cut by a stream framer).

        Raises :class:`StunDecodeError` for anything malformed, including a FINGERPRINT
        that does not match (RFC 8489 §7.3: such a message is not STUN).
        """
        size = len(data)
        if size >= HEADER_LENGTH + 4:
            message_type, length, cookie, first = _HEADER_AND_FIRST.unpack_from(data)
        elif size >= HEADER_LENGTH:
            message_type, length, cookie = _HEADER.unpack_from(data)
        else:
            raise StunDecodeError("shorter than a STUN header")
        if message_type & 0xC000 or length & 3 or length + HEADER_LENGTH != size:
            if message_type & 0xC000:
                raise StunDecodeError("the two most significant bits must be zero")
            if length & 3:
                raise StunDecodeError("length is not a multiple of 4")
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
        message.message_class = _CLASS_BITS[message_type & 0x0110]
        message.transaction_id = xor_key if legacy else data[8:20]
        message.legacy = legacy
        message.raw = data
        attributes: list[Attribute] = []
        message.attributes = attributes
        if size > HEADER_LENGTH:  # so ``first`` is set
            key = (size << 32) | first
            shapes = _SHAPES.get(key)
            if shapes is not None:
                append = attributes.append
                for shape in shapes:
                    if _apply_shape(shape, data, xor_key, append):
                        message._integrity = shape.integrity
                        return message
            _walk(message, data, xor_key)
            if size <= _SHAPE_MAX_SIZE:
                _learn_shape(key, data, message)
        else:
            message._integrity = _NO_INTEGRITY
        return message

    def verify_integrity(self, key: bytes | IntegrityKey) -> bool:
        """Check MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY, in constant
        time, under a raw key or an :class:`IntegrityKey`. False when the message carries
        neither or was not decoded from bytes."""
        raw = self.raw
        offset, integrity_type = self._integrity
        if raw is None or not offset:
            return False
        sha256 = integrity_type == _MI256_TYPE
        value_length = (raw[offset + 2] << 8) | raw[offset + 3] if sha256 else 20
        end = offset + 4 + value_length
        # Patch the header length to end just after the integrity attribute (§14.5).
        covered = raw[:2] + (end - HEADER_LENGTH).to_bytes(2, "big") + raw[4:offset]
        digest = _mac(key, covered, sha256)
        return _compare_digest(digest[:value_length], raw[offset + 4 : end])


def _walk(message: Message, data: bytes, xor_key: bytes) -> None:
    """The general attribute walk: decode every attribute of ``data`` into ``message``,
    applying the RFC 8489 §14.5-14.7 ordering rules."""
    size = len(data)
    append = message.attributes.append
    unpack_from = _ATTR_HEAD.unpack_from
    classes = ATTRIBUTE_CLASSES
    computed = _COMPUTED
    offset = HEADER_LENGTH
    integrity_offset = integrity_type = 0
    seen_integrity = seen_sha256 = seen_fingerprint = False
    # ``size`` and every ``offset`` are multiples of 4 (checked by the caller; each step
    # below is 4 + the padded value length), so a whole attribute header is always present.
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
                expected = _crc32(data[:offset]) ^ FINGERPRINT_XOR
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
            else:
                seen_sha256 = True
            integrity_offset, integrity_type = offset, attr_type
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
    message._integrity = (integrity_offset, integrity_type) if integrity_offset else _NO_INTEGRITY


# -- compiled message shapes ------------------------------------------------------------------
#
# An agent receives the same few message layouts over and over: an ICE peer's checks differ
# only in transaction ID, values and MAC; a TURN client's refreshes and indications likewise.
# A *shape* is one such layout: every attribute header (type and length) at its offset.
# When the general walk has accepted a message whose layout key (size and first attribute
# header) it has seen once before, the layout is compiled: one ``struct.Struct`` unpacks
# every attribute header and value at once, and a plan says how each value becomes an
# attribute. A later message is decoded by a shape only if every one of its attribute
# headers equals the shape's. The walk, and every check that depends only on types and
# lengths (bounds, padding, ordering, the sizes of FINGERPRINT, MESSAGE-INTEGRITY and fixed
# values, length limits), are then those of the message the shape was learnt from, which
# the general walk accepted. The checks that depend on value bytes run for every message:
# ``decode_value`` for each attribute whose class declares no plain ``_LAYOUT`` (addresses,
# error codes, ...), UTF-8 for text, and the FINGERPRINT CRC, in wire order as the walk
# does. So a shape returns what the general walk would and raises where it would. As a
# guard against a bug in this reasoning, a shape is kept only if it reproduces the general
# walk's result on the message it was learnt from. The table holds layouts only (no key
# material, no values) and is bounded.

_SHAPE_MAX_SIZE = 1500  # larger messages (rare) are not worth a shape
_SHAPE_MAX_ATTRIBUTES = 24
_SHAPES_PER_KEY = 4  # layouts sharing size and first header (ICE-CONTROLLED/-CONTROLLING)
_MAX_SHAPE_KEYS = 256
_MAX_SHAPE_CANDIDATES = 1024
# Plan actions, compared by identity.
_BUILD = "build"  # arg(value): the class declares _LAYOUT "I", "Q" or "s"
_BUILD_TEXT = "build_text"  # arg(value.decode()): _LAYOUT "utf-8"
_BUILD_EMPTY = "build_empty"  # arg(): _LAYOUT ""
_DECODE_VALUE = "decode_value"  # arg.decode_value(value, xor_key)
_UNKNOWN = "unknown"  # UnknownAttribute(arg, value)
_FINGERPRINT = "fingerprint"  # check value against the CRC-32 of data[:arg]


class _Shape:
    __slots__ = ("expected", "heads", "integrity", "plan", "unpack_from")

    def __init__(
        self,
        layout: struct.Struct,
        *,
        heads: Callable[[tuple[Any, ...]], object],
        expected: object,
        plan: tuple[tuple[str, Any, int], ...],
        integrity: tuple[int, int],
    ) -> None:
        self.unpack_from = layout.unpack_from
        self.heads = heads  # the attribute headers out of the unpacked fields
        self.expected = expected  # ... and what they must be
        self.plan = plan  # (action, argument, field index) per decoded attribute
        self.integrity = integrity  # Message._integrity


_SHAPES: dict[int, tuple[_Shape, ...]] = {}
_SHAPE_CANDIDATES: dict[int, None] = {}  # layout keys seen once
_NOT_SEEN = object()


def _apply_shape(
    shape: _Shape, data: bytes, xor_key: bytes, append: Callable[[Attribute], None]
) -> bool:
    """If every attribute header of ``data`` is ``shape``'s, append its attributes and
    return True (or raise StunDecodeError as the general walk would); else False."""
    fields = shape.unpack_from(data)
    if shape.heads(fields) != shape.expected:
        return False
    for action, arg, index in shape.plan:
        if action is _BUILD:
            append(arg(fields[index]))
        elif action is _BUILD_TEXT:
            try:
                append(arg(fields[index].decode()))
            except UnicodeDecodeError:
                append(arg.decode_value(fields[index], xor_key))  # raises its error
        elif action is _DECODE_VALUE:
            append(arg.decode_value(fields[index], xor_key))
        elif action is _BUILD_EMPTY:
            append(arg())
        elif action is _UNKNOWN:
            append(UnknownAttribute(arg, fields[index]))
        else:  # _FINGERPRINT; arg is its offset
            expected = _crc32(data[:arg]) ^ FINGERPRINT_XOR
            if fields[index] != expected:
                raise StunDecodeError("FINGERPRINT does not match")
            append(Fingerprint(expected))
    return True


def _learn_shape(key: int, data: bytes, message: Message) -> None:
    """Called once the general walk has accepted ``data`` (decoded into ``message``):
    compile its layout the second time its key is seen. Safe under threads: at worst two
    threads compile the same layout, and a table is cleared rather than grown past its
    bound (the layouts in use are learnt again after two messages each)."""
    if _SHAPE_CANDIDATES.pop(key, _NOT_SEEN) is _NOT_SEEN:
        if len(_SHAPE_CANDIDATES) >= _MAX_SHAPE_CANDIDATES:
            _SHAPE_CANDIDATES.clear()
        _SHAPE_CANDIDATES[key] = None
        return
    shape = _compile_shape(data, message)
    if shape is None:
        return
    # The guard: the shape must give what the general walk gave, for this very message.
    replay: list[Attribute] = []
    try:
        if not _apply_shape(shape, data, data[4:HEADER_LENGTH], replay.append):
            return
    except StunDecodeError:
        return
    if replay != message.attributes:
        return
    shapes = _SHAPES.get(key, ())
    if not shapes and len(_SHAPES) >= _MAX_SHAPE_KEYS:
        _SHAPES.clear()
    _SHAPES[key] = (*shapes[-(_SHAPES_PER_KEY - 1) :], shape)


def _compile_shape(data: bytes, message: Message) -> _Shape | None:
    """The shape of ``data``, which the general walk decoded into ``message``; None when it
    has too many attributes to be worth one."""
    size = len(data)
    layout = ["!", f"{HEADER_LENGTH}x"]
    head_fields: list[int] = []
    plan: list[tuple[str, Any, int]] = []
    field = 0
    offset = HEADER_LENGTH
    seen_integrity = seen_sha256 = False
    while offset < size:
        attr_type, attr_length = _ATTR_HEAD.unpack_from(data, offset)
        padding = -attr_length & 3
        layout.append("I")  # the header, as one word
        head_fields.append(field)
        field += 1
        # _walk's rules, which accepted this message: FINGERPRINT comes last, and after
        # MESSAGE-INTEGRITY(-SHA256) only -SHA256 and FINGERPRINT count.
        if attr_type == _FP_TYPE:
            layout.append("I")
            plan.append((_FINGERPRINT, offset, field))
            field += 1
        elif seen_sha256 or (seen_integrity and attr_type != _MI256_TYPE):
            padding += attr_length  # ignored: skip the value like padding
        else:
            if attr_type == _MI_TYPE:
                seen_integrity = True
            elif attr_type == _MI256_TYPE:
                seen_sha256 = True
            attr_class = ATTRIBUTE_CLASSES.get(attr_type)
            value_layout = None if attr_class is None else attr_class._LAYOUT
            if value_layout == "":
                plan.append((_BUILD_EMPTY, attr_class, -1))
            else:
                if value_layout in ("I", "Q"):
                    layout.append(value_layout)
                else:
                    layout.append(f"{attr_length}s")
                if attr_class is None:
                    plan.append((_UNKNOWN, attr_type, field))
                elif value_layout in ("I", "Q", "s"):
                    plan.append((_BUILD, attr_class, field))
                elif value_layout == "utf-8":
                    plan.append((_BUILD_TEXT, attr_class, field))
                else:
                    plan.append((_DECODE_VALUE, attr_class, field))
                field += 1
        if padding:
            layout.append(f"{padding}x")
        offset += 4 + attr_length + (-attr_length & 3)
    if len(head_fields) > _SHAPE_MAX_ATTRIBUTES:
        return None
    compiled = struct.Struct("".join(layout))
    if compiled.size != size:  # cannot happen: the layout covers every byte once
        return None
    heads = operator.itemgetter(*head_fields)
    return _Shape(
        compiled,
        heads=heads,
        expected=heads(compiled.unpack_from(data)),
        plan=tuple(plan),
        integrity=message._integrity,
    )


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
