"""What every endpoint guarantees whatever happens around a call: an endpoint refuses to work
in a forked child (and the parent's stream is untouched), an exception raised by a signal
handler at any point leaves the endpoint usable and the message delivered or still there,
what view() hands out cannot be written, and on a queue with checksums no payload changed in
the ring by another process is handed out unseen, however it is received."""

from __future__ import annotations

import os
import pickle
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _faults import (
    RECEIVES,
    Interrupter,
    broadcast_sender,
    interrupted_receive,
    make_message,
    message_error,
    message_source_and_seq,
)
from _procs import START_METHODS, process_group

from shmcast import (
    BroadcastQueue,
    GatherQueue,
    InheritedEndpoint,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SegmentError,
)

TIMEOUT = 10.0


# -- forked children --------------------------------------------------------------------------


def _every_call(queue: Any) -> dict[str, Callable[[], Any]]:
    """Every call of an endpoint that uses its stream, as zero-argument functions."""

    def entered(cm: Any) -> None:
        with cm:
            pass

    return {
        "put": lambda: queue.put("x", timeout=0),
        "put_bytes": lambda: queue.put_bytes(b"x", timeout=0),
        "put_many": lambda: queue.put_many(["x"], timeout=0),
        "reserve": lambda: entered(queue.reserve(1, timeout=0)),
        "get": lambda: queue.get(timeout=0),
        "get_bytes": lambda: queue.get_bytes(timeout=0),
        "get_many": lambda: queue.get_many(4, timeout=0),
        "view": lambda: entered(queue.view(timeout=0)),
        "wait_until_ready": lambda: queue.wait_until_ready(timeout=0),
    }


def child_uses_inherited(writer: BroadcastQueue, reader: BroadcastQueue, gw: Any, gr: Any,
                         handle: Any) -> dict[str, str]:  # fmt: skip
    """In a forked child: every call on every inherited endpoint; then close them, attach an
    index of its own and read through it.  Returns what each call raised."""
    seen = {}
    for label, queue in (("writer", writer), ("reader", reader), ("gather writer", gw),
                         ("gather reader", gr)):  # fmt: skip
        for name, call in _every_call(queue).items():
            try:
                call()
                seen[f"{label}.{name}"] = "returned"
            except Exception as exc:
                seen[f"{label}.{name}"] = f"{type(exc).__name__}: {exc}"
        queue.close()  # forgets the endpoint here; the parent's is unaffected
    with BroadcastQueue.attach(handle, 1) as own:
        seen["own index"] = repr(own.get(timeout=TIMEOUT))
    return seen


@pytest.mark.timeout(60)
def test_a_forked_child_cannot_use_its_parents_endpoints() -> None:
    with (
        BroadcastQueue(2, n_slots=8, slot_size=256) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
        GatherQueue(1, n_slots=8, slot_size=256) as gr,
        GatherQueue.attach(gr.handle, 0) as gw,
        process_group("fork") as group,
    ):
        writer.put("before the fork", timeout=TIMEOUT)
        gw.put("reply before the fork", timeout=TIMEOUT)
        child = group.start(child_uses_inherited, writer, reader, gw, gr, writer.handle)
        seen = group.result(child)
        for call, what in seen.items():
            if call != "own index":
                assert what.startswith("InheritedEndpoint:"), (call, what)
                assert f"process {os.getpid()}" in what and "attach" in what, what
        assert seen["own index"] == "'before the fork'"
        # The parent's endpoints and stream are untouched: nothing taken, nothing sent.
        assert reader.get(timeout=TIMEOUT) == "before the fork"
        assert gr.get(timeout=TIMEOUT) == "reply before the fork"
        writer.put("after", timeout=TIMEOUT)
        assert reader.get(timeout=TIMEOUT) == "after"
        with pytest.raises(QueueTimeout):
            reader.get(timeout=0)
        assert isinstance(InheritedEndpoint("x"), RuntimeError)


