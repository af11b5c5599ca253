"""Is a process still the one we knew?  pid plus start time, so a recycled pid does not fool us.

A peer known by pid *and* start time is looked up in /proc once; after that a pidfd of it
(``pidfd_open``, kept in a small per-process cache) answers: it becomes readable when the
process ends, so each later look is one ``poll`` instead of a read of /proc/PID/stat (a few
microseconds instead of about 200 on a process that slept, which is most of what an idle
waiter's liveness tick costs).  The cache holds at most :data:`WATCHED_MAX` descriptors
(close-on-exec; the least recently used goes first, a dead process's at once; a forked child
starts with none), and a copy of one is what an event loop can watch to learn of the death
without looking (:func:`exit_fd`).  A pid with an unknown start time (0) is never cached:
"exists" is all that is asked of it, and a pidfd would keep answering for a process the pid
no longer names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
from collections import OrderedDict
from collections.abc import Iterator

_SELF: tuple[int, int] | None = None

#: pidfds kept open at most (one per peer process looked at recently).
WATCHED_MAX = 64

#: The largest pid Linux can hand out (PID_MAX_LIMIT on 64-bit systems).  A pid word beyond it,
#: read from a segment, is corruption, not a process.
PID_MAX = 1 << 22


def plausible_pid(pid: int) -> bool:
    """True if ``pid`` (any int, e.g. read from shared memory) can be a process id."""
    return 0 < pid <= PID_MAX


def stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/PID/stat (so index 0 is the state letter, field 3), or None when
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rfind(b")") + 2 :].split()


def all_stat_fields() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, stat_fields(pid))`` of every process visible in /proc (gone ones skipped)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                yield int(entry), fields


def process_start_time(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot, or 0 when it cannot be read."""
    fields = stat_fields(pid)
    try:
        return int(fields[19]) if fields else 0  # field 22 of the whole line
    except (IndexError, ValueError):
        return 0


def identity() -> tuple[int, int]:
    """(pid, start time) of the calling process; recomputed after a fork."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF[0] != pid:
        _SELF = (pid, process_start_time(pid))
    return _SELF


def is_alive(pid: int, start_time: int) -> bool:
    """True while the process ``pid`` exists and is the one that started at ``start_time``.

    A zombie (exited, not yet reaped) counts as dead.  A start time of 0 (unknown) checks
    existence only.  Any int is accepted: one that cannot be a pid is not alive.  Safe to call
    from any thread.
    """
    if not plausible_pid(pid):
        return False
    if start_time:
        return _WATCHES.alive(pid, start_time)
    return _looked_up(pid, start_time)


def exit_fd(pid: int, start_time: int) -> int | None:
    """A new descriptor, the caller's to close, that becomes readable when the process
    ``(pid, start_time)`` ends (a pidfd, close-on-exec); None when there is none: the process
    is gone, its start time is unknown (0) or pidfds are not available.  Safe to call from
    any thread."""
    if not (plausible_pid(pid) and start_time):
        return None
    return _WATCHES.dup(pid, start_time)


class _Watches:
    """The pidfd cache behind :func:`is_alive`: (pid, start time) -> pidfd, LRU-bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._unavailable = not hasattr(os, "pidfd_open")

    def alive(self, pid: int, start: int) -> bool:
        with self._lock:  # held over the poll: no other thread closes the fd meanwhile
            return self._look(pid, start)[0]

    def dup(self, pid: int, start: int) -> int | None:
        with self._lock:
            fd = self._look(pid, start)[1]
            if fd is None:
                return None
            try:
                return os.dup(fd)  # close-on-exec, as a pidfd is
            except OSError:  # EMFILE: the caller does without
                return None

    def _look(self, pid: int, start: int) -> tuple[bool, int | None]:
        """(alive, its cached pidfd or None), with the lock held."""
        key = (pid, start)
        fd = self._fds.get(key)
        if fd is not None:
            ended = _ended(fd)
            if ended is None:  # closed behind our back (closerange...): not ours any more
                del self._fds[key]
                return _looked_up(pid, start), None
            if not ended:
                self._fds.move_to_end(key)
                return True, fd
            del self._fds[key]
            os.close(fd)
            return False, None
        if self._unavailable:
            return _looked_up(pid, start), None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False, None
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                self._unavailable = True  # an old kernel, or a sandbox: /proc from now on
            # EINVAL (a thread's id, say) or EMFILE: /proc this time
            return _looked_up(pid, start), None
        # The pidfd names whoever has the pid now: keep it only if that is our process
        # (its start time, read once).  A process that ends later makes it readable.
        if not _looked_up(pid, start):
            os.close(fd)
            return False, None
        self._fds[key] = fd
        while len(self._fds) > WATCHED_MAX:
            os.close(self._fds.popitem(last=False)[1])
        return True, fd

    def after_fork_in_child(self) -> None:
        # Another thread may have held the lock at the fork.  The child starts empty: its
        # copies are closed while they are surely still the pidfds (a child that later
        # closes descriptors wholesale cannot leave the cache with numbers reused).
        self._lock = threading.Lock()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _ended(fd: int) -> bool | None:
    """True when the pidfd ``fd`` is readable (its process has ended), False while it runs,
    None if ``fd`` is no longer an open descriptor."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = poller.poll(0)
    if events and events[0][1] & select.POLLNVAL:
        return None
    return bool(events)


_WATCHES = _Watches()
os.register_at_fork(after_in_child=_WATCHES.after_fork_in_child)


def _looked_up(pid: int, start_time: int) -> bool:
    """:func:`is_alive` through kill(0) and /proc/PID/stat."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = stat_fields(pid)
    if fields is None:
        return not os.path.isdir("/proc/self")  # no /proc at all: existence is all we know
    if fields[0] in (b"Z", b"X"):
        return False
    if start_time:
        try:
            return int(fields[19]) == start_time
        except (IndexError, ValueError):
            return True
    return True
