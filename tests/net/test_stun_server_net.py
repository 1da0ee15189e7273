"""The asyncio STUN server over real loopback sockets: UDP, TCP and TLS on 127.0.0.1 and
::1, RFC 5780 with 127.0.0.1 and 127.0.0.2, abuse handling, and the ``tsunagu stun-server``
command (readiness line, SIGTERM, --config, --workers).

Every wait is bounded by a timeout and waits for an event (a datagram, a line, an exit);
nothing sleeps in place of waiting.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVarTuple

import pytest

from tsunagu import SOFTWARE
from tsunagu.address import parse_address
from tsunagu.aio.loop import run as run_uvloop
from tsunagu.aio.stun_server import StunServer
from tsunagu.stun import Message, MessageClass, Method, new_transaction_id
from tsunagu.stun.attributes import (
    Address,
    ChangeRequest,
    ErrorCodeAttr,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    XorMappedAddress,
)
from tsunagu.stun.server_config import StunServerConfig

TIMEOUT = 5.0  # seconds any single wait may take before the test fails
V4: Address = ("127.0.0.1", 0)
V6: Address = ("::1", 0)


def request(*attributes: Any, tid: bytes | None = None) -> Message:
    return Message(
        Method.BINDING, MessageClass.REQUEST, tid or new_transaction_id(), list(attributes)
    )


def udp_socket(ip: str = "127.0.0.1") -> socket.socket:
    """A plain non-blocking socket, read synchronously (what is in its buffer is there)."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


class UdpClient(asyncio.DatagramProtocol):
    """A client socket on the running loop (uvloop has no loop.sock_sendto/recvfrom)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, ip: str = "127.0.0.1") -> UdpClient:
        _, client = await asyncio.get_running_loop().create_datagram_endpoint(
            cls, local_addr=(ip, 0)
        )
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait((data, (addr[0], addr[1])))

    @property
    def address(self) -> Address:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return (name[0], name[1])

    def send(self, data: bytes, destination: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, destination)

    async def exchange(self, server: Address, message: Message) -> tuple[Message, Address]:
        """Send ``message``; wait for the datagram answering it (ignoring any other)."""
        self.send(message.encode(fingerprint=True), server)
        async with asyncio.timeout(TIMEOUT):
            while True:
                data, source = await self.received.get()
                reply = Message.decode(data)
                if reply.transaction_id == message.transaction_id:
                    return reply, source

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp_exchange(
    server: Address, message: Message, client: UdpClient | None = None
) -> tuple[Message, Address]:
    own = client is None
    client = client or await UdpClient.open(server[0])
    try:
        return await client.exchange(server, message)
    finally:
        if own:
            client.close()


async def stream_exchange(
    server: Address, messages: list[Message], tls: ssl.SSLContext | None = None
) -> tuple[list[Message], Address]:
    """Send ``messages`` in one write on a new connection; read one reply each."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(server[0], server[1], ssl=tls), TIMEOUT
    )
    try:
        writer.write(b"".join(m.encode(fingerprint=True) for m in messages))
        replies = []
        async with asyncio.timeout(TIMEOUT):
            for _ in messages:
                head = await reader.readexactly(20)
                body = await reader.readexactly(struct.unpack_from("!H", head, 2)[0])
                replies.append(Message.decode(head + body))
        sockname = writer.get_extra_info("sockname")
        return replies, (sockname[0], sockname[1])
    finally:
        writer.close()


def mapped(reply: Message) -> Address:
    assert reply.message_class is MessageClass.SUCCESS, reply
    xma = reply.get(XorMappedAddress)
    assert xma is not None
    return xma.address


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


# -- in-process server ---------------------------------------------------------------------------


def test_udp_and_tcp_on_ipv4_and_ipv6() -> None:
    async def main() -> None:
        config = StunServerConfig(listen=(V4, V6), rate_limit=0)
        async with await StunServer.start(config) as server:
            assert len(server.udp_addresses) == 2 and len(server.tcp_addresses) == 2
            for udp, tcp in zip(server.udp_addresses, server.tcp_addresses, strict=True):
                assert udp == tcp and udp[1] != 0  # one ephemeral port for UDP and TCP
            assert server.config.listen == tuple(server.udp_addresses)
            for address in server.udp_addresses:
                client = await UdpClient.open(address[0])
                try:
                    reply, source = await client.exchange(address, request())
                    assert mapped(reply) == client.address
                    assert source == address
                    assert reply.get(Software) == Software(SOFTWARE)
                finally:
                    client.close()
                replies, local = await stream_exchange(address, [request(), request()])
                assert [mapped(r) for r in replies] == [local, local]
            line = server.listening_line()
            assert line.startswith("listening udp 127.0.0.1:")
            assert f"tcp [::1]:{server.tcp_addresses[1][1]}" in line

    run(main)


