"""Sans-I/O STUN Binding server: RFC 8489 §6.3 (request processing), §12.2 (RFC 3489
clients), RFC 5780 §6 (NAT behaviour discovery), and per-source rate limiting.

Why ``handle_datagram`` *returns* its transmits instead of the ``poll_transmit()`` pattern of
DESIGN.md: a Binding server is stateless per request. It has no timers (so no
``poll_timeout``/``handle_timeout``), raises no events, and every input yields zero or one
output that is known the moment the input is processed. Queueing that output only for the
driver to pull it out again would add an allocation and a method call per packet on the
path that decides the server's throughput. The one piece of state, the rate limiter, is
driven by the ``now`` the driver passes in, so the core stays deterministic: the same
bytes, addresses and times give the same answers, with no clock and no sockets.

Drivers (``tsunagu.aio.stun_server``, simulations, tests) do::

    for transmit in core.handle_datagram(data, local, remote, now):
        socket_bound_to(transmit.source).sendto(transmit.data, transmit.destination)

``transmit.source`` is ``local`` except when an RFC 5780 CHANGE-REQUEST asks for another IP
and/or port; the driver then sends from the socket bound to that address.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, NamedTuple

from tsunagu.errors import StunDecodeError
from tsunagu.stun.attributes import (
    Address,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttributes,
    XorMappedAddress,
)
from tsunagu.stun.constants import (
    FINGERPRINT_XOR,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    MAGIC_COOKIE_BYTES,
    AttrType,
    ErrorCode,
    MessageClass,
    Method,
)
from tsunagu.stun.message import Message, error_response, success_response
from tsunagu.stun.server_config import StunServerConfig

__all__ = ["RateLimiter", "StunServerCore", "Transmit"]


class Transmit(NamedTuple):
    """A datagram (or stream frame) for the driver to send: ``data`` from the socket bound
    to ``source`` (a local address) to ``destination``. Over TCP/TLS both are the
    connection's own addresses and the driver writes to that connection."""

    data: bytes
    source: Address
    destination: Address


class RateLimiter:
    """Token buckets keyed by source, with a bounded number of keys (LRU eviction).

    Every key starts with ``burst`` tokens and gains ``rate`` tokens a second up to
    ``burst``; :meth:`allow` spends one. Time is whatever the caller passes as ``now``
    (seconds, monotonic); a clock running backwards refills nothing. When ``capacity``
    keys are tracked, a new key evicts the least recently used one, which keeps memory
    bounded whatever an attacker spoofs; an evicted key returns with a full bucket.
    """

    __slots__ = ("_buckets", "_burst", "_capacity", "_rate")

    def __init__(self, rate: float, burst: int, capacity: int) -> None:
        if not rate > 0 or burst < 1 or capacity < 1:
            raise ValueError("need rate > 0, burst >= 1 and capacity >= 1")
        self._rate = float(rate)
        self._burst = float(burst)
        self._capacity = capacity
        # key -> [tokens, last refill time]; a two-item list is cheaper than an object here.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self._capacity:
                buckets.popitem(last=False)
            buckets[key] = [self._burst - 1.0, now]
            return True
        buckets.move_to_end(key)
        elapsed = now - bucket[1]
        tokens = bucket[0]
        if elapsed > 0:
            tokens = min(tokens + elapsed * self._rate, self._burst)
            bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


# -- wire constants of the fast path ----------------------------------------------------------

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TYPE_LENGTH = struct.Struct("!HH")
_BINDING_REQUEST = 0x0001  # RFC 8489 §5: method 0x001, class request
_BINDING_INDICATION = 0x0011
_BINDING_SUCCESS = 0x0101
_FP_TYPE = int(AttrType.FINGERPRINT)
_SOFTWARE_TYPE = int(AttrType.SOFTWARE)
_FP_HEAD = _TYPE_LENGTH.pack(_FP_TYPE, 4)
_XMA_V4_HEAD = _TYPE_LENGTH.pack(int(AttrType.XOR_MAPPED_ADDRESS), 8) + b"\x00\x01"
_XMA_V6_HEAD = _TYPE_LENGTH.pack(int(AttrType.XOR_MAPPED_ADDRESS), 20) + b"\x00\x02"
_HEAD_NO_ATTRIBUTES = _TYPE_LENGTH.pack(_BINDING_REQUEST, 0) + MAGIC_COOKIE_BYTES
_HEAD_FP_ONLY = _TYPE_LENGTH.pack(_BINDING_REQUEST, 8) + MAGIC_COOKIE_BYTES
_SOFTWARE_MAX_BYTES = 763  # RFC 8489 §14.14, as the codec enforces
_CACHE_LIMIT = 4096  # entries of each per-address cache; cleared whole when full


