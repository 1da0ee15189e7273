"""tsunagu's STUN client and RFC 5780 discovery against a real coturn ``turnserver``.

coturn enables RFC 5780 when it listens on two addresses of one family: here 127.0.0.1 and
127.0.0.2, on a primary and an alternate port chosen free, STUN only (``-S``), no TLS, DTLS
or relays. It must be installed (scripts/test.sh installs it): a missing coturn FAILS these
tests, it never skips them. Readiness is a Binding answered on the primary and on the
alternate address, polled a bounded number of times; the process is always stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsunagu.aio.stun_client import binding_request, discover_nat
from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.nat.discovery import DiscoveryConfig
from tsunagu.stun.attributes import Address
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.message import Message

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/interop/coturn.py, shared by the coturn tests
    sys.path.insert(0, _HERE)
from coturn import TurnserverProcess, turnserver_binary  # noqa: E402

pytestmark = pytest.mark.interop

IPS = ("127.0.0.1", "127.0.0.2")
WAIT = 10.0  # upper bound for coturn to come up, and for any one exchange
COMMAND_LIMIT = 30.0


def _free_ports() -> tuple[int, int]:
    """Two ports free for UDP and TCP on both loopback addresses coturn listens on."""
    chosen: list[int] = []
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((IPS[0], 0))
            port = int(probe.getsockname()[1])
        if port in chosen:
            continue
        try:
            for ip in IPS:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(socket.AF_INET, kind) as sock:
                        sock.bind((ip, port))
        except OSError:
            continue
        chosen.append(port)
        if len(chosen) == 2:
            return chosen[0], chosen[1]
    raise RuntimeError("no free ports found")


class Coturn(TurnserverProcess):
    """One STUN-only turnserver on 127.0.0.1 and 127.0.0.2."""

    def __init__(self, directory: Path) -> None:
        binary = turnserver_binary()
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, lambda: self._args(binary, directory))

    def _args(self, binary: str, directory: Path) -> list[str]:
        self.port, self.alt_port = _free_ports()
        return [
            binary, "-n", "--no-cli", "--no-tls", "--no-dtls", "--stun-only",
            "--simple-log", "--log-file", "stdout",
            "--pidfile", str(directory / "turnserver.pid"),
            "--listening-ip", IPS[0], "--listening-ip", IPS[1],
            "--listening-port", str(self.port), "--alt-listening-port", str(self.alt_port),
        ]  # fmt: skip

    @property
    def primary(self) -> Address:
        return (IPS[0], self.port)

    @property
    def alternate(self) -> Address:
        return (IPS[1], self.alt_port)

    def _wait_ready(self) -> None:
        """Ready when both the primary and the alternate address answer a Binding."""
        deadline = time.monotonic() + WAIT
        pending = [self.primary, self.alternate]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.05)
            for _ in range(400):
                if not pending:
                    return
                self._check_started()
                if time.monotonic() > deadline:
                    break
                request = Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
                probe.sendto(request.encode(), pending[0])
                try:
                    data, source = probe.recvfrom(2048)
                except (TimeoutError, ConnectionRefusedError):
                    continue
                if Message.decode(data).transaction_id == request.transaction_id:
                    pending.remove((source[0], source[1]))
        pytest.fail(f"turnserver did not become ready: {self._log_text()}")

    def uri(self, query: str = "") -> str:
        return f"stun:{IPS[0]}:{self.port}{query}"


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    server = Coturn(tmp_path_factory.mktemp("coturn-stun"))
    try:
        yield server
    finally:
        server.stop()


def tsunagu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsunagu", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_LIMIT,
        check=False,
    )


def test_stun_command_against_coturn(coturn: Coturn) -> None:
    result = tsunagu("stun", coturn.uri(), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # No NAT on loopback: coturn sees our own socket's address.
    assert document["mapped"] == document["local"]
    assert document["mapped"].startswith("127.0.0.1:")
    assert document["server"] == f"127.0.0.1:{coturn.port}"
    assert document["software"].startswith("Coturn")
    assert document["rtt_ms"] > 0
    assert document["other_address"] == f"127.0.0.2:{coturn.alt_port}"


def test_nat_check_command_against_coturn(coturn: Coturn) -> None:
    result = tsunagu("nat-check", coturn.uri(), "--json", "--timeout", "2")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mapping"] == "endpoint-independent"
    assert document["filtering"] == "endpoint-independent"
    assert document["hairpinning"] is True
    assert document["mapped"] == document["local"]
    assert document["other_address"] == f"127.0.0.2:{coturn.alt_port}"
    assert "direct connections will work" in document["verdict"]
    assert document["error"] is None


def test_binding_over_tcp_against_coturn(coturn: Coturn) -> None:
    async def main() -> None:
        result = await binding_request(f"turn:127.0.0.1:{coturn.port}?transport=tcp", timeout=WAIT)
        assert result.transport == "tcp"
        assert result.mapped == result.local

    asyncio.run(asyncio.wait_for(main(), 2 * WAIT))


def test_discovery_with_lifetime_against_coturn(coturn: Coturn) -> None:
    # coturn honours RESPONSE-PORT (RFC 5780 §7.5), which the lifetime probe relies on.
    config = DiscoveryConfig(timeout=2.0, lifetime=True, lifetime_schedule=(0.05, 0.1))

    async def main() -> None:
        result = await discover_nat(coturn.uri(), config=config)
        assert result.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
        assert result.filtering is FilteringBehavior.ENDPOINT_INDEPENDENT
        assert result.hairpinning is True
        assert result.lifetime == 0.1, result.notes
        assert result.response_origin == coturn.primary

    asyncio.run(asyncio.wait_for(main(), 60))
