"""Headless Chromium as the remote ICE agent (issue 5): the browser's iceConnectionState
reaches "connected" with ``tsunagu ice-peer`` as the other side, and our agent resolves
the browser's ``.local`` host candidate by mDNS.

The test builds two network namespaces joined by a veth pair and removes them afterwards::

      browser                                 peer
    veth0 10.215.0.1/24  ------------------- veth0 10.215.0.2/24
    224.0.0.0/4 and default via veth0         224.0.0.0/4 and default via veth0

Chromium runs in ``browser`` (it gathers host candidates only with a default route) and
loads a page served from that namespace's 127.0.0.1 by this process; ``tsunagu ice-peer
--role controlled --mdns`` runs in ``peer``. Signalling: the page POSTs its offer (after
gathering), the test hands the offer's ICE attributes to ice-peer as JSON lines, builds an
SDP answer from ice-peer's lines with the project's SDP helpers (DTLS is out of scope: the
fingerprint is a dummy), and the page polls for it. ice-peer starts, and so listens for
mDNS, before the browser does: Chromium announces its name when it gathers and answers no
query, so the name resolves from that announcement.
"""

from __future__ import annotations

import json
import queue
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tsunagu.ice.candidate import Candidate, CandidateType, TransportProtocol
from tsunagu.ice.sdp import IceDescription

_HERE = Path(__file__).resolve().parent
for folder in (_HERE, _HERE.parent / "nat"):  # chromium.py here, netns.py in tests/nat
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
import netns  # noqa: E402
from chromium import PageServer, launch, socket_in_namespace, stop  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.netns, pytest.mark.timeout(90)]

BROWSER_IP, PEER_IP = "10.215.0.1", "10.215.0.2"
WAIT = 30.0  # seconds any one step may take at most
DUMMY_FINGERPRINT = ":".join(["AB"] * 32)  # sha-256 sized; DTLS never starts here

PAGE = """<!doctype html><html><body><script>
(async () => {
  const post = (kind, body) => fetch("/" + kind, {method: "POST", body: JSON.stringify(body)});
  try {
    const pc = new RTCPeerConnection();
    pc.oniceconnectionstatechange = () => post("state", {state: pc.iceConnectionState});
    pc.createDataChannel("probe");
    const gathered = new Promise(resolve => {
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
      setTimeout(resolve, 10000);
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered;
    await post("offer", {sdp: pc.localDescription.sdp});
    let answer = null;
    for (let i = 0; i < 300 && answer === null; i++) {
      const response = await fetch("/answer");
      if (response.status === 200) answer = await response.json();
      else await new Promise(r => setTimeout(r, 100));
    }
    await pc.setRemoteDescription({type: "answer", sdp: answer.sdp});
    window.pc = pc;
  } catch (e) {
    await post("error", {error: String(e)});
  }
})();
</script></body></html>
"""


@contextmanager
def two_hosts() -> Iterator[tuple[netns.Namespace, netns.Namespace]]:
    with netns.lab("ichr") as lab:
        yield netns.two_hosts(lab, ("browser", "peer"), (BROWSER_IP, PEER_IP))


def next_post(page: PageServer, kind: str, deadline: float) -> Any:
    """The body of the page's next POST to ``/<kind>``; fails on an error report."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            got, body = page.posts.get(timeout=remaining)
        except queue.Empty:
            break
        if got == "error":
            pytest.fail(f"the page failed: {body}")
        if got == kind:
            return body
    pytest.fail(f"Chromium posted no {kind!r} within {WAIT} s")


def answer_sdp(offer: str, ice: IceDescription) -> str:
    """An SDP answer to Chromium's data-channel offer carrying our ICE attributes."""
    mid = next(line[6:] for line in offer.splitlines() if line.startswith("a=mid:"))
    lines = [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        f"a=group:BUNDLE {mid}",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        f"a=mid:{mid}",
        *ice.to_lines(),
        f"a=fingerprint:sha-256 {DUMMY_FINGERPRINT}",
        "a=setup:active",
        "a=sctp-port:5000",
    ]
    return "\r\n".join(lines) + "\r\n"


def test_chromium_connects_to_our_agent_and_its_local_name_is_resolved() -> None:
    with two_hosts() as (browser_ns, peer_ns), tempfile.TemporaryDirectory() as home:
        peer = peer_ns.start(
            "tsunagu", "ice-peer", "--role", "controlled", "--mdns",
            "--host-address", PEER_IP, "--timeout", str(WAIT),
            stdin=True,
        )  # fmt: skip
        ours: list[dict[str, Any]] = []
        while not ours or "end-of-candidates" not in ours[-1]:
            ours.append(json.loads(peer.wait_for_line("{", WAIT)))
        page = PageServer(socket_in_namespace(browser_ns.name), PAGE)
        browser = launch(browser_ns.name, f"http://127.0.0.1:{page.port}/page", home)
        try:
            deadline = time.monotonic() + WAIT
            offer = next_post(page, "offer", deadline)["sdp"]
            theirs = IceDescription.from_lines(offer.splitlines())
            assert theirs.ufrag is not None and theirs.pwd is not None, offer
            udp_hosts = [
                c
                for c in theirs.candidates
                if c.type is CandidateType.HOST and c.transport is TransportProtocol.UDP
            ]
            assert udp_hosts and all(c.is_mdns for c in udp_hosts), offer  # hidden by name
            signalling: list[dict[str, Any]] = [{"ufrag": theirs.ufrag, "pwd": theirs.pwd}]
            signalling += [{"candidate": c.to_sdp()} for c in theirs.candidates]
            signalling.append({"end-of-candidates": True})
            assert peer.popen.stdin is not None
            peer.popen.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in signalling))
            peer.popen.stdin.flush()

            ice = IceDescription(
                ufrag=ours[0]["ufrag"],
                pwd=ours[0]["pwd"],
                options=("trickle",),
                candidates=tuple(Candidate.from_sdp(m["candidate"]) for m in ours[1:-1]),
                end_of_candidates=True,
            )
            assert all(c.is_mdns for c in ice.candidates), ours  # ours hidden too
            page.replies["answer"] = {"sdp": answer_sdp(offer, ice)}

            states: list[str] = []
            while "connected" not in states and "completed" not in states:
                states.append(next_post(page, "state", deadline)["state"])
                assert "failed" not in states, states
            selected = json.loads(peer.wait_for_line('{"selected"', WAIT))["selected"]
        finally:
            stop(browser, group=True)
            page.close()
        remote = Candidate.from_sdp(selected["remote"])
        # The browser's .local name was resolved: the pair's remote is its host candidate
        # at its real address, not a peer-reflexive candidate learnt from its checks.
        assert (remote.type, remote.address) == (CandidateType.HOST, BROWSER_IP), selected
        local = Candidate.from_sdp(selected["local"])
        assert (local.type, local.address) == (CandidateType.HOST, PEER_IP), selected