def test_uvloop_driver() -> None:
    async def main() -> None:
        async with await StunServer.start(StunServerConfig(listen=(V4,))) as server:
            assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            client = await UdpClient.open()
            try:
                reply, _ = await client.exchange(server.udp_addresses[0], request())
                assert mapped(reply) == client.address
            finally:
                client.close()
            replies, local = await stream_exchange(server.tcp_addresses[0], [request()])
            assert mapped(replies[0]) == local

    run_uvloop(asyncio.wait_for(main(), 30))


_Ts = TypeVarTuple("_Ts")


class _LoopWithoutAddReader(asyncio.SelectorEventLoop):
    """Stands in for Windows' proactor loop, which has no add_reader."""

    def add_reader(self, fd: Any, callback: Callable[[*_Ts], object], *args: *_Ts) -> None:
        raise NotImplementedError


def test_datagram_protocol_fallback() -> None:
    """On loops without add_reader, UDP goes through a DatagramProtocol: same answers."""

    async def main() -> None:
        config = StunServerConfig(listen=(V4,), other=("127.0.0.2", 0), rate_limit=0)
        async with await StunServer.start(config) as server:
            primary, other = server.udp_addresses[0], server.config.other
            client = await UdpClient.open()
            try:
                reply, came_from = await client.exchange(primary, request())
                assert mapped(reply) == client.address and came_from == primary
                reply, came_from = await client.exchange(
                    primary, request(ChangeRequest(True, True))
                )
                assert came_from == other
            finally:
                client.close()
        # Without RFC 5780, the fast path answers.
        async with await StunServer.start(StunServerConfig(listen=(V4,))) as server:
            assert server.core.fast_path_ok(server.udp_addresses[0])
            reply, _ = await udp_exchange(server.udp_addresses[0], request())
            assert reply.message_class is MessageClass.SUCCESS

    with asyncio.Runner(loop_factory=_LoopWithoutAddReader) as runner:
        runner.run(asyncio.wait_for(main(), 30))


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and ::1 (openssl: no new
    dependency; the `cryptography` package is not installed)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,IP:::1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def test_tls_on_ipv4_and_ipv6(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    client = ssl.create_default_context(cafile=str(cert))  # verifies chain and IP SAN

    async def main() -> None:
        config = StunServerConfig(
            listen=(), tls_listen=(V4, V6), cert=str(cert), key=str(key), rate_limit=0
        )
        async with await StunServer.start(config) as server:
            assert server.udp_addresses == [] and len(server.tls_addresses) == 2
            for address in server.tls_addresses:
                replies, local = await stream_exchange(address, [request(), request()], client)
                assert [mapped(r) for r in replies] == [local, local]
            assert "tls 127.0.0.1:" in server.listening_line()

    run(main)


def test_rfc5780_change_request_and_response_port() -> None:
    async def main() -> None:
        config = StunServerConfig(listen=(V4,), other=("127.0.0.2", 0), rate_limit=0)
        async with await StunServer.start(config) as server:
            primary = server.udp_addresses[0]
            other = server.config.other
            assert other is not None and other[1] not in (0, primary[1])
            a1, p1 = primary
            a2, p2 = other
            expected = {
                (False, False): (a1, p1),
                (True, False): (a2, p1),
                (False, True): (a1, p2),
                (True, True): (a2, p2),
            }
            for flags, source in expected.items():
                reply, came_from = await udp_exchange(primary, request(ChangeRequest(*flags)))
                assert came_from == source, flags
                assert reply.get(ResponseOrigin) == ResponseOrigin(source)
                assert reply.get(OtherAddress) == OtherAddress((a2, p2))
            # Mapping test II of RFC 5780 §4.3: to A2:P1, OTHER-ADDRESS is then A1:P2.
            reply, came_from = await udp_exchange((a2, p1), request())
            assert came_from == (a2, p1)
            assert reply.get(OtherAddress) == OtherAddress((a1, p2))
            # RESPONSE-PORT: asked from one socket, answered to another.
            asker, listener = await UdpClient.open(), await UdpClient.open()
            try:
                message = request(ResponsePort(listener.address[1]))
                asker.send(message.encode(), primary)
                async with asyncio.timeout(TIMEOUT):
                    data, came_from = await listener.received.get()
                reply = Message.decode(data)
                assert reply.transaction_id == message.transaction_id
                assert mapped(reply) == asker.address and came_from == primary
                assert asker.received.empty()
            finally:
                asker.close()
                listener.close()
            # Over TCP, CHANGE-REQUEST flags cannot be honoured: 420.
            replies, _ = await stream_exchange(primary, [request(ChangeRequest(True, True))])
            error = replies[0].get(ErrorCodeAttr)
            assert error is not None and error.code == 420

    run(main)


def test_malformed_flood_then_valid_request_is_answered() -> None:
    """2000 datagrams of junk and broken STUN from one source, at the default rate limit
    (burst 200): none is answered or charged, and every real request is still answered."""
    rng = random.Random(5780)
    valid = request().encode(fingerprint=True)
    junk = [
        rng.randbytes(rng.randrange(0, 200)),
        valid[:-1] + bytes([valid[-1] ^ 1]),  # bad FINGERPRINT
        valid[:22],  # truncated
        b"\x00\x11" + valid[2:],  # an indication
        b"\x01\x01" + valid[2:],  # a success response
        b"\x16\xfe\xfd" + rng.randbytes(60),  # DTLS
    ]

    async def main() -> None:
        async with await StunServer.start(StunServerConfig(listen=(V4,))) as server:
            address = server.udp_addresses[0]
            client = await UdpClient.open()
            try:
                # In rounds of 100, each closed by a real request, so the flood never
                # overflows the server's socket buffer (that would test the kernel, not us).
                for i in range(2000):
                    data = junk[i % len(junk)] if i % 7 else rng.randbytes(rng.randrange(200))
                    client.send(data, address)
                    if i % 100 == 99:
                        reply, _ = await client.exchange(address, request())
                        assert mapped(reply) == client.address
                        assert client.received.empty()  # the junk got no answer
            finally:
                client.close()

    run(main)


def test_rate_limit_drops_the_excess() -> None:
    async def main() -> None:
        config = StunServerConfig(listen=(V4,), rate_limit=0.001, rate_burst=3)
        async with await StunServer.start(config) as server:
            address = server.udp_addresses[0]
            flooder, witness = udp_socket(), await UdpClient.open("127.0.0.2")
            try:
                for _ in range(10):
                    flooder.sendto(request().encode(), address)
                # Datagrams on one server socket are handled in order: once the witness (a
                # source of its own) is answered, every flooder reply is in the flooder's
                # socket buffer (loopback delivers within sendto).
                await witness.exchange(address, request())
                answered = 0
                for _ in range(10):
                    try:
                        flooder.recv(2048)
                    except BlockingIOError:
                        break
                    answered += 1
                assert answered == 3  # the burst
            finally:
                flooder.close()
                witness.close()

    run(main)


def test_tcp_limits_idle_timeout_and_junk() -> None:
    async def main() -> None:
        config = StunServerConfig(listen=(V4,), max_connections=2, idle_timeout=0.3)
        async with await StunServer.start(config) as server:
            address = server.tcp_addresses[0]
            open_ = [await asyncio.open_connection(*address) for _ in range(2)]
            for reader, writer in open_:  # both accepted and served
                writer.write(request().encode())
                async with asyncio.timeout(TIMEOUT):
                    head = await reader.readexactly(20)
                    await reader.readexactly(struct.unpack_from("!H", head, 2)[0])
            assert server.connection_count == 2
            # A third connection is closed at once.
            reader, writer = await asyncio.open_connection(*address)
            async with asyncio.timeout(TIMEOUT):
                assert await _read_until_closed(reader) == b""
            writer.close()
            # Idle connections are closed after idle_timeout.
            for reader, writer in open_:
                async with asyncio.timeout(TIMEOUT):
                    assert await _read_until_closed(reader) == b""
                writer.close()
            async with asyncio.timeout(TIMEOUT):
                while server.connection_count:
                    await asyncio.sleep(0)  # yield until connection_lost ran (bounded)
            # Bytes that are not STUN framing close the connection.
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                assert await _read_until_closed(reader) == b""
            writer.close()

    run(main)


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except ConnectionResetError:
        return b""


# -- the command line ------------------------------------------------------------------------------


async def start_cli(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tsunagu",
        "stun-server",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), TIMEOUT * 2)).decode()
    except TimeoutError:
        process.kill()
        raise
    if not line:
        assert process.stderr is not None
        stderr = await process.stderr.read()
        await process.wait()
        pytest.fail(f"stun-server exited {process.returncode}: {stderr.decode()}")
    return process, line


