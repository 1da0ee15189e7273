"""``tsunagu demo``: the README's first command.

Starts tsunagu's STUN server on loopback with its RFC 5780 second address (127.0.0.2, which
Linux routes to loopback), asks it for our mapped address over UDP and TCP and runs NAT
behaviour discovery against it. Then starts tsunagu's TURN server on loopback and connects
two ICE agents twice: with all candidates, then relay only (iceTransportPolicy "relay"),
printing the candidates, a pair table like chrome://webrtc-internals and the selected pair,
and exchanging data both ways. Everything stays on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

from tsunagu.aio.ice import IceConnection
from tsunagu.aio.ice import TurnServer as TurnUri
from tsunagu.aio.loop import run
from tsunagu.aio.stun_client import BindingResult, binding_request, discover_nat
from tsunagu.aio.stun_server import StunServer
from tsunagu.aio.turn_server import TurnServer
from tsunagu.errors import TsunaguError
from tsunagu.ice.pair import PairInfo
from tsunagu.stun.server_config import StunServerConfig
from tsunagu.turn.config import TurnServerConfig

_PRIMARY_IP = "127.0.0.1"
_OTHER_IP = "127.0.0.2"
_TURN_USER = "demo"
_MESSAGES = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run STUN and TURN servers and two ICE agents on loopback (no network needed)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step")
    parser.set_defaults(func=_main)


def _endpoint(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _describe(label: str, result: BindingResult) -> str:
    return (
        f"  {label:<4} mapped {_endpoint(result.mapped):<21} from {_endpoint(result.local):<21}"
        f" rtt {result.rtt * 1000:6.2f} ms  server: {result.software or '-'}"
    )


class _Output:
    """Plain text, or rich tables when stdout is a terminal."""

    def __init__(self, rich: bool) -> None:
        self._console = None
        if rich:
            from rich.console import Console  # noqa: PLC0415 - only for a terminal

            self._console = Console()

    def line(self, text: str = "") -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def heading(self, text: str) -> None:
        if self._console is not None:
            self._console.rule(text)
        else:
            print(f"== {text} ==", flush=True)

    def pairs(self, name: str, pairs: list[PairInfo], selected: PairInfo | None) -> None:
        headers = ("local", "remote", "state", "nominated", "rtt", "sent", "received")
        rows = [
            (
                ("* " if _same(pair, selected) else "  ") + str(pair.local),
                str(pair.remote),
                pair.state.value,
                "yes" if pair.nominated else "no",
                "-" if pair.rtt is None else f"{pair.rtt * 1000:.2f} ms",
                f"{pair.bytes_sent} B",
                f"{pair.bytes_received} B",
            )
            for pair in pairs
        ]
        if self._console is not None:
            from rich.table import Table  # noqa: PLC0415

            table = Table(title=f"{name}: candidate pairs (* selected)", title_justify="left")
            for header in headers:
                numeric = header in ("rtt", "sent", "received")
                table.add_column(
                    header,
                    justify="right" if numeric else "left",
                    no_wrap=header in ("local", "remote"),
                )
            for row in rows:
                table.add_row(*row, style="bold green" if row[0].startswith("*") else None)
            self._console.print(table)
            return
        print(f"  {name}: candidate pairs (* selected)")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        for row in (headers, *rows):
            print("    " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        sys.stdout.flush()


def _same(pair: PairInfo, selected: PairInfo | None) -> bool:
    return (
        selected is not None
        and pair.local == selected.local
        and pair.remote.transport_address == selected.remote.transport_address
    )


async def _stun_part(out: _Output, timeout: float) -> None:
    config = StunServerConfig(listen=((_PRIMARY_IP, 0),), other=(_OTHER_IP, 0), rate_limit=0.0)
    async with await StunServer.start(config) as server:
        out.heading("STUN")
        out.line(f"STUN server: {server.listening_line()}")
        udp = server.udp_addresses[0]
        tcp = server.tcp_addresses[0]
        out.line("Binding requests (RFC 8489):")
        out.line(_describe("udp", await binding_request(udp, timeout=timeout)))
        # stun: URIs name no transport (RFC 7064); turn: ones do (RFC 7065), and a TURN
        # server answers Binding too, so that is how a URI asks for STUN over TCP.
        uri = f"turn:{_endpoint(tcp)}?transport=tcp"
        out.line(_describe("tcp", await binding_request(uri, timeout=timeout)))
        out.line("NAT behaviour discovery (RFC 5780) against the same server:")
        nat = await discover_nat(udp, timeout=timeout)
        mapping = nat.mapping.value if nat.mapping else "unknown"
        filtering = nat.filtering.value if nat.filtering else "unknown"
        out.line(f"  mapping      {mapping}")
        out.line(f"  filtering    {filtering}")
        out.line(f"  hairpinning  {nat.hairpinning}")
        out.line(f"  verdict      {nat.verdict}")


async def _ice_run(
    out: _Output,
    title: str,
    timeout: float,
    *,
    stun: tuple[str, int],
    turn: TurnUri,
    relay_only: bool,
) -> None:
    out.heading(title)

    def agent(controlling: bool) -> IceConnection:
        return IceConnection(
            controlling,
            stun_servers=[stun],
            turn_servers=[turn],
            relay_only=relay_only,
            host_addresses=[_PRIMARY_IP],
            allow_loopback=True,
        )

    async with agent(True) as alice, agent(False) as bob:
        agents = {"alice (controlling)": alice, "bob (controlled)": bob}
        await asyncio.wait_for(asyncio.gather(alice.gather(), bob.gather()), timeout)
        for name, conn in agents.items():
            out.line(f"{name} candidates:")
            for candidate in conn.local_candidates:
                out.line(f"  a={candidate.to_sdp()}")
        # The signalling a web app would do: credentials and candidates, both ways.
        alice.set_remote_credentials(bob.local_username, bob.local_password)
        bob.set_remote_credentials(alice.local_username, alice.local_password)
        for here, there in ((alice, bob), (bob, alice)):
            for candidate in there.local_candidates:
                await here.add_remote_candidate(candidate)
            await here.add_remote_candidate(None)
        await asyncio.wait_for(asyncio.gather(alice.connect(), bob.connect()), timeout)
        for i in range(_MESSAGES):
            for sender, receiver, word in ((alice, bob, "ping"), (bob, alice, "pong")):
                message = f"{word} {i}".encode()
                await sender.send(message)
                got = await asyncio.wait_for(receiver.recv(), timeout)
                if got != message:
                    raise TsunaguError(f"sent {message!r}, received {got!r}")
        for name, conn in agents.items():
            selected = conn.selected_pair
            out.pairs(name, conn.agent.pairs(), selected)
            if selected is not None:
                out.line(
                    f"  {name} selected pair: {selected.local} <-> {selected.remote}"
                    f"  (local typ {selected.local.type.value}, state {conn.state.value})"
                )
        out.line(
            f"data: {_MESSAGES} pings alice->bob and {_MESSAGES} pongs bob->alice received intact"
        )
        out.line(f"{title}: connected")


async def _demo(timeout: float) -> int:
    out = _Output(sys.stdout.isatty())
    await _stun_part(out, timeout)
    password = secrets.token_urlsafe(12)  # a fresh credential for this run's TURN server
    stun_config = StunServerConfig(listen=((_PRIMARY_IP, 0),), rate_limit=0.0)
    turn_config = TurnServerConfig(
        listen=((_PRIMARY_IP, 0),),
        relay_ips=(_PRIMARY_IP,),
        users=(f"{_TURN_USER}:{password}",),
        realm="tsunagu.demo",
        # Loopback peers are refused by default; here both agents live on loopback.
        allow_peers=("127.0.0.0/8",),
        # Relay-only on both sides means relay-to-relay through this one server.
        relay_to_relay=True,
        # Keep relay ports clear of the ephemeral ports of the host candidates.
        min_port=61000,
        max_port=65535,
    )
    async with (
        await StunServer.start(stun_config) as stun_server,
        await TurnServer.start(turn_config) as turn_server,
    ):
        stun = stun_server.udp_addresses[0]
        turn_uri = f"turn:{_endpoint(turn_server.udp_addresses[0])}"
        out.heading("ICE")
        out.line(f"STUN server: stun:{_endpoint(stun)}")
        out.line(f"TURN server: {turn_uri} (user {_TURN_USER}, peers 127.0.0.0/8 allowed)")
        turn = TurnUri(turn_uri, _TURN_USER, password)
        for title, relay_only in (
            ("ICE run 1: all candidates", False),
            ("ICE run 2: relay only", True),
        ):
            await _ice_run(out, title, timeout, stun=stun, turn=turn, relay_only=relay_only)
    return 0


def _main(args: argparse.Namespace) -> int:
    try:
        return run(_demo(args.timeout))
    except (TsunaguError, OSError, TimeoutError) as exc:
        print(f"tsunagu demo failed: {exc!r}")
        return 1
