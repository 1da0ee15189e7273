"""RFC 6062 TCP allocations: tsunagu's TURN client against tsunagu's TURN server, on loopback.

The server runs in the test's event loop (:class:`tsunagu.aio.turn_server.TurnServer`); peers
are asyncio TCP servers and clients on loopback. Outgoing connections (Connect) and incoming
ones (ConnectionAttempt) are both bound on new data connections (ConnectionBind) and carry
bytes both ways; the coturn interop tests prove the same client against another server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from tsunagu.aio.turn_client import TurnClient, TurnTarget
from tsunagu.aio.turn_server import TurnServer
from tsunagu.errors import LocalProtocolError, TurnError
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import ClientState, TurnClientConfig
from tsunagu.turn.config import TurnServerConfig

USER, PASSWORD = "alice", "wonderland"
WAIT = 5.0
TCP = TurnClientConfig(requested_transport="tcp")
P = ParamSpec("P")
Address = tuple[str, int]


def asynctest(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return run


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with ``openssl req``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@contextlib.asynccontextmanager
async def turn_server(**overrides: Any) -> AsyncIterator[TurnServer]:
    settings: dict[str, Any] = {
        "listen": (("127.0.0.1", 0),),
        "relay_ips": ("127.0.0.1",),
        "users": (f"{USER}:{PASSWORD}",),
        "realm": "tsunagu.test",
        "allow_peers": ("127.0.0.0/8",),
        # Keep the relay port range clear of the ephemeral ports peers are given (Linux:
        # 32768-60999): the server refuses peers inside its own range (loop protection).
        "min_port": 61000,
        "max_port": 65535,
    }
    settings.update(overrides)
    server = await TurnServer.start(TurnServerConfig(**settings))
    try:
        yield server
    finally:
        await server.close()


class EchoPeer:
    """A TCP peer that echoes every byte back and records when each connection ended."""

    def __init__(self) -> None:
        self.ended: asyncio.Queue[Address] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.address: Address = ("", 0)

    async def start(self, host: str = "127.0.0.1") -> EchoPeer:
        self.server = await asyncio.start_server(self._serve, host, 0)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = writer.get_extra_info("peername")
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.ended.put_nowait((remote[0], remote[1]))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def echo_peer() -> AsyncIterator[EchoPeer]:
    peer = await EchoPeer().start()
    try:
        yield peer
    finally:
        peer.close()


def tcp_relay(server: TurnServer, **kwargs: Any) -> TurnClient:
    """A client for a TCP allocation (RFC 6062) over a TCP control connection."""
    return TurnClient(target(server), USER, PASSWORD, config=kwargs.pop("config", TCP), **kwargs)


def target(server: TurnServer, transport: str = "tcp") -> TurnTarget:
    addresses = server.tls_addresses if transport == "tls" else server.tcp_addresses
    return TurnTarget("127.0.0.1", addresses[0][1], transport)  # type: ignore[arg-type]


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), WAIT) == data


def closed_port() -> int:
    """A loopback TCP port nothing listens on: connecting there is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- outgoing: Connect (RFC 6062 §4.3) -------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_connect_peer_relays_bytes_both_ways(transport: str, tmp_path: Path) -> None:
    tls: dict[str, Any] = {}
    context = None
    if transport == "tls":
        cert, key = make_certificate(tmp_path)
        tls = {"tls_listen": (("127.0.0.1", 0),), "cert": str(cert), "key": str(key)}
        context = ssl.create_default_context(cafile=str(cert))
    async with turn_server(**tls) as server, echo_peer() as peer:
        turn = TurnClient(
            target(server, transport), USER, PASSWORD, config=TCP, ssl_context=context
        )
        async with turn:
            reader, writer = await turn.connect_peer(peer.address)
            assert isinstance(writer.transport, asyncio.Transport)
            # The data connection is a new connection to the same server address (§4.3).
            assert writer.get_extra_info("peername")[:2] == turn.server_address
            for i in range(5):
                await roundtrip(reader, writer, b"line %d\n" % i)
            # Bytes that look like STUN or ChannelData are the peer's too (§4.5).
            await roundtrip(reader, writer, bytes(range(256)) * 4)
            # A bulk transfer: flow control works through both relayed legs.
            await roundtrip(reader, writer, b"x" * (1 << 20))
            writer.close()
            await asyncio.wait_for(peer.ended.get(), WAIT)  # our close reached the peer
        assert turn.connection.state is ClientState.CLOSED


