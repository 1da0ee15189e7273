"""TURN relay throughput: ``tsunagu turn-server`` against coturn's ``turnserver``, the same
load in one run, ratios printed.

Load: ``--senders`` TURN clients, each a process that allocates over UDP with long-term
credentials and binds a channel (or creates a permission) towards one UDP sink peer --
the control plane in Python, with tsunagu's codec -- then hands its socket to a small C
program (``turnload``, compiled into the git-ignored ``bench/build/`` on first use) that
sends the ready-made ChannelData frame (RFC 8656 §12) or Send indication (§11.2) with
``sendmmsg`` as fast as it can for ``--seconds``. The sink, the same C program, counts
what arrives with ``recvmmsg``. The relayed rate is what reached the peer per second of
sending: a saturated server's socket overflows and the kernel drops the excess, as it
would on a real network. Each server's CPU use over the window is printed: near 100 % of
a core means the server was the limit, not the load; below that, something else took
the core (another process on a shared machine), and the datagrams relayed per second of
server CPU time ("pkt per CPU-s") is the fairer comparison.

Pinned match-up (when the machine has 2+ cores): each server alone on core 1
(``taskset``), senders and sink on core 0. ``--workers N`` adds an unpinned round,
``tsunagu turn-server --workers N`` against coturn with its default threads, the senders'
source addresses spread over tsunagu's workers (it steers by client IP). Loopback only;
every process is bounded in time and stopped by the harness.

    .venv/bin/python bench/bench_turn_server.py [--seconds 2] [--senders 2]
        [--sizes 170,1200] [--paths channel,send] [--repeats 1] [--workers 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from _harness import (
    BUILD_DIR,
    HarnessError,
    ServerProcess,
    free_port,
    install_sigterm_handler,
    print_table,
    ratio,
    running_server,
    taskset_prefix,
)

from tsunagu.aio.turn_server import worker_for_ip

HOST = "127.0.0.1"
USER, PASSWORD, REALM = "bench", "bench-password", "bench.test"
MIN_PORT, MAX_PORT = 42000, 43999

Command = Callable[[int], list[str]]
"""The argv of a server listening on the given port."""

LOAD_C = r"""
/* turnload: the data plane of bench_turn_server.py.
 *   turnload sink             bind 127.0.0.1:0 and print the port; count datagrams
 *                             (recvmmsg); print the count for every line read on stdin.
 *   turnload blast FD SEC HEX wait for a line on stdin, then send the frame HEX on the
 *                             connected UDP socket FD (sendmmsg, 64 at a time) for SEC
 *                             seconds; print {"sent": N, "elapsed": S}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long long drain(int fd, struct mmsghdr *msgs) {
    long long count = 0;
    int n;
    while ((n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL)) > 0)
        count += n;
    return count;
}

static int sink(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = 1 << 24;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t len = sizeof addr;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) ||
        getsockname(fd, (struct sockaddr *)&addr, &len))
        return 1;
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    static char buffers[BATCH][2048];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buffers[i];
        iov[i].iov_len = sizeof buffers[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long count = 0;
    struct pollfd fds[2] = {{fd, POLLIN, 0}, {0, POLLIN, 0}};
    char line[64];
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (fds[0].revents & POLLIN)
            count += drain(fd, msgs);
        if (fds[1].revents & (POLLIN | POLLHUP)) {
            if (!fgets(line, sizeof line, stdin))
                return 0;
            count += drain(fd, msgs);
            printf("%lld\n", count);
            fflush(stdout);
        }
    }
}

static int blast(int fd, double seconds, const char *hex) {
    static unsigned char frame[65536];
    size_t len = strlen(hex) / 2;
    if (len > sizeof frame)
        return 1;
    for (size_t i = 0; i < len; i++)
        sscanf(hex + 2 * i, "%2hhx", &frame[i]);
    struct iovec iov = {frame, len};
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    long long sent = 0;
    double start = now(), stop = start + seconds, t = start;
    for (unsigned round = 0; t < stop; round++) {
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0)  /* else ENOBUFS, or an ICMP error reported: go on */
            sent += n;
        if ((round & 15) == 0)
            t = now();
    }
    printf("{\"sent\": %lld, \"elapsed\": %.6f}\n", sent, now() - start);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "sink"))
        return sink();
    if (argc == 5 && !strcmp(argv[1], "blast"))
        return blast(atoi(argv[2]), atof(argv[3]), argv[4]);
    fprintf(stderr, "usage: turnload sink | turnload blast FD SECONDS HEX\n");
    return 2;
}
"""

SENDER = r"""
import os, socket, sys
from tsunagu.stun.attributes import (ChannelNumber, Data, Nonce, Realm, RequestedTransport,
    Username, XorPeerAddress)
