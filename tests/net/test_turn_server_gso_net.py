"""UDP GSO in the TURN server's relay path (Linux UDP_SEGMENT), over real loopback sockets.

The server (:class:`tsunagu.aio.turn_server.TurnServer`) runs in the test's event loop. The
client and the peers are plain non-blocking sockets, so that a test sends a whole burst
without yielding to the loop: the server then reads it in one batch and sends what it
relays in GSO runs (one ``sendmsg`` for a run of equal-size datagrams to one destination).
Every datagram must still arrive intact, once, and in order per flow -- with GSO, with GSO
off, and when the kernel refuses it -- and the core must count each one as before.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio import turn_server as turn_server_module
from tsunagu.aio.turn_server import TurnServer
from tsunagu.stun.attributes import (
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    Lifetime,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import TRANSPORT_UDP, AddressFamily, MessageClass, Method
from tsunagu.stun.credentials import long_term_key
from tsunagu.stun.framing import ChannelData
from tsunagu.stun.message import Message
from tsunagu.turn.transport import Address

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import asynctest_within  # noqa: E402
from loopback_servers import PASSWORD, USER, turn_server  # noqa: E402

REALM = "tsunagu.test"  # start_turn_server's realm
WAIT = 5.0
asynctest = asynctest_within(30)

IPV6: dict[str, Any] = {
    "listen": (("::1", 0),),
    "relay_ips": ("::1",),
    "allow_peers": ("::1/128",),
}


def payload(flow: int, seq: int, size: int) -> bytes:
    """``size`` bytes that differ per flow and sequence number (a cut or a swap shows)."""
    return (bytes([flow, seq]) + bytes([(seq * 7 + flow * 31) & 0xFF]) * size)[:size]


def interleave(*flows: list[Any]) -> list[Any]:
    """One item of each flow in turn (each flow's order kept), as flows share a socket."""
    return [item for row in itertools.zip_longest(*flows) for item in row if item is not None]


def udp_socket(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((ip, 0))
    return sock


def address(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return name[0], name[1]


class Client:
    """A UDP TURN client on a plain socket (long-term credentials, RFC 8489 §9.2)."""

    def __init__(self, server: Address) -> None:
        self.sock = udp_socket(server[0])
        self.sock.connect(server)
        self.nonce: str | None = None
        self.key = long_term_key(USER, REALM, PASSWORD)
        self._tids = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def message(self, method: int, attributes: Iterable[Attribute]) -> tuple[bytes, bytes]:
        """(transaction id, encoded request), signed once a nonce is known."""
        tid = next(self._tids).to_bytes(12, "big")
        attrs = list(attributes)
        key = None
        if self.nonce is not None:
            attrs += [Username(USER), Realm(REALM), Nonce(self.nonce)]
            key = self.key
        return tid, Message(method, MessageClass.REQUEST, tid, attrs).encode(key)

    async def request(self, method: int, attributes: Iterable[Attribute] = ()) -> Message:
        loop = asyncio.get_running_loop()
        attributes = list(attributes)
        for _ in range(3):  # unauthenticated, then with the nonce, then after a 438
            tid, data = self.message(method, attributes)
            self.sock.send(data)
            for _ in range(100):  # skip relayed data that is not our answer
                answer = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), WAIT)
                if answer[8:20] == tid:
                    break
            else:
                raise AssertionError("no answer")
            response = Message.decode(answer)
            error, nonce = response.error, response.get(Nonce)
            if error is not None and error.code in (401, 438) and nonce is not None:
                self.nonce = nonce.value
                continue
            assert error is None, response
            return response
        raise AssertionError("not authenticated")

    async def allocate(self, *attributes: Attribute) -> Address:
        response = await self.request(
            Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP), *attributes]
        )
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None
        return relayed.address

    async def bind(self, channel: int, peer: Address) -> None:
        await self.request(Method.CHANNEL_BIND, [ChannelNumber(channel), XorPeerAddress(peer)])

    async def permit(self, peer: Address) -> None:
        await self.request(Method.CREATE_PERMISSION, [XorPeerAddress(peer)])

    async def ping(self) -> None:
        """A Binding round trip: what was sent before it has been handled."""
        await self.request(Method.BINDING)


async def receive(sock: socket.socket, count: int) -> list[tuple[bytes, Address]]:
    """The next ``count`` datagrams on ``sock`` (bounded), then checks that no more came."""
    loop = asyncio.get_running_loop()
    got: list[tuple[bytes, Address]] = []
    for _ in range(count):
        data, source = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), WAIT)
        got.append((data, (source[0], source[1])))
    await asyncio.sleep(0.05)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)  # nothing duplicated, nothing extra
    return got


