"""TURN server benchmarks: ``tsunagu turn-server`` against coturn's ``turnserver``, the same
load from the same C generator in one run, ratios (tsunagu / coturn) printed.

Three parts (``--parts``, all by default; the default run takes under three minutes):

alloc
    Allocations per second. ``bench/turngen.c`` (compiled into the git-ignored
    ``bench/build/`` on first use) keeps ``--window`` sessions in flight, each on a new UDP
    socket -- a new 5-tuple, the source addresses spread over 5000 addresses from
    ``127.2.0.1`` --
    doing the long-term credential handshake: Allocate -> 401 with a NONCE -> Allocate
    with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY -> success; then a Refresh with
    LIFETIME 0 deletes the allocation (so relay ports and memory stay flat over a run), the
    socket is closed and the slot starts over. Each figure is completed Allocates per
    second over ``--alloc-seconds``; the generator is C (HMAC-SHA1 with a SHA-1 of its
    own) and its CPU use is printed, so a run where it was the limit shows.
memory
    Memory per idle allocation. The generator opens 100 allocations (warm-up), then
    ``--counts`` (2000 and 10000), each with a permission and a channel binding (as a call
    has), and holds them. At each count the server's resident memory (VmRSS from
    /proc/PID/status, summed over its processes) is read; bytes per allocation are its
    growth since the warm-up over the allocations added. Kernel memory (socket buffers)
    is not in RSS; the open file descriptors are printed beside it.
relay
    Relay throughput, 1200-byte ChannelData by default (``--sizes``, ``--paths``): each
    sender is a Python process that allocates and binds a channel (or creates a
    permission) towards a UDP sink, then execs ``turngen blast``, which sends the frame
    with ``sendmmsg`` as fast as it can for ``--seconds``; ``turngen sink`` counts what
    reaches the peer. A saturated server's socket overflows and the kernel drops the
    excess, as a real network would.

Pinned rounds (a machine with 2+ cores): each server alone on core 1 (``taskset``), the
generator, senders and sink on core 0. Both servers run at once, on their own ports and
relay port ranges, and the ``--repeats`` alternate between them, so that a neighbour's
burst of CPU falls on both alike; the median run is printed. ``--workers N`` (default 2;
0: none) adds rounds of alloc and relay with the servers unpinned: ``tsunagu turn-server
--workers N`` against coturn with its default relay threads (one per core); the client
addresses are spread over tsunagu's workers (it steers by client IP). ``--workers-load``
says where the load runs in those rounds: "pinned", on core 0 as in the pinned rounds, so
that the generator's share of the machine is the same whichever server is measured, and
"unpinned". Unpinned, the blasters (which send as fast as they can) compete with the
server for both cores, and how much of the machine they get depends on how the scheduler
treats the server under test: that round measures the scheduler as much as the server. On
a 2-core machine the load keeps about one core busy either way, so these rounds show each
server's threads or processes sharing the machine with the load, not scaling to spare cores.

Noise: "server CPU" is the server's CPU time over the run as a share of one core (near
100 % pinned: the server was the limit), "per CPU-s" the work done per second of the
server's CPU time, which holds when other processes take part of the core, and "others"
the CPU that processes neither ours nor the server's used meanwhile (% of one core). The
load average is printed at the start and the end.

tsunagu runs with its per-source limit on unauthenticated answers raised (401s would
otherwise be dropped past 20/s per address, as a defence against reflection) and its
allocation quotas raised past the counts used; coturn has no such limits by default.
Loopback only; every process is bounded in time and stopped by the harness.

    .venv/bin/python bench/bench_turn_server.py [--parts alloc,memory,relay]
        [--repeats 5] [--workers 2] [--workers-load pinned,unpinned]
        [--alloc-seconds 2] [--window 64]
        [--counts 2000,10000] [--seconds 2] [--senders 2] [--sizes 1200]
        [--paths channel] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    HarnessError,
    ServerProcess,
    build_turngen,
    cpu_census,
    free_port,
    install_sigterm_handler,
    load_average,
    neighbour_cpu_seconds,
    print_table,
    ratio,
    running_server,
    taskset_prefix,
)

from tsunagu.aio.turn_server import worker_for_ip

HOST = "127.0.0.1"
USER, PASSWORD, REALM = "bench", "bench-password", "bench.test"
KEY = hashlib.md5(f"{USER}:{REALM}:{PASSWORD}".encode()).hexdigest()  # RFC 8489 §9.2.2
PEER = "127.0.0.1:9"  # memory part: permissions and channels point here; nothing is sent
# alloc and memory clients: first address, count. Many, so that a new socket seldom gets
# the 5-tuple of a recent session: coturn remembers a deleted allocation's 5-tuple for a
# while and answers an Allocate on it 437 (counted as "failed").
SOURCES = ("127.2.0.1", 5000)
WARMUP_ALLOCATIONS = 100
# Relay port ranges: one per server in the rounds where both run at once, and one span
# for the memory part, which runs one server at a time. Client sockets bind other 127/8
# addresses, so the kernel's ephemeral ports never take a relay port from them. coturn
# closes a deleted allocation's relay socket up to a second later, so at several thousand
# allocations per second it needs many more ports than the allocations alive at once.
PORT_RANGES = {"tsunagu": (10000, 29999), "coturn": (30000, 59999)}
MEMORY_PORTS = (40000, 59999)

Command = Callable[[int, tuple[int, int]], list[str]]
"""The argv of a server listening on the given port, relaying from the given ports."""

SINK_IP = "127.0.0.2"  # relay part: not the relay address, so no port of it is refused as own
SENDER = r"""
import os, socket, sys
from tsunagu.stun.attributes import (ChannelNumber, Data, Nonce, Realm, RequestedTransport,
    Username, XorPeerAddress)
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.credentials import long_term_key
from tsunagu.stun.framing import ChannelData
from tsunagu.stun.message import Message

