"""Third-party STUN clients against ``tsunagu stun-server``: coturn's turnutils_stunclient
and turnutils_natdiscovery (RFC 5780 behaviour discovery), and aioice's STUN client.

The server runs as the real command (``python -m tsunagu stun-server``) on 127.0.0.1 with
127.0.0.2 as its RFC 5780 second address, plus ::1. A missing coturn or aioice fails these
tests: they are the point of the file, so they must not be skipped.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import aioice.ice
import aioice.stun
import pytest
from aioice.candidate import candidate_foundation, candidate_priority

from tsunagu.address import parse_address
from tsunagu.stun.attributes import Address

pytestmark = pytest.mark.interop

TIMEOUT = 20.0


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    udp: list[Address]

    @property
    def primary(self) -> Address:
        return self.udp[0]

    @property
    def other(self) -> Address:
        """A2:P2: on 127.0.0.2, the port that is not the primary's."""
        return next(a for a in self.udp if a[0] == "127.0.0.2" and a[1] != self.primary[1])

    @property
    def ipv6(self) -> Address:
        return next(a for a in self.udp if a[0] == "::1")


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "tsunagu", "stun-server",
            "--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--other", "127.0.0.2:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = _readline(process, TIMEOUT)
        assert line.startswith("listening "), line
        udp = [
            parse_address(item.split(" ", 1)[1])
            for item in line.removeprefix("listening ").strip().split(", ")
            if item.startswith("udp ")
        ]
        yield RunningServer(process, udp)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert status == 0


def _readline(process: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line, or a failure naming what stderr said."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            pytest.fail("stun-server printed nothing within the timeout")
    line = process.stdout.readline()
    if not line:
        assert process.stderr is not None
        pytest.fail(f"stun-server exited: {process.stderr.read()}")
    return line


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} (coturn) is not installed: apt-get install coturn"
    return path


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        port: int = sock.getsockname()[1]
        return port


def _responses(output: str) -> list[str]:
    """turnutils output split at its "RFC 5780 response N" headings."""
    return re.split(r"RFC 5780 response \d+", output)[1:]


def test_turnutils_stunclient(server: RunningServer) -> None:
    a1, p1 = server.primary
    a2, p2 = server.other
    output = _run(_tool("turnutils_stunclient"), "-p", str(p1), a1)
    responses = _responses(output)
    assert len(responses) == 3, output
    # Response 1: a plain request; our reflexive address, where we answered from, and the
    # RFC 5780 alternate address.
    first = responses[0]
    assert re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", first), output
    assert f"Response origin: : {a1}:{p1}" in first, output
    assert f"Other addr: : {a2}:{p2}" in first, output
    # Response 2: CHANGE-REQUEST (change IP and port) answered from A2:P2.
    assert f"Response origin: : {a2}:{p2}" in responses[1], output


def test_turnutils_stunclient_ipv6(server: RunningServer) -> None:
    ip, port = server.ipv6
    output = _run(_tool("turnutils_stunclient"), "-p", str(port), ip)
    assert re.search(r"IPv6\. UDP reflexive addr: ::1:\d+", output), output


