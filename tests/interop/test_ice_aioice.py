"""tsunagu's IceConnection against aioice's Connection (the ICE agent aiortc uses), on
loopback, in both roles, directly and with tsunagu through a relay (tsunagu's TURN
server): both connect and data flows both ways.

aioice gathers host candidates from the interfaces and leaves 127.0.0.1 out; the tests
configure it to use loopback by replacing ``aioice.ice.get_host_addresses`` (configuration
of the real third-party peer, which otherwise runs unchanged). aioice is a test dependency:
if it is missing the import fails the module, it is not skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aioice
import aioice.ice
import pytest

from tsunagu.aio.ice import IceConnection, TurnServer
from tsunagu.aio.turn_server import TurnServer as AioTurnServer
from tsunagu.ice.candidate import Candidate, CandidateType
from tsunagu.turn.config import TurnServerConfig

pytestmark = pytest.mark.interop

LIMIT = 10.0


def bounded(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), LIMIT)

    asyncio.run(main())


@pytest.fixture(autouse=True)
def aioice_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    monkeypatch.setattr(aioice.ice, "get_host_addresses", loopback_only)


async def signal_and_connect(ours: IceConnection, theirs: aioice.Connection) -> None:
    """Signalling, both ways, through the RFC 8839 text of each candidate; then connect
    both and carry data both ways."""
    ours.remote_username = theirs.local_username
    ours.remote_password = theirs.local_password
    theirs.remote_username = ours.local_username
    theirs.remote_password = ours.local_password
    for candidate in theirs.local_candidates:
        await ours.add_remote_candidate(Candidate.from_sdp("candidate:" + candidate.to_sdp()))
    await ours.add_remote_candidate(None)
    for own in ours.local_candidates:
        await theirs.add_remote_candidate(
            aioice.Candidate.from_sdp(own.to_sdp().removeprefix("candidate:"))
        )
    await theirs.add_remote_candidate(None)

    pair, _ = await asyncio.gather(ours.connect(), theirs.connect())
    assert pair.remote.port == theirs.local_candidates[0].port
    for i in range(3):
        await ours.send(f"to aioice {i}".encode())
        assert await theirs.recv() == f"to aioice {i}".encode()
        await theirs.send(f"to tsunagu {i}".encode())
        assert await ours.recv() == f"to tsunagu {i}".encode()


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_tsunagu_and_aioice_connect_and_exchange_data(tsunagu_controlling: bool) -> None:
    async def test() -> None:
        theirs = aioice.Connection(
            ice_controlling=not tsunagu_controlling,
            components=1,
            use_ipv4=True,
            use_ipv6=False,
        )
        try:
            async with IceConnection(
                tsunagu_controlling, host_addresses=["127.0.0.1"], allow_loopback=True
            ) as ours:
                await asyncio.gather(ours.gather(), theirs.gather_candidates())
                assert [c.host for c in theirs.local_candidates] == ["127.0.0.1"]
                await signal_and_connect(ours, theirs)
        finally:
            await theirs.close()

    bounded(test)


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_tsunagu_relay_only_and_aioice(tsunagu_controlling: bool) -> None:
    """tsunagu gathers only a relayed candidate from tsunagu's TURN server; aioice talks
    to the relayed address."""

    async def test() -> None:
        server = await AioTurnServer.start(
            TurnServerConfig(
                listen=(("127.0.0.1", 0),),
                relay_ips=("127.0.0.1",),
                users=("alice:wonderland",),
                realm="tsunagu.test",
                allow_peers=("127.0.0.0/8",),
                min_port=61000,  # clear of the ephemeral ports of aioice's host candidate
                max_port=65535,
            )
        )
        theirs = aioice.Connection(
            ice_controlling=not tsunagu_controlling,
            components=1,
            use_ipv4=True,
            use_ipv6=False,
        )
        relay = TurnServer(f"turn:127.0.0.1:{server.udp_addresses[0][1]}", "alice", "wonderland")
        try:
            async with IceConnection(
                tsunagu_controlling, turn_servers=[relay], relay_only=True, allow_loopback=True
            ) as ours:
                await asyncio.gather(ours.gather(), theirs.gather_candidates())
                assert [c.type for c in ours.local_candidates] == [CandidateType.RELAYED]
                await signal_and_connect(ours, theirs)
                selected = ours.selected_pair
                assert selected is not None and selected.local.type is CandidateType.RELAYED
        finally:
            await theirs.close()
            await server.close()

    bounded(test)


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_tsunagu_and_aioice_with_two_components(tsunagu_controlling: bool) -> None:
    """Two components on each side (RTP and RTCP unmultiplexed): both get a pair, and
    data sent on a component arrives tagged with it, both ways (our ``sendto`` and
    ``recvfrom`` against aioice's)."""

    async def test() -> None:
        theirs = aioice.Connection(
            ice_controlling=not tsunagu_controlling,
            components=2,
            use_ipv4=True,
            use_ipv6=False,
        )
        try:
            async with IceConnection(
                tsunagu_controlling,
                host_addresses=["127.0.0.1"],
                allow_loopback=True,
                components=2,
            ) as ours:
                await asyncio.gather(ours.gather(), theirs.gather_candidates())
                assert sorted(c.component for c in theirs.local_candidates) == [1, 2]
                assert sorted(c.component for c in ours.local_candidates) == [1, 2]
                ours.set_remote_credentials(theirs.local_username, theirs.local_password)
                theirs.remote_username = ours.local_username
                theirs.remote_password = ours.local_password
                for candidate in theirs.local_candidates:
                    await ours.add_remote_candidate(
                        Candidate.from_sdp("candidate:" + candidate.to_sdp())
                    )
                await ours.add_remote_candidate(None)
                for own in ours.local_candidates:
                    await theirs.add_remote_candidate(
                        aioice.Candidate.from_sdp(own.to_sdp().removeprefix("candidate:"))
                    )
                await theirs.add_remote_candidate(None)
                await asyncio.gather(ours.connect(), theirs.connect())

                ports = {c.component: c.port for c in theirs.local_candidates}
                pairs = ours.selected_pairs
                assert {c: pair.remote.port for c, pair in pairs.items()} == ports
                for component in (1, 2, 2, 1):
                    await ours.sendto(f"to aioice {component}".encode(), component)
                    assert await theirs.recvfrom() == (f"to aioice {component}".encode(), component)
                    await theirs.sendto(f"to tsunagu {component}".encode(), component)
                    assert await ours.recvfrom() == (f"to tsunagu {component}".encode(), component)
        finally:
            await theirs.close()

    bounded(test)
