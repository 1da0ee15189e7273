"""``tsunagu ice-peer``: one ICE agent, signalled through stdin/stdout in JSON lines.

Candidates: UDP host candidates on ``--host-address`` (default 127.0.0.1), or on every
address of the ``--interface`` interfaces (link-local ones left out), bound within
``--port-range`` if given; server-reflexive ones from ``--stun`` servers, relayed ones
from ``--turn`` servers (``--relay-only``: only those). ``--mdns`` signals host candidates
under ``.local`` names; remote ``.local`` candidates are resolved by mDNS either way.

Prints ``{"ufrag": ..., "pwd": ...}``, one ``{"candidate": "candidate:..."}`` per local
candidate (RFC 8839 value), each as soon as it is gathered (trickle ICE, RFC 8838), and
``{"end-of-candidates": true}``; reads the same kinds of lines for the remote side from
stdin, from the start (remote candidates are checked while ours are still gathered). On
selection it prints ``{"selected": {"local": "...", "remote": "..."}}`` (the candidates'
RFC 8839 values). With ``--send N`` it sends N datagrams ``ping <i>`` (again every 250 ms
until answered) and answers each ``ping <i>`` with ``pong <i>``, printing ``{"received":
"..."}`` for every datagram; once its N pongs arrived it keeps answering for about a
second, so the peer can finish too, and exits 0. Without ``--send`` it answers for that
second after selection and exits 0.

Exit status: 0 as above; 1 at ``--timeout`` or when ICE fails; 2 for a bad option.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
from typing import Any

from tsunagu.aio.ice import IceConnection, IceFailedError, TurnServer
from tsunagu.aio.interfaces import check_port_range
from tsunagu.aio.loop import run
from tsunagu.errors import TsunaguError
from tsunagu.ice.candidate import Candidate
from tsunagu.stun.uri import StunUri, StunUriError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
LINGER = 1.0
"""Seconds to keep answering after our own exchange is done."""
RESEND = 0.25
"""Seconds between two rounds of unanswered pings."""


class _NoHostAddressError(ValueError):
    """``--interface`` named no interface with a usable address."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ice-peer",
        help="run one ICE agent signalled by JSON lines on stdin/stdout",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--role", choices=("controlling", "controlled"), required=True)
    parser.add_argument(
        "--stun",
        action="append",
        default=[],
        metavar="URI",
        help="stun:HOST[:PORT] for server-reflexive candidates (repeatable)",
    )
    parser.add_argument(
        "--turn",
        action="append",
        default=[],
        metavar="URI",
        help="turn:HOST[:PORT][?transport=tcp] or turns:HOST[:PORT] for a relayed candidate "
        "(repeatable; with --username and --password)",
    )
    parser.add_argument("--username", default="", help="TURN username")
    parser.add_argument("--password", default="", help="TURN password")
    parser.add_argument("--relay-only", action="store_true", help="gather relayed candidates only")
    parser.add_argument(
        "--send", type=int, default=0, metavar="N", help="send N pings and await N pongs"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="give up (exit 1) after S seconds (default 30)",
    )
    parser.add_argument(
        "--host-address",
        action="append",
        default=[],
        metavar="IP",
        help="bind a host candidate on IP, fe80::1%%eth0 for an IPv6 link-local one "
        "(repeatable; default 127.0.0.1 unless --interface is given)",
    )
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="NAME",
        help="gather host candidates on every address of interface NAME (repeatable; "
        "not with --host-address)",
    )
    parser.add_argument(
        "--port-range",
        type=_port_range,
        default=None,
        metavar="MIN-MAX",
        help="bind the UDP host candidates on ports MIN to MAX (inclusive)",
    )
    parser.add_argument(
        "--mdns",
        action="store_true",
        help="signal host candidates under random .local names (mDNS), as browsers do; "
        "remote .local candidates are resolved with or without it",
    )
    parser.set_defaults(func=main)


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN-MAX")
    port_range = (int(low), int(high))
    try:
        check_port_range(port_range)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return port_range


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(args: argparse.Namespace) -> int:
    if args.send < 0 or not args.timeout > 0:
        print("ice-peer: --send must be >= 0 and --timeout positive", file=sys.stderr)
        return EXIT_USAGE
    if args.relay_only and not args.turn:
        print("ice-peer: --relay-only needs --turn", file=sys.stderr)
        return EXIT_USAGE
    if args.host_address and args.interface:
        print("ice-peer: --host-address and --interface exclude each other", file=sys.stderr)
        return EXIT_USAGE
    servers: list[tuple[str, int]] = []
    for text in args.stun:
        try:
            uri = StunUri.parse(text)
        except StunUriError as exc:
            print(f"ice-peer: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if uri.is_turn or uri.secure:
            print(f"ice-peer: {text}: only stun: URIs are supported", file=sys.stderr)
            return EXIT_USAGE
        servers.append(uri.address)
    relays: list[TurnServer] = []
    for text in args.turn:
        try:
            uri = StunUri.parse(text)
        except StunUriError as exc:
            print(f"ice-peer: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if not uri.is_turn:
            print(f"ice-peer: {text}: --turn takes turn: or turns: URIs", file=sys.stderr)
            return EXIT_USAGE
        relays.append(TurnServer(text, args.username, args.password))
    try:
        return run(_run(args, servers, relays))
    except _NoHostAddressError as exc:
        print(f"ice-peer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TimeoutError:
        print(f"ice-peer: timed out after {args.timeout} s", file=sys.stderr)
    except IceFailedError as exc:
        print(f"ice-peer: {exc}", file=sys.stderr)
    except (TsunaguError, OSError, ValueError) as exc:
        print(f"ice-peer: {exc}", file=sys.stderr)
    return EXIT_FAILED


async def _run(
    args: argparse.Namespace, servers: list[tuple[str, int]], relays: list[TurnServer]
) -> int:
    async with asyncio.timeout(args.timeout):
        async with IceConnection(
            controlling=args.role == "controlling",
            stun_servers=servers,
            turn_servers=relays,
            relay_only=args.relay_only,
            host_addresses=None if args.interface else args.host_address or ["127.0.0.1"],
            interfaces=args.interface or None,
            port_range=args.port_range,
            allow_loopback=True,
            mdns=args.mdns,
        ) as conn:
            if args.interface and not conn.host_addresses and not args.relay_only:
                raise _NoHostAddressError(
                    f"no usable address on interface {', '.join(args.interface)}"
                )
            _emit({"ufrag": conn.local_username, "pwd": conn.local_password})
            reader = asyncio.create_task(_read_signalling(conn))
            try:
                await _trickle(conn)
                return await _exchange(conn, args.send, reader)
            finally:
                reader.cancel()


async def _trickle(conn: IceConnection) -> None:
    """Print each local candidate as soon as it is gathered, then end-of-candidates."""
    gathering = asyncio.create_task(conn.gather())
    try:
        async for candidate in conn.local_candidates_trickled():
            _emit({"candidate": candidate.to_sdp()})
        await gathering  # raises what stopped gathering, if anything
    finally:
        gathering.cancel()
    _emit({"end-of-candidates": True})


async def _read_signalling(conn: IceConnection) -> None:
    # A daemon thread reads stdin, whatever it is (pipe, terminal, file, /dev/null), and
    # never holds the exit back; lines reach the loop through a queue.
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes] = asyncio.Queue()

    def read() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a
        # buffered reader's lock aborts the interpreter at exit.
        pending = b""
        while True:
            try:
                chunk = os.read(0, 65536)
            except OSError:
                chunk = b""
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if not chunk and pending:
                complete.append(pending)
            try:
                for line in complete:
                    if line.strip():
                        loop.call_soon_threadsafe(lines.put_nowait, line)
                if not chunk:
                    loop.call_soon_threadsafe(lines.put_nowait, b"")
            except RuntimeError:  # the loop is closed: we are exiting
                return
            if not chunk:
                return

    threading.Thread(target=read, name="ice-peer-stdin", daemon=True).start()
    await _apply_signalling(conn, lines)


async def _apply_signalling(conn: IceConnection, lines: asyncio.Queue[bytes]) -> None:
    while line := await lines.get():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            print(f"ice-peer: ignoring a line that is not JSON: {line!r}", file=sys.stderr)
            continue
        if not isinstance(message, dict):
            continue
        if "ufrag" in message and "pwd" in message:
            conn.set_remote_credentials(str(message["ufrag"]), str(message["pwd"]))
        elif "candidate" in message:
            try:
                candidate = Candidate.from_sdp(str(message["candidate"]))
            except ValueError as exc:
                print(f"ice-peer: ignoring a candidate: {exc}", file=sys.stderr)
                continue
            await conn.add_remote_candidate(candidate)
        elif message.get("end-of-candidates"):
            await conn.add_remote_candidate(None)


async def _exchange(conn: IceConnection, count: int, reader: asyncio.Task[None]) -> int:
    connecting = asyncio.ensure_future(conn.connect())
    try:
        done, _ = await asyncio.wait({connecting, reader}, return_when=asyncio.FIRST_COMPLETED)
        if connecting not in done:
            reader.result()  # raises what stopped the reader, if anything
            await connecting  # stdin closed: the peer's checks may still arrive
        pair = connecting.result()
    finally:
        connecting.cancel()
    _emit({"selected": {"local": pair.local.to_sdp(), "remote": pair.remote.to_sdp()}})
    pongs: set[int] = set()
    all_pongs = asyncio.Event()
    if count == 0:
        all_pongs.set()
    answering = asyncio.create_task(_answer(conn, count, pongs, all_pongs))
    try:
        while not all_pongs.is_set():
            for i in range(count):
                if i not in pongs:
                    await conn.send(f"ping {i}".encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_pongs.wait(), RESEND)
        await asyncio.sleep(LINGER)  # keep answering so the peer can finish too
    finally:
        answering.cancel()
    return EXIT_OK


async def _answer(
    conn: IceConnection, count: int, pongs: set[int], all_pongs: asyncio.Event
) -> None:
    while True:
        data = await conn.recv()
        text = data.decode("utf-8", "replace")
        _emit({"received": text})
        kind, _, number = text.partition(" ")
        if not number.isdigit():
            continue
        if kind == "ping":
            await conn.send(f"pong {number}".encode())
        elif kind == "pong" and int(number) < count:
            pongs.add(int(number))
            if len(pongs) == count:
                all_pongs.set()
