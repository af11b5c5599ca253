"""The native core: atomics, futex wait/wake, and shm_open/shm_unlink (shmcast._native)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import math
import mmap
import os
import platform
import random
import secrets
import signal
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from _procs import futex_waiter, process_group

from shmcast import SegmentError, _native
from shmcast._segment import SHM_DIR

SIZE = 4096
U64 = 2**64
U32 = 2**32


@contextlib.contextmanager
def atomics_over(size: int) -> Iterator[_native.Atomics]:
    """Atomics over a fresh zero-filled, page-aligned anonymous mapping of ``size`` bytes,
    released (if the test has not) and unmapped afterwards."""
    mapping = mmap.mmap(-1, size)
    a = _native.Atomics(mapping)
    try:
        yield a
    finally:
        with contextlib.suppress(BufferError):
            a.release()
        mapping.close()


@pytest.fixture
def atomics() -> Iterator[_native.Atomics]:
    """Atomics over a mapping of SIZE bytes."""
    with atomics_over(SIZE) as a:
        yield a


def wake_until_woken(a: _native.Atomics, off: int, timeout: float = 10.0) -> int:
    """Call ``wake32`` until it reports that it woke someone (a waiter is asleep by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        woken = a.wake32(off, 1)
        if woken:
            return woken
        time.sleep(0.001)
    raise AssertionError(f"nobody was asleep on offset {off} within {timeout} s")


def test_have_futex_on_linux() -> None:
    assert _native.HAVE_FUTEX == 1


# -- 64-bit words -----------------------------------------------------------------------------


def test_load_store_64(atomics: _native.Atomics) -> None:
    assert atomics.load64(0) == 0
    atomics.store64(8, 0x0123_4567_89AB_CDEF)
    assert atomics.load64(8) == 0x0123_4567_89AB_CDEF
    assert atomics.load64(0) == 0 and atomics.load64(16) == 0  # neighbours untouched
    atomics.store64(SIZE - 8, U64 - 1)
    assert atomics.load64(SIZE - 8) == U64 - 1
    atomics.store64(24, -1)  # negative values wrap, as in C
    assert atomics.load64(24) == U64 - 1


def test_store64_is_little_endian_in_the_buffer() -> None:
    mapping = mmap.mmap(-1, SIZE)
    a = _native.Atomics(mapping)
    a.store64(0, 0x0102030405060708)
    assert mapping[:8] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    a.release()
    mapping.close()


def test_add64_returns_new_value_and_wraps(atomics: _native.Atomics) -> None:
    assert atomics.add64(0, 5) == 5
    assert atomics.add64(0, 10) == 15
    assert atomics.load64(0) == 15
    assert atomics.add64(0, U64 - 1) == 14  # adding 2**64-1 subtracts one
    atomics.store64(8, U64 - 1)
    assert atomics.add64(8, 2) == 1


def test_cas64(atomics: _native.Atomics) -> None:
    atomics.store64(0, 7)
    assert atomics.cas64(0, 7, 9) is True
    assert atomics.load64(0) == 9
    assert atomics.cas64(0, 7, 11) is False
    assert atomics.load64(0) == 9  # unchanged on failure
    assert atomics.cas64(0, 9, U64 - 1) is True
    assert atomics.load64(0) == U64 - 1


# -- 32-bit words -----------------------------------------------------------------------------


def test_load_store_32(atomics: _native.Atomics) -> None:
    atomics.store32(4, 0xDEADBEEF)
    assert atomics.load32(4) == 0xDEADBEEF
    assert atomics.load32(0) == 0 and atomics.load32(8) == 0
    atomics.store32(12, U32 + 5)  # truncated to 32 bits
    assert atomics.load32(12) == 5
    atomics.store32(SIZE - 4, U32 - 1)
    assert atomics.load32(SIZE - 4) == U32 - 1


def test_add32_returns_new_value_and_wraps(atomics: _native.Atomics) -> None:
    assert atomics.add32(0, 3) == 3
    assert atomics.add32(0, 0xFFFFFFFF) == 2  # the queue's way of subtracting one
    atomics.store32(4, U32 - 1)
    assert atomics.add32(4, 1) == 0
    assert atomics.load32(8) == 0  # no carry into the next word


def test_cas32(atomics: _native.Atomics) -> None:
    atomics.store32(0, 1)
    assert atomics.cas32(0, 1, 2) is True
    assert atomics.cas32(0, 1, 3) is False
    assert atomics.load32(0) == 2


def test_exchange32_returns_old_value(atomics: _native.Atomics) -> None:
    assert atomics.exchange32(0, 5) == 0
    assert atomics.exchange32(0, 6) == 5
    assert atomics.load32(0) == 6


def test_fence(atomics: _native.Atomics) -> None:
    assert atomics.fence() is None


def test_atomic_adds_from_threads_lose_nothing(atomics: _native.Atomics) -> None:
    per_thread, n_threads = 20_000, 4

    def work() -> None:
        for _ in range(per_thread):
            atomics.add64(0, 1)
            atomics.add32(8, 1)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert atomics.load64(0) == per_thread * n_threads
    assert atomics.load32(8) == per_thread * n_threads


# -- futex wait / wake ------------------------------------------------------------------------


def test_wait32_times_out_and_returns_false(atomics: _native.Atomics) -> None:
    started = time.monotonic()
    assert atomics.wait32(0, 0, 0.2) is False
    assert time.monotonic() - started >= 0.19


def test_wait32_zero_timeout_returns_at_once(atomics: _native.Atomics) -> None:
    assert atomics.wait32(0, 0, 0.0) is False


def test_wait32_returns_at_once_when_value_differs(atomics: _native.Atomics) -> None:
    atomics.store32(0, 1)
    started = time.monotonic()
    assert atomics.wait32(0, 0, 30.0) is True
    assert time.monotonic() - started < 5.0  # far below the 30 s it would sleep otherwise


@pytest.mark.parametrize("bad", [-1.0, math.nan, 86401.0, math.inf])
def test_wait32_rejects_bad_timeouts(atomics: _native.Atomics, bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        atomics.wait32(0, 0, bad)


def test_wait32_timeout_must_be_a_number(atomics: _native.Atomics) -> None:
    with pytest.raises(TypeError):
        atomics.wait32(0, 0, "1")


def test_wake32_without_waiters_wakes_nobody(atomics: _native.Atomics) -> None:
    assert atomics.wake32(0, 1) == 0
    assert atomics.wake32(0, 0) == 0  # n < 1 means all


def test_wake32_wakes_a_waiter_in_another_thread(atomics: _native.Atomics) -> None:
    outcome: list[tuple[bool, float]] = []

    def waiter() -> None:
        started = time.monotonic()
        woken = atomics.wait32(64, 0, 30.0)
        outcome.append((woken, time.monotonic() - started))

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert wake_until_woken(atomics, 64) == 1
    finally:
        thread.join(35)
    assert outcome and outcome[0][0] is True
    assert outcome[0][1] < 25.0  # woken, not timed out


def test_wake32_wakes_all_with_n_below_one(atomics: _native.Atomics) -> None:
    n_waiters = 3
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(atomics.wait32(0, 0, 30.0)))
        for _ in range(n_waiters)
    ]
    for t in threads:
        t.start()
    try:
        woken = 0
        deadline = time.monotonic() + 10
        while woken < n_waiters and time.monotonic() < deadline:
            woken += atomics.wake32(0, 0)
            time.sleep(0.005)
        assert woken == n_waiters
    finally:
        for t in threads:
            t.join(35)
    assert results == [True] * n_waiters


