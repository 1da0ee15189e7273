"""Operating the TURN server over real loopback sockets, in-process: Prometheus metrics and
the health check scraped while relaying, the per-allocation bandwidth cap, ICMP errors
relayed to clients (RFC 8656 §11.5), a vanished client leaving nothing behind, and two
workers in one process: RFC 6062 ConnectionBind routed to the worker owning the
CONNECTION-ID, and metrics collected over the workers' mailboxes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tsunagu.aio.loop import run
from tsunagu.aio.turn_server import TurnServer, merge_snapshots
from tsunagu.aio.workers import WorkerGroup
from tsunagu.stun.attributes import (
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    EvenPort,
    Icmp,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
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
from tsunagu.stun.framing import ChannelData, StreamFramer
from tsunagu.stun.message import Message
from tsunagu.turn.config import TurnServerConfig
from tsunagu.turn.events import AllocationExpired, TurnEvent
from tsunagu.turn.transport import Address

REALM = "ops.test"
USER, PASSWORD = "alice", "secret"
TIMEOUT = 5.0
_ranges = itertools.count()


def relay_range(size: int = 200) -> tuple[int, int]:
    base = 21000 + ((os.getpid() * 7 + next(_ranges) * 401) % 8000)
    return base, base + size - 1


class Client:
    """A TURN client over UDP or TCP, built from the codec."""

    def __init__(self, server: Address, password: str = PASSWORD) -> None:
        self.server = server
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.pending: deque[bytes] = deque()
        self.nonce: str | None = None
        self.key = long_term_key(USER, REALM, password)
        self._tids = itertools.count(1)
        self.send: Callable[[bytes], Any] = lambda data: None
        self.close: Callable[[], Any] = lambda: None

    @classmethod
    async def udp(cls, server: Address, password: str = PASSWORD) -> Client:
        client = cls(server, password)
        inbox = client.inbox

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                inbox.put_nowait(data)

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Protocol, local_addr=(server[0], 0), remote_addr=server
        )
        client.send, client.close = transport.sendto, transport.close
        return client

    @classmethod
    async def tcp(cls, server: Address) -> Client:
        client = cls(server)
        reader, writer = await asyncio.open_connection(*server)
        framer = StreamFramer()

        async def pump() -> None:
            while data := await reader.read(65536):
                for frame in framer.feed(data):
                    client.inbox.put_nowait(frame)

        task = asyncio.get_running_loop().create_task(pump())

        def close() -> None:
            task.cancel()
            writer.close()

        client.send, client.close = writer.write, close
        return client

    async def receive(self) -> bytes:
        if self.pending:
            return self.pending.popleft()
        return await asyncio.wait_for(self.inbox.get(), TIMEOUT)

    async def request(self, method: int, attributes: list[Attribute]) -> Message:
        for _ in range(3):
            tid = next(self._tids).to_bytes(12, "big")
            attrs = list(attributes)
            key = None
            if self.nonce is not None:
                attrs += [Username(USER), Realm(REALM), Nonce(self.nonce)]
                key = self.key
            self.send(Message(method, MessageClass.REQUEST, tid, attrs).encode(key))
            while True:
                data = await asyncio.wait_for(self.inbox.get(), TIMEOUT)
                if data[:1] in (b"\x01", b"\x00") and data[8:20] == tid:
                    break
                self.pending.append(data)
            response = Message.decode(data)
            error = response.error
            nonce = response.get(Nonce)
            if error is not None and error.code in (401, 438) and nonce is not None:
                if error.code == 401 and self.nonce is not None:
                    return response
                self.nonce = nonce.value
                continue
            return response
        raise AssertionError("no answer after the challenge")

    async def allocate(self, *attributes: Attribute) -> Address:
        response = await self.request(
            Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP), *attributes]
        )
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None, response
        return relayed.address

    async def ping(self) -> None:
        """A Binding round trip: everything sent before has been handled."""
        tid = next(self._tids).to_bytes(12, "big")
        self.send(Message(Method.BINDING, MessageClass.REQUEST, tid).encode())
        while True:
            data = await asyncio.wait_for(self.inbox.get(), TIMEOUT)
            if data[8:20] == tid:
                return
            self.pending.append(data)


class Peer:
    def __init__(self, transport: asyncio.DatagramTransport, inbox: asyncio.Queue[Any]) -> None:
        self.transport = transport
        self.inbox = inbox
        name = transport.get_extra_info("sockname")
        self.address: Address = (name[0], name[1])

    @classmethod
    async def open(cls, ip: str = "127.0.0.1") -> Peer:
        inbox: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                inbox.put_nowait((data, (addr[0], addr[1])))

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Protocol, local_addr=(ip, 0)
        )
        return cls(transport, inbox)

    async def receive(self) -> tuple[bytes, Address]:
        data, addr = await asyncio.wait_for(self.inbox.get(), TIMEOUT)
        return data, addr


def config(**overrides: Any) -> TurnServerConfig:
    first, last = relay_range()
    values: dict[str, Any] = {
        "listen": (("127.0.0.1", 0),),
        "relay_ips": ("127.0.0.1",),
        "min_port": first,
        "max_port": last,
        "realm": REALM,
        "users": (f"{USER}:{PASSWORD}",),
        "allow_peers": ("127.0.0.0/8", "::1/128"),
    }
    values.update(overrides)
    return TurnServerConfig(**values)


@contextlib.asynccontextmanager
async def serving(
    on_event: Callable[[TurnEvent], None] | None = None, **overrides: Any
) -> AsyncIterator[TurnServer]:
    server = await TurnServer.start(config(**overrides), on_event=on_event)
    try:
        yield server
    finally:
        await server.close()


def http_get(url: str) -> tuple[int, str]:
    """A blocking GET (run it in a thread): status and body, also for 4xx/5xx."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape:\n{text}")


