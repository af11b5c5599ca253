"""Typed interface of the native core (see _csrc/)."""

from collections.abc import Buffer, Callable, Sequence
from typing import Any

HAVE_FUTEX: int
#: 1 when crc32c() uses the CPU's CRC-32C instruction (SSE 4.2), 0 for the portable table.
CRC32C_HARDWARE: int
#: Messages of at least this many bytes are declined by Cursor.put at and after ``early``.
EARLY_WRAP_MIN: int

class Atomics:
    """Atomic operations and futexes on words of a writable buffer, by byte offset.

    Offsets must be naturally aligned and in range (IndexError / ValueError otherwise);
    after :meth:`release` every call raises ValueError.
    """

    def __init__(self, buffer: Buffer) -> None: ...
    @property
    def released(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...
    def load64(self, off: int, /) -> int:
        """Acquire load."""
    def store64(self, off: int, value: int, /) -> None:
        """Release store."""
    def add64(self, off: int, delta: int, /) -> int:
        """Atomic add (sequentially consistent); returns the new value."""
    def cas64(self, off: int, expected: int, desired: int, /) -> bool:
        """Compare-exchange (sequentially consistent)."""
    def load32(self, off: int, /) -> int: ...
    def store32(self, off: int, value: int, /) -> None: ...
    def exchange32(self, off: int, value: int, /) -> int:
        """Atomic exchange (sequentially consistent: a full fence); returns the old value."""
    def add32(self, off: int, delta: int, /) -> int: ...
    def cas32(self, off: int, expected: int, desired: int, /) -> bool: ...
    def fence(self) -> None:
        """Full memory fence."""
    def wait32(self, off: int, expected: int, timeout: float, /) -> bool:
        """Sleep (GIL released) while the word equals ``expected``, at most ``timeout`` s.
        False if the time ran out; True if woken, the value differed, or a signal came."""
    def wake32(self, off: int, n: int, /) -> int:
        """Wake up to ``n`` waiters (n < 1: all); returns how many were woken."""
    def min_seq(
        self,
        first_off: int,
        stride: int,
        count: int,
        state_rel: int,
        mask: int,
        lo: int,
        hi: int,
        valid: int,
        /,
    ) -> int | None:
        """Minimum of the 64-bit words at ``first_off + i*stride`` whose 32-bit state at
        ``+state_rel`` has a bit of ``mask``; None if none qualifies.  SegmentError (naming the
        entry) for a state that is not exactly one bit of ``valid``, or a qualifying word
        outside ``[lo, hi]``."""
    def release(self) -> None:
        """Drop the buffer (BufferError while a thread waits in wait32)."""

class Cursor:
    """One endpoint's position in one ring, and its per-message fast path (see _csrc/).

    Built once per ring endpoint over the segment's :class:`Atomics`; offsets are checked
    then.  Not thread-safe: the queue endpoint serializes calls.  After the Atomics object is
    released every method raises ValueError.
    """

    #: Slots filled (writer) or consumed (reader).
    pos: int
    #: The value last stored in this endpoint's sequence word.
    stored: int
    #: Messages counted (the writer's next message number).
    msgs: int
    #: Writer: the cached gate (slots below it are free); reader: write_seq as last seen.
    bound: int
    #: Writer: from this position on, :meth:`put` declines messages of ``EARLY_WRAP_MIN`` bytes
    #: or more, so that the Python path may wrap early.
    early: int

    def __init__(
        self,
        atomics: Atomics,
        n_slots: int,
        slot_size: int,
        data_off: int,
        desc_off: int,
        seq_off: int,
        msgs_off: int,
        peer_seq_off: int,
        flag_off: int,
        futex_off: int,
        wake_n: int,
        *,
        count_off: int = -1,
        key: int = 0,
        checksum: bool = False,
        sock_off: int = -1,
        lines_off: int = 0,
        n_lines: int = 0,
    ) -> None:
        """With ``count_off`` (a writer), wake readers after a publish only if the u64
        announcement count there moved since the last wake, instead of whenever the u32 at
        ``flag_off`` is non-zero.  With ``sock_off`` (a writer), a wake also sends a datagram
        to every reader asleep on its socket (:func:`sock_signal`) while the u32 there is
        non-zero.  ``key`` (the queue's nonce) keys the check word of every
        descriptor; ``checksum`` makes payloads carry a CRC-32C (written by put/seal, checked
        by next/take_bytes)."""
    #: Whether payloads carry a CRC-32C (read-only).
    checksum: int
    #: Writer: datagrams sent to readers asleep on their socket (read-only).
    signals: int
    #: Reader: what :meth:`take_bytes` returned last, until the caller sets it to None (so a
    #: call interrupted after the copy still delivers it).
    last: bytes | None
    def put(self, parts: Sequence[Buffer], kind: int, publish: bool, /) -> bool:
        """Store the concatenated ``parts`` as one contiguous message at ``pos`` and publish it
        (unless ``publish`` is false).  False, with nothing written, if it would wrap, is not
        covered by ``bound``, or has more than 8 parts."""
    def next(self) -> tuple[int, int, int, int] | None:
        """``(kind, offset, nbytes, slots)`` of the published contiguous message at ``pos``;
        None if there is none (or the next slot needs the general path)."""
    def finish(self, slots: int, defer: bool, /) -> None:
        """Count a delivered message and release its slots (held back if ``defer``)."""
    def take_bytes(self, kind: int, /) -> bytes | None:
        """:meth:`next`, a copy and :meth:`finish` in one call, for a message of ``kind``."""
    def flush(self) -> None:
        """Store ``pos`` if it moved, and wake the peer if it announced it sleeps."""
    def observe(self) -> int:
        """Reader: the writer's sequence (acquire load), checked to lie in ``[pos, pos +
        n_slots]`` (SegmentError otherwise); refreshes ``bound``."""
    def read_desc(self, seq: int, /) -> tuple[int, int, int, int]:
        """``(total, flags, msg_no, crc)`` of the slot at ``seq``, its check word verified
        (SegmentError for a descriptor of another slot, lap or queue)."""
    def release(self, slots: int, /) -> None:
        """Reader: hand ``slots`` read by the slow path back to the writer (the descriptors are
        checked again first: SegmentError, nothing released, if they were reused)."""
    def write_desc(self, seq: int, total: int, flags: int, msg_no: int, /) -> None:
        """Writer: store the descriptor of the slot at ``seq`` (with its check word)."""
    def seal(self, seq: int, nbytes: int, crc: int | None = None, /) -> None:
        """Writer, checksums on: store ``crc``, the CRC-32C of the ``nbytes`` at slot ``seq``
        as computed from their source (never from the ring), in its descriptor; ValueError
        without it.  Without checksums, nothing."""
    def count_message(self) -> int:
        """Writer: spend the next message number and return it."""
    def publish(self, slots: int, flush: bool, /) -> None:
        """Writer: advance by ``slots`` filled and publish them, unless ``flush`` is false
        (held back until the next flush)."""
    def commit(self, slots: int, flush: bool, /) -> int:
        """Writer: count a message of ``slots`` slots and publish it (unless held back);
        returns its message number."""

class Guard:
    """The call guard of one queue endpoint: one call at a time, none after close, none in a
    forked child (the fork generation is recorded by a pthread_atfork handler)."""

    def __init__(self, what: str, on_idle: Callable[[], Any] | None = None) -> None: ...
    @property
    def busy(self) -> bool:
        """True while a call holds the guard."""
    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
    @property
    def owned(self) -> bool:
        """True in the process that made the guard (False in a forked child)."""
    def __enter__(self) -> None:
        """Take the guard: InheritedEndpoint in a forked child, QueueClosed after close,
        RuntimeError while another call holds it."""
    def __exit__(self, *exc: object) -> bool:
        """Give the guard back (and run ``on_idle`` if it was closed meanwhile)."""
    def check(self) -> None:
        """Raise as :meth:`__enter__` would for a forked child or a closed endpoint."""
    def close(self) -> None:
        """Refuse every later call; run ``on_idle`` now if idle, else when the call leaves."""
    def hold(self) -> Hold:
        """Take the guard as :meth:`__enter__` does, for a ``view()`` block that outlives the
        call."""

class Hold:
    """A ``view()`` block: the endpoint's guard, held until the block exits."""

    def set(
        self,
        value: Any,
        *,
        cursor: Cursor | None = None,
        slots: int = 0,
        views: tuple[memoryview, ...] | None = None,
        stash: list[Any] | None = None,
    ) -> None:
        """The message of the block: what ``__enter__`` hands over, the cursor and slots
        ``__exit__`` finishes, the views it releases, the stash whose first entry (an
        undelivered message) ``__enter__`` removes."""
    def release(self) -> None:
        """Give the guard back, consuming nothing (only before the block is entered)."""
    def __enter__(self) -> Any:
        """Hand the value over; the message counts as delivered."""
    def __exit__(self, *exc: object) -> bool:
        """Consume the message, release the views, give the guard back."""

def scan(cursors: list[Cursor], start: int, /) -> int:
    """Index of the first reader cursor, round robin from ``start``, with a published slot at
    its position (refreshing its ``bound``); -1 if none."""

def sock_signal(
    atomics: Atomics, count_off: int, lines_off: int, n_lines: int, nonce: int, /
) -> int:
    """A full fence, then, if the u32 at ``count_off`` is non-zero, one datagram to each of
    the ``n_lines`` reader lines from ``lines_off`` marked asleep on a socket (sleeping word
    ``SLEEP_SOCKET``), at the address :func:`shmcast._sockwake.address` derives from
    ``nonce``, the line's index and its pid.  Returns the number sent."""

def crc32c(data: Buffer, value: int = 0, portable: bool = False) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``value``; ``portable`` forces the
    table-driven code (for tests)."""

def set_errors(
    segment_error: type[Exception], closed_error: type[Exception], inherited_error: type[Exception]
) -> None:
    """The exception classes the native code raises (called once, by shmcast._errors)."""

def shm_open(name: str, flags: int, mode: int, /) -> int:
    """POSIX shm_open (close-on-exec); returns a file descriptor."""

def shm_unlink(name: str, /) -> None:
    """POSIX shm_unlink."""

class Lease:
    """A read-only view of ``buffer[offset:offset+length]`` (it exports the buffer protocol);
    when the last view is gone the 32-bit word at ``mark`` goes from ``owner`` to 0
    (compare-exchange, release)."""

    def __init__(self, buffer: Buffer, offset: int, length: int, mark: int, owner: int) -> None: ...
    @property
    def held(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...

class FutexRing:
    """Futex waits through io_uring, for an event loop to watch (``_csrc/uring.c``).  The
    constructor raises OSError where the kernel cannot (before Linux 6.7, io_uring refused).
    One thread at a time, in the process that made it."""

    def __init__(self) -> None: ...
    def submit_wait(self, atomics: Atomics, off: int, expected: int, tag: int) -> None:
        """Queue FUTEX_WAIT(the 32-bit word at ``off``, ``expected``); its completion comes
        with :meth:`reap`.  IndexError/ValueError for a bad offset, OSError if the kernel
        refuses, ValueError once closed."""
    def reap(self) -> list[tuple[int, int]]:
        """The completions so far, ``(tag, result)``: 0 woken, -11 (EAGAIN) the word had
        changed, another negative errno otherwise."""
    def fileno(self) -> int:
        """The ring's descriptor, readable while a completion waits to be reaped."""
    def close(self) -> None:
        """Release the ring (idempotent); a wait still queued is cancelled."""

def runnable_tasks() -> int:
    """Tasks runnable now on the machine (``/proc/loadavg``, the caller included), or -1."""

def core_to_core_ns(
    cpu_a: int, cpu_b: int, rounds: int, batches: int, timeout: float, /
) -> list[float]:
    """Mean round trip, per batch, in ns, of one cache line passed back and forth between
    two threads pinned to ``cpu_a`` and ``cpu_b`` (a benchmark diagnostic; Linux only).
    ValueError on bad arguments, OSError when a thread cannot run on its CPU, TimeoutError
    past ``timeout`` seconds.  Releases the GIL; the caller's own affinity is unchanged."""
