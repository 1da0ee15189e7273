"""The TURN server over real loopback sockets: in-process (TurnServer) and as the
``tsunagu turn-server`` command. Loopback peers are refused by the default policy, so the
servers here allow 127.0.0.0/8 (or ::1) explicitly unless a test is about the refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio.loop import run
from tsunagu.aio.turn_server import TurnServer
from tsunagu.stun.attributes import (
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    EvenPort,
    Lifetime,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
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
from tsunagu.turn.events import AllocationDeleted, TurnEvent
from tsunagu.turn.transport import Address

REALM = "net.test"
USER, PASSWORD = "alice", "secret"
TIMEOUT = 5.0
_ranges = itertools.count()


def relay_range() -> tuple[int, int]:
    """A relay port range below the ephemeral range, spread per process and test."""
    base = 20000 + ((os.getpid() * 13 + next(_ranges) * 211) % 9000)
    return base, base + 199


class RawClient:
    """A small TURN client built from the codec, over UDP, TCP or TLS."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.pending: deque[bytes] = deque()
        self.nonce: str | None = None
        self.key = long_term_key(USER, REALM, PASSWORD)
        self._tids = itertools.count(1)
        self._send: Callable[[bytes], None] = lambda data: None
        self._close: Callable[[], None] = lambda: None
        self.local: Address = ("", 0)

    @classmethod
    async def udp(cls, server: Address) -> RawClient:
        client = cls(server)
        loop = asyncio.get_running_loop()
        inbox = client.inbox

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                inbox.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(
            Protocol, local_addr=(server[0], 0), remote_addr=server
        )
        client._send = transport.sendto
        client._close = transport.close
        name = transport.get_extra_info("sockname")
        client.local = (name[0], name[1])
        return client

    @classmethod
    async def stream(cls, server: Address, context: ssl.SSLContext | None = None) -> RawClient:
        client = cls(server)
        reader, writer = await asyncio.open_connection(*server, ssl=context)
        framer = StreamFramer()

        async def pump() -> None:
            while data := await reader.read(65536):
                for frame in framer.feed(data):
                    client.inbox.put_nowait(frame)
            client.inbox.put_nowait(b"")  # EOF marker

        task = asyncio.get_running_loop().create_task(pump())
        client._send = writer.write

        def close() -> None:
            task.cancel()
            writer.close()

        client._close = close
        name = writer.get_extra_info("sockname")
        client.local = (name[0], name[1])
        return client

    def close(self) -> None:
        self._close()

    def send(self, data: bytes) -> None:
        self._send(data)

    async def receive(self) -> bytes:
        """The next message that is not a response to one of our requests."""
        if self.pending:
            return self.pending.popleft()
        return await asyncio.wait_for(self.inbox.get(), TIMEOUT)

    async def _response(self, tid: bytes) -> Message:
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            data = await asyncio.wait_for(self.inbox.get(), max(remaining, 0.001))
            if data[:1] in (b"\x01", b"\x00") and data[8:20] == tid:
                return Message.decode(data)
            self.pending.append(data)

    async def request(self, method: int, attributes: list[Attribute]) -> Message:
        for _ in range(3):  # unauthenticated, then with the nonce, then after a 438
            tid = next(self._tids).to_bytes(12, "big")
            attrs = list(attributes)
            key = None
            if self.nonce is not None:
                attrs += [Username(USER), Realm(REALM), Nonce(self.nonce)]
                key = self.key
            message = Message(method, MessageClass.REQUEST, tid, attrs)
            self.send(message.encode(key))
            response = await self._response(tid)
            error = response.error
            if error is not None and error.code in (401, 438) and response.get(Nonce):
                if error.code == 401 and self.nonce is not None:
                    return response
                self.nonce = response.get(Nonce).value  # type: ignore[union-attr]
                continue
            return response
        raise AssertionError("no answer after the challenge")

    async def allocate(self, *attributes: Attribute) -> Message:
        return await self.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP), *attributes])

    async def permit(self, *peers: Address) -> Message:
        return await self.request(Method.CREATE_PERMISSION, [XorPeerAddress(p) for p in peers])

    async def bind(self, channel: int, peer: Address) -> Message:
        return await self.request(
            Method.CHANNEL_BIND, [ChannelNumber(channel), XorPeerAddress(peer)]
        )

    def send_indication(self, peer: Address, data: bytes) -> None:
        tid = next(self._tids).to_bytes(12, "big")
        message = Message(
            Method.SEND, MessageClass.INDICATION, tid, [XorPeerAddress(peer), Data(data)]
        )
        self.send(message.encode())

    async def ping(self) -> None:
        """A Binding round trip: everything sent before it has been processed."""
        tid = next(self._tids).to_bytes(12, "big")
        self.send(Message(Method.BINDING, MessageClass.REQUEST, tid).encode())
        response = await self._response(tid)
        assert response.message_class == MessageClass.SUCCESS


