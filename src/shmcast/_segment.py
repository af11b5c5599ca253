"""One POSIX shared-memory segment: create, reach, map, unmap.

**No segment outlives its processes.**  The creator opens a fresh name in /dev/shm (owner-only,
``O_EXCL``), reserves its memory, maps it, writes the header, and removes the name at once
(:meth:`Segment.unlink`, called by the queue's constructor).  From then on the segment is an
unnamed file of the kernel's: it exists while some process maps it or holds it open, and the
kernel frees it when the last of them is gone, however they end (``close()``, an exception,
``os._exit``, a signal, SIGKILL).  No cleanup code has to run, so no signal handler is needed.

Peers reach the unnamed segment through the creator's open descriptor: ``/proc/PID/fd/FD``,
which any process of the same user may open (:meth:`Segment.attach`; the queue's handle carries
the creator's pid and the descriptor number).  Every participant keeps its descriptor open while
it maps the segment, so that the tools (``shmcast ls``, ``inspect``) find live segments by
looking at ``/proc/*/fd``, where they show as ``/dev/shm/NAME (deleted)``.

What remains possible: a creator killed in the microseconds between creating the name and
removing it (inside the queue's constructor) leaves the name behind, with a header that names a
dead creator, or no header yet.  ``shmcast cleanup`` removes exactly those.

The memory is reserved at creation (``posix_fallocate``), so a /dev/shm too small for the queue
is an error then (:class:`~shmcast.SharedMemoryFull`, saying how much is needed and free),
instead of a SIGBUS in the writer later.

The native ``shm_open`` is used rather than ``multiprocessing.shared_memory``, so that no
resource tracker process gets involved.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import mmap
import os
import re
import secrets
import stat

from . import _native
from ._errors import SegmentError, SharedMemoryFull
from ._liveness import plausible_pid

PREFIX = "shmcast-"
SHM_DIR = "/dev/shm"

#: The names this library gives its segments (``new_name``).
_OWN_NAME = re.compile(r"shmcast-[0-9a-f]{16}")
#: Any name a tool may be asked about: one path component of portable characters.
_ANY_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,255}")
_FD_MAX = 1 << 30


def new_name() -> str:
    """An unpredictable name with a recognizable prefix."""
    return PREFIX + secrets.token_hex(8)


def check_name(name: object, own: bool = True) -> str:
    """``name`` if it is a valid segment name (``own``: one this library makes), else
    SegmentError saying why.  Refuses non-strings, ``.``, ``..``, slashes, NUL, characters
    that do not encode, and names over 255 bytes."""
    if not isinstance(name, str):
        raise SegmentError(f"invalid segment name: a str is needed, not {type(name).__name__}")
    pattern = _OWN_NAME if own else _ANY_NAME
    if name in (".", "..") or not pattern.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        what = "shmcast segment name (shmcast- and 16 hex digits)" if own else "segment name"
        raise SegmentError(f"invalid {what}: {shown!r}")
    return name


def shm_free_bytes() -> int | None:
    """Bytes free in /dev/shm for an unprivileged user, or None if it cannot be told."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _reserve(fd: int, size: int) -> None:
    """Give the file its size and reserve the memory behind it: SharedMemoryFull if there is
    not enough.  Where the system cannot reserve (no ``posix_fallocate``, or a file system
    without it), the size alone is set."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
        os.ftruncate(fd, size)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            free = shm_free_bytes()
            there = "an unknown amount is" if free is None else f"{free:,} bytes are"
            raise SharedMemoryFull(
                exc.errno,
                f"not enough shared memory for the queue: it needs {size:,} bytes in "
                f"{SHM_DIR}, and {there} free (make the queue smaller, with fewer or smaller "
                f"slots, or give {SHM_DIR} more room)",
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class Segment:
    """A mapped segment.  ``buf`` is a writable memoryview of it; ``atomics`` operates on it;
    ``fd`` stays open until :meth:`close` (peers and tools reach the segment through it)."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        try:
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.name = name
        self.size = size
        self.fd = fd
        self.buf = memoryview(self._mmap)
        self.atomics = _native.Atomics(self._mmap)
        self._named = False
        #: Segments that live and die with this one (a queue's shared region): closed by
        #: :meth:`close`, after this one.
        self.companions: list[Segment] = []

    @classmethod
    def create(cls, size: int) -> Segment:
        """Create a new segment of ``size`` bytes, readable and writable by this user only, its
        memory reserved.  Its name exists until :meth:`unlink`, which the caller calls as soon
        as the header is written (or on failure).  SharedMemoryFull if /dev/shm lacks room."""
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
            _reserve(fd, size)
            seg = cls(name, fd, size)
        except BaseException:
            _native.shm_unlink("/" + name)
            os.close(fd)
            raise
        seg._named = True
        return seg

    @classmethod
    def attach(cls, name: str, pid: int, fd: int) -> Segment:
        """Map the segment that process ``pid`` holds open as descriptor ``fd`` under the name
        ``name`` (which may be removed already).  SegmentError if that process or descriptor is
        gone, holds something else, or cannot be opened."""
        check_name(name)
        for label, value, ok in (("pid", pid, plausible_pid), ("fd", fd, _plausible_fd)):
            if not isinstance(value, int) or isinstance(value, bool) or not ok(value):
                raise SegmentError(f"invalid handle: {label} {value!r}")
        path = f"/proc/{pid}/fd/{fd}"
        expected = f"{SHM_DIR}/{name}"
        gone = SegmentError(
            f"queue {name!r} is gone: the process that created it (pid {pid}) has closed it or "
            "exited, or the handle is not from this machine"
        )
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            raise gone from None
        except OSError as exc:
            raise SegmentError(
                f"cannot reach queue {name!r} through process {pid}: {exc.strerror} (the "
                "peers of a queue must run as the same user, in one PID namespace)"
            ) from None
        if target not in (expected, expected + " (deleted)"):
            raise gone
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise gone from None
        except OSError as exc:
            raise SegmentError(f"cannot open queue {name!r}: {exc.strerror}") from None
        try:
            size = _checked_size(own, name)
            if os.readlink(f"/proc/self/fd/{own}") != target:
                raise gone  # the descriptor was reused between the two looks
        except BaseException:
            os.close(own)
            raise
        return cls(name, own, size)

    @classmethod
    def open(cls, name: str) -> Segment:
        """Map a segment that still has a name in /dev/shm (for the tools: a live queue has
        none).  SegmentError if there is none by that name or it is no shared-memory file."""
        check_name(name, own=False)
        try:
            fd = _native.shm_open("/" + name, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW, 0)
        except FileNotFoundError:
            raise SegmentError(f"no shared-memory segment named {name!r}") from None
        except PermissionError:
            raise SegmentError(f"segment {name!r} belongs to another user") from None
        except OSError as exc:
            raise SegmentError(f"cannot open segment {name!r}: {exc.strerror}") from None
        try:
            size = _checked_size(fd, name)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, size)

    def unlink(self) -> None:
        """Remove the name, if this object created it and has not removed it yet.  The segment
        lives on, unnamed, while any process maps it."""
        if self._named:
            self._named = False
            with contextlib.suppress(FileNotFoundError):
                _native.shm_unlink("/" + self.name)

    def close(self) -> None:
        """Unmap and close the descriptor.  Views still exported from ``buf`` (a zero-copy
        object kept past its block) keep the mapping alive until this object is collected;
        nothing else is affected."""
        try:
            self._close()
        finally:
            if self.fd < 0:  # not when a waiting thread kept this one mapped
                for other in self.companions:
                    other.close()

    def _close(self) -> None:
        try:
            self.atomics.release()
        except BufferError:
            return  # a thread still waits on the buffer; it will be collected later
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        for attempt in range(2):
            try:
                self.buf.release()
                self._mmap.close()
                return
            except BufferError:
                # Exported views: often only garbage in a reference cycle (a traceback kept
                # with the frames that read the ring), which one collection frees.
                if attempt == 0:
                    gc.collect()


def _plausible_fd(fd: int) -> bool:
    return 0 <= fd < _FD_MAX


def _checked_size(fd: int, name: str) -> int:
    """The size of the shared-memory file open as ``fd``; SegmentError unless it is a
    non-empty regular file."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise SegmentError(f"cannot examine segment {name!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(f"{name!r} is not a shared-memory segment (not a regular file)")
    if st.st_size == 0:
        raise SegmentError(f"segment {name!r} is empty: not a shmcast queue, or not ready")
    return st.st_size
