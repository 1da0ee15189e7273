"""Remote ``.local`` candidates that cannot be resolved, on loopback (no multicast there):
:class:`~tsunagu.aio.ice.IceConnection` drops them with a log line, holds end-of-candidates
back until the resolution is over, and still connects through the peer-reflexive
candidate the remote's checks reveal. Real multicast resolution is in
tests/nat/test_ice_mdns_netns.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

import pytest

from tsunagu.aio.ice import IceConnection
from tsunagu.ice.candidate import Candidate, CandidateType

LIMIT = 10.0


def loopback(controlling: bool) -> IceConnection:
    return IceConnection(controlling, host_addresses=["127.0.0.1"], allow_loopback=True)


def test_unresolvable_remote_name_is_dropped_and_peer_reflexive_connects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test() -> None:
        async with loopback(True) as a, loopback(False) as b:
            await asyncio.gather(a.gather(), b.gather())
            a.set_remote_credentials(b.local_username, b.local_password)
            b.set_remote_credentials(a.local_username, a.local_password)
            for candidate in b.local_candidates:  # reaches a under a name nobody answers
                hidden = dataclasses.replace(candidate, address=f"{uuid.uuid4()}.local")
                await a.add_remote_candidate(hidden)
            await a.add_remote_candidate(None)
            for candidate in a.local_candidates:
                await b.add_remote_candidate(candidate)
            await b.add_remote_candidate(None)
            pair = await a.connect()
            await b.connect()
            assert pair.remote.type is CandidateType.PEER_REFLEXIVE
            assert pair.remote.transport_address == b.agent.local_candidates[0].transport_address
            assert not any(c.is_mdns for c in a.remote_candidates)
            await b.send(b"through the peer-reflexive candidate")
            assert await a.recv() == b"through the peer-reflexive candidate"

    with caplog.at_level(logging.WARNING, logger="tsunagu.aio.ice"):
        asyncio.run(asyncio.wait_for(test(), LIMIT))
    assert any("mDNS name not resolved" in r.getMessage() for r in caplog.records)


def test_end_of_candidates_waits_for_pending_resolutions() -> None:
    """The agent learns end-of-candidates only after the name it was waiting on has been
    dealt with (here: dropped), never before."""

    async def test() -> None:
        async with loopback(True) as a, loopback(False) as b:
            await asyncio.gather(a.gather(), b.gather())
            a.set_remote_credentials(b.local_username, b.local_password)
            seen: list[Candidate | None] = []  # what reaches the core, in order
            core_add = a.agent.add_remote_candidate

            def spy(candidate: Candidate | None) -> bool:
                seen.append(candidate)
                return core_add(candidate)

            a.agent.add_remote_candidate = spy  # type: ignore[method-assign]
            hidden = dataclasses.replace(b.local_candidates[0], address=f"{uuid.uuid4()}.local")
            await a.add_remote_candidate(hidden)
            await a.add_remote_candidate(None)
            assert seen == []  # held back: a resolution is pending
            for _ in range(100):  # bounded: the resolution ends within a few loop turns
                if seen:
                    break
                await asyncio.sleep(0)
            assert seen == [None]  # the unresolved name never reached the core

    asyncio.run(asyncio.wait_for(test(), LIMIT))
