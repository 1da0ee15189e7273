"""STUN codec benchmark: tsunagu against aioice, in one process, ratios printed.

Two workloads, each the whole job an ICE agent does per packet:

(a) a connectivity-check Binding request (USERNAME "abcd:efgh", PRIORITY, ICE-CONTROLLING,
    USE-CANDIDATE, MESSAGE-INTEGRITY under a 22-character password, FINGERPRINT): build and
    encode it, decode it, verify FINGERPRINT (both codecs do that while decoding) and
    MESSAGE-INTEGRITY, and read the attributes the receiving agent reads;
(b) its success response (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT), the same way.

Each workload is also timed as encode only and as decode + verify + read only, so a ratio
can be traced to one side. Timing: ``time.perf_counter`` around a loop sized to take about
``--target`` seconds, ``--repeats`` times for each codec, the codecs alternating run by
run; the median of the repeats is reported.

Keys. aioice takes the key as bytes and computes HMAC-SHA1 from it for every message; so
does tsunagu when given bytes: the "raw key" column is the like-for-like comparison.
tsunagu also accepts an ``IntegrityKey``, the same key with the HMAC key schedule done
once, as an ICE agent or TURN client would keep one per credential; the "prepared key"
column uses one (built once, outside the timed loops), compared against the same aioice
runs. The goal (``--goal``) is checked on the prepared-key full cycles, which is how the
codec is meant to be used; the raw-key ratios are printed next to them.

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
from tsunagu.stun.message import IntegrityKey

TRANSACTION_ID = bytes.fromhex("0123456789abcdef01234567")
USERNAME = "abcd:efgh"
KEY = b"Ab3dEf6hIj9lMn2pQr5tUv"  # an ICE password: 22 characters (RFC 8445 §5.3)
assert len(KEY) == 22
PREPARED_KEY = IntegrityKey(KEY)  # tsunagu only: what an agent keeps per credential
PRIORITY = 0x6E0001FF
TIE_BREAKER = 0x932FF9B151263B36
MAPPED = ("192.0.2.1", 32853)

Workload = Callable[[], object]


# --- tsunagu ---------------------------------------------------------------------------------


def tsunagu_encode_request(key: bytes | IntegrityKey = KEY) -> bytes:
    return Message(
        Method.BINDING,
        MessageClass.REQUEST,
        TRANSACTION_ID,
        [Username(USERNAME), Priority(PRIORITY), IceControlling(TIE_BREAKER), UseCandidate()],
    ).encode(key, fingerprint=True)


def tsunagu_encode_response(key: bytes | IntegrityKey = KEY) -> bytes:
    return Message(
        Method.BINDING, MessageClass.SUCCESS, TRANSACTION_ID, [XorMappedAddress(MAPPED)]
    ).encode(key, fingerprint=True)


def tsunagu_read_request(
    data: bytes, key: bytes | IntegrityKey = KEY
) -> tuple[str, int, bool, bool]:
    message = Message.decode(data)  # FINGERPRINT is checked here
    if not message.verify_integrity(key):
        raise AssertionError("integrity")
    username = message.get(Username)
    priority = message.get(Priority)
    if username is None or priority is None:
        raise AssertionError("missing attribute")
    controlling = message.get(IceControlling) is not None
    if not controlling and message.get(IceControlled) is None:
        raise AssertionError("no role")
    return username.value, priority.value, controlling, message.get(UseCandidate) is not None


def tsunagu_read_response(data: bytes, key: bytes | IntegrityKey = KEY) -> tuple[str, int]:
    message = Message.decode(data)
    if not message.verify_integrity(key):
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
    for key in (KEY, PREPARED_KEY):
        if tsunagu_encode_request(key) != aioice_encode_request():
            raise SystemExit("the two encoders disagree on the request")
        if tsunagu_encode_response(key) != aioice_encode_response():
            raise SystemExit("the two encoders disagree on the response")
    expected_request = (USERNAME, PRIORITY, True, True)
    for read in (tsunagu_read_request, aioice_read_request):
        for encode in (tsunagu_encode_request, aioice_encode_request):
            if read(encode()) != expected_request:
                raise SystemExit(f"{read.__name__} misread {encode.__name__}")
    if tsunagu_read_request(aioice_encode_request(), PREPARED_KEY) != expected_request:
        raise SystemExit("tsunagu misread the request with the prepared key")
    for read_response in (tsunagu_read_response, aioice_read_response):
        if read_response(tsunagu_encode_response()) != MAPPED:
            raise SystemExit(f"{read_response.__name__} misread the response")
    if tsunagu_read_response(aioice_encode_response(), PREPARED_KEY) != MAPPED:
        raise SystemExit("tsunagu misread the response with the prepared key")
    # A message that is not ours must not pass either integrity check.
    forged = Message(
        Method.BINDING, MessageClass.SUCCESS, TRANSACTION_ID, [XorMappedAddress(MAPPED)]
    ).encode(b"not the key", fingerprint=True)
    if Message.decode(forged).verify_integrity(KEY):
        raise SystemExit("tsunagu accepted a forged response")
    if Message.decode(forged).verify_integrity(PREPARED_KEY):
        raise SystemExit("tsunagu accepted a forged response (prepared key)")
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


def compare(workloads: list[Workload], repeats: int, target: float) -> list[float]:
    """Median ops/s of each workload over ``repeats`` runs of about ``target`` seconds. They
    alternate run by run, so a noisy neighbour slows all rather than one."""
    loops = [_loops_for(workload, target) for workload in workloads]
    rates: list[list[float]] = [[] for _ in workloads]
    for _ in range(repeats):
        for workload, count, samples in zip(workloads, loops, rates, strict=True):
            samples.append(_rate(workload, count))
    return [statistics.median(samples) for samples in rates]


Row = tuple[str, Workload, Workload, Workload]  # name, aioice, tsunagu raw key, prepared key


def workloads() -> list[Row]:
    request_t, request_a = tsunagu_encode_request(), aioice_encode_request()
    response_t, response_a = tsunagu_encode_response(), aioice_encode_response()
    prepared = PREPARED_KEY
    return [
        (
            "(a) request: full cycle",
            lambda: aioice_read_request(aioice_encode_request()),
            lambda: tsunagu_read_request(tsunagu_encode_request()),
            lambda: tsunagu_read_request(tsunagu_encode_request(prepared), prepared),
        ),
        (
            "    request: encode",
            aioice_encode_request,
            tsunagu_encode_request,
            lambda: tsunagu_encode_request(prepared),
        ),
        (
            "    request: decode+verify+read",
            lambda: aioice_read_request(request_a),
            lambda: tsunagu_read_request(request_t),
            lambda: tsunagu_read_request(request_t, prepared),
        ),
        (
            "(b) response: full cycle",
            lambda: aioice_read_response(aioice_encode_response()),
            lambda: tsunagu_read_response(tsunagu_encode_response()),
            lambda: tsunagu_read_response(tsunagu_encode_response(prepared), prepared),
        ),
        (
            "    response: encode",
            aioice_encode_response,
            tsunagu_encode_response,
            lambda: tsunagu_encode_response(prepared),
        ),
        (
            "    response: decode+verify+read",
            lambda: aioice_read_response(response_a),
            lambda: tsunagu_read_response(response_t),
            lambda: tsunagu_read_response(response_t, prepared),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median)")
    parser.add_argument("--target", type=float, default=0.2, help="seconds per timed run")
    parser.add_argument(
        "--goal",
        type=float,
        default=3.0,
        help="ratio the prepared-key full cycles must reach (exit 1 if not)",
    )
    args = parser.parse_args()
    check_equivalence()
    print("ops/s, median of runs alternating the three; ratio = tsunagu / aioice")
    print("raw key: tsunagu given the key as bytes, HMAC key schedule per message (as aioice)")
    print("prepared key: tsunagu given an IntegrityKey built once from the same key\n")
    header = (
        f"{'workload':34} {'aioice':>10} {'raw key':>10} {'ratio':>7}"
        f" {'prepared key':>13} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    below_goal = []
    for name, theirs, ours_raw, ours_prepared in workloads():
        theirs_rate, raw_rate, prepared_rate = compare(
            [theirs, ours_raw, ours_prepared], args.repeats, args.target
        )
        raw_ratio, prepared_ratio = raw_rate / theirs_rate, prepared_rate / theirs_rate
        print(
            f"{name:34} {theirs_rate:10,.0f} {raw_rate:10,.0f} {raw_ratio:6.2f}x"
            f" {prepared_rate:13,.0f} {prepared_ratio:6.2f}x"
        )
        if "full cycle" in name and prepared_ratio < args.goal:
            below_goal.append(name.strip())
    print(
        f"\nmedian of {args.repeats} runs; goal: prepared-key full cycles >= {args.goal}x"
        " (raw-key ratios for comparison)"
    )
    if below_goal:
        print("below goal: " + ", ".join(below_goal))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
