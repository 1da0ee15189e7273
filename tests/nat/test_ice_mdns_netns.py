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

import json
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tsunagu.ice.candidate import Candidate, CandidateType

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/nat/netns.py, shared by the namespace tests
    sys.path.insert(0, _HERE)
import netns  # noqa: E402
from icepeers import PeerResult, Rewrite, run_pair  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.timeout(40)]

A_IP, B_IP = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only inside the lab's namespaces
ICE_TIMEOUT = 15.0  # ice-peer --timeout: covers one unresolved name (3 s) and the checks
_IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")


@contextmanager
def two_hosts() -> Iterator[tuple[netns.Namespace, netns.Namespace]]:
    with netns.lab("imdns") as lab:
        yield netns.two_hosts(lab, ("a", "b"), (A_IP, B_IP))


def run_peers(a: netns.Namespace, b: netns.Namespace, rewrite_b: Rewrite) -> list[PeerResult]:
    args = ["--mdns", "--send", "3", "--host-address"]
    return run_pair(
        [(a, "controlling", [*args, A_IP]), (b, "controlled", [*args, B_IP])],
        ICE_TIMEOUT,
        rewrite_second=rewrite_b,
    )


def signalled_candidates(result: PeerResult) -> list[Candidate]:
    return [Candidate.from_sdp(line["candidate"]) for line in result.lines if "candidate" in line]


def _exchanged(result: PeerResult) -> bool:
    return {f"pong {i}" for i in range(3)} <= result.received


def test_host_candidates_hidden_behind_mdns_names_connect() -> None:
    with two_hosts() as (a, b):
        results = run_peers(a, b, lambda line: line)
    for result, me, other in zip(results, (A_IP, B_IP), (B_IP, A_IP), strict=True):
        assert result.returncode == 0, results
        assert _exchanged(result), results
        # Nothing signalled carries the host address: one host candidate, named .local.
        signalled = signalled_candidates(result)
        assert [c.type for c in signalled] == [CandidateType.HOST], results
        assert signalled[0].is_mdns, results
        assert not _IPV4.search(json.dumps(result.lines[: len(signalled) + 2])), results
        # The pair joins the two real host addresses. Its remote is the resolved host
        # candidate, or -- when the peer's first check (both sides trickle at once) beats
        # the resolution -- the peer-reflexive candidate that the resolved one later
        # replaces (RFC 8838 §11.3); "selected" is printed at selection. That the name
        # itself resolves over multicast is shown by tests/nat/test_mdns_netns.py, and the
        # resolved host candidate by the Chromium test, where checks start only after the
        # answer.
        assert result.selected is not None, results
        local, remote = result.selected
        assert (local.address, local.type) == (me, CandidateType.HOST), results
        assert remote.address == other, results
        assert remote.type in (CandidateType.HOST, CandidateType.PEER_REFLEXIVE), results


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
        results = run_peers(a, b, rename)
    a_result, b_result = results
    for result in results:
        assert result.returncode == 0, results
        assert _exchanged(result), results
    assert a_result.selected is not None and b_result.selected is not None, results
    _, remote = a_result.selected
    assert (remote.address, remote.type) == (B_IP, CandidateType.PEER_REFLEXIVE), results
    _, remote = b_result.selected
    assert (remote.address, remote.type) == (A_IP, CandidateType.HOST), results