class Peer:
    """A UDP socket standing for a peer on the Internet."""

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

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(ip, 0))
        return cls(transport, inbox)

    async def receive(self) -> tuple[bytes, Address]:
        data, addr = await asyncio.wait_for(self.inbox.get(), TIMEOUT)
        return data, addr

    def nothing_received(self) -> bool:
        return self.inbox.empty()

    def send(self, data: bytes, to: Address) -> None:
        self.transport.sendto(data, to)

    def close(self) -> None:
        self.transport.close()


@contextlib.asynccontextmanager
async def serving(
    on_event: Callable[[TurnEvent], None] | None = None, **overrides: Any
) -> AsyncIterator[TurnServer]:
    first, last = relay_range()
    values: dict[str, Any] = {
        "listen": (("127.0.0.1", 0),),
        "relay_ips": ("127.0.0.1",),
        "min_port": first,
        "max_port": last,
        "realm": REALM,
        "users": (f"{USER}:{PASSWORD}",),
        "allow_peers": ("127.0.0.0/8",),
    }
    values.update(overrides)
    server = await TurnServer.start(TurnServerConfig(**values), on_event=on_event)
    try:
        yield server
    finally:
        await server.close()


def relayed_of(response: Message) -> Address:
    assert response.error is None, response
    attribute = response.get(XorRelayedAddress)
    assert attribute is not None
    return attribute.address


async def relay_round_trip(client: RawClient, peer: Peer, *allocate: Attribute) -> None:
    """Send indication out, Data indication back; ChannelBind, ChannelData both ways."""
    relayed = relayed_of(await client.allocate(*allocate))
    assert (await client.permit(peer.address)).error is None
    client.send_indication(peer.address, b"via send")
    data, source = await peer.receive()
    assert (data, source) == (b"via send", relayed)
    peer.send(b"via data", relayed)
    indication = Message.decode(await client.receive())
    assert indication.method == Method.DATA
    assert indication.get(XorPeerAddress) == XorPeerAddress(peer.address)
    assert indication.get(Data) == Data(b"via data")
    assert (await client.bind(0x4001, peer.address)).error is None
    client.send(ChannelData(0x4001, b"via channel").encode(stream=True))
    assert await peer.receive() == (b"via channel", relayed)
    peer.send(b"back on channel", relayed)
    frame = await client.receive()
    assert ChannelData.decode(frame) == ChannelData(0x4001, b"back on channel")


def test_udp_relay_send_data_and_channels() -> None:
    async def scenario() -> None:
        async with serving() as server:
            client = await RawClient.udp(server.udp_addresses[0])
            peer = await Peer.open()
            try:
                await relay_round_trip(client, peer)
                assert server.core.stats.packets_to_peers == 2
                assert server.core.stats.packets_to_clients == 2
            finally:
                client.close()
                peer.close()

    run(scenario())


def test_tcp_relay_send_data_and_padded_channels() -> None:
    async def scenario() -> None:
        deleted: asyncio.Future[AllocationDeleted] = asyncio.get_running_loop().create_future()

        def on_event(event: TurnEvent) -> None:
            if isinstance(event, AllocationDeleted) and not deleted.done():
                deleted.set_result(event)

        async with serving(on_event) as server:
            client = await RawClient.stream(server.tcp_addresses[0])
            peer = await Peer.open()
            try:
                await relay_round_trip(client, peer)
                assert server.core.allocation_count == 1
            finally:
                client.close()
                peer.close()
            event = await asyncio.wait_for(deleted, TIMEOUT)  # closing the connection ...
            assert event.reason == "connection closed"
            assert server.core.allocation_count == 0  # ... deleted the allocation
            assert server.core.relay_ports_in_use == 0

    run(scenario())


