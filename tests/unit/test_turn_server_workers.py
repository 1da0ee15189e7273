"""The worker mailboxes behind ``turn-server --workers`` (tsunagu.aio.workers), in one
process: posts with file descriptors, supervisor queries and their bounds; and the
source-address affinity the TURN server programs into its SO_REUSEPORT groups."""

from __future__ import annotations

import socket
import threading

import pytest

from tsunagu.aio.turn_server import _steer_by_source, worker_for_ip
from tsunagu.aio.workers import MAIL_SIZE, WorkerGroup
from tsunagu.turn.policy import PeerPolicy


def test_a_post_carries_bytes_and_a_file_descriptor() -> None:
    group = WorkerGroup(3)
    try:
        sender, receiver = group.context(0), group.context(2)
        left, right = socket.socketpair()
        try:
            assert sender.post(2, b"hand-over", [left.fileno()])
            (mail,) = receiver.receive()
            assert (mail.kind, mail.body, len(mail.fds)) == ("post", b"hand-over", 1)
            passed = socket.socket(fileno=mail.fds[0])  # a duplicate of ``left``
            passed.sendall(b"through the passed descriptor")
            assert right.recv(100) == b"through the passed descriptor"
            passed.close()
        finally:
            left.close()
            right.close()
        assert group.context(1).receive() == []  # nothing for anyone else
        assert not sender.post(2, b"x" * (MAIL_SIZE + 1))  # too large: refused, not sent
        assert not sender.post(3, b"no such worker")
        assert mail.reply(b"posts cannot be answered") is False
    finally:
        group.close()


def test_supervisor_query_collects_answers_and_is_bounded() -> None:
    group = WorkerGroup(2)
    try:
        answered = threading.Event()

        def worker_zero() -> None:
            # One worker answers; worker 1 never reads its mailbox.
            inbox = group.context(0)
            while not answered.is_set():
                for mail in inbox.receive():
                    assert mail.kind == "query" and mail.body == b"stats"
                    assert mail.reply(b"zero")
                    answered.set()

        thread = threading.Thread(target=worker_zero)
        thread.start()
        try:
            assert group.query(b"stats", 1.0) == [(0, b"zero")]  # worker 1: timed out
        finally:
            answered.set()
            thread.join(5)
        # A late answer to an earlier query is not taken for the next one's.
        assert group.context(1).receive()[0].reply(b"late")
        assert group.query(b"stats", 0.1) == []
    finally:
        group.close()


def test_affinity_program_matches_worker_for_ip() -> None:
    """The kernel's choice (the BPF program) and worker_for_ip agree, IPv4 and IPv6."""
    for family, host, sources in (
        (socket.AF_INET, "127.0.0.1", [f"127.0.{i}.{j}" for i in range(2) for j in range(1, 25)]),
        (socket.AF_INET6, "::1", ["::1"]),
    ):
        for workers in (2, 3):
            group: list[socket.socket] = []
            try:
                port = 0
                for _ in range(workers):
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    group.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.bind((host, port))
                    port = sock.getsockname()[1]
                    sock.setblocking(False)
                assert _steer_by_source(group[0], workers)
                for source in sources:
                    with socket.socket(family, socket.SOCK_DGRAM) as client:
                        client.bind((source, 0))
                        client.sendto(b"which worker?", (host, port))
                    got = []
                    for slot, sock in enumerate(group):
                        try:
                            sock.recv(64)
                            got.append(slot)
                        except BlockingIOError:
                            pass
                    assert got == [worker_for_ip(source, workers)], source
            finally:
                for sock in group:
                    sock.close()


@pytest.mark.parametrize("workers", [2, 4])
def test_worker_for_ip_spreads_addresses(workers: int) -> None:
    counts = [0] * workers
    for n in range(4096):
        counts[worker_for_ip(f"10.{n >> 8}.{n & 255}.7", workers)] += 1
    assert min(counts) > 4096 / workers * 0.8


def test_own_address_cache_is_bounded_and_changes_no_answer() -> None:
    policy = PeerPolicy(allow=(), deny=(), own_addresses=[("192.0.2.1", 3478)], own_port_ranges=[])
    assert policy.is_own(("192.0.2.1", 3478)) and policy.is_own(("::ffff:192.0.2.1", 3478))
    for n in range(5000):
        assert not policy.is_own(("192.0.2.1", 10000 + n))
    assert len(policy._own_cache) <= 4096
    assert policy.is_own(("192.0.2.1", 3478))
