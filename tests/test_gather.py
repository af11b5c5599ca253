"""GatherQueue: many writers, one reader.

In one process (writers and the reader may share a process: each holds its own index):
round trips, taking from one writer, round-robin fairness, timeouts, closing, errors,
zero-copy ``view`` and ``reserve``.  Across processes: twelve writers (on a two-core machine)
each send many messages of random sizes, streamed ones included, and the reader gets every one
of them, intact and in each writer's order, under every wait policy; fairness with writers in
other processes; an index held by a live process.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from multiprocessing.connection import Connection

import pytest
from _faults import (
    OP_TIMEOUT,
    make_message,
    message_error,
    message_source_and_seq,
    random_size,
    send_message,
)
from _procs import process_group

from shmcast import (
    AttachError,
    BroadcastQueue,
    GatherQueue,
    MessageKindError,
    MessageTooLarge,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SegmentError,
    WaitPolicy,
)

N_SLOTS = 8
SLOT_SIZE = 1024
SHORT = 0.1  # s: a timeout that is expected to expire


@pytest.fixture
def gather():
    """A reader with three writers, all in this process; closes whatever is still open."""
    reader = GatherQueue(3, n_slots=4, slot_size=256)
    writers = [GatherQueue.attach(reader.handle, writer=i) for i in range(3)]
    try:
        yield reader, writers
    finally:
        for writer in writers:
            writer.close()
        reader.close()


# -- basics -----------------------------------------------------------------------------------


def test_round_trip_and_roles(gather) -> None:
    reader, writers = gather
    assert reader.is_reader and reader.writer is None and reader.n_writers == 3
    assert [w.writer for w in writers] == [0, 1, 2] and not writers[1].is_reader
    writers[1].put({"from": 1, "values": [1, 2, 3]})
    writers[2].put_bytes(b"raw bytes")
    assert reader.get_with_sender(timeout=OP_TIMEOUT) == (1, {"from": 1, "values": [1, 2, 3]})
    assert reader.get_with_sender(timeout=OP_TIMEOUT) == (2, b"raw bytes")
    stats = reader.stats()
    assert (stats.role, stats.index, stats.messages) == ("reader", None, 2)
    assert writers[1].stats().role == "writer" and writers[1].stats().index == 1


def test_get_from_one_writer_takes_only_from_it(gather) -> None:
    reader, writers = gather
    for i in (0, 2):
        for k in range(2):
            writers[i].put((i, k))
    assert reader.get(timeout=OP_TIMEOUT, writer=2) == (2, 0)
    assert reader.get(timeout=OP_TIMEOUT, writer=2) == (2, 1)
    with pytest.raises(QueueTimeout):
        reader.get(timeout=SHORT, writer=2)
    with pytest.raises(QueueTimeout):
        reader.get(timeout=SHORT, writer=1)  # writer 0 has data, but that is not writer 1
    assert reader.get_with_sender(timeout=OP_TIMEOUT) == (0, (0, 0))
    assert reader.get(timeout=OP_TIMEOUT, writer=0) == (0, 1)


def test_get_with_sender_is_round_robin(gather) -> None:
    reader, writers = gather
    for i, writer in enumerate(writers):
        for k in range(4):
            writer.put((i, k))
    got = [reader.get_with_sender(timeout=OP_TIMEOUT) for _ in range(12)]
    senders = [i for i, _ in got]
    assert all(b == (a + 1) % 3 for a, b in itertools.pairwise(senders)), senders
    for i in range(3):
        assert [m for j, m in got if j == i] == [(i, k) for k in range(4)]  # per-writer order


def test_round_robin_skips_writers_that_have_nothing(gather) -> None:
    reader, writers = gather
    for i, count in enumerate((4, 1, 3)):
        for k in range(count):
            writers[i].put((i, k))
    senders = [reader.get_with_sender(timeout=OP_TIMEOUT)[0] for _ in range(8)]
    assert senders == [0, 1, 2, 0, 2, 0, 2, 0]


def test_timeouts(gather) -> None:
    reader, writers = gather
    for timeout in (0, SHORT):
        started = time.monotonic()
        with pytest.raises(QueueTimeout):
            reader.get(timeout=timeout)
        assert time.monotonic() - started >= timeout
    with pytest.raises(TimeoutError):  # QueueTimeout is a TimeoutError
        reader.get_with_sender(timeout=0)
    for k in range(4):  # a full ring: 4 one-slot messages
        writers[0].put_bytes(bytes([k]) * 10)
    started = time.monotonic()
    with pytest.raises(QueueTimeout):
        writers[0].put_bytes(b"does not fit", timeout=SHORT)
    assert time.monotonic() - started >= SHORT
    # The timed-out put sent nothing: exactly the four messages are there.
    assert [reader.get_bytes(timeout=OP_TIMEOUT) for _ in range(4)] == [
        bytes([k]) * 10 for k in range(4)
    ]
    with pytest.raises(QueueTimeout):
        reader.get(timeout=SHORT)


# -- closing ----------------------------------------------------------------------------------


def test_writers_close_reader_drains_then_queue_closed(gather) -> None:
    reader, writers = gather
    for i, writer in enumerate(writers):
        writer.put(("last words of", i))
    writers[0].close()
    writers[2].close()
    got = sorted(reader.get(timeout=OP_TIMEOUT) for _ in range(3))
    assert got == [("last words of", i) for i in range(3)]
    with pytest.raises(QueueClosed):
        reader.get(timeout=OP_TIMEOUT, writer=0)  # writer 0 closed and was drained
    with pytest.raises(QueueTimeout):
        reader.get(timeout=SHORT)  # writer 1 is still open: not closed yet
    writers[1].put("one more")
    writers[1].close()
    assert reader.get(timeout=OP_TIMEOUT) == "one more"
    with pytest.raises(QueueClosed):
        reader.get(timeout=OP_TIMEOUT)
    with pytest.raises(QueueClosed):
        reader.get_with_sender(timeout=OP_TIMEOUT)
    with pytest.raises(QueueClosed):
        writers[1].put("after close")  # an endpoint's own close


def test_reader_close_makes_puts_raise_queue_closed(gather) -> None:
    reader, writers = gather
    writers[0].put("before")
    reader.close()
    for writer in writers:
        with pytest.raises(QueueClosed):
            writer.put("after the reader closed", timeout=OP_TIMEOUT)
        with pytest.raises(QueueClosed):
            writer.put_bytes(b"after the reader closed", timeout=OP_TIMEOUT)
    with pytest.raises(QueueClosed):
        reader.get(timeout=0)


def test_reader_close_wakes_a_put_blocked_on_a_full_ring(gather) -> None:
    """A writer asleep in put on a full ring when the reader closes: its message can never be
    read, so the put must raise QueueClosed, not return as if it was sent."""
    reader, writers = gather
    for k in range(4):
        writers[0].put_bytes(bytes([k]) * 10)
    outcome: list[object] = []

    def blocked_put() -> None:
        try:
            writers[0].put_bytes(b"never read", timeout=OP_TIMEOUT)
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked_put)
    thread.start()
    try:
        time.sleep(0.2)  # the put is asleep on the full ring
        assert thread.is_alive() and outcome == []
        reader.close()
    finally:
        thread.join(OP_TIMEOUT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], QueueClosed), outcome


# -- errors -----------------------------------------------------------------------------------


def test_attach_errors(gather) -> None:
    reader, _writers = gather
    for bad in (3, -1, 1000):
        with pytest.raises(AttachError, match="out of range"):
            GatherQueue.attach(reader.handle, writer=bad)
    for bad in ("0", 1.0, True, None):
        with pytest.raises(AttachError):
            GatherQueue.attach(reader.handle, writer=bad)
    with pytest.raises(AttachError, match="already attached"):
        GatherQueue.attach(reader.handle, writer=1)  # taken (by this very process)
    with pytest.raises(TypeError):
        GatherQueue.attach(reader.handle.name, writer=0)


def test_role_errors(gather) -> None:
    reader, writers = gather
    with pytest.raises(RoleError):
        reader.put("the reader cannot send")
    with pytest.raises(RoleError):
        reader.put_bytes(b"the reader cannot send")
    with pytest.raises(RoleError), reader.reserve(10):
        pass
    for call in (
        lambda: writers[0].get(timeout=0),
        lambda: writers[0].get_bytes(timeout=0),
        lambda: writers[0].get_with_sender(timeout=0),
    ):
        with pytest.raises(RoleError):
            call()
    with pytest.raises(RoleError), writers[0].view(timeout=0):
        pass
    with pytest.raises(ValueError):  # no writer 7 to take from
        reader.get(timeout=0, writer=7)


def test_a_handle_of_the_other_kind_is_refused() -> None:
    with BroadcastQueue(2, n_slots=4, slot_size=256) as broadcast:
        with pytest.raises(SegmentError, match="broadcast"):
            GatherQueue.attach(broadcast.handle, writer=0)
        with GatherQueue(2, n_slots=4, slot_size=256) as gather:
            with pytest.raises(SegmentError, match="gather"):
                BroadcastQueue.attach(gather.handle, reader=0)
            # Neither failed attach took an index.
            with GatherQueue.attach(gather.handle, writer=0) as writer:
                writer.put("still usable")
                assert gather.get(timeout=OP_TIMEOUT) == "still usable"
        with BroadcastQueue.attach(broadcast.handle, reader=0) as reader:
            broadcast.put("still usable")
            assert reader.get(timeout=OP_TIMEOUT) == "still usable"


def test_get_bytes_on_an_object_leaves_it_queued(gather) -> None:
    reader, writers = gather
    writers[2].put({"an": "object"})
    with pytest.raises(MessageKindError):
        reader.get_bytes(timeout=OP_TIMEOUT, writer=2)
    assert reader.get(timeout=OP_TIMEOUT, writer=2) == {"an": "object"}


# -- zero copy --------------------------------------------------------------------------------


def test_reserve_and_view(gather) -> None:
    reader, writers = gather
    payload = bytes(range(256)) * 3  # three of the ring's four slots
    with writers[1].reserve(len(payload), timeout=OP_TIMEOUT) as region:
        assert len(region) == len(payload) and not region.readonly
        region[:] = payload
    with reader.view(timeout=OP_TIMEOUT, writer=1) as view:
        assert isinstance(view, memoryview) and view.readonly
        assert bytes(view) == payload
        # The message's slots are held while the view is: the ring has one free slot.
        writers[1].put_bytes(b"x" * 200, timeout=OP_TIMEOUT)
        with pytest.raises(QueueTimeout):
            writers[1].put_bytes(b"y" * 200, timeout=SHORT)
    writers[1].put_bytes(b"y" * 200, timeout=OP_TIMEOUT)  # released at the end of the block
    assert reader.get_bytes(timeout=OP_TIMEOUT, writer=1) == b"x" * 200
    assert reader.get_bytes(timeout=OP_TIMEOUT, writer=1) == b"y" * 200


def test_view_of_objects_and_of_any_writer(gather) -> None:
    np = pytest.importorskip("numpy")
    reader, writers = gather
    array = np.arange(100, dtype=np.float32)
    writers[0].put({"array": array, "tag": "zero"})
    with reader.view(timeout=OP_TIMEOUT) as value:
        assert value["tag"] == "zero"
        np.testing.assert_array_equal(value["array"], array)
        ring = np.frombuffer(reader._seg.buf, dtype=np.uint8)
        assert np.shares_memory(value["array"], ring)  # decoded in place, not copied
        del ring, value


def test_reserve_errors_publish_nothing(gather) -> None:
    reader, writers = gather
    with pytest.raises(MessageTooLarge), writers[0].reserve(writers[0].capacity + 1):
        pass
    with (
        pytest.raises(RuntimeError, match="abandon"),
        writers[0].reserve(100, timeout=OP_TIMEOUT) as region,
    ):
        region[:4] = b"half"
        raise RuntimeError("abandon the reservation")
    with pytest.raises(QueueTimeout):
        reader.get(timeout=SHORT)  # nothing was published
    writers[0].put_bytes(b"next", timeout=OP_TIMEOUT)
    assert reader.get_bytes(timeout=OP_TIMEOUT) == b"next"


# -- many writers in other processes ----------------------------------------------------------


def writer_sends_plan(handle, index: int, wait: str, seed: int, count: int) -> int:
    """Child: attach as writer ``index`` and send ``count`` checkable messages of random sizes
    (streamed ones included) through random calls; close.  Returns ``count``."""
    rng = random.Random(seed)
    with GatherQueue.attach(handle, writer=index, wait=wait) as queue:
        for seq in range(count):
            size = random_size(rng, queue.slot_size, queue.capacity)
            send_message(queue, make_message(index, seq, size, rng), rng, OP_TIMEOUT)
    return count


def writer_fills_then_waits(
    handle, index: int, count: int, ready: Connection, hold: float = 0.0
) -> None:
    """Child: attach as writer ``index``, put ``count`` small messages, send ``"ready"``, and
    sleep ``hold`` seconds before closing."""
    with GatherQueue.attach(handle, writer=index) as queue:
        for seq in range(count):
            queue.put_bytes(make_message(index, seq, 50, random.Random(seq)), timeout=OP_TIMEOUT)
        ready.send("ready")
        time.sleep(hold)


def check_everything_arrives(reader: GatherQueue, counts: list[int], seed: int) -> None:
    """Read until QueueClosed with a random mix of get_with_sender, get and view; every
    writer's messages must arrive intact, in its order, all of them."""
    rng = random.Random(seed)
    expected = [0] * len(counts)
    errors: list[str] = []
    while True:
        roll = rng.random()
        try:
            if roll < 0.5:
                sender, data = reader.get_with_sender(timeout=OP_TIMEOUT)
            elif roll < 0.75:
                sender, data = None, reader.get(timeout=OP_TIMEOUT)
            else:
                with reader.view(timeout=OP_TIMEOUT) as value:
                    sender, data = None, bytes(value)
        except QueueClosed:
            break
        source, seq = message_source_and_seq(data)
        if sender is not None and sender != source:
            errors.append(f"get_with_sender said {sender}, the message is from {source}")
        if not 0 <= source < len(counts):
            errors.append(f"a message from writer {source}?")
            continue
        problem = message_error(data, source, expected[source])
        if problem:
            errors.append(problem)
        expected[source] = seq + 1
    assert errors == []
    assert expected == counts, f"messages received per writer {expected}, sent {counts}"


