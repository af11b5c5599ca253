"""The asyncio reader's wake-up socket (shmcast._sockwake, docs/protocol.md "P3 on a socket"):
the publisher's datagram wakes a sleeping get_async (no helper thread), no wake-up is lost,
close/detach/a dead writer end an await promptly, a squatted address or another network
namespace falls back to the helper, a forked child neither shares nor uses the socket, and
hostile datagrams or garbage in the marks only cost spurious wake-ups and bounded scans."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import Any

import pytest
from _procs import (
    async_readers_through_sleeps,
    async_wait_for_a_dead_writer,
    inherited_async_reader,
    later,
    process_group,
)

from shmcast import (
    BroadcastQueue,
    FutexWait,
    QueueClosed,
    QueueTimeout,
    _aio,
    _sockwake,
)
from shmcast import _layout as L
from shmcast._sockwake import DRAIN_MAX, address, same_netns

pytestmark = pytest.mark.timeout(120)

#: A slice far longer than any test waits: only a datagram can end an await in time.
LONG = FutexWait(spin_us=0, min_spin_us=0, slice=30.0)


@pytest.fixture(autouse=True)
def socket_sleep(monkeypatch):
    """Every await here sleeps on its socket where the queue allows, not through io_uring
    (the forked readers inherit the choice)."""
    monkeypatch.setenv(_aio.SLEEP_ENV, "socket")


@pytest.fixture
def pair():
    with (
        BroadcastQueue(1, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=LONG) as reader,
    ):
        yield writer, reader


def _nonce(queue: BroadcastQueue) -> int:
    return queue._reader.nonce


def test_a_sleeping_reader_is_woken_by_the_publishers_datagram(pair) -> None:
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
    sock = reader._aio_sleep[1]
    assert sock is not None and sock.wakes >= 5
    assert writer._writer.cursor.signals >= 5
    assert reader._aio_helper is None  # the direct path, never the helper thread


def test_no_datagram_while_no_reader_sleeps_on_a_socket(pair) -> None:
    writer, reader = pair
    for _ in range(5):
        for n in range(6):
            writer.put(n)
        assert [reader.get(timeout=1) for _ in range(6)] == list(range(6))
    assert writer._writer.cursor.signals == 0
    assert writer._seg.atomics.load32(L.SOCK_SLEEPERS_OFF) == 0


@pytest.mark.parametrize("readers", [1, 3])
def test_no_wake_up_is_lost_across_thousands_of_sleeps(readers: int, monkeypatch) -> None:
    # Sockets for every reader here, whatever the CPUs (the forked readers inherit the limit).
    monkeypatch.setattr(_sockwake, "SOCKET_READERS_MAX", readers)
    results = async_readers_through_sleeps(readers)
    for r in results:
        # A lost wake-up would leave a reader asleep until its 30 s slice ends.
        assert r["longest"] < 5.0, r
        assert r["wakes"] > 0 and not r["helper"], r


def test_closing_the_reader_ends_an_await_at_once(pair) -> None:
    _writer, reader = pair

    async def main() -> None:
        later(0.2, reader.close)
        with pytest.raises(QueueClosed):
            await reader.get_async(timeout=20)

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 5
    assert reader._aio_helper is None
    assert reader._seg.atomics.released  # unmapped once the round let go


def test_closing_from_another_task_of_the_loop(pair) -> None:
    _writer, reader = pair

    async def main() -> None:
        waiting = asyncio.create_task(reader.get_async(timeout=20))
        await asyncio.sleep(0.2)
        reader.close()
        with pytest.raises(QueueClosed):
            await waiting

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 5


def test_the_writers_close_ends_an_await_at_once(pair) -> None:
    writer, reader = pair

    async def main() -> list[Any]:
        later(0.2, writer.close)
        return [message async for message in reader]

    start = time.monotonic()
    assert asyncio.run(main()) == []
    assert time.monotonic() - start < 5


def test_a_cancelled_await_undoes_its_mark(pair) -> None:
    writer, reader = pair

    async def main() -> Any:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.get_async(), 0.2)
        a = writer._seg.atomics
        assert a.load32(L.SOCK_SLEEPERS_OFF) == 0
        assert a.load32(L.PEERS_OFF + L.SLEEPING) == 0
        writer.put("after")
        return await reader.get_async(timeout=5)

    assert asyncio.run(main()) == "after"


def assert_served_by_the_helper(writer: BroadcastQueue, reader: BroadcastQueue) -> None:
    """An await of ``reader`` gets a message put a little later, through the helper thread:
    no wake-up socket for this process."""

    async def main() -> Any:
        later(0.1, writer.put, "through the helper")
        return await reader.get_async(timeout=10)

    assert asyncio.run(main()) == "through the helper"
    assert reader._aio_sleep == (os.getpid(), None)
    assert reader._aio_helper is not None


# -- the writer's pidfd -----------------------------------------------------------------------


def test_a_dead_writer_wakes_the_await_through_its_pidfd() -> None:
    """With a 30 s slice only the writer's pidfd, which the loop watches, can end the await
    in time: QueueBroken once its last message is read."""
    took, sleeper, helper = async_wait_for_a_dead_writer(LONG)
    assert isinstance(sleeper, _sockwake.WakeSocket) and not helper  # on its socket
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


def test_a_squatted_address_falls_back_to_the_helper(pair) -> None:
    writer, reader = pair
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    squatter.bind(address(_nonce(reader), 0, os.getpid()))
    try:
        assert_served_by_the_helper(writer, reader)
    finally:
        squatter.close()


def test_a_queue_with_more_readers_than_spare_cpus_keeps_the_helper() -> None:
    """Readers beyond the spare CPUs would all be run on the writer's core by the datagram's
    wake-up (shmcast._sockwake): such a queue's readers sleep through the helper thread."""
    n = _sockwake.SOCKET_READERS_MAX + 1
    with (
        BroadcastQueue(n, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0, wait=LONG) as reader,
    ):
        assert_served_by_the_helper(writer, reader)
        assert writer._writer.cursor.signals == 0


