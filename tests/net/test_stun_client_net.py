"""The asyncio STUN client (tsunagu.aio.stun_client) and the ``tsunagu stun`` and
``tsunagu nat-check`` commands against tsunagu's own STUN server on loopback.

The server runs in-process (:class:`tsunagu.aio.stun_server.StunServer`) on 127.0.0.1 with
127.0.0.2 as its RFC 5780 alternate address, ports chosen by the OS. Commands run as
subprocesses with asyncio, so the server keeps answering while they run. Every wait is
bounded; nothing sleeps in place of waiting for an event. Name resolution only uses
``localhost`` (from /etc/hosts) or a patched resolver: no query leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tsunagu import SOFTWARE
from tsunagu.aio.loop import run as run_uvloop
from tsunagu.aio.stun_client import (
    ResolutionError,
    ServerUnreachableError,
    binding_request,
    discover_nat,
    resolve,
)
from tsunagu.aio.stun_server import StunServer
from tsunagu.errors import LocalProtocolError, TransactionTimeoutError
from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.nat.discovery import DiscoveryConfig
from tsunagu.nat.events import DiscoveryCompleted, NatEvent, TestFinished
from tsunagu.stun.attributes import Address
from tsunagu.stun.server_config import StunServerConfig
from tsunagu.stun.uri import StunUriError

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import asynctest_within, run_tsunagu  # noqa: E402
from loopback_servers import make_certificate  # noqa: E402

LIMIT = 30.0  # seconds any one test may take
COMMAND_LIMIT = 20.0  # seconds a command may run
asynctest = asynctest_within(LIMIT)


def on_both_loops(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """Run an async test once on asyncio's loop and once on uvloop (what the CLI uses)."""

    def run(loop_kind: str) -> None:
        coroutine = asyncio.wait_for(test(), LIMIT)
        if loop_kind == "uvloop":
            run_uvloop(coroutine)
        else:
            asyncio.run(coroutine)

    # Not functools.wraps: pytest would then read the wrapped test's (empty) signature.
    run.__name__, run.__doc__ = test.__name__, test.__doc__
    marked: Callable[[str], None] = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])(run)
    return marked


@asynccontextmanager
async def stun_server(
    ip: str = "127.0.0.1", other: str | None = "127.0.0.2", **kwargs: Any
) -> AsyncIterator[StunServer]:
    config = StunServerConfig(
        listen=((ip, 0),), other=(other, 0) if other is not None else None, **kwargs
    )
    async with await StunServer.start(config) as server:
        yield server


def primary(server: StunServer) -> Address:
    return server.udp_addresses[0]


def uri(address: Address, scheme: str = "stun", query: str = "") -> str:
    ip, port = address
    host = f"[{ip}]" if ":" in ip else ip
    return f"{scheme}:{host}:{port}{query}"


@asynccontextmanager
async def silent_udp(ip: str = "127.0.0.1") -> AsyncIterator[Address]:
    """A UDP socket that receives and never answers: a server behind a black hole."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((ip, 0))
        yield sock.getsockname()[:2]
    finally:
        sock.close()


def closed_udp_port(ip: str = "127.0.0.1") -> Address:
    """A port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        return (ip, int(sock.getsockname()[1]))


# --- binding_request -------------------------------------------------------------------------


@on_both_loops
async def test_binding_over_udp() -> None:
    async with stun_server() as server:
        result = await binding_request(uri(primary(server)), timeout=5.0)
    # Loopback: no NAT, the server sees our own socket.
    assert result.mapped == result.local
    assert result.mapped[0] == "127.0.0.1"
    assert result.server == primary(server)
    assert result.transport == "udp"
    assert result.software == SOFTWARE
    assert 0 < result.rtt < 5.0
    assert result.transmissions == 1
    assert result.other_address == server.config.other
    assert result.response_origin == primary(server)


@on_both_loops
async def test_binding_over_tcp() -> None:
    async with stun_server() as server:
        address = server.tcp_addresses[0]
        result = await binding_request(uri(address, "turn", "?transport=tcp"), timeout=5.0)
    assert result.transport == "tcp"
    assert result.mapped == result.local
    assert result.server == address


