"""tsunagu's IceConnection against aioice's Connection (the ICE agent aiortc uses), on
loopback, in both roles, directly and through relays (tsunagu's TURN server, and coturn
with both agents relay-only): both connect and data flows both ways.

aioice gathers host candidates from the interfaces and leaves 127.0.0.1 out; the tests
configure it to use loopback by replacing ``aioice.ice.get_host_addresses`` (configuration
of the real third-party peer, which otherwise runs unchanged). aioice is a test dependency:
if it is missing the import fails the module, it is not skipped.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aioice
import aioice.ice
import pytest

from tsunagu.aio.ice import IceConnection, TurnServer
from tsunagu.ice.candidate import Candidate, CandidateType
from tsunagu.ice.pair import PairInfo

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import bounded  # noqa: E402
from loopback_servers import PASSWORD, USER, start_turn_server  # noqa: E402

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/interop/coturn.py starts coturn
    sys.path.insert(0, _HERE)
import coturn as coturn_process  # noqa: E402

pytestmark = pytest.mark.interop

coturn = coturn_process.coturn_fixture("coturn")

LIMIT = 10.0


@pytest.fixture(autouse=True)
def aioice_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    monkeypatch.setattr(aioice.ice, "get_host_addresses", loopback_only)


def aioice_connection(tsunagu_controlling: bool, components: int = 1) -> aioice.Connection:
    """aioice's agent in the other role than ours, IPv4 only."""
    return aioice.Connection(
        ice_controlling=not tsunagu_controlling,
        components=components,
        use_ipv4=True,
        use_ipv6=False,
    )


async def signal(ours: IceConnection, theirs: aioice.Connection) -> None:
    """Signalling, both ways, through the RFC 8839 text of each candidate."""
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


async def signal_and_connect(ours: IceConnection, theirs: aioice.Connection) -> None:
    """:func:`signal`; then connect both and carry data both ways."""
    await signal(ours, theirs)
    pair, _ = await asyncio.gather(ours.connect(), theirs.connect())
    assert pair.remote.transport_address in {(c.host, c.port) for c in theirs.local_candidates}
    for i in range(3):
        await ours.send(f"to aioice {i}".encode())
        assert await theirs.recv() == f"to aioice {i}".encode()
        await theirs.send(f"to tsunagu {i}".encode())
        assert await ours.recv() == f"to tsunagu {i}".encode()


async def relay_only_and_connect(
    tsunagu_controlling: bool, relay: TurnServer, theirs: aioice.Connection
) -> PairInfo:
    """A relay-only tsunagu connection through ``relay`` gathers one relayed candidate and
    connects to ``theirs`` (:func:`signal_and_connect`); its selected pair is returned."""
    async with IceConnection(
        tsunagu_controlling, turn_servers=[relay], relay_only=True, allow_loopback=True
    ) as ours:
        await asyncio.gather(ours.gather(), theirs.gather_candidates())
        assert [c.type for c in ours.local_candidates] == [CandidateType.RELAYED]
        await signal_and_connect(ours, theirs)
        selected = ours.selected_pair
        assert selected is not None and selected.local.type is CandidateType.RELAYED
        return selected


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_tsunagu_and_aioice_connect_and_exchange_data(tsunagu_controlling: bool) -> None:
    async def test() -> None:
        theirs = aioice_connection(tsunagu_controlling)
        try:
            async with IceConnection(
                tsunagu_controlling, host_addresses=["127.0.0.1"], allow_loopback=True
            ) as ours:
                await asyncio.gather(ours.gather(), theirs.gather_candidates())
                assert [c.host for c in theirs.local_candidates] == ["127.0.0.1"]
                await signal_and_connect(ours, theirs)
        finally:
            await theirs.close()

    bounded(test, LIMIT)


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_tsunagu_relay_only_and_aioice(tsunagu_controlling: bool) -> None:
    """tsunagu gathers only a relayed candidate from tsunagu's TURN server; aioice talks
    to the relayed address."""

    async def test() -> None:
        server = await start_turn_server()
        theirs = aioice_connection(tsunagu_controlling)
        relay = TurnServer(f"turn:127.0.0.1:{server.udp_addresses[0][1]}", USER, PASSWORD)
        try:
            await relay_only_and_connect(tsunagu_controlling, relay, theirs)
        finally:
            await theirs.close()
            await server.close()

    bounded(test, LIMIT)


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_tsunagu_and_aioice_with_two_components(tsunagu_controlling: bool) -> None:
    """Two components on each side (RTP and RTCP unmultiplexed): both get a pair, and
    data sent on a component arrives tagged with it, both ways (our ``sendto`` and
    ``recvfrom`` against aioice's)."""

    async def test() -> None:
        theirs = aioice_connection(tsunagu_controlling, components=2)
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
                await signal(ours, theirs)
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

    bounded(test, LIMIT)


@pytest.mark.parametrize("tsunagu_controlling", [True, False])
def test_both_relay_only_through_coturn(
    tsunagu_controlling: bool, coturn: coturn_process.Coturn
) -> None:
    """iceTransportPolicy "relay" on both sides, both allocating on coturn (aioice with
    its own TURN client): the selected pair joins the two relayed addresses and data
    crosses coturn twice each way."""

    async def test() -> None:
        theirs = aioice.Connection(
            ice_controlling=not tsunagu_controlling,
            components=1,
            use_ipv4=True,
            use_ipv6=False,
            turn_server=("127.0.0.1", coturn.port),
            turn_username=coturn_process.USER,
            turn_password=coturn_process.PASSWORD,
            transport_policy=aioice.TransportPolicy.RELAY,
        )
        relay = TurnServer(coturn.uri("udp"), coturn_process.USER, coturn_process.PASSWORD)
        try:
            selected = await relay_only_and_connect(tsunagu_controlling, relay, theirs)
            assert [c.type for c in theirs.local_candidates] == ["relay"]
            assert selected.remote.type is CandidateType.RELAYED
        finally:
            await theirs.close()

    bounded(test, LIMIT)