def test_only_a_writer_in_our_network_namespace_counts() -> None:
    assert same_netns(os.getpid())
    assert not same_netns(2**22 + 1)  # no such process: unreadable counts as "not"


def test_a_forked_child_neither_shares_nor_uses_the_socket(pair) -> None:
    writer, reader = pair

    async def sleep_once() -> Any:
        later(0.05, writer.put, 1)
        return await reader.get_async(timeout=10)

    assert asyncio.run(sleep_once()) == 1
    sock = reader._aio_sleep[1]
    with process_group("fork", timeout=60) as group:
        group.start(inherited_async_reader, reader)
        (result,) = group.results()
    assert result == {"socket_closed": True, "refused": True}
    assert asyncio.run(sleep_once()) == 1  # the parent's socket still works
    assert sock.wakes >= 2 and reader._aio_helper is None


def test_stray_datagrams_are_only_spurious_wake_ups(pair) -> None:
    writer, reader = pair
    stop = threading.Event()

    def spam() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setblocking(False)
        target = address(_nonce(reader), 0, os.getpid())
        try:
            for _ in range(200_000):
                if stop.is_set():
                    return
                try:
                    s.sendto(b"x" * 100, target)
                except OSError:
                    time.sleep(0.0005)
        finally:
            s.close()

    async def main() -> list[Any]:
        spammer = threading.Thread(target=spam, daemon=True)
        later(0.3, writer.put, "real")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.get_async(), 0.05)  # creates the socket
        spammer.start()
        try:
            return [await reader.get_async(timeout=10)]
        finally:
            stop.set()
            spammer.join(10)

    assert asyncio.run(main()) == ["real"]
    assert DRAIN_MAX >= 1


def test_garbage_marks_and_count_cost_the_writer_a_bounded_scan() -> None:
    with (
        BroadcastQueue(2, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
        BroadcastQueue.attach(writer.handle, 1) as other,
    ):
        a = writer._seg.atomics
        a.store32(L.SOCK_SLEEPERS_OFF, 0xFFFFFFFF)
        line1 = L.PEERS_OFF + L.LINE  # reader 1's line: a mark, and garbage in its pid
        own = a.load64(line1 + L.PID)
        a.store32(line1 + L.SLEEPING, L.SLEEP_SOCKET)
        for pid in (0, 2**63, 2**22 + 7, own):
            a.store64(line1 + L.PID, pid)
            a.add64(L.ANNOUNCED_OFF, 1)  # make the next publish wake
            a.add32(L.SLEEPERS_OFF, 1)
            writer.put(pid)
            a.add32(L.SLEEPERS_OFF, 0xFFFFFFFF)
            assert reader.get(timeout=1) == pid
            assert other.get(timeout=1) == pid
        # Only the plausible pid was sent to, and nobody listens there: nothing delivered.
        assert writer._writer.cursor.signals == 0
        a.store32(line1 + L.SLEEPING, 0)
        a.store64(line1 + L.PID, own)
        a.store32(L.SOCK_SLEEPERS_OFF, 0)
