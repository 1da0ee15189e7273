"""One generic driver for every sans-I/O core on simulated UDP sockets.

A core is anything with ``handle_datagram(data, local, remote, now)``. The driver also uses,
when the core has them, ``poll_transmit()``, ``poll_event()``, ``poll_timeout()`` and
``handle_timeout(now)`` (DESIGN.md's contract), exactly as the asyncio layer does: after
every input it sends what the core wants sent, hands events on, and re-arms one timer at
``poll_timeout()`` on the virtual clock.

Transmits come in the shapes tsunagu's cores use: an object with ``data`` and
``remote``/``destination`` (and optionally ``local``/``source``, naming the socket to send
from, e.g. :class:`tsunagu.turn.transport.Transmit` and
:class:`tsunagu.stun.server.Transmit`), or a ``(data, remote)`` pair
(:class:`tsunagu.stun.transaction.TransactionManager`). A core may also *return* transmits
from ``handle_datagram`` (the STUN server core does); the driver sends those too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from tsunagu.sim.clock import Scheduler, SimulationError, Timer
from tsunagu.sim.packet import Address, is_ipv6, normalize_ip
from tsunagu.sim.udp import Datagram, SimUdpSocket

__all__ = ["DatagramCore", "SimDriver", "unpack_transmit"]


class DatagramCore(Protocol):
    """The one method a core must have; the others are optional (see the module doc)."""

    def handle_datagram(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> object: ...


def _address(value: object) -> Address | None:
    if (
        isinstance(value, tuple)
        and len(value) >= 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        return (value[0], value[1])
    return None


def unpack_transmit(item: object) -> tuple[bytes, Address | None, Address]:
    """(data, local or None, remote) of a transmit in any of the supported shapes."""
    data = getattr(item, "data", None)
    if isinstance(data, bytes | bytearray):
        remote = _address(getattr(item, "remote", None)) or _address(
            getattr(item, "destination", None)
        )
        local = _address(getattr(item, "local", None)) or _address(getattr(item, "source", None))
        if remote is not None:
            return bytes(data), local, remote
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], bytes | bytearray):
        remote = _address(item[1])
        if remote is not None:
            return bytes(item[0]), None, remote
    raise SimulationError(f"not a transmit the driver understands: {item!r}")


def _is_transmit(item: object) -> bool:
    return hasattr(item, "data") or (
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], bytes | bytearray)
    )


class SimDriver:
    """Runs ``core`` on ``sockets`` (one or more UDP sockets of one host).

    Datagrams arriving on any of the sockets go to ``core.handle_datagram`` with the
    address they were sent to as ``local``. A transmit naming a ``local`` address leaves
    from the socket bound to it (or from a wildcard socket on that port, with that source
    address); one naming none leaves from the first socket. Events go to ``on_event``, or
    into :attr:`events`.

    After calling the core's API directly (``core.start(now)``...), call :meth:`flush`.
    """

    def __init__(
        self,
        clock: Scheduler,
        core: DatagramCore,
        sockets: Sequence[SimUdpSocket],
        *,
        on_event: Callable[[object], None] | None = None,
    ) -> None:
        if not sockets:
            raise SimulationError("a driver needs at least one socket")
        self.clock = clock
        self.core = core
        self.sockets = list(sockets)
        self.on_event = on_event
        self.events: list[object] = []
        self._timer: Timer | None = None
        self._closed = False
        for socket in self.sockets:
            socket.on_datagram = self._on_datagram

    @property
    def now(self) -> float:
        return self.clock.now

    # -- inputs ---------------------------------------------------------------------------

    def _on_datagram(self, datagram: Datagram) -> None:
        if self._closed:
            return
        result = self.core.handle_datagram(
            datagram.data, datagram.local, datagram.remote, self.clock.now
        )
        if result is not None and not isinstance(result, bool):
            if _is_transmit(result):
                self._send(result)
            elif isinstance(result, Iterable):
                for item in result:
                    self._send(item)
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        handle_timeout: Callable[[float], object] | None = getattr(
            self.core, "handle_timeout", None
        )
        if handle_timeout is not None:
            handle_timeout(self.clock.now)
        self.flush()

    # -- outputs --------------------------------------------------------------------------

    def flush(self) -> None:
        """Send every pending transmit, deliver every pending event, re-arm the timer."""
        if self._closed:
            return
        poll_transmit: Callable[[], object] | None = getattr(self.core, "poll_transmit", None)
        if poll_transmit is not None:
            while (item := poll_transmit()) is not None:
                self._send(item)
        poll_event: Callable[[], object] | None = getattr(self.core, "poll_event", None)
        if poll_event is not None:
            while (event := poll_event()) is not None:
                if self.on_event is not None:
                    self.on_event(event)
                else:
                    self.events.append(event)
        self._rearm()

    def _rearm(self) -> None:
        poll_timeout: Callable[[], float | None] | None = getattr(self.core, "poll_timeout", None)
        if poll_timeout is None or self._closed:
            return
        when = poll_timeout()
        timer = self._timer
        if when is None or math.isinf(when):
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        when = max(when, self.clock.now)
        if timer is not None and not timer.cancelled and timer.when == when:
            return
        if timer is not None:
            timer.cancel()
        self._timer = self.clock.call_at(when, self._on_timer)

    def socket_for(self, local: Address | None) -> tuple[SimUdpSocket, str | None]:
        """The socket to send from for a transmit's ``local``, and the source address a
        wildcard socket should use (None: let routing choose)."""
        if local is None:
            return self.sockets[0], None
        ip = normalize_ip(local[0])
        for socket in self.sockets:
            if socket.local == (ip, local[1]):
                return socket, None
        for socket in self.sockets:
            if (
                socket.is_wildcard
                and socket.port == local[1]
                and is_ipv6(socket.local[0]) == is_ipv6(ip)
                and socket.host.owns(ip)
            ):
                return socket, ip
        raise SimulationError(f"the driver has no socket for {ip}:{local[1]}")

    def _send(self, item: object) -> None:
        data, local, remote = unpack_transmit(item)
        socket, source_ip = self.socket_for(local)
        socket.sendto(data, remote, source_ip=source_ip)

    def close(self) -> None:
        """Stop driving: no more input reaches the core, its timer is cancelled."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for socket in self.sockets:
            if socket.on_datagram == self._on_datagram:
                socket.on_datagram = None
