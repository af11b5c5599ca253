"""An awaiting reader's sleep on a descriptor its event loop watches.

A broadcast reader that awaits in an event loop and finds nothing sleeps without a thread:
its loop watches one descriptor that the publisher's wake-up makes readable.  Two kinds, in
the order the reader tries them (shmcast._aio):

- :class:`FutexSleeper`: the futex sleep itself, through io_uring (docs/protocol.md, "P3
  through io_uring"): steps 1-3 of P3 as a sleeping thread makes them (load the futex word,
  announce, re-check), and step 4 submitted to an io_uring of the reader's process
  (``IORING_OP_FUTEX_WAIT``, ``_csrc/uring.c``) instead of made.  The writer's ordinary
  ``FUTEX_WAKE`` ends it, and the ring's descriptor becomes readable.  Nothing changes for
  the writer, and the kernel places the woken loop as it places any futex waiter, spread
  over the CPUs.  Needs Linux 6.7 and io_uring allowed (a sandbox may refuse it).
- :class:`shmcast._sockwake.WakeSocket`: a datagram socket of the reader's own that the
  writer signals (P3 "on a socket"), where io_uring cannot be had.

Both offer the same four steps to :meth:`shmcast._aio.AsyncEndpoint._aio_sleep_on`:
``drain()`` (what an earlier wake left), ``arm(waiter)`` (announce and re-check: True if the
condition holds, undone), ``wait(...)`` (await readability, :func:`await_readable`) and
``disarm(waiter)``.  Who may call: the thread of the event loop that awaits on the endpoint,
one call at a time (the endpoint enforces it), in the process that made the sleeper.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._native import FutexRing


async def await_readable(loop: asyncio.AbstractEventLoop, fd: int, deadline: float | None,
                         next_look: Callable[[], float], on_look: Callable[[], bool],
                         exit_fd: int | None = None) -> bool:  # fmt: skip
    """Await the readability of ``fd`` until ``deadline`` (None: no end), calling
    ``on_look()`` after ``next_look()`` seconds without it, and again after each further
    ``next_look()`` (it returns True to stop, or raises); True if ``fd`` became readable.
    With ``exit_fd`` (a pidfd of the peer), ``on_look()`` is also called once when the peer
    ends.  Reads nothing.  The loop watches the descriptors for the whole wait; each look is
    a callback, and the awaiting task resumes only at the end."""
    fut = loop.create_future()
    clock = time.monotonic
    timer: asyncio.TimerHandle | None = None
    watching_exit = False

    def readable() -> None:
        if not fut.done():
            fut.set_result(True)

    def look() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        if fut.done():
            return
        try:
            stop = on_look()
        except Exception as exc:  # QueueBroken, SegmentError...: the await raises it
            fut.set_exception(exc)
            return
        wait = next_look() if deadline is None else min(next_look(), deadline - clock())
        if stop or wait <= 0:
            fut.set_result(False)
        else:
            timer = loop.call_later(wait, look)

    def peer_ended() -> None:  # level-triggered: once is enough, the timer goes on
        nonlocal watching_exit
        loop.remove_reader(exit_fd)
        watching_exit = False
        look()

    first = next_look() if deadline is None else min(next_look(), deadline - clock())
    if first <= 0:
        return False
    loop.add_reader(fd, readable)
    try:
        if exit_fd is not None:
            loop.add_reader(exit_fd, peer_ended)
            watching_exit = True
        timer = loop.call_later(first, look)
        return await fut
    finally:
        if timer is not None:
            timer.cancel()
        if watching_exit:
            loop.remove_reader(exit_fd)
        loop.remove_reader(fd)


class LoopSleeper:
    """What the loop sleepers share: one descriptor the loop watches while an await is in
    progress, closed when the endpoint closes (deferred to the end of an await, so that the
    loop never watches a closed descriptor) and in a forked child (the parent's is left
    alone).  A subclass gives the descriptor (``_fileno``) and how to release it
    (``_release``), and the steps ``drain``, ``arm`` and ``disarm``."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.wakes = 0  #: awaits ended by a wake (statistics, tests)
        self._waiting = False
        self._closed = False
        _LIVE.add(self)

    def _fileno(self) -> int:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait(self, loop: asyncio.AbstractEventLoop, deadline: float | None,
                   next_look: Callable[[], float], on_look: Callable[[], bool],
                   exit_fd: int | None = None) -> bool:  # fmt: skip
        """:func:`await_readable` on the descriptor; True if a wake came.  Takes nothing
        (the next ``drain`` does)."""
        self._waiting = True
        try:
            woke = await await_readable(loop, self._fileno(), deadline, next_look, on_look,
                                        exit_fd)  # fmt: skip
        finally:
            self._waiting = False
            if self._closed:  # closed while we waited: now that the loop let go of it
                self._release()
        if woke:
            self.wakes += 1
        return woke

    def close(self) -> None:
        """Release the descriptor; deferred to the end of an await in progress."""
        self._closed = True
        _LIVE.discard(self)
        if not self._waiting:
            self._release()

    def _forget(self) -> None:
        """In a forked child: release the inherited copy."""
        self._closed = True
        self._release()


_LIVE: weakref.WeakSet[LoopSleeper] = weakref.WeakSet()
_TAGS = itertools.count(1)


class FutexSleeper(LoopSleeper):
    """One reader endpoint's futex sleeps through io_uring, in this process.

    At most one wait is queued in the kernel at a time, and it is kept across rounds and
    calls until a wake ends it: a queued ``FUTEX_WAIT`` receives every ``FUTEX_WAKE`` of its
    word made after it was queued, so it serves a later sleep's step 4 as well as a new one
    would (docs/protocol.md, "P3 through io_uring").  Raises OSError from the constructor
    where the kernel cannot (the caller falls back to the socket or the helper thread).
    """

    def __init__(self) -> None:
        self._ring = FutexRing()
        self._queued: int | None = None  # the tag of the wait queued in the kernel, if any
        super().__init__()

    def _fileno(self) -> int:
        return self._ring.fileno()

    def _release(self) -> None:
        self._ring.close()  # a wait still queued is cancelled

    def drain(self) -> None:
        """Step 1's counterpart: take the completions.  At most one wait is ever in the
        kernel, so any completion means it ended."""
        if self._ring.reap():
            self._queued = None

    def arm(self, waiter: Any) -> bool:
        """Steps 1-3 (load the word, announce, re-check), then step 4 submitted unless a wait
        is still queued: True if the re-check found the condition (undone)."""
        seen = waiter.futex_arm()
        if seen is None:
            return True
        if self._queued is None:
            try:
                tag = next(_TAGS)
                self._ring.submit_wait(waiter.futex_atomics, waiter.futex_off, seen, tag)
            except BaseException:  # OSError: the kernel refused (the caller falls back)
                waiter.futex_disarm()
                raise
            self._queued = tag
        return False

    def disarm(self, waiter: Any) -> None:
        waiter.futex_disarm()


def _after_fork_in_child() -> None:
    for sleeper in list(_LIVE):
        sleeper._forget()
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["FutexSleeper", "LoopSleeper", "await_readable"]
