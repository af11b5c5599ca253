"""Wait policies: how a blocked writer or reader waits for its condition.

A policy never decides *what* to wait for; the queue hands it a :class:`Waiter` that knows the
condition (``ready``), how to sleep on the right futex word without losing a wake-up (``sleep``,
the Dekker handshake of docs/protocol.md P3/P4) and what to look at periodically (``tick``:
timeouts, dead peers, diagnostics).  Every policy calls ``tick`` at least once per ``slice``
seconds and never sleeps longer than one slice, so a dead peer is always noticed.

- :class:`FutexWait` (``"futex"``, the default): spin while messages come quickly and a core is
  free, otherwise sleep in the kernel.  An idle process uses no CPU; a busy one answers within
  microseconds; spinners beyond the spare cores hand their core to any other process at every
  look, and nobody spins while every core is taken (see :class:`CpuLoad`).
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

from ._native import runnable_tasks

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


class CpuLoad:
    """Whether every CPU this process may use is taken by work: then a waiter sleeps instead of
    spinning.

    Spinning pays only while a core is free.  When more tasks want to work than there are CPUs
    (readers outnumbering cores, all busy with messages, as under a saturating writer), a
    spinner holds a core that another process needs, often the very writer it waits for, and
    even a spinner that yields at every look makes the run queue pass through it at each look.

    The signal: the tasks runnable on the machine now (``/proc/loadavg``, this one included;
    one ``pread`` of about a microsecond), minus the queue's processes that are only spinning
    (its ``spinning`` count, in the segment), against the CPUs this process may run on.  If the
    tasks that work fill every CPU, the machine is *crowded*.  A look is taken at most once per
    ``period`` (100 us) per process; in between, every wait reuses the answer.

    A waiter that finds the machine crowded sleeps for a short ``quantum`` (or until woken) and
    looks again, so that the answer follows the load: a burst of work on every core (each
    message makes one when readers outnumber cores) costs a short sleep, a saturating writer
    keeps the waiters asleep, and spinning comes back within a quantum of a core coming free.

    The signal is a hint: a wrong answer makes a waiter spin when it could sleep, or sleep when
    it could spin; never a lost wake-up, which the futex protocol rules out either way.
    Without ``/proc`` it never says "crowded".  Who may call: any thread (two threads that look
    at once both store a fresh answer).
    """

    #: Seconds a look at the run queues stands for.
    period = 100e-6
    #: Seconds the CPU count (this process's affinity) stands for.
    cpus_period = 1.0

    def __init__(self) -> None:
        self._at = -1.0  # when the run queues were last looked at
        self._running = 0  # what that look found
        self._cpus_at = -1.0
        self._cpus = 1
        self.looks = 0  # statistics: looks at the run queues

    def _cpus_now(self, now: float) -> int:
        if now - self._cpus_at >= self.cpus_period:
            self._cpus_at = now
            try:
                self._cpus = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                self._cpus = os.cpu_count() or 1
        return self._cpus

    def crowded(self, now: float, idle: int) -> bool:
        """True when the tasks that work, not counting the caller, fill every CPU.

        ``idle``: runnable tasks that do no work as far as the caller knows: the queue's
        processes spinning now, plus one for the caller itself if it is not among them.
        """
        if now - self._at >= self.period:
            self._at = now
            self.looks += 1
            self._running = runnable_tasks()
        return self._running - idle >= self._cpus_now(now)


#: The process's one view of the CPUs' load, shared by all its endpoints.
LOAD = CpuLoad()


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

    def count_spin(self, delta: int) -> None:
        """Add ``delta`` (+1 or -1) to the queue's count of processes spinning now."""

    def spinning(self) -> int:
        """How many of the queue's processes spin now (eagerly or politely)."""


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

    - while every core is taken by work (:class:`CpuLoad`: more runnable tasks that are not
      spinning than CPUs) nobody spins: the spin phase sleeps in ``quantum_us`` (200 us)
      pieces instead, looking at the load after each, and spins again once a core is free.
      The pieces count against the same budget, and each is the announced sleep of P3/P4: the
      peer wakes the sleeper at once when its condition comes.  ``quantum_us=None`` ends the
      spin phase instead: a wait that finds every core taken sleeps until its condition comes
      (or a slice passes), with no wake-up of its own before that.  ``detect_crowding=False``
      spins whatever the load (the rule before this check).

    Why polite spinning is the default while a core is free: a sleeper costs its waker a
    ``FUTEX_WAKE`` call, and itself a trip through the scheduler: tens of microseconds on a
    virtual machine, where a halted virtual CPU must be woken by the host.  Side by side on 2
    cores with 4 and 8 readers paced every millisecond it lowered latency by a third and raised
    throughput (docs/benchmarks.md).  Under a writer that saturates the cores it is the other
    way round, which is what the crowding check detects.

    Spinning or sleeping changes nothing in the protocol: a spin only calls ``ready()``, which
    reads the published sequence; a sleep is the announced sleep of docs/protocol.md P3/P4,
    taken from its first step, whenever the spin ends.
    """

    spin_us: float = 2000.0
    min_spin_us: float = 20.0
    max_spinners: int | None = None
    polite: bool = True
    detect_crowding: bool = True
    quantum_us: float | None = 200.0
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

    def _spin(self, waiter: Waiter, end: float) -> bool | None:
        """Spin until ``end``, eagerly if the queue grants a place, else politely (or not at
        all, ``polite=False``).  True if the condition came, False at ``end``, None if the
        load says every core is taken (``detect_crowding``; every 64 looks)."""
        limit = SPARE_CPUS if self.max_spinners is None else self.max_spinners
        eager = waiter.begin_spin(limit)
        if not (eager or self.polite):
            return False
        clock = time.monotonic
        detect = self.detect_crowding
        every = 15 if eager else 0  # yield when looks & every == 0
        waiter.count_spin(1)
        try:
            looks = 0
            while (now := clock()) < end:
                if waiter.ready():
                    return True
                looks += 1
                if not looks & every:
                    os.sched_yield()
                    if detect and not looks & 63 and LOAD.crowded(now, waiter.spinning()):
                        return None  # every core is taken: the caller sleeps
            return False
        finally:
            waiter.count_spin(-1)
            if eager:
                waiter.end_spin()

    def _wait(self, waiter: Waiter, deadline: float | None, now: float) -> bool:
        clock = time.monotonic
        budget = min(self._budget, self.spin_us * 1e-6)
        end = now + budget if deadline is None else min(now + budget, deadline)
        quantum = None if self.quantum_us is None else self.quantum_us * 1e-6
        while now < end:
            if self.detect_crowding and LOAD.crowded(now, waiter.spinning() + 1):
                if quantum is None:
                    break  # every core is taken by work: sleep until woken (below)
                # Every core is taken by work: sleep a quantum (woken at once by the peer,
                # P3/P4), then look at the load again.
                if waiter.sleep(min(quantum, end - now)) or waiter.ready():
                    return True
            else:
                spun = self._spin(waiter, end)
                if spun:
                    return True
                if spun is False:
                    break  # the budget ran out (or nobody may spin)
            now = clock()
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