@pytest.mark.timeout(60)
def test_wake32_wakes_a_waiter_in_another_process() -> None:
    name = "/shmcast-test-native-" + secrets.token_hex(4)
    fd = _native.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        mapping = mmap.mmap(fd, SIZE)
        os.close(fd)
        a = _native.Atomics(mapping)
        a.store32(128, 42)
        with process_group("fork", timeout=30) as group:
            child = group.start(futex_waiter, name, 128, 42, 30.0)
            assert wake_until_woken(a, 128) == 1
            woken, elapsed = group.result(child)
        assert woken is True
        assert elapsed < 25.0
        a.release()
        mapping.close()
    finally:
        _native.shm_unlink(name)


# -- Cursor -----------------------------------------------------------------------------------

# A small ring in a SIZE-byte buffer: 4 slots of 256 bytes, and the words around it.
W_SEQ, W_MSGS, R_SEQ, R_MSGS = 0, 32, 128, 160
SLEEPERS, DATA_FUTEX, W_SLEEPING, SPACE_FUTEX = 256, 384, 512, 640
DESC_OFF, DATA_OFF, N_SLOTS, SLOT = 1024, 2048, 4, 256
FIRST, CONT, PAD, CONTIG = 1, 2, 4, 8
RAW, OBJECT = 1, 2
DESC = struct.Struct("<QIIQQI28x")  # total, check, flags, msg_no, seq, crc; a 64-byte line
KEY = 0x5EED_C0FFEE  # the ring's nonce, which keys the descriptors' check words


class Ring:
    """A writer and a reader cursor over one anonymous mapping (the test's segment)."""

    def __init__(self) -> None:
        self.mapping = mmap.mmap(-1, SIZE)
        self.a = _native.Atomics(self.mapping)
        self.writer = _native.Cursor(self.a, N_SLOTS, SLOT, DATA_OFF, DESC_OFF, W_SEQ, W_MSGS,
                                     W_SEQ, SLEEPERS, DATA_FUTEX, 0, key=KEY)  # fmt: skip
        self.writer.bound = N_SLOTS  # the gate with every slot free
        self.reader = _native.Cursor(self.a, N_SLOTS, SLOT, DATA_OFF, DESC_OFF, R_SEQ, R_MSGS,
                                     W_SEQ, W_SLEEPING, SPACE_FUTEX, 1, key=KEY)  # fmt: skip

    def desc(self, index: int) -> tuple[int, ...]:
        """(total, check, flags, msg_no, seq, crc) of slot ``index``."""
        return DESC.unpack_from(self.mapping, DESC_OFF + DESC.size * index)

    def fields(self, index: int) -> tuple[int, int, int, int]:
        """(total, flags, msg_no, seq) of slot ``index``: the descriptor without its checks."""
        total, _check, flags, msg_no, seq, _crc = self.desc(index)
        return total, flags, msg_no, seq

    def set_desc(self, seq: int, total: int, flags: int, msg_no: int = 0) -> None:
        """A valid descriptor for the slot at sequence ``seq``, as the writer stores it."""
        self.writer.write_desc(seq, total, flags, msg_no)

    def poke_desc(self, index: int, *fields: int) -> None:
        """Raw values into slot ``index``'s descriptor: (total, check, flags, msg_no, seq,
        crc)."""
        DESC.pack_into(self.mapping, DESC_OFF + DESC.size * index, *fields)

    def data(self, index: int, nbytes: int) -> bytes:
        return self.mapping[DATA_OFF + SLOT * index : DATA_OFF + SLOT * index + nbytes]

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.a.release()
        self.mapping.close()


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring()
    yield r
    r.close()