def child_forks_and_uses(handle: Any) -> str:
    """Attach, fork, and in the grandchild try the inherited endpoint (under any start
    method, the fork inside the child is a fork)."""
    with BroadcastQueue.attach(handle, 0) as reader:
        pid = os.fork()
        if pid == 0:
            try:
                reader.get(timeout=0)
                code = 1
            except InheritedEndpoint:
                code = 0
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return f"grandchild {os.waitstatus_to_exitcode(status)}, then {reader.get(timeout=TIMEOUT)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_inherited_endpoints_refuse_under_every_start_method(method: str) -> None:
    with BroadcastQueue(1, n_slots=8, slot_size=256) as writer, process_group(method) as group:
        child = group.start(child_forks_and_uses, writer.handle)
        writer.wait_until_ready(timeout=TIMEOUT)
        writer.put("for the child", timeout=TIMEOUT)
        assert group.result(child) == "grandchild 0, then for the child"


# -- exceptions from signal handlers, at any point --------------------------------------------


def writer_sends_numbered(handle: Any, count: int, capacity: int, seed: int) -> int:
    """Attach as writer 0 of a gather queue, or (for a broadcast handle) this is never used."""
    rng = random.Random(seed)
    with GatherQueue.attach(handle, 0) as queue:
        for seq in range(count):
            queue.put_bytes(make_message(0, seq, rng.randint(16, 3 * capacity), rng), timeout=30)
    return count


@pytest.mark.timeout(120, method="thread")
def test_interrupted_gets_deliver_every_message_once_and_in_order() -> None:
    count = 1500
    writer = BroadcastQueue(1, n_slots=8, slot_size=512)
    reader = BroadcastQueue.attach(writer.handle, 0)
    errors: list[BaseException] = []
    sender = threading.Thread(target=broadcast_sender, args=(writer, count, 1, errors))
    interrupter = Interrupter(seed=2)
    received: list[bytes] = []
    rng = random.Random(3)
    try:
        sender.start()
        with interrupter.running():
            while len(received) < count:
                how = rng.choice(RECEIVES)
                interrupter.armed = True
                try:
                    got = interrupted_receive(reader, how, interrupter, TIMEOUT)
                except KeyboardInterrupt:
                    continue  # the handler disarmed itself
                interrupter.armed = False
                received += got
    finally:
        sender.join(60)
        reader.close()
        writer.close()
    assert not errors, errors
    assert interrupter.raised >= 100, f"only {interrupter.raised} interrupts landed"
    seqs = [message_source_and_seq(m)[1] for m in received]
    assert seqs == list(range(count)), "a message was lost, doubled or reordered"
    problems = [message_error(m, 0, i) for i, m in enumerate(received)]
    assert problems == [None] * count


@pytest.mark.timeout(120, method="thread")
def test_interrupted_gather_gets_deliver_every_message_once_and_in_order() -> None:
    count = 800
    with GatherQueue(1, n_slots=8, slot_size=512) as queue, process_group("fork") as group:
        child = group.start(writer_sends_numbered, queue.handle, count, queue.capacity, 4)
        interrupter = Interrupter(seed=5)
        received: list[bytes] = []
        rng = random.Random(6)
        with interrupter.running():
            while len(received) < count:
                how = rng.choice(RECEIVES)
                interrupter.armed = True
                try:
                    got = interrupted_receive(queue, how, interrupter, TIMEOUT)
                except KeyboardInterrupt:
                    continue
                interrupter.armed = False
                received += got
        assert group.result(child) == count
    assert interrupter.raised >= 50, f"only {interrupter.raised} interrupts landed"
    assert [message_source_and_seq(m)[1] for m in received] == list(range(count))
    assert [message_error(m, 0, i) for i, m in enumerate(received)] == [None] * count


def reader_collects(handle: Any, index: int, until: int) -> list[int]:
    """Read (checking each message) until message number ``until`` or the writer closes."""
    seqs = []
    with BroadcastQueue.attach(handle, index) as queue:
        while True:
            try:
                data = queue.get(timeout=30)  # the bytes, whether sent raw or as an object
            except QueueClosed:
                return seqs
            _source, seq = message_source_and_seq(data)
            assert message_error(data, 0, seq) is None, message_error(data, 0, seq)
            seqs.append(seq)
            if seq == until:
                return seqs


SENDS = ("put_bytes", "put", "put_many", "reserve")


