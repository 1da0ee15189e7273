"""Real Linux NATs (issue 6 §4): ``tsunagu nat-check`` against the kernel's own NAT.

Every test builds its own three network namespaces and removes them afterwards, even when
it fails (``netns.lab``)::

      lan                      nat (router)                          inet
    10.0.0.2/24 eth0 ---- lan 10.0.0.1/24                     198.51.100.254/24 eth0
    default via 10.0.0.1       wan 198.51.100.1/24 ---------- 203.0.113.1/32, .2/32 on lo
                               203.0.113.0/24 via .254        tsunagu stun-server
                               NAT: nftables or iptables        --listen 203.0.113.1:3478
                                                                --other 203.0.113.2:3479

The LAN's private network is not routed by "inet": the only way between the LAN host and
the STUN server is the NAT on the router's ``wan`` interface. All addresses are TEST-NET
(RFC 5737) or 10/8, and exist only inside these namespaces.

What the kernel does by itself (measured here, see docs/nat.md "The Linux kernel's NAT"):

- ``masquerade`` / ``snat to`` (iptables MASQUERADE/SNAT): endpoint-independent mapping,
  because the NAT keeps the inside port whenever the translated connection tuple is unique,
  which it is for every new destination; ``masquerade fully-random``
  (``--random-fully``): address-and-port-dependent mapping, a fresh random port per
  connection.
- Filtering: address-and-port-dependent, because conntrack lets in only packets matching
  the reply direction of a connection the inside host opened, i.e. from exactly the
  IP:port it sent to. No hairpinning.

Endpoint-independent and address-dependent filtering, address-dependent mapping and
hairpinning are not kernel NAT modes; nftables can emulate them with dynamic sets and maps
that the router fills as packets leave (``_nft_rules``), and nat-check reads those back too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/nat/netns.py, shared by the namespace tests
    sys.path.insert(0, _HERE)
import netns  # noqa: E402

pytestmark = pytest.mark.netns

EIM = MappingBehavior.ENDPOINT_INDEPENDENT
ADM = MappingBehavior.ADDRESS_DEPENDENT
APDM = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
EIF = FilteringBehavior.ENDPOINT_INDEPENDENT
ADF = FilteringBehavior.ADDRESS_DEPENDENT
APDF = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT

LAN_HOST = "10.0.0.2"
PUBLIC = "198.51.100.1"  # the NAT's outside address
SERVER, OTHER = "203.0.113.1", "203.0.113.2"
STUN_URI = f"stun:{SERVER}:3478"
CHECK_TIMEOUT = "1.5"  # nat-check --timeout: veth round trips take well under 1 ms
TEST_BUDGET = 20  # seconds: pytest-timeout fails a test that takes longer


@dataclass(frozen=True)
class Topology:
    inet: netns.Namespace
    nat: netns.Namespace
    lan: netns.Namespace


@contextmanager
def kernel_nat(tool: str, configure: Callable[[netns.Namespace], None]) -> Iterator[Topology]:
    """The three namespaces, the router's NAT set up by ``configure``; no server yet."""
    with netns.lab("knat", tool) as lab:
        inet, nat, lan = lab.namespace("inet"), lab.namespace("nat"), lab.namespace("lan")
        lab.link(nat, "wan", f"{PUBLIC}/24", inet, "eth0", "198.51.100.254/24")
        lab.link(nat, "lan", "10.0.0.1/24", lan, "eth0", f"{LAN_HOST}/24")
        for ip in (SERVER, OTHER):
            inet.ip("address", "add", f"{ip}/32", "dev", "lo")
        nat.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.254")
        lan.ip("route", "add", "default", "via", "10.0.0.1")
        nat.sysctl("net.ipv4.ip_forward", "1")
        configure(nat)
        yield Topology(inet, nat, lan)


def start_stun_server(inet: netns.Namespace) -> None:
    """Our RFC 5780 server on both addresses; returns once it prints 'listening'."""
    server = inet.start(
        "tsunagu", "stun-server", "--listen", f"{SERVER}:3478", "--other", f"{OTHER}:3479"
    )
    line = server.wait_for_line("listening ")
    assert f"udp {SERVER}:3478" in line and f"udp {OTHER}:3479" in line, line


