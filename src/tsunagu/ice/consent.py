"""Consent freshness (RFC 7675) of one selected pair, as timer state.

After a pair is selected the agent sends a Binding request on it every ~5 s, randomised
over [0.8, 1.2] times the interval (§5.1) with the injected random source, each with a new
transaction ID and not retransmitted: the next request is the retry. A success response to
one of these requests, authenticated and from the pair's remote address to its base,
refreshes consent. Thirty seconds without one and consent is lost: the agent stops sending
on the pair (§5.1). A shorter silence makes the agent report "disconnected".
"""

from __future__ import annotations

import secrets
from typing import Protocol

__all__ = ["ConsentFreshness", "JitterSource", "SystemJitter"]


class JitterSource(Protocol):
    """Where timer jitter comes from: ``random.Random`` (seeded, for replayable
    simulations) or :class:`SystemJitter`."""

    def uniform(self, a: float, b: float) -> float: ...


class SystemJitter:
    """Uniform jitter drawn from the OS CSPRNG (:mod:`secrets`), holding no state. The
    default: an agent draws one value every few seconds, and a ``random.Random`` of its own
    would cost it 2.5 KB of Mersenne Twister state (and an OS seed draw) for that."""

    __slots__ = ()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * (secrets.randbits(53) / (1 << 53))


class ConsentFreshness:
    """Consent timers of one pair, obtained at ``now`` (its check just succeeded)."""

    __slots__ = (
        "_disconnected_timeout",
        "_interval",
        "_jitter",
        "_pending",
        "_rng",
        "_timeout",
        "expires",
        "last_response",
        "next_request",
    )

    def __init__(
        self,
        now: float,
        *,
        interval: float,
        jitter: float,
        timeout: float,
        disconnected_timeout: float,
        rng: JitterSource,
    ) -> None:
        self._interval = interval
        self._jitter = jitter
        self._timeout = timeout
        self._disconnected_timeout = disconnected_timeout
        self._rng = rng
        self._pending: dict[bytes, float] = {}
        self.last_response = now
        self.expires = now + timeout
        self.next_request = now + self._draw()

    def _draw(self) -> float:
        # RFC 7675 §5.1: "randomized ... uniformly distributed in the range of 0.8 and 1.2
        # times the basic period" (jitter 0.2), so that pairs do not synchronise.
        return self._interval * self._rng.uniform(1.0 - self._jitter, 1.0 + self._jitter)

    def request_sent(self, transaction_id: bytes, now: float) -> None:
        self._pending[transaction_id] = now
        self.next_request = now + self._draw()
        # Requests older than the consent timeout can no longer refresh it (§5.1).
        stale = [tid for tid, sent in self._pending.items() if now - sent > self._timeout]
        for tid in stale:
            del self._pending[tid]

    def owns(self, transaction_id: bytes) -> bool:
        return transaction_id in self._pending

    def response(self, transaction_id: bytes, now: float) -> bool:
        """A valid success response: consent holds for another timeout."""
        if self._pending.pop(transaction_id, None) is None:
            return False
        self.last_response = now
        self.expires = now + self._timeout
        return True

    def lost(self, now: float) -> bool:
        return now >= self.expires

    def disconnected(self, now: float) -> bool:
        return now >= self.last_response + self._disconnected_timeout

    def deadline(self, now: float) -> float:
        """The next time something changes: a request is due, the state turns
        disconnected, or consent expires."""
        when = min(self.next_request, self.expires)
        silent_at = self.last_response + self._disconnected_timeout
        if silent_at > now:
            when = min(when, silent_at)
        return when