def addresses_in(line: str, kind: str) -> list[Address]:
    assert line.startswith("listening "), line
    found = []
    for item in line.removeprefix("listening ").strip().split(", "):
        item_kind, _, text = item.partition(" ")
        if item_kind == kind:
            found.append(parse_address(text))
    return found


async def stop(process: asyncio.subprocess.Process, signum: int = signal.SIGTERM) -> int:
    process.send_signal(signum)
    try:
        return await asyncio.wait_for(process.wait(), TIMEOUT * 2)
    finally:
        if process.returncode is None:
            process.kill()


def test_cli_prints_listening_line_serves_and_exits_0_on_sigterm() -> None:
    async def main() -> None:
        process, line = await start_cli(
            "--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--software", "cli test"
        )
        try:
            udp = addresses_in(line, "udp")
            assert [ip for ip, _ in udp] == ["127.0.0.1", "::1"] and all(p for _, p in udp)
            assert addresses_in(line, "tcp") == udp
            for address in udp:
                client = await UdpClient.open(address[0])
                try:
                    reply, _ = await client.exchange(address, request())
                    assert mapped(reply) == client.address
                    assert reply.get(Software) == Software("cli test")
                finally:
                    client.close()
                replies, local = await stream_exchange(address, [request()])
                assert mapped(replies[0]) == local
        finally:
            assert await stop(process) == 0

    run(main)


