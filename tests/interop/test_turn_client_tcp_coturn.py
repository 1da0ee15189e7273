"""RFC 6062 TCP allocations: tsunagu's TURN client against a real coturn ``turnserver``.

coturn relays TCP unless started with ``--no-tcp-relay``; it is started here the way
test_turn_client_coturn.py starts it (its :class:`Coturn` helper), with
``--allow-loopback-peers`` since the peers are asyncio TCP servers and clients on loopback.
A missing coturn FAILS these tests, it never skips them.

Covered: an outgoing connection (Connect, then ConnectionBind on a new connection, §4.3) and
an incoming one (ConnectionAttempt, then ConnectionBind, §4.4), each with bytes both ways,
over TCP and TLS control connections; coturn's 447, 446 and 403 as typed errors; and
``tsunagu turn-probe --tcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from tsunagu.aio.turn_client import TurnClient
from tsunagu.errors import TurnError
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import ClientState, TurnClientConfig

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/interop/coturn.py starts coturn
    sys.path.insert(0, _HERE)

from coturn import PASSWORD, USER, Coturn  # noqa: E402

pytestmark = pytest.mark.interop

WAIT = 5.0  # upper bound for any single exchange with a local coturn
TCP = TurnClientConfig(requested_transport="tcp")
P = ParamSpec("P")
Address = tuple[str, int]


def asynctest(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return run


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    server = Coturn(tmp_path_factory.mktemp("coturn-tcp"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn's default peer policy: loopback peers are refused."""
    server = Coturn(tmp_path_factory.mktemp("coturn-tcp-strict"), permissive=False)
    yield server
    server.stop()


def tcp_relay(coturn: Coturn, transport: str = "tcp", **kwargs: Any) -> TurnClient:
    return TurnClient(
        coturn.target(transport),
        USER,
        PASSWORD,
        config=TCP,
        ssl_context=coturn.ssl_context(),
        **kwargs,
    )


@contextlib.asynccontextmanager
async def echo_peer() -> AsyncIterator[tuple[Address, asyncio.Queue[bytes]]]:
    """A TCP peer on loopback echoing every byte; the queue gets each connection's first
    bytes, to prove which connection the relay made."""
    first: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        announced = False
        try:
            while data := await reader.read(65536):
                if not announced:
                    first.put_nowait(data)
                    announced = True
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        sockname = server.sockets[0].getsockname()
        yield (sockname[0], sockname[1]), first
    finally:
        server.close()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), WAIT) == data


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_outgoing_connection_through_coturn(coturn: Coturn, transport: str) -> None:
    seen: list[ev.TurnClientEvent] = []
    async with (
        echo_peer() as (peer, first),
        tcp_relay(coturn, transport, on_event=seen.append) as turn,
    ):
        relayed = turn.relayed_address
        assert relayed[0] == "127.0.0.1"
        reader, writer = await turn.connect_peer(peer)
        await roundtrip(reader, writer, b"hello through coturn")
        assert await asyncio.wait_for(first.get(), WAIT) == b"hello through coturn"
        await roundtrip(reader, writer, bytes(range(256)) * 16)  # no framing either way
        await roundtrip(reader, writer, b"y" * 500_000)
        writer.close()
    # The permission came first (created as for UDP), then the Connect's CONNECTION-ID.
    created = seen.index(ev.PermissionCreated("127.0.0.1"))
    succeeded = next(i for i, e in enumerate(seen) if isinstance(e, ev.ConnectSucceeded))
    assert created < succeeded
    assert turn.connection.state is ClientState.CLOSED


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_incoming_connection_through_coturn(coturn: Coturn, transport: str) -> None:
    async with tcp_relay(coturn, transport) as turn:
        await turn.create_permission("127.0.0.1")  # RFC 6062 §5.3: only permitted peers
        accepting = asyncio.ensure_future(turn.accept())
        peer_reader, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        peer_writer.write(b"knock knock")  # buffered by coturn until the bind
        reader, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer == peer_writer.get_extra_info("sockname")[:2]
        assert await asyncio.wait_for(reader.readexactly(11), WAIT) == b"knock knock"
        writer.write(b"who is there?")
        await writer.drain()
        assert await asyncio.wait_for(peer_reader.readexactly(13), WAIT) == b"who is there?"
        peer_writer.write(b"p" * 200_000)
        assert await asyncio.wait_for(reader.readexactly(200_000), WAIT) == b"p" * 200_000
        peer_writer.close()
        # The peer's close ends the data connection (§5.5); coturn does so with a reset.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        assert reader.at_eof() or reader.exception() is not None
        writer.close()