# -- metrics and health -------------------------------------------------------------------------


def test_metrics_and_health_scraped_while_relaying() -> None:
    async def scenario() -> None:
        async with serving(metrics=("127.0.0.1", 0)) as server:
            assert server.metrics_address is not None
            base = "http://{}:{}".format(*server.metrics_address)
            client = await Client.udp(server.udp_addresses[0])
            intruder = await Client.udp(server.udp_addresses[0], password="wrong")
            peer = await Peer.open()
            try:
                relayed = await client.allocate()
                bound = await client.request(
                    Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(peer.address)]
                )
                assert bound.error is None
                refused = await client.request(
                    Method.CREATE_PERMISSION, [XorPeerAddress(("10.0.0.1", 1))]
                )
                assert refused.error is not None and refused.error.code == 403
                rejected = await intruder.request(Method.ALLOCATE, [RequestedTransport(17)])
                assert rejected.error is not None and rejected.error.code == 401
                sent = 0
                for n in range(30):
                    # Scrape while datagrams are in flight both ways.
                    client.send(ChannelData(0x4000, b"%04d" % n).encode())
                    peer.transport.sendto(b"back %04d" % n, relayed)
                    sent += 1
                    if n == 15:
                        status, text = await asyncio.to_thread(http_get, base + "/metrics")
                        assert status == 200
                        assert sample(text, "tsunagu_turn_allocations") == 1
                for _ in range(sent):
                    await peer.receive()
                    ChannelData.decode(await client.receive())
                status, text = await asyncio.to_thread(http_get, base + "/metrics")
                assert status == 200
                stats = server.core.stats
                assert sample(text, "tsunagu_turn_allocations") == 1
                assert sample(text, "tsunagu_turn_permissions") == 1
                assert sample(text, "tsunagu_turn_channels") == 1
                to_peer = 'tsunagu_turn_relayed_packets_total{direction="to_peer"}'
                to_client = 'tsunagu_turn_relayed_packets_total{direction="to_client"}'
                assert sample(text, to_peer) == stats.packets_to_peers == 30
                assert sample(text, to_client) == stats.packets_to_clients == 30
                bytes_to_peer = 'tsunagu_turn_relayed_bytes_total{direction="to_peer"}'
                assert sample(text, bytes_to_peer) == 30 * 4
                assert sample(text, 'tsunagu_turn_auth_failures_total{code="401"}') == 1
                assert sample(text, 'tsunagu_turn_errors_total{code="403"}') == 1
                assert sample(text, 'tsunagu_turn_errors_total{code="401"}') >= 3  # + challenges
                assert await asyncio.to_thread(http_get, base + "/healthz") == (200, "ok\n")
                assert (await asyncio.to_thread(http_get, base + "/nope"))[0] == 404
                # SIGTERM's first step: no new allocations, existing ones relay on
                server.stop_accepting()
                assert await asyncio.to_thread(http_get, base + "/healthz") == (
                    503,
                    "draining\n",
                )
                status, text = await asyncio.to_thread(http_get, base + "/metrics")
                assert status == 200 and sample(text, "tsunagu_turn_draining") == 1
                client.send(ChannelData(0x4000, b"still").encode())
                assert await peer.receive() == (b"still", relayed)
            finally:
                client.close()
                intruder.close()
                peer.transport.close()
        # closing the server closed the endpoint
        with pytest.raises(OSError):
            await asyncio.to_thread(http_get, base + "/healthz")

    run(scenario())