def test_cursor_put_stores_descriptor_and_data_then_publishes(ring: Ring) -> None:
    assert ring.writer.put((b"head", bytearray(b"-"), memoryview(b"tail")), OBJECT, True)
    assert ring.data(0, 9) == b"head-tail"
    assert ring.fields(0) == (9, FIRST | CONTIG | OBJECT << 8, 0, 0)
    assert ring.a.load64(W_MSGS) == 1
    assert ring.a.load64(W_SEQ) == 1 == ring.writer.pos == ring.writer.stored
    # 300 bytes take two slots; the message number counts on; the descriptor names its slot.
    assert ring.writer.put((b"x" * 300,), RAW, True)
    assert ring.fields(1) == (300, FIRST | CONTIG | RAW << 8, 1, 1)
    assert ring.a.load64(W_SEQ) == 3 and ring.writer.msgs == 2
    assert ring.reader.read_desc(0) == (9, FIRST | CONTIG | OBJECT << 8, 0, 0)
    assert ring.reader.read_desc(1) == (300, FIRST | CONTIG | RAW << 8, 1, 0)  # no checksums


def test_cursor_put_of_nothing_takes_one_slot(ring: Ring) -> None:
    assert ring.writer.put((), RAW, True)
    assert ring.fields(0)[:2] == (0, FIRST | CONTIG | RAW << 8)
    assert ring.a.load64(W_SEQ) == 1


def test_cursor_put_takes_fortran_ordered_buffers(ring: Ring) -> None:
    np = pytest.importorskip("numpy")
    array = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert ring.writer.put((array,), RAW, True)
    assert ring.data(0, 12) == array.tobytes(order="A")  # its bytes as they lie in memory


def test_cursor_put_declines_past_the_gate_and_writes_nothing(ring: Ring) -> None:
    ring.writer.bound = 1
    assert ring.writer.put((b"x" * 300,), RAW, True) is False  # needs slots 0 and 1
    assert ring.a.load64(W_SEQ) == 0 and ring.writer.pos == 0 and ring.writer.msgs == 0
    assert ring.desc(0) == (0,) * 6 and ring.data(0, 4) == bytes(4)


def test_cursor_put_declines_a_message_that_would_wrap(ring: Ring) -> None:
    ring.writer.pos = ring.writer.stored = 3
    ring.writer.bound = 3 + N_SLOTS
    assert ring.writer.put((b"x" * 300,), RAW, True) is False  # slot 3 is the last one
    assert ring.writer.put((b"x" * SLOT * N_SLOTS + b"x",), RAW, True) is False  # > ring
    assert ring.writer.put((b"x" * 200,), RAW, True) is True  # one slot still fits
    assert ring.writer.pos == 4


def test_cursor_put_declines_too_many_parts(ring: Ring) -> None:
    assert ring.writer.put([b"a"] * 9, RAW, True) is False
    assert ring.writer.put([b"a"] * 8, RAW, True) is True


def test_cursor_put_rejects_parts_that_are_not_buffers(ring: Ring) -> None:
    with pytest.raises(TypeError):
        ring.writer.put((b"ok", "not bytes"), RAW, True)
    with pytest.raises(TypeError):
        ring.writer.put(42, RAW, True)
    assert ring.writer.pos == 0 and ring.a.load64(W_SEQ) == 0


def test_cursor_put_held_back_until_flush(ring: Ring) -> None:
    assert ring.writer.put((b"a",), RAW, False)
    assert ring.writer.put((b"b",), RAW, False)
    assert ring.writer.pos == 2 and ring.a.load64(W_SEQ) == 0  # not published yet
    assert ring.reader.next() is None
    ring.writer.flush()
    assert ring.a.load64(W_SEQ) == 2 == ring.writer.stored


def test_cursor_next_and_finish_release_the_slots(ring: Ring) -> None:
    assert ring.reader.next() is None  # nothing published
    ring.writer.put((b"x" * 300,), OBJECT, True)
    kind, off, nbytes, slots = ring.reader.next()
    assert (kind, off, nbytes, slots) == (OBJECT, DATA_OFF, 300, 2)
    assert ring.reader.bound == 2  # write_seq as seen
    assert ring.a.load64(R_SEQ) == 0  # next() consumes nothing
    ring.reader.finish(slots, False)
    assert ring.a.load64(R_SEQ) == 2 and ring.a.load64(R_MSGS) == 1
    ring.writer.put((b"y",), OBJECT, True)
    ring.reader.finish(ring.reader.next()[3], True)  # deferred
    assert ring.reader.pos == 3 and ring.a.load64(R_SEQ) == 2
    ring.reader.flush()
    assert ring.a.load64(R_SEQ) == 3


def test_cursor_take_bytes(ring: Ring) -> None:
    ring.writer.put((b"hello ", b"world"), RAW, True)
    ring.writer.put((b"obj",), OBJECT, True)
    assert ring.reader.last is None
    assert ring.reader.take_bytes(RAW) == b"hello world"
    assert ring.reader.last == b"hello world"  # kept for the caller until it clears it
    ring.reader.last = None
    assert ring.a.load64(R_SEQ) == 1 and ring.a.load64(R_MSGS) == 1
    assert ring.reader.take_bytes(RAW) is None  # an object: left where it is
    assert ring.a.load64(R_SEQ) == 1
    assert ring.reader.take_bytes(OBJECT) == b"obj"
    assert ring.reader.take_bytes(RAW) is None  # nothing left


