"""BroadcastQueue in one process: readers attached in the same process, or in threads."""

from __future__ import annotations

import json
import logging
import math
import mmap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from _procs import OBJECT, RAW, check_plan, message_payload, plan_digest, send_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmcast._ring
from shmcast import (
    BroadcastQueue,
    FutexWait,
    QueueClosed,
    QueueStats,
    QueueTimeout,
    SerializationError,
)
from shmcast._native import EARLY_WRAP_MIN

SLOTS, SLOT = 4, 64  # a small ring: capacity 256 bytes
CAPACITY = SLOTS * SLOT

MakeQueue = Callable[..., tuple[BroadcastQueue, list[BroadcastQueue]]]


@pytest.fixture
def make_queue() -> Iterator[MakeQueue]:
    """``make_queue(n_readers=1, **options)`` -> (writer, [reader 0, reader 1, ...]), all in
    this process (small ring by default); every endpoint is closed after the test."""
    made: list[BroadcastQueue] = []

    def make(n_readers: int = 1, **options: Any) -> tuple[BroadcastQueue, list[BroadcastQueue]]:
        options.setdefault("n_slots", SLOTS)
        options.setdefault("slot_size", SLOT)
        reader_wait = options.pop("reader_wait", None)
        writer = BroadcastQueue(n_readers, **options)
        made.append(writer)
        readers = []
        for i in range(n_readers):
            readers.append(
                BroadcastQueue.attach(
                    writer.handle, i, wait=reader_wait, serializer=options.get("serializer")
                )
            )
            made.append(readers[-1])
        return writer, readers

    yield make
    for queue in reversed(made):
        queue.close()


