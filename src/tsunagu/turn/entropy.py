"""Where the TURN server core draws its secrets: nonce keys, reservation tokens, relay ports.

The core never imports :mod:`random`; it takes an :class:`Entropy` so a simulation can
replay a run exactly (:class:`SeededEntropy`), while a real server draws from the OS
CSPRNG (:class:`SystemEntropy`, the default). coturn's CVE-2025-69217 predicted relay
ports drawn from ``random()``; here even the port choice is a secret draw.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Protocol


class Entropy(Protocol):
    """The two draws the core needs."""

    def token_bytes(self, n: int) -> bytes:
        """``n`` unpredictable bytes."""
        ...

    def randbelow(self, n: int) -> int:
        """A uniform integer in ``[0, n)``; ``n`` is positive."""
        ...


class SystemEntropy:
    """The OS CSPRNG through :mod:`secrets`."""

    __slots__ = ()

    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)


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

    def randbelow(self, n: int) -> int:
        if n <= 0:
            raise ValueError("randbelow needs a positive bound")
        # Rejection sampling over 64-bit draws keeps the result uniform.
        limit = (1 << 64) - (1 << 64) % n
        for _ in range(64):
            value = int.from_bytes(self._block()[:8], "big")
            if value < limit:
                return value % n
        raise RuntimeError("SeededEntropy: rejection sampling did not terminate")
