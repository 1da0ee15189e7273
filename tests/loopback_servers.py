"""Servers on loopback that the asyncio tests of tests/net and tests/interop share: tsunagu's
own TURN server, a TCP echo peer, a self-signed certificate for TLS listeners, and a port
nothing listens on.

    async with turn_server() as server, tcp_echo_peer() as peer:
        ...  # server.tcp_addresses[0]; USER, PASSWORD; peer.address, peer.first, peer.ended

Import it after putting its folder (tests/) on ``sys.path``, as the test folders have no
``__init__.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tsunagu.aio.turn_server import TurnServer
from tsunagu.turn.config import TurnServerConfig

__all__ = [
    "PASSWORD",
    "USER",
    "TcpEchoPeer",
    "closed_port",
    "make_certificate",
    "roundtrip",
    "start_turn_server",
    "tcp_echo_peer",
    "turn_server",
]

Address = tuple[str, int]

USER, PASSWORD = "alice", "wonderland"
"""The one user of :func:`start_turn_server`'s server."""


async def start_turn_server(**overrides: Any) -> TurnServer:
    """tsunagu's TURN server in the running loop, on 127.0.0.1 (UDP and TCP, ports chosen by
    the OS), relaying from 127.0.0.1 to loopback peers; ``overrides`` are
    :class:`TurnServerConfig` fields. The caller closes it."""
    settings: dict[str, Any] = {
        "listen": (("127.0.0.1", 0),),
        "relay_ips": ("127.0.0.1",),
        "users": (f"{USER}:{PASSWORD}",),
        "realm": "tsunagu.test",
        "allow_peers": ("127.0.0.0/8",),
        # The server refuses peers inside its own relay port range (loop protection), so
        # keep that range clear of the ephemeral ports that peers and host candidates are
        # given (Linux: 32768-60999).
        "min_port": 61000,
        "max_port": 65535,
    }
    settings.update(overrides)
    return await TurnServer.start(TurnServerConfig(**settings))


@contextlib.asynccontextmanager
async def turn_server(**overrides: Any) -> AsyncIterator[TurnServer]:
    """:func:`start_turn_server`, closed on the way out."""
    server = await start_turn_server(**overrides)
    try:
        yield server
    finally:
        await server.close()


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


def closed_port() -> int:
    """A loopback TCP port nothing listens on: connecting there is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpEchoPeer:
    """A TCP peer that echoes every byte back. ``first`` gets each connection's first bytes
    (which connection a relay made), ``ended`` the remote address of each connection that
    ended."""

    def __init__(self) -> None:
        self.first: asyncio.Queue[bytes] = asyncio.Queue()
        self.ended: asyncio.Queue[Address] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.address: Address = ("", 0)

    async def start(self, host: str = "127.0.0.1") -> TcpEchoPeer:
        self.server = await asyncio.start_server(self._serve, host, 0)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = writer.get_extra_info("peername")
        announced = False
        try:
            while data := await reader.read(65536):
                if not announced:
                    self.first.put_nowait(data)
                    announced = True
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
async def tcp_echo_peer() -> AsyncIterator[TcpEchoPeer]:
    """A :class:`TcpEchoPeer` on 127.0.0.1, closed on the way out."""
    peer = await TcpEchoPeer().start()
    try:
        yield peer
    finally:
        peer.close()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, limit: float = 5.0
) -> None:
    """Write ``data`` and read it back, echoed, within ``limit`` seconds."""
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), limit) == data