class Background:
    """Run a function in a thread; ``result()`` re-raises its exception in the test."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 30.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"background call still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def assert_empty(reader: BroadcastQueue) -> None:
    with pytest.raises(QueueTimeout):
        reader.get(timeout=0)


PLAN_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def plans(largest: int) -> st.SearchStrategy[list[tuple[str, int]]]:
    """1 to 25 messages, raw or objects, of 0 to ``largest`` bytes each."""
    return st.lists(
        st.tuples(st.sampled_from([RAW, OBJECT]), st.integers(0, largest)), min_size=1, max_size=25
    )


def run_plan_with_a_reader_thread(
    plan: list[tuple[str, int]], seed: int, n_slots: int, slot_size: int
) -> None:
    """Send ``plan`` through a fresh one-reader queue of this geometry while a thread reads and
    checks every message; nothing may be left over."""
    with (
        BroadcastQueue(1, n_slots=n_slots, slot_size=slot_size) as w,
        BroadcastQueue.attach(w.handle, 0) as r,
    ):
        check = Background(lambda: check_plan(r, seed, plan, 30, expect_close=False))
        send_plan(w, seed, plan, timeout=30)
        assert check.result(60)["count"] == len(plan)
        assert_empty(r)


# -- put / get --------------------------------------------------------------------------------


def test_put_get_objects_in_order(make_queue: MakeQueue) -> None:
    w, (r0, r1) = make_queue(2, n_slots=16, slot_size=256)
    objects = [None, 1, "two", [3.0], {"four": (4,)}, b"five", {6, 7}]
    for obj in objects:
        w.put(obj, timeout=5)
    for r in (r0, r1):
        assert [r.get(timeout=5) for _ in objects] == objects
        assert_empty(r)


def test_put_bytes_get_bytes(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    cases = [
        (b"hello", b"hello"),
        (bytearray(b"world"), b"world"),
        (memoryview(b"view"), b"view"),
        (np.arange(4, dtype=np.uint16), np.arange(4, dtype=np.uint16).tobytes()),
        (memoryview(b"abcdef")[::2], b"ace"),  # strided bytes are copied in order
        (np.arange(6, dtype=np.uint8).reshape(2, 3), bytes(range(6))),
    ]
    for data, expected in cases:
        w.put_bytes(data, timeout=5)
        assert r.get_bytes(timeout=5) == expected


def test_put_bytes_rejects_what_is_not_a_contiguous_buffer(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    with pytest.raises(TypeError):
        w.put_bytes("text")
    with pytest.raises(TypeError):
        w.put_bytes(12)
    with pytest.raises(TypeError, match="contiguous"):
        w.put_bytes(np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2])
    assert_empty(r)
    w.put_bytes(b"after", timeout=5)
    assert r.get_bytes(timeout=5) == b"after"


def test_get_of_raw_bytes_returns_bytes(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    w.put_bytes(bytearray(b"raw"), timeout=5)
    got = r.get(timeout=5)
    assert type(got) is bytes and got == b"raw"


def test_empty_messages(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    w.put_bytes(b"", timeout=5)
    with w.reserve(0, timeout=5) as region:
        assert len(region) == 0
    w.put(None, timeout=5)
    w.put(b"", timeout=5)
    assert r.get_bytes(timeout=5) == b""
    assert r.get(timeout=5) == b""
    assert r.get(timeout=5) is None
    assert r.get(timeout=5) == b""
    assert_empty(r)


@pytest.mark.parametrize("size", [1, SLOT - 1, SLOT, SLOT + 1, CAPACITY - 1, CAPACITY])
def test_contiguous_sizes_around_slot_boundaries(make_queue: MakeQueue, size: int) -> None:
    w, (r,) = make_queue()
    for number in range(3 * SLOTS):  # every start position in the ring, padding included
        w.put_bytes(message_payload(1, number, size), timeout=5)
        assert r.get_bytes(timeout=5) == message_payload(1, number, size)


def test_messages_wrap_around_the_ring_with_padding(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    # Whole-ring messages at the start, and messages that need a padding run first.
    sizes = [SLOT, 3 * SLOT, 4 * SLOT, 2 * SLOT, 1, 3 * SLOT, SLOT + 1, 2 * SLOT, 4 * SLOT]
    for number, size in enumerate(sizes):
        w.put_bytes(message_payload(2, number, size), timeout=5)
        assert r.get_bytes(timeout=5) == message_payload(2, number, size)
    assert w.stats().sequence == sum(-(-s // SLOT) for s in sizes) + 2  # two padding runs
    assert r.stats().sequence == w.stats().sequence  # padding consumed too


# Early wrap: large messages go back to the start of the ring once a lap passes the hot region
# (HOT_BYTES, made two 64 KiB slots here), if the readers have freed the room there.
BIG = 64 * 1024  # slot size of these tests, and the smallest message that wraps early
HOT_SLOTS = 2


@pytest.fixture
def small_hot_region(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EARLY_WRAP_MIN == BIG
    monkeypatch.setattr(shmcast._ring, "HOT_BYTES", HOT_SLOTS * BIG)


def test_large_messages_wrap_early_while_the_readers_keep_up(
    make_queue: MakeQueue, small_hot_region: None
) -> None:
    w, (r,) = make_queue(n_slots=8, slot_size=BIG)
    sequences = []
    for number in range(6):
        if number % 2:
            with w.reserve(BIG, timeout=5) as region:  # reserve takes the same decision
                region[:] = message_payload(3, number, BIG)
        else:
            w.put_bytes(message_payload(3, number, BIG), timeout=5)
        sequences.append(w.stats().sequence)
        assert r.get_bytes(timeout=5) == message_payload(3, number, BIG)
    # Slots 0 and 1, then the third message goes back to slot 0 of the next lap (behind six
    # slots of padding), and so on: the ring's first two slots (and one more) do all the work.
    assert sequences == [1, 2, 9, 10, 17, 18]
    assert r.stats().sequence == w.stats().sequence  # the padding was consumed too


def test_large_messages_go_on_in_the_lap_while_a_reader_lags(
    make_queue: MakeQueue, small_hot_region: None
) -> None:
    w, (r,) = make_queue(n_slots=8, slot_size=BIG)
    for number in range(5):  # nobody reads: no room at the start, so no padding
        w.put_bytes(message_payload(4, number, BIG), timeout=5)
    assert w.stats().sequence == 5
    for number in range(5):
        assert r.get_bytes(timeout=5) == message_payload(4, number, BIG)
    w.put_bytes(message_payload(4, 5, BIG), timeout=5)  # caught up: looked at again, wraps
    assert w.stats().sequence == 9
    assert r.get_bytes(timeout=5) == message_payload(4, 5, BIG)


def test_small_messages_never_wrap_early(make_queue: MakeQueue, small_hot_region: None) -> None:
    w, (r,) = make_queue(n_slots=8, slot_size=BIG)
    for number in range(20):
        w.put_bytes(message_payload(5, number, BIG - 1), timeout=5)
        assert r.get_bytes(timeout=5) == message_payload(5, number, BIG - 1)
    assert w.stats().sequence == 20


@PLAN_SETTINGS
@given(plans(largest=10 * BIG), st.integers(0, 2**32))
def test_any_sizes_with_early_wraps_and_a_reader_thread(
    small_hot_region: None, plan: list[tuple[str, int]], seed: int
) -> None:
    run_plan_with_a_reader_thread(plan, seed, n_slots=8, slot_size=BIG)


def test_readers_in_threads_receive_everything(make_queue: MakeQueue) -> None:
    w, readers = make_queue(3, n_slots=8, slot_size=128)
    plan = [(RAW if i % 3 else OBJECT, (i * 37) % 1500) for i in range(120)]
    checks = [
        Background(lambda r=r: check_plan(r, 9, plan, 30, expect_close=True)) for r in readers
    ]
    send_plan(w, 9, plan, timeout=30)
    w.close()
    for check in checks:
        assert check.result(60)["digest"] == plan_digest(plan)


@PLAN_SETTINGS
@given(plans(largest=3 * CAPACITY), st.integers(0, 2**32))
def test_any_sizes_with_a_reader_thread(plan: list[tuple[str, int]], seed: int) -> None:
    run_plan_with_a_reader_thread(plan, seed, n_slots=SLOTS, slot_size=SLOT)


# -- zero copy: reserve and view --------------------------------------------------------------


def test_reserve_fills_the_ring_in_place(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    with w.reserve(10, timeout=5) as region:
        assert isinstance(region, memoryview) and not region.readonly
        assert len(region) == 10
        assert isinstance(region.obj, mmap.mmap)  # a window on the shared mapping itself
        region[:] = b"0123456789"
        np.frombuffer(region, dtype=np.uint8)[:2] = [65, 66]  # arrays may be built on it
    with pytest.raises(ValueError):
        region[0]  # released when the block exits
    assert r.get_bytes(timeout=5) == b"AB23456789"


def test_reserve_block_that_raises_publishes_nothing(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    sequence = w.stats().sequence

    class Abandon(Exception):
        pass

    with pytest.raises(Abandon), w.reserve(CAPACITY, timeout=5) as region:
        region[:5] = b"never"
        raise Abandon
    assert_empty(r)
    assert w.stats().sequence == sequence
    assert w.stats().messages == 0
    w.put_bytes(b"next", timeout=5)
    assert r.get_bytes(timeout=5) == b"next"
    assert_empty(r)


def test_view_of_raw_message_is_read_only_and_in_the_ring(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    w.put_bytes(b"zero-copy", timeout=5)
    ring = np.frombuffer(r._seg.buf, dtype=np.uint8)
    with r.view(timeout=5) as data:
        assert isinstance(data, memoryview)
        assert data.readonly
        assert bytes(data) == b"zero-copy"
        assert np.shares_memory(np.frombuffer(data, dtype=np.uint8), ring)
        with pytest.raises(TypeError):
            data[0] = 0
    del ring


def test_view_of_object_yields_arrays_aliasing_the_ring(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue(n_slots=8, slot_size=1024)
    sent = {"a": np.arange(100, dtype=np.float64), "b": np.ones((4, 5), dtype=np.int32, order="F")}
    w.put(sent, timeout=5)
    w.put(sent, timeout=5)
    ring = np.frombuffer(r._seg.buf, dtype=np.uint8)
    with r.view(timeout=5) as value:
        for key, array in sent.items():
            np.testing.assert_array_equal(value[key], array)
            assert value[key].dtype == array.dtype
            assert np.shares_memory(value[key], ring)
        assert value["b"].flags.f_contiguous
        del value
    copied = r.get(timeout=5)  # get() copies out of the ring
    for key, array in sent.items():
        np.testing.assert_array_equal(copied[key], array)
        assert not np.shares_memory(copied[key], ring)
    del ring


def _fill_two_slot_ring(make_queue: MakeQueue) -> tuple[BroadcastQueue, BroadcastQueue]:
    w, (r,) = make_queue(n_slots=2, slot_size=SLOT)
    w.put_bytes(b"first", timeout=5)
    w.put_bytes(b"second", timeout=5)
    with pytest.raises(QueueTimeout):
        w.put_bytes(b"third", timeout=0)  # full
    return w, r


def test_view_holds_the_slot_until_the_block_exits(make_queue: MakeQueue) -> None:
    w, r = _fill_two_slot_ring(make_queue)
    with r.view(timeout=5) as data:
        assert bytes(data) == b"first"
        with pytest.raises(QueueTimeout):
            w.put_bytes(b"third", timeout=0)  # the slot is still in use
    w.put_bytes(b"third", timeout=0)  # released on exit: the writer reuses it at once
    assert r.get_bytes(timeout=5) == b"second"
    assert r.get_bytes(timeout=5) == b"third"


def test_view_releases_the_slot_when_the_block_raises(make_queue: MakeQueue) -> None:
    w, r = _fill_two_slot_ring(make_queue)

    class Failure(Exception):
        pass

    with pytest.raises(Failure), r.view(timeout=5) as data:
        assert bytes(data) == b"first"
        raise Failure
    w.put_bytes(b"third", timeout=0)
    # The message seen in the failed block counts as taken; nothing is lost or repeated.
    assert r.get_bytes(timeout=5) == b"second"
    assert r.get_bytes(timeout=5) == b"third"
    assert_empty(r)


def test_view_of_a_streamed_message(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    big = message_payload(3, 0, 5 * CAPACITY + 7)
    sender = Background(lambda: w.put_bytes(big, timeout=30))
    with r.view(timeout=30) as data:
        assert bytes(data) == big
    sender.result()


def test_calls_inside_a_view_or_reserve_block_are_refused(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    w.put_bytes(b"x", timeout=5)
    w.put_bytes(b"y", timeout=5)
    with r.view(timeout=5), pytest.raises(RuntimeError, match="already in use"):
        r.get(timeout=0)
    with w.reserve(1, timeout=5) as region:
        region[:] = b"z"
        with pytest.raises(RuntimeError, match="already in use"):
            w.put_bytes(b"nested", timeout=0)
    assert [r.get_bytes(timeout=5) for _ in range(2)] == [b"y", b"z"]
    assert_empty(r)


def test_concurrent_calls_on_one_endpoint_are_refused(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    waiting = Background(lambda: r.get(timeout=5))
    deadline = time.monotonic() + 5
    while not r._guard.busy:  # until the thread holds the endpoint
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(RuntimeError, match="already in use"):
        r.get(timeout=0)
    w.put("for the thread", timeout=5)
    assert waiting.result() == "for the thread"


# -- timeouts ---------------------------------------------------------------------------------


def test_get_on_empty_queue_times_out(make_queue: MakeQueue) -> None:
    _w, (r,) = make_queue()
    for call in (r.get, r.get_bytes):
        started = time.monotonic()
        with pytest.raises(QueueTimeout, match=r"timed out after 0\.2 s") as info:
            call(timeout=0.2)
        elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError)
        assert 0.2 <= elapsed < 5.0
    with pytest.raises(TimeoutError), r.view(timeout=0.1):
        pass


def test_timeout_zero_does_not_block(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    started = time.monotonic()
    with pytest.raises(QueueTimeout):
        r.get(timeout=0)
    assert time.monotonic() - started < 1.0
    w.put("ready", timeout=0)
    assert r.get(timeout=0) == "ready"


def test_put_on_full_ring_times_out_and_changes_nothing(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    sent = [message_payload(4, i, SLOT) for i in range(SLOTS)]
    for message in sent:
        w.put_bytes(message, timeout=5)
    before = w.stats()
    for attempt in (
        lambda: w.put("object", timeout=0.1),
        lambda: w.put_bytes(b"raw", timeout=0.1),
        lambda: w.put_bytes(b"zero", timeout=0),
        lambda: w.reserve(8, timeout=0.1).__enter__(),
    ):
        started = time.monotonic()
        with pytest.raises(QueueTimeout, match="put timed out"):
            attempt()
        assert time.monotonic() - started < 5.0
    assert w.stats().sequence == before.sequence
    assert w.stats().messages == before.messages
    assert [r.get_bytes(timeout=5) for _ in sent] == sent
    assert_empty(r)
    w.put_bytes(b"works again", timeout=0)
    assert r.get_bytes(timeout=5) == b"works again"


def test_streamed_put_that_times_out_delivers_nothing(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    w.put_bytes(b"before", timeout=5)
    with pytest.raises(QueueTimeout):
        w.put_bytes(message_payload(5, 1, 3 * CAPACITY), timeout=0.2)  # ring fills half-way
    assert r.get_bytes(timeout=5) == b"before"
    with pytest.raises(QueueTimeout):
        r.get(timeout=0.1)  # takes the abandoned part out of the ring, delivers nothing
    w.put_bytes(b"after", timeout=5)
    assert r.get_bytes(timeout=5) == b"after"
    assert_empty(r)


@pytest.mark.timeout(60)
def test_streamed_message_survives_a_get_timeout_in_the_middle(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    big = message_payload(6, 0, 8 * CAPACITY + 3)
    sender = Background(lambda: w.put_bytes(big, timeout=30))
    timeouts_mid_message = 0
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline
        try:
            got = r.get(timeout=0)
            break
        except QueueTimeout:
            if r.stats().sequence > 0:  # slots of the message were already taken out
                timeouts_mid_message += 1
            time.sleep(0.001)
    sender.result()
    assert got == big
    assert timeouts_mid_message > 0
    assert r.stats().messages == 1


@pytest.mark.parametrize("bad", [-1, -0.001, "1", math.nan, True, [1]])
def test_bad_timeouts_are_rejected_and_send_nothing(make_queue: MakeQueue, bad: Any) -> None:
    w, (r,) = make_queue()
    error = (
        ValueError
        if isinstance(bad, (int, float)) and not isinstance(bad, bool) and bad < 0
        else TypeError
    )
    with pytest.raises(error, match="timeout"):
        w.put("x", timeout=bad)
    with pytest.raises(error, match="timeout"):
        w.put_bytes(b"x", timeout=bad)
    with pytest.raises(error, match="timeout"), w.reserve(1, timeout=bad):
        pass
    with pytest.raises(error, match="timeout"):
        w.wait_until_ready(timeout=bad)
    assert_empty(r)
    w.put("ok", timeout=5)
    for call in (r.get, r.get_bytes, r.wait_until_ready):
        with pytest.raises(error, match="timeout"):
            call(timeout=bad)
    with pytest.raises(error, match="timeout"), r.view(timeout=bad):
        pass
    assert r.get(timeout=5) == "ok"


def test_no_timeout_waits_until_a_message_comes(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    getter = Background(lambda: r.get())
    time.sleep(0.2)
    assert getter.running
    w.put("late", timeout=5)
    assert getter.result() == "late"


# -- stats, repr, lifecycle -------------------------------------------------------------------


def test_stats(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue(wait="futex")
    assert w.stats() == QueueStats("writer", None, 0, 0, 0, "futex")
    assert r.stats() == QueueStats("reader", 0, 0, 0, 0, "futex")
    w.put_bytes(b"a" * (2 * SLOT), timeout=5)  # two slots
    w.put("b", timeout=5)
    assert r.get_bytes(timeout=5) == b"a" * (2 * SLOT)
    assert w.stats().messages == 2
    assert w.stats().sequence == 3
    assert r.stats().messages == 1 and r.stats().sequence == 2
    with pytest.raises(QueueTimeout):
        w.put_bytes(b"c" * (3 * SLOT), timeout=0.05)  # had to wait
    assert w.stats().waits == 1
    r.get(timeout=5)
    with pytest.raises(QueueTimeout):
        r.get(timeout=0.05)
    assert r.stats().waits == 1
    with pytest.raises(AttributeError):
        r.stats().messages = 5  # a frozen snapshot


def test_repr_and_properties(make_queue: MakeQueue) -> None:
    w, (r0, r1) = make_queue(2, n_slots=8, slot_size=128, wait="backoff")
    assert repr(w) == (
        f"<BroadcastQueue writer name={w.name!r} readers=2 slots=8x128 wait='backoff' open>"
    )
    assert repr(r1).startswith(f"<BroadcastQueue reader 1 name={w.name!r} readers=2")
    assert (w.is_writer, r0.is_writer) == (True, False)
    assert (w.reader, r0.reader, r1.reader) == (None, 0, 1)
    assert w.n_readers == r1.n_readers == 2
    assert (w.n_slots, w.slot_size, w.capacity) == (8, 128, 1024)
    assert r0.capacity == 1024
    assert w.name == w.handle.name == r0.name
    assert w.handle == r1.handle
    r1.close()
    assert repr(r1).endswith(" closed>") and r1.closed


def test_context_manager_closes(make_queue: MakeQueue) -> None:
    with BroadcastQueue(1, n_slots=4, slot_size=64) as w:
        with BroadcastQueue.attach(w.handle, 0) as r:
            w.put(1)
            assert r.get(timeout=5) == 1
        assert r.closed
        assert not w.closed
    assert w.closed
    with pytest.raises(QueueClosed):
        w.put(2)


def test_close_is_idempotent(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    r.close()
    r.close()
    w.close()
    w.close()
    assert w.closed and r.closed


def test_readers_drain_everything_after_the_writer_closed(make_queue: MakeQueue) -> None:
    w, (r0, r1) = make_queue(2, n_slots=8, slot_size=64)
    w.put("one", timeout=5)
    w.put_bytes(b"two", timeout=5)
    w.put(np.arange(3), timeout=5)
    w.close()
    for r in (r0, r1):
        assert r.get(timeout=5) == "one"
        assert r.get_bytes(timeout=5) == b"two"
        np.testing.assert_array_equal(r.get(timeout=5), np.arange(3))
        for call in (r.get, r.get_bytes):
            started = time.monotonic()
            with pytest.raises(QueueClosed, match="everything it sent was read"):
                call(timeout=10)
            assert time.monotonic() - started < 5.0
        with pytest.raises(QueueClosed), r.view(timeout=10):
            pass


def test_a_blocked_get_returns_when_the_writer_closes(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue()
    getter = Background(lambda: r.get(timeout=30))
    time.sleep(0.1)
    w.close()
    with pytest.raises(QueueClosed):
        getter.result(10)


WAIT_POLICIES = ["futex", "spin", "backoff", "idle"]


@pytest.mark.parametrize("wait", WAIT_POLICIES)
def test_close_from_another_thread_ends_a_blocked_get(make_queue: MakeQueue, wait: str) -> None:
    """close() may come from another thread while a get waits: the get raises QueueClosed
    (whatever the waiting thread was doing at that moment)."""
    _w, (r,) = make_queue(reader_wait=wait)
    getter = Background(lambda: r.get(timeout=30))
    time.sleep(0.1)
    r.close()
    with pytest.raises(QueueClosed):
        getter.result(10)


@pytest.mark.parametrize("wait", WAIT_POLICIES)
def test_close_from_another_thread_ends_a_blocked_put(make_queue: MakeQueue, wait: str) -> None:
    w, (r,) = make_queue(wait=wait)
    for i in range(SLOTS):
        w.put_bytes(bytes([i]), timeout=5)
    putter = Background(lambda: w.put_bytes(b"blocked", timeout=30))
    time.sleep(0.1)
    w.close()
    with pytest.raises(QueueClosed):
        putter.result(10)
    assert [r.get_bytes(timeout=5) for _ in range(SLOTS)] == [bytes([i]) for i in range(SLOTS)]
    with pytest.raises(QueueClosed):
        r.get(timeout=5)


def test_detached_reader_does_not_hold_the_writer_back(make_queue: MakeQueue) -> None:
    w, (r0, r1) = make_queue(2)
    r1.close()
    for i in range(3 * SLOTS):
        w.put_bytes(bytes([i]), timeout=0)
        assert r0.get_bytes(timeout=5) == bytes([i])


def test_reattached_index_starts_at_the_writer_position(make_queue: MakeQueue) -> None:
    w, (r0, r1) = make_queue(2)
    w.put("old", timeout=5)
    assert r0.get(timeout=5) == "old"
    r1.close()  # leaves without reading "old"
    w.put("while away", timeout=5)
    assert r0.get(timeout=5) == "while away"
    with BroadcastQueue.attach(w.handle, 1) as again:
        assert_empty(again)  # nothing published before it came back
        w.put("new", timeout=5)
        assert again.get(timeout=5) == "new"
        assert r0.get(timeout=5) == "new"


def test_writer_waits_for_readers_that_have_not_attached(make_queue: MakeQueue) -> None:
    w = BroadcastQueue(2, n_slots=SLOTS, slot_size=SLOT)
    try:
        with BroadcastQueue.attach(w.handle, 0) as r0:
            for i in range(SLOTS):
                w.put_bytes(bytes([i]), timeout=0)
                assert r0.get_bytes(timeout=5) == bytes([i])
            with pytest.raises(QueueTimeout):
                w.put_bytes(b"x", timeout=0.05)  # reader 1 has read nothing yet
            with BroadcastQueue.attach(w.handle, 1) as r1:
                assert [r1.get_bytes(timeout=5) for _ in range(SLOTS)] == [
                    bytes([i]) for i in range(SLOTS)
                ]  # a fresh index starts at the first message
                w.put_bytes(b"x", timeout=0)
    finally:
        w.close()


def test_wait_until_ready(make_queue: MakeQueue) -> None:
    w = BroadcastQueue(3, n_slots=SLOTS, slot_size=SLOT)
    attached = []
    try:
        attached.append(BroadcastQueue.attach(w.handle, 0))
        attached.append(BroadcastQueue.attach(w.handle, 2))
        started = time.monotonic()
        with pytest.raises(QueueTimeout, match=r"not attached yet: \[1\]"):
            w.wait_until_ready(timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 5.0
        with pytest.raises(QueueTimeout, match=r"\[1\]"):
            attached[0].wait_until_ready(timeout=0)  # readers may wait too
        waiter = Background(lambda: w.wait_until_ready(timeout=30))
        time.sleep(0.1)
        assert waiter.running
        attached.append(BroadcastQueue.attach(w.handle, 1))
        waiter.result(10)
        w.wait_until_ready(timeout=0)
        attached[1].wait_until_ready()
        attached[0].close()  # a reader that left does not make the queue unready
        w.wait_until_ready(timeout=0)
    finally:
        for q in attached:
            q.close()
        w.close()


# -- serializers and logging ------------------------------------------------------------------


class JsonSerializer:
    """A custom serializer: JSON text, sent in three parts."""

    def dumps(self, obj: Any) -> Sequence[bytes]:
        text = json.dumps(obj).encode()
        return [b"J", text[: len(text) // 2], text[len(text) // 2 :]]

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        raw = bytes(data)
        assert raw[:1] == b"J"
        return json.loads(raw[1:])


def test_custom_serializer(make_queue: MakeQueue) -> None:
    w, (r,) = make_queue(serializer=JsonSerializer())
    values = [{"a": [1, 2, 3]}, "text", 4.5, None, {"big": "x" * (3 * CAPACITY)}]
    sender = Background(lambda: [w.put(v, timeout=30) for v in values])
    assert [r.get(timeout=30) for _ in values] == values
    sender.result()
    w.put_bytes(b"raw still works", timeout=5)
    assert r.get(timeout=5) == b"raw still works"


def test_long_waits_are_logged(make_queue: MakeQueue, caplog: pytest.LogCaptureFixture) -> None:
    policy = FutexWait(warn_after=0.2, slice=0.05)
    w, (r,) = make_queue(wait=policy, reader_wait=policy)
    caplog.set_level(logging.INFO, logger="shmcast")
    with pytest.raises(QueueTimeout):
        r.get(timeout=0.5)
    assert any(
        rec.levelno == logging.INFO
        and "get on" in rec.getMessage()
        and "waited" in rec.getMessage()
        for rec in caplog.records
    ), [rec.getMessage() for rec in caplog.records]
    caplog.clear()
    for i in range(SLOTS):
        w.put_bytes(bytes([i]), timeout=5)
    with pytest.raises(QueueTimeout):
        w.put_bytes(b"full", timeout=0.5)
    messages = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any("put on" in m and "reader 0" in m and "behind" in m for m in messages), messages


# -- batches: put_many / get_many -----------------------------------------------------------


class _FailsToLoad:
    """Pickles fine; unpickling raises (to test a decoding error inside a batch)."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse() -> None:
    raise RuntimeError("refused to unpickle")


