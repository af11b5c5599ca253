"""Every error case: the right exception with a clear message, and nothing lost or corrupted
(after the error, the queue still delivers exactly the right messages)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import mmap
import os
import pickle
import secrets
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from _procs import (
    handle_path,
    plant,
    process_group,
    reader_attach_and_hold,
    unplant,
    writer_then_die,
)

from shmcast import (
    AttachError,
    BroadcastQueue,
    GatherQueue,
    Handle,
    MessageKindError,
    MessageTooLarge,
    QueueBroken,
    QueueClosed,
    QueueTimeout,
    RoleError,
    SegmentError,
    SerializationError,
    _native,
)
from shmcast._layout import LAYOUT_VERSION
from shmcast._segment import new_name

SLOTS, SLOT = 4, 64
CAPACITY = SLOTS * SLOT


@pytest.fixture
def pair() -> Iterator[tuple[BroadcastQueue, BroadcastQueue]]:
    """A writer and its one reader, in this process."""
    writer = BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT)
    reader = BroadcastQueue.attach(writer.handle, 0)
    yield writer, reader
    reader.close()
    writer.close()


def assert_delivers(writer: BroadcastQueue, reader: BroadcastQueue, *expected: Any) -> None:
    """The reader gets exactly ``expected`` (already sent) and then, after one more put, that
    one too: the queue is intact."""
    for value in expected:
        assert reader.get(timeout=5) == value
    with pytest.raises(QueueTimeout):
        reader.get(timeout=0)
    marker = ("intact", secrets.token_hex(4))
    writer.put(marker, timeout=5)
    assert reader.get(timeout=5) == marker


@contextlib.contextmanager
def patched_segment(handle: Handle, offset: int, fmt: str, value: int) -> Iterator[None]:
    """Overwrite a field of a live segment through a mapping of our own; restore it after."""
    fd = os.open(handle_path(handle), os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)
    size = struct.calcsize(fmt)
    saved = mapping[offset : offset + size]
    struct.pack_into(fmt, mapping, offset, value)
    try:
        yield
    finally:
        mapping[offset : offset + size] = saved
        mapping.close()


@contextlib.contextmanager
def foreign_segment(content: bytes) -> Iterator[Handle]:
    """A handle to a shared-memory object with ``content`` that shmcast never made, held open
    by this process (with a name of shmcast's form, removed at once, as shmcast does)."""
    name = new_name()
    fd = _native.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        _native.shm_unlink("/" + name)
        os.write(fd, content)
        yield Handle(name, 0, os.getpid(), fd)
    finally:
        os.close(fd)


# -- handles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["shmcast-x", None, ("shmcast-x", 1), {"name": "x", "nonce": 1}])
def test_attach_needs_a_handle(pair: tuple[BroadcastQueue, BroadcastQueue], bad: Any) -> None:
    with pytest.raises(TypeError, match=r"needs the queue's handle \(queue.handle\)"):
        BroadcastQueue.attach(bad, 0)
    assert_delivers(*pair)


def test_handle_of_a_closed_queue() -> None:
    writer = BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT)
    handle = writer.handle
    writer.close()
    with pytest.raises(SegmentError, match=f"queue '{handle.name}' is gone"):
        BroadcastQueue.attach(handle, 0)


def test_handle_with_another_nonce(pair: tuple[BroadcastQueue, BroadcastQueue]) -> None:
    writer, reader = pair
    writer.put("before", timeout=5)
    stale = dataclasses.replace(writer.handle, nonce=writer.handle.nonce ^ 1)
    with pytest.raises(SegmentError, match="stale handle"):
        BroadcastQueue.attach(stale, 0)
    assert_delivers(writer, reader, "before")


def test_handle_of_the_other_queue_kind() -> None:
    with (
        GatherQueue(1, n_slots=SLOTS, slot_size=SLOT) as gather,
        pytest.raises(SegmentError, match="holds a gather queue, not a broadcast queue"),
    ):
        BroadcastQueue.attach(gather.handle, 0)
    with (
        BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT) as broadcast,
        pytest.raises(SegmentError, match="holds a broadcast queue"),
    ):
        GatherQueue.attach(broadcast.handle, 0)