def _send(queue: BroadcastQueue, how: str, message: bytes) -> None:
    if how == "put_bytes":
        queue.put_bytes(message, timeout=TIMEOUT)
    elif how == "put":
        queue.put(message, timeout=TIMEOUT)
    elif how == "put_many":
        queue.put_many([message], timeout=TIMEOUT)
    else:
        with queue.reserve(len(message), timeout=TIMEOUT) as region:
            region[:] = message


@pytest.mark.timeout(120, method="thread")
def test_interrupted_puts_send_whole_messages_or_nothing() -> None:
    count = 1500
    rng = random.Random(7)
    interrupted: set[int] = set()
    with (
        BroadcastQueue(1, n_slots=8, slot_size=512) as writer,
        process_group("fork") as group,
    ):
        child = group.start(reader_collects, writer.handle, 0, count - 1)
        writer.wait_until_ready(timeout=TIMEOUT)
        interrupter = Interrupter(seed=8)
        with interrupter.running():
            seq = 0
            while seq < count:
                size = rng.choice([16, 100, 300, writer.capacity, 3 * writer.capacity])
                message = make_message(0, seq, size, rng)
                how = rng.choice(SENDS[:3] if size > writer.capacity else SENDS)
                interrupter.armed = True
                try:
                    _send(writer, how, message)
                except KeyboardInterrupt:
                    interrupted.add(seq)  # sent or not: the reader tells; never half
                interrupter.armed = False
                seq += 1
        if count - 1 in interrupted:
            writer.put_bytes(make_message(0, count - 1, 16, rng), timeout=TIMEOUT)
        got = group.result(child)
    assert interrupter.raised >= 100, f"only {interrupter.raised} interrupts landed"
    assert got == sorted(set(got)), "a message arrived twice or out of order"
    missing = set(range(count)) - set(got)
    assert missing <= interrupted, f"lost without an interrupt: {sorted(missing - interrupted)}"


# -- views are read-only ----------------------------------------------------------------------


def test_everything_view_hands_out_is_read_only() -> None:
    with (
        BroadcastQueue(2, n_slots=8, slot_size=4096) as writer,
        BroadcastQueue.attach(writer.handle, 0) as first,
        BroadcastQueue.attach(writer.handle, 1) as second,
    ):
        array = np.arange(1000, dtype=np.float64)
        writer.put({"array": array, "raw": pickle.PickleBuffer(bytearray(b"abc"))}, timeout=TIMEOUT)
        writer.put_bytes(b"raw message", timeout=TIMEOUT)
        with first.view(timeout=TIMEOUT) as obj:
            assert not obj["array"].flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                obj["array"][0] = -1.0
            raw = memoryview(obj["raw"])  # any out-of-band buffer
            assert raw.readonly and bytes(raw) == b"abc"
            with pytest.raises(TypeError):
                raw[0] = 0
            raw.release()
        with first.view(timeout=TIMEOUT) as raw:
            assert raw.readonly
            with pytest.raises(TypeError):
                raw[0] = 0
        # The other reader gets the original, and get() gives objects the caller owns.
        got = second.get(timeout=TIMEOUT)
        np.testing.assert_array_equal(got["array"], array)
        got["array"][0] = -1.0  # its own copy
        assert second.get_bytes(timeout=TIMEOUT) == b"raw message"


def streamed_sender(writer: BroadcastQueue, obj: Any) -> None:
    writer.put(obj, timeout=30)