@pytest.mark.parametrize("wait", ["futex", "spin", "backoff", "idle"])
def test_many_writers_in_processes(wait: str) -> None:
    n_writers, count = 12, 200
    rng = random.Random(f"many writers {wait}")
    started = time.monotonic()
    with (
        GatherQueue(n_writers, n_slots=N_SLOTS, slot_size=SLOT_SIZE, wait=wait) as reader,
        process_group("fork") as group,
    ):
        children = [
            group.start(writer_sends_plan, reader.handle, i, wait, rng.getrandbits(32), count)
            for i in range(n_writers)
        ]
        check_everything_arrives(reader, [count] * n_writers, rng.getrandbits(32))
        assert group.results() == [count] * n_writers
        del children
    elapsed = time.monotonic() - started
    print(f"\n{n_writers} writers x {count} messages, wait={wait}: {elapsed:.2f} s")


def test_round_robin_with_writers_in_processes() -> None:
    n_writers, count = 4, 5
    with (
        GatherQueue(n_writers, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as reader,
        process_group("fork") as group,
    ):
        pipes = []
        for i in range(n_writers):
            ready_in, ready_out = group.context.Pipe(duplex=False)
            group.start(writer_fills_then_waits, reader.handle, i, count, ready_out)
            ready_out.close()
            pipes.append(ready_in)
        for pipe in pipes:
            assert pipe.poll(OP_TIMEOUT) and pipe.recv() == "ready"
            pipe.close()
        got = [reader.get_with_sender(timeout=OP_TIMEOUT) for _ in range(n_writers * count)]
        group.results()
        with pytest.raises(QueueClosed):
            reader.get(timeout=OP_TIMEOUT)
    senders = [i for i, _ in got]
    assert all(b == (a + 1) % n_writers for a, b in itertools.pairwise(senders)), senders
    for sender, data in got:
        assert message_source_and_seq(data)[0] == sender


def test_writer_index_held_by_a_live_process() -> None:
    with (
        GatherQueue(2, n_slots=N_SLOTS, slot_size=SLOT_SIZE) as reader,
        process_group("fork") as group,
    ):
        ready_in, ready_out = group.context.Pipe(duplex=False)
        holder = group.start(writer_fills_then_waits, reader.handle, 1, 2, ready_out, OP_TIMEOUT)
        ready_out.close()
        assert ready_in.poll(OP_TIMEOUT) and ready_in.recv() == "ready"
        with pytest.raises(AttachError) as info:
            GatherQueue.attach(reader.handle, writer=1)
        assert str(holder.pid) in str(info.value)
        group.kill(holder)
        ready_in.close()
        # The dead process's index can be taken over; what it sent is still delivered first.
        with GatherQueue.attach(reader.handle, writer=1) as writer:
            writer.put_bytes(make_message(1, 2, 50, random.Random(2)), timeout=OP_TIMEOUT)
            for seq in range(3):
                got = reader.get_bytes(timeout=OP_TIMEOUT, writer=1)
                assert message_error(got, 1, seq) is None, message_error(got, 1, seq)


def test_wait_policy_objects_are_accepted() -> None:
    """A policy instance (not only a name) configures each endpoint; each gets its own copy."""
    from shmcast import FutexWait

    policy: WaitPolicy = FutexWait(spin_us=0, slice=0.05)
    with (
        GatherQueue(1, n_slots=4, slot_size=256, wait=policy) as reader,
        GatherQueue.attach(reader.handle, writer=0, wait=policy) as writer,
    ):
        writer.put("hello")
        assert reader.get(timeout=OP_TIMEOUT) == "hello"
        assert reader.stats().wait_policy == writer.stats().wait_policy == "futex"


def test_get_many_takes_from_any_writer_or_one() -> None:
    reader = GatherQueue(3, n_slots=8, slot_size=256)
    writers = [GatherQueue.attach(reader.handle, writer=j) for j in range(3)]
    try:
        for j, w in enumerate(writers):
            w.put_many([(j, i) for i in range(4)])
        assert reader.get_many(10, timeout=1, writer=1) == [(1, i) for i in range(4)]
        rest = reader.get_many(100, timeout=1)
        assert sorted(rest) == [(j, i) for j in (0, 2) for i in range(4)]
        for j in (0, 2):  # per-writer order kept
            assert [m for m in rest if m[0] == j] == [(j, i) for i in range(4)]
    finally:
        for w in writers:
            w.close()
        reader.close()
