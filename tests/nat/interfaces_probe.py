"""Run inside a lab namespace by test_ice_interfaces_netns.py: gathers with
:class:`IceConnection` under several interface options and connects two of them, then
prints one JSON object with what it saw::

    python interfaces_probe.py LOW-HIGH

``LOW-HIGH`` is the port range of the ``port_range`` case. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from tsunagu.aio.ice import IceConnection
from tsunagu.aio.interfaces import interface_addresses

LIMIT = 20.0


def is_link_local(ip: str) -> bool:
    return ip.startswith("fe80:")


def is_ipv4(ip: str) -> bool:
    return ":" not in ip


async def gathered(**options: Any) -> list[dict[str, Any]]:
    """The host candidates one connection gathers with ``options``, by priority."""
    async with IceConnection(True, **options) as conn:
        await conn.gather()
        candidates = sorted(conn.local_candidates, key=lambda c: -c.priority)
        return [
            {"address": c.address, "port": c.port, "type": c.type.value, "priority": c.priority}
            for c in candidates
        ]


async def connected(
    options_a: dict[str, Any], options_b: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Two connections in this namespace, signalled in-process: the selected pair of the
    controlling one and the datagram that crossed it."""
    async with (
        IceConnection(True, **options_a) as a,
        IceConnection(False, **(options_b or options_a)) as b,
    ):
        await asyncio.gather(a.gather(), b.gather())
        a.set_remote_credentials(b.local_username, b.local_password)
        b.set_remote_credentials(a.local_username, a.local_password)
        for here, there in ((a, b), (b, a)):
            for candidate in there.local_candidates:
                await here.add_remote_candidate(candidate)
            await here.add_remote_candidate(None)
        pair, _ = await asyncio.gather(a.connect(), b.connect())
        await a.send(b"across the namespace")
        data = await b.recv()
        return {
            "local": pair.local.address,
            "remote": pair.remote.address,
            "data": data.decode(),
            "a": [c.address for c in a.local_candidates],
            "b": [c.address for c in b.local_candidates],
        }


async def main(port_range: tuple[int, int]) -> dict[str, Any]:
    link_local_only: Callable[[str], bool] = is_link_local
    return {
        "enumerated": [dataclasses.asdict(a) for a in interface_addresses()],
        "defaults": await gathered(),
        "interfaces": await gathered(interfaces=["eth1"]),
        "filter": await gathered(address_filter=is_ipv4),
        "ipv4_only": await gathered(use_ipv6=False),
        "link_local": await gathered(include_link_local=True),
        "port_range": await gathered(port_range=port_range, components=2),
        "connected": await connected({}),
        # Both on eth1's link-local address (link-local is per link: the other link's
        # address is not reachable through eth1).
        "connected_link_local": await connected(
            {"interfaces": ["eth1"], "include_link_local": True, "address_filter": link_local_only}
        ),
    }


if __name__ == "__main__":
    low, _, high = sys.argv[1].partition("-")
    result = asyncio.run(asyncio.wait_for(main((int(low), int(high))), LIMIT))
    print(json.dumps(result))