class Recorder:
    """Wraps an endpoint's ``sendmsg``: (destination, segment size, datagram sizes) of
    every GSO send, which the kernel then carries out."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, endpoint: Any) -> None:
        self.calls: list[tuple[Address, int, list[int]]] = []
        real = endpoint.sendmsg

        def sendmsg(buffers: list[bytes], ancillary: Any, flags: int, destination: Any) -> int:
            ((level, kind, value),) = ancillary
            assert (level, kind) == (socket.SOL_UDP, 103)  # UDP_SEGMENT
            size = int.from_bytes(value, sys.byteorder)
            self.calls.append(((destination[0], destination[1]), size, [len(b) for b in buffers]))
            result: int = real(buffers, ancillary, flags, destination)
            return result

        monkeypatch.setattr(endpoint, "sendmsg", sendmsg)

    def runs(self, destination: Address) -> list[list[int]]:
        return [sizes for to, _, sizes in self.calls if to == destination]

    def check_shapes(self) -> None:
        """What the kernel accepts as GSO: equal sizes but a shorter last one, none empty,
        at most 64 segments and 64 KiB."""
        for _, size, sizes in self.calls:
            assert 2 <= len(sizes) <= 64 and sum(sizes) <= 65507
            assert sizes[0] == size and all(s == size for s in sizes[:-1])
            assert 0 < sizes[-1] <= size


def gso() -> bool:
    return turn_server_module._gso_available()


@pytest.fixture(params=[True, False], ids=["gso", "no-gso"])
def use_gso(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The test runs twice: with UDP GSO where the kernel has it, and with it turned off
    (every relayed datagram then goes out with a sendto of its own)."""
    if not request.param:
        monkeypatch.setattr(turn_server_module, "_gso_available", lambda: False)
    return bool(request.param)


async def two_peers(
    server: TurnServer, ip: str, *allocate: Attribute
) -> tuple[Client, Address, socket.socket, socket.socket]:
    """A client with an allocation and channels 0x4000 and 0x4001 to two peers."""
    client = Client(server.udp_addresses[0])
    relayed = await client.allocate(*allocate)
    first, second = udp_socket(ip), udp_socket(ip)
    await client.bind(0x4000, address(first))
    await client.bind(0x4001, address(second))
    return client, relayed, first, second


