"""asyncio for both queues: ``get_async``/``put_async`` and their kin, and ``async for``.

How an awaitable call waits (docs/protocol.md, "asyncio"):

1. **Try at once.**  The call first makes the synchronous call with ``timeout=0``, in the
   loop's thread: a message (or room) that is already there is taken with no context switch.
   A ``QueueTimeout`` from that attempt means "not yet", with nothing taken or sent.
2. **Spin cooperatively.**  Within the budget :class:`~shmcast.FutexWait` would spin (twice the
   previous wait, at most ``spin_us``; ``min_spin_us`` after a long wait), the call looks at
   the condition and yields the CPU (``sched_yield``), again and again; it lets the event
   loop make a pass (``await asyncio.sleep(0)``) first, and again whenever
   :data:`LOOP_PASS_EVERY` (10 us) have gone by since the last, a share of it each when
   several calls spin in one loop.  Other tasks run that often, apart from the time a yield
   gives the core to another process, so the loop is never blocked, and a message that comes
   quickly is taken without any wake-up.  As in the synchronous path, a spinner is counted
   in the queue's ``spinning`` word, one that does not hold one of the spare cores' places
   spins only if the policy is ``polite``, and every 64 looks the load is looked at
   (:class:`~shmcast._wait.CpuLoad`): a machine whose cores are all taken by work ends the
   spin.

   Where it differs from the sync spin, measured with four readers on two cores
   (docs/benchmarks.md, "asyncio"):

   - Every look yields, and the loop does not pass at every look.  A pass costs about 2.5 us
     where a look costs a load: readers that passed at every look and yielded every 16, as
     the sync eager spinner does, held a core for some 40 us between yields, and the others
     queued behind them.  (An eager spinner that never yielded held a core for its whole
     budget: a p99 of 4 ms, one scheduler slice.)  Calls spinning in one loop share the 10
     us (eight of them taking 10 us each would make a round of the loop 80 us);
     benchmarks/aio_one_loop.py compares readers awaited in one loop under this rule and
     with a pass at every look.  The count of spinners is kept per loop, in an object the
     spin holds, so that a spin whose end runs in another thread (a pending task of a
     closed loop, collected there) counts itself out of its own loop.
   - A machine found crowded when the wait begins does not keep the spin from starting: the
     first look at the load is after 64 looks.  The sync spin naps a ``quantum_us`` (200
     us) then, and spins once a core is free again; the loop's timers have a granularity of
     a millisecond, so a nap here would last the whole budget, and a reader fed every
     millisecond would pay a wake-up for every message that came in a burst of work (a p99
     twice the sync reader's, against level with it now).
3. **Sleep.**  A broadcast reader sleeps in its loop, on a descriptor the loop watches and
   the publisher's wake makes readable (:mod:`shmcast._loopwake`): where the kernel allows,
   its futex sleep itself, step 4 submitted through io_uring (docs/protocol.md "P3 through
   io_uring"), else its own wake-up socket (:mod:`shmcast._sockwake`, "P3 on a socket");
   ``$SHMCAST_AIO_SLEEP`` (:data:`SLEEP_ENV`) can pick one.  Rounds in the loop's thread:
   drain, announce, re-check, await the descriptor, with a look and the waiter's ``tick`` now
   and then (QueueBroken for a dead writer, long-wait logs): when the writer's pidfd, which
   the loop also watches, says it ended, and otherwise once per slice, or once per
   :data:`WATCHED_LOOK_SLICES` slices while that pidfd is watched.  When the condition
   holds, the attempt of step 1 again.
   Everything else (a ``put_async`` waiting for room, a gather reader, a reader that could
   have neither: see ``_aio_new_sleeper``) sleeps through the
   endpoint's helper thread: one thread per endpoint, started on the first wait that gets this
   far and stopped when the endpoint closes, runs the synchronous path's sleep loop for the
   call (:class:`~shmcast.FutexWait` with no spin): rounds of the waiter's own ``sleep`` (the
   announce / re-check / futex wait of P3, or P4 for a writer) of at most one slice each, and
   the waiter's ``tick`` once per slice.  When the condition holds, the deadline passes, the
   call is cancelled (seen within a slice) or a tick raises, it hands over to the loop
   (``loop.call_soon_threadsafe``), whose thread makes the attempt of step 1 again.

The helper never takes or sends a message: every change of the endpoint's position is made in
the loop's thread, by the synchronous code and its guarantees (a message taken is delivered or
still there, whatever raises when).  A cancelled call is cancelled at an ``await``, where
nothing is taken: the next call gets the message.  A message larger than the ring is streamed
with the endpoint's guard held across the awaits; a cancelled one is abandoned, which readers
drop whole (nothing sent).

While the helper waits the endpoint's position does not move (the loop's thread makes no
attempt on it until the hand-over), so the helper's re-check is against the condition the
attempt found false: the P3/P4 argument holds as it stands.  After a cancellation the wait
may still run until its slice ends; its look at the ring is a few native calls that only read
the segment and store the ring's last seen sequence, which is harmless beside a new call.

Who may call: one call at a time per endpoint (a second concurrent async call raises
RuntimeError, as a concurrent synchronous call does), from a running event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from . import _layout as L
from . import _sockwake
from ._endpoint import Endpoint, as_bytes_view, check_max_count, check_timeout
from ._errors import QueueClosed, QueueTimeout, ShmcastError
from ._loopwake import FutexSleeper, LoopSleeper
from ._ring import RingReader, RingWriter, timeout_error
from ._sockwake import WakeSocket, same_netns
from ._wait import LOAD, SPARE_CPUS, FutexWait

_DEFAULTS = FutexWait()
_NOTHING = object()  # the spin phase ended without a result

#: What an awaiting broadcast reader sleeps on in its loop (shmcast._loopwake).
Sleeper = LoopSleeper
#: The environment variable that picks it: "auto" (the default: the futex through io_uring
#: where the kernel allows, else the socket where the queue allows, else the helper thread),
#: or one of "uring", "socket", "thread" (that one where it can be had, else the helper).
SLEEP_ENV = "SHMCAST_AIO_SLEEP"
SLEEP_CHOICES = ("auto", "uring", "socket", "thread")

#: The longest the cooperative spin looks (and yields the CPU) without a pass of the event
#: loop, in seconds (each spin begins with one): other tasks wait at most that long, plus
#: what the yields give to other processes and the taking of a message that came.  Several
#: calls spinning in one loop share it: each passes after its share, so that they look in
#: turn and the loop still passes as often.
LOOP_PASS_EVERY = 10e-6


class _LoopSpinners:
    """How many calls spin cooperatively in one event loop now (``count``)."""

    __slots__ = ("__weakref__", "count")

    def __init__(self) -> None:
        self.count = 0


#: event loop -> its _LoopSpinners (a spin keeps its own loop's, wherever its end runs)
_SPINNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spinners_in(loop: asyncio.AbstractEventLoop) -> _LoopSpinners:
    """``loop``'s count; a count of its own for each call in a loop that cannot be weakly
    referenced (no sharing there, never an error)."""
    try:
        got = _SPINNERS.get(loop)
        if got is None:
            got = _SPINNERS[loop] = _LoopSpinners()
    except TypeError:
        return _LoopSpinners()
    return got


def _pass_due(since: float, spinners: int) -> bool:
    """Whether a spinner that let the loop pass ``since`` seconds ago, one of ``spinners``
    in its loop, lets it pass now."""
    return since * max(1, spinners) >= LOOP_PASS_EVERY


#: An awaiting reader whose loop watches its writer's pidfd looks at the ring (and logs a long
#: wait) once per this many slices: the writer's death wakes it without a look.
WATCHED_LOOK_SLICES = 16


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the call was cancelled meanwhile
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class _Job:
    """What one helper wait sleeps on: the call's waiter, until the call is cancelled."""

    __slots__ = ("cancelled", "waiter")

    def __init__(self, waiter: Any) -> None:
        self.waiter = waiter
        self.cancelled = False

    def ready(self) -> bool:
        return self.cancelled or self.waiter.ready()

    def sleep(self, timeout: float) -> bool:
        return self.waiter.sleep(timeout)

    def tick(self) -> None:
        if not self.cancelled:
            self.waiter.tick()

    def begin_spin(self, limit: int) -> bool:
        return False  # the loop spun already

    def end_spin(self) -> None:
        pass