def _pad4(length: int) -> int:
    return length + (-length & 3)


class StunServerCore:
    """The Binding server: bytes and addresses in, :class:`Transmit` out.

    ``config`` is a :class:`~tsunagu.stun.server_config.StunServerConfig` whose RFC 5780
    ports (``other`` and its primary ``listen`` address) are already resolved: a driver that
    binds port 0 passes the ports the OS chose (``dataclasses.replace``).
    """

    __slots__ = (
        "_limiter",
        "_padding_length",
        "_rfc5780",
        "_software",
        "_software_tlv",
        "_tail_v4_cache",
        "_type_length_v4",
        "_type_length_v6",
        "_v6_cache",
        "config",
    )

    def __init__(self, config: StunServerConfig) -> None:
        self.config = config
        self._software = Software(config.software) if config.software is not None else None
        # The encoded SOFTWARE attribute is the same in every response: encode it once.
        self._software_tlv = b""
        if config.software is not None:
            value = config.software.encode()
            self._software_tlv = (
                _TYPE_LENGTH.pack(_SOFTWARE_TYPE, len(value)) + value + b"\x00" * (-len(value) & 3)
            )
        sw = len(self._software_tlv)
        # Type and length of a fast-path success response: XOR-MAPPED-ADDRESS (12 or 24
        # bytes), SOFTWARE, FINGERPRINT (8).
        self._type_length_v4 = _TYPE_LENGTH.pack(_BINDING_SUCCESS, 12 + sw + 8)
        self._type_length_v6 = _TYPE_LENGTH.pack(_BINDING_SUCCESS, 24 + sw + 8)
        self._padding_length = _pad4(config.padding_length)
        self._limiter: RateLimiter | None = None
        if config.rate_limit > 0:
            self._limiter = RateLimiter(
                config.rate_limit, config.rate_burst, config.max_tracked_sources
            )
        # Bounded caches: remote IPv4 (ip, port) -> XOR-MAPPED-ADDRESS + SOFTWARE, and
        # IPv6 text -> packed 16 bytes (parsing IPv6 text costs more than a whole reply).
        self._tail_v4_cache: dict[Any, bytes] = {}
        self._v6_cache: dict[str, bytes] = {}
        self._rfc5780 = self._build_rfc5780_table(config)

    @staticmethod
    def _build_rfc5780_table(
        config: StunServerConfig,
    ) -> dict[Address, tuple[Address, Address, Address, Address]]:
        """RFC 5780 §6.1 Table 1, precomputed: for each of the four local addresses
        (A1/A2 x P1/P2), the response source for CHANGE-REQUEST flags indexed by
        ``change_ip << 1 | change_port``; index 3 (change both: Ca:Cp) is OTHER-ADDRESS."""
        primary, other = config.rfc5780_primary, config.other
        if primary is None or other is None:
            return {}
        if primary[1] == 0 or other[1] == 0:
            raise ValueError("RFC 5780 ports must be resolved (not 0) before building the core")
        ips = (primary[0], other[0])
        ports = (primary[1], other[1])
        table: dict[Address, tuple[Address, Address, Address, Address]] = {}
        for i, da in enumerate(ips):
            ca = ips[1 - i]
            for j, dp in enumerate(ports):
                cp = ports[1 - j]
                table[(da, dp)] = ((da, dp), (da, cp), (ca, dp), (ca, cp))
        return table

    # -- introspection ------------------------------------------------------------------------

    @property
    def rfc5780_addresses(self) -> tuple[Address, ...]:
        """The local addresses RFC 5780 applies to (empty without ``other``)."""
        return tuple(self._rfc5780)

    @property
    def tracked_sources(self) -> int:
        """How many sources the rate limiter currently remembers."""
        return 0 if self._limiter is None else len(self._limiter)

    def fast_path_ok(self, local: Address) -> bool:
        """Whether :meth:`respond_fast` may serve datagrams arriving on ``local`` (every
        UDP address outside the RFC 5780 set, whose answers depend on the local address)."""
        return local not in self._rfc5780

    # -- input --------------------------------------------------------------------------------

    def handle_datagram(
        self,
        data: bytes,
        local: Address,
        remote: Address,
        now: float,
        *,
        stream: bool = False,
    ) -> list[Transmit]:
        """Process one UDP datagram, or one frame cut from a TCP/TLS stream when ``stream``
        (RFC 8489 §6.2.2; RESPONSE-PORT and CHANGE-REQUEST flags cannot be honoured over a
        connection, so they are answered 420 there).

        Returns what to send: nothing for indications, responses, other methods and bytes
        that are not STUN (RFC 8489 §6.3: silently discarded), or one response. Never
        raises for any ``data``.
        """
        if not stream and local not in self._rfc5780:
            reply = self.respond_fast(data, remote, now)
            if reply is not None:
                return [Transmit(reply, local, remote)] if reply else []
        return self._handle(data, local, remote, now, stream)

    def respond_fast(self, data: bytes, remote: tuple[Any, ...], now: float) -> bytes | None:
        """The common request, answered without building a :class:`Message`.

        Handles a magic-cookie Binding request whose only attributes are SOFTWARE and/or a
        final FINGERPRINT -- what ICE agents and load generators send -- over UDP, on an
        address outside the RFC 5780 set (see :meth:`fast_path_ok`). Returns the encoded
        success response, byte for byte what :meth:`handle_datagram` would send; ``b""``
        when the request is rate-limited (send nothing); None when the request has any
        other shape and must go through :meth:`handle_datagram`. ``remote`` may be an
        asyncio IPv6 4-tuple; only its first two items are read.
        """
        size = len(data)
        # The two shapes nearly every client sends, checked in one comparison each: header
        # (type, length, cookie) then FINGERPRINT (RFC 8489 §14.7: CRC-32 of what precedes).
        if size == 28 and data[:8] == _HEAD_FP_ONLY:
            if (
                data[20:24] != _FP_HEAD
                or zlib.crc32(data[:20]) ^ FINGERPRINT_XOR != _U32.unpack_from(data, 24)[0]
            ):
                return None
        elif not (size == 20 and data[:8] == _HEAD_NO_ATTRIBUTES) and not _plain_request(data):
            return None
        limiter = self._limiter
        ip = remote[0]
        v6 = ":" in ip
        if limiter is not None and not limiter.allow(self._source_key(ip) if v6 else ip, now):
            return b""
        if not v6:
            key = remote  # an IPv4 address comes as (ip, port) from every socket API
            # What follows the transaction ID depends only on the remote address: cached.
            tail = self._tail_v4_cache.get(key)
            if tail is None:
                tail = self._xma_v4(ip, remote[1]) + self._software_tlv
                cache = self._tail_v4_cache
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[key] = tail
            message = self._type_length_v4 + data[4:20] + tail
        else:
            packed = self._v6_packed(ip)
            # RFC 8489 §14.2: IPv6 address xor (magic cookie || transaction ID).
            xored = (int.from_bytes(packed, "big") ^ int.from_bytes(data[4:20], "big")).to_bytes(
                16, "big"
            )
            message = (
                self._type_length_v6
                + data[4:20]
                + _XMA_V6_HEAD
                + _U16.pack(remote[1] ^ 0x2112)
                + xored
                + self._software_tlv
            )
        return message + _FP_HEAD + _U32.pack(zlib.crc32(message) ^ FINGERPRINT_XOR)

    # -- helpers of the fast path -------------------------------------------------------------

    @staticmethod
    def _xma_v4(ip: str, port: int) -> bytes:
        packed = ipaddress.IPv4Address(ip).packed
        return (
            _XMA_V4_HEAD
            + _U16.pack(port ^ 0x2112)
            + _U32.pack(int.from_bytes(packed, "big") ^ MAGIC_COOKIE)
        )

    def _v6_packed(self, ip: str) -> bytes:
        packed = self._v6_cache.get(ip)
        if packed is None:
            # A scope (fe80::1%eth0) names the interface, not part of the address.
            packed = ipaddress.IPv6Address(ip.partition("%")[0]).packed
            if len(self._v6_cache) >= _CACHE_LIMIT:
                self._v6_cache.clear()
            self._v6_cache[ip] = packed
        return packed

    def _source_key(self, ip: str) -> Hashable:
        """Rate-limit key: the IPv4 address, or the IPv6 /64 (a single host usually owns a
        whole /64, so limiting by address would let it multiply its quota by 2^64)."""
        if ":" not in ip:
            return ip
        if ip.startswith("::ffff:") and "." in ip:
            return ip[7:]  # IPv4-mapped: the IPv4 host is the source
        return self._v6_packed(ip)[:8]

    # -- the general path ---------------------------------------------------------------------

    def _handle(
        self, data: bytes, local: Address, remote: Address, now: float, stream: bool
    ) -> list[Transmit]:
        size = len(data)
        # RFC 7983 §7: STUN starts with 0-3 (also: the two most significant bits are zero,
        # RFC 8489 §6). RFC 8489 §6.3: length multiple of 4 and equal to what arrived.
        if size < HEADER_LENGTH or data[0] > 3:
            return []
        message_type, length = _TYPE_LENGTH.unpack_from(data)
        if length & 3 or length + HEADER_LENGTH != size:
            return []
        if message_type != _BINDING_REQUEST:
            # Binding indications (keepalives, RFC 8489 §6.3.2) need no answer. Responses
            # match no transaction of ours, and other methods (Allocate...) are not
            # supported here: RFC 8489 §6.3 discards all of these silently.
            return []
        try:
            request: Message | None = Message.decode(data)
        except StunDecodeError:
            # A wrong FINGERPRINT or broken attribute framing means "not STUN" (RFC 8489
            # §6.3, §7.3): discard. Framing intact but an attribute value malformed: the
            # request is recognisably ours, so say 400 (RFC 8489 §14.8).
            if not _attributes_framed(data):
                return []
            request = None
        # Only what gets an answer is charged: discarded input costs a source nothing, so
        # junk spoofed from a client's address cannot use up that client's quota.
        limiter = self._limiter
        if limiter is not None and not limiter.allow(self._source_key(remote[0]), now):
            return []
        if request is None:
            legacy = data[4:8] != MAGIC_COOKIE_BYTES
            request = Message(
                Method.BINDING,
                MessageClass.REQUEST,
                data[4:20] if legacy else data[8:20],
                legacy=legacy,
            )
            return self._error(request, ErrorCode.BAD_REQUEST, local, remote, "Bad Request")
        return self._binding(request, local, remote, stream, size)

    def _binding(
        self, request: Message, local: Address, remote: Address, stream: bool, size: int
    ) -> list[Transmit]:
        rfc5780 = self._rfc5780.get(local)
        change = request.get(ChangeRequest)
        response_port = request.get(ResponsePort)
        padding = request.get(Padding)
        # RFC 8489 §6.3.1: unknown comprehension-required attributes -> 420. Also "unknown"
        # here are attributes this server understands but will not honour:
        unknown = list(request.unknown_comprehension_required())
        if request.get(ResponseAddress) is not None:
            unknown.append(AttrType.RESPONSE_ADDRESS)  # RFC 8489 §12.2: refused as unknown
        if change is not None and (
            rfc5780 is None or (stream and (change.change_ip or change.change_port))
        ):
            # RFC 5780 §6: without a second IP and port, CHANGE-REQUEST is answered 420; a
            # connection cannot answer from another address either.
            unknown.append(AttrType.CHANGE_REQUEST)
        if response_port is not None and stream:
            # RFC 5780 §5: RESPONSE-PORT support is optional and refused with 420; over a
            # connection the response can only go back on that connection.
            unknown.append(AttrType.RESPONSE_PORT)
        if unknown:
            types = tuple(dict.fromkeys(int(t) for t in unknown))
            return self._error(
                request, ErrorCode.UNKNOWN_ATTRIBUTE, local, remote, None, UnknownAttributes(types)
            )
        if response_port is not None:
            if padding is not None:
                # RFC 5780 §6.1, §7.5: PADDING with RESPONSE-PORT MUST be refused with 400
                # (it would aim padded traffic at another port).
                return self._error(
                    request, ErrorCode.BAD_REQUEST, local, remote, "PADDING with RESPONSE-PORT"
                )
            if response_port.port == 0:
                return self._error(request, ErrorCode.BAD_REQUEST, local, remote, "RESPONSE-PORT 0")

        # RFC 5780 §6.1 Table 1: the response source follows the CHANGE-REQUEST flags.
        source = local
        if rfc5780 is not None and change is not None:
            source = rfc5780[change.change_ip << 1 | change.change_port]
        # RFC 5780 §7.5: to the request's source IP at RESPONSE-PORT (UDP only, above).
        destination = remote if response_port is None else (remote[0], response_port.port)

        attributes: list[Attribute]
        if request.legacy:
            # RFC 8489 §12.2: an RFC 3489 client gets MAPPED-ADDRESS, not the XOR form, and
            # its own "magic cookie" bytes back (the codec keeps them in the ID). With a
            # second address, RFC 3489 §11.2.1's SOURCE-ADDRESS and CHANGED-ADDRESS are
            # what such a client reads to run its NAT tests.
            attributes = [MappedAddress(remote)]
            if rfc5780 is not None:
                attributes += [SourceAddress(source), ChangedAddress(rfc5780[3])]
        else:
            attributes = [XorMappedAddress(remote)]
            if rfc5780 is not None:
                # RFC 5780 §6.1: both mapped forms, RESPONSE-ORIGIN (where this response is
                # sent from) and OTHER-ADDRESS (Ca:Cp whatever the flags).
                attributes += [
                    MappedAddress(remote),
                    ResponseOrigin(source),
                    OtherAddress(rfc5780[3]),
                ]
        if self._software is not None:
            attributes.append(self._software)
        response = success_response(request, attributes)
        fingerprint = not request.legacy
        encoded = response.encode(fingerprint=fingerprint)
        if padding is not None:
            # RFC 5780 §6.1: PADDING MUST be in the response, SHOULD be the outgoing MTU.
            # Not an amplifier: the padded response never outgrows the request that asked
            # for it (a client testing fragmentation pads its request the same way).
            budget = size - len(encoded) - 4
            length = min(self._padding_length, max(0, budget)) & ~3
            response.attributes.append(Padding(bytes(length)))
            encoded = response.encode(fingerprint=fingerprint)
        return [Transmit(encoded, source, destination)]

    def _error(
        self,
        request: Message,
        code: int,
        local: Address,
        remote: Address,
        reason: str | None,
        *extra: Attribute,
    ) -> list[Transmit]:
        attributes: list[Attribute] = list(extra)
        if self._software is not None:
            attributes.append(self._software)
        response = error_response(request, code, reason, attributes)
        # RFC 8489 §12.2: no FINGERPRINT for RFC 3489 clients, which may not know it.
        return [Transmit(response.encode(fingerprint=not request.legacy), local, remote)]