def test_handles_pickle() -> None:
    with BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT) as writer:
        handle = writer.handle
        assert pickle.loads(pickle.dumps(handle)) == handle
        assert len(pickle.dumps(handle)) < 200  # small: a name and three numbers


# -- reader indices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "words"),
    [
        (1, r"reader index 1 is out of range: this queue has 1 reader\(s\), indices 0 to 0"),
        (-1, "reader index -1 is out of range"),
        (10**9, "out of range"),
        ("0", "reader index must be an int, not str"),
        (0.0, "must be an int, not float"),
        (True, "must be an int, not bool"),
        (None, "must be an int, not NoneType"),
    ],
)
def test_bad_reader_index(
    pair: tuple[BroadcastQueue, BroadcastQueue], index: Any, words: str
) -> None:
    writer, reader = pair
    writer.put("kept", timeout=5)
    with pytest.raises(AttachError, match=words) as info:
        BroadcastQueue.attach(writer.handle, index)
    assert isinstance(info.value, ValueError)
    assert_delivers(writer, reader, "kept")


def test_index_already_attached_in_this_process(
    pair: tuple[BroadcastQueue, BroadcastQueue],
) -> None:
    writer, reader = pair
    writer.put("kept", timeout=5)
    with pytest.raises(AttachError, match="reader index 0 is already attached by this process"):
        BroadcastQueue.attach(writer.handle, 0)
    assert_delivers(writer, reader, "kept")


@pytest.mark.timeout(60)
def test_index_attached_by_a_live_process_then_by_a_dead_one() -> None:
    with (
        BroadcastQueue(2, n_slots=SLOTS, slot_size=SLOT) as writer,
        process_group("fork", timeout=30) as group,
    ):
        control, child_end = group.channel()
        holder = group.start(reader_attach_and_hold, writer.handle, 1, child_end)
        with BroadcastQueue.attach(writer.handle, 0) as reader:
            writer.wait_until_ready(timeout=30)
            with pytest.raises(AttachError, match=f"already attached by pid {holder.pid}"):
                BroadcastQueue.attach(writer.handle, 1)
            group.kill(holder)
            # The index of a dead process is free again.
            with BroadcastQueue.attach(writer.handle, 1) as again:
                writer.put("after", timeout=5)
                assert again.get(timeout=5) == "after"
                assert reader.get(timeout=5) == "after"
        control.close()


# -- closed endpoints and roles ---------------------------------------------------------------


def _calls(queue: BroadcastQueue) -> dict[str, Any]:
    """Every public blocking call of a queue, as zero-argument functions."""

    def entered(cm: Any) -> Any:
        with cm:
            pass

    return {
        "put": lambda: queue.put("x", timeout=0),
        "put_bytes": lambda: queue.put_bytes(b"x", timeout=0),
        "reserve": lambda: entered(queue.reserve(1, timeout=0)),
        "get": lambda: queue.get(timeout=0),
        "get_bytes": lambda: queue.get_bytes(timeout=0),
        "view": lambda: entered(queue.view(timeout=0)),
        "wait_until_ready": lambda: queue.wait_until_ready(timeout=0),
    }


@pytest.mark.parametrize("method", sorted(_calls(None)))  # type: ignore[arg-type]
def test_every_call_after_close_raises_queue_closed(method: str) -> None:
    writer = BroadcastQueue(2, n_slots=SLOTS, slot_size=SLOT)
    reader = BroadcastQueue.attach(writer.handle, 0)
    other = BroadcastQueue.attach(writer.handle, 1)
    try:
        writer.put("for the other reader", timeout=5)
        reader.close()
        with pytest.raises(QueueClosed, match=r"reader 0 .* closed"):
            _calls(reader)[method]()
        assert other.get(timeout=5) == "for the other reader"  # others are not affected
        writer.close()
        with pytest.raises(QueueClosed, match=r"writer .* closed"):
            _calls(writer)[method]()
        # Still fine on closed endpoints:
        assert writer.stats().messages == 1 and "closed" in repr(writer)
        assert reader.stats().role == "reader"
    finally:
        other.close()
        reader.close()
        writer.close()


