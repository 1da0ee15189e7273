"""``tsunagu turn-probe``: prove a TURN server works, end to end.

Allocate on the server (RFC 8656 §7), print the relayed and mapped addresses, create a
permission for a peer (§10), bounce datagrams off that peer through the relay measuring RTT
and loss, then deallocate (§8, LIFETIME 0). The default peer is a UDP echo socket the probe
opens itself on loopback; servers usually refuse loopback peers (coturn unless started with
``--allow-loopback-peers``), which the probe reports as the server's peer policy (403), so
against a remote server pass ``--peer`` with an echo service the server may reach.

With ``--tcp`` the probe asks for an RFC 6062 TCP allocation instead (over a
``?transport=tcp`` or ``turns:`` server): it starts a TCP echo peer on loopback (or uses
``--peer``), has the server connect to it (Connect, §4.3), binds a new data connection to
that peer connection (ConnectionBind) and times echoes of lines sent through it.

Every failure names its cause and exits with status 1: unreachable, timeout, 401 wrong
credentials, 403 peer refused, 486 quota, TLS error, ... ``--json`` prints one JSON object
with ``relayed``, ``mapped``, ``rtt_ms`` and ``lost`` (or ``error`` and ``cause``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

from tsunagu.aio.loop import run
from tsunagu.aio.turn_client import TurnClient, TurnTarget
from tsunagu.errors import IntegrityError, TransactionTimeoutError, TsunaguError, TurnError
from tsunagu.stun.attributes import Address
from tsunagu.turn.client import TurnClientConfig

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_TURN_CAUSES = {
    400: "bad request",
    401: "wrong credentials",
    403: "forbidden",
    420: "unknown attribute",
    437: "allocation mismatch",
    446: "connection already exists",
    447: "connection timeout or failure",
    440: "address family not supported",
    441: "wrong credentials",
    442: "unsupported transport protocol",
    486: "allocation quota reached",
    508: "insufficient capacity",
}


class ProbeError(Exception):
    """A failure with its cause: a short tag for scripts and a sentence for people."""

    def __init__(self, cause: str, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.code = code


@dataclass(slots=True)
class ProbeResult:
    server: str
    transport: str
    relay: str = "udp"
    """What the allocation relays: "udp" (RFC 8656) or "tcp" (RFC 6062)."""
    relayed: str = ""
    mapped: str = ""
    peer: str = ""
    sent: int = 0
    rtts_ms: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtts_ms)

    def as_json(self) -> dict[str, Any]:
        rtts = self.rtts_ms
        return {
            "server": self.server,
            "transport": self.transport,
            "relay": self.relay,
            "relayed": self.relayed,
            "mapped": self.mapped,
            "peer": self.peer,
            "sent": self.sent,
            "received": len(rtts),
            "lost": self.lost,
            "rtt_ms": round(statistics.fmean(rtts), 3) if rtts else None,
            "rtt_ms_min": round(min(rtts), 3) if rtts else None,
            "rtt_ms_max": round(max(rtts), 3) if rtts else None,
        }


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "turn-probe",
        help="allocate on a TURN server and relay test packets through it",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("uri", help="turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]")
    parser.add_argument("-u", "--user", required=True, help="long-term credential username")
    parser.add_argument("-p", "--password", required=True, help="long-term credential password")
    parser.add_argument(
        "--peer",
        metavar="HOST:PORT",
        help="echo peer to relay to, UDP (TCP with --tcp); default: one the probe starts "
        "on loopback",
    )
    parser.add_argument(
        "--tcp",
        action="store_true",
        help="RFC 6062 TCP allocation: connect to a TCP echo peer through the relay "
        "(needs ?transport=tcp or turns:)",
    )
    parser.add_argument("--count", type=int, default=5, help="datagrams to send (default 5)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the server at each step, and 1/5 of it per echo",
    )
    parser.add_argument("--cafile", help="PEM file of CAs to trust for turns: (default: system)")
    parser.add_argument(
        "--insecure", action="store_true", help="turns: without checking the certificate"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        target = TurnTarget.from_uri(args.uri)
        peer = _parse_peer(args.peer) if args.peer else None
        if args.count < 1 or not args.timeout > 0:
            raise ValueError("--count and --timeout must be positive")
        if args.tcp and target.transport == "udp":
            # RFC 6062 §4.1: the control connection of a TCP allocation is TCP or TLS.
            raise ValueError("--tcp needs a TCP or TLS server: ?transport=tcp or turns:")
    except ValueError as exc:
        print(f"turn-probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = ProbeResult(
        server=f"{_host(target.host)}:{target.port}",
        transport=target.transport,
        relay="tcp" if args.tcp else "udp",
    )
    try:
        run(_probe(args, target, peer, result))
    except ProbeError as exc:
        return _report_failure(args, result, exc)
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        _print_summary(result)
    if result.lost == result.sent:
        what = "messages" if args.tcp else "datagrams"
        return _report_failure(
            args, result, ProbeError("no-echo", f"none of {result.sent} {what} came back")
        )
    return EXIT_OK


async def _probe(
    args: argparse.Namespace, target: TurnTarget, peer: Address | None, result: ProbeResult
) -> None:
    timeout: float = args.timeout
    config = TurnClientConfig(requested_transport="tcp" if args.tcp else "udp")
    turn = TurnClient(
        target,
        args.user,
        args.password,
        config=config,
        ssl_context=_ssl_context(args, target),
        max_queued=256,
    )
    try:
        await _step(turn.connect(), timeout, "allocating")
    except ProbeError:
        raise
    except BaseException as exc:
        raise _explain(exc, target, "allocating") from exc
    echo: asyncio.DatagramTransport | asyncio.Server | None = None
    try:
        result.relayed = _format(turn.relayed_address)
        mapped = turn.mapped_address
        result.mapped = _format(mapped) if mapped is not None else ""
        if not args.json:
            print(f"relayed address: {result.relayed}")
            print(f"mapped address:  {result.mapped}")
        if peer is None:
            if args.tcp:
                echo, peer = await _start_tcp_echo_peer(turn.relayed_address)
            else:
                echo, peer = await _start_echo_peer(turn.relayed_address)
        result.peer = _format(peer)
        try:
            await _step(turn.create_permission(peer[0]), timeout, "creating a permission")
        except TurnError as exc:
            if exc.code == 403:
                raise ProbeError(
                    "peer-refused",
                    f"403 peer refused: the server's policy does not let it relay to "
                    f"{peer[0]} ({exc.reason}); loopback and private peers are often refused "
                    "(coturn: --allow-loopback-peers), pass --peer with a reachable echo peer",
                    403,
                ) from exc
            raise _explain(exc, target, "creating a permission") from exc
        except ProbeError:
            raise
        except BaseException as exc:
            raise _explain(exc, target, "creating a permission") from exc
        if args.tcp:
            await _ping_tcp(turn, peer, args.count, timeout, result)
        else:
            await _ping(turn, peer, args.count, timeout / 5, result)
    finally:
        if echo is not None:
            echo.close()
        try:
            await asyncio.wait_for(turn.close(), timeout)
        except (TimeoutError, TsunaguError, OSError) as exc:
            if not args.json:
                print(f"warning: deallocation was not confirmed: {exc}", file=sys.stderr)


async def _ping(
    turn: TurnClient, peer: Address, count: int, wait: float, result: ProbeResult
) -> None:
    loop = asyncio.get_running_loop()
    for sequence in range(count):
        payload = f"tsunagu turn-probe {sequence}".encode()
        started = loop.time()
        result.sent += 1
        try:
            await turn.send_to(payload, peer)
            deadline = started + wait
            while True:  # skip late echoes of earlier datagrams, bounded by the deadline
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                data, source = await asyncio.wait_for(turn.recv_from(), remaining)
                if data == payload and source[0] == peer[0]:
                    result.rtts_ms.append((loop.time() - started) * 1000)
                    break
        except TimeoutError:
            continue
        except BaseException as exc:
            raise _explain(exc, TurnTarget(peer[0], peer[1], "udp"), "relaying") from exc


async def _ping_tcp(
    turn: TurnClient, peer: Address, count: int, timeout: float, result: ProbeResult
) -> None:
    """RFC 6062: Connect to the peer, bind a data connection, time line echoes on it. A
    stream cannot skip a lost echo, so the first one missing ends the run."""
    try:
        reader, writer = await asyncio.wait_for(turn.connect_peer(peer), timeout)
    except TimeoutError as exc:
        raise ProbeError(
            "timeout", f"timeout: the TCP connection to {_format(peer)} took over {timeout:g} s"
        ) from exc
    except BaseException as exc:
        raise _explain(exc, TurnTarget(peer[0], peer[1], "tcp"), "connecting to the peer") from exc
    loop = asyncio.get_running_loop()
    try:
        for sequence in range(count):
            payload = f"tsunagu turn-probe {sequence}\n".encode()
            started = loop.time()
            result.sent += 1
            writer.write(payload)
            try:
                echoed = await asyncio.wait_for(reader.readexactly(len(payload)), timeout / 5)
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            if echoed != payload:
                raise ProbeError("protocol", f"the peer echoed {echoed!r}, not {payload!r}")
            result.rtts_ms.append((loop.time() - started) * 1000)
    except OSError as exc:
        raise _explain(exc, TurnTarget(peer[0], peer[1], "tcp"), "relaying") from exc
    finally:
        writer.close()


async def _step(awaitable: Any, timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError as exc:
        raise ProbeError(
            "timeout", f"timeout: no answer from the TURN server within {timeout:g} s {what}"
        ) from exc


def _explain(exc: BaseException, target: TurnTarget, what: str) -> ProbeError:
    """Turn whatever stopped the probe into a named cause."""
    where = f"{_host(target.host)}:{target.port}"
    if isinstance(exc, ProbeError):
        return exc
    if isinstance(exc, TurnError):
        if exc.code == 0:
            reason = exc.reason.removeprefix("server unreachable: ")
            return ProbeError("unreachable", f"unreachable: {where}: {reason}")
        cause = _TURN_CAUSES.get(exc.code, "error response")
        hint = " (check -u/-p)" if exc.code in (401, 441) else ""
        reason = exc.reason.rstrip("\x00 ")  # coturn pads some reason phrases with NULs
        return ProbeError(
            cause.replace(" ", "-"),
            f"{exc.code} {cause}: {reason} while {what}{hint}",
            exc.code,
        )
    if isinstance(exc, TransactionTimeoutError | TimeoutError):
        return ProbeError("timeout", f"timeout: no answer from {where} while {what}")
    if isinstance(exc, IntegrityError):
        return ProbeError(
            "integrity", f"integrity: the server's answers failed MESSAGE-INTEGRITY ({exc})"
        )
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return ProbeError("tls", f"TLS error with {where}: {exc}")
    if isinstance(exc, socket.gaierror):
        return ProbeError("unreachable", f"unreachable: cannot resolve {target.host}: {exc}")
    if isinstance(exc, OSError):
        return ProbeError("unreachable", f"unreachable: {where}: {exc.strerror or exc}")
    if isinstance(exc, TsunaguError):
        return ProbeError("protocol", f"protocol error while {what}: {exc}")
    if isinstance(exc, Exception):
        return ProbeError("error", f"{type(exc).__name__} while {what}: {exc}")
    raise exc


def _report_failure(args: argparse.Namespace, result: ProbeResult, exc: ProbeError) -> int:
    if args.json:
        document = result.as_json()
        document.update(error=str(exc), cause=exc.cause, code=exc.code)
        print(json.dumps(document))
    print(f"turn-probe: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _print_summary(result: ProbeResult) -> None:
    document = result.as_json()
    print(f"peer:            {result.peer}")
    print(f"packets:         {result.sent} sent, {len(result.rtts_ms)} received, "
          f"{result.lost} lost")  # fmt: skip
    if result.rtts_ms:
        print(
            f"rtt:             min {document['rtt_ms_min']:.3f} / avg {document['rtt_ms']:.3f}"
            f" / max {document['rtt_ms_max']:.3f} ms"
        )
    print("deallocated")


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def _start_echo_peer(relayed: Address) -> tuple[asyncio.DatagramTransport, Address]:
    """A UDP echo socket on the loopback address of the relayed address's family."""
    host = "::1" if ":" in relayed[0] else "127.0.0.1"
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(host, 0))
    sockname = transport.get_extra_info("sockname")
    return transport, (str(sockname[0]), int(sockname[1]))


async def _start_tcp_echo_peer(relayed: Address) -> tuple[asyncio.Server, Address]:
    """A TCP echo server on the loopback address of the relayed address's family."""
    host = "::1" if ":" in relayed[0] else "127.0.0.1"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, host, 0)
    sockname = server.sockets[0].getsockname()
    return server, (str(sockname[0]), int(sockname[1]))


def _ssl_context(args: argparse.Namespace, target: TurnTarget) -> ssl.SSLContext | None:
    if target.transport != "tls":
        return None
    context = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["stun.turn"])  # RFC 7443
    return context


def _parse_peer(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--peer must be HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ValueError(f"--peer {text!r}: {exc}") from exc
    address = infos[0][4]
    return (str(address[0]), int(address[1]))


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _format(address: Address) -> str:
    return f"{_host(address[0])}:{address[1]}"
