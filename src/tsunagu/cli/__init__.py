"""The ``tsunagu`` command line: one module per sub-command.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (taking the parsed namespace, returning the exit status) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tsunagu import __version__

# Module names under tsunagu.cli, in the order `tsunagu --help` lists them.
COMMANDS = (
    "demo",
    "stun",
    "nat_check",
    "stun_server",
    "turn_server",
    "turn_probe",
    "ice_peer",
    "lab",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsunagu", description="STUN, TURN, ICE and NAT tools (つなぐ: to connect)."
    )
    parser.add_argument("--version", action="version", version=f"tsunagu {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"tsunagu.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
