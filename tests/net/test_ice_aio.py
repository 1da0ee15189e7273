"""The asyncio ICE driver (tsunagu.aio.ice) and ``tsunagu ice-peer`` on real loopback
sockets: two agents gather, exchange candidates, connect and carry data both ways.

Every wait is bounded: each test runs under ``asyncio.wait_for`` and subprocesses under
their own ``--timeout``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tsunagu.aio.ice import IceClosedError, IceConnection, IceFailedError, TurnServer
from tsunagu.aio.stun_server import StunServer
from tsunagu.ice.candidate import Candidate, CandidateType
from tsunagu.ice.config import IceConfig
from tsunagu.ice.errors import IceNotConnectedError
from tsunagu.ice.events import IceTransportState
from tsunagu.stun.server_config import StunServerConfig
from tsunagu.stun.transaction import TransactionConfig

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/aiotest.py and tests/loopback_servers.py
    sys.path.insert(0, _TESTS)
from aiotest import bounded, signal_pair, start_tsunagu  # noqa: E402
from loopback_servers import PASSWORD, USER, start_turn_server  # noqa: E402

LIMIT = 10.0


def loopback(controlling: bool) -> IceConnection:
    return IceConnection(controlling, host_addresses=["127.0.0.1"], allow_loopback=True)


@pytest.mark.parametrize("first_controlling", [True, False])
def test_two_connections_connect_and_exchange_data(first_controlling: bool) -> None:
    async def test() -> None:
        async with loopback(first_controlling) as a, loopback(not first_controlling) as b:
            await asyncio.gather(a.gather(), b.gather())
            for conn in (a, b):
                assert [c.type for c in conn.local_candidates] == [CandidateType.HOST]
                assert conn.local_candidates[0].address == "127.0.0.1"
            await signal_pair(a, b)
            pair_a, pair_b = await asyncio.gather(a.connect(), b.connect())
            assert pair_a.local == a.local_candidates[0]
            assert pair_a.remote.transport_address == b.local_candidates[0].transport_address
            assert pair_b.remote.transport_address == a.local_candidates[0].transport_address
            for i in range(3):
                await a.send(f"a{i}".encode())
                assert await b.recv() == f"a{i}".encode()
                await b.send(f"b{i}".encode())
                assert await a.recv() == f"b{i}".encode()
            assert a.ice_controlling is first_controlling
            assert a.state in (IceTransportState.CONNECTED, IceTransportState.COMPLETED)
        # Closed: recv raises instead of hanging, and the state says so.
        assert a.agent.state == IceTransportState.CLOSED
        with pytest.raises(IceClosedError):
            await a.recv()

    bounded(test, LIMIT)


def test_consent_keeps_running_while_data_flows() -> None:
    # Data in and out skips the timer re-arm (IceConnection._service): the armed timer must
    # still fire, so consent requests go on and get answered while both sides stream.
    config = IceConfig(consent_interval=0.1, consent_jitter=0.1)

    async def test() -> None:
        async with (
            IceConnection(
                True, host_addresses=["127.0.0.1"], allow_loopback=True, config=config
            ) as a,
            IceConnection(
                False, host_addresses=["127.0.0.1"], allow_loopback=True, config=config
            ) as b,
        ):
            await asyncio.gather(a.gather(), b.gather())
            await signal_pair(a, b)
            await asyncio.gather(a.connect(), b.connect())
            before = [conn.selected_pair.responses_received for conn in (a, b)]  # type: ignore[union-attr]
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.0
            sent = 0
            while loop.time() < until:  # bounded: one second of ping-pong
                await a.send(b"\x80%d" % sent)
                assert await b.recv() == b"\x80%d" % sent
                await b.send(b"\x80%d" % sent)
                assert await a.recv() == b"\x80%d" % sent
                sent += 1
            after = [conn.selected_pair.responses_received for conn in (a, b)]  # type: ignore[union-attr]
            # About ten consent rounds in that second; each side saw several answered.
            assert all(late - early >= 4 for early, late in zip(before, after, strict=True))
            assert sent > 100
            assert a.state in (IceTransportState.CONNECTED, IceTransportState.COMPLETED)

    bounded(test, LIMIT)


def test_trickled_candidates_after_credentials_connect() -> None:
    """Candidates given one by one after connect() started (trickle ICE)."""

    async def test() -> None:
        async with loopback(True) as a, loopback(False) as b:
            await asyncio.gather(a.gather(), b.gather())
            a.remote_username, a.remote_password = b.local_username, b.local_password
            b.remote_username, b.remote_password = a.local_username, a.local_password
            connecting = asyncio.gather(a.connect(), b.connect())
            await a.add_remote_candidate(Candidate.from_sdp(b.local_candidates[0].to_sdp()))
            await b.add_remote_candidate(Candidate.from_sdp(a.local_candidates[0].to_sdp()))
            await connecting
            await a.send(b"trickled")
            assert await b.recv() == b"trickled"

    bounded(test, LIMIT)


async def _pump(
    source: asyncio.subprocess.Process,
    sink: asyncio.subprocess.Process,
    lines: list[dict[str, Any]],
) -> None:
    """Copy each JSON line ``source`` prints to ``sink``'s stdin (the signalling)."""
    assert source.stdout is not None and sink.stdin is not None
    while line := await source.stdout.readline():
        lines.append(json.loads(line))
        if sink.returncode is None:
            try:
                sink.stdin.write(line)
                await sink.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass


