"""A fair FIFO queue for MedGemma in LAN mode: one generation runs, the rest wait in order.

On a device (loopback) a second generation gets ``busy`` at once (android_bridge.bridge). A
clinic server serves many tablets, so there a request waits its turn instead:
``with queue.turn(cancel, on_wait) as got:`` returns when the request is first in line and
MedGemma is free (``got`` True), or at once with ``got`` False when it was cancelled while
waiting (its place is freed; the bridge then ends it with ``done(cancelled)``). While it waits,
``on_wait(position, estimated_wait_s)`` is called on enqueue and whenever its position changes.

``position`` is the number of requests ahead of this one, the running one included (1: next).
The estimate is the mean duration of the last :data:`HISTORY` turns (:data:`PRIOR_S` before
any) times the requests ahead, less what the running one has already taken.
A request that finds ``bound`` others waiting gets ``busy`` (with ``retry_after``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from android_bridge.protocol import ProtocolError

log = logging.getLogger(__name__)

HISTORY = 8  # turns the estimate averages over
PRIOR_S = 10.0  # the estimate of one turn before any was measured
POLL_S = 0.05  # how often a waiting request looks at its cancel flag


class FairQueue:
    """First come, first served turns on one resource (MedGemma)."""

    def __init__(self, bound: int = 16, *, clock=time.monotonic):
        self.bound = bound
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._running: object | None = None
        self._started = 0.0  # when the running turn began
        self._durations: deque[float] = deque(maxlen=HISTORY)

    def _mean(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else PRIOR_S

    def _estimate(self, position: int) -> float:
        """Seconds until the request at ``position`` runs. Called with the lock held."""
        mean = self._mean()
        left = max(0.0, mean - (self.clock() - self._started)) if self._running is not None else 0.0
        ahead_waiting = position - (1 if self._running is not None else 0)
        return round(left + ahead_waiting * mean, 1)

    @contextmanager
    def turn(
        self, cancel: threading.Event, on_wait: Callable[[int, float], None] | None = None
    ) -> Iterator[bool]:
        """Wait for this request's turn (see the module's docstring); the turn ends on exit.

        Raises:
            ProtocolError(busy): ``bound`` requests are waiting already.
        """
        ticket = object()
        with self._cond:
            if self._running is not None and len(self._waiting) >= self.bound:
                eta = self._estimate(len(self._waiting) + 1)
                raise ProtocolError(
                    "busy",
                    f"{len(self._waiting)} generations are waiting already (the queue's limit); retry later",
                    retry_after=max(1.0, eta),
                )
            self._waiting.append(ticket)
        try:
            got = self._wait(ticket, cancel, on_wait)
        except BaseException:  # on_wait failed: give the place up
            with self._cond:
                self._leave(ticket)
            raise
        if not got:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._durations.append(self.clock() - self._started)
                self._running = None
                self._cond.notify_all()

    def _leave(self, ticket: object) -> None:
        """Drop a waiting ticket (cancelled); the ones behind move up. Called with the lock held."""
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            self._cond.notify_all()

    def _wait(self, ticket: object, cancel: threading.Event, on_wait) -> bool:
        """Wait in line: True when it is ``ticket``'s turn (now running), False when cancelled.
        ``on_wait`` is called outside the lock, so a slow listener holds up no one else."""
        last = None
        while True:
            with self._cond:
                while True:
                    if cancel.is_set():
                        self._leave(ticket)
                        return False
                    if self._running is None and self._waiting[0] is ticket:
                        self._waiting.popleft()
                        self._running, self._started = ticket, self.clock()
                        self._cond.notify_all()
                        return True
                    position = self._waiting.index(ticket) + (1 if self._running is not None else 0)
                    if position != last:
                        eta = self._estimate(position)
                        break
                    self._cond.wait(POLL_S)
            last = position
            if on_wait is not None:
                on_wait(position, eta)

    def state(self) -> dict:
        """For ``health``: running (0 or 1), waiting, the bound, the wait a newcomer would see."""
        with self._cond:
            waiting = len(self._waiting)
            running = self._running is not None
            return {
                "running": int(running),
                "waiting": waiting,
                "bound": self.bound,
                "estimated_wait_s": self._estimate(waiting + int(running)) if running or waiting else 0.0,
            }