@asynctest
async def test_binding_to_a_tuple_and_a_host_name() -> None:
    async with stun_server(other=None) as server:
        by_tuple = await binding_request(primary(server))
        # "localhost" comes from /etc/hosts: nothing leaves the machine.
        by_name = await binding_request(f"stun:localhost:{primary(server)[1]}")
    assert by_tuple.mapped == by_tuple.local
    assert by_name.mapped == by_name.local
    assert by_tuple.other_address is None


@asynctest
async def test_binding_over_ipv6() -> None:
    async with stun_server("::1", other=None) as server:
        result = await binding_request(uri(primary(server)))
    assert result.mapped == result.local
    assert result.mapped[0] == "::1"


def test_binding_over_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)

    async def main() -> None:
        async with stun_server(
            other=None, tls_listen=(("127.0.0.1", 0),), cert=str(cert), key=str(key)
        ) as server:
            address = server.tls_addresses[0]
            trusted = ssl.create_default_context(cafile=str(cert))
            result = await binding_request(uri(address, "stuns"), ssl_context=trusted)
            assert result.transport == "tls"
            assert result.mapped == result.local
            # The system's CAs do not trust a self-signed certificate.
            with pytest.raises(ServerUnreachableError, match="certificate"):
                await binding_request(uri(address, "stuns"), timeout=5.0)

    asyncio.run(asyncio.wait_for(main(), LIMIT))


@on_both_loops
async def test_timeout_is_a_typed_error_not_a_hang() -> None:
    async with silent_udp() as address:
        started = time.monotonic()
        with pytest.raises(TransactionTimeoutError):
            await binding_request(uri(address), timeout=0.6)
        elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 2.0


@asynctest
async def test_tcp_connect_to_a_closed_port_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerUnreachableError):
        await binding_request(f"turn:127.0.0.1:{port}?transport=tcp", timeout=2.0)


@asynctest
async def test_icmp_port_unreachable_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError):
        await binding_request(uri(closed_udp_port()), timeout=10.0)
    assert time.monotonic() - started < 5.0


