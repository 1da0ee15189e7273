"""``tsunagu turn-server`` as a process, operated: JSON logs, fuzzed traffic over UDP and TCP
that never stops it, and ``--workers 2`` with ``--metrics`` (ports shared, metrics summed
over the workers, health 503 while draining, exit 0 on SIGTERM). Clients and fuzzers run
on loopback only."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tsunagu.stun.attributes import (
    Attribute,
    ChannelNumber,
    Data,
    Lifetime,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
)
from tsunagu.stun.constants import TRANSPORT_UDP, MessageClass, Method
from tsunagu.stun.credentials import long_term_key
from tsunagu.stun.framing import ChannelData
from tsunagu.stun.message import Message
from tsunagu.turn.transport import Address

REALM = "cli-ops.test"
USER, PASSWORD = "alice", "secret"
TIMEOUT = 5.0


class Server:
    """``tsunagu turn-server`` in a subprocess; stderr goes to a file (never a full pipe)."""

    def __init__(self, *extra: str) -> None:
        base = 24000 + (os.getpid() * 11) % 7000
        self.log: IO[str] = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
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
                str(base + 399),
                "--realm",
                REALM,
                "--user",
                f"{USER}:{PASSWORD}",
                "--allow-peer",
                "127.0.0.0/8",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)
        self.line = self.proc.stdout.readline() if ready else ""
        if "listening" not in self.line:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"turn-server did not start: {self.line!r} {self.stderr()}")

    def address(self, kind: str) -> Address:
        match = re.search(rf"{kind} ([0-9.]+):(\d+)", self.line)
        assert match, self.line
        return match.group(1), int(match.group(2))

    def stderr(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()
        server.log.close()


class Client:
    """A blocking TURN client over UDP from a chosen loopback address."""

    def __init__(self, server: Address, password: str = PASSWORD, ip: str = "127.0.0.1") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.settimeout(TIMEOUT)
        self.address: Address = self.sock.getsockname()
        self.key = long_term_key(USER, REALM, password)
        self.nonce: str | None = None
        self.counter = 0

    def request(self, method: int, attributes: list[Attribute]) -> Message:
        for _ in range(3):
            self.counter += 1
            tid = self.counter.to_bytes(12, "big")
            attrs = list(attributes)
            key = None
            if self.nonce is not None:
                attrs += [Username(USER), Realm(REALM), Nonce(self.nonce)]
                key = self.key
            self.sock.sendto(
                Message(method, MessageClass.REQUEST, tid, attrs).encode(key), self.server
            )
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if data[8:20] == tid:
                    break
            response = Message.decode(data)
            error, nonce = response.error, response.get(Nonce)
            if error is not None and error.code in (401, 438) and nonce is not None:
                if error.code == 401 and self.nonce is not None:
                    return response
                self.nonce = nonce.value
                continue
            return response
        raise AssertionError("no answer after the challenge")

    def allocate(self) -> Address:
        response = self.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None, response
        return relayed.address

    def close(self) -> None:
        self.sock.close()


def relays_round_trip(server: Address, ip: str = "127.0.0.1") -> None:
    """A fresh client allocates, and a datagram goes to a peer and back through it."""
    client = Client(server, ip=ip)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(TIMEOUT)
    try:
        relayed = client.allocate()
        bound = client.request(
            Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(peer.getsockname())]
        )
        assert bound.error is None, bound
        client.sock.sendto(ChannelData(0x4000, b"out").encode(), server)
        data, source = peer.recvfrom(100)
        assert (data, source) == (b"out", relayed)
        peer.sendto(b"back", relayed)
        assert ChannelData.decode(client.sock.recv(100)) == ChannelData(0x4000, b"back")
        assert client.request(Method.REFRESH, [Lifetime(0)]).error is None
    finally:
        client.close()
        peer.close()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape:\n{text}")


# -- structured logs ---------------------------------------------------------------------------


def test_json_logs_carry_auth_failures_with_source_and_the_allocation_lifecycle(
    servers: list[Server],
) -> None:
    server = Server("--log-format", "json", "--drain-timeout", "0")
    servers.append(server)
    udp = server.address("udp")
    intruder = Client(udp, password="wrong")
    try:
        assert intruder.request(Method.ALLOCATE, [RequestedTransport(17)]).error.code == 401  # type: ignore[union-attr]
    finally:
        intruder.close()
    relays_round_trip(udp)
    assert server.stop() == 0
    events = [json.loads(line) for line in server.stderr().splitlines() if line.strip()]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        assert {"time", "level", "logger", "pid"} <= event.keys(), event
        by_name.setdefault(event.get("event", ""), []).append(event)
    failures = [e for e in by_name["auth-failed"] if e["user"] == USER]
    assert len(failures) == 1 and failures[0]["level"] == "warning"
    assert failures[0]["source"] == "udp:{}:{}".format(*intruder.address)
    assert failures[0]["code"] == 401
    (created,) = by_name["allocation-created"]
    assert created["user"] == USER and created["lifetime"] == 600
    (deleted,) = by_name["allocation-deleted"]
    assert deleted["reason"] == "refresh" and deleted["client"] == created["client"]
    assert "draining" in by_name


# -- fuzzing ------------------------------------------------------------------------------------


def valid_corpus(rng: random.Random) -> list[bytes]:
    """Well-formed TURN traffic to mutate: requests signed and not, indications, frames."""
    key = long_term_key(USER, REALM, PASSWORD)
    peer = ("127.0.0.1", 9)
    signed = [Username(USER), Realm(REALM), Nonce("x" * 24)]
    messages = [
        Message(Method.ALLOCATE, MessageClass.REQUEST, rng.randbytes(12), [RequestedTransport(17)]),
        Message(
            Method.ALLOCATE,
            MessageClass.REQUEST,
            rng.randbytes(12),
            [RequestedTransport(17), Lifetime(3600), *signed],
        ),
        Message(Method.REFRESH, MessageClass.REQUEST, rng.randbytes(12), [Lifetime(0), *signed]),
        Message(
            Method.CREATE_PERMISSION,
            MessageClass.REQUEST,
            rng.randbytes(12),
            [XorPeerAddress(peer), XorPeerAddress(("::1", 1)), *signed],
        ),
        Message(
            Method.CHANNEL_BIND,
            MessageClass.REQUEST,
            rng.randbytes(12),
            [ChannelNumber(0x4000), XorPeerAddress(peer), *signed],
        ),
        Message(
            Method.SEND,
            MessageClass.INDICATION,
            rng.randbytes(12),
            [XorPeerAddress(peer), Data(b"d")],
        ),
        Message(Method.BINDING, MessageClass.REQUEST, rng.randbytes(12)),
    ]
    corpus = [
        m.encode(key if i in (1, 2, 3, 4) else None, fingerprint=i % 2 == 0)
        for i, m in enumerate(messages)
    ]
    corpus += [
        ChannelData(0x4000, b"payload").encode(),
        ChannelData(0x4FFF, b"").encode(stream=True),
    ]
    return corpus


def mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if choice == 0 and buffer:  # flip bits
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
        elif choice == 1 and buffer:  # truncate
            del buffer[rng.randrange(len(buffer)) :]
        elif choice == 2:  # insert random bytes
            at = rng.randrange(len(buffer) + 1)
            buffer[at:at] = rng.randbytes(rng.randint(1, 16))
        elif choice == 3 and len(buffer) >= 4:  # lie about the length
            struct.pack_into("!H", buffer, 2, rng.choice((0, 1, 3, 0xFFFF, rng.randrange(1 << 16))))
        elif choice == 4 and len(buffer) > 24:  # corrupt an attribute header
            at = 20 + 4 * rng.randrange((len(buffer) - 20) // 4)
            if at + 4 <= len(buffer):
                buffer[at : at + 4] = rng.randbytes(4)
        else:  # duplicate a slice
            if buffer:
                start = rng.randrange(len(buffer))
                buffer += buffer[start : start + rng.randint(1, 40)]
    return bytes(buffer)


def fuzz_input(rng: random.Random, corpus: list[bytes]) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randint(0, 700))
    if kind == 1:  # a plausible STUN header over random attributes
        body = rng.randbytes(rng.randrange(0, 200) * 4)
        head = struct.pack("!HHI", rng.randrange(0x4000), len(body), 0x2112A442)
        return head + rng.randbytes(12) + body
    return mutate(rng, rng.choice(corpus))


def test_fuzzed_udp_and_tcp_traffic_never_stops_the_server(servers: list[Server]) -> None:
    server = Server("--log-level", "error", "--drain-timeout", "0")
    servers.append(server)
    target = server.address("udp")
    rng = random.Random(20261129)
    corpus = valid_corpus(rng)
    # UDP: bounded, from another loopback source than the checks below (the server
    # rate-limits unauthenticated answers per source IP).
    fuzzer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fuzzer.bind(("127.0.0.2", 0))
    fuzzer.setblocking(False)
    try:
        for n in range(3000):
            with contextlib.suppress(BlockingIOError):
                fuzzer.sendto(fuzz_input(rng, corpus), target)
            if n % 100 == 0:
                with contextlib.suppress(BlockingIOError):
                    while fuzzer.recv(65536):
                        pass
    finally:
        fuzzer.close()
    # TCP: streams of valid, mutated and random frames, some cut short; bounded.
    for _ in range(40):
        stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stream.bind(("127.0.0.3", 0))
        stream.settimeout(TIMEOUT)
        try:
            stream.connect(target)
            chunks = [
                rng.choice(corpus) if rng.random() < 0.3 else fuzz_input(rng, corpus)
                for _ in range(rng.randint(1, 20))
            ]
            with contextlib.suppress(OSError):  # the server may hang up on bad framing
                stream.sendall(b"".join(chunks))
        finally:
            stream.close()
    half = socket.create_connection(target, TIMEOUT)  # a frame announced, never finished
    half.sendall(struct.pack("!HHI", 0x0003, 2000, 0x2112A442) + bytes(12) + bytes(100))
    try:
        assert server.proc.poll() is None, server.stderr()
        relays_round_trip(target)  # UDP still relays
        tcp_client = socket.create_connection(target, TIMEOUT)  # TCP still answers
        try:
            request = Message(
                Method.ALLOCATE, MessageClass.REQUEST, b"T" * 12, [RequestedTransport(17)]
            )
            tcp_client.sendall(request.encode())
            head = tcp_client.recv(20, socket.MSG_WAITALL)
            body = tcp_client.recv(int.from_bytes(head[2:4]), socket.MSG_WAITALL)
            answer = Message.decode(head + body)
            assert answer.error is not None and answer.error.code == 401  # challenged
        finally:
            tcp_client.close()
        assert server.proc.poll() is None
    finally:
        half.close()
    assert server.stop() == 0
    log = server.stderr()
    assert "Traceback" not in log and "Exception in callback" not in log, log


# -- workers ---------------------------------------------------------------------------------------


def test_workers_share_the_ports_and_the_supervisor_sums_their_metrics(
    servers: list[Server],
) -> None:
    server = Server(
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
        "--drain-timeout",
        "20",
        "--log-level",
        "warning",
    )
    servers.append(server)
    assert server.line.rstrip().endswith("workers 2"), server.line
    udp = server.address("udp")
    assert server.address("tcp") == udp
    base = "http://{}:{}".format(*server.address("metrics"))
    clients = [Client(udp, ip=f"127.0.1.{n}") for n in range(1, 17)]  # spread by the hash
    try:
        relayed = [client.allocate() for client in clients]
        assert len(set(relayed)) == len(clients)
        status, text = http_get(base + "/metrics")
        assert status == 200
        assert sample(text, "tsunagu_turn_workers") == 2
        assert sample(text, "tsunagu_turn_allocations") == len(clients)
        assert sample(text, "tsunagu_turn_relay_ports") == len(clients)
        assert http_get(base + "/healthz") == (200, "ok\n")
        relays_round_trip(udp, ip="127.0.2.1")
        # SIGTERM: draining (health says so), the allocations still relay, exit 0
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while http_get(base + "/healthz")[0] != 503:  # bounded: the signal is asynchronous
            assert time.monotonic() < deadline, "health never turned 503"
        status, text = http_get(base + "/metrics")
        assert sample(text, "tsunagu_turn_draining") == 1
        for client in clients:
            assert client.request(Method.REFRESH, [Lifetime(0)]).error is None
        assert server.proc.wait(TIMEOUT) == 0  # the last allocation gone: done draining
    finally:
        for client in clients:
            client.close()
