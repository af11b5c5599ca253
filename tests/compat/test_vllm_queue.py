"""shmcast.compat.vllm.MessageQueue: vLLM's API (0.33.0) on a BroadcastQueue.

Everything here runs without torch and vLLM; tests/compat/test_tensors.py covers tensors and
test_vllm_plugin.py the plugin.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import resource
import subprocess
import sys
import threading
import time
import weakref
from typing import Any
from unittest import mock

import numpy as np
import pytest
from _procs import (
    ChildFailed,
    group_member,
    mq_pair,
    mq_reader,
    mq_reader_then_hold,
    process_group,
)

from shmcast import (
    AttachError,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SerializationError,
)
from shmcast._segment import SHM_DIR
from shmcast.compat import _vllm_groups
from shmcast.compat._vllm_queue import map_slot_heads, ring_geometry
from shmcast.compat.vllm import Handle, MessageQueue

SMALL = {"max_chunk_bytes": 4096, "max_chunks": 4}  # a ring of 4 slots of 4 KiB


def fill(writer: MessageQueue) -> int:
    """Enqueue small objects until the ring is full; return how many went in."""
    sent = 0
    while True:
        try:
            writer.enqueue(sent, timeout=0.05)
        except TimeoutError:
            return sent
        sent += 1
        assert sent < 10_000, "the ring never filled up"


# -- construction and handles --------------------------------------------------------------------


def test_importing_the_drop_in_imports_neither_torch_nor_vllm() -> None:
    code = (
        "import sys\n"
        "import shmcast.compat.vllm as v\n"
        "q = v.MessageQueue(1, 1, max_chunk_bytes=4096, max_chunks=2)\n"
        "r = v.MessageQueue.create_from_handle(q.export_handle(), 0)\n"
        "q.enqueue({'step': 1}); assert r.dequeue(timeout=5) == {'step': 1}\n"
        "q.shutdown(); r.shutdown()\n"
        "print(sorted(m for m in ('torch', 'vllm', 'zmq') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "[]"


def test_constructor_and_methods_have_vllm_names() -> None:
    import inspect

    params = list(inspect.signature(MessageQueue.__init__).parameters)
    assert params == [
        "self", "n_reader", "n_local_reader", "local_reader_ranks", "max_chunk_bytes",
        "max_chunks", "connect_ip", "enable_shm_tensor_arena",
    ]  # fmt: skip
    defaults = inspect.signature(MessageQueue.__init__).parameters
    assert defaults["max_chunk_bytes"].default == 24 * 1024 * 1024
    assert defaults["max_chunks"].default == 10
    group = inspect.signature(MessageQueue.create_from_process_group).parameters
    assert list(group) == ["pg", "max_chunk_bytes", "max_chunks", "writer_rank",
                           "external_writer_handle", "blocking"]  # fmt: skip
    assert group["blocking"].default is True
    single = inspect.signature(MessageQueue.create_from_process_group_single_reader).parameters
    assert list(single) == ["pg", "max_chunk_bytes", "max_chunks", "reader_rank", "blocking"]


def test_handle_has_vllm_fields_and_pickles() -> None:
    writer = MessageQueue(2, 2, local_reader_ranks=[7, 3], **SMALL)
    try:
        handle = writer.export_handle()
        assert isinstance(handle, Handle)
        assert handle.local_reader_ranks == [7, 3]
        assert handle.buffer_handle is not None
        for name in ("local_subscribe_addr", "local_notify_addr", "remote_subscribe_addr",
                     "tensor_arena_handle"):  # fmt: skip
            assert getattr(handle, name) is None, name
        assert handle.remote_addr_ipv6 is False
        assert handle.writer_pid == os.getpid()
        assert pickle.loads(pickle.dumps(handle)) == handle
    finally:
        writer.shutdown()


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, 0), "n_reader"),
        ((1, 2), "exceeds n_reader"),
        ((2, 2, [0]), "local_reader_ranks has 1"),
        ((2, 2, [1, 1]), "twice"),
        ((1, 1, ["a"]), "ints"),
    ],
)
def test_bad_reader_counts_are_refused(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MessageQueue(*args)


@pytest.mark.parametrize("chunk, chunks", [(0, 10), (4096, 0), (4096, 2.5), (True, 10)])
def test_bad_geometry_is_refused(chunk: Any, chunks: Any) -> None:
    with pytest.raises(ValueError, match="positive int"):
        MessageQueue(1, 1, max_chunk_bytes=chunk, max_chunks=chunks)


def test_ring_geometry_holds_the_chunks_in_slots_of_at_most_256_kib() -> None:
    assert ring_geometry(24 * 1024 * 1024, 10) == (960, 256 * 1024)
    assert ring_geometry(40 * 1024, 2) == (2, 40 * 1024)
    assert ring_geometry(1000, 1) == (2, 1024)  # at least two slots, sizes rounded to 64
    # One chunk of four slots: three more, the most padding a chunk in place can need.
    assert ring_geometry(1024 * 1024, 1) == (7, 256 * 1024)
    assert ring_geometry(1024 * 1024, 2) == (8, 256 * 1024)  # two chunks: room already
    slots, size = ring_geometry(1 << 40, 4)  # more than a million slots: larger ones
    assert slots <= 1 << 20 and slots * size >= 4 << 40


def test_the_first_trip_round_the_ring_takes_no_page_fault_per_message() -> None:
    # vLLM's executor geometry: 640 slots, each small message in the next one.  Without the
    # slot heads mapped when the queue is made and joined, each message of the first lap
    # took a page fault (about one per message here, in this process's two mappings).
    writer, reader = mq_pair(max_chunk_bytes=16 * 1024 * 1024, max_chunks=10)
    try:
        n = writer._queue.n_slots
        assert n == 640
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(n):
            writer.enqueue(("SUCCESS", {"step": i}), timeout=5)
            assert reader.dequeue(timeout=5) == ("SUCCESS", {"step": i})
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults < n // 8, f"{faults} page faults for one lap of {n} slots"
    finally:
        writer.shutdown()
        reader.shutdown()


def test_map_slot_heads_looks_at_the_descriptors_and_each_slots_first_page() -> None:
    writer, reader = mq_pair(max_chunk_bytes=4096, max_chunks=4)
    try:
        n = writer._queue.n_slots  # 4 slots of 4 KiB; their descriptors share one page
        assert map_slot_heads(writer._queue) == n + 1
    finally:
        writer.shutdown()
        reader.shutdown()


def test_local_reader_ranks_map_to_reader_indices() -> None:
    writer = MessageQueue(2, 2, local_reader_ranks=[7, 3], **SMALL)
    readers = [MessageQueue.create_from_handle(writer.export_handle(), r) for r in (3, 7)]
    try:
        assert [r.local_reader_rank for r in readers] == [1, 0]
        assert all(r._is_local_reader and not r._is_writer for r in readers)
        writer.wait_until_ready(timeout=5)
        writer.enqueue("hello")
        assert [r.dequeue(timeout=5) for r in readers] == ["hello", "hello"]
    finally:
        for q in (writer, *readers):
            q.shutdown()


def test_a_rank_outside_the_local_ranks_needs_remote_slots() -> None:
    writer = MessageQueue(1, 1, **SMALL)
    try:
        assert writer.remote_socket is None and writer.handle.remote_subscribe_addr is None
        for rank in (-1, 5):
            with pytest.raises(AttachError, match=f"rank {rank} is not one of"):
                MessageQueue.create_from_handle(writer.export_handle(), rank)
    finally:
        writer.shutdown()


def test_a_handle_of_another_class_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match="plugin active"):
        MessageQueue.create_from_handle(("not", "ours"), 0)  # type: ignore[arg-type]


def test_no_reader_at_all_pickles_and_sends_nothing() -> None:
    queue = MessageQueue(0, 0)
    queue.wait_until_ready()  # nobody to wait for
    queue.enqueue({"step": 1})
    assert queue.broadcast_object([1, 2]) == [1, 2]
    with pytest.raises(SerializationError, match=r"lambda|pickle"):
        queue.enqueue(lambda: None)
    with pytest.raises(RuntimeError, match="only readers"):
        queue.dequeue(timeout=0)
    queue.shutdown()


# -- sending and receiving ----------------------------------------------------------------------


def test_objects_of_every_size_reach_every_reader_in_order() -> None:
    objects = [
        None, 0, "x" * 10, {"step": 3, "tokens": list(range(100))},
        np.arange(1000, dtype=np.int64),  # out of band
        b"y" * 20_000,  # several slots
        np.full(100_000, 7, dtype=np.uint8),  # larger than the whole ring: streamed
    ]  # fmt: skip
    writer = MessageQueue(3, 3, **SMALL)
    try:
        with process_group() as group:
            for rank in range(3):
                group.start(mq_reader, "shmcast", writer.export_handle(), rank, len(objects))
            writer.wait_until_ready(timeout=30)
            for obj in objects:
                writer.enqueue(obj, timeout=30)
            for got in group.results():
                assert len(got) == len(objects)
                for a, b in zip(got, objects, strict=True):
                    if isinstance(b, np.ndarray):
                        np.testing.assert_array_equal(a, b)
                    else:
                        assert a == b
    finally:
        writer.shutdown()


def test_broadcast_object_sends_from_the_writer_and_returns_on_readers() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        assert writer.broadcast_object({"a": 1}) == {"a": 1}
        assert reader.broadcast_object() == {"a": 1}
    finally:
        writer.shutdown()
        reader.shutdown()


def test_roles_are_checked() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        with pytest.raises(RoleError):
            reader.enqueue(1)
        with pytest.raises(RuntimeError, match="only readers"):
            writer.dequeue(timeout=0)
        with pytest.raises(RoleError), reader.acquire_write():
            pass
        with pytest.raises(RoleError), writer.acquire_read():
            pass
    finally:
        writer.shutdown()
        reader.shutdown()


def test_every_timeout_is_a_timeout_error() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            reader.dequeue(timeout=0.2)
        assert 0.15 < time.monotonic() - start < 5
        sent = fill(writer)
        assert sent >= 4
        with pytest.raises(TimeoutError):
            writer.enqueue("one more", timeout=0.2)
        with pytest.raises(QueueTimeout), writer.acquire_write(timeout=0.1):
            pass
        with pytest.raises(TimeoutError):
            MessageQueue(1, 1, **SMALL).wait_until_ready(timeout=0.1)  # nobody joins
        assert [reader.dequeue(timeout=1) for _ in range(sent)] == list(range(sent))
    finally:
        writer.shutdown()
        reader.shutdown()


def _payload(kind: str, nbytes: int) -> tuple[Any, np.ndarray]:
    """``(what is sent, the array it holds)``: a numpy array (writable or not) or a tensor."""
    array = np.full(nbytes // 2, 17, dtype=np.uint16)
    array.flags.writeable = kind != "numpy_readonly"
    if kind == "tensor":
        torch = pytest.importorskip("torch", reason="torch is not installed here")
        return torch.from_numpy(array), array
    return array, array


@pytest.mark.parametrize("kind", ["numpy", "numpy_readonly", "tensor"])
@pytest.mark.parametrize(
    "nbytes",
    [
        pytest.param(64 * 1024, id="in-one-slot"),
        pytest.param(1024 * 1024, id="over-slots"),
        pytest.param(3 * 1024 * 1024, id="over-a-chunk"),
        pytest.param(6 * 1024 * 1024, id="over-the-ring"),
    ],
)
def test_values_are_kept_after_the_ring_is_reused(kind: str, nbytes: int) -> None:
    # One chunk of 2 MiB: a ring of 15 slots of 256 KiB (3.75 MiB).  The first message lies
    # in one slot, over several, over more than a chunk, or streams through the whole ring;
    # the four after it (1 MiB each) reuse the memory it came through.  The reader takes them
    # in a thread: a message larger than the ring's free room waits for the reader.
    writer, reader = mq_pair(max_chunk_bytes=2 * 1024 * 1024, max_chunks=1)
    payload, array = _payload(kind, nbytes)
    received: list[Any] = []

    def read() -> None:
        first = reader.dequeue(timeout=20)
        received.append(first)
        for value in range(4):
            np.testing.assert_array_equal(reader.dequeue(timeout=20), value)
            np.testing.assert_array_equal(first, array)
        received.append("checked")

    thread = threading.Thread(target=read)
    try:
        thread.start()
        writer.enqueue(payload, timeout=20)
        for value in range(4):
            writer.enqueue(np.full(512 * 1024, value, dtype=np.uint16), timeout=20)
        thread.join(30)
        assert not thread.is_alive() and received[1:] == ["checked"]
        first = received[0]
        assert type(first) is type(payload) and first.dtype == payload.dtype
        if isinstance(first, np.ndarray):
            assert first.flags.writeable == array.flags.writeable
        if kind != "numpy_readonly":  # the reader owns it: writable, and not the sender's
            first[0] = 42
            assert array[0] == 17
    finally:
        writer.shutdown()
        reader.shutdown()
        thread.join(30)


def test_acquire_write_and_acquire_read_work_in_place() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        with writer.acquire_write(timeout=1) as buf:
            assert len(buf) == 4096
            buf[:5] = b"hello"
        with reader.acquire_read(timeout=1) as view:
            assert bytes(view[:5]) == b"hello" and len(view) == 4096
        writer.enqueue({"then": "an object"})
        with reader.acquire_read(timeout=1) as obj:
            assert obj == {"then": "an object"}
    finally:
        writer.shutdown()
        reader.shutdown()


def test_a_whole_chunk_can_be_written_as_soon_as_the_last_message_was_read() -> None:
    # One chunk of 1 MiB: four slots of 256 KiB.  Small messages move the writer off the start
    # of the ring, and a chunk in place cannot wrap around its end: the slots before the end
    # become padding, which the ring must have room for while the reader is not reading.
    writer, reader = mq_pair(max_chunk_bytes=1024 * 1024, max_chunks=1)
    try:
        for step in range(8):
            for n in range(step % 3 + 1):
                writer.enqueue(n, timeout=1)
                assert reader.dequeue(timeout=1) == n
            with writer.acquire_write(timeout=1) as buf:
                assert len(buf) == 1024 * 1024
                buf[-4:] = step.to_bytes(4, "little")
            with reader.acquire_read(timeout=1) as view:
                assert bytes(view[-4:]) == step.to_bytes(4, "little")
    finally:
        writer.shutdown()
        reader.shutdown()


def test_nothing_is_published_when_the_writer_block_raises() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        with pytest.raises(ValueError, match="abandon"), writer.acquire_write(timeout=1):
            raise ValueError("abandon")
        with pytest.raises(TimeoutError):
            reader.dequeue(timeout=0.1)
    finally:
        writer.shutdown()
        reader.shutdown()


def test_the_read_slot_is_released_when_the_reader_raises() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        sent = fill(writer)
        with pytest.raises(KeyError), reader.acquire_read(timeout=1) as first:
            assert first == 0
            raise KeyError("the caller failed")
        writer.enqueue("fits again", timeout=1)  # the message's slot went back to the writer
        assert [reader.dequeue(timeout=1) for _ in range(sent)] == [*range(1, sent), "fits again"]
    finally:
        writer.shutdown()
        reader.shutdown()


def test_a_reader_in_a_reference_cycle_is_collected() -> None:
    writer = MessageQueue(1, 1, **SMALL)
    reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
    reader.cycle = reader  # type: ignore[attr-defined]
    ref = weakref.ref(reader)
    del reader
    collector = threading.Thread(target=gc.collect)
    collector.start()
    collector.join(10)
    assert not collector.is_alive() and ref() is None
    writer.enqueue("nobody holds the writer back any more", timeout=1)
    writer.shutdown()


# -- shutdown -----------------------------------------------------------------------------------


def shutdown_later(queue: MessageQueue, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), queue.shutdown()))
    thread.start()
    return thread


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_shutdown_cancels_a_waiting_reader(state: str) -> None:
    writer, reader = mq_pair(**SMALL)
    spin = reader._spin_condition
    assert spin is not None
    spin.detect_crowding = False  # spin whatever else runs on the machine
    try:
        if state == "busy":  # vLLM's busy loop: the whole wait spins (a budget of 5 s)
            spin.busy_loop_s = 9999
            spin.spin_us = spin.min_spin_us = 5e6
        else:  # no read for ages: the wait sleeps in the kernel at once
            spin.last_read = 0
        with pytest.raises(TimeoutError):
            reader.dequeue(timeout=0.05)  # (the next wait's budget follows from this one)
        with mock.patch.object(spin, "_spin", wraps=spin._spin) as spun:
            thread = shutdown_later(reader, 0.3)
            start = time.monotonic()
            with pytest.raises(RuntimeError, match="cancelled"):
                reader.dequeue(timeout=20)
            assert time.monotonic() - start < 3  # well within the spin's budget
        assert spun.called == (state == "busy")
        thread.join(5)
        assert reader.shutting_down
        with pytest.raises(RuntimeError, match="cancelled"):
            reader.dequeue(timeout=1)  # and every later call
        writer.enqueue("the writer no longer waits for it", timeout=1)
    finally:
        writer.shutdown()
        reader.shutdown()


def test_shutdown_frees_a_blocked_writer() -> None:
    writer, reader = mq_pair(**SMALL)
    try:
        sent = fill(writer)
        thread = shutdown_later(writer, 0.3)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="cancelled"):
            writer.enqueue("blocked", timeout=20)
        assert time.monotonic() - start < 5
        thread.join(5)
        with pytest.raises(RuntimeError, match="cancelled"):
            writer.enqueue("later")
        # The readers read what was sent, then learn that the writer is gone.
        assert [reader.dequeue(timeout=1) for _ in range(sent)] == list(range(sent))
        with pytest.raises(QueueClosed):
            reader.dequeue(timeout=1)
    finally:
        writer.shutdown()
        reader.shutdown()


def test_shutdown_is_idempotent_and_safe_on_every_kind() -> None:
    writer, reader = mq_pair(**SMALL)
    for queue in (writer, reader, MessageQueue(0, 0)):
        queue.shutdown()
        queue.shutdown()
        assert queue.shutting_down


# -- dead peers and long waits ------------------------------------------------------------------


def test_a_reader_killed_while_the_writer_waits_is_named_quickly() -> None:
    writer = MessageQueue(2, 2, **SMALL)
    try:
        with process_group() as group:
            control, child_end = group.channel()
            group.start(mq_reader, "shmcast", writer.export_handle(), 0, 100)
            stuck = group.start(mq_reader_then_hold, "shmcast", writer.export_handle(), 1, 0,
                                child_end)  # fmt: skip
            writer.wait_until_ready(timeout=30)
            sent = 0
            blocked = threading.Event()

            def kill_when_blocked() -> None:
                blocked.wait(30)
                time.sleep(0.3)  # the writer is inside its wait now
                group.kill(stuck)

            killer = threading.Thread(target=kill_when_blocked)
            killer.start()
            start = None
            with pytest.raises(QueueBroken) as info:
                while sent < 100:
                    try:
                        writer.enqueue(sent, timeout=0.05)
                        sent += 1
                    except TimeoutError:  # full: reader 1 reads nothing
                        blocked.set()
                        start = time.monotonic()
                        writer.enqueue(sent, timeout=30)
            killer.join(30)
            assert start is not None
            assert time.monotonic() - start < 5  # about a second after the death, not 30
            assert info.value.peer == "reader 1"
            control.send("done")
    finally:
        writer.shutdown()


def test_readers_of_a_dead_writer_read_what_it_sent_then_are_told() -> None:
    handle = None
    try:
        with process_group() as group:
            report, child_end = group.context.Pipe(duplex=False)
            child = group.start(_writer_that_dies, child_end)
            child_end.close()
            assert report.poll(60), "no handle from the writer"
            handle = report.recv()
            reader = MessageQueue.create_from_handle(handle, 0)
            reader.wait_until_ready(timeout=30)
            assert [reader.dequeue(timeout=30) for _ in range(3)] == [0, 1, 2]
            group.join(child, 30)
            start = time.monotonic()
            with pytest.raises(QueueBroken, match="died"):  # an idle worker's wait, too
                reader.dequeue(indefinite=True)
            assert time.monotonic() - start < 5
            reader.shutdown()
    finally:
        if handle is not None:  # the dead writer could not remove its segment's name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, handle.buffer_handle.name))


def _writer_that_dies(report: Any) -> None:
    writer = MessageQueue(1, 1, **SMALL)
    report.send(writer.export_handle())
    writer.wait_until_ready(timeout=30)
    for n in range(3):
        writer.enqueue(n, timeout=30)
    os._exit(0)  # no cleanup: the segment stays mapped by the reader


def test_a_long_dequeue_logs_whom_it_waits_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VLLM_RINGBUFFER_WARNING_INTERVAL", "0.2")
    writer, reader = mq_pair(**SMALL)
    try:
        with caplog.at_level(logging.INFO, logger="shmcast"):
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout=0.7)
            lines = [r.getMessage() for r in caplog.records if r.name == "shmcast.compat.vllm"]
            assert lines and all(f"for the writer (pid {os.getpid()})" in m for m in lines)
            caplog.clear()
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout=0.15)  # shorter than the interval: nothing to log
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout=0.7, indefinite=True)  # an idle worker: no log
            assert not [r for r in caplog.records if r.name == "shmcast.compat.vllm"]
            sent = fill(writer)
            with pytest.raises(TimeoutError):
                writer.enqueue(sent, timeout=0.7)
            waits = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
            assert any("reader 0" in m and "alive" in m for m in waits), waits
    finally:
        writer.shutdown()
        reader.shutdown()


# -- process groups -----------------------------------------------------------------------------

OBJECTS = [{"n": n, "blob": bytes([n]) * (n * 5000)} for n in range(12)] + [np.arange(50_000)]


def check_group_results(results: list[dict[str, Any]], writer_rank: int) -> None:
    for result in results:
        if result["rank"] == writer_rank:
            assert result["is_writer"] and result["got"] == []
            continue
        assert not result["is_writer"]
        got = result["got"]
        assert [g["n"] for g in got[:-1]] == [o["n"] for o in OBJECTS[:-1]]
        assert all(g == o for g, o in zip(got[:-1], OBJECTS[:-1], strict=True))
        np.testing.assert_array_equal(got[-1], OBJECTS[-1])
    first = next(r for r in results if r["rank"] == 0)
    assert first["replies"] == list(range(len(results))) and first["handles"] == len(results)
    assert all(r["handles"] == 0 for r in results if r["rank"] != 0)


def test_process_group_of_the_stateless_kind(tmp_path: Any) -> None:
    with process_group() as group:
        for rank in range(3):
            group.start(group_member, "files", str(tmp_path), rank, 3, 1, OBJECTS)
        check_group_results(group.results(), writer_rank=1)


def test_a_rank_on_another_host_reads_remotely(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Any) -> None:  # fmt: skip
    from _procs import FileGroup

    # Rank 1 "cannot attach" (as if on another host): it joins over the network.
    monkeypatch.setattr(_vllm_groups, "same_host_as", lambda group, src: [True, False, True])
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    results: dict[int, Any] = {}

    def rank(r: int) -> None:
        try:
            group = FileGroup(str(tmp_path / "one"), r, 3, 30)
            queue = MessageQueue.create_from_process_group(group, 4096, 2)
            got = [queue.broadcast_object(n if r == 0 else None) for n in range(5)]
            single, handles = MessageQueue.create_from_process_group_single_reader(
                FileGroup(str(tmp_path / "two"), r, 3, 30), 4096, 2, reader_rank=0
            )
            single.enqueue(f"from {r}")
            if r == 0:
                readers = [MessageQueue.create_from_handle(h, 0) for h in handles]
                got.append([reader.dequeue(timeout=30) for reader in readers])
                for reader in readers:
                    reader.shutdown()
            group.all_gather_obj(None)  # nobody shuts down before rank 0 has read
            results[r] = (got, queue._is_remote_reader, single.n_local_reader)
            queue.shutdown()
            single.shutdown()
        except BaseException as exc:
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not isinstance(v, BaseException) for v in results.values()), results
    assert results[0] == ([0, 1, 2, 3, 4, ["from 0", "from 1", "from 2"]], False, 1)
    assert results[1] == ([0, 1, 2, 3, 4], True, 0)  # its queue's one reader is remote
    assert results[2] == ([0, 1, 2, 3, 4], False, 1)


def test_process_group_of_torch_distributed(tmp_path: Any) -> None:
    pytest.importorskip("torch", reason="torch is not installed here (make test-vllm has it)")
    with process_group() as group:
        for rank in range(3):
            group.start(group_member, "torch", str(tmp_path / "store"), rank, 3, 2, OBJECTS)
        check_group_results(group.results(), writer_rank=2)


def test_process_group_of_vllm_stateless_group() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm has it)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with process_group() as group:
        for rank in range(3):
            group.start(group_member, "stateless", str(port), rank, 3, 0, OBJECTS)
        try:
            check_group_results(group.results(), writer_rank=0)
        except ChildFailed as exc:
            if "Address already in use" in str(exc):
                pytest.skip("the port was taken meanwhile")
            raise
