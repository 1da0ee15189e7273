"""mDNS over real multicast (issue 5, mDNS host candidates), between two network
namespaces each test builds and removes (``netns.lab``), even when it fails::

      a                                      b
    veth0 192.0.2.1/24, 2001:db8::1/64 ---- veth0 192.0.2.2/24, 2001:db8::2/64
    224.0.0.0/4 and default via veth0        224.0.0.0/4 and default via veth0

Both ends of the veth pair live in namespaces the lab created; no multicast touches the
host's own namespace or interfaces. Each side runs a peer process (``ip netns exec``)
holding an :class:`~tsunagu.aio.mdns.MdnsService` (or aioice's mDNS protocol, for interop),
driven by one-line commands on its stdin, answering on stdout. Every wait is bounded
(``wait_for_line`` timeouts, pytest-timeout); missing root or ``ip`` fails the tests.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/nat/netns.py, shared by the namespace tests
    sys.path.insert(0, _HERE)
import netns  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]

A_V4, B_V4 = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only inside the lab's namespaces
A_V6, B_V6 = "2001:db8::1", "2001:db8::2"  # RFC 3849 documentation prefix
WAIT = 10.0  # seconds any one answer from a peer may take at most

TSUNAGU_PEER = """
import asyncio, dataclasses, json, sys, time
from tsunagu.aio.loop import run
from tsunagu.aio.mdns import MdnsService
from tsunagu.mdns import MdnsConfig

