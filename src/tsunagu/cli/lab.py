"""``tsunagu lab``: the NAT lab (issue 6 §3) -- ICE between two peers behind simulated NATs.

Runs the default scenario of :mod:`tsunagu.sim.scenario` (each peer one host behind its
own NAT, STUN and TURN servers on the public side) on virtual time: one scenario when both
``--a`` and ``--b`` are given, else the whole 9 x 9 matrix (rows: peer A's NAT, columns:
peer B's). Prints a table of direct / relay / failed with the time to connect (coloured
with rich on a terminal, plain text otherwise), or with ``--json`` a list of objects with
``a``, ``b`` (``"MAPPING/FILTERING"`` with the behaviour names of ``nat-check --json``),
``turn``, ``outcome`` (``"direct"``, ``"relay"`` or ``"failed"``), ``time_to_connect``
(virtual seconds or null) and ``selected`` (A's selected pair, local and remote, or null).

Exit status: 0 when the runs completed (whatever their outcome); 2 for a bad option.
"""

from __future__ import annotations

import argparse
import json
import sys

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.sim.scenario import NAT_SPECS, ScenarioResult, run_matrix, run_scenario

EXIT_OK = 0
EXIT_USAGE = 2

_SHORT = {
    MappingBehavior.ENDPOINT_INDEPENDENT.value: "EI",
    MappingBehavior.ADDRESS_DEPENDENT.value: "AD",
    MappingBehavior.ADDRESS_AND_PORT_DEPENDENT.value: "APD",
}
_CORNER = "A \\ B"
_STYLE = {"direct": "bold green", "relay": "bold yellow", "failed": "bold red"}


def _spec(text: str) -> str:
    mapping, sep, filtering = text.partition("/")
    try:
        if not sep:
            raise ValueError(text)
        return f"{MappingBehavior(mapping).value}/{FilteringBehavior(filtering).value}"
    except ValueError:
        names = ", ".join(behaviour.value for behaviour in MappingBehavior)
        raise argparse.ArgumentTypeError(
            f"expected MAPPING/FILTERING with each one of {names}, got {text!r}"
        ) from None


def short(spec: str) -> str:
    """``"endpoint-independent/address-dependent"`` -> ``"EIM/ADF"``."""
    mapping, _, filtering = spec.partition("/")
    return f"{_SHORT[mapping]}M/{_SHORT[filtering]}F"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="simulate ICE between two peers behind NATs (one pair or the 9x9 matrix)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--a", type=_spec, metavar="MAPPING/FILTERING", help="peer A's NAT")
    parser.add_argument("--b", type=_spec, metavar="MAPPING/FILTERING", help="peer B's NAT")
    parser.add_argument(
        "--turn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give both peers a TURN relay candidate (default: on)",
    )
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run, parser=parser)


def to_json(result: ScenarioResult) -> dict[str, object]:
    return {
        "a": result.a,
        "b": result.b,
        "turn": result.turn,
        "outcome": result.outcome,
        "time_to_connect": result.time_to_connect,
        "selected": None if result.selected is None else list(result.selected),
    }


def _cell(result: ScenarioResult) -> str:
    if result.time_to_connect is None:
        return result.outcome
    return f"{result.outcome} {result.time_to_connect:.2f}s"


def run(args: argparse.Namespace) -> int:
    if (args.a is None) != (args.b is None):
        args.parser.error("give both --a and --b for one scenario, or neither for the matrix")
    if args.a is not None:
        results = [run_scenario(args.a, args.b, turn=args.turn, seed=args.seed)]
    else:
        results = run_matrix(args.turn, seed=args.seed)
    if args.json:
        print(json.dumps([to_json(result) for result in results], indent=2))
    elif sys.stdout.isatty():
        _print_rich(results, args.turn)
    else:
        _print_plain(results, args.turn)
    return EXIT_OK


def _title(turn: bool) -> str:
    servers = "STUN + TURN" if turn else "STUN only"
    return f"ICE through two NATs ({servers}); rows: peer A, columns: peer B"


def _grid(
    results: list[ScenarioResult],
) -> tuple[list[str], list[str], dict[tuple[str, str], ScenarioResult]]:
    rows = [spec for spec in NAT_SPECS if any(r.a == spec for r in results)]
    columns = [spec for spec in NAT_SPECS if any(r.b == spec for r in results)]
    return rows, columns, {(r.a, r.b): r for r in results}


def _summary(results: list[ScenarioResult]) -> str:
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in _STYLE}
    return ", ".join(f"{counts[outcome]} {outcome}" for outcome in _STYLE)


def _print_plain(results: list[ScenarioResult], turn: bool) -> None:
    rows, columns, cells = _grid(results)
    width = max(14, *(len(_cell(r)) for r in results))
    print(_title(turn))
    print(_CORNER.ljust(11) + "".join(f"{short(c):>{width + 1}}" for c in columns))
    for row in rows:
        line = f"{short(row):<11}"
        for column in columns:
            result = cells.get((row, column))
            line += f"{'' if result is None else _cell(result):>{width + 1}}"
        print(line)
    print(_summary(results))


def _print_rich(results: list[ScenarioResult], turn: bool) -> None:
    from rich.console import Console  # noqa: PLC0415 - only for a terminal
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    rows, columns, cells = _grid(results)
    table = Table(title=_title(turn), caption=_summary(results))
    table.add_column(_CORNER, style="bold")
    for column in columns:
        table.add_column(short(column), justify="center")
    for row in rows:
        line: list[Text | str] = [short(row)]
        for column in columns:
            result = cells.get((row, column))
            line.append(
                Text("") if result is None else Text(_cell(result), style=_STYLE[result.outcome])
            )
        table.add_row(*line)
    Console().print(table)
