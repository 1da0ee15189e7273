"""Virtual time: a clock and an event scheduler, and nothing that reads the wall clock.

Every event of a simulation -- a packet arriving, a core's timer firing, a TCP
retransmission -- is a callback queued at a virtual time. Events run in (time, insertion
order): two events at the same instant run in the order they were scheduled, so a run is a
pure function of its inputs and of the seeded random source the network draws from.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from tsunagu.errors import LocalProtocolError

__all__ = ["Scheduler", "SimulationError", "Timer"]


class SimulationError(LocalProtocolError):
    """A simulation was set up or driven wrongly (or ran away: see ``max_events``)."""


class Timer:
    """A callback queued on a :class:`Scheduler`; :meth:`cancel` keeps it from running."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Timer at {self.when:.6f}{state}>"


class Scheduler:
    """The virtual clock and its queue: a heap of ``(time, sequence, Timer)``.

    Time starts at ``start`` and only moves when an event runs or :meth:`run` is told to
    advance to a time. Callbacks may schedule further events, including at the current
    time (they run after the events already queued for that instant).
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._queue: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self.events_run = 0
        """How many callbacks have run so far (for budgets and benchmarks)."""

    @property
    def now(self) -> float:
        """The current virtual time, in seconds."""
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` at virtual time ``when``; a time in the past means "now"."""
        if math.isnan(when):
            raise SimulationError("cannot schedule an event at NaN")
        timer = Timer(max(when, self._now), callback)
        heapq.heappush(self._queue, (timer.when, next(self._sequence), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` ``delay`` seconds from now."""
        return self.call_at(self._now + delay, callback)

    def next_time(self) -> float | None:
        """When the next pending event runs, or None if nothing is pending."""
        queue = self._queue
        while queue and queue[0][2].cancelled:
            heapq.heappop(queue)
        return queue[0][0] if queue else None

    @property
    def pending(self) -> int:
        """Events queued and not cancelled."""
        return sum(1 for _, _, timer in self._queue if not timer.cancelled)

    def step(self) -> bool:
        """Run the next pending event; False if there was none."""
        queue = self._queue
        while queue:
            when, _, timer = heapq.heappop(queue)
            if timer.cancelled:
                continue
            self._now = when
            timer.cancelled = True  # a fired timer can no longer be cancelled meaningfully
            self.events_run += 1
            timer.callback()
            return True
        return False

    def run(self, until: float | None = None, *, max_events: int = 10_000_000) -> int:
        """Run events up to and including time ``until`` (every pending event if None), then
        set the clock to ``until``. Returns how many events ran.

        ``max_events`` bounds the run: a core that keeps re-arming a timer in the past
        would otherwise spin forever at one instant. Exceeding it raises
        :class:`SimulationError`.
        """
        if until is not None and until < self._now:
            raise SimulationError(f"cannot run back in time to {until} (now {self._now})")
        count = 0
        while True:
            when = self.next_time()
            if when is None or (until is not None and when > until):
                break
            if count >= max_events:
                raise SimulationError(f"more than {max_events} events; the simulation ran away")
            self.step()
            count += 1
        if until is not None:
            self._now = until
        return count

    def run_for(self, duration: float, *, max_events: int = 10_000_000) -> int:
        """Run ``duration`` seconds of virtual time."""
        return self.run(self._now + duration, max_events=max_events)

    def run_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,
        max_events: int = 10_000_000,
    ) -> bool:
        """Run events until ``predicate()`` holds or ``timeout`` virtual seconds pass.

        Returns the final value of ``predicate()``. On success the clock stays at the
        event that made it true; on timeout it moves to the deadline.
        """
        deadline = self._now + timeout
        count = 0
        while not predicate():
            when = self.next_time()
            if when is None or when > deadline:
                self._now = deadline
                return predicate()
            if count >= max_events:
                raise SimulationError(f"more than {max_events} events; the simulation ran away")
            self.step()
            count += 1
        return True
