"""The TURN server core's bandwidth cap, ICMP relaying (RFC 8656 §11.5) and what it needs to
run as one of several workers; the operations settings; structured log and metrics
rendering. Deterministic: the core is fed bytes with an explicit clock."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from typing import Any

import pytest

from tsunagu.aio.turn_server import (
    JsonFormatter,
    LogEvent,
    merge_snapshots,
    render_metrics,
)
from tsunagu.stun.attributes import (
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    Icmp,
    Lifetime,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    Software,
    UnknownAttribute,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import (
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AddressFamily,
    MessageClass,
    Method,
)
from tsunagu.stun.credentials import long_term_key
from tsunagu.stun.framing import ChannelData
from tsunagu.stun.message import Message
from tsunagu.turn.config import TurnServerConfig, load_config
from tsunagu.turn.entropy import SeededEntropy
from tsunagu.turn.events import ConnectToPeer
from tsunagu.turn.server import TurnServerCore
from tsunagu.turn.transport import Address, FiveTuple, Transmit, Transport

REALM = "quota.test"
USER, PASSWORD = "alice", "secret"
SERVER: Address = ("203.0.113.1", 3478)
SERVER6: Address = ("2001:db8::1", 3478)
CLIENT: Address = ("198.51.100.1", 50000)
PEER: Address = ("198.51.100.20", 40000)
PEER2: Address = ("198.51.100.21", 40001)


class Binder:
    supports_dont_fragment = True

    def __init__(self) -> None:
        self.bound: set[Address] = set()

    def bind(self, address: Address) -> bool:
        self.bound.add(address)
        return True

    def unbind(self, address: Address) -> None:
        self.bound.discard(address)

    def bind_tcp(self, address: Address) -> bool:
        return self.bind(address)

    def unbind_tcp(self, address: Address) -> None:
        self.unbind(address)


def make_core(**overrides: Any) -> TurnServerCore:
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k.startswith("core_")}
    values: dict[str, Any] = {
        "listen": (SERVER, SERVER6),
        "realm": REALM,
        "users": (f"{USER}:{PASSWORD}",),
        "min_port": 50000,
        "max_port": 50099,
    }
    values.update(overrides)
    return TurnServerCore(
        TurnServerConfig(**values),
        Binder(),
        entropy=SeededEntropy(b"quotas"),
        **{k.removeprefix("core_"): v for k, v in kwargs.items()},
    )


def drain(core: TurnServerCore) -> list[Transmit]:
    out = []
    while (item := core.poll_transmit()) is not None:
        out.append(item)
    while core.poll_event() is not None:
        pass
    return out


class Client:
    def __init__(
        self,
        core: TurnServerCore,
        transport: Transport = Transport.UDP,
        address: Address = CLIENT,
        server: Address = SERVER,
    ) -> None:
        self.core = core
        self.transport = transport
        self.address = address
        self.server = server
        self.nonce = ""
        self.counter = 0
        self.key = long_term_key(USER, REALM, PASSWORD)

    def feed(self, data: bytes, now: float = 0.0) -> list[Transmit]:
        self.core.handle_datagram(data, self.server, self.address, now, self.transport)
        return drain(self.core)

    def request(
        self, method: int, attributes: Iterable[Attribute] = (), now: float = 0.0
    ) -> Message:
        attributes = list(attributes)
        for _ in range(2):
            self.counter += 1
            tid = self.counter.to_bytes(12, "big")
            attrs = list(attributes)
            key = None
            if self.nonce:
                attrs += [Username(USER), Realm(REALM), Nonce(self.nonce)]
                key = self.key
            (out,) = self.feed(Message(method, MessageClass.REQUEST, tid, attrs).encode(key), now)
            response = Message.decode(out.data)
            if response.error is not None and response.error.code in (401, 438):
                nonce = response.get(Nonce)
                assert nonce is not None
                self.nonce = nonce.value
                continue
            return response
        raise AssertionError("not authenticated")

    @property
    def five_tuple(self) -> FiveTuple:
        return FiveTuple(self.transport, self.address, self.server)

    def relayed(self, transport: int = TRANSPORT_UDP, *extra: Attribute) -> Address:
        response = self.request(Method.ALLOCATE, [RequestedTransport(transport), *extra])
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None, response
        return relayed.address


def relay_of(core: TurnServerCore, client: Client) -> Address:
    allocation = core.allocation(client.five_tuple)
    assert allocation is not None
    return next(iter(allocation.relays.values())).bound


# -- bandwidth cap ------------------------------------------------------------------------------


def test_bandwidth_cap_drops_beyond_the_bucket_and_refills() -> None:
    core = make_core(allow_peers=("198.51.100.0/24",), bandwidth_limit=1000, bandwidth_burst=2500)
    client = Client(core)
    client.relayed()
    assert client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)])
    relay = relay_of(core, client)
    frame = ChannelData(0x4000, b"x" * 1000).encode()
    sent = [len(client.feed(frame, 1.0)) for _ in range(4)]
    assert sent == [1, 1, 0, 0]  # 2500 bytes of burst: two datagrams of 1000
    assert core.stats.dropped_bandwidth == 2
    # both directions draw on the same bucket
    core.handle_peer_datagram(b"y" * 400, relay, PEER, 1.0)
    assert len(drain(core)) == 1
    core.handle_peer_datagram(b"y" * 400, relay, PEER, 1.0)
    assert drain(core) == []  # 100 bytes left
    assert core.stats.dropped_bandwidth == 3
    # 1000 bytes per second refill, capped at the burst
    assert len(client.feed(frame, 2.0)) == 1
    assert len(client.feed(frame, 100.0)) == 1
    assert len(client.feed(frame, 100.0)) == 1
    assert client.feed(frame, 100.0) == []
    assert core.stats.packets_to_peers == 5 and core.stats.packets_to_clients == 1


def test_bandwidth_cap_covers_send_indications_and_is_per_allocation() -> None:
    core = make_core(allow_peers=("198.51.100.0/24",), bandwidth_limit=100_000)  # burst: 1 s
    first, second = Client(core), Client(core, address=("198.51.100.2", 50000))
    for client in (first, second):
        client.relayed()
        assert client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PEER)]).error is None

    def send(client: Client, size: int) -> int:
        message = Message(
            Method.SEND,
            MessageClass.INDICATION,
            bytes(12),
            [XorPeerAddress(PEER), Data(b"z" * size)],
        )
        return len(client.feed(message.encode(), 5.0))

    assert [send(first, 30000) for _ in range(4)] == [1, 1, 1, 0]
    assert send(second, 30000) == 1  # another allocation, another bucket
    # the bucket goes with its allocation
    assert first.request(Method.REFRESH, [Lifetime(0)], 5.0).error is None
    assert len(core._buckets) == 1


def test_no_bandwidth_cap_by_default() -> None:
    core = make_core(allow_peers=("198.51.100.0/24",))
    client = Client(core)
    client.relayed()
    client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)])
    frame = ChannelData(0x4000, b"x" * 60000).encode()
    assert all(len(client.feed(frame, 1.0)) == 1 for _ in range(50))
    assert core.stats.dropped_bandwidth == 0 and not core._buckets


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bandwidth_limit": -1}, "must not be negative"),
        ({"bandwidth_burst": -5}, "must not be negative"),
        ({"workers": 0}, "workers"),
        ({"workers": 65}, "workers"),
        ({"workers": 60, "min_port": 50000, "max_port": 50099}, "2 ports per worker"),
        ({"log_format": "xml"}, "log format"),
    ],
)
def test_operations_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TurnServerConfig(users=("a:b",), **settings)


def test_operations_settings_from_toml() -> None:
    config = load_config(
        'metrics = "127.0.0.1"\nworkers = 4\nlog-format = "json"\n'
        "bandwidth-limit = 125000\nbandwidth-burst = 250000\n"
    )
    assert config.metrics == ("127.0.0.1", 9641)
    assert config.workers == 4 and config.log_format == "json"
    assert config.bandwidth_limit == 125_000 and config.effective_bandwidth_burst == 250_000
    assert load_config('metrics = "[::1]:9100"').metrics == ("::1", 9100)
    assert TurnServerConfig(bandwidth_limit=1000).effective_bandwidth_burst == 65536
    assert TurnServerConfig(bandwidth_limit=10**6).effective_bandwidth_burst == 10**6


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_worker_port_slices_partition_the_range(workers: int) -> None:
    config = TurnServerConfig(min_port=40000, max_port=40100, workers=workers)
    slices = [config.worker_ports(i) for i in range(workers)]
    ports = [p for first, last in slices for p in range(first, last + 1)]
    assert ports == list(range(40000, 40101))  # every port once, in order
    assert all(last - first >= 1 for first, last in slices)


# -- several workers ----------------------------------------------------------------------------


def test_worker_core_allocates_from_its_slice_but_refuses_the_whole_range() -> None:
    core = make_core(
        min_port=50000,
        max_port=50099,
        workers=2,
        relay_to_relay=False,
        allow_peers=("203.0.113.0/24",),
        core_relay_ports=(50050, 50099),
    )
    client = Client(core)
    for n in range(20):
        port = Client(core, address=("198.51.100.9", 1000 + n)).relayed()[1]
        assert 50050 <= port <= 50099
    client.relayed()
    # worker 0's relay ports are still this server's own: refused as peers
    response = client.request(Method.CREATE_PERMISSION, [XorPeerAddress((SERVER[0], 50001))])
    assert response.error is None  # permissions are per IP ...
    response = client.request(
        Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress((SERVER[0], 50001))]
    )
    assert response.error is not None and response.error.code == 403  # ... channels per port


@pytest.mark.parametrize(("shard", "shards"), [(0, 2), (1, 2), (2, 3), (5, 8)])
def test_connection_ids_name_their_worker(shard: int, shards: int) -> None:
    core = make_core(allow_peers=("198.51.100.0/24",), core_connection_id_shard=(shard, shards))
    control = Client(core, Transport.TCP)
    control.relayed(TRANSPORT_TCP)
    ids = []
    for n in range(20):
        peer = ("198.51.100.30", 1000 + n)
        control.request(Method.CREATE_PERMISSION, [XorPeerAddress(peer)])
        core.handle_datagram(
            _signed(control, Method.CONNECT, [XorPeerAddress(peer)]),
            SERVER,
            control.address,
            0.0,
            Transport.TCP,
        )
        command = None
        while (event := core.poll_event()) is not None:
            if isinstance(event, ConnectToPeer):
                command = event
        assert command is not None
        ids.append(command.connection_id)
    assert all(0 < i <= 0xFFFFFFFF and i % shards == shard for i in ids)
    assert len(set(ids)) == len(ids)


def _signed(client: Client, method: int, attributes: list[Attribute]) -> bytes:
    client.counter += 1
    attrs = [*attributes, Username(USER), Realm(REALM), Nonce(client.nonce)]
    return Message(method, MessageClass.REQUEST, client.counter.to_bytes(12, "big"), attrs).encode(
        client.key
    )


def test_tcp_allocation_over_tls_refused_when_workers_cannot_route_it() -> None:
    core = make_core(core_tcp_allocations_over_tls=False)
    tls = Client(core, Transport.TLS)
    response = tls.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])
    assert response.error is not None and response.error.code == 442
    assert core.allocation_count == 0
    # UDP allocations over TLS, and TCP allocations over TCP, are unaffected
    assert tls.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)]).error is None
    tcp = Client(core, Transport.TCP, address=("198.51.100.3", 1))
    assert tcp.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)]).error is None
    with pytest.raises(ValueError, match="shard"):
        make_core(core_connection_id_shard=(2, 2))


def test_connection_bind_is_still_checked_by_its_owner() -> None:
    """A CONNECTION-ID of another shard is unknown here: 400, nothing changes."""
    core = make_core(core_connection_id_shard=(0, 2))
    data = Client(core, Transport.TCP, address=("198.51.100.4", 2))
    response = data.request(Method.CONNECTION_BIND, [ConnectionId(1)])
    assert response.error is not None and response.error.code == 400
    assert core.allocation_count == 0 and not core.is_data_connection(data.five_tuple)


# -- ICMP (RFC 8656 §11.5) --------------------------------------------------------------------- ---


def icmp_of(transmit: Transmit) -> tuple[Message, Icmp]:
    message = Message.decode(transmit.data)
    assert (message.method, message.message_class) == (Method.DATA, MessageClass.INDICATION)
    icmp = message.get(Icmp)
    assert icmp is not None
    return message, icmp


def test_icmp_error_is_relayed_as_a_data_indication() -> None:
    core = make_core(allow_peers=("198.51.100.0/24",))
    client = Client(core)
    client.relayed()
    client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PEER)])
    relay = relay_of(core, client)
    core.handle_peer_icmp(relay, PEER, (3, 3, 0), 1.0)  # port unreachable
    (out,) = drain(core)
    assert (out.transport, out.local, out.remote) == (Transport.UDP, SERVER, CLIENT)
    message, icmp = icmp_of(out)
    assert message.get(XorPeerAddress) == XorPeerAddress(PEER)
    assert message.get(Data) is None  # §11.5: no DATA attribute
    assert (icmp.icmp_type, icmp.icmp_code, icmp.error_data) == (3, 3, 0)
    # fragmentation needed carries the next-hop MTU; other codes carry 0
    core.handle_peer_icmp(relay, PEER, (3, 4, 1280), 1.0)
    assert icmp_of(drain(core)[0])[1].error_data == 1280
    core.handle_peer_icmp(relay, PEER, (11, 0, 999), 1.0)
    assert icmp_of(drain(core)[0])[1] == Icmp(11, 0, 0)
    assert core.stats.icmp_to_clients == 3


@pytest.mark.parametrize(
    ("icmp", "why"),
    [
        ((0, 0, 0), "echo reply: not an error the RFC relays"),
        ((5, 1, 0), "redirect"),
        ((12, 0, 0), "parameter problem is not listed"),
    ],
)
def test_other_icmpv4_types_are_dropped(icmp: tuple[int, int, int], why: str) -> None:
    core = make_core(allow_peers=("198.51.100.0/24",))
    client = Client(core)
    client.relayed()
    client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PEER)])
    core.handle_peer_icmp(relay_of(core, client), PEER, icmp, 1.0)
    assert drain(core) == [], why


def test_icmp_needs_an_allocation_and_a_permission() -> None:
    core = make_core(allow_peers=("198.51.100.0/24",))
    client = Client(core)
    client.relayed()
    client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PEER)])
    relay = relay_of(core, client)
    core.handle_peer_icmp(relay, PEER2, (3, 3, 0), 1.0)  # no permission for PEER2
    core.handle_peer_icmp((relay[0], relay[1] + 1), PEER, (3, 3, 0), 1.0)  # no allocation
    core.handle_peer_icmp(relay, PEER, (3, 3, 0), 301.0)  # permission expired
    assert drain(core) == [] and core.stats.icmp_to_clients == 0


def test_icmpv6_types() -> None:
    peer6: Address = ("2001:db8::20", 40000)
    core = make_core(listen=(SERVER6,), allow_peers=("2001:db8::/32",))
    client = Client(core, address=("2001:db8::9", 5000), server=SERVER6)
    client.relayed(TRANSPORT_UDP, RequestedAddressFamily(AddressFamily.IPV6))
    client.request(Method.CREATE_PERMISSION, [XorPeerAddress(peer6)])
    relay = relay_of(core, client)
    core.handle_peer_icmp(relay, peer6, (1, 4, 0), 1.0)  # port unreachable
    core.handle_peer_icmp(relay, peer6, (2, 0, 1400), 1.0)  # packet too big: MTU
    core.handle_peer_icmp(relay, peer6, (3, 0, 77), 1.0)  # time exceeded
    core.handle_peer_icmp(relay, peer6, (128, 0, 0), 1.0)  # echo request: dropped
    icmps = [icmp_of(t)[1] for t in drain(core)]
    assert icmps == [Icmp(1, 4, 0), Icmp(2, 0, 1400), Icmp(3, 0, 0)]


# -- logs and metrics ---------------------------------------------------------------------------


def test_log_event_text_and_json() -> None:
    event = LogEvent("auth-failed", source="udp:192.0.2.1:5000", code=401, reason="bad key x=1")
    assert str(event) == 'auth-failed source=udp:192.0.2.1:5000 code=401 reason="bad key x=1"'
    record = logging.LogRecord("tsunagu.turn", logging.WARNING, __file__, 1, event, None, None)
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "auth-failed" and line["code"] == 401
    assert line["source"] == "udp:192.0.2.1:5000" and line["reason"] == "bad key x=1"
    assert line["level"] == "warning" and line["logger"] == "tsunagu.turn"
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s", ("b",), None)
    assert json.loads(JsonFormatter().format(plain))["message"] == "a b"


def test_metrics_render_and_merge() -> None:
    worker = {
        "allocations": 2,
        "permissions": 3,
        "channels": 1,
        "packets": {"to_peer": 10, "to_client": 7},
        "bytes": {"to_peer": 1000, "to_client": 700},
        "dropped": {"bandwidth": 1},
        "auth_failures": {"401": 2},
        "errors": {"401": 5, "403": 1},
        "draining": 0,
        "workers": 1,
    }
    total = merge_snapshots([worker, {**worker, "draining": 1, "errors": {"486": 4}}])
    assert total["allocations"] == 4 and total["packets"] == {"to_peer": 20, "to_client": 14}
    assert total["errors"] == {"401": 5, "403": 1, "486": 4} and total["draining"] == 1
    text = render_metrics(total).decode()
    assert "tsunagu_turn_allocations 4.0" in text
    assert 'tsunagu_turn_relayed_packets_total{direction="to_peer"} 20.0' in text
    assert 'tsunagu_turn_relayed_bytes_total{direction="to_client"} 1400.0' in text
    assert 'tsunagu_turn_errors_total{code="486"} 4.0' in text
    assert 'tsunagu_turn_auth_failures_total{code="401"} 4.0' in text
    assert "tsunagu_turn_draining 1.0" in text


# -- the driver's fast paths agree with handle_datagram ------------------------------------------


def send_indication(peer: Address, payload: bytes, *extra: Attribute) -> bytes:
    attributes = [XorPeerAddress(peer), Data(payload), *extra]
    return Message(Method.SEND, MessageClass.INDICATION, b"\x01" * 12, attributes).encode()


def allocated_core() -> tuple[TurnServerCore, Client]:
    core = make_core(allow_peers=("198.51.100.0/24",))
    client = Client(core)
    client.relayed()
    assert client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PEER)]).error is None
    return core, client


def general_path(data: bytes) -> tuple[list[Transmit], Any]:
    core, client = allocated_core()
    out = client.feed(data, 1.0)
    return out, core.stats


def test_send_indication_fast_path_relays_the_common_shape() -> None:
    core, client = allocated_core()
    relay = relay_of(core, client)
    fast = core.relay_udp_send_indication(send_indication(PEER, b"hi"), SERVER, CLIENT, 1.0)
    assert fast == (relay, PEER, b"hi", False)
    fast = core.relay_udp_send_indication(
        send_indication(PEER, b"df", DontFragment()), SERVER, CLIENT, 1.0
    )
    assert fast == (relay, PEER, b"df", True)
    reordered = Message(
        Method.SEND, MessageClass.INDICATION, bytes(12), [Data(b"odd"), XorPeerAddress(PEER)]
    ).encode()
    assert core.relay_udp_send_indication(reordered, SERVER, CLIENT, 1.0) == (
        relay,
        PEER,
        b"odd",
        False,
    )
    # dropped, and counted, as handle_datagram would
    assert core.relay_udp_send_indication(send_indication(PEER2, b"x"), SERVER, CLIENT, 1.0) is None
    assert core.relay_udp_send_indication(send_indication(PEER, b"x"), SERVER, PEER, 1.0) is None
    assert core.stats.dropped_from_clients == 2 and core.stats.packets_to_peers == 3


@pytest.mark.parametrize(
    "data",
    [
        send_indication(("2001:db8::20", 1), b"v6 peers take the general path"),
        send_indication(PEER, b"x", Software("with a software attribute")),
        send_indication(PEER, b"x", UnknownAttribute(0x0777, b"")),  # comprehension-required
        Message(Method.SEND, MessageClass.INDICATION, bytes(12), [Data(b"no peer")]).encode(),
        send_indication(PEER, b"fingerprinted")[:-4] + b"",  # a cut message
        Message(
            Method.SEND, MessageClass.INDICATION, bytes(12), [XorPeerAddress(PEER), Data(b"f")]
        ).encode(fingerprint=True),
    ],
)
def test_send_indication_fast_path_leaves_the_rest_to_handle_datagram(data: bytes) -> None:
    core, _ = allocated_core()
    assert core.relay_udp_send_indication(data, SERVER, CLIENT, 1.0) is False
    assert core.stats.dropped_from_clients == 0


def test_fast_paths_agree_with_handle_datagram_on_mutated_input() -> None:
    """Differential: wherever the fast path decides, handle_datagram on a twin core decides
    the same (relayed where to, or dropped)."""
    rng = random.Random(8656)
    valid = [
        send_indication(PEER, b"payload"),
        send_indication(PEER, b"", DontFragment()),
        ChannelData(0x4000, b"channel payload").encode(),
    ]
    decided = 0
    for _ in range(3000):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256) if rng.random() < 0.5 else data[at] ^ 1
        frame = bytes(data)
        fast_core, fast_client = allocated_core()
        fast_client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)])
        slow_core, slow_client = allocated_core()
        slow_client.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)])
        first = frame[0]
        fast: Any
        if 0x40 <= first <= fast_core.channel_first_byte_max:
            fast = fast_core.relay_udp_channel_data(frame, SERVER, CLIENT, 1.0)
            fast = fast if fast is None else (*fast, False)
        elif frame[:2] == b"\x00\x16":
            fast = fast_core.relay_udp_send_indication(frame, SERVER, CLIENT, 1.0)
        else:
            continue
        if fast is False:
            continue
        decided += 1
        slow = slow_client.feed(frame, 1.0)
        if fast is None:
            assert slow == [], frame.hex()
        else:
            (transmit,) = slow
            assert (transmit.local, transmit.remote, transmit.data, transmit.dont_fragment) == fast
        assert fast_core.stats == slow_core.stats, frame.hex()
    assert decided > 300