def test_ipv6_relay() -> None:
    async def scenario() -> None:
        async with serving(
            listen=(("::1", 0),), relay_ips=("::1",), allow_peers=("::1/128",)
        ) as server:
            client = await RawClient.udp(server.udp_addresses[0])
            peer = await Peer.open("::1")
            try:
                response = await client.allocate(RequestedAddressFamily(AddressFamily.IPV6))
                assert relayed_of(response)[0] == "::1"
                assert (await client.request(Method.REFRESH, [Lifetime(0)])).error is None
                await relay_round_trip(client, peer, RequestedAddressFamily(AddressFamily.IPV6))
            finally:
                client.close()
                peer.close()

    run(scenario())


def test_no_byte_reaches_a_forbidden_peer() -> None:
    """The default policy refuses loopback peers: 403, and nothing arrives."""

    async def scenario() -> None:
        async with serving(allow_peers=(), deny_peers=()) as server:
            client = await RawClient.udp(server.udp_addresses[0])
            forbidden = await Peer.open()
            try:
                relayed = relayed_of(await client.allocate())
                assert (await client.permit(forbidden.address)).error.code == 403  # type: ignore[union-attr]
                assert (await client.bind(0x4000, forbidden.address)).error.code == 403  # type: ignore[union-attr]
                client.send_indication(forbidden.address, b"must not arrive")
                client.send(ChannelData(0x4000, b"nor this").encode())
                await client.ping()  # the server has handled everything sent before
                assert forbidden.nothing_received()
                # and the forbidden address cannot reach the client through the relay
                forbidden.send(b"inbound", relayed)
                await client.ping()
                assert not client.pending and client.inbox.empty()
            finally:
                client.close()
                forbidden.close()

    run(scenario())


def test_deny_peer_beats_allow_peer_for_a_narrower_block() -> None:
    async def scenario() -> None:
        async with serving(deny_peers=("127.0.0.2/32",)) as server:
            client = await RawClient.udp(server.udp_addresses[0])
            allowed, denied = await Peer.open("127.0.0.1"), await Peer.open("127.0.0.2")
            try:
                await client.allocate()
                assert (await client.permit(denied.address)).error.code == 403  # type: ignore[union-attr]
                assert (await client.permit(allowed.address)).error is None
                client.send_indication(denied.address, b"no")
                client.send_indication(allowed.address, b"yes")
                assert (await allowed.receive())[0] == b"yes"
                await client.ping()
                assert denied.nothing_received()
            finally:
                client.close()
                allowed.close()
                denied.close()

    run(scenario())


def test_even_port_reservation_holds_the_next_port() -> None:
    async def scenario() -> None:
        async with serving() as server:
            first = await RawClient.udp(server.udp_addresses[0])
            second = await RawClient.udp(server.udp_addresses[0])
            try:
                response = await first.allocate(EvenPort(reserve=True))
                ip, port = relayed_of(response)
                assert port % 2 == 0
                token = response.get(ReservationToken)
                assert token is not None
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with pytest.raises(OSError):  # the server holds port N+1 for the token
                    probe.bind((ip, port + 1))
                probe.close()
                assert relayed_of(await second.allocate(token)) == (ip, port + 1)
            finally:
                first.close()
                second.close()

    run(scenario())


def test_one_unreachable_peer_does_not_stop_relaying_to_others() -> None:
    async def scenario() -> None:
        async with serving() as server:
            client = await RawClient.udp(server.udp_addresses[0])
            peer = await Peer.open()
            gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            gone.bind(("127.0.0.1", 0))
            gone_address: Address = gone.getsockname()
            gone.close()  # its port now answers ICMP port unreachable
            try:
                relayed = relayed_of(await client.allocate())
                await client.permit(peer.address, gone_address)
                for n in range(5):
                    client.send_indication(gone_address, b"into the void %d" % n)
                    client.send_indication(peer.address, b"still here %d" % n)
                    assert await peer.receive() == (b"still here %d" % n, relayed)
            finally:
                client.close()
                peer.close()

    run(scenario())


