"""One POSIX shared-memory segment: create or open by name, map, unmap, unlink.

The segment is opened with the native ``shm_open`` (owner-only permissions, ``O_EXCL`` on
creation) rather than ``multiprocessing.shared_memory``, so that no resource tracker process
gets involved: the creator alone unlinks, on ``close()``, at interpreter exit, or when the
object is collected; attaching processes never do.  Orphans of crashed creators are found by
name prefix (``shmcast-``) and removed with ``shmcast cleanup``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import weakref

from . import _native
from ._errors import SegmentError

PREFIX = "shmcast-"
SHM_DIR = "/dev/shm"


def new_name() -> str:
    """An unpredictable name with a recognizable prefix."""
    return PREFIX + secrets.token_hex(8)


def _unlink_quietly(name: str, creator_pid: int) -> None:
    # Only the process that created the segment unlinks it: a forked child that inherited the
    # object must not pull the name from under its parent.
    if os.getpid() != creator_pid:
        return
    with contextlib.suppress(FileNotFoundError):
        _native.shm_unlink("/" + name)


class Segment:
    """A mapped segment.  ``buf`` is a writable memoryview of it; ``atomics`` operates on it."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        try:
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.owner = owner
        self.buf = memoryview(self._mmap)
        self.atomics = _native.Atomics(self._mmap)
        self._finalizer: weakref.finalize | None = None
        if owner:
            # Runs once: on unlink(), when the segment is collected, or at interpreter exit
            # (a finalizer's atexit flag is set by default).
            self._finalizer = weakref.finalize(self, _unlink_quietly, name, os.getpid())

    @classmethod
    def create(cls, size: int) -> Segment:
        """Create a new segment of ``size`` bytes, readable and writable by this user only."""
        for _ in range(16):
            name = new_name()
            try:
                fd = _native.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 16 collisions of 64 random bits
            raise SegmentError("could not find a free shared-memory name")
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            _native.shm_unlink("/" + name)
            raise
        return cls(name, fd, size, owner=True)

    @classmethod
    def open(cls, name: str) -> Segment:
        """Map an existing segment.  SegmentError if there is none by that name."""
        if not isinstance(name, str) or not name or "/" in name:
            raise SegmentError(f"invalid segment name {name!r}")
        try:
            fd = _native.shm_open("/" + name, os.O_RDWR, 0)
        except FileNotFoundError:
            raise SegmentError(
                f"no shared-memory segment named {name!r}: the queue was closed, its creator "
                "exited, or the handle is not from this machine"
            ) from None
        except PermissionError:
            raise SegmentError(f"segment {name!r} belongs to another user") from None
        try:
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        if size == 0:
            os.close(fd)
            raise SegmentError(f"segment {name!r} is empty: not a shmcast queue, or not ready")
        return cls(name, fd, size, owner=False)

    def unlink(self) -> None:
        """Remove the name (creator only; idempotent).  Mappings stay valid until closed."""
        if self._finalizer is not None:
            self._finalizer()

    def close(self) -> None:
        """Unmap.  Views still exported from ``buf`` (a zero-copy object kept past its block)
        keep the mapping alive until they are collected; nothing else is affected."""
        try:
            self.atomics.release()
        except BufferError:
            return  # a thread still waits on the buffer; it will be collected later
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            pass  # exported views outlive us; the mapping goes when they do