@pytest.mark.parametrize(
    ("total", "flags"),
    [
        (2, PAD),  # padding: skipped by the general path
        (600, CONT | RAW << 8),  # a continuation slot
        (600, FIRST | RAW << 8),  # the first slot of a streamed message
    ],
)
def test_cursor_next_declines_what_the_general_path_handles(
    ring: Ring, total: int, flags: int
) -> None:
    ring.set_desc(0, total, flags)
    ring.a.store64(W_SEQ, 1)
    assert ring.reader.next() is None
    assert ring.reader.take_bytes(RAW) is None
    assert ring.reader.pos == 0 and ring.a.load64(R_SEQ) == 0


@pytest.mark.parametrize(
    ("total", "flags", "write_seq", "why"),
    [
        (SLOT * N_SLOTS + 1, FIRST | CONTIG | RAW << 8, 1, "cannot start"),  # beyond the ring
        (SLOT * 2, FIRST | CONTIG | RAW << 8, 1, "only partly published"),  # one store publishes
        (8, FIRST | CONTIG | 7 << 8, 1, "flags"),  # an unknown kind
        (8, FIRST | CONTIG | 16 | RAW << 8, 1, "flags"),  # an unknown flag
    ],
)
def test_cursor_next_refuses_what_no_writer_stores(
    ring: Ring, total: int, flags: int, write_seq: int, why: str
) -> None:
    ring.set_desc(0, total, flags)
    ring.a.store64(W_SEQ, write_seq)
    for take in (ring.reader.next, lambda: ring.reader.take_bytes(RAW)):
        with pytest.raises(SegmentError, match=why):
            take()
    assert ring.reader.pos == 0 and ring.a.load64(R_SEQ) == 0


def test_cursor_next_refuses_a_message_running_past_the_end(ring: Ring) -> None:
    ring.set_desc(3, 2 * SLOT, FIRST | CONTIG | RAW << 8)
    ring.a.store64(W_SEQ, 7)
    ring.reader.pos = ring.reader.stored = ring.reader.bound = 3
    with pytest.raises(SegmentError, match="cannot start at slot 3"):
        ring.reader.next()


def test_cursor_refuses_a_write_sequence_that_cannot_be(ring: Ring) -> None:
    ring.reader.pos = ring.reader.stored = ring.reader.bound = 5
    ring.a.store64(W_SEQ, 4)  # behind the reader
    with pytest.raises(SegmentError, match="behind this reader"):
        ring.reader.next()
    with pytest.raises(SegmentError, match="behind this reader"):
        ring.reader.observe()
    ring.a.store64(W_SEQ, 5 + N_SLOTS + 1)  # more than a ring ahead
    with pytest.raises(SegmentError, match="more than the ring"):
        ring.reader.next()
    ring.a.store64(W_SEQ, U64 - 1)  # the largest value: no overflow anywhere
    with pytest.raises(SegmentError, match="more than the ring"):
        _native.scan([ring.reader], 0)
    assert ring.reader.bound == 5  # nothing impossible was taken in


def test_cursor_refuses_stale_foreign_and_corrupted_descriptors(ring: Ring) -> None:
    ring.writer.put((b"first",), RAW, True)
    fields = ring.desc(0)
    # A descriptor left from another lap (or a write sequence moved forward): another seq.
    ring.writer.write_desc(N_SLOTS, 5, FIRST | CONTIG | RAW << 8, 0)  # sequence 4 is slot 0
    with pytest.raises(SegmentError, match="descriptor of sequence 4"):
        ring.reader.next()
    # Random bytes, or a descriptor copied from a queue with another key: the check fails.
    ring.poke_desc(0, fields[0] + 1, *fields[1:])
    with pytest.raises(SegmentError, match="fails its check"):
        ring.reader.next()
    other = _native.Cursor(ring.a, N_SLOTS, SLOT, DATA_OFF, DESC_OFF, W_SEQ, W_MSGS, W_SEQ,
                           SLEEPERS, DATA_FUTEX, 0, key=KEY + 1)  # fmt: skip
    other.write_desc(0, 5, FIRST | CONTIG | RAW << 8, 0)
    with pytest.raises(SegmentError, match="fails its check"):
        ring.reader.read_desc(0)
    ring.poke_desc(0, *fields)  # the real one again: delivered
    assert ring.reader.take_bytes(RAW) == b"first"


def test_cursor_notices_a_slot_reused_while_it_was_read(ring: Ring) -> None:
    ring.writer.put((b"x" * 10,), OBJECT, True)
    slots = ring.reader.next()[3]
    # A stray process moved this reader's sequence on, and the writer reused the slot while
    # the message was being read: its descriptor (stored before its data) says so.
    ring.writer.write_desc(N_SLOTS, 10, FIRST | CONTIG | OBJECT << 8, 9)
    with pytest.raises(SegmentError, match="changed while it was read"):
        ring.reader.finish(slots, False)
    assert ring.reader.pos == 0 and ring.a.load64(R_SEQ) == 0  # nothing released
    with pytest.raises(SegmentError, match="changed while it was read"):
        ring.reader.release(1)


def test_cursor_flush_without_flag_stores_and_does_not_wake(ring: Ring) -> None:
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(ring.a.wait32(DATA_FUTEX, 0, 1.0)))
    thread.start()
    try:
        time.sleep(0.1)  # let it fall asleep (if it is not asleep yet, nothing changes)
        ring.writer.put((b"x",), RAW, True)
        assert ring.a.load64(W_SEQ) == 1
        assert ring.a.load32(DATA_FUTEX) == 0  # not bumped: nobody announced it sleeps
    finally:
        thread.join(5)
    assert outcome == [False]  # it slept until its timeout


