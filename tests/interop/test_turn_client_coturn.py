"""tsunagu's TURN client against a real coturn ``turnserver``, over UDP, TCP and TLS.

coturn is started by the tests on loopback ports chosen free, with a self-signed certificate
made here; it must be installed (scripts/test.sh installs it): a missing coturn FAILS these
tests, it never skips them. Peers are local UDP echo sockets, hence
``--allow-loopback-peers``; a second coturn keeps the default policy (loopback peers refused)
and a one-allocation quota, for the 403 and 486 cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest

from tsunagu.aio.turn_client import TurnClient, TurnTarget, create_turn_endpoint
from tsunagu.errors import TurnError
from tsunagu.stun.constants import AddressFamily
from tsunagu.turn import client_events as ev
from tsunagu.turn.client import TurnClientConfig

_HERE = Path(__file__).resolve().parent
for folder in (_HERE, _HERE.parent):  # coturn.py here, aiotest.py in tests/
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
from coturn import PASSWORD, USER, Coturn, coturn_fixture, free_port  # noqa: E402

from aiotest import asynctest_within, run_tsunagu  # noqa: E402

pytestmark = pytest.mark.interop

WAIT = 10.0  # upper bound for any single exchange with a local coturn
asynctest = asynctest_within(60)

coturn = coturn_fixture("coturn")
strict_coturn = coturn_fixture("strict_coturn", permissive=False)
"""coturn's default peer policy: loopback peers are refused."""


@pytest.fixture
def quota_coturn(tmp_path: Path) -> Iterator[Coturn]:
    """One allocation per user at a time."""
    server = Coturn(tmp_path / "coturn-quota", quota=1)
    yield server
    server.stop()


