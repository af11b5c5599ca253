"""Typed interface of the native core (see _native.c)."""

from collections.abc import Buffer

HAVE_FUTEX: int

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
    def store_and_wake(
        self, seq_off: int, value: int, flag_off: int, futex_off: int, n: int, /
    ) -> bool:
        """Release-store ``value`` at ``seq_off``, full fence, and if the 32-bit word at
        ``flag_off`` is non-zero, bump ``futex_off`` and wake ``n`` waiters (n < 1: all)."""
    def min_seq(
        self, first_off: int, stride: int, count: int, state_rel: int, mask: int, /
    ) -> int | None:
        """Minimum of the 64-bit words at ``first_off + i*stride`` whose 32-bit state at
        ``+state_rel`` has a bit of ``mask``; None if none qualifies."""
    def release(self) -> None:
        """Drop the buffer (BufferError while a thread waits in wait32)."""

def shm_open(name: str, flags: int, mode: int, /) -> int:
    """POSIX shm_open (close-on-exec); returns a file descriptor."""

def shm_unlink(name: str, /) -> None:
    """POSIX shm_unlink."""
