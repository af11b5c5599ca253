"""What every loop sleeper of an awaiting reader does, the futex wait through io_uring
(shmcast._loopwake) and the datagram socket (shmcast._sockwake) alike, each test run with
each: the writer's wake ends a sleeping get_async with no helper thread, no wake-up is lost,
close (of either end, from a task or another thread) and a dead writer end an await at once,
an idle await looks at the ring only every 16 slices yet logs a long wait on time, and a
forked child neither shares nor uses the parent's sleeper.  What only one of them has is in
tests/test_loopwake.py and tests/test_sockwake.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import pytest
from _procs import (
    LONG_SLICES,
    async_readers_through_sleeps,
    async_wait_for_a_dead_writer,
    inherited_async_reader,
    later,
    process_group,
    why_no_uring,
)

from shmcast import BroadcastQueue, FutexWait, QueueClosed, QueueTimeout, _aio, _sockwake
from shmcast._loopwake import FutexSleeper
from shmcast._sockwake import WakeSocket

pytestmark = pytest.mark.timeout(120)

WHY_NO_URING = why_no_uring()
#: kind -> the class an await of that kind sleeps on
SLEEPERS = {"uring": FutexSleeper, "socket": WakeSocket}


@pytest.fixture(
    autouse=True,
    params=[
        pytest.param(
            "uring", marks=pytest.mark.skipif(WHY_NO_URING is not None, reason=WHY_NO_URING or "")
        ),
        "socket",
    ],
)
def kind(request, monkeypatch) -> str:
    """Every await of the test sleeps so (the forked readers inherit the choice)."""
    monkeypatch.setenv(_aio.SLEEP_ENV, request.param)
    return request.param


def _sleeper(reader: BroadcastQueue) -> Any:
    got = reader._aio_sleep
    return None if got is None else got[1]


def test_a_sleeping_reader_is_woken_by_the_writer(long_slice_pair, kind: str) -> None:
    writer, reader = long_slice_pair

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
    assert isinstance(sleeper, SLEEPERS[kind]) and sleeper.wakes >= 5
    assert reader._aio_helper is None  # the direct path, never the helper thread
    signals = writer._writer.cursor.signals
    if kind == "uring":
        assert signals == 0  # no datagram: the writer's ordinary futex wake
    else:
        assert signals >= 5  # a datagram for each


@pytest.mark.parametrize("readers", [1, 3])
def test_no_wake_up_is_lost_across_thousands_of_sleeps(readers: int, kind: str,
                                                        monkeypatch) -> None:  # fmt: skip
    # Sockets for every reader here, whatever the CPUs (the forked readers inherit the limit).
    monkeypatch.setattr(_sockwake, "SOCKET_READERS_MAX", readers)
    results = async_readers_through_sleeps(readers)
    for r in results:
        # A lost wake-up would leave a reader asleep until its 30 s slice ends.
        assert r["longest"] < 5.0, r
        assert r["wakes"] > 0 and not r["helper"], r


def test_closing_the_reader_ends_an_await_at_once(long_slice_pair) -> None:
    _writer, reader = long_slice_pair

    async def main() -> None:
        later(0.2, reader.close)
        with pytest.raises(QueueClosed):
            await reader.get_async(timeout=20)

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 5
    assert reader._aio_helper is None
    assert reader._seg.atomics.released  # unmapped once the round let go


def test_closing_from_another_task_of_the_loop(long_slice_pair) -> None:
    _writer, reader = long_slice_pair

    async def main() -> None:
        waiting = asyncio.create_task(reader.get_async(timeout=20))
        await asyncio.sleep(0.2)
        reader.close()
        with pytest.raises(QueueClosed):
            await waiting

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 5


async def _await_until_closed(reader: BroadcastQueue, delay: float) -> None:
    threading.Timer(delay, reader.close).start()
    with pytest.raises(QueueClosed):
        for _ in range(1000):  # rounds until the close lands, wherever
            with contextlib.suppress(QueueTimeout):
                await reader.get_async(timeout=0.001)


def test_a_close_from_another_thread_always_ends_the_await_with_queue_closed() -> None:
    for i in range(30):
        with BroadcastQueue(1, n_slots=8, slot_size=256) as writer:
            reader = BroadcastQueue.attach(writer.handle, 0, wait=LONG_SLICES)
            asyncio.run(_await_until_closed(reader, 0.0005 * (i % 10)))
            reader.close()


def test_the_writers_close_ends_an_await_at_once(long_slice_pair) -> None:
    writer, reader = long_slice_pair

    async def main() -> list[Any]:
        later(0.2, writer.close)
        return [message async for message in reader]

    start = time.monotonic()
    assert asyncio.run(main()) == []
    assert time.monotonic() - start < 5


# -- the writer's pidfd -------------------------------------------------------------------------


def test_a_dead_writer_wakes_the_await_through_its_pidfd(kind: str) -> None:
    """With a 30 s slice only the writer's pidfd, which the loop watches, can end the await
    in time: QueueBroken once its last message is read."""
    took, sleeper, helper = async_wait_for_a_dead_writer(LONG_SLICES)
    assert isinstance(sleeper, SLEEPERS[kind]) and not helper
    assert took < 5.0, took  # the kill, and a loaded machine's delay: not 30 s


def _count_looks(reader: BroadcastQueue, monkeypatch) -> list[float]:
    looks: list[float] = []
    ring = type(reader._reader)
    tick = ring.tick

    def counted(self) -> None:
        looks.append(time.monotonic())
        tick(self)

    monkeypatch.setattr(ring, "tick", counted)
    return looks


def test_an_idle_await_looks_once_per_sixteen_slices_while_the_writer_is_watched(
    monkeypatch,
) -> None:
    slice_ = 0.05
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(
            writer.handle, 0, wait=FutexWait(spin_us=0, min_spin_us=0, slice=slice_)
        ) as reader,
    ):
        looks = _count_looks(reader, monkeypatch)
        with pytest.raises(QueueTimeout):
            asyncio.run(reader.get_async(timeout=2.0))
        assert reader._aio_helper is None
    # 2 s in slices of 50 ms: 40 looks unwatched; with the writer watched one per 0.8 s.
    assert 1 <= len(looks) <= 2 / (_aio.WATCHED_LOOK_SLICES * slice_) + 1, looks


def test_a_long_wait_is_still_logged_on_time(monkeypatch, caplog) -> None:
    policy = FutexWait(spin_us=0, min_spin_us=0, slice=0.05, warn_after=0.3)
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=policy) as reader,
        caplog.at_level(logging.INFO, logger="shmcast"),
    ):
        looks = _count_looks(reader, monkeypatch)
        with pytest.raises(QueueTimeout):
            asyncio.run(reader.get_async(timeout=1.0))
    logged = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
    assert logged, caplog.records
    waited = float(logged[0].split("has waited ")[1].split(" s")[0])
    assert 0.3 <= waited < 0.6, logged  # the look comes when the log is due, not 0.8 s on
    assert len(looks) < 1.0 / 0.05, looks  # and the idle wait still looks less than per slice


# -- fork ---------------------------------------------------------------------------------------


def test_a_forked_child_neither_shares_nor_uses_the_sleeper(long_slice_pair, kind: str) -> None:
    writer, reader = long_slice_pair

    async def sleep_once() -> Any:
        later(0.05, writer.put, 1)
        return await reader.get_async(timeout=10)

    assert asyncio.run(sleep_once()) == 1
    sleeper = _sleeper(reader)
    assert isinstance(sleeper, SLEEPERS[kind])
    with process_group("fork", timeout=60) as group:
        group.start(inherited_async_reader, reader)
        (result,) = group.results()
    assert result == {"released": True, "refused": True}
    assert asyncio.run(sleep_once()) == 1  # the parent's sleeper still works
    assert sleeper.wakes >= 2 and reader._aio_helper is None
