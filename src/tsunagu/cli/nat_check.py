"""``tsunagu nat-check URI``: what kind of NAT are we behind? (RFC 5780 §4)

Runs the RFC 5780 tests against a STUN server that supports them (it must return
OTHER-ADDRESS): mapping behaviour, filtering behaviour, hairpinning, and with
``--lifetime`` how long an idle UDP mapping survives. Prints each finding in RFC 4787
terms and a verdict on what it means for peer-to-peer connections.

``--json`` prints one object: ``server``, ``local``, ``mapped``, ``other_address``,
``mapping`` and ``filtering`` (``endpoint-independent``, ``address-dependent``,
``address-and-port-dependent`` or null), ``hairpinning`` (true/false/null), ``nat_present``,
``udp_blocked``, ``software``, ``verdict``, ``error``, ``notes``, and with ``--lifetime``
``lifetime`` (seconds survived, a lower bound) and ``lifetime_expired_after``.

Exit status: 0 when mapping and filtering were determined; 1 when they could not be (UDP
blocked, a server without RFC 5780, a name that does not resolve), with the reason on
stderr (and the partial result on stdout); 2 for a malformed URI or option.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tsunagu.cli.stun import format_address
from tsunagu.errors import TsunaguError
from tsunagu.nat.discovery import DiscoveryConfig, NatDiscoveryResult
from tsunagu.nat.events import (
    LifetimeProbed,
    NatEvent,
    TestFinished,
)
from tsunagu.stun.uri import StunUri, StunUriError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _schedule(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of seconds: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty schedule")
    return values


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "nat-check",
        help="discover NAT mapping/filtering behaviour (RFC 5780)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("uri", help="stun:HOST[:PORT] (or turn:HOST[:PORT]) of an RFC 5780 server")
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds each test waits for its answer (a filtering test that times out "
        "means 'filtered'); default 3",
    )
    parser.add_argument(
        "--lifetime",
        action="store_true",
        help="also measure the binding lifetime (RFC 5780 §4.6; takes minutes)",
    )
    defaults = DiscoveryConfig()
    parser.add_argument(
        "--lifetime-schedule",
        type=_schedule,
        default=defaults.lifetime_schedule,
        metavar="S1,S2,...",
        help="idle periods to probe, increasing (default "
        + ",".join(f"{t:g}" for t in defaults.lifetime_schedule)
        + ")",
    )
    parser.add_argument(
        "--lifetime-budget",
        type=float,
        default=defaults.lifetime_budget,
        metavar="S",
        help=f"upper bound on the lifetime test in seconds (default {defaults.lifetime_budget:g})",
    )
    parser.add_argument(
        "--no-hairpin", action="store_true", help="skip the hairpinning test (RFC 5780 §4.5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        uri = StunUri.parse(args.uri)
        config = DiscoveryConfig(
            timeout=args.timeout,
            hairpinning=not args.no_hairpin,
            lifetime=args.lifetime,
            lifetime_schedule=args.lifetime_schedule,
            lifetime_budget=args.lifetime_budget,
        )
    except (StunUriError, ValueError) as exc:
        print(f"tsunagu nat-check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from tsunagu.aio.loop import run  # noqa: PLC0415 - keep `tsunagu --help` light
    from tsunagu.aio.stun_client import discover_nat  # noqa: PLC0415

    rich = not args.json and sys.stdout.isatty()
    progress = _RichProgress() if rich else None
    try:
        result = run(
            discover_nat(
                uri, config=config, on_event=progress.on_event if progress is not None else None
            )
        )
    except (TsunaguError, OSError) as exc:
        print(f"tsunagu nat-check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if progress is not None:
            progress.stop()
    document = as_json(result, lifetime=args.lifetime)
    if args.json:
        print(json.dumps(document))
    elif progress is not None:
        progress.summary(result, document)
    else:
        _print_plain(document)
    if result.mapping is None or result.filtering is None:
        reason = result.error or result.verdict
        print(f"tsunagu nat-check: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def as_json(result: NatDiscoveryResult, *, lifetime: bool) -> dict[str, Any]:
    """The ``--json`` document of a result."""
    document: dict[str, Any] = {
        "server": format_address(result.server),
        "local": format_address(result.local),
        "mapped": format_address(result.mapped),
        "other_address": format_address(result.other_address),
        "software": result.software,
        "nat_present": result.nat_present,
        "udp_blocked": result.udp_blocked,
        "mapping": result.mapping.value if result.mapping is not None else None,
        "filtering": result.filtering.value if result.filtering is not None else None,
        "hairpinning": result.hairpinning,
        "verdict": result.verdict,
        "error": result.error,
        "notes": list(result.notes),
    }
    if lifetime:
        document["lifetime"] = result.lifetime
        document["lifetime_expired_after"] = result.lifetime_expired_after
    return document


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def _rows(document: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            "server",
            f"{document['server']}"
            + (f" ({document['software']})" if document["software"] else ""),
        ),
        ("local", str(document["local"])),
        ("mapped", str(document["mapped"] or "unknown")),
        ("other address", str(document["other_address"] or "none (no RFC 5780 support)")),
        ("NAT", _yes_no(document["nat_present"])),
        ("mapping", document["mapping"] or "unknown"),
        ("filtering", document["filtering"] or "unknown"),
        ("hairpinning", _yes_no(document["hairpinning"])),
    ]
    if "lifetime" in document:
        lifetime, expired = document["lifetime"], document["lifetime_expired_after"]
        if lifetime is None:
            text = "not measured"
        elif expired is None:
            text = f"at least {lifetime:g} s"
        else:
            text = f"at least {lifetime:g} s, less than {expired:g} s"
        rows.append(("lifetime", text))
    if document["error"]:
        rows.append(("error", document["error"]))
    rows.extend(("note", note) for note in document["notes"])
    rows.append(("verdict", document["verdict"]))
    return rows


def _print_plain(document: dict[str, Any]) -> None:
    for name, value in _rows(document):
        print(f"{name + ':':<15}{value}")


class _RichProgress:
    """Live progress on a terminal: one line per finished test, then a table."""

    def __init__(self) -> None:
        from rich.console import Console  # noqa: PLC0415 - only for a terminal

        self._console = Console()
        self._status = self._console.status("RFC 5780 test I (Binding)...")
        self._status.start()

    def on_event(self, event: NatEvent) -> None:
        from rich.text import Text  # noqa: PLC0415

        if isinstance(event, TestFinished):
            if event.responded and event.error is None:
                outcome = "answered" + (f" in {event.rtt * 1000:.1f} ms" if event.rtt else "")
                style = "green"
            elif event.responded:
                outcome, style = f"error: {event.error}", "red"
            else:
                outcome, style = "no answer", "yellow"
            line = Text(f"  {event.test.value:<20}", style="dim")
            line.append(outcome, style=style)
            self._console.print(line)
            self._status.update("RFC 5780 tests...")
        elif isinstance(event, LifetimeProbed):
            self._status.update(f"binding lifetime: probed after {event.idle:g} s idle...")

    def stop(self) -> None:
        self._status.stop()

    def summary(self, result: NatDiscoveryResult, document: dict[str, Any]) -> None:
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan")
        table.add_column()
        good = result.mapping is not None and result.filtering is not None
        for name, value in _rows(document):
            style = ""
            if name == "verdict":
                style = "bold green" if good and "TURN" not in value else "bold yellow"
            elif name == "error":
                style = "red"
            table.add_row(name, Text(value, style=style))
        self._console.print(table)
