"""``tsunagu lab`` as a user runs it: a subprocess, JSON out, checked against the theory
table (issue 6 §3)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tsunagu.nat.theory import direct_possible
from tsunagu.sim.scenario import NAT_SPECS

EIM_APDF = "endpoint-independent/address-and-port-dependent"
SYMMETRIC = "address-and-port-dependent/address-and-port-dependent"


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsunagu", "lab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lab_json(*args: str) -> list[dict[str, Any]]:
    done = lab(*args, "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert isinstance(document, list)
    return document


def theory(entry: dict[str, Any]) -> bool:
    a_mapping, _, a_filtering = entry["a"].partition("/")
    b_mapping, _, b_filtering = entry["b"].partition("/")
    return direct_possible(a_mapping, a_filtering, b_mapping, b_filtering)


def test_one_scenario_json() -> None:
    [entry] = lab_json("--a", EIM_APDF, "--b", SYMMETRIC, "--no-turn")
    assert entry["a"] == EIM_APDF and entry["b"] == SYMMETRIC
    assert entry["turn"] is False
    assert entry["outcome"] == "failed"
    assert entry["time_to_connect"] is None and entry["selected"] is None
    [entry] = lab_json("--a", EIM_APDF, "--b", SYMMETRIC, "--turn")
    assert entry["turn"] is True and entry["outcome"] == "relay"
    assert entry["time_to_connect"] > 0
    local, remote = entry["selected"]
    assert "relay" in local or "relay" in remote


def test_matrix_json_agrees_with_theory() -> None:
    for turn in (False, True):
        entries = lab_json("--turn" if turn else "--no-turn")
        assert [(e["a"], e["b"]) for e in entries] == [(a, b) for a in NAT_SPECS for b in NAT_SPECS]
        for entry in entries:
            assert {"a", "b", "turn", "outcome"} <= entry.keys()
            assert entry["turn"] is turn
            if theory(entry):
                assert entry["outcome"] == "direct", entry
            else:
                assert entry["outcome"] == ("relay" if turn else "failed"), entry


def test_plain_table_when_not_a_terminal() -> None:
    done = lab("--no-turn")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "STUN only" in lines[0]
    assert lines[1].split()[-9:] == [
        "EIM/EIF", "EIM/ADF", "EIM/APDF", "ADM/EIF", "ADM/ADF", "ADM/APDF",
        "APDM/EIF", "APDM/ADF", "APDM/APDF",
    ]  # fmt: skip
    assert len(lines) == 2 + 9 + 1
    assert lines[-1] == "53 direct, 0 relay, 28 failed"
    assert "\x1b[" not in done.stdout


def test_bad_options_are_usage_errors() -> None:
    assert lab("--a", "endpoint-independent").returncode == 2
    assert lab("--a", EIM_APDF).returncode == 2  # --b missing
    assert lab("--a", "cone/open", "--b", EIM_APDF).returncode == 2