def test_writer_cannot_receive(pair: tuple[BroadcastQueue, BroadcastQueue]) -> None:
    writer, reader = pair
    writer.put("kept", timeout=5)
    for method in ("get", "get_bytes", "view"):
        with pytest.raises(
            RoleError, match="only readers can receive; this endpoint is the writer"
        ):
            _calls(writer)[method]()
    assert_delivers(writer, reader, "kept")


def test_reader_cannot_send(pair: tuple[BroadcastQueue, BroadcastQueue]) -> None:
    writer, reader = pair
    for method in ("put", "put_bytes", "reserve"):
        with pytest.raises(RoleError, match="only the writer can send; this endpoint is reader 0"):
            _calls(reader)[method]()
    assert_delivers(writer, reader)


# -- serialization ----------------------------------------------------------------------------


class Unreducible:
    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")


@pytest.mark.parametrize(
    "obj",
    [lambda: None, threading.Lock(), (i for i in range(3)), [1, Unreducible()]],
    ids=["lambda", "lock", "generator", "nested"],
)
def test_unpicklable_object_sends_nothing(
    pair: tuple[BroadcastQueue, BroadcastQueue], obj: Any
) -> None:
    writer, reader = pair
    writer.put("before", timeout=5)
    with pytest.raises(
        SerializationError, match=f"cannot serialize {type(obj).__name__} object"
    ) as info:
        writer.put(obj, timeout=5)
    assert info.value.__cause__ is not None
    assert writer.stats().messages == 1
    assert_delivers(writer, reader, "before")


class GarbageSerializer:
    """Encodes every object as bytes that are no pickle frame."""

    def dumps(self, obj: Any) -> Sequence[bytes]:
        return [b"\xff" * 40]

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        return bytes(data)


def test_undecodable_message_is_consumed_and_the_next_one_arrives() -> None:
    with (
        BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT, serializer=GarbageSerializer()) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,  # the default pickle serializer
    ):
        writer.put("anything", timeout=5)
        writer.put_bytes(b"next", timeout=5)
        with pytest.raises(SerializationError, match=r"cannot decode message|corrupted"):
            reader.get(timeout=5)
        assert reader.get(timeout=5) == b"next"
        with pytest.raises(QueueTimeout):
            reader.get(timeout=0)