def nat_check(lan: netns.Namespace) -> dict[str, Any]:
    done = lan.run(
        "tsunagu", "nat-check", STUN_URI, "--json", "--timeout", CHECK_TIMEOUT, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- the rulesets ------------------------------------------------------------------------------

# Every ruleset drops unsolicited inbound packets on the outside interface, as home routers
# do (issue 6 §4): a packet that no connection expects is "new" to conntrack. Without the
# rule the router answers ICMP port unreachable and, worse, keeps a conntrack entry for
# the packet that can move the inside host's later mapping to another port
# (test_unsolicited_packet_moves_the_mapping_unless_dropped).
_DROP_UNSOLICITED = """
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new,invalid drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state new ct status dnat accept
    iifname "wan" ct state new,invalid drop
  }
"""


_DYNAMIC = "flags dynamic,timeout; timeout 300s;"  # 300 s: RFC 4787 REQ-5c's lifetime


def _nft_rules(
    mapping: MappingBehavior,
    filtering: FilteringBehavior,
    *,
    snat: bool = False,
    hairpin: bool = False,
    drop_unsolicited: bool = True,
) -> str:
    """An nftables ruleset for the router giving ``mapping`` x ``filtering``.

    Kernel behaviour, no emulation: endpoint-independent mapping is plain ``masquerade``
    (or ``snat to``, with ``snat``), address-and-port-dependent mapping is ``masquerade
    fully-random``, address-and-port-dependent filtering is conntrack itself.

    Emulated with state the router keeps in dynamic sets/maps, filled by the ``learn``
    chain that runs in postrouting *after* source NAT (so it sees the external port, and
    the inside port as ``ct original proto-src``); their 300 s timeout stands for the
    mapping lifetime (RFC 4787 REQ-5), refreshed by outbound packets:

    - ``inbound``: external port -> inside port, for every mapping. Endpoint-independent
      filtering DNATs any packet to a live external port back to its inside port.
    - ``permitted``: external port . remote IP, for every remote IP a mapping has sent to.
      Address-dependent filtering DNATs only packets whose source IP is in it.
    - ``adm``: inside port . remote IP -> external port. Address-dependent mapping
      reuses the external port the first connection to that IP got (through a
      ``fully-random`` masquerade) for every later connection to the same IP.
    - ``hairpin``: packets from the inside to the NAT's own public address go back inside
      through ``inbound``, with the sender's public address as source (RFC 4787 REQ-9a; the
      inside port is the sender's external port because masquerade preserved it).

    With a single inside host the DNAT target address is fixed (10.0.0.2).
    """
    sets, prerouting, postrouting, learn = [], [], [], []
    udp_out = 'oifname "wan" meta l4proto udp'
    if filtering is not APDF or hairpin:
        sets.append(f"map inbound {{ type inet_service : inet_service; {_DYNAMIC} }}")
        learn.append(f"{udp_out} update @inbound {{ udp sport : ct original proto-src }}")
    to_inside = f"dnat to {LAN_HOST} : udp dport map @inbound"
    from_outside = f'iifname "wan" ip daddr {PUBLIC} meta l4proto udp'
    if filtering is EIF:
        prerouting.append(f"{from_outside} {to_inside}")
    elif filtering is ADF:
        sets.append(f"set permitted {{ type inet_service . ipv4_addr; {_DYNAMIC} }}")
        learn.append(f"{udp_out} update @permitted {{ udp sport . ip daddr }}")
        prerouting.append(f"{from_outside} udp dport . ip saddr @permitted {to_inside}")
    if hairpin:
        prerouting.append(f'iifname "lan" ip daddr {PUBLIC} meta l4proto udp {to_inside}')
        postrouting.append(f'oifname "lan" ip saddr 10.0.0.0/24 ct status dnat snat to {PUBLIC}')
    if mapping is EIM:
        postrouting.append(
            f'oifname "wan" snat to {PUBLIC}' if snat else 'oifname "wan" masquerade'
        )
    else:
        if mapping is ADM:
            sets.append(f"map adm {{ type inet_service . ipv4_addr : inet_service; {_DYNAMIC} }}")
            learn.append(
                f"{udp_out} update @adm {{ ct original proto-src . ip daddr : udp sport }}"
            )
            # A miss in the map ends the rule: the first connection falls through.
            postrouting.append(f"{udp_out} snat to {PUBLIC} : udp sport . ip daddr map @adm")
        postrouting.append('oifname "wan" masquerade fully-random')

    def chain(name: str, hook: str, priority: str, kind: str, rules: list[str]) -> str:
        body = "".join(f"    {rule}\n" for rule in rules)
        return (
            f"  chain {name} {{\n    type {kind} hook {hook} priority {priority}; "
            f"policy accept;\n{body}  }}\n"
        )

    ruleset = "table ip tsunagu_nat {\n"
    ruleset += "".join(f"  {item}\n" for item in sets)
    ruleset += chain("prerouting", "prerouting", "dstnat", "nat", prerouting)
    ruleset += chain("postrouting", "postrouting", "srcnat", "nat", postrouting)
    if learn:
        ruleset += chain("learn", "postrouting", "srcnat + 10", "filter", learn)
    if drop_unsolicited:
        ruleset += _DROP_UNSOLICITED
    return ruleset + "}\n"


def _iptables_rules(random_fully: bool) -> str:
    """The issue's iptables wording: MASQUERADE [--random-fully], unsolicited dropped."""
    masquerade = "-A POSTROUTING -o wan -j MASQUERADE" + (" --random-fully" if random_fully else "")
    return "\n".join(
        [
            "*nat",
            masquerade,
            "COMMIT",
            "*filter",
            "-A INPUT -i wan -m conntrack --ctstate NEW,INVALID -j DROP",
            "-A FORWARD -i wan -m conntrack --ctstate NEW,INVALID -j DROP",
            "COMMIT",
            "",
        ]
    )


@dataclass(frozen=True)
class Case:
    id: str
    tool: str  # "nft" or "iptables-restore"
    rules: str
    mapping: MappingBehavior
    filtering: FilteringBehavior
    hairpinning: bool
    port_preserved: bool  # the mapped port is the local port


CASES = [
    # The kernel alone ----------------------------------------------------------------------
    # MASQUERADE keeps the inside port: nf_nat's get_unique_tuple() keeps the original
    # source port when the translated tuple (198.51.100.1:x -> server) is not in use, and a
    # new destination makes a new, unique tuple. So tests I, II and III all see
    # 198.51.100.1:x: endpoint-independent, by port preservation rather than by a mapping
    # table (a second flow that would collide -- another inside host with the same port to
    # the same server -- gets another port). Filtering: a packet gets in only if it matches
    # the reply tuple of an existing conntrack entry, i.e. comes from exactly the IP:port
    # the inside endpoint sent to; the change-request answers from 203.0.113.2:3479 and
    # 203.0.113.1:3479 match none, are "new" and dropped. Hairpinning: a packet from the
    # inside to 198.51.100.1:x matches no reply tuple (its source is 10.0.0.2, not the
    # server), so it is for the router itself, where nothing listens.
    Case("nft-masquerade", "nft", _nft_rules(EIM, APDF), EIM, APDF, False, True),
    Case("nft-snat", "nft", _nft_rules(EIM, APDF, snat=True), EIM, APDF, False, True),
    Case("iptables-MASQUERADE", "iptables-restore", _iptables_rules(False), EIM, APDF, False, True),
    # fully-random (NF_NAT_RANGE_PROTO_RANDOM_FULLY): every new conntrack entry gets a source
    # port from the kernel's PRNG, so each destination IP:port sees another external port.
    # (Two draws coincide with probability ~1/64000; nat-check would then read test II as
    # endpoint-independent. The kernel gives no way to rule that out.)
    Case("nft-fully-random", "nft", _nft_rules(APDM, APDF), APDM, APDF, False, False),
    Case(
        "iptables-random-fully", "iptables-restore", _iptables_rules(True), APDM, APDF, False, False
    ),
    # Emulated with nftables state (see _nft_rules) -----------------------------------------
    Case("nft-eim-eif", "nft", _nft_rules(EIM, EIF), EIM, EIF, False, True),
    Case("nft-eim-adf", "nft", _nft_rules(EIM, ADF), EIM, ADF, False, True),
    Case("nft-eim-eif-hairpin", "nft", _nft_rules(EIM, EIF, hairpin=True), EIM, EIF, True, True),
    Case("nft-adm-eif", "nft", _nft_rules(ADM, EIF), ADM, EIF, False, False),
    Case("nft-adm-adf", "nft", _nft_rules(ADM, ADF), ADM, ADF, False, False),
    Case("nft-adm-apdf", "nft", _nft_rules(ADM, APDF), ADM, APDF, False, False),
    Case("nft-apdm-eif", "nft", _nft_rules(APDM, EIF), APDM, EIF, False, False),
    Case("nft-apdm-adf", "nft", _nft_rules(APDM, ADF), APDM, ADF, False, False),
]


def _loader(case: Case) -> Callable[[netns.Namespace], None]:
    def load(nat: netns.Namespace) -> None:
        if case.tool == "nft":
            nat.nft(case.rules)
        else:
            nat.run("iptables-restore", stdin=case.rules)

    return load


@pytest.mark.timeout(TEST_BUDGET)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_nat_check_reports_the_kernel_nat(case: Case) -> None:
    with kernel_nat(case.tool, _loader(case)) as topo:
        start_stun_server(topo.inet)
        result = nat_check(topo.lan)
    assert result["nat_present"] is True
    assert result["other_address"] == f"{OTHER}:3479"
    assert (result["mapping"], result["filtering"], result["hairpinning"]) == (
        case.mapping.value,
        case.filtering.value,
        case.hairpinning,
    ), result
    mapped_ip, _, _ = result["mapped"].rpartition(":")
    assert mapped_ip == PUBLIC
    if case.port_preserved:
        assert _port(result["mapped"]) == _port(result["local"]), result


# -- the Linux detail of issue 6 §4 -------------------------------------------------------------

_UNSOLICITED = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("203.0.113.1", 3478))
sock.connect(("198.51.100.1", int(sys.argv[1])))
sock.settimeout(float(sys.argv[2]))
sock.send(b"a check that arrives before the inside host has sent anything")
try:
    sock.recv(1500)
    print("answered")
