"""Where the TURN server core draws its secrets: nonce keys, reservation tokens, relay ports.

The core never imports :mod:`random`; it takes an :class:`Entropy` so a simulation can
replay a run exactly (:class:`SeededEntropy`), while a real server draws from the OS
CSPRNG (:class:`SystemEntropy`, the default). coturn's CVE-2025-69217 predicted relay
ports drawn from ``random()``; here even the port choice is a secret draw.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from typing import Protocol

_DRAW_RANGE = 1 << 64
_DRAW_TRIES = 64


def _uniform_below(n: int, draw: Callable[[], int]) -> int:
    """A uniform integer in ``[0, n)``, ``n`` at most ``2**64``, from uniform 64-bit
    ``draw()``s by rejection sampling: a draw is rejected with probability below
    ``n / 2**64``, so for a port range one draw nearly always does
    (:func:`secrets.randbelow` draws just enough bits for ``n``, so rejects up to half of
    its draws, each an OS call)."""
    if n <= 0:
        raise ValueError("randbelow needs a positive bound")
    limit = _DRAW_RANGE - _DRAW_RANGE % n
    for _ in range(_DRAW_TRIES):
        value = draw()
        if value < limit:
            return value % n
    raise RuntimeError("rejection sampling did not terminate")


def _system_draw() -> int:
    # os.urandom is what secrets.token_bytes calls, through two Python-level calls.
    return int.from_bytes(os.urandom(8), "big")


class Entropy(Protocol):
    """The two draws the core needs."""

    def token_bytes(self, n: int) -> bytes:
        """``n`` unpredictable bytes."""
        ...

    def randbelow(self, n: int) -> int:
        """A uniform integer in ``[0, n)``; ``n`` is positive."""
        ...


class SystemEntropy:
    """The OS CSPRNG (:mod:`secrets`, :func:`os.urandom`)."""

    __slots__ = ()

    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

    def randbelow(self, n: int) -> int:
        if n > _DRAW_RANGE:
            return secrets.randbelow(n)
        return _uniform_below(n, _system_draw)


class SeededEntropy:
    """A deterministic stream (SHA-256 in counter mode) for tests and simulations only:
    anyone who knows the seed knows every draw."""

    __slots__ = ("_counter", "_seed")

    def __init__(self, seed: bytes) -> None:
        self._seed = bytes(seed)
        self._counter = 0

    def _block(self) -> bytes:
        self._counter += 1
        return hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()

    def token_bytes(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += self._block()
        return out[:n]

    def _draw(self) -> int:
        return int.from_bytes(self._block()[:8], "big")

    def randbelow(self, n: int) -> int:
        return _uniform_below(n, self._draw)
