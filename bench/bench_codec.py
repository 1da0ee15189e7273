"""STUN codec benchmark: tsunagu against aioice, in one process, ratios printed.

Two workloads, each the whole job an ICE agent does per packet:

(a) a connectivity-check Binding request (USERNAME "abcd:efgh", PRIORITY, ICE-CONTROLLING,
    USE-CANDIDATE, MESSAGE-INTEGRITY under a 22-character password, FINGERPRINT): build and
    encode it, decode it, verify FINGERPRINT (both codecs do that while decoding) and
    MESSAGE-INTEGRITY, and read the attributes the receiving agent reads;
(b) its success response (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT), the same way.

Each workload is also timed as encode only and as decode + verify + read only, so a ratio
can be traced to one side. Timing: ``time.perf_counter`` around a loop sized to take about
``--target`` seconds, ``--repeats`` times for each codec, the two codecs alternating run by
run; the median of the repeats is reported.

    .venv/bin/python bench/bench_codec.py [--repeats 7] [--target 0.2]

The aioice API used here is that of aioice 0.13 (``aioice.stun``): ``Message(...)`` with an
``attributes`` dict, ``add_message_integrity(key)`` (which also adds FINGERPRINT),
``bytes(message)``, ``parse_message(data)`` (which checks FINGERPRINT) and
``check_message_integrity(key)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from aioice import stun as aioice_stun

from tsunagu.stun import Message, MessageClass, Method
from tsunagu.stun.attributes import (
    IceControlled,
    IceControlling,
    MessageIntegrity,
    Priority,
    UseCandidate,
    Username,
    XorMappedAddress,
)

TRANSACTION_ID = bytes.fromhex("0123456789abcdef01234567")
USERNAME = "abcd:efgh"
KEY = b"Ab3dEf6hIj9lMn2pQr5tUv"  # an ICE password: 22 characters (RFC 8445 §5.3)
assert len(KEY) == 22
PRIORITY = 0x6E0001FF
TIE_BREAKER = 0x932FF9B151263B36
MAPPED = ("192.0.2.1", 32853)

Workload = Callable[[], object]


# --- tsunagu -------------------------------------------------------------------------------


def tsunagu_encode_request() -> bytes:
    return Message(
        Method.BINDING,
        MessageClass.REQUEST,
        TRANSACTION_ID,
        [Username(USERNAME), Priority(PRIORITY), IceControlling(TIE_BREAKER), UseCandidate()],
    ).encode(KEY, fingerprint=True)


def tsunagu_encode_response() -> bytes:
    return Message(
        Method.BINDING, MessageClass.SUCCESS, TRANSACTION_ID, [XorMappedAddress(MAPPED)]
    ).encode(KEY, fingerprint=True)


def tsunagu_read_request(data: bytes) -> tuple[str, int, bool, bool]:
    message = Message.decode(data)  # FINGERPRINT is checked here
    if not message.verify_integrity(KEY):
        raise AssertionError("integrity")
    username = message.get(Username)
    priority = message.get(Priority)
    if username is None or priority is None:
        raise AssertionError("missing attribute")
    controlling = message.get(IceControlling) is not None
    if not controlling and message.get(IceControlled) is None:
        raise AssertionError("no role")
    return username.value, priority.value, controlling, message.get(UseCandidate) is not None


def tsunagu_read_response(data: bytes) -> tuple[str, int]:
    message = Message.decode(data)
    if not message.verify_integrity(KEY):
        raise AssertionError("integrity")
    mapped = message.get(XorMappedAddress)
    if mapped is None or message.error is not None:
        raise AssertionError("not a usable success response")
    return mapped.address


# --- aioice --------------------------------------------------------------------------------


def aioice_encode_request() -> bytes:
    message = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=TRANSACTION_ID,
    )
    message.attributes["USERNAME"] = USERNAME
    message.attributes["PRIORITY"] = PRIORITY
    message.attributes["ICE-CONTROLLING"] = TIE_BREAKER
    message.attributes["USE-CANDIDATE"] = None
    message.add_message_integrity(KEY)  # adds FINGERPRINT too
    return bytes(message)


def aioice_encode_response() -> bytes:
    message = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.RESPONSE,
        transaction_id=TRANSACTION_ID,
    )
    message.attributes["XOR-MAPPED-ADDRESS"] = MAPPED
    message.add_message_integrity(KEY)
    return bytes(message)


def aioice_read_request(data: bytes) -> tuple[str, int, bool, bool]:
    message = aioice_stun.parse_message(data)  # FINGERPRINT is checked here
    if not message.check_message_integrity(KEY):
        raise AssertionError("integrity")
    attributes = message.attributes
    username: str = attributes["USERNAME"]
    priority: int = attributes["PRIORITY"]
    controlling = "ICE-CONTROLLING" in attributes
    if not controlling and "ICE-CONTROLLED" not in attributes:
        raise AssertionError("no role")
    return username, priority, controlling, "USE-CANDIDATE" in attributes


def aioice_read_response(data: bytes) -> tuple[str, int]:
    message = aioice_stun.parse_message(data)
    if not message.check_message_integrity(KEY):
        raise AssertionError("integrity")
    if message.message_class != aioice_stun.Class.RESPONSE:
        raise AssertionError("not a success response")
    mapped: tuple[str, int] = message.attributes["XOR-MAPPED-ADDRESS"]
    return mapped


# --- harness -------------------------------------------------------------------------------


def check_equivalence() -> None:
    """Both codecs must produce and read the same thing, or the comparison means nothing."""
    # Same attribute order and zero padding: the bytes are identical, MI and FP included.
    if tsunagu_encode_request() != aioice_encode_request():
        raise SystemExit("the two encoders disagree on the request")
    if tsunagu_encode_response() != aioice_encode_response():
        raise SystemExit("the two encoders disagree on the response")
    expected_request = (USERNAME, PRIORITY, True, True)
    for read in (tsunagu_read_request, aioice_read_request):
        for encode in (tsunagu_encode_request, aioice_encode_request):
            if read(encode()) != expected_request:
                raise SystemExit(f"{read.__name__} misread {encode.__name__}")
    for read_response in (tsunagu_read_response, aioice_read_response):
        if read_response(tsunagu_encode_response()) != MAPPED:
            raise SystemExit(f"{read_response.__name__} misread the response")
    # A message that is not ours must not pass either integrity check.
    forged = Message(
        Method.BINDING, MessageClass.SUCCESS, TRANSACTION_ID, [XorMappedAddress(MAPPED)]
    ).encode(b"not the key", fingerprint=True)
    if Message.decode(forged).verify_integrity(KEY):
        raise SystemExit("tsunagu accepted a forged response")
    if aioice_stun.parse_message(forged).check_message_integrity(KEY):
        raise SystemExit("aioice accepted a forged response")
    assert Message.decode(forged).get(MessageIntegrity) is not None


def _loops_for(workload: Workload, target: float) -> int:
    """How many calls of ``workload`` take about ``target`` seconds."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            workload()
        elapsed = time.perf_counter() - start
        if elapsed >= target / 5:
            return max(1, int(loops * target / elapsed))
        loops *= 2


