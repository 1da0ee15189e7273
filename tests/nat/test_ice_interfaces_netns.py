"""Host candidates on every usable interface (RFC 8445 §5.1.1.1), in network namespaces
the test builds and removes::

          host                                        peer
    eth1 10.1.0.2/24 2001:db8:0:1::2/64 fe80::1:2 --- eth1 10.1.0.1 2001:db8:0:1::1 fe80::1:1
    eth2 10.2.0.2/24 2001:db8:0:2::2/64 fe80::2:2 --- eth2 10.2.0.1 2001:db8:0:2::1 fe80::2:1
    eth3 10.3.0.2/24 (up, but its peer end is down: no carrier, not running)
    default routes (IPv4 and IPv6) via eth2; 2001:db8:0:1::99 on eth1 is deprecated

IPv6 addresses are added with ``nodad`` and the namespaces generate no link-local address
of their own (``addr_gen_mode`` 1), so every address is usable at once and the lists are
exact. ``interfaces_probe.py`` runs inside ``host`` and gathers with IceConnection's
options; two ``tsunagu ice-peer`` processes, one per namespace, connect with
``--interface`` and ``--port-range``, and over link-local addresses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tsunagu.ice.candidate import Candidate, CandidateType

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # tests/nat/netns.py, shared by the namespace tests
    sys.path.insert(0, str(_HERE))
import netns  # noqa: E402
from icepeers import PeerResult, run_pair  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

PROBE = str(_HERE / "interfaces_probe.py")
ETH1 = {"10.1.0.2", "2001:db8:0:1::2"}
ETH2 = {"10.2.0.2", "2001:db8:0:2::2"}
LINK_LOCAL = {"fe80::1:2", "fe80::2:2"}
ICE_TIMEOUT = 15.0


@contextmanager
def lab() -> Iterator[tuple[netns.Namespace, netns.Namespace]]:
    with netns.lab("iifs") as built:
        host, peer = built.namespace("host"), built.namespace("peer")
        for ns in (host, peer):
            # No kernel-made link-local addresses (they would be tentative for a while).
            ns.sysctl("net.ipv6.conf.default.addr_gen_mode", "1")
        for n in (1, 2):
            built.link(host, f"eth{n}", f"10.{n}.0.2/24", peer, f"eth{n}", f"10.{n}.0.1/24")
            for ns, last in ((host, 2), (peer, 1)):
                for address in (f"2001:db8:0:{n}::{last}/64", f"fe80::{n}:{last}/64"):
                    ns.ip("address", "add", address, "dev", f"eth{n}", "nodad")
        host.ip(
            "address", "add", "2001:db8:0:1::99/64", "dev", "eth1", "nodad", "preferred_lft", "0"
        )
        host.ip("link", "add", "eth3", "type", "veth", "peer", "name", "eth3", "netns", peer.name)
        host.ip("address", "add", "10.3.0.2/24", "dev", "eth3")
        host.ip("link", "set", "eth3", "up")  # its peer end stays down
        host.ip("route", "add", "default", "via", "10.2.0.1")
        host.ip("-6", "route", "add", "default", "via", "2001:db8:0:2::1")
        yield host, peer


def probe(host: netns.Namespace, port_range: tuple[int, int]) -> dict[str, Any]:
    done = host.run("python", PROBE, f"{port_range[0]}-{port_range[1]}", timeout=45)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def addresses(candidates: list[dict[str, Any]]) -> list[str]:
    return [c["address"] for c in candidates]


def test_gathering_options_in_a_namespace() -> None:
    port_range = (42000, 42009)
    with lab() as (host, _):
        result = probe(host, port_range)

    enumerated = {(a["interface"], a["ip"]): a for a in result["enumerated"]}
    assert set(enumerated) == {
        ("lo", "127.0.0.1"),
        ("lo", "::1"),
        *(("eth1", ip) for ip in (*ETH1, "fe80::1:2")),
        *(("eth2", ip) for ip in (*ETH2, "fe80::2:2")),
    }, "eth3 is not running, 2001:db8:0:1::99 is deprecated"
    assert enumerated[("lo", "127.0.0.1")]["loopback"]
    assert enumerated[("eth1", "fe80::1:2")]["link_local"]

    for case in ("defaults", "interfaces", "filter", "ipv4_only", "link_local", "port_range"):
        assert all(c["type"] == CandidateType.HOST.value for c in result[case]), case

    # Every usable non-loopback, non-link-local address; the default routes' interface
    # (eth2) first, IPv6 before IPv4 on each, interleaved (RFC 8421).
    assert addresses(result["defaults"]) == [
        "2001:db8:0:2::2",
        "10.2.0.2",
        "2001:db8:0:1::2",
        "10.1.0.2",
    ]
    assert set(addresses(result["interfaces"])) == ETH1
    assert set(addresses(result["filter"])) == {"10.1.0.2", "10.2.0.2"}
    assert set(addresses(result["ipv4_only"])) == {"10.1.0.2", "10.2.0.2"}
    assert set(addresses(result["link_local"])) == ETH1 | ETH2 | LINK_LOCAL
    # Link-local ranks below the global address of its interface and family.
    ranked = addresses(result["link_local"])
    assert ranked.index("fe80::2:2") == ranked.index("2001:db8:0:2::2") + 1

    in_range = result["port_range"]
    assert len(in_range) == 2 * len(ETH1 | ETH2)  # two components
    assert all(port_range[0] <= c["port"] <= port_range[1] for c in in_range)

    connected = result["connected"]
    assert connected["data"] == "across the namespace"
    assert set(connected["a"]) == set(connected["b"]) == ETH1 | ETH2
    assert connected["local"] in ETH1 | ETH2 and connected["remote"] in ETH1 | ETH2

    over_link_local = result["connected_link_local"]
    assert over_link_local["a"] == over_link_local["b"] == ["fe80::1:2"]
    assert (over_link_local["local"], over_link_local["remote"]) == ("fe80::1:2", "fe80::1:2")
    assert over_link_local["data"] == "across the namespace"


def signalled(result: PeerResult) -> list[Candidate]:
    return [Candidate.from_sdp(line["candidate"]) for line in result.lines if "candidate" in line]


def check_exchanged(results: list[PeerResult]) -> None:
    for result in results:
        assert result.returncode == 0, results
        assert {f"pong {i}" for i in range(3)} <= result.received, results


def test_ice_peers_connect_on_an_interface_within_port_ranges() -> None:
    ranges = {"host": (42100, 42119), "peer": (43100, 43119)}
    with lab() as (host, peer):
        results = run_pair(
            [
                (
                    host,
                    "controlling",
                    ["--send", "3", "--interface", "eth1", "--port-range", "42100-42119"],
                ),
                (
                    peer,
                    "controlled",
                    ["--send", "3", "--interface", "eth1", "--port-range", "43100-43119"],
                ),
            ],
            ICE_TIMEOUT,
        )
    check_exchanged(results)
    peer_eth1 = {"10.1.0.1", "2001:db8:0:1::1"}
    for result, own, other, (low, high) in zip(
        results, (ETH1, peer_eth1), (peer_eth1, ETH1), ranges.values(), strict=True
    ):
        candidates = signalled(result)
        assert {c.address for c in candidates} == own, results
        assert all(low <= c.port <= high for c in candidates), results
        assert result.selected is not None, results
        local, remote = result.selected
        assert local.address in own and remote.address in other, results
        assert low <= local.port <= high, results


def test_ice_peers_connect_over_link_local_addresses() -> None:
    """A link-local host address with its zone: bound on its interface, signalled and
    paired as the plain address, across a real link between two namespaces."""
    with lab() as (host, peer):
        results = run_pair(
            [
                (host, "controlling", ["--send", "3", "--host-address", "fe80::1:2%eth1"]),
                (peer, "controlled", ["--send", "3", "--host-address", "fe80::1:1%eth1"]),
            ],
            ICE_TIMEOUT,
        )
    check_exchanged(results)
    for result, own, other in zip(
        results, ("fe80::1:2", "fe80::1:1"), ("fe80::1:1", "fe80::1:2"), strict=True
    ):
        assert [c.address for c in signalled(result)] == [own], results
        assert result.selected is not None, results
        local, remote = result.selected
        assert (local.address, remote.address) == (own, other), results
        # The remote's checks may come before its candidate: peer-reflexive then.
        assert local.type is CandidateType.HOST, results