# -- bandwidth cap ------------------------------------------------------------------------------


def test_bandwidth_cap_drops_what_exceeds_the_bucket() -> None:
    async def scenario() -> None:
        async with serving(bandwidth_limit=2000, bandwidth_burst=5000) as server:
            client = await Client.udp(server.udp_addresses[0])
            peer = await Peer.open()
            try:
                await client.allocate()
                bound = await client.request(
                    Method.CHANNEL_BIND, [ChannelNumber(0x4001), XorPeerAddress(peer.address)]
                )
                assert bound.error is None
                for _ in range(40):
                    client.send(ChannelData(0x4001, b"b" * 1000).encode())
                await client.ping()  # all 40 handled
                stats = server.core.stats
                assert stats.packets_to_peers + stats.dropped_bandwidth == 40
                # 5000 bytes of burst plus at most 2000 bytes a second of refill
                assert 5 <= stats.packets_to_peers <= 8, stats
                for _ in range(stats.packets_to_peers):
                    assert len((await peer.receive())[0]) == 1000
                await client.ping()
                assert peer.inbox.empty()  # nothing beyond what the core let through
            finally:
                client.close()
                peer.transport.close()

    run(scenario())


# -- ICMP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_icmp_port_unreachable_comes_back_as_a_data_indication(ip: str) -> None:
    async def scenario() -> None:
        async with serving(listen=((ip, 0),), relay_ips=(ip,)) as server:
            client = await Client.udp(server.udp_addresses[0])
            peer = await Peer.open(ip)
            gone = socket.socket(
                socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM
            )
            gone.bind((ip, 0))
            gone_address: Address = gone.getsockname()[:2]
            gone.close()  # its port now answers ICMP port unreachable
            try:
                family = AddressFamily.IPV6 if ":" in ip else AddressFamily.IPV4
                relayed = await client.allocate(RequestedAddressFamily(family))
                permitted = await client.request(
                    Method.CREATE_PERMISSION,
                    [XorPeerAddress(gone_address), XorPeerAddress(peer.address)],
                )
                assert permitted.error is None
                send = Message(
                    Method.SEND,
                    MessageClass.INDICATION,
                    b"S" * 12,
                    [XorPeerAddress(gone_address), Data(b"anyone?")],
                )
                client.send(send.encode())
                indication = Message.decode(await client.receive())
                assert (indication.method, indication.message_class) == (
                    Method.DATA,
                    MessageClass.INDICATION,
                )
                assert indication.get(XorPeerAddress) == XorPeerAddress(gone_address)
                assert indication.get(Data) is None
                expected = Icmp(1, 4) if ":" in ip else Icmp(3, 3)  # port unreachable
                assert indication.get(Icmp) == expected
                assert server.core.stats.icmp_to_clients == 1
                # the allocation relays on to its other peer
                send = Message(
                    Method.SEND,
                    MessageClass.INDICATION,
                    b"T" * 12,
                    [XorPeerAddress(peer.address), Data(b"still here")],
                )
                client.send(send.encode())
                assert await peer.receive() == (b"still here", relayed)
            finally:
                client.close()
                peer.transport.close()

    run(scenario())


# -- a vanished client --------------------------------------------------------------------------


def test_a_vanished_client_leaves_nothing_behind_after_its_lifetime() -> None:
    async def scenario() -> None:
        expired = asyncio.Event()

        def on_event(event: TurnEvent) -> None:
            if isinstance(event, AllocationExpired):
                expired.set()

        async with serving(on_event, default_lifetime=1, max_lifetime=1) as server:
            core = server.core
            client = await Client.udp(server.udp_addresses[0])
            peer = await Peer.open()
            relayed = await client.allocate(EvenPort(reserve=True))
            assert (
                await client.request(
                    Method.CHANNEL_BIND, [ChannelNumber(0x4002), XorPeerAddress(peer.address)]
                )
            ).error is None
            assert core.allocation_count == 1 and core.reservation_count == 1
            assert core.relay_ports_in_use == 2
            client.close()  # vanishes: no Refresh, no goodbye
            peer.transport.close()
            await asyncio.wait_for(expired.wait(), 10.0)
            # The reservation lives 30 s (RFC 8656 §7.2); everything else is gone now.
            assert core.allocation_count == 0
            assert core.relay_ports_in_use == 1 and core.reservation_count == 1
            assert relayed not in server._udp  # its socket is closed ...
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind(relayed)  # ... and the port is free again
            probe.close()
            core.handle_timeout(asyncio.get_running_loop().time() + 31)  # the token's time
            server._flush()
            assert core.relay_ports_in_use == 0 and core.reservation_count == 0
            assert server._udp.keys() == {a for a in server.udp_addresses}

    run(scenario())


