"""Third-party TURN clients relaying through ``tsunagu turn-server`` over loopback:
coturn's turnutils_uclient (with turnutils_peer echoing) and aioice. A missing program is
a failure, not a skip: the README's test setup installs all of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tsunagu.aio.loop import run

pytestmark = pytest.mark.interop

REALM = "interop.test"
USER, PASSWORD = "alice", "secret"
TIMEOUT = 10.0


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package coturn); interop needs it")
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``tsunagu turn-server`` on loopback, in a subprocess."""

    def __init__(self, *extra: str) -> None:
        base = 20000 + (os.getpid() * 17) % 9000
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tsunagu",
                "turn-server",
                "--listen",
                "127.0.0.1:0",
                "--relay-ip",
                "127.0.0.1",
                "--min-port",
                str(base),
                "--max-port",
                str(base + 999),
                "--realm",
                REALM,
                "--user",
                f"{USER}:{PASSWORD}",
                "--allow-peer",
                "127.0.0.0/8",
                "--drain-timeout",
                "0",
                "--log-level",
                "warning",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"udp 127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise AssertionError(f"turn-server did not start: {line!r} {err}")
        self.port = int(match.group(1))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def server() -> Iterator[Server]:
    # turnutils_uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF range.
    srv = Server("--rfc5766-channels")
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture
def echo_peer() -> Iterator[int]:
    """turnutils_peer, an echo server, on loopback; yields its port once it echoes."""
    port = free_udp_port()
    proc = subprocess.Popen(
        [program("turnutils_peer"), "-L", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.2)
            for _ in range(50):  # bounded: 50 probes, each waiting for the echo
                with contextlib.suppress(ConnectionRefusedError):
                    probe.sendto(b"ready?", ("127.0.0.1", port))
                try:
                    if probe.recvfrom(64)[0] == b"ready?":
                        break
                except (TimeoutError, ConnectionRefusedError):
                    continue
            else:
                raise AssertionError("turnutils_peer never echoed")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    "flags",
    [[], ["-s"], ["-t"], ["-t", "-s"]],
    ids=["udp-channels", "udp-send-indications", "tcp-channels", "tcp-send-indications"],
)
def test_turnutils_uclient_relays_without_loss(
    server: Server, echo_peer: int, flags: list[str]
) -> None:
    messages, clients = 40, 3
    proc = subprocess.run(
        [
            program("turnutils_uclient"),
            *flags,
            "-p",
            str(server.port),
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-e",
            "127.0.0.1",
            "-r",
            str(echo_peer),
            "-n",
            str(messages),
            "-m",
            str(clients),
            "-l",
            "170",
            "-z",
            "5",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    lost = re.search(r"Total lost packets (\d+) \(", output)
    assert lost is not None, output
    assert int(lost.group(1)) == 0, output
    totals = re.search(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", output)
    assert totals is not None, output
    sent, received = int(totals.group(1)), int(totals.group(2))
    assert sent >= messages * clients and received == sent, output
    assert "error" not in output.lower(), output


def test_turnutils_uclient_tcp_relay_rfc6062() -> None:
    """``-T``: RFC 6062 TCP allocations, client to client (``-y``): each client Connects to
    the other's relayed address, which is this server's own, hence --relay-to-relay."""
    srv = Server("--relay-to-relay")
    try:
        proc = subprocess.run(
            [
                program("turnutils_uclient"),
                "-T",
                "-p",
                str(srv.port),
                "-u",
                USER,
                "-w",
                PASSWORD,
                "-n",
                "40",
                "-m",
                "3",
                "-l",
                "170",
                "-z",
                "5",
                "127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        assert srv.stop() == 0
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    lost = re.search(r"Total lost packets (\d+) \(", output)
    assert lost is not None and int(lost.group(1)) == 0, output
    totals = re.search(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", output)
    assert totals is not None, output
    assert int(totals.group(1)) >= 40 * 3 and totals.group(1) == totals.group(2), output


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aioice_turn_client_allocates_and_relays(transport: str) -> None:
    from aioice import turn

    srv = Server()  # aioice binds channels from 0x4000: RFC 8656's range is enough
    try:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

            class Echo(asyncio.DatagramProtocol):
                def connection_made(self, transport: Any) -> None:
                    self.transport = transport

                def datagram_received(self, data: bytes, addr: Any) -> None:
                    self.transport.sendto(b"echo " + data, addr)

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    received.put_nowait((data, addr))

            peer, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
            peer_address = peer.get_extra_info("sockname")
            relay, _ = await turn.create_turn_endpoint(
                Client,
                server_addr=("127.0.0.1", srv.port),
                username=USER,
                password=PASSWORD,
                transport=transport,
            )
            try:
                relayed = relay.get_extra_info("sockname")
                assert relayed[0] == "127.0.0.1"
                for n in range(5):
                    relay.sendto(b"%d" % n, peer_address)
                    data, source = await asyncio.wait_for(received.get(), TIMEOUT)
                    assert data == b"echo %d" % n
                    assert tuple(source) == tuple(peer_address)
            finally:
                relay.close()
                peer.close()

        run(scenario())
    finally:
        assert srv.stop() == 0


def test_aioice_connection_gathers_a_relay_candidate_and_connects_through_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aioice
    from aioice import ice

    # Keep ICE on loopback: host candidates only on 127.0.0.1.
    monkeypatch.setattr(ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    srv = Server()
    try:

        async def scenario() -> None:
            relayed = aioice.Connection(
                ice_controlling=True,
                turn_server=("127.0.0.1", srv.port),
                turn_username=USER,
                turn_password=PASSWORD,
                use_ipv6=False,
                transport_policy=aioice.TransportPolicy.RELAY,
            )
            direct = aioice.Connection(ice_controlling=False, use_ipv6=False)
            try:
                await asyncio.wait_for(relayed.gather_candidates(), TIMEOUT)
                await asyncio.wait_for(direct.gather_candidates(), TIMEOUT)
                kinds = {c.type for c in relayed.local_candidates}
                assert kinds == {"relay"}, relayed.local_candidates
                for candidate in relayed.local_candidates:
                    await direct.add_remote_candidate(candidate)
                for candidate in direct.local_candidates:
                    await relayed.add_remote_candidate(candidate)
                await direct.add_remote_candidate(None)
                await relayed.add_remote_candidate(None)
                relayed.remote_username = direct.local_username
                relayed.remote_password = direct.local_password
                direct.remote_username = relayed.local_username
                direct.remote_password = relayed.local_password
                await asyncio.wait_for(asyncio.gather(relayed.connect(), direct.connect()), TIMEOUT)
                await relayed.send(b"through the relay")
                assert await asyncio.wait_for(direct.recv(), TIMEOUT) == b"through the relay"
                await direct.send(b"and back")
                assert await asyncio.wait_for(relayed.recv(), TIMEOUT) == b"and back"
            finally:
                await relayed.close()
                await direct.close()

        run(scenario())
    finally:
        assert srv.stop() == 0
