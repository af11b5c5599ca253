"""Wait policies: how a blocked writer or reader waits for its condition.

A policy never decides *what* to wait for; the queue hands it a :class:`Waiter` that knows the
condition (``ready``), how to sleep on the right futex word without losing a wake-up (``sleep``,
the Dekker handshake of docs/protocol.md P3/P4) and what to look at periodically (``tick``:
timeouts, dead peers, diagnostics).  Every policy calls ``tick`` at least once per ``slice``
seconds and never sleeps longer than one slice, so a dead peer is always noticed.

- :class:`FutexWait` (``"futex"``, the default): spin while messages come quickly, otherwise
  sleep in the kernel.  An idle process uses no CPU; a busy one answers within microseconds;
  spinners beyond the spare cores hand their core to any other process at every look.
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

DEFAULT_SLICE = 0.25


def _spare_cpus() -> int:
    """CPUs this process may run on, minus one: the default number of spinners per queue."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus - 1


SPARE_CPUS = _spare_cpus()
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

    def begin_spin(self, limit: int) -> bool:
        """Ask for one of the queue's ``limit`` spinning places; False: sleep instead."""

    def end_spin(self) -> None:
        """Give back the place :meth:`begin_spin` granted."""


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
    """Spin while messages come quickly, otherwise sleep on a futex (in slices of ``slice``).

    Spinning pays only when the next message is near and a core is free, so both are checked:

    - each wait spins for up to twice as long as the previous wait lasted, at most
      ``spin_us`` microseconds; after a wait longer than that (the stream paused, or a burst
      ended) the next one spins only ``min_spin_us``.  A reader fed every millisecond keeps
      spinning and answers within microseconds; an idle one costs one short spin, then sleeps.
    - at most ``max_spinners`` processes of a queue spin *eagerly*, yielding the CPU every 16
      looks; they are counted in the segment's ``spinners`` word.  The default, None, is the
      number of CPUs this process may run on, minus one (none on one CPU).  The others spin
      *politely* within the same budget: ``sched_yield()`` at every look, so that when
      processes outnumber cores a polite spinner holds a core only while no other process
      wants it, and never starves the process it waits for.  With ``polite=False`` they sleep
      at once instead, which leaves more CPU time to other work while messages flow, at the
      price of a futex wake-up per message for each of them.

    Why polite spinning is the default: a sleeper costs its waker a ``FUTEX_WAKE`` call, and
    itself a trip through the scheduler: tens of microseconds on a virtual machine, where a
    halted virtual CPU must be woken by the host.  Side by side on 2 cores with 4 and 8
    readers it lowered latency by a third and raised throughput, and left the CPU used while
    idle unchanged, since the budget above still ends every spin (docs/benchmarks.md).
    """

    spin_us: float = 2000.0
    min_spin_us: float = 20.0
    max_spinners: int | None = None
    polite: bool = True
    name: ClassVar[str] = "futex"

    def __post_init__(self) -> None:
        self._budget = self.min_spin_us * 1e-6  # seconds the next wait may spin

    def wait(self, waiter: Waiter, deadline: float | None) -> bool:
        if waiter.ready():
            return True
        start = time.monotonic()
        if deadline is not None and start >= deadline:
            return False
        done = self._wait(waiter, deadline, start)
        took = time.monotonic() - start
        cap, floor = self.spin_us * 1e-6, self.min_spin_us * 1e-6
        self._budget = max(floor, min(cap, 2 * took)) if took <= cap else floor
        return done

    def _wait(self, waiter: Waiter, deadline: float | None, now: float) -> bool:
        clock = time.monotonic
        budget = min(self._budget, self.spin_us * 1e-6)
        limit = SPARE_CPUS if self.max_spinners is None else self.max_spinners
        eager = budget > 0 and waiter.begin_spin(limit)
        if eager or (budget > 0 and self.polite):
            every = 15 if eager else 0  # yield when looks & every == 0
            try:
                end = now + budget if deadline is None else min(now + budget, deadline)
                looks = 0
                while clock() < end:
                    if waiter.ready():
                        return True
                    looks += 1
                    if not looks & every:
                        os.sched_yield()
            finally:
                if eager:
                    waiter.end_spin()
            now = clock()
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
            now = clock()
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
