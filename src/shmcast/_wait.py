"""Wait policies: how a blocked writer or reader waits for its condition.

A policy never decides *what* to wait for; the queue hands it a :class:`Waiter` that knows the
condition (``ready``), how to sleep on the right futex word without losing a wake-up (``sleep``,
the Dekker handshake of docs/protocol.md P3/P4) and what to look at periodically (``tick``:
timeouts, dead peers, diagnostics).  Every policy calls ``tick`` at least once per ``slice``
seconds and never sleeps longer than one slice, so a dead peer is always noticed.

- :class:`FutexWait` (``"futex"``, the default): spin briefly, then sleep in the kernel.  An idle
  process uses no CPU and wakes within microseconds of a message.
- :class:`SpinWait` (``"spin"``): ``sched_yield()`` in a loop and never sleep, as the original
  broadcast queue of vLLM did.  For comparison: it burns a core per waiter.
- :class:`BackoffWait` (``"backoff"``): ``sched_yield()`` with a 1 ms sleep every 1000 spins,
  the spin count reset by every successful put or get.  The withdrawn fix of the seed report.
- :class:`IdleWait` (``"idle"``): spin with ``sched_yield()`` while there was activity in the last
  ``busy_period`` seconds, otherwise sleep ``sleep`` seconds straight away between looks (vLLM's
  sleep-when-idle mode).  Low CPU when idle, at the price of wake-up latency.

Each endpoint gets its own copy of the policy (policies with state keep it per endpoint).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import ClassVar, Protocol

DEFAULT_SLICE = 0.1
DEFAULT_WARN_AFTER = 10.0


class Waiter(Protocol):
    """What a policy waits on.  Supplied by the queue."""

    def ready(self) -> bool:
        """True when the awaited condition holds.  Cheap; called in spin loops."""

    def sleep(self, timeout: float) -> bool:
        """Announce, re-check and sleep on the futex for at most ``timeout`` seconds.
        Returns True if the re-check found the condition true (no sleep happened)."""

    def tick(self) -> None:
        """Periodic checks (dead peers, slow-wait warnings).  May raise."""


@dataclass(kw_only=True)
class WaitPolicy:
    """Base class of wait policies.  Subclasses implement :meth:`wait`.

    Every policy takes, as keyword arguments:
        slice: the longest a waiter goes without looking at its peer's liveness and its
            deadline (seconds).
        warn_after: seconds a put or get may wait before the queue logs whom it waits for
            (then again after twice as long, and so on); None never logs.
    """

    name: ClassVar[str] = "?"
    slice: float = DEFAULT_SLICE
    warn_after: float | None = DEFAULT_WARN_AFTER
    #: True if :meth:`activity` must be called after each successful operation.
    tracks_activity: ClassVar[bool] = False

    def wait(self, waiter: Waiter, deadline: float | None) -> bool:
        """Block until ``waiter.ready()`` (True) or ``time.monotonic() >= deadline`` (False).
        ``deadline=None`` waits forever (with ticks).  Exceptions from ``tick`` propagate."""
        raise NotImplementedError

    def activity(self) -> None:
        """Record a successful put or get (for policies that adapt to activity)."""

    def _poll(self, waiter: Waiter, deadline: float | None, pause) -> bool:
        """Shared loop of the polling policies: check, ``pause(max_seconds)``, tick once per
        slice, stop at the deadline."""
        clock = time.monotonic
        next_tick = clock() + self.slice
        while True:
            if waiter.ready():
                return True
            now = clock()
            if deadline is not None and now >= deadline:
                return False
            if now >= next_tick:
                waiter.tick()
                next_tick = now + self.slice
            pause(self.slice if deadline is None else deadline - now)


@dataclass(kw_only=True)
class FutexWait(WaitPolicy):
    """Spin up to ``spin_us`` microseconds, then sleep on a futex in slices of ``slice`` s."""

    spin_us: float = 20.0
    name: ClassVar[str] = "futex"

    def wait(self, waiter: Waiter, deadline: float | None) -> bool:
        if waiter.ready():
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if self.spin_us > 0:
            clock = time.perf_counter
            end = clock() + self.spin_us * 1e-6
            while clock() < end:
                if waiter.ready():
                    return True
            now = time.monotonic()
        next_tick = now + self.slice
        while True:
            if deadline is None:
                timeout = self.slice
            else:
                timeout = min(self.slice, deadline - now)
                if timeout <= 0:
                    return waiter.ready()
            if waiter.sleep(timeout) or waiter.ready():
                return True
            now = time.monotonic()
            if now >= next_tick:
                waiter.tick()
                next_tick = now + self.slice


def _yield(_most: float) -> None:
    os.sched_yield()


@dataclass(kw_only=True)
class SpinWait(WaitPolicy):
    """``sched_yield()`` between looks, never sleep."""

    name: ClassVar[str] = "spin"

    def wait(self, waiter: Waiter, deadline: float | None) -> bool:
        return self._poll(waiter, deadline, _yield)


@dataclass(kw_only=True)
class BackoffWait(WaitPolicy):
    """``sched_yield()``; every ``spins`` looks without activity, sleep ``sleep`` seconds."""

    spins: int = 1000
    sleep: float = 0.001
    name: ClassVar[str] = "backoff"
    tracks_activity: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._count = 0

    def activity(self) -> None:
        self._count = 0

    def _pause(self, most: float) -> None:
        self._count += 1
        if self._count >= self.spins:
            self._count = 0
            time.sleep(min(self.sleep, most))
        else:
            os.sched_yield()

    def wait(self, waiter: Waiter, deadline: float | None) -> bool:
        return self._poll(waiter, deadline, self._pause)


@dataclass(kw_only=True)
class IdleWait(WaitPolicy):
    """Spin while busy; after ``busy_period`` s without activity sleep ``sleep`` s per look."""

    busy_period: float = 3.0
    sleep: float = 0.1
    name: ClassVar[str] = "idle"
    tracks_activity: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._last = time.monotonic()

    def activity(self) -> None:
        self._last = time.monotonic()

    def _pause(self, most: float) -> None:
        if time.monotonic() - self._last > self.busy_period:
            time.sleep(min(self.sleep, most))
        else:
            os.sched_yield()

    def wait(self, waiter: Waiter, deadline: float | None) -> bool:
        return self._poll(waiter, deadline, self._pause)


POLICIES: dict[str, type[WaitPolicy]] = {
    cls.name: cls for cls in (FutexWait, SpinWait, BackoffWait, IdleWait)
}


def resolve_policy(wait: str | WaitPolicy | None) -> WaitPolicy:
    """A fresh policy for one endpoint, from a name, an instance (copied) or None (default)."""
    if wait is None:
        return FutexWait()
    if isinstance(wait, str):
        try:
            return POLICIES[wait]()
        except KeyError:
            raise ValueError(
                f"unknown wait policy {wait!r}; choose one of {', '.join(sorted(POLICIES))}"
            ) from None
    if isinstance(wait, WaitPolicy):
        fresh = copy.copy(wait)
        if hasattr(fresh, "__post_init__"):
            fresh.__post_init__()
        return fresh
    raise TypeError(f"wait must be a policy name or a WaitPolicy, not {type(wait).__name__}")
