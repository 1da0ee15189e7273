"""Two tsunagu ICE agents behind two real Linux kernel NATs (issue 6 §4).

Every test builds its own five network namespaces and removes them afterwards, even when
it fails (``netns.lab``)::

    lanA 10.0.1.2 ---- natA 10.0.1.1 | wan 198.51.100.1 --+
                                                           br0 in "inet" (198.51.100.254)
    lanB 10.0.2.2 ---- natB 10.0.2.1 | wan 198.51.100.2 --+   lo: 203.0.113.1 STUN
                                                                  203.0.113.3 TURN

The NATs' outsides share one bridged segment in "inet" (the public internet: each NAT
reaches the other's public address and, through 198.51.100.254, the servers); the LANs'
private networks are routed nowhere, so host candidates are useless and every working
path goes through both NATs. Each NAT drops unsolicited inbound packets on its outside
interface (``ct state new,invalid drop``), as home routers do and as the issue asks: an
early check would otherwise make the kernel answer ICMP port unreachable and leave a
conntrack entry that moves the host's later mapping (see test_kernel_nat.py).

- ``masquerade`` (endpoint-independent mapping, port-preserving): the agents connect
  directly, through the server-reflexive / peer-reflexive addresses, no relay.
- ``masquerade fully-random`` (address-and-port-dependent mapping) on both sides: with STUN
  only, no pair works and both agents give up; with ``tsunagu turn-server`` on the public
  side they connect through a relayed candidate.

The two ``tsunagu ice-peer`` processes run inside their LAN namespaces; the test is the
signalling channel, copying each one's JSON lines to the other's stdin.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tsunagu.ice.candidate import Candidate, CandidateType

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/nat/netns.py, shared by the namespace tests
    sys.path.insert(0, _HERE)
import netns  # noqa: E402
from icepeers import PeerResult, run_pair  # noqa: E402

pytestmark = pytest.mark.netns

STUN_IP, TURN_IP = "203.0.113.1", "203.0.113.3"
STUN_URI = f"stun:{STUN_IP}:3478"
TURN_URI = f"turn:{TURN_IP}:3478"
TURN_USER, TURN_PASSWORD = "alice", "wonderland"
PUBLIC_NET = "198.51.100.0/24"
ICE_TIMEOUT = 8.0  # ice-peer --timeout: veth round trips take well under 1 ms
TEST_BUDGET = 30  # seconds: pytest-timeout fails a test that takes longer


@dataclass(frozen=True)
class Side:
    nat: netns.Namespace
    lan: netns.Namespace
    public: str  # the NAT's outside address
    host: str  # the LAN host's address


@dataclass(frozen=True)
class Topology:
    inet: netns.Namespace
    a: Side
    b: Side


def _nat_rules(fully_random: bool) -> str:
    masquerade = "masquerade fully-random" if fully_random else "masquerade"
    return f"""table ip tsunagu_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {masquerade}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new,invalid drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state new,invalid drop
  }}
}}
"""


@contextmanager
def two_kernel_nats(fully_random: bool) -> Iterator[Topology]:
    """The five namespaces, both NATs loaded with the same kind of masquerade; no server."""
    with netns.lab("knice", "nft") as lab:
        inet = lab.namespace("inet")
        inet.ip("link", "add", "br0", "type", "bridge")
        inet.ip("address", "add", "198.51.100.254/24", "dev", "br0")
        inet.ip("link", "set", "br0", "up")
        for ip in (STUN_IP, TURN_IP):
            inet.ip("address", "add", f"{ip}/32", "dev", "lo")
        sides = []
        for name, public, subnet in (("a", "198.51.100.1", 1), ("b", "198.51.100.2", 2)):
            nat, lan = lab.namespace(f"nat{name}"), lab.namespace(f"lan{name}")
            lab.link(nat, "wan", f"{public}/24", inet, f"port{name}", None)
            inet.ip("link", "set", f"port{name}", "master", "br0")
            host = f"10.0.{subnet}.2"
            lab.link(nat, "lan", f"10.0.{subnet}.1/24", lan, "eth0", f"{host}/24")
            nat.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.254")
            lan.ip("route", "add", "default", "via", f"10.0.{subnet}.1")
            nat.sysctl("net.ipv4.ip_forward", "1")
            nat.nft(_nat_rules(fully_random))
            sides.append(Side(nat, lan, public, host))
        yield Topology(inet, sides[0], sides[1])


def start_servers(inet: netns.Namespace, turn: bool) -> None:
    """``tsunagu stun-server`` (and ``turn-server``); returns once they print 'listening'."""
    stun = inet.start("tsunagu", "stun-server", "--listen", f"{STUN_IP}:3478")
    stun.wait_for_line("listening ")
    if turn:
        server = inet.start(
            "tsunagu",
            "turn-server",
            "--listen",
            f"{TURN_IP}:3478",
            "--relay-ip",
            TURN_IP,
            "--realm",
            "tsunagu.test",
            "--user",
            f"{TURN_USER}:{TURN_PASSWORD}",
            "--allow-peer",
            PUBLIC_NET,
        )
        server.wait_for_line("listening ")


def run_peers(topo: Topology, turn: bool) -> list[PeerResult]:
    """Controlling ``ice-peer`` in lanA, controlled in lanB, wired to each other."""
    extra = [f"--turn={TURN_URI}", f"--username={TURN_USER}", f"--password={TURN_PASSWORD}"]
    return run_pair(
        [
            (side.lan, role, ["--stun", STUN_URI, *(extra if turn else []), "--send", "3",
                              "--host-address", side.host])
            for role, side in (("controlling", topo.a), ("controlled", topo.b))
        ],
        ICE_TIMEOUT,
    )  # fmt: skip


def _connected(results: list[PeerResult]) -> list[tuple[Candidate, Candidate]]:
    pairs = []
    for result in results:
        assert result.returncode == 0, results
        selected = result.selected
        assert selected is not None, results
        assert {f"pong {i}" for i in range(3)} <= result.received, results
        pairs.append(selected)
    return pairs


@pytest.mark.timeout(TEST_BUDGET)
@pytest.mark.parametrize("turn", [False, True], ids=["stun", "stun+turn"])
def test_endpoint_independent_nats_connect_directly(turn: bool) -> None:
    """Direct whenever a direct path exists: with a relay on offer too, it is not used."""
    with two_kernel_nats(fully_random=False) as topo:
        start_servers(topo.inet, turn=turn)
        results = run_peers(topo, turn=turn)
    pairs = _connected(results)
    for (local, remote), me, other in zip(pairs, (topo.a, topo.b), (topo.b, topo.a), strict=True):
        assert CandidateType.RELAYED not in (local.type, remote.type), results
        assert local.type is CandidateType.HOST and local.address == me.host, results
        assert remote.type in (CandidateType.SERVER_REFLEXIVE, CandidateType.PEER_REFLEXIVE)
        assert remote.address == other.public, results


@pytest.mark.timeout(TEST_BUDGET)
def test_symmetric_nats_fail_with_stun_only() -> None:
    """No pair works: each agent's checks leave through a fresh random port, which the
    other NAT drops as unsolicited. The agents run into ``--timeout``: a failed check
    gives up only after Rc = 7 retransmissions (39.5 s, IceConfig.check_transactions),
    longer than this test may take, so ICE itself has not declared failure yet."""
    with two_kernel_nats(fully_random=True) as topo:
        start_servers(topo.inet, turn=False)
        results = run_peers(topo, turn=False)
    for result in results:
        assert result.returncode == 1, results
        assert result.selected is None, results
        assert "timed out" in result.stderr, results
        # The agents did learn their mappings: the failure is the NATs', not the lab's.
        srflx = [
            Candidate.from_sdp(line["candidate"])
            for line in result.lines
            if "candidate" in line
            and Candidate.from_sdp(line["candidate"]).type is CandidateType.SERVER_REFLEXIVE
        ]
        assert srflx and srflx[0].address in ("198.51.100.1", "198.51.100.2"), results


@pytest.mark.timeout(TEST_BUDGET)
def test_symmetric_nats_connect_through_turn() -> None:
    with two_kernel_nats(fully_random=True) as topo:
        start_servers(topo.inet, turn=True)
        results = run_peers(topo, turn=True)
    for local, remote in _connected(results):
        assert CandidateType.RELAYED in (local.type, remote.type), results
        relayed = local if local.type is CandidateType.RELAYED else remote
        assert relayed.address == TURN_IP, results