(host, port, sink_ip, sink_port, size, path, seconds, source, user, password, realm,
 blaster) = sys.argv[1:]
server, sink = (host, int(port)), (sink_ip, int(sink_port))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
sock.bind((source, 0))
sock.connect(server)
sock.settimeout(3.0)
key = long_term_key(user, realm, password)
state = {"nonce": None, "tid": 0}

def request(method, attributes):
    for _ in range(3):
        state["tid"] += 1
        tid = state["tid"].to_bytes(12, "big")
        attrs = list(attributes)
        signed = state["nonce"] is not None
        if signed:
            attrs += [Username(user), Realm(realm), Nonce(state["nonce"])]
        sock.send(Message(method, MessageClass.REQUEST, tid, attrs).encode(key if signed else None))
        while True:
            data = sock.recv(65536)
            if data[8:20] == tid:
                break
        response = Message.decode(data)
        error, nonce = response.error, response.get(Nonce)
        if error is not None and error.code in (401, 438) and nonce is not None:
            state["nonce"] = nonce.value
            continue
        if error is not None:
            raise SystemExit(f"{method:#x} refused: {error.code} {error.reason}")
        return response
    raise SystemExit("not authenticated")

request(Method.ALLOCATE, [RequestedTransport(17)])
payload = b"\x5a" * int(size)
if path == "channel":
    request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(sink)])
    frame = ChannelData(0x4000, payload).encode()
else:
    request(Method.CREATE_PERMISSION, [XorPeerAddress(sink)])
    frame = Message(Method.SEND, MessageClass.INDICATION, b"\x07" * 12,
                    [XorPeerAddress(sink), Data(payload)]).encode()
