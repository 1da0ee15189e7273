"""The README's first command ends in `tsunagu demo`: it must work on loopback alone."""

from __future__ import annotations

import re
import subprocess
import sys
import time


def test_demo_reports_stun_then_connects_two_ice_agents_twice() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", "demo", "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert elapsed < 20, f"demo took {elapsed:.1f} s"

    # STUN part. On loopback there is no NAT: each mapped address is the address the
    # request came from.
    pairs = re.findall(r"(udp|tcp)\s+mapped (\S+)\s+from (\S+)", out)
    assert {kind for kind, _, _ in pairs} == {"udp", "tcp"}
    for _, mapped, local in pairs:
        assert mapped == local
    assert re.search(r"mapping\s+endpoint-independent", out)
    assert re.search(r"filtering\s+endpoint-independent", out)
    assert re.search(r"hairpinning\s+True", out)

    # ICE part: two runs, each connected with data verified both ways.
    assert "TURN server: turn:127.0.0.1:" in out
    first, second = out.split("== ICE run 2: relay only ==")
    assert "== ICE run 1: all candidates ==" in first
    for run, title in ((first, "ICE run 1: all candidates"), (second, "ICE run 2: relay only")):
        assert f"{title}: connected" in run
        assert "received intact" in run
        assert re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 \d+ typ ", run)
        # A pair table per agent, with the selected pair marked, nominated and succeeded.
        assert run.count("candidate pairs (* selected)") == 2
        assert (
            len(re.findall(r"^\s+\* \S+ udp \S+\s+\S+ udp \S+\s+succeeded\s+yes", run, re.M)) == 2
        )
    run1 = first.split("== ICE run 1: all candidates ==")[1]
    # All candidates: host and relay gathered; loopback hosts reach each other directly.
    assert " typ host" in run1 and " typ relay" in run1
    assert len(re.findall(r"selected pair: host udp .*\(local typ host", run1)) == 2
    # Relay only: nothing but relayed candidates, and both selected pairs go through TURN.
    candidates = re.findall(r"a=candidate:.*", second)
    assert len(candidates) == 2
    assert all(" typ relay " in line for line in candidates)
    selected = re.findall(
        r"selected pair: (\S+) udp \S+ <-> (\S+) udp .*\(local typ (\S+),", second
    )
    assert selected == [("relay", "relay", "relay")] * 2
