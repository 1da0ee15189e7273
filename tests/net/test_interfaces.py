"""The interface enumeration on this machine, against what ``ip -j addr show`` reports, and
:class:`IceConnection` gathering on the loopback interface within a port range. Traffic
only over loopback; every wait bounded."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio.ice import IceConnection, PortRangeExhaustedError, default_host_addresses
from tsunagu.aio.interfaces import (
    default_route_addresses,
    interface_addresses,
    netlink_dump,
    select_host_addresses,
)
from tsunagu.ice.candidate import CandidateType

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py
    sys.path.insert(0, _TESTS)
from aiotest import signal_pair  # noqa: E402

LIMIT = 20.0


def ip_json() -> list[dict[str, Any]]:
    done = subprocess.run(
        ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
    )
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


def canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def test_enumeration_includes_loopback() -> None:
    found = interface_addresses()
    lo = [a for a in found if a.ip == "127.0.0.1"]
    assert lo and lo[0].loopback and not lo[0].link_local
    assert lo[0].index == socket.if_nametoindex(lo[0].interface)


def test_netlink_dump_matches_ip_addr_show() -> None:
    """Every address ``ip`` lists, on the same interface with the same prefix, and only
    those; the usable ones (interface UP and running, address neither tentative nor
    deprecated nor DAD-failed) are what interface_addresses() returns."""
    links, addresses = netlink_dump()
    names = {link.index: link.name for link in links}
    ours = {(names.get(a.index), a.ip, a.prefix_length) for a in addresses}
    listed = ip_json()
    theirs = {
        (entry["ifname"], canonical(info["local"]), info["prefixlen"])
        for entry in listed
        for info in entry.get("addr_info", [])
    }
    assert ours == theirs
    # iproute2 hides IFF_RUNNING; the kernel sets it when the operational state is UP or
    # UNKNOWN (dev_get_flags), so that is what "running" reads as here.
    usable = {
        (entry["ifname"], canonical(info["local"]))
        for entry in listed
        if "UP" in entry["flags"] and entry.get("operstate") in ("UP", "UNKNOWN")
        for info in entry.get("addr_info", [])
        if not any(info.get(flag) for flag in ("tentative", "deprecated", "dadfailed"))
    }
    assert {(a.interface, a.ip) for a in interface_addresses()} == usable
    loopback = {entry["ifname"] for entry in listed if "LOOPBACK" in entry["flags"]}
    for address in interface_addresses():
        assert address.loopback == (address.interface in loopback or address.ip == "::1")


def test_default_selection_is_every_usable_non_loopback_address() -> None:
    selected = select_host_addresses()
    expected = {a.ip for a in interface_addresses() if not a.loopback and not a.link_local}
    assert {a.ip for a in selected} == expected
    assert default_host_addresses() == [a.ip for a in selected]
    # The default routes' addresses (the UDP connect trick) are among them, first.
    routes = default_route_addresses()
    assert set(routes) <= expected
    if routes:
        assert selected[0].interface in {a.interface for a in selected if a.ip in routes}
    assert "127.0.0.1" in default_host_addresses(allow_loopback=True)
    assert all(":" not in ip for ip in default_host_addresses(use_ipv6=False))


def free_port_range(size: int) -> tuple[int, int]:
    """A range of ``size`` ports that were free on 127.0.0.1 and ::1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        start = int(probe.getsockname()[1])
    start = min(start, 65535 - size)
    return start, start + size - 1


def test_loopback_interface_gathers_and_connects_within_a_port_range() -> None:
    low, high = free_port_range(64)

    async def test() -> None:
        options: dict[str, Any] = {
            "interfaces": ["lo"],
            "allow_loopback": True,
            "port_range": (low, high),
            "components": 2,
        }
        async with IceConnection(True, **options) as a, IceConnection(False, **options) as b:
            assert {h.ip for h in a.host_addresses} == {"127.0.0.1", "::1"}
            await asyncio.gather(a.gather(), b.gather())
            for conn in (a, b):
                hosts = conn.local_candidates
                assert {c.address for c in hosts} == {"127.0.0.1", "::1"}
                assert {c.component for c in hosts} == {1, 2}
                assert all(c.type is CandidateType.HOST for c in hosts)
                assert all(low <= c.port <= high for c in hosts)
                assert len({c.priority for c in hosts}) == len(hosts)
            await signal_pair(a, b)
            await asyncio.gather(a.connect(), b.connect())
            await a.send(b"over lo", 2)
            assert await b.recvfrom() == (b"over lo", 2)

    asyncio.run(asyncio.wait_for(test(), LIMIT))


def test_exhausted_port_range_is_a_clear_error() -> None:
    async def test() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = int(taken.getsockname()[1])
            async with IceConnection(
                True, host_addresses=["127.0.0.1"], allow_loopback=True, port_range=(port, port)
            ) as conn:
                with pytest.raises(PortRangeExhaustedError, match=f"{port}-{port}"):
                    await conn.gather()

    asyncio.run(asyncio.wait_for(test(), LIMIT))


@pytest.mark.parametrize("port_range", [(0, 10), (10, 9), (1, 65536)])
def test_invalid_port_range_is_refused(port_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="port range"):
        IceConnection(True, host_addresses=["127.0.0.1"], port_range=port_range)