def test_cursor_flush_with_flag_bumps_and_wakes(ring: Ring) -> None:
    outcome: list[tuple[bool, float]] = []

    def waiter() -> None:
        started = time.monotonic()
        outcome.append((ring.a.wait32(SPACE_FUTEX, 0, 30.0), time.monotonic() - started))

    ring.writer.put((b"x",), RAW, True)
    ring.a.store32(W_SLEEPING, 1)  # the writer announced it sleeps for space
    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        # The waiter may not be asleep yet; the bump of the futex word makes a late wait32
        # return at once, so it cannot miss the wake either way.
        time.sleep(0.05)
        ring.reader.finish(ring.reader.next()[3], False)
        assert ring.a.load64(R_SEQ) == 1
        assert ring.a.load32(SPACE_FUTEX) == 1
    finally:
        thread.join(35)
    assert outcome and outcome[0][0] is True and outcome[0][1] < 25.0


def test_cursor_with_a_count_wakes_once_per_announced_sleep() -> None:
    sleepers, count, futex = 256, 264, 384
    with atomics_over(1 << 16) as a:
        w = _native.Cursor(a, 8, 256, 8192, 4096, 0, 32, 0, sleepers, futex, 0, count_off=count)
        w.bound = 8
        w.put((b"a",), RAW, True)  # nobody sleeps: no wake
        assert a.load32(futex) == 0
        a.add64(count, 1)  # a reader announces a sleep ...
        w.put((b"b",), RAW, True)  # ... and is awake again (sleepers 0): no wake
        assert a.load32(futex) == 0
        a.add32(sleepers, 1)  # now it sleeps
        w.put((b"c",), RAW, True)  # the count moved since the last wake (there was none)
        assert a.load32(futex) == 1
        w.put((b"d",), RAW, True)  # woken, not yet run (still counted asleep): no new wake
        assert a.load32(futex) == 1
        a.add64(count, 1)  # it announces its next sleep
        w.put((b"e",), RAW, True)
        assert a.load32(futex) == 2
        assert a.load64(0) == 5  # every message was published all the same
        with pytest.raises(ValueError, match="aligned"):
            _native.Cursor(a, 8, 256, 8192, 4096, 0, 32, 0, sleepers, futex, 0, count_off=count + 4)


def test_cursor_put_declines_large_messages_from_early_on() -> None:
    with atomics_over(1 << 20) as a:
        n, slot = 4, 128 * 1024
        w = _native.Cursor(a, n, slot, 2 * slot, 4096, 0, 32, 0, 256, 384, 0)
        w.bound = n
        assert w.early == 2**64 - 1  # never, until the ring's writer sets it
        w.early = 1
        big = bytes(_native.EARLY_WRAP_MIN)
        assert w.put((big,), RAW, True)  # before early
        assert w.put((big,), RAW, True) is False  # at early: declined, nothing written
        assert w.pos == 1 and a.load64(0) == 1
        assert w.put((big[:-1],), RAW, True)  # a smaller message is taken
        assert w.pos == 2


