"""Relayed transport addresses: choosing ports without opening sockets (RFC 8656 §7.2).

Design. The core owns the *choice* of relay ports -- random, even (EVEN-PORT), N and N+1
pairs (the R bit), reservations with tokens -- in a :class:`PortPool` per relay address, so
that this policy is deterministic under an injected :class:`~tsunagu.turn.entropy.Entropy`
and unit-testable without a network. The driver only *backs* the pool through the small
synchronous :class:`RelayBinder` interface: "bind a UDP socket to exactly this address" and
"close it". Binding is immediate in every driver (a ``bind()`` call for asyncio, a table
insert for the simulated network), so an Allocate is answered in the same call that
received it and the core needs no half-finished allocation states; a port that another
program holds simply makes :meth:`RelayBinder.bind` return False and the pool tries another,
a bounded number of times, before the Allocate fails with 508 (Insufficient Capacity).
The alternative -- the core emitting "need a socket" events and waiting for the driver's
answer -- would put a pending state, a timeout and a cancellation path into every Allocate
for no gain.

RFC 6062 TCP relays use the same pool through :meth:`RelayBinder.bind_tcp`. Connecting to
a peer, by contrast, takes time: there the core emits a
:class:`~tsunagu.turn.events.ConnectToPeer` command and the driver reports back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tsunagu.turn.entropy import Entropy
from tsunagu.turn.transport import Address

BIND_ATTEMPTS = 32
"""How many ports one Allocate may try to bind before answering 508."""


class RelayBinder(Protocol):
    """What a driver provides for relay sockets."""

    @property
    def supports_dont_fragment(self) -> bool:
        """Whether :class:`~tsunagu.turn.transport.Transmit` ``dont_fragment`` is honoured
        (RFC 8656 §7.2 step 4: if not, DONT-FRAGMENT is an unknown attribute)."""
        ...

    def bind(self, address: Address) -> bool:
        """Open a UDP relay socket bound to exactly ``address``; False if it is taken."""
        ...

    def unbind(self, address: Address) -> None:
        """Close the relay socket bound to ``address`` (opened by :meth:`bind`)."""
        ...

    def bind_tcp(self, address: Address) -> bool:
        """RFC 6062 §5.1: open a TCP socket listening on exactly ``address`` (and able to
        connect out from it: SO_REUSEADDR/SO_REUSEPORT); False if it is taken. Accepted
        connections are reported with ``TurnServerCore.peer_connection_accepted``."""
        ...

    def unbind_tcp(self, address: Address) -> None:
        """Close the listening socket opened by :meth:`bind_tcp`."""
        ...


class PortPool:
    """The relay ports of one relay IP address: which are ours, and picking new ones."""

    __slots__ = ("_entropy", "first", "ip", "last", "used")

    def __init__(self, ip: str, first: int, last: int, entropy: Entropy) -> None:
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"bad relay port range {first}-{last}")
        self.ip = ip
        self.first = first
        self.last = last
        self.used: set[int] = set()
        self._entropy = entropy

    def __len__(self) -> int:
        return len(self.used)

    def _candidates(self, even: bool) -> list[int] | range:
        # Even ports N with N+1 also in range when a pair is needed is checked by the
        # caller; here only parity.
        if even:
            start = self.first + (self.first & 1)
            return range(start, self.last + 1, 2)
        return range(self.first, self.last + 1)

    def acquire(
        self,
        bind: Callable[[Address], bool],
        unbind: Callable[[Address], None],
        *,
        even: bool = False,
        pair: bool = False,
    ) -> tuple[int, int | None] | None:
        """Bind a port with ``bind`` (even if asked; with ``pair``, an even N and N+1
        together) and return (port, reserved port or None), or None when nothing could be
        bound. UDP and TCP relays share the pool, so a port is never used twice."""
        candidates = self._candidates(even or pair)
        count = len(candidates)
        if count == 0:
            return None
        used = self.used
        # Start from a secret random position and walk the range: uniform enough, and
        # the walk is bounded by the range size and BIND_ATTEMPTS bind calls.
        offset = self._entropy.randbelow(count)
        binds = 0
        for step in range(count):
            port = candidates[(offset + step) % count]
            if port in used or (pair and (port + 1 > self.last or port + 1 in used)):
                continue
            if binds >= BIND_ATTEMPTS:
                return None
            binds += 1
            if not bind((self.ip, port)):
                continue
            if pair:
                binds += 1
                if not bind((self.ip, port + 1)):
                    unbind((self.ip, port))
                    continue
                used.add(port)
                used.add(port + 1)
                return port, port + 1
            used.add(port)
            return port, None
        return None

    def release(self, unbind: Callable[[Address], None], port: int) -> None:
        if port in self.used:
            self.used.discard(port)
            unbind((self.ip, port))


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """A relay address of one family: where sockets bind, and what clients are told."""

    family: int
    bind_ip: str
    advertised_ip: str


@dataclass(slots=True)
class Reservation:
    """RFC 8656 §7.2: port N+1 held for a later Allocate carrying the token."""

    token: bytes
    family: int
    bound: Address
    expires: float
    timer_at: float = float("inf")
