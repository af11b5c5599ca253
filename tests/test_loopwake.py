"""An awaiting reader's futex sleep through io_uring (shmcast._loopwake, docs/protocol.md "P3
through io_uring"): the writer's ordinary futex wake ends a get_async asleep in its loop, no
wake-up is lost, a queued wait serves later sleeps, close and a dead writer end an await at
once, a forked child does not use the parent's ring, and $SHMCAST_AIO_SLEEP picks the way."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import threading
import time
from typing import Any

import pytest
from _procs import (
    async_readers_through_sleeps,
    async_wait_for_a_dead_writer,
    later,
    process_group,
)

from shmcast import BroadcastQueue, FutexWait, QueueClosed, QueueTimeout, _aio
from shmcast import _layout as L
from shmcast._loopwake import FutexSleeper
from shmcast._native import Atomics, FutexRing

pytestmark = pytest.mark.timeout(120)


def _why_not() -> str | None:
    try:
        FutexRing().close()
    except OSError as exc:
        return f"no futex waits through io_uring here ({exc}; Linux 6.7 and io_uring needed)"
    return None


WHY_NOT = _why_not()
needs_uring = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

#: A slice far longer than any test waits: only a wake can end an await in time.
LONG = FutexWait(spin_us=0, min_spin_us=0, slice=30.0)


@pytest.fixture(autouse=True)
def uring_sleep(monkeypatch):
    monkeypatch.setenv(_aio.SLEEP_ENV, "uring")


@pytest.fixture
def pair():
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=LONG) as reader,
    ):
        yield writer, reader


def _sleeper(reader: BroadcastQueue) -> Any:
    got = reader._aio_sleep
    return None if got is None else got[1]


# -- the native ring ----------------------------------------------------------------------------


@needs_uring
def test_the_ring_waits_on_a_shared_word() -> None:
    m = mmap.mmap(-1, 4096)
    a = Atomics(m)
    ring = FutexRing()
    try:
        ring.submit_wait(a, 0, 5, 1)  # the word holds 0, not 5: ends at once
        assert ring.reap() == [(1, -11)]
        ring.submit_wait(a, 0, 0, 2)
        assert ring.reap() == []  # queued
        a.add32(0, 1)
        a.wake32(0, 100)
        deadline = time.monotonic() + 10
        got: list[tuple[int, int]] = []
        while not got and time.monotonic() < deadline:
            got = ring.reap()
            time.sleep(0.001)
        assert got == [(2, 0)]
        with pytest.raises(IndexError):
            ring.submit_wait(a, 4096, 0, 3)
        with pytest.raises(ValueError):
            ring.submit_wait(a, 2, 0, 3)  # not aligned
        with pytest.raises(TypeError):
            ring.submit_wait(m, 0, 0, 3)
    finally:
        ring.close()
    ring.close()  # idempotent
    with pytest.raises(ValueError):
        ring.reap()
    with pytest.raises(ValueError):
        ring.fileno()


# -- awaits -------------------------------------------------------------------------------------


@needs_uring
def test_a_sleeping_reader_is_woken_by_the_writers_futex_wake(pair) -> None:
    writer, reader = pair

    async def main() -> list[Any]:
        got = []
        for n in range(5):
            later(0.05, writer.put, n)
            got.append(await reader.get_async(timeout=10))
        return got

    start = time.monotonic()
    assert asyncio.run(main()) == list(range(5))
    assert time.monotonic() - start < 10  # no await lasted a slice
    sleeper = _sleeper(reader)
    assert isinstance(sleeper, FutexSleeper) and sleeper.wakes >= 5
    assert reader._aio_helper is None  # no thread
    assert writer._writer.cursor.signals == 0  # no datagram either: a futex wake


@needs_uring
@pytest.mark.parametrize("readers", [1, 3])
def test_no_wake_up_is_lost_across_thousands_of_sleeps(readers: int) -> None:
    results = async_readers_through_sleeps(readers)
    for r in results:
        # A lost wake-up would leave a reader asleep until its 30 s slice ends.
        assert r["longest"] < 5.0, r
        assert r["wakes"] > 0 and not r["helper"], r


@needs_uring
def test_a_queued_wait_serves_the_next_sleeps(pair) -> None:
    writer, reader = pair

    async def main() -> list[Any]:
        with pytest.raises(QueueTimeout):
            await reader.get_async(timeout=0.1)  # queues a wait, ends at the deadline
        queued = _sleeper(reader)._queued
        assert queued is not None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.get_async(), 0.1)  # cancelled: the same wait
        assert _sleeper(reader)._queued == queued
        later(0.05, writer.put, "woken")
        return [await reader.get_async(timeout=10)]

    start = time.monotonic()
    assert asyncio.run(main()) == ["woken"]
    assert time.monotonic() - start < 10
    assert _sleeper(reader).wakes >= 1


@needs_uring
def test_a_queue_with_more_readers_than_cpus_needs_no_helper() -> None:
    n = os.cpu_count() + 2
    with (
        BroadcastQueue(n, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=LONG) as reader,
    ):

        async def main() -> Any:
            later(0.1, writer.put, "no helper")
            return await reader.get_async(timeout=10)

        assert asyncio.run(main()) == "no helper"
        assert isinstance(_sleeper(reader), FutexSleeper)
        assert reader._aio_helper is None


@needs_uring
def test_closing_the_reader_or_the_writer_ends_an_await_at_once(pair) -> None:
    writer, reader = pair

    async def main() -> None:
        later(0.2, writer.close)
        assert [m async for m in reader] == []

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 5

    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as w2,
        BroadcastQueue.attach(w2.handle, 0, wait=LONG) as r2,
    ):

        async def own() -> None:
            later(0.2, r2.close)
            with pytest.raises(QueueClosed):
                await r2.get_async(timeout=20)

        start = time.monotonic()
        asyncio.run(own())
        assert time.monotonic() - start < 5


@needs_uring
def test_a_dead_writer_ends_the_await() -> None:
    took, sleeper, helper = async_wait_for_a_dead_writer(LONG)
    assert isinstance(sleeper, FutexSleeper) and not helper
    assert took < 5.0, took  # the kill, and a loaded machine's delay: not a 30 s slice


@needs_uring
def test_a_forked_child_does_not_use_the_parents_ring(pair) -> None:
    writer, reader = pair

    async def sleep_once() -> Any:
        later(0.05, writer.put, 1)
        return await reader.get_async(timeout=10)

    assert asyncio.run(sleep_once()) == 1
    with process_group("fork", timeout=60) as group:
        group.start(_inherited_reader, reader)
        assert group.results() == [{"ring_closed": True, "refused": True}]
    assert asyncio.run(sleep_once()) == 1  # the parent's ring still works
    assert _sleeper(reader).wakes >= 2


def _inherited_reader(queue: Any) -> dict[str, Any]:
    from shmcast import InheritedEndpoint

    sleeper = queue._aio_sleep[1]
    try:
        sleeper._ring.fileno()
        closed = False
    except ValueError:
        closed = True
    try:
        asyncio.run(queue.get_async(timeout=0.5))
        refused = False
    except InheritedEndpoint:
        refused = True
    return {"ring_closed": closed, "refused": refused}


# -- the choice ---------------------------------------------------------------------------------


def test_the_thread_choice_keeps_the_helper(pair, monkeypatch) -> None:
    monkeypatch.setenv(_aio.SLEEP_ENV, "thread")
    writer, reader = pair

    async def main() -> Any:
        later(0.1, writer.put, "through the helper")
        return await reader.get_async(timeout=10)

    assert asyncio.run(main()) == "through the helper"
    assert reader._aio_sleep == (os.getpid(), None)
    assert reader._aio_helper is not None


def test_an_unknown_choice_is_refused(pair, monkeypatch) -> None:
    monkeypatch.setenv(_aio.SLEEP_ENV, "carrier-pigeon")
    _writer, reader = pair
    with pytest.raises(ValueError, match="SHMCAST_AIO_SLEEP"):
        asyncio.run(reader.get_async(timeout=0.2))
    monkeypatch.setenv(_aio.SLEEP_ENV, "auto")
    with pytest.raises(QueueTimeout):  # the endpoint is still usable
        asyncio.run(reader.get_async(timeout=0.1))


class _Refusing:
    """A FutexRing whose submissions the kernel refuses (EAGAIN), otherwise the real one."""

    def __init__(self, ring: FutexRing) -> None:
        self._ring = ring

    def submit_wait(self, *args: Any) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ring, name)


@needs_uring
def test_a_refused_submission_falls_back_to_the_helper(pair) -> None:
    writer, reader = pair

    async def main() -> list[Any]:
        with pytest.raises(QueueTimeout):
            await reader.get_async(timeout=0.05)  # makes the sleeper
        sleeper = _sleeper(reader)
        sleeper.drain()
        sleeper._queued = None
        sleeper._ring = _Refusing(sleeper._ring)
        later(0.1, writer.put, "through the helper")
        return [await reader.get_async(timeout=10)]

    assert asyncio.run(main()) == ["through the helper"]
    assert reader._aio_sleep == (os.getpid(), None)  # never that ring again
    assert reader._aio_helper is not None
    a = writer._seg.atomics
    assert a.load32(L.SLEEPERS_OFF) == 0  # every announcement undone


async def _await_until_closed(reader: BroadcastQueue, delay: float) -> None:
    threading.Timer(delay, reader.close).start()
    with pytest.raises(QueueClosed):
        for _ in range(1000):  # rounds until the close lands, wherever
            with contextlib.suppress(QueueTimeout):
                await reader.get_async(timeout=0.001)


@needs_uring
def test_a_close_from_another_thread_always_ends_the_await_with_queue_closed() -> None:
    for i in range(30):
        with BroadcastQueue(1, n_slots=8, slot_size=256) as writer:
            reader = BroadcastQueue.attach(writer.handle, 0, wait=LONG)
            asyncio.run(_await_until_closed(reader, 0.0005 * (i % 10)))
            reader.close()