def test_cli_exits_0_on_sigint_too() -> None:
    async def main() -> None:
        process, line = await start_cli("--listen", "127.0.0.1:0", "--no-software")
        try:
            reply, _ = await udp_exchange(addresses_in(line, "udp")[0], request())
            assert reply.get(Software) is None
        finally:
            assert await stop(process, signal.SIGINT) == 0

    run(main)


def test_cli_config_file_with_flag_override(tmp_path: Path) -> None:
    config = tmp_path / "stun.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\n'
        'other = "127.0.0.2:0"\n'
        'software = "from the file"\n'
        "rate-limit = 0\n"
    )

    async def main() -> None:
        process, line = await start_cli("--config", str(config), "--software", "from a flag")
        try:
            primary = addresses_in(line, "udp")[0]
            reply, _ = await udp_exchange(primary, request())
            assert reply.get(Software) == Software("from a flag")  # the flag wins
            other = reply.get(OtherAddress)  # the file's RFC 5780 setting applies
            assert other is not None and other.address[0] == "127.0.0.2"
            assert other.address in addresses_in(line, "udp")
        finally:
            assert await stop(process) == 0

    run(main)


def test_cli_rejects_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "stun.toml"
    config.write_text('listen = ["127.0.0.1:0"]\nlisten-port = 3478\n')
    cases = [
        (["--config", str(config)], "unknown setting(s) listen-port"),
        (["--config", str(tmp_path / "missing.toml")], "missing.toml"),
        (["--listen", "localhost:3478"], "not an IP address"),
        (["--listen", "127.0.0.1:0", "--other", "127.0.0.1:5"], "second IP"),
        (["--tls-listen", "127.0.0.1:0"], "needs cert and key"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "tsunagu", "stun-server", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stdout == ""


def test_cli_exits_1_when_the_port_is_taken() -> None:
    taken = udp_socket()
    try:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "tsunagu", "stun-server", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        taken.close()
    assert result.returncode == 1
    assert f"cannot bind udp 127.0.0.1:{port}" in result.stderr


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc: no psutil needed)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def test_cli_workers_share_the_ports_and_stop_on_sigterm() -> None:
    async def main() -> None:
        process, line = await start_cli(
            "--listen", "127.0.0.1:0", "--workers", "2", "--rate-limit", "0"
        )
        try:
            workers = _children(process.pid)
            assert len(workers) == 2
            udp = addresses_in(line, "udp")[0]
            assert addresses_in(line, "tcp") == [udp]
            # Many sources, so SO_REUSEPORT's hash spreads them over both workers.
            for _ in range(20):
                client = await UdpClient.open()
                try:
                    reply, _ = await client.exchange(udp, request())
                    assert mapped(reply) == client.address
                finally:
                    client.close()
            replies, local = await stream_exchange(udp, [request()])
            assert mapped(replies[0]) == local
        finally:
            assert await stop(process) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)

    run(main)


def test_cli_supervisor_replaces_a_dead_worker() -> None:
    async def main() -> None:
        process, line = await start_cli(
            "--listen", "127.0.0.1:0", "--workers", "2", "--rate-limit", "0"
        )
        try:
            victim = min(_children(process.pid))
            os.kill(victim, signal.SIGKILL)
            # The supervisor says so on stderr when it starts the replacement.
            assert process.stderr is not None
            async with asyncio.timeout(TIMEOUT):
                while True:
                    text = (await process.stderr.readline()).decode()
                    assert text, "stun-server closed stderr"
                    if f"worker {victim} exited; starting another" in text:
                        break
                # and the replacement says when it listens
                while "listening udp" not in text:
                    text = (await process.stderr.readline()).decode()
                    assert text, "stun-server closed stderr"
            workers = _children(process.pid)
            assert len(workers) == 2 and victim not in workers
            udp = addresses_in(line, "udp")[0]
            for _ in range(20):  # spread over both workers by SO_REUSEPORT
                reply, _ = await udp_exchange(udp, request())
                assert reply.message_class is MessageClass.SUCCESS
        finally:
            assert await stop(process) == 0

    run(main)
