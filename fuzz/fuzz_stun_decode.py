"""atheris fuzz target for the STUN decoders.

The rule (h11's and wsproto's): bytes from the network may only raise the typed remote
error. ``Message.decode``, ``ChannelData.decode`` and ``StreamFramer.feed`` either return or
raise :class:`~tsunagu.errors.StunDecodeError`; anything else escaping is a crash, which
atheris reports with the input that caused it. Whatever decodes must also survive
``verify_integrity`` (with a fixed key), ``unknown_comprehension_required`` and re-encoding.

Each input is tried twice: as is, and with its header made consistent (top bits clear, the
length field equal to what follows, cut to a multiple of 4) so that most inputs reach the
attribute parser instead of stopping at the length check.

    .venv/bin/python fuzz/fuzz_stun_decode.py -atheris_runs=200000 [corpus_dir ...]

Without a corpus directory the run starts from a few valid messages (written to a temporary
directory that is removed afterwards), so short runs still explore beyond the header.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from tsunagu.errors import StunDecodeError
    from tsunagu.stun import ChannelData, Message, MessageClass, Method, StreamFramer
    from tsunagu.stun.attributes import (
        ErrorCodeAttr,
        IceControlling,
        MessageIntegrity,
        PasswordAlgorithms,
        Priority,
        UnknownAttribute,
        UseCandidate,
        Username,
        XorMappedAddress,
        XorPeerAddress,
    )
    from tsunagu.stun.constants import MAGIC_COOKIE_BYTES

KEY = b"VOkJxbRl1RmTxUk/WvJxBt"


def _consistent_header(data: bytes) -> bytes | None:
    """``data`` with a header that passes the framing checks, or None if too short."""
    if len(data) < 20:
        return None
    body = data[20 : len(data) - (len(data) - 20) % 4]
    cookie = MAGIC_COOKIE_BYTES if data[0] & 0x80 else data[4:8]
    header = bytes((data[0] & 0x3F, data[1])) + len(body).to_bytes(2, "big")
    return header + cookie + data[8:20] + body


def _check_message(data: bytes) -> None:
    with contextlib.suppress(StunDecodeError):
        message = Message.decode(data)
        if not isinstance(message.verify_integrity(KEY), bool):
            raise AssertionError("verify_integrity returned a non-bool")
        message.unknown_comprehension_required()
        _ = message.integrity_algorithm, message.error
        # What decoded encodes again (MI/FP are recomputed or dropped, never copied).
        Message.decode(message.encode(KEY, fingerprint=True))


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris documents
    _check_message(data)
    fixed = _consistent_header(data)
    if fixed is not None:
        _check_message(fixed)
    with contextlib.suppress(StunDecodeError):
        ChannelData.decode(data)
    framer = StreamFramer()
    half = len(data) // 2
    frames: list[bytes] = []
    with contextlib.suppress(StunDecodeError):
        frames += framer.feed(data[:half])
        frames += framer.feed(data[half:])
    for frame in frames:
        if frame[0] <= 3:
            _check_message(frame)
        else:
            with contextlib.suppress(StunDecodeError):
                ChannelData.decode(frame)


def _seeds() -> list[bytes]:
    tid = bytes(range(12))
    request = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [Username("abcd:efgh"), Priority(0x6E0001FF), IceControlling(1), UseCandidate()],
    )
    response = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        tid,
        [XorMappedAddress(("192.0.2.1", 32853)), XorPeerAddress(("2001:db8::1", 3478))],
    )
    error = Message(
        Method.ALLOCATE,
        MessageClass.ERROR,
        tid,
        [
            ErrorCodeAttr(401, "Unauthenticated"),
            PasswordAlgorithms(((1, b""), (2, b""))),
            UnknownAttribute(0x7FFF, b"x"),
        ],
    )
    legacy = Message(Method.BINDING, MessageClass.REQUEST, bytes(16), legacy=True)
    both = request.encode(KEY, integrity="sha256")
    mi = Message(Method.BINDING, MessageClass.REQUEST, tid, [MessageIntegrity(bytes(20))])
    return [
        request.encode(KEY, fingerprint=True),
        response.encode(KEY, integrity="sha256", fingerprint=True),
        error.encode(),
        legacy.encode(KEY),
        both,
        mi.encode(),
        ChannelData(0x4001, b"hello").encode(stream=True),
        request.encode() + ChannelData(0x4FFF, b"").encode(),
    ]


def main() -> None:
    argv = list(sys.argv)
    if any(not arg.startswith("-") for arg in argv[1:]):
        atheris.Setup(argv, TestOneInput)
        atheris.Fuzz()
        return
    with tempfile.TemporaryDirectory(prefix="stun-corpus-") as corpus:
        for index, seed in enumerate(_seeds()):
            Path(corpus, f"seed-{index}").write_bytes(seed)
        atheris.Setup([*argv, corpus], TestOneInput)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
