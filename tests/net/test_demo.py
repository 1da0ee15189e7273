"""The README's first command ends in `tsunagu demo`: it must work on loopback alone."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_reports_mapped_addresses_and_nat_behaviour() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", "demo", "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # On loopback there is no NAT: each mapped address is the address the request came from.
    pairs = re.findall(r"(udp|tcp)\s+mapped (\S+)\s+from (\S+)", done.stdout)
    assert {kind for kind, _, _ in pairs} == {"udp", "tcp"}
    for _, mapped, local in pairs:
        assert mapped == local
    assert re.search(r"mapping\s+endpoint-independent", done.stdout)
    assert re.search(r"filtering\s+endpoint-independent", done.stdout)
    assert re.search(r"hairpinning\s+True", done.stdout)