# -- the command line -------------------------------------------------------------------------


class Command:
    """``tsunagu turn-server`` in a subprocess."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tsunagu", "turn-server", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.line = self._read_line()

    def _read_line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)
        if not ready:
            self.proc.kill()
            raise AssertionError("turn-server printed nothing within 15 s")
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=5)
            raise AssertionError(f"turn-server exited {self.proc.returncode}: {err}")
        return line

    def address(self, kind: str) -> Address:
        match = re.search(rf"{kind} (\[[0-9a-f:]+\]|[0-9.]+):(\d+)", self.line)
        assert match, self.line
        return match.group(1).strip("[]"), int(match.group(2))

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Read stderr until a line containing ``needle`` (bounded by ``timeout``)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.proc.stderr], [], [], remaining)
            if not ready:
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            if needle in line:
                return line
        raise AssertionError(f"no log line with {needle!r} within {timeout} s")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def command() -> Iterator[Callable[..., Command]]:
    started: list[Command] = []

    def start(*args: str) -> Command:
        started.append(Command(*args))
        return started[-1]

    yield start
    for cmd in started:
        if cmd.proc.poll() is None:
            cmd.proc.kill()
            cmd.proc.wait()
        for stream in (cmd.proc.stdout, cmd.proc.stderr):
            if stream is not None:
                stream.close()


def base_args() -> list[str]:
    first, last = relay_range()
    return [
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--min-port",
        str(first),
        "--max-port",
        str(last),
        "--realm",
        REALM,
        "--user",
        f"{USER}:{PASSWORD}",
        "--allow-peer",
        "127.0.0.0/8",
    ]


def test_command_relays_and_exits_0_on_sigterm(command: Callable[..., Command]) -> None:
    cmd = command(*base_args(), "--drain-timeout", "0")
    assert cmd.line.startswith("listening udp 127.0.0.1:")
    assert "tcp 127.0.0.1:" in cmd.line and "relay 127.0.0.1" in cmd.line

    async def scenario() -> None:
        client = await RawClient.udp(cmd.address("udp"))
        peer = await Peer.open()
        try:
            await relay_round_trip(client, peer)
        finally:
            client.close()
            peer.close()

    run(scenario())
    assert cmd.terminate() == 0


def test_command_drains_on_sigterm(command: Callable[..., Command]) -> None:
    """After SIGTERM existing allocations keep relaying, new ones get 508, and the server
    exits 0 as soon as the last allocation is gone."""
    cmd = command(*base_args(), "--drain-timeout", "20")

    async def scenario() -> None:
        server = cmd.address("udp")
        client = await RawClient.udp(server)
        peer = await Peer.open()
        try:
            relayed = relayed_of(await client.allocate())
            await client.permit(peer.address)
            cmd.proc.send_signal(signal.SIGTERM)
            cmd.wait_for_log("draining")  # the server has seen the signal
            late = await RawClient.udp(server)
            try:
                refused = await late.allocate()
                assert refused.error is not None and refused.error.code == 508
            finally:
                late.close()
            client.send_indication(peer.address, b"still relaying")
            assert await peer.receive() == (b"still relaying", relayed)
            started = time.monotonic()
            assert (await client.request(Method.REFRESH, [Lifetime(0)])).error is None
            assert cmd.proc.wait(10) == 0
            assert time.monotonic() - started < 10  # well before the 20 s drain timeout
        finally:
            client.close()
            peer.close()

    run(scenario())


def test_command_reads_a_toml_config_and_users_file(
    command: Callable[..., Command], tmp_path: Path
) -> None:
    first, last = relay_range()
    users = tmp_path / "users"
    users.write_text(f"# users\n{USER}:{PASSWORD}\n")
    config = tmp_path / "turn.toml"
    config.write_text(
        f"""