async def run_ice_peers(extra: tuple[list[str], list[str]]) -> list[list[dict[str, Any]]]:
    """Start a controlling and a controlled ``tsunagu ice-peer --send 5``, wire each one's
    stdout to the other's stdin, and return the JSON lines each printed."""
    procs = [
        await start_tsunagu(
            "ice-peer",
            "--role",
            role,
            "--send",
            "5",
            "--timeout",
            "8",
            *args,
            stdin=asyncio.subprocess.PIPE,
        )
        for role, args in zip(("controlling", "controlled"), extra, strict=True)
    ]
    outputs: list[list[dict[str, Any]]] = [[], []]
    try:
        await asyncio.gather(
            _pump(procs[0], procs[1], outputs[0]),
            _pump(procs[1], procs[0], outputs[1]),
        )
        codes = [await proc.wait() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    errors = [await p.stderr.read() if p.stderr else b"" for p in procs]
    assert codes == [0, 0], (outputs, errors)
    for lines in outputs:
        kinds = [next(iter(line)) for line in lines]
        assert kinds[0] == "ufrag" and "pwd" in lines[0]
        assert kinds[1] == "candidate"
        Candidate.from_sdp(lines[1]["candidate"])
        assert "end-of-candidates" in kinds
        selected = [line["selected"] for line in lines if "selected" in line]
        assert len(selected) == 1
        assert Candidate.from_sdp(selected[0]["local"]).address == "127.0.0.1"
        received = {line["received"] for line in lines if "received" in line}
        assert {f"pong {i}" for i in range(5)} <= received
        assert {f"ping {i}" for i in range(5)} <= received
    return outputs


def test_two_ice_peer_processes_ping_each_other() -> None:
    async def test() -> None:
        host = ["--host-address", "127.0.0.1"]
        await run_ice_peers((host, host))

    bounded(test, LIMIT)


def test_ice_peer_relay_only_through_turn() -> None:
    async def test() -> None:
        server = await start_turn_server()
        try:
            port = server.udp_addresses[0][1]
            turn = [f"--turn=turn:127.0.0.1:{port}", f"--username={USER}", f"--password={PASSWORD}"]
            outputs = await run_ice_peers(([*turn, "--relay-only"], []))
        finally:
            await server.close()
        selected = next(line["selected"] for line in outputs[0] if "selected" in line)
        assert Candidate.from_sdp(selected["local"]).type is CandidateType.RELAYED

    bounded(test, LIMIT)


def test_connect_raises_when_every_check_fails() -> None:
    """A remote candidate nobody answers on: connect() raises the typed error once the
    check list has failed (short retransmissions keep the test fast)."""

    async def test() -> None:
        quick = IceConfig(
            check_rto_min=0.05,
            check_transactions=TransactionConfig(initial_rto=0.05, rc=2, rm=2, rto_min=0.05),
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind(("127.0.0.1", 0))  # receives the checks, answers none
            port = sink.getsockname()[1]
            async with IceConnection(
                True, host_addresses=["127.0.0.1"], allow_loopback=True, config=quick
            ) as conn:
                await conn.gather()
                conn.set_remote_credentials("silentufrag", "silentpasswordsilentpass")
                await conn.add_remote_candidate(
                    Candidate.from_sdp(f"candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host")
                )
                await conn.add_remote_candidate(None)
                with pytest.raises(IceFailedError):
                    await conn.connect()
                with pytest.raises(IceNotConnectedError):
                    await conn.send(b"nowhere")

    bounded(test, LIMIT)


def test_ice_peer_exits_non_zero_at_timeout() -> None:
    async def test() -> None:
        proc = await start_tsunagu(
            "ice-peer", "--role", "controlling", "--timeout", "1", stdin=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await proc.communicate()  # stdin closed at once: no peer
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 1, stderr
        assert b"timed out" in stderr
        lines = [json.loads(line) for line in stdout.splitlines()]
        assert lines[-1] == {"end-of-candidates": True}

    bounded(test, LIMIT)


def test_gathering_asks_the_stun_server() -> None:
    """On loopback the mapped address is the host address itself, so the server-reflexive
    candidate is redundant (RFC 8445 §5.1.3) and dropped; gathering still finishes as
    soon as the server answered."""

    async def test() -> None:
        config = StunServerConfig(listen=(("127.0.0.1", 0),))
        async with (
            await StunServer.start(config) as server,
            IceConnection(
                True,
                host_addresses=["127.0.0.1"],
                allow_loopback=True,
                stun_servers=[server.udp_addresses[0]],
            ) as conn,
        ):
            started = asyncio.get_running_loop().time()
            await conn.gather()
            assert asyncio.get_running_loop().time() - started < 1.0
            assert [c.type for c in conn.local_candidates] == [CandidateType.HOST]
            assert conn.agent.gathering_complete

    bounded(test, LIMIT)


@pytest.mark.parametrize("relay_controlling", [True, False])
def test_relay_only_connection_through_tsunagu_turn_server(relay_controlling: bool) -> None:
    """One side gathers only a relayed candidate (iceTransportPolicy "relay") from
    tsunagu's TURN server; checks and data go through the allocation."""

    async def test() -> None:
        server = await start_turn_server()
        port = server.udp_addresses[0][1]
        relay = TurnServer(f"turn:127.0.0.1:{port}", USER, PASSWORD)
        try:
            async with (
                IceConnection(
                    relay_controlling,
                    turn_servers=[relay],
                    relay_only=True,
                    allow_loopback=True,
                ) as relayed,
                loopback(not relay_controlling) as direct,
            ):
                await asyncio.gather(relayed.gather(), direct.gather())
                assert [c.type for c in relayed.local_candidates] == [CandidateType.RELAYED]
                assert relayed.local_candidates[0].port >= 61000
                await signal_pair(relayed, direct)
                pair, _ = await asyncio.gather(relayed.connect(), direct.connect())
                assert pair.local.type is CandidateType.RELAYED
                for i in range(3):
                    await relayed.send(f"r{i}".encode())
                    assert await direct.recv() == f"r{i}".encode()
                    await direct.send(f"d{i}".encode())
                    assert await relayed.recv() == f"d{i}".encode()
        finally:
            await server.close()

    bounded(test, LIMIT)
