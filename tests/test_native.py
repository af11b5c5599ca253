"""The native core: atomics, futex wait/wake, and shm_open/shm_unlink (shmcast._native)."""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import platform
import secrets
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from _procs import futex_waiter, process_group

from shmcast import _native
from shmcast._segment import SHM_DIR

SIZE = 4096
U64 = 2**64
U32 = 2**32


@pytest.fixture
def atomics() -> Iterator[_native.Atomics]:
    """Atomics over a fresh zero-filled, page-aligned anonymous mapping of SIZE bytes."""
    mapping = mmap.mmap(-1, SIZE)
    a = _native.Atomics(mapping)
    yield a
    with contextlib.suppress(BufferError):
        a.release()
    mapping.close()


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


def test_store_and_wake_without_flag_stores_and_does_not_wake(atomics: _native.Atomics) -> None:
    seq, flag, futex = 0, 64, 128
    done = threading.Event()
    outcome: list[bool] = []

    def waiter() -> None:
        outcome.append(atomics.wait32(futex, 0, 1.0))
        done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        time.sleep(0.1)  # let it fall asleep (if it is not asleep yet, nothing changes)
        assert atomics.store_and_wake(seq, 99, flag, futex, 0) is False
        assert atomics.load64(seq) == 99
        assert atomics.load32(futex) == 0  # not bumped
    finally:
        thread.join(5)
    assert done.is_set()
    assert outcome == [False]  # it slept until its timeout: nobody woke it


def test_store_and_wake_with_flag_bumps_and_wakes(atomics: _native.Atomics) -> None:
    seq, flag, futex = 0, 64, 128
    outcome: list[tuple[bool, float]] = []

    def waiter() -> None:
        started = time.monotonic()
        outcome.append((atomics.wait32(futex, 0, 30.0), time.monotonic() - started))

    atomics.store32(flag, 1)
    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        # The waiter may not be asleep yet; store_and_wake bumps the futex word, so a late
        # wait32 sees a changed value and returns at once: it cannot miss the wake either way.
        time.sleep(0.05)
        assert atomics.store_and_wake(seq, 7, flag, futex, 1) is True
        assert atomics.load64(seq) == 7
        assert atomics.load32(futex) == 1
    finally:
        thread.join(35)
    assert outcome and outcome[0][0] is True and outcome[0][1] < 25.0


def test_store_and_wake_checks_every_offset(atomics: _native.Atomics) -> None:
    with pytest.raises(ValueError, match="aligned"):
        atomics.store_and_wake(4, 1, 64, 128, 1)  # seq must be 8-aligned
    with pytest.raises(IndexError):
        atomics.store_and_wake(0, 1, SIZE, 128, 1)
    with pytest.raises(ValueError, match="aligned"):
        atomics.store_and_wake(0, 1, 64, 130, 1)
    assert atomics.load64(0) == 0  # nothing stored when an argument is bad


# -- min_seq ----------------------------------------------------------------------------------


def _lines(a: _native.Atomics, entries: list[tuple[int, int]], stride: int = 128) -> None:
    """Write (seq, state) pairs as lines of ``stride`` bytes: seq at +0, state at +12."""
    for i, (seq, state) in enumerate(entries):
        a.store64(i * stride, seq)
        a.store32(i * stride + 12, state)


def test_min_seq_with_masks(atomics: _native.Atomics) -> None:
    _lines(atomics, [(50, 1), (10, 4), (30, 2), (40, 8), (20, 2)])
    assert atomics.min_seq(0, 128, 5, 12, 1 | 2) == 20  # entry 1 (state 4) is excluded
    assert atomics.min_seq(0, 128, 5, 12, 4) == 10
    assert atomics.min_seq(0, 128, 5, 12, 1) == 50
    assert atomics.min_seq(0, 128, 5, 12, 0xFF) == 10
    assert atomics.min_seq(0, 128, 5, 12, 16) is None  # nobody qualifies
    assert atomics.min_seq(0, 128, 0, 12, 0xFF) is None  # no entries at all
    assert atomics.min_seq(128, 128, 2, 12, 2) == 30  # starting at the second line


def test_min_seq_full_64_bit_values(atomics: _native.Atomics) -> None:
    _lines(atomics, [(U64 - 1, 1), (U64 - 2, 1)])
    assert atomics.min_seq(0, 128, 2, 12, 1) == U64 - 2


def test_min_seq_errors(atomics: _native.Atomics) -> None:
    with pytest.raises(ValueError):
        atomics.min_seq(0, 128, -1, 12, 1)
    with pytest.raises(ValueError):
        atomics.min_seq(0, -128, 2, 12, 1)
    with pytest.raises(IndexError):
        atomics.min_seq(0, 128, SIZE // 128 + 1, 12, 1)  # runs past the buffer
    with pytest.raises(ValueError, match="aligned"):
        atomics.min_seq(4, 128, 1, 12, 1)
    with pytest.raises(ValueError, match="aligned"):
        atomics.min_seq(0, 128, 1, 10, 1)


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
        lambda: atomics.min_seq(0, 128, 1, 12, 1),
        lambda: atomics.store_and_wake(0, 1, 64, 128, 1),
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