async def main() -> None:
    args = json.loads(sys.argv[1])
    config = MdnsConfig(
        announcements=args["announcements"], answer_queries=args["answer_queries"]
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with MdnsService(args["interface"], config=config) as service:
        print("ready", *(ip for ip, _ in service.groups), flush=True)
        for _ in range(100):
            words = (await reader.readline()).decode().split()
            if not words:
                break
            if words[0] == "register":
                print("registered", await service.register(words[1]), flush=True)
            elif words[0] == "resolve":
                start = time.monotonic()
                ip = await service.resolve(words[1], float(words[2]))
                print("resolved", ip or "-", f"{time.monotonic() - start:.3f}", flush=True)
            elif words[0] == "stats":
                print("stats", json.dumps(dataclasses.asdict(service.core.stats)), flush=True)

run(main())  # uvloop, as the project's drivers run
"""

AIOICE_PEER = """
import asyncio, sys, time
from aioice import mdns

async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    protocol = await mdns.create_mdns_protocol()
    try:
        print("ready", flush=True)
        for _ in range(100):
            words = (await reader.readline()).decode().split()
            if not words:
                break
            if words[0] == "publish":
                await protocol.publish(words[1], words[2])
                print("published", flush=True)
            elif words[0] == "resolve":
                start = time.monotonic()
                ip = await protocol.resolve(words[1], float(words[2]))
                print("resolved", ip or "-", f"{time.monotonic() - start:.3f}", flush=True)
    finally:
        await protocol.close()

asyncio.run(main())
"""

LEGACY_QUERY = """
import socket, sys
from tsunagu.mdns.dns import TYPE_A, DnsMessage, Question, decode_message, encode_message

name, group, interface = sys.argv[1:4]
family = socket.AF_INET6 if ":" in group else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as sock:
    sock.settimeout(3.0)
    if family == socket.AF_INET6:
        sock.bind(("::", 0))
        destination = (group, 5353, 0, socket.if_nametoindex(interface))
    else:
        sock.bind(("0.0.0.0", 0))
        destination = (group, 5353)
    query = DnsMessage(id=0x4242, questions=(Question(name, TYPE_A),))
    sock.sendto(encode_message(query), destination)
    data, source = sock.recvfrom(9000)
    answer = decode_message(data)
    (record,) = answer.answers
    print(hex(answer.id), record.address, record.ttl, record.cache_flush, source[0], source[1])
"""


@dataclass
class Peer:
    process: netns.Process
    ready: list[str] = field(default_factory=list)
    """The words of its ``ready`` line (for tsunagu peers: the mDNS groups joined)."""

    def ask(self, command: str, answer: str, timeout: float = WAIT) -> list[str]:
        """Send one command line; the words of the first reply line starting ``answer``."""
        stdin = self.process.popen.stdin
        assert stdin is not None
        stdin.write(command.encode() + b"\n")
        stdin.flush()
        return self.process.wait_for_line(answer, timeout).split()[1:]

    def close_stdin(self) -> None:
        if self.process.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.popen.stdin.close()


@dataclass
class Link:
    lab: netns.Lab
    a: netns.Namespace
    b: netns.Namespace
    peers: list[Peer] = field(default_factory=list)

    def start(self, ns: netns.Namespace, script: str, *args: str) -> Peer:
        """A peer process inside ``ns`` with a stdin pipe; the lab stops it."""
        command = ["ip", "netns", "exec", ns.name, sys.executable, "-c", script, *args]
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the Process closes it
        try:
            popen = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
            )
        except OSError:
            stderr.close()
            raise
        process = netns.Process(command, popen, stderr)
        self.lab.processes.append(process)
        peer = Peer(process)
        self.peers.append(peer)
        peer.ready = process.wait_for_line("ready", WAIT).split()[1:]
        return peer

    def tsunagu(
        self,
        ns: netns.Namespace,
        interface: str,
        *,
        announcements: int = 2,
        answer_queries: bool = True,
    ) -> Peer:
        args: dict[str, Any] = {
            "interface": interface,
            "announcements": announcements,
            "answer_queries": answer_queries,
        }
        return self.start(ns, TSUNAGU_PEER, json.dumps(args))


@pytest.fixture
def link() -> Iterator[Link]:
    with netns.lab("mdns") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        for ns in (a, b):
            # Interfaces created from now on skip IPv6 duplicate address detection, so
            # their addresses are usable at once (the namespace's own setting only).
            ns.run("sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad")
        lab.link(a, "veth0", f"{A_V4}/24", b, "veth0", f"{B_V4}/24")
        for ns, v6 in ((a, A_V6), (b, B_V6)):
            ns.ip("address", "add", f"{v6}/64", "dev", "veth0", "nodad")
            ns.ip("route", "add", "224.0.0.0/4", "dev", "veth0")
            ns.ip("route", "add", "default", "dev", "veth0")
        built = Link(lab, a, b)
        try:
            yield built
        finally:
            for peer in built.peers:  # EOF: each peer says goodbye and exits
                peer.close_stdin()


def test_b_resolves_a_name_registered_by_a_by_query(link: Link) -> None:
    """A does not announce, so only the query/answer path can resolve the name."""
    a = link.tsunagu(link.a, A_V4, announcements=0)
    b = link.tsunagu(link.b, B_V4)
    assert a.ready == b.ready == ["224.0.0.251", "ff02::fb"]  # the interface found for IPv6
    (name,) = a.ask(f"register {A_V4}", "registered")
    assert name.endswith(".local") and len(name) == 36 + len(".local")
    ip, elapsed = b.ask(f"resolve {name} 3", "resolved")
    assert ip == A_V4
    assert float(elapsed) < 0.9  # the first query was answered: no retry needed


def test_b_learns_from_a_unsolicited_announcement(link: Link) -> None:
    """Chromium's behaviour: A announces on register and answers no query at all."""
    b = link.tsunagu(link.b, B_V4)  # listening before A announces
    a = link.tsunagu(link.a, A_V4, answer_queries=False)
    (name,) = a.ask(f"register {A_V4}", "registered")
    ip, elapsed = b.ask(f"resolve {name} 3", "resolved")
    assert ip == A_V4
    assert float(elapsed) < 0.5  # from the first announcement, not the one a second later
    for peer in (a, b):
        stats = json.loads(" ".join(peer.ask("stats", "stats")))
        assert stats["malformed"] == stats["dropped_transmits"] == 0


def test_an_unknown_name_is_unresolved_within_the_timeout(link: Link) -> None:
    link.tsunagu(link.a, A_V4)
    b = link.tsunagu(link.b, B_V4)
    ip, elapsed = b.ask("resolve 0d6e1c2a-5b3f-4e8a-9c1d-2f3e4a5b6c7d.local 0.5", "resolved")
    assert ip == "-"
    assert 0.45 <= float(elapsed) < 2.0


def test_ipv6_only_services_use_ff02_fb(link: Link) -> None:
    a = link.tsunagu(link.a, A_V6, announcements=0)
    b = link.tsunagu(link.b, B_V6)
    assert a.ready == b.ready == ["ff02::fb"]
    (name,) = a.ask(f"register {A_V6}", "registered")
    ip, _ = b.ask(f"resolve {name} 3", "resolved")
    assert ip == A_V6


@pytest.mark.parametrize("group", ["224.0.0.251", "ff02::fb"])
def test_a_legacy_unicast_query_gets_a_unicast_answer(link: Link, group: str) -> None:
    """RFC 6762 §6.7: a one-shot resolver's query from an ephemeral port is answered by
    unicast to that port, its ID kept, TTL at most 10 s, no cache-flush bit (over IPv6
    to the querier's link-local address, through its zone)."""
    a = link.tsunagu(link.a, A_V4)
    (name,) = a.ask(f"register {A_V4}", "registered")
    done = link.b.run(sys.executable, "-c", LEGACY_QUERY, name, group, "veth0")
    ident, ip, ttl, cache_flush, source, port = done.stdout.split()
    assert (ident, ip, ttl, cache_flush, port) == ("0x4242", A_V4, "10", "False", "5353")
    if group == "224.0.0.251":
        assert source == A_V4
    else:
        assert source.startswith("fe80:")  # link-local source, as for all ff02::fb traffic


def test_aioice_publishes_we_resolve(link: Link) -> None:
    """aioice answers queries (never announces), with the cache-flush bit."""
    aioice = link.start(link.a, AIOICE_PEER)
    b = link.tsunagu(link.b, B_V4)
    name = "5f0c6c43-0a8e-4d2f-8b7a-1c2d3e4f5a6b.local"
    aioice.ask(f"publish {name} {A_V4}", "published")
    ip, _ = b.ask(f"resolve {name} 3", "resolved")
    assert ip == A_V4


def test_we_register_aioice_resolves(link: Link) -> None:
    """aioice accepts only answers with the cache-flush bit: ours carry it."""
    a = link.tsunagu(link.a, A_V4)
    aioice = link.start(link.b, AIOICE_PEER)
    (name,) = a.ask(f"register {A_V4}", "registered")
    ip, elapsed = aioice.ask(f"resolve {name} 3", "resolved")
    assert ip == A_V4
    # aioice asks within a second of our announcement: §6 holds the multicast answer
    # back, the unicast one goes at once.
    assert float(elapsed) < 0.5