def test_cursor_big_copies_release_the_gil_and_arrive_intact() -> None:
    with atomics_over(4 * 1024 * 1024) as a:
        n, slot = 4, 512 * 1024
        w = _native.Cursor(a, n, slot, 2 * slot, 4096, 0, 32, 0, 256, 384, 0)
        r = _native.Cursor(a, n, slot, 2 * slot, 4096, 128, 160, 0, 512, 640, 1)
        w.bound = n
        payload = secrets.token_bytes(3 * slot // 2)
        assert w.put((payload[:1000], payload[1000:]), RAW, True)
        assert r.take_bytes(RAW) == payload
        assert r.pos == 2


def test_cursor_checks_its_geometry_at_creation() -> None:
    mapping = mmap.mmap(-1, SIZE)
    a = _native.Atomics(mapping)
    try:
        args = [a, N_SLOTS, SLOT, DATA_OFF, DESC_OFF, R_SEQ, R_MSGS, W_SEQ, W_SLEEPING,
                SPACE_FUTEX, 1]  # fmt: skip
        _native.Cursor(*args)
        for index, bad, error in [
            (1, 100, ValueError),  # 100 slots of 256 bytes do not fit
            (3, SIZE - 100, ValueError),  # data past the end
            (4, 4, ValueError),  # descriptors misaligned
            (5, 4, ValueError),  # sequence word misaligned
            (8, SIZE, IndexError),  # flag word out of range
            (0, b"not atomics", TypeError),
        ]:
            with pytest.raises(error):
                _native.Cursor(*args[:index], bad, *args[index + 1 :])
        a.release()
        with pytest.raises(ValueError, match="released"):
            _native.Cursor(*args)
    finally:
        mapping.close()


def test_cursor_after_release_raises(ring: Ring) -> None:
    ring.a.release()
    for call in (
        lambda: ring.writer.put((b"x",), RAW, True),
        ring.reader.next,
        lambda: ring.reader.finish(1, False),
        lambda: ring.reader.take_bytes(RAW),
        ring.writer.flush,
    ):
        with pytest.raises(ValueError, match="released"):
            call()


def test_cursor_keeps_its_atomics_alive() -> None:
    mapping = mmap.mmap(-1, SIZE)
    a = _native.Atomics(mapping)
    c = _native.Cursor(a, N_SLOTS, SLOT, DATA_OFF, DESC_OFF, W_SEQ, W_MSGS, W_SEQ,
                       SLEEPERS, DATA_FUTEX, 0)  # fmt: skip
    del a
    gc.collect()
    with pytest.raises(BufferError):
        mapping.close()  # the Atomics object lives on in the cursor, with its buffer export
    c.bound = N_SLOTS
    assert c.put((b"still mapped",), RAW, True)
    del c
    gc.collect()
    mapping.close()  # gone with the cursor, export released


def test_scan_finds_the_first_published_ring_round_robin() -> None:
    rings = [Ring() for _ in range(3)]
    try:
        readers = [r.reader for r in rings]
        assert _native.scan(readers, 0) == -1  # nothing published anywhere
        assert _native.scan([], 0) == -1
        rings[0].writer.put((b"a",), RAW, True)
        rings[2].writer.put((b"c",), RAW, True)
        assert _native.scan(readers, 0) == 0
        assert _native.scan(readers, 1) == 2  # round robin: from 1 on, ring 2 comes first
        assert _native.scan(readers, 3) == 0  # start wraps around
        assert readers[2].bound == 1  # refreshed by the look
        assert readers[2].take_bytes(RAW) == b"c"
        assert _native.scan(readers, 1) == 0
        with pytest.raises(TypeError):
            _native.scan((readers[0],), 0)
        with pytest.raises(TypeError):
            _native.scan([readers[0], "not a cursor"], 1)
    finally:
        for r in rings:
            r.close()


# -- min_seq ----------------------------------------------------------------------------------


def _lines(a: _native.Atomics, entries: list[tuple[int, int]], stride: int = 128) -> None:
    """Write (seq, state) pairs as lines of ``stride`` bytes: seq at +0, state at +12."""
    for i, (seq, state) in enumerate(entries):
        a.store64(i * stride, seq)
        a.store32(i * stride + 12, state)


ANY = (0, U64 - 1, 0xF)  # no bound on the sequences; the four states of the layout


def test_min_seq_with_masks(atomics: _native.Atomics) -> None:
    _lines(atomics, [(50, 1), (10, 4), (30, 2), (40, 8), (20, 2)])
    assert atomics.min_seq(0, 128, 5, 12, 1 | 2, *ANY) == 20  # entry 1 (state 4) is excluded
    assert atomics.min_seq(0, 128, 5, 12, 4, *ANY) == 10
    assert atomics.min_seq(0, 128, 5, 12, 1, *ANY) == 50
    assert atomics.min_seq(0, 128, 5, 12, 0xFF, *ANY) == 10
    assert atomics.min_seq(0, 128, 5, 12, 16, *ANY) is None  # nobody qualifies
    assert atomics.min_seq(0, 128, 0, 12, 0xFF, *ANY) is None  # no entries at all
    assert atomics.min_seq(128, 128, 2, 12, 2, *ANY) == 30  # starting at the second line


def test_min_seq_full_64_bit_values(atomics: _native.Atomics) -> None:
    _lines(atomics, [(U64 - 1, 1), (U64 - 2, 1)])
    assert atomics.min_seq(0, 128, 2, 12, 1, *ANY) == U64 - 2


def test_min_seq_refuses_what_the_caller_proves_impossible(atomics: _native.Atomics) -> None:
    _lines(atomics, [(50, 1), (10, 4), (30, 2)])
    assert atomics.min_seq(0, 128, 3, 12, 1 | 2, 30, 50, 0xF) == 30
    with pytest.raises(SegmentError, match="participant 2 is at sequence 30"):
        atomics.min_seq(0, 128, 3, 12, 1 | 2, 31, 50, 0xF)  # below the bound
    with pytest.raises(SegmentError, match="participant 0 is at sequence 50"):
        atomics.min_seq(0, 128, 3, 12, 1 | 2, 0, 49, 0xF)  # above it
    assert atomics.min_seq(0, 128, 3, 12, 2, 30, 30, 0xF) == 30  # entry 1 is not counted ...
    _lines(atomics, [(50, 1), (10, 3)])  # ... but its state is checked: two bits
    with pytest.raises(SegmentError, match="participant 1 has an unknown state 3"):
        atomics.min_seq(0, 128, 2, 12, 1, *ANY)
    _lines(atomics, [(50, 1), (10, 16)])  # one bit, not a state
    with pytest.raises(SegmentError, match="unknown state 16"):
        atomics.min_seq(0, 128, 2, 12, 1, *ANY)


def test_min_seq_errors(atomics: _native.Atomics) -> None:
    with pytest.raises(ValueError):
        atomics.min_seq(0, 128, -1, 12, 1, *ANY)
    with pytest.raises(ValueError):
        atomics.min_seq(0, -128, 2, 12, 1, *ANY)
    with pytest.raises(IndexError):
        atomics.min_seq(0, 128, SIZE // 128 + 1, 12, 1, *ANY)  # runs past the buffer
    with pytest.raises(ValueError, match="aligned"):
        atomics.min_seq(4, 128, 1, 12, 1, *ANY)
    with pytest.raises(ValueError, match="aligned"):
        atomics.min_seq(0, 128, 1, 10, 1, *ANY)


# -- bounds, alignment, arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("load64", (SIZE,)),
        ("load64", (SIZE - 4,)),
        ("load64", (-8,)),
        ("store64", (SIZE, 1)),
        ("add64", (-8, 1)),
        ("cas64", (SIZE, 0, 1)),
        ("load32", (SIZE,)),
        ("load32", (-4,)),
        ("store32", (SIZE, 1)),
        ("add32", (SIZE, 1)),
        ("cas32", (SIZE, 0, 1)),
        ("exchange32", (SIZE, 1)),
        ("wait32", (SIZE, 0, 0.0)),
        ("wake32", (SIZE, 1)),
    ],
)
def test_out_of_range_offsets_raise_index_error(
    atomics: _native.Atomics, method: str, args: tuple
) -> None:
    with pytest.raises(IndexError, match="out of range"):
        getattr(atomics, method)(*args)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("load64", (4,)),
        ("store64", (12, 1)),
        ("add64", (1, 1)),
        ("cas64", (2, 0, 1)),
        ("load32", (2,)),
        ("store32", (1, 1)),
        ("add32", (3, 1)),
        ("cas32", (6, 0, 1)),
        ("exchange32", (2, 1)),
        ("wait32", (2, 0, 0.0)),
        ("wake32", (1, 1)),
    ],
)
def test_misaligned_offsets_raise_value_error(
    atomics: _native.Atomics, method: str, args: tuple
) -> None:
    with pytest.raises(ValueError, match="aligned"):
        getattr(atomics, method)(*args)


