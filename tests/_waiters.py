"""A scripted Waiter (shmcast._wait.Waiter) for the tests of what waits: the policies and the
asyncio spin."""

from __future__ import annotations

import threading


class ScriptedWaiter:
    """A Waiter whose condition becomes true on the ``ready_on``-th call of ``ready()`` (never
    if None), or once ``event`` is set.  ``sleep`` blocks on the event for its timeout."""

    def __init__(self, ready_on: int | None = None, tick_error: Exception | None = None) -> None:
        self.ready_on = ready_on
        self.tick_error = tick_error
        self.event = threading.Event()
        self.ready_calls = 0
        self.sleeps: list[float] = []
        self.ticks = 0
        self.may_spin = True  # what begin_spin answers
        self.spins = self.spins_ended = 0
        self.spinning_now = 0  # what count_spin counted

    def ready(self) -> bool:
        self.ready_calls += 1
        if self.ready_on is not None and self.ready_calls >= self.ready_on:
            return True
        return self.event.is_set()

    def sleep(self, timeout: float) -> bool:
        self.sleeps.append(timeout)
        if self.ready():
            return True
        self.event.wait(timeout)
        return False

    def tick(self) -> None:
        self.ticks += 1
        if self.tick_error is not None:
            raise self.tick_error

    def begin_spin(self, limit: int) -> bool:
        self.spins += 1
        return self.may_spin and limit > 0

    def end_spin(self) -> None:
        self.spins_ended += 1

    def count_spin(self, delta: int) -> None:
        self.spinning_now += delta

    def spinning(self) -> int:
        return self.spinning_now
