"""``tsunagu stun URI``: send one STUN Binding request and show what the server saw.

Prints the mapped address (XOR-MAPPED-ADDRESS, RFC 8489 §14.2), the round-trip time and the
server's SOFTWARE. ``--json`` prints one object instead: ``uri``, ``server``, ``transport``,
``local``, ``mapped`` (``IP:PORT``, IPv6 as ``[addr]:port``), ``rtt_ms``, ``software``,
``transmissions`` and, from RFC 5780 servers, ``other_address``.

Exit status: 0 on an answer; 1 on a timeout, a name that does not resolve, a refusal or an
error response, with the reason on stderr; 2 for a malformed URI or option.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from typing import Any

from tsunagu.address import format_address as address_text
from tsunagu.errors import StunResponseError, TransactionTimeoutError, TsunaguError
from tsunagu.stun.attributes import Address
from tsunagu.stun.uri import StunUri, StunUriError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def format_address(address: Address | None) -> str | None:
    """``IP:PORT``, IPv6 as ``[addr]:port``; None stays None."""
    return None if address is None else address_text(address)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stun",
        help="send a STUN Binding request and print the mapped address",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "uri",
        help="stun:HOST[:PORT], stuns:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] "
        "or turns:HOST[:PORT]",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to wait in all, DNS and retransmissions included (default 5)",
    )
    parser.add_argument("--cafile", help="PEM file of CAs to trust for stuns:/turns:")
    parser.add_argument(
        "--insecure", action="store_true", help="stuns:/turns: without checking the certificate"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        uri = StunUri.parse(args.uri)
        if not args.timeout > 0:
            raise ValueError("--timeout must be positive")
        context = _ssl_context(args) if uri.secure else None
    except (StunUriError, ValueError, OSError) as exc:
        print(f"tsunagu stun: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Imported here so that `tsunagu --help` does not load asyncio and ssl machinery.
    from tsunagu.aio.loop import run  # noqa: PLC0415
    from tsunagu.aio.stun_client import binding_request  # noqa: PLC0415

    try:
        result = run(binding_request(uri, timeout=args.timeout, ssl_context=context))
    except TransactionTimeoutError as exc:
        return _fail(f"timeout: {exc}")
    except StunResponseError as exc:
        return _fail(f"the server answered with an error: {exc.code} {exc.reason}")
    except (TsunaguError, OSError, ssl.SSLError) as exc:
        return _fail(str(exc))
    document: dict[str, Any] = {
        "uri": str(uri),
        "server": format_address(result.server),
        "transport": result.transport,
        "local": format_address(result.local),
        "mapped": format_address(result.mapped),
        "rtt_ms": round(result.rtt * 1000, 3),
        "software": result.software,
        "transmissions": result.transmissions,
        "other_address": format_address(result.other_address),
    }
    if args.json:
        print(json.dumps(document))
    elif sys.stdout.isatty():
        _print_rich(document)
    else:
        _print_plain(document)
    return EXIT_OK


def _fail(message: str) -> int:
    print(f"tsunagu stun: {message}", file=sys.stderr)
    return EXIT_FAILED


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _rows(document: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("server", f"{document['server']} ({document['transport']}, {document['uri']})"),
        ("mapped", str(document["mapped"])),
        ("local", str(document["local"])),
        ("rtt", f"{document['rtt_ms']:.3f} ms"),
        ("software", document["software"] or "(none)"),
    ]
    if document["transmissions"] > 1:
        rows.append(("requests", f"{document['transmissions']} (retransmitted)"))
    if document["other_address"]:
        rows.append(("other address", f"{document['other_address']} (RFC 5780)"))
    return rows


def _print_plain(document: dict[str, Any]) -> None:
    for name, value in _rows(document):
        print(f"{name + ':':<15}{value}")


def _print_rich(document: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415 - only for a terminal
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column()
    for name, value in _rows(document):
        # Text, not markup: "[::1]:3478" must not be read as a style tag.
        table.add_row(name, Text(value, style="bold green" if name == "mapped" else ""))
    Console().print(table)