listen = ["127.0.0.1:0"]
relay-ip = "127.0.0.1"
min-port = {first}
max-port = {last}
realm = "{REALM}"
users-file = "{users}"
allow-peer = ["127.0.0.0/8"]
drain-timeout = 0
"""
    )
    cmd = command("--config", str(config))

    async def scenario() -> None:
        client = await RawClient.stream(cmd.address("tcp"))
        try:
            ip, port = relayed_of(await client.allocate())
            assert ip == "127.0.0.1" and first <= port <= last
        finally:
            client.close()

    run(scenario())
    assert cmd.terminate() == 0


def test_command_tls(command: Callable[..., Command], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    cmd = command(
        *base_args(), "--tls-listen", "127.0.0.1:0", "--cert", str(cert), "--key", str(key)
    )
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    async def scenario() -> None:
        client = await RawClient.stream(cmd.address("tls"), context)
        peer = await Peer.open()
        try:
            await relay_round_trip(client, peer)
        finally:
            client.close()
            peer.close()

    run(scenario())
    assert cmd.terminate() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1:0"], "no credentials"),
        (["--user", "a:b", "--min-port", "9", "--max-port", "8"], "bad relay port range"),
        (["--user", "a:b", "--listen", "127.0.0.1:0", "--allow-peer", "10.0.0.1/8"], "CIDR"),
        (["--user", "nocolon", "--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1"], "NAME"),
    ],
)
def test_command_rejects_bad_configuration(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tsunagu", "turn-server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "listening" not in proc.stdout


def test_command_reloads_users_and_policy_on_sighup(
    command: Callable[..., Command], tmp_path: Path
) -> None:
    first, last = relay_range()
    users = tmp_path / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    config = tmp_path / "turn.toml"

    def write_config(allow: str) -> None:
        config.write_text(
            f"""
listen = ["127.0.0.1:0"]
relay-ip = "127.0.0.1"
min-port = {first}
max-port = {last}
realm = "{REALM}"
users-file = "{users}"
allow-peer = [{allow}]
drain-timeout = 0
"""
        )

    write_config('"127.0.0.0/8"')
    cmd = command("--config", str(config))

    async def scenario() -> None:
        client = await RawClient.udp(cmd.address("udp"))
        peer = await Peer.open()
        try:
            relayed = relayed_of(await client.allocate())
            await client.permit(peer.address)
            client.send_indication(peer.address, b"before")
            assert await peer.receive() == (b"before", relayed)
            # alice is removed, and loopback peers are refused again
            users.write_text("bob:builder\n")
            write_config("")
            cmd.proc.send_signal(signal.SIGHUP)
            line = cmd.wait_for_log("reloaded")
            assert "users=1" in line and "dropped=1" in line
            client.send_indication(peer.address, b"after")
            refresh = await client.request(Method.REFRESH, [])
            assert refresh.error is not None and refresh.error.code == 401  # alice is gone
            assert peer.nothing_received()  # the permission went with the policy
        finally:
            client.close()
            peer.close()

    run(scenario())
    assert cmd.terminate() == 0


# -- RFC 6062 TCP allocations -------------------------------------------------------------


class DataConnection:
    """An RFC 6062 client data connection: ConnectionBind, then raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def bind(cls, control: RawClient, connection_id: int) -> DataConnection:
        reader, writer = await asyncio.open_connection(*control.server)
        assert control.nonce is not None
        attrs = [
            ConnectionId(connection_id),
            Username(USER),
            Realm(REALM),
            Nonce(control.nonce),
        ]
        request = Message(Method.CONNECTION_BIND, MessageClass.REQUEST, b"B" * 12, attrs)
        writer.write(request.encode(control.key))
        head = await asyncio.wait_for(reader.readexactly(20), TIMEOUT)
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[2:4])), TIMEOUT)
        response = Message.decode(head + body)
        assert response.method == Method.CONNECTION_BIND and response.error is None, response
        return cls(reader, writer)

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    def close(self) -> None:
        self.writer.close()