def test_put_many_and_get_many_keep_order_across_sizes(make_queue: MakeQueue) -> None:
    writer, (reader,) = make_queue(n_slots=8, slot_size=64)
    messages = [bytes([i % 251]) * (i * 37 % 700) for i in range(60)]  # 0 .. beyond capacity
    got: list[Any] = []

    def consume() -> None:
        while len(got) < len(messages):
            got.extend(reader.get_many(7, timeout=5))

    consumer = threading.Thread(target=consume)
    consumer.start()
    for start in range(0, len(messages), 9):
        writer.put_many(messages[start : start + 9], timeout=5)
    consumer.join(10)
    assert not consumer.is_alive()
    assert got == messages
    assert writer.stats().messages == reader.stats().messages == len(messages)


def test_get_many_takes_what_is_there_and_no_more_than_asked(make_queue: MakeQueue) -> None:
    writer, (reader,) = make_queue(n_slots=8, slot_size=64)
    writer.put_many(range(5))
    assert reader.get_many(3, timeout=0) == [0, 1, 2]
    assert reader.get_many(10, timeout=0) == [3, 4]
    with pytest.raises(QueueTimeout):
        reader.get_many(10, timeout=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            reader.get_many(bad)


def test_put_many_timeout_reports_how_many_were_sent(make_queue: MakeQueue) -> None:
    writer, (reader,) = make_queue()  # 4 slots of 64 bytes, nobody reading
    with pytest.raises(QueueTimeout) as caught:
        writer.put_many([b"y" * 40] * 10, timeout=0.2)
    sent = caught.value.sent
    assert 0 < sent < 10
    assert reader.get_many(20, timeout=0) == [b"y" * 40] * sent  # exactly those, published


def test_get_many_raises_a_decoding_error_on_the_next_call_in_order(
    make_queue: MakeQueue,
) -> None:
    writer, (reader,) = make_queue(n_slots=8, slot_size=64)
    writer.put_many(["first", _FailsToLoad(), "third"])
    assert reader.get_many(10, timeout=0) == ["first"]
    with pytest.raises(SerializationError, match="refused to unpickle"):
        reader.get(timeout=0)
    assert reader.get(timeout=0) == "third"


def test_get_many_after_the_writer_closed_delivers_then_raises(make_queue: MakeQueue) -> None:
    writer, (reader,) = make_queue(n_slots=8, slot_size=64)
    writer.put_many(["a", "b"])
    writer.close()
    assert reader.get_many(10, timeout=1) == ["a", "b"]
    with pytest.raises(QueueClosed):
        reader.get_many(10, timeout=1)
