"""``tsunagu demo``: the README's first command.

Starts tsunagu's STUN server on loopback with its RFC 5780 second address (127.0.0.2, which
Linux routes to loopback), asks it for our mapped address over UDP and TCP, then runs NAT
behaviour discovery against it, printing each step. Everything stays on this machine.
"""

from __future__ import annotations

import argparse

from tsunagu.aio.loop import run
from tsunagu.aio.stun_client import BindingResult, binding_request, discover_nat
from tsunagu.aio.stun_server import StunServer
from tsunagu.errors import TsunaguError
from tsunagu.stun.server_config import StunServerConfig

_PRIMARY_IP = "127.0.0.1"
_OTHER_IP = "127.0.0.2"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a STUN server on loopback and query it (no network needed)"
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


async def _demo(timeout: float) -> int:
    config = StunServerConfig(listen=((_PRIMARY_IP, 0),), other=(_OTHER_IP, 0), rate_limit=0.0)
    async with await StunServer.start(config) as server:
        print(f"STUN server: {server.listening_line()}")
        udp = server.udp_addresses[0]
        tcp = server.tcp_addresses[0]
        print("Binding requests (RFC 8489):")
        print(_describe("udp", await binding_request(udp, timeout=timeout)))
        # stun: URIs name no transport (RFC 7064); turn: ones do (RFC 7065), and a TURN
        # server answers Binding too, so that is how a URI asks for STUN over TCP.
        uri = f"turn:{_endpoint(tcp)}?transport=tcp"
        print(_describe("tcp", await binding_request(uri, timeout=timeout)))
        print("NAT behaviour discovery (RFC 5780) against the same server:")
        nat = await discover_nat(udp, timeout=timeout)
        mapping = nat.mapping.value if nat.mapping else "unknown"
        filtering = nat.filtering.value if nat.filtering else "unknown"
        print(f"  mapping      {mapping}")
        print(f"  filtering    {filtering}")
        print(f"  hairpinning  {nat.hairpinning}")
        print(f"  verdict      {nat.verdict}")
    return 0


def _main(args: argparse.Namespace) -> int:
    try:
        return run(_demo(args.timeout))
    except (TsunaguError, OSError) as exc:
        print(f"tsunagu demo failed: {exc}")
        return 1