def test_a_streamed_message_in_view_is_read_only_too() -> None:
    with (
        BroadcastQueue(1, n_slots=4, slot_size=1024) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
    ):
        array = np.arange(4 * writer.capacity // 8, dtype=np.int64)  # larger than the ring
        sender = threading.Thread(target=streamed_sender, args=(writer, array))
        sender.start()
        try:
            with reader.view(timeout=30) as got:
                np.testing.assert_array_equal(got, array)
                with pytest.raises(ValueError, match="read-only"):
                    got[0] = 1
        finally:
            sender.join(30)


def test_calls_on_the_wrong_role_say_so_and_leave_the_guard_free() -> None:
    with (
        BroadcastQueue(1, n_slots=4, slot_size=64) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
    ):
        for _ in range(3):
            with pytest.raises(RoleError):
                writer.get(timeout=0)
            with pytest.raises(RoleError):
                reader.put("x", timeout=0)
        writer.put("fine", timeout=0)
        assert reader.get(timeout=0) == "fine"


# -- checksums: a payload changed in the ring is never handed out unseen ----------------------


def _pairs(kind: str) -> tuple[Any, Any, Any]:
    """(sender, receiver, the mapping a stray process would write through) of a small queue
    with checksums."""
    if kind == "broadcast":
        writer = BroadcastQueue(1, n_slots=4, slot_size=256, checksum=True)
        return writer, BroadcastQueue.attach(writer.handle, 0), writer._seg.buf
    reader = GatherQueue(1, n_slots=4, slot_size=256, checksum=True)
    return GatherQueue.attach(reader.handle, 0), reader, reader._seg.buf


def _scribble_on(ring: memoryview, payload: bytes) -> None:
    """Change one byte of ``payload`` where it lies in the ring (a stray process would)."""
    at = bytes(ring).find(payload)
    assert at > 0, "the payload is not in the ring"
    ring[at + len(payload) // 2] ^= 0xFF


KINDS = ("broadcast", "gather")
RECEIVE_CALLS = {
    "get": lambda q: q.get(timeout=TIMEOUT),
    "get_bytes": lambda q: q.get_bytes(timeout=TIMEOUT),
    "get_many": lambda q: q.get_many(4, timeout=TIMEOUT),
}


@pytest.mark.parametrize("how", RECEIVE_CALLS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_payload_changed_in_the_ring_is_refused_not_delivered(kind: str, how: str) -> None:
    sender, receiver, ring = _pairs(kind)
    with sender, receiver:
        payload = random.Random(1).randbytes(300)
        sender.put_bytes(payload, timeout=TIMEOUT)
        _scribble_on(ring, payload)
        for _ in range(2):  # refused, and not consumed: refused again
            with pytest.raises(SegmentError, match="fail their checksum"):
                RECEIVE_CALLS[how](receiver)


@pytest.mark.parametrize("kind", KINDS)
def test_a_payload_changed_while_viewed_raises_when_the_block_ends(kind: str) -> None:
    """A view's bytes lie in the ring for the whole block; with checksums they are checked
    when the message is taken and again when the block ends, so a change made while the
    caller looked at them raises SegmentError there (the message is not consumed)."""
    sender, receiver, ring = _pairs(kind)
    with sender, receiver:
        payload = random.Random(2).randbytes(300)
        sender.put_bytes(payload, timeout=TIMEOUT)
        with (
            pytest.raises(SegmentError, match="fail their checksum"),
            receiver.view(timeout=TIMEOUT) as view,
        ):
            assert bytes(view) == payload  # intact when taken
            _scribble_on(ring, payload)
        with pytest.raises(SegmentError, match="fail their checksum"):
            receiver.get(timeout=TIMEOUT)
        # An unchanged payload goes through a view block as usual.
        sender2, receiver2, _ring2 = _pairs(kind)
        with sender2, receiver2:
            sender2.put({"a": np.arange(40)}, timeout=TIMEOUT)
            with receiver2.view(timeout=TIMEOUT) as obj:
                np.testing.assert_array_equal(obj["a"], np.arange(40))
            with pytest.raises(QueueTimeout):
                receiver2.get(timeout=0)  # consumed


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_with_checksums_seals_what_the_caller_wrote(kind: str) -> None:
    """With checksums, reserve() hands out a private buffer and copies it into the ring at the
    block's end: what a stray process writes into the reserved slots during the block is
    overwritten, never sealed in, and a change after the seal is refused."""
    sender, receiver, ring = _pairs(kind)
    with sender, receiver:
        first, second = random.Random(3).randbytes(300), random.Random(4).randbytes(300)
        with sender.reserve(len(first), timeout=TIMEOUT) as region:
            region[:] = first
            assert bytes(ring).find(first) < 0  # not in the ring yet
        assert receiver.get_bytes(timeout=TIMEOUT) == first
        with sender.reserve(len(second), timeout=TIMEOUT) as region:
            region[:] = second
        _scribble_on(ring, second)
        with pytest.raises(SegmentError, match="fail their checksum"):
            receiver.get_bytes(timeout=TIMEOUT)