class TcpPeer:
    """A TCP server standing for a peer; remembers its connections."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.server: asyncio.Server | None = None
        self.address: Address = ("", 0)

    async def start(self, ip: str = "127.0.0.1") -> TcpPeer:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections.put_nowait((reader, writer))

        self.server = await asyncio.start_server(accept, ip, 0)
        name = self.server.sockets[0].getsockname()
        self.address = (name[0], name[1])
        return self

    async def accepted(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.connections.get(), TIMEOUT)

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def test_tcp_allocation_connect_and_connection_bind() -> None:
    """RFC 6062 §4.3: the client connects to a peer through its TCP relay."""

    async def scenario() -> None:
        async with serving() as server:
            control = await RawClient.stream(server.tcp_addresses[0])
            peer = await TcpPeer().start()
            data: DataConnection | None = None
            try:
                relayed = relayed_of(
                    await control.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])
                )
                refused = await control.request(Method.CONNECT, [XorPeerAddress(peer.address)])
                assert refused.error is not None and refused.error.code == 403  # no permission
                assert (await control.permit(peer.address)).error is None
                response = await control.request(Method.CONNECT, [XorPeerAddress(peer.address)])
                assert response.error is None, response
                connection_id = response.get(ConnectionId)
                assert connection_id is not None
                peer_reader, peer_writer = await peer.accepted()
                assert peer_writer.get_extra_info("peername")[:2] == relayed  # from the relay
                peer_writer.write(b"early bytes ")  # before ConnectionBind: held (§5.4)
                await peer_writer.drain()
                data = await DataConnection.bind(control, connection_id.value)
                assert await data.read(12) == b"early bytes "
                data.writer.write(b"to the peer")
                assert await asyncio.wait_for(peer_reader.readexactly(11), TIMEOUT) == (
                    b"to the peer"
                )
                peer_writer.write(b"to the client")
                assert await data.read(13) == b"to the client"
                # §5.5: the peer closing closes the data connection
                peer_writer.close()
                assert await asyncio.wait_for(data.reader.read(), TIMEOUT) == b""
            finally:
                if data is not None:
                    data.close()
                control.close()
                peer.close()

    run(scenario())


def test_tcp_allocation_accepts_a_peer_connection() -> None:
    """RFC 6062 §4.4: a peer connects to the relayed address; ConnectionAttempt."""

    async def scenario() -> None:
        async with serving() as server:
            control = await RawClient.stream(server.tcp_addresses[0])
            data: DataConnection | None = None
            writer: asyncio.StreamWriter | None = None
            try:
                relayed = relayed_of(
                    await control.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])
                )
                # without a permission the relay refuses the peer
                reader, writer = await asyncio.open_connection(*relayed)
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
                writer.close()
                await control.permit(("127.0.0.1", 0))
                reader, writer = await asyncio.open_connection(*relayed)
                attempt = Message.decode(await control.receive())
                assert attempt.method == Method.CONNECTION_ATTEMPT
                peer_address = writer.get_extra_info("sockname")[:2]
                assert attempt.get(XorPeerAddress) == XorPeerAddress(peer_address)
                connection_id = attempt.get(ConnectionId)
                assert connection_id is not None
                data = await DataConnection.bind(control, connection_id.value)
                writer.write(b"hello client")
                assert await data.read(12) == b"hello client"
                data.writer.write(b"hello peer")
                assert await asyncio.wait_for(reader.readexactly(10), TIMEOUT) == b"hello peer"
                # §5.5: the client data connection closing closes the peer's
                data.close()
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            finally:
                if writer is not None:
                    writer.close()
                control.close()

    run(scenario())


def test_connect_to_a_forbidden_peer_never_opens_a_connection() -> None:
    async def scenario() -> None:
        async with serving(allow_peers=()) as server:
            control = await RawClient.stream(server.tcp_addresses[0])
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            listener.setblocking(False)
            target: Address = listener.getsockname()
            try:
                relayed_of(
                    await control.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])
                )
                assert (await control.permit(target)).error.code == 403  # type: ignore[union-attr]
                refused = await control.request(Method.CONNECT, [XorPeerAddress(target)])
                assert refused.error is not None and refused.error.code == 403
                await control.ping()
                with pytest.raises(BlockingIOError):
                    listener.accept()  # no SYN ever reached the forbidden listener
            finally:
                control.close()
                listener.close()

    run(scenario())


def test_connect_to_a_closed_port_is_447() -> None:
    async def scenario() -> None:
        async with serving() as server:
            control = await RawClient.stream(server.tcp_addresses[0])
            closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            closed.bind(("127.0.0.1", 0))
            target: Address = closed.getsockname()
            closed.close()
            try:
                await control.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_TCP)])
                await control.permit(target)
                response = await control.request(Method.CONNECT, [XorPeerAddress(target)])
                assert response.error is not None and response.error.code == 447
            finally:
                control.close()

    run(scenario())
