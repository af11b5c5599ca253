"""BroadcastQueue across processes: ordering and integrity for every reader, many readers on
an oversubscribed machine under every wait policy, every start method, numpy arrays, and
backpressure.  Every reader process checks every message (number and content) itself."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import numpy as np
import pytest
from _procs import (
    OBJECT,
    RAW,
    START_METHODS,
    message_payload,
    plan_digest,
    process_group,
    reader_arrays,
    reader_check_plan,
    reader_check_plan_after_go,
    send_plan,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmcast import (
    BackoffWait,
    BroadcastQueue,
    FutexWait,
    IdleWait,
    PickleSerializer,
    QueueTimeout,
    SpinWait,
)

N_SLOTS, SLOT_SIZE = 8, 128  # capacity 1 KiB: small enough that sizes span many slots
CAPACITY = N_SLOTS * SLOT_SIZE


def random_plan(seed: int, count: int, max_size: int) -> list[tuple[str, int]]:
    """A reproducible mix of raw and object messages of sizes 0..max_size, with the sizes
    around slot and ring boundaries over-represented."""
    rng = random.Random(seed)
    edges = [0, 1, SLOT_SIZE - 1, SLOT_SIZE, SLOT_SIZE + 1, CAPACITY - 1, CAPACITY, CAPACITY + 1]
    plan = []
    for _ in range(count):
        size = rng.choice(edges) if rng.random() < 0.25 else rng.randint(0, max_size)
        plan.append((rng.choice([RAW, OBJECT]), min(size, max_size)))
    return plan


def broadcast_and_check(
    plan: list[tuple[str, int]],
    seed: int,
    n_readers: int,
    method: str = "fork",
    wait: Any = None,
    n_slots: int = N_SLOTS,
    slot_size: int = SLOT_SIZE,
    wait_for_readers: bool = True,
    timeout: float = 90.0,
) -> list[dict[str, Any]]:
    """Start ``n_readers`` reader processes that each check ``plan``; send it (after they all
    attached, or at once); close; return the readers' summaries (every one has checked every
    message and then got QueueClosed)."""
    with (
        BroadcastQueue(n_readers, n_slots=n_slots, slot_size=slot_size, wait=wait) as writer,
        process_group(method, timeout=timeout) as group,
    ):
        for i in range(n_readers):
            group.start(reader_check_plan, writer.handle, i, seed, plan, wait, timeout)
        if wait_for_readers:
            writer.wait_until_ready(timeout=timeout)
        # Otherwise the first messages go out before the readers attach: a reader index that
        # has not attached yet holds the writer back like a slow reader, and starts reading at
        # the first message.
        send_plan(writer, seed, plan, timeout=timeout)
        writer.wait_until_ready(timeout=timeout)  # closing removes the segment's name
        writer.close()
        results = group.results()
    digest = plan_digest(plan)
    for i, result in enumerate(results):
        assert result["count"] == len(plan)
        assert result["digest"] == digest
        assert result["stats"].index == i
        assert result["stats"].messages == len(plan)
    return results


sizes = st.one_of(
    st.sampled_from([0, 1, SLOT_SIZE - 1, SLOT_SIZE, SLOT_SIZE + 1, CAPACITY, CAPACITY + 1]),
    st.integers(0, 4 * CAPACITY),
)


@pytest.mark.timeout(240)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    plan=st.lists(st.tuples(st.sampled_from([RAW, OBJECT]), sizes), min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
    n_readers=st.integers(1, 3),
    wait_for_readers=st.booleans(),
)
def test_every_reader_gets_every_message_in_order(
    plan: list[tuple[str, int]], seed: int, n_readers: int, wait_for_readers: bool
) -> None:
    broadcast_and_check(plan, seed, n_readers, wait_for_readers=wait_for_readers, timeout=60)


POLICIES = {
    "futex": FutexWait(),
    "spin": SpinWait(),
    "backoff": BackoffWait(),
    "idle": IdleWait(busy_period=0.01, sleep=0.02),  # short busy period: it does go idle
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_twelve_readers_on_two_cores_under_each_wait_policy(policy: str) -> None:
    plan = random_plan(seed=12, count=300, max_size=3 * 2048)
    results = broadcast_and_check(
        plan, 12, n_readers=12, wait=POLICIES[policy], n_slots=16, slot_size=256, timeout=150
    )
    assert all(result["stats"].wait_policy == policy for result in results)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", START_METHODS)
def test_every_start_method(method: str) -> None:
    plan = random_plan(seed=3, count=150, max_size=3 * CAPACITY)
    broadcast_and_check(plan, 3, n_readers=3, method=method, timeout=120)


def frame_size(value: Any) -> int:
    """Bytes of the message ``put(value)`` sends with the default serializer."""
    return sum(memoryview(part).nbytes for part in PickleSerializer().dumps(value))


def _arrays() -> list[Any]:
    rng = np.random.default_rng(5)
    return [
        np.arange(10, dtype=np.int64),
        rng.standard_normal((7, 9)),  # C order
        np.asfortranarray(rng.standard_normal((6, 5)).astype(np.float32)),  # Fortran order
        np.asfortranarray(rng.integers(0, 255, (3, 4, 5), dtype=np.uint8)),
        np.array(3.5),  # 0-d
        np.zeros((0, 4), dtype=np.int16),  # empty
        rng.integers(-5, 5, 40).astype(">i4"),  # big-endian
        np.array([True, False, True]),
        (rng.standard_normal(16) + 1j * rng.standard_normal(16)).astype(np.complex64),
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        np.arange(3 * CAPACITY, dtype=np.float64).reshape(-1, 8),  # larger than the ring
        (np.arange(5), np.asfortranarray(np.ones((2, 3)))),  # several arrays in one message
        np.arange(100).reshape(10, 10)[::2, ::3],  # not contiguous: sent in-band
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("zero_copy", [False, True], ids=["get", "view"])
def test_numpy_arrays_arrive_intact(zero_copy: bool) -> None:
    arrays = _arrays()
    with (
        BroadcastQueue(1, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as writer,
        process_group("forkserver", timeout=90) as group,
    ):
        child = group.start(reader_arrays, writer.handle, 0, len(arrays), zero_copy)
        writer.wait_until_ready(timeout=60)
        for value in arrays:
            writer.put(value, timeout=60)
        received = group.result(child)
    for value, described in zip(arrays, received, strict=True):
        sent = value if isinstance(value, tuple) else (value,)
        # Out-of-band buffers of a message that fits in the ring are viewed in place.
        in_place = frame_size(value) <= CAPACITY
        for array, got in zip(sent, described, strict=True):
            assert got["dtype"] == array.dtype.str
            assert got["shape"] == array.shape
            np.testing.assert_array_equal(got["values"], array)
            if array.flags.f_contiguous and not array.flags.c_contiguous:
                assert got["f_contiguous"] and not got["c_contiguous"]
            elif array.flags.c_contiguous and array.ndim > 1 and array.size > 1:
                assert got["c_contiguous"]
            contiguous = array.flags.c_contiguous or array.flags.f_contiguous
            if zero_copy and in_place and contiguous and array.nbytes:  # (empty: no memory)
                assert got["in_ring"], f"{array.dtype} {array.shape} was copied out of the ring"
            if not zero_copy:
                assert not got["in_ring"]


@pytest.mark.timeout(120)
def test_writer_blocked_on_a_full_ring_resumes_when_readers_drain() -> None:
    n_readers, n_slots, slot_size, count = 2, 4, 128, 60
    plan = [(RAW, 100 + (i % 3) * 100) for i in range(count)]  # one to three slots each
    seed = 77
    with (
        BroadcastQueue(n_readers, n_slots=n_slots, slot_size=slot_size) as writer,
        process_group("fork", timeout=60) as group,
    ):
        gos = []
        for i in range(n_readers):
            go, child_end = group.channel()
            gos.append(go)
            group.start(reader_check_plan_after_go, writer.handle, i, child_end, seed, plan)
        writer.wait_until_ready(timeout=30)
        # Fill the ring while the readers hold back.
        sent = 0
        while True:
            size = plan[sent][1]
            try:
                writer.put_bytes(message_payload(seed, sent, size), timeout=0.2)
            except QueueTimeout:
                break
            sent += 1
        assert 0 < sent < count
        full_at = writer.stats().sequence
        assert full_at > n_slots - 3  # the ring is (nearly) full

        def send_rest() -> None:
            for number in range(sent, count):
                writer.put_bytes(message_payload(seed, number, plan[number][1]), timeout=30)

        sender = threading.Thread(target=send_rest)
        sender.start()
        try:
            time.sleep(0.3)
            assert sender.is_alive()  # blocked: it never overwrites unread slots
            assert writer.stats().sequence == full_at
            for go in gos:
                go.send("go")
        finally:
            sender.join(60)
        assert not sender.is_alive()
        assert writer.stats().messages == count
        assert writer.stats().waits >= 1
        writer.close()
        results = group.results()
    assert [r["digest"] for r in results] == [plan_digest(plan)] * n_readers