@asynctest
async def test_name_resolution_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    # A patched resolver: a real failing look-up would query a DNS server off this host.
    async def no_such_name(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", no_such_name)
    with pytest.raises(ResolutionError, match=r"no-such-host\.test"):
        await resolve("no-such-host.test", 3478)
    with pytest.raises(ResolutionError):
        await binding_request("stun:no-such-host.test")
    with pytest.raises(ResolutionError):
        await discover_nat("stun:no-such-host.test")
    # IP literals never reach the resolver.
    assert await resolve("::1", 9) == [("::1", 9)]


@asynctest
async def test_bad_targets() -> None:
    with pytest.raises(StunUriError):
        await binding_request("stun://127.0.0.1")
    with pytest.raises(LocalProtocolError, match="DTLS"):
        await binding_request("turns:127.0.0.1?transport=udp")
    with pytest.raises(LocalProtocolError, match="UDP"):
        await discover_nat("turn:127.0.0.1?transport=tcp")
    with pytest.raises(ValueError):
        await binding_request("stun:127.0.0.1", timeout=0)


# --- discover_nat ----------------------------------------------------------------------------


@on_both_loops
async def test_discovery_on_loopback() -> None:
    events: list[NatEvent] = []
    async with stun_server() as server:
        result = await discover_nat(uri(primary(server)), timeout=2.0, on_event=events.append)
    # No NAT between loopback sockets: everything endpoint-independent, and a datagram to
    # our own "mapped" address comes straight back.
    assert result.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
    assert result.filtering is FilteringBehavior.ENDPOINT_INDEPENDENT
    assert result.hairpinning is True
    assert result.nat_present is False
    assert result.udp_blocked is False
    assert result.error is None
    assert result.mapped == result.local
    assert result.other_address == server.config.other
    assert result.software == SOFTWARE
    assert "direct connections will work" in result.verdict
    assert isinstance(events[-1], DiscoveryCompleted) and events[-1].result == result
    tests = {e.test.value for e in events if isinstance(e, TestFinished)}
    assert {"test-i", "filtering-test-ii", "mapping-test-ii", "hairpin"} <= tests


@asynctest
async def test_discovery_with_lifetime() -> None:
    config = DiscoveryConfig(timeout=1.0, lifetime=True, lifetime_schedule=(0.05, 0.1))
    async with stun_server() as server:
        result = await discover_nat(uri(primary(server)), config=config)
    assert result.lifetime == 0.1
    assert result.lifetime_expired_after is None


@asynctest
async def test_discovery_against_a_server_without_rfc5780() -> None:
    async with stun_server(other=None) as server:
        result = await discover_nat(uri(primary(server)), timeout=1.0)
    assert result.other_address is None
    assert result.error is not None and "does not support RFC 5780" in result.error
    assert result.mapping is None and result.filtering is None
    assert result.mapped == result.local


@asynctest
async def test_discovery_against_silence_is_udp_blocked() -> None:
    async with silent_udp() as address:
        started = time.monotonic()
        result = await discover_nat(uri(address), timeout=0.5)
    assert result.udp_blocked is True
    assert result.verdict == "UDP blocked: you will need TURN over TCP/TLS"
    assert time.monotonic() - started < 3.0


# --- the commands ----------------------------------------------------------------------------


async def tsunagu(*args: str) -> tuple[int, str, str]:
    """``python -m tsunagu ARGS`` as a subprocess: (exit status, stdout, stderr)."""
    return await run_tsunagu(*args, limit=COMMAND_LIMIT)


@asynctest
async def test_stun_command_json() -> None:
    async with stun_server() as server:
        status, out, err = await tsunagu("stun", uri(primary(server)), "--json")
    assert status == 0, err
    document = json.loads(out)
    ip, port = document["mapped"].rsplit(":", 1)
    assert ip == "127.0.0.1" and 0 < int(port) < 65536
    assert document["mapped"] == document["local"]
    assert document["server"] == "{}:{}".format(*primary(server))
    assert document["software"] == SOFTWARE
    assert document["rtt_ms"] > 0
    assert document["transport"] == "udp"
    assert server.config.other is not None
    assert document["other_address"] == f"127.0.0.2:{server.config.other[1]}"


@asynctest
async def test_stun_command_ipv6_and_plain_output() -> None:
    async with stun_server("::1", other=None) as server:
        status, out, err = await tsunagu("stun", uri(primary(server)), "--json")
        assert status == 0, err
        assert json.loads(out)["mapped"].startswith("[::1]:")
        status, out, err = await tsunagu("stun", uri(primary(server)))
    assert status == 0, err
    assert "mapped:" in out and "[::1]:" in out and SOFTWARE in out


@asynctest
async def test_stun_command_failures() -> None:
    async with silent_udp() as address:
        status, out, err = await tsunagu("stun", uri(address), "--timeout", "0.5", "--json")
    assert status == 1
    assert out == ""
    assert "timeout" in err
    status, _, err = await tsunagu("stun", "stun://127.0.0.1")
    assert status == 2
    assert "without '//'" in err


@asynctest
async def test_nat_check_command_json() -> None:
    async with stun_server() as server:
        status, out, err = await tsunagu("nat-check", uri(primary(server)), "--json")
    assert status == 0, err
    document = json.loads(out)
    assert document["mapping"] == "endpoint-independent"
    assert document["filtering"] == "endpoint-independent"
    assert document["hairpinning"] is True
    assert document["mapped"] == document["local"]
    assert "direct connections will work" in document["verdict"]
    assert "lifetime" not in document


@asynctest
async def test_nat_check_command_lifetime_and_plain_output() -> None:
    async with stun_server() as server:
        status, out, err = await tsunagu(
            "nat-check", uri(primary(server)), "--json", "--lifetime",
            "--lifetime-schedule", "0.05,0.1", "--timeout", "1",
        )  # fmt: skip
        assert status == 0, err
        assert json.loads(out)["lifetime"] == 0.1
        status, out, err = await tsunagu("nat-check", uri(primary(server)))
    assert status == 0, err
    assert "mapping:       endpoint-independent" in out
    assert "hairpinning:   yes" in out
    assert "verdict:" in out


@asynctest
async def test_nat_check_command_without_rfc5780() -> None:
    async with stun_server(other=None) as server:
        status, out, err = await tsunagu(
            "nat-check", uri(primary(server)), "--json", "--timeout", "1"
        )
    assert status == 1
    document = json.loads(out)
    assert document["mapping"] is None and document["filtering"] is None
    assert "does not support RFC 5780" in document["error"]
    assert "does not support RFC 5780" in err