@asynctest
async def test_connect_errors_are_typed() -> None:
    async with turn_server() as server, echo_peer() as peer, tcp_relay(server) as turn:
        # 447: the server could not reach the peer (RFC 6062 §5.2).
        with pytest.raises(TurnError) as failed:
            await turn.connect_peer(("127.0.0.1", closed_port()))
        assert failed.value.code == 447
        # 446: a connection to this peer exists already (§5.2).
        reader, writer = await turn.connect_peer(peer.address)
        with pytest.raises(TurnError) as exists:
            await turn.connect_peer(peer.address)
        assert exists.value.code == 446
        await roundtrip(reader, writer, b"the first connection still works")
        # A UDP call on a TCP allocation is a local mistake, not a network error.
        with pytest.raises(LocalProtocolError):
            await turn.send_to(b"x", peer.address)
    async with (
        turn_server(allow_peers=()) as strict,
        echo_peer() as peer,
        tcp_relay(strict) as turn,
    ):
        # 403: loopback peers are refused by the default peer policy.
        with pytest.raises(TurnError) as refused:
            await turn.connect_peer(peer.address)
        assert refused.value.code == 403


@asynctest
async def test_tcp_allocation_needs_a_stream_transport() -> None:
    with pytest.raises(ValueError, match="TCP allocation"):
        TurnClient(TurnTarget("127.0.0.1", 3478, "udp"), USER, PASSWORD, config=TCP)
    async with turn_server() as server, TurnClient(target(server), USER, PASSWORD) as udp_relay:
        with pytest.raises(LocalProtocolError, match="requested_transport"):
            await udp_relay.connect_peer(("127.0.0.1", 9))


# --- incoming: ConnectionAttempt (RFC 6062 §4.4) ---------------------------------------


@asynctest
async def test_accept_binds_an_incoming_peer_connection() -> None:
    async with turn_server() as server, tcp_relay(server) as turn:
        await turn.create_permission("127.0.0.1")  # §5.3: only permitted peers get in
        accepting = asyncio.ensure_future(turn.accept())
        peer_reader, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        peer_writer.write(b"hello from the peer")  # before the client even bound
        reader, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer == peer_writer.get_extra_info("sockname")[:2]
        assert await reader.readexactly(19) == b"hello from the peer"
        writer.write(b"hello from the client")
        assert await asyncio.wait_for(peer_reader.readexactly(21), WAIT) == (
            b"hello from the client"
        )
        peer_writer.write(b"z" * 300_000)
        assert await asyncio.wait_for(reader.readexactly(300_000), WAIT) == b"z" * 300_000
        # The peer closes: the client's data connection ends too (§5.5).
        peer_writer.close()
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()


@asynctest
async def test_peer_without_permission_is_never_offered() -> None:
    async with turn_server() as server, tcp_relay(server) as turn:
        await turn.create_permission("127.0.0.1")
        accepting = asyncio.ensure_future(turn.accept())
        # 127.0.0.2 has no permission: the server closes its connection at once (§5.3)
        # and sends no ConnectionAttempt.
        stranger_reader, stranger_writer = await asyncio.open_connection(
            *turn.relayed_address, local_addr=("127.0.0.2", 0)
        )
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(stranger_reader.read(), WAIT) == b""
        stranger_writer.close()
        assert not accepting.done()
        _, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        _, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer == peer_writer.get_extra_info("sockname")[:2]
        writer.close()
        peer_writer.close()