print("ready", flush=True)
os.set_inheritable(sock.fileno(), True)
os.execv(blaster, [blaster, "blast", str(sock.fileno()), seconds, frame.hex()])
"""


# --- servers ---------------------------------------------------------------------------------


def coturn_command(port: int, ports: tuple[int, int]) -> list[str]:
    return [
        shutil.which("turnserver") or "/usr/bin/turnserver",
        "-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log",
        "--log-file", "stdout", "--pidfile", "turnserver.pid",
        "--listening-ip", HOST, "--relay-ip", HOST, "--listening-port", str(port),
        "--min-port", str(ports[0]), "--max-port", str(ports[1]),
        "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--allow-loopback-peers", "--no-tcp-relay",
    ]  # fmt: skip


TSUNAGU_LIMITS = """\
# bench_turn_server.py: no per-source limit on 401s in practice, quotas past the counts
unauthenticated-rate = 1000000.0
unauthenticated-burst = 1000000
max-allocations = 100000
max-allocations-per-user = 100000
"""


def tsunagu_command(
    config: Path, port: int, ports: tuple[int, int], workers: int | None = None
) -> list[str]:
    argv = [
        sys.executable, "-m", "tsunagu", "turn-server", "--config", str(config),
        "--listen", f"{HOST}:{port}", "--relay-ip", HOST,
        "--min-port", str(ports[0]), "--max-port", str(ports[1]),
        "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--allow-peer", "127.0.0.0/8", "--log-level", "warning", "--drain-timeout", "0",
    ]  # fmt: skip
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


@dataclass
class Contender:
    """A server in a round: its name, its command and the relay ports it gets."""

    name: str
    command: Command
    ports: tuple[int, int]


@dataclass
class Running:
    name: str
    server: ServerProcess
    port: int


@contextlib.contextmanager
def running_all(contenders: Sequence[Contender], core: int | None) -> Iterator[list[Running]]:
    """Start every contender (each on a fresh port), yield them, stop them all."""
    with contextlib.ExitStack() as stack:
        started = []
        for c in contenders:
            port = free_port(HOST, span=2)
            server = stack.enter_context(
                running_server(c.name, c.command(port, c.ports), core=core, port=port)
            )
            started.append(Running(c.name, server, port))
        yield started


def others_share(before: dict[Any, Any], ours: Sequence[int], elapsed: float) -> float:
    """CPU other processes used since the census ``before``, as a share of one core."""
    return neighbour_cpu_seconds(before, cpu_census(), ours) / max(elapsed, 1e-9)


def read_json_line(process: subprocess.Popen[str], timeout: float, what: str) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("{"):
        process.kill()
        _, err = process.communicate(timeout=5)
        raise HarnessError(f"{what}: the generator printed {line!r} {err}")
    result: dict[str, Any] = json.loads(line)
    return result


def medians(samples: Sequence[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of a series."""
    return statistics.median(samples), min(samples), max(samples)


def spread(samples: Sequence[float]) -> str:
    """The range of repeats, as a share of their median: the noise of a cell."""
    median, low, high = medians(samples)
    return f"±{(high - low) / 2 / median:.0%}" if median > 0 and len(samples) > 1 else ""


# --- alloc -----------------------------------------------------------------------------------


@dataclass
class AllocRun:
    server: str
    per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu: float
    generator_cpu: float
    others_cpu: float
    failures: int
    first_error: int

    @property
    def per_cpu_second(self) -> float:
        return self.per_s / self.server_cpu if self.server_cpu > 0 else 0.0


def measure_alloc(
    running: Running, binary: Path, args: argparse.Namespace, core: int | None
) -> AllocRun:
    argv = [*taskset_prefix(core), str(binary), "alloc", HOST, str(running.port)]
    argv += ["--key", KEY, "--user", USER, "--realm", REALM, "--dealloc"]
    argv += ["--sources", f"{SOURCES[0]}/{SOURCES[1]}", "--window", str(args.window)]
    argv += ["--duration", f"{args.alloc_seconds:g}"]
    server = running.server
    census = cpu_census()
    cpu_before, started = server.cpu_seconds(), time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        result = read_json_line(process, args.alloc_seconds + 15, running.name)
        elapsed = time.monotonic() - started
        cpu = (server.cpu_seconds() - cpu_before) / elapsed
        others = others_share(census, [*server.pids(), process.pid], elapsed)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    return AllocRun(
        running.name,
        float(result["per_s"]),
        result["p50_us"] / 1000,
        result["p99_us"] / 1000,
        cpu,
        result["cpu_pct"] / 100,
        others,
        int(result["errors"]) + int(result["timeouts"]) + int(result["refused"]),
        int(result["first_error"]),
    )


