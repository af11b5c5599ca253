"""The asyncio reader's wake-up socket (shmcast._sockwake, docs/protocol.md "P3 on a socket"),
what only it has: no datagram while nobody sleeps so, a cancelled await undoes its mark, a
squatted address, another network namespace or more readers than spare CPUs fall back to the
helper, and hostile datagrams or garbage in the marks only cost spurious wake-ups and bounded
scans.  What it shares with the io_uring wait is in test_loop_sleepers.py."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import pytest
from _procs import LONG_SLICES, assert_served_by_the_helper, later

from shmcast import (
    BroadcastQueue,
    _aio,
    _sockwake,
)
from shmcast import _layout as L
from shmcast._sockwake import DRAIN_MAX, address, same_netns

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def socket_sleep(monkeypatch):
    """Every await here sleeps on its socket where the queue allows, not through io_uring
    (the forked readers inherit the choice)."""
    monkeypatch.setenv(_aio.SLEEP_ENV, "socket")


def _nonce(queue: BroadcastQueue) -> int:
    return queue._reader.nonce


def test_no_datagram_while_no_reader_sleeps_on_a_socket(long_slice_pair) -> None:
    writer, reader = long_slice_pair
    for _ in range(5):
        for n in range(6):
            writer.put(n)
        assert [reader.get(timeout=1) for _ in range(6)] == list(range(6))
    assert writer._writer.cursor.signals == 0
    assert writer._seg.atomics.load32(L.SOCK_SLEEPERS_OFF) == 0


def test_a_cancelled_await_undoes_its_mark(long_slice_pair) -> None:
    writer, reader = long_slice_pair

    async def main() -> Any:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.get_async(), 0.2)
        a = writer._seg.atomics
        assert a.load32(L.SOCK_SLEEPERS_OFF) == 0
        assert a.load32(L.PEERS_OFF + L.SLEEPING) == 0
        writer.put("after")
        return await reader.get_async(timeout=5)

    assert asyncio.run(main()) == "after"


def test_a_squatted_address_falls_back_to_the_helper(long_slice_pair) -> None:
    writer, reader = long_slice_pair
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
        BroadcastQueue.attach(writer.handle, 0, wait=LONG_SLICES) as reader,
    ):
        assert_served_by_the_helper(writer, reader)
        assert writer._writer.cursor.signals == 0


def test_only_a_writer_in_our_network_namespace_counts() -> None:
    assert same_netns(os.getpid())
    assert not same_netns(2**22 + 1)  # no such process: unreadable counts as "not"


def test_stray_datagrams_are_only_spurious_wake_ups(long_slice_pair) -> None:
    writer, reader = long_slice_pair
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
