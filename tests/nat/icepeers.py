"""Two ``tsunagu ice-peer`` processes in lab namespaces, signalled to each other by the
test: each JSON line one prints goes to the other's stdin (optionally rewritten on the
way, to play a signalling channel that alters candidates). Shared by the namespace tests.

    results = run_pair([(lan_a, "controlling", [...]), (lan_b, "controlled", [...])], 8.0)
    local, remote = results[0].selected
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns

from tsunagu.ice.candidate import Candidate

__all__ = ["PeerResult", "Rewrite", "run_pair"]

Rewrite = Callable[[dict[str, Any]], dict[str, Any]]
GRACE = 5.0
"""Seconds past the peers' own ``--timeout`` before the test gives up on them."""


@dataclass
class PeerResult:
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    @property
    def selected(self) -> tuple[Candidate, Candidate] | None:
        """The (local, remote) candidates of the selected pair, if one was selected."""
        for line in self.lines:
            if "selected" in line:
                pair = line["selected"]
                return Candidate.from_sdp(pair["local"]), Candidate.from_sdp(pair["remote"])
        return None

    @property
    def received(self) -> set[str]:
        return {line["received"] for line in self.lines if "received" in line}


def _unchanged(line: dict[str, Any]) -> dict[str, Any]:
    return line


async def _pump(
    source: asyncio.subprocess.Process,
    sink: asyncio.subprocess.Process,
    lines: list[dict[str, Any]],
    rewrite: Rewrite,
) -> None:
    assert source.stdout is not None and sink.stdin is not None
    while raw := await source.stdout.readline():
        line = json.loads(raw)
        lines.append(line)
        if sink.returncode is None:
            try:
                sink.stdin.write(json.dumps(rewrite(line)).encode() + b"\n")
                await sink.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass


async def _run_pair(
    peers: Sequence[tuple[netns.Namespace, str, Sequence[str]]],
    timeout: float,
    rewrites: tuple[Rewrite, Rewrite],
) -> list[PeerResult]:
    tsunagu = str(Path(sys.executable).parent / "tsunagu")
    procs: list[asyncio.subprocess.Process] = []
    try:
        for ns, role, args in peers:
            argv = ["ip", "netns", "exec", ns.name, tsunagu, "ice-peer", "--role", role]
            procs.append(
                await asyncio.create_subprocess_exec(
                    *argv,
                    *args,
                    "--timeout",
                    str(timeout),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        outputs: list[list[dict[str, Any]]] = [[], []]
        async with asyncio.timeout(timeout + GRACE):
            await asyncio.gather(
                _pump(procs[0], procs[1], outputs[0], rewrites[0]),
                _pump(procs[1], procs[0], outputs[1], rewrites[1]),
            )
            codes = [await proc.wait() for proc in procs]
            errors = [(await p.stderr.read()).decode() if p.stderr else "" for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return [PeerResult(*result) for result in zip(codes, outputs, errors, strict=True)]


def run_pair(
    peers: Sequence[tuple[netns.Namespace, str, Sequence[str]]],
    timeout: float,
    *,
    rewrite_first: Rewrite = _unchanged,
    rewrite_second: Rewrite = _unchanged,
) -> list[PeerResult]:
    """Run two ice-peers, ``(namespace, role, extra arguments)`` each, with ``--timeout``,
    wired to each other; ``rewrite_first`` changes what the first one signals to the
    second, ``rewrite_second`` the other way."""
    return asyncio.run(_run_pair(peers, timeout, (rewrite_first, rewrite_second)))