def _serve(jobs: queue.SimpleQueue) -> None:
    """The helper thread: run waits until told to stop (None).  Holds no reference to the
    endpoint between waits, so that the endpoint can be collected."""
    while True:
        job = jobs.get()
        if job is None:
            return
        loop, fut, policy, waiter, deadline = job
        error: BaseException | None = None
        try:
            # The sync path's sleep loop (FutexWait with no spin): P3 / P4 rounds of at most
            # a slice, the waiter's tick (liveness, long-wait logs) once per slice.
            policy.wait(waiter, deadline)
        except BaseException as exc:  # given to the loop, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, fut, error)
        job = loop = fut = policy = waiter = error = None


class _Helper:
    """One endpoint's helper thread and its job queue (see the module docstring)."""

    def __init__(self, owner: Endpoint) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name=f"shmcast-aio {owner.name}", daemon=True
        )
        self._thread.start()
        # Collected or left at exit without close(): the thread ends too.
        self._stop = weakref.finalize(owner, self._jobs.put, None)

    def wait(self, loop: asyncio.AbstractEventLoop, policy: FutexWait, job: _Job,
             deadline: float | None) -> Any:  # fmt: skip
        """A future settled once ``policy.wait(job, deadline)`` has returned in the helper
        thread (or raised: the future holds the exception)."""
        fut = loop.create_future()
        self._jobs.put((loop, fut, policy, job, deadline))
        return fut

    def stop(self) -> None:
        """End the thread (a round in flight ends within its slice; close wakes it)."""
        self._stop()
        self._thread.join(timeout=2.0)