class ShapedSerializer:
    """A serializer whose ``dumps`` returns ``shape(obj)``: whatever a careless one might."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape

    def dumps(self, obj: Any) -> Any:
        return self.shape(obj)

    def loads(self, data: memoryview, *, copy: bool) -> Any:
        return bytes(data)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        (lambda obj: iter([b"abc"]), "must return a list or tuple of buffers, not list_iterator"),
        (lambda obj: (b for b in [b"abc"]), "not generator"),
        (lambda obj: b"abc", "not bytes"),
        (lambda obj: "abc", "not str"),
        (lambda obj: None, "not NoneType"),
        (lambda obj: 7, "not int"),
        (lambda obj: {0: b"abc"}, "not dict"),
        (lambda obj: [b"ok", "a str part"], "part 1 .* is not a contiguous buffer \\(str"),
        (lambda obj: [3], "part 0 .* is not a contiguous buffer \\(int"),
        (lambda obj: (np.ones((4, 4))[:, ::2],), "part 0 .* not a contiguous buffer"),
    ],
    ids=["iterator", "generator", "bytes", "str", "none", "int", "dict", "str-part", "int-part",
         "strided-part"],
)  # fmt: skip
def test_a_serializer_returning_no_sequence_of_buffers_is_refused(shape: Any, words: str) -> None:
    """SerializationError saying what came back, and nothing sent, nothing lost: the message
    before arrives, and so does the one after."""
    with (
        BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT, serializer=ShapedSerializer(shape)) as w,
        BroadcastQueue.attach(w.handle, 0) as reader,
    ):
        w.put_bytes(b"before", timeout=5)
        for _ in range(2):  # twice: the refusal left the writer as it was
            with pytest.raises(SerializationError, match=words):
                w.put("anything", timeout=5)
        assert w.stats().messages == 1
        w.put_bytes(b"after", timeout=5)
        assert reader.get(timeout=5) == b"before"
        assert reader.get(timeout=5) == b"after"
        with pytest.raises(QueueTimeout):
            reader.get(timeout=0)


def test_put_bytes_takes_a_fortran_ordered_array(
    pair: tuple[BroadcastQueue, BroadcastQueue],
) -> None:
    writer, reader = pair
    array = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert array.flags.f_contiguous and not array.flags.c_contiguous
    writer.put_bytes(array, timeout=5)
    assert reader.get(timeout=5) == array.tobytes(order="A")  # memory order, as a buffer has it
    strided = np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2]
    with pytest.raises(TypeError, match="needs a contiguous buffer"):
        writer.put_bytes(strided, timeout=5)
    assert_delivers(writer, reader)


BAD_HANDLE_NAMES = [".", "..", "", "x" * 300, "shmcast-" + "0" * 300, "nul\x00byte",
                    "bad\udcffsurrogate", "ümlaut", "a/../../etc/passwd", "/dev/shm/x"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_HANDLE_NAMES)
def test_handles_with_bad_names_are_refused(
    pair: tuple[BroadcastQueue, BroadcastQueue], bad: str
) -> None:
    writer, reader = pair
    forged = dataclasses.replace(writer.handle, name=bad)
    with pytest.raises(SegmentError, match="invalid"):
        BroadcastQueue.attach(forged, 1)
    with pytest.raises(SegmentError, match="invalid"):
        GatherQueue.attach(forged, 0)
    assert_delivers(writer, reader)


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_handles_naming_what_is_no_segment_are_refused(
    pair: tuple[BroadcastQueue, BroadcastQueue], tmp_path: Any, kind: str
) -> None:
    """A handle whose name is a directory, a symlink or a fifo planted in /dev/shm, with the
    descriptor number of a live queue: refused, never followed, nothing of the queue harmed."""
    writer, reader = pair
    name = new_name()
    path = os.path.join("/dev/shm", name)
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(8192))
    plant(name)  # made on purpose: another test run's leak check leaves it alone
    {"directory": os.mkdir, "fifo": os.mkfifo,
     "symlink": lambda p: os.symlink(target, p)}[kind](path)  # fmt: skip
    try:
        with pytest.raises(SegmentError):
            BroadcastQueue.attach(dataclasses.replace(writer.handle, name=name), 1)
    finally:
        (os.rmdir if kind == "directory" else os.unlink)(path)
        unplant(name)
    assert target.read_bytes() == bytes(8192)
    assert_delivers(writer, reader)


# -- numbers in the segment that no writer or reader could have stored ------------------------

HUGE = (1 << 64) - 1


def hostile_operations(
    writer: BroadcastQueue, reader: BroadcastQueue, first: str | None
) -> dict[str, Any]:
    """Every operation that reads a participant's words, run once (``first`` first: a
    participant that runs rewrites its own words); per operation the type of what it raised
    (None: it returned)."""
    from shmcast._tools import inspection

    def fill() -> None:
        for _ in range(SLOTS + 1):
            writer.put_bytes(b"x" * SLOT, timeout=0.3)

    def take_all() -> None:
        for _ in range(2 * SLOTS + 2):  # the last one waits: the queue is empty by then
            reader.get(timeout=0.3)

    operations = {
        "attach": lambda: BroadcastQueue.attach(writer.handle, 1).close(),
        "put": fill,
        "get": take_all,
        "stats": writer.stats,
        "ls": inspection.list_segments,
        "inspect": lambda: inspection.format_queue_state(
            inspection.inspect_queue(writer.handle.name)
        ),
        "cleanup": lambda: inspection.cleanup(dry_run=True),
    }
    order = sorted(operations, key=lambda what: what != first)
    outcome: dict[str, Any] = {}
    for what in order:
        try:
            operations[what]()
            outcome[what] = None
        except Exception as exc:  # what escapes is what the test looks at
            outcome[what] = type(exc)
    return outcome


LINES = {"writer": 128, "reader 0": 7 * 128, "reader 1": 8 * 128}  # L.BCAST_WRITER_OFF, L.PEERS_OFF
#: The operation that relies on a word, and must raise SegmentError when it is impossible.
RELIES_ON = {
    ("writer", "pid"): "get",  # a waiting reader asks whether its writer is alive
    ("writer", "seq"): "get",  # published more than the ring holds
    ("reader 1", "pid"): "attach",  # an attaching reader asks who holds the index
    ("reader 0", "seq"): "put",  # a read sequence ahead of the write sequence
}


@pytest.mark.parametrize("field", [("pid", 16), ("start", 24), ("seq", 0), ("messages", 32)],
                         ids=lambda f: f[0])  # fmt: skip
@pytest.mark.parametrize("line", list(LINES))
def test_huge_words_in_a_participant_line_raise_documented_errors(
    line: str, field: tuple[str, int]
) -> None:
    """2**64-1 in any word of any participant line: every operation returns or raises an
    error of shmcast's hierarchy (never OverflowError), the one that relies on the word raises
    SegmentError, and once the word is restored the queue works again.  (Not for a sequence
    word its owner rewrote meanwhile: restoring the old value would be a corruption itself.)"""
    from shmcast import ShmcastError
    from shmcast import _layout as L

    assert (LINES["writer"], LINES["reader 0"]) == (L.BCAST_WRITER_OFF, L.PEERS_OFF)
    name, offset = field
    relies = RELIES_ON.get((line, name))
    with (
        BroadcastQueue(2, n_slots=SLOTS, slot_size=SLOT) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
    ):
        with patched_segment(writer.handle, LINES[line] + offset, "<Q", HUGE):
            outcome = hostile_operations(writer, reader, relies)
        escaped = {
            k: v for k, v in outcome.items() if v is not None and not issubclass(v, ShmcastError)
        }
        assert not escaped, f"undocumented exceptions: {escaped}"
        if relies is not None:
            assert outcome[relies] is SegmentError, outcome
        if name == "seq" and line != "reader 1":
            return
        BroadcastQueue.attach(writer.handle, 1).close()  # index 1 no longer holds the writer
        with contextlib.suppress(QueueTimeout):
            for _ in range(2 * SLOTS):
                reader.get(timeout=0)
        writer.put("after", timeout=5)
        assert reader.get(timeout=5) == "after"


# -- segments that are not (or no longer) a valid queue ---------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (os.urandom(8192), "is not a shmcast queue \\(bad magic"),
        (b"SHMCAST\x00" + bytes(8184), "layout version 0"),
        (b"garbage", "too small"),
        (b"", "is empty"),
    ],
    ids=["random", "zero-header", "tiny", "empty"],
)
def test_foreign_segment(content: bytes, words: str) -> None:
    with foreign_segment(content) as handle:
        with pytest.raises(SegmentError, match=words):
            BroadcastQueue.attach(handle, 0)
        os.fstat(handle.fd)  # untouched: still open


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "words"),
    [
        (0, "<Q", 0x1122334455667788, "bad magic"),
        (
            8,
            "<I",
            LAYOUT_VERSION - 1,
            f"has layout version {LAYOUT_VERSION - 1}; this shmcast reads version {LAYOUT_VERSION}",
        ),
        (12, "<I", 9, "corrupted header \\(unknown kind 9\\)"),
        (32, "<I", 0, "corrupted header: n_readers must be between 1"),
        (36, "<I", 1, "corrupted header: n_slots"),
        (40, "<Q", 100, "corrupted header: slot_size"),
        (36, "<I", 5000, "inconsistent offsets"),
        (72, "<Q", 0, "inconsistent offsets"),
        (24, "<Q", 1 << 30, "inconsistent offsets"),
    ],
    ids=[
        "magic",
        "version",
        "kind",
        "readers",
        "slots",
        "slot-size",
        "geometry",
        "desc-off",
        "total-size",
    ],
)
def test_corrupted_live_segment(offset: int, fmt: str, value: int, words: str) -> None:
    with (
        BroadcastQueue(2, n_slots=SLOTS, slot_size=SLOT) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
    ):
        writer.put("before", timeout=5)
        with (
            patched_segment(writer.handle, offset, fmt, value),
            pytest.raises(SegmentError, match=words),
        ):
            BroadcastQueue.attach(writer.handle, 1)
        # Restored: the failed attach took nothing, and nothing was lost.
        with BroadcastQueue.attach(writer.handle, 1) as late:
            assert late.get(timeout=5) == "before"
        assert_delivers(writer, reader, "before")


def test_truncated_segment() -> None:
    with BroadcastQueue(1, n_slots=SLOTS, slot_size=SLOT) as writer:
        total = os.fstat(writer.handle.fd).st_size
        with (
            patched_segment(writer.handle, 24, "<Q", total + 4096),
            pytest.raises(SegmentError, match=r"inconsistent offsets|truncated"),
        ):
            BroadcastQueue.attach(writer.handle, 0)


# -- message kinds and sizes ------------------------------------------------------------------


def test_get_bytes_on_an_object_message(pair: tuple[BroadcastQueue, BroadcastQueue]) -> None:
    writer, reader = pair
    writer.put({"an": "object"}, timeout=5)
    with pytest.raises(
        MessageKindError, match="is an object sent with put\\(\\); read it with get"
    ) as info:
        reader.get_bytes(timeout=5)
    assert isinstance(info.value, TypeError)
    assert reader.stats().messages == 0
    assert_delivers(writer, reader, {"an": "object"})


def test_get_bytes_on_a_streamed_object_message(
    pair: tuple[BroadcastQueue, BroadcastQueue],
) -> None:
    writer, reader = pair
    big = np.arange(3 * CAPACITY // 8, dtype=np.int64)  # larger than the ring: streamed
    sender = threading.Thread(target=writer.put, args=(big,), kwargs={"timeout": 30})
    sender.start()
    try:
        with pytest.raises(MessageKindError):
            reader.get_bytes(timeout=5)
        np.testing.assert_array_equal(reader.get(timeout=30), big)
    finally:
        sender.join(30)
    assert_delivers(writer, reader)


def test_reserve_larger_than_the_ring(pair: tuple[BroadcastQueue, BroadcastQueue]) -> None:
    writer, reader = pair
    with (
        pytest.raises(
            MessageTooLarge, match=f"cannot reserve {CAPACITY + 1} bytes: the ring holds {CAPACITY}"
        ) as info,
        writer.reserve(CAPACITY + 1, timeout=5),
    ):
        pass
    assert isinstance(info.value, ValueError)
    with writer.reserve(CAPACITY, timeout=5) as region:  # exactly the capacity is fine
        region[:] = b"\x01" * CAPACITY
    assert reader.get_bytes(timeout=5) == b"\x01" * CAPACITY
    assert_delivers(writer, reader)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_reserve_needs_a_non_negative_int(
    pair: tuple[BroadcastQueue, BroadcastQueue], bad: Any
) -> None:
    writer, reader = pair
    with (
        pytest.raises(ValueError, match="nbytes must be a non-negative int"),
        writer.reserve(bad, timeout=5),
    ):
        pass
    assert_delivers(writer, reader)


# -- the queue object itself ------------------------------------------------------------------


def test_queue_objects_do_not_pickle(pair: tuple[BroadcastQueue, BroadcastQueue]) -> None:
    writer, reader = pair
    for queue in (writer, reader):
        with pytest.raises(TypeError, match=r"send queue\.handle to the other process"):
            pickle.dumps(queue)
        with pytest.raises(TypeError, match="handle"):
            copy.copy(queue)
    assert_delivers(writer, reader)


@pytest.mark.parametrize(
    ("args", "options", "error", "words"),
    [
        ((0,), {}, ValueError, "n_readers must be between 1"),
        (("2",), {}, TypeError, "n_readers must be an int"),
        ((1,), {"n_slots": 1}, ValueError, "n_slots"),
        ((1,), {"slot_size": 100}, ValueError, "slot_size must be a multiple of 64"),
        ((1,), {"wait": "fastest"}, ValueError, "unknown wait policy"),
        ((1,), {"wait": 3}, TypeError, "wait must be"),
        ((1,), {"serializer": object()}, TypeError, "serializer must have dumps"),
        (
            (1,),
            {"on_dead_reader": "ignore"},
            ValueError,
            "on_dead_reader must be 'raise' or 'drop'",
        ),
    ],
)
def test_bad_queue_parameters(args: tuple, options: dict, error: type, words: str) -> None:
    options = {"n_slots": SLOTS, "slot_size": SLOT, **options}
    with pytest.raises(error, match=words):
        BroadcastQueue(*args, **options)
    # (the leak check verifies that no segment was left behind)


# -- dead peers -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on_dead_reader", ["raise", "drop"])
def test_dead_reader(on_dead_reader: str) -> None:
    with (
        BroadcastQueue(2, n_slots=SLOTS, slot_size=SLOT, on_dead_reader=on_dead_reader) as writer,
        BroadcastQueue.attach(writer.handle, 0) as reader,
        process_group("fork", timeout=30) as group,
    ):
        control, child_end = group.channel()
        victim = group.start(reader_attach_and_hold, writer.handle, 1, child_end)
        writer.wait_until_ready(timeout=30)
        sent = [bytes([i]) * 10 for i in range(SLOTS)]
        for message in sent:
            writer.put_bytes(message, timeout=5)
        group.kill(victim)  # dies holding every slot
        assert [reader.get_bytes(timeout=5) for _ in sent] == sent
        if on_dead_reader == "raise":
            with pytest.raises(QueueBroken, match=f"reader 1 \\(pid {victim.pid}\\) died") as info:
                writer.put_bytes(b"blocked", timeout=10)
            assert info.value.peer == "reader 1" and info.value.pid == victim.pid
            with pytest.raises(QueueBroken):
                writer.put_bytes(b"still blocked", timeout=10)
            assert writer.stats().messages == len(sent)
        else:
            for i in range(3 * SLOTS):  # goes on without the dead reader
                writer.put_bytes(b"go on %d" % i, timeout=10)
                assert reader.get_bytes(timeout=5) == b"go on %d" % i
        control.close()


@pytest.mark.timeout(60)
def test_dead_writer() -> None:
    messages = [b"m%d" % i for i in range(5)]
    name = None
    try:
        with process_group("fork", timeout=30) as group:
            handles, report_end = group.context.Pipe(duplex=False)
            control, child_end = group.channel()
            writer = group.start(writer_then_die, report_end, 1, messages, child_end)
            report_end.close()
            assert handles.poll(30)
            handle = handles.recv()
            name = handle.name
            with BroadcastQueue.attach(handle, 0) as reader:
                assert handles.poll(30) and handles.recv() == "sent"
                group.kill(writer)
                assert [reader.get_bytes(timeout=5) for _ in messages] == messages
                with pytest.raises(
                    QueueBroken,
                    match=f"writer \\(pid {writer.pid}\\) died; everything it published",
                ) as info:
                    reader.get(timeout=10)
                assert info.value.peer == "writer" and info.value.pid == writer.pid
            handles.close()
            control.close()
    finally:
        if name is not None:  # the dead creator could not remove its segment
            with contextlib.suppress(FileNotFoundError):
                _native.shm_unlink("/" + name)
