"""``tsunagu stun-server``: a STUN Binding server (RFC 8489) with RFC 5780 NAT behaviour
discovery, over UDP, TCP and TLS.

Settings come from :class:`~tsunagu.stun.server_config.StunServerConfig` defaults, then the
``--config`` TOML file, then the flags given on the command line. Once every socket is bound
the command prints one line to stdout, e.g.::

    listening udp 127.0.0.1:3478, tcp 127.0.0.1:3478

and flushes it, so a script can wait for readiness by reading it. SIGTERM or SIGINT stop the
server with exit status 0; a bad setting exits 2, a socket that cannot be bound 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tsunagu.address import parse_address
from tsunagu.stun.constants import DEFAULT_PORT, DEFAULT_TLS_PORT
from tsunagu.stun.server_config import LOG_LEVELS, StunServerConfig, load_toml


def _address(default_port: int) -> Any:
    def parse(text: str) -> tuple[str, int]:
        try:
            return parse_address(text, default_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "HOST:PORT"  # what argparse names in its error messages
    return parse


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "stun-server",
        help="run a STUN server (RFC 8489, RFC 5780)",
        description=(
            "Answer STUN Binding requests over UDP, TCP and TLS. With --other, also RFC 5780 "
            "NAT behaviour discovery. Prints 'listening ...' on stdout once ready."
        ),
    )
    add = parser.add_argument
    add(
        "--listen",
        action="append",
        type=_address(DEFAULT_PORT),
        metavar="HOST:PORT",
        help="UDP and TCP address, repeatable; IPv6 as [::1]:3478; port 0 picks one "
        "(default 0.0.0.0:3478)",
    )
    add(
        "--tls-listen",
        action="append",
        type=_address(DEFAULT_TLS_PORT),
        metavar="HOST:PORT",
        help="TLS address, repeatable (needs --cert and --key)",
    )
    add("--cert", metavar="FILE", help="PEM certificate chain for --tls-listen")
    add("--key", metavar="FILE", help="PEM private key for --tls-listen")
    add(
        "--other",
        type=_address(DEFAULT_PORT),
        metavar="HOST:PORT",
        help="RFC 5780 alternate address: a second IP and a second port",
    )
    add("--config", metavar="FILE", help="TOML file of settings (flags override it)")
    software = parser.add_mutually_exclusive_group()
    software.add_argument("--software", metavar="TEXT", help="SOFTWARE attribute text")
    software.add_argument(
        "--no-software",
        action="store_true",
        default=None,
        help="send no SOFTWARE attribute",
    )
    add(
        "--rate-limit",
        type=float,
        metavar="N",
        help="responses per second per source IP (IPv6: per /64); 0 disables (default 100)",
    )
    add("--rate-burst", type=int, metavar="N", help="token bucket size (default 200)")
    add(
        "--max-tracked-sources",
        type=int,
        metavar="N",
        help="sources the rate limiter remembers, LRU (default 65536)",
    )
    add("--workers", type=int, metavar="N", help="processes sharing the ports (default 1)")
    add(
        "--max-connections",
        type=int,
        metavar="N",
        help="TCP+TLS connections per worker (default 1024)",
    )
    add("--idle-timeout", type=float, metavar="SECONDS", help="TCP/TLS idle timeout (default 60)")
    add(
        "--padding-length",
        type=int,
        metavar="BYTES",
        help="RFC 5780 PADDING length, capped at the request size (default 1500)",
    )
    add("--log-level", choices=LOG_LEVELS, help="logging level on stderr (default info)")
    parser.set_defaults(func=run)


# Flags whose value is a StunServerConfig field of the same name.
_FIELDS = (
    "listen",
    "tls_listen",
    "cert",
    "key",
    "other",
    "software",
    "rate_limit",
    "rate_burst",
    "max_tracked_sources",
    "workers",
    "max_connections",
    "idle_timeout",
    "padding_length",
    "log_level",
)


def build_config(args: argparse.Namespace) -> StunServerConfig:
    """Defaults, then ``--config``, then the flags actually given. Raises ValueError."""
    overrides: dict[str, object] = {}
    for name in _FIELDS:
        value = getattr(args, name)
        if value is None:
            continue
        overrides[name] = tuple(value) if isinstance(value, list) else value
    if args.no_software:
        overrides["software"] = None
    if args.config is not None:
        return load_toml(args.config, **overrides)
    return StunServerConfig(**overrides)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"tsunagu stun-server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    def announce(line: str) -> None:
        print(line, flush=True)

    # Imported here so that `tsunagu --help` does not load asyncio, ssl and uvloop.
    from tsunagu.aio.stun_server import serve  # noqa: PLC0415

    return serve(config, announce)