@asynctest
async def test_close_deletes_the_allocation_and_its_connections() -> None:
    async with turn_server() as server, echo_peer() as peer:
        turn = TurnClient(target(server), USER, PASSWORD, config=TCP)
        await turn.connect()
        reader, writer = await turn.connect_peer(peer.address)
        await roundtrip(reader, writer, b"before close")
        await turn.close()
        # Our end of the data connection is closed, and the server closed the peer's
        # connection with the allocation.
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        await asyncio.wait_for(peer.ended.get(), WAIT)
        with pytest.raises(LocalProtocolError):
            await turn.connect_peer(peer.address)
        with pytest.raises(LocalProtocolError):
            await turn.accept()


@asynctest
async def test_refresh_keeps_the_tcp_allocation_and_its_connections() -> None:
    refreshed = asyncio.Event()

    def on_event(event: ev.TurnClientEvent) -> None:
        if isinstance(event, ev.AllocationRefreshed):
            refreshed.set()

    config = TurnClientConfig(
        requested_transport="tcp", refresh_margin=1e6, refresh_fraction=0.002
    )  # the allocation is refreshed about 1.2 s in; 1 s nonces make that meet a 438 first
    async with (
        turn_server(nonce_lifetime=1.0) as server,
        echo_peer() as peer,
        tcp_relay(server, config=config, on_event=on_event) as turn,
    ):
        reader, writer = await turn.connect_peer(peer.address)
        await roundtrip(reader, writer, b"before refresh")
        await asyncio.wait_for(refreshed.wait(), WAIT)
        await roundtrip(reader, writer, b"after refresh")
        # A second peer connection after the nonce went stale: Connect and
        # ConnectionBind retry with a fresh nonce.
        async with echo_peer() as other:
            reader2, writer2 = await turn.connect_peer(other.address)
            await roundtrip(reader2, writer2, b"second connection")
            writer2.close()
        writer.close()


# --- uvloop, and tsunagu turn-probe --tcp ----------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_connect_and_accept_on_uvloop(transport: str, tmp_path: Path) -> None:
    """The CLI runs on uvloop, whose transports and TLS differ from asyncio's own."""
    from tsunagu.aio.loop import run

    async def scenario() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        tls: dict[str, Any] = {}
        context = None
        if transport == "tls":
            cert, key = make_certificate(tmp_path)
            tls = {"tls_listen": (("127.0.0.1", 0),), "cert": str(cert), "key": str(key)}
            context = ssl.create_default_context(cafile=str(cert))
        async with (
            turn_server(**tls) as server,
            echo_peer() as peer,
            TurnClient(
                target(server, transport), USER, PASSWORD, config=TCP, ssl_context=context
            ) as turn,
        ):
            reader, writer = await turn.connect_peer(peer.address)
            await roundtrip(reader, writer, b"out via uvloop" * 1000)
            accepting = asyncio.ensure_future(turn.accept())
            peer_reader, peer_writer = await asyncio.open_connection(*turn.relayed_address)
            peer_writer.write(b"in via uvloop")
            reader2, writer2, _ = await asyncio.wait_for(accepting, WAIT)
            assert await asyncio.wait_for(reader2.readexactly(13), WAIT) == b"in via uvloop"
            writer2.write(b"and back")
            assert await asyncio.wait_for(peer_reader.readexactly(8), WAIT) == b"and back"
            for stream in (writer, writer2, peer_writer):
                stream.close()

    run(asyncio.wait_for(scenario(), 30))


@asynctest
async def test_turn_probe_tcp_through_our_server() -> None:
    async with turn_server() as server:
        port = server.tcp_addresses[0][1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tsunagu",
            "turn-probe",
            f"turn:127.0.0.1:{port}?transport=tcp",
            "-u",
            USER,
            "-p",
            PASSWORD,
            "--tcp",
            "--json",
            "--count",
            "3",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    assert report["relay"] == "tcp" and report["transport"] == "tcp"
    assert report["relayed"].startswith("127.0.0.1:")
    assert report["sent"] == 3 and report["received"] == 3 and report["lost"] == 0