class AsyncEndpoint(Endpoint):
    """The awaitable calls both queues share; each queue adds its own receive signatures."""

    _aio_helper: _Helper | None = None
    #: (pid, the loop sleeper or None for "use the helper") once decided in that process
    _aio_sleep: tuple[int, Sleeper | None] | None = None
    _aio_busy = False
    _aio_budget = _DEFAULTS.min_spin_us * 1e-6

    # -- the wait -------------------------------------------------------------------------------

    def _aio_spin(self) -> tuple[float, float, int | None, bool, bool]:
        """(cap, floor, max_spinners, polite, detect_crowding) of the spin phase, from the
        endpoint's policy when it is a FutexWait, else FutexWait's defaults."""
        p = self._policy if isinstance(self._policy, FutexWait) else _DEFAULTS
        return (p.spin_us * 1e-6, p.min_spin_us * 1e-6, p.max_spinners, p.polite,
                p.detect_crowding)  # fmt: skip

    @staticmethod
    async def _aio_spin_phase(attempt: Callable[[], Any], waiter: Any, here: _LoopSpinners,
                              eager: bool,
                              detect: bool, end: float,
                              deadline: float | None) -> Any:  # fmt: skip
        """Step 2 until ``end`` (or ``deadline``): what ``attempt()`` returned, or _NOTHING.
        Every look yields the CPU; the loop makes a pass first, then whenever this call's
        share of LOOP_PASS_EVERY has gone by since the last; every 64 looks the load is looked
        at again, and a machine whose cores are all taken ends the spin.  ``eager``: the
        caller holds one of the queue's spinning places, which this gives back; ``here``:
        the count of calls spinning in the caller's loop."""
        if deadline is not None:
            end = min(end, deadline)
        clock = time.monotonic
        waiter.count_spin(1)
        here.count += 1
        try:
            looks = 0
            passed = float("-inf")  # a pass is due at once
            while (now := clock()) < end:
                if _pass_due(now - passed, here.count):
                    await asyncio.sleep(0)  # one pass of the loop: other tasks run
                    passed = clock()
                if waiter.ready():
                    try:
                        return attempt()
                    except QueueTimeout:
                        pass
                looks += 1
                os.sched_yield()  # hand the core to any process that wants it
                if detect and not looks & 63 and LOAD.crowded(now, waiter.spinning()):
                    break  # every core is taken: sleep
            return _NOTHING
        finally:
            here.count -= 1
            waiter.count_spin(-1)
            if eager:
                waiter.end_spin()

    async def _aio_wait(self, attempt: Callable[[], Any], waiter_of: Callable[[], Any],
                        deadline: float | None, timeout: float | None,
                        what: str) -> Any:  # fmt: skip
        """``attempt()`` (a synchronous call that raises QueueTimeout instead of waiting) until
        it succeeds, waiting in between as the module docstring says."""
        try:
            return attempt()
        except QueueTimeout:
            pass
        if self._aio_busy:
            raise RuntimeError(
                "this queue endpoint is already in use by another awaiting call (one call at a "
                "time per endpoint)"
            )
        self._aio_busy = True
        try:
            return await self._aio_wait_slow(attempt, waiter_of(), deadline, timeout, what)
        finally:
            self._aio_busy = False

    async def _aio_wait_slow(self, attempt: Callable[[], Any], waiter: Any,
                             deadline: float | None, timeout: float | None,
                             what: str) -> Any:  # fmt: skip
        clock = time.monotonic
        start = clock()
        if deadline is not None and start >= deadline:
            raise timeout_error(what, timeout)
        cap, floor, max_spinners, polite, detect = self._aio_spin()
        budget = min(self._aio_budget, cap)
        try:
            # Step 2: look, with passes of the loop, counted in the queue's ``spinning``
            # word; without a spinning place only a polite spinner spins.
            if budget > 0:
                limit = SPARE_CPUS if max_spinners is None else max_spinners
                here = _spinners_in(asyncio.get_running_loop())
                eager = waiter.begin_spin(limit)
                if eager or polite:
                    got = await self._aio_spin_phase(attempt, waiter, here, eager, detect,
                                                     start + budget, deadline)  # fmt: skip
                    if got is not _NOTHING:
                        return got
            # Step 3, a broadcast reader: sleep on a descriptor its loop watches, which the
            # publisher's wake makes readable (shmcast._loopwake).
            sleeper = self._aio_loop_sleeper(waiter)
            if sleeper is not None:
                got = await self._aio_sleep_on(sleeper, attempt, waiter, deadline, timeout,
                                               what)  # fmt: skip
                if got is not _NOTHING:
                    return got
                # The sleeper failed (the kernel refused a submission): the helper from now.
            # Step 3, otherwise: the helper thread sleeps as a sync call would, then hands over.
            helper = self._aio_helper
            if helper is None or helper.pid != os.getpid():
                helper = self._aio_helper = _Helper(self)
                p = self._policy
                self._aio_sleeper = FutexWait(spin_us=0, min_spin_us=0, slice=p.slice,
                                              warn_after=p.warn_after)  # fmt: skip
            loop = asyncio.get_running_loop()
            while True:
                if deadline is not None and clock() >= deadline:
                    raise timeout_error(what, timeout)
                job = _Job(waiter)
                error = None
                try:
                    await helper.wait(loop, self._aio_sleeper, job, deadline)
                except asyncio.CancelledError:
                    job.cancelled = True  # the helper's wait ends within a slice
                    raise
                except Exception as exc:  # closed, unmapped, a dead peer...
                    error = exc
                try:
                    return attempt()  # what is there comes first (a dead peer's last messages)
                except QueueTimeout:
                    pass
                if error is not None:
                    raise error
        finally:
            took = clock() - start  # FutexWait's rule for the next spin budget
            self._aio_budget = max(floor, min(cap, 2 * took)) if took <= cap else floor

    def _aio_loop_sleeper(self, waiter: Any) -> Sleeper | None:
        """What a wait of ``waiter`` sleeps on in the loop (shmcast._loopwake), or None: the
        helper thread."""
        return None

    async def _aio_sleep_on(self, sleeper: Sleeper, attempt: Callable[[], Any],
                            waiter: RingReader, deadline: float | None,
                            timeout: float | None, what: str) -> Any:  # fmt: skip
        """Step 3 in the loop (shmcast._loopwake): rounds of drain, announce and re-check,
        await the sleeper's descriptor, until ``attempt()`` succeeds.  The guard is held
        during a round (a close meanwhile unmaps after it, never under a mark); ``attempt``
        takes it itself.

        Between wakes the reader looks at the ring and ticks (a dead writer, long-wait
        logs).  With the writer's pidfd watched by the loop (``RingReader.writer_exit_fd``)
        its death is a wake-up of its own, so the look comes only every
        :data:`WATCHED_LOOK_SLICES` slices, or when a long-wait log is due; without one, once
        per slice, as a synchronous wait ticks."""
        loop = asyncio.get_running_loop()
        clock = time.monotonic
        slice_ = self._policy.slice
        exit_fd: int | None = None

        def next_look() -> float:
            if exit_fd is None:
                return slice_
            return max(slice_, min(WATCHED_LOOK_SLICES * slice_, waiter.log_due_in()))

        def on_look() -> bool:  # no wake for a while, or the writer ended: look, and tick
            nonlocal next_tick
            if waiter.ready():
                return True
            waiter.tick()  # a dead writer (QueueBroken), long-wait logs
            next_tick = clock() + next_look()
            return False

        try:
            with self._guard:  # the segment stays mapped while its writer line is read
                exit_fd = waiter.writer_exit_fd()
            next_tick = clock() + next_look()
            while True:
                if deadline is not None and clock() >= deadline:
                    raise timeout_error(what, timeout)
                with self._guard:
                    try:
                        sleeper.drain()  # what an earlier wake left: from now on it is fresh
                        ready = sleeper.arm(waiter)  # announce, re-check
                        if not ready:
                            try:
                                # until a wake or the deadline (a cancellation lands here)
                                await sleeper.wait(loop, deadline, next_look, on_look, exit_fd)
                            finally:
                                sleeper.disarm(waiter)
                            ready = waiter.ready()
                    except (OSError, ValueError) as exc:
                        if isinstance(exc, ShmcastError):  # the queue's own: QueueBroken...
                            raise
                        if not sleeper.closed:  # the kernel refused: never this one again
                            sleeper.close()
                            self._aio_sleep = (os.getpid(), None)
                            return _NOTHING
                        ready = True  # closed from another thread: the attempt raises
                    if not ready and clock() >= next_tick:  # stray wakes, one after another
                        on_look()
                if ready:
                    try:
                        return attempt()
                    except QueueTimeout:
                        pass
        finally:
            if exit_fd is not None:
                os.close(exit_fd)

    # -- sending --------------------------------------------------------------------------------

    def _aio_writer(self) -> RingWriter:
        with self._guard:
            return self._sender()

    async def _aio_send(self, parts: Any, kind: int, deadline: float | None,
                        timeout: float | None, publish: bool = True) -> None:  # fmt: skip
        """Send one encoded message: all of it, or (an exception or a cancellation) nothing."""
        total = sum(
            len(p) if type(p) is bytes or hasattr(p, "write_into") else as_bytes_view(p).nbytes
            for p in parts
        )
        if total > self._geometry.capacity:
            await self._aio_stream(parts, total, kind, deadline, timeout)
            return

        def attempt() -> None:
            with self._guard:
                self._send(self._sender(), parts, kind, 0, time.monotonic(), publish)

        await self._aio_wait(attempt, self._aio_writer, deadline, timeout, "put")

    async def _aio_stream(self, parts: Any, total: int, kind: int, deadline: float | None,
                          timeout: float | None) -> None:  # fmt: skip
        """A message larger than the ring, slot run by slot run as readers free them; the
        guard is held across the awaits (the ring is mid-message).  Abandoned half-way (an
        error, a cancellation), it is dropped by every reader: nothing is sent."""
        from ._endpoint import materialize

        streamed = [memoryview(materialize(p)) for p in parts]
        with self._guard:
            writer = self._sender()
            steps = writer.stream_steps(streamed, total, kind)

            def claim() -> None:
                writer.claim(1, time.monotonic())

            try:
                for _ in steps:
                    try:
                        claim()
                    except QueueTimeout:
                        await self._aio_wait_slow(claim, writer, deadline, timeout, "put")
            finally:
                steps.close()
            self._activity()
        self._aio_kick()

    def _aio_kick(self) -> None:
        publisher = getattr(self, "_publisher", None)
        if publisher is not None:
            publisher.kick()

    async def put_async(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj``, awaiting room without blocking the event loop.  Waits, times out and
        raises as :meth:`put`; a cancelled call sent the whole message or nothing."""
        deadline = self._aio_deadline(timeout)
        self._aio_writer()  # RoleError, QueueClosed before any encoding
        await self._aio_send(self._encode(obj), L.MSG_OBJECT, deadline, timeout)

    async def put_bytes_async(self, data: Any, timeout: float | None = None) -> None:
        """Send raw bytes (any contiguous buffer), as :meth:`put_bytes`; awaitable as
        :meth:`put_async`."""
        deadline = self._aio_deadline(timeout)
        self._aio_writer()
        try:
            view = as_bytes_view(data)
        except (TypeError, ValueError, BufferError) as exc:
            raise TypeError(f"put_bytes needs a contiguous buffer: {exc}") from None
        await self._aio_send((view,), L.MSG_RAW, deadline, timeout)

    async def put_many_async(self, objs: Iterable[Any], timeout: float | None = None) -> None:
        """Send several objects in order, publishing them together, as :meth:`put_many`
        (``timeout`` bounds the whole call; on an error the exception's ``sent`` says how many
        were sent).  A cancellation lands between two messages: those before it were sent
        (``sent`` is not set then)."""
        deadline = self._aio_deadline(timeout)
        writer = self._aio_writer()
        sent = 0
        try:
            for obj in objs:
                await self._aio_send(self._encode(obj), L.MSG_OBJECT, deadline, timeout, False)
                sent += 1
        except Exception as exc:
            exc.sent = sent  # type: ignore[attr-defined]
            raise
        finally:
            try:
                with self._guard:
                    writer.flush()  # held-back slots (a wait has published those before it)
            except QueueClosed:
                pass  # closing published them
            self._aio_kick()

    # -- receiving ------------------------------------------------------------------------------

    @staticmethod
    def _aio_deadline(timeout: float | None) -> float | None:
        check_timeout(timeout)
        return None if timeout is None else time.monotonic() + timeout

    def _aio_data_waiter(self, source: int | None) -> Any:
        """The Waiter whose sleep a receive's helper round runs (P3)."""
        raise NotImplementedError

    async def _get_async(self, timeout: float | None, source: int | None,
                         want_kind: int | None) -> Any:  # fmt: skip
        deadline = self._aio_deadline(timeout)
        return await self._aio_wait(
            lambda: self._get(0, source, want_kind),
            lambda: self._aio_data_waiter(source),
            deadline, timeout, "get",
        )  # fmt: skip

    async def _get_many_async(self, max_count: int, timeout: float | None,
                              source: int | None) -> list[Any]:  # fmt: skip
        check_max_count(max_count)
        deadline = self._aio_deadline(timeout)
        return await self._aio_wait(
            lambda: self._get_many(max_count, 0, source),
            lambda: self._aio_data_waiter(source),
            deadline, timeout, "get",
        )  # fmt: skip

    def __aiter__(self):
        return self

    async def __anext__(self) -> Any:
        """``async for message in queue``: the messages in order; ends when the queue is
        closed (the writer closed and everything was read, or this endpoint closed)."""
        try:
            return await self._get_async(None, None, None)
        except QueueClosed:
            raise StopAsyncIteration from None

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """As :meth:`Endpoint.close`; also ends the endpoint's asyncio helper thread and
        releases what its awaits sleep on in the loop (an io_uring or a wake-up socket)."""
        super().close()  # wakes a round in flight (the close's own futex bumps, P5)
        got = self._aio_sleep
        if got is not None and got[0] == os.getpid():
            self._aio_sleep = None
            if got[1] is not None:
                got[1].close()  # after the round in flight, if any
        helper = self._aio_helper
        if helper is not None and helper.pid == os.getpid():
            self._aio_helper = None
            helper.stop()
            # A round still asleep on the segment made the unmap give up (Atomics.release
            # refuses while a thread waits): unmap now, unless a call still runs.
            if not self._guard.busy and not self._seg.atomics.released:
                self._seg.close()


class BroadcastAsync(AsyncEndpoint):
    """The awaitable receive calls of a :class:`~shmcast.BroadcastQueue` reader."""

    _reader: Any

    def _aio_data_waiter(self, source: int | None) -> Any:
        return self._reader

    def _aio_loop_sleeper(self, waiter: Any) -> Sleeper | None:
        if not isinstance(waiter, RingReader):  # a put waits for room: the helper (P4)
            return None
        pid = os.getpid()
        got = self._aio_sleep
        if got is None or got[0] != pid:
            got = self._aio_sleep = (pid, self._aio_new_sleeper(waiter))
        return got[1]

    def _aio_new_sleeper(self, waiter: RingReader) -> Sleeper | None:
        """The first of: the futex through io_uring, the socket, None (the helper thread),
        that this kernel and queue allow and ``$SHMCAST_AIO_SLEEP`` does not rule out."""
        choice = os.environ.get(SLEEP_ENV, "auto")
        if choice not in SLEEP_CHOICES:
            raise ValueError(
                f"${SLEEP_ENV} is {choice!r}; it must be one of {', '.join(SLEEP_CHOICES)}"
            )
        if choice in ("auto", "uring"):
            with contextlib.suppress(OSError):  # before Linux 6.7, or io_uring refused
                return FutexSleeper()
        if choice in ("auto", "socket"):
            # The writer must reach our address: the same network namespace (abstract names
            # live there).  A taken address (squatted) falls back too, and so does a queue
            # with more readers than spare CPUs (the kernel would run them all on the
            # writer's core: see shmcast._sockwake).
            fits = self._geometry.n_peers <= _sockwake.SOCKET_READERS_MAX
            if fits and same_netns(waiter.writer_pid()):
                with contextlib.suppress(OSError):
                    return WakeSocket(waiter.nonce, waiter.index)
        return None

    async def get_async(self, timeout: float | None = None) -> Any:
        """Receive the next message, awaiting it without blocking the event loop.  Returns,
        times out and raises as :meth:`get`; a cancelled call took nothing (the next call
        gets the message)."""
        return await self._get_async(timeout, None, None)

    async def get_bytes_async(self, timeout: float | None = None) -> bytes:
        """As :meth:`get_bytes`, awaitable as :meth:`get_async`."""
        return await self._get_async(timeout, None, L.MSG_RAW)

    async def get_many_async(self, max_count: int = 64, timeout: float | None = None) -> list:
        """As :meth:`get_many`, awaitable as :meth:`get_async`."""
        return await self._get_many_async(max_count, timeout, None)


class GatherAsync(AsyncEndpoint):
    """The awaitable receive calls of a :class:`~shmcast.GatherQueue`'s reader."""

    _rings: list
    _any: Any

    def _aio_data_waiter(self, source: int | None) -> Any:
        return self._any if source is None else self._rings[source]

    async def get_async(self, timeout: float | None = None, writer: int | None = None) -> Any:
        """As :meth:`get`, from ``writer`` or any writer, awaiting without blocking the event
        loop; a cancelled call took nothing."""
        return await self._get_async(timeout, writer, None)

    async def get_with_sender_async(self, timeout: float | None = None) -> tuple[int, Any]:
        """As :meth:`get_with_sender`, awaitable as :meth:`get_async`."""
        obj = await self._get_async(timeout, None, None)
        return self._last, obj

    async def get_bytes_async(self, timeout: float | None = None,
                              writer: int | None = None) -> bytes:  # fmt: skip
        """As :meth:`get_bytes`, awaitable as :meth:`get_async`."""
        return await self._get_async(timeout, writer, L.MSG_RAW)

    async def get_many_async(self, max_count: int = 64, timeout: float | None = None,
                             writer: int | None = None) -> list:  # fmt: skip
        """As :meth:`get_many`, awaitable as :meth:`get_async`."""
        return await self._get_many_async(max_count, timeout, writer)


__all__ = ["AsyncEndpoint", "BroadcastAsync", "GatherAsync"]
