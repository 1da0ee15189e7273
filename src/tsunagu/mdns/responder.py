"""Multicast DNS for WebRTC host candidates, sans-I/O (RFC 6762,
draft-ietf-mmusic-mdns-ice-candidates).

One :class:`MdnsResponder` is both halves of what an ICE agent needs:

- the responder: :meth:`~MdnsResponder.register` gives a local address a fresh random name,
  ``<UUID v4>.local`` (draft §3.1.1: a version 4 UUID drawn from a secure source, here
  :mod:`secrets`), announces it unprompted (RFC 6762 §8.3: unsolicited responses at 0, 1,
  3, ... seconds; Chromium announces the same way when it gathers) and answers queries for
  it, by multicast or unicast as the query's QU bit asks (§5.4, §6), to legacy queriers
  as §6.7 says, never multicasting one record more than once a second (§6: a query
  within that second is answered by unicast at once, the multicast follows), and staying
  silent when the query already lists the answer (§7.1 known-answer suppression);
- the querier: :meth:`~MdnsResponder.resolve` asks for a remote ``.local`` name (A and
  AAAA questions), repeats the question 1, 2, 4, ... seconds apart (§5.2) and ends with
  :class:`~tsunagu.mdns.events.NameResolved` or, at the deadline (a few seconds),
  :class:`~tsunagu.mdns.events.NameUnresolved`.

Every response that arrives, asked for or not, feeds a cache bounded in size and by the
records' TTLs (§10), so names that a peer announced before its candidates were signalled
resolve at once: Chromium announces its name when it gathers and then answers no queries.
Answers are accepted with or without the cache-flush bit (§10.2): the bit only decides
whether older records of the name are dropped. Addresses that can never be a candidate's
(unspecified, multicast, broadcast and reserved, also inside IPv4-mapped IPv6) are dropped;
:attr:`MdnsConfig.address_filter` can narrow further, and the ICE agent applies its own
address policy to what comes out. Malformed messages (see :mod:`tsunagu.mdns.dns`) are
counted and dropped.

Names are drawn at random from 122 bits, so this core skips §8.1 probing and §9 conflict
resolution; records claiming one of our names are simply not cached.

Inputs: API calls, :meth:`~MdnsResponder.handle_datagram` (what arrived on UDP port 5353,
multicast or unicast, with its source) and :meth:`~MdnsResponder.handle_timeout`. Outputs,
pulled by the driver: :meth:`~MdnsResponder.poll_transmit` (a :class:`Transmit` for the
mDNS group of one family or a unicast destination), :meth:`~MdnsResponder.poll_event` and
:meth:`~MdnsResponder.poll_timeout` (absolute time in the driver's clock).
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tsunagu.errors import LocalProtocolError
from tsunagu.mdns.dns import (
    CLASS_ANY,
    CLASS_IN,
    FLAG_AA,
    FLAG_QR,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    DnsDecodeError,
    DnsMessage,
    Question,
    ResourceRecord,
    address_record,
    canonical_name,
    decode_message,
    encode_message,
    encode_name,
)
from tsunagu.mdns.events import MdnsEvent, NameResolved, NameUnresolved

__all__ = [
    "IPV4_DESTINATION",
    "IPV6_DESTINATION",
    "MDNS_IPV4_GROUP",
    "MDNS_IPV6_GROUP",
    "MDNS_PORT",
    "Address",
    "MdnsConfig",
    "MdnsResponder",
    "MdnsStats",
    "Transmit",
    "unusable_address",
]

Address = tuple[str, int]
"""(IP, port); IPv6 literals without brackets, link-local ones possibly with a ``%zone``."""

MDNS_PORT = 5353  # RFC 6762 §3
MDNS_IPV4_GROUP = "224.0.0.251"  # RFC 6762 §3
MDNS_IPV6_GROUP = "ff02::fb"  # RFC 6762 §3, link-local scope
IPV4_DESTINATION: Address = (MDNS_IPV4_GROUP, MDNS_PORT)
IPV6_DESTINATION: Address = (MDNS_IPV6_GROUP, MDNS_PORT)

_MULTICAST_INTERVAL = 1.0  # §6: a record is multicast at most once a second per interface
_FLUSH_GRACE = 1.0  # §10.2: records received in the last second survive a cache flush
_GOODBYE_LINGER = 1.0  # §10.1: a TTL 0 record means "forget this in one second"
_RECORDS_PER_MESSAGE = 16  # keeps every response far below one Ethernet MTU
_NAME_ATTEMPTS = 8  # fresh UUIDs tried before giving up (only a broken source repeats)

_V4_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # RFC 1122 §3.2.1.3
_V4_RESERVED = ipaddress.IPv4Network("240.0.0.0/4")  # RFC 1112 §4, holds 255.255.255.255


def unusable_address(ip: str) -> str | None:
    """Why ``ip`` can never be a host candidate's address (``"unspecified"``,
    ``"multicast"``, ``"broadcast or reserved"``, ``"not an IP address"``), or None.
    IPv4-mapped IPv6 addresses are judged by the IPv4 address inside."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            if address.is_unspecified:
                return "unspecified"
            return "multicast" if address.is_multicast else None
        address = address.ipv4_mapped
    if address in _V4_THIS_NETWORK:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address in _V4_RESERVED:
        return "broadcast or reserved"
    return None


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``data`` from the mDNS socket (UDP port 5353) to ``destination``: one of the
    groups (:data:`IPV4_DESTINATION`, :data:`IPV6_DESTINATION`) or a unicast querier."""

    data: bytes
    destination: Address


@dataclass(frozen=True, slots=True)
class MdnsConfig:
    """Every knob of the mDNS core, with its default and the text behind it."""

    ttl: int = 120
    """TTL of our address records: RFC 6762 §10 recommends 120 s for host names."""
    resolve_timeout: float = 3.0
    """Seconds a resolution may take before :class:`NameUnresolved` (the ICE issue asks
    for a bounded few seconds: an unresolvable candidate must not hold the agent up)."""
    first_retry: float = 1.0
    """Seconds between the first two queries; later gaps double (RFC 6762 §5.2 requires
    at least one second and a factor of two)."""
    query_types: tuple[int, ...] = (TYPE_A, TYPE_AAAA)
    """Questions asked in every query, all in one message."""
    unicast_response: bool = False
    """Set the QU bit on our queries (§5.4). Off by default: where several sockets share
    port 5353 (avahi, a browser) the kernel hands a unicast answer to only one of them,
    while a multicast answer reaches all."""
    announcements: int = 2
    """Unsolicited responses sent for each registration, 1, 2, 4, ... seconds apart
    (§8.3: at least two, at most eight). 0 turns announcing off."""
    answer_queries: bool = True
    """Answer queries for our names. False makes an announce-only peer, the way Chromium
    behaves in practice."""
    multicast_groups: tuple[Address, ...] = (IPV4_DESTINATION,)
    """Where queries and announcements go; the driver lists the groups it joined."""
    legacy_unicast_ttl: int = 10
    """TTL cap in answers to legacy (non-5353 source port) queriers (§6.7)."""
    cache_size: int = 256
    """Addresses cached at most, over all names; the least recently updated name goes
    first when full."""
    max_addresses_per_name: int = 4
    """Addresses cached at most for one name; the oldest goes first."""
    max_cache_ttl: int = 3600
    """Cached records live at most this long whatever TTL they claimed (§10 caps)."""
    max_pending_resolutions: int = 64
    """Resolutions in progress at most; more end at once with :class:`NameUnresolved`
    (remote descriptions are attacker-controlled and may list many names)."""
    max_queued_transmits: int = 256
    """Datagrams waiting for the driver at most; more are dropped and counted."""
    address_filter: Callable[[str], bool] | None = None
    """Extra policy for addresses in answers: False drops the address (e.g. the ICE
    agent's address policy); unspecified, multicast and broadcast addresses are always
    dropped."""
    unicast_answer_rate: float = 20.0
    """Unicast answers (QU and legacy) per second at most, with a burst of as many: a
    spoofed query cannot turn the responder into a reflector (§6 already limits
    multicast answers to one per record and second)."""
    accept_source: Callable[[Address], bool] | None = None
    """RFC 6762 §11 source address check: False drops a datagram from this source (a
    driver that knows the link's prefixes can reject off-link senders)."""


@dataclass(slots=True)
class MdnsStats:
    """Counters of what the core dropped, for logs and tests."""

    malformed: int = 0
    """Datagrams that are not well-formed DNS messages."""
    ignored: int = 0
    """Well-formed messages not acted on: non-zero OPCODE/RCODE (§18.3, §18.11),
    responses from a port other than 5353 (§6), rejected sources (§11), after close."""
    rejected_addresses: int = 0
    """A/AAAA records dropped by the address checks."""
    dropped_transmits: int = 0
    """Datagrams not queued because the transmit queue was full."""
    rate_limited: int = 0
    """Unicast answers not sent because of :attr:`MdnsConfig.unicast_answer_rate`."""


@dataclass(slots=True)
class _Registration:
    name: str
    ip: str
    record: ResourceRecord
    announce_left: int
    announce_due: float | None
    announce_interval: float
    last_multicast: dict[Address, float] = field(default_factory=dict)
    deferred: dict[Address, float] = field(default_factory=dict)
    """Multicast answers held back by the once-a-second rule (§6): group -> when."""


@dataclass(slots=True)
class _CacheEntry:
    rtype: int
    received: float
    expires: float


@dataclass(slots=True)
class _Resolution:
    name: str
    deadline: float
    next_query: float
    interval: float


def _is_local(key: str) -> bool:
    """RFC 6762 §3: only names under ``local.`` are multicast DNS names."""
    return key.endswith(".local") and len(key) > len(".local")


def _group_for(remote: Address) -> Address:
    return IPV6_DESTINATION if ":" in remote[0] else IPV4_DESTINATION


def _chunks(records: list[ResourceRecord]) -> Iterable[list[ResourceRecord]]:
    for start in range(0, len(records), _RECORDS_PER_MESSAGE):
        yield records[start : start + _RECORDS_PER_MESSAGE]


class MdnsResponder:
    """The sans-I/O mDNS responder and querier of one interface (see the module doc).

    ``token_bytes`` is the source of the names' randomness (:func:`secrets.token_bytes`
    unless a test injects a deterministic one)."""

    def __init__(
        self,
        config: MdnsConfig | None = None,
        *,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.config = config if config is not None else MdnsConfig()
        if not 1 <= self.config.ttl <= 0x7FFFFFFF:
            raise LocalProtocolError(f"ttl {self.config.ttl} out of range")
        if not 0 <= self.config.announcements <= 8:
            raise LocalProtocolError("RFC 6762 §8.3 allows at most eight announcements")
        if self.config.first_retry < 1.0:
            raise LocalProtocolError("RFC 6762 §5.2: queries at least one second apart")
        self.stats = MdnsStats()
        self._token_bytes = token_bytes
        self._own: dict[str, _Registration] = {}
        self._by_ip: dict[str, str] = {}
        self._cache: OrderedDict[str, dict[str, _CacheEntry]] = OrderedDict()
        self._cache_entries = 0
        self._pending: dict[str, _Resolution] = {}
        self._transmits: deque[Transmit] = deque()
        self._events: deque[MdnsEvent] = deque()
        self._unicast_tokens = self.config.unicast_answer_rate
        self._unicast_refilled: float | None = None
        self._closed = False

    # -- the API ---------------------------------------------------------------------------

    @property
    def names(self) -> dict[str, str]:
        """Our registered names and their addresses."""
        return {reg.name: reg.ip for reg in self._own.values()}

    def register(self, ip: str, now: float) -> str:
        """The ``.local`` name of local address ``ip``: a new random one the first time,
        announced at once (§8.3), the same one for the same address afterwards."""
        self._check_open()
        if "%" in ip:
            raise LocalProtocolError(f"register {ip!r} without a zone index")
        problem = unusable_address(ip)
        if problem is not None:
            raise LocalProtocolError(f"cannot register {ip!r}: {problem}")
        canonical = str(ipaddress.ip_address(ip))
        existing = self._by_ip.get(canonical)
        if existing is not None:
            return self._own[existing].name
        for _ in range(_NAME_ATTEMPTS):
            name = f"{uuid.UUID(bytes=self._token_bytes(16), version=4)}.local"
            if name not in self._own and name not in self._cache:
                break
        else:
            raise LocalProtocolError("the random source keeps repeating itself")
        first = self.config.announcements > 0
        reg = _Registration(
            name=name,
            ip=canonical,
            record=address_record(name, canonical, self.config.ttl),
            announce_left=self.config.announcements,
            announce_due=now if first else None,
            announce_interval=_MULTICAST_INTERVAL,
        )
        self._own[name] = reg
        self._by_ip[canonical] = name
        if first:
            self._announce_due(now)
        return name

    def unregister(self, name: str, now: float) -> None:
        """Forget our name ``name`` and multicast a goodbye (TTL 0, §10.1)."""
        self._check_open()
        reg = self._own.pop(canonical_name(name), None)
        if reg is None:
            raise LocalProtocolError(f"{name!r} is not one of our names")
        del self._by_ip[reg.ip]
        self._goodbye([reg])

    def resolve(self, name: str, now: float, timeout: float | None = None) -> None:
        """Start resolving the ``.local`` name ``name``; the outcome is one
        :class:`NameResolved` or :class:`NameUnresolved` event, right away when the name
        is ours or cached. Resolving a name already in progress extends its deadline."""
        self._check_open()
        key = canonical_name(name)
        if not _is_local(key):
            raise LocalProtocolError(f"{name!r} is not a multicast DNS (.local) name")
        encode_name(key)  # DnsEncodeError (a LocalProtocolError) for a malformed name
        wait = self.config.resolve_timeout if timeout is None else timeout
        if not (wait > 0 and math.isfinite(wait)):
            raise LocalProtocolError(f"resolve timeout {wait!r} must be positive and finite")
        known = self.lookup(key, now)
        if known:
            self._events.append(NameResolved(name, known[0], tuple(known)))
            return
        pending = self._pending.get(key)
        if pending is not None:
            pending.deadline = max(pending.deadline, now + wait)
            return
        if len(self._pending) >= self.config.max_pending_resolutions:
            self._events.append(NameUnresolved(name, "too many pending resolutions"))
            return
        self._pending[key] = _Resolution(
            name=name,
            deadline=now + wait,
            next_query=now + self.config.first_retry,
            interval=self.config.first_retry * 2,
        )
        self._send_query(key)

    def lookup(self, name: str, now: float) -> list[str]:
        """The addresses known for ``name`` without asking the network: ours, or cached
        and not expired, in the order they were last confirmed (oldest first)."""
        key = canonical_name(name)
        own = self._own.get(key)
        if own is not None:
            return [own.ip]
        entries = self._cache.get(key)
        if entries is None:
            return []
        for ip in [ip for ip, entry in entries.items() if entry.expires <= now]:
            self._remove_entry(key, ip)
        return list(entries)

    def close(self, now: float) -> None:
        """Multicast goodbyes for all our names (§10.1) and end every resolution with
        ``NameUnresolved(reason="closed")``. Later inputs are ignored."""
        if self._closed:
            return
        self._goodbye(list(self._own.values()))
        self._own.clear()
        self._by_ip.clear()
        for resolution in self._pending.values():
            self._events.append(NameUnresolved(resolution.name, "closed"))
        self._pending.clear()
        self._closed = True

    # -- inputs ----------------------------------------------------------------------------

    def handle_datagram(self, data: bytes, remote: Address, now: float) -> None:
        """A datagram that arrived on port 5353 from ``remote``. Never raises for bad
        input: malformed messages are counted in :attr:`stats` and dropped."""
        if self._closed or (
            self.config.accept_source is not None and not self.config.accept_source(remote)
        ):
            self.stats.ignored += 1
            return
        try:
            message = decode_message(data)
        except DnsDecodeError:
            self.stats.malformed += 1
            return
        if message.opcode != 0 or message.rcode != 0:  # §18.3, §18.11: silently ignored
            self.stats.ignored += 1
            return
        if message.is_response:
            self._handle_response(message, remote, now)
        else:
            self._handle_query(message, remote, now)

    def handle_timeout(self, now: float) -> None:
        """Retransmit queries, end resolutions at their deadline, send announcements and
        multicast answers that have become due."""
        if self._closed:
            return
        for key, resolution in list(self._pending.items()):
            if now >= resolution.deadline:
                del self._pending[key]
                self._events.append(NameUnresolved(resolution.name))
            elif now >= resolution.next_query:
                self._send_query(key)
                resolution.next_query = now + resolution.interval
                resolution.interval *= 2  # §5.2
        self._announce_due(now)
        due: dict[Address, list[_Registration]] = {}
        for reg in self._own.values():
            for group, when in list(reg.deferred.items()):
                if now >= when:
                    due.setdefault(group, []).append(reg)
        for group, regs in due.items():
            self._multicast(regs, group, now)

    # -- outputs ---------------------------------------------------------------------------

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> MdnsEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """When :meth:`handle_timeout` should next be called, or None."""
        if self._closed:
            return None
        times: list[float] = []
        for resolution in self._pending.values():
            times.append(min(resolution.deadline, resolution.next_query))
        for reg in self._own.values():
            if reg.announce_due is not None:
                times.append(reg.announce_due)
            times.extend(reg.deferred.values())
        return min(times) if times else None

    # -- queries (§6) ----------------------------------------------------------------------

    def _handle_query(self, message: DnsMessage, remote: Address, now: float) -> None:
        if not self.config.answer_queries or not self._own:
            return
        legacy = remote[1] != MDNS_PORT  # §6.7: a simple resolver, not a full querier
        group = _group_for(remote)
        # §7.1: a known answer with at least half our TTL left needs no answer.
        known = {
            (canonical_name(record.name), record.rtype, record.rdata)
            for record in message.answers
            if record.ttl >= self.config.ttl / 2
        }
        now_multicast: dict[str, _Registration] = {}
        unicast: dict[str, _Registration] = {}
        legacy_answers: dict[str, tuple[Question, _Registration]] = {}
        for question in message.questions:
            if question.qclass not in (CLASS_IN, CLASS_ANY):
                continue
            reg = self._own.get(canonical_name(question.name))
            if reg is None or question.qtype not in (reg.record.rtype, TYPE_ANY):
                continue
            if (reg.name, reg.record.rtype, reg.record.rdata) in known:
                continue
            if legacy:
                legacy_answers.setdefault(reg.name, (question, reg))
                continue
            last = reg.last_multicast.get(group)
            if question.unicast_response and last is not None and now - last < self.config.ttl / 4:
                # §5.4: unicast, unless the record was not multicast in the last quarter
                # of its TTL, in which case everyone may as well hear it.
                unicast[reg.name] = reg
            elif last is None or now - last >= _MULTICAST_INTERVAL:
                now_multicast[reg.name] = reg
            else:
                # §6: not multicast again within a second, so multicast when the second
                # is over, and answer the querier by unicast now (the rule limits only
                # multicast; a peer that missed our announcement need not wait).
                reg.deferred.setdefault(group, last + _MULTICAST_INTERVAL)
                unicast[reg.name] = reg
        if now_multicast:
            self._multicast(list(now_multicast.values()), group, now)
        if (unicast or legacy_answers) and not self._unicast_allowed(now):
            return
        if unicast:
            self._respond([reg.record for reg in unicast.values()], remote)
        if legacy_answers:
            self._respond_legacy(message.id, list(legacy_answers.values()), remote)

    def _unicast_allowed(self, now: float) -> bool:
        """One token of the unicast answer bucket, if there is one."""
        rate = self.config.unicast_answer_rate
        if self._unicast_refilled is not None and now > self._unicast_refilled:
            elapsed = now - self._unicast_refilled
            self._unicast_tokens = min(rate, self._unicast_tokens + elapsed * rate)
        if self._unicast_refilled is None or now > self._unicast_refilled:
            self._unicast_refilled = now
        if self._unicast_tokens >= 1.0:
            self._unicast_tokens -= 1.0
            return True
        self.stats.rate_limited += 1
        return False

    def _respond(self, records: list[ResourceRecord], destination: Address) -> None:
        for chunk in _chunks(records):
            # §6: mDNS responses carry no questions; §18.4: AA is always set.
            message = DnsMessage(flags=FLAG_QR | FLAG_AA, answers=tuple(chunk))
            self._queue(encode_message(message), destination)

    def _respond_legacy(
        self, ident: int, answered: list[tuple[Question, _Registration]], remote: Address
    ) -> None:
        """§6.7: unicast to the querier's port, its ID and questions repeated, TTL at most
        10 s and no cache-flush bit (§10.2)."""
        ttl = min(self.config.ttl, self.config.legacy_unicast_ttl)
        for start in range(0, len(answered), _RECORDS_PER_MESSAGE):
            part = answered[start : start + _RECORDS_PER_MESSAGE]
            message = DnsMessage(
                id=ident,
                flags=FLAG_QR | FLAG_AA,
                questions=tuple(
                    Question(q.name, q.qtype, q.qclass, unicast_response=False) for q, _ in part
                ),
                answers=tuple(
                    address_record(reg.name, reg.ip, ttl, cache_flush=False) for _, reg in part
                ),
            )
            self._queue(encode_message(message), remote)

    def _multicast(self, regs: list[_Registration], group: Address, now: float) -> None:
        self._respond([reg.record for reg in regs], group)
        for reg in regs:
            reg.last_multicast[group] = now
            reg.deferred.pop(group, None)

    def _announce_due(self, now: float) -> None:
        """§8.3 unsolicited responses, to every group, for registrations that are due."""
        due = [
            reg
            for reg in self._own.values()
            if reg.announce_due is not None and now >= reg.announce_due
        ]
        if not due:
            return
        for group in self.config.multicast_groups:
            self._multicast(due, group, now)
        for reg in due:
            reg.announce_left -= 1
            if reg.announce_left > 0:
                reg.announce_due = now + reg.announce_interval
                reg.announce_interval *= 2
            else:
                reg.announce_due = None

    def _goodbye(self, regs: list[_Registration]) -> None:
        records = [address_record(reg.name, reg.ip, 0) for reg in regs]
        for group in self.config.multicast_groups:
            self._respond(records, group)

    def _send_query(self, key: str) -> None:
        questions = tuple(
            Question(key, qtype, CLASS_IN, self.config.unicast_response)
            for qtype in self.config.query_types
        )
        data = encode_message(DnsMessage(questions=questions))  # §18.1: ID 0
        for group in self.config.multicast_groups:
            self._queue(data, group)

    def _queue(self, data: bytes, destination: Address) -> None:
        if len(self._transmits) >= self.config.max_queued_transmits:
            self.stats.dropped_transmits += 1
            return
        self._transmits.append(Transmit(data, destination))

    # -- responses and the cache (§10) -----------------------------------------------------

    def _handle_response(self, message: DnsMessage, remote: Address, now: float) -> None:
        if remote[1] != MDNS_PORT:  # §6: responses not from port 5353 are silently ignored
            self.stats.ignored += 1
            return
        learned: dict[str, list[str]] = {}
        for record in (*message.answers, *message.additionals):
            if record.rtype not in (TYPE_A, TYPE_AAAA) or record.rclass != CLASS_IN:
                continue
            key = canonical_name(record.name)
            ip = record.address
            if ip is None or not _is_local(key) or key in self._own:
                continue
            if unusable_address(ip) is not None or (
                self.config.address_filter is not None and not self.config.address_filter(ip)
            ):
                self.stats.rejected_addresses += 1
                continue
            if record.ttl == 0:
                self._expire_soon(key, ip, now)
                continue
            self._cache_put(key, ip, record, now)
            if ip in self._cache.get(key, {}):
                learned.setdefault(key, []).append(ip)
        for key, ips in learned.items():
            resolution = self._pending.pop(key, None)
            if resolution is None:
                continue
            addresses = list(dict.fromkeys([*ips, *self.lookup(key, now)]))
            self._events.append(NameResolved(resolution.name, addresses[0], tuple(addresses)))

    def _cache_put(self, key: str, ip: str, record: ResourceRecord, now: float) -> None:
        entries = self._cache.get(key)
        if entries is None:
            entries = self._cache[key] = {}
        else:
            self._cache.move_to_end(key)
        if record.cache_flush:
            # §10.2: the record replaces older ones of its name and type, except those
            # received in the last second (they belong to the same announcement).
            for old_ip, entry in list(entries.items()):
                if entry.rtype == record.rtype and entry.received < now - _FLUSH_GRACE:
                    self._remove_entry(key, old_ip)
            entries = self._cache.setdefault(key, entries)
        ttl = min(record.ttl, self.config.max_cache_ttl)
        if ip in entries:
            del entries[ip]  # re-inserted last: newest
        else:
            self._cache_entries += 1
        entries[ip] = _CacheEntry(record.rtype, now, now + ttl)
        while len(entries) > self.config.max_addresses_per_name:
            self._remove_entry(key, next(iter(entries)))
        if self._cache_entries > self.config.cache_size:
            self._purge_expired(now)
        while self._cache_entries > self.config.cache_size:
            oldest = next(iter(self._cache))
            self._remove_entry(oldest, next(iter(self._cache[oldest])))

    def _expire_soon(self, key: str, ip: str, now: float) -> None:
        entry = self._cache.get(key, {}).get(ip)
        if entry is not None:
            entry.expires = min(entry.expires, now + _GOODBYE_LINGER)

    def _remove_entry(self, key: str, ip: str) -> None:
        entries = self._cache[key]
        del entries[ip]
        self._cache_entries -= 1
        if not entries:
            del self._cache[key]

    def _purge_expired(self, now: float) -> None:
        for key, entries in list(self._cache.items()):
            for ip in [ip for ip, entry in entries.items() if entry.expires <= now]:
                self._remove_entry(key, ip)

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the mDNS responder is closed")
