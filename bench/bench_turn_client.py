"""TURN client benchmark: datagrams per second a client pushes through coturn, tsunagu's
client against aioice's (``aioice.turn.create_turn_endpoint``), in one run, ratio printed.

Both clients allocate on the same local coturn and get a datagram transport on the relayed
address; each run pushes ``--count`` datagrams of ``--size`` bytes with ``transport.sendto``
to a UDP sink peer (a separate process that counts what arrives), yielding to the event loop
every 32 datagrams, and stops after ``--seconds`` at most. Both clients are measured in
their steady state: a warm-up first binds the channel, so the datagrams travel as ChannelData
(RFC 8656 §12) for both. The rate is datagrams handed to ``sendto`` per second, measured at
the client, until the client's own work for them (aioice's per-datagram tasks, tsunagu's
coalesced stream writes) has run; the sink checks that they arrived, and the share it got is
printed too. The runs alternate between the clients, ``--repeats`` times, and the median is
reported.

    .venv/bin/python bench/bench_turn_client.py [--count 20000] [--seconds 5] [--repeats 3]

aioice's API here is aioice 0.13's: ``create_turn_endpoint(protocol_factory, server_addr,
username, password, transport=...)`` returning a transport whose ``sendto`` schedules one
task per datagram.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from _harness import free_udp_port, install_sigterm_handler, ratio, running_server
from aioice import turn as aioice_turn

from tsunagu.aio.loop import run as run_on_loop
from tsunagu.aio.turn_client import TurnTarget, create_turn_endpoint

HOST = "127.0.0.1"
USER, PASSWORD, REALM = "bench", "bench-password", "bench.test"
BATCH = 32  # datagrams between yields to the event loop

SINK = r"""
import socket, sys, threading
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
sock.bind(("127.0.0.1", 0))
count = 0
def receive():
    global count
    while True:
        sock.recv(65536)
        count += 1
threading.Thread(target=receive, daemon=True).start()
print(sock.getsockname()[1], flush=True)
for line in sys.stdin:
    print(count, flush=True)
"""


class Sink:
    """A UDP peer in its own process, so counting never competes with the client for CPU."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SINK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.address = ("127.0.0.1", int(self.process.stdout.readline()))

    def count(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("?\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.kill()
        self.process.wait(5)


def coturn_command(port: int) -> list[str]:
    """coturn as a TURN server on one loopback port, relaying to loopback peers."""
    return [
        shutil.which("turnserver") or "/usr/bin/turnserver",
        "-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log",
        "--log-file", "stdout", "--pidfile", "turnserver.pid",
        "--listening-ip", HOST, "--relay-ip", HOST, "--listening-port", str(port),
        "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--allow-loopback-peers",
    ]  # fmt: skip


Sendto = Callable[[bytes, tuple[str, int]], None]


async def wait_for_count(sink: Sink, at_least: int, seconds: float) -> int:
    """Poll the sink until it counted ``at_least`` datagrams or stopped growing."""
    deadline = time.perf_counter() + seconds
    last, still = -1, 0
    while time.perf_counter() < deadline:
        count = sink.count()
        if count >= at_least:
            return count
        still = still + 1 if count == last else 0
        if still >= 20:  # 20 polls (~0.2 s) without progress: the rest is lost
            return count
        last = count
        await asyncio.sleep(0.01)
    return sink.count()


async def push(
    sendto: Sendto, sink: Sink, count: int, size: int, seconds: float
) -> tuple[float, int, int]:
    """(datagrams per second the client pushed, datagrams sent, datagrams the sink got)."""
    payload = b"x" * size
    peer = sink.address
    baseline = sink.count()
    start = time.perf_counter()
    stop = start + seconds
    sent = 0
    while sent < count and time.perf_counter() < stop:
        batch = min(BATCH, count - sent)
        for _ in range(batch):
            sendto(payload, peer)
        sent += batch
        await asyncio.sleep(0)  # let the client's own callbacks and tasks run
    await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    received = await wait_for_count(sink, baseline + sent, seconds) - baseline
    return sent / elapsed, sent, received


class Ignore(asyncio.DatagramProtocol):
    pass


async def tsunagu_endpoint(port: int, transport: str) -> tuple[Any, Sendto]:
    target = TurnTarget(HOST, port, "tcp" if transport == "tcp" else "udp")
    endpoint, _ = await create_turn_endpoint(Ignore, target, USER, PASSWORD)
    return endpoint, endpoint.sendto


async def aioice_endpoint(port: int, transport: str) -> tuple[Any, Sendto]:
    endpoint, _ = await aioice_turn.create_turn_endpoint(
        Ignore, (HOST, port), USER, PASSWORD, transport=transport
    )
    return endpoint, endpoint.sendto


async def run(args: argparse.Namespace, port: int) -> None:
    sink = Sink()
    try:
        for transport in args.transports.split(","):
            clients = {
                "tsunagu": await tsunagu_endpoint(port, transport),
                "aioice": await aioice_endpoint(port, transport),
            }
            for _, sendto in clients.values():  # warm up: bind the channel, fill caches
                for _ in range(3):
                    await push(sendto, sink, 50, args.size, args.seconds)
            rates: dict[str, list[float]] = {name: [] for name in clients}
            delivered: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(args.repeats):
                for name, (_, sendto) in clients.items():
                    rate, sent, received = await push(
                        sendto, sink, args.count, args.size, args.seconds
                    )
                    rates[name].append(rate)
                    delivered[name].append(received / sent)
            for endpoint, _ in clients.values():
                endpoint.close()
            ours, theirs = (statistics.median(rates[name]) for name in ("tsunagu", "aioice"))
            print(
                f"{transport.upper():>4}, {args.size}-byte datagrams through coturn: "
                f"tsunagu {ours:,.0f}/s, aioice {theirs:,.0f}/s, ratio {ratio(ours, theirs)} "
                f"(delivered: tsunagu {min(delivered['tsunagu']):.1%}, "
                f"aioice {min(delivered['aioice']):.1%})"
            )
            await asyncio.sleep(0.1)  # let both deallocations finish before the next round
    finally:
        sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="datagrams per run")
    parser.add_argument("--size", type=int, default=160, help="payload bytes (an RTP packet)")
    parser.add_argument("--seconds", type=float, default=5.0, help="upper bound per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="udp,tcp")
    args = parser.parse_args()
    if shutil.which("turnserver") is None and not os.path.exists("/usr/bin/turnserver"):
        raise SystemExit("coturn's turnserver is not installed (scripts/test.sh installs it)")
    install_sigterm_handler()
    port = free_udp_port(HOST, span=1)
    with running_server("coturn", coturn_command(port), port=port):
        loop = "uvloop" if _uvloop_available() else "asyncio"
        print(f"event loop: {loop}; {args.repeats} runs of {args.count} datagrams each, median")
        run_on_loop(run(args, port))


def _uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
