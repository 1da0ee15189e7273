"""ICE with mDNS host candidates over real multicast (issue 5): two ``tsunagu ice-peer
--mdns`` processes in two network namespaces the test builds and removes::

      a                                   b
    veth0 192.0.2.1/24  ---------------- veth0 192.0.2.2/24
    224.0.0.0/4 and default via veth0     224.0.0.0/4 and default via veth0

Each peer signals its host candidate under a random ``.local`` name only; the other
resolves it by mDNS and connects to the host candidate. A name nobody answers is dropped
after the bounded resolve timeout, and the agent still connects through the
peer-reflexive candidate the remote's checks reveal.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsunagu.ice.candidate import Candidate, CandidateType

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/nat/netns.py, shared by the namespace tests
    sys.path.insert(0, _HERE)
import netns  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.timeout(40)]

A_IP, B_IP = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only inside the lab's namespaces
ICE_TIMEOUT = 15.0  # ice-peer --timeout: covers one unresolved name (3 s) and the checks
_IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")

Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


@contextmanager
def two_hosts() -> Iterator[tuple[netns.Namespace, netns.Namespace]]:
    with netns.lab("imdns") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, "veth0", f"{A_IP}/24", b, "veth0", f"{B_IP}/24")
        for ns, other in ((a, B_IP), (b, A_IP)):
            ns.ip("route", "add", "224.0.0.0/4", "dev", "veth0")
            ns.ip("route", "add", "default", "via", other)
        yield a, b


@dataclass
class PeerResult:
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    @property
    def selected(self) -> tuple[Candidate, Candidate]:
        for line in self.lines:
            if "selected" in line:
                pair = line["selected"]
                return Candidate.from_sdp(pair["local"]), Candidate.from_sdp(pair["remote"])
        raise AssertionError(f"no pair selected: {self}")

    @property
    def signalled(self) -> list[Candidate]:
        return [Candidate.from_sdp(line["candidate"]) for line in self.lines if "candidate" in line]


async def _pump(
    source: asyncio.subprocess.Process,
    sink: asyncio.subprocess.Process,
    lines: list[dict[str, Any]],
    rewrite: Rewrite,
) -> None:
    """Copy each JSON line ``source`` prints to ``sink``'s stdin (the signalling), as
    ``rewrite`` changes it."""
    assert source.stdout is not None and sink.stdin is not None
    while raw := await source.stdout.readline():
        line = json.loads(raw)
        lines.append(line)
        if sink.returncode is None:
            try:
                sink.stdin.write(json.dumps(rewrite(line)).encode() + b"\n")
                await sink.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass


async def _run_peers(
    a: netns.Namespace, b: netns.Namespace, rewrite_b: Rewrite
) -> list[PeerResult]:
    tsunagu = str(Path(sys.executable).parent / "tsunagu")
    procs: list[asyncio.subprocess.Process] = []
    try:
        for role, ns, ip in (("controlling", a, A_IP), ("controlled", b, B_IP)):
            argv = [
                *("ip", "netns", "exec", ns.name, tsunagu, "ice-peer", "--role", role),
                *("--mdns", "--host-address", ip, "--send", "3", "--timeout", str(ICE_TIMEOUT)),
            ]
            procs.append(
                await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        outputs: list[list[dict[str, Any]]] = [[], []]
        async with asyncio.timeout(ICE_TIMEOUT + 5):
            await asyncio.gather(
                _pump(procs[0], procs[1], outputs[0], lambda line: line),
                _pump(procs[1], procs[0], outputs[1], rewrite_b),
            )
            codes = [await proc.wait() for proc in procs]
            errors = [(await p.stderr.read()).decode() if p.stderr else "" for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return [PeerResult(*result) for result in zip(codes, outputs, errors, strict=True)]


def _exchanged(result: PeerResult) -> bool:
    received = {line["received"] for line in result.lines if "received" in line}
    return {f"pong {i}" for i in range(3)} <= received


def test_host_candidates_hidden_behind_mdns_names_connect() -> None:
    with two_hosts() as (a, b):
        results = asyncio.run(_run_peers(a, b, lambda line: line))
    for result, me, other in zip(results, (A_IP, B_IP), (B_IP, A_IP), strict=True):
        assert result.returncode == 0, results
        assert _exchanged(result), results
        # Nothing signalled carries the host address: one host candidate, named .local.
        signalled = result.signalled
        assert [c.type for c in signalled] == [CandidateType.HOST], results
        assert signalled[0].is_mdns, results
        assert not _IPV4.search(json.dumps(result.lines[: len(signalled) + 2])), results
        # The remote's name was resolved: the pair uses its host candidate, not a
        # peer-reflexive one learnt from its checks.
        local, remote = result.selected
        assert (local.address, local.type) == (me, CandidateType.HOST), results
        assert (remote.address, remote.type) == (other, CandidateType.HOST), results


def test_unresolvable_name_is_dropped_and_peer_reflexive_connects() -> None:
    """b's candidate reaches a under a name that nobody answers: a cannot use it, and
    still connects, to b's peer-reflexive candidate learnt from b's checks (it does not
    wait for the resolution to give up); b resolves a's name as usual."""
    bogus = f"{uuid.uuid4()}.local"

    def rename(line: dict[str, Any]) -> dict[str, Any]:
        if "candidate" not in line:
            return line
        candidate = Candidate.from_sdp(line["candidate"])
        return {"candidate": candidate.to_sdp().replace(candidate.address, bogus)}

    with two_hosts() as (a, b):
        results = asyncio.run(_run_peers(a, b, rename))
    a_result, b_result = results
    for result in results:
        assert result.returncode == 0, results
        assert _exchanged(result), results
    _, remote = a_result.selected
    assert (remote.address, remote.type) == (B_IP, CandidateType.PEER_REFLEXIVE), results
    _, remote = b_result.selected
    assert (remote.address, remote.type) == (A_IP, CandidateType.HOST), results
