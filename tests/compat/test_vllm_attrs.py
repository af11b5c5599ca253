"""shmcast.compat._vllm_attrs: the drop-in's ``_spin_condition`` (how an end waits, with vLLM's
knobs ``busy_loop_s`` and ``last_read``) and ``buffer`` (the ring's slots as vLLM's flags).

Runs without torch and vLLM.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any
from unittest import mock

import pytest
from _procs import mq_pair

from shmcast import SegmentError, _wait
from shmcast.compat._vllm_attrs import RingFlags, SpinCondition
from shmcast.compat.vllm import MessageQueue

SMALL = {"max_chunk_bytes": 4096, "max_chunks": 4}  # a ring of 4 slots of 4 KiB


class NeverReady:
    """A condition that never comes; records how many looks came before the first sleep."""

    def __init__(self) -> None:
        self.looks = 0
        self.looks_before_sleep: int | None = None
        self.sleeps: list[float] = []

    def ready(self) -> bool:
        self.looks += 1
        return False

    def sleep(self, timeout: float) -> bool:
        self.sleeps.append(timeout)
        if self.looks_before_sleep is None:
            self.looks_before_sleep = self.looks
        time.sleep(min(timeout, 0.001))
        return False

    def tick(self) -> None:
        pass

    def begin_spin(self, limit: int) -> bool:
        return True

    def end_spin(self) -> None:
        pass

    def count_spin(self, delta: int) -> None:
        pass

    def spinning(self) -> int:
        return 0


def looks_before_sleeping(policy: SpinCondition) -> int:
    """Run one wait of ``policy`` that times out; how often it looked before it slept."""
    waiter = NeverReady()
    assert policy.wait(waiter, time.monotonic() + 0.05) is False
    assert waiter.looks_before_sleep is not None
    return waiter.looks_before_sleep


def spinning_policy() -> SpinCondition:
    # A spin budget of 20 ms from the first wait on, whatever the machine's load.
    policy = SpinCondition(min_spin_us=20_000, spin_us=20_000, detect_crowding=False)
    policy.activity()
    return policy


# -- SpinCondition -------------------------------------------------------------------------------


def test_a_busy_end_spins_before_it_sleeps_and_an_idle_one_sleeps_at_once() -> None:
    policy = spinning_policy()
    assert policy.busy(time.monotonic())
    assert looks_before_sleeping(policy) > 1  # it spun
    policy.last_read = 0  # vLLM's way to make a reader idle
    assert not policy.busy(time.monotonic())
    assert looks_before_sleeping(policy) == 1  # the look before the wait, then the futex
    policy.activity()  # a message: busy again
    assert looks_before_sleeping(policy) > 1


def test_busy_loop_s_is_how_long_after_the_last_message_an_end_is_busy() -> None:
    policy = spinning_policy()
    assert policy.busy_loop_s == 1.0  # vLLM's default
    policy.busy_loop_s = 0  # never busy: every wait sleeps at once
    assert looks_before_sleeping(policy) == 1
    policy.busy_loop_s = 0.2
    policy.last_read = time.monotonic() - 0.1
    assert policy.busy(time.monotonic())
    assert not policy.busy(time.monotonic() + 0.2)


def test_a_busy_end_that_finds_every_core_taken_sleeps_until_woken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_wait, "runnable_tasks", lambda: 1000)  # more tasks than any CPUs
    monkeypatch.setattr(_wait, "LOAD", _wait.CpuLoad())
    policy = SpinCondition(min_spin_us=20_000, spin_us=20_000, slice=0.04)
    policy.activity()  # busy: it would spin if a core were free
    assert policy.quantum_us is None
    waiter = NeverReady()
    assert policy.wait(waiter, time.monotonic() + 0.05) is False
    # No spin (the look before the wait, then the futex), and the first sleep is for a whole
    # slice: until woken, not a 200 us piece after which it looks at the load again.
    assert waiter.looks_before_sleep == 1
    assert waiter.sleeps[0] == pytest.approx(0.04)


@pytest.mark.parametrize(
    "name, value, error",
    [
        ("busy_loop_s", -1, ValueError),
        ("busy_loop_s", math.nan, ValueError),
        ("busy_loop_s", "1", TypeError),
        ("busy_loop_s", True, TypeError),
        ("last_read", None, TypeError),
        ("last_read", math.nan, ValueError),
    ],
)
def test_bad_knob_values_are_refused(name: str, value: Any, error: type[Exception]) -> None:
    policy = SpinCondition()
    before = getattr(policy, name)
    with pytest.raises(error, match=name):
        setattr(policy, name, value)
    assert getattr(policy, name) == before


def test_every_message_sets_last_read_and_every_wait_goes_through_the_spin_condition() -> None:
    writer, reader = mq_pair(**SMALL)
    spin = reader._spin_condition
    try:
        assert isinstance(spin, SpinCondition) and isinstance(writer._spin_condition, SpinCondition)
        assert spin is not writer._spin_condition
        spin.last_read = 0
        writer.enqueue("first", timeout=1)
        assert reader.dequeue(timeout=1) == "first"  # published already: no wait at all
        assert time.monotonic() - spin.last_read < 1
        with mock.patch.object(spin, "wait", wraps=spin.wait) as waited:
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout=0.05)
            assert waited.call_count == 1
    finally:
        writer.shutdown()
        reader.shutdown()


def test_an_idle_reader_is_woken_by_the_next_message_and_is_busy_after_it() -> None:
    writer, reader = mq_pair(**SMALL)
    spin = reader._spin_condition
    assert spin is not None
    spin.detect_crowding = False
    later = threading.Timer(0.2, writer.enqueue, args=("wake up",))
    try:
        spin.last_read = 0
        with mock.patch.object(spin, "_spin", wraps=spin._spin) as spun:
            later.start()
            assert reader.dequeue(timeout=5) == "wake up"
            assert not spun.called  # it slept, and the writer woke it
            assert spin.busy(time.monotonic())
            writer.enqueue("soon")
            assert reader.dequeue(timeout=5) == "soon"
        spin.busy_loop_s = 0.05  # the busy time runs out: the next wait sleeps at once
        time.sleep(0.1)
        with mock.patch.object(spin, "_spin", wraps=spin._spin) as spun:
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout=0.05)
            assert not spun.called
    finally:
        later.join(5)
        writer.shutdown()
        reader.shutdown()


def test_no_spin_condition_and_no_buffer_without_a_ring() -> None:
    queue = MessageQueue(0, 0)
    assert queue._spin_condition is None and queue.buffer is None
    queue.shutdown()


# -- RingFlags -----------------------------------------------------------------------------------


def flags(queue: MessageQueue, index: int) -> list[int]:
    assert isinstance(queue.buffer, RingFlags)
    with queue.buffer.get_metadata(index) as raw:
        return list(raw)


def test_the_flags_follow_each_slot_through_writes_and_reads() -> None:
    writer = MessageQueue(2, 2, **SMALL)
    readers = [MessageQueue.create_from_handle(writer.export_handle(), r) for r in (0, 1)]
    try:
        assert writer.buffer is not None
        assert (writer.buffer.n_slots, writer.buffer.metadata_size) == (4, 3)
        assert flags(writer, 0) == [0, 0, 0]  # never written
        writer.enqueue("one", timeout=1)
        assert flags(writer, 0) == [1, 0, 0] and flags(writer, 1) == [0, 0, 0]
        assert readers[0].dequeue(timeout=1) == "one"
        assert flags(writer, 0) == [1, 1, 0] == flags(readers[1], 0)  # any end sees it
        assert readers[1].dequeue(timeout=1) == "one"
        assert flags(writer, 0) == [1, 1, 1]
        for n in range(4):  # slots 1 to 3, then slot 0 again: its flags start over
            writer.enqueue(n, timeout=1)
        assert flags(writer, 0) == [1, 0, 0] and flags(writer, 3) == [1, 0, 0]
        for reader in readers:
            assert [reader.dequeue(timeout=1) for _ in range(4)] == [0, 1, 2, 3]
        assert [flags(writer, i) for i in range(4)] == [[1, 1, 1]] * 4
    finally:
        writer.shutdown()
        for reader in readers:
            reader.shutdown()


def test_a_slot_held_by_acquire_read_is_released_when_the_block_ends_even_raising() -> None:
    writer, reader = mq_pair(max_chunk_bytes=1024 * 1024, max_chunks=1)
    try:
        writer.enqueue({"payload": "first"}, timeout=1)
        with pytest.raises(KeyError), reader.acquire_read(timeout=1) as obj:
            assert obj == {"payload": "first"}
            assert flags(writer, 0) == [1, 0]  # held: not released yet
            raise KeyError("the reader failed")
        assert flags(writer, 0) == [1, 1]
        with writer.acquire_write(timeout=1) as buf:  # and the writer goes on at once
            buf[0] = 7
        with reader.acquire_read(timeout=1) as view:
            assert view[0] == 7
    finally:
        writer.shutdown()
        reader.shutdown()


def test_a_sleeping_reader_in_acquire_read_gets_what_acquire_write_sent() -> None:
    writer, reader = mq_pair(max_chunk_bytes=1024 * 1024, max_chunks=1)
    spin = reader._spin_condition
    assert spin is not None
    spin.last_read = 0
    spin.busy_loop_s = 0  # it sleeps on the futex from the first look
    got: list[int] = []

    def read() -> None:
        with reader.acquire_read(indefinite=True) as buf:
            got.append(buf[0])

    thread = threading.Thread(target=read)
    try:
        thread.start()
        time.sleep(0.2)
        with writer.acquire_write(timeout=1) as buf:
            buf[0] = 123
        thread.join(5)
        assert got == [123] and flags(writer, 0) == [1, 1]
    finally:
        writer.shutdown()
        reader.shutdown()
        thread.join(5)


def test_bad_slot_indices_and_a_gone_segment_are_refused() -> None:
    writer, reader = mq_pair(**SMALL)
    buffer = writer.buffer
    assert buffer is not None
    try:
        with pytest.raises(IndexError, match="slot 4"):
            buffer.flags(4)
        with pytest.raises(IndexError):
            buffer.flags(-1)
        with pytest.raises(TypeError):
            buffer.flags(1.0)  # type: ignore[arg-type]
    finally:
        writer.shutdown()
        reader.shutdown()
    with pytest.raises(SegmentError):
        buffer.flags(0)
