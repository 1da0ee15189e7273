"""Headless Chromium, given ``tsunagu turn-server`` in ``iceServers`` with
``iceTransportPolicy: "relay"``, gathers a ``relay`` candidate on our relay address.

Chromium gathers only on a network interface with a route, so the test builds its own
world: network namespace A holding one end of a veth pair (10.213.0.1/24, default route
via the other end) and namespace B holding the other end; nothing connects them to the
host's network. The TURN server and Chromium run in A; the page is served from A's
127.0.0.1 by an HTTP server in this process (its socket created inside A) and Chromium
POSTs the gathered candidates back to it. Both namespaces are removed afterwards.
A missing program is a failure, not a skip."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tests/interop/chromium.py, shared by the browser tests
    sys.path.insert(0, _HERE)
from chromium import PageServer, launch, program, socket_in_namespace, stop  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.netns]

RELAY_IP = "10.213.0.1"
GATEWAY_IP = "10.213.0.2"
USER, PASSWORD = "chromium", "relay-me"
TIMEOUT = 30.0

PAGE = """<!doctype html><html><body><script>
(async () => {
  const params = new URLSearchParams(location.search);
  const out = {candidates: [], errors: []};
  try {
    const pc = new RTCPeerConnection({
      iceServers: [{urls: params.get("turn"), username: params.get("user"),
                    credential: params.get("password")}],
      iceTransportPolicy: "relay",
    });
    pc.createDataChannel("probe");
    const gathered = new Promise(resolve => {
      pc.onicecandidate = e => e.candidate ? out.candidates.push(e.candidate.candidate)
                                           : resolve();
      pc.onicecandidateerror = e => out.errors.push(`${e.errorCode} ${e.errorText}`);
      setTimeout(resolve, 10000);
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered;
    pc.close();
  } catch (e) {
    out.errors.push(String(e));
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})();
</script></body></html>
"""


def ip(*args: str) -> None:
    subprocess.run([program("ip", "iproute2"), *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace() -> Iterator[str]:
    """Namespace A (returned) with a veth end, 10.213.0.1/24 and a default route; the
    other end in namespace B. Both removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (scripts/test.sh runs the suite as root)")
    tag = f"{os.getpid() % 100000}"
    inner, outer = f"tsg-chr-{tag}", f"tsg-gw-{tag}"
    created: list[str] = []
    try:
        for name in (inner, outer):
            ip("netns", "add", name)
            created.append(name)
        veth = ["type", "veth", "peer", "name", f"tc{tag}b", "netns", outer]
        ip("link", "add", f"tc{tag}a", "netns", inner, *veth)
        ip("-n", inner, "addr", "add", f"{RELAY_IP}/24", "dev", f"tc{tag}a")
        ip("-n", outer, "addr", "add", f"{GATEWAY_IP}/24", "dev", f"tc{tag}b")
        for name, device in ((inner, f"tc{tag}a"), (outer, f"tc{tag}b")):
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", device, "up")
        ip("-n", inner, "route", "add", "default", "via", GATEWAY_IP)
        yield inner
    finally:
        for name in created:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=10, check=False
            )


def test_chromium_gathers_a_relay_candidate_from_our_server(namespace: str) -> None:
    netns = ["ip", "netns", "exec", namespace]
    with tempfile.TemporaryDirectory() as home:
        log_path = Path(home) / "turn.log"
        with open(log_path, "w") as log:
            turn = subprocess.Popen(
                [
                    *netns, sys.executable, "-m", "tsunagu", "turn-server",
                    "--listen", "127.0.0.1:0", "--relay-ip", RELAY_IP,
                    "--min-port", "40000", "--max-port", "40099",
                    "--user", f"{USER}:{PASSWORD}", "--log-format", "json",
                    "--drain-timeout", "0",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )  # fmt: skip
        page: PageServer | None = None
        browser: subprocess.Popen[bytes] | None = None
        try:
            assert turn.stdout is not None
            ready, _, _ = select.select([turn.stdout], [], [], 15.0)
            line = turn.stdout.readline() if ready else ""
            match = re.search(r"udp 127\.0\.0\.1:(\d+)", line)
            assert match, f"turn-server did not start: {line!r} {log_path.read_text()}"
            port = int(match.group(1))
            page = PageServer(socket_in_namespace(namespace), PAGE)
            url = (
                f"http://127.0.0.1:{page.port}/page?turn=turn:127.0.0.1:{port}?transport=udp"
                f"&user={USER}&password={PASSWORD}"
            )
            browser = launch(namespace, url, home)
            try:
                _, result = page.posts.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"Chromium reported nothing within {TIMEOUT} s")
            relays = [c for c in result["candidates"] if " typ relay" in c]
            assert relays, result
            fields = relays[0].split()
            address, relay_port = fields[4], int(fields[5])
            assert address == RELAY_IP and 40000 <= relay_port <= 40099, relays
            assert all(" typ relay" in c for c in result["candidates"]), result  # relay policy
        finally:
            if browser is not None:
                stop(browser, group=True)
            if page is not None:
                page.close()
            stop(turn)
            if turn.stdout is not None:
                turn.stdout.close()
        assert turn.returncode == 0
        created = [
            json.loads(entry)
            for entry in log_path.read_text().splitlines()
            if '"allocation-created"' in entry
        ]
        assert created and created[0]["user"] == USER
        assert created[0]["relayed"] == f"{RELAY_IP}:{relay_port}"
