"""coturn's turnutils_uclient relaying through ``tsunagu turn-server --workers 2``, zero
loss: UDP allocations with channels, and RFC 6062 TCP allocations, whose data connections
(ConnectionBind) the kernel hands to either worker and the workers route to the owner. A
missing program is a failure, not a skip."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from tsunagu.aio.turn_server import worker_for_ip

pytestmark = pytest.mark.interop

REALM = "workers.test"
USER, PASSWORD = "alice", "secret"


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package coturn); interop needs it")
    return path


class Server:
    """``tsunagu turn-server --workers 2 --metrics`` on loopback."""

    def __init__(self, *extra: str) -> None:
        base = 30000 + (os.getpid() * 19) % 8000
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tsunagu", "turn-server",
                "--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1",
                "--min-port", str(base), "--max-port", str(base + 999),
                "--realm", REALM, "--user", f"{USER}:{PASSWORD}",
                "--allow-peer", "127.0.0.0/8", "--drain-timeout", "0",
                "--log-level", "warning", "--workers", "2", "--metrics", "127.0.0.1:0",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20.0)
        self.line = self.proc.stdout.readline() if ready else ""
        match = re.search(
            r"udp 127\.0\.0\.1:(\d+).*metrics 127\.0\.0\.1:(\d+), workers 2", self.line
        )
        if match is None:
            self.stop()
            raise AssertionError(f"turn-server did not start: {self.line!r}")
        self.port, self.metrics_port = int(match.group(1)), int(match.group(2))

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} missing:\n{text}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def echo_peer() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
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


def two_sources() -> tuple[str, str]:
    """Two loopback client addresses that the server's SO_REUSEPORT program gives to
    different workers."""
    first = "127.0.0.1"
    for n in range(2, 200):  # bounded; about every other address qualifies
        other = f"127.0.0.{n}"
        if worker_for_ip(other, 2) != worker_for_ip(first, 2):
            return first, other
    raise AssertionError("no address reaches the other worker")


def uclients(port: int, *flags: str) -> None:
    """Run one turnutils_uclient per worker, concurrently (-L: their source address), and
    check each relayed every message back, zero loss."""
    common = ["-p", str(port), "-u", USER, "-w", PASSWORD, "-n", "50", "-m", "8", "-l", "170"]
    processes = [
        subprocess.Popen(
            [program("turnutils_uclient"), *flags, "-L", source, *common, "-z", "5", "127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source in two_sources()
    ]
    try:
        outputs = [process.communicate(timeout=60)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        lost = re.search(r"Total lost packets (\d+) \(", output)
        assert lost is not None and int(lost.group(1)) == 0, output
        totals = re.search(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", output)
        assert totals is not None, output
        sent, received = int(totals.group(1)), int(totals.group(2))
        assert sent >= 50 * 8 and received == sent, output


def test_uclient_relays_through_two_workers_without_loss(echo_peer: int) -> None:
    # turnutils_uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF range; by
    # default it also allocates RTCP relays with the RTP allocation's RESERVATION-TOKEN.
    server = Server("--rfc5766-channels")
    try:
        uclients(server.port, "-e", "127.0.0.1", "-r", str(echo_peer))
        assert server.metric("tsunagu_turn_workers") == 2
        for worker in ("0", "1"):  # both workers relayed
            name = f'tsunagu_turn_worker_relayed_packets_total{{worker="{worker}"}}'
            assert server.metric(name) >= 2 * 50 * 8
    finally:
        assert server.stop() == 0


def test_uclient_rfc6062_through_two_workers_without_loss() -> None:
    """``-T``: RFC 6062, client to client through this server (hence --relay-to-relay);
    one uclient per worker, each piping its data connections (raw bytes: not counted as
    relayed datagrams)."""
    server = Server("--relay-to-relay")
    try:
        uclients(server.port, "-T")
        for worker in ("0", "1"):
            assert (
                server.metric(f'tsunagu_turn_worker_relayed_packets_total{{worker="{worker}"}}')
                >= 0
            )
        assert server.metric("tsunagu_turn_workers") == 2
        assert server.metric("tsunagu_turn_peer_connections") == 0  # all closed again
    finally:
        assert server.stop() == 0