# -- two workers in one process -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_workers() -> AsyncIterator[tuple[WorkerGroup, list[TurnServer]]]:
    """Two servers as workers 0 and 1 of one group: separate listening ports (so a test
    chooses which one a connection reaches), one relay port range split between them."""
    group = WorkerGroup(2)
    servers: list[TurnServer] = []
    settings = config(workers=2)
    try:
        for index in range(2):
            servers.append(await TurnServer.start(settings, worker=group.context(index)))
        yield group, servers
    finally:
        for server in servers:
            await server.close()
        group.close()


def test_connection_bind_reaching_another_worker_is_handed_to_the_owner() -> None:
    """RFC 6062 §5.4 with --workers: the kernel may give the data connection to any
    worker; the one that gets a CONNECTION-ID it does not own passes the connection on."""

    async def scenario() -> None:
        async with two_workers() as (_, (owner, other)):
            accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
                asyncio.Queue()
            )

            async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                accepted.put_nowait((r, w))

            listener = await asyncio.start_server(accept, "127.0.0.1", 0)
            target: Address = listener.sockets[0].getsockname()[:2]
            control = await Client.tcp(owner.tcp_addresses[0])
            try:
                response = await control.request(
                    Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)]
                )
                relayed = response.get(XorRelayedAddress)
                assert relayed is not None
                first, last = owner.config.worker_ports(0)
                assert first <= relayed.address[1] <= last  # worker 0's slice
                await control.request(Method.CREATE_PERMISSION, [XorPeerAddress(target)])
                connected = await control.request(Method.CONNECT, [XorPeerAddress(target)])
                connection_id = connected.get(ConnectionId)
                assert connection_id is not None and connection_id.value % 2 == 0
                peer_reader, peer_writer = await asyncio.wait_for(accepted.get(), TIMEOUT)
                # The data connection goes to worker 1, which does not own the id.
                reader, writer = await asyncio.open_connection(*other.tcp_addresses[0])
                assert control.nonce is not None
                bind = Message(
                    Method.CONNECTION_BIND,
                    MessageClass.REQUEST,
                    b"B" * 12,
                    [connection_id, Username(USER), Realm(REALM), Nonce(control.nonce)],
                )
                writer.write(bind.encode(control.key) + b"right after the request")
                head = await asyncio.wait_for(reader.readexactly(20), TIMEOUT)
                body = await asyncio.wait_for(
                    reader.readexactly(int.from_bytes(head[2:4])), TIMEOUT
                )
                answer = Message.decode(head + body)
                assert answer.method == Method.CONNECTION_BIND and answer.error is None, answer
                assert other.handoffs == 1 and owner.handoffs == 0
                assert not other._connections  # worker 1 forgot it; worker 0 pipes it
                # bytes sent with the request went along; the pipe works both ways
                got = await asyncio.wait_for(peer_reader.readexactly(23), TIMEOUT)
                assert got == b"right after the request"
                peer_writer.write(b"hello client")
                assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == b"hello client"
                writer.write(b"hello peer")
                assert await asyncio.wait_for(peer_reader.readexactly(10), TIMEOUT) == b"hello peer"
                writer.close()
                peer_writer.close()
            finally:
                control.close()
                listener.close()

    run(scenario())


def test_supervisor_metrics_query_sums_the_workers() -> None:
    async def scenario() -> None:
        async with two_workers() as (group, servers):
            clients = [await Client.udp(server.udp_addresses[0]) for server in servers]
            try:
                for client in clients:
                    await client.allocate()
                again = await clients[1].request(
                    Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)]
                )
                assert again.error is not None and again.error.code == 437
                answers = await asyncio.to_thread(group.query, b"stats", TIMEOUT)
                assert [index for index, _ in answers] == [0, 1]
                total = merge_snapshots(json.loads(answer) for _, answer in answers)
                assert total["allocations"] == 2 and total["workers"] == 2
                assert total["errors"]["437"] == 1
            finally:
                for client in clients:
                    client.close()

    run(scenario())