except ConnectionRefusedError:  # the ICMP port unreachable, on a connected socket
    print("refused")
except TimeoutError:
    print("silent")
"""

_BIND_FROM = """
import asyncio, json, sys
from tsunagu.aio.stun_client import binding_request
result = asyncio.run(binding_request(
    ("203.0.113.1", 3478), local_address=("10.0.0.2", int(sys.argv[1])), timeout=3.0
))
print(json.dumps({"mapped": list(result.mapped)}))
"""

INSIDE_PORT = 40000
SILENCE = "0.5"  # seconds the sender waits to conclude the NAT said nothing


@pytest.mark.timeout(TEST_BUDGET)
@pytest.mark.parametrize("drop_unsolicited", [True, False], ids=["dropped", "not-dropped"])
def test_unsolicited_packet_moves_the_mapping_unless_dropped(drop_unsolicited: bool) -> None:
    """A peer's packet reaches the NAT at 198.51.100.1:40000 before the inside host has
    sent anything from port 40000 (an ICE check racing the other side's first check).

    Without the drop rule the router takes the packet for itself: nothing listens, so it
    answers ICMP port unreachable, and conntrack confirms an entry 203.0.113.1:3478 ->
    198.51.100.1:40000. When the inside host then sends from 10.0.0.2:40000 to that same
    peer, the translated tuple it would get, 198.51.100.1:40000 -> 203.0.113.1:3478, is that
    entry's reply direction, so nf_nat picks another port: the mapping the host announced
    (to the STUN server, earlier) is not the one this peer sees, and EIM hole punching
    fails. Dropped in the filter hook, the packet's entry is never confirmed: no trace.
    """
    rules = _nft_rules(EIM, APDF, drop_unsolicited=drop_unsolicited)
    with kernel_nat("nft", lambda nat: nat.nft(rules)) as topo:
        # The peer is the STUN server's address; it sends before the server binds 3478.
        sent = topo.inet.run("python", "-c", _UNSOLICITED, str(INSIDE_PORT), SILENCE)
        start_stun_server(topo.inet)
        answer = topo.lan.run("python", "-c", _BIND_FROM, str(INSIDE_PORT))
    mapped_ip, mapped_port = json.loads(answer.stdout)["mapped"]
    assert mapped_ip == PUBLIC
    if drop_unsolicited:
        assert sent.stdout.strip() == "silent"
        assert mapped_port == INSIDE_PORT  # masquerade kept the port, as in every other case
    else:
        assert sent.stdout.strip() == "refused"
        assert mapped_port != INSIDE_PORT
