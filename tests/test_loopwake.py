"""An awaiting reader's futex sleep through io_uring (shmcast._loopwake, docs/protocol.md "P3
through io_uring"), what only it has: the native ring, a queued wait that serves later sleeps,
no helper whatever the readers per CPU, a refused submission that falls back, and
$SHMCAST_AIO_SLEEP's choice.  What it shares with the socket is in test_loop_sleepers.py."""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from typing import Any

import pytest
from _procs import LONG_SLICES, assert_served_by_the_helper, later, why_no_uring

from shmcast import BroadcastQueue, QueueTimeout, _aio
from shmcast import _layout as L
from shmcast._loopwake import FutexSleeper
from shmcast._native import Atomics, FutexRing

pytestmark = pytest.mark.timeout(120)


WHY_NOT = why_no_uring()
needs_uring = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(autouse=True)
def uring_sleep(monkeypatch):
    monkeypatch.setenv(_aio.SLEEP_ENV, "uring")


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
def test_a_queued_wait_serves_the_next_sleeps(long_slice_pair) -> None:
    writer, reader = long_slice_pair

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
        BroadcastQueue.attach(writer.handle, 0, wait=LONG_SLICES) as reader,
    ):

        async def main() -> Any:
            later(0.1, writer.put, "no helper")
            return await reader.get_async(timeout=10)

        assert asyncio.run(main()) == "no helper"
        assert isinstance(_sleeper(reader), FutexSleeper)
        assert reader._aio_helper is None


# -- the choice ---------------------------------------------------------------------------------


def test_the_thread_choice_keeps_the_helper(long_slice_pair, monkeypatch) -> None:
    monkeypatch.setenv(_aio.SLEEP_ENV, "thread")
    assert_served_by_the_helper(*long_slice_pair)


def test_an_unknown_choice_is_refused(long_slice_pair, monkeypatch) -> None:
    monkeypatch.setenv(_aio.SLEEP_ENV, "carrier-pigeon")
    _writer, reader = long_slice_pair
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
def test_a_refused_submission_falls_back_to_the_helper(long_slice_pair) -> None:
    writer, reader = long_slice_pair

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