# Sizes per flow: runs of equal sizes ended by a shorter datagram, a larger one, an empty
# one (never in a GSO run: it would vanish), and a datagram of 3 bytes.
FIRST_SIZES = [1000] * 10 + [700] + [1000] * 5 + [0] + [1000] * 3 + [1200] * 4 + [3]
FIRST_RUNS = [[1000] * 10 + [700], [1000] * 5, [1000] * 3, [1200] * 4 + [3]]
SECOND_SIZES = [500] * 20 + [1200] * 8
SECOND_RUNS = [[500] * 20, [1200] * 8]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@asynctest
async def test_turn_server_channel_data_burst_reaches_each_peer_intact_and_in_order(
    family: str, use_gso: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipv6 = family == "ipv6"
    ip = "::1" if ipv6 else "127.0.0.1"
    allocate = [RequestedAddressFamily(AddressFamily.IPV6)] if ipv6 else []
    async with turn_server(**(IPV6 if ipv6 else {})) as server:
        client, relayed, first, second = await two_peers(server, ip, *allocate)
        try:
            recorder = Recorder(monkeypatch, server._udp[relayed])
            stats = server.core.stats
            packets, octets = stats.packets_to_peers, stats.bytes_to_peers
            frames = interleave(
                [ChannelData(0x4000, payload(1, n, size)) for n, size in enumerate(FIRST_SIZES)],
                [ChannelData(0x4001, payload(2, n, size)) for n, size in enumerate(SECOND_SIZES)],
            )
            for frame in frames:  # one burst, read in one batch
                client.sock.send(frame.encode())
            expected_first = [payload(1, n, s) for n, s in enumerate(FIRST_SIZES)]
            expected_second = [payload(2, n, s) for n, s in enumerate(SECOND_SIZES)]
            assert await receive(first, len(FIRST_SIZES)) == [(p, relayed) for p in expected_first]
            assert await receive(second, len(SECOND_SIZES)) == [
                (p, relayed) for p in expected_second
            ]
            # The core checked and counted every datagram, as without GSO.
            assert stats.packets_to_peers - packets == len(frames)
            assert stats.bytes_to_peers - octets == sum(FIRST_SIZES) + sum(SECOND_SIZES)
            assert server.send_errors == 0
            if use_gso and gso():
                recorder.check_shapes()
                assert recorder.runs(address(first)) == FIRST_RUNS
                assert recorder.runs(address(second)) == SECOND_RUNS
            else:
                assert recorder.calls == []
        finally:
            client.close()
            first.close()
            second.close()


@asynctest
async def test_turn_server_gso_runs_stop_at_64_kib(monkeypatch: pytest.MonkeyPatch) -> None:
    async with turn_server() as server:
        client, relayed, peer, other = await two_peers(server, "127.0.0.1")
        try:
            recorder = Recorder(monkeypatch, server._udp[relayed])
            sizes = [1200] * 60 + [100] * 4  # 54 x 1200 B fill 64 KiB; 64: one batch
            for n, size in enumerate(sizes):
                client.sock.send(ChannelData(0x4000, payload(3, n, size)).encode())
            got = await receive(peer, len(sizes))
            assert [data for data, _ in got] == [payload(3, n, s) for n, s in enumerate(sizes)]
            if gso():
                recorder.check_shapes()
                assert recorder.runs(address(peer)) == [
                    [1200] * 54,
                    [1200] * 6 + [100],
                    [100] * 3,
                ]
        finally:
            client.close()
            peer.close()
            other.close()


@asynctest
async def test_turn_server_peer_bursts_reach_the_client_intact_and_in_order(
    use_gso: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peer -> client: ChannelData frames (not padded over UDP, RFC 8656 §12.5) and Data
    indications, in GSO runs from the listening socket."""
    async with turn_server() as server:
        client = Client(server.udp_addresses[0])
        relayed = await client.allocate()
        channelled, plain = udp_socket("127.0.0.1"), udp_socket("127.0.0.1")
        try:
            await client.bind(0x4000, address(channelled))
            await client.permit(address(plain))  # no channel: Data indications
            recorder = Recorder(monkeypatch, server._udp[server.udp_addresses[0]])
            packets = server.core.stats.packets_to_clients
            sizes = [800] * 10 + [300] + [800] * 4 + [0] + [800] * 2
            for n, size in enumerate(sizes):
                channelled.sendto(payload(4, n, size), relayed)
            got = await receive(client.sock, len(sizes))
            assert [ChannelData.decode(data) for data, _ in got] == [
                ChannelData(0x4000, payload(4, n, s)) for n, s in enumerate(sizes)
            ]
            if use_gso and gso():
                recorder.check_shapes()
                assert recorder.runs(address(client.sock)) == [
                    [804] * 10 + [304],
                    [804] * 4 + [4],  # an empty payload is a 4-byte frame: it may end a run
                    [804] * 2,
                ]
            else:
                assert recorder.calls == []
            # Two peers at once, one on a channel, one not: each one's order holds.
            mixed = interleave(
                [(channelled, payload(5, n, 600)) for n in range(20)],
                [(plain, payload(6, n, 600)) for n in range(20)],
            )
            for sock, data in mixed:
                sock.sendto(data, relayed)
            got = await receive(client.sock, len(mixed))
            on_channel = [ChannelData.decode(d).data for d, _ in got if d[0] == 0x40]
            indicated = [Message.decode(d) for d, _ in got if d[0] != 0x40]
            assert on_channel == [payload(5, n, 600) for n in range(20)]
            assert [m.get(Data) for m in indicated] == [Data(payload(6, n, 600)) for n in range(20)]
            assert all(m.get(XorPeerAddress) == XorPeerAddress(address(plain)) for m in indicated)
            assert server.core.stats.packets_to_clients - packets == len(sizes) + len(mixed)
            assert server.send_errors == 0
        finally:
            client.close()
            channelled.close()
            plain.close()


@pytest.mark.parametrize(
    ("code", "size", "stays"),
    [
        (errno.EIO, 1000, "off"),  # the route cannot segment (xfrm, no checksum offload)
        (errno.ENOPROTOOPT, 1000, "off"),  # a kernel without UDP_SEGMENT
        (errno.EINVAL, 1000, "off"),  # refused though small enough for any path
        (errno.EINVAL, 1300, "untried"),  # maybe only this path's MTU: GSO stays
        (errno.ENOBUFS, 1000, "untried"),  # a transient error says nothing about GSO
    ],
)
@asynctest
async def test_turn_server_gso_refused_falls_back_to_one_send_per_datagram(
    code: int, size: int, stays: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with turn_server() as server:
        client, relayed, peer, other = await two_peers(server, "127.0.0.1")
        try:
            endpoint = server._udp[relayed]
            tries: list[int] = []

            def refuse(*args: Any) -> int:
                tries.append(len(args[0]))
                raise OSError(code, "refused")

            monkeypatch.setattr(endpoint, "sendmsg", refuse)
            for burst in range(2):
                for n in range(10):
                    client.sock.send(ChannelData(0x4000, payload(7, n, size)).encode())
                got = await receive(peer, 10)
                assert got == [(payload(7, n, size), relayed) for n in range(10)], burst
            assert server.send_errors == 0
            if not gso():
                assert tries == []
                return
            state = {
                turn_server_module._GSO_OFF: "off",
                turn_server_module._GSO_UNTRIED: "untried",
            }[endpoint.gso]
            assert state == stays
            assert tries == ([10] if stays == "off" else [10, 10])  # off: never tried again
        finally:
            client.close()
            peer.close()
            other.close()


@asynctest
async def test_turn_server_batch_keeps_order_with_send_indications_and_a_refresh() -> None:
    """What the core handles outside the ChannelData fast path (a Send indication, a
    Refresh deleting the allocation) sees the ChannelData read before it already sent."""
    async with turn_server() as server:
        client, _, peer, other = await two_peers(server, "127.0.0.1")
        try:
            tid = b"\x09" * 12
            indication = Message(
                Method.SEND,
                MessageClass.INDICATION,
                tid,
                [XorPeerAddress(address(peer)), Data(payload(8, 99, 500))],
            ).encode()
            for n in range(5):
                client.sock.send(ChannelData(0x4000, payload(8, n, 500)).encode())
            client.sock.send(indication)
            for n in range(5, 8):
                client.sock.send(ChannelData(0x4000, payload(8, n, 500)).encode())
            got = await receive(peer, 9)
            expected = [payload(8, n, 500) for n in range(5)] + [payload(8, 99, 500)]
            expected += [payload(8, n, 500) for n in range(5, 8)]
            assert [data for data, _ in got] == expected
            # A Refresh with LIFETIME 0 in the middle of a burst: what came before it is
            # relayed, what follows is dropped (no allocation any more) and counted.
            dropped = server.core.stats.dropped_from_clients
            _, refresh = client.message(Method.REFRESH, [Lifetime(0)])
            for n in range(4):
                client.sock.send(ChannelData(0x4000, payload(9, n, 500)).encode())
            client.sock.send(refresh)
            for n in range(4, 7):
                client.sock.send(ChannelData(0x4000, payload(9, n, 500)).encode())
            got = await receive(peer, 4)
            assert [data for data, _ in got] == [payload(9, n, 500) for n in range(4)]
            assert server.core.allocation_count == 0
            assert server.core.stats.dropped_from_clients - dropped == 3
        finally:
            client.close()
            peer.close()
            other.close()


@pytest.mark.usefixtures("use_gso")
@asynctest
async def test_turn_server_gso_unreachable_peer_does_not_cost_another_peer_a_datagram() -> None:
    """ICMP port unreachable from one peer is reported on the relay socket's next send
    (IP_RECVERR), which may be a GSO send to another peer: that run is sent again, one
    datagram at a time; without GSO, the datagram is sent again. Nothing is lost."""
    async with turn_server() as server:
        client, relayed, live, gone = await two_peers(server, "127.0.0.1")
        gone.close()  # its port now answers ICMP port unreachable
        try:
            for burst in range(3):
                # First in the batch, a datagram to the unreachable peer: its ICMP error
                # is pending when the first send to the live peer is made.
                client.sock.send(ChannelData(0x4001, payload(11, burst, 900)).encode())
                for n in range(12):
                    client.sock.send(ChannelData(0x4000, payload(10, n, 900)).encode())
                got = await receive(live, 12)
                assert got == [(payload(10, n, 900), relayed) for n in range(12)], burst
                await client.ping()
            assert server.core.allocation_count == 1
        finally:
            client.close()
            live.close()


@asynctest
async def test_turn_server_send_indication_burst_goes_out_in_gso_runs_in_order(
    use_gso: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Send indications (RFC 8656 §11.2) batch like ChannelData: a burst to one peer leaves
    in GSO runs, every datagram intact and in order and counted by the core; one with
    DONT-FRAGMENT in the middle is sent on its own, after what came before it."""
    async with turn_server() as server:
        client = Client(server.udp_addresses[0])
        peer = udp_socket("127.0.0.1")
        try:
            relayed = await client.allocate()
            await client.permit(address(peer))
            recorder = Recorder(monkeypatch, server._udp[relayed])
            stats = server.core.stats
            packets = stats.packets_to_peers
            sizes = [800] * 12 + [300] + [800] * 6
            df_at = 15  # this one asks for DONT-FRAGMENT: it is sent by itself
            for n, size in enumerate(sizes):
                extra: list[Attribute] = [DontFragment()] if n == df_at else []
                indication = Message(
                    Method.SEND,
                    MessageClass.INDICATION,
                    n.to_bytes(12, "big"),
                    [XorPeerAddress(address(peer)), Data(payload(3, n, size)), *extra],
                )
                client.sock.send(indication.encode())
            got = await receive(peer, len(sizes))
            assert got == [(payload(3, n, size), relayed) for n, size in enumerate(sizes)]
            assert stats.packets_to_peers - packets == len(sizes)
            assert server.send_errors == 0
            if use_gso and gso():
                recorder.check_shapes()
                assert recorder.runs(address(peer)) == [[800] * 12 + [300], [800] * 2, [800] * 3]
            else:
                assert recorder.calls == []
        finally:
            client.close()
            peer.close()