def test_wrong_argument_counts_and_types(atomics: _native.Atomics) -> None:
    with pytest.raises(TypeError, match="load64"):
        atomics.load64()
    with pytest.raises(TypeError, match="store32"):
        atomics.store32(0)
    with pytest.raises(TypeError):
        atomics.load64("0")
    with pytest.raises(TypeError):
        atomics.store64(0, 1.5)


def test_atomics_needs_a_writable_aligned_buffer() -> None:
    with pytest.raises(BufferError, match="not writable"):
        _native.Atomics(b"\0" * 64)
    with pytest.raises(TypeError):
        _native.Atomics(12345)  # not a buffer at all
    mapping = mmap.mmap(-1, SIZE)
    view = memoryview(mapping)
    try:
        with pytest.raises(ValueError, match="aligned"):
            _native.Atomics(view[4:])
        a = _native.Atomics(view[8:])  # 8-aligned slices are fine
        assert a.nbytes == SIZE - 8
        a.release()
    finally:
        view.release()
        mapping.close()


def test_atomics_holds_the_buffer_until_released() -> None:
    mapping = mmap.mmap(-1, SIZE)
    a = _native.Atomics(mapping)
    with pytest.raises(BufferError):
        mapping.close()  # exported to the Atomics object
    a.release()
    mapping.close()


# -- release ----------------------------------------------------------------------------------


def test_release_then_use_raises(atomics: _native.Atomics) -> None:
    assert atomics.released is False
    assert atomics.nbytes == SIZE
    atomics.release()
    assert atomics.released is True
    assert atomics.nbytes == 0
    atomics.release()  # idempotent
    for call in (
        lambda: atomics.load64(0),
        lambda: atomics.store32(0, 1),
        lambda: atomics.add64(0, 1),
        lambda: atomics.wait32(0, 0, 0.0),
        lambda: atomics.wake32(0, 1),
        lambda: atomics.min_seq(0, 128, 1, 12, 1, *ANY),
    ):
        with pytest.raises(ValueError, match="released"):
            call()


def _in_futex_wait(native_tid: int) -> bool:
    """True while thread ``native_tid`` of this process sits in the futex system call."""
    sys_futex = {"x86_64": 202, "aarch64": 98}[platform.machine()]
    try:
        with open(f"/proc/self/task/{native_tid}/syscall") as f:
            return f.read().split()[0] == str(sys_futex)
    except (OSError, IndexError):
        return False


def test_release_refused_while_a_thread_waits(atomics: _native.Atomics) -> None:
    tid: list[int] = []

    def waiter() -> None:
        tid.append(threading.get_native_id())
        atomics.wait32(0, 0, 30.0)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not (tid and _in_futex_wait(tid[0])):
            assert time.monotonic() < deadline, "the thread never went to sleep in wait32"
            time.sleep(0.005)
        with pytest.raises(BufferError, match="waiting"):
            atomics.release()
        assert atomics.released is False
        assert atomics.load32(0) == 0  # still usable
    finally:
        wake_until_woken(atomics, 0)
        thread.join(35)
    atomics.release()
    assert atomics.released is True


# -- the GIL and signals ----------------------------------------------------------------------


def test_wait32_releases_the_gil(atomics: _native.Atomics) -> None:
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.02)
        before = counter[0]
        atomics.wait32(0, 0, 0.3)  # the main thread sits in C for 0.3 s
        during = counter[0] - before
    finally:
        stop.set()
        thread.join(10)
    # With the GIL held for 0.3 s the other thread could not have counted at all.
    assert during > 1000


def test_wait32_is_interrupted_by_a_signal_handler_that_raises(atomics: _native.Atomics) -> None:
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    timer = threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGUSR1))
    try:
        timer.start()
        started = time.monotonic()
        with pytest.raises(Interrupted):
            atomics.wait32(0, 0, 30.0)
        assert time.monotonic() - started < 20.0
    finally:
        timer.cancel()
        timer.join(5)
        signal.signal(signal.SIGUSR1, previous)


# -- shm_open / shm_unlink --------------------------------------------------------------------


def test_shm_open_and_unlink() -> None:
    name = "/shmcast-test-native-" + secrets.token_hex(4)
    path = os.path.join(SHM_DIR, name[1:])
    fd = _native.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        assert os.path.exists(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # close-on-exec
        os.ftruncate(fd, SIZE)
        os.write(fd, b"hello")
        with pytest.raises(FileExistsError):
            _native.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fd2 = _native.shm_open(name, os.O_RDWR, 0)  # the same object again
        try:
            assert os.pread(fd2, 5, 0) == b"hello"
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
        _native.shm_unlink(name)
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        _native.shm_unlink(name)
    with pytest.raises(FileNotFoundError):
        _native.shm_open(name, os.O_RDWR, 0)


def test_shm_open_argument_errors() -> None:
    with pytest.raises(TypeError):
        _native.shm_open(b"/x", os.O_RDWR, 0)
    with pytest.raises(TypeError):
        _native.shm_open("/x", "rw", 0)
    with pytest.raises(TypeError):
        _native.shm_unlink(None)


# -- the core-to-core probe ------------------------------------------------------------------------

ALLOWED_CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(ALLOWED_CPUS) < 2, reason="needs two CPUs")
@pytest.mark.timeout(30)
def test_core_to_core_gives_one_positive_mean_per_batch() -> None:
    means = _native.core_to_core_ns(ALLOWED_CPUS[0], ALLOWED_CPUS[1], 2000, 4, 10.0)
    assert len(means) == 4
    # a round trip moves a line twice between CPUs: more than nothing, less than a timeslice
    assert all(1.0 < m < 1e6 for m in means), means