from tsunagu.stun.constants import MessageClass, Method
from tsunagu.stun.credentials import long_term_key
from tsunagu.stun.framing import ChannelData
from tsunagu.stun.message import Message

(host, port, sink_port, size, path, seconds, source, user, password, realm,
 blaster) = sys.argv[1:]
server, sink = (host, int(port)), ("127.0.0.1", int(sink_port))
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


def build_turnload() -> Path:
    """Compile the C data plane into bench/build/ (git-ignored) when it changed."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source, binary = BUILD_DIR / "turnload.c", BUILD_DIR / "turnload"
    if binary.exists() and source.exists() and source.read_text() == LOAD_C:
        return binary
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise HarnessError("no C compiler (gcc or cc): the load generator cannot be built")
    source.write_text(LOAD_C)
    partial = BUILD_DIR / f".turnload.{os.getpid()}"
    built = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(partial), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if built.returncode != 0:
        raise HarnessError(f"turnload did not compile:\n{built.stderr}")
    partial.replace(binary)
    return binary


class Sink:
    """The peer: ``turnload sink`` in its own process, counting datagrams."""

    def __init__(self, binary: Path, core: int | None) -> None:
        self.process = subprocess.Popen(
            [*taskset_prefix(core), str(binary), "sink"],
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
class Run:
    server: str
    path: str
    size: int
    offered_pps: float
    relayed_pps: float
    delivered: float
    server_cpu: float

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


def measure(name: str, server: ServerProcess, port: int, load: Load, path: str, size: int) -> Run:
    """One run: the senders allocate, then send for ``load.seconds`` at once."""
    senders = []
    for source in load.sources:
        argv = [*taskset_prefix(load.core), sys.executable, "-c", SENDER, HOST, str(port)]
        argv += [str(load.sink.port), str(size), path, f"{load.seconds:g}", source]
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
        cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - started)
        relayed = load.sink.settled() - before
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
            sender.wait(10)
    sent = sum(r["sent"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    return Run(name, path, size, sent / elapsed, relayed / elapsed, relayed / max(sent, 1), cpu)


def coturn_command(port: int) -> list[str]:
    return [
        shutil.which("turnserver") or "/usr/bin/turnserver",
        "-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log",
        "--log-file", "stdout", "--pidfile", "turnserver.pid",
        "--listening-ip", HOST, "--relay-ip", HOST, "--listening-port", str(port),
        "--min-port", str(MIN_PORT), "--max-port", str(MAX_PORT),
        "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--allow-loopback-peers", "--no-tcp-relay",
    ]  # fmt: skip


def tsunagu_command(port: int, workers: int | None = None) -> list[str]:
    argv = [
        sys.executable, "-m", "tsunagu", "turn-server",
        "--listen", f"{HOST}:{port}", "--relay-ip", HOST,
        "--min-port", str(MIN_PORT), "--max-port", str(MAX_PORT),
        "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--allow-peer", "127.0.0.0/8", "--log-level", "warning", "--drain-timeout", "0",
    ]  # fmt: skip
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


def spread_sources(count: int, workers: int) -> list[str]:
    """Loopback source addresses covering tsunagu's worker slots round robin."""
    by_slot: dict[int, list[str]] = {}
    for n in range(1, 250):
        ip = f"127.0.3.{n}"
        by_slot.setdefault(worker_for_ip(ip, workers), []).append(ip)
    slots = sorted(by_slot)
    return [by_slot[slots[i % len(slots)]][i // len(slots)] for i in range(count)]


def run_round(
    title: str,
    servers: dict[str, Command],
    args: argparse.Namespace,
    *,
    server_core: int | None,
    load: Load,
) -> list[Run]:
    """Every path and size against every server (alternating), then the table."""
    print(f"\n== {title}", flush=True)
    runs: list[Run] = []
    paths = args.paths.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    for path in paths:
        for size in sizes:
            for name, command in servers.items():
                port = free_port(HOST, span=1)
                with running_server(name, command(port), core=server_core, port=port) as server:
                    samples = [
                        measure(name, server, port, load, path, size) for _ in range(args.repeats)
                    ]
                median = statistics.median(r.relayed_pps for r in samples)
                runs.append(min(samples, key=lambda r: abs(r.relayed_pps - median)))
    names = list(servers)
    rows: list[list[str]] = []
    for path in paths:
        for size in sizes:
            cell = {r.server: r for r in runs if r.path == path and r.size == size}
            for name in names:
                r = cell[name]
                rows.append(
                    [
                        f"{name} {path} {size} B",
                        f"{r.relayed_pps:,.0f}",
                        f"{r.mbit:,.1f}",
                        f"{r.offered_pps:,.0f}",
                        f"{r.delivered:.0%}",
                        f"{r.server_cpu:.0%}",
                        f"{r.per_cpu_second:,.0f}",
                    ]
                )
            ours, theirs = cell[names[0]], cell[names[1]]
            rows.append(
                [
                    f"  {names[0]} / {names[1]}",
                    ratio(ours.relayed_pps, theirs.relayed_pps),
                    "",
                    "",
                    "",
                    "",
                    ratio(ours.per_cpu_second, theirs.per_cpu_second),
                ]
            )
    headers = [
        "run",
        "relayed pkt/s",
        "Mbit/s",
        "offered pkt/s",
        "delivered",
        "server CPU",
        "pkt per CPU-s",
    ]
    print_table(headers, rows)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="sending time per run")
    parser.add_argument("--senders", type=int, default=2, help="TURN clients sending at once")
    parser.add_argument("--sizes", default="170,1200", help="payload sizes in bytes")
    parser.add_argument("--paths", default="channel,send", help="channel and/or send")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (median)")
    parser.add_argument(
        "--workers", type=int, default=0, help="also run tsunagu --workers N, unpinned (0: no)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    if not 0.2 <= args.seconds <= 30 or not 1 <= args.senders <= 16 or args.repeats < 1:
        parser.error("need 0.2 <= --seconds <= 30, 1 <= --senders <= 16, --repeats >= 1")
    if not set(args.paths.split(",")) <= {"channel", "send"}:
        parser.error("--paths takes channel and/or send")
    if shutil.which("turnserver") is None:
        raise SystemExit("coturn's turnserver is not installed (scripts/test.sh installs it)")
    install_sigterm_handler()
    binary = build_turnload()
    cores = os.cpu_count() or 1
    pinned = cores >= 2 and shutil.which("taskset") is not None
    server_core, load_core = (1, 0) if pinned else (None, None)
    where = "each server alone on core 1, the load on core 0" if pinned else "unpinned"
    print(f"{cores} cores; {where}; {args.senders} senders, {args.seconds:g} s a run")
    sink = Sink(binary, load_core)
    runs: list[Run] = []
    try:
        sources = [f"127.0.3.{n}" for n in range(1, args.senders + 1)]
        load = Load(binary, sink, sources, load_core, args.seconds)
        servers: dict[str, Command] = {"tsunagu": tsunagu_command, "coturn": coturn_command}
        runs += run_round("one core each", servers, args, server_core=server_core, load=load)
        if args.workers > 1:
            spread = spread_sources(max(args.senders, args.workers), args.workers)
            workers = args.workers

            def tsunagu_workers(port: int) -> list[str]:
                return tsunagu_command(port, workers)

            runs += run_round(
                f"unpinned: tsunagu --workers {workers} vs coturn (its default threads)",
                {f"tsunagu-w{workers}": tsunagu_workers, "coturn": coturn_command},
                args,
                server_core=None,
                load=Load(binary, sink, spread, None, args.seconds),
            )
    finally:
        sink.close()
    if args.json:
        with open(args.json, "w") as out:
            figures = [
                asdict(r) | {"mbit": r.mbit, "per_cpu_second": r.per_cpu_second} for r in runs
            ]
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