def _rate(workload: Workload, loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        workload()
    return loops / (time.perf_counter() - start)


def compare(ours: Workload, theirs: Workload, repeats: int, target: float) -> tuple[float, float]:
    """Median ops/s of each over ``repeats`` runs of about ``target`` seconds. The two
    alternate run by run, so a noisy neighbour slows both rather than one."""
    ours_loops, theirs_loops = _loops_for(ours, target), _loops_for(theirs, target)
    ours_rates, theirs_rates = [], []
    for _ in range(repeats):
        ours_rates.append(_rate(ours, ours_loops))
        theirs_rates.append(_rate(theirs, theirs_loops))
    return statistics.median(ours_rates), statistics.median(theirs_rates)


def workloads() -> list[tuple[str, Workload, Workload]]:
    request_t, request_a = tsunagu_encode_request(), aioice_encode_request()
    response_t, response_a = tsunagu_encode_response(), aioice_encode_response()
    return [
        (
            "(a) request: full cycle",
            lambda: tsunagu_read_request(tsunagu_encode_request()),
            lambda: aioice_read_request(aioice_encode_request()),
        ),
        ("    request: encode", tsunagu_encode_request, aioice_encode_request),
        (
            "    request: decode+verify+read",
            lambda: tsunagu_read_request(request_t),
            lambda: aioice_read_request(request_a),
        ),
        (
            "(b) response: full cycle",
            lambda: tsunagu_read_response(tsunagu_encode_response()),
            lambda: aioice_read_response(aioice_encode_response()),
        ),
        ("    response: encode", tsunagu_encode_response, aioice_encode_response),
        (
            "    response: decode+verify+read",
            lambda: tsunagu_read_response(response_t),
            lambda: aioice_read_response(response_a),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median)")
    parser.add_argument("--target", type=float, default=0.2, help="seconds per timed run")
    parser.add_argument(
        "--goal", type=float, default=3.0, help="ratio the full cycles must reach (exit 1 if not)"
    )
    args = parser.parse_args()
    check_equivalence()
    header = f"{'workload':34} {'tsunagu ops/s':>14} {'aioice ops/s':>14} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    below_goal = []
    for name, ours, theirs in workloads():
        ours_rate, theirs_rate = compare(ours, theirs, args.repeats, args.target)
        ratio = ours_rate / theirs_rate
        print(f"{name:34} {ours_rate:14,.0f} {theirs_rate:14,.0f} {ratio:6.2f}x")
        if "full cycle" in name and ratio < args.goal:
            below_goal.append(name.strip())
    print(f"\nratio = tsunagu / aioice (median of {args.repeats} runs); goal >= {args.goal}x")
    if below_goal:
        print("below goal: " + ", ".join(below_goal))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