def alloc_round(
    title: str,
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    binary: Path,
    *,
    server_core: int | None,
    load_core: int | None,
) -> dict[str, list[AllocRun]]:
    print(f"\n== alloc: {title}", flush=True)
    runs: dict[str, list[AllocRun]] = {c.name: [] for c in contenders}
    with running_all(contenders, server_core) as servers:
        for _ in range(args.repeats):
            for running in servers:
                runs[running.name].append(measure_alloc(running, binary, args, load_core))
    rows: list[list[str]] = []
    for name, samples in runs.items():
        median = statistics.median(r.per_s for r in samples)
        r = min(samples, key=lambda s: abs(s.per_s - median))
        rows.append(
            [
                name,
                f"{median:,.0f}",
                spread([s.per_s for s in samples]),
                f"{r.p50_ms:.1f} / {r.p99_ms:.1f}",
                f"{r.server_cpu:.0%}",
                f"{statistics.median(s.per_cpu_second for s in samples):,.0f}",
                f"{r.generator_cpu:.0%}",
                f"{r.others_cpu:.0%}",
                str(sum(s.failures for s in samples))
                + (f" (first {r.first_error})" if r.first_error else ""),
            ]
        )
    names = list(runs)
    rows.append(ratio_row(names, runs, lambda r: r.per_s, lambda r: r.per_cpu_second, 9))
    print_table(
        [
            "server",
            "allocs/s",
            "repeats",
            "p50 / p99 ms",
            "server CPU",
            "per CPU-s",
            "generator",
            "others",
            "failed",
        ],
        rows,
    )
    return runs


def ratio_row(
    names: Sequence[str],
    runs: dict[str, list[Any]],
    rate: Callable[[Any], float],
    efficiency: Callable[[Any], float],
    width: int,
) -> list[str]:
    """``first / second`` of the median rate (column 2) and efficiency (column 6)."""
    ours, theirs = names[0], names[1]
    row = [f"  {ours} / {theirs}"] + [""] * (width - 1)
    row[1] = ratio(
        statistics.median(rate(r) for r in runs[ours]),
        statistics.median(rate(r) for r in runs[theirs]),
    )
    row[5] = ratio(
        statistics.median(efficiency(r) for r in runs[ours]),
        statistics.median(efficiency(r) for r in runs[theirs]),
    )
    return row


# --- memory ----------------------------------------------------------------------------------


@dataclass
class MemoryPoint:
    held: int
    rss: int
    files: int
    per_s: float
    failed: int
    """Sessions given up so far (errors, timeouts): their allocations may still be held
    by the server, uncounted, which would inflate its bytes per allocation."""


@dataclass
class MemoryRun:
    server: str
    baseline_rss: int
    points: list[MemoryPoint] = field(default_factory=list)

    def per_allocation(self, point: MemoryPoint) -> float:
        """RSS growth per allocation from the warm-up point to ``point``."""
        warm = self.points[0]
        return (point.rss - warm.rss) / max(point.held - warm.held, 1)


def settle(server: ServerProcess, limit: float = 3.0) -> None:
    """Wait (bounded) until the server stops using CPU: the last requests are done."""
    deadline = time.monotonic() + limit
    last = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = server.cpu_seconds()
        if now - last < 0.005:
            return
        last = now