@asynctest
async def test_unpermitted_peer_is_turned_away(coturn: Coturn) -> None:
    async with tcp_relay(coturn) as turn:
        await turn.create_permission("127.0.0.1")
        accepting = asyncio.ensure_future(turn.accept())
        # 127.0.0.2 has no permission: coturn drops its connection (§5.3).
        with contextlib.suppress(ConnectionError):
            stranger_reader, stranger_writer = await asyncio.open_connection(
                *turn.relayed_address, local_addr=("127.0.0.2", 0)
            )
            assert await asyncio.wait_for(stranger_reader.read(), WAIT) == b""
            stranger_writer.close()
        assert not accepting.done()
        _, peer_writer = await asyncio.open_connection(*turn.relayed_address)
        _, writer, peer = await asyncio.wait_for(accepting, WAIT)
        assert peer[0] == "127.0.0.1"
        writer.close()
        peer_writer.close()


@asynctest
async def test_coturn_connect_errors(coturn: Coturn) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = ("127.0.0.1", int(probe.getsockname()[1]))  # nothing listens there
    async with echo_peer() as (peer, _), tcp_relay(coturn) as turn:
        with pytest.raises(TurnError) as failed:
            await turn.connect_peer(closed)
        assert failed.value.code == 447  # Connection Timeout or Failure
        reader, writer = await turn.connect_peer(peer)
        with pytest.raises(TurnError) as exists:
            await turn.connect_peer(peer)
        assert exists.value.code == 446  # Connection Already Exists
        await roundtrip(reader, writer, b"still fine")
        writer.close()


@asynctest
async def test_coturn_refuses_loopback_peers_with_403(strict_coturn: Coturn) -> None:
    async with echo_peer() as (peer, _), tcp_relay(strict_coturn) as turn:
        with pytest.raises(TurnError) as refused:
            await turn.connect_peer(peer)
        assert refused.value.code == 403


# --- tsunagu turn-probe --tcp --------------------------------------------------------------


async def probe(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tsunagu",
        "turn-probe",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@asynctest
async def test_probe_tcp_relay(coturn: Coturn, transport: str) -> None:
    code, stdout, stderr = await probe(
        coturn.uri(transport), "-u", USER, "-p", PASSWORD, "--tcp", "--json",
        "--cafile", str(coturn.cert),
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["relay"] == "tcp" and report["transport"] == transport
    assert report["relayed"].startswith("127.0.0.1:") and report["peer"].startswith("127.0.0.1:")
    assert report["sent"] == 5 and report["lost"] == 0 and report["rtt_ms"] is not None


@asynctest
async def test_probe_tcp_unreachable_peer_is_447(coturn: Coturn) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, stdout, stderr = await probe(
        coturn.uri("tcp"), "-u", USER, "-p", PASSWORD, "--tcp", "--peer", f"127.0.0.1:{port}",
    )  # fmt: skip
    assert code == 1
    assert "447 connection timeout or failure" in stderr
    assert "relayed address: 127.0.0.1:" in stdout  # the allocation itself worked


def test_probe_tcp_needs_a_stream_transport(coturn: Coturn) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", "turn-probe", coturn.uri("udp"), "-u", USER,
         "-p", PASSWORD, "--tcp"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--tcp needs a TCP or TLS server" in done.stderr