class EchoPeer(asyncio.DatagramProtocol):
    """A peer on loopback that sends every datagram back where it came from."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def echo_peer(host: str = "127.0.0.1") -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(EchoPeer, local_addr=(host, 0))
    try:
        address = transport.get_extra_info("sockname")
        yield (address[0], address[1])
    finally:
        transport.close()


async def exchange(turn: TurnClient, peer: tuple[str, int], count: int) -> None:
    """Send ``count`` numbered datagrams through the relay and get each echoed back."""
    for i in range(count):
        payload = f"ping {i}".encode()
        await turn.send_to(payload, peer)
        data, source = await asyncio.wait_for(turn.recv_from(), WAIT)
        assert (data, source) == (payload, peer)


def client(coturn: Coturn, transport: str, **kwargs: object) -> TurnClient:
    return TurnClient(
        coturn.target(transport),
        USER,
        PASSWORD,
        ssl_context=coturn.ssl_context(),
        **kwargs,  # type: ignore[arg-type]
    )


# --- allocation and data -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
@asynctest
async def test_allocate_and_exchange_over_channels(coturn: Coturn, transport: str) -> None:
    seen: list[ev.TurnClientEvent] = []
    async with echo_peer() as peer, client(coturn, transport, on_event=seen.append) as turn:
        relayed = turn.relayed_address
        assert relayed[0] == "127.0.0.1" and relayed[1] > 0
        mapped = turn.mapped_address
        assert mapped is not None and mapped[0] == "127.0.0.1"
        await exchange(turn, peer, 20)
        stats = turn.connection.stats
        # The first datagrams go in Send indications until the ChannelBind succeeds; after
        # that both directions use ChannelData (RFC 8656 §12).
        assert ev.ChannelBound(peer, 0x4000) in seen
        assert stats.sent_channel_data > 0 and stats.received_channel_data > 0
        assert stats.sent_indications >= 1
    assert any(isinstance(e, ev.Closed) and e.error is None for e in seen)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
@asynctest
async def test_send_and_data_indications(coturn: Coturn, transport: str) -> None:
    config = TurnClientConfig(channels=False)
    async with echo_peer() as peer, client(coturn, transport, config=config) as turn:
        await exchange(turn, peer, 10)
        stats = turn.connection.stats
        assert stats.sent_indications == 10 and stats.received_indications == 10
        assert stats.sent_channel_data == stats.received_channel_data == 0


@asynctest
async def test_refresh_of_allocation_permission_and_channel(coturn: Coturn) -> None:
    # Refresh almost at once: 0.5 % into each lifetime (3 s of 600, 1.5 s of 300). coturn's
    # nonces go stale after 3 s, so some of these refreshes meet a 438 and retry.
    config = TurnClientConfig(refresh_margin=1e6, refresh_fraction=0.005)
    seen: list[ev.TurnClientEvent] = []
    refreshed = asyncio.Event()

    def on_event(event: ev.TurnClientEvent) -> None:
        seen.append(event)
        if isinstance(event, ev.AllocationRefreshed):
            refreshed.set()

    async with echo_peer() as peer, client(coturn, "udp", config=config, on_event=on_event) as turn:
        await exchange(turn, peer, 3)
        await asyncio.wait_for(refreshed.wait(), WAIT)
        # Permission and channel were refreshed meanwhile (traffic keeps them wanted), and
        # relaying still works both ways.
        await exchange(turn, peer, 3)
        assert turn.connection.has_permission(peer[0])
        assert turn.connection.channel_for(peer) == 0x4000
    assert next(e for e in seen if isinstance(e, ev.AllocationRefreshed)).lifetime == 600
    assert not any(isinstance(e, ev.AllocationLost | ev.PermissionFailed) for e in seen)


@asynctest
async def test_close_deletes_the_allocation(coturn: Coturn) -> None:
    turn = client(coturn, "udp")
    await turn.connect()
    core = turn.connection
    await turn.close()
    assert core.state.value == "closed"
    with pytest.raises(Exception, match="closed"):
        await turn.recv_from()


@asynctest
async def test_ipv6_allocation_and_peer(coturn: Coturn) -> None:
    config = TurnClientConfig(address_family=AddressFamily.IPV6)
    turn = TurnClient(coturn.target("udp", "::1"), USER, PASSWORD, config=config)
    async with echo_peer("::1") as peer, turn:
        assert turn.relayed_address[0] == "::1"
        assert turn.server_address == ("::1", coturn.port)
        await exchange(turn, peer, 5)


@asynctest
async def test_dns_name_and_tls_hostname_check(coturn: Coturn) -> None:
    uri = f"turns:localhost:{coturn.tls_port}"
    turn = TurnClient(uri, USER, PASSWORD, ssl_context=coturn.ssl_context())
    async with echo_peer() as peer, turn:
        await exchange(turn, peer, 3)


@asynctest
async def test_untrusted_certificate_is_a_tls_error(coturn: Coturn) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        async with TurnClient(coturn.target("tls"), USER, PASSWORD):
            pass


@asynctest
async def test_wrong_password_is_401(coturn: Coturn) -> None:
    with pytest.raises(TurnError) as caught:
        async with TurnClient(coturn.target("udp"), USER, "wrong"):
            pass
    assert caught.value.code == 401


@asynctest
async def test_datagram_endpoint_adapter(coturn: Coturn) -> None:
    class Collector(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
            self.lost = asyncio.Event()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.received.put_nowait((data, addr))

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set()

    async with echo_peer() as peer:
        transport, protocol = await create_turn_endpoint(
            Collector, coturn.target("udp"), USER, PASSWORD
        )
        relayed = transport.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1"
        assert transport.get_extra_info("related_address")[0] == "127.0.0.1"
        for i in range(5):
            transport.sendto(b"via adapter %d" % i, peer)  # no await: like a socket
        got = [await asyncio.wait_for(protocol.received.get(), WAIT) for _ in range(5)]
        assert sorted(got) == sorted((b"via adapter %d" % i, peer) for i in range(5))
        transport.close()
        await asyncio.wait_for(protocol.lost.wait(), WAIT)


@asynctest
async def test_refused_peer_is_403(strict_coturn: Coturn) -> None:
    async with echo_peer() as peer, TurnClient(strict_coturn.target("udp"), USER, PASSWORD) as turn:
        with pytest.raises(TurnError) as caught:
            await turn.send_to(b"x", peer)
        assert caught.value.code == 403


@asynctest
async def test_quota_is_486(quota_coturn: Coturn) -> None:
    async with TurnClient(quota_coturn.target("udp"), USER, PASSWORD):
        with pytest.raises(TurnError) as caught:
            async with TurnClient(quota_coturn.target("tcp"), USER, PASSWORD):
                pass
        assert caught.value.code == 486


@asynctest
async def test_server_gone_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    from tsunagu.errors import TransactionTimeoutError
    from tsunagu.stun.transaction import TransactionConfig

    server = Coturn(tmp_path / "doomed")
    config = TurnClientConfig(
        refresh_margin=1e6,
        refresh_fraction=0.001,  # refresh 0.6 s in
        transaction=TransactionConfig(initial_rto=0.05, rc=3, rm=4),
    )
    lost = asyncio.Event()
    seen: list[ev.TurnClientEvent] = []

    def on_event(event: ev.TurnClientEvent) -> None:
        seen.append(event)
        if isinstance(event, ev.AllocationLost):
            lost.set()

    turn = TurnClient(server.target("udp"), USER, PASSWORD, config=config, on_event=on_event)
    await turn.connect()
    server.stop()
    await asyncio.wait_for(lost.wait(), WAIT)
    (event,) = [e for e in seen if isinstance(e, ev.AllocationLost)]
    assert isinstance(event.error, TransactionTimeoutError)
    with pytest.raises(TransactionTimeoutError):
        await turn.recv_from()
    await asyncio.wait_for(turn.close(), WAIT)


@asynctest
async def test_unreachable_server_fails_fast() -> None:
    port = free_port()  # nothing listens there: ICMP port unreachable
    start = time.monotonic()
    with pytest.raises(TurnError, match="unreachable"):
        async with TurnClient(TurnTarget("127.0.0.1", port, "udp"), USER, PASSWORD):
            pass
    assert time.monotonic() - start < WAIT


# --- tsunagu turn-probe --------------------------------------------------------------------


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsunagu", "turn-probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_udp_prints_addresses_rtt_and_loss(coturn: Coturn) -> None:
    done = probe(coturn.uri("udp"), "-u", USER, "-p", PASSWORD, "--count", "3")
    assert done.returncode == 0, done.stderr
    assert "relayed address: 127.0.0.1:" in done.stdout
    assert "mapped address:  127.0.0.1:" in done.stdout
    assert "3 sent, 3 received, 0 lost" in done.stdout
    assert "rtt:" in done.stdout and "deallocated" in done.stdout


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_probe_json(coturn: Coturn, transport: str) -> None:
    done = probe(
        coturn.uri(transport), "-u", USER, "-p", PASSWORD, "--json", "--cafile", str(coturn.cert)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["relayed"].startswith("127.0.0.1:")
    assert report["mapped"].startswith("127.0.0.1:")
    assert report["lost"] == 0 and report["sent"] == 5
    assert report["rtt_ms"] > 0
    assert report["transport"] == transport


@asynctest
async def test_probe_with_an_explicit_peer(coturn: Coturn) -> None:
    async with echo_peer() as peer:
        done = await probe_async(
            coturn.uri("udp"),
            "-u",
            USER,
            "-p",
            PASSWORD,
            "--json",
            "--peer",
            f"{peer[0]}:{peer[1]}",
        )
    assert done[0] == 0, done[2]
    report = json.loads(done[1])
    assert report["peer"] == f"127.0.0.1:{peer[1]}" and report["lost"] == 0


def test_probe_wrong_password_names_401(coturn: Coturn) -> None:
    done = probe(coturn.uri("udp"), "-u", USER, "-p", "not-the-password")
    assert done.returncode != 0
    assert "401" in done.stderr and "wrong credentials" in done.stderr


def test_probe_wrong_password_json(coturn: Coturn) -> None:
    done = probe(coturn.uri("tcp"), "-u", USER, "-p", "nope", "--json")
    assert done.returncode != 0
    report = json.loads(done.stdout)
    assert report["code"] == 401 and report["cause"] == "wrong-credentials"


def test_probe_refused_loopback_peer_is_403(strict_coturn: Coturn) -> None:
    done = probe(strict_coturn.uri("udp"), "-u", USER, "-p", PASSWORD)
    assert done.returncode != 0
    assert "403 peer refused" in done.stderr
    assert "relayed address:" in done.stdout  # the allocation itself worked


@asynctest
async def test_probe_quota_is_486(quota_coturn: Coturn) -> None:
    async with TurnClient(quota_coturn.target("udp"), USER, PASSWORD):
        code, _, stderr = await probe_async(quota_coturn.uri("udp"), "-u", USER, "-p", PASSWORD)
    assert code != 0
    assert "486" in stderr and "quota" in stderr


def test_probe_untrusted_tls_is_a_tls_error(coturn: Coturn) -> None:
    done = probe(coturn.uri("tls"), "-u", USER, "-p", PASSWORD)
    assert done.returncode != 0
    assert "TLS error" in done.stderr


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_probe_unreachable_server(transport: str) -> None:
    port = free_port()
    done = probe(f"turn:127.0.0.1:{port}?transport={transport}", "-u", USER, "-p", PASSWORD)
    assert done.returncode != 0
    assert "unreachable" in done.stderr


def test_probe_bad_uri_is_a_usage_error() -> None:
    done = probe("http://example.org", "-u", USER, "-p", PASSWORD)
    assert done.returncode == 2
    assert "turn-probe:" in done.stderr


async def probe_async(*args: str) -> tuple[int, str, str]:
    return await run_tsunagu("turn-probe", *args, limit=60)