@pytest.mark.timeout(30)
def test_core_to_core_errors() -> None:
    with pytest.raises(ValueError, match="two different CPUs"):
        _native.core_to_core_ns(0, 0, 100, 1, 1.0)
    with pytest.raises(ValueError, match="two different CPUs"):
        _native.core_to_core_ns(-1, 0, 100, 1, 1.0)
    with pytest.raises(ValueError, match="rounds >= batches"):
        _native.core_to_core_ns(0, 1, 3, 4, 1.0)
    with pytest.raises(ValueError, match="timeout > 0"):
        _native.core_to_core_ns(0, 1, 100, 1, 0.0)
    outside = max(ALLOWED_CPUS) + 1  # a CPU this process may not run on
    with pytest.raises(OSError, match=f"CPU {ALLOWED_CPUS[0]} or {outside}"):
        _native.core_to_core_ns(ALLOWED_CPUS[0], outside, 100, 1, 1.0)


# -- CRC-32C and payload checksums -----------------------------------------------------------


def _crc32c_reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C bit by bit, as the definition has it."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_definition_with_both_kernels() -> None:
    assert _native.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert _native.crc32c(b"") == 0
    rng = random.Random(7)
    for n in (1, 7, 8, 9, 63, 64, 65, 1000, 4099):
        data = rng.randbytes(n)
        expected = _crc32c_reference(data)
        assert _native.crc32c(data) == expected, n
        assert _native.crc32c(data, portable=True) == expected, n
        assert _native.crc32c(memoryview(data)[1:]) == _crc32c_reference(data[1:])  # unaligned
        head, tail = data[: n // 3], data[n // 3 :]
        assert _native.crc32c(tail, _native.crc32c(head)) == expected  # continued
    assert _native.CRC32C_HARDWARE in (0, 1)


def test_checksummed_ring_seals_and_checks_payloads() -> None:
    mapping = mmap.mmap(-1, SIZE)
    a = _native.Atomics(mapping)
    try:
        args = (a, N_SLOTS, SLOT, DATA_OFF, DESC_OFF)
        writer = _native.Cursor(*args, W_SEQ, W_MSGS, W_SEQ, SLEEPERS, DATA_FUTEX, 0, key=KEY,
                                checksum=True)  # fmt: skip
        writer.bound = N_SLOTS
        reader = _native.Cursor(*args, R_SEQ, R_MSGS, W_SEQ, W_SLEEPING, SPACE_FUTEX, 1,
                                key=KEY, checksum=True)  # fmt: skip
        assert writer.checksum == reader.checksum == 1
        payload = random.Random(3).randbytes(300)
        assert writer.put((payload,), RAW, True)
        assert reader.read_desc(0)[3] == _native.crc32c(payload)
        mapping[DATA_OFF + 299] ^= 0xFF  # another process writes into the data
        with pytest.raises(SegmentError, match="fail their checksum"):
            reader.next()
        with pytest.raises(SegmentError, match="fail their checksum"):
            reader.take_bytes(RAW)
        mapping[DATA_OFF + 299] ^= 0xFF
        assert reader.take_bytes(RAW) == payload
        # The slow path: descriptor first, then the data, then the seal, then the publish.
        writer.write_desc(2, 5, FIRST | CONTIG | RAW << 8, 1)
        mapping[DATA_OFF + 2 * SLOT : DATA_OFF + 2 * SLOT + 5] = b"hello"
        with pytest.raises(ValueError, match="needs the payload's CRC-32C"):
            writer.seal(2, 5)  # never computed from the ring: a stray write would be sealed in
        with pytest.raises(ValueError, match="needs the payload's CRC-32C"):
            writer.seal(2, 5, 2**32)
        writer.seal(2, 5, _native.crc32c(b"hello"))
        writer.count_message()
        writer.publish(1, True)
        assert reader.read_desc(2)[3] == _native.crc32c(b"hello")
        assert reader.take_bytes(RAW) == b"hello"
        with pytest.raises(ValueError, match="past the end"):
            writer.seal(3, 2 * SLOT, 0)
    finally:
        with contextlib.suppress(BufferError):
            a.release()
        mapping.close()


def test_the_typed_stub_declares_everything_the_native_module_has() -> None:
    """_native.pyi is the native layer's declared API: every public name of the module, and
    every public method and attribute of its classes, is in it (and nothing else is)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(_native.__file__).with_name("_native.pyi").read_text())
    declared: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            declared[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            declared[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared[node.target.id] = set()
    public = {n for n in dir(_native) if not n.startswith("_")}
    assert public == set(declared)
    for name, members in declared.items():
        obj = getattr(_native, name)
        if isinstance(obj, type):
            actual = {
                m for m in vars(obj) if not m.startswith("_") or m in ("__enter__", "__exit__")
            }
            assert actual == members - {"__init__"}, name