def measure_memory(
    contender: Contender,
    counts: Sequence[int],
    binary: Path,
    *,
    server_core: int | None,
    load_core: int | None,
) -> MemoryRun:
    checkpoints = [WARMUP_ALLOCATIONS, *counts]
    port = free_port(HOST, span=2)
    argv = contender.command(port, contender.ports)
    with running_server(contender.name, argv, core=server_core, port=port) as server:
        settle(server)
        run = MemoryRun(contender.name, server.rss_bytes())
        gen = [*taskset_prefix(load_core), str(binary), "hold", HOST, str(port)]
        gen += ["--key", KEY, "--user", USER, "--realm", REALM, "--peer", PEER]
        gen += ["--sources", f"{SOURCES[0]}/{SOURCES[1]}", "--window", "64"]
        gen += ["--checkpoints", ",".join(map(str, checkpoints)), "--duration", "90"]
        process = subprocess.Popen(
            gen, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdin is not None
        try:
            for count in checkpoints:
                result = read_json_line(process, 100, contender.name)
                if not result["complete"]:
                    raise HarnessError(
                        f"{contender.name}: only {result['held']} of {count} allocations opened"
                        f" (first error {result['first_error']}, timeouts {result['timeouts']})"
                    )
                settle(server)
                run.points.append(
                    MemoryPoint(
                        int(result["held"]),
                        server.rss_bytes(),
                        server.open_files(),
                        float(result["per_s"]),
                        sum(int(result[k]) for k in ("errors", "timeouts", "refused")),
                    )
                )
                process.stdin.write("next\n")
                process.stdin.flush()
            process.stdin.close()
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
    return run


def memory_part(
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    binary: Path,
    *,
    server_core: int | None,
    load_core: int | None,
) -> list[MemoryRun]:
    counts = [int(c) for c in args.counts.split(",")]
    print(
        f"\n== memory: {WARMUP_ALLOCATIONS} allocations to warm up, then "
        f"{', '.join(map(str, counts))}, each with a permission and a channel, held",
        flush=True,
    )
    runs = [
        measure_memory(c, counts, binary, server_core=server_core, load_core=load_core)
        for c in contenders
    ]
    rows: list[list[str]] = []
    for run in runs:
        for point in run.points[1:]:
            rows.append(
                [
                    f"{run.server} {point.held}",
                    f"{run.baseline_rss / 2**20:,.1f}",
                    f"{point.rss / 2**20:,.1f}",
                    f"{run.per_allocation(point):,.0f}",
                    f"{point.files:,}",
                    f"{point.per_s:,.0f}",
                    str(point.failed),
                ]
            )
    by_name = {run.server: run for run in runs}
    ours, theirs = by_name.get("tsunagu"), by_name.get("coturn")
    if ours is not None and theirs is not None:
        for a, b in zip(ours.points[1:], theirs.points[1:], strict=True):
            rows.append(
                [
                    f"  tsunagu / coturn {a.held}",
                    "",
                    "",
                    ratio(ours.per_allocation(a), theirs.per_allocation(b)),
                    "",
                    ratio(a.per_s, b.per_s),
                    "",
                ]
            )
    print_table(
        [
            "server, allocations",
            "idle MiB",
            "RSS MiB",
            "bytes/alloc",
            "open fds",
            "opened/s",
            "failed",
        ],
        rows,
    )
    return runs


# --- relay -----------------------------------------------------------------------------------


class Sink:
    """The peer: ``turngen sink`` in its own process, counting datagrams."""

    def __init__(self, binary: Path, core: int | None) -> None:
        self.process = subprocess.Popen(
            [*taskset_prefix(core), str(binary), "sink", SINK_IP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def count(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("?\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def settled(self, limit: float = 3.0) -> int:
        """The count once it stops growing (the server's queue drained); bounded."""
        deadline = time.monotonic() + limit
        last = self.count()
        while time.monotonic() < deadline:
            select.select([], [], [], 0.05)
            current = self.count()
            if current == last:
                return current
            last = current
        return last

    def close(self) -> None:
        self.process.kill()
        self.process.wait(5)


@dataclass
class RelayRun:
    server: str
    path: str
    size: int
    offered_pps: float
    relayed_pps: float
    delivered: float
    server_cpu: float
    others_cpu: float

    @property
    def mbit(self) -> float:
        return self.relayed_pps * self.size * 8 / 1e6

    @property
    def per_cpu_second(self) -> float:
        """Datagrams relayed per second of the server's CPU time: the efficiency, which
        holds when other processes take a share of the server's core."""
        return self.relayed_pps / self.server_cpu if self.server_cpu > 0 else 0.0


@dataclass
class Load:
    binary: Path
    sink: Sink
    sources: list[str]
    core: int | None
    seconds: float


def measure_relay(running: Running, load: Load, path: str, size: int) -> RelayRun:
    """One run: the senders allocate, then send for ``load.seconds`` at once."""
    name, server = running.name, running.server
    senders = []
    for source in load.sources:
        argv = [*taskset_prefix(load.core), sys.executable, "-c", SENDER, HOST, str(running.port)]
        argv += [SINK_IP, str(load.sink.port), str(size), path, f"{load.seconds:g}", source]
        argv += [USER, PASSWORD, REALM, str(load.binary)]
        senders.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for sender in senders:
            assert sender.stdout is not None
            ready, _, _ = select.select([sender.stdout], [], [], 10.0)
            line = sender.stdout.readline() if ready else ""
            if line.strip() != "ready":
                sender.kill()
                _, err = sender.communicate(timeout=5)
                raise HarnessError(f"{name}: a sender did not get ready: {line!r} {err}")
        before = load.sink.settled()
        census = cpu_census()
        cpu_before = server.cpu_seconds()
        started = time.monotonic()
        for sender in senders:
            assert sender.stdin is not None
            sender.stdin.write("go\n")
            sender.stdin.flush()
        results = []
        for sender in senders:
            assert sender.stdout is not None
            ready, _, _ = select.select([sender.stdout], [], [], load.seconds + 15.0)
            line = sender.stdout.readline() if ready else ""
            if not line.startswith("{"):
                raise HarnessError(f"{name}: a sender failed: {line!r}")
            results.append(json.loads(line))
        elapsed = time.monotonic() - started
        cpu = (server.cpu_seconds() - cpu_before) / elapsed
        ours = [*server.pids(), load.sink.process.pid, *(s.pid for s in senders)]
        others = others_share(census, ours, elapsed)
        relayed = load.sink.settled() - before
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
            sender.wait(10)
    sent = sum(r["sent"] for r in results)
    span = max(r["elapsed"] for r in results)
    return RelayRun(
        name, path, size, sent / span, relayed / span, relayed / max(sent, 1), cpu, others
    )


def relay_round(
    title: str,
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    *,
    server_core: int | None,
    load: Load,
) -> list[RelayRun]:
    """Every path and size against every server, repeats alternating, then the table."""
    print(f"\n== relay: {title}", flush=True)
    paths = args.paths.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    cells: dict[tuple[str, int], dict[str, list[RelayRun]]] = {}
    with running_all(contenders, server_core) as servers:
        for path in paths:
            for size in sizes:
                cell = cells[(path, size)] = {r.name: [] for r in servers}
                for _ in range(args.repeats):
                    for running in servers:
                        cell[running.name].append(measure_relay(running, load, path, size))
    rows: list[list[str]] = []
    chosen: list[RelayRun] = []
    for (path, size), cell in cells.items():
        for name, samples in cell.items():
            median = statistics.median(r.relayed_pps for r in samples)
            r = min(samples, key=lambda s: abs(s.relayed_pps - median))
            chosen.append(r)
            rows.append(
                [
                    f"{name} {path} {size} B",
                    f"{median:,.0f}",
                    spread([s.relayed_pps for s in samples]),
                    f"{r.mbit:,.0f}",
                    f"{r.delivered:.0%}",
                    f"{statistics.median(s.per_cpu_second for s in samples):,.0f}",
                    f"{r.server_cpu:.0%}",
                    f"{r.offered_pps:,.0f}",
                    f"{r.others_cpu:.0%}",
                ]
            )
        rows.append(
            ratio_row(list(cell), cell, lambda r: r.relayed_pps, lambda r: r.per_cpu_second, 9)
        )
    print_table(
        [
            "run",
            "relayed pkt/s",
            "repeats",
            "Mbit/s",
            "delivered",
            "per CPU-s",
            "server CPU",
            "offered pkt/s",
            "others",
        ],
        rows,
    )
    return chosen


def spread_sources(count: int, workers: int) -> list[str]:
    """Loopback source addresses covering tsunagu's worker slots round robin."""
    by_slot: dict[int, list[str]] = {}
    for n in range(1, 250):
        ip = f"127.0.3.{n}"
        by_slot.setdefault(worker_for_ip(ip, workers), []).append(ip)
    slots = sorted(by_slot)
    return [by_slot[slots[i % len(slots)]][i // len(slots)] for i in range(count)]


# --- main ------------------------------------------------------------------------------------


# Result key suffixes and how the summary labels them.
SUMMARY_ROUNDS = (
    ("", ""),
    ("_workers_pinned", ", load on core 0"),
    ("_workers_unpinned", ", load unpinned"),
)


def summary(results: dict[str, Any]) -> None:
    """One table of the headline ratios."""
    rows: list[list[str]] = []
    for key, suffix in SUMMARY_ROUNDS:
        runs = results.get(f"alloc{key}")
        if runs:
            names = list(runs)
            ours, theirs = (statistics.median(r.per_s for r in runs[n]) for n in names[:2])
            rows.append(
                [f"allocations/s ({names[0]}{suffix})", f"{theirs:,.0f}", f"{ours:,.0f}",
                 ratio(ours, theirs)]
            )  # fmt: skip
    memory = {run.server: run for run in results.get("memory", [])}
    theirs_run = memory.pop("coturn", None)
    for ours_run in memory.values() if theirs_run is not None else ():
        for a, b in zip(ours_run.points[1:], theirs_run.points[1:], strict=True):
            ours_b, theirs_b = ours_run.per_allocation(a), theirs_run.per_allocation(b)
            rows.append(
                [f"bytes per allocation, {a.held} held ({ours_run.server})", f"{theirs_b:,.0f}",
                 f"{ours_b:,.0f}", ratio(ours_b, theirs_b)]
            )  # fmt: skip
    for key, suffix in SUMMARY_ROUNDS:
        runs = results.get(f"relay{key}") or []
        for ours in runs:
            if ours.server.startswith("coturn"):
                continue
            theirs = next(
                (
                    r
                    for r in runs
                    if r.server == "coturn" and (r.path, r.size) == (ours.path, ours.size)
                ),
                None,
            )
            if theirs is not None:
                rows.append(
                    [f"relayed pkt/s, {ours.path} {ours.size} B ({ours.server}{suffix})",
                     f"{theirs.relayed_pps:,.0f}", f"{ours.relayed_pps:,.0f}",
                     ratio(ours.relayed_pps, theirs.relayed_pps)]
                )  # fmt: skip
    if rows:
        print("\n== summary (medians; bytes per allocation: lower is better)")
        print_table(["metric", "coturn", "tsunagu", "tsunagu / coturn"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="alloc,memory,relay", help="which benchmarks")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell (median)")
    parser.add_argument(
        "--workers", type=int, default=2, help="also tsunagu --workers N, unpinned (0: no)"
    )
    parser.add_argument(
        "--workers-load",
        default="pinned,unpinned",
        help="--workers rounds: the load on core 0 (pinned) and/or unpinned",
    )
    parser.add_argument("--alloc-seconds", type=float, default=2.0, help="alloc run length")
    parser.add_argument("--window", type=int, default=64, help="alloc sessions in flight")
    parser.add_argument("--counts", default="2000,10000", help="memory: allocations held")
    parser.add_argument("--seconds", type=float, default=2.0, help="relay: sending time")
    parser.add_argument("--senders", type=int, default=2, help="relay: clients sending")
    parser.add_argument("--sizes", default="1200", help="relay: payload sizes in bytes")
    parser.add_argument("--paths", default="channel", help="relay: channel and/or send")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"alloc", "memory", "relay"}:
        parser.error("--parts takes alloc, memory and/or relay")
    if not 0.2 <= args.seconds <= 30 or not 1 <= args.senders <= 16 or not 1 <= args.repeats <= 20:
        parser.error("need 0.2 <= --seconds <= 30, 1 <= --senders <= 16, 1 <= --repeats <= 20")
    if not 0.5 <= args.alloc_seconds <= 30 or not 1 <= args.window <= 1024:
        parser.error("need 0.5 <= --alloc-seconds <= 30 and 1 <= --window <= 1024")
    counts = [int(c) for c in args.counts.split(",")]
    if counts != sorted(set(counts)) or counts[0] <= WARMUP_ALLOCATIONS or counts[-1] > 15000:
        parser.error(f"--counts: increasing, each within {WARMUP_ALLOCATIONS + 1}..15000")
    if not set(args.workers_load.split(",")) <= {"pinned", "unpinned"}:
        parser.error("--workers-load takes pinned and/or unpinned")
    if not set(args.paths.split(",")) <= {"channel", "send"}:
        parser.error("--paths takes channel and/or send")
    if shutil.which("turnserver") is None:
        raise SystemExit("coturn's turnserver is not installed (scripts/test.sh installs it)")
    install_sigterm_handler()
    binary = build_turngen()
    cores = os.cpu_count() or 1
    pinned = cores >= 2 and shutil.which("taskset") is not None
    server_core, load_core = (1, 0) if pinned else (None, None)
    where = "each server alone on core 1, the load on core 0" if pinned else "unpinned"
    print(f"{cores} cores; {where}; {args.repeats} repeats; load average {load_average():.2f}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-turn-") as tmp:
        limits = Path(tmp) / "limits.toml"
        limits.write_text(TSUNAGU_LIMITS)

        def tsunagu(workers: int | None = None) -> Command:
            return lambda port, ports: tsunagu_command(limits, port, ports, workers)

        pair = [
            Contender("tsunagu", tsunagu(), PORT_RANGES["tsunagu"]),
            Contender("coturn", coturn_command, PORT_RANGES["coturn"]),
        ]
        w = args.workers
        # The --workers rounds: the servers unpinned, the load on core 0 ("pinned") and/or
        # unpinned as well.
        workers_loads = [
            m for m in args.workers_load.split(",") if w > 1 and (pinned or m != "pinned")
        ]

        def workers_title(mode: str) -> str:
            where = "the load on core 0" if mode == "pinned" else "the load unpinned too"
            return f"tsunagu --workers {w} vs coturn (its default threads), unpinned; {where}"

        workers_pair = [
            Contender(f"tsunagu-w{w}", tsunagu(w), PORT_RANGES["tsunagu"]),
            Contender("coturn", coturn_command, PORT_RANGES["coturn"]),
        ]
        if "alloc" in parts:
            results["alloc"] = alloc_round(
                "one core each (Allocate -> 401 -> Allocate -> success, then Refresh 0)",
                pair,
                args,
                binary,
                server_core=server_core,
                load_core=load_core,
            )
            for mode in workers_loads:
                results[f"alloc_workers_{mode}"] = alloc_round(
                    workers_title(mode),
                    workers_pair,
                    args,
                    binary,
                    server_core=None,
                    load_core=load_core if mode == "pinned" else None,
                )
        if "memory" in parts:
            memory = [Contender(c.name, c.command, MEMORY_PORTS) for c in pair]
            if w > 1:
                memory.append(Contender(f"tsunagu-w{w}", tsunagu(w), MEMORY_PORTS))
            results["memory"] = memory_part(
                memory, args, binary, server_core=server_core, load_core=load_core
            )
        if "relay" in parts:
            sink = Sink(binary, load_core)
            try:
                sources = [f"127.0.3.{n}" for n in range(1, args.senders + 1)]
                load = Load(binary, sink, sources, load_core, args.seconds)
                results["relay"] = relay_round(
                    f"one core each, {args.senders} senders, {args.seconds:g} s a run",
                    pair,
                    args,
                    server_core=server_core,
                    load=load,
                )
                spread = spread_sources(max(args.senders, w), w) if w > 1 else []
                for mode in workers_loads:
                    spread_load = Load(
                        binary, sink, spread, load_core if mode == "pinned" else None, args.seconds
                    )
                    results[f"relay_workers_{mode}"] = relay_round(
                        workers_title(mode),
                        workers_pair,
                        args,
                        server_core=None,
                        load=spread_load,
                    )
            finally:
                sink.close()
    summary(results)
    print(f"\nload average at the end {load_average():.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results), out, indent=2)


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    """The figures as plain data (dataclasses with their derived values)."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out[key] = {
                name: [asdict(r) | {"per_cpu_second": r.per_cpu_second} for r in runs]
                for name, runs in value.items()
            }
        elif key == "memory":
            out[key] = [
                asdict(run) | {"per_allocation": [run.per_allocation(p) for p in run.points[1:]]}
                for run in value
            ]
        else:
            out[key] = [
                asdict(r) | {"mbit": r.mbit, "per_cpu_second": r.per_cpu_second} for r in value
            ]
    return out


if __name__ == "__main__":
    main()