def _plain_request(data: bytes) -> bool:
    """A magic-cookie Binding request whose attributes are only SOFTWARE (valid UTF-8, at
    most 763 bytes, as the codec requires) and a final, matching FINGERPRINT."""
    size = len(data)
    if (
        size < HEADER_LENGTH
        or data[0] != 0
        or data[1] != _BINDING_REQUEST
        or (data[2] << 8 | data[3]) + HEADER_LENGTH != size
        or data[4:8] != MAGIC_COOKIE_BYTES
    ):
        return False
    offset = HEADER_LENGTH
    while offset < size:
        if size - offset < 4:
            return False
        attr_type, attr_length = _TYPE_LENGTH.unpack_from(data, offset)
        if attr_type == _FP_TYPE:
            return (
                attr_length == 4
                and offset + 8 == size
                and zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR
                == _U32.unpack_from(data, offset + 4)[0]
            )
        if attr_type != _SOFTWARE_TYPE or attr_length > _SOFTWARE_MAX_BYTES:
            return False
        start = offset + 4
        offset = start + attr_length + (-attr_length & 3)
        if offset > size:
            return False
        try:
            data[start : start + attr_length].decode()
        except UnicodeDecodeError:
            return False
    return True


def _attributes_framed(data: bytes) -> bool:
    """Whether the attribute TLVs of ``data`` (header already checked) tile the message
    exactly and any FINGERPRINT matches: the "is this STUN at all" part of decoding."""
    size = len(data)
    offset = HEADER_LENGTH
    while offset < size:
        attr_type, attr_length = _TYPE_LENGTH.unpack_from(data, offset)
        end = offset + 4 + attr_length
        if end > size:
            return False
        if attr_type == _FP_TYPE and (
            attr_length != 4
            or zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR != _U32.unpack_from(data, offset + 4)[0]
        ):
            return False
        offset = end + (-attr_length & 3)
    return offset == size