@pytest.mark.parametrize("padding", [False, True], ids=["plain", "padding"])
def test_turnutils_natdiscovery_mapping_and_filtering(server: RunningServer, padding: bool) -> None:
    a1, p1 = server.primary
    a2, p2 = server.other
    local_port = _free_udp_port("127.0.0.1")
    args = [_tool("turnutils_natdiscovery"), "-m", "-f"]
    if padding:
        args.append("-P")  # RFC 5780 §7.6: 1500 bytes of PADDING in every request
    output = _run(*args, "-L", "127.0.0.1", "-l", str(local_port), "-p", str(p1), a1)
    # Loopback has no NAT: RFC 5780 §4.3 test I finds mapped == local ...
    assert f"UDP reflexive addr: 127.0.0.1:{local_port}" in output, output
    assert "No NAT! (Endpoint Independent Mapping)" in output, output
    # ... test II (to A2:P1) maps the same way, and CHANGE-REQUEST answers get through.
    assert "NAT with Endpoint Independent Mapping!" in output, output
    assert "NAT with Endpoint Independent Filtering!" in output, output
    # MAPPED-ADDRESS and XOR-MAPPED-ADDRESS agree in every response (RFC 5780 §6.1).
    responses = _responses(output)
    assert len(responses) == 4, output
    assert all("No ALG: Mapped == XOR-Mapped" in r for r in responses), output
    # Test II went to A2:P1, whose OTHER-ADDRESS is A1:P2 (RFC 5780 §6.1 Table 1).
    assert f"Response origin: : {a2}:{p1}" in responses[1], output
    assert f"Other addr: : {a1}:{p2}" in responses[1], output
    # Filtering test II: change IP and port, answered from A2:P2.
    assert f"Response origin: : {a2}:{p2}" in responses[3], output


class _Receiver(aioice.ice.Connection):
    """The Connection a StunProtocol reports to; this test only runs transactions."""


async def _aioice_protocol(ip: str) -> aioice.ice.StunProtocol:
    connection = _Receiver(ice_controlling=True)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: aioice.ice.StunProtocol(connection), local_addr=(ip, 0)
    )
    host, port = protocol.transport.get_extra_info("sockname")[:2]
    protocol.local_candidate = aioice.Candidate(
        foundation=candidate_foundation("host", "udp", host),
        component=1,
        transport="udp",
        priority=candidate_priority(1, "host"),
        host=host,
        port=port,
        type="host",
    )
    return protocol


def _binding_request() -> aioice.stun.Message:
    return aioice.stun.Message(
        message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST
    )


def test_aioice_server_reflexive_candidate(server: RunningServer) -> None:
    """aioice's own srflx gathering step (what Connection.gather_candidates runs per host
    socket) from a loopback socket; over IPv6, where that helper only does IPv4 name
    lookups, aioice's Binding transaction itself."""

    async def main() -> None:
        protocol = await _aioice_protocol("127.0.0.1")
        try:
            candidate, _ = await aioice.ice.server_reflexive_candidate(protocol, server.primary)
            local = protocol.local_candidate
            assert candidate.type == "srflx"
            assert (candidate.host, candidate.port) == (local.host, local.port)
        finally:
            await protocol.close()
        protocol = await _aioice_protocol("::1")
        try:
            response, _ = await protocol.request(_binding_request(), server.ipv6)
            local = protocol.local_candidate
            assert response.attributes["XOR-MAPPED-ADDRESS"] == (local.host, local.port)
            assert "OTHER-ADDRESS" not in response.attributes  # ::1 is not RFC 5780's
        finally:
            await protocol.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_aioice_rfc5780_and_error_responses(server: RunningServer) -> None:
    async def main() -> None:
        protocol = await _aioice_protocol("127.0.0.1")
        try:
            request = _binding_request()
            request.attributes["CHANGE-REQUEST"] = 0x06  # change IP and port
            response, _ = await protocol.request(request, server.primary)
            local = protocol.local_candidate
            assert response.attributes["XOR-MAPPED-ADDRESS"] == (local.host, local.port)
            assert response.attributes["RESPONSE-ORIGIN"] == server.other
            assert response.attributes["OTHER-ADDRESS"] == server.other
            assert response.attributes["SOFTWARE"].startswith("tsunagu ")
        finally:
            await protocol.close()
        # ::1 is outside the RFC 5780 set: CHANGE-REQUEST is refused with 420.
        protocol = await _aioice_protocol("::1")
        try:
            request = _binding_request()
            request.attributes["CHANGE-REQUEST"] = 0x06
            with pytest.raises(aioice.stun.TransactionFailed) as failure:
                await protocol.request(request, server.ipv6)
            assert failure.value.response.attributes["ERROR-CODE"][0] == 420
        finally:
            await protocol.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
